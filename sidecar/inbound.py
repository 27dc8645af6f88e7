"""Inbound: terminate mTLS, identify the peer once per connection, authorise every request,
forward the allowed ones to the app on localhost.

Theory of operation, per connection (one Trio task): TLS handshake under
``handshake_timeout`` -> ``PeerIdentity`` from the verified leaf certificate (a peer whose
leaf is not a valid X.509-SVID, or whose chain does not end at a root of the trust domain in
its SPIFFE ID, is refused here, once) -> registered with ``Lifetimes`` (max age, peer
certificate expiry, bundle changes, alert blocks and, for streams, policy reloads can end
it) -> request loop: read a head under
``idle_timeout`` / ``header_timeout`` -> validate the head and normalise the path (ambiguous
requests get 400 before any rule runs) -> ``Gate.inbound`` (JWT, policy, rate limits) ->
refused: generic reply with a request id, then the connection is closed (nothing pipelined
behind a refused request is ever read) -> allowed: rewrite identity headers and forward
over a pooled keep-alive connection, streaming bodies both ways.
"""

from __future__ import annotations

import errno
import math
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import unquote_to_bytes

import trio

from sidecar.authn.apikeys import API_KEY_HEADER
from sidecar.authn.extract import path_for_records
from sidecar.authn.oauth import Answers, x5t_from_hex
from sidecar.config.model import DEFAULT_APP_SOURCE_V4, Limits
from sidecar.errors import BadRequest, Forbidden, Unavailable
from sidecar.gate import ConnectionMemo, Gate, Verdict
from sidecar.http.body_override import BodyCheck, body_readers
from sidecar.http.headers import (
    NO_NAMES,
    REQUEST_ID,
    XFCC,
    connection_tokens,
    xfcc_value,
)
from sidecar.http.request import RequestHead, destination_of, method_overrides, refuse_run_as
from sidecar.http.untrusted import HeaderFilter
from sidecar.http.wire import Headers, MessageReader, Request
from sidecar.identity.svid import (
    RULE_CHAIN_TOO_LONG,
    RULE_EXPIRED,
    RULE_TRUST_DOMAIN_MISMATCH,
    RULE_TRUST_DOMAIN_NOT_FEDERATED,
    PeerIdentity,
    SvidError,
    peer_identity_from_der,
)
from sidecar.identity.trust import PeerChain
from sidecar.logs import log
from sidecar.net.forward import Exchange, forward, splice
from sidecar.net.lifetime import (
    CUT_AT_ONCE,
    REASON_CREDENTIAL_EXPIRED,
    REASON_PEER_CERT_EXPIRED,
    Lifetimes,
    LiveConnection,
)
from sidecar.net.listen import ConnectionTracker, HandshakeRate, source_address
from sidecar.net.pool import UpstreamPool
from sidecar.net.session import new_request_id, request_loop
from sidecar.net.streams import Endpoint, cancelled, close_quietly
from sidecar.net.transport import (
    HandshakeFragmented,
    PeerLeftBeforeAnswer,
    SocketTransport,
    TlsTransport,
    ack_now,
)
from sidecar.policy.decision import AuthFacts, RequestFacts, new_facts
from sidecar.policy.paths import normalise_request_both, query_routes, space_trimmed
from sidecar.policy.second import (
    Judge,
    judge_overrides,
    judge_readings,
    judge_rest,
    second_readings,
)
from sidecar.telemetry import TLS_CREDENTIAL_FAILURES, RequestContext, Telemetry
from sidecar.tlsstate import TlsState


async def open_app_stream(addr: tuple[str, int], source: str | None) -> trio.SocketStream:
    """A connection to the app at ``addr`` from ``source`` (``inbound.app_source_address``;
    None: the kernel's choice). Where the default source (``DEFAULT_APP_SOURCE_V4``) cannot be
    bound -- a host that routes only 127.0.0.1 to its loopback device, as macOS does -- the
    connection comes from the kernel's choice instead, said once in the log
    (``app_source_unavailable``); a configured address that cannot be bound fails the
    connection (a 502, ``upstream_connect_failed``)."""
    global _default_source_unavailable
    if source is None or (source == DEFAULT_APP_SOURCE_V4 and _default_source_unavailable):
        return await trio.open_tcp_stream(*addr)
    try:
        return await trio.open_tcp_stream(*addr, local_address=source)
    except OSError as exc:
        if source != DEFAULT_APP_SOURCE_V4 or exc.errno != errno.EADDRNOTAVAIL:
            raise
    _default_source_unavailable = True
    log("app_source_unavailable", "warning", source=source,
        error="cannot bind; connections to the app come from the kernel's choice")
    return await trio.open_tcp_stream(*addr)


_default_source_unavailable = False


