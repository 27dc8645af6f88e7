"""A connection whose source an alert rule blocks is refused before any work is done for it.

Found by a hostile review (thirty-first session): a block showed only as a 403 on a request.
An address blocked (``by: address``) for its failed handshakes -- callers without a client
certificate -- never sends one, so every new connection from it still got a whole TLS
handshake, a refusal record and a log line: 1,217 handshakes in 4 s from one client, half a
core. Now a blocked address is refused at accept, before any TLS byte, counted in
``sidecar_source_blocked_total``; another address is served (the control). A blocked peer
(``by: peer``) is refused per request as before (403), and another peer of its address is
served.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests import harness as h
from tests.test_lifetime_review import _policy_doc, _write

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def _sidecar(tmp: Path, pki: h.Pki, app: int, procs: list[Any], by: str) -> h.SidecarProc:
    doc = _policy_doc([{"name": "callers", "allow": {
        "from": [h.spiffe("frontend"), h.spiffe("other")], "paths": ["/ok"]}}])
    doc["alerts"] = [{"name": "burst", "threshold": 3, "window": "1m", "by": by,
                      "block": "5m"}]
    proc = h.start_sidecar(tmp, "orders", h.sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{h.free_port()}", "app": f"127.0.0.1:{app}"},
        policy=_write(tmp, doc)))
    procs.append(proc)
    return proc


def _server_hello(port: int, source: str = "127.0.0.1") -> bool:
    """Whether a ClientHello from ``source`` is answered with a TLS handshake record."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(source, 0)) as s:
        s.sendall(outgoing.read())
        try:
            data = s.recv(5)
        except OSError:
            return False
        return data[:1] == b"\x16"


def _no_cert(port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: orders\r\n\r\n")
            s.recv(100)
    except OSError:  # (ssl.SSLError is one: the refusal)
        pass


def _get(port: int, ctx: ssl.SSLContext, path: str) -> bytes:
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"
                      .encode())
            return h.read_head(s)
    except OSError:
        return b""


def test_a_blocked_address_is_refused_before_its_handshake(tmp_path: Path, pki: h.Pki,
                                                           app: int, procs: list[Any]) -> None:
    proc = _sidecar(tmp_path, pki, app, procs, "address")
    port = proc.port("inbound")
    assert _server_hello(port)
    for _ in range(3):  # (the failures that set the block: no client certificate)
        _no_cert(port)
    h.wait_for(lambda: proc.log_events("alert_raised"), timeout=10)
    failures = proc.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                           reason="no_client_cert")
    assert [_server_hello(port) for _ in range(5)] == [False] * 5
    # (a valid caller from the blocked address too: the block is the address's)
    assert _get(port, h.mtls_context(pki.identity("frontend"), pki.bundle), "/ok") == b""
    assert proc.metric("sidecar_source_blocked_total") >= 6
    assert proc.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                       reason="no_client_cert") == failures
    refused = [e for e in proc.log_events("connection_refused")
               if e.get("reason") == "source_blocked"]
    assert refused and all(e["source"] == "127.0.0.1" for e in refused), refused
    if h.loopback_alias_works("127.0.0.2"):  # (another address: still served)
        assert _server_hello(port, "127.0.0.2")


def test_a_blocked_peer_is_refused_per_request_not_at_accept(tmp_path: Path, pki: h.Pki,
                                                            app: int, procs: list[Any]) -> None:
    """A block by peer is no block of its address: the peer's requests are refused (403
    ``source_blocked``; its handshake is its own cost, paid with a valid certificate), and
    another peer from the same address is served."""
    proc = _sidecar(tmp_path, pki, app, procs, "peer")
    port = proc.port("inbound")
    blocked = h.mtls_context(pki.identity("frontend"), pki.bundle)
    other = h.mtls_context(pki.identity("other"), pki.bundle)
    for _ in range(3):  # (its own failures: no rule allows /denied)
        assert _get(port, blocked, "/denied").startswith(b"HTTP/1.1 403")
    h.wait_for(lambda: proc.log_events("alert_raised"), timeout=10)
    assert _get(port, blocked, "/ok").startswith(b"HTTP/1.1 403")
    assert proc.metric("sidecar_source_blocked_total") >= 1
    assert _get(port, other, "/ok").startswith(b"HTTP/1.1 200")  # (the same address)
    assert _server_hello(port)
