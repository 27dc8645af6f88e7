"""A provider's token wrapped whole in base64, or cut across chunk cookies (hostile review,
session 30; probe ``repro_copy_supabase_session_cookie.py``).

The copy scan (``extract.copies``) reads a JWT naming a section's issuer in any place no
provider reads, as sent and as an app may decode it (percent, JSON and backslash escapes).
A value encoded whole as base64 was not read: the JWT is never visible as a JWT. So a forged
token reached the app, alone and beside a valid ``Authorization: Bearer``, in:

* ``Cookie: sb-<ref>-auth-token=base64-<base64url(session JSON)>``, the session cookie
  @supabase/ssr writes and reads (``auth.getSession()`` takes ``access_token`` from it
  unverified);
* the same split over chunk cookies ``sb-<ref>-auth-token.0``, ``.1``... (joined in index
  order by the library), also the plain percent-encoded session JSON cut inside the JWT;
* ``Sec-WebSocket-Protocol: base64url.bearer.authorization.k8s.io.<base64url(jwt)>``
  (k8s.io/apiserver's WebSocket bearer authenticator).

Now a value, or what follows a known prefix (``extract.BASE64_PREFIXES``), or any long run of
base64 digits at each alignment, is decoded as base64/base64url; decoded text is scanned like
any other value (``extract._unwrapped_forms``), within the request's scan budget; and cookies
named ``<name>.<digits>`` are joined per name in index order and scanned as one value
(``extract._chunk_joins``). The family as data, through one real sidecar: every wrapping x
both alphabets x padded or not x alone on a route with and without a token rule and beside a
valid header token; chunk counts 1-4 with cuts at several places; ordinary controls pass.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator

import pytest

from sidecar.authn import extract
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import ec_key, mint
from tests.test_token_copies import FILES, INVALID, ISS, _policy

pytestmark = pytest.mark.usefixtures("no_internal_errors")

SB = "sb-abcdefghijklmnop-auth-token"
ROUTES = ("/public/x", "/orders/x")


def _token(key: str = "copies", iss: str = ISS) -> str:
    now = int(time.time())
    # (``iss`` last, as the review's: half a payload cut early names no issuer)
    return mint({"aud": "orders", "sub": "admin", "role": "service_role",
                 "jti": uuid.uuid4().hex, "iat": now - 5, "exp": now + 600, "iss": iss},
                ec_key(key), kid="k1")


def _b64(data: bytes, alphabet: str, padded: bool) -> str:
    out = (base64.urlsafe_b64encode(data) if alphabet == "url"
           else base64.standard_b64encode(data)).decode()
    return out if padded else out.rstrip("=")


def _session(token: str | None) -> str:
    """A @supabase/ssr session JSON (``access_token`` only when ``token``)."""
    now = int(time.time())
    body: dict[str, object] = {"token_type": "bearer", "expires_in": 3600,
                               "expires_at": now + 3600, "refresh_token": "r1.x",
                               "user": {"id": "admin", "email": "a@b.example"}}
    if token is not None:
        body = {"access_token": token, **body}
    return json.dumps(body, separators=(",", ":"))


# Wrappings of a token: (label, build(token, alphabet, padded) -> headers). Every one the
# review found, and the class around it: the whole value, unknown prefixes, other headers.
Wrap = Callable[[str, str, bool], dict[str, str]]
WRAPPINGS: tuple[tuple[str, Wrap], ...] = (
    ("supabase-base64-session", lambda t, a, p: {
        "cookie": f"{SB}=base64-{_b64(_session(t).encode(), a, p)}"}),
    ("supabase-base64-session-second-cookie", lambda t, a, p: {
        "cookie": f"theme=dark; {SB}=base64-{_b64(_session(t).encode(), a, p)}; v=1"}),
    ("supabase-base64-session-quoted", lambda t, a, p: {
        "cookie": f'{SB}="base64-{_b64(_session(t).encode(), a, p)}"'}),
    ("supabase-base64-session-percent", lambda t, a, p: {
        "cookie": f"{SB}=base64-" + urllib.parse.quote(_b64(_session(t).encode(), a, p),
                                                       safe="")}),
    ("base64-session-no-prefix", lambda t, a, p: {
        "cookie": f"session={_b64(_session(t).encode(), a, p)}"}),
    ("base64-session-unknown-prefix", lambda t, a, p: {
        "cookie": f"session=v2x-{_b64(_session(t).encode(), a, p)}"}),
    ("base64-session-in-header", lambda t, a, p: {
        "x-session": _b64(_session(t).encode(), a, p)}),
    ("base64-token-whole-header", lambda t, a, p: {"x-auth": _b64(t.encode(), a, p)}),
    ("base64-token-whole-cookie", lambda t, a, p: {"cookie": f"jwt={_b64(t.encode(), a, p)}"}),
    ("base64-token-in-query-shaped-header", lambda t, a, p: {
        "x-forwarded-uri": "/x?token=" + _b64(t.encode(), a, p)}),
    ("k8s-websocket-subprotocol", lambda t, a, p: {
        "sec-websocket-protocol": "base64url.bearer.authorization.k8s.io."
                                  + _b64(t.encode(), a, p) + ", base64.binary.k8s.io"}),
    ("k8s-websocket-subprotocol-second", lambda t, a, p: {
        "sec-websocket-protocol": "base64.binary.k8s.io, "
                                  "base64url.bearer.authorization.k8s.io."
                                  + _b64(t.encode(), a, p)}),
    ("base64-json-object-token", lambda t, a, p: {
        "x-user": _b64(json.dumps({"jwt": t}).encode(), a, p)}),
)
VARIANTS = [(a, p) for a in ("url", "std") for p in (True, False)]


def _chunked(value: str, count: int, cut: str, token: str, plain: str) -> list[str]:
    """``value`` cut into ``count`` chunks: evenly, or the first cut in the middle of the
    token, or 6 digits into its payload (neither part names the issuer), or one character
    in; the rest evenly."""
    if count == 1:
        return [value]
    if cut == "even":
        size = -(-len(value) // count)
        cuts = [size * i for i in range(1, count)]
    elif cut in ("in-token", "in-payload"):
        at = value.find(token)
        inside = len(token) // 2 if cut == "in-token" else token.index(".") + 7
        first = at + inside if at >= 0 else len(value) // 2
        cuts = [first] + [first + (len(value) - first) * i // count for i in range(1, count - 1)]
    else:  # "early": one character, then even
        rest = len(value) - 1
        cuts = [1] + [1 + rest * i // (count - 1) for i in range(1, count - 1)]
    bounds = [0, *cuts, len(value)]
    return [value[bounds[i]:bounds[i + 1]] for i in range(count)]


# Chunked members: (label, encode(token) -> (value, token as it appears in the value)).
ENCODINGS: tuple[tuple[str, Callable[[str, str, bool], tuple[str, str]]], ...] = (
    ("base64-", lambda t, a, p: ("base64-" + _b64(_session(t).encode(), a, p), t)),
    ("plain-percent-json", lambda t, a, p: (urllib.parse.quote(_session(t), safe=""), t)),
)
CHUNKS = [(enc, count, cut, a, p) for enc in ("base64-", "plain-percent-json")
          for count in (1, 2, 3, 4) for cut in ("even", "in-token", "in-payload", "early")
          if count > 1 or cut == "even"
          for a, p in (VARIANTS if enc == "base64-" else [("url", False)])]


def _chunk_cookie(token: str, enc: str, count: int, cut: str, alphabet: str, padded: bool,
                  order: str = "in-order") -> str:
    encode = dict(ENCODINGS)[enc]
    value, _ = encode(token, alphabet, padded)
    parts = _chunked(value, count, cut, token, value)
    pairs = [f"{SB}.{i}={part}" for i, part in enumerate(parts)]
    if order == "reversed":
        pairs.reverse()
    return "; ".join(["theme=dark", *pairs])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    """Header providers (``users`` on ``/orders/**``, ``Authorization: Bearer``)."""
    with orders_mesh(tmp_path_factory.mktemp("token-copies-30"), _policy(False),
                     FILES) as mesh:
        yield mesh


def _refused(r: h.Response) -> bool:
    return r.status == 401 and r.headers.get("www-authenticate") == INVALID


def _judge(env: OrdersMesh, headers: dict[str, str]) -> list[str]:
    """What goes wrong for ``headers`` carrying a forged copy: alone on each route, and
    beside a valid header token."""
    wrong = []
    for route in ROUTES:
        r = env.get(route, headers)
        if not _refused(r):
            wrong.append(f"alone {route} {r.status}")
    r = env.get("/orders/x", {"authorization": f"Bearer {_token()}", **headers})
    if not _refused(r):
        wrong.append(f"beside Bearer {r.status}")
    return wrong


@pytest.mark.parametrize("label", [label for label, _ in WRAPPINGS])
def test_a_wrapped_copy_is_refused(env: OrdersMesh, label: str) -> None:
    wrap = dict(WRAPPINGS)[label]
    wrong = []
    for alphabet, padded in VARIANTS:
        for kind, key in (("forged", "copies-forger"), ("valid", "copies")):
            headers = wrap(_token(key), alphabet, padded)
            for what in _judge(env, headers) if kind == "forged" else [
                    f"alone {route} {r.status}" for route in ROUTES
                    for r in [env.get(route, headers)] if not _refused(r)]:
                wrong.append((kind, alphabet, padded, what))
    assert not wrong, wrong


@pytest.mark.parametrize(("enc", "count", "cut", "alphabet", "padded"), CHUNKS)
def test_a_copy_cut_across_chunk_cookies_is_refused(env: OrdersMesh, enc: str, count: int,
                                                    cut: str, alphabet: str,
                                                    padded: bool) -> None:
    wrong = []
    for order in ("in-order", "reversed"):
        cookie = _chunk_cookie(_token("copies-forger"), enc, count, cut, alphabet, padded,
                               order)
        wrong += [(order, what) for what in _judge(env, {"cookie": cookie})]
    assert not wrong, wrong


def test_the_review_members_are_found_in_process() -> None:
    """``copies`` itself finds each member the review sent (no sidecar: the pure part)."""
    guards = extract.Guards(query=True, authorization=True, read_schemes=frozenset(
        {"bearer"}), issuers=frozenset({ISS}),
        read_headers=frozenset({b"authorization", b"cookie"}))
    forged = _token("copies-forger")
    session = _session(forged)
    members = [
        [(b"cookie", f"{SB}=base64-{_b64(session.encode(), 'url', False)}".encode())],
        [(b"cookie", _chunk_cookie(forged, "base64-", 2, "even", "url", False).encode())],
        [(b"cookie", _chunk_cookie(forged, "plain-percent-json", 2, "in-token", "url",
                                   False).encode())],
        [(b"sec-websocket-protocol", b"base64url.bearer.authorization.k8s.io."
          + _b64(forged.encode(), "url", False).encode() + b", base64.binary.k8s.io")],
    ]
    # The shortest copy (``.<payload naming "x">.s``) behind each prefix: a run too short
    # to be sampled is decoded from the prefix's end.
    short = b"." + base64.urlsafe_b64encode(b'{"iss":"x"}').rstrip(b"=") + b".s"
    for prefix, _where in extract.BASE64_PREFIXES:
        for alphabet, padded in VARIANTS:
            members.append([(b"cookie", b"a=" + prefix + _b64(short, alphabet,
                                                              padded).encode())])
    for headers in members:
        assert extract.copies(guards._replace(issuers=frozenset({ISS, "x"})), headers,
                              ""), headers
    assert [p for p, _ in extract.BASE64_PREFIXES] == [
        b"base64-", b"base64url.bearer.authorization.k8s.io."]


def _binary_cookies(count: int, size: int) -> str:
    return "; ".join(f"c{i}={_b64(os.urandom(size), 'url' if i % 2 else 'std', i % 3 == 0)}"
                     for i in range(count))


def test_ordinary_values_pass(env: OrdersMesh) -> None:
    """A session cookie without a token (whole and chunked), base64 values that decode to
    binary (both alphabets, padded and not, many and large), base64 JSON without a token,
    another issuer's token wrapped, a k8s subprotocol list without a token, and a valid
    token in the provider's own place: all pass."""
    foreign = _token("copies-foreign", "https://elsewhere.example/")
    empty = _session(None)
    prefs = [json.dumps({"theme": "dark", "v": f"1.2.{i}", "path": "/a/b.c"}).encode()
             for i in range(40)]
    text_values = "; ".join(f"p{i}={_b64(p, 'url', False)}" for i, p in enumerate(prefs))
    cases: dict[str, dict[str, str]] = {
        "session-without-token": {"cookie": f"{SB}=base64-{_b64(empty.encode(), 'url', False)}"},
        "session-without-token-plain": {"cookie": f"{SB}=" + urllib.parse.quote(empty, safe="")},
        "session-without-token-chunked": {"cookie": "; ".join(
            f"{SB}.{i}={part}" for i, part in enumerate(
                _chunked("base64-" + _b64(empty.encode(), "std", True), 3, "even", "", "")))},
        "binary-cookies": {"cookie": _binary_cookies(60, 48)},
        "binary-cookies-large": {"cookie": _binary_cookies(12, 2000)},
        "binary-chunks": {"cookie": "; ".join(
            f"blob.{i}={_b64(os.urandom(900), 'url', False)}" for i in range(4))},
        "base64-json-without-token": {"cookie": text_values},
        "foreign-token-wrapped": {"cookie": f"{SB}=base64-"
                                            f"{_b64(_session(foreign).encode(), 'url', False)}",
                                  "x-auth": _b64(foreign.encode(), "std", True)},
        "k8s-subprotocols-without-token": {"sec-websocket-protocol":
                                           "base64.binary.k8s.io, v4.channel.k8s.io"},
        "trace-and-agent": {"traceparent":
                            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                            "user-agent": "Mozilla/5.0 (X11; Linux x86_64) "
                                          "AppleWebKit/537.36 Chrome/120.0.0.0 Safari/537.36",
                            "x-request-id": base64.b64encode(os.urandom(32)).decode()},
    }
    wrong = []
    for label, headers in cases.items():
        for route, extra in (("/public/x", {}),
                             ("/orders/x", {"authorization": f"Bearer {_token()}"})):
            r = env.get(route, {**extra, **headers})
            if r.status != 200:
                wrong.append((label, route, r.status))
    r = env.get("/orders/x", {"authorization": f"Bearer {_token()}"})
    if r.status != 200:
        wrong.append(("valid-token-alone", "/orders/x", r.status))
    assert not wrong, wrong


def test_every_known_prefix_is_found_by_the_quick_search() -> None:
    """A value is unwrapped only when it holds a long enough run or the word every known
    prefix begins with (``_PREFIX_WORD``): a prefix added to the table must keep it."""
    for prefix, _where in extract.BASE64_PREFIXES:
        assert extract._PREFIX_WORD.match(prefix), prefix
    assert extract.wrapped_run_floor(frozenset({"https://users.example/"})) == 56
    assert extract.wrapped_run_floor(frozenset({"x", "https://users.example/"})) == 20
