"""Encryption at rest: AES-256-GCM per record frame, the chain over the ciphertext
(format 1), or per group of records, the chain over the plaintext (format 2).

Theory of operation
-------------------
With ``audit.encryption_key_file`` each record is stored as an ``erc`` frame instead of
``rec``: ``{"n": nonce(12), "c": AES-256-GCM(key, nonce, msgpack(record), aad)}`` with
``aad = "sidecar-audit-rec/1" || seq (8 bytes, big-endian)``, so a ciphertext moved to
another position does not decrypt. The segment header names the data key:
``enc: {alg: "aes-256-gcm", kid}``.

Headers, checkpoints and seals stay in the clear, and the chain links and the signatures
are computed over the stored (encrypted) frame bytes. So an auditor holding only the
public signing key checks completeness and order (every frame there, in order, unaltered,
signed), and only the holder of the data key reads what the records say.

Nonces are 12 random bytes per frame (never derived from seq: after a cut tail a restarted
writer would reuse seqs, and a repeated (key, nonce) pair breaks GCM). Random nonces are
safe for about 2**32 records per key; rotate the data key well before that (the key id in
each header lets readers hold several).

Format 2 (a shipped trail, ``chain.py``) encrypts a record's JSON text instead, in groups:
one AES-256-GCM call per group of up to ``chain.GROUP_RECORDS`` records (a call per record
cost more than the encryption itself), the ciphertext in the group's last frame, every
frame of the group holding ``d``, the link digest of its record's plaintext frame; the
chain goes on from ``d``. ``aad = "sidecar-audit-grp/2" || first seq || count || every d``.
There the chain covers the plaintext, not the ciphertext: in format 3 (what a writer
writes now: each such frame links by ``chain.sealed_link`` over its seq, prev and ``d``)
the public signing key proves completeness and order, and the data key (the tag; each
record against its ``d``) what the ciphertext holds. In format 2 the link was ``d``
itself, which binds the frame's ``prev`` only for the data key (found by a hostile review).

A data key file holds the 32-byte key in base64 (one line; ``sidecar audit keygen
--data-key``). The key id is 16 hex digits of SHA-256 over a fixed label and the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Iterable
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.audit.chain import shown
from sidecar.audit.signing import read_small_file

ALG = "aes-256-gcm"
KEY_BYTES = 32
NONCE_BYTES = 12
_AAD = b"sidecar-audit-rec/1"
_AAD_GROUP = b"sidecar-audit-grp/2"
_SEQ = struct.Struct(">Q")
_COUNT = struct.Struct(">I")


def data_key_id(key: bytes) -> str:
    """The short, non-secret id of a data key (written in segment headers to pick the key)."""
    return hashlib.sha256(b"sidecar-audit-data-key/1" + key).hexdigest()[:16]


DATA_KEY_FILE_BYTES = 4096


def load_data_key(path: str) -> bytes:
    """The 32-byte key of a base64 key file; ``ValueError`` with a message for a person."""
    return data_key_from_text(read_small_file(path, "data key file", DATA_KEY_FILE_BYTES), path)


def data_key_from_text(data: bytes, path: str) -> bytes:
    """``load_data_key`` of the file's bytes as read (``path`` only names it in errors)."""
    text = data.strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"data key file {path} must hold {KEY_BYTES} bytes in base64 "
                         "(sidecar audit keygen --data-key)")
    return key


def write_data_key(path: str) -> str:
    """A fresh data key file (mode 0600, never overwritten); returns its key id."""
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(base64.b64encode(key) + b"\n")
    return data_key_id(key)


class Encryptor:
    """Writer side: packed records -> packed ``erc`` bodies."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.kid = data_key_id(key)

    def header_info(self) -> dict[str, Any]:
        """What a segment header records about encryption: the algorithm and the key id."""
        return {"alg": ALG, "kid": self.kid}

    def bodies(self, first_seq: int, plaintexts: list[bytes]) -> list[bytes]:
        """One packed ``erc`` body per packed record (``msgpack(wire)``), for frames
        numbered from ``first_seq``: the msgpack of ``{"n": nonce, "c": ciphertext}``,
        spliced from fixed bytes (identical to packing the map; no second encoding)."""
        nonces = os.urandom(NONCE_BYTES * len(plaintexts))  # one system call per batch
        encrypt, seq_bytes = self._aead.encrypt, _SEQ.pack
        out = []
        for i, plain in enumerate(plaintexts):
            nonce = nonces[i * NONCE_BYTES:(i + 1) * NONCE_BYTES]
            ciphertext = encrypt(nonce, plain, _AAD + seq_bytes(first_seq + i))
            size = len(ciphertext)
            out.append(b"".join((_BODY_NONCE, nonce, _BODY_CT, _bin_header(size), ciphertext)))
        return out


    def group_bodies(self, first_seq: int, texts: list[bytes],
                     digests: list[bytes]) -> list[bytes]:
        """Format 2: the packed ``erc`` bodies of a group of records stored as JSON, frames
        ``first_seq`` on, encrypted with ONE AES-256-GCM call (a call per record cost more
        than the encryption). Every body holds ``"d"``, the link digest of the record's
        plaintext frame (the chain goes on from it); the group's last body also holds the
        nonce ``"n"`` and ``"c"``: the ciphertext of the records' JSON joined by newlines
        (JSON text holds none), with the tag. ``aad = "sidecar-audit-grp/2" || first seq ||
        count || every d``: the ciphertext opens only at its place, for exactly those
        records."""
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._aead.encrypt(nonce, b"\n".join(texts), _group_aad(first_seq, digests))
        out = [_BODY_D + d for d in digests]
        out[-1] = b"".join((_BODY_LAST_D, digests[-1], _BODY_N, nonce, _BODY_CT,
                            _bin_header(len(ciphertext)), ciphertext))
        return out


# ``{"n": bin8(12) NONCE, "c": bin CIPHERTEXT}`` in msgpack: fixmap of 2, fixstr "n",
# bin8 of 12 bytes, (nonce), fixstr "c", (bin header, ciphertext).
_BODY_NONCE = b"\x82\xa1n\xc4\x0c"
_BODY_CT = b"\xa1c"
# Format 2: ``{"d": bin8(32) DIGEST}``, and the last of a group ``{"d": .., "n": bin8(12)
# NONCE, "c": bin CIPHERTEXT}``.
_BODY_D = b"\x81\xa1d\xc4\x20"
_BODY_LAST_D = b"\x83\xa1d\xc4\x20"
_BODY_N = b"\xa1n\xc4\x0c"


def _group_aad(first_seq: int, digests: list[bytes]) -> bytes:
    """A format-2 group's associated data: the label, its first seq, its count, every d."""
    return b"".join((_AAD_GROUP, _SEQ.pack(first_seq), _COUNT.pack(len(digests)), *digests))


