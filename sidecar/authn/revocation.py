"""The revocation list: token ids (``jti``) and subjects (``sub``) refused before expiry.

Built once per policy load from the policy's ``revocations`` entries; a lookup is two dict
probes, cheap enough to repeat on every cached token (a revoked token must be refused even
when its verification is cached). An entry with ``until`` revokes only while
``now < until``; without it the revocation is permanent. Several entries for the same id
merge to the latest ``until`` (a permanent one wins).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.policy.sections import Revocation


class RevocationList:
    """Revoked ``jti`` and ``sub`` values, each with the time the revocation ends."""

    __slots__ = ("_by_jti", "_by_sub")

    def __init__(self, entries: Iterable[Revocation] = ()) -> None:
        self._by_jti: dict[str, float] = {}
        self._by_sub: dict[str, float] = {}
        for entry in entries:
            until = math.inf if entry.until is None else float(entry.until)
            if entry.jti is not None:
                self._by_jti[entry.jti] = max(until, self._by_jti.get(entry.jti, -math.inf))
            if entry.sub is not None:
                self._by_sub[entry.sub] = max(until, self._by_sub.get(entry.sub, -math.inf))

    def __len__(self) -> int:
        return len(self._by_jti) + len(self._by_sub)

    def is_revoked_id(self, jti: str | None, sub: str | None, now: float) -> bool:
        """Whether a token with this ``jti`` / ``sub`` is revoked at ``now``."""
        if jti is not None:
            until = self._by_jti.get(jti)
            if until is not None and now < until:
                return True
        if sub is not None:
            until = self._by_sub.get(sub)
            if until is not None and now < until:
                return True
        return False

    def is_revoked(self, claims: Mapping[str, Any], now: float) -> bool:
        """Whether verified ``claims`` are revoked at ``now`` (non-string ids never match)."""
        jti = claims.get("jti")
        sub = claims.get("sub")
        return self.is_revoked_id(
            jti if isinstance(jti, str) else None, sub if isinstance(sub, str) else None, now
        )


EMPTY_REVOCATIONS = RevocationList()
