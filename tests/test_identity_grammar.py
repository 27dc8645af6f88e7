"""One identity grammar: the config and the policy accept, refuse and match SPIFFE IDs,
identity patterns and namespaces alike (sidecar/identity/spiffe.py; docs/policy.md,
"Identities and patterns").

Every form of pattern, valid and invalid, is checked against every place that reads one:
the config's ``inbound.allow_from`` (matched by the gate with ``compile_pattern``), and the
policy's ``from`` and ``egress`` (matched by the compiled section's tries). Exact IDs are
checked against ``outbound[].identity``, section identities and ``rate_limits[].services``.
"""

from __future__ import annotations

import json

import pytest

from sidecar.config.model import load_config
from sidecar.errors import ConfigError
from sidecar.identity.spiffe import (
    compile_pattern,
    namespace_of,
    parse_spiffe_id,
    spiffe_problem,
)
from sidecar.policy.compiled import request_holds
from sidecar.policy.decision import RequestFacts
from sidecar.policy.lint import lint
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Conditions

TD = "t.local"
OWNER = "spiffe://t.local/ns/me/sa/app"

# (pattern, problem substring or None when valid): every form a pattern can take.
PATTERNS = [
    ("spiffe://t.local/ns/shop/sa/orders", None),  # exact ID
    ("spiffe://t.local", None),  # the trust domain's own ID
    ("spiffe://t.local/ns/shop/sa/*", None),  # '*' last
    ("spiffe://t.local/ns/*/sa/orders", None),  # '*' in the middle
    ("spiffe://t.local/*/*/*/*", None),  # several '*'
    ("spiffe://t.local/*", None),
    ("spiffe://other.td/ns/shop/sa/*", None),  # a federated trust domain
    ("spiffe://t.local/ns/shop/**", "not an identity wildcard"),  # no '**', not even last
    ("spiffe://t.local/**", "not an identity wildcard"),
    ("spiffe://t.local/**/sa/x", "not an identity wildcard"),
    ("spiffe://t.local/ns/shop/sa/ord*", "whole segment"),  # partial-segment globs
    ("spiffe://t.local/ns/shop/sa/*ers", "whole segment"),
    ("spiffe://t.local/ns/.*", "whole segment"),  # regular expressions
    ("spiffe://t.local/ns/(a|b)", "path characters"),
    ("spiffe://*/ns/shop/sa/x", "cannot be a wildcard"),  # wildcard trust domain
    ("spiffe://*.local/ns/shop", "cannot be a wildcard"),
    ("spiffe://T.local/ns/shop", "trust domain characters"),
    ("spiffe://t.local:443/ns/shop", "port"),
    ("spiffe://u@t.local/ns/shop", "userinfo"),
    ("spiffe://t.local/ns/shop?x=1", "query"),
    ("spiffe://t.local/ns/shop#x", "fragment"),
    ("spiffe://t.local/ns/sh%6Fp", "percent"),
    ("spiffe://t.local/ns//sa/x", "empty segment"),
    ("spiffe://t.local/ns/shop/", "end with '/'"),
    ("spiffe://t.local/", "bare '/'"),
    ("spiffe://t.local/ns/../sa/x", "'..' segment"),
    ("spiffe://t.local/ns/./sa/x", "'.' segment"),
    ("spiffe://t.local/ns/sh\u00f6p", "path characters"),
    ("spiffe://t.local/ns/a b", "path characters"),
    ("spiffe://" + "a" * 256 + "/x", "255 bytes"),
    ("spiffe://t.local/" + "a" * 2048, "2048 bytes"),
    ("SPIFFE://t.local/ns/shop", "lower-case"),
    ("https://t.local/ns/shop", "must start with 'spiffe://'"),
    ("spiffe://", "trust domain is missing"),
]

# Valid IDs that the valid patterns are matched against.
CANDIDATES = [
    "spiffe://t.local",
    "spiffe://t.local/a",
    "spiffe://t.local/ns/shop/sa/orders",
    "spiffe://t.local/ns/shop/sa/payments",
    "spiffe://t.local/ns/bank/sa/orders",
    "spiffe://t.local/ns/shop/sa/orders/extra",
    "spiffe://t.local/ns/shop/sa",
    "spiffe://t.local/ns/shop",
    "spiffe://other.td/ns/shop/sa/orders",
    "spiffe://t.local/NS/shop/sa/orders",
]

CONFIG_HEAD = ("identity: {cert: a, key: b, bundle: c}\n"
               "inbound:\n  listen: 127.0.0.1:1\n  app: 127.0.0.1:2\n")


def _config_problems(key_yaml: str) -> list[str]:
    try:
        load_config(CONFIG_HEAD + key_yaml, "s.yaml")
    except ConfigError as exc:
        return [f"{p.key}: {p.message}" for p in exc.problems]
    return []


def _policy(body: str) -> tuple[object, list[str]]:
    try:
        return load_policy(f"version: 1\ntrust_domain: {TD}\n" + body, "p.yaml"), []
    except ConfigError as exc:
        return None, [f"{p.key}: {p.message}" for p in exc.problems]


