"""The untrusted-header catalogue (sidecar.http.untrusted), as data and through real sidecars.

Every catalogue entry is sent in every variant (lower, upper, mixed case, ``_`` for ``-``,
duplicated, as a trailer) on the inbound and the outbound path; the recording app must see
none of them. A second mesh keeps underscore names (``headers.allow_underscores``) so that
folding ``_`` to ``-`` is what removes them, and passes one entry through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.config.model import load_config
from sidecar.errors import ConfigError
from sidecar.http.untrusted import (
    CATALOGUE,
    NOT_IN_PREFIX,
    SIDECAR_SET,
    WRAPPERS,
    HeaderFilter,
    catalogue_markdown,
    entry_for,
)
from tests.harness import module_fixture
from tests.test_hostile_http import SIDES, H, Mesh, assert_generic_refusal, exchange, statuses

# Every request here must end in a generic answer, never in an unhandled exception.
pytestmark = pytest.mark.usefixtures("no_internal_errors")

ROOT = Path(__file__).resolve().parent.parent
MARK = "zz-spoofed-9f3"


def concrete(name: str, prefix: bool) -> str:
    """A header name the entry covers (a prefix entry gets a suffix)."""
    return f"{name}-test" if prefix and not name.endswith("-") else (name + "test" if prefix else name)


NAMES = [concrete(e.name, e.prefix) for e in CATALOGUE]


def variants(name: str) -> list[str]:
    parts = name.split("-")
    return [
        name,
        name.upper(),
        "-".join(p[:1].upper() + p[1:] for p in parts),
        name.replace("-", "_"),
        name.upper().replace("-", "_"),
    ]


# --- as data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_is_removed_in_every_variant(name: str) -> None:
    keep_us = HeaderFilter(allow_underscores=True)
    default = HeaderFilter()
    for v in variants(name):
        raw = v.lower().encode("latin-1")  # readers lower-case names
        assert keep_us.removes(raw), v
        assert default.removes(raw), v


def test_ordinary_headers_are_kept() -> None:
    f = HeaderFilter()
    for name in (b"accept", b"content-type", b"user-agent", b"x-b3-traceid", b"traceparent",
                 b"authorization", b"cookie", b"x-api-key", b"x-custom"):
        assert not f.removes(name), name


# Headers a hostile review found forwarded with the caller's value: each is covered by an
# entry now (and so sent in every variant through both listeners by the tests below).
REVIEW_FOUND = ["Cf-Visitor", "X-True-IP", "Real-Ip", "X-Original-Remote-Addr",
                "X-Custom-IP-Authorization", "X-Client-Addr", "Forwarded-For", "X-Forwarder-For",
                "Via", "X-Auth-Username", "X-Proxy-User", "X-Hasura-Role", "X-Hasura-User-Id",
                "Spiffe-Id",
                # the eighteenth session's review: the x-auth- family, OpenStack's identity,
                # role and admin flags, Kubernetes impersonation
                "X-Auth-Roles", "X-Auth-Role", "X-Auth-User-Id", "X-Auth-Tenant",
                "X-Identity-Status", "X-Project-Id", "X-Tenant-Id", "X-Service-Roles", "X-Role",
                "X-Is-Admin", "Impersonate-User", "Impersonate-Group", "Impersonate-Extra-Scopes",
                # the twentieth session's review: the x-user- family
                "X-User-Roles", "X-User-Groups", "X-User-Tenant", "X-User-Scopes",
                "X-User-Permissions", "X-User-Claims", "X-User-Org", "X-User-Sub"]


# What the client itself sends under a catalogued prefix (credentials under x-auth-, which
# the app verifies; its X-User-Agent): forwarded (a JWT provider may read a credential one:
# the token rules apply then).
@pytest.mark.parametrize("name", sorted(NOT_IN_PREFIX))
def test_client_credentials_in_a_catalogued_prefix_are_kept(name: str) -> None:
    assert entry_for(name) is None and entry_for(name.upper()) is None
    for f in (HeaderFilter(), HeaderFilter(allow_underscores=True)):
        assert not f.removes(name.encode())
    assert HeaderFilter().removes(b"x-auth-tokens") and HeaderFilter().removes(b"x-auth-keys")


@pytest.mark.parametrize("name", REVIEW_FOUND)
def test_headers_the_review_found_are_in_the_catalogue(name: str) -> None:
    assert entry_for(name) is not None, name
    assert HeaderFilter().removes(name.lower().encode())


def test_underscore_names_dropped_unless_allowed() -> None:
    assert HeaderFilter().removes(b"x_custom")
    assert not HeaderFilter(allow_underscores=True).removes(b"x_custom")


def test_pass_through_keeps_only_the_named_entry() -> None:
    f = HeaderFilter(allow_underscores=True, pass_through=["x-forwarded-host"])
    assert not f.removes(b"x-forwarded-host")
    assert not f.removes(b"x_forwarded_host")
    assert f.removes(b"x-forwarded-for")
    # The sidecar's own headers stay removed whatever pass_through says.
    assert HeaderFilter(pass_through=["x-forwarded-client-cert"]).removes(b"x-forwarded-client-cert")


def test_clean_folds_extra_and_connection_names() -> None:
    f = HeaderFilter(allow_underscores=True)
    headers = [(b"x_user", b"evil"), (b"accept", b"*/*"), (b"x-keep", b"1")]
    assert f.clean(headers, frozenset({b"x-user"}), set()) == [(b"accept", b"*/*"), (b"x-keep", b"1")]
    assert f.clean(headers, frozenset(), {b"x_keep"}) == [(b"accept", b"*/*")]
    # Hop-by-hop under an underscore spelling is hop-by-hop.
    assert f.clean([(b"transfer_encoding", b"chunked")], frozenset(), set()) == []


def test_clean_removes_exact_names_in_every_spelling() -> None:
    # The caller's API key goes with the credentials in every spelling an app reads as the
    # same header: X_Api_Key is HTTP_X_API_KEY to CGI, WSGI and PHP (a hostile review found
    # it forwarded with allow_underscores).
    f = HeaderFilter(allow_underscores=True)
    headers = [(b"x-api-key", b"k"), (b"x_api_key", b"k2"), (b"accept", b"*/*")]
    exact = frozenset({b"x-api-key"})
    assert f.clean(headers, frozenset(), set(), exact) == [(b"accept", b"*/*")]
    # The same with Connection-listed names (the per-request path) and with extra names.
    assert f.clean(headers, frozenset(), {b"accept"}, exact) == []
    assert f.clean(headers, frozenset({b"x-api-key"}), set()) == [(b"accept", b"*/*")]


def test_clean_keeps_its_answers_per_name_and_per_extra_set() -> None:
    # Decisions are kept per raw name and per (extra, exact) set: asking again, or after
    # another set was used, gives the same answer as deciding afresh.
    f = HeaderFilter()
    headers = [(b"x-forwarded-for", b"1.2.3.4"), (b"x-team", b"t"), (b"accept", b"*/*")]
    for _ in range(2):
        assert f.clean(headers, frozenset(), set()) == [(b"x-team", b"t"), (b"accept", b"*/*")]
        assert f.clean(headers, frozenset({b"X-Team"}), set()) == [(b"accept", b"*/*")]
        assert f.clean(headers, frozenset(), set(), frozenset({b"accept"})) == [
            (b"x-team", b"t")]
    assert [f.removes(n) for n, _ in headers] == [True, False, False]


def test_every_entry_has_a_reason_and_a_family() -> None:
    for e in CATALOGUE:
        assert e.reason and e.family, e
        assert e.name == e.name.lower() and "_" not in e.name, e
    for name in SIDECAR_SET:
        assert entry_for(name) is not None, name


def test_security_doc_reproduces_the_catalogue() -> None:
    doc = (ROOT / "docs" / "SECURITY.md").read_text()
    assert catalogue_markdown() in doc, "regenerate: python -m sidecar.http.untrusted"


def _cfg(tmp_path: Path, headers: Any) -> str:
    pki = tmp_path
    for f in ("tls.crt", "tls.key", "ca.crt"):
        (pki / f).write_text("x")
    return json.dumps({
        "identity": {"cert": str(pki / "tls.crt"), "key": str(pki / "tls.key"),
                     "bundle": str(pki / "ca.crt")},
        "inbound": {"listen": "127.0.0.1:1", "app": "127.0.0.1:2"},
        "headers": headers,
    })


def test_config_keys(tmp_path: Path) -> None:
    cfg = load_config(_cfg(tmp_path, {"allow_underscores": True,
                                      "pass_through": ["X-Forwarded-Host"]}), "c.yaml")
    assert cfg.headers.allow_underscores is True
    assert cfg.headers.pass_through == ("x-forwarded-host",)


@pytest.mark.parametrize("headers, needle", [
    ({"pass_through": ["x-request-id"]}, "set by the sidecar"),
    ({"pass_through": ["x-forwarded-proto"]}, "set by the sidecar"),
    ({"pass_through": ["accept"]}, "not in the header catalogue"),
    ({"pass_through": "x-real-ip"}, "expected a list"),
    ({"allow_underscores": "yes"}, "expected true or false"),
    ({"strip": []}, "unknown key"),
])
def test_config_errors_name_the_key(tmp_path: Path, headers: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(tmp_path, headers), "c.yaml")
    assert needle in str(err.value)
    assert "headers" in str(err.value)


# --- through real sidecars ------------------------------------------------------------------


mesh = module_fixture("catalogue", Mesh)


mesh_us = module_fixture("catalogue-us", lambda tmp: Mesh(
    tmp, extra={"headers": {"allow_underscores": True, "pass_through": ["x-forwarded-host"]}}))


def _send(mesh: Mesh, side: str, names: list[str]) -> list[dict[str, Any]]:
    """One keep-alive connection, one request per batch of names; the app's records."""
    batches = [names[i:i + 20] for i in range(0, len(names), 20)]
    data = b""
    for i, batch in enumerate(batches):
        lines = b"".join(f"{n}: {MARK}\r\n".encode() for n in batch)
        last = b"Connection: close\r\n" if i == len(batches) - 1 else b""
        data += b"GET /cat HTTP/1.1\r\n" + H + lines + last + b"\r\n"
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, data, timeout=8.0)
    assert statuses(out) == [200] * len(batches), out[:400]
    with mesh.app.lock:
        return list(mesh.app.heads[mark[0]:])


