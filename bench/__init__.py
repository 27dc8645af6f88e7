"""Benchmark harness for the sidecar: ``python bench/run.py`` (see bench/README.md)."""
