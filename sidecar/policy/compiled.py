"""Rules compiled into lookup tables, and the per-rule condition checks.

Theory of operation
-------------------
A decision must cost about the same with 10,000 rules as with 10, so rules are never
scanned one by one. At load time each service section splits its rules into a deny index
and an allow index. An index holds two segment tries:

* a *caller* trie over the segments of SPIFFE ID patterns (``spiffe://td/ns/shop/sa/*``
  -> ``td / ns / shop / sa / *``), plus the set of rules with no ``from`` (any caller);
* a *path* trie over path pattern segments (``*`` = one segment, ``**`` = the rest,
  including nothing), plus the set of rules with no ``paths`` (any path).

Each trie node keeps frozensets of rule numbers. Looking a request up walks the request's
segments (exact child, then the ``*`` child; ``**`` sets are collected on the way), giving
a handful of frozensets per trie. The candidates are the rules in (caller sets) AND (path
sets); intersecting starts from the smaller side, so a broad side (10,000 rules for one
caller) costs nothing when the other side is narrow. Only the few candidates then have
their remaining conditions (methods, ports, listeners, hosts, namespaces, JWT, API key)
checked, in file order.

``rule_trace`` is the plain, unindexed check of one rule, condition by condition. explain
uses it for its trail and the tests use it as the oracle that the indexed path must agree
with.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sidecar.http.request import split_host
from sidecar.identity.spiffe import id_segments, namespace_of
from sidecar.policy.decision import (
    REASON_APIKEY_MISSING,
    REASON_APIKEY_NOT_ALLOWED,
    REASON_CLAIMS_MISMATCH,
    REASON_TOKEN_INVALID,
    REASON_TOKEN_MISSING,
    AuthFacts,
    RequestFacts,
)
from sidecar.policy.model import (
    ClaimCondition,
    Conditions,
    EgressEntry,
    Mode,
    Rule,
)
from sidecar.policy.paths import (
    CASE_FOLD_EFFECTS,
    FORMAT_FOLD_EFFECTS,
    NAME_FOLD_EFFECTS,
    SCRIPT_FOLD_EFFECTS,
    allow_view,
    ascii_lower,
    path_segments,
    rule_forms,
    rule_path_forms,
    rule_segments,
    short_name_matches,
)

_MISSING = object()
# The id set of every node that ends no pattern: one shared object. Each node held two
# sets of its own (216 bytes each, empty or not): with the per-node dict, a section of
# 1,000 patterns of 4,000 segments took 2.8 GiB to load (found by a hostile review,
# session 28; the loader now also bounds a section's pattern segments).
_NO_IDS: frozenset[int] = frozenset()


class _Node:
    __slots__ = ("children", "star", "rest", "here")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.rest: Any = _NO_IDS  # rules whose pattern ends in '**' here (a set while built)
        self.here: Any = _NO_IDS  # rules whose pattern ends exactly here


class SegmentTrie:
    """Patterns of segments (``*`` = one segment, trailing ``**`` = zero or more) -> ids."""

    __slots__ = ("_root",)

    def __init__(self, entries: Iterable[tuple[tuple[str, ...], int]]) -> None:
        self._root = _Node()
        for segments, ident in entries:
            node = self._root
            for i, seg in enumerate(segments):
                if seg == "**" and i == len(segments) - 1:
                    if node.rest is _NO_IDS:
                        node.rest = set()
                    node.rest.add(ident)
                    break
                if seg == "*":
                    if node.star is None:
                        node.star = _Node()
                    node = node.star
                else:
                    node = node.children.setdefault(seg, _Node())
            else:
                if node.here is _NO_IDS:
                    node.here = set()
                node.here.add(ident)
        self._freeze(self._root)

    def _freeze(self, root: _Node) -> None:
        stack = [root]
        while stack:
            node = stack.pop()
            if node.rest is not _NO_IDS:
                node.rest = frozenset(node.rest)
            if node.here is not _NO_IDS:
                node.here = frozenset(node.here)
            stack.extend(node.children.values())
            if node.star is not None:
                stack.append(node.star)

    def match(self, segments: tuple[str, ...], short: bool = False) -> list[frozenset[int]]:
        """Every non-empty id set whose pattern matches ``segments``; with ``short``, a
        segment that is a Windows short name also matches the names it can stand for
        (``paths.short_name_matches``: deny rules of a ``path_case: insensitive`` section)."""
        out: list[frozenset[int]] = []
        n = len(segments)
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if node.rest:
                out.append(node.rest)
            if i == n:
                if node.here:
                    out.append(node.here)
                continue
            seg = segments[i]
            child = node.children.get(seg)
            if child is not None:
                stack.append((child, i + 1))
            if short and seg.find("~") >= 0:
                # (each node is reached once: a trie's node has one depth)
                stack.extend((other, i + 1) for key, other in node.children.items()
                             if key != seg and short_name_matches(seg, key))
            if node.star is not None:
                stack.append((node.star, i + 1))
        return out


def segments_match(pattern: tuple[str, ...], segments: tuple[str, ...],
                   short: bool = False) -> bool:
    """Unindexed pattern match, same semantics as ``SegmentTrie`` (``short`` too)."""
    for i, seg in enumerate(pattern):
        if seg == "**" and i == len(pattern) - 1:
            return True
        if i >= len(segments):
            return False
        if seg != "*" and seg != segments[i] and not (
                short and short_name_matches(segments[i], seg)):
            return False
    return len(pattern) == len(segments)


def peer_matches(pattern: str, peer: str | None) -> bool:
    """Does caller SPIFFE ID ``peer`` match ``pattern`` (``*`` = exactly one segment)?"""
    if peer is None:
        return False
    segs = id_segments(peer)
    pat = id_segments(pattern)
    return segs is not None and pat is not None and segments_match(pat, segs)


def path_pattern_segments(pattern: str, fold: bool = False, effect: str = "allow"
                          ) -> tuple[str, ...]:
    """Segments of a path pattern; like request paths, a trailing ``/`` is ignored (and, with
    ``fold``, for a ``path_case: insensitive`` section, ASCII case, and Windows names for a
    rule of ``effect`` deny: ``rule_segments``)."""
    return rule_segments(pattern, fold, effect)


def normalise_host(host: str) -> str:
    """Host header value for matching: lower-case, no port, no trailing dot, an IP literal
    in its one form (``split_host``: ``[0::1]`` is ``[::1]``, ``[::ffff:127.0.0.1]`` is
    ``127.0.0.1``). The value is read by ``sidecar.http.request.split_host``, the definition
    the data path refuses every other Host by (``bad_host``); a value it does not accept
    (only seen outside the data path, as in ``policy explain``) is returned lower-cased and
    stripped, whole. Results are kept (bounded): a request's Host is one of few values."""
    name = _NORMALISED.get(host)
    if name is not None:
        return name
    value = host.strip()
    parts = split_host(value)
    if parts is None:
        name = value.lower()
    elif parts[0].startswith("["):
        embedded = embedded_ipv4(parts[0])
        name = parts[0] if embedded is None else embedded_marker(embedded)
    else:
        name = parts[0].rstrip(".")
    if len(_NORMALISED) >= 256:
        _NORMALISED.clear()
    _NORMALISED[host] = name
    return name


