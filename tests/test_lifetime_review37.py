"""A finished request of a keep-alive connection is not judged in place of its next one.

A hostile review (thirty-seventh session) found two holes in how a policy change and a
re-introspection judge the request in flight (docs/identity.md, "Connection lifetime"):

* ``LiveConnection.request`` was set per request and never cleared, and a policy change
  judges a connection that is not idle by it: a reload, a JWKS key leaving the provider's set
  (``Authenticator.on_keys_removed``) or a policy change while the next request's decision
  waited for introspection judged the PREVIOUS, finished request while the next head was
  arriving, and cut the connection as ``policy_refused`` although the new request was
  allowed (outbound: cut it as ``policy_refused`` instead of answering it 403). Now the
  request loop clears it wherever an exchange ends.
* a finished request's re-introspection task (``reauth``), answering late, acted on the
  connection's NEXT request: an inactive answer about the old token retired it as
  ``credential_expired``. Now the task acts only while it is still the connection's own.

Each test runs a control in flight that the same change must cut (so the change is known
to have judged every connection when its closure is counted), through one module-scoped set:
an app, an authorisation server (JWKS and introspection), the orders sidecar (inbound) and
the frontend sidecar (outbound to it), sharing one policy file.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    TD,
    Pki,
    free_port,
    module_fixture,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.harness import read_head_bytewise as read_head
from tests.test_lifetime_review import _read_some

pytestmark = pytest.mark.usefixtures("no_internal_errors")

BIG = 1 << 40  # an upload or download that does not end by itself within a test
A_SIZE = 8 << 20


class Mesh:
    def __init__(self, tmp: Path) -> None:
        from tests.idp import IdpProc

        self.tmp = tmp
        self.procs: list[Any] = []
        self.idp: Any = None
        try:
            self.pki = Pki(tmp / "pki")
            app_proc, app = start_app(tmp)
            self.procs.append(app_proc)
            self.idp = IdpProc(tmp / "idp", client_ca=self.pki.bundle,
                               clients={"orders": "orders-secret"}, mtls_clients=("frontend",))
            (tmp / "policy").mkdir(parents=True, exist_ok=True)
            (tmp / "policy" / "secret").write_text("orders-secret\n")
            self.state: dict[str, bool] = {}
            policy = self._write(deny_old=False, egress=True)
            limits = {"connection_close_grace": "500ms"}
            self.orders = start_sidecar(tmp, "orders", sidecar_config(
                self.pki.identity("orders"), inbound={
                    "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"},
                policy=policy, audit={"path": str(tmp / "audit-orders")}, limits=limits))
            self.procs.append(self.orders)
            self.frontend = start_sidecar(tmp, "frontend", sidecar_config(
                self.pki.identity("frontend"), outbound=[{
                    "name": "orders", "listen": f"127.0.0.1:{free_port()}",
                    "upstream": f"127.0.0.1:{self.orders.port('inbound')}",
                    "identity": spiffe("orders")}],
                policy=policy, limits=limits))
            self.procs.append(self.frontend)
            wait_for(lambda: self.orders.metric("sidecar_jwks_fetches_total", provider="idp",
                                                result="ok") >= 1)
            self.front_dir = self.pki.identity("frontend")
            self.ctx = mtls_context(self.front_dir, self.pki.bundle)
        except BaseException:
            self.close()
            raise

    def _write(self, *, deny_old: bool, egress: bool) -> str:
        idp = self.idp
        jwks = {"issuer": idp.issuer, "audiences": ["orders"], "algorithms": ["ES256"],
                "clock_skew": "1s", "discovery": True, "jwks_ca": idp.ca,
                "jwks_refresh": "1s", "jwks_min_refetch": "1s"}
        intro = {"issuer": idp.issuer, "audiences": ["orders"], "clock_skew": "1s",
                 "introspection": {"endpoint": f"{idp.issuer}/introspect", "ca": idp.ca,
                                   "client_id": "orders", "client_secret_file": "secret",
                                   "cache_ttl": "3s", "negative_ttl": "1s", "timeout": "12s"}}
        rules: list[dict[str, Any]] = [
            {"name": "plain", "allow": {"from": [spiffe("frontend")], "paths": ["/old", "/new"]}},
            {"name": "tok", "allow": {"from": [spiffe("frontend")], "paths": ["/tok/**"],
                                      "jwt": {"provider": "idp"}}},
            {"name": "intro", "allow": {"from": [spiffe("frontend")],
                                        "paths": ["/big", "/intro/**"],
                                        "jwt": {"provider": "intro"}}}]
        if deny_old:
            rules.append({"name": "no-old", "deny": {"paths": ["/old"]}})
        self.state = {"deny_old": deny_old, "egress": egress}
        return write_policy(self.tmp / "policy" / "mesh.yaml", {
            "version": 1, "trust_domain": TD, "jwt_providers": {"idp": jwks, "intro": intro},
            "services": {
                spiffe("orders"): {"rules": rules},
                spiffe("frontend"): {"rules": [], "egress": [
                    spiffe("orders") if egress else spiffe("billing")]}}})

    def set_policy(self, *, deny_old: bool = False, egress: bool = True) -> None:
        """Write the policy (both sidecars read it) and wait until both reloaded it."""
        if self.state == {"deny_old": deny_old, "egress": egress}:
            return
        before = [_reloads(p) for p in (self.orders, self.frontend)]
        self._write(deny_old=deny_old, egress=egress)
        wait_for(lambda: all(_reloads(p) > b for p, b in zip(
            (self.orders, self.frontend), before, strict=True)), timeout=15)

    def connect(self) -> ssl.SSLSocket:
        return self.ctx.wrap_socket(socket.create_connection(
            ("127.0.0.1", self.orders.port("inbound")), timeout=15))

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        if self.idp is not None:
            self.idp.stop()


mesh = module_fixture("life37", Mesh)


def _reloads(proc: Any) -> float:
    return proc.metric("sidecar_policy_reloads_total", result="ok")


def _closed(proc: Any, reason: str, direction: str = "inbound") -> float:
    return proc.metric("sidecar_connections_closed_total", direction=direction, reason=reason)


def _calls(proc: Any, result: str) -> float:
    return proc.metric("sidecar_introspection_calls_total", provider="intro", result=result)


def _head(path: str, headers: dict[str, str] | None = None, *, end: bool = True) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    last = "\r\n" if end else ""
    return f"GET {path} HTTP/1.1\r\nHost: orders\r\n{extra}{last}".encode()


def _exchange(sock: socket.socket, path: str, headers: dict[str, str] | None = None) -> None:
    """One whole keep-alive exchange: the request, its answer's head and body."""
    sock.sendall(_head(path, headers))
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    _read_some(sock, length)


