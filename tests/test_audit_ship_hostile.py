"""The collector's copy, edited: what ``sidecar audit collect`` + ``verify`` say.

Found by a hostile review: ``collect`` read only each message's ``frame`` and ignored the
JSON a SIEM shows and indexes (the record, the checkpoint, the header, ``seq``, ``kind``,
``digest``, the structured data), so a deny edited into an allow in the collector's copy
rebuilt and verified OK; JSON nested too deep was a traceback and one undecodable frame
made the whole collection exit 2. Now every message must say what its frame says (exit 1
naming the seq), and lines that are cut or not ours are skipped (``verify`` shows the gap).

The stream is what a REAL rsyslog wrote (tests/test_audit_ship.py starts it), for a clear
and an encrypted trail; the edits are data, applied to every kind of message.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar.audit.crypto import write_data_key
from sidecar.audit.record import AuditRecord
from sidecar.audit.signing import write_keypair
from sidecar.config.audit import AuditConfig
from tests.harness import sidecar_cli, wait_for
from tests.test_audit_ship import ORDERS, Rsyslog
from tests.test_audit_walk_review29 import cli_many
from tests.test_audit_writer import run_writer


class Stream:
    def __init__(self, root: Path, lines: list[str], pub: str, data: str | None,
                 json_records: bool) -> None:
        self.root, self.lines, self.pub, self.data = root, lines, pub, data
        self.json = json_records  # format 2: records shipped as their stored JSON
        self.runs = 0

    def collect(self, lines: list[str], *, data_key: bool = True, process: bool = False
                ) -> tuple[int, str, dict | None]:
        """(collect's exit code, its output, verify's JSON when collect succeeded). The
        commands run in this process (``cli_many``: each family here checks what collect and
        verify say, over many edits); ``process``: each ``python -m sidecar`` in a process of
        its own (the process boundary, ``test_an_edited_message_in_its_own_process_...``)."""
        self.runs += 1
        src = self.root / f"in-{self.runs}.log"
        src.write_text("".join(line + "\n" for line in lines))
        out = self.root / f"out-{self.runs}"
        keys = ["--data-key", self.data] if self.data and data_key else []

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return sidecar_cli(*args) if process else cli_many([args])[0]

        got = cli("audit", "collect", str(src), "-o", str(out), *keys)
        assert "Traceback" not in got.stderr, got.stderr
        if got.returncode != 0:
            return got.returncode, got.stdout + got.stderr, None
        checked = cli("audit", "verify", str(out), "--pubkey", self.pub, *keys, "--json")
        assert "Traceback" not in checked.stderr, checked.stderr
        return 0, got.stdout, json.loads(checked.stdout)


# "-json": every record is one JSON holds as it is, so the writer stores and ships it as
# JSON (format 2: messages without the frame, rebuilt by collect); otherwise a bytes value
# makes each record fall back to msgpack (messages carrying their frame).
@pytest.fixture(scope="module", params=["clear", "encrypted", "clear-json", "encrypted-json"])
def stream(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Stream:
    root = tmp_path_factory.mktemp(f"ship-{request.param}")
    rsyslog = Rsyslog(root / "rsyslog")
    rsyslog.start()
    try:
        priv, pub, _ = write_keypair(str(root / "sig"))
        data = None
        if request.param.startswith("encrypted"):
            data = str(root / "d.data")
            write_data_key(data)
        config = AuditConfig(path=str(root / "audit"), fsync=False, signing_key_file=priv,
                             checkpoint_every_records=7, max_segment_bytes=4096,
                             encryption_key_file=data, ship=rsyslog.ship())

        json_records = request.param.endswith("-json")

        async def body(w) -> None:  # type: ignore[no-untyped-def]
            for i in range(40):
                assert w.submit(AuditRecord(
                    time=1000.0 + i, request_id=f"r{i}", decision="deny" if i % 3 else "allow",
                    status=403 if i % 3 else 200, rule="orders", peer=ORDERS,
                    extra={"n": i, "l": [1, 2.5, None, True]} if json_records else
                    {"n": i, "b": b"\x00\xff", "l": [1, 2.5, None, True]}))
                await trio.sleep(0.002)

        writer = run_writer(config, body, identity=ORDERS)
        seal = f'seq="{writer.statistics().next_seq - 1}"'
        assert wait_for(lambda: any(seal in line for line in rsyslog.lines()), timeout=15)
    finally:
        rsyslog.stop()
    lines = rsyslog.lines()
    assert {line.split("\t")[0] for line in lines} == {"segment", "audit", "checkpoint"}
    # The format each record took: JSON (its message has no frame) or msgpack.
    framed = [json.loads(line.split("\t", 2)[2]) for line in lines if line.startswith("audit\t")]
    assert framed and all(("frame" in m) != json_records for m in framed), framed[:2]
    return Stream(root, lines, pub, data, json_records)


def first(lines: list[str], kind: str) -> int:
    return next(i for i, line in enumerate(lines) if f'kind="{kind}"' in line)


def edit_json(key_path: tuple[str, ...], value: object) -> Callable[[str], str]:
    """Set a value inside the message's JSON object (the SD and frame untouched)."""
    def apply(line: str) -> str:
        start = line.index('{"seq":')
        obj = json.loads(line[start:])
        target = obj
        for k in key_path[:-1]:
            target = target[k]
        target[key_path[-1]] = value
        return line[:start] + json.dumps(obj, separators=(",", ":"))
    return apply


