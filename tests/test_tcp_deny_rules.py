"""DENY rules on opaque TCP streams (``protocol: tcp``): the conditions a stream cannot carry
(methods, paths, hosts, jwt, apikey) are left out of a DENY rule, so it denies more; an
ALLOW rule with them never matches a stream (docs/policy.md, "TCP listeners").

A hostile review found the opposite for DENY: on a TCP listener ``deny {from: [frontend],
methods: [DELETE]}`` denied nothing, and the frontend's stream carried ``DELETE /admin``
to the app, which the same policy refused over HTTP.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path

import pytest
import yaml

from sidecar.policy.decision import NO_AUTH, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.loader import load_policy
from tests.harness import (
    TD,
    free_port,
    mtls_context,
    sidecar_config,
    spiffe,
    start_sidecar,
    write_policy,
)

FRONT = spiffe("frontend")
BILLING = spiffe("billing")
ORDERS = spiffe("orders")

# A DENY rule's request and credential conditions, each of which a stream cannot carry.
LAYER7 = {
    "methods": {"methods": ["DELETE"]},
    "paths": {"paths": ["/admin/**"]},
    "hosts": {"hosts": ["orders.internal"]},
    "jwt": {"jwt": {"provider": "corp"}},
    "jwt_claims": {"jwt": {"provider": "corp", "claims": {"role": "guest"}}},
    "apikey": {"apikey": True},
    "all_of_them": {"methods": ["POST"], "paths": ["/x"], "hosts": ["h"],
                    "jwt": {"provider": "corp"}},
}
# The stream conditions next to them -> whether the frontend's stream is denied.
LAYER4 = {
    "from_frontend": ({"from": [FRONT]}, True),
    "from_billing": ({"from": [BILLING]}, False),
    "namespace": ({"namespaces": [FRONT.split("/ns/")[1].split("/")[0]]}, True),
    "other_port": ({"from": [FRONT], "ports": [1]}, False),
    "listener": ({"from": [FRONT], "listeners": ["inbound"]}, True),
    "anyone": ({}, True),
}


def _policy(deny: dict) -> dict:
    return {
        "version": 1, "trust_domain": TD,
        "jwt_providers": {"corp": {"issuer": "https://i", "audiences": ["a"],
                                   "algorithms": ["ES256"], "jwks_file": "k.json"}},
        "services": {ORDERS: {"rules": [
            {"name": "no", "deny": deny},
            {"name": "yes", "allow": {"from": [FRONT, BILLING]}},
        ]}},
    }


def _stream(peer: str, port: int = 15443) -> RequestFacts:
    return RequestFacts(direction="inbound", peer=peer, source="127.0.0.1", method="",
                        path="", host="", port=port, listener="inbound")


@pytest.mark.parametrize("l4", sorted(LAYER4))
@pytest.mark.parametrize("l7", sorted(LAYER7))
def test_a_deny_rule_on_a_stream_ignores_what_a_stream_cannot_carry(l7: str, l4: str) -> None:
    when, denied = LAYER4[l4]
    policy = load_policy(yaml.safe_dump(_policy({**when, **LAYER7[l7]})), "p.yaml")
    for unindexed in (False, True):
        got = decide(policy, ORDERS, _stream(FRONT), NO_AUTH, 0.0, _unindexed=unindexed)
        assert (got.action, got.rule) == (("deny", "no") if denied else ("allow", "yes"))
    # Over HTTP the same rule keeps its conditions: a GET to /orders is not what it denies.
    http = _stream(FRONT)._replace(method="GET", path="/orders", host="orders")
    assert decide(policy, ORDERS, http, NO_AUTH, 0.0).action == "allow"


def test_an_allow_rule_with_request_conditions_never_matches_a_stream() -> None:
    doc = _policy({"from": [BILLING]})
    doc["services"][ORDERS]["rules"][1] = {"name": "yes", "allow": {"from": [FRONT],
                                                                     "methods": ["GET"]}}
    policy = load_policy(yaml.safe_dump(doc), "p.yaml")
    got = decide(policy, ORDERS, _stream(FRONT), NO_AUTH, 0.0)
    assert (got.action, got.rule) == ("deny", "default deny")


def _echo_app() -> tuple[socket.socket, list[bytes]]:
    """A TCP app that echoes, and what it received."""
    import threading

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            # A stream the sidecar cuts (a deny after the first bytes) ends in a reset.
            with conn, contextlib.suppress(ConnectionResetError):
                while data := conn.recv(65536):
                    seen.append(data)
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return lsock, seen


def _send(port: int, ctx: ssl.SSLContext, data: bytes) -> bytes:
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
        try:
            s.sendall(data)
            return s.recv(4096)
        except (OSError, ssl.SSLError):
            return b""


def test_a_tcp_listener_enforces_a_deny_rule_with_request_conditions(tmp_path: Path, pki,
                                                                      procs) -> None:
    lsock, seen = _echo_app()
    try:
        policy = write_policy(tmp_path / "mesh.yaml", _policy({"from": [FRONT],
                                                               "methods": ["DELETE"]}))
        (tmp_path / "k.json").write_text('{"keys": []}')
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{lsock.getsockname()[1]}",
            "protocol": "tcp"}, policy=policy)
        b = start_sidecar(tmp_path, "orders", cfg)
        procs.append(b)
        port = b.port("inbound")
        request = b"DELETE /admin/orders HTTP/1.1\r\nHost: orders\r\n\r\n"
        assert _send(port, mtls_context(pki.identity("frontend"), pki.bundle), request) == b""
        assert b.metric("sidecar_requests_total", direction="inbound", decision="deny",
                        rule="no") == 1
        assert seen == []  # nothing of the denied stream reached the app
        # The control: billing, whom the rule does not name, gets its stream.
        assert _send(port, mtls_context(pki.identity("billing"), pki.bundle),
                     b"hello") == b"hello"
    finally:
        lsock.shutdown(socket.SHUT_RDWR)
        lsock.close()
