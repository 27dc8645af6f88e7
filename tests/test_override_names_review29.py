"""Method-override names as every reader reads them (hostile review, session 29).

qs (Express 4 ``req.query`` and ``express.urlencoded({extended: true})``; co-body, so
koa-bodyparser, with ``allowDots``) and Rack 2.2 (``Rack::MethodOverride``: Rails up to 7.0,
Sinatra 2) read names PHP does not: ``[_method]``, ``%5B_method%5D``, ``[_method]]`` and
``[_method][]`` are ``_method`` to qs, ``._method`` to co-body, ``]_method``, ``_method]`` and
``[_method`` to Rack 2. The sidecar folded names as PHP does only, so ``POST /orders/7`` with
such a field ran DELETE past a rule denying it -- in the query, a form, a multipart part's
name and a POST without a Content-Type (26 cases over both listeners, probe-http4
``repro_qs_leading_bracket.py`` against real Express and Rack servers).

Now a name is an override's when ANY reading makes it one (``extract.NAME_READINGS``: plain,
PHP, Rack 2, Rack 3, qs, qs with allowDots). The families as data: every spelling, each with
the reading that makes it an override, in every place (query, urlencoded body, multipart part
name, a body without Content-Type) through both listeners of one real sidecar pair; the
look-alikes no reader runs (``x[_method]``, ``_methods``) reach the app; each reading is
needed (a spelling only it reads); pathological names cost what a plain one does; and the
token side (a provider's query or cookie location) reads names as that place's readers do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import unquote_plus

import pytest

from sidecar.authn import extract
from sidecar.authn.extract import (
    _cookie_pairs,
    extract_tokens,
    guard_tokens,
    guards_for,
    param_name,
    remove_token,
)
from sidecar.authn.jwt import TokenInvalid
from sidecar.errors import BadRequest
from sidecar.http.body_override import BodyOverrides
from sidecar.http.request import METHOD_OVERRIDE_PARAMS, method_overrides
from sidecar.policy.sections import JwtProvider, TokenLocation
from tests.harness import module_fixture
from tests.test_hostile_http import SIDES, H, Mesh, assert_generic_refusal, exchange, statuses
from tests.test_method_override_query import POLICY

pytestmark = pytest.mark.usefixtures("no_internal_errors")

# Spelling (as sent, still encoded) -> the reading (``NAME_READINGS``' reader, its first
# word) that makes it an override name. The review's members first, then the rest of the
# family each reading opens.
SPELLINGS: dict[str, str] = {
    "[_method]": "qs",                      # Express body and req.query
    "%5B_method%5D": "qs",
    "%5b_method%5d": "qs",
    "[_method]]": "qs",
    "[_method][]": "qs",                    # an array: method-override takes [0]
    "[_method][x]": "qs",
    "_method[": "qs",                       # an object under _method (Rack: "_method[")
    "._method": "qs allowDots",             # co-body (koa-bodyparser)
    "%2E_method": "qs allowDots",
    "._method.x": "qs allowDots",
    "_method.x": "qs allowDots",
    "]_method": "Rack 2",                   # Rack::MethodOverride (Rails, Sinatra)
    "_method]": "Rack 2",
    "[_method": "Rack 2",
    "[[_method]]": "Rack 2",
    "[]_method": "Rack 2",
    "[[[[_method": "Rack 2",
    "]]_method]]": "Rack 2",
    "%5D_method": "Rack 2",
    "_method[x": "Rack 3",                  # Rails 7.1+, Sinatra 4
    "[X-HTTP-Method-Override]": "qs",       # the override headers' names too
    "]x-http-method": "Rack 2",
    ".X-Method-Override": "qs allowDots",
    ".method": "PHP",                       # as before (tests/test_method_override_query.py)
    "_method%00junk": "PHP",
}
# Look-alikes no reader runs as an override: they reach the app as sent.
CONTROLS = ["x[_method]", "_methods", "x._method", "a%5B_method%5D", "[x]_method",
            "method", "x_method", "_method_x[]"]
# Where a name stands: (place, request builder from a name and a value).
BOUNDARY = "----review29boundary"


def _post(target: str, body: bytes = b"", content_type: str | None = None) -> bytes:
    head = f"POST {target} HTTP/1.1\r\n".encode() + H
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n".encode()
    return head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body


def _multipart(name: str, value: str) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="title"\r\n\r\nhello\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            f"--{BOUNDARY}--\r\n").encode()


PLACES: dict[str, Callable[[str, str], bytes]] = {
    "query": lambda n, v: _post(f"/orders/7?a=1&{n}={v}", b"x"),
    "urlencoded": lambda n, v: _post("/orders/7", f"title=x&{n}={v}".encode(),
                                     "application/x-www-form-urlencoded"),
    "multipart": lambda n, v: _post("/orders/7", _multipart(n, v),
                                    f"multipart/form-data; boundary={BOUNDARY}"),
    "no_content_type": lambda n, v: _post("/orders/7", f"{n}={v}".encode()),
}


def _readers() -> dict[str, Callable[[str], str]]:
    return {r.reader.partition(" (")[0]: r.read for r in extract.NAME_READINGS}


# --- in process ----------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_each_spelling_is_an_override_in_every_reader_of_the_sidecar(spelling: str) -> None:
    """The reading named for it makes it one (the table says who reads it so); the query
    reader, the form reader (in pieces of 1 byte and whole) and the multipart reader find
    the method."""
    read = _readers()[SPELLINGS[spelling]]
    assert read(unquote_plus(spelling)).lower() in METHOD_OVERRIDE_PARAMS, spelling
    assert param_name(spelling) in METHOD_OVERRIDE_PARAMS
    for shape in ("{p}", "a=1&{p}", "a=1;{p}", "_method=PUT&{p}"):
        assert "DELETE" in method_overrides(shape.format(p=f"{spelling}=DELETE")), shape
    body = f"title=x&{spelling}=delete".encode()
    for step in (1, len(body)):
        reader = BodyOverrides("urlencoded")
        for i in range(0, len(body), step):
            reader.feed(body[i:i + step])
        assert reader.finish() == ("DELETE",), step
    reader = BodyOverrides("multipart", BOUNDARY.encode())
    reader.feed(_multipart(spelling, "DELETE"))
    assert reader.finish() == ("DELETE",)


def test_every_reading_is_needed() -> None:
    """The readings the override side needs each have a member only they make an override:
    dropping one from the table opens a hole. (qs's reading is qs allowDots' for a name
    without a dot; PHP's holds plain's for override names, and qs's cut at the first ``[``
    Rack 3's: qs, plain and Rack 3 stand in the table for the token side, which reads the
    query without allowDots.)"""
    readers = _readers()
    assert set(readers) == {"plain", "PHP", "Rack 2", "Rack 3", "qs", "qs allowDots"}
    for label in ("PHP", "Rack 2", "qs allowDots"):
        only = [s for s in SPELLINGS
                if readers[label](unquote_plus(s)).lower() in METHOD_OVERRIDE_PARAMS
                and not any(other(unquote_plus(s)).lower() in METHOD_OVERRIDE_PARAMS
                            for name, other in readers.items() if name != label)]
        assert only, label
    # qs against the other query readers (the token side's)
    query_readers = [readers[n] for n in ("plain", "PHP", "Rack 2", "Rack 3")]
    assert any(readers["qs"](s).lower() == "access_token"
               and all(r(s).lower() != "access_token" for r in query_readers)
               for s in ("access_token[", "[access_token]]x"))


@pytest.mark.parametrize("name", CONTROLS)
def test_look_alikes_are_no_override(name: str) -> None:
    assert param_name(name) not in METHOD_OVERRIDE_PARAMS
    assert method_overrides(f"{name}=DELETE") == ()
    reader = BodyOverrides("urlencoded")
    reader.feed(f"{name}=DELETE".encode())
    assert reader.finish() == ()


def test_qs_split_at_bracket_equals_is_no_method() -> None:
    """qs splits ``_method[=]=DELETE`` at ``]=`` (key ``_method[=]``, an object under
    ``_method``); the sidecar's name, up to the first ``=``, is ``_method[`` -- read as
    ``_method`` -- and its value, holding ``]=``, is no method: 400."""
    for name in ("_method[=]", "_method[x=]", "[_method=]"):
        with pytest.raises(BadRequest) as err:
            method_overrides(f"{name}=DELETE")
        assert err.value.reason == "bad_method"


# Names that make a reading walk: brackets, dots, nested groups, runs of each (the readings
# are C scans plus at most ``MAX_QS_BRACKETS`` steps).
HOSTILE_NAMES = ["[" * 200_000, "]" * 200_000, "[]" * 100_000, "[" * 100_000 + "]" * 100_000,
                 "." * 200_000, ".a" * 100_000, "[[a]" * 50_000, "%5B" * 66_000,
                 " " * 200_000 + "[", "[" + "[a." * 66_000]


_LETTERS = str.maketrans("[]. ", "abcd")


def test_the_readings_cost_what_a_plain_name_does() -> None:
    """Every reading of a 200 KB hostile name costs at most a generous multiple of the same
    readings of a plain name of that length (linear, nothing quadratic)."""
    def cost(name: str) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            param_name(name)
            extract.param_names(name, extract.QUERY)
            extract.param_names(name, extract.COOKIE_PLACE)
            best = min(best, time.perf_counter() - start)
        return best

    for name in HOSTILE_NAMES:
        control = cost(name.replace("%5B", "%61").translate(_LETTERS))
        assert cost(name) < 25 * control + 0.005, name[:12]


def test_a_long_run_of_leading_brackets_is_judged() -> None:
    for name in (b"[" * 5000 + b"_method", b"%5B" * 2000 + b"_method", b"]" * 4090 + b"_method"):
        reader = BodyOverrides("urlencoded")
        try:
            reader.feed(name + b"=DELETE")
            assert reader.finish() == ("DELETE",), name[:8]
        except BadRequest:
            pass


# --- the token side: a provider's own places -----------------------------------------------

def _provider(*locations: TokenLocation) -> JwtProvider:
    return JwtProvider("p", "https://users.example/", ("orders",), ("ES256",),
                       locations=locations)


QUERY_TOKEN = _provider(TokenLocation("query", "access_token"))
COOKIE_TOKEN = _provider(TokenLocation("cookie", "session"))
# Query spellings of ``access_token`` a query reader reads as it (qs, Rack 2, Rack 3, PHP).
TOKEN_QUERY_SPELLINGS = ["[access_token]", "%5Baccess_token%5D", "]access_token",
                         "access_token]", "[access_token", "access_token[x", "access.token"]


@pytest.mark.parametrize("spelling", TOKEN_QUERY_SPELLINGS)
def test_a_query_token_is_found_in_every_spelling_a_query_reader_reads(spelling: str) -> None:
    """Found (so verified), a second copy refused, removed when not forwarded; and where no
    provider reads the query, an RFC 6750 ``access_token`` there counts (``guard_tokens``)."""
    found = extract_tokens(QUERY_TOKEN, [], f"a=1&{spelling}=TOKEN")
    assert found is not None and found.token == "TOKEN"
    with pytest.raises(TokenInvalid):
        extract_tokens(QUERY_TOKEN, [], f"access_token=GOOD&{spelling}=EVIL")
    assert remove_token([], f"a=1&{spelling}=TOKEN&b=2", found.locations)[1] == "a=1&b=2"
    guards = guards_for([_provider()])
    assert guards is not None
    assert guard_tokens(guards, [], f"{spelling}=EVIL") == ["EVIL"]


@pytest.mark.parametrize("name", ["access_token.x", ".access_token", "x[access_token]",
                                  "access_tokens"])
def test_a_query_token_location_does_not_take_other_names(name: str) -> None:
    """A provider's own place is read by its place's readers only: ``access_token.x`` is
    ``access_token`` to qs with allowDots, which no query reader uses by default (PHP reads
    ``access_token_x``); taken as the token it would be refused or, forward_token off,
    removed from the app's query."""
    assert extract_tokens(QUERY_TOKEN, [], f"{name}=x") is None
    loc = QUERY_TOKEN.locations
    assert remove_token([], f"{name}=x", loc)[1] == f"{name}=x"


