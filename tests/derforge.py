"""Certificates cryptography's builder will not make, made by DER surgery for tests.

A certificate is built properly, its to-be-signed part taken apart into its fields, one
field re-encoded (validity as GeneralizedTime, no version field, a signature
AlgorithmIdentifier without its NULL parameter) and the whole signed again by the issuer's
key: the result is signed correctly, so OpenSSL verifies it, while its encoding is one the
chain check (cryptography's RFC 5280 profile) refuses. The technique of the hostile review
of session 27 (/work/probe-cert2/der.py), typed and kept small.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Fields = list[bytes]

# sha256WithRSAEncryption, with the NULL parameter RFC 4055 requires and without it
RSA_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")
RSA_SHA256_NO_NULL = bytes.fromhex("300b06092a864886f70d01010b")

_UTC_TIME, _GENERALIZED_TIME, _VERSION_TAG = 0x17, 0x18, 0xA0


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element (definite length)."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def tlv_span(der: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of the content, end of the element) of the element at ``i``."""
    n, j = der[i + 1], i + 2
    if n & 0x80:
        count = n & 0x7F
        n, j = int.from_bytes(der[j:j + count], "big"), j + count
    return der[i], j, j + n


def _elements(der: bytes) -> Fields:
    out, i = [], 0
    while i < len(der):
        _, _, end = tlv_span(der, i)
        out.append(der[i:end])
        i = end
    return out


def resign(cert: x509.Certificate, key: Key, patch: Callable[[Fields], Fields] | None = None,
           *, alg: bytes | None = None) -> x509.Certificate:
    """``cert`` with its TBS fields passed through ``patch`` (any length), its signature
    AlgorithmIdentifier (inside and outside the TBS) replaced by ``alg`` when given, signed
    again by ``key`` (SHA-256). Without ``patch`` and ``alg``: the same certificate signed
    again, the control that the surgery itself makes well-formed certificates."""
    der = cert.public_bytes(serialization.Encoding.DER)
    _, body, _ = tlv_span(der, 0)
    _, tbs_start, tbs_end = tlv_span(der, body)
    _, _, alg_end = tlv_span(der, tbs_end)
    fields = _elements(der[tbs_start:tbs_end])
    if patch is not None:
        fields = patch(fields)
    algorithm = alg if alg is not None else der[tbs_end:alg_end]
    fields[2 if fields[0][0] == _VERSION_TAG else 1] = algorithm
    tbs = tlv(0x30, b"".join(fields))
    if isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_certificate(
        tlv(0x30, tbs + algorithm + tlv(0x03, b"\x00" + sig)))


def generalized_time(fields: Fields) -> Fields:
    """The validity's UTCTime dates (before 2050) re-encoded as GeneralizedTime, which RFC
    5280 4.1.2.5 forbids for them: OpenSSL reads them, the chain check refuses them."""
    i = 4 if fields[0][0] == _VERSION_TAG else 3
    _, start, end = tlv_span(fields[i], 0)
    dates = []
    for element in _elements(fields[i][start:end]):
        tag, c, e = tlv_span(element, 0)
        value = element[c:e]
        if tag == _UTC_TIME:
            tag, value = _GENERALIZED_TIME, b"20" + value
        dates.append(tlv(tag, value))
    return [*fields[:i], tlv(0x30, b"".join(dates)), *fields[i + 1:]]


def without_version(fields: Fields) -> Fields:
    """No version field (a v1 encoding) while the extensions stay (RFC 5280 4.1.2.1)."""
    return fields[1:] if fields[0][0] == _VERSION_TAG else fields


@dataclass
class Issuer:
    key: Key
    cert: x509.Certificate


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _sign(b: x509.CertificateBuilder, key: Key) -> x509.Certificate:
    return b.sign(key, hashes.SHA256())


def ca(cn: str, trust_domain: str, issuer: Issuer | None = None, *, key: Key | None = None,
       subject: x509.Name | None = None, san_critical: bool = False,
       days: float = 30) -> Issuer:
    """A SPIFFE signing certificate (CA, keyCertSign, its trust domain in the SAN): a root
    when ``issuer`` is None."""
    key = key or ec_key()
    now = dt.datetime.now(dt.UTC)
    own = subject if subject is not None else name(cn)
    b = (x509.CertificateBuilder().subject_name(own)
         .issuer_name(issuer.cert.subject if issuer else own)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(hours=1))
         .not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                      False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False)
         .add_extension(x509.SubjectAlternativeName(
             [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
             critical=san_critical))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.key.public_key()), critical=False)
    return Issuer(key, _sign(b, issuer.key if issuer else key))


def leaf(issuer: Issuer, spiffe_id: str, *,
         extra: Sequence[tuple[x509.ExtensionType, bool]] = ()
         ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An X.509-SVID for ``spiffe_id`` (client and server) issued by ``issuer``."""
    key = ec_key()
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name(spiffe_id.rsplit("/", 1)[-1]))
         .issuer_name(issuer.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                      False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
         .add_extension(x509.SubjectAlternativeName(
             [x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             issuer.key.public_key()), critical=False))
    for ext, critical in extra:
        b = b.add_extension(ext, critical=critical)
    return _sign(b, issuer.key), key


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
