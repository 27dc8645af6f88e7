"""Request-target normalisation: one unambiguous path for policy matching, or a refusal.

Theory of operation
-------------------
Path-based authorisation is only as good as the agreement between the proxy and the app
about what the path *is*. Every published bypass of mesh path rules (Istio/Envoy
CVE-2021-31920: ``%2F`` and ``\\`` in paths; CVE-2021-39156: ``#`` fragments in the path)
is a case where the proxy matched one string and the app acted on another. So this module
does not try to be clever about "fixing" odd targets: anything that two reasonable HTTP
stacks could read differently is refused with 400 before any rule runs.

What is refused (reason codes go to logs and audit records only):

* anything but origin-form (``/...``): absolute-form, authority-form, ``*``
  (``target_form``); over-long targets (``target_too_long``);
* raw bytes outside printable ASCII: controls, space, DEL, non-ASCII (``bad_byte``);
* raw ``#`` (``fragment``), raw ``\\`` (``backslash``), raw ``;`` (``semicolon``: Tomcat
  and Spring drop ``;params`` from segments, so ``/admin;x/`` would reach ``/admin/``);
* malformed percent escapes (``bad_escape``); encoded ``/`` or ``\\`` (``encoded_slash``);
  encoded controls, NUL or DEL (``encoded_control``); encoded ``#`` (``fragment``); encoded
  ``;`` (``semicolon``: what is refused raw is refused encoded, in either case of hex, but
  for a space, which raw is no HTTP at all and ``%20`` is how a path holds one); encoded
  ``%`` followed by two hex digits, i.e. double encoding (``double_encoding``); percent
  escapes that do not decode to valid UTF-8 (``bad_utf8``);
* a decoded path with non-ASCII characters (``non_ascii``), unless the service sets
  ``non_ascii_paths: allow``: fullwidth ``．`` and ``／`` and other compatibility forms turn
  into ``.`` and ``/`` in an app that folds to NFKC;
* dot segments ``.`` and ``..``, also when written ``%2e`` (``dot_segment``);
* empty segments (``//``) (``empty_segment``); ``merge_slashes=True`` merges them instead, but
  no configuration sets it: the data path and ``policy explain`` refuse them.

What is rewritten (``normalise_both``): every path has one spelling per decoded path, the
one the policy matches; the app gets the same path in the client's spelling of reserved
characters (both decode alike). ``%XX`` escapes of the
characters a path may hold raw (RFC 3986 ``pchar``: unreserved letters, digits and ``-._~``,
and ``!$&'()*+,=:@``) are decoded, and every other printable character is written as its
upper-case escape, raw or not (``[`` and ``%5b`` are ``%5B``), so ``/%61dmin`` and ``/admin``
are the same path, and so are ``/x%3Ay`` and ``/x:y``; the result is still a valid
origin-form path that is safe to forward as-is.
With ``merge_slashes=True``, runs of ``/`` become one.

Matching additionally ignores one trailing ``/`` (see ``path_segments``), so a deny rule
for ``/admin`` also covers ``/admin/``. Paths are case-sensitive, unless the service section
says ``path_case: insensitive`` (Express, IIS and ASP.NET route that way): then patterns and
paths are matched with ASCII letters folded to lower case (``fold=True``). Only ASCII folds:
that section cannot also allow non-ASCII paths (the loader refuses the combination), and
percent escapes left in a normalised path are of reserved characters, whose hex digits fold
the same on both sides. Such a section's deny rules also fold what Windows names treat as one
file: trailing dots and spaces of a segment and an NTFS stream suffix (``::$DATA``), and
ASP.NET's cookieless values (``/(S(x))/admin``: ``COOKIELESS``; a reading added to the path
as sent, never one that replaces it: ``rule_forms``), and match Windows short
names (``/ADMINI~1``: ``short_name_matches``); its allow rules do not (that
fold is lossy, and would widen them: ``rule_segments``). In every section, deny rules also
match the path after a front controller (``/index.php/admin``,
``/app.wsgi/admin``: ``SCRIPT_SUFFIXES``, ``rule_path_forms``).

Deny rules read more than the path's own segments where real routers do (session 29's
review): each non-ASCII character a case mapping or NFKC turns into ASCII as that ASCII
(``ascii_reading``: ``/%E2%84%AAeys`` is ``/keys`` to JS ``toLowerCase``), a data route as
its page (``/_next/data/<id>/admin.json``, ``/admin/__data.json``: ``_data_route_forms``) and,
after a front controller, the path with spaces and ``+`` trimmed from its ends
(CodeIgniter 4: ``_trimmed_segments``).

The query string is returned unchanged (it passed the same byte checks) and is never part
of the matched path. Where an app routes on it instead of the path -- ``/?/admin/users`` on
``/`` or a front controller (``QUERY_ROUTES``) -- the data path judges the route it gives as
a second path (``query_routes``, ``sidecar.inbound``), and the path with its ends trimmed
(``space_trimmed``) likewise.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from sidecar.errors import BadRequest

MAX_TARGET_BYTES = 8192

_HEX = b"0123456789abcdefABCDEF"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# One spelling per decoded path: a character a path may hold raw (RFC 3986 ``pchar``:
# unreserved, the sub-delims but ';' -- refused --, ':' and '@') is written raw, so
# ``%3A``, ``%40`` and ``%24`` become ``:``, ``@`` and ``$``; every other printable
# character (space, '"', '%', '<', '>', '?', '[', ']', '^', '`', '{', '|', '}') is written
# as its upper-case escape, so a raw '[' and '%5b' are one path too. Before, a raw ':' and
# '%3A' were two paths, which every app decodes to one: a deny rule on '/jobs/x:cancel'
# let '/jobs/x%3Acancel' through (found by a hostile review).
_RAW_IN_PATH = _UNRESERVED | frozenset(b"!$&'()*+,=:@")
_ESCAPED_IN_PATH = frozenset(range(0x20, 0x7F)) - _RAW_IN_PATH - frozenset(b"/")
# Printable ASCII without space; the specific characters below are then refused on top.
_PRINTABLE = frozenset(range(0x21, 0x7F))


_ESCAPE_IN_DECODED = re.compile(rb"%[0-9A-Fa-f]{2}")
# str.lower() also folds non-ASCII ("K" KELVIN SIGN -> "k"); case-insensitive matching folds
# ASCII only, the one folding every framework agrees on.
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _refuse(reason: str, detail: str = "") -> BadRequest:
    return BadRequest(reason, detail)


def normalise_target(
    target: bytes, *, merge_slashes: bool = False, max_length: int = MAX_TARGET_BYTES,
    allow_non_ascii: bool = False,
) -> tuple[str, str]:
    """Split an HTTP request target into (normalised path, raw query).

    Raises ``BadRequest(reason)`` for every ambiguous target (see the module docstring).
    Pure and total: any ``bytes`` either yields a path or raises ``BadRequest``.
    """
    path, _forward, query = normalise_both(target, merge_slashes=merge_slashes,
                                           max_length=max_length,
                                           allow_non_ascii=allow_non_ascii)
    return path, query


def normalise_both(
    target: bytes, *, merge_slashes: bool = False, max_length: int = MAX_TARGET_BYTES,
    allow_non_ascii: bool = False,
) -> tuple[str, str, str]:
    """``normalise_target``'s (path, query) with, in the middle, the path as it is forwarded
    to the app: the same segments, escapes of unreserved characters decoded and the other
    escapes upper-cased, every other character as the client wrote it. The policy matches
    the normalised path (one spelling per decoded path); the app gets the client's spelling
    of reserved characters, which RFC 3986 (6.2.2.2) does not make equivalent to the
    decoded ones: ``%2B`` stays ``%2B`` (a ``+`` is a space to some decoders), ``%3A`` stays
    ``%3A`` (``x:cancel`` is a method call to Google-style routers). Both decode to the same
    path, so an app that decodes acts on the path the policy matched."""
    if len(target) > max_length:
        raise _refuse("target_too_long", f"{len(target)} bytes")
    if not target.startswith(b"/"):
        raise _refuse("target_form", "only origin-form targets are accepted")
    for byte in target:
        if byte not in _PRINTABLE:
            raise _refuse("bad_byte", f"byte 0x{byte:02x}")
    raw_path, _, raw_query = target.partition(b"?")
    if target.find(b"#") >= 0:  # (find: see _has_close in sidecar.http.wire)
        raise _refuse("fragment", "raw '#' in target")
    if raw_path.find(b"\\") >= 0:
        raise _refuse("backslash", "raw backslash in path")
    if raw_path.find(b";") >= 0:
        raise _refuse("semicolon", "';' path parameters are ambiguous")

    out = bytearray()
    fwd = bytearray()
    # Bytes of the decoded path that came from escapes of non-unreserved characters; they
    # must form valid UTF-8 once decoded, or the app may decode them differently.
    decoded = bytearray()
    i = 0
    n = len(raw_path)
    while i < n:
        byte = raw_path[i]
        if byte != 0x25:  # '%'
            if byte in _ESCAPED_IN_PATH:
                out += b"%%%02X" % byte
            else:
                out.append(byte)
            fwd.append(byte)
            decoded.append(byte)
            i += 1
            continue
        if i + 2 >= n:
            raise _refuse("bad_escape", "truncated percent escape")
        hi, lo = raw_path[i + 1], raw_path[i + 2]
        if hi not in _HEX or lo not in _HEX:
            raise _refuse("bad_escape", "percent not followed by two hex digits")
        value = int(bytes((hi, lo)), 16)
        if value in (0x2F, 0x5C):
            raise _refuse("encoded_slash", "percent-encoded '/' or '\\'")
        if value < 0x20 or value == 0x7F:
            raise _refuse("encoded_control", f"encoded byte 0x{value:02x}")
        if value == 0x23:
            raise _refuse("fragment", "percent-encoded '#'")
        if value == 0x3B:  # an app that decodes before it splits ;params reads a raw one
            raise _refuse("semicolon", "percent-encoded ';'")
        if value == 0x25 and i + 4 < n and raw_path[i + 3] in _HEX and raw_path[i + 4] in _HEX:
            raise _refuse("double_encoding", "percent-encoded '%' followed by hex digits")
        if value in _RAW_IN_PATH:
            out.append(value)
        else:
            out += b"%" + bytes((hi, lo)).upper()
        if value in _UNRESERVED:
            fwd.append(value)
        else:
            fwd += b"%" + bytes((hi, lo)).upper()
        decoded.append(value)
        i += 3
    if _ESCAPE_IN_DECODED.search(decoded) is not None:
        # Decoded once, the path still holds an escape ("%25%41a" -> "%Aa"): an app that
        # decodes again would read a different path than the one the policy matched.
        raise _refuse("double_encoding", "the decoded path still holds a percent escape")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("bad_utf8", "escapes do not decode to UTF-8") from None
    if not allow_non_ascii and not text.isascii():
        # Fullwidth dots and slashes and other compatibility forms become "." and "/" in an
        # app that folds to NFKC: the policy would match one path and the app act on another.
        raise _refuse("non_ascii", "decoded path holds non-ASCII characters")

    segments = bytes(out).split(b"/")[1:]
    forwarded = bytes(fwd).split(b"/")[1:]  # ('/' is never escaped: the same segments)
    kept: list[bytes] = []
    kept_fwd: list[bytes] = []
    for index, segment in enumerate(segments):
        if segment in (b".", b".."):
            raise _refuse("dot_segment", "'.' or '..' segment")
        if segment and not segment.replace(b"%20", b"").strip(b"."):
            # Only dots and spaces ("..%20", "...", ". "): Windows drops a name's trailing
            # dots and spaces, so IIS reads "..%20" as "..", a step up the policy never saw
            # (found by a hostile review).
            raise _refuse("dot_segment", "a segment of dots and spaces only")
        if segment == b"" and index != len(segments) - 1:
            if not merge_slashes:
                raise _refuse("empty_segment", "'//' in path")
            continue
        kept.append(segment)
        kept_fwd.append(forwarded[index])
    path = "/" + "/".join(s.decode("ascii") for s in kept)
    forward = "/" + "/".join(s.decode("ascii") for s in kept_fwd)
    return path, forward, raw_query.decode("ascii")


# The data path's targets repeat (one service, a few routes): the normalisation of a short
# target is kept, per process, in a small LRU. Refusals are never kept (lru_cache does not
# cache exceptions): a refused target is refused afresh every time, with its reason.
KEPT_TARGET_BYTES = 256  # longer targets are normalised every time (bounds the memory)
KEPT_TARGETS = 1024


@functools.lru_cache(maxsize=KEPT_TARGETS)
def _kept_both(target: bytes, allow_non_ascii: bool) -> tuple[str, str, str]:
    return normalise_both(target, allow_non_ascii=allow_non_ascii)


def normalise_request_both(target: bytes, *, allow_non_ascii: bool = False
                           ) -> tuple[str, str, str]:
    """``normalise_both`` with the default options, kept for short targets (the data path:
    the path it matches, the path it forwards, the query)."""
    if len(target) <= KEPT_TARGET_BYTES:
        return _kept_both(target, allow_non_ascii)
    return normalise_both(target, allow_non_ascii=allow_non_ascii)


# A ``path_case: insensitive`` section folds two things. ASCII case is lossless for an app
# that routes case-insensitively (``/Admin`` and ``/admin`` are one route to it), so it folds
# for every rule. The Windows-name fold is lossy: it drops, from each segment, what IIS's
# file mapping drops (the family below), but ASP.NET Core routing and Google-style custom
# methods read those characters as part of the route (``/jobs/42:get`` and
# ``/jobs/42:cancel`` are two handlers; ``/jobs/42`` a third). So it folds only where it can
# only refuse more: for rules of ``NAME_FOLD_EFFECTS`` (deny). An allow rule matches the path
# with its case folded and nothing else dropped; before, ``allow /v1/jobs/42:get`` also let
# ``/v1/jobs/42:cancel`` and ``/v1/jobs/42`` in (found by a hostile review).
WINDOWS_STREAM = ":"  # a Windows name holds no ':': what follows the first one is a stream
WINDOWS_TRAILING = (".", "%20")  # dropped from a name's end, repeatedly ("admin. .")
NAME_FOLD_EFFECTS = frozenset({"deny"})


def path_segments(path: str, fold: bool = False, names: bool = True) -> tuple[str, ...]:
    """The segments used for matching: one trailing ``/`` is not significant.

    ``/`` -> ``()``, ``/a`` and ``/a/`` -> ``("a",)``, ``/a/b`` -> ``("a", "b")``.
    ``fold``: ASCII letters lower-cased (a ``path_case: insensitive`` section) and, unless
    ``names`` is false, Windows names folded too: a segment's trailing dots and spaces
    (``%20``) and NTFS stream suffix (from its first ``:``) dropped -- the lossy fold, for
    deny rules only (``rule_segments``). With ``names`` and without ``fold`` (a deny rule's
    reading in a section that may allow non-ASCII paths), also each non-ASCII character that a case mapping or NFKC turns into ASCII
    read as that ASCII (``ascii_reading``: the KELVIN SIGN is ``k``).
    """
    if fold:
        path = path.translate(_ASCII_LOWER)
    if names and not fold and path.find("%") >= 0:
        # (deny: non-ASCII letters read as ASCII, ``ascii_reading``; a ``fold`` section
        # holds no non-ASCII path: the loader refuses it with ``non_ascii_paths: allow``)
        path = ascii_reading(path)
    if fold and names and path.find("(") >= 0:
        return _cookieless_segments(path)
    return _sent_segments(path, fold and names)


def _sent_segments(path: str, names: bool) -> tuple[str, ...]:
    # The path's own segments (one trailing "/" dropped), each a folded Windows name with
    # ``names``; ``path`` is already case-folded where the section folds.
    if path.endswith("/"):
        path = path[:-1]
    if not path:
        return ()
    segments = tuple(path.split("/")[1:])
    return tuple(_windows_name(s) for s in segments) if names else segments


# ASP.NET (the .NET Framework one IIS hosts) reads cookieless session, anonymous-id and
# forms-auth values from the path and removes them before it routes: "/(S(x))/admin",
# "/(S(a)F(b))/admin" and, before the August 2023 fix (CVE-2023-36899), anywhere in it:
# "/ad(S(x))min" ran "/admin". The name fold of a ``path_case: insensitive`` section (the
# IIS one) removes them too, for deny rules only; what is left is read as ASP.NET would read
# it: empty and "." segments dropped, ".." a step up. Found by a hostile review: a deny rule
# for /admin/** let "/(S(x))/admin/users" through. That reading is one more form a deny rule
# matches, besides the path as sent (``rule_forms``): a later review found it replacing the
# path, so that ``deny /admin/*`` let "/admin/(S(x))" through (an Express route's ":id").
COOKIELESS = re.compile(r"\((?:[a-z]\([^()/]*\))+\)")


def allow_view(path: str, fold: bool) -> tuple[str, ...] | None:
    """For an allow rule of a ``fold`` section: the segments ASP.NET routes ``path`` (a
    request path) as once its cookieless values are removed, when they differ from the path
    as sent, else None. An allow rule must match both (a lossy fold never admits more): an
    allow for ``/public/**`` does not admit ``/public/..(S(x))/admin``, which ASP.NET reads
    as ``/public/../admin``. Empty segments left are dropped; a segment of dots and spaces
    only gives ``("/",)``, which no pattern but ``/**`` matches."""
    if not fold or path.find("(") < 0:
        return None
    lowered = path.translate(_ASCII_LOWER)
    stripped = COOKIELESS.sub("", lowered)
    if stripped == lowered:
        return None
    segments = tuple(s for s in stripped.split("/")[1:] if s)  # ("//" read as "/")
    for segment in segments:
        if not segment.replace("%20", "").strip("."):
            return ("/",)
    return segments


def _cookieless_segments(path: str) -> tuple[str, ...]:
    # (path is already case-folded: the letter is matched in lower case)
    kept: list[str] = []
    for segment in COOKIELESS.sub("", path).split("/")[1:]:
        name = _windows_name(segment) if segment else segment
        if name in ("", "."):
            continue
        if name == "..":
            if kept:
                kept.pop()
            continue
        kept.append(name)
    return tuple(kept)


# A section that does not say ``path_case`` does not say how its app treats case: Express
# (by default), IIS and ASP.NET serve ``/ADMIN`` by the ``/admin`` handler, Django, Rails and
# Go do not. Its deny rules therefore match with ASCII case folded (a deny rule for
# ``/admin/**`` denies ``/ADMIN/x``: folding only ever refuses more), and its allow rules as
# sent (folding would admit more). Only case, not the Windows-name fold of a
# ``path_case: insensitive`` section. ``path_case: sensitive`` says the app tells case apart:
# then deny rules match exact case too. Before the twenty-first session deny rules matched
# exact case there and only ``policy lint`` warned (found by a hostile review).
CASE_FOLD_EFFECTS = frozenset({"deny"})


def ascii_lower(text: str) -> str:
    """``text`` with ASCII letters lower-cased, nothing else (``str.lower`` folds the Kelvin
    sign and others, which routers do not agree on)."""
    return text.translate(_ASCII_LOWER)


# Non-ASCII letters an app reads as ASCII ones. A section that allows non-ASCII paths
# (``non_ascii_paths: allow``) and does not say ``path_case`` folds ASCII case for deny rules,
# but case-insensitive routers fold more than ASCII: Fastify/find-my-way ``caseSensitive:
# false`` and every JS router lower-case with ``toLowerCase`` (U+212A KELVIN SIGN is ``k``),
# Java's ``equalsIgnoreCase`` compares upper and lower case (U+017F LONG S is ``s``, U+0131
# DOTLESS I is ``i``), PHP's ``mb_strtolower`` and .NET's ``ToLowerInvariant`` map the
# Kelvin sign and the Angstrom sign, and an app that folds to NFKC reads the fullwidth
# ``ＡＤＭＩＮ`` as ``ADMIN``. Found by a hostile review (session 29): ``/%E2%84%AAeys/export``
# ran ``/keys/export`` on Fastify past ``deny /keys/**``. The section is not refused at load
# (``non_ascii_paths: allow`` is for apps with non-ASCII routes, which are not wrong to
# exist): a deny rule reads each non-ASCII character whose NFKC form, lower or upper case or
# case fold (``ASCII_READINGS``, tried in that order) is ASCII as that ASCII,
# in the case of the path (``_ascii_of``), with its characters written as a path writes them
# (``_RAW_IN_PATH``, else escaped: NO-BREAK SPACE is ``%20``), never a ``/`` (``℀``, NFKC ``a/c``, is left alone: a reading keeps the
# path's segments, so it only ever matches more). Patterns are read alike (``rule_forms``),
# so ``deny /keys/**`` denies ``/ＫＥＹＳ/x`` and ``/ſecret`` is ``/secret``. Deny rules only
# (lossy: an allow rule matches as sent), and for any path holding a percent escape of a
# non-ASCII UTF-8 sequence (``_NON_ASCII_ESCAPES``); the per-character answer is computed when
# first met and kept (``_ascii_of``).
_SIMPLE_LOWER = {"\u0130": "i"}
ASCII_READINGS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("NFKC (Python unicodedata; an app that normalises paths)",
     lambda c: unicodedata.normalize("NFKC", c)),
    ("lower case (JS toLowerCase, mb_strtolower, ToLowerInvariant)", str.lower),
    ("upper case (Java equalsIgnoreCase, ToUpperInvariant)", str.upper),
    ("case fold (Unicode full case folding)", str.casefold),
    # Simple (one-to-one) case mappings where the full one differs: Java's
    # ``Character.toLowerCase`` (so ``equalsIgnoreCase``) maps U+0130 ``İ`` to ``i``, where
    # Python's full mapping gives ``i`` and a combining dot (found by a review of this
    # table; compared over every code point, the only one).
    ("simple lower case (Java Character.toLowerCase)", lambda c: _SIMPLE_LOWER.get(c, "")),
)
# One escaped UTF-8 sequence of a non-ASCII character, in either case of hex (a section that
# folds case for deny rules lower-cases the path's escapes with its letters).
_NON_ASCII_ESCAPES = re.compile(
    r"%[c-fC-F][0-9a-fA-F](?:%[89abAB][0-9a-fA-F]){1,3}")


@functools.lru_cache(maxsize=4096)
def _ascii_of(seq: str) -> str:
    """The ASCII reading of one escaped UTF-8 sequence ``seq`` (``ASCII_READINGS``), in the
    hex case of ``seq``'s escapes, or ``seq`` itself."""
    try:
        char = unquote_to_bytes(seq).decode("utf-8")
    except UnicodeDecodeError:
        return seq
    for _name, mapping in ASCII_READINGS:
        mapped = mapping(char)
        if mapped and mapped.isascii() and mapped.find("/") < 0:
            break
    else:
        return seq
    # A path whose escapes are in lower-case hex had its ASCII case folded (a normalised
    # path writes upper-case hex; ``ascii_lower`` of a deny rule that folds case lowers
    # them): its reading is lower-cased too. Otherwise the mapping's case is kept (a
    # ``path_case: sensitive`` section: fullwidth ``Ａ`` is ``A``).
    lower_hex = seq[1] in "cdef"
    if lower_hex:
        mapped = mapped.translate(_ASCII_LOWER_STR)
    out = []
    for ch in mapped:
        if ord(ch) in _RAW_IN_PATH:
            out.append(ch)
        else:
            escape = f"%{ord(ch):02X}"
            out.append(escape.lower() if lower_hex else escape)
    return "".join(out)


_ASCII_LOWER_STR = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def ascii_reading(path: str) -> str:
    """``path`` (normalised: non-ASCII characters are escaped) with each non-ASCII character
    that reads as ASCII (``ASCII_READINGS``) written as that ASCII (lower-cased in a path
    whose case is folded)."""
    if _NON_ASCII_ESCAPES.search(path) is None:
        return path
    return _NON_ASCII_ESCAPES.sub(lambda m: _ascii_of(m.group(0)), path)


def rule_segments(path: str, fold: bool, effect: str) -> tuple[str, ...]:
    """The segments a rule of ``effect`` (``allow``/``deny``) matches ``path`` (a request
    path or a rule's pattern) in: in a ``fold`` section, case folded for every rule, and
    Windows names folded for deny rules only (``NAME_FOLD_EFFECTS``)."""
    return path_segments(path, fold, effect in NAME_FOLD_EFFECTS)


# Format suffixes. Rails routes every path ``/x`` as ``/x(.:format)``: ``/admin.json`` and
# ``/orders/7/refund.xml`` run the ``/admin`` and ``/orders/7/refund`` actions (the format
# holds no dot: the last one starts it). Spring MVC before 5.3 matched a pattern ``/x`` as
# ``/x.*`` (its default suffix pattern matching: ``/admin.json.bak`` too, from the first
# dot). A deny rule for ``/admin`` meant that action, so deny rules also match the request
# path with its last segment's suffix dropped, from the last dot and from the first, unless
# the section says ``format_suffixes: keep``. Like the Windows-name fold it is lossy, so only
# deny rules fold (``FORMAT_FOLD_EFFECTS``): an allow rule for ``/reports`` does not admit
# ``/reports.json``. A segment that starts with its dot (``/.env``) is not folded. Found by a
# hostile review.
FORMAT_FOLD_EFFECTS = frozenset({"deny"})

# PHP front controllers. Laravel, Symfony, CodeIgniter, Slim and most PHP frameworks route
# the path *after* the script: "/index.php/admin" runs the "/admin" route (Symfony's
# ``Request::getPathInfo`` drops the script's name, ``/index.php``, from the request URI),
# and the web-server configurations their documentation gives pass such paths to PHP
# (nginx ``location ~ ^/index\.php(/|$)`` with ``fastcgi_split_path_info``; Apache's
# ``AcceptPathInfo``; ``php artisan serve``). So a deny rule also matches the path that
# follows a segment whose name ends in ``.php`` (any case; the first such segment, as
# Apache finds the script, and the last, as nginx's greedy split does): ``/index.php`` and
# ``/index.php/`` are ``/`` to those apps. And the script is run whatever follows it (the
# rest is its PATH_INFO): a deny rule also matches the path up to that segment, so
# ``deny /admin.php`` denies ``/admin.php/x``, and the same for the other scripts that take
# one (``PATH_INFO_SUFFIXES``). Lossy, so deny rules only, in every section.
# Found by a hostile review: a deny rule for /admin/** let "/index.php/admin/users" through,
# and one for /admin.php let "/admin.php/x".
SCRIPT_FOLD_EFFECTS = frozenset({"deny"})
# Scripts that run with a PATH_INFO, as data: (suffix, whether it is a front controller --
# its frameworks route the path after it --, where a server runs it so). Every entry's path
# up to the script is a form (``PATH_INFO_SUFFIXES``: ``deny /cgi-bin/tool.wsgi`` denies
# ``/cgi-bin/tool.wsgi/x``); a front controller's path after it is one too
# (``FRONT_CONTROLLER_SUFFIXES``: ``deny /admin/**`` denies ``/app.wsgi/admin/users``).
# Lossy both ways, so deny rules only: a suffix listed that a given app does not run only
# makes its deny rules match more. Found by hostile reviews: only ``.php`` was a front
# controller (``/index.phtml/admin/x``, ``/index.cfm/admin/x``, ``/app.cgi/admin/x``,
# ``/dispatch.fcgi/admin/x`` passed ``deny /admin/**``; ``/elmah.axd/download`` passed
# ``deny /elmah.axd``), then (session 29) ``.wsgi`` was in neither list and ``.py`` and
# ``.pl`` were no front controllers: ``/cgi-bin/app.wsgi/admin/users``, ``/cgi-bin/app.py/
# admin/users`` and ``/cgi-bin/app.pl/admin/users`` ran the ``/admin/users`` route (mod_wsgi,
# a wsgiref/Werkzeug CGIHandler, a Perl CGI) past ``deny /admin/**``. Not here: servlet
# extension mappings (``*.jsp``, ``*.do``, ``*.action``), which match a path's last segment
# only (``/x.jsp/y`` is no JSP to Tomcat or Jetty), and static files.
SCRIPT_SUFFIXES: tuple[tuple[str, bool, str], ...] = (
    # PHP, in every extension Debian's and php-fpm's stock configurations run as PHP
    # (<FilesMatch ".+\.ph(?:ar|p|tml)$">, the old .php3-.php8 and .pht); Laravel, Symfony
    # (Request::getPathInfo), CodeIgniter, Slim route the path after the script, passed by
    # nginx's fastcgi_split_path_info and Apache's AcceptPathInfo
    (".php", True, "PHP"), (".phtml", True, "PHP"), (".phar", True, "PHP"),
    (".pht", True, "PHP"), (".php3", True, "PHP"), (".php4", True, "PHP"),
    (".php5", True, "PHP"), (".php7", True, "PHP"), (".php8", True, "PHP"),
    # ColdFusion and Lucee map *.cfm/*, *.cfml/*, *.cfc/*; ColdBox and FW/1 route
    # /index.cfm/handler/action
    (".cfm", True, "ColdFusion"), (".cfml", True, "ColdFusion"), (".cfc", True, "ColdFusion"),
    # CGI: Apache's "AddHandler cgi-script .cgi .pl" (mod_cgi and its CGI how-to, Debian's
    # .py and .sh too), lighttpd's cgi.assign (".pl", ".cgi", ".rb", ".erb", ".py" in its
    # stock conf.d/cgi.conf), ModPerl::Registry (.pl, .cgi), IIS ActivePerl's PerlIS (.plx),
    # mod_ruby (.rbx), mod_python's publisher (/x.py/function); the apps behind them route
    # on PATH_INFO: Werkzeug's and wsgiref's CGIHandler, Plack::Handler::CGI,
    # CGI::Application::Dispatch, Catalyst's _cgi.pl, Rack::Handler::CGI (Sinatra, Rails)
    (".cgi", True, "CGI"), (".pl", True, "Perl CGI"), (".plx", True, "PerlIS (IIS)"),
    (".py", True, "Python CGI, mod_python"), (".rb", True, "Ruby CGI"),
    (".rbx", True, "mod_ruby"), (".sh", False, "shell CGI"),
    (".erb", False, "eruby (lighttpd cgi.assign)"), (".rhtml", False, "eruby"),
    # FastCGI: mod_fcgid's "AddHandler fcgid-script .fcgi", mod_fastcgi's "AddHandler
    # fastcgi-script fcg fcgi fpl"; Rails' dispatch.fcgi
    (".fcgi", True, "FastCGI"), (".fcg", True, "FastCGI"), (".fpl", True, "FastCGI Perl"),
    # mod_wsgi's "AddHandler wsgi-script .wsgi" (its configuration guidelines): Flask and
    # Django route the PATH_INFO after the script's SCRIPT_NAME
    (".wsgi", True, "mod_wsgi"),
    # mod_lua's "AddHandler lua-script .lua" (r.path_info)
    (".lua", True, "mod_lua"),
    # IIS's stock handlers: ISAPI-dll and CGI-exe (allowPathInfo="true"; Delphi WebBroker
    # ISAPI and CGI apps route on PathInfo); WCF's .svc (WebHttp UriTemplates match the
    # path after it) and the other System.ServiceModel ones (.xamlx, .xoml, .rules);
    # ASP.NET pages, handlers, ASMX (/svc.asmx/Method calls a method) and .axd handlers
    # (ELMAH's /elmah.axd/download is its whole error log), .NET Remoting (.rem, .soap),
    # Web Pages (.cshtml, .vbhtml, .cshtm, .vbhtm: UrlData), .aspq; classic ASP (asp.dll
    # also runs .cer: the SecurityCertificate handler)
    (".dll", True, "ISAPI"), (".exe", True, "IIS CGI"), (".svc", True, "WCF"),
    (".xamlx", False, "WCF"), (".xoml", False, "WCF"), (".rules", False, "WCF"),
    (".aspx", False, "ASP.NET"), (".ashx", False, "ASP.NET"), (".asmx", False, "ASP.NET"),
    (".axd", False, "ASP.NET"), (".rem", False, ".NET Remoting"),
    (".soap", False, ".NET Remoting"), (".cshtml", False, "ASP.NET Web Pages"),
    (".vbhtml", False, "ASP.NET Web Pages"), (".cshtm", False, "ASP.NET Web Pages"),
    (".vbhtm", False, "ASP.NET Web Pages"), (".aspq", False, "ASP.NET"),
    (".asp", False, "classic ASP"), (".cer", False, "classic ASP"),
)
# Front controllers: scripts whose frameworks route the path after them.
FRONT_CONTROLLER_SUFFIXES = tuple(s for s, front, _ in SCRIPT_SUFFIXES if front)
# Every script that runs with a PATH_INFO: the path up to it is a form.
PATH_INFO_SUFFIXES = tuple(s for s, _, _ in SCRIPT_SUFFIXES)


def _script_forms(segs: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The path up to the first and the last script segment (``PATH_INFO_SUFFIXES``), and
    the path after the first and the last front controller (``FRONT_CONTROLLER_SUFFIXES``;
    a segment that is its suffix alone, ``/.php``, is no script)."""
    forms: list[tuple[str, ...]] = []
    scripts = [i for i, s in enumerate(segs[:-1]) if s.lower().endswith(PATH_INFO_SUFFIXES)]
    if scripts:
        forms.extend(segs[:i + 1] for i in dict.fromkeys((scripts[0], scripts[-1])))
    found = [i for i, s in enumerate(segs) if (low := s.lower()).endswith(
        FRONT_CONTROLLER_SUFFIXES) and low not in FRONT_CONTROLLER_SUFFIXES]
    if found:
        forms.extend(segs[i + 1:] for i in dict.fromkeys((found[0], found[-1])))
    return forms


def rule_forms(path: str, fold: bool, effect: str) -> tuple[tuple[str, ...], ...]:
    """The segment tuples a rule of ``effect`` reads ``path`` (a request path or a rule's
    pattern) as, before the front-controller and format-suffix forms: its ``rule_segments``
    and, for a deny rule of a ``fold`` section whose path holds a ``(``, also the path as
    sent (case and each segment's Windows name folded, ``(S(x))`` and ``..(S(x))`` kept as
    segments). The cookieless reading is a form ADDED to the path as sent, never one that
    replaces it: ``/admin/(S(x))`` is ``/admin`` to ASP.NET but a segment under ``/admin``
    to Express (``app.get('/admin/:id')``), so ``deny /admin/*`` must refuse it, and
    ``/secret/..(S(x))/y`` is ``/y`` to ASP.NET but under ``/secret`` to every other router.
    Found by a hostile review (session 28): the fold replaced the path, and a
    ``path_case: insensitive`` section denied LESS than a ``sensitive`` one. A pattern is
    indexed in every form and a request matched in every form, so a deny rule matches
    whenever one of each agree: never fewer matches than without the fold."""
    segs = rule_segments(path, fold, effect)
    if fold and effect in NAME_FOLD_EFFECTS and path.find("(") >= 0:
        sent = _sent_segments(path.translate(_ASCII_LOWER), True)
        if sent != segs:
            return (sent, segs)
    return (segs,)


def rule_path_forms(path: str, fold: bool, effect: str,
                    formats: bool) -> tuple[tuple[str, ...], ...]:
    """The segment tuples a rule of ``effect`` matches the request ``path`` in: its
    ``rule_forms``; for a deny rule also, of each, the path after a PHP front controller and
    the path up to a script that takes a PATH_INFO (``SCRIPT_FOLD_EFFECTS``), and in a
    section that folds format suffixes (``formats``) each with its last segment's suffix
    dropped (see above)."""
    readings = rule_forms(path, fold, effect)
    if effect not in SCRIPT_FOLD_EFFECTS or path.find(".") < 0:
        return readings
    forms: list[tuple[str, ...]] = []
    for segs in readings:
        for base in (segs, *_script_forms(segs), *_data_route_forms(segs)):
            trimmed = _trimmed_segments(base)
            for each in (base,) if trimmed is None else (base, trimmed):
                for form in _suffix_forms(each, formats and effect in FORMAT_FOLD_EFFECTS):
                    if form not in forms:
                        forms.append(form)
    return tuple(forms)


# Framework data routes: a URL that runs a page's server-side code and returns its data, at
# another path than the page's. Lossy (a path of that shape in another app is its own
# route), so deny rules only (``SCRIPT_FOLD_EFFECTS``): a deny rule for a page also matches
# its data route. Found by a hostile review (session 29): ``deny /admin/**`` let
# ``/_next/data/<buildId>/admin/users.json`` run /admin/users' getServerSideProps (Next.js),
# and ``deny /admin`` let ``/admin/__data.json`` run /admin's ``load`` (SvelteKit).
# Next.js pages router (``/_next/data/<buildId>/<page>.json``; the build id is in every
# page's HTML): the page is the path after the build id without ``.json``; ``index`` is its
# directory (``index.json`` is ``/``); with i18n the first segment may be a locale
# (``/_next/data/<id>/fr/admin/users.json`` is ``/fr/admin/users`` and ``/admin/users``).
NEXT_DATA = ("_next", "data")
NEXT_DATA_SUFFIX = ".json"
# SvelteKit (``DATA_SUFFIX``, ``HTML_DATA_SUFFIX`` in its runtime): a last segment
# ``__data.json`` is its parent page's data (also ``?x-sveltekit-invalidated=...``), and a
# last segment ``x.html__data.json`` is ``x.html``'s.
SVELTEKIT_DATA = "__data.json"
SVELTEKIT_HTML_DATA = ".html__data.json"


def _data_route_forms(segs: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The page paths a data route (``NEXT_DATA``, ``SVELTEKIT_DATA``) runs; none for
    any other path."""
    if not segs:
        return []
    last = segs[-1]
    if last.endswith(SVELTEKIT_DATA):
        if last == SVELTEKIT_DATA:
            return [segs[:-1]]
        if last.endswith(SVELTEKIT_HTML_DATA) and len(last) > len(SVELTEKIT_HTML_DATA):
            return [segs[:-1] + (last[:-len(SVELTEKIT_DATA)],)]
        return []
    if len(segs) < 4 or segs[0].lower() != NEXT_DATA[0] or segs[1].lower() != NEXT_DATA[1] \
            or not last.lower().endswith(NEXT_DATA_SUFFIX) or len(last) == len(NEXT_DATA_SUFFIX):
        return []
    page = segs[3:-1] + (last[:-len(NEXT_DATA_SUFFIX)],)
    pages = [page]
    if len(page) > 1:  # (i18n: a locale first)
        pages.append(page[1:])
    forms: list[tuple[str, ...]] = []
    for each in pages:
        forms.append(each)
        if each[-1] == "index":  # (``index.json``: the directory's page)
            forms.append(each[:-1])
    return forms


# CodeIgniter 4 decodes its route path with ``+`` as a space (``urldecode``) and trims spaces
# and slashes from both of its ends (``Router::checkRoutes``: ``trim($uri, '/ ')``), so
# ``/%20admin/users``, ``/+admin/users`` and ``/+/admin/users`` run ``admin/users``, and
# ``/reports/export+`` and ``/reports/export/+`` run ``reports/export``. Refusing segments
# that begin or end with a space or ``+`` would refuse ordinary URLs (``/tags/c++``,
# ``/+user``), so deny rules match the path with those ends trimmed too: a reading added to
# the path as sent (``deny /reports/export/*`` still matches ``/reports/export/+``), deny
# rules only. Found by a hostile review (session 29). For a path after a front controller
# (``/index.php/+admin``) it is a form (``rule_path_forms``); for the path itself, which
# holds no ``.`` (the rule index reads such a path in one form), the data path judges the
# trimmed path as a second path by deny rules (``space_trimmed``, ``sidecar.inbound``).
_CI_TRIMMED = re.compile(r"^(?:/|\+|%20)+|(?:/|\+|%20)+$")


def _trimmed_segments(segs: tuple[str, ...]) -> tuple[str, ...] | None:
    if not segs or not (segs[0][:1] in ("+", "%") or segs[-1].endswith(("+", "%20"))):
        return None
    joined = "/".join(segs)
    trimmed = _CI_TRIMMED.sub("", joined)
    if trimmed == joined:
        return None
    return tuple(trimmed.split("/")) if trimmed else ()


def space_trimmed(path: str) -> str | None:
    """``path`` (a normalised request path) as CodeIgniter 4 routes it (``_CI_TRIMMED``:
    ``+`` and ``%20`` as spaces, spaces and slashes trimmed from both ends) when that is
    another path, else None. A constant check for nearly every path: only one that starts
    with ``/+`` or ``/%`` or ends with ``+`` or ``%20`` (before one trailing ``/``) is read."""
    end = len(path) - 1 if path.endswith("/") else len(path)
    if not (path[1:2] in ("+", "%") or path[end - 1:end] == "+"
            or path.endswith("%20", 0, end)):
        return None
    inner = path[1:end]
    trimmed = _CI_TRIMMED.sub("", inner)
    if trimmed == inner:
        return None
    return "/" + trimmed


def _suffix_forms(segs: tuple[str, ...], formats: bool) -> tuple[tuple[str, ...], ...]:
    if not formats or not segs:
        return (segs,)
    last = segs[-1]
    first = last.find(".")
    if first <= 0:
        return (segs,)
    head = segs[:-1]
    forms = [segs, head + (last[:first],)]
    final = last.rfind(".")
    if final != first:
        forms.append(head + (last[:final],))
    return tuple(forms)


# Windows short (8.3) names. On a volume that makes them (the system volume does by
# default: inetpub\wwwroot), IIS serves a file or directory under its short name as well:
# "/ADMINI~1/x" is "/administration/x", "/REPORT~1.XLS" is "/report-2024.xlsx". The short
# name is the long one's first letters (spaces and all but the last dot dropped, at most
# eight characters with "~N"), or, after a few clashes, two letters and a hash ("AD3F~1"),
# with the first three letters of the extension. A deny rule of a ``path_case: insensitive``
# section (the IIS one) matches a request segment of that shape where its pattern has a
# name the short one can stand for (``SegmentTrie.match``, ``segments_match``: ``short``).
# Lossy (it cannot tell which name the file system gave), so deny rules only. Found by a
# hostile review: a deny rule for /administration/** let "/ADMINI~1/users" through.
SHORT_NAME = re.compile(r"([^~.]{1,6})~([1-9][0-9]{0,5})(?:\.([^.]{1,3}))?")
_LONG_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


def short_name_matches(short: str, name: str) -> bool:
    """Can the (case-folded) request segment ``short``, a Windows short name, stand for the
    (case-folded) pattern segment ``name``? False when ``short`` is no short name."""
    if short.find("~") < 0:
        return False
    m = SHORT_NAME.fullmatch(short)
    if m is None or name in ("*", "**"):
        return False
    prefix, number, ext = m.group(1), m.group(2), m.group(3) or ""
    if len(prefix) + 1 + len(number) > 8:
        return False
    long = _LONG_ESCAPE.sub("_", name.replace("%20", "").lstrip("."))
    stem, dot, long_ext = long.rpartition(".")
    if not dot:
        stem, long_ext = long, ""
    stem = stem.replace(".", "")
    for bad in "+,=[]":
        stem = stem.replace(bad, "_")
    if long_ext[:3] != ext:
        return False
    if stem.startswith(prefix):
        return True
    # the hashed form: two letters of the name and four hex digits
    return len(prefix) == 6 and stem.startswith(prefix[:2]) and all(
        c in "0123456789abcdef" for c in prefix[2:])


_WINDOWS_TAIL = re.compile("(?:" + "|".join(map(re.escape, WINDOWS_TRAILING)) + ")+$")


def _windows_name(segment: str) -> str:
    # IIS and ASP.NET map paths onto Windows names, where "admin.", "admin " and an NTFS
    # stream of the name ("admin::$DATA", "admin::$INDEX_ALLOCATION", "admin:$i30:$INDEX_
    # ALLOCATION", "admin:s") are the file or directory "admin": fold them like case (a
    # case-insensitive section is the IIS/ASP.NET one). A Windows name holds no ':', so what
    # follows the first one is a stream; trailing dots and spaces are dropped until none is
    # left ("admin.::$DATA", "admin. ."). (The stream types and the repeat: a review found
    # "admin::$INDEX_ALLOCATION" and "admin.::$DATA" left unfolded.) A segment of only dots
    # or spaces is refused before (``normalise_target``).
    name = segment.split(WINDOWS_STREAM, 1)[0]
    while True:
        shorter = _WINDOWS_TAIL.sub("", name)
        if shorter == name:
            break
        name = shorter
    return name or segment


_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))
_PLAIN_PATTERN = re.compile(r"(?:/(?:[A-Za-z0-9_~-][A-Za-z0-9._~-]*|\*\*?))*/?")


