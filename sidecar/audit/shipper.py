"""The audit trail's shipper: the Trio side of ``sidecar.audit.ship``.

``Shipper``: ``offer(messages)`` (never awaits) appends to a bounded queue;
what does not fit is dropped and counted (``dropped``). ``run`` connects with TLS (the
collector's certificate checked against ``ca_file`` and ``server_name``; optional client
certificate), sends octet-counted frames (``LEN SP MSG``, RFC 5425 section 4.3), and on
any failure reconnects with backoff (0.1 s doubling to 5 s). A message leaves the queue
once ``send_all`` returned; TCP can still lose what was in flight when the collector
died, or a collector that stopped reading, so after a reconnect the last ``RESEND_FRAMES``
messages sent on the broken connection are sent again (at least once: a collector may see
a seq twice; ``collect`` keeps one copy and refuses two different frames with one seq).
RFC 5425 has no acknowledgements; RELP would be needed for end-to-end ones. A read task
notices the collector closing at once; a collector that sends anything at all is broken or
hostile (syslog collectors never send) and its connection is given up too -- before the
thirty-first session its bytes were read and decrypted for as long as it sent them (1.6 GiB
in 4 s, found by a hostile review). Backoff applies after a broken connection as after a
failed connect, and resets only once a connection has stayed up ``STABLE_SECONDS``: a
collector (or a TLS proxy without its backends) that completes each handshake and then
closes made the shipper reconnect about 300 times a second, resending its window each time.

Trust is re-read, not remembered: the TLS context is rebuilt before a connect whenever
``ca_file``, ``cert_file`` or ``key_file`` changed on disk (``sidecar.net.tlsfiles``), so a rotated
CA bundle or client certificate is used without a restart; and a connection does not
outlive what it was made under: every ``TRUST_RECHECK_SECONDS`` the files are looked at
again, and the connection is closed (then made anew, and the last messages resent as after
any break) when one changed or when the collector's certificate expires.

``mode: fail_open`` keeps serving when shipping fails (drops counted); ``required`` makes
``accepting()`` false while not connected, the queue is full, a send has waited on the
collector longer than ``STALL_REFUSE_SECONDS``, or a frame has waited to be shipped that long
(frames sent again after a broken connection keep the time they were first offered: a
collector that accepts connections and closes them unread let 40-45 % of requests through
while nothing reached it, found by a hostile review), and the data path answers 503, as for
an unwritable disk. What is still unshipped when the drain timeout ends the shipper is
logged (``audit_ship_unsent``, with its seq range), not only counted in a metric of a
process that is exiting.
"""

from __future__ import annotations

import itertools
import math
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import trio

from sidecar.config.audit import ShipConfig
from sidecar.logs import log
from sidecar.net.tlsfiles import FileContext
from sidecar.net.transport import TlsTransport

RESEND_FRAMES = 4096  # about the most a dead peer's socket buffers swallow unnoticed
# ...and at most this many bytes of them (Linux's largest socket buffers, tcp_wmem and the
# collector's tcp_rmem, hold about 10 MiB): frames as large as a record can be (an 8 KiB
# path, a long token subject) must not make the window hold 4096 of them.
RESEND_BYTES = 16 * 1024 * 1024
SEND_BATCH = 256
CONNECT_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
TRUST_RECHECK_SECONDS = 30.0  # how often a connection's TLS files are looked at again
# ``required``: a send the collector's side has not taken for this long means records are not
# getting out; ``accepting()`` is false from then on until it completes (the connection is
# given up only at ``SEND_TIMEOUT``). Before the twenty-sixth session a collector that
# stopped reading, its connection held open (a hung host, an L4 proxy without its backend),
# let requests through for the whole ``SEND_TIMEOUT`` (found by a hostile review: 2,592
# answered 200 while nothing reached the collector).
STALL_REFUSE_SECONDS = 1.0
# A connection that stays up this long resets the reconnect backoff; one that breaks sooner
# (a collector that closes each connection, unread) doubles it, as a failed connect does.
STABLE_SECONDS = 5.0
# A frame's seq (``ship.py``'s structured data), for the exit report of what was not shipped.
_FRAME_SEQ = re.compile(rb' seq="(\d+)"')


