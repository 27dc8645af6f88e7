"""Outbound: the app talks plain HTTP (or TCP) to a local listener; the sidecar checks the
egress rules for its own identity, originates mTLS with the workload certificate, and refuses
the connection when the peer's SPIFFE ID is not the configured one.

Theory of operation: one ``OutboundProxy`` per configured upstream. Upstream mTLS connections
come from a keep-alive pool (a handshake costs milliseconds of CPU, many times a request), and
the peer's identity is checked once per connection, right after its handshake, against the
configured SPIFFE ID -- never against a hostname -- and against the trust-domain rule (its
chain must end at a root of that ID's trust domain). Egress is decided per request against
the current policy, before any connection is opened.

Lifetime: each pooled upstream connection carries ``UpstreamMeta``; the pool asks
``retire_reason`` before reusing or returning it, so a connection past its age, made with an
older own SVID, whose peer certificate expired or whose chain no longer verifies after a
bundle change is closed instead of used (a few comparisons per request; the chain is checked
again only once per bundle change). The app's connections to the listener, and TCP streams,
are registered with ``Lifetimes`` like inbound ones; a connection in use is bound to the
app-side connection its request or stream serves (``_acquired``), whose sweep then ends it
at its peer's expiry and at its age (``Lifetimes.sweep``).
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import trio

from sidecar.config.model import Limits, OutboundConfig
from sidecar.errors import BadGateway, RequestRefused, Unavailable
from sidecar.gate import Gate, Verdict
from sidecar.http.headers import NO_NAMES, connection_tokens
from sidecar.http.request import RequestHead, refuse_run_as
from sidecar.http.untrusted import HeaderFilter
from sidecar.http.wire import Headers, MessageReader, Request
from sidecar.identity.svid import SvidError, peer_identity_from_der
from sidecar.identity.trust import PeerChain
from sidecar.net.forward import Exchange, forward, splice
from sidecar.net.lifetime import (
    REASON_MAX_AGE,
    REASON_OWN_CERT_EXPIRED,
    REASON_OWN_CERT_ROTATED,
    REASON_PEER_CERT_EXPIRED,
    REASON_PEER_UNTRUSTED,
    Lifetimes,
    LiveConnection,
    age_deadline,
)
from sidecar.net.listen import ConnectionTracker, source_address
from sidecar.net.pool import UpstreamPool
from sidecar.net.session import new_request_id, request_loop
from sidecar.net.streams import Endpoint, cancelled, close_quietly
from sidecar.net.transport import SocketTransport, TlsTransport
from sidecar.policy.decision import Decision, RequestFacts, new_facts
from sidecar.telemetry import RequestContext, Telemetry
from sidecar.tlsstate import TlsState

# An outbound request while the own certificate is not valid yet (the clock stepped back
# behind its not-before after it was loaded: a set not valid yet is refused at load and at
# rotation): refused 503 like an expired one.
OWN_CERT_NOT_YET_VALID = "own_cert_not_yet_valid"


@dataclass
class UpstreamMeta:
    """What a pooled upstream connection was admitted with (see ``retire_reason``)."""

    peer: str
    chain: PeerChain
    peer_not_after: float  # the earlier of the peer's trust and own_not_after
    deadline: float  # trio clock: max age
    svid_generation: int
    trust_generation: int
    own_not_after: float = math.inf  # the own chain the handshake presented expires


# The app-side connection this task serves (set once per connection; see
# OutboundProxy._acquired); a ContextVar because the pool is called from inside forward().
_serving: contextvars.ContextVar[LiveConnection | None] = contextvars.ContextVar(
    "sidecar_outbound_serving", default=None)


class _HandshakeTimeout(Exception):
    """The upstream's handshake took longer than ``limits.handshake_timeout``."""


class _Upstream(TlsTransport):
    """An upstream mTLS connection with its admission facts."""

    __slots__ = ("meta",)
    meta: UpstreamMeta


