"""TlsState: the holder of the workload's TLS snapshot and its reload status (real files)."""

from __future__ import annotations

from pathlib import Path

from sidecar.tlsstate import TlsState, build_snapshot
from tests.harness import Pki


def test_failures_are_recorded_and_the_snapshot_stays(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    ident = pki.identity("orders")
    files = (str(ident / "tls.crt"), str(ident / "tls.key"), str(ident / "ca.crt"))
    state = TlsState.load(*files)
    before = state.snapshot
    state.record_failure("tls.key does not match tls.crt")
    assert state.snapshot is before  # a failed reload changes nothing in force
    assert (state.last_error, state.reloads_failed, state.reloads_ok) == (
        "tls.key does not match tls.crt", 1, 0)
    state.swap(build_snapshot(*files))
    assert state.snapshot is not before
    assert (state.last_error, state.reloads_failed, state.reloads_ok) == (None, 1, 1)
