"""Telemetry: the one record of each request, written through a real audit writer."""

from __future__ import annotations

from pathlib import Path

import trio

from sidecar.audit.segments import iter_records
from sidecar.audit.writer import AuditWriter
from sidecar.config.audit import AuditConfig
from sidecar.gate import Verdict
from sidecar.metrics import SidecarMetrics
from sidecar.policy.decision import Decision, RequestFacts
from sidecar.telemetry import RequestContext, Telemetry

INBOUND = RequestFacts("inbound", "spiffe://td/a", "10.0.0.1", "GET", "/x", "h", 15443,
                       "inbound")
OUTBOUND = RequestFacts("outbound", "spiffe://td/me", "127.0.0.1", "GET", "/y", "h", 15001,
                        "orders", "spiffe://td/orders")
ALLOW = Verdict(Decision("allow", "r1", "allowed", "v1"))
DENY = Verdict(Decision("deny", "r2", "no_rule", "v1", status=403))


def records(tmp_path: Path, calls: list[tuple[RequestContext, int, str | None]]) -> list:
    """Each (context, status, error) through Telemetry.request into a real trail."""
    writer = AuditWriter(AuditConfig(path=str(tmp_path)), identity="spiffe://td/me")
    telemetry = Telemetry(SidecarMetrics(), writer, service="spiffe://td/me")

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                for ctx, status, error in calls:
                    telemetry.request(ctx, status, 5, 7, error=error)
                await writer.aclose()

    trio.run(main)
    return list(iter_records(str(tmp_path)))


def test_each_kind_of_request_record_keeps_its_fields(tmp_path: Path) -> None:
    # The usual records (inbound and outbound, allowed) are built with their keywords named
    # in the call; the others (refused before any facts, allowed then broken off) through
    # the general path: every one keeps what it had.
    out = records(tmp_path, [
        (RequestContext("in", 1.0, INBOUND, ALLOW), 200, None),
        (RequestContext("out", 2.0, OUTBOUND, ALLOW), 200, None),
        (RequestContext("denied", 3.0, INBOUND, DENY), 403, None),
        (RequestContext("early", 4.0, None, None, "10.0.0.9", "spiffe://td/b"), 400,
         "bad_host"),
        (RequestContext("broken", 5.0, INBOUND, ALLOW), 502, "upstream_closed"),
    ])
    by_id = {r.request_id: r for r in out}
    assert sorted(by_id) == ["broken", "denied", "early", "in", "out"]
    r = by_id["in"]
    assert (r.direction, r.peer, r.path, r.status, r.bytes_in, r.bytes_out, r.decision) == (
        "inbound", "spiffe://td/a", "/x", 200, 5, 7, "allow")
    assert r.extra == {"service": "spiffe://td/me", "port": 15443}
    assert by_id["out"].extra == {"target": "spiffe://td/orders"}
    assert by_id["denied"].decision == "deny" and by_id["denied"].rule == "r2"
    early = by_id["early"]
    assert (early.source, early.peer, early.direction, early.reason, early.status) == (
        "10.0.0.9", "spiffe://td/b", "inbound", "bad_host", 400)
    assert by_id["broken"].extra == {"service": "spiffe://td/me", "port": 15443,
                                     "error": "upstream_closed"}
