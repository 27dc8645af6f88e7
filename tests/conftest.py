from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.harness import STARTED_SIDECARS, Pki, Proc, sidecar_log_faults, start_app

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


@pytest.fixture
def no_internal_errors() -> Iterator[None]:
    """Fail the test if any sidecar logged an ``internal_error`` (or a traceback) while it ran.

    Hostile suites use it (``pytestmark = pytest.mark.usefixtures("no_internal_errors")``):
    a malformed request must end in a generic 4xx, never in an unhandled exception. It covers
    sidecars started before the test (module fixtures: from their log size at test start)
    and during it (from the beginning of their log).
    """
    start = {id(p): p.log_path.stat().st_size if p.log_path.exists() else 0
             for p in STARTED_SIDECARS}
    yield
    faults = []
    for proc in list(STARTED_SIDECARS):
        for line in sidecar_log_faults(proc, start.get(id(proc), 0)):
            faults.append(f"{proc.log_path.name}: {line[:2000]}")
        if proc.proc.poll() is not None:
            STARTED_SIDECARS.remove(proc)  # stopped and checked: nothing more can appear
    assert not faults, "a sidecar logged internal errors:\n" + "\n".join(faults)
