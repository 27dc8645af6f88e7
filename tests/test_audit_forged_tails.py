"""Forged tails that a real writer then continues, and segments appended after a shutdown.

Found by a hostile review. An attacker who can write the audit directory (no key) can
append records after the last signed checkpoint; a writer that restarts (a crash, a
rollout) continues after the last frame it finds and signs a checkpoint right after its
header, so its signature then covers the forged records. Without a bound on that stretch,
any number of forged records came out signed (``verify --pubkey``: OK, one warning).
A writer signs every N records (``every``), so more than N records between two verified
signatures is ``unsigned_gap_too_long``. A segment appended after a shutdown seal without
a ``restart`` entry (every writer start writes one) is ``shutdown_without_restart``; a
header of a format version other than 1 is a broken point.

The families are data: forged stretches of every length around the bound, as ``rec``
frames and as ``erc`` frames (an attacker without the data key), appended to the newest
segment or in a segment of their own; headers after a shutdown seal in every variant.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sidecar.audit.chain import LENGTH
from sidecar.audit.segments import list_segments, read_frames, segment_name, verify
from sidecar.audit.signing import load_keyring, write_keypair
from tests.harness import sidecar_cli
from tests.test_audit_attacks import write

EVERY = 7  # the writer's checkpoint_every_records in ``write``


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    priv, pub, _ = write_keypair(str(tmp_path_factory.mktemp("k") / "signing"))
    return Path(priv), pub


def payloads(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        return [p for _o, p in read_frames(fh)]


def pack(frames: list[bytes]) -> bytes:
    return b"".join(LENGTH.pack(len(p)) + p for p in frames)


def forged_record(i: int, kind: str) -> dict[str, Any]:
    if kind == "erc":  # without the data key: bytes that look like an encrypted record
        return {"n": os.urandom(12), "c": os.urandom(60)}
    return {"t": 1030.0 + i * 0.01, "ev": "request", "id": f"forged{i}", "d": "allow",
            "st": 200}


def chain_on(last: bytes, bodies: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    """Frames continuing after ``last`` (plain SHA-256 links: no key needed)."""
    seq, prev = msgpack.unpackb(last)["seq"] + 1, hashlib.sha256(last).digest()
    out = []
    for kind, body in bodies:
        p = msgpack.packb({"seq": seq, "prev": prev, kind: body})
        out.append(p)
        seq, prev = seq + 1, hashlib.sha256(p).digest()
    return out


def genuine_tail(frames: list[bytes]) -> int:
    """Records after the last signed frame among ``frames``."""
    n = 0
    for p in frames:
        f = msgpack.unpackb(p)
        n = 0 if ("chk" in f or "sig" in f.get("end", {})) else n + ("rec" in f or "erc" in f)
    return n


@pytest.mark.parametrize("where", ["newest_segment", "own_segment"])
@pytest.mark.parametrize("kind", ["rec", "erc"])
@pytest.mark.parametrize("forged", [1, EVERY - 1, EVERY, EVERY + 1, 60])
def test_a_forged_stretch_signed_over_by_a_restarted_writer(
        tmp_path: Path, keypair: tuple[Path, str], where: str, kind: str, forged: int) -> None:
    priv, pub = keypair
    d = tmp_path / "audit"
    write(d, priv, 30, **({"encryption_key_file": _data_key(tmp_path)} if kind == "erc" else {}))
    newest = list_segments(str(d))[-1]
    frames = payloads(newest.path)[:-1]  # the shutdown seal cut off
    bodies = [(kind, forged_record(i, kind)) for i in range(forged)]
    if where == "own_segment":
        header = msgpack.unpackb(frames[0])["seg"]
        header = {**header, "created": 2e9, "prev_segment": newest.name, "prev_sealed": False}
        header.pop("restart", None)
        header.pop("break", None)
        bodies.insert(0, ("seg", header))
        added = chain_on(frames[-1], bodies)
        Path(newest.path).write_bytes(pack(frames))
        start = msgpack.unpackb(added[0])["seq"]
        (d / segment_name(start, 2e9)).write_bytes(pack(added))
    else:
        Path(newest.path).write_bytes(pack(frames + chain_on(frames[-1], bodies)))
    stretch = genuine_tail(frames) + forged
    keyring = load_keyring([pub])
    before = verify(str(d), keyring=keyring)
    assert before.unsigned_tail_records == stretch
    # The sidecar restarts on the directory: its first checkpoint signs what it found.
    write(d, priv, 5, start=500,
          **({"encryption_key_file": _data_key(tmp_path)} if kind == "erc" else {}))
    after = verify(str(d), keyring=keyring)
    codes = [f.code for f in after.errors]
    if stretch > EVERY:
        assert not after.ok and codes == ["unsigned_gap_too_long"], after
        gap = next(f for f in after.findings if f.code == "unsigned_gap_too_long")
        assert f"{stretch} records" in gap.message
    else:
        # Within the bound: what an honest crash leaves (a warning names the frames).
        assert after.ok and codes == [], after
    assert "unsealed_restart" in [f.code for f in after.findings]
    cli = sidecar_cli("audit", "verify", str(d), "--pubkey", pub)
    assert cli.returncode == (1 if stretch > EVERY else 0), cli.stdout + cli.stderr
    assert "Traceback" not in cli.stderr


# Forged records dated far apart, few enough to stay inside the count bound: only their
# times give them away. Encrypted with the real data key (a compromised pod holds it), they
# passed every time bound, with ``--data-key`` given too: an ``erc`` frame's body has no
# ``t`` (found by a hostile review in the twenty-fifth session).
FAR_APART = (1040.0, 4640.0, 87400.0)


@pytest.mark.parametrize("kind", ["rec", "erc"])
def test_forged_records_dated_hours_apart_across_a_restart(
        tmp_path: Path, keypair: tuple[Path, str], kind: str) -> None:
    from sidecar.audit.crypto import Encryptor, load_data_key

    priv, pub = keypair
    enc = {"encryption_key_file": _data_key(tmp_path)} if kind == "erc" else {}
    d = tmp_path / "audit"
    write(d, priv, 30, **enc)
    newest = list_segments(str(d))[-1]
    frames = payloads(newest.path)[:-1]  # the shutdown seal cut off
    seq, prev = msgpack.unpackb(frames[-1])["seq"] + 1, hashlib.sha256(frames[-1]).digest()
    encryptor = Encryptor(load_data_key(_data_key(tmp_path))) if enc else None
    for i, t in enumerate(FAR_APART):
        wire = {"t": t, "ev": "request", "id": f"forged{i}", "d": "allow", "st": 200}
        if encryptor is not None:
            body = encryptor.bodies(seq, [msgpack.packb(wire, use_bin_type=True)])[0]
            p = (b"\x83\xa3seq" + msgpack.packb(seq) + b"\xa4prev\xc4\x20" + prev + b"\xa3erc"
                 + body)
        else:
            p = msgpack.packb({"seq": seq, "prev": prev, "rec": wire}, use_bin_type=True)
        assert msgpack.unpackb(p)["seq"] == seq
        frames.append(p)
        seq, prev = seq + 1, hashlib.sha256(p).digest()
    Path(newest.path).write_bytes(pack(frames))
    write(d, priv, 5, start=500, **enc)  # a real restart signs over what it found
    keyring = load_keyring([pub])
    args = ["audit", "verify", str(d), "--pubkey", pub]
    if kind == "erc":
        from sidecar.audit.crypto import Decryptor

        opened = verify(str(d), keyring=keyring,
                        decryptor=Decryptor([load_data_key(_data_key(tmp_path))]))
        assert not opened.ok and "unsigned_gap_too_long" in [f.code for f in opened.errors]
        cli = sidecar_cli(*args, "--data-key", _data_key(tmp_path))
        assert cli.returncode == 1 and "unsigned_gap_too_long" in cli.stdout, cli.stdout
        # Without the data key the times cannot be read: the counts hold, and a note says
        # the time bounds were not applied to the encrypted records (docs/audit.md).
        blind = verify(str(d), keyring=keyring)
        assert blind.ok and any("time bounds" in n for n in blind.notes), blind
    else:
        result = verify(str(d), keyring=keyring)
        assert not result.ok and [f.code for f in result.errors] == ["unsigned_gap_too_long"]
        assert not any("time bounds" in n for n in result.notes)


def _data_key(tmp_path: Path) -> str:
    from sidecar.audit.crypto import write_data_key

    path = tmp_path / "d.data"
    if not path.exists():
        write_data_key(str(path))
    return str(path)


def test_honest_crashes_and_restarts_stay_within_the_bound(
        tmp_path: Path, keypair: tuple[Path, str]) -> None:
    """Runs cut at every frame of their newest segment (a crash there), each followed by a
    restart: never an ``unsigned_gap_too_long``."""
    priv, pub = keypair
    keyring = load_keyring([pub])
    base = tmp_path / "base"
    write(base, priv, 30)
    newest = list_segments(str(base))[-1]
    frames = payloads(newest.path)
    for cut in range(1, len(frames)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        for seg in list_segments(str(base)):
            (d / seg.name).write_bytes(Path(seg.path).read_bytes())
        (d / newest.name).write_bytes(pack(frames[:cut]))
        write(d, priv, 10, start=100)
        result = verify(str(d), keyring=keyring)
        assert result.ok and result.errors == [], (cut, result)


HEADERS: dict[str, tuple[dict[str, Any], str]] = {
    # what the header says -> the finding (or the broken point's text)
    "no_restart": ({"prev_sealed": True}, "shutdown_without_restart"),
    "no_restart_unsealed_claim": ({"prev_sealed": False}, "shutdown_without_restart"),
    "no_restart_break": ({"prev_sealed": True, "break": {"after_seq": 1}},
                         "shutdown_without_restart"),
    "restart_unsigned": ({"prev_sealed": True, "restart": {"time": 2e9, "after_seq": 29,
                                                           "prev_sealed": True}},
                         "restart_not_signed"),
    "version_4": ({"v": 4, "prev_sealed": True}, "format version 4"),
    "version_0": ({"v": 0, "prev_sealed": True}, "format version 0"),
    "version_text": ({"v": "1", "prev_sealed": True}, "format version '1'"),
    "version_float": ({"v": 1.0, "prev_sealed": True}, "format version 1.0"),
    "version_bool": ({"v": True, "prev_sealed": True}, "format version True"),
    "version_missing": ({"v": None, "prev_sealed": True}, "format version None"),
}


@pytest.mark.parametrize("records", [0, 1, 5])
@pytest.mark.parametrize("name", list(HEADERS))
def test_a_segment_appended_after_a_shutdown_seal(
        tmp_path: Path, keypair: tuple[Path, str], name: str, records: int) -> None:
    priv, pub = keypair
    d = tmp_path / "audit"
    write(d, priv, 30)
    newest = list_segments(str(d))[-1]
    frames = payloads(newest.path)
    assert msgpack.unpackb(frames[-1])["end"]["why"] == "shutdown"
    extra, expected = HEADERS[name]
    header = {"v": 1, "alg": "sha256", "created": 2e9, "prev_segment": newest.name, **extra}
    header = {k: v for k, v in header.items() if v is not None}
    added = chain_on(frames[-1], [("seg", header)]
                     + [("rec", forged_record(i, "rec")) for i in range(records)])
    start = msgpack.unpackb(added[0])["seq"]
    (d / segment_name(start, 2e9)).write_bytes(pack(added))
    for keyring in (None, load_keyring([pub])):
        if expected == "restart_not_signed" and keyring is None:
            continue  # a restart is what a start writes: only its signature tells
        result = verify(str(d), keyring=keyring)
        assert not result.ok, (name, result)
        if expected.startswith("format version"):
            assert expected in str(result.broken), result
        else:
            assert expected in [f.code for f in result.errors], result
    cli = sidecar_cli("audit", "verify", str(d), "--pubkey", pub)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stdout + cli.stderr


# ---------------------------------------------------------------- the oldest segments
#
# Found by a hostile review: deleting the oldest segments of a trail whose writer keeps
# every segment (the default) looked like retention (a note, exit 0) with and without keys
# or anchors. Every header now says whether its writer deletes old segments
# (``retention``: ``"all"`` or N); a chain that starts after seq 0 although its headers
# say "all" and none covered by a verified signature says N is ``oldest_segments_missing``.


def _trail_runs(d: Path, priv: Path, runs: list[int | None]) -> None:
    """One writer run per entry (its ``max_segments``), 60 records each."""
    for i, keep in enumerate(runs):
        write(d, priv, 60, start=100 * i, max_segments=keep)


# (runs' max_segments, how many oldest segments are deleted, detected?)
OLDEST: list[tuple[list[int | None], int, bool]] = [
    ([None], 1, True),
    ([None], 2, True),
    ([None, None], 3, True),
    ([None, None], 5, True),  # the whole first run and more
    ([3], 0, False),  # retention deleted them: honest
    ([None, 3], 0, False),  # the second run's retention deleted the first run's
    ([3, None], 0, False),  # retention stopped later: what it deleted is still explained
    ([3, None], 1, False),  # indistinguishable from retention there (a note only)
    # A writer deletes only down to its N (at a rotation into a header saying N), so fewer
    # segments than the smallest N of the headers were removed beyond retention (found by
    # a later hostile review: these verified OK).
    ([3], 1, True),
    ([3], 2, True),
    ([None, 3], 1, True),
    ([4, 2], 0, False),  # retention lowered: honest
    ([4, 2], 1, True),
    ([2, 4], 0, False),  # retention raised: honest
    ([2, 4], 1, True),
    ([5, 3, 6], 0, False),
    ([5, 3, 6], 1, True),
]


@pytest.mark.parametrize("runs,deleted,detected", OLDEST,
                         ids=[f"{r}-{n}" for r, n, _ in OLDEST])
def test_deleting_the_oldest_segments(tmp_path: Path, keypair: tuple[Path, str],
                                      runs: list[int | None], deleted: int,
                                      detected: bool) -> None:
    priv, pub = keypair
    d = tmp_path / "audit"
    _trail_runs(d, priv, runs)
    for seg in list_segments(str(d))[:deleted]:
        os.unlink(seg.path)
    keyring = load_keyring([pub])
    for result in (verify(str(d)), verify(str(d), keyring=keyring)):
        codes = [f.code for f in result.errors]
        if detected:
            assert not result.ok and codes == ["oldest_segments_missing"], result
        else:
            assert result.ok and codes == [], result
        assert result.starts_at not in (None, 0)
    cli = sidecar_cli("audit", "verify", str(d), "--pubkey", pub)
    assert cli.returncode == (1 if detected else 0), cli.stdout + cli.stderr


def test_a_forged_retention_header_does_not_excuse_a_deletion(
        tmp_path: Path, keypair: tuple[Path, str]) -> None:
    """A header saying "retention: 3" that no signature covers (a segment appended to the
    unsigned tail) does not explain deleted segments when the keys are given."""
    priv, pub = keypair
    d = tmp_path / "audit"
    write(d, priv, 30)
    for seg in list_segments(str(d))[:2]:
        os.unlink(seg.path)
    newest = list_segments(str(d))[-1]
    frames = payloads(newest.path)[:-1]  # the seal cut off, a rotation-like header added
    Path(newest.path).write_bytes(pack(frames))
    header = {"v": 1, "alg": "sha256", "created": 2e9, "prev_segment": newest.name,
              "prev_sealed": False, "retention": 3}
    added = chain_on(frames[-1], [("seg", header)])
    (d / segment_name(msgpack.unpackb(added[0])["seq"], 2e9)).write_bytes(pack(added))
    signed = verify(str(d), keyring=load_keyring([pub]))
    assert "oldest_segments_missing" in [f.code for f in signed.errors], signed


# ------------------------------------------------------- through a real sidecar process


@pytest.mark.parametrize("cut", ["frame_boundary", "mid_frame"])
def test_forged_records_then_a_real_sidecar_restart(tmp_path, pki, app, procs, cut):
    """The attack end to end: a real sidecar writes and stops (signed seal); the attacker
    cuts the seal (at a frame boundary, or mid-frame: the writer then declares a break),
    appends 20 forged allows without the key; the sidecar is started again on the
    directory and signs what it finds. ``verify --pubkey`` must not say OK."""
    from tests.harness import (
        free_port,
        http,
        mtls_context,
        sidecar_config,
        spiffe,
        start_sidecar,
        write_policy,
    )

    orders, frontend = spiffe("orders"), spiffe("frontend")
    priv, pub, _ = write_keypair(str(tmp_path / "audit"))
    audit_dir = tmp_path / "trail"
    policy = write_policy(tmp_path / "mesh.yaml", {
        "version": 1, "trust_domain": "demo.local", "services": {orders: {"rules": [
            {"name": "reads", "allow": {"from": [frontend], "paths": ["/orders/**"]}}]}}})
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}",
                                  "app": f"127.0.0.1:{app}"},
                         policy=policy,
                         audit={"path": str(audit_dir), "signing_key_file": priv,
                                "checkpoint_every_records": 5})
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)

    def run_sidecar(name: str, requests: int) -> None:
        b = start_sidecar(tmp_path / name, "orders", cfg)
        procs.append(b)
        for i in range(requests):
            http(b.port("inbound"), "GET", "/admin" if i % 2 else f"/orders/{i}", ctx=ctx)
        assert b.stop() == 0

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run_sidecar("one", 8)
    newest = list_segments(str(audit_dir))[-1]
    frames = payloads(newest.path)
    assert "end" in msgpack.unpackb(frames[-1])
    forged = chain_on(frames[-2], [("rec", forged_record(i, "rec")) for i in range(20)])
    data = pack(frames[:-1] + forged)
    if cut == "mid_frame":
        data += pack([frames[-1]])[:9]  # a cut frame after the forged records
    Path(newest.path).write_bytes(data)
    run_sidecar("two", 3)
    result = verify(str(audit_dir), keyring=load_keyring([pub]))
    assert not result.ok, result
    if cut == "frame_boundary":
        assert [f.code for f in result.errors] == ["unsigned_gap_too_long"], result
    cli = sidecar_cli("audit", "verify", str(audit_dir), "--pubkey", pub,
                      "--accept-declared-breaks")
    assert cli.returncode == 1 and "unsigned_gap_too_long" in cli.stdout, cli.stdout
