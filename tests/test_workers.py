"""`workers: N`: N processes share the listening ports with SO_REUSEPORT."""

from __future__ import annotations

import os
import signal
import time

from sidecar.audit.segments import iter_records
from tests.harness import free_port, http, mtls_context, sidecar_config, spiffe, start_sidecar


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def test_two_workers_share_the_inbound_port_and_stop_together(tmp_path, pki, app, procs):
    ident = pki.identity("orders")
    audit = tmp_path / "audit"
    cfg = sidecar_config(ident, inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}",
        "allow_from": [spiffe("frontend")]}, audit={"path": str(audit)}, workers=2)
    b = start_sidecar(tmp_path, "orders", cfg)
    procs.append(b)
    # Worker 1 is a child process of worker 0; wait until it listens too.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (audit / "worker-1").exists():
        time.sleep(0.1)
    assert len(_children(b.pid)) == 1
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    for i in range(60):  # new connection each time: the kernel spreads them over workers
        assert http(b.port("inbound"), "GET", f"/w/{i}", ctx=ctx).status == 200
    child = _children(b.pid)[0]
    b.signal(signal.SIGTERM)
    assert b.proc.wait(timeout=30) == 0
    assert not os.path.exists(f"/proc/{child}") or _children(b.pid) == []
    counts = [sum(1 for r in iter_records(str(audit / f"worker-{w}")) if r.event == "request")
              for w in (0, 1)]
    assert sum(counts) == 60
    assert all(c > 0 for c in counts), counts
