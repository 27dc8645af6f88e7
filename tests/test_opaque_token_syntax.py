"""Opaque tokens that are not bearer tokens are refused without asking the authorisation server.

A token of an introspection provider must have RFC 6750 2.1's ``b64token`` syntax (letters,
digits, ``-._~+/``, then optional trailing ``=``) before the sidecar sends it to the
introspection endpoint (``sidecar.authn.oauth.opaque_token_ok``); anything else is
``malformed`` on every route, like a JWT that does not parse. Before, any string was sent
to the endpoint: a caller could make the sidecar post arbitrary bytes to the authorisation
server, one call per distinct string.

The family below is data: every printable ASCII character outside the syntax, every control
character, non-ASCII characters (Latin-1, a case-folding sign, a line separator, full-width,
astral) placed inside an otherwise good token, and ``=`` anywhere but at the end. Every
member is tested in every place a token is read (header, query parameter, cookie) in
process, where the introspector's call counter shows no call was made; a slice of each
place goes through a real sidecar in tests/test_oauth_e2e.py.
"""

from __future__ import annotations

import string
from pathlib import Path
from urllib.parse import quote

import pytest
import trio

from sidecar.authn.authenticator import Authenticator
from sidecar.authn.extract import extract_tokens
from sidecar.authn.oauth import opaque_token_ok, token_digest
from sidecar.introspect import Introspector
from sidecar.policy.sections import Introspection, PolicyExtras, TokenLocation
from tests.harness import free_port
from tests.test_authn_support import NOW, provider

B64TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~+/")
# Inside a token: every character but the allowed ones (and '=', which has its own members).
OUT_OF_SYNTAX = [c for c in map(chr, range(0x20, 0x7F)) if c not in B64TOKEN_CHARS | {"="}]
CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f"]
NON_ASCII = ["\x80", "\xa0", "\xe9", "\xff", "\u0130", "\u212a", "\u2028", "\uff21",
             "\U0001f600"]
MEMBERS: dict[str, str] = {f"U+{ord(c):04X} inside": f"opq_ab{c}cd"
                           for c in OUT_OF_SYNTAX + CONTROLS + NON_ASCII}
MEMBERS.update({
    "= first": "=opq_abcd", "= inside": "opq_ab=cd", "= only": "=", "== only": "==",
    "= then letters": "opq_abcd==x",
})
# Good tokens: every allowed character, padding at the end, one character.
VALID = {"every allowed character": "opq_" + "".join(sorted(B64TOKEN_CHARS)),
         "padded": "opq_abcd==", "one character": "a", "plus and slash": "+/+/==",
         "demo idp's form": "opq_Zm9vYmFy-_Zm9v"}

PLACES = ("header", "query", "cookie")
# A ';' ends a cookie value: the cookie reads 'opq_ab', a good token that is not this member.
NOT_IN_PLACE = {("cookie", "U+003B inside")}


def test_the_family_covers_every_character_outside_the_syntax() -> None:
    for code in range(0x80):
        c = chr(code)
        assert (c in B64TOKEN_CHARS or c == "=" or f"U+{code:04X} inside" in MEMBERS), c
    assert all(not opaque_token_ok(t) for t in MEMBERS.values())
    assert all(opaque_token_ok(t) for t in VALID.values())


def _setup(tmp_path: Path) -> tuple[Authenticator, Introspector]:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    # Nothing listens on the endpoint: a call fails at once (and is counted).
    spec = Introspection(endpoint=f"https://127.0.0.1:{free_port()}/introspect",
                         client_id="c", client_secret_file=str(secret), timeout_seconds=2.0)
    prov = provider(introspection=spec, algorithms=(), jwks_file=None, locations=(
        TokenLocation("header", "authorization", "Bearer "),
        TokenLocation("query", "access_token"), TokenLocation("cookie", "session")))
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": prov}))
    return auth, Introspector(auth)


def _request(place: str, token: str) -> tuple[list[tuple[bytes, bytes]], str]:
    """(headers, query) carrying ``token`` in ``place`` (header bytes as a client sends them:
    Latin-1 where it fits, UTF-8 otherwise)."""
    def raw(text: str) -> bytes:
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            return text.encode("utf-8")
    if place == "header":
        return [(b"authorization", raw("Bearer " + token))], ""
    if place == "query":
        return [], "access_token=" + quote(token, safe="")
    return [(b"cookie", raw("session=" + token))], ""


def _judge(tmp_path: Path, place: str, token: str) -> tuple[str | None, int]:
    """(the token's refusal reason or None, introspection calls made) for one request."""
    auth, introspector = _setup(tmp_path)
    headers, query = _request(place, token)

    async def prepare() -> None:
        await introspector.prepare(["corp"], headers, query)

    trio.run(prepare)
    facts = auth.authenticate(["corp"], headers, query, NOW)
    return facts.token_errors.get("corp"), introspector.calls


CASES = [pytest.param(place, token, id=f"{place}-{name}")
         for name, token in MEMBERS.items() for place in PLACES
         if (place, name) not in NOT_IN_PLACE]


@pytest.mark.parametrize("place, token", CASES)
def test_a_token_outside_the_syntax_is_malformed_and_never_sent(
        tmp_path: Path, place: str, token: str) -> None:
    found = extract_tokens(_setup(tmp_path)[0].provider("corp"), *_request(place, token))
    assert found is not None and not opaque_token_ok(found.token)
    reason, calls = _judge(tmp_path, place, token)
    assert (reason, calls) == ("malformed", 0)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("token", list(VALID.values()), ids=list(VALID))
def test_a_bearer_token_is_still_sent(tmp_path: Path, place: str, token: str) -> None:
    # The endpoint is down: one call, which fails (fail closed), for every good token.
    reason, calls = _judge(tmp_path, place, token)
    assert (reason, calls) == ("introspection_unavailable", 1)


def test_a_malformed_token_is_refused_even_where_no_rule_asks() -> None:
    """Without a cached answer a good token is not judged where no rule needs it (no call is
    made there); a malformed one is refused there too, like a JWT that does not parse."""
    spec = Introspection(endpoint="https://127.0.0.1:9/introspect", client_id="c", mtls=True)
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": provider(
        introspection=spec, algorithms=(), jwks_file=None)}))
    good = auth.authenticate(["corp"], [(b"authorization", b"Bearer opq_1")], "", NOW)
    assert good.token_errors == {} and not good.claims
    bad = auth.authenticate(["corp"], [(b"authorization", b"Bearer opq,1")], "", NOW)
    assert bad.token_errors == {"corp": "malformed"}
    # ... and nothing about it is cached.
    assert auth.introspected.lookup("corp", token_digest("opq,1"), NOW) is None
