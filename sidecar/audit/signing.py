"""Signed checkpoints: Ed25519 keys, key ids, the signed statement, anchors.

Theory of operation
-------------------
A *checkpoint* is a frame of the chain (kind ``chk``, or the seal ``end``) that carries an
Ed25519 signature over a fixed statement about itself::

    msgpack([DOMAIN, seq, prev, kind, fields])

``fields`` is the frame's body without ``sig`` (``time``, ``id`` = the sidecar's SPIFFE ID,
``kid``, ``every`` = the writer's checkpoint interval, a seal's ``why``), packed with sorted
keys. ``seq`` and ``prev`` are the frame's own; ``prev`` is the link digest of frame
``seq - 1``, which (by the chain) commits to every frame before it. So one valid signature
on frame S covers frames 0..S-1, and everyone holding the *public* key can check it. Whoever
can write the audit directory but does not hold the private key can recompute every digest
(the review's attack), but cannot make a signature over the recomputed digests.

The private key is a PEM (PKCS#8) Ed25519 key in a file that must not live on the audit
volume (in Kubernetes: a Secret mounted into the sidecar container only). The key id
(``kid``) is derived from the public key (first 16 hex digits of SHA-256 of its 32 raw
bytes), so a keyring is simply a set of public keys and nobody can claim another key's id.

An *anchor* is a checkpoint copied off the pod (``/audit/head`` on the admin port, the
metrics, the shipped stream): ``Checkpoint.to_json`` / ``from_json``. ``verify --anchor``
proves the anchored frame is still in the chain, which detects a cut tail.

Pure apart from ``load_*`` (file reads) and ``write_keypair``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sidecar.config.source import read_regular
from sidecar.edwards import weak_public_key

DOMAIN = "sidecar-audit-checkpoint/1"
SIGNATURE_BYTES = 64
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_KEYRING_KEYS = 256


def key_id(public: Ed25519PublicKey) -> str:
    """16 hex digits of SHA-256 of the raw public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def statement(seq: int, prev: bytes, kind: str, fields: dict[str, Any]) -> bytes:
    """The exact bytes a checkpoint signature signs (``fields``: the body without sig)."""
    ordered = {k: fields[k] for k in sorted(fields) if k != "sig"}
    packed: bytes = msgpack.packb([DOMAIN, seq, prev, kind, ordered], use_bin_type=True)
    return packed


