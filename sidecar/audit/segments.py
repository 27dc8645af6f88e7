"""Segment files on disk: names, frame reading, verification, record iteration.

Theory of operation
-------------------
A directory holds segment files named ``audit-<SEQ>-<STAMP>.log``: SEQ is the zero-padded
(20 digits) seq of the segment's header frame, STAMP the UTC creation time
(``YYYYMMDDTHHMMSSffffffZ``). Sorting by (SEQ, STAMP) gives chain order.

Reading is streaming: one frame at a time through a buffered file, never a whole file.
A frame whose length prefix or body is cut short, or whose length is absurd, ends the
readable part of that segment (``SegmentDamage``).

``verify`` walks every segment with ``ChainVerifier``. A problem inside segment *i* is
*declared* when the header of segment *i+1* carries a ``break`` entry and links to the
last good frame of *i* (the writer writes that after it found a damaged tail on restart
or after a failed write); verification then goes on, but ``ok`` is False unless the
caller accepts declared breaks. Any other problem is the first broken point and
verification stops there.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

from sidecar.audit.chain import (
    GENESIS,
    LENGTH,
    MAX_FRAME_BYTES,
    ChainError,
    ChainVerifier,
    Frame,
    FrameError,
    decode_frame,
)
from sidecar.audit.record import AuditRecord

SEGMENT_NAME = re.compile(r"^audit-(\d{20})-(\d{8}T\d{12}Z)\.log$")
READ_BUFFER = 256 * 1024


@dataclass(frozen=True, slots=True, order=True)
class SegmentFile:
    """One segment file; orders by chain position."""

    start_seq: int
    stamp: str
    path: str = field(compare=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def segment_name(start_seq: int, created: float) -> str:
    """File name for a segment whose header has seq ``start_seq``."""
    micro = int(round((created % 1) * 1_000_000)) % 1_000_000
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created)) + f"{micro:06d}Z"
    return f"audit-{start_seq:020d}-{stamp}.log"


def list_segments(directory: str) -> list[SegmentFile]:
    """Segment files of ``directory`` in chain order (other files are ignored)."""
    out: list[SegmentFile] = []
    with os.scandir(directory) as it:
        for entry in it:
            m = SEGMENT_NAME.match(entry.name)
            if m and entry.is_file(follow_symlinks=False):
                out.append(SegmentFile(int(m.group(1)), m.group(2), entry.path))
    out.sort()
    return out


def resolve_segments(path: str) -> list[SegmentFile]:
    """A directory's segments, or one named file (any name) as a single segment."""
    if os.path.isdir(path):
        return list_segments(path)
    m = SEGMENT_NAME.match(os.path.basename(path))
    if m:
        return [SegmentFile(int(m.group(1)), m.group(2), path)]
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return [SegmentFile(0, "", path)]


class SegmentDamage(Exception):
    """The readable part of a segment ends here: ``offset`` is where the bad frame starts."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def read_frames(fh: BinaryIO, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, msgpack payload) per frame from ``offset``; ``SegmentDamage`` on a
    short or oversized frame. Stops quietly at a clean end of file."""
    while True:
        head = fh.read(4)
        if not head:
            return
        if len(head) < 4:
            raise SegmentDamage("segment ends inside a frame length (truncated)", offset)
        (length,) = LENGTH.unpack(head)
        if length == 0 or length > MAX_FRAME_BYTES:
            raise SegmentDamage(f"impossible frame length {length} (corrupt)", offset)
        payload = fh.read(length)
        if len(payload) < length:
            raise SegmentDamage("segment ends inside a frame (truncated)", offset)
        yield offset, payload
        offset += 4 + length


# ---------------------------------------------------------------------------- verify


@dataclass(frozen=True, slots=True)
class BrokenPoint:
    """Where the chain is broken: the segment file, the frame seq, the byte offset."""

    segment: str
    seq: int | None
    offset: int
    message: str

    def __str__(self) -> str:
        seq = f" seq {self.seq}" if self.seq is not None else ""
        return f"{self.segment}:{seq} (offset {self.offset}): {self.message}"


