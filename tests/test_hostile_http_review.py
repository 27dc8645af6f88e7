"""What a hostile review of the data path found, each as a family built as data, through real
sidecars (inbound mTLS and outbound plain, as in ``tests/test_hostile_http.py``): every member
on every listener where it applies, with the recording app as the witness.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests import test_hostile_http as hostile
from tests.harness import module_fixture, wait_for

Mesh, SIDES, exchange, statuses = hostile.Mesh, hostile.SIDES, hostile.exchange, hostile.statuses
pytestmark = pytest.mark.usefixtures("no_internal_errors")  # generic answers only

# The hostile suite's policy, with a rule that denies one host name.
_NO_ADMIN = "        deny: {paths: [/admin/**]}\n"
POLICY = hostile.POLICY.replace(
    _NO_ADMIN, _NO_ADMIN + "      - name: no-internal\n        deny: {hosts: [internal.example]}\n", 1)


mesh = module_fixture("review", lambda tmp: Mesh(tmp, policy=POLICY))


def _request(host: bytes, path: bytes = b"/open") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n" + hostile.SMUGGLED


def _closing(host: bytes, path: bytes = b"/open") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"


# --- 1. Host: RFC 3986 host [":" port] or 400 -------------------------------------------------

# Spellings of the denied host that are no RFC 3986 host (with a port): each must be refused
# before any rule runs, never matched as another host and forwarded.
BAD_HOSTS: dict[str, bytes] = {
    "two_ports": b"internal.example:80:80",
    "empty_ports": b"internal.example::",
    "port_then_colon": b"internal.example:80:",
    "empty_port": b"internal.example:",
    "long_port": b"internal.example:123456",
    "port_not_digits": b"internal.example:8o",
    "htab_inside": b"orders\tinternal.example",
    "trailing_slash": b"internal.example/",
    "path_after": b"internal.example/admin",
    "backslash": b"internal.example\\x",
    "nbsp": b"internal.example\xa0",
    "non_ascii": b"internal.exampl\xe9",
    "percent_dot": b"internal%2eexample",
    "percent_name": b"%69nternal.example",
    "bracketed_name": b"[internal.example]",
    "bracketed_zone": b"[fe80::1%25eth0]",
    "unclosed_bracket": b"[::1",
    "bracket_then_name": b"[::1]internal.example",
    "userinfo": b"x@internal.example",
    "list": b"orders,internal.example",
    "semicolon": b"internal.example;x",
    "query": b"internal.example?x",
    "fragment": b"internal.example#x",
    "sub_delim": b"internal.example!",
    "space_inside": b"internal. example",
    "question_port": b"internal.example:?",
}
# Host values that are RFC 3986 hosts: the denied one in any case, with a port or a trailing
# dot, is refused by the policy (403); the others reach the app.
DENIED_HOSTS = [b"internal.example", b"INTERNAL.example:8080", b"internal.example.",
                b"internal.example.:443"]
GOOD_HOSTS = [b"orders", b"orders:8443", b"10.0.0.7", b"[::1]", b"[2001:db8::7]:443",
              b"a-b_c~d.example"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(BAD_HOSTS))
def test_a_host_that_is_not_an_rfc3986_host_is_refused(mesh: Mesh, side: str,
                                                        case: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, _request(BAD_HOSTS[case]))
    assert statuses(out) == [400], out[:300]
    hostile.assert_generic_refusal(out)
    assert mesh.app.targets_since(mark) == []


@pytest.mark.parametrize("side", SIDES)
def test_the_denied_host_in_any_rfc3986_spelling_is_denied(mesh: Mesh, side: str) -> None:
    for host in DENIED_HOSTS:
        mark = mesh.app.snapshot()
        out = exchange(mesh, side, _closing(host))
        assert statuses(out) == [403], (host, out[:300])
        assert "/open" not in mesh.app.targets_since(mark), host
    for host in GOOD_HOSTS:
        mark = mesh.app.snapshot()
        out = exchange(mesh, side, _closing(host, b"/open/good"))
        assert statuses(out) == [200], (host, out[:300])
        assert mesh.app.targets_since(mark) == ["/open/good"]


# --- 5. Upgrade: Connection is a token list; HTTP/2 in any spelling is h2c ---------------------

H = hostile.H
_DENIED_BEHIND = b"GET /admin/x HTTP/1.1\r\n" + H + b"\r\n"
# Connection values that do not list the ``upgrade`` token: the request is an ordinary one
# (its Upgrade field is hop-by-hop and dropped), and what follows it is read as HTTP again.
NOT_UPGRADES = [b"keep-alive, noupgrade", b"upgraded", b"x-upgrade", b"upgrade-insecure",
                b"keep-alive, upgrade2", b"\"upgrade\""]
# Connection values that do list it.
UPGRADES = [b"Upgrade", b"keep-alive, Upgrade", b"keep-alive,\tUPGRADE ", b"upgrade,close"]
# HTTP/2 under every name an Upgrade field can give it: refused like h2c.
HTTP2_UPGRADES: dict[str, bytes] = {
    "h2c": b"Upgrade: h2c\r\n", "h2c_upper": b"Upgrade: H2C\r\n", "h2": b"Upgrade: h2\r\n",
    "http_2_0": b"Upgrade: HTTP/2.0\r\n", "http_2": b"Upgrade: HTTP/2\r\n",
    "http_2_lower": b"Upgrade: http/2.0\r\n", "h2c_draft": b"Upgrade: h2c-14\r\n",
    "http2": b"Upgrade: HTTP2\r\n", "second_in_list": b"Upgrade: websocket, HTTP/2.0\r\n",
    "second_field": b"Upgrade: websocket\r\nUpgrade: HTTP/2.0\r\n",
}


# Every other upgrade after whose 101 the connection carries HTTP requests: RFC 2817's TLS
# (CUPS and IPP servers take it), HTTP/1.x, SPDY -- in every case and version, alone, in a
# list and in a second field (found by a later hostile review: the requests inside an
# upgraded TLS connection reached the app unjudged).
HTTP_CARRYING_UPGRADES: dict[str, bytes] = {
    "tls_1_0": b"Upgrade: TLS/1.0\r\n", "tls_1_2": b"Upgrade: TLS/1.2\r\n",
    "tls_1_3": b"Upgrade: TLS/1.3\r\n", "tls_bare": b"Upgrade: TLS\r\n",
    "tls_lower": b"Upgrade: tls/1.2\r\n", "ssl": b"Upgrade: SSL/3.0\r\n",
    "tls_then_http": b"Upgrade: TLS/1.2, HTTP/1.1\r\n", "http_1_1": b"Upgrade: HTTP/1.1\r\n",
    "http_1_0": b"Upgrade: HTTP/1.0\r\n", "http_bare": b"Upgrade: HTTP\r\n",
    "https": b"Upgrade: https/1.1\r\n", "spdy": b"Upgrade: SPDY/3.1\r\n",
    "spdy_lower": b"Upgrade: spdy/3\r\n", "second_in_list": b"Upgrade: websocket, TLS/1.2\r\n",
    "second_field": b"Upgrade: websocket\r\nUpgrade: HTTP/1.1\r\n",
}


def _upgrade(connection: bytes, upgrade: bytes = b"Upgrade: echo\r\n") -> bytes:
    return b"GET /open/ws HTTP/1.1\r\n" + H + b"Connection: " + connection + b"\r\n" + upgrade \
        + b"\r\n"


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("connection", NOT_UPGRADES)
def test_upgrade_only_when_connection_lists_the_token(mesh: Mesh, side: str,
                                                      connection: bytes) -> None:
    mark = mesh.app.snapshot()
    last = b"GET /open/last HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
    out = exchange(mesh, side, _upgrade(connection) + _DENIED_BEHIND + last)
    # (outbound: the peer's 403 is relayed and the connection kept, see PEER_REFUSES)
    assert statuses(out) == ([200, 403] if side == "inbound" else [200, 403, 200]), out[:400]
    with mesh.app.lock:
        heads = list(mesh.app.heads[mark[0]:])
    assert [h["target"] for h in heads] == (
        ["/open/ws"] if side == "inbound" else ["/open/ws", "/open/last"])
    assert not [n for n, _ in heads[0]["headers"] if n in ("upgrade", "connection")], heads


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("connection", UPGRADES)
def test_upgrade_when_connection_lists_the_token(mesh: Mesh, side: str,
                                                 connection: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, _upgrade(connection, b"Upgrade: echo\r\nConnection: close\r\n"))
    assert statuses(out) == [200], out[:400]  # the app declines to switch
    with mesh.app.lock:
        heads = list(mesh.app.heads[mark[0]:])
    assert [h["target"] for h in heads] == ["/open/ws"]
    assert ["upgrade", "echo"] in heads[0]["headers"], heads


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(HTTP2_UPGRADES))
def test_every_http2_upgrade_is_refused(mesh: Mesh, side: str, case: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, _upgrade(b"Upgrade, HTTP2-Settings", HTTP2_UPGRADES[case]
                                        + b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
                   + hostile.SMUGGLED)
    assert statuses(out) == [400], out[:300]
    hostile.assert_generic_refusal(out)
    assert mesh.app.targets_since(mark) == []


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(HTTP_CARRYING_UPGRADES))
def test_every_http_carrying_upgrade_is_refused(mesh: Mesh, side: str, case: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, _upgrade(b"Upgrade", HTTP_CARRYING_UPGRADES[case])
                   + hostile.SMUGGLED)
    assert statuses(out) == [400], out[:300]
    hostile.assert_generic_refusal(out)
    assert mesh.app.targets_since(mark) == []


# --- 3. Fail fast: an unfinished head, chunk line or trailer that can never be valid ----------

_UPLOAD = b"POST /open/up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
# None of these ends (no CRLF CRLF, no last chunk): before, each waited for the header or body
# timeout (2 s here) and then got 408 or a closed connection.
NEVER_VALID: dict[str, bytes] = {
    "head_bare_cr": b"GET /open HTTP/1.1\r\nHost: orders\rX-A: b",
    "head_nul": b"GET /a\x00",
    "head_ctl": b"GET /open HTTP/1.1\r\nHost: orders\r\nX-A: \x01",
    "head_high_bytes": bytes(range(0x80, 0x100)),
    "head_tls_record": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    "head_leading_space": b" ",
    "head_bare_lf": b"GET /open HTTP/1.1\nHost",
    "head_obs_fold": b"GET /open HTTP/1.1\r\nHost: orders\r\n x",
    "chunk_bare_cr": _UPLOAD + b"5\rhello",
    "chunk_bare_lf": _UPLOAD + b"5\nhello\n0\n\n",
    "chunk_not_hex": _UPLOAD + b"zz",
    "chunk_no_crlf_after_data": _UPLOAD + b"5\r\nhelloX",
    "trailer_bare_lf": _UPLOAD + b"5\r\nhello\r\n0\r\nX: y\nZ: w\n\n",
    "trailer_nul": _UPLOAD + b"5\r\nhello\r\n0\r\nX: \x00",
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(NEVER_VALID))
def test_what_can_never_be_valid_is_refused_at_once(mesh: Mesh, side: str, case: str) -> None:
    mark = mesh.app.snapshot()
    t0 = time.monotonic()
    out = exchange(mesh, side, NEVER_VALID[case])
    took = time.monotonic() - t0
    assert statuses(out) == [400], out[:300]
    hostile.assert_generic_refusal(out)
    assert took < 1.0, took  # the header and body timeouts are 2 s
    time.sleep(0.05)
    assert mesh.app.snapshot()[1] == mark[1], "a request reached the app complete"


# --- 4. A head that times out is a refused request: one log line, metric, audit record -------

def _idle_connections(mesh: Mesh, side: str, done: list[str]) -> None:
    """An idle keep-alive connection after a complete exchange, and one that never sends a
    byte: both closed at the idle timeout (5 s here), neither is a request."""
    served = mesh.connect(side, timeout=10)
    silent = mesh.connect(side, timeout=10)
    try:
        served.sendall(b"GET /open/idle HTTP/1.1\r\n" + H + b"\r\n")
        got = b""
        while True:
            chunk = served.recv(65536)
            if not chunk:
                break
            got += chunk
        assert statuses(got) == [200], got[:300]
        assert silent.recv(65536) == b""
        done.append(side)
    finally:
        served.close()
        silent.close()


def test_a_head_timeout_is_recorded_but_an_idle_connection_is_not(mesh: Mesh) -> None:
    procs = {"inbound": mesh.inbound, "outbound": mesh.outbound}
    before = {side: p.metric("sidecar_requests_refused_total", reason="header_timeout")
              for side, p in procs.items()}
    done: list[str] = []
    idle = [threading.Thread(target=_idle_connections, args=(mesh, side, done)) for side in SIDES]
    for t in idle:
        t.start()
    for side in SIDES:
        out = exchange(mesh, side, b"GET /open/slow HTTP/1.1\r\n" + H, timeout=5.0)
        assert statuses(out) == [408], out[:300]
        hostile.assert_generic_refusal(out)
        request_id = re.search(rb"request id ([0-9a-f]{16})", out).group(1).decode()
        lines = wait_for(lambda p=procs[side], rid=request_id: [
            e for e in p.log_events("request_refused") if e.get("request_id") == rid], timeout=5)
        assert [(e["reason"], e["status"]) for e in lines] == [("header_timeout", 408)], lines
    for t in idle:
        t.join(15)
    assert sorted(done) == sorted(SIDES)
    after = {side: p.metric("sidecar_requests_refused_total", reason="header_timeout")
             for side, p in procs.items()}
    # One record per timed-out head; none for the idle connections, closed meanwhile.
    assert {side: after[side] - before[side] for side in SIDES} == {s: 1.0 for s in SIDES}


# --- 9. What the path rules refuse raw they refuse percent-encoded ----------------------------

ENCODED_PATHS = [b"/admin%3Bx/y", b"/admin%3bx/y", b"/open%3Bjsessionid=1", b"/admin%23x",
                 b"/admin%5Cx", b"/admin%7F", b"/admin%09x"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("path", ENCODED_PATHS)
def test_encoded_forms_of_refused_path_bytes_are_refused(mesh: Mesh, side: str,
                                                         path: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, _closing(b"orders", path))
    assert statuses(out) == [400], out[:300]
    hostile.assert_generic_refusal(out, close=side == "inbound")  # (outbound: relayed)
    assert mesh.app.targets_since(mark) == []


# --- 8. Normalised framing fields: canonical Content-Length, no Expect without a body ---------

# (request fields, body) -> the Content-Length and Expect fields the app must get.
NORMALISED_FIELDS: dict[str, tuple[bytes, bytes, list[list[str]]]] = {
    "length_leading_zeros": (b"Content-Length: 0003\r\n", b"abc", [["content-length", "3"]]),
    "length_zeros_only": (b"Content-Length: 000\r\n", b"", [["content-length", "0"]]),
    "expect_without_body": (b"Expect: 100-continue\r\n", b"", []),
    "expect_with_length_0": (b"Expect: 100-continue\r\nContent-Length: 0\r\n", b"",
                             [["content-length", "0"]]),
    "expect_zeros_only": (b"Expect: 100-continue\r\nContent-Length: 00\r\n", b"",
                          [["content-length", "0"]]),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(NORMALISED_FIELDS))
def test_framing_fields_reach_the_app_normalised(mesh: Mesh, side: str, case: str) -> None:
    fields, body, want = NORMALISED_FIELDS[case]
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"POST /open/n HTTP/1.1\r\n" + H + fields
                   + b"Connection: close\r\n\r\n" + body)
    assert statuses(out) == [200], out[:300]
    with mesh.app.lock:
        heads = list(mesh.app.heads[mark[0]:])
    assert [h["body"] for h in heads] == [len(body)]
    got = [[n, v] for n, v in heads[0]["headers"] if n in ("content-length", "expect")]
    assert got == want, heads[0]["headers"]


# --- 2. With allow_underscores, credentials are removed in every spelling ---------------------

_CLAIMS = "    forward_claims: {sub: x-user}\n"
CREDENTIAL_POLICY = POLICY.replace(_CLAIMS, _CLAIMS + f"""\
  header-token:
    issuer: {hostile.ISSUER}
    audiences: [api]
    algorithms: [ES256]
    jwks_file: jwks.json
    from_headers: [X-Auth-Token]
    forward_token: false
  query-token:
    issuer: {hostile.ISSUER}
    audiences: [api]
    algorithms: [ES256]
    jwks_file: jwks.json
    from_params: [access_token]
  forwarded-token:
    issuer: {hostile.ISSUER}
    audiences: [api]
    algorithms: [ES256]
    jwks_file: jwks.json
    from_headers: [X-Fwd-Token]
    forward_token: true
  billing-token:
    issuer: {hostile.ISSUER}
    audiences: [api]
    algorithms: [ES256]
    jwks_file: jwks.json
    from_headers: [X-Billing-Token]
    forward_claims: {{tenant: x-tenant}}
