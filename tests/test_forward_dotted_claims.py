"""``forward_claims`` reads a dotted claim name as claim rules read it
(``sidecar.authn.authenticator.Authenticator.forward_headers``, ``claim_readings``;
docs/authn.md "Claims for the app").

Found by a hostile review (thirtieth session): ``forward_claims: {realm_access.roles:
x-roles}`` looked up a top-level member of that literal name only, so Keycloak's nested realm
roles were never forwarded, and a flat member ``"realm_access.roles"`` beside the nested one
-- which a Keycloak adapter or Spring's ``getClaimAsMap("realm_access")`` never reads -- was
forwarded as the claim. Now every reading is taken (the flat member and every walk through
nested objects); one value, or several equal ones, is forwarded; readings that disagree
forward nothing. The family (``CASES``): nested, flat, both equal, both different, deeper
nesting, a key holding a dot, absent; in process with real tokens and keys, and one case end
to end through a real sidecar.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.authn.authenticator import Authenticator
from sidecar.policy.sections import PolicyExtras
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import NOW, claims, ec_key, jwk, key_set, mint, provider

ROLES = "realm_access.roles"
SHOP = "resource_access.shop.api.roles"  # (the client id ``shop.api`` holds a dot)
# (claims in the token, the claim name forwarded, the header value the app gets or None)
CASES: dict[str, tuple[dict[str, Any], str, bytes | None]] = {
    "nested (Keycloak)": ({"realm_access": {"roles": ["user"]}}, ROLES, b'["user"]'),
    "flat only": ({ROLES: ["user"]}, ROLES, b'["user"]'),
    "flat and nested equal": ({ROLES: ["user"], "realm_access": {"roles": ["user"]}}, ROLES,
                              b'["user"]'),
    "flat shadowing nested": ({ROLES: ["admin"], "realm_access": {"roles": ["user"]}}, ROLES,
                              None),
    "deeper, a key holding a dot": ({"resource_access": {"shop.api": {"roles": ["buyer"]}}},
                                    SHOP, b'["buyer"]'),
    "two walks that disagree": ({"resource_access": {"shop.api": {"roles": ["buyer"]},
                                                     "shop": {"api": {"roles": ["root"]}}}},
                                SHOP, None),
    "absent": ({"realm_access": {}}, ROLES, None),
    # Readings that Python's == takes for equal and JSON does not (found by a hostile review,
    # thirty-fifth session: one of them was forwarded).
    "true and 1 disagree": ({"perm": {"admin": True}, "perm.admin": 1}, "perm.admin", None),
    "1 and 1.0 disagree": ({"perm": {"admin": 1}, "perm.admin": 1.0}, "perm.admin", None),
    "false and 0 disagree": ({"perm": {"admin": False}, "perm.admin": 0}, "perm.admin", None),
    "[1] and [true] disagree": ({"perm": {"admin": [1]}, "perm.admin": [True]}, "perm.admin",
                                None),
    "objects of 1 and true disagree": ({"perm": {"admin": {"a": 1}}, "perm.admin": {"a": True}},
                                       "perm.admin", None),
    "equal objects, members in another order, agree": (  # (the flat member's text is sent)
        {"perm": {"admin": {"a": 1, "b": [2]}}, "perm.admin": {"b": [2], "a": 1}}, "perm.admin",
        b'{"b":[2],"a":1}'),
    "equal numbers agree": ({"perm": {"admin": 1}, "perm.admin": 1}, "perm.admin", b"1"),
    "undotted, as before": ({"tier": "gold"}, "tier", b"gold"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_dotted_claim_is_forwarded_only_when_every_reading_agrees(case: str) -> None:
    extra, name, want = CASES[case]
    corp = provider(forward_claims=((name, "x-forwarded-claim"),))
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": corp}))
    auth.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    token = mint(claims(**extra), ec_key())
    facts = auth.authenticate(["corp"], [(b"authorization", f"Bearer {token}".encode())], "",
                              NOW)
    assert "corp" in facts.claims, facts
    got = dict(auth.forward_headers(facts)).get(b"x-forwarded-claim")
    assert got == want, (case, got)


ISS = "https://keycloak.example/realms/shop"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    policy = {"version": 1, "trust_domain": h.TD, "jwt_providers": {"kc": {
        "issuer": ISS, "audiences": ["orders"], "algorithms": ["ES256"],
        "jwks_file": "keys.json", "forward_claims": {ROLES: "x-roles", "perm.admin": "x-admin"}}},
        "services": {h.spiffe("orders"): {"rules": [{"name": "api", "allow": {
            "from": [h.spiffe("frontend")], "paths": ["/api/**"], "jwt": {"provider": "kc"}}}]}}}
    files = {"keys.json": json.dumps({"keys": [jwk(ec_key("kc"), "k1")]})}
    with orders_mesh(tmp_path_factory.mktemp("forward-dotted"), policy, files) as m:
        yield m


@pytest.mark.parametrize("case", ["nested (Keycloak)", "flat shadowing nested",
                                  "true and 1 disagree", "[1] and [true] disagree"])
def test_a_real_sidecar_forwards_the_nested_roles_and_never_the_shadow(
        mesh: OrdersMesh, case: str) -> None:
    extra, name, want = CASES[case]
    header = "x-roles" if name == ROLES else "x-admin"
    token = mint({"iss": ISS, "aud": "orders", "sub": "alice", "iat": int(NOW.real) - 5,
                  "exp": int(NOW.real) + 10**8, **extra}, ec_key("kc"), kid="k1")
    got = mesh.get("/api/x", {"authorization": f"Bearer {token}"})
    assert got.status == 200, got.body[:200]
    seen = json.loads(got.body)["headers"]
    roles = [v for k, v in (seen.items() if isinstance(seen, dict) else seen)
             if k.lower() == header]
    assert roles == ([] if want is None else [want.decode()]), (case, roles)
