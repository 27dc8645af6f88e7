"""The HTTP/1.1 request loop shared by the inbound and outbound listeners.

Theory of operation: one loop per client connection. It waits for the next request (the
idle bound until the first byte, then the head bound; a drain cancels the idle wait), reads
and checks the head, and hands it to the listener's ``handle``, which decides and returns
the coroutine that forwards (``forward``'s, built by a plain call: a refusal raises from the
call), which the loop awaits. Whatever happens, each request leaves exactly one telemetry record (log line,
metrics, audit record): the handler fills ``RequestContext`` as it learns facts and the
verdict, so a refusal or a failure at any point is recorded with what was known. Any
refusal ends the connection after a generic reply, so nothing pipelined behind a refused
request is ever read. With a ``LiveConnection`` (``sidecar.net.lifetime``) the loop also
publishes its idle wait, so a retired connection can be ended while idle, and it stops after
the response that follows a retirement (or before reading another request, when the
retirement was for a loss of trust).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sidecar.config.model import Limits
from sidecar.errors import RequestRefused
from sidecar.http.request import RequestHead, check_head
from sidecar.http.wire import NEED_DATA, Request
from sidecar.net.forward import Exchange, UpstreamFailed
from sidecar.net.lifetime import LiveConnection
from sidecar.net.listen import IDLE_DRAIN_GRACE, ConnectionTracker
from sidecar.net.respond import send_refusal
from sidecar.net.streams import (
    Endpoint,
    PeerClosed,
    Timeout,
    abort,
    cancelled,
    wait_readable,
)
from sidecar.telemetry import RequestContext, Telemetry

_ID_BATCH = 512
_id_pool: list[str] = []


def new_request_id() -> str:
    """16 hex digits from the OS CSPRNG (unpredictable), read 512 ids per system call."""
    if not _id_pool:
        raw = os.urandom(8 * _ID_BATCH).hex()
        _id_pool.extend(raw[i:i + 16] for i in range(0, len(raw), 16))
    return _id_pool.pop()


Handler = Callable[[RequestContext, Request, RequestHead], Awaitable[Exchange]]


def broken_exchange(exc: PeerClosed | Timeout) -> tuple[int, str]:
    """Status and reason to record for an exchange that broke off without a reply to send.

    The client went away (499), or the upstream failed after the response head had already
    been relayed (502 ``upstream_closed_mid_response`` / ``upstream_timeout_mid_response``:
    the caller saw a response cut short, and the fault is the upstream's, not the caller's).
    """
    kind = "timeout" if isinstance(exc, Timeout) else "closed"
    if exc.side == "client":
        return 499, f"client_{type(exc).__name__.lower()}"
    return 502, f"upstream_{kind}_mid_response"


async def _idle_wait_scoped(client: Endpoint, tracker: ConnectionTracker,
                            conn: LiveConnection | None, deadline: float) -> bool:
    """The idle wait of a stream without an endpoint ``Wait`` (memory streams in tests, the
    stdlib TLS wrapper): a cancel scope is its bound, and what a drain or a retirement
    cuts. False when the connection is to end instead. (The lean transports' idle wait is
    in ``request_loop`` itself.)"""
    scope = tracker.idle_scope(deadline)
    tracker.register_idle(scope)
    if conn is not None:
        conn.idle = scope
    try:
        with scope:  # the one bound of this wait (and a drain cancels it)
            client.reader.feed(await client.receive(math.inf))
    except (PeerClosed, Timeout):
        return False
    finally:
        tracker.unregister_idle(scope)
        if conn is not None:
            conn.idle = None
    return not scope.cancelled_caught and (conn is None or conn.serve_more)


def _is_head(event: object) -> bool:
    """Whether ``event`` is a HEAD request (its refusal has no body)."""
    return type(event) is Request and event.method == b"HEAD"


async def request_loop(client: Endpoint, *, tracker: ConnectionTracker, limits: Limits,
                       telemetry: Telemetry, handle: Handler, source: str,
                       peer: str | None, conn: LiveConnection | None = None) -> None:
    """Serve requests on ``client`` until it closes, misbehaves, is refused, drains or is
    retired (``conn``)."""
    reader = client.reader
    now = client.clock
    # On the lean transports the endpoint's ``Wait`` bounds the idle wait and is what a
    # drain or a retirement cuts (``sidecar.net.streams``: no cancel scope); the wait is
    # written out here rather than in a helper coroutine (one coroutine less per request,
    # and one frame less to resume when the next request arrives).
    wait = client.wait
    direction = conn.direction if conn is not None else "inbound"
    idle_add, idle_discard = tracker.idle.add, tracker.idle.discard  # (register_idle, bound)
    try:
        while True:
            # (``retiring`` first: ``serve_more`` is a property, read only once it can be False)
            if conn is not None and conn.retiring is not None and not conn.serve_more:
                return
            if not reader.buffered():
                # Wait for the first bytes of the next request by the idle deadline.
                deadline = now() + limits.idle_timeout
                if conn is not None:
                    deadline = min(deadline, conn.cut_at)
                if wait is None:
                    if not await _idle_wait_scoped(client, tracker, conn, deadline):
                        return
                else:
                    if tracker.draining:
                        deadline = min(deadline, now() + IDLE_DRAIN_GRACE)
                    idle_add(wait)
                    if conn is not None:
                        conn.idle = wait
                    try:
                        # The read split at its wait, which this frame awaits itself
                        # (``Endpoint.receive_now``): no frame below this one at the idle wait.
                        got: Any = client.receive_now(deadline)  # (bytes, None or a coroutine)
                        if got is None:
                            try:
                                await wait_readable(client.wait_fd)
                            except BaseException as exc:  # noqa: BLE001 -- re-raised, mapped
                                raise client.wait_failed(exc)  # noqa: B904 -- (its own cause)
                            got = client.woke(deadline)
                        if not isinstance(got, bytes):  # (the complete read)
                            got = await got
                        reader.feed(got)
                    except (PeerClosed, Timeout):
                        return
                    finally:
                        idle_discard(wait)
                        if conn is not None:
                            conn.idle = None
                    if conn is not None and conn.retiring is not None and not conn.serve_more:
                        return
            ctx = RequestContext(new_request_id(), time.time(), source=source, peer=peer,
                                 direction=direction)
            event = None  # (not the previous request's, if this one's head does not parse)
            try:
                client.sent_head = False
                # The head is nearly always all here after the idle wait: parsed without a
                # coroutine, and ``next_event`` (its own bound, ``header_timeout`` from the
                # first read it needs) only for a head that is still arriving.
                event = client.event_now()
                admitted = ctx.started
                if event is NEED_DATA:
                    event = await client.next_event(None, timeout=limits.header_timeout)
                    admitted = time.time()
                if type(event) is not Request:
                    return  # the client closed the connection, or went away
                if conn is not None and admitted >= conn.peer_not_after \
                        and conn.trust_ended(admitted):
                    # A request complete after the trust the connection was admitted on
                    # ended (a certificate of its chain, or of the own one, expired; the
                    # sweep finds that up to a second later): not served, the connection
                    # ends as the sweep would have ended it idle (its ``connection_closed``
                    # record says why).
                    return
                head = check_head(event.method, event.target, event.headers,
                                  max_headers=limits.max_headers, max_body=limits.max_body_bytes,
                                  http_version=event.version, values_checked=True)
                try:
                    ex = await handle(ctx, event, head)
                except BaseException as cut:
                    if not cancelled(cut):  # (a nursery's group of Cancelled is one too)
                        raise
                    # The connection was cut (retired past its grace, or the process stops):
                    # the request still leaves its one record, which says why (as a TCP
                    # stream's does; before the twenty-fourth session only
                    # ``connection_closed``, the reason was in the connection's record).
                    if ctx.facts is not None:
                        why = conn.retiring if conn is not None else None
                        telemetry.request(ctx, 0, error=f"connection_closed:{why or 'shutdown'}")
                    if client.sent_head:
                        # An answer cut part-way must not end like a whole one (to an
                        # HTTP/1.0 client, or a stream, the close would be the end of the
                        # body): a reset.
                        abort(client.stream)
                    raise
                if conn is not None:
                    # (the exchange is over: a policy change no longer judges it -- found
                    # by a hostile review, thirty-seventh session: a reload, a JWKS key's
                    # removal or a decision waiting for introspection judged the previous,
                    # finished request while the next head was arriving, and cut the
                    # connection ``policy_refused``)
                    conn.request = None
                    conn.credentials_end = math.inf  # (set for a request with credentials)
                    conn.renew = None
                    if conn.reauth is not None:  # (an introspected token's: ``reauth``)
                        conn.reauth = None
                        conn.reauth_at = math.inf
                    # (the upstream connection this exchange ran over is the pool's again:
                    # its age or trust no longer judges this connection -- found by a
                    # review of the thirty-first session's fixes: a young connection whose
                    # next request waited for a new upstream connection was retired for
                    # the previous one's age)
                    conn.upstream = None
                telemetry.request(ctx, ex.status, ex.request_bytes, ex.response_bytes,
                                  error=ex.error)
                if ex.upgraded:
                    return
            except RequestRefused as exc:
                if conn is not None:
                    conn.upstream = None  # (as after an exchange: the pool's again)
                    conn.request = None  # (ended: not judged again while refused)
                telemetry.request(ctx, exc.status, error=exc.reason)
                await send_refusal(client, exc, ctx.request_id, ctx.verdict, head=_is_head(event))
                return
            except UpstreamFailed as exc:
                if conn is not None:
                    conn.request = None  # (ended: not judged again while refused)
                telemetry.request(ctx, exc.refusal.status, exc.exchange.request_bytes,
                                  error=exc.refusal.reason, detail=exc.refusal.detail)
                await send_refusal(client, exc.refusal, ctx.request_id, None,
                                   head=_is_head(event))
                return
            except (PeerClosed, Timeout) as exc:
                if conn is not None:
                    conn.request = None  # (ended: not judged again while the loop ends)
                if ctx.facts is not None:  # forwarded, then broken off: still one record
                    status, error = broken_exchange(exc)
                    sent, received = (exc.sent, exc.received) if isinstance(exc, PeerClosed) \
                        else (0, 0)
                    telemetry.request(ctx, status, sent, received, error=error, detail=str(exc))
                    if (exc.side != "client" and client.sent_head
                            and getattr(event, "version", None) == b"1.0"):
                        # An HTTP/1.0 client's answer may end at the close (no length, no
                        # chunks): only a reset tells it the answer was cut short.
                        abort(client.stream)
                elif isinstance(exc, Timeout) and exc.side == "client":
                    # A head that did not arrive in time: a refused request like any other (one
                    # record: log line, metric, audit), as long as some of it came -- the wait
                    # for a next request on an idle keep-alive connection is no request.
                    refusal = RequestRefused("header_timeout", status=408)
                    if reader.buffered():
                        telemetry.request(ctx, refusal.status, error=refusal.reason)
                    await send_refusal(client, refusal, ctx.request_id, None)
                return
            if not ex.keep_alive or tracker.draining or (conn is not None and conn.retiring):
                return
            reader.start_next()
    finally:
        # An upstream connection this client kept for itself (connection-oriented
        # authentication, ``sidecar.net.forward``) ends with the client's connection.
        private = client.private
        if private is not None:
            client.private = None
            await trio.aclose_forcefully(private.stream)
