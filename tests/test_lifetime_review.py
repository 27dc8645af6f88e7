"""Trust that outlived what authorised it (found by a hostile review of trust lifetime), each
as a family, through real sidecars, real certificates and real files.

* Rotations that must not take effect: a rotated SVID naming another SPIFFE ID (another
  workload, another trust domain) was taken, so the sidecar presented one identity and
  enforced another's policy section; it is refused (``spiffe-id-changed``) like the other
  bad sets a rotation may publish, and the SVID in force stays.
* A federated bundle whose only CA is removed (a blank file, a SPIFFE bundle without
  ``x509-svid`` keys) was refused as broken, so the removed CA stayed trusted; it now
  withdraws the trust domain's roots and ends its connections.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import secrets
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from sidecar.identity.bundle import spiffe_bundle_json
from sidecar.identity.ca import DevCA, write_svid
from tests.harness import (
    TD,
    Pki,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    read_head,
    replace_file,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_authn_support import AUDIENCE, ISSUER, ec_key, jwk, jwks_bytes
from tests.test_connection_lifetime_e2e import (
    assert_closed_by_server,
    keepalive,
    wait_closed,
)
from tests.test_peer_certificates_review import _ca, _leaf

pytestmark = pytest.mark.usefixtures("no_internal_errors")

GRACE = "500ms"
BIG = 1 << 40  # a download or upload that does not end by itself within a test
CAP = 64 << 20  # what a cut connection may still deliver (buffers), far below BIG


def _stamp(t: float) -> str:
    """RFC 3339 (whole seconds, rounded up) for ``expires_at``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(t)))


def _token(**claims: Any) -> str:
    import jwt as pyjwt

    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "jti": uuid.uuid4().hex,
               "iat": now - 5, "exp": now + 600, **claims}
    return pyjwt.encode(payload, ec_key("lifetime-ec"), algorithm="ES256",
                        headers={"kid": "lt-1"})


def _api_key(name: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    key = "sk_" + secrets.token_urlsafe(32)
    return key, {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), **extra}


def _policy_doc(rules: list[dict[str, Any]], *, api_keys: list[dict[str, Any]] | None = None,
                revocations: list[dict[str, Any]] | None = None,
                egress: list[str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1, "trust_domain": TD,
        "jwt_providers": {"corp": {
            "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
            "jwks_file": "jwks/corp.json", "clock_skew": "1s"}},
        "services": {spiffe("orders"): {"rules": rules}},
    }
    if egress is not None:
        doc["services"][spiffe("frontend")] = {"rules": [], "egress": egress}
    if api_keys:
        doc["api_keys"] = api_keys
    if revocations:
        doc["revocations"] = revocations
    return doc


def _write(tmp: Path, doc: dict[str, Any]) -> str:
    jwks = tmp / "policy" / "jwks" / "corp.json"
    if not jwks.exists():
        jwks.parent.mkdir(parents=True, exist_ok=True)
        jwks.write_bytes(jwks_bytes(jwk(ec_key("lifetime-ec"), "lt-1")))
    return write_policy(tmp / "policy" / "mesh.yaml", doc)


def _inbound(tmp: Path, pki: Pki, app: int, procs: list[Any], policy: str, *,
             protocol: str = "http", ident: Path | None = None) -> SidecarProc:
    cfg = sidecar_config(ident or pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}",
        "protocol": protocol}, policy=policy, audit={"path": str(tmp / "audit-orders")},
        limits={"connection_close_grace": GRACE})
    proc = start_sidecar(tmp, "orders", cfg)
    procs.append(proc)
    return proc


def _tunnel(port: int, ctx: ssl.SSLContext, headers: dict[str, str]) -> ssl.SSLSocket:
    """An upgraded (echo) stream through the inbound listener, checked to echo."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    tls.sendall(f"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: echo\r\n"
                f"Connection: upgrade\r\n{extra}\r\n".encode())
    head = read_head(tls)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert _echoes(tls)
    return tls


def _echoes(tls: ssl.SSLSocket) -> bool:
    try:
        tls.sendall(b"ping")
        return tls.recv(4096) == b"ping"
    except OSError:
        return False


# -- rotations of the own SVID that must not take effect --------------------------------------

def _pem(*certs: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _expired_intermediate(root: Any, now: float) -> Any:
    """An intermediate of ``root`` that expired a minute before ``now``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tests.test_peer_certificates_review import Ca

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired intermediate")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(root.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now - 60, dt.UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(root.key, hashes.SHA256()))
    return Ca("expired intermediate", key, cert)