def _leaks(heads: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(n, v) for h in heads for n, v in h["headers"] + h.get("trailers", []) if MARK in v]


@pytest.mark.parametrize("side", SIDES)
def test_catalogue_never_reaches_the_app(mesh: Mesh, side: str) -> None:
    names = [v for n in NAMES for v in variants(n)]
    names += NAMES  # each entry twice: duplicates are all removed
    heads = _send(mesh, side, names)
    assert _leaks(heads) == []


@pytest.mark.parametrize("side", SIDES)
def test_underscore_names_are_folded_when_kept(mesh_us: Mesh, side: str) -> None:
    names = [v for n in NAMES if n != "x-forwarded-host" for v in variants(n)]
    heads = _send(mesh_us, side, names + ["x_custom_ok"])
    assert _leaks(heads) == [("x_custom_ok", MARK)]


@pytest.mark.parametrize("side", SIDES)
def test_client_credentials_in_a_catalogued_prefix_reach_the_app(mesh: Mesh, side: str) -> None:
    heads = _send(mesh, side, ["X-Auth-Token", "x-auth-key", "X-Auth-Roles"])
    assert sorted(_leaks(heads)) == [("x-auth-key", MARK), ("x-auth-token", MARK)]


@pytest.mark.parametrize("side", SIDES)
def test_underscore_names_dropped_by_default(mesh: Mesh, side: str) -> None:
    heads = _send(mesh, side, ["x_custom_ok", "x-custom-ok"])
    assert _leaks(heads) == [("x-custom-ok", MARK)]


