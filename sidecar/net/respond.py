"""Generic error replies: a status, a fixed body, a request id -- never a reason."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from sidecar.errors import RequestRefused, generic_body, reason_phrase
from sidecar.http.wire import serialise_response_head
from sidecar.net.streams import Endpoint, PeerClosed, Timeout, raw_socket

if TYPE_CHECKING:
    from sidecar.gate import Verdict

REPLY_TIMEOUT = 5.0
LINGER_SECONDS = 0.5
LINGER_BYTES = 256 * 1024


async def send_refusal(ep: Endpoint, refusal: RequestRefused, request_id: str,
                       verdict: Verdict | None, *, head: bool = False) -> None:
    """Answer with a generic error and ``Connection: close`` if a response can still be sent.
    ``head``: the request was a HEAD, whose answer has no content (RFC 9110 9.3.2): the
    head says the length the body would have, and no body follows (before, the body was
    sent, and a client reading pipelined answers took it for the start of the next one)."""
    if ep.sent_head:
        return  # the response already started: closing the connection is all that is left
    status = refusal.status
    body = (generic_body(status) + f" (request id {request_id})\n").encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
    ]
    if verdict is not None:
        headers.extend(verdict.response_headers)
    ep.sent_head = True
    ep.queue(serialise_response_head(status, reason_phrase(status).encode(), headers)
             + (b"" if head else body))
    try:
        await ep.flush(trio.current_time() + REPLY_TIMEOUT)
        if not ep.reader.at_rest():
            # The client might still be sending (a body, pipelined requests, garbage).
            await linger(ep)
    except (PeerClosed, Timeout):
        pass


async def linger(ep: Endpoint, seconds: float = LINGER_SECONDS,
                 budget: int = LINGER_BYTES) -> None:
    """Say we are done, then read and discard what the client still sends, for at most
    ``seconds`` and ``budget`` bytes (below)."""
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
    fd = sock.fileno()
    if fd < 0:
        return
    with trio.move_on_after(seconds):
        while budget > 0:
            # The file descriptor is read directly (under TLS too): raw bytes, never
            # decrypted by the TLS layer.
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            budget -= len(data)
