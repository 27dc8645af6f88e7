"""A hostile review of the trail's evidence (someone who can write the audit directory but
holds neither the signing key nor the data key), read by the real CLI on trails written by
a real ``AuditWriter``.

Found:

* msgpack map keys may be bytes (``strict_map_key`` lets them through): a checkpoint with
  a bytes key checked against an ``--anchor`` ended ``verify`` in a traceback, and a record
  with one was exported (as ``"b'zz'"`` in ``extra``, exit 0) though no sidecar wrote it.
  Now a header, checkpoint or seal with such a key is a frame that does not decode and a
  record with one a malformed record, for every kind and key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sidecar.audit.chain import LENGTH
from sidecar.audit.segments import list_segments, read_frames
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
