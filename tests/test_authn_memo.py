"""CredentialMemo: a connection's last verified credentials, and everything that ends them.

The family is every input ``authenticate``'s answer depends on (sidecar/authn/memo.py): the
credential headers, the clock (exp, the cache's max TTL), the key sets, the providers,
revocations and API keys of the policy, the section's providers, the default audience and
the connection's certificate thumbprint. ``CHANGES`` holds one member per input: two
requests on one connection, the change between them, and what the second must get. Every
answer read through the memo is also compared with the whole path's answer for the same
request (the authenticator without a memo), so a memo that outlives any change fails here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from sidecar.authn.apikeys import api_key_sha256
from sidecar.authn.authenticator import Authenticator
from sidecar.authn.memo import CredentialMemo
from sidecar.authn.oauth import x5t_from_hex
from sidecar.policy.decision import AuthFacts
from sidecar.policy.sections import ApiKey, JwtProvider, PolicyExtras, Revocation, TokenLocation
from tests.test_authn_support import (
    AUDIENCE,
    COOKIE_LOCATION,
    NOW,
    QUERY_LOCATION,
    claims,
    ec_key,
    key_set,
    mint,
    provider,
)

CORP = provider()
API_KEY = "sk_memo_test_key"
PEER_X5T = x5t_from_hex(hashlib.sha256(b"peer certificate").hexdigest())
OTHER_X5T = x5t_from_hex(hashlib.sha256(b"another certificate").hexdigest())


@dataclass
class Connection:
    """One authenticator and one connection's memo, and what its next request carries."""

    authn: Authenticator
    token: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    now: float = NOW
    providers: frozenset[str] = frozenset({"corp"})
    audience: str | None = "orders"
    x5t: str | None = PEER_X5T
    memo: CredentialMemo = field(default_factory=CredentialMemo)
    provider: JwtProvider = CORP

    def request(self) -> AuthFacts:
        """The next request through the memo, checked against the whole path."""
        got = self.authn.authenticate(self.providers, self.headers, "", self.now,
                                      peer_x5t=self.x5t, audience=self.audience,
                                      memo=self.memo)
        whole = self.authn.authenticate(self.providers, self.headers, "", self.now,
                                        peer_x5t=self.x5t, audience=self.audience)
        assert (got.claims, got.token_errors, got.apikey) == (
            whole.claims, whole.token_errors, whole.apikey)
        return got

    @property
    def hits(self) -> int:
        return int(self.authn.statistics(self.now)["memo_hits"])

    def extras(self, **changes: Any) -> PolicyExtras:
        base = PolicyExtras(jwt_providers={"corp": self.provider},
                            api_keys=(ApiKey("batch", api_key_sha256(API_KEY)),))
        return replace(base, **changes)


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + token.encode())


def connect(prov: JwtProvider = CORP, **claim_overrides: Any) -> Connection:
    """A connection whose requests carry one valid token (verified by the first one)."""
    authn = Authenticator()
    token = mint(claims(**claim_overrides), ec_key())
    conn = Connection(authn, token, [(b"host", b"orders"), bearer(token)], provider=prov)
    authn.update(conn.extras())
    authn.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    return conn


def _set(**attrs: Any) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        for name, value in attrs.items():
            setattr(conn, name, value)
    return apply


def _headers(change: Callable[[Connection], list[tuple[bytes, bytes]]]
             ) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        conn.headers = change(conn)
    return apply


def _policy(**changes: Any) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        conn.authn.update(conn.extras(**changes))
    return apply


def _keys(*pairs: tuple[Any, str]) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        conn.authn.set_keys("corp", key_set(*pairs), conn.now)
    return apply


@dataclass(frozen=True)
class Change:
    """What changes between two requests on one connection, and what the second gets:
    ``kept`` (the memo's answer, no work), ``verified`` (claims again, by the whole path),
    ``none`` (no credentials), ``apikey`` (a valid API key) or a failure reason."""

    name: str
    apply: Callable[[Connection], None]
    outcome: str
    claims: dict[str, Any] = field(default_factory=dict)  # the token's claim overrides
    provider: JwtProvider = CORP


