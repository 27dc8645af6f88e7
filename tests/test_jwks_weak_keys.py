"""A key set holding an Ed25519 key of small order is refused (``sidecar.edwards``).

Found by the hostile review of the twenty-ninth session's fixes: the audit keyring refused
such keys, JWT key sets did not. Under the identity point (``x = AQAA...A``) a signature of
R = identity, S = 0 verifies any claims, so a rule ``jwt: {provider: corp, claims: {sub:
admin}}`` let a token nobody signed in as admin. Every spelling of every small-order point is
now an invalid key: the document is refused (``ConfigError``) and the last good key set stays;
a sidecar that never had one refuses every token of the provider.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sidecar.authn.jwks import parse_jwks
from sidecar.errors import ConfigError
from tests.harness import module_fixture, spiffe
from tests.test_audit_weak_keys import WEAK
from tests.test_hostile_http import ISSUER, Mesh, exchange, statuses

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _jwk(raw: bytes, kid: str = "k") -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "use": "sig",
            "x": _b64(raw)}


GOOD = Ed25519PrivateKey.generate()
GOOD_RAW = GOOD.public_key().public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw)


@pytest.mark.parametrize(("name", "raw"), WEAK, ids=[n for n, _ in WEAK])
def test_every_weak_spelling_is_an_invalid_key(name: str, raw: bytes) -> None:
    for keys in ([_jwk(raw)], [_jwk(GOOD_RAW, "good"), _jwk(raw)]):
        with pytest.raises(ConfigError) as info:
            parse_jwks(json.dumps({"keys": keys}).encode(), "corp.jwks")
        assert "invalid OKP key" in str(info.value), name


def test_a_real_ed25519_key_loads() -> None:
    keys = parse_jwks(json.dumps({"keys": [_jwk(GOOD_RAW)]}).encode(), "corp.jwks")
    assert "k" in keys.by_kid and len(keys) == 1


POLICY = f"""\
version: 1
trust_domain: demo.local
jwt_providers:
  corp:
    issuer: {ISSUER}
    audiences: [api]
    algorithms: [EdDSA]
    jwks_file: weak.jwks.json
services:
  {spiffe("orders")}:
    rules:
      - name: admins
        allow: {{from: ["{spiffe("frontend")}"], paths: [/admin/**], jwt: {{provider: corp, claims: {{sub: admin}}}}}}
  {spiffe("frontend")}:
    egress: ["{spiffe("orders")}"]
"""


def _mesh(tmp: Path) -> Mesh:
    (tmp / "weak.jwks.json").write_text(json.dumps({"keys": [_jwk(WEAK[0][1])]}))
    return Mesh(tmp, policy=POLICY)


mesh = module_fixture("jwks-weak", _mesh)


def _forged() -> str:
    now = int(time.time())
    head = _b64(json.dumps({"alg": "EdDSA", "kid": "k", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"iss": ISSUER, "aud": "api", "sub": "admin", "iat": now - 5,
                            "exp": now + 300}).encode())
    return f"{head}.{body}.{_b64(bytes([1]) + bytes(63))}"


@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_a_token_signed_under_the_identity_point_is_refused(mesh: Mesh, side: str) -> None:
    request = (b"GET /admin/users HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer "
               + _forged().encode() + b"\r\nConnection: close\r\n\r\n")
    assert statuses(exchange(mesh, side, request, timeout=10)) == [401]
