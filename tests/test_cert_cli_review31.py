"""``sidecar cert inspect`` and ``cert issue --ca`` on certificates cryptography cannot read
in full (the hostile review of the thirty-first session), each as a family, through the CLI.

* ``cert inspect``: every field it reads of a certificate -- subject and issuer (a
  UTF8String that is not UTF-8, a T61String cryptography cannot decode), the public key (an
  algorithm it does not know, explicit EC parameters, a key it cannot parse), the
  extensions (an extension present twice) -- of the first certificate of the file or of a
  later one, in ``-o table`` and ``-o json``: the value is ``(unreadable: ...)``, the rest is
  printed, the JSON document keeps its keys, and the exit status is the SVID check's (1 only
  when it fails); never a traceback.
* ``cert issue --ca DIR``: a ``ca.crt`` or ``ca.key`` that cryptography cannot read, or that
  do not belong together, is one ``error: --ca DIR: ...`` line, exit 1, nothing written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.ca import DevCA
from tests import derforge as d
from tests.harness import sidecar_cli, sidecar_cli_many

TD = "demo.local"
# The TBSCertificate's fields: [version, serial, signature, issuer, validity, subject, spki,
# extensions] (``derforge.resign`` hands them to a patch).
ISSUER, SUBJECT, SPKI = 3, 5, 6


def _replace(index: int, old: bytes, new: bytes) -> Callable[[d.Fields], d.Fields]:
    def patch(fields: d.Fields) -> d.Fields:
        out = list(fields)
        assert old in out[index], (old, out[index])
        out[index] = out[index].replace(old, new, 1)
        return out
    return patch


def _spki(algorithm: bytes, key: bytes) -> Callable[[d.Fields], d.Fields]:
    def patch(fields: d.Fields) -> d.Fields:
        out = list(fields)
        out[SPKI] = d.tlv(0x30, d.tlv(0x30, algorithm) + d.tlv(0x03, b"\x00" + key))
        return out
    return patch


def _explicit_p256(point: bytes) -> bytes:
    """id-ecPublicKey with ECParameters written out (not a named curve) that are not P-256's:
    cryptography loads the certificate and refuses the key."""
    field_id = d.tlv(0x30, bytes.fromhex("06072a8648ce3d0101") + d.tlv(0x02, b"\x00" + b"\xff" * 32))
    curve = d.tlv(0x30, d.tlv(0x04, b"\x01" * 32) + d.tlv(0x04, b"\x02" * 32))
    params = d.tlv(0x30, d.tlv(0x02, b"\x01") + field_id + curve + d.tlv(0x04, point)
                   + d.tlv(0x02, b"\x00" + b"\xff" * 32))
    return bytes.fromhex("06072a8648ce3d0201") + params


def _duplicate_san(fields: d.Fields) -> d.Fields:
    """The extensions with the subjectAltName twice (cryptography: ``DuplicateExtension``)."""
    ext = fields[-1]
    i = ext.find(bytes.fromhex("0603551d11"))
    j = ext.rfind(b"\x30", 0, i)
    _, _, end = d.tlv_span(ext, j)
    _, s3, e3 = d.tlv_span(ext, 0)
    seq = ext[s3:e3]
    _, s, e = d.tlv_span(seq, 0)
    return [*fields[:-1], d.tlv(0xA3, d.tlv(0x30, seq[s:e] + ext[j:end]))]


class Forged:
    def __init__(self) -> None:
        self.ca = DevCA.create(TD)
        self.leaf = self.ca.issue(f"spiffe://{TD}/ns/demo/sa/x").cert
        point = self.leaf.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        # member -> (patch, the field it breaks: (table label, json key), exit status when
        # it is the first certificate -- the SVID check's)
        self.members: dict[str, tuple[Callable[[d.Fields], d.Fields], str, str, int]] = {
            "subject-utf8": (_replace(SUBJECT, b"\x0c\x01x", b"\x0c\x01\xff"),
                             "subject", "subject", 1),
            "subject-t61": (_replace(SUBJECT, b"\x0c\x01x", b"\x14\x01\xff"),
                            "subject", "subject", 1),
            "issuer-utf8": (_replace(ISSUER, b"sidecar dev CA", b"sidecar dev \xffA"),
                            "issuer", "issuer", 0),
            "key-unknown-algorithm": (_spki(d.tlv(0x06, bytes.fromhex("2a0304")), point),
                                      "key type", "key_type", 1),
            "key-explicit-ec": (_spki(_explicit_p256(point), point), "key type", "key_type", 1),
            "key-x448-garbage": (_spki(bytes.fromhex("06032b656f"), point),
                                 "key type", "key_type", 1),
            "rsa-key-garbage": (_spki(bytes.fromhex("06092a864886f70d0101010500"), point),
                                "key type", "key_type", 1),
            "duplicate-san": (_duplicate_san, "SPIFFE ID", "spiffe_ids", 1),
        }

    def cert(self, member: str) -> x509.Certificate:
        return d.resign(self.leaf, self.ca.key, self.members[member][0])


@pytest.fixture(scope="module")
def forged() -> Forged:
    return Forged()


LATER_FIELDS = {"subject": "subject", "issuer": "issuer"}  # (what a later certificate shows)


def test_every_field_of_every_certificate_unreadable_is_shown_never_a_traceback(
        tmp_path, forged):
    good = tmp_path / "good.pem"
    good.write_bytes(d.pem(forged.leaf, forged.leaf))
    jobs, cases = [], []
    for member in forged.members:
        bad = forged.cert(member)
        for position, certs in (("first", (bad, forged.leaf)), ("later", (forged.leaf, bad))):
            path = tmp_path / f"{member}-{position}.pem"
            path.write_bytes(d.pem(*certs))
            for fmt in ("table", "json"):
                jobs.append(["cert", "inspect", str(path), "-o", fmt])
                cases.append((member, position, fmt))
    jobs.append(["cert", "inspect", str(good), "-o", "json"])
    results = sidecar_cli_many(jobs)
    reference = json.loads(results[-1].stdout)
    assert results[-1].returncode == 0 and reference["svid_check"] == "ok"
    problems = []
    for (member, position, fmt), r in zip(cases, results, strict=False):
        _, label, key, first_status = forged.members[member]
        said = f"{member} ({position} certificate, -o {fmt}): rc {r.returncode}"
        text = r.stdout + r.stderr
        if "Traceback" in text or r.stderr:
            problems.append(f"{said}: {text[-300:]}")
            continue
        if r.returncode != (first_status if position == "first" else 0):
            problems.append(f"{said}: exit status")
        if fmt == "json":
            doc = json.loads(r.stdout)
            if set(doc) != set(reference) or len(doc["chain"]) != 1 \
                    or set(doc["chain"][0]) != set(reference["chain"][0]):
                problems.append(f"{said}: the document's keys changed: {sorted(doc)}")
                continue
            if position == "first":
                value = doc[key]
                shown = value == [] if key == "spiffe_ids" else \
                    str(value).startswith("(unreadable: ")
                fails = doc["svid_check"] == ("fail" if first_status else "ok")
                if not (shown and fails):
                    problems.append(f"{said}: {key}={value!r}, {doc['svid_check']}")
            elif label in LATER_FIELDS and not \
                    doc["chain"][0][LATER_FIELDS[label]].startswith("(unreadable: "):
                problems.append(f"{said}: chain {doc['chain'][0]}")
        else:
            lines = r.stdout.splitlines()
            if position == "first":
                row = next((ln for ln in lines if ln.startswith(label + ":")), "")
                if "(unreadable: " not in row or not lines[-1].startswith("certificate 2: "):
                    problems.append(f"{said}: {r.stdout}")
            elif label in LATER_FIELDS and "(unreadable: " not in lines[-1]:
                problems.append(f"{said}: {lines[-1]}")
    assert not problems, "\n".join(problems)


def test_one_unreadable_certificate_through_the_real_command(tmp_path, forged):
    """The process boundary once (``python -m sidecar``): the subject and the key of the
    first certificate and the issuer of a later one unreadable at once."""
    first = d.resign(forged.leaf, forged.ca.key,
                     lambda f: forged.members["key-unknown-algorithm"][0](
                         forged.members["subject-utf8"][0](f)))
    path = tmp_path / "both.pem"
    path.write_bytes(d.pem(first, forged.cert("issuer-utf8")))
    r = sidecar_cli("cert", "inspect", str(path))
    assert "Traceback" not in r.stdout + r.stderr and r.stderr == "", r.stderr
    assert r.returncode == 1  # the SVID check fails (its subject cannot be read)
    rows = dict(line.split(":", 1) for line in r.stdout.splitlines()
                if not line.startswith("certificate "))
    assert rows["subject"].strip().startswith("(unreadable: ")
    assert rows["key type"].strip().startswith("(unreadable: ")
    assert rows["SVID check"].strip().startswith("FAIL ")
    assert "(issuer (unreadable: " in r.stdout.splitlines()[-1]


# --- cert issue --ca -------------------------------------------------------------------------


def _ca_dir(root: Path, name: str, cert: bytes, key: bytes) -> Path:
    dd = root / name
    dd.mkdir(mode=0o700)
    (dd / "ca.crt").write_bytes(cert)
    fd = os.open(dd / "ca.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, key)
    os.close(fd)
    return dd


def test_cert_issue_refuses_a_ca_it_cannot_read_with_one_error_line(tmp_path, forged):
    ca = forged.ca
    key = d.key_pem(ca.key)
    point = ca.cert.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
    members = {
        "duplicate-san": (d.pem(d.resign(ca.cert, ca.key, _duplicate_san)), key),
        "subject-not-utf8": (d.pem(d.resign(ca.cert, ca.key, _replace(
            SUBJECT, b"sidecar dev CA", b"sidecar dev \xffA"))), key),
        "key-unknown-algorithm": (d.pem(d.resign(ca.cert, ca.key, _spki(
            d.tlv(0x06, bytes.fromhex("2a0304")), point))), key),
        "encrypted-key": (ca.cert_pem, ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"))),
        "key-of-another-ca": (ca.cert_pem, d.key_pem(ec.generate_private_key(ec.SECP256R1()))),
        "not-a-certificate": (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                              key),
    }
    jobs, dirs = [], []
    for name, (cert_pem, key_pem) in members.items():
        dd = _ca_dir(tmp_path, name, cert_pem, key_pem)
        out = tmp_path / f"out-{name}"
        dirs.append((name, dd, out))
        jobs.append(["cert", "issue", "--ca", str(dd), "--spiffe-id",
                     f"spiffe://{TD}/ns/a/sa/b", "--out", str(out)])
    control = _ca_dir(tmp_path, "control", ca.cert_pem, key)
    jobs.append(["cert", "issue", "--ca", str(control), "--spiffe-id",
                 f"spiffe://{TD}/ns/a/sa/b", "--out", str(tmp_path / "out-control")])
    results = sidecar_cli_many(jobs)
    assert results[-1].returncode == 0, results[-1].stderr
    assert (tmp_path / "out-control" / "tls.crt").exists()
    problems = []
    for (name, dd, out), r in zip(dirs, results, strict=False):
        ok = (r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
              and r.stderr.startswith(f"error: --ca {dd}: ") and r.stderr.count("\n") == 1
              and not out.exists())
        if not ok:
            problems.append(f"{name}: rc {r.returncode}, wrote {out.exists()}: "
                            f"{(r.stdout + r.stderr)[-300:]}")
    assert not problems, "\n".join(problems)
    # once through the real command
    r = sidecar_cli(*jobs[0])
    assert r.returncode == 1 and r.stderr.startswith(f"error: --ca {dirs[0][1]}: "), r.stderr
    assert "Traceback" not in r.stderr
