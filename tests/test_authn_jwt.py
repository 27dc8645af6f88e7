"""verify_token: the happy paths and each classic attack on its own."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.authn.jwks import parse_jwks
from sidecar.authn.jwt import MAX_NUMERIC_DATE, TokenInvalid, verify_token
from tests.jwt_claim_family import MEMBER_IDS, MEMBERS, payload_text, sign_raw
from tests.test_authn_support import (
    AUDIENCE,
    NOW,
    b64,
    claims,
    ec_key,
    jwk,
    jwks_bytes,
    key_set,
    mint,
    provider,
    rsa_key,
)

KEYS = key_set((ec_key(), "ec-1"), (rsa_key(), "rsa-1"))
CORP = provider()


def reason(token: str, keys=KEYS, prov=CORP, now: float = NOW) -> str:
    with pytest.raises(TokenInvalid) as info:
        verify_token(token, prov, keys, now)
    assert info.value.status == 401
    return info.value.reason


def test_es256_happy_path() -> None:
    token = mint(claims(scope="orders:read"), ec_key(), "ES256", "ec-1")
    got = verify_token(token, CORP, KEYS, NOW)
    assert got["sub"] == "alice" and got["scope"] == "orders:read"


def test_rs256_happy_path() -> None:
    token = mint(claims(), rsa_key(), "RS256", "rsa-1")
    assert verify_token(token, CORP, KEYS, NOW)["iss"] == CORP.issuer


def test_audience_list_with_one_match_is_accepted() -> None:
    token = mint(claims(aud=["other", AUDIENCE]), ec_key())
    assert verify_token(token, CORP, KEYS, NOW)["aud"] == ["other", AUDIENCE]


def _unsigned(header: dict, payload: dict, signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()),
                     b64(signature)])


def test_alg_none_is_refused_even_if_allowlisted() -> None:
    token = _unsigned({"alg": "none", "kid": "ec-1"}, claims())
    assert reason(token) == "bad_alg"
    assert reason(token, prov=provider(algorithms=("none", "ES256"))) == "bad_alg"


def test_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    pem = rsa_key().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims()).encode())
    sig = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64(sig)}"
    assert reason(token) == "bad_alg"
    assert reason(token, prov=provider(algorithms=("HS256", "RS256"))) == "bad_alg"


def test_alg_not_in_provider_allowlist_is_refused() -> None:
    token = mint(claims(), rsa_key(), "RS256", "rsa-1")
    assert reason(token, prov=provider(algorithms=("ES256",))) == "bad_alg"


def test_rs_key_cannot_verify_an_es_token() -> None:
    token = mint(claims(), ec_key(), "ES256", "rsa-1")  # kid points at the RSA key
    assert reason(token) == "bad_alg"


def test_unknown_kid() -> None:
    assert reason(mint(claims(), ec_key(), kid="nope")) == "unknown_kid"


def test_expired_beyond_skew() -> None:
    token = mint(claims(exp=int(NOW) - 31), ec_key())
    assert reason(token) == "expired"
    # inside the skew it still counts
    assert verify_token(mint(claims(exp=int(NOW) - 29), ec_key()), CORP, KEYS, NOW)


def test_not_yet_valid() -> None:
    assert reason(mint(claims(nbf=int(NOW) + 120), ec_key())) == "not_yet_valid"
    assert reason(mint(claims(iat=int(NOW) + 120), ec_key())) == "not_yet_valid"


def test_wrong_issuer() -> None:
    assert reason(mint(claims(iss="https://evil.example/"), ec_key())) == "bad_issuer"


def test_wrong_audience() -> None:
    assert reason(mint(claims(aud="other-api"), ec_key())) == "bad_audience"
    assert reason(mint(claims(aud=None), ec_key())) == "bad_audience"


def test_tampered_payload() -> None:
    token = mint(claims(sub="alice"), ec_key())
    header, _, sig = token.split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    assert reason(f"{header}.{forged}.{sig}") == "bad_signature"


def test_tampered_signature() -> None:
    token = mint(claims(), rsa_key(), "RS256", "rsa-1")
    header, payload, sig = token.split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert reason(f"{header}.{payload}.{flipped}") == "bad_signature"
    assert reason(f"{header}.{payload}.") == "bad_signature"


def test_oversized_token_refused_before_parsing() -> None:
    token = "x" * 9000  # not even a JWT: the size check comes first
    assert reason(token) == "too_large"
    big = mint(claims(pad="p" * 600), ec_key())
    assert reason(big, prov=provider(max_token_bytes=500)) == "too_large"


def test_malformed_base64() -> None:
    token = mint(claims(), ec_key())
    header, payload, sig = token.split(".")
    assert reason(f"{header}.{payload[:-1]}!.{sig}") == "malformed"  # bad alphabet
    assert reason(f"{header}.A.{sig}") == "malformed"  # impossible length
    assert reason("onlyone") == "malformed"
    assert reason("a.b.c.d") == "malformed"
    assert reason("é.b.c") == "malformed"


def test_malformed_json() -> None:
    sig = b64(b"sig")
    assert reason(f"{b64(b'{not json')}.{b64(b'{}')}.{sig}") == "malformed"
    header = b64(json.dumps({"alg": "ES256", "kid": "ec-1"}).encode())
    assert reason(f"{header}.{b64(b'[1,2]')}.{sig}") == "malformed"
    dup = b'{"iss":"x","iss":"' + claims()["iss"].encode() + b'"}'
    assert reason(f"{header}.{b64(dup)}.{sig}") == "malformed"


def test_crit_header_is_refused() -> None:
    token = mint(claims(), ec_key(), crit=["exp"])
    assert reason(token) == "bad_header"


@pytest.mark.parametrize("member", ["jku", "x5u"])
def test_key_url_headers_are_ignored(member: str) -> None:
    attacker = ec_key("attacker")
    # Signed by the attacker, pointing at the attacker's key set: must not verify.
    forged = mint(claims(), attacker, kid="ec-1", **{member: "https://evil.example/jwks"})
    assert reason(forged) == "bad_signature"
    # A genuine token carrying the header still verifies with our keys (never fetched).
    genuine = mint(claims(), ec_key(), kid="ec-1", **{member: "https://evil.example/jwks"})
    assert verify_token(genuine, CORP, KEYS, NOW)["sub"] == "alice"


def test_embedded_jwk_header_is_ignored() -> None:
    attacker = ec_key("attacker")
    forged = mint(claims(), attacker, kid="ec-1", jwk=jwk(attacker, "ec-1"))
    assert reason(forged) == "bad_signature"
    forged_nokid = mint(claims(), attacker, kid=None, jwk=jwk(attacker, None),
                        x5c=["MIIB..."])
    assert reason(forged_nokid, keys=key_set((ec_key(), "ec-1"))) == "bad_signature"


def test_missing_required_claim() -> None:
    assert reason(mint(claims(exp=None), ec_key())) == "missing_claim"
    strict = provider(required_claims=("exp", "sub"))
    assert reason(mint(claims(sub=None), ec_key()), prov=strict) == "missing_claim"


@pytest.mark.parametrize(("claim", "label", "text"), MEMBERS, ids=MEMBER_IDS)
def test_every_malformed_registered_claim_is_an_invalid_token(claim: str, label: str,
                                                              text: str) -> None:
    # The family (tests/jwt_claim_family.py): a registered claim of the wrong JSON type or
    # out of range is refused with 401, whatever the provider requires; never read as absent
    # and never an exception other than TokenInvalid.
    token = sign_raw(payload_text(claims(), claim, text), ec_key())
    for prov in (CORP, provider(required_claims=("exp", "nbf", "iat", "sub", "jti"))):
        assert reason(token, prov=prov) in ("bad_claim", "malformed")


def test_the_family_members_are_refused_for_their_value_alone() -> None:
    # The same token with a valid value for the claim verifies: the family tests the value.
    for claim, valid in (("exp", int(NOW) + 60), ("nbf", int(NOW) - 60), ("iat", int(NOW)),
                         ("iss", CORP.issuer), ("sub", "bob"), ("jti", "j-1"),
                         ("aud", [AUDIENCE])):
        token = sign_raw(payload_text(claims(), claim, json.dumps(valid)), ec_key())
        assert verify_token(token, CORP, KEYS, NOW)[claim] == valid


def test_null_required_claim_is_missing_not_absent_from_checks() -> None:
    # `exp: null` used to pass "required" (the key is there) and then never expire.
    token = sign_raw(payload_text(claims(), "exp", "null"), ec_key())
    assert reason(token) == "bad_claim"
    custom = provider(required_claims=("exp", "tenant"))
    token = sign_raw(payload_text(claims(), "tenant", "null"), ec_key())
    assert reason(token, prov=custom) == "missing_claim"


def test_numeric_date_bounds() -> None:
    assert verify_token(mint(claims(exp=MAX_NUMERIC_DATE), ec_key()), CORP, KEYS, NOW)
    assert reason(mint(claims(exp=MAX_NUMERIC_DATE + 1), ec_key())) == "bad_claim"
    assert reason(mint(claims(iat=-1), ec_key())) == "bad_claim"
    assert reason(mint(claims(exp=float(NOW) + 0.5, nbf=float(NOW) - 0.5), ec_key()),
                  now=NOW + 31) == "expired"


def test_max_lifetime() -> None:
    prov = provider(max_lifetime_seconds=300)
    assert reason(mint(claims(iat=int(NOW), exp=int(NOW) + 3600), ec_key()),
                  prov=prov) == "lifetime_too_long"
    ok = mint(claims(iat=int(NOW), exp=int(NOW) + 300), ec_key())
    assert verify_token(ok, prov, KEYS, NOW)


def test_token_without_kid_uses_the_only_fitting_key() -> None:
    token = mint(claims(), ec_key(), kid=None)
    assert verify_token(token, CORP, KEYS, NOW)["sub"] == "alice"
    two_ec = key_set((ec_key(), "ec-1"), (ec_key("ec-2"), "ec-2"))
    assert reason(token, keys=two_ec) == "unknown_kid"


def test_jwk_alg_pins_the_algorithm() -> None:
    keys = parse_jwks(jwks_bytes(jwk(rsa_key(), "rsa-1", alg="PS256")), "t")
    token = mint(claims(), rsa_key(), "RS256", "rsa-1")
    assert reason(token, keys=keys) == "bad_alg"


def test_empty_audience_list_accepts_nothing() -> None:
    assert reason(mint(claims(), ec_key()), prov=provider(audiences=())) == "bad_audience"
