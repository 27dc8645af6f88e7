"""Lean byte streams for the data path: plain TCP and TLS over a Trio socket.

Theory of operation: ``trio.SocketStream`` and ``trio.SSLStream`` are general-purpose and
careful, and on a proxy that does four reads and four writes per request their bookkeeping
(conflict detectors, state machine checks, handshake events, nested retries) costs a large
share of the CPU. These two classes do only what the sidecar needs:

* ``SocketTransport``: ``receive_some``/``send_all`` straight on the Trio socket.
* ``TlsTransport``: OpenSSL's connection on the Trio socket's file descriptor, non-blocking
  (the C ``_ssl._SSLSocket`` that ``ssl.SSLSocket`` wraps, called without the wrapper's
  Python frames): one call decrypts (or encrypts and sends) with no Python-level copies between memory
  BIOs, and OpenSSL's record buffers are released while a connection is idle (memory BIOs
  keep their largest-ever size: ~300 KB per idle connection after one large body). Reads and
  writes are tried first; only ``SSLWantRead/WriteError`` waits for the socket through
  Trio. A lock orders writes, because TLS 1.3 can produce records on the read path
  (KeyUpdate answers) while a splice task writes. Renegotiation is disabled in every context
  the sidecar builds (TLS 1.3 has none).

Errors: anything the socket or OpenSSL raises becomes ``trio.BrokenResourceError`` (with
the cause chained); a TCP EOF, with or without a TLS close_notify, reads as ``b""``, like
``SSLStream(https_compatible=True)``: HTTP framing, not TLS, says whether a message ended.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
from typing import Literal, cast, overload

import trio

from sidecar.identity.tls import _libssl

RECV_SIZE = 65536
# A TLS read returns one record's bytes. A read shorter than BURST_UNDER is joined with the
# records already waiting behind it (``TlsTransport.receive_burst``), at most BURST_RECORDS
# of them and BURST_BYTES in all.
BURST_UNDER = 2048
BURST_RECORDS = 256
BURST_BYTES = 65536
_ENCODING_DER = 2  # _ssl.ENCODING_DER: the C Certificate objects' public_bytes format


# Intermediates and roots of verified peer chains, one bytes object each (see
# ``TlsTransport.peer_chain_der``). Bounded: emptied when full (sharing is an optimisation;
# nothing depends on an entry being there). Only the event loop's thread touches it. A
# certificate larger than ``_SHARED_DER_BYTES`` is not shared: a CA can mint distinct ones of
# up to ~100 KB at will, and the table held 64 of them (~6 MB) after the connections that
# brought them had ended (a hostile review; trust domains' real CAs are ~1 KB).
_SHARED_DER_MAX = 64
_SHARED_DER_BYTES = 8192
_shared_ders: dict[bytes, bytes] = {}


def _shared_der(der: bytes) -> bytes:
    if len(der) > _SHARED_DER_BYTES:
        return der
    got = _shared_ders.get(der)
    if got is None:
        if len(_shared_ders) >= _SHARED_DER_MAX:
            _shared_ders.clear()
        _shared_ders[der] = got = der
    return got


def _stdlib_socket(sock: trio.socket.SocketType) -> socket.socket:
    # Trio's socket wraps a non-blocking stdlib socket; calling it directly is the fast path
    # for I/O that can complete at once (most of it on a proxy), with no cancel scope and no
    # scheduler round trip. Anything that would block goes through Trio as usual.
    return sock._sock  # type: ignore[attr-defined,no-any-return]


# Linux's TCP_QUICKACK (12), where the platform has it.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def ack_now(sock: trio.socket.SocketType) -> None:
    """Acknowledge at once what the peer sent (Linux ``TCP_QUICKACK``; nothing elsewhere).

    Called when a server handshake ends. With no session tickets (``identity/tls.py``) the
    server writes nothing after the client's last flight, so the kernel delays its ACK (40 ms
    on Linux), and a client with Nagle's algorithm on (no ``TCP_NODELAY``: many TLS clients
    and libraries) holds its first request until that ACK: 40 ms on every new connection's
    first request. A server that sends tickets has the ACK ride on them.
    """
    if _QUICKACK is not None:
        try:
            _stdlib_socket(sock).setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass  # (a connection already gone: its first read says so)


async def _send_all(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    total = len(view)
    sent = await sock.send(view)
    while sent < total:
        sent += await sock.send(view[sent:])


class SocketTransport(trio.abc.HalfCloseableStream):
    """Plain TCP on a Trio socket."""

    __slots__ = ("socket", "_raw", "_closed")
    want_write = False  # (a plain socket never has to write to read: see TlsTransport)

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock
        self._raw = _stdlib_socket(sock)
        self._closed = False

    @property
    def wait_fd(self) -> socket.socket:
        """What a read waits on before ``try_receive`` (``receive_wait`` does the same)."""
        return self._raw

    def try_receive(self) -> bytes | None:
        """Bytes already waiting on the socket, b"" at EOF, or None if it would block."""
        try:
            return self._raw.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    def try_send(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Send what the socket takes now; return the wire bytes still to send."""
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            return data
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        return memoryview(data)[sent:] if sent < len(data) else b""

    async def receive_wait(self) -> bytes:
        """Wait for the socket, then read: after ``try_receive`` found nothing, or instead of
        it where a try would find nothing (``Endpoint.receive``)."""
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
        """Send what ``try_send`` left (a plain socket has nothing to retry: ``send_all``)."""
        await self.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes (b"" at EOF); socket errors become ``trio.BrokenResourceError``."""
        if self._closed:
            raise trio.ClosedResourceError
        try:
            return await self.socket.recv(max_bytes or RECV_SIZE)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; socket errors become ``trio.BrokenResourceError``."""
        if self._closed:
            raise trio.ClosedResourceError
        try:
            await _send_all(self.socket, data)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket is writable."""
        await self.socket.wait_writable()

    async def send_eof(self) -> None:
        """Half-close: shut down the sending side."""
        try:
            self.socket.shutdown(trio.socket.SHUT_WR)
        except OSError:
            pass

    async def aclose(self) -> None:
        """Close the socket (no wait)."""
        self._closed = True
        self.socket.close()
        await trio.lowlevel.checkpoint()


# SO_LINGER on, 0 seconds: close() sends a TCP reset instead of a FIN.
_RESET = struct.pack("ii", 1, 0)


# -- a close_notify that reads nothing ----------------------------------------------------
# Python's only way to send a close_notify is the C object's ``shutdown`` (``unwrap``), which
# calls OpenSSL's ``SSL_shutdown`` twice: the first sends the alert, the second reads the
# socket for the peer's. Application data found by that read is a fatal error
# (APPLICATION_DATA_AFTER_CLOSE_NOTIFY): the connection breaks and the data is lost. A
# half-closed stream's other direction goes on, so the peer's bytes may arrive at any moment
# -- between the two calls too, when the process is descheduled right after the first one's
# write (the data of a request sent in answer to that very close_notify; found under CI
# load: one stream in a dozen lost its request). So the close_notify is sent by one
# ``SSL_shutdown`` called directly, through the ``SSL *`` that CPython's ``PySSLSocket``
# holds right after the object header and a weak reference (``Modules/_ssl.c``, unchanged
# since Python 3.0; keyloggers and SABnzbd's decoder read it the same way). The pointer is
# used only when the word after it is the object's context and OpenSSL says that ``SSL``
# belongs to that context's ``SSL_CTX``; otherwise the two-call ``shutdown`` is the fallback
# and ``sidecar.net.forward.splice`` still sends a close_notify only while nothing of the
# peer's waits (which narrows the window to those microseconds but cannot close it).
_SSL_ERROR_WANT_WRITE = 3


def ssl_pointer(conn: object) -> int | None:
    """The ``SSL *`` of OpenSSL's connection object ``conn`` (the C ``_ssl._SSLSocket``, or
    the stdlib wrapper around one), or None unless the layout is proven (see above)."""
    import ctypes

    obj = getattr(conn, "_sslobj", conn)
    lib = _libssl()
    if obj is None or lib is None:
        return None
    base, word = object.__basicsize__, ctypes.sizeof(ctypes.c_void_p)
    context = getattr(obj, "context", None)
    if context is None or type(obj).__basicsize__ < base + 3 * word:
        return None
    if ctypes.c_void_p.from_address(id(obj) + base + 2 * word).value != id(context):
        return None
    pointer = ctypes.c_void_p.from_address(id(obj) + base + word).value
    ctx_pointer = ctypes.c_void_p.from_address(id(context) + base).value
    if not pointer or not ctx_pointer or lib.SSL_get_SSL_CTX(pointer) != ctx_pointer:
        return None
    return pointer


def _shutdown_once(conn: object) -> bool | None:
    """Send our close_notify with one ``SSL_shutdown``, never reading: True once it went (or
    had gone), False when the socket took nothing more (call again once writable), None
    where this cannot be done (the caller falls back to ``shutdown``). Raises ``ssl.SSLError``
    for anything else (a reset, a connection OpenSSL has given up on)."""
    pointer = ssl_pointer(conn)
    if pointer is None:
        return None
    lib = _libssl()
    lib.ERR_clear_error()  # (``SSL_get_error`` reads the thread's queue: start it empty)
    result = lib.SSL_shutdown(pointer)
    if result >= 0:
        return True
    error = lib.SSL_get_error(pointer, result)
    lib.ERR_clear_error()  # (and leave nothing in it for the ``ssl`` module's next call)
    if error == _SSL_ERROR_WANT_WRITE:
        return False
    raise ssl.SSLError(error, "close_notify not sent")


# Waits for more of the peer's bytes one handshake may take. A handshake takes a few (the
# ClientHello, then the client's certificate and Finished; a long chain over a slow link a
# dozen or two), and each wake-up is a pass of OpenSSL's state machine and of Trio, about
# 45 us. A peer without any certificate sent a ClientHello with a 20 KB extension in 1-byte
# records, one per send, within the handshake timeout: each record one wake-up, 0.9 s of CPU
# for one connection against 4 ms for a whole mTLS request (found by a hostile review).
MAX_HANDSHAKE_READS = 64


class HandshakeFragmented(trio.BrokenResourceError):
    """The peer's handshake came in more pieces than ``MAX_HANDSHAKE_READS`` waits."""


