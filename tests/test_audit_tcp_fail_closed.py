"""TCP streams keep ``audit.on_failure: fail_closed`` as HTTP requests do (found by the
twenty-eighth session's review of the outbound side).

An inbound or outbound ``protocol: tcp`` listener never asked whether the trail could record:
while the audit directory was unwritable and an HTTP request through the same sidecar was
answered 503, every TCP stream was opened to the app or the upstream and served, and once the
writer's bounded queue was full their records were dropped, counted nowhere (the writer's
``rejected``, which no metric shows). Now a stream is refused before anything is dialled
(its connection closed, its record ``audit_unavailable``), and the record of a request or
stream already served that finds no room is counted in ``sidecar_audit_records_lost_total``
under ``fail_closed`` too (tests/test_audit_writer.py::test_queue_full).

Each direction, with real sidecars and a real app: the trail is broken (the directory
replaced by a file), streams are refused and reach nothing while it is, and once it is back
every stream served has its record, nothing was lost, and the refused ones say why.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from tests.harness import (
    audit_export,
    free_port,
    http,
    mtls_context,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)
from tests.test_audit_e2e import _break_dir, _restore_dir

pytestmark = pytest.mark.usefixtures("no_internal_errors")

REQUEST = b"GET /tcp HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"


def _stream(open_socket: Any) -> bool:
    """One HTTP exchange over a TCP stream: whether the app's answer came back."""
    try:
        with open_socket() as sock:
            sock.settimeout(5)
            sock.sendall(REQUEST)
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_tcp_streams_are_refused_while_the_trail_cannot_record(tmp_path, pki, app, procs,
                                                               direction: str) -> None:
    audits = {name: tmp_path / f"audit-{name}" for name in ("orders", "frontend")}
    orders = start_sidecar(tmp_path, "orders", sidecar_config(
        pki.identity("orders"), inbound={"listen": f"127.0.0.1:{free_port()}",
                                         "app": f"127.0.0.1:{app}", "protocol": "tcp",
                                         "allow_from": [spiffe("frontend")]},
        audit={"path": str(audits["orders"]), "queue_size": 4}))
    procs.append(orders)
    frontend = start_sidecar(tmp_path, "frontend", sidecar_config(
        pki.identity("frontend"), outbound=[{
            "name": "orders", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{orders.port('inbound')}", "identity": spiffe("orders"),
            "protocol": "tcp"}],
        audit={"path": str(audits["frontend"]), "queue_size": 4}))
    procs.append(frontend)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    if direction == "inbound":
        judged, trail = orders, audits["orders"]

        def open_socket() -> socket.socket:
            return ctx.wrap_socket(socket.create_connection(
                ("127.0.0.1", orders.port("inbound")), timeout=10))
    else:
        judged, trail = frontend, audits["frontend"]

        def open_socket() -> socket.socket:
            return socket.create_connection(("127.0.0.1", frontend.port("orders")), timeout=10)

    served = 0
    assert _stream(open_socket)
    served += 1
    wait_for(lambda: judged.metric("sidecar_audit_records_written_total") >= 1)
    moved = _break_dir(trail)
    # The writer finds the broken disk with its next batch: a stream in the linger after the
    # last good batch is still served (its record kept for later), then every one is refused.
    admin = judged.port("admin")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and http(admin, "GET", "/readyz").status != 503:
        served += _stream(open_socket)
        time.sleep(0.1)
    assert http(admin, "GET", "/readyz").status == 503
    reached = orders.metric("sidecar_requests_total") if direction == "outbound" else None
    refused = 6
    assert not any(_stream(open_socket) for _ in range(refused))
    if reached is not None:  # (nothing dialled: the upstream sidecar saw no stream)
        assert orders.metric("sidecar_requests_total") == reached
    _restore_dir(trail, moved)
    wait_for(lambda: http(admin, "GET", "/readyz").status == 200, timeout=15)
    assert _stream(open_socket)
    served += 1
    assert judged.metric("sidecar_audit_records_lost_total") == 0
    assert judged.stop() == 0
    records = [r for r in audit_export(trail) if r.get("event") in
               ("request", "stream_closed")]
    assert sum(1 for r in records if r["status"] == 200) == served, records
    unavailable = [r for r in records if r["status"] == 503]
    assert unavailable and all((r.get("extra") or {}).get("error") == "audit_unavailable"
                               for r in unavailable), unavailable
