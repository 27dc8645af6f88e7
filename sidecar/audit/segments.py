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

import bisect
import errno
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, Literal

import msgpack

from sidecar.audit.chain import (
    ALG_HMAC,
    GENESIS,
    GROUP_RECORDS,
    JSON_FORMATS,
    LENGTH,
    MAX_FRAME_BYTES,
    RECORD_KINDS,
    ChainError,
    ChainVerifier,
    FalseHmacClaim,
    Frame,
    FrameError,
    MissingKey,
    decode_frame,
    in_group,
    json_record_frame,
    link_digest,
    parse_record_json,
    shown,
)
from sidecar.audit.crypto import DecryptError, Decryptor, MissingDataKey
from sidecar.audit.record import MAX_TIME, AuditRecord, RecordError, check_wire
from sidecar.audit.signing import Checkpoint, Keyring

# Exactly what ``segment_name`` writes, matched whole (``fullmatch``): ASCII digits (``\d``
# took every Unicode digit) and no trailing newline (``$`` matched before one), or a second
# name for one segment made export and tail read its records twice (found by a hostile
# review: 70 records from a 60-record trail, exit 0).
SEGMENT_NAME = re.compile(r"audit-([0-9]{20})-([0-9]{8}T[0-9]{12}Z)\.log", re.ASCII)
READ_BUFFER = 256 * 1024


@dataclass(frozen=True, slots=True, order=True)
class SegmentFile:
    """One segment file; orders by chain position."""

    start_seq: int
    stamp: str
    path: str = field(compare=False)
    # A file named on the command line may be reached through a symbolic link; an entry
    # of a segment directory may not (``open_segment``).
    follow: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        """The segment's file name, without its directory."""
        return os.path.basename(self.path)


def segment_name(start_seq: int, created: float) -> str:
    """File name for a segment whose header has seq ``start_seq``."""
    micro = int(round((created % 1) * 1_000_000)) % 1_000_000
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created)) + f"{micro:06d}Z"
    return f"audit-{start_seq:020d}-{stamp}.log"


def list_segments(directory: str) -> list[SegmentFile]:
    """Entries of ``directory`` named like segment files, in chain order (other names are
    ignored). An entry so named that is not a regular file -- a symbolic link, a directory,
    a FIFO -- is listed too: reading it fails (``open_segment``), so it is reported where
    a segment should be instead of being passed over as if it were not there."""
    out: list[SegmentFile] = []
    with os.scandir(directory) as it:
        for entry in it:
            m = SEGMENT_NAME.fullmatch(entry.name)
            if m:
                out.append(SegmentFile(int(m.group(1)), m.group(2), entry.path))
    out.sort()
    return out


def open_segment(seg: SegmentFile) -> BinaryIO:
    """The segment file open for buffered reading; ``OSError`` when it is not a regular
    file (a FIFO or device is never waited on; a symbolic link in a segment directory is
    not followed)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not seg.follow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(seg.path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not seg.follow:
            raise OSError(errno.ELOOP, "a symbolic link, not a segment file", seg.path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", seg.path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=READ_BUFFER)
    except BaseException:
        os.close(fd)
        raise


def resolve_segments(path: str) -> list[SegmentFile]:
    """A directory's segments, or one named file (any name) as a single segment."""
    if os.path.isdir(path):
        return list_segments(path)
    m = SEGMENT_NAME.fullmatch(os.path.basename(path))
    if m:
        return [SegmentFile(int(m.group(1)), m.group(2), path, follow=True)]
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return [SegmentFile(0, "", path, follow=True)]


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as a trail (a directory or one segment file): None, or
    ``not found`` / ``not a directory or regular file`` (a FIFO or device is never opened)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found (no such file or directory)"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    return "not a directory or regular file"


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


Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Finding:
    """Something ``verify`` found beyond a broken link. ``error`` makes the result BROKEN;
    ``warning`` is what an honest crash can also produce (compare with an anchor).

    ``code`` is stable (see docs/audit.md, "What verify reports")."""

    severity: Severity
    code: str
    segment: str
    seq: int | None
    message: str

    def __str__(self) -> str:
        seq = f" seq {self.seq}" if self.seq is not None else ""
        return f"{self.severity}: {self.code}: {self.segment}:{seq}: {self.message}"


