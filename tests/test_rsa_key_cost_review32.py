"""RSA keys whose every use is costly are refused like weak ones (a hostile review,
thirty-second session).

Only the modulus had a floor (2048 bits). A partner who writes its own federated bundle listed
256 CA certificates with RSA public exponents of 2,046-3,070 bits: each check with such a key
is a long exponentiation (3-10 ms instead of 0.03), so the event loop stalled 2.2-2.5 s at
each change of the file, and a handshake naming one as issuer cost 13.8 ms of CPU before it
was refused (2.0 for an unknown CA). Now every certificate key the sidecar loads or is sent
(bundle roots, intermediates, leaves, its own chain: ``crypto_problem``) must be RSA of
2048-16384 bits with an odd public exponent from 65537 to 2**32 - 1 (Go refuses larger ones,
so SPIRE, istiod and ghostunnel never make them), or is ``key-weak``. The members as data,
in process for each place a key is checked, and a root of each kind through a real sidecar
(``tests/test_roots_withdrawn_failed_checks.py``, ``ADDED``: the file with it is refused and
the roots in force are kept).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from sidecar.identity.svid import (
    MAX_RSA_EXPONENT,
    MIN_RSA_EXPONENT,
    RULE_KEY_WEAK,
    SvidError,
    crypto_problem,
)
from sidecar.identity.trust import bundle_from_certs

_BASE = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_with_exponent(e: int, base: rsa.RSAPrivateKey = _BASE) -> rsa.RSAPrivateKey:
    """``base``'s modulus with public exponent ``e`` (the next one coprime to lambda(n))."""
    numbers = base.private_numbers()
    p, q = numbers.p, numbers.q
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    while math.gcd(e, lam) != 1:
        e += 2
    d = pow(e, -1, lam)
    return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                 rsa.RSAPublicNumbers(e, p * q)).private_key()


def certificate(key: rsa.RSAPrivateKey, *, ca: bool, signer: rsa.RSAPrivateKey | None = None,
                td: str = "partner.example") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "costly")])
    now = dt.datetime.now(dt.UTC)
    uri = f"spiffe://{td}" if ca else f"spiffe://{td}/ns/a/sa/b"
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(not ca, False, False, False, False, ca, ca, False,
                                         False), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=False)
            .sign(signer or key, hashes.SHA256()))


# Exponent -> accepted? (odd, from 65537 to 2**32 - 1)
EXPONENTS: dict[str, tuple[int, bool]] = {
    "3": (3, False), "17": (17, False), "257": (257, False),
    "65537": (65537, True), "65539": (65539, True), "2**31 - 1": (2**31 - 1, True),
    "2**32 + 15": (2**32 + 15, False), "2**64 + 13": (2**64 + 13, False),
    "256 bits": (2**255 + 1, False), "2046 bits": (2**2045 + 1, False),
}


@pytest.mark.parametrize("name", sorted(EXPONENTS))
@pytest.mark.parametrize("place", ["root", "leaf"])
def test_every_exponent_is_judged_in_every_place(name: str, place: str) -> None:
    e, accepted = EXPONENTS[name]
    key = key_with_exponent(e)
    cert = certificate(key, ca=place == "root", signer=None if place == "root" else _BASE)
    problem = crypto_problem(cert)
    if accepted:
        assert problem is None, (name, problem)
    else:
        assert problem is not None and problem[0] == RULE_KEY_WEAK, (name, problem)
        assert "exponent" in problem[1]
    if place == "root":  # (a bundle is refused whole, naming the rule)
        build: Callable[[], object] = lambda: bundle_from_certs(  # noqa: E731
            "partner.example", "partner.pem", [cert])
        if accepted:
            build()
        else:
            with pytest.raises(SvidError) as err:
                build()
            assert err.value.rule == RULE_KEY_WEAK


def test_the_bounds_are_the_documented_ones() -> None:
    assert (MIN_RSA_EXPONENT, MAX_RSA_EXPONENT) == (65537, 2**32 - 1)


def test_a_modulus_past_16384_bits_is_refused() -> None:
    """A public key alone (no one signs with it here): an odd modulus of 16,392 bits."""
    n = (1 << 16391) | 0xFFFF_FFFF | 1
    public = rsa.RSAPublicNumbers(65537, n).public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(_BASE, hashes.SHA256()))
    problem = crypto_problem(cert)
    assert problem is not None and problem[0] == RULE_KEY_WEAK and "16384" in problem[1]
