"""JWTs that say they are not access tokens (hostile review).

An identity provider signs ID tokens, logout tokens and other Security Event Tokens with the
keys that sign its access tokens, for the same issuer and often the same audience (the
client's). A provider without ``typ: at+jwt`` accepted all of them as access tokens: an
OpenID Connect ID token (``nonce``, ``at_hash``...) sent as a bearer token, Cognito's
``token_use: id``, Keycloak's ``typ: ID`` / ``Refresh`` / ``Logout``, a ``logout+jwt``.
RFC 8725 3.11 (explicit typing) and RFC 9068 say one kind must not pass for another; the
introspection path already refused answers that name these kinds.

Now a token whose header ``typ`` names another kind of JWT (when the provider requires no
``typ``), whose ``token_use`` / ``token_type`` / payload ``typ`` names a non-access kind (or
is not a string), or that carries a claim only ID tokens or SETs carry is ``bad_typ`` (a
generic 401). The family as data: in the verifier, and every member through a real sidecar
on a route whose rule needs the token and on a token-free one; access tokens as IdPs issue
them (no ``typ``, ``JWT``, ``at+jwt``, ``auth_time``/``azp``/``acr``/``amr``/``sid``, which
RFC 9068 2.2.1 allows) stay accepted.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from jwt.algorithms import ECAlgorithm

from sidecar.authn.jwt import BAD_TYP, TokenInvalid, verify_token
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import NOW, b64, claims, ec_key, jwk, key_set, provider

ES256 = ECAlgorithm(ECAlgorithm.SHA256)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://users.example/"
FRONTEND = h.spiffe("frontend")
INVALID = 'Bearer realm="sidecar", error="invalid_token"'

# (header members, payload members) of tokens that are not access tokens.
NOT_ACCESS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "oidc-id-token-nonce": ({"typ": "JWT"}, {"nonce": "n-0S6_WzA2Mj"}),
    "oidc-id-token-no-typ-nonce": ({}, {"nonce": "n-0S6_WzA2Mj", "auth_time": 1}),
    "oidc-id-token-at_hash": ({}, {"at_hash": "77QmUPtjPfzWtF2AnpK9RQ"}),
    "oidc-id-token-c_hash": ({}, {"c_hash": "LDktKdoQak3Pk0cnXxCltA"}),
    "fapi-id-token-s_hash": ({}, {"s_hash": "x"}),
    "nonce-null": ({}, {"nonce": None}),
    "backchannel-logout": ({"typ": "logout+jwt"}, {
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}}, "sid": "s"}),
    "logout-events-no-typ": ({}, {
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}}}),
    "secevent": ({"typ": "secevent+jwt"}, {}),
    "secevent-application": ({"typ": "application/secevent+jwt"}, {}),
    "dpop-proof-typ": ({"typ": "dpop+jwt"}, {}),
    "introspection-response": ({"typ": "token-introspection+jwt"}, {}),
    "request-object": ({"typ": "oauth-authz-req+jwt"}, {}),
    "id-token-typ": ({"typ": "id_token+jwt"}, {}),
    "typ-empty": ({"typ": ""}, {}),
    "typ-unknown": ({"typ": "JWS"}, {}),
    "cognito-id": ({}, {"token_use": "id"}),
    "token_use-refresh": ({}, {"token_use": "refresh_token"}),
    "token_use-unknown": ({}, {"token_use": "session"}),
    "token_use-not-a-string": ({}, {"token_use": ["access"]}),
    "keycloak-id": ({"typ": "JWT"}, {"typ": "ID"}),
    "keycloak-refresh": ({"typ": "JWT"}, {"typ": "Refresh"}),
    "keycloak-offline": ({}, {"typ": "Offline"}),
    "keycloak-logout": ({}, {"typ": "Logout"}),
    "payload-typ-not-a-string": ({}, {"typ": 1}),
    "token_type-id-urn": ({}, {"token_type": "urn:ietf:params:oauth:token-type:id_token"}),
    "token_type-refresh": ({}, {"token_type": "refresh_token"}),
    "token_type-not-a-string": ({}, {"token_type": True}),
    # An at+jwt header does not make a token that says it is an ID token an access token.
    "at+jwt-with-nonce": ({"typ": "at+jwt"}, {"nonce": "n"}),
    "at+jwt-cognito-id": ({"typ": "at+jwt"}, {"token_use": "id"}),
}
# Access tokens as identity providers issue them: accepted.
ACCESS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "no-typ": ({}, {}),
    "JWT": ({"typ": "JWT"}, {}),
    "jwt-lower": ({"typ": "jwt"}, {}),
    "application/jwt": ({"typ": "application/jwt"}, {}),
    "JOSE": ({"typ": "JOSE"}, {}),
    "at+jwt": ({"typ": "at+jwt"}, {}),
    "application/at+jwt": ({"typ": "application/at+jwt"}, {}),
    "cognito-access": ({}, {"token_use": "access"}),
    "hydra-access": ({}, {"token_use": "access_token"}),
    "keycloak-access": ({"typ": "JWT"}, {"typ": "Bearer", "azp": "web", "acr": "1",
                                         "sid": "s", "auth_time": 1}),
    "token_type-access-urn": ({}, {
        "token_type": "urn:ietf:params:oauth:token-type:access_token"}),
    "rfc9068-claims": ({"typ": "at+jwt"}, {"auth_time": 1, "acr": "urn:x", "amr": ["pwd"],
                                           "client_id": "web"}),
}


def _signed(header: dict[str, Any], payload: dict[str, Any], key: Any) -> str:
    """A compact ES256 JWS of exactly these members (``mint`` would drop ``typ: ""``)."""
    signing_input = ".".join(b64(json.dumps(part, separators=(",", ":")).encode())
                             for part in ({"alg": "ES256", **header}, payload))
    signature = ES256.sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def _core_token(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _signed({"kid": "ec-1", **header}, {**claims(), **payload}, ec_key())


@pytest.mark.parametrize("label", list(NOT_ACCESS))
def test_the_verifier_refuses_another_kind_of_jwt(label: str) -> None:
    header, payload = NOT_ACCESS[label]
    with pytest.raises(TokenInvalid) as info:
        verify_token(_core_token(header, payload), provider(), key_set((ec_key(), "ec-1")),
                     NOW)
    assert info.value.reason == BAD_TYP


@pytest.mark.parametrize("label", list(ACCESS))
def test_the_verifier_accepts_access_tokens(label: str) -> None:
    header, payload = ACCESS[label]
    assert verify_token(_core_token(header, payload), provider(), key_set((ec_key(), "ec-1")),
                        NOW)


def _token(header: dict[str, Any], payload: dict[str, Any]) -> str:
    now = int(time.time())
    return _signed({"kid": "k1", **header}, {
        "iss": ISS, "aud": "orders", "sub": "alice", "jti": uuid.uuid4().hex,
        "iat": now - 5, "exp": now + 600, **payload}, ec_key("kinds"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    policy = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {"users": {"issuer": ISS, "audiences": ["orders"],
                                    "algorithms": ["ES256"], "jwks_file": "keys.json"}},
        "services": {h.spiffe("orders"): {"rules": [
            {"name": "orders", "allow": {"from": [FRONTEND], "paths": ["/orders/**"],
                                         "jwt": {"provider": "users"}}},
            {"name": "public", "allow": {"from": [FRONTEND], "paths": ["/public/**"]}},
        ]}},
    }
    keys = json.dumps({"keys": [jwk(ec_key("kinds"), "k1")]})
    with orders_mesh(tmp_path_factory.mktemp("jwt-kinds"), policy,
                     {"keys.json": keys}) as mesh:
        yield mesh


@pytest.mark.parametrize("route", ["/orders/x", "/public/x"])
def test_other_kinds_of_jwt_are_refused_through_a_sidecar(env: OrdersMesh, route: str) -> None:
    wrong = []
    for label, (header, payload) in NOT_ACCESS.items():
        token = _token(header, payload)
        r = env.get(route, {"authorization": f"Bearer {token}"})
        if r.status != 401 or r.headers.get("www-authenticate") != INVALID \
                or token.encode() in r.body:
            wrong.append((label, r.status))
    assert not wrong, wrong


@pytest.mark.parametrize("route", ["/orders/x", "/public/x"])
def test_access_tokens_pass_through_a_sidecar(env: OrdersMesh, route: str) -> None:
    wrong = []
    for label, (header, payload) in ACCESS.items():
        r = env.get(route, {"authorization": f"Bearer {_token(header, payload)}"})
        if r.status != 200:
            wrong.append((label, r.status))
    assert not wrong, wrong
