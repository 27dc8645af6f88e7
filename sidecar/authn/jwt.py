"""JWT verification against one provider. Pure: the clock is the ``now`` argument.

Theory of operation
-------------------
``verify_token`` does the JOSE parsing itself, strictly, and uses PyJWT only for the
signature primitive of one algorithm chosen *here*. The order of checks is deliberate:

1. size first, before any parsing (a hostile header cannot make us decode megabytes);
2. shape: exactly three canonical base64url segments (one spelling per token), header and
   payload JSON objects without duplicate members (two ``exp`` members would let two
   parsers disagree), nor two names that differ only in case, nor a number no double
   holds, at most ``MAX_JSON_DEPTH`` levels deep (``sidecar.jsondoc``);
3. header: ``crit`` is refused (we implement no extension, RFC 7515 says reject), and so
   are ``b64``, ``zip``, ``enc``, a nested ``cty: JWT`` and a non-string ``typ``/``cty``; ``alg``
   must be in the provider's allowlist, which can only hold public-key algorithms, so
   ``none`` and HS* never verify anything; ``jku``, ``x5u``, ``jwk`` and ``x5c`` are never
   read: keys only ever come from the provider's own JWKS;
4. issuer, before the key lookup: a token of another issuer must not count as an
   "unknown kid" for this provider and trigger a JWKS refetch;
5. key: by ``kid`` from the provider's ``KeySet``; the key must fit the algorithm (family,
   EC curve, the JWK's own ``alg``), so an RSA public key can never serve as an HMAC secret;
6. signature, then audience, required claims, time claims (``now`` +- clock skew) and the
   maximum lifetime.

Claim types (``REGISTERED_CLAIM_TYPES``) are checked right after the payload parses, before
anything reads a claim: a registered claim of the wrong JSON type or out of range makes the
token invalid (``bad_claim``), it is never read as "absent". ``exp: null`` is not a token
without expiry, and ``exp: 1e400`` / ``10**400`` never reaches float arithmetic (Python
ints are unbounded: ``math.isfinite(10**400)`` raises). String claims must be non-empty
strings. A NumericDate is a JSON number, not a boolean, between 0 and ``MAX_NUMERIC_DATE``
(the last second of year 9999, what every date library can still represent). A required claim must be present and not null;
a required time claim must also be a valid NumericDate, which the type check guarantees.

Reason codes (``TokenInvalid.reason``) go to logs, metrics and the decision value; the
client only ever sees a generic 401.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from functools import cache, lru_cache
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sidecar import atomic_re
from sidecar.authn.jwks import ALGORITHM_FAMILY, KeySet
from sidecar.errors import Unauthorized
from sidecar.jsondoc import DEFAULT_MAX_DEPTH, JsonDocError, read_json
from sidecar.policy.sections import JwtProvider

Claims = Mapping[str, Any]

# Stable reason codes (public: logs, metrics labels, audit records).
MALFORMED = "malformed"
TOO_LARGE = "too_large"
BAD_HEADER = "bad_header"
BAD_ALG = "bad_alg"
UNKNOWN_KID = "unknown_kid"
NO_KEYS = "no_keys"
BAD_SIGNATURE = "bad_signature"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
BAD_ISSUER = "bad_issuer"
BAD_AUDIENCE = "bad_audience"
MISSING_CLAIM = "missing_claim"
LIFETIME_TOO_LONG = "lifetime_too_long"
REVOKED = "revoked"
MULTIPLE_TOKENS = "multiple_tokens"
# A token in an RFC 6750 place no provider of the section reads (``extract.Guards``).
UNREAD_LOCATION = "unread_location"
UNKNOWN_PROVIDER = "unknown_provider"
BAD_CLAIM = "bad_claim"

MAX_NUMERIC_DATE = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_JSON_DEPTH = DEFAULT_MAX_DEPTH  # levels of a header or payload (the object itself is 1)


def _is_numeric_date(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return 0 <= value <= MAX_NUMERIC_DATE  # int/float comparison is exact, never overflows


def _is_string(value: Any) -> bool:
    # Non-empty: an empty subject or issuer names nobody, and would put every such token
    # in one bucket wherever tokens are counted or revoked by these ids.
    return isinstance(value, str) and value != ""


def _is_audience(value: Any) -> bool:
    return _is_string(value) or (
        isinstance(value, list) and all(_is_string(item) for item in value))


# RFC 7519 4.1: the registered claims and the JSON type each must have when present.
# Null is not a value of any of these types. Other claims are the policy's business
# (claim conditions compare types strictly) and are not checked here.
REGISTERED_CLAIM_TYPES: Mapping[str, Any] = MappingProxyType({
    "iss": _is_string,   # StringOrURI
    "sub": _is_string,   # StringOrURI
    "aud": _is_audience,  # StringOrURI or an array of them
    "jti": _is_string,
    "exp": _is_numeric_date,
    "nbf": _is_numeric_date,
    "iat": _is_numeric_date,
})
# The token is not an access token: the provider requires a JOSE typ (RFC 9068 at+jwt) the
# token lacks, or the token says it is another kind (``check_token_kind``).
BAD_TYP = "bad_typ"

_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@cache
def _signers() -> Mapping[str, Any]:
    # PyJWT (and the urllib/http.client it pulls in) is imported on the first token, not at
    # start: a sidecar whose policy has no JWT provider never needs it (about 1.3 MB).
    from jwt.algorithms import get_default_algorithms

    return MappingProxyType({name: alg for name, alg in get_default_algorithms().items()
                             if name in ALGORITHM_FAMILY})


def signature_length(key: Any) -> int:
    """The exact length in bytes of a signature by ``key`` (0 for a key of no family we
    verify: then no signature fits). RSA, PKCS#1 v1.5 and PSS alike: the modulus's length
    (RFC 8017 8.1.2 and 8.2.2, step 1: "If the length of the signature S is not k octets,
    output 'invalid signature'"); ECDSA: R and S of the curve's size each (RFC 7518 3.4);
    Ed25519 64, Ed448 114 (RFC 8032). OpenSSL's PSS verification took a signature with its
    leading zero byte dropped (one token in 256 had a second spelling, each verified and
    cached anew and handed to the app as a different token; found by a hostile review), so
    the length is checked here, for every family, before any key sees the signature."""
    if isinstance(key, rsa.RSAPublicKey):
        return (key.key_size + 7) // 8
    if isinstance(key, ec.EllipticCurvePublicKey):
        return 2 * ((key.curve.key_size + 7) // 8)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 64
    if isinstance(key, ed448.Ed448PublicKey):
        return 114
    return 0


class TokenInvalid(Unauthorized):
    """A token was presented and is not acceptable; ``reason`` is a stable short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)


