"""End to end: JWT, JWKS (file and HTTPS), revocation and API keys through a real inbound sidecar.

Each test drives ``python -m sidecar run`` with a policy and key files written to tmp, real mTLS
from a "frontend" client certificate, and the real test app (tests/apps/upstream.py), which
echoes the headers it received. Tokens are minted here with pyjwt and cryptography keys.

Most tests share one sidecar (``shared``: module scope, read-only policy); tests that rewrite the
policy or the key files start their own. Every loop is bounded by count and time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client as httpclient
import json
import math
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import (
    Pki,
    Response,
    SidecarProc,
    free_port,
    http,
    https_server_material,
    mtls_context,
    raw,
    replace_file,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.jwt_claim_family import MEMBER_IDS, MEMBERS, payload_text, sign_raw
from tests.test_authn_support import (
    AUDIENCE,
    ISSUER,
    b64,
    ec_key,
    jwk,
    jwks_bytes,
    overridden,
    rsa_key,
)

# Every request here must end in a generic answer, never in an unhandled exception.
pytestmark = pytest.mark.usefixtures("no_internal_errors")

BEARER_MISSING = 'Bearer realm="sidecar"'
BEARER_INVALID = 'Bearer realm="sidecar", error="invalid_token"'
BEARER_INSUFFICIENT = 'Bearer realm="sidecar", error="insufficient_scope"'
REASON_WORDS = ("expired", "signature", "kid", "issuer", "audience", "alg", "malformed",
                "revoked", "multiple", "too_large", "claim", "keys", "valid", "jwt", "token")


# ----------------------------------------------------------------------------- tokens


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims at the real current time (the sidecar checks exp/nbf against its clock)."""
    now = int(time.time())
    out: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice",
                           "scope": "orders:read profile", "jti": uuid.uuid4().hex,
                           "iat": now - 5, "exp": now + 600}
    return overridden(out, overrides)


def sign(payload: dict[str, Any], key: Any = None, *, kid: str | None = "ec-1",
         alg: str = "ES256", **header: Any) -> str:
    import jwt as pyjwt

    headers = dict(header)
    if kid is not None:
        headers["kid"] = kid
    return pyjwt.encode(payload, key if key is not None else ec_key("e2e-ec-1"), algorithm=alg,
                        headers=headers)


def segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())


# ----------------------------------------------------------------------------- files


def provider_doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"issuer": ISSUER, "audiences": [AUDIENCE],
                           "algorithms": ["ES256", "RS256"]}
    doc.update(extra)
    return doc


def policy_doc(providers: dict[str, Any], rules: list[dict[str, Any]], *,
               api_keys: list[dict[str, Any]] | None = None,
               revocations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1, "trust_domain": "demo.local", "jwt_providers": providers,
        "services": {spiffe("orders"): {"rules": rules}},
    }
    if api_keys:
        doc["api_keys"] = api_keys
    if revocations:
        doc["revocations"] = revocations
    return doc


def jwt_rule(name: str, paths: list[str], provider: str,
             claim_tests: dict[str, Any] | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"provider": provider}
    if claim_tests:
        cond["claims"] = claim_tests
    return {"name": name, "allow": {"from": [spiffe("frontend")], "paths": paths, "jwt": cond}}


@dataclass
class Node:
    """One inbound sidecar under test and what a test needs to talk to it."""

    sidecar: SidecarProc
    ctx: ssl.SSLContext
    policy_path: Path
    tmp: Path

    @property
    def port(self) -> int:
        return self.sidecar.port("inbound")

    def get(self, path: str, token: str | None = None, **headers: str) -> Response:
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            hdrs["authorization"] = f"Bearer {token}"
        return http(self.port, "GET", path, headers=hdrs, ctx=self.ctx)

    def metric(self, name: str, **labels: str) -> float:
        return self.sidecar.metric(name, **labels)

    def policy_version(self) -> str | None:
        return http(self.sidecar.port("admin"), "GET", "/policy").json().get("version")


