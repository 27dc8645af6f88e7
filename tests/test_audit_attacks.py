"""Attacks on the audit trail by someone who can write the audit directory (a hostile pod).

The family is data (``ATTACKS``): each entry changes a real trail written by a real writer
with a signing key, and says whether ``verify`` catches it with the public key alone or
needs an anchor (a checkpoint copied off the pod, as ``/audit/head`` serves it). Every
member is run three ways: without any key (what the review did: re-chained trails say OK),
with ``--pubkey``, and with ``--pubkey --anchor``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import trio

from sidecar.audit.chain import GENESIS, LENGTH
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import list_segments, read_frames, segment_name, verify
from sidecar.audit.signing import Checkpoint, load_anchor, load_keyring, write_keypair
from sidecar.audit.writer import AuditWriter
from sidecar.config.audit import AuditConfig
from tests.harness import sidecar_cli, write_audit_trail

IDENT = "spiffe://td/ns/demo/sa/orders"
N_RECORDS = 60


def write(directory: Path, key: Path, n: int, start: int = 0, **cfg: object) -> AuditWriter:
    """``n`` records through a real signing writer, closed cleanly (signed seal)."""
    config = AuditConfig(path=str(directory), fsync=False, signing_key_file=str(key),
                         max_segment_bytes=1200, checkpoint_every_records=7,
                         **cfg)  # type: ignore[arg-type]
    records = (AuditRecord(time=1000.0 + i, request_id=f"r{i}",
                           decision="deny" if i % 4 else "allow", rule="r",
                           status=403 if i % 4 else 200) for i in range(start, start + n))
    writer: AuditWriter = write_audit_trail(config, records, identity=IDENT, batch=5,
                                            pause=0.001)
    return writer


@dataclass
class Trail:
    dir: Path
    pub: Path
    anchor: Path  # the newest checkpoint, saved off the pod
    priv: Path


@pytest.fixture
def trail(tmp_path: Path) -> Trail:
    priv, pub, _kid = write_keypair(str(tmp_path / "signing"))
    d = tmp_path / "audit"
    writer = write(d, Path(priv), N_RECORDS)
    assert len(list_segments(str(d))) >= 3
    checkpoint = writer.last_checkpoint
    assert checkpoint is not None and checkpoint.kind == "end"
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps({"checkpoint": checkpoint.to_json()}))
    return Trail(d, Path(pub), anchor, Path(priv))


# ------------------------------------------------------------------ the attacker's tools

Frames = list[dict]  # decoded frames of one segment


def read_trail(d: Path) -> list[tuple[str, Frames]]:
    out = []
    for seg in list_segments(str(d)):
        with open(seg.path, "rb") as fh:
            out.append((seg.path, [msgpack.unpackb(p) for _o, p in read_frames(fh)]))
    return out


def rechain(d: Path, edit: Callable[[list[tuple[str, Frames]]], None]) -> None:
    """The review's attack: change frames, then renumber and recompute every digest with
    plain SHA-256 (no key needed) and rewrite every file under matching names."""
    import hashlib

    segments = read_trail(d)
    for path, _frames in segments:
        os.unlink(path)
    edit(segments)
    seq, prev = 0, GENESIS
    for _path, frames in segments:
        out = bytearray()
        start = seq
        for f in frames:
            kind = next(k for k in ("seg", "rec", "erc", "chk", "end") if k in f)
            if kind == "seg":
                f[kind]["alg"] = "sha256"
            payload = msgpack.packb({"seq": seq, "prev": prev, kind: f[kind]})
            out += LENGTH.pack(len(payload)) + payload
            prev = hashlib.sha256(payload).digest()
            seq += 1
        (d / segment_name(start, 1_700_000_000.0 + start)).write_bytes(bytes(out))


def records_of(segments: list[tuple[str, Frames]]) -> list[tuple[Frames, int]]:
    return [(frames, i) for _p, frames in segments for i, f in enumerate(frames) if "rec" in f]


def flip_denies(segments: list[tuple[str, Frames]]) -> None:
    for frames, i in records_of(segments)[:10]:
        if frames[i]["rec"]["d"] == "deny":
            frames[i]["rec"]["d"], frames[i]["rec"]["st"] = "allow", 200


def drop_one(segments: list[tuple[str, Frames]]) -> None:
    frames, i = records_of(segments)[5]
    del frames[i]


def insert_one(segments: list[tuple[str, Frames]]) -> None:
    frames, i = records_of(segments)[5]
    frames.insert(i, {"rec": {"t": 1005.5, "id": "forged", "d": "allow"}})


def reorder(segments: list[tuple[str, Frames]]) -> None:
    (fa, ia), (fb, ib) = records_of(segments)[3], records_of(segments)[4]
    fa[ia], fb[ib] = fb[ib], fa[ia]


def strip_signatures(segments: list[tuple[str, Frames]]) -> None:
    flip_denies(segments)
    for _p, frames in segments:
        frames[:] = [f for f in frames if "chk" not in f]
        for f in frames:
            for k in ("sig", "kid", "id", "every"):
                f.get("end", {}).pop(k, None)


def keep_signed_prefix_forge_tail(segments: list[tuple[str, Frames]]) -> None:
    """Keep everything up to the first checkpoint, replace the rest by forged records."""
    path, frames = segments[0]
    first_chk = next(i for i, f in enumerate(frames) if "chk" in f)
    forged = [{"rec": {"t": 1000.0 + i, "id": f"forged{i}", "d": "allow"}} for i in range(50)]
    segments[:] = [(path, frames[:first_chk + 1] + forged)]


def edit_in_place(d: Path) -> None:
    """Change one byte of one record without re-chaining."""
    seg = list_segments(str(d))[1].path
    data = bytearray(Path(seg).read_bytes())
    data[data.index(b"deny")] = ord("D")
    Path(seg).write_bytes(bytes(data))


def delete_newest(d: Path) -> None:
    os.unlink(list_segments(str(d))[-1].path)


def delete_middle(d: Path) -> None:
    os.unlink(list_segments(str(d))[1].path)


def cut_at_frame_boundary(d: Path) -> None:
    """Cut the newest segment after its first two frames (header + one record)."""
    seg = list_segments(str(d))[-1].path
    with open(seg, "rb") as fh:
        offsets = [o for o, _p in read_frames(fh)]
    os.truncate(seg, offsets[min(2, len(offsets) - 1)])  # always drops the seal


def replay_old_segment(d: Path) -> None:
    """Copy an old segment in again under a later name (its frames replayed)."""
    old = list_segments(str(d))[0]
    newest = list_segments(str(d))[-1]
    shutil.copy(old.path, d / segment_name(newest.start_seq + 1000, 1_900_000_000.0))


@dataclass(frozen=True)
class Attack:
    name: str
    apply: Callable[[Path], None]
    needs_key: bool  # undetectable without a key (passes plain verify)
    needs_anchor: bool  # undetectable with the public key alone
    restart: bool = False  # a writer restarts on the damaged trail afterwards


ATTACKS = [
    Attack("rechain_flip_denies", lambda d: rechain(d, flip_denies), True, False),
    Attack("rechain_drop", lambda d: rechain(d, drop_one), True, False),
    Attack("rechain_insert", lambda d: rechain(d, insert_one), True, False),
    Attack("rechain_reorder", lambda d: rechain(d, reorder), True, False),
    Attack("rechain_strip_signatures", lambda d: rechain(d, strip_signatures), True, False),
    Attack("rechain_forged_tail", lambda d: rechain(d, keep_signed_prefix_forge_tail),
           True, False),
    Attack("edit_in_place", edit_in_place, False, False),
    Attack("delete_newest_segment", delete_newest, False, False),
    Attack("delete_middle_segment", delete_middle, False, False),
    Attack("replay_old_segment", replay_old_segment, False, False),
    # Frames cut from the end at a frame boundary leave a chain that links; what is left
    # after the last surviving checkpoint is a short unsigned tail, as after a crash.
    Attack("cut_at_frame_boundary", cut_at_frame_boundary, True, True),
    # ... and a writer restarting on it continues after the cut: the restart is reported
    # (unsealed) without an anchor, the reused seq is proven with one.
    Attack("cut_and_restart", cut_at_frame_boundary, True, True, restart=True),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_detected(trail: Trail, attack: Attack) -> None:
    keyring = load_keyring([str(trail.pub)])
    anchor = Checkpoint.from_json(json.loads(trail.anchor.read_text())["checkpoint"])
    assert verify(str(trail.dir), keyring=keyring, anchors=[anchor]).ok  # intact first
    attack.apply(trail.dir)
    if attack.restart:
        write(trail.dir, trail.priv, 40, start=1000)  # past the anchored seq
    plain = verify(str(trail.dir))
    signed = verify(str(trail.dir), keyring=keyring)
    anchored = verify(str(trail.dir), keyring=keyring, anchors=[anchor])
    assert plain.ok is attack.needs_key, plain
    assert signed.ok is attack.needs_anchor, signed
    assert not anchored.ok, anchored
    if attack.restart:
        assert [f.code for f in signed.findings] == ["unsealed_restart"]
        assert [f.code for f in anchored.findings if f.severity == "error"] == [] \
            and "anchor for seq" in str(anchored.broken)
    elif attack.needs_anchor:
        assert [f.code for f in anchored.findings] == ["anchor_beyond_head"]


def test_review_attack_through_the_cli(trail: Trail) -> None:
    rechain(trail.dir, flip_denies)
    plain = sidecar_cli("audit", "verify", str(trail.dir))
    assert plain.returncode == 0 and "proves nothing against someone who can write" in plain.stdout
    signed = sidecar_cli("audit", "verify", str(trail.dir), "--pubkey", str(trail.pub))
    assert signed.returncode == 1 and "BROKEN" in signed.stdout
    assert "signature does not verify" in signed.stdout


def test_intact_signed_trail_through_the_cli(trail: Trail) -> None:
    out = sidecar_cli("audit", "verify", str(trail.dir), "--pubkey", str(trail.pub),
                      "--anchor", str(trail.anchor), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] and result["assurance"] == "signature"
    assert result["records"] == N_RECORDS and result["unsigned_tail_records"] == 0
    assert result["signed_through"] == result["head_seq"] and result["anchors_matched"] == 1
    # A signed seal per segment, and a checkpoint at least every 7 records.
    assert result["checkpoints"] >= max(N_RECORDS // 7, result["segments"])
    assert result["findings"] == [] and not any("proves nothing" in n for n in result["notes"])


def test_keyring_holds_rotated_keys(tmp_path: Path) -> None:
    a_priv, a_pub, a_kid = write_keypair(str(tmp_path / "a"))
    b_priv, b_pub, b_kid = write_keypair(str(tmp_path / "b"))
    d = tmp_path / "audit"
    write(d, Path(a_priv), 10)
    write(d, Path(b_priv), 10, start=10)  # the key was rotated between two runs
    both = tmp_path / "ring.pem"
    both.write_bytes(Path(a_pub).read_bytes() + Path(b_pub).read_bytes())
    result = verify(str(d), keyring=load_keyring([str(both)]))
    assert result.ok and result.records == 20 and result.restarts == 1, result
    only_b = verify(str(d), keyring=load_keyring([b_pub]))
    assert not only_b.ok and a_kid in str(only_b.broken) and "not in the keyring" in str(only_b.broken)


@pytest.mark.parametrize("order", ["ABA", "ABCB", "ABCA"])
def test_a_rotated_out_key_that_signs_again_is_an_error(tmp_path: Path, order: str) -> None:
    """The keyring keeps rotated keys so that the segments they signed still verify. A key
    rotated out that signs again after its successor is a leaked old key: its holder
    appends (here: a real writer, restarted on the trail) or re-signs frames written after
    the rotation; or a Secret rolled back. Every run's frames verify on their own."""
    keys = {name: write_keypair(str(tmp_path / name)) for name in sorted(set(order))}
    d = tmp_path / "audit"
    for i, name in enumerate(order):
        write(d, Path(keys[name][0]), 10, start=10 * i)
    ring = tmp_path / "ring.pem"
    ring.write_bytes(b"".join(Path(pub).read_bytes() for _priv, pub, _kid in keys.values()))
    result = verify(str(d), keyring=load_keyring([str(ring)]))
    assert not result.ok and result.records == 10 * len(order), result
    found = [f for f in result.findings if f.code == "rotated_key_signed"]
    back = order[-1]
    replaced_by = order[order.index(back) + 1]
    assert len(found) == 1 and found[0].severity == "error", result.findings
    assert found[0].seq is not None and found[0].seq > 10 * (len(order) - 1)
    assert keys[back][2] in found[0].message and keys[replaced_by][2] in found[0].message
    # Only the key's return: everything else about the trail is intact.
    assert [f.code for f in result.findings if f.severity == "error"] == ["rotated_key_signed"]
    out = sidecar_cli("audit", "verify", str(d), "--pubkey", str(ring))
    assert out.returncode == 1 and "rotated_key_signed" in out.stdout, out.stdout + out.stderr
    # Rotating forward only (the runs before the return) verifies.
    forward = tmp_path / "forward"
    for i, name in enumerate(order[:-1]):
        write(forward, Path(keys[name][0]), 10, start=10 * i)
    assert verify(str(forward), keyring=load_keyring([str(ring)])).ok


