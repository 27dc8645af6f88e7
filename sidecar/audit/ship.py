"""Shipping the audit trail to a collector: RFC 5424 syslog over TLS (RFC 5425).

Theory of operation
-------------------
Every frame the writer puts on disk (segment header, record, checkpoint, seal) becomes one
syslog message, built in the writer's worker thread right after the frame is on disk
(``frame_message``, pure)::

    <110>1 TIMESTAMP HOST APP PROCID KIND [sidecar@32473 seq="N" digest="HEX"] JSON

facility 13 (log audit), severity 6; ``KIND`` (MSGID) is ``audit`` for records,
``checkpoint`` for checkpoints and seals, ``segment`` for headers. The JSON holds the seq,
kind, digest, the record (its stored map: the short keys of docs/audit.md) or the signed
checkpoint, and ``frame``: the
frame's stored bytes in base64, so that ``sidecar audit collect`` can rebuild segment
files from what the collector wrote and ``verify`` can check the chain and signatures
there, independent of the pod. A record stored as JSON (format 2, ``chain.py``; what a
shipping writer stores) is shipped with its frame's ``prev`` instead of ``frame``, its JSON
last and exactly as stored: ``collect`` makes the frame again from them
(``_json_record_frame``), in the clear also for an encrypted trail. There the message's
digest is the record's link: in format 3 (``chain.sealed_link``) a digest over its seq,
``prev`` and the digest of that plaintext frame, which ``collect`` computes again
(``Collector.check``) and ``verify`` does too (the rebuilt ``rec`` frame in a segment whose
header declares encryption links as its ``erc`` frame on disk does).

``Shipper`` (``sidecar.audit.shipper``) is the Trio side that sends the messages: its
bounded queue, the TLS connection to the collector, reconnects and resends. This module
is pure (no Trio, no sockets): ``sidecar audit`` reads and rebuilds trails without them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from sidecar import atomic_re
from sidecar.audit.chain import (
    MAX_FRAME_BYTES,
    MAX_RECORD_JSON_DEPTH,
    FrameError,
    json_record_frame,
    parse_record_json,
)
from sidecar.audit.record import SharedExtra, row_wire
from sidecar.jsondoc import deeper_than, read_json

SD_ID = "sidecar@32473"  # 32473: the documentation enterprise number of RFC 5612
PRI = b"<110>"  # facility 13 (log audit) * 8 + severity 6 (informational)
MSGIDS = {"seg": "segment", "rec": "audit", "erc": "audit", "chk": "checkpoint",
          "end": "checkpoint"}


_MSGIDS = {kind: msgid.encode() for kind, msgid in MSGIDS.items()}
_KINDB = {kind: kind.encode() for kind in MSGIDS}
_FIELD = {"seg": b"header", "rec": b"record", "erc": b"record", "chk": b"checkpoint",
          "end": b"checkpoint"}
# One bytes-format per message (a C call); the values are arguments, never part of the
# format, so a '%' in a host name or a record cannot change it.
_MESSAGE = (b'%b%b [' + SD_ID.encode() + b' seq="%d" digest="%b" kind="%b"] '
            b'{"seq":%d,"kind":"%b","digest":"%b","%b":%b,"frame":"%b"}')
# Format 2: a record stored as JSON is shipped with its frame's ``prev`` instead of the
# frame, and its JSON last, exactly as stored (``collect`` makes the frame again from them).
_MESSAGE_JSON = (b'%b%b [' + SD_ID.encode() + b' seq="%d" digest="%b" kind="%b"] '
                 b'{"seq":%d,"kind":"%b","digest":"%b","prev":"%b","record":%b}')
_RECORD_KINDS = ("rec", "erc")


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return repr(value)


def _make_encode() -> Callable[[Any], str]:
    # json.dumps builds a new C encoder object on every call (a few us of Python); build
    # it once. No circular check: the values are plain records. Same output as dumps.
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:
        return json.JSONEncoder(separators=(",", ":"), check_circular=False,
                                default=_json_default).encode
    encoder = c_make_encoder(None, _json_default, json.encoder.encode_basestring_ascii, None,
                             ":", ",", False, False, True)
    return lambda obj: "".join(encoder(obj, 0))


_encode = _make_encode()


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def _make_strict_encode() -> Callable[[Any], str]:
    # ``_encode`` for what is stored (format 2): nothing but what JSON holds as it is --
    # TypeError for bytes and other types, ValueError for NaN and the infinities.
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:
        return json.JSONEncoder(separators=(",", ":"), check_circular=False,
                                allow_nan=False, default=_refuse).encode
    encoder = c_make_encoder(None, _refuse, json.encoder.encode_basestring_ascii, None,
                             ":", ",", False, False, False)
    return lambda obj: "".join(encoder(obj, 0))


_encode_strict = _make_strict_encode()


def _encode_nested(value: Any) -> str:
    """``_encode_strict`` of a record, or of a list or map in one: ValueError when it nests
    deeper than a reader takes (``MAX_RECORD_JSON_DEPTH``, with the record and ``x``)."""
    if value.__class__ in (dict, list, tuple) and deeper_than(value, MAX_RECORD_JSON_DEPTH - 2):
        raise ValueError("nested too deep to be stored as JSON")
    return _encode_strict(value)

# -- record JSON by shape
#
# The C encoder above costs about as much per record as the rest of the message: it makes
# one small string per key, value and separator and joins them. Records of one kind have
# the same keys in the same order, so for each key order seen (a *shape*) a function is
# generated once that checks each value's type and fills ONE f-string:
# ``f'{{"t":{repr(t)},"ev":{escape(ev)},...}}'``. Slots are typed from the first
# record of the shape: a float slot takes only finite floats (their repr is what JSON
# writes), an int slot only ints (not bools), a str slot only strings (the C escape
# function refuses anything else; values that repeat are looked up, see ``_known``), any
# other value (extras, bools) goes through the C
# encoder for that value alone. A record that does not fit its shape's types falls back
# to the whole C encoder, so the text is always exactly ``_encode(record)``
# (tests/test_audit_ship.py compares them over odd values). Shapes are bounded.
MAX_SHAPES = 64
_shapes: dict[tuple[Any, ...], Any] = {}
_UNSEEN = object()
_escape = json.encoder.encode_basestring_ascii
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+")


# Escaping a string costs more than looking it up: the values of these keys repeat from
# record to record (who, where, what was decided), so their JSON forms are remembered, at
# most MAX_KNOWN of them (then forgotten all at once and learnt again). Where such keys
# follow each other in a shape (dir, peer; m, host; d, rule, why, pv), the whole run --
# keys, values, commas -- is remembered per tuple of values (``_runs``): one lookup instead
# of one per value, 26,700 -> 22,900 instructions per request record. A token's ``jti``
# hash repeats with its ``iss`` and ``sub`` (every request of one cached token), so it
# joins their run. ``src`` (per
# connection: the client's port) is looked up alone, so that a new connection does not
# make the runs around it new.
_REPEATING = frozenset(("ev", "dir", "peer", "src", "m", "host", "d", "rule", "why", "pv",
                        "iss", "sub", "jti", "key"))
MAX_KNOWN = 4096
_known: dict[str, str] = {}


def _learn(value: str) -> str:
    text = _escape(value)  # TypeError for anything but a string: the caller falls back
    if len(_known) >= MAX_KNOWN:
        _known.clear()
    _known[value] = text
    return text


# A run of consecutive repeating keys of a shape, as a tag (index into ``_run_keys``)
# followed by its values -> the run's JSON (keys and values, no outer comma). Bounded like
# ``_known``; tags are never reused (at most MAX_SHAPES shapes, a few runs each).
_runs: dict[tuple[Any, ...], str] = {}
_PER_CONNECTION = frozenset(("src",))
_run_keys: list[tuple[str, ...]] = []


def _learn_run(tagged: tuple[Any, ...]) -> str:
    keys = _run_keys[tagged[0]]
    # _escape: TypeError for anything but a string (the caller falls back)
    text = ",".join(f'"{k}":{_escape(v)}' for k, v in zip(keys, tagged[1:], strict=True))
    if len(_runs) >= MAX_KNOWN:
        _runs.clear()
    _runs[tagged] = text
    return text


def _repeating_run(items: list[tuple[Any, Any]], start: int) -> list[str]:
    """The keys of the run of string values of ``_REPEATING`` keys from ``start`` on."""
    run = []
    for key, value in items[start:]:
        if type(value) is not str or key not in _REPEATING or key in _PER_CONNECTION:
            break
        run.append(key)
    return run


def _shared_json(extra: SharedExtra) -> str:
    """The JSON of a read-only shared extra, encoded at its first record and kept on it
    (strictly: an extra JSON cannot hold as it is raises, and its records fall back)."""
    if deeper_than(extra, MAX_RECORD_JSON_DEPTH - 2):
        raise ValueError("nested too deep to be stored as JSON")
    text = extra.json = _encode_strict(extra)
    return text


def record_json(wire: dict[str, Any]) -> str:
    """``_encode(wire)``, faster for records of a shape seen before (see above)."""
    keys = tuple(wire)
    fill: Callable[..., str | None] | None = _shapes.get(keys, _UNSEEN)
    if fill is _UNSEEN:
        fill = None  # past MAX_SHAPES, a new shape takes the C encoder
        if len(_shapes) < MAX_SHAPES:
            fill = _shapes[keys] = _shape_function(wire)
    if fill is not None:
        try:
            text = fill(*wire.values())
        except (TypeError, ValueError, RecursionError):  # a value JSON cannot hold as it is
            text = None
        if text is not None:
            return text
    return _encode(wire)


def record_text(wire: dict[str, Any]) -> bytes | None:
    """The record's JSON as stored in format 2 (``record_json``'s text), or None when JSON
    cannot hold the record as it is: bytes or another type JSON lacks, a number that is not
    finite, nesting past ``MAX_RECORD_JSON_DEPTH``, a lone surrogate (the writer then stores
    that record as msgpack, as format 1 does). Read back, the text gives ``wire`` again."""
    keys = tuple(wire)
    fill = _shapes.get(keys, _UNSEEN)
    if fill is _UNSEEN:
        fill = None
        if len(_shapes) < MAX_SHAPES:
            fill = _shapes[keys] = _shape_function(wire)
    text = None
    if fill is not None:
        try:
            text = fill(*wire.values())
        except (TypeError, ValueError, RecursionError):
            pass  # a value of another type than its shape's slot: the encoder's turn
    return _stored_text(text, wire)


def row_text(row: tuple[Any, ...]) -> bytes | None:
    """``record_text`` of a row (``record.request_row``: ``(shape, value, ...)``, the data
    path's usual records): the filler is the shape's own, called with the row as it is --
    no tuple of keys made and looked up, no values unpacked from a map (0.7 us a record)."""
    shape = row[0]
    fill = shape.fill
    if fill is None:
        fill = shape.fill = _shape_function(row_wire(row), lead=True)
    text = None
    if fill is not None:
        try:
            text = fill(*row)
        except (TypeError, ValueError, RecursionError):
            pass  # a value of another type than its shape's slot: the encoder's turn
    return _stored_text(text, row)


def _stored_text(text: str | None, record: Any) -> bytes | None:
    """``record_text``'s end: the filler's ``text`` (None: the whole encoder's, if JSON can
    hold ``record``, a map or a row) as UTF-8, refused when it holds a lone surrogate."""
    if text is None:
        try:
            text = _encode_nested(row_wire(record) if record.__class__ is tuple else record)
        except (TypeError, ValueError, RecursionError):
            return None
    data = text.encode()
    if b"\\" in data and b"\\ud" in data:  # a surrogate escape: a pair, or a lone one
        try:
            parse_record_json(text)
        except FrameError:
            return None
    return data


def _shape_function(wire: dict[str, Any],
                    lead: bool = False) -> Callable[..., str | None] | None:
    """The generated filler for ``wire``'s shape, or None (a key other than letters, digits
    and '_': only such keys are written into the generated f-string). ``lead``: it takes
    a first argument that it ignores (a row's shape, ``row_text``)."""
    if not all(type(k) is str and _PLAIN_KEY.fullmatch(k) for k in wire):
        return None
    parts, learning, checks = [], [], []
    items = list(wire.items())
    i = 0
    while i < len(items):
        key, value = items[i]
        name = f"v{i}"
        kind = type(value)
        run = _repeating_run(items, i)
        if len(run) > 1:
            # Consecutive repeating values (dir, peer, src, m, host; d, rule, why, pv):
            # one fragment per value tuple, keys included, instead of one per value.
            tag = len(_run_keys)
            _run_keys.append(tuple(run))
            values = ", ".join(f"v{j}" for j in range(i, i + len(run)))
            parts.append(f"{{_runs[({tag}, {values})]}}")
            learning.append(f"{{_runs.get(({tag}, {values})) or _learn_run(({tag}, {values}))}}")
            i += len(run)
            continue
        if kind is float:
            checks.append(f"{name}.__class__ is not float or not -_inf < {name} < _inf")
            text = f"_repr({name})"
        elif kind is int:
            checks.append(f"{name}.__class__ is not int")
            text = f"_int({name})"
        elif kind is str and key in _REPEATING:
            text = f"_known[{name}]"
        elif kind is str:
            text = f"_escape({name})"
        else:
            # A shared extra (one per connection) carries its JSON, encoded once.
            text = (f"({name}.json or _shared_json({name})) if {name}.__class__ is _Shared"
                    f" else _encode_nested({name})")
        parts.append(f'"{key}":{{{text}}}')
        learning.append(parts[-1].replace(f"_known[{name}]", f"_known.get({name}) or _learn({name})"))
        i += 1
    names = ", ".join(["_row"] * lead + [f"v{i}" for i in range(len(wire))])
    source = f"def fill({names}):\n"
    if checks:
        source += f"    if {' or '.join(checks)}:\n        return None\n"
    # Known values by subscript (a quarter of a ``get`` call); a value not known yet (or
    # not a string: KeyError, never learnt) takes the second f-string, which learns it.
    source += "    try:\n        return f'{{" + ",".join(parts) + "}}'\n"
    source += "    except KeyError:\n        pass\n"
    source += "    return f'{{" + ",".join(learning) + "}}'\n"
    namespace: dict[str, Any] = {
        "_repr": float.__repr__, "_int": int.__repr__, "_inf": math.inf, "_escape": _escape,
        "_encode_nested": _encode_nested, "_known": _known, "_learn": _learn, "_runs": _runs,
        "_learn_run": _learn_run, "_Shared": SharedExtra, "_shared_json": _shared_json}
    exec(source, namespace)  # noqa: S102 -- our own code from plain keys, see above
    return namespace["fill"]  # type: ignore[no-any-return]


def message_prefix(now: float, host: str, app: str) -> bytes:
    """``<PRI>1 TIMESTAMP HOST APP PROCID `` (one per batch: the frames of a batch share it)."""
    second = int(now)
    if second != _stamp[0]:
        # The date and time to the second change once a second, not once a batch: they
        # are remembered (gmtime and strftime cost more than the rest of the prefix).
        _stamp[0], _stamp[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return PRI + f"1 {_stamp[1]}.{int(now % 1 * 1000):03d}Z {host} {app} {os.getpid()} ".encode()


_stamp: list[Any] = [None, ""]  # (Unix second, its RFC 3339 date and time) of the last prefix


def frame_message(prefix: bytes, seq: int, kind: str, digest: bytes, frame: bytes,
                  detail: Any) -> bytes:
    """One octet-counted RFC 5424 message for one stored frame (pure).

    ``detail``: the record's stored map (short keys, docs/audit.md), the checkpoint JSON
    (as ``/audit/head``) or the header body. One format call: this runs per record."""
    hexd = binascii.hexlify(digest)
    kindb = _KINDB.get(kind) or kind.encode()
    text = record_json(detail) if kind in _RECORD_KINDS else _encode(detail)
    msg = _MESSAGE % (prefix, _MSGIDS.get(kind, b"audit"), seq, hexd, kindb, seq, kindb, hexd,
                      _FIELD.get(kind, b"detail"), text.encode(),
                      binascii.b2a_base64(frame, newline=False))
    return b"%d %b" % (len(msg), msg)


def frame_messages(prefix: bytes, frames: Iterable[tuple[int, str, bytes, bytes, Any]],
                   detail_of: Callable[[int, str, bytes, Any], Any]) -> list[bytes]:
    """``frame_message`` for each ``(seq, kind, frame, digest, detail)`` of a batch, in order
    (pure). Records -- all but a few frames of a batch -- are built here without a call per
    message (the JSON by its shape's filler, then one format); other frames go through
    ``frame_message`` with ``detail_of(seq, kind, frame, detail)``. Same bytes either way
    (tests/test_audit_ship.py compares them)."""
    out: list[bytes] = []
    append = out.append
    shapes, hexlify, b64 = _shapes, binascii.hexlify, binascii.b2a_base64
    msgid, field, kinds, message = _MSGIDS["rec"], _FIELD["rec"], _KINDB, _MESSAGE
    last, last_hex = None, b""  # the previous record's digest, which is the next's prev
    for seq, kind, frame, digest, detail in frames:
        if detail.__class__ is tuple:  # (prev, JSON text): stored as JSON (format 2)
            prev, text = detail
            hexd = hexlify(digest)
            msg = _MESSAGE_JSON % (prefix, msgid, seq, hexd, kinds[kind], seq, kinds[kind],
                                   hexd, last_hex if prev is last else hexlify(prev), text)
            append(b"%d %b" % (len(msg), msg))
            last, last_hex = digest, hexd
            continue
        if kind not in _RECORD_KINDS:
            append(frame_message(prefix, seq, kind, digest, frame,
                                 detail_of(seq, kind, frame, detail)))
            continue
        fill = shapes.get(tuple(detail))
        text = None
        if fill is not None:
            try:
                text = fill(*detail.values())
            except (TypeError, ValueError, RecursionError):  # record_json falls back
                pass
        if text is None:
            text = record_json(detail)
        hexd, kindb = hexlify(digest), kinds[kind]
        msg = message % (prefix, msgid, seq, hexd, kindb, seq, kindb, hexd, field,
                         text.encode(), b64(frame, newline=False))
        append(b"%d %b" % (len(msg), msg))
    return out


# A message longer than ``audit.ship.max_message_bytes`` (``split_messages``) goes as parts,
# each a message of its own: MSGID ``audit-part``, the whole message's seq, digest and kind
# in the structured data with the part's number and how many there are, and the JSON
# ``{"part":I,"parts":N,"seq":S,"digest":"HEX","data":"B64"}``, ``data`` a slice of the whole
# octets of the message (its header too) in base64. ``collect`` joins the parts of a message
# and reads it as if it had come whole (``Collector.add``).
_PART = (b'%b [' + SD_ID.encode() + b' seq="%d" digest="%b" kind="%b" part="%d" parts="%d"] '
         b'{"part":%d,"parts":%d,"seq":%d,"digest":"%b","data":"%b"}')
_PART_MSGID = b"audit-part"
_WHOLE = re.compile(rb'(\d+) (<\d+>1 \S+ \S+ \S+ \S+ )\S+ \[' + re.escape(SD_ID.encode())
                    + rb' seq="(\d+)" digest="([0-9a-f]*)" kind="(\w+)"\] ')
# The most parts ``collect`` joins for one message: a frame is at most 1 MiB (chain.py), its
# message the frame's base64 and the record's JSON, in parts of 2,048 bytes at the least.
MAX_MESSAGE_PARTS = 8192
# The bytes of parts ``collect`` holds while their messages are not whole yet, in all, each
# part counted with ``PART_OVERHEAD`` for what keeping it costs besides its data.
MAX_PENDING_PART_BYTES = 64 * 1024 * 1024
PART_OVERHEAD = 512
_DIGEST_HEX = re.compile(r"[0-9a-f]{64}")
# The whole message a message's parts join into: its structured data's seq, digest and kind.
_WHOLE_TEXT = re.compile(r'<\d+>1 \S+ \S+ \S+ \S+ \S+ \[' + re.escape(SD_ID)
                         + r' seq="(\d+)" digest="([0-9a-f]{64})" kind="(\w+)"\] ')


def split_messages(messages: list[bytes], limit: int) -> list[bytes]:
    """``messages`` (octet-counted, as ``frame_messages`` makes them) with each whose syslog
    message is longer than ``limit`` bytes replaced by its parts (``_PART``), in order, each
    at most ``limit`` bytes (pure)."""
    out: list[bytes] = []
    for message in messages:
        m = _WHOLE.match(message)
        if m is None or int(m.group(1)) <= limit:
            out.append(message)
            continue
        head = m.group(2) + _PART_MSGID
        seq, digest, kind = int(m.group(3)), m.group(4), m.group(5)
        whole = message[len(m.group(1)) + 1:]
        biggest = len(_PART % (head, seq, digest, kind, MAX_MESSAGE_PARTS, MAX_MESSAGE_PARTS,
                               MAX_MESSAGE_PARTS, MAX_MESSAGE_PARTS, seq, digest, b""))
        room = (limit - biggest) // 4 * 3  # (raw octets per part, base64 taking 4 for 3)
        count = -(-len(whole) // room)
        for i in range(count):
            data = binascii.b2a_base64(whole[i * room:(i + 1) * room], newline=False)
            msg = _PART % (head, seq, digest, kind, i + 1, count, i + 1, count, seq, digest,
                           data)
            out.append(b"%d %b" % (len(msg), msg))
    return out


def hostname() -> str:
    """RFC 5424 HOSTNAME: printable ASCII without spaces, at most 255 characters."""
    name = socket.gethostname() or "-"
    return "".join(c for c in name if 33 <= ord(c) <= 126)[:255] or "-"


# ----------------------------------------------------------- collector side: rebuild


MAX_NAME_TIME = 253402300800.0  # 10000-01-01T00:00:00Z: segment_name's stamp has 4-digit years


class CollectError(ValueError):
    """Two different frames were shipped with one seq (a forgery or a writer reusing seqs)."""


def _canonical(value: Any) -> str:
    """A JSON value as the shipper writes it (compact, ASCII, bytes in base64), read back
    and written again: equal exactly when the values are (403 is not 403.0 nor true)."""
    return _encode(json.loads(_encode(value)))


# The longest message the shipper writes: the JSON of a frame's body (at most 6 characters a
# byte: a control character in a string is ``\u00XX``; a record stored as JSON is its frame),
# the frame in base64, and the header (a 255-character host, the structured data). A message
# longer than ``audit.ship.max_message_bytes`` goes in parts no longer than that, so never
# longer than itself. A collector line is that and the collector's own fields; ``collect``
# reads none longer (rounded up to a MiB: 8 MiB), skipping them unheld (``oversized``).
# Before the thirty-fifth session it was 16 MiB, and a line just under it of
# ``{"seq":1,"a":[{},{},...]}`` made collect hold 1 GB (found by a hostile review).
_MIB = 1024 * 1024
MAX_MESSAGE_TEXT = 6 * MAX_FRAME_BYTES + 4 * -(-MAX_FRAME_BYTES // 3) + 4096
MAX_COLLECT_LINE = -(-(MAX_MESSAGE_TEXT + 64 * 1024) // _MIB) * _MIB
# What JSON a message can hold, counted before it is parsed (``_too_much_json``): every value
# of its frame's body -- a container, a member's key, each element and member value -- is at
# least a byte, and so is each character of a string. A ``{`` or ``[`` is a container or such
# a character, a ``:`` a key or one, and a ``,`` stands before a value or is one: so the
# containers and keys, and the commas and keys, are each at most the frame's bytes (a record
# stored as JSON is its frame). ``MAX_FRAME_BYTES`` of either, with a margin for the
# message's own members and a checkpoint's JSON; a part's JSON has 10. (Parsed, each
# container costs about 200 bytes: 1 GB for a 16 MiB line of ``[{},{},...]``.)
MAX_MESSAGE_JSON_ITEMS = MAX_FRAME_BYTES + 4096
MAX_PART_JSON_ITEMS = 16
# Lines refused by ``Collector`` listed by place (the rest counted). Every seq a refused
# line seems to name is noted, the whole line scanned (``_SEQ_NAMED`` is linear), at most
# MAX_REFUSED_SEQS distinct ones in all: past that ``check`` cannot tell which frames they
# name and refuses the copy. Before the thirty-fifth session only the first four in a line's
# first 4,096 characters were, and decoys or padding before the real seq got a forged line
# past (found by a hostile review).
MAX_REFUSED_LISTED = 5
MAX_REFUSED_SEQS = 1 << 20
# A seq a line seems to name: ``seq="N"`` (structured data), ``"seq":N``, ``"seq": "N"``
# (JSON's blanks around the colon and quote, any number). (An integer: ``1e400`` or ``1.5``
# names no seq.) Possessive blanks, so no backtracking: the thirty-fifth session's review
# found ``\s*"?\s*`` quadratic in a run of blanks (0.25 s of CPU per 4 KiB line).
# Since the review of that fix (35): the key in any spelling JSON allows (``s\u0065q``:
# each letter itself or its ``\u00XX`` escape) and any number with an integral value
# (``2.0``, ``2e0``, ``20E-1``: read by ``_seq_value``); before, those were skipped unnoted
# while a SIEM parsing the JSON showed seq 2. The number is atomic: no backtracking into it.
_SEQ_KEY = r"(?:s|\\u0073)(?:e|\\u0065)(?:q|\\u0071)"
# The number as a JSON parser reads it (a double: ``2.0000000000000001`` is 2, ``-0`` is 0),
# its digits plain or written ``\u003N`` inside a string (``"\u0032"``) -- both got a forged
# line past when the value was read exactly or its escapes not at all (found by the review of
# the thirty-fifth session's second fix).
_SEQ_NAMED = atomic_re.compile(_SEQ_KEY + r'\W{0,3}?\s*+[:=]\s*+"?+\s*+'
                        r'((?>-?+(?:[0-9]|\\u003[0-9])++(?:\.[0-9]*+)?'
                        r'(?:[eE][+-]?+[0-9]++)?))(?![0-9.eE])')
_ESCAPED_DIGIT = re.compile(r"\\u003([0-9])")
# A JSON member named seq in any spelling (``"seq":``, ``"s\u0065q" :``): a line without
# ``sidecar@32473`` whose JSON does not parse is one that looks like ours when it holds one.
_JSON_SEQ_MEMBER = atomic_re.compile(r'"' + _SEQ_KEY + r'"\s*+:')
# (any number of digits: ``"0000000000000000000002"`` is 2, and so is
# ``2000000000000000000000e-21``; a run capped at 20 digits missed both -- found by the
# review of the thirty-fifth session's third fix)
_DIGITS = atomic_re.compile(r"[0-9]++")
_MAX_SEQ_DIGITS = 20  # (a seq is below 2**64; more significant digits name none)


def _digits_seq(digits: str) -> int | None:
    """The seq a run of ASCII digits names (leading zeros dropped), or None past 20 digits
    (no seq is that large; and ``int`` of thousands of digits refuses)."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= _MAX_SEQ_DIGITS else None
# The JSON of a line that is not a message as the shipper writes it is parsed only to find
# the seqs it names: each object's members kept as pairs (a member named twice is noted
# twice, as a SIEM may show either), any number read, an integer past 20 digits as None.
_SEQ_SCAN = json.JSONDecoder(object_pairs_hook=lambda pairs: pairs,
                             parse_int=lambda text: int(text) if len(text) <= 20 else None)
# A ``sidecar@32473`` element in a line (RFC 5424 6.3.2: an SD-ID appears at most once).
# (what follows the SD-ID cannot be part of an SD-NAME: a blank, ``]``, ``=``, ``"``)
_SD_ELEMENT = re.compile(r"\[" + re.escape(SD_ID) + r'(?=[\s\]="]|$)')
_SD_PARAM_ESCAPED = atomic_re.compile(r' ([^\s="\]]+)="((?:[^"\\]|\\.)*+)"')
_SD_UNESCAPE = re.compile(r"\\([\\\]\"])")


def _too_much_json(text: str, limit: int) -> bool:
    """Whether ``text`` has more ``{``, ``[`` and ``:``, or more ``,`` and ``:``, than
    ``limit``: more JSON than a message of ours holds (four C counts; nothing parsed)."""
    keys = text.count(":")
    return text.count("{") + text.count("[") + keys > limit or \
        text.count(",") + keys > limit


def _seq_value(value: Any) -> int | None:
    """The seq a JSON value names: a number with an integral value, at least 0 (``2``,
    ``2.0``, ``2e0``, ``20E-1``), or a string of ASCII digits; None for anything else."""
    if value.__class__ is int:
        return value if value >= 0 else None
    if value.__class__ is float:
        return int(value) if value.is_integer() and 0 <= value < 2.0 ** 64 else None
    if value.__class__ is str and _DIGITS.fullmatch(value):
        return _digits_seq(value)
    return None


def _seq_text(text: str) -> int | None:
    """``_seq_value`` of a number as ``_SEQ_NAMED`` found it (digits plain or escaped, a
    sign, a fraction, an exponent), read as a JSON parser reads it, a double: ``20E-1`` and
    ``2.0000000000000001`` are 2, ``-0`` is 0, ``2.5`` and ``1e400`` no seq."""
    if "\\" in text:
        text = _ESCAPED_DIGIT.sub(r"\1", text)
    if text.isdigit():
        return _digits_seq(text)
    try:
        number = float(text)
    except ValueError:
        return None
    if not number.is_integer() or not 0 <= number < 2.0 ** 64:
        return None
    return int(number)


def _json_seqs(line: str) -> tuple[bool, list[int]]:
    """The seqs the JSON objects in ``line`` name, read by parsing: from the line's first
    ``{``, each object in turn (after one that parses, the next ``{`` after it), every
    top-level member whose decoded key is ``seq`` (``_seq_value``). ``(parsed, seqs)``:
    ``parsed`` is False when the JSON there does not parse (nor is tried: more JSON than a
    message holds, ``_too_much_json``), and the scan stops at the first that does not, so
    the line is parsed at most once end to end (linear; the memory as for a message)."""
    first = line.find("{")
    if first < 0:
        return True, []
    if _too_much_json(line[first:], MAX_MESSAGE_JSON_ITEMS):
        return False, []
    seqs: list[int] = []
    at = first
    while at >= 0:
        try:
            members, end = _SEQ_SCAN.raw_decode(line, at)
        except (ValueError, RecursionError):
            return False, seqs
        for key, value in members:
            if key == "seq" and (seq := _seq_value(value)) is not None:
                seqs.append(seq)
        at = line.find("{", end)
    return True, seqs


def _sd_params(line: str, end: int) -> dict[str, str]:
    """The params of the ``sidecar@32473`` element in ``line[:end]`` ({} without one);
    ``ValueError`` when there are two elements, or a param named twice in it (an SD-ID and
    a param appear once, RFC 5424 6.3.2 and 6.3.3): a SIEM could show either copy."""
    found = list(_SD_ELEMENT.finditer(line, 0, end))
    if not found:
        return {}
    if len(found) > 1:
        raise ValueError(f"structured data: {SD_ID} {len(found)} times")
    # Its params up to the ``]`` that ends it (a ``\]`` or ``\"`` in a value, RFC 5424
    # 6.3.3, does not: a SIEM reads past it, and so does this).
    pairs, pos = [], found[0].end()
    while (m := _SD_PARAM_ESCAPED.match(line, pos, end)) is not None:
        pairs.append((m.group(1), _SD_UNESCAPE.sub(r"\1", m.group(2))))
        pos = m.end()
    if not line.startswith("]", pos) and not line.startswith(" ]", pos):
        raise ValueError(f"structured data: {SD_ID} not as the shipper writes it")
    params = dict(pairs)
    if len(params) != len(pairs):
        raise ValueError("structured data: a param twice")
    return params


def bounded_lines(fh: IO[str], limit: int = MAX_COLLECT_LINE) -> Iterator[str | None]:
    """The lines of ``fh``, each read whole only when it has at most ``limit`` characters;
    a longer one is read past in pieces of ``limit`` and stands as None."""
    while True:
        line = fh.readline(limit)
        if not line:
            return
        if len(line) == limit and not line.endswith("\n"):
            while (rest := fh.readline(limit)) and not rest.endswith("\n"):
                pass
            yield None
            continue
        yield line


class Collector:
    """Frames gathered from collector output, each message checked against its own frame.

    A message carries its frame (``frame``) and what a SIEM shows and indexes: ``seq``,
    ``kind``, ``digest`` (also in the structured data) and the record, checkpoint or header
    as JSON. Each must be what the frame says, or the collector's copy was edited where
    ``verify`` (which reads only the frames) would not see it: ``CollectError``. An
    encrypted record's JSON is compared when a data key opens its frame (``unchecked``
    counts those that could not be); a digest is compared where the segment's header says
    plain SHA-256 (an HMAC needs the key)."""

    def __init__(self, decryptor: Any = None) -> None:
        # One collector file may hold several trails (several sidecars, or the workers of
        # one, each numbering its frames from 0): frames are kept per (seq, frame) and told
        # apart by their links (``streams``); ``frames`` is the one stream's (seq -> frame)
        # when there is one.
        self.frames: dict[int, bytes] = {}
        self.messages = 0
        self.unchecked = 0  # encrypted records whose JSON could not be compared
        self._decryptor = decryptor
        self._digests: dict[bytes, str] = {}  # frame -> the digest its message shipped
        self._records: dict[bytes, str] = {}  # frame -> canonical JSON of an ``erc`` message
        self._links: dict[bytes, tuple[int, bytes]] = {}  # frame -> (seq, prev)
        self.found: list[dict[int, bytes]] = []  # the trails (``check``)
        self.oversized = 0  # lines over MAX_COLLECT_LINE, skipped unread (``add_file``)
        # Lines that look like our messages (``SD_ID``, ``{"seq":``, or JSON with a member
        # named seq in any spelling: ``_json_seqs``, ``_JSON_SEQ_MEMBER``) but are not ones the
        # shipper writes, so not read: how many, where the first few are, and the seqs
        # they seem to name (each with the first line naming it): ``check`` refuses one
        # naming the seq of a frame read. Before the twenty-seventh session they were
        # dropped without a word -- a copy of a deny's message made an allow with a member
        # named twice, a seq as text, no ``prev``, the record twice -- while a SIEM may
        # show such a line as the record (found by a hostile review).
        self.refused = 0
        self.refused_at: list[str] = []
        self._refused_seqs: dict[int, str] = {}
        self._refused_past = ""  # where a seq past MAX_REFUSED_SEQS was first named
        # The parts of messages sent in parts, by (seq, digest, parts), until each is whole
        # (``_part``), and their bytes.
        self._parts: dict[tuple[int, str, int, str | None], dict[int, bytes]] = {}
        self._part_bytes = 0
        self._joined: dict[tuple[int, str, int, str | None], list[bytes]] = {}  # SHA-256s

    def add_file(self, fh: IO[str], name: str = "") -> None:
        """``add`` for an open collector file, its lines read at most ``MAX_COLLECT_LINE``
        at a time (a line of junk without an end, written by whoever can reach the
        collector, is skipped rather than held in memory; ``oversized`` counts them)."""
        def lines() -> Iterator[str]:
            for line in bounded_lines(fh):
                if line is None:
                    self.oversized += 1
                    yield ""  # (counted: the line numbers stay the file's)
                else:
                    yield line

        self.add(lines(), name)

    def add(self, lines: Iterable[str], name: str = "") -> None:
        """Read collector output lines (any syslog line format that keeps the message text:
        the JSON object starting at ``{"seq":``); duplicates (at-least-once delivery) are
        kept once. A line that looks like ours but is not a message as the shipper writes
        it (cut by the collector, or edited) is not read: counted (``refused``; ``name``,
        the file's, says where), and refused by ``check`` when it names the seq of a frame
        that was read; a gap is ``verify``'s to show."""
        for number, line in enumerate(lines, 1):
            start = line.find('{"seq":')
            if start < 0:
                if '{"part":' in line:
                    whole = self._part(line, name, number)
                    if whole is None:
                        continue
                    line, start = whole, whole.find('{"seq":')
                elif SD_ID in line:
                    self._refuse(line, name, number)
                    continue
                elif "{" not in line or ('"seq"' not in line and "\\u" not in line):
                    continue  # no JSON member named seq (nor an escape that may spell one)
                else:
                    # A JSON object with a member named seq in any spelling (``{ "seq":``,
                    # ``{"kind":..,"seq":``, ``"s\u0065q"``): it looks like ours, and is
                    # not one (since the review of the thirty-fifth session's fix; before,
                    # only ``{"seq":`` was looked for, and such a line was skipped unnoted).
                    parsed, seqs = _json_seqs(line)
                    if seqs or (not parsed and _JSON_SEQ_MEMBER.search(line)):
                        self._refuse(line, name, number, seqs)
                    continue
            try:
                # More JSON than a message of ours holds is refused unparsed (a line of
                # ``[{},{},...]`` cost 200 bytes a container parsed). The strict reader
                # (sidecar/jsondoc.py): a message that names a member twice is not one the
                # writer sent -- a SIEM keeping the first "record" would show one thing and
                # this check the last (found by a hostile review).
                if _too_much_json(line[start:], MAX_MESSAGE_JSON_ITEMS):
                    raise ValueError("more JSON than a message holds")
                obj = read_json(line[start:])
                seq = obj["seq"]
                if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                    raise TypeError("seq")
                json_record = "frame" not in obj and "prev" in obj  # format 2
                frame = b"" if json_record else base64.b64decode(obj["frame"], validate=True)
            except (ValueError, KeyError, TypeError, RecursionError):
                # Not a message as shipped (cut by the collector, or edited): not read.
                obj = None  # (freed before ``_refuse`` parses the line again for its seqs)
                self._refuse(line, name, number)
                continue
            if json_record:
                try:
                    frame = _json_record_frame(obj, line[start:])
                except (ValueError, KeyError, TypeError, OverflowError) as exc:  # 2**64 on
                    raise CollectError(f"the message for seq {seq} does not match its frame "
                                       f"({exc}): the collector's copy was edited") from None
            self.messages += 1
            problem = self._mismatch(obj, frame, line[:start])
            if problem is not None:
                raise CollectError(f"the message for seq {seq} does not match its frame "
                                   f"({problem}): the collector's copy was edited")
            if frame not in self._links:
                self._links[frame] = (seq, self._prev_of(frame))

    def _part(self, line: str, name: str, number: int) -> str | None:
        """A part of a message sent in parts (``split_messages``): kept until its message's
        parts are all there, then that message whole (None until then). A part not as the
        shipper writes it, one that says otherwise than another part of its message, or
        past ``MAX_PENDING_PART_BYTES`` of parts held is refused as an edited line is; a
        message some of whose parts never came is not read (``incomplete``: a gap that
        ``verify`` shows)."""
        start = line.find('{"part":')
        try:
            if _too_much_json(line[start:], MAX_PART_JSON_ITEMS):
                raise ValueError("not a part")
            obj = read_json(line[start:])
            part, parts, seq, digest = obj["part"], obj["parts"], obj["seq"], obj["digest"]
            if not all(isinstance(v, int) and not isinstance(v, bool)
                       for v in (part, parts, seq)) or not isinstance(digest, str) \
                    or not 2 <= parts <= MAX_MESSAGE_PARTS or not 1 <= part <= parts \
                    or seq < 0 or len(obj) != 5 or _DIGEST_HEX.fullmatch(digest) is None:
                raise ValueError("not a part")
            # The structured data a SIEM shows says what the JSON says (found by the review
            # of this code: parts relabelled as another seq and kind were joined and read).
            # (a collector that keeps no structured data: the JSON alone, as for whole lines;
            # two elements, or a param twice: refused, since the thirty-fifth session)
            sd = _sd_params(line, start)
            for label, value in (("seq", str(seq)), ("digest", digest), ("part", str(part)),
                                 ("parts", str(parts))):
                if label in sd and sd[label] != value:
                    raise ValueError("structured data")
            kind = sd.get("kind")
            if kind is not None and kind not in MSGIDS:
                raise ValueError("structured data")
            data = base64.b64decode(obj["data"], validate=True)
        except (ValueError, KeyError, TypeError, RecursionError):
            self._refuse(line, name, number)
            return None
        key = (seq, digest, parts, kind)
        joined = self._joined.get(key)
        if joined is not None:  # (a part again, after its message was read: the same?)
            if joined[part - 1] != hashlib.sha256(data).digest():
                self._refuse(line, name, number)
            return None
        held = self._parts.setdefault(key, {})
        if part in held:
            if held[part] != data:
                self._refuse(line, name, number)
            return None
        # (each part held counts its bytes and what keeping it costs besides)
        if self._part_bytes + len(data) + PART_OVERHEAD > MAX_PENDING_PART_BYTES:
            if not held:
                del self._parts[key]
            self._refuse(line, name, number)
            return None
        held[part] = data
        self._part_bytes += len(data) + PART_OVERHEAD
        if len(held) < parts:
            return None
        del self._parts[key]
        self._part_bytes -= sum(map(len, held.values())) + PART_OVERHEAD * len(held)
        pieces = [held[i] for i in range(1, parts + 1)]
        # (remembered by digest: a part delivered again later is compared, not read again)
        self._joined[key] = [hashlib.sha256(piece).digest() for piece in pieces]
        try:
            whole = b"".join(pieces).decode("ascii")
        except UnicodeDecodeError:
            whole = ""
        m = _WHOLE_TEXT.match(whole)
        if m is None or (int(m.group(1)), m.group(2)) != (seq, digest) \
                or kind not in (None, m.group(3)):
            raise CollectError(f"the parts of the message for seq {seq} do not join into a "
                               f"message for seq {seq} of kind {kind!r} with their digest: the "
                               "collector's copy was edited")
        return whole

    @property
    def incomplete(self) -> list[str]:
        """The messages sent in parts of which some never came (``seq N: K of M parts``)."""
        return [f"seq {seq}: {len(held)} of {parts} parts"
                for (seq, _digest, parts, _kind), held in sorted(self._parts.items())]

    def _refuse(self, line: str, name: str, number: int,
                parsed: list[int] | None = None) -> None:
        """Count a line that looks like ours but is not read; note the seqs it names: those
        its JSON names, parsed (``_json_seqs``; ``parsed``, when the caller did already),
        and those ``_SEQ_NAMED`` finds in the whole line, whether its JSON parses or not
        (the structured data's ``seq="N"``, the JSON's ``"seq":N`` or ``"seq":"N"``, the key
        in any spelling, the number in any with an integral value)."""
        where = f"{name}:{number}" if name else f"line {number}"
        self.refused += 1
        if len(self.refused_at) < MAX_REFUSED_LISTED:
            self.refused_at.append(where)
        seqs = self._refused_seqs
        if parsed is None:
            parsed = _json_seqs(line)[1]
        named = (_seq_text(found.group(1)) for found in _SEQ_NAMED.finditer(line))
        for seq in itertools.chain(parsed, named):
            if seq is None:
                continue
            if seq not in seqs:
                if len(seqs) >= MAX_REFUSED_SEQS:
                    self._refused_past = self._refused_past or where
                    continue
                seqs[seq] = where

    def _mismatch(self, obj: dict[str, Any], frame: bytes, before: str) -> str | None:
        from sidecar.audit.chain import FrameError, decode_frame
        from sidecar.audit.signing import Checkpoint

        try:
            seq, prev, kind, body = decode_frame(frame)
        except FrameError as exc:
            return f"the frame does not decode: {exc}"
        if seq != obj["seq"]:
            return f"its frame is seq {seq}"
        if "frame" not in obj and obj.get("kind") == "erc" and kind == "rec":
            kind = "erc"  # a record of an encrypted trail, rebuilt in the clear (format 2)
        if obj.get("kind") != kind:
            return f"kind {obj.get('kind')!r}, its frame is {kind!r}"
        digest = obj.get("digest")
        if not isinstance(digest, str) or self._digests.setdefault(frame, digest) != digest:
            return "digest"
        # The line's one ``sidecar@32473`` element: a second one (or a param twice) is an
        # edit, whatever the last says (before the thirty-fifth session only the last
        # element and the last copy of a param were compared: a genuine allow's line with
        # seq 2's element put before its own was read, found by a hostile review).
        try:
            params = _sd_params(before, len(before))
        except ValueError as exc:
            return str(exc)
        for name, value in (("seq", str(seq)), ("digest", digest), ("kind", kind)):
            if name in params and params[name] != value:
                return f"structured data {name}={params[name]!r}"
        field = _FIELD[kind].decode()
        if field not in obj:
            return f"no {field}"
        shipped = _canonical(obj[field])
        if kind == "erc" and "frame" in obj:  # compared in ``check``, once the segment's
            # header names the key (format 2 rebuilds the record in the clear: compared here)
            if self._records.setdefault(frame, shipped) != shipped:
                return field
            return None
        # What the frame says: its body as stored, or (a signed checkpoint, as the writer
        # ships it) the checkpoint as ``/audit/head`` serves it.
        expected: list[Any] = [body]
        if kind in ("chk", "end") and isinstance(body.get("sig"), bytes):
            expected.append(Checkpoint.from_frame(seq, prev, kind, body).to_json())
        try:
            if all(_canonical(e) != shipped for e in expected):
                return field
        except (TypeError, ValueError, RecursionError):
            return field
        return None

    @staticmethod
    def _prev_of(frame: bytes) -> bytes:
        from sidecar.audit.chain import decode_frame

        return bytes(decode_frame(frame)[1])  # (decoded in ``_mismatch`` already: it holds)

    def streams(self) -> list[dict[int, bytes]]:
        """The trails the messages hold, each seq -> frame, told apart by their links: a
        frame follows the frame of the seq before whose shipped digest is its ``prev``.
        Pieces that share no seq are one trail, as before (a gap in it stays a gap for
        ``verify`` to show); pieces that do are kept apart, each its own trail (a piece
        whose first frame's predecessor was not shipped starts a trail of its own).
        ``CollectError`` for two different frames after the same frame (a writer that
        reused a seq after its tail was cut, or a forged frame); several genesis frames
        (seq 0) are several trails."""
        after: dict[tuple[int, bytes], list[bytes]] = {}
        for frame, (seq, prev) in self._links.items():
            after.setdefault((seq, prev), []).append(frame)
        for (seq, prev), frames in after.items():
            if len(frames) > 1 and any(prev):
                raise CollectError(f"two different frames were shipped with seq {seq}: a "
                                   "writer reused the seq (cut tail) or a frame was forged")
        shipped = {(seq, self._digests[frame]) for frame, (seq, _p) in self._links.items()}
        pieces: list[dict[int, bytes]] = []
        for frame, (seq, prev) in sorted(self._links.items(), key=lambda item: item[1][0]):
            if (seq - 1, prev.hex()) in shipped:
                continue  # not a start: its piece is followed from its first frame
            piece: dict[int, bytes] = {}
            current: bytes | None = frame
            while current is not None:
                s = self._links[current][0]
                piece[s] = current
                link = bytes.fromhex(self._digests[current])
                nexts = after.get((s + 1, link), [])
                current = nexts[0] if nexts else None
            pieces.append(piece)
        seqs = [seq for piece in pieces for seq in piece]
        if len(set(seqs)) == len(seqs):  # no seq in two pieces: one trail, gaps and all
            merged: dict[int, bytes] = {}
            for piece in pieces:
                merged.update(piece)
            return [merged] if merged else []
        return pieces

    def check(self) -> None:
        """``streams``, then the checks that need the segment headers (each trail in seq
        order): each digest against its frame where the header says plain SHA-256, each
        encrypted record's JSON against its decrypted frame where a data key opens it.
        ``frames`` is then the first trail (the only one, usually)."""
        found = self.streams()
        self.found = found
        for frames in found:
            self._check_stream(frames)
        self.frames = found[0] if found else {}
        if self._refused_past:
            raise CollectError(
                f"{self._refused_past}: lines that look like audit messages but are not ones as "
                f"the shipper writes them (not read) name more than {MAX_REFUSED_SEQS} seqs: "
                "which frames they name cannot be told; the collector's copy was edited or "
                "messages injected")
        if self._refused_seqs:
            named = sorted(seq for seq in self._refused_seqs
                           if any(seq in frames for frames in found))
            if named:
                seq = named[0]
                more = f" (and {len(named) - 1} more seqs so named)" if len(named) > 1 else ""
                raise CollectError(
                    f"{self._refused_seqs[seq]}: a line that seems to be the message for seq "
                    f"{seq} is not one as the shipper writes it (not read), next to the "
                    f"message for seq {seq} that was read{more}: a SIEM may show it as that "
                    "frame; the collector's copy was edited or a message injected")

    def _check_stream(self, frames: dict[int, bytes]) -> None:
        import hashlib

        from sidecar.audit.chain import ALG_SHA256, decode_frame, sealed_link, sealed_segment
        from sidecar.audit.crypto import DecryptError

        header: dict[str, Any] | None = None
        for seq in sorted(frames):
            frame = frames[seq]
            _s, prev, kind, body = decode_frame(frame)  # decoded once already in ``add``
            if kind == "seg":
                header = body
            elif seq - 1 not in frames:
                header = None  # a gap: the header of this frame's segment is not known
            if header is not None and header.get("alg") == ALG_SHA256:
                digest = hashlib.sha256(frame).digest()
                if kind == "rec" and sealed_segment(header):
                    # Format 3, an encrypted record rebuilt in the clear: its link binds its
                    # seq and prev to the digest of this plaintext frame (the ``d`` its frame
                    # on disk carries), as ``verify`` computes it.
                    digest = sealed_link(seq, prev, digest, None)
                if digest.hex() != self._digests.get(frame):
                    raise CollectError(f"the message for seq {seq} does not match its frame "
                                       "(digest): the collector's copy was edited")
            if kind != "erc" or frame not in self._records:
                continue
            try:
                if self._decryptor is None or header is None:
                    raise DecryptError("no key")
                wire = self._decryptor.record(seq, body, header)
            except DecryptError:
                self.unchecked += 1
                continue
            if _canonical(wire) != self._records[frame]:
                raise CollectError(f"the message for seq {seq} does not match its frame "
                                   "(record): the collector's copy was edited")


def _json_record_frame(obj: dict[str, Any], text: str) -> bytes:
    """The frame of a format-2 record message (no ``frame``: a record stored as JSON),
    made again from its seq, ``prev`` and the record's JSON exactly as it was shipped (the
    text after ``"record":`` up to the message's closing brace). Its digest is the chain's
    (for an encrypted trail too: the chain is over this plaintext frame). ``ValueError``
    when the message is not laid out as the shipper writes it."""
    seq, kind, digest, prev = obj["seq"], obj.get("kind"), obj.get("digest"), obj["prev"]
    if kind not in _RECORD_KINDS or not isinstance(digest, str) or \
            not isinstance(prev, str) or len(prev) != 64 or "record" not in obj:
        raise ValueError("not a record message as the shipper writes it")
    head = f'{{"seq":{seq},"kind":"{kind}","digest":"{digest}","prev":"{prev}","record":'
    rest = text.rstrip()
    if not text.startswith(head) or not rest.endswith("}"):
        raise ValueError("not laid out as the shipper writes it")
    return json_record_frame(seq, bytes.fromhex(prev), rest[len(head):-1].encode("ascii"))


def collect_frames(lines: Iterable[str], frames: dict[int, bytes]) -> int:
    """``Collector.add`` and ``streams`` into ``frames`` (the one trail, or the first);
    returns the number of messages read."""
    collector = Collector()
    collector.add(lines)
    found = collector.streams()
    if found:
        frames.update(found[0])
    return collector.messages


# Modes of what holds a trail, whatever the umask: the writer's segments are 0640 (owner
# writes, the group -- an auditor, a shipper -- reads, others nothing); their directory
# 0750 (a umask of 000 made it world-writable: anyone could add, remove or rename segments).
AUDIT_DIR_MODE = 0o750
SEGMENT_FILE_MODE = 0o640


def make_audit_directory(path: str) -> bool:
    """Create the audit directory ``path`` (with its missing parents) ``AUDIT_DIR_MODE``;
    an existing one is left as it is. True when it already existed and is world-writable
    (the caller warns: it is not ours to change)."""
    try:
        os.makedirs(path, mode=AUDIT_DIR_MODE)
    except FileExistsError:
        try:
            return bool(os.stat(path).st_mode & 0o002)
        except OSError:
            return False
    os.chmod(path, AUDIT_DIR_MODE)  # makedirs' mode went through the umask
    return False


def write_segments(frames: dict[int, bytes], directory: str) -> int:
    """Segment files rebuilt from shipped frames (a new file at every header frame), for
    ``verify``; returns how many files were written. Missing seqs stay missing. The files
    are ``SEGMENT_FILE_MODE`` and a directory made here ``AUDIT_DIR_MODE``, as the writer's."""
    from sidecar.audit.chain import LENGTH, decode_frame
    from sidecar.audit.segments import segment_name

    make_audit_directory(directory)  # an existing one: ``audit collect`` warns
    files = 0
    out: bytearray | None = None
    name = ""

    def flush() -> None:
        nonlocal files
        if out is not None:
            fd = os.open(os.path.join(directory, name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SEGMENT_FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fd, SEGMENT_FILE_MODE)  # the umask cannot widen or narrow it
                fh.write(out)
            files += 1

    for seq in sorted(frames):
        frame = frames[seq]
        _s, _p, kind, body = decode_frame(frame)
        if kind == "seg" or out is None:
            flush()
            created = body.get("created", 0.0) if kind == "seg" else 0.0
            # Only for the file name: a time no calendar holds (a forged header) names the
            # file as of 1970; verify reports the forgery.
            if isinstance(created, bool) or not isinstance(created, int | float) or \
                    not 0 <= created < MAX_NAME_TIME:
                created = 0.0
            name = segment_name(seq, float(created))
            out = bytearray()
        out += LENGTH.pack(len(frame)) + frame
    flush()
    return files
