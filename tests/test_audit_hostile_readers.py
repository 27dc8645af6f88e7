"""The trail readers (``audit verify``, ``export``, ``tail``, ``policy replay``) on hostile
paths and directories: never a traceback, never a wait on a FIFO, clear exit codes.

Found by a hostile review: a FIFO given as PATH made all four wait forever; an entry of the
audit directory named like a segment but not a regular file (a symbolic link, a directory,
a FIFO) was passed over as if it were not there, so replacing the newest segment by a
link verified OK; ``tail`` of a directory without segments, or of a segment with an
impossible frame length, printed nothing and exited 0; a forged trail naming a new
identity in every frame grew the identity list without bound. Now PATH must be a
directory or a regular file (exit 2), such an entry is reported where a segment should be
(verify BROKEN, the others name it on stderr and exit 1 / 1 / 2), and at most 16
identities are listed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from sidecar.audit import segments
from sidecar.audit.chain import GENESIS, LENGTH
from sidecar.audit.segments import list_segments, segment_name, verify
from sidecar.audit.signing import write_keypair
from tests.harness import ROOT, sidecar_cli
from tests.test_audit_attacks import write

POLICY = str(ROOT / "policies" / "demo.yaml")
COMMANDS: dict[str, tuple[list[str], int]] = {
    # command -> (arguments before PATH, exit code when a segment cannot be read)
    "verify": (["audit", "verify"], 1),
    "export": (["audit", "export"], 1),
    "tail": (["audit", "tail", "-n", "1000"], 1),
    "replay": (["policy", "replay", POLICY, "--audit"], 2),
}


def run(command: str, path: Path | str) -> tuple[int, str, str]:
    args, _code = COMMANDS[command]
    got = sidecar_cli(*args, str(path), timeout=60)
    assert "Traceback" not in got.stderr, got.stderr
    return got.returncode, got.stdout, got.stderr


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readers")
    priv, _pub, _ = write_keypair(str(root / "k"))
    d = root / "audit"
    write(d, Path(priv), 40)
    assert len(list_segments(str(d))) >= 3
    return d


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


BAD_PATHS: dict[str, Callable[[Path], Path]] = {
    "fifo": lambda tmp: (make_fifo(tmp / "fifo"), tmp / "fifo")[1],
    "char_device": lambda tmp: Path("/dev/null"),
    "link_to_fifo": lambda tmp: (make_fifo(tmp / "f2"), os.symlink(tmp / "f2", tmp / "l"),
                                 tmp / "l")[2],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("what", list(BAD_PATHS))
def test_a_path_that_is_not_a_directory_or_file(tmp_path: Path, what: str,
                                                command: str) -> None:
    path = BAD_PATHS[what](tmp_path)
    code, _out, err = run(command, path)
    assert code == 2 and "not a directory or regular file" in err, err


@pytest.mark.parametrize("command", ["export", "tail"])
def test_a_directory_without_segments(tmp_path: Path, command: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    code, out, err = run(command, tmp_path)
    assert code == 2 and "no audit segments here" in err and out == "", (out, err)


def test_paths_reached_through_links_still_work(trail: Path, tmp_path: Path) -> None:
    (tmp_path / "dir").symlink_to(trail)
    (tmp_path / "seg.log").symlink_to(list_segments(str(trail))[0].path)
    for command in COMMANDS:
        assert run(command, tmp_path / "dir")[0] == 0, command
        code, _o, err = run(command, tmp_path / "seg.log")
        assert code == 0, (command, err)


def entry_link(seg: Path, tmp: Path) -> None:
    copy = tmp / ("elsewhere-" + seg.name)
    shutil.copy(seg, copy)
    seg.unlink()
    seg.symlink_to(copy)  # the same bytes, through a link


def entry_link_to_fifo(seg: Path, tmp: Path) -> None:
    make_fifo(tmp / ("fifo-" + seg.name))
    seg.unlink()
    seg.symlink_to(tmp / ("fifo-" + seg.name))


def entry_directory(seg: Path, tmp: Path) -> None:
    seg.unlink()
    seg.mkdir()


def entry_fifo(seg: Path, tmp: Path) -> None:
    seg.unlink()
    make_fifo(seg)


ENTRIES = {"link": entry_link, "link_to_fifo": entry_link_to_fifo,
           "directory": entry_directory, "fifo": entry_fifo}


@pytest.mark.parametrize("where", ["oldest", "middle", "newest"])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_an_entry_named_like_a_segment_that_is_not_a_regular_file(
        trail: Path, tmp_path: Path, entry: str, where: str) -> None:
    d = tmp_path / "audit"
    shutil.copytree(trail, d)
    segments = list_segments(str(d))
    seg = Path(segments[{"oldest": 0, "middle": 1, "newest": -1}[where]].path)
    ENTRIES[entry](seg, tmp_path)
    result = verify(str(d))
    assert not result.ok and result.broken is not None and seg.name in str(result.broken)
    for command, (_args, bad) in COMMANDS.items():
        code, out, err = run(command, d)
        assert code == bad and seg.name in (out + err), (command, out, err)
    # Export still reads every other segment.
    code, out, _err = run("export", d)
    assert len(out.splitlines()) > 0


def test_tail_reports_a_damaged_segment(trail: Path, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    shutil.copytree(trail, d)
    seg = Path(list_segments(str(d))[1].path)
    data = bytearray(seg.read_bytes())
    data[:4] = LENGTH.pack(0xFFFFFFF0)  # an impossible frame length at the start
    seg.write_bytes(bytes(data))
    code, out, err = run("tail", d)
    assert code == 1 and "impossible frame length" in err and seg.name in err, err
    assert len(out.splitlines()) > 0  # the other segments' records


def test_a_writer_starts_past_a_fifo_named_like_the_newest_segment(
        trail: Path, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    shutil.copytree(trail, d)
    newest = list_segments(str(d))[-1]
    make_fifo(d / segment_name(newest.start_seq + 1, 2e9))
    priv, _pub, _ = write_keypair(str(tmp_path / "k2"))
    write(d, Path(priv), 3, start=900)  # bounded: write_audit_trail fails after 20 s
    result = verify(str(d))
    assert not result.ok and "not a regular file" in str(result.broken)


def test_a_trail_naming_a_new_identity_in_every_frame(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    d.mkdir()
    out, seq, prev = bytearray(), 0, GENESIS
    frames = [("seg", {"v": 1, "alg": "sha256", "created": 1.0})]
    frames += [("chk", {"time": 1.0, "id": f"spiffe://td/ns/n/sa/s{i}", "kid": "k",
                        "sig": bytes(64)}) for i in range(3000)]
    for kind, body in frames:
        p = msgpack.packb({"seq": seq, "prev": prev, kind: body})
        out += LENGTH.pack(len(p)) + p
        seq, prev = seq + 1, hashlib.sha256(p).digest()
    (d / segment_name(0, 1.0)).write_bytes(bytes(out))
    listed = 16  # segments.MAX_IDENTITIES_LISTED
    assert getattr(segments, "MAX_IDENTITIES_LISTED", None) == listed
    result = verify(str(d))
    assert len(result.identities) == listed
    several = [f for f in result.errors if f.code == "several_identities"]
    assert several and f"more than {listed} identities" in several[0].message
    wrong = verify(str(d), identity="spiffe://td/ns/n/sa/other")
    assert not wrong.ok and len(wrong.findings) <= 102
    code, _out, err = run("verify", d)
    assert code == 1 and "Traceback" not in err


# Header values a hostile directory may hold, where the readers put a header value into a
# message: the format version, the digest algorithm, a declared break, the data key's id.
# Found by a hostile review (twenty-fifth session): a value nested a thousand deep made
# ``repr`` raise RecursionError -- a traceback from verify, export, tail and replay, and a
# writer that would not start on the directory -- and a ``kid`` holding terminal escapes
# reached the terminal raw from export, tail and replay.
def _deep(n: int = 1000) -> object:
    value: object = 0
    for _ in range(n):
        value = [value]
    return value


HOSTILE_VALUES: dict[str, object] = {
    "deep-list": _deep(),
    "deep-map": {"k": _deep(900)},
    "escapes": "\x1b]0;pwned\x07\x1b[2J\u202e",
    "long": "x" * 100_000,
}
HEADER_FIELDS: dict[str, Callable[[dict, object], None]] = {
    "v": lambda h, v: h.__setitem__("v", v),
    "alg": lambda h, v: h.__setitem__("alg", v),
    "break.after_seq": lambda h, v: h.__setitem__("break", {"after_seq": v, "reason": "x"}),
    "break.reason": lambda h, v: h.__setitem__("break", {"after_seq": -1, "reason": v}),
    "enc.kid": lambda h, v: h.__setitem__("enc", {**h.get("enc", {}), "kid": v}),
}


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    from sidecar.audit.crypto import write_data_key

    root = tmp_path_factory.mktemp("hostile-headers")
    priv, pub, _ = write_keypair(str(root / "k"))
    data = root / "d.data"
    write_data_key(str(data))
    d = root / "audit"
    write(d, Path(priv), 12, encryption_key_file=str(data))
    return d, pub, str(data)


@pytest.mark.parametrize("value", list(HOSTILE_VALUES))
@pytest.mark.parametrize("field", list(HEADER_FIELDS))
def test_a_hostile_header_value_is_named_not_raised_or_echoed(
        encrypted: tuple[Path, str, str], tmp_path: Path, field: str, value: str) -> None:
    base, pub, data = encrypted
    d = tmp_path / "audit"
    shutil.copytree(base, d)
    newest = list_segments(str(d))[-1].path
    with open(newest, "rb") as fh:
        frames = [p for _o, p in segments.read_frames(fh)]
    header = msgpack.unpackb(frames[0])
    HEADER_FIELDS[field](header["seg"], HOSTILE_VALUES[value])
    frames[0] = msgpack.packb(header, use_bin_type=True)
    Path(newest).write_bytes(b"".join(LENGTH.pack(len(p)) + p for p in frames))
    for args in (["audit", "verify", str(d)], ["audit", "verify", str(d), "--pubkey", pub],
                 ["audit", "export", str(d), "--data-key", data],
                 ["audit", "tail", str(d), "-n", "100", "--data-key", data],
                 ["policy", "replay", POLICY, "--audit", str(d), "--data-key", data]):
        got = sidecar_cli(*args, timeout=60)
        assert "Traceback" not in got.stderr, (args, got.stderr[-2000:])
        assert "\x1b" not in got.stdout + got.stderr and "\u202e" not in got.stderr, args
        # (verify says BROKEN or cannot run; the others read, they do not verify: a header
        # value they do not use is no reason to stop)
        assert got.returncode in ((1, 2) if args[1] == "verify" else (0, 1, 2)), (
            args, got.returncode, got.stderr[-500:])
        assert len(got.stderr) < 20_000, (args, len(got.stderr))
    # A writer starting on the directory goes on (it declares the damage; it does not die).
    point = segments.find_resume_point(str(d), None)
    assert point.next_seq > 0
