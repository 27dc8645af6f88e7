"""Tokens, hostile review round 2: the spellings of one credential that were accepted.

Found by a hostile review, each fixed as a family:

* non-canonical base64url: a segment whose last digit has its unused bits set decodes to
  the same bytes as the canonical one, so ``...Q`` and ``...R`` were one signature and the
  token had several spellings (each verified anew, each a decision-cache key of its own,
  each passed to the app as "the verified token");
* header members that change what the signed bytes mean and were read as absent: RFC 7797
  ``b64`` (without ``crit``), ``zip`` and ``enc`` (JWE only), ``cty: JWT`` (a nested token whose inner
  claims nothing verifies), and a ``typ`` / ``cty`` that is not a string;
* whitespace that is not HTTP whitespace: ``str.strip()`` dropped NBSP (0xA0), NEL (0x85)
  and 0x1C-0x1F around a token or an API key, so ``<token>\\xa0`` was verified as
  ``<token>`` (and the app got the header with the byte in it) and ``<key>\\xa0`` counted as
  the key;
* ``Bearer`` followed by something other than a space (a tab, NBSP, a comma): "no token"
  (an app splitting on any whitespace reads one), now a malformed token (``token_invalid``,
  ``error="invalid_token"``);
* JSON nesting was bounded only by the interpreter's recursion limit, which depends on the
  caller's stack: a signed token nested 900 levels verified, one nested 990 did not; now
  at most 32 levels (the control plane's reader, as for introspection answers);
* a cached verification outlived a key set change that only re-pinned a key's ``alg`` or
  added a key that makes a token without ``kid`` ambiguous: warm it passed, cold it was
  refused.

Each member is checked in the pure core and through a real sidecar, as the first request of
a connection with a token never seen before (verification cache cold) and as the tenth, after
nine requests with a valid token on that connection (cache and connection memo warm).
"""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jwt.algorithms import ECAlgorithm

from sidecar.authn.apikeys import ApiKeyTable, presented_key
from sidecar.authn.extract import extract_tokens
from sidecar.authn.jwt import BAD_HEADER, MALFORMED, TokenInvalid, verify_token
from sidecar.policy.sections import ApiKey, TokenLocation
from tests.harness import Pki, Response, http, replace_file, start_app, wait_for
from tests.test_authn_support import (
    AUDIENCE,
    COOKIE_LOCATION,
    ISSUER,
    NOW,
    b64,
    ec_key,
    jwk,
    jwks_bytes,
    key_set,
    provider,
    rsa_key,
)
from tests.test_jwt_e2e import (
    BEARER_INVALID,
    REASON_WORDS,
    Node,
    _file_node,
    apikey_new,
    jwt_rule,
    policy_doc,
    provider_doc,
    sign,
    spiffe,
    start_node,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_UNUSED = {2: (0x1, 0x2, 0x4, 0x8), 3: (0x1, 0x2)}  # unused bits of the last digit


# ----------------------------------------------------------------------------- tokens


def _claims(now: float, **extra: Any) -> dict[str, Any]:
    out = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "orders:read",
           "jti": uuid.uuid4().hex, "iat": int(now) - 5, "exp": int(now) + 600}
    out.update(extra)
    return out


def _signed(header_seg: str, payload_seg: str, key_label: str) -> str:
    """ES256 over the exact segment text (a non-canonical one included)."""
    signing_input = f"{header_seg}.{payload_seg}"
    sig = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), ec_key(key_label))
    return f"{signing_input}.{b64(sig)}"


def _json_seg(value: dict[str, Any], rest: int) -> str:
    """``value`` as JSON padded with spaces so its base64url has ``rest`` (2 or 3) digits
    past a multiple of four (only then are there unused bits)."""
    text = json.dumps(value)
    while len(b64(text.encode())) % 4 != rest:
        text += " "
    return b64(text.encode())


def _bits_set(segment: str, bit: int) -> str:
    return segment[:-1] + _ALPHABET[_ALPHABET.index(segment[-1]) | bit]


def _header(**extra: Any) -> dict[str, Any]:
    return {"alg": "ES256", "kid": "ec-1", **extra}


def _token(now: float, key_label: str, header: dict[str, Any] | None = None) -> str:
    return _signed(b64(json.dumps(header or _header()).encode()),
                   b64(json.dumps(_claims(now)).encode()), key_label)


