"""A hostile review of the trail's evidence (someone who can write the audit directory but
holds neither the signing key nor the data key), read by the real CLI on trails written by
a real ``AuditWriter``.

Found:

* msgpack map keys may be bytes (``strict_map_key`` lets them through): a checkpoint with
  a bytes key checked against an ``--anchor`` ended ``verify`` in a traceback, and a record
  with one was exported (as ``"b'zz'"`` in ``extra``, exit 0) though no sidecar wrote it.
  Now a header, checkpoint or seal with such a key is a frame that does not decode and a
  record with one a malformed record, for every kind and key.
* ``export`` and ``tail`` cut a segment at a declared break by the *name* the restarted
  writer's header gives it; file names are in no digest nor signature, so the damaged
  segment renamed (its order kept) was read whole -- the forged records after the break
  among them, exit 0 -- while ``verify --accept-declared-breaks`` said OK. Now the cut goes
  by position: no frame after ``after_seq`` in a segment before the declaring one is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sidecar.audit.chain import LENGTH
from sidecar.audit.segments import list_segments, read_frames, segment_name
from sidecar.audit.signing import Checkpoint, write_keypair
from tests.harness import sidecar_cli
from tests.test_audit_attacks import write


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("review5")
    priv, pub, _ = write_keypair(str(root / "k"))
    d = root / "audit"
    write(d, Path(priv), 40)
    assert len(list_segments(str(d))) >= 4
    return {"dir": d, "priv": Path(priv), "pub": Path(pub)}


def cli(*args: Any) -> tuple[int, str, str]:
    got = sidecar_cli(*map(str, args), timeout=120)
    assert "Traceback" not in got.stderr, got.stderr
    return got.returncode, got.stdout, got.stderr


def frames(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        return [p for _o, p in read_frames(fh)]


def write_frames(path: str, payloads: list[bytes]) -> None:
    Path(path).write_bytes(b"".join(LENGTH.pack(len(p)) + p for p in payloads))


def rechain(d: Path) -> None:
    """Every ``prev`` made to link again with plain SHA-256 (what needs no key)."""
    prev: bytes | None = None
    for seg in list_segments(str(d)):
        out = []
        for payload in frames(seg.path):
            frame = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            if prev is not None:
                frame["prev"] = prev
            payload = msgpack.packb(frame, use_bin_type=True)
            prev = hashlib.sha256(payload).digest()
            out.append(payload)
        write_frames(seg.path, out)


def kind_of(frame: dict[str, Any]) -> str:
    return next(k for k in ("seg", "rec", "erc", "chk", "end") if k in frame)


# ------------------------------------------------------- map keys that are not text

KINDS = ["seg", "rec", "chk", "end"]
# A bytes key of its own, and bytes spellings of the keys a reader looks up or signs.
BYTES_KEYS = [b"zz", b"sig", b"id", b"t", b"d", b""]


@pytest.mark.parametrize("key", BYTES_KEYS, ids=lambda k: repr(k))
@pytest.mark.parametrize("kind", KINDS)
def test_a_map_key_that_is_not_text(base: dict[str, Path], tmp_path: Path, kind: str,
                                    key: bytes) -> None:
    d = tmp_path / "audit"
    shutil.copytree(base["dir"], d)
    seg = list_segments(str(d))[2]
    payloads = frames(seg.path)
    decoded = [msgpack.unpackb(p, raw=False) for p in payloads]
    i = next(i for i, f in enumerate(decoded) if kind_of(f) == kind)
    frame = decoded[i]
    seq = frame["seq"]
    anchors = []
    if kind in ("chk", "end"):
        saved = Checkpoint.from_frame(seq, frame["prev"], kind, frame[kind]).to_json()
        (tmp_path / "anchor.json").write_text(json.dumps({"checkpoint": saved}))
        anchors = ["--anchor", tmp_path / "anchor.json"]
    frame[kind][key] = 1
    payloads[i] = msgpack.packb(frame, use_bin_type=True)
    write_frames(seg.path, payloads)
    rechain(d)

    for keys in ([], ["--pubkey", base["pub"]], ["--pubkey", base["pub"], *anchors]):
        code, out, _err = cli("audit", "verify", d, "-o", "json", *keys)
        doc = json.loads(out)
        assert code == 1 and not doc["ok"], (keys, doc)
        if kind == "rec":
            assert any(f["code"] == "malformed_record" and f["seq"] == seq
                       and "key, not a string" in f["message"] for f in doc["findings"]), doc
        elif not keys:  # with a key, the signature may fail first: BROKEN either way
            assert doc["broken_seq"] == seq and "not text" in doc["broken"], doc
    for command in (["export"], ["export", "--format", "csv"], ["tail", "-n", "1000"]):
        code, out, err = cli("audit", *command, d)
        assert code == 1, (command, err)
        assert "b'" not in out and "b\\'" not in out
        if kind == "rec":
            assert f"seq {seq}: malformed record" in err


# ------------------------------------------------- a declared break, the file renamed


def forge_then_restart(base: dict[str, Path], d: Path) -> str:
    """A signed record edited and forged records appended in the newest segment; a real
    writer then restarts on the directory and declares the break. Returns the damaged
    segment's path."""
    shutil.copytree(base["dir"], d)
    os.unlink(list_segments(str(d))[-1].path)  # the seal-only segment
    newest = list_segments(str(d))[-1]
    decoded = [msgpack.unpackb(p, raw=False) for p in frames(newest.path)]
    i = next(i for i, f in enumerate(decoded) if "rec" in f and f["rec"]["d"] == "deny")
    decoded[i]["rec"]["d"], decoded[i]["rec"]["st"] = "allow", 200
    payloads = [msgpack.packb(f, use_bin_type=True) for f in decoded]
    for n in range(10):
        payloads.append(msgpack.packb({"seq": decoded[-1]["seq"] + 1 + n, "prev": bytes(32),
                                       "rec": {"t": 2000.0 + n, "id": f"forged{n}",
                                               "d": "allow", "st": 200}}, use_bin_type=True))
    write_frames(newest.path, payloads)
    write(d, base["priv"], 3, start=900)
    return newest.path


