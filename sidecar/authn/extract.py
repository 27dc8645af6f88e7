"""Finding a provider's token in a request, and removing it before forwarding. Pure.

A provider lists where its token may be (``TokenLocation``: a header with a prefix such as
``Bearer ``, a query parameter, or a cookie). Ambiguity is refused, never resolved by a
rule of thumb - which copy a parser picks is exactly what request-smuggling attacks play
on:

* the same location present twice (two ``Authorization`` headers, ``?access_token=`` twice,
  a cookie set twice) -> ``TokenInvalid("multiple_tokens")``, even if the copies are equal;
* two locations carrying *different* tokens (header + query...) -> ``multiple_tokens``;
  the same token in two locations is one token.

A header that is present without the provider's prefix (``Authorization: Basic ...``) is not
this provider's token; the header itself still counts towards "present twice".

RFC 6750 places no provider of a section reads (``Guards``): the ``access_token`` query
parameter (in every spelling ``param_names`` reads) and ``Authorization`` under a scheme that
carries a token (``TOKEN_SCHEMES``, or any scheme -- or none -- whose credential has the
shape of a JWT). A token there is not accepted (no provider was configured to read it), but
it counts: alone it is refused (``unread_location``), next to a provider's own token it is a
second token (``multiple_tokens``) unless it is the same one. Before (found by a hostile
review), such a token reached the app unverified: an app or framework that reads RFC 6750
query tokens got a credential the sidecar never checked. So does a copy (``copies``): a JWT
of one of the section's issuers (its payload, read unverified, names one) in any other
header, cookie or query parameter no provider reads (``X-Auth-Token``, a ``jwt`` cookie,
``?token=``; found by a later hostile review), and a segment of the request's path
(``/dl/<jwt>``; since the twenty-fourth session). A value encoded whole as base64 or
base64url (behind a prefix of ``BASE64_PREFIXES`` or none) is read decoded, and cookies
chunked as ``<name>.0``, ``<name>.1``... are read joined (session 30: a forged token in
@supabase/ssr's ``base64-`` session cookie reached the app).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import NamedTuple
from urllib.parse import unquote_plus, unquote_to_bytes

from sidecar import atomic_re
from sidecar.authn.jwt import (
    BEFORE_OBJECT,
    MALFORMED,
    MULTIPLE_TOKENS,
    TokenInvalid,
    issuers_named,
    lenient_part,
    payload_names,
)
from sidecar.http.request import METHOD_OVERRIDE_PARAMS
from sidecar.http.untrusted import fold
from sidecar.policy.sections import JwtProvider, TokenLocation

Headers = Sequence[tuple[bytes, bytes]]
COOKIE = b"cookie"


class FoundToken(NamedTuple):
    """A token and every location it was found in (to strip them when not forwarded)."""

    token: str
    locations: tuple[TokenLocation, ...]


# FoundToken from its two fields, without the named tuple's Python-level ``__new__``.
_found: Callable[[tuple[str, tuple[TokenLocation, ...]]], FoundToken] = functools.partial(
    tuple.__new__, FoundToken)


@functools.lru_cache(maxsize=256)
def header_name(name: str) -> bytes:
    """A header location's name as the reader gives header names (lower-case bytes)."""
    return name.lower().encode("latin-1")


@functools.lru_cache(maxsize=256)
def _prefix_forms(prefix: str) -> tuple[int, str, str]:
    """A location's prefix as compared: its length, lower-cased, and lower-cased without
    surrounding whitespace (per prefix, not per request)."""
    return len(prefix), prefix.lower(), prefix.strip().lower()


# Optional whitespace around a field value or between scheme and token: SP and HTAB only
# (RFC 9110 5.6.3). ``str.strip()`` would also drop NBSP (0xA0), NEL (0x85) and 0x1C-0x1F,
# which are part of a value: "<token>\xa0" was verified as "<token>" while the app got
# the header with the byte still in it.
OWS = " \t"
# The characters of an auth-scheme (RFC 9110 ``token``): a scheme word ends at any other.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _scheme_badly_separated(value: str, lower: str, bare: str) -> bool:
    """``Bearer\t<token>``, ``Bearer\xa0<token>``, ``\xa0Bearer <token>``,
    ``Bearer,<token>``: the provider's scheme word, set off by something other than the SP
    its prefix asks for. An app splitting on any whitespace reads the token: it is this
    provider's token, malformed, not "no token" (only for prefixes that end in whitespace,
    like ``Bearer ``; only asked when the value does not start with the prefix)."""
    end = len(bare)
    if lower == bare or not end:
        return False
    if len(value) > end and value[end] not in _TCHAR and value[:end].lower() == bare:
        return True
    words = value.split(None, 1)
    return bool(words) and words[0].lower() == bare


def _from_header(loc: TokenLocation, headers: Headers) -> list[str]:
    name = header_name(loc.name)
    raw = None
    for n, v in headers:  # (a plain loop: no list built for the usual one match)
        if n == name:
            if raw is not None:
                raise TokenInvalid(MULTIPLE_TOKENS, f"header {loc.name} repeated")
            raw = v
    if raw is None:
        return []
    value = raw.decode("latin-1").strip(OWS)
    prefix = loc.prefix
    if prefix:
        # The auth scheme is case-insensitive (RFC 9110 11.1); the token is not.
        size, lower, bare = _prefix_forms(prefix)
        if len(value) < size and value.lower() == bare:
            raise TokenInvalid(MALFORMED, "empty token")  # "Bearer" alone (OWS stripped)
        if value[:size].lower() != lower:
            if _scheme_badly_separated(value, lower, bare):
                raise TokenInvalid(MALFORMED, "scheme and token not separated by a space")
            return []
        value = value[size:].strip(OWS)
    if not value:
        raise TokenInvalid(MALFORMED, "empty token")
    return [value]


# Query parameters, form fields and cookies are looked for by their names as every common
# reader reads them: a name is a token location's, or a method-override parameter's, when
# ANY reading of it (``NAME_READINGS``) gives that name. Each reading takes the name decoded
# (``+`` is a space) and gives the top-level key the reader stores its value under; letters
# are then compared without case (ASP.NET's ``Request.QueryString``, ``Request.Form`` and
# ``Request.Cookies``). ``;`` separates parameters as ``&`` does (the HTML 4
# recommendation; Python's ``cgi``, Rack and some servers followed it). So a parameter or
# cookie whose name reads as a token location's is that location: found (a second copy is
# ``multiple_tokens``) and removed. Until the twenty-ninth session only PHP's reading was
# taken; a hostile review found qs (Express, Koa) and Rack 2.2 (Rails, Sinatra) read
# ``[_method]``, ``._method``, ``]_method`` as ``_method``: DELETE ran past a rule denying it.
_QUERY_SEPARATORS = re.compile(r"[&;]")
_QUERY_SPLIT = re.compile(r"([&;])")
_PHP_FOLD = str.maketrans({".": "_", " ": "_", "[": "_"})

# Where a reader reads names: the query, a form body (urlencoded or a multipart part's
# name), cookies.
QUERY = "query"
FORM = "form"
COOKIE_PLACE = "cookie"


class NameReading(NamedTuple):
    """How one reader reads a parameter's (decoded) name: the top-level key its value is
    stored under (``read``: linear in the name, C scans), and where that reader reads names
    by default (``places``)."""

    reader: str
    read: Callable[[str], str]
    places: frozenset[str]


def _plain_reading(name: str) -> str:
    """The name as it is: Node's ``querystring`` (Express ``extended: false``, Koa's
    ``ctx.query``), Go, Java's ``getParameter`` (Spring's ``HiddenHttpMethodFilter``),
    Python's readers, ASP.NET, every cookie reader but PHP's; Rack 3 for a name without a
    ``[`` past its first character."""
    return name


def _php_reading(name: str) -> str:
    """PHP (``$_GET``, ``$_POST``, ``$_COOKIE``; Laravel, Symfony): cut at the first NUL
    (names are C strings: ``_method%00junk`` is ``_method``), leading spaces dropped, a name
    with ``[...]`` past its first character is the part before the bracket (an array),
    ``.``, space and an unmatched ``[`` read as ``_``."""
    name = name.partition("\x00")[0].lstrip(" ")
    bracket = name.find("[")
    if bracket > 0 and name.find("]", bracket) > 0:
        name = name[:bracket]
    return name.translate(_PHP_FOLD)


_BRACKET = re.compile(r"[\[\]]")


def _rack2_reading(name: str) -> str:
    r"""Rack 1.x-2.2 (``Rack::Request#GET``/``#POST``, multipart part names too: Rails up to
    7.0, Sinatra 2, ``Rack::MethodOverride``; ``normalize_params``'s
    ``\A[\[\]]*([^\[\]]+)\]*``): every leading ``[`` and ``]`` dropped, the
    run up to the next bracket, trailing ``]`` dropped (``]_method``, ``[_method``,
    ``_method]``, ``[[_method]]`` and ``[]_method`` are ``_method``); a key followed by a
    lone ``[`` is the whole name (``_method[``). Leading spaces dropped: Rack splits at
    ``&`` and the spaces after it (``/[&;] */``)."""
    name = name.lstrip(" ")
    rest = name.lstrip("[]")
    key = _BRACKET.split(rest, 1)[0]
    return name if rest[len(key):].lstrip("]") == "[" else key


def _rack3_reading(name: str) -> str:
    """Rack 3 (Rails 7.1+, Sinatra 4): the part before the first ``[`` past the first
    character, closed or not (``_method[x`` is ``_method``); a lone final ``[`` is part of
    the name (``_method[``); a leading ``[`` is part of it (``[_method]``)."""
    bracket = name.find("[", 1)
    if bracket < 0 or bracket == len(name) - 1:
        return name
    return name[:bracket]


_QS_GROUP = re.compile(r"\[([^\[\]]*)\]")
# Brackets looked at to find the end of a leading nested group (``[a[b]]``): past this many
# the name reads as itself. Either way its key holds a bracket, which no override name and
# no ordinary location name has; the bound keeps the reading a C scan and a few steps.
MAX_QS_BRACKETS = 64


def _qs_reading(name: str) -> str:
    """qs 6.x (Express 4 ``req.query`` and ``express.urlencoded({extended: true})``,
    ``body-parser``; NestJS, Sails): the part before the first ``[`` (``_method[x`` is
    ``_method``, closed or not); a name that starts with ``[`` is the content of its first
    balanced group (``[_method]``, ``[_method]]``, ``[_method][]`` are ``_method``; what
    follows the group is dropped); unterminated (``[_method``), the name. (qs splits a part
    at its first ``]=`` when it has one: ``_method[=]=DELETE`` is key ``_method[=]``; the
    name read here, up to the first ``=``, is ``_method[``, the same key, and its value,
    holding ``]=``, is no method.)"""
    first = name.find("[")
    if first != 0:
        return name if first < 0 else name[:first]
    m = _QS_GROUP.match(name)
    if m is not None:
        return m.group(1)
    level = 0
    for steps, bracket in enumerate(_BRACKET.finditer(name)):
        if steps >= MAX_QS_BRACKETS:
            break
        level += 1 if bracket.group() == "[" else -1
        if not level:
            return name[1:bracket.start()]
    return name


# A dot qs with ``allowDots`` turns into a bracket: at depth 0, followed by neither ``.``
# nor ``[`` (``topLevelDotsToBrackets``); the run it opens ends at the next ``.`` or ``[``.
_QS_DOT = re.compile(r"\.[^.\[]")
_QS_RUN_END = re.compile(r"[.\[]")


def _qs_dots_reading(name: str) -> str:
    """qs with ``allowDots`` (co-body, so koa-bodyparser's forms; any app that sets it):
    ``a.b`` is ``a[b]`` before qs reads it, so ``._method`` is ``_method`` and
    ``_method.x`` is ``_method``."""
    first = name.find("[")
    dot = _QS_DOT.search(name, 0, first if first >= 0 else len(name))
    if dot is None:
        return _qs_reading(name)
    if dot.start():
        return name[:dot.start()]
    end = _QS_RUN_END.search(name, 1)
    return name[1:end.start() if end is not None else len(name)].partition("]")[0]


