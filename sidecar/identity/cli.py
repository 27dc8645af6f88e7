"""``sidecar ca init``, ``sidecar cert issue`` and ``sidecar cert inspect``.

Argument parsing and printing only; the work is in ``ca.py`` and ``svid.py``. Every command
function takes the parsed ``argparse.Namespace`` and returns an exit code: 0 success, 1 the
operation failed (one ``error: ...`` line on stderr), 2 bad usage (argparse's own code).
Runnable on its own as ``python -m sidecar.identity.cli``; the main CLI mounts the same
parsers with ``add_ca_parsers`` / ``add_cert_parsers``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.config.source import read_whole
from sidecar.identity.ca import DevCA, write_svid
from sidecar.identity.spiffe import parse_spiffe_id
from sidecar.identity.svid import MAX_FILE_BYTES, SvidError, validate_svid_leaf
from sidecar.output import add_output_flag, emit, safe

_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_SECONDS = 10 * 365 * 86400


def parse_ttl(text: str) -> int:
    """``90s``, ``15m``, ``24h``, ``30d`` or a combination like ``1h30m`` -> seconds."""
    text = text.strip()
    if not text or _DURATION.sub("", text):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 90s, 15m, 24h, 30d)")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text))
    if not 0 < seconds <= MAX_TTL_SECONDS:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be between 1s and 3650d")
    return seconds


def _fail(message: str, err: TextIO | None = None) -> int:
    # (``safe``: a message may quote what a file holds, a CA's SAN or a parse error's text)
    print(f"error: {safe(message)}", file=err or sys.stderr)
    return 1


def cmd_ca_init(args: argparse.Namespace) -> int:
    """Create a dev CA in ``args.out``; refuse to overwrite an existing one."""
    out = Path(args.out)
    if (out / "ca.key").exists() and not args.force:
        return _fail(f"{out / 'ca.key'} already exists (use --force to replace the CA)")
    try:
        ca = DevCA.create(args.trust_domain)
    except ValueError as exc:
        return _fail(f"--trust-domain: {exc}")
    try:
        ca.save(out)
    except OSError as exc:
        return _fail(f"{out}: {exc.strerror or exc}")
    print(f"dev CA for trust domain {ca.trust_domain} written to {out}/ca.crt and {out}/ca.key")
    return 0


def cmd_cert_issue(args: argparse.Namespace) -> int:
    """Issue an SVID from the CA in ``args.ca`` into ``args.out``."""
    try:
        spiffe_id = parse_spiffe_id(args.spiffe_id)
    except ValueError as exc:
        return _fail(f"--spiffe-id: {exc}")
    try:
        ca = DevCA.load(args.ca)
    except OSError as exc:
        return _fail(f"--ca {args.ca}: cannot load the CA: {exc.filename}: {exc.strerror or exc}")
    except ValueError as exc:
        return _fail(f"--ca {args.ca}: cannot load the CA: {exc}")
    if spiffe_id.trust_domain != ca.trust_domain:
        return _fail(
            f"--spiffe-id {spiffe_id}: trust domain differs from the CA's ({ca.trust_domain})"
        )
    try:
        issued = ca.issue(str(spiffe_id), args.ttl, key_type=args.key_type)
        validate_svid_leaf(issued.cert)
        out = write_svid(issued, ca, args.out)
    except OSError as exc:
        return _fail(f"{args.out}: {exc.strerror or exc}")
    except (SvidError, ValueError) as exc:
        return _fail(f"{args.out}: {exc}")
    print(f"{spiffe_id}: wrote {out}/tls.crt, {out}/tls.key and {out}/ca.crt")
    return 0


def _key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except Exception:  # noqa: BLE001 -- absent, or extensions cryptography cannot read
        return False


def _ca_flag(cert: x509.Certificate) -> str:
    """``yes`` / ``no`` (no basicConstraints: ``no``); raises when the extensions cannot be
    read (``_field`` shows that)."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return "no"
    return "yes" if bc.value.ca else "no"


UNREADABLE = "(unreadable: "


def _unreadable(exc: Exception) -> str:
    return f"{UNREADABLE}{type(exc).__name__}: {str(exc)[:200]})"


