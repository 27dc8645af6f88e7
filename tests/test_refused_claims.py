"""A refused certificate's SPIFFE ID is a claim, never a ``peer`` (found by the
twenty-second session's hostile review).

A connection refused because its certificate's chain does not end at a root of the trust
domain its SPIFFE ID names (any CA -- a federated partner's, the own one for another
domain's IDs -- can mint a certificate naming any ID) was written with that ID as ``peer``
in its ``connection_refused`` audit record and log line, and in the ``peers`` of a
``connection_refused_summary``: an auditor reads ``peer`` as verified. Now a refusal has no
``peer``; the claim is ``claimed_peer`` (``claimed_peers`` in a summary), escaped and
bounded (``sidecar.refusals.MAX_CLAIMED_CHARS``), and never a metric label.

The family, as data: each way a certificate that passes the handshake is refused for the
identity it claims (``CLAIMS``), inbound through a real sidecar federating a partner trust
domain; the outbound members are in ``tests/test_trust_domains_e2e.py`` (a rogue upstream
from each CA) and ``tests/test_audit_e2e.py`` (an upstream of another identity).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from sidecar.identity.bundle import spiffe_bundle_json
from sidecar.identity.ca import DevCA, write_svid
from sidecar.refusals import MAX_CLAIMED_CHARS, claimed_peer
from tests.harness import (
    TD,
    Pki,
    audit_export,
    free_port,
    mtls_context,
    sidecar_config,
    start_sidecar,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

PARTNER = "partner.example"
LONG = f"spiffe://{TD}/ns/demo/sa/" + "a" * 600
# member -> (issuer: "own" or "partner", the ID claimed, the refusal's reason)
CLAIMS = {
    "partner_ca_claims_own_domain": ("partner", f"spiffe://{TD}/ns/demo/sa/admin",
                                     "peer_untrusted:trust-domain-mismatch"),
    "own_ca_claims_partner_domain": ("own", f"spiffe://{PARTNER}/ns/pay/sa/api",
                                     "peer_untrusted:trust-domain-mismatch"),
    "own_ca_claims_unfederated_domain": ("own", "spiffe://other.example/ns/x/sa/y",
                                         "peer_untrusted:trust-domain-not-federated"),
    "partner_ca_claims_a_long_id": ("partner", LONG, "peer_untrusted:trust-domain-mismatch"),
}


def test_a_claim_is_escaped_and_bounded() -> None:
    assert claimed_peer(None) is None and claimed_peer("") is None
    assert claimed_peer("spiffe://a/b") == "spiffe://a/b"
    assert claimed_peer("spiffe://a/\x1b]0;x\u202e") == "spiffe://a/\\x1b]0;x\\u202e"
    long = claimed_peer(LONG)
    assert long is not None and len(long) == MAX_CLAIMED_CHARS and long.endswith("...")


def _refused(port: int, ctx: ssl.SSLContext) -> None:
    """One connection with ``ctx``'s certificate: refused after the handshake."""
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
            assert s.recv(1024) == b""
    except OSError:
        pass


@pytest.mark.parametrize("per_source", [100, 1], ids=["own_records", "summarised"])
def test_a_refused_certificates_identity_is_recorded_as_a_claim(tmp_path: Path, pki: Pki,
                                                                app: int, procs: list,
                                                                per_source: int) -> None:
    partner = DevCA.create(PARTNER)
    bundle = tmp_path / "partner.json"
    bundle.write_bytes(spiffe_bundle_json([partner.root]))
    audit_dir = tmp_path / "audit"
    cfg = sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}",
        "allow_from": ["spiffe://demo.local/ns/demo/sa/*"]},
        audit={"path": str(audit_dir)},
        limits={"refused_records_per_source": per_source, "refused_summary_interval": "1h"})
    cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(bundle)}}
    srv = start_sidecar(tmp_path, "orders", cfg)
    procs.append(srv)
    port = srv.port("inbound")
    for member, (issuer, spiffe_id, _) in CLAIMS.items():
        ca = partner if issuer == "partner" else pki.ca
        ident = write_svid(ca.issue(spiffe_id), ca, tmp_path / member)
        _refused(port, mtls_context(ident, pki.bundle))
    wait_for(lambda: srv.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                                reason="peer_untrusted") >= len(CLAIMS))
    metrics = srv.metrics()
    lines = srv.log_events("connection_refused")
    assert srv.stop() == 0
    records = audit_export(audit_dir)
    refused = [r for r in records if r["event"] == "connection_refused"]
    summaries = [r for r in records if r["event"] == "connection_refused_summary"]
    want = {claimed_peer(spiffe_id): reason for _, spiffe_id, reason in CLAIMS.values()}
    # Nothing names a claim as ``peer``, in the trail or the log; no metric carries one.
    assert all(r.get("peer") in (None, "") for r in refused + summaries), refused + summaries
    assert all("peer" not in e and "peers" not in e for e in lines), lines
    summary_lines = srv.log_events("connection_refused_summary")
    assert all("peers" not in e for e in summary_lines)
    for _, spiffe_id, _ in CLAIMS.values():
        assert spiffe_id[:60] not in metrics, spiffe_id
    got: dict[Any, str] = {}
    for r in refused:
        got[(r.get("extra") or {}).get("claimed_peer")] = r["reason"]
    for r in summaries:
        for claim in r["extra"]["claimed_peers"]:
            got[claim] = "summarised"
        assert "peers" not in r["extra"]
    if per_source == 100:
        assert got == want, got
        assert {e.get("claimed_peer"): e["reason"] for e in lines} == want
    else:  # one record of its own, the others summarised under claimed_peers
        # (``refused_records_per_source`` is a budget per whole second: refusals that
        # straddle a second's end get one record of their own in each -- seen once in CI)
        assert set(got) == set(want) and 1 <= len(refused) <= 2, (got, refused)
        assert len(refused) < len(want) and summaries, (refused, summaries)
    assert all(len(claim) <= MAX_CLAIMED_CHARS for claim in got)