_EVERYWHERE = frozenset({QUERY, FORM, COOKIE_PLACE})
_QUERY_AND_FORM = frozenset({QUERY, FORM})
# The readings, each with the reader it stands for and where that reader reads names. A
# method-override name is judged in every reading whatever its place (``param_name``: an
# app may configure any of these readers for its query or its body; over-reading only
# refuses more). A provider's own place (``param_names``) is read by the readings of its
# place only: ``token.type`` read with ``allowDots`` is ``token``, which no query or cookie
# reader does by default, and it would be taken (and, with forward_token off, removed) as
# the token.
NAME_READINGS: tuple[NameReading, ...] = (
    NameReading("plain (Node querystring, Go, Java, Python, ASP.NET, cookies)",
                _plain_reading, _EVERYWHERE),
    NameReading("PHP", _php_reading, _EVERYWHERE),
    NameReading("Rack 2 (Rails <= 7.0, Sinatra 2)", _rack2_reading, _QUERY_AND_FORM),
    NameReading("Rack 3 (Rails >= 7.1, Sinatra 4)", _rack3_reading, _QUERY_AND_FORM),
    NameReading("qs (Express)", _qs_reading, _QUERY_AND_FORM),
    NameReading("qs allowDots (co-body, koa-bodyparser)", _qs_dots_reading,
                frozenset({FORM})),
)
_READS_BY_PLACE = {place: tuple(r.read for r in NAME_READINGS if place in r.places)
                   for place in _EVERYWHERE}
_OTHER_READS = tuple(r.read for r in NAME_READINGS if r.read is not _php_reading)
# (every override name is this long at most: a longer key is no override name)
_LONGEST_OVERRIDE = max(map(len, METHOD_OVERRIDE_PARAMS))


# The longest raw name whose folded form is kept (the names repeat on every request); a
# longer one is folded every time: a name is as long as a head or a target may be, and 1,024
# kept cookie names of 30 KiB each, one per request from any caller, held 60 MiB (found by a
# hostile review).
KEPT_PARAM_BYTES = 128


def param_name(raw: str) -> str:
    """A query parameter's or form field's (still encoded) name as a method-override reader
    may read it: the override parameter's name (``METHOD_OVERRIDE_PARAMS``) when any
    reading (``NAME_READINGS``, whatever its place) gives one, else PHP's reading;
    lower-cased. (``name in METHOD_OVERRIDE_PARAMS`` then holds for every spelling any
    reader runs as an override.)"""
    return _kept_param_name(raw) if len(raw) <= KEPT_PARAM_BYTES else _param_name(raw)


def _param_name(raw: str) -> str:
    name = unquote_plus(raw)
    php = _php_reading(name).lower()
    if php not in METHOD_OVERRIDE_PARAMS:
        for read in _OTHER_READS:
            key = read(name)
            if len(key) <= _LONGEST_OVERRIDE and key.lower() in METHOD_OVERRIDE_PARAMS:
                return key.lower()
    return php


_kept_param_name = functools.lru_cache(maxsize=1024)(_param_name)


def param_names(raw: str, place: str) -> frozenset[str]:
    """Every name a reader of ``place`` (``QUERY`` or ``COOKIE_PLACE``) may read a
    parameter's or cookie's (still encoded) name as (``NAME_READINGS``), lower-cased."""
    if len(raw) <= KEPT_PARAM_BYTES:
        return _kept_param_names(raw, place)
    return _param_names(raw, place)


def _param_names(raw: str, place: str) -> frozenset[str]:
    name = unquote_plus(raw)
    return frozenset([read(name).lower() for read in _READS_BY_PLACE[place]])


_kept_param_names = functools.lru_cache(maxsize=1024)(_param_names)


@functools.lru_cache(maxsize=256)
def location_names(name: str) -> frozenset[str]:
    """A query or cookie location's configured name as a request's names are compared with
    it (``param_names``): as written (an app asks its reader for that key) and as PHP reads
    it (a PHP app can only ask for ``access_token`` when ``access.token`` is configured),
    lower-cased. Not as the other readers cut a name: ``a[b]`` configured is not ``a``
    (another parameter) to a reader that nests."""
    decoded = unquote_plus(name)
    return frozenset({decoded.lower(), _php_reading(decoded).lower()})


def _query_pairs(query: str, wanted: frozenset[str] | None = None
                 ) -> list[tuple[frozenset[str], str]]:
    """The query's (names as read, decoded value) pairs, in order; with ``wanted`` (names
    as ``location_names`` gives them) only the pairs whose name may read as one of them
    (``_wanted_parts``), the others never read. ``TooManyNames`` past
    ``MAX_NAME_CANDIDATES`` such pairs."""
    parts = _QUERY_SEPARATORS.split(query) if wanted is None else _wanted_parts(query, wanted)
    pairs = []
    for part in parts:
        if part:
            name, _, value = part.partition("=")
            pairs.append((param_names(name, QUERY), unquote_plus(value)))
    return pairs


# A query parameter's name can read as a wanted name (``param_names``) only when its
# decoded, lower-cased form holds the wanted name's longest run between the characters the
# readings fold (``_``, ``.``, space, ``[``): each reading keeps a run of the name, PHP's
# folds those to ``_``, and lower-casing makes an ASCII letter only of an ASCII letter or of
# the Kelvin sign (``k``). That run is found in the raw query by one regular expression that
# reads each of its characters in either case, percent-encoded or not, and only the pairs
# whose name, decoded and lower-cased, holds every run of the wanted name in order are read:
# reading a new name costs some 10 us (its decoding and six readings), and a 32 KiB query of
# 3,000 distinct names held the event loop 30 ms per request when every pair was read
# (noticed in the twenty-ninth session's reviews). More than MAX_NAME_CANDIDATES distinct
# such names in one query: ``TooManyNames`` (refused). The cap counts names, not pairs (a
# repeated name is read once), and only names holding the whole wanted name's runs
# (``accessories`` is none for ``access_token``): a review of the first cap, 64 pairs
# holding ``access``, found ordinary queries refused (65 ``accessories=`` or
# ``device_tokens=`` values, also on routes needing no token).
MAX_NAME_CANDIDATES = 256
_FOLDED_BY_READINGS = re.compile(r"[_. \[]")


class TooManyNames(Exception):
    """More than ``MAX_NAME_CANDIDATES`` query parameters whose names may read as a token
    location's."""


def _encoded(c: str) -> str:
    """A pattern for ``c`` as a raw query may spell it: itself (either case under
    IGNORECASE) or percent-encoded (UTF-8; the Kelvin sign for ``k``)."""
    forms = [re.escape(c)]
    for ch in {c.lower(), c.upper()} | ({"\u212a"} if c == "k" else set()):
        forms.append("".join(f"%{b:02x}" for b in ch.encode("utf-8")))
    return "(?:" + "|".join(forms) + ")"


@functools.lru_cache(maxsize=256)
def _wanted_pattern(wanted: frozenset[str]) -> re.Pattern[str] | None:
    """The pattern of ``_wanted_parts`` for ``wanted``; None when some name has no run to
    look for (then every pair is read)."""
    alternatives = []
    for name in sorted(wanted):
        core = max(_FOLDED_BY_READINGS.split(name), key=len)
        if not core or not core.isascii() or any(c in core for c in "&;=%+"):
            return None
        alternatives.append("".join(_encoded(c) for c in core))
    return re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None


def _wanted_parts(query: str, wanted: frozenset[str]) -> list[str]:
    """The ``&``/``;``-separated parts of ``query`` whose name (before the first ``=``) may
    read as one of ``wanted`` (the comment above), in order. ``TooManyNames`` past
    ``MAX_NAME_CANDIDATES`` distinct such names."""
    pattern = _wanted_pattern(wanted)
    if pattern is None:
        return _QUERY_SEPARATORS.split(query)
    runs = _wanted_runs(wanted)
    parts: list[str] = []
    names: set[str] = set()
    end = -1  # (where the part last looked at ends: later matches in it are skipped)
    for match in pattern.finditer(query):
        at = match.start()
        if at < end:
            continue
        found = _QUERY_SEPARATORS.search(query, at)
        end = found.start() if found is not None else len(query)
        start = max(query.rfind("&", 0, at), query.rfind(";", 0, at)) + 1
        if "=" in query[start:at]:
            continue  # (in a value)
        part = query[start:end]
        name = part.partition("=")[0]
        folded = (unquote_plus(name) if "%" in name or "+" in name else name).lower()
        if not any(_in_order(folded, r) for r in runs):
            continue  # (``accessories``: holds ``access``, not ``token`` after it)
        parts.append(part)
        if name not in names:
            names.add(name)
            if len(names) > MAX_NAME_CANDIDATES:
                raise TooManyNames()
    return parts


@functools.lru_cache(maxsize=256)
def _wanted_runs(wanted: frozenset[str]) -> tuple[tuple[str, ...], ...]:
    """Each wanted name's runs between the characters the readings fold, in order: a name
    that reads as it holds them all, in that order, once decoded and lower-cased."""
    return tuple(tuple(r for r in _FOLDED_BY_READINGS.split(name) if r)
                 for name in sorted(wanted))


def _in_order(text: str, runs: tuple[str, ...]) -> bool:
    """Whether ``text`` holds each of ``runs``, one after the other."""
    at = 0
    for run in runs:
        at = text.find(run, at)
        if at < 0:
            return False
        at += len(run)
    return True


# A cookie inside another cookie's ``;``-separated piece: ``a=x session=EVIL``. Python's
# ``http.cookies.SimpleCookie`` (aiohttp, Bottle, CherryPy) ends a value at whitespace and
# reads the rest as further cookies, ``session = EVIL`` included, and RFC 2965 readers split
# at ``,``; a reader that splits at ``;`` only (RFC 6265) sees one cookie ``a``. A name=value
# set off inside a piece by whitespace or ``,`` (a quoted value is one value) counts as a
# cookie too: over-reading only finds more (a second copy is ``multiple_tokens``), while
# under-reading let ``session=GOOD; a=x session=EVIL`` be verified as GOOD and reach such an
# app as EVIL, and ``a=x session=EVIL`` reach it unverified (found by a hostile review).
#
# Linear: a match starts only at the first of a run of separators (the lookbehind), which it
# takes whole, and nothing is given back (possessive quantifiers). ``[\s,]\s*`` tried from
# every whitespace character of a run, each attempt reading the rest of it: a cookie piece
# of 32,000 spaces between two cookies cost 31 s of the event loop, one request stalling
# every connection of the sidecar (found by a hostile review).
_INNER_COOKIE = atomic_re.compile(r'(?<![\s,])[\s,][\s,]*+([^\s,;="]++)\s*+=\s*+("[^"]*"|[^\s,;]*+)')
_QUOTED_OR_WORD = re.compile(r'"[^"]*"|[^\s,"]+|.', re.DOTALL)


def _inner_cookies(piece: str) -> list[tuple[frozenset[str], str]]:
    """The (names, value) pairs set off by whitespace or ``,`` inside one ``;``-separated
    piece of a Cookie header (not the piece's own first pair), names as cookie readers read
    them (``param_names``), values without their quotes."""
    if not any(c in piece for c in " \t,\x0b\x0c"):
        return []
    out = []
    # Skip quoted strings (``a="x session=y"`` is one cookie to every reader).
    masked = "".join(m if m[0] != '"' or len(m) == 1 else '"' + "_" * (len(m) - 2) + '"'
                     for m in _QUOTED_OR_WORD.findall(piece))
    for match in _INNER_COOKIE.finditer(masked):
        value = piece[match.start(2):match.end(2)]
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out.append((param_names(piece[match.start(1):match.end(1)], COOKIE_PLACE), value))
    return out


def _cookie_pairs(headers: Headers) -> list[tuple[frozenset[str], str]]:
    pairs = []
    for n, v in headers:
        if n == COOKIE:
            for part in v.decode("latin-1").split(";"):
                piece = part.strip(OWS)
                name, sep, value = piece.partition("=")
                if sep:
                    value = value.strip(OWS)
                    if len(value) >= 2 and value[0] == value[-1] == '"':
                        value = value[1:-1]
                    pairs.append((param_names(name.strip(OWS), COOKIE_PLACE), value))
                pairs.extend(_inner_cookies(piece))
    return pairs


