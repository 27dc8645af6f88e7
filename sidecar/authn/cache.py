"""Bounded cache of verified tokens, so a signature is checked once per token, not per request.

Theory of operation
-------------------
Keyed by (provider name, whole token string): two tokens that differ in any byte are two
entries, and the same token is verified separately for each provider (their issuers and
audiences differ). An entry holds the verified claims, the ``jti``/``sub`` pulled out once,
and an expiry time: the token's ``exp`` or ``now + max_ttl``, whichever comes first (a
token without ``exp`` is not trusted forever on one check).

A lookup re-checks the revocation list every time: revocations are hot-reloaded and must
bite immediately, including for tokens verified before the revocation arrived.

Bounded by ``max_entries`` and by ``max_bytes`` with LRU eviction (``OrderedDict.move_to_end``
keeps a hit O(1)). The byte bound charges each entry what it holds (``entry_cost``: the token
string and the claims, walked once when stored): a count alone did not bound the memory, as
the claims of one token may be a thousand times those of another (found by a hostile review:
10,000 answers of a large introspection response, or of large signed tokens, held gigabytes). Only tokens that verified are stored: failed tokens are cheap to reject again at
the parse stage or cost one signature check, and storing them would let an attacker flush
good entries with garbage. The owner clears the cache when a provider's configuration or
keys change in a way that could invalidate earlier verdicts.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sidecar.authn.jwt import REVOKED, Claims, TokenInvalid
from sidecar.authn.revocation import RevocationList, revocation_ids

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_TTL_SECONDS = 3600.0
# What one cache's entries may hold in all, as ``entry_cost`` counts (a typical JWT's entry
# is 2-3 KiB: 10,000 of them fit; a 64 KiB introspection answer of small values is charged
# about 1 MiB).
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
ENTRY_OVERHEAD = 256  # the key tuple, the entry object, the dictionary slot


def entry_cost(*values: Any) -> int:
    """About how many bytes ``values`` hold: ``sys.getsizeof`` of every object reachable
    through dicts, lists and tuples (JSON values; each visited once, iteratively), plus
    ``ENTRY_OVERHEAD``. Shared objects (small ints, ``True``, interned strings) are counted
    at every place, so this errs high."""
    total = ENTRY_OVERHEAD
    stack: list[Any] = list(values)
    while stack:
        value = stack.pop()
        total += sys.getsizeof(value)
        if isinstance(value, Mapping):  # (a dict, or claims behind a MappingProxyType)
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return total


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteBoundedLRU(Generic[K, V]):
    """An LRU map bounded by entry count and by the sum of its entries' costs; the oldest
    entries leave first. ``put`` of an entry costing more than ``max_bytes`` keeps nothing."""

    __slots__ = ("max_entries", "max_bytes", "bytes", "evictions", "_entries")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value (no change of order), or None."""
        found = self._entries.get(key)
        return None if found is None else found[0]

    def touch(self, key: K) -> None:
        """Make ``key`` the most recently used."""
        self._entries.move_to_end(key)

    def pop(self, key: K) -> None:
        """Forget ``key`` (if present)."""
        found = self._entries.pop(key, None)
        if found is not None:
            self.bytes -= found[1]

    def put(self, key: K, value: V, cost: int) -> bool:
        """Keep ``value`` as the most recent entry, evicting the oldest over either bound;
        False (and nothing kept, ``key``'s old entry dropped) when it alone is over."""
        self.pop(key)
        if cost > self.max_bytes or self.max_entries <= 0:
            return False
        self._entries[key] = (value, cost)
        self.bytes += cost
        entries = self._entries
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, dropped) = entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1
        return True

    def keys(self) -> list[K]:
        """A snapshot of the keys, oldest first."""
        return list(self._entries)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.bytes = 0


@dataclass(frozen=True, slots=True)
class CachedToken:
    """One verified token: claims, ids for the revocation check, and when it stops counting."""

    claims: Claims
    jti: str | None
    sub: str | None
    iat: float | None
    expires_at: float


class VerificationCache:
    """LRU cache of verified tokens; see the module docstring."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_ttl_seconds: float = DEFAULT_MAX_TTL_SECONDS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self.max_ttl_seconds = max_ttl_seconds
        self._entries: ByteBoundedLRU[tuple[str, str], CachedToken] = \
            ByteBoundedLRU(max_entries, max_bytes)
        self.hits = 0
        self.misses = 0

    @property
    def evictions(self) -> int:
        """Entries dropped to make room (by count or by bytes)."""
        return self._entries.evictions

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, provider: str, token: str, now: float,
               revocations: RevocationList) -> Claims | None:
        """Cached claims for ``token``, or None on a miss (or an expired entry).

        Raises ``TokenInvalid("revoked")`` when the cached token is revoked.
        """
        entry = self.entry(provider, token, now, revocations)
        return None if entry is None else entry.claims

    def entry(self, provider: str, token: str, now: float,
              revocations: RevocationList) -> CachedToken | None:
        """``lookup``, answering with the whole entry (claims, revocation ids, expiry)."""
        key = (provider, token)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if now >= entry.expires_at:
            self._entries.pop(key)
            self.misses += 1
            return None
        self._entries.touch(key)
        self.hits += 1
        if not revocations.empty and (entry.jti is not None or entry.sub is not None) \
                and revocations.is_revoked_id(entry.jti, entry.sub, entry.iat):
            raise TokenInvalid(REVOKED)
        return entry

    def store(self, provider: str, token: str, claims: Claims,
              now: float) -> CachedToken | None:
        """Remember verified ``claims`` for ``token`` until its exp (or the max TTL); the
        entry stored, None when nothing was (a cache of size 0, a token already expired)."""
        if self.max_entries == 0:
            return None
        expires_at = now + self.max_ttl_seconds
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            expires_at = min(expires_at, float(exp))
        if expires_at <= now:
            return None
        entry = CachedToken(claims, *revocation_ids(claims), expires_at)
        if not self._entries.put((provider, token), entry, entry_cost(provider, token, claims)):
            return None
        return entry

    def clear(self, provider: str | None = None) -> None:
        """Forget every entry, or only those of ``provider``."""
        if provider is None:
            self._entries.clear()
            return
        # Providers without their own audiences are cached per audience: "name\0audience".
        scoped = provider + "\0"
        for key in [k for k in self._entries.keys()
                    if k[0] == provider or k[0].startswith(scoped)]:
            self._entries.pop(key)

    def statistics(self) -> dict[str, int]:
        """Counters snapshot: entries, hits, misses, evictions."""
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}