def _bad_rotations(pki: Pki) -> list[tuple[str, str, dict[str, bytes]]]:
    """(member, rule, files) of SVID sets a rotation may publish that must be refused."""
    from cryptography.hazmat.primitives import serialization

    from tests.test_rotation_e2e import svid_files

    ca, now = pki.ca, time.time()
    fresh = ca.issue(spiffe("orders"))
    other_td = DevCA.create("partner.example")
    root = _ca("root of an expired intermediate")
    gone = _expired_intermediate(root, now)
    leaf, key = _leaf(gone, spiffe("orders"))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return [
        ("another identity", "spiffe-id-changed", svid_files(ca.issue(spiffe("billing")), ca)),
        ("another trust domain", "spiffe-id-changed",
         svid_files(other_td.issue("spiffe://partner.example/ns/demo/sa/orders"), other_td)),
        ("another certificate's key", "key-mismatch",
         {**svid_files(fresh, ca), "tls.key": ca.issue(spiffe("orders")).key_pem}),
        ("half a key", "pem-invalid",
         {**svid_files(fresh, ca), "tls.key": fresh.key_pem[:len(fresh.key_pem) // 2]}),
        ("half a certificate", "pem-invalid",
         {**svid_files(fresh, ca), "tls.crt": fresh.chain_pem[:len(fresh.chain_pem) // 2]}),
        ("an empty key", "pem-invalid", {**svid_files(fresh, ca), "tls.key": b""}),
        ("not yet valid", "not-yet-valid",
         svid_files(ca.issue(spiffe("orders"), 3600, not_before=now + 3600), ca)),
        ("an expired intermediate", "chain-untrusted",
         {"tls.crt": _pem(leaf, gone.cert), "tls.key": key_pem, "ca.crt": _pem(root.cert)}),
    ]


def test_a_rotation_the_sidecar_must_not_take_keeps_the_svid_in_force(tmp_path, pki, app,
                                                                       procs):
    """Each bad set is refused with its rule in ``certificate_reload_failed``, the old
    certificate stays in force and the sidecar keeps serving; a rotated certificate naming
    another SPIFFE ID (another workload, another trust domain) used to be taken."""
    from tests.harness import KubeletVolume
    from tests.test_rotation_e2e import client_ctx, leaf_der, peer_der, reloads, svid_files

    ca = pki.ca
    d = KubeletVolume(tmp_path / "orders-svid")
    old = ca.issue(spiffe("orders"))
    d.publish(svid_files(old, ca))
    srv = _inbound(tmp_path, pki, app, procs, _write(tmp_path, _policy_doc(
        [{"name": "callers", "allow": {"from": [spiffe("frontend")]}}])), ident=d.root)
    port = srv.port("inbound")
    ctx = client_ctx(ca.issue(spiffe("frontend")), ca, tmp=tmp_path)
    for i, (member, rule, files) in enumerate(_bad_rotations(pki), start=1):
        d.publish(files)
        wait_for(lambda i=i: reloads(srv, "failed") >= i, timeout=10)
        event = srv.log_events("certificate_reload_failed")[-1]
        assert f"[rule {rule}]" in event["error"], (member, event)
        assert peer_der(port, ctx) == leaf_der(old.cert_pem), member
        assert http(port, "GET", "/", ctx=ctx).status == 200, member
    assert reloads(srv, "ok") == 0
    fresh = ca.issue(spiffe("orders"))
    d.publish(svid_files(fresh, ca))  # a good set is still picked up
    wait_for(lambda: reloads(srv, "ok") >= 1, timeout=10)
    assert peer_der(port, ctx) == leaf_der(fresh.cert_pem)


# -- a federated trust domain whose roots are all withdrawn -----------------------------------

PARTNER_TD = "partner.example"


def _empty_bundle(kind: str) -> bytes:
    if kind == "blank file":
        return b""
    if kind == "no keys":
        return b'{"keys": [], "spiffe_sequence": 2}'
    if kind == "jwt-svid keys only":
        return b'{"keys": [{"use": "jwt-svid", "kty": "EC", "kid": "j1"}]}'
    return spiffe_bundle_json([DevCA.create(PARTNER_TD).root])  # "another root": control


@pytest.mark.parametrize("kind", ["blank file", "no keys", "jwt-svid keys only",
                                  "another root"])
def test_a_federated_bundle_emptied_ends_the_partners_connections(tmp_path, pki, app, procs,
                                                                  kind):
    """The partner's only CA removed from its bundle leaves a bundle without roots: the
    partner's open connection ends and a new one is refused, our own callers are untouched;
    before, an empty bundle was refused as broken and the removed CA stayed trusted."""
    partner = DevCA.create(PARTNER_TD)
    bundle = tmp_path / "partner.json"
    bundle.write_bytes(spiffe_bundle_json([partner.root]))
    partner_id = f"spiffe://{PARTNER_TD}/ns/demo/sa/api"
    cfg = sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}",
        "allow_from": [partner_id, spiffe("frontend")]},
        limits={"connection_close_grace": GRACE})
    cfg["identity"]["trust_domains"] = {PARTNER_TD: {"bundle": str(bundle)}}
    srv = start_sidecar(tmp_path, "orders", cfg)
    procs.append(srv)
    port = srv.port("inbound")
    partner_ctx = mtls_context(write_svid(partner.issue(partner_id), partner,
                                          tmp_path / "partner-api"), pki.bundle)
    own_ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    held = keepalive(port, partner_ctx)
    ours = keepalive(port, own_ctx)
    replace_file(bundle, _empty_bundle(kind))
    wait_closed(srv, "peer_untrusted")
    assert_closed_by_server(held, port)
    with pytest.raises((OSError, ssl.SSLError)):
        http(port, "GET", "/", ctx=partner_ctx, timeout=5)
    r = http(port, "GET", "/", conn=ours)  # the own trust domain's caller is untouched
    assert r.status == 200
    ours.close()
    reloaded = srv.log_events("trust_bundle_reloaded")
    assert reloaded and reloaded[-1]["roots"] == (1 if kind == "another root" else 0)


def test_check_warns_about_an_empty_federated_bundle(tmp_path, pki):
    import yaml

    from tests.harness import sidecar_cli

    partner = tmp_path / "partner.json"
    partner.write_bytes(b'{"keys": []}')
    cfg = sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": "127.0.0.1:1", "allow_from": []})
    cfg["identity"]["trust_domains"] = {PARTNER_TD: {"bundle": str(partner)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = sidecar_cli("check", "-c", str(path), "--offline", "--no-ports")
    assert f"{PARTNER_TD} admits nobody" in r.stdout, r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert sidecar_cli("run", "-c", str(path), "--check").returncode == 0