def test_a_trail_cut_back_to_before_a_rotation_and_continued_with_the_old_key(
        tmp_path: Path) -> None:
    """The successor's signatures deleted with its segments, the old key signs on: nothing
    in the trail shows it (docs/audit.md says so); an anchor saved after the rotation does."""
    a_priv, a_pub, _ = write_keypair(str(tmp_path / "a"))
    b_priv, b_pub, _ = write_keypair(str(tmp_path / "b"))
    d = tmp_path / "audit"
    write(d, Path(a_priv), 10)
    before = {s.path for s in list_segments(str(d))}
    checkpoint = write(d, Path(b_priv), 10, start=10).last_checkpoint
    assert checkpoint is not None
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps({"checkpoint": checkpoint.to_json()}))
    for seg in list_segments(str(d)):
        if seg.path not in before:
            os.unlink(seg.path)
    write(d, Path(a_priv), 10, start=10)
    ring = load_keyring([a_pub, b_pub])
    assert verify(str(d), keyring=ring).ok  # it looks like key A was never rotated
    anchored = verify(str(d), keyring=ring, anchors=[load_anchor(str(anchor))])
    assert not anchored.ok, anchored


def test_unsigned_tail_reported_and_timer_checkpoint(tmp_path: Path) -> None:
    priv, pub, _ = write_keypair(str(tmp_path / "k"))
    d = tmp_path / "audit"
    config = AuditConfig(path=str(d), fsync=False, signing_key_file=priv,
                         checkpoint_every_records=1000, checkpoint_every_seconds=0.05)
    writer = AuditWriter(config, identity=IDENT)
    keyring = load_keyring([pub])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(5):
                writer.submit(AuditRecord(time=float(i), request_id=f"r{i}"))
            with trio.fail_after(10):
                while writer.statistics().written < 5:
                    await trio.sleep(0.005)
            # The writer is running: the records may not be signed yet (nothing proven).
            mid = verify(str(d), keyring=keyring)
            assert mid.ok or [f.code for f in mid.findings] == ["nothing_signed"]
            # The timer signs them without any further record.
            with trio.fail_after(10):
                while (cp := writer.last_checkpoint) is None or cp.seq < 6:
                    await trio.sleep(0.01)
            after = verify(str(d), keyring=keyring)
            assert after.ok and after.unsigned_tail_records == 0 and after.checkpoints >= 1
            nursery.cancel_scope.cancel()  # a crash: no seal

    trio.run(main)
    result = verify(str(d), keyring=keyring)
    assert result.ok and not result.sealed and result.records == 5
    assert result.signed_through == result.head_seq and result.unsigned_tail_records == 0


