"""`ca init`, `cert issue`, `cert inspect`, run as real subprocesses (sidecar/identity/cli.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.identity.ca import DevCA, write_svid
from sidecar.identity.cli import parse_ttl
from sidecar.identity.svid import load_svid

REPO = Path(__file__).resolve().parents[1]
ID = "spiffe://example.org/ns/shop/sa/orders"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sidecar.identity.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_ca_init_issue_and_inspect(tmp_path: Path) -> None:
    init = run("ca", "init", "--trust-domain", "example.org", "--out", "ca", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    issue = run(
        "cert", "issue", "--ca", "ca", "--spiffe-id", ID, "--out", "svid", "--ttl", "2h",
        cwd=tmp_path,
    )  # fmt: skip
    assert issue.returncode == 0, issue.stderr
    svid_dir = tmp_path / "svid"
    svid = load_svid(
        str(svid_dir / "tls.crt"), str(svid_dir / "tls.key"), str(svid_dir / "ca.crt"), time.time()
    )
    assert str(svid.spiffe_id) == ID
    assert svid.not_after - svid.not_before == 2 * 3600

    inspect = run("cert", "inspect", str(svid_dir / "tls.crt"), cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    fields = dict(line.split(":", 1) for line in inspect.stdout.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["SPIFFE ID"] == ID
    assert fields["key type"] == "ECDSA secp256r1"
    assert fields["SVID check"] == "ok"
    assert fields["validity"].startswith("valid")
    assert fields["issuer"] == "CN=example.org root,O=sidecar dev CA"
    for label in ("subject", "serial", "not before", "not after", "SHA-256"):
        assert fields[label]


def test_issue_rsa_and_refuse_foreign_trust_domain(tmp_path: Path) -> None:
    assert (
        run("ca", "init", "--trust-domain", "example.org", "--out", "ca", cwd=tmp_path).returncode
        == 0
    )
    rsa = run(
        "cert", "issue", "--ca", "ca", "--spiffe-id", ID, "--out", "w", "--key-type", "rsa2048",
        cwd=tmp_path,
    )  # fmt: skip
    assert rsa.returncode == 0, rsa.stderr
    assert "RSA 2048" in run("cert", "inspect", "w/tls.crt", cwd=tmp_path).stdout
    foreign = run(
        "cert", "issue", "--ca", "ca", "--spiffe-id", "spiffe://other.org/a", "--out", "x",
        cwd=tmp_path,
    )  # fmt: skip
    assert foreign.returncode == 1
    assert foreign.stderr.strip().count("\n") == 0 and foreign.stderr.startswith("error:")
    assert "trust domain" in foreign.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (("cert", "issue", "--ca", "ca", "--spiffe-id", "spiffe://example.org//a", "--out", "o"), 1, "empty segment"),
        (("cert", "issue", "--ca", "missing", "--spiffe-id", ID, "--out", "o"), 1, "cannot load the CA"),
        (("cert", "issue", "--ca", "ca", "--spiffe-id", ID, "--out", "o", "--ttl", "1y"), 2, "invalid duration"),
        (("ca", "init", "--trust-domain", "example.org", "--out", "ca"), 1, "already exists"),
        (("ca", "init", "--trust-domain", "Bad_Upper", "--out", "ca2"), 1, "trust domain"),
        (("cert", "inspect", "nope.pem"), 1, "No such file"),
        (("cert", "inspect", "ca/ca.key"), 1, "no PEM certificate"),
    ],
)  # fmt: skip
def test_errors_are_one_clear_line(
    tmp_path: Path, args: tuple[str, ...], code: int, text: str
) -> None:
    DevCA.create("example.org").save(tmp_path / "ca")
    result = run(*args, cwd=tmp_path)
    assert result.returncode == code
    assert text in result.stderr
    if code == 1:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_inspect_reports_expired_and_broken_svids(tmp_path: Path) -> None:
    ca = DevCA.create("example.org")
    write_svid(ca.issue(ID, not_before=time.time() - 7200, ttl_seconds=3600), ca, tmp_path / "old")
    expired = run("cert", "inspect", "old/tls.crt", cwd=tmp_path)
    assert "validity:   EXPIRED" in expired.stdout
    write_svid(ca.issue(ID, is_ca=True), ca, tmp_path / "flagged")
    flagged = run("cert", "inspect", "flagged/tls.crt", cwd=tmp_path)
    assert flagged.returncode == 1
    assert "SVID check: FAIL leaf-is-ca" in flagged.stdout
    root = run("cert", "inspect", "flagged/ca.crt", cwd=tmp_path)
    assert root.returncode == 0
    assert "SVID check: not applicable (CA certificate)" in root.stdout
    write_svid(ca.issue(ID, extra_uris=("spiffe://example.org/x",)), ca, tmp_path / "two")
    two = run("cert", "inspect", "two/tls.crt", cwd=tmp_path)
    assert two.returncode == 1
    assert "SVID check: FAIL uri-san-count" in two.stdout
    inter = ca.new_intermediate()
    write_svid(inter.issue(ID), inter, tmp_path / "chain")
    chain = run("cert", "inspect", "chain/tls.crt", cwd=tmp_path)
    assert chain.returncode == 0
    assert "certificate 2: CN=example.org intermediate 1" in chain.stdout


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("24h", 86400), ("30d", 2592000), ("1h30m", 5400)],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "1y", "h", "0s", "4000d", "-1h", "1.5h"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ttl(text)
