"""X.509-SVID rules, peer identity, and loading our SVID from files (sidecar/identity/svid.py)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import sidecar.identity.svid as svid_module
from sidecar.identity.ca import CA_KEY_USAGE, DevCA, write_svid
from sidecar.identity.svid import (
    SvidError,
    load_svid,
    peer_cache_statistics,
    peer_identity_from_der,
    snapshot_paths,
    svid_files_signature,
    validate_svid_leaf,
)
from tests.harness import KubeletVolume

TD = "example.org"
ID = "spiffe://example.org/ns/shop/sa/orders"


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create(TD)


def _der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def test_valid_leaf_gives_its_spiffe_id(ca: DevCA) -> None:
    assert str(validate_svid_leaf(ca.issue(ID).cert)) == ID


NO_DIGITAL_SIGNATURE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"extra_uris": ("spiffe://example.org/ns/shop/sa/admin",)}, "uri-san-count"),
        ({"spiffe_id": None, "dns_names": ("orders.shop.svc",)}, "uri-san-count"),
        ({"spiffe_id": None}, "uri-san-count"),
        ({"spiffe_id": "https://example.org/ns/shop/sa/orders"}, "uri-san-scheme"),
        ({"spiffe_id": "spiffe://example.org/ns//orders"}, "spiffe-id-invalid"),
        ({"spiffe_id": "spiffe://Example.org/a"}, "spiffe-id-invalid"),
        ({"spiffe_id": "spiffe://example.org"}, "spiffe-id-no-path"),
        ({"is_ca": True}, "leaf-is-ca"),
        ({"key_usage": None}, "key-usage-digital-signature"),
        ({"key_usage": NO_DIGITAL_SIGNATURE}, "key-usage-digital-signature"),
        ({"key_usage": CA_KEY_USAGE}, "key-usage-cert-sign"),
    ],
)
def test_each_broken_svid_rule_is_named(ca: DevCA, kwargs: dict[str, object], rule: str) -> None:
    spiffe_id = kwargs.pop("spiffe_id", ID)
    issued = ca.issue(spiffe_id, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SvidError) as caught:
        validate_svid_leaf(issued.cert)
    assert caught.value.rule == rule
    # The peer path applies exactly the same rules.
    with pytest.raises(SvidError) as caught_peer:
        peer_identity_from_der(_der(issued.cert_pem))
    assert caught_peer.value.rule == rule


def test_peer_identity_fields_and_cache(ca: DevCA) -> None:
    issued = ca.issue(ID)
    der = _der(issued.cert_pem)
    before = peer_cache_statistics()
    peer = peer_identity_from_der(der)
    assert peer.spiffe_id == ID
    assert peer.fingerprint == hashlib.sha256(der).hexdigest()
    assert peer.serial == format(issued.cert.serial_number, "x")
    assert peer.not_after == issued.cert.not_valid_after_utc.timestamp()
    again = peer_identity_from_der(bytearray(der))
    assert again is peer
    after = peer_cache_statistics()
    assert after["hits"] == before["hits"] + 1
    assert after["misses"] == before["misses"] + 1


def test_peer_cache_is_bounded(ca: DevCA, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = svid_module._PeerCache(2)
    monkeypatch.setattr(svid_module, "_peer_cache", cache)
    ders = [_der(ca.issue(f"spiffe://example.org/w{i}").cert_pem) for i in range(4)]
    for der in ders:
        peer_identity_from_der(der)
    # (keyed by the SHA-256 of the DER: tests/test_certs_review3.py)
    assert list(cache.entries) == [svid_module.der_key(d) for d in ders[2:]]


@pytest.mark.parametrize("der", [b"", None, b"not a certificate"])
def test_missing_or_garbage_peer_certificate_is_refused(der: bytes | None) -> None:
    with pytest.raises(SvidError):
        peer_identity_from_der(der)


def _write(ca: DevCA, directory: Path, spiffe_id: str = ID, **kwargs: object) -> Path:
    return write_svid(ca.issue(spiffe_id, **kwargs), ca, directory)  # type: ignore[arg-type]


def _load(d: Path, now: float | None = None) -> svid_module.Svid:
    return load_svid(
        str(d / "tls.crt"),
        str(d / "tls.key"),
        str(d / "ca.crt"),
        time.time() if now is None else now,
    )


def _rule(d: Path, now: float | None = None) -> tuple[str, str | None]:
    with pytest.raises(SvidError) as caught:
        _load(d, now)
    return caught.value.rule, caught.value.file


def test_load_valid_svid(ca: DevCA, tmp_path: Path) -> None:
    d = _write(ca, tmp_path)
    loaded = _load(d)
    assert str(loaded.spiffe_id) == ID
    assert loaded.cert_path == str(d / "tls.crt")
    assert loaded.not_before < time.time() < loaded.not_after
    assert b"PRIVATE KEY" in loaded.key_pem and b"PRIVATE KEY" not in repr(loaded).encode()


def test_load_rsa_svid_through_an_intermediate(ca: DevCA, tmp_path: Path) -> None:
    inter = ca.new_intermediate().new_intermediate()
    d = write_svid(inter.issue(ID, key_type="rsa2048"), inter, tmp_path)
    loaded = _load(d)
    assert len(x509.load_pem_x509_certificates(loaded.chain_pem)) == 3


def test_missing_intermediate_is_untrusted(ca: DevCA, tmp_path: Path) -> None:
    inter = ca.new_intermediate()
    issued = inter.issue(ID)
    d = write_svid(issued, inter, tmp_path)
    # tls.crt holds the leaf alone: the bundle has only the root, so no path exists.
    (d / "tls.crt").write_bytes(issued.cert_pem)
    (d / "tls.key").write_bytes(issued.key_pem)
    assert _rule(d) == ("chain-untrusted", str(d / "tls.crt"))


def test_broken_leaf_rule_names_the_cert_file(ca: DevCA, tmp_path: Path) -> None:
    d = _write(ca, tmp_path, extra_uris=("spiffe://example.org/other",))
    assert _rule(d) == ("uri-san-count", str(d / "tls.crt"))


def test_key_mismatch(ca: DevCA, tmp_path: Path) -> None:
    d = _write(ca, tmp_path)
    (d / "tls.key").write_bytes(ca.issue(ID).key_pem)
    assert _rule(d) == ("key-mismatch", str(d / "tls.key"))


def test_chain_to_the_wrong_ca(ca: DevCA, tmp_path: Path) -> None:
    other = DevCA.create(TD)
    d = _write(other, tmp_path)
    (d / "ca.crt").write_bytes(ca.bundle_pem)
    rule, file = _rule(d)
    assert (rule, file) == ("chain-untrusted", str(d / "tls.crt"))


def test_leaf_signed_by_a_non_ca_is_untrusted(ca: DevCA, tmp_path: Path) -> None:
    # A leaf pretending to be an issuer: same names and keys as a CA, but CA=false.
    fake_issuer_issued = ca.issue("spiffe://example.org/fake-ca")
    fake_key = serialization.load_pem_private_key(fake_issuer_issued.key_pem, password=None)
    fake = DevCA(TD, fake_issuer_issued.cert, fake_key, ca.root)  # type: ignore[arg-type]
    d = write_svid(fake.issue(ID), fake, tmp_path)
    assert _rule(d)[0] == "chain-untrusted"


def test_two_root_bundle_accepts_both_generations(ca: DevCA, tmp_path: Path) -> None:
    new = DevCA.create(TD)
    old_dir = _write(ca, tmp_path / "old")
    new_dir = _write(new, tmp_path / "new")
    both = ca.bundle_pem + new.bundle_pem
    for d in (old_dir, new_dir):
        (d / "ca.crt").write_bytes(both)
        assert str(_load(d).spiffe_id) == ID


def test_validity_window(ca: DevCA, tmp_path: Path) -> None:
    d = _write(ca, tmp_path, ttl_seconds=3600)
    loaded = _load(d)
    assert _rule(d, loaded.not_after + 1) == ("expired", str(d / "tls.crt"))
    assert _rule(d, loaded.not_before - 1) == ("not-yet-valid", str(d / "tls.crt"))
    assert _load(d, loaded.not_after).spiffe_id  # the last second is still valid


def test_expired_certificate_from_the_ca(ca: DevCA, tmp_path: Path) -> None:
    d = _write(ca, tmp_path, not_before=time.time() - 7200, ttl_seconds=3600)
    assert _rule(d)[0] == "expired"


@pytest.mark.parametrize(
    ("name", "content", "rule"),
    [
        ("tls.crt", b"garbage", "pem-invalid"),
        ("ca.crt", b"", "pem-invalid"),
        (
            "tls.key",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "pem-invalid",
        ),
        ("tls.key", None, "file-unreadable"),
        ("ca.crt", None, "file-unreadable"),
    ],
)
def test_bad_files_name_the_file(
    ca: DevCA, tmp_path: Path, name: str, content: bytes | None, rule: str
) -> None:
    d = _write(ca, tmp_path)
    if content is None:
        (d / name).unlink()
    else:
        (d / name).write_bytes(content)
    assert _rule(d) == (rule, str(d / name))


def test_oversized_file_is_refused(ca: DevCA, tmp_path: Path) -> None:
    d = _write(ca, tmp_path)
    with open(d / "ca.crt", "ab") as f:
        f.write(b"#" * (svid_module.MAX_FILE_BYTES + 1))
    assert _rule(d) == ("file-unreadable", str(d / "ca.crt"))


def _publish(ca: DevCA, root: Path, generation: str) -> Path:
    """A fresh SVID in kubelet's atomic-writer layout: name -> ..data/name -> ..<gen>/name."""
    issued = ca.issue(ID)
    KubeletVolume(root).publish({"tls.crt": issued.chain_pem, "tls.key": issued.key_pem,
                                 "ca.crt": ca.bundle_pem}, stamp=generation)
    return root


