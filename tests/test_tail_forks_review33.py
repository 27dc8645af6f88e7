"""``audit tail``: a trail that forks under ``--follow``, and a frame that does not decode.

Found by the hostile review of the thirty-third session:

1. ``tail -f`` moved to any newer-named segment and never looked at the one it left
   again. A pod with no key plants ``audit-<L+1>-2099....log`` whose header links to the
   writer's last frame L by SHA-256, holding a forged allow: tail showed the forgery, and
   every record the writer went on appending to its own segment was hidden, without a word
   (a copy of the writer's segment under a far newer name: one warning, the live records
   hidden all the same). Now the segments tail moved on from are watched: one that grows, or
   a segment whose header continues a seq the segment left continues too, is a fork --
   ``error: the trail forks: ...`` on stderr, exit 1.
2. After a frame that does not decode, tail read on with no link checked until the next
   header, so a record edited in place after it (or before it: its link is the undecodable
   frame's ``prev``) was printed. Now such a frame is damage, as ``export`` takes it:
   nothing after it in the segment, nor the record before it, is shown; a later segment's
   header re-anchors the chain; stderr says so, exit 1 -- ``tail`` and ``tail -f``.

Real writers (``AuditWriter``, live in a thread for ``-f``), real ``sidecar audit tail``
processes, stopped by their pid; every wait bounded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from sidecar.audit.chain import LENGTH
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import list_segments, read_frames
from sidecar.audit.signing import write_keypair
from sidecar.audit.writer import AuditWriter
from sidecar.config.audit import AuditConfig
from tests.harness import ROOT, sidecar_cli_many
from tests.test_audit_attacks import write

IDENT = "spiffe://td/ns/demo/sa/orders"
WAIT = 20.0  # the bound of every wait (seconds)


def _wait(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _record(i: int) -> AuditRecord:
    return AuditRecord(time=1_700_000_000.0 + i, event="request", request_id=f"r{i}",
                       direction="inbound", method="DELETE", host="orders",
                       path=f"/orders/{i}", decision="deny", rule="no-deletes",
                       reason="denied", status=403)


class LiveWriter:
    """A real ``AuditWriter`` running (in its own thread's Trio loop) until ``close``."""

    def __init__(self, directory: Path) -> None:
        self.writer = AuditWriter(AuditConfig(path=str(directory), fsync=False,
                                              batch_linger_seconds=0.0), identity=IDENT)
        self.token: Any = None
        self.done: trio.Event | None = None
        ready = threading.Event()

        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            self.done = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.writer.run)
                ready.set()
                await self.done.wait()
                with trio.move_on_after(5):
                    await self.writer.aclose()
                nursery.cancel_scope.cancel()

        self.thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self.thread.start()
        assert ready.wait(WAIT)

    def submit(self, *ids: int) -> None:
        for i in ids:
            want = self.writer.written + 1
            assert trio.from_thread.run_sync(self.writer.submit, _record(i),
                                             trio_token=self.token)
            assert _wait(lambda want=want: self.writer.written >= want)

    def close(self) -> None:
        if self.thread.is_alive() and self.done is not None:
            trio.from_thread.run_sync(self.done.set, trio_token=self.token)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


class Tail:
    """``sidecar audit tail -f`` on ``directory``, its output read as it comes."""

    def __init__(self, directory: Path, lines: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "audit", "tail", str(directory), "-f",
             "--interval", "0.05", "-n", str(lines)],
            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda: self.out.extend(self.proc.stdout or []),
                                         daemon=True),
                        threading.Thread(target=lambda: self.err.extend(self.proc.stderr or []),
                                         daemon=True)]
        for reader in self.readers:
            reader.start()

    def ids(self) -> list[str]:
        return [json.loads(line)["request_id"] for line in list(self.out)]

    def stop(self) -> tuple[int, list[str], str]:
        """Ctrl-C unless it ended by itself: exit status, the ids shown, stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for reader in self.readers:
            reader.join(WAIT)
        err = "".join(self.err)
        assert "Traceback" not in err, err
        return self.proc.returncode, self.ids(), err


def _frames(seg: Path) -> list[bytes]:
    with open(seg, "rb") as fh:
        return [payload for _offset, payload in read_frames(fh)]


def _pack(frames: list[bytes]) -> bytes:
    return b"".join(LENGTH.pack(len(p)) + p for p in frames)


def _frame(seq: int, prev: bytes, kind: str, body: Any) -> bytes:
    return msgpack.packb({"seq": seq, "prev": prev, kind: body}, use_bin_type=True)


def _forged(ident: str = "FORGED") -> dict[str, Any]:
    rec = _record(0).to_wire()
    rec.update(id=ident, d="allow", st=200, rule="reads")
    return rec


def _continue(frames: list[bytes], after: int, count: int) -> tuple[list[bytes], int]:
    """A planted segment whose header continues frame ``after`` of ``frames`` (linked by
    SHA-256: no key needed), then ``count`` forged allows; and its header's seq."""
    header = msgpack.unpackb(frames[0], raw=False)["seg"]
    at = msgpack.unpackb(frames[after], raw=False)
    seq, prev = at["seq"] + 1, hashlib.sha256(frames[after]).digest()
    start, out = seq, []
    for kind, body in [("seg", {**header, "prev_sealed": False})] + \
            [("rec", _forged()) for _ in range(count)]:
        payload = _frame(seq, prev, kind, body)
        out.append(payload)
        seq, prev = seq + 1, hashlib.sha256(payload).digest()
    return out, start