_NORMALISED: dict[str, str] = {}

# IPv6 prefixes whose addresses carry an IPv4 address (found by a hostile review: a Host
# ``[64:ff9b::a00:1]`` or ``[::10.0.0.1]`` passed a deny rule for ``10.0.0.1``): NAT64's
# well-known prefix (RFC 6052, the IPv4 address in the last 32 bits of a /96), its local-use
# prefix (RFC 8215: the operator picks where the address sits, so which one it is cannot be
# told), 6to4 (RFC 3056: the site's IPv4 gateway in bits 16-47) and Teredo (RFC 4380: the
# client's IPv4 address, inverted, in the last 32 bits). IPv4-compatible addresses
# (``::a.b.c.d``, RFC 4291 2.5.5.1, deprecated) are ``::/96`` but ``::`` and ``::1``.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
# IPv4-translated (SIIT, RFC 2765: ``::ffff:0:a.b.c.d``) and ISATAP interface identifiers
# (RFC 5214: ``...:0:5efe:a.b.c.d`` or ``...:200:5efe:a.b.c.d`` under any /64).
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_ISATAP_IDS = (0x00005EFE, 0x02005EFE)
# What a Host that embeds an IPv4 address is compared as: never a host a rule can name
# (a space is in no host), so an allow rule never admits it; a deny rule naming the IPv4
# address also names this (``deny_hosts``). One whose IPv4 address cannot be told is
# denied by every deny rule that names an IPv4 address.
EMBEDDED_UNKNOWN = "an IPv4 address in an IPv6 literal"


def embedded_marker(ipv4: str) -> str:
    """The form a Host literal embedding ``ipv4`` is compared in (see ``EMBEDDED_UNKNOWN``)."""
    return f"{ipv4} in an IPv6 literal" if ipv4 else EMBEDDED_UNKNOWN


def embedded_ipv4(literal: str) -> str | None:
    """The IPv4 address an IPv6 literal (``[...]``, as ``split_host`` writes it) carries --
    NAT64, 6to4, Teredo, IPv4-compatible, IPv4-translated, ISATAP; ``""`` when it carries one that cannot be told
    (NAT64 local-use); None for every other address (IPv4-mapped ones never get here:
    ``split_host`` writes them as their IPv4 address)."""
    try:
        addr = ipaddress.IPv6Address(literal.strip("[]"))
    except ValueError:
        return None
    if (addr in _NAT64 or addr in _TRANSLATED or (addr in _COMPATIBLE and int(addr) > 1)
            or (int(addr) >> 32) & 0xFFFFFFFF in _ISATAP_IDS):
        return str(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr in _NAT64_LOCAL:
        return ""
    if addr.sixtofour is not None:
        return str(addr.sixtofour)
    if addr.teredo is not None:
        return str(addr.teredo[1])
    return None


def deny_hosts(hosts: frozenset[str]) -> frozenset[str]:
    """A deny rule's ``hosts`` with the forms a Host embedding one of its IPv4 addresses is
    compared in (``normalise_host``): the rule holds against ``[64:ff9b::a00:1]``,
    ``[::10.0.0.1]``, ``[2002:a00:1::]`` and the Teredo address of 10.0.0.1 as against
    ``10.0.0.1``. Load-time work: the request side compares one string, as before."""
    extra = {embedded_marker(h) for h in hosts if _is_ipv4(h)}
    return hosts | extra | {EMBEDDED_UNKNOWN} if extra else hosts


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


# --- claims ---------------------------------------------------------------------------

# At most this many dots in a claim name (the loader refuses more, naming file, line and key):
# a name of n dots has 2**n readings (``claim_readings``), each walked in the payload.
MAX_CLAIM_NAME_DOTS = 8


@lru_cache(maxsize=1024)
def _name_keys(name: str) -> tuple[tuple[tuple[int, str, str], ...], ...]:
    """For each segment position ``i`` of a dotted claim name, the keys a reading may take
    there: ``(j, ".".join(segments[i:j]), its case fold)`` for every ``j > i``, longest
    first. Load-time names only (a policy's), so the cache stays small."""
    segments = name.split(".")
    n = len(segments)
    return tuple(
        tuple((j, key, key.casefold()) for j in range(n, i, -1)
              for key in (".".join(segments[i:j]),))
        for i in range(n))


def _lookup(node: Mapping[str, Any], key: str, folded: str, wide: bool,
            folds: dict[int, dict[str, list[str]]]) -> list[Any]:
    """The members of ``node`` a reading takes for ``key``: the exact member, and with
    ``wide`` (deny rules) every member whose name is ``key`` in another case (``folds``: each
    object's names by case fold, built once per check)."""
    if not wide:
        return [node[key]] if key in node else []
    index = folds.get(id(node))
    if index is None:
        index = {}
        for member in node:
            if isinstance(member, str):
                index.setdefault(member.casefold(), []).append(member)
        folds[id(node)] = index
    return [node[member] for member in index.get(folded, ())]  # (the exact one among them)


def claim_readings(claims: Mapping[str, Any], name: str, wide: bool = False) -> list[Any]:
    """Every value the claim ``name`` can be read as in ``claims``.

    A dotted name is split at its dots into keys in every way that walks the payload's nested
    objects: ``a.b.c`` is the member ``a.b.c``, ``a`` -> ``b.c``, ``a.b`` -> ``c`` and
    ``a`` -> ``b`` -> ``c``. Found by a hostile review: the flat member ``realm_access.roles``
    shadowed the nested Keycloak claim an app reads, and a key holding a dot
    (``resource_access`` -> ``orders.example`` -> ``roles``) could not be named at all.
    With ``wide`` (a deny rule), each key is also matched in any case (``Role``, ``ROLE``:
    .NET compares claim types ignoring case, Go's encoding/json matches struct fields so).

    Bounded: each (object, position) pair is walked once, a name has at most
    ``MAX_CLAIM_NAME_DOTS`` dots, and a walk stops where no member has the next key.
    A name without a dot has one reading in an allow rule, read with one lookup (the
    common case costs what it did; ``claim_holds`` does not even come here for it)."""
    if not wide and name.find(".") < 0:
        return [claims[name]] if name in claims else []
    keys = _name_keys(name)
    end = len(keys)
    out: list[Any] = []
    folds: dict[int, dict[str, list[str]]] = {}
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Mapping[str, Any], int]] = [(claims, 0)]
    while stack:
        node, i = stack.pop()
        for j, key, folded in keys[i]:
            for child in _lookup(node, key, folded, wide, folds):
                if j == end:
                    out.append(child)
                elif isinstance(child, Mapping) and (id(child), j) not in seen:
                    seen.add((id(child), j))
                    stack.append((child, j))
    return out