def _b64decode(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise TokenInvalid(MALFORMED, "bad base64url") from None


def _json_object(segment: str, what: str) -> dict[str, Any]:
    # The control plane's strict reader (sidecar/jsondoc.py), as for introspection answers,
    # which carry the same claims: UTF-8 only (RFC 7515 / 7519; ``json.loads(bytes)`` would
    # also take UTF-16 and UTF-32 and skip a byte-order mark), no member twice, no NaN or
    # Infinity, no lone surrogate (no text: it cannot be written to the audit trail, a log
    # line or a header), and at most MAX_JSON_DEPTH levels. Without that bound ``json``
    # stopped at the interpreter's recursion limit, which depends on how deep the caller's
    # stack is: a signed token nested 900 levels verified on a request and could fail when a
    # stream's token was judged again from another task. Two member names of one object that
    # differ only in case (``role`` and ``ROLE``, ``sub`` and ``SUB``, at any level: nested
    # claims are read by dotted names too) are refused as exact duplicates are (found by a
    # hostile review: Go's encoding/json takes the last case-insensitive match, .NET compares
    # claim types ignoring case, so an app behind could read the other member). A number no
    # double holds (``1e400``) is refused too (``read_json``).
    try:
        value = read_json(_b64decode(segment), max_depth=MAX_JSON_DEPTH, fold_case=True)
    except JsonDocError:
        raise TokenInvalid(MALFORMED, f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenInvalid(MALFORMED, f"{what} is not a JSON object")
    return value


def check_claim_types(claims: Mapping[str, Any]) -> None:
    """Refuse (``bad_claim``) a payload whose registered claims have the wrong type/range."""
    for name, valid in REGISTERED_CLAIM_TYPES.items():
        if name in claims and not valid(claims[name]):
            raise TokenInvalid(BAD_CLAIM, name)


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """Claim ``name`` as a float, or None when absent (``check_claim_types`` has run: the
    value is absent or a NumericDate in range)."""
    value = claims.get(name)
    return None if value is None else float(value)


# base64url digits by value, and the bits of a segment's last digit that encode nothing:
# 2 digits left over carry one byte (the last digit's low 4 bits unused), 3 carry two (its
# low 2 bits). RFC 4648 3.5 asks encoders to leave them zero; decoders ignore them, so
# ``...Q`` and ``...R`` would decode to the same signature: two spellings of one token.
_B64URL_VALUE = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_UNUSED_BITS = (0, 0, 0x0F, 0x03)  # by len(segment) % 4 (1 is no base64 at all)


def _canonical(segment: str) -> bool:
    rest = len(segment) % 4
    return rest != 1 and not (rest and _B64URL_VALUE[segment[-1]] & _UNUSED_BITS[rest])


def parse_unverified_header(token: str, max_bytes: int) -> dict[str, Any]:
    """The JOSE header of ``token`` after the size and shape checks (no signature check).

    Every segment must be canonical base64url (its unused trailing bits zero): a token has
    one spelling, so the verification cache, the decision cache and the app see the bytes
    the signer produced, never a variant an attacker derived from them."""
    if len(token) > max_bytes:
        raise TokenInvalid(TOO_LARGE)
    if not token.isascii() or _SHAPE.fullmatch(token) is None:
        raise TokenInvalid(MALFORMED, "not three base64url segments")
    header, payload, signature = token.split(".")
    if not (_canonical(header) and _canonical(payload) and _canonical(signature)):
        raise TokenInvalid(MALFORMED, "non-canonical base64url")
    return _json_object(header, "header")


MAX_UNVERIFIED_SUBJECT = 256


def unverified_subject(token: str, max_bytes: int) -> str | None:
    """The ``sub`` a token claims, read WITHOUT verifying anything; None when unreadable.

    Only for counting failures per claimed subject (burst alerts). Never decide on it.
    """
    try:
        parse_unverified_header(token, max_bytes)
        claims = _json_object(token.split(".")[1], "payload")
    except TokenInvalid:
        return None
    sub = claims.get("sub")
    if isinstance(sub, str) and 0 < len(sub) <= MAX_UNVERIFIED_SUBJECT:
        return sub
    return None


# names_issuer reads a payload of up to this many characters (a request head's token is
# shorter; a provider's ``max_token_bytes`` is not the bound: a token too large to verify
# may still name the issuer to an app).
MAX_UNVERIFIED_TOKEN = 65536


def _issuer_form(value: str) -> str:
    # How a lenient reader may compare issuers: compatibility forms folded (NFKC: fullwidth
    # and other look-alike spellings), no case, no surrounding whitespace, no trailing "/".
    return unicodedata.normalize("NFKC", value).strip().casefold().rstrip("/")


_wanted_issuer = lru_cache(maxsize=256)(_issuer_form)  # (providers' issuers only)


_NOT_BASE64 = atomic_re.compile(r"[^A-Za-z0-9_\-+/]++")
# (the same characters as bytes, for ``bytes.translate``: a C pass, where ``_NOT_BASE64.sub``
# took 30 ns a character)
_NOT_BASE64_BYTES = bytes(b for b in range(256) if _NOT_BASE64.match(chr(b)))


def lenient_part(part: str) -> bytes | None:
    """A JWT part decoded as leniently as a reader that decodes it unverified may: base64 or
    base64url, with or without padding, any other character skipped as filler (it does not
    count towards the padding: ``eyJp!!!c3M...`` decodes as ``eyJpc3M...`` does), a last
    digit that completes no byte dropped (Node's ``Buffer.from``), a UTF-8 byte-order mark
    dropped. None when nothing decodes."""
    # (a character that is no ASCII is "?", filler too)
    digits = part.encode("ascii", "replace").translate(None, _NOT_BASE64_BYTES)
    if len(digits) % 4 == 1:
        digits = digits[:-1]
    try:
        data = base64.urlsafe_b64decode(digits + b"=" * (-len(digits) % 4))
    except (binascii.Error, ValueError):
        return None
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


# What may come before a JSON object's "{" in a payload a lenient reader accepts:
# whitespace, byte-order marks and the NULs of UTF-16 and UTF-32.
BEFORE_OBJECT = b" \t\r\n\x00\xef\xbb\xbf\xfe\xff"

# What reading a payload costs (``payload_names``' ``spend``), in the copy scan's unit (a byte
# passed over by a C scan, ``extract._ScanBudget``): each text searched (``_member_pattern``),
# ``READ_PARSE_COST`` a character for each text ``json`` parses, ``READ_MEMBER_COST`` for
# each member it gives (its name folded), ``READ_MATCH_COST`` for each member named
# ``member`` (its value judged: a call back into Python) and ``READ_VALUE_COST`` plus its
# size for each string judged (``issuers_named``: an issuer's form, NFKC). Before the
# thirty-first session the scan counted a payload's bytes only, and a 30 KB payload of
# ``{"iss":["x"]}`` objects ending in a bad byte cost 30 ms of the event loop (5 ms a plain
# one), read once per issuer.
READ_PARSE_COST = 2
READ_MEMBER_COST = 16
READ_MATCH_COST = 128
READ_VALUE_COST = 96
READ_ESCAPE_COST = 48
READ_NON_ASCII_COST = 64


class ReadTooCostly(Exception):
    """Reading a payload was past its work limit (``WorkLimit``)."""


class WorkLimit:
    """What reading one payload may still cost (``payload_names``' ``spend``)."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def spend(self, cost: int) -> None:
        """Count ``cost``; ``ReadTooCostly`` past the limit."""
        self.left -= cost
        if self.left < 0:
            raise ReadTooCostly


def _free(cost: int) -> None:
    return None


def _named_members(pairs: list[tuple[str, Any]], member: str, wanted: Callable[[Any], bool],
                   spend: Callable[[int], object]) -> bool:
    # (every member json gave, at any depth: ``object_pairs_hook`` is ``pairs.extend``)
    spend(READ_MEMBER_COST * len(pairs))
    for value in [v for k, v in pairs if k.casefold() == member]:
        spend(READ_MATCH_COST)
        if wanted(value):
            return True
    return False


def _parsed(text: str, pairs: list[tuple[str, Any]]) -> bool:
    """Whether ``json`` reads ``text`` whole; every member it gave, in any object at any
    depth, goes to ``pairs`` (numbers never converted: ``len``)."""
    try:
        json.loads(text, object_pairs_hook=pairs.extend, parse_int=len, parse_float=len,
                   parse_constant=len)
    except (ValueError, RecursionError):
        return False
    return True


def payload_names(part: str, member: str, wanted: Callable[[Any], bool],
                  spend: Callable[[int], object] | None = None) -> bool:
    """Whether the JWT part ``part``, read WITHOUT verifying anything and as leniently as an
    app may (``lenient_part``, then JSON), holds an object, at any depth, with a member
    ``member`` (lower-case; its name in any case: ``str.casefold``) whose value ``wanted``
    accepts. Over-reading only refuses more: every reading counts.

    The readings: the bytes as ``json`` takes them (UTF-8, -16 or -32); when that fails, or
    the bytes are not ASCII, the text with each bad byte replaced (Node's
    ``Buffer.toString``, Go's encoding/json: U+FFFD) and as Latin-1 (``JSON.parse(atob(p))``).
    Numbers are never converted (an integer of 5,000 digits is no error: ``JSON.parse`` reads
    ``Infinity``). A text ``json`` cannot read whole (nested past the interpreter's recursion
    limit, which ``JSON.parse`` and Go read; or broken after the member) is scanned for the
    member (``_scanned_members``). Found by a hostile review (session 29): each of a Latin-1
    byte, a 5,000-digit integer and 3,000-deep nesting made ``json.loads`` give up before it
    had seen the top-level ``iss``, and a forged token of the issuer reached the app as a
    token of nobody's. Linear in the part's size (a few passes).

    Cheap first (since the thirty-first session): a part that does not decode to an object's
    start (``BEFORE_OBJECT``, then ``{``) names nothing, and a text in which no quoted name
    followed by a colon can fold to ``member`` (``_member_pattern``, a C search) is neither
    parsed nor scanned; each distinct text is parsed at most once. ``spend``: called with
    the cost of the work about to be done (``READ_PARSE_COST``...); what it raises ends the
    reading."""
    data = lenient_part(part)
    if data is None or data.lstrip(BEFORE_OBJECT)[:1] != b"{":
        return False  # (no object: no reader's payload; nothing parsed)
    if spend is None:
        spend = _free
    search = _member_pattern(member).search
    ascii_only = data.isascii()
    encoding = json.detect_encoding(data)
    try:
        first: str | None = data.decode(encoding, "surrogatepass")  # (json.loads(bytes))
    except UnicodeDecodeError:
        first = None
    if first is not None:
        spend(len(first))
        if ascii_only and search(first) is None:
            return False  # (every reading is this text, and no member can be named so)
        spend(READ_PARSE_COST * len(first))
        pairs: list[tuple[str, Any]] = []
        whole = _parsed(first, pairs)
        if _named_members(pairs, member, wanted, spend):
            return True
        if whole:
            if ascii_only:
                return False  # (read whole: every reading is this one)
            first = None
            encodings: tuple[str, ...] = ("latin-1",)  # (the other one of non-ASCII UTF-8)
        else:
            encodings = (encoding, "utf-8", "latin-1")
    else:
        encodings = (encoding, "utf-8", "latin-1")
    # (``first``: now the text json failed on, if any)
    texts: list[str] = []
    for name in encodings:
        text = data.decode(name, "replace")
        if text in texts:
            continue
        texts.append(text)
        spend(len(text))
        if search(text) is None:
            continue  # (no member of that name in any reading of this text)
        if text != first:  # (else json failed on this very text already)
            spend(READ_PARSE_COST * len(text))
            pairs = []
            whole = _parsed(text, pairs)
            if _named_members(pairs, member, wanted, spend):
                return True
            if whole:
                continue
        if _scanned_members(text, member, wanted, spend):
            return True
    return False


# Characters whose case folding (``str.casefold``) is ASCII letters, other than the letters
# themselves in either case (every one: tests/test_token_copies_review29.py computes them
# over all code points): a member name spelled with them folds to the same name.
_FOLDED_TO: Mapping[str, str] = MappingProxyType({
    "ss": "\u00df\u1e9e", "s": "\u017f", "k": "\u212a", "ff": "\ufb00", "fi": "\ufb01",
    "fl": "\ufb02", "ffi": "\ufb03", "ffl": "\ufb04", "st": "\ufb05\ufb06"})


def _spellings(name: str) -> str:
    """A pattern for the body of every JSON string that reads as a name folding to ``name``
    (lower-case ASCII): each character as itself in either case, as a character that folds
    to it (``_FOLDED_TO``: ``ſ``, ``ß``...), or as a ``\\u`` escape of one (compiled
    ignoring case). A superset: a match is checked by folding it."""
    if not name:
        return ""
    alternatives = []
    for size in range(1, min(3, len(name)) + 1):
        chars = set(_FOLDED_TO.get(name[:size], ""))
        if size == 1:
            chars |= {name[0], name[0].upper()}
        if chars:
            spelled = "|".join(f"{re.escape(c)}|\\\\u{ord(c):04x}" for c in sorted(chars))
            alternatives.append(f"(?:{spelled}){_spellings(name[size:])}")
    return "(?:" + "|".join(alternatives) + ")"


@lru_cache(maxsize=8)
def _member_pattern(member: str) -> re.Pattern[str]:
    # (the name, then the colon: the value starts at the match's end)
    return atomic_re.compile(f'"({_spellings(member)})"\\s*+:\\s*+', re.IGNORECASE)


_JSON_STRING = atomic_re.compile(r'"([^"\\]*+(?:\\.[^"\\]*+)*+)"', re.DOTALL)
# A list's items up to its first ``]`` outside a string (a nested list ends it early: its
# items after that are not read, and nothing of the list is read twice).
_LIST_ITEMS = atomic_re.compile(r'\[((?:"[^"\\]*+(?:\\.[^"\\]*+)*+"|[^"\]])*+)', re.DOTALL)
_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|(.))", re.DOTALL)
_SHORT_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _escaped(m: re.Match[str]) -> str:
    code = m.group(1)
    return chr(int(code, 16)) if code is not None else _SHORT_ESCAPES.get(m.group(2),
                                                                          m.group(2))


def _unescaped(body: str) -> str:
    """A JSON string's body as a lenient reader reads it (an unknown escape is the
    character; an escaped surrogate pair is one character, a lone one stays)."""
    if "\\" not in body:
        return body
    text = _ESCAPE.sub(_escaped, body)
    try:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        return text


def _scanned_members(text: str, member: str, wanted: Callable[[Any], bool],
                     spend: Callable[[int], object] = _free) -> bool:
    """``payload_names`` for a text ``json`` cannot read whole: each ``"<member>": ``
    (``_member_pattern``, its name folded as the parser's names are) and its value: a
    string, or the strings of a list (``_LIST_ITEMS``); any other value is read as None.
    One pass over the text (the search goes on after a list's items: a member inside the
    list was read with it); ``spend`` counts each member found (``READ_MATCH_COST``) and
    each string of a list (``READ_MEMBER_COST``)."""
    search = _member_pattern(member).search
    pos = 0
    while (m := search(text, pos)) is not None:
        pos = m.end()
        name = m.group(1)
        spend(READ_MATCH_COST + READ_ESCAPE_COST * name.count("\\"))
        if _unescaped(name).casefold() != member:
            continue
        value: Any = None
        if text.startswith('"', pos):
            string = _JSON_STRING.match(text, pos)
            if string is not None:
                body = string.group(1)
                spend(len(body) + READ_ESCAPE_COST * body.count("\\"))
                value = _unescaped(body)
        elif text.startswith("[", pos):
            items = _LIST_ITEMS.match(text, pos)
            assert items is not None  # (it matches any "[")
            pos = items.end()
            listed = items.group(1)
            bodies = _JSON_STRING.findall(listed)
            spend(len(listed) + READ_MEMBER_COST * len(bodies)
                  + READ_ESCAPE_COST * listed.count("\\"))
            value = [_unescaped(body) for body in bodies]
        if wanted(value):
            return True
    return False


def names_issuer(token: str, issuer: str, max_chars: int | None = MAX_UNVERIFIED_TOKEN,
                 spend: Callable[[int], object] | None = None) -> bool:
    """Does ``token``'s payload, read WITHOUT verifying anything, name ``issuer`` as an
    ``iss``? A token that names a provider's issuer is that provider's to judge, whatever
    else is wrong with it (``alg: none``, an ID token's ``typ``, ``crit``, a claim of the
    wrong type, a header that is not JSON or missing): an app that decodes the payload
    unverified reads that issuer's claims. Read as leniently as such an app may
    (``payload_names``: base64 with or without padding or stray characters; JSON in UTF-8,
    -16 or -32, with bytes that are no UTF-8, numbers of any size, nested any depth; any
    ``iss`` member, a repeated one included, its name in any case; the issuer in any case,
    with or without a trailing ``/`` or surrounding whitespace, in NFKC-equivalent
    characters, or in a list), since over-reading only refuses more. Never decide to accept
    on it. The payload is the part after the first dot, whatever precedes it (npm
    jwt-decode reads ``token.split(".")[1]``). ``max_chars``: longer tokens name nothing
    (None: no bound; the caller bounds what it reads). ``spend``: ``payload_names``'."""
    return bool(issuers_named(token, (issuer,), max_chars, spend))


def issuers_named(token: str, issuers: Iterable[str],
                  max_chars: int | None = MAX_UNVERIFIED_TOKEN,
                  spend: Callable[[int], object] | None = None, *,
                  first: bool = False) -> frozenset[str]:
    """Which of ``issuers`` ``token``'s payload names as an ``iss`` (``names_issuer``'s
    reading), the payload read ONCE for them all (before the thirty-first session it was
    read once per issuer: the copy scan's cost grew with the section's issuers). ``first``:
    stop at the first one named (a set of one). ``spend``: ``payload_names``' (each string
    judged costs ``READ_VALUE_COST`` plus its size)."""
    wanted: dict[str, list[str]] = {}
    for issuer in frozenset(issuers):
        wanted.setdefault(_wanted_issuer(issuer), []).append(issuer)
    if not wanted or (max_chars is not None and len(token) > max_chars):
        return frozenset()
    parts = token.split(".", 2)
    if len(parts) < 2:
        return frozenset()
    charge = _free if spend is None else spend
    named: set[str] = set()
    every = sum(len(same) for same in wanted.values())
    judged_before: set[str] = set()  # (a value repeated is judged once)

    def judged(value: Any) -> bool:
        # (a string, or the strings of a list; anything else names nothing)
        if isinstance(value, str):
            strings: list[Any] = [value]
        elif isinstance(value, list):
            strings = value
        else:
            return False
        for item in strings:
            if isinstance(item, str) and item not in judged_before:
                charge(READ_VALUE_COST + len(item) * (1 if item.isascii()
                                                      else READ_NON_ASCII_COST))
                judged_before.add(item)
                same = wanted.get(_issuer_form(item))
                if same is not None:
                    named.update(same)
        return bool(named) if first else len(named) == every

    payload_names(parts[1], "iss", judged, spend)
    return frozenset(named)


def _media_type(value: str) -> str:
    # RFC 7515 4.1.9: compare case-insensitively; "application/" may be left out. No
    # whitespace is trimmed: "at+jwt\t" or "\u00a0at+jwt" is another type.
    value = value.lower()
    return value[len("application/"):] if value.startswith("application/") else value


def typ_matches(typ: Any, required: str) -> bool:
    """Does a JOSE header ``typ`` equal ``required`` (e.g. ``at+jwt``, RFC 9068 2.1)?

    An OpenID ID token (``typ: JWT`` or none) presented as an access token fails here.
    """
    return isinstance(typ, str) and _media_type(typ) == _media_type(required)


# Header members that change what the signed bytes mean, which this verifier does not
# implement: RFC 7797 ``b64`` (an unencoded payload; only valid when ``crit`` names it, and
# ``crit`` is refused), ``zip`` (a compressed payload, JWE only: RFC 7516 4.1.3) and ``enc``
# (the content encryption of a JWE, RFC 7516 4.1.2: a header holding it is a JWE's, RFC
# 7516 9, so the token is not a signed JWT whatever its shape). A token that carries one is
# refused, never read as if the member were absent.
_REFUSED_HEADER_MEMBERS = ("b64", "zip", "enc")


def _check_header_members(header: Mapping[str, Any]) -> None:
    for name in _REFUSED_HEADER_MEMBERS:
        if name in header:
            raise TokenInvalid(BAD_HEADER, f"{name} is not supported")
    # typ and cty are strings (RFC 7515 4.1.9-10). cty "JWT" says the payload is itself a
    # JWT (a nested token, RFC 7519 5.2): the claims would be the inner token's, which
    # nothing here verifies, so such a token is refused.
    for name in ("typ", "cty"):
        if name in header and not isinstance(header[name], str):
            raise TokenInvalid(BAD_HEADER, f"{name} is not a string")
    cty = header.get("cty")
    if cty is not None and _media_type(cty) == "jwt":
        raise TokenInvalid(BAD_HEADER, "nested JWT (cty JWT)")


# What a token says it is. An identity provider signs several kinds of JWT with the keys
# that sign its access tokens, for the same issuer and often the same audience: OpenID
# Connect ID tokens (the client's, sent as bearer tokens by mistake or on purpose), refresh
# and logout tokens, Security Event Tokens. Only an access token is a credential for an API
# (RFC 9068 2.1, RFC 8725 3.11: explicit typing, so one kind cannot be used as another).
# ``token_use`` (Cognito: ``access`` / ``id``; Ory Hydra: ``access_token`` / ...), and
# ``token_type`` and Keycloak's ``typ`` (``Bearer`` / ``ID``, ``Refresh``, ``Offline``,
# ``Logout``; RFC 8693 URNs), compared lower-case, the URN prefix dropped, and (the kinds
# that are refused) without surrounding whitespace (``token_kind``); a ``token_use`` must be
# exactly an access token's, in any case. Introspection answers are read with the same lists
# (``oauth.check_access_token_answer``).
ACCESS_TOKEN_USES = frozenset({"access_token", "access"})
NOT_ACCESS_TYPES = frozenset({"refresh_token", "refresh", "offline", "id_token", "id",
                              "logout"})
TOKEN_TYPE_URN = "urn:ietf:params:oauth:token-type:"
# Claims only other kinds of JWT carry: an OpenID Connect ID token's ``nonce``, ``at_hash``,
# ``c_hash`` and ``s_hash`` (OpenID Connect Core 2, 3.3.2.11; FAPI), a Security Event
# Token's ``events`` (RFC 8417 2.2: back-channel logout tokens, SETs).
NOT_ACCESS_CLAIMS = ("nonce", "at_hash", "c_hash", "s_hash", "events")
# The JOSE ``typ`` of an access token when the provider requires none: absent, the generic
# ``JWT`` and ``JOSE`` (RFC 7519 5.1, RFC 7515 4.1.9), or RFC 9068's ``at+jwt``. Any other
# names another kind (``logout+jwt``, ``secevent+jwt``, ``dpop+jwt``,
# ``token-introspection+jwt``, ``oauth-authz-req+jwt``, ``id_token+jwt``...).
GENERIC_TYPS = frozenset({"jwt", "jose", "at+jwt"})
# The token is bound to a key or certificate the caller has not shown: a ``cnf`` the
# sidecar cannot check (``oauth.check_binding``), or a ``token_type``/``typ`` of ``DPoP``.
CERT_MISMATCH = "cert_mismatch"
# RFC 9449: the ``token_type`` an authorisation server gives a token bound to a DPoP key
# (its introspection answer, 6.2; a JWT's ``token_type`` claim; Keycloak's payload ``typ``),
# compared lower-case without surrounding whitespace, the RFC 8693 URN prefix dropped.
DPOP_TOKEN_TYPE = "dpop"


def token_kind(value: str) -> str:
    """A ``token_type`` or payload ``typ`` value as the kind lists hold it: without
    surrounding whitespace (``str.strip``: Unicode spaces and C0 separators too), lower-case,
    the RFC 8693 URN prefix dropped. Found by a hostile review: ``"typ": "Refresh "``,
    ``" ID"``, ``"Offline\t"``, ``"token_type": " id_token"`` passed as access tokens while
    the DPoP check on the same members stripped (an app that trims reads the kind)."""
    return value.strip().lower().removeprefix(TOKEN_TYPE_URN)


def dpop_bound_member(claims: Mapping[str, Any]) -> str | None:
    """The member (``token_type`` or ``typ``) by which ``claims`` say the token is DPoP-bound
    (RFC 9449), or None. Such a token is only good with a proof of its key, which the sidecar
    does not check: presented as a bearer token it is refused (``cert_mismatch``), as a
    ``cnf.jkt`` binding is (``oauth.check_binding``: ignoring it would silently drop the
    binding). Before (found by a hostile review, twenty-seventh session) it was accepted when
    the answer or the claims carried no ``cnf``."""
    for member in ("token_type", "typ"):
        value = claims.get(member)
        if isinstance(value, str) and token_kind(value) == DPOP_TOKEN_TYPE:
            return member
    return None


def check_token_kind(header: Mapping[str, Any], claims: Mapping[str, Any],
                     required_typ: str | None) -> None:
    """Refuse (``bad_typ``) a token that says it is not an access token: a header ``typ``
    naming another kind of JWT (when the provider requires none; ``typ_matches`` checks a
    required one), a ``token_use``, ``token_type`` or payload ``typ`` naming another kind
    (or not a string), or a claim only ID tokens or Security Event Tokens carry. And
    (``cert_mismatch``) a token whose ``token_type`` or payload ``typ`` says it is bound to
    a DPoP key (``dpop_bound_member``)."""
    typ = header.get("typ")
    if required_typ is None and typ is not None and _media_type(typ) not in GENERIC_TYPS:
        raise TokenInvalid(BAD_TYP, "typ names another kind of JWT")
    use = claims.get("token_use")
    if use is not None and not (isinstance(use, str) and use.lower() in ACCESS_TOKEN_USES):
        raise TokenInvalid(BAD_TYP, "token_use is not an access token's")
    dpop = dpop_bound_member(claims)
    if dpop is not None:
        raise TokenInvalid(CERT_MISMATCH, f"{dpop} DPoP: bound to a key the sidecar cannot check")
    for member in ("token_type", "typ"):
        value = claims.get(member)
        if value is not None and (not isinstance(value, str) or
                                  token_kind(value) in NOT_ACCESS_TYPES):
            raise TokenInvalid(BAD_TYP, f"{member} is not an access token's")
    for name in NOT_ACCESS_CLAIMS:
        if name in claims:
            raise TokenInvalid(BAD_TYP, f"{name}: not an access token")


def verify_token(token: str, provider: JwtProvider, keys: KeySet, now: float) -> Claims:
    """Verify ``token`` for ``provider`` with ``keys`` at time ``now``; return its claims.

    Raises ``TokenInvalid`` with a reason code. ``now`` is unix time in seconds.
    """
    header = parse_unverified_header(token, provider.max_token_bytes)
    header_b64, payload_b64, signature_b64 = token.split(".")
    if "crit" in header:
        raise TokenInvalid(BAD_HEADER, "crit is not supported")
    _check_header_members(header)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in provider.algorithms or alg not in _signers():
        raise TokenInvalid(BAD_ALG, f"alg {alg!r} not allowed")
    if provider.typ is not None and not typ_matches(header.get("typ"), provider.typ):
        raise TokenInvalid(BAD_TYP)
    # A kid, when present, is a string (RFC 7515 4.1.4); ``kid: null`` is not "no kid", as
    # ``typ: null`` is not "no typ": read as absent it took the one key that fits, and the
    # verification cache did not count it among the tokens without kid whose key a key set
    # change can make ambiguous (``Authenticator.set_keys``; found by a hostile review).
    kid = header.get("kid")
    if "kid" in header and not isinstance(kid, str):
        raise TokenInvalid(MALFORMED, "kid is not a string")
    claims = _json_object(payload_b64, "payload")
    check_claim_types(claims)

    if claims.get("iss") != provider.issuer:
        raise TokenInvalid(BAD_ISSUER)
    check_token_kind(header, claims, provider.typ)

    key = keys.find(kid, alg)
    if key is None:
        if kid is not None and kid in keys.by_kid:
            raise TokenInvalid(BAD_ALG, f"key {kid!r} cannot verify {alg}")
        raise TokenInvalid(UNKNOWN_KID if len(keys) else NO_KEYS, f"kid {kid!r}")
    signature = _b64decode(signature_b64)
    signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
    if len(signature) != signature_length(key.key) \
            or not _signers()[alg].verify(signing_input, key.key, signature):
        raise TokenInvalid(BAD_SIGNATURE)

    check_audience(claims.get("aud"), provider.audiences)
    check_required(claims, provider)
    _check_times(claims, provider, now)
    return MappingProxyType(claims)


def check_audience(aud: Any, accepted: tuple[str, ...]) -> None:
    """Refuse unless ``aud`` (a string or a list of strings) names one of ``accepted``."""
    # An empty audience list accepts nothing: a provider without audiences is a config
    # mistake, and accepting any audience would let tokens minted for other APIs in.
    if isinstance(aud, str):
        ok = aud in accepted
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        ok = any(a in accepted for a in aud)
    else:
        ok = False
    if not ok:
        raise TokenInvalid(BAD_AUDIENCE)


def _check_times(claims: Mapping[str, Any], provider: JwtProvider, now: float) -> None:
    skew = provider.clock_skew_seconds
    exp = numeric_date(claims, "exp")
    nbf = numeric_date(claims, "nbf")
    iat = numeric_date(claims, "iat")
    if exp is not None and now > exp + skew:
        raise TokenInvalid(EXPIRED)
    if nbf is not None and now + skew < nbf:
        raise TokenInvalid(NOT_YET_VALID)
    if iat is not None and now + skew < iat:
        raise TokenInvalid(NOT_YET_VALID, "issued in the future")
    check_lifetime(provider, exp, iat, nbf, now)


def check_required(claims: Mapping[str, Any], provider: JwtProvider) -> None:
    """Every ``required_claims`` claim is present and not null (null is no value of any
    claim): a verified JWT's, and an introspection answer's (``Authenticator``)."""
    for name in provider.required_claims:
        if claims.get(name) is None:
            raise TokenInvalid(MISSING_CLAIM, name)


def check_lifetime(provider: JwtProvider, exp: float | None, iat: float | None,
                   nbf: float | None, now: float) -> None:
    """With ``max_lifetime``: ``exp`` is there and ``exp - iat`` (or ``- nbf``, or ``- now``)
    is within it. The claims are NumericDates already checked (``check_claim_types``)."""
    limit = provider.max_lifetime_seconds
    if limit is not None:
        if exp is None:
            raise TokenInvalid(MISSING_CLAIM, "exp (max lifetime is set)")
        start = iat if iat is not None else nbf if nbf is not None else now
        if exp - start > limit:
            raise TokenInvalid(LIFETIME_TOO_LONG)
