"""Forward one authorised HTTP/1.1 request to an upstream and stream the answer back.

Theory of operation: the client side is an ``Endpoint`` whose request head has been read
and authorised; the upstream side is an ``Endpoint`` from a pool. Bodies are streamed chunk
by chunk in both directions (memory stays flat whatever the size). Every message is
re-framed by the sidecar (``sidecar.http.wire``): a known length is kept, anything else is
sent chunked (or close-delimited to an HTTP/1.0 client), so what reaches either side is
always well-formed HTTP/1.1 whatever framing the sender used. The exchange is sequential --
request body, then response -- which is what HTTP/1.1 clients do; an upstream that answers
(or closes) before it has the whole body gets no more of it and its answer is relayed
(``_send_body``), while a 1xx head it sends meanwhile is relayed and the body goes on. The
app's connection (inbound) is never pooled after a request with a body: nothing on the wire
says the app read the body, and a body it did not read would be the next request it reads
there, answered to another caller. A peer's connection (outbound, ``pool.reuse_after_body``)
is pooled after a complete answer below 400: a peer sidecar reads every body or closes, and
the only caller of an outbound listener is the local workload; an ``Expect:
100-continue`` is answered by the sidecar itself once the request was authorised (as Envoy
does), and the header is not forwarded -- nor on a request without a body, which has
nothing to continue. A Content-Length is forwarded as its canonical decimal (``0003`` -> ``3``).

An authorised ``Upgrade`` request whose upstream answers ``101`` becomes a byte pipe in both
directions (``splice``, as a ``protocol: tcp`` stream: a clean end of one side is passed
on and the other direction goes on; a truncation resets both sides; idleness is the
connection's, not a direction's). Any failure before the response head reached the client
becomes a generic 502/504 -- also when the head was queued but not yet sent (a body that breaks in the same read
as its head); after that point the only honest signal left is to close the client
connection, without the end of a chunked body.

The upstream is not trusted either (the local app behind the inbound listener, any server
with a valid SVID behind an outbound one). Its response head is read by the same strict
reader as a request, and then: at most ``MAX_INFORMATIONAL`` 1xx heads before the final one,
at most twice ``limits.max_headers`` fields in a head (as the head's bytes are bounded by
twice ``limits.max_header_bytes``), a status of 100-599 (``upstream_protocol_error``, 502),
also for 1xx heads read while the request body is sent;
hop-by-hop fields and those Connection lists never pass, nor Content-Length on a 1xx or 204
(RFC 9110 8.6), and a Content-Length goes out as its canonical decimal. A close-delimited
body that a TLS peer ends without close_notify is a truncation (RFC 9112 9.8), never a
complete body.
"""

from __future__ import annotations

import re
import select
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import trio

from sidecar.config.model import Limits
from sidecar.errors import BadGateway, GatewayTimeout, PayloadTooLarge, RequestRefused
from sidecar.http.body_override import BodyCheck
from sidecar.http.headers import HOP_BY_HOP, connection_tokens
from sidecar.http.request import CONNECTION_AUTH_SCHEMES, RequestHead
from sidecar.http.wire import (
    END,
    NEED_DATA,
    OUT_CHUNKED,
    OUT_CLOSE,
    OUT_LENGTH,
    OUT_NONE,
    UNTIL_CLOSE,
    BodyWriter,
    Headers,
    ParseError,
    Request,
    Response,
    serialise_request_head,
    serialise_response_head,
)
from sidecar.net.pool import UpstreamPool
from sidecar.net.respond import linger
from sidecar.net.streams import (
    Endpoint,
    PeerClosed,
    ProtocolViolation,
    Timeout,
    abort,
    close_quietly,
    raw_socket,
    readable_now,
    run_clock,
    truncated,
    wait_readable,
)
from sidecar.net.transport import BURST_UNDER, RECV_SIZE, TlsTransport


@dataclass(slots=True)
class Exchange:
    """What happened to one forwarded request (for audit, metrics and logs)."""

    status: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    upgraded: bool = False
    reused: bool = False
    keep_alive: bool = False  # the client's connection may carry another request
    error: str | None = None  # how an upgraded stream ended when not cleanly (idle_timeout)


class UpstreamFailed(Exception):
    """The upstream failed; ``refusal`` is what the client gets if nothing was sent yet."""

    def __init__(self, refusal: RequestRefused, exchange: Exchange) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal
        self.exchange = exchange


def _response_headers(headers: Headers, lists: bool) -> Headers:
    """A response head's fields without hop-by-hop and Connection-listed names.

    Connection's tokens are only looked at when the reader says the head's Connection
    field may list other fields (``lists``: an app's usual lone ``Connection: keep-alive``
    lists none), and a second pass is made only when one of them names a field that is
    not hop-by-hop anyway."""
    out = [field for field in headers if field[0] not in HOP_BY_HOP]
    if lists:
        hop = connection_tokens(headers) - HOP_BY_HOP
        if hop:
            out = [field for field in out if field[0] not in hop]
    return out


# How a spliced stream's end reaches the other side (``splice``). A clean end -- a TCP FIN
# from a plain socket, a close_notify from a TLS peer -- is passed on as one (``send_eof``:
# FIN, or close_notify) and the other direction goes on until it ends too (half-close, as
# Envoy's tcp_proxy and ghostunnel do). Every other end is a truncation and reaches both
# sides as a TCP reset (no FIN, no close_notify), and the stream's record names the side
# that broke it: a TLS peer's EOF without close_notify (anyone on the path can send a FIN,
# RFC 8446 6.1; OpenSSL also reports some resets so), a reset, any read or write error.
# Side -> (status, reason, detail) of the record: the reasons of an HTTP exchange cut short
# (``sidecar.net.session.broken_exchange``), the detail naming the truncation.
BROKEN_RECORD: dict[str, tuple[int, str, str]] = {
    "client": (499, "client_peerclosed", "client_truncated"),
    "upstream": (502, "upstream_closed_mid_response", "upstream_truncated"),
}
_SIDES = ("client", "upstream")
# What a side's read or write may raise: any error ends the stream as a truncation of that
# side (fail closed), never the process -- trio's, the socket's, ssl's and friends.
_STREAM_ERRORS = (Exception,)


