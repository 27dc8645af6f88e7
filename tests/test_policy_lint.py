"""Lint: each warning code fires on its mistake, and the shipped policies are clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config.values import parse_timestamp
from sidecar.policy.lint import lint
from sidecar.policy.loader import load_policy, load_policy_file

POLICIES = Path(__file__).resolve().parent.parent / "policies"
NOW = parse_timestamp("2025-01-01T00:00:00Z")
HEAD = """version: 1
trust_domain: t.local
jwt_providers:
  corp: {issuer: i, audiences: [a], algorithms: [ES256], jwks_file: k}
  spare: {issuer: j, audiences: [a], algorithms: [ES256], jwks_file: k}
api_keys:
  - {name: old, sha256: %s, expires_at: 2020-01-01T00:00:00Z}
services:
  spiffe://t.local/ns/a/sa/api:
    rules:
""" % ("a" * 64)
FRONT = "spiffe://t.local/ns/a/sa/api"


def codes(rules: str, extra: str = "", path_case: str | None = None) -> set[str]:
    head = HEAD if path_case is None else HEAD.replace(
        "    rules:\n", f"    path_case: {path_case}\n    rules:\n")
    policy = load_policy(head + rules + extra, "lint.yaml")
    return {w.code for w in lint(policy, NOW) if w.code != "unused-provider"}


@pytest.mark.parametrize(
    ("rules", "code"),
    [
        ("      - {name: r, allow: {}}\n", "allow-all"),
        ("      - {name: r, allow: {jwt: {provider: corp}}}\n", "allow-all"),
        (f"      - {{name: a, allow: {{from: [{FRONT}], paths: [/x/**]}}}}\n"
         f"      - {{name: b, allow: {{from: [{FRONT}], paths: [/x/y/*], methods: [GET]}}}}\n",
         "shadowed"),
        ("      - {name: a, deny: {paths: [/admin/**]}}\n"
         f"      - {{name: b, allow: {{from: [{FRONT}], paths: [/admin/x]}}}}\n",
         "shadowed-by-deny"),
        (f"      - {{name: a, allow: {{from: [{FRONT}]}}}}\n"
         "      - {name: b, allow: {paths: [/orders]}}\n", "from-to-split"),
        ("      - {name: a, allow: {from: [spiffe://t.local/ns/a/sa/typo], paths: [/x]}}\n",
         "undefined-identity"),
        ("      - {name: a, allow: {from: [spiffe://other.td/ns/a/sa/x], paths: [/x]}}\n",
         "foreign-trust-domain"),
        (f"      - {{name: a, allow: {{from: [{FRONT}], namespaces: [b], paths: [/x]}}}}\n",
         "never-matches"),
        (f"      - {{name: a, allow: {{from: [{FRONT}], paths: [/x], apikey: [old]}}}}\n",
         "never-matches"),
        ("      - {name: a, deny: {namespaces: [Demo], paths: [/admin/**]}}\n",
         "namespace-not-kubernetes"),
        ("      - {name: a, deny: {namespaces: [shop_eu], paths: [/admin/**]}}\n",
         "namespace-not-kubernetes"),
        ("      - {name: a, deny: {namespaces: [-shop], paths: [/admin/**]}}\n",
         "namespace-not-kubernetes"),
        (f"      - {{name: a, expires_at: 2024-01-01T00:00:00Z, allow: {{from: [{FRONT}]}}}}\n",
         "expired"),
        ("      - {name: a, allow: {from: ['spiffe://t.local/ns/a/sa/*'], paths: [/admin/**]}}\n",
         "wildcard-sensitive"),
        ("      - {name: a, allow: {methods: [GET], paths: ['/*/debug']}}\n",
         "wildcard-sensitive"),
    ],
)
def test_each_code_fires(rules: str, code: str) -> None:
    assert code in codes(rules)


def test_undefined_egress_and_unused_provider() -> None:
    policy = load_policy(HEAD + "      - {name: r, allow: {paths: [/x], jwt: {provider: corp}}}\n"
                         "    egress: [spiffe://t.local/ns/a/sa/nobody]\n", "l.yaml")
    warnings = lint(policy, NOW)
    assert {(w.code, w.key) for w in warnings} >= {
        ("unused-provider", "jwt_providers.spare"),
        ("undefined-identity", "services.spiffe://t.local/ns/a/sa/api.egress[0]"),
    }
    egress = [w for w in warnings if w.code == "undefined-identity"][0]
    assert egress.line == 12 and egress.file == "l.yaml"
    assert "[undefined-identity]" in str(egress)


def test_precise_rules_are_clean() -> None:
    rules = (f"      - {{name: a, allow: {{from: [{FRONT}], methods: [GET], paths: [/x, /y/*]}}}}\n"
             f"      - {{name: b, allow: {{from: [{FRONT}], methods: [POST], paths: [/x]}}}}\n"
             "      - {name: c, deny: {paths: [/admin/**]}}\n"
             f"      - {{name: d, allow: {{from: [{FRONT}], paths: [/z],"
             " jwt: {provider: corp}}}\n")
    # (Rule c was case-sensitive-deny where the section did not say path_case; such a
    # section's deny rules fold case now, so there is nothing to warn about.)
    assert codes(rules) == set()
    assert codes(rules, path_case="sensitive") == set()


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_are_lint_clean_today(path: Path) -> None:
    assert lint(load_policy_file(str(path)), NOW) == []


def test_break_glass_expiry_is_reported_later() -> None:
    later = parse_timestamp("2030-02-01T00:00:00Z")
    warnings = lint(load_policy_file(str(POLICIES / "example-shop.yaml")), later)
    assert [w.code for w in warnings] == ["expired"]
    assert "break-glass-ops-refunds" in warnings[0].message