TokenMaker = Callable[[float, str], str]  # (now, key label) -> a token that must be refused


def _noncanonical_signature(bit: int) -> TokenMaker:
    def make(now: float, label: str) -> str:
        token = _token(now, label)
        h, p, s = token.split(".")
        assert len(s) % 4 == 2  # ES256: 64 bytes, 86 digits
        return f"{h}.{p}.{_bits_set(s, bit)}"
    return make


def _noncanonical_header(rest: int, bit: int) -> TokenMaker:
    def make(now: float, label: str) -> str:
        seg = _bits_set(_json_seg(_header(), rest), bit)
        return _signed(seg, b64(json.dumps(_claims(now)).encode()), label)
    return make


def _noncanonical_payload(rest: int, bit: int) -> TokenMaker:
    def make(now: float, label: str) -> str:
        seg = _bits_set(_json_seg(_claims(now), rest), bit)
        return _signed(b64(json.dumps(_header()).encode()), seg, label)
    return make


def _with_header(**extra: Any) -> TokenMaker:
    def make(now: float, label: str) -> str:
        return _token(now, label, _header(**extra))
    return make


def _nested(where: str, depth: int) -> TokenMaker:
    """A correctly signed token whose header or payload nests ``depth`` levels (the object
    itself is level 1, each bracket of the member ``x`` one more)."""
    def make(now: float, label: str) -> str:
        deep = "[" * (depth - 1) + "]" * (depth - 1)
        header, payload = json.dumps(_header()), json.dumps(_claims(now))
        if where == "header":
            header = header[:-1] + f', "x": {deep}}}'
        else:
            payload = payload[:-1] + f', "x": {deep}}}'
        return _signed(b64(header.encode()), b64(payload.encode()), label)
    return make


NESTED: list[tuple[str, TokenMaker]] = [
    (f"{where}-depth{depth}", _nested(where, depth))
    for where in ("header", "payload") for depth in (33, 100, 500, 900, 990)]
NESTED_CONTROLS: list[tuple[str, TokenMaker]] = [
    (f"{where}-depth{depth}", _nested(where, depth))
    for where in ("header", "payload") for depth in (2, 32)]

NONCANONICAL: list[tuple[str, TokenMaker]] = (
    [(f"signature-bit{bit}", _noncanonical_signature(bit)) for bit in _UNUSED[2]]
    + [(f"header-rest{rest}-bit{bit}", _noncanonical_header(rest, bit))
       for rest, bits in _UNUSED.items() for bit in bits]
    + [(f"payload-rest{rest}-bit{bit}", _noncanonical_payload(rest, bit))
       for rest, bits in _UNUSED.items() for bit in bits]
)
HEADER_MEMBERS: list[tuple[str, TokenMaker]] = [
    ("b64-false", _with_header(b64=False)),
    ("b64-true", _with_header(b64=True)),
    ("zip-DEF", _with_header(zip="DEF")),
    ("zip-empty", _with_header(zip="")),
    ("enc-A256GCM", _with_header(enc="A256GCM")),
    ("enc-empty", _with_header(enc="")),
    ("enc-null", _with_header(enc=None)),
    ("cty-JWT", _with_header(cty="JWT")),
    ("cty-jwt", _with_header(cty="jwt")),
    ("cty-application/jwt", _with_header(cty="application/jwt")),
    ("cty-Application/JWT", _with_header(cty="Application/JWT")),
    ("typ-number", _with_header(typ=5)),
    ("typ-null", _with_header(typ=None)),
    ("typ-list", _with_header(typ=["JWT"])),
    ("typ-object", _with_header(typ={})),
    ("typ-true", _with_header(typ=True)),
    ("cty-number", _with_header(cty=1)),
    ("cty-null", _with_header(cty=None)),
]
HEADER_CONTROLS: list[tuple[str, TokenMaker]] = [
    ("typ-JWT", _with_header(typ="JWT")),
    ("typ-at+jwt", _with_header(typ="at+jwt")),
    ("cty-json", _with_header(cty="json")),
]

