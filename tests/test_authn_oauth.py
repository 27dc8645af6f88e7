"""OAuth 2.0 pure pieces: typ (RFC 9068), scope words (RFC 6749 3.3), metadata checks
(OIDC Discovery / RFC 8414), certificate binding (RFC 8705), the introspection cache, the
provider keys of the policy loader, the per-service default audience and lint."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import yaml

from sidecar.authn.authenticator import Authenticator
from sidecar.authn.jwt import TokenInvalid, typ_matches
from sidecar.authn.oauth import (
    CERT_MISMATCH,
    UNBOUND_TOKEN,
    IntrospectionCache,
    check_binding,
    check_metadata,
    introspection_claims,
    x5t_from_hex,
    x5t_s256,
)
from sidecar.errors import ConfigError
from sidecar.policy.compiled import claim_holds
from sidecar.policy.decision import NO_AUTH
from sidecar.policy.lint import lint
from sidecar.policy.loader import load_policy
from sidecar.policy.model import ClaimCondition
from sidecar.policy.sections import PolicyExtras
from tests.test_authn_support import ISSUER, NOW, claims, ec_key, key_set, mint, provider

# --------------------------------------------------------------------------- typ


@pytest.mark.parametrize("typ, ok", [
    ("at+jwt", True), ("AT+JWT", True), ("application/at+jwt", True),
    ("Application/At+JWT", True), ("JWT", False), ("jwt", False), (None, False), (5, False),
    ("at+jwt+x", False), ("", False),
    # No whitespace is trimmed (a hostile review: Unicode strip() let these through).
    ("at+jwt ", False), (" at+jwt", False), ("at+jwt\t", False), ("\u00a0at+jwt", False),
    ("at+jwt\u2003", False), ("application/ at+jwt", False),
])
def test_typ_matches(typ: Any, ok: bool) -> None:
    assert typ_matches(typ, "at+jwt") is ok


def test_typ_is_checked_by_the_verifier() -> None:
    from sidecar.authn.jwt import verify_token

    prov = provider(typ="at+jwt")
    keys = key_set((ec_key(), "ec-1"))
    assert verify_token(mint(claims(), ec_key(), typ="at+jwt"), prov, keys, NOW)
    for typ in ("JWT", None):
        token = mint(claims(), ec_key(), **({"typ": typ} if typ else {}))
        with pytest.raises(TokenInvalid) as info:
            verify_token(token, prov, keys, NOW)
        assert info.value.reason == "bad_typ"


# --------------------------------------------------------------------------- scope words

# Every character str.split() treats as whitespace, except SP itself: none of them delimits
# scope-tokens (RFC 6749 3.3 allows SP only).
NON_SP_WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace() and c != 0x20]


def test_the_whitespace_family_is_what_str_split_knows() -> None:
    assert "\t" in NON_SP_WHITESPACE and "\u00a0" in NON_SP_WHITESPACE
    assert len(NON_SP_WHITESPACE) > 20


@pytest.mark.parametrize("sep", NON_SP_WHITESPACE, ids=lambda c: f"U+{ord(c):04X}")
def test_scope_is_not_split_on_other_whitespace(sep: str) -> None:
    cond = ClaimCondition("scope", "contains", ("orders:read",))
    assert not claim_holds(cond, {"scope": f"orders:read{sep}admin"})
    assert not claim_holds(cond, {"scope": f"admin{sep}orders:read"})


@pytest.mark.parametrize("scope, ok", [
    ("orders:read", True), ("profile orders:read", True), ("orders:read profile", True),
    ("orders:readwrite", False), ("", False), (["orders:read", "profile"], True),
    (["orders:read profile"], False), ("profile  orders:read", True),
])
def test_scope_words(scope: Any, ok: bool) -> None:
    assert claim_holds(ClaimCondition("scope", "contains", ("orders:read",)), {"scope": scope}) is ok


# --------------------------------------------------------------------------- metadata


def meta(**doc: Any) -> bytes:
    base = {"issuer": ISSUER, "jwks_uri": "https://login.example.com/jwks"}
    base.update(doc)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_metadata_gives_the_jwks_uri() -> None:
    assert check_metadata(meta(), ISSUER, "m") == "https://login.example.com/jwks"


@pytest.mark.parametrize("data, key", [
    (meta(issuer=ISSUER.rstrip("/")), "issuer"),
    (meta(issuer=ISSUER + "/"), "issuer"),
    (meta(issuer=ISSUER.upper()), "issuer"),
    (meta(issuer=None), "issuer"),
    (meta(issuer=["https://login.example.com/"]), "issuer"),
    (meta(jwks_uri="http://login.example.com/jwks"), "jwks_uri"),
    (meta(jwks_uri=None), "jwks_uri"),
    (meta(jwks_uri=5), "jwks_uri"),
    (b"[]", ""),
    (b"not json", ""),
    (b" " * (256 * 1024 + 1), ""),
])
def test_bad_metadata_is_refused(data: bytes, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_metadata(data, ISSUER, "m")
    assert info.value.problems[0].key == key


# --------------------------------------------------------------------------- binding

DER = b"0\x82 a certificate"
PEER = x5t_s256(DER)


def test_thumbprint_forms_agree() -> None:
    assert PEER == x5t_from_hex(hashlib.sha256(DER).hexdigest())
    assert "=" not in PEER and len(PEER) == 43


@pytest.mark.parametrize("cnf, peer, required, reason", [
    ({"x5t#S256": PEER}, PEER, False, None),
    ({"x5t#S256": PEER}, PEER, True, None),
    ({"x5t#S256": PEER}, x5t_s256(b"other"), False, CERT_MISMATCH),
    ({"x5t#S256": PEER}, None, False, CERT_MISMATCH),
    ({"x5t#S256": PEER + "="}, PEER, False, CERT_MISMATCH),
    ({"x5t#S256": "ümlaut"}, PEER, False, CERT_MISMATCH),
    ({"jkt": "abc"}, PEER, False, CERT_MISMATCH),
    ({"jkt": "abc"}, PEER, True, UNBOUND_TOKEN),
    (None, PEER, False, None),
    (None, PEER, True, UNBOUND_TOKEN),
    ("x", PEER, False, "malformed"),
])
def test_binding(cnf: Any, peer: str | None, required: bool, reason: str | None) -> None:
    c = {} if cnf is None else {"cnf": cnf}
    if reason is None:
        check_binding(c, peer, required)
        return
    with pytest.raises(TokenInvalid) as info:
        check_binding(c, peer, required)
    assert info.value.reason == reason


# --------------------------------------------------------------------------- introspection


def test_introspection_answers() -> None:
    assert introspection_claims(200, b'{"active": false}', "e") is None
    assert introspection_claims(200, b'{"active": true, "sub": "a"}', "e")["sub"] == "a"
    for status, body in ((401, b'{"active": true}'), (200, b"{}"), (200, b'{"active": "yes"}'),
                         (200, b"[]"), (200, b"nope")):
        with pytest.raises(ValueError):
            introspection_claims(status, body, "e")


def test_introspection_cache_lifetimes_and_bound() -> None:
    cache = IntrospectionCache(max_entries=2)
    cache.store("p", b"a", {"active": True, "exp": NOW + 10}, NOW, ttl=60, negative_ttl=5)
    cache.store("p", b"b", None, NOW, ttl=60, negative_ttl=5)
    assert cache.fresh("p", b"a", NOW + 9) and not cache.fresh("p", b"a", NOW + 10)
    assert cache.lookup("p", b"b", NOW + 4).claims is None  # type: ignore[union-attr]
    assert cache.lookup("p", b"b", NOW + 5) is None
    cache.store("p", b"c", {"active": True}, NOW, ttl=60, negative_ttl=5)
    cache.store("p", b"d", {"active": True}, NOW, ttl=60, negative_ttl=5)
    assert len(cache) == 2
    cache.store("p", b"e", {"active": True, "exp": NOW - 1}, NOW, ttl=60, negative_ttl=5)
    # Past its exp: kept for negative_ttl, still the active answer it was (refused as
    # expired by the decision), never turned into "inactive".
    entry = cache.lookup("p", b"e", NOW + 4)
    assert entry is not None and entry.claims == {"active": True, "exp": NOW - 1}


# --------------------------------------------------------------------------- loader


def policy_text(prov: dict[str, Any], service: dict[str, Any] | None = None) -> str:
    doc = {"version": 1, "trust_domain": "t.local", "jwt_providers": {"p": prov},
           "services": {"spiffe://t.local/ns/a/sa/b": {
               "rules": [{"name": "r", "allow": {"jwt": {"provider": "p"}}}],
               **(service or {})}}}
    return yaml.safe_dump(doc, sort_keys=False)


BASE = {"issuer": "https://idp.example.com", "audiences": ["a"], "algorithms": ["ES256"]}
INTRO = {"endpoint": "https://idp.example.com/introspect", "client_id": "c",
         "client_secret_file": "s"}


def test_new_provider_keys_load() -> None:
    p = load_policy(policy_text({**BASE, "discovery": True, "typ": "at+jwt",
                                 "cert_binding": "required", "from_params": ["t"],
                                 "forward_query_token": True}), "/x/p.yaml")
    prov = p.extras.jwt_providers["p"]
    assert prov.discovery_url == "https://idp.example.com/.well-known/openid-configuration"
    assert (prov.typ, prov.cert_binding, prov.forward_query_token) == ("at+jwt", "required", True)
    url = "https://idp.example.com/.well-known/oauth-authorization-server/t1"
    assert load_policy(policy_text({**BASE, "discovery": url}), "p.yaml").extras.jwt_providers[
        "p"].discovery_url == url
    intro = load_policy(policy_text({"issuer": "i", "audiences": ["a"], "introspection": {
        **INTRO, "cache_ttl": "10s", "negative_ttl": "1s", "timeout": "500ms",
        "max_concurrent": 4, "ca": "ca.pem"}}), "/x/p.yaml").extras.jwt_providers["p"]
    spec = intro.introspection
    assert spec is not None and intro.algorithms == ()
    assert (spec.client_secret_file, spec.ca, spec.cache_ttl_seconds, spec.negative_ttl_seconds,
            spec.timeout_seconds, spec.max_concurrent) == ("/x/s", "/x/ca.pem", 10, 1, 0.5, 4)
    mtls = {**INTRO, "mtls": True}
    del mtls["client_secret_file"]
    assert load_policy(policy_text({"issuer": "i", "audiences": ["a"], "introspection": mtls}),
                       "p.yaml").extras.jwt_providers["p"].introspection.mtls  # type: ignore[union-attr]


@pytest.mark.parametrize("prov, key, words", [
    ({**BASE}, "jwt_providers.p", "exactly one of"),
    ({**BASE, "jwks_uri": "https://x/j", "discovery": True}, "jwt_providers.p", "exactly one"),
    ({**BASE, "issuer": "http://idp", "discovery": True}, "jwt_providers.p.discovery", "https"),
    ({**BASE, "discovery": "http://idp/meta"}, "jwt_providers.p.discovery", "https"),
    ({**BASE, "discovery": 1}, "jwt_providers.p.discovery", "https"),
    ({**BASE, "discovery": True, "typ": ""}, "jwt_providers.p.typ", "non-empty"),
    ({**BASE, "discovery": True, "cert_binding": "always"}, "jwt_providers.p.cert_binding",
     "if_present or required"),
    ({**BASE, "discovery": True, "forward_query_token": "yes"},
     "jwt_providers.p.forward_query_token", "true or false"),
    ({**BASE, "introspection": INTRO, "typ": "at+jwt"}, "jwt_providers.p.typ", "introspected"),
    ({**BASE, "introspection": {**INTRO, "endpoint": "http://x"}},
     "jwt_providers.p.introspection.endpoint", "https"),
    ({**BASE, "introspection": {**INTRO, "mtls": True}}, "jwt_providers.p.introspection",
     "exactly one of client_secret_file or mtls"),
    ({**BASE, "introspection": {"endpoint": "https://x", "client_id": "c"}},
     "jwt_providers.p.introspection", "exactly one of client_secret_file or mtls"),
    ({**BASE, "introspection": {**INTRO, "max_concurrent": 0}},
     "jwt_providers.p.introspection.max_concurrent", ""),
    ({**BASE, "introspection": {**INTRO, "timeout": "soon"}},
     "jwt_providers.p.introspection.timeout", ""),
    ({**BASE, "introspection": {**INTRO, "secret": "x"}},
     "jwt_providers.p.introspection.secret", "unknown key"),
    ({**BASE, "introspection": {**INTRO, "client_id": ""}},
     "jwt_providers.p.introspection.client_id", "non-empty"),
    ({**BASE, "introspection": INTRO, "jwks_ca": "ca.pem"}, "jwt_providers.p.jwks_ca",
     "introspection.ca"),
])
def test_provider_mistakes_name_file_line_and_key(prov: dict[str, Any], key: str,
                                                  words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy(policy_text(prov), "mesh.yaml")
    found = [p for p in info.value.problems if p.key == key]
    assert found, [(p.key, p.message) for p in info.value.problems]
    assert words in found[0].message
    assert found[0].file == "mesh.yaml" and found[0].line is not None


def test_service_audience_loads_and_is_checked() -> None:
    p = load_policy(policy_text({**BASE, "discovery": True}, {"audience": "orders-api"}), "p")
    assert p.services["spiffe://t.local/ns/a/sa/b"].audience == "orders-api"
    with pytest.raises(ConfigError) as info:
        load_policy(policy_text({**BASE, "discovery": True}, {"audience": 5}), "p")
    assert info.value.problems[0].key.endswith(".audience")


def test_lint_warns_about_query_tokens() -> None:
    p = load_policy(policy_text({**BASE, "discovery": True, "from_params": ["access_token"]}),
                    "p.yaml")
    warnings = [w for w in lint(p, NOW) if w.code == "token-in-query"]
    assert len(warnings) == 1 and "access_token" in warnings[0].message
    quiet = load_policy(policy_text({**BASE, "discovery": True}), "p.yaml")
    assert not [w for w in lint(quiet, NOW) if w.code == "token-in-query"]


@pytest.mark.parametrize("fields,warned", [
    ({}, False),                                                  # the default: [exp]
    ({"required_claims": ["sub"]}, True),                         # exp dropped
    ({"required_claims": ["sub"], "max_lifetime": "1h"}, False),  # max_lifetime needs exp
    ({"required_claims": ["exp", "sub"]}, False),
])
def test_lint_warns_about_providers_that_accept_tokens_without_exp(
        fields: dict[str, Any], warned: bool) -> None:
    p = load_policy(policy_text({**BASE, "discovery": True, **fields}), "p.yaml")
    warnings = [w for w in lint(p, NOW) if w.code == "no-expiry"]
    assert bool(warnings) == warned
    if warned:
        assert warnings[0].key.endswith(".required_claims") and "exp" in warnings[0].message


# --------------------------------------------------------------------------- default audience


def test_provider_without_audiences_takes_the_service_audience() -> None:
    prov = provider(audiences=())
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": prov}))
    auth.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    token = mint(claims(aud="spiffe://t/ns/a/sa/orders"), ec_key())
    header = [(b"authorization", f"Bearer {token}".encode())]
    ok = auth.authenticate(["corp"], header, "", NOW, audience="spiffe://t/ns/a/sa/orders")
    assert "corp" in ok.claims
    # The cached verdict is per audience: another service's audience does not reuse it.
    other = auth.authenticate(["corp"], header, "", NOW, audience="spiffe://t/ns/a/sa/pay")
    assert other.token_errors == {"corp": "bad_audience"}
    assert auth.authenticate(["corp"], header, "", NOW).token_errors == {"corp": "bad_audience"}


# --------------------------------------------------------------------------- introspected claims


def test_introspected_answers_get_the_same_checks_as_jwts() -> None:
    from sidecar.authn.oauth import token_digest
    from sidecar.policy.sections import Introspection, Revocation

    spec = Introspection(endpoint="https://idp/introspect", client_id="c", mtls=True)
    prov = provider(introspection=spec, algorithms=(), jwks_file=None)
    extras = PolicyExtras(jwt_providers={"corp": prov})
    auth = Authenticator(extras)
    header = [(b"authorization", b"Bearer opq_1")]

    def answer(**claims_: Any) -> dict[str, str]:
        auth.introspected.clear()
        if claims_.get("active", True):
            auth.introspected.store("corp", token_digest("opq_1"), claims(**claims_), NOW,
                                    ttl=60, negative_ttl=5)
        else:
            auth.introspected.store("corp", token_digest("opq_1"), None, NOW, ttl=60,
                                    negative_ttl=5)
        facts = auth.authenticate(["corp"], header, "", NOW, peer_x5t=PEER)
        return facts.token_errors

    assert answer() == {}
    assert answer(active=False) == {"corp": "inactive"}
    assert answer(iss="https://other/") == {"corp": "bad_issuer"}
    assert answer(iss=None) == {}  # iss is optional in RFC 7662 answers
    assert answer(aud="other-api") == {"corp": "bad_audience"}
    assert answer(exp=int(NOW) - 1) == {"corp": "expired"}  # past exp: expired, not inactive
    # Registered claims of the wrong type or range, as in JWTs (tests/jwt_claim_family.py):
    # never read as "no expiry", never an exception.
    for bad in ("never", [int(NOW) + 60], True, 10**400, -10**400, float("nan"), float("inf"),
                -1, 253402300800):
        assert answer(exp=bad) in ({"corp": "bad_claim"}, {"corp": "inactive"}), bad
    assert answer(sub={"id": 1}) == {"corp": "bad_claim"}
    assert answer(iat="yesterday") == {"corp": "bad_claim"}
    assert answer(cnf={"x5t#S256": x5t_s256(b"other")}) == {"corp": "cert_mismatch"}
    assert answer(cnf={"x5t#S256": PEER}) == {}
    auth.introspected.clear()  # not asked about for this request: the token counts as absent
    assert auth.authenticate(["corp"], header, "", NOW) == NO_AUTH
    auth.introspected.store_unavailable("corp", token_digest("opq_1"), NOW, 1.0)
    assert auth.authenticate(["corp"], header, "", NOW).token_errors == {
        "corp": "introspection_unavailable"}
    assert auth.authenticate(["corp"], header, "", NOW + 1) == NO_AUTH  # backoff over
    auth.update(PolicyExtras(jwt_providers={"corp": prov},
                             revocations=(Revocation(sub="alice"),)))
    assert answer() == {"corp": "revoked"}


def test_check_reports_every_missing_provider_file(tmp_path: Any) -> None:
    from tests.harness import sidecar_cli

    (tmp_path / "here.pem").write_text("x")
    text = policy_text({"issuer": "i", "audiences": ["a"], "introspection": {
        **INTRO, "client_secret_file": "gone-secret", "ca": "here.pem"}})
    doc = yaml.safe_load(text)
    doc["jwt_providers"]["q"] = {**BASE, "jwks_uri": "https://x/j", "jwks_ca": "gone-ca.pem"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    out = sidecar_cli("policy", "check", str(tmp_path / "p.yaml"))
    assert out.returncode != 0
    assert "jwt_providers.p.introspection.client_secret_file: [missing-file]" in out.stderr
    assert "jwt_providers.q.jwks_ca: [missing-file]" in out.stderr
    assert "here.pem" not in out.stderr


# ------------------------------------------------- credentials judged again, mid-request


SERVICE = "spiffe://t/ns/a/sa/orders"


def _introspecting(audiences: tuple[str, ...]) -> Authenticator:
    from sidecar.authn.oauth import token_digest
    from sidecar.policy.sections import Introspection

    spec = Introspection(endpoint="https://idp/introspect", client_id="c", mtls=True)
    prov = provider(introspection=spec, algorithms=(), jwks_file=None, audiences=audiences)
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": prov}))
    auth.introspected.store("corp", token_digest("opq_1"), claims(aud=SERVICE), NOW,
                            ttl=60, negative_ttl=5)
    return auth


@pytest.mark.parametrize("audiences", [(), (SERVICE,)], ids=["service audience", "audiences"])
def test_an_introspected_token_in_use_holds_under_the_audience_it_was_accepted_for(
        audiences: tuple[str, ...]) -> None:
    """A stream or a request in flight judged again (a policy reload, a key change) with an
    introspected token of a provider without ``audiences``: the answer is checked against
    the service's audience, as when the token was accepted (it was checked against none and
    refused: bad_audience, and the stream was cut though nothing had changed)."""
    auth = _introspecting(audiences)
    header = [(b"authorization", b"Bearer opq_1")]
    facts = auth.authenticate(["corp"], header, "", NOW, audience=SERVICE)
    assert "corp" in facts.claims
    assert auth.credentials_hold(facts, NOW + 1, None, tokens={"corp": "opq_1"},
                                 audience=SERVICE)
    assert auth.credentials_kept(facts, NOW + 1, audience=SERVICE)
    # ...and a cached answer that no longer fits a reloaded provider ends it.
    from sidecar.policy.sections import Introspection

    spec = Introspection(endpoint="https://idp/introspect", client_id="c", mtls=True)
    auth.update(PolicyExtras(jwt_providers={"corp": provider(
        introspection=spec, algorithms=(), jwks_file=None, audiences=("another-api",))}))
    from sidecar.authn.oauth import token_digest

    auth.introspected.store("corp", token_digest("opq_1"), claims(aud=SERVICE), NOW,
                            ttl=60, negative_ttl=5)  # (the answer asked for again)
    assert not auth.credentials_hold(facts, NOW + 1, None, tokens={"corp": "opq_1"},
                                     audience=SERVICE)
    assert not auth.credentials_kept(facts, NOW + 1, audience=SERVICE)


def test_a_request_in_flight_with_a_long_jwt_is_judged_again_like_a_short_one() -> None:
    """Requests in flight are judged again on a reload by their tokens: a JWT longer than
    the decision cache keeps (DECISION_KEY_MAX_TOKEN) was not kept, so a key removed from
    the key set never ended its request; now every verified token is held for that."""
    from sidecar.authn.authenticator import DECISION_KEY_MAX_TOKEN

    key = ec_key()
    prov = provider(max_token_bytes=64 * 1024)
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": prov}))
    auth.set_keys("corp", key_set((key, "ec-1")), NOW)
    for pad in (0, DECISION_KEY_MAX_TOKEN):
        token = mint(claims(pad="x" * pad), key)
        assert (len(token) > DECISION_KEY_MAX_TOKEN) == bool(pad)
        header = [(b"authorization", f"Bearer {token}".encode())]
        facts = auth.authenticate(["corp"], header, "", NOW)
        assert "corp" in facts.claims
        assert auth.credentials_kept(facts, NOW + 1)
        auth.set_keys("corp", key_set((ec_key(), "ec-2")), NOW + 1)  # ec-1 removed
        assert not auth.credentials_kept(facts, NOW + 2), len(token)
        auth.set_keys("corp", key_set((key, "ec-1")), NOW + 2)
