"""Claim tests no accepted token can meet, and plain numbers YAML 1.1 reads as strings.

Found by a hostile review (two holes, both failing open in a deny rule):

1. ``deny: {jwt: {provider: corp, claims: {sub: 1001}}}`` loaded: ``1001`` is a YAML integer,
   every token that passes verification has a string ``sub`` (docs/authn.md step 6,
   ``REGISTERED_CLAIM_TYPES``) and claim tests compare types strictly, so the rule denied
   nobody -- user "1001" got 200. Same for ``jti: {one_of: [12345]}``, ``iat: "x"``,
   ``exp: true``, ``iss: {contains: 3}``, ``aud: 7``. Such a test is now refused at load
   with file, line and key.
2. PyYAML (YAML 1.1) reads plain ``1e3``, ``6.02e23``, ``1.0e3``, ``+.5``, ``09``, ``0o17``
   as STRINGS, YAML 1.2 and JSON as numbers: ``claims: {lvl: 1e3}`` never matched a token's
   ``1000``. Such a plain scalar is now refused in every file the loader reads (policy and
   sidecar config), naming both readings.

Both families are data: ``CLAIM_MEMBERS`` (each registered claim x test form x value, with
an oracle built from the verifier's own type check and the engine's own matcher, not from
the loader's reasoning) and ``YAML_MEMBERS`` (listed forms, checked against the YAML 1.2 core
schema and JSON grammars; ``test_every_short_plain_scalar_reads_as_it_looks`` sweeps every
plain scalar of up to four characters of ``SWEEP_ALPHABET``). Every member goes through
``sidecar policy check`` (file:line: key), a handful through a running sidecar's reload
(refused, the last good policy still enforced); the controls load.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.authn.jwt import REGISTERED_CLAIM_TYPES
from sidecar.config.model import load_config
from sidecar.config.source import parse_yaml
from sidecar.errors import ConfigError
from sidecar.policy.compiled import claim_holds
from sidecar.policy.loader import load_policy_set
from sidecar.policy.model import ClaimCondition
from tests.harness import (
    Pki,
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_cli,
    sidecar_cli_many,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)
from tests.test_authn_support import AUDIENCE, ISSUER, ec_key, jwk, jwks_bytes, mint

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ORDERS = spiffe("orders")
HEADER = f"""version: 1
trust_domain: demo.local
jwt_providers:
  corp: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], algorithms: [ES256], jwks_file: jwks.json}}
services:
  {ORDERS}:
    rules:
"""
RULE_AT = f"services.{ORDERS}.rules[0].deny.jwt.claims"


def _policy(claims: str, name: str = "lock-out") -> str:
    """A policy whose first rule denies tokens meeting ``claims`` (YAML flow text) and whose
    second allows every valid token on /api/**. The claims are on line 8."""
    return HEADER + (f"      - {{name: {name}, deny: {{paths: ['/**'], jwt: {{provider: corp, "
                     f"claims: {claims}}}}}}}\n"
                     "      - {name: api, allow: {paths: ['/api/**'], jwt: {provider: corp}}}\n")


CLAIMS_LINE = 8

# --- 1. claim tests on registered claims -----------------------------------------------

# YAML spelling -> the value the policy holds (plain and quoted scalars of every type a
# claim test takes; dates in and out of the NumericDate range; strings with a space).
VALUES: dict[str, Any] = {
    "1001": 1001, "0": 0, "-1": -1, "1.5": 1.5, "-0.5": -0.5, "1700000000": 1700000000,
    "253402300799": 253402300799, "253402300800": 253402300800, "1.0e+20": 1.0e20,
    "true": True, "false": False, "'1001'": "1001", "'1700000000'": "1700000000",
    "''": "", "alice": "alice", "x": "x", "'a b'": "a b", "shop-api": "shop-api",
}
# How the test is written -> (template for the claims mapping, the key the refusal names).
FORMS: dict[str, tuple[str, str]] = {
    "short": ("{{{claim}: {value}}}", "{claim}"),
    "equals": ("{{{claim}: {{equals: {value}}}}}", "{claim}.equals"),
    "one_of": ("{{{claim}: {{one_of: [{good}, {value}]}}}}", "{claim}.one_of[1]"),
    "contains": ("{{{claim}: {{contains: {value}}}}}", "{claim}.contains"),
}
# A value each claim may have (the other one_of member, and the control of each claim).
GOOD = {"iss": "'https://login.example.com/'", "sub": "alice", "jti": "'12345'",
        "aud": "shop-api", "exp": "1700000000", "nbf": "0", "iat": "1.5"}


def _candidates(value: Any) -> list[Any]:
    """Claim values an accepted token may carry for a test of ``value``: the value itself,
    lists holding it, and (a string) phrases with it as a word."""
    out = [value, [value], ["other", value]]
    if isinstance(value, str):
        out += [f"other {value}", f"{value} other"]
    return out


def _satisfiable(claim: str, op: str, value: Any) -> bool:
    """Oracle: does some claim value that the verifier's own type check accepts
    (``REGISTERED_CLAIM_TYPES``) meet the test, by the engine's own matcher (``claim_holds``)?
    ``one_of`` is judged member by member (a member no token can equal is refused even
    when another can: in a deny rule the dead member is the user let in)."""
    test = ClaimCondition(claim, "contains" if op == "contains" else "equals", (value,))
    valid = REGISTERED_CLAIM_TYPES[claim]
    return any(valid(c) and claim_holds(test, {claim: c}) for c in _candidates(value))


CLAIM_MEMBERS: list[tuple[str, str, str]] = [
    (claim, form, spelling) for claim in REGISTERED_CLAIM_TYPES for form in FORMS
    for spelling in VALUES
    if not (form == "contains" and VALUES[spelling] == "")  # (refused before: own message)
]
REFUSED = [m for m in CLAIM_MEMBERS if not _satisfiable(m[0], m[1], VALUES[m[2]])]
LOADED = [m for m in CLAIM_MEMBERS if _satisfiable(m[0], m[1], VALUES[m[2]])]


def _claim_text(claim: str, form: str, spelling: str) -> tuple[str, str]:
    """(the claims mapping as YAML flow text, the key path its refusal names)."""
    template, key = FORMS[form]
    return (template.format(claim=claim, value=spelling, good=GOOD[claim]),
            f"{RULE_AT}.{key.format(claim=claim)}")


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "jwks.json").write_bytes(jwks_bytes(jwk(ec_key(), "ec-1")))
    path = directory / name
    path.write_text(text)
    return path


def test_the_family_has_both_sides() -> None:
    """The oracle splits the family (each claim has members refused and members that load,
    every form too): neither list is empty by accident."""
    assert len(CLAIM_MEMBERS) == len(REFUSED) + len(LOADED)
    for claim in REGISTERED_CLAIM_TYPES:
        assert any(m[0] == claim for m in REFUSED) and any(m[0] == claim for m in LOADED)
    for form in FORMS:
        assert any(m[1] == form for m in REFUSED)
    # the review's own members are in it
    for member in [("sub", "short", "1001"), ("jti", "one_of", "0"), ("iat", "short", "x"),
                   ("exp", "short", "true"), ("iss", "contains", "0"), ("aud", "short", "0"),
                   ("exp", "contains", "1700000000"), ("sub", "contains", "'a b'"),
                   ("sub", "short", "''"), ("exp", "short", "253402300800"),
                   ("nbf", "equals", "-1"), ("iat", "short", "'1700000000'")]:
        assert member in REFUSED, member
    for member in [("sub", "short", "'1001'"), ("aud", "contains", "'a b'"),
                   ("exp", "short", "1.5"), ("exp", "one_of", "253402300799"),
                   ("sub", "contains", "alice"), ("aud", "contains", "shop-api")]:
        assert member in LOADED, member


def test_every_refused_member_is_named_by_policy_check(tmp_path: Path) -> None:
    """``sidecar policy check FILE`` per member (one interpreter for the family): exit 1,
    the problem at file:line: key, naming the claim's type and the value's; no traceback."""
    paths, expected = [], []
    for i, (claim, form, spelling) in enumerate(REFUSED):
        claims, key = _claim_text(claim, form, spelling)
        path = _write(tmp_path, f"p{i}.yaml", _policy(claims))
        paths.append(path)
        expected.append(re.escape(f"{path}:{CLAIMS_LINE}: {key}: {claim} is ")
                        + r".* in every token that passes verification")
    results = sidecar_cli_many([["policy", "check", str(p)] for p in paths], timeout=300)
    wrong = []
    for member, r, want in zip(REFUSED, results, expected, strict=True):
        out = r.stdout + r.stderr
        if r.returncode != 1 or "Traceback" in out or not re.search(want, out):
            wrong.append(f"{member}: exit {r.returncode}: {out[-300:]}")
    assert not wrong, f"{len(wrong)}/{len(REFUSED)}:\n" + "\n".join(wrong)


def test_policy_check_and_lint_as_commands_name_a_whole_set(tmp_path: Path) -> None:
    """The real commands (their own processes) on a policy set holding the review's members,
    one file each: every file:line: key named, by ``check`` and by ``lint``."""
    members = [("sub", "short", "1001"), ("jti", "one_of", "0"), ("iat", "short", "x"),
               ("exp", "short", "true"), ("iss", "contains", "0"), ("aud", "short", "0")]
    pset = tmp_path / "set"
    expected = []
    for i, (claim, form, spelling) in enumerate(members):
        claims, key = _claim_text(claim, form, spelling)
        text = _policy(claims).replace(ORDERS, spiffe(f"svc{i}")).replace(
            "jwt_providers:\n  corp:", f"jwt_providers:\n  corp{i}:").replace(
            "provider: corp", f"provider: corp{i}")
        path = _write(pset, f"ns-{i}.yaml", text)
        expected.append(f"{path}:{CLAIMS_LINE}: {key.replace(ORDERS, spiffe(f'svc{i}'))}: ")
    for command in ("check", "lint"):
        r = sidecar_cli("policy", command, str(pset), timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "Traceback" not in out, (command, out)
        missing = [e for e in expected if e not in out]
        assert not missing, (command, missing, out[-2000:])


def test_every_satisfiable_member_and_the_controls_load(tmp_path: Path) -> None:
    """The other side: tests some accepted token can meet load, in process and through
    ``sidecar policy check`` (one interpreter): quoted ids, NumericDates in range, a word
    of a string, a list member with a space (``aud``), unregistered claims of any type,
    and a dotted name below a registered claim (a flat claim may have that name)."""
    controls = ["{lvl: 1001}", "{lvl: true}", "{lvl: {contains: 5}}", "{'sub.x': 5}",
                "{groups: {one_of: [1, a, false]}}", "{sub: {one_of: ['1001', alice]}}"]
    texts = [_claim_text(*m)[0] for m in LOADED] + controls
    paths = [_write(tmp_path, f"ok{i}.yaml", _policy(t)) for i, t in enumerate(texts)]
    for path in paths:
        load_policy_set([str(path)])
    results = sidecar_cli_many([["policy", "check", str(p)] for p in paths], timeout=300)
    wrong = [f"{t}: {r.returncode} {(r.stdout + r.stderr)[-300:]}"
             for t, r in zip(texts, results, strict=True) if r.returncode != 0]
    assert not wrong, "\n".join(wrong)


def test_an_introspection_providers_tests_are_held_to_the_same_types(tmp_path: Path) -> None:
    """Introspection answers are checked with the same table (docs/authn.md, ``bad_claim``
    also in an introspection answer): the same tests are refused for such a provider."""
    header = HEADER.replace(
        f'{{issuer: "{ISSUER}", audiences: [{AUDIENCE}], algorithms: [ES256], '
        "jwks_file: jwks.json}",
        "{issuer: https://as.example, audiences: [orders], introspection: {endpoint: "
        "https://as.example/introspect, client_id: orders, client_secret_file: secret}}")
    assert header != HEADER
    for claim, form, spelling in [("sub", "short", "1001"), ("exp", "contains", "5"),
                                  ("aud", "one_of", "true")]:
        claims, key = _claim_text(claim, form, spelling)
        path = _write(tmp_path, f"{claim}.yaml", _policy(claims).replace(HEADER, header))
        with pytest.raises(ConfigError) as info:
            load_policy_set([str(path)])
        assert f"{path}:{CLAIMS_LINE}: {key}: {claim} is " in str(info.value), str(info.value)


# --- 2. plain numbers YAML 1.1 reads as strings ------------------------------------------

# The YAML 1.2 core schema's number forms (YAML 1.2.2, 10.3.2) and JSON's (RFC 8259 6),
# written here from the specifications: the oracle the loader is checked against.
CORE_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
CORE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
                        r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _yaml12_number(text: str) -> bool:
    return bool(CORE_INT.fullmatch(text) or CORE_FLOAT.fullmatch(text))


def _json_reads(text: str) -> bool:
    return bool(JSON_NUMBER.fullmatch(text))


# By what YAML 1.1 wants and the text lacks: a point and a signed exponent; no sign before
# a leading point; no 8 or 9 after a leading zero; no 0o octal.
YAML_MEMBERS: dict[str, tuple[str, ...]] = {
    "exponent": ("1e3", "1E3", "-1e3", "+1e3", "1e+3", "1e-3", "1.0e3", "1.5E3", "6.02e23",
                 "-6.02e23", "1.e3", ".5e1", "-.5e-1", "0e0", "123456789e10", "1e400"),
    "sign_before_point": ("+.5", "-.5", "+.25e+1", "-.0"),
    "leading_zero_8_9": ("09", "-09", "+09", "0089", "019", "08e1"),
    "octal_0o": ("0o17", "0o0", "0o777"),
}
YAML_FAMILY = [(kind, text) for kind, texts in YAML_MEMBERS.items() for text in texts]
# Plain scalars that must stay strings (not numbers in YAML 1.2 or JSON either), and the
# forms YAML 1.1 and 1.2 both read as the same number.
STAY_STRINGS = ("1.2.3", "v1e3", "1e", "e3", "deadbeef", "0x1g", "1e3x", "0o8", "-0o17",
                "1e3.5", "0b102", "1_000e3", "+-1", ".", "+", "..5", "1..2", "a1e3",
                "-.nan", "2001:db8::1", "12abcdef", "0e", "1.2.3e4")
SAME_NUMBER = ("1.0e+3", "6.02e+23", ".5", "1.", "-1.5", "1000", "0", "-7", "1.5e-7",
               "+1", ".inf", "-.inf")


def test_the_yaml_family_is_what_the_grammars_say() -> None:
    """Each member is a string to PyYAML (libyaml too) and a number to YAML 1.2; the JSON
    ones to ``json.loads`` too. The controls are strings to all, or numbers to both."""
    loaders = [yaml.SafeLoader] + ([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else [])
    for _, text in YAML_FAMILY:
        for loader in loaders:
            assert yaml.load(f"a: {text}", Loader=loader)["a"] == text, text  # noqa: S506
        assert _yaml12_number(text), text
        try:
            json_number = not isinstance(json.loads(text), str)
        except ValueError:
            json_number = False
        assert json_number == _json_reads(text), text
    for text in STAY_STRINGS:
        assert yaml.safe_load(f"a: {text}")["a"] == text and not _yaml12_number(text), text
    for text in SAME_NUMBER:
        assert not isinstance(yaml.safe_load(f"a: {text}")["a"], str) and _yaml12_number(text)


@pytest.mark.parametrize(("kind", "text"), YAML_FAMILY, ids=[t for _, t in YAML_FAMILY])
def test_each_member_is_refused_with_both_readings(kind: str, text: str) -> None:
    """In process, as a claim value, a one_of member and a config value: the problem at
    its line and key, naming YAML 1.1's string and YAML 1.2's number (and JSON's when JSON
    has the form); a spelling it offers reads as that same number in YAML 1.1."""
    _, src = parse_yaml(f"a:\n  b: [x, {text}]\n  c: {text}\n", "f.yaml")
    shown = [str(p) for p in src.problems]
    assert len(shown) == 2, shown  # one problem each (no second one at the same key)
    readers = "YAML 1.2 and JSON" if _json_reads(text) else "YAML 1.2"
    for line, key, problem in zip((2, 3), ("a.b[1]", "a.c"), shown, strict=True):
        assert problem.startswith(f"f.yaml:{line}: {key}: read as the string {text!r} by "
                                  f"YAML 1.1 but as ")
        assert f"by {readers}:" in problem, problem
    offered = re.search(r"write it (?:in decimal digits \(|as )(\S+?)\)?[ ,]", shown[0])
    if text == "1e400":
        assert offered is None and "quote it" in shown[0]
        return
    assert offered, shown[0]
    number = yaml.safe_load(offered.group(1))
    assert not isinstance(number, str | bool), (text, offered.group(1))
    expected = int(text[2:], 8) if text.startswith("0o") else float(text)
    assert number == expected, (text, number, expected)


SWEEP_ALPHABET = "019eE+-.ox"


def test_every_short_plain_scalar_reads_as_it_looks() -> None:
    """Every plain scalar of up to four characters of ``SWEEP_ALPHABET`` that PyYAML reads
    as a string: refused exactly when YAML 1.2 reads it as a number (the grammars above),
    else kept as the same string. (Those PyYAML reads as numbers are the older check's.)"""
    wrong = []
    for n in range(1, 5):
        for chars in itertools.product(SWEEP_ALPHABET, repeat=n):
            text = "".join(chars)
            try:
                plain = yaml.safe_load(f"a: {text}")
            except yaml.YAMLError:
                continue
            if not isinstance(plain, dict) or not isinstance(plain["a"], str) \
                    or plain["a"] != text:
                continue
            doc, src = parse_yaml(f"a: {text}\n", "f.yaml")
            refused = any("by YAML 1.1 but as" in p.message for p in src.problems)
            if refused != _yaml12_number(text) or (not refused and doc["a"] != text):
                wrong.append(f"{text!r}: refused={refused} {[str(p) for p in src.problems]}")
    assert not wrong, "\n".join(wrong[:50])


def test_quoted_tagged_and_plain_strings_stay_strings() -> None:
    """Quoted or ``!!str``-tagged members are strings; ``!!float``/``!!int`` ones numbers;
    the strings of ``STAY_STRINGS`` load as strings; ``SAME_NUMBER`` as numbers."""
    for _, text in YAML_FAMILY:
        doc, src = parse_yaml(f"a: ['{text}', \"{text}\", !!str {text}]\n", "f.yaml")
        assert not src.problems and doc["a"] == [text] * 3, (text, src.problems)
    for text in ("1e3", "6.02e23", "-1e-3"):
        doc, src = parse_yaml(f"a: !!float {text}\n", "f.yaml")
        assert not src.problems and doc["a"] == float(text)
    doc, src = parse_yaml(f"a: [{', '.join(STAY_STRINGS)}]\n", "f.yaml")
    assert not src.problems and doc["a"] == list(STAY_STRINGS), src.problems
    doc, src = parse_yaml(f"a: [{', '.join(SAME_NUMBER)}]\n", "f.yaml")
    assert not src.problems and all(not isinstance(v, str) for v in doc["a"]), src.problems


def test_every_member_is_named_by_policy_check_as_a_claim_value(tmp_path: Path) -> None:
    """Every member as an (unregistered) claim value, shorthand and in a one_of, through
    ``sidecar policy check`` (one interpreter): exit 1, file:line: key, no traceback; and
    one real ``policy check`` process on a set of them."""
    jobs, expected = [], []
    for i, (_, text) in enumerate(YAML_FAMILY):
        for j, (claims, key) in enumerate([(f"{{lvl: {text}}}", "lvl"),
                                           (f"{{lvl: {{one_of: [1, {text}]}}}}",
                                            "lvl.one_of[1]")]):
            path = _write(tmp_path / f"d{j}", f"p{i}.yaml", _policy(claims))
            jobs.append(["policy", "check", str(path)])
            expected.append(f"{path}:{CLAIMS_LINE}: {RULE_AT}.{key}: read as the string "
                            f"{text!r} by YAML 1.1")
    wrong = []
    for r, want in zip(sidecar_cli_many(jobs, timeout=300), expected, strict=True):
        out = r.stdout + r.stderr
        if r.returncode != 1 or "Traceback" in out or want not in out:
            wrong.append(f"{want}: exit {r.returncode}: {out[-300:]}")
    assert not wrong, f"{len(wrong)}/{len(expected)}:\n" + "\n".join(wrong)
    r = sidecar_cli("policy", "check", str(tmp_path / "d0" / "p0.yaml"), timeout=60)
    assert r.returncode == 1 and expected[0] in r.stdout + r.stderr, r.stdout + r.stderr


def test_every_member_is_refused_in_a_sidecar_config(tmp_path: Path, pki: Pki) -> None:
    """The sidecar config is read by the same reader: ``workers: 1e0`` is refused, in
    process and by ``sidecar run --check --config-only`` (one interpreter for the family),
    naming file, line and key; ``workers: 1`` loads."""
    base = sidecar_config(pki.identity("orders"),
                          inbound={"listen": f"127.0.0.1:{free_port()}",
                                   "app": "127.0.0.1:9"})
    good = yaml.safe_dump(base) + "workers: 1\n"
    load_config(good, str(tmp_path / "good.yaml"))
    jobs, expected = [], []
    for i, (_, text) in enumerate(YAML_FAMILY):
        body = yaml.safe_dump(base) + f"workers: {text}\n"
        line = body.count("\n")
        path = tmp_path / f"c{i}.yaml"
        path.write_text(body)
        want = f"{path}:{line}: workers: read as the string {text!r} by YAML 1.1"
        with pytest.raises(ConfigError) as info:
            load_config(body, str(path))
        assert want in str(info.value), str(info.value)
        jobs.append(["run", "-c", str(path), "--check", "--config-only"])
        expected.append(want)
    for r, want in zip(sidecar_cli_many(jobs, timeout=300), expected, strict=True):
        assert r.returncode == 2 and want in r.stderr, (want, r.returncode, r.stderr[-500:])


def test_the_repository_policies_and_docs_still_load() -> None:
    """No legitimate file of the repository is refused by the new check: every YAML file
    and every ```yaml block of the docs (the ones that parse at all)."""
    from tests.harness import ROOT

    texts = [(str(p), p.read_text()) for pattern in ("policies/**/*.yaml", "deploy/**/*.yaml",
                                                     "examples/**/*.yaml")
             for p in sorted(ROOT.glob(pattern))]
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        if doc.exists():
            texts += [(str(doc), m.group(1)) for m in
                      re.finditer(r"```ya?ml\n(.*?)```", doc.read_text(), re.S)]
    assert len(texts) > 10
    found = []
    for name, text in texts:
        try:
            _, src = parse_yaml(text, name)
        except ConfigError:
            continue
        found += [str(p) for p in src.problems if "by YAML 1.1 but as" in p.message]
    assert not found, found


