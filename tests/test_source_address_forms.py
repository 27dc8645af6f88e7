"""An IPv4 client of a dual-stack listener is one source, named by its IPv4 address.

A listener on ``[::]`` (dual-stack) sees an IPv4 client as ``::ffff:a.b.c.d``. The
per-source connection limits already counted it as ``a.b.c.d``, but the alert keys (``by:
address``), the refusal summaries, the log lines and the audit records used the mapped
form, so one client was two sources to an operator comparing listeners and to a rule or
query written with its IPv4 address. Since the twenty-fourth session every data-path
listener names the client the one way (``sidecar.net.listen.source_address``); tested through
a real sidecar listening on ``[::]`` (the only traffic goes to 127.0.0.1). Outbound listeners
must listen on a loopback address, so only the inbound listener can be dual-stack.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
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
from tests.test_lifetime_review import _policy_doc, _write

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def _dual_stack() -> bool:
    try:
        with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True):
            return True
    except (OSError, ValueError):
        return False


needs_dual_stack = pytest.mark.skipif(not _dual_stack(), reason="no dual-stack IPv6 here")


def _untrusted_handshake(port: int) -> None:
    """A TLS client without a certificate: refused (``no_client_cert``), which counts for
    ``by: address`` alert rules."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
            tls.recv(100)
    except (OSError, ssl.SSLError):
        pass


@needs_dual_stack
def test_an_ipv4_client_of_a_dual_stack_inbound_listener_is_its_ipv4_address(
        tmp_path: Path, pki: Any, app: int, procs: list[Any]) -> None:
    doc = _policy_doc([{"name": "callers", "allow": {"from": [spiffe("frontend")]}}])
    doc["alerts"] = [{"name": "scanning", "threshold": 3, "window": "5m", "by": "address",
                      "block": "10m"}]
    port = free_port()
    proc = start_sidecar(tmp_path, "orders", sidecar_config(
        pki.identity("orders"), inbound={"listen": f"[::]:{port}", "app": f"127.0.0.1:{app}"},
        policy=_write(tmp_path, doc), audit={"path": str(tmp_path / "audit")}))
    procs.append(proc)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(port, "GET", "/x", ctx=ctx).status == 200
    for _ in range(3):
        _untrusted_handshake(port)
    raised = wait_for(lambda: proc.log_events("alert_raised"))
    assert [(e["alert"], e["by"], e["source"]) for e in raised] == [
        ("scanning", "address", "127.0.0.1")], raised
    refused = proc.log_events("connection_refused")
    assert refused and {e.get("source") for e in refused} == {"127.0.0.1"}, refused
    # The block holds for the same client, whatever certificate it now presents: refused at
    # accept, before any TLS byte (a 403 before the thirty-first session).
    with pytest.raises(OSError):  # (ssl.SSLError is one)
        http(port, "GET", "/x", ctx=ctx)
    assert wait_for(lambda: [e for e in proc.log_events("connection_refused")
                             if e.get("reason") == "source_blocked"
                             and e.get("source") == "127.0.0.1"])
    proc.stop()
    sources = {r.get("src") or r.get("source") for r in audit_export(tmp_path / "audit")
               if r.get("event") in ("request", "connection_refused", "alert")}
    assert sources == {"127.0.0.1"}, sources