def _name(start: int, stamp: str = "20991231T000000000000Z") -> str:
    return f"audit-{start:020d}-{stamp}.log"


def plant_linked(d: Path, seg: Path) -> None:
    """A segment continuing the writer's last frame, named as the newest."""
    frames, start = _continue(_frames(seg), -1, 1)
    (d / _name(start)).write_bytes(_pack(frames))


def plant_two_linked(d: Path, seg: Path) -> None:
    """Two planted segments, the second continuing the first: tail moves through both."""
    first, start = _continue(_frames(seg), -1, 1)
    second, start2 = _continue(first, -1, 2)
    (d / _name(start)).write_bytes(_pack(first))
    (d / _name(start2)).write_bytes(_pack(second))


def plant_copy(d: Path, seg: Path) -> None:
    """The writer's segment copied under a far newer name."""
    shutil.copy(seg, d / _name(10 ** 19 - 1))


def plant_branch(d: Path, seg: Path) -> None:
    """A segment branching off inside the writer's segment: its header takes the seq of the
    writer's last frame, linked to the frame before."""
    frames, start = _continue(_frames(seg), -2, 1)
    (d / _name(start)).write_bytes(_pack(frames))


# member -> (plant, planted before tail starts?, does tail see the fork before it shows the
# planted segment's records?)
FORKS: dict[str, tuple[Callable[[Path, Path], None], bool, bool]] = {
    "linked successor, the writer goes on": (plant_linked, False, False),
    "two linked successors, the writer goes on": (plant_two_linked, False, False),
    "linked successor planted before tail starts": (plant_linked, True, False),
    "the writer's segment copied under a newer name": (plant_copy, False, True),
    "a segment branching inside the writer's": (plant_branch, False, True),
}


@pytest.mark.parametrize("member", list(FORKS))
def test_tail_f_reports_a_forked_trail(tmp_path: Path, member: str) -> None:
    plant, before, at_once = FORKS[member]
    d = tmp_path / "audit"
    writer = LiveWriter(d)
    tail: Tail | None = None
    try:
        writer.submit(0, 1, 2)
        (seg,) = list_segments(str(d))
        if before:
            plant(d, Path(seg.path))
        tail = Tail(d, lines=10)
        assert _wait(lambda: len(tail.out) >= 3), tail.out  # (the backlog: it follows now)
        if not before:
            plant(d, Path(seg.path))
            time.sleep(0.3)  # (tail polls: it moves to the planted segment, or stops there)
        writer.submit(3, 4, 5)  # the writer goes on in its own segment
        assert _wait(lambda: tail.proc.poll() is not None), (tail.out, tail.err)
    finally:
        writer.close()
        rc, ids, err = tail.stop() if tail is not None else (None, [], "")
    assert rc == 1, (ids, err)
    assert "error: the trail forks: " in err and "tail cannot tell which" in err, err
    assert seg.name in err, err
    assert ids[:3] == ["r0", "r1", "r2"], ids
    assert not set(ids) & {"r3", "r4", "r5"}, ids  # (shown nowhere: tail stopped)
    if at_once:  # (a header continuing a seq the segment left continues too)
        assert "FORGED" not in ids, ids
        assert "two segments continue the same seq" in err, err
    else:  # (the writer's segment grew after tail moved on from it, or started on another)
        assert f"{seg.name} grew while tail followed" in err, err
    # verify (no key) calls the same trail BROKEN.
    (got,) = sidecar_cli_many([["audit", "verify", str(d)]])
    assert got.returncode == 1 and got.stdout.startswith("BROKEN"), got.stdout


def test_tail_f_follows_an_honest_restart_without_a_fork(tmp_path: Path) -> None:
    """A writer that stops (sealed) and one that starts after it: a new segment, the old
    one never grows again -- not a fork; every record shown, exit 0 at Ctrl-C."""
    d = tmp_path / "audit"
    writer = LiveWriter(d)
    tail: Tail | None = None
    try:
        writer.submit(0, 1)
        tail = Tail(d, lines=10)
        assert _wait(lambda: len(tail.out) >= 2), tail.out
        writer.close()
        writer = LiveWriter(d)
        writer.submit(2, 3, 4)
        assert len(list_segments(str(d))) == 2
        assert _wait(lambda: "r4" in tail.ids()), (tail.out, tail.err)
        time.sleep(0.3)  # (a few more polls of the segment left behind)
    finally:
        writer.close()
        rc, ids, err = tail.stop() if tail is not None else (None, [], "")
    assert rc == 0 and "fork" not in err, err
    assert ids == [f"r{i}" for i in range(5)], ids


# ------------------------------------------------------------- a frame that does not decode

