"""Content that loads but cannot be applied is a failure of that content, never the set in
force (``FileWatcher._settle``).

Found by a hostile review of the twenty-seventh session's fixes: a federated bundle that
loaded but could not be applied (it holds a CA another trust domain's bundle holds) was
recorded as the files in force. Its withdrawal of the roots it no longer listed was right;
but after any later failure, writing that same file again counted as "back to the set in
force", and ``certificates_restored`` put back a withdrawn root that no file listed. And the
file was never tried again once the conflict was gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import (
    Pki,
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

PARTNER = "partner.example"


def _plain_ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Shared CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _events(proc: Any, name: str) -> int:
    return len(proc.log_events(name))


def test_a_bundle_that_cannot_be_applied_is_a_failure_not_the_set_in_force(
        tmp_path: Path) -> None:
    pa = Pki(tmp_path / "pa", trust_domain=PARTNER)
    pb = Pki(tmp_path / "pb", trust_domain=PARTNER)
    ra, rb, shared = Path(pa.bundle).read_bytes(), Path(pb.bundle).read_bytes(), _plain_ca()
    fed, third = tmp_path / "partner.crt", tmp_path / "third.crt"
    replace_file(fed, ra + rb)
    replace_file(third, shared)
    caller = spiffe("frontend", td=PARTNER)
    policy = tmp_path / "policy.yaml"
    replace_file(policy, f"version: 1\ntrust_domain: demo.local\nservices:\n"
                         f"  {spiffe('orders')}:\n    rules:\n      - name: r\n"
                         f"        allow: {{from: [{caller}]}}\n")
    pki = Pki(tmp_path / "pki")
    with contextlib.ExitStack() as stack:
        app, app_port = start_app(tmp_path)
        stack.callback(app.stop, timeout=10)
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(policy))
        cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(fed)},
                                            "third.example": {"bundle": str(third)}}
        proc = start_sidecar(tmp_path, "orders", cfg)
        stack.callback(proc.stop, timeout=10)
        under_b = mtls_context(pb.identity("frontend"), pki.bundle)
        under_a = mtls_context(pa.identity("frontend"), pki.bundle)

        def status(ctx: Any) -> int | str:
            try:
                return http(proc.port("inbound"), "GET", "/x", ctx=ctx, timeout=5).status
            except OSError as exc:
                return type(exc).__name__

        assert status(under_b) == 200 and status(under_a) == 200
        # 1. R_B removed and a CA of third.example added: loads, cannot be applied; R_B,
        #    no longer listed, is withdrawn.
        failed = _events(proc, "certificate_reload_failed")
        replace_file(fed, ra + shared)
        wait_for(lambda: _events(proc, "certificate_reload_failed") > failed)
        wait_for(lambda: status(under_b) != 200)
        # 2. A broken file, then 3. the same unapplied file again: R_B stays withdrawn.
        failed = _events(proc, "certificate_reload_failed")
        replace_file(fed, b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")
        wait_for(lambda: _events(proc, "certificate_reload_failed") > failed)
        failed = _events(proc, "certificate_reload_failed")
        replace_file(fed, ra + shared)
        wait_for(lambda: _events(proc, "certificate_reload_failed") > failed)
        assert status(under_b) != 200
        assert not [e for e in proc.log_events("certificates_restored")
                    if e.get("trust_domain") == PARTNER]
        # 4. The conflict gone (third.example's bundle no longer holds the CA): the partner
        #    file as it is, a failure, is tried again (after 30 s, or at once on a reload
        #    signal) and applied -- R_A trusted, R_B not. (Recorded as in force, it never was.)
        reloaded = _events(proc, "trust_bundle_reloaded")
        replace_file(third, _plain_ca())
        wait_for(lambda: _events(proc, "trust_bundle_reloaded") > reloaded)
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: any(e.get("trust_domain") == PARTNER
                             for e in proc.log_events("trust_bundle_reloaded")), timeout=15)
        assert status(under_a) == 200 and status(under_b) != 200
