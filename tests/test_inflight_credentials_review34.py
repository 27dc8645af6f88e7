"""A reload that moves the end of a request's credentials reaches the requests in flight.

A request in flight (a long download or upload) authorised with credentials ends when they
do, as an upgraded stream does (docs/identity.md, ``credential_expired``). A hostile review
(thirty-fourth session) found that end, and the next question about an introspected token,
fixed when the request began: a reload giving the API key an ``expires_at`` seconds ahead
(or moving it earlier), shortening the JWT provider's ``clock_skew`` or the introspection
``cache_ttl`` left the download running on to the old end -- up to ``max_connection_age``
-- while the same credentials were refused to a new request and an upgraded stream with
them was cut. Now a policy change sets both again for a request in flight
(``LiveConnection.renew``), as a stream's recheck does.

The family: {API key given an expires_at ahead, API key's expires_at moved earlier, JWT
provider's clock_skew shortened} x {download, upload}, all in flight at once through one
sidecar, with an upgraded stream per credential and a control (a key the reload leaves
alone) that must run on; then an introspected token whose provider's cache_ttl a reload
shortens, revoked at a real authorisation server, for a download and an upload.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import TD, Pki, mtls_context, spiffe, start_app, wait_for, write_policy
from tests.test_lifetime_review import (
    _api_key,
    _drain,
    _echoes,
    _inbound,
    _policy_doc,
    _reloads,
    _stamp,
    _start,
    _still_going,
    _token,
    _tunnel,
    _write,
)

pytestmark = pytest.mark.slow

KINDS = ["download", "upload"]
CREDENTIALS = ["apikey_expires_ahead", "apikey_expires_earlier", "jwt_clock_skew"]


def _keep_going(socks: list[tuple[socket.socket, str]], until: float) -> None:
    """Keep every request flowing (the idle limit must not be what ends one) until
    ``until``; a request already cut is left alone."""
    while time.time() < until:
        for sock, kind in socks:
            sock.settimeout(0.2)
            try:
                if kind == "download":
                    sock.recv(1 << 20)
                else:
                    sock.sendall(b"x" * 4096)
            except (OSError, ssl.SSLError):
                pass
        time.sleep(0.1)


def _closed(proc: Any, reason: str) -> float:
    return proc.metric("sidecar_connections_closed_total", direction="inbound", reason=reason)


def _open(port: int, ctx: ssl.SSLContext, kind: str, headers: dict[str, str]) -> ssl.SSLSocket:
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    _start(sock, kind, headers)
    return sock


def test_a_reload_that_ends_credentials_sooner_ends_the_requests_in_flight(tmp_path: Path) -> None:
    procs: list[Any] = []
    socks: list[ssl.SSLSocket] = []
    try:
        pki = Pki(tmp_path / "pki")
        app_proc, app = start_app(tmp_path)
        procs.append(app_proc)
        ahead_key, ahead = _api_key("ahead")
        earlier_key, earlier = _api_key("earlier", expires_at=_stamp(time.time() + 3600))
        steady_key, steady = _api_key("steady")
        rules = [{"name": "key", "allow": {"from": [spiffe("frontend")], "apikey": True}},
                 {"name": "jwt", "allow": {"from": [spiffe("frontend")],
                                           "jwt": {"provider": "corp"}}}]

        def doc(skew: str, keys: list[dict[str, Any]]) -> dict[str, Any]:
            d = _policy_doc(rules, api_keys=keys)
            d["jwt_providers"]["corp"]["clock_skew"] = skew
            return d

        srv = _inbound(tmp_path, pki, app, procs, _write(tmp_path, doc("5m", [
            ahead, earlier, steady])))
        port = srv.port("inbound")
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        exp = int(time.time()) + 14  # (ends at exp + 5 min before the reload, exp + 1 s after)
        headers = {"apikey_expires_ahead": {"x-api-key": ahead_key},
                   "apikey_expires_earlier": {"x-api-key": earlier_key},
                   "jwt_clock_skew": {"authorization": f"Bearer {_token(sub='m', exp=exp)}"}}
        flows = {(cred, kind): _open(port, ctx, kind, headers[cred])
                 for cred in CREDENTIALS for kind in KINDS}
        streams = {cred: _tunnel(port, ctx, headers[cred]) for cred in CREDENTIALS}
        control = {kind: _open(port, ctx, kind, {"x-api-key": steady_key}) for kind in KINDS}
        socks += [*flows.values(), *streams.values(), *control.values()]

        key_end = time.time() + 6
        _write(tmp_path, doc("1s", [{**ahead, "expires_at": _stamp(key_end)},
                                    {**earlier, "expires_at": _stamp(key_end)}, steady]))
        wait_for(lambda: _reloads(srv) >= 2, timeout=15)
        assert time.time() < key_end - 1, "the reload took too long to test anything"
        for (_, kind), sock in flows.items():  # (still going after the reload)
            _still_going(sock, kind)
        assert _closed(srv, "credential_expired") == 0

        _keep_going([(s, k) for (_, k), s in flows.items()]
                    + [(s, k) for k, s in control.items()], max(key_end, exp + 1) + 2)
        ran_on = [key for key, sock in flows.items() if not _drain(sock, timeout=6)]
        assert ran_on == [], f"requests in flight ran on past their credentials' end: {ran_on}"
        assert not any(_echoes(s) for s in streams.values())
        wait_for(lambda: _closed(srv, "credential_expired") >= len(flows) + len(streams))
        for kind, sock in control.items():  # (the key the reload left alone)
            _still_going(sock, kind)
    finally:
        for sock in socks:
            sock.close()
        for proc in reversed(procs):
            proc.stop()


def test_a_reload_that_shortens_cache_ttl_asks_about_requests_in_flight_sooner(
        tmp_path: Path) -> None:
    from tests.test_lifetime_review2 import _idp

    procs: list[Any] = []
    socks: list[ssl.SSLSocket] = []
    idp = None
    try:
        pki = Pki(tmp_path / "pki")
        app_proc, app = start_app(tmp_path)
        procs.append(app_proc)
        idp = _idp(tmp_path, pki)
        (tmp_path / "policy").mkdir(parents=True, exist_ok=True)
        (tmp_path / "policy" / "secret").write_text("orders-secret\n")

        def policy(ttl: str) -> str:
            provider = {"issuer": idp.issuer, "audiences": ["orders"], "clock_skew": "1s",
                        "introspection": {"endpoint": f"{idp.issuer}/introspect", "ca": idp.ca,
                                          "client_id": "orders", "client_secret_file": "secret",
                                          "cache_ttl": ttl, "negative_ttl": "1s",
                                          "timeout": "1s"}}
            rule = {"name": "r", "allow": {"from": [spiffe("frontend")],
                                           "paths": ["/ws", "/big", "/upload"],
                                           "jwt": {"provider": "idp"}}}
            return write_policy(tmp_path / "policy" / "mesh.yaml", {
                "version": 1, "trust_domain": TD, "jwt_providers": {"idp": provider},
                "services": {spiffe("orders"): {"rules": [rule]}}})

        srv = _inbound(tmp_path, pki, app, procs, policy("1h"))
        port = srv.port("inbound")
        front = pki.identity("frontend")
        ctx = mtls_context(front, pki.bundle)
        token = idp.token(identity=front, format="opaque")
        headers = {"authorization": f"Bearer {token}"}
        flows = {kind: _open(port, ctx, kind, headers) for kind in KINDS}
        stream = _tunnel(port, ctx, headers)
        socks += [*flows.values(), stream]
        policy("2s")
        wait_for(lambda: _reloads(srv) >= 2, timeout=15)
        for kind, sock in flows.items():
            _still_going(sock, kind)
        idp.control(revoke=token)
        _keep_going([(s, k) for k, s in flows.items()], time.time() + 6)
        ran_on = [kind for kind, sock in flows.items() if not _drain(sock, timeout=8)]
        assert ran_on == [], f"requests in flight with a revoked token ran on: {ran_on}"
        assert not _echoes(stream)
        wait_for(lambda: _closed(srv, "credential_expired") >= len(flows) + 1)
    finally:
        for sock in socks:
            sock.close()
        for proc in reversed(procs):
            proc.stop()
        if idp is not None:
            idp.stop()
