"""Rough edges of `sidecar audit verify|export|tail`, run as a user runs them: a missing path
is "not found" (never BROKEN), an empty directory is an error, `export | head` is quiet,
`tail` prints RFC 3339 times and `--since` takes durations; `verify -o json|yaml`; progress
lines only on a terminal; the same on signed and encrypted trails (issue 13)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import trio
import yaml

from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import list_segments, read_frames
from sidecar.audit.writer import AuditWriter
from sidecar.config.audit import AuditConfig
from sidecar.output import Progress
from tests.harness import ROOT, sidecar_cli


def write(directory: Path, times: list[float], **keys: str) -> None:
    """Records at ``times``; ``keys``: signing_key_file / encryption_key_file."""
    config = AuditConfig(path=str(directory), fsync=False, **keys)

    async def run() -> None:
        w = AuditWriter(config, identity="spiffe://td/me")
        async with trio.open_nursery() as nursery:
            await nursery.start(w.run)
            for i, t in enumerate(times):
                w.submit(AuditRecord(time=t, request_id=f"r{i}", peer="spiffe://td/p",
                                     decision="allow", rule="r", path=f"/p/{i}"))
                if i % 256 == 0:
                    await trio.sleep(0)
            await w.aclose()

    trio.run(run)


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    d = tmp_path / "audit"
    now = time.time()
    write(d, [now - 7200] * 3 + [now - 60] * 2)
    return d


def test_missing_path_is_not_found_never_broken(tmp_path: Path):
    gone = str(tmp_path / "nope")
    for cmd in (["verify", gone], ["verify", gone, "-o", "json"], ["export", gone],
                ["tail", gone]):
        r = sidecar_cli("audit", *cmd)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "not found" in r.stderr and "BROKEN" not in r.stdout + r.stderr
        assert "Traceback" not in r.stderr


def test_export_of_a_directory_without_segments_fails_clearly(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    r = sidecar_cli("audit", "export", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no audit segments" in r.stderr and r.stdout == ""


def test_verify_json_and_yaml_match_the_table(trail: Path):
    table = sidecar_cli("audit", "verify", str(trail))
    as_json = sidecar_cli("audit", "verify", str(trail), "-o", "json")
    as_yaml = sidecar_cli("audit", "verify", str(trail), "-o", "yaml")
    assert table.returncode == as_json.returncode == as_yaml.returncode == 0
    doc = json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout) == doc
    assert doc["kind"] == "AuditVerify" and doc["ok"] is True and doc["records"] == 5
    assert table.stdout.startswith(f"OK: {doc['records']} records, {doc['frames']} frames")
    assert f"head: seq {doc['head_seq']} digest {doc['head_digest']}" in table.stdout
    old = json.loads(sidecar_cli("audit", "verify", str(trail), "--json").stdout)
    assert {k: v for k, v in doc.items() if k != "kind"} == old


@pytest.fixture
def sealed(tmp_path: Path) -> dict[str, Path]:
    """A signed and encrypted trail (issue 13) with its public key and data key."""
    from sidecar.audit.crypto import write_data_key
    from sidecar.audit.signing import write_keypair

    priv, pub, _ = write_keypair(str(tmp_path / "signing"))
    write_data_key(str(tmp_path / "audit.data"))
    d = tmp_path / "sealed"
    now = time.time()
    # Two hours apart (for --since): a checkpoint after every record, so that no signed
    # stretch spans more than the writer's time bound (verify --data-key dates encrypted
    # records since the twenty-fifth session).
    write(d, [now - 7200] * 3 + [now - 60] * 2, signing_key_file=priv,
          encryption_key_file=str(tmp_path / "audit.data"),
          checkpoint_every_records=1)  # type: ignore[arg-type]
    return {"dir": d, "pub": Path(pub), "data": tmp_path / "audit.data", "tmp": tmp_path}


def test_verify_output_of_a_signed_trail_json_yaml_and_table_agree(sealed):
    """-o json|yaml carries issue 13's assurance, checkpoints and findings; the table says
    the same; a key that did not sign the trail is BROKEN (exit 1) in every format."""
    from sidecar.audit.signing import write_keypair

    args = [str(sealed["dir"]), "--pubkey", str(sealed["pub"]),
            "--data-key", str(sealed["data"])]
    table = sidecar_cli("audit", "verify", *args)
    as_json = sidecar_cli("audit", "verify", *args, "-o", "json")
    as_yaml = sidecar_cli("audit", "verify", *args, "-o", "yaml")
    assert table.returncode == as_json.returncode == as_yaml.returncode == 0, table.stdout
    doc = json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout) == doc
    assert doc["kind"] == "AuditVerify" and doc["assurance"] == "signature" and doc["ok"]
    assert doc["records"] == 5 and doc["checkpoints"] >= 1 and doc["sealed"] is True
    assert doc["findings"] == [] and doc["unsigned_tail_records"] == 0
    assert (f"signed: {doc['checkpoints']} checkpoints verified, covering seq "
            f"{doc['signed_through']}; unsigned tail: 0 records") in table.stdout
    _, other, _ = write_keypair(str(sealed["tmp"] / "other"))
    bad = [str(sealed["dir"]), "--pubkey", other]
    table = sidecar_cli("audit", "verify", *bad)
    doc = json.loads(sidecar_cli("audit", "verify", *bad, "-o", "json").stdout)
    assert table.returncode == 1 and table.stdout.startswith("BROKEN") and not doc["ok"]
    assert doc["broken"] and f"first broken: {doc['broken']}" in table.stdout
    assert all(f"{f['severity']}: {f['code']}" in table.stdout for f in doc["findings"])
    old = json.loads(sidecar_cli("audit", "verify", *bad, "--json").stdout)
    assert {k: v for k, v in doc.items() if k != "kind"} == old


def test_encrypted_trail_tail_and_export_with_data_key(sealed):
    """--data-key with RFC 3339 tail times and --since durations; without the key, an
    error (tail exit 1, export names the segment, exit 1), never plaintext."""
    d, key = str(sealed["dir"]), str(sealed["data"])
    rows = [json.loads(x) for x in
            sidecar_cli("audit", "tail", d, "--data-key", key).stdout.splitlines()]
    assert [r["request_id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    assert all(r["time"].endswith("Z") for r in rows)
    recent = sidecar_cli("audit", "export", d, "--data-key", key, "--since", "1h")
    assert [json.loads(x)["request_id"] for x in recent.stdout.splitlines()] == ["r3", "r4"]
    r = sidecar_cli("audit", "tail", d)
    assert r.returncode == 1 and "error:" in r.stderr and "r0" not in r.stdout
    r = sidecar_cli("audit", "export", d)
    assert r.returncode == 1 and "undecryptable" in r.stderr and r.stdout == ""


def test_tail_into_head_is_quiet(tmp_path: Path):
    d = tmp_path / "big"
    write(d, [time.time()] * 3000)
    r = subprocess.run(f"{sys.executable} -m sidecar audit tail {d} -n 3000 | head -n 2",
                       shell=True, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert len(r.stdout.splitlines()) == 2
    assert r.stderr == "", r.stderr


def test_export_into_head_is_quiet(tmp_path: Path):
    d = tmp_path / "big"
    write(d, [time.time()] * 3000)  # ~0.5 MB of JSON lines: more than a pipe holds
    r = subprocess.run(f"{sys.executable} -m sidecar audit export {d} | head -n 2",
                       shell=True, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert len(r.stdout.splitlines()) == 2
    assert r.stderr == "", r.stderr


def test_tail_prints_rfc3339_and_since_takes_durations(trail: Path):
    r = sidecar_cli("audit", "tail", str(trail), "-n", "10")
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert row["time"].endswith("Z")
        datetime.fromisoformat(row["time"])  # RFC 3339, which --since accepts back
    recent = sidecar_cli("audit", "tail", str(trail), "--since", "1h")
    assert [json.loads(x)["request_id"] for x in recent.stdout.splitlines()] == ["r3", "r4"]
    both = sidecar_cli("audit", "tail", str(trail), "--since", "2h30m")
    assert len(both.stdout.splitlines()) == 5
    back = sidecar_cli("audit", "export", str(trail), "--since", rows[3]["time"])
    assert [json.loads(x)["request_id"] for x in back.stdout.splitlines()] == ["r3", "r4"]
    bad = sidecar_cli("audit", "tail", str(trail), "--since", "1y")
    assert bad.returncode == 2 and "--since" in bad.stderr and "1y" in bad.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal():
    quiet = io.StringIO()
    p = Progress("exporting", stream=quiet)
    p.update(1, "records")
    p.close()
    assert quiet.getvalue() == ""
    tty = _Tty()
    p = Progress("exporting", stream=tty)
    p.update(5, "records")
    assert tty.getvalue() == "\r\x1b[Kexporting: 5 records"
    p.close()
    assert tty.getvalue().endswith("\r\x1b[K")  # erased: the command's output starts clean


def test_export_and_replay_write_nothing_to_a_non_terminal_stderr(trail: Path):
    r = sidecar_cli("audit", "export", str(trail))
    assert r.returncode == 0 and r.stderr == "" and len(r.stdout.splitlines()) == 5
    shop = str(ROOT / "policies" / "example-shop.yaml")
    r = sidecar_cli("policy", "replay", shop, "--audit", str(trail))
    assert r.stderr == ""


@pytest.mark.parametrize("command", [["audit", "verify"], ["audit", "export"],
                                     ["policy", "replay", "policies/example-shop.yaml",
                                      "--audit"]])
def test_progress_line_on_a_terminal_stderr(trail: Path, command: list[str]):
    import os
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", *command, str(trail)],
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=slave)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(slave)
        if proc.poll() is None:  # timed out: stopped by its pid, not left running
            proc.kill()
            proc.wait()
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    label = {"verify": b"verifying: ", "export": b"exporting: "}.get(command[1], b"replaying: ")
    assert err.startswith(b"\r\x1b[K" + label), err
    assert err.endswith(b"\r\x1b[K")  # erased before the command ends
    assert b"\x1b" not in out  # stdout (a pipe here) stays clean


def test_keyring_counts_each_distinct_key_once(sealed):
    """``--pubkey`` takes at most 256 distinct keys; the same key given again -- in one file
    (a keyring concatenated twice) or as another flag -- counts once, so a keyring that
    lists the current key in every rotation's file still loads (it used to count every
    copy, so 257 copies of one key were refused). Above 256 distinct keys: exit 2, never a
    traceback, and the trail is not judged."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = sealed["pub"].read_bytes()
    copies = sealed["tmp"] / "copies.pub"
    copies.write_bytes(pem * 300)
    r = sidecar_cli("audit", "verify", str(sealed["dir"]), "--pubkey", str(copies),
                    "--pubkey", str(sealed["pub"]))
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr

    def public(n: int) -> bytes:
        return Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    others = b"".join(public(n) for n in range(255))
    fits = sealed["tmp"] / "fits.pub"
    fits.write_bytes(pem + others + pem)  # 256 distinct keys, one of them twice
    r = sidecar_cli("audit", "verify", str(sealed["dir"]), "--pubkey", str(fits))
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    over = sealed["tmp"] / "over.pub"
    over.write_bytes(pem + others + public(256))  # 257 distinct keys
    r = sidecar_cli("audit", "verify", str(sealed["dir"]), "--pubkey", str(over))
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and "256 distinct public keys" in r.stderr
    assert "Traceback" not in r.stderr


