"""parse_jwks (what keys are usable) and the pure refresh schedule (the kid-storm bound)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.authn.jwks import (
    BACKOFF_JITTER,
    EMPTY_KEY_SET,
    REFRESH_JITTER,
    initial_refresh_state,
    key_set_age,
    next_fetch_at,
    on_fetch_failed,
    on_fetch_started,
    on_fetch_succeeded,
    on_unknown_kid,
    parse_jwks,
)
from sidecar.errors import ConfigError
from tests.test_authn_support import ec_key, jwk, jwks_bytes, rsa_key


def test_parses_rsa_and_ec_keys_by_kid() -> None:
    keys = parse_jwks(jwks_bytes(jwk(rsa_key(), "r"), jwk(ec_key(), "e")), "corp.json")
    assert set(keys.by_kid) == {"r", "e"} and len(keys) == 2
    assert keys.find("r", "RS256") is not None and keys.find("r", "ES256") is None
    assert keys.find("e", "ES256") is not None and keys.find("e", "ES384") is None  # curve
    assert keys.find("missing", "ES256") is None


def test_oct_keys_are_never_used() -> None:
    oct_key = {"kty": "oct", "kid": "h", "k": "c2VjcmV0"}
    keys = parse_jwks(jwks_bytes(oct_key, jwk(ec_key(), "e")), "t")
    assert "h" not in keys.by_kid and any("oct" in s for s in keys.skipped)
    # A set of nothing usable is a withdrawal, applied (the provider has no keys).
    only_oct = parse_jwks(jwks_bytes(oct_key), "t")
    assert only_oct.withdrawn and len(only_oct) == 0 and len(only_oct.skipped) == 1


def test_private_key_material_refuses_the_whole_set() -> None:
    private = jwk(ec_key(), "e")
    private["d"] = "AAAA"
    with pytest.raises(ConfigError, match="private key material"):
        parse_jwks(jwks_bytes(private, jwk(rsa_key(), "r")), "t")


def test_encryption_and_weak_keys_are_skipped() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    keys = parse_jwks(jwks_bytes(jwk(rsa_key(), "enc", use="enc"), jwk(weak, "weak"),
                                 jwk(ec_key(), "ok")), "t")
    assert set(keys.by_kid) == {"ok"} and len(keys.skipped) == 2


@pytest.mark.parametrize("data, message", [
    (b"not json", "not valid JSON"),
    (b"[]", "'keys' list"),
    (b'{"keys": {}}', "'keys' list"),
    (b'{"keys": [1]}', "JSON object"),
    (b'{"keys": [{"kty": "EC", "kid": "e", "crv": "P-256", "x": "AA", "y": "AA"}]}', "invalid EC"),
    (b" " * (1024 * 1024 + 1), "larger than"),
])
def test_bad_documents_give_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_jwks(data, "corp.json")
    assert info.value.problems[0].file == "corp.json"


def test_duplicate_kid_is_an_error() -> None:
    with pytest.raises(ConfigError, match="duplicate kid"):
        parse_jwks(jwks_bytes(jwk(ec_key(), "e"), jwk(ec_key("ec-2"), "e")), "t")


def test_fingerprint_tells_rotation_from_refresh() -> None:
    a = parse_jwks(jwks_bytes(jwk(ec_key(), "e")), "t")
    same = parse_jwks(json.dumps({"keys": [jwk(ec_key(), "e")]}, indent=2).encode(), "t")
    grown = parse_jwks(jwks_bytes(jwk(ec_key(), "e"), jwk(rsa_key(), "r")), "t")
    swapped = parse_jwks(jwks_bytes(jwk(ec_key("ec-2"), "e")), "t")
    assert a.fingerprint() == same.fingerprint()
    assert a.fingerprint() <= grown.fingerprint()
    assert not a.fingerprint() <= swapped.fingerprint()
    assert len(EMPTY_KEY_SET) == 0


def test_schedule_fetches_at_once_then_every_refresh_interval() -> None:
    s = initial_refresh_state(300, 30)
    assert next_fetch_at(s, 1000) == 1000
    s = on_fetch_succeeded(on_fetch_started(s, 1000), 1001)
    assert next_fetch_at(s, 1001) == 1300


def test_schedule_backs_off_after_failures_capped_at_refresh() -> None:
    s = initial_refresh_state(10, 30)
    dues = []
    t = 0.0
    for _ in range(6):
        s = on_fetch_failed(on_fetch_started(s, t), t)
        dues.append(next_fetch_at(s, t) - t)
    assert dues == [1, 2, 4, 8, 10, 10]
    s = on_fetch_succeeded(on_fetch_started(s, t), t)
    assert next_fetch_at(s, t) == t + 10


def test_kid_storm_causes_at_most_one_fetch_per_interval() -> None:
    s = on_fetch_succeeded(on_fetch_started(initial_refresh_state(300, 30), 0), 0)
    fetches = 0
    now = 0.0
    for _ in range(10_000):  # one random kid every 10 ms for 100 s
        now += 0.01
        s, fetch = on_unknown_kid(s, now)
        if fetch:
            fetches += 1
            s = on_fetch_succeeded(on_fetch_started(s, now), now)
    assert fetches == 3  # at 30, 60 and 90 s
    assert s.unknown_kid_fetches == 3


def test_unknown_kid_inside_quiet_interval_is_served_when_it_ends() -> None:
    s = on_fetch_succeeded(on_fetch_started(initial_refresh_state(300, 30), 0), 0)
    s, fetch = on_unknown_kid(s, 5)
    assert not fetch and s.pending_unknown_kid
    assert next_fetch_at(s, 5) == 30
    s = on_fetch_started(s, 30)
    assert not s.pending_unknown_kid and next_fetch_at(s, 30) == 330


def _fleet_dues(rng: random.Random, sidecars: int, *, fail: bool) -> list[float]:
    """When each of ``sidecars`` sidecars that all fetched at t=0 fetches next."""
    dues = []
    for _ in range(sidecars):
        s = on_fetch_started(initial_refresh_state(300, 30), 0, rng.random())
        s = on_fetch_failed(s, 0) if fail else on_fetch_succeeded(s, 0)
        dues.append(next_fetch_at(s, 0))
    return dues


def test_refresh_jitter_spreads_a_fleet_that_fetched_together() -> None:
    # A rollout: 200 sidecars fetched at the same instant. Without jitter all would come back
    # at t=300 together; with it they spread over [240, 300], never later than the interval.
    dues = _fleet_dues(random.Random(14), 200, fail=False)
    assert all(300 * (1 - REFRESH_JITTER) <= d <= 300 for d in dues)
    assert len({round(d, 3) for d in dues}) > 150
    assert max(dues) - min(dues) > 0.8 * 300 * REFRESH_JITTER
    # no second of the window gets more than a small share of the fleet
    per_second: dict[int, int] = {}
    for d in dues:
        per_second[int(d)] = per_second.get(int(d), 0) + 1
    assert max(per_second.values()) <= 15
    # the same seed gives the same schedule: the randomness is the caller's, not hidden state
    assert dues == _fleet_dues(random.Random(14), 200, fail=False)


def test_backoff_jitter_spreads_retries_after_an_outage_and_keeps_the_cap() -> None:
    # The identity provider was down for everyone: the retries must not land together either.
    dues = _fleet_dues(random.Random(7), 200, fail=True)
    assert all(1 - BACKOFF_JITTER <= d <= 1 for d in dues)
    assert len({round(d, 4) for d in dues}) > 150
    s = initial_refresh_state(10, 30)
    for _ in range(8):
        s = on_fetch_failed(on_fetch_started(s, 0, 0.999), 0)
    # deep in backoff, capped at refresh: jitter only ever shortens the cap
    assert next_fetch_at(s, 0) == pytest.approx(10 * (1 - BACKOFF_JITTER * 0.999))


@pytest.mark.parametrize("draw, due", [(0.0, 300.0), (0.5, 270.0), (-3.0, 300.0),
                                       (7.0, 240.0)])
def test_refresh_jitter_draw_bounds(draw: float, due: float) -> None:
    s = on_fetch_succeeded(on_fetch_started(initial_refresh_state(300, 30), 0, draw), 0)
    assert next_fetch_at(s, 0) == pytest.approx(due, abs=1e-3)


def test_unknown_kid_bound_is_not_jittered() -> None:
    s = on_fetch_succeeded(on_fetch_started(initial_refresh_state(300, 30), 0, 0.9), 0)
    s, fetch = on_unknown_kid(s, 5)
    assert not fetch and next_fetch_at(s, 5) == 30  # min_refetch exactly, not earlier
    s, fetch = on_unknown_kid(s, 29.99)
    assert not fetch


def test_key_set_age() -> None:
    assert key_set_age(None, 10) is None
    assert key_set_age(100, 160) == 60


# --- hostile key contents, as data (found by a hostile review) ---------------------------------
#
# Each member is one JWK a hostile or broken identity provider could publish, next to a good
# key. "usable": the key verifies; "skipped": the key is never used, the set still loads (and
# says why in ``skipped``); "refused": the whole set is refused (the last good set stays).
# Before the review: a non-string ``alg`` raised TypeError, RSA exponent 3, exponents of
# hundreds of bits and moduli past 16384 bits were used, an ``alg`` that can never fit the
# key and an ``x5c`` naming another key were accepted silently.


def _x5c_cert(private_key: Any, *, issuer_key: Any = None, subject: str = "idp",
              issuer: str | None = None) -> str:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
            .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(issuer_key or private_key, hashes.SHA256()))
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


def _thumbprint(cert_b64: str, digest: Any) -> str:
    return base64.urlsafe_b64encode(digest(base64.b64decode(cert_b64)).digest()).rstrip(
        b"=").decode()


def _rsa_numbers(e: int, n: int | None = None) -> dict[str, Any]:
    from tests.test_authn_support import b64

    n = n if n is not None else rsa_key().public_key().public_numbers().n

    def enc(value: int) -> str:
        return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

    return {"kty": "RSA", "kid": "k", "n": enc(n), "e": enc(e)}


def _ec_with(**members: Any) -> dict[str, Any]:
    return {**jwk(ec_key("other"), "k"), **members}


def _wide_modulus(bits: int) -> int:
    return (1 << (bits - 1)) | random.Random(bits).getrandbits(bits - 1) | 1


def _family() -> dict[str, tuple[Callable[[], dict[str, Any]], str]]:
    ca = ec_key("x5c-ca")
    leaf = ec_key("other")
    good_cert = _x5c_cert(leaf)
    chained = _x5c_cert(leaf, issuer_key=ca, issuer="ca")
    return {
        # types of the members the parser reads
        "alg is a list": (lambda: _ec_with(alg=["ES256"]), "refused"),
        "alg is an object": (lambda: _ec_with(alg={"ES256": 1}), "refused"),
        "alg is null": (lambda: _ec_with(alg=None), "refused"),
        "use is a list": (lambda: _ec_with(use=["sig"]), "refused"),
        "kty is a number": (lambda: _ec_with(kty=2), "refused"),
        "crv is a list": (lambda: _ec_with(crv=["P-256"]), "refused"),
        "kid is a number": (lambda: _ec_with(kid=7), "refused"),
        # algorithms that are no signature, or do not fit the key
        "alg none": (lambda: _ec_with(alg="none"), "skipped"),
        "alg HS256": (lambda: _ec_with(alg="HS256"), "skipped"),
        "alg ES384 on a P-256 key": (lambda: _ec_with(alg="ES384"), "skipped"),
        "alg RS256 on an EC key": (lambda: _ec_with(alg="RS256"), "skipped"),
        "alg ES256 on an RSA key": (lambda: jwk(rsa_key("other"), "k", alg="ES256"), "skipped"),
        "alg ES256 on a P-256 key": (lambda: _ec_with(alg="ES256"), "usable"),
        # symmetric and encryption keys
        "oct key": (lambda: {"kty": "oct", "kid": "k", "k": "c2VjcmV0"}, "skipped"),
        "oct key with alg none": (lambda: {"kty": "oct", "kid": "k", "k": "", "alg": "none"},
                                  "skipped"),
        "use enc": (lambda: _ec_with(use="enc"), "skipped"),
        "key_ops encrypt only": (lambda: _ec_with(key_ops=["encrypt"]), "skipped"),
        # RSA size and exponent
        "RSA 1024 bits": (lambda: jwk(rsa.generate_private_key(65537, 1024), "k"), "skipped"),
        "RSA exponent 1": (lambda: _rsa_numbers(1), "refused"),
        "RSA exponent 3": (lambda: _rsa_numbers(3), "skipped"),
        "RSA exponent 65535": (lambda: _rsa_numbers(65535), "skipped"),
        "RSA exponent 2^256 + 1": (lambda: _rsa_numbers((1 << 256) + 1), "skipped"),
        "RSA exponent 65537": (lambda: _rsa_numbers(65537), "usable"),
        "RSA modulus of 20000 bits": (lambda: _rsa_numbers(65537, _wide_modulus(20000)),
                                      "skipped"),
        "RSA even modulus": (lambda: _rsa_numbers(65537, _wide_modulus(2048) - 1), "skipped"),
        # EC points and curves
        "EC point off the curve": (lambda: _ec_with(
            y=jwk(ec_key("third"), "k")["y"]), "refused"),
        "EC P-256 point named P-384": (lambda: _ec_with(crv="P-384"), "refused"),
        "EC secp256k1": (lambda: jwk(ec.generate_private_key(ec.SECP256K1()), "k"), "skipped"),
        # x5c must not contradict the key (RFC 7517 4.7-4.9)
        "x5c of the key": (lambda: _ec_with(x5c=[good_cert]), "usable"),
        "x5c with matching thumbprints": (lambda: _ec_with(
            x5c=[good_cert], x5t=_thumbprint(good_cert, hashlib.sha1),
            **{"x5t#S256": _thumbprint(good_cert, hashlib.sha256)}), "usable"),
        "x5c chain issued in order": (lambda: _ec_with(
            x5c=[chained, _x5c_cert(ca, subject="ca")]), "usable"),
        "x5c of another key": (lambda: _ec_with(x5c=[_x5c_cert(ec_key("third"))]), "skipped"),
        "x5c chain out of order": (lambda: _ec_with(
            x5c=[chained, _x5c_cert(ec_key("third"), subject="ca")]), "skipped"),
        "x5c not a list": (lambda: _ec_with(x5c=good_cert), "skipped"),
        "x5c empty": (lambda: _ec_with(x5c=[]), "skipped"),
        "x5c not base64": (lambda: _ec_with(x5c=["%%%"]), "skipped"),
        "x5c base64url, not base64": (lambda: _ec_with(
            x5c=[good_cert.replace("+", "-").replace("/", "_") + "-_"]), "skipped"),
        "x5c not a certificate": (lambda: _ec_with(x5c=[base64.b64encode(b"junk").decode()]),
                                  "skipped"),
        "x5c of 11 certificates": (lambda: _ec_with(x5c=[good_cert] * 11), "skipped"),
        "x5t of another certificate": (lambda: _ec_with(
            x5c=[good_cert], x5t=_thumbprint(chained, hashlib.sha1)), "skipped"),
        "x5t#S256 of another certificate": (lambda: _ec_with(
            x5c=[good_cert], **{"x5t#S256": _thumbprint(chained, hashlib.sha256)}), "skipped"),
    }


FAMILY = _family()


@pytest.mark.parametrize("name", FAMILY)
def test_hostile_key_contents(name: str) -> None:
    build, expect = FAMILY[name]
    check_next_to_a_good_key(build(), expect)


def check_next_to_a_good_key(key: dict[str, Any], expect: str) -> None:
    """``key`` next to a good one: the set is refused whole, or loads with ``key`` usable
    or skipped (then said why, once)."""
    data = jwks_bytes(key, jwk(ec_key(), "good"))
    if expect == "refused":
        with pytest.raises(ConfigError):
            parse_jwks(data, "t")
        return
    keys = parse_jwks(data, "t")
    assert "good" in keys.by_kid
    if expect == "usable":
        assert "k" in keys.by_kid
    else:
        assert "k" not in keys.by_kid and len(keys.skipped) == 1, keys.skipped


def test_a_key_of_another_provider_with_the_same_kid_does_not_verify() -> None:
    from sidecar.authn.authenticator import Authenticator
    from sidecar.policy.sections import PolicyExtras
    from tests.test_authn_support import NOW, claims, mint, provider

    corp = provider(name="corp")
    partner = provider(name="partner", issuer="https://partner.example/")
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": corp, "partner": partner}))
    auth.set_keys("corp", parse_jwks(jwks_bytes(jwk(ec_key("corp"), "shared")), "c"), NOW)
    auth.set_keys("partner", parse_jwks(jwks_bytes(jwk(ec_key("partner"), "shared")), "p"), NOW)
    headers = [(b"authorization", b"Bearer " + mint(claims(), ec_key("partner"),
                                                     kid="shared").encode())]
    facts = auth.authenticate(["corp"], headers, "", NOW)
    assert "corp" in facts.token_errors
    own = [(b"authorization", b"Bearer " + mint(claims(), ec_key("corp"), kid="shared").encode())]
    assert not auth.authenticate(["corp"], own, "", NOW).token_errors
