"""HTTP/1.1 endpoints over Trio streams with deadlines, and the mapping of I/O errors.

Theory of operation: every read goes through ``Endpoint.next_event`` with an absolute
deadline, so each wait in the data path has a bound. Errors from trio, ssl and the parsers
are mapped at this edge: a client's malformed bytes become ``BadRequest`` /
``HeadersTooLarge`` (a generic 400/431), an upstream's become ``ProtocolViolation``, and I/O
failures ``PeerClosed`` / ``Timeout`` tagged with the side, so the layers above see only our
small hierarchy.

How a read is bounded. A read is first tried without waiting (the transports of
``sidecar.net.transport``; an endpoint whose tries keep finding nothing waits first instead,
see ``Endpoint.receive``); only when it would block is there anything to bound. A Trio
cancel scope per blocked read (and one per idle wait) cost about a tenth of a proxy's CPU
per request, so on those transports the bound is kept by the process's ``WaitWatch``
instead: the read records its deadline in its endpoint's ``Wait`` and registers it (a dict
entry), and one system task ends the waits past their
deadline with ``trio.lowlevel.notify_closing`` on the socket (the wait raises
``ClosedResourceError``, which the endpoint turns into ``Timeout`` because its ``Wait`` says
it expired; the socket itself stays open, so a 408 can still be written). The task looks at
the waits when the earliest deadline among them is due, and never sooner than ``WATCH_TICK``
(50 ms) after its last look: a bound is kept to within ``WATCH_TICK`` rather than exactly,
which no timeout of the sidecar needs, and a sidecar whose waits are all far off (idle
keep-alive connections) or that has none does not wake at all (a look every 50 ms cost an
idle sidecar about 6 ms of CPU a second). A wait whose deadline is earlier than the task's
next look -- a new one, or one a drain or retirement lowers -- moves that look forward.
``Wait`` has the two members of a cancel scope the listener's drain and the connection
lifetimes use on an idle wait (``deadline``, ``cancel()``), so those cut it as
they cut a scope. Other streams (memory streams in tests, the control plane) keep a cancel
scope per wait.

Who waits. A suspended task suspends, and later resumes, every coroutine between its root
and Trio's wait, and an idle keep-alive connection keeps that whole chain in memory. So the
two waits of every request -- the idle wait for the next one (``request_loop``) and the
wait for the upstream's answer (``forward``) -- do not go through ``next_event`` and
``receive``: ``receive_now`` tries the read, and when it would block it arms the
endpoint's ``Wait`` and returns None; the frame that owns the loop awaits
``wait_readable`` itself and then reads with ``woke`` (or maps the wait's failure with
``wait_failed``). Everything else a read may need (other streams, a fairness checkpoint, a
TLS read that must write first) is the complete ``receive``, which ``receive_now`` returns
as a coroutine for the caller to await.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import trio

from sidecar.errors import BadRequest, HeadersTooLarge, RequestRefused
from sidecar.http.wire import NEED_DATA, EventReader, ParseError
from sidecar.net.transport import BURST_UNDER

READ_SIZE = 65536
FAST_OPS_PER_CHECKPOINT = 8
# When an endpoint's reads wait for the socket first instead of trying a read that would
# find nothing (see ``Endpoint.receive``): after this many tries in a row found nothing, and
# then one read in PROBE_EVERY is still tried first.
MISSES_BEFORE_WAITING = 16
PROBE_EVERY = 8
STREAMING_READ = 16384  # a read this large (a full TLS record): more is probably coming
WATCH_TICK = 0.05  # seconds between two looks of the WaitWatch at the blocked reads


class PeerClosed(Exception):
    """The other end went away (EOF, reset, TLS error) -- nothing to answer.

    ``side`` says which end: "client" (whoever sent us the request) or "upstream".
    """

    def __init__(self, reason: str, side: str = "upstream", sent: int = 0,
                 received: int = 0) -> None:
        super().__init__(reason)
        self.side = side
        # (a stream cut short: the bytes it carried each way, for its record)
        self.sent, self.received = sent, received


class Timeout(Exception):
    """A bounded wait ran out (``side`` as for ``PeerClosed``)."""

    def __init__(self, reason: str, side: str = "upstream") -> None:
        super().__init__(reason)
        self.side = side


class ProtocolViolation(PeerClosed):
    """The other side sent bytes that are not acceptable HTTP/1.1 (an upstream's answer that
    does not parse is a bad gateway, never the client's fault)."""


_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)
wait_readable = trio.lowlevel.wait_readable