@dataclass(slots=True)
class VerifyResult:
    """Outcome of ``verify``. ``ok`` means every frame links; see ``notes`` for what a
    chain cannot prove by itself (retention start, unsealed head)."""

    ok: bool = True
    records: int = 0
    frames: int = 0
    segments: int = 0
    starts_at: int | None = None  # seq of the first retained frame (0 = genesis)
    head_seq: int | None = None
    head_digest: bytes | None = None
    sealed: bool = False  # the last segment ends with a seal frame
    broken: BrokenPoint | None = None
    declared_breaks: list[BrokenPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify(
    path: str, *, key: bytes | None = None, accept_declared_breaks: bool = False,
    require_genesis: bool = False,
) -> VerifyResult:
    """Check the whole chain under ``path`` (directory or one segment file)."""
    result = VerifyResult()
    try:
        segments = resolve_segments(path)
    except OSError as exc:
        result.ok = False
        result.broken = BrokenPoint(path, None, 0, f"cannot read: {exc.strerror or exc}")
        return result
    if not segments:
        result.ok = False
        result.broken = BrokenPoint(path, None, 0, "no audit segment files")
        return result
    checker = ChainVerifier(key, require_mac=key is not None)
    pending: BrokenPoint | None = None  # a problem waiting for the next header to declare it
    for seg in segments:
        result.segments += 1
        checker.start_segment()
        first = True
        problem: BrokenPoint | None = None
        try:
            with open(seg.path, "rb", buffering=READ_BUFFER) as fh:
                for offset, payload in read_frames(fh):
                    try:
                        frame = checker.accept(payload)
                    except ChainError as exc:
                        problem = BrokenPoint(seg.name, exc.seq, offset, str(exc))
                        break
                    if first and pending is not None:
                        if "break" not in frame.body:
                            break  # the link holds but nothing declares the damage
                        result.declared_breaks.append(pending)
                        result.notes.append(f"declared break: {pending}; writer noted "
                                            f"{_describe_break(frame.body['break'])}")
                        pending = None
                    elif first and result.frames == 0:
                        result.starts_at = frame.seq
                    first = False
                    result.frames += 1
                    if frame.kind == "rec":
                        result.records += 1
        except SegmentDamage as exc:
            expected = checker.last.seq + 1 if checker.last is not None else None
            problem = BrokenPoint(seg.name, expected, exc.offset, str(exc))
        except OSError as exc:
            problem = BrokenPoint(seg.name, None, 0, f"cannot read: {exc.strerror or exc}")
        if pending is not None:
            # The previous segment was damaged and this one did not declare it.
            result.broken = pending
            break
        if problem is not None:
            if first and checker.last is None:
                result.broken = problem  # nothing good at all before it
                break
            pending = problem
        elif first:
            pending = BrokenPoint(seg.name, None, 0, "empty segment file (no header)")
    else:
        if pending is not None:
            result.broken = pending  # damage in the last segment: nothing after it
    if checker.last is not None:
        result.head_seq = checker.last.seq
        result.head_digest = checker.last.digest
        result.sealed = checker.sealed and result.broken is None
    if result.broken is not None or (result.declared_breaks and not accept_declared_breaks):
        result.ok = False
        if result.broken is None:
            result.broken = result.declared_breaks[0]
    if result.starts_at not in (None, 0):
        result.notes.append(
            f"the retained chain starts at seq {result.starts_at}: earlier segments are not "
            "present (retention or removal), so the first frame cannot be linked back")
        if require_genesis:
            result.ok = False
    if result.broken is None and not result.sealed:
        result.notes.append(
            "the last segment is not sealed (writer running or stopped without a clean "
            "shutdown): frames removed from its end cannot be detected; compare the head "
            "with an earlier anchor")
    return result


def _describe_break(info: Any) -> str:
    if not isinstance(info, dict):
        return "a break"
    return ", ".join(f"{k}={v}" for k, v in info.items())


# ----------------------------------------------------------------- reading records


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Export / tail / replay filters; None means "any"."""

    since: float | None = None
    until: float | None = None
    peer: str | None = None
    decision: str | None = None
    rule: str | None = None
    event: str | None = None

    def matches(self, rec: AuditRecord) -> bool:
        if self.since is not None and rec.time < self.since:
            return False
        if self.until is not None and rec.time > self.until:
            return False
        if self.peer is not None and rec.peer != self.peer:
            return False
        if self.decision is not None and rec.decision != self.decision:
            return False
        if self.rule is not None and rec.rule != self.rule:
            return False
        return self.event is None or rec.event == self.event


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record with its place in the chain."""

    seq: int
    segment: str
    record: AuditRecord


def iter_stored(
    path: str, filters: RecordFilter | None = None,
    on_damage: Callable[[str], None] | None = None,
) -> Iterator[StoredRecord]:
    """Every readable record under ``path`` in chain order. Reading does not verify links
    (use ``verify``); a damaged segment is read up to the damage, reported to
    ``on_damage`` and skipped from there."""
    for seg in resolve_segments(path):
        try:
            with open(seg.path, "rb", buffering=READ_BUFFER) as fh:
                for _offset, payload in read_frames(fh):
                    seq, _prev, kind, body = decode_frame(payload)
                    if kind != "rec":
                        continue
                    rec = AuditRecord.from_wire(body)
                    if filters is None or filters.matches(rec):
                        yield StoredRecord(seq, seg.name, rec)
        except (SegmentDamage, FrameError, TypeError) as exc:
            if on_damage is not None:
                on_damage(f"{seg.name}: {exc}")


def iter_records(path: str, filters: RecordFilter | None = None) -> Iterator[AuditRecord]:
    """The records under ``path`` (directory or segment file) that match ``filters``."""
    for stored in iter_stored(path, filters):
        yield stored.record


# ------------------------------------------------------------------ writer resume


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a starting writer continues the chain."""

    next_seq: int
    prev: bytes
    last_segment: str | None  # the segment holding the last good frame
    sealed: bool  # that segment ended with a seal
    damage: str | None  # why frames after the last good one are not part of the chain
    damaged_segment: str | None


def find_resume_point(directory: str, key: bytes | None) -> ResumePoint:
    """Read back from the newest segment to the last frame that verifies within it.

    Only the newest segments are read (one, unless it holds no good frame at all). Links
    into older segments are ``verify``'s business; the writer only needs the head.
    """
    segments = list_segments(directory)
    damage: str | None = None
    damaged: str | None = None
    for seg in reversed(segments):
        checker = ChainVerifier(key)
        checker.start_segment()
        problem: str | None = None
        try:
            with open(seg.path, "rb", buffering=READ_BUFFER) as fh:
                for offset, payload in read_frames(fh):
                    try:
                        checker.accept(payload)
                    except ChainError as exc:
                        problem = f"{exc} at offset {offset}"
                        break
        except SegmentDamage as exc:
            problem = f"{exc} at offset {exc.offset}"
        except OSError as exc:
            problem = f"cannot read: {exc.strerror or exc}"
        last: Frame | None = checker.last
        if problem is not None and damage is None:
            damage, damaged = problem, seg.name
        if last is not None:
            return ResumePoint(last.seq + 1, last.digest, seg.name, checker.sealed,
                               damage, damaged)
        if damage is None:
            damage, damaged = "segment has no readable frame", seg.name
    if segments:
        return ResumePoint(0, GENESIS, None, False, damage or "no readable segment", damaged)
    return ResumePoint(0, GENESIS, None, False, None, None)


def parse_time(text: str) -> float:
    """RFC 3339 (``2024-05-01T12:00:00Z``) or unix seconds -> unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an RFC 3339 time or unix seconds: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # a time without offset is read as UTC, never local
    return dt.timestamp()