# Token characters (RFC 9110 5.6.2) besides letters, digits, "-" and "_": a gateway that maps
# them to "_" (lighttpd's CGI/FastCGI) turns X.Forwarded.For into HTTP_X_FORWARDED_FOR.
ODD_CHARS = "!#$%&'*+.^`|~"


def test_names_with_other_token_characters_are_dropped() -> None:
    for f in (HeaderFilter(), HeaderFilter(allow_underscores=True)):
        for ch in ODD_CHARS:
            assert f.removes(f"x{ch}forwarded{ch}for".encode()), ch
            assert f.removes(f"x-custom{ch}".encode()), ch
        assert not f.removes(b"x-custom-9")


@pytest.mark.parametrize("side", SIDES)
def test_names_with_other_token_characters_never_reach_the_app(mesh_us: Mesh,
                                                               side: str) -> None:
    names = [f"x{ch}forwarded{ch}for" for ch in ODD_CHARS] + ["X.Real.IP", "x-custom-ok"]
    heads = _send(mesh_us, side, names)
    assert _leaks(heads) == [("x-custom-ok", MARK)]


@pytest.mark.parametrize("side", SIDES)
def test_pass_through_entry_reaches_the_app(mesh_us: Mesh, side: str) -> None:
    heads = _send(mesh_us, side, ["X-Forwarded-Host", "X-Forwarded-For"])
    assert _leaks(heads) == [("x-forwarded-host", MARK)]


