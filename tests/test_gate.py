"""Gate: the per-request combination of blocks, credentials, policy and rate limits."""

from __future__ import annotations

from sidecar.alerts import BurstDetector
from sidecar.authn.authenticator import Authenticator
from sidecar.gate import Gate, PolicyHolder
from sidecar.policy.decision import RequestFacts
from sidecar.policy.loader import load_policy
from sidecar.ratelimit import RateLimiter

ORDERS = "spiffe://td/ns/shop/sa/orders"
FRONTEND = "spiffe://td/ns/shop/sa/frontend"
POLICY = f"""
version: 1
trust_domain: td
rate_limits:
  - {{name: per-caller, rate: 1, burst: 2, per: peer}}
alerts:
  - {{name: burst, threshold: 2, window: 60s, by: peer, block: 30s}}
services:
  {ORDERS}:
    rules:
      - name: frontend-reads
        allow: {{from: [{FRONTEND}], methods: [GET]}}
"""


def facts(peer: str = FRONTEND, method: str = "GET") -> RequestFacts:
    return RequestFacts(direction="inbound", peer=peer, source="10.0.0.1", method=method,
                        path="/orders", host="orders", port=15443)


def gate_with_policy() -> Gate:
    holder = PolicyHolder("mesh.yaml")
    policy = load_policy(POLICY, "mesh.yaml")
    holder.swap(policy, 0.0)
    return Gate(ORDERS, holder, authenticator=Authenticator(policy.extras),
                limiter=RateLimiter(policy.extras.rate_limits),
                detector=BurstDetector(policy.extras.alerts))


def test_interim_allow_from_without_a_policy():
    gate = Gate(ORDERS, PolicyHolder(None), allow_from=("spiffe://td/ns/shop/sa/*",))
    assert gate.inbound(facts(), [], "", 0.0).decision.allowed
    assert not gate.inbound(facts(peer="spiffe://td/ns/other/sa/x"), [], "", 0.0).decision.allowed


def test_configured_but_unloaded_policy_denies_even_with_allow_from():
    gate = Gate(ORDERS, PolicyHolder("mesh.yaml"), allow_from=("spiffe://td/ns/shop/sa/*",))
    v = gate.inbound(facts(), [], "", 0.0)
    assert not v.decision.allowed and v.decision.reason == "no_policy" and v.status == 403
    assert not gate.egress(ORDERS, 0.0).allowed


def test_rate_limit_gives_429_with_retry_after_at_burst_plus_one():
    gate = gate_with_policy()
    assert gate.inbound(facts(), [], "", 100.0).decision.allowed
    assert gate.inbound(facts(), [], "", 100.0).decision.allowed
    v = gate.inbound(facts(), [], "", 100.0)
    assert v.status == 429 and v.decision.reason == "rate_limited"
    assert v.decision.rule == "per-caller"
    assert (b"retry-after", b"1") in v.response_headers
    assert gate.inbound(facts(), [], "", 101.0).decision.allowed  # refilled


def test_failures_raise_one_alert_then_block_the_peer():
    alerts = []
    gate = gate_with_policy()
    gate.on_alert = alerts.append
    assert gate.inbound(facts(method="DELETE"), [], "", 10.0).status == 403
    assert alerts == []
    assert gate.inbound(facts(method="DELETE"), [], "", 11.0).status == 403
    assert len(alerts) == 1 and alerts[0].source == FRONTEND
    v = gate.inbound(facts(), [], "", 12.0)  # even an allowed request is refused now
    assert v.status == 403 and v.decision.reason == "source_blocked"
    assert gate.inbound(facts(), [], "", 41.5).decision.allowed  # block expired


def test_policy_holder_records_failures_and_clears_them_on_success():
    holder = PolicyHolder("mesh.yaml")
    holder.record_failure("mesh.yaml:3: bad key")
    holder.record_failure("mesh.yaml:4: bad key")
    status = holder.status()
    assert status["last_reload_error"] == "mesh.yaml:4: bad key"
    assert status["reloads_failed"] == 2 and status["version"] is None
    holder.swap(load_policy(POLICY, "mesh.yaml"), 1.0)
    assert holder.status()["last_reload_error"] is None
    assert holder.status()["reloads_failed"] == 2 and holder.status()["reloads_ok"] == 1
