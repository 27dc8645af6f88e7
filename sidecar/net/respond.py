"""Generic error replies: a status, a fixed body, a request id -- never a reason."""

from __future__ import annotations

import h11
import trio

from sidecar.errors import RequestRefused, generic_body
from sidecar.net.streams import H11Endpoint, PeerClosed, Timeout, raw_socket

REPLY_TIMEOUT = 5.0
LINGER_SECONDS = 0.5


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
        ep.queue(h11.Response(status_code=status, headers=headers))
        ep.queue(h11.Data(data=body))
        ep.queue(h11.EndOfMessage())
        await ep.flush(deadline)
        if _input_pending(ep):
            await _linger(ep)
    except (PeerClosed, Timeout, h11.LocalProtocolError):
        pass


def _input_pending(ep: H11Endpoint) -> bool:
    """Might the client still be sending (a body, pipelined requests, garbage)?

    A refused body-less request has nothing more to read once its end is parsed; only then
    can the connection close at once without risking a reset that eats the reply.
    """
    conn = ep.conn
    if conn.their_state is h11.SEND_BODY:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return True
        if type(event) is not h11.EndOfMessage:
            return True
    if conn.their_state is not h11.DONE:
        return True
    return bool(conn.trailing_data[0])


async def _linger(ep: H11Endpoint) -> None:
    # Closing a socket with unread input makes the kernel send RST, and the client may then
    # lose the reply it has not read yet. Say we are done (FIN, or TLS close_notify), then
    # read and discard raw bytes briefly, bounded in time and bytes, until the client closes.
    # Nothing read here is ever decrypted, parsed or forwarded.
    send_eof = getattr(ep.stream, "send_eof", None)
    if send_eof is not None:
        try:
            await send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
    sock = raw_socket(ep.stream)
    if sock is None:
        return
    budget = 256 * 1024
    with trio.move_on_after(LINGER_SECONDS):
        while budget > 0:
            try:
                data = await sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            budget -= len(data)