def drop_json(key: str) -> Callable[[str], str]:
    def apply(line: str) -> str:
        start = line.index('{"seq":')
        obj = json.loads(line[start:])
        del obj[key]
        return line[:start] + json.dumps(obj, separators=(",", ":"))
    return apply


def sub(pattern: str, repl: str) -> Callable[[str], str]:
    return lambda line: re.sub(pattern, repl, line, count=1)


def other_frame(lines: list[str], kind: str) -> Callable[[str], str]:
    """The frame of another message of the same kind (its JSON left as it was)."""
    donor = json.loads(lines[[i for i, x in enumerate(lines) if f'kind="{kind}"' in x][1]]
                       .split("\t", 2)[2])["frame"]
    return lambda line: re.sub(r'"frame":"[^"]*"', f'"frame":"{donor}"', line)


# (what is edited, the kind of message, the edit): each makes collect exit 1.
EDITS: list[tuple[str, str, Callable[[str], str]]] = [
    ("record decision", "rec", edit_json(("record", "d"), "allow")),
    ("record status as float", "rec", edit_json(("record", "st"), 403.0)),
    ("record status as bool", "rec", edit_json(("record", "rule"), True)),
    ("record extra", "rec", edit_json(("record", "x", "n"), 99)),
    ("record key added", "rec", edit_json(("record", "zz"), 1)),
    ("record dropped", "rec", drop_json("record")),
    ("record null", "rec", edit_json(("record",), None)),
    ("json seq", "rec", edit_json(("seq",), 10_000)),
    ("json kind", "rec", edit_json(("kind",), "chk")),
    ("json digest", "rec", edit_json(("digest",), "00" * 32)),
    ("sd seq", "rec", sub(r'seq="(\d+)"', 'seq="99999"')),
    ("sd digest", "rec", sub(r'digest="[0-9a-f]+"', 'digest="' + "ab" * 32 + '"')),
    ("sd kind", "rec", sub(r'kind="rec"', 'kind="chk"')),
    ("checkpoint time", "chk", edit_json(("checkpoint", "fields", "time"), 1.0)),
    ("checkpoint id", "chk", edit_json(("checkpoint", "fields", "id"), "spiffe://x/y")),
    ("checkpoint seq", "chk", edit_json(("checkpoint", "seq"), 1)),
    ("checkpoint sig", "chk", edit_json(("checkpoint", "sig"), base64.b64encode(
        bytes(64)).decode())),
    ("seal why", "end", edit_json(("checkpoint", "fields", "why"), "shutdown")),
    ("header alg", "seg", edit_json(("header", "alg"), "hmac-sha256")),
    ("header created", "seg", edit_json(("header", "created"), 0.0)),
    ("header dropped", "seg", drop_json("header")),
]