CHANGES = [
    Change("nothing", lambda conn: None, "kept"),
    Change("a header that is no credential", _headers(
        lambda c: [(b"host", b"orders"), (b"user-agent", b"curl"), bearer(c.token)]), "kept"),
    Change("the clock, within the token's life", _set(now=NOW + 300), "kept"),
    Change("another token", _headers(
        lambda c: [bearer(mint(claims(sub="bob", jti="t-2"), ec_key()))]), "verified"),
    Change("the scheme's spelling", _headers(
        lambda c: [(b"authorization", b"bearer " + c.token.encode())]), "verified"),
    Change("a second Authorization header", _headers(
        lambda c: [bearer(c.token), bearer(c.token)]), "multiple_tokens"),
    Change("the token removed", _headers(lambda c: [(b"host", b"orders")]), "none"),
    Change("a valid API key added", _headers(
        lambda c: [bearer(c.token), (b"x-api-key", API_KEY.encode())]), "apikey"),
    Change("an unknown API key added", _headers(
        lambda c: [bearer(c.token), (b"x-api-key", b"sk_nobody")]), "verified"),
    Change("past the token's exp", _set(now=NOW + 600 + 31), "expired"),
    Change("past the cache's max TTL (no exp)", _set(now=NOW + 3600 + 1), "verified",
           {"exp": None}, replace(CORP, required_claims=())),
    Change("its key rotated out", _keys((ec_key("ec-2"), "ec-2")), "unknown_kid"),
    Change("its key set refreshed", _keys((ec_key(), "ec-1"), (ec_key("ec-2"), "ec-2")),
           "verified"),
    Change("its jti revoked", _policy(revocations=(Revocation(jti="t-1"),)), "revoked"),
    Change("its sub revoked", _policy(revocations=(Revocation(sub="alice"),)), "revoked"),
    Change("another jti revoked", _policy(revocations=(Revocation(jti="t-9"),)), "verified"),
    Change("the provider's audience", _policy(
        jwt_providers={"corp": replace(CORP, audiences=("other",))}), "bad_audience"),
    Change("the provider's issuer", _policy(
        jwt_providers={"corp": replace(CORP, issuer="https://elsewhere.example/")}),
        "bad_issuer"),
    Change("the provider removed", _policy(jwt_providers={}), "unknown_provider"),
    Change("the API keys", _policy(api_keys=()), "verified"),
    Change("the section's providers (another set)", _set(providers=frozenset({"corp"})),
           "verified"),
    Change("the certificate, for a bound token", _set(x5t=OTHER_X5T), "cert_mismatch",
           {"cnf": {"x5t#S256": PEER_X5T}}),
]


@pytest.mark.parametrize("change", CHANGES, ids=[c.name for c in CHANGES])
def test_every_change_between_two_requests_is_followed(change: Change) -> None:
    conn = connect(change.provider, **change.claims)
    first = conn.request()
    assert first.claims["corp"]["sub"] == "alice" and not first.token_errors
    assert conn.request() is first and conn.hits == 1  # the memo answers the same request
    change.apply(conn)
    second = conn.request()
    if change.outcome == "kept":
        assert second is first and conn.hits == 2
        return
    assert second is not first and conn.hits == 1
    if change.outcome == "verified":
        assert second.claims and not second.token_errors and second.apikey is None
    elif change.outcome == "none":
        assert not second.claims and not second.token_errors
    elif change.outcome == "apikey":
        assert second.apikey == "batch"
    else:
        assert second.token_errors == {"corp": change.outcome}
    # A refusal is never kept: the same request is refused (and counted) again.
    if second.token_errors:
        failures = conn.authn.statistics(conn.now)["failures"][change.outcome]
        assert conn.request().token_errors == second.token_errors
        assert conn.authn.statistics(conn.now)["failures"][change.outcome] == failures + 2


def test_a_provider_without_audiences_follows_the_services_default_audience() -> None:
    conn = connect(replace(CORP, audiences=()), aud="orders")
    first = conn.request()
    assert first.claims and conn.request() is first
    conn.audience = "payments"  # a reload gave the service another default audience
    assert conn.request().token_errors == {"corp": "bad_audience"}