def _from_pairs(loc: TokenLocation, pairs: list[tuple[frozenset[str], str]]) -> list[str]:
    wanted = location_names(loc.name)
    values = [v for names, v in pairs if not wanted.isdisjoint(names)]
    if len(values) > 1:
        raise TokenInvalid(MULTIPLE_TOKENS, f"{loc.kind} {loc.name} repeated")
    if values and not values[0]:
        raise TokenInvalid(MALFORMED, "empty token")
    return values


def extract_tokens(provider: JwtProvider, headers: Headers, query: str) -> FoundToken | None:
    """The provider's token in this request, or None when there is none.

    ``headers`` are (name, value) pairs as h11 gives them (names lower-case); ``query`` is the raw query
    string (no ``?``). Raises ``TokenInvalid("multiple_tokens")`` on ambiguity.
    """
    locations = provider.locations
    if len(locations) == 1 and locations[0].kind == "header":  # the usual provider
        values = _from_header(locations[0], headers)
        return _found((values[0], locations)) if values else None
    found: list[tuple[TokenLocation, str]] = []
    cookies: list[tuple[frozenset[str], str]] | None = None
    queries: list[tuple[frozenset[str], str]] | None = None
    for loc in provider.locations:
        if loc.kind == "header":
            values = _from_header(loc, headers)
        elif loc.kind == "query":
            if queries is None:
                wanted = frozenset().union(*(location_names(q.name) for q in locations
                                             if q.kind == "query"))
                try:
                    queries = _query_pairs(query, wanted) if query else []
                except TooManyNames:
                    raise TokenInvalid(MULTIPLE_TOKENS, "too many parameters named like "
                                                        f"{loc.name}") from None
            values = _from_pairs(loc, queries)
        else:
            if cookies is None:
                cookies = _cookie_pairs(headers)
            values = _from_pairs(loc, cookies)
        for value in values:
            found.append((loc, value))
    if not found:
        return None
    token = found[0][1]
    if len(found) == 1:
        return _found((token, (found[0][0],)))
    if any(v != token for _, v in found):
        raise TokenInvalid(MULTIPLE_TOKENS, "different tokens in different places")
    return FoundToken(token, tuple(loc for loc, _ in found))


def remove_token(headers: Headers, query: str,
                 locations: Sequence[TokenLocation]) -> tuple[list[tuple[bytes, bytes]], str]:
    """``headers`` and ``query`` without the token at ``locations`` (for forward_token off).

    A header location drops the whole header; a query location drops the parameter; a
    cookie location rewrites the Cookie header without that cookie.
    """
    # Compared folded, as the header catalogue is (``sidecar.http.untrusted.fold``): a
    # token header is removed in every spelling an app may read as the same header
    # (``X_Auth_Token`` is ``HTTP_X_AUTH_TOKEN`` to CGI, WSGI and PHP, like ``X-Auth-Token``).
    drop_headers = {fold(loc.name) for loc in locations if loc.kind == "header"}
    drop_params = frozenset().union(*(location_names(loc.name) for loc in locations
                                      if loc.kind == "query"))
    drop_cookies = frozenset().union(*(location_names(loc.name) for loc in locations
                                       if loc.kind == "cookie"))
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if fold(lname) in drop_headers:
            continue
        if lname == COOKIE and drop_cookies:
            kept = [p.strip() for p in value.decode("latin-1").split(";")
                    if p.strip()
                    and drop_cookies.isdisjoint(param_names(
                        p.strip().partition("=")[0].strip(OWS), COOKIE_PLACE))
                    and all(drop_cookies.isdisjoint(n) for n, _ in _inner_cookies(p.strip(OWS)))]
            if not kept:
                continue
            value = "; ".join(kept).encode("latin-1")
        out.append((name, value))
    if drop_params and query:
        # Every parameter whose name reads as a token parameter's goes (``param_names``); the
        # others stay as they were, each after the separator that was before it.
        pieces = _QUERY_SPLIT.split(query)  # parameter, separator, parameter, ...
        params: list[str] = []
        for i in range(0, len(pieces), 2):
            part = pieces[i]
            if not part or not drop_params.isdisjoint(param_names(part.partition("=")[0],
                                                                  QUERY)):
                continue
            if params:
                params.append(pieces[i - 1])
            params.append(part)
        query = "".join(params)
    return out, query


# --- RFC 6750 places no provider reads -------------------------------------------------------

# The query parameter RFC 6750 2.3 names (compared as ``param_names`` reads names).
RFC6750_PARAM = "access_token"
_RFC6750_NAMES = frozenset({RFC6750_PARAM})
# What ``guard_tokens`` finds in a query with more than MAX_NAME_CANDIDATES parameters whose
# names may read as ``access_token``: a token no provider reads (the request is refused,
# ``unread_location`` or ``multiple_tokens``) that equals no real one.
TOO_MANY_NAMES = "\x00too-many-access_token-names"
# Authorization schemes that carry an access token: RFC 6750 ``Bearer``, RFC 9449 ``DPoP``,
# and the ``JWT`` and ``Token`` schemes frameworks use (lower-case). A credential with the
# shape of a JWT counts under any other scheme too, and with no scheme at all.
TOKEN_SCHEMES = ("bearer", "dpop", "jwt", "token")
AUTHORIZATION = b"authorization"
# A compact JWS (three base64url parts) or JWE (five).
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){2}(?:(?:\.[A-Za-z0-9_-]*){2})?",
                        re.ASCII)


class Guards(NamedTuple):
    """The places none of a section's providers reads (see the module docstring).

    ``query``: ``?access_token=`` is not read. ``read_schemes``: the ``Authorization``
    schemes (lower-case, no space) providers read; ``authorization``: whether
    ``Authorization`` is looked at at all (not when a provider reads it whole, no prefix).
    ``issuers``: the section's JWT providers' issuers, whose tokens count in every header,
    cookie and query parameter no provider reads (``copies``); ``read_headers``,
    ``read_params`` and ``read_cookies``: the places providers read (names as compared).
    """

    query: bool
    authorization: bool
    read_schemes: frozenset[str]
    issuers: frozenset[str] = frozenset()
    read_headers: frozenset[bytes] = frozenset()
    read_params: frozenset[str] = frozenset()
    read_cookies: frozenset[str] = frozenset()


def guards_for(providers: Iterable[JwtProvider]) -> Guards | None:
    """The places ``providers`` leave unread (None: none). Once per policy and section."""
    query = authorization = True
    schemes: set[str] = set()
    issuers: set[str] = set()
    headers: set[bytes] = {AUTHORIZATION, COOKIE}  # (read by the guards and as cookies)
    params: set[str] = set()
    cookies: set[str] = set()
    for provider in providers:
        if provider.introspection is None:
            issuers.add(provider.issuer)
        for loc in provider.locations:
            if loc.kind == "query":
                params |= location_names(loc.name)
            elif loc.kind == "cookie":
                cookies |= location_names(loc.name)
            else:
                headers.add(header_name(loc.name))
            if loc.kind == "query" and RFC6750_PARAM in location_names(loc.name):
                query = False
            elif loc.kind == "header" and header_name(loc.name) == AUTHORIZATION:
                scheme = loc.prefix.strip(OWS).lower()
                if not scheme:
                    authorization = False
                schemes.add(scheme)
    if not query and not authorization and not issuers:
        return None
    return Guards(query, authorization, frozenset(schemes), frozenset(issuers),
                  frozenset(headers), frozenset(params), frozenset(cookies))


def _own_query_values(query: str, read: frozenset[str]) -> frozenset[str]:
    """The values of the query parameters a provider reads (``read``), which the copy
    scan does not count as copies; none past ``MAX_NAME_CANDIDATES`` candidates (every
    value is then scanned: a provider's own token found as a copy refuses the request)."""
    try:
        return frozenset(value for names, value in _query_pairs(query, read)
                         if not read.isdisjoint(names))
    except TooManyNames:
        return frozenset()


def query_may_hold(query: str) -> bool:
    """Whether ``query`` may hold a parameter whose name folds to ``access_token`` (False:
    it cannot; without ``%`` a name can only fold to it when it spells ``access``)."""
    return "%" in query or "access" in query.lower()


def guard_tokens(guards: Guards, headers: Headers, query: str, path: str = "") -> list[str]:
    """The tokens in the places ``guards`` names, in request order (empty ones left out:
    nothing to verify there); ``path``, the request's, is looked at for copies."""
    found: list[str] = []
    if guards.authorization:
        read = guards.read_schemes
        for n, v in headers:
            if n != AUTHORIZATION:
                continue
            value = v.decode("latin-1").strip(OWS)
            scheme, credential = value, ""
            for i, c in enumerate(value):
                # The scheme ends at the first byte no token holds, not only at SP or HTAB:
                # an app splitting on any whitespace reads ``DPoP\xa0<jwt>`` or
                # ``Token,<jwt>`` as a scheme and a token (a review found those passed).
                if c not in _TCHAR:
                    scheme, credential = value[:i], value[i:].strip(OWS + "\xa0,;:=")
                    break
            lower = scheme.lower()
            if not credential:
                if _JWT_SHAPE.fullmatch(value) is not None:
                    found.append(value)  # a bare JWT, no scheme
            elif lower not in read and (lower in TOKEN_SCHEMES
                                        or _JWT_SHAPE.fullmatch(credential) is not None):
                found.append(credential)
    if guards.query and query and query_may_hold(query):
        try:
            found.extend(v for n, v in _query_pairs(query, _RFC6750_NAMES)
                         if RFC6750_PARAM in n and v)
        except TooManyNames:
            found.append(TOO_MANY_NAMES)
    if guards.issuers:
        found.extend(copies(guards, headers, query, path))
    return found


# --- copies of a provider's token anywhere else -------------------------------------------

# A run that may hold a JWT's header and payload (a payload naming an issuer is at least
# 16 base64 digits): what is looked at further. As bytes, for a header value as read. A
# fixed-length pattern: ``[..]{2,}\.[..]{16,}`` tried from every character of a run took
# 7 s for 32 KiB without a dot (found by the review of this fix).
# Or (``_filled_pieces``) a part between two dots that may be a payload with filler in it:
# its first digit one a JSON object's first byte may begin (``{``, or what
# ``_BEFORE_OBJECT`` lets come before it), then at least 11 more characters. One search.
# (It begins with the dot: a pattern beginning with a character class is tried at every
# byte, twice as slow on a browser's User-Agent.) Whatever comes before the dot, nothing
# included: npm jwt-decode reads ``token.split(".")[1]`` whatever the header is, so
# ``.<payload>.<sig>``, ``.<payload>`` and ``<header>~.<payload>`` are copies (found by a
# hostile review, session 29: the digit before the dot was required, and a forged copy
# without one reached the app). A filled part may be the last (no signature after it): then
# it holds filler (without, a last part such as ``seg1.example-file`` is no candidate, nor
# read whole: 16 such segments used up what a request reads, ``MAX_COPY_PIECES``).
_MAY_BE_COPY = atomic_re.compile(rb"\.(?:[A-Za-z0-9_\-+/=]{16}"
                          rb"|[^A-Za-z0-9_\-+/=.]*+[eICDA7uv/_](?:[^.]{11,}+\."
                          rb"|[A-Za-z0-9_\-+/=]*+[^A-Za-z0-9_\-+/=.][^.]*+\Z))")
# Runs of base64 and base64url digits, padding and dots; each is one candidate (a JWT's
# parts as a lenient decoder reads them, padded or not). One pass, nothing given back.
_COPY_RUN = atomic_re.compile(r"[A-Za-z0-9_\-+/=.]++")
# The runs of ``_COPY_RUN`` that hold a dot, found by one search (group 1: the run's first
# part): a run without one costs a step a byte in C, not a string and a loop turn in
# Python (a 30 KB value of ``a a a ...`` with one candidate in it gave 15,000 runs to
# look at one by one; thirty-third session). Tried only at a run's first character (the
# lookbehind), so linear.
_DOTTED_RUN = atomic_re.compile(r"(?<![A-Za-z0-9_\-+/=.])([A-Za-z0-9_\-+/=]*+)\.[A-Za-z0-9_\-+/=.]*+")


