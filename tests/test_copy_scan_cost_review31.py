"""A hostile payload's reading costs what the copy scan's budget says (hostile review, session
31; probe ``repro_lenient_scan_cpu.py``): a 30 KB JWT-shaped value in a header no provider
reads (``X-Note``), whose payload is ``{"a":[{"iss":["x"]},...`` ending in a ``\\xff`` byte,
named no issuer and was let through (200) after 30-38 ms of the event loop (5 ms a plain
header of that size), 106 ms with three issuers: the scan counted the payload's bytes, but
``payload_names`` called back into Python for each object and each ``iss`` member, in up to
four parses and two scans, once PER ISSUER.

Now (``jwt.issuers_named``) a piece is read once for every issuer; a payload that does not
decode to an object's start is not parsed; a text in which no name can fold to ``iss`` is
neither parsed nor scanned; and the reading's work is counted in the request's budget
(``jwt.READ_PARSE_COST`` ...): past it the request counts as holding a copy (401, as any
request over the budget). The refusing providers' check of a refused token
(``Authenticator._issuers_named``) reads it once too, within a limit of its own.

Work is counted, not timed: the Python calls (``sys.setprofile``: functions and C
functions called from Python) one request's scan makes, for each hostile shape, with one
and with three issuers.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from sidecar.authn import extract
from sidecar.authn.authenticator import Authenticator
from sidecar.policy.loader import load_policy
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import ec_key, key_set
from tests.test_token_copies import FILES, FRONTEND, ISS

pytestmark = pytest.mark.usefixtures("no_internal_errors")

OTHERS = ("https://two.example/", "https://three.example/")
PAYLOAD = 22_500  # (30 KB of base64)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _fill(unit: Callable[[int], bytes], start: bytes = b"{", end: bytes = b"\xff") -> bytes:
    out, i = [start], 0
    size = len(start)
    while size < PAYLOAD:
        out.append(unit(i))
        size += len(out[-1])
        i += 1
    return b"".join(out) + end


# Payloads naming none of the issuers, each about 22.5 KB; most end in a byte that is no
# UTF-8 (every reading: replaced, Latin-1) and break json (every text scanned too).
HOSTILE: dict[str, bytes] = {
    "review: iss objects": _fill(lambda i: b'{"iss":["x"]},', b'{"a":['),
    "iss objects, distinct": _fill(lambda i: b'{"iss":["%d"]},' % i, b'{"a":['),
    "empty objects": _fill(lambda i: b"{},", b'{"a":['),
    "numbers": _fill(lambda i: b"1,", b'{"a":['),
    "repeated iss, numbers": _fill(lambda i: b'"iss":1,'),
    "repeated iss, distinct strings": _fill(lambda i: b'"iss":"%d",' % i),
    "repeated iss, lists": _fill(lambda i: b'"iss":["%d","a%d"],' % (i, i)),
    "iss names only": _fill(lambda i: b'"iss":'),
    "escaped iss names": _fill(lambda i: b'"\\u0069\\u0073\\u0073":1,'),
    "names the scan tries and refuses": _fill(lambda i: b'"\\U0069ss":1,'),
    "iss names, folded": _fill(lambda i: '"i\u017f\u017f":1,'.encode()),
    "deep, then iss members": b'{"d":' * 3000 + _fill(lambda i: b'"iss":"%d",' % i, b""),
    "deep, then an escaped list": b'{"d":' * 3000 + _fill(lambda i: b'"\\u0041",',
                                                         b'"iss":['),
    "NFKC-expanding value": b'{"iss":"' + "\ufdfa".encode() * (PAYLOAD // 3) + b'"\xff',
    "top-level array": b"[" + _fill(lambda i: b'{"iss":"x"},', b"") + b"]",
    "ascii, broken": _fill(lambda i: b'{"iss":["x"]},', b'{"a":[', b""),
}
HEADER = _b64(json.dumps({"alg": "ES256", "kid": "k1"}).encode())


def _token(payload: bytes) -> bytes:
    return f"{HEADER}.{_b64(payload)}.{_b64(b'x' * 64)}".encode()


# At most this many calls a request, plus one per ``BYTES_PER_CALL`` bytes of the value
# (before: the review's shape ~46,000 calls with one issuer, 140,000 with three; a plain
# 30 KB header ~100; now at most ~2,000 for any of these shapes).
CALLS_FREE = 2_000
BYTES_PER_CALL = 12


def _calls(run: Callable[[], Any]) -> tuple[int, Any]:
    """The Python calls ``run`` makes (functions, and C functions called from Python), and
    its result."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event == "call" or event == "c_call":
            count += 1

    sys.setprofile(profile)
    try:
        result = run()
    finally:
        sys.setprofile(None)
    return count, result