IDLE_TIMEOUT = "idle_timeout"  # the error of a stream cut after limits.tcp_idle_timeout


@dataclass(slots=True)
class Spliced:
    """How a ``splice`` ended: bytes each way, and ``broken`` ("" when both sides ended
    cleanly or the stream was idle for the limit; else the ``BROKEN_RECORD`` detail) with
    the ``side`` ("client": the first stream, "upstream": the second) that broke it."""

    sent: int = 0  # a -> b
    received: int = 0  # b -> a
    broken: str = ""
    side: str = ""
    idle: bool = False  # cut after ``idle`` seconds without a byte either way

    def truncated_by(self, index: int) -> None:
        """Side ``index`` (0: client, 1: upstream) broke the stream (the first one named
        counts)."""
        if not self.broken:
            self.side = _SIDES[index]
            self.broken = BROKEN_RECORD[self.side][2]

    def record(self) -> tuple[int, str | None]:
        """(status, error) of the stream's record: (200, None) for a clean end, (200,
        ``idle_timeout``) for a cut after the idle limit (not a clean end: a review found
        it recorded as one)."""
        if not self.broken:
            return 200, IDLE_TIMEOUT if self.idle else None
        status, reason, _ = BROKEN_RECORD[self.side]
        return status, reason


class _Splice:
    """The state of one ``splice``: both directions' counts, the connection's last
    activity (either direction), how many directions are still open, and the end."""

    __slots__ = ("streams", "done", "last", "open", "ended", "quiet", "clock", "scope")

    def __init__(self, a: trio.abc.Stream, b: trio.abc.Stream) -> None:
        self.streams = (a, b)
        self.done = Spliced()
        self.clock = run_clock()
        self.last = self.clock()
        self.open = 2
        self.ended = [False, False]  # a side's clean end was read: nothing more to read
        # Set by the task reading a side when a read finds nothing waiting, or when it read
        # the side's end: a close_notify owed to that side may go then (``_eof``).
        self.quiet: list[trio.Event | None] = [None, None]
        self.scope: trio.CancelScope | None = None

    def broke(self, index: int) -> None:
        """Side ``index`` ended the stream other than cleanly: both directions end, and
        both sides are reset when ``splice`` returns."""
        self.done.truncated_by(index)
        self.scope.cancel()  # type: ignore[union-attr]

    async def pipe(self, i: int, head: bytes) -> None:
        """Copy from side ``i`` to the other until ``i`` ends: a clean EOF is passed on and
        the other direction left running; anything else breaks the stream. ``head`` (bytes
        of side ``i`` read before the stream began: what followed an upgrade's request or
        101 head) goes first, as read chunks go: watched by the idle limit, each completed
        send counted as activity (found by a hostile review: sent before the watch began, a
        reader that never read them held the stream open with no limit at all)."""
        j = 1 - i
        src: Any = self.streams[i]  # (a lean transport has want_write and wait_fd)
        dst = self.streams[j]
        done, clock = self.done, self.clock
        if head:  # (counted as read chunks are: when taken in)
            if i:
                done.received += len(head)
            else:
                done.sent += len(head)
        for start in range(0, len(head), RECV_SIZE):
            try:
                await dst.send_all(head[start:start + RECV_SIZE])
            except _STREAM_ERRORS:
                self.broke(j)
                return
            self.last = clock()
        try_receive = getattr(src, "try_receive", None)
        burst = getattr(src, "receive_burst", None)
        fd: Any = getattr(src, "wait_fd", None)
        while True:
            try:
                if try_receive is not None:
                    # The lean transports' read (``receive_some``) written out, to say
                    # when a read found nothing waiting (``_eof``).
                    data = try_receive()
                    if data and burst is not None and len(data) < BURST_UNDER:
                        # Bytes that were waiting already, in a short TLS record: more
                        # records may be behind it, joined into one send onward
                        # (``TlsTransport.receive_burst``).
                        data = burst(data)
                    while data is None:
                        if self.quiet[i] is not None:
                            self._wake(i)
                        if src.want_write:  # (a TLS read that must write first)
                            src.want_write = False
                            await trio.lowlevel.wait_writable(fd)
                        else:
                            await trio.lowlevel.wait_readable(fd)
                        data = try_receive()
                else:
                    data = await src.receive_some(RECV_SIZE)
            except _STREAM_ERRORS:
                self.broke(i)
                return
            if not data:
                if truncated(src):
                    self.broke(i)
                    return
                self.ended[i] = True
                self._wake(i)
                try:
                    await self._eof(j)
                except _STREAM_ERRORS:
                    self.broke(j)
                    return
                self.open -= 1
                if not self.open:
                    self.scope.cancel()  # type: ignore[union-attr]  # (ends the watch)
                return
            self.last = clock()
            if i:
                done.received += len(data)
            else:
                done.sent += len(data)
            try:
                await dst.send_all(data)
            except _STREAM_ERRORS:
                self.broke(j)
                return
            self.last = clock()  # (a send that completed is activity too: a slow reader)

    def _wake(self, i: int) -> None:
        """Nothing of side ``i``'s waits to be read (or its end was read): a close_notify
        owed to it may go (``_eof``)."""
        quiet = self.quiet[i]
        if quiet is not None:
            self.quiet[i] = None
            quiet.set()

    async def _eof(self, j: int) -> None:
        """Pass a clean end on to side ``j``: a FIN, or a TLS close_notify. The close_notify
        is one ``SSL_shutdown``, which reads nothing (``TlsTransport.close_notify``); where
        that cannot be had, the stdlib's shutdown reads once after it sends, and application
        data found then breaks the connection (APPLICATION_DATA_AFTER_CLOSE_NOTIFY: the other
        side's bytes already on the wire were lost). For that fallback the close_notify goes
        when nothing of ``j``'s waits to be read: at once, or when the task reading ``j``
        next finds nothing (``quiet``), or once it read ``j``'s end."""
        dst = self.streams[j]
        if not isinstance(dst, TlsTransport):
            await dst.send_eof()  # type: ignore[attr-defined]
            return
        while True:
            if self.ended[j] or not readable_now(dst):
                if dst.close_notify():
                    return
                await trio.lowlevel.wait_writable(dst.wait_fd)  # (its socket was full)
            else:
                quiet = self.quiet[j] = trio.Event()
                await quiet.wait()


