"""Payloads Python's json cannot read, copies without a header, integers no double holds
(hostile review, session 29).

1. A forged JWT naming the provider's issuer, in a place no provider reads (``X-Auth-Token``,
   a ``jwt`` cookie, ``?token=``, a path segment; also beside a valid Bearer token), reached
   the app when ``json.loads`` gave up on its payload before it had seen the top-level
   ``iss``: a byte that is no UTF-8 (a Latin-1 ``é``: ``JSON.parse(atob(p))``, Node's
   ``Buffer.toString`` and Go read it), an integer of more than 4,300 digits, nesting past
   the interpreter's recursion limit. And when its header was empty or ended in a character
   that is no base64 digit (``.<p>.<s>``, ``.<p>``, ``<h>~.<p>.<s>``: npm jwt-decode reads
   ``token.split(".")[1]`` whatever the header is): the copy scan dropped a run that began
   with its dot. Now ``jwt.names_issuer`` reads every lenient reading (bad bytes replaced,
   Latin-1, numbers unconverted, a bounded scan for an ``iss`` member when nothing parses)
   and every part after a first dot is a candidate payload.
2. The same payloads in the provider's own ``Authorization`` header, next to an introspected
   provider that reads it too: an ``alg: none`` token naming the JWT provider's issuer was
   "not mine" (an opaque token) and passed on a route that asks for no token.
3. A custom claim that is an integer past the double range (``10**400``, 309 nines) was
   accepted and forwarded as 401 digits (``JSON.parse``: ``Infinity``); only the ``1e400``
   spelling was refused. ``jsondoc.read_json`` now refuses both, for every reader of
   documents from other parties (tokens, introspection answers, JWKS, OpenID metadata).

Each family as data (payload x header shape x place; number x spot x reader), through one
real sidecar per module (a ``jwks_file`` provider, an introspected provider reading the same
``Authorization`` header from a scripted HTTPS server), and in process.
"""

from __future__ import annotations

import base64
import hashlib
import http.client as httpclient
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sidecar.authn import extract
from sidecar.authn import jwt as jwtmod
from sidecar.authn.jwks import parse_jwks
from sidecar.authn.jwt import names_issuer
from sidecar.authn.oauth import check_metadata, introspection_claims
from sidecar.errors import ConfigError
from sidecar.jsondoc import JsonDocError, read_json
from sidecar.policy.paths import MAX_TARGET_BYTES
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import b64, ec_key, jwk, mint

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://users.example/"
OTHER = "https://users.example.evil/"
FRONTEND = h.spiffe("frontend")
INVALID = 'Bearer realm="sidecar", error="invalid_token"'

# --- 1+2: payloads json cannot read, and header shapes ---------------------------------------


def _deep(levels: int, kind: str = "[") -> bytes:
    if kind == "[":
        return b"[" * levels + b"]" * levels
    return b'{"a": ' * levels + b"1" + b"}" * levels


def _body(iss: str, *, extra: bytes = b"", first: bytes = b"", name: bytes = b"iss",
          value: bytes | None = None) -> bytes:
    """A payload naming ``iss`` (under the member ``name``; ``value``: its raw JSON instead),
    with the raw JSON members ``first`` before it and ``extra`` after the others."""
    now = int(time.time())
    shown = json.dumps(iss).encode() if value is None else value
    return (b"{" + first + b'"' + name + b'": ' + shown + b', "aud": "orders", "sub": "admin", '
            b'"role": "admin", "exp": ' + str(now + 600).encode() + extra + b"}")


def _encoded(body: bytes) -> str:
    return base64.urlsafe_b64encode(body).rstrip(b"=").decode()


def _one_more_digit(body: bytes) -> str:
    """Node's ``Buffer.from(p, "base64url")`` drops a last digit that completes no byte."""
    while len(_encoded(body)) % 4:
        body = body[:-1] + b" }"
    return _encoded(body) + "A"


