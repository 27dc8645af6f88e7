"""``limits.handshake_timeout`` bounds the outbound handshake with the peer sidecar too.

Found by a hostile review: docs/config.md said the key covered the TLS handshake "inbound and
outbound", but only the inbound listener read it; an upstream that accepted the TCP
connection and never finished the handshake held each request for the whole
``connect_timeout``. Now the request gets its 502 at ``handshake_timeout``, refused as
``upstream_handshake_timeout`` (metric ``sidecar_tls_handshake_failures_total``, log, audit).
Through a real sidecar, against upstreams that stall at each step of the handshake.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.harness import (
    Pki,
    ScriptedServer,
    free_port,
    http,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")


class _Staller(ScriptedServer):
    """A TCP server on 127.0.0.1 that accepts and then stalls ``how``: ``silent`` (reads
    nothing), ``reads_hello`` (reads the ClientHello, answers nothing), ``half_hello``
    (answers one byte of a TLS record header, then nothing). Bounded: each connection is
    held at most 20 s, or until ``close``."""

    timeout = 20.0

    def __init__(self, how: str) -> None:
        self.how = how
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        if self.how in ("reads_hello", "half_hello"):
            sock.recv(65536)
        if self.how == "half_hello":
            sock.sendall(b"\x16")
        self.stopped.wait(self.timeout)


@pytest.mark.parametrize("how", ["silent", "reads_hello", "half_hello"])
def test_a_stalled_upstream_handshake_ends_at_handshake_timeout(tmp_path: Path, procs,
                                                                how: str) -> None:
    pki = Pki(tmp_path / "pki")
    up = _Staller(how)
    try:
        cfg = sidecar_config(pki.identity("frontend"), outbound=[{
            "name": "orders", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{up.port}", "identity": spiffe("orders")}],
            limits={"handshake_timeout": "1s", "connect_timeout": "8s"})
        a = start_sidecar(tmp_path, "frontend", cfg)
        procs.append(a)
        started = time.monotonic()
        r = http(a.port("orders"), "GET", "/x", timeout=15)
        took = time.monotonic() - started
        assert r.status == 502 and took < 5, (r.status, took)  # not the 8 s connect_timeout
        assert wait_for(lambda: a.metric("sidecar_tls_handshake_failures_total",
                                         direction="outbound",
                                         reason="upstream_handshake_timeout") >= 1)
    finally:
        up.close()


def test_the_reason_is_documented() -> None:
    root = Path(__file__).resolve().parent.parent
    assert "`upstream_handshake_timeout`" in (root / "docs" / "metrics.md").read_text()
