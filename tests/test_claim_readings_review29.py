"""Deny rules read a claim as every loose reader may (hostile review, session 29).

Two holes in how a deny rule's claim test read a token (``compiled.claim_holds``: "a deny
rule denies under every way an app behind may read the token"), each fixed as a class:

1. cross-type readings of booleans and numbers were missed: deny ``blocked: true`` let
   ``"t"``/``"T"`` (Go ``strconv.ParseBool``), ``"yes"``/``"on"``/``"y"`` (PHP
   ``FILTER_VALIDATE_BOOLEAN``, PostgreSQL, Rails), ``"1.0"``/``"0x1"`` (JavaScript's own
   ``==``) and ``2`` (truthiness) through; deny ``email_verified: false`` ``"f"``, ``"off"``,
   ``"no"``, ``"0.0"``, ``"-0"``; deny ``uid: 1001`` ``"1_001"`` (Python ``int()``),
   ``"01751"`` (base-0 octal), ``"1001abc"`` (parseInt, PHP ``(int)``, MySQL) and ``1001.5``
   (truncation). The readings are now data in ``compiled`` (``BOOL_WORDS``,
   ``NUMBER_READERS``, truthiness);
2. ``contains`` missed sets spelled with commas or semicolons (``"user,admin"``,
   ``"admin;user"``, ``["user,admin"]``, GitHub's ``"orders:read,orders:delete"``) or as an
   object's keys (``{"admin": true}``): they are split at ``SET_SEPARATORS`` and an object
   is read as its keys (``equals``/``one_of`` read an object's keys as they read a list's
   elements).

Allow rules stay strict. The expected readings below are written out here, independently of
the code's tables (``test_the_code_tables_are_the_documented_ones`` ties the two), and every
member is checked against every deny test (``equals``, ``one_of``, ``contains``) in three
places (a top-level claim, a nested dotted claim, a list's element): in process through
``explain`` on the compiled policy (the engine's decision and the trail), and a
representative set through one real sidecar (module fixture) with a real ``jwks_file``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

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
FILLER = "zz-filler"  # (the other element of a list; no test below holds for it)

# --- the readings, written out --------------------------------------------------------

# Boolean words per reader: (read as true, read as false), as their documentation says.
BOOLEAN_READERS: dict[str, tuple[set[str], set[str]]] = {
    "JSON / JavaScript ==": ({"true", "1"}, {"false", "0", ""}),
    "Go strconv.ParseBool": ({"1", "t", "true"}, {"0", "f", "false"}),
    "PHP FILTER_VALIDATE_BOOLEAN": ({"1", "true", "on", "yes"}, {"0", "false", "off", "no", ""}),
    "PostgreSQL boolin (unique prefixes)": ({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"},
                                            {"f", "fa", "fal", "fals", "false", "n", "no", "of",
                                             "off", "0"}),
    "Rails ActiveModel::Type::Boolean": ({"1", "t", "true", "y", "yes", "on"},
                                         {"0", "f", "false", "off"}),
    "YAML 1.1": ({"y", "yes", "true", "on"}, {"n", "no", "false", "off"}),
    "Python strtobool": ({"y", "yes", "t", "true", "on", "1"},
                         {"n", "no", "f", "false", "off", "0"}),
    "Spring / configparser": ({"true", "on", "yes", "1"}, {"false", "off", "no", "0"}),
    ".NET bool.Parse / Java parseBoolean": ({"true"}, {"false"}),
}
TRUE_WORDS = set().union(*(t for t, _ in BOOLEAN_READERS.values()))
FALSE_WORDS = set().union(*(f for _, f in BOOLEAN_READERS.values()))
# Each word in the spellings readers compare it in (case-insensitive, stripped).
WORD_FORMS = {"lower": "{}", "UPPER": "{}", "Capital": "{}", "padded": " \t{}\n",
              "BOM": "\ufeff{} ", "NUL": "{}\x00"}


def _forms(word: str) -> dict[str, str]:
    if not word:  # (the empty word: blank in every form; FALSE_OTHERS has blanks)
        return {"lower": ""}
    out = {}
    for form, template in WORD_FORMS.items():
        w = word.upper() if form == "UPPER" else word.capitalize() if form == "Capital" else word
        out[form] = template.format(w)
    return out


# label -> value read as true / as false, besides the words: numbers by truthiness and
# numeric strings by their numbers (JavaScript's ``"1.0" == true``), null and empty
# containers as false.
TRUE_OTHERS: dict[str, Any] = {
    "1": 1, "2": 2, "-1": -1, "1.5": 1.5, "1e3": 1e3, "'1.0'": "1.0", "'0x1'": "0x1",
    "'+1'": "+1", "'1e0'": "1e0", "'2'": "2", "'01'": "01", "'0b1'": "0b1", "'1abc'": "1abc",
    "' 7 '": " 7 ",
}
FALSE_OTHERS: dict[str, Any] = {
    "0": 0, "0.0": 0.0, "-0.0": -0.0, "'0.0'": "0.0", "'-0'": "-0", "'00'": "00",
    "'0x0'": "0x0", "'0e5'": "0e5", "'0abc'": "0abc", "''": "", "' '": " ", "null": None,
    "[]": [], "{}": {},
}
# (these have no member, so ``contains`` finds nothing in them: an empty set holds nothing)
NO_MEMBERS = {"''", "' '", "null", "[]", "{}", "'' lower"}
TRUE_CONTROLS: dict[str, Any] = {
    "'false'": "false", "'no'": "no", "'off'": "off", "'0'": "0", "'f'": "f", "'n'": "n",
    "'0.0'": "0.0", "''": "", "null": None, "0": 0, "[]": [], "{}": {}, "'enabled'": "enabled",
    "'yesterday'": "yesterday", "'x'": "x", "'ok'": "ok", "['x']": ["x"], "{'x': 1}": {"x": 1},
}
FALSE_CONTROLS: dict[str, Any] = {
    "'true'": "true", "'yes'": "yes", "'on'": "on", "'t'": "t", "'1'": "1", "1": 1, "2": 2,
    "true": True, "'x'": "x", "'disabled'": "disabled", "'nope'": "nope", "['x']": ["x"],
    "{'x': 0}": {"x": 0}, "'1.0'": "1.0",
}

# Spellings of the number 1001, per reader (``uid: 1001``).
NUMBER_READERS: dict[str, list[Any]] = {
    "JavaScript Number() / PHP numeric string": ["1001", "+1001", " 1001 ", "1001.0", "1001.",
                                                 "1.001e3", "10010e-1", "\ufeff1001",
                                                 "1001\x00", "0" * 3000 + "1001"],
    "parseInt / PHP (int) / MySQL: leading integer": ["1001abc", "1001 admin", "1001L",
                                                      "1001n", "1001-01-01", "1001.9x"],
    "hexadecimal": ["0x3E9", "0x3e9", "0X3E9", "0x3e9zz"],
    "binary 0b / octal 0o": ["0b1111101001", "0o1751"],
    "base-0 octal (Go ParseInt, strtol)": ["01751", "01751xyz"],
    "underscores (Python int(), Go base 0)": ["1_001", "10_01", "0x3_e9", "1_001.0"],
    "Unicode digits (Python int())": ["\uff11\uff10\uff10\uff11", "\u0661\u0660\u0660\u0661",
                                      "\u0967\u0966\u0966\u0967"],
    "fractions truncated toward zero": [1001.5, 1001.999, "1001.5", "1.0015e3"],
    "the same number": [1001, 1001.0],
}
NUMBER_CONTROLS: dict[str, Any] = {
    "1002": 1002, "'1002'": "1002", "'1e3'": "1e3", "'x1001'": "x1001", "'10 01'": "10 01",
    "'0x3EA'": "0x3EA", "1000.9": 1000.9, "-1001": -1001, "'02000'": "02000", "'one'": "one",
    "true": True, "null": None, "''": "", "' '": " ", "[]": [], "'1'*5000": "1" * 5000,
}

# Sets holding "admin", and controls; (object members have no list-element variant).
SET_MEMBERS: dict[str, Any] = {
    "'user,admin'": "user,admin", "'user, admin'": "user, admin", "'admin;user'": "admin;user",
    "'user ;admin'": "user ;admin", "'admin,'": "admin,", "',admin'": ",admin",
    "'user,admin;x'": "user,admin;x", "['user,admin']": ["user,admin"],
    "['x', 'user;admin']": ["x", "user;admin"], "['user admin']": ["user admin"],
    "{'admin': true}": {"admin": True}, "{'admin': false}": {"admin": False},
    "{'user': 1, 'admin': null}": {"user": 1, "admin": None},
}
SET_CONTROLS: dict[str, Any] = {
    "'user,administrator'": "user,administrator", "'administrator;user'": "administrator;user",
    "{'user': true}": {"user": True}, "{'x': 'admin'}": {"x": "admin"},
    "[['admin']]": [["admin"]], "[{'admin': true}]": [{"admin": True}], "'adminuser'": "adminuser",
    "['user']": ["user"], "'admin:x'": "admin:x",
}
# ``equals``/``one_of`` read an object's keys as a list's elements, not a string's words.
KEY_MEMBERS = {"'admin'": "admin", "{'admin': true}": {"admin": True}, "{'admin': false}": {"admin": False},
               "{'user': 1, 'admin': null}": {"user": 1, "admin": None}}
KEY_CONTROLS = {"{'x': 'admin'}": {"x": "admin"}, "'user,admin'": "user,admin",
                "[{'admin': true}]": [{"admin": True}], "{}": {}}

# --- the deny tests: (table, op) -> claim name and spec ----------------------------------

TESTS: dict[str, tuple[str, Any]] = {
    "true equals": ("blocked", True),
    "true one_of": ("blocked_any", {"one_of": [True, "zz-other"]}),
    "true contains": ("flags_t", {"contains": True}),
    "false equals": ("email_verified", False),
    "false one_of": ("verified_any", {"one_of": ["zz-other", False]}),
    "false contains": ("flags_f", {"contains": False}),
    "number equals": ("uid", 1001),
    "number one_of": ("uid_any", {"one_of": [7, 1001]}),
    "number contains": ("gids", {"contains": 1001}),
    "numeric string equals": ("employee_id", "1001"),
    "numeric string one_of": ("employee_any", {"one_of": ["7", "1001"]}),
    "numeric string contains": ("employees", {"contains": "1001"}),
    "set contains": ("roles", {"contains": "admin"}),
    "scope contains": ("scope", {"contains": "orders:delete"}),
    "keys equals": ("role", "admin"),
    "keys one_of": ("role_any", {"one_of": ["zz-other", "admin"]}),
}
VARIANTS = ("top-level", "nested", "list element")


def _slug(test: str) -> str:
    return test.replace(" ", "-")


def _rule_claim(test: str, variant: str) -> str:
    name = TESTS[test][0]
    return f"outer.{name}" if variant == "nested" else name


def _placed(test: str, variant: str, value: Any) -> dict[str, Any]:
    name = TESTS[test][0]
    if variant == "nested":
        return {"outer": {name: value}}
    if variant == "list element":
        return {name: [FILLER, value]}
    return {name: value}


def _members() -> list[tuple[str, str, str, Any, bool]]:
    """(deny test, variant, label, value, does the deny rule hold)."""
    rows: list[tuple[str, str, Any, bool]] = []  # (test, label, value, holds)
    for kind, words, others, controls in (("true", TRUE_WORDS, TRUE_OTHERS, TRUE_CONTROLS),
                                          ("false", FALSE_WORDS, FALSE_OTHERS, FALSE_CONTROLS)):
        for op in ("equals", "one_of", "contains"):
            test = f"{kind} {op}"
            for word in sorted(words):
                for form, spelled in _forms(word).items():
                    label = f"'{word}' {form}"
                    if op == "contains" and label in NO_MEMBERS:
                        continue
                    rows.append((test, label, spelled, True))
            for label, value in others.items():
                if not (op == "contains" and label in NO_MEMBERS):
                    rows.append((test, label, value, True))
            rows.append((test, f"the bool {kind}", kind == "true", True))
            rows += [(test, f"control {label}", value, False) for label, value in controls.items()]
    # (a numeric-string rule, ``employee_id: "1001"``, the same: a string claim is compared
    # with it as a number by every reader, as PHP 8 compares two numeric strings)
    for kind, controls in (("number", NUMBER_CONTROLS), ("numeric string", NUMBER_CONTROLS)):
        for op in ("equals", "one_of", "contains"):
            test = f"{kind} {op}"
            for reader, values in NUMBER_READERS.items():
                for i, value in enumerate(values):
                    rows.append((test, f"{reader} #{i} {value!r:.40}", value, True))
            rows += [(test, f"control {label}", value, False) for label, value in controls.items()]
    for test, word in (("set contains", "admin"), ("scope contains", "orders:delete")):
        for label, value in SET_MEMBERS.items():
            rows.append((test, label, json.loads(json.dumps(value).replace("admin", word)), True))
        for label, value in SET_CONTROLS.items():
            value = json.loads(json.dumps(value).replace("admin", word))
            rows.append((test, f"control {label}", value, False))
    rows.append(("scope contains", "'orders:read,orders:delete'", "orders:read,orders:delete",
                 True))  # (GitHub's and Facebook's scopes)
    for test in ("keys equals", "keys one_of"):
        rows += [(test, label, value, True) for label, value in KEY_MEMBERS.items()]
        rows += [(test, f"control {label}", value, False) for label, value in KEY_CONTROLS.items()]
    out = []
    for test, label, value, holds in rows:
        for variant in VARIANTS:
            if variant == "list element" and isinstance(value, dict | list):
                continue  # (one level: a list's element is a member, not a set of its own)
            out.append((test, variant, label, value, holds))
    return out


MEMBERS = _members()


def _condition(test: str, variant: str) -> ClaimCondition:
    spec = TESTS[test][1]
    claim = _rule_claim(test, variant)
    if not isinstance(spec, dict):
        return ClaimCondition(claim, "equals", (spec,))
    ((op, operand),) = spec.items()
    return ClaimCondition(claim, op, tuple(operand) if op == "one_of" else (operand,))


def _ids(members: list[tuple[str, str, str, Any, bool]]) -> list[str]:
    return [f"{m[0]} / {m[1]} / {m[2]}" for m in members]


# --- the policy -----------------------------------------------------------------------


def policy() -> dict[str, Any]:
    """A deny rule per (test, variant) on /r/<test>/<variant>/**; every valid token is allowed
    on /r/** otherwise, and an allow rule per test on /a/<test>/** (strict)."""
    rules: list[dict[str, Any]] = []
    for test, (_, spec) in TESTS.items():
        for variant in VARIANTS:
            rules.append({"name": f"deny-{_slug(test)}-{_slug(variant)}", "deny": {
                "paths": [f"/r/{_slug(test)}/{_slug(variant)}/**"],
                "jwt": {"provider": "corp",
                        "claims": {_rule_claim(test, variant): json.loads(json.dumps(spec))}}}})
    rules.append({"name": "r-any", "allow": {"from": [FRONTEND], "paths": ["/r/**"],
                                             "jwt": {"provider": "corp"}}})
    for test, (name, spec) in TESTS.items():
        rules.append({"name": f"allow-{_slug(test)}", "allow": {
            "from": [FRONTEND], "paths": [f"/a/{_slug(test)}/**"],
            "jwt": {"provider": "corp", "claims": {name: json.loads(json.dumps(spec))}}}})
    return {"version": 1, "trust_domain": "demo.local",
            "jwt_providers": {"corp": {"issuer": ISSUER, "audiences": [AUDIENCE],
                                       "algorithms": ["ES256"], "jwks_file": "jwks.json"}},
            "services": {ORDERS: {"rules": rules}}}


FILES = {"jwks.json": jwks_bytes(jwk(ec_key(), "ec-1")).decode()}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The policy loaded and compiled in process (the files the sidecar reads)."""
    tmp = tmp_path_factory.mktemp("review29-policy")
    for name, text in FILES.items():
        (tmp / name).write_text(text)
    (tmp / "mesh.yaml").write_text(yaml.safe_dump(policy(), sort_keys=False))
    return load_policy_set([str(tmp / "mesh.yaml")])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    with orders_mesh(tmp_path_factory.mktemp("review29"), policy(), FILES) as started:
        yield started


def _explained(loaded: Any, target: str, payload: str) -> Any:
    return explain(loaded, ORDERS, caller=FRONTEND, method="GET", target=target,
                   claims={"corp": read_json(payload, fold_case=True)}, now=time.time())


# --- 1+2 in process: every member, every deny test, every place -----------------------------


PLACES = [(test, variant) for test in TESTS for variant in VARIANTS]


@pytest.mark.parametrize(("test", "variant"), PLACES, ids=[f"{t} / {v}" for t, v in PLACES])
def test_every_reading_in_process(loaded: Any, test: str, variant: str) -> None:
    """Every member of the deny test ``test`` in place ``variant``: ``claim_holds(deny=True)``
    on the payload as the sidecar reads it, and the compiled policy's decision (``explain``
    runs the engine's ``decide``) with the deny rule's trail. One item per (test, place),
    naming every member that disagrees (a member per item cost 20 ms of runner each)."""
    cond = _condition(test, variant)
    rule = f"deny-{_slug(test)}-{_slug(variant)}"
    wrong: list[str] = []
    members = [m for m in MEMBERS if (m[0], m[1]) == (test, variant)]
    for _, _, label, value, holds in members:
        payload = payload_text(_placed(test, variant, value))
        claims = read_json(payload, fold_case=True)
        if claim_holds(cond, claims, deny=True) is not holds:
            wrong.append(f"claim_holds {label}: want {holds}")
            continue
        ex = _explained(loaded, f"/r/{_slug(test)}/{_slug(variant)}/x", payload)
        want = ("deny", rule) if holds else ("allow", "r-any")
        (trail,) = [t for t in ex.rules if t.name == rule]
        if ex.decision is None or (ex.decision.action, ex.decision.rule) != want or (
                trail.status == "matched") is not holds:
            wrong.append(f"explain {label}: want {want}\n{ex.render()}")
    assert members and not wrong, "\n".join(wrong)


# Allow rules stay strict: only the value itself (same type; a list holding it for contains).
STRICT: list[tuple[str, Any, bool]] = [
    ("true equals", True, True), ("true equals", "yes", False), ("true equals", 2, False),
    ("true equals", "1.0", False), ("false equals", False, True), ("false equals", "off", False),
    ("false equals", None, False), ("false equals", 0, False),
    ("number equals", 1001, True), ("number equals", "1_001", False),
    ("number equals", "01751", False), ("number equals", "1001abc", False),
    ("number equals", 1001.5, False), ("numeric string equals", "1001", True),
    ("numeric string equals", "1001.5", False),
    ("set contains", ["admin"], True), ("set contains", "user,admin", False),
    ("set contains", {"admin": True}, False), ("set contains", ["user,admin"], False),
    ("scope contains", "orders:read orders:delete", True),
    ("scope contains", "orders:read,orders:delete", False),
    ("keys equals", "admin", True), ("keys equals", {"admin": True}, False),
]


@pytest.mark.parametrize(("test", "value", "holds"), STRICT,
                         ids=[f"{t} {v!r}" for t, v, _ in STRICT])
def test_allow_rules_stay_strict(loaded: Any, test: str, value: Any, holds: bool) -> None:
    payload = payload_text(_placed(test, "top-level", value))
    cond = _condition(test, "top-level")
    assert claim_holds(cond, read_json(payload, fold_case=True)) is holds
    ex = _explained(loaded, f"/a/{_slug(test)}/x", payload)
    assert ex.decision is not None and ex.decision.allowed is holds, ex.render()


def test_the_code_tables_are_the_documented_ones() -> None:
    """The code's boolean words are exactly the union written out here (no reader lost or
    added unseen), true and false words are disjoint, and every separator and number
    reader the docs name is in the code."""
    code_true = set().union(*(t for t, _ in compiled.BOOL_WORDS.values()))
    code_false = set().union(*(f for _, f in compiled.BOOL_WORDS.values()))
    assert (code_true, code_false) == (TRUE_WORDS, FALSE_WORDS)
    assert not TRUE_WORDS & FALSE_WORDS
    assert set(compiled.SET_SEPARATORS) == {",", ";"}
    assert len(compiled.NUMBER_READERS) == 6
    for test in TESTS:  # (every test has members that hold and controls that do not)
        assert {m[4] for m in MEMBERS if m[0] == test} == {True, False}, test
    assert len(MEMBERS) > 1500


def test_the_work_is_linear_in_the_claim() -> None:
    """A deny check on claims ten times as long costs about ten times as much: a generous
    ratio (50) against the control in the same run, the best of five each -- a reading or a
    split quadratic in the claim would be a hundred times. No integer of thousands of digits
    is converted either (Python refuses past 4,300 digits: a ValueError would be a 500)."""
    conds = [ClaimCondition("roles", "contains", ("admin",)),
             ClaimCondition("uid", "equals", (1001,)),
             ClaimCondition("blocked", "equals", (True,)),
             ClaimCondition("outer.uid", "one_of", tuple(range(2000))),
             ClaimCondition("roles", "one_of", tuple(str(i) for i in range(1, 2000)))]

    def cost(n: int) -> float:
        claims = {"roles": ["u,v;w " * 3 + "0" * 20] * n, "uid": "1" * (n * 40),
                  "blocked": "0" * (n * 40) + "x", "outer": {"uid": ["9" * 50] * n}}
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for cond in conds:
                assert not claim_holds(cond, claims, deny=True)
            best = min(best, time.perf_counter() - start)
        return best

    small, large = cost(100), cost(1000)
    assert large < small * 50, (small, large)


# --- through one real sidecar: a representative set ---------------------------------------

# (test, variant, label or label prefix): one or two of each family, every reader row of
# numbers, in every place for some (each request costs a TLS handshake and a signature).
_PICKED: list[tuple[str, str, tuple[str, ...]]] = [
    ("true equals", "top-level", ("'t' UPPER", "'y' lower", "'yes' Capital", "'on' padded",
                                  "'tr' lower", "2", "'1.0'", "'0x1'", "control 'false'",
                                  "control 'yesterday'")),
    ("true equals", "nested", ("'t' UPPER", "control 'false'")),
    ("true equals", "list element", ("'on' padded", "control 'false'")),
    ("true one_of", "top-level", ("'yes' Capital",)),
    ("true contains", "top-level", ("'on' padded", "control 'false'")),
    ("false equals", "top-level", ("'f' UPPER", "'off' lower", "'no' BOM", "'n' NUL",
                                   "'of' lower", "'0.0'", "'-0'", "''", "null", "[]",
                                   "control 'true'", "control 'nope'")),
    ("false equals", "nested", ("'no' BOM", "control 'true'")),
    ("false equals", "list element", ("'f' UPPER", "null")),
    ("false contains", "top-level", ("'off' lower",)),
    ("number equals", "top-level", (*(f"{reader} #0 " for reader in NUMBER_READERS),
                                    "control '1e3'", "control '1002'", "control '1'*5000")),
    ("number equals", "nested", ("parseInt",)),
    ("number equals", "list element", ("base-0",)),
    ("numeric string one_of", "top-level", ("underscores", "fractions", "hexadecimal",
                                            "control '1002'")),
    ("number contains", "top-level", ("parseInt", "base-0", "control '10 01'")),
    ("set contains", "top-level", ("'user,admin'", "'admin;user'", "['user,admin']",
                                   "{'admin': true}", "'user, admin'",
                                   "control 'user,administrator'", "control {'x': 'admin'}")),
    ("set contains", "nested", ("'user,admin'",)),
    ("set contains", "list element", ("'admin;user'",)),
    ("scope contains", "top-level", ("'orders:read,orders:delete'", "'user,admin'",
                                     "control 'user,administrator'")),
    ("keys equals", "top-level", ("{'admin': true}", "control {'x': 'admin'}")),
    ("keys one_of", "top-level", ("{'admin': false}",)),
]


def _representative() -> list[tuple[str, str, str, Any, bool]]:
    out = []
    for test, variant, labels in _PICKED:
        for label in labels:
            here = [m for m in MEMBERS if (m[0], m[1]) == (test, variant)]
            found = ([m for m in here if m[2] == label]
                     or [m for m in here if m[2].startswith(label)])
            assert found, (test, variant, label)
            out.append(found[0])
    return out


REPRESENTATIVE = _representative()


@pytest.mark.parametrize(("test", "variant", "label", "value", "holds"), REPRESENTATIVE,
                         ids=_ids(REPRESENTATIVE))
def test_through_the_sidecar_and_explain(mesh: OrdersMesh, loaded: Any, test: str, variant: str,
                                         label: str, value: Any, holds: bool) -> None:
    """403 when the deny rule holds, 200 (the catch-all allow) when not, with a token signed
    by the provider's key; ``policy explain`` on the same payload shows the same decision."""
    payload = payload_text(_placed(test, variant, value))
    target = f"/r/{_slug(test)}/{_slug(variant)}/x"
    r = mesh.get(target, {"authorization": f"Bearer {sign(payload)}"})
    assert r.status == (403 if holds else 200), (payload[:300], r.status, r.body[:200])
    ex = _explained(loaded, target, payload)
    assert ex.decision is not None and ex.decision.allowed is not holds, ex.render()


def test_the_representative_set_covers_each_family() -> None:
    tests = {m[0] for m in REPRESENTATIVE}
    assert {"true equals", "false equals", "number equals", "set contains",
            "scope contains", "keys equals", "true contains", "number contains"} <= tests
    assert {m[1] for m in REPRESENTATIVE} == set(VARIANTS)
    assert {m[4] for m in REPRESENTATIVE} == {True, False}
    assert 50 < len(REPRESENTATIVE) < 100
