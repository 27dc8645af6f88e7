"""The hash chain: frame encoding (writer side) and frame checking (verifier side).

Theory of operation
-------------------
Everything stored is a *frame*: a 4-byte big-endian length, then that many bytes of
msgpack encoding one map ``{"seq": int, "prev": bin(32), KIND: map}`` where KIND is

* ``"seg"``: segment header, the first frame of every segment file;
* ``"rec"``: one audit record (``AuditRecord.to_wire()``);
* ``"erc"``: one encrypted audit record (``crypto.py``); the chain covers the ciphertext;
* ``"chk"``: signed checkpoint (``signing.py``): an Ed25519 signature over the frame's own
  seq and prev, so over every frame before it;
* ``"end"``: seal, the last frame of a segment closed on purpose (rotation, shutdown);
  signed like a checkpoint when the writer has a signing key.

All frames of all segments form ONE chain: ``seq`` goes up by exactly one from frame to
frame, and ``prev`` is the link digest of the previous frame's msgpack bytes (the bytes
after the length prefix, exactly as stored). The very first frame has seq 0 and prev =
32 zero bytes. The link digest is SHA-256, or HMAC-SHA256 with a secret key when the
segment header says ``"alg": "hmac-sha256"``; the header's own digest uses its own alg.

So editing a byte changes a digest and breaks the next link; deleting, inserting or
reordering frames breaks ``seq`` or ``prev``; cutting a file mid-frame leaves a short
frame; removing whole segments breaks the link at the next header. What a chain cannot
show by itself is the removal of frames at the very *end*: a seal frame closes each
segment on purpose, and ``verify`` prints the head (seq and digest) so that it can be
compared with an earlier anchor.

Format 2
--------
A writer that ships its trail (``audit.ship``) writes format 2 (header ``v: 2``): the
syslog message of a record carries its JSON anyway, so the stored record is that same text
(a ``rec`` body that is a msgpack *string*; ``parse_record_json`` reads it strictly)
instead of a second, msgpack encoding, and the message needs no copy of the frame: its
``prev`` and the JSON make the frame again (``json_record_frame``). The chain of a record so
stored is over that *plaintext* frame, also when it is encrypted: an encrypted record is an
``erc`` frame ``{"d": digest}`` -- ``d`` the plaintext frame's link digest, which the next
frame's ``prev`` holds -- and the last frame of its group (``GROUP_RECORDS`` records, one
AES-GCM call, ``crypto.Encryptor.group_bodies``) also carries the group's ciphertext. So the
collector's copy, rebuilt in the clear, is the same chain as the disk's; the public key
alone checks completeness and order of either only in format 3 (below); the ciphertext
itself is checked by the data key (the GCM tag, and each record against its ``d``:
``segments.RecordOpener``). A record JSON cannot hold as it is (bytes, a non-finite number,
too deep, a lone surrogate) is stored as format 1 stores it, in the same segment.

Format 3
--------
Format 2 had a hole (found by a hostile review, the twenty-ninth): the link of an ``erc``
frame of a group was the ``d`` it carries, and nothing the public key can check ties ``d``
to that frame's own ``prev`` (``d`` covers it, but only the data key opens the plaintext).
So the frame BEFORE any such frame -- a signed checkpoint, a rotation header, a record --
could be replaced by anything, the ``erc`` frame's ``prev`` set to the forgery's digest,
and every later link and signature held. A writer storing records as JSON now writes
format 3 (header ``v: 3``): the same frames, but the link of an ``erc`` frame of a group
is ``sealed_link(seq, prev, d)``: the segment's digest (SHA-256, or its HMAC) over
``"sidecar-audit-erc/3" || seq (8 bytes, big-endian) || prev || d``, ``d`` the one it
carries (still the link digest of its plaintext frame, which the data key checks). A
``rec`` frame in a segment whose header declares encryption (``enc``) -- the collector's
copy, rebuilt in the clear from the syslog messages -- links by ``sealed_link`` over the
digest of its own bytes (the ``d`` of the disk's frame), so both copies are the same
chain. Every link of a format-3 chain is thus computed from the frame's own seq and
``prev``: a frame replaced anywhere changes every later link up to the next signature. A
clear JSON record of an unencrypted segment links by the digest of its bytes, as before.
Readers take formats 1, 2 and 3; for format 2 they count the group frames whose link was
taken on trust (``ChainVerifier.unproven``): only the data key proves those.

This module is pure: bytes in, values out. ``segments.py`` reads files, ``writer.py``
writes them.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import reprlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from sidecar.jsondoc import JsonDocError, read_json

GENESIS = bytes(32)
LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 20  # a length above this is corruption, not a frame
FORMAT_VERSION = 1
# Format 2: records stored as their JSON text ("Format 2" above); format 3 (what a writer
# storing JSON writes now): the same, an encrypted record's link bound to its seq and prev
# ("Format 3" above). Readers take all three.
FORMAT_JSON = 2
FORMAT_LINKED = 3
JSON_FORMATS = (FORMAT_JSON, FORMAT_LINKED)
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_JSON, FORMAT_LINKED)
# How deep a record's JSON may nest (the record, ``x``, and MAX_VALUE_DEPTH levels of its
# values fit many times over); the writer stores a deeper record as msgpack.
MAX_RECORD_JSON_DEPTH = 64
# Format 2 encrypts records in groups (one AES-GCM call each) of at most this many records
# and bytes of JSON: the last frame of a group holds the ciphertext of all of them.
GROUP_RECORDS = 64
GROUP_BYTES = 256 * 1024
ALG_SHA256 = "sha256"
ALG_HMAC = "hmac-sha256"

FrameKind = Literal["seg", "rec", "erc", "chk", "end"]
_KINDS = ("seg", "rec", "erc", "chk", "end")
RECORD_KINDS = ("rec", "erc")


def link_digest(payload: bytes, key: bytes | None) -> bytes:
    """The 32-byte digest that the next frame's ``prev`` must equal."""
    if key is None:
        return hashlib.sha256(payload).digest()
    h = _hmac_keyed(key)()
    h.update(payload)
    return h.digest()