@dataclass(slots=True)
class VerifyResult:
    """Outcome of ``verify``. ``ok`` means every frame links, every signature verifies and
    no error finding; see ``notes`` for what the check cannot prove with the keys given."""

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
    # What the keys given could check: "none", "hmac", "signature" (with or without hmac).
    assurance: str = "none"
    checkpoints: int = 0  # signed frames whose signature verified
    signed_through: int | None = None  # seq of the newest verified signed frame
    unsigned_tail_records: int = 0  # records after it (not yet covered by a signature)
    unsigned_tail_frames: int = 0
    restarts: int = 0
    anchors_matched: int = 0
    findings: list[Finding] = field(default_factory=list)
    # Set when a segment needs a key that was not given (an HMAC chain): the trail could
    # not be checked, which the CLI reports as "cannot run" (exit 2), not as BROKEN.
    missing_key: str | None = None
    # The SPIFFE IDs the trail's frames name (``id`` of signed checkpoints and seals), in
    # order of first appearance: whose trail this is (several: an error, ``several_identities``).
    identities: list[str] = field(default_factory=list)

    def add(self, severity: Severity, code: str, segment: str, seq: int | None,
            message: str) -> None:
        """Record one finding."""
        self.findings.append(Finding(severity, code, segment, seq, message))

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity ``error`` (warnings left out)."""
        return [f for f in self.findings if f.severity == "error"]


NOTE_NO_KEY = (
    "no key given: this check proves nothing against someone who can write the audit "
    "directory (they can rewrite every record and recompute every digest); verify with "
    "--pubkey to check the signed checkpoints")
NOTE_HMAC_ONLY = (
    "HMAC key only: proves the trail was written by a holder of the HMAC key; the sidecar "
    "holds it too, so anyone who took over the pod can re-chain; use --pubkey for proof "
    "that holds against the pod")

# Format 2 (chain.py, "Format 3"): an encrypted record's link is the ``d`` it carries, so
# the frame before it is bound by the data key only; without it the trail is not proven
# (found by a hostile review, the twenty-ninth: a signed checkpoint, a rotation header or a
# record replaced by a forgery verified OK with --pubkey).
NEEDS_DATA_KEY = (
    "{} encrypted records of format 2 (the first seq {}) link by the digest they carry, "
    "which only the data key ties to the frame before each (a forged frame there passes "
    "every public check): give --data-key to verify this trail (or verify the collector's "
    "copy, whose records are in the clear)")

# Format 2 chains the plaintext: without the data key the ciphertext of an encrypted group is
# checked against nothing (someone holding the data key can encrypt other records under the
# same digests). Said, as the readers check it (the twenty-seventh session's review).
NOTE_UNOPENED = (
    "{} encrypted records (format 2 or 3) were not opened: their contents (the ciphertext) were "
    "not checked against their digests, which the chain and signatures cover; give "
    "--data-key to check them")


class _Walk:
    """Per-frame checks beyond the links: signatures, seals, restarts, anchors, tail."""

    def __init__(self, result: VerifyResult, keyring: Keyring | None,
                 anchors: list[Checkpoint], identity: str | None = None,
                 accept_unsigned_start: bool = False, decrypting: bool = False) -> None:
        self.result = result
        self.decrypting = decrypting  # encrypted records are opened (their times known)
        self.accept_unsigned_start = accept_unsigned_start
        self.identity = identity  # --id: every frame naming an identity must name this one
        self.wrong: set[tuple[str, str]] = set()  # other identities already reported
        self.more_identities = False  # more than MAX_IDENTITIES_LISTED were named
        # A header said its writer keeps every segment (``retention: all``); the seq of the
        # first header whose writer deletes old ones (``retention: N``).
        self.keep_all = False
        self.retention_from: int | None = None
        self.retentions: list[tuple[int, int]] = []  # (header seq, its N) of "retention: N"
        self.keyring = keyring
        # Every anchor given, by seq: two for one seq are both compared (one stood for both
        # before, the last given, so an anchor of a seq written twice -- a cut, then a
        # writer that went on -- passed unchecked next to the newer one).
        self.anchors: dict[int, list[Checkpoint]] = {}
        for a in anchors:
            self.anchors.setdefault(a.seq, []).append(a)
        self.segment = ""
        self.first_signed = False
        self.last_every: Any = None
        self.tail_times: list[float] = []  # times of the first and last unsigned record
        self.prev_seal: tuple[str, str] | None = None  # (segment, why) of the last seal
        self.whole_trail = True  # False when one segment file is checked on its own
        # Findings listed so far, and those beyond MAX_FINDINGS_PER_CODE (counted only), by
        # code: a counter, not a scan of every finding per call, which made verify quadratic
        # on a forged directory (8,000 restart segments and 80,000 malformed records: 12 s
        # against 0.9 s; found by a hostile review, the twenty-ninth).
        self.listed: dict[str, int] = {}
        self.more: dict[str, tuple[Severity, int]] = {}
        # (segment, seq) where the signed checkpoint of a restart must be, until seen.
        self.restart_checkpoint: tuple[str, int] | None = None
        # A writer restarted since the last verified signature: the next one may sign
        # over records it did not write (``gap``).
        self.restarted = False
        # An encrypted record was walked without its time (no data key): the time bounds
        # could not be applied to it (a note says so).
        self.sealed_times = False
        # The key id of the newest verified signature, and every key id it replaced, with
        # the seq of the first frame its successor signed (``rotated_key_signed``).
        self.signing_kid: Any = None
        self.replaced_kids: dict[Any, tuple[Any, int]] = {}
        # The seq of the first unsigned seal before the first verified signature: a writer
        # without the signing key wrote it (``unsigned_start``).
        self.keyless_seal: int | None = None
        # A restart header at the walk's first frame (fine when its checkpoint comes next),
        # and the first restart before the first verified signature that is not that: the
        # frames before it were signed only by a restarted writer (``anchor_not_checked``).
        self.first_restart: int | None = None
        self.first_signed_seq: int | None = None
        self.unproven_restart: int | None = None
        # The seqs of the segment headers walked, and whether the newest verified signature
        # is a seal (the header after it is the segment its writer rotated into):
        # ``beyond_retention`` counts the segments the signatures cover.
        self.header_seqs: list[int] = []
        self.signed_seal = False

    def capped(self, code: str, seq: int | None, message: str,
               severity: Severity = "error", segment: str | None = None) -> None:
        """A finding that a forger can repeat per frame or per segment: the first
        ``MAX_FINDINGS_PER_CODE`` of a code are listed, the rest counted."""
        listed = self.listed.get(code, 0)
        if listed < MAX_FINDINGS_PER_CODE:
            self.listed[code] = listed + 1
            self.result.add(severity, code, self.segment if segment is None else segment,
                            seq, message)
        else:
            was, more = self.more.get(code, (severity, 0))
            self.more[code] = ("error" if "error" in (was, severity) else "warning", more + 1)

    def malformed(self, seq: int, message: str) -> None:
        """A record frame that no sidecar wrote (wrong field type or value, clear text in
        an encrypted segment)."""
        self.capped("malformed_record", seq, f"malformed record: {message}")

    def frame(self, frame: Frame) -> str | None:
        """Check one frame (already linked); a string is a broken point (stop)."""
        r = self.result
        for anchor in self.anchors.pop(frame.seq, ()):
            differs = anchor_difference(anchor, frame)
            if differs is not None:
                return (f"anchor for seq {frame.seq} does not match the frame stored there "
                        f"({differs} differs): the chain was rewritten, a writer reused the "
                        "seq after a cut, or the anchor is not this trail's")
            r.anchors_matched += 1
        if frame.kind not in RECORD_KINDS and "id" in frame.body:  # a record's id: request
            self.named(frame.seq, frame.body["id"])
        if self.restart_checkpoint is not None and frame.seq == self.restart_checkpoint[1]:
            self.restart_checkpoint = None
            if frame.kind != "chk" or "sig" not in frame.body:
                self.restart_unsigned(frame.seq)
        if frame.kind in ("chk", "end") and "sig" in frame.body:
            if self.keyring:
                problem = self.keyring.check(frame.seq, frame.prev, frame.kind, frame.body)
                if problem is not None:
                    return problem
                self.signed_by(frame.seq, frame.body.get("kid"))
                if self.first_signed:
                    self.gap(frame.seq)
                else:
                    self.unsigned_start(frame)
                    self.first_signed_seq = frame.seq
                    if self.first_restart is not None and not (
                            frame.kind == "chk" and frame.seq == self.first_restart + 1):
                        self.unproven_restart = self.first_restart
                self.signed_seal = frame.kind == "end"
                self.restarted = False
                r.checkpoints += 1
                r.signed_through = frame.seq
                r.unsigned_tail_frames = r.unsigned_tail_records = 0
                self.tail_times = []
                self.first_signed = True
                self.last_every = frame.body.get("every")
                return None
        elif frame.kind == "chk":
            return "checkpoint frame without a signature"
        elif frame.kind == "end" and self.keyring and self.first_signed:
            self.capped("unsigned_seal", frame.seq,
                        "seal without a signature after signed checkpoints: the writer signs "
                        "every seal, so this one was forged")
        elif frame.kind == "end" and self.keyring and self.keyless_seal is None:
            self.keyless_seal = frame.seq  # (``unsigned_start``: a writer without the key)
        r.unsigned_tail_frames += 1
        if frame.kind in RECORD_KINDS:
            r.unsigned_tail_records += 1
            if frame.kind == "rec":
                self.record_time(frame.body.get("t"))
            elif not self.decrypting:
                # An encrypted record's ``t`` is known once it is decrypted (``verify
                # --data-key``: ``record_time`` then); without the key only the counts hold.
                self.sealed_times = True
        return None

    def record_time(self, t: Any) -> None:
        """A record of the unsigned stretch is dated ``t`` (a clear one as it is walked, an
        encrypted one when decrypted: before the twenty-fifth session only clear records
        were dated, so forged encrypted records hours apart passed every time bound, with
        the data key given too; found by a hostile review)."""
        if isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t <= MAX_TIME:
            # The first record's time and the latest of all: a record's ``t`` is never
            # later than its write, so a record dated later than the stretch allows is
            # caught wherever it stands (the last one's time missed one dated hours
            # later in the middle). Earlier dates are not bounded: a request that ran
            # long has the ``t`` of its start. A time no record may have (NaN, past
            # 9999) is a malformed record, reported as such, not a span.
            if not self.tail_times:
                self.tail_times = [float(t), float(t)]
            elif t > self.tail_times[1]:
                self.tail_times[1] = float(t)

    def signed_by(self, seq: int, kid: Any) -> None:
        """A verified signature at ``seq`` by key ``kid``. A writer signs with the newest key
        its ``signing_key_file`` holds, so along the chain the keys only move forward: a
        key that another one replaced and that signs again is an old key in other hands
        (the keyring keeps rotated keys so that old segments still verify, not so that they
        may sign new frames), or a Secret rolled back to an old key."""
        current = self.signing_kid
        if kid == current:
            return
        replaced = self.replaced_kids.get(kid)
        if replaced is not None:
            successor, since = replaced
            self.capped("rotated_key_signed", seq,
                        f"signed with key {kid}, which key {successor} replaced at seq {since}:"
                        " a writer signs with its newest key, so a key rotated out signed "
                        "this frame -- its private half in other hands, re-signing frames "
                        "written after the rotation -- or the signing key's Secret was "
                        "rolled back to an old key (roll forward to a new key instead)")
            del self.replaced_kids[kid]  # reported once; it is the current key again
        if current is not None:
            self.replaced_kids[current] = (kid, seq)
        self.signing_kid = kid

    def gap(self, seq: int) -> None:
        """A signature at ``seq`` verified: the records since the one before it must be no
        more than that writer's ``every`` allows. A running writer signs every N records,
        and a restarted one right after its header, so more can only be records appended
        without the key that a restarted writer then signed over (it continues after the
        last frame it finds on disk and cannot tell them from its crashed run's tail)."""
        r, every = self.result, self.last_every
        if not (isinstance(every, list) and len(every) == 2):
            return
        max_records, max_seconds = every
        if isinstance(max_records, int) and not isinstance(max_records, bool) \
                and r.unsigned_tail_records > max_records:
            first = (r.signed_through or 0) + 1
            self.capped("unsigned_gap_too_long", seq,
                        f"{r.unsigned_tail_records} records between the signed frames at seq "
                        f"{r.signed_through} and {seq}, but the writer signs every "
                        f"{max_records}: records after seq {first - 1} were appended without "
                        "the key and a restarted writer signed over them")
            return
        # By time as well, as ``unsigned_start`` and the unsigned tail are: a running writer
        # signs within T seconds of its first unsigned frame, so the records a crash leaves
        # unsigned span about T. Only across a restart: between two signatures of one
        # running writer nothing can be forged (the second covers what it wrote itself),
        # and a request that ran long has an old ``t`` (its start), which such a gap may
        # hold honestly. (Before, a few forged records dated hours apart were signed over
        # by a restarted writer with a warning only.)
        span = self.tail_times[1] - self.tail_times[0] if len(self.tail_times) == 2 else 0.0
        if self.restarted and isinstance(max_seconds, int | float) \
                and not isinstance(max_seconds, bool) and span > max_seconds + TAIL_SLACK_SECONDS:
            self.capped("unsigned_gap_too_long", seq,
                        f"the {r.unsigned_tail_records} records between the signed frames at "
                        f"seq {r.signed_through} and {seq} span {span:.1f} s, but the writer "
                        f"signs every {max_seconds} s: records after seq {r.signed_through} "
                        "were appended without the key and a restarted writer signed over "
                        "them")

    def unsigned_start(self, frame: Frame) -> None:
        """The first verified signature, at ``frame``: the records before it must be no more
        than its writer's ``every`` allows, by count and by time. A writer that holds the
        key signs every N records (and right after the header of each restart), so more
        before its first signature were written without the key: a history forged in its
        place that a restarted writer, which cannot tell it from its own crashed run,
        signed over (found by a hostile review: 500 forged records then verified OK).
        ``--accept-unsigned-start`` for a trail that ran before signing was configured.

        Whatever the count, when a seal without signature comes before it: a writer that
        holds the key signs every seal, so a writer without it wrote that stretch (before,
        a keyless writer's sealed history of 900 records, within ``every``, then signed
        over by the restarted sidecar verified OK with no finding; found by a hostile
        review, the twenty-ninth)."""
        r = self.result
        start = r.starts_at if r.starts_at is not None else 0
        severity: Severity = "warning" if self.accept_unsigned_start else "error"
        if self.keyless_seal is not None:
            r.add(severity, "unsigned_start", self.segment, frame.seq,
                  f"a seal without signature (seq {self.keyless_seal}) comes before the first "
                  f"signed checkpoint (seq {frame.seq}): the writer that sealed it held no "
                  "signing key (a writer with one signs every seal), so nothing proves the "
                  f"{r.unsigned_tail_records} records from seq {start} -- a history written "
                  "without the key in place of the trail, then signed over by a restarted "
                  "writer, or a trail that ran before signing was configured "
                  "(--accept-unsigned-start)")
            return
        every = frame.body.get("every")
        if not (isinstance(every, list) and len(every) == 2):
            return
        max_records, max_seconds = every
        records = r.unsigned_tail_records
        too_many = isinstance(max_records, int) and not isinstance(max_records, bool) \
            and records > max_records
        span = self.tail_times[1] - self.tail_times[0] if len(self.tail_times) == 2 else 0.0
        too_long = isinstance(max_seconds, int | float) and not isinstance(max_seconds, bool) \
            and span > max_seconds + TAIL_SLACK_SECONDS
        if not (too_many or too_long):
            return
        r.add(severity, "unsigned_start",
              self.segment, frame.seq,
              f"{records} records (over {span:.1f} s) from seq {start} come before the first "
              f"signed checkpoint (seq {frame.seq}), but its writer signs every {max_records}"
              f" records or {max_seconds} s: nothing proves them -- they were written "
              "without the key (a history forged in place of the trail, then signed over by "
              "a restarted writer), or before signing was configured "
              "(--accept-unsigned-start)")

    def header(self, frame: Frame, first_in_walk: bool) -> None:
        """The first frame of a segment: restarts, what the header claims about the segment
        before it, and rotation seals without successor. Whether the previous segment ended
        sealed is what this walk saw (its last frame was an ``end``), never the header's
        claim (``prev_sealed``), which whoever writes the directory can set."""
        r = self.result
        self.header_seqs.append(frame.seq)
        retention = frame.body.get("retention")
        if retention == "all":
            self.keep_all = True
        elif isinstance(retention, int) and not isinstance(retention, bool):
            if self.retention_from is None:
                self.retention_from = frame.seq
            self.retentions.append((frame.seq, retention))
        restart = frame.body.get("restart")
        seal = self.prev_seal
        if seal is not None and seal[1] == "rotate" and restart is not None:
            self.capped("rotation_without_successor", frame.seq - 1,
                  "segment sealed for rotation, but the next segment was started by a "
                  "restarted writer: the segment written after the rotation is missing",
                  segment=seal[0])
        if seal is not None and seal[1] == "shutdown" and restart is None:
            self.capped("shutdown_without_restart", frame.seq,
                  "a segment after a shutdown seal whose header records no writer restart: "
                  "every start of a writer writes one, so this segment was not written by a "
                  "sidecar (appended to a trail that had stopped)")
        if not first_in_walk and seal is None:
            claims = [("prev_sealed", frame.body.get("prev_sealed"))]
            if isinstance(restart, dict):
                claims.append(("restart.prev_sealed", restart.get("prev_sealed")))
            for name, claim in claims:
                if claim is True:
                    self.capped("prev_sealed_mismatch", frame.seq,
                          f"the header claims {name}: true, but the segment before it does "
                          "not end with a seal: the header was forged (a seal cut away and "
                          "the header written to hide it)")
                    break
        if restart is not None:
            r.restarts += 1
            self.restarted = True
            if not self.first_signed:
                if first_in_walk:
                    self.first_restart = frame.seq
                elif self.unproven_restart is None:
                    self.unproven_restart = frame.seq
            if not first_in_walk and seal is None:
                after, signed = frame.seq - 1, r.signed_through
                extra = ""
                if self.keyring and (signed is None or after > signed):
                    first = 0 if signed is None else signed + 1
                    extra = (f"; frames {first}..{after} were not yet signed when the "
                             "writer stopped and were signed only by the restarted writer")
                self.capped("unsealed_restart", frame.seq,
                            "writer restarted without a sealed head (crash, kill, or frames cut "
                            f"from the end before the restart; compare with an anchor){extra}",
                            "warning")
            if self.keyring and self.first_signed:
                # A signing writer signs right after the header of a restart (the header
                # and the checkpoint are one write): expect that checkpoint next.
                self.restart_checkpoint = (self.segment, frame.seq + 1)
        self.prev_seal = None

    def named(self, seq: int | None, ident: Any, what: str = "frame") -> None:
        """A frame (or an anchor) names the identity ``ident`` (``id``)."""
        r = self.result
        if what == "frame" and isinstance(ident, str) and ident not in r.identities:
            # (the trail's own identities only: an anchor naming another is its finding,
            # never "the trail's frames name 2 identities")
            # A forged trail can name a new identity in every frame: list a few (the
            # membership test stays cheap, the memory bounded), count that there were more.
            if len(r.identities) < MAX_IDENTITIES_LISTED:
                r.identities.append(ident)
            else:
                self.more_identities = True
        if self.identity is not None and ident != self.identity:
            shown = ident[:2100] if isinstance(ident, str) else f"a {type(ident).__name__}"
            if (what, shown) in self.wrong:
                return  # one finding per identity: the first frame (or anchor) naming it
            if len(self.wrong) < MAX_FINDINGS_PER_CODE:
                self.wrong.add((what, shown))
            self.capped("wrong_identity", seq,
                        f"the {what} names {shown}, not {self.identity} (--id): this is "
                        "another sidecar's trail, or frames of one were put into it (the "
                        f"first {what} naming it)")

    def restart_unsigned(self, seq: int) -> None:
        self.capped(
            "restart_not_signed", seq,
            "a writer restart after signed checkpoints is not followed by a signed checkpoint "
            "(a signing writer writes one with the header of every restart): the restart "
            "header was forged, or the writer ran without its signing key",
            segment=self.restart_checkpoint[0] if self.restart_checkpoint else self.segment)

    def oldest_missing(self) -> None:
        """The chain starts after seq 0 although no writer of it deleted segments: a header
        says ``retention: all`` and none (covered by a verified signature, when checked
        with keys) says ``retention: N``. Segments were removed from the start."""
        r = self.result
        if r.broken is not None or r.starts_at in (None, 0) or not self.whole_trail:
            return
        if not self.keep_all:
            self.beyond_retention()
            return
        deleting = self.retention_from
        if deleting is not None and self.keyring and (
                r.signed_through is None or deleting > r.signed_through):
            deleting = None  # a header no signature covers: anyone could have written it
        if deleting is None:
            r.add("error", "oldest_segments_missing", "", r.starts_at,
                  f"the chain starts at seq {r.starts_at}, but its writers keep every segment "
                  "(retention: all in the headers): the oldest segments were removed")
        else:
            # Headers saying "all" and then N: the writer that deletes keeps N all the same
            # (before, any "all" turned the count off: 2 of 5 segments deleted under N = 10
            # verified OK; found by a hostile review, the twenty-ninth).
            self.beyond_retention()

    def beyond_retention(self) -> None:
        """The chain starts after seq 0 and its writers delete old segments (``retention:
        N``): a writer deletes only down to its N segments, at a rotation, and the header
        of the segment it rotated into says N; segments are only added after that. So fewer
        segments than the smallest N of the headers (covered by a verified signature, when
        checked with keys) means segments were removed beyond what retention deletes (found
        by a hostile review: the oldest 4 of 5 segments deleted verified OK, a note)."""
        r = self.result
        kept = [n for seq, n in self.retentions if not self.keyring
                or (r.signed_through is not None and seq <= r.signed_through)]
        if not kept:
            return
        segments, covered = r.segments, ""
        if self.keyring:
            # With keys, only the segments the signatures cover count: headers chained into
            # the unsigned tail need no key, and padded the count (the oldest signed
            # segments deleted, two header-only segments appended: OK; found by a hostile
            # review, the twenty-ninth). The segment a writer rotated into after its signed
            # seal counts too: its header is the seal's next frame (the writer deletes old
            # segments once it exists).
            last = (r.signed_through or 0) + (1 if self.signed_seal else 0)
            segments = bisect.bisect_right(self.header_seqs, last)
            covered = " covered by a verified signature"
        if segments < min(kept):
            r.add("error", "oldest_segments_missing", "", r.starts_at,
                  f"the chain starts at seq {r.starts_at} with {segments} segment(s){covered}, "
                  f"but its writers keep {min(kept)} (retention: {min(kept)} in the headers): "
                  "segments were removed beyond what retention deletes")

    def anchor_not_checked(self, seq: int, starts_at: int) -> None:
        """An anchor older than the retained chain: it cannot be checked. A warning when,
        with keys, the signatures vouch for the retained chain from its first frame: its
        first verified signature comes before any writer restart (a restart at the first
        frame, its checkpoint next, is that writer's own start). Then the frames from the
        start to it were written by the writer that signed it, and only segments older than
        the chain are gone, as retention deletes them. Otherwise an error: frames before a
        restart are signed only by the restarted writer, which signs what it finds on disk,
        so a history forged past the anchor in place of the whole trail looks exactly so
        (before, ``verify --pubkey --id --anchor NEWEST`` said OK on one, warnings only;
        found by a hostile review, the twenty-ninth). An honest crash before the first
        checkpoint of the oldest retained segment looks the same: give a newer anchor."""
        r = self.result
        base = (f"the anchor could NOT be checked: its seq {seq} is older than the retained "
                f"chain (starts at seq {starts_at}; the records up to it are not retained)")
        if not self.keyring:
            r.add("warning", "anchor_not_checked", "", seq, f"{base}; give the newest anchor "
                  "saved")
            return
        if not r.checkpoints:
            why = "nothing in the retained chain is signed"
        elif self.unproven_restart is not None:
            why = (f"a writer restarted at seq {self.unproven_restart}, before the first "
                   f"verified signature (seq {self.first_signed_seq}), so the frames from seq "
                   f"{starts_at} to {self.unproven_restart - 1} are signed only by a restarted "
                   "writer, which signs what it finds on disk")
        else:
            r.add("warning", "anchor_not_checked", "", seq, f"{base}; give the newest anchor "
                  "saved")
            return
        r.add("error", "anchor_not_checked", "", seq,
              f"{base}, and no signature vouches for the start of that chain: {why}. A "
              "history forged past the anchor in place of the whole trail (the anchor's frame "
              "deleted with it) looks exactly so; so does a crash before the first checkpoint "
              "of the oldest retained segment: give an anchor inside the retained chain, or "
              "compare with the collector's copy")

    def seal(self, frame: Frame) -> None:
        why = frame.body.get("why")
        self.prev_seal = (self.segment, why if isinstance(why, str) else "")

    def finish(self) -> None:
        r = self.result
        if self.restart_checkpoint is not None and r.broken is None:
            self.restart_unsigned(self.restart_checkpoint[1])
        if self.sealed_times and self.keyring:
            r.notes.append("the time bounds (unsigned_start, unsigned_gap_too_long, "
                           "unsigned_tail_too_long) were applied to the clear records only: "
                           "an encrypted record's time is read with its data key "
                           "(--data-key); the record counts were checked")
        if self.identity is not None and not r.identities and r.broken is None:
            r.add("error", "identity_not_named", "", None,
                  f"no frame names an identity (nothing signed), so the trail cannot be "
                  f"shown to be {self.identity}'s (--id)")
        elif len(r.identities) > 1:
            count = f"more than {len(r.identities)}" if self.more_identities \
                else str(len(r.identities))
            r.add("error", "several_identities", "", None,
                  f"the trail's frames name {count} identities "
                  f"({', '.join(r.identities)}): a trail belongs to one sidecar")
        self.oldest_missing()
        for code, (severity, n) in self.more.items():
            r.add(severity, code, "", None, f"and {n} more {code} findings (not listed)")
        if self.prev_seal is not None and self.prev_seal[1] == "rotate" and r.broken is None \
                and self.whole_trail:
            r.add("error", "rotation_without_successor", self.prev_seal[0], r.head_seq,
                  "the newest segment was sealed for rotation but its successor is missing: "
                  "the newest segment(s) were deleted")
        for anchor in (a for same in self.anchors.values() for a in same):
            named = anchor.fields.get("id")
            if self.identity is None and r.identities and named not in r.identities:
                # Another sidecar's checkpoint (a signing key shared by several): it proves
                # nothing about this trail, wherever its seq falls (before the twenty-sixth
                # session one older than the retained chain passed as honest retention;
                # found by a hostile review). With --id, ``wrong_identity`` said so already.
                shown = named[:2100] if isinstance(named, str) else f"a {type(named).__name__}"
                r.add("error", "anchor_other_identity", "", anchor.seq,
                      f"the anchor names {shown}, but the trail names "
                      f"{', '.join(r.identities)}: it is another sidecar's checkpoint and "
                      "proves nothing here")
                continue
            if r.head_seq is not None and anchor.seq > r.head_seq:
                r.add("error", "anchor_beyond_head", "", anchor.seq,
                      f"anchor at seq {anchor.seq} is past the head (seq {r.head_seq}): "
                      "frames were cut from the end")
            elif r.starts_at is not None and anchor.seq < r.starts_at:
                self.anchor_not_checked(anchor.seq, r.starts_at)
            elif r.broken is None:
                r.add("error", "anchor_missing", "", anchor.seq,
                      f"anchor at seq {anchor.seq} was not found in the chain")
        if not self.keyring or r.broken is not None:
            return
        if not r.checkpoints:
            if r.frames:
                r.add("error", "nothing_signed", "", None,
                      "no checkpoint signed by a key of the keyring: nothing in this trail "
                      "is proven (a trail re-written without the key has no valid signature)")
            return
        every = self.last_every
        if isinstance(every, list) and len(every) == 2:
            max_records, max_seconds = every
            if isinstance(max_records, int) and r.unsigned_tail_records > max_records:
                r.add("error", "unsigned_tail_too_long", "", r.signed_through,
                      f"{r.unsigned_tail_records} records after the last checkpoint, but the "
                      f"writer signs every {max_records}: records appended without the key")
            if isinstance(max_seconds, int | float) and len(self.tail_times) == 2 and \
                    self.tail_times[1] - self.tail_times[0] > max_seconds + TAIL_SLACK_SECONDS:
                r.add("error", "unsigned_tail_too_long", "", r.signed_through,
                      f"the unsigned tail spans {self.tail_times[1] - self.tail_times[0]:.1f} s,"
                      f" but the writer signs every {max_seconds} s: records appended without "
                      "the key")


def _packed(value: Any) -> bytes | None:
    """``value`` as msgpack, to compare values exactly (1 is not 1.0 nor True); None when
    it cannot be packed (then it equals nothing)."""
    try:
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 -- msgpack raises several types on odd values
        return None


def anchor_difference(anchor: Checkpoint, frame: Frame) -> str | None:
    """The first field in which an anchor differs from the chain's frame at its seq (None
    when it is the same checkpoint in every field: kind, prev, every signed field, sig)."""
    if anchor.kind != frame.kind:
        return "kind"
    if anchor.prev != frame.prev:
        return "prev"
    for key in sorted(set(anchor.fields) | set(frame.body) - {"sig"}):
        if key not in anchor.fields or key not in frame.body:
            return f"field {key!r}"
        mine = _packed(anchor.fields[key])
        if mine is None or mine != _packed(frame.body[key]):
            return f"field {key!r}"
    if anchor.sig != frame.body.get("sig"):
        return "sig"
    return None


# Identities listed in ``VerifyResult.identities`` (a trail names one; more is an error).
MAX_IDENTITIES_LISTED = 16
# Findings of one code listed before the rest are only counted (a forger can repeat one
# problem per frame).
MAX_FINDINGS_PER_CODE = 100
# An honest unsigned tail may span the checkpoint interval plus queueing and disk delays.
TAIL_SLACK_SECONDS = 10.0


def verify(
    path: str, *, key: bytes | None = None, accept_declared_breaks: bool = False,
    require_genesis: bool = False, keyring: Keyring | None = None,
    anchors: list[Checkpoint] | None = None, decryptor: Decryptor | None = None,
    identity: str | None = None, accept_unsigned_start: bool = False,
) -> VerifyResult:
    """Check the whole chain under ``path`` (directory or one segment file).

    ``key``: HMAC key; ``keyring``: public keys for the signed checkpoints; ``anchors``:
    checkpoints saved elsewhere that must still be part of the chain; ``decryptor``: data
    keys, to check that every encrypted record also decrypts (integrity needs no data key);
    ``identity``: the SPIFFE ID whose trail this must be (every frame and anchor naming an
    identity names this one). The identities named are in ``identities``.
    ``accept_unsigned_start``: records before the first signature, more than its writer's
    ``every`` allows, are a warning instead of an error (a trail that ran unsigned first)."""
    result = VerifyResult()
    result.assurance = "signature" if keyring else "hmac" if key is not None else "none"
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
    names = {seg.name for seg in segments}
    for anchor in anchors or []:
        if keyring:
            forged = keyring.check(anchor.seq, anchor.prev, anchor.kind, anchor.body())
            if forged is not None:
                result.add("error", "anchor_signature", "", anchor.seq,
                           f"the anchor for seq {anchor.seq} is not a valid checkpoint of the "
                           f"keyring: {forged}")
    walk = _Walk(result, keyring, list(anchors or []), identity, accept_unsigned_start,
                 decrypting=decryptor is not None)
    for anchor in anchors or []:
        if identity is not None and anchor.fields.get("id") != identity:
            walk.named(anchor.seq, anchor.fields.get("id"), "anchor")
    walk.whole_trail = os.path.isdir(path)
    # Without the HMAC key, an HMAC trail is still checked for what needs no HMAC key (seq,
    # shape, signatures, anchors, identities, bounds, and links that are plain SHA-256 under
    # its claim: ``FalseHmacClaim``): a failure there is BROKEN (a forger's trail claiming
    # HMAC was exit 2, "cannot run"); otherwise exit 2 as before. Without --pubkey too,
    # since the twenty-ninth session's review (every header flipped to HMAC: exit 2).
    checker = ChainVerifier(key, require_mac=key is not None, unkeyed_hmac=key is None)
    pending: BrokenPoint | None = None  # a problem waiting for the next header to declare it
    unopened = 0  # format-2 encrypted records not opened (no data key): ``NOTE_UNOPENED``
    # (key id, segment, seq) of the first record whose data key was not given: exit 2 unless
    # something else is wrong (the twenty-ninth session's review: it was BROKEN, exit 1).
    missing_data: tuple[str, str, int] | None = None
    for seg in segments:
        result.segments += 1
        walk.segment = seg.name
        checker.start_segment()
        first = True
        problem: BrokenPoint | None = None
        header: dict[str, Any] | None = None
        fatal = False  # a forged signature, a wrong anchor, a record that does not decrypt
        opener = RecordOpener(decryptor, key, check=True)
        keyless = False  # the data key this segment names was not given (``MissingDataKey``)
        try:
            with open_segment(seg) as fh:
                for offset, payload in read_frames(fh):
                    try:
                        frame = checker.accept(payload)
                    except ChainError as exc:
                        message = str(exc)
                        if isinstance(exc, MissingKey) and checker.last is None:
                            result.missing_key = f"{seg.name}: {message}"
                            fatal = True
                        elif isinstance(exc, MissingKey):
                            # Frames before it verified without a key: no key verifies both
                            # (a key makes the plain segments fail), so this is a chain that
                            # switches authentication -- what a forger appending a segment
                            # that claims HMAC would write to turn BROKEN into "cannot run".
                            message = ("segment claims HMAC after a chain that is not "
                                       "HMAC-authenticated: no single key verifies this "
                                       "trail")
                            fatal = True
                        elif isinstance(exc, FalseHmacClaim):
                            fatal = True  # (proven without the key: never a declared break)
                        elif first:
                            message += _missing_predecessor(payload, names)
                        problem = BrokenPoint(seg.name, exc.seq, offset, message)
                        break
                    # A header's ``break`` says where the chain went on (``after_seq``);
                    # readers cut the segments before it there (``declared_cuts``), so it
                    # must be where this header continues: the frame before it.
                    false_break = _false_break(frame) if first else None
                    if first and pending is not None:
                        if "break" not in frame.body or false_break is not None:
                            break  # the link holds but nothing declares the damage
                        result.declared_breaks.append(pending)
                        result.notes.append(f"declared break: {pending}; writer noted "
                                            f"{_describe_break(frame.body['break'])}")
                        pending = None
                    elif first and result.frames == 0:
                        result.starts_at = frame.seq
                    if first:
                        walk.header(frame, result.frames == 0)
                    if false_break is not None:
                        problem = BrokenPoint(seg.name, frame.seq, offset, false_break)
                        fatal = True
                        break
                    failed = walk.frame(frame)
                    if failed is not None:
                        problem = BrokenPoint(seg.name, frame.seq, offset, failed)
                        fatal = True
                        break
                    if frame.kind == "end":
                        walk.seal(frame)
                    first = False
                    result.frames += 1
                    if frame.kind in RECORD_KINDS:
                        result.records += 1
                    if frame.kind == "rec" or (decryptor is not None and not keyless):
                        try:
                            opened = opener.take(frame.seq, frame.prev, frame.kind, frame.body,
                                                 header)
                        except MalformedRecord as exc:
                            walk.malformed(frame.seq, exc.reason)
                            opened = []
                        except MissingDataKey as exc:
                            # Not among the keys given: this segment's records are walked as
                            # without a data key; exit 2 unless something else is found.
                            if missing_data is None:
                                missing_data = (exc.kid, seg.name, frame.seq)
                            keyless = True
                            walk.sealed_times = True
                            opened = []
                        except DecryptError as exc:
                            problem = BrokenPoint(seg.name, frame.seq, offset, str(exc))
                            fatal = True
                            break
                        for seq, wire in opened:
                            try:
                                check_wire(wire)
                            except RecordError as exc:
                                walk.malformed(seq, str(exc))
                            if frame.kind == "erc" and isinstance(wire, dict):
                                walk.record_time(wire.get("t"))
                    elif frame.kind == "erc":  # not opened without a data key; in place?
                        mismatch = record_mismatch(frame.kind, header)
                        if mismatch is not None:
                            walk.malformed(frame.seq, mismatch)
                        if header is not None and in_group(frame.kind, frame.body,
                                                           header.get("v")):
                            unopened += 1
                    if frame.kind == "seg":
                        header = frame.body
        except SegmentDamage as exc:
            expected = checker.last.seq + 1 if checker.last is not None else None
            problem = BrokenPoint(seg.name, expected, exc.offset, str(exc))
        except OSError as exc:
            problem = BrokenPoint(seg.name, None, 0, f"cannot read: {exc.strerror or exc}")
        cut = opener.cut()
        if cut is not None and not fatal:
            # The segment ends (cleanly, or where it is damaged) inside a group: a write cut
            # at a frame boundary by a crash, or frames removed from the end; the chain says
            # which. Those records' ciphertext is gone.
            walk.capped("group_without_ciphertext", cut[0],
                       f"records {cut[0]}..{cut[1]} cannot be read: the segment ends before "
                       "the frame that holds their ciphertext (a write cut short by a crash, "
                       "or frames removed from its end)", "warning")
        if pending is not None:
            # The previous segment was damaged and this one did not declare it.
            result.broken = pending
            break
        if problem is not None:
            if (first and checker.last is None) or fatal:
                result.broken = problem  # nothing good before it, or forged: stop here
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
    walk.finish()
    if result.broken is not None or (result.declared_breaks and not accept_declared_breaks):
        result.ok = False
        if result.broken is None:
            result.broken = result.declared_breaks[0]
    if result.errors:
        result.ok = False
    if result.starts_at not in (None, 0):
        result.notes.append(
            f"the retained chain starts at seq {result.starts_at}: earlier segments are not "
            "present (retention or removal), so the first frame cannot be linked back")
        if require_genesis:
            result.ok = False
    if result.broken is None and not result.sealed:
        result.notes.append(
            "the last segment is not sealed (writer running or stopped without a clean "
            "shutdown): frames removed from its end cannot be detected without an anchor "
            "(--anchor)")
    if checker.unlinked:
        # The links of an HMAC chain were not checked: never OK. Nothing else found: the
        # check cannot run without the key (exit 2); else what was found is tampering.
        result.ok = False
        result.head_digest = None  # an HMAC digest, which needs the key
        missing = (f"{segments[0].name}: segment is HMAC-authenticated: an HMAC key is "
                   "needed (--hmac-key-file)")
        if result.broken is None and not result.errors:
            result.missing_key = missing
        else:
            result.notes.insert(0, f"{missing}; its links were not checked, and what is "
                                   "reported was found without it (signatures, seq, shape)")
    if checker.unproven and decryptor is None and not checker.unlinked:
        # Like an HMAC chain read without its key: never OK; nothing else found, the check
        # cannot run without the data key (exit 2); else what was found is tampering.
        result.ok = False
        needs = NEEDS_DATA_KEY.format(checker.unproven, checker.unproven_first)
        if result.broken is None and not result.errors:
            result.missing_key = needs
        else:
            result.notes.insert(0, needs)
    if missing_data is not None:
        kid, where, first_seq = missing_data
        result.ok = False
        needs = (f"{where}: records from seq {first_seq} are encrypted with data key "
                 f"{shown(kid)}, which is not among the keys given: give the data key for "
                 f"key id {shown(kid)} (--data-key) to check them")
        if result.broken is None and not result.errors and result.missing_key is None:
            result.missing_key = needs
        else:
            result.notes.insert(0, needs)
    if unopened:
        result.notes.append(NOTE_UNOPENED.format(unopened))
    if result.assurance == "none":
        result.notes.insert(0, NOTE_NO_KEY)
    elif result.assurance == "hmac":
        result.notes.insert(0, NOTE_HMAC_ONLY)
    return result


def _false_break(frame: Frame) -> str | None:
    """What is wrong with a header's declared break (None: no break, or a true one). A
    writer declares the break it continues after: ``after_seq`` is the seq of the frame
    before its header, an integer. ``export``, ``tail`` and ``policy replay`` read no frame
    after ``after_seq`` in the segments before the header, so any other value either hides
    records that the chain holds (verify found them linked and signed) or has the readers
    give frames after the damage, which verify never checked (found by a hostile review:
    a break added to an unsigned newest header made export skip 37 of 40 records while
    ``verify --pubkey`` said OK)."""
    if frame.kind != "seg" or "break" not in frame.body:
        return None
    info = frame.body["break"]
    after = info.get("after_seq") if isinstance(info, dict) else None
    if isinstance(after, int) and not isinstance(after, bool) and after == frame.seq - 1:
        return None
    what = shown(after) if isinstance(info, dict) else f"a {type(info).__name__}"
    return (f"segment header declares a break after seq {what}, but it continues the "
            f"chain after seq {frame.seq - 1}: a forged break (the readers would skip frames "
            "of the chain, or read frames verify did not check)")


def _missing_predecessor(payload: bytes, names: set[str]) -> str:
    """A header that does not link: say so when the file it names as predecessor is gone."""
    try:
        _seq, _prev, kind, body = decode_frame(payload)
    except FrameError:
        return ""
    prev_segment = body.get("prev_segment") if kind == "seg" else None
    if isinstance(prev_segment, str) and prev_segment not in names:
        return f" (its predecessor {prev_segment} is missing)"
    return ""


def _describe_break(info: Any) -> str:
    if not isinstance(info, dict):
        return "a break"
    return ", ".join(f"{k if isinstance(k, str) else shown(k)}="
                     f"{v if isinstance(v, str | int) and not isinstance(v, bool) else shown(v)}"
                     for k, v in list(info.items())[:8])


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
        """Whether ``rec`` passes every filter that is set."""
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


class MalformedRecord(ValueError):
    """A record frame that no sidecar wrote: a field of the wrong type or value
    (``RecordError``), or a record stored in the clear in a segment whose header declares
    encryption (or encrypted in one that declares none). Readers skip it and say so."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"seq {seq}: malformed record: {message}")
        self.seq = seq
        self.reason = message


def record_mismatch(kind: str, header: dict[str, Any] | None) -> str | None:
    """What is wrong when a record frame's kind does not match its segment header: the
    writer stores every record of a segment encrypted (``erc``) exactly when its header has
    ``enc``. In format 2 a record may be in the clear there too: the collector's copy holds
    the records of an encrypted trail in the clear, rebuilt from the syslog messages (the
    chain is over the plaintext, so those frames link exactly where the encrypted ones do)."""
    encrypted = header is not None and "enc" in header
    if kind == "rec" and encrypted and header is not None \
            and header.get("v") not in JSON_FORMATS:
        return ("stored in the clear in a segment whose header declares encryption "
                "(the writer encrypts every record there: forged)")
    if kind == "erc" and header is not None and not encrypted:
        return "encrypted, but its segment header declares no encryption"
    return None


class RecordOpener:
    """The records of record frames fed in stored order, one frame at a time (``take``).

    A clear frame is its record; a format-1 ``erc`` frame decrypts alone; a format-2 ``erc``
    frame waits for the last frame of its group, which holds the ciphertext of the whole
    group (``chain.ChainHead.json_records``). ``check``: also prove each decrypted record is
    the one its frame's ``d`` (from which the chain goes on) was made from -- ``verify``
    does; GCM alone does not show a record edited and encrypted again by someone who holds
    the data key. ``key``: the HMAC key of an HMAC chain, for that check."""

    def __init__(self, decryptor: Decryptor | None, key: bytes | None = None,
                 check: bool = False) -> None:
        self.decryptor = decryptor or Decryptor()
        self.key = key
        self.check = check
        self._group: list[tuple[int, bytes, dict[str, Any]]] = []

    def take(self, seq: int, prev: bytes, kind: str, body: dict[str, Any],
             header: dict[str, Any] | None) -> list[tuple[int, dict[str, Any]]]:
        """(seq, record map) of the records readable once this frame is read: none, this
        one, or a whole group. ``MalformedRecord`` (this frame only), or ``DecryptError``
        (what follows cannot be read either)."""
        if kind not in RECORD_KINDS:
            self.finish()
            return []
        grouped = header is not None and in_group(kind, body, header.get("v"))
        if not grouped:
            self.finish()  # a group is never interrupted by another record frame
        mismatch = record_mismatch(kind, header)
        if mismatch is not None:
            raise MalformedRecord(seq, mismatch)
        if kind == "rec":
            return [(seq, body)]
        if not grouped:
            return [(seq, self.decryptor.record(seq, body, header))]
        assert header is not None  # grouped
        digest = body["d"]
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise DecryptError(f"record {seq} is not a valid encrypted frame")
        group = self._group
        if group and group[-1][0] + 1 != seq:
            self.finish()
        group.append((seq, prev, body))
        if "c" not in body:
            if len(group) > GROUP_RECORDS:
                self.finish()
            return []
        self._group = []
        digests: list[bytes] = [b["d"] for _s, _p, b in group]
        texts = self.decryptor.group(group[0][0], digests, body, header)
        hmac_chain = header.get("alg") == ALG_HMAC
        chain_key = self.key if hmac_chain else None
        # An HMAC chain read without its key (verify --pubkey alone): ``d`` cannot be made.
        check = self.check and (chain_key is not None or not hmac_chain)
        out: list[tuple[int, dict[str, Any]]] = []
        for (s, p, b), text in zip(group, texts, strict=True):
            if check and link_digest(json_record_frame(s, p, text), chain_key) != b["d"]:
                raise DecryptError(f"record {s} decrypts, but not to the record its digest "
                                   "was made from: it was edited and encrypted again with "
                                   "the data key")
            try:
                out.append((s, parse_record_json(text.decode("utf-8"))))
            except (UnicodeDecodeError, FrameError):
                raise DecryptError(f"record {s} decrypts to garbage") from None
        return out

    def records(self, seq: int, prev: bytes, kind: str, body: dict[str, Any],
                header: dict[str, Any] | None) -> list[tuple[int, AuditRecord | MalformedRecord]]:
        """``take``, as records: each an ``AuditRecord``, or the ``MalformedRecord`` saying
        why it is not one a sidecar wrote (a field of the wrong type or value, clear text
        where the header declares encryption); ``DecryptError`` as ``take``."""
        try:
            opened = self.take(seq, prev, kind, body, header)
        except MalformedRecord as exc:
            return [(seq, exc)]
        out: list[tuple[int, AuditRecord | MalformedRecord]] = []
        for s, wire in opened:
            try:
                out.append((s, AuditRecord.from_wire(wire)))
            except RecordError as exc:
                out.append((s, MalformedRecord(s, str(exc))))
        return out

    def cut(self) -> tuple[int, int] | None:
        """The first and last seq of a group left without its last frame at the end of what
        was read (then forgotten), or None."""
        group, self._group = self._group, []
        return (group[0][0], group[-1][0]) if group else None

    def finish(self) -> None:
        """No more frames of a group can follow (another kind of frame, a gap, the end of
        the segment): ``DecryptError`` when a group is left without its last frame."""
        group, self._group = self._group, []
        if group:
            raise DecryptError(f"records {group[0][0]}..{group[-1][0]} cannot be decrypted: "
                               "the frame that ends their group, which holds their "
                               "ciphertext, is not there (cut or removed)")


def segment_header(seg: SegmentFile) -> dict[str, Any] | None:
    """The body of a segment file's header frame (None if it has none)."""
    found = _header_frame(seg)
    return found[1] if found is not None else None


def segment_header_frame(seg: SegmentFile) -> tuple[int, dict[str, Any]] | None:
    """The seq and body of a segment file's header frame (None if it has none)."""
    return _header_frame(seg)


def _header_frame(seg: SegmentFile) -> tuple[int, dict[str, Any]] | None:
    """The seq and body of a segment file's header frame (None if it has none)."""
    try:
        with open_segment(seg) as fh:
            for _offset, payload in read_frames(fh):
                seq, _prev, kind, body = decode_frame(payload)
                return (seq, body) if kind == "seg" else None
    except (OSError, SegmentDamage, FrameError):
        return None
    return None


def declared_cuts(segments: list[SegmentFile]) -> dict[str, int]:
    """Segment name -> the last seq of it in the chain, for each segment before a later
    segment whose header declares a break (``break``: the writer went on from
    ``after_seq``; no frame after it in an earlier segment is in the chain). Readers stop
    there (``iter_stored``, ``tail``). The cut goes by position, never by the segment name
    the header gives: file names are not covered by any digest or signature, and a damaged
    segment renamed (its stamp or seq changed, its order kept) was read whole, forged
    frames after the break among them, while ``verify --accept-declared-breaks`` said OK
    (found by a hostile review). Nor by the ``after_seq`` the header gives: the chain goes
    on from the frame before the header (its seq - 1), which a writer's ``after_seq``
    always is; a header whose ``after_seq`` says otherwise is forged (``verify``: a broken
    point), and taken at its word it hid records of the chain from the readers (a smaller
    value) or gave frames after the damage that verify never checked (a larger one, or
    none that is an integer: no cut at all)."""
    cut_after: dict[str, int] = {}
    if len(segments) > 1:
        lowest: int | None = None  # the lowest cut a later segment's break implies
        for later in reversed(segments):
            if lowest is not None:
                cut_after[later.name] = lowest
            found = _header_frame(later)
            if found is not None and "break" in found[1]:
                after = found[0] - 1
                lowest = after if lowest is None else min(lowest, after)
    return cut_after


class ChainCut:
    """Where a segment's frames leave the chain after a declared break (``declared_cuts``):
    ``leaves(seq)``, asked for each frame in file order, is True from the first frame that
    is not the chain's -- past the frame at the cut, by position, or out of sequence --
    on. By position, not by the seq a frame claims: a forged frame after the damage with a
    low seq (3 after seq 24) was read by ``export`` and ``tail`` though ``verify
    --accept-declared-breaks`` had not checked it (found by a hostile review)."""

    __slots__ = ("last", "prev", "done")

    def __init__(self, last: int | None) -> None:
        self.last = last  # the seq of the segment's last frame in the chain (None: no cut)
        self.prev: int | None = None
        self.done = False

    def leaves(self, seq: int) -> bool:
        """Is the frame ``seq`` (the next in file order) out of the chain?"""
        last = self.last
        if last is None:
            return False
        if self.done or seq > last or (self.prev is not None and seq != self.prev + 1):
            self.done = True
            return True
        self.prev = seq
        self.done = seq == last
        return False

    def message(self, segment: str) -> str:
        """What the readers say when ``segment`` is cut here."""
        return (f"{segment}: frames after seq {self.last} are not in the chain (a break a "
                "later segment's writer declared): not read")


def _reader_chain() -> ChainVerifier:
    """A verifier for the readers' link checks: no key; an HMAC chain's links unchecked."""
    return ChainVerifier(None, unkeyed_hmac=True)


class UnlinkedFrame(SegmentDamage):
    """A frame whose ``prev`` is not the link digest of the frame before it: that frame (or
    this one) was edited. What the frame before made readable is not shown."""


class TrailOrder:
    """The chain across the segments of a trail as a reader walks it (``iter_stored``,
    ``tail``): the seq and link digest of the last frame read, for the next segment's
    ``SegmentOrder`` (``segment()``). Before the twenty-ninth session each segment was
    checked on its own and no link at all: an old segment copied in under a later name, a
    segment twice or a middle one deleted passed with exit 0 (``tail`` printed the copied
    seqs as the newest), and so did a deny edited to an allow in place, which ``verify``
    without a key finds (found by a hostile review). So a header must continue the frame
    read before it: a seq at or below it is refused (the segment is not read, as at
    damage); a seq further on is a segment missing (``on_gap``: said, exit 1, read on from
    there). Every frame's ``prev`` must be the link digest of the frame before it, SHA-256
    of its bytes (one hash per frame), or the ``d`` of a format-2 group's frame. An HMAC
    segment's digests need the key, which the readers do not take: its links are not
    checked, and ``on_note`` says so once.

    ``held``: what the last frame read made readable, given out (``release``) once the next
    frame links to it -- a record in a frame edited in place is never shown -- or at the
    end of the trail (``release`` too), where nothing follows to check it (its signature
    is ``verify --pubkey``'s business). After a segment that stopped at damage, the next
    header's link is checked all the same when its seq continues the last frame read (a
    writer's restart after a crash declares the break there and links to that frame);
    when no link can be checked -- a header further on (a segment missing, frames not read),
    or none before it -- the held records are dropped and ``on_gap`` says so. Before the
    twenty-ninth session's review of its fixes they were given out unchecked: the record of
    the last good frame before a torn one, edited in place, was shown by export and tail
    with the same words and exit code as the honest crash trail.

    One digest algorithm per trail: a header that says HMAC after SHA-256 ones (or the
    reverse) is refused as an unlinked frame, as verify calls it BROKEN (no single key
    verifies both). Before, the readers took the switch for a writer given an HMAC key at
    a restart and stopped checking links: a header edited to claim HMAC let a record
    edited in place through, exit 0, with a note (the same review). Under an HMAC claim a
    frame whose ``prev`` is the plain SHA-256 link of the frame before is refused too
    (``chain.FalseHmacClaim``)."""

    __slots__ = ("last", "chain", "short", "held", "noted", "on_gap", "on_note", "alg")

    def __init__(self, on_gap: Callable[[str], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> None:
        self.last: int | None = None  # seq of the last frame read (None: none yet)
        # The chain as read so far (its last frame's link digest); None: not known.
        self.chain: ChainVerifier | None = None
        # The segment read last stopped before its end (damage, said): where the chain goes
        # on after it is not known, so its successor's header is only checked not to go back.
        self.short = False
        self.held: list[Any] = []
        self.noted = False  # an HMAC segment's unchecked links were said
        self.on_gap = on_gap
        self.on_note = on_note
        # The digest algorithm of the first header read: every later header must say the
        # same (``SegmentOrder._link``), across damage and gaps too.
        self.alg: Any = None

    def segment(self, name: str = "") -> SegmentOrder:
        """The order of the next segment (file ``name``), continuing this trail."""
        return SegmentOrder(self, name)

    def release(self) -> list[Any]:
        """What was held, now given out (and forgotten)."""
        held, self.held = self.held, []
        return held


class SegmentOrder:
    """The structure of one segment as a reader walks it (``iter_stored``, ``tail``):
    ``check(seq, kind, offset, prev, body, payload)``, asked for each frame in file order,
    raises ``SegmentDamage`` at the first frame that breaks what ``verify`` refuses without
    any key (``chain.ChainVerifier``): a segment that does not start with its header, a
    frame after the segment's seal (``end``), a second header in the middle, a seq reused or
    not one more than the frame before, a link that does not hold (``TrailOrder``: also
    from the segment before). The readers stop there as at damage: before the
    twenty-seventh session they showed such frames -- a record appended after the newest
    seal, a header in the middle (which also made the reader take its claims, no
    encryption among them, for the rest of the segment), a record copied in twice -- exit
    0, while verify said BROKEN (found by a hostile review). Once it has raised, every
    later frame is refused too (``stopped``)."""

    __slots__ = ("last", "sealed", "stopped", "trail", "name")

    def __init__(self, trail: TrailOrder | None = None, name: str = "") -> None:
        self.name = name
        self.last: int | None = None  # seq of the segment's last frame read (None: none yet)
        self.sealed = False
        self.stopped = False
        self.trail = trail if trail is not None else TrailOrder()

    def check(self, seq: int, kind: str, offset: int, prev: bytes | None = None,
              body: dict[str, Any] | None = None, payload: bytes | None = None) -> None:
        """Accept the next frame of the segment, or ``SegmentDamage`` saying why not. With
        ``payload`` (and its ``prev`` and ``body``) its link is checked too."""
        problem: str | None = None
        unlinked = False  # (the problem is a link: ``UnlinkedFrame``)
        last, trail = self.last, self.trail
        # A header whose link to the last frame read is checked (``_link``): else what that
        # frame made readable is dropped below.
        linked = last is None and payload is not None and prev is not None \
            and self._follows(seq)
        if self.stopped:
            problem = f"seq {seq}: after a frame not read"
        elif last is None and kind != "seg":
            problem = f"seq {seq}: the segment does not start with a header frame"
        elif self.sealed:
            problem = f"seq {seq}: a frame after the segment's seal"
        elif last is not None and kind == "seg":
            problem = f"seq {seq}: a header frame in the middle of the segment"
        elif last is not None and seq <= last:
            problem = f"seq {seq} reused after seq {last}"
        elif last is not None and seq != last + 1:
            problem = f"seq skipped from {last} to {seq}"
        elif last is None and trail.last is not None and seq <= trail.last:
            problem = (f"seq {seq} reused after seq {trail.last}, the last frame read of the "
                       "segment before: an old segment copied in, or a segment twice")
        elif payload is not None and prev is not None:
            problem, unlinked = self._link(seq, kind, prev, body, payload)
        if problem is not None:
            self.stop()
            raise (UnlinkedFrame if unlinked else SegmentDamage)(
                f"{problem} (verify: broken; the frames from here are not read)", offset)
        if last is None and trail.last is not None and not linked:
            # Nothing checks the link of the last frame read: what it made readable is not
            # shown (the twenty-ninth session's review: given out unchecked before).
            dropped = f"; the records of seq {trail.last} are not shown: nothing checks " \
                      "their link" if trail.held else ""
            trail.held.clear()
            if trail.on_gap is not None and not trail.short:
                trail.on_gap(f"{self.name}: seq skipped from {trail.last} to {seq} at the header: a "
                             "segment before this one is missing, or frames were cut from the "
                             "end of the one before (verify: broken; read on from this "
                             f"header){dropped}")
            elif trail.on_gap is not None and dropped:
                trail.on_gap(f"{self.name}: seq {seq} at the header does not continue seq "
                             f"{trail.last}, the last frame read before the damage{dropped} "
                             "(verify: broken; read on from this header)")
        self.last = trail.last = seq
        trail.short = False
        self.sealed = kind == "end"

    def _follows(self, seq: int) -> bool:
        """Does a header ``seq`` continue the trail's chain: the last frame read is the
        chain's last (its link known) and the seq is one more."""
        chain, last = self.trail.chain, self.trail.last
        return chain is not None and chain.last is not None and last is not None \
            and chain.last.seq == last and seq == last + 1

    def _link(self, seq: int, kind: str, prev: bytes, body: dict[str, Any] | None,
              payload: bytes) -> tuple[str | None, bool]:
        """Check the frame's ``prev`` against the link digest of the frame before it, when
        known, and take the frame into the trail's ``ChainVerifier`` (which computes its
        link as ``verify`` does, whatever the format): what is wrong (None: nothing), and
        whether it is the link."""
        trail = self.trail
        chain = trail.chain
        if kind == "seg":
            alg = body.get("alg") if body is not None else None
            if trail.alg is None:
                trail.alg = alg
            elif alg != trail.alg:
                # (the review: an edited header turned the readers' link checks off)
                return (f"the segment header says alg {shown(alg)} after segments of alg "
                        f"{shown(trail.alg)}: no single key verifies a trail that switches "
                        "between SHA-256 and HMAC (a header edited to claim HMAC, or a "
                        "writer given or denied an HMAC key on an existing trail)"), True
            if not self._follows(seq):
                # (the first frame read, after a gap, or after damage that the header does
                # not continue: not known; ``check`` drops what was held)
                chain = trail.chain = _reader_chain()
            assert chain is not None
            chain.start_segment()
        elif chain is None:
            # (not reached: ``check`` refuses a segment that does not start with a header,
            # and a frame that does not decode stops the segment; no link, not shown)
            return f"frame {seq}: no link known to check it against", True
        last = chain.last
        if last is not None and not chain.unlinked and prev != last.digest:
            return (f"frame {seq} does not chain to frame {last.seq}: a frame was edited, "
                    "removed or inserted"), True
        try:
            chain.accept(payload)
        except ChainError as exc:
            # A header the chain refuses (across segments: a switch between SHA-256 and
            # HMAC), or a SHA-256 link under an HMAC claim: the frame before is not shown.
            return str(exc), kind == "seg" or isinstance(exc, FalseHmacClaim)
        if chain.unlinked and not trail.noted and trail.on_note is not None:
            trail.noted = True
            trail.on_note("the segments are HMAC-authenticated: their links were not checked "
                          "(that needs the HMAC key, which the readers do not take: verify "
                          "--hmac-key-file checks them)")
        return None, False

    def stop(self) -> None:
        """No more frames of the segment are read (it raised, or damage the caller found)."""
        self.stopped = True
        self.trail.short = True

    def undecoded(self, seq_hint: str = "") -> str:
        """A frame that does not decode: damage, as ``iter_stored`` (export) takes it. The
        segment is read no further (``stop``), and what the frame before it made readable
        is not shown: that frame's link is checked by the next frame's ``prev``, which
        cannot be read (an edited record followed by a frame made not to decode was shown
        otherwise). Returns what to add to the message ('' when nothing was held). Before
        the thirty-third session ``tail`` passed over such a frame and read on with no link
        checked until the next header, so a record edited in place after it was shown
        (found by a hostile review)."""
        dropped = "" if not self.trail.held or self.last is None else \
            f"; the records of seq {self.last} are not shown: nothing checks their link"
        self.trail.held.clear()
        self.stop()
        return dropped


def iter_stored(
    path: str, filters: RecordFilter | None = None,
    on_damage: Callable[[str], None] | None = None, decryptor: Decryptor | None = None,
    on_malformed: Callable[[str], None] | None = None,
    on_gap: Callable[[str], None] | None = None, on_note: Callable[[str], None] | None = None,
) -> Iterator[StoredRecord]:
    """Every readable record under ``path`` in chain order. Reading does not verify
    signatures (use ``verify``); a damaged segment, or one whose records cannot be
    decrypted, is read up to there, reported to ``on_damage`` and skipped from there. So is
    a segment past a break that a later segment's writer declared (its header's ``break``:
    the frames after ``after_seq`` of the segment it names are not in the chain -- the
    writer went on from the frame before them; a review found export giving them, an edited
    signed record among them, though ``verify --accept-declared-breaks`` had not checked
    them). A malformed record (``MalformedRecord``) is skipped and reported to
    ``on_malformed`` (``SEGMENT: seq N: malformed record: field ...``); reading goes on with
    the next frame. The chain's structure and links are checked as ``verify`` checks them
    without a key, across segments too (``TrailOrder``, ``SegmentOrder``: a segment that
    does not continue the one before is reported to ``on_gap``, or ``on_damage`` when not
    given; HMAC links not checked, to ``on_note``), and each encrypted record of a format-2
    group against its digest (``RecordOpener`` with ``check``): a frame that fails is
    damage. A frame's records are given once the next frame links to it (or at the end)."""
    segments = resolve_segments(path)
    cut_after = declared_cuts(segments)
    trail = TrailOrder(on_gap if on_gap is not None else on_damage, on_note)
    for seg in segments:
        header: dict[str, Any] | None = None
        # Each record checked against its ``d`` as ``verify --data-key`` does: GCM alone
        # let a group edited and encrypted again by the data key's holder read as the
        # record it was not (a deny shown as an allow, exit 0; found by a hostile review).
        opener = RecordOpener(decryptor, check=True)
        cut = ChainCut(cut_after.get(seg.name))
        order = trail.segment(seg.name)
        try:
            with open_segment(seg) as fh:
                for offset, payload in read_frames(fh):
                    seq, prev, kind, body = decode_frame(payload)
                    if cut.leaves(seq):
                        if on_damage is not None:
                            on_damage(cut.message(seg.name))
                        break
                    try:
                        order.check(seq, kind, offset, prev, body, payload)
                    except UnlinkedFrame:
                        trail.held.clear()  # the frame before was edited: not shown
                        raise
                    yield from trail.release()  # (the frame before links to this one)
                    if kind == "seg":
                        header = body
                    for at, rec in opener.records(seq, prev, kind, body, header):
                        if isinstance(rec, MalformedRecord):
                            if on_malformed is not None:
                                on_malformed(f"{seg.name}: {rec}")
                        elif filters is None or filters.matches(rec):
                            trail.held.append(StoredRecord(at, seg.name, rec))
            opener.finish()
        except (SegmentDamage, FrameError, TypeError, DecryptError) as exc:
            # A frame that does not decode: the frame before it is covered by no link.
            dropped = order.undecoded() if isinstance(exc, FrameError) else ""
            order.stop()
            if on_damage is not None:
                on_damage(f"{seg.name}: {exc}{dropped}")
        except OSError as exc:  # not a regular file, unreadable
            order.stop()
            if on_damage is not None:
                on_damage(f"{seg.name}: cannot read: {exc.strerror or exc}")
    yield from trail.release()


def iter_records(path: str, filters: RecordFilter | None = None,
                 decryptor: Decryptor | None = None) -> Iterator[AuditRecord]:
    """The records under ``path`` (directory or segment file) that match ``filters``."""
    for stored in iter_stored(path, filters, decryptor=decryptor):
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
    last_signed_seq: int | None = None  # newest signed frame in that segment


def find_resume_point(directory: str, key: bytes | None) -> ResumePoint:
    """Read back from the newest segment to the last frame that verifies within it.

    Only the newest segments are read (one, unless it holds no good frame at all). Links
    into older segments are ``verify``'s business; the writer only needs the head.

    A frame whose seq is ``MAX_RESUME_SEQ`` or more is damage too: no writer gets there
    (a seq per frame), and one planted there (a header at seq 2**64-1, no key needed) made
    the sidecar die at start, every start, because the next seq does not fit in a frame
    (found by a hostile review, the twenty-ninth); the writer goes on after the last frame
    before it and declares the break.

    A threshold alone is no rule for where to resume: a header planted just below it made
    the writer resume there and write frames past it, which its next start refused, going
    back to the planted frame and forking the chain again, every start (found by the review
    of that fix: each run's records cut out). So a resume point at ``HIGH_SEQ`` or more --
    a seq no writer reaches from seq 0 -- is taken only when its segments continue, one
    from the one before it, down to a segment whose header is below ``HIGH_SEQ``: the
    writer's own segments after such a point always do, a planted segment never does (its
    header jumps); it is damage, and the search goes on before it.
    """
    segments = list_segments(directory)
    damage: str | None = None
    damaged: str | None = None
    index = len(segments)
    while index > 0:
        index -= 1
        seg = segments[index]
        checker = ChainVerifier(key)
        checker.start_segment()
        problem: str | None = None
        signed: int | None = None
        last: Frame | None = None
        try:
            with open_segment(seg) as fh:
                for offset, payload in read_frames(fh):
                    try:
                        frame = checker.accept(payload)
                    except ChainError as exc:
                        problem = f"{exc} at offset {offset}"
                        break
                    if frame.seq + 1 >= MAX_RESUME_SEQ:
                        # (+ 1: a frame at MAX_RESUME_SEQ - 1 made the writer write seq
                        # MAX_RESUME_SEQ, which its next start refused as damage and forked
                        # from the planted frame again, every start; the review of the fix)
                        problem = (f"seq {frame.seq} at offset {offset}: beyond any seq a "
                                   f"writer reaches (a writer continues below {MAX_RESUME_SEQ})")
                        break
                    last = frame
                    if "sig" in frame.body:
                        signed = frame.seq
        except SegmentDamage as exc:
            problem = f"{exc} at offset {exc.offset}"
        except OSError as exc:
            problem = f"cannot read: {exc.strerror or exc}"
        if last is not None and last.seq + 1 >= HIGH_SEQ:
            jump = _high_jump(segments, index)
            if jump is not None:
                at, why = jump
                if damage is None:
                    damage, damaged = why, segments[at].name
                index = at  # (the segments from the jump on are not the chain's)
                continue
        if problem is not None and damage is None:
            damage, damaged = problem, seg.name
        if last is not None:
            return ResumePoint(last.seq + 1, last.digest, seg.name, last.kind == "end",
                               damage, damaged, signed)
        if damage is None:
            damage, damaged = "segment has no readable frame", seg.name
    if segments:
        return ResumePoint(0, GENESIS, None, False, damage or "no readable segment", damaged)
    return ResumePoint(0, GENESIS, None, False, None, None)


def _high_jump(segments: list[SegmentFile], index: int) -> tuple[int, str] | None:
    """``find_resume_point``: None when the segments up to ``index`` continue one from the
    one before back to a header below ``HIGH_SEQ``; else the index of the segment whose
    header does not continue the one before it (or has none before it), and why."""
    at = index
    while True:
        found = _header_frame(segments[at])
        if found is None:
            return at, "segment has no readable header"
        seq = found[0]
        if seq < HIGH_SEQ:
            return None
        before = _last_seq(segments[at - 1]) if at > 0 else None
        if before is None or before + 1 != seq:
            return at, (f"header at seq {seq} does not continue the segment before it (its "
                        f"last frame: seq {before}): a segment planted at a seq no writer "
                        f"reaches (a writer starts below {HIGH_SEQ})")
        at -= 1


def _last_seq(seg: SegmentFile) -> int | None:
    """The seq of a segment's last whole frame (None: no readable frame)."""
    last: bytes | None = None
    try:
        with open_segment(seg) as fh:
            for _offset, payload in read_frames(fh):
                last = payload
    except (OSError, SegmentDamage):
        pass
    if last is None:
        return None
    try:
        return decode_frame(last)[0]
    except FrameError:
        return None


# A seq no writer reaches from seq 0 (a seq per frame): a resume point at or above it is
# taken only when its segments continue back to a header below it (``_high_jump``).
HIGH_SEQ = 2**62
# A starting writer never continues from a seq at or above this (``find_resume_point``):
# msgpack packs at most 2**64-1, and a writer writes one seq per frame, so this bound is
# never reached honestly and leaves room for any number of frames after it.
MAX_RESUME_SEQ = 2**63


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
