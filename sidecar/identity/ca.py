"""A development certificate authority, in the manner of trustme.

It makes a self-signed root for one trust domain and issues X.509-SVIDs from it, for
``sidecar ca`` / ``sidecar cert``, the demo and the tests. It is *not* a production CA: keys
live in plain files (``ca.key`` is written 0600) and there is no revocation. In a cluster use
cert-manager with csi-driver-spiffe, or SPIRE.

``issue`` has knobs that exist only so tests can build certificates that break one SVID rule
at a time (two URI SANs, a CA flag, no digitalSignature, expired, DNS-only SAN).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.config.source import read_whole
from sidecar.identity.spiffe import parse_spiffe_id

KeyType = Literal["ec256", "rsa2048"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CA_FILE_BYTES = 1024 * 1024  # the most `cert issue --ca` reads of ca.crt or ca.key
# The file names cert-manager's csi-driver-spiffe writes into the pod.
SVID_CERT_FILE = "tls.crt"
SVID_KEY_FILE = "tls.key"
SVID_BUNDLE_FILE = "ca.crt"

CA_TTL_SECONDS = 10 * 365 * 86400
# Clock skew between machines: certificates start a minute in the past.
BACKDATE_SECONDS = 60

LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def generate_key(key_type: KeyType = "ec256") -> PrivateKey:
    """A fresh private key: ECDSA P-256 (default) or RSA 2048."""
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r} (use ec256 or rsa2048)")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _open_key_directory(d: Path) -> int:
    """A descriptor of the directory ``d`` that key files are written into. A new one is
    created 0700 (its missing parents as the umask says). An existing one is refused
    (``OSError`` saying why) when it is a symbolic link, is owned by another user than the
    effective uid, or is writable by its group or others: whoever made it could read the
    key, or plant a link where it is written (``/tmp/devca`` made first by someone else)."""
    created = False
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(d, 0o700)
        created = True
    except FileExistsError:
        pass
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(d):
            raise OSError(errno.ELOOP, "is a symbolic link: refusing to write a private key "
                          "through it", str(d)) from None
        raise
    try:
        st = os.fstat(fd)
        if created:
            os.fchmod(fd, 0o700)  # mkdir's mode went through the umask
        elif st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"the directory belongs to uid {st.st_uid}, not to this "
                          f"user (uid {os.geteuid()}): refusing to write a private key into "
                          "it", str(d))
        elif st.st_mode & 0o022:
            raise OSError(errno.EPERM, f"the directory is writable by its group or others "
                          f"(mode {st.st_mode & 0o7777:04o}): refusing to write a private key "
                          "into it", str(d))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_files(d: Path, files: list[tuple[str, bytes, int]]) -> None:
    """Write each ``(name, data, mode)`` into the directory ``d`` (``_open_key_directory``):
    a new file of that mode under a random name (``O_EXCL|O_NOFOLLOW``: never through a
    link), then renamed over ``name``, all relative to the directory's descriptor."""
    dir_fd = _open_key_directory(d)
    try:
        for name, data, mode in files:
            tmp = f".{name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as fh:
                    os.fchmod(fh.fileno(), mode)
                    fh.write(data)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass
                raise
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class IssuedCert:
    """What ``DevCA.issue`` returns; ``chain_pem`` is the leaf then its intermediates."""

    cert_pem: bytes
    key_pem: bytes
    chain_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        """The leaf as a cryptography object."""
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass(frozen=True)
class DevCA:
    """A signing CA: a root, or an intermediate made by ``new_intermediate``.

    ``parents`` lists the intermediates above this one (nearest first, root excluded);
    ``root`` is the self-signed anchor that goes in the trust bundle.
    """

    trust_domain: str
    cert: x509.Certificate
    key: PrivateKey
    root: x509.Certificate
    parents: tuple[x509.Certificate, ...] = field(default=())

    @classmethod
    def create(
        cls, trust_domain: str, *, key_type: KeyType = "ec256", now: float | None = None
    ) -> DevCA:
        """A new self-signed root CA for ``trust_domain``."""
        parsed = parse_spiffe_id(f"spiffe://{trust_domain}")
        if parsed.path:
            raise ValueError(f"trust domain {trust_domain!r} must not contain '/'")
        td = parsed.trust_domain
        key = generate_key(key_type)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar dev CA"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{td} root"[:64]),
            ]
        )
        start = (now if now is not None else dt.datetime.now(dt.UTC).timestamp()) - BACKDATE_SECONDS
        cert = _ca_builder(name, name, key, key, td, start, CA_TTL_SECONDS).sign(
            key, hashes.SHA256()
        )
        return cls(trust_domain=td, cert=cert, key=key, root=cert)

    def new_intermediate(self, *, key_type: KeyType = "ec256") -> DevCA:
        """A CA signed by this one; leaves it issues carry it in their chain."""
        key = generate_key(key_type)
        depth = len(self.parents) + 1
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar dev CA"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"{self.trust_domain} intermediate {depth}"[:64]
                ),
            ]
        )
        start = dt.datetime.now(dt.UTC).timestamp() - BACKDATE_SECONDS
        cert = _ca_builder(
            name, self.cert.subject, key, self.key, self.trust_domain, start, CA_TTL_SECONDS // 2
        ).sign(self.key, hashes.SHA256())
        parents = (self.cert, *self.parents) if self.cert is not self.root else self.parents
        return DevCA(self.trust_domain, cert, key, self.root, parents)

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle (the root certificate) in PEM."""
        return _pem(self.root)

    @property
    def cert_pem(self) -> bytes:
        """This CA's own certificate in PEM."""
        return _pem(self.cert)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DevCA:
        """Load a root CA written by ``save`` (``ca.crt`` + ``ca.key``).

        ``OSError`` when a file cannot be read; ``ValueError`` naming the file for anything
        wrong with what it holds. cryptography reports what it cannot read with several
        exception types besides ``ValueError`` (an extension present twice:
        ``DuplicateExtension``; an encrypted key: ``TypeError``; a key of an unknown
        algorithm: ``UnsupportedAlgorithm``): each is one ``ValueError`` here, and every
        field ``issue`` reads of the CA (its subject, its extensions) is read now, so a CA
        that loads issues (before the thirty-first session such a ``ca.crt`` or ``ca.key``
        ended ``cert issue --ca`` in a traceback; found by a hostile review)."""
        d = Path(directory)
        cert_path, key_path = d / CA_CERT_FILE, d / CA_KEY_FILE
        # Regular files of at most 1 MiB: a FIFO or /dev/zero named by --ca is refused.
        cert_data = read_whole(str(cert_path), CA_FILE_BYTES)
        key_data = read_whole(str(key_path), CA_FILE_BYTES)
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
        except Exception as exc:  # noqa: BLE001 -- any failure to read the file
            raise ValueError(f"{cert_path}: not a PEM certificate ({_why(exc)})") from exc
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except Exception as exc:  # noqa: BLE001 -- encrypted (TypeError), malformed...
            raise ValueError(f"{key_path}: not an unencrypted PEM private key ({_why(exc)})"
                             ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{key_path}: unsupported key type")
        try:
            uris = _uri_sans(cert)
            cert.subject.rfc4514_string()  # (``issue`` names it as the issuer)
            public = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        except Exception as exc:  # noqa: BLE001 -- a field cryptography cannot read
            raise ValueError(f"{cert_path}: unreadable certificate ({_why(exc)})") from exc
        if len(uris) != 1:
            raise ValueError(
                f"{cert_path}: expected one spiffe:// URI SAN naming the trust domain"
            )
        if public != key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            # (what it issued would not verify against the bundle it writes)
            raise ValueError(f"{key_path}: not the key of {cert_path}")
        td = parse_spiffe_id(uris[0]).trust_domain
        return cls(trust_domain=td, cert=cert, key=key, root=cert)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``ca.crt`` and ``ca.key`` (0600) into ``directory`` (created 0700 if new;
        an existing one must be the user's own and not group/world-writable:
        ``_open_key_directory``)."""
        _write_files(Path(directory), [(CA_CERT_FILE, self.cert_pem, 0o644),
                                       (CA_KEY_FILE, _key_pem(self.key), 0o600)])

    def issue(
        self,
        spiffe_id: str | None,
        ttl_seconds: float = 86400,
        *,
        key_type: KeyType = "ec256",
        not_before: float | None = None,
        extra_uris: tuple[str, ...] = (),
        dns_names: tuple[str, ...] = (),
        is_ca: bool = False,
        key_usage: x509.KeyUsage | None = LEAF_KEY_USAGE,
        now: float | None = None,
    ) -> IssuedCert:
        """Issue a leaf for ``spiffe_id`` valid from ``not_before`` for ``ttl_seconds``.

        Defaults give a valid X.509-SVID: one URI SAN, CA=false, keyUsage digitalSignature,
        EKU serverAuth+clientAuth (one SVID serves both directions). ``spiffe_id=None`` with
        ``dns_names`` makes a DNS-only certificate; ``key_usage=None`` omits the extension.
        ``spiffe_id`` is not validated here, so tests can issue malformed IDs on purpose.
        """
        key = generate_key(key_type)
        start = (
            not_before
            if not_before is not None
            else (now if now is not None else dt.datetime.now(dt.UTC).timestamp())
            - BACKDATE_SECONDS
        )
        uris = ([spiffe_id] if spiffe_id else []) + list(extra_uris)
        cn = (spiffe_id or (dns_names[0] if dns_names else "workload")).rsplit("/", 1)[-1]
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar dev workload"),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn[:64] or "workload"),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(start))
            .not_valid_after(_utc(start + ttl_seconds))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if key_usage is not None:
            builder = builder.add_extension(key_usage, critical=True)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(n) for n in dns_names]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        leaf = builder.sign(self.key, hashes.SHA256())
        intermediates = b"".join(
            _pem(c) for c in ((self.cert, *self.parents) if self.cert is not self.root else ())
        )
        cert_pem = _pem(leaf)
        return IssuedCert(
            cert_pem=cert_pem, key_pem=_key_pem(key), chain_pem=cert_pem + intermediates
        )


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    issuer_key: PrivateKey,
    trust_domain: str,
    start: float,
    ttl: float,
) -> x509.CertificateBuilder:
    # The SVID standard lets signing certificates carry the trust domain's SPIFFE ID; we use
    # it so ``DevCA.load`` knows the trust domain without a side file.
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(start))
        .not_valid_after(_utc(start + ttl))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )


def _uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of ``cert`` (none without a subjectAltName); the exceptions
    cryptography raises for extensions it cannot read (``DuplicateExtension``,
    ``UnsupportedGeneralNameType``, ``ValueError``) are left to the caller."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def write_svid(issued: IssuedCert, ca: DevCA, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``tls.crt`` (leaf + intermediates), ``tls.key`` (0600) and ``ca.crt`` (bundle).

    The names are those cert-manager's csi-driver-spiffe uses, so a directory made here can
    stand in for the CSI volume. Returns the directory.
    """
    d = Path(out_dir)
    _write_files(d, [(SVID_KEY_FILE, issued.key_pem, 0o600),
                     (SVID_CERT_FILE, issued.chain_pem, 0o644),
                     (SVID_BUNDLE_FILE, ca.bundle_pem, 0o644)])
    return d