def renamed_stamp(path: str, d: Path) -> None:
    os.rename(path, path[:-len("123456Z.log")] + "999999Z.log")


def renamed_seq(path: str, d: Path) -> None:
    seg = next(s for s in list_segments(str(d)) if s.path == path)
    os.rename(path, d / segment_name(seg.start_seq + 1, 1_700_000_000.0))


def renamed_both(path: str, d: Path) -> None:
    seg = next(s for s in list_segments(str(d)) if s.path == path)
    os.rename(path, d / segment_name(seg.start_seq - 1, 1_600_000_000.5))


RENAMES = {"not renamed": lambda p, d: None, "stamp changed": renamed_stamp,
           "seq changed": renamed_seq, "seq and stamp changed": renamed_both}


@pytest.mark.parametrize("rename", list(RENAMES))
def test_a_declared_break_holds_whatever_the_damaged_segment_is_named(
        base: dict[str, Path], tmp_path: Path, rename: str) -> None:
    d = tmp_path / "audit"
    damaged = forge_then_restart(base, d)
    RENAMES[rename](damaged, d)
    names = [s.name for s in list_segments(str(d))]
    assert len(names) == len(set(names)) and os.path.basename(damaged) not in names \
        or rename == "not renamed"
    code, out, _err = cli("audit", "verify", d, "--pubkey", base["pub"],
                          "--accept-declared-breaks")
    assert code == 0, out  # documented: the break is declared (and printed)
    assert "declared break" in out
    for command in (["export"], ["export", "--format", "csv"], ["tail", "-n", "1000"]):
        code, out, err = cli("audit", *command, d)
        assert code == 1 and "not in the chain" in err, (command, err)
        assert "forged" not in out, (command, out)
        lines = out.splitlines()[1:] if "csv" in command else out.splitlines()
        seqs = [int(line.split(",")[0]) if "csv" in command else json.loads(line)["seq"]
                for line in lines]
        assert len(seqs) == len(set(seqs)), seqs  # no seq given twice
        assert "r900" in out and "r902" in out