def _field(read: Callable[[], str]) -> str:
    """One value ``cert inspect`` prints, read from the certificate by ``read``, or
    ``(unreadable: TYPE: message)`` when reading it raised anything at all.

    cryptography parses most of a certificate only when a field is first read, and reports
    what it cannot decode with several exception types (``ValueError`` for a subject or
    issuer UTF8String that is not UTF-8, ``UnsupportedAlgorithm`` for a public key of an
    unknown algorithm or with explicit EC parameters, ``DuplicateExtension``...). OpenSSL
    accepts such certificates, so a peer can present one and a reviewer inspects it: every
    field goes through here, so one unreadable field is shown as such and the rest of the
    certificate (and of the file) is still printed (before the thirty-first session a
    subject, an issuer or a key of that kind, in the first certificate of the file or a
    later one, ended the command in a traceback; found by a hostile review)."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 -- any failure to read a certificate from a file
        return _unreadable(exc)


def _validity(cert: x509.Certificate, now: float) -> str:
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    if now < not_before:
        return "NOT YET VALID"
    if now > not_after:
        return "EXPIRED"
    return f"valid ({dt.timedelta(seconds=int(not_after - now))} left)"


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(URI SANs, DNS SANs); none without a subjectAltName; raises when it cannot be read."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (list(san.get_values_for_type(x509.UniformResourceIdentifier)),
            list(san.get_values_for_type(x509.DNSName)))


def _svid_check(cert: x509.Certificate, uris: list[str]) -> str:
    # A signing certificate names only the trust domain; a CA flag on anything that names
    # a workload is a broken SVID, and the rule check below says so.
    if _is_ca(cert) and all(u.rstrip("/").count("/") <= 2 for u in uris):
        return "not applicable (CA certificate)"
    try:
        validate_svid_leaf(cert)
    except SvidError as exc:
        return f"FAIL {exc.rule}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 -- a check that could not be made fails
        return f"FAIL {_unreadable(exc)}"
    return "ok"


def describe_certificate(cert: x509.Certificate, now: float) -> list[tuple[str, str]]:
    """The fields ``cert inspect`` prints, as (label, value) rows; a value cryptography
    cannot read is ``(unreadable: ...)`` (``_field``), an SVID check it stops is a failure
    (``FAIL (unreadable: ...)``)."""
    try:
        uris, dns = _sans(cert)
        sans = ", ".join(uris) if uris else "(none)"
    except Exception as exc:  # noqa: BLE001 -- unreadable: the SVID row says which rule too
        uris, dns, sans = [], [], _unreadable(exc)
    rows = [
        ("subject", _field(lambda: cert.subject.rfc4514_string() or "(empty)")),
        ("SPIFFE ID", sans),
    ]
    if dns:
        rows.append(("DNS names", ", ".join(dns)))
    rows += [
        ("issuer", _field(lambda: cert.issuer.rfc4514_string() or "(empty)")),
        ("serial", _field(lambda: format(cert.serial_number, "x"))),
        ("not before", _field(lambda: cert.not_valid_before_utc.isoformat())),
        ("not after", _field(lambda: cert.not_valid_after_utc.isoformat())),
        ("validity", _field(lambda: _validity(cert, now))),
        ("key type", _field(lambda: _key_description(cert))),
        ("CA", _field(lambda: _ca_flag(cert))),
        ("SHA-256", _field(lambda: hashlib.sha256(
            cert.public_bytes(serialization.Encoding.DER)).hexdigest())),
        ("SVID check", _svid_check(cert, uris)),
    ]
    return rows


def describe_other(cert: x509.Certificate) -> dict[str, str]:
    """What ``cert inspect`` prints of a certificate after the first (each value through
    ``_field``)."""
    return {"subject": _field(lambda: cert.subject.rfc4514_string()),
            "issuer": _field(lambda: cert.issuer.rfc4514_string()),
            "not_after": _field(lambda: cert.not_valid_after_utc.isoformat())}


def certificate_document(path: str, cert: x509.Certificate, rows: list[tuple[str, str]],
                         others: list[dict[str, str]]) -> dict[str, Any]:
    """What ``cert inspect -o json`` prints (stable; docs/operations.md). The keys and their
    types do not change with an unreadable value: a string field holds its
    ``(unreadable: ...)`` text, ``spiffe_ids`` / ``dns_names`` are empty, ``ca`` is false,
    ``validity`` is ``unreadable``."""
    fields = dict(rows)
    uris = fields["SPIFFE ID"]
    svid = fields["SVID check"]
    validity = fields["validity"]
    return {
        "kind": "Certificate",
        "file": path,
        "subject": fields["subject"],
        "spiffe_ids": [] if uris == "(none)" or uris.startswith(UNREADABLE)
        else uris.split(", "),
        "dns_names": fields["DNS names"].split(", ") if "DNS names" in fields else [],
        "issuer": fields["issuer"],
        "serial": fields["serial"],
        "not_before": fields["not before"],
        "not_after": fields["not after"],
        "validity": ("not_yet_valid" if validity.startswith("NOT YET")
                     else "expired" if validity == "EXPIRED"
                     else "unreadable" if validity.startswith(UNREADABLE) else "valid"),
        "key_type": fields["key type"],
        "ca": fields["CA"] == "yes",
        "sha256": fields["SHA-256"],
        "svid_check": "fail" if svid.startswith("FAIL") else (
            "ok" if svid == "ok" else "not_applicable"),
        "svid_error": svid[5:] if svid.startswith("FAIL") else None,
        "chain": others,
    }


def cmd_cert_inspect(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the first certificate of a PEM file in detail, then one line per other one.

    Exit 1 when the file cannot be read or the leaf is a non-CA certificate that breaks an
    SVID rule, so scripts can use ``sidecar cert inspect`` as a check.
    """
    stream = out or sys.stdout
    try:
        data = read_whole(args.file, MAX_FILE_BYTES)  # a FIFO or /dev/zero: refused at once
        certs = x509.load_pem_x509_certificates(data)
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 -- ValueError, or anything else the parse raises
        return _fail(f"{args.file}: no PEM certificate found ({str(exc)[:200]})")
    now = dt.datetime.now(dt.UTC).timestamp()
    rows = describe_certificate(certs[0], now)
    others = [describe_other(c) for c in certs[1:]]

    def table() -> str:
        # Every value comes from the file (or from an error reading it): ``safe``.
        width = max(len(label) for label, _ in rows)
        lines = [f"{label + ':':<{width + 1}} {safe(value)}" for label, value in rows]
        lines += [f"certificate {i}: {safe(c['subject'])} (issuer {safe(c['issuer'])}, not "
                  f"after {safe(c['not_after'])})" for i, c in enumerate(others, start=2)]
        return "\n".join(lines)

    emit(args, certificate_document(args.file, certs[0], rows, others), table, stream)
    failed = dict(rows)["SVID check"].startswith("FAIL")
    return 1 if failed else 0


