"""Connections do not outlive the trust that admitted them.

Theory of operation
-------------------
A connection is authenticated once (the handshake, the SVID rules, the trust-domain rule)
and a TCP or upgraded stream is authorised once; keep-alive HTTP requests are authorised
one by one, but their peer was identified only at the start. ``Lifetimes`` is the registry
of open connections that lets later events end them:

=====================  ===========================================================  ==========
reason                 event                                                        how
=====================  ===========================================================  ==========
``max_age``            older than ``limits.max_connection_age`` (minus jitter);      graceful
                       outbound: also the pooled upstream connection a request or
                       stream in flight runs over
``own_cert_rotated``   a pooled upstream connection made with an older own SVID    graceful
``peer_cert_expired``  a certificate of the peer's chain expired (outbound: of the   immediate
                       upstream's a request in flight runs over)
``own_cert_expired``   a certificate of the own chain the connection was made       immediate
                       with expired (no rotation came in time)
``peer_untrusted``     a bundle changed and the peer's chain (outbound: the          immediate
                       upstream's of a request in flight) no longer verifies
``policy_refused``     the policy (a reload, or a rule's ``expires_at`` passing)     immediate
                       refuses a TCP or upgraded stream or a request in flight
``credential_expired`` the token or API key an upgraded stream was authorised      immediate
                       with expired; an introspected token's answer, asked for
                       again (``reauth``), is inactive or the call failed
``source_blocked``     an alert rule blocks the peer or its address                immediate
=====================  ===========================================================  ==========

*Graceful*: an HTTP connection serves the request in flight, or the next one, and its
response carries ``Connection: close``; an idle one is closed after
``limits.connection_close_grace``, and whatever is still running then (a TCP or upgraded
stream, a long response) is cancelled. *Immediate*: the trust or the authorisation the
connection ran on is gone (``CUT_AT_ONCE``), so nothing waits for a grace: no further
request is read, and whatever is running -- an idle wait, a request waiting for its
answer, a TCP or upgraded stream, a response, an upload -- is cancelled now (a reset once
bytes flowed; before the twenty-second session's review it ran on for
``connection_close_grace``, 10 s by default, after its peer's CA was removed or its
credentials ended).

Each connection task registers a ``LiveConnection`` (``track``) and runs inside its
``scope``; the session loop publishes its idle wait in ``idle``, and the listener the
request it is serving in ``request`` (one attribute store per request: a policy change
judges that request again with ``allows``, so a long download or upload from a peer the
policy no longer admits ends like a stream). Per request the loop only compares the
connection's ``peer_not_after`` with the time its head is complete (``trust_ended``: no
request is admitted between an expiry and the sweep that finds it). Otherwise time
limits are found by one sweep a second over the registry (a few comparisons per
connection; it also starts a stream's ``reauth`` when its ``reauth_at`` passes), trust and
policy are checked again only when a bundle or the policy changes (or when a rule's
``expires_at`` passes: ``policy_changed``, or a provider's key set loses a key), blocks when
an alert fires.
Every closure is reported once through ``on_close`` (metric
``sidecar_connections_closed_total``, an audit record and a log line).

Pooled upstream connections (outbound, sidecar to sidecar) are not tasks: the pool asks
``UpstreamMeta.retire_reason`` before reusing or returning one, and its sweep judges the
idle ones (``sidecar.outbound``). One in use is bound to the app-side connection whose
request or stream runs over it (``LiveConnection.upstream``), and this sweep judges it
there: its chain's expiry (cut at once) and its age (graceful: the app-side connection is
retired ``max_age``, so its answer says ``Connection: close`` and what still runs after
``connection_close_grace`` is cut, the upstream connection with it). Before the
thirty-first session the age of an upstream connection in use was never looked at: an
upgraded stream or a long download that took it just before its age kept the mTLS
connection up until the app-side connection's own age, about twice ``max_connection_age``
(found by a hostile review).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sidecar.identity.trust import PeerChain
from sidecar.net.streams import IdleBound

REASON_MAX_AGE = "max_age"
REASON_OWN_CERT_ROTATED = "own_cert_rotated"
REASON_PEER_CERT_EXPIRED = "peer_cert_expired"
REASON_OWN_CERT_EXPIRED = "own_cert_expired"
REASON_PEER_UNTRUSTED = "peer_untrusted"
REASON_POLICY_REFUSED = "policy_refused"
REASON_CREDENTIAL_EXPIRED = "credential_expired"
REASON_SOURCE_BLOCKED = "source_blocked"
# Retirements that are not a loss of trust: the connection's age, a rotation of the own
# certificate (the old one still valid). What runs gets ``connection_close_grace``.
GRACEFUL_REASONS = frozenset({REASON_MAX_AGE, REASON_OWN_CERT_ROTATED})
# Retirements that are a loss of trust (a certificate of either chain expired, a bundle no
# longer verifies the peer) or of the authorisation (the policy refuses the stream or request
# -- a revoked token, a removed API key or JWKS key, an expired break-glass rule --, its
# credentials expired or an introspection said inactive, an alert blocked the peer): what
# runs is cut at once. Every reason is one or the other (``test_every_reason_is_classified``).
CUT_AT_ONCE = frozenset({REASON_PEER_CERT_EXPIRED, REASON_OWN_CERT_EXPIRED,
                         REASON_PEER_UNTRUSTED, REASON_POLICY_REFUSED,
                         REASON_CREDENTIAL_EXPIRED, REASON_SOURCE_BLOCKED})
CLOSE_REASONS = (REASON_MAX_AGE, REASON_OWN_CERT_ROTATED, REASON_PEER_CERT_EXPIRED,
                 REASON_OWN_CERT_EXPIRED, REASON_PEER_UNTRUSTED, REASON_POLICY_REFUSED,
                 REASON_CREDENTIAL_EXPIRED, REASON_SOURCE_BLOCKED)

SWEEP_INTERVAL = 1.0


class LiveConnection:
    """One open client connection of a listener, as the lifetime rules see it.

    ``peer`` is the verified SPIFFE ID of the other sidecar (None for the local app on an
    outbound listener); ``chain`` is kept for checking it again after a bundle change;
    ``recheck(now)`` is set while a TCP or upgraded stream is in force and says whether the
    current policy still allows it; ``credentials_end`` (Unix time) is when the token or API
    key that stream was authorised with expires. ``own_not_after`` is when the own chain the
    connection was made with expires; ``peer_not_after`` is the earlier of it and the peer's
    (one comparison in the sweep finds both). ``request`` is the exchange being served (the
    listener's ``RequestContext``, set when it is allowed, None again once it ends: the
    request loop clears it) and ``allows(request, now)``
    whether the current policy would still allow it (set once per connection).
    ``upstream`` (outbound) is the admission of the pooled upstream connection the request
    in flight is carried over (``UpstreamMeta``: ``peer``, ``chain``, ``peer_not_after``,
    ``own_not_after``, ``deadline``; one attribute store when the pool hands it out): while
    a request is in flight its trust and its age are the connection's too. ``reauth`` (an
    upgraded stream authorised by an introspected token) asks the authorisation server again
    from ``reauth_at`` (Unix time) on, in a task of its own, and retires the stream when the
    answer no longer holds. ``renew(now)``, set while a request authorised with credentials
    is in flight, sets ``credentials_end`` and lowers ``reauth_at`` as the policy in force
    says, before a policy change judges that request (a stream's ``recheck`` does the same).
    """

    __slots__ = ("direction", "listener", "source", "peer", "chain", "peer_not_after",
                 "own_not_after", "credentials_end", "deadline", "opened", "scope", "idle",
                 "recheck", "request", "allows", "upstream", "reauth", "reauth_at",
                 "renew", "retiring", "cut_at", "_lifetimes")

    def __init__(self, direction: str, listener: str, source: str, peer: str | None,
                 chain: PeerChain | None, peer_not_after: float, deadline: float,
                 lifetimes: Lifetimes | None = None,
                 own_not_after: float = math.inf) -> None:
        self.direction = direction
        self.listener = listener
        self.source = source
        self.peer = peer
        self.chain = chain
        self.own_not_after = own_not_after
        self.peer_not_after = min(peer_not_after, own_not_after)
        self.credentials_end = math.inf
        self.request: Any = None
        self.allows: Callable[[Any, float], bool] | None = None
        self.upstream: Any = None
        self.reauth: Callable[[LiveConnection], Awaitable[None]] | None = None
        self.reauth_at = math.inf
        self.renew: Callable[[float], None] | None = None
        self.deadline = deadline  # trio clock
        self.opened = time.time()
        self.scope = trio.CancelScope()
        self.idle: IdleBound | None = None
        self.recheck: Callable[[float], bool] | None = None
        self.retiring: str | None = None
        self.cut_at = math.inf  # trio clock: when whatever still runs is cancelled
        self._lifetimes = lifetimes

    # The connection is its own registration (``Lifetimes.track``): a generator-based context
    # manager would add a generator and its wrapper to every open connection (~0.4 KB).
    def __enter__(self) -> LiveConnection:
        if self._lifetimes is not None:
            self._lifetimes._live.add(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._lifetimes is not None:
            self._lifetimes._live.discard(self)

    def trust_ended(self, wall: float) -> bool:
        """Has the trust this connection was admitted on ended by ``wall`` (Unix time): its
        peer's chain or the own one it was made with expired? If so it is retired now (as
        the sweep would at its next pass, up to ``SWEEP_INTERVAL`` later) and True: the
        request loop asks before it reads each request, so no request is admitted in the
        gap between a certificate's not-after time and the sweep that finds it."""
        if wall < self.peer_not_after:
            return False
        if self.retiring not in CUT_AT_ONCE and self._lifetimes is not None:
            self._lifetimes.retire(self, REASON_OWN_CERT_EXPIRED if wall >= self.own_not_after
                                   else REASON_PEER_CERT_EXPIRED)
        return True

    @property
    def serve_more(self) -> bool:
        """May another request be read? (not after an immediate retirement)"""
        return self.retiring is None or self.retiring in GRACEFUL_REASONS