def _guards(issuers: tuple[str, ...]) -> extract.Guards:
    return extract.Guards(query=True, authorization=True, read_schemes=frozenset({"bearer"}),
                          issuers=frozenset(issuers),
                          read_headers=frozenset({b"authorization", b"cookie"}))


def _scan(value: bytes, issuers: tuple[str, ...]) -> tuple[int, list[str]]:
    extract._LAST_SCAN[0] = None  # (the last request's scan is kept)
    headers = [(b"x-note", value), (b"x-seq", b"1")]
    return _calls(lambda: extract.copies(_guards(issuers), headers, "", "/public/x"))


@pytest.mark.parametrize("shape", list(HOSTILE))
def test_a_hostile_payload_costs_the_scan_a_bounded_amount_of_work(shape: str) -> None:
    """Through ``extract.copies``: the calls a request makes are within ``CALLS_FREE`` plus
    one per ``BYTES_PER_CALL`` bytes of the header, and no more with three issuers than with
    one (the piece is read once for them all). Let through or counted as a copy (past the
    budget); the cheap shapes -- no member named ``iss`` that json gives, or no object at
    all -- are let through."""
    value = _token(HOSTILE[shape])
    for issuers in ((ISS,), (ISS, *OTHERS)):  # (the caches warm: patterns, issuer forms)
        _scan(value, issuers)
    one, found_one = _scan(value, (ISS,))
    three, found_three = _scan(value, (ISS, *OTHERS))
    bound = CALLS_FREE + len(value) // BYTES_PER_CALL
    assert one <= bound and three <= bound, (shape, one, three, bound)
    assert three <= one + 16, (shape, one, three)
    assert found_one == found_three and found_one in ([], [extract._TOO_MANY_FORMS]), shape
    if shape in ("empty objects", "numbers", "top-level array"):
        assert found_one == [], shape


@pytest.mark.parametrize("last", [False, True])
def test_a_copy_among_the_hostile_members_is_still_refused(last: bool) -> None:
    """The issuer named once among 1,600 ``iss`` members (first or last): counted as a copy,
    found or over the budget, with one issuer or three; small, it is found."""
    members = [b'{"iss":["x"]}'] * 1600
    members.insert(len(members) if last else 0, b'{"iss":"%s"}' % ISS.encode())
    value = _token(b'{"a":[' + b",".join(members) + b"\xff")
    for issuers in ((ISS,), (*OTHERS, ISS)):
        assert _scan(value, issuers)[1] != [], (last, issuers)
    small = _token(b'{"a":[{"iss":["x"]},{"iss":"' + ISS.upper().encode() + b'"}]\xff')
    assert _scan(small, (*OTHERS, ISS))[1] == [small.decode()]


def test_a_path_piece_costs_the_records_a_bounded_amount_of_work() -> None:
    """``path_for_records`` reads a path's pieces as the scan does, within a budget for the
    path's size (before: unbounded, ~6 ms a 30 KB piece of names the scan tries); past it a
    piece counts as a token (hidden)."""
    for shape in ("names the scan tries and refuses", "review: iss objects"):
        path = "/public/" + _token(HOSTILE[shape]).decode()
        calls, shown = _calls(lambda path=path: extract.path_for_records(path))
        assert calls <= CALLS_FREE + len(path) // 2, (shape, calls)  # (its own budget)
        assert shown.startswith("/public/<token sha256:"), (shape, shown[:40])