async def splice(a: trio.abc.Stream, a_head: bytes, b: trio.abc.Stream, b_head: bytes,
                 idle: float) -> Spliced:
    """Copy bytes both ways until both sides ended cleanly, either broke, or the connection
    carried no byte either way for ``idle`` seconds.

    ``a`` is the caller's side ("client"), ``b`` the upstream's; ``a_head``/``b_head`` are
    bytes already read from each side that belong to the other, sent first by the task of
    their direction (under the idle limit, as every other byte). A clean end of one side (a
    FIN, a close_notify) is passed on to the other (``send_eof``) and the other direction
    goes on; a truncation (a TLS EOF without close_notify), a reset or any I/O error resets
    both sides (SO_LINGER 0, no close_notify: ``sidecar.net.streams.abort``) and is named in
    the result (``Spliced.broken``: ``BROKEN_RECORD``); so does a cancellation (a retirement
    past its grace, the process stopping), which then goes on to the caller. Idleness is the connection's: one
    last-activity time both directions update (a clock read per chunk, no timer), watched
    by this task, which sleeps until the earliest moment the limit can be reached. After a
    clean end or an idle cut the caller closes both sides (FIN / close_notify).
    """
    st = _Splice(a, b)
    done = st.done
    try:
        async with trio.open_nursery() as nursery:
            st.scope = nursery.cancel_scope
            # (each direction's task sends its side's head first: under the watch below)
            nursery.start_soon(st.pipe, 0, a_head)
            nursery.start_soon(st.pipe, 1, b_head)
            clock = st.clock
            while True:
                due = st.last + idle
                if clock() >= due:
                    done.idle = True
                    nursery.cancel_scope.cancel()
                    break
                await trio.sleep_until(due)
    except BaseException:
        # Cut by the sidecar (a retirement past its grace, the process stopping; as a
        # group of Cancelled), or a failure: the stream did not end, so neither side may
        # read an end of data -- a reset, as for a truncation, tells both that bytes may
        # have been lost.
        abort(a)
        abort(b)
        raise
    if done.broken:
        abort(a)
        abort(b)
    return done


FLUSH_AT = 256 * 1024  # bytes queued before a flush while streaming a body
# 1xx heads an upstream may send before its final answer (Go's client allows 5): a flood of
# them would otherwise be relayed until the response timeout.
MAX_INFORMATIONAL = 10
# The methods sent once more on a fresh connection when a reused one closed before any
# answer byte: the safe ones (RFC 9110 9.2.1), as Go's and curl's clients do without an
# idempotency key. Anything else reaches the app at most once.
RETRY_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
# The writer of every body-less request: never written to (``frame`` refuses any bytes
# before it changes anything, ``end`` is b""), so one is shared.
_NO_BODY = BodyWriter(OUT_NONE)
# How the sending of a request body ended (``_send_body``): all of it went upstream; or the
# upstream answered (or closed) first and the rest was not sent, the caller's body having
# been read to its end, or not.
SENT, EARLY_READ, EARLY_UNREAD = 0, 1, 2
# How long, and how many bytes of its upload, a caller answered early may still send before
# its connection is closed (``sidecar.net.respond.linger``).
EARLY_LINGER_SECONDS = 2.0
EARLY_LINGER_BYTES = 64 * 1024 * 1024
# How often a caller waiting for its answer is looked at (``_caller_gone``): a caller that
# closed its connection is noticed within about this long, and its exchange ends.
CALLER_CHECK_SECONDS = 1.0


async def _answer_event(client: Endpoint, ep: Endpoint, timeout: float) -> object:
    """The upstream's next answer event (``ep.next_event``: what ``client`` has queued sent
    first, ``timeout`` the longest stall), its wait cut every ``CALLER_CHECK_SECONDS`` to see
    whether the caller is still there (``_caller_gone``): one that closed its connection
    while the answer's body stalled ends the exchange, as while its head is waited for
    (found by a hostile review, thirty-first session: an upstream that sent a head and part
    of a body, then stalled -- a stream, a report flushed early -- held a gone caller's
    connection slot until ``body_timeout``)."""
    deadline = ep.clock() + timeout
    if client.out:
        await client.flush(deadline)
    while True:
        step = min(deadline, ep.clock() + CALLER_CHECK_SECONDS)
        try:
            return await ep.next_event(step)
        except Timeout:
            if step >= deadline:
                raise
            if _caller_gone(client):
                raise PeerClosed("client_gone_mid_answer", "client") from None