class IdleBound(Protocol):
    """What a drain or a retirement needs of an idle wait's bound: a ``trio.CancelScope``
    or an endpoint's ``Wait``."""

    deadline: float

    def cancel(self) -> None:
        """End the wait now."""


class Wait:
    """The bound of an endpoint's blocked read, kept by the ``WaitWatch`` (see the module
    docstring); reused for every read of the endpoint. ``deadline`` may be lowered while
    the read waits, and ``cancel()`` ends it now, as for a ``trio.CancelScope``."""

    __slots__ = ("_deadline", "expired", "_sock", "_watch")

    def __init__(self, sock: socket.socket, watch: WaitWatch | None = None) -> None:
        self._deadline = math.inf
        self.expired = False
        self._sock = sock
        self._watch = watch

    @property
    def deadline(self) -> float:
        """When the read ends with ``Timeout`` (trio clock)."""
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        """Move the bound (a drain or a retirement lowering it while the read waits): the
        watch is told to look by then. (``Endpoint.receive`` sets ``_deadline`` itself.)"""
        self._deadline = value
        watch = self._watch
        if watch is not None and value < watch.wake_at:
            watch.look_by(value)

    def cancel(self) -> None:
        """End the wait now (a drain, a retirement): the read raises ``Timeout``."""
        if not self.expired:
            self.expired = True
            # A socket closed meanwhile has fileno -1: its wait is already over, and its
            # number may belong to another connection by now.
            if self._sock.fileno() >= 0:
                trio.lowlevel.notify_closing(self._sock)


class WaitWatch:
    """The blocked reads of one Trio run and their deadlines; one system task ends the
    ones past their deadline, looking when the earliest is due (see the module docstring).

    ``wake_at``: when the task looks next (inf: not until a wait asks, ``look_by``);
    ``looks``: how many times it has looked."""

    def __init__(self) -> None:
        self.waiting: dict[Wait, None] = {}
        self.wake_at = math.inf
        self.looks = 0
        self._last = -math.inf  # trio clock of the last look
        self._scope: trio.CancelScope | None = None  # the task's sleep until wake_at

    def look_by(self, deadline: float) -> None:
        """A wait is due at ``deadline``, before the next look: look then (at the earliest
        ``WATCH_TICK`` after the last look)."""
        at = max(deadline, self._last + WATCH_TICK)
        if at < self.wake_at:
            self.wake_at = at
            if self._scope is not None:
                self._scope.deadline = at

    async def run(self) -> None:
        """Look at the waits whenever one is due, until the run ends."""
        waiting = self.waiting
        while True:
            # Nothing between the end of one sleep and the start of the next awaits, so a
            # ``look_by`` either moves this scope's deadline or finds ``_scope`` None and
            # sets ``wake_at``, which the next scope starts from.
            with trio.CancelScope(deadline=self.wake_at) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            self._last = now
            self.looks += 1
            due = math.inf
            expired = []
            for wait in waiting:
                deadline = wait._deadline
                if deadline <= now:
                    expired.append(wait)
                elif deadline < due:
                    due = deadline
            for wait in expired:
                wait.cancel()
            self.wake_at = max(due, now + WATCH_TICK)


_WATCH: trio.lowlevel.RunVar[WaitWatch | None] = trio.lowlevel.RunVar("sidecar_wait_watch",
                                                                      None)


_CLOCK: trio.lowlevel.RunVar[Callable[[], float] | None] = trio.lowlevel.RunVar(
    "sidecar_clock", None)


def run_clock() -> Callable[[], float]:
    """The current run's clock reader: what ``trio.current_time`` returns, without its
    per-call look-up of the run (``trio.current_time`` outside a run). One bound method per
    run, shared by every endpoint (an idle connection keeps a reference, not a copy)."""
    try:
        clock = _CLOCK.get()
    except RuntimeError:
        return trio.current_time
    if clock is None:
        clock = trio.lowlevel.current_clock().current_time
        _CLOCK.set(clock)
    return clock


