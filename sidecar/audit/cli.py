"""``sidecar audit keygen|verify|collect|export|tail``: argument parsing and output only.

``sidecar.cli`` creates the ``audit`` command and calls ``add_audit_parsers(audit_subparsers)``;
each sub-command sets ``func`` to a ``cmd_*(args) -> int`` function. The work (reading,
verifying, decrypting, rebuilding segments) lives in ``sidecar.audit.segments``, ``chain``,
``crypto``, ``signing`` and ``ship``. ``python -m sidecar.audit.cli`` runs the same commands
standalone. See docs/audit.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import IO, Any

import msgpack

from sidecar.audit.chain import LENGTH, MAX_FRAME_BYTES, ChainError, FrameError, decode_frame
from sidecar.audit.crypto import DecryptError, Decryptor, load_decryptor, write_data_key
from sidecar.audit.record import FIELD_NAMES, AuditRecord
from sidecar.audit.segments import (
    ChainCut,
    MalformedRecord,
    RecordFilter,
    RecordOpener,
    SegmentDamage,
    SegmentFile,
    SegmentOrder,
    TrailOrder,
    UnlinkedFrame,
    VerifyResult,
    declared_cuts,
    iter_stored,
    open_segment,
    parse_time,
    path_problem,
    resolve_segments,
    segment_header,
    segment_header_frame,
    verify,
)
from sidecar.audit.ship import MAX_COLLECT_LINE, CollectError, Collector, write_segments
from sidecar.audit.signing import load_anchor, load_keyring, read_small_file, write_keypair
from sidecar.cli import seconds
from sidecar.config.audit import load_hmac_key
from sidecar.config.source import open_regular_text
from sidecar.output import Progress, add_output_flag, csv_cell, render, rfc3339, safe

MIN_POLL = 0.05
MAX_POLL = 10.0
MAX_TAIL_LINES = 100_000
# ``tail`` without ``--follow``: how long it waits for the writer to finish a frame the
# newest segment ends inside (``_Follower.settle``), and how often it looks. The writer
# appends each batch of whole frames with one write (``sidecar.audit.writer``), so a frame
# is cut short only while that write runs -- well under a second; its lingers
# (``batch_linger_seconds``, 0.25 s by default, at most 1 s) come between writes, never
# inside one. A frame still cut after this is one no writer is finishing: damage.
SETTLE_SECONDS = 1.0
SETTLE_POLL = 0.05
# ``tail --follow``: how many of the segments it moved on from it keeps watching for growth
# (``_Follower.left``; one ``stat`` each per poll). A segment no longer listed (retention
# deleted it) stops being watched.
WATCHED_LEFT = 256


class _Fork(Exception):
    """``tail --follow`` found two segments continuing the trail: it cannot tell which is
    the writer's, and stops (exit 1)."""


def add_audit_parsers(subparsers: Any) -> None:
    """Register ``keygen``, ``verify``, ``collect``, ``export`` and ``tail`` on an argparse
    sub-parsers object."""
    p = subparsers.add_parser("keygen", help="make an Ed25519 key pair for signed checkpoints")
    p.add_argument("prefix", metavar="PREFIX",
                   help="writes PREFIX.key (private, 0600; never overwritten) and PREFIX.pub")
    p.add_argument("--data-key", action="store_true",
                   help="instead write PREFIX.data: an AES-256 key for audit.encryption_key_file")
    p.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser("verify", help="check the hash chain of an audit trail")
    p.add_argument("path", metavar="PATH", help="audit directory or one segment file")
    p.add_argument("--pubkey", action="append", default=[], metavar="FILE",
                   help="PEM public key(s) of the signing keys (repeat, or several in one "
                        "file); checks every signed checkpoint")
    p.add_argument("--anchor", action="append", default=[], metavar="CHECKPOINT",
                   help="a checkpoint saved elsewhere (JSON from /audit/head) that must still "
                        "be in the chain (repeatable)")
    p.add_argument("--hmac-key-file", help="key file, for trails written with audit.hmac_key_file")
    p.add_argument("--id", metavar="SPIFFE_ID", dest="identity",
                   help="the sidecar whose trail this must be: every checkpoint naming an "
                        "identity must name this one")
    _add_data_key(p, "also check that every encrypted record decrypts")
    p.add_argument("--accept-declared-breaks", action="store_true",
                   help="exit 0 when the only problems are breaks the writer declared")
    p.add_argument("--accept-unsigned-start", action="store_true",
                   help="with --pubkey: records before the first signed checkpoint, more "
                        "than its writer signs over, are a warning, not an error (a trail "
                        "that ran before signing was configured; nothing proves them)")
    p.add_argument("--require-genesis", action="store_true",
                   help="fail when the oldest segments are missing (retention)")
    p.add_argument("--json", action="store_true", help="older spelling of -o json")
    add_output_flag(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser(
        "collect", help="rebuild segment files from what a syslog collector received")
    p.add_argument("files", nargs="+", metavar="FILE", help="collector output (syslog lines)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="new directory for the rebuilt segments (then: sidecar audit verify DIR)")
    _add_data_key(p, "to compare encrypted records' JSON with their frames")
    p.set_defaults(func=cmd_collect)

    p = subparsers.add_parser("export", help="export audit records as JSON lines or CSV")
    p.add_argument("path", metavar="PATH", help="audit directory or one segment file")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    _add_filters(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    _add_data_key(p, "to read encrypted records")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("tail", help="print the newest audit records, optionally follow")
    p.add_argument("path", metavar="PATH", help="audit directory or one segment file")
    p.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                   help="how many of the newest records to print first (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("--interval", type=seconds, default=0.5,
                   help=f"follow poll interval, seconds ({MIN_POLL}..{MAX_POLL}, default 0.5)")
    _add_filters(p)
    _add_data_key(p, "to read encrypted records")
    p.set_defaults(func=cmd_tail)


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="T", help="RFC 3339 time, unix seconds, or a duration "
                                                "back from now such as 90s, 15m, 1h, 2d "
                                                "(inclusive)")
    p.add_argument("--until", metavar="T", help="RFC 3339 time or unix seconds (inclusive)")
    p.add_argument("--peer", metavar="ID", help="only records whose peer is this SPIFFE ID")
    p.add_argument("--decision", choices=("allow", "deny", "dry-run"))
    p.add_argument("--rule", metavar="R", help="only records of this rule name")
    p.add_argument("--event", metavar="E", help="only this event kind (request, alert, ...)")


_AGO = re.compile(r"^(\d+[smhd])+$")


def _since(text: str) -> float:
    """``--since``: an RFC 3339 time, unix seconds, or a duration ago (``1h``, ``1h30m``)."""
    if _AGO.match(text.strip()):
        from sidecar.identity.cli import parse_ttl

        try:
            return time.time() - parse_ttl(text)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"--since: not an RFC 3339 time, unix seconds or a duration "
                         f"(e.g. 1h): {text!r}") from None


