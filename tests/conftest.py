from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.harness import Pki, Proc, start_app

# In CI the property tests run derandomized: the same examples every run, so a submission
# that passed here passes there. Locally they stay random and keep searching.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[int]:
    proc, port = start_app(tmp_path)
    yield port
    proc.stop()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Append every started process; all are stopped at teardown."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop(timeout=10)
