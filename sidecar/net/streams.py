"""h11 <-> Trio stream adapter with deadlines, and the mapping of I/O errors.

Theory of operation: every read goes through ``H11Endpoint.next_event`` with an absolute
deadline, so each wait in the data path has a bound. Errors from trio, ssl and h11 are mapped
at this edge into ``sidecar.errors`` (a table in ``map_error``), so the layers above see
only our small hierarchy.
"""

from __future__ import annotations

import socket
import ssl

import h11
import trio

from sidecar.errors import BadRequest, HeadersTooLarge, RequestRefused

READ_SIZE = 65536
FAST_OPS_PER_CHECKPOINT = 8


class PeerClosed(Exception):
    """The other end went away (EOF, reset, TLS error) -- nothing to answer.

    ``side`` says which end: "client" (whoever sent us the request) or "upstream".
    """

    def __init__(self, reason: str, side: str = "upstream") -> None:
        super().__init__(reason)
        self.side = side


class Timeout(Exception):
    """A bounded wait ran out (``side`` as for ``PeerClosed``)."""

    def __init__(self, reason: str, side: str = "upstream") -> None:
        super().__init__(reason)
        self.side = side


_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


class H11Endpoint:
    """One HTTP/1.1 connection: a Trio stream plus an h11 state machine.

    Writes are coalesced: ``queue`` serialises an event into a buffer and ``flush`` sends
    the buffer in one call. A response head, its body and its end usually leave in one TLS
    record and one syscall instead of three. ``next_event(..., flush_first=other)`` flushes
    the *other* endpoint before it blocks on a read, so streaming never stalls on a buffer.
    """

    __slots__ = ("stream", "conn", "bytes_in", "bytes_out", "side", "out", "out_len", "fast",
                 "max_head")

    def __init__(self, stream: trio.abc.Stream, role: type[h11.CLIENT] | type[h11.SERVER],
                 max_head: int = 32 * 1024, side: str = "upstream") -> None:
        self.stream = stream
        self.conn = h11.Connection(role, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.bytes_in = 0
        self.bytes_out = 0
        self.side = side
        self.out: list[bytes] = []
        self.out_len = 0
        self.fast = 0

    async def next_event(self, deadline: float,
                         flush_first: H11Endpoint | None = None) -> h11.Event | type[h11.PAUSED]:
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                hint = exc.error_status_hint
                if hint == 431:
                    raise HeadersTooLarge("header_too_large", str(exc)) from exc
                raise BadRequest("malformed_http", str(exc)) from exc
            if event is not h11.NEED_DATA:
                if type(event) is h11.Request and _head_size(event) > self.max_head:
                    # h11 bounds only a head still incomplete: one that arrived whole in a
                    # single read could be larger than the limit. Enforce it exactly.
                    raise HeadersTooLarge("header_too_large", "request head over the limit")
                return event
            if flush_first is not None and flush_first.out:
                await flush_first.flush(deadline)
            conn.receive_data(await self.receive(deadline))

    async def receive(self, deadline: float) -> bytes:
        stream = self.stream
        try_receive = getattr(stream, "try_receive", None)
        if try_receive is not None:
            try:
                data = try_receive()
            except _IO_ERRORS as exc:
                raise PeerClosed(type(exc).__name__, self.side) from exc
            if data is not None:
                self.bytes_in += len(data)
                self.fast += 1
                if self.fast >= FAST_OPS_PER_CHECKPOINT:
                    # Fast paths do not yield; a stream that always has data must still let
                    # every other connection (and cancellation) run now and then.
                    self.fast = 0
                    await trio.lowlevel.checkpoint()
                return data
        try:
            with trio.move_on_at(deadline) as scope:
                data = await self.stream.receive_some(READ_SIZE)
        except _IO_ERRORS as exc:
            raise PeerClosed(type(exc).__name__, self.side) from exc
        if scope.cancelled_caught:
            raise Timeout("read", self.side)
        self.bytes_in += len(data)
        return data

    def queue(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.out.append(data)
            self.out_len += len(data)

    async def flush(self, deadline: float) -> None:
        out = self.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        self.out = []
        self.out_len = 0
        await self.send_raw(data, deadline)

    async def send(self, event: h11.Event, deadline: float) -> None:
        self.queue(event)
        await self.flush(deadline)

    async def send_raw(self, data: bytes, deadline: float) -> None:
        stream = self.stream
        try_send = getattr(stream, "try_send", None)
        if try_send is not None:
            try:
                rest = try_send(data)
            except _IO_ERRORS as exc:
                raise PeerClosed(type(exc).__name__, self.side) from exc
            if not rest:
                self.bytes_out += len(data)
                return
            send = stream.send_wire
            pending = rest
        else:
            send = stream.send_all
            pending = data
        try:
            with trio.move_on_at(deadline) as scope:
                await send(pending)
        except _IO_ERRORS as exc:
            raise PeerClosed(type(exc).__name__, self.side) from exc
        if scope.cancelled_caught:
            raise Timeout("write", self.side)
        self.bytes_out += len(data)

    async def aclose(self) -> None:
        await close_quietly(self.stream)


def _head_size(request: h11.Request) -> int:
    return len(request.method) + len(request.target) + sum(
        len(n) + len(v) + 4 for n, v in request.headers.raw_items())


async def close_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close without raising and without waiting long (a TLS close_notify may block)."""
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError,
                trio.TooSlowError):
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)


def raw_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under a (possibly TLS-wrapped) Trio stream."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        return sock
    inner = getattr(stream, "transport_stream", stream)
    return getattr(inner, "socket", None)


def looks_alive(stream: trio.abc.Stream) -> bool:
    """A pooled idle connection is reusable if nothing is waiting on its socket.

    Idle upstream connections must have nothing to read: pending bytes mean EOF, a TLS
    close_notify or garbage, and in every case the connection must not be reused.
    """
    sock = raw_socket(stream)
    # Trio's socket methods are async; a non-blocking peek needs the stdlib socket inside.
    sock = getattr(sock, "_sock", None)
    if sock is None:
        return False
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # EOF (b"") or unexpected bytes: either way not reusable


def error_for(exc: BaseException) -> RequestRefused:
    """Map an unexpected I/O error to what a client may see."""
    if isinstance(exc, RequestRefused):
        return exc
    return RequestRefused("internal", repr(exc), status=502)
