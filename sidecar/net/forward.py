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
from sidecar.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestRefused,
)
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


FLUSH_AT = 256 * 1024  # bytes queued before a flush while streaming a body


def _parsed_request(request: h11.Request, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    # Everything here was validated by h11 when it was parsed, or set by the sidecar from
    # verified values; ``_parsed=True`` skips h11's second validation pass (framing checks
    # still run). The target may be rebuilt by the caller, so it is passed through as is.
    return h11.Request(method=request.method, target=request.target, headers=headers,
                       http_version=b"1.1", _parsed=True)


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
    the client, ``PeerClosed``/``Timeout`` (``side`` "client") when the client misbehaves,
    ``PayloadTooLarge`` when the body exceeds ``limits.max_body_bytes``.
    """
    ex = Exchange()
    if not has_body:
        # The end of a body-less request is already parsed; consume it (no I/O happens) so
        # the request can be replayed on a fresh connection if a pooled one turns out stale.
        event = await client.next_event(trio.current_time() + limits.body_timeout)
        if type(event) is not h11.EndOfMessage:
            raise PeerClosed("unexpected_body", "client")
    elif not any(n == b"content-length" for n, _ in headers):
        # The caller's framing was chunked (hop-by-hop, stripped); tell h11 to re-frame the
        # body as chunked, or it would treat the request as body-less.
        headers = headers + [(b"transfer-encoding", b"chunked")]
    head = _parsed_request(request, headers)
    attempts = 1 if has_body else 2
    for attempt in range(attempts):
        try:
            ep, ex.reused = await pool.acquire()
        except RequestRefused as exc:
            raise UpstreamFailed(exc, ex) from exc
        except (OSError, trio.TooSlowError) as exc:
            raise UpstreamFailed(BadGateway("upstream_connect_failed", repr(exc)), ex) from exc
        try:
            await _send_request(client, ep, head, limits, ex, expect_continue, has_body)
            return await _relay_response(client, ep, pool, limits, ex, upgrade, close)
        except (PeerClosed, Timeout) as exc:
            await trio.aclose_forcefully(ep.stream)
            if exc.side == "client" or ex.response_started:
                raise
            if ex.reused and attempt + 1 < attempts:
                continue  # a stale keep-alive connection: retry once on a fresh one
            if isinstance(exc, Timeout):
                raise UpstreamFailed(GatewayTimeout("upstream_timeout", str(exc)), ex) from exc
            raise UpstreamFailed(BadGateway("upstream_closed", str(exc)), ex) from exc
        except h11.RemoteProtocolError as exc:
            await trio.aclose_forcefully(ep.stream)
            if ex.response_started:
                raise PeerClosed("upstream_protocol_error") from exc
            raise UpstreamFailed(BadGateway("upstream_protocol_error", str(exc)), ex) from exc
        except (BadRequest, HeadersTooLarge) as exc:
            # The upstream's answer did not parse: that is a bad gateway, not a bad request.
            await trio.aclose_forcefully(ep.stream)
            if client.conn.their_state is h11.ERROR:
                raise  # no: the client's own body framing was broken -- its 400
            if ex.response_started:
                raise PeerClosed("upstream_protocol_error") from exc
            raise UpstreamFailed(BadGateway("upstream_protocol_error", str(exc)), ex) from exc
        except BaseException:
            await trio.aclose_forcefully(ep.stream)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _send_request(client: H11Endpoint, ep: H11Endpoint, head: h11.Request,
                        limits: Limits, ex: Exchange, expect_continue: bool,
                        has_body: bool) -> None:
    now = trio.current_time
    ep.queue(head)
    if not has_body:
        ep.queue(h11.EndOfMessage())
        await ep.flush(now() + limits.body_timeout)
        return
    if expect_continue:
        client.queue(h11.InformationalResponse(status_code=100, headers=[]))
        await client.flush(now() + limits.body_timeout)
    limit = limits.max_body_bytes
    while True:
        event = await client.next_event(now() + limits.body_timeout, flush_first=ep)
        etype = type(event)
        if etype is h11.Data:
            ex.request_bytes += len(event.data)
            if limit and ex.request_bytes > limit:
                raise PayloadTooLarge("body_too_large")
            ep.queue(event)
            if ep.out_len >= FLUSH_AT:
                await ep.flush(now() + limits.body_timeout)
        elif etype is h11.EndOfMessage:
            ep.queue(h11.EndOfMessage())
            await ep.flush(now() + limits.body_timeout)
            return
        else:
            raise PeerClosed("client_closed_mid_body", "client")


async def _relay_response(client: H11Endpoint, ep: H11Endpoint, pool: UpstreamPool,
                          limits: Limits, ex: Exchange, upgrade: bool, close: bool) -> Exchange:
    now = trio.current_time
    deadline = now() + limits.response_timeout
    while True:
        event = await ep.next_event(deadline, flush_first=client)
        etype = type(event)
        if etype is h11.InformationalResponse:
            if event.status_code == 101 and upgrade:
                client.queue(h11.InformationalResponse(
                    status_code=101, headers=[(n, v) for n, v in event.headers
                                              if n not in _UPGRADE_DROP]
                    + [(b"connection", b"upgrade")]))
                await client.flush(now() + limits.body_timeout)
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
            client.queue(h11.InformationalResponse(
                status_code=event.status_code, headers=_response_headers(event.headers),
                _parsed=True))
            continue
        if etype is h11.Response:
            ex.status = event.status_code
            out_headers = _response_headers(event.headers)
            if close:
                out_headers.append((b"connection", b"close"))  # draining: last response
            client.queue(h11.Response(status_code=event.status_code, headers=out_headers,
                                      reason=event.reason, _parsed=True))
            ex.response_started = True
            break
        raise PeerClosed("upstream_closed_before_response")
    while True:
        event = await ep.next_event(now() + limits.body_timeout, flush_first=client)
        etype = type(event)
        if etype is h11.Data:
            ex.response_bytes += len(event.data)
            client.queue(event)
            if client.out_len >= FLUSH_AT:
                await client.flush(now() + limits.body_timeout)
        elif etype is h11.EndOfMessage:
            client.queue(h11.EndOfMessage())
            await client.flush(now() + limits.body_timeout)
            break
        else:
            raise PeerClosed("upstream_closed_mid_body")
    await pool.release(ep)
    return ex


_UPGRADE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding"})
