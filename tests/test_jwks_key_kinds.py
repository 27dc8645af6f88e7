"""Which JWKs a key set's parser uses, skips or refuses, by kind, found by a hostile review.

Support was decided after PyJWT had parsed a key, and PyJWT refuses any curve it does not
know ("Invalid curve"): one X25519, X448 or brainpool key made the whole set refused, so
once keys were loaded every later rotation was ignored (the removed key stayed trusted, the
new one was refused). Now an allowlist of (kty, crv) is read from the JWK's own members
first; any other kind is skipped and logged (``jwks_key_skipped``), and "does not load" is
fatal only for a kind the product supports.

The family as data: every key type and curve of the IANA JOSE registries (RSA; EC P-256,
P-384, P-521, secp256k1 and the brainpool curves; OKP Ed25519, Ed448, X25519, X448; oct;
a type nobody knows), next to a good key, through ``parse_jwks``; and a rotation to a set
holding an X25519 key through a real sidecar.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, x448, x25519

from tests import harness as h
from tests.orders_mesh import orders_mesh
from tests.test_authn_jwks import check_next_to_a_good_key
from tests.test_authn_support import b64, ec_key, jwk, mint, rsa_key

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def _ec(curve: ec.EllipticCurve, crv: str) -> dict[str, Any]:
    numbers = ec.generate_private_key(curve).public_key().public_numbers()
    size = (curve.key_size + 7) // 8
    return {"kty": "EC", "crv": crv, "kid": "k", "x": b64(numbers.x.to_bytes(size, "big")),
            "y": b64(numbers.y.to_bytes(size, "big"))}


def _okp(private: Any, crv: str) -> dict[str, Any]:
    return {"kty": "OKP", "crv": crv, "kid": "k",
            "x": b64(private.public_key().public_bytes_raw())}


# name -> (the JWK, what happens to it: "usable", "skipped" -- the set loads without it --
# or "refused" -- the whole set is refused, the last good set stays).
KINDS: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "RSA": (lambda: jwk(rsa_key(), "k"), "usable"),
    "EC P-256": (lambda: _ec(ec.SECP256R1(), "P-256"), "usable"),
    "EC P-384": (lambda: _ec(ec.SECP384R1(), "P-384"), "usable"),
    "EC P-521": (lambda: _ec(ec.SECP521R1(), "P-521"), "usable"),
    "EC secp256k1": (lambda: _ec(ec.SECP256K1(), "secp256k1"), "skipped"),
    "EC BP-256": (lambda: _ec(ec.BrainpoolP256R1(), "BP-256"), "skipped"),
    "EC BP-384": (lambda: _ec(ec.BrainpoolP384R1(), "BP-384"), "skipped"),
    "EC BP-512": (lambda: _ec(ec.BrainpoolP512R1(), "BP-512"), "skipped"),
    "EC brainpoolP256r1": (lambda: _ec(ec.BrainpoolP256R1(), "brainpoolP256r1"), "skipped"),
    "EC unknown curve": (lambda: {**_ec(ec.SECP256R1(), "P-256"), "crv": "P-999"}, "skipped"),
    "OKP Ed25519": (lambda: _okp(ed25519.Ed25519PrivateKey.generate(), "Ed25519"), "usable"),
    "OKP Ed448": (lambda: _okp(ed448.Ed448PrivateKey.generate(), "Ed448"), "usable"),
    "OKP X25519": (lambda: _okp(x25519.X25519PrivateKey.generate(), "X25519"), "skipped"),
    "OKP X448": (lambda: _okp(x448.X448PrivateKey.generate(), "X448"), "skipped"),
    "OKP X25519 marked sig": (lambda: {**_okp(x25519.X25519PrivateKey.generate(), "X25519"),
                                       "use": "sig", "alg": "EdDSA"}, "skipped"),
    "oct": (lambda: {"kty": "oct", "kid": "k", "k": "c2VjcmV0"}, "skipped"),
    "unknown kty": (lambda: {"kty": "AKP", "kid": "k", "alg": "ML-DSA-44", "pub": "AAAA"},
                    "skipped"),
    # Supported kinds that do not load stay fatal for the set.
    "EC P-256 without crv": (lambda: {k: v for k, v in _ec(ec.SECP256R1(), "P-256").items()
                                      if k != "crv"}, "refused"),
    "OKP Ed25519 of 31 bytes": (lambda: {**_okp(ed25519.Ed25519PrivateKey.generate(),
                                                "Ed25519"), "x": b64(b"\x01" * 31)}, "refused"),
    "EC P-384 named for a P-256 point": (lambda: {**_ec(ec.SECP256R1(), "P-256"),
                                                  "crv": "P-384"}, "refused"),
}


@pytest.mark.parametrize("name", KINDS)
def test_every_key_kind_next_to_a_good_key(name: str) -> None:
    build, expect = KINDS[name]
    check_next_to_a_good_key(build(), expect)


def _token(key: str, kid: str) -> str:
    now = int(time.time())
    return mint({"iss": "https://idp.example/", "aud": "orders", "sub": "alice",
                 "jti": uuid.uuid4().hex, "iat": now - 5, "exp": now + 600},
                ec_key(key), kid=kid)


def test_a_rotation_to_a_set_with_an_x25519_key_is_applied(tmp_path: Path) -> None:
    policy = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {"idp": {"issuer": "https://idp.example/", "audiences": ["orders"],
                                  "algorithms": ["ES256"], "jwks_file": "keys.json"}},
        "services": {h.spiffe("orders"): {"rules": [
            {"name": "api", "allow": {"from": [h.spiffe("frontend")], "paths": ["/api/**"],
                                      "jwt": {"provider": "idp"}}}]}},
    }
    old, new = _token("kinds-k1", "k1"), _token("kinds-k2", "k2")
    keys = {"keys": [jwk(ec_key("kinds-k1"), "k1")]}
    with orders_mesh(tmp_path, policy, {"keys.json": json.dumps(keys)}) as mesh:
        def status(token: str) -> int:
            return mesh.get("/api/x", {"authorization": f"Bearer {token}"}).status

        assert (status(old), status(new)) == (200, 401)
        x25519_key = {**_okp(x25519.X25519PrivateKey.generate(), "X25519"), "kid": "enc"}
        rotated = {"keys": [jwk(ec_key("kinds-k2"), "k2"), x25519_key]}
        h.replace_file(mesh.policy_dir / "keys.json", json.dumps(rotated))
        assert h.wait_for(lambda: status(new) == 200, timeout=15)
        assert status(old) == 401
        skipped = mesh.sidecar.log_events("jwks_key_skipped")
        assert skipped and "X25519" in json.dumps(skipped)
