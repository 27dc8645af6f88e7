from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Pki, Proc, start_app


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