def _caller_gone(client: Endpoint) -> bool:
    """The caller closed its connection (a FIN or a reset), checked without waiting and
    without taking a byte. On Linux a poll for ``POLLRDHUP``: a FIN is seen though bytes
    are still unread before it (under TLS the close_notify record a closing client sends
    first; a request pipelined just before the close). Elsewhere a peek at the socket, which
    sees the FIN only when nothing is unread before it. Nothing waiting, or bytes without an
    end behind them: still there."""
    sock = getattr(raw_socket(client.stream), "_sock", None)
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return False
    if _RDHUP:
        poller = _GONE_POLL
        poller.register(fd, _GONE_EVENTS)
        try:
            return bool(poller.poll(0))
        finally:
            poller.unregister(fd)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"")
    except (BlockingIOError, InterruptedError, ValueError):
        return False  # (ValueError: a stdlib TLS wrapper, which takes no flags)
    except OSError:
        return True  # (a reset)


_RDHUP: int = getattr(select, "POLLRDHUP", 0)
_GONE_POLL = select.poll()
_GONE_EVENTS = _RDHUP | select.POLLHUP | select.POLLERR


def _normalised(headers: Headers) -> Headers:
    """``headers`` with Content-Length in its canonical decimal form (``0003`` -> ``3``) and
    without Expect (never forwarded: the sidecar answers it itself, or -- on a request
    without a body, or an HTTP/1.0 one -- there is nothing to continue)."""
    out: Headers = []
    for name, value in headers:
        if name == b"content-length":
            value = b"%d" % int(value)
        elif name == b"expect":
            continue
        out.append((name, value))
    return out


def _content_length(headers: Headers) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return -1


