"""A token cookie hidden inside another cookie's piece of the Cookie header (hostile review).

``Cookie: session=GOOD; a=x session=EVIL``: the sidecar split the header at ``;`` only
(RFC 6265), saw one ``session`` cookie (GOOD, verified, accepted) and one ``a`` cookie whose
value was ``x session=EVIL``. Python's ``http.cookies.SimpleCookie`` -- the cookie reader of
aiohttp, Bottle and CherryPy -- ends a value at whitespace and reads ``session=EVIL`` as a
further cookie, the last one winning: the app got EVIL under GOOD's authorisation. Alone
(``a=x session=EVIL``) the token reached such an app unverified on every token-free route,
and with ``forward_token: false`` a hidden copy was not removed. RFC 2965 readers split at
``,`` as well.

Now a name=value set off by whitespace or ``,`` inside a piece counts as a cookie (a quoted
value is one value, as to every reader): a second copy is ``multiple_tokens``, a hidden one
alone is the provider's token (verified, and removed when not forwarded).

The family as data: separators x names that fold to the provider's cookie x position (next
to a valid cookie, alone), in process for every member, and through a real sidecar whose
provider takes its keys from a real JWKS endpoint (the local authorisation server,
``tests/idp.py``) for every member on a token-free route and on the provider's route.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
import yaml

from sidecar.authn.extract import extract_tokens, remove_token
from sidecar.authn.jwt import MULTIPLE_TOKENS, TokenInvalid
from sidecar.policy.sections import TokenLocation
from tests.harness import (
    Pki,
    Response,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
)
from tests.idp import IdpProc
from tests.test_authn_support import provider

pytestmark = pytest.mark.usefixtures("no_internal_errors")

BEARER_INVALID = 'Bearer realm="sidecar", error="invalid_token"'

# What sets a cookie off inside another cookie's piece, to some reader; {v} is the hidden
# cookie's name=value. SimpleCookie reads every member whose separator is whitespace.
SEPARATORS = {
    "space": "a=x {v}",
    "tab": "a=x\t{v}",
    "spaces": "a=x   {v}",
    "after_quoted": 'a="x y" {v}',
    "spaces_around_equals": "a=x {name} = {value}",
    "comma": "a=x,{v}",
    "comma_space": "a=x, {v}",
    "bare_word": "a=x flag {v}",
}
# Spellings of the provider's cookie name (``session``) that a reader takes for it.
NAMES = {"plain": "session", "upper": "SESSION", "array": "session[]",
         "dot_folds": "ses.sion", "encoded": "sess%69on"}
# (``ses.sion`` reads as ``ses_sion``: not the provider's; kept as a control below.)
NOT_THE_NAME = {"dot_folds"}


def hidden(separator: str, name: str, value: str) -> str:
    return SEPARATORS[separator].format(v=f"{name}={value}", name=name, value=value)


def members() -> list[tuple[str, str]]:
    return [(s, n) for s in SEPARATORS for n in NAMES if n not in NOT_THE_NAME]


def cookies(good: str | None, separator: str, name: str, evil: str) -> str:
    inner = hidden(separator, NAMES[name], evil)
    return f"session={good}; {inner}" if good is not None else inner


# ----------------------------------------------------------------------------- in process

LOCATION = TokenLocation("cookie", "session")


@pytest.mark.parametrize("separator, name", members())
def test_a_hidden_second_copy_is_two_tokens(separator: str, name: str) -> None:
    p = provider(locations=(LOCATION,))
    header = cookies("GOOD", separator, name, "EVIL")
    with pytest.raises(TokenInvalid) as info:
        extract_tokens(p, [(b"cookie", header.encode())], "")
    assert info.value.reason == MULTIPLE_TOKENS


@pytest.mark.parametrize("separator, name", members())
def test_a_hidden_copy_alone_is_the_token_and_is_removed(separator: str, name: str) -> None:
    p = provider(locations=(LOCATION,))
    header = cookies(None, separator, name, "EVIL")
    found = extract_tokens(p, [(b"cookie", header.encode())], "")
    assert found is not None and found.token == "EVIL"
    headers, _ = remove_token([(b"cookie", f"{header}; theme=dark".encode())], "",
                              (LOCATION,))
    assert headers == [(b"cookie", b"theme=dark")]


def test_the_family_is_what_simplecookie_reads() -> None:
    """The whitespace members are what the stdlib reader reads as a second cookie (the
    comma members are RFC 2965 readers'; over-reading only refuses more)."""
    for separator in SEPARATORS:
        if "comma" in separator or separator == "bare_word":
            continue
        jar: SimpleCookie = SimpleCookie()
        jar.load(cookies("GOOD", separator, "plain", "EVIL"))
        assert jar["session"].value == "EVIL", separator


@pytest.mark.parametrize("header", [
    "session=GOOD; a=b",
    'session=GOOD; a="x session=EVIL"',  # quoted: one value to every reader
    "session=GOOD; a=x ses.sion=EVIL",  # another name (ses_sion)
    'session="GOOD"; prefs="a,b c"',
])
def test_controls_are_one_token(header: str) -> None:
    found = extract_tokens(provider(locations=(LOCATION,)), [(b"cookie", header.encode())], "")
    assert found is not None and found.token == "GOOD"


# ----------------------------------------------------------------------------- end to end


@dataclass
class Env:
    idp: IdpProc
    sidecar: SidecarProc
    app_port: int
    ctx: ssl.SSLContext
    frontend: Path

    def get(self, path: str, cookie: str) -> Response:
        return http(self.sidecar.port("inbound"), "GET", path,
                    headers=[("cookie", cookie)], ctx=self.ctx)

    def app_requests(self) -> int:
        return int(http(self.app_port, "GET", "/stats").json()["requests"])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("cookie-inner")
    pki = Pki(tmp / "pki")
    frontend = pki.identity("frontend")
    with contextlib.ExitStack() as stack:
        idp = IdpProc(tmp / "idp", client_ca=pki.bundle, mtls_clients=("frontend",))
        stack.callback(idp.stop)
        app, app_port = start_app(tmp)
        stack.callback(app.stop, timeout=10)

        def provider_doc(**extra: object) -> dict[str, object]:
            return {"issuer": idp.issuer, "audiences": ["orders"], "algorithms": ["ES256"],
                    "discovery": True, "jwks_ca": idp.ca, "jwks_refresh": "1h",
                    "typ": "at+jwt", **extra}

        front = spiffe("frontend")
        policy = {"version": 1, "trust_domain": "demo.local", "jwt_providers": {
            "idp": provider_doc(from_cookies=["session"]),
            "stripped": provider_doc(from_cookies=["sid"], forward_token=False),
        }, "services": {spiffe("orders"): {"rules": [
            {"name": "open", "allow": {"from": [front], "paths": ["/open/**"]}},
            {"name": "mine", "allow": {"from": [front], "paths": ["/mine/**"],
                                       "jwt": {"provider": "idp"}}},
            {"name": "strip", "allow": {"from": [front], "paths": ["/strip/**"],
                                        "jwt": {"provider": "stripped"}}},
        ]}}}
        policy_path = tmp / "mesh.yaml"
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(policy_path))
        ctx = mtls_context(frontend, pki.bundle)
        sidecar = start_sidecar(tmp, "orders", cfg)
        stack.callback(sidecar.stop, timeout=10)
        yield Env(idp, sidecar, app_port, ctx, frontend)