""", 1).replace(_NO_ADMIN, _NO_ADMIN + f"""\
      - name: header-signed
        allow: {{from: ["{hostile.spiffe("frontend")}"], paths: [/h/**], jwt: {{provider: header-token}}}}
      - name: query-signed
        allow: {{from: ["{hostile.spiffe("frontend")}"], paths: [/q/**], jwt: {{provider: query-token}}}}
      - name: forwarded-signed
        allow: {{from: ["{hostile.spiffe("frontend")}"], paths: [/f/**], jwt: {{provider: forwarded-token}}}}
""", 1)
# A section no sidecar of this mesh runs, whose rule names billing-token: x-tenant is a claim
# header of the mesh, though neither the orders nor the frontend section uses its provider.
CREDENTIAL_POLICY += f"""\
  {hostile.spiffe("billing")}:
    rules:
      - name: billing
        allow: {{from: ["{hostile.spiffe("frontend")}"], jwt: {{provider: billing-token}}}}
"""
# Every header the sidecar removes as a credential or sets from a claim: the API key header
# (always removed), the token header of a ``forward_token: false`` provider, the claim header.
CREDENTIAL_HEADERS = ["x-api-key", "x-auth-token", "x-user"]
MARK = "zz-credential-5c1"


def _spellings(name: str) -> list[str]:
    title = "-".join(p[:1].upper() + p[1:] for p in name.split("-"))
    return [name, name.upper(), title, name.replace("-", "_"), title.replace("-", "_"),
            name.upper().replace("-", "_")]


mesh_us = module_fixture("review-us", lambda tmp: Mesh(
    tmp, policy=CREDENTIAL_POLICY, extra={"headers": {"allow_underscores": True}}))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("spelling", range(6))
def test_credentials_never_reach_the_app_in_any_spelling(mesh_us: Mesh, side: str,
                                                         spelling: int) -> None:
    # One request per spelling (two x-api-key fields would be refused as a duplicate), with
    # a valid token for the claim header to be set from. Where the spelling is the token
    # header the provider reads (any case, spellings 0-2), its value is a valid token of
    # that provider: anything else there is a token no provider accepted, refused before
    # the rules (invalid_tokens: refuse, tests/test_invalid_tokens.py).
    names = [_spellings(n)[spelling] for n in CREDENTIAL_HEADERS]
    hidden = mesh_us.token("bob")  # header-token's, forward_token: false
    values = [hidden if n.lower() == "x-auth-token" else MARK for n in names]
    lines = b"".join(f"{n}: {v}\r\n".encode() for n, v in zip(names, values, strict=True))
    token = f"Authorization: Bearer {mesh_us.token('alice')}\r\n".encode()
    mark = mesh_us.app.snapshot()
    out = exchange(mesh_us, side, b"GET /open/cred HTTP/1.1\r\n" + H + token + lines
                   + b"X_Custom_Ok: " + MARK.encode() + b"\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200], out[:300]
    with mesh_us.app.lock:
        heads = list(mesh_us.app.heads[mark[0]:])
    leaks = [(n, v) for h in heads for n, v in h["headers"] if MARK in v or hidden in v]
    assert leaks == [("x_custom_ok", MARK)], (names, leaks)  # (underscores are kept)
    assert ["x-user", "alice"] in heads[0]["headers"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("spelling", [3, 4, 5])
def test_a_forwarded_token_header_reaches_the_app_in_its_own_spelling_only(
        mesh_us: Mesh, side: str, spelling: int) -> None:
    """``forward_token: true``: the token header the provider reads is forwarded as sent;
    a second field under an underscore spelling of its name (which CGI, WSGI and PHP read
    as the same header) is removed, whatever the order."""
    other = _spellings("x-fwd-token")[spelling]
    kept = mesh_us.token("carol")  # (a valid token: an invalid one is refused, 401)
    for lines in (f"X-Fwd-Token: {kept}\r\n{other}: {MARK}\r\n",
                  f"{other}: {MARK}\r\nx-fwd-token: {kept}\r\n"):
        mark = mesh_us.app.snapshot()
        out = exchange(mesh_us, side, b"GET /open/fwd HTTP/1.1\r\n" + H + lines.encode()
                       + b"Connection: close\r\n\r\n")
        assert statuses(out) == [200], out[:300]
        with mesh_us.app.lock:
            heads = list(mesh_us.app.heads[mark[0]:])
        got = [(n, v) for n, v in heads[0]["headers"] if n.replace("_", "-") == "x-fwd-token"]
        assert got == [("x-fwd-token", kept)], got


# --- 7. A query parameter whose name folds to the token parameter's is that parameter --------

# (PHP reads each of these names as $_GET['access_token']; ';' separates like '&'.)
QUERY_TOKEN_SPELLINGS = ["access.token", "access%2Etoken", "access+token", "access%20token",
                         "access[token", "access_token[]", "%20access_token"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", QUERY_TOKEN_SPELLINGS)
def test_query_token_spellings_never_reach_the_app(mesh_us: Mesh, side: str, name: str) -> None:
    # The parameter in any spelling is the token (a valid one: anything else is a token no
    # provider accepted, refused with 401 before the rules -- and so is a second copy).
    token = mesh_us.token("alice")
    targets = {f"/open/q?{name}=EVIL&access_token={token}&b=2": None,  # two copies: 401
               f"/open/q?{name}=EVIL&b=2": None,  # not a token: 401
               f"/open/q?a=1;{name}={token}": "/open/q?a=1",
               f"/open/q?a=1;access_token={token}&b=2": "/open/q?a=1&b=2"}
    for target, want in targets.items():
        mark = mesh_us.app.snapshot()
        out = exchange(mesh_us, side, _closing(b"orders", target.encode()))
        if want is None:
            assert statuses(out) == [401], out[:300]
            assert mesh_us.app.targets_since(mark) == [], target
            continue
        assert statuses(out) == [200], out[:300]
        assert mesh_us.app.targets_since(mark) == [want], target


# Every spelling of a claim header another section's provider sets, the CGI one included
# (``Http-X-Tenant`` is ``HTTP_HTTP_X_TENANT``... and ``HTTP_X_TENANT`` itself to a server
# that takes '-' and '_' as one): removed on both listeners of sidecars whose own sections
# never use that provider (found by a hostile review: each sidecar knew only the claim
# headers of its own section's providers, and a caller's X-Tenant reached the orders app).
OTHER_SECTIONS_CLAIM = [*_spellings("x-tenant"), "Http-X-Tenant", "HTTP_X_TENANT",
                        "http-x-tenant", "Http_X_Tenant"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", OTHER_SECTIONS_CLAIM)
def test_a_claim_header_of_any_section_never_reaches_an_app(mesh_us: Mesh, side: str,
                                                           name: str) -> None:
    mark = mesh_us.app.snapshot()
    for token in (b"", f"Authorization: Bearer {mesh_us.token('alice')}\r\n".encode()):
        out = exchange(mesh_us, side, b"GET /open/tenant HTTP/1.1\r\n" + H + token
                       + f"{name}: t-admin\r\n".encode() + b"Connection: close\r\n\r\n")
        assert statuses(out) == [200], out[:300]
    with mesh_us.app.lock:
        heads = list(mesh_us.app.heads[mark[0]:])
    assert len(heads) == 2
    assert [(n, v) for h in heads for n, v in h["headers"] if "t-admin" in v] == []


# --- WebDAV Destination: the path a COPY or MOVE writes to is judged too ---------------------

# Found by a hostile review: ``GET /admin/config`` was denied while ``COPY /open/x`` with
# ``Destination: http://a/admin/config`` wrote there. Each spelling of a denied destination
# is refused; (destination, the status).
DESTINATIONS: dict[str, tuple[bytes, int]] = {
    "path": (b"/admin/config", 403),
    "http_uri": (b"http://orders/admin/config", 403),
    "https_uri_upper_scheme": (b"HTTPS://orders:8443/admin/config", 403),
    "escaped_letter": (b"/%61dmin/config", 403),
    "with_query": (b"http://orders/admin/config?x=1", 403),
    "trailing_slash": (b"/admin/", 403),
    "dot_segment": (b"/open/../admin/config", 400),
    "encoded_slash": (b"/open%2F..%2Fadmin", 400),
    "backslash": (b"/open\\..\\admin", 400),
    "relative": (b"admin/config", 400),
    "other_scheme": (b"ftp://orders/admin/config", 400),
    "userinfo": (b"http://x@orders/admin/config", 400),
    "no_path": (b"http://orders", 400),
    "bad_host": (b"http://orders:80:80/open/y", 400),
    "empty": (b"", 400),
    # The app applies the Destination to its own server: another host is refused, never
    # judged under that host's rules (found by a review of this check).
    "another_host_denied_path": (b"http://elsewhere/admin/config", 400),
    "another_host_allowed_path": (b"http://elsewhere.example/open/y", 400),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(DESTINATIONS))
def test_a_destination_the_policy_denies_is_refused(mesh: Mesh, side: str, case: str) -> None:
    value, status = DESTINATIONS[case]
    mark = mesh.app.snapshot()
    for method in (b"COPY", b"MOVE"):
        out = exchange(mesh, side, method + b" /open/x HTTP/1.1\r\n" + H + b"Destination: "
                       + value + b"\r\nConnection: close\r\n\r\n")
        assert statuses(out) == [status], (method, out[:300])
    assert mesh.app.targets_since(mark) == []


@pytest.mark.parametrize("side", SIDES)
def test_an_allowed_destination_reaches_the_app_as_the_policy_judged_it(mesh: Mesh,
                                                                        side: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"MOVE /open/x HTTP/1.1\r\n" + H
                   + b"Destination: http://orders/open/%79:z?v=1\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200], out[:300]
    with mesh.app.lock:
        heads = list(mesh.app.heads[mark[0]:])
    # An absolute URI stays one (WebDAV servers such as mod_dav ask for it), its authority
    # as sent, its path and query as judged.
    assert [v for n, v in heads[0]["headers"] if n == "destination"] == [
        "http://orders/open/y:z?v=1"]
    out = exchange(mesh, side, b"MOVE /open/x HTTP/1.1\r\n" + H
                   + b"Destination: /open/%79\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200], out[:300]
    # Two Destination fields: which one the app reads is not known.
    out = exchange(mesh, side, b"COPY /open/x HTTP/1.1\r\n" + H + b"Destination: /open/a\r\n"
                   b"Destination: /admin/b\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [400], out[:300]