# label -> the payload part naming ``iss``. Each was read as naming nothing (but the clean
# control, and the padded one: Python's decoder reads on past the padding).
PAYLOADS: dict[str, Callable[[str], str]] = {
    "clean (control)": lambda iss: _encoded(_body(iss)),
    "non-UTF-8 byte": lambda iss: _encoded(_body(iss, extra=b', "x": "\xff"')),
    "Latin-1 e-acute": lambda iss: _encoded(_body(iss, extra=b', "name": "Ren\xe9"')),
    "lone continuation byte": lambda iss: _encoded(_body(iss, extra=b', "x": "\x80"')),
    "cut UTF-8 sequence": lambda iss: _encoded(_body(iss, extra=b', "x": "\xe2\x82"')),
    "non-UTF-8 byte before iss": lambda iss: _encoded(_body(iss, first=b'"x": "\xfe", ')),
    "5000-digit integer": lambda iss: _encoded(_body(iss, extra=b', "n": ' + b"9" * 5000)),
    "negative 5000-digit integer in a list": lambda iss: _encoded(
        _body(iss, extra=b', "n": [1, -' + b"9" * 5000 + b"]")),
    "array 1500 deep": lambda iss: _encoded(_body(iss, extra=b', "d": ' + _deep(1500))),
    "array 3000 deep": lambda iss: _encoded(_body(iss, extra=b', "d": ' + _deep(3000))),
    "objects 3000 deep": lambda iss: _encoded(_body(iss, extra=b', "d": ' + _deep(3000, "{"))),
    "deep nesting before iss": lambda iss: _encoded(
        _body(iss, first=b'"d": ' + _deep(1500) + b", ")),
    "deep, iss named ISS": lambda iss: _encoded(
        _body(iss, name=b"ISS", extra=b', "d": ' + _deep(1500))),
    "deep, iss name escaped": lambda iss: _encoded(
        _body(iss, name=b"\\u0069\\u0073s", first=b'"d": ' + _deep(1500) + b", ")),
    "deep, iss in a list": lambda iss: _encoded(_body(
        iss, value=b'["x", 1, ' + json.dumps(iss).encode() + b"]",
        first=b'"d": ' + _deep(1500) + b", ")),
    "deep, issuer escaped": lambda iss: _encoded(_body(
        iss, value=json.dumps(iss).encode().replace(b"/", b"\\/"),
        first=b'"d": ' + _deep(1500) + b", ")),
    "deep and a Latin-1 byte": lambda iss: _encoded(
        _body(iss, extra=b', "x": "\xe9", "d": ' + _deep(1500))),
    "padding, then more digits": lambda iss: base64.urlsafe_b64encode(
        _body(iss) + b"  ").decode() + "QQ",
    "one more digit": lambda iss: _one_more_digit(_body(iss)),
}
HEADER = b64(b'{"alg":"ES256","typ":"JWT","kid":"k1"}')
NONE_HEADER = b64(b'{"alg":"none","typ":"JWT"}')
SIGNATURE = b64(b"x" * 64)
# label -> the token from (header, payload part, signature).
SHAPES: dict[str, Callable[[str, str, str], str]] = {
    "h.p.s": lambda hd, p, s: f"{hd}.{p}.{s}",
    "h.p": lambda hd, p, s: f"{hd}.{p}",
    ".p.s (empty header)": lambda hd, p, s: f".{p}.{s}",
    ".p (empty header, no signature)": lambda hd, p, s: f".{p}",
    "h~.p.s (header ends in ~)": lambda hd, p, s: f"{hd}~.{p}.{s}",
    "h!.p (header ends in !, no signature)": lambda hd, p, s: f"{hd}!.{p}",
    "h.p!!!! (filler, no signature)": lambda hd, p, s: f"{hd}.{p[:8]}!!!!{p[8:]}",
}


def _token(payload: str, shape: str, iss: str = ISS, header: str = HEADER) -> str:
    return SHAPES[shape](header, PAYLOADS[payload](iss), SIGNATURE)


