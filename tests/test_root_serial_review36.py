"""A bundle root whose serial number is not positive is still judged by its key.

Found by the thirty-sixth session's hostile review of identities: ``crypto_problem`` returned
``serial-invalid`` for a serial of 0 before it looked at the key, and a bundle's root is
refused for ``key-weak`` alone (its serial and its own signature are not judged), so a
partner's root with serial 0 and a key the rules refuse -- a 2,046-bit RSA exponent (every
check with it a long exponentiation), secp256k1, P-192, RSA-1024 -- loaded, and the sidecar
started with it. Now the key is judged first, for every root whatever its serial: each weak
key of the family, with serial 0 and -1, keeps the bundle from loading (in process, by
``sidecar check`` and at ``sidecar run``), while a root with a sound key and serial 0 loads
as before (such roots exist).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

from sidecar.identity.svid import RULE_KEY_WEAK, SvidError, crypto_problem
from sidecar.identity.trust import bundle_from_certs
from tests import harness as h
from tests.derforge import resign, tlv
from tests.test_certs_review2 import PTD, _cert, root
from tests.test_edwards_weak_keys_review35 import WEAK_CERT_KEYS, _Holder

SIGNER = root("signer", None)
_MODULUS = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n


def _weak_keys() -> Iterator[tuple[str, Any]]:
    """Every kind of public key the rules refuse, as the key a root is made with."""
    yield "RSA 1024", rsa.generate_private_key(65537, 1024).public_key()
    yield "RSA exponent 3", rsa.RSAPublicNumbers(3, _MODULUS).public_key()
    yield "RSA exponent 2**32 + 15", rsa.RSAPublicNumbers(2**32 + 15, _MODULUS).public_key()
    yield "RSA exponent of 2,046 bits", rsa.RSAPublicNumbers(
        (1 << 2045) | 0x10001, _MODULUS).public_key()
    for curve in (ec.SECP192R1(), ec.SECP224R1(), ec.SECP256K1(), ec.BrainpoolP256R1()):
        yield f"EC {curve.name}", ec.generate_private_key(curve).public_key()
    yield "DSA 1024", dsa.generate_private_key(1024).public_key()
    name, key = WEAK_CERT_KEYS[0]
    yield name, key
    name, key = next((n, k) for n, k in WEAK_CERT_KEYS if n.startswith("Ed448"))
    yield name, key


WEAK_KEYS = tuple(_weak_keys())
SERIALS = {"0": b"\x00", "-1": b"\xff"}


def _with_serial(cert: x509.Certificate, serial: bytes) -> x509.Certificate:
    def patch(fields: list[bytes]) -> list[bytes]:
        first = 1 if fields[0][0] == 0xA0 else 0
        return [*fields[:first], tlv(0x02, serial), *fields[first + 1:]]
    return resign(cert, SIGNER.key, patch)


def _root(key: Any, serial: bytes) -> x509.Certificate:
    cert = _cert("partner root", _Holder(key), SIGNER, ca=True, uris=(f"spiffe://{PTD}",))
    return _with_serial(cert, serial)


@pytest.mark.parametrize("serial", SERIALS)
@pytest.mark.parametrize(("name", "key"), WEAK_KEYS, ids=[n for n, _ in WEAK_KEYS])
def test_a_root_with_a_weak_key_does_not_load_whatever_its_serial(name: str, key: Any,
                                                                  serial: str) -> None:
    cert = _root(key, SERIALS[serial])
    assert cert.serial_number == int.from_bytes(SERIALS[serial], "big", signed=True)
    problem = crypto_problem(cert)
    assert problem is not None and problem[0] == RULE_KEY_WEAK, (name, serial, problem)
    with pytest.raises(SvidError) as caught:
        bundle_from_certs(PTD, "partner.pem", [cert])
    assert caught.value.rule == RULE_KEY_WEAK and caught.value.file == "partner.pem", name


def test_a_root_with_a_sound_key_and_serial_0_still_loads() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("partner root", key, None, ca=True, uris=(f"spiffe://{PTD}",))
    zero = resign(cert, key, lambda f: [*f[:1], tlv(0x02, b"\x00"), *f[2:]])
    assert zero.serial_number == 0
    bundle_from_certs(PTD, "partner.pem", [zero])


# --- through the sidecar ------------------------------------------------------------------------

E2E = {"EC secp256k1": 0, "RSA exponent of 2,046 bits": 0}


def _config(tmp_path: Path, name: str) -> tuple[dict[str, Any], Path]:
    key = dict(WEAK_KEYS)[name]
    bundle = tmp_path / "partner.pem"
    bundle.write_bytes(_root(key, b"\x00").public_bytes(serialization.Encoding.PEM))
    pki = h.Pki(tmp_path / "pki")
    cfg = h.sidecar_config(pki.identity("orders"),
                           inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                    "app": f"127.0.0.1:{h.free_port()}"})
    cfg["identity"]["trust_domains"] = {PTD: {"bundle": str(bundle)}}
    return cfg, bundle


@pytest.mark.parametrize("name", E2E)
def test_sidecar_check_and_run_refuse_the_partner_bundle(tmp_path: Path, name: str) -> None:
    cfg, bundle = _config(tmp_path, name)
    path = tmp_path / "sidecar.yaml"
    path.write_text(h.yaml.safe_dump(cfg))
    checked = h.sidecar_cli("check", "-c", str(path))
    out = checked.stdout + checked.stderr
    assert checked.returncode != 0 and "key-weak" in out and str(bundle) in out, out
    assert "Traceback" not in out
    proc = h.start_sidecar(tmp_path, "orders", cfg, wait=False)
    try:
        assert proc.proc.wait(timeout=60) != 0
    finally:
        proc.stop()
    assert "key-weak" in proc.output(), proc.output()[-2000:]