def _section_with(pattern: str) -> str:
    q = json.dumps(pattern)  # a YAML double-quoted scalar
    return (f"services:\n  {OWNER}:\n    egress: [{q}]\n"
            f"    rules:\n      - {{name: r, allow: {{from: [{q}]}}}}\n")


@pytest.mark.parametrize(("pattern", "problem"), PATTERNS)
def test_config_and_policy_accept_and_refuse_the_same_patterns(
    pattern: str, problem: str | None
) -> None:
    q = json.dumps(pattern)
    config = _config_problems(f"  allow_from: [{q}]\n")
    _, policy = _policy(_section_with(pattern))
    if problem is None:
        assert config == [] and policy == []
        assert spiffe_problem(pattern, wildcards=True) is None
        return
    assert len(config) == 1 and config[0].startswith("inbound.allow_from[0]: ")
    assert problem in config[0], config
    # Both places in the policy that take a pattern refuse it with the same words.
    assert sorted(k.split(": ", 1)[0].rsplit(".", 1)[-1] for k in policy) == [
        "egress[0]", "from[0]"], policy
    assert all(problem in m for m in policy), policy
    assert {m.split(": ", 1)[1] for m in policy} == {config[0].split(": ", 1)[1]}


@pytest.mark.parametrize("pattern", [p for p, why in PATTERNS if why is None])
def test_config_and_policy_match_the_same_ids(pattern: str) -> None:
    policy, problems = _policy(_section_with(pattern))
    assert not problems
    section = policy.section(OWNER)  # type: ignore[attr-defined]
    gate_pattern = compile_pattern(pattern)  # what the gate matches allow_from with
    for candidate in CANDIDATES:
        want = gate_pattern.matches(candidate)
        assert bool(section.allow.candidates(candidate, "/x")) is want, candidate
        assert (section.egress_match(candidate) is not None) is want, candidate


EXACT = [
    ("spiffe://t.local/ns/shop/sa/orders", None),
    ("spiffe://t.local", None),
    ("spiffe://t.local/ns/shop/sa/*", "wildcards are not allowed"),
    ("spiffe://t.local/ns/shop/**", "wildcards are not allowed"),
    ("spiffe://*/ns/shop", "cannot be a wildcard"),
    ("spiffe://t.local/ns/shop/", "end with '/'"),
    ("spiffe://t.local/a/../b", "'..' segment"),
    ("not-spiffe", "must start with 'spiffe://'"),
]


@pytest.mark.parametrize(("identity", "problem"), EXACT)
def test_exact_ids_are_one_grammar_too(identity: str, problem: str | None) -> None:
    q = json.dumps(identity)
    config = _config_problems(
        f"outbound:\n  - {{listen: 127.0.0.1:3, upstream: 127.0.0.1:4, identity: {q}}}\n")
    _, as_section = _policy(f"services:\n  {q}: {{rules: []}}\n")
    _, as_limited = _policy(f"rate_limits: [{{name: l, rate: 1, services: [{q}]}}]\n"
                            "services: {}\n")
    for found in (config, as_section, as_limited):
        if problem is None:
            assert found == []
        else:
            assert len(found) == 1 and problem in found[0], found
    if problem is not None:
        msgs = {m.split(": ", 1)[1] for m in config + as_section + as_limited}
        assert len(msgs) == 1  # the same words everywhere


# (identity, its namespace): only the Kubernetes shape /ns/X/sa/Y of the policy's own
# trust domain has one.
NAMESPACES = [
    ("spiffe://t.local/ns/shop/sa/orders", "shop"),
    ("spiffe://t.local/ns/shop/sa/orders/x", None),
    ("spiffe://t.local/ns/shop", None),
    ("spiffe://t.local/ns/shop/sa", None),
    ("spiffe://t.local/ns/shop/other/orders", None),
    ("spiffe://t.local/x/shop/sa/orders", None),
    ("spiffe://t.local", None),
    ("spiffe://other.td/ns/shop/sa/orders", None),  # foreign trust domain
]


@pytest.mark.parametrize(("identity", "namespace"), NAMESPACES)
def test_one_definition_of_a_namespace(identity: str, namespace: str | None) -> None:
    sid = parse_spiffe_id(identity)
    assert namespace_of(identity, TD) == namespace
    if sid.trust_domain == TD:
        assert sid.namespace == namespace
    # The policy's `namespaces` condition decides by it ...
    facts = RequestFacts("inbound", identity, "127.0.0.1", "GET", "/", "h", 1)
    held = request_holds(Conditions(namespaces=frozenset({"shop"})), facts, TD)
    assert held is (namespace == "shop")
    # ... and lint's "from outside namespaces" agrees with it.
    policy, problems = _policy(
        f"services:\n  {OWNER}:\n    rules:\n      - name: r\n"
        f"        allow: {{from: [{json.dumps(identity)}], namespaces: [shop]}}\n")
    assert not problems
    codes = {w.code for w in lint(policy, 0.0)}  # type: ignore[arg-type]
    assert ("never-matches" in codes) is (namespace != "shop")