def _valid(key: str = "r29") -> str:
    now = int(time.time())
    return mint({"iss": ISS, "aud": "orders", "sub": "alice", "iat": now - 5,
                 "exp": now + 600, "jti": f"j{time.monotonic_ns()}"}, ec_key(key), kid="k1")


# Places no provider reads: (label, route, headers, query, path suffix) from the copy ``t``
# and a valid token ``good`` of the provider.
Place = tuple[str, dict[str, str], str, str]
PLACES: dict[str, Callable[[str, str], Place]] = {
    "x-auth-token": lambda t, good: ("/public/x", {"x-auth-token": t}, "", ""),
    "cookie jwt": lambda t, good: ("/public/x", {"cookie": f"theme=dark; jwt={t}"}, "", ""),
    "?token=": lambda t, good: ("/public/x", {}, f"token={t}", ""),
    "path segment": lambda t, good: ("/public/x", {}, "", f"/dl/{t}"),
    "x-auth-token beside a valid Bearer": lambda t, good: (
        "/orders/x", {"authorization": f"Bearer {good}", "x-auth-token": t}, "", ""),
    "?token= beside a valid Bearer": lambda t, good: (
        "/orders/x", {"authorization": f"Bearer {good}"}, f"token={t}", ""),
}

# --- 3: integers no double holds -------------------------------------------------------------

DBL_MAX = int(sys.float_info.max)
# label -> an integer's JSON text no double holds (each overflows to infinity, as 1e400 does).
HUGE: dict[str, str] = {
    "10**400": "1" + "0" * 400,
    "-10**400": "-1" + "0" * 400,
    "10**401": "1" + "0" * 401,
    "309 nines": "9" * 309,
    "-309 nines": "-" + "9" * 309,
    "the least that overflows": str(DBL_MAX + 2 ** 970),
    "5000 digits": "9" * 5000,
}
# Integers a double holds (the greatest rounds down to DBL_MAX, as 1.7976931348623158e308 does).
HELD: dict[str, str] = {
    "DBL_MAX": str(DBL_MAX),
    "the greatest that rounds to DBL_MAX": str(DBL_MAX + 2 ** 970 - 1),
    "-DBL_MAX": str(-DBL_MAX),
    "10**308": "1" + "0" * 308,
    "2**53 + 1": str(2 ** 53 + 1),
    "-0": "-0",
}
# Where the number is in a payload or answer: (member name, raw JSON member text, ``{n}``
# the number).
SPOTS: dict[str, tuple[str, str]] = {
    "forwarded claim": ("note", '"note": {n}'),
    "nested member": ("obj", '"obj": {{"n": {n}}}'),
    "in a list": ("note2", '"note2": [1, {n}]'),
    "exp": ("exp", '"exp": {n}'),
}


def _signed(payload: bytes) -> str:
    from jwt.algorithms import ECAlgorithm

    signing_input = f"{HEADER}.{b64(payload)}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), ec_key("r29"))
    return f"{signing_input}.{b64(signature)}"


def _claims_with(name: str, member: str) -> bytes:
    """Valid claims of the provider, with the raw JSON ``member`` named ``name`` (instead of
    the base member of that name)."""
    now = int(time.time())
    base = {"iss": ISS, "aud": "orders", "sub": "alice", "iat": now - 5, "exp": now + 600,
            "jti": f"j{time.monotonic_ns()}"}
    kept = json.dumps({k: v for k, v in base.items() if k != name})
    return (kept[:-1] + ", " + member + "}").encode()


# --- the sidecar ---------------------------------------------------------------------------

# Introspection answers (token ``<label>.1``): label -> the answer's raw extra members.
ANSWERS: dict[str, str] = {}


