"""Telemetry: the one record of each request, written through a real audit writer."""

from __future__ import annotations

from pathlib import Path

import trio

from sidecar.audit.record import SharedExtra
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


def test_records_of_one_connection_share_its_fixed_extra_and_nothing_leaks(
        tmp_path: Path) -> None:
    # The fixed part of ``extra`` (service and port inbound, target outbound) is one shared
    # mapping per value: an error added to one record must not reach the next record on the
    # same port, and each port / target keeps its own values.
    other_port = RequestFacts("inbound", "spiffe://td/a", "10.0.0.1", "GET", "/x", "h", 15444,
                              "inbound")
    other_target = RequestFacts("outbound", "spiffe://td/me", "127.0.0.1", "GET", "/y", "h",
                                15001, "pay", "spiffe://td/pay")
    out = records(tmp_path, [
        (RequestContext("a1", 1.0, INBOUND, ALLOW), 200, None),
        (RequestContext("a2", 1.1, INBOUND, ALLOW), 502, "upstream_closed"),
        (RequestContext("a3", 1.2, INBOUND, ALLOW), 200, None),
        (RequestContext("p1", 1.3, other_port, ALLOW), 200, None),
        (RequestContext("o1", 1.4, OUTBOUND, ALLOW), 502, "connect_failed"),
        (RequestContext("o2", 1.5, OUTBOUND, ALLOW), 200, None),
        (RequestContext("t1", 1.6, other_target, ALLOW), 200, None),
    ])
    x = {r.request_id: r.extra for r in out}
    base = {"service": "spiffe://td/me", "port": 15443}
    assert x["a1"] == x["a3"] == base
    assert x["a2"] == {**base, "error": "upstream_closed"}
    assert x["p1"] == {"service": "spiffe://td/me", "port": 15444}
    assert x["o1"] == {"target": "spiffe://td/orders", "error": "connect_failed"}
    assert x["o2"] == {"target": "spiffe://td/orders"}
    assert x["t1"] == {"target": "spiffe://td/pay"}


def test_shared_extra_tables_are_bounded() -> None:
    telemetry = Telemetry(SidecarMetrics(), None, service="spiffe://td/me")
    table: dict[object, SharedExtra] = {}
    for i in range(3000):
        telemetry._shared_extra(table, i, SharedExtra(port=i))
        assert len(table) <= 1024
    assert table[2999] == {"port": 2999}
