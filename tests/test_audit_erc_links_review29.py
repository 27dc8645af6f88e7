"""Format 3: an encrypted record's link binds its seq and prev (hostile review, the
twenty-ninth session).

In format 2 an encrypted record frame of a group (``erc`` with ``d``) linked onward by the
``d`` it carries: nothing the public key checks tied ``d`` to the frame's own ``prev``, so
the frame BEFORE any such frame -- a signed checkpoint, a rotation header, another record
-- could be replaced by anything and the ``erc`` frame's ``prev`` set to the forgery's
digest: ``verify --pubkey --id`` said OK. A writer storing JSON now writes format 3, where
that link is a digest over a tag, the seq, the prev and ``d`` (``chain.sealed_link``), and
the collector's copy (the records rebuilt in the clear from the syslog messages) links the
same way.

One real sidecar (a process, real mTLS requests) signs, encrypts and ships its trail to a
real rsyslog (module fixture); every attack is made on a copy of it. The family: the frame
before an ``erc`` frame -- a signed checkpoint, the last frame of a group, the first or a
middle frame of one, a rotation header, a header across a segment boundary with the oldest
segments deleted -- replaced by a forged clear record, a forged ``erc`` frame, or (headers)
edited: retention, ``enc.kid``, and the downgrades (``enc`` removed, ``v: 2``); the rest
re-linked by the verifier's own rule as far as anything can be without the signing key. Each is
verified with the public key only and with the data key too: every one fails in format 3.
The same trail rewritten as format 2 (re-signed, re-encrypted: what an older writer wrote)
shows the hole the verifier must now flag: its links of encrypted records are not proven
without the data key.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sidecar.audit.chain import (
    FORMAT_JSON,
    FORMAT_LINKED,
    GENESIS,
    LENGTH,
    ChainHead,
    ChainVerifier,
    json_record_frame,
    sealed_link,
)
from sidecar.audit.crypto import (
    Decryptor,
    Encryptor,
    load_data_key,
    load_decryptor,
    write_data_key,
)
from sidecar.audit.segments import list_segments, read_frames, verify
from sidecar.audit.signing import load_keyring, load_signer, write_keypair
from tests.harness import (
    Pki,
    free_port,
    http,
    mtls_context,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_audit_ship import Rsyslog

ORDERS = spiffe("orders")
FRONTEND = spiffe("frontend")
REQUESTS = 160
CLIENTS = 8

# The public rule, spelled out here from docs (not imported): the link of a format-3 record
# stored as JSON in an encrypted segment.
TAG = b"sidecar-audit-erc/3"


def public_link(seq: int, prev: bytes, d: bytes) -> bytes:
    return hashlib.sha256(TAG + struct.pack(">Q", seq) + prev + d).digest()


# -- the real trail


@dataclasses.dataclass
class RealTrail:
    root: Path
    audit: Path
    priv: str
    pub: str
    data: str
    collector: Path  # rsyslog's file
    lines: list[str]
    v2: Path | None = None  # the same trail rewritten as format 2 (``as_format2``)


def _build(root: Path) -> RealTrail:
    """A real sidecar (signing, encrypting, shipping to a real rsyslog, small segments and
    timer checkpoints so that every kind of target is there) under REQUESTS requests in
    waves of CLIENTS concurrent ones, then a clean stop (signed seal shipped). Timer
    checkpoints, as the review's: one removed leaves no record-count bound broken, only
    the link can show it."""
    pki = Pki(root / "pki")
    app_proc, app = start_app(root)
    rsyslog = Rsyslog(root / "rsyslog")
    rsyslog.start()
    try:
        priv, pub, _ = write_keypair(str(root / "sig"))
        data = str(root / "d.data")
        write_data_key(data)
        policy = write_policy(root / "mesh.yaml", {
            "version": 1, "trust_domain": "demo.local", "services": {ORDERS: {"rules": [
                {"name": "reads", "allow": {"from": [FRONTEND], "paths": ["/o/**"]}}]}}})
        audit = root / "audit"
        cfg = sidecar_config(
            pki.identity("orders"),
            inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"},
            policy=policy,
            audit={"path": str(audit), "signing_key_file": priv, "fsync": False,
                   "encryption_key_file": data, "checkpoint_every_records": 1000,
                   "checkpoint_every_seconds": 0.2, "max_segment_bytes": 8192,
                   "batch_linger_seconds": 0.05,
                   "ship": {"address": f"127.0.0.1:{rsyslog.port}",
                            "ca_file": str(rsyslog.ca_file)}})
        proc = start_sidecar(root, "orders", cfg)
        try:
            ctx = mtls_context(pki.identity("frontend"), pki.bundle)
            statuses: list[int] = []
            lock = threading.Lock()

            def client(n: int) -> None:
                status = http(proc.port("inbound"), "GET", f"/o/{n}" if n % 4 else "/admin",
                              ctx=ctx).status
                with lock:
                    statuses.append(status)

            # Waves of CLIENTS requests at once (a batch, so a group, of several records);
            # after every third a pause past checkpoint_every_seconds (a timer checkpoint,
            # then the next wave's records); rotations fall inside the waves as well.
            for wave in range(REQUESTS // CLIENTS):
                threads = [threading.Thread(target=client, args=(wave * CLIENTS + n,))
                           for n in range(CLIENTS)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=60)
                if wave % 3 == 2:
                    time.sleep(0.35)
            assert len(statuses) == REQUESTS and set(statuses) == {200, 403}
        finally:
            assert proc.stop() == 0
        assert wait_for(lambda: any('"kind":"end"' in line and '"shutdown"' in line
                                    for line in rsyslog.lines()), timeout=20)
    finally:
        rsyslog.stop()
        app_proc.stop()
    return RealTrail(root, audit, priv, pub, data, rsyslog.out, rsyslog.lines())


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealTrail]:
    trail = _build(tmp_path_factory.mktemp("review29"))
    trail.v2 = as_format2(trail, trail.root / "audit-v2")
    yield trail


# -- frames on disk


def payloads_of(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        return [p for _o, p in read_frames(fh)]


def write_payloads(path: str, payloads: list[bytes]) -> None:
    Path(path).write_bytes(b"".join(LENGTH.pack(len(p)) + p for p in payloads))


def unpack(payload: bytes) -> dict[str, Any]:
    return msgpack.unpackb(payload, raw=False)  # type: ignore[no-any-return]


def pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)  # type: ignore[no-any-return]


def kind_of(frame: dict[str, Any]) -> str:
    return next(k for k in ("seg", "rec", "erc", "chk", "end") if k in frame)


def grouped(frame: dict[str, Any]) -> bool:
    return "erc" in frame and "d" in frame["erc"]


def relink(payloads: list[bytes], start: int) -> None:
    """The attacker's tool: after the frame at ``start`` (forged), each following frame's
    ``prev`` set to the link that the verifier itself computes for the frame before it (a
    public ``ChainVerifier``, the code anyone has: whatever rule it follows, the forger
    follows too), up to and including the first signed frame, which no one without the key
    can sign again. A frame whose ``prev`` already matches ends it (nothing more to hide)."""
    checker = ChainVerifier()
    checker.start_segment()
    for k in range(len(payloads)):
        if k > start:
            frame = unpack(payloads[k])
            assert checker.last is not None
            if frame["prev"] == checker.last.digest:
                return
            frame["prev"] = checker.last.digest
            payloads[k] = pack(frame)
            if "sig" in frame.get("chk", frame.get("end", {})):
                return
        checker.accept(payloads[k])


# -- format 2: the same trail as an older writer wrote it (re-signed, re-encrypted)


def as_format2(trail: RealTrail, out: Path) -> Path:
    """The trail rewritten frame by frame as format 2: headers ``v: 2``, each group's
    records encrypted again under their new ``d`` (which is the link), every checkpoint and
    seal signed again: a trail exactly as a format-2 writer makes it."""
    signer = load_signer(trail.priv, ORDERS)
    key = load_data_key(trail.data)
    decryptor, encryptor = Decryptor([key]), Encryptor(key)
    out.mkdir()
    prev = GENESIS
    header: dict[str, Any] = {}
    for seg in list_segments(str(trail.audit)):
        new: list[bytes] = []
        group: list[dict[str, Any]] = []
        for payload in payloads_of(seg.path):
            frame = unpack(payload)
            kind, seq = kind_of(frame), frame["seq"]
            body = frame[kind]
            if grouped(frame):
                group.append(frame)
                if "c" not in body:
                    continue
                first = group[0]["seq"]
                texts = decryptor.group(first, [g["erc"]["d"] for g in group], body, header)
                ds = []
                for g, text in zip(group, texts, strict=True):
                    ds.append(hashlib.sha256(json_record_frame(g["seq"], prev, text)).digest())
                    g["prev"], prev = prev, ds[-1]
                bodies = encryptor.group_bodies(first, list(texts), ds)
                for g, b in zip(group, bodies, strict=True):
                    new.append(pack({"seq": g["seq"], "prev": g["prev"], "erc": unpack(b)}))
                group = []
                continue
            assert not group
            if kind == "seg":
                header = body
                body = {**body, "v": FORMAT_JSON}
            elif "sig" in body:
                plain = {k: v for k, v in body.items() if k not in ("id", "kid", "sig")}
                body = signer.sign(seq, prev, kind, plain)
            payload = pack({"seq": seq, "prev": prev, kind: body})
            new.append(payload)
            prev = hashlib.sha256(payload).digest()
        write_payloads(str(out / seg.name), new)
    return out


# -- the family


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the forged frame goes: the frame before a group frame."""

    name: str
    segment: int  # index in the sorted segment list
    index: int  # the forged frame's index in that segment (the group frame follows it)