class Shipper:
    """Bounded queue + one TLS connection to the collector. See the module docstring."""

    def __init__(self, cfg: ShipConfig, *, retry_initial: float = 0.1,
                 retry_max: float = 5.0) -> None:
        self.cfg = cfg
        self.tls = FileContext(cfg.ca_file, cfg.cert_file, cfg.key_file)
        self.recheck_seconds = TRUST_RECHECK_SECONDS
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0  # the bytes of the frames in ``_queue`` (``queue_bytes``)
        # When the frames of ``_queue`` were first offered: [frames, monotonic time] per
        # offer, in queue order (``required``: a frame waiting too long refuses requests).
        self._since: deque[list[Any]] = deque()
        # Sent on this connection, newest last, as the batches they were sent in (each with
        # its byte count and when its oldest frame was first offered): whole batches leave
        # the window, never one Python step per frame.
        self._recent: deque[tuple[list[bytes], int, float]] = deque()
        self._recent_frames = 0
        self._recent_bytes = 0
        self._wake = trio.Event()
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self.connected = False
        self._stalled_since: float | None = None  # trio clock: a send waiting on the socket
        self.closing = False
        self.sent = 0
        self.dropped = 0
        self.resent = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def required(self) -> bool:
        """Whether shipping is ``required`` (its failure stops traffic) rather than best effort."""
        return self.cfg.mode == "required"

    def offer(self, messages: Iterable[bytes]) -> None:
        """Queue messages (never awaits); what does not fit the queue -- ``queue_size``
        frames and ``queue_bytes`` bytes -- is dropped, counted."""
        room = self.cfg.queue_size - len(self._queue)
        if not isinstance(messages, list):
            messages = list(messages)
        if len(messages) > room:
            self.dropped += len(messages) - max(room, 0)
            messages = messages[:max(room, 0)]
        size = sum(map(len, messages))
        if self._queued_bytes + size > self.cfg.queue_bytes:
            # The frames that fit, in order; the rest are dropped (rare: a collector away
            # while large records come, so a Python step per frame is fine here).
            room_bytes = self.cfg.queue_bytes - self._queued_bytes
            fit, size = 0, 0
            for message in messages:
                if size + len(message) > room_bytes:
                    break
                size += len(message)
                fit += 1
            self.dropped += len(messages) - fit
            messages = messages[:fit]
        self._queue.extend(messages)  # one C call per batch, not one append per frame
        self._queued_bytes += size
        if messages:
            self._since.append([len(messages), time.monotonic()])
        self._wake.set()

    def accepting(self) -> bool:
        """``required``: only while connected, the queue has room and neither a send nor
        a frame has waited longer than ``STALL_REFUSE_SECONDS``."""
        if not self.required:
            return True
        stalled = self._stalled_since
        if stalled is not None and trio.current_time() - stalled > STALL_REFUSE_SECONDS:
            return False
        since = self._since
        if since and time.monotonic() - since[0][1] > STALL_REFUSE_SECONDS:
            return False
        return (self.connected and len(self._queue) < self.cfg.queue_size
                and self._queued_bytes < self.cfg.queue_bytes)

    @property
    def queue_bytes(self) -> int:
        """How many bytes of frames wait to be shipped."""
        return self._queued_bytes

    @property
    def queue_depth(self) -> int:
        """How many frames wait to be shipped."""
        return len(self._queue)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, send, reconnect, until cancelled or closed and drained."""
        task_status.started()
        try:
            await self._run()
        finally:
            # Cancelled (the drain timeout ran out): what is still queued is not shipped --
            # said in the log, where it outlives the process (its metrics do not).
            queue = self._queue
            if queue:
                seqs = [_FRAME_SEQ.search(queue[i]) for i in (0, -1)]
                log("audit_ship_unsent", "error", frames=len(queue),
                    first_seq=int(seqs[0].group(1)) if seqs[0] else None,
                    last_seq=int(seqs[1].group(1)) if seqs[1] else None,
                    dropped_before=self.dropped, last_error=self.last_error)
            self.dropped += len(queue)
            queue.clear()
            self._since.clear()
            self._queued_bytes = 0

    async def _run(self) -> None:
        delay = self._retry_initial
        while not (self.closing and not self._queue):
            try:
                stream = await self._connect()
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
                self._failed(exc)
                await trio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            self.connected = True
            up_at = trio.current_time()
            failed = False
            try:
                await self._serve(stream)
            except* _NET_ERRORS as group:  # from the send loop or the close watcher
                self._failed(group.exceptions[0])
                failed = True
            finally:
                if failed:
                    self._requeue_recent()
                self.connected = False
                self._stalled_since = None
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await stream.aclose()
                    except _NET_ERRORS:
                        pass  # it is being thrown away anyway
            if failed:
                # (backoff after a broken connection too; reset only by one that held)
                if trio.current_time() - up_at >= STABLE_SECONDS:
                    delay = self._retry_initial
                await trio.sleep(delay)
                delay = min(delay * 2, self._retry_max)

    async def _connect(self) -> TlsTransport:
        assert self.cfg.address is not None  # filled in from the environment at start
        host, port = self.cfg.address
        # A rotated CA bundle or client certificate is what this handshake uses; a file
        # half written or unreadable fails this connect (retried with backoff).
        context = self.tls.current()
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(host, port)
            named = _NamedContext(context, self.cfg.server_name or host)
            stream = TlsTransport(tcp.socket, cast(ssl.SSLContext, named), server_side=False)
            try:
                await stream.do_handshake()
            except BaseException:
                await stream.aclose()
                raise
        return stream

    async def _serve(self, stream: TlsTransport) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_close, stream)
            nursery.start_soon(self._watch_trust, stream)
            while True:
                if not self._queue:
                    if self.closing:
                        nursery.cancel_scope.cancel()
                        return
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                queue = self._queue
                batch = (list(queue) if len(queue) <= SEND_BATCH
                         else list(itertools.islice(queue, SEND_BATCH)))
                # Usually the socket takes the whole write at once: no timeout scope, no
                # send lock; only a rest that must wait for the socket gets them.
                wire = b"".join(batch)
                rest = stream.try_send(wire)
                if rest:
                    self._stalled_since = trio.current_time()
                    with trio.fail_after(SEND_TIMEOUT):
                        await stream.send_wire(rest)
                    self._stalled_since = None
                # Sent: off the queue (nothing else takes from it; ``offer`` only appends,
                # so the queue is still what was sent plus what came since), into the
                # resend window; usually in C, not one Python step per frame.
                if len(batch) == len(queue):
                    queue.clear()
                else:
                    for _ in batch:
                        queue.popleft()
                self._queued_bytes -= len(wire)
                self._remember(batch, len(wire), self._taken(len(batch)))
                self.sent += len(batch)
                if queue and not rest:
                    await trio.lowlevel.checkpoint()  # a long queue must not starve the loop

    async def _watch_close(self, stream: TlsTransport) -> None:
        # A syslog collector never sends: an end of the read side means it is gone, and a
        # byte means it is no syslog collector (nothing it sends is read further).
        data = await stream.receive_some(4096)
        if data:
            raise _CollectorClosed("the collector sent data (syslog collectors never send)")
        raise _CollectorClosed("collector closed the connection")

    async def _watch_trust(self, stream: TlsTransport) -> None:
        # The connection holds only while what it was made under does: the TLS files as
        # they were at its handshake, and the collector's certificate within its validity.
        try:
            cert = stream.getpeercert()
        except ValueError:  # the collector ended the handshake after all (it refused us)
            raise _TrustChanged("no verified collector certificate") from None
        not_after = cert.get("notAfter") if isinstance(cert, dict) else None
        # Valid *through* notAfter's second (RFC 5280 4.1.2.5, and OpenSSL agrees): ended
        # before its end, the connection would be made again at once, and again.
        expires = (ssl.cert_time_to_seconds(not_after) + 1 if isinstance(not_after, str)
                   else math.inf)
        while True:
            await trio.sleep(max(0.0, min(self.recheck_seconds, expires - time.time())))
            if time.time() >= expires:
                raise _TrustChanged("the collector's certificate expired")
            if self.tls.changed():
                raise _TrustChanged("ca_file, cert_file or key_file changed")

    def _taken(self, frames: int) -> float:
        """``frames`` left the front of the queue: when the oldest of them was offered."""
        since = self._since
        oldest = since[0][1] if since else time.monotonic()
        while frames and since:
            head = since[0]
            if head[0] <= frames:
                frames -= head[0]
                since.popleft()
            else:
                head[0] -= frames
                frames = 0
        return cast(float, oldest)

    def _remember(self, batch: list[bytes], size: int, since: float | None = None) -> None:
        """Keep a sent batch in the resend window (``since``: when its oldest frame was
        offered), which holds at most ``RESEND_FRAMES`` frames and ``RESEND_BYTES`` bytes
        (the oldest batches leave it whole)."""
        recent = self._recent
        recent.append((batch, size, time.monotonic() if since is None else since))
        self._recent_frames += len(batch)
        self._recent_bytes += size
        while len(recent) > 1 and (self._recent_frames > RESEND_FRAMES
                                   or self._recent_bytes > RESEND_BYTES):
            old, old_size, _ = recent.popleft()
            self._recent_frames -= len(old)
            self._recent_bytes -= old_size

    def _requeue_recent(self) -> None:
        """Send again what the broken connection may have lost (at least once), each batch
        with the time its oldest frame was first offered (``required`` judges by it)."""
        again = [frame for batch, _, _ in self._recent for frame in batch]
        since: list[list[Any]] = [[len(batch), at] for batch, _, at in self._recent]
        self._recent.clear()
        self._recent_frames = self._recent_bytes = 0
        # The newest that fit the queue (frames and bytes) go in front of it again.
        room = max(0, self.cfg.queue_size - len(self._queue))
        room_bytes = self.cfg.queue_bytes - self._queued_bytes
        fit, size = 0, 0
        for frame in reversed(again[len(again) - room:] if room < len(again) else again):
            if size + len(frame) > room_bytes:
                break
            size += len(frame)
            fit += 1
        if fit < len(again):
            # The oldest of them do not fit again: count them, they may never arrive.
            self.dropped += len(again) - fit
            gone = len(again) - fit
            while gone and since:
                if since[0][0] <= gone:
                    gone -= since.pop(0)[0]
                else:
                    since[0][0] -= gone
                    gone = 0
            again = again[len(again) - fit:] if fit else []
        self._queue.extendleft(reversed(again))
        self._since.extendleft(reversed(since))
        self._queued_bytes += size
        self.resent += len(again)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    async def aclose(self) -> None:
        """Stop after everything queued was sent (bound it from outside)."""
        self.closing = True
        self._wake.set()


class _CollectorClosed(Exception):
    pass


class _TrustChanged(_CollectorClosed):
    """The connection was made under TLS files or a certificate that no longer hold."""


class _NamedContext:
    """A client ``SSLContext`` that always wraps with ``server_hostname``.

    The shipper sends over the data path's lean ``TlsTransport`` (OpenSSL writes the socket
    itself: no memory BIO copies and none of ``trio.SSLStream``'s bookkeeping per send),
    which wraps as a server would, without a host name; the collector's certificate must
    be checked against its name, so the name is added here."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self._context = context
        self._server_hostname = server_hostname

    def wrap_socket(self, sock: socket.socket, **kw: Any) -> ssl.SSLSocket:
        kw["server_hostname"] = self._server_hostname
        try:
            return self._context.wrap_socket(sock, **kw)
        except ValueError as exc:  # a name OpenSSL refuses: a failed connection, not a crash
            raise OSError(str(exc)) from exc


_NET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
               ssl.SSLError, _CollectorClosed)
