"""The pre-flight checks (``sidecar run --check``, ``sidecar check -c``) read
``identity.bundle`` as ``sidecar run`` does: PEM, or a SPIFFE trust bundle (JSON,
docs/config.md). Before (found by a hostile review) they refused a JSON bundle that ``run``
starts with, so an init container or CI gate running ``--check`` blocked a valid
deployment. Every form: both checks and ``run --check`` agree with what ``run`` loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from sidecar.identity.bundle import spiffe_bundle_json
from tests.harness import Pki, free_port, sidecar_cli, sidecar_config


def _json(pem: bytes) -> bytes:
    return spiffe_bundle_json(x509.load_pem_x509_certificates(pem))


# (form, how the bundle file is made from the PEM bundle, whether it loads)
FORMS: list[tuple[str, Callable[[bytes], bytes], bool]] = [
    ("pem", lambda pem: pem, True),
    ("spiffe-json", _json, True),
    ("spiffe-json-indented", lambda pem: b"\n  " + _json(pem), True),
    ("json-garbage", lambda pem: b'{"keys": 7}', False),
    ("json-no-keys", lambda pem: b'{"spiffe_sequence": 1}', False),
    ("pem-garbage", lambda pem: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     False),
    ("empty", lambda pem: b"", False),
]


@pytest.mark.parametrize(("form", "make", "loads"), FORMS, ids=[f[0] for f in FORMS])
def test_the_checks_read_the_bundle_as_run_does(tmp_path: Path, form: str,
                                                make: Callable[[bytes], bytes],
                                                loads: bool) -> None:
    pki = Pki(tmp_path / "pki")
    orders = pki.identity("orders")
    bundle = orders / "ca.crt"
    bundle.write_bytes(make(bundle.read_bytes()))
    cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                          "app": f"127.0.0.1:{free_port()}"})
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_check = sidecar_cli("run", "-c", str(path), "--check")
    check = sidecar_cli("check", "-c", str(path))
    bundle_lines = [line for line in check.stdout.splitlines() if "trust bundle" in line]
    assert (run_check.returncode == 0) is loads, (form, run_check.stdout, run_check.stderr)
    assert any("FAIL" in line for line in bundle_lines) is (not loads), (form, check.stdout)
    if not loads:
        assert str(bundle) in run_check.stdout + run_check.stderr + check.stdout