class AuthServer(h.IntrospectionServer):
    """RFC 7662 endpoint: an active answer with ``ANSWERS[label]`` for ``<label>.1``, any
    other token inactive."""

    def document(self, token: str) -> dict[str, Any] | bytes:
        extra = ANSWERS.get(token.partition(".")[0])
        if extra is None:
            return {"active": False}
        base = json.dumps({"active": True, "iss": ISS, "aud": "orders", "sub": "alice",
                           "exp": int(time.time()) + 600})
        return (base[:-1] + ", " + extra + "}").encode()


def _policy(server: AuthServer) -> dict[str, Any]:
    def allow(name: str, path: str, provider: str | None = None) -> dict[str, Any]:
        rule: dict[str, Any] = {"from": [FRONTEND], "paths": [path]}
        if provider is not None:
            rule["jwt"] = {"provider": provider}
        return {"name": name, "allow": rule}

    introspection = {"endpoint": f"https://127.0.0.1:{server.port}/introspect",
                     "ca": str(server.ca_file), "client_id": "orders",
                     "client_secret_file": "secret", "timeout": "10s"}
    return {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {
            "corp": {"issuer": ISS, "audiences": ["orders"], "algorithms": ["ES256"],
                     "jwks_file": "keys.json", "forward_claims": {"note": "x-note"}},
            # (reads the same Authorization header: a token corp refuses as "not mine" is
            # an opaque token to it, unjudged on a route that asks for neither)
            "opaque": {"issuer": ISS, "audiences": ["orders"],
                       "introspection": dict(introspection)},
            # (answers a double holds: an answer refused as not JSON makes the provider's
            # server "down" for a second, FAILURE_BACKOFF_SECONDS)
            "held": {"issuer": ISS, "audiences": ["orders"], "introspection": dict(introspection),
                     "from_headers": ["x-held"]}},
        "services": {h.spiffe("orders"): {"rules": [
            allow("orders", "/orders/**", "corp"), allow("opaque", "/i/**", "opaque"),
            allow("held", "/h/**", "held"), allow("public", "/public/**")]}},
    }


class Env:
    """The sidecar, asked over one kept-alive connection (a new one when the sidecar ended
    the last: each family sends hundreds of requests)."""

    def __init__(self, mesh: OrdersMesh, server: AuthServer) -> None:
        self.mesh = mesh
        self.server = server
        self.port = mesh.sidecar.port("inbound")
        self.conn = httpclient.HTTPSConnection("127.0.0.1", self.port, context=mesh.ctx,
                                               timeout=20)

    def get(self, route: str, headers: dict[str, str], query: str = "",
            suffix: str = "") -> h.Response:
        target = route + suffix
        target = f"{target}?{query}" if query else target
        try:
            return h.http(self.port, "GET", target, headers=headers, conn=self.conn)
        except (httpclient.RemoteDisconnected, ConnectionError):
            self.conn.close()  # (closed without saying so: once more, on a new one)
            return h.http(self.port, "GET", target, headers=headers, conn=self.conn)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("token-copies-review29")
    server = AuthServer(tmp / "as")
    files = {"keys.json": json.dumps({"keys": [jwk(ec_key("r29"), "k1")]}),
             "secret": "s3cret\n"}
    try:
        with orders_mesh(tmp, _policy(server), files) as mesh:
            env = Env(mesh, server)
            try:
                yield env
            finally:
                env.conn.close()
    finally:
        server.close()


def _refused(r: h.Response, target_length: int = 0) -> bool:
    # (a target longer than the sidecar reads is a 400 before any token is looked at)
    return (r.status == 401 and r.headers.get("www-authenticate") == INVALID) or (
        target_length > MAX_TARGET_BYTES and r.status == 400)