@functools.lru_cache(maxsize=8192)  # patterns like /admin/** repeat in every section
def normalise_path_pattern(pattern: str) -> str:
    """A policy path pattern in the same normal form as request paths, or ValueError."""
    if not pattern.startswith("/"):
        raise ValueError("a path pattern starts with '/'")
    if "?" in pattern or "#" in pattern:
        raise ValueError("a path pattern cannot contain '?' or '#' (queries are never matched)")
    if "%2a" in pattern.lower():
        # It would decode to '*', a wildcard (paths hold '*' raw): write wildcards as '*'.
        raise ValueError("a path pattern cannot contain '%2A' ('*' is a wildcard segment)")
    segments = pattern.split("/")[1:]
    for i, seg in enumerate(segments):
        if "*" in seg and seg not in ("*", "**"):
            raise ValueError("'*' and '**' must be whole segments (no regular expressions)")
        if seg == "**" and i != len(segments) - 1:
            raise ValueError("'**' is only allowed as the last segment")
    if len(pattern) <= MAX_TARGET_BYTES and _PLAIN_PATTERN.fullmatch(pattern):
        # Unreserved characters and wildcard segments only, no empty or dot segment (each
        # segment starts with a non-dot): normalise_target would return it unchanged.
        return pattern
    from urllib.parse import quote

    raw = quote(pattern, safe=_PATH_SAFE).encode("ascii")
    try:
        path, _ = normalise_target(raw, allow_non_ascii=True)
    except BadRequest as exc:
        raise ValueError(f"not a valid normalised path ({exc.reason})") from None
    return path