async def forward(
    client: Endpoint,
    request: Request,
    headers: Headers,
    pool: UpstreamPool,
    limits: Limits,
    head: RequestHead,
    *,
    close: bool = False,
    opened: Callable[[], None] | None = None,
    body_check: BodyCheck | None = None,
) -> Exchange:
    """Send ``request`` (with ``headers`` already rewritten) upstream and relay the response.
    ``opened``: called once an authorised upgrade's 101 reached the caller (the stream's
    decision record is written then, not when it ends). ``body_check``: the body's
    method-override fields are read as it goes and judged at its end, before its last byte
    is sent (``sidecar.http.body_override``; its refusal is raised from here).

    ``head`` holds the checked facts (body, 100-continue, authorised upgrade: its headers are
    added here); ``close``: the sidecar is draining, this is the connection's last response.
    Whether the client allows another request comes from its reader. Raises ``UpstreamFailed``
    when the upstream fails before the response head was sent to the client,
    ``PeerClosed``/``Timeout`` (``side`` "client") when the client misbehaves,
    ``PayloadTooLarge`` when the body exceeds ``limits.max_body_bytes``.
    """
    ex = Exchange()
    has_body, expect_continue = head.has_body, head.expect_continue
    upgrade = head.upgrade is not None
    keep_alive = client.reader.keep_alive
    if head.normalise:  # (rare: a Content-Length with leading zeros, an Expect not answered)
        headers = _normalised(headers)
    if has_body and not pool.reuse_after_body:
        # The app's connection is never used again after a request with a body (below):
        # say so on the wire, so that an app that answers without reading the body stops
        # there instead of reading the body as its next request -- one the policy never
        # judged and the header filter never saw, run as coming from the mesh (found by a
        # hostile review, thirty-second session: ``GET /public`` with a body holding ``GET
        # /admin/...`` ran both on Python's http.server; closing after the answer was too
        # late). An HTTP/1.0 caller's body is forwarded so too. (An upgrade request with a
        # body never comes here: 400 ``upgrade_with_body``, sidecar.http.request.)
        headers.append((b"connection", b"close"))
    elif head.upgrade is not None:
        headers.append((b"upgrade", head.upgrade))
        headers.append((b"connection", b"upgrade"))
    if not has_body:
        # The end of a body-less request is already parsed; consume it (no I/O happens) so
        # the request can be replayed on a fresh connection if a pooled one turns out stale.
        # Straight from the reader, not through the endpoint's coroutine (1,500 instructions
        # less): its framing and ``has_body`` come from the same fields, so it is at END
        # and cannot raise.
        event = client.reader.next_event()
        if event is not END:
            raise PeerClosed("unexpected_body", "client")
        body = _NO_BODY
    else:
        if expect_continue:
            headers = [(n, v) for n, v in headers if n != b"expect"]  # answered by us
        length = _content_length(headers)
        if length >= 0:
            body = BodyWriter(OUT_LENGTH, length)
        else:
            # The caller's framing was chunked (hop-by-hop, stripped): re-frame as chunked.
            headers = headers + [(b"transfer-encoding", b"chunked")]
            body = BodyWriter(OUT_CHUNKED)
    wire_head = serialise_request_head(request.method, request.target, headers)
    http11 = request.version == b"1.1"
    # A request is sent again on a fresh connection only when it is safe to run twice and
    # the reused connection gave nothing back (``_retry``).
    attempts = 2 if not has_body and request.method in RETRY_METHODS else 1
    max_fields = 2 * limits.max_headers
    sent_before = 0
    upload: _Upload | None = None
    # Connection-oriented authentication (NTLM, Negotiate) authenticates the app's
    # connection, not the request: such a connection is this client's alone from here on.
    bound, solo = head.connection_auth, True
    for attempt in range(attempts):
        try:
            ep: Endpoint | None = None
            private = client.private
            if private is not None:  # (this client's own connection to the upstream)
                client.private = None
                if pool.reclaim(private):
                    ep, ex.reused, bound = private, True, True
                else:
                    await trio.aclose_forcefully(private.stream)
            if ep is None:
                # The connection released last, without a coroutine when it may be reused
                # as it is (nearly always on a busy keep-alive path); else the complete
                # acquire.
                ep = pool.take(upgrade)
                if ep is not None:
                    ex.reused = True
                else:
                    ep, ex.reused = await pool.acquire(upgrade)
        except RequestRefused as exc:
            raise UpstreamFailed(exc, ex) from exc
        except (OSError, trio.TooSlowError) as exc:
            raise UpstreamFailed(BadGateway("upstream_connect_failed", repr(exc)), ex) from exc
        received_before = ep.bytes_in
        try:
            ep.reader.expect_response(request.method, upgrade)
            ep.queue(wire_head)
            early = SENT
            if has_body:
                upload = _Upload(http11, max_fields)
                early = await _send_body(client, ep, body, limits, ex, expect_continue,
                                         upload, body_check)
            else:
                rest = ep.flush_now(timeout=limits.body_timeout)
                if rest is not None:
                    await rest
            # The response, relayed here rather than in a coroutine of its own: one
            # coroutine less per request, and one frame less at the wait for the answer.
            # (An answer that came before the caller's body was all read: the rest of that
            # body is still on the caller's connection, which ends after the answer.)
            keep = keep_alive and http11 and not close and early != EARLY_UNREAD
            if upload is None:
                informational, pending = 0, None
            else:  # (1xx heads relayed while the body went; a head read then, not relayed)
                informational, pending = upload.informational, upload.pending
            deadline = client.clock() + limits.response_timeout
            while True:
                # ``ep.next_event(deadline, flush_first=client)`` written out, its read
                # split at the wait (``Endpoint.receive_now``): this frame waits for the
                # upstream's answer itself, with no ``next_event`` / ``receive`` frames
                # below it to suspend and resume.
                if pending is None:
                    event = ep.event_now()
                else:
                    event, pending = pending, None
                while event is NEED_DATA:
                    if client.out:  # (a 1xx head relayed: it goes out before the wait)
                        await client.flush(deadline)
                    # The wait is cut every ``CALLER_CHECK_SECONDS`` to see whether the
                    # caller is still there (``_caller_gone``): one that closed its
                    # connection meanwhile -- its own timeout ran out -- ends the exchange
                    # (found by a hostile review: the request was waited for until the
                    # answer or ``response_timeout``, holding the caller's connection slot
                    # and an upstream connection, so an app whose client timeouts are
                    # shorter than a slow upstream filled ``max_connections_per_source``
                    # with connections it had closed and was refused).
                    wait_until = min(deadline, client.clock() + CALLER_CHECK_SECONDS)
                    try:
                        got: Any = ep.receive_now(wait_until)  # (bytes, None or a coroutine)
                        if got is None:
                            try:
                                await wait_readable(ep.wait_fd)
                            except BaseException as exc:  # noqa: BLE001 -- re-raised, mapped
                                raise ep.wait_failed(exc)  # noqa: B904 -- (its own cause)
                            got = ep.woke(wait_until)
                        if not isinstance(got, bytes):  # (the complete read)
                            got = await got
                    except Timeout:
                        if wait_until >= deadline:
                            raise
                        if _caller_gone(client):
                            raise PeerClosed("client_gone_before_answer", "client") from None
                        continue
                    ep.reader.feed(got)
                    event = ep.event_now()
                if type(event) is not Response:
                    raise PeerClosed("upstream_closed_before_response")
                status = event.status
                if len(event.headers) > max_fields:
                    raise ProtocolViolation("too_many_headers")
                if status >= 200:
                    break
                if status == 101:
                    if not upgrade or not _switches_to_requested(event.headers,
                                                                 head.upgrade):
                        raise ProtocolViolation("unrequested_101")
                    return await _upgraded(client, ep, event, limits, ex, opened)
                informational += 1
                _relay_informational(client, event, informational, http11)
            if status > 599:
                raise ProtocolViolation("bad_status")
            ex.status = status
            out = _response_headers(event.headers, ep.reader.connection_lists)
            if request.method == b"HEAD" or status == 204 or status == 304:
                answer = BodyWriter(OUT_NONE)
                if status == 204:  # (RFC 9110 8.6: never a Content-Length on a 204)
                    out = [f for f in out if f[0] != b"content-length"]
            else:
                # The reader's Content-Length: the one it checked (Connection never lists
                # it away: ``connection_tokens`` leaves out END_TO_END).
                length = ep.reader.content_length
                if length >= 0:
                    answer = BodyWriter(OUT_LENGTH, length)
                elif http11:
                    out.append((b"transfer-encoding", b"chunked"))
                    answer = BodyWriter(OUT_CHUNKED)
                else:
                    answer = BodyWriter(OUT_CLOSE)  # an HTTP/1.0 client: the close ends it
                    keep = False
            if not keep:
                out.append((b"connection", b"close"))
            ex.keep_alive = keep
            if (status == 401 or status == 407) and not bound \
                    and _challenges_connection_auth(event.headers):
                # (the head as the upstream sent it: Proxy-Authenticate is hop-by-hop.) A 401
                # goes on on this connection; after a 407 no client can go on (its challenge
                # is never relayed, Proxy-Authorization never forwarded), and the connection
                # holds the handshake's state: it is not reused at all.
                bound, solo = True, status == 401
            sent_before = client.bytes_out  # (a failure before the head left: still a 502)
            client.queue(serialise_response_head(status, event.reason, out))
            client.sent_head = True
            try:
                while True:
                    event = ep.event_now()  # (a small body and its end came with the head)
                    if event is NEED_DATA:
                        event = await _answer_event(client, ep, limits.body_timeout)
                    if type(event) is bytes:
                        ex.response_bytes += len(event)
                        for part in answer.frame(event):
                            client.queue(part)
                        if client.out_len >= FLUSH_AT:
                            await client.flush(timeout=limits.body_timeout)
                    elif event is END:
                        if ep.reader.framing == UNTIL_CLOSE and truncated(ep.stream):
                            raise PeerClosed("upstream_truncated")
                        client.queue(answer.end())
                        rest = client.flush_now(timeout=limits.body_timeout)
                        if rest is not None:
                            await rest
                        break
                    else:
                        raise PeerClosed("upstream_closed_mid_body")
            except ParseError as exc:
                raise ProtocolViolation(exc.reason) from exc
            if has_body and (early or status >= 400 or not pool.reuse_after_body):
                # Whatever the upstream did not read of the body would be the next request
                # it reads on this connection. So the connection is never reused when the
                # upstream answered before it had the whole request (``early``), nor after
                # an error answer to a body (the usual early refusal: 401, 403, 413), and
                # to the local app not after any answer to a body either -- nothing on the
                # wire says that an app read a body, which usually left with the head: an
                # app that answers 200 at once and parses on from where it stopped would
                # answer the body, a request the policy never saw, to the next caller whose
                # request this connection carried (found by a hostile review). To a peer
                # (outbound) it is kept: a peer sidecar reads every body it is sent, or
                # closes; a peer that is not a sidecar and left a body unread could only
                # answer the next request of the same local workload, the one caller of an
                # outbound listener, which could send that request itself; and closing
                # would cost a TLS handshake per request with a body.
                await trio.aclose_forcefully(ep.stream)
                if early == EARLY_UNREAD:
                    # The caller may still be sending its body, and a caller that reads
                    # only once it has sent everything would lose the answer to the reset
                    # a close with unread bytes makes: its upload is read and discarded
                    # (raw, never parsed) until it ends, for a bounded time and size.
                    await linger(client, EARLY_LINGER_SECONDS, EARLY_LINGER_BYTES)
            elif bound:
                # An app connection that carried NTLM or Negotiate authentication (a request
                # that sent it, or a 401/407 that asked for it) is authenticated as this
                # client: another caller's request on it would run as this one's user (found
                # by a hostile review: pooled, the next caller's request was answered as the
                # user the first one had authenticated). It is kept for this client's next
                # request only, as HAProxy and Envoy keep such connections private, and
                # closed when the client connection ends (``request_loop``).
                # (A declined upgrade on it too: whatever the app does with that connection
                # afterwards reaches this client only.) The pool sets it aside (``hold``): idle
                # there, it is swept as a pooled one is -- closed past its peer's trust, its
                # age or ``pool_idle_timeout``, and counted (found by a hostile review: kept
                # on the client endpoint alone, it outlived its peer's certificate or CA
                # until the client's next request or ``idle_timeout``).
                if not (solo and keep and pool.hold(ep, client)):
                    await trio.aclose_forcefully(ep.stream)
            elif upgrade:
                # An upgrade request the upstream declined (any final answer but 101): RFC
                # 9110 7.8 lets it go on with HTTP/1.1, but nothing on the wire says it did --
                # Node's http server hands the socket of every upgrade request to its
                # ``upgrade`` listener and never parses HTTP there again, whatever that
                # listener answers (found by a hostile review: pooled, the next caller's
                # request got no answer, a 504, or the declined stream's bytes as its
                # answer). Never pooled; a declined upgrade costs a new connection.
                await trio.aclose_forcefully(ep.stream)
            elif not pool.keep(ep):  # (``pool.release`` without a coroutine when kept)
                await trio.aclose_forcefully(ep.stream)
            return ex
        except (PeerClosed, Timeout) as exc:
            await trio.aclose_forcefully(ep.stream)
            if exc.side == "client":
                raise
            answered = client.sent_head
            if answered:
                if client.bytes_out != sent_before:
                    raise  # part of the answer went out: the client sees it cut short
                # The head is still queued, nothing reached the client: a 502 after all
                # (and no retry: the upstream answered this request).
                client.out = []
                client.out_len = 0
                client.sent_head = False
            if isinstance(exc, ProtocolViolation):
                raise UpstreamFailed(BadGateway("upstream_protocol_error", str(exc)), ex) \
                    from exc
            if (attempt + 1 < attempts and ex.reused and not answered
                    and exc.__class__ is PeerClosed and ep.bytes_in == received_before):
                # A keep-alive connection the upstream closed before any byte of an answer
                # (a 1xx included): stale, most likely; a safe request is sent once more on
                # a fresh one. Never after a timeout (the app may be working on it) or any
                # answer byte, and never a POST, PATCH, DELETE...: run twice, it charges
                # twice (found by a hostile review: a body-less POST reached the app twice).
                ex.request_bytes = 0
                continue
            if isinstance(exc, Timeout):
                raise UpstreamFailed(GatewayTimeout("upstream_timeout", str(exc)), ex) from exc
            raise UpstreamFailed(BadGateway("upstream_closed", str(exc)), ex) from exc
        except BaseException:
            await trio.aclose_forcefully(ep.stream)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


