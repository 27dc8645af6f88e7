"""parse_jwks (what keys are usable) and the pure refresh schedule (the kid-storm bound)."""

from __future__ import annotations

import json
import random

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

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