def _upload(sock: socket.socket, path: str, headers: dict[str, str] | None = None) -> None:
    """An upload in flight (its body never ends): the control a change must cut."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: orders\r\nContent-Length: {BIG}\r\n"
                 f"{extra}\r\n".encode())
    sock.sendall(b"x" * (1 << 20))


def _cut(sock: socket.socket, within: float = 30.0) -> bool:
    """Whether the server ended the connection (read to its end or reset) within ``within``
    seconds of sending on it."""
    sock.settimeout(10)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            sock.sendall(b"x" * 4096)
    except (OSError, ssl.SSLError):
        return True
    return False


def _half_sent_next(sock: socket.socket, path: str) -> None:
    """The next request's head, all but its last line: the connection is not idle, and no
    request is in flight on it."""
    sock.sendall(_head(path, end=False))


# -- finding 1: the finished request judged by a policy change ---------------------------------


def test_a_reload_does_not_judge_the_finished_request_of_a_connection(mesh: Mesh) -> None:
    """A reload denying /old: the upload to /old in flight is cut; the connection whose
    /old request is over and whose next head (/new, allowed) is arriving is not, and its
    request is answered."""
    mesh.set_policy()
    base = _closed(mesh.orders, "policy_refused")
    control, stale = mesh.connect(), mesh.connect()
    try:
        _upload(control, "/old")
        _exchange(stale, "/old")
        _half_sent_next(stale, "/new")
        mesh.set_policy(deny_old=True)
        wait_for(lambda: _closed(mesh.orders, "policy_refused") >= base + 1)
        assert _cut(control)
        stale.sendall(b"\r\n")
        head = read_head(stale)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert _closed(mesh.orders, "policy_refused") == base + 1
    finally:
        control.close()
        stale.close()
        mesh.set_policy()


def test_a_jwks_key_removal_does_not_judge_the_finished_request(mesh: Mesh) -> None:
    """The authorisation server drops the key of a token: the upload in flight with it is
    cut; the connection whose request with it is over, the next head arriving, is not."""
    mesh.set_policy()
    idp = mesh.idp
    auth = {"authorization": f"Bearer {idp.token(identity=mesh.front_dir)}"}
    base = _closed(mesh.orders, "policy_refused")
    control, stale = mesh.connect(), mesh.connect()
    try:
        _upload(control, "/tok/up", auth)
        _exchange(stale, "/tok/a", auth)
        _half_sent_next(stale, "/new")
        idp.control(rotate=True, drop_old=True)
        wait_for(lambda: _closed(mesh.orders, "policy_refused") >= base + 1)
        assert _cut(control)
        stale.sendall(b"\r\n")
        head = read_head(stale)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert _closed(mesh.orders, "policy_refused") == base + 1
    finally:
        control.close()
        stale.close()


def test_a_reload_while_the_next_decision_waits_for_introspection(mesh: Mesh) -> None:
    """The next request's decision waits for the authorisation server when a reload denies
    the previous request's path: the previous request is not judged, the next one is
    decided (by the policy in force) and answered."""
    mesh.set_policy()
    idp = mesh.idp
    token = idp.token(identity=mesh.front_dir, format="opaque")
    base = _closed(mesh.orders, "policy_refused")
    control, stale = mesh.connect(), mesh.connect()
    try:
        _upload(control, "/old")
        _exchange(stale, "/old")
        answered = _calls(mesh.orders, "active")
        idp.control(mode={"introspect": "slow"}, delay=8)
        stale.sendall(_head("/intro/b", {"authorization": f"Bearer {token}"}))
        wait_for(lambda: idp.stats()["slow_in_flight_max"]["introspect"] >= 1)
        mesh.set_policy(deny_old=True)
        wait_for(lambda: _closed(mesh.orders, "policy_refused") >= base + 1)
        assert _calls(mesh.orders, "active") == answered, \
            "the answer came before the reload: nothing was tested"
        assert _cut(control)
        head = read_head(stale)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert _closed(mesh.orders, "policy_refused") == base + 1
    finally:
        idp.control(mode={"introspect": "ok"})
        control.close()
        stale.close()
        mesh.set_policy()


def test_an_outbound_reload_does_not_cut_the_next_request_for_the_finished_one(
        mesh: Mesh) -> None:
    """A reload that ends the egress: the outbound upload in flight is cut
    (``policy_refused``); the connection whose request is over is not cut for it -- its
    next request, once whole, is refused by the policy in force (403), as a request."""
    mesh.set_policy()
    port = mesh.frontend.port("orders")
    base = _closed(mesh.frontend, "policy_refused", "outbound")
    control = socket.create_connection(("127.0.0.1", port), timeout=15)
    stale = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        _upload(control, "/new")
        _exchange(stale, "/old")
        _half_sent_next(stale, "/new")
        mesh.set_policy(egress=False)
        wait_for(lambda: _closed(mesh.frontend, "policy_refused", "outbound") >= base + 1)
        assert _cut(control)
        stale.sendall(b"\r\n")
        head = read_head(stale)
        assert head.startswith(b"HTTP/1.1 403"), head
        assert _closed(mesh.frontend, "policy_refused", "outbound") == base + 1
    finally:
        control.close()
        stale.close()
        mesh.set_policy()


# -- finding 2: a finished request's re-introspection acting on the next request ----------------


def test_a_late_inactive_answer_about_a_finished_request_spares_the_next(mesh: Mesh) -> None:
    """Request A (token TA) is asked about again; the authorisation server is slow; A ends
    and B (token TB, valid) runs on the same connection. A's late answer says TA is
    revoked: B runs on, and the connection is not retired ``credential_expired``."""
    mesh.set_policy()
    idp = mesh.idp
    ta = idp.token(identity=mesh.front_dir, format="opaque")
    tb = idp.token(identity=mesh.front_dir, format="opaque")
    base = _closed(mesh.orders, "credential_expired")
    sock = mesh.connect()
    try:
        sock.sendall(_head(f"/big?n={A_SIZE}", {"authorization": f"Bearer {ta}"}))
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        _read_some(sock, 1 << 20)
        # TA revoked, the server slow: A's re-introspection (when its answer's cache_ttl
        # runs out) waits there
        idp.control(revoke=ta, mode={"introspect": "slow"}, delay=8)
        wait_for(lambda: idp.stats()["slow_in_flight_max"]["introspect"] >= 1, timeout=20)
        inactive = _calls(mesh.orders, "inactive")
        idp.control(delay=0.2)  # (B's own question, and its re-introspections: quick)
        _read_some(sock, A_SIZE - (1 << 20))  # A ends
        sock.sendall(_head(f"/big?n={BIG}", {"authorization": f"Bearer {tb}"}))
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        _read_some(sock, 1 << 20)
        assert _calls(mesh.orders, "inactive") == inactive, \
            "A's answer came before B began: nothing was tested"

        def answered() -> bool:  # (B read meanwhile: B's flow is not what stops)
            _read_some(sock, 1 << 18)
            return _calls(mesh.orders, "inactive") >= inactive + 1

        wait_for(answered, timeout=30)
        _read_some(sock, 1 << 20)  # B runs on
        assert _closed(mesh.orders, "credential_expired") == base
        _read_some(sock, 1 << 20)
    finally:
        idp.control(mode={"introspect": "ok"})
        sock.close()
