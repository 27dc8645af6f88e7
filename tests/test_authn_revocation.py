"""RevocationList: by jti, by sub, forever or until a time."""

from __future__ import annotations

from sidecar.authn.revocation import RevocationList
from sidecar.policy.sections import Revocation


def test_jti_revoked_forever() -> None:
    revs = RevocationList([Revocation(jti="t-1")])
    assert revs.is_revoked({"jti": "t-1", "sub": "x"}, 10**12)
    assert not revs.is_revoked({"jti": "t-2", "sub": "x"}, 0)


def test_sub_revoked_until() -> None:
    revs = RevocationList([Revocation(sub="mallory", until=100)])
    assert revs.is_revoked({"sub": "mallory"}, 99)
    assert not revs.is_revoked({"sub": "mallory"}, 100)


def test_several_entries_merge_to_the_longest() -> None:
    revs = RevocationList([Revocation(jti="a", until=10), Revocation(jti="a"),
                           Revocation(jti="a", until=20)])
    assert revs.is_revoked({"jti": "a"}, 10**9)
    assert len(revs) == 1


def test_non_string_ids_never_match() -> None:
    revs = RevocationList([Revocation(jti="1")])
    assert not revs.is_revoked({"jti": 1}, 0)
    assert not revs.is_revoked({}, 0)
