"""End to end: OAuth 2.0 / OIDC against a real local authorisation server and a real sidecar.

The authorisation server is ``sidecar/demo/idp.py`` in its own process (``tests/idp.py``),
serving metadata, JWKS, the client-credentials grant and introspection over HTTPS on
127.0.0.1. Tokens are obtained from it the way a workload would (mTLS client authentication
binds them to the client certificate), then presented to an inbound sidecar
(``python -m sidecar run``) over real mTLS; the test app echoes what reached it.

One shared sidecar serves most tests (providers on different paths); the discovery failure
sequence uses its own authorisation server and sidecar. Every loop is bounded.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import (
    KubeletVolume,
    Pki,
    Response,
    SidecarProc,
    ThrowawayCA,
    audit_export,
    free_port,
    http,
    mtls_context,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.idp import IdpProc

# Every request here must end in a generic answer, never in an unhandled exception.
pytestmark = pytest.mark.usefixtures("no_internal_errors")

AUD = "orders"
SERVICE_AUD = "https://orders.example"


def rule(name: str, paths: list[str], provider: str, claims: dict[str, Any] | None = None,
         callers: tuple[str, ...] = ("frontend", "batch")) -> dict[str, Any]:
    cond: dict[str, Any] = {"provider": provider}
    if claims:
        cond["claims"] = claims
    return {"name": name, "allow": {"from": [spiffe(c) for c in callers], "paths": paths,
                                    "jwt": cond}}


@dataclass
class Env:
    tmp: Path
    pki: Pki
    idp: IdpProc
    sidecar: SidecarProc
    frontend: Path  # identity dirs
    batch: Path
    audit_dir: Path
    ctx: dict[str, ssl.SSLContext]
    ca_volume: KubeletVolume  # the "opaque-rotated" provider's introspection CA bundle

    def get(self, path: str, token: str | None = None, caller: str = "frontend") -> Response:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        return http(self.sidecar.port("inbound"), "GET", path, headers=headers,
                    ctx=self.ctx[caller])

    def token(self, **form: str) -> str:
        return self.idp.token(identity=self.frontend, **form)


def jwt_provider(idp: IdpProc, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"issuer": idp.issuer, "audiences": [AUD], "algorithms": ["ES256"],
                           "discovery": True, "jwks_ca": idp.ca, "jwks_refresh": "1h",
                           "jwks_min_refetch": "1s"}
    doc.update(extra)
    return doc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("oauth-e2e")
    pki = Pki(tmp / "pki")
    frontend, batch = pki.identity("frontend"), pki.identity("batch")
    # Every process started here is stopped by its pid, also when a later step fails.
    with contextlib.ExitStack() as stack:
        idp = IdpProc(tmp / "idp", client_ca=pki.bundle, clients={"other": "other-secret",
                                                                  "orders": "orders-secret"},
                      mtls_clients=("frontend", "batch", "orders"))
        stack.callback(idp.stop)
        app_proc, app_port = start_app(tmp)
        stack.callback(app_proc.stop, timeout=10)
        policy_dir = tmp / "policy"
        policy_dir.mkdir()
        (policy_dir / "secret").write_text("orders-secret\n")
        (policy_dir / "wrong-secret").write_text("not-the-secret\n")
        ca_volume = KubeletVolume(tmp / "introspection-ca")
        ca_volume.publish({"ca.pem": ThrowawayCA("not the IdP's CA").cert_pem})
        intro = {"endpoint": f"{idp.issuer}/introspect", "ca": idp.ca, "client_id": "orders",
                 "client_secret_file": "secret", "cache_ttl": "1h", "negative_ttl": "1h",
                 "timeout": "1s"}
        providers = {
            "idp": jwt_provider(idp, typ="at+jwt", forward_claims={"client_id": "x-client"}),
            "untyped": jwt_provider(idp),
            "bound": jwt_provider(idp, typ="at+jwt", cert_binding="required"),
            "query": jwt_provider(idp, from_params=["access_token"]),
            "service-aud": {k: v for k, v in jwt_provider(idp).items() if k != "audiences"},
            "opaque": {"issuer": idp.issuer, "audiences": [AUD], "introspection": intro,
                       "forward_claims": {"sub": "x-sub"}},
            "opaque-mtls": {"issuer": idp.issuer, "audiences": [AUD], "introspection": {
                "endpoint": f"{idp.issuer}/introspect", "ca": idp.ca, "client_id": "orders",
                "mtls": True}},
            "opaque-wrong": {"issuer": idp.issuer, "audiences": [AUD], "introspection": {
                **intro, "client_secret_file": "wrong-secret"}},
            "opaque-shared": {"issuer": idp.issuer, "audiences": [AUD], "introspection": {
                **intro, "timeout": "5s", "max_concurrent": 3, "max_concurrent_per_caller": 1}},
            "opaque-rotated": {"issuer": idp.issuer, "audiences": [AUD], "introspection": {
                **intro, "ca": ca_volume.path("ca.pem")}},
            "opaque-places": {"issuer": idp.issuer, "audiences": [AUD], "introspection": {**intro},
                              "from_headers": [{"name": "x-token", "prefix": "Bearer "}],
                              "from_params": ["access_token"], "from_cookies": ["session"]},
        }
        rules = [
            rule("typed", ["/at/**"], "idp", {"scope": {"contains": "orders:read"}}),
            rule("untyped", ["/untyped/**"], "untyped"),
            rule("client", ["/client/**"], "idp", {"client_id": {"one_of": ["frontend"]}}),
            rule("bound", ["/bound/**"], "bound"),
            rule("query", ["/q/**"], "query"),
            rule("service-aud", ["/svc/**"], "service-aud"),
            rule("opaque", ["/opaque/**"], "opaque", {"scope": {"contains": "orders:read"}}),
            rule("opaque-mtls", ["/opaque-mtls/**"], "opaque-mtls"),
            rule("opaque-wrong", ["/opaque-wrong/**"], "opaque-wrong"),
            rule("opaque-places", ["/opaque-places/**"], "opaque-places"),
            rule("opaque-shared", ["/opaque-shared/**"], "opaque-shared"),
            rule("opaque-rotated", ["/opaque-rotated/**"], "opaque-rotated"),
        ]
        policy = {"version": 1, "trust_domain": "demo.local", "jwt_providers": providers,
                  "services": {spiffe("orders"): {"rules": rules, "audience": SERVICE_AUD}}}
        policy_path = policy_dir / "mesh.yaml"
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        audit_dir = tmp / "audit"
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(policy_path), audit={"path": str(audit_dir)})
        sidecar = start_sidecar(tmp, "orders", cfg)
        stack.callback(sidecar.stop, timeout=10)
        ctx = {name: mtls_context(ident, pki.bundle)
               for name, ident in (("frontend", frontend), ("batch", batch))}
        yield Env(tmp, pki, idp, sidecar, frontend, batch, audit_dir, ctx, ca_volume)


def reason_logged(env: Env, reason: str) -> bool:
    return env.sidecar.metric("sidecar_jwt_failures_total", reason=reason) >= 1


# ----------------------------------------------------------------------------- discovery, RFC 9068


def test_discovered_keys_verify_an_access_token(env: Env) -> None:
    # The sidecar was ready only after the first metadata + JWKS fetch: the first token works.
    r = env.get("/at/x", env.token(scope="orders:read"))
    assert r.status == 200
    assert ["x-client", "frontend"] in r.header_list()
    assert env.idp.stats()["metadata"] >= 1


def test_id_token_presented_as_access_token_is_refused(env: Env) -> None:
    id_token = env.token(format="id_token", scope="orders:read")
    r = env.get("/at/x", id_token)
    assert r.status == 401
    assert reason_logged(env, "bad_typ")
    # A provider without typ still takes it: the check is what refuses it above.
    assert env.get("/untyped/x", id_token).status == 200


@pytest.mark.parametrize("scope, status", [
    ("orders:read", 200),
    ("profile orders:read", 200),
    ("orders:read\tadmin", 403),  # RFC 6749 3.3: only SP delimits scope-tokens
    ("orders:read\u00a0admin", 403),
    ("orders:readwrite", 403),
    ("profile", 403),
])
def test_scope_is_split_on_space_only(env: Env, scope: str, status: int) -> None:
    assert env.get("/at/x", env.token(scope=scope)).status == status


def test_client_id_condition(env: Env) -> None:
    assert env.get("/client/x", env.token()).status == 200
    other = env.idp.token(client="other", secret="other-secret")
    assert env.get("/client/x", other).status == 403


def test_provider_without_audiences_takes_the_service_audience(env: Env) -> None:
    assert env.get("/svc/x", env.token(audience=SERVICE_AUD)).status == 200
    assert env.get("/svc/x", env.token()).status == 401  # aud "orders": another API's token
    assert env.get("/svc/x", env.token(audience=spiffe("orders"))).status == 401


# ----------------------------------------------------------------------------- RFC 8705


def test_bound_token_is_accepted_only_from_its_own_workload(env: Env) -> None:
    token = env.token(scope="orders:read")  # bound to frontend's certificate
    assert env.get("/at/x", token).status == 200
    assert env.get("/bound/x", token).status == 200
    # The same token replayed by another workload (its own valid mTLS): refused.
    assert env.get("/at/x", token, caller="batch").status == 401
    assert env.get("/bound/x", token, caller="batch").status == 401
    assert reason_logged(env, "cert_mismatch")
    # batch's own token works for batch.
    assert env.get("/bound/x", env.idp.token(identity=env.batch, client="batch"),
                   caller="batch").status == 200


def test_required_binding_refuses_a_token_without_cnf(env: Env) -> None:
    unbound = env.token(bind="0", scope="orders:read")
    assert env.get("/at/x", unbound).status == 200  # if_present: no cnf, no binding
    assert env.get("/bound/x", unbound).status == 401
    assert reason_logged(env, "unbound_token")


# ----------------------------------------------------------------------------- leakage


def test_query_token_is_removed_before_the_app(env: Env) -> None:
    token = env.token()
    r = http(env.sidecar.port("inbound"), "GET", f"/q/x?a=1&access_token={token}&b=2",
             ctx=env.ctx["frontend"])
    assert r.status == 200
    assert r.json()["path"] == "/q/x?a=1&b=2"


def test_lint_warns_about_query_tokens(env: Env) -> None:
    out = sidecar_cli("policy", "lint", str(env.tmp / "policy" / "mesh.yaml"))
    assert "token-in-query" in out.stdout + out.stderr
    assert "jwt_providers.query" in out.stdout + out.stderr


# ----------------------------------------------------------------------------- RFC 7662


def test_introspection_active_then_cached(env: Env) -> None:
    token = env.idp.token(identity=env.frontend, format="opaque", scope="orders:read")
    before = env.idp.stats()["introspect"]
    r = env.get("/opaque/x", token)
    assert r.status == 200 and ["x-sub", "frontend"] in r.header_list()
    for _ in range(5):
        assert env.get("/opaque/x", token).status == 200
    assert env.idp.stats()["introspect"] == before + 1
    # Revoked at the server: the cached answer still counts until cache_ttl or exp (the
    # documented trade-off), but a fresh token the server calls inactive is refused.
    assert env.get("/opaque/x", env.idp.token(identity=env.frontend, format="opaque",
                                              scope="profile")).status == 403


def test_introspection_inactive_is_refused_and_cached(env: Env) -> None:
    before = env.idp.stats()["introspect"]
    for _ in range(3):
        assert env.get("/opaque/x", "opq_not-a-token-the-server-issued").status == 401
    assert env.idp.stats()["introspect"] == before + 1
    assert reason_logged(env, "inactive")


def test_introspection_with_mtls_client_authentication(env: Env) -> None:
    token = env.idp.token(identity=env.frontend, format="opaque")
    assert env.get("/opaque-mtls/x", token).status == 200


def test_introspection_with_wrong_client_secret_fails_closed(env: Env) -> None:
    token = env.idp.token(identity=env.frontend, format="opaque")
    assert env.get("/opaque-wrong/x", token).status == 401
    assert env.sidecar.metric("sidecar_jwt_failures_total", provider="opaque-wrong",
                              reason="introspection_unavailable") >= 1
    logged = env.sidecar.log_events("introspection_failed")
    assert any("401" in e.get("error", "") and e.get("provider") == "opaque-wrong"
               for e in logged), logged
    # Requests on other paths never reach this provider's endpoint or count against it.
    before = env.sidecar.metric("sidecar_jwt_failures_total", provider="opaque-wrong")
    assert env.get("/opaque/x", env.idp.token(identity=env.frontend, format="opaque",
                                              scope="orders:read")).status == 200
    assert env.sidecar.metric("sidecar_jwt_failures_total", provider="opaque-wrong") == before


@pytest.mark.parametrize("mode", ["slow", "fail"])
def test_introspection_endpoint_slow_or_down_fails_closed(env: Env, mode: str) -> None:
    env.idp.control(mode={"introspect": mode}, delay=3)
    try:
        token = env.idp.token(identity=env.frontend, format="opaque", scope="orders:read")
        assert env.get("/opaque/x", token).status == 401
    finally:
        env.idp.control(mode={"introspect": "ok"})
    # The server is back: after the failure backoff the same token is introspected again.
    wait_for(lambda: env.get("/opaque/x", token).status == 200, timeout=10, interval=0.3)


def test_an_introspection_ca_rotated_in_place_is_used_at_the_next_call(env: Env) -> None:
    """The provider's ``ca`` is a Secret volume's file that first holds another CA: calls
    fail (fail closed). The volume is updated to the authorisation server's CA: the next
    call after the failure backoff uses it (before: up to a minute later)."""
    token = env.idp.token(identity=env.frontend, format="opaque")
    assert env.get("/opaque-rotated/x", token).status == 401
    assert env.sidecar.metric("sidecar_jwt_failures_total", provider="opaque-rotated",
                              reason="introspection_unavailable") >= 1
    env.ca_volume.publish({"ca.pem": Path(env.idp.ca).read_bytes()})
    assert wait_for(lambda: env.get("/opaque-rotated/x", token).status == 200, timeout=10,
                    interval=0.3)


def test_one_caller_cannot_take_every_introspection_slot(env: Env) -> None:
    """``max_concurrent_per_caller``: frontend's three new tokens at once are asked about one
    at a time (its share is 1 of 3 slots), and batch's new token meanwhile at once. Without
    the share frontend's three would hold every slot and batch's would wait for one."""
    import threading

    frontend = [env.idp.token(identity=env.frontend, format="opaque") for _ in range(3)]
    batch = env.idp.token(identity=env.batch, format="opaque")
    status: dict[str, int] = {}

    def get(key: str, token: str, caller: str) -> None:
        status[key] = env.get("/opaque-shared/x", token, caller=caller).status

    env.idp.control(mode={"introspect": "slow"}, delay=1.0)
    try:
        threads = [threading.Thread(target=get, args=(f"frontend-{i}", token, "frontend"))
                   for i, token in enumerate(frontend)]
        for thread in threads:
            thread.start()
        wait_for(lambda: env.idp.stats()["slow_in_flight_max"]["introspect"] >= 1,
                 timeout=10, interval=0.05)
        threads.append(threading.Thread(target=get, args=("batch", batch, "batch")))
        threads[-1].start()
        for thread in threads:
            thread.join(timeout=20)
        most = env.idp.stats()["slow_in_flight_max"]["introspect"]
    finally:
        env.idp.control(mode={"introspect": "ok"})
    assert status == {"frontend-0": 200, "frontend-1": 200, "frontend-2": 200, "batch": 200}
    assert most == 2  # one of frontend's, batch's


# Tokens outside RFC 6750's b64token syntax (the family: tests/test_opaque_token_syntax.py),
# as each place carries them over the wire: never sent to the authorisation server.
NOT_BEARER = ["opq_ab cd", 'opq_ab"cd', "opq_ab,cd", "opq_ab%cd", "opq_ab\\cd", "opq_ab:cd",
              "opq_ab=cd", "=opq_abcd", "opq_ab\xe9cd"]


@pytest.mark.parametrize("place", ["header", "query", "cookie"])
def test_tokens_that_are_not_bearer_tokens_are_never_introspected(env: Env, place: str) -> None:
    from urllib.parse import quote

    good = env.idp.token(identity=env.frontend, format="opaque")
    members = NOT_BEARER + (["opq_ab\x00cd", "opq_ab\ncd", "opq_ab\u00e9cd"]
                            if place == "query" else [])

    def get(token: str) -> Response:
        headers: list[tuple[str, str]] = []
        path = "/opaque-places/x"
        if place == "header":
            headers = [("x-token", f"Bearer {token}")]
        elif place == "query":
            path += "?access_token=" + quote(token, safe="")
        else:
            headers = [("cookie", f"session={token}")]
        return http(env.sidecar.port("inbound"), "GET", path, headers=headers,
                    ctx=env.ctx["frontend"])

    assert get(good).status == 200  # the place is read, and a good token is asked about
    before = env.idp.stats()["introspect"]
    malformed = env.sidecar.metric("sidecar_jwt_failures_total", provider="opaque-places",
                                   reason="malformed")
    for token in members:
        assert get(token).status == 401, token
    assert env.idp.stats()["introspect"] == before
    assert env.sidecar.metric("sidecar_jwt_failures_total", provider="opaque-places",
                              reason="malformed") == malformed + len(members)


# ----------------------------------------------------------------------------- rotation


def test_rotation_is_followed_through_discovery(env: Env) -> None:
    old = env.token(scope="orders:read")
    assert env.get("/at/x", old).status == 200
    env.idp.control(rotate=True, drop_old=True)
    new = env.token(scope="orders:read")
    # The unknown kid makes the sidecar refetch metadata and keys in the background.
    wait_for(lambda: env.get("/at/x", new).status == 200, timeout=10, interval=0.2)
    # The old key is gone from the set: its cached verdict was dropped.
    assert env.get("/at/x", old).status == 401


# ----------------------------------------------------------------------------- no token anywhere


def test_no_token_in_logs_or_audit(env: Env) -> None:
    jwt_token = env.token(scope="orders:read")
    opaque = env.idp.token(identity=env.frontend, format="opaque", scope="orders:read")
    http(env.sidecar.port("inbound"), "GET", f"/q/x?access_token={jwt_token}",
         ctx=env.ctx["frontend"])
    env.get("/at/x", jwt_token, caller="batch")  # refused: cert_mismatch
    env.get("/opaque/x", opaque)
    env.get("/opaque-wrong/x", opaque)
    env.get("/at/x", jwt_token + "x")  # bad signature
    metrics = env.sidecar.metrics()
    wait_for(lambda: len(audit_export(env.audit_dir)) > 0, timeout=10)
    audit = repr(audit_export(env.audit_dir))
    logs = env.sidecar.output()
    for secret in (jwt_token, opaque, jwt_token.split(".")[2], opaque[4:], "orders-secret"):
        assert secret not in logs
        assert secret not in audit
        assert secret not in metrics


# ----------------------------------------------------------------------------- discovery failures


def test_discovery_failures_keep_the_provider_closed(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    frontend = pki.identity("frontend")
    idp = IdpProc(tmp_path / "idp", client_ca=pki.bundle, mtls_clients=("frontend",))
    procs: list[Any] = [idp]
    try:
        app_proc, app_port = start_app(tmp_path)
        procs.append(app_proc)
        idp.control(mode={"metadata": "fail"})  # provider down at start
        policy = {"version": 1, "trust_domain": "demo.local",
                  "jwt_providers": {"idp": jwt_provider(idp, jwks_refresh="1s")},
                  "services": {spiffe("orders"): {"rules": [rule("at", ["/**"], "idp")]}}}
        policy_path = tmp_path / "mesh.yaml"
        policy_path.write_text(yaml.safe_dump(policy))
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(policy_path))
        sidecar = start_sidecar(tmp_path, "orders", cfg)  # ready after the first attempt
        procs.append(sidecar)
        ctx = mtls_context(frontend, pki.bundle)
        token = idp.token(identity=frontend)

        def status() -> int:
            return http(sidecar.port("inbound"), "GET", "/x",
                        headers={"authorization": f"Bearer {token}"}, ctx=ctx).status

        def failed_with(word: str) -> bool:
            return any(word in e.get("error", "") for e in sidecar.log_events("jwks_fetch_failed"))

        assert status() == 401  # no keys: never a silent allow
        for override, word in (({"issuer": idp.issuer + "/"}, "is not the configured"),
                               ({"jwks_uri": f"http://127.0.0.1:{idp.port}/jwks"}, "https")):
            idp.control(mode={"metadata": "ok"}, metadata=override)
            wait_for(lambda word=word: failed_with(word), timeout=10, interval=0.2)
            assert status() == 401
            assert idp.stats()["jwks"] == 0  # the keys were never fetched from a bad document
        idp.control(metadata={})
        wait_for(lambda: status() == 200, timeout=10, interval=0.2)
    finally:
        for p in reversed(procs):
            p.stop()