def test_keygen_cli_never_overwrites(tmp_path: Path) -> None:
    prefix = str(tmp_path / "sig")
    out = sidecar_cli("audit", "keygen", prefix)
    assert out.returncode == 0 and "key id:" in out.stdout
    assert oct(os.stat(prefix + ".key").st_mode & 0o777) == "0o600"
    again = sidecar_cli("audit", "keygen", prefix)
    assert again.returncode == 2 and "error:" in again.stderr


def test_signing_key_problems_fail_at_start(tmp_path: Path) -> None:
    from sidecar.errors import ConfigError

    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="signing_key_file"):
        AuditWriter(AuditConfig(path=str(tmp_path / "a"), signing_key_file=str(bad)))
    with pytest.raises(ConfigError, match="signing_key_file"):
        AuditWriter(AuditConfig(path=str(tmp_path / "a"), signing_key_file=str(tmp_path / "no")))


def test_deleting_what_was_written_after_a_clean_shutdown(tmp_path: Path) -> None:
    """What is and is not detected when the newest segments are deleted. The newest
    segment, when the one before it was sealed for rotation: detected by every check
    (rotation_without_successor). Every segment written after a clean shutdown (the seal
    says `shutdown`): the trail left is exactly that of a sidecar that stopped there, so
    neither the chain nor the signatures can tell; only an anchor newer than the shutdown
    (or the collector's copy) can."""
    priv, pub, _ = write_keypair(str(tmp_path / "k"))
    d = tmp_path / "audit"
    first = write(d, Path(priv), 30)
    run1 = {s.path for s in list_segments(str(d))}
    second = write(d, Path(priv), 30, start=30)  # restarts after the clean shutdown
    assert first.last_checkpoint is not None and second.last_checkpoint is not None
    old_anchor, new_anchor = first.last_checkpoint, second.last_checkpoint
    assert old_anchor.kind == "end" and old_anchor.fields["why"] == "shutdown"
    keyring = load_keyring([pub])
    run2 = [s for s in list_segments(str(d)) if s.path not in run1]
    assert len(run2) >= 2  # run 2 rotated

    # The newest segment alone: its predecessor was sealed for rotation -> detected.
    newest = Path(run2[-1].path)
    saved = newest.read_bytes()
    newest.unlink()
    for result in (verify(str(d)), verify(str(d), keyring=keyring)):
        assert not result.ok
        assert [f.code for f in result.errors] == ["rotation_without_successor"]
    newest.write_bytes(saved)

    # Every segment of run 2: what is left ends with a shutdown seal -> not detected ...
    for seg in run2:
        os.unlink(seg.path)
    assert verify(str(d)).ok
    signed = verify(str(d), keyring=keyring)
    assert signed.ok and signed.sealed and signed.findings == []
    # ... not by an anchor from before it either ...
    assert verify(str(d), keyring=keyring, anchors=[old_anchor]).ok
    # ... only by an anchor newer than the shutdown.
    anchored = verify(str(d), keyring=keyring, anchors=[new_anchor])
    assert not anchored.ok and [f.code for f in anchored.errors] == ["anchor_beyond_head"]