@functools.lru_cache(maxsize=8)
def _hmac_keyed(key: bytes) -> Callable[[], hmac.HMAC]:
    """A fresh HMAC-SHA256 under ``key`` with nothing hashed yet: a copy of one keyed once
    (keying costs as much as hashing a frame: 2.6 -> 2.0 us per 531-byte digest here). A
    chain has one key, a verifier a few."""
    return hmac.new(key, digestmod=hashlib.sha256).copy


# Format 3: the link of a record stored as JSON in an encrypted segment (``sealed_link``):
# a tag no frame's msgpack starts with (a frame is a fixmap, 0x83), the seq, prev and d.
_SEALED_TAG = b"sidecar-audit-erc/3"
_SEALED = struct.Struct(">19sQ32s32s")


def sealed_link(seq: int, prev: bytes, d: bytes, key: bytes | None) -> bytes:
    """Format 3: the link digest of a record frame stored as JSON in an encrypted segment
    (``d``: the link digest of its plaintext frame): computed from the frame's seq and prev
    with what anyone holds, so a forged frame before it, or the frame's ``prev`` set to
    one, breaks the chain (format 2 took ``d`` as the link: "Format 3" above)."""
    return link_digest(_SEALED.pack(_SEALED_TAG, seq, prev, d), key)


def sealed_segment(header: dict[str, Any]) -> bool:
    """Whether a clear ``rec`` frame in the segment of ``header`` (a header body) links by
    ``sealed_link`` over the digest of its bytes: format 3 with encryption (``enc``), where
    such a frame is the collector's copy of an ``erc`` frame (which links so in every
    format-3 segment)."""
    return header.get("v") == FORMAT_LINKED and "enc" in header