def find_targets(audit: Path) -> dict[str, Target]:
    """One frame of each kind that a group frame follows, all before the newest segment
    (so that signed frames follow each): the middle one of each kind found (not the trail's
    first checkpoint, whose loss ``unsigned_start`` may report for other reasons)."""
    found: dict[str, list[Target]] = {}
    segs = list_segments(str(audit))
    for s, seg in enumerate(segs[:-1]):
        frames = [unpack(p) for p in payloads_of(seg.path)]
        for k in range(len(frames) - 1):
            f, nxt = frames[k], frames[k + 1]
            if not grouped(nxt):
                continue
            kind = kind_of(f)
            if kind == "chk":
                name = "checkpoint"
            elif kind == "seg":
                # (the first header of a trail, or a restart's, is not a rotation's)
                rotation = f["seg"].get("prev_segment") and "restart" not in f["seg"]
                name = "rotation_header" if rotation else "other_header"
            elif grouped(f) and "c" in f["erc"]:
                name = "group_end"
            elif grouped(f):
                name = "group_start" if k == 0 or not grouped(frames[k - 1]) else "group_middle"
            else:
                continue
            found.setdefault(name, []).append(Target(name, s, k))
        if s and kind_of(frames[0]) == "seg" and grouped(frames[1]) and s >= 2:
            # Across a segment boundary: the oldest segments deleted, this header the first.
            found.setdefault("segment_boundary", []).append(Target("segment_boundary", s, 0))
    return {name: targets[len(targets) // 2] for name, targets in found.items()}


FORGED = {"t": 1.8e9, "ev": "request", "id": "forged-0001", "dir": "inbound", "peer": FRONTEND,
          "src": "127.0.0.1:40000", "m": "GET", "host": "orders", "path": "/admin",
          "d": "allow", "rule": "reads", "why": "allowed", "pv": "", "st": 200, "bi": 0,
          "bo": 2, "ms": 0.5}


def forge(frame: dict[str, Any], how: str) -> dict[str, Any]:
    """The forged frame in place of ``frame`` (same seq and prev)."""
    seq, prev = frame["seq"], frame["prev"]
    if how == "clear_record":  # a forged 'allow' (format 2 allows clear records there)
        return {"seq": seq, "prev": prev,
                "rec": json.dumps({**FORGED, "t": _time_near(frame)}, separators=(",", ":"))}
    if how == "erc_frame":  # a forged group frame: any d
        return {"seq": seq, "prev": prev, "erc": {"d": hashlib.sha256(b"forged").digest()}}
    body = dict(frame["seg"])
    if how == "retention":  # all -> N: legitimises deleting the oldest segments
        body["retention"] = 2
    elif how == "kid":
        body["enc"] = {**body["enc"], "kid": "0123456789abcdef"}
    elif how == "enc_removed":  # a downgrade: format 3 without enc links clear records
        del body["enc"]  # by their bytes
    elif how == "format2":  # a downgrade: format 2 links group frames by their d
        body["v"] = FORMAT_JSON
    else:
        raise AssertionError(how)
    return {"seq": seq, "prev": prev, "seg": body}


def _time_near(frame: dict[str, Any]) -> float:
    body = frame.get("chk") or frame.get("seg") or {}
    t = body.get("time") or body.get("created")
    return float(t) if isinstance(t, int | float) else 1.7e9


def attack(src: Path, dst: Path, target: Target, how: str) -> None:
    """Copy the trail to ``dst`` and forge it there: the target frame replaced and the
    frames after it re-linked (``relink``). Across a segment boundary: the segments before the target deleted,
    and the target header's retention claim made to cover that."""
    shutil.copytree(src, dst)
    segs = [seg.path for seg in list_segments(str(dst))]
    if target.name == "segment_boundary":
        for path in segs[:target.segment]:
            os.unlink(path)
    path = segs[target.segment]
    payloads = payloads_of(path)
    payloads[target.index] = pack(forge(unpack(payloads[target.index]), how))
    relink(payloads, target.index)
    write_payloads(path, payloads)


MEMBERS = [
    ("checkpoint", "clear_record"), ("checkpoint", "erc_frame"),
    ("group_end", "clear_record"), ("group_end", "erc_frame"),
    ("group_start", "clear_record"), ("group_start", "erc_frame"),
    ("group_middle", "clear_record"), ("group_middle", "erc_frame"),
    ("rotation_header", "retention"), ("rotation_header", "kid"),
    ("rotation_header", "enc_removed"), ("rotation_header", "format2"),
    ("segment_boundary", "retention"),
]


def _verify(path: Path, trail: RealTrail, data_key: bool) -> Any:
    return verify(str(path), keyring=load_keyring([trail.pub]), identity=ORDERS,
                  decryptor=load_decryptor([trail.data]) if data_key else None)


def test_the_real_trail_is_format_3_and_every_target_is_there(real: RealTrail) -> None:
    versions = {unpack(payloads_of(seg.path)[0])["seg"]["v"]
                for seg in list_segments(str(real.audit))}
    assert versions == {FORMAT_LINKED}
    assert set(find_targets(real.audit)) >= {t for t, _h in MEMBERS}
    for data_key in (False, True):
        result = _verify(real.audit, real, data_key)
        assert result.ok and not result.errors, (result.broken, result.findings)
        assert result.records == REQUESTS and result.sealed


@pytest.mark.parametrize("target,how", MEMBERS, ids=[f"{t}-{h}" for t, h in MEMBERS])
def test_format3_forged_frame_before_an_erc_frame_fails_with_the_public_key_alone(
        real: RealTrail, tmp_path: Path, target: str, how: str) -> None:
    where = find_targets(real.audit)[target]
    forged = tmp_path / "forged"
    attack(real.audit, forged, where, how)
    for data_key in (False, True):
        result = _verify(forged, real, data_key)
        assert not result.ok, (data_key, result.findings, result.notes)
        assert result.broken is not None or result.errors


# (the downgrade to format 2 changes nothing in a format-2 trail)
V2_MEMBERS = [m for m in MEMBERS if m[1] != "format2"]


@pytest.mark.parametrize("target,how", V2_MEMBERS, ids=[f"{t}-{h}" for t, h in V2_MEMBERS])
def test_format2_the_same_forgeries_are_never_ok_with_the_public_key_alone(
        real: RealTrail, tmp_path: Path, target: str, how: str) -> None:
    # Format 2 cannot prove these links without the data key: verify must not say OK
    # (before: OK); with the data key, the forgery is found.
    assert real.v2 is not None
    where = find_targets(real.v2)[target]
    forged = tmp_path / "forged"
    attack(real.v2, forged, where, how)
    public = _verify(forged, real, False)
    assert not public.ok, (public.findings, public.notes)
    assert _verify(forged, real, True).ok is False


def test_format2_honest_trail_needs_the_data_key_for_its_links(real: RealTrail) -> None:
    # The same trail as a format-2 writer made it: OK with the data key; with the public key
    # alone not OK, saying that the data key is needed (the CLI: cannot verify, exit 2).
    assert real.v2 is not None
    assert _verify(real.v2, real, True).ok
    public = _verify(real.v2, real, False)
    assert not public.ok and not public.errors and public.broken is None
    assert public.missing_key is not None and "--data-key" in public.missing_key
    got = sidecar_cli("audit", "verify", str(real.v2), "--pubkey", real.pub, "--id", ORDERS)
    assert got.returncode == 2 and "--data-key" in got.stderr, got.stdout + got.stderr
    got = sidecar_cli("audit", "verify", str(real.v2), "--pubkey", real.pub, "--id", ORDERS,
                      "--data-key", real.data)
    assert got.returncode == 0, got.stdout + got.stderr


def test_cli_verify_of_a_format3_forgery(real: RealTrail, tmp_path: Path) -> None:
    # The review's repro through the CLI: a signed checkpoint replaced by a forged allow.
    forged = tmp_path / "forged"
    attack(real.audit, forged, find_targets(real.audit)["checkpoint"], "clear_record")
    for extra in ([], ["--data-key", real.data]):
        got = sidecar_cli("audit", "verify", str(forged), "--pubkey", real.pub, "--id", ORDERS,
                          *extra)
        assert got.returncode == 1 and "BROKEN" in got.stdout, got.stdout + got.stderr


def test_the_collector_copy_verifies_and_links_as_the_disk(real: RealTrail,
                                                            tmp_path: Path) -> None:
    # ``collect`` rebuilds the records in the clear from rsyslog's lines; each message's
    # digest is the record's format-3 link, recomputed from its seq, prev and JSON; the copy
    # verifies with the public key alone, and its head is the disk's.
    out = tmp_path / "collected"
    got = sidecar_cli("audit", "collect", str(real.collector), "-o", str(out))
    assert got.returncode == 0, got.stdout + got.stderr
    disk = _verify(real.audit, real, False)
    got = sidecar_cli("audit", "verify", str(out), "--pubkey", real.pub, "--id", ORDERS,
                      "--json")
    copy = json.loads(got.stdout)
    assert got.returncode == 0 and copy["ok"], copy
    assert copy["records"] == REQUESTS and copy["sealed"]
    assert copy["head_seq"] == disk.head_seq and copy["head_digest"] == disk.head_digest.hex()
    # Each audit message of an encrypted record: digest = the public link.
    checked = 0
    for line in real.lines:
        start = line.find('{"seq":')
        if start < 0 or '"kind":"erc"' not in line[start:start + 80]:
            continue
        obj = json.loads(line[start:])
        head = (f'{{"seq":{obj["seq"]},"kind":"erc","digest":"{obj["digest"]}",'
                f'"prev":"{obj["prev"]}","record":')
        text = line[start:].rstrip()[len(head):-1].encode()
        prev = bytes.fromhex(obj["prev"])
        d = hashlib.sha256(json_record_frame(obj["seq"], prev, text)).digest()
        assert obj["digest"] == public_link(obj["seq"], prev, d).hex()
        checked += 1
    assert checked == REQUESTS
    # The copy's own frame before a rebuilt record is bound too: a checkpoint of the copy
    # replaced by a forged record, the next record's prev set to its link: BROKEN.
    segs = [seg.path for seg in list_segments(str(out))]
    for path in segs[:-1]:
        payloads = payloads_of(path)
        hit = next((k for k in range(1, len(payloads) - 1)
                    if "chk" in unpack(payloads[k]) and "rec" in unpack(payloads[k + 1])), None)
        if hit is None:
            continue
        payloads[hit] = pack(forge(unpack(payloads[hit]), "clear_record"))
        relink(payloads, hit)
        write_payloads(path, payloads)
        break
    else:
        raise AssertionError("no checkpoint followed by a record in the collector's copy")
    got = sidecar_cli("audit", "verify", str(out), "--pubkey", real.pub, "--id", ORDERS)
    assert got.returncode == 1 and "BROKEN" in got.stdout, got.stdout + got.stderr


@pytest.mark.parametrize("hmac_key", [None, b"k" * 32], ids=["sha256", "hmac"])
@pytest.mark.parametrize("first_seq", [0, 300, 70_000])
def test_json_records_link_encrypted_frames_by_the_public_rule(hmac_key: bytes | None,
                                                              first_seq: int) -> None:
    # The writer's frames (a group of encrypted records, format 3) and what a verifier
    # reads from them agree: each frame's link is the digest over the tag, seq, prev and its
    # d (HMAC of the same with a key), the next frame's prev, the journal's digest (what the
    # syslog message carries); d is still the digest of the plaintext frame. Every msgpack
    # width of seq (fixint, uint16, uint32). Format 2 (kept for readers' tests) still links
    # by d, and a verifier counts those links as unproven.
    def mac(data: bytes) -> bytes:
        return (hashlib.sha256(data).digest() if hmac_key is None
                else hmac.new(hmac_key, data, "sha256").digest())

    texts = [b'{"p":"' + b"p" * n + b'"}' for n in (0, 40, 300, 5000)]
    for version in (FORMAT_LINKED, FORMAT_JSON):
        head = ChainHead(first_seq, GENESIS, hmac_key)
        head.version = version
        head.journal = []
        encryptor = Encryptor(b"d" * 32)
        data = head.header(1.7e9, enc=encryptor.header_info())
        stored: list[bytes | None] = list(texts)
        data += head.json_records([None] * len(texts), stored, encryptor)
        payloads, view = [], memoryview(data)
        while view:
            (n,) = LENGTH.unpack(view[:4])
            payloads.append(bytes(view[4:4 + n]))
            view = view[4 + n:]
        assert len(payloads) == len(texts) + 1
        prev = mac(payloads[0])
        for payload, text, entry in zip(payloads[1:], texts, head.journal[1:], strict=True):
            frame = unpack(payload)
            seq = frame["seq"]
            assert frame["prev"] == prev
            d = mac(json_record_frame(seq, prev, text))
            assert frame["erc"]["d"] == d
            if version == FORMAT_LINKED:
                link = mac(TAG + struct.pack(">Q", seq) + prev + d)
                assert link == sealed_link(seq, prev, d, hmac_key)
            else:
                link = d
            assert entry[3] == link and entry[4] == (prev, text)
            prev = link
        assert head.prev == prev
        checker = ChainVerifier(hmac_key, require_mac=hmac_key is not None)
        checker.start_segment()
        for payload in payloads:
            last = checker.accept(payload)
        assert last.digest == head.prev
        assert checker.unproven == (len(texts) if version == FORMAT_JSON else 0)


def test_base64_of_frames_unchanged_for_non_records(real: RealTrail) -> None:
    # Headers, checkpoints and seals are shipped with their frame as before (format 3
    # changes only the links of records stored as JSON in an encrypted segment).
    on_disk = {p for seg in list_segments(str(real.audit)) for p in payloads_of(seg.path)}
    shipped = 0
    for line in real.lines:
        start = line.find('{"seq":')
        if start < 0 or '"frame":"' not in line:
            continue
        frame = base64.b64decode(json.loads(line[start:])["frame"])
        assert frame in on_disk
        shipped += 1
    assert shipped > 0
