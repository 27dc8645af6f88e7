"""The lifetime registry's rules (sidecar/net/lifetime.py), driven with explicit clocks.

The same rules through running sidecars: tests/test_connection_lifetime_e2e.py.
"""

from __future__ import annotations

import math

import pytest
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
            # The ones cut at once are never reported again; old, in its graceful close,
            # loses its peer's trust and is cut now (app_side has no peer to check).
            assert lt.recheck_trust(lambda peer, chain: None) == 1
            assert old.retiring == "peer_untrusted" and not old.serve_more
            assert lt.recheck_trust(lambda peer, chain: None) == 0  # each cut once
        assert len(lt) == 0

    trio.run(main)
    assert sorted(closed) == [("10.0.0.1", "peer_cert_expired"), ("10.0.0.2", "max_age"),
                              ("10.0.0.2", "peer_untrusted"), ("10.0.0.3", "max_age"),
                              ("10.0.0.4", "policy_refused")]


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
    assert len(set(CLOSE_REASONS)) == 8


def test_every_reason_is_documented() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    identity = (root / "docs" / "identity.md").read_text()
    metrics = (root / "docs" / "metrics.md").read_text()
    for reason in CLOSE_REASONS:
        assert f"| `{reason}` |" in identity, reason
        assert f"`{reason}`" in metrics, reason


# -- found by a hostile review: what authorised a connection ends, the connection ends -------

class _Request:
    """Stands in for the listener's ``RequestContext`` (``Lifetimes`` never reads it)."""


def test_own_chain_expiry_streams_credentials_and_policy_events_retire() -> None:
    """The sweep ends a connection when the own chain it was made with expires
    (``own_cert_expired``, before a peer expiring later) or the credentials of its stream do
    (``credential_expired``); a policy change judges requests in flight (not idle ones), and
    a rule's ``expires_at`` is a policy change of its own."""
    closed: list[tuple[str, str]] = []
    allowed = {"yes": True}

    async def main() -> None:
        lt = Lifetimes(max_age=1e9, jitter=0, grace=2,
                       on_close=lambda c, r: closed.append((c.source, r)))
        events = iter([7_000.0, math.inf])
        lt.next_policy_event = lambda after: next(events)
        chain = PeerChain((b"leaf", b"root"), ())
        with lt.track("inbound", "inbound", "own", peer=PEER, chain=chain,
                      peer_not_after=9_000.0, own_not_after=5_000.0) as own, \
                lt.track("inbound", "inbound", "cred", peer=PEER, chain=chain) as cred, \
                lt.track("inbound", "inbound", "busy", peer=PEER, chain=chain) as busy, \
                lt.track("inbound", "inbound", "idle", peer=PEER, chain=chain) as idle:
            start = trio.current_time()
            assert own.peer_not_after == 5_000.0  # the earlier of the two chains
            # A bundle change keeps the own bound, whatever the peer's chain now allows.
            assert lt.recheck_trust(lambda peer, c: 8_000.0) == 0
            assert own.peer_not_after == 5_000.0
            cred.credentials_end = 4_000.0
            assert lt.sweep(start, 3_999.0) == 0
            assert lt.sweep(start, 4_000.0) == 1 and cred.retiring == "credential_expired"
            assert lt.sweep(start, 5_000.0) == 1 and own.retiring == "own_cert_expired"
            for conn in (busy, idle):
                conn.request = _Request()
                conn.allows = lambda request, now: allowed["yes"]
            idle.idle = trio.CancelScope()  # waiting for its next request: judged per request
            assert lt.policy_changed(6_000.0) == 0 and lt.policy_event_at == 7_000.0
            allowed["yes"] = False
            assert lt.policy_changed(7_000.0) == 1 and busy.retiring == "policy_refused"
            assert idle.retiring is None and lt.policy_event_at == math.inf

    trio.run(main)
    assert sorted(closed) == [("busy", "policy_refused"), ("cred", "credential_expired"),
                              ("own", "own_cert_expired")]