def _copy_pieces(text: str, spend: Callable[[int], object] | None = None) -> list[str]:
    """The JWT-shaped pieces of ``text``: each run of ``_COPY_RUN`` with a dot, from the
    start of its first part. That part holds no ``+`` (a space in a query) and no ``=`` but
    its padding, so ``token=<jwt>`` and ``a+<jwt>`` give ``<jwt>``; it may be empty (the
    run begins with its dot: ``.<payload>.<sig>``, or the header ended in a character that
    is no base64 digit, ``<header>~.<payload>``): what is read is the part after the first
    dot, as npm jwt-decode reads it whatever precedes it (found by a hostile review, session
    29: such a run was dropped). And the pieces whose payload has filler in it
    (``_filled_pieces``). ``spend``: the scan budget's (``_ScanBudget.spend``), charged
    ``SCAN_RUN_COST`` for each run with a dot and what ``_filled_pieces`` costs, as it is
    done (it raises past the budget), beyond ``SCAN_RUN_ALLOWANCE`` a character of ``text``
    which this form's runs and filled parts may use first."""
    pieces = []
    if spend is not None:
        spend = _with_allowance(spend, SCAN_RUN_ALLOWANCE * len(text))
    for m in _DOTTED_RUN.finditer(text):
        if spend is not None:
            spend(SCAN_RUN_COST)
        run = m.group()
        head = m.group(1)
        start = max(head.rfind("+"), head.rstrip("=").rfind("=")) + 1
        pieces.append(run[start:])
    if pieces:
        pieces += _filled_pieces(text, spend)
    return pieces


def _with_allowance(spend: Callable[[int], object], allowance: int) -> Callable[[int], object]:
    """``spend``, but the first ``allowance`` units of cost are this form's own: charged to
    the request's budget only past them (never a credit to it)."""
    left = [allowance]

    def charge(cost: int) -> object:
        if left[0] >= cost:
            left[0] -= cost
            return None
        return spend(cost)

    return charge


# Base64 and base64url digits and padding; anything else in a payload is filler that a
# lenient decoder skips (Python's base64 without ``validate``, Java's MIME decoder: any
# other character; ``atob`` and Node: whitespace).
_NOT_DIGIT = atomic_re.compile(r"[^A-Za-z0-9_\-+/=]++")
# A payload naming an issuer is at least 12 digits (``{"iss":"x"}``), filler aside.
_MIN_PAYLOAD_DIGITS = 12
# A part after a dot (up to the next dot or the end) longer than ``_MIN_PAYLOAD_DIGITS``
# that holds filler. (Before the thirty-third session each part was searched one by one in
# Python: a 30 KB value of dotted words cost 1.5 ms, where a plain one costs 0.25 ms.)
# Tried only after a dot (the lookbehind), so linear.
_FILLED_PART = atomic_re.compile(rf"(?<=\.)(?=[^.]{{{_MIN_PAYLOAD_DIGITS + 1}}})"
                          r"[A-Za-z0-9_\-/=]*+[^A-Za-z0-9_\-/=.][^.]*+")
# ``+`` is a digit of standard base64 and filler to a reader that first turns it into a space
# (PHP's ``$_COOKIE``, .NET's ``HttpUtility.UrlDecode``, Java's ``URLDecoder`` on a path
# segment: outside the query too); a part holding one is read both ways. A forged token
# with ``+`` inserted in its payload reached the app from a cookie, a header and the path
# (found by the review of the thirty-fifth session's ``unescape`` decoding; reading such
# values with ``+`` as a space, as a decoded form, missed dots needing two decodings and
# cost ordinary heads -- ``vnd...+json`` types, signed cookies -- their budget).
_NOT_DIGIT_OR_PLUS = atomic_re.compile(r"[^A-Za-z0-9_\-/=]++")


def _filled_pieces(text: str, spend: Callable[[int], object] | None = None) -> list[str]:
    """Pieces for the JWTs of ``text`` whose payload has filler in it (``h.eyJp!!!!c3Mi.s``,
    ``h.eyJp    c3Mi.s``): each part after a dot that holds filler and at least
    ``_MIN_PAYLOAD_DIGITS`` digits, as ``.<its digits>.`` (the payload is what is read;
    found by a hostile review: such a token reached the app unread, and a lenient reader
    decodes it to the forged claims); the last part too (``h.eyJp    c3Mi``: no signature,
    session 29). The piece is no token's string, so beside the provider's own token it is
    a second one. The parts are found by one search (``_FILLED_PART``: a part of base64
    digits only costs a step a byte in C); ``spend``: as ``_copy_pieces``',
    ``SCAN_FILLER_COST`` for each part with filler in it (its size: a C pass, as the
    value's own)."""
    pieces = []
    for m in _FILLED_PART.finditer(text):
        part = m.group()
        if spend is not None:
            spend(SCAN_FILLER_COST)
        as_digit = _NOT_DIGIT.sub("", part)
        # (``+`` a digit -- unless that is the part as sent, which the run's own piece
        # reads -- then ``+`` filler: ``_NOT_DIGIT_OR_PLUS``)
        for digits in ((as_digit,) if "+" not in part else
                       (_NOT_DIGIT_OR_PLUS.sub("", part),) if as_digit == part else
                       (as_digit, _NOT_DIGIT_OR_PLUS.sub("", part))):
            if len(digits) >= _MIN_PAYLOAD_DIGITS and digits[0] in _OBJECT_FIRST_DIGITS:
                pieces.append(f".{digits}.")
    return pieces


# The first base64 digit of a JSON object's payload: of ``{`` (``e``), or of what
# ``_BEFORE_OBJECT`` lets come before it (space, tab, CR, LF, NUL, a byte-order mark's).
_OBJECT_FIRST_DIGITS = frozenset("eICDA7uv/_")


# At most this many distinct pieces of one request whose payload reads as a JSON object are
# read whole (``jwt.names_issuer``); a request with more is refused as holding a copy. Read
# one by one, a 32 KiB head of distinct pieces cost 50 ms and a 1 MiB one 1.5 s of the
# event loop (found by the review of this fix); no request a client sends holds that many
# JWTs.
MAX_COPY_PIECES = 16
# What may come before a JSON object's "{" in a payload a lenient reader accepts:
# whitespace, byte-order marks and the NULs of UTF-16 and UTF-32 (``jwt.payload_names``
# reads nothing else either).
_BEFORE_OBJECT = BEFORE_OBJECT


def _object_payload(piece: str, spend: Callable[[int], object] | None = None) -> bool:
    """Whether the second part of ``piece`` decodes, leniently (``jwt.lenient_part``, as
    ``names_issuer`` reads it), to a JSON object's start (what fails here is no token to
    any reader). ``spend``: the scan budget's, charged ``SCAN_DECODE_COST`` before the part
    is decoded (its size the caller counts)."""
    part = piece.split(".", 2)[1]
    if len(part) < 12:  # {"iss":"x"} is 15 digits
        return False
    if spend is not None:
        spend(SCAN_DECODE_COST)
    data = lenient_part(part)
    return data is not None and data.lstrip(_BEFORE_OBJECT)[:1] == b"{"


# The copy scan's budget for one request (``copies``): the work it may do, counted in bytes
# passed over as they are passed over -- each form of a value searched and scanned (the value
# as sent, each decoded form), each decoding's input (and what each escape it decodes costs,
# ``SCAN_ESCAPE_COSTS``, past ``SCAN_ESCAPE_ALLOWANCE``), each piece decoded
# (``_object_payload``) or read whole (``issuers_named``; ``SCAN_PIECE_COST`` more each, and
# what reading it costs: ``jwt.READ_PARSE_COST`` a character for each parse, more for each
# member and each value judged -- the payload read once for all the section's issuers). Each
# value looked at adds ``SCAN_BYTES_PER_BYTE`` times its own size to what is left, which
# starts at ``SCAN_BYTES_FREE``. Past it the request counts as holding a copy (fail closed, as
# a value with too many forms does: ``_TOO_MANY_FORMS``) and nothing more of it is looked at.
# Found by a hostile review (session 29): the forms limit was per value and nothing bounded
# the bytes, so one 30 KB header whose value decoded to 15 forms, each full of pieces, cost
# 100 ms of the event loop (a plain head of that size 1.3 ms), a 1 MB head 1.9 s; two
# connections sending it held every other caller's requests for hundreds of milliseconds. A
# head an app sends -- values with a few escapes, a token or two -- uses a small part of it.
# (Before the thirty-first session a payload's reading was counted by its bytes, and read once
# per issuer: a 30 KB header of ``{"iss":["x"]}`` objects ending in a bad byte cost 30 ms, 106
# ms with three issuers, and was let through; now such a request uses up its budget and is
# refused as holding a copy.)
SCAN_BYTES_PER_BYTE = 4
SCAN_BYTES_FREE = 64 * 1024
# What each escape a decoding decodes costs (``_decoded_forms``), measured as the pieces below
# were (2,000 escapes against a form without them, fastest of 60 rounds, a ``json.loads``
# character two units; the constants a quarter or so above): ``percent`` and ``plus`` in C
# (``_unquote_latin1``: a split and a table) 32, an invalid ``%zz`` 3; the backslash
# decodings split the form as quoted pairs once (``quoted-pair``'s own result; 17-21 an
# escape), then ``json``, ``octal`` and ``hex`` each decode their own escapes the cheaper
# way: from the pairs (``_own_escapes``: 4-11 an escape, in C, and each code start --
# ``\u``, ``\0``-``\3``, ``\x`` -- 130-165 in Python: ``SCAN_ESCAPE_SORT_COST``,
# ``SCAN_CODE_COST``) or with their own pattern (``_coded``: 50-65 an escape, whatever it
# is). Before the thirty-fourth session each escape was charged 8 (``SCAN_ESCAPE_COST``)
# while ``unquote`` looped in Python (41-63), ``quoted-pair`` expanded its template in Python
# (129) and ``json``, ``octal`` and ``hex`` called back into Python for every match (95),
# each on the whole form: a 30 KB header of ``\"`` or ``\n`` cost 7.8 ms through the sidecar
# (a plain head of that size 1.2 ms), 64 KB of ``\056`` 11.9 ms (plain 1.9), before it was
# refused (found by the thirty-third session's helper, fixed by the thirty-fourth's: now
# 4.7 ms and 6.9 ms at most, 3.9x and 4.4x).
SCAN_ESCAPE_COSTS = {"percent": 40, "plus": 40, "unescape": 60, "quoted-pair": 26, "json": 80,
                     "octal": 80, "hex": 80, "literal": 16,
                     "yaml": 20}  # (the codec 12; yaml a split more; unescape a %u 49)
