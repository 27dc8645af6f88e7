"""Strings read from files someone else may write never act on the operator's terminal.

The family, as data (``FAMILY``): every C0 control, DEL, every C1 control, every Unicode
format character (Cf: bidi overrides and isolates, zero-width characters, tags...), and the
line and paragraph separators (Zl, Zp). One payload holds all of them between ``BEGIN`` and
``FORGED``; it is put into every string field a command shows from an untrusted file:

- a forged audit trail (checkpoint and seal ``id``) and an ``--anchor`` file's ``id``:
  ``audit verify`` (table, ``--json``, ``-o json``, ``-o yaml``);
- the records of a trail: ``policy replay`` (table, json, yaml) and ``audit export --format
  csv`` (where a cell starting a formula, ``CSV_FORMULAS``, is neutralised as well);
- a certificate's subject, issuer and SANs: ``cert inspect`` (table, json, yaml);
- a tenant manifest's ``metadata.name``: ``inject``'s refusal line.

Real CLI processes read real files; each output (stdout and stderr) must hold no raw member
of the family but the layout's own line breaks, and the payload must stay on one line
(``FORGED`` never starts a line of its own).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import unicodedata
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.audit.record import AuditRecord
from sidecar.audit.signing import write_keypair
from sidecar.config.audit import AuditConfig
from tests.harness import sidecar_cli, write_audit_trail, write_policy

FAMILY: tuple[str, ...] = (
    tuple(chr(c) for c in range(0x20)) + ("\x7f",) + tuple(chr(c) for c in range(0x80, 0xa0))
    + tuple(chr(c) for c in range(0x110000)
            if unicodedata.category(chr(c)) in ("Cf", "Zl", "Zp")))
PAYLOAD = "BEGIN" + "".join(FAMILY) + "FORGED"
# SAN values are ASCII (IA5String): its members of the family.
ASCII_PAYLOAD = "BEGIN" + "".join(c for c in FAMILY if c.isascii()) + "FORGED"
# OWASP "CSV Injection": a cell starting with one of these is taken for a formula.
CSV_FORMULAS = ("=", "+", "-", "@", "\t", "\r")
SERVICE = "spiffe://demo.local/ns/shop/sa/orders"
FORMATS = (("-o", "table"), ("-o", "json"), ("-o", "yaml"))


def assert_inert(text: str, where: str, shown: bool = True) -> None:
    """``text`` holds no raw family member but line breaks, ``FORGED`` only on the line
    ``BEGIN`` opened, and (``shown``) the payload."""
    raw = sorted({f"U+{ord(c):04X}" for c in text if c != "\n" and c in set(FAMILY)})
    assert not raw, f"{where}: raw {', '.join(raw[:12])} in {text[:300]!r}"
    assert not shown or "FORGED" in text, f"{where}: the payload is not shown: {text[:300]!r}"
    for line in text.splitlines():
        if "FORGED" in line:
            assert "BEGIN" in line, f"{where}: the payload broke the line: {line[:200]!r}"


def test_verify_forged_identity_and_anchor(tmp_path: Path) -> None:
    # The family holds what the docs name: C0, DEL, C1, bidi, zero-width, Zl, Zp.
    for c in ("\x00", "\x1b", "\n", "\r", "\x7f", "\x85", "\x9b", "\u202e", "\u2066",
              "\u200b", "\u200d", "\ufeff", "\u2028", "\u2029", "\U000e0001"):
        assert c in FAMILY
    write_keypair(str(tmp_path / "operator"))
    write_keypair(str(tmp_path / "forger"))
    trail = tmp_path / "audit"
    write_audit_trail(AuditConfig(path=str(trail), fsync=False, checkpoint_every_records=1,
                                  signing_key_file=str(tmp_path / "forger.key")),
                      (AuditRecord(time=1700000000.0 + i, request_id=f"r{i}",
                                   decision="allow", rule="r", status=200) for i in range(2)),
                      identity=PAYLOAD, batch=1, pause=0.01)
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps({"seq": 1, "prev": "00" * 32, "kind": "chk",
                                  "fields": {"id": PAYLOAD, "t": 1700000000},
                                  "sig": base64.b64encode(bytes(64)).decode()}))
    # The anchor's id is read (and reported) when the trail must be one workload's.
    runs = [("--pubkey", str(tmp_path / "operator.pub")),
            ("--anchor", str(anchor), "--identity", SERVICE)]
    for extra in runs:
        for fmt in (*FORMATS, ("--json",)):
            r = sidecar_cli("audit", "verify", *fmt, *extra, str(trail))
            where = f"audit verify {' '.join(fmt)} {extra[0]}"
            assert r.returncode in (1, 2), f"{where}: {r.returncode} {r.stdout}{r.stderr}"
            if r.returncode == 1:
                assert_inert(r.stdout, where)
            assert_inert(r.stderr, where + " (stderr)", shown=False)


@pytest.fixture
def record_trail(tmp_path: Path) -> Path:
    """A trail whose records carry the payload in every string field replay or export
    shows, and a formula in front of it in turn for each formula start."""
    trail = tmp_path / "records"
    records = [AuditRecord(time=1700000000.0 + i, request_id=start + PAYLOAD,
                           direction="inbound", peer=start + PAYLOAD, source="10.0.0.1:5",
                           token_issuer=start + PAYLOAD, token_subject=start + PAYLOAD,
                           apikey=start + PAYLOAD, method="GET" + PAYLOAD, host=PAYLOAD,
                           path="/admin" + PAYLOAD, decision="deny", rule=start + PAYLOAD,
                           reason=start + PAYLOAD, status=403,
                           extra={"service": SERVICE, "port": 8443})
               for i, start in enumerate(("",) + CSV_FORMULAS)]
    write_audit_trail(AuditConfig(path=str(trail), fsync=False), records, identity=SERVICE)
    return trail


def test_replay_table_json_yaml(tmp_path: Path, record_trail: Path) -> None:
    policy = write_policy(tmp_path / "all.yaml", {
        "version": 1, "trust_domain": "demo.local",
        "services": {SERVICE: {"rules": [{"name": "all", "allow": {"paths": ["/**"]}}]}}})
    for fmt in FORMATS:
        r = sidecar_cli("policy", "replay", *fmt, "--audit", str(record_trail), policy)
        where = f"policy replay {' '.join(fmt)}"
        assert r.returncode == 1, f"{where}: {r.returncode} {r.stdout}{r.stderr}"
        assert_inert(r.stdout, where)
        assert_inert(r.stderr, where + " (stderr)", shown=False)


def test_export_csv_cells(record_trail: Path) -> None:
    r = sidecar_cli("audit", "export", "--format", "csv", str(record_trail))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_inert(r.stdout.replace("\r\n", "\n"), "audit export --format csv")
    rows = list(csv.reader(io.StringIO(r.stdout, newline="")))
    assert len(rows) == 1 + 1 + len(CSV_FORMULAS)
    for row in rows[1:]:
        for cell in row:
            assert not cell.startswith(CSV_FORMULAS), f"formula cell {cell[:40]!r}"


def _certificate(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    # (a common name holds at most 64 characters: the payload goes into O and OU)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cn\x1b]0;x\x07\u202e"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, PAYLOAD),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "=cmd" + PAYLOAD)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier("spiffe://demo.local/ns/a/sa/" + ASCII_PAYLOAD),
                x509.DNSName(ASCII_PAYLOAD)]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(pem + pem)  # a chain: the second is listed on one line


def test_cert_inspect_every_format(tmp_path: Path) -> None:
    pem = tmp_path / "partner.crt"
    _certificate(pem)
    for fmt in FORMATS:
        r = sidecar_cli("cert", "inspect", *fmt, str(pem))
        where = f"cert inspect {' '.join(fmt)}"
        assert r.returncode in (0, 1), f"{where}: {r.returncode} {r.stderr}"
        assert_inert(r.stdout, where)
        if fmt[1] == "table":
            assert r.stdout.count("FORGED") >= 5  # subject, SPIFFE ID, DNS, issuer, chain


def test_inject_refusal_line(tmp_path: Path) -> None:
    manifest = tmp_path / "tenant.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": PAYLOAD,
                     "annotations": {"sidecar.mesh.dev/config-configmap": PAYLOAD}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}}, allow_unicode=False))
    r = sidecar_cli("inject", "-f", str(manifest))
    assert r.returncode == 1, r.stdout + r.stderr
    assert_inert(r.stderr, "inject refusal")