# Front controllers that route on the query. When the path is ``/`` or ends at a front
# controller (``/index.php``, any ``FRONT_CONTROLLER_SUFFIXES`` segment; one trailing ``/``
# too: CodeIgniter reads ``/index.php/`` as the script), these apps take the route path from
# the query, and run it whatever the path said. Found by a hostile review (session 29):
# ``/?/admin/users``, ``/index.php?/admin/users``, ``/?/admin/../admin/users`` and
# ``/index.php/?/admin/users`` ran CodeIgniter 4's admin/users route past ``deny /admin/**``
# and past an allow-only policy allowing ``/``. The path of the query is not a form of the
# request's path (the rule index reads a path, not a query): the data path judges it as a
# second path, as it judges a WebDAV Destination (``sidecar.inbound``, recorded for replay
# as ``routes``). As data: (parameter -- ``/``: a query that starts with ``/`` --, how its
# value is read, whether allow rules judge it too, where it comes from).
#   ``raw``: the query up to a second ``?`` is a URI path, normalised as a request's is and
#   refused as it would be (400 ``bad_query_route``: dot segments, encoded slashes...);
#   ``decoded``: a parameter's value as PHP's ``$_GET`` has it (percent-decoded, ``+`` a
#   space; its name as PHP reads one: leading spaces dropped, ``.``, `` `` and ``[`` as
#   ``_``; every occurrence), split at ``/`` with empty segments dropped (each app trims
#   slashes), each segment literal (these apps match it as a string: ``..`` is no step up
#   to them, so it is no refusal either), written in the normal form (``_RAW_IN_PATH``).
# Allow rules judge a route (the request is allowed only if both paths are) where the
# parameter is no ordinary one on ``/``: a query that starts with ``/`` and WordPress's
# ``rest_route``. ``q`` (search), ``r`` (referrals), ``p`` (WordPress's post id) and
# ``route`` are ordinary parameters of a home page: an allow-only policy allowing ``/`` must
# still let ``/?q=shoes`` in, so only deny rules judge them (a deny rule for ``/admin/**``
# refuses ``/?q=admin/people``).
QUERY_ROUTES: tuple[tuple[str, str, bool, str], ...] = (
    ("/", "raw", True, "CodeIgniter 4 SiteURIFactory::parseRequestURI, CodeIgniter 3 "
                       "URI::_parse_request_uri (the query when the path is empty or the "
                       "script)"),
    ("rest_route", "decoded", True, "WordPress rest_api_loaded (/?rest_route=/wp/v2/users "
                                    "is /wp-json/wp/v2/users)"),
    ("q", "decoded", False, "Drupal 7 request_path (?q=admin/people, clean URLs off)"),
    ("r", "decoded", False, "Yii 2 UrlManager::parseRequest, routeParam (enablePrettyUrl off)"),
    ("p", "decoded", False, "Craft CMS pathParam (index.php?p=admin/settings)"),
    ("route", "decoded", False, "OpenCart (index.php?route=account/login)"),
)
QUERY_ROUTE_NAMES = frozenset(name for name, _, _, _ in QUERY_ROUTES if name != "/")
_QUERY_ROUTE_ALLOW = {name: allow for name, _, allow, _ in QUERY_ROUTES}
# At most this many routes are judged for one request; a query naming more on a path that
# routes on it is refused (400 ``bad_query_route``): each is a decision.
MAX_QUERY_ROUTES = 8
_PHP_NAME = str.maketrans({" ": "_", ".": "_", "[": "_"})