SCAN_INVALID_PERCENT_COST = 4  # (a ``%`` no two hex digits follow: measured 3)
SCAN_ESCAPE_SORT_COST = 14
SCAN_CODE_COST = 200
# What the escapes of one form may cost, a character of it, before they are charged to the
# request's budget (shared by its decodings, as ``SCAN_RUN_ALLOWANCE`` is by its runs):
# ordinary values were measured at 5-13 units a character (a URL-encoded JSON cookie, one
# escape in three characters, 6-9; an encoded redirect URL 5-11; a JSON string in a header
# holding ``\"``, ``\/``, ``\n`` and ``\u00eb``, 7-13); without it eight 470-byte JSON string
# headers (3.8 KB) came near their budget. Each form has its own: a 64 KB head of ``%252e``
# (two percent forms) is let through after 5-6 ms of the scan.
SCAN_ESCAPE_ALLOWANCE = 12
SCAN_PIECE_COST = 64
# What the pieces themselves cost, measured in the same unit (a ``json`` character is
# ``jwt.READ_PARSE_COST``, two: each piece's work timed over 2,000 pieces interleaved with a
# ``json.loads``, the fastest of 60 rounds of each, on the project's 2-core VM; the constants
# are a quarter or so above it): each run with a dot ``_copy_pieces`` gives (a match, its
# slices, its lookup in ``read``: 260), each part after a dot with filler in it read as its
# digits (``_filled_pieces``: 250), each distinct payload decoded (``_object_payload``:
# ``jwt.lenient_part``'s encode, translate, base64 and the checks, 410-430; its size is
# counted with the piece's), each cookie of a ``Cookie`` header split for chunks
# (``_chunk_joins``: 110, a chunk 320). Before the thirty-third session a distinct piece
# was charged ``SCAN_PIECE_COST`` plus its size, about 80, and the runs, the filled parts
# and the chunks nothing: a 30 KB header of 2,000 distinct pieces such as
# ``.xxxxxxxxxxxAAB`` (one 21-digit part made it a candidate, a first digit ``x`` no filled
# piece) cost 10 ms of the event loop where a plain head of that size costs 1.6 ms, and was
# let through (a 1 MB head about 360 ms); now such a head uses up its budget after a few
# hundred pieces and is refused as holding a copy.
SCAN_RUN_COST = 320
# What the runs and filled parts of one decoded form may cost, a character of it, before they
# are charged to the request's budget: ordinary values hold a dotted run every 30-60
# characters (analytics cookies ``GA1.2.123.456``, consent strings, versions, host names), 5-11
# units a character, while the pieces that cost (``a.b a.b ...``) hold one every 4, 80. Without
# it a 7 KB Cookie header of 120 ordinary cookies spent the budget on its runs alone and was
# refused as holding a copy (found by the hostile review of the thirty-third session's fix).
SCAN_RUN_ALLOWANCE = 8
SCAN_FILLER_COST = 320
SCAN_DECODE_COST = 512
SCAN_COOKIE_COST = 128
SCAN_CHUNK_COST = 384
# At most this many decoded forms of one request (``_MAX_FORMS`` of one value): each costs a
# pass; the limit per value alone let every value of a head have 15 (the same review).
MAX_REQUEST_FORMS = 64


class _ScanBudget:
    """What the copy scan of one request may still do (see ``SCAN_BYTES_PER_BYTE``):
    ``left``, in bytes (below zero: spent, for good), and ``forms``, decoded forms."""

    __slots__ = ("left", "forms")

    def __init__(self) -> None:
        self.left = SCAN_BYTES_FREE
        self.forms = MAX_REQUEST_FORMS

    def allow(self, size: int) -> None:
        """A value of ``size`` bytes is looked at: what is left grows with it (not once
        spent)."""
        if self.left >= 0:
            self.left += SCAN_BYTES_PER_BYTE * size

    def spend(self, cost: int) -> None:
        """Count ``cost`` bytes of work about to be done; ``_TooManyForms`` past the
        budget."""
        self.left -= cost
        if self.left < 0:
            raise _TooManyForms


class _Copies:
    """The pieces of one request read so far (each piece is read once), and what the scan
    may still do (``budget``)."""

    __slots__ = ("issuers", "read", "found", "whole", "budget")

    def __init__(self, issuers: frozenset[str]) -> None:
        self.issuers = issuers
        self.read: dict[str, bool] = {}
        self.found: list[str] = []
        self.whole = 0  # pieces read whole (-1: nothing more is looked at)
        self.budget = _ScanBudget()

    def scan(self, forms: tuple[str, ...], own: set[str] | frozenset[str]) -> None:
        """Add the JWT-shaped pieces of ``forms`` (not in ``own``) whose payload, read
        unverified, names one of the issuers as ``iss`` (``jwt.issuers_named``, at any
        length: a head is bounded by ``limits.max_header_bytes``, up to 8 MiB, and a piece
        longer than names_issuer's own bound reached the app unread -- found by the review
        of this fix). Past the budget (``_ScanBudget``) or a value's forms (``_forms``),
        ``_TOO_MANY_FORMS`` counts as a copy and nothing more is looked at."""
        read = self.read
        if self.whole < 0:
            return
        budget = self.budget
        try:
            for text in forms:
                if text is _TOO_MANY_FORMS:
                    raise _TooManyForms
                for piece in _copy_pieces(text, budget.spend):
                    if piece in own:
                        continue
                    named = read.get(piece)
                    if named is None:
                        budget.spend(SCAN_PIECE_COST + len(piece))
                        if not _object_payload(piece, budget.spend):
                            named = False
                        elif self.whole >= MAX_COPY_PIECES:
                            # Too many to read: this one counts (over-reading only refuses
                            # more), and nothing after it is looked at.
                            self.found.append(piece)
                            self.whole = -1
                            return
                        else:
                            budget.spend(SCAN_PIECE_COST + len(piece))
                            self.whole += 1
                            # (read once for every issuer, its cost counted as it is done)
                            named = bool(issuers_named(piece, self.issuers, None,
                                                       budget.spend, first=True))
                        read[piece] = named
                        if named:
                            self.found.append(piece)
        except _TooManyForms:
            self.found.append(_TOO_MANY_FORMS)  # (fail closed: never a provider's own token)
            self.whole = -1
            budget.left = -1


_QUOTED_PAIRS = re.compile(r"\\(.)", re.DOTALL)
# Each backslash decoding's escapes, a code (group 1) or any other character (group 2)
# (``_coded``), and JSON's one-letter escapes (``None``: a code's, read by ``_coded``).
_JSON_ESCAPES = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|(.))", re.DOTALL)
_OCTAL_ESCAPES = re.compile(r"\\(?:([0-3][0-7]{2})|(.))", re.DOTALL)
_HEX_ESCAPES = re.compile(r"\\(?:x([0-9A-Fa-f]{2})|(.))", re.DOTALL)
_JSON_SHORT: dict[str | None, str] = {None: "", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                                     "t": "\t"}
# A backslash decoding's own escapes, those it reads otherwise than a quoted pair (``\X`` as
# ``X``): the escapes that start a code (``\u``; ``\0``-``\3``; ``\x``), then the digits of
# the code (the text after the escape, before the next backslash), and its base.
# ``_own_escapes`` decodes every other escape as a quoted pair, in C (all four decodings find
# the same escapes, each at a backslash: the digits a code takes are none), and each code
# start in Python (80-100 units); JSON's one-letter escapes in C, through a table.
_CODES: dict[str, tuple[str, re.Pattern[str], re.Pattern[str], int]] = {
    "json": ("u", re.compile("u"), re.compile(r"[0-9A-Fa-f]{4}"), 16),
    "octal": ("0123", re.compile("[0-3]"), re.compile(r"[0-7]{2}"), 8),
    "hex": ("x", re.compile("x"), re.compile(r"[0-9A-Fa-f]{2}"), 16),
}


def _code_starts(name: str, escapes: str) -> int:
    """How many of ``escapes`` (each escape's ``X``, in order) start a code of ``name``'s."""
    return sum(map(escapes.count, _CODES[name][0]))


def _own_escapes(name: str, pairs: list[str], escapes: str) -> str:
    r"""What ``name``'s decoder gives for a form, from the form split as quoted pairs
    (``_QUOTED_PAIRS.split``: each escape's ``X`` at the odd places, the text up to the next
    backslash after it) and those ``X`` (``escapes``): each ``X`` as itself (JSON's letters as
    what they stand for), but where it starts a code (``_CODES``) whose digits follow, the
    character of the code."""
    _starts, first, digits, base = _CODES[name]
    out = pairs.copy()
    if name == "json":
        marks = out[1::2]
        out[1::2] = map(_JSON_SHORT.get, marks, marks)
    for m in first.finditer(escapes):
        after = 2 * m.start() + 2
        code = digits.match(out[after])
        if code is not None:
            number = code.group() if name != "octal" else m.group() + code.group()
            out[after - 1] = chr(int(number, base))
            out[after] = out[after][code.end():]
    return "".join(out)


_PERCENT_ESCAPE = re.compile(r"(%[0-9A-Fa-f]{2})")
_PERCENT_CHARS = {f"%{a}{b}": chr(int(a + b, 16))
                  for a in "0123456789abcdefABCDEF" for b in "0123456789abcdefABCDEF"}


def _unquote_latin1(text: str) -> str:
    """``urllib.parse.unquote(text, "latin-1")``, in C: each ``%XX`` is the character
    ``XX`` (``unquote`` loops in Python per escape, 40-60 units each)."""
    if "%" not in text:
        return text
    parts = _PERCENT_ESCAPE.split(text)
    parts[1::2] = map(_PERCENT_CHARS.__getitem__, parts[1::2])
    return "".join(parts)


def _quoted_pairs(text: str) -> str:
    r"""Each ``\X`` as ``X`` (RFC 9110 quoted-pair), in C: the split keeps each ``X``.
    (``re.sub`` with the template ``\1`` expanded it in Python per escape, 130 units.)"""
    return "".join(_QUOTED_PAIRS.split(text))


# (``_coded``'s tables: what an escape that is no code, its code ``None``, gives, and reads as)
_NO_CODE: dict[str | None, str] = {None: ""}
_NO_DIGITS: dict[str | None, str] = {None: "0"}


def _coded(pattern: re.Pattern[str], base: int, short: dict[str | None, str],
           text: str) -> str:
    r"""``text`` with each match of ``pattern`` (a backslash, then either a code in
    ``base``, group 1, or any character, group 2) as the character of that code, or as
    ``short``'s for the character, else the character itself -- what ``re.sub`` with a call
    back per match gave, in C: the split gives the groups, ``map`` reads them with C
    functions (``int``, ``chr``, ``dict.get``). 55-65 units an escape, whatever it is (the
    call back cost 95); ``_own_escapes`` is cheaper for a form with few codes."""
    if "\\" not in text:
        return text
    parts = pattern.split(text)
    codes = parts[1::3]
    chars = map(chr, map(int, map(_NO_DIGITS.get, codes, codes), repeat(base)))
    parts[1::3] = map(_NO_CODE.get, codes, chars)
    others = parts[2::3]
    parts[2::3] = map(short.get, others, others)
    return "".join(parts)


# JavaScript's legacy ``unescape()`` (and IIS, classic ASP and old PHP helpers ported from
# it): ``%uXXXX`` is the character XXXX, beside ``%XX``. Neither ``percent`` nor a backslash
# decoding reads it; a forged token written with it reached an app that unescapes (left
# open by the thirty-fourth session, closed by the thirty-fifth). ``U`` too: IIS took both.
_PERCENT_U = re.compile(r"%[uU]([0-9A-Fa-f]{4})")


def _unescape(text: str) -> str:
    """``text`` as ``unescape()`` reads it, in C: each ``%uXXXX`` the character XXXX, then
    each ``%XX`` (``_unquote_latin1``; a ``%XX`` that a ``%u0025`` spelt is read too -- a
    second reading, which only refuses more)."""
    parts = _PERCENT_U.split(text)
    parts[1::2] = map(chr, map(int, parts[1::2], repeat(16)))
    return _unquote_latin1("".join(parts))