def _send_trailers(mesh: Mesh, side: str, names: list[str]) -> list[dict[str, Any]]:
    """One keep-alive connection, one chunked POST per batch of names sent as trailers (and
    announced in a ``Trailer`` header); the app's records."""
    batches = [names[i:i + 100] for i in range(0, len(names), 100)]
    data = b""
    for i, batch in enumerate(batches):
        trailer = b"".join(f"{n}: {MARK}\r\n".encode() for n in batch)
        announce = ", ".join(batch[:10]).encode()
        last = b"Connection: close\r\n" if i == len(batches) - 1 else b""
        data += (b"POST /cat HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                 b"TE: trailers\r\nTrailer: " + announce + b"\r\n" + last +
                 b"\r\n3\r\nabc\r\n0\r\n" + trailer + b"\r\n")
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, data, timeout=8.0)
    assert statuses(out) == [200] * len(batches), out[:400]
    with mesh.app.lock:
        heads = list(mesh.app.heads[mark[0]:])
    assert [h["body"] for h in heads] == [3] * len(batches)
    return heads


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("which", ["default", "underscores_and_pass_through"])
def test_catalogue_as_trailers_never_reaches_the_app(mesh: Mesh, mesh_us: Mesh, side: str,
                                                     which: str) -> None:
    """Trailers are never forwarded: every entry in every variant (and twice), sent as a
    request trailer, reaches the app neither as a trailer nor as a header -- also with
    ``allow_underscores`` and for the ``pass_through`` entry, which apply to headers only."""
    m = mesh if which == "default" else mesh_us
    names = [v for n in NAMES for v in variants(n)] + NAMES + ["x-custom-trailer"]
    heads = _send_trailers(m, side, names)
    assert _leaks(heads) == []
    assert all(h.get("trailers") == [] for h in heads), heads[0].get("trailers")
    sent = {n for h in heads for n, _ in h["headers"]}
    assert not sent & {"trailer", "te"}, sent


@pytest.mark.parametrize("side", SIDES)
def test_response_trailers_never_reach_the_client(mesh: Mesh, side: str) -> None:
    """The same in the other direction: the app's response trailers (every entry, announced
    in a ``Trailer`` header) are dropped by the inbound sidecar's reader, and the outbound
    one re-frames what it got; the client sees the body and no trailer."""
    names = [v for n in NAMES for v in variants(n)][:150]
    with mesh.app.lock:
        mesh.app.response_trailers = [(n, MARK) for n in names]
    try:
        out = exchange(mesh, side, b"GET /trailers HTTP/1.1\r\n" + H +
                       b"TE: trailers\r\nConnection: close\r\n\r\n", timeout=8.0)
    finally:
        with mesh.app.lock:
            mesh.app.response_trailers = []
    assert statuses(out) == [200], out[:400]
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"trailer-body" in body
    assert MARK.encode() not in out
    assert b"\ntrailer:" not in head.lower()


# Requests whose headers would make the app run another path or method: (target, header
# lines, words the app must not see). The second is the twenty-seventh review's
# CVE-2026-33768 request (x-astro-path, with x-isr and x-vinext-mw-ctx).
REROUTES = {
    "original-url": ("/public", b"X-Original-URL: /admin/x\r\nX-HTTP-Method-Override: DELETE"
                     b"\r\nX-Forwarded-Prefix: /admin\r\n", ("admin", "DELETE")),
    "astro-path": ("/public/x", b"x-astro-path: /admin/delete\r\nX-ISR: 1\r\n"
                   b"x-vinext-mw-ctx: {}\r\nX-Replaced-Path: /admin\r\n", ("admin", "mw-ctx")),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(REROUTES))
def test_override_header_cannot_reroute_an_allowed_request(mesh: Mesh, side: str,
                                                           case: str) -> None:
    """GET /public with X-Original-URL: /admin (and the others) reaches the app as /public,
    with no override."""
    target, lines, words = REROUTES[case]
    data = (f"GET {target} HTTP/1.1\r\n".encode() + H + lines + b"Connection: close\r\n\r\n")
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, data)
    assert statuses(out) == [200], out[:300]
    with mesh.app.lock:
        heads = list(mesh.app.heads[mark[0]:])
    assert [h["target"] for h in heads] == [target]
    assert not [w for w in words if w in json.dumps(heads)], heads


