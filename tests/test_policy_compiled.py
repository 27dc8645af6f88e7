"""The compiled index agrees with the plain rule-by-rule check, and scales."""

from __future__ import annotations

import time
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy.compiled import (
    SegmentTrie,
    compile_section,
    normalise_host,
    segments_match,
)
from sidecar.policy.decision import NO_AUTH, AuthFacts, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.loaded import Policy
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Conditions, Rule, ServicePolicy
from sidecar.policy.sections import PolicyExtras

API = "spiffe://t.local/ns/a/sa/api"


def test_trie_matches_like_plain_patterns() -> None:
    patterns = [("a", "*"), ("a", "**"), ("a",), ("*", "b"), ("**",), ("a", "b", "c")]
    trie = SegmentTrie((p, i) for i, p in enumerate(patterns))
    for path in [(), ("a",), ("a", "b"), ("a", "b", "c"), ("x", "b"), ("x",), ("a", "x", "y")]:
        got = set().union(*trie.match(path)) if trie.match(path) else set()
        want = {i for i, p in enumerate(patterns) if segments_match(p, path)}
        assert got == want, path


def test_normalise_host() -> None:
    assert normalise_host("API.Example.com:443") == "api.example.com"
    assert normalise_host("api.example.com.") == "api.example.com"
    assert normalise_host("[::1]:8443") == "[::1]"


_SEG = st.sampled_from(["a", "b", "c"])
_peer_pat = st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=2).map(
    lambda s: "spiffe://t.local/ns/" + "/".join(s))
_path_pat = st.tuples(st.lists(st.sampled_from(["a", "b", "*"]), max_size=3), st.booleans()).map(
    lambda t: "/" + "/".join(t[0] + (["**"] if t[1] else [])))
_rule = st.fixed_dictionaries(
    {"effect": st.sampled_from(["allow", "deny"])},
    optional={
        "from": st.lists(_peer_pat, min_size=1, max_size=2),
        "paths": st.lists(_path_pat, min_size=1, max_size=2),
        "methods": st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2),
        "namespaces": st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=1),
        "mode": st.just("dry-run"),
        "jwt": st.just("corp"),
    },
)


def _policy(rules: list[dict[str, object]]) -> str:
    lines = ["version: 1", "trust_domain: t.local", "jwt_providers:",
             "  corp: {issuer: i, audiences: [a], algorithms: [ES256], jwks_file: k}",
             "services:", f"  {API}:", "    rules:" + ("" if rules else " []")]
    for i, r in enumerate(rules):
        conds = {k: v for k, v in r.items() if k not in ("effect", "mode", "jwt")}
        body = ", ".join(f"{k}: {list(v)!r}" for k, v in conds.items())  # type: ignore[call-overload]
        if "jwt" in r:
            body += (", " if body else "") + "jwt: {provider: corp, claims: {role: x}}"
        mode = ", mode: dry-run" if "mode" in r else ""
        lines.append(f"      - {{name: r{i}, {r['effect']}: {{{body}}}{mode}}}")
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_rule, max_size=8),
    st.lists(st.tuples(st.lists(_SEG, min_size=1, max_size=2), st.lists(_SEG, max_size=4),
                       st.sampled_from(["GET", "POST"]), st.integers(0, 2)), min_size=1,
             max_size=6),
)
def test_indexed_decide_equals_unindexed(rules: list[dict[str, object]],
                                         requests: list[tuple[list[str], list[str], str, int]]
                                         ) -> None:
    policy = load_policy(_policy(rules), "gen.yaml")
    auths = [NO_AUTH, AuthFacts(claims={"corp": {"role": "x"}}),
             AuthFacts(claims={"corp": {"role": "y"}})]
    for peer_segs, path_segs, method, auth_i in requests:
        peer = "spiffe://t.local/ns/" + "/".join(peer_segs)
        facts = RequestFacts("inbound", peer, "1.1.1.1", method, "/" + "/".join(path_segs),
                             "h", 1)
        fast = decide(policy, API, facts, auths[auth_i], 0.0)
        slow = decide(policy, API, facts, auths[auth_i], 0.0, _unindexed=True)
        assert fast == slow


def _big_policy(n: int) -> Policy:
    """n allow rules (distinct callers and paths) plus n/10 deny rules, built directly.

    YAML parsing of 10,000 rules takes seconds and is not what this test measures.
    """
    rules: list[Rule] = []
    for i in range(n):
        rules.append(Rule(f"r{i}", "allow", Conditions(
            peers=(f"spiffe://t.local/ns/n{i % 50}/sa/s{i}",), methods=frozenset({"GET"}),
            paths=(f"/svc{i}/*", f"/p{i}")), index=len(rules)))
        if i % 10 == 0:
            rules.append(Rule(f"d{i}", "deny", Conditions(paths=(f"/svc{i}/admin/**",)),
                              index=len(rules)))
    section = compile_section(API, "t.local", "enforce", tuple(rules), ())
    svc = ServicePolicy(API, tuple(rules), None)
    return Policy("0" * 64, "big", "t.local", "enforce", PolicyExtras(),
                  MappingProxyType({API: svc}), MappingProxyType({API: section}))


def _time_decisions(n_rules: int, count: int = 2000) -> float:
    policy = _big_policy(n_rules)
    i = n_rules // 2
    facts = RequestFacts("inbound", f"spiffe://t.local/ns/n{i % 50}/sa/s{i}", "1.1.1.1", "GET",
                         f"/svc{i}/x", "h", 1)
    assert decide(policy, API, facts, NO_AUTH, 0).rule == f"r{i}"
    start = time.perf_counter()
    for _ in range(count):
        decide(policy, API, facts, NO_AUTH, 0)
    return (time.perf_counter() - start) / count


def test_decision_cost_does_not_grow_with_rule_count() -> None:
    small = min(_time_decisions(10) for _ in range(3))
    large = min(_time_decisions(10_000) for _ in range(2))
    # about the same cost: allow generous noise, but a linear scan would be ~1000x
    assert large < small * 5 + 20e-6, (small, large)
