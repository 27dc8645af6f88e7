"""An introspection answer may not name two members that differ only in case (hostile review,
thirty-third session).

A token's payload was read with the strict reader's case folding (``role``/``ROLE`` refused
in any object: Go's encoding/json takes the last case-insensitive match, .NET compares claim
types without case), an introspection answer without it. Its claims meet the same rules,
``forward_claims`` and revocations: an answer holding ``realm_access: {"roles": ["reader"],
"ROLES": ["admin"]}`` passed a rule on ``realm_access.roles`` and reached a Go app as
``["admin"]``. The family of twins as data, every member in process and through a real
sidecar against a scripted HTTPS authorisation server: each is refused (401) for that token
alone, and the next plain token is still accepted (no provider-wide backoff).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.authn.oauth import introspection_claims
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://as.example/"

# name -> the members added to an active answer (raw JSON text: a dict cannot hold twins
# that Python reads as one, and the order is part of the attack).
TWINS: dict[str, str] = {
    "nested ASCII case": '"realm_access": {"roles": ["reader"], "ROLES": ["admin"]}',
    "nested, the twin first": '"realm_access": {"Roles": ["admin"], "roles": ["reader"]}',
    "top-level sub and SUB": '"SUB": "admin"',
    "top-level long s": '"\\u017fub": "admin"',
    "long s as UTF-8": '"\u017fub": "admin"',
    "Kelvin sign": '"realm_access": {"roles": ["reader"]}, "\\u212aind": "a", "kind": "b"',
    "inside an array": '"groups": [{"name": "staff", "NAME": "admins"}]',
    "deep": '"a": {"b": {"c": {"role": "user", "rOlE": "root"}}}',
    "scope": '"Scope": "admin:all"',
    "active twin": '"ACTIVE": false',
}


def answer(extra: str, sub: str = "alice") -> bytes:
    return (f'{{"active": true, "iss": "{ISS}", "aud": "orders", "sub": "{sub}", '
            f'"exp": {int(time.time()) + 600}, "scope": "read", {extra}}}').encode()


@pytest.mark.parametrize("name", list(TWINS))
def test_the_answers_reader_refuses_every_twin(name: str) -> None:
    with pytest.raises(ValueError, match="differ only in case"):
        introspection_claims(200, answer(TWINS[name]), "i")


def test_an_answer_without_twins_is_read() -> None:
    claims = introspection_claims(200, answer('"realm_access": {"roles": ["reader"]}'), "i")
    assert claims is not None and claims["realm_access"] == {"roles": ["reader"]}


class AuthServer(h.IntrospectionServer):
    """``twin.N``: the answer with member N of ``TWINS``; anything else a plain answer."""

    def document(self, token: str) -> bytes:
        kind, _, n = token.partition(".")
        if kind == "twin":
            return answer(TWINS[list(TWINS)[int(n) % len(TWINS)]])
        return answer('"realm_access": {"roles": ["reader"]}', sub="bob")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    tmp = tmp_path_factory.mktemp("case-twins")
    server = AuthServer(tmp / "as")
    policy: dict[str, Any] = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {"opaque": {
            "issuer": ISS, "audiences": ["orders"],
            "forward_claims": {"sub": "x-user", "realm_access": "x-realm-access"},
            "introspection": {"endpoint": f"https://127.0.0.1:{server.port}/introspect",
                              "ca": str(server.ca_file), "client_id": "orders",
                              "client_secret_file": "secret", "timeout": "5s"}}},
        "services": {h.spiffe("orders"): {"rules": [
            {"name": "any", "allow": {"from": [h.spiffe("frontend")], "paths": ["/any/**"],
                                      "jwt": {"provider": "opaque"}}},
            {"name": "readers", "allow": {
                "from": [h.spiffe("frontend")], "paths": ["/readers/**"],
                "jwt": {"provider": "opaque",
                        "claims": {"realm_access.roles": {"contains": "reader"}}}}}]}},
    }
    try:
        with orders_mesh(tmp, policy, {"secret": "s3cret\n"}) as m:
            yield m
    finally:
        server.close()


@pytest.mark.parametrize("path", ["/any/x", "/readers/x"])
def test_a_sidecar_refuses_every_twin_for_that_token_alone(mesh: OrdersMesh, path: str) -> None:
    wrong = []
    for n, name in enumerate(TWINS):
        token = f"twin.{n + len(TWINS) * (path == '/readers/x')}"
        r = mesh.get(path, {"authorization": f"Bearer {token}"})
        if r.status != 401:
            wrong.append((name, r.status, r.body[:200]))
        plain = mesh.get(path, {"authorization": f"Bearer plain.{n}.{path}"})
        if plain.status != 200:
            wrong.append((name, "the next plain token", plain.status))
        else:
            seen = dict(json.loads(plain.body)["headers"])
            if seen.get("x-user") != "bob":
                wrong.append((name, "plain forwarded", seen))
    assert not wrong, wrong