# --- a running sidecar: reloads refused, the last good policy enforced --------------------



def _reload_policy(claims: str, name: str = "lock-out") -> str:
    """``_policy`` with a second deny rule, for tokens of ``lvl`` 1000, before the allow."""
    return _policy(claims, name).replace(
        "      - {name: api,", "      - {name: no-level-1000, deny: {paths: ['/**'], jwt: "
        "{provider: corp, claims: {lvl: 1000}}}}\n      - {name: api,")


# (claims of the first rule in a bad reload, the key its refusal names)
BAD_RELOADS = [
    ("{sub: {one_of: [1001, '1002']}}", f"{RULE_AT}.sub.one_of[0]"),
    ("{sub: 1001}", f"{RULE_AT}.sub"),
    ("{jti: {one_of: [12345]}}", f"{RULE_AT}.jti.one_of[0]"),
    ("{exp: {contains: 5}}", f"{RULE_AT}.exp.contains"),
    ("{aud: 7}", f"{RULE_AT}.aud"),
    ("{lvl: 1e3}", f"{RULE_AT}.lvl"),
    ("{lvl: {one_of: [0o17]}}", f"{RULE_AT}.lvl.one_of[0]"),
    ("{lvl: 6.02e23}", f"{RULE_AT}.lvl"),
]