# A history forged in place of the whole trail (written by a writer without the key), then
# signed over by the real writer when it restarts: it continues after the last frame it finds
# and cannot tell a forged tail from its own crashed run's. Found by a hostile review: with
# the records before the first signature unbounded, verify --pubkey said OK. (name, the
# forger's writer settings, whether its last frame -- an unsigned seal -- is cut away)
FORGED_HISTORIES = {
    "from_seq_0_sealed": ({}, False),
    "from_seq_0_crashed": ({}, True),
    # Its oldest segments deleted by its own retention: the chain starts past the anchor.
    "retention_past_the_anchor": ({"max_segments": 3}, False),
}


@pytest.mark.parametrize("variant", sorted(FORGED_HISTORIES))
def test_a_forged_history_a_restarted_writer_signed_over_is_not_proven(
        trail: Trail, variant: str) -> None:
    settings, cut = FORGED_HISTORIES[variant]
    keyring = load_keyring([str(trail.pub)])
    anchor = Checkpoint.from_json(json.loads(trail.anchor.read_text())["checkpoint"])
    shutil.rmtree(trail.dir)
    forged = (AuditRecord(time=1000.0 + i / 10, request_id=f"f{i}", decision="allow", rule="r",
                          status=200) for i in range(300))
    write_audit_trail(AuditConfig(path=str(trail.dir), fsync=False, max_segment_bytes=2000,
                                  **settings),  # type: ignore[arg-type]
                      forged, identity=IDENT, batch=5, pause=0.001)
    if cut:
        newest = list_segments(str(trail.dir))[-1].path
        with open(newest, "rb") as fh:
            offsets = [o for o, _p in read_frames(fh)]
        os.truncate(newest, offsets[-1])  # the unsigned seal
    write(trail.dir, trail.priv, 20, start=2000)  # the real writer restarts: signs over it
    assert verify(str(trail.dir)).ok  # the links hold
    signed = verify(str(trail.dir), keyring=keyring)
    assert not signed.ok and "unsigned_start" in [f.code for f in signed.errors], signed
    assert not verify(str(trail.dir), keyring=keyring, anchors=[anchor]).ok
    # Said to be a trail that ran before signing was configured: a warning, nothing proven.
    accepted = verify(str(trail.dir), keyring=keyring, accept_unsigned_start=True)
    assert accepted.ok and "unsigned_start" in [f.code for f in accepted.findings], accepted
    out = sidecar_cli("audit", "verify", str(trail.dir), "--pubkey", str(trail.pub))
    assert out.returncode == 1 and "before the first signed checkpoint" in out.stdout
    out = sidecar_cli("audit", "verify", str(trail.dir), "--pubkey", str(trail.pub),
                      "--accept-unsigned-start")
    assert out.returncode == 0, out.stdout