class _Upload:
    """What the upstream said while a request body was being sent (``_send_body``): the 1xx
    heads counted (and relayed), and the first other event read (a final head, the close),
    which the response loop takes first."""

    __slots__ = ("http11", "max_fields", "informational", "pending")

    def __init__(self, http11: bool, max_fields: int) -> None:
        self.http11 = http11  # the caller's version (1xx heads go only to HTTP/1.1)
        self.max_fields = max_fields
        self.informational = 0
        self.pending: object = None


def _relay_informational(client: Endpoint, event: Response, count: int, http11: bool) -> None:
    """Queue a 1xx head (the ``count``-th) for the caller: a ``100 Continue`` is dropped
    (the sidecar answers ``Expect`` itself and never forwards it, so the upstream's is
    not the caller's to see), the others (102, 103, unknown 1xx) go to an HTTP/1.1 caller
    without hop-by-hop fields and Content-Length; more than ``MAX_INFORMATIONAL`` is a
    ``ProtocolViolation``."""
    if count > MAX_INFORMATIONAL:
        raise ProtocolViolation("too_many_informational")
    if event.status != 100 and http11:
        client.queue(serialise_response_head(event.status, event.reason, [
            f for f in _response_headers(event.headers, True) if f[0] != b"content-length"]))


def _interim_only(client: Endpoint, ep: Endpoint, upload: _Upload) -> bool:
    """The upstream spoke while the body was being sent (``Endpoint.spoke``): parse what
    came. 1xx heads (but 101) are relayed (``_relay_informational``; queued, the caller
    sends them) and the body goes on: True, also while a head is still incomplete. A final
    head, the close: False (the body ends), the event kept in ``upload.pending``. A 101 is
    never a valid answer while a body is sent: ``ProtocolViolation`` (before the thirty-first
    session one to a request that asked to upgrade was spliced, the body's queued bytes
    dropped and its end never judged; found by a hostile review)."""
    while True:
        event = ep.event_now()
        if event is NEED_DATA:
            return True
        if type(event) is Response and event.status == 101:
            raise ProtocolViolation("switched_before_body_end")
        if type(event) is Response and event.status < 200:
            if len(event.headers) > upload.max_fields:
                raise ProtocolViolation("too_many_headers")
            upload.informational += 1
            _relay_informational(client, event, upload.informational, upload.http11)
            continue
        upload.pending = event
        return False