def _edited(stream: Stream, what: str, kind: str, edit: Callable[[str], str]) -> list[str]:
    """The stream's lines with one message of ``kind`` edited by ``edit``."""
    if kind == "rec" and stream.data:
        kind = "erc"
        if what.startswith("sd kind"):
            edit = sub(r'kind="erc"', 'kind="chk"')
    if what == "seal why":
        kind, idx = "end", next(i for i, x in enumerate(stream.lines)
                                if '"why":"rotate"' in x)
    else:
        idx = first(stream.lines, kind) + (2 if kind in ("rec", "erc") else 0)
    lines = list(stream.lines)
    lines[idx] = edit(lines[idx])
    assert lines[idx] != stream.lines[idx]
    return lines


@pytest.fixture(scope="module")
def edited_collects(stream: Stream) -> dict[str, subprocess.CompletedProcess[str]]:
    """``collect`` of every member of ``EDITS`` on this stream, in this process
    (``cli_many``, as ``sidecar_cli_many`` runs them; ``Stream.collect`` runs the command in
    a process of its own)."""
    jobs = []
    for what, kind, edit in EDITS:
        src = stream.root / f"edited-{len(jobs)}.log"
        src.write_text("".join(line + "\n" for line in _edited(stream, what, kind, edit)))
        keys = ["--data-key", stream.data] if stream.data else []
        jobs.append(["audit", "collect", str(src), "-o",
                     str(stream.root / f"edited-out-{len(jobs)}"), *keys])
    results = cli_many(jobs, timeout=300)
    return {what: r for (what, _k, _e), r in zip(EDITS, results, strict=True)}


@pytest.mark.parametrize("what", [e[0] for e in EDITS])
def test_an_edited_message_is_refused(edited_collects: dict[str, Any], what: str) -> None:
    got = edited_collects[what]
    assert "Traceback" not in got.stderr, got.stderr
    out = got.stdout + got.stderr
    assert got.returncode == 1 and "does not match its frame" in out, out


def test_an_edited_message_in_its_own_process_says_what_the_batch_said(
        stream: Stream, edited_collects: dict[str, Any]) -> None:
    """The process boundary: one member through ``python -m sidecar audit collect``."""
    what, kind, edit = EDITS[0]
    code, out, _ = stream.collect(_edited(stream, what, kind, edit), process=True)
    assert code == edited_collects[what].returncode == 1 and "does not match its frame" in out


def test_an_edited_encrypted_record_needs_the_data_key(stream: Stream) -> None:
    if not stream.data:
        pytest.skip("the clear trail's records are always compared")
    idx = first(stream.lines, "erc") + 2
    lines = list(stream.lines)
    lines[idx] = edit_json(("record", "d"), "allow")(lines[idx])
    if stream.json:
        # Format 2: the chain is over the record's JSON, so no data key is needed.
        for data_key in (False, True):
            code, out, _ = stream.collect(lines, data_key=data_key)
            assert code == 1 and "does not match its frame (digest)" in out, out
        return
    code, out, result = stream.collect(lines, data_key=False)
    assert code == 0 and "encrypted records' JSON not compared" in out, out
    assert result is not None and result["ok"]
    code, out, _ = stream.collect(lines)
    assert code == 1 and "does not match its frame (record)" in out, out


def other_prev(lines: list[str], kind: str) -> Callable[[str], str]:
    """The ``prev`` of another record message (format 2 ships it instead of the frame)."""
    donor = json.loads(lines[[i for i, x in enumerate(lines) if f'kind="{kind}"' in x][1]]
                       .split("\t", 2)[2])["prev"]
    return lambda line: re.sub(r'"prev":"[^"]*"', f'"prev":"{donor}"', line)