def test_a_trail_signed_from_its_start_has_no_unsigned_start(tmp_path: Path) -> None:
    # The control: a writer with the key from the first record, crashing before its first
    # checkpoint and restarting, leaves no more records unsigned than it signs over.
    priv, pub, _ = write_keypair(str(tmp_path / "k"))
    d = tmp_path / "audit"
    write(d, Path(priv), 5)
    newest = list_segments(str(d))[-1].path
    with open(newest, "rb") as fh:
        offsets = [o for o, _p in read_frames(fh)]
    os.truncate(newest, offsets[-1])
    write(d, Path(priv), 30, start=5)
    result = verify(str(d), keyring=load_keyring([pub]))
    assert result.ok and "unsigned_start" not in [f.code for f in result.findings], result


# The seqs the forged frames after the damage claim, from the last good frame's: after it
# (the first review), and -- found by the twenty-fifth session's review: the readers cut by
# the seq a frame claims, so these were exported -- seqs already in the chain, the last
# good one's, and going down.
FORGED_SEQS = {
    "after": lambda last, i: last + 1 + i,
    "low": lambda last, i: 3 + i,
    "the-last-good": lambda last, i: last,
    "descending": lambda last, i: last - 1 - i,
}


@pytest.mark.parametrize("edit", [True, False], ids=["edited", "not-edited"])
@pytest.mark.parametrize("forged_seq", list(FORGED_SEQS))
def test_export_stops_at_a_break_the_writer_declared(trail: Trail, forged_seq: str,
                                                      edit: bool) -> None:
    # A signed record edited in place (deny -> allow) and forged records after it; the
    # restarted writer goes on from the last frame that chains and declares the break.
    # verify --accept-declared-breaks checks the chain without those frames, and export
    # gave them all, the edited one among them (found by a hostile review).
    os.unlink(list_segments(str(trail.dir))[-1].path)  # the seal-only segment
    newest = list_segments(str(trail.dir))[-1]
    with open(newest.path, "rb") as fh:
        frames = [msgpack.unpackb(p) for _o, p in read_frames(fh)]
    idx = next(i for i, f in enumerate(frames) if "rec" in f and f["rec"]["d"] == "deny")
    edited = frames[idx]["rec"]["id"]
    if edit:
        frames[idx]["rec"]["d"], frames[idx]["rec"]["st"] = "allow", 200
    elif "end" in frames[-1]:
        frames.pop()  # cut as a crash leaves it: the forged frames follow the last good one
    out = bytearray()
    for f in frames:
        payload = msgpack.packb(f, use_bin_type=True)
        out += LENGTH.pack(len(payload)) + payload
    for i in range(10):
        seq = FORGED_SEQS[forged_seq](frames[-1]["seq"], i)
        payload = msgpack.packb({"seq": seq, "prev": bytes(32), "rec": {
            "t": 2000.0 + i, "id": f"forged{i}", "d": "allow", "st": 200}}, use_bin_type=True)
        out += LENGTH.pack(len(payload)) + payload
    Path(newest.path).write_bytes(bytes(out))
    write(trail.dir, trail.priv, 3, start=900)  # restarts, declares the break, signs
    keyring = load_keyring([str(trail.pub)])
    assert not verify(str(trail.dir), keyring=keyring).ok
    assert verify(str(trail.dir), keyring=keyring, accept_declared_breaks=True).ok
    got = sidecar_cli("audit", "export", str(trail.dir))
    assert got.returncode == 1 and "not in the chain" in got.stderr, got.stderr
    ids = [json.loads(line)["request_id"] for line in got.stdout.splitlines()]
    assert not any(i.startswith("forged") for i in ids), ids
    assert len(ids) == len(set(ids))  # no seq given twice
    assert {"r900", "r901", "r902"} <= set(ids)
    # The edited frame itself links to the one before it, so the chain the writer went on
    # from holds it: the break is where the frame after it stops linking. What proves it
    # then is only the restarted writer's checkpoint over what it found -- why verify
    # without --accept-declared-breaks says BROKEN, and docs/audit.md says so.
    assert edited in ids
    tailed = sidecar_cli("audit", "tail", str(trail.dir), "-n", "1000")
    assert tailed.returncode == 1 and "not in the chain" in tailed.stderr, tailed.stderr
    tail_ids = [json.loads(line)["request_id"] for line in tailed.stdout.splitlines()]
    assert tail_ids == ids


