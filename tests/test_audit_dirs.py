"""What holds a trail is not opened to others by the umask, and ``policy replay`` does not
pass a CI gate over a directory holding no trail.

- The writer creates its directory 0750 and ``audit collect -o DIR`` creates DIR 0750 and
  its segments 0640, under every umask of ``UMASKS`` (000 made them world-writable); an
  existing world-writable directory is used as it is, with a warning (the writer's
  ``audit_directory_world_writable`` log event, collect's ``warning:`` line).
- ``policy replay --audit DIR`` on a directory with no segment (``NOT_TRAILS``: empty, or
  holding other files -- a typo naming another directory) exits 2 like ``export`` and
  ``tail``, instead of "0 would change" (exit 0).

Real processes (the real writer in a child process with its own umask, the real CLI).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.audit.chain import ChainHead
from sidecar.audit.record import AuditRecord
from sidecar.audit.ship import frame_message, message_prefix
from tests.harness import ROOT, sidecar_cli, write_policy

UMASKS = (0o000, 0o002, 0o022, 0o077)
NOT_TRAILS = ("empty", "other files")

_WRITER = """
import os, sys
os.umask(int(sys.argv[2]))
from sidecar.audit.record import AuditRecord
from sidecar.config.audit import AuditConfig
from tests.harness import write_audit_trail
write_audit_trail(AuditConfig(path=sys.argv[1], fsync=False),
                  [AuditRecord(time=1700000000.0, request_id="r1")])
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_trail(path: Path, umask: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WRITER, str(path), str(umask)],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))


def test_writer_directory_is_0750_whatever_the_umask(tmp_path: Path) -> None:
    for umask in UMASKS:
        path = tmp_path / f"umask-{umask:03o}" / "audit"
        r = _write_trail(path, umask)
        assert r.returncode == 0, r.stderr[-2000:]
        assert _mode(path) == 0o750, f"umask {umask:03o}: {_mode(path):04o}"
        assert "audit_directory_world_writable" not in r.stderr


def test_writer_warns_about_an_existing_world_writable_directory(tmp_path: Path) -> None:
    path = tmp_path / "audit"
    path.mkdir()
    path.chmod(0o777)
    r = _write_trail(path, 0o022)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    warned = [e for e in events if e.get("event") == "audit_directory_world_writable"]
    assert warned and warned[0]["path"] == str(path) and warned[0]["level"] == "warning"
    assert _mode(path) == 0o777  # not ours to change


def _collector_lines(path: Path) -> None:
    head = ChainHead()
    head.journal = []
    head.header(1700000000.0)
    head.records([AuditRecord(time=1700000000.0, request_id=f"r{i}").to_wire()
                  for i in range(3)])
    prefix = message_prefix(1700000000.0, "pod-1", "sidecar")
    path.write_bytes(b"".join(frame_message(prefix, seq, kind, digest, frame, detail) + b"\n"
                              for seq, kind, frame, digest, detail in head.journal))


@pytest.mark.parametrize("umask", UMASKS)
def test_collect_writes_0750_directory_and_0640_segments(tmp_path: Path, umask: int) -> None:
    src = tmp_path / "collector.log"
    _collector_lines(src)
    out = tmp_path / "rebuilt"
    r = subprocess.run([sys.executable, "-m", "sidecar", "audit", "collect", str(src),
                        "-o", str(out)], capture_output=True, text=True, timeout=60,
                       cwd=str(ROOT), preexec_fn=lambda: os.umask(umask) and None)
    assert r.returncode == 0, r.stderr
    segments = sorted(out.iterdir())
    assert segments
    assert _mode(out) == 0o750
    assert {_mode(s) for s in segments} == {0o640}
    assert "world-writable" not in r.stderr


def test_collect_warns_about_a_world_writable_output(tmp_path: Path) -> None:
    src = tmp_path / "collector.log"
    _collector_lines(src)
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o777)
    r = sidecar_cli("audit", "collect", str(src), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"warning: {out} is world-writable" in r.stderr


@pytest.mark.parametrize("case", NOT_TRAILS)
def test_replay_refuses_a_directory_without_segments(tmp_path: Path, case: str) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    if case == "other files":
        (audit / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        (audit / "sub").mkdir()
    policy = write_policy(tmp_path / "p.yaml", {
        "version": 1, "trust_domain": "demo.local",
        "services": {"spiffe://demo.local/ns/a/sa/b": {"rules": [
            {"name": "all", "allow": {"paths": ["/**"]}}]}}})
    for fmt in ("table", "json"):
        r = sidecar_cli("policy", "replay", policy, "--audit", str(audit), "-o", fmt)
        assert r.returncode == 2, f"{case} -o {fmt}: {r.returncode} {r.stdout}{r.stderr}"
        assert "no audit segments here" in r.stderr and r.stdout == ""