def start_node(tmp: Path, pki: Pki, app_port: int, policy: dict[str, Any],
               name: str = "orders") -> Node:
    policy_path = tmp / "policy" / "mesh.yaml"
    policy_path.parent.mkdir(parents=True, exist_ok=True)
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    cfg = sidecar_config(pki.identity("orders", dirname=f"orders-{name}"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
        policy=str(policy_path))
    # (The client's context first: nothing may fail between starting the sidecar and
    # handing it to the caller, who stops it.)
    ctx = mtls_context(pki.identity("frontend", dirname=f"frontend-{name}"), pki.bundle)
    proc = start_sidecar(tmp, name, cfg)
    return Node(proc, ctx, policy_path, tmp)


def app_headers(r: Response, name: str) -> list[str]:
    return [v for k, v in r.header_list() if k == name]


def generic(body: bytes) -> bytes:
    """A refusal body with its request id blanked, to compare bodies across requests."""
    return re.sub(rb"[0-9a-fA-F-]{8,}", b"<id>", body)


def apikey_new(name: str) -> tuple[str, dict[str, Any]]:
    """Run ``sidecar apikey new NAME``; return the key and the policy entry it printed."""
    out = sidecar_cli("apikey", "new", name, timeout=30)  # (a real process, forked warm)
    assert out.returncode == 0, out.stdout + out.stderr
    key = re.search(r"(sk_[A-Za-z0-9_-]+)", out.stdout)
    assert key is not None, out.stdout
    entry_text = out.stdout[out.stdout.index("- name:"):]
    entry = yaml.safe_load(entry_text)[0]
    assert entry["name"] == name and hashlib.sha256(key.group(1).encode()).hexdigest() == \
        entry["sha256"]
    return key.group(1), entry


# ----------------------------------------------------------------------------- shared sidecar


@dataclass
class Shared:
    node: Node
    api_key: str
    expired_key: str


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("jwt-e2e")
    pki = Pki(tmp / "pki")
    # Every process started here is stopped by its pid, also when a later step fails.
    with contextlib.ExitStack() as stack:
        app_proc, app_port = start_app(tmp)
        stack.callback(app_proc.stop, timeout=10)
        jwks = tmp / "policy" / "jwks" / "corp.json"
        jwks.parent.mkdir(parents=True)
        jwks.write_bytes(jwks_bytes(jwk(ec_key("e2e-ec-1"), "ec-1"), jwk(rsa_key("e2e-rsa-1"), "rsa-1")))
        api_key, entry = apikey_new("batch-job")
        expired_key, old_entry = apikey_new("old-job")
        old_entry["expires_at"] = "2020-01-01T00:00:00Z"
        providers = {
            "corp": provider_doc(
                jwks_file="jwks/corp.json", max_token_bytes=1024,
                from_headers=[{"name": "authorization", "prefix": "Bearer "}],
                from_params=["access_token"],
                forward_claims={"sub": "x-user", "scope": "x-scope", "email": "x-email"}),
            "hidden": provider_doc(
                jwks_file="jwks/corp.json", from_headers=["x-token"], forward_token=False,
                forward_claims={"sub": "x-hidden-user"}),
            # Room for the claim family's longest members (a 5000-digit exp), which must be
            # refused for their claim, not for their size.
            "wide": provider_doc(jwks_file="jwks/corp.json", max_token_bytes=16384,
                                 required_claims=["exp", "iat", "sub"],
                                 forward_claims={"name": "x-name"}),
        }
        rules = [
            jwt_rule("corp-reads", ["/corp", "/corp/**"], "corp",
                     {"scope": {"contains": "orders:read"}}),
            jwt_rule("hidden-token", ["/hidden/**"], "hidden"),
            jwt_rule("wide-token", ["/wide/**"], "wide"),
            {"name": "batch", "allow": {"from": [spiffe("frontend")], "paths": ["/batch/**"],
                                        "apikey": True}},
        ]
        node = start_node(tmp, pki, app_port, policy_doc(providers, rules,
                                                         api_keys=[entry, old_entry]))
        stack.callback(node.sidecar.stop, timeout=10)
        yield Shared(node, api_key, expired_key)


# ----------------------------------------------------------------------------- valid / missing


def test_valid_token_forwards_verified_claims_and_strips_spoofed_ones(shared: Shared) -> None:
    node = shared.node
    token = sign(claims())
    r = node.get("/corp/orders/1", token, x_user="mallory", x_scope="admin:all",
                 x_email="mallory@evil.example")
    assert r.status == 200, r.body
    assert app_headers(r, "x-user") == ["alice"]
    assert app_headers(r, "x-scope") == ["orders:read profile"]
    # The token has no email claim: the caller's x-email is removed, nothing is set.
    assert app_headers(r, "x-email") == []
    # forward_token defaults to true: the app sees the caller's token.
    assert app_headers(r, "authorization") == [f"Bearer {token}"]
    # A claim a user chose, nested past the JSON parser's depth, goes as JSON text (it
    # raised out of the data path before).
    deep = "[" * 1500 + "]" * 1500
    r = node.get("/wide/x", sign(claims(name=deep)))
    assert r.status == 200, r.body
    assert app_headers(r, "x-name") == [json.dumps(deep)]


def test_forward_token_false_removes_the_token_before_the_app(shared: Shared) -> None:
    node = shared.node
    token = sign(claims(sub="bob"))
    r = node.get("/hidden/thing", x_token=token, x_hidden_user="mallory")
    assert r.status == 200, r.body
    assert app_headers(r, "x-token") == []
    assert app_headers(r, "x-hidden-user") == ["bob"]
    assert token not in json.dumps(r.header_list())


def test_claims_cannot_inject_header_lines(shared: Shared) -> None:
    token = sign(claims(sub="alice\r\nx-admin: 1", scope="orders:read Zo\u00eb"))
    r = shared.node.get("/corp/x", token)
    assert r.status == 200, r.body
    assert app_headers(r, "x-user") == ['"alice\\r\\nx-admin: 1"']
    assert app_headers(r, "x-scope") == ['"orders:read Zo\\u00eb"']
    assert app_headers(r, "x-admin") == []


def test_same_token_in_header_and_query_is_one_token(shared: Shared) -> None:
    token = sign(claims())
    r = http(shared.node.port, "GET", f"/corp/x?access_token={token}",
             headers={"authorization": f"Bearer {token}"}, ctx=shared.node.ctx)
    assert r.status == 200, r.body


def test_missing_token_gets_401_with_bare_bearer_challenge(shared: Shared) -> None:
    r = shared.node.get("/corp/orders/1")
    assert r.status == 401
    assert r.headers.get("www-authenticate") == BEARER_MISSING


def test_valid_token_lacking_claims_gets_403(shared: Shared) -> None:
    r = shared.node.get("/corp/orders/1", sign(claims(scope="profile")))
    assert r.status == 403
    assert b"alice" not in r.body and b"scope" not in r.body
    # RFC 6750 3.1: the token is good, its scope is not (docs/authn.md, "Responses").
    assert r.headers.get("www-authenticate") == BEARER_INSUFFICIENT
    # A 403 that is no token's fault (no rule allows the path) carries no challenge.
    r = shared.node.get("/nowhere/1", sign(claims()))
    assert r.status == 403 and r.headers.get("www-authenticate") is None


# ----------------------------------------------------------------------------- attacks


def _attack(kind: str) -> tuple[dict[str, str], str, str]:
    """(headers, path suffix, expected reason) for one classic attack on provider corp."""
    good = claims()
    attacker = ec.generate_private_key(ec.SECP256R1())
    bearer = "authorization"
    if kind == "alg_none":
        token = segments({"alg": "none", "typ": "JWT", "kid": "ec-1"}, good) + "."
        return {bearer: f"Bearer {token}"}, "", "bad_alg"
    if kind == "hs256_with_public_key":
        pem = rsa_key("e2e-rsa-1").public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = segments({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, good)
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return {bearer: f"Bearer {signing_input}.{b64(mac)}"}, "", "bad_alg"
    if kind == "unknown_kid":
        return {bearer: f"Bearer {sign(good, attacker, kid='attacker-1')}"}, "", "unknown_kid"
    if kind == "expired":
        now = int(time.time())
        token = sign(claims(iat=now - 7200, exp=now - 3600))
        return {bearer: f"Bearer {token}"}, "", "expired"
    if kind == "nbf_future":
        token = sign(claims(nbf=int(time.time()) + 3600))
        return {bearer: f"Bearer {token}"}, "", "not_yet_valid"
    if kind == "wrong_iss":
        return {bearer: f"Bearer {sign(claims(iss='https://evil.example/'))}"}, "", "bad_issuer"
    if kind == "wrong_aud":
        return {bearer: f"Bearer {sign(claims(aud='other-api'))}"}, "", "bad_audience"
    if kind == "tampered_payload":
        h, _, s = sign(good).split(".")
        forged = b64(json.dumps(dict(good, sub="admin")).encode())
        return {bearer: f"Bearer {h}.{forged}.{s}"}, "", "bad_signature"
    if kind == "tampered_signature":
        h, p, s = sign(good).split(".")
        sig = bytearray(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
        sig[10] ^= 0x01
        return {bearer: f"Bearer {h}.{p}.{b64(bytes(sig))}"}, "", "bad_signature"
    if kind == "header_and_query":
        other = sign(claims())
        return {bearer: f"Bearer {sign(good)}"}, f"?access_token={other}", "multiple_tokens"
    if kind == "oversized":
        token = sign(claims(pad="x" * 1500))  # max_token_bytes is 1024 for corp
        return {bearer: f"Bearer {token}"}, "", "too_large"
    if kind == "malformed_base64":
        return {bearer: "Bearer e30!!.e30.AAAA"}, "", "malformed"
    if kind == "malformed_json":
        token = b64(b'{"alg": "ES256", "kid": ') + "." + b64(json.dumps(good).encode()) + ".AAAA"
        return {bearer: f"Bearer {token}"}, "", "malformed"
    if kind in ("jku", "x5u"):
        token = sign(good, attacker, kid="attacker-1", **{kind: "https://127.0.0.1:1/jwks.json"})
        return {bearer: f"Bearer {token}"}, "", "unknown_kid"
    if kind == "embedded_jwk":
        token = sign(good, attacker, kid="attacker-1", jwk=jwk(attacker, "attacker-1"))
        return {bearer: f"Bearer {token}"}, "", "unknown_kid"
    if kind == "embedded_jwk_known_kid":
        # The attacker reuses the real kid: the provider's key for ec-1 is used, not the
        # embedded one, so the signature does not verify.
        token = sign(good, attacker, kid="ec-1", jwk=jwk(attacker, "ec-1"))
        return {bearer: f"Bearer {token}"}, "", "bad_signature"
    raise AssertionError(kind)


ATTACKS = ["alg_none", "hs256_with_public_key", "unknown_kid", "expired", "nbf_future",
           "wrong_iss", "wrong_aud", "tampered_payload", "tampered_signature",
           "header_and_query", "oversized", "malformed_base64", "malformed_json", "jku", "x5u",
           "embedded_jwk", "embedded_jwk_known_kid"]


@pytest.fixture(scope="module")
def generic_401(shared: Shared) -> bytes:
    """The body of a plain 401 (no token): every invalid-token body must be the same."""
    return generic(shared.node.get("/corp/x").body)


@pytest.mark.parametrize("kind", ATTACKS)
def test_classic_attack_is_refused_with_generic_401(shared: Shared, generic_401: bytes,
                                                    kind: str) -> None:
    node = shared.node
    headers, suffix, reason = _attack(kind)
    before = node.metric("sidecar_jwt_failures_total", provider="corp", reason=reason)
    r = http(node.port, "GET", "/corp/orders/1" + suffix, headers=headers, ctx=node.ctx)
    assert r.status == 401, (kind, r.status, r.body)
    assert r.headers.get("www-authenticate") == BEARER_INVALID
    assert generic(r.body) == generic_401
    lowered = r.body.lower()
    assert not any(word.encode() in lowered for word in REASON_WORDS), r.body
    # Refused for the right reason (metrics are the operator's view of the same decision).
    assert node.metric("sidecar_jwt_failures_total", provider="corp", reason=reason) == before + 1


@pytest.mark.parametrize(("claim", "label", "text"), MEMBERS, ids=MEMBER_IDS)
def test_malformed_claim_family_gets_401_through_a_real_sidecar(
        shared: Shared, generic_401: bytes, claim: str, label: str, text: str) -> None:
    # Every member of tests/jwt_claim_family.py, correctly signed by the provider's own key:
    # the type or range of one registered claim is all that is wrong. Before the fix
    # `exp: null` reached the app and `exp: 10**400` dropped the connection (internal_error,
    # which the module's no_internal_errors check also catches).
    node = shared.node
    token = sign_raw(payload_text(claims(), claim, text), ec_key("e2e-ec-1"))
    r = http(node.port, "GET", "/wide/x", headers={"authorization": f"Bearer {token}"},
             ctx=node.ctx)
    assert r.status == 401, (claim, label, r.status, r.body)
    assert r.headers.get("www-authenticate") == BEARER_INVALID
    assert generic(r.body) == generic_401


def test_claim_family_control_token_is_accepted(shared: Shared) -> None:
    # The family's tokens are built like this one; with valid values it gets through.
    token = sign_raw(payload_text(claims(), "exp", str(int(time.time()) + 60)),
                     ec_key("e2e-ec-1"))
    r = shared.node.get("/wide/x", token)
    assert r.status == 200, r.body


def test_two_authorization_headers_refused_before_policy(shared: Shared) -> None:
    node = shared.node
    t1, t2 = sign(claims()), sign(claims())
    req = (f"GET /corp/orders/1 HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer {t1}\r\n"
           f"Authorization: Bearer {t2}\r\nConnection: close\r\n\r\n").encode()
    out = raw(node.port, req, ctx=node.ctx)
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    # The same with the same token twice: still refused, never "pick one".
    req = req.replace(t2.encode(), t1.encode())
    assert raw(node.port, req, ctx=node.ctx).startswith(b"HTTP/1.1 400 ")


def test_jwt_failure_metric_counts_by_provider_and_reason(shared: Shared) -> None:
    node = shared.node
    before = node.metric("sidecar_jwt_failures_total", provider="corp", reason="expired")
    now = int(time.time())
    for _ in range(3):
        assert node.get("/corp/x", sign(claims(iat=now - 7200, exp=now - 3600))).status == 401
    assert node.metric("sidecar_jwt_failures_total", provider="corp", reason="expired") == \
        before + 3
    # A valid token counts no failure.
    total = node.metric("sidecar_jwt_failures_total")
    assert node.get("/corp/x", sign(claims())).status == 200
    assert node.metric("sidecar_jwt_failures_total") == total
    # The key set age is exported per provider and is a real (small) number for a file.
    age = node.metric("sidecar_jwks_age_seconds", provider="corp")
    assert not math.isnan(age) and 0 <= age < 600


# ----------------------------------------------------------------------------- API keys


def test_api_key_from_cli_is_accepted_and_not_forwarded(shared: Shared) -> None:
    node = shared.node
    r = node.get("/batch/run", x_api_key=shared.api_key)
    assert r.status == 200, r.body
    assert app_headers(r, "x-api-key") == []
    assert shared.api_key not in json.dumps(r.header_list())


@pytest.mark.parametrize("which", ["missing", "wrong", "expired"])
def test_bad_api_key_gets_401(shared: Shared, which: str) -> None:
    node = shared.node
    headers = {"missing": {}, "wrong": {"x_api_key": shared.api_key[:-2] + "xx"},
               "expired": {"x_api_key": shared.expired_key}}[which]
    r = node.get("/batch/run", **headers)
    assert r.status == 401
    assert r.headers.get("www-authenticate") == BEARER_MISSING
    assert shared.api_key.encode() not in r.body


# ----------------------------------------------------------------------------- revocation


@pytest.fixture(scope="module")
def own_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The app behind the tests' own sidecars: one for the module (it only echoes what it
    gets and keeps nothing a test reads; each test still starts its own sidecar)."""
    proc, port = start_app(tmp_path_factory.mktemp("jwt-e2e-app"))
    yield port
    proc.stop(timeout=10)


def _file_node(tmp: Path, pki: Pki, app_port: int, procs: list, keys: list[dict[str, Any]],
               revocations: list[dict[str, Any]] | None = None,
               **provider_extra: Any) -> tuple[Node, Any]:
    jwks = tmp / "policy" / "jwks.json"
    jwks.parent.mkdir(parents=True, exist_ok=True)
    replace_file(jwks, jwks_bytes(*keys))

    def make(revs: list[dict[str, Any]] | None) -> dict[str, Any]:
        return policy_doc({"corp": provider_doc(jwks_file="jwks.json", **provider_extra)},
                          [jwt_rule("corp", ["/**"], "corp")], revocations=revs)

    node = start_node(tmp, pki, app_port, make(revocations))
    procs.append(node.sidecar)
    return node, make


def test_revoked_jti_is_refused_even_when_cached(tmp_path: Path, pki: Pki, own_app: int,
                                                 procs: list) -> None:
    node, make = _file_node(tmp_path, pki, own_app, procs, [jwk(ec_key("e2e-ec-1"), "ec-1")])
    revoked, kept = sign(claims(jti="rev-1")), sign(claims(jti="keep-1"))
    for _ in range(3):  # verified once, then served from the verification cache
        assert node.get("/x", revoked).status == 200
        assert node.get("/x", kept).status == 200
    before = node.policy_version()
    node.policy_path.write_text(yaml.safe_dump(make([{"jti": "rev-1", "note": "stolen"}])))
    wait_for(lambda: node.policy_version() not in (None, before), timeout=10)
    r = node.get("/x", revoked)
    assert r.status == 401
    assert r.headers.get("www-authenticate") == BEARER_INVALID
    assert node.metric("sidecar_jwt_failures_total", provider="corp", reason="revoked") == 1
    assert node.get("/x", kept).status == 200


def test_cached_token_stops_working_at_its_exp(tmp_path: Path, pki: Pki, own_app: int,
                                               procs: list) -> None:
    node, _ = _file_node(tmp_path, pki, own_app, procs, [jwk(ec_key("e2e-ec-1"), "ec-1")],
                         clock_skew="0s")
    token = sign(claims(exp=int(time.time()) + 2))
    assert node.get("/x", token).status == 200
    assert node.get("/x", token).status == 200  # served from the verification cache
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and node.get("/x", token).status == 200:
        time.sleep(0.2)
    r = node.get("/x", token)
    assert r.status == 401 and r.headers.get("www-authenticate") == BEARER_INVALID
    assert node.metric("sidecar_jwt_failures_total", provider="corp", reason="expired") >= 1


# ----------------------------------------------------------------------------- one connection

# What must end a token, a decision or a target that a keep-alive connection already used
# (the inbound proxy keeps the connection's last verified credentials and decision,
# sidecar/authn/memo.py and sidecar/gate.py, and its last request as normalised,
# sidecar/inbound.py). Each member: the change, and the status and jwt failure reason (None:
# refused by the rule or the path, not the token) that the next request on that connection
# gets.
CONNECTION_ENDINGS: dict[str, tuple[int, str | None]] = {
    "revoked": (401, "revoked"),  # a policy reload revokes its jti
    "key_rotated_out": (401, "unknown_kid"),  # the JWKS file no longer has its key
    "expired": (401, "expired"),  # its exp passes (no clock skew allowed)
    "provider_changed": (401, "bad_audience"),  # a reload changes the provider's audiences
    "rule_changed": (403, None),  # a reload asks for a scope the token does not have
    # No token at all, a rule without jwt: the decision kept for the connection follows a
    # reload that allows only POST.
    "rule_changed_no_token": (403, None),
    # A non-ASCII path the policy allowed: the target normalised for the connection follows
    # a reload that no longer allows non-ASCII paths.
    "non_ascii_no_token": (400, None),
}


def _connection_policy(ending: str | None) -> dict[str, Any]:
    provider = provider_doc(jwks_file="jwks.json", clock_skew="0s")
    scope = "orders:read"
    revocations = None
    if ending == "revoked":
        revocations = [{"jti": "conn-1", "note": "stolen"}]
    elif ending == "provider_changed":
        provider["audiences"] = ["another-api"]
    elif ending == "rule_changed":
        scope = "orders:write"
    rule = jwt_rule("corp", ["/**"], "corp", {"scope": {"contains": scope}})
    if ending is not None and ending.endswith("no_token"):
        rule = {"name": "plain", "allow": {"from": [spiffe("frontend")], "paths": ["/**"]}}
        if ending == "rule_changed_no_token":
            rule["allow"]["methods"] = ["POST"]
    doc = policy_doc({"corp": provider}, [rule], revocations=revocations)
    if ending == "plain_no_token":
        doc["services"][spiffe("orders")]["non_ascii_paths"] = "allow"
    return doc


@pytest.mark.parametrize("ending", list(CONNECTION_ENDINGS))
def test_what_a_connection_was_allowed_is_refused_there_once_it_must_be(
        tmp_path: Path, pki: Pki, own_app: int, procs: list, ending: str) -> None:
    jwks = tmp_path / "policy" / "jwks.json"
    jwks.parent.mkdir(parents=True, exist_ok=True)
    replace_file(jwks, jwks_bytes(jwk(ec_key("e2e-ec-1"), "ec-1")))
    no_token = ending.endswith("no_token")
    node = start_node(tmp_path, pki, own_app,
                      _connection_policy("plain_no_token" if no_token else None))
    procs.append(node.sidecar)
    life = 3 if ending == "expired" else 600
    token = sign(claims(jti="conn-1", exp=int(time.time()) + life))
    headers = {} if no_token else {"authorization": f"Bearer {token}"}
    path = "/caf%C3%A9" if ending == "non_ascii_no_token" else "/x"
    conn = httpclient.HTTPSConnection("127.0.0.1", node.port, context=node.ctx, timeout=10)
    try:
        for _ in range(3):  # verified once, then answered from the connection's memo
            assert http(node.port, "GET", path, headers=headers, conn=conn).status == 200
        sock = conn.sock
        before = node.policy_version()
        if ending == "key_rotated_out":
            replace_file(jwks, jwks_bytes(jwk(ec_key("e2e-ec-2"), "ec-2")))
            # (another connection with another token of the old key sees the new set first;
            # a probe in flight when the set is swapped is cut, as a request admitted by a
            # key withdrawn mid-flight is: not yet the answer waited for)
            def old_key_refused() -> bool:
                try:
                    return node.get("/x", sign(claims())).status == 401
                except OSError:
                    return False

            wait_for(old_key_refused, timeout=10)
        elif ending != "expired":
            node.policy_path.write_text(yaml.safe_dump(_connection_policy(ending)))
            wait_for(lambda: node.policy_version() not in (None, before), timeout=10)
        deadline = time.monotonic() + 8
        while True:
            assert conn.sock is sock, "the connection that used the token was closed"
            r = http(node.port, "GET", path, headers=headers, conn=conn)
            if r.status != 200 or time.monotonic() > deadline:
                break
            assert ending == "expired", r.status  # only the clock takes its time
            time.sleep(0.2)
    finally:
        conn.close()
    status, reason = CONNECTION_ENDINGS[ending]
    assert r.status == status, (ending, r.status, r.body)
    if reason is not None:
        assert r.headers.get("www-authenticate") == BEARER_INVALID
        assert node.metric("sidecar_jwt_failures_total", provider="corp", reason=reason) >= 1


# ----------------------------------------------------------------------------- JWKS file rotation


@pytest.mark.slow
def test_jwks_file_rotation_without_a_failed_request(tmp_path: Path, pki: Pki, own_app: int,
                                                     procs: list) -> None:
    old_key, new_key = ec_key("e2e-rot-old"), ec_key("e2e-rot-new")
    old_jwk, new_jwk = jwk(old_key, "old"), jwk(new_key, "new")
    node, _ = _file_node(tmp_path, pki, own_app, procs, [old_jwk])
    jwks = tmp_path / "policy" / "jwks.json"
    cached_old = sign(claims(), old_key, kid="old")
    assert node.get("/x", cached_old).status == 200
    assert node.get("/x", sign(claims(), new_key, kid="new")).status == 401

    # Publish old+new while old-key traffic keeps flowing: none of it may fail.
    statuses: list[int] = []
    replace_file(jwks, jwks_bytes(old_jwk, new_jwk))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        statuses.append(node.get("/x", sign(claims(), old_key, kid="old")).status)
        if node.get("/x", sign(claims(), new_key, kid="new")).status == 200:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the new key was not picked up from the JWKS file within 10 s")
    assert set(statuses) == {200}, statuses

    # The overlap: fresh tokens (no cache) alternating old/new, zero failures.
    failures = []
    for i in range(60):
        key, kid = (old_key, "old") if i % 2 else (new_key, "new")
        status = node.get("/x", sign(claims(), key, kid=kid)).status
        if status != 200:
            failures.append((i, kid, status))
    assert failures == []

    # Retire the old key: new keeps working, old is refused, even a token cached before.
    replace_file(jwks, jwks_bytes(new_jwk))
    wait_for(lambda: node.get("/x", sign(claims(), old_key, kid="old")).status == 401,
             timeout=10, interval=0.1)
    assert node.get("/x", cached_old).status == 401
    for _ in range(10):
        assert node.get("/x", sign(claims(), new_key, kid="new")).status == 200


# ----------------------------------------------------------------------------- jwks_uri over HTTPS


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 over HTTPS, in threads, that can fail or be slow.

    ``mode``: "ok" serves ``document``; "fail" answers 500; "slow" waits ``delay`` seconds
    (bounded, released at stop) before serving. ``fetches`` counts GET requests.
    """

    def __init__(self, ctx: ssl.SSLContext, document: bytes) -> None:
        self.document = document
        self.mode = "ok"
        self.delay = 0.0
        self.fetches = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # (head and body are two writes)
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                with server_self._lock:
                    server_self.fetches += 1
                    mode, delay, body = server_self.mode, server_self.delay, server_self.document
                if mode == "slow":
                    server_self._stopping.wait(delay)
                status = 500 if mode == "fail" else 200
                data = body if status == 200 else b"oops"
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, addr = self.socket.accept()
                sock.settimeout(5)
                return ctx.wrap_socket(sock, server_side=True), addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # handshake resets from the sidecar's timeouts are expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(self, mode: str, delay: float = 0.0) -> None:
        with self._lock:
            self.mode, self.delay = mode, delay

    def publish(self, document: bytes) -> None:
        with self._lock:
            self.document = document

    def count(self) -> int:
        with self._lock:
            return self.fetches

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_server(tmp_path: Path) -> Iterator[tuple[JwksServer, Path]]:
    ca_file, ctx = https_server_material(tmp_path / "jwks-tls")
    server = JwksServer(ctx, jwks_bytes(jwk(ec_key("e2e-ec-1"), "ec-1")))
    yield server, ca_file
    server.stop()


@pytest.mark.slow
def test_jwks_uri_fail_recover_slow_and_unknown_kid_storm(tmp_path: Path, pki: Pki,
                                                          own_app: int, procs: list,
                                                          jwks_server: tuple) -> None:
    server, ca_file = jwks_server
    server.set("fail")
    prov = provider_doc(jwks_uri=f"https://127.0.0.1:{server.port}/jwks.json",
                        jwks_ca=str(ca_file), jwks_refresh="1s", jwks_min_refetch="1s")
    node = start_node(tmp_path, pki, own_app,
                      policy_doc({"corp": prov}, [jwt_rule("corp", ["/**"], "corp")]))
    procs.append(node.sidecar)

    # 1. The first fetch failed: a valid token is refused (never a silent allow).
    wait_for(lambda: server.count() >= 1, timeout=10)
    r = node.get("/x", sign(claims()))
    assert r.status == 401 and r.headers.get("www-authenticate") == BEARER_INVALID
    assert node.metric("sidecar_jwt_failures_total", provider="corp", reason="no_keys") >= 1
    assert math.isnan(node.metric("sidecar_jwks_age_seconds", provider="corp"))

    # 2. The server recovers: keys are fetched in the background, requests pass.
    server.set("ok")
    wait_for(lambda: node.get("/x", sign(claims())).status == 200, timeout=10, interval=0.2)
    age = node.metric("sidecar_jwks_age_seconds", provider="corp")
    assert 0 <= age < 10

    # 3. A slow server: refreshes hang, yet requests (fresh tokens: real verifications with
    # the cached keys) are served at once.
    server.set("slow", delay=4.0)
    fetches = server.count()
    wait_for(lambda: server.count() > fetches, timeout=5)  # a refresh is now hanging
    worst = 0.0
    for _ in range(40):
        started = time.monotonic()
        assert node.get("/x", sign(claims())).status == 200
        worst = max(worst, time.monotonic() - started)
    assert worst < 1.0, f"a request waited {worst:.2f}s on a slow JWKS server"
    server.set("ok")
    wait_for(lambda: node.get("/x", sign(claims())).status == 200, timeout=5)

    # 4. Unknown-kid storm: many invented kids, a bounded number of fetches.
    attacker = ec.generate_private_key(ec.SECP256R1())
    time.sleep(1.2)  # let any pending refresh settle
    before, started = server.count(), time.monotonic()
    conn = httpclient.HTTPSConnection("127.0.0.1", node.port, context=node.ctx, timeout=10)
    try:
        for i in range(300):
            r = http(node.port, "GET", "/x", conn=conn, headers={
                "authorization": f"Bearer {sign(claims(), attacker, kid=f'storm-{i}')}"})
            assert r.status == 401
            if time.monotonic() - started > 6:
                break
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    storm_fetches = server.count() - before
    print(f"unknown-kid storm: {i + 1} requests in {elapsed:.2f}s -> {storm_fetches} JWKS fetches")
    # At most one fetch per second (refresh and min_refetch are both 1 s), plus slack.
    assert storm_fetches <= elapsed + 3, (storm_fetches, elapsed, i)
    assert i >= 100, "too few storm requests to mean anything"
    assert node.metric("sidecar_jwt_failures_total", provider="corp", reason="unknown_kid") > 100
    # Legitimate tokens still pass after the storm.
    assert node.get("/x", sign(claims())).status == 200


def test_jwks_uri_unknown_kid_triggers_one_background_refetch(tmp_path: Path, pki: Pki,
                                                              own_app: int, procs: list,
                                                              jwks_server: tuple) -> None:
    server, ca_file = jwks_server
    old_key, new_key = ec_key("e2e-ec-1"), ec_key("e2e-uri-new")
    # jwks_refresh is an hour: only an unknown kid can make the sidecar fetch again.
    prov = provider_doc(jwks_uri=f"https://127.0.0.1:{server.port}/jwks.json",
                        jwks_ca=str(ca_file), jwks_refresh="1h", jwks_min_refetch="1s")
    node = start_node(tmp_path, pki, own_app,
                      policy_doc({"corp": prov}, [jwt_rule("corp", ["/**"], "corp")]))
    procs.append(node.sidecar)
    wait_for(lambda: node.get("/x", sign(claims())).status == 200, timeout=10, interval=0.1)
    before = server.count()
    server.publish(jwks_bytes(jwk(old_key, "ec-1"), jwk(new_key, "new-1")))
    # The first request with the new kid is refused: the request path never waits on a fetch.
    assert node.get("/x", sign(claims(), new_key, kid="new-1")).status == 401
    wait_for(lambda: node.get("/x", sign(claims(), new_key, kid="new-1")).status == 200,
             timeout=5, interval=0.1)
    assert node.get("/x", sign(claims())).status == 200  # the old key is still published
    assert server.count() - before == 1


def test_ready_only_after_the_first_jwks_fetch_attempt(tmp_path: Path, pki: Pki, own_app: int,
                                                       procs: list,
                                                       jwks_server: tuple) -> None:
    server, ca_file = jwks_server
    server.set("slow", delay=1.5)
    prov = provider_doc(jwks_uri=f"https://127.0.0.1:{server.port}/jwks.json",
                        jwks_ca=str(ca_file))
    node = start_node(tmp_path, pki, own_app,
                      policy_doc({"corp": prov}, [jwt_rule("corp", ["/**"], "corp")]))
    procs.append(node.sidecar)
    # start_node returned on /readyz 200: the keys are there for the very first request.
    assert node.get("/x", sign(claims())).status == 200
    assert server.count() == 1


# ----------------------------------------------------------------------------- whose failure


def test_users_bad_tokens_never_block_the_frontend_relaying_them(tmp_path: Path, pki: Pki,
                                                                 own_app: int,
                                                                 procs: list) -> None:
    """Fifty users' bad tokens through one frontend: alerts per subject and issuer, but the
    frontend's address and identity are never blocked. The frontend's own failures (paths no
    rule allows it) still block it."""
    jwks = tmp_path / "policy" / "jwks.json"
    jwks.parent.mkdir(parents=True, exist_ok=True)
    replace_file(jwks, jwks_bytes(jwk(ec_key("e2e-ec-1"), "ec-1")))
    doc = policy_doc({"corp": provider_doc(jwks_file="jwks.json")}, [
        jwt_rule("readers", ["/orders/**"], "corp", {"scope": {"contains": "orders:read"}}),
        {"name": "guests-never-write", "deny": {"methods": ["POST"], "paths": ["/orders/**"],
                                                "jwt": {"provider": "corp",
                                                        "claims": {"role": "guest"}}}},
    ])
    doc["alerts"] = [
        {"name": "address-scanning", "threshold": 5, "window": "5m", "by": "address",
         "block": "10m"},
        {"name": "peer-scanning", "threshold": 5, "window": "5m", "by": "peer", "block": "10m"},
        {"name": "user-burst", "threshold": 5, "window": "5m", "by": "subject"},
        {"name": "issuer-burst", "threshold": 40, "window": "5m", "by": "issuer"},
    ]
    node = start_node(tmp_path, pki, own_app, doc)
    procs.append(node.sidecar)
    now = int(time.time())
    # Fifty users, each with one kind of bad credential (401 and 403 both).
    for i in range(50):
        kind = i % 5
        if kind == 0:
            token = sign(claims(sub=f"user-{i}", iat=now - 7200, exp=now - 3600))  # expired
        elif kind == 1:
            token = sign(claims(sub=f"user-{i}"), ec.generate_private_key(ec.SECP256R1()))
        elif kind == 2:
            token = sign(claims(sub=f"user-{i}", scope="profile"))  # 403 claims_mismatch
        elif kind == 3:
            token = sign_raw(payload_text(claims(sub=f"user-{i}"), "exp", "null"),
                             ec_key("e2e-ec-1"))
        else:
            token = "not-a-jwt"
        r = node.get(f"/orders/{i}", token)
        assert r.status in (401, 403), (i, r.status)
    r = http(node.port, "POST", "/orders/1",
             headers={"authorization": f"Bearer {sign(claims(role='guest'))}"}, ctx=node.ctx)
    assert r.status == 403  # denied by a rule about the user's token: the user's failure
    # The frontend is not blocked: the next user with a good token gets through.
    assert node.get("/orders/ok", sign(claims(sub="carol"))).status == 200
    assert node.metric("sidecar_source_blocked_total") == 0
    events = node.sidecar.log_events("alert_raised")
    assert [(e["alert"], e["source"]) for e in events] == [("issuer-burst", ISSUER)]

    # One user hammering with bad tokens: an alert naming that subject, still no block.
    for _ in range(5):
        assert node.get("/orders/1", sign(claims(sub="mallory", scope="none"))).status == 403
    assert node.get("/orders/ok", sign(claims(sub="carol"))).status == 200
    events = node.sidecar.log_events("alert_raised")
    assert ("user-burst", "mallory", "subject") in [(e["alert"], e["source"], e["by"])
                                                    for e in events]
    assert not [e for e in events if e["by"] in ("peer", "address")]

    # The frontend's own failures (paths no rule allows its identity) do count against it.
    for i in range(5):
        assert node.get(f"/admin/{i}", sign(claims())).status == 403
    # (source_blocked: refused at accept since the thirty-first session, no longer a 403)
    with pytest.raises((ssl.SSLError, OSError)):
        node.get("/orders/ok", sign(claims(sub="carol")))
    events = node.sidecar.log_events("alert_raised")
    assert {e["alert"] for e in events if e["by"] in ("peer", "address")} == {
        "address-scanning", "peer-scanning"}
    assert node.metric("sidecar_source_blocked_total") >= 1


def test_peer_certificate_failures_count_for_address_rules(tmp_path: Path, pki: Pki,
                                                           own_app: int, procs: list) -> None:
    """The peer's own credential is its certificate: handshakes with an untrusted or without
    a client certificate count for by: address rules (and block), while timeouts and plain
    TCP probes (health checks) do not."""
    doc = policy_doc({}, [{"name": "frontend", "allow": {"from": [spiffe("frontend")]}}])
    doc["alerts"] = [{"name": "address-scanning", "threshold": 3, "window": "5m",
                      "by": "address", "block": "10m"}]
    node = start_node(tmp_path, pki, own_app, doc)
    procs.append(node.sidecar)
    good = node.get("/x")
    assert good.status == 200
    for _ in range(3):  # plain TCP connect and close: no credential was presented
        s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        s.close()
    assert node.get("/x").status == 200
    assert node.sidecar.log_events("alert_raised") == []
    stranger = Pki(tmp_path / "other-pki")  # a CA the sidecar does not trust
    bad_ctx = mtls_context(stranger.identity("frontend"), pki.bundle)
    no_cert_ctx = mtls_context(None, pki.bundle)
    for ctx in (bad_ctx, no_cert_ctx, bad_ctx):
        with pytest.raises((ssl.SSLError, OSError)):
            http(node.port, "GET", "/x", ctx=ctx, timeout=5)
    wait_for(lambda: node.sidecar.log_events("alert_raised"), timeout=10)
    [alert] = node.sidecar.log_events("alert_raised")
    assert alert["alert"] == "address-scanning" and alert["source"] == "127.0.0.1"
    # The address is blocked now, valid certificate or not: refused at accept, before any
    # TLS byte (a 403 before the thirty-first session).
    with pytest.raises((ssl.SSLError, OSError)):
        node.get("/x")
    assert node.metric("sidecar_source_blocked_total") >= 1