class PeerLeftBeforeAnswer(trio.BrokenResourceError):
    """The peer closed or reset its connection before the sidecar answered its ClientHello
    (``TlsTransport.do_handshake(skip_if_gone=True)``); nothing was computed for it."""


def peer_left(fd: socket.socket) -> bool:
    """Whether the peer of ``fd`` has closed its side (a FIN: ``POLLRDHUP``) or reset the
    connection (``POLLHUP``/``POLLERR``), whatever bytes it sent before are still waiting;
    False where the platform cannot tell (no ``POLLRDHUP``). One ``poll`` system call."""
    rdhup = getattr(select, "POLLRDHUP", 0)
    if not rdhup:
        return False
    poller = select.poll()
    poller.register(fd, rdhup)
    try:
        return any(events & (rdhup | select.POLLHUP | select.POLLERR)
                   for _fd, events in poller.poll(0))
    except OSError:
        return False


def eof_without_close_notify(exc: BaseException) -> bool:
    """Whether a TLS read's error is the peer's TCP EOF without close_notify: ``SSLEOFError``,
    or, on CPython releases before gh-95494's fix (3.11.2 among them), the ``SSLError`` that
    OpenSSL 3 raises for it once ``OP_IGNORE_UNEXPECTED_EOF`` is off
    (``sidecar.identity.tls.strict_eof``)."""
    return isinstance(exc, ssl.SSLEOFError) or (
        isinstance(exc, ssl.SSLError) and getattr(exc, "library", None) == "SSL"
        and getattr(exc, "reason", None) == "UNEXPECTED_EOF_WHILE_READING")


