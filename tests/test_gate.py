"""Gate: the per-request combination of blocks, credentials, policy and rate limits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from sidecar.alerts import BurstDetector
from sidecar.authn.authenticator import Authenticator
from sidecar.authn.oauth import token_digest
from sidecar.gate import ConnectionMemo, Gate, PolicyHolder
from sidecar.policy.decision import Decision, RequestFacts
from sidecar.policy.loader import load_policy
from sidecar.policy.sections import Revocation
from sidecar.ratelimit import RateLimiter
from tests.test_authn_support import AUDIENCE, ISSUER, NOW, claims, ec_key, key_set, mint

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


@pytest.fixture(autouse=True, params=["request_alone", "one_connection"])
def connection(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test of this module twice: each request on its own, and every request of a
    gate as if it came over one keep-alive connection (one ``ConnectionMemo`` per gate, so
    its credential and decision memos are read wherever they could be). The answers must
    not differ."""
    if request.param == "one_connection":
        inbound = Gate.inbound
        memos: dict[Gate, ConnectionMemo] = {}

        def over_one_connection(self: Gate, *args: Any, **kw: Any) -> Any:
            if not kw.get("tcp"):
                kw["memo"] = memos.setdefault(self, ConnectionMemo())
            return inbound(self, *args, **kw)

        monkeypatch.setattr(Gate, "inbound", over_one_connection)
    yield request.param


def facts(peer: str = FRONTEND, method: str = "GET") -> RequestFacts:
    return RequestFacts(direction="inbound", peer=peer, source="10.0.0.1", method=method,
                        path="/orders", host="orders", port=15443)


def gate_with_policy() -> Gate:
    holder = PolicyHolder("mesh.yaml")
    policy = load_policy(POLICY, "mesh.yaml")
    holder.swap(policy, 0.0)
    return Gate(ORDERS, holder, authenticator=Authenticator(policy.extras),
                limiter=RateLimiter(policy.extras.rate_limits),
                detector=BurstDetector(policy.extras.alerts),
                clock=None)  # (the limits follow the scripted ``now`` of each call)


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


# -- decisions kept per policy version --------------------------------------------------------

def _gate(text: str) -> tuple[Gate, PolicyHolder]:
    holder = PolicyHolder("mesh.yaml")
    holder.swap(load_policy(text, "mesh.yaml"), 0.0)
    return Gate(ORDERS, holder), holder


PLAIN = f"""
version: 1
trust_domain: td
services:
  {ORDERS}:
    rules:
      - name: frontend-reads
        allow: {{from: [{FRONTEND}], methods: [GET]}}
  {FRONTEND}:
    egress: [{ORDERS}]
"""


def test_a_decision_fixed_per_policy_is_made_once_and_forgotten_on_reload() -> None:
    gate, holder = _gate(PLAIN)
    first = gate.inbound(facts(), [], "", 1.0).decision
    assert first.allowed and gate.inbound(facts(), [], "", 2.0).decision is first
    assert not gate.inbound(facts(method="POST"), [], "", 2.0).decision.allowed
    # A reload that removes the rule: the kept decision must not outlive its policy.
    holder.swap(load_policy(PLAIN.replace("methods: [GET]", "methods: [PUT]"), "mesh.yaml"),
                3.0)
    assert not gate.inbound(facts(), [], "", 4.0).decision.allowed


def test_rules_that_expire_are_decided_every_time() -> None:
    text = PLAIN.replace("      - name: frontend-reads\n",
                         "      - name: frontend-reads\n"
                         "        expires_at: 2030-01-01T00:00:00Z\n")
    gate, _ = _gate(text)
    assert gate.inbound(facts(), [], "", 1_800_000_000.0).decision.allowed
    assert not gate.inbound(facts(), [], "", 1_900_000_000.0).decision.allowed


def test_egress_decisions_are_kept_per_policy() -> None:
    holder = PolicyHolder("mesh.yaml")
    holder.swap(load_policy(PLAIN, "mesh.yaml"), 0.0)
    gate = Gate(FRONTEND, holder)
    first = gate.egress(ORDERS, 1.0)
    assert first.allowed and gate.egress(ORDERS, 2.0) is first
    assert not gate.egress("spiffe://td/ns/shop/sa/other", 2.0).allowed
    holder.swap(load_policy(PLAIN.replace(f"egress: [{ORDERS}]", "egress: []"), "mesh.yaml"),
                3.0)
    assert not gate.egress(ORDERS, 4.0).allowed


def test_kept_decisions_are_bounded_and_rate_limits_still_apply() -> None:
    from sidecar import gate as gate_module

    gate, _ = _gate(PLAIN)
    for i in range(gate_module.DECISION_CACHE_SIZE + 10):
        gate.inbound(RequestFacts(direction="inbound", peer=FRONTEND, source="10.0.0.1",
                                  method="GET", path=f"/p{i}", host="orders", port=1), [], "",
                     1.0)
    assert len(gate._inbound_cache) <= gate_module.DECISION_CACHE_SIZE
    limited = gate_with_policy()  # a section with a rate limit of burst 2
    results = [limited.inbound(facts(), [], "", 10.0).decision.reason for _ in range(3)]
    assert results[:2] == ["allowed", "allowed"] and results[2] == "rate_limited"


