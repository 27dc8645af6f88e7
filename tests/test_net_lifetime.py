"""The lifetime registry's rules (sidecar/net/lifetime.py), driven with explicit clocks.

The same rules through running sidecars: tests/test_connection_lifetime_e2e.py.
"""

from __future__ import annotations

import math

import trio

from sidecar.config.model import Limits
from sidecar.identity.trust import PeerChain
from sidecar.net.lifetime import (
    CLOSE_REASONS,
    GRACEFUL_REASONS,
    Lifetimes,
    age_deadline,
)

PEER = "spiffe://td/ns/a/sa/b"


def test_age_deadline_never_exceeds_the_age_and_spreads_over_the_jitter() -> None:
    got = [age_deadline(100.0, 60.0, 6.0) for _ in range(500)]
    assert all(154.0 <= d <= 160.0 for d in got)
    assert max(got) - min(got) > 3  # spread, not one instant
    assert age_deadline(100.0, 0.0, 6.0) == math.inf


def test_every_event_retires_the_connections_it_concerns_once() -> None:
    closed: list[tuple[str, str]] = []

    async def main() -> None:
        lt = Lifetimes(max_age=10, jitter=0, grace=2,
                       on_close=lambda c, r: closed.append((c.source, r)))
        chain = PeerChain((b"leaf", b"root"), (b"leaf",))
        with lt.track("inbound", "inbound", "10.0.0.1", peer=PEER, chain=chain,
                      peer_not_after=5_000.0) as expiring, \
                lt.track("inbound", "inbound", "10.0.0.2", peer=PEER, chain=chain) as old, \
                lt.track("outbound", "up", "10.0.0.3") as app_side, \
                lt.track("inbound", "inbound", "10.0.0.4", peer=PEER, chain=chain) as stream:
            start = trio.current_time()
            assert len(lt) == 4
            assert lt.sweep(start, 4_000.0) == 0
            assert lt.sweep(start, 5_000.0) == 1 and expiring.retiring == "peer_cert_expired"
            stream.recheck = lambda now: False
            assert lt.recheck_policy(0.0) == 1 and stream.retiring == "policy_refused"
            assert not stream.serve_more
            assert lt.block("address", "10.0.0.3") == 0  # alerts judge inbound callers only
            assert lt.sweep(start + 10, 0.0) == 2  # old and app_side reach their age
            assert old.retiring == app_side.retiring == "max_age" and old.serve_more
            assert old.scope.deadline == old.cut_at <= trio.current_time() + 2
            assert lt.recheck_trust(lambda peer, chain: None) == 0  # each retired once
        assert len(lt) == 0

    trio.run(main)
    assert sorted(closed) == [("10.0.0.1", "peer_cert_expired"), ("10.0.0.2", "max_age"),
                              ("10.0.0.3", "max_age"), ("10.0.0.4", "policy_refused")]


def test_a_bundle_change_moves_each_trusted_connections_end_of_trust() -> None:
    """``recheck_trust``: None retires (``peer_untrusted``); a time becomes the connection's
    ``peer_not_after``, which the sweep then applies like a leaf's expiry."""
    closed: list[tuple[str, str]] = []

    async def main() -> None:
        lt = Lifetimes(max_age=1e9, jitter=0, grace=2,
                       on_close=lambda c, r: closed.append((c.source, r)))
        kept, dropped = PeerChain((b"leaf", b"root"), ()), PeerChain((b"x", b"y"), ())
        with lt.track("inbound", "inbound", "a", peer=PEER, chain=kept,
                      peer_not_after=9_000.0) as a, \
                lt.track("inbound", "inbound", "b", peer=PEER, chain=dropped,
                         peer_not_after=9_000.0) as b:
            ends = {kept: 6_000.0, dropped: None}
            assert lt.recheck_trust(lambda peer, chain: ends[chain]) == 1
            assert b.retiring == "peer_untrusted" and a.retiring is None
            assert a.peer_not_after == 6_000.0
            start = trio.current_time()
            assert lt.sweep(start, 5_999.0) == 0
            assert lt.sweep(start, 6_000.0) == 1 and a.retiring == "peer_cert_expired"

    trio.run(main)
    assert sorted(closed) == [("a", "peer_cert_expired"), ("b", "peer_untrusted")]


def test_idle_connections_end_now_or_after_the_grace() -> None:
    async def main() -> None:
        lt = Lifetimes.for_limits(Limits(connection_close_grace=3))
        with lt.track("inbound", "inbound", "a", peer=PEER) as immediate, \
                lt.track("inbound", "inbound", "b", peer=PEER) as graceful:
            immediate.idle, graceful.idle = trio.CancelScope(), trio.CancelScope()
            lt.retire(immediate, "source_blocked")
            lt.retire(graceful, "max_age")
            assert immediate.idle.cancel_called
            assert not graceful.idle.cancel_called
            assert graceful.idle.deadline <= trio.current_time() + 3

    trio.run(main)


def test_reason_table_is_complete() -> None:
    assert GRACEFUL_REASONS < set(CLOSE_REASONS)
    assert len(set(CLOSE_REASONS)) == 6


def test_every_reason_is_documented() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    identity = (root / "docs" / "identity.md").read_text()
    metrics = (root / "docs" / "metrics.md").read_text()
    for reason in CLOSE_REASONS:
        assert f"| `{reason}` |" in identity, reason
        assert f"`{reason}`" in metrics, reason