def current_watch() -> WaitWatch:
    """This run's ``WaitWatch``, started on first use (a system task: it ends with the run)."""
    watch = _WATCH.get()
    if watch is None:
        watch = WaitWatch()
        _WATCH.set(watch)
        trio.lowlevel.spawn_system_task(watch.run, name="sidecar-wait-watch")
    return watch


class Endpoint:
    """One HTTP/1.1 connection: a byte stream, a reader of the other side's messages, and a
    buffer of what we send.

    ``reader`` (an ``EventReader``) is the strict ``sidecar.http.wire.MessageReader``
    (requests or responses), whichever side the bytes come from. ``sent_head`` is the one
    record of "a response head went to this client for the current request": a refusal
    can then only close the connection, and an upstream failure is no longer a 502. Writes are coalesced: ``queue`` appends serialised bytes and ``flush``
    sends them in one call, so a response head, its body and its end usually leave in one
    TLS record and one syscall. ``next_event(..., flush_first=other)`` flushes the *other*
    endpoint before it blocks on a read, so streaming never stalls on a buffer.
    """

    __slots__ = ("stream", "reader", "bytes_in", "bytes_out", "side", "out", "out_len", "fast",
                 "misses", "_try_receive", "_try_send", "_receive_wait", "wait_fd", "_pending",
                 "sent_head", "wait", "_watch", "clock", "private", "_burst")

    def __init__(self, stream: trio.abc.Stream, reader: EventReader,
                 side: str = "upstream") -> None:
        self.stream = stream
        self.reader = reader
        self.bytes_in = 0
        self.bytes_out = 0
        self.side = side
        self.out: list[bytes] = []
        self.out_len = 0
        self.fast = 0
        self.misses = 0  # reads in a row that found nothing (see ``receive``)
        # The fast paths of sidecar.net.transport's streams (absent on other streams).
        self._try_receive: Callable[[], bytes | None] | None = getattr(
            stream, "try_receive", None)
        self._try_send: Callable[[bytes], bytes | bytearray | memoryview] | None = getattr(
            stream, "try_send", None)
        self._receive_wait: Callable[[], Awaitable[bytes | bytearray]] | None = (
            getattr(stream, "receive_wait", None) if self._try_receive else None)
        # What Trio waits on for those transports (``wait_fd``): a blocked read waits for it
        # and tries once itself, and only a wake-up that finds nothing goes to the
        # transport's ``receive_wait`` (one coroutine less per blocked read). The callers
        # of ``receive_now`` wait for it themselves.
        self.wait_fd: Any = getattr(stream, "wait_fd", None) if self._receive_wait else None
        # Decrypted bytes OpenSSL holds (TLS): a read must take them before it may wait.
        self._pending: Callable[[], int] | None = getattr(stream, "pending", None)
        # TLS: a short read mid-message is joined with the records behind it (``next_event``).
        self._burst: Callable[[bytes | bytearray], bytes | bytearray] | None = getattr(
            stream, "receive_burst", None)
        self.sent_head = False  # a response head went out for the current request
        self.clock = run_clock()  # read only when a deadline is needed (see next_event)
        # A client's upstream connection that carried connection-oriented authentication
        # (NTLM, Negotiate): this client's alone, never pooled (``sidecar.net.forward``).
        self.private: Endpoint | None = None
        # Blocked reads bounded by the run's WaitWatch (the lean transports only).
        sock = getattr(raw_socket(stream), "_sock", None) if self._receive_wait else None
        self._watch: WaitWatch | None = current_watch() if sock is not None else None
        self.wait: Wait | None = Wait(sock, self._watch) if sock is not None else None

    async def next_event(self, deadline: float | None, flush_first: Endpoint | None = None, *,
                         timeout: float = 0.0) -> object:
        """The reader's next event (a head, body bytes, ``END``, ``CLOSED``), reading by
        ``deadline`` (None: ``timeout`` seconds from when a read is first needed -- most
        events are parsed from bytes already here, and then the clock is not read at all);
        parse errors become ``BadRequest``/``HeadersTooLarge`` (client side) or
        ``ProtocolViolation`` (upstream)."""
        reader = self.reader
        while True:
            try:
                event = reader.next_event()
            except ParseError as exc:
                raise self._refusal(exc) from exc
            if event is not NEED_DATA:
                return event
            if deadline is None:
                deadline = self.clock() + timeout
            if flush_first is not None and flush_first.out:
                await flush_first.flush(deadline)
            data = await self.receive(deadline)
            # A message split across reads (rare: a head and its body usually come in one
            # record) goes on in short reads: joined with the TLS records already behind
            # them, so a body sent in 1-byte records is one event (and one send onward) per
            # burst, not per byte (``TlsTransport.receive_burst``).
            burst = self._burst
            if burst is not None and 0 < len(data) < BURST_UNDER:
                data = burst(data)
            reader.feed(data)

    def event_now(self) -> object:
        """The reader's next event from the bytes already received, or ``NEED_DATA`` (then
        ``next_event`` reads); parse errors mapped as by ``next_event``. No coroutine: most
        body bytes and ends of messages are here with their head, and awaiting
        ``next_event`` for them cost 1,500 instructions each."""
        try:
            return self.reader.next_event()
        except ParseError as exc:
            raise self._refusal(exc) from exc

    def _refusal(self, exc: ParseError) -> Exception:
        if self.side == "client":
            if exc.status == 431:
                return HeadersTooLarge(exc.reason)
            return BadRequest(exc.reason)
        return ProtocolViolation(exc.reason, self.side)

    async def receive(self, deadline: float) -> bytes | bytearray:
        """The next bytes from the stream (b"" at EOF) by ``deadline``, else ``Timeout``;
        ``math.inf``: no bound of its own, the caller's cancel scope is the bound.

        On the lean transports a read is first tried without waiting, unless the last
        ``MISSES_BEFORE_WAITING`` tries of this endpoint all found nothing: then its reads
        wait for the socket at once, and only one in ``PROBE_EVERY`` is tried first, until
        one finds bytes. A read that finds nothing costs a system call and an exception
        (about 8,000-11,000 instructions here); a wait that was not needed, because the
        bytes were there, costs several times that (a Trio wait, an epoll registration, a
        pass of the scheduler): waiting first pays only where tries almost never find
        anything. On a proxy those are the read of another proxy's answer and the idle
        wait of a connection from another proxy; a local app or client answers or sends its
        next request within microseconds often enough. A large read ends the
        waiting-first: a body is streaming.

        A blocked read waits for the transport's ``wait_fd`` and reads with one try; only
        a wake-up that finds nothing (or a closed stream, or a TLS read that has to write
        first: ``want_write``) goes on in the transport's ``receive_wait``, which loops."""
        try_receive = self._try_receive
        if try_receive is not None:
            misses = self.misses
            if (misses < MISSES_BEFORE_WAITING
                    or misses >= MISSES_BEFORE_WAITING + PROBE_EVERY - 1
                    or (self._pending is not None and self._pending())):
                try:
                    data = try_receive()
                except _IO_ERRORS as exc:
                    raise PeerClosed(type(exc).__name__, self.side) from exc
                if data is not None:
                    self.misses = 0
                    self.bytes_in += len(data)
                    self.fast += 1
                    if self.fast >= FAST_OPS_PER_CHECKPOINT:
                        # Fast paths do not yield; a stream that always has data must still
                        # let every other connection (and cancellation) run now and then.
                        self.fast = 0
                        await trio.lowlevel.checkpoint()
                    return data
                self.misses = misses + 1 if misses < MISSES_BEFORE_WAITING else (
                    MISSES_BEFORE_WAITING)  # (a probe that found nothing: wait first again)
            else:
                self.misses = misses + 1  # wait first; the PROBE_EVERY-th read is tried
        wait = self._receive_wait
        bound = self.wait
        if bound is not None and wait is not None:
            # The run's WaitWatch keeps the bound (module docstring): no cancel scope.
            bound._deadline = deadline
            bound.expired = False
            watch: WaitWatch = self._watch  # type: ignore[assignment]
            if deadline < watch.wake_at:
                watch.look_by(deadline)  # (rare: the usual wait is due after the next look)
            waiting = watch.waiting
            waiting[bound] = None
            try:
                fd = self.wait_fd
                if fd is not None and not self.stream.want_write:  # type: ignore[attr-defined]
                    await wait_readable(fd)
                    got = try_receive()  # type: ignore[misc]
                    if got is None:  # (nothing after all, closed, or TLS must write first)
                        got = await wait()
                else:
                    got = await wait()
            except _IO_ERRORS as exc:
                if bound.expired:
                    raise Timeout("read", self.side) from None
                raise PeerClosed(type(exc).__name__, self.side) from exc
            finally:
                del waiting[bound]
            if len(got) >= STREAMING_READ:
                self.misses = 0
            self.bytes_in += len(got)
            return got
        try:
            if deadline == math.inf:
                # The caller's own scope bounds this wait (the session's idle scope): a
                # second cancel scope would cost as much as the read itself.
                got = await (wait() if wait is not None else self.stream.receive_some(READ_SIZE))
            else:
                got = b""
                with trio.move_on_at(deadline) as scope:
                    got = await (wait() if wait is not None
                                 else self.stream.receive_some(READ_SIZE))
                if scope.cancelled_caught:
                    raise Timeout("read", self.side)
        except _IO_ERRORS as exc:
            raise PeerClosed(type(exc).__name__, self.side) from exc
        self.bytes_in += len(got)
        return got

    def receive_now(self, deadline: float) -> bytes | Coroutine[Any, Any, bytes | bytearray] | None:
        """``receive`` split at its wait, so that the frame that owns a read loop waits on
        Trio itself: the frames in between (``next_event``, ``receive``) are then neither
        suspended nor resumed at the wait, about 1,000 instructions each per wait (every
        level of a suspended coroutine chain passes the suspension up and the resumption
        down, each with its frame). Used at the two waits of every request: the idle wait
        for the next one (``request_loop``) and the wait for the upstream's answer
        (``forward``).

        Returns the bytes when a try finds them without waiting (b"" at EOF); None when the
        read must wait for its socket: this endpoint's ``Wait`` is then armed with
        ``deadline`` and registered with the ``WaitWatch``, and the caller awaits
        ``trio.lowlevel.wait_readable(self.wait_fd)``, then calls ``woke`` -- or, on any
        exception from that await, raises ``wait_failed(exc)``. Anything else -- a stream
        other than the lean transports, a checkpoint due after reads that never waited, a
        TLS read that must write first -- returns the coroutine of the complete
        ``receive``, which the caller awaits. Same decisions and errors as ``receive``."""
        bound = self.wait
        if (bound is None or self.wait_fd is None or self.fast >= FAST_OPS_PER_CHECKPOINT - 1
                or self.stream.want_write):  # type: ignore[attr-defined]
            return self.receive(deadline)
        # ``receive``'s try, written out rather than shared through a helper: the helper's
        # call cost about 1,000 instructions per request on each proxy (measured).
        misses = self.misses
        if (misses < MISSES_BEFORE_WAITING
                or misses >= MISSES_BEFORE_WAITING + PROBE_EVERY - 1
                or (self._pending is not None and self._pending())):
            try:
                data = self._try_receive()  # type: ignore[misc]
            except _IO_ERRORS as exc:
                raise PeerClosed(type(exc).__name__, self.side) from exc
            if data is not None:
                self.misses = 0
                self.bytes_in += len(data)
                self.fast += 1
                return data
            if self.stream.want_write:  # type: ignore[attr-defined]
                return self.receive(deadline)  # (a TLS read that must write first)
            self.misses = misses + 1 if misses < MISSES_BEFORE_WAITING else (
                MISSES_BEFORE_WAITING)  # (a probe that found nothing: wait first again)
        else:
            self.misses = misses + 1  # wait first; the PROBE_EVERY-th read is tried
        bound._deadline = deadline
        bound.expired = False
        watch: WaitWatch = self._watch  # type: ignore[assignment]
        if deadline < watch.wake_at:
            watch.look_by(deadline)
        watch.waiting[bound] = None
        return None

    def woke(self, deadline: float) -> bytes | Coroutine[Any, Any, bytes | bytearray]:
        """After ``receive_now``'s wait: the read, with one try; a wake-up that finds
        nothing (or a closed stream, or a TLS read that must write first) returns the
        coroutine of the complete ``receive`` (the caller awaits it)."""
        del self._watch.waiting[self.wait]  # type: ignore[union-attr,arg-type]
        self.fast = 0  # (the wait let every other task run)
        try:
            got = self._try_receive()  # type: ignore[misc]
        except _IO_ERRORS as exc:
            raise PeerClosed(type(exc).__name__, self.side) from exc
        if got is None:
            return self.receive(deadline)
        if len(got) >= STREAMING_READ:
            self.misses = 0
        self.bytes_in += len(got)
        return got

    def wait_failed(self, exc: BaseException) -> BaseException:
        """What to raise when ``receive_now``'s wait raised ``exc``: ``Timeout`` if the
        ``WaitWatch`` (or a drain, a retirement) ended it, ``PeerClosed`` for another I/O
        error, else ``exc`` itself (a cancellation)."""
        bound: Wait = self.wait  # type: ignore[assignment]
        del self._watch.waiting[bound]  # type: ignore[union-attr]
        if not isinstance(exc, _IO_ERRORS):
            return exc
        if bound.expired:
            out: Exception = Timeout("read", self.side)
            out.__suppress_context__ = True
        else:
            out = PeerClosed(type(exc).__name__, self.side)
            out.__cause__ = exc
        return out

    def spoke(self) -> bool:
        """The other side sent bytes or ended the connection since the last read, checked
        without waiting (``sidecar.net.forward``: an upstream answering before it read the
        whole request body). What a check reads goes to the reader, not lost. A socket that
        is readable for TLS records without application data (a TLS 1.3 session ticket
        after the handshake) has not spoken: the try reads them and finds nothing."""
        if not readable_now(self.stream):
            return False
        try_receive = self._try_receive
        if try_receive is None:
            return True  # (a stream without a try: whatever it is, something came)
        try:
            data = try_receive()
        except _IO_ERRORS:
            return True  # (a reset with nothing before it: the next read says so)
        if data is None:
            return False
        self.bytes_in += len(data)
        self.reader.feed(data)
        return True

    def queue(self, data: bytes) -> None:
        """Buffer serialised bytes for the next ``flush``."""
        self.out.append(data)
        self.out_len += len(data)

    async def flush(self, deadline: float | None = None, *, timeout: float = 0.0) -> None:
        """Send everything queued, in one write when possible, by ``deadline`` (None:
        ``timeout`` seconds from when the socket would block)."""
        rest = self.flush_now(deadline, timeout=timeout)
        if rest is not None:
            await rest

    def flush_now(self, deadline: float | None = None, *,
                  timeout: float = 0.0) -> Coroutine[Any, Any, None] | None:
        """``flush`` without a coroutine when the socket takes everything at once (nearly
        always): None then; else the coroutine that sends the rest, which the caller awaits
        at once. On the data path's per-request flushes (the request to the upstream, the
        response to the client) this saves a coroutine each, about 1,000 instructions."""
        out = self.out
        if not out:
            return None
        data = out[0] if len(out) == 1 else b"".join(out)
        self.out = []
        self.out_len = 0
        try_send = self._try_send
        if try_send is None:
            return self._send_slow(data, self.stream.send_all, data, deadline, timeout)
        try:
            rest = try_send(data)
        except _IO_ERRORS as exc:
            raise PeerClosed(type(exc).__name__, self.side) from exc
        if rest:
            return self._send_slow(data, self.stream.send_wire,  # type: ignore[attr-defined]
                                   rest, deadline, timeout)
        self.bytes_out += len(data)
        return None

    async def _send_slow(self, data: bytes, send: Callable[[Any], Awaitable[object]],
                         pending: bytes | bytearray | memoryview, deadline: float | None,
                         timeout: float) -> None:
        """Send ``pending`` (what is left of ``data``) with ``send``, waiting by ``deadline``."""
        if deadline is None:
            deadline = self.clock() + timeout
        try:
            with trio.move_on_at(deadline) as scope:
                await send(pending)
        except _IO_ERRORS as exc:
            raise PeerClosed(type(exc).__name__, self.side) from exc
        if scope.cancelled_caught:
            raise Timeout("write", self.side)
        self.bytes_out += len(data)

    async def aclose(self) -> None:
        """Close the stream without raising."""
        await close_quietly(self.stream)


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
    sock: trio.socket.SocketType | None = getattr(stream, "socket", None)
    if sock is not None:
        return sock
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    return sock


