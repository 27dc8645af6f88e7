"""A refresh token or an ID token presented as a bearer token (hostile review).

RFC 7662 2.1: an authorisation server that does not find the token under
``token_type_hint`` (the sidecar sends ``access_token``) MUST search its other token types.
So a client that presented its *refresh* token to an introspected provider got an
``active`` answer with the same ``iss``, ``aud`` and ``sub`` as its access tokens, and the
sidecar accepted it: a token valid for days, meant only for the authorisation server, and
for a confidential client useless without the client's own credentials -- here enough on its
own. Servers say which kind of token they answered about: ``token_use`` (Ory Hydra,
Cognito), ``token_type`` (RFC 8693 URNs), Keycloak's ``typ``.

Now an answer that names a refresh, offline, ID or logout token, or whose member is not a
string, is refused as ``inactive`` (a generic 401). The family as data, through a real
sidecar and a scripted HTTPS authorisation server on 127.0.0.1, on the provider's route and
on a token-free one; the answers that name access tokens (and those that name none) are
accepted, as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.authn.jwt import TokenInvalid
from sidecar.authn.oauth import INACTIVE, check_access_token_answer
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://as.example"
FRONTEND = h.spiffe("frontend")

# What an answer says about the token's kind: refused (not an access token).
NOT_ACCESS: dict[str, dict[str, Any]] = {
    "hydra_refresh": {"token_use": "refresh_token"},
    "cognito_id": {"token_use": "id"},
    "token_use_unknown": {"token_use": "session"},
    "token_use_not_a_string": {"token_use": ["access_token"]},
    "token_type_refresh": {"token_type": "refresh_token"},
    "token_type_refresh_urn": {"token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
    "token_type_id_urn": {"token_type": "urn:ietf:params:oauth:token-type:id_token"},
    "token_type_id": {"token_type": "id_token"},
    "token_type_not_a_string": {"token_type": 1},
    "keycloak_refresh": {"typ": "Refresh"},
    "keycloak_offline": {"typ": "Offline"},
    "keycloak_id": {"typ": "ID"},
    "keycloak_logout": {"typ": "Logout"},
    "bearer_but_refresh_use": {"token_type": "Bearer", "token_use": "refresh_token"},
}
# Accepted, as before.
ACCESS: dict[str, dict[str, Any]] = {
    "says_nothing": {},
    "bearer": {"token_type": "Bearer"},
    "access_urn": {"token_type": "urn:ietf:params:oauth:token-type:access_token"},
    "hydra_access": {"token_use": "access_token", "token_type": "Bearer"},
    "cognito_access": {"token_use": "access"},
    "keycloak_access": {"typ": "Bearer"},
}
KINDS = {**NOT_ACCESS, **ACCESS}


def answer_for(label: str) -> dict[str, Any]:
    return {"active": True, "iss": ISS, "aud": "orders", "sub": "alice",
            "exp": int(time.time()) + 600, **KINDS[label]}


@pytest.mark.parametrize("label", list(NOT_ACCESS))
def test_an_answer_naming_another_kind_of_token_is_refused(label: str) -> None:
    with pytest.raises(TokenInvalid) as info:
        check_access_token_answer(answer_for(label))
    assert info.value.reason == INACTIVE


@pytest.mark.parametrize("label", list(ACCESS))
def test_an_answer_naming_an_access_token_or_nothing_is_accepted(label: str) -> None:
    check_access_token_answer(answer_for(label))


class AuthServer(h.IntrospectionServer):
    """RFC 7662 endpoint: the token ``<label>.<n>`` is active, with ``KINDS[label]``."""

    def document(self, token: str) -> dict[str, Any]:
        label = token.partition(".")[0]
        return answer_for(label) if label in KINDS else {"active": False}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrdersMesh, AuthServer]]:
    tmp = tmp_path_factory.mktemp("introspection-kinds")
    server = AuthServer(tmp / "as")
    policy = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {"opaque": {"issuer": ISS, "audiences": ["orders"], "introspection": {
            "endpoint": f"https://127.0.0.1:{server.port}/introspect",
            "ca": str(server.ca_file), "client_id": "orders", "client_secret_file": "secret",
            "timeout": "10s"}}},
        "services": {h.spiffe("orders"): {"rules": [
            {"name": "api", "allow": {"from": [FRONTEND], "paths": ["/api/**"],
                                      "jwt": {"provider": "opaque"}}},
            {"name": "open", "allow": {"from": [FRONTEND], "paths": ["/open/**"]}},
        ]}},
    }
    try:
        with orders_mesh(tmp, policy, {"secret": "s3cret\n"}) as mesh:
            yield mesh, server
    finally:
        server.close()


def test_every_kind_through_a_sidecar(env: tuple[OrdersMesh, AuthServer]) -> None:
    mesh, server = env
    for n, label in enumerate(KINDS):
        token = f"{label}.{n}"
        r = mesh.get("/api/x", {"authorization": f"Bearer {token}"})
        if label in ACCESS:
            assert r.status == 200, (label, r.status, r.body[:200])
            continue
        assert r.status == 401, (label, r.status, r.body[:200])
        assert r.headers.get("www-authenticate") == \
            'Bearer realm="sidecar", error="invalid_token"'
        assert b"refresh" not in r.body.lower() and b"inactive" not in r.body.lower()
    assert server.calls == len(KINDS)
    # The provider's route asked the server: the refused tokens are refused on the
    # token-free route too (from the cache, no new call) and never reach the app.
    for n, label in enumerate(NOT_ACCESS):
        r = mesh.get("/open/x", {"authorization": f"Bearer {label}.{n}"})
        assert r.status == 401, (label, r.status, r.body[:200])
    assert mesh.sidecar.metric("sidecar_jwt_failures_total", provider="opaque",
                               reason="inactive") >= len(NOT_ACCESS)
    # The introspection metric says the same: every answer about a token that is not an
    # access token is counted ``inactive``, not ``active``.
    assert mesh.sidecar.metric("sidecar_introspection_calls_total", provider="opaque",
                               result="inactive") == len(NOT_ACCESS)
    assert mesh.sidecar.metric("sidecar_introspection_calls_total", provider="opaque",
                               result="active") == len(ACCESS)