def test_cookie_names_are_read_as_cookie_readers_read_them() -> None:
    """Cookie readers do not nest (Rack, Express's cookie, Go, Java; PHP does, as now):
    ``]session`` or ``[session]`` is another cookie, ``session[x]`` is PHP's ``session``."""
    for name in ("]session", "[session]", "session]", ".session"):
        assert extract_tokens(COOKIE_TOKEN, [(b"cookie", f"{name}=x".encode())], "") is None
    found = extract_tokens(COOKIE_TOKEN, [(b"cookie", b"a=1; session[x]=T")], "")
    assert found is not None and found.token == "T"
    assert [v for n, v in _cookie_pairs([(b"cookie", b"session.x=1")])
            if "session_x" in n] == ["1"]


# --- through a real sidecar pair -----------------------------------------------------------

mesh = module_fixture("override-names-review29", lambda tmp: Mesh(tmp, policy=POLICY))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_a_denied_method_in_any_spelling_is_denied(mesh: Mesh, side: str,
                                                   spelling: str) -> None:
    """In the query, a urlencoded body, a multipart part's name and a body without
    Content-Type: 403, nothing of the request (the query's) or no complete request (a
    body's) reaches the app."""
    for place, build in PLACES.items():
        request = build(spelling, "DELETE")
        mark = mesh.app.snapshot()
        out = exchange(mesh, side, request)
        assert statuses(out) == [403], (place, request[:200], out[:300])
        assert_generic_refusal(out, close=side == "inbound")
        if place == "query":
            assert mesh.app.targets_since(mark) == [], place
        else:
            assert mesh.app.snapshot()[1] == mark[1], place


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", CONTROLS)
def test_a_look_alike_reaches_the_app_as_sent(mesh: Mesh, side: str, name: str) -> None:
    for place, build in PLACES.items():
        request = build(name, "DELETE")
        mark = mesh.app.snapshot()
        out = exchange(mesh, side, request)
        assert statuses(out) == [200], (place, request[:200], out[:300])
        assert mesh.app.snapshot()[1] == mark[1] + 1, place


@pytest.mark.parametrize("side", SIDES)
def test_an_allowed_method_in_a_new_spelling_reaches_the_app(mesh: Mesh, side: str) -> None:
    for place, build in PLACES.items():
        mark = mesh.app.snapshot()
        out = exchange(mesh, side, build("[_method]", "PUT"))
        assert statuses(out) == [200], (place, out[:300])
        assert mesh.app.snapshot()[1] == mark[1] + 1, place


@pytest.mark.parametrize("side", SIDES)
def test_a_qs_split_value_is_a_bad_method(mesh: Mesh, side: str) -> None:
    for place in ("query", "urlencoded", "no_content_type"):
        mark = mesh.app.snapshot()
        out = exchange(mesh, side, PLACES[place]("_method[=]", "DELETE"))
        assert statuses(out) == [400], (place, out[:300])
        assert_generic_refusal(out, close=side == "inbound")
        assert mesh.app.snapshot()[1] == mark[1], place
