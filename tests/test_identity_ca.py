"""The development CA (sidecar/identity/ca.py)."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.identity.ca import DevCA, write_svid
from sidecar.identity.svid import load_svid, validate_svid_leaf

ID = "spiffe://example.org/ns/shop/sa/orders"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_and_load_round_trip_with_private_modes(tmp_path: Path) -> None:
    ca = DevCA.create("example.org")
    ca.save(tmp_path / "ca")
    assert _mode(tmp_path / "ca") == 0o700
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    loaded = DevCA.load(tmp_path / "ca")
    assert loaded.trust_domain == "example.org"
    assert loaded.cert == ca.cert
    issued = loaded.issue(ID)
    assert issued.cert.verify_directly_issued_by(ca.cert) is None


def test_root_is_a_ca_for_its_trust_domain() -> None:
    ca = DevCA.create("example.org")
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert bc.ca and ku.key_cert_sign and ku.crl_sign
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert ca.bundle_pem == ca.cert_pem


@pytest.mark.parametrize("bad", ["", "Example.org", "a/b", "td:1"])
def test_bad_trust_domain_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        DevCA.create(bad)


def test_default_leaf_is_an_ec_p256_svid_for_both_directions() -> None:
    ca = DevCA.create("example.org")
    before = time.time()
    issued = ca.issue(ID, ttl_seconds=600)
    cert = issued.cert
    assert str(validate_svid_leaf(cert)) == ID
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    # Backdated a minute for clock skew; lifetime is the TTL.
    assert cert.not_valid_before_utc.timestamp() <= before
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() == 600
    assert issued.chain_pem == issued.cert_pem


def test_rsa_leaf_and_unknown_key_type() -> None:
    ca = DevCA.create("example.org")
    key = ca.issue(ID, key_type="rsa2048").cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    with pytest.raises(ValueError, match="unknown key type"):
        ca.issue(ID, key_type="dsa")  # type: ignore[arg-type]


def test_intermediates_are_in_the_chain_and_the_bundle_is_the_root(tmp_path: Path) -> None:
    root = DevCA.create("example.org")
    second = root.new_intermediate().new_intermediate()
    issued = second.issue(ID)
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    assert len(chain) == 3
    assert chain[1] == second.cert and chain[2] == second.parents[0]
    assert second.bundle_pem == root.cert_pem
    d = write_svid(issued, second, tmp_path)
    assert load_svid(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt"), time.time())


def test_write_svid_uses_csi_driver_names_and_modes(tmp_path: Path) -> None:
    ca = DevCA.create("example.org")
    issued = ca.issue(ID)
    d = write_svid(issued, ca, tmp_path / "svid")
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert _mode(d / "tls.key") == 0o600
    assert (d / "tls.crt").read_bytes() == issued.chain_pem
    assert (d / "ca.crt").read_bytes() == ca.bundle_pem