def test_kubernetes_data_layout_reads_one_snapshot(
    ca: DevCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = _publish(ca, tmp_path, "gen1")
    assert snapshot_paths(str(volume / "tls.crt"))[0] == str(tmp_path / "..gen1" / "tls.crt")
    # Swap to a new generation right after the first file is read: reading the visible
    # paths would pair gen1's certificate with gen2's key (key-mismatch).
    real_read = svid_module._read
    swapped: list[bool] = []

    def read_then_swap(path: str, shown: str) -> bytes:
        data = real_read(path, shown)
        if not swapped:
            swapped.append(True)
            _publish(ca, volume, "gen2")
        return data

    monkeypatch.setattr(svid_module, "_read", read_then_swap)
    first = _load(volume)
    assert swapped
    assert first.chain_pem == (tmp_path / "..gen1" / "tls.crt").read_bytes()
    monkeypatch.setattr(svid_module, "_read", real_read)
    second = _load(volume)
    assert second.chain_pem == (tmp_path / "..gen2" / "tls.crt").read_bytes()
    assert first.chain_pem != second.chain_pem


def test_plain_files_and_symlinks_outside_data_are_read_as_is(ca: DevCA, tmp_path: Path) -> None:
    d = _write(ca, tmp_path / "real")
    link = tmp_path / "link.crt"
    os.symlink(d / "tls.crt", link)
    assert snapshot_paths(str(link), str(d / "tls.key")) == (str(link), str(d / "tls.key"))


def test_files_signature_changes_on_data_swap_and_rewrite(ca: DevCA, tmp_path: Path) -> None:
    volume = _publish(ca, tmp_path / "vol", "gen1")
    paths = [str(volume / n) for n in ("tls.crt", "tls.key", "ca.crt")]
    first = svid_files_signature(*paths)
    assert all(first) and first == svid_files_signature(*paths)
    _publish(ca, volume, "gen2")
    second = svid_files_signature(*paths)
    assert all(a != b for a, b in zip(first, second, strict=True))

    plain = _write(ca, tmp_path / "plain")
    plain_paths = [str(plain / n) for n in ("tls.crt", "tls.key", "ca.crt")]
    before = svid_files_signature(*plain_paths)
    _write(ca, tmp_path / "plain")  # write_svid replaces files: new inodes
    after = svid_files_signature(*plain_paths)
    assert before[0] != after[0] and before[1] != after[1]
    (plain / "tls.key").unlink()
    assert svid_files_signature(*plain_paths)[1] is None
