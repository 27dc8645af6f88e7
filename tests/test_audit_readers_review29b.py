"""The readers' link checks and verify, after the hostile review of this session's audit
fixes (the twenty-ninth session, review of e65e056).

Families, each on trails from the real writer (``write_audit_trail``) or a real sidecar
(signing, encrypting, shipping to a real rsyslog: format 3), read through the real CLI
(``verify``, ``export``, ``tail``, ``policy replay``):

* ``SWITCH``: one segment header's ``alg`` switched (SHA-256 <-> HMAC; the first, a middle
  or the newest segment) and a record in that segment edited in place (format 1), or a
  whole encrypted group replaced by clear records (format 3): the readers took the switch
  for a writer given an HMAC key at a restart, stopped checking links and showed the
  forgery, exit 0, while verify said BROKEN. Now a switch is damage to them too.
* ``CLAIM``: every header claims HMAC over a SHA-256 chain and a record is forged (the
  frame right after the first header, a middle deny, the newest record): ``verify
  --pubkey`` said "cannot run" (exit 2) and the readers showed the forgery, exit 0. A link
  that is plain SHA-256 under an HMAC claim is proof without the key: BROKEN, damage.
* ``CUT``: the record of the last good frame before damage -- a torn frame after a crash
  (the real writer restarts and declares the break), a frame torn in an older segment, a
  segment cut at a frame boundary and the next one deleted -- edited in place: the readers
  gave the records of that frame out unchecked. Now the header after damage is checked
  against it when it continues it; otherwise the records are dropped and said.
* ``BIGSEQ``: a planted header at seq 2**63-1: the real writer, started three times, never
  forks its own chain (each run's records stay in what export shows).
* ``DATAKEY``: an honest encrypted trail checked with a data key of another key id: exit 2
  (give the key), not BROKEN; a tampered one stays BROKEN.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.test_audit_walk_review29 as walk
from sidecar.audit.crypto import Encryptor, load_data_key, write_data_key
from sidecar.audit.segments import (
    MAX_RESUME_SEQ,
    SegmentDamage,
    find_resume_point,
    list_segments,
    read_frames,
    segment_name,
)
from tests.test_audit_erc_links_review29 import RealTrail, _build
from tests.test_audit_ship import ORDERS
from tests.test_audit_walk_review29 import (
    DAMAGE,
    Keys,
    allow_none,
    cli_many,
    pack,
    payloads,
    run,
    shown,
    unpack,
    verify,
    write,
    write_frames,
)

# The real writer's trails of the F5/F6 families (plain, HMAC, format-1 encrypted), shared.
keys = walk.keys
reader_trails = walk.reader_trails

RECORD = ("rec", "erc")
# segments.HIGH_SEQ, spelled out: a seq no writer reaches from seq 0.
HIGH_SEQ = 2**62


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealTrail]:
    """A real sidecar's trail: signed, encrypted, shipped (format 3, groups of records)."""
    yield _build(tmp_path_factory.mktemp("review29b-shipped"))


def kind(frame: dict[str, Any]) -> str:
    return next(k for k in ("seg", "rec", "erc", "chk", "end") if k in frame)


def forge(keys: Keys, frame: dict[str, Any], tag: str) -> dict[str, Any]:
    """The record of a format-1 frame (clear or encrypted) edited in place to an allow with
    request id ``tag`` (encrypted again with the data key); nothing re-chained."""
    from sidecar.audit.crypto import Decryptor

    dk = load_data_key(keys.data)
    if "rec" in frame:
        frame["rec"].update(d="allow", st=200, id=tag)
        return frame
    # (format 1: the aad is the seq only, so the header is not needed to decrypt)
    wire = Decryptor([dk]).record(frame["seq"], frame["erc"], {"enc": {"kid": Encryptor(dk).kid}})
    wire.update(d="allow", st=200, id=tag)
    import msgpack

    frame["erc"] = msgpack.unpackb(Encryptor(dk).bodies(frame["seq"], [pack(wire)])[0], raw=False)
    return frame