def test_verify_names_an_unsigned_segment_header_in_the_tail(tmp_path: Path):
    """A rotation after the last checkpoint leaves the newest segment's header unsigned:
    verify's table and JSON say so, not only the (here zero) unsigned records."""
    from sidecar.audit.signing import write_keypair

    priv, pub, _ = write_keypair(str(tmp_path / "signing"))
    d = tmp_path / "audit"
    config = AuditConfig(path=str(d), fsync=False, max_segment_bytes=2000,
                         signing_key_file=priv)

    async def run() -> None:
        w = AuditWriter(config, identity="spiffe://td/me")
        async with trio.open_nursery() as nursery:
            await nursery.start(w.run)
            for i in range(60):
                w.submit(AuditRecord(time=time.time(), request_id=f"r{i}", decision="allow",
                                     rule="r", path=f"/p/{i}"))
                await trio.sleep(0.001)
            await w.aclose()

    trio.run(run)
    segments = list_segments(str(d))
    assert len(segments) >= 2
    with open(segments[-1].path, "rb") as fh:
        offsets = [o for o, _p in read_frames(fh)]
    os.truncate(segments[-1].path, offsets[1])  # the newest segment: its header only
    args = [str(d), "--pubkey", pub]
    doc = json.loads(sidecar_cli("audit", "verify", *args, "-o", "json").stdout)
    assert doc["unsigned_tail_records"] == 0 and doc["unsigned_tail_frames"] == 1, doc
    table = sidecar_cli("audit", "verify", *args)
    assert "unsigned tail: 0 records and 1 other frame (segment headers)" in table.stdout