# A string literal's escapes, every kind in one string (Python's ``unicode_escape`` and
# ``ast.literal_eval``, YAML double-quoted strings, JavaScript and JSON5 literals): ``\xHH``,
# ``\u{H...}``, ``\uXXXX``, ``\UXXXXXXXX``, one to three octal digits, the one-letter escapes,
# an unknown ``\X`` kept for the next layer (``literal``). Each of ``json``, ``octal`` and ``hex`` reads one kind;
# a token whose characters alternate between two kinds (``\x65\u0079...``), or written with
# ``\U`` or short octal (``\56``), left garbage in every one of their forms, and the forged
# token reached the app (found by a hostile review, thirty-fourth session).
_JS_BRACES = re.compile(r"\\u\{([0-9A-Fa-f]{1,6})\}")
_BIG_U = "\\U{:0>8}"
# Escapes (each ``\X``'s ``X``) that make ``literal`` read a form: any ``X`` that ``json``
# does not read (``\"``, ``\\``, ``\/``, ``\b``, ``\f``, ``\n``, ``\r``, ``\t``, ``\u``);
# ``\u{`` is looked for in the form. Ordinary values (a JSON string: ``\"``, ``\/``,
# ``\n``, ``\u00eb``) have none, and pay nothing for it. (Only ``\U``, octal digits and
# ``\u`` with ``\x`` made it read a form at first: ``\N{FULL STOP}``, and ``\a`` or ``\v``
# -- control characters a lenient base64 reader skips, filler inside a payload -- got a
# forged token through; found by the review of this decoding.)
_LITERAL_TRIGGER = re.compile(r'[^"\\/bfnrtu]')
# YAML double-quoted strings' escapes that Python's codec does not know (it keeps them as
# ``\X``, which a quoted-pair reader reads as the letter ``X``, a base64 digit): ``\_``
# (no-break space), ``\e`` (escape), ``\N`` (next line; ``\N{...}`` is Python's name),
# ``\L``, ``\P`` (line and paragraph separators), ``\ `` (a space). To a YAML reader they
# are characters a lenient base64 reader skips: filler inside a forged token's payload
# (found by the same review).
_YAML_ONLY = {"_": "\xa0", "e": "\x1b", "N": "\x85", "L": "\u2028", "P": "\u2029",
              " ": " "}
_YAML_ONLY_NO_NAMES = {k: v for k, v in _YAML_ONLY.items() if k != "N"}


def _literal(text: str) -> str:
    r"""``text`` as a string literal's reader decodes it, in C: Python's ``unicode_escape``
    codec (``\xHH``, ``\uXXXX``, ``\UXXXXXXXX``, one to three octal digits, the one-letter
    escapes; an unknown ``\X`` kept, for the next layer's ``quoted-pair``; a malformed code
    dropped), after JavaScript's ``\u{H...}`` is written as ``\U`` (a split and a C
    ``format``). 12 units an escape (a call back per match cost 95 to 1,000)."""
    if "\\u{" in text:
        parts = _JS_BRACES.split(text)
        parts[1::2] = map(_BIG_U.format, parts[1::2])
        text = "".join(parts)
    with warnings.catch_warnings():
        # (an unknown escape is a DeprecationWarning of the codec's: kept, not a problem)
        warnings.simplefilter("ignore", DeprecationWarning)
        return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape",
                             "ignore")


def _yaml(text: str) -> str:
    r"""``text`` as a YAML double-quoted string's reader decodes it: its own escapes
    (``_YAML_ONLY``) as their characters, then the rest as ``literal`` does (each pair split
    apart, in C: every other escape put back as it was; a value naming characters, ``\N{``,
    keeps its ``\N``). A form of its own: to JavaScript ``\e`` is ``e``, to YAML an escape
    character."""
    pairs = _QUOTED_PAIRS.split(text)
    marks = pairs[1::2]
    table = _YAML_ONLY_NO_NAMES if "\\N{" in text else _YAML_ONLY
    pairs[1::2] = map(table.get, marks, map("\\".__add__, marks))
    return _literal("".join(pairs))


_YAML_TRIGGER = re.compile(r"[_eNLP ]")
_LITERAL_READERS = frozenset({"literal", "yaml"})
# An escape that starts a code (``\u``, ``\U``, ``\x``, ``\N``, an octal digit): what a second
# string reading of a literal's form would decode (``_decoded_forms``).
_CODES_LEFT = re.compile(r"\\[uUxN0-7]")


def _reads_as_yaml(escapes: str) -> bool:
    """Does a form whose escapes are ``escapes`` hold one of YAML's own?"""
    return _YAML_TRIGGER.search(escapes) is not None


def _reads_as_literal(form: str, escapes: str) -> bool:
    """Would ``literal`` read ``form`` (whose escapes are ``escapes``) otherwise than
    ``json``, ``octal`` and ``hex`` each do (``_LITERAL_TRIGGER``)?"""
    return _LITERAL_TRIGGER.search(escapes) is not None or "\\u{" in form


# How an app may decode a value before it reads a token in it, each a form of its own (they
# disagree: ``\056`` is ``.`` to http.cookies and ``056`` to a quoted-string reader): the
# family, as (name, the character that starts an escape, the decoder). ``plus`` only in a
# query. Applied up to ``_DECODING_DEPTH`` times in any order (a JSON value in a cookie,
# percent-encoded twice). docs/authn.md, "Tokens in places no provider reads".
_DECODINGS: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("percent", "%", _unquote_latin1),
    ("plus", "+", lambda t: _unquote_latin1(t.replace("+", " "))),
    ("unescape", "%", _unescape),  # %uXXXX (JavaScript's unescape(), IIS), and %XX
    ("json", "\\", lambda t: _coded(_JSON_ESCAPES, 16, _JSON_SHORT, t)),  # \uXXXX, \/, \n...
    ("quoted-pair", "\\", _quoted_pairs),  # RFC 9110 5.6.4
    ("octal", "\\", lambda t: _coded(_OCTAL_ESCAPES, 8, _NO_CODE, t)),  # http.cookies \ooo
    ("hex", "\\", lambda t: _coded(_HEX_ESCAPES, 16, _NO_CODE, t)),  # C, JS, Python \xHH
    ("literal", "\\", _literal),  # every kind of string-literal escape in one string
    ("yaml", "\\", _yaml),  # and YAML's own escapes (\_ \e \N \L \P)
)
DECODING_NAMES = tuple(name for name, _c, _d in _DECODINGS)
_DECODING_DEPTH = 2
# In a query, where every app reads the value percent-decoded first, one layer more: a string
# literal read twice (``unicode_escape``, then ``json.loads``) behind the URL's own encoding
# is three readings (found by a review: such a forged token in a query reached the app).
_QUERY_DECODING_DEPTH = 3
# At most this many distinct forms of one value (only a value holding ``%``, ``+`` or a
# backslash has more than one, and one an app sends has a few); a value with more is
# counted as holding a copy (``_TooManyForms``: fail closed, and each form costs a pass
# over the value). At most ``MAX_REQUEST_FORMS`` of one request, and no more work than its
# budget (``_ScanBudget``).
_MAX_FORMS = 16


class _TooManyForms(Exception):
    """A value decodes to more than ``_MAX_FORMS`` distinct forms, or the request's scan is
    past its budget (``_ScanBudget``)."""


# ``_forms``'s one form of a value that decodes to too many, or of a request whose scan is
# past its budget: the scan counts it as a copy. (No character ``_PATH_SEPARATORS``
# changes, no base64 digit.)
_TOO_MANY_FORMS = "\x00(too many decoded forms)\x00"


def _forms(raw: bytes, *, plus: bool, budget: _ScanBudget | None = None) -> tuple[str, ...]:
    """A value as sent and as an app may decode it (``_DECODINGS``: percent-decoded, ``+``
    a space in a query, backslash escapes), when it may hold a copy (``_MAY_BE_COPY``);
    else nothing. The work is counted in ``budget``, the request's (else one of its own,
    for this value alone); past it, or past the forms of one value, ``_TOO_MANY_FORMS``."""
    if budget is None:
        budget = _ScanBudget()
    if b"%" not in raw and b"\\" not in raw and not (plus and b"+" in raw):
        # (no dot, no copy: most values -- accept, ids, types -- end at this C scan; the
        # pattern search costs a step per byte)
        if b"." not in raw:
            return ()
        budget.allow(len(raw))
        budget.left -= len(raw)
        if budget.left < 0:
            return (_TOO_MANY_FORMS,)
        if _MAY_BE_COPY.search(raw) is None:
            return ()
        return (raw.decode("latin-1"),)
    budget.allow(len(raw))
    try:
        return _decoded_forms(raw.decode("latin-1"), plus, budget)
    except _TooManyForms:
        return (_TOO_MANY_FORMS,)


def _decoded_forms(text: str, plus: bool,
                   budget: _ScanBudget | None = None) -> tuple[str, ...]:
    if budget is None:
        budget = _ScanBudget()
        budget.allow(len(text))
    spend = budget.spend
    spend(len(text))  # (the value as sent, searched and scanned)
    forms = [text]
    seen = {text}
    layer = [(text, "", text)]  # (each form, the decoding that gave it, and the form it read)
    for _ in range(_QUERY_DECODING_DEPTH if plus else _DECODING_DEPTH):
        decoded = []
        for form, given_by, read in layer:
            # (the escapes' own allowance, this form's, shared by its decodings:
            # ``SCAN_ESCAPE_ALLOWANCE``)
            free = SCAN_ESCAPE_ALLOWANCE * len(form)
            pairs: list[str] | None = None  # (the form split as quoted pairs)
            escapes = ""  # (each escape's ``X``, in order: ``_own_escapes``)
            codes_left = given_by in _LITERAL_READERS and _CODES_LEFT.search(form) is not None
            for name, starts, decode in _DECODINGS:
                if starts not in form or (name == "plus" and not plus):
                    continue  # (outside the query, ``+`` may be filler: ``_filled_pieces``)
                if name == "unescape":
                    count = form.count("%u") + form.count("%U")  # (each a possible %uXXXX)
                    if not count or (given_by in ("percent", "plus")
                                     and count <= read.count("%u") + read.count("%U")):
                        # (no ``%u``; or the ``%u`` a percent reading left are the value's
                        # own, which ``unescape`` of that value reads: read again, the
                        # form cost a legitimate ``escape()`` cookie its budget -- found by
                        # the same review)
                        continue
                if given_by in _LITERAL_READERS and starts == "\\" and name != "quoted-pair" \
                        and not codes_left:
                    # (a string literal's reading keeps the escapes it does not know for a
                    # reader of quoted pairs, as JavaScript reads ``\J``; read as a literal
                    # once more, such a form -- nearly the value itself -- cost the whole
                    # family again. One that still holds a code -- ``\\u002e`` read once --
                    # is read by all of them: an app decoding twice, ``unicode_escape`` then
                    # ``json.loads``, read a forged token the scan missed; found by a review)
                    continue
                # (a pass over the form, and each escape at what it costs: ``+`` is a C
                # replace, then each ``%`` an escape; the backslash decodings split the
                # form as quoted pairs once, then each decodes its own escapes the cheaper
                # way: ``_own_escapes`` or ``decode``, ``_coded``)
                cost = 0
                if name == "unescape":  # (each %u, and each other % at percent's cost)
                    cost = SCAN_ESCAPE_COSTS[name] * count \
                        + SCAN_ESCAPE_COSTS["percent"] * (form.count("%") - count)
                elif starts != "\\":
                    # (a ``%u`` is no ``%XX``: percent's split passes it at the cost of an
                    # invalid escape, ``SCAN_INVALID_PERCENT_COST``; charged as a valid one,
                    # cookies written by ``escape()`` used up their budget)
                    cost = form.count("%")
                    spelled_u = form.count("%u") + form.count("%U") if cost else 0
                    cost = SCAN_ESCAPE_COSTS[name] * (cost - spelled_u) \
                        + SCAN_INVALID_PERCENT_COST * spelled_u
                elif pairs is None:
                    cost = SCAN_ESCAPE_COSTS["quoted-pair"] * form.count(starts)
                used = min(free, cost)
                free -= used
                spend(len(form) + cost - used)
                if starts != "\\":
                    out = decode(form)
                else:
                    if pairs is None:
                        pairs = _QUOTED_PAIRS.split(form)
                        escapes = "".join(pairs[1::2])
                    if name == "quoted-pair":
                        out = "".join(pairs)
                    elif name in ("literal", "yaml"):
                        if not (_reads_as_literal(form, escapes) if name == "literal"
                                else _reads_as_yaml(escapes)):
                            continue  # (what the others read: nothing more to pay)
                        cost = SCAN_ESCAPE_COSTS[name] * len(escapes)
                        used = min(free, cost)
                        free -= used
                        spend(cost - used)
                        out = decode(form)
                    else:
                        by_codes = (SCAN_ESCAPE_SORT_COST * len(escapes)
                                    + SCAN_CODE_COST * _code_starts(name, escapes))
                        by_pattern = SCAN_ESCAPE_COSTS[name] * len(escapes)
                        cost = min(by_codes, by_pattern)
                        used = min(free, cost)
                        free -= used
                        spend(cost - used)
                        out = (_own_escapes(name, pairs, escapes) if by_codes <= by_pattern
                               else decode(form))
                if out not in seen:
                    budget.forms -= 1
                    if len(forms) >= _MAX_FORMS or budget.forms < 0:
                        raise _TooManyForms
                    spend(len(out))  # (searched, then scanned)
                    seen.add(out)
                    forms.append(out)
                    decoded.append((out, name, form))
        layer = decoded
    search = _MAY_BE_COPY.search
    return tuple(f for f in forms if search(f.encode("latin-1", "replace")) is not None)


