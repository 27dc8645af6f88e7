"""Ed448 keys that verify nothing, and Edwards keys in certificates (``sidecar.edwards``).

Found by the thirty-fifth session's hostile review of tokens: the twenty-ninth session refused
Ed25519 keys of small order in a JWKS, believing OpenSSL refused Ed448's itself. It does not:
the all-zero Ed448 "placeholder" (y = 0, the points (+-1, 0) of order 4) loads, and under it a
signature of 114 zero bytes verifies any claims, so a token nobody signed reached the app as
``sub: admin``. Now every Ed448 point of small order, and every encoding RFC 8032 does not
decode, refuses the document (as Ed25519's do); and a certificate -- a bundle root, an
intermediate, a leaf -- whose Ed25519 or Ed448 key is such a point is ``key-weak`` (a root with
one vouched for any certificate anyone made).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from sidecar.authn.jwks import parse_jwks
from sidecar.edwards import weak_ed448_public_key, weak_edwards_key
from sidecar.errors import ConfigError
from sidecar.identity.svid import RULE_KEY_WEAK, SvidError, crypto_problem
from sidecar.identity.trust import bundle_from_certs
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_audit_weak_keys import WEAK as WEAK_25519
from tests.test_certs_review2 import PTD, _cert, root

pytestmark = pytest.mark.usefixtures("no_internal_errors")

_P = 2**448 - 2**224 - 1
_SIGN = 1 << 455


def _spelled(number: int) -> bytes:
    return number.to_bytes(57, "little")


# The four points of small order (orders 1, 2, 4, 4), each with the sign bit clear and set,
# and encodings RFC 8032 5.2.3 does not decode: y not reduced modulo p (y + p for the small
# y values), a bit set among the seven after y, a sign bit on x = 0.
WEAK_448: tuple[tuple[str, bytes], ...] = (
    ("identity (y = 1)", _spelled(1)),
    ("identity, sign bit set (x = 0)", _spelled(1 | _SIGN)),
    ("(0, -1), order 2", _spelled(_P - 1)),
    ("(0, -1), sign bit set", _spelled((_P - 1) | _SIGN)),
    ("all-zero placeholder (1, 0), order 4", bytes(57)),
    ("(-1, 0), order 4", _spelled(_SIGN)),
    ("y = p (0, not reduced)", _spelled(_P)),
    ("y = p + 1 (1, not reduced)", _spelled(_P + 1)),
    ("a bit set past y (2^448)", _spelled(1 << 448)),
    ("stray bits after y, sign set", _spelled((0x7F << 448) | _SIGN | 5)),
)


def _loads_448(raw: bytes) -> bool:
    try:
        ed448.Ed448PublicKey.from_public_bytes(raw)
    except ValueError:
        return False
    return True


def _loads_25519(raw: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return False
    return True


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _jwk(raw: bytes, crv: str, kid: str = "k") -> dict[str, str]:
    return {"kty": "OKP", "crv": crv, "kid": kid, "alg": "EdDSA", "use": "sig", "x": _b64(raw)}


@pytest.mark.parametrize(("name", "raw"), WEAK_448, ids=[n for n, _ in WEAK_448])
def test_every_ed448_spelling_of_a_small_order_point_is_weak(name: str, raw: bytes) -> None:
    assert weak_ed448_public_key(raw) is not None, name


def test_real_ed448_keys_are_not_weak() -> None:
    for _ in range(100):
        raw = ed448.Ed448PrivateKey.generate().public_key().public_bytes_raw()
        assert weak_ed448_public_key(raw) is None
        assert weak_edwards_key(ed448.Ed448PublicKey.from_public_bytes(raw)) is None


def test_openssl_loads_the_placeholder_and_a_zero_signature_verifies_under_it() -> None:
    """Why the check exists: what OpenSSL does with the all-zero key, in either sign."""
    for raw in (bytes(57), _spelled(_SIGN)):
        ed448.Ed448PublicKey.from_public_bytes(raw).verify(bytes(114), b"any claims")


@pytest.mark.parametrize(("name", "raw"), WEAK_448, ids=[n for n, _ in WEAK_448])
def test_a_key_set_holding_a_weak_ed448_key_is_refused(name: str, raw: bytes) -> None:
    good = ed448.Ed448PrivateKey.generate().public_key().public_bytes_raw()
    for keys in ([_jwk(raw, "Ed448")], [_jwk(good, "Ed448", "good"), _jwk(raw, "Ed448")]):
        with pytest.raises(ConfigError) as info:
            parse_jwks(json.dumps({"keys": keys}).encode(), "corp.jwks")
        assert "OKP key" in str(info.value), name


def test_a_real_ed448_key_set_loads() -> None:
    good = ed448.Ed448PrivateKey.generate().public_key().public_bytes_raw()
    assert "k" in parse_jwks(json.dumps({"keys": [_jwk(good, "Ed448")]}).encode(),
                             "corp.jwks").by_kid


# --- certificates ---------------------------------------------------------------------------


class _Holder:
    """Stands where ``_cert`` wants a private key: gives the (weak) public key only; the
    certificate is signed by its issuer."""

    def __init__(self, public: Any) -> None:
        self.public = public

    def public_key(self) -> Any:
        return self.public


def _weak_public_keys() -> Iterator[tuple[str, Any]]:
    for name, raw in WEAK_25519:
        if _loads_25519(raw):
            yield f"Ed25519 {name}", ed25519.Ed25519PublicKey.from_public_bytes(raw)
    for name, raw in WEAK_448:
        if _loads_448(raw):
            yield f"Ed448 {name}", ed448.Ed448PublicKey.from_public_bytes(raw)


WEAK_CERT_KEYS = tuple(_weak_public_keys())
SIGNER = root("signer", None)


def test_openssl_loads_most_members() -> None:
    """The family is not empty where it matters: OpenSSL loads these keys."""
    assert sum(name.startswith("Ed448") for name, _ in WEAK_CERT_KEYS) >= 6
    assert sum(name.startswith("Ed25519") for name, _ in WEAK_CERT_KEYS) >= 6


@pytest.mark.parametrize(("name", "key"), WEAK_CERT_KEYS, ids=[n for n, _ in WEAK_CERT_KEYS])
def test_a_certificate_with_a_weak_edwards_key_is_key_weak(name: str, key: Any) -> None:
    for ca in (True, False):
        cert = _cert("weak", _Holder(key), SIGNER, ca=ca)
        problem = crypto_problem(cert)
        assert problem is not None and problem[0] == RULE_KEY_WEAK, (name, ca, problem)


@pytest.mark.parametrize(("name", "key"), WEAK_CERT_KEYS, ids=[n for n, _ in WEAK_CERT_KEYS])
def test_a_bundle_root_with_a_weak_edwards_key_does_not_load(name: str, key: Any) -> None:
    cert = _cert("weak root", _Holder(key), SIGNER, ca=True)
    with pytest.raises(SvidError) as caught:
        bundle_from_certs(PTD, "partner.pem", [cert])
    assert caught.value.rule == RULE_KEY_WEAK and caught.value.file == "partner.pem", name


def test_real_edwards_roots_load() -> None:
    for key in (ed25519.Ed25519PrivateKey.generate(), ed448.Ed448PrivateKey.generate()):
        cert = _cert("real root", key, None, ca=True)
        # (signature-weak: an Edwards signature the chain check does not verify; a root's
        # own signature is not judged, so the root loads -- docs/identity.md)
        assert crypto_problem(cert) is None or crypto_problem(cert)[0] != RULE_KEY_WEAK
        bundle_from_certs(PTD, "partner.pem", [cert])
        leaf = _cert("leaf", _Holder(key.public_key()), SIGNER, ca=False)
        assert crypto_problem(leaf) is None


# --- through a sidecar ------------------------------------------------------------------------

ISS = "https://idp.example/ed448/"
PLACEHOLDERS = (bytes(57), _spelled(_SIGN))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    n = len(PLACEHOLDERS)
    policy = {"version": 1, "trust_domain": h.TD, "jwt_providers": {
        f"p{i}": {"issuer": f"{ISS}{i}", "audiences": ["orders"], "algorithms": ["EdDSA"],
                  "jwks_file": f"keys{i}.json", "forward_claims": {"sub": f"x-user-{i}"}}
        for i in range(n)},
        "services": {h.spiffe("orders"): {"rules": [{"name": f"api{i}", "allow": {
            "from": [h.spiffe("frontend")], "paths": [f"/api{i}/**"],
            "jwt": {"provider": f"p{i}", "claims": {"sub": "admin"}}}} for i in range(n)]}}}
    files = {f"keys{i}.json": json.dumps({"keys": [_jwk(raw, "Ed448", "ed448-1")]})
             for i, raw in enumerate(PLACEHOLDERS)}
    with orders_mesh(tmp_path_factory.mktemp("ed448-weak"), policy, files) as m:
        yield m


@pytest.mark.parametrize("index", range(len(PLACEHOLDERS)))
def test_a_token_signed_with_zeros_under_the_placeholder_is_refused(mesh: OrdersMesh,
                                                                    index: int) -> None:
    now = int(time.time())
    head = _b64(json.dumps({"alg": "EdDSA", "kid": "ed448-1"}).encode())
    body = _b64(json.dumps({"iss": f"{ISS}{index}", "aud": "orders", "sub": "admin",
                            "iat": now - 5, "exp": now + 600}).encode())
    r = mesh.get(f"/api{index}/x", {"authorization": f"Bearer {head}.{body}.{_b64(bytes(114))}"})
    assert r.status == 401, r.body[:300]