class InboundProxy:
    """The mTLS listener's connection handler."""

    def __init__(self, *, port: int, tls: TlsState, gate: Gate, telemetry: Telemetry,
                 app_pool: UpstreamPool, app_addr: tuple[str, int], limits: Limits, protocol: str,
                 tracker: ConnectionTracker, header_filter: HeaderFilter | None = None,
                 lifetimes: Lifetimes | None = None, app_source: str | None = None) -> None:
        self.port = port
        self.app_source = app_source  # (``inbound.app_source_address``: ``open_app_stream``)
        # (not ``or``: an empty registry has len 0)
        self.lifetimes = lifetimes if lifetimes is not None else Lifetimes.for_limits(limits)
        self.header_filter = header_filter or HeaderFilter()
        self.tls = tls
        self.gate = gate
        self.telemetry = telemetry
        self.pool = app_pool
        self.app_addr = app_addr
        self.limits = limits
        self.protocol = protocol
        self.tracker = tracker
        # Connections in their handshake may be closed to make room on a full listener
        # (``sidecar.net.listen``); each one is ``established()`` once its peer is accepted.
        tracker.handshakes = True
        # Each new connection costs a server handshake: at most
        # ``limits.handshakes_per_source_per_second`` of them per source, checked at accept
        # before any TLS byte (``sidecar.net.listen.HandshakeRate``); 0: no rate.
        if limits.handshakes_per_source_per_second > 0:
            rate = HandshakeRate(limits.handshakes_per_source_per_second,
                                 limits.handshake_burst_per_source)
            rate.on_refused = self._rate_refused
            tracker.handshake_rate = rate

    async def handle(self, tcp: trio.SocketStream) -> None:
        """One accepted connection: TLS handshake (bounded), peer identity check, then TCP
        or HTTP."""
        # The client's address as one form: an IPv4 client of a dual-stack ``[::]`` listener
        # is its IPv4 address, not ``::ffff:a.b.c.d`` (alert keys, refusal summaries, logs and
        # records name it as a ``0.0.0.0`` listener does; before the twenty-fourth session the
        # two forms were two sources), without a zone id.
        source = source_address(tcp.socket)
        if source is None:
            return
        started = time.time()
        if self._blocked(None, source):
            # An address an alert rule blocks (``by: address``) is refused at accept, before
            # any TLS byte: the block otherwise showed only as a 403 on a request, which the
            # callers whose failed handshakes set it never send -- each new connection still
            # cost a whole handshake (1.7 ms of CPU here; 1,217 in 4 s from one blocked
            # client, found by a hostile review, thirty-first session).
            self.telemetry.connection_blocked("inbound", source, started)
            return
        snap = self.tls.snapshot  # (the context and the own chain the handshake uses)
        ctx = snap.server_tcp if self.protocol == "tcp" else snap.server
        made: TlsTransport | None = None  # (for the failure's label)
        # (A connection closed to make room on a full listener, ``handshake_evicted``, is
        # the sidecar's choice, not the client's: it is never counted for its source, even
        # after its hello was answered -- counted, an honest peer's own burst of handshakes
        # on a busy listener got its address blocked; found by the review of that change.)
        with trio.move_on_after(self.limits.handshake_timeout) as scope:
            try:
                tls_stream = made = TlsTransport(tcp.socket, ctx, server_side=True)
                await tls_stream.do_handshake(skip_if_gone=True)
                ack_now(tcp.socket)  # (a Nagle client's first request is not held 40 ms)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.telemetry.connection_refused("inbound", source, None,
                                                  failed_handshake_reason(exc, made),
                                                  started)
                return
        if scope.cancelled_caught:
            # (silent after the sidecar's answer, until the timeout: abandoned too)
            self.telemetry.connection_refused(
                "inbound", source, None, HANDSHAKE_ABANDONED
                if made is not None and _answered_hello(made) else "handshake_timeout",
                started)
            return
        self.telemetry.handshake("inbound")
        peer = None
        trust_ends = math.inf
        try:
            der = tls_stream.getpeercert(binary_form=True)
            peer = peer_identity_from_der(der) if der else None
            if peer is not None:
                chain = PeerChain(*tls_stream.peer_chain_der(der))
                trust_ends = self.tls.check_peer(peer.spiffe_id, chain, time.time())
        except SvidError as exc:
            self.telemetry.connection_refused(
                "inbound", source, peer.spiffe_id if peer is not None else None,
                refusal_reason(exc), started)
            await close_quietly(tls_stream)
            return
        if peer is None:
            self.telemetry.connection_refused("inbound", source, None, "no_client_cert", started)
            await close_quietly(tls_stream)
            return
        self.tracker.established()  # (never closed to make room from now on)
        self.telemetry.connection_opened("inbound")
        try:
            with self.lifetimes.track("inbound", "inbound", source, peer=peer.spiffe_id,
                                      chain=chain,
                                      peer_not_after=min(peer.not_after, trust_ends),
                                      own_not_after=snap.svid.trust_ends) as conn:
                conn.allows = self._still_allows
                with conn.scope:
                    if self.protocol == "tcp":
                        await self._tcp(tls_stream, peer, source, started, conn)
                    else:
                        # A coroutine built by a plain call: the connection's task holds
                        # three frames above its request loop's wait (``_run_handler``,
                        # this, ``request_loop``), each resumed at every wait.
                        await self._http_session(tls_stream, peer, source, conn)
        finally:
            self.telemetry.connection_closed("inbound")
            await close_quietly(tls_stream)

    def _rate_refused(self, source: str) -> None:
        """A connection from ``source`` closed at accept past its handshake rate
        (``HandshakeRate``): its log line and audit record, thinned (the metric is the
        listener's ``sidecar_connections_refused_total``)."""
        self.telemetry.connection_rate_limited("inbound", source, time.time())

    def _blocked(self, peer: str | None, source: str) -> bool:
        """Whether an alert rule blocks this connection's address (or, given, its peer) now
        (``BurstDetector.blocked`` on the gate's clock: a dictionary test when nothing is
        blocked). A blocked peer's requests are refused 403 by the gate (a peer has paid
        for its handshake; its open connections are cut by the block itself)."""
        gate = self.gate
        detector = gate.detector
        return detector is not None and detector.blocked(
            peer, source, time.time() if gate.clock is None else gate.clock())

    def _still_allows(self, ctx: RequestContext, now: float) -> bool:
        """Would the policy in force still allow the request in flight (``ctx``, allowed
        when it began)? Its credentials were checked then; only the rules judge again --
        also everything else it was judged on (``_judged_again``)."""
        verdict = ctx.verdict
        facts = ctx.facts
        if facts is None or verdict is None:
            return True
        gate = self.gate
        auth = gate.auth_now(verdict.auth, ctx.reread, facts.path, now)  # (read once)
        if not gate.still_allows(facts, verdict.auth, now, credentials=False, judged=auth):
            return False
        return _judged_again(gate, ctx, facts, auth, now)

    async def _tcp(self, tls_stream: TlsTransport, peer: PeerIdentity, source: str, started: float,
                   conn: LiveConnection) -> None:
        facts = RequestFacts(direction="inbound", peer=peer.spiffe_id, source=source,
                             method="", path="", host="", port=self.port, listener="inbound")
        verdict = self.gate.inbound(facts, [], "", time.time(), tcp=True)
        record = RequestContext(new_request_id(), started, facts, verdict)
        if not verdict.decision.allowed:
            self.telemetry.request(record, verdict.status)
            return
        if not self.telemetry.accepting():
            # fail_closed and the trail cannot record: refused like an HTTP request (503 in
            # its record; the connection closed). Before, a TCP stream never asked, was
            # served and its record dropped unseen when the queue was full (found by a
            # hostile review).
            self.telemetry.request(record, 503, error="audit_unavailable")
            return
        # The stream's start is its one admitted request: not after the trust the connection
        # was admitted on ended (a certificate of the peer's chain or of the own one the
        # handshake presented expired), asked here as the HTTP loop asks before each request,
        # and again once the app is connected. Before the thirty-first session a stream
        # opened after the own certificate expired reached the app until the once-a-second
        # sweep found it (a client that does not check the server's certificate got a
        # stream on every reconnect; found by a hostile review).
        if conn.trust_ended(time.time()):
            self.telemetry.request(record, 403, error=conn.retiring)
            return
        # Judged again from here on, the app's connect included: a reload that refuses the
        # stream while it connects ends it before it starts (found by a hostile review).
        conn.recheck = lambda now: self.gate.still_allows(facts, None, now)
        try:
            with trio.fail_after(self.limits.connect_timeout):
                app = SocketTransport((await open_app_stream(self.app_addr,
                                                             self.app_source)).socket)
        except (OSError, trio.TooSlowError):
            conn.recheck = None
            self.telemetry.request(record, 502, error="upstream_connect_failed")
            return
        except BaseException as exc:
            # Retired for a loss of trust while it connects: cut at once, and refused like
            # one found retired after the connect (its record is not lost with the cut).
            if cancelled(exc) and conn.retiring is not None:
                conn.recheck = None
                self.telemetry.request(record, 403, error=conn.retiring)
            raise
        if conn.trust_ended(time.time()) or (conn.retiring is not None
                                             and not conn.serve_more):
            conn.recheck = None
            self.telemetry.request(record, 403, error=conn.retiring)
            await close_quietly(app)
            return
        if not self.telemetry.accepting():  # (again: the connect may take connect_timeout)
            conn.recheck = None
            await close_quietly(app)
            self.telemetry.request(record, 503, error="audit_unavailable")
            return
        self.telemetry.stream_opened(record, 200)
        try:
            done = await splice(tls_stream, b"", app, b"", self.limits.tcp_idle_timeout)
        except BaseException as exc:
            if cancelled(exc):  # (a nursery's group of them, too)
                self.telemetry.request(record, 200,
                                       error=f"connection_closed:{conn.retiring or 'shutdown'}")
            raise
        finally:
            conn.recheck = None
            await close_quietly(app)
        status, error = done.record()  # (a truncation: both sides were reset)
        self.telemetry.request(record, status, done.sent, done.received, error=error,
                               detail=done.broken)

    def _http_session(self, tls_stream: TlsTransport, peer: PeerIdentity, source: str,
                      conn: LiveConnection) -> Coroutine[Any, Any, None]:
        """The request loop of one HTTP connection from a peer, with its handler (built
        here; the caller awaits the loop)."""
        limits = self.limits
        client = Endpoint(tls_stream, MessageReader(requests=True, max_head=limits.max_header_bytes),
                          side="client")
        gate, pool, tracker, header_filter = self.gate, self.pool, self.tracker, self.header_filter
        peer_id, port = peer.spiffe_id, self.port
        # Fixed per connection: what every request adds for the app besides its request id
        # (the verified caller in Envoy's XFCC format, the scheme), and the RFC 8705
        # thumbprint of the caller's certificate (bound tokens).
        xfcc = (XFCC, xfcc_value(gate.own_id, peer_id, peer.fingerprint))
        proto = (b"x-forwarded-proto", b"https")
        peer_x5t = x5t_from_hex(peer.fingerprint)
        # The connection's last verified credentials and decision (sidecar/gate.py), made
        # by its first request (an idle connection holds none).
        memo: ConnectionMemo | None = None
        # The connection's last request as handled: its raw target, whether non-ASCII paths
        # were allowed, its facts, its query and the target the app got. A keep-alive
        # client mostly repeats the same request: normalised and built once.
        last: tuple[bytes, bool, RequestFacts, str, bytes] | None = None

        # Not a coroutine itself (unless a rule needs token introspection first): it returns
        # ``forward``'s, which the request loop awaits -- one coroutine less to create per
        # request, and one frame less to resume every time the exchange waits. A refusal
        # raises from the call, inside the loop's same ``try``.
        def handle(ctx: RequestContext, event: Request,
                   head: RequestHead) -> Coroutine[Any, Any, Exchange]:
            nonlocal last
            non_ascii = gate.allows_non_ascii_paths()
            if last is not None and last[0] == head.target and last[1] is non_ascii \
                    and last[2].method == head.method and last[2].host == head.host:
                facts, query, target = last[2], last[3], last[4]
                path = facts.path
            else:
                path, forward, query = normalise_request_both(head.target,
                                                              allow_non_ascii=non_ascii)
                if query:  # (a run-as parameter: 400 before anything else reads it)
                    refuse_run_as(query, header_filter.run_as)
                facts = new_facts(("inbound", peer_id, source, head.method, path, head.host,
                                   port, "inbound", None))
                # The app gets the target the policy matched, as the client spelled its
                # reserved characters (``normalise_both``: both decode to one path), and the
                # checked query.
                target = forward.encode("ascii") + (b"?" + query.encode("ascii") if query
                                                    else b"")
                last = (head.target, non_ascii, facts, query, target)
            ctx.facts = facts
            if gate.needs_prepare():  # token introspection (I/O) for this request's rules
                return prepared(ctx, event, head, facts, path, query, target)
            return decided(ctx, event, head, facts, path, query, target)

        async def prepared(ctx: RequestContext, event: Request, head: RequestHead,
                           facts: RequestFacts, path: str, query: str,
                           target: bytes) -> Exchange:
            answers = await gate.prepare(facts, event.headers, query)
            # The answer may come after the connection's trust ended (a certificate of its
            # chain expired, a bundle change no longer trusts it, an alert blocked it): then
            # the request is decided after it and is refused, not forwarded within the
            # grace the retirement leaves (found by a hostile review).
            if conn.retiring is not None and not conn.serve_more \
                    or conn.trust_ended(time.time()):
                raise Forbidden(conn.retiring or REASON_PEER_CERT_EXPIRED)
            return await decided(ctx, event, head, facts, path, query, target, answers)

        def decided(ctx: RequestContext, event: Request, head: RequestHead,
                    facts: RequestFacts, path: str, query: str,
                    target: bytes, answers: Answers | None = None,
                    ) -> Coroutine[Any, Any, Exchange]:
            nonlocal memo
            if memo is None:
                memo = ConnectionMemo()
            ctx.verdict = verdict = gate.inbound(facts, event.headers, query, time.time(),
                                                 peer_x5t=peer_x5t, memo=memo,
                                                 introspected=answers)
            if verdict.decision.action != "allow":  # (Decision.allowed, without the call)
                _unjudged(gate, ctx, event, head, facts, query, _REFUSED_BY_REQUEST)
                raise verdict.refusal()
            destination = None
            if head.destination:  # (WebDAV COPY / MOVE: the path it writes to is judged too)
                destination, refused = _destination(gate, event.headers, facts, verdict, ctx)
                if refused is not None:
                    _refuse_or_observe(gate, ctx, event, head, facts, query, refused,
                                       _REFUSED_BY_DESTINATION)
            # The paths the app may route this request as besides its own (a query route,
            # CodeIgniter's trimmed path): judged as a second path, as a Destination is.
            # A constant check for an ordinary request (``_second_paths``).
            second: Sequence[tuple[str, bool]] = ()
            if query or space_trimmed(path) is not None:
                second = _second_readings(gate, facts, ctx, query)
                ctx.second = tuple(second)  # (judged again by a policy change)
                refused = _second_paths(gate, facts, verdict, second) if second else None
                if refused is not None:
                    _refuse_or_observe(gate, ctx, event, head, facts, query, refused,
                                       _REFUSED_BY_ROUTE)
            if query:  # (a method-override parameter: the method the app may run instead)
                named = method_overrides(query)
                if named:  # (recorded: policy replay judges them as this does)
                    _note_overrides(ctx, named)
                refused = _overridden(gate, facts, verdict, named, second)
                if refused is not None:
                    _refuse_or_observe(gate, ctx, event, head, facts, query, refused,
                                       _REFUSED_BY_QUERY)
                ctx.overrides = named  # (judged again by a policy change: _still_allows)
            # A POST form's override fields: read as the body goes, judged at its end.
            check = _body_check(gate, facts, verdict, ctx, event.headers, second) \
                if head.has_body and event.method == b"POST" else None
            if not self.telemetry.accepting():
                if check is not None:  # (its body is never read: the record says so)
                    _note_unread(ctx, ["body"])
                raise Unavailable("audit_unavailable")
            conn.request = ctx  # (a policy change judges it again: Lifetimes.recheck_policy)
            if gate.authenticator is not None:  # (its credentials read again then: auth_now)
                ctx.reread = (event.headers, query, peer_x5t,
                              gate.authenticator.introspection_providers)
            # (strip_credentials is set only with an authenticator)
            strip = gate.authenticator if verdict.strip_credentials else None
            # One pass: the catalogue, the claim headers the sidecar sets, Connection-listed
            # names and (when credentials are stripped) the caller's API key header.
            headers = header_filter.clean(
                event.headers, verdict.drop_headers,
                connection_tokens(event.headers) if head.connection else NO_NAMES,
                API_KEY_ONLY if strip is not None else NO_NAMES)
            # Tokens that are not forwarded; with underscores kept, also other spellings of
            # a forwarded token header (``Authenticator.strip_credentials``).
            if strip is not None and (strip.strips_tokens or (
                    strip.reads_token_headers and header_filter.allow_underscores)):
                headers, kept = strip.strip_credentials(headers, query)
                if kept != query:  # (a token in the query string, removed)
                    target = path.encode("ascii") + (b"?" + kept.encode("ascii") if kept
                                                     else b"")
            if target != event.target:
                event = Request(event.method, target, event.headers, event.version)
            if destination is not None:  # the app gets the Destination the policy judged
                headers = [(n, destination if n == DESTINATION else v) for n, v in headers]
            headers.append(xfcc)
            headers.append((REQUEST_ID, ctx.request_id.encode()))
            headers.append(proto)
            if verdict.set_headers:
                headers.extend(verdict.set_headers)
            if head.upgrade is not None:
                return upgrade(ctx, event, headers, head, facts, verdict.auth, query, check)
            auth = verdict.auth
            if auth is not None and (auth.claims or auth.apikey is not None):
                # A request in flight (a long download, server-sent events) ends when the
                # credentials it was authorised with expire, like a stream; the request loop
                # sets this back to inf when the exchange ends.
                key = api_key_of(event.headers) if auth.apikey else None
                conn.credentials_end = gate.credentials_end(auth, key)
                tokens: dict[str, str] = {}
                if auth.claims and gate.introspector is not None:
                    # ... and an introspected token is asked about again when its cached
                    # answer runs out, as a stream's (found by a hostile review: revoked at
                    # the authorisation server, the request ran on to its end).
                    tokens = gate.stream_tokens(auth, event.headers, query)
                    watch(facts, auth, key, tokens, event.headers, query)
                # ... both as the policy in force says when it changes (``renewer``).
                conn.renew = renewer(auth, key, tokens)
            return forward(client, event, headers, pool, limits, head,
                           close=tracker.draining or conn.retiring is not None,
                           body_check=check)

        def renewer(auth: AuthFacts | None, key: bytes | None,
                    tokens: dict[str, str]) -> Callable[[float], None]:
            """What a policy change does first to a stream or request in flight authorised
            with ``auth``: the end of its credentials as the policy in force gives it (a
            reload may give the API key an earlier ``expires_at`` or the provider a shorter
            ``clock_skew``), and, for an introspected token, the next question no later than
            its answer's new ``cache_ttl`` (a reload that changed the provider dropped its
            cached answers: asked at the next sweep, not when the old answer would have run
            out)."""

            def renew(now: float) -> None:
                conn.credentials_end = gate.credentials_end(auth, key)
                if conn.reauth is not None:
                    conn.reauth_at = min(conn.reauth_at, gate.reintrospect_at(tokens, now))

            return renew

        def watch(facts: RequestFacts, auth: AuthFacts | None, key: bytes | None,
                  tokens: dict[str, str], headers: Headers, query: str) -> None:
            """Have the sweep ask the authorisation server again about the introspected
            ``tokens`` of the stream or request in flight when their cached answers run
            out (``reauth``), and retire the connection when an answer no longer holds or
            the call fails (fail closed). Nothing when none of them is introspected."""
            if not tokens:
                return
            now = time.time()
            at = gate.reintrospect_at(tokens, now)
            if at == math.inf:
                return

            async def reauth(live: LiveConnection) -> None:
                try:
                    await gate.reintrospect(tokens, headers, query)
                    now = time.time()
                    # Ended meanwhile, or cut. A graceful close (``max_age``) is asked about
                    # still: it may run for ``connection_close_grace``, and before the
                    # twenty-eighth session a stream past its age was never asked again, so
                    # its revoked token's stream ran on to the grace's end (found by a
                    # hostile review).
                    # Only while this task's own request or stream is the one in force: a
                    # late answer about a finished request's token neither retires the
                    # connection's next request nor moves its schedule (found by a hostile
                    # review, thirty-seventh session).
                    if live.reauth is not reauth or live.retiring in CUT_AT_ONCE:
                        return
                    asked = (gate.authenticator.introspection_providers
                             if gate.authenticator is not None else frozenset())
                    if gate.still_allows(facts, auth, now, api_key=key, tokens=tokens,
                                         reread=(headers, query, peer_x5t, asked)):
                        # (not before a second from now: the sweep's pace)
                        live.reauth_at = max(gate.reintrospect_at(tokens, now), now + 1.0)
                        return
                except Exception as exc:  # noqa: BLE001 -- fail closed, never a crash
                    log("stream_reauth_failed", "error", error=repr(exc))
                if live.reauth is reauth:  # (not a later request's: see above)
                    self.lifetimes.retire(live, REASON_CREDENTIAL_EXPIRED)

            conn.reauth_at = max(at, now + 1.0)
            conn.reauth = reauth

        async def upgrade(ctx: RequestContext, event: Request, headers: Headers,
                          head: RequestHead, facts: RequestFacts, auth: AuthFacts | None,
                          query: str, check: BodyCheck | None) -> Exchange:
            # A stream from here on: policy changes judge it, with the credentials it was
            # authorised with, which must still hold; it ends when they expire (as the
            # policy in force says: a reload may give an API key an earlier expires_at).
            # Its tokens are kept: a key removed from the provider's JWKS ends it
            # (``Authenticator.on_keys_removed``), and an introspected one is asked about
            # again when its cached answer runs out (``reauth``, from the sweep).
            key = api_key_of(event.headers) if auth is not None and auth.apikey else None
            tokens = gate.stream_tokens(auth, event.headers, query)

            renew = renewer(auth, key, tokens)

            def recheck(now: float) -> bool:
                renew(now)
                current = gate.auth_now(auth, ctx.reread, facts.path, now)  # (read once)
                if not gate.still_allows(facts, auth, now, api_key=key, tokens=tokens,
                                         judged=current):
                    return False
                # The rest of what it was judged on too, as for a request
                # (``_judged_again``): an app that declines the upgrade runs the request as
                # one (found by a hostile review: a reload denying DELETE left
                # ``GET ?_method=DELETE`` with Upgrade headers running).
                return ctx.verdict is None or _judged_again(gate, ctx, facts, current, now)

            conn.recheck = recheck
            conn.credentials_end = gate.credentials_end(auth, key)
            watch(facts, auth, key, tokens, event.headers, query)
            try:
                # (with the body's override check: an upgrade request with a body is a
                # request to an app that declines the upgrade; found by a hostile review,
                # Upgrade headers let a form's _method=DELETE past a rule denying DELETE)
                return await forward(client, event, headers, pool, limits, head,
                                     close=tracker.draining or conn.retiring is not None,
                                     opened=lambda: self.telemetry.stream_opened(ctx, 101),
                                     body_check=check)
            finally:
                conn.recheck = conn.reauth = None
                conn.credentials_end = conn.reauth_at = math.inf

        return request_loop(client, tracker=tracker, limits=limits, telemetry=self.telemetry,
                            handle=handle, source=source, peer=peer_id, conn=conn)