# How the token sits in the Authorization value: spellings that are not "Bearer <token>"
# with optional whitespace (SP, HTAB) only.
SEPARATORS = ["\t", "\t ", "\xa0", "\x85", ",", ":", "=", "\x1c", "\x1f"]
NON_OWS = ["\xa0", "\x85", "\x1c", "\x1d", "\x1e", "\x1f"]
AUTH_MEMBERS: list[tuple[str, Callable[[str], str]]] = (
    [(f"{scheme}{sep!r}", lambda t, s=sep, sc=scheme: f"{sc}{s}{t}")
     for scheme in ("Bearer", "bearer", "BEARER") for sep in SEPARATORS]
    + [(f"after{ch!r}", lambda t, c=ch: f"Bearer {t}{c}") for ch in NON_OWS]
    + [(f"before{ch!r}", lambda t, c=ch: f"{c}Bearer {t}") for ch in NON_OWS]
    + [(f"between{ch!r}", lambda t, c=ch: f"Bearer {c}{t}") for ch in NON_OWS]
)
AUTH_CONTROLS: list[tuple[str, Callable[[str], str]]] = [
    ("two-spaces", lambda t: f"Bearer  {t}"),
    ("space-tab", lambda t: f"Bearer \t{t}"),
    ("lower", lambda t: f"bearer {t}"),
    ("upper", lambda t: f"BEARER {t}"),
    ("trailing-tab", lambda t: f"Bearer {t}\t"),
]
# On the wire only what the request reader lets through (obs-text; no other controls).
WIRE = ("\t", "\xa0", "\x85", ",", ":", "=", " ")


def _on_wire(text: str) -> bool:
    return all(ch.isprintable() or ch in WIRE for ch in text)


# ----------------------------------------------------------------------------- pure core

KEYS = key_set((ec_key(), "ec-1"))
CORP = provider()


def _reason(token: str) -> str:
    with pytest.raises(TokenInvalid) as info:
        verify_token(token, CORP, KEYS, NOW)
    return info.value.reason


@pytest.mark.parametrize(("label", "make"), NONCANONICAL, ids=[m[0] for m in NONCANONICAL])
def test_noncanonical_base64url_is_malformed(label: str, make: TokenMaker) -> None:
    assert _reason(make(NOW, "ec-1")) == MALFORMED


@pytest.mark.parametrize(("label", "make"), NESTED, ids=[m[0] for m in NESTED])
def test_json_nested_deeper_than_32_levels_is_malformed(label: str, make: TokenMaker) -> None:
    assert _reason(make(NOW, "ec-1")) == MALFORMED


@pytest.mark.parametrize(("label", "make"), NESTED_CONTROLS,
                         ids=[m[0] for m in NESTED_CONTROLS])
def test_json_nested_up_to_32_levels_verifies(label: str, make: TokenMaker) -> None:
    assert verify_token(make(NOW, "ec-1"), CORP, KEYS, NOW)["sub"] == "alice"


@pytest.mark.parametrize("rest", [2, 3])
def test_canonical_segments_of_every_length_verify(rest: int) -> None:
    token = _signed(_json_seg(_header(), rest), _json_seg(_claims(NOW), rest), "ec-1")
    assert verify_token(token, CORP, KEYS, NOW)["sub"] == "alice"


@pytest.mark.parametrize(("label", "make"), HEADER_MEMBERS, ids=[m[0] for m in HEADER_MEMBERS])
def test_header_members_this_verifier_does_not_implement_are_refused(
        label: str, make: TokenMaker) -> None:
    assert _reason(make(NOW, "ec-1")) == BAD_HEADER


@pytest.mark.parametrize(("label", "make"), HEADER_CONTROLS,
                         ids=[m[0] for m in HEADER_CONTROLS])
def test_ordinary_header_members_still_verify(label: str, make: TokenMaker) -> None:
    assert verify_token(make(NOW, "ec-1"), CORP, KEYS, NOW)["sub"] == "alice"


@pytest.mark.parametrize(("label", "spell"), AUTH_MEMBERS, ids=[m[0] for m in AUTH_MEMBERS])
def test_authorization_spellings_are_never_the_bare_token(
        label: str, spell: Callable[[str], str]) -> None:
    token = _token(NOW, "ec-1")
    headers = [(b"authorization", spell(token).encode("latin-1"))]
    try:
        found = extract_tokens(CORP, headers, "")
    except TokenInvalid as exc:
        assert exc.reason == MALFORMED
        return
    # Found, then it is the value with the foreign byte in it, which never verifies.
    assert found is not None and found.token != token, label
    assert _reason(found.token) == MALFORMED


