"""What a third hostile review of request heads found, each as a family built as data, through
real sidecars (inbound mTLS and outbound plain, as in ``tests/test_hostile_http.py``): every
member on both listeners, with the recording app as the witness.

1. ``Expect: 100-continue`` on an HTTP/1.0 request: the sidecar answered ``100 Continue``,
   which an HTTP/1.0 client reads as its final answer (RFC 9110 10.1.1: ignored). Now never
   a 1xx to such a client, and the field is not forwarded.
2. ``Upgrade`` on an HTTP/1.0 request: forwarded to the app as an HTTP/1.1 upgrade (RFC 9110
   7.8: a server MUST ignore it). Now dropped with the other hop-by-hop fields.
3. An Upgrade field that is no list of protocols (empty, ``,``, ``a b``, ``ws/``...) with
   ``Connection: upgrade``: forwarded as an upgrade request. Now 400 (``bad_upgrade``).
4. ``forward_claims`` header names: ``x-request-id``, ``x-forwarded-proto``, the sidecar's
   other headers in ``_`` spellings (``X_Forwarded_Client_Cert``), framing and hop-by-hop
   fields in ``_`` spellings (``content_length``), ``x.user`` (``X_USER`` to a gateway, as a
   caller's kept ``X-User``), a name with a final newline, and two providers setting
   ``x-user`` and ``x_user``: all loaded, so the app saw two values under one name. Now
   refused at load with file, line and key.
5. Caller headers apps believe that the catalogue missed: ``Proxy-Client-IP``, WebLogic's
   ``WL-Proxy-*`` (client certificate, scheme, address), App Engine's ``X-AppEngine-*``
   (users API, cron, task queue, calling app), Cloud Tasks and Scheduler headers, unlisted
   names of the identity-aware proxies' families, ``X-Spiffe-Ids``; and, with
   ``headers.allow_underscores``, every entry's CGI spelling (``HTTP_X_FORWARDED_FOR``,
   ``HTTP_CLIENT_IP``), which Java's "real IP" helpers read literally. All reached the app.
6. A claim string with a leading or trailing space went to the app as it was, so the app's
   parser (which strips the whitespace around a value) read `` alice`` as ``alice``; an
   empty claim went as an empty field, which some gateways drop. Now sent as JSON.
7. With ``headers.allow_underscores``, ``Content_Length`` and ``Content_Type`` reached the
   app next to the real fields: CGI gives both variables of their own, and a server that
   reads ``_`` as ``-`` (Puma before CVE-2024-45614) let the copy overwrite the real one --
   a second length to frame the body by. Now removed.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import ConfigError
from sidecar.http.untrusted import CATALOGUE, SIDECAR_SET, HeaderFilter
from sidecar.policy.cli import add_policy_parsers
from sidecar.policy.loader import load_policy, load_policy_file
from tests import test_authn_review as authn_review
from tests import test_header_catalogue as catalogue
from tests import test_hostile_http as hostile

Mesh, SIDES, exchange, statuses = hostile.Mesh, hostile.SIDES, hostile.exchange, hostile.statuses
H = hostile.H
pytestmark = pytest.mark.usefixtures("no_internal_errors")  # generic answers only


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hostile.Mesh]:
    m = Mesh(tmp_path_factory.mktemp("heads3"))
    yield m
    m.close()


def _heads_after(mesh: Mesh, mark: tuple[int, int]) -> list[dict[str, Any]]:
    with mesh.app.lock:
        return list(mesh.app.heads[mark[0]:])


def _names(head: dict[str, Any]) -> list[str]:
    return [n for n, _ in head["headers"]]


# --- 1. Expect on HTTP/1.0: no 100 Continue, not forwarded ----------------------------------

EXPECT_10: dict[str, bytes] = {
    "plain": b"Expect: 100-continue\r\n",
    "upper_case": b"Expect: 100-CONTINUE\r\n",
    "mixed_case_name": b"eXpEcT: 100-Continue\r\n",
    "whitespace": b"Expect: \t100-continue \t\r\n",
    "twice": b"Expect: 100-continue\r\nExpect: 100-continue\r\n",
    "before_length": b"Expect: 100-continue\r\n",  # (order: the length comes after below)
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(EXPECT_10))
@pytest.mark.parametrize("length", [b"3", b"003"])
def test_expect_on_http10_gets_no_interim_answer(mesh: Mesh, side: str, case: str,
                                                 length: bytes) -> None:
    fields = EXPECT_10[case]
    length_field = b"Content-Length: " + length + b"\r\n"
    head = fields + length_field if case == "before_length" else length_field + fields
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"POST /open/e HTTP/1.0\r\n" + H + head + b"\r\nabc")
    # One answer, the final one: a 1.0 client takes the first status line it reads.
    assert statuses(out) == [200], out[:300]
    assert out.startswith(b"HTTP/1.1 200 "), out[:100]
    heads = _heads_after(mesh, mark)
    assert [h["body"] for h in heads] == [3]
    assert "expect" not in _names(heads[0]), heads[0]["headers"]


@pytest.mark.parametrize("side", SIDES)
def test_expect_on_http11_is_still_answered(mesh: Mesh, side: str) -> None:
    """The control: an HTTP/1.1 caller that asks for 100-continue gets it, then its answer."""
    out = exchange(mesh, side, b"POST /open/e HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n"
                   b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")
    assert statuses(out) == [100, 200], out[:300]


# --- 2. Upgrade on HTTP/1.0: ignored (dropped), never an upgrade ------------------------------

UPGRADE_10: dict[str, bytes] = {
    "websocket": b"Connection: upgrade\r\nUpgrade: websocket\r\n",
    "case": b"CONNECTION: Upgrade\r\nupgrade: WebSocket\r\n",
    "listed_second": b"Connection: keep-alive, upgrade\r\nUpgrade: websocket\r\n",
    "versioned": b"Connection: upgrade\r\nUpgrade: foo/1.0\r\n",
    "two_protocols": b"Connection: upgrade\r\nUpgrade: websocket, foo/2\r\n",
    "two_fields": b"Connection: upgrade\r\nUpgrade: websocket\r\nUpgrade: foo\r\n",
    "with_key": b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(UPGRADE_10))
def test_upgrade_on_http10_is_ignored(mesh: Mesh, side: str, case: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/u HTTP/1.0\r\n" + H + UPGRADE_10[case] + b"\r\n")
    assert statuses(out) == [200], out[:300]
    heads = _heads_after(mesh, mark)
    assert len(heads) == 1
    names = _names(heads[0])
    assert "upgrade" not in names and "connection" not in names, heads[0]["headers"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("upgrade", [b"h2c", b"websocket, H2C", b"HTTP/2.0"])
def test_h2c_on_http10_is_still_refused(mesh: Mesh, side: str, upgrade: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/u HTTP/1.0\r\n" + H + b"Connection: upgrade\r\n"
                   b"Upgrade: " + upgrade + b"\r\n\r\n")
    hostile.assert_generic_refusal(out)
    assert statuses(out) == [400]
    assert _heads_after(mesh, mark) == []


# --- 3. An Upgrade field that is no list of protocols: 400 ------------------------------------

BAD_UPGRADES: dict[str, bytes] = {
    "empty": b"",
    "comma": b",",
    "commas_and_space": b" , ,\t",
    "space_inside": b"web socket",
    "slash_only": b"/",
    "no_version": b"websocket/",
    "no_name": b"/13",
    "two_slashes": b"foo/1/2",
    "quoted": b'"websocket"',
    "parameter": b"websocket;v=13",
    "brackets": b"websocket(13)",
    "good_then_bad": b"websocket, a b",
    "bad_then_good": b"a=b, websocket",
    "high_byte": b"websock\xe9t",
    "at_sign": b"web@socket",
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(BAD_UPGRADES))
@pytest.mark.parametrize("connection", [b"upgrade", b"Keep-Alive, Upgrade"])
def test_an_upgrade_that_names_no_protocol_is_refused(mesh: Mesh, side: str, case: str,
                                                     connection: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/u HTTP/1.1\r\n" + H + b"Connection: " + connection
                   + b"\r\nUpgrade: " + BAD_UPGRADES[case] + b"\r\n\r\n" + hostile.SMUGGLED)
    hostile.assert_generic_refusal(out)
    assert statuses(out) == [400], out[:300]
    assert _heads_after(mesh, mark) == []


GOOD_UPGRADES = [b"websocket", b"WebSocket", b"foo/1.0", b"websocket, foo/2", b"websocket,,",
                 b" websocket "]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("upgrade", GOOD_UPGRADES)
def test_an_upgrade_that_names_protocols_reaches_the_app(mesh: Mesh, side: str,
                                                         upgrade: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/u HTTP/1.1\r\n" + H + b"Connection: upgrade, close"
                   b"\r\nUpgrade: " + upgrade + b"\r\n\r\n")
    assert statuses(out) == [200], out[:300]  # (the recording app does not switch)
    heads = _heads_after(mesh, mark)
    assert len(heads) == 1
    fields = {n: v for n, v in heads[0]["headers"]}
    assert fields.get("connection") == "upgrade" and fields.get("upgrade"), fields


# --- 4. forward_claims header names: never one the app reads as the sidecar's own ------------

# The policy of ``tests/test_authn_review.py``: provider corp forwards ``sub`` as x-user and
# ``role`` as {corp_role}; provider partner forwards ``sub`` as {partner_sub}.
_CLAIMS_POLICY = authn_review.POLICY
_ROLE_LINE = _CLAIMS_POLICY.splitlines().index(
    "    forward_claims: {{sub: x-user, role: {corp_role}}}") + 1

# Header names a claim must not be forwarded as: the sidecar's own headers, framing,
# credentials, hop-by-hop fields and Expect, in every spelling the header filter reads as the
# same name (case, "_" for "-"), and names with a character a gateway reads as "_".
_SIDECAR_OWN = ["x-request-id", "x-forwarded-proto", "x-forwarded-client-cert"]
_FRAMING_AND_HOP = ["host", "content-length", "transfer-encoding", "connection", "te",
                    "upgrade", "keep-alive", "trailer", "proxy-connection", "http2-settings",
                    "proxy-authenticate", "proxy-authorization", "expect", "authorization",
                    "cookie", "x-api-key"]


def _spellings(name: str) -> list[str]:
    return sorted({name, name.upper(), name.title(), name.replace("-", "_"),
                   name.replace("-", "_").upper(), name.title().replace("-", "_")})


# Names an app runs as the request's path, method or target (found by a hostile review:
# ``forward_claims: {sub: x-http-method-override}`` loaded): every request-override entry of
# the catalogue (a prefix entry with a suffix) and WebDAV's Destination.
def _override_names() -> list[str]:
    from sidecar.http.untrusted import CATALOGUE, OVERRIDE

    return sorted({e.name + ("x" if e.prefix else "") for e in CATALOGUE
                   if e.family == OVERRIDE} | {"destination"})


# Facts of the connection and of the body an app reads (found by the thirty-third session's
# token review: a claim loaded under ``content-type`` or ``x-forwarded-for``; the review of
# that fix: ``x-forwarded-tls-client-cert``, ``x-forwarded-method``,
# ``cloudfront-viewer-address`` and the like still loaded): every name of the catalogue's
# forwarding and client-certificate families (a name under each prefix), Envoy's, the names
# that review tried, and the representation of the body.
def _fact_names() -> list[str]:
    from sidecar.http.untrusted import CATALOGUE, CLIENT_CERT, FORWARDING
    from sidecar.policy.load_sections import _REPRESENTATION

    return sorted({e.name + ("x-y" if e.prefix else "") for e in CATALOGUE
                   if e.family in (CLIENT_CERT, FORWARDING)} | _REPRESENTATION | {
        "x-forwarded-tls-client-cert", "x-forwarded-tls-client-cert-info",
        "x-forwarded-ssl-client-cert", "x-forwarded-method", "x-forwarded-url",
        "x-forwarded-client-ip", "x-forwarded-ip", "x-forwarded-https", "x-forwarded-by",
        "cloudfront-viewer-address", "fly-forwarded-proto", "fly-forwarded-port",
        "fly-forwarded-ssl", "x-original-proto", "x-original-for",
        "x-envoy-external-address", "x-envoy-internal"})


BAD_CLAIM_HEADERS: dict[str, str] = {
    f"{n}:{s}": s for n in _SIDECAR_OWN + _FRAMING_AND_HOP + _override_names() + _fact_names()
    for s in _spellings(n)}
# The CGI spelling some apps read literally (``getHeader("HTTP_X_REQUEST_ID")``).
BAD_CLAIM_HEADERS.update({
    f"cgi:{n}": "HTTP_" + n.replace("-", "_").upper()
    for n in _SIDECAR_OWN + _FRAMING_AND_HOP + _override_names()})
BAD_CLAIM_HEADERS.update({
    f"gateway_char:{c}": f"x{c}user" for c in "!#$%&'*+.^`|~"})
BAD_CLAIM_HEADERS["final_newline"] = "x-user\n"
BAD_CLAIM_HEADERS["final_newline_own"] = "x-request-id\n"
GOOD_CLAIM_HEADERS = ["x-role", "X-Role", "x_role", "x-forwarded-user", "x-auth-request-email",
                      "user", "x-request-id2", "x-role-claim", "x-forwarded-email",
                      "x-forwarded-groups", "x-forwarded-preferred-username", "x-remote-user",
                      "x-content-owner", "cf-access-authenticated-user-email"]


@pytest.fixture(scope="module")
def _claims_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iterator[Path]]:
    root = tmp_path_factory.mktemp("heads3-claims")
    yield (root / str(n) for n in itertools.count())


@pytest.fixture
def claims_dir(_claims_root: Iterator[Path]) -> Path:
    """A fresh directory for one test's policy (``tmp_path``'s numbered directories cost a
    scan of all before each: over a thousand members here)."""
    path = next(_claims_root)
    path.mkdir()
    return path


def _claims_policy(tmp_path: Path, role: str, partner: str = "x-partner-user") -> Path:
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    path = tmp_path / "policy.yaml"
    path.write_text(_CLAIMS_POLICY.format(corp_role=json.dumps(role),
                                          partner_sub=json.dumps(partner)))
    return path


@pytest.fixture(scope="module")
def claims_shared(_claims_root: Iterator[Path]) -> Path:
    """One directory (its ``jwks.json``) for the policies loaded from text below."""
    path = next(_claims_root)
    path.mkdir()
    (path / "jwks.json").write_text('{"keys": []}')
    return path


@pytest.mark.parametrize("case", sorted(BAD_CLAIM_HEADERS))
def test_a_claim_is_never_forwarded_as_a_header_the_sidecar_owns(claims_shared: Path,
                                                                case: str) -> None:
    # (the policy's text loaded as the file it names, in the directory of its jwks.json:
    # over a thousand members, and a file written and read for each cost seconds of system
    # time; reading the file itself is the same loader, covered by the tests below)
    path = claims_shared / "policy.yaml"
    with pytest.raises(ConfigError) as info:
        load_policy(_CLAIMS_POLICY.format(corp_role=json.dumps(BAD_CLAIM_HEADERS[case]),
                                          partner_sub=json.dumps("x-partner-user")), str(path))
    text = str(info.value)
    assert f"{path}:{_ROLE_LINE}: jwt_providers.corp.forward_claims.role:" in text, text


@pytest.mark.parametrize("header", GOOD_CLAIM_HEADERS)
def test_claim_header_names_that_stay_allowed(claims_dir: Path, header: str) -> None:
    if header.lower() == "x-user":
        header = "x-role"  # (corp forwards sub as x-user already)
    policy = load_policy_file(str(_claims_policy(claims_dir, header)))
    assert policy.extras.jwt_providers["corp"].forward_claims == (
        ("sub", "x-user"), ("role", header.lower()))


@pytest.mark.parametrize("role, partner, clash", [
    ("x-role", "x_user", "partner.forward_claims.sub"),
    ("x-role", "X_USER", "partner.forward_claims.sub"),
    ("x_role", "x-role", "partner.forward_claims.sub"),
    ("X_User", "x-partner-user", "corp.forward_claims.role"),  # (one provider, two claims)
    ("x_user", "x-partner-user", "corp.forward_claims.role")])
def test_one_header_in_two_spellings_is_one_header(claims_dir: Path, role: str, partner: str,
                                                   clash: str) -> None:
    path = _claims_policy(claims_dir, role, partner)
    with pytest.raises(ConfigError) as info:
        load_policy_file(str(path))
    text = str(info.value)
    assert f"jwt_providers.{clash}" in text and "already" in text, text


def test_policy_check_names_the_file_line_and_key(tmp_path: Path) -> None:
    path = _claims_policy(tmp_path, "X_Request_Id")
    parser = argparse.ArgumentParser(prog="sidecar policy")
    add_policy_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check", str(path)])
    args.stdout, args.stderr = io.StringIO(), io.StringIO()
    assert args.func(args) == 1
    assert f"{path}:{_ROLE_LINE}: jwt_providers.corp.forward_claims.role:" in \
        args.stderr.getvalue()


# --- 5. Identity and client-address headers the catalogue missed, and their CGI spellings ----

# Forwarded with the caller's value before: each is covered by an entry now, and so sent in
# every variant through both listeners by tests/test_header_catalogue.py.
REVIEW3_FOUND = ["Proxy-Client-IP", "WL-Proxy-Client-IP", "WL-Proxy-SSL", "WL-Proxy-Client-Cert",
                 "WL-Proxy-Client-Keysize", "X-AppEngine-User-Email", "X-AppEngine-User-Id",
                 "X-AppEngine-User-Is-Admin", "X-AppEngine-Cron", "X-AppEngine-QueueName",
                 "X-AppEngine-TaskName", "X-AppEngine-Inbound-Appid", "X-CloudTasks-QueueName",
                 "X-CloudTasks-TaskName", "X-CloudScheduler", "X-CloudScheduler-JobName",
                 "X-Amzn-Oidc-Subject", "X-MS-Client-Principal-Roles",
                 "X-Goog-Authenticated-User-Groups", "X-Goog-IAP-Something",
                 "Cf-Access-Client-Id", "Cf-Access-Client-Secret", "X-Spiffe-Ids",
                 "X-SpiffeId", "SpiffeId", "Spiffe-Ids"]


def _cgi_spellings(name: str) -> list[str]:
    """``name`` behind ``HTTP_`` as CGI writes it, and as callers may send it."""
    under = name.replace("-", "_")
    return ["HTTP_" + under.upper(), "http_" + under, "Http-" + name, "HTTP-" + name.upper()]


# Every catalogue entry (a prefix entry with a suffix) and every header the sidecar sets.
CATALOGUED = [entry.name + ("x" if entry.prefix else "") for entry in CATALOGUE] + sorted(
    SIDECAR_SET)
CGI_KEPT = ["HTTP_ACCEPT_OK", "http-custom-ok", "Http_Version_Ok", "HTTPSX"]  # (the control;
# ``Https`` itself is an entry since the thirtieth session: CGI reads it as HTTP_HTTPS)


@pytest.mark.parametrize("name", REVIEW3_FOUND)
def test_headers_the_third_review_found_are_removed(name: str) -> None:
    for f in (HeaderFilter(), HeaderFilter(allow_underscores=True)):
        for spelling in (name, name.upper(), name.lower(), name.replace("-", "_")):
            assert f.removes(spelling.lower().encode()), spelling


def test_the_cgi_spelling_of_every_entry_is_removed() -> None:
    for f in (HeaderFilter(), HeaderFilter(allow_underscores=True),
              HeaderFilter(allow_underscores=True, pass_through=["x-forwarded-host"])):
        for name in CATALOGUED:
            for spelling in _cgi_spellings(name):
                assert f.removes(spelling.lower().encode()), spelling
    kept = HeaderFilter(allow_underscores=True)
    for name in CGI_KEPT:
        assert not kept.removes(name.lower().encode()), name


@pytest.fixture(scope="module")
def mesh_us(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hostile.Mesh]:
    m = Mesh(tmp_path_factory.mktemp("heads3-us"),
             extra={"headers": {"allow_underscores": True, "pass_through": ["x-forwarded-host"]}})
    yield m
    m.close()


@pytest.mark.parametrize("side", SIDES)
def test_cgi_spellings_never_reach_the_app(mesh_us: Mesh, side: str) -> None:
    names = [s for n in CATALOGUED for s in _cgi_spellings(n)] + [
        s for n in REVIEW3_FOUND for s in (n, n.replace("-", "_"))] + CGI_KEPT
    heads = catalogue._send(mesh_us, side, names)  # (batches of 20 on one connection)
    leaked = sorted(n for n, _ in catalogue._leaks(heads))
    assert leaked == sorted(n.lower() for n in CGI_KEPT)


# --- 6. Claim values the app would read as another value ------------------------------------

# ``sub`` values whose raw header form an HTTP parser reads as another one (it strips the
# whitespace around a value); "alice" is the control. (An empty `sub` is no valid token.)
SPACED_CLAIMS = [" alice", "alice ", "  alice  ", " ", "   ", " 1", "1 ", "alice"]
# ... and values an app reading the header as a list (RFC 9110 5.6.1: split at commas, or at
# semicolons for parameters and cookie-style readers) reads as another user's first (a
# hostile review, thirty-fourth session: ``alice,mallory`` reached Spring's List<String> as
# ``alice``).
LISTED_CLAIMS = ["alice,mallory", "alice, mallory", "alice ,mallory", ",alice", "alice,",
                 "alice;mallory", "alice; role=admin", "a,b;c", ",", ";"]


def _read_back(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _first_listed(value: str) -> str:
    """What a list reader takes first from a header value (split at "," then ";")."""
    return value.split(",")[0].split(";")[0].strip()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("sub", SPACED_CLAIMS + LISTED_CLAIMS,
                         ids=[repr(s) for s in SPACED_CLAIMS + LISTED_CLAIMS])
def test_a_claim_reaches_the_app_as_itself(mesh: Mesh, side: str, sub: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/c HTTP/1.1\r\n" + H + b"Authorization: Bearer "
                   + mesh.token(sub).encode() + b"\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200], out[:300]
    heads = _heads_after(mesh, mark)
    values = [v for h in heads for n, v in h["headers"] if n == "x-user"]
    assert len(values) == 1, heads
    assert _read_back(values[0]) == sub, values  # (as the app's parser gave it)
    assert (values[0] == "alice") is (sub == "alice")
    first = _first_listed(values[0])  # (a quoted first piece is no user's name)
    assert first == sub or first.startswith('"'), values


# --- 7. "_" spellings of Content-Length and Content-Type, with allow_underscores ------------

META_SPELLINGS = ["Content_Length", "CONTENT_LENGTH", "content_length", "Content_length",
                  "Content_Type", "CONTENT_TYPE", "content_type"]


def test_underscore_spellings_of_the_cgi_meta_fields_are_removed() -> None:
    for f in (HeaderFilter(), HeaderFilter(allow_underscores=True),
              HeaderFilter(allow_underscores=True, pass_through=["x-forwarded-host"])):
        for name in META_SPELLINGS:
            assert f.removes(name.lower().encode()), name
        assert not f.removes(b"content-length") and not f.removes(b"content-type")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_second_length_never_reaches_the_app(mesh_us: Mesh, side: str, framing: str) -> None:
    spoofed = b"".join(f"{n}: {100 + i}\r\n".encode() for i, n in enumerate(META_SPELLINGS))
    if framing == "length":
        head, body = b"Content-Length: 5\r\n", b"abcde"
    else:
        head, body = b"Transfer-Encoding: chunked\r\n", b"5\r\nabcde\r\n0\r\n\r\n"
    mark = mesh_us.app.snapshot()
    out = exchange(mesh_us, side, b"POST /open/m HTTP/1.1\r\n" + H + head + spoofed
                   + b"Content-Type: text/plain\r\nConnection: close\r\n\r\n" + body)
    assert statuses(out) == [200], out[:300]
    heads = _heads_after(mesh_us, mark)
    assert [h["body"] for h in heads] == [5]
    content = [[n, v] for n, v in heads[0]["headers"] if n.startswith("content")]
    want = [["content-length", "5"]] if framing == "length" else []
    assert content == want + [["content-type", "text/plain"]], heads[0]["headers"]