API_KEY_ONLY = frozenset({API_KEY_HEADER})  # removed with the credentials, in every spelling


DESTINATION = b"destination"


def _destination(gate: Gate, headers: Headers, facts: RequestFacts,
                 verdict: Verdict, ctx: RequestContext) -> tuple[bytes, Verdict | None]:
    """A WebDAV request's ``Destination`` (RFC 4918 10.3: where a COPY or MOVE writes), as
    the app is to get it -- its normalised path and query -- and the refusal when the
    policy would not let the same caller, with the same credentials and method, at that
    path (and host) itself. Found by a hostile review: ``COPY /public/x`` with
    ``Destination: /admin/config`` wrote where ``GET /admin/config`` is denied. A
    Destination that is no http(s) URI or absolute path, or whose path is ambiguous, is
    400 (``bad_destination``); check_head has refused a second one. The path judged goes
    into the request's record (``ctx.judged``: ``policy replay`` judges it too). A deny
    that dry-run lets through (``_observed``) is returned too, as an allowed verdict: the
    caller records it, and lets the request through."""
    path, forward, prefix, query = _read_destination(gate, headers, facts)
    _note(ctx, "destination", path)
    ctx.destination = path  # (judged again by a policy change: _judged_again)
    decision = gate.judge(facts._replace(path=path), verdict.auth, time.time())
    target = prefix + forward.encode("ascii") + (b"?" + query.encode("ascii") if query
                                                  else b"")
    return target, Verdict(decision, auth=verdict.auth) \
        if not decision.allowed or decision.dry_run else None


