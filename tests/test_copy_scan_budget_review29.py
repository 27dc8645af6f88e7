"""The copy scan's work per request is bounded (hostile review, session 29; probe
``repro_copy_scan_forms_cpu.py``): with a JWT provider configured, every header value is
scanned for copies of a provider's token (``extract.copies``) in each of its decoded forms,
up to 16 a value. One 30 KB header, ``%2541\\x41\\101\\u0041.I!<14 digits>`` repeated, decoded to
15 forms each full of pieces: ~100 ms of the event loop in one synchronous call against
1.3 ms for a plain 30 KB head; two connections sending it held other callers' requests
429 ms (p50), four held ``/healthz`` past a kubelet probe's timeout; a 1 MB head 1.9 s.

Now one budget a request (``extract._ScanBudget``): the bytes passed over in every form of
every value -- each decoding's input and escapes, each form, each piece decoded or read
whole -- at most ``SCAN_BYTES_PER_BYTE`` times the bytes of the values looked at plus
``SCAN_BYTES_FREE``, and at most ``MAX_REQUEST_FORMS`` decoded forms a request; past either
the request counts as holding a copy (fail closed, as a value with too many forms did:
refused 401 ``invalid_token``).

The families as data, through one real sidecar (heads of up to 256 KiB):
A. Hostile heads (the review's and variants: many forms x each kind of piece -- filled,
   dotless runs, dotted words, JSON-object pieces --, backslash and escape runs, the forms
   spread over many headers, in a cookie, in the query, in Basic credentials) at two sizes:
   refused, and the sidecar's CPU for them within a generous ratio of a plain head of the
   same size in the same run (refused too, for a forged copy in it: neither reaches the
   app), each request timed alone on a warmed connection (each distinct: the scan of the
   last request is kept).
B. Forms per request: values of three decoded forms each, spread over headers, the query
   and Basic credentials: past ``MAX_REQUEST_FORMS`` refused, under it passed (in process
   and through the sidecar).
C. Heads an app sends, near the head limit (percent-encoded cookies, JSON with escapes,
   tokens of another issuer, long tokens): passed; a copy in them still refused.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.authn import extract
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import ec_key, mint
from tests.test_token_copies import FILES, ISS, _policy

pytestmark = pytest.mark.usefixtures("no_internal_errors")

# Headers and query of one request: (headers, query).
Head = tuple[list[tuple[bytes, bytes]], bytes]

# A unit that decodes to many forms (percent twice, hex, octal, JSON: each form another
# string), and a candidate that makes every form of a value one the scan reads.
FAN = b"%2541\\\\x41\\101\\u0041"
MATCH = b".eyJ0000000000000000"


def _fill(size: int, unit: Callable[[int], bytes], start: bytes = b"") -> bytes:
    """``start``, then ``unit(0)``, ``unit(1)``... to ``size`` bytes."""
    out, n, i = [start], len(start), 0
    while n < size:
        piece = unit(i)
        out.append(piece)
        n += len(piece)
        i += 1
    return b"".join(out)[:size]


def _basic(size: int) -> bytes:
    inner = _fill(size * 3 // 4 - 8, lambda i: FAN + b".I!%014d" % i)
    return b"Basic " + base64.b64encode(inner)


# A: hostile heads of ``size`` bytes (each but "many-headers" one value).
HOSTILE: dict[str, Callable[[int], Head]] = {
    "review-forms-filled": lambda n: ([(b"x-f", _fill(n, lambda i: FAN + b".I!%014d" % i))],
                                      b""),
    "forms-dotless-runs": lambda n: ([(b"x-f", _fill(n, lambda i: FAN + b" a b c d e f",
                                                     MATCH))], b""),
    "forms-dotted-words": lambda n: ([(b"x-f", _fill(n, lambda i: FAN + b".a.b.c.d.e.f",
                                                     MATCH))], b""),
    "forms-object-pieces": lambda n: ([(b"x-f", _fill(
        n, lambda i: FAN + b" eyJ%013d.eyJ%013d" % (i, i)))], b""),
    "backslashes": lambda n: ([(b"x-f", b"\\" * n)], b""),
    "escapes": lambda n: ([(b"x-f", _fill(n, lambda i: b"\\u0041\\x41\\101%41+"))], b""),
    "percent-twice": lambda n: ([(b"x-f", _fill(n, lambda i: b"%%2541%%255C.I!%014d" % i))],
                                b""),
    "many-headers": lambda n: ([(b"x-f%d" % k, _fill(n // 90, lambda i: FAN + b".I!%014d" % i))
                                for k in range(90)], b""),  # (max_headers: 100)
    "cookie": lambda n: ([(b"cookie", _fill(n, lambda i: b"c%d=" % i + FAN
                                            + b".I!%014d; " % i))], b""),
    # (a target is at most 8 KiB and holds no backslash: the rest of the head plain)
    "query": lambda n: ([(b"x-f", b"a" * (n - 8_000))], _fill(
        8_000, lambda i: b"q%d=%%2541%%5Cx41%%5C101%%5Cu0041+.I!%014d&" % (i, i))),
    "basic-credentials": lambda n: ([(b"authorization", _basic(n))], b""),
}
SIZES = (30_000, 200_000)  # (the default head limit is 32 KiB; this sidecar's 256 KiB)
# The sidecar's CPU for a hostile head against a plain head of the same size (before: 13 to
# ~400 times, the review's head ~70 at 30 KB; now at most ~5).
MAX_RATIO = 10


def _forged() -> bytes:
    now = int(time.time())
    return mint({"iss": ISS, "aud": "orders", "sub": "alice", "jti": uuid.uuid4().hex,
                 "iat": now - 5, "exp": now + 3600}, ec_key("copy-scan-forger"),
                 kid="k1").encode()


FORGED = _forged()


def _plain(size: int) -> Head:
    """The control: a plain head of ``size`` bytes, refused for a forged copy in it (as the
    hostile heads are refused: neither reaches the app)."""
    return [(b"x-f", b"a" * (size - len(FORGED))), (b"x-auth-token", FORGED)], b""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    """Header providers (``users`` on ``/orders/**``); heads of up to 256 KiB."""
    with orders_mesh(tmp_path_factory.mktemp("copy-scan-budget"), _policy(False), FILES,
                     limits={"max_header_bytes": "256KiB"}) as mesh:
        yield mesh


def _cpu(pid: int) -> int:
    """The process's CPU time so far in ns (every thread's, from the scheduler)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _request(head: Head, serial: int, route: str = "/public/x") -> bytes:
    """A GET of ``head`` (and a header of its own: the scan of the last request is kept,
    and a repeated head would be answered from it)."""
    headers, query = head
    target = route.encode() + (b"?" + query if query else b"")
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: orders", b"X-Serial: %d" % serial]
    lines += [n + b": " + v for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _answer(sock: ssl.SSLSocket) -> tuple[int, bool]:
    """Read one answer whole: its status and whether the sidecar closes the connection."""
    data = h.read_head(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":")
                                                           for ln in lines[1:])}
    length = int(fields.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, fields.get(b"connection", b"").lower() == b"close"


class _Client:
    """Requests to the sidecar, each timed alone: on a kept-alive connection (a new one
    when the sidecar closed the last), connected and warmed by a plain request before."""

    def __init__(self, env: OrdersMesh) -> None:
        self.env = env
        self.sock: ssl.SSLSocket | None = None

    def _connect(self) -> ssl.SSLSocket:
        if self.sock is None:
            raw = socket.create_connection(("127.0.0.1", self.env.sidecar.port("inbound")),
                                           timeout=60)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = self.env.ctx.wrap_socket(raw)
            self.sock.sendall(b"GET /public/x HTTP/1.1\r\nHost: orders\r\n\r\n")
            assert _answer(self.sock) == (200, False)
        return self.sock

    def cost(self, requests: list[bytes]) -> tuple[int, set[int]]:
        """The sidecar's CPU (ns) for ``requests``, each sent and answered in turn (to the
        end of the connection when the sidecar closes it), and the statuses."""
        spent, statuses = 0, set()
        for data in requests:
            sock = self._connect()
            before = _cpu(self.env.sidecar.pid)
            sock.sendall(data)
            status, closing = _answer(sock)
            if closing:  # (to its end: the request's work done)
                while sock.recv(65536):
                    pass
            time.sleep(0.002)  # (idle again: its CPU time is brought up to date)
            spent += _cpu(self.env.sidecar.pid) - before
            statuses.add(status)
            if closing:
                self.close()
        return spent, statuses

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_serial = iter(range(10**9))


def _batch(make: Callable[[int], Head], size: int, count: int,
           route: str = "/public/x") -> list[bytes]:
    head = make(size)
    return [_request(head, next(_serial), route) for _ in range(count)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", list(HOSTILE))
def test_a_hostile_head_costs_a_few_plain_heads(env: OrdersMesh, shape: str,
                                                size: int) -> None:
    """Refused (fail closed: it has more forms, or costs more, than a request may), and
    the sidecar's CPU for it within ``MAX_RATIO`` of a plain head of the same size, the
    least of three rounds each, interleaved."""
    count = 4 if size < 100_000 else 2
    client = _Client(env)
    try:
        client.cost(_batch(_plain, size, 1))  # (warm: the connection's first request)
        hostile, plain = [], []
        seen: set[int] = set()
        for _ in range(3):
            spent, statuses = client.cost(_batch(HOSTILE[shape], size, count))
            hostile.append(spent)
            seen |= statuses
            spent, statuses = client.cost(_batch(_plain, size, count))
            plain.append(spent)
            assert statuses == {401}, statuses
    finally:
        client.close()
    assert seen == {401}, (shape, size, seen)
    ratio = min(hostile) / max(min(plain), 1)
    assert ratio < MAX_RATIO, (shape, size, round(ratio, 1), min(hostile), min(plain))


# B: values of two decoded forms each (``%2541``: ``%41``, ``A``), spread over a request's
# places: (label, values in headers, in cookie headers, in the query, in Basic credentials).
FORM_PLACES: tuple[tuple[str, int, int, bool, bool], ...] = (
    ("headers", 1, 0, False, False),
    ("cookie-headers", 0, 1, False, False),
    ("headers-and-cookies", 1, 1, False, False),
    ("headers-query-basic", 1, 0, True, True),
)
PER_VALUE = 2


def _spread(place: tuple[str, int, int, bool, bool], values: int) -> Head:
    """``values`` values of ``PER_VALUE`` decoded forms each, in ``place``'s places."""
    _label, plain, cookies, query, basic = place
    fixed = int(query) + int(basic)
    headers: list[tuple[bytes, bytes]] = []
    if basic:
        headers.append((b"authorization",
                        b"Basic " + base64.b64encode(b"user:%2541-basic")))
    rest = values - fixed
    for i in range(rest):
        if cookies and (not plain or i % 2):
            headers.append((b"cookie", b"c%d=%%2541" % i))
        else:
            headers.append((b"x-f%d" % i, b"%%2541-%d" % i))
    return headers, b"q=%2541" if query else b""


GUARDS = extract.Guards(query=True, authorization=True, read_schemes=frozenset({"bearer"}),
                        issuers=frozenset({ISS}),
                        read_headers=frozenset({b"authorization", b"cookie"}))


@pytest.mark.parametrize("place", FORM_PLACES, ids=[p[0] for p in FORM_PLACES])
def test_decoded_forms_are_counted_per_request(env: OrdersMesh,
                                               place: tuple[str, int, int, bool, bool]) -> None:
    """``MAX_REQUEST_FORMS`` decoded forms pass; one value more is refused, wherever the
    values are (before, each value had 16 of its own: 90 headers, 1,350 forms)."""
    at_limit = extract.MAX_REQUEST_FORMS // PER_VALUE
    for values, refused in ((at_limit, False), (at_limit + 1, True)):
        headers, query = _spread(place, values)
        found = extract.copies(GUARDS, headers, query.decode(), "/public/x")
        assert found == ([extract._TOO_MANY_FORMS] if refused else []), (values, found)
        client = _Client(env)
        try:
            _, statuses = client.cost([_request((headers, query), next(_serial))])
        finally:
            client.close()
        assert statuses == ({401} if refused else {200}), (values, statuses)


# C: heads an app sends, near the default head limit (32 KiB): they pass, and a copy of the
# section's issuer in them is still refused. (At most 16 JWTs a request are read whole:
# ``MAX_COPY_PIECES``.)
def _foreign(size: int = 0) -> str:
    now = int(time.time())
    return mint({"iss": "https://elsewhere.example/", "aud": "orders", "sub": "bob",
                 "exp": now + 600, "pad": "p" * size}, ec_key("copy-scan-foreign"),
                kid="k1")


def _pct(text: str) -> bytes:
    return "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in text).encode()


CONSENT = ('{"necessary":true,"analytics":false,"version":1.2,"ts":"2026-12-06T17:00:00Z",'
           '"vendors":[' + ",".join(f'"v{i}.example.com"' for i in range(12)) + "]}")
APP_HEADS: dict[str, Callable[[], Head]] = {
    "browser": lambda: ([
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
                        b"Gecko) Chrome/131.0.0.0 Safari/537.36"),
        (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        (b"referer", b"https://shop.example/search?q=caf%C3%A9+au+lait&page=2.5"),
        (b"cookie", b"; ".join(b"consent%d=" % i + _pct(CONSENT) for i in range(24))),
    ], b"q=caf%C3%A9+au+lait&v=1.2.3"),
    "percent-encoded-cookie": lambda: ([
        (b"cookie", b"state=" + _pct(CONSENT * 30)[:28_000])], b""),
    "json-with-escapes": lambda: ([
        (b"x-session", ('{"name":"Ren\u00e9e \"R.\" M\u00fcller","path":"C:\\Users\\'
                        r'r.m","note":"a\/b"}' * 60).encode())], b""),
    "tokens-of-another-issuer": lambda: ([
        (b"x-other-%d" % i, _foreign(1_500).encode()) for i in range(12)], b""),
    "a-long-token-of-another-issuer": lambda: ([
        (b"x-other", _foreign(20_000).encode())], b""),
    "percent-encoded-tokens-of-another-issuer": lambda: ([
        (b"x-other-%d" % i, _foreign(1_500).replace(".", "%2E").encode()) for i in range(12)],
        b""),
}


def _copy() -> bytes:
    now = int(time.time())
    return mint({"iss": ISS, "aud": "orders", "sub": "alice", "jti": uuid.uuid4().hex,
                 "iat": now - 5, "exp": now + 600}, ec_key("copy-scan-forger"),
                kid="k1").replace(".", "%2E").encode()


@pytest.mark.parametrize("head", list(APP_HEADS))
def test_heads_an_app_sends_pass_and_a_copy_in_them_is_refused(env: OrdersMesh,
                                                               head: str) -> None:
    headers, query = APP_HEADS[head]()
    assert sum(len(n) + len(v) + 4 for n, v in headers) + len(query) < 32 * 1024, head
    assert not extract.copies(GUARDS, headers, query.decode(), "/public/x"), head
    with_copy = [*headers, (b"x-auth-token", _copy())]
    assert extract.copies(GUARDS, with_copy, query.decode(), "/public/x") != [
        extract._TOO_MANY_FORMS], head  # (found as the copy it is, not unread)
    client = _Client(env)
    try:
        _, passed = client.cost([_request((headers, query), next(_serial))])
        _, refused = client.cost([_request((with_copy, query), next(_serial))])
    finally:
        client.close()
    assert (passed, refused) == ({200}, {401}), head
