r"""The copy scan charges each escape what it costs (found by the thirty-third session's
helper, fixed in the thirty-fourth): each escape a decoding decodes (``extract._DECODINGS``)
was charged 8 units (``SCAN_ESCAPE_COST``) while one cost 40-130 in the budget's own unit
(``unquote`` looped in Python, ``quoted-pair`` expanded its template in Python, ``json``,
``octal`` and ``hex`` called back into Python for every match, and every backslash was
decoded by all four): a 30 KB header of ``\u002e`` was refused only after 5-7 ms of the scan
(a plain head of that size 1 ms through the sidecar).

Now the decoders run in C (a split and tables), the backslash decodings split the form as
quoted pairs once and each decodes its own escapes from them (``extract._own_escapes``) or
with its own pattern (``_coded``), the cheaper, and each escape is charged as measured
(``SCAN_ESCAPE_COSTS``, ``SCAN_ESCAPE_SORT_COST``, ``SCAN_CODE_COST``) past an allowance
a character of the form (``SCAN_ESCAPE_ALLOWANCE``) that ordinary escaped values stay under.

Work is counted, not timed: every escape each decoder is given, weighted by what one costs
that decoder (measured for this fix: ``WEIGHTS``), and the Python calls the scan makes (as
``test_copy_scan_cost_review31.py`` counts them), for every decoding's escape (escapes that
decode to a backslash or a percent sign, decoded again at depth 2; invalid ones; mixtures),
in every place, in one value and spread over a hundred, at 30 KB and 64 KB. Then one real
sidecar: hostile heads answered, ordinary escaped values pass, a copy escaped is refused.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote

import pytest

from sidecar.authn import extract
from sidecar.authn.jwt import names_issuer
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_copy_scan_cost_review31 import _calls
from tests.test_token_copies import FILES, ISS, SPELLINGS, _policy, _token

pytestmark = pytest.mark.usefixtures("no_internal_errors")

Request = tuple[list[tuple[bytes, bytes]], str, str]

# Every decoding's escape, escapes that decode to a backslash or a percent sign (decoded
# again at depth 2), invalid ones, the digits a code takes escaped too, and mixtures.
ESCAPES = {
    "percent %2e": "%2e", "percent %zz (invalid)": "%zz", "percent %252e (depth 2)": "%252e",
    "percent %5c (to a backslash)": "%5cx2e", "percent %5cu (to \\u)": "%5cu002e",
    "plus, %2b": "+%2b",
    "unescape %u002e": "%u002e", "unescape mixed": "%u002e%2e", "unescape %u0025 (to %)":
    "%u00252e", "unescape %u005c (to a backslash)": "%u005cu002e",
    "json \\u002e": "\\u002e", "json \\u005c (depth 2)": "\\u005cu002e", "json \\n": "\\n",
    "json \\/": "\\/", "json \\u0025 (to a percent)": "\\u00252e",
    "quoted-pair \\\"": '\\"', "backslash pairs": "\\\\", "pairs and codes": "\\\\\\u002e",
    "octal \\056": "\\056", "octal \\134 (depth 2)": "\\134056", "octal, dotted": "a.\\056",
    "hex \\x2e": "\\x2e", "hex \\x5c (depth 2)": "\\x5cx2e",
    "digits escaped after codes": "\\u\\0\\x\\4\\a",
    "mixture": "%2e\\u002e\\056\\x2e\\\"%5c", "mixture, dotted": "a.%2e\\u002e",
    "every decoding to a backslash": "\\u005c\\134\\x5c%5c%25+\\n",
}


def _header(v: str) -> Request:
    return [(b"x-note", v.encode())], "", "/public/x"


def _cookie(v: str) -> Request:
    return [(b"cookie", ("c=" + v).encode())], "", "/public/x"


def _query(v: str) -> Request:
    return [], "q=" + v, "/public/x"


def _path(v: str) -> Request:
    return [], "", "/public/" + v


def _cut(v: str, n: int = 100) -> list[str]:
    k = max(1, len(v) // n)
    return [v[i * k:(i + 1) * k] for i in range(n)]


def _headers(v: str) -> Request:
    return [(f"x-n{i}".encode(), p.encode()) for i, p in enumerate(_cut(v))], "", "/public/x"


def _cookies(v: str) -> Request:
    return ([(b"cookie", "; ".join(f"c{i}={p}" for i, p in enumerate(_cut(v))).encode())],
            "", "/public/x")


def _params(v: str) -> Request:
    return [], "&".join(f"p{i}={p}" for i, p in enumerate(_cut(v))), "/public/x"


PLACES: dict[str, Callable[[str], Request]] = {
    "header": _header, "cookie": _cookie, "query": _query, "path": _path,
    "100 headers": _headers, "100 cookies": _cookies, "100 parameters": _params}
# 64 KB: the sidecar's default head limit (docs/config.md, ``limits.max_header_bytes``).
SIZES = (30_000, 64_000)


def _value(escape: str, size: int) -> str:
    return (escape * (size // len(escape) + 1))[:size]


GUARDS = extract.Guards(query=True, authorization=True, read_schemes=frozenset({"bearer"}),
                        issuers=frozenset({ISS}),
                        read_headers=frozenset({b"authorization", b"cookie"}))

# What one escape costs each decoder, in the scan's unit (a ``json.loads`` character is two),
# measured for this fix (2,000 escapes, fastest of 60 rounds): the percent split and table
# (``plus`` the same after a C replace), the quoted-pair split, ``json``/``octal``/``hex``'s
# split and maps for an escape they are given; and when a backslash decoding reads the
# quoted pairs instead (``_own_escapes``), an escape (``PAIR_WEIGHT``) and a code start, in
# Python (``CODE_WEIGHT``). (Before the fix: 41-63, 129, and 95 with a call back.)
# ``unescape`` (thirty-fifth session): a ``%u`` split and the percent pass after it, 49 a
# ``%uXXXX`` (a ``%XX`` in it 33; counted at 49 here, an upper bound).
WEIGHTS = {"percent": 33, "plus": 33, "unescape": 49, "quoted-pair": 21, "json": 66, "octal": 66, "hex": 66,
           "literal": 12, "yaml": 14}
PAIR_WEIGHT = 11
CODE_WEIGHT = 170
CODE_STARTS = {"json": "u", "octal": "0123", "hex": "x"}
# The escape work one request may do, counted so: a plain head of 64 KB costs the sidecar
# about 6.4 units a byte without the scan, and the target is a head at most about 6x that;
# the fix's worst is 12 a byte (percent escapes decoded twice, under the allowance), before
# it up to 31 a byte at these weights (more at the old decoders' own, 41-130 an escape).
WORK_FREE = 64 * 1024
WORK_PER_BYTE = 16
# And the Python calls (``sys.setprofile``) past a plain head of the same place and size: the
# decoders run in C (now at most about 50 more; before, a call back or a loop turn per escape,
# 10,000-64,000 more).
CALLS_FREE = 1_000


class _CountedPairs:
    """``extract._QUOTED_PAIRS`` with each escape it is given counted."""

    def __init__(self, pattern: re.Pattern[str], work: list[int]) -> None:
        self.pattern, self.work = pattern, work

    def split(self, text: str) -> list[str | Any]:
        self.work[0] += WEIGHTS["quoted-pair"] * text.count("\\")
        return self.pattern.split(text)

    def sub(self, repl: Any, text: str) -> str:
        self.work[0] += WEIGHTS["quoted-pair"] * text.count("\\")
        return self.pattern.sub(repl, text)


def _scan_calls(request: Request) -> tuple[int, list[str]]:
    headers, query, path = request
    extract._LAST_SCAN[0] = None
    extract.copies(GUARDS, headers, query, path)  # (the caches warm)
    extract._LAST_SCAN[0] = None
    return _calls(lambda: extract.copies(GUARDS, headers, query, path))


def _escape_work(request: Request, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    """The escapes the decoders are given while one request is scanned, weighted
    (``WEIGHTS``), and what the scan found."""
    work = [0]

    def counted(name: str, starts: str, decode: Callable[[str], str]) -> Callable[[str], str]:
        weight = 0 if name == "quoted-pair" else WEIGHTS[name]  # (counted in its split)

        def run(text: str) -> str:
            work[0] += weight * text.count("%" if name == "plus" else starts)
            return decode(text)
        return run

    with monkeypatch.context() as m:
        m.setattr(extract, "_DECODINGS", tuple(
            (name, starts, counted(name, starts, decode))
            for name, starts, decode in extract._DECODINGS))
        m.setattr(extract, "_QUOTED_PAIRS", _CountedPairs(extract._QUOTED_PAIRS, work))
        own = getattr(extract, "_own_escapes", None)
        if own is not None:
            def by_pairs(name: str, pairs: list[str], escapes: str) -> Any:
                work[0] += PAIR_WEIGHT * (len(pairs) // 2) + CODE_WEIGHT * sum(
                    x in CODE_STARTS[name] for x in pairs[1::2])
                return own(name, pairs, escapes)
            m.setattr(extract, "_own_escapes", by_pairs)
        headers, query, path = request
        extract._LAST_SCAN[0] = None  # (the last request's scan is kept)
        found = extract.copies(GUARDS, headers, query, path)
        extract._LAST_SCAN[0] = None
    return work[0], found


@pytest.mark.parametrize("name", list(ESCAPES))
def test_every_escape_costs_the_scan_a_bounded_amount_of_work(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every place, one value and spread, 30 KB and 64 KB: the escape work is within
    ``WORK_FREE`` plus ``WORK_PER_BYTE`` a byte, the Python calls within ``CALLS_FREE`` of a
    plain head's, and the answer is no copy or refused as one (nothing in these names an
    issuer)."""
    wrong = []
    for (place, build), size in itertools.product(PLACES.items(), SIZES):
        request = build(_value(ESCAPES[name], size))
        work, found = _escape_work(request, monkeypatch)
        plain, _ = _scan_calls(build("y" * size))
        calls, again = _scan_calls(request)
        if (work > WORK_FREE + WORK_PER_BYTE * size or calls > plain + CALLS_FREE
                or found not in ([], [extract._TOO_MANY_FORMS]) or again != found):
            wrong.append((place, size, work // size, calls - plain, found[:1]))
    assert not wrong, wrong


def test_the_backslash_decodings_read_only_their_own_escapes() -> None:
    """``_own_escapes`` (the quoted pairs, then each code start) and the decoder itself
    (``_coded``) give exactly what ``re.sub`` with a call back per escape gave for the form,
    for every mixture of the characters that matter (a fuzz, seeded): escaped digits after
    an escape that takes digits, backslash pairs, codes cut short, lone surrogates."""
    reference = {
        "json": (re.compile(r"\\(?:u([0-9A-Fa-f]{4})|(.))", re.DOTALL),
                 lambda m: chr(int(m.group(1), 16)) if m.group(1) is not None else
                 {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}.get(m.group(2),
                                                                             m.group(2))),
        "octal": (re.compile(r"\\(?:([0-3][0-7]{2})|(.))", re.DOTALL),
                  lambda m: chr(int(m.group(1), 8)) if m.group(1) is not None else m.group(2)),
        "hex": (re.compile(r"\\(?:x([0-9A-Fa-f]{2})|(.))", re.DOTALL),
                lambda m: chr(int(m.group(1), 16)) if m.group(1) is not None else m.group(2)),
    }
    decode = {n: d for n, _c, d in extract._DECODINGS}
    alpha = (list("\\%+ux0123456789abcdefABF.\"/nbtrq \u00e9\n\u2028\ud800")
             + ["\\u", "%2", "\\x", "\\0", "\\uD83D", "\\ude00", "\\u00Eb", "\\377", "\\xfF",
                "\\\\", "\\4", "\\u00", "\\x5", "\\05"])
    rnd = random.Random(34)
    own = 0
    for _ in range(40_000):
        t = "".join(rnd.choice(alpha) for _ in range(rnd.randint(0, 24)))
        pairs = extract._QUOTED_PAIRS.split(t)
        assert decode["quoted-pair"](t) == re.sub(r"\\(.)", r"\1", t, flags=re.DOTALL), t
        assert decode["percent"](t) == unquote(t, "latin-1"), t
        for name, (pattern, escape) in reference.items():
            want = pattern.sub(escape, t)
            assert decode[name](t) == want, (name, t)
            escapes = "".join(pairs[1::2])
            assert extract._own_escapes(name, pairs, escapes) == want, (name, t)
            own += extract._code_starts(name, escapes)
    assert own > 10_000  # (the fuzz reaches the code starts)


def _obj(n: int, rnd: random.Random) -> dict[str, object]:
    return {f"k{i}": rnd.choice(["dark", "en-GB", "https://app.example.com/a/b?c=1", 123,
                                 True, "Zo\u00eb", "a\nb", 'say "hi"'])
            for i in range(n)}


def _js_escape(text: str) -> str:
    """JavaScript's ``escape()``: ``%uXXXX`` past Latin-1, ``%XX`` for the rest but
    ``A-Za-z0-9@*_+-./``."""
    keep = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789@*_+-./")
    return "".join(c if c in keep else f"%u{ord(c):04X}" if ord(c) > 255 else f"%{ord(c):02X}"
                   for c in text)


def _b64ish(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
                   for _ in range(n))


def ordinary() -> dict[str, Request]:
    """Values apps send with many escapes, no JWT among them (5-13 units of escape work a
    character)."""
    rnd = random.Random(34)
    enc = quote(json.dumps(_obj(12, rnd), separators=(",", ":")), safe="")
    big = quote(json.dumps(_obj(120, rnd)), safe="")
    redirect = "redirect_uri=" + quote("https://app.example.com/cb?next="
                                       + quote("/home/a b?x=1&y=2", safe=""), safe="")
    jstr = json.dumps(json.dumps({"url": "https://a.example/p/q"} | _obj(20, rnd)))
    heavy = "; ".join([f"c{i}={quote(json.dumps(_obj(3, rnd)), safe='')}" for i in range(40)]
                      + [f"_ga{i}=GA1.2.{rnd.randint(10**9, 10**10)}.1700000000"
                         for i in range(60)])
    document = json.dumps(json.dumps(_obj(200, rnd)))  # (4.8 KB)
    # Cookies written by JavaScript's legacy escape(): non-Latin text as %uXXXX (refused as
    # holding a copy once they passed about 3.5 KB, when the ``unescape`` decoding came:
    # found by the review of it, thirty-fifth session); signed Express cookies, base64 with
    # ``+`` and a dot, URL-encoded.
    escaped = "; ".join(f"h{i}=" + _js_escape("搜索历史 订单 购物车 商品名称 " * (8 + 4 * i))
                        for i in range(10))
    signed = "; ".join(f"connect.sid{i}=s%3A{_b64ish(rnd, 32)}.{_b64ish(rnd, 43)}"
                       for i in range(20))
    accept = ", ".join(f"application/vnd.example.v{i}+json" for i in range(40))
    vnd = [(f"x-type-{i}".encode(), b"application/vnd.api+json; version=1.2")
           for i in range(70)]
    many_signed = "; ".join(f"sid{i}=s%3A{_b64ish(rnd, 32)}.{_b64ish(rnd, 43)}"
                            for i in range(40))
    return {
        # (refused as holding a copy when ``+`` was read as a space outside the query: found
        # by the review of that fix)
        "an Accept of 40 vnd...+json types": ([(b"accept", accept.encode())], "",
                                               "/public/x"),
        "70 headers of application/vnd.api+json": (vnd, "", "/public/x"),
        "40 signed cookies": ([(b"cookie", many_signed.encode())], "", "/public/x"),
        "23 KB of escape() cookies": ([(b"cookie", escaped.encode())], "", "/public/x"),
        "signed cookies, base64 with + and a dot": ([(b"cookie", signed.encode())], "",
                                                    "/public/x"),
        "url-encoded JSON cookie": ([(b"cookie", f"prefs={enc}; theme=dark".encode())], "",
                                    "/public/x"),
        "4 KB url-encoded JSON cookie": ([(b"cookie", f"state={big}".encode())], "",
                                         "/public/x"),
        "encoded redirect URLs": ([], "&".join([redirect] * 6 + ["state=a%2Bb+c",
                                                                 "scope=openid+profile"]),
                                  "/public/x"),
        "7 KB Cookie, encoded JSON and analytics": ([(b"cookie", heavy.encode())], "",
                                                    "/public/x"),
        "JSON string with \\\" and \\/": ([(b"x-context",
                                            jstr.replace("/", "\\/").encode())], "",
                                          "/public/x"),
        "eight JSON string headers": ([(f"x-j{i}".encode(), jstr.encode()) for i in range(8)],
                                      "", "/public/x"),
        "an escaped JSON string in a cookie": ([(b"cookie", b"ctx=" + quote(jstr).encode())],
                                               "", "/public/x"),
        # (refused as holding a copy before the fix: the old charges passed its budget)
        "a 5 KB JSON string of a JSON document": ([(b"x-context", document.encode())], "",
                                                  "/public/x"),
    }


@pytest.mark.parametrize("name", list(ordinary()))
def test_ordinary_escaped_values_hold_no_copy_and_a_copy_in_them_is_found(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No false copy (the allowance covers them); and a forged token added to them, spelled
    in every way the scan reads, is found: as the token, or the request is refused for the
    work (fail closed: a token with every character escaped, beside eight escaped JSON
    headers, passes the budget)."""
    headers, query, path = ordinary()[name]
    _work, found = _escape_work((headers, query, path), monkeypatch)
    assert found == [], found
    token = _token("escapes-review34")
    for spelling, spell in SPELLINGS:
        if spelling.startswith("filler"):
            continue
        extract._LAST_SCAN[0] = None
        found = extract.copies(GUARDS, headers + [(b"x-session", spell(token).encode())],
                               query, path)
        assert found and all(names_issuer(f, ISS) or f is extract._TOO_MANY_FORMS
                             for f in found), (spelling, found[:1])


# --- through a real sidecar -------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    """Header providers (``users`` on ``/orders/**``); the head limit at 128 KiB, so a 64 KB
    header reaches the scan."""
    with orders_mesh(tmp_path_factory.mktemp("copy-scan-escapes"), _policy(False), FILES,
                     limits={"max_header_bytes": "128KiB"}) as mesh:
        yield mesh


def test_escape_heads_are_answered_ordinary_ones_pass_and_copies_are_refused(
        env: OrdersMesh) -> None:
    """Hostile 64 KB heads of each decoding: answered 200 or 401 (never a 5xx, never a
    hang) and the sidecar answers after them; the ordinary family passes (200); a forged
    token written with every character escaped (each decoding's) is refused as a copy."""
    port = env.sidecar.port("inbound")
    for i, name in enumerate(("json \\u002e", "octal \\056", "hex \\x2e",
                              "percent %252e (depth 2)", "pairs and codes", "mixture")):
        r = h.http(port, "GET", "/public/x", headers={
            "x-note": _value(ESCAPES[name], 64_000), "x-seq": str(i)}, ctx=env.ctx, timeout=30)
        assert r.status in (200, 401), (name, r.status)
    for name, (headers, query, path) in ordinary().items():
        sent = {n.decode(): v.decode() for n, v in headers}
        r = h.http(port, "GET", path + ("?" + query if query else ""), headers=sent,
                   ctx=env.ctx)
        assert r.status == 200, (name, r.status)
    token = _token("escapes-review34")
    for spelling in ("quoted-pair-all", "json-u-all", "octal-all", "hex-all"):
        r = h.http(port, "GET", "/public/x",
                   headers={"x-note": dict(SPELLINGS)[spelling](token)}, ctx=env.ctx)
        assert r.status == 401 and "invalid_token" in r.headers.get("www-authenticate", ""), \
            (spelling, r.status)
    assert env.get("/public/x").status == 200
