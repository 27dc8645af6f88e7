"""ECDSA signatures are malleable: nothing that decides keys on a token's bytes.

For an ECDSA signature ``(r, s)`` over a message, ``(r, n - s)`` (n: the curve's order) is
a second valid signature of the same message by the same key. So whoever holds one ES256,
ES384 or ES512 token can make a second token string with the same header and claims, without
the key. The sidecar accepts both (as every JOSE library does: RFC 7518 3.4 does not ask for
"low-S" signatures, and identity providers do not normalise them, so refusing high-S would
refuse about half of all ES tokens).

What must hold instead, and what these tests pin down: the two strings are one credential.
Every decision that outlives a request keys on what the signature covers, never on the
signature: a revocation (by ``jti`` and by ``sub``, docs/policy.md) refuses both, the audit
record's token id (the SHA-256 of ``jti``) and the per-subject rate-limit key are the same
for both, and the decision is the same. The caches that key on the token string (verified
tokens, decisions) only cache what the token's own verification gave, so the twin is a cache
miss that verifies to the same claims. docs/authn.md, "ECDSA signature malleability".
"""

from __future__ import annotations

import base64
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.audit.record import hash_token_id
from sidecar.authn.authenticator import Authenticator
from sidecar.policy.sections import PolicyExtras, Revocation
from tests.test_authn_support import NOW, claims, jwk, jwks_bytes, provider

CURVES = {"ES256": (ec.SECP256R1(), 32), "ES384": (ec.SECP384R1(), 48),
          "ES512": (ec.SECP521R1(), 66)}
ORDERS = {
    "ES256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "ES384": int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
                 "581A0DB248B0A77AECEC196ACCC52973", 16),
    "ES512": int("01" + "F" * 64 + "FA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6F"
                 "B71E91386409", 16),
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def twin(token: str, alg: str) -> str:
    """The same token with its ECDSA signature (r, s) replaced by (r, n - s)."""
    head, body, sig = token.split(".")
    size = CURVES[alg][1]
    raw = _unb64(sig)
    r, s = raw[:size], int.from_bytes(raw[size:], "big")
    other = r + (ORDERS[alg] - s).to_bytes(size, "big")
    assert other != raw
    return f"{head}.{body}.{_b64(other)}"


def _auth(alg: str, key: Any, *revoked: Revocation) -> Authenticator:
    from sidecar.authn.jwks import parse_jwks

    auth = Authenticator(PolicyExtras(jwt_providers={"corp": provider(algorithms=(alg,))},
                                      revocations=revoked))
    auth.set_keys("corp", parse_jwks(jwks_bytes(jwk(key, "k")), "test"), NOW)
    return auth


def _facts(auth: Authenticator, token: str) -> Any:
    return auth.authenticate(["corp"], [(b"authorization", f"Bearer {token}".encode())], "",
                             NOW)


@pytest.mark.parametrize("alg", list(CURVES))
def test_the_twin_is_a_second_valid_token_with_the_same_claims(alg: str) -> None:
    key = ec.generate_private_key(CURVES[alg][0])
    token = pyjwt.encode(claims(), key, algorithm=alg, headers={"kid": "k"})
    other = twin(token, alg)
    auth = _auth(alg, key)
    first, second = _facts(auth, token), _facts(auth, other)
    assert first.token_errors == second.token_errors == {}
    assert dict(first.claims["corp"]) == dict(second.claims["corp"])
    # The audit record's token id and the per-subject rate-limit key (``sub``) are the
    # claims', not the string's.
    assert hash_token_id(first.claims["corp"]["jti"]) == hash_token_id(
        second.claims["corp"]["jti"])


@pytest.mark.parametrize("alg", list(CURVES))
@pytest.mark.parametrize("revocation", [Revocation(jti="t-1"), Revocation(sub="alice")],
                         ids=["by jti", "by sub"])
def test_a_revocation_refuses_the_twin_too(alg: str, revocation: Revocation) -> None:
    key = ec.generate_private_key(CURVES[alg][0])
    token = pyjwt.encode(claims(), key, algorithm=alg, headers={"kid": "k"})
    auth = _auth(alg, key, revocation)
    for presented in (token, twin(token, alg), token):  # cached or not, either string
        assert _facts(auth, presented).token_errors == {"corp": "revoked"}


@pytest.mark.parametrize("alg", list(CURVES))
def test_a_twin_of_a_refused_token_is_refused(alg: str) -> None:
    """Expired (or any claim-based refusal): the twin carries the same claims."""
    key = ec.generate_private_key(CURVES[alg][0])
    token = pyjwt.encode(claims(exp=int(NOW) - 3600, iat=int(NOW) - 7200), key,
                         algorithm=alg, headers={"kid": "k"})
    auth = _auth(alg, key)
    assert _facts(auth, token).token_errors == {"corp": "expired"}
    assert _facts(auth, twin(token, alg)).token_errors == {"corp": "expired"}
