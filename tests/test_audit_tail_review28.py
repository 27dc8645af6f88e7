"""``audit tail`` reports an impossible frame length in any segment, the newest too.

Found by a hostile review (twenty-eighth session): ``tail`` without ``--follow`` said
nothing and exited 0 when the NEWEST segment held a frame length of 0 or over
``MAX_FRAME_BYTES`` -- appended after the last frame or written over the first -- while
``export`` said ``impossible frame length ... (corrupt)`` and exited 1 (and ``verify``
said BROKEN, ``tail -f`` reported it). Where following starts (``_whole_frames_end``)
stopped at the bad length, and the backlog reads only up to there. Now such a length is
damage wherever it is, reported as ``export`` reports it, exit 1; a frame still being
written (a plausible length, fewer bytes than it says) is still not damage in the newest
segment, so ``tail -f`` on a live trail goes on as before.

The review of that fix found a plausible length (up to 1 MiB) edited to run past the end of
the newest segment -- at its first record frame, or a middle one -- taken for a frame being
written: the records after it were hidden, ``tail -n 3`` printed the older segment's last
ones and exited 0 (export: ``segment ends inside a frame (truncated)``, exit 1). Now a
frame whose bytes already hold a whole payload (or no payload's start) is damage at once,
with ``-f`` too; and ``tail`` without ``-f`` waits a moment (``SETTLE_SECONDS``) for a frame
the newest segment ends inside: finished, it reads on; not, it reports the frame as
``export`` does, exit 1.

Families as data: every damage shape x the newest or an older segment x ``-n`` values,
each compared with ``export`` of the same directory; every length that runs past the end x
``-n`` values; every way a frame can be cut while it is written, in the newest segment:
finished while tail waits (not damage), or never (damage, as export says).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit.chain import LENGTH, MAX_FRAME_BYTES, RECORD_KINDS, decode_frame
from sidecar.audit.segments import list_segments, read_frames
from sidecar.audit.signing import write_keypair
from tests import forkserver
from tests.harness import ROOT
from tests.test_audit_attacks import write
from tests.test_audit_walk_review29 import cli_many


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tail28")
    priv, _pub, _ = write_keypair(str(root / "k"))
    d = root / "audit"
    write(d, Path(priv), 43)  # a real signing writer: several segments, sealed
    segments = list_segments(str(d))
    assert len(segments) >= 3
    assert len(_offsets(Path(segments[-1].path).read_bytes())) >= 4  # (records in the newest)
    return d


def _offsets(data: bytes) -> list[int]:
    return [offset for offset, _payload in read_frames(io.BytesIO(data))]


def _at(index: int, length: int) -> Callable[[bytes], bytes]:
    """The length of frame ``index`` (0: the header) written over with ``length``."""
    def damage(data: bytes) -> bytes:
        out = bytearray(data)
        at = _offsets(data)[index]
        out[at:at + 4] = LENGTH.pack(length)
        return bytes(out)
    return damage


# Damage shape -> (the bytes of a segment -> damaged bytes, the length the message names).
DAMAGE: dict[str, tuple[Callable[[bytes], bytes], int]] = {
    "zero length appended, zeros after": (lambda d: d + b"\0" * 68, 0),
    "zero length appended, nothing after": (lambda d: d + b"\0" * 4, 0),
    "all-ones length appended": (lambda d: d + b"\xff" * 4 + b"A" * 64, 0xFFFFFFFF),
    "one past the maximum appended": (
        lambda d: d + LENGTH.pack(MAX_FRAME_BYTES + 1) + b"B" * 64, MAX_FRAME_BYTES + 1),
    "huge length at offset 0": (_at(0, 0xFFFFFFF0), 0xFFFFFFF0),
    "zero length at offset 0": (_at(0, 0), 0),
    "huge length mid-segment": (_at(2, 0xFFFFFFF0), 0xFFFFFFF0),
    "zero length mid-segment": (_at(2, 0), 0),
}
POSITIONS = {"newest": -1, "older": 1}
LINES = {"newest": [0, 5, 100_000], "older": [5, 100_000]}


def _runs(*jobs: list[str]) -> list[tuple[int, list[int], str]]:
    """Each ``sidecar audit JOB`` (``cli_many``: in this process, as ``sidecar_cli_many``
    runs them): exit status, the seqs printed, stderr."""
    out = []
    for got in cli_many([["audit", *job] for job in jobs]):
        assert "Traceback" not in got.stderr, got.stderr
        seqs = [json.loads(line)["seq"] for line in got.stdout.splitlines()]
        out.append((got.returncode, seqs, got.stderr))
    return out


def _copy(trail: Path, tmp: Path, position: str) -> tuple[Path, Path]:
    d = tmp / "audit"
    shutil.copytree(trail, d)
    return d, Path(list_segments(str(d))[POSITIONS[position]].path)


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("shape", list(DAMAGE))
def test_tail_reports_an_impossible_frame_length_as_export_does(
        trail: Path, tmp_path: Path, shape: str, position: str) -> None:
    d, seg = _copy(trail, tmp_path, position)
    damage, length = DAMAGE[shape]
    seg.write_bytes(damage(seg.read_bytes()))
    said = f"{seg.name}: impossible frame length {length} (corrupt)"
    (code, exported, err), *tails = _runs(["export", str(d)], *(
        ["tail", "-n", str(n), str(d)] for n in LINES[position]))
    assert code == 1 and said in err, err  # (the reference: export names it, exit 1)
    for lines, (code, tailed, err) in zip(LINES[position], tails, strict=True):
        assert code == 1, (lines, code, err)
        assert said in err and err.count(seg.name) == 1, (lines, err)  # said once
        # The records tail prints are export's newest ``lines`` (the same are readable).
        assert tailed == (exported[-lines:] if lines else []), (lines, tailed)


def _cut_newest(trail: Path, tmp: Path) -> tuple[Path, Path, bytes, int]:
    """A copy of ``trail`` whose newest segment ends inside its last record frame (the
    frames after it dropped, as if the writer were writing it): the directory, the
    segment, the frame's bytes, and where it starts."""
    d, seg = _copy(trail, tmp, "newest")
    data = seg.read_bytes()
    frames = list(read_frames(io.BytesIO(data)))
    at, payload = [(o, p) for o, p in frames if decode_frame(p)[2] in RECORD_KINDS][-1]
    frame = data[at:at + 4 + len(payload)]
    seg.write_bytes(data[:at])
    return d, seg, frame, at


