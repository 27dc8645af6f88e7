"""Forward one authorised HTTP/1.1 request to an upstream and stream the answer back.

Theory of operation: the client side is an h11 SERVER endpoint whose request head has been
read and authorised; the upstream side is an h11 CLIENT endpoint from a pool. Bodies are
streamed chunk by chunk in both directions (memory stays flat whatever the size); h11
re-frames each message, so what reaches either side is always well-formed HTTP/1.1 whatever
framing the sender used. The exchange is sequential -- request body, then response -- which
is what HTTP/1.1 clients do; an ``Expect: 100-continue`` is answered by the sidecar itself
once the request was authorised (as Envoy does), and the header is not forwarded.

An authorised ``Upgrade`` request whose upstream answers ``101`` becomes a byte pipe in both
directions. Any failure before the response head reached the client becomes a generic 502/
504; after that point the only honest signal left is to close the client connection.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11
import trio

from sidecar.config.model import Limits
from sidecar.errors import BadGateway, GatewayTimeout, PayloadTooLarge, RequestRefused
from sidecar.http.headers import HOP_BY_HOP, connection_tokens
from sidecar.net.pool import UpstreamPool
from sidecar.net.streams import H11Endpoint, PeerClosed, Timeout, close_quietly


@dataclass(slots=True)
class Exchange:
    """What happened to one forwarded request (for audit, metrics and logs)."""

    status: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    upgraded: bool = False
    response_started: bool = False  # the response head went to the client
    reused: bool = False


class UpstreamFailed(Exception):
    """The upstream failed; ``refusal`` is what the client gets if nothing was sent yet."""

    def __init__(self, refusal: RequestRefused, exchange: Exchange) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal
        self.exchange = exchange


def _response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    hop = connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in hop]


async def _pipe(src: trio.abc.Stream, dst: trio.abc.Stream, idle: float,
                counter: list[int], index: int) -> None:
    try:
        while True:
            with trio.move_on_after(idle) as scope:
                data = await src.receive_some(65536)
            if scope.cancelled_caught or not data:
                break
            counter[index] += len(data)
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:  # noqa: BLE001 -- ssl errors and friends end the pipe, never the process
        pass


async def splice(a: trio.abc.Stream, a_head: bytes, b: trio.abc.Stream, b_head: bytes,
                 idle: float) -> tuple[int, int]:
    """Copy bytes both ways until either side closes or is idle for ``idle`` seconds.

    Returns (bytes a->b, bytes b->a). ``a_head``/``b_head`` are bytes already read from
    each side that belong to the other.
    """
    counter = [0, 0]
    try:
        if a_head:
            await b.send_all(a_head)
            counter[0] += len(a_head)
        if b_head:
            await a.send_all(b_head)
            counter[1] += len(b_head)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return counter[0], counter[1]
    async with trio.open_nursery() as nursery:
        async def one_way(src: trio.abc.Stream, dst: trio.abc.Stream, i: int) -> None:
            await _pipe(src, dst, idle, counter, i)
            nursery.cancel_scope.cancel()

        nursery.start_soon(one_way, a, b, 0)
        nursery.start_soon(one_way, b, a, 1)
    return counter[0], counter[1]


async def forward(
    client: H11Endpoint,
    request: h11.Request,
    headers: list[tuple[bytes, bytes]],
    pool: UpstreamPool,
    limits: Limits,
    *,
    has_body: bool,
    expect_continue: bool,
    upgrade: bool,
    close: bool = False,
) -> Exchange:
    """Send ``request`` (with ``headers`` already rewritten) upstream and relay the response.

    Raises ``UpstreamFailed`` when the upstream fails before the response head was sent to
    the client, ``PeerClosed``/``Timeout`` when the client misbehaves, ``PayloadTooLarge``
    when the body exceeds ``limits.max_body_bytes``.
    """
    ex = Exchange()
    if not has_body:
        # The end of a body-less request is already parsed; consume it (no I/O happens) so
        # the request can be replayed on a fresh connection if a pooled one turns out stale.
        event = await _client_event(client, trio.current_time() + limits.body_timeout)
        if type(event) is not h11.EndOfMessage:
            raise _client_side(PeerClosed("unexpected_body"))
    attempts = 1 if has_body else 2
    for attempt in range(attempts):
        try:
            ep, ex.reused = await pool.acquire()
        except RequestRefused as exc:
            raise UpstreamFailed(exc, ex) from exc
        except (OSError, trio.TooSlowError) as exc:
            raise UpstreamFailed(BadGateway("upstream_connect_failed", repr(exc)), ex) from exc
        try:
            await _send_request(client, ep, request, headers, limits, ex, expect_continue)
            return await _relay_response(client, ep, pool, limits, ex, upgrade, close)
        except (PeerClosed, Timeout) as exc:
            # Which side failed? A client error surfaces from client reads/writes; those
            # are re-raised as-is by the helpers below (tagged), upstream ones are mapped.
            await close_quietly(ep.stream)
            if getattr(exc, "side", "upstream") == "client":
                raise
            if ex.reused and attempt + 1 < attempts and not ex.response_started:
                continue  # a stale keep-alive connection: retry once on a fresh one
            if ex.response_started:
                raise
            if isinstance(exc, Timeout):
                raise UpstreamFailed(GatewayTimeout("upstream_timeout", str(exc)), ex) from exc
            raise UpstreamFailed(BadGateway("upstream_closed", str(exc)), ex) from exc
        except h11.RemoteProtocolError as exc:
            await close_quietly(ep.stream)
            if ex.response_started:
                raise PeerClosed("upstream_protocol_error") from exc
            raise UpstreamFailed(BadGateway("upstream_protocol_error", str(exc)), ex) from exc
        except BaseException:
            await close_quietly(ep.stream)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _client_side(exc: PeerClosed | Timeout) -> PeerClosed | Timeout:
    exc.side = "client"  # type: ignore[union-attr]
    return exc


async def _client_event(client: H11Endpoint, deadline: float) -> object:
    try:
        return await client.next_event(deadline)
    except (PeerClosed, Timeout) as exc:
        raise _client_side(exc) from None


async def _client_send(client: H11Endpoint, event: h11.Event, deadline: float) -> None:
    try:
        await client.send(event, deadline)
    except (PeerClosed, Timeout) as exc:
        raise _client_side(exc) from None


async def _send_request(client: H11Endpoint, ep: H11Endpoint, request: h11.Request,
                        headers: list[tuple[bytes, bytes]], limits: Limits, ex: Exchange,
                        expect_continue: bool) -> None:
    now = trio.current_time
    if client.conn.their_state is h11.SEND_BODY and not any(
            n == b"content-length" for n, _ in headers):
        # The caller's framing was chunked (hop-by-hop, stripped); h11 needs to be told to
        # re-frame the body as chunked, or it would treat the request as body-less.
        headers = headers + [(b"transfer-encoding", b"chunked")]
    await ep.send(h11.Request(method=request.method, target=request.target, headers=headers,
                              http_version="1.1"), now() + limits.body_timeout)
    if client.conn.their_state is not h11.SEND_BODY:
        await ep.send(h11.EndOfMessage(), now() + limits.body_timeout)
        return
    if expect_continue:
        await _client_send(client, h11.InformationalResponse(status_code=100, headers=[]),
                           now() + limits.body_timeout)
    limit = limits.max_body_bytes
    while True:
        event = await _client_event(client, now() + limits.body_timeout)
        if type(event) is h11.Data:
            ex.request_bytes += len(event.data)
            if limit and ex.request_bytes > limit:
                raise PayloadTooLarge("body_too_large")
            await ep.send(event, now() + limits.body_timeout)
        elif type(event) is h11.EndOfMessage:
            await ep.send(h11.EndOfMessage(), now() + limits.body_timeout)
            return
        else:
            raise _client_side(PeerClosed("client_closed_mid_body"))


async def _relay_response(client: H11Endpoint, ep: H11Endpoint, pool: UpstreamPool,
                          limits: Limits, ex: Exchange, upgrade: bool, close: bool) -> Exchange:
    now = trio.current_time
    deadline = now() + limits.response_timeout
    while True:
        event = await ep.next_event(deadline)
        etype = type(event)
        if etype is h11.InformationalResponse:
            if event.status_code == 101 and upgrade:
                await _client_send(client, h11.InformationalResponse(
                    status_code=101, headers=[(n, v) for n, v in event.headers
                                              if n not in (b"connection",) and n not in
                                              (b"keep-alive", b"transfer-encoding")]
                    + [(b"connection", b"upgrade")]), now() + limits.body_timeout)
                ex.status, ex.upgraded, ex.response_started = 101, True, True
                a_head = client.conn.trailing_data[0]
                b_head = ep.conn.trailing_data[0]
                up, down = await splice(client.stream, a_head, ep.stream, b_head,
                                        limits.tcp_idle_timeout)
                ex.request_bytes += up
                ex.response_bytes += down
                await close_quietly(ep.stream)
                return ex
            if event.status_code in (100, 101):
                continue  # 100 was answered by us already; an unasked-for 101 is dropped
            await _client_send(client, h11.InformationalResponse(
                status_code=event.status_code, headers=_response_headers(event.headers)),
                now() + limits.body_timeout)
            continue
        if etype is h11.Response:
            ex.status = event.status_code
            out_headers = _response_headers(event.headers)
            if close:
                out_headers.append((b"connection", b"close"))  # draining: last response
            await _client_send(client, h11.Response(
                status_code=event.status_code, headers=out_headers,
                reason=event.reason), now() + limits.body_timeout)
            ex.response_started = True
            break
        raise PeerClosed("upstream_closed_before_response")
    while True:
        event = await ep.next_event(now() + limits.body_timeout)
        etype = type(event)
        if etype is h11.Data:
            ex.response_bytes += len(event.data)
            await _client_send(client, event, now() + limits.body_timeout)
        elif etype is h11.EndOfMessage:
            await _client_send(client, h11.EndOfMessage(), now() + limits.body_timeout)
            break
        else:
            raise PeerClosed("upstream_closed_mid_body")
    await pool.release(ep)
    return ex