def test_a_frame_taken_from_another_message(stream: Stream) -> None:
    for kind in ("erc" if stream.data else "rec", "chk"):
        idx = first(stream.lines, kind)
        lines = list(stream.lines)
        take = other_prev if stream.json and kind != "chk" else other_frame
        lines[idx] = take(stream.lines, kind)(lines[idx])
        code, out, _ = stream.collect(lines)
        assert code == 1 and "does not match its frame" in out, out


def test_dropped_duplicated_reordered_cut_and_junk_lines(stream: Stream) -> None:
    lines = stream.lines
    code, out, result = stream.collect(lines)
    assert code == 0 and result is not None and result["ok"], (out, result)
    records = result["records"]
    mid = first(lines, "erc" if stream.data else "rec") + 3
    # Order and repetition of delivery do not matter.
    for variant in (lines[:mid] + [lines[mid]] + lines[mid:], list(reversed(lines)),
                    lines + lines, lines[1:] + lines[:1]):
        code, out, result = stream.collect(variant)
        assert code == 0 and result is not None and result["ok"], (out, result)
        assert result["records"] == records
    # A dropped or cut line in the middle, at the head: a gap verify reports.
    for variant in (lines[:mid] + lines[mid + 1:], lines[1:],
                    lines[:mid] + [lines[mid][:120]] + lines[mid + 1:]):
        code, out, result = stream.collect(variant)
        assert code == 0 and result is not None and not result["ok"], (out, result)
    # Lines cut from the end: what is left is a shorter trail (an anchor, or the pod's
    # copy, shows the cut; docs/audit.md "Which attacks need an anchor").
    code, out, result = stream.collect(lines[:-1])
    assert code == 0 and result is not None and not result["sealed"], (out, result)
    # Junk: not ours, nested too deep, a frame that does not decode.
    junk = ['{"seq":' + "[" * 100_000, '{"seq": 1e400, "frame": "x"}', "{\"seq\":",
            'x {"seq":1,"frame":"AAAA"}', "\x00\xff" * 100]
    code, out, result = stream.collect(lines + junk[:3] + junk[4:])
    assert code == 0 and result is not None and result["ok"], (out, result)
    code, out, _ = stream.collect(lines + [junk[3]])
    assert code == 1 and "does not decode" in out, out


PEAK = 256 * 1024  # KiB: the most collect may hold reading the copy with the huge line
HUGE = 320 * 1024 * 1024  # bytes: the huge line, more than PEAK by a margin


@pytest.mark.parametrize("where", ["middle", "end"])
def test_a_line_of_junk_too_long_to_be_ours_is_skipped_unread(stream: Stream, tmp_path: Path,
                                                               where: str) -> None:
    # Whoever can reach the collector can write lines into its copy: a line of 512 MiB
    # (a sparse hole of NULs, no newline) was read whole into memory by collect. Now a line
    # over 8 MiB (a message of ours is at most a 1 MiB frame in base64 plus its JSON; 16 MiB
    # before the thirty-fifth session's review) is
    # read past in pieces, counted, and the rest of the copy still rebuilds and verifies.
    # The line here is HUGE, over the peak the test allows collect (its bytes alone, held,
    # break the bound) yet no larger: every byte of it is read, about 2.5 CPU-seconds a GiB.
    import os
    import subprocess
    import sys

    assert HUGE > PEAK * 1024 + 32 * 1024 * 1024  # (held whole, it breaks the bound)
    half = len(stream.lines) // 2 if where == "middle" else len(stream.lines)
    src = tmp_path / "huge.log"
    with open(src, "wb") as fh:
        fh.write("".join(line + "\n" for line in stream.lines[:half]).encode())
        fh.seek(HUGE, os.SEEK_CUR)  # a hole: NULs on read, no disk used
        fh.write(b"\n" + "".join(line + "\n" for line in stream.lines[half:]).encode())
    keys = ["--data-key", stream.data] if stream.data else []
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
             "capture_output=True, text=True, timeout=120); print(r.returncode); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "print(r.stdout + r.stderr)")
    got = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "sidecar", "audit",
                          "collect", str(src), "-o", str(tmp_path / "out"), *keys],
                         capture_output=True, text=True, timeout=150)
    code, maxrss_kib, out = got.stdout.split("\n", 2)
    assert code == "0" and "1 lines longer than 8 MiB skipped" in out, got.stdout
    assert int(maxrss_kib) < PEAK, f"collect held {int(maxrss_kib) // 1024} MiB"
    checked = sidecar_cli("audit", "verify", str(tmp_path / "out"), "--pubkey", stream.pub,
                          *keys, "--json")
    assert json.loads(checked.stdout)["ok"], checked.stdout