# --- headers real front ends set that were not in the catalogue (a later hostile review) ------

# One or more members of each family the review found forwarded with the caller's value, as
# the front end spells them. Listed here, not derived from CATALOGUE, so that each test below
# fails if its entry is taken out again.
REVIEW6_FOUND = [
    # web access management agents: SiteMinder (Spring Security's default SM_USER), WebSEAL,
    # Oracle Access Manager, mod_auth_cas
    "SM-User", "SM-UserDN", "SM-UniversalId", "SM-AuthType", "SMUSER", "SMUSERDN",
    "SMUNIVERSALID", "iv-user", "iv-groups", "iv-creds", "iv-remote-address",
    "OAM-Remote-User", "OAM-Identity-Domain", "CAS-User", "CAS-Email",
    # SAML attributes as headers: Shibboleth's default attribute map, mod_auth_mellon
    "eppn", "affiliation", "unscoped-affiliation", "entitlement", "persistent-id",
    "targeted-id", "pairwise-id", "subject-id", "Mellon-Name-Id", "Mellon-Mail",
    # Jetty's ForwardedRequestCustomizer; Keycloak's certificate chain
    "X-Proxied-Https", "Proxy-ssl-id", "Proxy-auth-cert", "Cert-Chain-0", "Cert-Chain-1",
    # other meshes, runtimes and identity-aware tunnels
    "dapr-caller-app-id", "dapr-caller-namespace", "dapr-callee-app-id", "x-kuma-tags",
    "Tailscale-User-Login", "Tailscale-User-Name", "Tailscale-User-Profile-Pic",
    "Ngrok-Auth-User-Email", "Ngrok-Auth-User-Id", "Ngrok-Auth-User-Name",
    "Teleport-Jwt-Assertion",
    # AWS: Lambda Web Adapter, API Gateway private APIs, ALB TLS facts
    "x-amzn-request-context", "x-amzn-lambda-context", "x-amzn-vpce-id", "x-amzn-vpce-config",
    "x-amzn-apigateway-api-id", "X-Amzn-Tls-Version", "X-Amzn-Tls-Cipher-Suite",
    "x-amzn-lattice-identity", "x-amzn-lattice-network", "x-amzn-lattice-target",
    # Kong's families beyond the names listed
    "X-Authenticated-Email", "X-Authenticated-Client-Id", "X-Credential-Key",
    "X-Anonymous-Groups",
    # OpenSearch / Search Guard proxy authentication; the x-remote- family
    "X-Proxy-Roles", "x-proxy-ext-department", "X-Remote-User-Group", "X-Remote-Email",
    "X-Remote-Groups",
    # Azure, Fastly, Magento: edge and scheme headers
    "X-Azure-FDID", "X-AppService-Proto", "X-Waws-Unencoded-Url", "Fastly-SSL", "Fastly-FF",
    "SSL-Offloaded", "Fly-Forwarded-Proto", "Fly-Forwarded-Port", "Fly-Forwarded-Ssl",
    "Ali-CDN-Real-IP",
    # CDN viewer facts
    "CloudFront-Viewer-Address", "CloudFront-Viewer-Country", "CloudFront-Viewer-TLS",
    "CloudFront-Is-Desktop-Viewer", "CloudFront-Viewer-Cert-Subject",
    "CloudFront-Viewer-Cert-Serial-Number", "CloudFront-Viewer-JA3-Fingerprint",
    "CF-IPCountry", "CF-IPCity", "cf-region", "cf-region-code", "cf-timezone",
    "cf-postal-code", "cf-metro-code",
    # Cloudflare's managed transforms: TLS client auth, bot scores, leaked credentials
    "cf-cert-verified", "cf-cert-presented", "cf-cert-revoked", "cf-cert-subject-dn",
    "cf-cert-issuer-dn", "cf-cert-subject-dn-rfc2253", "cf-cert-serial",
    "cf-cert-fingerprint-sha256", "cf-bot-score", "cf-verified-bot", "cf-threat-score",
    "cf-ja3-hash", "cf-ja4", "cf-worker", "Exposed-Credential-Check", "Akamai-User-Risk",
    "Akamai-Origin-Hop", "x-vercel-proxy-signature", "x-vercel-ip-country",
    "x-vercel-ip-city", "x-nf-geo", "X-Akamai-Edgescape", "X-Client-Geo-Location",
    "X-Client-Region", "X-Client-City",
    # ASP.NET Core's forwarded-headers originals; Elasticsearch run-as
    "X-Original-For", "X-Original-Proto", "X-Original-Prefix", "es-security-runas-user",
]
# Names next to the new prefixes that are nobody's identity: forwarded (the control).
REVIEW6_KEPT = ["x-custom-ok", "x-originals", "x-kumquat", "smart-id", "cfip"]