def _decisions(gate: Gate, paths: list[str]) -> list[object]:
    return [gate.inbound(RequestFacts(direction="inbound", peer=FRONTEND, source="10.0.0.1",
                                      method="GET", path=p, host="orders", port=1), [], "",
                         1.0).decision for p in paths]


CASED = f"""
version: 1
trust_domain: td
services:
  {ORDERS}:
    path_case: insensitive
    rules:
      - name: no-admin
        deny: {{paths: [/admin/**]}}
      - name: frontend-all
        allow: {{from: [{FRONTEND}]}}
"""
# Spellings of /admin that a case-insensitive (IIS/ASP.NET) app maps to the same resource:
# by case (one route to ASP.NET Core routing too) and by Windows name (a route of its own to
# ASP.NET Core routing: only deny rules fold those).
CASE_SPELLINGS = ["/admin", "/Admin", "/ADMIN/"]
NAME_SPELLINGS = ["/admin.", "/aDmIn::$DATA", "/Admin%20"]
ADMIN_SPELLINGS = CASE_SPELLINGS + NAME_SPELLINGS


def test_kept_decisions_of_a_case_insensitive_section_are_keyed_by_the_folded_path() -> None:
    # Whichever spelling comes first, every other case spelling finds the same (deny) entry:
    # the cache key is the path as the section's allow rules match it (case folded), never
    # the spelling that was sent. A Windows-name spelling is denied too, under its own key:
    # /x:get and /x:cancel may have different answers (an allow rule does not fold names).
    for first in range(len(ADMIN_SPELLINGS)):
        gate, _ = _gate(CASED)
        order = ADMIN_SPELLINGS[first:] + ADMIN_SPELLINGS[:first]
        decisions = dict(zip(order, _decisions(gate, order), strict=True))
        assert all(d.rule == "no-admin" and not d.allowed for d in decisions.values()), order
        assert all(decisions[p] is decisions["/admin"] for p in CASE_SPELLINGS)
        assert len(gate._inbound_cache) == 1 + len(NAME_SPELLINGS)
    assert _decisions(gate, ["/orders"])[0].allowed


def test_kept_decisions_of_a_case_sensitive_section_keep_spellings_apart() -> None:
    gate, _ = _gate(CASED.replace("path_case: insensitive", "path_case: sensitive"))
    denied, other = _decisions(gate, ["/admin", "/Admin"])
    assert not denied.allowed and other.allowed and len(gate._inbound_cache) == 2


JWT_POLICY = f"""
version: 1
trust_domain: td
jwt_providers:
  corp: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], algorithms: [ES256], jwks_file: k.json}}
services:
  {ORDERS}:
    rules:
      - name: readers
        allow: {{from: [{FRONTEND}], jwt: {{provider: corp, claims: {{scope: {{contains: read}}}}}}}}
"""


def _jwt_gate(text: str = JWT_POLICY) -> tuple[Gate, PolicyHolder, Authenticator]:
    holder = PolicyHolder("mesh.yaml")
    policy = load_policy(text, "mesh.yaml")
    holder.swap(policy, 0.0)
    authn = Authenticator(policy.extras)
    authn.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    return Gate(ORDERS, holder, authenticator=authn), holder, authn


def _bearer(**overrides: object) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + mint(claims(**overrides), ec_key()).encode())]


def _jwt_decision(gate: Gate, headers: list[tuple[bytes, bytes]], now: float = NOW) -> Decision:
    return gate.inbound(facts(), headers, "", now).decision


def test_jwt_decisions_are_kept_per_verified_token() -> None:
    gate, _, _ = _jwt_gate()
    reader, writer = _bearer(scope="read"), _bearer(scope="write", jti="t-2")
    first = _jwt_decision(gate, reader)
    assert first.allowed and _jwt_decision(gate, reader, NOW + 1) is first
    wrong = _jwt_decision(gate, writer)
    assert (wrong.status, wrong.reason) == (403, "claims_mismatch")
    assert _jwt_decision(gate, writer) is wrong and _jwt_decision(gate, reader) is first
    assert _jwt_decision(gate, []).status == 401  # no token: kept apart from both
    assert len(gate._credential_cache) == 2


def test_a_kept_jwt_decision_never_outlives_the_token_or_its_policy() -> None:
    gate, holder, authn = _jwt_gate()
    reader = _bearer(scope="read", exp=int(NOW) + 60)
    assert _jwt_decision(gate, reader).allowed  # kept from here on
    # Past exp: the token is checked before the cache is read, and its failure is the key.
    late = _jwt_decision(gate, reader, NOW + 60 + 31)  # (30 s of clock skew allowed)
    assert not late.allowed and late.status == 401
    # Not yet valid (nbf): refused, and that refusal does not outlive nbf either.
    early = _bearer(scope="read", jti="t-3", nbf=int(NOW) + 100)
    assert _jwt_decision(gate, early).status == 401
    assert _jwt_decision(gate, early, NOW + 71).allowed
    # Revoked after it was kept (a revocation list change without a new policy object).
    assert _jwt_decision(gate, reader).allowed
    authn.update(replace(holder.policy.extras, revocations=(Revocation(jti="t-1"),)))
    assert _jwt_decision(gate, reader).status == 401
    # A reload that asks for another scope: the same token is decided afresh.
    holder.swap(load_policy(JWT_POLICY.replace("contains: read", "contains: admin"),
                            "mesh.yaml"), 1.0)
    assert _jwt_decision(gate, _bearer(scope="read", jti="t-4")).status == 403