class TlsTransport(trio.abc.Stream):
    """TLS over a Trio socket, for a context built by ``sidecar.identity.tls``.

    OpenSSL's connection object for the stdlib socket inside the Trio socket
    (``SSLContext._wrap_socket``, non-blocking: OpenSSL reads and writes the file descriptor
    itself) is called directly, without the ``ssl.SSLSocket`` wrapper around it.
    """

    __slots__ = ("socket", "_ssl", "_fd", "_send_lock", "_closed", "want_write", "ragged_eof",
                 "_broken", "_end_held", "_notified")

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext, *,
                 server_side: bool) -> None:
        raw = _stdlib_socket(sock)
        try:
            if type(context) is ssl.SSLContext:
                # The C object ``SSLContext._wrap_socket`` makes (what ``ssl.SSLSocket``
                # wraps): one Python call less per read and write, ~0.6 KB less per
                # connection; the stdlib socket stays the Trio socket's, so closing either
                # closes the connection.
                # Typed as the wrapper, whose read/write/pending/getpeercert/version/
                # selected_alpn_protocol it shares (its ``shutdown`` is ``unwrap``'s).
                conn = cast(ssl.SSLSocket, context._wrap_socket(  # type: ignore[attr-defined]
                    raw, server_side, None))
                fd: socket.socket = raw
            else:
                # Something that only looks like a context (the audit shipper's, which adds
                # a host name): the stdlib wrapper, which takes the file descriptor over.
                conn = context.wrap_socket(raw, server_side=server_side,
                                           do_handshake_on_connect=False,
                                           suppress_ragged_eofs=True, server_hostname=None)
                sock._sock = fd = conn  # type: ignore[attr-defined]
        except OSError as exc:
            sock.close()
            raise trio.BrokenResourceError(str(exc)) from exc
        self.socket = sock
        self._ssl = conn
        self._fd = fd  # what Trio waits on
        # Created by the first ``send_wire`` (a write ``try_send`` could not finish at once;
        # many connections never have one): a lock is ~0.35 KB of every idle connection.
        self._send_lock: trio.StrictFIFOLock | None = None
        self._closed = False
        # A read had to write first (a TLS 1.3 KeyUpdate answer): the next wait is for the
        # socket to take it, in ``receive_wait``.
        self.want_write = False
        self.ragged_eof = False  # the peer's TCP EOF came without a TLS close_notify
        # A fatal error a burst read met (``receive_burst``), for the next read to raise.
        self._broken: Exception | None = None
        # A burst stopped at something other than "nothing waiting" (an end, an error, a
        # read that must write): taken off the socket into OpenSSL, so the socket may never
        # be readable again; ``pending`` says so until a read reports it.
        self._end_held = False
        self._notified = False  # our close_notify went (``_ssl_shutdown``)

    # -- handshake and peer ---------------------------------------------------------------
    async def do_handshake(self, *, skip_if_gone: bool = False) -> None:
        """The TLS handshake, waiting on the socket as OpenSSL asks; failures raise
        ``trio.BrokenResourceError`` from the ``ssl.SSLError``, and ``HandshakeFragmented``
        past ``MAX_HANDSHAKE_READS`` waits for more of the peer's bytes. ``skip_if_gone``
        (the inbound listener): while the peer's ClientHello is not answered, a peer that
        already closed or reset its connection (``peer_left``) gets no answer -- no key share,
        no signature -- and ``PeerLeftBeforeAnswer`` is raised: an honest client that gave
        up while the sidecar was stalled, its hello and its close read together, was
        answered, then counted as having abandoned the handshake (found by a hostile review,
        thirty-fifth session)."""
        s, fd = self._ssl, self._fd
        reads = 0
        while True:
            try:
                if skip_if_gone and s.cipher() is None and peer_left(fd):
                    raise PeerLeftBeforeAnswer()
                s.do_handshake()
                return
            except ssl.SSLWantReadError:
                reads += 1
                if reads > MAX_HANDSHAKE_READS:
                    raise HandshakeFragmented() from None
                await trio.lowlevel.wait_readable(fd)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(fd)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    @overload
    def getpeercert(self, binary_form: Literal[True]) -> bytes | None: ...
    @overload
    def getpeercert(self, binary_form: Literal[False] = False) -> object: ...

    def getpeercert(self, binary_form: bool = False) -> object:
        """The peer's leaf certificate (DER with ``binary_form=True``), as ``ssl`` gives it."""
        return self._ssl.getpeercert(binary_form)

    def peer_chain_der(self, leaf: bytes | None = None
                       ) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """(chain OpenSSL verified, chain the peer sent), each leaf first, as DER.

        Python 3.13 makes these public (``get_verified_chain``); 3.10-3.12 have them on the
        C object only. Where neither exists both are empty, and the trust-domain check
        (``sidecar.identity.trust``) then refuses the peer: it fails closed.

        The chain is kept for the connection's lifetime (``LiveConnection.chain``), so equal
        certificates are one object: ``leaf`` (the caller's ``getpeercert(True)``) stands for
        every copy of the leaf, and the other members of the verified chain (the trust
        domain's intermediates and root, the same for every peer) come from a small shared
        table. Four copies of two certificates per connection were ~2 KB of every idle one.
        """
        obj = getattr(self._ssl, "_sslobj", self._ssl)
        out: list[tuple[bytes, ...]] = []
        seen: dict[bytes, bytes] = {leaf: leaf} if leaf else {}
        for name in ("get_verified_chain", "get_unverified_chain"):
            method = getattr(obj, name, None)
            certs = method() if method is not None else None
            ders = []
            for i, cert in enumerate(certs or ()):
                der = cert.public_bytes(_ENCODING_DER)
                if der in seen:
                    der = seen[der]
                else:
                    # Only certificates OpenSSL chained to a root of ours are shared: what
                    # else a peer sends never enters the table.
                    if i > 0 and name == "get_verified_chain":
                        der = _shared_der(der)
                    seen[der] = der
                ders.append(der)
            out.append(tuple(ders))
        return out[0], out[1]

    def selected_alpn_protocol(self) -> str | None:
        """The ALPN protocol agreed in the handshake, if any."""
        return self._ssl.selected_alpn_protocol()

    def version(self) -> str | None:
        """The TLS version agreed in the handshake (e.g. ``TLSv1.3``)."""
        return self._ssl.version()

    @property
    def wait_fd(self) -> socket.socket:
        """What a read waits on before ``try_receive`` (``receive_wait`` does the same, and
        also what a read that must write first waits on)."""
        return self._fd

    def pending(self) -> int:
        """Decrypted bytes OpenSSL holds that were not read yet; 1 while a burst holds what
        ended it (``receive_burst``): a read must come before any wait on the socket."""
        return self._ssl.pending() or self._end_held

    # -- I/O ------------------------------------------------------------------------------
    def try_receive(self) -> bytes | None:
        """Decrypted bytes available without waiting, b"" at EOF (a TCP EOF with or without
        close_notify: HTTP framing, not TLS, says whether a message ended), or None (then
        wait with ``receive_wait``)."""
        if self._closed:
            return None
        try:
            return self._ssl.read(RECV_SIZE)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            self.want_write = True  # a read had to write (TLS 1.3 KeyUpdate answer)
            return None
        except ssl.SSLZeroReturnError:
            # The peer's close_notify after ours (``close_notify``: a half-closed splice);
            # before ours the read itself returns b"".
            return b""
        except (ssl.SSLError, OSError, ValueError) as exc:
            if not eof_without_close_notify(exc):
                raise trio.BrokenResourceError(str(exc)) from exc
            broken = self._broken
            if broken is not None:  # (what OpenSSL says after a fatal error a burst met)
                raise trio.BrokenResourceError(str(broken)) from broken
            # A TCP EOF without close_notify (what suppress_ragged_eofs did); recorded:
            # it cannot end a close-delimited body (``sidecar.net.streams.truncated``).
            self.ragged_eof = True
            return b""

    def receive_burst(self, data: bytes | bytearray) -> bytes | bytearray:
        """``data`` (a short read) joined with the records already waiting on the socket
        behind it. One read is one TLS record, and a peer that sends a body in 1-byte
        records would otherwise make each byte one event through the data path: one parse,
        one send to the other side, one poll (a hostile review measured 81 times the CPU
        per wire byte of the same body in full records). Stops at the first read that finds
        no data -- nothing waiting, an EOF, an alert, a read that must write first -- and
        leaves it to the next ``try_receive``, which meets the same condition again: OpenSSL
        repeats nothing-waiting, an EOF, a close_notify and a read that must write on every
        later read; a fatal error (a broken record, an alert, a reset) it reports once, and
        later reads as an EOF, so it is kept (``_broken``) and raised by the next read.

        Anything but nothing-waiting was taken off the socket into OpenSSL: a peer that sends
        its close_notify and keeps the TCP connection open (a two-way shutdown) leaves the
        socket never readable again. So ``pending`` is non-zero from then on, and every
        check that would look at the socket -- a pooled connection's liveness, a read that
        waits first -- reads instead (found by a hostile review of this burst: a pooled
        connection whose answer ended in short records and a close_notify took the next
        request, and a close-delimited answer ended that way waited out its timeout)."""
        read = self._ssl.read
        parts: list[bytes | bytearray] = [data]
        size = len(data)
        for _ in range(BURST_RECORDS):
            try:
                more = read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                self.want_write = True  # (a KeyUpdate answer to send first: the next wait)
                break
            except ssl.SSLZeroReturnError:
                self._end_held = True
                break
            except (ssl.SSLError, OSError, ValueError) as exc:
                if not eof_without_close_notify(exc):
                    self._broken = exc
                self._end_held = True
                break
            if not more:
                self._end_held = True
                break
            parts.append(more)
            size += len(more)
            if size >= BURST_BYTES:
                break
        return data if len(parts) == 1 else b"".join(parts)

    async def receive_wait(self) -> bytes:
        """Wait for the socket, then read decrypted bytes: after ``try_receive`` found
        nothing, or instead of it where a try would find nothing (``Endpoint.receive``, which
        never skips the try while OpenSSL holds decrypted bytes: ``pending()``)."""
        fd = self._fd
        while True:
            if self._closed:
                raise trio.ClosedResourceError
            if self.want_write:
                self.want_write = False
                await trio.lowlevel.wait_writable(fd)
            else:
                await trio.lowlevel.wait_readable(fd)
            data = self.try_receive()
            if data is not None:
                return data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next decrypted bytes (b"" at EOF)."""
        if self._closed:
            raise trio.ClosedResourceError
        data = self.try_receive()
        if data is None:
            data = await self.receive_wait()
        return data

    def try_send(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Send ``data`` if the socket takes all of it now; else return what is left to send
        with ``send_wire`` (OpenSSL wants a write it could not finish retried with the same
        bytes, so that is ``data`` itself)."""
        if self._closed:
            raise trio.ClosedResourceError
        lock = self._send_lock
        if lock is not None and lock.locked():
            return data
        try:
            sent = self._ssl.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return data
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        return memoryview(data)[sent:] if sent < len(data) else b""

    async def send_wire(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, or what ``try_send`` left of it, one writer at a time."""
        lock = self._send_lock
        if lock is None:
            lock = self._send_lock = trio.StrictFIFOLock()
        async with lock:
            await self._send_locked(data)

    async def _send_locked(self, data: bytes | bytearray | memoryview) -> None:
        s, fd = self._ssl, self._fd
        view = memoryview(data)
        while view:
            if self._closed:
                raise trio.ClosedResourceError
            try:
                sent = s.write(view)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            view = view[sent:]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (as ``send_wire``)."""
        await self.send_wire(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket is writable."""
        await trio.lowlevel.wait_writable(self._fd)

    async def send_eof(self) -> None:
        """Send close_notify: the peer's next read ends; reading from it still works."""
        self._shutdown()
        await trio.lowlevel.checkpoint()

    def close_notify(self) -> bool:
        """Send close_notify now, without waiting (a half-close: reading goes on): False
        when the socket takes nothing more yet (call again once it is writable). Unlike
        ``send_eof`` a failure raises ``trio.BrokenResourceError``. Reads nothing (see
        ``_shutdown_once``): the peer's bytes that come after it are read as before."""
        if self._closed:
            raise trio.ClosedResourceError
        try:
            return self._ssl_shutdown()
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    def _shutdown(self) -> None:
        # Sends close_notify if the socket takes it; a full socket buffer means no notify.
        try:
            self._ssl_shutdown()
        except (ssl.SSLError, OSError, ValueError):
            pass

    def _ssl_shutdown(self) -> bool:
        """Our close_notify, once per connection: True once it went, False while the socket
        takes nothing more."""
        if self._notified:
            return True  # (a second SSL_shutdown would read: see ``_shutdown_once``)
        sent = _shutdown_once(self._ssl)
        if sent is None:  # (no direct call here: the C object's two-call shutdown)
            conn = self._ssl
            try:
                if isinstance(conn, ssl.SSLSocket):
                    conn.unwrap()
                else:
                    conn.shutdown()  # type: ignore[call-arg,unused-ignore]  # unwrap's
                sent = True
            except ssl.SSLWantReadError:
                sent = True  # (sent; the peer's close_notify has not come: what we want)
            except ssl.SSLWantWriteError:
                sent = False
        self._notified = sent
        return sent

    def abort(self) -> None:
        """Close at once with a TCP reset and no close_notify: the peer sees an error, not an
        end of data (``sidecar.net.streams.abort``)."""
        if not self._closed:
            self._closed = True
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            except OSError:
                pass
            self.socket.close()

    async def aclose(self) -> None:
        """Send close_notify if that can be done without waiting, then close the socket."""
        if not self._closed:
            self._closed = True
            lock = self._send_lock
            if lock is None or not lock.locked():
                self._shutdown()
            self.socket.close()
        await trio.lowlevel.checkpoint()