def test_an_unknown_api_key_is_refused_and_counted_on_every_request() -> None:
    conn = connect()
    conn.headers = [bearer(conn.token), (b"x-api-key", b"sk_nobody")]
    for _ in range(3):
        assert conn.request().claims
    # (two calls per request: through the memo and the whole path's check)
    assert conn.authn.statistics(NOW)["apikeys"]["refused"] == 6 and conn.hits == 0


NOT_KEPT: list[tuple[str, JwtProvider, Callable[[str], tuple[list[tuple[bytes, bytes]], str]]]] = [
    ("a query token", replace(CORP, locations=(QUERY_LOCATION,)),
     lambda t: ([], f"access_token={t}")),
    ("a cookie token", replace(CORP, locations=(COOKIE_LOCATION,)),
     lambda t: ([(b"cookie", f"session={t}".encode())], "")),
    ("a header or a query token", replace(CORP, locations=(
        TokenLocation("header", "authorization", "Bearer "), QUERY_LOCATION)),
     lambda t: ([bearer(t)], "")),
]


@pytest.mark.parametrize("name,prov,place", NOT_KEPT, ids=[n for n, _, _ in NOT_KEPT])
def test_tokens_outside_headers_are_never_kept(
        name: str, prov: JwtProvider,
        place: Callable[[str], tuple[list[tuple[bytes, bytes]], str]]) -> None:
    authn = Authenticator(PolicyExtras(jwt_providers={"corp": prov}))
    authn.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    headers, query = place(mint(claims(), ec_key()))
    memo, providers = CredentialMemo(), frozenset({"corp"})
    for _ in range(3):
        facts = authn.authenticate(providers, headers, query, NOW, memo=memo)
        assert facts.claims["corp"]["sub"] == "alice"
    assert authn.statistics(NOW)["memo_hits"] == 0


def test_nothing_is_kept_without_a_verification_cache() -> None:
    authn = Authenticator(PolicyExtras(jwt_providers={"corp": CORP}), cache_size=0)
    authn.set_keys("corp", key_set((ec_key(), "ec-1")), NOW)
    memo, headers = CredentialMemo(), [bearer(mint(claims(), ec_key()))]
    for _ in range(3):
        assert authn.authenticate(frozenset({"corp"}), headers, "", NOW, memo=memo).claims
    stats = authn.statistics(NOW)
    assert stats["memo_hits"] == 0 and stats["verified"] == 3


def test_introspected_providers_are_never_kept() -> None:
    from sidecar.authn.oauth import token_digest
    from sidecar.policy.sections import Introspection

    prov = replace(CORP, introspection=Introspection(
        endpoint="https://idp.example/introspect", client_id="c", client_secret_file="s"))
    authn = Authenticator(PolicyExtras(jwt_providers={"corp": prov}))
    authn.introspected.store("corp", token_digest("opaque"),
                             {"active": True, "sub": "alice", "aud": AUDIENCE}, NOW, 60, 5)
    memo, headers = CredentialMemo(), [(b"authorization", b"Bearer opaque")]
    for _ in range(2):
        assert authn.authenticate(frozenset({"corp"}), headers, "", NOW, memo=memo).claims
    # The server's answer changes for the same token: the next request follows it.
    authn.introspected.store("corp", token_digest("opaque"), None, NOW, 60, 5)
    facts = authn.authenticate(frozenset({"corp"}), headers, "", NOW, memo=memo)
    assert facts.token_errors == {"corp": "inactive"}
    assert authn.statistics(NOW)["memo_hits"] == 0


def test_two_connections_keep_their_own_credentials() -> None:
    conn = connect()
    other = Connection(conn.authn, mint(claims(sub="bob", jti="t-2"), ec_key()))
    other.headers = [bearer(other.token)]
    for _ in range(2):
        assert conn.request().claims["corp"]["sub"] == "alice"
        assert other.request().claims["corp"]["sub"] == "bob"
    assert conn.hits == 2