def age_deadline(now: float, max_age: float, jitter: float) -> float:
    """When a connection opened at ``now`` is retired: never later than ``max_age``, spread
    over ``jitter`` so that connections opened together (after a rollout) do not all end
    together. ``max_age`` 0 means no limit."""
    if max_age <= 0:
        return math.inf
    return now + max_age - random.random() * jitter


class Lifetimes:
    """The registry of open connections and the events that end them."""

    def __init__(self, *, max_age: float, jitter: float, grace: float,
                 on_close: Callable[[LiveConnection, str], None]) -> None:
        self.max_age = max_age
        self.jitter = jitter
        self.grace = grace
        self.on_close = on_close
        self._live: set[LiveConnection] = set()
        # When the policy in force next changes by itself (a rule's ``expires_at``), Unix
        # time; ``next_policy_event(after)`` finds the one after (set by the sidecar).
        self.policy_event_at = math.inf
        self.next_policy_event: Callable[[float], float] = lambda after: math.inf
        self._nursery: trio.Nursery | None = None  # runs ``reauth`` tasks (set by ``run``)

    def __len__(self) -> int:
        return len(self._live)

    def deadline(self) -> float:
        """When a connection opened now reaches ``max_age`` (jittered), on Trio's clock."""
        return age_deadline(trio.current_time(), self.max_age, self.jitter)

    def track(self, direction: str, listener: str, source: str, *, peer: str | None = None,
              chain: PeerChain | None = None, peer_not_after: float = math.inf,
              own_not_after: float = math.inf) -> LiveConnection:
        """Register a connection for the ``with`` block (``with lifetimes.track(...) as
        conn``); run its work inside ``conn.scope``. ``own_not_after``: when the own chain
        the connection was authenticated with expires (inbound: the SVID of the handshake)."""
        return LiveConnection(direction, listener, source, peer, chain, peer_not_after,
                              self.deadline(), self, own_not_after)

    def retire(self, conn: LiveConnection, reason: str) -> bool:
        """End ``conn`` for ``reason`` (see the table above); False if it already ends so.

        A connection in its graceful close (``max_age``, ``own_cert_rotated``) whose trust or
        authorisation then ends is cut at once like any other, and reported again with that
        reason: before, a connection once retired for its age was passed over by every
        later check, so for up to ``connection_close_grace`` its peer's next request was
        served and its streams ran on after the peer's CA was withdrawn, its certificate
        expired or the policy refused it (found by a hostile review)."""
        current = conn.retiring
        if current is not None and (current in CUT_AT_ONCE or reason in GRACEFUL_REASONS):
            return False
        conn.retiring = reason
        now = trio.current_time()
        # (a loss of trust leaves no grace: what still runs is cut now, not in 10 s)
        conn.cut_at = now + self.grace if reason in GRACEFUL_REASONS else now
        conn.scope.deadline = min(conn.scope.deadline, conn.cut_at)
        idle = conn.idle
        if idle is not None:
            if reason in GRACEFUL_REASONS:
                idle.deadline = min(idle.deadline, conn.cut_at)
            else:
                idle.cancel()
        self.on_close(conn, reason)
        return True

    # -- events ----------------------------------------------------------------------------
    def sweep(self, now: float, wall: float) -> int:
        """Retire connections past their age (or the age of the upstream connection their
        request or stream in flight runs over), their peer's or their own certificate or the
        credentials of their stream; return how many.

        Every check that ends trust or authorisation (a certificate of either chain, the
        upstream's of a request in flight, the credentials, the re-introspection) comes
        before the age and is made for a connection in its graceful close too; the age only
        for one not retiring yet. Before the twenty-eighth session the upstream's expiry and
        ``reauth_at`` were looked at only after the age: once a connection was past its age
        they never were again, so its download ran on after the upstream's certificate
        expired and its stream after its token was revoked, for ``connection_close_grace``
        (found by a hostile review)."""
        n = 0
        for conn in list(self._live):
            retiring = conn.retiring
            if retiring in CUT_AT_ONCE:  # (a graceful close can still become one)
                continue
            up = conn.upstream
            if wall >= conn.peer_not_after:
                n += self.retire(conn, REASON_OWN_CERT_EXPIRED if wall >= conn.own_not_after
                                 else REASON_PEER_CERT_EXPIRED)
            elif wall >= conn.credentials_end:
                n += self.retire(conn, REASON_CREDENTIAL_EXPIRED)
            elif up is not None and conn.idle is None and wall >= up.peer_not_after:
                # A request in flight over an upstream connection whose peer's (or the own)
                # chain expired: cut like an inbound one.
                n += self.retire(conn, REASON_OWN_CERT_EXPIRED
                                 if wall >= up.own_not_after else REASON_PEER_CERT_EXPIRED)
            else:
                if wall >= conn.reauth_at:
                    self._reauthenticate(conn)
                if retiring is None and (now >= conn.deadline or (
                        up is not None and conn.idle is None and now >= up.deadline)):
                    # (its own age, or that of the upstream connection its request or
                    # stream in flight runs over, which the pool ages only while idle)
                    n += self.retire(conn, REASON_MAX_AGE)
        return n

    def _reauthenticate(self, conn: LiveConnection) -> None:
        """Start ``conn.reauth`` (one at a time per stream: ``reauth_at`` is inf until the
        task sets the next time)."""
        conn.reauth_at = math.inf
        reauth, nursery = conn.reauth, self._nursery
        if reauth is not None and nursery is not None:
            nursery.start_soon(reauth, conn)

    def recheck_trust(self, trusted: Callable[[str, PeerChain], float | None]) -> int:
        """After a bundle change: retire connections whose peer no longer verifies.

        ``trusted`` returns None for a peer that no longer verifies, else when its trust now
        ends (the earliest notAfter of the chain the new bundles accept), which becomes the
        connection's ``peer_not_after``."""
        n = 0
        for conn in list(self._live):
            if conn.retiring in CUT_AT_ONCE:  # (a graceful close can still become one)
                continue
            if conn.peer is not None and conn.chain is not None:
                ends = trusted(conn.peer, conn.chain)
                if ends is None:
                    n += self.retire(conn, REASON_PEER_UNTRUSTED)
                    continue
                conn.peer_not_after = min(ends, conn.own_not_after)
            up = conn.upstream
            if up is not None and conn.idle is None and conn.recheck is None:
                # (a request in flight over a pooled upstream connection; an upgraded stream
                # is bound to its upstream's chain above)
                ends = trusted(up.peer, up.chain)
                if ends is None:
                    n += self.retire(conn, REASON_PEER_UNTRUSTED)
                else:
                    up.peer_not_after = min(ends, up.own_not_after)
        return n

    def recheck_policy(self, now: float) -> int:
        """After a policy change: retire TCP and upgraded streams the policy in force
        refuses, and connections serving a request (not idle) it would refuse now."""
        n = 0
        for conn in list(self._live):
            if conn.retiring in CUT_AT_ONCE:  # (a graceful close can still become one)
                continue
            recheck = conn.recheck
            if recheck is not None:
                if not recheck(now):
                    n += self.retire(conn, REASON_POLICY_REFUSED)
            elif conn.idle is None and conn.request is not None and conn.allows is not None:
                ran_out = now >= conn.credentials_end  # (by themselves: not the change)
                renew = conn.renew
                if renew is not None:
                    # The end of its credentials and the next question about an introspected
                    # token as the policy in force gives them (found by a hostile review: a
                    # reload giving the API key an expires_at seconds ahead, shortening the
                    # provider's clock_skew or cache_ttl, left a long download running on to
                    # the old end while the same credentials were refused, and an upgraded
                    # stream with them cut).
                    renew(now)
                if ran_out:
                    n += self.retire(conn, REASON_CREDENTIAL_EXPIRED)
                elif now >= conn.credentials_end or not conn.allows(conn.request, now):
                    # (a reload that expired its API key's entry: the change ended it, as
                    # it ends a stream)
                    n += self.retire(conn, REASON_POLICY_REFUSED)
        return n

    def policy_changed(self, now: float) -> int:
        """The policy in force changed (``now``: Unix time): judge the streams and requests
        in flight again, and find when it next changes by itself."""
        n = self.recheck_policy(now)
        self.policy_event_at = self.next_policy_event(now)
        return n

    def block(self, by: str, source: str) -> int:
        """An alert blocks a peer (``by`` "peer") or an address: retire its inbound
        connections (alerts judge inbound callers only; a block by token subject or issuer
        is enforced per request)."""
        if by not in ("peer", "address"):
            return 0  # token subjects and issuers are per request, not per connection
        from sidecar.alerts import source_key

        n = 0
        for conn in list(self._live):
            if conn.retiring in CUT_AT_ONCE or conn.direction != "inbound":
                continue
            # ``source`` is as the detector keeps it: a long SPIFFE ID as ``sha256:<hex>``
            # (an ID over 128 characters was blocked per request while its running streams
            # were never matched and ran on -- found by the limits review).
            held = conn.peer if by == "peer" else conn.source
            if held and source_key(held) == source:
                n += self.retire(conn, REASON_SOURCE_BLOCKED)
        return n

    @classmethod
    def for_limits(cls, limits: Any,
                   on_close: Callable[[LiveConnection, str], None] | None = None) -> Lifetimes:
        """A registry with the age and grace of ``limits`` (a ``config.model.Limits``)."""
        return cls(max_age=limits.max_connection_age, jitter=limits.connection_age_jitter,
                   grace=limits.connection_close_grace,
                   on_close=on_close or (lambda conn, reason: None))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep the tracked connections every ``SWEEP_INTERVAL`` seconds (and run the
        re-authentications the sweep starts)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(SWEEP_INTERVAL)
                wall = time.time()
                self.sweep(trio.current_time(), wall)
                if wall >= self.policy_event_at:
                    self.policy_changed(wall)