@pytest.mark.parametrize(("label", "spell"), AUTH_CONTROLS, ids=[m[0] for m in AUTH_CONTROLS])
def test_authorization_spellings_with_optional_whitespace_are_the_token(
        label: str, spell: Callable[[str], str]) -> None:
    token = _token(NOW, "ec-1")
    found = extract_tokens(CORP, [(b"authorization", spell(token).encode())], "")
    assert found is not None and found.token == token


@pytest.mark.parametrize("ch", NON_OWS)
def test_other_locations_keep_foreign_whitespace_in_the_token(ch: str) -> None:
    # A header without prefix (x-token) and a cookie: the byte stays part of the token.
    token = _token(NOW, "ec-1")
    header_only = provider(locations=(TokenLocation("header", "x-token", ""),))
    cookie_only = provider(locations=(COOKIE_LOCATION,))
    for prov, headers in (
            (header_only, [(b"x-token", f"{token}{ch}".encode("latin-1"))]),
            (header_only, [(b"x-token", f"{ch}{token}".encode("latin-1"))]),
            (cookie_only, [(b"cookie", f"a=1; session={token}{ch}".encode("latin-1"))]),
            (cookie_only, [(b"cookie", f"session={ch}{token}; a=1".encode("latin-1"))])):
        found = extract_tokens(prov, headers, "")
        assert found is not None and found.token != token
        with pytest.raises(TokenInvalid) as info:
            verify_token(found.token, prov, KEYS, NOW)
        assert info.value.reason == MALFORMED
    # SP and HTAB around it are optional whitespace.
    for prov, headers in ((header_only, [(b"x-token", f" {token}\t".encode())]),
                          (cookie_only, [(b"cookie", f"session= {token}\t".encode())])):
        found = extract_tokens(prov, headers, "")
        assert found is not None and found.token == token


@pytest.mark.parametrize("header", ["Basic abc", "Bearerx abc", "Bearer.x abc", "Negotiate x"])
def test_other_schemes_are_still_no_token(header: str) -> None:
    assert extract_tokens(CORP, [(b"authorization", header.encode())], "") is None


@pytest.mark.parametrize("ch", NON_OWS)
def test_api_key_with_foreign_whitespace_is_another_key(ch: str) -> None:
    key = "sk_" + "k" * 43
    import hashlib

    table = ApiKeyTable([ApiKey(name="job", sha256=hashlib.sha256(key.encode()).hexdigest())])
    assert table.check(presented_key(f" {key}\t".encode()), NOW) == "job"
    for value in (key + ch, ch + key, f" {ch}{key} "):
        assert table.check(presented_key(value.encode("latin-1")), NOW) is None, repr(value)


# ----------------------------------------------------------------------------- real sidecar


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str]]:
    tmp = tmp_path_factory.mktemp("tokens-review2")
    pki = Pki(tmp / "pki")
    # Every process started here is stopped by its pid, also when a later step fails.
    with contextlib.ExitStack() as stack:
        app_proc, app_port = start_app(tmp)
        stack.callback(app_proc.stop, timeout=10)
        jwks = tmp / "policy" / "jwks" / "corp.json"
        jwks.parent.mkdir(parents=True)
        jwks.write_bytes(jwks_bytes(jwk(ec_key("review2-ec"), "ec-1")))
        api_key, entry = apikey_new("batch-job")
        providers = {"corp": provider_doc(jwks_file="jwks/corp.json", algorithms=["ES256"])}
        rules = [jwt_rule("corp", ["/corp/**"], "corp"),
                 {"name": "batch", "allow": {"from": [spiffe("frontend")], "paths": ["/batch/**"],
                                             "apikey": True}}]
        n = start_node(tmp, pki, app_port, policy_doc(providers, rules, api_keys=[entry]))
        stack.callback(n.sidecar.stop, timeout=10)
        yield n, api_key


def _send(node: Node, path: str, headers: dict[str, str],
          conn: httpclient.HTTPSConnection | None = None) -> Response:
    return http(node.port, "GET", path, headers=headers, ctx=node.ctx, conn=conn)