def _read_destination(gate: Gate, headers: Headers,
                      facts: RequestFacts) -> tuple[str, str, bytes, str]:
    """The request's ``Destination`` read (not judged): its normalised path, its path as
    forwarded, its ``scheme://authority`` prefix and its query; ``BadRequest``
    (``bad_destination``) as ``_destination`` says (``request.destination_of``)."""
    value = next(v for n, v in headers if n == DESTINATION)
    prefix, path, forward, query = destination_of(
        value, facts.host, allow_non_ascii=gate.allows_non_ascii_paths())
    return path, forward, prefix, query


def _second_readings(gate: Gate, facts: RequestFacts, ctx: RequestContext,
                     query: str) -> list[tuple[str, bool]]:
    """The paths the app may route the request as besides its own, each with whether every
    rule judges it (else deny rules only): a route its query gives on ``/`` or a front
    controller (``paths.query_routes``: ``/?/admin/users`` is admin/users to CodeIgniter;
    judged by every rule or, for a parameter that is ordinary on a home page such as ``q``,
    by deny rules only), and the path and each route with spaces and ``+`` trimmed from
    their ends (``paths.space_trimmed``: ``/+admin/users`` is admin/users to CodeIgniter 4;
    deny rules only). Found by a hostile review (session 29). A raw route that would be
    refused as a path is 400 (``bad_query_route``). The routes go into the request's record
    (``_note_routes``; ``policy replay`` judges them, and the trimmed paths, too)."""
    routes = query_routes(facts.path, query, allow_non_ascii=gate.allows_non_ascii_paths())
    if routes:
        _note_routes(ctx, routes)
    return second_readings(facts.path, routes)