def _basic_credentials(value: bytes) -> bytes:
    """The decoded credentials of an ``Authorization: Basic`` value (any case; base64 read
    leniently, as a decoder that skips stray characters does); empty for any other."""
    if value[:5].lower() != b"basic" and value.lstrip(b" \t")[:5].lower() != b"basic":
        return b""  # (a Bearer value, the usual one, ends here)
    scheme, _, credential = value.strip(b" \t").partition(b" ")
    if scheme.lower() != b"basic" or not credential:
        return b""
    credential = credential.strip(b" \t")
    try:
        return base64.b64decode(credential + b"=" * (-len(credential) % 4))
    except (binascii.Error, ValueError):
        return b""


def _path_forms(path: str, budget: _ScanBudget | None = None) -> tuple[str, ...]:
    """``_forms`` of a request path, each segment and each of its parameters a value of
    its own: ``/``, ``;`` and ``,`` end a piece, so ``/v1.2/<jwt>`` gives ``<jwt>``, not
    a piece from ``1.2`` on. (Before the twenty-fourth session the path was not looked at:
    ``/dl/<jwt>``, a download or reset link, reached an app that reads its token there.)"""
    if "." not in path and "%" not in path:
        return ()  # (no dot, none decoded: most paths end here)
    forms = _forms(path.encode("latin-1", "replace"), plus=False, budget=budget)
    return tuple(f if f is _TOO_MANY_FORMS else f.translate(_PATH_SEPARATORS) for f in forms)


# --- values wrapped whole in base64 ---------------------------------------------------------

# Known prefixes before a value encoded whole as base64 or base64url, each with where it is
# written and read (docs/authn.md, "Tokens in places no provider reads"). What follows one is
# decoded from its first character; any other run of base64 digits is decoded too, at each of
# the four alignments (so a prefix made of base64 digits, known or not, is skipped: the table
# names the wrappings on record). Found by a hostile review (session 30): a forged JWT inside
# ``sb-<ref>-auth-token=base64-<base64url(session JSON)>`` (the session cookie @supabase/ssr
# writes, whose ``auth.getSession()`` reads ``access_token`` from it unverified) and inside
# ``Sec-WebSocket-Protocol: base64url.bearer.authorization.k8s.io.<base64url(jwt)>``
# reached the app: the JWT was never visible as a JWT.
BASE64_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"base64-", "@supabase/ssr session cookie (cookieEncoding base64url, >= 0.4): "
                 "sb-<ref>-auth-token=base64-<base64url(session JSON)>"),
    (b"base64url.bearer.authorization.k8s.io.",
     "k8s.io/apiserver WebSocket bearer subprotocol (Sec-WebSocket-Protocol)"),
)
# A run of base64 or base64url digits long enough to hold, encoded, a JWT piece naming an
# issuer (a dot and a 12-digit payload, 13 bytes, are 18 digits): looked at for a wrapped
# value. The fixed-length search is the cheap test every header value passes through.
_MIN_WRAPPED_RUN = 18
# (A match starts only at the first digit of a run, the lookbehind: tried from every digit
# of a shorter run, each attempt reading the rest of it, the search was quadratic in it.)
_WRAPPED_RUN = atomic_re.compile(rb"(?<![A-Za-z0-9_\-+/])[A-Za-z0-9_\-+/]{%d,}+"
                          % _MIN_WRAPPED_RUN)
# (what follows a prefix, whatever comes before it)
_DIGITS = atomic_re.compile(rb"[A-Za-z0-9_\-+/]++")
_TO_STANDARD_ALPHABET = bytes.maketrans(b"-_", b"+/")


# A decoded run is text when at most this many of its bytes, plus one per
# ``_TEXT_BAD_PER`` bytes, are no UTF-8: what an unknown prefix of base64 digits decodes to
# (a few bytes, before the text) is allowed; random or encrypted bytes, and a run decoded
# at the wrong alignment, have about one bad byte in two.
_TEXT_BAD_FREE = 8
_TEXT_BAD_PER = 32


def _base64_text(digits: bytes) -> bytes | None:
    """``digits`` (either alphabet, no padding needed) decoded, when the result is text
    (UTF-8 but for a few bytes) that may hold a copy (a dot, a percent sign or a
    backslash); else None (binary is no text)."""
    if len(digits) % 4 == 1:
        digits = digits[:-1]
    try:
        data = binascii.a2b_base64(digits.translate(_TO_STANDARD_ALPHABET)
                                   + b"=" * (-len(digits) % 4))
    except (binascii.Error, ValueError):
        return None
    if b"." not in data and b"%" not in data and b"\\" not in data:
        return None
    bad = data.decode("utf-8", "replace").count("\ufffd")
    return data if bad <= _TEXT_BAD_FREE + len(data) // _TEXT_BAD_PER else None


# A long run is decoded whole only at the alignments where a sample of it, past what an
# unknown prefix may take (``_SAMPLE_SKIP`` digits), decodes to text (at most
# ``_SAMPLE_BAD`` bytes no UTF-8: a character cut at either end): one decoding of a base64
# text, none of a binary value, instead of four.
_SAMPLE_SKIP = 16
_SAMPLE_DIGITS = 64
_SAMPLE_BAD = 4
_ALIGNMENTS = range(4)
_FIRST_DIGIT = range(1)


def _text_alignments(digits: bytes) -> Iterable[int]:
    """The alignments (0-3) at which ``digits`` may decode to text. A run too short for a
    sample is decoded from its first digit only (one decoding a run: a head of many short
    runs cost four each; a prefix it may have is one of ``BASE64_PREFIXES``)."""
    if len(digits) < _SAMPLE_SKIP + _SAMPLE_DIGITS + 4:
        return _FIRST_DIGIT
    out = []
    for offset in _ALIGNMENTS:
        start = _SAMPLE_SKIP + offset
        try:
            sample = binascii.a2b_base64(
                digits[start:start + _SAMPLE_DIGITS].translate(_TO_STANDARD_ALPHABET))
        except (binascii.Error, ValueError):
            continue
        if sample.decode("utf-8", "replace").count("\ufffd") <= _SAMPLE_BAD:
            out.append(offset)
    return out