# --- 1: copies, through the sidecar and in process -------------------------------------------


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_a_copy_is_refused_in_every_place_and_shape(env: Env, payload: str) -> None:
    """Every header shape x place no provider reads, alone and beside a valid token: 401."""
    wrong = []
    for shape in SHAPES:
        token = _token(payload, shape)
        for place, build in PLACES.items():
            route, headers, query, suffix = build(token, _valid())
            r = env.get(route, headers, query, suffix)
            if not _refused(r, len(route + suffix + query) + 1):
                wrong.append((shape, place, r.status))
    assert not wrong, wrong


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_another_issuers_token_of_every_shape_passes(env: Env, payload: str) -> None:
    """Controls: the same payloads naming another issuer are no copies (200): every shape at
    once (a header each, as many as a request's pieces are read), alone and beside the
    provider's valid token."""
    batches: list[dict[str, str]] = [{}]
    for i, shape in enumerate(SHAPES):
        token = _token(payload, shape, OTHER)
        if sum(map(len, batches[-1].values())) + len(token) > 24_000:  # (a head: 32 KiB)
            batches.append({})
        batches[-1][f"x-other-{i}"] = token
    for headers in batches:
        r = env.get("/public/x", headers)
        assert r.status == 200, r.status
        r = env.get("/orders/x", {**headers, "authorization": f"Bearer {_valid()}"})
        assert r.status == 200, r.status


# (place in the request, as extract.copies takes it) -> headers, query, path
IN_PROCESS_PLACES: dict[str, Callable[[str], tuple[list[tuple[bytes, bytes]], str, str]]] = {
    "header": lambda t: ([(b"x-auth-token", t.encode())], "", ""),
    "cookie": lambda t: ([(b"cookie", f"theme=dark; jwt={t}".encode())], "", ""),
    "query": lambda t: ([], f"page=2&token={t}", ""),
    "path": lambda t: ([], "", f"/public/dl/{t}"),
}
GUARDS = extract.Guards(query=True, authorization=True, read_schemes=frozenset({"bearer"}),
                        issuers=frozenset({ISS}),
                        read_headers=frozenset({b"authorization", b"cookie"}))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_names_issuer_and_the_scan_read_every_member(payload: str, shape: str) -> None:
    """In process: ``names_issuer`` reads the issuer in each payload of each shape (another
    issuer in none); ``extract.copies`` finds it in every place; the records of a path that
    holds it show the segment's hash (``path_for_records``: a superset of what the scan
    reads)."""
    token = _token(payload, shape)
    assert names_issuer(token, ISS)
    assert names_issuer(token, ISS.upper().rstrip("/"))  # (the issuer's spellings still)
    assert not names_issuer(_token(payload, shape, OTHER), ISS)
    for place, build in IN_PROCESS_PLACES.items():
        headers, query, path = build(token)
        assert extract.copies(GUARDS, headers, query, path), place
        headers, query, path = build(_token(payload, shape, OTHER))
        assert not extract.copies(GUARDS, headers, query, path), (place, "another issuer")
    path = f"/public/dl/{token}"
    assert extract.path_for_records(path) == "/public/dl/" + extract.PATH_TOKEN_FORM.format(
        hashlib.sha256(token.encode()).hexdigest())


# --- 2: the provider's own place -------------------------------------------------------------


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_an_unreadable_alg_none_token_in_the_providers_own_place_is_refused(
        env: Env, payload: str) -> None:
    """``Authorization: Bearer`` (read by corp and by the introspected provider): an
    ``alg: none`` token naming corp's issuer is corp's to refuse, on a route asking for no
    token and on corp's own route, whatever its payload and shape."""
    wrong = []
    for shape in SHAPES:
        token = _token(payload, shape, header=NONE_HEADER)
        for route in ("/public/x", "/orders/x"):
            r = env.get(route, {"authorization": f"Bearer {token}"})
            if not _refused(r):
                wrong.append((shape, route, r.status))
    assert not wrong, wrong
    # Control: an opaque token there is the introspected provider's, unjudged (200).
    r = env.get("/public/x", {"authorization": "Bearer opaque-r29.1"})
    assert r.status == 200, r.status


# --- the fallback scan: spellings, values, bounds --------------------------------------------