def _spellings(name: str) -> list[str]:
    """Every spelling of ``name`` a reader takes for it: case, ``_`` for ``-``, and CGI's
    (behind ``HTTP_``)."""
    under = name.replace("-", "_")
    return [*variants(name.lower()), name, "HTTP_" + under.upper(), "http_" + under,
            "Http-" + name]


@pytest.mark.parametrize("name", REVIEW6_FOUND)
def test_headers_the_sixth_review_found_are_in_the_catalogue(name: str) -> None:
    assert entry_for(name) is not None and entry_for(name.replace("-", "_")) is not None, name
    for f in (HeaderFilter(), HeaderFilter(allow_underscores=True),
              HeaderFilter(allow_underscores=True, pass_through=["x-forwarded-host"])):
        for spelling in _spellings(name):
            assert f.removes(spelling.lower().encode()), spelling
    for kept in REVIEW6_KEPT:
        assert entry_for(kept) is None and not HeaderFilter().removes(kept.encode()), kept


def _send_lines(mesh: Mesh, side: str, lines: list[bytes]) -> list[dict[str, Any]]:
    """One keep-alive connection, one request per batch of raw header lines; the app's records."""
    batches = [lines[i:i + 20] for i in range(0, len(lines), 20)]
    data = b""
    for i, batch in enumerate(batches):
        last = b"Connection: close\r\n" if i == len(batches) - 1 else b""
        data += b"GET /cat HTTP/1.1\r\n" + H + b"".join(batch) + last + b"\r\n"
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, data, timeout=8.0)
    assert statuses(out) == [200] * len(batches), out[:400]
    with mesh.app.lock:
        return list(mesh.app.heads[mark[0]:])


def _forwarded_lines(name: str) -> list[bytes]:
    """``name`` in every spelling, and with values a reader trims or splits: whitespace around
    the value, a comma-joined list, twice; and percent-encoded (a name some gateway decodes)."""
    lines = [f"{s}: {MARK}\r\n".encode() for s in _spellings(name)]
    lines += [f"{name}:  \t{MARK} \t\r\n".encode(), f"{name}: a, {MARK}\r\n".encode(),
              f"{name}: {MARK}\r\n".encode(), f"{name.upper()}: {MARK}, b\r\n".encode(),
              f"{name.replace('-', '%2D')}: {MARK}\r\n".encode()]
    return lines


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("which", ["default", "underscores_and_pass_through"])
def test_sixth_review_families_never_reach_the_app(mesh: Mesh, mesh_us: Mesh, side: str,
                                                    which: str) -> None:
    m = mesh if which == "default" else mesh_us
    lines = [line for n in REVIEW6_FOUND for line in _forwarded_lines(n)]
    lines += [f"{n}: {MARK}\r\n".encode() for n in REVIEW6_KEPT]
    heads = _send_lines(m, side, lines)
    assert sorted(_leaks(heads)) == sorted((n, MARK) for n in REVIEW6_KEPT)