def _token(**claims: Any) -> dict[str, str]:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "jti": f"j-{time.time_ns()}",
               "iat": now - 10, "exp": now + 600, **claims}
    return {"Authorization": f"Bearer {mint(payload, ec_key())}"}


def test_a_running_sidecar_refuses_each_reload_and_keeps_its_policy(tmp_path: Path, pki: Pki,
                                                                   app: int, procs: list[Any]) -> None:
    """A real sidecar, JWTs verified against a real key file. The good policy denies sub
    "1001" and lvl 1000; each bad reload (the review's members, both holes) is refused
    naming file, line and key, the version stays and the deny rule still denies, the valid
    user still passes. A control reload (the same tests, correctly typed) is then taken."""
    policy = _write(tmp_path, "mesh.yaml", _reload_policy("{sub: {one_of: ['1001', '1002']}}"))
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"})
    cfg["policy"] = {"path": str(policy), "watch_interval": "100ms"}
    b = start_sidecar(tmp_path, "orders", cfg)
    procs.append(b)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    port, admin = b.port("inbound"), b.port("admin")

    def statuses() -> tuple[int, int, int]:
        return (http(port, "GET", "/api/x", ctx=ctx, headers=_token(sub="1001")).status,
                http(port, "GET", "/api/x", ctx=ctx, headers=_token(lvl=1000)).status,
                http(port, "GET", "/api/x", ctx=ctx, headers=_token()).status)

    assert statuses() == (403, 403, 200)
    before = http(admin, "GET", "/policy").json()["version"]
    for i, (claims, key) in enumerate(BAD_RELOADS):
        replace_file(policy, _reload_policy(claims))
        wait_for(lambda i=i: b.metric("sidecar_policy_reloads_total", result="failed") >= i + 1,
                 timeout=30)
        status = http(admin, "GET", "/policy").json()
        assert status["version"] == before, claims
        assert f"{policy}:{CLAIMS_LINE}: {key}: " in status["last_reload_error"], \
            (claims, status["last_reload_error"])
        assert statuses() == (403, 403, 200), claims
    # the control: the same tests correctly typed (user "1002" only) are taken
    replace_file(policy, _reload_policy("{sub: '1002'}"))
    wait_for(lambda: http(admin, "GET", "/policy").json()["version"] != before, timeout=30)
    assert statuses() == (200, 403, 200)
    assert b.proc.poll() is None
