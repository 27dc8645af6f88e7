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

Bounded by ``max_entries`` with LRU eviction (``OrderedDict.move_to_end`` keeps a hit
O(1)). Only tokens that verified are stored: failed tokens are cheap to reject again at
the parse stage or cost one signature check, and storing them would let an attacker flush
good entries with garbage. The owner clears the cache when a provider's configuration or
keys change in a way that could invalidate earlier verdicts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sidecar.authn.jwt import REVOKED, Claims, TokenInvalid
from sidecar.authn.revocation import RevocationList, revocation_ids

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_TTL_SECONDS = 3600.0


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
                 max_ttl_seconds: float = DEFAULT_MAX_TTL_SECONDS) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self.max_ttl_seconds = max_ttl_seconds
        self._entries: OrderedDict[tuple[str, str], CachedToken] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

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
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
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
        key = (provider, token)
        self._entries[key] = entry = CachedToken(claims, *revocation_ids(claims), expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1
        return entry

    def clear(self, provider: str | None = None) -> None:
        """Forget every entry, or only those of ``provider``."""
        if provider is None:
            self._entries.clear()
            return
        # Providers without their own audiences are cached per audience: "name\0audience".
        scoped = provider + "\0"
        for key in [k for k in self._entries if k[0] == provider or k[0].startswith(scoped)]:
            del self._entries[key]

    def statistics(self) -> dict[str, int]:
        """Counters snapshot: entries, hits, misses, evictions."""
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}