def forged(token: str) -> str:
    """``token`` with another payload (the IdP's signature no longer holds)."""
    header, _, signature = token.split(".")
    return f"{header}.eyJzdWIiOiJtYWxsb3J5In0.{signature}"


def assert_refused(env: Env, path: str, cookie: str) -> None:
    before = env.app_requests()
    r = env.get(path, cookie)
    assert r.status == 401, (path, cookie, r.status, r.body[:200])
    assert r.headers.get("www-authenticate") == BEARER_INVALID
    assert b"multiple" not in r.body.lower() and b"signature" not in r.body.lower()
    assert env.app_requests() == before + 1  # the app never saw it


def test_a_hidden_token_never_reaches_the_app(env: Env) -> None:
    good = env.idp.token(identity=env.frontend)
    evil = forged(good)
    assert env.get("/mine/1", f"session={good}; theme=dark").status == 200
    for separator, name in members():
        for path in ("/open/1", "/mine/1"):
            # Next to the valid cookie: two tokens (the app would read the second).
            assert_refused(env, path, cookies(good, separator, name, evil))
            # Alone: the provider's token, forged, refused (it reached the app before).
            assert_refused(env, path, cookies(None, separator, name, evil))
        # A valid token hidden alone is the token: accepted.
        assert env.get("/mine/1", cookies(None, separator, name, good)).status == 200
    # Controls: a quoted value is one cookie; ses.sion is another name.
    for cookie in (f'session={good}; a="x session={evil}"', f"session={good}; a=x ses.sion=1"):
        assert env.get("/mine/1", cookie).status == 200, cookie


def test_a_hidden_token_is_removed_when_not_forwarded(env: Env) -> None:
    good = env.idp.token(identity=env.frontend)
    for separator in SEPARATORS:
        cookie = f"theme=dark; {hidden(separator, 'sid', good)}"
        r = env.get("/strip/1", cookie)
        assert r.status == 200, (separator, r.status, r.body[:200])
        sent = json.dumps(r.json()["headers"])
        assert good not in sent and "theme=dark" in sent, (separator, sent)
