"""Keyring keys that verify nothing are refused (``signing.weak_public_key``).

Found by a hostile review: OpenSSL accepts any encoding of a point as an Ed25519 public key,
and under a point of small order (the identity, the all-zero "placeholder" key, ...) anyone
makes signatures that verify (R = identity, S = 0 verifies every message under the
identity). Such a key in ``verify --pubkey``'s keyring let a re-chained trail, every deny
made an allow and every checkpoint "signed" under it, verify OK. Every small-order point, in
each of its spellings (the sign bit set or not, a y not reduced modulo p), is refused when
the keyring is loaded; the attack through the CLI ends in a usage error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sidecar.audit.signing import key_id, load_keyring
from sidecar.edwards import weak_public_key
from tests.harness import sidecar_cli
from tests.test_audit_attacks import Trail, flip_denies, rechain, trail  # noqa: F401 (fixture)

_P = 2**255 - 19
# The eight points of small order (orders 1, 2, 4 and 8), as libsodium's blocklist spells
# them, and the non-canonical spellings of 0 and 1 (y = p, y = p + 1).
SMALL_ORDER = {
    "identity": bytes([1]) + bytes(31),
    "zero (order 4)": bytes(32),
    "order 8 (a)": bytes.fromhex(
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "order 8 (b)": bytes.fromhex(
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    "p - 1 (order 2)": (_P - 1).to_bytes(32, "little"),
    "p (y = 0, not reduced)": _P.to_bytes(32, "little"),
    "p + 1 (y = 1, not reduced)": (_P + 1).to_bytes(32, "little"),
}


def _spellings() -> list[tuple[str, bytes]]:
    out = []
    for name, raw in SMALL_ORDER.items():
        out.append((name, raw))
        out.append((name + ", sign bit flipped", raw[:31] + bytes([raw[31] ^ 0x80])))
    # y + p for the small y values (a second spelling of the same point)
    for y in (0, 1):
        out.append((f"y = {y} + p", (y + _P).to_bytes(32, "little")))
    return out


WEAK = _spellings()


@pytest.mark.parametrize(("name", "raw"), WEAK, ids=[n for n, _ in WEAK])
def test_every_spelling_of_a_small_order_point_is_weak(name: str, raw: bytes) -> None:
    assert weak_public_key(raw) is not None, name


def test_real_keys_are_not_weak() -> None:
    for _ in range(200):
        pub = Ed25519PrivateKey.generate().public_key()
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert weak_public_key(raw) is None


def _pem(raw: bytes) -> bytes | None:
    try:
        key = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None  # (an encoding OpenSSL itself refuses: nothing to load)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(("name", "raw"), WEAK, ids=[n for n, _ in WEAK])
def test_a_keyring_holding_a_weak_key_is_refused(tmp_path: Path, name: str, raw: bytes) -> None:
    pem = _pem(raw)
    if pem is None:
        pytest.skip("OpenSSL refuses this encoding itself")
    good = tmp_path / "good.pub"
    good.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    weak = tmp_path / "weak.pub"
    weak.write_bytes(pem)
    load_keyring([str(good)])
    for paths in ([str(weak)], [str(good), str(weak)]):
        with pytest.raises(ValueError, match="verifies nothing"):
            load_keyring(paths)
    both = tmp_path / "both.pub"  # one file holding a good key and the weak one
    both.write_bytes(good.read_bytes() + pem)
    with pytest.raises(ValueError, match="verifies nothing"):
        load_keyring([str(both)])


def test_the_review_attack_with_the_identity_key_fails(trail: Trail) -> None:  # noqa: F811
    """The review's trail: every deny made an allow, re-chained, every checkpoint and seal
    "signed" under the identity key (R = identity, S = 0) with its key id."""
    identity = SMALL_ORDER["identity"]
    weak = trail.dir.parent / "weak.pub"
    pem = _pem(identity)
    assert pem is not None
    weak.write_bytes(pem)
    kid = key_id(Ed25519PublicKey.from_public_bytes(identity))

    def forge(segments: list) -> None:
        flip_denies(segments)
        for _path, frames in segments:
            for f in frames:
                for k in ("chk", "end"):
                    if k in f and "sig" in f[k]:
                        f[k]["kid"], f[k]["sig"] = kid, identity + bytes(32)

    rechain(trail.dir, forge)
    out = sidecar_cli("audit", "verify", str(trail.dir), "--pubkey", str(trail.pub),
                      "--pubkey", str(weak), "--id", "spiffe://td/ns/demo/sa/orders")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "verifies nothing" in out.stderr and str(weak) in out.stderr
    assert "OK" not in out.stdout
