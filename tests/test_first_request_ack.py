"""A client with Nagle's algorithm on gets its first request through at once (thirty-second
session).

The server sends no session tickets (docs/identity.md, "TLS settings"), so after the client's
last handshake flight it wrote nothing and the kernel delayed its ACK (40 ms on Linux): a TLS
client without ``TCP_NODELAY`` (Python's own ``ssl`` sockets, many C and Java clients) held
its first request until the ACK came, 40 ms on every new connection. The inbound listener now
acknowledges the flight when the handshake ends (``TCP_QUICKACK``).

The test compares, in one run and against one sidecar, the first request's round trip of a
Nagle client with that of a ``TCP_NODELAY`` client (medians of alternating connections): the
delayed ACK is never shorter than 40 ms, so without the fix the difference is at least that,
whatever the machine's speed. (Found while looking into the suite's run time: most of the
hostile suites' clients are Nagle clients.)
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Pki,
    SidecarProc,
    mtls_context,
    spiffe,
    start_app,
    start_inbound,
    write_policy,
)

pytestmark = [pytest.mark.usefixtures("no_internal_errors"),
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="TCP_QUICKACK and the 40 ms delayed ACK are Linux's")]

REQUEST = b"GET /ack HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def inbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SidecarProc, Any]]:
    tmp: Path = tmp_path_factory.mktemp("first-ack")
    pki = Pki(tmp / "pki")
    procs: list[Any] = []
    app, app_port = start_app(tmp)
    procs.append(app)
    try:
        policy = tmp / "mesh.yaml"
        write_policy(policy, {"version": 1, "trust_domain": "demo.local", "services": {
            spiffe("orders"): {"rules": [{"name": "open",
                                          "allow": {"from": [spiffe("frontend")]}}]}}})
        sidecar = start_inbound(tmp, pki, app_port, procs, policy=str(policy))
        yield sidecar, mtls_context(pki.identity("frontend", dirname="client"), pki.bundle)
    finally:
        for p in reversed(procs):
            p.stop()


def _first_request(port: int, ctx: Any, nodelay: bool) -> float:
    """Seconds from the request's write to the answer's end, on a new connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(sock) as tls:
        began = time.monotonic()
        tls.sendall(REQUEST)
        got = b""
        while chunk := tls.recv(65536):
            got += chunk
        took = time.monotonic() - began
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return took


def test_a_nagle_clients_first_request_is_not_held_for_the_delayed_ack(inbound: Any) -> None:
    sidecar, ctx = inbound
    port = sidecar.port("inbound")
    nagle, nodelay = [], []
    for _ in range(9):  # alternating, so a busy moment of the machine falls on both
        nagle.append(_first_request(port, ctx, nodelay=False))
        nodelay.append(_first_request(port, ctx, nodelay=True))
    added = statistics.median(nagle) - statistics.median(nodelay)
    # Without the ACK: at least the 40 ms delayed-ACK timer on every Nagle request.
    assert added < 0.025, ([round(t * 1000, 1) for t in nagle],
                           [round(t * 1000, 1) for t in nodelay])