WP_REST_ROUTE = "rest_route"


def routes_on_query(path: str) -> bool:
    """Whether ``path`` (normalised) is one an app of ``QUERY_ROUTES`` routes on the query
    at: ``/`` or a path that ends at a front controller."""
    if path == "/":
        return True
    if path.find(".") < 0:
        return False
    last = path[:-1] if path.endswith("/") else path
    name = last[last.rfind("/") + 1:].lower()
    return name.endswith(FRONT_CONTROLLER_SUFFIXES) and name not in FRONT_CONTROLLER_SUFFIXES


def query_routes(path: str, query: str, *, allow_non_ascii: bool = False
                 ) -> list[tuple[str, bool]]:
    """The route paths the query gives (``QUERY_ROUTES``) when ``path`` routes on it, each
    with whether allow rules judge it too; ``[]`` for nearly every request (no query, or a
    path that does not route on it: a constant check). ``BadRequest``
    (``bad_query_route``) for a raw route that would be refused as a path, or past
    ``MAX_QUERY_ROUTES``."""
    if not query:
        return []
    front = routes_on_query(path)
    # WordPress reads ``rest_route`` on every path (``WP::parse_request`` takes its public
    # query vars whatever the path): looked for everywhere, the others only on ``/`` or a
    # front controller (a name spelled with ``%`` may be it too).
    if not front and "rest" not in query.lower() and "%" not in query:
        return []
    routes: list[tuple[str, bool]] = []
    if front and query.startswith("/"):
        raw = query.split("?", 1)[0]
        try:
            route, _forward, _query = normalise_both(raw.encode("ascii"),
                                                     allow_non_ascii=allow_non_ascii)
        except BadRequest as exc:
            raise BadRequest("bad_query_route", exc.reason) from None
        routes.append((route, _QUERY_ROUTE_ALLOW["/"]))
    for pair in query.split("&"):
        raw_name, eq, raw_value = pair.partition("=")
        if not eq:
            continue
        name = unquote_to_bytes(raw_name.replace("+", " ")).decode("latin-1")
        # As PHP reads a name: a C string (``q%00junk`` is ``q``), leading spaces dropped.
        name = name.partition("\x00")[0].lstrip(" ").translate(_PHP_NAME)
        if name not in QUERY_ROUTE_NAMES or (not front and name != WP_REST_ROUTE):
            continue
        value = unquote_to_bytes(raw_value.replace("+", " "))
        if name == WP_REST_ROUTE:
            # WordPress: ``untrailingslashit`` drops trailing ``/`` and ``\``, and a route's
            # pattern (``@^/wp/v2/users$@i``) matches before one final newline; served as
            # ``/wp-json`` + the route, the URL its documentation gives (a deny rule written
            # on the route alone is kept too: deny rules only).
            value = value.rstrip(b"/\\")
            value = value[:-1] if value.endswith(b"\n") else value
            segments = [_path_text(s) for s in value.split(b"/") if s]
            routes.append(("/wp-json/" + "/".join(segments), True))
            routes.append(("/" + "/".join(segments), False))
        else:
            segments = [_path_text(s) for s in value.split(b"/") if s]
            routes.append(("/" + "/".join(segments), _QUERY_ROUTE_ALLOW[name]))
        if len(routes) > MAX_QUERY_ROUTES:
            raise BadRequest("bad_query_route", f"more than {MAX_QUERY_ROUTES} routes")
    return routes


def _path_text(segment: bytes) -> str:
    # A decoded segment in the normal form of a path (one spelling per decoded path).
    return "".join(chr(b) if b in _RAW_IN_PATH else f"%{b:02X}" for b in segment)