def _second_paths(gate: Gate, facts: RequestFacts, verdict: Verdict,
                  readings: Sequence[tuple[str, bool]]) -> Verdict | None:
    """The refusal when one of ``readings`` (``_second_readings``) is a path the policy
    would not let the same caller, with the same credentials, method and Host, at
    (``second.judge_readings``). A deny that dry-run lets through is returned as an allowed
    verdict, as ``_destination`` does."""
    found = judge_readings(_judge(gate, verdict), facts, readings)
    return None if found is None else Verdict(found, auth=verdict.auth)


def _judge(gate: Gate, verdict: Verdict, now: float | None = None) -> Judge:
    """The policy in force's decision for facts, with ``verdict``'s credentials, at ``now``
    (default: the time of the call)."""
    auth = verdict.auth
    at = time.time() if now is None else now
    return lambda facts: gate.judge(facts, auth, at)


def _judged_again(gate: Gate, ctx: RequestContext, facts: RequestFacts,
                  auth: AuthFacts | None, now: float) -> bool:
    """Whether the policy in force still allows what a request in flight (or a stream) was
    judged on besides its own method and path, as it was judged when it began
    (``second.judge_rest``): its Destination with its own method, its second readings
    (``ctx.second``: query routes, trimmed paths) and each method its query or body named as
    an override (``ctx.overrides``) on its path and on each reading. Found by a hostile
    review: a reload denying DELETE left ``POST ?_method=DELETE`` running; a later one, that
    a reload denying ``/admin/**`` left ``POST /?/admin/users`` (CodeIgniter's route),
    ``POST /+admin/users`` and a ``COPY`` to ``/admin/config`` running -- only the path and
    the overrides were judged again. ``auth``: its credentials as the policy in force
    reads them (``Gate.auth_now``). A reading or Destination that decodes to non-ASCII ends it once
    ``non_ascii_paths`` no longer allows that, as its own path does (``Gate.still_allows``;
    found by the review of that fix: ``/?/caf%C3%A9/ws`` ran on, 400 for a new request)."""
    if (ctx.second or ctx.destination) and not gate.allows_non_ascii_paths():
        for other in (*(reading for reading, _every in ctx.second), ctx.destination or ""):
            if not other.isascii() or ("%" in other
                                       and not unquote_to_bytes(other).isascii()):
                return False
    found = judge_rest(lambda facts: gate.judge(facts, auth, now), facts,
                       destination=ctx.destination, readings=ctx.second,
                       overrides=ctx.overrides)
    return found is None or found.allowed


