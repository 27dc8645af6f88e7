"""The shared mesh policy: model, loader, path normalisation, compiled matcher, decide().

No I/O happens in this package except ``load_policy_file`` reading one file.
"""
