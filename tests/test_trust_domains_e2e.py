"""Trust domains through running sidecars (issue 14): a peer is accepted only if its chain
ends at a root of the trust domain named in its own SPIFFE ID.

Two trust domains, ``cluster.local`` (ours) and ``partner.example`` (federated: its bundle in
the SPIFFE trust bundle format on one side, PEM on the other). Each cross-domain issuance --
the partner CA issuing ``spiffe://cluster.local/...`` and the cluster CA issuing
``spiffe://partner.example/...`` -- is tried inbound (a client presenting it to a sidecar)
and outbound (an upstream presenting it to a sidecar's outbound listener).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from sidecar.identity.bundle import spiffe_bundle_json
from sidecar.identity.ca import DevCA, IssuedCert, write_svid
from tests.harness import (
    ScriptedServer,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    read_head,
    replace_file,
    sidecar_config,
    start_app,
    start_sidecar,
    wait_for,
)

CLUSTER, PARTNER, OTHER = "cluster.local", "partner.example", "other.example"


def sid(td: str, name: str, ns: str = "shop") -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{name}"


FRONTEND, BACKEND = sid(CLUSTER, "frontend"), sid(CLUSTER, "backend")
PARTNER_API = sid(PARTNER, "api", "pay")


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cluster = DevCA.create(CLUSTER)
        self.partner = DevCA.create(PARTNER)
        self.cluster_pem = tmp / "cluster.pem"
        self.cluster_pem.write_bytes(self.cluster.bundle_pem)
        self.partner_json = tmp / "partner.json"
        self.partner_json.write_bytes(spiffe_bundle_json([self.partner.root]))
        self.procs: list[Any] = []

    def ident(self, name: str, ca: DevCA, spiffe_id: str, **kw: Any) -> Path:
        return write_svid(ca.issue(spiffe_id, **kw), ca, self.tmp / name)

    def client(self, ca: DevCA, spiffe_id: str) -> ssl.SSLContext:
        """An mTLS client presenting ``spiffe_id`` issued by ``ca``, trusting the cluster."""
        d = self.ident(f"client-{ca.trust_domain}-{spiffe_id.rsplit('/', 1)[-1]}", ca,
                       spiffe_id)
        return mtls_context(d, self.cluster_pem)

    def sidecar(self, name: str, cfg: dict[str, Any]) -> SidecarProc:
        proc = start_sidecar(self.tmp, name, cfg)
        self.procs.append(proc)
        return proc


class RogueUpstream(ScriptedServer):
    """A TLS server presenting ``issued`` (some other CA's idea of an identity) and answering
    every request with 200: what an outbound listener must refuse to talk to."""

    timeout = 2.0

    def __init__(self, tmp: Path, issued: IssuedCert, ca: DevCA) -> None:
        d = write_svid(issued, ca, tmp / f"rogue-{free_port()}")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
        self.served = 0
        super().__init__(ctx)

    def serve(self, sock: socket.socket) -> None:
        if read_head(sock):
            self.served += 1
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nrogue")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("trust")
    w = World(tmp)
    rogues: list[RogueUpstream] = []
    try:
        # (Started inside the try: a failed step still stops the app by its pid and closes
        # the rogue upstream already started.)
        app, app_port = start_app(tmp)
        w.procs.append(app)
        rogues.append(RogueUpstream(tmp, w.partner.issue(BACKEND), w.partner))
        rogues.append(RogueUpstream(tmp, w.cluster.issue(PARTNER_API), w.cluster))
        # The server: cluster.local backend, federating partner.example (SPIFFE JSON bundle).
        cfg = sidecar_config(w.ident("backend", w.cluster, BACKEND), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}",
            "allow_from": [FRONTEND, PARTNER_API, sid(OTHER, "x")]})
        cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(w.partner_json)}}
        w.server = w.sidecar("backend", cfg)
        # The partner: its own bundle in SPIFFE JSON, cluster.local federated as PEM.
        cfg = sidecar_config(w.ident("partner", w.partner, PARTNER_API), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}",
            "allow_from": [FRONTEND]})
        cfg["identity"]["bundle"] = str(w.partner_json)
        cfg["identity"]["trust_domains"] = {CLUSTER: {"bundle": str(w.cluster_pem)}}
        w.partner_side = w.sidecar("partner", cfg)
        # The caller: cluster.local frontend with one outbound listener per upstream.
        ups = {"backend": (w.server.port("inbound"), BACKEND),
               "partner": (w.partner_side.port("inbound"), PARTNER_API),
               "rogue-cluster": (rogues[0].port, BACKEND),
               "rogue-partner": (rogues[1].port, PARTNER_API)}
        cfg = sidecar_config(w.ident("frontend", w.cluster, FRONTEND), outbound=[
            {"name": name, "listen": f"127.0.0.1:{free_port()}",
             "upstream": f"127.0.0.1:{port}", "identity": ident}
            for name, (port, ident) in ups.items()])
        cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(w.partner_json)}}
        w.caller = w.sidecar("frontend", cfg)
        w.rogues = rogues
        yield w
    finally:
        for r in rogues:
            r.close()
        for p in reversed(w.procs):
            p.stop()


def xfcc_uri(resp: Any) -> str:
    xfcc = [v for k, v in resp.header_list() if k == "x-forwarded-client-cert"]
    return xfcc[0].split("URI=", 1)[1].split(";", 1)[0]


def test_inbound_accepts_each_domain_from_its_own_roots(world: World) -> None:
    port = world.server.port("inbound")
    r = http(port, "GET", "/", ctx=world.client(world.cluster, FRONTEND))
    assert r.status == 200 and xfcc_uri(r) == FRONTEND
    r = http(port, "GET", "/", ctx=world.client(world.partner, PARTNER_API))
    assert r.status == 200 and xfcc_uri(r) == PARTNER_API


def _claiming(proc: SidecarProc, spiffe_id: str) -> list[dict[str, Any]]:
    """The ``connection_refused`` lines of certificates that claimed ``spiffe_id``. None of
    them names it as ``peer``: nothing verified it -- any CA can mint a certificate naming
    any ID -- and an auditor reads ``peer`` as verified (before the twenty-second session's
    review it was ``peer``). Nor does it reach a metric label (cardinality, and the same
    belief)."""
    refused = proc.log_events("connection_refused")
    assert all("peer" not in e for e in refused), refused
    assert spiffe_id not in proc.metrics()
    return [e for e in refused if e.get("claimed_peer") == spiffe_id]


@pytest.mark.parametrize("issuer, spiffe_id, rule", [
    ("partner", FRONTEND, "trust-domain-mismatch"),
    ("cluster", PARTNER_API, "trust-domain-mismatch"),
    ("cluster", sid(OTHER, "x"), "trust-domain-not-federated"),
], ids=["partner-ca-issues-cluster-id", "cluster-ca-issues-partner-id", "unfederated-domain"])
def test_inbound_refuses_cross_domain_issuance(world: World, issuer: str, spiffe_id: str,
                                               rule: str) -> None:
    srv = world.server
    before = srv.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                        reason="peer_untrusted")
    ctx = world.client(getattr(world, issuer), spiffe_id)
    with pytest.raises((OSError, ConnectionError)):  # closed without a response
        http(srv.port("inbound"), "GET", "/", ctx=ctx, timeout=5)
    assert srv.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                      reason="peer_untrusted") == before + 1
    refused = _claiming(srv, spiffe_id)
    assert refused and refused[-1]["reason"] == f"peer_untrusted:{rule}"


def test_outbound_reaches_both_domains(world: World) -> None:
    r = http(world.caller.port("backend"), "GET", "/")
    assert r.status == 200 and xfcc_uri(r) == FRONTEND
    r = http(world.caller.port("partner"), "GET", "/")
    assert r.status == 200 and xfcc_uri(r) == FRONTEND


@pytest.mark.parametrize("listener, spiffe_id", [("rogue-cluster", BACKEND),
                                                 ("rogue-partner", PARTNER_API)],
                         ids=["partner-ca-issues-cluster-id", "cluster-ca-issues-partner-id"])
def test_outbound_refuses_cross_domain_upstream(world: World, listener: str,
                                                spiffe_id: str) -> None:
    r = http(world.caller.port(listener), "GET", "/")
    assert r.status == 502 and b"rogue" not in r.body
    refused = _claiming(world.caller, spiffe_id)
    assert refused and refused[-1]["reason"] == "peer_untrusted:trust-domain-mismatch"
    assert all(rogue.served == 0 for rogue in world.rogues)


def test_federated_bundle_reloads_on_its_own_and_keeps_the_last_good(world: World,
                                                                      tmp_path: Path,
                                                                      procs: list) -> None:
    """A separate server so the module's world is untouched: the partner's bundle rotates to
    a new root, then turns to garbage; the cluster domain never notices."""
    app, app_port = start_app(tmp_path)
    procs.append(app)  # stopped by its pid also when the sidecar's start fails
    bundle = tmp_path / "partner.json"
    bundle.write_bytes(spiffe_bundle_json([world.partner.root]))
    cfg = sidecar_config(world.ident("backend2", world.cluster, BACKEND), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}",
        "allow_from": [FRONTEND, PARTNER_API]})
    cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(bundle)}}
    srv = start_sidecar(tmp_path, "backend2", cfg)
    try:
        port = srv.port("inbound")
        old_partner = world.client(world.partner, PARTNER_API)
        assert http(port, "GET", "/", ctx=old_partner).status == 200
        new_ca = DevCA.create(PARTNER)
        replace_file(bundle, spiffe_bundle_json([new_ca.root]))
        wait_for(lambda: srv.log_events("trust_bundle_reloaded"))
        with pytest.raises((OSError, ConnectionError)):
            http(port, "GET", "/", ctx=old_partner, timeout=5)
        new_partner = mtls_context(world.ident("new-partner", new_ca, PARTNER_API),
                                   world.cluster_pem)
        assert http(port, "GET", "/", ctx=new_partner).status == 200
        cluster = world.client(world.cluster, FRONTEND)
        assert http(port, "GET", "/", ctx=cluster).status == 200
        failed = srv.metric("sidecar_certificate_reloads_total", result="failed")
        replace_file(bundle, b'{"keys": [{"use": "x509-svid", "x5c": ["bad"]}]}')
        wait_for(lambda: srv.metric("sidecar_certificate_reloads_total",
                                    result="failed") > failed)
        assert http(port, "GET", "/", ctx=new_partner).status == 200  # last good kept
        assert http(port, "GET", "/", ctx=cluster).status == 200
    finally:
        srv.stop()
        app.stop()


def test_partner_root_in_the_own_bundle_stops_the_start(world: World, tmp_path: Path) -> None:
    """The pre-issue-14 way to federate (one bundle with every root) would let the partner
    issue our IDs: it is refused at start with a pointer to identity.trust_domains."""
    d = world.ident("mixed", world.cluster, BACKEND)
    (d / "ca.crt").write_bytes(world.cluster.bundle_pem + world.partner.bundle_pem)
    cfg = sidecar_config(d, inbound={"listen": f"127.0.0.1:{free_port()}",
                                     "app": "127.0.0.1:9"})
    proc = start_sidecar(tmp_path, "mixed", cfg, wait=False)
    try:
        assert proc.proc.wait(timeout=30) == 2
        out = proc.output()
        assert "identity.trust_domains" in out and PARTNER in out
    finally:
        proc.stop()