def _both_ways(node: Node, path: str, good: dict[str, str], bad: dict[str, str]
               ) -> list[Response]:
    """``bad`` as the first request of a connection, then as the tenth after nine ``good``
    requests (each answered 200) on one keep-alive connection."""
    first = _send(node, path, bad)
    conn = httpclient.HTTPSConnection("127.0.0.1", node.port, context=node.ctx, timeout=10)
    try:
        for _ in range(9):
            r = _send(node, path, good, conn)
            assert r.status == 200, r.body
        tenth = _send(node, path, bad, conn)
    finally:
        conn.close()
    return [first, tenth]


def _refused(responses: list[Response], secret: str, challenge: str | None) -> None:
    for r in responses:
        assert r.status == 401, (r.status, r.body)
        if challenge is not None:
            assert r.headers.get("www-authenticate") == challenge
        lowered = r.body.lower()
        assert not any(word.encode() in lowered for word in REASON_WORDS), r.body
        assert secret.encode("latin-1") not in r.body


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("label", "make"), NONCANONICAL + HEADER_MEMBERS + NESTED,
                         ids=[m[0] for m in NONCANONICAL + HEADER_MEMBERS + NESTED])
def test_refused_tokens_through_a_real_sidecar_cold_and_warm(
        node: tuple[Node, str], label: str, make: TokenMaker) -> None:
    n, _ = node
    now = time.time()
    good = _token(now, "review2-ec")
    bad = make(now, "review2-ec")
    if label.startswith("signature"):
        # The variant of the very token the nine requests before it verified (and cached).
        h, p, s = good.split(".")
        bad = f"{h}.{p}.{_bits_set(s, int(label.rpartition('bit')[2]))}"
        cold = make(now, "review2-ec")
        _refused([_send(n, "/corp/x", _bearer(cold))], cold, BEARER_INVALID)
    _refused(_both_ways(n, "/corp/x", _bearer(good), _bearer(bad)), bad, BEARER_INVALID)


@pytest.mark.parametrize(("label", "make"), HEADER_CONTROLS + NESTED_CONTROLS,
                         ids=[m[0] for m in HEADER_CONTROLS + NESTED_CONTROLS])
def test_ordinary_header_members_through_a_real_sidecar(
        node: tuple[Node, str], label: str, make: TokenMaker) -> None:
    r = _send(node[0], "/corp/x", _bearer(make(time.time(), "review2-ec")))
    assert r.status == 200, r.body


WIRE_AUTH = [m for m in AUTH_MEMBERS if _on_wire(m[1]("t"))]


@pytest.mark.parametrize(("label", "spell"), WIRE_AUTH, ids=[m[0] for m in WIRE_AUTH])
def test_authorization_spellings_through_a_real_sidecar_cold_and_warm(
        node: tuple[Node, str], label: str, spell: Callable[[str], str]) -> None:
    n, _ = node
    good = _token(time.time(), "review2-ec")
    # The same token the nine requests before verified, spelled otherwise: refused as an
    # invalid token (error="invalid_token"), never as no token or as the token itself.
    _refused(_both_ways(n, "/corp/x", _bearer(good), {"authorization": spell(good)}),
             good, BEARER_INVALID)


@pytest.mark.parametrize(("label", "spell"), AUTH_CONTROLS, ids=[m[0] for m in AUTH_CONTROLS])
def test_authorization_controls_through_a_real_sidecar(
        node: tuple[Node, str], label: str, spell: Callable[[str], str]) -> None:
    good = _token(time.time(), "review2-ec")
    r = _send(node[0], "/corp/x", {"authorization": spell(good)})
    assert r.status == 200, r.body


@pytest.mark.parametrize("ch", [c for c in NON_OWS if _on_wire(c)])
def test_api_key_with_foreign_whitespace_through_a_real_sidecar(
        node: tuple[Node, str], ch: str) -> None:
    n, key = node
    for value in (key + ch, ch + key):
        _refused(_both_ways(n, "/batch/x", {"x-api-key": key}, {"x-api-key": value}), key,
                 None)
    assert _send(n, "/batch/x", {"x-api-key": f"{key}\t"}).status == 200


