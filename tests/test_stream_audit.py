"""A TCP or upgraded stream is audited when it opens, and again when it ends
(docs/audit.md, ``stream_closed``).

A hostile review found a stream's only record written when it ended: nothing in the trail
while it ran (for hours, as a stream may), and nothing at all after a crash. Now its
decision record is written when it opens (status 101, or 200 for a TCP stream), within the
writer's linger like any request's; a ``stream_closed`` record under the same request id
follows at its end, with the bytes each way. Both listeners' kinds of stream: an upgraded
one through the inbound HTTP listener and a TCP one through an inbound ``protocol: tcp``.
"""

from __future__ import annotations

import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.harness import audit_export, mtls_context, spiffe, wait_for
from tests.test_lifetime_review import _echoes, _inbound, _policy_doc, _tunnel, _write

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def _tcp_stream(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A TCP stream through the inbound listener to the (HTTP) app, one request answered."""
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    tls.sendall(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or not got.endswith(b"}"):
        more = tls.recv(65536)
        assert more, got
        got += more
    assert got.startswith(b"HTTP/1.1 200"), got
    return tls


KINDS = {"upgrade": ("http", 101), "tcp": ("tcp", 200)}


def _open(tmp_path: Path, pki: Any, app: int, procs: list, kind: str) -> tuple[Any, Any]:
    protocol, _ = KINDS[kind]
    doc = _policy_doc([{"name": "callers", "allow": {"from": [spiffe("frontend")]}}])
    srv = _inbound(tmp_path, pki, app, procs, _write(tmp_path, doc), protocol=protocol)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    port = srv.port("inbound")
    return srv, (_tunnel(port, ctx, {}) if kind == "upgrade" else _tcp_stream(port, ctx))


def _opened(tmp_path: Path, status: int) -> dict[str, Any]:
    """The stream's decision record, once it is in the trail."""
    [rec] = wait_for(lambda: [r for r in audit_export(tmp_path / "audit-orders")
                              if r["event"] == "request" and r["status"] == status],
                     timeout=10)
    assert (rec["decision"], rec["rule"], rec["peer"]) == ("allow", "callers",
                                                            spiffe("frontend"))
    return rec


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_stream_is_audited_when_it_opens_and_when_it_ends(tmp_path: Path, pki, app, procs,
                                                            kind: str) -> None:
    srv, stream = _open(tmp_path, pki, app, procs, kind)
    try:
        opened = _opened(tmp_path, KINDS[kind][1])  # while the stream still runs
        if kind == "upgrade":
            assert _echoes(stream)
    finally:
        stream.close()
    [closed] = wait_for(lambda: [r for r in audit_export(tmp_path / "audit-orders")
                                 if r["event"] == "stream_closed"], timeout=10)
    assert closed["request_id"] == opened["request_id"]
    assert (closed["decision"], closed["rule"]) == ("allow", "callers")
    assert closed["bytes_in"] > 0 and closed["bytes_out"] > 0
    assert [e["request_id"] for e in srv.log_events("stream_closed")] == [opened["request_id"]]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_stream_open_when_the_sidecar_dies_is_in_the_trail(tmp_path: Path, pki, app, procs,
                                                             kind: str) -> None:
    srv, stream = _open(tmp_path, pki, app, procs, kind)
    try:
        opened = _opened(tmp_path, KINDS[kind][1])
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=10)
    finally:
        stream.close()
    recs = audit_export(tmp_path / "audit-orders")
    assert [r["request_id"] for r in recs if r["event"] == "request"] == [opened["request_id"]]
