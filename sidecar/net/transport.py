"""Lean byte streams for the data path: plain TCP and TLS over a Trio socket.

Theory of operation: ``trio.SocketStream`` and ``trio.SSLStream`` are general-purpose and
careful, and on a proxy that does four reads and four writes per request their bookkeeping
(conflict detectors, state machine checks, handshake events, nested retries) costs a large
share of the CPU. These two classes do only what the sidecar needs:

* ``SocketTransport``: ``receive_some``/``send_all`` straight on the Trio socket.
* ``TlsTransport``: an ``ssl.SSLObject`` over two memory BIOs on a Trio socket. Reads try
  the already-decrypted buffer first and touch the socket only on ``SSLWantReadError``;
  writes encrypt and send in one call. A lock orders writes to the socket, because TLS 1.3
  can produce records on the read path (KeyUpdate answers) while a splice task writes.
  Renegotiation is disabled in every context the sidecar builds (TLS 1.3 has none), so a
  write never needs to wait for a read.

Errors: anything the socket or OpenSSL raises becomes ``trio.BrokenResourceError`` (with
the cause chained); a TCP EOF, with or without a TLS close_notify, reads as ``b""``, like
``SSLStream(https_compatible=True)``: HTTP framing, not TLS, says whether a message ended.
"""

from __future__ import annotations

import socket
import ssl

import trio

RECV_SIZE = 65536


def _stdlib_socket(sock: trio.socket.SocketType) -> socket.socket:
    # Trio's socket wraps a non-blocking stdlib socket; calling it directly is the fast path
    # for I/O that can complete at once (most of it on a proxy), with no cancel scope and no
    # scheduler round trip. Anything that would block goes through Trio as usual.
    return sock._sock  # type: ignore[attr-defined,no-any-return]


async def _send_all(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    total = len(view)
    sent = await sock.send(view)
    while sent < total:
        sent += await sock.send(view[sent:])


class SocketTransport(trio.abc.HalfCloseableStream):
    """Plain TCP on a Trio socket."""

    __slots__ = ("socket", "_raw", "_closed")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock
        self._raw = _stdlib_socket(sock)
        self._closed = False

    def try_receive(self) -> bytes | None:
        """Bytes already waiting on the socket, b"" at EOF, or None if it would block."""
        try:
            return self._raw.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    def try_send(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """Send what the socket takes now; return the wire bytes still to send."""
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            return data
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        return memoryview(data)[sent:] if sent < len(data) else b""

    async def receive_wait(self) -> bytes:
        """Wait for bytes after ``try_receive`` found none (no second failed recv)."""
        raw = self._raw
        while True:
            if self._closed:
                raise trio.ClosedResourceError
            await trio.lowlevel.wait_readable(raw)
            try:
                return raw.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    async def send_wire(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError
        try:
            return await self.socket.recv(max_bytes or RECV_SIZE)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        try:
            await _send_all(self.socket, data)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.socket.wait_writable()

    async def send_eof(self) -> None:
        try:
            self.socket.shutdown(trio.socket.SHUT_WR)
        except OSError:
            pass

    async def aclose(self) -> None:
        self._closed = True
        self.socket.close()
        await trio.lowlevel.checkpoint()


class TlsTransport(trio.abc.Stream):
    """TLS over a Trio socket, for a context built by ``sidecar.identity.tls``."""

    __slots__ = ("socket", "_raw", "_in", "_out", "_obj", "_send_lock", "_closed")

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext, *,
                 server_side: bool) -> None:
        self.socket = sock
        self._raw = _stdlib_socket(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=None)
        self._send_lock = trio.StrictFIFOLock()
        self._closed = False

    # -- handshake and peer ---------------------------------------------------------------
    async def do_handshake(self) -> None:
        obj = self._obj
        while True:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush_out()
                await self._fill()
                continue
            except (ssl.SSLError, OSError) as exc:
                await self._flush_out_quietly()
                raise trio.BrokenResourceError(str(exc)) from exc
            await self._flush_out()
            return

    def getpeercert(self, binary_form: bool = False) -> object:
        return self._obj.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self._obj.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._obj.version()

    # -- I/O ------------------------------------------------------------------------------
    async def _fill(self) -> bool:
        """Read from the socket into the TLS input; False on EOF."""
        try:
            data = await self.socket.recv(RECV_SIZE)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def _flush_out(self) -> None:
        if self._out.pending:
            async with self._send_lock:
                data = self._out.read()
                if data:
                    await self._send_locked(data)

    async def _flush_out_quietly(self) -> None:
        try:
            await self._flush_out()
        except trio.BrokenResourceError:
            pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError
        obj = self._obj
        size = max_bytes or RECV_SIZE
        while True:
            try:
                return obj.read(size)
            except ssl.SSLWantReadError:
                if self._out.pending:
                    await self._flush_out()
                if not await self._fill():
                    try:
                        return obj.read(size)
                    except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ssl.SSLWantReadError):
                        return b""
                    except ssl.SSLError as exc:
                        raise trio.BrokenResourceError(str(exc)) from exc
            except ssl.SSLZeroReturnError:
                return b""  # close_notify
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    def try_receive(self) -> bytes | None:
        """Decrypted bytes available without waiting, b"" at EOF, or None (then wait with
        ``receive_wait``)."""
        obj = self._obj
        while True:
            try:
                return obj.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                if self._out.pending or self._closed:
                    return None
                try:
                    data = self._raw.recv(RECV_SIZE)
                except BlockingIOError:
                    return None
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                if not data:
                    # A TCP EOF, with or without close_notify, reads as b"" (https-compatible:
                    # HTTP framing, not TLS, says whether a message ended).
                    self._in.write_eof()
                    return b""
                self._in.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    async def receive_wait(self) -> bytes:
        """Wait for decrypted bytes after ``try_receive`` found none."""
        raw = self._raw
        while True:
            if self._closed:
                raise trio.ClosedResourceError
            if self._out.pending:
                await self._flush_out()  # TLS output produced by a read (e.g. KeyUpdate)
            else:
                await trio.lowlevel.wait_readable(raw)
            data = self.try_receive()
            if data is not None:
                return data

    def _encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        return self._out.read()

    def try_send(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """Encrypt ``data`` and send what the socket takes now; return the wire bytes
        (ciphertext) still to send with ``send_wire``."""
        wire = self._encrypt(data)
        if self._send_lock.locked():
            return wire
        try:
            sent = self._raw.send(wire)
        except BlockingIOError:
            return wire
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        return memoryview(wire)[sent:] if sent < len(wire) else b""

    async def send_wire(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            await self._send_locked(data)

    async def _send_locked(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await _send_all(self.socket, data)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_wire(self._encrypt(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.socket.wait_writable()

    async def send_eof(self) -> None:
        """Send close_notify: the peer's next read ends; reading from it still works."""
        try:
            self._obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        except (ssl.SSLError, ValueError) as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        await self._flush_out()

    async def aclose(self) -> None:
        """Send close_notify if that can be done without waiting, then close the socket."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            try:
                self._obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            data = self._out.read()
            if data and not self._send_lock.locked():
                try:
                    with trio.move_on_after(0.2):
                        await _send_all(self.socket, data)
                except OSError:
                    pass
        finally:
            self.socket.close()
        await trio.lowlevel.checkpoint()
