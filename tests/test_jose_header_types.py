"""JOSE header members of the wrong JSON type, ``null`` included (hostile review).

``kid: null`` was read as "no kid": the token took the one key that fits, although ``typ:
null`` and ``cty: null`` were refused (``bad_header``) and ``kid: 1`` was ``malformed``.
Read as absent it also escaped the verification cache's note of tokens without ``kid``
(``Authenticator.set_keys`` drops those when a key set change makes their key ambiguous).

The same on the key set's side: a JWK with ``kid: null`` was an unnamed key, serving every
token without ``kid``, although docs/authn.md says a ``kid`` that is not a string is an
error (as ``alg: null`` and ``use: null`` were).

The family as data: every string member the verifier reads (``alg``, ``kid``, ``typ``,
``cty``) x every non-string JSON value, in process and through a real sidecar whose keys
come from a JWKS endpoint on 127.0.0.1 over HTTPS. Every member is refused with a generic
401; the same token with the member well-typed is accepted (the control). And every JWK
string member (``kid``, ``kty``, ``alg``, ``use``, ``crv``) x every non-string value makes
the key set refused, in process and as the endpoint's first document (no keys: 401).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jwt.algorithms import ECAlgorithm

from sidecar.authn.jwks import parse_jwks
from sidecar.authn.jwt import TokenInvalid, verify_token
from sidecar.errors import ConfigError
from tests.harness import (
    Pki,
    SidecarProc,
    free_port,
    http,
    https_server_material,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
)
from tests.test_authn_support import (
    AUDIENCE,
    ISSUER,
    NOW,
    claims,
    ec_key,
    jwk,
    jwks_bytes,
    key_set,
    provider,
)
from tests.test_jwt_e2e import JwksServer

pytestmark = pytest.mark.usefixtures("no_internal_errors")

MEMBERS = ("alg", "kid", "typ", "cty")
NOT_STRINGS = {"null": None, "zero": 0, "true": True, "false": False, "list": ["ES256"],
               "empty_list": [], "object": {"v": "ES256"}, "float": 1.5}
WELL_TYPED = {"alg": "ES256", "kid": "ec-1", "typ": "at+jwt", "cty": "json"}
FAMILY = [(m, label) for m in MEMBERS for label in NOT_STRINGS]
IDS = [f"{m}-{label}" for m, label in FAMILY]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: dict[str, Any], payload: dict[str, Any], key: Any) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def header_with(member: str | None, value: Any) -> dict[str, Any]:
    header = dict(WELL_TYPED)
    if member is not None:
        header[member] = value
    return header


@pytest.mark.parametrize("member, label", FAMILY, ids=IDS)
def test_a_header_member_of_another_type_is_refused(member: str, label: str) -> None:
    key = ec_key("header-types")
    token = signed(header_with(member, NOT_STRINGS[label]), claims(), key)
    with pytest.raises(TokenInvalid):
        verify_token(token, provider(), key_set((key, "ec-1")), NOW)


def test_the_well_typed_header_and_an_absent_kid_are_accepted() -> None:
    key = ec_key("header-types")
    keys = key_set((key, "ec-1"))
    assert verify_token(signed(WELL_TYPED, claims(), key), provider(), keys, NOW)
    no_kid = {k: v for k, v in WELL_TYPED.items() if k != "kid"}
    assert verify_token(signed(no_kid, claims(), key), provider(), keys, NOW)


JWK_MEMBERS = ("kid", "kty", "alg", "use", "crv")
JWK_FAMILY = [(m, label) for m in JWK_MEMBERS for label in NOT_STRINGS]
JWK_IDS = [f"jwk-{m}-{label}" for m, label in JWK_FAMILY]


def jwk_with(member: str, value: Any) -> dict[str, Any]:
    doc = jwk(ec_key("header-types"), "ec-1", alg="ES256", use="sig")
    doc[member] = value
    return doc


@pytest.mark.parametrize("member, label", JWK_FAMILY, ids=JWK_IDS)
def test_a_jwk_member_of_another_type_refuses_the_key_set(member: str, label: str) -> None:
    with pytest.raises(ConfigError):
        parse_jwks(jwks_bytes(jwk_with(member, NOT_STRINGS[label])), "test")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SidecarProc, Any]]:
    tmp = tmp_path_factory.mktemp("jose-header-types")
    pki = Pki(tmp / "pki")
    ca_file, server_ctx = https_server_material(tmp / "jwks-tls")
    server = JwksServer(server_ctx, jwks_bytes(jwk(ec_key("header-types"), "ec-1")))
    procs: list[Any] = []
    try:
        app, app_port = start_app(tmp)
        procs.append(app)
        policy = {"version": 1, "trust_domain": "demo.local", "jwt_providers": {"corp": {
            "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
            "jwks_uri": f"https://127.0.0.1:{server.port}/jwks.json", "jwks_ca": str(ca_file),
            "jwks_refresh": "1h", "jwks_min_refetch": "1h"}},
            "services": {spiffe("orders"): {"rules": [
                {"name": "open", "allow": {"from": [spiffe("frontend")], "paths": ["/open/**"]}},
                {"name": "corp", "allow": {"from": [spiffe("frontend")], "paths": ["/corp/**"],
                                           "jwt": {"provider": "corp"}}}]}}}
        policy_path = tmp / "mesh.yaml"
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(policy_path))
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        sidecar = start_sidecar(tmp, "orders", cfg)
        procs.append(sidecar)
        yield sidecar, ctx
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=10)
        server.stop()


def live_claims() -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "jti": uuid.uuid4().hex,
            "iat": now - 5, "exp": now + 600}


def test_every_member_through_a_sidecar(node: tuple[SidecarProc, Any], tmp_path: Path) -> None:
    sidecar, ctx = node
    port = sidecar.port("inbound")
    key = ec_key("header-types")

    def get(path: str, token: str) -> Any:
        return http(port, "GET", path, headers={"authorization": f"Bearer {token}"}, ctx=ctx)

    assert get("/corp/1", signed(WELL_TYPED, live_claims(), key)).status == 200
    for member, label in FAMILY:
        token = signed(header_with(member, NOT_STRINGS[label]), live_claims(), key)
        for path in ("/corp/1", "/open/1"):
            r = get(path, token)
            assert r.status == 401, (member, label, path, r.status)
            assert r.headers.get("www-authenticate") == \
                'Bearer realm="sidecar", error="invalid_token"'
            assert b"kid" not in r.body.lower() and b"malformed" not in r.body.lower()


def test_a_jwk_with_kid_null_is_no_key_through_a_sidecar(tmp_path: Path) -> None:
    """The endpoint's first (and only) document has a key with ``kid: null``: the set is
    refused, the provider has no keys, and a token without ``kid`` -- which that key
    verified before, as the one unnamed key -- is refused."""
    pki = Pki(tmp_path / "pki")
    ca_file, server_ctx = https_server_material(tmp_path / "jwks-tls")
    server = JwksServer(server_ctx, jwks_bytes(jwk_with("kid", None)))
    procs: list[Any] = []
    try:
        app, app_port = start_app(tmp_path)
        procs.append(app)
        policy = {"version": 1, "trust_domain": "demo.local", "jwt_providers": {"corp": {
            "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
            "jwks_uri": f"https://127.0.0.1:{server.port}/jwks.json", "jwks_ca": str(ca_file),
            "jwks_refresh": "1h", "jwks_min_refetch": "1h"}},
            "services": {spiffe("orders"): {"rules": [
                {"name": "corp", "allow": {"from": [spiffe("frontend")], "paths": ["/corp/**"],
                                           "jwt": {"provider": "corp"}}}]}}}
        (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(tmp_path / "mesh.yaml"))
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        sidecar = start_sidecar(tmp_path, "orders", cfg)
        procs.append(sidecar)
        no_kid = {k: v for k, v in WELL_TYPED.items() if k != "kid"}
        token = signed(no_kid, live_claims(), ec_key("header-types"))
        r = http(sidecar.port("inbound"), "GET", "/corp/1",
                 headers={"authorization": f"Bearer {token}"}, ctx=ctx)
        assert r.status == 401, (r.status, r.body[:200])
        assert sidecar.metric("sidecar_jwt_failures_total", provider="corp",
                              reason="no_keys") >= 1
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=10)
        server.stop()