def record_index(frames: list[dict[str, Any]], where: str) -> int:
    """The index of a record frame: the first after the header, a middle one, the last."""
    idx = [i for i, f in enumerate(frames) if kind(f) in RECORD]
    return {"first_record": idx[0], "middle": idx[len(idx) // 2], "newest": idx[-1]}[where]


def flip(frame: dict[str, Any], to: str | None = None) -> None:
    """A header's ``alg`` switched (to ``to``, or to the other one)."""
    alg = frame["seg"]["alg"]
    frame["seg"]["alg"] = to or ("sha256" if alg == "hmac-sha256" else "hmac-sha256")


def whole_frames(path: str) -> list[bytes]:
    """The payloads of a segment's whole frames, up to any damage."""
    out: list[bytes] = []
    try:
        with open(path, "rb") as fh:
            out.extend(p for _o, p in read_frames(fh))
    except SegmentDamage:
        pass
    return out


def segment_with_records(d: Path, where: str) -> str:
    segs = [s.path for s in list_segments(str(d))
            if any(kind(unpack(p)) in RECORD for p in payloads(s.path))]
    return {"first": segs[0], "middle": segs[len(segs) // 2], "newest": segs[-1]}[where]


def readers(d: Path, tmp: Path, data: list[str]) -> dict[str, tuple[int, str, str]]:
    """export, tail and policy replay over ``d`` (``walk.cli_many``: in this process)."""
    jobs = {
        "export": ["audit", "export", str(d), *data],
        "tail": ["audit", "tail", str(d), "-n", "1000", *data],
        "policy replay": ["policy", "replay", str(allow_none(tmp)), "--audit", str(d),
                          "--identity", ORDERS, *data],
    }
    out = {}
    for name, r in zip(jobs, cli_many(jobs.values()), strict=True):
        assert "Traceback" not in r.stderr, r.stderr
        out[name] = (r.returncode, r.stdout, r.stderr)
    return out


def assert_hidden(got: dict[str, tuple[int, str, str]], tag: str, words: tuple[str, ...]) -> None:
    """Every reader: the exit code for damage, the forged record never shown, and why."""
    for name, (code, out, err) in got.items():
        assert code == DAMAGE[name], (name, code, err)
        assert tag not in out, (name, out)
        assert any(w in err for w in words), (name, err)


# ------------------------------------------------------ SWITCH: one header's alg switched

SWITCH_WORDS = ("says alg", "links are SHA-256", "does not chain")


@pytest.mark.parametrize("where", ["first", "middle", "newest"])
@pytest.mark.parametrize("variant", ["plain", "hmac", "enc1"])
def test_alg_switch_is_damage_to_the_readers(keys: Keys, reader_trails: Callable[[str], Path],
                                             tmp_path: Path, variant: str, where: str) -> None:
    """Finding 1: one segment's header alg switched, a deny of it edited in place: verify
    BROKEN, every reader damage, the edit never shown (before: a note, exit 0)."""
    d = tmp_path / "audit"
    shutil.copytree(reader_trails(variant), d)
    seg = segment_with_records(d, where)
    frames = [unpack(p) for p in payloads(seg)]
    flip(frames[0])
    i = record_index(frames, "middle")
    frames[i] = forge(keys, frames[i], "forged-switch")
    write_frames(seg, [pack(f) for f in frames])
    data = ["--data-key", keys.data] if variant == "enc1" else []
    assert_hidden(readers(d, tmp_path, data), "forged-switch", SWITCH_WORDS)
    hmac = ["--hmac-key-file", keys.hmac] if variant == "hmac" else []
    for args in (["--pubkey", keys.pub, *hmac, *data], [*hmac]):
        [(code, doc, _)] = run(verify(d, *args))
        assert code == 1 and isinstance(doc, dict) and doc["broken"], (args, doc)


def replace_group(trail_audit: Path, seg: str, tag: str) -> None:
    """The first encrypted group of a format-3 segment replaced by clear records (same seqs
    and prevs), one of them a forged allow."""
    frames = [unpack(p) for p in payloads(seg)]
    start = next(i for i, f in enumerate(frames) if "erc" in f)
    end = next(i for i in range(start, len(frames)) if "erc" in frames[i] and "c" in frames[i]["erc"])
    for k, i in enumerate(range(start, end + 1)):
        rec = {"t": time.time(), "ev": "request", "id": f"{tag}-{k}", "dir": "inbound",
               "peer": "spiffe://demo.local/ns/demo/sa/frontend", "src": "127.0.0.1", "m": "GET",
               "host": "orders", "path": "/admin", "d": "allow", "rule": "reads",
               "why": "allowed", "st": 200, "bi": 0, "bo": 2, "ms": 0.5,
               "x": {"service": ORDERS, "port": 8080}}
        frames[i] = {"seq": frames[i]["seq"], "prev": frames[i]["prev"],
                     "rec": json.dumps(rec, separators=(",", ":"))}
    write_frames(seg, [pack(f) for f in frames])


@pytest.mark.parametrize("where", ["first", "middle", "newest"])
def test_alg_switch_is_damage_format3(shipped: RealTrail, tmp_path: Path, where: str) -> None:
    """Finding 1, encrypted format 3 (a real sidecar): a header switched to HMAC and a group
    replaced by clear records: ``--data-key`` readers showed them, exit 0."""
    d = tmp_path / "audit"
    shutil.copytree(shipped.audit, d)
    seg = segment_with_records(d, where)
    frames = [unpack(p) for p in payloads(seg)]
    flip(frames[0], "hmac-sha256")
    write_frames(seg, [pack(f) for f in frames])
    replace_group(d, seg, "forged-grp")
    data = ["--data-key", shipped.data]
    assert_hidden(readers(d, tmp_path, data), "forged-grp", SWITCH_WORDS)
    [(code, doc, _)] = run(verify(d, "--pubkey", shipped.pub, *data))
    assert code == 1 and isinstance(doc, dict) and doc["broken"], doc


# ------------------------------------------------ CLAIM: every header claims HMAC, SHA links

CLAIM_WORDS = ("links are SHA-256",)


def claim_all(d: Path, keys: Keys | None, where: str, shipped_trail: bool) -> str:
    """Every header of ``d`` flipped to HMAC and one record forged (format 1: a record
    edited in place; format 3: a group replaced by clear records)."""
    target = segment_with_records(d, "newest" if where == "newest" else "first")
    for s in list_segments(str(d)):
        frames = [unpack(p) for p in payloads(s.path)]
        flip(frames[0], "hmac-sha256")
        if s.path == target and not shipped_trail:
            assert keys is not None
            i = record_index(frames, where)
            frames[i] = forge(keys, frames[i], "forged-claim")
        write_frames(s.path, [pack(f) for f in frames])
    if shipped_trail:
        replace_group(d, target, "forged-claim")
    return "forged-claim"


@pytest.mark.parametrize("where", ["first_record", "middle", "newest"])
@pytest.mark.parametrize("variant", ["plain", "enc1", "format3"])
def test_hmac_claim_over_sha256_links_is_broken(
        keys: Keys, reader_trails: Callable[[str], Path], shipped: RealTrail, tmp_path: Path,
        variant: str, where: str) -> None:
    """Finding 2: every header flipped to HMAC, a record forged (right after the first
    header too, where its own successor's prev does not give it away): verify, with
    ``--pubkey`` or no key, BROKEN (before: exit 2, "cannot run"); every reader damage."""
    d = tmp_path / "audit"
    shutil.copytree(shipped.audit if variant == "format3" else reader_trails(variant), d)
    tag = claim_all(d, keys, where, variant == "format3")
    data = ["--data-key", shipped.data if variant == "format3" else keys.data] \
        if variant != "plain" else []
    assert_hidden(readers(d, tmp_path, data), tag, CLAIM_WORDS)
    pub = shipped.pub if variant == "format3" else keys.pub
    for args in (["--pubkey", pub], ["--pubkey", pub, *data], []):
        [(code, doc, err)] = run(verify(d, *args))
        assert code == 1 and isinstance(doc, dict), (args, code, err)
        assert "links are SHA-256" in doc["broken"], (args, doc["broken"])


def test_honest_hmac_trail_still_needs_its_key(keys: Keys,
                                              reader_trails: Callable[[str], Path]) -> None:
    """The control: an honest HMAC trail checked without its key is exit 2 ("cannot run"),
    with or without ``--pubkey``; with it, OK."""
    d = reader_trails("hmac")
    for args, want in (([], 2), (["--pubkey", keys.pub], 2),
                       (["--pubkey", keys.pub, "--hmac-key-file", keys.hmac], 0)):
        [(code, _doc, err)] = run(verify(d, *args))
        assert code == want, (args, code, err)
        if want == 2:
            assert "an HMAC key is needed" in err, err


# ------------------------------------------------ CUT: the last good frame before damage

CUTS = ("torn_then_restart", "torn_old_segment", "cut_and_segment_deleted")


def cut_trail(keys: Keys, audit: Path, variant: str, cut: str) -> tuple[str, int]:
    """A trail of the real writer with ``cut`` made honestly (what a crash or a lost file
    leaves); the segment and the index of the last good frame, a record frame."""
    if cut == "torn_then_restart":
        write(keys, audit, variant, 23, max_segment_bytes=4096)
        seg = list_segments(str(audit))[-1].path
        frames = payloads(seg)
        last = max(i for i, p in enumerate(frames) if kind(unpack(p)) in RECORD)
        # A crash: the frames after the last record never written, a frame torn after it.
        write_frames(seg, frames[:last + 1])
        with open(seg, "ab") as fh:
            fh.write(b"\x00\x00\x01\x00\x83\xa3seq")
        write(keys, audit, variant, 7, start=100, max_segment_bytes=4096)  # restart: a break
        return seg, last
    write(keys, audit, variant, 60, max_segment_bytes=2048)
    segs = list_segments(str(audit))
    assert len(segs) >= 4
    seg = segs[1].path
    frames = payloads(seg)
    last = max(i for i, p in enumerate(frames[:-1]) if kind(unpack(p)) in RECORD)
    if cut == "torn_old_segment":  # bit rot in an older segment: the frame after it torn
        data = b"".join(len(p).to_bytes(4, "big") + p for p in frames[:last + 2])
        Path(seg).write_bytes(data[:-5])
    else:  # its end cut at a frame boundary (seal and all) and the next segment deleted
        write_frames(seg, frames[:last + 1])
        Path(segs[2].path).unlink()
    return seg, last


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("variant", ["plain", "enc1"])
def test_last_good_frame_before_damage_is_checked(keys: Keys, tmp_path: Path, variant: str,
                                                  cut: str) -> None:
    """Finding 3: the record of the last good frame before damage edited in place is never
    shown; on the honest trail it is shown when the next header links to it (a crash the
    writer declared) and said to be not shown otherwise."""
    honest = tmp_path / "honest"
    seg, last = cut_trail(keys, honest, variant, cut)
    forged = tmp_path / "forged"
    shutil.copytree(honest, forged)
    fseg = forged / Path(seg).name
    data = Path(fseg).read_bytes()
    frames = whole_frames(str(fseg))
    edited = pack(forge(keys, unpack(frames[last]), "forged-cut"))
    head = b"".join(len(p).to_bytes(4, "big") + p for p in frames[:last])
    tail = data[len(head) + 4 + len(frames[last]):]
    Path(fseg).write_bytes(head + len(edited).to_bytes(4, "big") + edited + tail)
    dk = ["--data-key", keys.data] if variant == "enc1" else []
    good = readers(honest, tmp_path, dk)
    got = readers(forged, tmp_path, dk)
    original = unpack(frames[last])
    seq = original["seq"]
    for name, (code, out, err) in got.items():
        assert code == DAMAGE[name], (name, code, err)
        assert "forged-cut" not in out, (name, out)
    if cut == "torn_then_restart":
        # (the restart header links to it: the honest record is shown, as before)
        assert any(r["seq"] == seq for r in shown(good["export"][1]))
        assert "does not chain" in got["export"][2], got["export"][2]
    else:
        assert all(r["seq"] != seq for r in shown(good["export"][1]))
        assert f"the records of seq {seq} are not shown" in good["export"][2], good["export"][2]
    for name, (code, _out, err) in good.items():
        assert code == DAMAGE[name], (name, code, err)
    [(code, _doc, _)] = run(verify(forged, "--pubkey", keys.pub, "--accept-declared-breaks", *dk))
    assert code == 1


# ---------------------------------------------------------- BIGSEQ: no fork at the bound


# Planted header seqs: at and just under the bound (the writer resumed there and wrote past
# it), above HIGH_SEQ (a jump no writer makes), and just under HIGH_SEQ (a control: taken,
# and the writer's frames past HIGH_SEQ continue it, so it stays there without a fork).
NEAR = {"bound-1": MAX_RESUME_SEQ - 1, "bound-2": MAX_RESUME_SEQ - 2,
        "bound-5": MAX_RESUME_SEQ - 5, "high+3": HIGH_SEQ + 3, "high-2": HIGH_SEQ - 2}


@pytest.mark.parametrize("alone", [False, True], ids=["after_a_trail", "alone"])
@pytest.mark.parametrize("planted", list(NEAR))
def test_planted_header_near_the_bound_never_forks(keys: Keys, tmp_path: Path, planted: str,
                                                   alone: bool) -> None:
    """Finding 4: a header planted at 2**63-1 (or a few under it): the writer resumed after
    it, wrote seqs its next start refused, and forked from the planted frame again, every
    start (each run's records cut out). Now such a frame is no resume point unless its
    segments continue back to a header below HIGH_SEQ: four runs, every record shown, no
    seq at or above the bound written."""
    audit = tmp_path / "audit"
    audit.mkdir()
    runs = [(0, 4), (100, 3), (200, 3), (300, 3)]
    if not alone:
        write(keys, audit, "plain", 4)
    seq = NEAR[planted]
    path = audit / segment_name(seq, time.time())
    write_frames(path, [pack({"seq": seq, "prev": bytes(32), "seg": {
        "v": 1, "alg": "sha256", "created": time.time(), "retention": "all"}})])
    for start, n in runs[1:]:
        write(keys, audit, "plain", n, start=start)
        rp = find_resume_point(str(audit), None)
        if seq >= HIGH_SEQ:
            assert rp.next_seq < 1000 and rp.damaged_segment == path.name, rp
        else:
            assert rp.damage is None and rp.next_seq > seq, rp
    [r] = cli_many([["audit", "export", str(audit)]])
    ids = {rec["request_id"] for rec in shown(r.stdout)}
    want = {f"rq{i:05d}" for start, n in runs[(1 if alone else 0):] for i in range(start, start + n)}
    assert want <= ids, (sorted(want - ids), r.stderr)
    for s in list_segments(str(audit)):
        assert all(unpack(p)["seq"] < MAX_RESUME_SEQ - 1 for p in payloads(s.path)
                   if s.name != path.name)


# -------------------------------------------------- DATAKEY: a key of another key id


@pytest.mark.parametrize("variant", ["enc1", "format3"])
def test_data_key_of_another_id_is_missing_not_broken(
        keys: Keys, reader_trails: Callable[[str], Path], shipped: RealTrail, tmp_path: Path,
        variant: str) -> None:
    """Finding 5: an honest encrypted trail checked with only a data key of another key id
    is exit 2 naming the key id needed (it was BROKEN, exit 1); with the right key too, OK;
    a tampered copy checked with the other key stays BROKEN."""
    other = str(tmp_path / "other.data")
    write_data_key(other)
    d = shipped.audit if variant == "format3" else reader_trails("enc1")
    pub, right = (shipped.pub, shipped.data) if variant == "format3" else (keys.pub, keys.data)
    kid = Encryptor(load_data_key(right)).kid
    [(code, _doc, err), (ok, doc, _)] = run(
        verify(d, "--pubkey", pub, "--data-key", other),
        verify(d, "--pubkey", pub, "--data-key", other, "--data-key", right))
    assert code == 2 and f"give the data key for key id '{kid}'" in err, (code, err)
    assert ok == 0, doc
    forged = tmp_path / "forged"
    shutil.copytree(d, forged)
    seg = segment_with_records(forged, "middle")
    frames = [unpack(p) for p in payloads(seg)]
    i = record_index(frames, "middle")
    frames[i + 1]["prev"] = bytes(32)  # a link broken: tampering, whatever the keys
    write_frames(seg, [pack(f) for f in frames])
    [(code, doc, err)] = run(verify(forged, "--pubkey", pub, "--data-key", other))
    assert code == 1 and isinstance(doc, dict) and doc["broken"], (code, err)
