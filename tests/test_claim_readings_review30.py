"""Deny rules read string values and claim names as the apps behind do (hostile review,
session 30).

Two holes in how a deny rule's claim test read a token (``compiled.claim_holds``: "a deny
rule denies under every way an app behind may read the token"), each fixed as a class:

1. string values were compared exactly: deny ``preferred_username: mallory`` let
   ``"MALLORY"``, ``"Mallory"``, ``"mallory "``, ``"mallóry"`` and fullwidth
   ``"ｍａｌｌｏｒｙ"`` through, ``email: {one_of: [evil@attacker.example]}``
   ``"Evil@Attacker.Example"``, ``role: banned`` ``"BANNED"`` and ``["Banned"]`` -- where the
   app compares them case- and accent-insensitively (MySQL's utf8mb4_0900_ai_ci, SQL
   Server's CI collations with PAD SPACE, sqlite NOCASE, email domains). The readings are
   now data (``compiled.STRING_READINGS``: NFKC + casefold + strip; the same without
   accents);
2. claim names apps read as the same claim were not read: deny ``scope: {contains:
   orders:delete}`` missed ``scp`` (Okta, Entra ID; Spring Security reads ``scope`` else
   ``scp``) and Microsoft.Identity.Web's scope URI claim; deny on ``roles`` missed ``role``
   and the ClaimTypes.Role URI. The aliases are now data (``compiled.CLAIM_ALIASES``).

Allow rules stay strict. The expected readings and aliases are written out here,
independently of the code's tables (``test_the_code_tables_are_the_documented_ones`` ties
the two); every member is checked in process (``claim_holds`` and ``explain`` on the compiled
policy: the engine's decision and the trail), and a representative of every class through
one real sidecar (module fixture) with a real ``jwks_file`` and signed tokens.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
import yaml

from sidecar.jsondoc import read_json
from sidecar.policy import compiled
from sidecar.policy.compiled import claim_holds
from sidecar.policy.explain import explain
from sidecar.policy.loader import load_policy_set
from sidecar.policy.model import ClaimCondition
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import AUDIENCE, ISSUER, ec_key, jwk, jwks_bytes
from tests.test_claim_readings import payload_text, sign

pytestmark = pytest.mark.usefixtures("no_internal_errors")

FRONTEND = h.spiffe("frontend")
ORDERS = h.spiffe("orders")
FILLER = "zz-filler"

# --- 1. string values: the spellings a case-/accent-insensitive reader takes as the value --

_ACCENTED = {"a": "á", "e": "é", "i": "í", "o": "ó", "u": "ú", "y": "ý"}


def _accent(s: str) -> str:
    """The first accentable letter with an acute accent, precomposed."""
    for i, c in enumerate(s):
        if c in _ACCENTED:
            return s[:i] + _ACCENTED[c] + s[i + 1:]
    raise AssertionError(s)


def _accent_combining(s: str) -> str:
    """The same accent as a combining mark after the letter (NFD)."""
    for i, c in enumerate(s):
        if c in _ACCENTED:
            return s[:i + 1] + "\u0301" + s[i + 1:]
    raise AssertionError(s)


def _fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


# reading -> spelling of a test's value the reader takes as the value.
SPELLINGS: dict[str, dict[str, Callable[[str], str]]] = {
    "case (MySQL/SQL Server CI, sqlite NOCASE, RFC 5321 domains)": {
        "UPPER": str.upper, "Title": str.title, "swapped": str.swapcase},
    "surrounding white space (SQL Server PAD SPACE, trim)": {
        "trailing SP": lambda s: s + " ", "both sides": lambda s: " \t" + s + "\n",
        "ideographic space": lambda s: s + "\u3000", "UPPER padded": lambda s: s.upper() + "  "},
    "width and compatibility (NFKC)": {
        "fullwidth": _fullwidth, "fullwidth UPPER": lambda s: _fullwidth(s.upper())},
    "accents (utf8mb4_0900_ai_ci, SQL Server _AI)": {
        "acute": _accent, "acute UPPER": lambda s: _accent(s).upper(),
        "combining mark": _accent_combining, "acute padded": lambda s: _accent(s) + " "},
}
# Not the value under any reading: different letters, a letter more or less, white space
# inside, a look-alike from another script (confusables are not a reading: no collation
# cited folds Cyrillic to Latin).
CONTROLS: dict[str, Callable[[str], str]] = {
    "one more letter": lambda s: s + "x", "one letter less": lambda s: s[:-1],
    "letter changed": lambda s: s[:-1] + ("z" if s[-1] != "z" else "q"),
    "space inside": lambda s: s[:2] + " " + s[2:], "prefix": lambda s: "x" + s,
    "Cyrillic a/e/o": lambda s: s.replace("a", "\u0430").replace("e", "\u0435")
    .replace("o", "\u043e"),
}

# deny test -> (claim, spec, the value its spellings are made of).
STRING_TESTS: dict[str, tuple[str, Any, str]] = {
    "username equals": ("preferred_username", {"equals": "mallory"}, "mallory"),
    "email one_of": ("email", {"one_of": ["zz@other.example", "evil@attacker.example"]},
                     "evil@attacker.example"),
    "role equals": ("role", {"equals": "banned"}, "banned"),
    "tags contains": ("tags", {"contains": "blocked"}, "blocked"),
    # (the policy's own value read too: a rule written "Renée" denies "renee", "RENEE")
    "accented value equals": ("nickname", {"equals": "Renée"}, "renee"),
}
PLACES = ("top-level", "list element", "object key")


def _placed_value(place: str, value: str) -> Any:
    if place == "list element":
        return [FILLER, value]
    if place == "object key":
        return {value: True}
    return value


def _string_members() -> list[tuple[str, str, str, Any, bool]]:
    """(deny test, place, label, claim value, does the deny rule hold)."""
    out = []
    for test, (_, _, base) in STRING_TESTS.items():
        for place in PLACES:
            for reading, spellings in SPELLINGS.items():
                for form, spell in spellings.items():
                    out.append((test, place, f"{reading}: {form}",
                                _placed_value(place, spell(base)), True))
            for label, spell in CONTROLS.items():
                value = spell(base)
                if test == "tags contains" and label == "space inside":
                    continue  # (words: "bl ocked" is two of them, neither the value)
                out.append((test, place, f"control {label}", _placed_value(place, value), False))
            if test == "tags contains" and place == "top-level":
                out.append((test, place, "words: 'x BLOCKED'", "x BLOCKED", True))
                out.append((test, place, "words: 'x,Blocked'", "x,Blocked", True))
    return out


STRING_MEMBERS = _string_members()

# --- 2. claim names: groups of names a framework reads as one claim -------------------------

ALIAS_GROUPS: dict[str, set[str]] = {
    # Spring Security JwtGrantedAuthoritiesConverter: "scope", else "scp";
    # Microsoft.Identity.Web: "scp", else ClaimConstants.Scope (the URI).
    "scopes": {"scope", "scp", "http://schemas.microsoft.com/identity/claims/scope"},
    # Microsoft.Identity.Web ClaimConstants.Roles / .Role; the JWT handler's inbound map:
    # "role" and "roles" -> ClaimTypes.Role.
    "roles": {"roles", "role", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"},
    # The JWT handler's inbound map: "email" -> ClaimTypes.Email, "sub" -> NameIdentifier.
    "email": {"email", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress"},
    "subject": {"sub", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier"},
}
# group -> (op, the denied value, a value that holds it, a value that does not).
Op = Literal["equals", "one_of", "contains"]
ALIAS_VALUES: dict[str, tuple[Op, str, list[Any], list[Any]]] = {
    "scopes": ("contains", "orders:delete",
               ["orders:read orders:delete", ["orders:delete"], "ORDERS:DELETE"],
               ["orders:read", ["orders:read"]]),
    "roles": ("contains", "banned", [["user", "banned"], "banned", ["Banned"]],
              [["user"], "bannedx"]),
    "email": ("equals", "evil@attacker.example",
              ["evil@attacker.example", "Evil@Attacker.Example"], ["good@attacker.example"]),
    "subject": ("equals", "mallory", ["mallory", "MALLORY"], ["alice2", "mallory2"]),
}
# Names that are not aliases of a group's names: a deny there never reads them.
NOT_ALIASES: dict[str, list[str]] = {
    "scopes": ["scopes", "scope_x", "x_scp", "authorities", "permissions"],
    "roles": ["groups", "cognito:groups", "rolesx", "realm_access"],
    "email": ["emails", "upn", "preferred_username"],
    "subject": ["subject", "oid", "nameidentifier"],
}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def _alias_members() -> list[tuple[str, str, str, Any, bool]]:
    """(group, the rule's claim name, the token's claim name, its value, does the deny hold)."""
    out = []
    for group, names in ALIAS_GROUPS.items():
        _, _, holds, fails = ALIAS_VALUES[group]
        for rule_name in sorted(names):
            for token_name in sorted(names):
                out += [(group, rule_name, token_name, v, True) for v in holds]
                out += [(group, rule_name, token_name, v, False) for v in fails]
            for other in NOT_ALIASES[group]:
                out.append((group, rule_name, other, holds[0], False))
            # (names in any case, as deny rules read every name)
            alias = sorted(names - {rule_name})[0]
            out.append((group, rule_name, alias.upper(), holds[0], True))
    return out


ALIAS_MEMBERS = _alias_members()


def _string_condition(test: str) -> ClaimCondition:
    claim, spec, _ = STRING_TESTS[test]
    ((op, operand),) = spec.items()
    return ClaimCondition(claim, op, tuple(operand) if op == "one_of" else (operand,))


def _alias_condition(group: str, rule_name: str) -> ClaimCondition:
    op, value, _, _ = ALIAS_VALUES[group]
    return ClaimCondition(rule_name, op, (value,))


def _token_members(group: str, token_name: str, value: Any) -> dict[str, Any]:
    members = {token_name: value}
    if group == "subject" and token_name.casefold() != "sub":
        members["sub"] = "alice"  # (a token has its own subject beside the URI claim)
    return members


# --- the policy -----------------------------------------------------------------------


def policy() -> dict[str, Any]:
    """A deny rule per string test on /s/<test>/**, per (group, name) on /n/<group>/<name>/**;
    every valid token is allowed on /s/** and /n/** otherwise; a strict allow rule per string
    test on /a/<test>/** and per (group, name) on /b/<group>/<name>/**."""
    rules: list[dict[str, Any]] = []
    for test, (claim, spec, _) in STRING_TESTS.items():
        rules.append({"name": f"deny-{_slug(test)}", "deny": {
            "paths": [f"/s/{_slug(test)}/**"],
            "jwt": {"provider": "corp", "claims": {claim: json.loads(json.dumps(spec))}}}})
    for group, names in ALIAS_GROUPS.items():
        op, value, _, _ = ALIAS_VALUES[group]
        for name in sorted(names):
            rules.append({"name": f"deny-{group}-{_slug(name)}", "deny": {
                "paths": [f"/n/{group}/{_slug(name)}/**"],
                "jwt": {"provider": "corp", "claims": {name: {op: value}}}}})
    rules.append({"name": "any", "allow": {"from": [FRONTEND], "paths": ["/s/**", "/n/**"],
                                           "jwt": {"provider": "corp"}}})
    for test, (claim, spec, _) in STRING_TESTS.items():
        rules.append({"name": f"allow-{_slug(test)}", "allow": {
            "from": [FRONTEND], "paths": [f"/a/{_slug(test)}/**"],
            "jwt": {"provider": "corp", "claims": {claim: json.loads(json.dumps(spec))}}}})
    for group, names in ALIAS_GROUPS.items():
        op, value, _, _ = ALIAS_VALUES[group]
        for name in sorted(names):
            rules.append({"name": f"allow-{group}-{_slug(name)}", "allow": {
                "from": [FRONTEND], "paths": [f"/b/{group}/{_slug(name)}/**"],
                "jwt": {"provider": "corp", "claims": {name: {op: value}}}}})
    return {"version": 1, "trust_domain": "demo.local",
            "jwt_providers": {"corp": {"issuer": ISSUER, "audiences": [AUDIENCE],
                                       "algorithms": ["ES256"], "jwks_file": "jwks.json"}},
            "services": {ORDERS: {"rules": rules}}}


FILES = {"jwks.json": jwks_bytes(jwk(ec_key(), "ec-1")).decode()}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The policy loaded and compiled in process (the files the sidecar reads)."""
    tmp = tmp_path_factory.mktemp("review30-policy")
    for name, text in FILES.items():
        (tmp / name).write_text(text)
    (tmp / "mesh.yaml").write_text(yaml.safe_dump(policy(), sort_keys=False))
    return load_policy_set([str(tmp / "mesh.yaml")])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    with orders_mesh(tmp_path_factory.mktemp("review30"), policy(), FILES) as started:
        yield started


def _explained(loaded: Any, target: str, payload: str) -> Any:
    return explain(loaded, ORDERS, caller=FRONTEND, method="GET", target=target,
                   claims={"corp": read_json(payload, fold_case=True)}, now=time.time())


def _check(loaded: Any, cond: ClaimCondition, rule: str, target: str, payload: str,
           holds: bool) -> str:
    """'' when ``claim_holds`` and the compiled policy's decision and trail agree with
    ``holds``, else what differs."""
    if claim_holds(cond, read_json(payload, fold_case=True), deny=True) is not holds:
        return f"claim_holds: want {holds}"
    ex = _explained(loaded, target, payload)
    want = ("deny", rule) if holds else ("allow", "any")
    (trail,) = [t for t in ex.rules if t.name == rule]
    if ex.decision is None or (ex.decision.action, ex.decision.rule) != want or (
            trail.status == "matched") is not holds:
        return f"explain: want {want}\n{ex.render()}"
    return ""


# --- in process: every member ----------------------------------------------------------


STRING_ITEMS = [(test, place) for test in STRING_TESTS for place in PLACES]


@pytest.mark.parametrize(("test", "place"), STRING_ITEMS, ids=[f"{t} / {p}" for t, p in STRING_ITEMS])
def test_every_string_reading_in_process(loaded: Any, test: str, place: str) -> None:
    """Every spelling (``SPELLINGS``) of a deny test's value denies, every control does not,
    in each place (the value, a list's element, an object's key). One item per (test,
    place), naming every member that disagrees."""
    cond = _string_condition(test)
    rule = f"deny-{_slug(test)}"
    wrong = []
    members = [m for m in STRING_MEMBERS if (m[0], m[1]) == (test, place)]
    for _, _, label, value, holds in members:
        payload = payload_text({STRING_TESTS[test][0]: value})
        why = _check(loaded, cond, rule, f"/s/{_slug(test)}/x", payload, holds)
        if why:
            wrong.append(f"{label} {value!r}: {why}")
    assert members and not wrong, "\n".join(wrong)


ALIAS_ITEMS = sorted({(m[0], m[1]) for m in ALIAS_MEMBERS})


@pytest.mark.parametrize(("group", "rule_name"), ALIAS_ITEMS,
                         ids=[f"{g} / {n}" for g, n in ALIAS_ITEMS])
def test_every_alias_in_process(loaded: Any, group: str, rule_name: str) -> None:
    """A deny rule on any name of a group (``ALIAS_GROUPS``) denies the value under every
    name of the group, in any case; not under a name outside it, nor a value that does not
    meet it."""
    cond = _alias_condition(group, rule_name)
    rule = f"deny-{group}-{_slug(rule_name)}"
    wrong = []
    members = [m for m in ALIAS_MEMBERS if (m[0], m[1]) == (group, rule_name)]
    for _, _, token_name, value, holds in members:
        payload = payload_text(_token_members(group, token_name, value))
        why = _check(loaded, cond, rule, f"/n/{group}/{_slug(rule_name)}/x", payload, holds)
        if why:
            wrong.append(f"{token_name} = {value!r}: {why}")
    assert members and not wrong, "\n".join(wrong)


# Allow rules stay strict: the exact value under the rule's own name only.
STRICT: list[tuple[str, dict[str, Any], bool]] = [
    ("/a/username-equals/x", {"preferred_username": "mallory"}, True),
    ("/a/username-equals/x", {"preferred_username": "MALLORY"}, False),
    ("/a/username-equals/x", {"preferred_username": "mallory "}, False),
    ("/a/username-equals/x", {"preferred_username": "mallóry"}, False),
    ("/a/username-equals/x", {"preferred_username": _fullwidth("mallory")}, False),
    ("/a/email-one-of/x", {"email": "evil@attacker.example"}, True),
    ("/a/email-one-of/x", {"email": "Evil@Attacker.Example"}, False),
    ("/a/accented-value-equals/x", {"nickname": "Renée"}, True),
    ("/a/accented-value-equals/x", {"nickname": "renee"}, False),
    ("/a/accented-value-equals/x", {"nickname": unicodedata.normalize("NFD", "Renée")}, False),
    ("/a/tags-contains/x", {"tags": ["blocked"]}, True),
    ("/a/tags-contains/x", {"tags": ["BLOCKED"]}, False),
    ("/b/scopes/scope/x", {"scope": "orders:read orders:delete"}, True),
    ("/b/scopes/scp/x", {"scp": ["orders:delete"]}, True),
    ("/b/scopes/scope/x", {"scp": "orders:delete"}, False),
    ("/b/scopes/scp/x", {"scope": "orders:delete"}, False),
    ("/b/scopes/scope/x", {"http://schemas.microsoft.com/identity/claims/scope": "orders:delete"},
     False),
    ("/b/roles/roles/x", {"roles": ["banned"]}, True),
    ("/b/roles/roles/x", {"role": ["banned"]}, False),
    ("/b/roles/role/x", {"roles": "banned"}, False),
    ("/b/email/email/x", {"http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress":
                          "evil@attacker.example"}, False),
]


@pytest.mark.parametrize(("target", "members", "holds"), STRICT,
                         ids=[f"{t} {m!r}" for t, m, _ in STRICT])
def test_allow_rules_stay_strict(loaded: Any, target: str, members: dict[str, Any],
                                 holds: bool) -> None:
    ex = _explained(loaded, target, payload_text(members))
    assert ex.decision is not None and ex.decision.allowed is holds, ex.render()


def test_the_code_tables_are_the_documented_ones() -> None:
    """The code's alias groups are exactly the ones written out here (no name added
    unseen); its string readings are the two named, and each reads the spellings above as
    the value and the controls not; every group and test has members both ways."""
    assert sorted(map(sorted, compiled.CLAIM_ALIASES.values())) == sorted(
        map(sorted, ALIAS_GROUPS.values()))
    for source in compiled.CLAIM_ALIASES:  # (each group names the frameworks it follows)
        assert "Spring" in source or "Microsoft" in source or "IdentityModel" in source, source
    assert len(compiled.STRING_READINGS) == 2
    folded, unaccented = compiled.STRING_READINGS.values()
    assert folded(" \tＭＡＬＬＯＲＹ\u3000") == "mallory" == unaccented("MALLO\u0301RY ")
    assert folded("mallóry") != "mallory"  # (accents: the second reading only)
    for test in STRING_TESTS:
        assert {m[4] for m in STRING_MEMBERS if m[0] == test} == {True, False}, test
    for group in ALIAS_GROUPS:
        assert {m[4] for m in ALIAS_MEMBERS if m[0] == group} == {True, False}, group
    assert len(STRING_MEMBERS) > 250 and len(ALIAS_MEMBERS) > 100


def test_the_work_is_linear_in_the_claim() -> None:
    """A deny check on strings ten times as long costs about ten times as much (a generous
    ratio, 50, against the control in the same run, best of five): each reading of a member
    is linear, and the test's values are read once."""
    conds = [ClaimCondition("preferred_username", "equals", ("mallory",)),
             ClaimCondition("tags", "contains", ("blocked",)),
             ClaimCondition("roles", "one_of", tuple(f"r{i}" for i in range(2000)))]

    def cost(n: int) -> float:
        claims: dict[str, Any] = {"preferred_username": "Mállory " * n * 20, "tags": ["x Blocked y" * 3] * n,
                  "scp": ["ROLE\u0301 "] * n, "role": "é" * n * 40}
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for cond in conds:
                claim_holds(cond, claims, deny=True)
            best = min(best, time.perf_counter() - start)
        return best

    cost(10)
    assert cost(1000) < 50 * max(cost(100), 1e-4)


# --- through a real sidecar: a representative of every class ------------------------------


def _e2e() -> list[tuple[str, str, dict[str, Any], bool]]:
    """(target, label, token members, does the deny hold): each reading's first spelling and
    a control per string test at top level, one in a list; each alias of each group under
    each rule name's first alias, and a non-alias; allow rules' strictness."""
    out: list[tuple[str, str, dict[str, Any], bool]] = []
    for test, (claim, _, base) in STRING_TESTS.items():
        target = f"/s/{_slug(test)}/x"
        for reading, spellings in SPELLINGS.items():
            form, spell = next(iter(spellings.items()))
            out.append((target, f"{test} {reading}: {form}", {claim: spell(base)}, True))
        out.append((target, f"{test} list UPPER", {claim: [FILLER, base.upper()]}, True))
        out.append((target, f"{test} control", {claim: base + "x"}, False))
    for group, names in ALIAS_GROUPS.items():
        _, _, holds, fails = ALIAS_VALUES[group]
        for rule_name in sorted(names):
            target = f"/n/{group}/{_slug(rule_name)}/x"
            for token_name in sorted(names - {rule_name}):
                out.append((target, f"{group} {rule_name} <- {token_name}",
                            _token_members(group, token_name, holds[-1]), True))
                out.append((target, f"{group} {rule_name} <- {token_name} control",
                            _token_members(group, token_name, fails[0]), False))
            out.append((target, f"{group} {rule_name} <- {NOT_ALIASES[group][0]} control",
                        _token_members(group, NOT_ALIASES[group][0], holds[0]), False))
    return out


E2E = _e2e()


@pytest.mark.parametrize(("target", "label", "members", "holds"), E2E, ids=[e[1] for e in E2E])
def test_through_the_sidecar(mesh: OrdersMesh, loaded: Any, target: str, label: str,
                             members: dict[str, Any], holds: bool) -> None:
    """403 when the deny rule holds, 200 (the catch-all allow) when not, with a token signed
    by the provider's key; ``policy explain`` on the same payload agrees."""
    payload = payload_text(members)
    r = mesh.get(target, {"authorization": f"Bearer {sign(payload)}"})
    assert r.status == (403 if holds else 200), (label, payload[:300], r.status, r.body[:200])
    ex = _explained(loaded, target, payload)
    assert ex.decision is not None and ex.decision.allowed is not holds, ex.render()


@pytest.mark.parametrize(("target", "members", "holds"), STRICT[:6] + STRICT[12:17],
                         ids=[f"{t} {m!r}" for t, m, _ in STRICT[:6] + STRICT[12:17]])
def test_allow_rules_stay_strict_through_the_sidecar(mesh: OrdersMesh, target: str,
                                                     members: dict[str, Any],
                                                     holds: bool) -> None:
    r = mesh.get(target, {"authorization": f"Bearer {sign(payload_text(members))}"})
    assert r.status == (200 if holds else 403), (members, r.status, r.body[:200])


def test_the_sidecar_set_covers_each_class() -> None:
    labels = " ".join(e[1] for e in E2E)
    for reading in SPELLINGS:
        assert reading in labels
    for names in ALIAS_GROUPS.values():
        for name in names:
            assert f"<- {name}" in labels
    assert {e[3] for e in E2E} == {True, False}
    assert json.dumps([e[2] for e in E2E], ensure_ascii=False)  # (all JSON)
