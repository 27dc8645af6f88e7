"""A lossy fold never widens an allow rule (``path_case: insensitive``).

Such a section folds ASCII case for every rule, and Windows names (a segment's ``:`` stream
suffix, its trailing dots and spaces) for deny rules only: ASP.NET Core routing and
Google-style custom methods read ``/jobs/42:get``, ``/jobs/42:cancel`` and ``/jobs/42`` as
three routes, so an allow rule for one must not admit the others (found by a hostile review:
``allow /v1/jobs/42:get`` let ``:cancel``, ``:delete`` and ``/v1/jobs/42`` through). The
family below is checked pairwise through ``decide`` (indexed and unindexed) against an
oracle written here, through a real sidecar, ``policy explain`` and ``policy lint``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.policy.decision import NO_AUTH, Decision, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.lint import lint
from sidecar.policy.loader import load_policy
from sidecar.policy.paths import normalise_path_pattern, normalise_target
from tests.harness import Pki, Proc, http, mtls_context, sidecar_cli, spiffe, start_inbound

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ORDERS, FRONT = spiffe("orders"), spiffe("frontend")

# What the Windows-name fold drops, as suffixes of a segment: custom methods and NTFS streams
# (from the first ':'), trailing dots and spaces, and mixes of them.
SUFFIXES = ("", ":x", ":get", ":GET", ":cancel", "::$DATA", "::$data",
            ":$i30:$INDEX_ALLOCATION", "::$INDEX_ALLOCATION", ".", "..", "%20", ".%20.",
            "%20.", ".::$DATA", ":get.")
BASES = ("/v1/jobs/42", "/Files/Report")
PATTERNS = tuple(b + s + tail for b in BASES for s in SUFFIXES for tail in ("", "/x"))
PATTERNS += ("/v1/jobs/*", "/v1/jobs/*/x", "/Files/**")
CASES = (str, str.lower, str.upper, str.swapcase)
PATHS = tuple(dict.fromkeys(case(p) for p in PATTERNS if "*" not in p for case in CASES))


def _case_only(path: str) -> tuple[str, ...]:
    """The oracle's allow-side form: ASCII case folded, one trailing '/' dropped, nothing
    else ('%20' escapes hold no letter a case fold could change but hex digits)."""
    lowered = "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in path)
    return tuple(lowered.rstrip("/").split("/")[1:]) if lowered.rstrip("/") else ()


def _windows(segment: str) -> str:
    name = segment.split(":", 1)[0]
    while name.endswith((".", "%20")):
        name = name[:-1] if name.endswith(".") else name[:-3]
    return name or segment


def _matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    if pattern and pattern[-1] == "**":
        head = pattern[:-1]
        return len(path) >= len(head) and all(
            p in ("*", s) for p, s in zip(head, path, strict=False))
    return len(pattern) == len(path) and all(
        p in ("*", s) for p, s in zip(pattern, path, strict=True))


def _policy(rules: str) -> str:
    return f"""\
version: 1
trust_domain: demo.local
services:
  {ORDERS}:
    path_case: insensitive
    rules:
{rules}"""


def _decisions(policy: Any, method: str, path: str) -> list[Decision]:
    """The decision for ``path``, indexed and unindexed (the oracle the index agrees with)."""
    norm, _ = normalise_target(path.encode())
    facts = RequestFacts(direction="inbound", peer=FRONT, source="127.0.0.1", method=method,
                         path=norm, host="orders", port=1, listener="inbound")
    now = time.time()
    return [decide(policy, ORDERS, facts, NO_AUTH, now, _unindexed=u) for u in (False, True)]


@pytest.mark.parametrize("mode", ["enforce", "observed"])
def test_folds_widen_deny_rules_never_allow_rules(mode: str) -> None:
    """For every pattern and path of the family, in a ``path_case: insensitive`` section:

    * ``POST``, decided by an allow rule for the pattern: allowed <=> the case-folded path
      matches the case-folded pattern (nothing the Windows-name fold drops). ``observed``:
      the allow rule in ``mode: dry-run`` -- default deny, the rule reported (would=allow)
      on exactly the same paths;
    * ``GET``, decided by a deny rule for the pattern before an allow-all: denied <=> the
      Windows-folded forms match (every spelling IIS reads as the denied name stays denied).
    """
    wrong = []
    dry = "        mode: dry-run\n" if mode == "observed" else ""
    for pattern in PATTERNS:
        rules = (f"      - name: one\n{dry}        allow: {{methods: [POST], "
                 f"paths: [\"{pattern}\"]}}\n"
                 f"      - name: deny-get\n        deny: {{methods: [GET], "
                 f"paths: [\"{pattern}\"]}}\n"
                 f"      - name: all-get\n        allow: {{methods: [GET]}}\n")
        policy = load_policy(_policy(rules), "p.yaml")
        want = _case_only(normalise_path_pattern(pattern))
        for path in PATHS:
            got_path = _case_only(normalise_target(path.encode())[0])
            expected = _matches(want, got_path)
            if mode == "enforce":
                got = tuple(d.allowed for d in _decisions(policy, "POST", path))
            else:
                got = tuple(not d.allowed and d.would == "allow" and d.rule == "one"
                            for d in _decisions(policy, "POST", path))
            if got != (expected, expected):
                wrong.append(("POST", pattern, path, got, expected))
            denied = _matches(tuple(map(_windows, want)), tuple(map(_windows, got_path)))
            got = tuple(not d.allowed for d in _decisions(policy, "GET", path))
            if got != (denied, denied):
                wrong.append(("GET", pattern, path, got, denied))
    assert wrong == [], (len(wrong), wrong[:20])


# --- the reviewer's policy through a real sidecar, explain and lint ---------------------------

JOB_POLICY = _policy(f"""\
      - name: frontend-may-only-read-job-42
        allow:
          from: [{FRONT}]
          methods: [POST]
          paths: [/v1/jobs/42:get]
      - name: no-admin
        deny: {{paths: [/admin]}}