# Where a frame being written may be cut: how many of its bytes are there.
CUTS: dict[str, Callable[[int], int]] = {
    "one byte of its length": lambda n: 1,
    "three bytes of its length": lambda n: 3,
    "its length, no payload": lambda n: 4,
    "half its payload": lambda n: 4 + (n - 4) // 2,
    "all but its last byte": lambda n: n - 1,
}


class _Forked:
    """The part of ``subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)`` these tests
    use, for ``python -m sidecar ARGV`` forked from the warm interpreter
    (``tests/forkserver.py``: a process of its own, its pid, signals, exit status and
    streams, without an interpreter's start, about a quarter of a CPU-second, per process).
    ``tail -f`` and Ctrl-C in a process exec'd as before: ``test_tail_f_reads_...``."""

    def __init__(self, proc: forkserver.ForkedProcess, out: int, err: int) -> None:
        self._proc, self.pid = proc, proc.pid
        self.stdout, self.stderr = open(out), open(err)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self._proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self._proc.send_signal(sig)

    def kill(self) -> None:
        self._proc.kill()

    def communicate(self, timeout: float) -> tuple[str, str]:
        got: dict[str, str] = {}
        readers = [threading.Thread(target=lambda k=k, f=f: got.__setitem__(k, f.read()),
                                    daemon=True)
                   for k, f in (("out", self.stdout), ("err", self.stderr))]
        for t in readers:
            t.start()
        self.wait(timeout)
        for t in readers:
            t.join(timeout)
        self.stdout.close()
        self.stderr.close()
        return got["out"], got["err"]