def _missing(path: str) -> bool:
    """Say "not found" (exit 2) for a path that does not exist, or one that is neither a
    directory nor a regular file (a FIFO, a device): a usage error, not tampering."""
    problem = path_problem(path)
    if problem is None:
        return False
    print(f"error: {path}: {problem}", file=sys.stderr)
    return True


def _add_data_key(p: argparse.ArgumentParser, why: str) -> None:
    p.add_argument("--data-key", action="append", default=[], metavar="FILE",
                   help=f"data key file of audit.encryption_key_file (repeatable), {why}")


def _decryptor(args: argparse.Namespace) -> Decryptor | None:
    paths = getattr(args, "data_key", None) or []
    return load_decryptor(paths) if paths else None


def _filters(args: argparse.Namespace) -> RecordFilter:
    return RecordFilter(
        since=_since(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        peer=args.peer, decision=args.decision, rule=args.rule, event=args.event,
    )


def _reader_args(args: argparse.Namespace) -> tuple[RecordFilter, Decryptor | None] | None:
    """The filters and data keys of a command that reads records (export, tail), with its
    path checked; None (the reason said on stderr, exit 2) for bad filters or keys, a
    missing path, or a path with no audit segments."""
    try:
        filters = _filters(args)
        decryptor = _decryptor(args)
    except ValueError as exc:
        print(f"error: {safe(exc)}", file=sys.stderr)
        return None
    if _missing(args.path):
        return None
    if not resolve_segments(args.path):
        print(f"error: {args.path}: no audit segments here (is this audit.path?)",
              file=sys.stderr)
        return None
    return filters, decryptor


def _json_value(rec: AuditRecord) -> dict[str, Any]:
    return rec.as_dict()


def _json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def cmd_keygen(args: argparse.Namespace) -> int:
    """0: key pair written; 2: cannot (exists, unwritable)."""
    try:
        if getattr(args, "data_key", False):
            data = args.prefix + ".data"
            kid = write_data_key(data)
            print(f"data key: {data} (audit.encryption_key_file; --data-key to read)")
            print(f"key id:   {kid}")
            return 0
        priv, pub, kid = write_keypair(args.prefix)
    except OSError as exc:
        print(f"error: cannot write {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"private key: {priv} (audit.signing_key_file; keep it off the audit volume)")
    print(f"public key:  {pub} (sidecar audit verify --pubkey)")
    print(f"key id:      {kid}")
    return 0


def verify_result_dict(result: VerifyResult) -> dict[str, Any]:
    """The verify result as plain data (the ``--json`` output)."""
    return {
        "ok": result.ok, "assurance": result.assurance, "records": result.records,
        "frames": result.frames, "segments": result.segments, "starts_at": result.starts_at,
        "head_seq": result.head_seq,
        "head_digest": result.head_digest.hex() if result.head_digest else None,
        "sealed": result.sealed, "checkpoints": result.checkpoints,
        "signed_through": result.signed_through,
        "unsigned_tail_records": result.unsigned_tail_records,
        "unsigned_tail_frames": result.unsigned_tail_frames,
        "restarts": result.restarts, "anchors_matched": result.anchors_matched,
        "identities": list(result.identities),
        "broken": str(result.broken) if result.broken else None,
        "broken_segment": result.broken.segment if result.broken else None,
        "broken_seq": result.broken.seq if result.broken else None,
        "declared_breaks": [str(b) for b in result.declared_breaks],
        "findings": [{"severity": f.severity, "code": f.code, "segment": f.segment,
                      "seq": f.seq, "message": f.message} for f in result.findings],
        "notes": result.notes,
    }


def verify_result_text(result: VerifyResult) -> str:
    """The verify result for a person. Identities, the broken point, findings and notes
    come from the trail's own frames and anchor files (which whoever can write the audit
    directory forges): each is ``safe``, one line, never a terminal action."""
    lines = [f"{'OK' if result.ok else 'BROKEN'}: {result.records} records, {result.frames} "
             f"frames, {result.segments} segments"]
    if result.head_seq is not None and result.head_digest is not None:
        lines.append(f"head: seq {result.head_seq} digest {result.head_digest.hex()}")
    if result.identities:
        label = "identity" if len(result.identities) == 1 else "identities"
        signed = "" if result.assurance == "signature" else " (not proven without --pubkey)"
        lines.append(f"{label}: {', '.join(map(safe, result.identities))}{signed}")
    if result.assurance == "signature":
        through = "nothing" if result.signed_through is None else f"seq {result.signed_through}"
        others = result.unsigned_tail_frames - result.unsigned_tail_records
        # The newest segment's header (a rotation after the last checkpoint) is unsigned
        # too: say so, not only the records.
        tail = f"{result.unsigned_tail_records} records" + (
            f" and {others} other frame{'s' if others != 1 else ''} (segment headers)"
            if others > 0 else "")
        lines.append(f"signed: {result.checkpoints} checkpoints verified, covering {through}; "
                     f"unsigned tail: {tail}")
    if result.anchors_matched:
        lines.append(f"anchors: {result.anchors_matched} matched")
    if result.broken is not None:
        lines.append(f"first broken: {safe(result.broken)}")
    lines.extend(safe(f) for f in result.findings)
    lines.extend(f"note: {safe(note)}" for note in result.notes)
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    """0: the chain holds; 1: broken (first broken point printed); 2: cannot run."""
    if _missing(args.path):
        return 2
    key = None
    try:
        if getattr(args, "hmac_key_file", None):
            read_small_file(args.hmac_key_file, "HMAC key file")  # not a FIFO, device...
            key = load_hmac_key(args.hmac_key_file)
        pubkeys = getattr(args, "pubkey", None) or []
        keyring = load_keyring(pubkeys) if pubkeys else None
        anchors = [load_anchor(a) for a in getattr(args, "anchor", None) or []]
        decryptor = _decryptor(args)
    except ValueError as exc:
        print(f"error: {safe(exc)}", file=sys.stderr)
        return 2
    # On a terminal, say what is being read while the chain is checked (erased after).
    progress = Progress("verifying")
    try:
        progress.update(len(resolve_segments(args.path)), "segment(s)")
    except OSError:
        pass
    try:
        result = verify(args.path, key=key, keyring=keyring, anchors=anchors,
                        decryptor=decryptor, identity=getattr(args, "identity", None),
                        accept_declared_breaks=getattr(args, "accept_declared_breaks", False),
                        accept_unsigned_start=getattr(args, "accept_unsigned_start", False),
                        require_genesis=getattr(args, "require_genesis", False))
    finally:
        progress.close()
    if result.missing_key is not None:
        # Like a key file that cannot be read: the check cannot run (not BROKEN).
        print(f"error: cannot verify {args.path}: {result.missing_key}", file=sys.stderr)
        return 2
    fmt = getattr(args, "output_format", "table")
    if getattr(args, "json", False) and fmt == "table":
        print(_json_line(verify_result_dict(result)))  # --json: the older, one-line spelling
    elif fmt != "table":
        sys.stdout.write(render({"kind": "AuditVerify", **verify_result_dict(result)}, fmt))
    else:
        print(verify_result_text(result))
    return 0 if result.ok else 1


def cmd_collect(args: argparse.Namespace) -> int:
    """0: rebuilt; 1: two different frames with one seq, or a message that does not match
    its frame; 2: cannot read or write."""
    try:
        collector = Collector(_decryptor(args))
        if os.path.exists(args.output) and os.listdir(args.output):
            print(f"error: {args.output} is not empty", file=sys.stderr)
            return 2
        if os.path.isdir(args.output) and os.stat(args.output).st_mode & 0o002:
            print(f"warning: {args.output} is world-writable: anyone could change the rebuilt "
                  "segments before they are verified", file=sys.stderr)
        for path in args.files:
            # Checked and read on one descriptor (a regular file, never a FIFO): before the
            # twenty-fourth session the check and the open were two, with a window between.
            try:
                fh = open_regular_text(path)
            except OSError as exc:
                raise ValueError(f"cannot read collector output {path}: "
                                 f"{exc.strerror or exc}") from None
            with fh:
                collector.add_file(fh, path)
        collector.check()
        trails = collector.found
        if len(trails) <= 1:
            files = write_segments(collector.frames, args.output)
        else:
            # Several trails in one collector file (sidecars, or the workers of one, sharing
            # a collector): one directory each, ``trail-N`` in seq order of its first frame
            # (before the twenty-sixth session they were taken for one edited trail).
            files = 0
            for n, frames in enumerate(trails, 1):
                where = os.path.join(args.output, f"trail-{n}")
                files += write_segments(frames, where)
                print(f"trail-{n}: {len(frames)} frames from seq {min(frames)}"
                      f"{_trail_identity(frames)}")
    except CollectError as exc:
        print(f"BROKEN: {safe(exc)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {safe(exc)}", file=sys.stderr)
        return 2
    n_frames = sum(len(t) for t in collector.found)
    several = f", {len(collector.found)} trails" if len(collector.found) > 1 else ""
    print(f"{collector.messages} messages, {n_frames} frames{several}, {files} segment "
          f"files in {args.output}")
    if collector.oversized:
        print(f"note: {collector.oversized} lines longer than "
              f"{MAX_COLLECT_LINE // (1024 * 1024)} MiB skipped (no message of ours is)")
    if collector.unchecked:
        print(f"note: {collector.unchecked} encrypted records' JSON not compared with their "
              "frames (no --data-key opens them)")
    if collector.refused:
        more = ", ..." if collector.refused > len(collector.refused_at) else ""
        print(f"warning: {collector.refused} lines that look like audit messages were skipped: "
              "not messages as the shipper writes them (cut by the collector, or edited; "
              f"none names the seq of a frame read): {safe(', '.join(collector.refused_at))}"
              f"{more}", file=sys.stderr)
    incomplete = collector.incomplete
    if incomplete:
        shown = ", ".join(incomplete[:MAX_INCOMPLETE_LISTED])
        more = ", ..." if len(incomplete) > MAX_INCOMPLETE_LISTED else ""
        print(f"warning: {len(incomplete)} messages sent in parts (audit.ship."
              f"max_message_bytes) were not read, some of their parts missing: {shown}{more} "
              "(verify shows the gap)", file=sys.stderr)
    return 0


MAX_INCOMPLETE_LISTED = 5  # messages with parts missing named by ``collect``


def _trail_identity(frames: dict[int, bytes]) -> str:
    """`` (SPIFFE_ID)``: the identity the trail's signed frames name (a checkpoint's or seal's
    ``id``), as a hint for the reader; proven only by ``verify --pubkey --id``."""
    for seq in sorted(frames, reverse=True):
        try:
            _s, _p, kind, body = decode_frame(frames[seq])
        except FrameError:
            continue
        ident = body.get("id") if kind in ("chk", "end") and isinstance(body, dict) else None
        if isinstance(ident, str):
            return f" ({safe(ident[:300])}, as its frames say)"
    return ""


def cmd_export(args: argparse.Namespace) -> int:
    """Write matching records; damaged segments are reported on stderr (exit 1)."""
    opened = _reader_args(args)
    if opened is None:
        return 2
    filters, decryptor = opened
    damaged: list[str] = []
    malformed = _MalformedReport()
    out: IO[str]
    close = False
    if args.output:
        try:
            out = open(args.output, "w", encoding="utf-8", newline="")
        except OSError as exc:
            print(f"error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        close = True
    else:
        out = sys.stdout
    progress = Progress("exporting")
    try:
        # A segment that does not continue the one before (one missing): said, exit 1, read
        # on; HMAC links not checked: a note (``TrailOrder``).
        stored = iter_stored(args.path, filters, on_damage=damaged.append, decryptor=decryptor,
                             on_malformed=malformed, on_gap=malformed.gap,
                             on_note=malformed.note)
        if args.format == "csv":
            writer = csv.writer(out)
            writer.writerow(("seq", *FIELD_NAMES))
            for n, s in enumerate(stored, 1):
                progress.update(n, "records")
                row = s.record.as_dict()
                if row["extra"] is not None:
                    row["extra"] = _json_line(row["extra"])
                writer.writerow((s.seq, *("" if row[n] is None else csv_cell(row[n])
                                          for n in FIELD_NAMES)))
        else:
            for n, s in enumerate(stored, 1):
                progress.update(n, "records")
                out.write(_json_line({"seq": s.seq, **_json_value(s.record)}) + "\n")
    except BrokenPipeError:
        raise  # the reader went away (`| head`): sidecar.cli ends quietly
    except OSError as exc:
        print(f"error: {safe(exc)}", file=sys.stderr)
        return 2
    finally:
        progress.close()
        if close:
            out.close()
    for d in damaged:
        print(f"warning: stopped reading a damaged or undecryptable segment: {safe(d)}",
              file=sys.stderr)
    return 1 if damaged or malformed.count else 0


class _MalformedReport:
    """Says on stderr, one line each, which malformed records were skipped (export, tail)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, what: str) -> None:
        self.count += 1
        print(f"error: skipped {safe(what)}", file=sys.stderr, flush=True)

    def gap(self, what: str) -> None:
        """A segment that does not continue the one before it (``TrailOrder``): an error,
        read on."""
        self.count += 1
        print(f"error: {safe(what)}", file=sys.stderr, flush=True)

    @staticmethod
    def note(what: str) -> None:
        """Something the reader could not check (HMAC links without the key)."""
        print(f"note: {safe(what)}", file=sys.stderr, flush=True)

    def unreadable(self, segment: str, exc: Exception) -> None:
        """A segment that is not a regular file, cannot be read or is damaged (tail); one
        whose records cannot be decrypted, or are not the ones their digests were made from,
        is an error (as before it was, for the whole command)."""
        self.count += 1
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        if isinstance(exc, DecryptError):
            print(f"error: stopped reading an undecryptable segment: {safe(segment)}: "
                  f"{safe(why)}", file=sys.stderr, flush=True)
            return
        print(f"warning: stopped reading a damaged or unreadable segment: {safe(segment)}: "
              f"{safe(why)}",
              file=sys.stderr, flush=True)


def _print_record(seq: int, rec: AuditRecord, out: IO[str]) -> None:
    # For people: the time as RFC 3339 (UTC, milliseconds), the form --since accepts.
    # `audit export` keeps unix seconds for programs.
    doc = {"seq": seq, **_json_value(rec)}
    if isinstance(doc.get("time"), int | float):
        doc["time"] = rfc3339(float(doc["time"]))
    out.write(_json_line(doc) + "\n")
    out.flush()


def _frames_from(fh: IO[bytes], limit: int | None,
                 whole: bool = False) -> Iterator[tuple[int, bytes]]:
    """(end offset, payload) of whole frames from the file position, up to ``limit``; stops
    quietly at a frame not (yet) complete: the writer may be appending to it -- unless
    ``whole`` (a segment older than the newest, which no writer appends to): then a frame
    cut short is damage (``SegmentDamage``), as ``export`` reports it."""
    offset = fh.tell()
    while limit is None or offset < limit:
        head = fh.read(4)
        if len(head) < 4:
            if whole and head:
                raise SegmentDamage("segment ends inside a frame length (truncated)", offset)
            return
        (length,) = LENGTH.unpack(head)
        if length == 0 or length > MAX_FRAME_BYTES:
            # A whole length prefix is always the writer's: this is damage, not a frame
            # still being written.
            raise SegmentDamage(f"impossible frame length {length} (corrupt)", offset)
        payload = fh.read(length)
        if len(payload) < length:
            if whole or not _may_be_written(payload):
                raise SegmentDamage("segment ends inside a frame (truncated)", offset)
            return
        offset += 4 + length
        yield offset, payload


def _may_be_written(partial: bytes) -> bool:
    """Could ``partial`` -- the bytes after a frame's length, fewer than it says -- be the
    start of a payload the writer is still writing? Each payload is exactly one msgpack map
    of the length before it, and the writer appends whole batches of frames, so only the
    last frame can be cut, and its bytes are a strict prefix of one msgpack value. Bytes
    that already hold a whole value (the frame's own payload, and the frames after it,
    under a length edited to run past the end: found by a hostile review, ``tail`` then
    hid every record after it and exited 0) or that no msgpack value starts with are no
    frame being written: damage, as ``export`` reports it. (Parsed in C, only at a frame
    cut short: at most ``MAX_FRAME_BYTES``.)"""
    if not partial:
        return True
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False,
                                max_buffer_size=MAX_FRAME_BYTES)
    unpacker.feed(partial)
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        return True  # (a strict prefix: the rest may still come)
    except Exception:  # noqa: BLE001 -- msgpack raises several unrelated types on garbage
        return False
    return False  # a whole value, shorter than the length says


class _Follower:
    """Reads frames appended to the newest segment; moves on when a newer one appears; stops
    (``_Fork``) when the trail forks: a segment before it grows, two segments continue the
    same seq, or a new segment sorts before it."""

    def __init__(self, path: str, filters: RecordFilter, decryptor: Decryptor | None,
                 malformed: _MalformedReport) -> None:
        self.path = path
        self.damaged: SegmentFile | None = None  # reported once; not read again
        self.filters = filters
        self.decryptor = decryptor
        self.malformed = malformed
        self.single = not os.path.isdir(path)
        self.current: SegmentFile | None = None
        self.header: dict[str, Any] | None = None
        self.opener = RecordOpener(decryptor, check=True)
        # The chain across segments (seq and links), shared with the backlog's reading of
        # the older segments (``cmd_tail``).
        self.trail = TrailOrder(malformed.gap, malformed.note)
        self.order = self.trail.segment()
        self.offset = 0
        # ``start_at_end`` found the newest segment ending inside a frame that may still be
        # being written, at ``offset`` (after ``settle``: one no writer finished).
        self.cut = False
        # The header seq of ``current`` (None: none read), and the segments moved on from,
        # each with its size when left (``_check_left``).
        self.start: int | None = None
        self.left: deque[tuple[SegmentFile, int]] = deque(maxlen=WATCHED_LEFT)
        self.known: set[str] | None = None  # the segment names listed last

    def start_at_end(self) -> None:
        segments = resolve_segments(self.path)
        self.known = {s.name for s in segments}
        if segments:
            # The older segments are watched too: a segment planted as the newest before
            # tail started, continuing the writer's, is followed while the writer goes on.
            for seg in segments[:-1][-WATCHED_LEFT:]:
                self._watch(seg)
            self._switch(segments[-1])
            self.offset, self.cut = _whole_frames_end(segments[-1])

    def _watch(self, seg: SegmentFile) -> None:
        try:
            self.left.append((seg, os.stat(seg.path, follow_symlinks=seg.follow).st_size))
        except OSError:
            pass  # (gone: nothing to watch)

    def settle(self) -> bool:
        """``tail`` without ``--follow``, the newest segment ending inside a frame
        (``cut``): look again every ``SETTLE_POLL`` for up to ``SETTLE_SECONDS``. Finished
        meanwhile (the segment's whole frames now end past where it starts), or gone (a
        writer's failed write truncated back to a frame boundary): read on, ``cut`` False
        -- a frame begun since is one being written. Still unfinished: True (``cut``
        stays), and the backlog reads the segment as a whole one, which reports the frame
        as ``export`` does (``segment ends inside a frame (truncated)``, exit 1). Before,
        found by a hostile review, a length edited to run past the end hid every record
        after it while tail said nothing and exited 0 (``_may_be_written`` catches that
        shape at once; this, whatever the bytes)."""
        if not self.cut or self.current is None:
            return False
        started = self.offset
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(SETTLE_POLL)
            end, cut = _whole_frames_end(self.current)
            if end > started or not cut:
                self.offset, self.cut = end, False
                return False
        return True

    def _switch(self, seg: SegmentFile) -> None:
        found = segment_header_frame(seg)
        start = found[0] if found is not None else None
        left = self.current
        if left is not None:
            self._forks_at(left, seg, start)
            self._watch(left)
        self.current, self.offset, self.start = seg, 0, start
        self.header = found[1] if found is not None else None
        # Each encrypted record checked against its digest, the segment's structure as
        # verify checks it without a key, as ``export`` does (``iter_stored``).
        self.opener = RecordOpener(self.decryptor, check=True)
        self.order = self.trail.segment(seg.name)

    def _forks_at(self, left: SegmentFile, seg: SegmentFile, start: int | None) -> None:
        """Moving from ``left`` to ``seg``, whose header has seq ``start``: a header at or
        after ``left``'s own and at or before the last frame read continues a seq that
        ``left`` (or a segment it continued) continues already -- two segments continue
        the same seq, a fork. (One whose header is older than ``left``'s is an old segment
        copied in: ``SegmentOrder`` refuses it as damage.)"""
        last = self.trail.last
        if start is None or self.start is None or last is None:
            return
        if self.start <= start <= last:
            raise _Fork(f"{seg.name} starts at seq {start}, which {left.name} continues "
                        "too: two segments continue the same seq")

    def _check_left(self) -> None:
        """A segment before the one followed (moved on from, or older at the start) that
        grew since: the writer is still writing there, and the segment followed continues
        the trail beside it (planted under a newer name: its header links to the writer's
        last frame by SHA-256, which needs no key). A writer rotates, or restarts, only
        after its last write to a segment. Before the thirty-third session tail never looked
        at a segment it had left: it showed the planted one and hid the writer's records,
        without a word (found by a hostile review)."""
        for seg, size in list(self.left):
            try:
                now = os.stat(seg.path, follow_symlinks=seg.follow).st_size
            except OSError:
                self.left.remove((seg, size))  # (deleted: retention)
                continue
            if now > size:
                here = self.current.name if self.current is not None else "a newer segment"
                raise _Fork(f"{seg.name} grew while tail followed {here}: two "
                            "segments continue the trail")

    def _appeared(self, listed: list[SegmentFile]) -> None:
        """A segment that appeared since the last listing and sorts before the one
        followed is one tail would never read: the writer's next segment, while tail follows
        a segment planted under a larger seq (file names are not covered by any digest)."""
        names = {s.name for s in listed}
        current, known = self.current, self.known
        self.known = names
        if current is None or known is None or self.single:
            return
        for seg in listed:
            if seg < current and seg.name not in known:
                raise _Fork(f"{seg.name} appeared before {current.name}, the segment "
                            "followed: two segments continue the trail")

    def poll(self) -> Iterator[tuple[int, AuditRecord]]:
        while True:
            self._check_left()
            if self.current is not None:
                yield from self._read_new()
            if self.single:
                yield from self.trail.release()  # (following: the newest shown as it comes)
                return
            listed = resolve_segments(self.path)
            self._appeared(listed)
            newer = [s for s in listed if self.current is None or s > self.current]
            if not newer:
                yield from self.trail.release()
                return
            if self.current is not None:
                # A writer creates the next segment only after its last write to this one:
                # read what it wrote since, then anything left is a frame cut short.
                yield from self._read_new()
                self._left_whole()
            # Finish the old segment first (done above), then move to the next one.
            self._switch(newer[0])

    def _left_whole(self) -> None:
        """The segment being left for a newer one is no longer written to: bytes after its
        last whole frame are a frame cut short (a crash, or frames cut by hand), which
        ``export`` reports too; a tail that moved on without a word hid them."""
        assert self.current is not None
        if self.damaged == self.current or self.order.stopped:
            return  # (said once already, by the follower or the backlog)
        try:
            size = os.stat(self.current.path, follow_symlinks=self.current.follow).st_size
        except OSError:
            return
        if size > self.offset:
            self.damaged = self.current
            self.malformed.unreadable(self.current.name, SegmentDamage(
                "segment ends inside a frame (truncated)", self.offset))

    def _read_new(self) -> Iterator[tuple[int, AuditRecord]]:
        assert self.current is not None
        if self.damaged == self.current or self.order.stopped:
            return  # (stopped: the backlog found it broken and said so)
        try:
            with open_segment(self.current) as fh:
                fh.seek(self.offset)
                for end, payload in _frames_from(fh, None):
                    start, self.offset = self.offset, end
                    if self.header is None:
                        self.header = segment_header(self.current)
                    yield from _matching(payload, self.header, self.filters, self.opener,
                                         self.current.name, self.malformed, self.order,
                                         start)
        except (OSError, SegmentDamage, DecryptError) as exc:
            self.damaged = self.current
            self.order.stop()
            self.malformed.unreadable(self.current.name, exc)


def _whole_frames_end(seg: SegmentFile) -> tuple[int, bool]:
    """Where the segment's last whole frame ends (its lengths walked, nothing decoded):
    where following it starts; and whether the segment ends inside a frame that may still
    be being written there. Its size instead started in the middle of a frame the writer
    was writing (the next read took payload bytes for a length), and counted as read a frame
    cut short by a crash, so a tail that moved on from it had nothing left to report.

    A frame still being written has a plausible length and fewer bytes than it says, which
    are the start of one payload (``_may_be_written``): it is not read yet (``tail``
    without ``-f`` waits a moment for it: ``_Follower.settle``). A length of 0 or over
    ``MAX_FRAME_BYTES`` is never the writer's, however many bytes follow, nor one whose
    bytes already hold a whole payload or no payload's start: damage. The end returned is
    then just past that length, so that the backlog (which reads up to here) reaches it and
    reports it as ``export`` does, exit 1. Stopping *at* it, the backlog never read it:
    ``tail`` without ``-f`` said nothing and exited 0 on such damage in the newest segment
    (found by a hostile review; a length edited to run past the end, by the review of that
    fix)."""
    try:
        with open_segment(seg) as fh:
            size = os.fstat(fh.fileno()).st_size
            offset = 0
            while offset + 4 <= size:
                (length,) = LENGTH.unpack(fh.read(4))
                if length == 0 or length > MAX_FRAME_BYTES:
                    return offset + 4, False  # damage: the backlog's reader raises
                if offset + 4 + length > size:
                    if not _may_be_written(fh.read(size - offset - 4)):
                        return offset + 4, False  # (damage, as above)
                    return offset, True  # a frame not yet whole: read when it is
                offset += 4 + length
                fh.seek(offset)
            return offset, offset < size
    except OSError:
        return 0, False


def _matching(payload: bytes, header: dict[str, Any] | None, filters: RecordFilter,
              opener: RecordOpener, segment: str, malformed: _MalformedReport,
              order: SegmentOrder, offset: int) -> Iterator[tuple[int, AuditRecord]]:
    """The matching records ``payload`` makes readable; ``SegmentDamage`` for a frame that
    breaks the segment's structure (``order``), ``DecryptError`` for encrypted records that
    cannot be read or are not the ones their digests were made from: the segment is read no
    further (the caller says so)."""
    try:
        seq, prev, kind, body = decode_frame(payload)
    except (ValueError, ChainError) as exc:
        # Damage or forgery, as ``export`` takes it: nothing after it in the segment is
        # read (no link can be checked past it) nor what the frame before made readable.
        dropped = order.undecoded()
        raise SegmentDamage(f"a frame that does not decode: {exc} (verify: broken; the "
                            f"frames from here are not read){dropped}", offset) from None
    try:
        order.check(seq, kind, offset, prev, body, payload)
    except UnlinkedFrame:
        order.trail.held.clear()  # the frame before was edited: its records not shown
        raise
    # A frame's records are given once the next frame links to it (``TrailOrder``).
    yield from order.trail.release()
    for at, rec in opener.records(seq, prev, kind, body, header):
        if isinstance(rec, MalformedRecord):
            malformed(f"{segment}: {rec}")
        elif filters.matches(rec):
            order.trail.held.append((at, rec))


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the newest N records; with --follow keep polling until Ctrl-C (exit 0)."""
    opened = _reader_args(args)
    if opened is None:
        return 2
    filters, decryptor = opened
    count = max(0, min(int(args.lines), MAX_TAIL_LINES))
    interval = min(max(float(args.interval), MIN_POLL), MAX_POLL)
    out = sys.stdout
    malformed = _MalformedReport()
    try:
        follower = _Follower(args.path, filters, decryptor, malformed)
        # Remember where the files end *before* reading, so no record is printed twice
        # or skipped between the backlog and following.
        follower.start_at_end()
        # Without --follow, a frame the newest segment ends inside is waited for: finished,
        # it is read; not, it is damage (``unfinished``). With it, it is read when it is.
        unfinished = not args.follow and follower.settle()
        end_segment, end_offset = follower.current, follower.offset
        last: deque[tuple[int, AuditRecord]] = deque(maxlen=count or 1)
        segments = resolve_segments(args.path)
        cuts = declared_cuts(segments)
        for seg in segments:
            if end_segment is not None and seg > end_segment:
                break
            if not count and seg != end_segment:
                continue  # -n 0: only the newest segment, for its structure (below)
            # (a frame no writer finished, ``settle``: read to the end, as a whole segment)
            newest_whole = seg == end_segment and unfinished
            limit = end_offset if seg == end_segment and not newest_whole else None
            # The newest segment's reader goes on where the backlog stops (a group of
            # encrypted records is read whole, whichever of the two reads its end), and
            # so does its structure check (with -n 0 too: a frame appended after its seal
            # is refused when it is followed).
            if seg == end_segment:
                opener, order = follower.opener, follower.order
            else:
                # (the chain across segments: ``follower.trail``, which goes on following)
                opener = RecordOpener(decryptor, check=True)
                order = follower.trail.segment(seg.name)
            cut = ChainCut(cuts.get(seg.name))
            last.extend(_read_segment(seg, filters, limit, opener, malformed,
                                      whole=seg != end_segment or newest_whole, cut=cut,
                                      order=order))
        last.extend(follower.trail.release())  # the newest frame's (nothing follows yet)
        if count:
            for seq, rec in last:
                _print_record(seq, rec, out)
        if not args.follow:
            return 1 if malformed.count else 0
        while True:
            for seq, rec in follower.poll():
                _print_record(seq, rec, out)
            time.sleep(interval)
    except KeyboardInterrupt:
        return 1 if malformed.count else 0
    except _Fork as exc:
        print(f"error: the trail forks: {safe(exc)} (a segment planted under a newer name, "
              "or two writers on one directory; verify: broken); tail cannot tell which is "
              "the writer's and stops", file=sys.stderr, flush=True)
        return 1
    except DecryptError as exc:
        print(f"error: {safe(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # the reader went away (`| head`): sidecar.cli ends quietly
    except OSError as exc:
        print(f"error: {safe(exc)}", file=sys.stderr)
        return 2


def _read_segment(seg: SegmentFile, filters: RecordFilter, limit: int | None,
                  opener: RecordOpener, malformed: _MalformedReport, whole: bool = False,
                  cut: ChainCut | None = None, order: SegmentOrder | None = None
                  ) -> Iterator[tuple[int, AuditRecord]]:
    """The matching records of ``seg``; with ``cut``, none from the first frame that is
    not the chain's after a declared break (``ChainCut``: by position) on; none from a
    frame that breaks the segment's structure (``order``) or a group of encrypted records
    that cannot be read or was encrypted again (``RecordOpener``), which are said as a
    damaged segment is."""
    header = segment_header(seg)
    order = order if order is not None else SegmentOrder()
    try:
        with open_segment(seg) as fh:
            start = fh.tell()
            for end, payload in _frames_from(fh, limit, whole):
                offset, start = start, end
                if cut is not None and cut.last is not None:
                    try:
                        seq = decode_frame(payload)[0]
                    except FrameError:
                        seq = -1  # (out of sequence: it leaves; _matching would say why)
                    if cut.leaves(seq):
                        malformed(cut.message(seg.name))
                        return
                yield from _matching(payload, header, filters, opener, seg.name, malformed,
                                     order, offset)
    except (OSError, SegmentDamage, DecryptError) as exc:
        order.stop()  # the newest segment's follower does not read on either
        malformed.unreadable(seg.name, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m sidecar.audit.cli keygen|verify|collect|export|tail``."""
    parser = argparse.ArgumentParser(prog="sidecar audit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_audit_parsers(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
