"""explain(): the trail agrees with decide() and says what each condition did."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config.values import parse_timestamp
from sidecar.policy.explain import explain
from sidecar.policy.loader import load_policy_file

SHOP = load_policy_file(str(Path(__file__).resolve().parent.parent / "policies" / "example-shop.yaml"))
NOW = parse_timestamp("2025-01-01T00:00:00Z")
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
FRONT = "spiffe://cluster.local/ns/shop/sa/frontend"


def test_allowed_trail_shows_normalisation_and_conditions() -> None:
    e = explain(SHOP, ORDERS, caller=FRONT, method="GET", target="/%6frders/7?x=1",
                claims={"corp": {"scope": "orders:read"}}, now=NOW)
    assert e.allowed and e.decision is not None
    assert e.decision.rule == "frontend-reads-orders"
    assert e.path == "/orders/7" and e.query == "x=1"
    first = e.rules[0]
    assert first.status == "matched"
    assert [(c.name, c.held) for c in first.conditions] == [
        ("from", True), ("methods", True), ("paths", True), ("jwt", True), ("claim", True)]
    text = e.render()
    assert "normalised from /%6frders/7" in text and "decision: ALLOW" in text


def test_denied_trail_names_the_failed_condition() -> None:
    e = explain(SHOP, ORDERS, caller=FRONT, method="GET", target="/orders", now=NOW)
    assert not e.allowed and e.decision is not None
    assert (e.decision.reason, e.decision.status) == ("token_missing", 401)
    assert e.rules[0].status == "credentials failed"
    assert ("jwt", False) in [(c.name, c.held) for c in e.rules[0].conditions]
    assert "FAIL jwt: provider corp: no token" in e.render()


def test_refused_target_never_reaches_rules() -> None:
    e = explain(SHOP, ORDERS, caller=FRONT, method="GET", target="/orders/..%2fadmin", now=NOW)
    assert e.decision is None and e.refused_reason == "encoded_slash" and not e.allowed
    assert "400" in e.render()


def test_expired_and_dry_run_rules_are_marked() -> None:
    later = parse_timestamp("2030-06-01T00:00:00Z")
    e = explain(SHOP, ORDERS, caller=FRONT, method="GET", target="/orders/debug",
                claims={"corp": {"scope": "orders:read"}}, now=later)
    status = {r.name: (r.status, r.dry_run) for r in e.rules}
    assert status["break-glass-ops-refunds"][0] == "expired"
    assert status["block-debug-trial"] == ("matched", True)
    assert e.decision is not None and e.decision.dry_run and e.decision.would == "deny"
    assert "(dry-run: would deny)" in e.render()


def test_missing_section() -> None:
    e = explain(SHOP, "spiffe://cluster.local/ns/x/sa/none", caller=FRONT, method="GET",
                target="/", now=NOW)
    assert not e.section_found and e.decision is not None
    assert e.decision.reason == "no_section_for_identity"
    assert "section: none" in e.render()


# What the data path refuses with 400 before any rule runs is explained as refused, never as
# allowed or denied (found by a hostile review: a lower-case method was upper-cased, and
# hosts the data path refuses were matched against the rules).
HEAD_REFUSALS = {
    "lower_case_method": ("get", "", "bad_method"),
    "mixed_case_method": ("Get", "", "bad_method"),
    "connect": ("CONNECT", "", "method_not_allowed"),
    "trace": ("TRACE", "", "method_not_allowed"),
    "non_ascii_method": ("G\u00c9T", "", "bad_method"),
    "leading_zero_ipv4": ("GET", "010.0.0.1", "bad_host"),
    "short_ipv4": ("GET", "127.1", "bad_host"),
    "space_in_host": ("GET", "a b", "bad_host"),
    "two_ports": ("GET", "orders:80:80", "bad_host"),
    "non_latin1_host": ("GET", "\u043e\u0440ders", "bad_host"),
}


@pytest.mark.parametrize("case", sorted(HEAD_REFUSALS))
def test_what_the_data_path_refuses_is_explained_as_refused(case: str) -> None:
    method, host, reason = HEAD_REFUSALS[case]
    e = explain(SHOP, ORDERS, caller=FRONT, method=method, target="/orders/7", host=host,
                claims={"corp": {"scope": "orders:read"}}, now=NOW)
    assert e.decision is None and e.refused_reason == reason, e
    assert not e.allowed