# One poll object for the liveness checks of the run's thread (registering a descriptor on
# it is a dict entry, not a system call): a peek that finds nothing raises BlockingIOError,
# and building the exception cost twice the instructions of register + poll(0) + unregister
# (8,400 vs 3,900).
_ALIVE_POLL = select.poll()
_ANY_EVENT = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def looks_alive(stream: trio.abc.Stream) -> bool:
    """A pooled idle connection is reusable if nothing is waiting on its socket.

    Idle upstream connections must have nothing to read: pending bytes mean EOF, a TLS
    close_notify or garbage, and in every case the connection must not be reused. Any event
    on the socket -- bytes, an EOF, a reset, an error -- means it is not reusable; so do
    decrypted bytes OpenSSL holds.
    """
    pending = getattr(stream, "pending", None)  # decrypted bytes OpenSSL holds (TLS)
    if pending is not None and pending():
        return False
    sock = raw_socket(stream)
    # Trio's socket methods are async; a non-blocking check needs the stdlib socket inside.
    sock = getattr(sock, "_sock", None)
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():  # a stream the stdlib wrapped
        return False
    poller = _ALIVE_POLL
    poller.register(fd, _ANY_EVENT)
    try:
        return not poller.poll(0)
    finally:
        poller.unregister(fd)