async def _send_body(client: Endpoint, ep: Endpoint, body: BodyWriter, limits: Limits,
                     ex: Exchange, expect_continue: bool, upload: _Upload,
                     check: BodyCheck | None = None) -> int:
    """Stream the caller's body upstream: ``SENT`` when all of it went; ``EARLY_READ`` /
    ``EARLY_UNREAD`` when the upstream answered or closed before it was all sent (the rest
    is then never sent; the caller's body was / was not read to its end).

    An upstream that answers before it has read the body (a 401, 403 or 413 as soon as
    the head arrived) and does not read the rest would read it as its next request: the
    bytes sent after its answer are the ones that can be stopped. So before a flush that
    follows one that already went (most bodies leave in one flush, with the head: no check
    at all), the upstream's socket is polled without waiting, and a send the socket cannot
    take at once also ends when the upstream becomes readable (``_send_unless_answered``).
    A send that fails because the upstream closed or reset ends the body the same way: its
    answer may be there to read. What it said is parsed (``_interim_only``): a 1xx head
    (100 Continue, 102, 103, an unknown 1xx) is no answer -- it is relayed as the response
    loop relays it, and the body goes on (found by a hostile review: any byte from the
    upstream ended the body, so an app that sent ``100 Continue`` or ``103 Early Hints``
    while it read the body got no more of it and the caller a 504).

    With a ``check`` (a POST form: ``sidecar.http.body_override``) every piece is read by
    it, and at the end ``check.finish()`` raises the refusal of an override method the
    policy does not allow before the app has the whole body (the caller gets the refusal,
    the app connection is closed): what is queued goes out only when the caller's bytes run
    dry (then more of the body is still to come) or when ``FLUSH_AT`` bytes are queued,
    which one read (``READ_SIZE``) never reaches, so the piece that ends the body is still
    queued when its end is read."""
    if expect_continue:
        client.queue(b"HTTP/1.1 100 Continue\r\n\r\n")
        await client.flush(timeout=limits.body_timeout)
    limit = limits.max_body_bytes
    while True:
        event = client.event_now()
        if event is NEED_DATA:
            if ep.out and not await _flush_body(client, ep, limits, upload):
                return EARLY_UNREAD
            event = await client.next_event(None, timeout=limits.body_timeout)
        if type(event) is bytes:
            ex.request_bytes += len(event)
            if limit and ex.request_bytes > limit:
                raise PayloadTooLarge("body_too_large")
            if check is not None:
                if check.stepped:
                    # An inflated body is read in bounded steps, the loop let run between
                    # them (a hostile review: a 43 KB gzip form took 5 s of CPU read in one
                    # call, every other caller of the sidecar waiting)
                    for _ in check.feed_steps(event):
                        await trio.lowlevel.checkpoint()
                else:
                    check.feed(event)
            try:
                for part in body.frame(event):
                    ep.queue(part)
            except ParseError as exc:  # more bytes than the length h11 checked: impossible
                raise PeerClosed("client_body_overrun", "client") from exc
            if ep.out_len >= FLUSH_AT and not await _flush_body(client, ep, limits, upload):
                return EARLY_UNREAD
        elif event is END:
            if check is not None:
                check.finish()  # (before the last piece, still queued, is sent)
            ep.queue(body.end())
            return SENT if await _flush_body(client, ep, limits, upload) else EARLY_READ
        else:
            raise PeerClosed("client_closed_mid_body", "client")