def _authenticator() -> Authenticator:
    providers = {name: {"issuer": issuer, "audiences": ["orders"], "algorithms": ["ES256"],
                        "jwks_file": f"{name}.json"}
                 for name, issuer in zip(("one", "two", "three"), (ISS, *OTHERS),
                                         strict=True)}
    rules = [{"name": name, "allow": {"from": [FRONTEND], "paths": [f"/{name}/**"],
                                      "jwt": {"provider": name}}} for name in providers]
    doc = {"version": 1, "trust_domain": "demo.local", "jwt_providers": providers,
           "services": {h.spiffe("orders"): {"rules": rules}}}
    policy = load_policy(yaml.safe_dump(doc, sort_keys=False), "mesh.yaml")
    authn = Authenticator(policy.extras)
    for name in providers:
        authn.set_keys(name, key_set((ec_key("cost-review31"), "k1")), 1_700_000_000.0)
    return authn


@pytest.mark.parametrize("shape", ["review: iss objects", "repeated iss, distinct strings",
                                   "escaped iss names"])
def test_the_refusing_providers_read_a_refused_token_once(shape: str) -> None:
    """Three providers read ``Authorization`` and each refuses the token: what it names is
    read once for all three (before: once per provider, each reading unbounded), within a
    limit proportional to its size."""
    authn = _authenticator()
    token = _token(HOSTILE[shape])
    headers = [(b"authorization", b"Bearer " + token)]
    counts = {}
    for names in (("one",), ("one", "two", "three")):  # (the caches warm)
        authn.authenticate(names, headers, "", 1_700_000_000.0)
    for names in (("one",), ("one", "two", "three")):
        counts[len(names)], facts = _calls(lambda names=names: authn.authenticate(
            names, headers, "", 1_700_000_000.0))
        assert facts.token_errors and not facts.claims, (shape, names)
    # (its own limit, ``SCAN_BYTES_FREE`` plus four a byte, where the scan's budget is
    # shared with the rest of the head: at most ~19,000 calls for a 30 KB token; before,
    # ~46,000 for the review's shape, and as many again for each provider)
    bound = CALLS_FREE + len(token)
    assert counts[1] <= bound and counts[3] <= bound, (shape, counts, bound)
    assert counts[3] <= counts[1] + 500, (shape, counts)


def _policy() -> dict[str, object]:
    providers: dict[str, object] = {
        name: {"issuer": issuer, "audiences": ["orders"], "algorithms": ["ES256"],
               "jwks_file": "keys.json", "from_headers": [f"x-{name}-token"]}
        for name, issuer in zip(("two", "three"), OTHERS, strict=True)}
    providers["users"] = {"issuer": ISS, "audiences": ["orders"], "algorithms": ["ES256"],
                          "jwks_file": "keys.json"}
    rules: list[object] = [
        {"name": name, "allow": {"from": [FRONTEND], "paths": [f"/{name}/**"],
                                 "jwt": {"provider": name}}} for name in providers]
    rules.append({"name": "public", "allow": {"from": [FRONTEND], "paths": ["/public/**"]}})
    return {"version": 1, "trust_domain": "demo.local", "jwt_providers": providers,
            "services": {h.spiffe("orders"): {"rules": rules}}}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    """Three providers, three issuers; the default head limit (32 KiB)."""
    with orders_mesh(tmp_path_factory.mktemp("copy-scan-cost"), _policy(), FILES) as mesh:
        yield mesh


def test_through_the_sidecar(env: OrdersMesh) -> None:
    """The review's header: refused as holding a copy (401 ``invalid_token``: its reading
    is past the request's budget), a request after it on the same route answered; a plain
    header of the same size, and the cheap shapes, let through."""
    cases = [("review: iss objects", 401), ("repeated iss, numbers", 401),
             ("empty objects", 200), ("top-level array", 200)]
    for i, (shape, status) in enumerate(cases):
        response = env.get("/public/x", {"X-Note": _token(HOSTILE[shape]).decode(),
                                         "X-Seq": str(i)})
        assert response.status == status, (shape, response.status)
        if status == 401:
            assert "invalid_token" in response.headers.get("www-authenticate", ""), shape
    plain = _token(b'{"a":"' + b"y" * (PAYLOAD - 8) + b'"}').decode()
    assert env.get("/public/x", {"X-Note": plain}).status == 200
    assert env.get("/public/x").status == 200