def readable_now(stream: trio.abc.Stream) -> bool:
    """Something waits on the stream's socket -- bytes, an EOF, a reset, an error -- or
    OpenSSL holds decrypted bytes, checked without waiting (``Endpoint.spoke``). False for a
    stream without a socket: nothing to tell."""
    pending = getattr(stream, "pending", None)
    if pending is not None and pending():
        return True
    sock = getattr(raw_socket(stream), "_sock", None)
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return False
    poller = _ALIVE_POLL
    poller.register(fd, _ANY_EVENT)
    try:
        return bool(poller.poll(0))
    finally:
        poller.unregister(fd)


def truncated(stream: trio.abc.Stream) -> bool:
    """The stream's EOF was a TCP EOF without a TLS close_notify (a TLS transport that
    records it: ``ragged_eof``). Such an EOF cannot end a close-delimited body: anyone on
    the path can send a FIN (RFC 9112 9.8); a plain TCP stream's EOF is its end."""
    return getattr(stream, "ragged_eof", False)


def abort(stream: trio.abc.Stream) -> None:
    """Make the stream's close a TCP reset, without a TLS close_notify (a TLS transport is
    closed here; another stream when its owner closes it): how a response whose end is the
    close (to an HTTP/1.0 client) says it was cut short."""
    stop = getattr(stream, "abort", None)
    if stop is not None:
        stop()
        return
    sock = raw_socket(stream)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


def cancelled(exc: BaseException) -> bool:
    """Is ``exc`` a cancellation: ``trio.Cancelled``, or a group of nothing else? A nursery
    (a stream's two directions, an exchange's watch) ends a cancellation of the scope around
    it as a ``BaseExceptionGroup`` of its tasks' ``Cancelled``, which ``except
    trio.Cancelled`` does not catch (found while writing ``tests/test_cut_is_reset.py``: the
    record of a stream or an answer cut by a retirement was never written)."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False


def error_for(exc: BaseException) -> RequestRefused:
    """Map an unexpected I/O error to what a client may see."""
    if isinstance(exc, RequestRefused):
        return exc
    return RequestRefused("internal", repr(exc), status=502)