# ----------------------------------------------------------------------------- key set changes
#
# A verified token stays cached until its exp unless a key set change drops the provider's
# cached verdicts. That happened only when a key (kid, public numbers) disappeared, so two
# changes left tokens accepted from the cache that the new key set refuses (found by a
# hostile review): a key whose pinned ``alg`` changed (RS256 -> PS256: an RS256 token no
# longer fits it), and an added key that makes a token without ``kid`` ambiguous (two keys
# fit: refused) or picks another key for it (an unnamed key is chosen before named ones).

# (name, the key set after the change, status then of the token without kid, status then
# of the RS256 token naming kid "r"); both tokens were verified and cached before it.
KEY_CHANGES: list[tuple[str, Callable[[], list[dict[str, Any]]], int, int]] = [
    ("second-named-ec-key", lambda: [jwk(ec_key("kc-a"), "a"), jwk(rsa_key("kc-r"), "r"),
                                     jwk(ec_key("kc-b"), "b")], 401, 200),
    ("unnamed-ec-key", lambda: [jwk(ec_key("kc-a"), "a"), jwk(rsa_key("kc-r"), "r"),
                                jwk(ec_key("kc-c"), None)], 401, 200),
    ("alg-pin-changed", lambda: [jwk(ec_key("kc-a"), "a"),
                                 jwk(rsa_key("kc-r"), "r", alg="PS256")], 200, 401),
    # Controls: nothing changes for the tokens (a pin that fits drops the cached verdicts,
    # which then verify again).
    ("only-the-probe-added", lambda: [jwk(ec_key("kc-a"), "a"), jwk(rsa_key("kc-r"), "r")],
     200, 200),
    ("alg-pin-that-fits", lambda: [jwk(ec_key("kc-a"), "a", alg="ES256"),
                                   jwk(rsa_key("kc-r"), "r", alg="RS256")], 200, 200),
]
# Every change also adds this RSA key: once a token it signed passes, the sidecar has the
# new key set (no ES256 token can use it; the RS256 one names its own kid).
PROBE_KEY = ("kc-probe", "probe")


def _kidless(label: str) -> str:
    return _signed(b64(json.dumps({"alg": "ES256"}).encode()),
                   b64(json.dumps(_claims(time.time())).encode()), label)


@pytest.mark.parametrize(("label", "after", "kidless", "named"), KEY_CHANGES,
                         ids=[m[0] for m in KEY_CHANGES])
def test_cached_token_follows_a_key_set_change(tmp_path: Path, pki: Pki, app: int,
                                               procs: list, label: str,
                                               after: Callable[[], list[dict[str, Any]]],
                                               kidless: int, named: int) -> None:
    n, _ = _file_node(tmp_path, pki, app, procs,
                      [jwk(ec_key("kc-a"), "a"), jwk(rsa_key("kc-r"), "r")],
                      algorithms=["ES256", "RS256", "PS256"])
    jwks = tmp_path / "policy" / "jwks.json"
    cached_kidless = _kidless("kc-a")
    cached_named = sign(_claims(time.time()), rsa_key("kc-r"), kid="r", alg="RS256")
    conn = httpclient.HTTPSConnection("127.0.0.1", n.port, context=n.ctx, timeout=10)
    try:
        for _ in range(3):  # verified once, then from the cache (and the connection memo)
            assert _send(n, "/x", _bearer(cached_kidless), conn).status == 200
            assert _send(n, "/x", _bearer(cached_named), conn).status == 200
        probe = sign(_claims(time.time()), rsa_key(PROBE_KEY[0]), kid=PROBE_KEY[1],
                     alg="RS256")
        replace_file(jwks, jwks_bytes(*after(), jwk(rsa_key(PROBE_KEY[0]), PROBE_KEY[1])))
        wait_for(lambda: _send(n, "/x", _bearer(probe)).status == 200, timeout=10,
                 interval=0.1)
        fresh_named = sign(_claims(time.time()), rsa_key("kc-r"), kid="r", alg="RS256")
        cases = [(cached_kidless, kidless), (_kidless("kc-a"), kidless),
                 (cached_named, named), (fresh_named, named)]
        for token, want in cases:  # on the connection that used them, and on a new one
            assert _send(n, "/x", _bearer(token), conn).status == want, (label, want)
            assert _send(n, "/x", _bearer(token)).status == want, (label, want)
    finally:
        conn.close()