# ``extra.routes``' second item: whether every rule judged the route or deny rules only.
ROUTE_RULES = {True: "all", False: "deny"}


def _note_routes(ctx: RequestContext, routes: list[tuple[str, bool]]) -> None:
    """Record the routes every rule judges (``extra.routes``: CodeIgniter's ``/`` query,
    WordPress's ``rest_route``, which name routes). The deny-only ones (``q``, ``r``, ``p``,
    ``route``) are ordinary search and id parameters on a home page, and the trail never
    held query strings: what a patient or client searched for has no place in it. They
    are not recorded; ``extra.unread`` says ``search_routes`` (policy replay calls a change
    that may concern them uncertain)."""
    every_rule = {r for r, every in routes if every}
    # (a ``rest_route``'s own reading without ``/wp-json`` names a route too: recorded)
    recorded = [[path_for_records(r), ROUTE_RULES[every]] for r, every in routes
                if every or "/wp-json" + r in every_rule]
    if recorded:
        _note(ctx, "routes", recorded)
    if len(recorded) < len(routes):
        _note_unread(ctx, ["search_routes"])


def _note_unread(ctx: RequestContext, names: list[str]) -> None:
    """Add ``names`` (``sidecar.replay.UNREAD``'s) to the record's ``unread``."""
    _note_more(ctx, "unread", names)


def _note_more(ctx: RequestContext, key: str, items: Sequence[str]) -> None:
    """Add ``items`` not there yet to the record's list ``key``."""
    judged = ctx.judged
    known = judged.get(key) if judged is not None else None
    if known is None:
        _note(ctx, key, list(items))
    else:
        known.extend(i for i in items if i not in known)


# How far a refused request got (``_unjudged``): refused by its own decision, by its
# Destination's, by a path its query or its trimmed path gives, or by a method its query
# named.
_REFUSED_BY_REQUEST = 0
_REFUSED_BY_DESTINATION = 1
_REFUSED_BY_ROUTE = 2
_REFUSED_BY_QUERY = 3


def _note(ctx: RequestContext, key: str, value: Any) -> None:
    """Put ``key`` into what the request's record adds (``RequestContext.judged``)."""
    if ctx.judged is None:
        ctx.judged = {key: value}
    else:
        ctx.judged[key] = value


def _note_overrides(ctx: RequestContext, methods: tuple[str, ...]) -> None:
    """Add the method-override methods the query or body named (before they are judged, so
    that a refusal's record names the one refused) to the record's ``overrides``."""
    _note_more(ctx, "overrides", methods)


def _refuse_or_observe(gate: Gate, ctx: RequestContext, event: Request, head: RequestHead,
                       facts: RequestFacts, query: str, refused: Verdict, stage: int) -> None:
    """A second judgement's verdict (a Destination's, a query route's, an override's):
    a deny that dry-run lets through is recorded as observed; a refusal becomes the
    request's verdict, its record says what the later checks would have read
    (``_unjudged`` at ``stage``), and it is raised."""
    if refused.decision.action == "allow":  # (an observed deny: recorded)
        _observed(ctx, refused)
        return
    ctx.verdict = refused
    _unjudged(gate, ctx, event, head, facts, query, stage)
    raise refused.refusal()