def add_ca_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``ca init`` to an argparse subparsers object; sets ``func`` on each leaf parser."""
    ca = subparsers.add_parser("ca", help="development certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    init = ca_sub.add_parser("init", help="create a dev CA (ca.crt, ca.key)")
    init.add_argument("--trust-domain", required=True, help="e.g. cluster.local")
    init.add_argument("--out", required=True, help="directory for ca.crt and ca.key")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=cmd_ca_init)
    return ca  # type: ignore[no-any-return]


def add_cert_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``cert issue`` and ``cert inspect``; sets ``func`` on each leaf parser."""
    cert = subparsers.add_parser("cert", help="workload certificates (X.509-SVIDs)")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True, metavar="COMMAND")
    issue = cert_sub.add_parser("issue", help="issue tls.crt, tls.key, ca.crt from a dev CA")
    issue.add_argument("--ca", required=True, help="directory made by 'sidecar ca init'")
    issue.add_argument("--spiffe-id", required=True, help="spiffe://TD/ns/NS/sa/SA")
    issue.add_argument("--out", required=True, help="directory for tls.crt, tls.key, ca.crt")
    issue.add_argument("--ttl", type=parse_ttl, default=86400, help="lifetime, e.g. 24h (default)")
    issue.add_argument(
        "--key-type", choices=("ec256", "rsa2048"), default="ec256", help="default ec256"
    )
    issue.set_defaults(func=cmd_cert_issue)
    inspect = cert_sub.add_parser("inspect", help="show a certificate and check the SVID rules")
    inspect.add_argument("file", metavar="FILE", help="PEM file (a chain: the first is detailed)")
    add_output_flag(inspect)
    inspect.set_defaults(func=cmd_cert_inspect)
    return cert  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m sidecar.identity.cli``."""
    parser = argparse.ArgumentParser(prog="sidecar", description="identity commands")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_ca_parsers(sub)
    add_cert_parsers(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
