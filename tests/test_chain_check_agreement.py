"""Peer chains and bundle roots OpenSSL takes and the chain check refuses (a hostile review,
session 27), through real sidecars.

OpenSSL verifies a peer's chain at the handshake; ``TrustStore.check_peer`` then accepted it
by a set lookup of its anchor, while the chain check (cryptography's RFC 5280 profile, which
the same chain meets as an own SVID and whenever it is verified again) refuses these shapes:

  A. a leaf whose validity is GeneralizedTime before 2050
  B. the same on an intermediate
  C. an intermediate with an empty subject (its SAN critical, as RFC 5280 asks)
  D. an RSA signature AlgorithmIdentifier without its NULL parameter
  E. a leaf with a critical nameConstraints extension
  F. a leaf without a version field (v1) that carries extensions

Such a peer was let in (200), cut as ``peer_untrusted`` when the root was renewed, and let in
again on reconnect. Now the handshake's chain meets the chain check too: refused at once
and on every reconnect, never reaching the app or the upstream; the rule is
``chain-untrusted`` (inbound ``bad_svid:chain-untrusted``; outbound
``peer_untrusted:chain-untrusted``, the label the outbound proxy gives every refusal of
``check_peer``).
Each shape has a control built the same way (the same DER surgery) but well-formed: served.

And bundle roots of shapes the chain check refuses (a. GeneralizedTime validity, b. an empty
subject and issuer, c. v1 with extensions) were loaded and vouched for peers: now such a root
makes its bundle ``signing-cert-invalid``, at start (exit 2) and on a reload (the bundle in
force stays).
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import NameConstraints, UniformResourceIdentifier

from tests import derforge as D
from tests.harness import (
    ScriptedServer,
    SidecarProc,
    audit_export,
    free_port,
    http,
    module_fixture,
    read_head,
    replace_file,
    request_target,
    sidecar_config,
    start_sidecar,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

TD, PARTNER = "demo.local", "partner.example"
RULE = "chain-untrusted"
INBOUND_REASON = f"bad_svid:{RULE}"
# The outbound proxy labels every check_peer refusal peer_untrusted (sidecar/outbound.py)
OUTBOUND_REASON = f"peer_untrusted:{RULE}"
ATTEMPTS = 3  # connections per chain: the first refused at once, the others on reconnect
# Refusal records are rate-limited per source (sidecar/refusals.py): every one is kept here
LIMITS = {"refused_records_per_source": 1000, "refused_records_per_second": 1000}


def sid(name: str, td: str = TD, ns: str = "demo") -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{name}"


# --- the family -------------------------------------------------------------------------------

SHAPES = {
    "A": "leaf validity in GeneralizedTime before 2050",
    "B": "intermediate validity in GeneralizedTime before 2050",
    "C": "intermediate with an empty subject",
    "D": "RSA signature AlgorithmIdentifier without NULL",
    "E": "leaf with a critical nameConstraints extension",
    "F": "leaf without a version field, with extensions",
}


def peer_chain(root: D.Issuer, shape: str, spiffe_id: str, *, hostile: bool
               ) -> tuple[list[x509.Certificate], D.Key]:
    """The chain (leaf first) and leaf key of ``shape`` under ``root``; ``hostile`` False:
    its control, made the same way but well-formed."""
    if shape == "A":
        cert, key = D.leaf(root, spiffe_id)
        return [D.resign(cert, root.key, D.generalized_time if hostile else None)], key
    if shape == "B":
        inter = D.ca("B intermediate", TD, root)
        inter.cert = D.resign(inter.cert, root.key, D.generalized_time if hostile else None)
        cert, key = D.leaf(inter, spiffe_id)
        return [cert, inter.cert], key
    if shape == "C":
        inter = D.ca("C intermediate", TD, root, san_critical=True,
                     subject=x509.Name([]) if hostile else None)
        cert, key = D.leaf(inter, spiffe_id)
        return [cert, inter.cert], key
    if shape == "D":
        inter = D.ca("D intermediate", TD, root, key=rsa.generate_private_key(65537, 2048))
        cert, key = D.leaf(inter, spiffe_id)
        alg = D.RSA_SHA256_NO_NULL if hostile else D.RSA_SHA256
        return [D.resign(cert, inter.key, alg=alg), inter.cert], key
    if shape == "E":
        constraints = NameConstraints(permitted_subtrees=[UniformResourceIdentifier(TD)],
                                      excluded_subtrees=None)
        cert, key = D.leaf(root, spiffe_id, extra=[(constraints, True)] if hostile else [])
        return [cert], key
    if shape == "F":
        cert, key = D.leaf(root, spiffe_id)
        return [D.resign(cert, root.key, D.without_version if hostile else None)], key
    raise KeyError(shape)


ROOT_SHAPES = {
    "a": "validity in GeneralizedTime before 2050",
    "b": "an empty subject and issuer, its SAN critical",
    "c": "no version field, with extensions",
}


def bundle_root(trust_domain: str, shape: str) -> D.Issuer:
    """A self-signed SPIFFE root of ``trust_domain`` of ``shape`` (``control``: the same
    surgery leaving it well-formed)."""
    root = D.ca(f"{trust_domain} root", trust_domain, san_critical=shape == "b",
                subject=x509.Name([]) if shape == "b" else None)
    if shape == "a":
        root.cert = D.resign(root.cert, root.key, D.generalized_time)
    elif shape == "c":
        root.cert = D.resign(root.cert, root.key, D.without_version)
    elif shape == "control":
        root.cert = D.resign(root.cert, root.key)
    return root


def write_identity(d: Path, chain: list[x509.Certificate], key: D.Key,
                   bundle: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tls.crt").write_bytes(D.pem(*chain))
    (d / "tls.key").write_bytes(D.key_pem(key))
    (d / "ca.crt").write_bytes(bundle)
    return d


def client_context(d: Path) -> ssl.SSLContext:
    """An mTLS client presenting ``d``'s chain, trusting ``d``'s bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(d / "ca.crt"))
    ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
    return ctx