def _bin_header(size: int) -> bytes:
    """msgpack's shortest bin header for ``size`` bytes (bin8, bin16 or bin32)."""
    if size < 0x100:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


class DecryptError(ValueError):
    """A record cannot be decrypted (no key for its id, wrong key, altered ciphertext)."""


class MissingDataKey(DecryptError):
    """The data key a segment header names (``enc.kid``) is not among the keys given: the
    check cannot run without it (``verify``: exit 2, as a missing HMAC key), which is not
    the same as a record that does not decrypt (the twenty-ninth session's review: an honest
    trail checked with the key of another key id was BROKEN, exit 1)."""

    def __init__(self, message: str, kid: Any) -> None:
        super().__init__(message)
        self.kid = kid


class Decryptor:
    """Reader side: the data keys held, by key id (several, for rotated keys)."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._aeads = {data_key_id(k): AESGCM(k) for k in keys}

    def __bool__(self) -> bool:
        return bool(self._aeads)

    def _aead(self, seq: int, header: dict[str, Any] | None) -> AESGCM:
        enc = header.get("enc") if header is not None else None
        kid = enc.get("kid") if isinstance(enc, dict) else None
        aead = self._aeads.get(kid) if isinstance(kid, str) else None
        if aead is None:
            if not isinstance(kid, str):  # (no key id a writer writes: a malformed header)
                raise DecryptError(f"record {seq} is encrypted with data key {shown(kid)}, "
                                   "which is not among the keys given (--data-key)")
            raise MissingDataKey(f"record {seq} is encrypted with data key {shown(kid)}, which "
                                 "is not among the keys given (--data-key)", kid)
        return aead

    def record(self, seq: int, body: dict[str, Any], header: dict[str, Any] | None) -> dict[str, Any]:
        """The record wire dict of the ``erc`` frame ``seq`` (format 1: one record, msgpack);
        ``DecryptError`` otherwise."""
        aead = self._aead(seq, header)
        nonce, ciphertext = body.get("n"), body.get("c")
        if not isinstance(nonce, bytes) or not isinstance(ciphertext, bytes):
            raise DecryptError(f"record {seq} is not a valid encrypted frame")
        try:
            plain = aead.decrypt(nonce, ciphertext, _AAD + _SEQ.pack(seq))
            wire = msgpack.unpackb(plain, raw=False, strict_map_key=True)
        except InvalidTag:
            raise DecryptError(f"record {seq} does not decrypt: wrong data key or altered "
                               "ciphertext") from None
        except Exception:  # noqa: BLE001 -- msgpack raises several types on garbage
            raise DecryptError(f"record {seq} decrypts to garbage") from None
        if not isinstance(wire, dict):
            raise DecryptError(f"record {seq} decrypts to garbage")
        return wire

    def group(self, first_seq: int, digests: list[bytes], last: dict[str, Any],
              header: dict[str, Any] | None) -> list[bytes]:
        """The JSON texts of a format-2 group of encrypted records (frames ``first_seq`` on,
        ``digests`` their ``d``, ``last`` the body of the group's last frame);
        ``DecryptError`` otherwise."""
        last_seq = first_seq + len(digests) - 1
        aead = self._aead(last_seq, header)
        nonce, ciphertext = last.get("n"), last.get("c")
        if not isinstance(nonce, bytes) or not isinstance(ciphertext, bytes):
            raise DecryptError(f"record {last_seq} is not a valid encrypted frame")
        try:
            plain = aead.decrypt(nonce, ciphertext, _group_aad(first_seq, digests))
        except InvalidTag:
            raise DecryptError(f"records {first_seq}..{last_seq} do not decrypt: wrong data "
                               "key, or an altered, moved or cut group") from None
        except (ValueError, OverflowError):  # a nonce of the wrong length, say
            raise DecryptError(f"record {last_seq} is not a valid encrypted frame") from None
        texts = plain.split(b"\n")
        if len(texts) != len(digests):
            raise DecryptError(f"records {first_seq}..{last_seq} decrypt to garbage")
        return texts


def load_decryptor(paths: list[str]) -> Decryptor:
    """A ``Decryptor`` holding every data key read from ``paths``."""
    return Decryptor([load_data_key(p) for p in paths])
