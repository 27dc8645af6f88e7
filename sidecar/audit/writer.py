"""The audit writer: a bounded queue in front of a background task that appends frames.

Theory of operation
-------------------
``submit(record)`` is called on the request path. It never awaits: it appends the record to
a bounded deque (``queue_size``) and returns at once; True means the record is queued. The
writer task parks on a ``trio.Event`` only while the deque is empty, and ``submit`` sets it
only then, so a queued record costs one append and one attribute check (a trio memory
channel did the same with several Python calls per record, and ``accepting()``, asked on
every request, built a statistics object to read the depth).

``run()`` (started with ``nursery.start``) takes records off the queue in batches of up
to ``batch_size`` and writes each (``_append``) in steps: the CPU work on the event loop,
``ENCODE_CHUNK_RECORDS`` records at a time with a yield to the loop's other tasks between
(the frames, the chain, checkpoints, encryption; after the write, the syslog messages),
and what blocks in the writer's one long-lived worker thread (``_DiskThread``;
``trio.to_thread`` cost more per batch than hashing three records): one ``write`` of the
whole batch, one fsync (when ``fsync`` is on), the check that the segment file is still the
one in the directory, and rotation. With ``fsync`` off the write is made from the event loop
too while the segment keeps room (``INLINE_ROOM``): a thread round trip cost more than the
write to the page cache. Before the twenty-fifth session the thread encoded the batch as
well (paced: 32 records, then a 0.2 ms sleep): it held the GIL the event loop wanted, and
at saturation the loop's own work per request grew by as much as the encoding cost
(bench/README.md, "Twenty-fifth pass"). While the worker thread exists the process's GIL
switch interval is at most ``GIL_SWITCH_SECONDS`` (1 ms; CPython's default is 5 ms). The
timer's checkpoint, opening and sealing run in the thread, messages and all (``_run_sink``).
After each batch the writer waits ``batch_linger_seconds`` (default 250 ms; never past the
timer checkpoint's due time) for more records
unless a full batch is already queued, so under load batches are large: what a batch costs
(the write, the fsync and its thread round trip, the shipper's TLS write, the wake-ups) is
paid once per linger, not once per request (one record per batch cost the data path more
CPU per request than the rest of the sidecar's work on it; bench/README.md "Tenth pass").
The chain head in memory only advances when the bytes are on disk, so a failed write
leaves nothing to roll back but the file, which is truncated back (best effort).

On failure, with ``on_failure: fail_closed`` (default) the batch is kept and retried with
backoff; while failing, ``healthy`` and ``accepting()`` are False and ``submit`` refuses,
so the data path answers 503 instead of serving unrecorded requests. After any failure
the writer starts a new segment; if the old file could not be truncated back to a frame
boundary, the new header records the break (``break``) so that ``verify`` can name it.
With ``fail_open`` a failed batch is dropped and counted in ``lost``, and ``on_alert``
is called; requests keep being served.

On start the writer finds the chain head in the newest segment (``find_resume_point``)
and always opens a new segment; a damaged tail is declared in the new header. On
``aclose`` the queue is closed, everything queued is written, and the segment is sealed.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import math
import os
import queue
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from sidecar.audit.chain import FORMAT_LINKED, JSON_FORMATS, ChainHead, decode_frame
from sidecar.audit.crypto import DATA_KEY_FILE_BYTES, Encryptor, data_key_from_text
from sidecar.audit.record import AuditRecord, Row, row_wire
from sidecar.audit.segments import find_resume_point, list_segments, segment_name
from sidecar.audit.ship import (
    frame_messages,
    hostname,
    make_audit_directory,
    message_prefix,
    record_text,
    row_text,
    split_messages,
)
from sidecar.audit.shipper import Shipper
from sidecar.audit.signing import (
    MAX_KEY_FILE_BYTES,
    Checkpoint,
    Signer,
    read_small_file,
    signer_from_pem,
)
from sidecar.config.audit import DEFAULT_MAX_MESSAGE_BYTES, AuditConfig, load_hmac_key
from sidecar.config.values import parse_address
from sidecar.errors import ConfigError, Problem
from sidecar.logs import log

AlertCallback = Callable[[str, str], None]
# What ``submit`` takes: a record, or its stored map already built (``record.request_wire``,
# the data path's; a plain ``dict``, stored as it is), or a row of a usual shape
# (``record.request_row``: what the data path submits when ``AuditWriter.takes_rows``).
Entry = AuditRecord | dict[str, Any] | Row

COLLECTOR_ENV = "SIDECAR_AUDIT_COLLECTOR"  # audit.ship.address when the config has none
ALERT_WRITE_FAILED = "audit_write_failed"
ALERT_RECORDS_LOST = "audit_records_lost"
ALERT_RECOVERED = "audit_recovered"
# With fsync off, a batch is written from the event loop (a write to the page cache; the
# disk is not waited for) when the open segment keeps at least this much room after it, so
# that opening, rotating and sealing segments -- which fsync the directory -- stay in the
# thread.
INLINE_ROOM = 4 * 1024 * 1024
# While the worker thread runs, the GIL is handed back to a waiting thread (the event loop)
# after at most this long (sys.setswitchinterval; CPython's default is 5 ms).
GIL_SWITCH_SECONDS = 0.001
# A batch is encoded (frames, chain, checkpoints, encryption), and its syslog messages made,
# on the event loop, ENCODE_CHUNK_RECORDS records at a time with a yield to the loop's other
# tasks between; only the calls that block (write, fsync, stat, opening and sealing
# segments) go to the worker thread. Before the twenty-fifth session the thread encoded the
# batch too, in chunks with 0.2 ms sleeps between: it held the GIL for that work while the
# loop wanted it, and at saturation the loop then cost as much more per request as the
# encoding itself (bench/README.md, "Twenty-fifth pass").
ENCODE_CHUNK_RECORDS = 32
# The data key file (``encryption_key_file``) is looked at again at most this often, before a
# batch: a rotated key is in use within about this long of the first batch after it changed.
DATA_KEY_RECHECK_SECONDS = 1.0


async def _linger(seconds: float, holder: Any = None) -> None:
    """``trio.sleep(seconds)`` for the writer's linger after each batch, without the
    ``Cancelled`` that a sleep's expiry raises and catches: when the deadline passes, the
    abort callback puts the task back on the run queue and the wait returns normally (one
    wait per batch; the exception, its unwinding through three frames and the cancel scope's
    filtering of it cost about 28,600 instructions of a 0.5 ms sleep's 152,500 on an idle
    loop, bench/README.md "Ninth pass"). A cancellation from outside before the deadline
    is delivered as ``trio.sleep`` delivers it.

    ``holder`` (the writer): its ``_lingering`` is the waiting task while the linger lasts
    (None otherwise), so that ``AuditWriter._end_linger`` can end it early."""
    task = trio.lowlevel.current_task()
    deadline = trio.current_time() + seconds

    def wake(_raise_cancel: Any) -> trio.lowlevel.Abort:
        if holder is not None:
            holder._lingering = None
        if trio.current_time() < deadline:
            return trio.lowlevel.Abort.SUCCEEDED  # cancelled from outside: raise Cancelled
        trio.lowlevel.reschedule(task)  # the linger is over: continue as normal
        return trio.lowlevel.Abort.FAILED

    with trio.CancelScope(deadline=deadline):
        if holder is not None:
            holder._lingering = task
        try:
            await trio.lowlevel.wait_task_rescheduled(wake)
        finally:
            if holder is not None:
                holder._lingering = None


class _PartialWrite(Exception):
    """``done`` records of the batch were written before ``error``."""

    def __init__(self, done: int, error: OSError) -> None:
        super().__init__(str(error))
        self.done = done
        self.error = error


def _wire_of(entry: Entry) -> dict[str, Any]:
    """The map an entry stores: a map as it is, a row's (``record.row_wire``), a record's
    ``to_wire()``."""
    if entry.__class__ is dict:
        return entry
    if entry.__class__ is tuple:
        return row_wire(entry)
    return entry.to_wire()  # type: ignore[union-attr]


def _message_detail(seq: int, kind: str, payload: bytes, detail: Any) -> Any:
    """What a non-record frame's message carries: a signed checkpoint as ``/audit/head``
    serves it, anything else (header, unsigned seal) as stored."""
    if kind in ("chk", "end") and "sig" in detail:
        _s, prev, _k, _b = decode_frame(payload)
        return Checkpoint.from_frame(seq, prev, kind, detail).to_json()
    return detail


class _KeyFile:
    """A key file read again when its content changes (a rotated Secret: a volume update
    swaps the symlink, which the read follows). Every read is one read of the file: the
    content compared with the last is the content parsed, so a swap between two reads can
    never leave the key in use and the content remembered apart (``load``, then
    ``reloaded(kid)``). ``reloaded`` gives the key the changed file holds, or None when the
    file is as it was, or does not load (caught half written, removed, not a key:
    ``NAME_invalid`` is logged once per content, with ``kid`` the key still in use). The
    caller logs and uses a reloaded key."""

    def __init__(self, path: str, parse: Callable[[bytes], Any], name: str, what: str,
                 limit: int = MAX_KEY_FILE_BYTES) -> None:
        self.path, self._parse, self._name, self._what = path, parse, name, what
        self._limit = limit
        self._state: str | None = None  # the SHA-256 of the content in use
        self._refused: str | None = ""  # a content that did not load (None: unreadable)

    def load(self) -> Any:
        """The key the file holds now (at start); ``ValueError`` for a person."""
        data = read_small_file(self.path, self._what, self._limit)
        key = self._parse(data)
        self._state = hashlib.sha256(data).hexdigest()
        return key

    def reloaded(self, kid: str) -> Any:
        unread: ValueError | None = None
        try:
            data = read_small_file(self.path, self._what, self._limit)
            state: str | None = hashlib.sha256(data).hexdigest()
        except ValueError as exc:  # unreadable now (removed, not a regular file)
            data, state, unread = b"", None, exc
        if state == self._state or state == self._refused:
            return None
        try:
            if unread is not None:
                raise unread
            key = self._parse(data)
        except ValueError as exc:
            self._refused = state
            log(f"{self._name}_invalid", "error", path=self.path, error=str(exc), kid=kid)
            return None
        self._state, self._refused = state, ""
        return key


class _SegmentSink:
    """Synchronous disk side, one call at a time. What blocks (``prepare``, ``commit``,
    ``checkpoint``, ``close``, ``ensure_open``) runs in the worker thread (``commit`` with
    fsync off: on the event loop, ``AuditWriter._commit_inline``); the CPU work of a batch
    (``mark``, ``encode``, ``rollback``, ``messages``) on the event loop
    (``AuditWriter._append``)."""

    def __init__(self, config: AuditConfig, key: bytes | None, clock: Callable[[], float],
                 signer: Signer | None = None, encryptor: Encryptor | None = None, *,
                 signing_key: _KeyFile | None = None, data_key: _KeyFile | None = None
                 ) -> None:
        self.directory = config.path
        self.signer = signer
        # The key files ``signer`` and ``encryptor`` were loaded from (``_KeyFile.load``),
        # read again when they change: the signing key at the next signed frame
        # (``_signer_now``), the data key at most every DATA_KEY_RECHECK_SECONDS, before a
        # batch (``data_key_due``, ``_data_key_now``). Without them, keys never change.
        self._signing_key = signing_key if signer is not None else None
        self.encryptor = encryptor
        self._data_key = data_key if encryptor is not None else None
        self._data_checked = time.monotonic()
        self.checkpoint_every = config.checkpoint_every_records
        self.checkpoint_seconds = config.checkpoint_every_seconds
        # Frames written since the last signed frame, records among them, and when (monotonic)
        # the first of them was written: the unsigned tail the timer bounds.
        self.unsigned_frames = 0
        self.unsigned_records = 0
        self.unsigned_since = 0.0
        self.last_checkpoint: Checkpoint | None = None
        self.ship_host: str | None = None  # set when shipping: frames become messages
        self.ship_app = "sidecar"
        self.ship_max_message = DEFAULT_MAX_MESSAGE_BYTES  # ``audit.ship.max_message_bytes``
        self.max_bytes = config.max_segment_bytes
        self.max_segments = config.max_segments
        self.fsync = config.fsync
        self.key = key
        self.clock = clock
        self.head: ChainHead | None = None
        self.fd: int | None = None
        self.fd_id: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of ``fd``
        self.path: str | None = None
        self.size = 0
        # What the next header says about the segment before it.
        self.next_info: dict[str, Any] = {}

    @property
    def segment(self) -> str | None:
        return os.path.basename(self.path) if self.path else None

    def ensure_open(self) -> None:
        if self.fd is not None:
            return
        if self.head is None:
            rp = find_resume_point(self.directory, self.key)
            head = ChainHead(rp.next_seq, rp.prev, self.key)
            if self.ship_host is not None:
                # Shipped: records are stored as the JSON their messages carry, format 3
                # (format 2 left the frame before an encrypted record bound only by the
                # data key: chain.py, "Format 3"; found by a hostile review).
                head.journal = []
                head.version = FORMAT_LINKED
            info: dict[str, Any] = {"prev_segment": rp.last_segment,
                                    "prev_sealed": rp.sealed if rp.last_segment else None}
            if rp.damage is not None:
                info["break"] = {"after_seq": rp.next_seq - 1, "segment": rp.damaged_segment,
                                 "reason": rp.damage}
            if rp.last_segment is not None:
                # The restart event: this process continues the chain found on disk, after
                # its last frame; never from an earlier point, so no seq is written twice.
                info["restart"] = {"time": self.clock(), "after_seq": rp.next_seq - 1,
                                   "prev_sealed": rp.sealed,
                                   "last_signed_seq": rp.last_signed_seq}
        else:
            head, info = self.head, self.next_info
        state = head.state
        created = self.clock()
        path = os.path.join(self.directory, segment_name(head.next_seq, created))
        if self.encryptor is not None:
            info = {**info, "enc": self.encryptor.header_info()}
        # Whether this writer deletes old segments: a trail whose headers all say "all"
        # cannot honestly start after seq 0 (verify: oldest_segments_missing).
        info = {**info, "retention": self.max_segments if self.max_segments is not None
                else "all"}
        header = head.header(created, **info)
        checkpoint: Checkpoint | None = None
        if self.signer is not None and "restart" in info:
            # Sign the restart at once: the restarted writer vouches for the chain as it
            # found it (the header names what was unsigned before), and the unsigned tail
            # of the previous run does not add to this run's.
            chk_state = head.state
            data, body = head.signed("chk", self._signer_now(), self._checkpoint_body())
            header += data
            checkpoint = Checkpoint.from_frame(chk_state[0], chk_state[1], "chk", body)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                         0o640)
        except OSError:
            head.restore(state)  # a failed attempt must not consume a seq (a gap = BROKEN)
            raise
        try:
            self._write_all(fd, header)
            if self.fsync:
                os.fsync(fd)
                self._sync_directory()
            # The open file's identity, fixed for the descriptor's life: the still-linked
            # check after each batch compares it with what the path names now (one
            # ``stat`` per batch instead of a ``stat`` and an ``fstat``).
            fst = os.fstat(fd)
        except OSError:
            head.restore(state)
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        self.head, self.fd, self.path, self.size = head, fd, path, len(header)
        self.fd_id = (fst.st_dev, fst.st_ino)
        self.next_info = {}
        if checkpoint is not None:
            self.unsigned_frames = self.unsigned_records = 0
            self.last_checkpoint = checkpoint
        else:
            self._note_unsigned(1, 0)

    def data_key_due(self, now: float) -> bool:
        """Is the data key file to be looked at again before the next batch?"""
        return (self._data_key is not None
                and now - self._data_checked >= DATA_KEY_RECHECK_SECONDS)

    def append(self, records: list[Entry]) -> None:
        """Write ``records`` (rotating as needed) in one call: ``prepare``, ``encode`` and
        ``commit``, as ``AuditWriter._append`` runs them in steps; ``_PartialWrite`` says
        how far it got."""
        self.prepare()
        mark = self.mark()
        try:
            data, checkpoint = self.encode(records)
        except BaseException:
            self.rollback(mark)
            raise
        self.commit(mark, data, checkpoint, len(records))

    def prepare_due(self) -> bool:
        """Has ``prepare`` something to do before the next batch?"""
        return self.fd is None or self.data_key_due(time.monotonic())

    def prepare(self) -> None:
        """Before a batch: a rotated data key looked at (at most once a second), a segment
        open to write to; ``_PartialWrite(0)`` when that fails (blocking: the thread)."""
        try:
            if self.data_key_due(time.monotonic()):
                self._data_key_now()
            self.ensure_open()
        except OSError as exc:
            raise _PartialWrite(0, exc) from None

    def mark(self) -> _Mark:
        """Where the head stands before a batch is encoded (``rollback``, ``commit``)."""
        assert self.head is not None and self.fd is not None
        return self.head.state, (self.unsigned_frames, self.unsigned_records,
                                 self.unsigned_since)

    def rollback(self, mark: _Mark) -> None:
        """Undo what was encoded since ``mark`` (nothing of it was written)."""
        assert self.head is not None
        self.head.restore(mark[0])
        self.unsigned_frames, self.unsigned_records, self.unsigned_since = mark[1]

    def encode(self, records: list[Entry]) -> tuple[bytes | bytearray, Checkpoint | None]:
        """The frames of ``records`` from the head on (advancing it), with a signed
        checkpoint after every ``checkpoint_every`` records (the counters carry over from
        call to call: encoded in chunks, a batch gives the bytes one call gives). Pure CPU."""
        return self._encode_signed(records)

    def commit(self, mark: _Mark, data: bytes | bytearray, checkpoint: Checkpoint | None,
               records: int) -> None:
        """Write and sync ``data`` (encoded from ``mark`` on: ``records`` records), then
        rotate if the segment is full; ``_PartialWrite`` says how far it got."""
        try:
            self._write_frame(mark[0], data)
        except OSError as exc:
            # The head advances only when the bytes are on disk: the batch is retried (or
            # counted lost) and the next segment chains from the last frame that was kept.
            self.unsigned_frames, self.unsigned_records, self.unsigned_since = mark[1]
            raise _PartialWrite(0, exc) from None
        if checkpoint is not None:
            self.last_checkpoint = checkpoint
        self.size += len(data)
        if self.size >= self.max_bytes:
            try:
                self._rotate()
            except OSError as exc:
                raise _PartialWrite(records, exc) from None

    def close(self) -> None:
        """Seal and close the current segment (clean shutdown)."""
        if self.fd is None or self.head is None:
            return
        self._seal("shutdown")

    def take_messages(self) -> list[bytes]:
        """Syslog messages for the frames written to disk since the last call."""
        waiting = self.messages_waiting()
        if not waiting:
            return []
        out = self.messages(self.message_prefix(), 0, waiting)
        self.messages_taken(waiting)
        return out

    def messages_waiting(self) -> int:
        """How many frames written since the last take wait to become syslog messages."""
        head = self.head
        if head is None or not head.journal or self.ship_host is None:
            return 0
        return len(head.journal)

    def message_prefix(self) -> bytes:
        assert self.ship_host is not None
        return message_prefix(self.clock(), self.ship_host, self.ship_app)

    def messages(self, prefix: bytes, start: int, stop: int) -> list[bytes]:
        """The messages of waiting frames ``start`` to ``stop`` (taken off by
        ``messages_taken``): a batch's are made in chunks on the event loop."""
        assert self.head is not None and self.head.journal is not None
        out = frame_messages(prefix, self.head.journal[start:stop], _message_detail)
        # (one C pass over the lengths: a message over the collector's size goes in parts)
        if out and max(map(len, out)) > self.ship_max_message:
            out = split_messages(out, self.ship_max_message)
        return out

    def messages_taken(self, count: int) -> None:
        assert self.head is not None and self.head.journal is not None
        del self.head.journal[:count]

    def checkpoint_due(self, now: float, every_seconds: float) -> float | None:
        """Seconds until the timer checkpoint is due (0 = now), None when nothing waits."""
        if self.signer is None or self.unsigned_frames == 0 or self.fd is None:
            return None
        return max(0.0, self.unsigned_since + every_seconds - now)

    def checkpoint(self) -> None:
        """Sign the head now (the timer's checkpoint); OSError when it cannot be written."""
        if self.signer is None or self.fd is None or self.head is None or not self.unsigned_frames:
            return
        state = self.head.state
        data, body = self.head.signed("chk", self._signer_now(), self._checkpoint_body())
        self._write_frame(state, data)
        self.size += len(data)
        self.last_checkpoint = self._signed(state, "chk", body)

    def _write_frame(self, state: tuple[int, bytes], data: bytes | bytearray) -> None:
        """Write frames made from head ``state`` (fsync, still linked); on failure roll
        the head back and abandon the segment at its last good size."""
        assert self.fd is not None and self.head is not None
        try:
            self._write_all(self.fd, data)
            if self.fsync:
                os.fsync(self.fd)
            self._check_still_linked()
        except OSError as exc:
            self.head.restore(state)
            self._abandon(self.size, exc)
            raise

    # -- internals

    def _checkpoint_body(self) -> dict[str, Any]:
        # ``every`` tells the verifier how long an honest unsigned tail can be.
        body: dict[str, Any] = {"time": self.clock()}
        if self.signer is not None:
            body["every"] = [self.checkpoint_every, self.checkpoint_seconds]
        return body

    def _note_unsigned(self, frames: int, records: int) -> None:
        if frames and not self.unsigned_frames:
            self.unsigned_since = time.monotonic()
        self.unsigned_frames += frames
        self.unsigned_records += records

    def _signed(self, state: tuple[int, bytes], kind: str, body: dict[str, Any]) -> Checkpoint:
        """The frame at ``state`` is a signed checkpoint: the unsigned tail restarts at 0."""
        self.unsigned_frames = self.unsigned_records = 0
        return Checkpoint.from_frame(state[0], state[1], kind, body)

    def _encode_signed(self,
                       records: list[Entry]) -> tuple[bytes | bytearray, Checkpoint | None]:
        """The batch's frames, with a signed checkpoint after every ``checkpoint_every``
        records (so no running writer leaves more records unsigned than that)."""
        assert self.head is not None
        if self.signer is None:
            return self._encode(records), None
        out = bytearray()
        checkpoint: Checkpoint | None = None
        i = 0
        while i < len(records):
            room = self.checkpoint_every - self.unsigned_records
            chunk = records[i:i + room]
            i += len(chunk)
            out += self._encode(chunk)
            self._note_unsigned(len(chunk), len(chunk))
            if self.unsigned_records >= self.checkpoint_every:
                state = self.head.state
                data, body = self.head.signed("chk", self._signer_now(), self._checkpoint_body())
                out += data
                checkpoint = self._signed(state, "chk", body)
        return out, checkpoint

    def _encode(self, records: list[Entry]) -> bytes | bytearray:
        assert self.head is not None
        state = self.head.state
        try:
            if self.head.version in JSON_FORMATS:
                # The JSON the syslog messages carry is what is stored: encoded once.
                texts = [row_text(r) if r.__class__ is tuple
                         else record_text(r if r.__class__ is dict
                                          else r.to_wire())  # type: ignore[union-attr]
                         for r in records]
                return self.head.json_records(records, texts, self.encryptor, _wire_of)
            return self.head.records([r if r.__class__ is dict else _wire_of(r)
                                      for r in records], self.encryptor)
        except (TypeError, ValueError, OverflowError):
            self.head.restore(state)
        # One record in the batch cannot be packed (a bad ``extra`` value, say). Keep
        # exactly one record per event: store a stand-in that says so.
        out = bytearray()
        for r in records:
            s = self.head.state
            try:
                out += self.head.records([_wire_of(r)], self.encryptor)
            except (TypeError, ValueError, OverflowError) as exc:
                self.head.restore(s)
                when, rid = (r.get("t"), r.get("id", "")) if isinstance(r, dict) else (
                    (r[1], r[3]) if isinstance(r, tuple) else (r.time, r.request_id))
                out += self.head.records([{
                    "t": float(when) if isinstance(when, int | float) else 0.0,
                    "ev": "unencodable", "id": str(rid)[:200],
                    "why": f"{type(exc).__name__}: {exc}"[:200],
                }], self.encryptor)
        return bytes(out)

    @staticmethod
    def _write_all(fd: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def _check_still_linked(self) -> None:
        # Writes to a file whose directory entry was removed succeed on POSIX and are
        # lost; compare the open file with what the path names now.
        assert self.fd is not None and self.path is not None
        st = os.stat(self.path)
        if (st.st_dev, st.st_ino) != self.fd_id:
            raise OSError(errno.ENOENT, "segment file was removed or replaced", self.path)

    def _sync_directory(self) -> None:
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _abandon(self, good_size: int, exc: OSError) -> None:
        """Give up the current segment after a failed write; the next header says why."""
        assert self.fd is not None and self.head is not None
        clean = False
        try:
            os.ftruncate(self.fd, good_size)
            self._check_still_linked()
            clean = True
        except OSError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
        info: dict[str, Any] = {"prev_segment": self.segment, "prev_sealed": False}
        if not clean:
            info["break"] = {"after_seq": self.head.next_seq - 1, "segment": self.segment,
                             "reason": f"write failed: {exc.strerror or exc}"}
        self.fd, self.path, self.size, self.next_info = None, None, 0, info

    def _signer_now(self) -> Signer | None:
        """The signer for the next signed frame: when the key file changed since it was read
        (a rotated Secret), the new key (its ``kid`` is in every frame it signs; verify with
        a keyring of both public keys). A file that does not load (caught half written, not
        Ed25519) leaves the old key in use and is logged once per content."""
        if self._signing_key is None or self.signer is None:
            return self.signer
        signer: Signer | None = self._signing_key.reloaded(self.signer.kid)
        if signer is None:
            return self.signer
        log("audit_signing_key_reloaded", "info", path=self._signing_key.path, kid=signer.kid,
            previous_kid=self.signer.kid)
        self.signer = signer
        return signer

    def _data_key_now(self) -> None:
        """When the data key file changed (a rotated Secret) and holds another key, encrypt
        with that key from now on: the open segment is sealed and the next one's header names
        the new key (a segment's records are all under the key its header names). A file that
        does not load (caught half written, not a key) leaves the last key in use and is
        logged once per content. OSError when the rotation cannot be written (the records
        are retried; the next segment is opened with the new key)."""
        assert self._data_key is not None and self.encryptor is not None
        self._data_checked = time.monotonic()
        previous = self.encryptor
        encryptor: Encryptor | None = self._data_key.reloaded(previous.kid)
        if encryptor is None or encryptor.kid == previous.kid:
            return  # unchanged, not loaded, or the same key written again
        self.encryptor = encryptor
        log("audit_data_key_reloaded", "info", path=self._data_key.path, kid=encryptor.kid,
            previous_kid=previous.kid)
        if self.fd is not None:
            self._rotate()

    def _seal(self, why: str) -> None:
        assert self.fd is not None and self.head is not None
        state = self.head.state
        seal, body = self.head.signed("end", self._signer_now(),
                                      {"why": why, **self._checkpoint_body()})
        self._write_frame(state, seal)
        assert self.fd is not None
        os.close(self.fd)
        if self.signer is not None:
            self.last_checkpoint = self._signed(state, "end", body)
        self.next_info = {"prev_segment": self.segment, "prev_sealed": True}
        self.fd, self.path, self.size = None, None, 0

    def _rotate(self) -> None:
        self._seal("rotate")
        self.ensure_open()
        if self.max_segments is not None:
            self._apply_retention()

    def _apply_retention(self) -> None:
        assert self.max_segments is not None
        segments = list_segments(self.directory)
        for seg in segments[: max(0, len(segments) - self.max_segments)]:
            if seg.path != self.path:
                try:
                    os.unlink(seg.path)
                except OSError:
                    pass  # retried at the next rotation


# The worker thread's name, also given to the operating system (``top -H``, ``ps -L``,
# ``/proc/PID/task/TID/comm``), so that what the trail costs is visible per thread.
THREAD_NAME = "sidecar-audit"


# (the head's state, and the unsigned-tail counters) before a batch: ``_SegmentSink.mark``
_Mark = tuple[tuple[int, bytes], tuple[int, int, float]]


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the kernel (Linux: its ``comm``, 15 bytes at
    most); elsewhere, or when refused, nothing (the name is only for people)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


class _DiskThread:
    """The writer's one worker thread for disk calls (``call``), started at the first and
    ended by ``close``: what ``trio.to_thread.run_sync`` does for the writer, without its
    per-call layers (capacity limiter, thread cache hand-off, outcome objects, context
    copy), which cost the writer about as many instructions per batch as packing and
    hashing 3 records. The same promise: the calling task waits until the call has
    returned or raised, and a cancellation waits for it too (the disk call is never
    abandoned half-way, so the chain head is never left mid-write)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.calls = 0  # calls run in the thread (tests: which batches went there)
        # CPU seconds the thread has used, as of the end of its latest call (all threads
        # this object started: a closed thread's time is kept).
        self.cpu_seconds = 0.0
        self._cpu_base = 0.0

    async def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` in the thread; return when it returned, raise what it raised."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._thread is None:
            # The thread holds the GIL while it encodes a batch; the event loop waiting for
            # it gets it back within the switch interval: 1 ms, not CPython's 5.
            if sys.getswitchinterval() > GIL_SWITCH_SECONDS:
                sys.setswitchinterval(GIL_SWITCH_SECONDS)
            self._thread = threading.Thread(target=self._work, name=THREAD_NAME, daemon=True)
            self._thread.start()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        failed: list[BaseException] = []

        def job() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 -- handed to the waiting task
                failed.append(exc)
            # The thread's own CPU time (one clock read per call, i.e. per batch), before the
            # caller resumes: what the trail costs in this thread, for ``statistics()``.
            self.cpu_seconds = self._cpu_base + time.thread_time()
            token.run_sync_soon(trio.lowlevel.reschedule, task)

        self.calls += 1
        self._jobs.put(job)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if failed:
            raise failed[0]

    def _work(self) -> None:
        _name_os_thread(THREAD_NAME)
        # A new thread's clock starts at 0: the time of the threads before it carries over.
        self._cpu_base = self.cpu_seconds - time.thread_time()
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            job()

    def close(self) -> None:
        """Let the thread end (after a call in progress, if any)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


@dataclass(frozen=True, slots=True)
class AuditWriterStatistics:
    """A snapshot for metrics and /readyz."""

    queue_depth: int
    queue_size: int
    written: int
    lost: int
    rejected: int  # submit() refused in fail_closed mode (the request must be refused)
    failures: int
    healthy: bool
    segment: str | None
    next_seq: int | None
    last_error: str | None
    last_checkpoint: Checkpoint | None = None  # the newest signed frame on disk
    shipped: int = 0  # syslog messages sent (one per frame; resent ones counted again)
    ship_dropped: int = 0  # frames never shipped (queue full, or still queued at exit)
    ship_queue_depth: int = 0
    ship_queue_bytes: int = 0
    ship_connected: bool = False
    # CPU seconds used by the writer's worker thread (encoding, signing, encryption, syslog
    # messages, write and fsync of the batches written there).
    thread_cpu_seconds: float = 0.0


class AuditWriter:
    """Bounded, batching, hash-chaining audit writer. See the module docstring.

    ``on_alert(kind, message)`` is called (from the writer's task or from ``submit``) on
    the first write failure, on the first lost record of a streak, and on recovery.
    ``retry_initial`` / ``retry_max`` bound the backoff between write attempts.
    Raises ``ConfigError`` when the HMAC key file is unusable (fail at start, not later).
    """

    def __init__(
        self, config: AuditConfig, *, clock: Callable[[], float] = time.time,
        on_alert: AlertCallback | None = None, retry_initial: float = 0.1,
        retry_max: float = 5.0, identity: str = "",
    ) -> None:
        signer = signing_key = None
        if config.signing_key_file is not None:
            signing_path = config.signing_key_file
            signing_key = _KeyFile(
                signing_path, lambda data: signer_from_pem(data, signing_path, identity),
                "audit_signing_key", "signing key file")
            try:
                signer = signing_key.load()
            except ValueError as exc:
                raise ConfigError([Problem(signing_path, None, "audit.signing_key_file",
                                           str(exc))]) from None
        encryptor = data_key = None
        if config.encryption_key_file is not None:
            data_path = config.encryption_key_file
            data_key = _KeyFile(
                data_path, lambda data: Encryptor(data_key_from_text(data, data_path)),
                "audit_data_key", "data key file", DATA_KEY_FILE_BYTES)
            try:
                encryptor = data_key.load()
            except ValueError as exc:
                raise ConfigError([Problem(data_path, None, "audit.encryption_key_file",
                                           str(exc))]) from None
        key = None
        if config.hmac_key_file is not None:
            try:
                key = load_hmac_key(config.hmac_key_file)
            except ValueError as exc:
                raise ConfigError([Problem(config.hmac_key_file, None, "audit.hmac_key_file",
                                           str(exc))]) from None
        self.config = config
        self.fail_open = config.on_failure == "fail_open"
        self._queue: deque[Entry] = deque()
        # The bound ``submit`` checks: ``queue_size``, plus one while the record that woke the
        # waiting writer task is still queued (it is the writer's already, as a memory channel
        # hands a record straight to a waiting receiver).
        self._limit = config.queue_size
        # Set by ``submit``/``aclose`` to wake the writer task; not None only while it waits
        # on an empty queue.
        self._wake: trio.Event | None = None
        # The writer task while it lingers after a batch (``_linger``), else None; ``submit``
        # ends the linger once ``_flush_at`` records wait: a full batch, or half the queue
        # when the queue is the smaller (so that a short queue never fills while the writer
        # waits, which fail_closed would answer with 503s).
        self._lingering: trio.lowlevel.Task | None = None
        self._flush_at = max(1, min(config.batch_size, config.queue_size // 2))
        self._sink = _SegmentSink(config, key, clock, signer, encryptor,
                                  signing_key=signing_key, data_key=data_key)
        self._disk = _DiskThread()
        self.shipper: Shipper | None = None
        if config.ship is not None:
            ship = config.ship
            if ship.address is None:
                # The injector passes the collector as an environment variable.
                try:
                    ship = dataclasses.replace(
                        ship, address=parse_address(os.environ.get(COLLECTOR_ENV)))
                except ValueError as exc:
                    raise ConfigError([Problem(COLLECTOR_ENV, None, "audit.ship.address",
                                               f"no address in the config and {COLLECTOR_ENV}"
                                               f" is not HOST:PORT ({exc})")]) from None
            try:
                self.shipper = Shipper(ship, retry_initial=retry_initial,
                                       retry_max=retry_max)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError([Problem(ship.ca_file, None, "audit.ship",
                                           f"cannot load TLS files: {exc}")]) from None
            self._sink.ship_host = hostname()
            self._sink.ship_app = ship.app_name
            self._sink.ship_max_message = ship.max_message_bytes
        # A shipping writer stores records as JSON (format 3): the data path then submits
        # its usual records as rows (``record.request_row``), whose JSON is filled without
        # a map; a writer storing msgpack (format 1) packs maps, which rows would only delay.
        self.takes_rows = self.shipper is not None
        # Only a ``required`` shipper can refuse (ship.mode is fixed for the writer's life):
        # the per-request checks skip the call otherwise.
        self._gate = self.shipper if self.shipper is not None and self.shipper.required else None
        self._on_alert = on_alert
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self.healthy = False  # nothing is accepted (fail_closed) until a segment is open
        self._closing = False
        self._running = False
        self._done = trio.Event()
        self._inflight = 0
        self._losing = False
        self._probe_scope: trio.CancelScope | None = None
        self.written = 0
        self.lost = 0
        self.rejected = 0
        self.failures = 0
        self.last_error: str | None = None

    # -- request path (never awaits)

    def submit(self, record: Entry, *, admitted: bool = False,
               served: bool | None = None) -> bool:
        """Queue ``record``; False means it will not be written (see ``accepting``).
        ``record`` is an ``AuditRecord`` or the map it stores (``to_wire()``'s, as
        ``record.request_wire`` builds it for the data path: a plain ``dict``), or, for a
        writer that ``takes_rows``, a row (``record.request_row``).

        ``admitted``: the record is for a request that was already served (it passed
        ``accepting()`` before the writer learned of a failure). It is queued even while
        the writer is failing, as long as the bounded queue has room, and written when the
        disk recovers; refusing it would lose the record of a served request.
        ``served`` (default: ``admitted``): whether the record is of a request or stream that
        was served -- one that finds no room is then counted lost (``_count_unrecorded``);
        the record of a request refused because the trail could not record
        (``audit_unavailable``) is admitted but not served.
        """
        lost = admitted if served is None else served
        if self._closing:
            self._count_unrecorded(lost)
            return False
        if not admitted and ((not self.fail_open and not self.healthy)
                             or (self._gate is not None and not self._gate.accepting())):
            self.rejected += 1
            return False
        queue = self._queue
        if len(queue) >= self._limit:
            self._count_unrecorded(lost)
            return False
        queue.append(record)
        wake = self._wake
        if wake is not None:
            self._wake = None
            self._limit += 1
            wake.set()
        elif self._lingering is not None and len(queue) >= self._flush_at:
            self._end_linger()  # a full batch waits: no reason to linger on
        return True

    def _end_linger(self) -> None:
        """End the writer's linger after a batch now (a full batch queued, or closing)."""
        task = self._lingering
        if task is not None:
            self._lingering = None
            trio.lowlevel.reschedule(task)

    def accepting(self) -> bool:
        """May the data path serve a request now? (fail_closed: only if it can be recorded)."""
        if self._closing:
            return False
        if self._gate is not None and not self._gate.accepting():
            return False  # ship.mode: required, and records cannot be shipped now
        return self.fail_open or (self.healthy and len(self._queue) < self._limit)

    def _count_unrecorded(self, served: bool = False) -> None:
        """A record that will not be written: lost (counted, alerted) in fail_open, and in
        fail_closed too when it is ``served`` -- its request or stream was served, so it
        is a record gone, not a request refused (before, such records were counted only as
        ``rejected``, which no metric shows: a hostile review found TCP streams' records
        dropped unseen while the queue was full)."""
        if self.fail_open or served:
            self.lost += 1
            if not self._losing:
                self._losing = True
                self._alert(ALERT_RECORDS_LOST, "audit queue full: records are being lost")
        else:
            self.rejected += 1

    def statistics(self) -> AuditWriterStatistics:
        """A snapshot of the writer's state for metrics and ``/status``: queue depth (queued plus
        in flight) and size, records written, lost and rejected, failures, health, the current
        segment and sequence number, the last error and checkpoint, the worker thread's CPU
        time, and the shipper's counters when shipping is configured."""
        head = self._sink.head
        return AuditWriterStatistics(
            queue_depth=len(self._queue) - self._limit + self.config.queue_size + self._inflight,
            queue_size=self.config.queue_size,
            written=self.written, lost=self.lost, rejected=self.rejected,
            failures=self.failures, healthy=self.healthy, segment=self._sink.segment,
            next_seq=head.next_seq if head is not None else None, last_error=self.last_error,
            last_checkpoint=self._sink.last_checkpoint,
            thread_cpu_seconds=self._disk.cpu_seconds,
            **({} if self.shipper is None else {  # type: ignore[arg-type]
                "shipped": self.shipper.sent, "ship_dropped": self.shipper.dropped,
                "ship_queue_depth": self.shipper.queue_depth,
                "ship_queue_bytes": self.shipper.queue_bytes,
                "ship_connected": self.shipper.connected}),
        )

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        """The newest signed checkpoint written (the anchor served on ``/audit/head``)."""
        return self._sink.last_checkpoint

    # -- the writer task

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Write until ``aclose``; call ``task_status.started()`` after the first attempt
        to open a segment (healthy or not, so a broken disk cannot hang start-up). With
        shipping, also ship until everything written (the final seal included) is sent."""
        self._running = True
        try:
            if self.shipper is None:
                await self._write_loop(task_status)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.shipper.run)
                await self._write_loop(task_status)
                await self.shipper.aclose()
        finally:
            self._disk.close()
            self._done.set()

    async def _run_sink(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a disk operation (opening, a timer checkpoint, sealing: few frames) in the
        worker thread; the frames it put on disk are turned into syslog messages there too
        and offered to the shipper."""
        messages: list[bytes] = []

        def call() -> None:
            try:
                fn(*args)
            finally:
                messages.extend(self._sink.take_messages())

        try:
            await self._disk.call(call)
        finally:
            if self.shipper is not None and messages:
                self.shipper.offer(messages)

    async def _write_loop(self, task_status: Any) -> None:
        batch: list[Entry] = []
        try:
            try:
                await self._run_sink(self._first_open)
                self._set_healthy()
            except OSError as exc:
                self._note_failure(exc)
            task_status.started()
            lingered = False
            while True:
                if not self.healthy and not self.fail_open:
                    await self._probe_until_open()
                got = await self._next_batch(lingered)
                lingered = False
                if got is None:
                    await self._checkpoint()
                    continue
                batch = got
                if not batch:
                    break
                await self._write(batch)
                batch = []
                # After a batch, while fewer than ``_flush_at`` records wait, let more arrive
                # for ``batch_linger_seconds`` before the next batch: under load one batch
                # (one write, fsync, TLS write) carries many records instead of one per
                # request. Records reach the file this much later, never more.
                linger = self._linger_seconds()
                if not self._closing and linger > 0 and len(self._queue) < self._flush_at:
                    await _linger(linger, self)
                    lingered = True
            try:
                await self._run_sink(self._sink.close)
            except OSError as exc:
                self._note_failure(exc)
        finally:
            # Cancelled before the queue was drained: what is left is lost; say so.
            left = len(batch) + len(self._queue)
            if left:
                self.lost += left
                self._queue.clear()
                self._inflight = 0

    def _linger_seconds(self) -> float:
        """How long to linger after a batch: ``batch_linger_seconds``, but never past the
        moment the timer checkpoint is due, so that the unsigned tail stays within
        ``checkpoint_every_seconds`` of its first frame whatever the linger."""
        linger = self.config.batch_linger_seconds
        due = self._sink.checkpoint_due(time.monotonic(), self.config.checkpoint_every_seconds)
        return linger if due is None else min(linger, due)

    def _first_open(self) -> None:
        if make_audit_directory(self.config.path):  # only at first start, see docs
            log("audit_directory_world_writable", "warning", path=self.config.path)
        self._sink.ensure_open()

    async def _probe_until_open(self) -> None:
        delay = self._retry_initial
        with trio.CancelScope() as scope:
            self._probe_scope = scope
            while not self._closing:
                try:
                    await self._run_sink(self._sink.ensure_open)
                except OSError as exc:
                    self._note_failure(exc)
                    await trio.sleep(delay)
                    delay = min(delay * 2, self._retry_max)
                else:
                    self._set_healthy()
                    break
        self._probe_scope = None

    async def _next_batch(self, yielded: bool = False) -> list[Entry] | None:
        """The next batch; [] at the end; None when the timer checkpoint is due first.
        ``yielded``: the writer has just let the loop run (the linger)."""
        due = self._sink.checkpoint_due(time.monotonic(), self.config.checkpoint_every_seconds)
        queue = self._queue
        if queue:
            # Records already wait (a loaded sidecar, after the linger): nothing to wait
            # for, so no cancel scope with the timer's deadline, and a yield only if the
            # linger did not just give one (a full queue must not starve the loop).
            if not yielded:
                await trio.lowlevel.checkpoint()
            timed_out = due == 0.0
        else:
            with trio.move_on_after(due if due is not None else math.inf) as timer:
                while not queue:
                    if self._closing:
                        return []  # closed and drained
                    self._wake = wake = trio.Event()
                    await wake.wait()
            timed_out = timer.cancelled_caught
        self._wake = None
        self._limit = self.config.queue_size
        if timed_out:
            return None
        limit = self.config.batch_size
        if len(queue) <= limit:
            batch = list(queue)
            queue.clear()
        else:
            popleft = queue.popleft
            batch = [popleft() for _ in range(limit)]
        self._inflight = len(batch)
        return batch

    def _commit_inline(self, size: int) -> bool:
        """May a batch of ``size`` bytes be written from the event loop? Only with fsync off
        (the write goes to the page cache, nothing waits for the disk), while healthy, and
        when the open segment keeps ``INLINE_ROOM`` after it, so that rotating and sealing
        (which fsync the directory) stay in the thread; a thread round trip costs more than
        such a write."""
        sink = self._sink
        return (not self.config.fsync and self.healthy and sink.fd is not None
                and sink.size + size + INLINE_ROOM < sink.max_bytes)

    async def _append(self, records: list[Entry]) -> None:
        """Write a batch: what blocks in the worker thread (``prepare`` when due; the write,
        fsync and rotation), the CPU work on the event loop in chunks of
        ``ENCODE_CHUNK_RECORDS`` with a yield between (the frames, chain, checkpoints and
        encryption before the write, the syslog messages after it): a thread encoding the
        batch held the GIL the loop wanted (see ``ENCODE_CHUNK_RECORDS``). The messages are
        made and offered by ``_ship_messages`` once the batch is counted written."""
        sink = self._sink
        if sink.prepare_due():
            await self._disk.call(sink.prepare)
        mark = sink.mark()
        parts: list[bytes | bytearray] = []
        checkpoint: Checkpoint | None = None
        try:
            for i in range(0, len(records), ENCODE_CHUNK_RECORDS):
                if i:
                    await trio.lowlevel.checkpoint()
                part, signed = sink.encode(records[i:i + ENCODE_CHUNK_RECORDS])
                parts.append(part)
                checkpoint = signed or checkpoint
        except BaseException:
            sink.rollback(mark)  # cancelled (or a bug): nothing of the batch was written
            raise
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        commit = functools.partial(sink.commit, mark, data, checkpoint, len(records))
        try:
            if self._commit_inline(len(data)):
                commit()
            else:
                await self._disk.call(commit)
        except _PartialWrite:
            self._offer(sink.take_messages())  # what did reach the disk
            raise

    async def _ship_messages(self) -> None:
        """Offer the syslog messages of the frames just written, made in chunks on the
        event loop. Cancelled half-way, the rest wait for the next take."""
        sink = self._sink
        waiting = sink.messages_waiting()
        if not waiting:
            return
        prefix = sink.message_prefix()
        out: list[bytes] = []
        for i in range(0, waiting, ENCODE_CHUNK_RECORDS):
            if i:
                await trio.lowlevel.checkpoint()
            out += sink.messages(prefix, i, min(waiting, i + ENCODE_CHUNK_RECORDS))
        sink.messages_taken(waiting)
        self._offer(out)

    def _offer(self, messages: list[bytes]) -> None:
        if self.shipper is not None and messages:
            self.shipper.offer(messages)

    async def _checkpoint(self) -> None:
        try:
            await self._run_sink(self._sink.checkpoint)
        except OSError as exc:
            self._note_failure(exc)

    async def _write(self, batch: list[Entry]) -> None:
        delay = self._retry_initial
        taken = batch  # the caller's list: emptied once written (not lost if cancelled now)
        while batch:
            try:
                await self._append(batch)
            except _PartialWrite as exc:
                self.written += exc.done
                batch = batch[exc.done:]
                self._note_failure(exc.error)
                if self.fail_open:
                    self.lost += len(batch)
                    self._alert(ALERT_RECORDS_LOST, f"{len(batch)} audit records lost")
                    batch = []
                self._inflight = len(batch)
                await trio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
            else:
                self.written += len(batch)
                batch = []
                taken.clear()
                self._set_healthy()
                # (after the count: cancelled while its messages are made, the batch is
                # on disk all the same, not lost)
                await self._ship_messages()
        self._inflight = 0

    def _set_healthy(self) -> None:
        if not self.healthy and self.failures:
            self._alert(ALERT_RECOVERED, "audit writes recovered")
        self.healthy = True
        self._losing = False

    def _note_failure(self, exc: OSError) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc.strerror or exc}"
        if self.healthy or self.failures == 1:
            self._alert(ALERT_WRITE_FAILED, f"audit writes failing: {self.last_error}")
        self.healthy = False

    def _alert(self, kind: str, message: str) -> None:
        if self._on_alert is None:
            return
        try:
            self._on_alert(kind, message)
        except Exception as exc:  # noqa: BLE001 -- a broken alert hook must not stop the audit trail
            self.last_error = f"on_alert failed: {exc!r}"

    async def aclose(self) -> None:
        """Stop accepting, write everything queued, seal the segment, and return.

        Bound it from outside (``trio.move_on_after(drain_timeout)``) when the disk may be
        failing; records still queued when the writer task is cancelled count as lost.
        """
        if not self._closing:
            self._closing = True
            wake = self._wake
            if wake is not None:
                self._wake = None
                wake.set()
            self._end_linger()  # write what is queued now, not after the linger
            await trio.lowlevel.checkpoint()
            if self._probe_scope is not None:
                self._probe_scope.cancel()
        if not self._running:
            return
        await self._done.wait()
