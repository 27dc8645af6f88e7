"""JSON documents written by other parties, read strictly. Pure: bytes in, a value out.

Theory of operation
-------------------
The control plane reads JSON that someone else wrote: JWKS key sets and OpenID metadata
(an identity provider, or whoever answers in its name), token introspection answers, and
AdmissionReviews (the API server, or anything that reaches the webhook port).
``read_json`` is the one reader all of them use, so that each refuses the same things, with
one ``JsonDocError`` (a ``ValueError``) whose message says what, for the log:

* bytes that are not UTF-8 (``json.loads(bytes)`` would also take UTF-16 and UTF-32);
* anything ``json`` refuses, a byte-order mark included;
* ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON; and a number no double holds
  (``1e400`` overflows to infinity, ``1e-400`` underflows to zero): found by a hostile
  review, a token claim ``1e400`` was read as ``inf`` and forwarded to the app as
  ``Infinity`` (not JSON), the same header as ``1e999``'s; ``0.0`` and ``1e-400`` another.
  In every spelling: an integer past the double range (``1`` and 400 zeros, 309 nines) is
  refused as ``1e400`` is (found by the next review: only the exponent spelling was, and
  ``10**400`` was forwarded as 401 digits that ``JSON.parse`` reads as ``Infinity``);
* an object naming a member twice: which copy wins differs between parsers, so a reader in
  front of us could have seen the other one; with ``fold_case`` (JWT headers and payloads),
  also two names that are one in another case (``role`` and ``ROLE``): Go's encoding/json
  takes the last such member for a struct field, .NET compares claim types ignoring case;
* nesting deeper than ``max_depth``: ``json`` itself stops only at the interpreter's
  recursion limit, and every later walk of the value (a deep copy, a patch, a dump) at a
  lower depth, with a ``RecursionError`` where a clean refusal belongs;
* a lone surrogate (``"\\ud800"``): no Unicode text, it cannot be written to a log line, a
  header or the audit trail as UTF-8.

Costs: one parse (a call per number, for its range), one walk of the containers for the
depth, and a dump only when the text holds a surrogate escape at all. None of this is on the
data path.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

DEFAULT_MAX_DEPTH = 32
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonDocError(ValueError):
    """A document ``read_json`` refuses; the message says why (for logs)."""


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise JsonDocError(f"member {name[:64]!r} appears twice in one object")
            seen.add(name)
    return out


def _members_one_case(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``_members``, and no two names that are one under case folding (``str.casefold``:
    ASCII case, and ``ſ``/``K`` that Go's encoding/json folds to ``s``/``k``)."""
    out = _members(pairs)
    if len(out) > 1:
        seen: dict[str, str] = {}
        for name in out:
            other = seen.setdefault(name.casefold(), name)
            if other is not name:
                raise JsonDocError(f"members {other[:64]!r} and {name[:64]!r} differ only in "
                                   "case in one object")
    return out


def _constant(name: str) -> Any:
    raise JsonDocError(f"{name} is not JSON")


_NONZERO_DIGIT = re.compile(r"[1-9]")


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused when no double holds it: one that
    overflows to an infinity (``1e400``), or a non-zero one that underflows to zero
    (``1e-400``): each would be another number to every later reader (the forwarded
    header, the policy's comparison) than the one the issuer wrote."""
    value = float(text)
    if not math.isfinite(value):
        raise JsonDocError(f"number {text[:32]} is out of range")
    if value == 0.0 and _NONZERO_DIGIT.search(text.partition("e")[0].partition("E")[0]):
        raise JsonDocError(f"number {text[:32]} underflows to zero")
    return value


# The most characters of an integer a double holds: ``sys.float_info.max`` has 309 digits
# (a sign and leading zeros aside, which JSON does not allow): a longer one is refused
# without converting it (``int`` refuses more than 4,300 digits anyway).
_MAX_INT_CHARS = 310


def _finite_int(text: str) -> int:
    """A JSON integer, refused when no double holds it: one that overflows to an infinity
    when read as a double (``float(int)`` raises exactly when ``float(text)`` is infinite:
    both round to nearest), as ``_finite_float`` refuses ``1e400``. ``JSON.parse`` reads
    every number as a double: ``10**400`` is ``Infinity`` there, the same value as
    ``10**401`` and as the ``1e400`` the reader refuses."""
    if len(text) > _MAX_INT_CHARS:
        raise JsonDocError(f"number {text[:32]}... ({len(text)} characters) is out of range")
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise JsonDocError(f"number {text[:32]}... is out of range") from None
    return value


def deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` (plain lists and dicts) nests deeper than ``limit`` levels; iterative,
    so any depth is measured (a YAML document is checked with it after loading)."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    # A node shared by several parents (YAML aliases) is walked again only when reached
    # deeper than before: nine levels of nine aliases each ("billion laughs", 900 bytes)
    # made a walk of every path, and `sidecar inject` spun for minutes (a hostile review).
    deepest: dict[int, int] = {}
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if deepest.get(id(node), 0) >= depth:
            continue
        deepest[id(node)] = depth
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def expanded_larger_than(value: Any, limit: int) -> bool:
    """Whether ``value`` holds more than ``limit`` values (lists, dicts and scalars, not
    counting keys) once every shared node (a YAML alias) is counted at each place it is
    used, as a JSON reader of the document sees it. Linear in the *distinct* nodes: each
    node's expanded size is computed once. Call it on a value ``deeper_than`` accepted (no
    cycles; a node still being counted is counted as one value).

    ``deeper_than`` walks a shared node once, but every walk of the document after it (the
    injector's checks, a diff) goes down each path: a 40 KB manifest of 3,000 aliases of a
    container whose env is 3,000 aliases of one entry (9 million entries) kept ``sidecar
    inject`` busy for a minute, ten times as many for hours (a hostile review)."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, dict | list):
            continue
        key = id(node)
        children = list(node.values()) if isinstance(node, dict) else node
        if not done:
            if key in sizes or key in visiting:
                continue
            visiting.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children
                         if isinstance(child, dict | list) and id(child) not in sizes)
            continue
        total = 1 + sum(sizes.get(id(child), 1) for child in children)
        if total > limit:
            return True
        sizes[key] = total
        visiting.discard(key)
    return False


def read_json(data: bytes | str, *, max_depth: int = DEFAULT_MAX_DEPTH,
              fold_case: bool = False) -> Any:
    """The value of one JSON document; ``JsonDocError`` for anything the module refuses.
    ``fold_case``: no object may name two members that differ only in case (JWTs)."""
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise JsonDocError("not UTF-8") from None
    else:
        text = data
    try:
        value = json.loads(text, object_pairs_hook=_members_one_case if fold_case else _members,
                           parse_constant=_constant, parse_float=_finite_float,
                           parse_int=_finite_int)
    except RecursionError:
        raise JsonDocError(f"nested deeper than {max_depth} levels") from None
    except JsonDocError:
        raise
    except ValueError as exc:
        raise JsonDocError(f"not JSON: {exc}") from None
    if deeper_than(value, max_depth):
        raise JsonDocError(f"nested deeper than {max_depth} levels")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JsonDocError("a string holds a lone surrogate") from None
    return value