def _edit(payload: bytes, ident: str) -> bytes:
    """The record of a frame shown as an allow named ``ident``; its link NOT redone."""
    obj = msgpack.unpackb(payload, raw=False)
    rec = obj["rec"]
    if isinstance(rec, str):  # (format 2 keeps the record as JSON)
        doc = json.loads(rec)
        doc.update(id=ident, d="allow", st=200)
        obj["rec"] = json.dumps(doc, separators=(",", ":"))
    else:
        rec.update(id=ident, d="allow", st=200)
    return msgpack.packb(obj, use_bin_type=True)


def _is_record(payload: bytes) -> bool:
    return "rec" in msgpack.unpackb(payload, raw=False)


NOT_A_FRAME = {
    "not msgpack": b"\xc1",
    "msgpack, not a frame": msgpack.packb({"x": 1}),
    "a frame with no seq": msgpack.packb({"prev": b"\0" * 32, "rec": {"id": "x"}},
                                         use_bin_type=True),
}
# which record around the frame that does not decode is edited: after it, before it
EDITED = {"after": 1, "before": -1}


@pytest.fixture(scope="module")
def signed_trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tail33")
    priv, _pub, _ = write_keypair(str(root / "k"))
    d = root / "audit"
    write(d, Path(priv), 43)  # several segments, sealed
    assert len(list_segments(str(d))) >= 3
    return d


def test_tail_shows_nothing_unlinked_after_a_frame_that_does_not_decode(
        signed_trail: Path, tmp_path: Path) -> None:
    """Every frame that does not decode x the record edited after or before it x an older
    or the newest segment: tail (and export) show neither edited record nor any frame after
    it in that segment, say why, exit 1; a later segment (its header re-anchors the chain)
    is shown."""
    cases = []
    jobs: list[list[str]] = []
    for bad_name, bad in NOT_A_FRAME.items():
        for edited, step in EDITED.items():
            for position in (1, -1):
                d = tmp_path / f"{len(cases)}"
                shutil.copytree(signed_trail, d)
                segments = list_segments(str(d))
                seg = Path(segments[position].path)
                frames = _frames(seg)
                k = next(i for i in range(2, len(frames) - 1)
                         if _is_record(frames[i]) and _is_record(frames[i + step]))
                frames[k + step] = _edit(frames[k + step], "EDITED")
                frames[k] = bad
                seg.write_bytes(_pack(frames))
                later = [s.name for s in segments[position:]][1:]
                cases.append((bad_name, edited, position, seg.name, later, d))
                jobs += [["audit", "tail", str(d), "-n", "100000"], ["audit", "export", str(d)]]
    results = sidecar_cli_many(jobs)
    for n, (bad_name, edited, position, seg_name, later, d) in enumerate(cases):
        what = (bad_name, edited, position)
        tail, export = results[2 * n], results[2 * n + 1]
        for got in (tail, export):
            assert "Traceback" not in got.stderr, (what, got.stderr)
            assert got.returncode == 1, (what, got.stderr)
            assert "EDITED" not in got.stdout, (what, got.stdout)
        assert "a frame that does not decode" in tail.stderr, (what, tail.stderr)
        assert seg_name in tail.stderr, (what, tail.stderr)
        shown = [json.loads(line)["seq"] for line in tail.stdout.splitlines()]
        exported = [json.loads(line)["seq"] for line in export.stdout.splitlines()]
        assert shown == exported, what  # (tail shows what export gives)
        assert shown, what
        if later:  # a later segment's records: its header re-anchors the chain
            starts = min(s.start_seq for s in list_segments(str(d)) if s.name in later)
            assert any(seq > starts for seq in shown), (what, shown)


def test_tail_f_shows_nothing_after_a_frame_that_does_not_decode(tmp_path: Path) -> None:
    """Live: the newest segment gets a frame that does not decode and a forged record after
    it; ``tail -f`` shows neither, says why, exit 1 at Ctrl-C."""
    d = tmp_path / "audit"
    writer = LiveWriter(d)
    tail: Tail | None = None
    try:
        writer.submit(0, 1, 2)
        # (-n 1: the backlog's newest record says it follows from the end now; with -n 0
        # a slow start read the frames below as its backlog, printing nothing)
        tail = Tail(d, lines=1)
        assert _wait(lambda: len(tail.out) >= 1), tail.err
        (seg,) = list_segments(str(d))
        frames = _frames(Path(seg.path))
        last = msgpack.unpackb(frames[-1], raw=False)["seq"]
        forged = _frame(last + 2, hashlib.sha256(NOT_A_FRAME["not msgpack"]).digest(),
                        "rec", _forged())
        with open(seg.path, "ab") as fh:
            fh.write(_pack([NOT_A_FRAME["not msgpack"], forged]))
        assert _wait(lambda: "does not decode" in "".join(tail.err)), tail.err
        time.sleep(0.3)
    finally:
        writer.close()
        rc, ids, err = tail.stop() if tail is not None else (None, [], "")
    assert rc == 1, err
    assert ids == ["r2"], ids  # (the forged record after it is not shown)
    assert f"{seg.name}: a frame that does not decode" in err, err
