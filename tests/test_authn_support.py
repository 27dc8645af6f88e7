"""Shared test material for the authn tests: keys, token minting, JWKS documents.

No tests here; the helpers are imported by tests/test_authn_*.py and tests/test_jwks_fetch.py.
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.authn.jwks import KeySet, parse_jwks
from sidecar.policy.sections import JwtProvider, TokenLocation

ISSUER = "https://login.example.com/"
AUDIENCE = "shop-api"
NOW = 1_700_000_000.0


def rsa_key(label: str = "rsa-1") -> rsa.RSAPrivateKey:
    """A 2048-bit RSA private key, one per label per test run."""
    return _private_key("rsa", label)  # type: ignore[return-value]


def ec_key(label: str = "ec-1") -> ec.EllipticCurvePrivateKey:
    """A P-256 private key, one per label per test run."""
    return _private_key("ec", label)  # type: ignore[return-value]


@functools.cache
def _private_key(kind: str, label: str) -> Any:
    # Cached on (kind, label) only, so ec_key() and ec_key("ec-1") are the same key.
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def jwk(private_key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    """The public JWK of ``private_key``."""
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        out: dict[str, Any] = pyjwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        out = pyjwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        out["kid"] = kid
    out.update(extra)
    return out


def jwks_bytes(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def key_set(*pairs: tuple[Any, str | None]) -> KeySet:
    """A KeySet from (private key, kid) pairs."""
    return parse_jwks(jwks_bytes(*(jwk(k, kid) for k, kid in pairs)), "test")


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims at NOW, with overrides (a value of None removes the claim)."""
    out: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "jti": "t-1",
        "iat": int(NOW) - 10, "exp": int(NOW) + 600,
    }
    return overridden(out, overrides)


def overridden(out: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``out`` with ``overrides`` set in it (a value of None removes the claim); returned."""
    for name, value in overrides.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def mint(payload: dict[str, Any], key: Any, alg: str = "ES256", kid: str | None = "ec-1",
         **header: Any) -> str:
    """A signed token; extra header members go in ``header``."""
    headers = dict(header)
    if kid is not None:
        headers["kid"] = kid
    return pyjwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def provider(**overrides: Any) -> JwtProvider:
    """A provider named "corp" accepting ES256 and RS256 tokens of ISSUER for AUDIENCE."""
    values: dict[str, Any] = dict(
        name="corp", issuer=ISSUER, audiences=(AUDIENCE,), algorithms=("ES256", "RS256"),
        jwks_file="/dev/null",
    )
    values.update(overrides)
    return JwtProvider(**values)


QUERY_LOCATION = TokenLocation("query", "access_token")
COOKIE_LOCATION = TokenLocation("cookie", "session")
