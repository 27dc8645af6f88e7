"""Policy holes of the twenty-eighth session's hostile review (probe-policy2), as families.

1. ``path_case: insensitive``: the ASP.NET cookieless fold of deny rules REPLACED the path
   instead of adding a form, so ``deny /admin/*`` let ``/admin/(S(x))`` through (an Express
   route's ``:id``; 403 in a ``sensitive`` section) and ``deny /secret/**`` let
   ``/secret/..(S(x))/y`` through. A deny rule now matches the path as sent (case and each
   segment's Windows name folded) and as ASP.NET reads it: never fewer matches than without
   the fold. Every cookieless value at every place of every kind of deny pattern, with
   ``..`` and ``.`` combinations, in each ``path_case``, decided by the engine (indexed and
   unindexed), by ``explain``, and a representative set by real sidecars; ``policy lint``
   reads the same forms (``deny /admin/(S(x))`` is not shadowed by ``deny /admin/*``).
2. A deny pattern naming a non-ASCII path (raw or percent-encoded) in a section that refuses
   such paths (``non_ascii_paths: refuse``, the default) could never match: refused at load
   with file, line and key; it still loads where the section allows non-ASCII paths.
3. A section's pattern segments (``paths``, ``from``, ``egress``) are bounded
   (``MAX_SECTION_PATTERN_SEGMENTS``): 420,000 patterns within every other bound took 8.6 s
   and 745 MiB to load. At the bound a section loads; one segment more is refused with file,
   line and key of the entry that crossed it (no timing here: the count decides).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.errors import BadRequest, ConfigError
from sidecar.policy.decision import NO_AUTH, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.explain import explain
from sidecar.policy.lint import lint
from sidecar.policy.loader import (
    MAX_SECTION_PATTERN_SEGMENTS,
    NON_ASCII_PATTERN_PROBLEM,
    SECTION_PATTERNS_PROBLEM,
    load_policy,
)
from sidecar.policy.paths import normalise_target
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh

pytestmark = pytest.mark.usefixtures("no_internal_errors")

TD = "demo.local"
FRONTEND = h.spiffe("frontend")
ORDERS = h.spiffe("orders")
NOW = 1_800_000_000.0
CASES = ("insensitive", "sensitive", None)  # None: the section does not say path_case

# --- 1. the cookieless fold adds a form ---------------------------------------------------

# Deny patterns of every kind, each with a path it denies as written.
DENY_PATTERNS = {
    "/admin/*": "/admin/7",  # a one-segment wildcard at the end
    "/secret/**": "/secret/y",  # the rest
    "/ops/reset": "/ops/reset",  # exact
    "/api/*/delete": "/api/9/delete",  # a wildcard in the middle
    "/internal": "/internal",  # exact, one segment (a prefix of longer paths)
}
# ASP.NET's cookieless values: session, anonymous id, forms auth, other letters, several in
# one, empty, lower case, percent-encoded (normalised to the same path).
VALUES = ("(S(x))", "(A(x))", "(F(x))", "(X(1))", "(Z(abc))", "(S(a)F(b))", "(s(x))", "(S())",
          "%28S%28x%29%29")


def variants(path: str, value: str) -> list[str]:
    """``value`` at every place of ``path``: a segment of its own at every boundary, the
    segment a wildcard matches, inside and at the end of every name, and with ``..`` and
    ``.`` before it (a step up, a step nowhere to ASP.NET; a name to every other router)."""
    segs = path.split("/")[1:]
    out: list[str] = []
    for i in range(len(segs) + 1):
        head, tail = segs[:i], segs[i:]
        for extra in (value, ".." + value, "." + value, value + ".."):
            out.append("/" + "/".join([*head, extra, *tail]))
    for i, seg in enumerate(segs):
        head, tail = segs[:i], segs[i + 1:]
        for name in (value, seg + value, seg[:1] + value + seg[1:], ".." + value):
            out.append("/" + "/".join([*head, name, *tail]))
    return list(dict.fromkeys(out))


COOKIE = re.compile(r"\((?:[A-Za-z]\([^()/]*\))+\)")


def aspnet_reading(path: str) -> list[str]:
    """The oracle: the segments ASP.NET routes ``path`` (normalised) as, cookieless values
    removed, empty and ``.`` segments dropped, ``..`` a step up."""
    kept: list[str] = []
    for seg in COOKIE.sub("", path).split("/")[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            if kept:
                kept.pop()
            continue
        kept.append(seg)
    return kept


def pattern_matches(pattern: str, segs: list[str]) -> bool:
    pat = pattern.split("/")[1:] if pattern != "/" else []
    for i, p in enumerate(pat):
        if p == "**" and i == len(pat) - 1:
            return True
        if i >= len(segs) or (p != "*" and p != segs[i]):
            return False
    return len(pat) == len(segs)


def oracle_denies(case: str | None, path: str, patterns: Any = DENY_PATTERNS) -> bool:
    """Denied as sent (case folded unless the section says sensitive) or, in an insensitive
    section, as ASP.NET reads it: the union, never less than the path as sent."""
    sent = path.split("/")[1:]
    if case != "sensitive":
        sent = [s.lower() for s in sent]
        patterns = [p.lower() for p in patterns]
    if any(pattern_matches(p, sent) for p in patterns):
        return True
    reading = [s.lower() for s in aspnet_reading(path)]
    return case == "insensitive" and any(pattern_matches(p, reading) for p in patterns)


def section(case: str | None, patterns: Any = DENY_PATTERNS) -> dict[str, Any]:
    sec: dict[str, Any] = {"rules": [
        *({"name": f"deny-{n}", "deny": {"paths": [p]}} for n, p in enumerate(patterns)),
        {"name": "frontend", "allow": {"from": [FRONTEND]}}]}
    if case is not None:
        sec["path_case"] = case
    return sec


def policy_of(case: str | None, patterns: Any = DENY_PATTERNS) -> dict[str, Any]:
    return {"version": 1, "trust_domain": TD, "services": {ORDERS: section(case, patterns)}}


def loaded(case: str | None, patterns: Any = DENY_PATTERNS) -> Any:
    return load_policy(yaml.safe_dump(policy_of(case, patterns)), "p.yaml")


def family() -> list[str]:
    """Every variant of every denied path with every value, normalised (refused ones out)."""
    out: list[str] = []
    for path in DENY_PATTERNS.values():
        for value in VALUES:
            for raw in variants(path, value):
                try:
                    out.append(normalise_target(raw.encode())[0])
                except BadRequest:
                    pass  # ("..(S(x))" is no dot segment: only refusals of other shapes)
    return list(dict.fromkeys(out))


FAMILY = family()


def engine_denies(policy: Any, path: str) -> bool:
    facts = RequestFacts("inbound", FRONTEND, "10.0.0.1", "GET", path, "orders", 15443,
                         "inbound")
    decision = decide(policy, ORDERS, facts, NO_AUTH, NOW)
    oracle = decide(policy, ORDERS, facts, NO_AUTH, NOW, _unindexed=True)
    assert decision == oracle, (path, decision, oracle)
    return not decision.allowed


@pytest.mark.parametrize("case", CASES)
def test_every_cookieless_value_everywhere_denies_as_sent_and_as_read(case: str | None) -> None:
    assert len(FAMILY) > 700
    policy = loaded(case)
    control = loaded("sensitive")
    wrong: list[tuple[str, object]] = []
    for path in FAMILY:
        denied = engine_denies(policy, path)
        if denied != oracle_denies(case, path):
            wrong.append((path, denied))
        # never fewer deny matches than without the fold
        if engine_denies(control, path) and not denied:
            wrong.append((path, "denied without the fold"))
    assert not wrong, wrong[:20]


@pytest.mark.parametrize("case", CASES)
def test_explain_decides_every_member_as_the_engine(case: str | None) -> None:
    policy = loaded(case)
    for path in FAMILY:
        e = explain(policy, ORDERS, caller=FRONTEND, method="GET", target=path,
                    host="orders", port=15443, listener="inbound", now=NOW)
        assert e.decision is not None, path
        assert e.allowed is (not oracle_denies(case, path)), (path, e.decision)
        if not e.allowed:  # the rule the trail shows is the deciding one
            assert e.decision.rule.startswith("deny-"), (path, e.decision)


# Deny patterns that themselves hold cookieless values: as written and as ASP.NET reads them.
VALUE_PATTERNS = ("/admin/(S(x))", "/(A(y))/panel/**", "/files/(F(z))/x", "/a/b(S(q))c/*",
                  "/docs/..(S(x))/raw")
VALUE_PATHS = ("/admin/(S(x))", "/ADMIN/(s(X))", "/admin", "/admin/(S(y))", "/(A(y))/panel",
               "/(A(y))/panel/k", "/panel/k", "/(S(w))/panel/k", "/files/(F(z))/x", "/files/x",
               "/a/b(S(q))c/1", "/a/bc/1", "/a/b(S(r))c/1", "/docs/..(S(x))/raw", "/raw",
               "/docs/raw", "/other", "/admin/x")


@pytest.mark.parametrize("case", CASES)
def test_patterns_holding_cookieless_values(case: str | None) -> None:
    policy = loaded(case, VALUE_PATTERNS)
    control = loaded("sensitive", VALUE_PATTERNS)
    for path in VALUE_PATHS:
        denied = engine_denies(policy, path)
        if engine_denies(control, path):
            assert denied, path  # never fewer than without the fold
        sent = [s.lower() for s in path.split("/")[1:]]
        if case != "sensitive" and any(pattern_matches(p.lower(), sent)
                                       for p in VALUE_PATTERNS):
            assert denied, path
        if case == "insensitive":
            read = [s.lower() for s in aspnet_reading(path)]
            if any(pattern_matches("/" + "/".join(aspnet_reading(p)).lower(), read)
                   for p in VALUE_PATTERNS):
                assert denied, path
        e = explain(policy, ORDERS, caller=FRONTEND, method="GET", target=path,
                    host="orders", port=15443, listener="inbound", now=NOW)
        assert e.allowed is (not denied), path
    assert engine_denies(policy, "/other") is False


# (earlier rule, later rule, path_case) -> is the later one shadowed?
SHADOWS = [
    ({"deny": {"paths": ["/admin/*"]}}, {"deny": {"paths": ["/admin/(S(x))"]}},
     "insensitive", False),  # the later one also denies /admin, which /admin/* does not
    ({"deny": {"paths": ["/admin/*"]}}, {"deny": {"paths": ["/admin/(A(x))"]}},
     "insensitive", False),
    ({"deny": {"paths": ["/x/*/y"]}}, {"deny": {"paths": ["/x/(S(a))/y"]}}, "insensitive", False),
    ({"deny": {"paths": ["/admin/**"]}}, {"deny": {"paths": ["/admin/(S(x))"]}},
     "insensitive", True),
    ({"deny": {"paths": ["/(S(x))/admin"]}}, {"deny": {"paths": ["/admin"]}}, "insensitive",
     True),
    ({"deny": {"paths": ["/**"]}}, {"deny": {"paths": ["/a/..(S(x))/b"]}}, "insensitive", True),
    ({"deny": {"paths": ["/admin/*"]}}, {"deny": {"paths": ["/admin/(S(x))"]}}, "sensitive",
     True),  # no fold there: (S(x)) is a name like any other
    ({"deny": {"paths": ["/admin/*"]}}, {"deny": {"paths": ["/admin/(S(x))"]}}, None, True),
    ({"allow": {"paths": ["/admin/**"]}}, {"allow": {"paths": ["/ADMIN/x"]}}, "insensitive",
     True),  # allow rules of an insensitive section fold case
    ({"allow": {"paths": ["/admin/**"]}}, {"allow": {"paths": ["/ADMIN/x"]}}, "sensitive",
     False),
]


@pytest.mark.parametrize(("earlier", "later", "case", "shadowed"), SHADOWS)
def test_lint_reads_the_forms_the_engine_matches(earlier: dict[str, Any], later: dict[str, Any],
                                                 case: str | None, shadowed: bool) -> None:
    sec: dict[str, Any] = {"rules": [{"name": "a", **earlier}, {"name": "b", **later}]}
    if case is not None:
        sec["path_case"] = case
    policy = load_policy(yaml.safe_dump({"version": 1, "trust_domain": TD,
                                         "services": {ORDERS: sec}}), "p.yaml")
    codes = [w.code for w in lint(policy, NOW) if w.key.endswith("rules[1]")]
    assert ("shadowed" in codes) is shadowed, codes
    if shadowed:
        # what lint claims, the engine does: every path the later rule's patterns name as
        # written (and, folded, as ASP.NET reads them) the earlier rule matches too
        effect = "deny" if "deny" in later else "allow"

        def alone(rule: dict[str, Any]) -> Any:
            return load_policy(yaml.safe_dump({"version": 1, "trust_domain": TD, "services": {
                ORDERS: {**sec, "rules": [rule]}}}), "p.yaml")

        only_a, only_b = alone({"name": "a", **earlier}), alone({"name": "b", **later})
        for pattern in later[effect]["paths"]:
            for path in {pattern, "/" + "/".join(aspnet_reading(pattern))}:
                facts = RequestFacts("inbound", FRONTEND, "10.0.0.1", "GET", path, "orders",
                                     15443, "inbound")
                if decide(only_b, ORDERS, facts, NO_AUTH, NOW).rule == "b":
                    assert decide(only_a, ORDERS, facts, NO_AUTH, NOW).rule == "a", path


# Through real sidecars: the review's paths and a representative set of the family.
LIVE = ("/admin/7", "/admin/(S(x))", "/api/(S(x))/delete", "/secret/..(S(x))/y",
        "/admin/(A(x))", "/admin/(F(x))", "/admin/(X(1))", "/admin/(S(a)F(b))", "/admin/(s(x))",
        "/admin/%28S%28x%29%29", "/admin/..(S(x))", "/admin/.(S(x))", "/secret/(S(x))/y",
        "/secret/.(S(x))/y", "/secret/x/..(S(x))/..(S(y))/z", "/ops/reset/(S(x))",
        "/ops/(S(x))/reset", "/(S(x))/ops/reset", "/op(S(x))s/reset", "/ops/reset(A(x))",
        "/api/9/(F(x))/delete", "/api/9/delete/..(S(x))", "/internal/(S(x))",
        "/internal/..(S(x))", "/x/..(S(x))/internal", "/Admin/(S(x))", "/SECRET/..(S(x))/y",
        "/public/(S(x))", "/public/..(S(x))/y")


@pytest.fixture(scope="module", params=CASES, ids=lambda c: str(c))
def mesh(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrdersMesh, str | None]]:
    with orders_mesh(tmp_path_factory.mktemp(f"review28-{request.param}"),
                     policy_of(request.param)) as m:
        yield m, request.param


def test_real_sidecar_denies_every_form(mesh: tuple[OrdersMesh, str | None]) -> None:
    m, case = mesh
    policy = loaded(case)
    for raw in LIVE:
        path = normalise_target(raw.encode())[0]
        want = 403 if oracle_denies(case, path) else 200
        assert engine_denies(policy, path) is (want == 403), raw
        assert m.get(raw).status == want, (case, raw)
    for raw in LIVE[:4]:  # the review's own paths: denied in every section
        assert m.get(raw).status == 403, (case, raw)


def test_policy_explain_cli_agrees_with_the_sidecar(mesh: tuple[OrdersMesh, str | None]) -> None:
    m, case = mesh
    file = str(m.policy_dir / "mesh.yaml")
    jobs = [("policy", "explain", file, "--to", ORDERS, "--from", FRONTEND, "--path", raw,
             "-o", "json") for raw in LIVE[:8]]
    for raw, r in zip(LIVE[:8], h.sidecar_cli_many(jobs), strict=True):
        action = yaml.safe_load(r.stdout)["decision"]["action"]
        assert action == ("allow" if m.get(raw).status == 200 else "deny"), (case, raw)


# --- 2. a deny pattern naming a non-ASCII path -------------------------------------------

NON_ASCII_PATTERNS = ("/\u0430dmin/**",  # Cyrillic a
                      "/caf\u00e9", "/\uff41dmin", "/api/\u00fcnits/*", "/x/\U0001f600",
                      "/%D0%B0dmin/**", "/caf%c3%a9", "/x/%E2%80%8B", "/a/b%C3%A9c/*")
ASCII_PATTERNS = ("/admin/**", "/%61dmin/x", "/a%20b", "/x/%5B1%5D", "/(S(x))/y")


def non_ascii_text(section_keys: str, pattern: str, effect: str = "deny") -> str:
    # Written by hand, so that the line of every key is known (the pattern is on line 9).
    return (f"version: 1\ntrust_domain: {TD}\nservices:\n  {ORDERS}:\n{section_keys}"
            f"    rules:\n      - name: r\n        {effect}:\n          paths:\n"
            f"            - /fine/**\n            - '{pattern}'\n"
            f"      - name: fe\n        allow:\n          from: [{FRONTEND}]\n")


REFUSING = ("", "    non_ascii_paths: refuse\n", "    path_case: insensitive\n",
            "    path_case: sensitive\n")


@pytest.mark.parametrize("pattern", NON_ASCII_PATTERNS)
@pytest.mark.parametrize("keys", REFUSING)
def test_a_deny_pattern_no_request_can_reach_is_refused(keys: str, pattern: str) -> None:
    text = non_ascii_text(keys, pattern)
    line = text.splitlines().index(f"            - '{pattern}'") + 1
    with pytest.raises(ConfigError) as err:
        load_policy(text, "pol.yaml")
    problems = [p for p in err.value.problems if p.message == NON_ASCII_PATTERN_PROBLEM]
    assert [(p.file, p.line, p.key) for p in problems] == [
        ("pol.yaml", line, f"services.{ORDERS}.rules[0].deny.paths[1]")], err.value.problems
    assert "no request can match" in NON_ASCII_PATTERN_PROBLEM
    with pytest.raises(ConfigError):  # the sidecar's own load refuses it too
        load_policy(text, "pol.yaml", only=ORDERS)


@pytest.mark.parametrize("pattern", NON_ASCII_PATTERNS)
def test_a_section_that_allows_non_ascii_paths_keeps_it(pattern: str) -> None:
    policy = load_policy(non_ascii_text("    non_ascii_paths: allow\n", pattern), "pol.yaml")
    # and it denies the path it names, in every spelling of it
    from urllib.parse import quote
    raw = quote(pattern.replace("/**", "/x").replace("/*", "/x"), safe="/%")
    path = normalise_target(raw.encode(), allow_non_ascii=True)[0]
    assert engine_denies(policy, path), (pattern, path)


@pytest.mark.parametrize("pattern", ASCII_PATTERNS)
@pytest.mark.parametrize("keys", REFUSING)
def test_ascii_patterns_still_load(keys: str, pattern: str) -> None:
    load_policy(non_ascii_text(keys, pattern), "pol.yaml")


def test_policy_check_names_file_line_and_key(tmp_path: Path) -> None:
    file = tmp_path / "pol.yaml"
    file.write_text(non_ascii_text("", NON_ASCII_PATTERNS[0]), encoding="utf-8")
    r = h.sidecar_cli("policy", "check", str(file))
    assert r.returncode != 0
    assert f"{file}:10: services.{ORDERS}.rules[0].deny.paths[1]: this section refuses" \
        in r.stdout + r.stderr, (r.stdout, r.stderr)


# --- 3. a section's pattern segments are bounded -------------------------------------------

def bounded_text(shape: str, extra: int) -> tuple[str, str]:
    """A section of ``MAX_SECTION_PATTERN_SEGMENTS + extra`` pattern segments of one shape,
    and the key of the entry that takes it past the bound (when ``extra`` > 0)."""
    bound = MAX_SECTION_PATTERN_SEGMENTS
    assert bound == 100_000  # (docs/policy.md states it, with the figures measured)
    lines = [f"version: 1\ntrust_domain: {TD}\nservices:\n  {ORDERS}:\n"]
    sec = f"services.{ORDERS}"
    if shape == "deep paths":  # 100 patterns of 1,000 segments, 4 per rule (8 KiB each)
        rules = [([f"/p{i}" + "/a" * 999 for i in range(4 * r, 4 * r + 4)]) for r in range(25)]
        rules[-1][-1] += "/b" * extra
        lines.append("    rules:\n" + "".join(
            f"      - name: r{r}\n        deny:\n          paths:\n"
            + "".join(f"            - {p}\n" for p in pats) for r, pats in enumerate(rules)))
        return "".join(lines), f"{sec}.rules[24].deny.paths[3]"
    if shape == "many paths":  # 50,000 patterns of 2 segments, 42 per rule: the review's
        pats = [f"/{i:x}/*" for i in range(bound // 2 + extra)]
        per = 42
        body = "".join(f"      - name: r{r}\n        allow:\n          paths:\n" + "".join(
            f"            - {p}\n" for p in pats[r * per:(r + 1) * per])
            for r in range((len(pats) + per - 1) // per))
        lines.append("    rules:\n" + body)
        n = bound // 2  # the index of the first pattern past the bound
        return "".join(lines), f"{sec}.rules[{n // per}].allow.paths[{n % per}]"
    if shape == "from":  # identity patterns of 1,001 segments (2 KiB each)
        ids = [f"spiffe://{TD}/x{i}" + "/a" * 998 for i in range(100)]  # 1,000 each
        ids[-1] += "/b" * extra
        lines.append("    rules:\n" + "".join(
            f"      - name: r{i}\n        deny:\n          from:\n            - {sid}\n"
            for i, sid in enumerate(ids)))
        return "".join(lines), f"{sec}.rules[99].deny.from[0]"
    assert shape == "mixed"  # paths, from and egress: 40,000 + 30,000 + 30,000
    paths = ["/m" + "/a" * 398 for _ in range(100)]  # 400 each, with /x{i}
    ids = [f"spiffe://{TD}/y{i}" + "/a" * 298 for i in range(100)]  # 300 each
    egress = [f"spiffe://{TD}/e{i}" + "/a" * 298 for i in range(100)]
    egress[-1] += "/b" * extra
    lines.append("    egress:\n" + "".join(f"      - {e}\n" for e in egress))
    lines.append("    rules:\n" + "".join(
        f"      - name: r{i}\n        deny:\n          paths:\n            - {p}/x{i}\n"
        f"          from:\n            - {ids[i]}\n" for i, p in enumerate(paths)))
    return "".join(lines), f"{sec}.egress[99]"


SHAPES = ("deep paths", "many paths", "from", "mixed")


@pytest.mark.parametrize("shape", SHAPES)
def test_a_section_at_the_bound_loads(shape: str) -> None:
    text, _ = bounded_text(shape, 0)
    load_policy(text, "big.yaml", only=ORDERS)


@pytest.mark.parametrize("extra", [1, 50])
@pytest.mark.parametrize("shape", SHAPES)
def test_one_segment_past_the_bound_is_refused(shape: str, extra: int) -> None:
    text, key = bounded_text(shape, extra)
    for only in (ORDERS, None):  # the sidecar's own section; policy check of every section
        with pytest.raises(ConfigError) as err:
            load_policy(text, "big.yaml", only=only)
        found = [p for p in err.value.problems if p.message == SECTION_PATTERNS_PROBLEM]
        assert [(p.file, p.key) for p in found] == [("big.yaml", key)], err.value.problems
        assert found[0].line is not None  # the line of that very list entry
        assert text.splitlines()[found[0].line - 1].lstrip().startswith("- "), found
        assert len(err.value.problems) == 1, err.value.problems  # nothing else is built