class OutboundProxy:
    """A local plain listener for one upstream identity."""

    def __init__(self, cfg: OutboundConfig, *, port: int, tls: TlsState, gate: Gate,
                 telemetry: Telemetry, limits: Limits, tracker: ConnectionTracker,
                 header_filter: HeaderFilter | None = None,
                 lifetimes: Lifetimes | None = None) -> None:
        self.cfg = cfg
        # (not ``or``: an empty registry has len 0)
        self.lifetimes = lifetimes if lifetimes is not None else Lifetimes.for_limits(limits)
        self.header_filter = header_filter or HeaderFilter()
        self.port = port
        self.tls = tls
        self.gate = gate
        self.telemetry = telemetry
        self.limits = limits
        self.tracker = tracker
        self.pool = UpstreamPool(self.connect, size=limits.pool_size,
                                 idle_timeout=limits.pool_idle_timeout,
                                 max_head=limits.max_header_bytes * 2,
                                 retire=self._retire_pooled, on_acquire=self._acquired)

    async def connect(self) -> TlsTransport:
        """Open an mTLS connection to the upstream and check it is who we expect."""
        host, port = self.cfg.upstream
        started = time.time()
        if not self.tls.valid(started):
            # The own chain expired (no rotation came in time) or is not valid yet: no
            # upstream can accept it. Refused at once (503, as ``/readyz`` says), not dialled:
            # under TLS 1.3 the client's side of the handshake ends before the upstream
            # checks our certificate, so a dial "succeeded", the request was sent and then
            # cut by the upstream's alert or by the once-a-second sweep (a reset, or a 502).
            svid = self.tls.snapshot.svid
            raise Unavailable(REASON_OWN_CERT_EXPIRED if started >= svid.trust_ends
                              else OWN_CERT_NOT_YET_VALID)
        try:
            with trio.fail_after(self.limits.connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
                snap = self.tls.snapshot
                ctx = snap.client_tcp if self.cfg.protocol == "tcp" else snap.client
                stream = _Upstream(tcp.socket, ctx, server_side=False)
                try:
                    # ``limits.handshake_timeout`` bounds the handshake as inbound (within
                    # ``connect_timeout``; before the twenty-sixth session only that bound it,
                    # found by a hostile review).
                    with trio.move_on_after(self.limits.handshake_timeout) as handshake:
                        await stream.do_handshake()
                    if handshake.cancelled_caught:
                        raise _HandshakeTimeout
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
        except _HandshakeTimeout as exc:
            self.telemetry.connection_refused("outbound", f"{host}:{port}", None,
                                              "upstream_handshake_timeout", started)
            raise BadGateway("upstream_handshake_timeout") from exc
        except trio.TooSlowError as exc:
            self.telemetry.connection_refused("outbound", f"{host}:{port}", None,
                                              "upstream_connect_timeout", started)
            raise BadGateway("upstream_connect_timeout") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            reason = "upstream_handshake_failed" if isinstance(
                exc, trio.BrokenResourceError) else "upstream_connect_failed"
            self.telemetry.connection_refused("outbound", f"{host}:{port}", None, reason,
                                              started)
            raise BadGateway(reason, repr(exc)) from exc
        self.telemetry.handshake("outbound")
        try:
            der = stream.getpeercert(binary_form=True)
            peer = peer_identity_from_der(der) if der else None
        except SvidError as exc:
            # Not a valid SVID: the log line and audit record name the rule it breaks; the
            # request's answer stays the generic 502 of an upstream that is not the one
            # expected.
            self.telemetry.connection_refused("outbound", f"{host}:{port}", None,
                                              f"bad_svid:{exc.rule}", started)
            await trio.aclose_forcefully(stream)
            raise BadGateway("peer_identity_mismatch", str(exc)) from exc
        if peer is None or peer.spiffe_id != self.cfg.identity:
            got = peer.spiffe_id if peer is not None else None
            self.telemetry.connection_refused("outbound", f"{host}:{port}", got,
                                              "peer_identity_mismatch", started)
            await trio.aclose_forcefully(stream)
            raise BadGateway("peer_identity_mismatch", f"expected {self.cfg.identity}, got {got}")
        chain = PeerChain(*stream.peer_chain_der(der))
        try:
            trust_ends = self.tls.check_peer(peer.spiffe_id, chain, time.time())
        except SvidError as exc:
            self.telemetry.connection_refused("outbound", f"{host}:{port}", peer.spiffe_id,
                                              f"peer_untrusted:{exc.rule}", started)
            await trio.aclose_forcefully(stream)
            raise BadGateway("peer_untrusted", str(exc)) from exc
        limits = self.limits
        own_ends = snap.svid.trust_ends
        stream.meta = UpstreamMeta(
            peer.spiffe_id, chain, min(peer.not_after, trust_ends, own_ends),
            age_deadline(trio.current_time(), limits.max_connection_age,
                         limits.connection_age_jitter),
            snap.svid_generation, snap.trust.generation, own_ends)
        return stream

    def _acquired(self, ep: Endpoint) -> None:
        """The pool handed out ``ep`` for the request this task serves: the app-side
        connection carries it over that upstream connection (one attribute store), so the
        upstream's trust ending -- its chain or the own one expiring, a bundle change that
        no longer verifies it -- cuts the request in flight (``Lifetimes.sweep``,
        ``recheck_trust``), and its age (``meta.deadline``) retires the app-side connection
        gracefully (``max_age``: the pool ages only idle connections; since the
        thirty-first session). An upgrade request binds its stream to it for good. A
        connection a client keeps for itself (NTLM, Negotiate) is bound the same way each
        time ``reclaim`` hands it back."""
        conn = _serving.get()
        if conn is not None:
            meta: UpstreamMeta = ep.stream.meta  # type: ignore[attr-defined]
            conn.upstream = meta
            if conn.recheck is not None:  # (set by ``upgrade``: a stream from here on)
                conn.chain, conn.peer, conn.peer_not_after = meta.chain, meta.peer, \
                    meta.peer_not_after
                conn.own_not_after = meta.own_not_after

    def _retire_pooled(self, ep: Endpoint, now: float) -> bool:
        """True (and the closure recorded) when a pooled connection must not be used again;
        ``now`` is the run's clock as the pool read it."""
        meta: UpstreamMeta | None = getattr(ep.stream, "meta", None)
        if meta is None:
            return False
        reason = retire_reason(meta, self.tls, now, time.time())
        if reason is None:
            return False
        self.telemetry.connection_retired("outbound", self.cfg.name,
                                          "{}:{}".format(*self.cfg.upstream), meta.peer, reason)
        return True

    async def handle(self, tcp: trio.SocketStream) -> None:
        """One connection from the local app: TCP or HTTP to the upstream identity."""
        # The client's address as one form: an IPv4 client of a dual-stack ``[::]`` listener
        # is its IPv4 address, not ``::ffff:a.b.c.d`` (alert keys, refusal summaries, logs and
        # records name it as a ``0.0.0.0`` listener does; before the twenty-fourth session the
        # two forms were two sources), without a zone id.
        source = source_address(tcp.socket)
        if source is None:
            return
        self.telemetry.connection_opened("outbound")
        try:
            if self.cfg.protocol == "tcp":
                await self._tcp(tcp, source)
            else:
                # Written out here, and the session a coroutine built by a plain call: the
                # connection's task then holds three frames above its request loop's wait
                # (``_run_handler``, this, ``request_loop``), each resumed at every wait.
                # (``peer``: the identity every request of this listener goes to, whose
                # connection's end a ``connection_closed`` record names -- before, none)
                with self.lifetimes.track("outbound", self.cfg.name, source,
                                          peer=self.cfg.identity) as conn:
                    conn.allows = self._still_allows
                    _serving.set(conn)  # (this task's own context: one per connection)
                    with conn.scope:
                        await self._http_session(tcp, source, conn)
        finally:
            self.telemetry.connection_closed("outbound")

    def _still_allows(self, ctx: RequestContext, now: float) -> bool:
        """Would the policy in force still let the request in flight (``ctx``) out?"""
        return self.gate.egress(self.cfg.identity, now).allowed

    def _facts(self, source: str, method: str = "", path: str = "", host: str = "") -> RequestFacts:
        return RequestFacts(direction="outbound", peer=self.gate.own_id, source=source,
                            method=method, path=path, host=host, port=self.port,
                            listener=self.cfg.name, target=self.cfg.identity)

    async def _tcp(self, tcp: trio.SocketStream, source: str) -> None:
        with self.lifetimes.track("outbound", self.cfg.name, source,
                                  peer=self.cfg.identity) as conn:
            with conn.scope:
                await self._tcp_stream(tcp, source, conn)

    async def _tcp_stream(self, tcp: trio.SocketStream, source: str,
                          conn: LiveConnection) -> None:
        started = time.time()
        facts = self._facts(source)
        verdict = Verdict(self.gate.egress(self.cfg.identity, time.time()))
        record = RequestContext(new_request_id(), started, facts, verdict)
        if not verdict.decision.allowed:
            self.telemetry.request(record, 403)
            return
        if not self.telemetry.accepting():
            # fail_closed and the trail cannot record: refused like an HTTP request, nothing
            # dialled (found by a hostile review: a TCP stream never asked, and its record
            # was dropped unseen when the queue was full).
            self.telemetry.request(record, 503, error="audit_unavailable")
            return
        # Judged again from here on, the connect included: a reload that withdraws egress
        # while the upstream's handshake runs ends the stream before it starts (found by a
        # hostile review: it was not judged until the next change, so it ran on).
        conn.recheck = lambda now: self.gate.egress(self.cfg.identity, now).allowed
        try:
            upstream = await self.connect()
        except RequestRefused as exc:
            self.telemetry.request(record, exc.status, error=exc.reason)
            return
        except BaseException as exc:
            # Retired for a loss of trust while it connects: cut at once, and refused like
            # one found retired after the connect (its record is not lost with the cut).
            if cancelled(exc) and conn.retiring is not None:
                conn.recheck = None
                self.telemetry.request(record, 403, error=conn.retiring)
            raise
        meta: UpstreamMeta = upstream.meta  # type: ignore[attr-defined]
        # The stream's peer is the upstream sidecar: its chain and expiry now govern it.
        conn.chain, conn.peer_not_after = meta.chain, meta.peer_not_after
        conn.own_not_after = meta.own_not_after
        if conn.retiring is not None and not conn.serve_more:
            conn.recheck = None
            await close_quietly(upstream)
            self.telemetry.request(record, 403, error=conn.retiring)
            return
        if not self.telemetry.accepting():  # (again: the connect may take connect_timeout)
            conn.recheck = None
            await close_quietly(upstream)
            self.telemetry.request(record, 503, error="audit_unavailable")
            return
        self.telemetry.stream_opened(record, 200)
        try:
            done = await splice(tcp, b"", upstream, b"", self.limits.tcp_idle_timeout)
        except BaseException as exc:
            if cancelled(exc):  # (a nursery's group of them, too)
                self.telemetry.request(record, 200,
                                       error=f"connection_closed:{conn.retiring or 'shutdown'}")
            raise
        finally:
            conn.recheck = None
            await close_quietly(upstream)
        status, error = done.record()  # (a truncation: both sides were reset)
        self.telemetry.request(record, status, done.sent, done.received, error=error,
                               detail=done.broken)

    def _http_session(self, tcp: trio.SocketStream, source: str,
                      conn: LiveConnection) -> Coroutine[Any, Any, None]:
        """The request loop of one HTTP connection from the app, with its handler (built
        here; the caller awaits the loop)."""
        limits = self.limits
        # The local app's requests are parsed by the strict reader (sidecar.http.wire), as
        # everything else on the data path.
        client = Endpoint(SocketTransport(tcp.socket),
                          MessageReader(requests=True, max_head=limits.max_header_bytes),
                          side="client")

        gate, pool, tracker, header_filter = self.gate, self.pool, self.tracker, self.header_filter
        identity, port, listener = self.cfg.identity, self.port, self.cfg.name
        own_id = gate.own_id
        # The verdict of the last egress decision: a decision object is kept per policy
        # version (Gate.egress), and a Verdict without credentials is nothing more than it
        # (read only from here on), so consecutive requests share one.
        last: list[Verdict] = [Verdict(Decision("deny", "", "", ""))]
        # The connection's last request line (raw target) and the facts made from it: a
        # keep-alive client mostly repeats the same request (facts are read-only values).
        seen: tuple[bytes, RequestFacts] | None = None

        # Not a coroutine itself: it returns ``forward``'s (or ``upgrade``'s), which the
        # request loop awaits -- one coroutine less to create per request, and one frame less
        # to resume every time the exchange waits. A refusal raises from the call, inside the
        # loop's same ``try``.
        def handle(ctx: RequestContext, event: Request,
                   head: RequestHead) -> Coroutine[Any, Any, Exchange]:
            nonlocal seen
            if seen is not None and seen[0] == head.target and seen[1].method == head.method \
                    and seen[1].host == head.host:
                ctx.facts = seen[1]
            else:
                raw_path, _, raw_query = head.target.partition(b"?")
                if raw_query:  # (a run-as parameter: 400, as inbound)
                    refuse_run_as(raw_query.decode("ascii", "replace"), header_filter.run_as)
                path = raw_path.decode("ascii", "replace")
                ctx.facts = facts = new_facts(("outbound", own_id, source, head.method, path,
                                               head.host, port, listener, identity))
                seen = (head.target, facts)
            decision = gate.egress(identity, time.time())
            verdict = last[0]
            if verdict.decision is not decision:
                last[0] = verdict = Verdict(decision)
            ctx.verdict = verdict
            if decision.action != "allow":  # (Decision.allowed, without the call)
                raise verdict.refusal()
            if not self.telemetry.accepting():
                raise Unavailable("audit_unavailable")
            conn.request = ctx  # (a policy change judges it again: Lifetimes.recheck_policy)
            headers = header_filter.clean(
                event.headers, NO_NAMES,
                connection_tokens(event.headers) if head.connection else NO_NAMES)
            if head.upgrade is None:
                return forward(client, event, headers, pool, limits, head,
                               close=tracker.draining or conn.retiring is not None)
            return upgrade(ctx, event, headers, head)

        async def upgrade(ctx: RequestContext, event: Request, headers: Headers,
                          head: RequestHead) -> Exchange:
            # A stream from here on: policy reloads judge it, and the upstream's chain and
            # expiry (bound when the pool hands out the connection, ``_acquired``).
            conn.recheck = lambda now: gate.egress(identity, now).allowed
            try:
                return await forward(client, event, headers, pool, limits, head,
                                     close=tracker.draining or conn.retiring is not None,
                                     opened=lambda: self.telemetry.stream_opened(ctx, 101))
            finally:
                conn.recheck = None
                conn.chain, conn.peer_not_after = None, math.inf
                conn.own_not_after = math.inf

        return request_loop(client, tracker=self.tracker, limits=limits,
                            telemetry=self.telemetry, handle=handle, source=source, peer=None,
                            conn=conn)


def retire_reason(meta: UpstreamMeta, tls: TlsState, now: float, wall: float) -> str | None:
    """Why a pooled upstream connection must not be used again, or None.

    After a bundle change the chain is checked once against the new bundles; while it still
    verifies, ``meta.trust_generation`` moves on so it is not checked again.
    """
    if wall >= meta.peer_not_after:
        # (one comparison for both chains: peer_not_after is never later than own_not_after)
        return REASON_OWN_CERT_EXPIRED if wall >= meta.own_not_after \
            else REASON_PEER_CERT_EXPIRED
    snap = tls.snapshot
    if meta.trust_generation != snap.trust.generation:
        try:
            ends = snap.trust.check_peer(meta.peer, meta.chain, wall)
        except SvidError:
            return REASON_PEER_UNTRUSTED
        meta.trust_generation = snap.trust.generation
        meta.peer_not_after = min(ends, meta.own_not_after)
    if meta.svid_generation != snap.svid_generation:
        return REASON_OWN_CERT_ROTATED
    if now >= meta.deadline:
        return REASON_MAX_AGE
    return None
