"""decide() semantics, table-driven: order, wildcards, credentials, modes, expiry, egress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config.values import parse_timestamp
from sidecar.policy.decision import NO_AUTH, AuthFacts, Decision, RequestFacts
from sidecar.policy.engine import decide, decide_egress
from sidecar.policy.loader import load_policy, load_policy_file

POLICIES = Path(__file__).resolve().parent.parent / "policies"
TD = "spiffe://t.local"
API = f"{TD}/ns/shop/sa/api"
FRONT = f"{TD}/ns/shop/sa/frontend"
OTHER = f"{TD}/ns/other/sa/x"

POLICY = load_policy(
    f"""
version: 1
trust_domain: t.local
jwt_providers:
  corp: {{issuer: i, audiences: [a], algorithms: [ES256], jwks_file: k.json}}
api_keys:
  - {{name: batch, sha256: {"a" * 64}}}
  - {{name: other, sha256: {"b" * 64}}}
services:
  {API}:
    rules:
      - name: admin-denied                    # a deny listed before and after allows
        deny: {{paths: [/admin/**]}}
      - name: frontend-reads
        allow:
          from: [{FRONT}]
          methods: [GET]
          paths: [/orders, /orders/*]
      - name: shop-health
        allow: {{namespaces: [shop], paths: [/healthz]}}
      - name: any-sa-in-shop-status
        allow: {{from: ["{TD}/ns/shop/sa/*"], paths: [/status]}}
      - name: admin-allowed-too
        allow: {{from: [{FRONT}], paths: [/admin/**]}}
      - name: writes-need-scope
        allow:
          from: [{FRONT}]
          methods: [POST]
          paths: [/orders]
          jwt: {{provider: corp, claims: {{scope: {{contains: orders:write}}, tier: {{one_of: [gold]}}}}}}
      - name: batch-with-key
        allow: {{paths: [/batch/**], apikey: [batch]}}
      - name: any-key
        allow: {{paths: [/keyed], apikey: true}}
      - name: host-port-listener
        allow: {{paths: [/hp], hosts: [api.local], ports: [8443], listeners: [inbound]}}
      - name: guests-cannot-write
        deny: {{methods: [POST], jwt: {{provider: corp, claims: {{role: guest}}}}}}
      - name: expired-glass
        expires_at: 2020-01-01T00:00:00Z
        allow: {{from: [{OTHER}]}}
      - name: future-glass
        expires_at: 2999-01-01T00:00:00Z
        allow: {{from: [{OTHER}], paths: [/glass]}}
      - name: trial-deny
        mode: dry-run
        deny: {{paths: [/orders/secret]}}
      - name: trial-allow
        mode: dry-run
        allow: {{from: [{OTHER}], paths: [/trial]}}
      - name: enforced-in-any-mode
        mode: enforce
        deny: {{paths: [/forbidden]}}
    egress: [{FRONT}, "{TD}/ns/pay/sa/*"]
  {TD}/ns/shop/sa/dry:
    mode: dry-run
    rules:
      - {{name: only-get, allow: {{methods: [GET]}}}}
      - {{name: no-x, deny: {{paths: [/x]}}, mode: enforce}}
""",
    "engine.yaml",
)
NOW = parse_timestamp("2025-01-01T00:00:00Z")


def facts(peer: str | None, method: str, path: str, **kw: Any) -> RequestFacts:
    return RequestFacts("inbound", peer, "10.0.0.1", method, path, kw.pop("host", "api"),
                        kw.pop("port", 15443), **kw)


def d(peer: str | None, method: str, path: str, auth: AuthFacts = NO_AUTH, **kw: Any) -> Decision:
    decision = decide(POLICY, API, facts(peer, method, path, **kw), auth, NOW)
    oracle = decide(POLICY, API, facts(peer, method, path, **kw), auth, NOW, _unindexed=True)
    assert decision == oracle
    return decision


GOOD = AuthFacts(claims={"corp": {"scope": "orders:read orders:write", "tier": "gold"}})


@pytest.mark.parametrize(
    ("peer", "method", "path", "auth", "expect"),
    [
        (FRONT, "GET", "/orders", NO_AUTH, ("allow", "frontend-reads", "allowed", 0)),
        (FRONT, "GET", "/orders/7", NO_AUTH, ("allow", "frontend-reads", "allowed", 0)),
        (FRONT, "GET", "/orders/7/", NO_AUTH, ("allow", "frontend-reads", "allowed", 0)),
        (FRONT, "GET", "/orders/7/items", NO_AUTH, ("deny", "default deny", "default_deny", 403)),
        (FRONT, "DELETE", "/orders", NO_AUTH, ("deny", "default deny", "default_deny", 403)),
        (OTHER, "GET", "/orders", NO_AUTH, ("deny", "default deny", "default_deny", 403)),
        (None, "GET", "/orders", NO_AUTH, ("deny", "default deny", "default_deny", 403)),
        # DENY beats ALLOW whatever the order; ** covers the prefix itself and deeper paths
        (FRONT, "GET", "/admin", NO_AUTH, ("deny", "admin-denied", "denied_by_rule", 403)),
        (FRONT, "GET", "/admin/", NO_AUTH, ("deny", "admin-denied", "denied_by_rule", 403)),
        (FRONT, "GET", "/admin/a/b", NO_AUTH, ("deny", "admin-denied", "denied_by_rule", 403)),
        (FRONT, "GET", "/administrator", NO_AUTH, ("deny", "default deny", "default_deny", 403)),
        # namespaces and one-segment caller wildcards
        (FRONT, "GET", "/healthz", NO_AUTH, ("allow", "shop-health", "allowed", 0)),
        (OTHER, "GET", "/healthz", NO_AUTH, ("deny", "default deny", "default_deny", 403)),
        ("spiffe://evil.local/ns/shop/sa/x", "GET", "/healthz", NO_AUTH,
         ("deny", "default deny", "default_deny", 403)),
        (f"{TD}/ns/shop/sa/anything", "GET", "/status", NO_AUTH,
         ("allow", "any-sa-in-shop-status", "allowed", 0)),
        (f"{TD}/ns/shop/sa/a/b", "GET", "/status", NO_AUTH,
         ("deny", "default deny", "default_deny", 403)),
        # JWT: 401 when only the token is missing/invalid, 403 on claims
        (FRONT, "POST", "/orders", NO_AUTH, ("deny", "writes-need-scope", "token_missing", 401)),
        # An invalid token is refused before the rules (invalid_tokens: refuse, the
        # default); one another provider accepted (unaccepted=False) is left to the rules.
        (FRONT, "POST", "/orders", AuthFacts(token_errors={"corp": "expired"}),
         ("deny", "invalid token", "token_invalid", 401)),
        (FRONT, "POST", "/orders", AuthFacts(token_errors={"corp": "expired"}, unaccepted=False),
         ("deny", "writes-need-scope", "token_invalid", 401)),
        (FRONT, "POST", "/orders", AuthFacts(claims={"corp": {"scope": "orders:read"}}),
         ("deny", "writes-need-scope", "claims_mismatch", 403)),
        (FRONT, "POST", "/orders", AuthFacts(claims={"corp": {"scope": ["orders:write"],
                                                                "tier": "silver"}}),
         ("deny", "writes-need-scope", "claims_mismatch", 403)),
        (FRONT, "POST", "/orders", GOOD, ("allow", "writes-need-scope", "allowed", 0)),
        (FRONT, "POST", "/orders",
         AuthFacts(claims={"corp": {"scope": "orders:write", "tier": "gold", "role": "guest"}}),
         ("deny", "guests-cannot-write", "denied_by_rule", 403)),
        # API keys
        (OTHER, "GET", "/batch/1", NO_AUTH, ("deny", "batch-with-key", "apikey_missing", 401)),
        (OTHER, "GET", "/batch/1", AuthFacts(apikey="other"),
         ("deny", "batch-with-key", "apikey_not_allowed", 403)),
        (OTHER, "GET", "/batch/1", AuthFacts(apikey="batch"), ("allow", "batch-with-key", "allowed", 0)),
        (OTHER, "GET", "/keyed", AuthFacts(apikey="other"), ("allow", "any-key", "allowed", 0)),
        # expiry
        (OTHER, "GET", "/anything", NO_AUTH, ("deny", "default deny", "default_deny", 403)),
        (OTHER, "GET", "/glass", NO_AUTH, ("allow", "future-glass", "allowed", 0)),
        # enforce-mode rule
        (FRONT, "GET", "/forbidden", NO_AUTH, ("deny", "enforced-in-any-mode", "denied_by_rule", 403)),
    ],
)
def test_decision_table(peer: str | None, method: str, path: str, auth: AuthFacts,
                        expect: tuple[str, str, str, int]) -> None:
    got = d(peer, method, path, auth)
    assert (got.action, got.rule, got.reason, got.status) == expect
    assert got.version == POLICY.version and not got.dry_run


def test_host_port_listener_conditions() -> None:
    ok = d(OTHER, "GET", "/hp", host="API.local:8443", port=8443, listener="inbound")
    assert ok.rule == "host-port-listener" and ok.allowed
    assert not d(OTHER, "GET", "/hp", host="api.local", port=15443, listener="inbound").allowed
    assert not d(OTHER, "GET", "/hp", host="evil.local", port=8443, listener="inbound").allowed
    assert not d(OTHER, "GET", "/hp", host="api.local", port=8443, listener="outbound").allowed


def test_401_wins_over_403_across_rules() -> None:
    policy = load_policy(
        f"""version: 1
trust_domain: t.local
jwt_providers:
  a: {{issuer: i, audiences: [x], algorithms: [ES256], jwks_file: k}}
  b: {{issuer: j, audiences: [x], algorithms: [ES256], jwks_file: k}}
services:
  {API}:
    rules:
      - {{name: needs-a, allow: {{jwt: {{provider: a, claims: {{role: admin}}}}}}}}
      - {{name: needs-b, allow: {{jwt: {{provider: b}}}}}}
""", "p")
    got = decide(policy, API, facts(FRONT, "GET", "/"), AuthFacts(claims={"a": {"role": "x"}}), 0)
    assert (got.rule, got.reason, got.status) == ("needs-b", "token_missing", 401)


def test_claim_types_are_strict() -> None:
    policy = load_policy(
        f"""version: 1
trust_domain: t.local
jwt_providers:
  a: {{issuer: i, audiences: [x], algorithms: [ES256], jwks_file: k}}
services:
  {API}:
    rules:
      - {{name: r, allow: {{jwt: {{provider: a, claims: {{admin: true, realm.level: 3}}}}}}}}
""", "p")

    def ok(claims: dict[str, Any]) -> bool:
        return decide(policy, API, facts(FRONT, "GET", "/"), AuthFacts(claims={"a": claims}),
                      0).allowed

    assert ok({"admin": True, "realm": {"level": 3}})
    assert ok({"admin": True, "realm.level": 3.0})
    assert not ok({"admin": 1, "realm": {"level": 3}})
    assert not ok({"admin": "true", "realm": {"level": 3}})
    assert not ok({"admin": True, "realm": {"level": "3"}})
    assert not ok({"admin": True})


def test_observed_rules_never_change_the_outcome() -> None:
    secret = d(FRONT, "GET", "/orders/secret")
    assert (secret.action, secret.rule, secret.dry_run, secret.would) == (
        "allow", "trial-deny", True, "deny")
    trial = d(OTHER, "GET", "/trial")
    assert (trial.action, trial.rule, trial.dry_run, trial.would, trial.status) == (
        "deny", "trial-allow", True, "allow", 403)


def test_dry_run_section_lets_through_and_records() -> None:
    dry = f"{TD}/ns/shop/sa/dry"
    got = decide(POLICY, dry, facts(OTHER, "POST", "/y"), NO_AUTH, NOW)
    assert (got.action, got.rule, got.reason, got.status, got.dry_run, got.would) == (
        "allow", "default deny", "default_deny", 0, True, "deny")
    allowed = decide(POLICY, dry, facts(OTHER, "GET", "/y"), NO_AUTH, NOW)
    assert allowed.allowed and not allowed.dry_run
    enforced = decide(POLICY, dry, facts(OTHER, "GET", "/x"), NO_AUTH, NOW)
    assert (enforced.action, enforced.rule, enforced.dry_run) == ("deny", "no-x", False)


def test_dry_run_policy_mode() -> None:
    policy = load_policy(f"version: 1\ntrust_domain: t.local\nmode: dry-run\nservices:\n"
                         f"  {API}: {{rules: []}}\n", "p")
    got = decide(policy, API, facts(FRONT, "GET", "/"), NO_AUTH, 0)
    assert got.action == "allow" and got.dry_run and got.would == "deny"
    assert decide_egress(policy, API, FRONT, 0).dry_run


def test_fail_closed_without_policy_or_section() -> None:
    got = decide(None, API, facts(FRONT, "GET", "/orders"), NO_AUTH, NOW)
    assert (got.action, got.reason, got.status) == ("deny", "no_policy", 403)
    got = decide(POLICY, f"{TD}/ns/x/sa/unknown", facts(FRONT, "GET", "/orders"), NO_AUTH, NOW)
    assert (got.action, got.reason, got.rule) == ("deny", "no_section_for_identity", "default deny")
    assert decide_egress(None, API, FRONT, NOW).reason == "no_policy"
    assert decide_egress(POLICY, f"{TD}/x", FRONT, NOW).reason == "no_section_for_identity"


def test_expired_rule_becomes_inert_exactly_at_expiry() -> None:
    at = parse_timestamp("2999-01-01T00:00:00Z")
    f = facts(OTHER, "GET", "/glass")
    assert decide(POLICY, API, f, NO_AUTH, at - 1).allowed
    assert not decide(POLICY, API, f, NO_AUTH, at).allowed


def test_egress() -> None:
    assert decide_egress(POLICY, API, FRONT, NOW).allowed
    assert decide_egress(POLICY, API, f"{TD}/ns/pay/sa/charges", NOW).rule == (
        f"egress {TD}/ns/pay/sa/*")
    for target in (OTHER, f"{TD}/ns/pay/sa/a/b", "not-spiffe", f"{TD}/ns/shop/sa/frontend2"):
        got = decide_egress(POLICY, API, target, NOW)
        assert (got.action, got.reason, got.status) == ("deny", "egress_denied", 403)
    # a section without an egress key may call nobody (this one is dry-run: would deny)
    assert decide_egress(POLICY, f"{TD}/ns/shop/sa/dry", FRONT, NOW).would == "deny"


def test_demo_policy_scenarios() -> None:
    # The demo policy may live in policies/ or be packaged as sidecar/demo/policy.yaml.
    packaged = POLICIES.parent / "sidecar" / "demo" / "policy.yaml"
    demo = load_policy_file(str(POLICIES / "demo.yaml" if (POLICIES / "demo.yaml").exists()
                                else packaged))
    orders, fe = "spiffe://demo.local/ns/demo/sa/orders", "spiffe://demo.local/ns/demo/sa/frontend"
    intruder = "spiffe://demo.local/ns/demo/sa/intruder"

    def ok(peer: str, method: str, path: str) -> bool:
        return decide(demo, orders, facts(peer, method, path), NO_AUTH, NOW).allowed

    assert ok(fe, "GET", "/orders") and ok(fe, "POST", "/orders/1")
    assert not ok(fe, "DELETE", "/orders/1")
    assert not ok(fe, "GET", "/admin") and not ok(fe, "GET", "/admin/x/y")
    assert not ok(intruder, "GET", "/orders")
    assert not decide(demo, intruder, facts(fe, "GET", "/"), NO_AUTH, NOW).allowed
    assert decide_egress(demo, orders, fe, NOW).allowed
    assert not decide_egress(demo, orders, intruder, NOW).allowed
    assert not decide_egress(demo, intruder, orders, NOW).allowed


def test_auth_facts_are_immutable_and_compare_without_their_key() -> None:
    # AuthFacts is a named tuple for speed (built per request); it must keep what the
    # frozen dataclass it replaced promised: no attribute can be changed, equality ignores
    # the gate's cache key, the empty defaults are read-only and not a shared dict.
    a = AuthFacts(claims={"corp": {"sub": "u"}}, key=(("corp", "t1"), None))
    b = AuthFacts(claims={"corp": {"sub": "u"}}, key=(("corp", "t2"), None))
    assert a == b and not a != b
    assert a != AuthFacts(claims={"corp": {"sub": "v"}}, key=a.key)
    assert AuthFacts() == NO_AUTH and NO_AUTH.key == ()
    with pytest.raises(AttributeError):
        a.apikey = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        AuthFacts().claims["corp"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        hash(a)
