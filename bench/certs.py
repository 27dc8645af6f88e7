"""Certificates for the benchmark mesh: one dev CA and SPIFFE X.509-SVID leafs.

Prefers the project's own CLI (``python -m sidecar.identity.cli ca init`` / ``cert issue``) so
the benchmark exercises the same certificates users get; falls back to generating them here with
``cryptography`` (ECDSA P-256, one URI SAN, leaf not a CA) when that CLI is not there yet.
Every SVID directory uses the csi-driver-spiffe layout: ``tls.crt``, ``tls.key``, ``ca.crt``.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "bench.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/server"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SvidFiles:
    """Paths of one workload's certificate files."""

    spiffe_id: str
    cert: str  # leaf (+ intermediates)
    key: str
    bundle: str  # trust bundle (the dev CA)


@dataclass(frozen=True)
class MeshCerts:
    """The CA and the two workload identities of the benchmark mesh."""

    ca_dir: str
    client: SvidFiles  # sidecar A / proxy A: the caller
    server: SvidFiles  # sidecar B / proxy B: the callee
    made_by: str  # "sidecar.identity.cli" or "bench.certs"


def _svid(spiffe_id: str, out: str) -> SvidFiles:
    return SvidFiles(spiffe_id, os.path.join(out, "tls.crt"), os.path.join(out, "tls.key"),
                     os.path.join(out, "ca.crt"))


def _project_cli_available() -> bool:
    return os.path.exists(os.path.join(REPO_ROOT, "sidecar", "identity", "cli.py"))


def _run_cli(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "sidecar.identity.cli", *args], check=True,
                   capture_output=True, timeout=CLI_TIMEOUT_S, env=env, cwd=REPO_ROOT)


def _make_with_project_cli(workdir: str) -> MeshCerts:
    ca_dir = os.path.join(workdir, "ca")
    _run_cli("ca", "init", "--trust-domain", TRUST_DOMAIN, "--out", ca_dir)
    out = {}
    for name, sid in (("client", CLIENT_ID), ("server", SERVER_ID)):
        d = os.path.join(workdir, name)
        _run_cli("cert", "issue", "--ca", ca_dir, "--spiffe-id", sid, "--out", d)
        out[name] = _svid(sid, d)
    return MeshCerts(ca_dir, out["client"], out["server"], "sidecar.identity.cli")


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_with_cryptography(workdir: str, server_dns: str | None = None) -> MeshCerts:
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench dev CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(TRUST_DOMAIN)]
            + ([x509.DNSName(server_dns)] if server_dns else []),
            excluded_subtrees=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_dir = os.path.join(workdir, "ca")
    os.makedirs(ca_dir, exist_ok=True)
    _write(os.path.join(ca_dir, "ca.crt"), ca_pem)
    _write(os.path.join(ca_dir, "ca.key"), _key_pem(ca_key), 0o600)
    out = {}
    for name, sid in (("client", CLIENT_ID), ("server", SERVER_ID)):
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(sid)]
        if server_dns and name == "server":
            sans.append(x509.DNSName(server_dns))
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        d = os.path.join(workdir, name)
        os.makedirs(d, exist_ok=True)
        files = _svid(sid, d)
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM))
        _write(files.key, _key_pem(key), 0o600)
        _write(files.bundle, ca_pem)
        out[name] = files
    return MeshCerts(ca_dir, out["client"], out["server"], "bench.certs")


def make_mesh_certs(workdir: str, *, prefer_project_cli: bool = True,
                    server_dns: str | None = None) -> MeshCerts:
    """Create a CA and the client/server SVIDs under ``workdir``.

    The project CLI is used when present; if it fails (it may be mid-development) the
    certificates are generated here instead, so the benchmark still runs. ``server_dns`` adds
    a DNS SAN to the server leaf (generated here): nginx can only check a peer by host name,
    never by URI SAN, so its setup pins that name instead of the SPIFFE ID.
    """
    if server_dns is None and prefer_project_cli and _project_cli_available():
        try:
            return _make_with_project_cli(workdir)
        except (subprocess.SubprocessError, OSError):
            pass
    return _make_with_cryptography(workdir, server_dns)