# Member names that fold to ``iss`` (``str.casefold``), raw JSON string bodies.
ISS_NAMES = ["iss", "ISS", "Iss", "i\u017fs", "i\u00df", "I\u1e9e", "\\u0069ss",
             "\\u0049\\u0053\\u0053", "\\u0069\\u017f\\u0073", "i\\u00DF", "\\u0069\\u00df"]
NOT_ISS_NAMES = ["is", "isss", "xiss", "iss ", "\u0131ss", "\\u0069s", "i\\\\ss"]
# Values naming ISS (raw JSON), and ones that do not.
ISS_VALUES = [json.dumps(ISS), json.dumps(ISS.upper()), '"https:\\/\\/users.example"',
              '"\\u0068ttps://users.example/"', '" https://users.example/ "',
              f'["x", {json.dumps(ISS)}]', f'[1, null, {json.dumps(ISS)}]',
              f'[{{"a": 1}}, {json.dumps(ISS)}]']
NOT_ISS_VALUES = [json.dumps(OTHER), "1", "null", f'{{"iss": {json.dumps(OTHER)}}}',
                  f'["x", {json.dumps(OTHER)}]', '"https://users.example.x/"']


def _unreadable(member: str) -> str:
    """A payload part ``json`` cannot read whole (nested past the recursion limit), with
    ``member`` after the deep part."""
    return _encoded(b'{"d": ' + _deep(3000) + b", " + member.encode("utf-8") + b"}")


@pytest.mark.parametrize("name", ISS_NAMES + NOT_ISS_NAMES)
def test_the_scan_reads_every_spelling_of_the_name(name: str) -> None:
    named = name in ISS_NAMES
    for value in ISS_VALUES:
        if value.startswith("[{"):
            continue  # (a list holding an object: read only by json, below)
        part = _unreadable(f'"{name}": {value}')
        assert names_issuer(f"h.{part}.s", ISS) is named, (name, value)
        # And the same member read by json whole (the scan reads what json reads).
        whole = _encoded(f'{{"{name}": {value}}}'.encode())
        assert names_issuer(f"h.{whole}.s", ISS) is named, (name, value, "json")
    for value in NOT_ISS_VALUES:
        part = _unreadable(f'"{name}": {value}')
        assert not names_issuer(f"h.{part}.s", ISS), (name, value)
    # Any member of that name (``_json_has_member``: a JOSE object in a path).
    assert jwtmod.payload_names(_unreadable(f'"{name}": 1'), "iss", lambda v: True) is named


def test_the_folded_names_table_is_every_character_that_folds_to_ascii_letters() -> None:
    """``jwt._FOLDED_TO``: each character whose ``casefold`` is ASCII letters other than
    the letters themselves, computed over every code point (a name spelled with one folds to
    the member's name, so the scan must try it)."""
    table: dict[str, str] = {}
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        folded = char.casefold()
        if folded.isascii() and folded.isalpha() and char not in (folded, folded.upper()):
            table[folded] = table.get(folded, "") + char
    assert dict(jwtmod._FOLDED_TO) == table


# Payload parts a hostile caller may send to make the lenient reading slow (every reading
# and the scan of each: a list read once, a string once, a member name once): each read in
# time linear in its size.
def _costly(kind: str, n: int) -> str:
    parts = {
        "iss lists nested": b'{"iss":[' * n + b'"x"',
        "iss members": b'{"\xff": 1, ' + b'"iss": "y", ' * n + b"}",
        "iss members, deep": b'{"d": ' + _deep(3000) + b", " + b'"iss": "y", ' * n + b"}",
        "escaped quotes": b'{"iss": "' + b'\\"' * n,
        "unterminated strings": b'{"d": ' + _deep(3000) + b', "iss": [' + b'"\\"' * n,
        "names only": b'{"d": ' + _deep(3000) + b", " + b'"iss":' * n,
        "deep": b"[" * n * 4,
    }
    return _encoded(parts[kind])


@pytest.mark.parametrize("kind", ["iss lists nested", "iss members", "iss members, deep",
                                  "escaped quotes", "unterminated strings", "names only",
                                  "deep"])