def json_record_frame(seq: int, prev: bytes, text: bytes) -> bytes:
    """The plaintext frame of a record stored as JSON (``{"seq", "prev", "rec": TEXT}``,
    TEXT a msgpack string): what is stored, or, for an encrypted record, what its link
    digest ``d`` is computed over. Byte for byte what packing the map gives."""
    return b"".join((_frame_head(seq, prev), _KEY_REC, _str_header(len(text)), text))


def in_group(kind: str, body: dict[str, Any], version: Any) -> bool:
    """Whether a frame is an encrypted record of a group (format 2 or 3): it carries ``d``,
    the link digest of its plaintext frame, and the group's last frame the ciphertext. Its
    link is ``d`` itself in format 2, ``sealed_link`` over it in format 3."""
    return kind == "erc" and version in JSON_FORMATS and "d" in body


def _frame_head(seq: int, prev: bytes) -> bytes:
    """The msgpack of a frame map up to its kind: ``{"seq": seq, "prev": prev, `` (the
    frame's body follows; see ``_FRAME_OPEN`` below)."""
    return b"".join((_FRAME_OPEN, _pack_int(seq), _FRAME_PREV, prev))


def _pack_int(n: int) -> bytes:
    """msgpack's shortest encoding of the unsigned integer ``n`` (a frame's seq)."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


def _str_header(size: int) -> bytes:
    """msgpack's shortest str header for ``size`` bytes (fixstr, str8, str16 or str32)."""
    if size < 32:
        return bytes((0xA0 | size,))
    if size < 0x100:
        return b"\xd9" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xda" + size.to_bytes(2, "big")
    return b"\xdb" + size.to_bytes(4, "big")