OTHER_IDENT = "spiffe://td/ns/demo/sa/payments"


def _written_as(directory: Path, key: Path, n: int, identity: str, **cfg: object) -> AuditWriter:
    config = AuditConfig(path=str(directory), fsync=False, signing_key_file=str(key),
                         max_segment_bytes=1200, checkpoint_every_records=7,
                         **cfg)  # type: ignore[arg-type]
    records = (AuditRecord(time=1000.0 + i, request_id=f"r{i}", decision="allow", rule="r",
                           status=200) for i in range(n))
    return write_audit_trail(config, records, identity=identity, batch=5, pause=0.001)


@pytest.mark.parametrize("where", ["older than the retained chain", "inside the chain",
                                   "beyond the head"])
def test_another_sidecars_anchor_proves_nothing_wherever_its_seq_falls(tmp_path: Path,
                                                                      where: str) -> None:
    """One signing key shared by two sidecars (one per namespace, say) signs both trails'
    checkpoints. Another sidecar's anchor given to ``verify`` is ``anchor_other_identity``
    wherever its seq falls; before the twenty-sixth session one older than the retained
    chain passed as honest retention (exit 0; found by a hostile review). With ``--id`` it
    is ``wrong_identity``, and the trail is not said to name two identities."""
    priv, pub, _ = write_keypair(str(tmp_path / "shared"))
    ours, theirs = tmp_path / "orders", tmp_path / "payments"
    n_theirs = {"older than the retained chain": 20, "inside the chain": 80,
                "beyond the head": 400}[where]
    anchor_cp = _written_as(theirs, Path(priv), n_theirs, OTHER_IDENT).last_checkpoint
    assert anchor_cp is not None
    _written_as(ours, Path(priv), 200, IDENT, max_segments=3)
    ring = load_keyring([pub])
    anchor_file = tmp_path / "anchor.json"
    anchor_file.write_text(json.dumps({"checkpoint": anchor_cp.to_json()}))
    anchor = load_anchor(str(anchor_file))
    result = verify(str(ours), keyring=ring, anchors=[anchor])
    codes = [f.code for f in result.findings if f.severity == "error"]
    assert not result.ok and "anchor_other_identity" in codes, result.findings
    assert result.identities == [IDENT]
    with_id = verify(str(ours), keyring=ring, anchors=[anchor], identity=IDENT)
    codes = [f.code for f in with_id.findings]
    assert not with_id.ok and "wrong_identity" in codes and "several_identities" not in codes
    own = verify(str(ours), keyring=ring)  # the trail alone is fine
    assert own.ok, own.findings
