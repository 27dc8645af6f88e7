"""Micro-benchmark: policy decision time at 10, 1,000 and 10,000 rules.

Policies are generated here: one service section with N allow rules, each for a different
caller and path prefix, plus one deny rule. Three requests are timed: one that matches the
first rule, one that matches the last, and one that matches nothing (default deny). Loops are
bounded by a count and a time budget. Prints human lines and one ``BENCHJSON {...}`` line;
exits 3 when ``sidecar.policy`` (load_policy + decide) is not there yet.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RULE_COUNTS = (10, 1_000, 10_000)
MAX_ITERATIONS = 200_000
TIME_BUDGET_S = 0.2 if os.environ.get("BENCH_QUICK") == "1" else 1.0
TRUST_DOMAIN = "bench.local"
SERVICE = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/server"


def policy_yaml(rules: int) -> str:
    """A policy whose server section holds ``rules`` allow rules and one deny rule."""
    lines = ["version: 1", f"trust_domain: {TRUST_DOMAIN}", "mode: enforce", "services:",
             f"  {SERVICE}:", "    rules:",
             "      - name: nobody-reaches-admin", "        deny:", "          paths: [/admin/**]"]
    for i in range(rules):
        lines += [f"      - name: rule-{i}", "        allow:",
                  f"          from: [spiffe://{TRUST_DOMAIN}/ns/bench/sa/caller-{i}]",
                  "          methods: [GET, POST]",
                  f"          paths: [/svc-{i}, /svc-{i}/*]"]
    return "\n".join(lines) + "\n"


def time_per_call(fn: object) -> float:
    """Mean microseconds per call of ``fn()``, bounded by MAX_ITERATIONS and TIME_BUDGET_S."""
    assert callable(fn)
    n, batch, start = 0, 100, time.perf_counter()
    while n < MAX_ITERATIONS and time.perf_counter() - start < TIME_BUDGET_S:
        for _ in range(batch):
            fn()
        n += batch
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    """Run the micro-benchmark and print its results."""
    try:
        from sidecar.policy.decision import NO_AUTH, RequestFacts
        from sidecar.policy.engine import decide
        from sidecar.policy.loader import load_policy
    except ImportError as exc:
        print(f"policy decision: unavailable ({exc})")
        return 3
    results = []
    now = time.time()
    for rules in RULE_COUNTS:
        text = policy_yaml(rules)
        t0 = time.perf_counter()
        policy = load_policy(text, "bench-policy.yaml")
        load_ms = (time.perf_counter() - t0) * 1e3

        def facts(i: int, path: str) -> RequestFacts:
            return RequestFacts(direction="inbound",
                                peer=f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/caller-{i}",
                                source="127.0.0.1", method="GET", path=path,
                                host="server", port=15443, listener="inbound")

        cases = {"first_rule": facts(0, "/svc-0/x"),
                 "last_rule": facts(rules - 1, f"/svc-{rules - 1}/x"),
                 "default_deny": facts(rules + 5, "/nowhere")}
        row: dict[str, float | int] = {"rules": rules, "load_ms": round(load_ms, 2)}
        for case, f in cases.items():
            decision = decide(policy, SERVICE, f, NO_AUTH, now)
            expect_allow = case != "default_deny"
            if decision.allowed != expect_allow:
                print(f"policy decision: WRONG RESULT for {case} at {rules} rules: {decision}")
                return 1
            row[f"{case}_us"] = round(
                time_per_call(lambda f=f, p=policy: decide(p, SERVICE, f, NO_AUTH, now)), 3)
        results.append(row)
        print(f"policy decision  {rules:>6} rules: load {row['load_ms']:>9.1f} ms   "
              f"first {row['first_rule_us']:>7.2f} us   last {row['last_rule_us']:>7.2f} us   "
              f"no match {row['default_deny_us']:>7.2f} us")
    print("BENCHJSON " + json.dumps({"name": "policy", "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