""")
# In this order: the allowed one first, so a decision kept under a key that folds names
# would be served to the others.
JOB_REQUESTS = [("/v1/jobs/42:get", 200), ("/V1/Jobs/42:GET", 200),
                ("/v1/jobs/42:cancel", 403), ("/v1/jobs/42:delete", 403),
                ("/v1/jobs/42", 403), ("/v1/jobs/42.", 403), ("/v1/jobs/42%20", 403),
                ("/v1/jobs/42::$DATA", 403), ("/v1/jobs/42:get.", 403),
                ("/v1/jobs/42:get::$DATA", 403), ("/v1/jobs/43:get", 403),
                ("/admin::$DATA", 403), ("/ADMIN.", 403)]


def _start(tmp: Path, pki: Pki, app: int, procs: list[Proc], policy: str) -> Any:
    path = tmp / "policy.yaml"
    path.write_text(policy)
    return start_inbound(tmp, pki, app, procs, policy=str(path)), path


def _explain(policy: Path, method: str, path: str) -> tuple[int, str, str]:
    """``policy explain``'s exit code, verdict line and whole output."""
    done = sidecar_cli("policy", "explain", str(policy), "--to", ORDERS, "--from", FRONT,
                       "--method", method, "--path", path, "--host", "orders")
    return done.returncode, done.stdout.strip().splitlines()[-1], done.stdout


def test_allow_for_one_custom_method_admits_only_it_end_to_end(
        tmp_path: Path, pki: Pki, app: int, procs: list[Proc]) -> None:
    proc, policy = _start(tmp_path, pki, app, procs, JOB_POLICY)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    got = [(p, http(proc.port("inbound"), "POST", p, body=b"", ctx=ctx).status)
           for p, _ in JOB_REQUESTS]
    assert got == JOB_REQUESTS
    # explain decides as the data path did, for every one of them, and its trail shows
    # which rule matched (the allow rule only for :get, the deny rule for every /admin name).
    for path, status in JOB_REQUESTS:
        code, verdict, out = _explain(policy, "POST", path)
        assert (code, verdict.split()[1]) == ((0, "ALLOW") if status == 200 else (1, "DENY")), \
            (path, verdict)
        matched = {line.split()[2] for line in out.splitlines() if line.endswith(": matched")}
        assert matched == ({"frontend-may-only-read-job-42"} if status == 200 else
                           {"no-admin"} if "admin" in path.lower() else set()), (path, out)
    # lint says the allow pattern is not widened by the fold.
    done = sidecar_cli("policy", "lint", str(policy))
    found = [line for line in done.stdout.splitlines() if "[allow-name-not-folded]" in line]
    assert len(found) == 1 and "/v1/jobs/42:get" in found[0] and "/v1/jobs/42" in found[0]
    assert found[0].startswith(f"warning: {policy}:")


@pytest.mark.parametrize("pattern", ["/v1/jobs/42:get", "/a.", "/a%20", "/a. .", "/a::$DATA/b",
                                     "/A:$i30:$INDEX_ALLOCATION/**"])
def test_lint_names_allow_patterns_the_fold_would_change(pattern: str) -> None:
    src = _policy(f"      - name: one\n        allow: {{paths: [\"{pattern}\"]}}\n")
    found = [w for w in lint(load_policy(src, "p.yaml"), time.time())
             if w.code == "allow-name-not-folded"]
    assert len(found) == 1 and found[0].line == 7 \
        and normalise_path_pattern(pattern) in found[0].message
    # Not in a case-sensitive section (nothing folds), not for deny rules, nor for a pattern
    # the fold leaves alone.
    for other in (src.replace("insensitive", "sensitive"), src.replace("allow:", "deny:"),
                  src.replace(pattern, "/v1/jobs/42/x.y")):
        assert not [w for w in lint(load_policy(other, "p.yaml"), time.time())
                    if w.code == "allow-name-not-folded"], other