@functools.lru_cache(maxsize=64)
def wrapped_run_floor(issuers: frozenset[str]) -> int:
    """The fewest base64 digits a run must have to hold, encoded whole, a JWT piece whose
    payload names one of ``issuers``: a dot and the payload's digits, the payload at least
    ``{"iss":""}`` around the shortest issuer less a trailing ``/`` (every other reading a
    lenient app may take of an issuer -- escapes, NFKC forms, a list -- is longer). Runs
    shorter than it are not decoded (most cookies and ids of an ordinary head are: decoding
    each cost an ordinary browser head about 17 us); what follows a known prefix is."""
    shortest = min((len(i.rstrip("/")) for i in issuers), default=0)
    payload = -(-4 * (shortest + len('{"iss":""}')) // 3)
    return max(_MIN_WRAPPED_RUN, -(-4 * (1 + payload) // 3) - 2)


# Every prefix of ``BASE64_PREFIXES`` begins with this word (any case).
_PREFIX_WORD = re.compile(rb"(?i)base64")


@functools.lru_cache(maxsize=64)
def _long_run(floor: int) -> re.Pattern[bytes]:
    """A search for a run of at least ``floor`` base64 digits (from a run's first digit)."""
    return re.compile(rb"(?<![A-Za-z0-9_\-+/])[A-Za-z0-9_\-+/]{%d}" % floor)


def _unwrapped_forms(raw: bytes, budget: _ScanBudget,
                     floor: int = _MIN_WRAPPED_RUN) -> tuple[str, ...]:
    """The forms (``_forms``) of the text ``raw`` holds encoded whole as base64 or
    base64url: what follows a known prefix (``BASE64_PREFIXES``), and each run of at least
    ``_MIN_WRAPPED_RUN`` digits at each of the four alignments (also percent-decoded when
    ``raw`` holds ``%``: padding and ``+/`` are often escaped in a cookie), padded or not.
    Only text is kept (``_base64_text``); it is then scanned like any other value (JSON and
    escapes in it included). A run next to a dot is left to the scan as sent (a JWT's
    part, or what follows a prefix, which the table names). Each text found costs
    ``SCAN_PIECE_COST`` of ``budget``, the request's, and is then scanned within it as any
    value is (``_forms``: it adds the text's own allowance); past it ``_TOO_MANY_FORMS``.
    ``raw`` adds none: a value that holds no text (``a`` * 200,000) gives no allowance to
    the rest of the request (its own work is a search, and four samples decoded a run).
    Each run is decoded whole at most at the alignments its sample reads as text."""
    if len(raw) < _MIN_WRAPPED_RUN or (_long_run(floor).search(raw) is None
                                       and _PREFIX_WORD.search(raw) is None):
        return ()  # (most values end at these two searches)
    sources = [raw]
    if b"%" in raw:
        sources.append(unquote_to_bytes(raw))
    texts: list[bytes] = []
    try:
        for source in sources:
            lower = source.lower()
            for prefix, _where in BASE64_PREFIXES:
                at = lower.find(prefix)
                while at >= 0:
                    run = _DIGITS.match(source, at + len(prefix))
                    text = _base64_text(run.group()) if run is not None else None
                    if text is not None:
                        budget.spend(SCAN_PIECE_COST)
                        texts.append(text)
                    at = lower.find(prefix, at + len(prefix))
            for run in _WRAPPED_RUN.finditer(source):
                start, end = run.span()
                if end - start < floor:
                    continue  # (too short to hold a copy naming an issuer)
                if source[start - 1:start] == b"." or source[end:end + 1] == b".":
                    continue  # (a JWT's part: read as sent)
                digits = run.group()
                for offset in _text_alignments(digits):
                    text = _base64_text(digits[offset:])
                    if text is not None:
                        budget.spend(SCAN_PIECE_COST)
                        texts.append(text)
    except _TooManyForms:
        return (_TOO_MANY_FORMS,)
    forms: list[str] = []
    for text in dict.fromkeys(texts):
        for form in _forms(text, plus=False, budget=budget):
            if form is _TOO_MANY_FORMS:
                return (_TOO_MANY_FORMS,)
            forms.append(form)
    return tuple(forms)


# A cookie named ``<name>.<digits>``: a chunk of the value of ``<name>`` (@supabase/ssr's
# ``combineChunks`` joins ``<name>.0``, ``<name>.1``, ... in index order; other cookie
# chunkers do the same), so a token cut across chunks is whole only joined. At most
# ``MAX_CHUNK_DIGITS`` digits of index.
MAX_CHUNK_DIGITS = 4
_CHUNK_NAME = re.compile(rf"(.+)\.(\d{{1,{MAX_CHUNK_DIGITS}}})")
_MAY_BE_CHUNK = re.compile(rb"\.\d{1,%d}[ \t]*=" % MAX_CHUNK_DIGITS)


def _chunk_joins(headers: Headers, budget: _ScanBudget | None = None) -> list[bytes]:
    """The values of the chunked cookies of ``headers`` (every Cookie header, names as sent
    without surrounding whitespace), each name's ``<name>.<n>`` values joined in index
    order (in request order for an index sent twice); only names with two chunks or more
    (one chunk is scanned as it is). Each cookie is in one join at most: the joins are no
    longer than the Cookie headers. ``budget``: the request's (``_ScanBudget``): each
    header split adds its allowance, as a value looked at does, and is charged
    ``SCAN_COOKIE_COST`` for each of its cookies and ``SCAN_CHUNK_COST`` plus its size for
    each chunk (``_TooManyForms`` past it)."""
    groups: dict[str, list[tuple[int, int, str]]] = {}
    order = 0
    for n, v in headers:
        if n != COOKIE or _MAY_BE_CHUNK.search(v) is None:
            continue
        parts = v.decode("latin-1").split(";")
        if budget is not None:
            budget.allow(len(v))
            budget.spend(SCAN_COOKIE_COST * len(parts))
        for part in parts:
            name, sep, value = part.strip(OWS).partition("=")
            chunk = _CHUNK_NAME.fullmatch(name.strip(OWS)) if sep else None
            if chunk is None:
                continue
            if budget is not None:
                budget.spend(SCAN_CHUNK_COST + len(part))
            value = value.strip(OWS)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            order += 1
            groups.setdefault(chunk.group(1), []).append((int(chunk.group(2)), order, value))
    return ["".join(value for _i, _o, value in sorted(chunks)).encode("latin-1")
            for chunks in groups.values() if len(chunks) > 1]


# Path segment and parameter separators: each ends a piece (a space is no base64 digit, so
# ``_COPY_RUN`` ends there). The path is the policy's, already decoded; an encoded ``/`` or
# a double encoding is refused (400) before any token is looked at.
_PATH_SEPARATORS = str.maketrans("/;,", "   ")


def copies(guards: Guards, headers: Headers, query: str, path: str = "") -> list[str]:
    """Tokens of the section's JWT issuers in places no provider reads: any header but
    the ones providers read (``Authorization`` is ``guard_tokens``'s, but for the user and
    password of ``Basic`` credentials), any cookie but the
    providers' own, any query parameter but theirs -- a token whose payload, read
    unverified, names a provider's issuer (``X-Auth-Token``, ``X-Jwt``, ``Token``, a cookie
    ``access_token``, ``?token=``...; found by a hostile review: a forged one reached the
    app, which an app or library that reads such a place takes for the caller's identity).
    Each counts as ``guard_tokens``'s do. A value is looked at further only when it holds a
    run of base64 digits with a dot (``_MAY_BE_COPY``), so most requests cost two C scans
    per header (a dot, a percent sign) and one search per header with a dot. ``path``
    (the request's path, as the policy matched it) counts as a place no provider reads, each
    segment and parameter of it a value (``_path_forms``)."""
    key = tuple(headers)
    last = _LAST_SCAN[0]
    if (last is not None and last[0] is guards and last[2] == query and last[3] == path
            and last[1] == key):
        return list(last[4])
    scan = _Copies(guards.issuers)
    budget = scan.budget
    read = guards.read_headers
    floor = wrapped_run_floor(guards.issuers)
    for n, v in headers:
        if n == AUTHORIZATION:
            # Basic credentials whose user or password is a token (registries, GitLab,
            # Artifactory take one there): the guard reads the other schemes.
            basic = _basic_credentials(v)
            forms = _forms(basic, plus=False, budget=budget) if basic else ()
            own: set[str] | frozenset[str] = frozenset()
        elif n == COOKIE or n not in read:
            # (no dot, nothing an app decodes: no JWT as sent; most values end here)
            plain = b"." in v or b"%" in v or b"\\" in v
            # A value wrapped whole in base64 (``_unwrapped_forms``; session 30 review).
            wrapped = _unwrapped_forms(v, budget, floor)
            if not plain and not wrapped:
                continue
            forms = _forms(v, plus=False, budget=budget) if plain else ()
            if wrapped:
                forms += wrapped
            # (the providers' own cookies: none to look for when no provider reads one, or
            # when the value is counted as a copy unread)
            own = {value for names, value in _cookie_pairs([(n, v)])
                   if not guards.read_cookies.isdisjoint(names)} if (
                n == COOKIE and forms and guards.read_cookies
                and forms[0] is not _TOO_MANY_FORMS
            ) else frozenset()
        else:
            continue
        if forms:
            scan.scan(forms, own)
            if scan.whole < 0:
                break  # (fail closed: nothing more is looked at)
    if scan.whole >= 0:
        # Cookies chunked as ``<name>.0``, ``<name>.1``...: each name's chunks joined in
        # index order, scanned as one value (``_chunk_joins``; session 30 review), the
        # splitting counted in the budget (past it: a copy; thirty-third session).
        try:
            joins = _chunk_joins(headers, budget)
        except _TooManyForms:
            joins = []
            scan.scan((_TOO_MANY_FORMS,), frozenset())
        for joined in joins:
            forms = _forms(joined, plus=False, budget=budget)
            forms += _unwrapped_forms(joined, budget, floor)
            if forms:
                scan.scan(forms, frozenset())
                if scan.whole < 0:
                    break
    if query and scan.whole >= 0:
        raw_query = query.encode("latin-1", "replace")
        forms = _forms(raw_query, plus=True, budget=budget)
        forms += _unwrapped_forms(raw_query, budget, floor)
        if forms:
            scan.scan(forms, _own_query_values(query, guards.read_params) if (
                guards.read_params and forms[0] is not _TOO_MANY_FORMS) else frozenset())
    if path and scan.whole >= 0:
        forms = _path_forms(path, budget)
        if forms:
            scan.scan(forms, frozenset())
    _LAST_SCAN[0] = (guards, key, query, path, tuple(scan.found))
    return scan.found


# The last request's scan (``copies``): its arguments and what it found. ``authenticate``
# asks for a request's copies twice when the connection's memo does not answer it (the memo's
# check, then ``guard_tokens``) -- a request refused for a copy always -- and the second scan
# spent the budget (``_ScanBudget``) again. ``copies`` is a function of its arguments: the
# same arguments (the headers as they were then), the same answer.
_LAST_SCAN: list[tuple[Guards, tuple[tuple[bytes, bytes], ...], str, str,
                       tuple[str, ...]] | None] = [None]


# --- tokens kept out of the records of a path -----------------------------------------------

# What a path segment that holds a token is recorded as: the SHA-256 (hex) of the segment, as
# the audit record's ``jti`` is the SHA-256 of a token's id (``audit.record.hash_token_id``):
# one token's requests can still be told apart and correlated, and nothing of it is kept.
PATH_TOKEN_FORM = "<token sha256:{}>"


def _any_value(value: object) -> bool:
    return True


def _json_has_member(part: str, member: str,
                     spend: Callable[[int], object] | None = None) -> bool:
    """Whether ``part``, read as leniently as ``jwt.names_issuer`` reads a payload
    (``jwt.payload_names``: base64 with or without padding or filler; JSON in UTF-8, -16 or
    -32, with bytes that are no UTF-8, numbers of any size, nested any depth), is JSON
    holding an object, at any depth, with a member ``member`` (in any case). (Before the
    twenty-ninth session a payload ``json`` could not read named nothing here either: the
    path ``copies`` refused was written to the records whole.) ``spend``:
    ``jwt.payload_names``'."""
    return payload_names(part, member, _any_value, spend)


class _PathPieces:
    """The pieces of one path read so far (each read once; at most ``MAX_COPY_PIECES`` read
    whole, as ``_Copies`` reads them), and what reading them may still cost (``budget``,
    as the scan's: ``_ScanBudget``, for the path's size)."""

    __slots__ = ("read", "whole", "budget")

    def __init__(self, size: int = 0) -> None:
        self.read: dict[str, bool] = {}
        self.whole = 0
        self.budget = _ScanBudget()
        self.budget.allow(size)

    def is_token(self, piece: str) -> bool:
        """Whether ``piece`` is a JOSE object: its payload names an issuer (an ``iss``
        member, whatever its value: a superset of what ``copies`` finds for any section's
        issuers), or its first part is a JOSE header (an ``alg`` member: a JWE, a JWS of
        an issuer no section has). Past ``MAX_COPY_PIECES`` pieces read whole, or past
        the budget (``budget``: reading a payload costs what ``copies`` counts for it), a
        piece whose payload reads as a JSON object counts unread (over-reading only hides
        more)."""
        known = self.read.get(piece)
        if known is not None:
            return known
        head, _, rest = piece.partition(".")
        try:
            # (each decoding counted, as the scan counts it; past the budget the piece
            # counts unread)
            spend = self.budget.spend
            payload = _object_payload(piece, spend)
            header = len(head) >= 12 and _object_payload("." + head, spend)
        except _TooManyForms:
            payload = header = True
        if not payload and not header:
            named = False
        elif self.whole >= MAX_COPY_PIECES or self.budget.left < 0:
            named = True
        else:
            self.whole += 1
            spend = self.budget.spend
            try:
                spend(SCAN_PIECE_COST + len(piece))
                named = (payload and _json_has_member(rest.partition(".")[0], "iss", spend)
                         ) or (header and _json_has_member(head, "alg", spend))
            except _TooManyForms:
                named = True  # (past the budget: counted unread)
        self.read[piece] = named
        return named


def _holds_token(text: str, pieces: _PathPieces) -> bool:
    """Whether a path or one of its segments, as sent or as an app may decode it (the forms
    ``_path_forms`` gives the scan), holds a JOSE object (``_PathPieces.is_token``); one that
    decodes to too many forms does (fail closed, as the scan counts it)."""
    for form in _forms(text.encode("latin-1", "replace"), plus=False):
        if form is _TOO_MANY_FORMS:
            return True
        try:
            found = _copy_pieces(form.translate(_PATH_SEPARATORS), pieces.budget.spend)
        except _TooManyForms:
            return True  # (past the budget: fail closed, hidden)
        for piece in found:
            if pieces.is_token(piece):
                return True
    return False


# The shortest segment that can hold a token piece: a header digit, a dot and the 12 digits
# of the shortest payload naming an issuer (decoding only shortens a segment).
_MIN_TOKEN_SEGMENT = 14
# At most this many segments of one path are looked at one by one (after the whole path was
# found to hold a token); from the next one that may hold one the rest of the path is
# replaced unread (fail closed: the work per record stays a few times the scan's, and the
# record no longer than the path, whatever the path).
MAX_PATH_SEGMENTS_READ = 32


def _segment_token(segment: str) -> str:
    return PATH_TOKEN_FORM.format(
        hashlib.sha256(segment.encode("utf-8", "surrogatepass")).hexdigest())


def path_for_records(path: str) -> str:
    """``path`` as the request log line, the audit record and the tap show it: every segment
    that holds a token replaced by ``<token sha256:HEX>`` (``PATH_TOKEN_FORM``, the SHA-256
    of the segment as it was in the path). ``copies`` refuses a token of the section's
    issuers in a segment (``/dl/<jwt>``, ``unread_location``), and the same token beside the
    provider's own is accepted; either way the path was written whole, token and signature,
    to the log line and the audit trail, where the query string never is (found by a
    hostile review, twenty-seventh session; docs/authn.md "Keeping tokens out of logs"). A
    superset of the segments ``copies`` reads a token in, for any section's issuers: any
    JOSE object, in every form the scan reads (percent-encoded dots, backslash escapes, a
    five-part token, a comma-separated piece). The whole path is looked at first, as the
    scan looks at it (most paths end there); only then its segments, at most
    ``MAX_PATH_SEGMENTS_READ`` of them (then the rest of the path is one). The path itself when no segment holds one (the same
    string: callers test ``is``)."""
    if "." not in path and "%" not in path and "\\" not in path:
        return path  # (no dot, nothing decoded: most paths end here)
    pieces = _PathPieces(len(path))
    if not _holds_token(path, pieces):
        return path
    segments = path.split("/")
    out = list(segments)
    read = 0
    for i, segment in enumerate(segments):
        if len(segment) < _MIN_TOKEN_SEGMENT or (
                "." not in segment and "%" not in segment and "\\" not in segment):
            continue
        if read >= MAX_PATH_SEGMENTS_READ:
            # Unread, fail closed: the rest of the path as one (a record no longer than
            # the path's own size, whatever it holds).
            return "/".join((*out[:i], _segment_token("/".join(segments[i:]))))
        read += 1
        if _holds_token(segment, pieces):
            out[i] = _segment_token(segment)
    return "/".join(out)
