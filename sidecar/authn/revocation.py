"""The revocation list: token ids (``jti``) and subjects (``sub``) refused before expiry.

Built once per policy load from the policy's ``revocations`` entries; a lookup is two dict
probes, cheap enough to repeat on every cached token (a revoked token must be refused even
when its verification is cached).

``until`` (as documented in docs/policy.md) bounds a revocation by *issue time*: the entry
revokes tokens issued before ``until`` (``iat < until``), so "sub: mallory, until: <the
moment her laptop was stolen>" kills every token she had then and lets new logins work.
A token without ``iat`` cannot show when it was issued and is revoked (fail closed).
Without ``until`` the revocation covers every token. Several entries for the same id merge
to the latest ``until`` (an entry without ``until`` wins).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.policy.sections import Revocation


class RevocationList:
    """Revoked ``jti`` and ``sub`` values, each with the issue time the revocation ends at."""

    __slots__ = ("_by_jti", "_by_sub", "empty")

    def __init__(self, entries: Iterable[Revocation] = ()) -> None:
        self._by_jti: dict[str, float] = {}
        self._by_sub: dict[str, float] = {}
        for entry in entries:
            until = math.inf if entry.until is None else float(entry.until)
            if entry.jti is not None:
                self._by_jti[entry.jti] = max(until, self._by_jti.get(entry.jti, -math.inf))
            if entry.sub is not None:
                self._by_sub[entry.sub] = max(until, self._by_sub.get(entry.sub, -math.inf))
        # Nothing revoked (the list is never changed after it is built): a cached token's
        # lookup can skip the probe call.
        self.empty = not self._by_jti and not self._by_sub

    def __len__(self) -> int:
        return len(self._by_jti) + len(self._by_sub)

    def is_revoked_id(self, jti: str | None, sub: str | None, iat: float | None) -> bool:
        """Whether a token with this ``jti`` / ``sub``, issued at ``iat``, is revoked."""
        if jti is not None:
            until = self._by_jti.get(jti)
            if until is not None and (iat is None or iat < until):
                return True
        if sub is not None:
            until = self._by_sub.get(sub)
            if until is not None and (iat is None or iat < until):
                return True
        return False

    def is_revoked(self, claims: Mapping[str, Any]) -> bool:
        """Whether verified ``claims`` are revoked (non-string ids never match)."""
        return self.is_revoked_id(_str_or_none(claims.get("jti")),
                                  _str_or_none(claims.get("sub")), _iat(claims))


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _iat(claims: Mapping[str, Any]) -> float | None:
    iat = claims.get("iat")
    if isinstance(iat, int | float) and not isinstance(iat, bool):
        return float(iat)
    return None


def revocation_ids(claims: Mapping[str, Any]) -> tuple[str | None, str | None, float | None]:
    """(jti, sub, iat) as the revocation check reads them; cached once per token."""
    return _str_or_none(claims.get("jti")), _str_or_none(claims.get("sub")), _iat(claims)


EMPTY_REVOCATIONS = RevocationList()