def _unjudged(gate: Gate, ctx: RequestContext, event: Request, head: RequestHead,
              facts: RequestFacts, query: str, stage: int) -> None:
    """For a request refused before its later checks ran (``stage``): what its record must
    say of them, so that ``policy replay``, when a new policy lets it get further, judges
    them as the data path would -- its Destination's path and the methods its query names,
    read (never judged) from the head -- and, in ``unread``, what it cannot know: a
    Destination or query that would be refused (400), and a POST body whose method-override
    fields were never read (found by a hostile review: replay took such a request as a plain
    one). Refusals only: the path of a request served never calls this."""
    unread: list[str] = []
    if stage < _REFUSED_BY_DESTINATION and head.destination:
        try:
            _note(ctx, "destination", _read_destination(gate, event.headers, facts)[0])
        except BadRequest:
            unread.append("destination")
    if stage < _REFUSED_BY_ROUTE and query:
        try:
            routes = query_routes(facts.path, query,
                                  allow_non_ascii=gate.allows_non_ascii_paths())
        except BadRequest:
            unread.append("routes")
        else:
            if routes:
                _note_routes(ctx, routes)
    if stage < _REFUSED_BY_QUERY and query:
        try:
            named = method_overrides(query)
        except BadRequest:
            unread.append("query")
        else:
            if named:
                _note_overrides(ctx, named)
    if head.has_body and event.method == b"POST":
        types = [value for name, value in event.headers if name == b"content-type"]
        try:
            reads = len(types) > 1 or bool(body_readers(
                b"POST", types[0] if types else None,
                [value for name, value in event.headers if name == b"content-encoding"]))
        except BadRequest:
            reads = True  # (refused 400 when read: not known either)
        if reads:
            unread.append("body")
    if unread:
        _note_unread(ctx, unread)


def _overridden(gate: Gate, facts: RequestFacts, verdict: Verdict,
                methods: tuple[str, ...],
                second: Sequence[tuple[str, bool]] = ()) -> Verdict | None:
    """The refusal when the query (``method_overrides``: ``?_method=DELETE``) or a POST
    form's body (``_body_check``) names a method the app may run instead of the request's
    own that the policy would not let the same caller, with the same credentials, path and
    host, run itself; None when it names none or only allowed ones. The request reaches the
    app as sent: an app that honours the override runs a method the policy allows (as the
    headers of that kind are removed, docs/policy.md ``methods``). A value that is no method
    is 400 (``bad_method``). When none refuses but one's deny is let through by dry-run
    (``_observed``), that decision, as an allowed verdict (the first such method's): the
    caller records it; a later method that refuses still refuses.

    Each method is judged on the request's path and on each of its second paths
    (``second``: ``_second_readings``), as the app runs it on whichever it routes: found by
    a hostile review, ``POST /?/orders/7`` with ``_method=DELETE`` ran DELETE on
    CodeIgniter past a rule denying it on ``/orders/**``, each judged apart."""
    found = judge_overrides(_judge(gate, verdict), facts, methods, second)
    return None if found is None else Verdict(found, auth=verdict.auth)


def _observed(ctx: RequestContext, found: Verdict) -> None:
    """A request let in whose Destination or override method a deny rule would refuse but
    dry-run lets through (a dry-run section, an observed ``mode: dry-run`` deny rule:
    ``found``, allowed, ``dry_run``, ``would: deny``): its record says so -- its decision
    becomes ``found``'s (``dry_run``, ``would: deny``, that rule), the request still goes
    through. A request whose own decision is already a dry-run deny keeps it. Found by a
    hostile review: ``POST /orders/1?_method=DELETE``, a form's ``_method=DELETE`` and
    ``COPY`` to a denied Destination were recorded as a plain ``allow`` while ``DELETE
    /orders/1`` was recorded ``dry-run``: switching the section to enforce refused requests
    the dry-run trail never flagged. Only requests with an override or a Destination get
    here; the headers the request goes with stay its own verdict's."""
    verdict = ctx.verdict
    if verdict is not None and not verdict.decision.dry_run:
        ctx.verdict = replace(verdict, decision=found.decision)


def _body_check(gate: Gate, facts: RequestFacts, verdict: Verdict, ctx: RequestContext,
                headers: Headers, second: Sequence[tuple[str, bool]] = ()
                ) -> BodyCheck | None:
    """The check of a POST body's method-override fields (``sidecar.http.body_override``),
    or None for a body no override reader reads as a form or as JSON (``body_readers``).
    Two Content-Type fields are 400: readers take either one."""
    types = [value for name, value in headers if name == b"content-type"]
    if len(types) > 1:
        raise BadRequest("bad_request", "two Content-Type fields")
    readers = body_readers(b"POST", types[0] if types else None,
                           [value for name, value in headers if name == b"content-encoding"])
    if not readers:
        return None

    def judge(methods: tuple[str, ...]) -> None:
        _note_overrides(ctx, methods)  # (recorded: policy replay judges them as this does)
        refused = _overridden(gate, facts, verdict, methods, second)
        if refused is not None:
            if refused.decision.action == "allow":  # (an observed deny: recorded)
                _observed(ctx, refused)
            else:
                ctx.verdict = refused
                raise refused.refusal()
        ctx.overrides += tuple(m for m in methods if m not in ctx.overrides)

    return BodyCheck(readers, judge)


def api_key_of(headers: Headers) -> bytes | None:
    """The ``x-api-key`` value a request presented (the last one; a request with two is
    never authorised by a key)."""
    found = None
    for name, value in headers:
        if name == API_KEY_HEADER:
            found = value
    return found


def refusal_reason(exc: SvidError) -> str:
    """The refusal reason for a peer certificate that failed our checks (metric label is
    the part before the colon)."""
    if exc.rule == RULE_EXPIRED:
        # A certificate of the chain expired: a TLS 1.2 session resumed after the expiry
        # (the handshake's own check gives the same label).
        return "peer_cert_expired"
    if exc.rule in (RULE_TRUST_DOMAIN_MISMATCH, RULE_TRUST_DOMAIN_NOT_FEDERATED,
                    RULE_CHAIN_TOO_LONG):
        return f"peer_untrusted:{exc.rule}"
    return f"bad_svid:{exc.rule}"


