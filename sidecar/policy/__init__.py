"""The shared mesh policy: model, loader, path normalisation, compiled matcher, decide().

No I/O happens in this package except ``read_policy_set`` (``load_policy_set``,
``load_policy_file``) reading the policy's files and directories.
"""