def status_of(port: int, path: str, ctx: ssl.SSLContext | None = None) -> int | None:
    """The status of one request on a new connection; None when the connection is cut."""
    try:
        return http(port, "GET", path, ctx=ctx, timeout=5).status
    except OSError:  # (ssl.SSLError and ConnectionError are ones)
        return None


# --- real parts -------------------------------------------------------------------------------


class RecordingApp(ScriptedServer):
    """The app behind the inbound sidecar: answers 200 to every request of a keep-alive
    connection and records each request target (what reached the app)."""

    timeout = 60.0

    def __init__(self) -> None:
        self.targets: list[str] = []
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        while True:
            head = read_head(sock)
            if b"\r\n\r\n" not in head:
                return
            self.targets.append(request_target(head))
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


class Upstream(ScriptedServer):
    """An mTLS upstream (not a sidecar) presenting ``d``'s chain: one request a connection,
    so every request through the outbound listener is a new handshake; it records the
    handshakes and the request targets that reached it."""

    def __init__(self, d: Path) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
        ctx.load_verify_locations(str(d / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.handshakes = 0
        self.received = 0  # request bytes, whole head or not
        self.targets: list[str] = []
        self.lock = threading.Lock()
        super().__init__(ctx)

    def serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.handshakes += 1
        head = read_head(sock)
        with self.lock:
            self.received += len(head)
        if b"\r\n\r\n" not in head:
            return
        self.targets.append(request_target(head))
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\n"
                     b"upstream")


VARIANTS = {"hostile": True, "control": False}


class Mesh:
    """One root; an inbound sidecar ``orders`` in front of a recording app; an outbound
    sidecar ``frontend`` with a listener per (shape, variant), each calling an upstream that
    presents that chain as ``orders``. Both sidecars audit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = D.ca("demo root", TD)
        self.bundle = D.pem(self.root.cert)
        self.servers: list[ScriptedServer] = []
        self.sidecars: list[SidecarProc] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def identity(self, name: str, chain: list[x509.Certificate], key: D.Key) -> Path:
        return write_identity(self.tmp / name, chain, key, self.bundle)

    def own(self, name: str) -> Path:
        cert, key = D.leaf(self.root, sid(name))
        return self.identity(name, [cert], key)

    def _start(self) -> None:
        self.app = RecordingApp()
        self.servers.append(self.app)
        self.inbound = self._sidecar("orders", sidecar_config(
            self.own("orders"), inbound={
                "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{self.app.port}",
                "allow_from": [sid("*")]},
            audit={"path": str(self.tmp / "audit-in")}, limits=LIMITS))
        self.upstreams: dict[tuple[str, str], Upstream] = {}
        outbound = []
        for shape in SHAPES:
            for variant, hostile in VARIANTS.items():
                chain, key = peer_chain(self.root, shape, sid("orders"), hostile=hostile)
                up = Upstream(self.identity(f"up-{shape}-{variant}", chain, key))
                self.servers.append(up)
                self.upstreams[shape, variant] = up
                outbound.append({"name": f"{shape}-{variant}", "listen":
                                 f"127.0.0.1:{free_port()}", "upstream":
                                 f"127.0.0.1:{up.port}", "identity": sid("orders")})
        self.outbound = self._sidecar("frontend", sidecar_config(
            self.own("frontend"), outbound=outbound,
            audit={"path": str(self.tmp / "audit-out")}, limits=LIMITS))

    def _sidecar(self, name: str, cfg: dict[str, Any]) -> SidecarProc:
        proc = start_sidecar(self.tmp, name, cfg)
        self.sidecars.append(proc)
        return proc

    def caller(self, shape: str, variant: str, name: str) -> ssl.SSLContext:
        chain, key = peer_chain(self.root, shape, sid(name), hostile=VARIANTS[variant])
        return client_context(self.identity(f"caller-{name}", chain, key))

    def close(self) -> None:
        for proc in reversed(self.sidecars):
            proc.stop()
        for server in self.servers:
            server.close()


mesh = module_fixture("chain-check", Mesh)


def refusals(proc: SidecarProc, **fields: str) -> list[dict[str, Any]]:
    return [e for e in proc.log_events("connection_refused")
            if all(e.get(k) == v for k, v in fields.items())]


def audited(path: Path, **fields: str) -> list[dict[str, Any]]:
    return [r for r in audit_export(path) if r.get("event") == "connection_refused"
            and all(r.get(k) == v or (r.get("extra") or {}).get(k) == v
                    for k, v in fields.items())]


# --- every shape, both directions -------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_inbound_refuses_a_caller_whose_chain_the_chain_check_refuses(mesh: Mesh,
                                                                      shape: str) -> None:
    """Refused at once and on every reconnect (the memo remembers only chains that passed):
    no 200, nothing reaches the app, the refusal logged, audited and counted as
    ``bad_svid:chain-untrusted``."""
    name = f"hostile-{shape.lower()}"
    ctx = mesh.caller(shape, "hostile", name)
    srv = mesh.inbound
    before = srv.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                        reason="bad_svid")
    for attempt in range(ATTEMPTS):
        assert status_of(srv.port("inbound"), f"/{name}/{attempt}", ctx) is None, attempt
    got = wait_for(lambda: len(refusals(srv, claimed_peer=sid(name))) >= ATTEMPTS and
                   refusals(srv, claimed_peer=sid(name)))
    assert [e["reason"] for e in got] == [INBOUND_REASON] * ATTEMPTS, got
    assert srv.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                      reason="bad_svid") - before == ATTEMPTS
    assert not [t for t in mesh.app.targets if t.startswith(f"/{name}/")]
    records = wait_for(lambda: audited(mesh.tmp / "audit-in", claimed_peer=sid(name)),
                       timeout=20, interval=0.5)
    assert {r["reason"] for r in records} == {INBOUND_REASON}, records


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_inbound_serves_the_well_formed_control(mesh: Mesh, shape: str) -> None:
    name = f"control-{shape.lower()}"
    ctx = mesh.caller(shape, "control", name)
    for attempt in range(ATTEMPTS):
        assert status_of(mesh.inbound.port("inbound"), f"/{name}/{attempt}", ctx) == 200
    assert [t for t in mesh.app.targets if t.startswith(f"/{name}/")] == [
        f"/{name}/{attempt}" for attempt in range(ATTEMPTS)]
    assert not refusals(mesh.inbound, claimed_peer=sid(name))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_outbound_refuses_an_upstream_whose_chain_the_chain_check_refuses(mesh: Mesh,
                                                                          shape: str) -> None:
    """The outbound listener's every request is a new handshake with an upstream presenting
    ``shape``: each answered 502 (no upstream byte), no request reaches the upstream, each
    refusal logged, audited and counted with the rule ``chain-untrusted``."""
    up = mesh.upstreams[shape, "hostile"]
    srv = mesh.outbound
    source = f"127.0.0.1:{up.port}"
    before = srv.metric("sidecar_tls_handshake_failures_total", direction="outbound",
                        reason=OUTBOUND_REASON.split(":")[0])
    for attempt in range(ATTEMPTS):
        r = http(srv.port(f"{shape}-hostile"), "GET", f"/out/{attempt}")
        assert r.status == 502 and b"upstream" not in r.body, (attempt, r.status, r.body)
    # refused again on every new connection (counted by the upstream's own threads)
    wait_for(lambda: up.handshakes >= ATTEMPTS)
    assert up.targets == [] and up.received == 0
    got = wait_for(lambda: len(refusals(srv, source=source)) >= ATTEMPTS and
                   refusals(srv, source=source))
    assert {e["reason"] for e in got} == {OUTBOUND_REASON}, got
    assert srv.metric("sidecar_tls_handshake_failures_total", direction="outbound",
                      reason=OUTBOUND_REASON.split(":")[0]) - before == len(got)
    records = wait_for(lambda: audited(mesh.tmp / "audit-out", source=source),
                       timeout=20, interval=0.5)
    assert {r["reason"] for r in records} == {OUTBOUND_REASON}, records


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_outbound_serves_the_well_formed_control(mesh: Mesh, shape: str) -> None:
    up = mesh.upstreams[shape, "control"]
    for attempt in range(ATTEMPTS):
        r = http(mesh.outbound.port(f"{shape}-control"), "GET", f"/out/{attempt}")
        assert r.status == 200 and r.body == b"upstream", (attempt, r.status, r.body)
    assert up.targets == [f"/out/{attempt}" for attempt in range(ATTEMPTS)]
    assert not refusals(mesh.outbound, source=f"127.0.0.1:{up.port}")


# --- the memo ---------------------------------------------------------------------------------

RECONNECTS = 20


def test_a_well_formed_chain_is_accepted_on_every_reconnect(mesh: Mesh) -> None:
    """The chain check's result is remembered by the chain's digest: no functional change
    for a peer that reconnects, inbound (a caller) and outbound (one handshake a request)."""
    name = "reconnecting"
    ctx = mesh.caller("B", "control", name)
    for attempt in range(RECONNECTS):
        assert status_of(mesh.inbound.port("inbound"), f"/{name}/{attempt}", ctx) == 200
    assert len([t for t in mesh.app.targets if t.startswith(f"/{name}/")]) == RECONNECTS
    up = mesh.upstreams["D", "control"]
    handshakes, served = up.handshakes, len(up.targets)
    for _ in range(RECONNECTS):
        assert http(mesh.outbound.port("D-control"), "GET", "/again").status == 200
    wait_for(lambda: up.handshakes - handshakes >= RECONNECTS)
    assert up.handshakes - handshakes == RECONNECTS
    assert len(up.targets) - served == RECONNECTS


def test_the_memo_is_keyed_by_the_whole_chain(mesh: Mesh, tmp_path: Path) -> None:
    """One leaf (same key, same DER) under two encodings of one intermediate (same key and
    subject, shape B's GeneralizedTime in one): the chain that passed is remembered, the
    other is still refused, each time, in any order."""
    inter = D.ca("shared intermediate", TD, mesh.root)
    cert, key = D.leaf(inter, sid("shared-leaf"))
    twin = D.resign(inter.cert, mesh.root.key, D.generalized_time)
    good = client_context(write_identity(tmp_path / "good", [cert, inter.cert], key,
                                         mesh.bundle))
    bad = client_context(write_identity(tmp_path / "bad", [cert, twin], key, mesh.bundle))
    port = mesh.inbound.port("inbound")
    for attempt in range(5):
        assert status_of(port, f"/shared/good/{attempt}", good) == 200, attempt
        assert status_of(port, f"/shared/bad/{attempt}", bad) is None, attempt
    assert not [t for t in mesh.app.targets if t.startswith("/shared/bad/")]
    got = wait_for(lambda: len(refusals(mesh.inbound, claimed_peer=sid("shared-leaf"))) >= 5
                   and refusals(mesh.inbound, claimed_peer=sid("shared-leaf")))
    assert {e["reason"] for e in got} == {INBOUND_REASON}


# --- bundle roots -----------------------------------------------------------------------------


def _own(tmp: Path) -> tuple[D.Issuer, Path]:
    root = D.ca("demo root", TD)
    cert, key = D.leaf(root, sid("orders"))
    return root, write_identity(tmp / "orders", [cert], key, D.pem(root.cert))


def _start_fails(tmp: Path, cfg: dict[str, Any], procs: list[Any]) -> str:
    """The output of a sidecar that must refuse to start (exit 2); fails as soon as it is
    ready instead."""
    proc = start_sidecar(tmp, "refused", cfg, wait=False)
    procs.append(proc)
    try:
        wait_ready(proc)
    except RuntimeError:
        pass  # exited
    else:
        pytest.fail(f"the sidecar started:\n{proc.output()}")
    assert proc.proc.wait(timeout=30) == 2, proc.output()
    return proc.output()


def _config(ident: Path, partner: Path | None = None) -> dict[str, Any]:
    cfg = sidecar_config(ident, inbound={"listen": f"127.0.0.1:{free_port()}",
                                         "app": "127.0.0.1:9", "allow_from": [sid("*")]})
    if partner is not None:
        cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(partner)}}
    return cfg


@pytest.mark.parametrize("shape", sorted(ROOT_SHAPES))
def test_a_federated_root_the_chain_check_refuses_stops_the_start(
        tmp_path: Path, procs: list[Any], shape: str) -> None:
    _, ident = _own(tmp_path)
    partner = tmp_path / "partner.pem"
    partner.write_bytes(D.pem(bundle_root(PARTNER, shape).cert))
    out = _start_fails(tmp_path, _config(ident, partner), procs)
    assert str(partner) in out and "signing-cert-invalid" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize("shape", sorted(ROOT_SHAPES))
def test_an_own_root_the_chain_check_refuses_stops_the_start(
        tmp_path: Path, procs: list[Any], shape: str) -> None:
    """The own bundle lists the root the own SVID chains to and one of ``shape``."""
    root, ident = _own(tmp_path)
    (ident / "ca.crt").write_bytes(D.pem(root.cert, bundle_root(TD, shape).cert))
    out = _start_fails(tmp_path, _config(ident), procs)
    assert str(ident / "ca.crt") in out and "signing-cert-invalid" in out, out
    assert "Traceback" not in out


def test_roots_made_the_same_way_but_well_formed_start(tmp_path: Path, procs: list[Any]) -> None:
    """The control: a federated root and an extra own root through the same surgery."""
    root, ident = _own(tmp_path)
    (ident / "ca.crt").write_bytes(D.pem(root.cert, bundle_root(TD, "control").cert))
    partner = tmp_path / "partner.pem"
    partner.write_bytes(D.pem(bundle_root(PARTNER, "control").cert))
    procs.append(start_sidecar(tmp_path, "control", _config(ident, partner)))


class Federated:
    """A sidecar federated with ``partner.example`` (a well-formed root), its app, and a
    partner caller under that root."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.app = RecordingApp()
        self.proc: SidecarProc | None = None
        try:
            self.partner = bundle_root(PARTNER, "control")
            self.bundle = tmp / "partner.pem"
            self.bundle.write_bytes(D.pem(self.partner.cert))
            _, ident = _own(tmp)
            self.own_bundle = ident / "ca.crt"
            cfg = sidecar_config(ident, inbound={
                "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{self.app.port}",
                "allow_from": [sid("*", PARTNER, "pay")]})
            cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(self.bundle)}}
            self.proc = start_sidecar(tmp, "federated", cfg)
            self.good = self.caller("good", self.partner)
        except BaseException:
            self.close()
            raise

    def caller(self, name: str, root: D.Issuer) -> ssl.SSLContext:
        cert, key = D.leaf(root, sid("api", PARTNER, "pay"))
        d = self.tmp / f"partner-{name}"
        write_identity(d, [cert], key, b"")
        (d / "ca.crt").write_bytes(self.own_bundle.read_bytes())
        return client_context(d)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.app.close()


