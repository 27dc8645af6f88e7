"""What a valid policy decides, where a request escaped its meaning (a hostile review of the
twenty-sixth session), as families of data, decided in process and through real sidecars.

* A deny rule with ``mode: enforce`` in a dry-run section or policy was skipped when a deny
  rule that dry-runs by the section's mode matched first (the first matching deny decided),
  so ``DELETE /admin/users`` reached the app -- and ``policy explain`` said so too; the same
  for an enforced allow rule's 401/403 near miss.
* A request an observed (``mode: dry-run``) deny rule matched skipped the rate limiter: a
  caller switched its own limit off by sending such paths.
* On a ``protocol: tcp`` listener an allow rule with ``paths: ["/"]`` or ``["/**"]`` matched
  a stream (its empty path) and let any caller open one.
* ``policy explain`` without ``--listener``/``--port`` decided for listener "" and port 0,
  which no request has: a deny rule on ``listeners: [inbound]`` or a port was shown failing.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.policy.decision import NO_AUTH, AuthFacts, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.loader import load_policy
from tests.harness import (
    Pki,
    free_port,
    http,
    mtls_context,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    write_policy,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

TD = "demo.local"
ORDERS, FRONT, INTRUDER = spiffe("orders"), spiffe("frontend"), spiffe("intruder")


def _policy(rules: list[dict[str, Any]], *, section_mode: str | None = None,
            policy_mode: str | None = None, **extra: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {"rules": rules}
    if section_mode:
        svc["mode"] = section_mode
    doc: dict[str, Any] = {"version": 1, "trust_domain": TD, **extra,
                           "services": {ORDERS: svc}}
    if policy_mode:
        doc["mode"] = policy_mode
    return doc


def _decide(doc: dict[str, Any], method: str, path: str, auth: AuthFacts = NO_AUTH,
            peer: str = FRONT) -> Any:
    policy = load_policy(yaml.safe_dump(doc), "p.yaml")
    facts = RequestFacts("inbound", peer, "10.0.0.1", method, path, "orders", 15443,
                         "inbound")
    return decide(policy, ORDERS, facts, auth, 0.0)


# -- an enforced rule in a dry-run section or policy ----------------------------------------

OBSERVE_DELETES = {"name": "observe-deletes", "deny": {"methods": ["DELETE"]}}
NEVER_DELETE_ADMIN = {"name": "never-delete-admin", "mode": "enforce",
                      "deny": {"methods": ["DELETE"], "paths": ["/admin/**"]}}
FRONTEND = {"name": "frontend", "allow": {"from": [FRONT]}}
WHERE_DRY = {"section": {"section_mode": "dry-run"}, "policy": {"policy_mode": "dry-run"}}
ORDERS_OF_RULES = {
    "inherited first": [OBSERVE_DELETES, NEVER_DELETE_ADMIN, FRONTEND],
    "enforced first": [NEVER_DELETE_ADMIN, OBSERVE_DELETES, FRONTEND],
    "allow first": [FRONTEND, OBSERVE_DELETES, NEVER_DELETE_ADMIN],
    "enforced alone": [NEVER_DELETE_ADMIN, FRONTEND],
}


@pytest.mark.parametrize("where", sorted(WHERE_DRY))
@pytest.mark.parametrize("order", sorted(ORDERS_OF_RULES))
def test_an_enforced_deny_in_a_dry_run_section_refuses_whatever_the_order(where, order):
    doc = _policy(ORDERS_OF_RULES[order], **WHERE_DRY[where])
    d = _decide(doc, "DELETE", "/admin/users")
    assert (d.action, d.rule, d.status, d.dry_run) == ("deny", "never-delete-admin", 403,
                                                       False), d
    # The inherited dry-run deny still only reports, where the enforced one does not match.
    d = _decide(doc, "DELETE", "/orders/1")
    assert d.action == "allow" and (d.dry_run or "observe-deletes" not in str(
        ORDERS_OF_RULES[order])), d


NEAR_MISSES = {
    # (rules, expected status): an enforced allow rule's near miss decides, not a rule that
    # dry-runs by the section's mode
    "401 enforced after a 403 inherited": ([
        {"name": "key-holders", "allow": {"paths": ["/x"], "apikey": ["k2"]}},
        {"name": "token-holders", "mode": "enforce",
         "allow": {"paths": ["/x"], "jwt": {"provider": "corp"}}}], 401),
    "403 enforced after a 401 inherited": ([
        {"name": "token-holders", "allow": {"paths": ["/x"], "jwt": {"provider": "corp"}}},
        {"name": "key-holders", "mode": "enforce",
         "allow": {"paths": ["/x"], "apikey": ["k2"]}}], 403),
}


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_an_enforced_allow_rules_near_miss_decides_in_a_dry_run_section(case):
    rules, status = NEAR_MISSES[case]
    doc = _policy(rules, section_mode="dry-run", api_keys=[
        {"name": "k1", "sha256": "a" * 64}, {"name": "k2", "sha256": "b" * 64}],
        jwt_providers={"corp": {"issuer": "i", "audiences": ["a"], "algorithms": ["ES256"],
                                "jwks_file": "k.json"}})
    auth = AuthFacts(apikey="k1")  # a valid key, not the one key-holders names; no token
    d = _decide(doc, "GET", "/x", auth)
    assert (d.action, d.status, d.dry_run) == ("deny", status, False), d


def test_a_dry_run_section_without_enforced_rules_still_only_reports():
    doc = _policy([OBSERVE_DELETES, FRONTEND], section_mode="dry-run")
    d = _decide(doc, "DELETE", "/admin/users")
    assert (d.action, d.rule, d.dry_run, d.would) == ("allow", "observe-deletes", True, "deny")


# -- TCP streams: an allow rule with a request condition never matches -----------------------

REQUEST_CONDITIONS = {
    "paths /": {"paths": ["/"]},
    "paths /**": {"paths": ["/**"]},
    "paths /*": {"paths": ["/*"]},
    "methods": {"methods": ["GET"]},
    "hosts": {"hosts": ["orders"]},
    "jwt": {"jwt": {"provider": "corp"}},
    "apikey": {"apikey": True},
}


@pytest.mark.parametrize("cond", sorted(REQUEST_CONDITIONS))
def test_an_allow_rule_with_a_request_condition_never_admits_a_stream(cond):
    doc = _policy([{"name": "web", "allow": REQUEST_CONDITIONS[cond]},
                   {"name": "frontend-streams", "allow": {"from": [FRONT]}}],
                  api_keys=[{"name": "k1", "sha256": "a" * 64}],
                  jwt_providers={"corp": {"issuer": "i", "audiences": ["a"],
                                          "algorithms": ["ES256"], "jwks_file": "k.json"}})
    policy = load_policy(yaml.safe_dump(doc), "p.yaml")
    for peer, allowed in ((INTRUDER, False), (FRONT, True)):
        stream = RequestFacts("inbound", peer, "10.0.0.1", "", "", "", 15443, "inbound")
        assert decide(policy, ORDERS, stream, NO_AUTH, 0.0).allowed is allowed, (cond, peer)


# -- through real sidecars -------------------------------------------------------------------


def _start(tmp: Path, doc: dict[str, Any], procs: list, **inbound: Any) -> Any:
    pki = Pki(tmp / "pki")
    app, app_port = start_app(tmp)
    procs.append(app)
    policy = write_policy(tmp / "policy.yaml", doc)
    cfg = sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}", **inbound},
        policy=policy)
    sc = start_sidecar(tmp, "orders", cfg)
    procs.append(sc)
    return sc, pki


def test_an_enforced_deny_in_a_dry_run_section_refuses_through_a_sidecar(tmp_path, procs):
    sc, pki = _start(tmp_path, _policy(ORDERS_OF_RULES["inherited first"],
                                       section_mode="dry-run"), procs)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(sc.port("inbound"), "DELETE", "/admin/users", ctx=ctx).status == 403
    assert http(sc.port("inbound"), "DELETE", "/orders/1", ctx=ctx).status == 200


@pytest.mark.parametrize("dry", ["observed deny rule", "dry-run section"])
def test_requests_a_dry_run_decision_lets_through_are_rate_limited(tmp_path, procs, dry):
    rules: list[dict[str, Any]] = [FRONTEND]
    mode = None
    if dry == "observed deny rule":
        rules = [{"name": "watch-exports", "mode": "dry-run",
                  "deny": {"paths": ["/export/**"]}}, FRONTEND]
    else:
        rules, mode = [{"name": "no-exports", "deny": {"paths": ["/export/**"]}},
                       FRONTEND], "dry-run"
    doc = _policy(rules, section_mode=mode, rate_limits=[
        {"name": "per-caller", "rate": "1/m", "burst": 2, "per": "peer"}])
    sc, pki = _start(tmp_path, doc, procs)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    got = [http(sc.port("inbound"), "GET", "/export/all", ctx=ctx).status for _ in range(5)]
    assert got == [200, 200, 429, 429, 429], got


def test_a_tcp_listener_admits_no_stream_by_an_allow_rule_on_paths(tmp_path, procs):
    echo = socket.create_server(("127.0.0.1", 0))
    try:
        doc = _policy([{"name": "landing", "allow": {"paths": ["/", "/**"]}}])
        pki = Pki(tmp_path / "pki")
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}",
            "app": f"127.0.0.1:{echo.getsockname()[1]}", "protocol": "tcp"},
            policy=write_policy(tmp_path / "policy.yaml", doc))
        sc = start_sidecar(tmp_path, "orders", cfg)
        procs.append(sc)
        ctx = mtls_context(pki.identity("intruder"), pki.bundle)
        with socket.create_connection(("127.0.0.1", sc.port("inbound")), timeout=10) as raw, \
                ctx.wrap_socket(raw) as tls:
            tls.sendall(b"DELETE /admin/all HTTP/1.1\r\nHost: orders\r\n\r\n")
            try:
                got = tls.recv(100)
            except (OSError, ssl.SSLError):
                got = b""
        assert got == b"", got
        echo.settimeout(0.5)
        with pytest.raises(TimeoutError):
            echo.accept()  # nothing was dialled for the intruder
    finally:
        echo.close()


# -- policy explain's defaults ------------------------------------------------------------------


def test_explain_decides_for_the_inbound_listener_and_asks_for_a_port(tmp_path):
    doc = _policy([{"name": "no-deletes", "deny": {"listeners": ["inbound"],
                                                   "methods": ["DELETE"]}},
                   {"name": "no-port-9", "deny": {"ports": [9], "paths": ["/p9"]}}, FRONTEND])
    f = write_policy(tmp_path / "p.yaml", doc)
    base = ["policy", "explain", f, "--to", ORDERS, "--from", FRONT, "--host", "orders"]
    r = sidecar_cli(*base, "--method", "DELETE", "--path", "/x", "--port", "15443")
    assert r.returncode == 1 and "no-deletes" in r.stdout, r.stdout  # as the sidecar: 403
    r = sidecar_cli(*base, "--path", "/p9")
    assert r.returncode == 2 and "no-port-9" in r.stderr and "--port" in r.stderr
    r = sidecar_cli(*base, "--path", "/p9", "--port", "9")
    assert r.returncode == 1 and "no-port-9" in r.stdout
