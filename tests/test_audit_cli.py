"""sidecar audit verify / export / tail, through the argparse entry point."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sidecar.audit.cli import main
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import list_segments
from sidecar.config.audit import AuditConfig
from tests.harness import write_audit_trail

REPO = Path(__file__).resolve().parent.parent


def write(directory: Path, start: int, n: int, **cfg: object) -> None:
    config = AuditConfig(path=str(directory), fsync=False, **cfg)  # type: ignore[arg-type]
    write_audit_trail(config, (AuditRecord(time=1700000000.0 + i, request_id=f"r{i}",
                                           peer=f"spiffe://td/p{i % 2}",
                                           decision="allow" if i % 2 else "deny", rule="r",
                                           extra={"i": i})
                               for i in range(start, start + n)))


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    d = tmp_path / "audit"
    write(d, 0, 20, max_segment_bytes=4096, batch_size=4)
    return d


def test_verify_ok_and_broken(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(trail)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 20 records") and "head: seq" in out
    seg = list_segments(str(trail))[0].path
    data = bytearray(Path(seg).read_bytes())
    data[-30] ^= 0xFF
    Path(seg).write_bytes(bytes(data))
    assert main(["verify", str(trail), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["broken_segment"] == os.path.basename(seg)
    assert main(["verify", str(trail), "--hmac-key-file", str(trail / "missing")]) == 2


def test_export_jsonl_with_filters(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(trail), "--decision", "allow", "--peer", "spiffe://td/p1",
                 "--since", "1700000004", "--until", "2023-11-14T22:13:30Z"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["request_id"] for x in lines] == ["r5", "r7", "r9"]
    assert lines[0]["extra"] == {"i": 5} and lines[0]["seq"] > 0
    assert main(["export", str(trail), "--since", "someday"]) == 2


def test_export_csv_to_file(trail: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    assert main(["export", str(trail), "--format", "csv", "-o", str(out), "--rule", "r"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 20 and rows[3]["request_id"] == "r3"
    assert rows[3]["peer"] == "spiffe://td/p1" and json.loads(rows[3]["extra"]) == {"i": 3}


def test_tail_last_n(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", str(trail), "-n", "3"]) == 0
    got = [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()]
    assert got == ["r17", "r18", "r19"]


def test_tail_follow_across_rotation_and_ctrl_c(trail: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.audit.cli", "tail", str(trail), "-n", "1", "-f",
         "--interval", "0.05"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, proc.kill)  # readline() below must not hang the suite
    watchdog.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert json.loads(first)["request_id"] == "r19"
        before = len(list_segments(str(trail)))
        # A restart (new segment) and rotations while tail follows.
        write(trail, 20, 40, max_segment_bytes=4096, batch_size=4)
        assert len(list_segments(str(trail))) > before + 1
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            got.append(json.loads(line)["request_id"])
        assert got == [f"r{i}" for i in range(20, 60)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