# Why an inbound TLS handshake failed, from OpenSSL's own code for it (``ssl.SSLError``
# ``library`` and ``reason``), never from its message text. One entry per reason:
# (library, reason) -> label of ``sidecar_tls_handshake_failures_total{reason}`` and of the
# ``connection_refused`` log line and audit record (docs/metrics.md lists every label). A
# reason not listed is ``handshake_failed``; a failure without an SSL error (a reset before
# any TLS byte) too. The certificate labels feed the burst detector (telemetry.py,
# TLS_CREDENTIAL_FAILURES).
HANDSHAKE_FAILURES: dict[tuple[str, str], str] = {
    # Not TLS at all: plaintext HTTP, an h2c preface, any other protocol.
    ("SSL", "HTTP_REQUEST"): "not_tls",
    ("SSL", "HTTPS_PROXY_REQUEST"): "not_tls",
    ("SSL", "WRONG_VERSION_NUMBER"): "not_tls",
    # The peer closed the connection before the handshake ended (TCP probes, give-ups).
    ("SSL", "UNEXPECTED_EOF_WHILE_READING"): "peer_closed",
    # TLS, but a version we refuse (below 1.2), or the peer refused ours.
    ("SSL", "UNSUPPORTED_PROTOCOL"): "protocol_version",
    ("SSL", "VERSION_TOO_LOW"): "protocol_version",
    ("SSL", "NO_PROTOCOLS_AVAILABLE"): "protocol_version",
    ("SSL", "TLSV1_ALERT_PROTOCOL_VERSION"): "protocol_version",
    # No cipher suite or key-exchange group in common (non-AEAD, non-ECDHE TLS 1.2).
    ("SSL", "NO_SHARED_CIPHER"): "no_shared_cipher",
    ("SSL", "NO_SHARED_GROUP"): "no_shared_cipher",
    # The client sent no certificate (mTLS requires one).
    ("SSL", "PEER_DID_NOT_RETURN_A_CERTIFICATE"): "no_client_cert",
    ("SSL", "TLSV13_ALERT_CERTIFICATE_REQUIRED"): "no_client_cert",
    # The client's certificate does not verify against the bundle (an expired one:
    # HANDSHAKE_VERIFY_CODES); or the peer's alert about certificates.
    ("SSL", "CERTIFICATE_VERIFY_FAILED"): "peer_cert_untrusted",
    ("SSL", "TLSV1_ALERT_UNKNOWN_CA"): "peer_cert_untrusted",
    ("SSL", "SSLV3_ALERT_CERTIFICATE_EXPIRED"): "peer_cert_expired",
    # A handshake message larger than OpenSSL takes: a Certificate message past its 100 KB
    # list (a chain of ordinary certificates past the count limit reaches it first), or an
    # oversized ClientHello -- OpenSSL's code does not say which, so neither is named a
    # chain. It was ``handshake_failed``, which the burst detector does not count (a hostile
    # review); it counts now (``TLS_CREDENTIAL_FAILURES``).
    ("SSL", "EXCESSIVE_MESSAGE_SIZE"): "message_too_large",
}
HANDSHAKE_FAILED = "handshake_failed"
# A handshake the peer abandoned (a reset, a FIN, an alert of its own) AFTER the sidecar had
# answered its ClientHello: the server's flight -- its key share, and the signature -- was
# made (``failed_handshake_reason``). Its own label, and it feeds the burst detector
# (telemetry.py, TLS_CREDENTIAL_FAILURES): a ClientHello captured once and replayed, the
# replayer leaving after the server's flight, cost the sidecar ~0.8 ms of CPU each and
# nothing on its side, and was ``handshake_failed``/``peer_closed``, which no ``by: address``
# rule counted (found by a hostile review, thirty-fifth session).
HANDSHAKE_ABANDONED = "handshake_abandoned"
# (a peer that left before the sidecar answered is ``peer_closed`` and was not answered:
# ``TlsTransport.do_handshake(skip_if_gone=True)``. After the answer, any failure but a
# credential's -- a reset, a FIN, any alert of the client's, plaintext, a record of another
# version -- is an abandoned handshake: a plaintext ``protocol_version`` alert after the
# server's flight was ``protocol_version`` and never counted; found by the review of the fix)
# More waits for the peer's handshake bytes than a handshake takes (``MAX_HANDSHAKE_READS``):
# a ClientHello dribbled in tiny records to make each its own pass through the sidecar.
HANDSHAKE_FRAGMENTED = "handshake_fragmented"
# CERTIFICATE_VERIFY_FAILED carries X509's verify code: these refine its label.
HANDSHAKE_VERIFY_CODES: dict[int, str] = {
    10: "peer_cert_expired",  # X509_V_ERR_CERT_HAS_EXPIRED
    # X509_V_ERR_CERT_CHAIN_TOO_LONG: more intermediates than the contexts let OpenSSL
    # follow (``sidecar.identity.tls.bound_peer_chain``), refused before any signature is
    # checked; the trust rule's own label for a chain past its bound.
    22: f"peer_untrusted:{RULE_CHAIN_TOO_LONG}",
}


def failed_handshake_reason(exc: BaseException, tls: TlsTransport | None) -> str:
    """The label of a failed inbound handshake on ``tls`` (None: it was never made):
    ``handshake_reason``'s, except that a reset or close of the peer's (``handshake_failed``,
    ``peer_closed``) after the sidecar chose the cipher suite for its ClientHello -- so made
    its flight, key share and signature -- is ``HANDSHAKE_ABANDONED``. A connection closed
    before any byte, mid-ClientHello, or refused at its hello (not TLS, no shared cipher)
    cost no crypto and keeps its label; a completed handshake never gets here."""
    if isinstance(exc, PeerLeftBeforeAnswer):
        return "peer_closed"
    reason = handshake_reason(exc)
    if reason.partition(":")[0] not in TLS_CREDENTIAL_FAILURES and tls is not None \
            and _answered_hello(tls):
        return HANDSHAKE_ABANDONED
    return reason


def _answered_hello(tls: TlsTransport) -> bool:
    """Whether the server side of ``tls`` got as far as choosing a cipher suite for the
    peer's ClientHello: OpenSSL's ``SSL_get_current_cipher`` is set then, in the same call
    that builds and signs the server's flight."""
    try:
        return tls._ssl.cipher() is not None  # (the connection object: ``TlsTransport``)
    except (AttributeError, ValueError, OSError):
        return False


def handshake_reason(exc: BaseException) -> str:
    """The label of a failed inbound handshake (``HANDSHAKE_FAILURES``); ``exc`` is the
    ``ssl.SSLError`` or the transport's error raised from it."""
    if isinstance(exc, HandshakeFragmented):
        return HANDSHAKE_FRAGMENTED
    cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if not isinstance(cause, ssl.SSLError):
        return HANDSHAKE_FAILED
    if isinstance(cause, ssl.SSLCertVerificationError):
        label = HANDSHAKE_VERIFY_CODES.get(cause.verify_code)
        if label is not None:
            return label
    library, reason = getattr(cause, "library", None), getattr(cause, "reason", None)
    return HANDSHAKE_FAILURES.get((str(library), str(reason)), HANDSHAKE_FAILED)