class Signer:
    """The writer's private key and the identity it signs for."""

    def __init__(self, private: Ed25519PrivateKey, ident: str) -> None:
        self._private = private
        self.kid = key_id(private.public_key())
        self.ident = ident

    def sign(self, seq: int, prev: bytes, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` plus ``id``, ``kid`` and ``sig`` for the frame (seq, prev, kind)."""
        out = dict(body)
        out["id"], out["kid"] = self.ident, self.kid
        out["sig"] = self._private.sign(statement(seq, prev, kind, out))
        return out


class Keyring:
    """Public keys by key id (several, so rotated keys still verify old segments)."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {}
        for k in keys or []:
            self.keys[key_id(k)] = k

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, seq: int, prev: bytes, kind: str, body: dict[str, Any]) -> str | None:
        """None when the frame's signature is valid, otherwise what is wrong."""
        kid, sig, t, ident = body.get("kid"), body.get("sig"), body.get("time"), body.get("id")
        if not isinstance(kid, str) or not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
            return "checkpoint has no valid kid/sig"
        if isinstance(t, bool) or not isinstance(t, int | float) or not isinstance(ident, str):
            return "checkpoint has no valid time/id"
        public = self.keys.get(kid)
        if public is None:
            return f"checkpoint signed with key {kid}, which is not in the keyring"
        try:
            public.verify(sig, statement(seq, prev, kind, body))
        except (InvalidSignature, TypeError, ValueError, OverflowError, RecursionError):
            return (f"checkpoint signature does not verify (key {kid}): this frame or the "
                    "chain before it was altered")
        return None


def read_small_file(path: str, what: str, limit: int = MAX_KEY_FILE_BYTES) -> bytes:
    """At most ``limit`` bytes of the regular file ``path`` (a key, an anchor);
    ``ValueError`` naming ``what`` otherwise. A FIFO, device or directory is refused
    without blocking on it (``config.source.read_regular``)."""
    try:
        return read_regular(path, limit)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


_read = read_small_file


def load_signer(path: str, ident: str) -> Signer:
    """Read a PEM Ed25519 private key; ``ValueError`` with a message fit for a person."""
    return signer_from_pem(_read(path, "signing key file"), path, ident)


def signer_from_pem(data: bytes, path: str, ident: str) -> Signer:
    """``load_signer`` of the file's bytes as read (``path`` only names it in errors)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception:  # noqa: BLE001 -- cryptography raises several types (UnsupportedAlgorithm)
        raise ValueError(f"signing key file {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key file {path} is not an Ed25519 key")
    return Signer(key, ident)


def load_keyring(paths: list[str]) -> Keyring:
    """Every PEM public key (or private key: its public half) in ``paths``, each once (a key
    given twice, in one file or two, counts once); more than ``MAX_KEYRING_KEYS`` distinct
    keys is a ``ValueError``."""
    keys: list[Ed25519PublicKey] = []
    seen: set[bytes] = set()
    for path in paths:
        data = _read(path, "public key file")
        blocks = [b for b in data.split(b"-----END ") if b"-----BEGIN " in b]
        if not blocks:
            raise ValueError(f"{path} holds no PEM key")
        for block in blocks:
            pem = block[block.index(b"-----BEGIN "):]
            end = pem.find(b"-----", len(b"-----BEGIN "))
            if end < 0:
                raise ValueError(f"{path} holds a PEM block without a label")
            label = pem[len(b"-----BEGIN "):end]
            pem += b"-----END " + label + b"-----\n"
            try:
                if b"PRIVATE" in label:
                    priv = serialization.load_pem_private_key(pem, password=None)
                    key: Any = priv.public_key()
                else:
                    key = serialization.load_pem_public_key(pem)
            except Exception:  # noqa: BLE001 -- cryptography raises several types
                # (ValueError, TypeError, UnsupportedAlgorithm for an unsupported curve)
                raise ValueError(f"{path} holds a PEM block that is not a usable key") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"{path} holds a key that is not Ed25519")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            weak = weak_public_key(raw)
            if weak is not None:
                raise ValueError(f"{path} holds an Ed25519 key that verifies nothing: {weak}")
            if raw in seen:
                continue
            if len(keys) >= MAX_KEYRING_KEYS:
                raise ValueError(f"at most {MAX_KEYRING_KEYS} distinct public keys")
            seen.add(raw)
            keys.append(key)
    return Keyring(keys)


def write_keypair(prefix: str) -> tuple[str, str, str]:
    """``PREFIX.key`` (private, mode 0600, never overwritten) and ``PREFIX.pub``; returns
    (private path, public path, kid)."""
    private = Ed25519PrivateKey.generate()
    priv_path, pub_path = prefix + ".key", prefix + ".pub"
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pub)
    return priv_path, pub_path, key_id(private.public_key())


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed checkpoint as a value (for ``/audit/head``, metrics, shipping, anchors).

    It states: frame ``seq`` of the chain (a ``kind`` frame with body ``fields`` + ``sig``)
    has ``prev`` as its link to frame ``seq - 1``.
    """

    seq: int
    prev: bytes
    kind: str
    fields: dict[str, Any]
    sig: bytes

    @property
    def time(self) -> float:
        """When it was signed (Unix seconds)."""
        return float(self.fields.get("time", 0.0))

    @property
    def kid(self) -> str:
        """The id of the key that signed it."""
        return str(self.fields.get("kid", ""))

    @classmethod
    def from_frame(cls, seq: int, prev: bytes, kind: str, body: dict[str, Any]) -> Checkpoint:
        """The checkpoint a decoded chain frame carries."""
        return cls(seq, prev, kind, {k: v for k, v in body.items() if k != "sig"},
                   bytes(body["sig"]))

    def body(self) -> dict[str, Any]:
        """The checkpoint's fields with its signature, as stored in the frame."""
        return {**self.fields, "sig": self.sig}

    def to_json(self) -> dict[str, Any]:
        """The JSON form ``/audit/head`` serves and ``audit verify --anchor`` reads."""
        return {"seq": self.seq, "prev": self.prev.hex(), "kind": self.kind,
                "fields": self.fields, "sig": base64.b64encode(self.sig).decode("ascii")}

    @classmethod
    def from_json(cls, obj: Any) -> Checkpoint:
        """``ValueError`` naming what is wrong when ``obj`` is not a checkpoint."""
        if not isinstance(obj, dict):
            raise ValueError("a checkpoint is a JSON object")
        try:
            seq, kind, fields = obj["seq"], obj["kind"], obj["fields"]
            prev = bytes.fromhex(obj["prev"])
            sig = base64.b64decode(obj["sig"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a checkpoint: bad or missing field ({exc})") from None
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or len(prev) != 32:
            raise ValueError("not a checkpoint: bad seq or prev")
        if kind not in ("chk", "end") or not isinstance(fields, dict):
            raise ValueError("not a checkpoint: bad kind or fields")
        if len(sig) != SIGNATURE_BYTES:
            raise ValueError("not a checkpoint: bad sig")
        # JSON has no tuples: "every" comes back as a list, which msgpack packs the same.
        return cls(seq, prev, kind, fields, sig)


def load_anchor(path: str) -> Checkpoint:
    """A checkpoint saved as JSON (the body of ``/audit/head``)."""
    data = _read(path, "anchor file")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError(f"anchor file {path} is not JSON (or nests too deep)") from None
    try:
        return Checkpoint.from_json(obj.get("checkpoint", obj) if isinstance(obj, dict) else obj)
    except ValueError as exc:
        raise ValueError(f"anchor file {path}: {exc}") from None
