"""Mesh policy YAML -> validated, compiled, immutable ``Policy``.

The loader walks the plain values from ``sidecar.config.source.parse_yaml`` and reports
every problem it finds (file, line, key path) before raising one ``ConfigError``: a person
fixing a policy should see all the mistakes in one run. Unknown keys are errors, empty
lists are errors (omit the key to mean "anything"), and references to JWT providers or
API keys that the file does not define are errors, because each of those is a rule that
silently does something other than what its author meant.

Loading is pure apart from ``read_policy_set`` reading the policy's files (one file, or
the files of directories: a policy set, see ``sidecar.policy.policyset``): no clock, no
network, no other files (``jwks_file`` paths are resolved against the defining file's
directory but not opened). The result is safe to build in a reload task and swap in
atomically.

Where the parts live: this module validates the services (rules, conditions, egress) and
puts the policy together; ``policyset`` reads and merges the files; ``load_sections``
validates the mesh-wide sections (providers, revocations, API keys, rate limits, alerts);
``config.source.Reader`` is the typed access to YAML values they all use; the result is a
``sidecar.policy.loaded.Policy``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, cast

from sidecar.config.source import MAX_PROBLEMS, Reader, format_path, gc_paused
from sidecar.config.source import Path as P
from sidecar.errors import ConfigError, Problem
from sidecar.http.request import ipv4_problem, split_host
from sidecar.http.untrusted import fold
from sidecar.identity.spiffe import segment_problem, spiffe_problem, trust_domain_problem
from sidecar.policy.compiled import (
    MAX_CLAIM_NAME_DOTS,
    Section,
    deny_hosts,
    embedded_ipv4,
    normalise_host,
)
from sidecar.policy.load_sections import (
    NAME,
    TOKEN,
    parse_alerts,
    parse_api_keys,
    parse_provider,
    parse_rate_limits,
    parse_revocations,
    read_name,
)
from sidecar.policy.loaded import LazySections, Policy, narrow_extras
from sidecar.policy.model import (
    ClaimCondition,
    ClaimOp,
    Conditions,
    EgressEntry,
    JwtCondition,
    Mode,
    Rule,
    ServicePolicy,
)
from sidecar.policy.paths import normalise_path_pattern
from sidecar.policy.policyset import (
    MAX_POLICY_FILES,
    MAX_POLICY_SET_BYTES,
    MAX_POLICY_SET_VALUES,
    MAX_RULES_PER_SECTION,
    MERGE_RULES,
    SET_VALUES_PROBLEM,
    NeedNames,
    ParsedFiles,
    PolicyFile,
    merge_files,
    named_entries,
    only_config_errors,
    policy_label,
    read_policy_set,
    set_version,
)
from sidecar.policy.sections import JwtProvider, PolicyExtras

# Re-exported: callers load policies through this module.
__all__ = [
    "MAX_POLICY_FILES", "MAX_POLICY_SET_BYTES", "MAX_RULES_PER_SECTION", "MERGE_RULES",
    "ParsedFiles", "Policy", "load_policy", "load_policy_file", "load_policy_files",
    "load_policy_set", "normalise_path_pattern", "policy_label", "read_policy_set",
]


SERVICE_KEYS = frozenset({"rules", "egress", "mode", "non_ascii_paths", "audience", "path_case",
                          "invalid_tokens", "format_suffixes"})
RULE_KEYS = frozenset({"name", "description", "allow", "deny", "mode", "expires_at"})
CONDITION_KEYS = frozenset(
    {"from", "namespaces", "methods", "paths", "ports", "listeners", "hosts", "jwt", "apikey"}
)


# Pattern segments of one section: every `/`-separated segment of a `paths` pattern, of a
# `from` identity pattern (after `spiffe://`) and of an `egress` entry counts one (a pattern
# at least one). Each is a node of a segment trie (``compiled.SegmentTrie``) built at every
# load of the section, at start and at every reload. The 10,000-rule bound did not bound
# them (found by a hostile review, session 28): 9,999 rules of 42 paths each (420,000
# patterns, 7.97 MiB, within every other bound) took 8.6 s and 745 MiB to load the own
# section, and 1,000 patterns of 4,000 segments each 10.8 s and 2.8 GiB. At this bound the
# worst shapes measured load in about 1 s and 100 MiB (docs/policy.md, services.rules); a
# section of 10,000 rules with a caller and two paths each (bench/micro_policy.py) holds
# 80,000.
MAX_SECTION_PATTERN_SEGMENTS = 100_000
SECTION_PATTERNS_PROBLEM = (f"more than {MAX_SECTION_PATTERN_SEGMENTS:,} pattern segments "
                            "(paths, from, egress) in one section")


def _past_pattern_bound(raw_rules: list[Any], raw_egress: Any, path: P) -> P | None:
    """The key of the first pattern that takes a section's pattern segments past
    ``MAX_SECTION_PATTERN_SEGMENTS``, or None. Counted on the values as read, before any
    rule is built (cheap: the count of '/' in each string), so what is refused costs no
    more than what is loaded."""
    total = 0
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, dict):
            continue
        for effect in ("allow", "deny"):
            cond = raw.get(effect)
            if not isinstance(cond, dict):
                continue
            for key, prefix in (("paths", 0), ("from", 1)):  # (`spiffe://` holds two '/')
                values = cond.get(key)
                for j, value in enumerate(values if isinstance(values, list) else ()):
                    if isinstance(value, str):
                        total += max(1, value.count("/") - prefix)
                        if total > MAX_SECTION_PATTERN_SEGMENTS:
                            return path + ("rules", i, effect, key, j)
    for j, value in enumerate(raw_egress if isinstance(raw_egress, list) else ()):
        if isinstance(value, str):
            total += max(1, value.count("/") - 1)
            if total > MAX_SECTION_PATTERN_SEGMENTS:
                return path + ("egress", j)
    return None


# A percent escape of a byte outside ASCII: a pattern holding one (or a raw non-ASCII
# character) names a path with a non-ASCII character.
_NON_ASCII_ESCAPE = re.compile(r"%[89A-Fa-f][0-9A-Fa-f]")
NON_ASCII_PATTERN_PROBLEM = (
    "this section refuses every path holding a non-ASCII character (400, non_ascii, before "
    "any rule runs; non_ascii_paths: refuse, the default), so no request can match this "
    "deny pattern: write the path in ASCII (the characters the app routes), or set "
    "non_ascii_paths: allow if the app serves non-ASCII paths")


def _dead_non_ascii_denies(r: Reader, rules: list[Rule], raw_rules: list[Any],
                           names: dict[str, int], path: P) -> None:
    """A deny pattern naming a non-ASCII path, raw (``/\u0430dmin/**``, a Cyrillic 'a') or
    percent-encoded (``/%D0%B0dmin/**``), in a section that refuses non-ASCII paths: it can
    never match, so the rule would deny nothing. Refused like the other rules that can never
    match (``methods: ["*"]``, an unknown listener). A section-level check: the conditions
    themselves are memoised across sections (``ConditionsMemo``), which may allow such
    paths. Found by a hostile review (session 28): ``deny /\u0430dmin/**`` loaded, and
    ``policy check`` and ``lint`` said nothing."""
    for rule in rules:
        if rule.effect != "deny" or rule.when.paths is None or not any(
                not p.isascii() or _NON_ASCII_ESCAPE.search(p) for p in rule.when.paths):
            continue
        i = names[rule.name]
        values = raw_rules[i]["deny"]["paths"]  # (validated: a list of strings)
        for j, value in enumerate(values):
            if not value.isascii() or _NON_ASCII_ESCAPE.search(value):
                r.problem(path + ("rules", i, "deny", "paths", j), NON_ASCII_PATTERN_PROBLEM)


# Rules are decided for requests of the inbound listener (the outbound side checks `egress`).
RULE_LISTENERS = frozenset({"inbound"})
# The methods the data path serves (sidecar.http.request._METHOD): others never reach a rule.
DATA_PATH_METHOD = re.compile(r"[A-Z][A-Z-]{0,31}")


def _host_problem(host: str) -> str | None:
    """Why a ``hosts`` entry can never equal a request's Host, or None. Read by ``split_host``,
    the definition the data path accepts a Host by: a name of letters, digits, ``. _ ~ -`` or
    a bracketed IPv6 address that parses; no port, no scheme, not only dots, no empty label
    (``a..b``, ``.a``)."""
    if (why := ipv4_problem(host)) is not None:
        return why
    if host and not host.rstrip("."):
        return "expected a host name, not only dots"
    parts = split_host(host)
    if parts is None or parts[1] or host.endswith(":"):
        return "expected a host name without port or scheme (or a bracketed IPv6 address)"
    if parts[0].startswith("[") and (ipv4 := embedded_ipv4(parts[0])) is not None:
        # A rule for [64:ff9b::a00:1] would name a NAT64, 6to4, Teredo or IPv4-compatible
        # form of an IPv4 address, and an allow rule would admit one spelling of it only.
        return ("an IPv6 literal that carries an IPv4 address (NAT64, 6to4, Teredo, "
                "IPv4-compatible): name the IPv4 address" + (f" ({ipv4})" if ipv4 else ""))
    return None


def _mode(r: Reader, value: Any, path: P) -> Mode | None:
    if value not in ("enforce", "dry-run"):
        r.problem(path, "expected enforce or dry-run")
        return None
    return cast(Mode, value)


# --- rules ----------------------------------------------------------------------------


def _claims(r: Reader, value: Any, path: P) -> tuple[ClaimCondition, ...] | None:
    m = r.mapping(value, path, None)
    if m is None:
        return None
    if not m:
        r.problem(path, "empty claims; omit the key to require only a valid token")
        return None
    out: list[ClaimCondition] = []
    scalar = (str, int, float, bool)
    for claim, spec in m.items():
        cp = path + (claim,)
        if not claim:
            r.problem(cp, "a claim name cannot be empty")
            continue
        if claim.count(".") > MAX_CLAIM_NAME_DOTS:
            # (each way of splitting the name at its dots is a reading: ``claim_readings``)
            r.problem(cp, f"a claim name has at most {MAX_CLAIM_NAME_DOTS} dots")
            continue
        if (why := _claim_value_problem(spec)) is not None:
            r.problem(cp, why)
            continue
        if isinstance(spec, scalar):
            if (why := _registered_claim_problem(claim, "equals", spec)) is not None:
                r.problem(cp, why)
                continue
            out.append(ClaimCondition(claim, "equals", (spec,)))
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            r.problem(cp, "expected a value or exactly one of {equals, one_of, contains}")
            continue
        (op, operand), = spec.items()
        if (why := _claim_value_problem(operand)) is not None:
            r.problem(cp + (op,), why)
            continue
        if op in ("equals", "contains"):
            if not isinstance(operand, scalar):
                r.problem(cp + (op,), "expected a string, number or boolean")
                continue
            if op == "contains" and operand == "":
                # "" is in "a  b".split(" "): an empty scope token matched any double space.
                r.problem(cp + (op,), "contains an empty string: expected a value")
                continue
            if (why := _registered_claim_problem(claim, op, operand)) is not None:
                r.problem(cp + (op,), why)
                continue
            out.append(ClaimCondition(claim, cast(ClaimOp, op), (operand,)))
        elif op == "one_of":
            if not isinstance(operand, list) or not operand:
                r.problem(cp + (op,), "expected a non-empty list of values")
                continue
            bad = [i for i, v in enumerate(operand) if not isinstance(v, scalar)]
            for i in bad:
                r.problem(cp + (op, i), "expected a string, number or boolean")
            for i, v in enumerate(operand):
                if i not in bad and (why := _registered_claim_problem(claim, op, v)) is not None:
                    r.problem(cp + (op, i), why)
                    bad.append(i)
            if not bad:
                out.append(ClaimCondition(claim, "one_of", tuple(operand)))
        else:
            r.problem(cp + (op,), "unknown claim test (known: contains, equals, one_of)")
    return tuple(out)


def _claim_value_problem(value: Any) -> str | None:
    """A claim test's value (or any of a list's) that no token's claim can ever equal: NaN
    and infinities (JSON has none; NaN is not even equal to itself)."""
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        return "a claim value must be a finite number (JSON has no NaN or infinity)"
    return None


# What a registered claim is in every token that passes verification (docs/authn.md step 6:
# ``REGISTERED_CLAIM_TYPES`` refuses a JWT or an introspection answer whose claim is not),
# for the problem of a test it can never meet. A claim of the table missing here is still
# checked, and described as "of another type".
_REGISTERED_CLAIM_KINDS = MappingProxyType({
    "iss": "a non-empty string", "sub": "a non-empty string", "jti": "a non-empty string",
    "aud": "a non-empty string or a list of them",
    "exp": "a NumericDate (a number from 0 to 253402300799)",
    "nbf": "a NumericDate (a number from 0 to 253402300799)",
    "iat": "a NumericDate (a number from 0 to 253402300799)",
})


def _registered_claim_problem(claim: str, op: str, value: Any) -> str | None:
    """Why the test ``claim op value`` on a registered claim (``REGISTERED_CLAIM_TYPES``)
    can hold for no token that passes verification, or None. Found by a hostile review: a
    deny rule ``claims: {sub: 1001}`` (a YAML integer; every accepted token's ``sub`` is a
    string, and claim tests compare types strictly) loaded and denied nothing -- it failed
    open. The table's own checks decide: ``equals`` and each ``one_of`` member must be a
    value the claim may have; ``contains`` must be a member of a list the claim may be, or a
    word (no space) of a string it may be -- so never for the NumericDates."""
    # (imported here: the table lives with the verifier, which a load without claim tests,
    # and ``policy check`` of such a policy, need not import)
    from sidecar.authn.jwt import REGISTERED_CLAIM_TYPES

    valid = REGISTERED_CLAIM_TYPES.get(claim)
    if valid is None:
        return None
    kind = _REGISTERED_CLAIM_KINDS.get(claim, "of another type")
    if op != "contains":
        if valid(value):
            return None
        return (f"{claim} is {kind} in every token that passes verification (others are "
                f"refused, bad_claim): it never equals {_described(value)}")
    if valid([value]) or (isinstance(value, str) and " " not in value and valid(value)):
        return None
    if isinstance(value, str) and valid("x"):
        return (f"{claim} is {kind} in every token that passes verification, and contains "
                f"tests its words, delimited by single spaces: {_described(value)} is never "
                "one of them")
    return (f"{claim} is {kind} in every token that passes verification (others are "
            f"refused, bad_claim): it never contains {_described(value)}")


def _described(value: Any) -> str:
    """A claim test's value with its type, as a problem names it (``the integer 1001``)."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if value == "":
        return "the empty string"
    return f"the string {value!r}"


# Conditions memo (one per load): the same condition block -- `deny: {paths: [/admin/**]}` --
# appears in thousands of sections of a mesh policy. Only blocks of plain strings and lists
# of plain strings are keyed (exact types: `true` and `1` must never share a key), and only
# blocks that validated without a problem are stored, so a hit stands for a block that would
# have reported nothing: every problem is still reported at its own file, line and key.
ConditionsMemo = dict[tuple[tuple[str, str | tuple[str, ...]], ...], Conditions]
MAX_CONDITIONS_MEMO = 4096


def _memo_key(m: dict[str, Any]) -> tuple[tuple[str, str | tuple[str, ...]], ...] | None:
    key: list[tuple[str, str | tuple[str, ...]]] = []
    for k, v in m.items():
        if type(v) is str:
            key.append((k, v))
        elif type(v) is list and all(type(x) is str for x in v):
            key.append((k, tuple(v)))
        else:
            return None
    return tuple(key)


def _conditions(
    r: Reader, value: Any, path: P, providers: Mapping[str, JwtProvider], keys: set[str],
    memo: ConditionsMemo | None = None,
) -> Conditions | None:
    if value is None:
        return None  # `allow:` with nothing under it: a null, refused while reading the file
    m = r.mapping(value, path, CONDITION_KEYS)
    if m is None:
        return None
    mkey = _memo_key(m) if memo is not None else None
    if mkey is not None and memo is not None and (hit := memo.get(mkey)) is not None:
        return hit
    before = len(r.src.problems)
    kw: dict[str, Any] = {}
    if "from" in m:
        peers = []
        for sid, sp in r.string_list(m["from"], path + ("from",)) or []:
            why = spiffe_problem(sid, wildcards=True)
            if why:
                r.problem(sp, why)
            peers.append(sid)
        kw["peers"] = tuple(peers)
    if "namespaces" in m:
        names = r.string_list(m["namespaces"], path + ("namespaces",)) or []
        for ns, sp in names:
            if why := segment_problem(ns):
                r.problem(sp, f"invalid namespace name: {why}")
        kw["namespaces"] = frozenset(ns for ns, _ in names)
    if "methods" in m:
        methods = r.string_list(m["methods"], path + ("methods",)) or []
        for meth, sp in methods:
            if meth == "*":
                # A deny rule with `methods: ["*"]` denied nothing: no request has method "*".
                r.problem(sp, "'*' is not a method wildcard: omit methods to match every method")
            elif not TOKEN.match(meth):
                r.problem(sp, "invalid HTTP method")
            elif not DATA_PATH_METHOD.fullmatch(meth.upper()):
                r.problem(sp, "no request has this method: the sidecar serves methods of "
                          "letters and '-' only, at most 32 (a rule naming it never matches)")
        kw["methods"] = frozenset(meth.upper() for meth, _ in methods)
    if "paths" in m:
        pats = []
        for pat, sp in r.string_list(m["paths"], path + ("paths",)) or []:
            try:
                pats.append(normalise_path_pattern(pat))
            except ValueError as exc:
                r.problem(sp, str(exc))
        kw["paths"] = tuple(dict.fromkeys(pats))
    if "ports" in m:
        pp = path + ("ports",)
        raw = m["ports"]
        if not isinstance(raw, list) or not raw:
            r.problem(pp, "expected a non-empty list of ports")
            raw = []
        kw["ports"] = frozenset(
            p for i, v in enumerate(raw) if (p := r.integer(v, pp + (i,), 1, 65535)) is not None
        )
    if "listeners" in m:
        listeners = r.string_list(m["listeners"], path + ("listeners",)) or []
        for name, sp in listeners:
            if name not in RULE_LISTENERS:
                # Rules decide requests that arrive on the inbound listener; any other name
                # (a typo, an outbound listener) never matched, so a deny rule denied nothing.
                r.problem(sp, f"rules decide requests of the inbound listener only: expected "
                          f"{', '.join(sorted(RULE_LISTENERS))}")
        kw["listeners"] = frozenset(s for s, _ in listeners)
    if "hosts" in m:
        hosts = r.string_list(m["hosts"], path + ("hosts",)) or []
        for h, sp in hosts:
            if (why := _host_problem(h)) is not None:
                r.problem(sp, why)
        # The form requests are compared in (normalise_host: an IPv6 literal canonical).
        kw["hosts"] = frozenset(normalise_host(h) for h, _ in hosts)
    if "jwt" in m:
        jp = path + ("jwt",)
        jm = r.mapping(m["jwt"], jp, frozenset({"provider", "claims"}))
        if jm is not None:
            provider = r.string(jm.get("provider"), jp + ("provider",))
            if provider is not None and provider not in providers:
                r.problem(jp + ("provider",), f"no jwt_providers entry named {provider!r}")
            claims = _claims(r, jm["claims"], jp + ("claims",)) if "claims" in jm else ()
            if provider is not None and claims is not None:
                kw["jwt"] = JwtCondition(provider, claims)
    if "apikey" in m:
        ap = path + ("apikey",)
        raw = m["apikey"]
        if raw is True:
            kw["apikey"] = True
        elif isinstance(raw, list):
            names = r.string_list(raw, ap) or []
            for n, sp in names:
                if n not in keys:
                    r.problem(sp, f"no api_keys entry named {n!r}")
            kw["apikey"] = frozenset(n for n, _ in names)
        else:
            r.problem(ap, "expected true (any valid key) or a list of key names")
    if len(r.src.problems) != before:
        return None
    conditions = Conditions(**kw)
    if mkey is not None and memo is not None:
        if len(memo) >= MAX_CONDITIONS_MEMO:
            memo.clear()
        memo[mkey] = conditions
    return conditions


def _rule(
    r: Reader, value: Any, path: P, index: int, providers: Mapping[str, JwtProvider],
    keys: set[str], memo: ConditionsMemo | None = None,
) -> Rule | None:
    m = r.mapping(value, path, RULE_KEYS)
    if m is None:
        return None
    name = read_name(r, m.get("name"), path + ("name",))
    effects = [e for e in ("allow", "deny") if e in m]
    if len(effects) != 1:
        r.problem(path, "a rule has exactly one of allow or deny")
        return None
    effect: Literal["allow", "deny"] = "allow" if effects[0] == "allow" else "deny"
    when = _conditions(r, m[effect], path + (effect,), providers, keys, memo)
    if effect == "deny" and when is not None and when.methods and "GET" in when.methods:
        # HEAD runs the GET handler in nearly every framework: denying GET denies HEAD.
        when = dataclasses.replace(when, methods=when.methods | {"HEAD"})
    if effect == "deny" and when is not None and when.hosts:
        # A Host literal that carries one of its IPv4 addresses is that address to a deny rule.
        when = dataclasses.replace(when, hosts=deny_hosts(when.hosts))
    mode = _mode(r, m["mode"], path + ("mode",)) if "mode" in m else None
    expires = r.timestamp(m["expires_at"], path + ("expires_at",)) if "expires_at" in m else None
    if "description" in m and not isinstance(m["description"], str):
        r.problem(path + ("description",), "expected a string")
    if name is None or when is None or ("mode" in m and mode is None):
        return None
    if "expires_at" in m and expires is None:
        return None
    return Rule(
        name=name, effect=effect, when=when, mode=mode,
        expires_at=expires, line=r.src.line(path), key=format_path(path), index=index,
    )


def _service(
    r: Reader, identity: str, value: Any, path: P, providers: Mapping[str, JwtProvider],
    keys: set[str], file: str = "", memo: ConditionsMemo | None = None,
) -> ServicePolicy | None:
    why = spiffe_problem(identity, wildcards=False)
    if why:
        r.problem(path, why)
    m = r.mapping(value, path, SERVICE_KEYS)
    if m is None:
        return None
    rules: list[Rule] = []
    names: dict[str, int] = {}
    raw_rules = m.get("rules", [])
    if not isinstance(raw_rules, list):
        r.problem(path + ("rules",), "expected a list of rules")
        raw_rules = []
    elif len(raw_rules) > MAX_RULES_PER_SECTION:
        # 100,000 rules of one section took 13 s and 490 MiB to load in the sidecar (at
        # start and in every reload); a section is one workload's callers.
        r.problem(path + ("rules",), f"more than {MAX_RULES_PER_SECTION:,} rules in one "
                  "section")
        raw_rules = []
    past = _past_pattern_bound(raw_rules, m.get("egress"), path)
    if past is not None:
        # (nothing of the section is built: see MAX_SECTION_PATTERN_SEGMENTS)
        r.problem(past, SECTION_PATTERNS_PROBLEM)
        raw_rules = []
    for i, raw in enumerate(raw_rules):
        rule = _rule(r, raw, path + ("rules", i), len(rules), providers, keys, memo)
        if rule is None:
            continue
        if rule.name in names:
            r.problem(path + ("rules", i, "name"),
                      f"rule name {rule.name!r} is already used in this service")
            continue
        names[rule.name] = i
        rules.append(rule)
    egress: tuple[EgressEntry, ...] | None = None
    if "egress" in m and past is None:
        ep = path + ("egress",)
        raw_egress = m["egress"]
        if not isinstance(raw_egress, list):
            r.problem(ep, "expected a list of SPIFFE IDs")
            raw_egress = []
        entries = []
        for i, sid in enumerate(raw_egress):
            if not isinstance(sid, str):
                r.problem(ep + (i,), "expected a SPIFFE ID")
                continue
            problem = spiffe_problem(sid, wildcards=True)
            if problem:
                r.problem(ep + (i,), problem)
                continue
            entries.append(EgressEntry(sid, r.src.line(ep + (i,)), format_path(ep + (i,))))
        egress = tuple(entries)
    mode = _mode(r, m["mode"], path + ("mode",)) if "mode" in m else None
    non_ascii = m.get("non_ascii_paths", "refuse")
    if non_ascii not in ("refuse", "allow"):
        r.problem(path + ("non_ascii_paths",), "expected refuse or allow")
    elif non_ascii == "refuse":
        _dead_non_ascii_denies(r, rules, raw_rules, names, path)
    invalid_tokens = m.get("invalid_tokens", "refuse")
    if invalid_tokens not in ("refuse", "per_rule"):
        r.problem(path + ("invalid_tokens",), "expected refuse or per_rule")
    audience = r.string(m["audience"], path + ("audience",)) if "audience" in m else None
    path_case = m.get("path_case")
    if path_case not in (None, "sensitive", "insensitive"):
        r.problem(path + ("path_case",), "expected sensitive or insensitive")
        path_case = None
    elif path_case == "insensitive" and non_ascii == "allow":
        # Unicode case mapping differs between frameworks (the Kelvin sign folds to "k" in
        # .NET, "ß" to "ss" in casefold); only ASCII letters fold the same everywhere.
        r.problem(path + ("path_case",),
                  "path_case: insensitive cannot be combined with non_ascii_paths: allow")
    format_suffixes = m.get("format_suffixes")
    if format_suffixes not in (None, "fold", "keep"):
        r.problem(path + ("format_suffixes",), "expected fold or keep")
        format_suffixes = None
    return ServicePolicy(identity, tuple(rules), egress, mode, r.src.line(path), format_path(path),
                         non_ascii_paths=non_ascii == "allow", audience=audience,
                         path_case=path_case, format_suffixes=format_suffixes, file=file,
                         refuse_invalid_tokens=invalid_tokens != "per_rule")


def load_policy(text: bytes | str, filename: str, *, only: str | None = None) -> Policy:
    """Parse, validate and compile a one-file policy; raise ``ConfigError`` listing every
    problem. ``filename`` names the file in problems, and relative ``jwks_file``/``jwks_ca``
    paths are resolved against its directory. ``only``: see ``load_policy_set``.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return load_policy_files([(filename, raw)], only=only)


def load_policy_files(files: list[tuple[str, bytes]], *, only: str | None = None,
                      label: str | None = None, cache: ParsedFiles | None = None) -> Policy:
    """Parse, merge, validate and compile a policy from (filename, bytes) pairs."""
    cache = cache if len(files) > 1 else None
    try:
        with only_config_errors(label or policy_label([name for name, _ in files])), gc_paused():
            return _load(files, only, label, cache)
    finally:
        for doc in cache.docs.values() if cache is not None else ():
            doc.compact()


# Each file stops at MAX_PROBLEMS; the files of a set together stop there too (found by a
# hostile review: 1,000 files of aliases made 100,000 problems, a 7 MB error that a reload
# wrote to /policy and to one log line at every attempt, 40 MB with long keys).
SET_STOPPED_PROBLEM = (f"{MAX_PROBLEMS} problems in the policy files: stopped reading them here "
                       "(fix these first)")


def _capped(problems: list[Problem]) -> list[Problem]:
    """At most ``MAX_PROBLEMS`` of ``problems``, then ``SET_STOPPED_PROBLEM`` naming the file
    of the first one left out (one file's own 100 and its stop line are kept as they are)."""
    if len(problems) <= MAX_PROBLEMS + 1:
        return problems
    return [*problems[:MAX_PROBLEMS],
            Problem(problems[MAX_PROBLEMS].file, None, "", SET_STOPPED_PROBLEM)]


def _cascade(problem: Problem) -> bool:
    """Whether ``problem``, found in the files that parsed, may only say that a file that did
    not parse is missing (the names, trust domain and sections it would define)."""
    return (problem.message.startswith(("no jwt_providers entry named",
                                        "no api_keys entry named"))
            or (problem.key == "services" and problem.message.startswith("missing key"))
            or (problem.key == "trust_domain" and "non-empty" in problem.message))


def _with_the_others(failed: list[Problem], docs: list[PolicyFile],
                     files: list[tuple[str, bytes]], only: str | None,
                     label: str | None) -> list[Problem]:
    """The problems of the files that did not parse, and those of the files that did: every
    broken file at once, in file order (found by a hostile review: a policy directory with a
    syntax error in one file reported that file only, and each other broken file one fix at
    a time). The parsed files are checked as a set of their own, without what only the
    unparsed files would define (``_cascade``)."""
    if len(failed) > MAX_PROBLEMS or not docs:
        return failed
    parsed = {doc.filename for doc in docs}
    cache = ParsedFiles()
    cache.docs = {(doc.filename, doc.digest, only): doc for doc in docs}
    try:
        _load([(name, raw) for name, raw in files if name in parsed], only, label, cache)
        others: list[Problem] = []
    except ConfigError as exc:
        others = [p for p in exc.problems if not _cascade(p)]
    order = {name: i for i, (name, _) in enumerate(files)}
    found = [*failed, *others]
    found.sort(key=lambda p: order.get(p.file, len(order)))
    return found


def _check_version(doc: PolicyFile) -> None:
    version = doc.top.get("version", None)
    if type(version) is not int or version != 1:  # `true` and `1.0` equal 1 in Python
        doc.r.problem(("version",), "expected version: 1")


def _load(files: list[tuple[str, bytes]], only: str | None, label: str | None,
          cache: ParsedFiles | None) -> Policy:
    docs: list[PolicyFile] = []
    failed: list[Problem] = []
    kept: dict[tuple[str, str, str | None], PolicyFile] = {}
    values_left = MAX_POLICY_SET_VALUES
    for filename, raw in files:
        key = (filename, hashlib.sha256(raw).hexdigest(), only)
        try:
            doc = cache.docs[key].reuse() if cache and key in cache.docs else PolicyFile(
                filename, key[1], raw, only, values_left)
        except ConfigError as exc:
            failed.extend(exc.problems)
            if exc.problems and exc.problems[-1].message == SET_VALUES_PROBLEM:
                break  # the files after it are not read at all
            if len(failed) > MAX_PROBLEMS + 1:
                break  # nor after this many problems
            continue
        values_left -= doc.values
        docs.append(doc)
        kept[key] = doc
    if cache is not None:
        cache.docs = kept
    if failed:
        raise ConfigError(_capped(_with_the_others(failed, docs, files, only, label)))
    first = docs[0]
    try:
        merged, origin, skipped = merge_files(docs)
    except NeedNames:
        docs = [PolicyFile(d.filename, d.digest, raw, only) for d, (_, raw) in zip(docs, files, strict=True)]
        first = docs[0]
        if cache is not None:
            cache.docs = {(d.filename, d.digest, only): d for d in docs}
        merged, origin, skipped = merge_files(docs)

    def reader(key: str) -> Reader:
        return origin[key][0].r if key in origin else first.r

    def at(key: str) -> P:
        return origin[key][1] if key in origin else (key,)

    for doc in docs:
        _check_version(doc)
    trust_domain = reader("trust_domain").string(merged.get("trust_domain"),
                                                 at("trust_domain")) or ""
    if trust_domain and (why := trust_domain_problem(trust_domain)):
        reader("trust_domain").problem(at("trust_domain"), why)
    mode: Mode = "enforce"
    if "mode" in merged:
        mode = _mode(reader("mode"), merged["mode"], at("mode")) or "enforce"
    if "revision" in merged:
        rev = merged["revision"]
        if isinstance(rev, bool) or not isinstance(rev, str | int) or rev == "":
            reader("revision").problem(at("revision"), "expected a string, e.g. a commit")
        _revision_agrees(docs, origin["revision"])

    providers: dict[str, JwtProvider] = {}
    claim_headers: dict[bytes, str] = {}  # forward_claims header (folded) -> its provider
    for doc in docs:
        if "jwt_providers" in doc.top:
            for name, provider in _providers(doc, doc.top["jwt_providers"]).items():
                if name in providers:
                    continue
                providers[name] = provider
                _one_provider_per_claim_header(doc, name, provider, claim_headers)
    revocations = _list_parts(docs, "revocations", parse_revocations)
    api_keys = _list_parts(docs, "api_keys", parse_api_keys)
    _one_name_per_key(docs)
    rate_limits = _list_parts(docs, "rate_limits", parse_rate_limits)
    alerts = _list_parts(docs, "alerts", parse_alerts)
    key_names = {k.name for k in api_keys}
    # A raw api_keys entry that failed validation still defines its name, so that a typo in
    # one key does not cascade into "undefined key" errors in every rule using it.
    for doc in docs:
        key_names.update(n for n, _, _ in named_entries(doc, "api_keys") if n[:1] != "#")

    services: dict[str, ServicePolicy] = {}
    if "services" not in merged:
        first.r.problem(("services",), "missing key: services (a mapping of SPIFFE ID -> "
                        "section)")
    memo: ConditionsMemo = {}
    for identity, spec in merged.get("services", {}).items():
        doc, path = origin[f"services.{identity}"]
        svc = _service(doc.r, identity, spec, path, providers, key_names, doc.filename, memo)
        if svc is not None:
            services[identity] = svc

    problems = [p for doc in docs for p in doc.r.src.problems]
    if problems:
        raise ConfigError(_capped(problems))
    sections: Mapping[str, Section] = LazySections(services, trust_domain, mode)
    if only is not None:
        # A running sidecar: its section's tables are built here, in the reload thread,
        # never on the data path.
        sections = MappingProxyType({sid: sections[sid] for sid in services})
    extras = PolicyExtras(
        jwt_providers=providers, revocations=tuple(revocations), api_keys=api_keys,
        rate_limits=rate_limits, alerts=alerts,
    )
    every_claim_header = frozenset(header for provider in providers.values()
                                   for _, header in provider.forward_claims)
    if only is not None:
        extras = narrow_extras(extras, services.get(only))
    return Policy(
        version=set_version(docs), filename=label or first.filename, trust_domain=trust_domain,
        mode=mode, extras=extras, services=MappingProxyType(services),
        sections=sections, files=tuple(d.filename for d in docs),
        defined_in={k: doc.filename for k, (doc, _) in origin.items()
                    if not k.startswith("services.")},
        only=only, skipped=skipped, claim_headers=every_claim_header,
    )


def _revision_agrees(docs: list[PolicyFile], first: tuple[PolicyFile, P]) -> None:
    """With ``revision`` stated anywhere, every file states it: a file without it is a file
    of another (older) policy version, e.g. one ConfigMap not yet updated."""
    for doc in docs:
        if "revision" not in doc.top:
            doc.r.problem((), f"no revision here but revision {first[0].top['revision']!r} in "
                          f"{first[0].where(first[1])}: the files are not of one policy")


def _one_provider_per_claim_header(doc: PolicyFile, name: str, provider: JwtProvider,
                                   seen: dict[bytes, str]) -> None:
    """A ``forward_claims`` header set by two providers is a problem: a request carrying a
    valid token of each would reach the app with two values under one name, and which one
    the app reads depends on its framework (the route may have required only the other
    provider). One claim per header within a provider is the mapping's own rule. Names are
    compared as the header filter compares them, ``_`` read as ``-`` (``x-user`` and
    ``x_user`` are one variable to CGI, WSGI and PHP; found by a hostile review)."""
    mine: dict[bytes, str] = {}
    for claim, header in provider.forward_claims:
        key = fold(header)
        if key in mine:
            doc.r.problem(("jwt_providers", name, "forward_claims", claim),
                          f"header {header} already carries claim {mine[key]!r}")
            continue
        mine[key] = claim
        other = seen.setdefault(key, name)
        if other != name:
            doc.r.problem(("jwt_providers", name, "forward_claims", claim),
                          f"header {header} is already set by provider {other!r}: give each "
                          "provider its own claim headers")


def _providers(doc: PolicyFile, value: Any) -> dict[str, JwtProvider]:
    """One file's ``jwt_providers``, each checked by ``parse_provider``; relative files are
    resolved against that file's directory."""
    r = doc.r
    base_dir = os.path.dirname(os.path.abspath(doc.filename))
    providers: dict[str, JwtProvider] = {}
    for name, spec in (r.mapping(value, ("jwt_providers",), None) or {}).items():
        pp: P = ("jwt_providers", name)
        if not NAME.match(name):
            r.problem(pp, "invalid provider name")
            continue
        provider = parse_provider(r, name, spec, pp, base_dir)
        # A provider that failed validation still defines its name (placeholder; the error
        # is reported), so rules using it do not add "undefined provider" errors.
        providers[name] = provider if provider is not None else JwtProvider(name, "", (), ())
    return providers


def _one_name_per_key(docs: list[PolicyFile]) -> None:
    """A SHA-256 under two names in two files of a set is a problem of the later file, as
    within one file (``parse_api_keys``): the last name won (a hostile review)."""
    first: dict[str, tuple[PolicyFile, object]] = {}
    for doc in docs:
        entries = doc.top.get("api_keys")
        for i, item in enumerate(entries if isinstance(entries, list) else ()):
            digest = item.get("sha256") if isinstance(item, dict) else None
            if not isinstance(digest, str):
                continue
            name = item.get("name")
            seen = first.setdefault(digest.lower(), (doc, name))
            if seen[0] is not doc and seen[1] != name:
                doc.r.problem(("api_keys", i, "sha256"),
                              f"API key {name!r} has the same sha256 as API key {seen[1]!r} "
                              f"in {seen[0].filename}: one key has one name (retire a key by "
                              "removing or expiring its only entry)")


def _list_parts(docs: list[PolicyFile], key: str, parse: Any) -> tuple[Any, ...]:
    """Each file's ``key`` list parsed by its section parser, merged in file order; an entry
    repeated identically in another file counts once (a differing one is a merge conflict)."""
    out: dict[Any, Any] = {}
    for doc in docs:
        if key in doc.top:
            for item in parse(doc.r, doc.top[key], (key,)):
                out.setdefault(getattr(item, "name", item), item)
    return tuple(out.values())


def load_policy_set(paths: Sequence[str], *, only: str | None = None,
                    cache: ParsedFiles | None = None) -> Policy:
    """Read and load a policy from files and/or directories (see ``read_policy_set``).

    ``only=IDENTITY`` keeps just that identity's section and the mesh-wide parts it
    references; other sections are syntax-checked, never built (see the theory above).
    ``cache`` (a sidecar's reloads) skips parsing files unchanged since the last load.
    """
    with only_config_errors(policy_label(paths)):
        files = read_policy_set(paths)
    return load_policy_files(files, only=only, label=policy_label(paths), cache=cache)


def load_policy_file(path: str, *, only: str | None = None) -> Policy:
    """Read and load one policy file or directory; unreadable is a ``ConfigError`` naming it."""
    return load_policy_set([path], only=only)
