"""Generic error replies: a status, a fixed body, a request id -- never a reason."""

from __future__ import annotations

import h11
import trio

from sidecar.errors import RequestRefused, generic_body
from sidecar.net.streams import H11Endpoint, PeerClosed, Timeout

REPLY_TIMEOUT = 5.0


async def send_refusal(ep: H11Endpoint, refusal: RequestRefused, request_id: str,
                       verdict: object | None) -> None:
    """Answer with a generic error and ``Connection: close`` if a response can still be sent."""
    conn = ep.conn
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = refusal.status
    body = (generic_body(status) + f" (request id {request_id})\n").encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
    ]
    extra = getattr(verdict, "response_headers", None)
    if extra:
        headers.extend(extra)
    deadline = trio.current_time() + REPLY_TIMEOUT
    try:
        if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
            conn = None  # h11 cannot answer now; send a raw response
            raw = b"HTTP/1.1 %d %s\r\n" % (status, generic_body(status).encode())
            raw += b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + body
            await ep.send_raw(raw, deadline)
            return
        await ep.send(h11.Response(status_code=status, headers=headers), deadline)
        await ep.send(h11.Data(data=body), deadline)
        await ep.send(h11.EndOfMessage(), deadline)
        await _linger(ep)
    except (PeerClosed, Timeout, h11.LocalProtocolError):
        pass


async def _linger(ep: H11Endpoint) -> None:
    # Closing a socket with unread input makes the kernel send RST, and the client may then
    # lose the reply it has not read yet. Read and discard briefly (bounded in time and
    # bytes) so the refusal arrives; nothing read here is ever parsed or forwarded.
    budget = 256 * 1024
    deadline = trio.current_time() + 0.5
    while budget > 0:
        try:
            data = await ep.receive(deadline)
        except (PeerClosed, Timeout):
            return
        if not data:
            return
        budget -= len(data)
