"""parse_jwks (what keys are usable) and the pure refresh schedule (the kid-storm bound)."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.authn.jwks import (
    EMPTY_KEY_SET,
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
    with pytest.raises(ConfigError, match="no usable signature key"):
        parse_jwks(jwks_bytes(oct_key), "t")


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


def test_key_set_age() -> None:
    assert key_set_age(None, 10) is None
    assert key_set_age(100, 160) == 60
