"""The copy scan charges each piece what it costs (hostile review, session 33; probe
``repro_copy_scan_piece_cpu.py``): a 30 KB header no provider reads (``X-Note``) holding
~2,000 distinct short JWT-shaped pieces such as ``.xxxxxxxxxxxAAB`` (one 21-digit part made
the value a candidate; a first digit ``x`` no JSON payload starts with) was let through (200)
after ~10 ms of the event loop, where a browser-like head of that size costs 1.6 ms (a 1 MB
head ~360 ms in process). The budget (``extract._ScanBudget``) charged each distinct piece
``SCAN_PIECE_COST`` plus its size, about 80, while decoding it (``_object_payload``:
``jwt.lenient_part`` in Python) cost about 430 in the budget's own unit; each run with a
dot, each part with filler in it (``_filled_pieces``) and each cookie split for chunks
(``_chunk_joins``) were charged nothing.

Now each is charged as measured (``SCAN_RUN_COST``, ``SCAN_FILLER_COST``,
``SCAN_DECODE_COST``, ``SCAN_COOKIE_COST``, ``SCAN_CHUNK_COST``), runs without a dot and
parts without filler are found in C (one search each), and such a head uses up its budget and
is refused as holding a copy (401 ``invalid_token``), as the heads of sessions 29 and 31 are.

Work is counted, not timed (as ``test_copy_scan_cost_review31.py`` counts it): the Python
calls (``sys.setprofile``) one request's scan makes, for every hostile shape of the family as
data, against a plain head of the same place and size. Then one real sidecar: each shape is
answered (200 or the documented 401), never hangs; ordinary heads pass; a copy in them is
still refused.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from sidecar.authn import extract
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import ec_key, mint
from tests.test_copy_scan_cost_review31 import _calls
from tests.test_token_copies import FILES, ISS, _policy

pytestmark = pytest.mark.usefixtures("no_internal_errors")

_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# One part long enough that the value is a candidate (``_MAY_BE_COPY``) whatever follows.
CANDIDATE = ".xxxxxxxxxxxxxxxxxxxxx"


def _build(unit: Callable[[int, str], str], size: int, sep: str, start: str = "") -> str:
    """``start``, then ``unit(i, u)`` for distinct three-digit ``u``, joined by ``sep``,
    cut at ``size`` characters."""
    out, n = ([start] if start else []), len(start)
    for i, u in enumerate("".join(t) for t in itertools.product(_DIGITS, repeat=3)):
        if n >= size:
            break
        out.append(unit(i, u))
        n += len(out[-1]) + len(sep)
    return sep.join(out)[:size]


# A request: (headers, query, path).
Request = tuple[list[tuple[bytes, bytes]], str, str]


def _header(value: str) -> Request:
    return [(b"x-note", value.encode())], "", "/public/x"


def _cookie(value: str) -> Request:
    return [(b"cookie", value.encode())], "", "/public/x"


def _query(value: str) -> Request:
    return [], value, "/public/x"


def _path(value: str) -> Request:
    return [], "", "/public/" + value


# The family: (place, a value of ``size`` characters). Each is a head full of short pieces
# or of what the scan passes over one by one in Python.
HOSTILE: dict[str, tuple[Callable[[str], Request], Callable[[int], str]]] = {
    "review: distinct pieces, space": (_header, lambda n: _build(
        lambda i, u: ".xxxxxxxxxxx" + u, n, " ", CANDIDATE)),
    "distinct pieces, ';'": (_header, lambda n: _build(
        lambda i, u: ".xxxxxxxxxxx" + u, n, ";", CANDIDATE)),
    "distinct pieces, first digit e (filled too)": (_header, lambda n: _build(
        lambda i, u: ".eeeeeeeeeee" + u, n, " ", CANDIDATE)),
    "12-digit pieces": (_header, lambda n: _build(
        lambda i, u: ".xxxxxxxxx" + u, n, " ", CANDIDATE)),
    "the same piece again": (_header, lambda n: _build(
        lambda i, u: ".xxxxxxxxxxxAAB", n, " ", CANDIDATE)),
    "short dotted runs": (_header, lambda n: _build(lambda i, u: "a." + u, n, " ", CANDIDATE)),
    "filler in each part": (_header, lambda n: _build(
        lambda i, u: ".xxxx!xxxxxxx" + u, n, "", CANDIDATE)),
    "chunked cookies a.N=": (_cookie, lambda n: _build(
        lambda i, u: f"a.{i}=.eeeeeeeee{u}", n, ";")),
    "chunked cookies, nothing in them": (_cookie, lambda n: _build(
        lambda i, u: f"a.{i % 10000}=v", n, ";")),
    "plain cookies cN=.": (_cookie, lambda n: _build(
        lambda i, u: f"c{u}=.eeeeeeeee{u}", n, ";")),
    "query": (_query, lambda n: _build(
        lambda i, u: f"p{u}=.xxxxxxxxxxx{u}", n, "&", "q=" + CANDIDATE)),
    "query, + separators": (_query, lambda n: _build(
        lambda i, u: ".xxxxxxxxxxx" + u, n, "+", "q=" + CANDIDATE)),
    "path": (_path, lambda n: _build(lambda i, u: "a.xxxxxxxxxxx" + u, n, "/", "a" + CANDIDATE)),
    "path, ';' parameters": (_path, lambda n: _build(
        lambda i, u: "a.xxxxxxxxxxx" + u, n, ";", "a" + CANDIDATE)),
}
# A plain value of each place (nothing in it the scan reads further).
PLAIN: dict[Callable[[str], Request], Callable[[int], str]] = {
    _header: lambda n: "y" * n,
    _cookie: lambda n: "c=" + "y" * (n - 2),
    _query: lambda n: "q=" + "y" * (n - 2),
    _path: lambda n: "y" * n,
}

GUARDS = extract.Guards(query=True, authorization=True, read_schemes=frozenset({"bearer"}),
                        issuers=frozenset({ISS}),
                        read_headers=frozenset({b"authorization", b"cookie"}))


def _scan(request: Request) -> tuple[int, list[str]]:
    headers, query, path = request
    extract._LAST_SCAN[0] = None  # (the last request's scan is kept)
    extract.copies(GUARDS, headers, query, path)  # (the caches warm)
    extract._LAST_SCAN[0] = None
    return _calls(lambda: extract.copies(GUARDS, headers, query, path))


# At most this many calls more than a plain head of the same place and size, plus one per
# ``BYTES_PER_CALL`` bytes (before: ~16,000-20,000 for a 30 KB head of the review's shape,
# ~0.6 a byte, a plain head ~20; with the charges alone about 6,000; with each form's own
# allowance for its runs, ``extract.SCAN_RUN_ALLOWANCE``, which ordinary Cookie headers of
# 100-150 analytics cookies need -- the review of the fix found them refused --, about
# 10,400, a third of a call a byte).
CALLS_FREE = 3_000
BYTES_PER_CALL = 3
SIZES = (30_000, 200_000)


def test_each_hostile_shape_costs_the_scan_a_bounded_amount_of_work() -> None:
    """Through ``extract.copies``, in process, for every shape at two sizes: the calls a
    request makes are within ``CALLS_FREE`` plus one per ``BYTES_PER_CALL`` bytes of those a
    plain head of the same place and size makes; and it is refused as holding a copy (past
    the budget: nothing in it names an issuer)."""
    wrong = []
    for (shape, (place, value)), size in itertools.product(HOSTILE.items(), SIZES):
        plain, found = _scan(place(PLAIN[place](size)))
        assert found == [], (shape, size, "plain")
        calls, found = _scan(place(value(size)))
        bound = plain + CALLS_FREE + size // BYTES_PER_CALL
        if calls > bound or found != [extract._TOO_MANY_FORMS]:
            wrong.append((shape, size, calls, bound, found[:1]))
    assert not wrong, wrong


def test_the_records_of_a_hostile_path_cost_a_bounded_amount_of_work() -> None:
    """``path_for_records`` reads a path's pieces as the scan does, each charged the same
    (before: ~60,000 calls for a 30 KB path of distinct pieces, 400,000 for 200 KB); past
    its budget the pieces count as tokens (hidden in the records, fail closed)."""
    for (shape, (place, value)), size in itertools.product(HOSTILE.items(), SIZES):
        if place is not _path:
            continue
        path = place(value(size))[2]
        extract.path_for_records(path)  # (the caches warm)
        calls, shown = _calls(lambda path=path: extract.path_for_records(path))
        # (two thirds of a call a byte: each path segment is a form with its own allowance)
        assert calls <= CALLS_FREE + size * 2 // 3, (shape, size, calls)
        assert shown.startswith("/public/<token sha256:"), (shape, size, shown[:40])


# --- through a real sidecar -------------------------------------------------------------------

# Under the default head limit (32 KiB) with the rest of the request; a query or a path
# under the request target's (``policy.paths.MAX_TARGET_BYTES``, 8 KiB: past it 400).
HEAD_SIZE = 28_000
TARGET_SIZE = 7_800
# Shapes the sidecar refuses before any token is looked at (docs/policy.md: a ``;`` in a
# path is 400 ``semicolon``).
REFUSED_BEFORE = {"path, ';' parameters": (400, "semicolon")}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    """Header providers (``users`` on ``/orders/**``); the default head limit."""
    with orders_mesh(tmp_path_factory.mktemp("copy-scan-pieces"), _policy(False),
                     FILES) as mesh:
        yield mesh


def _forged() -> str:
    now = int(time.time())
    return mint({"iss": ISS, "aud": "orders", "sub": "alice", "jti": uuid.uuid4().hex,
                 "iat": now - 5, "exp": now + 600}, ec_key("copy-scan-pieces-forger"),
                kid="k1")


def _foreign(n: int) -> str:
    now = int(time.time())
    return mint({"iss": "https://elsewhere.example/", "aud": "orders", "sub": f"bob{n}",
                 "exp": now + 600}, ec_key("copy-scan-pieces-foreign"), kid="k1")


def _send(env: OrdersMesh, request: Request, extra: dict[str, str]) -> h.Response:
    headers, query, path = request
    sent = {n.decode(): v.decode() for n, v in headers} | extra
    return h.http(env.sidecar.port("inbound"), "GET", path + ("?" + query if query else ""),
                  headers=sent, ctx=env.ctx, timeout=30)


def test_each_shape_is_answered_and_ordinary_heads_pass(env: OrdersMesh) -> None:
    """Every hostile shape, near the head limit: answered (401 ``invalid_token``, refused
    as holding a copy; never a hang, never a 5xx), and a request after it answered. An
    ordinary head -- a browser's user agent and cookies, trace ids, a chunked session
    cookie, three JWTs of another issuer -- passes (200); with a forged copy in it, 401."""
    wrong = []
    for i, (shape, (place, value)) in enumerate(HOSTILE.items()):
        size = TARGET_SIZE if place in (_query, _path) else HEAD_SIZE
        r = _send(env, place(value(size)), {"x-seq": str(i)})
        if shape in REFUSED_BEFORE:
            if (r.status, env.sidecar.log_events()[-1].get("reason")) != REFUSED_BEFORE[shape]:
                wrong.append((shape, r.status))
        elif r.status != 401 or "invalid_token" not in r.headers.get("www-authenticate", ""):
            wrong.append((shape, r.status))
    assert not wrong, wrong
    ordinary = {
        "user-agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
                      "Gecko) Chrome/131.0.0.0 Safari/537.36",
        "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "x-request-id": str(uuid.uuid4()),
        "cookie": "; ".join([f"_ga=GA1.2.{1_234_567_890 + n}.1700000000" for n in range(3)]
                            + [f"sb-x-auth-token.{n}=" + _foreign(9)[n * 40:(n + 1) * 40]
                               for n in range(3)] + ["theme=dark", "lang=en-GB"]),
        "x-other-token": _foreign(1),
        "x-id-token": _foreign(2),
        "x-forwarded-token": "Bearer " + _foreign(3),
    }
    assert h.http(env.sidecar.port("inbound"), "GET", "/public/x", headers=ordinary,
                  ctx=env.ctx).status == 200
    # A heavy site's Cookie header: 60 to 150 analytics, consent and session cookies (up to
    # 9 KB; the review of the fix found 120 of them refused as holding a copy).
    for count in (60, 120, 150):
        heavy = ordinary | {"cookie": _heavy_cookies(count)}
        assert h.http(env.sidecar.port("inbound"), "GET", "/public/x", headers=heavy,
                      ctx=env.ctx).status == 200, count
    with_copy = ordinary | {"x-auth-token": _forged()}
    r = h.http(env.sidecar.port("inbound"), "GET", "/public/x", headers=with_copy,
               ctx=env.ctx)
    assert r.status == 401 and "invalid_token" in r.headers.get("www-authenticate", "")
    assert env.get("/public/x").status == 200


def _heavy_cookies(count: int) -> str:
    """``count`` cookies of the kinds heavy sites set (Google Analytics and Ads, Facebook's
    pixel, OneTrust consent, Hotjar, session ids), no JWT among them."""
    rnd = random.Random(count)

    def digits(k: int) -> str:
        return "".join(rnd.choice("0123456789") for _ in range(k))

    def hexes(k: int) -> str:
        return "".join(rnd.choice("0123456789abcdef") for _ in range(k))

    kinds = [
        lambda i: f"_ga_X{i}=GS1.1.{digits(10)}.{digits(2)}.1.{digits(10)}.0.0.0",
        lambda i: f"_gcl_au{i}=1.1.{digits(9)}.{digits(10)}",
        lambda i: f"_fbp{i}=fb.1.{digits(13)}.{digits(10)}",
        lambda i: f"sid{i}={hexes(32)}",
        lambda i: f"consent{i}=true",
        lambda i: (f"OptanonConsent{i}=isGpcEnabled=0&datestamp=Mon+Dec+07+2026+05%3A00%3A00"
                   f"+GMT%2B0000&version=202310.2.0&hosts=&consentId={hexes(8)}-{hexes(4)}"
                   "&interactionCount=1"),
        lambda i: f"lang{i}=en-US",
        lambda i: (f"_hjSessionUser_{i}=eyJpZCI6IjEyMzQ1Njc4LWFiY2QtNWVmNi05MDEyLTM0NTY3ODk"
                   "wYWJjZCIsImNyZWF0ZWQiOjE3MDAwMDAwMDAwMDAsImV4aXN0aW5nIjp0cnVlfQ=="),
        lambda i: f"_uetvid{i}={hexes(32)}",
    ]
    return "; ".join(kinds[i % len(kinds)](i) for i in range(count))