# Spellings no reader may take for the name: refused as a whole (a generic 400), the app sees
# nothing -- a space or tab before the colon, the line folded onto the one before, the name
# split across two lines, the value folded onto the next line, a MIME-encoded name (RFC 2047).
REFUSED_SPELLINGS = {
    "space_before_colon": lambda n: f"{n} : {MARK}\r\n",
    "tab_before_colon": lambda n: f"{n}\t: {MARK}\r\n",
    "folded_onto_previous": lambda n: f"X-Ok: a\r\n {n}: {MARK}\r\n",
    "name_split": lambda n: f"{n[:2]}\r\n{n[2:]}: {MARK}\r\n",
    "value_folded": lambda n: f"{n}: a\r\n {MARK}\r\n",
    "mime_name": lambda n: f"=?utf-8?q?{n}?=: {MARK}\r\n",
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("spelling", sorted(REFUSED_SPELLINGS))
def test_sixth_review_families_refused_spellings(mesh_us: Mesh, side: str,
                                                 spelling: str) -> None:
    mark = mesh_us.app.snapshot()
    for name in REVIEW6_FOUND:
        line = REFUSED_SPELLINGS[spelling](name).encode()
        out = exchange(mesh_us, side, b"GET /cat HTTP/1.1\r\n" + H + line
                       + b"Connection: close\r\n\r\n")
        assert_generic_refusal(out)
    with mesh_us.app.lock:
        assert _leaks(list(mesh_us.app.heads[mark[0]:])) == []


@pytest.mark.parametrize("side", SIDES)
def test_every_entry_with_trimmed_listed_or_encoded_spellings_never_reaches_the_app(
        mesh_us: Mesh, side: str) -> None:
    """Every entry (and every header the sidecar sets) with its value in whitespace, as a
    comma-joined list, twice, and with its name percent-encoded (``X%2DForwarded%2DFor``: a
    name some gateway decodes, dropped for its ``%``) -- with ``allow_underscores``."""
    lines = []
    for name in [*NAMES, *sorted(SIDECAR_SET)]:
        lines += [f"{name}:  \t{MARK} \t\r\n".encode(), f"{name}: a, {MARK}\r\n".encode(),
                  f"{name.upper()}: {MARK}, b\r\n".encode(),
                  f"{name.replace('-', '%2D')}: {MARK}\r\n".encode(),
                  f"{name.replace('-', '%2d').upper()}: {MARK}\r\n".encode()]
    heads = _send_lines(mesh_us, side, lines + [f"x-custom-ok: {MARK}\r\n".encode()])
    assert _leaks(heads) == [("x-custom-ok", MARK)]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("which", ["default", "underscores_and_pass_through"])
def test_connection_cannot_remove_what_the_sidecar_sets(mesh: Mesh, mesh_us: Mesh, side: str,
                                                       which: str) -> None:
    """``Connection`` naming the headers the sidecar sets (its own and the policy's claim
    header ``x-user``), in every spelling, as a list or in several fields, next to their
    caller-sent copies and to catalogue entries: the app gets each sidecar header once, with
    the sidecar's value, and none of the caller's."""
    m = mesh if which == "default" else mesh_us
    own = [*sorted(SIDECAR_SET), "x-user"]
    spelled = [s for n in own for s in variants(n)] + ["X-Forwarded-Host", "X-Real-IP"]
    lines = b"Connection: " + ", ".join(spelled).encode() + b"\r\n"
    lines += b"".join(f"Connection: {s}\r\n".encode() for s in spelled[:10])
    lines += b"".join(f"{n}: {MARK}\r\n".encode() for n in own)
    data = (b"GET /open/conn HTTP/1.1\r\n" + H + b"Authorization: Bearer "
            + m.token("alice").encode() + b"\r\n" + lines + b"Connection: close\r\n\r\n")
    mark = m.app.snapshot()
    out = exchange(m, side, data)
    assert statuses(out) == [200], out[:300]
    with m.app.lock:
        heads = list(m.app.heads[mark[0]:])
    assert len(heads) == 1 and _leaks(heads) == []
    got = heads[0]["headers"]
    for name in sorted(SIDECAR_SET):
        assert [n for n, _ in got].count(name) == 1, (name, got)
    assert dict(got)["x-forwarded-client-cert"].startswith("By=spiffe://"), got
    assert [v for n, v in got if n == "x-user"] == ["alice"], got  # (the token's claim)


# --- the twenty-sixth review: wrappers, and families the catalogue lacked ---------------------
# A catalogued name behind a wrapper some gateway strips (``WRAPPERS``: CGI's ``HTTP_``,
# grpc-gateway's ``Grpc-Metadata-``) is that name to whatever reads past the wrapper; before,
# only ``HTTP_`` was known, and every entry -- the sidecar's own x-forwarded-client-cert and
# the policy's claim header included -- reached the app as ``Grpc-Metadata-<entry>``.

CLAIM_HEADER = "x-user"  # the mesh's policy sets it from a verified claim


def _wrapped(name: str) -> list[str]:
    """``name`` behind every wrapper, in the wrapper's spellings (as sent: case, ``_``), and
    behind two wrappers in both orders."""
    out = []
    for w in WRAPPERS:
        for wv in variants(w.rstrip("-")):
            out += [f"{wv}-{name}", f"{wv}_{name.replace('-', '_')}"]
    out += [f"{a}{b}{name}" for a in WRAPPERS for b in WRAPPERS]
    return out


WRAPPED_TARGETS = [*NAMES, *sorted(SIDECAR_SET), CLAIM_HEADER]


@pytest.mark.parametrize("name", WRAPPED_TARGETS)
def test_every_entry_behind_every_wrapper_is_removed(name: str) -> None:
    filters = [HeaderFilter(), HeaderFilter(allow_underscores=True),
               HeaderFilter(allow_underscores=True, pass_through=["x-forwarded-host"])]
    for f in filters:
        f.set_claim_headers([CLAIM_HEADER])
        for spelling in _wrapped(name):
            assert f.removes(spelling.lower().encode("latin-1")), spelling


def test_wrappers_alone_and_wrapped_ordinary_names_are_kept() -> None:
    f = HeaderFilter()
    for w in WRAPPERS:
        for kept in ("foo", "x-custom-ok", "content-type", "accept"):
            assert not f.removes(f"{w}{kept}".encode()), (w, kept)
        assert not f.removes(w.encode())
    # grpc-gateway's own use of the prefix for ordinary metadata still works
    assert not f.removes(b"grpc-metadata-x-trace-me")


def test_wrappers_are_documented() -> None:
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    for w in WRAPPERS:
        assert f"`{w}`" in text, w


REVIEW26_FOUND = [
    # Next.js internal routing (CVE-2025-29927 and its neighbours)
    "X-Middleware-Subrequest", "X-Middleware-Invoke", "X-Invoke-Path", "X-Invoke-Query",
    "X-Invoke-Output", "X-Invoke-Status", "X-Matched-Path", "X-Now-Route-Matches",
    # tenants of Loki/Mimir/Cortex/Tempo/Pyroscope and Thanos Receive
    "X-Scope-OrgID", "THANOS-TENANT",
    # Rack::Sendfile (CVE-2025-61780) and nginx's x-accel family
    "X-Sendfile-Type", "X-Accel-Mapping", "X-Accel-Redirect",
    # Apache Camel message headers (CVE-2025-27636)
    "CamelHttpUri", "CamelHttpPath", "CamelHttpMethod", "CamelExecCommandExecutable",
    "CAmelExecCommandArgs",
    # ASP.NET Core's IIS integration; AWS API Gateway's VPC id
    "MS-ASPNETCORE-CLIENTCERT", "MS-ASPNETCORE-TOKEN", "x-amzn-vpc-id",
]
REVIEW26_KEPT = ["x-middle", "x-invoker", "x-scope", "x-accelerate", "camera"]


@pytest.mark.parametrize("name", REVIEW26_FOUND)
def test_headers_the_twenty_sixth_review_found_are_in_the_catalogue(name: str) -> None:
    assert entry_for(name) is not None, name
    for f in (HeaderFilter(), HeaderFilter(allow_underscores=True)):
        for spelling in [*_spellings(name), *_wrapped(name)]:
            assert f.removes(spelling.lower().encode()), spelling
    for kept in REVIEW26_KEPT:
        assert entry_for(kept) is None and not HeaderFilter().removes(kept.encode()), kept


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("which", ["default", "underscores_and_pass_through"])
def test_wrapped_entries_never_reach_the_app(mesh: Mesh, mesh_us: Mesh, side: str,
                                             which: str) -> None:
    """Every entry, every header the sidecar sets and the claim header, behind each wrapper
    (as grpc-gateway and CGI spell it), and the review's new names in all their spellings:
    none reaches the app; wrapped ordinary names and the controls do."""
    m = mesh if which == "default" else mesh_us
    lines = []
    for name in WRAPPED_TARGETS:
        lines += [f"Grpc-Metadata-{name}: {MARK}\r\n".encode(),
                  f"grpc-metadata-http-{name}: {MARK}\r\n".encode()]
        if which != "default":  # (names with "_" are dropped whole by default)
            lines.append(f"HTTP_{name.replace('-', '_').upper()}: {MARK}\r\n".encode())
    lines += [line for n in REVIEW26_FOUND for line in _forwarded_lines(n)]
    kept = ["Grpc-Metadata-X-Trace-Me", *REVIEW26_KEPT]
    lines += [f"{n}: {MARK}\r\n".encode() for n in kept]
    heads = _send_lines(m, side, lines)
    assert sorted(_leaks(heads)) == sorted((n.lower(), MARK) for n in kept)
