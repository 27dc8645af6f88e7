"""Invalid tokens refused on every route of a section (``invalid_tokens``), found by a
hostile review.

A JWT was judged only by the rules that name its provider. On a route a token-free rule
allows (``allow: {from: [frontend]}``) a forged, expired or unknown-issuer token reached the
app as the caller sent it (providers forward tokens by default), and a deny rule on a
provider's claims matched only valid tokens, so an invalid token with those claims passed
it. Istio's RequestAuthentication refuses such a request on every route of the workload.
Now a section whose rules name providers refuses, with 401 ``token_invalid`` (rule
``invalid token``) before any rule, a request presenting a token no provider of the section
accepted (``invalid_tokens: refuse``, the default); ``per_rule`` is the old behaviour.

The family as data: every invalid-token kind the authenticator produces x every location
(header, query parameter, cookie) x route kind (token-free allow, a deny rule on the
provider's claims, an allow rule naming another provider, an allow rule naming this one) x
setting, decided in process through the gate and ``decide``; a slice of each dimension
through a real sidecar over mTLS, where the app must never receive a refused token.
"""

from __future__ import annotations

import base64
import http.client as httpclient
import json
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from sidecar.authn.authenticator import Authenticator
from sidecar.config.source import NULL_PROBLEM
from sidecar.errors import ConfigError
from sidecar.gate import ConnectionMemo, Gate, PolicyHolder, Verdict
from sidecar.policy.decision import AuthFacts, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.explain import explain
from sidecar.policy.lint import lint
from sidecar.policy.loader import load_policy
from sidecar.replay import replay
from tests.harness import (
    Pki,
    Response,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.test_authn_support import (
    AUDIENCE,
    ISSUER,
    ec_key,
    jwk,
    jwks_bytes,
    key_set,
    mint,
    overridden,
)
from tests.test_authn_support import rsa_key as _rsa_key

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ORDERS = spiffe("orders")
FRONTEND = spiffe("frontend")
PARTNER_ISSUER = "https://partner.example/"
STAFF_ISSUER = "https://staff.example/"
BEARER_INVALID = 'Bearer realm="sidecar", error="invalid_token"'
PEER_X5T = "peer-certificate-thumbprint"  # in process: the caller's certificate, as passed
REVOKED_JTI = "revoked-token-id"
MAX_TOKEN_BYTES = 2048


def corp_key() -> Any:
    return ec_key("invalid-tokens-corp")


def partner_key() -> Any:
    return ec_key("invalid-tokens-partner")


# ----------------------------------------------------------------------------- the policy


def providers_doc() -> dict[str, Any]:
    return {
        "corp": {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
                 "jwks_file": "jwks/corp.json", "typ": "at+jwt", "max_lifetime": "1h",
                 "max_token_bytes": MAX_TOKEN_BYTES,
                 "from_headers": [{"name": "authorization", "prefix": "Bearer "}],
                 "from_params": ["access_token"], "forward_query_token": True,
                 "from_cookies": ["session"]},
        "partner": {"issuer": PARTNER_ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
                    "jwks_file": "jwks/partner.json", "from_headers": ["x-partner-token"]},
    }


ROUTES = {
    # route kind -> path; the rules below
    "token-free": "/open/1",
    "deny-on-claims": "/guarded/1",
    "other-provider": "/other/1",
    "this-provider": "/mine/1",
}


def rules_doc() -> list[dict[str, Any]]:
    return [
        {"name": "open", "allow": {"from": [FRONTEND], "paths": ["/open/**"]}},
        {"name": "no-guests", "deny": {"paths": ["/guarded/**"],
                                       "jwt": {"provider": "corp",
                                               "claims": {"role": "guest"}}}},
        {"name": "guarded", "allow": {"from": [FRONTEND], "paths": ["/guarded/**"]}},
        {"name": "other", "allow": {"from": [FRONTEND], "paths": ["/other/**"],
                                    "jwt": {"provider": "partner"}}},
        {"name": "mine", "allow": {"from": [FRONTEND], "paths": ["/mine/**"],
                                   "jwt": {"provider": "corp"}}},
    ]


def policy_doc(setting: str | None, *, mode: str | None = None) -> dict[str, Any]:
    section: dict[str, Any] = {"rules": rules_doc()}
    if setting is not None:
        section["invalid_tokens"] = setting
    if mode is not None:
        section["mode"] = mode
    return {"version": 1, "trust_domain": "demo.local", "jwt_providers": providers_doc(),
            "revocations": [{"jti": REVOKED_JTI}], "services": {ORDERS: section}}


# ----------------------------------------------------------------------------- tokens


def corp_claims(now: float, **overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "role": "guest",
                           "jti": uuid.uuid4().hex, "iat": int(now) - 5,
                           "exp": int(now) + 600}
    return overridden(out, overrides)  # (None removes a claim)


def corp_token(now: float, *, key: Any = None, alg: str = "ES256", kid: str = "ec-1",
               typ: str = "at+jwt", header: dict[str, Any] | None = None,
               **overrides: Any) -> str:
    return mint(corp_claims(now, **overrides), key or corp_key(), alg, kid, typ=typ,
                **(header or {}))


def partner_token(now: float) -> str:
    payload = {"iss": PARTNER_ISSUER, "aud": AUDIENCE, "sub": "partner-app",
               "jti": uuid.uuid4().hex, "iat": int(now) - 5, "exp": int(now) + 600}
    return mint(payload, partner_key(), "ES256", "p-1")


def unsigned_token(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes,
                   signature: bytes = b"") -> str:
    """A token of three base64url segments made as given, signed by nobody."""
    def seg(part: dict[str, Any] | bytes) -> str:
        data = part if isinstance(part, bytes) else json.dumps(part).encode()
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    return ".".join((seg(header), seg(payload), seg(signature) if signature else ""))


Values = Callable[[float], list[str]]  # now -> the value(s) at the token's location


def one(make: Callable[[float], str]) -> Values:
    return lambda now: [make(now)]


# kind -> (the reason the provider refuses it with, the value(s) presented)
KINDS: dict[str, tuple[str, Values]] = {
    "expired": ("expired", one(lambda now: corp_token(now, iat=int(now) - 3000,
                                                      exp=int(now) - 1200))),
    "not_yet_valid": ("not_yet_valid", one(lambda now: corp_token(now, nbf=int(now) + 1200))),
    "issued_in_future": ("not_yet_valid", one(lambda now: corp_token(
        now, iat=int(now) + 1200, exp=int(now) + 1800))),
    "forged_signature": ("bad_signature", one(lambda now: corp_token(
        now, key=ec_key("invalid-tokens-forger")))),
    "unknown_kid": ("unknown_kid", one(lambda now: corp_token(now, kid="not-a-key"))),
    "unknown_issuer": ("bad_issuer", one(lambda now: corp_token(
        now, iss="https://evil.example/"))),
    "wrong_audience": ("bad_audience", one(lambda now: corp_token(now, aud="other-api"))),
    "missing_exp": ("missing_claim", one(lambda now: corp_token(now, exp=None))),
    "lifetime_too_long": ("lifetime_too_long", one(lambda now: corp_token(
        now, exp=int(now) + 7200))),
    "revoked": ("revoked", one(lambda now: corp_token(now, jti=REVOKED_JTI))),
    "alg_not_allowed": ("bad_alg", one(lambda now: corp_token(
        now, key=_rsa_key("invalid-tokens-rsa"), alg="RS256"))),
    "wrong_typ": ("bad_typ", one(lambda now: corp_token(now, typ="JWT"))),
    "bad_header": ("bad_header", one(lambda now: corp_token(now, header={"zip": "DEF"}))),
    "bad_claim": ("bad_claim", one(lambda now: corp_token(now, exp="tomorrow"))),
    "cert_binding": ("cert_mismatch", one(lambda now: corp_token(
        now, cnf={"x5t#S256": "A" * 43}))),
    "too_large": ("too_large", one(lambda now: corp_token(now, pad="x" * MAX_TOKEN_BYTES))),
    # Unsigned, or unreadable as a JWS, but naming corp's issuer: an app decoding the
    # payload unverified reads corp's claims (and "mallory" is no admin of corp's).
    "alg_none": ("bad_alg", one(lambda now: unsigned_token(
        {"alg": "none", "typ": "at+jwt"}, corp_claims(now)))),
    "header_not_json": ("malformed", one(lambda now: unsigned_token(
        b"not json", corp_claims(now), b"sig"))),
    "issuer_twice": ("malformed", one(lambda now: unsigned_token(
        {"alg": "ES256", "typ": "at+jwt", "kid": "ec-1"},
        b'{"iss": "https://evil.example/", ' + json.dumps(corp_claims(now))[1:].encode(),
        b"sig"))),
    "not_a_jwt": ("malformed", one(lambda now: "not-a-jwt")),
    "empty": ("malformed", lambda now: [""]),
    # Two valid tokens at one location: which one the app reads is not known.
    "repeated": ("multiple_tokens", lambda now: [corp_token(now), corp_token(now)]),
}
KIND_IDS = list(KINDS)
LOCATIONS = ("header", "query", "cookie")
SETTINGS = ("refuse", "per_rule")


def placed(location: str, values: list[str]) -> tuple[list[tuple[bytes, bytes]], str]:
    """The request's headers and query string with ``values`` at ``location``."""
    if location == "header":
        return [(b"authorization", f"Bearer {v}".encode()) for v in values], ""
    if location == "query":
        return [], "&".join(f"access_token={quote(v, safe='')}" for v in values)
    return [(b"cookie", "; ".join(f"session={v}" for v in values).encode())], ""


def expected(route: str, setting: str, kind: str | None) -> tuple[str, str, int]:
    """(action, rule, status) for a request on ``route`` with an invalid token of ``kind``
    (None: a valid corp token)."""
    if kind is None:
        return {"token-free": ("allow", "open", 0), "deny-on-claims": ("deny", "no-guests", 403),
                "other-provider": ("allow", "other", 0),
                "this-provider": ("allow", "mine", 0)}[route]
    if setting == "refuse":
        return "deny", "invalid token", 401
    return {"token-free": ("allow", "open", 0), "deny-on-claims": ("allow", "guarded", 0),
            "other-provider": ("allow", "other", 0),
            "this-provider": ("deny", "mine", 401)}[route]


# ----------------------------------------------------------------------------- in process

NOW = 1_700_000_000.0


def make_gate(doc: dict[str, Any]) -> tuple[Gate, Any]:
    policy = load_policy(yaml.safe_dump(doc, sort_keys=False), "mesh.yaml")
    holder = PolicyHolder("mesh.yaml")
    holder.swap(policy, NOW)
    authn = Authenticator(policy.extras)
    authn.set_keys("corp", key_set((corp_key(), "ec-1")), NOW)
    if "partner" in policy.extras.jwt_providers:
        authn.set_keys("partner", key_set((partner_key(), "p-1")), NOW)
    return Gate(ORDERS, holder, authenticator=authn), policy


@pytest.fixture(scope="module")
def gates() -> dict[str, tuple[Gate, Any]]:
    return {setting: make_gate(policy_doc(setting)) for setting in SETTINGS}


def facts(path: str) -> RequestFacts:
    return RequestFacts("inbound", FRONTEND, "10.0.0.1", "GET", path, "orders", 15443,
                        "inbound")


def route_headers(route: str, headers: list[tuple[bytes, bytes]],
                  now: float) -> list[tuple[bytes, bytes]]:
    if route == "other-provider":  # a valid token for the rule's own provider
        return [*headers, (b"x-partner-token", partner_token(now).encode())]
    return headers


def decided(gate: Gate, policy: Any, route: str, headers: list[tuple[bytes, bytes]],
            query: str, now: float = NOW, memo: ConnectionMemo | None = None) -> Verdict:
    """The gate's verdict, checked against the pure ``decide`` on the same credentials."""
    f = facts(ROUTES[route])
    verdict = gate.inbound(f, headers, query, now, peer_x5t=PEER_X5T, memo=memo)
    assert decide(policy, ORDERS, f, verdict.auth, now) == verdict.decision
    return verdict


def check(verdict: Verdict, want: tuple[str, str, int]) -> None:
    d = verdict.decision
    assert (d.action, d.rule, d.status) == want, d
    if want[2] == 401:
        assert d.reason == "token_invalid"
        assert verdict.response_headers == [(b"www-authenticate", BEARER_INVALID.encode())]


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("kind", KIND_IDS)
def test_the_family_in_process(gates: dict[str, tuple[Gate, Any]], kind: str,
                               location: str) -> None:
    reason, values = KINDS[kind]
    for setting in SETTINGS:
        gate, policy = gates[setting]
        for route in ROUTES:
            headers, query = placed(location, values(NOW))
            verdict = decided(gate, policy, route, route_headers(route, headers, NOW), query)
            assert verdict.auth.token_errors.get("corp") == reason, verdict.auth
            assert verdict.auth.invalid_token
            check(verdict, expected(route, setting, kind))


@pytest.mark.parametrize("location", LOCATIONS)
def test_valid_and_absent_tokens_are_unaffected(gates: dict[str, tuple[Gate, Any]],
                                                location: str) -> None:
    for setting in SETTINGS:
        gate, policy = gates[setting]
        for route in ROUTES:
            headers, query = placed(location, [corp_token(NOW)])
            verdict = decided(gate, policy, route, route_headers(route, headers, NOW), query)
            assert not verdict.auth.invalid_token
            check(verdict, expected(route, setting, None))
            # No token at all: a missing token is not an invalid one.
            verdict = decided(gate, policy, route, route_headers(route, [], NOW), "")
            d = verdict.decision
            if route == "this-provider":
                assert (d.action, d.rule, d.reason, d.status) == (
                    "deny", "mine", "token_missing", 401)
            else:
                assert d.allowed, d


def test_a_provider_without_keys_refuses_every_token() -> None:
    """``no_keys`` (the key set not fetched yet) is a token nobody accepted, too."""
    policy = load_policy(yaml.safe_dump(policy_doc(None)), "mesh.yaml")
    holder = PolicyHolder("mesh.yaml")
    holder.swap(policy, NOW)
    gate = Gate(ORDERS, holder, authenticator=Authenticator(policy.extras))
    headers, _ = placed("header", [corp_token(NOW)])
    verdict = gate.inbound(facts("/open/1"), headers, "", NOW)
    assert verdict.auth.token_errors == {"corp": "no_keys"}
    check(verdict, ("deny", "invalid token", 401))
    assert gate.inbound(facts("/open/1"), [], "", NOW).decision.allowed


def test_the_default_is_refuse() -> None:
    gate, policy = make_gate(policy_doc(None))
    headers, _ = placed("header", KINDS["expired"][1](NOW))
    check(decided(gate, policy, "token-free", headers, ""), ("deny", "invalid token", 401))


def test_dry_run_records_the_refusal_and_lets_the_request_pass() -> None:
    gate, policy = make_gate(policy_doc("refuse", mode="dry-run"))
    headers, _ = placed("header", KINDS["forged_signature"][1](NOW))
    d = decided(gate, policy, "token-free", headers, "").decision
    assert (d.action, d.rule, d.reason, d.status, d.dry_run, d.would) == (
        "allow", "invalid token", "token_invalid", 0, True, "deny")


def test_dry_run_never_lets_in_what_an_enforced_rule_refuses() -> None:
    doc = policy_doc("refuse", mode="dry-run")
    doc["services"][ORDERS]["rules"].insert(0, {
        "name": "enforced-deny", "mode": "enforce", "deny": {"paths": ["/open/secret"]}})
    gate, policy = make_gate(doc)
    headers, _ = placed("header", KINDS["expired"][1](NOW))
    f = facts("/open/secret")
    v = gate.inbound(f, headers, "", NOW, peer_x5t=PEER_X5T)
    assert decide(policy, ORDERS, f, v.auth, NOW) == v.decision
    d = v.decision
    assert (d.action, d.rule, d.status) == ("deny", "enforced-deny", 403), d


def test_only_a_section_whose_rules_name_providers_reads_tokens() -> None:
    headers, _ = placed("header", ["not-a-jwt"])
    gate, policy = make_gate(policy_doc(None))
    check(decided(gate, policy, "token-free", headers, ""), ("deny", "invalid token", 401))
    doc = policy_doc(None)
    doc["services"][ORDERS]["rules"] = [rules_doc()[0]]  # no rule names a provider
    gate, policy = make_gate(doc)
    assert decided(gate, policy, "token-free", headers, "").decision.allowed


# -- several providers, one header -------------------------------------------------------


def staff_policy() -> dict[str, Any]:
    doc = policy_doc(None)
    doc["jwt_providers"]["staff"] = {
        "issuer": STAFF_ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
        "jwks_file": "jwks/staff.json"}
    doc["services"][ORDERS]["rules"].append(
        {"name": "staff", "allow": {"from": [FRONTEND], "paths": ["/staff/**"],
                                    "jwt": {"provider": "staff"}}})
    return doc


def staff_gate() -> tuple[Gate, Any]:
    gate, policy = make_gate(staff_policy())
    assert gate.authenticator is not None
    gate.authenticator.set_keys("staff", key_set((ec_key("invalid-tokens-staff"), "s-1")),
                                NOW)
    return gate, policy


def staff_token(now: float, **overrides: Any) -> str:
    payload = {"iss": STAFF_ISSUER, "aud": AUDIENCE, "sub": "bob", "jti": uuid.uuid4().hex,
               "iat": int(now) - 5, "exp": int(now) + 600, **overrides}
    return mint(payload, ec_key("invalid-tokens-staff"), "ES256", "s-1")


def test_a_token_one_provider_accepts_passes_though_another_refuses_it() -> None:
    gate, policy = staff_gate()
    for token, refused_by in ((corp_token(NOW, role="admin"), "staff"),
                              (staff_token(NOW), "corp")):
        headers, _ = placed("header", [token])
        verdict = decided(gate, policy, "token-free", headers, "")
        # The other provider, reading the same header, refused it (another issuer)...
        assert verdict.auth.token_errors[refused_by] in ("bad_issuer", "bad_typ")
        # ...and the request passes: some provider accepted the token.
        assert not verdict.auth.invalid_token
        check(verdict, ("allow", "open", 0))
    # A token of neither issuer is refused.
    headers, _ = placed("header", [staff_token(NOW, iss="https://evil.example/")])
    check(decided(gate, policy, "token-free", headers, ""), ("deny", "invalid token", 401))


def test_a_token_accepted_at_one_place_does_not_excuse_another_at_another() -> None:
    """corp accepts the header token; the cookie holds a token only staff reads, which
    staff refuses: that one was accepted by nobody. The failures per provider are the same
    as when staff refuses corp's header token (bad_issuer): the decision cache must tell
    them apart (``AuthFacts.key``), in either order."""
    doc = staff_policy()
    corp = doc["jwt_providers"]["corp"]
    for key in ("from_params", "forward_query_token", "from_cookies"):
        del corp[key]
    corp["from_headers"] = [{"name": "authorization", "prefix": "Bearer "}, "x-alt-token"]
    doc["jwt_providers"]["staff"]["from_headers"] = [
        {"name": "authorization", "prefix": "Bearer "}]
    doc["jwt_providers"]["staff"]["from_cookies"] = ["staff"]
    token = corp_token(NOW)
    accepted = [(b"authorization", f"Bearer {token}".encode())]
    smuggled = [(b"x-alt-token", token.encode()),
                (b"cookie", f"staff={corp_token(NOW)}".encode())]
    for order in ((accepted, smuggled), (smuggled, accepted)):
        gate, policy = make_gate(doc)
        assert gate.authenticator is not None
        gate.authenticator.set_keys(
            "staff", key_set((ec_key("invalid-tokens-staff"), "s-1")), NOW)
        memo = ConnectionMemo()
        for _ in range(2):  # the second round reads the decision cache
            for headers in order:
                verdict = decided(gate, policy, "token-free", headers, "", memo=memo)
                assert verdict.auth.token_errors == {"staff": "bad_issuer"}
                if headers is accepted:
                    check(verdict, ("allow", "open", 0))
                else:
                    check(verdict, ("deny", "invalid token", 401))


# -- one connection: the decision cache and the connection memo --------------------------


@pytest.mark.parametrize("route", list(ROUTES))
def test_valid_then_invalid_and_invalid_then_valid_on_one_connection(route: str) -> None:
    gate, policy = make_gate(policy_doc(None))
    valid = corp_token(NOW, role="admin")
    invalid = corp_token(NOW, role="admin", key=ec_key("invalid-tokens-forger"))
    for order in ((valid, invalid, valid, invalid), (invalid, valid, invalid, valid)):
        memo = ConnectionMemo()
        for _ in range(3):  # cold, then the memo and the decision cache warm
            for token in order:
                headers, _ = placed("header", [token])
                verdict = decided(gate, policy, route, route_headers(route, headers, NOW),
                                  "", memo=memo)
                if token is invalid:
                    check(verdict, ("deny", "invalid token", 401))
                else:
                    assert verdict.decision.allowed, verdict.decision


# -- introspection: not asked, not judged (the documented limitation) --------------------


def test_an_introspected_token_not_asked_about_is_not_judged() -> None:
    doc = policy_doc(None)
    doc["jwt_providers"]["opaque"] = {
        "issuer": ISSUER, "audiences": [AUDIENCE],
        "introspection": {"endpoint": "https://127.0.0.1:9/introspect", "client_id": "orders",
                          "client_secret_file": "secret"}}
    doc["services"][ORDERS]["rules"].append(
        {"name": "opaque", "allow": {"from": [FRONTEND], "paths": ["/opaque/**"],
                                     "jwt": {"provider": "opaque"}}})
    gate, policy = make_gate(doc)
    # An opaque token in Authorization: corp (a JWT provider) finds it malformed; the
    # introspected provider was not asked about it (no rule for /open names it).
    headers, _ = placed("header", ["opaque-token-value"])
    verdict = decided(gate, policy, "token-free", headers, "")
    assert verdict.auth.token_errors == {"corp": "malformed"}
    assert not verdict.auth.invalid_token
    assert verdict.decision.allowed
    # So is a JWT of another issuer (corp: bad_issuer), which may be the server's own.
    headers, _ = placed("header", KINDS["unknown_issuer"][1](NOW))
    assert decided(gate, policy, "token-free", headers, "").decision.allowed
    # A token corp knows as its own (its issuer) but refuses is refused though the
    # introspected provider reads the same header: forged, expired, revoked, and every
    # other refusal of a token whose payload names corp's issuer -- unsigned (alg none), an
    # ID token's typ, crit or zip, a claim of the wrong type, a header that is not JSON,
    # the issuer named twice, too large (jwt.names_issuer).
    for kind in KIND_IDS:
        if kind in ("unknown_issuer", "not_a_jwt", "empty"):
            continue
        headers, _ = placed("header", KINDS[kind][1](NOW))
        verdict = decided(gate, policy, "token-free", headers, "")
        assert verdict.auth.token_errors["corp"] == KINDS[kind][0], kind
        check(verdict, ("deny", "invalid token", 401))
    # And a forged token where only corp reads (the cookie).
    headers, _ = placed("cookie", KINDS["forged_signature"][1](NOW))
    check(decided(gate, policy, "token-free", headers, ""), ("deny", "invalid token", 401))


# -- the pure readers: explain, replay, lint ---------------------------------------------


def test_explain_shows_the_refusal_before_the_rules() -> None:
    policy = load_policy(yaml.safe_dump(policy_doc(None)), "mesh.yaml")
    ex = explain(policy, ORDERS, caller=FRONTEND, method="GET", target="/open/1",
                 token_errors={"corp": "invalid"}, now=NOW)
    assert ex.decision is not None
    assert (ex.decision.rule, ex.decision.reason, ex.decision.status) == (
        "invalid token", "token_invalid", 401)
    assert "refused before any rule" in ex.render()
    per_rule = load_policy(yaml.safe_dump(policy_doc("per_rule")), "mesh.yaml")
    ex = explain(per_rule, ORDERS, caller=FRONTEND, method="GET", target="/open/1",
                 token_errors={"corp": "invalid"}, now=NOW)
    assert ex.decision is not None and ex.decision.allowed


def test_replay_presents_a_refused_token_again() -> None:
    from sidecar.audit.record import AuditRecord

    rec = AuditRecord(time=NOW, peer=FRONTEND, source="10.0.0.1:5000", method="GET",
                      host="orders", path="/open/1", decision="deny", rule="invalid token",
                      reason="token_invalid", status=401, extra={"service": ORDERS})
    same = load_policy(yaml.safe_dump(policy_doc(None)), "mesh.yaml")
    assert replay(same, iter([rec]), None) == (1, [])
    count, changes = replay(load_policy(yaml.safe_dump(policy_doc("per_rule")), "mesh.yaml"),
                            iter([rec]), None)
    assert count == 1 and len(changes) == 1 and changes[0].uncertain
    assert changes[0].after.allowed


def test_lint_warns_about_per_rule_only() -> None:
    for setting, warned in ((None, False), ("refuse", False), ("per_rule", True)):
        policy = load_policy(yaml.safe_dump(policy_doc(setting)), "mesh.yaml")
        codes = [w.code for w in lint(policy, NOW)]
        assert ("invalid-tokens-per-rule" in codes) is warned, codes


def test_the_refusal_counts_for_the_user_never_the_relaying_peer() -> None:
    """Burst alerts: a token refused before the rules is the end user's failure (its claimed
    subject, its provider's issuer), as a refusal by a rule naming the provider is."""
    from sidecar.alerts import Failure, classify_failure

    auth = AuthFacts(token_errors={"corp": "expired"}, unverified_subjects={"corp": "bob"})
    assert classify_failure("token_invalid", None, auth, {"corp": ISSUER}) == Failure(
        False, "bob", ISSUER)


# -- malformed values ----------------------------------------------------------------------

BAD_VALUES = {
    "maybe": "maybe", "null": "null", "tilde": "~", "nothing": "", "list": "[refuse]",
    "map": "{refuse: true}", "true": "true", "false": "false", "yes": "yes", "zero": "0",
    "upper": "REFUSE", "spaced": "' refuse'", "dash": "per-rule", "empty_string": "''",
}


def policy_text(value: str) -> str:
    doc = yaml.safe_dump(policy_doc(None), sort_keys=False)
    marker = "    rules:\n"
    assert doc.count(marker) == 1
    return doc.replace(marker, f"    invalid_tokens: {value}\n" + marker)


@pytest.mark.parametrize("value", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_a_malformed_value_fails_to_load_with_file_line_and_key(value: str) -> None:
    text = policy_text(value)
    line = text.splitlines().index(f"    invalid_tokens: {value}") + 1
    with pytest.raises(ConfigError) as err:
        load_policy(text, "mesh.yaml")
    message = str(err.value)
    assert f"mesh.yaml:{line}" in message, message
    assert "invalid_tokens" in message, message
    assert "Traceback" not in message
    if value in ("null", "~", ""):
        assert NULL_PROBLEM in message, message
    elif value == "yes":  # (one problem for the value: its YAML 1.1 reading, named)
        assert "'yes' is read as true (YAML 1.1)" in message, message
    else:  # (an unknown key, before the key existed)
        assert "expected refuse or per_rule" in message, message


def test_both_good_values_load() -> None:
    for value in ("refuse", "per_rule"):
        load_policy(policy_text(value), "mesh.yaml")


# ----------------------------------------------------------------------------- end to end


@dataclass
class Node:
    sidecar: SidecarProc
    ctx: ssl.SSLContext
    policy_path: Path

    @property
    def port(self) -> int:
        return self.sidecar.port("inbound")


@dataclass
class Mesh:
    nodes: dict[str, Node]
    app_port: int
    tmp: Path
    pki: Pki


def start_node(tmp: Path, pki: Pki, app_port: int, doc: dict[str, Any], name: str) -> Node:
    policy_path = tmp / name / "mesh.yaml"
    (policy_path.parent / "jwks").mkdir(parents=True)
    (policy_path.parent / "jwks" / "corp.json").write_bytes(jwks_bytes(jwk(corp_key(), "ec-1")))
    (policy_path.parent / "jwks" / "partner.json").write_bytes(
        jwks_bytes(jwk(partner_key(), "p-1")))
    policy_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = sidecar_config(pki.identity("orders", dirname=f"orders-{name}"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
        policy=str(policy_path))
    # (The client's context first: nothing may fail between starting the sidecar and
    # handing it to the caller, who stops it.)
    ctx = mtls_context(pki.identity("frontend", dirname=f"frontend-{name}"), pki.bundle)
    proc = start_sidecar(tmp, name, cfg)
    return Node(proc, ctx, policy_path)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("invalid-tokens")
    pki = Pki(tmp / "pki")
    app, app_port = start_app(tmp)
    nodes: dict[str, Node] = {}
    try:
        for setting in SETTINGS:
            nodes[setting] = start_node(tmp, pki, app_port, policy_doc(setting), setting)
        yield Mesh(nodes, app_port, tmp, pki)
    finally:
        for node in nodes.values():
            node.sidecar.stop(timeout=10)
        app.stop(timeout=10)


def app_requests(mesh: Mesh) -> int:
    """How many requests the app has served (this question included)."""
    return int(http(mesh.app_port, "GET", "/stats").json()["requests"])


def send(node: Node, path: str, headers: list[tuple[str, str]],
         conn: httpclient.HTTPSConnection | None = None) -> Response:
    """One request with ``headers`` as given (a name may repeat); ``conn`` to keep alive."""
    return http(node.port, "GET", path, headers=headers, ctx=node.ctx, conn=conn)


def request_parts(route: str, location: str, values: list[str],
                  now: float) -> tuple[str, list[tuple[str, str]]]:
    headers, query = placed(location, values)
    headers = route_headers(route, headers, now)
    path = ROUTES[route] + (f"?{query}" if query else "")
    return path, [(n.decode(), v.decode()) for n, v in headers]


def assert_refused(mesh: Mesh, node: Node, path: str, headers: list[tuple[str, str]]) -> None:
    before = app_requests(mesh)
    r = send(node, path, headers)
    assert r.status == 401, (r.status, r.body[:300])
    assert r.headers.get("www-authenticate") == BEARER_INVALID
    body = r.body.lower()
    assert not any(word in body for word in (b"expired", b"signature", b"issuer", b"kid",
                                             b"malformed", b"audience", b"invalid token"))
    # The app never saw the request, so never the token (its count: only our two asks).
    assert app_requests(mesh) == before + 1


def app_got(r: Response, location: str, values: list[str]) -> bool:
    """Whether the app's echo of the request holds the token."""
    doc = r.json()
    text = doc["path"] + json.dumps(doc["headers"])
    return all(v in text for v in values)


def e2e_cases(kind: str, location: str) -> bool:
    # Two Authorization headers are refused before the gate (400: one field, sent twice).
    return not (kind == "repeated" and location == "header")


@pytest.mark.parametrize("location", LOCATIONS)
def test_every_kind_on_a_token_free_route_through_a_sidecar(mesh: Mesh, location: str) -> None:
    now = time.time()
    for kind, (_, values) in KINDS.items():
        if not e2e_cases(kind, location):
            continue
        got = values(now)
        path, headers = request_parts("token-free", location, got, now)
        assert_refused(mesh, mesh.nodes["refuse"], path, headers)
        # per_rule: the old behaviour, the token reaches the app as sent.
        r = send(mesh.nodes["per_rule"], path, headers)
        assert r.status == 200, (kind, r.status, r.body[:300])
        assert app_got(r, location, [v for v in got if v])


@pytest.mark.parametrize("kind", ["expired", "unknown_issuer", "not_a_jwt"])
@pytest.mark.parametrize("location", LOCATIONS)
def test_every_route_with_one_kind_through_a_sidecar(mesh: Mesh, kind: str,
                                                     location: str) -> None:
    now = time.time()
    for route in ROUTES:
        path, headers = request_parts(route, location, KINDS[kind][1](now), now)
        assert_refused(mesh, mesh.nodes["refuse"], path, headers)
        status = expected(route, "per_rule", kind)[2]
        r = send(mesh.nodes["per_rule"], path, headers)
        assert r.status == (status or 200), (route, r.status, r.body[:300])
        # A valid token at the same place is served (denied by the deny rule on claims).
        path, headers = request_parts(route, location, [corp_token(now)], now)
        status = expected(route, "refuse", None)[2]
        r = send(mesh.nodes["refuse"], path, headers)
        assert r.status == (status or 200), (route, r.status, r.body[:300])


def test_one_connection_valid_then_invalid_and_invalid_then_valid(mesh: Mesh) -> None:
    """A refused request ends its connection (nothing behind it is read), so "invalid then
    valid" is on the next connection under ``refuse`` and on the same one under
    ``per_rule``; the gate's decision cache is shared by all of them."""
    now = time.time()
    valid = [("authorization", f"Bearer {corp_token(now, role='admin')}")]
    invalid = [("authorization", "Bearer " + corp_token(
        now, role="admin", key=ec_key("invalid-tokens-forger")))]
    node = mesh.nodes["refuse"]
    for _ in range(2):
        conn = httpclient.HTTPSConnection("127.0.0.1", node.port, context=node.ctx,
                                          timeout=10)
        try:
            for _ in range(3):
                assert send(node, "/open/1", valid, conn).status == 200
            before = app_requests(mesh)
            r = send(node, "/open/1", invalid, conn)
            assert r.status == 401 and r.headers.get("www-authenticate") == BEARER_INVALID
            assert app_requests(mesh) == before + 1
        finally:
            conn.close()
        assert_refused(mesh, node, "/open/1", invalid)
        assert send(node, "/open/1", valid).status == 200
    per_rule = mesh.nodes["per_rule"]
    conn = httpclient.HTTPSConnection("127.0.0.1", per_rule.port, context=per_rule.ctx,
                                      timeout=10)
    try:
        for headers in (invalid, valid, invalid, valid):
            r = send(per_rule, "/open/1", headers, conn)
            assert r.status == 200 and headers[0][1] in json.dumps(r.json()["headers"])
    finally:
        conn.close()


def test_a_reload_with_a_malformed_value_keeps_the_last_good_policy(mesh: Mesh) -> None:
    node = start_node(mesh.tmp, mesh.pki, mesh.app_port, policy_doc(None), "reload")
    try:
        admin = node.sidecar.port("admin")
        version = http(admin, "GET", "/policy").json()["version"]
        now = time.time()
        path, headers = request_parts("token-free", "header", KINDS["expired"][1](now), now)
        assert_refused(mesh, node, path, headers)
        for value in ("maybe", "~", "[per_rule]"):
            failed = http(admin, "GET", "/policy").json()["reloads_failed"]
            replace_file(node.policy_path, policy_text(value))

            def reload_failed(before: int = failed) -> dict[str, Any] | None:
                doc: dict[str, Any] = http(admin, "GET", "/policy").json()
                return doc if doc["reloads_failed"] > before else None

            status = wait_for(reload_failed, timeout=15)
            assert status["version"] == version
            assert "invalid_tokens" in (status["last_reload_error"] or "")
            assert_refused(mesh, node, path, headers)
    finally:
        node.sidecar.stop(timeout=10)
