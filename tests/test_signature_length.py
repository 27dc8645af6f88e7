"""A JWS signature is exactly as long as its key makes it (RFC 8017 8.1.2 and 8.2.2, step 1;
RFC 7518 3.4; RFC 8032), for every algorithm a provider can allow.

Found by a hostile review: OpenSSL's PSS verification zero-extends a short signature, so a
PS256/384/512 token whose signature starts with a zero byte (one in 256) verified with that
byte dropped too: a second spelling of one token, made without the key, verified and cached
anew and handed to the app as another token. ``jwt.signature_length`` is checked for every
family before a key sees the signature. The family here: every algorithm x every way of
changing the signature's length (its leading zero dropped, a zero byte before or after it,
its last byte cut), in process; and the dropped zero through a real sidecar.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sidecar.authn.jwks import parse_jwks
from sidecar.authn.jwt import TokenInvalid, signature_length, verify_token
from tests.harness import Pki, start_app
from tests.test_authn_support import ISSUER, NOW, b64, claims, provider
from tests.test_jwt_e2e import claims as live_claims
from tests.test_jwt_e2e import jwt_rule, policy_doc, provider_doc, start_node

# alg -> (kid, how its key is made)
KEYS: dict[str, tuple[str, Callable[[], Any]]] = {
    "RS256": ("rsa", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "RS384": ("rsa", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "RS512": ("rsa", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "PS256": ("rsa", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "PS384": ("rsa3k", lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072)),
    "PS512": ("rsa3k", lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072)),
    "ES256": ("p256", lambda: ec.generate_private_key(ec.SECP256R1())),
    "ES384": ("p384", lambda: ec.generate_private_key(ec.SECP384R1())),
    "ES512": ("p521", lambda: ec.generate_private_key(ec.SECP521R1())),
    "EdDSA": ("ed25519", ed25519.Ed25519PrivateKey.generate),
    "EdDSA-448": ("ed448", ed448.Ed448PrivateKey.generate),
}
LENGTHS = {"rsa": 256, "rsa3k": 384, "p256": 64, "p384": 96, "p521": 132, "ed25519": 64,
           "ed448": 114}


@cache
def _key(kid: str) -> Any:
    return next(make for k, make in KEYS.values() if k == kid)()


def _jwk(kid: str) -> dict[str, Any]:
    public = _key(kid).public_key()
    if isinstance(public, rsa.RSAPublicKey):
        out = pyjwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        out = pyjwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        out = pyjwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**out, "kid": kid}


def _jwks() -> bytes:
    return json.dumps({"keys": [_jwk(k) for k in sorted({k for k, _ in KEYS.values()})]}
                      ).encode()


def _alg(name: str) -> str:
    return name.split("-")[0]


def _split(token: str) -> tuple[str, bytes]:
    head, _, sig = token.rpartition(".")
    return head, pyjwt.utils.base64url_decode(sig)


def _with(head: str, signature: bytes) -> str:
    return f"{head}.{b64(signature)}"


def _leading_zero(name: str, payload: Callable[[], dict[str, Any]]) -> tuple[str, bytes]:
    """A token of ``name`` whose signature starts with a zero byte (new claims until one
    does: one in 256 for most keys; bounded)."""
    kid = KEYS[name][0]
    for _ in range(20_000):
        token = pyjwt.encode({**payload(), "jti": uuid.uuid4().hex}, _key(kid),
                             algorithm=_alg(name), headers={"kid": kid})
        head, sig = _split(token)
        if sig[0] == 0:
            return head, sig
    raise AssertionError(f"no {name} signature with a leading zero byte in 20,000")


# How the length is changed: each gives the signature to send from the right one.
CHANGES: dict[str, Callable[[bytes], bytes]] = {
    "leading-zero-dropped": lambda sig: sig[1:],
    "zero-prepended": lambda sig: b"\x00" + sig,
    "zero-appended": lambda sig: sig + b"\x00",
    "last-byte-cut": lambda sig: sig[:-1],
}


@cache
def _provider() -> Any:
    return provider(algorithms=tuple(sorted({_alg(n) for n in KEYS})))


@cache
def _keyset() -> Any:
    return parse_jwks(_jwks(), "test")


@cache
def _token(name: str) -> tuple[str, bytes]:
    return _leading_zero(name, claims)


def _reason(token: str) -> str:
    with pytest.raises(TokenInvalid) as caught:
        verify_token(token, _provider(), _keyset(), NOW)
    return caught.value.reason


@pytest.mark.parametrize("name", sorted(KEYS))
def test_the_exact_signature_verifies(name: str) -> None:
    head, sig = _token(name)
    assert len(sig) == LENGTHS[KEYS[name][0]] == signature_length(_key(KEYS[name][0]).public_key())
    assert verify_token(_with(head, sig), _provider(), _keyset(), NOW)["iss"] == ISSUER


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("name", sorted(KEYS))
def test_a_signature_of_another_length_is_a_bad_signature(name: str, change: str) -> None:
    head, sig = _token(name)
    assert _reason(_with(head, CHANGES[change](sig))) == "bad_signature"


def test_a_key_of_no_family_fits_no_signature() -> None:
    assert signature_length(object()) == 0


# ----------------------------------------------------------------------------- a real sidecar

LIVE = ("PS256", "PS384", "PS512", "RS256", "ES256")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("siglen")
    pki = Pki(tmp / "pki")
    with contextlib.ExitStack() as stack:
        app_proc, app_port = start_app(tmp)
        stack.callback(app_proc.stop, timeout=10)
        jwks = tmp / "policy" / "jwks.json"
        jwks.parent.mkdir(parents=True)
        jwks.write_bytes(_jwks())
        providers = {"corp": provider_doc(jwks_file="jwks.json", algorithms=list(LIVE))}
        node = start_node(tmp, pki, app_port,
                          policy_doc(providers, [jwt_rule("corp", ["/**"], "corp")]))
        stack.callback(node.sidecar.stop, timeout=10)
        yield node


@pytest.mark.parametrize("name", LIVE)
def test_a_dropped_leading_zero_is_refused_by_a_real_sidecar(node: Any, name: str) -> None:
    head, sig = _leading_zero(name, live_claims)
    assert node.get("/x", _with(head, sig)).status == 200
    for change in sorted(CHANGES):
        assert node.get("/x", _with(head, CHANGES[change](sig))).status == 401, change