# Every event that ends a connection's trust or authorisation, as data: (the reason it cuts
# with, how to make it happen to ``conn`` on registry ``lt`` at wall time ``wall``).
def _peer_expiry(lt, conn, wall):
    conn.peer_not_after = wall - 1
    return lt.sweep(trio.current_time(), wall)


def _own_expiry(lt, conn, wall):
    conn.own_not_after = conn.peer_not_after = wall - 1
    return lt.sweep(trio.current_time(), wall)


def _credentials(lt, conn, wall):
    conn.credentials_end = wall - 1
    return lt.sweep(trio.current_time(), wall)


def _request_head(lt, conn, wall):
    conn.peer_not_after = wall - 1
    return int(conn.trust_ended(wall))


def _untrusted(lt, conn, wall):
    return lt.recheck_trust(lambda peer, chain: None)


def _stream_refused(lt, conn, wall):
    conn.recheck = lambda now: False
    return lt.recheck_policy(wall)


def _request_refused(lt, conn, wall):
    conn.idle, conn.request, conn.allows = None, object(), lambda request, now: False
    return lt.recheck_policy(wall)


def _blocked_peer(lt, conn, wall):
    from sidecar.alerts import source_key
    return lt.block("peer", source_key(PEER))


def _blocked_address(lt, conn, wall):
    from sidecar.alerts import source_key
    return lt.block("address", source_key("10.9.9.9"))


TRUST_ENDS = {
    "peer_cert_expired (sweep)": ("peer_cert_expired", _peer_expiry),
    "own_cert_expired (sweep)": ("own_cert_expired", _own_expiry),
    "credential_expired (sweep)": ("credential_expired", _credentials),
    "peer_cert_expired (next request head)": ("peer_cert_expired", _request_head),
    "peer_untrusted (bundle change)": ("peer_untrusted", _untrusted),
    "policy_refused (stream)": ("policy_refused", _stream_refused),
    "policy_refused (request in flight)": ("policy_refused", _request_refused),
    "source_blocked (peer)": ("source_blocked", _blocked_peer),
    "source_blocked (address)": ("source_blocked", _blocked_address),
}


@pytest.mark.parametrize("graceful", sorted(GRACEFUL_REASONS))
@pytest.mark.parametrize("event", sorted(TRUST_ENDS))
def test_a_graceful_close_still_ends_at_once_when_trust_ends(graceful: str, event: str) -> None:
    """A connection in its graceful close (its age, an own-certificate rotation) whose trust
    or authorisation then ends is cut at once -- no further request, what runs cancelled --
    and reported again with that reason; before, every later check passed it over for the
    whole ``connection_close_grace`` (found by a hostile review)."""
    reason, happen = TRUST_ENDS[event]
    closed: list[str] = []

    async def main() -> None:
        lt = Lifetimes(max_age=0, jitter=0, grace=30, on_close=lambda c, r: closed.append(r))
        chain = PeerChain((b"leaf", b"root"), (b"leaf",))
        with lt.track("inbound", "inbound", "10.9.9.9", peer=PEER, chain=chain) as conn:
            idle = conn.idle = trio.CancelScope()
            assert lt.retire(conn, graceful)
            now = trio.current_time()
            assert conn.serve_more and conn.scope.deadline > now + 20
            assert not lt.retire(conn, "max_age")  # graceful on graceful: nothing new
            happen(lt, conn, 1_000_000.0)
            assert conn.retiring == reason and not conn.serve_more
            assert conn.scope.deadline <= trio.current_time()
            assert idle.cancel_called or conn.idle is None  # (None: a request in flight)
            assert not lt.retire(conn, "peer_untrusted")  # cut once
            happen(lt, conn, 1_000_001.0)

    trio.run(main)
    assert closed == [graceful, reason]
