"""Tokens in RFC 6750 places no provider reads, found by a hostile review.

A provider with the default location reads only ``Authorization: Bearer``. A token in
``?access_token=`` (RFC 6750 2.3), or in ``Authorization`` under another scheme, passed
through unverified -- on every route, also next to a valid header token -- so an app or a
framework that reads those places got a credential the sidecar never checked. Now, in a
section whose rules name providers, such a token counts: alone it is refused
(``unread_location``, 401 ``token_invalid``), next to a provider's own token it is a second
token (``multiple_tokens``) unless it is the same one. Basic credentials and a provider
that reads the place itself are left as they were.

The family as data, through a real sidecar: every query spelling the extractor folds to
``access_token`` (PHP and ASP.NET readers), every token-carrying Authorization scheme, on a
route with a token rule and on a token-free one, alone and next to a valid header token.
"""

from __future__ import annotations

import http.client as httpclient
import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import ec_key, jwk, mint

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://users.example/"
FRONTEND = h.spiffe("frontend")
INVALID = 'Bearer realm="sidecar", error="invalid_token"'

# Query spellings a common reader takes for ``access_token`` (extract.param_name): as
# written, PHP's folding (``.``, space, ``[``, a NUL cut, ``[]`` arrays), ASP.NET's case,
# percent-encoded, ``;`` as a separator.
QUERY_SPELLINGS = (
    "access_token={t}", "ACCESS_TOKEN={t}", "Access_Token={t}", "access.token={t}",
    "access+token={t}", "access%20token={t}", "access[token={t}", "access_token[]={t}",
    "access_token%00junk={t}", "access%5Ftoken={t}", "%61ccess_token={t}",
    "a=1;access_token={t}", "a=1&access_token={t}&b=2",
)
# Authorization values carrying a token the provider (``Bearer``) does not read.
AUTHORIZATION_FORMS = (
    "DPoP {t}", "dpop {t}", "JWT {t}", "Token {t}", "token {t}", "Custom {t}", "{t}",
    "DPoP\t{t}",
    # set off by what an app splitting on any whitespace or a comma also takes for a
    # separator (a review of the fix found these passed)
    "DPoP\xa0{t}", "JWT\xa0{t}", "Token,{t}", "Token, {t}", "Custom\xa0{t}",
)
# Schemes that carry a token whatever its shape (an opaque DPoP or ``Token`` credential).
OPAQUE_FORMS = ("DPoP {o}", "dpop {o}", "JWT {o}", "Token {o}", "TOKEN {o}")
OPAQUE = "opaque-2YotnFZFEjr1zCsicMWpAA"
# Routes of the section: one whose rule needs the provider, one without a token rule.
ROUTES = ("/orders/x", "/public/x")


def _token(key: str = "places", sub: str = "alice") -> str:
    now = int(time.time())
    return mint({"iss": ISS, "aud": "orders", "sub": sub, "jti": uuid.uuid4().hex,
                 "iat": now - 5, "exp": now + 600}, ec_key(key), kid="k1")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    policy = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {"users": {"issuer": ISS, "audiences": ["orders"],
                                    "algorithms": ["ES256"], "jwks_file": "keys.json"}},
        "services": {h.spiffe("orders"): {"rules": [
            {"name": "orders", "allow": {"from": [FRONTEND], "paths": ["/orders/**"],
                                         "jwt": {"provider": "users"}}},
            {"name": "public", "allow": {"from": [FRONTEND], "paths": ["/public/**"]}},
        ]}},
    }
    keys = json.dumps({"keys": [jwk(ec_key("places"), "k1")]})
    with orders_mesh(tmp_path_factory.mktemp("rfc6750-places"), policy,
                     {"keys.json": keys}) as mesh:
        yield mesh


def _refused(r: h.Response) -> None:
    assert r.status == 401, r.body[:300]
    assert r.headers.get("www-authenticate") == INVALID


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("spelling", QUERY_SPELLINGS)
def test_a_query_token_alone_is_refused(env: OrdersMesh, spelling: str, route: str) -> None:
    forged = _token("places-forger")
    _refused(env.get(f"{route}?{spelling.format(t=forged)}"))
    # A valid token of the provider too: no provider reads the place, so it is not accepted.
    _refused(env.get(f"{route}?{spelling.format(t=_token())}"))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("spelling", QUERY_SPELLINGS)
def test_a_query_token_next_to_a_valid_header_token_is_a_second_token(
        env: OrdersMesh, spelling: str, route: str) -> None:
    good, forged = _token(), _token("places-forger")
    _refused(env.get(f"{route}?{spelling.format(t=forged)}",
                     {"authorization": f"Bearer {good}"}))
    # The same token in both places is one token.
    r = env.get(f"{route}?{spelling.format(t=good)}", {"authorization": f"Bearer {good}"})
    assert r.status == 200, r.body[:300]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("form", AUTHORIZATION_FORMS)
def test_a_token_under_another_authorization_scheme_is_refused(
        env: OrdersMesh, form: str, route: str) -> None:
    _refused(env.get(route, {"authorization": form.format(t=_token("places-forger"))}))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("form", OPAQUE_FORMS)
def test_an_opaque_token_under_a_token_scheme_is_refused(
        env: OrdersMesh, form: str, route: str) -> None:
    _refused(env.get(route, {"authorization": form.format(o=OPAQUE)}))


@pytest.mark.parametrize("spelling", QUERY_SPELLINGS[:3])
def test_a_kept_alive_connection_is_judged_again_with_a_query_token(
        env: OrdersMesh, spelling: str) -> None:
    """The connection's memo of a verified header token does not answer a request whose
    query now holds another token."""
    good = {"authorization": f"Bearer {_token()}"}
    conn = httpclient.HTTPSConnection("127.0.0.1", env.sidecar.port("inbound"),
                                      context=env.ctx, timeout=10)
    try:
        for _ in range(3):
            assert h.http(env.sidecar.port("inbound"), "GET", "/public/x", headers=good,
                          ctx=env.ctx, conn=conn).status == 200
        _refused(h.http(env.sidecar.port("inbound"), "GET",
                        f"/public/x?{spelling.format(t=_token('places-forger'))}",
                        headers=good, ctx=env.ctx, conn=conn))
    finally:
        conn.close()


def test_basic_credentials_and_plain_queries_pass(env: OrdersMesh) -> None:
    r = env.get("/public/x?page=2&accessible=1", {"authorization": "Basic dXNlcjpwYXNz"})
    assert r.status == 200, r.body[:300]
    assert ["authorization", "Basic dXNlcjpwYXNz"] in r.json()["headers"]
    assert env.get("/orders/x?page=2", {"authorization": f"Bearer {_token()}"}).status == 200
    # An unknown scheme with a credential that is not a JWT is not a token.
    assert env.get("/public/x", {"authorization": f"Custom {OPAQUE}"}).status == 200