def _start(argv: list[str]) -> Any:
    """``python -m sidecar ARGV`` with its stdout and stderr piped (text): forked
    (``_Forked``), or exec'd where the fork server cannot (``SIDECAR_TEST_EXEC=1``)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = forkserver.start(argv, stdout=out_w, stderr=err_w)
    finally:
        os.close(out_w)
        os.close(err_w)
    if proc is not None:
        return _Forked(proc, out_r, err_r)
    os.close(out_r)
    os.close(err_r)
    return subprocess.Popen([sys.executable, "-m", "sidecar", *argv], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tails(d: Path, lines: list[int], *follow: str) -> list[Any]:
    """``sidecar audit tail -n N d`` for each N, started at once (each may wait
    ``SETTLE_SECONDS`` for a frame being written: the waits overlap)."""
    return [_start(["audit", "tail", "-n", str(n), *follow, str(d)]) for n in lines]


def _ended(proc: Any) -> tuple[int, list[int], str]:
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return proc.returncode, [json.loads(line)["seq"] for line in out.splitlines()], err


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_frame_no_writer_finishes_in_the_newest_segment_is_damage(
        trail: Path, tmp_path: Path, cut: str) -> None:
    """The newest segment ends inside a frame and stays so: after its wait, ``tail``
    reports it as ``export`` does (its own words: a frame's length cut is "inside a frame
    length"), the records before it printed, exit 1."""
    d, seg, frame, _at_offset = _cut_newest(trail, tmp_path)
    with open(seg, "ab") as fh:
        fh.write(frame[:CUTS[cut](len(frame))])
    ((code, exported, err),) = _runs(["export", str(d)])
    said = err.strip().splitlines()[-1].split("segment: ", 1)[-1]
    assert code == 1 and said.startswith(f"{seg.name}: segment ends inside a frame"), err
    procs = _tails(d, LINES["newest"])
    for lines, proc in zip(LINES["newest"], procs, strict=True):
        code, tailed, err = _ended(proc)
        assert code == 1 and said in err and err.count(seg.name) == 1, (lines, err)
        assert tailed == (exported[-lines:] if lines else []), (lines, tailed)


def _sleeping(proc: subprocess.Popen[str]) -> bool:
    """Is ``proc`` in a sleep (``tail`` without ``-f`` sleeps only while it waits for a
    frame being written)? Without /proc: assumed after half a second."""
    try:
        with open(f"/proc/{proc.pid}/wchan") as fh:
            return "nanosleep" in fh.read()
    except OSError:
        time.sleep(0.5)
        return True


# What the writer appends while tail waits: the rest of the cut frame, then (or not) the
# start of the next frame (the segment's seal), which is then the one being written.
GROWS = {"the frame finished": False, "the frame finished, the next begun": True}


@pytest.mark.parametrize("grows", list(GROWS))
@pytest.mark.parametrize("cut", list(CUTS))
def test_a_frame_finished_while_tail_waits_is_read(
        trail: Path, tmp_path: Path, cut: str, grows: str) -> None:
    """The newest segment ends inside a frame when ``tail`` (no ``-f``) first reads it;
    the writer finishes it while tail waits: tail reads on, prints the frame's record
    among the newest, says nothing, exit 0 (a frame begun after it is being written)."""
    d, seg, frame, at = _cut_newest(trail, tmp_path)
    after = Path(list_segments(str(trail))[-1].path).read_bytes()[at + len(frame):]
    n = CUTS[cut](len(frame))
    with open(seg, "ab") as fh:
        fh.write(frame[:n])
    (proc,) = _tails(d, [3])
    try:
        assert _wait(lambda: proc.poll() is not None or _sleeping(proc)), "never waited"
        assert proc.poll() is None, proc.communicate()  # (it waits for the frame)
        with open(seg, "ab") as fh:
            fh.write(frame[n:] + (after[:len(after) // 2] if GROWS[grows] else b""))
        code, tailed, err = _ended(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (code, err) == (0, ""), err
    assert tailed[-1] == decode_frame(frame[4:])[0] and len(tailed) == 3, tailed


def _past(index: int, extra: int) -> Callable[[bytes], bytes]:
    """The length of frame ``index`` (0: the header, -1: the last) written over so that
    the frame runs ``extra`` bytes past the end of the segment."""
    def damage(data: bytes) -> bytes:
        at = _offsets(data)[index]
        return _at(index, len(data) - at - 4 + extra)(data)
    return damage


def _middle(data: bytes) -> int:
    return len(_offsets(data)) // 2


# A plausible length (at most 1 MiB) that runs past the end of the segment: the bytes after
# it are the frame's real payload and whole frames after it, or no payload's start.
PAST_THE_END: dict[str, Callable[[bytes], bytes]] = {
    "frame 1, 100 bytes past the end": _past(1, 100),
    "frame 1, 1 byte past the end": _past(1, 1),
    "frame 1 says 1 MiB": _at(1, MAX_FRAME_BYTES),
    "a middle frame, 100 bytes past the end": lambda d: _past(_middle(d), 100)(d),
    "a middle frame, 1 byte past the end": lambda d: _past(_middle(d), 1)(d),
    "a middle frame says 1 MiB": lambda d: _at(_middle(d), MAX_FRAME_BYTES)(d),
    "the last frame, 1 byte past the end": _past(-1, 1),
    "the last frame says 1 MiB": _at(-1, MAX_FRAME_BYTES),
    "a length appended before no payload's start": lambda d: d + LENGTH.pack(64) + b"\xc1" * 8,
}
SWALLOW_LINES = [0, 3, 100_000]


@pytest.mark.parametrize("shape", list(PAST_THE_END))
def test_a_length_running_past_the_end_of_the_newest_segment_is_damage(
        trail: Path, tmp_path: Path, shape: str) -> None:
    """Reported as ``export`` reports it, the records before it printed (export's newest),
    exit 1 -- at once (no frame being written holds a whole payload), with ``-f`` too."""
    d, seg = _copy(trail, tmp_path, "newest")
    seg.write_bytes(PAST_THE_END[shape](seg.read_bytes()))
    said = f"{seg.name}: segment ends inside a frame (truncated)"
    (code, exported, err), *tails = _runs(["export", str(d)], *(
        ["tail", "-n", str(n), str(d)] for n in SWALLOW_LINES))
    assert code == 1 and said in err, err
    for lines, (code, tailed, err) in zip(SWALLOW_LINES, tails, strict=True):
        assert code == 1, (lines, code, err)
        assert said in err and err.count(seg.name) == 1, (lines, err)
        assert tailed == (exported[-lines:] if lines else []), (lines, tailed)
    proc, out, errs = _follow_both(d)  # (-n 0 -f: said at once, then followed no further)
    try:
        assert _wait(lambda: any(seg.name in line for line in errs)), errs
        time.sleep(0.3)  # (a poll or more after it: nothing else is said or printed)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.1)  # (the reader threads take the last lines)
    err = "".join(errs)
    assert proc.returncode == 1 and said in err and err.count(seg.name) == 1, err
    assert out == []


def _follow_both(d: Path) -> tuple[Any, list[str], list[str]]:
    """``_follow`` with its stderr read as it comes, too (forked: ``_start``)."""
    proc, out = _follow(d, forked=True)
    errs: list[str] = []
    threading.Thread(target=lambda: errs.extend(proc.stderr or []), daemon=True).start()
    return proc, out, errs


def _follow(d: Path, lines: int = 0, *, forked: bool = False) -> tuple[Any, list[str]]:
    """``tail -n LINES -f`` of ``d`` in a process exec'd (``forked``: ``_start``), its
    stdout read as it comes."""
    argv = ["audit", "tail", "-n", str(lines), "-f", "--interval", "0.05", str(d)]
    proc = _start(argv) if forked else subprocess.Popen(
        [sys.executable, "-m", "sidecar", *argv],
        cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True).start()
    return proc, out


def _wait(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("cut", list(CUTS))
def test_tail_f_reads_a_frame_finished_after_it_started(
        trail: Path, tmp_path: Path, cut: str) -> None:
    """A live trail: ``tail -f`` started while the newest segment ends inside a frame says
    nothing about it, prints its records once the writer finishes it, and still reports an
    impossible length written after it (exit 1 at Ctrl-C)."""
    d, seg, frame, _at_offset = _cut_newest(trail, tmp_path)
    n = CUTS[cut](len(frame))
    with open(seg, "ab") as fh:
        fh.write(frame[:n])
    # (-n 1: the backlog's newest record says the follower has started -- with -n 0 and a
    # slow start, the frame was whole before it looked, an old record it never printed:
    # a CI run on a loaded machine)
    proc, out = _follow(d, lines=1)
    try:
        assert _wait(lambda: len(out) >= 1), out
        time.sleep(0.3)  # (it has polled: the cut frame is not read yet)
        assert len(out) == 1 and proc.poll() is None
        with open(seg, "ab") as fh:
            fh.write(frame[n:])
        assert _wait(lambda: len(out) >= 2), out
        seqs = [json.loads(line)["seq"] for line in out[1:]]
        assert seqs and seqs[0] == decode_frame(frame[4:])[0]
        with open(seg, "ab") as fh:
            fh.write(b"\0" * 8)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 1, err
    assert f"{seg.name}: impossible frame length 0 (corrupt)" in err, err
    assert err.count(seg.name) == 1, err