def test_introspected_tokens_are_decided_every_time() -> None:
    text = JWT_POLICY.replace(
        "algorithms: [ES256], jwks_file: k.json",
        "introspection: {endpoint: 'https://idp/introspect', client_id: c, "
        "client_secret_file: s}")
    gate, _, authn = _jwt_gate(text)
    token = "opaque-token"
    authn.introspected.store("corp", token_digest(token), {"active": True, "scope": "read",
                             "aud": AUDIENCE}, NOW, 60, 5)
    headers = [(b"authorization", b"Bearer " + token.encode())]
    assert _jwt_decision(gate, headers).allowed and _jwt_decision(gate, headers).allowed
    assert not gate._credential_cache and not gate._inbound_cache
    # The server's answer changes for the same token: the next decision follows it.
    authn.introspected.store("corp", token_digest(token), {"active": True, "scope": "none",
                             "aud": AUDIENCE}, NOW, 60, 5)
    assert _jwt_decision(gate, headers).status == 403


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


def test_own_section_facts_follow_each_reload() -> None:
    # The own section, its audience and non_ascii_paths are kept per policy object: a
    # reload that changes them is seen by the next request, and one that removes the
    # section denies.
    gate, holder = _gate(PLAIN)
    assert not gate.allows_non_ascii_paths()
    assert gate.inbound(facts(), [], "", 1.0).decision.allowed
    holder.swap(load_policy(PLAIN.replace("    rules:\n", "    non_ascii_paths: allow\n    rules:\n",
                                          1), "mesh.yaml"), 2.0)
    assert gate.allows_non_ascii_paths()
    holder.swap(load_policy(PLAIN.replace(f"  {ORDERS}:\n    rules:\n", f"  {ORDERS}x:\n    rules:\n"),
                            "mesh.yaml"), 3.0)
    assert not gate.allows_non_ascii_paths()
    assert not gate.inbound(facts(), [], "", 4.0).decision.allowed


def test_prepare_is_needed_only_with_an_introspected_provider() -> None:
    gate = gate_with_policy()
    assert not gate.needs_prepare()  # no introspector
    gate.introspector = object()  # type: ignore[assignment]
    assert not gate.needs_prepare()  # and no provider of the policy is introspected


# -- one connection's memo (ConnectionMemo) ---------------------------------------------------

def test_a_connection_gets_its_last_verdict_again_until_anything_it_came_from_changes() -> None:
    gate, holder, authn = _jwt_gate()
    memo, reader = ConnectionMemo(), _bearer(scope="read")
    first = gate.inbound(facts(), reader, "", NOW, memo=memo)
    assert first.decision.allowed
    # The same request again on the connection: the very verdict, credentials from the memo.
    assert gate.inbound(facts(), reader, "", NOW + 1, memo=memo) is first
    assert authn.statistics(NOW)["memo_hits"] == 1
    # Other facts: decided again, and kept in their place.
    post = gate.inbound(facts(method="POST"), reader, "", NOW + 1, memo=memo)
    assert post is not first and post.decision.allowed
    assert gate.inbound(facts(method="POST"), reader, "", NOW + 1, memo=memo) is post
    # A reload with the same providers that asks for another scope: the same request on
    # the same connection is decided afresh.
    holder.swap(load_policy(JWT_POLICY.replace("contains: read", "contains: admin"),
                            "mesh.yaml"), 2.0)
    again = gate.inbound(facts(method="POST"), reader, "", NOW + 2, memo=memo)
    assert again.status == 403 and again.decision.reason == "claims_mismatch"


def test_a_connections_kept_decision_without_credentials_follows_a_reload() -> None:
    gate, holder = _gate(PLAIN)
    memo = ConnectionMemo()
    first = gate.inbound(facts(), [], "", 1.0, memo=memo)
    assert first.decision.allowed and gate.inbound(facts(), [], "", 2.0, memo=memo) is first
    holder.swap(load_policy(PLAIN.replace("methods: [GET]", "methods: [PUT]"), "mesh.yaml"),
                3.0)
    assert gate.inbound(facts(), [], "", 4.0, memo=memo).status == 403


def test_a_connections_kept_verdict_still_asks_the_rate_limiter() -> None:
    gate = gate_with_policy()  # burst 2 per peer
    memo = ConnectionMemo()
    verdicts = [gate.inbound(facts(), [], "", 100.0, memo=memo) for _ in range(3)]
    assert [v.decision.reason for v in verdicts] == ["allowed", "allowed", "rate_limited"]
    assert verdicts[1].decision is verdicts[0].decision