def test_collect_refuses_a_fifo_and_a_directory(stream: Stream, tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (fifo, tmp_path):
        got = sidecar_cli("audit", "collect", str(bad), "-o", str(tmp_path / "o"), timeout=30)
        assert got.returncode == 2 and "not a regular file" in got.stderr, got.stderr
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


@pytest.mark.parametrize("created", [1e300, -1e20, 2**63, float("nan"), float("inf"),
                                     True, "x", None])
def test_a_consistently_forged_header_with_an_impossible_time(stream: Stream,
                                                              created: object) -> None:
    """A header frame re-made with its JSON and digest to match (so ``collect`` takes it)
    whose ``created`` no calendar holds: the file is named as of 1970, never a traceback
    (it was an OverflowError), and ``verify`` reports the forgery."""
    import hashlib

    import msgpack

    idx = first(stream.lines, "seg")
    line = stream.lines[idx]
    start = line.index('{"seq":')
    obj = json.loads(line[start:])
    frame = msgpack.unpackb(base64.b64decode(obj["frame"]))
    frame["seg"]["created"] = created
    raw = msgpack.packb(frame)
    digest = hashlib.sha256(raw).hexdigest()
    forged = {**obj, "frame": base64.b64encode(raw).decode(), "header": frame["seg"],
              "digest": digest}
    lines = list(stream.lines)
    lines[idx] = line[:start].replace(obj["digest"], digest) + json.dumps(
        forged, separators=(",", ":"))
    code, out, result = stream.collect(lines)
    assert code == 0 and result is not None and not result["ok"], (out, result)


# A message naming a member twice is not one the writer sent: a SIEM that keeps the first
# "record" would show another decision than the frame collect checked (which read the last).
# Found by a hostile review: collect took it (json.loads). Now the line is not the writer's:
# collect leaves it out and verify finds the seq missing. (what, kind, the edit)
TWICE: list[tuple[str, str, Callable[[str], str]]] = [
    ("seq twice", "seg", lambda line: line.replace('{"seq":', '{"seq":999999,"seq":', 1)),
    ("seq twice", "chk", lambda line: line.replace('{"seq":', '{"seq":999999,"seq":', 1)),
    ("seq twice", "rec", lambda line: line.replace('{"seq":', '{"seq":999999,"seq":', 1)),
    ("record twice", "rec", lambda line: line.replace(
        '{"seq":', '{"record":{"d":"allow","st":200},"seq":', 1)),
]


@pytest.mark.parametrize("what,kind,edit", TWICE, ids=[f"{e[0]}-{e[1]}" for e in TWICE])
def test_a_message_naming_a_member_twice_is_not_taken(stream: Stream, what: str, kind: str,
                                                      edit: Callable[[str], str]) -> None:
    if kind == "rec" and stream.data:
        kind = "erc"
    idx = first(stream.lines, kind) + (2 if kind in ("rec", "erc") else 0)
    lines = list(stream.lines)
    lines[idx] = edit(lines[idx])
    assert lines[idx] != stream.lines[idx]
    code, out, result = stream.collect(lines)
    assert code == 1 or (result is not None and not result["ok"]), (code, out, result)
