"""API keys: a name per key, only the SHA-256 of each key in the policy.

A caller presents its key in the ``x-api-key`` request header. ``ApiKeyTable.check``
hashes the presented key once and compares it with *every* stored hash using
``hmac.compare_digest``, without stopping at the first match, so the time taken says
nothing about which entry (or how much of a hash) matched. Keys past ``expires_at`` are
refused. Storing only hashes means a leaked policy file leaks no usable key; keys are 256
random bits, so a plain (unsalted, fast) hash is enough - there is nothing to brute-force.

``new_api_key`` / ``cmd_apikey_new`` back ``sidecar apikey new NAME``: print a fresh key once
and the policy entry to paste under ``api_keys:``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import math
import re
import secrets
import sys
from collections.abc import Iterable
from typing import TextIO

from sidecar.output import dump_yaml
from sidecar.policy.sections import ApiKey

API_KEY_HEADER = b"x-api-key"
KEY_PREFIX = "sk_"
MAX_PRESENTED_KEY_CHARS = 256
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def presented_key(raw: bytes) -> str:
    """The key in an ``x-api-key`` header value: only SP and HTAB around it are dropped
    (RFC 9110 optional whitespace); ``str.strip()`` also dropped NBSP, NEL and 0x1C-0x1F,
    so ``<key>\xa0`` counted as the key."""
    return raw.decode("latin-1").strip(" \t")


def api_key_sha256(key: str) -> str:
    """The hex SHA-256 of a key as stored in the policy."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeyTable:
    """The policy's API keys, ready for constant-time checks."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[ApiKey] = ()) -> None:
        table: list[tuple[bytes, str, float | None]] = []
        for entry in entries:
            digest = entry.sha256.strip().lower()
            if _HEX64.fullmatch(digest) is None:
                # The loader validates this; a bad hash here can never match anything.
                continue
            table.append((bytes.fromhex(digest), entry.name, entry.expires_at))
        self._entries = tuple(table)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, presented_key: str, now: float) -> str | None:
        """The name of the key ``presented_key`` is, if it is known and not expired."""
        if not presented_key or len(presented_key) > MAX_PRESENTED_KEY_CHARS:
            return None
        digest = hashlib.sha256(presented_key.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for stored, name, expires_at in self._entries:
            # No early exit: every entry is compared whatever matched before.
            if hmac.compare_digest(digest, stored) and (expires_at is None or now < expires_at):
                found = name
        return found


    def named(self, name: str, now: float) -> bool:
        """Is there an unexpired entry called ``name``? (a request in flight judged again
        after a reload: its key itself is not kept)"""
        return any(entry_name == name and (expires_at is None or now < expires_at)
                   for _, entry_name, expires_at in self._entries)

    def expiry(self, presented_key: str) -> float:
        """When the entry ``presented_key`` matches expires (Unix time; inf: never, or no
        entry matches). Read once per upgraded stream, never per request."""
        if not presented_key or len(presented_key) > MAX_PRESENTED_KEY_CHARS:
            return math.inf
        digest = hashlib.sha256(presented_key.encode("utf-8", "surrogateescape")).digest()
        ends = math.inf
        for stored, _, expires_at in self._entries:
            if hmac.compare_digest(digest, stored) and expires_at is not None:
                ends = min(ends, expires_at)
        return ends


def new_api_key(name: str) -> tuple[str, str]:
    """A fresh key and the YAML list entry (name + sha256) to paste under ``api_keys:``.

    Raises ``ValueError`` for a name that is not 1-64 of ``[A-Za-z0-9._-]``.
    """
    if _NAME.fullmatch(name) is None:
        raise ValueError("the name must be 1-64 characters of A-Z a-z 0-9 . _ - "
                         "and start with a letter or digit")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = dump_yaml([{"name": name, "sha256": api_key_sha256(key)}])
    return key, entry


def cmd_apikey_new(args: argparse.Namespace, out: TextIO | None = None,
                   err: TextIO | None = None) -> int:
    """``sidecar apikey new NAME``: print the key (once) and the policy entry; exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        key, entry = new_api_key(str(args.name))
    except ValueError as exc:
        print(f"sidecar apikey new: {exc}", file=err)
        return 2
    print(f"API key (shown once, store it now): {key}", file=out)
    print("Add this entry under api_keys: in the policy:", file=out)
    print(entry, end="", file=out)
    return 0