def parse_record_json(text: str) -> dict[str, Any]:
    """The record a format-2 ``rec`` body (or encrypted plaintext) holds: strict JSON
    (``sidecar.jsondoc``: no member twice, no NaN, no lone surrogate, bounded nesting) of an
    object; ``FrameError`` otherwise."""
    try:
        value = read_json(text, max_depth=MAX_RECORD_JSON_DEPTH)
    except JsonDocError as exc:
        raise FrameError(f"record is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FrameError("record JSON is not an object")
    return value


# A value read from a file, shown in a message: bounded in depth and length, its strings
# escaped (``repr``). A header value nested a thousand deep made ``repr`` raise
# RecursionError: verify printed a traceback and a writer starting on the directory died
# (found by a hostile review).
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 80, 80


def shown(value: object) -> str:
    """``value`` for a message about a file someone else may write (see ``_SHOWN``)."""
    try:
        return _SHOWN.repr(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__}"


class FrameError(ValueError):
    """A frame is not well formed (bad msgpack, wrong shape, oversized)."""


class ChainError(ValueError):
    """A frame does not continue the chain; ``seq`` is the frame's seq when known."""

    def __init__(self, message: str, seq: int | None) -> None:
        super().__init__(message)
        self.seq = seq


class MissingKey(ChainError):
    """A segment needs a key the verifier was not given (an HMAC chain without
    ``--hmac-key-file``): nothing can be said about it, which is not the same as broken."""


class FalseHmacClaim(ChainError):
    """A frame of a segment whose header claims HMAC links to the frame before it by plain
    SHA-256, which no HMAC chain does (an HMAC digest equal to the SHA-256 of the same
    bytes is a collision): the header was edited to claim HMAC, so that what needs no key
    went unchecked. Provable without the key: tampering, never "cannot run"."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame and its link digest."""

    seq: int
    prev: bytes
    kind: FrameKind
    body: dict[str, Any]
    digest: bytes


def decode_frame(payload: bytes) -> tuple[int, bytes, FrameKind, dict[str, Any]]:
    """Parse and shape-check the msgpack of one frame (no chain checks)."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 -- msgpack raises several unrelated types on garbage
        raise FrameError(f"not a valid msgpack frame ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or len(obj) != 3:
        raise FrameError("frame is not a map of three keys")
    seq, prev = obj.get("seq"), obj.get("prev")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise FrameError("frame has no valid seq")
    if not isinstance(prev, bytes) or len(prev) != 32:
        raise FrameError("frame has no valid prev digest")
    for kind in _KINDS:
        body = obj.get(kind)
        if body is not None:
            if kind == "rec" and isinstance(body, str):
                body = parse_record_json(body)  # format 2: the record's JSON text
            elif not isinstance(body, dict):
                raise FrameError(f"frame {kind!r} body is not a map")
            elif kind != "rec" and not all(k.__class__ is str for k in body):
                # msgpack keys may be bytes (``strict_map_key`` allows both); no writer
                # makes one, and readers sort and compare these keys as text (an anchor
                # against a checkpoint ended in a traceback). A record's are checked with
                # its fields (``record.check_wire``: a malformed record, skipped).
                raise FrameError(f"frame {kind!r} body has a key that is not text")
            if kind == "erc":
                extra = _erc_extra(body)
                if extra is not None:
                    raise FrameError(
                        f"malformed encrypted record: member {shown(extra)} is not one a "
                        "writer makes ({n, c}; in format 2 {d} on a group's frame, {d, n, c} "
                        "on its last): bytes no digest covers")
            return seq, prev, kind, body  # type: ignore[return-value]
    raise FrameError("frame has no seg/rec/erc/chk/end body")


# The members of an ``erc`` body a writer makes: format 1 ``{n, c}``; format 2 ``{d}`` on a
# frame of a group and ``{d, n, c}`` on the group's last (``crypto.Encryptor``).
_ERC_FORMAT1 = frozenset(("n", "c"))
_ERC_GROUP = frozenset(("d",))
_ERC_GROUP_LAST = frozenset(("d", "n", "c"))


def _erc_extra(body: dict[str, Any]) -> str | None:
    """The first member of an ``erc`` body that no writer puts there (None: none). The link
    digest of a format-2 group's frame is its ``d``, not its bytes, so any other member was
    covered by nothing: 64 KiB added to a group's frames verified OK with every key (found
    by a hostile review, the twenty-seventh). Refused for format 1 too, where the digest
    covers it: no writer makes one. A member missing is left to the decryption."""
    allowed = (_ERC_GROUP_LAST if "c" in body else _ERC_GROUP) if "d" in body else _ERC_FORMAT1
    for key in body:
        if key not in allowed:
            return key
    return None


class ChainHead:
    """Writer side: the next seq and the digest of the last frame written.

    ``frame()`` encodes and advances; callers snapshot with ``state`` and roll back with
    ``restore`` when the bytes could not be written, so the chain in memory never runs
    ahead of the chain on disk.
    """

    def __init__(self, next_seq: int = 0, prev: bytes = GENESIS, key: bytes | None = None) -> None:
        self.next_seq = next_seq
        self.prev = prev
        self.key = key
        self._packer = msgpack.Packer(use_bin_type=True)
        # Format 2 or 3 (``JSON_FORMATS``): records are stored as their JSON text
        # (``json_records``); format 3 links encrypted ones by ``sealed_link``.
        self.version = FORMAT_VERSION
        # When a list: every frame made is noted as (seq, kind, payload, digest, detail)
        # (detail: the record's wire dict, or the body; for a record stored as JSON, the
        # tuple (prev, JSON text): what its message carries instead of the frame), for
        # shipping once on disk.
        self.journal: list[tuple[int, str, bytes, bytes, Any]] | None = None

    @property
    def alg(self) -> str:
        """The chain's digest algorithm: HMAC when a key is set, plain SHA-256 otherwise."""
        return ALG_HMAC if self.key is not None else ALG_SHA256

    @property
    def state(self) -> tuple[int, bytes]:
        """A snapshot (next seq, digest of the last frame) for ``restore``."""
        return self.next_seq, self.prev

    def restore(self, state: tuple[int, bytes]) -> None:
        """Roll back to a ``state`` snapshot (frames encoded since then were not written)."""
        self.next_seq, self.prev = state
        if self.journal:
            self.journal[:] = [j for j in self.journal if j[0] < self.next_seq]

    def frame(self, kind: FrameKind, body: dict[str, Any]) -> bytes:
        """Length-prefixed frame bytes for ``body``; advances the head."""
        payload: bytes = self._packer.pack({"seq": self.next_seq, "prev": self.prev, kind: body})
        if len(payload) > MAX_FRAME_BYTES:
            raise ValueError("audit frame too large")
        self.prev = link_digest(payload, self.key)
        if self.journal is not None:
            self.journal.append((self.next_seq, kind, payload, self.prev, body))
        self.next_seq += 1
        return LENGTH.pack(len(payload)) + payload

    def header(self, created: float, **info: Any) -> bytes:
        """A segment header frame; ``info`` (None values dropped) explains its origin."""
        body: dict[str, Any] = {"v": self.version, "alg": self.alg, "created": created}
        body.update({k: v for k, v in info.items() if v is not None})
        return self.frame("seg", body)

    def signed(self, kind: FrameKind, signer: Any,
               body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """A ``chk`` or ``end`` frame with ``body`` signed by ``signer``
        (``signing.Signer``; None writes it unsigned); returns the bytes and the body."""
        if signer is not None:
            body = signer.sign(self.next_seq, self.prev, kind, body)
        return self.frame(kind, body), body

    def records(self, wires: Iterable[dict[str, Any]], encryptor: Any = None) -> bytes:
        """Frames for many records at once (one allocation for the whole batch);
        ``encryptor`` (``crypto.Encryptor``) stores them as ``erc`` frames.

        Each record is msgpack-encoded once: that encoding is the ``rec`` body, or the
        plaintext the ``erc`` body encrypts, and the frame around it is spliced from fixed
        bytes (``_frame_payload``: byte for byte what packing the frame map gives)."""
        pack = self._packer.pack
        key = self.key
        seq, prev = self.next_seq, self.prev
        plain = wires if isinstance(wires, list) else list(wires)
        bodies = [pack(wire) for wire in plain]
        if encryptor is not None:
            bodies, kind, kind_key = encryptor.bodies(seq, bodies), "erc", _KEY_ERC
        else:
            kind, kind_key = "rec", _KEY_REC
        journal = self.journal
        out = bytearray()
        for i, body in enumerate(bodies):
            payload = b"".join((_FRAME_OPEN, pack(seq), _FRAME_PREV, prev, kind_key, body))
            if len(payload) > MAX_FRAME_BYTES:
                raise ValueError("audit frame too large")
            out += LENGTH.pack(len(payload))
            out += payload
            prev = hashlib.sha256(payload).digest() if key is None else link_digest(payload, key)
            if journal is not None:
                journal.append((seq, kind, payload, prev, plain[i]))
            seq += 1
        self.next_seq, self.prev = seq, prev
        return bytes(out)


    def json_records(self, wires: list[Any], texts: list[bytes | None],
                     encryptor: Any = None,
                     wire_of: Callable[[Any], dict[str, Any]] | None = None) -> bytearray:
        """Format 2: frames for many records, each stored as its JSON text ``texts[i]``
        (``json_record_frame``), or, where that is None (a record JSON cannot hold as it is),
        as ``records`` stores it: ``wires[i]``, or ``wire_of(wires[i])`` when given (the
        writer's entries, made maps only here). The chain is over the plaintext frames, so
        it is the same whether a copy holds the records encrypted (the segment files) or in
        the clear (the collector's, rebuilt from the syslog messages, which no data key
        opens).

        With ``encryptor`` the records are stored as ``erc`` frames in groups of up to
        ``GROUP_RECORDS`` records (``GROUP_BYTES`` of JSON), one AES-GCM call per group
        (``crypto.Encryptor.group_bodies``): every frame holds ``d``, the link digest of its
        plaintext frame; the group's last frame also holds the ciphertext of them all. The
        chain goes on from ``sealed_link(seq, prev, d)`` (format 3; one more digest of 91
        bytes per record), or from ``d`` itself in format 2 (kept for tests of readers)."""
        key = self.key
        seq, prev = self.next_seq, self.prev
        journal = self.journal
        out = bytearray()
        # (seq, prev, text, d, the frame's bytes up to its kind, link)
        group: list[tuple[int, bytes, bytes, bytes, bytes, bytes]] = []
        size = 0
        sha256 = hashlib.sha256
        sealed = encryptor is not None and self.version == FORMAT_LINKED
        sealed_pack = _SEALED.pack
        head16, head32, rec16 = _HEAD16.pack, _HEAD32.pack, _REC16.pack
        for i, text in enumerate(texts):
            if text is None:
                if group:
                    out += self._group(group, encryptor)
                    group, size = [], 0
                self.next_seq, self.prev = seq, prev
                out += self.records([wires[i] if wire_of is None else wire_of(wires[i])],
                                    encryptor)
                seq, prev = self.next_seq, self.prev
                continue
            n = len(text)
            if 0x100 <= seq <= 0xFFFFFFFF and 0x100 <= n <= 0xFFFF:
                # The usual frame (a seq of 2 or 4 bytes, a text of 256 bytes to 64 KiB) in
                # two struct calls instead of five calls and joins.
                head = (head32(_FRAME_OPEN, 0xCE, seq, _FRAME_PREV, prev) if seq > 0xFFFF
                        else head16(_FRAME_OPEN, 0xCD, seq, _FRAME_PREV, prev))
                plain = b"".join((head, rec16(_KEY_REC, 0xDA, n), text))
            else:
                head = _frame_head(seq, prev)
                plain = b"".join((head, _KEY_REC, _str_header(n), text))  # as json_record_frame
            if len(plain) > MAX_FRAME_BYTES:
                raise ValueError("audit frame too large")
            digest = sha256(plain).digest() if key is None else link_digest(plain, key)
            if encryptor is None:
                out += LENGTH.pack(len(plain))
                out += plain
                if journal is not None:
                    journal.append((seq, "rec", plain, digest, (prev, text)))
            else:
                if group and (len(group) >= GROUP_RECORDS or size + len(text) > GROUP_BYTES):
                    out += self._group(group, encryptor)
                    group, size = [], 0
                link = digest
                if sealed:
                    # Format 3: the link binds the frame's seq and prev, which ``d`` alone
                    # proves only to the data key (``sealed_link``, inlined).
                    data = sealed_pack(_SEALED_TAG, seq, prev, digest)
                    link = sha256(data).digest() if key is None else link_digest(data, key)
                group.append((seq, prev, text, digest, head, link))
                size += len(text) + 1
                digest = link
            prev = digest
            seq += 1
        if group:
            out += self._group(group, encryptor)
        self.next_seq, self.prev = seq, prev
        return out

    def _group(self, group: list[tuple[int, bytes, bytes, bytes, bytes, bytes]],
               encryptor: Any) -> bytearray:
        """The ``erc`` frames of one encrypted group (``json_records``); each journalled
        with its link (what its syslog message's digest is, and the next frame's prev)."""
        bodies = encryptor.group_bodies(group[0][0], [g[2] for g in group],
                                        [g[3] for g in group])
        journal = self.journal
        out = bytearray()
        for (seq, prev, text, _d, head, link), body in zip(group, bodies, strict=True):
            payload = b"".join((head, _KEY_ERC, body))
            if len(payload) > MAX_FRAME_BYTES:
                raise ValueError("audit frame too large")
            out += LENGTH.pack(len(payload))
            out += payload
            if journal is not None:
                journal.append((seq, "erc", payload, link, (prev, text)))
        return out


# A frame map ``{"seq": N, "prev": bin(32), KIND: BODY}`` in msgpack, cut where the varying
# parts go: fixmap of 3, fixstr "seq", (N), fixstr "prev" + bin8 of 32, (prev), fixstr KIND,
# (BODY, already packed). Identical to ``Packer(use_bin_type=True).pack`` of the map
# (tests/test_audit_chain.py checks it), so readers see no difference.
_FRAME_OPEN = b"\x83\xa3seq"
_FRAME_PREV = b"\xa4prev\xc4\x20"
_KEY_REC = b"\xa3rec"
_KEY_ERC = b"\xa3erc"
# The same head for a seq that is a uint16 (0xCD) or uint32 (0xCE) of msgpack, and a kind
# followed by a str16 header (0xDA): what nearly every record frame takes (``json_records``).
_HEAD16 = struct.Struct(">5sBH7s32s")
_HEAD32 = struct.Struct(">5sBI7s32s")
_REC16 = struct.Struct(">4sBH")


def _as_sha256_header(seq: int, prev: bytes, body: dict[str, Any]) -> bytes | None:
    """The SHA-256 link of the header frame ``seq`` with its ``alg`` set to SHA-256, packed as
    the writer packs it (``ChainHead.frame``: the map in its order); None if it cannot be."""
    try:
        payload = msgpack.packb({"seq": seq, "prev": prev, "seg": {**body, "alg": ALG_SHA256}},
                                use_bin_type=True)
    except Exception:  # noqa: BLE001 -- msgpack raises several types on odd values
        return None
    return hashlib.sha256(payload).digest()


class ChainVerifier:
    """Verifier side: feed frames in stored order, get ``Frame`` values or ``ChainError``.

    ``key``: the HMAC key, if any. ``require_mac``: refuse segments whose header says plain
    SHA-256 (a verifier holding a key must not accept a chain an attacker could redo).
    After a ``ChainError`` the verifier still holds the last good frame (``last``), so the
    caller may go on with the next segment and check that its header declares the break.
    """

    def __init__(self, key: bytes | None = None, *, require_mac: bool = False,
                 unkeyed_hmac: bool = False) -> None:
        self.key = key
        self.require_mac = require_mac
        # ``unkeyed_hmac``: a trail that is HMAC-authenticated from its first segment, read
        # without the HMAC key, is still checked for what needs no key (seq, shape; the
        # caller checks the signatures), its links left unchecked (``unlinked``); a plain
        # segment after such a chain is broken (with the key it would be).
        self.unkeyed_hmac = unkeyed_hmac
        self.unlinked = False
        self.last: Frame | None = None
        self.first: Frame | None = None
        self._segment_key: bytes | None = None
        self._version = FORMAT_VERSION
        # Format 3 with encryption: a clear record frame links by ``sealed_link`` too.
        self._sealed_records = False
        # Format-2 group frames whose link was taken from the ``d`` they carry: the frame
        # before each is bound only by what the data key checks (``RecordOpener``), not by
        # the public key ("Format 3" above). How many, and the first seq, for the caller.
        self.unproven = 0
        self.unproven_first: int | None = None
        self._expect_header = True
        self._sealed = False
        self._flipped: bytes | None = None

    def start_segment(self) -> None:
        """The next frame is the first frame of a new segment file."""
        self._expect_header = True
        self._sealed = False

    @property
    def sealed(self) -> bool:
        """The current segment ended with a seal frame."""
        return self._sealed

    def accept(self, payload: bytes) -> Frame:
        """Check the next stored frame against the chain so far: its ``Frame``, or
        ``ChainError``."""
        expected = self.last.seq + 1 if self.last is not None else None
        try:
            seq, prev, kind, body = decode_frame(payload)
        except FrameError as exc:
            raise ChainError(str(exc), expected) from None
        if self._sealed:
            raise ChainError("frame after the segment's seal", seq)
        if self._expect_header:
            if kind != "seg":
                raise ChainError("segment does not start with a header frame", seq)
            version = body.get("v")
            if version not in FORMAT_VERSIONS or type(version) is not int:
                raise ChainError(f"segment header has format version {shown(version)}; this "
                                 "verifier reads versions "
                                 f"{', '.join(map(str, FORMAT_VERSIONS))} only", seq)
            self._version = version
            self._sealed_records = sealed_segment(body)
            alg = body.get("alg")
            if alg == ALG_HMAC:
                if self.key is None:
                    if not self.unkeyed_hmac or (self.last is not None and not self.unlinked):
                        raise MissingKey("segment is HMAC-authenticated: an HMAC key is "
                                         "needed (--hmac-key-file)", seq)
                    self.unlinked = True
                self._segment_key = self.key
            elif alg == ALG_SHA256:
                if self.require_mac:
                    raise ChainError("segment is not HMAC-authenticated but a key was given", seq)
                if self.unlinked:
                    raise ChainError("segment is not HMAC-authenticated after segments that "
                                     "are: no single key verifies this trail", seq)
                self._segment_key = None
            else:
                raise ChainError(f"unknown digest algorithm {shown(alg)}", seq)
        elif kind == "seg":
            raise ChainError("header frame in the middle of a segment", seq)
        if self.last is None:
            if seq == 0 and prev != GENESIS:
                raise ChainError("first frame (seq 0) must have an all-zero prev", seq)
        else:
            if seq <= self.last.seq:
                raise ChainError(
                    f"seq {seq} reused after seq {self.last.seq}: frames reordered or replayed,"
                    " an old segment copied in, or a writer resumed from a cut tail", seq)
            if seq != self.last.seq + 1:
                raise ChainError(
                    f"seq skipped from {self.last.seq} to {seq}: frames removed, or a segment"
                    " file is missing", seq)
            if prev != self.last.digest and not self.unlinked:
                raise ChainError(
                    f"frame {seq} does not chain to frame {self.last.seq}: a frame was edited,"
                    " removed or inserted", seq)
            if self.unlinked and prev in (self.last.digest, self._flipped):
                # Read without the HMAC key, ``last.digest`` is the plain SHA-256 link (the
                # HMAC one needs the key): a prev equal to it is a SHA-256 chain under a
                # header that claims HMAC (every header flipped and a deny edited: verify
                # --pubkey said "cannot run", exit 2, and the readers showed the forgery,
                # exit 0; found by a hostile review, the twenty-ninth).
                raise FalseHmacClaim(
                    f"frame {seq} links to frame {self.last.seq} by plain SHA-256, which no "
                    "HMAC chain does: the segment header claims HMAC (hmac-sha256) but its "
                    "links are SHA-256 -- a header edited to claim HMAC", seq)
        # The SHA-256 link of this header as it was before its ``alg`` was edited to HMAC
        # (the frame after it links to that, not to the edited bytes): the next frame's
        # prev equal to it is ``FalseHmacClaim`` too. Without it a record right after the
        # edited header, itself edited in place, escaped the check above (its successor's
        # prev is the digest of its original bytes).
        self._flipped = _as_sha256_header(seq, prev, body) \
            if self.unlinked and kind == "seg" else None
        if in_group(kind, body, self._version):
            # A JSON record stored encrypted: ``d``, the link digest of its plaintext frame,
            # is carried (checked against the plaintext by whoever holds the data key:
            # ``segments.RecordOpener``). Format 3 links by ``sealed_link`` over it, which
            # binds this frame's seq and prev; format 2 took ``d`` itself, binding nothing
            # here: counted (``unproven``).
            digest = body["d"]
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise ChainError("encrypted record has no valid digest", seq)
            if self._version == FORMAT_LINKED:
                digest = sealed_link(seq, prev, digest, self._segment_key)
            else:
                self.unproven += 1
                if self.unproven_first is None:
                    self.unproven_first = seq
        elif kind == "rec" and self._sealed_records:
            # Format 3, a clear record in an encrypted segment: the collector's copy,
            # rebuilt from the syslog messages (this frame is the plaintext frame whose
            # digest the disk's ``erc`` frame carries as ``d``): the same link as there.
            digest = sealed_link(seq, prev, link_digest(payload, self._segment_key),
                                 self._segment_key)
        else:
            digest = link_digest(payload, self._segment_key)
        frame = Frame(seq, prev, kind, body, digest)
        if self.first is None:
            self.first = frame
        self.last = frame
        self._expect_header = False
        self._sealed = kind == "end"
        return frame