def test_the_lenient_reading_is_linear(kind: str) -> None:
    """Bounded by a ratio against the same reading of a sixteenth of the size, in the same
    run (generous: linear is about 16x, quadratic 256x). The two are timed in turns, the
    best of up to three each (a turn more only while the ratio is not met), the smaller
    counted as 10 ms at least (timer and cache noise dominate below). Timed as the CPU time
    of this process (``time.process_time``), not the wall clock: other processes on a busy
    machine delay a reading without adding to its CPU time."""
    tokens = {n: f"h.{_costly(kind, n)}.s" for n in (4_000, 64_000)}
    best = dict.fromkeys(tokens, float("inf"))
    for _ in range(3):
        for n, token in tokens.items():
            started = time.process_time()
            assert not names_issuer(token, ISS, None)
            best[n] = min(best[n], time.process_time() - started)
        if best[64_000] < 64 * max(best[4_000], 0.010):
            break
    small, large = best[4_000], best[64_000]
    assert large < 64 * max(small, 0.010), (kind, small, large)


# --- 3: integers no double holds -------------------------------------------------------------


@pytest.mark.parametrize("spot", list(SPOTS))
@pytest.mark.parametrize("number", list(HUGE) + list(HELD))
def test_every_reader_refuses_an_integer_no_double_holds(number: str, spot: str) -> None:
    """``read_json`` and its callers that read documents of other parties: a token payload
    (as verification reads it), an introspection answer, a JWKS, OpenID metadata."""
    text = {**HUGE, **HELD}[number]
    member = SPOTS[spot][1].format(n=text)
    doc = "{" + member + "}"
    if number in HELD:
        assert read_json(doc, fold_case=True) == json.loads(doc)
        assert introspection_claims(200, b'{"active": true, ' + member.encode() + b"}", "i")
        return
    with pytest.raises(JsonDocError, match="out of range"):
        read_json(doc)
    with pytest.raises(JsonDocError):
        read_json(doc.encode(), fold_case=True)
    with pytest.raises(ValueError):
        introspection_claims(200, b'{"active": true, ' + member.encode() + b"}", "i")
    with pytest.raises(ConfigError):
        parse_jwks(('{"keys": [], ' + member + "}").encode(), "jwks")
    with pytest.raises(ConfigError):
        check_metadata(('{"issuer": "https://idp.example", ' + member + "}").encode(),
                       "https://idp.example", "meta")


@pytest.mark.parametrize("spot", list(SPOTS))
def test_a_token_or_answer_holding_an_integer_no_double_holds_is_refused(
        env: Env, spot: str) -> None:
    """Through the sidecar: a token signed by the provider (401, never forwarded), and an
    introspection answer (401); the integers a double holds pass (200; the forwarded claim
    is the integer)."""
    wrong: list[tuple[Any, ...]] = []
    for number, text in {**HUGE, **HELD}.items():
        held = number in HELD
        if spot == "exp" and held:
            continue  # (no date: a NumericDate range of its own)
        name, template = SPOTS[spot]
        member = template.format(n=text)
        token = _signed(_claims_with(name, member))
        r = env.get("/orders/x", {"authorization": f"Bearer {token}"})
        forwarded = [v for k, v in r.header_list() if k.lower() == "x-note"] \
            if r.status == 200 else []
        if held:
            if r.status != 200 or (spot == "forwarded claim"
                                   and forwarded != [json.dumps(int(text))]):
                wrong.append((number, "token", r.status, [v[:20] for v in forwarded]))
        elif not _refused(r) or forwarded:
            wrong.append((number, "token", r.status))
        label = f"n{len(ANSWERS)}"
        ANSWERS[label] = member
        r = env.get("/h/x", {"x-held": f"{label}.1"}) if held else env.get(
            "/i/x", {"authorization": f"Bearer {label}.1"})
        if (r.status == 200) is not held:
            wrong.append((number, "introspection answer", r.status))
    assert not wrong, wrong