federated = module_fixture("chain-check-federated", Federated)


@pytest.mark.parametrize("shape", sorted(ROOT_SHAPES))
def test_a_federated_root_the_chain_check_refuses_fails_the_reload(federated: Federated,
                                                                   shape: str) -> None:
    """The partner's bundle file gains a root of ``shape``: the reload fails and is logged,
    the bundle in force stays (its partner is still served), and a partner peer under the
    new root is not let in."""
    srv = federated.proc
    assert srv is not None
    port = srv.port("inbound")
    assert status_of(port, f"/{shape}/before", federated.good) == 200
    failed = srv.metric("sidecar_certificate_reloads_total", result="failed")
    logged = len(srv.log_events("certificate_reload_failed"))
    bad = bundle_root(PARTNER, shape)
    replace_file(federated.bundle, D.pem(federated.partner.cert, bad.cert))
    wait_for(lambda: srv.metric("sidecar_certificate_reloads_total", result="failed") > failed)
    events = srv.log_events("certificate_reload_failed")[logged:]
    assert events and "signing-cert-invalid" in str(events[-1]), events
    assert str(federated.bundle) in str(events[-1])
    assert status_of(port, f"/{shape}/bad", federated.caller(f"bad-{shape}", bad)) is None
    assert status_of(port, f"/{shape}/after", federated.good) == 200
    assert not [t for t in federated.app.targets if t == f"/{shape}/bad"]


