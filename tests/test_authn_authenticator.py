"""Authenticator: one call per request -> AuthFacts; keys, cache, revocation, forwarding."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sidecar.authn.apikeys import api_key_sha256
from sidecar.authn.authenticator import Authenticator, claim_header_value, www_authenticate
from sidecar.authn.jwks import parse_jwks
from sidecar.policy.decision import NO_AUTH
from sidecar.policy.sections import ApiKey, PolicyExtras, Revocation
from tests.test_authn_support import (
    NOW,
    QUERY_LOCATION,
    claims,
    ec_key,
    jwk,
    jwks_bytes,
    key_set,
    mint,
    provider,
    rsa_key,
)

CORP = provider(forward_claims=(("sub", "x-user"), ("groups", "x-groups")))


def make(**extras: object) -> Authenticator:
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": CORP}, **extras))
    auth.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    return auth


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + token.encode())]


def test_valid_token_gives_claims() -> None:
    auth = make()
    facts = auth.authenticate(["corp"], bearer(mint(claims(), ec_key())), "", NOW)
    assert facts.claims["corp"]["sub"] == "alice" and not facts.token_errors


def test_no_token_is_neither_claims_nor_error() -> None:
    assert make().authenticate(["corp"], [], "", NOW) is NO_AUTH


def test_invalid_token_gives_reason_per_provider() -> None:
    auth = make()
    facts = auth.authenticate(["corp"], bearer(mint(claims(aud="x"), ec_key())), "", NOW)
    assert facts.token_errors == {"corp": "bad_audience"} and not facts.claims
    assert auth.statistics(NOW)["failures"] == {"bad_audience": 1}


def test_unknown_provider_fails_closed() -> None:
    facts = make().authenticate(["ghost"], [], "", NOW)
    assert facts.token_errors == {"ghost": "unknown_provider"}


def test_provider_without_keys_refuses_every_token() -> None:
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": CORP}))
    facts = auth.authenticate(["corp"], bearer(mint(claims(), ec_key())), "", NOW)
    assert facts.token_errors == {"corp": "no_keys"}
    assert auth.statistics(NOW)["providers"]["corp"] == {"keys": 0, "key_set_age_seconds": None}


def test_second_request_is_a_cache_hit() -> None:
    auth = make()
    headers = bearer(mint(claims(), ec_key()))
    auth.authenticate(["corp"], headers, "", NOW)
    auth.authenticate(["corp"], headers, "", NOW + 1)
    stats = auth.statistics(NOW + 1)
    assert stats["verified"] == 1 and stats["cache"]["hits"] == 1


def test_revoked_jti_refused_even_when_cached() -> None:
    auth = make()
    headers = bearer(mint(claims(jti="stolen"), ec_key()))
    assert auth.authenticate(["corp"], headers, "", NOW).claims  # now cached
    auth.update(PolicyExtras(jwt_providers={"corp": CORP},
                             revocations=(Revocation(jti="stolen"),)))
    facts = auth.authenticate(["corp"], headers, "", NOW + 1)
    assert facts.token_errors == {"corp": "revoked"}
    assert auth.statistics(NOW)["cache"]["hits"] == 1  # it was the cached path that refused


def test_revoked_sub_until_a_time() -> None:
    auth = make(revocations=(Revocation(sub="alice", until=NOW),))
    stolen = bearer(mint(claims(iat=int(NOW) - 10), ec_key()))
    fresh = bearer(mint(claims(iat=int(NOW) + 5, jti="t-2"), ec_key()))
    assert auth.authenticate(["corp"], stolen, "", NOW).token_errors == {"corp": "revoked"}
    assert auth.authenticate(["corp"], fresh, "", NOW + 10).claims


def test_token_in_two_places_refused() -> None:
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": replace(
        CORP, locations=CORP.locations + (QUERY_LOCATION,))}))
    auth.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    a, b = mint(claims(jti="a"), ec_key()), mint(claims(jti="b"), ec_key())
    facts = auth.authenticate(["corp"], bearer(a), f"access_token={b}", NOW)
    assert facts.token_errors == {"corp": "multiple_tokens"}


def test_rotation_with_overlapping_keys() -> None:
    auth = make()
    old_token = mint(claims(jti="old"), ec_key(), kid="ec-1")
    new_token = mint(claims(jti="new"), ec_key("ec-2"), kid="ec-2")
    assert auth.authenticate(["corp"], bearer(old_token), "", NOW).claims
    # Overlap: the issuer publishes old + new, then starts signing with the new key.
    auth.set_keys("corp", key_set((ec_key(), "ec-1"), (ec_key("ec-2"), "ec-2")), NOW + 1)
    for token in (old_token, new_token):
        assert auth.authenticate(["corp"], bearer(token), "", NOW + 2).claims
    assert auth.statistics(NOW)["cache"]["hits"] == 1  # adding a key kept the cache
    # The old key is retired: its tokens stop working, cached or not.
    auth.set_keys("corp", key_set((ec_key("ec-2"), "ec-2")), NOW + 3)
    assert auth.authenticate(["corp"], bearer(old_token), "", NOW + 4).token_errors == {
        "corp": "unknown_kid"}
    assert auth.authenticate(["corp"], bearer(new_token), "", NOW + 4).claims


def test_unknown_kid_signals_the_listener() -> None:
    auth = make()
    calls: list[int] = []
    auth.set_unknown_kid_listener("corp", lambda: calls.append(1))
    auth.authenticate(["corp"], bearer(mint(claims(), ec_key(), kid="new")), "", NOW)
    # A token of another issuer must not make this provider refetch.
    auth.authenticate(["corp"], bearer(mint(claims(iss="https://x/"), ec_key(), kid="n")),
                      "", NOW)
    assert calls == [1]
    auth.set_unknown_kid_listener("corp", None)
    auth.authenticate(["corp"], bearer(mint(claims(), ec_key(), kid="new")), "", NOW)
    assert calls == [1]


def test_a_replaced_fetcher_does_not_remove_its_successors_listener() -> None:
    auth = make()
    calls: list[str] = []

    def old() -> None:
        calls.append("old")

    def new() -> None:
        calls.append("new")

    auth.set_unknown_kid_listener("corp", old)
    auth.set_unknown_kid_listener("corp", new)
    auth.remove_unknown_kid_listener("corp", old)  # the old fetcher finishing late
    auth.authenticate(["corp"], bearer(mint(claims(), ec_key(), kid="x")), "", NOW)
    auth.remove_unknown_kid_listener("corp", new)
    auth.authenticate(["corp"], bearer(mint(claims(), ec_key(), kid="y")), "", NOW)
    assert calls == ["new"]


def test_policy_change_drops_cached_verdicts_and_moved_keys() -> None:
    auth = make()
    headers = bearer(mint(claims(), ec_key()))
    assert auth.authenticate(["corp"], headers, "", NOW).claims
    stricter = replace(CORP, audiences=("other",))
    auth.update(PolicyExtras(jwt_providers={"corp": stricter}))
    assert auth.authenticate(["corp"], headers, "", NOW).token_errors == {"corp": "bad_audience"}
    moved = replace(stricter, jwks_file="/elsewhere.json")
    auth.update(PolicyExtras(jwt_providers={"corp": moved}))
    assert auth.keys("corp") is None


def test_api_key() -> None:
    auth = make(api_keys=(ApiKey("billing", api_key_sha256("sk_good")),))
    assert auth.authenticate([], [(b"x-api-key", b"sk_good")], "", NOW).apikey == "billing"
    assert auth.authenticate([], [(b"x-api-key", b"sk_bad")], "", NOW).apikey is None
    two = [(b"x-api-key", b"sk_good"), (b"x-api-key", b"sk_good")]
    assert auth.authenticate([], two, "", NOW).apikey is None
    assert auth.statistics(NOW)["apikeys"] == {"accepted": 1, "refused": 2}


def test_forward_headers_from_claims() -> None:
    auth = make()
    token = mint(claims(groups=["a", "b"]), ec_key())
    facts = auth.authenticate(["corp"], bearer(token), "", NOW)
    assert auth.forward_headers(facts) == [(b"x-user", b"alice"), (b"x-groups", b'["a","b"]')]
    assert auth.owned_headers == frozenset({b"x-user", b"x-groups"})


def test_claim_header_values_cannot_inject() -> None:
    assert claim_header_value("a\r\nx-admin: 1") == b'"a\\r\\nx-admin: 1"'
    assert claim_header_value("Zoë") == b'"Zo\\u00eb"'
    assert claim_header_value(42) == b"42"
    assert claim_header_value("x" * 5000) is None


@pytest.mark.parametrize("text", ["[" * 4000, "[" * 2000 + "]" * 2000,
                                  "[" * 1200 + "1" + "]" * 1200, " [" * 1500])
def test_a_claim_nested_past_the_parser_is_sent_as_json(text: str) -> None:
    # A string claim nested deeper than json's recursion limit (a display name the user
    # chose, signed by the issuer) raised RecursionError on the data path; it is a string
    # that a lenient reader may take for JSON, so it goes as JSON, like "true" or "[1]".
    assert claim_header_value(text) == json.dumps(text).encode()


def test_strip_credentials() -> None:
    auth = Authenticator(PolicyExtras(jwt_providers={
        "corp": replace(CORP, forward_token=False)}))
    headers = [(b"authorization", b"Bearer t"), (b"x-api-key", b"sk"), (b"accept", b"*/*")]
    assert auth.strip_credentials(headers, "q=1") == ([(b"accept", b"*/*")], "q=1")
    keep = make()
    assert keep.strip_credentials(headers, "") == ([headers[0], headers[2]], "")


def test_www_authenticate_values() -> None:
    assert www_authenticate("token_missing") == b'Bearer realm="sidecar"'
    assert www_authenticate("token_invalid") == b'Bearer realm="sidecar", error="invalid_token"'
    assert www_authenticate("claims_mismatch").endswith(b'error="insufficient_scope"')
    assert www_authenticate("denied_by_rule") is None


def test_rs256_and_es256_providers_side_by_side() -> None:
    other = provider(name="partner", issuer="https://partner/", algorithms=("RS256",))
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": CORP, "partner": other}))
    auth.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    auth.set_keys("partner", parse_jwks(jwks_bytes(jwk(rsa_key(), "r")), "p"), NOW - 30)
    token = mint(claims(iss="https://partner/"), rsa_key(), "RS256", "r")
    facts = auth.authenticate(["corp", "partner"], bearer(token), "", NOW)
    assert facts.token_errors == {"corp": "bad_issuer"} and "partner" in facts.claims
    assert auth.statistics(NOW)["providers"]["partner"]["key_set_age_seconds"] == 30