# Names apps read as the same claim: a deny rule on any name of a group also tests the others
# (each a reading, names in any case, as ``claim_readings`` reads them with ``wide``). Found by
# a hostile review (session 30): deny ``scope: {contains: orders:delete}`` let
# ``"scp": "orders:delete"`` through. Only names a widely used framework reads as THE claim the
# group names, never look-alikes (``groups`` is not ``roles``: no framework cited reads one for
# the other). Allow rules never use them: they read the name they say.
CLAIM_ALIASES: dict[str, frozenset[str]] = {
    "scopes: Spring Security JwtGrantedAuthoritiesConverter (\"scope\", else \"scp\"); "
    "Microsoft.Identity.Web RequiredScope / ClaimConstants (\"scp\", else "
    "ClaimConstants.Scope, the URI); Okta and Entra ID issue \"scp\"": frozenset({
        "scope", "scp", "http://schemas.microsoft.com/identity/claims/scope"}),
    "roles: Microsoft.Identity.Web ClaimConstants.Roles (\"roles\", else ClaimConstants.Role, "
    "the URI); System.IdentityModel.Tokens.Jwt DefaultInboundClaimTypeMap (\"role\" and "
    "\"roles\" -> ClaimTypes.Role, the URI)": frozenset({
        "roles", "role", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"}),
    "email: System.IdentityModel.Tokens.Jwt DefaultInboundClaimTypeMap (\"email\" -> "
    "ClaimTypes.Email, the URI)": frozenset({
        "email", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress"}),
    "subject: System.IdentityModel.Tokens.Jwt DefaultInboundClaimTypeMap (\"sub\" -> "
    "ClaimTypes.NameIdentifier, the URI)": frozenset({
        "sub", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier"}),
}
_ALIASES_OF: dict[str, tuple[str, ...]] = {
    name.casefold(): tuple(sorted(group - {name}))
    for group in CLAIM_ALIASES.values() for name in group}


def deny_readings(claims: Mapping[str, Any], name: str) -> list[Any]:
    """A deny rule's readings of the claim ``name``: ``claim_readings`` with ``wide``, of the
    name and of each of its aliases (``CLAIM_ALIASES``; a dotted path has none)."""
    out = claim_readings(claims, name, True)
    for alias in _ALIASES_OF.get(name.casefold(), ()):
        out += claim_readings(claims, alias, True)
    return out


def _same(a: Any, b: Any) -> bool:
    # Python says True == 1; a policy that says `admin: true` must not accept `admin: 1`.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and bool(a == b)


def _reading_holds(cond: ClaimCondition, value: Any) -> bool:
    """An allow rule's test of one reading: strict (same type; a list never equals a
    string), and ``contains`` on a string splits it at SP only (RFC 6749 3.3)."""
    if cond.op == "equals":
        return _same(value, cond.values[0])
    if cond.op == "one_of":
        return any(_same(value, v) for v in cond.values)
    wanted = cond.values[0]
    if isinstance(value, list):
        return any(_same(item, wanted) for item in value)
    if isinstance(value, str) and isinstance(wanted, str):
        # RFC 6749 3.3: scope-tokens are delimited by SP (%x20) only. Splitting on any
        # whitespace (str.split()) would read "orders:read\tadmin" as two scopes.
        return wanted in value.split(" ")
    return False


# --- deny rules: a claim as loose readers read it ---------------------------------------
#
# A deny rule's test holds when any reading of the claim meets it, and a reading is what an
# app behind the sidecar may make of the value: the tables below are that class, as data
# (``tests/test_claim_readings_review29.py`` checks every member). Allow rules never use
# them (``_reading_holds``: strict, fail closed). Found by hostile reviews: session 28 (a
# number and a numeric string, ``"true"``/``"1"``), and session 29 (below: words of other
# boolean readers, JavaScript's own ``"1.0" == true``, underscores, leading-zero octal,
# leading-number prefixes, truncated fractions, truthiness; sets written with commas or
# semicolons or as an object's keys).

# Boolean words, compared stripped (``_loose_text``) and lower-cased: reader -> (words read
# as true, words read as false). Deny ``blocked: true`` let "t", "yes", "on" through, and
# ``email_verified: false`` "f", "off", "no" (session 29).
BOOL_WORDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "JSON / JavaScript (== on 1 and 0: numbers, below), .NET bool.Parse, Java parseBoolean":
        (frozenset({"true", "1"}), frozenset({"false", "0", ""})),
    "Go strconv.ParseBool": (frozenset({"1", "t", "true"}), frozenset({"0", "f", "false"})),
    "PHP filter_var FILTER_VALIDATE_BOOLEAN, Spring StringToBooleanConverter, Python "
    "configparser.getboolean": (frozenset({"1", "true", "on", "yes"}),
                                frozenset({"0", "false", "off", "no", ""})),
    "PostgreSQL boolean input (any unique prefix)": (
        frozenset({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"}),
        frozenset({"f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0"})),
    "Rails ActiveModel::Type::Boolean (its false words; it casts every other word to true)": (
        frozenset({"1", "t", "true", "y", "yes", "on"}), frozenset({"0", "f", "false", "off"})),
    "YAML 1.1 (PyYAML, Ruby Psych, SnakeYAML)": (
        frozenset({"y", "yes", "true", "on"}), frozenset({"n", "no", "false", "off"})),
    "Python distutils.util.strtobool": (
        frozenset({"y", "yes", "t", "true", "on", "1"}),
        frozenset({"n", "no", "f", "false", "off", "0"})),
}
_TRUE_WORDS: frozenset[str] = frozenset().union(*(t for t, _ in BOOL_WORDS.values()))
_FALSE_WORDS: frozenset[str] = frozenset().union(*(f for _, f in BOOL_WORDS.values()))
_LONGEST_WORD = max(map(len, _TRUE_WORDS | _FALSE_WORDS))
# Truthiness, besides the words: a number is true when it is not zero (``if
# claims["blocked"]``, PHP's ``2 == true``; a numeric string by its numbers, below: ``"1.0"``,
# ``"0x1"``, ``"2"`` are true, ``"0.0"``, ``"-0"`` false, as JavaScript's ``==`` reads them);
# null and an empty list or object are false (Python's and JavaScript's falsy values, PHP's
# ``null == false`` and ``[] == false``). Not taken: a non-empty string as true (Python's
# and JavaScript's truthiness, PHP's ``"no" == true``, Rails' cast of unknown words) -- the
# string's own word wins, or deny ``blocked: true`` would deny ``"false"``, as AWS Cognito
# writes every custom attribute; a non-empty list or object is read by its members.

# Numbers in a string: reader -> (the pattern it reads at the start of the stripped text,
# its base; 0: decimal with a fraction or exponent). A prefix reader stops where its pattern
# does (``"1001abc"`` is 1001: parseInt, PHP ``(int)``, MySQL against an integer column); a
# reader of the whole string reads one of these prefixes. Also read: the text with the
# underscores between digits left out (Python ``int()``/``float()``, Go ``ParseInt`` base 0:
# ``"1_001"``), with Unicode decimal digits as ASCII ones (Python ``int()``: ``"١٠٠١"``),
# and every fraction also truncated toward zero (Python ``int()``, parseInt, Go ``int(f)``,
# PHP ``(int)``: ``1001.5`` and ``"1001.5"`` are 1001 too).
NUMBER_READERS: dict[str, tuple[re.Pattern[str], int]] = {
    "decimal and exponent (JavaScript Number() and ==, parseFloat, PHP 8 numeric and "
    "leading-numeric strings, MySQL, Python float())":
        (re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"), 0),
    "leading integer (parseInt, PHP (int), C atoi, Python int())":
        (re.compile(r"[-+]?[0-9]+"), 10),
    "hexadecimal 0x (JavaScript, parseInt, Python int(s, 0), Go ParseInt base 0, strtol)":
        (re.compile(r"[-+]?0[xX][0-9a-fA-F]+"), 16),
    "binary 0b (JavaScript, Python int(s, 0), Go ParseInt base 0)":
        (re.compile(r"[-+]?0[bB][01]+"), 2),
    "octal 0o (JavaScript, Python int(s, 0), Go ParseInt base 0)":
        (re.compile(r"[-+]?0[oO][0-7]+"), 8),
    "octal by a leading zero (Go ParseInt base 0, C strtol base 0: \"01751\" is 1001)":
        (re.compile(r"[-+]?0[0-7]+"), 8),
}
# Significant digits past which an integer exceeds every double (so equals no test's
# value, a policy number having at most 100 characters): int() is not run on them.
_MAX_DIGITS = {10: 400, 16: 300, 8: 400, 2: 1100}
_UNDERSCORES = re.compile(r"(?<=[0-9A-Za-z])_(?=[0-9A-Za-z])")
# Sets a deny rule's ``contains`` reads in a string, besides words at any whitespace:
# comma- and semicolon-separated ones (``"user,admin"``, GitHub's and Facebook's scopes,
# Spring's ``setAuthoritiesClaimDelimiter(",")``, PHP ``explode(",")``) -- in a list's
# strings too (``["user,admin"]``). An object is read as the set of its keys
# (``{"admin": true}``: ``"admin" in roles``, PHP ``array_key_exists``).
SET_SEPARATORS = (",", ";")
# (The numeric form of a test's own string value: JavaScript's and PHP 8's whole numeric
# string, as the session-28 fix read it.)
_NUMERIC_TEXT = re.compile(
    r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+")
_RADIX = {"0x": 16, "0X": 16, "0b": 2, "0B": 2, "0o": 8, "0O": 8}


# Strings a deny rule's string values are also compared under: reading -> how it reads a
# string. Found by a hostile review (session 30): deny ``preferred_username: mallory`` let
# "MALLORY", "mallory ", "mallóry" and fullwidth "ｍａｌｌｏｒｙ" through, and ``email one_of
# [evil@attacker.example]`` "Evil@Attacker.Example", where the app behind compares them in a
# case- and accent-insensitive collation. Both sides are read (the test's values once, in
# ``_wanted``); a member meets the test when its reading equals a value's under the same
# reading. Allow rules compare exactly (``_same``).
def _folded(text: str) -> str:
    """NFKC, case folded, stripped: "MALLORY", "Mallory ", fullwidth "ｍａｌｌｏｒｙ" are
    "mallory"."""
    return _loose_text(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text)
                                             .casefold()))


def _unaccented(text: str) -> str:
    """``_folded``, then NFKD without its combining marks: "mallóry", "MALLÓRY" are
    "mallory"."""
    return "".join(c for c in unicodedata.normalize("NFKD", _folded(text))
                   if not unicodedata.combining(c))


STRING_READINGS: dict[str, Callable[[str], str]] = {
    "case and width (NFKC, casefold, surrounding white space stripped): MySQL's default "
    "utf8mb4_0900_ai_ci, SQL Server's default CI collations with PAD SPACE, sqlite COLLATE "
    "NOCASE, .NET StringComparison.OrdinalIgnoreCase, email domains (RFC 5321 2.4)": _folded,
    "accents too (NFKD without combining marks, after the above): MySQL utf8mb4_0900_ai_ci "
    "and SQL Server _AI collations, PostgreSQL unaccent, Elasticsearch asciifolding":
        _unaccented,
}


def _loose_text(value: str) -> str:
    """A string as loose readers see it: white space (JavaScript's, U+FEFF too) and NULs
    around it left out (PHP's ``trim`` and ``filter_var`` drop NUL; C stops at one)."""
    return value.replace("\ufeff", " ").replace("\x00", " ").strip()


def _strict_number(text: str) -> int | float | None:
    """A test's own string as a number (``"1001"``, ``" 0x3E9 "``), or None: the whole
    string, as JavaScript's ``Number()`` and PHP 8's numeric strings read it. Load-time
    values only (``_wanted``)."""
    text = _loose_text(text)
    if not text or len(text) > 128 or not _NUMERIC_TEXT.fullmatch(text):
        return None
    try:
        radix = _RADIX.get(text[:2])
        if radix:
            return int(text[2:], radix)
        if text.lstrip("+-").isdigit():
            return int(text)
        number = float(text)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _read_prefix(found: str, base: int) -> int | float | None:
    """One reader's number (``NUMBER_READERS``), or None when it exceeds every double."""
    if base == 0:
        if found.find(".") < 0 and found.find("e") < 0 and found.find("E") < 0:
            base = 10
        else:
            number = float(found)  # (linear in the text; overflow is inf)
            return number if math.isfinite(number) else None
    sign, digits = (found[0], found[1:]) if found[0] in "+-" else ("", found)
    if base != 10 and digits[1:2].isalpha():
        digits = digits[2:]  # (0x, 0b, 0o)
    digits = digits.lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS[base]:
        return None
    number = int(digits, base)
    return -number if sign == "-" else number


def _text_numbers(text: str) -> list[int | float]:
    """Every number a reader of ``NUMBER_READERS`` may read a stripped, non-empty string
    as, fractions also truncated. Linear in the text: each pattern is matched once at its
    start (no backtracking past a prefix), and int() runs on at most ``_MAX_DIGITS``."""
    texts = [text]
    if not text.isascii():  # (Python's int() reads every Unicode decimal digit)
        texts.append("".join(str(unicodedata.decimal(c)) if c.isdecimal() else c
                             for c in text))
    if text.find("_") >= 0:
        texts += [_UNDERSCORES.sub("", t) for t in texts]
    out: list[int | float] = []
    for each in texts:
        for pattern, base in NUMBER_READERS.values():
            found = pattern.match(each)
            if found is None:
                continue
            number = _read_prefix(found.group(), base)
            if number is None:
                continue
            out.append(number)
            if isinstance(number, float) and not number.is_integer():
                out.append(math.trunc(number))
    return out


def _number_readings(value: Any) -> list[int | float]:
    """Every number a claim value may be read as (a blank string: 0, as JavaScript's
    ``==``; callers that must not take that look first)."""
    if isinstance(value, bool):
        return [1 if value else 0]
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        return [value] if value.is_integer() else [value, math.trunc(value)]
    if isinstance(value, str):
        text = _loose_text(value)
        return _text_numbers(text) if text else [0]
    return []


def _flags(value: Any) -> set[bool]:
    """Every boolean a claim value may be read as: its word in ``BOOL_WORDS``, its numbers
    by truthiness, null and an empty list or object as false (see above)."""
    if isinstance(value, bool):
        return {value}
    if value is None:
        return {False}
    if isinstance(value, int | float | str):
        out = {n != 0 for n in _number_readings(value)}
        if isinstance(value, str):
            word = _loose_text(value)
            if len(word) <= _LONGEST_WORD:
                word = word.lower()
                if word in _TRUE_WORDS:
                    out.add(True)
                if word in _FALSE_WORDS:
                    out.add(False)
        return out
    if isinstance(value, list | Mapping) and not value:
        return {False}
    return set()


@dataclass(frozen=True, slots=True)
class _Numbers:
    """Numbers a reading is compared with: exactly, or as doubles (JavaScript's reading:
    ``1234567890123456789 == 1234567890123456800``, integers past 2**53)."""

    exact: frozenset[int | float]
    doubles: frozenset[float]

    @classmethod
    def of(cls, numbers: Iterable[int | float]) -> _Numbers:
        exact = frozenset(numbers)
        doubles = set()
        for n in exact:
            try:
                doubles.add(float(n))
            except OverflowError:
                pass
        return cls(exact, frozenset(doubles))

    def has(self, readings: Iterable[int | float]) -> bool:
        for n in readings:
            if n in self.exact:
                return True
            try:
                if float(n) in self.doubles:
                    return True
            except OverflowError:
                continue
        return False


@dataclass(frozen=True, slots=True)
class _Wanted:
    """A deny test's values, read once (``_wanted``): ``strings`` compared exactly;
    ``flags``, the test's booleans, which a value read as one of them (``_flags``) meets;
    ``for_flags``, what a boolean claim meets -- the booleans, a number 1 or 0, a string
    that is a word of ``BOOL_WORDS`` or a number 1 or 0; ``for_numbers``, what a number
    claim's readings are compared with -- the test's numbers and numeric strings, 0 for a
    blank string (JavaScript's ``0 == ""``); ``for_texts``, a non-blank string's -- the
    numbers and numeric strings (PHP 8 compares two numeric strings as numbers);
    ``for_blank``, a blank string's -- the numbers only; ``readings``, the strings under each
    of ``STRING_READINGS``."""

    strings: frozenset[str]
    flags: frozenset[bool]
    for_flags: frozenset[bool]
    for_numbers: _Numbers
    for_texts: _Numbers
    for_blank: _Numbers
    # The test's strings under each of ``STRING_READINGS`` (in its order); empty without
    # strings.
    readings: tuple[frozenset[str], ...] = ()


@lru_cache(maxsize=4096)
def _wanted_of(typed: tuple[tuple[type, Any], ...]) -> _Wanted:
    values = [v for _, v in typed]
    flags = {v for v in values if isinstance(v, bool)}
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    strings = [v for v in values if isinstance(v, str)]
    numeric = [n for n in map(_strict_number, strings) if n is not None]
    blank = any(not _loose_text(s) for s in strings)
    for_flags = set(flags)
    for n in [*numbers, *numeric]:
        if n in (0, 1):
            for_flags.add(n == 1)
    for s in strings:
        word = _loose_text(s).lower()
        if word in _TRUE_WORDS:
            for_flags.add(True)
        if word in _FALSE_WORDS:
            for_flags.add(False)
    return _Wanted(frozenset(strings), frozenset(flags), frozenset(for_flags),
                   _Numbers.of([*numbers, *numeric, *([0] if blank else [])]),
                   _Numbers.of([*numbers, *numeric]), _Numbers.of(numbers),
                   tuple(frozenset(map(read, strings)) for read in STRING_READINGS.values())
                   if strings else ())


def _wanted(values: tuple[Any, ...]) -> _Wanted:
    """``_Wanted`` of a test's values (policy values: cached, keyed with each value's type,
    as ``True == 1`` and ``1 == 1.0`` would share an entry)."""
    return _wanted_of(tuple((type(v), v) for v in values))


def _member_denies(member: Any, wanted: _Wanted) -> bool:
    """Does one member of a claim (the value, a list's element, an object's key, a word)
    meet a deny test's values under any reading (``BOOL_WORDS``, truthiness,
    ``NUMBER_READERS``, ``STRING_READINGS``)?"""
    if isinstance(member, str):
        if member in wanted.strings:
            return True
        for read, values in zip(STRING_READINGS.values(), wanted.readings, strict=False):
            if read(member) in values:
                return True
    if isinstance(member, bool):
        return member in wanted.for_flags
    if wanted.flags and not wanted.flags.isdisjoint(_flags(member)):
        return True
    if isinstance(member, int | float):
        return wanted.for_numbers.has(_number_readings(member))
    if isinstance(member, str) and wanted.for_texts.exact:
        text = _loose_text(member)
        if not text:
            return wanted.for_blank.has((0,))
        return wanted.for_texts.has(_text_numbers(text))
    return False


def _words(text: str) -> list[str]:
    """A string's members for a deny rule's ``contains``: split at any whitespace (Python's
    ``str.split()``, Go's ``strings.Fields``) and at ``SET_SEPARATORS``."""
    for sep in SET_SEPARATORS:
        if text.find(sep) >= 0:
            text = text.replace(sep, " ")
    return text.split()


def _equal_members(value: Any) -> Iterator[Any]:
    """What a deny rule's ``equals``/``one_of`` compares: the value, a list's elements
    (``"role": ["user", "banned"]``: Istio and apps match any element) and an object's keys
    (the same set written as ``{"banned": true}``). One level: ``[["banned"]]`` is not."""
    yield value
    if isinstance(value, list | Mapping):
        yield from value


def _set_members(value: Any) -> Iterator[Any]:
    """What a deny rule's ``contains`` looks in: a list's elements and the words of those
    that are strings, an object's keys, a string's words (``_words``), a number or boolean
    as a set of one."""
    if isinstance(value, str):
        yield from _words(value)
    elif isinstance(value, list):
        for item in value:
            yield item
            if isinstance(item, str):
                yield from _words(item)
    elif isinstance(value, Mapping):
        yield from value
    elif value is not None:
        yield value


def _reading_denies(cond: ClaimCondition, value: Any) -> bool:
    """A deny rule's test of one reading: as an allow rule's, and also on every member of
    the value (``_equal_members``, ``_set_members``) under every reading of it
    (``_member_denies``). Linear in the value: each member is read once, whatever the
    number of the test's values (``_wanted`` sets them up once)."""
    if _reading_holds(cond, value):
        return True
    wanted = _wanted(cond.values)
    members = _set_members(value) if cond.op == "contains" else _equal_members(value)
    return any(_member_denies(member, wanted) for member in members)


def claim_holds(cond: ClaimCondition, claims: Mapping[str, Any], deny: bool = False) -> bool:
    """Does one claim condition hold for verified ``claims``?

    An allow rule's (``deny`` false) holds only when the claim has a reading
    (``claim_readings``) and every reading meets the test strictly: two readings that
    disagree do not allow. A deny rule's holds when any reading, names matched in any case,
    meets the wider test (``_reading_denies``), and the claim's aliases (``CLAIM_ALIASES``)
    are read too (``deny_readings``): a deny rule denies under every way an app behind may
    read the token (the readings are data: ``BOOL_WORDS``, ``NUMBER_READERS``,
    ``SET_SEPARATORS``, ``STRING_READINGS``, ``CLAIM_ALIASES``, and truthiness)."""
    if not deny and cond.claim.find(".") < 0:  # (an allow rule's plain name: one lookup)
        value = claims.get(cond.claim, _MISSING)
        return value is not _MISSING and _reading_holds(cond, value)
    if deny:
        return any(_reading_denies(cond, v) for v in deny_readings(claims, cond.claim))
    values = claim_readings(claims, cond.claim)
    return bool(values) and all(_reading_holds(cond, v) for v in values)


# --- one rule, condition by condition -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConditionResult:
    """One condition of one rule, and whether it held for the request."""

    name: str
    held: bool
    detail: str


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """Result of a rule's credential conditions: ok, or a reason and status."""

    ok: bool
    reason: str = ""
    status: int = 0


AUTH_OK = AuthOutcome(True)


def _paths_hold(patterns: tuple[str, ...], path: str, fold_case: bool, effect: str,
                formats: bool, deny_case: bool = False) -> bool:
    """Does one of a rule's path ``patterns`` match the request ``path``: for a deny rule in
    any of its folded forms (``rule_path_forms``, Windows short names), for an allow rule
    as sent and, where ASP.NET would route it as another path, as that too (``allow_view``).
    """
    lower = deny_case and not fold_case and effect in CASE_FOLD_EFFECTS
    if lower:  # (``paths.CASE_FOLD_EFFECTS``: a section that does not say ``path_case``)
        path = ascii_lower(path)
        patterns = tuple(ascii_lower(p) for p in patterns)
    forms = rule_path_forms(path, fold_case, effect, formats)
    short = fold_case and effect in NAME_FOLD_EFFECTS
    # (every form of every pattern, as ``RuleIndex`` indexes them: ``rule_forms``)
    pats = [segs for p in patterns for segs in rule_forms(p, fold_case, effect)]
    if not any(segments_match(pat, segs, short) for pat in pats for segs in forms):
        return False
    view = allow_view(path, fold_case) if effect not in NAME_FOLD_EFFECTS else None
    return view is None or any(segments_match(pat, view) for pat in pats)


def request_trace(
    when: Conditions, facts: RequestFacts, trust_domain: str, check_indexed: bool = True,
    fold_case: bool = False, effect: str = "allow", formats: bool = False,
    deny_case: bool = False,
) -> list[ConditionResult]:
    """Every non-credential condition of a rule, checked against the request.

    With ``check_indexed=False`` the caller and path conditions are skipped (the index
    already proved them for candidates). ``fold_case``: the section matches paths with
    ASCII case folded, and Windows names for deny rules (``effect``: the rule's);
    ``formats``: deny rules also match the path without its format suffix
    (``rule_path_forms``).
    """
    out: list[ConditionResult] = []
    if check_indexed and when.peers is not None:
        held = any(peer_matches(p, facts.peer) for p in when.peers)
        out.append(ConditionResult("from", held, f"caller {facts.peer} in {list(when.peers)}"))
    if when.namespaces is not None:
        ns = namespace_of(facts.peer, trust_domain) if facts.peer else None
        out.append(
            ConditionResult(
                "namespaces", ns in when.namespaces, f"namespace {ns} in {sorted(when.namespaces)}"
            )
        )
    if when.methods is not None:
        out.append(
            ConditionResult(
                "methods", facts.method in when.methods, f"{facts.method} in {sorted(when.methods)}"
            )
        )
    if check_indexed and when.paths is not None:
        held = _paths_hold(when.paths, facts.path, fold_case, effect, formats, deny_case)
        out.append(ConditionResult("paths", held, f"{facts.path} in {list(when.paths)}"))
    if when.ports is not None:
        out.append(
            ConditionResult("ports", facts.port in when.ports, f"{facts.port} in {sorted(when.ports)}")
        )
    if when.listeners is not None:
        out.append(
            ConditionResult(
                "listeners",
                facts.listener in when.listeners,
                f"{facts.listener!r} in {sorted(when.listeners)}",
            )
        )
    if when.hosts is not None:
        host = normalise_host(facts.host)
        out.append(ConditionResult("hosts", host in when.hosts, f"{host} in {sorted(when.hosts)}"))
    return out


def request_holds(
    when: Conditions, facts: RequestFacts, trust_domain: str, check_indexed: bool = True,
    fold_case: bool = False, effect: str = "allow", formats: bool = False,
    deny_case: bool = False,
) -> bool:
    """Fast form of ``request_trace``: do all non-credential conditions hold?"""
    if when.methods is not None and facts.method not in when.methods:
        return False
    if when.ports is not None and facts.port not in when.ports:
        return False
    if when.listeners is not None and facts.listener not in when.listeners:
        return False
    if when.hosts is not None and normalise_host(facts.host) not in when.hosts:
        return False
    if when.namespaces is not None:
        if not facts.peer or namespace_of(facts.peer, trust_domain) not in when.namespaces:
            return False
    if check_indexed:
        if when.peers is not None and not any(peer_matches(p, facts.peer) for p in when.peers):
            return False
        if when.paths is not None:
            if not _paths_hold(when.paths, facts.path, fold_case, effect, formats, deny_case):
                return False
    return True


def has_request_conditions(when: Conditions) -> bool:
    """Does a rule name something only a request has -- ``methods``, ``paths``, ``hosts``,
    ``jwt``, ``apikey``? An ALLOW rule that does never matches an opaque (TCP) stream."""
    return (when.methods is not None or when.paths is not None or when.hosts is not None
            or when.jwt is not None or when.apikey is not None)


def stream_holds(when: Conditions, facts: RequestFacts, trust_domain: str) -> bool:
    """Do a DENY rule's conditions hold for an opaque (TCP) stream? Only those a stream
    has: callers (``from``, ``namespaces``), ``ports`` and ``listeners``. Its request
    conditions (``methods``, ``paths``, ``hosts``) and credential conditions (``jwt``,
    ``apikey``) are left out, so the rule denies more, never less: a stream could carry
    exactly the request the rule denies (as Istio applies DENY rules to TCP traffic).
    An ALLOW rule with such conditions never matches a stream (``request_holds``)."""
    if when.ports is not None and facts.port not in when.ports:
        return False
    if when.listeners is not None and facts.listener not in when.listeners:
        return False
    if when.namespaces is not None:
        if not facts.peer or namespace_of(facts.peer, trust_domain) not in when.namespaces:
            return False
    return when.peers is None or any(peer_matches(p, facts.peer) for p in when.peers)


def auth_outcome(when: Conditions, auth: AuthFacts, deny: bool = False) -> AuthOutcome:
    """Credential conditions (JWT and claims, API key) of a rule against verified facts.

    Order matters for the status: a missing/invalid token is 401 (credentials could fix
    it); a valid token with the wrong claims is 403. ``deny``: the rule is a deny rule, whose
    claim tests hold under any reading of the claims (``claim_holds``).
    """
    if when.jwt is not None:
        claims = auth.claims.get(when.jwt.provider)
        if claims is None:
            if when.jwt.provider in auth.token_errors:
                return AuthOutcome(False, REASON_TOKEN_INVALID, 401)
            return AuthOutcome(False, REASON_TOKEN_MISSING, 401)
        for cond in when.jwt.claims:
            if not claim_holds(cond, claims, deny):
                return AuthOutcome(False, REASON_CLAIMS_MISMATCH, 403)
    if when.apikey is not None:
        if auth.apikey is None:
            return AuthOutcome(False, REASON_APIKEY_MISSING, 401)
        if isinstance(when.apikey, frozenset) and auth.apikey not in when.apikey:
            return AuthOutcome(False, REASON_APIKEY_NOT_ALLOWED, 403)
    return AUTH_OK


def auth_trace(when: Conditions, auth: AuthFacts, deny: bool = False) -> list[ConditionResult]:
    """Credential conditions one by one, for explain (``deny``: as ``auth_outcome``'s, so
    the trail shows the decision the engine makes)."""
    out: list[ConditionResult] = []
    if when.jwt is not None:
        p = when.jwt.provider
        claims = auth.claims.get(p)
        if claims is None:
            why = f"token invalid ({auth.token_errors[p]})" if p in auth.token_errors else "no token"
            out.append(ConditionResult("jwt", False, f"provider {p}: {why}"))
        else:
            out.append(ConditionResult("jwt", True, f"provider {p}: valid token"))
            for cond in when.jwt.claims:
                values = (deny_readings(claims, cond.claim) if deny
                          else claim_readings(claims, cond.claim))
                shown = ("missing" if not values else repr(values[0]) if len(values) == 1
                         else "readings " + ", ".join(map(repr, values)))
                out.append(
                    ConditionResult(
                        "claim", claim_holds(cond, claims, deny),
                        f"{cond.describe()} (token: {shown})"
                    )
                )
    if when.apikey is not None:
        names = when.apikey if isinstance(when.apikey, frozenset) else None
        wanted = "any key" if names is None else sorted(names)
        held = auth.apikey is not None and (names is None or auth.apikey in names)
        out.append(ConditionResult("apikey", held, f"key {auth.apikey} for {wanted}"))
    return out


# --- the index ------------------------------------------------------------------------


class RuleIndex:
    """Rules of one ``effect`` in one section, looked up by caller and path (with
    ``fold_case``, ASCII case folded on both sides, and Windows names for deny rules:
    ``rule_segments``; with ``deny_case``, a section that does not say ``path_case``, ASCII
    case folded on both sides for deny rules: ``paths.CASE_FOLD_EFFECTS``)."""

    __slots__ = ("rules", "_peers", "_any_peer", "_paths", "_any_path", "_fold", "_names",
                 "_effect", "_formats", "_forms", "_short", "_lower")

    def __init__(self, rules: tuple[Rule, ...], fold_case: bool = False,
                 effect: str = "allow", formats: bool = False,
                 deny_case: bool = False) -> None:
        self.rules = rules
        self._fold = fold_case
        self._lower = deny_case and not fold_case and effect in CASE_FOLD_EFFECTS
        self._names = effect in NAME_FOLD_EFFECTS  # (chosen once: a lookup costs the same)
        self._effect = effect
        self._formats = formats and effect in FORMAT_FOLD_EFFECTS  # (``rule_path_forms``)
        self._forms = self._formats or effect in SCRIPT_FOLD_EFFECTS
        self._short = fold_case and self._names  # (Windows short names: deny rules)
        peer_entries: list[tuple[tuple[str, ...], int]] = []
        path_entries: list[tuple[tuple[str, ...], int]] = []
        any_peer: set[int] = set()
        any_path: set[int] = set()
        for number, rule in enumerate(rules):
            if rule.when.peers is None:
                any_peer.add(number)
            else:
                for pattern in rule.when.peers:
                    segs = id_segments(pattern)
                    assert segs is not None  # the loader only lets SPIFFE IDs through
                    peer_entries.append((segs, number))
            if rule.when.paths is None:
                any_path.add(number)
            else:
                for pattern in rule.when.paths:
                    if self._lower:
                        pattern = ascii_lower(pattern)
                    # (a deny pattern of a fold section holding a cookieless value is
                    # indexed as written and as ASP.NET reads it: ``rule_forms``)
                    path_entries.extend((segs, number)
                                        for segs in rule_forms(pattern, fold_case, effect))
        self._peers = SegmentTrie(peer_entries)
        self._any_peer = frozenset(any_peer)
        self._paths = SegmentTrie(path_entries)
        self._any_path = frozenset(any_path)

    def candidates(self, peer: str | None, path: str) -> list[Rule]:
        """Rules whose caller and path conditions hold, in file order."""
        if not self.rules:
            return []
        peer_sets: list[frozenset[int]] = []
        if self._any_peer:
            peer_sets.append(self._any_peer)
        segs = id_segments(peer) if peer else None
        if segs is not None:
            peer_sets.extend(self._peers.match(segs))
        if not peer_sets:
            return []
        if self._lower:
            path = ascii_lower(path)
        if self._forms and (path.find(".") >= 0 or (self._short and path.find("(") >= 0)):
            # (deny: a format suffix, a PHP script; in a fold section, a cookieless value:
            # the path as sent and as ASP.NET reads it, ``rule_forms``)
            path_sets = [ids for segs in rule_path_forms(path, self._fold, self._effect,
                                                         self._formats)
                         for ids in self._paths.match(segs, self._short)]
        else:
            path_sets = self._paths.match(path_segments(path, self._fold, self._names),
                                          self._short)
        view = allow_view(path, self._fold) if not self._names else None
        if view is not None:  # (allow: ASP.NET's reading must be allowed too)
            also = {n for ids in self._paths.match(view) for n in ids}
            path_sets = [frozenset(also.intersection(ids)) for ids in path_sets]
        if self._any_path:
            path_sets.append(self._any_path)
        if not path_sets:
            return []
        small, big = peer_sets, path_sets
        if sum(map(len, small)) > sum(map(len, big)):
            small, big = big, small
        found: set[int] = set()
        for ids in small:
            for number in ids:
                if number not in found and any(number in other for other in big):
                    found.add(number)
        return [self.rules[n] for n in sorted(found)]


@dataclass(frozen=True, eq=False)
class Section:
    """The compiled part of the policy that one workload identity enforces.

    ``providers``: JWT providers referenced by this section's rules (the data path verifies
    only those tokens). ``needs_apikey``: some rule tests an API key. ``fold_case``: paths
    match with ASCII case folded, and Windows names for deny rules (``path_case:
    insensitive``; ``rule_segments``). ``refuse_invalid_tokens``:
    a token no provider accepted is refused before any rule (``invalid_tokens: refuse``).
    """

    identity: str
    trust_domain: str
    mode: Mode
    rules: tuple[Rule, ...]
    deny: RuleIndex
    allow: RuleIndex
    egress: tuple[EgressEntry, ...]
    egress_trie: SegmentTrie
    providers: tuple[str, ...]
    needs_apikey: bool
    fold_case: bool = False
    by_name: Mapping[str, Rule] = field(default_factory=dict)  # rule names are unique
    refuse_invalid_tokens: bool = True
    fold_formats: bool = True  # deny rules fold format suffixes (``format_suffixes``)
    deny_case: bool = False  # no ``path_case``: deny rules fold ASCII case (CASE_FOLD_EFFECTS)

    def egress_match(self, target: str) -> EgressEntry | None:
        """The first egress entry (file order) that allows calling ``target``."""
        segs = id_segments(target)
        if segs is None:
            return None
        hits = self.egress_trie.match(segs)
        if not hits:
            return None
        return self.egress[min(min(h) for h in hits)]


def compile_section(
    identity: str, trust_domain: str, mode: Mode, rules: tuple[Rule, ...],
    egress: tuple[EgressEntry, ...], fold_case: bool = False,
    refuse_invalid_tokens: bool = True, fold_formats: bool = True,
    deny_case: bool = False,
) -> Section:
    """Build the lookup tables of one section (load time, never per request)."""
    # An ordered tuple (the order in which the rules first name them), never a set: the
    # authenticator verifies in this order, and with no deciding rule's provider the audit
    # record and the per-subject limit take the first verified one (a set's order followed
    # the process's hash seed: the same request was another user's in another process).
    providers = tuple(dict.fromkeys(
        r.when.jwt.provider for r in rules if r.when.jwt is not None))
    egress_entries: list[tuple[tuple[str, ...], int]] = []
    for number, entry in enumerate(egress):
        segs = id_segments(entry.pattern)
        assert segs is not None
        egress_entries.append((segs, number))
    return Section(
        identity=identity,
        trust_domain=trust_domain,
        mode=mode,
        rules=rules,
        deny=RuleIndex(tuple(r for r in rules if r.effect == "deny"), fold_case, "deny",
                       fold_formats, deny_case),
        allow=RuleIndex(tuple(r for r in rules if r.effect == "allow"), fold_case, "allow"),
        egress=egress,
        egress_trie=SegmentTrie(egress_entries),
        providers=providers,
        needs_apikey=any(r.when.apikey is not None for r in rules),
        fold_case=fold_case,
        by_name={r.name: r for r in rules},
        # Only where the rules name providers: elsewhere no token is ever verified.
        refuse_invalid_tokens=refuse_invalid_tokens and bool(providers),
        fold_formats=fold_formats,
        deny_case=deny_case,
    )
