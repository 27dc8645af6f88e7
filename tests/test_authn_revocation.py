"""RevocationList: by jti, by sub, for every token or for tokens issued before `until`."""

from __future__ import annotations

from sidecar.authn.revocation import RevocationList, revocation_ids
from sidecar.policy.sections import Revocation


def test_jti_revoked() -> None:
    revs = RevocationList([Revocation(jti="t-1")])
    assert revs.is_revoked({"jti": "t-1", "sub": "x", "iat": 10**12})
    assert not revs.is_revoked({"jti": "t-2", "sub": "x"})


def test_sub_revoked_for_tokens_issued_before_until() -> None:
    revs = RevocationList([Revocation(sub="mallory", until=100)])
    assert revs.is_revoked({"sub": "mallory", "iat": 99})
    assert not revs.is_revoked({"sub": "mallory", "iat": 100})  # a fresh login works
    assert revs.is_revoked({"sub": "mallory"})  # no iat: cannot prove it is new
    assert not revs.is_revoked({"sub": "alice", "iat": 1})


def test_several_entries_merge_to_the_widest() -> None:
    revs = RevocationList([Revocation(jti="a", until=10), Revocation(jti="a"),
                           Revocation(jti="a", until=20)])
    assert revs.is_revoked({"jti": "a", "iat": 10**9})
    assert len(revs) == 1


def test_non_string_ids_never_match() -> None:
    revs = RevocationList([Revocation(jti="1")])
    assert not revs.is_revoked({"jti": 1})
    assert not revs.is_revoked({})
    assert revocation_ids({"jti": 1, "sub": "s", "iat": True}) == (None, "s", None)
