"""``required_claims`` and ``max_lifetime`` hold for introspection answers as for JWTs.

Found by a hostile review: a provider with ``introspection`` ignored both, so an "active"
answer without the claims the operator required (no ``sub``, no ``jti``, no ``exp``), or for
a token living 30 days under ``max_lifetime: 60s``, was accepted and reached the app, while
``policy check`` said ok. An introspection provider requires nothing by default (RFC 7662
2.2: every member of an answer but ``active`` is optional). Through a real sidecar and a
scripted HTTPS authorisation server; each answer is a member of a family given as data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.policy.sections import JwtProvider
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://as.example"


def _answer(kind: str) -> dict[str, Any]:
    """The active answer the server gives for a token ``<kind>-<n>``."""
    now = int(time.time())
    full = {"active": True, "iss": ISS, "aud": "orders", "sub": "alice", "jti": "j-1",
            "iat": now - 10, "exp": now + 30}
    drop = {"no_sub": "sub", "no_jti": "jti", "no_exp": "exp", "no_iat": "iat"}
    if kind in drop:
        del full[drop[kind]]
    elif kind.startswith("null_"):  # (sub, jti: null is no value)
        full[kind[5:]] = None
    elif kind == "long_by_iat":
        full["exp"] = now + 30 * 86400
    elif kind == "long_by_nbf":
        del full["iat"]
        full["nbf"] = now - 10
        full["exp"] = now + 3600
    elif kind == "long_from_now":
        del full["iat"]
        full["exp"] = now + 3600
    elif kind == "bare":  # only what RFC 7662 requires, and what the provider checks
        full = {"active": True, "aud": "orders"}
    return full


class AuthServer(h.IntrospectionServer):
    def document(self, token: str) -> dict[str, Any]:
        return _answer(token.rsplit("-", 1)[0])


# (token kind, status on /strict/** -- required_claims [exp, sub, jti] and max_lifetime 60s
# --, status on /plain/** -- no claim conditions, the introspection default --, the failure)
FAMILY = [
    ("full", 200, 200, None),
    ("no_sub", 401, 200, "missing_claim"),
    ("no_jti", 401, 200, "missing_claim"),
    ("null_sub", 401, 401, "bad_claim"),     # a registered claim of the wrong type
    ("null_jti", 401, 401, "bad_claim"),
    ("no_exp", 401, 200, "missing_claim"),
    ("no_iat", 200, 200, None),             # exp - now is within 60 s
    ("long_by_iat", 401, 200, "lifetime_too_long"),
    ("long_by_nbf", 401, 200, "lifetime_too_long"),
    ("long_from_now", 401, 200, "lifetime_too_long"),
    ("bare", 401, 200, "missing_claim"),
]


def _provider(server: AuthServer, header: str, **conditions: Any) -> dict[str, Any]:
    return {"issuer": ISS, "audiences": ["orders"],
            "from_headers": [{"name": header, "prefix": ""}], **conditions,
            "introspection": {"endpoint": f"https://127.0.0.1:{server.port}/introspect",
                              "ca": str(server.ca_file), "client_id": "orders",
                              "client_secret_file": "secret", "timeout": "10s"}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrdersMesh, AuthServer]]:
    tmp = tmp_path_factory.mktemp("introspection-claims")
    server = AuthServer(tmp / "as")
    frontend = h.spiffe("frontend")
    policy = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {
            "strict": _provider(server, "x-strict-token", required_claims=["exp", "sub", "jti"],
                                max_lifetime="60s"),
            "plain": _provider(server, "x-plain-token"),
        },
        "services": {h.spiffe("orders"): {"rules": [
            {"name": "strict", "allow": {"from": [frontend], "paths": ["/strict/**"],
                                         "jwt": {"provider": "strict"}}},
            {"name": "plain", "allow": {"from": [frontend], "paths": ["/plain/**"],
                                        "jwt": {"provider": "plain"}}},
        ]}},
    }
    try:
        with orders_mesh(tmp, policy, {"secret": "s3cret\n"}) as m:
            yield m, server
    finally:
        server.close()


@pytest.mark.parametrize(("kind", "strict", "plain", "reason"), FAMILY)
def test_claim_conditions_apply_to_introspection_answers(
        mesh: tuple[OrdersMesh, AuthServer], kind: str, strict: int, plain: int,
        reason: str | None) -> None:
    m, _ = mesh
    token = f"{kind}-{time.monotonic_ns()}"  # a new token: asked about, not cached
    before = m.sidecar.metric("sidecar_jwt_failures_total", provider="strict",
                              reason=reason) if reason else 0
    r = m.get("/strict/x", {"x-strict-token": token})
    assert r.status == strict, (kind, r.status, r.body[:200])
    if reason:  # (counted once the answer is sent: waited for)
        h.wait_for(lambda: m.sidecar.metric("sidecar_jwt_failures_total", provider="strict",
                                            reason=reason) == before + 1, timeout=10)
    assert m.get("/plain/x", {"x-plain-token": token}).status == plain, kind


def test_an_introspection_provider_requires_nothing_by_default() -> None:
    from sidecar.policy.sections import Introspection

    intro = Introspection(endpoint="https://as.example/i", client_id="c",
                          client_secret_file="s")
    assert JwtProvider("p", ISS, ("a",), (), introspection=intro).required_claims == ()
    assert JwtProvider("p", ISS, ("a",), ("ES256",)).required_claims == ("exp",)
    given = JwtProvider("p", ISS, ("a",), (), introspection=intro, required_claims=("exp",))
    assert given.required_claims == ("exp",)


def test_policy_check_and_docs_say_the_conditions_apply(tmp_path) -> None:
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "authn.md").read_text()
    assert "`required_claims` and `max_lifetime` apply to the answer" in text