async def _flush_body(client: Endpoint, ep: Endpoint, limits: Limits,
                      upload: _Upload) -> bool:
    """Send what is queued for the upstream; False (and nothing more sent) when it has
    answered or closed meanwhile -- 1xx heads are no answer (``_interim_only``). Checked
    only once part of the request went (``bytes_out``: the pool zeroes it on release)."""
    if ep.bytes_out and ep.spoke():
        if not _interim_only(client, ep, upload):
            ep.out = []
            ep.out_len = 0
            return False
        if client.out:  # (1xx heads for the caller)
            await client.flush(timeout=limits.body_timeout)
    try:
        rest = ep.flush_now(timeout=limits.body_timeout)
    except PeerClosed:
        return False  # (closed or reset: what it answered first is still there to read)
    if rest is None:
        return True
    return await _send_unless_answered(client, ep, rest, limits, upload)


async def _send_unless_answered(client: Endpoint, ep: Endpoint,
                                rest: Coroutine[Any, Any, None], limits: Limits,
                                upload: _Upload) -> bool:
    """Await ``rest`` (a send the socket could not take at once) unless the upstream answers
    first (1xx heads are relayed meanwhile, ``_interim_only``): then the send is abandoned
    (the connection is never reused) and False returned; False also when the send fails on
    a closed connection. ``Timeout`` as the send's own bound says."""
    fd = ep.wait_fd
    if fd is None:  # (a stream without one: memory streams in tests)
        try:
            await rest
        except PeerClosed:
            return False
        return True
    spoke = False
    failed: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal spoke, failed
                try:
                    while True:
                        try:
                            await wait_readable(fd)
                        except (trio.BusyResourceError, trio.ClosedResourceError):
                            return  # (a TLS write waiting to read first: its own bound holds)
                        # (not a TLS record without data, a session ticket; not a 1xx head)
                        if ep.spoke():
                            if not _interim_only(client, ep, upload):
                                break
                            if client.out:
                                # (shielded: the send ending meanwhile cancels this task, and
                                # half a 1xx head on the caller's connection would corrupt it;
                                # the flush has its own bound)
                                with trio.CancelScope(shield=True):
                                    await client.flush(timeout=limits.body_timeout)
                except Exception as exc:  # noqa: BLE001 -- re-raised below, as itself
                    # A head the reader refuses, the eleventh 1xx, the caller gone while a
                    # 1xx is relayed: raised after the nursery, as itself -- not inside an
                    # exception group no caller catches (found by a hostile review: an
                    # internal error, no 502 and no audit record, while a large upload was
                    # blocked).
                    failed = exc
                    nursery.cancel_scope.cancel()
                    return
                spoke = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await rest
            except (PeerClosed, trio.BusyResourceError):
                spoke = True  # (closed or reset, or a TLS write that must read first)
            except Timeout as exc:
                failed = exc
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # An outer cancellation (a drain, a retirement) ends both tasks: it goes on as the
        # one ``Cancelled`` the callers expect, not as a group of two; any other exception
        # goes on as itself.
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            others = first.split(trio.Cancelled)[1]
            first = (others if others is not None else first).exceptions[0]
        raise first from None
    if failed is not None:
        raise failed
    return not spoke


_CHALLENGE = re.compile(rb"(?:^|,)[ \t]*([!#$%&'*+.^_`|~0-9A-Za-z-]+)")


def _challenges_connection_auth(headers: Headers) -> bool:
    """A 401/407 answer's WWW-Authenticate / Proxy-Authenticate fields offer a scheme of
    ``CONNECTION_AUTH_SCHEMES`` (a field may list several challenges)."""
    for name, value in headers:
        if name == b"www-authenticate" or name == b"proxy-authenticate":
            for scheme in _CHALLENGE.findall(value):
                if scheme.lower() in CONNECTION_AUTH_SCHEMES:
                    return True
    return False


def _protocols(value: bytes) -> list[bytes]:
    return [token.strip(b" \t").lower() for token in value.split(b",") if token.strip(b" \t")]


def _switches_to_requested(headers: Headers, requested: bytes | None) -> bool:
    """A 101's Upgrade field names protocols the request asked for, and at least one
    (RFC 9110 7.8: a server must not switch to a protocol the client did not indicate).
    Compared as case-folded list members; an HTTP/2 name was refused in the request."""
    offered = set(_protocols(requested or b""))
    chosen = [p for name, value in headers if name == b"upgrade" for p in _protocols(value)]
    return bool(chosen) and all(p in offered for p in chosen)


async def _upgraded(client: Endpoint, ep: Endpoint, event: Response, limits: Limits,
                    ex: Exchange, opened: Callable[[], None] | None = None) -> Exchange:
    """The upstream switched protocols (101) for an authorised upgrade: relay its head,
    then pipe bytes both ways (``splice``). A stream cut short raises ``PeerClosed`` (its
    side, the ``BROKEN_RECORD`` detail) once both sides were reset: recorded as an exchange
    that broke off."""
    # Hop-by-hop and Connection-listed fields never pass, as on any answer, but for the
    # Upgrade field itself; nor a framing field (a 101 has no body: what follows is the new
    # protocol).
    client.queue(serialise_response_head(
        101, event.reason,
        [f for f in event.headers if f[0] == b"upgrade"]
        + [f for f in _response_headers(event.headers, True)
           if f[0] != b"content-length"]
        + [(b"connection", b"upgrade")]))
    await client.flush(timeout=limits.body_timeout)
    ex.status, ex.upgraded = 101, True
    client.sent_head = True
    if opened is not None:
        opened()
    done = await splice(client.stream, client.reader.trailing(), ep.stream,
                        ep.reader.trailing(), limits.tcp_idle_timeout)
    ex.request_bytes += done.sent
    ex.response_bytes += done.received
    if done.idle:
        ex.error = IDLE_TIMEOUT
    if done.broken:  # (both sides reset: recorded as an exchange cut short, its detail)
        raise PeerClosed(done.broken, done.side, ex.request_bytes, ex.response_bytes)
    await close_quietly(ep.stream)
    return ex

