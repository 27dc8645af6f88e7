"""Format 2: a shipped trail stores each record as the JSON its syslog message carries, the
chain over the plaintext frame, encrypted records in groups of one AES-GCM call
(docs/audit.md, "File format"). Trails written by a real writer shipping to a real rsyslog;
attacks made on copies of them."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sidecar.audit.chain import (
    FORMAT_LINKED,
    GROUP_RECORDS,
    LENGTH,
    decode_frame,
    json_record_frame,
    parse_record_json,
)
from sidecar.audit.crypto import Encryptor, load_data_key, load_decryptor, write_data_key
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import iter_records, iter_stored, list_segments, read_frames, verify
from sidecar.audit.ship import Collector, record_text, write_segments
from sidecar.audit.signing import load_keyring, write_keypair
from sidecar.config.audit import AuditConfig
from tests.harness import sidecar_cli, wait_for, write_audit_trail
from tests.test_audit_hostile_trails import _frames as frames_of
from tests.test_audit_ship import ORDERS, Rsyslog

N = 60


def record(i: int, big: int = 2 ** 70) -> AuditRecord:
    """Records with the values JSON must give back exactly: text beyond ASCII and the BMP,
    control characters, quotes, floats and ints that look alike, big ints, nested extras;
    record 5 has a bytes value, which JSON cannot hold (stored as msgpack instead)."""
    extra: dict[str, Any] = {"n": i, "f": 0.1 * i, "neg": -0.0, "big": big + i,
                             "l": [1, 2.5, None, True, "x"], "m": {"deep": {"er": [i]}}}
    if i == 5:
        extra.update(b=b"\x00\xff", big=2 ** 60)  # msgpack holds ints of 64 bits at most
    return AuditRecord(
        time=1_700_000_000.0 + i / 7, request_id=f"r{i}", decision="deny" if i % 3 else "allow",
        status=403 if i % 3 else 200, rule="orders", peer=ORDERS if i % 4 else None,
        path=f'/caf\u00e9/\U0001F600/"q"/\\/{i}\t\x01', method="GET", reason="allowed",
        duration_ms=1.0 / (i + 1), extra=extra)


@dataclasses.dataclass
class Trail:
    root: Path
    audit: Path
    pub: str
    data: str | None
    lines: list[str]

    def copy(self, tmp: Path) -> Path:
        out = tmp / "copy"
        shutil.copytree(self.audit, out)
        return out

    def keys(self, data: bool = True) -> dict[str, Any]:
        kw: dict[str, Any] = {"keyring": load_keyring([self.pub])}
        if data and self.data:
            kw["decryptor"] = load_decryptor([self.data])
        return kw


def build_trail(root: Path, encrypted: bool, records: Any = None) -> Trail:
    """A real trail of ``records`` (default: ``record(i)`` for N), signed, encrypted or not,
    shipped to a real rsyslog; returned once rsyslog has its seal."""
    rsyslog = Rsyslog(root / "rsyslog")
    rsyslog.start()
    try:
        priv, pub, _ = write_keypair(str(root / "sig"))
        data = None
        if encrypted:
            data = str(root / "d.data")
            write_data_key(data)
        config = AuditConfig(path=str(root / "audit"), fsync=False, signing_key_file=priv,
                             checkpoint_every_records=25, max_segment_bytes=16384,
                             encryption_key_file=data, ship=rsyslog.ship())
        writer = write_audit_trail(config, records or (record(i) for i in range(N)),
                                   identity=ORDERS, batch=20, pause=0.001)
        seal = f'seq="{writer.statistics().next_seq - 1}"'
        assert wait_for(lambda: any(seal in line for line in rsyslog.lines()), timeout=15)
    finally:
        rsyslog.stop()
    return Trail(root, root / "audit", pub, data, rsyslog.lines())


@pytest.fixture(scope="module")
def trails(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Trail]:
    """The module's two trails, each built once, when a test first needs it."""
    built: dict[str, Trail] = {}

    def get(kind: str) -> Trail:
        if kind not in built:
            built[kind] = build_trail(tmp_path_factory.mktemp(f"fmt2-{kind}"),
                                      kind == "encrypted")
        return built[kind]

    return get


@pytest.fixture(params=["clear", "encrypted"])
def trail(request: pytest.FixtureRequest, trails: Callable[[str], Trail]) -> Trail:
    return trails(request.param)


@pytest.fixture
def encrypted(trails: Callable[[str], Trail]) -> Trail:
    return trails("encrypted")


@pytest.fixture
def clear(trails: Callable[[str], Trail]) -> Trail:
    return trails("clear")


def write_frames(path: str, payloads: list[bytes]) -> None:
    Path(path).write_bytes(b"".join(LENGTH.pack(len(p)) + p for p in payloads))


def test_the_trail_is_format_2_and_reads_back_exactly(trail: Trail) -> None:
    kinds: list[str] = []
    group_sizes, size = [], 0
    for _path, payloads in frames_of(trail.audit):
        for payload in payloads:
            raw = msgpack.unpackb(payload, raw=False)
            kind = next(k for k in ("seg", "rec", "erc", "chk", "end") if k in raw)
            kinds.append(kind)
            if kind == "seg":
                assert raw["seg"]["v"] == FORMAT_LINKED
            elif kind == "rec":
                # A JSON text, but record 5 (a bytes value) is a msgpack map.
                assert isinstance(raw["rec"], str) != (raw["rec"].get("id") == "r5"
                                                       if isinstance(raw["rec"], dict) else False)
            elif kind == "erc" and "d" in raw["erc"]:
                size += 1
                if "c" in raw["erc"]:
                    group_sizes.append(size)
                    size = 0
            elif kind == "erc":
                assert size == 0 and set(raw["erc"]) == {"n", "c"}  # the msgpack fallback
            if kind in ("chk", "end", "seg"):
                assert size == 0, "a group spans a checkpoint, seal or header"
    if trail.data:
        assert kinds.count("erc") == N and "rec" not in kinds
        assert sum(group_sizes) == N - 1 and max(group_sizes) > 1
        assert max(group_sizes) <= GROUP_RECORDS
    else:
        assert kinds.count("rec") == N and "erc" not in kinds
    result = verify(str(trail.audit), **trail.keys(), identity=ORDERS)
    assert result.ok and result.records == N and not result.findings, result
    assert list(iter_records(str(trail.audit), decryptor=trail.keys().get("decryptor"))) == \
        [record(i) for i in range(N)]
    if trail.data:
        got = sidecar_cli("audit", "export", str(trail.audit), "--format", "jsonl",
                          "--data-key", trail.data)
        assert got.returncode == 0, got.stderr
        assert [json.loads(x)["request_id"] for x in got.stdout.splitlines()] == \
            [f"r{i}" for i in range(N)]


def test_the_public_key_alone_checks_completeness_and_order(trail: Trail) -> None:
    result = verify(str(trail.audit), **trail.keys(data=False))
    assert result.ok and result.records == N and not result.findings


def test_each_message_makes_its_frame_again(trail: Trail, tmp_path: Path) -> None:
    """The collector's copy, rebuilt from messages without frames, is the same chain: the
    same head, checked with the public key alone, and (encrypted trail) in the clear."""
    records = [line for line in trail.lines if line.startswith("audit\t")]
    shipped = [json.loads(line.split("\t", 2)[2]) for line in records]
    assert len(shipped) == N
    assert [("frame" in m) for m in shipped] == [i == 5 for i in range(N)]
    collector = Collector()
    collector.add(trail.lines)
    collector.check()
    out = tmp_path / "collected"
    write_segments(collector.frames, str(out))
    disk = verify(str(trail.audit), **trail.keys())
    copy = verify(str(out), keyring=load_keyring([trail.pub]))
    assert copy.ok and copy.records == N and not copy.findings, copy
    assert (copy.head_seq, copy.head_digest) == (disk.head_seq, disk.head_digest)
    assert list(iter_records(str(out), decryptor=trail.keys().get("decryptor"))) == \
        [record(i) for i in range(N)]
    if trail.data:
        # In the clear: readable without the data key up to the msgpack fallback record,
        # which is shipped as its encrypted frame.
        damage: list[str] = []
        got = [s.record.request_id for s in iter_stored(str(out), on_damage=damage.append)]
        assert got[:5] == [f"r{i}" for i in range(5)] and len(damage) == 1, (got, damage)


def _first_group(trail: Trail) -> tuple[str, list[bytes], list[int]]:
    """A segment and the frame indexes of its first group of more than one record."""
    for path, payloads in frames_of(trail.audit):
        group: list[int] = []
        for i, payload in enumerate(payloads):
            body = msgpack.unpackb(payload, raw=False).get("erc")
            if isinstance(body, dict) and "d" in body:
                group.append(i)
                if "c" in body:
                    if len(group) > 1:
                        return path, payloads, group
                    group = []
    raise AssertionError("no group of two or more records")


def _edit(payload: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    frame = msgpack.unpackb(payload, raw=False)
    change(frame["erc"])
    return msgpack.packb(frame, use_bin_type=True)


def _flip(body: dict[str, Any]) -> None:
    c = bytearray(body["c"])
    c[3] ^= 1
    body["c"] = bytes(c)


def _reencrypted(trail: Trail, payloads: list[bytes], group: list[int]) -> list[bytes]:
    """The group encrypted again with the data key, its first record edited, every ``d``
    kept: what someone holding the data key (but not the signing key) can do."""
    frames = [msgpack.unpackb(payloads[i], raw=False) for i in group]
    last = frames[-1]["erc"]
    header = msgpack.unpackb(payloads[0], raw=False)["seg"]
    texts = load_decryptor([trail.data or ""]).group(
        frames[0]["seq"], [f["erc"]["d"] for f in frames], last, header)
    texts[0] = texts[0].replace(b'"d":"deny"', b'"d":"allow"').replace(
        b'"d":"allow","rule"', b'"d":"allow" ,"rule"')
    bodies = Encryptor(load_data_key(trail.data or "")).group_bodies(
        frames[0]["seq"], texts, [f["erc"]["d"] for f in frames])
    out = list(payloads)
    for i, frame, body in zip(group, frames, bodies, strict=True):
        frame["erc"] = msgpack.unpackb(body, raw=False)
        out[i] = msgpack.packb(frame, use_bin_type=True)
    return out


# (attack, whether the public key alone sees it, what --data-key says)
GROUP_ATTACKS = ["ciphertext byte flipped", "re-encrypted with the data key",
                 "ciphertext of another group", "ciphertext removed", "a digest edited",
                 "group's last frame cut"]


@pytest.mark.parametrize("attack", GROUP_ATTACKS)
def test_what_each_key_sees_of_an_attack_on_an_encrypted_group(
        encrypted: Trail, tmp_path: Path, attack: str) -> None:
    trail = encrypted
    path, payloads, group = _first_group(trail)
    out = list(payloads)
    last = group[-1]
    if attack == "ciphertext byte flipped":
        out[last] = _edit(payloads[last], _flip)
    elif attack == "re-encrypted with the data key":
        out = _reencrypted(trail, payloads, group)
    elif attack == "ciphertext of another group":
        others = [p for _path, ps in frames_of(trail.audit) for p in ps
                  if p not in payloads[group[0]:last + 1]
                  and "c" in (msgpack.unpackb(p, raw=False).get("erc") or {})
                  and "d" in msgpack.unpackb(p, raw=False)["erc"]]
        donor = msgpack.unpackb(others[0], raw=False)["erc"]
        out[last] = _edit(payloads[last], lambda b: b.update(n=donor["n"], c=donor["c"]))
    elif attack == "ciphertext removed":
        out[last] = _edit(payloads[last], lambda b: (b.pop("n"), b.pop("c")))
    elif attack == "a digest edited":
        out[group[0]] = _edit(payloads[group[0]], lambda b: b.update(d=bytes(32)))
    else:
        del out[last]
    write_frames(path, out)
    copy = trail.audit  # restored below
    backup = tmp_path / "orig"
    Path(backup).write_bytes(b"".join(LENGTH.pack(len(p)) + p for p in payloads))
    try:
        pub_only = verify(str(copy), **trail.keys(data=False))
        with_data = verify(str(copy), **trail.keys())
    finally:
        shutil.copyfile(backup, path)
    chain_broken = attack in ("a digest edited", "group's last frame cut")
    # The chain is over the plaintext: the public key alone sees what changes a digest or
    # the order, never the ciphertext (docs/audit.md, "What verify proves").
    assert pub_only.ok is not chain_broken, pub_only
    assert not with_data.ok and with_data.broken is not None
    expected = {
        "ciphertext byte flipped": "do not decrypt",
        "re-encrypted with the data key": "not to the record its digest was made from",
        "ciphertext of another group": "do not decrypt",
        "ciphertext removed": "is not there",
    }.get(attack)
    if expected is not None:
        assert expected in with_data.broken.message, with_data.broken
    assert verify(str(trail.audit), **trail.keys()).ok  # restored


# A record's JSON as a forger writes it into a clear format-2 trail (re-chained, as anyone
# who can write the directory can without a key): each is a broken frame, never a record.
FORGED_JSON = {
    "member twice": '{"t":1.0,"ev":"request","d":"deny","d":"allow"}',
    "NaN": '{"t":NaN,"ev":"request"}',
    "Infinity": '{"t":1.0,"ms":Infinity}',
    "lone surrogate": '{"t":1.0,"ev":"\\ud800"}',
    "nested 70 deep": '{"t":1.0,"x":' + "[" * 70 + "]" * 70 + "}",
    "an array": '[{"t":1.0}]',
    "a string": '"t"',
    "not JSON": '{"t":1.0,',
    "a huge integer": '{"t":1.0,"st":' + "9" * 5000 + "}",
    "trailing junk": '{"t":1.0} {}',
}


@pytest.mark.parametrize("what", list(FORGED_JSON))
def test_forged_json_in_a_record_is_a_broken_frame(clear: Trail, tmp_path: Path,
                                                   what: str) -> None:
    d = clear.copy(tmp_path)
    seg = list_segments(str(d))[0]
    with open(seg.path, "rb") as fh:
        payloads = [p for _o, p in read_frames(fh)]
    out, prev = [], None
    forged_seq = None
    for payload in payloads:
        frame = msgpack.unpackb(payload, raw=False)
        if prev is not None:
            frame["prev"] = prev
        if forged_seq is None and isinstance(frame.get("rec"), str):
            frame["rec"] = FORGED_JSON[what]
            forged_seq = frame["seq"]
        data = msgpack.packb(frame, use_bin_type=True)
        out.append(data)
        prev = hashlib.sha256(data).digest()
    write_frames(seg.path, out)
    result = verify(str(d))
    assert not result.ok and result.broken is not None and result.broken.seq == forged_seq
    assert "record" in result.broken.message and "JSON" in result.broken.message, result.broken
    for args in (["verify", str(d)], ["export", str(d)]):
        got = sidecar_cli("audit", *args)
        assert "Traceback" not in got.stderr and got.returncode in (1, 2), (args, got)
    # tail, a live view, names a frame it cannot decode and stops there, as export does:
    # nothing after it checks its link, nor the link of the record before it (before the
    # thirty-third session tail read on unchecked; found by a hostile review).
    got = sidecar_cli("audit", "tail", str(d), "-n", str(N))
    assert "Traceback" not in got.stderr and got.returncode == 1, got
    assert "a frame that does not decode: record" in got.stderr, got.stderr
    exported = sidecar_cli("audit", "export", str(d), "--format", "jsonl")
    shown = [json.loads(x)["request_id"] for x in got.stdout.splitlines()]
    assert shown == [json.loads(x)["request_id"] for x in exported.stdout.splitlines()]
    assert len(shown) < N - 1


def test_tail_reads_a_group_whole_wherever_its_window_starts(trail: Trail) -> None:
    keys = ["--data-key", trail.data] if trail.data else []
    for n in (1, 7, 33, N):
        got = sidecar_cli("audit", "tail", str(trail.audit), "-n", str(n), *keys)
        assert got.returncode == 0, got.stderr
        assert [json.loads(x)["request_id"] for x in got.stdout.splitlines()] == \
            [f"r{i}" for i in range(N - n, N)]


# -- what the writer stores as JSON, and what it leaves to msgpack

EXACT = [
    {"t": 1.0, "ev": "request", "id": "a", "st": 200, "ms": 0.1},
    {"t": 1e300, "ev": "x", "x": {"i": 2 ** 64, "f": -0.0, "l": [True, False, None]}},
    {"t": 2.5, "ev": "\U0001F600 caf\u00e9 \x00 \x1f \" \\ \u2028", "x": {"k": [[[]]]}},
    {"t": 3, "ev": "int time"},  # an int stays an int
    {"t": 1.0, "x": {"t": (1, 2)}},  # a tuple is a list, as in msgpack
]
NOT_JSON = {
    "bytes": {"t": 1.0, "x": {"b": b"\x00"}},
    "NaN": {"t": 1.0, "ms": float("nan")},
    "infinity in extra": {"t": 1.0, "x": {"f": float("inf")}},
    "lone surrogate": {"t": 1.0, "ev": "\ud800"},
    "too deep": {"t": 1.0, "x": {"l": json.loads("[" * 63 + "]" * 63)}},
    "a set": {"t": 1.0, "x": {"s": {1}}},
    "too many digits": {"t": 1.0, "x": {"i": 10 ** 5000}},
}


@pytest.mark.parametrize("wire", EXACT, ids=range(len(EXACT)))
def test_a_record_json_holds_is_stored_as_json_and_reads_back_the_same(
        wire: dict[str, Any]) -> None:
    text = record_text(wire)
    assert text is not None
    back = parse_record_json(text.decode())
    expected = json.loads(json.dumps(wire))  # tuples become lists, as in msgpack
    assert back == expected
    assert repr(back) == repr(expected)  # 1 is not 1.0, nor True
    frame = json_record_frame(7, bytes(32), text)
    assert decode_frame(frame) == (7, bytes(32), "rec", back)
    assert frame == msgpack.packb({"seq": 7, "prev": bytes(32), "rec": text.decode()},
                                  use_bin_type=True)


@pytest.mark.parametrize("what", list(NOT_JSON))
def test_a_record_json_cannot_hold_is_left_to_msgpack(what: str) -> None:
    assert record_text(NOT_JSON[what]) is None


def test_a_writer_that_does_not_ship_writes_format_1(tmp_path: Path) -> None:
    config = AuditConfig(path=str(tmp_path / "a"), fsync=False)
    write_audit_trail(config, (record(i) for i in range(3)))
    for _path, payloads in frames_of(tmp_path / "a"):
        for payload in payloads:
            raw = msgpack.unpackb(payload, raw=False)
            if "seg" in raw:
                assert raw["seg"]["v"] == 1
            if "rec" in raw:
                assert isinstance(raw["rec"], dict)
    assert verify(str(tmp_path / "a")).ok


def test_the_collector_refuses_a_message_not_laid_out_as_shipped(trail: Trail) -> None:
    at = next(i for i, x in enumerate(trail.lines) if x.startswith("audit\t") and '"prev":' in x)
    line = trail.lines[at]
    start = line.index('{"seq":')
    obj = json.loads(line[start:])
    for edited in (
        line.replace('"record":{', '"record": {', 1),  # the same JSON, other bytes
        line.replace('"t":', '"t" :', 1),
        line[:start] + json.dumps({**obj, "prev": "zz" * 32}, separators=(",", ":")),
        line[:start] + json.dumps({k: v for k, v in obj.items() if k != "record"},
                                  separators=(",", ":")),
        line.replace('"prev":"', '"prev":"' + base64.b16encode(bytes(1)).decode().lower(), 1),
        line.replace(obj["digest"], "ab" * 32),  # in the structured data and the JSON
        line.replace(obj["prev"], "cd" * 32),
        line.replace(f'"seq":{obj["seq"]},', f'"seq":{2 ** 70},', 1),  # no frame has it
        line.replace(f'"seq":{obj["seq"]},', f'"seq":{2 ** 64 - 1},', 1),
    ):
        assert edited != line
        collector = Collector()
        with pytest.raises(ValueError, match="does not match its frame"):
            collector.add(trail.lines[:at] + [edited] + trail.lines[at + 1:])
            collector.check()


def test_a_trail_that_changes_format_at_a_restart_verifies_whole(tmp_path: Path) -> None:
    """Shipping switched on (format 1 -> 2) and off again (2 -> 1) between runs of one
    trail: each writer continues the chain of the one before, and verify reads it whole."""
    priv, pub, _ = write_keypair(str(tmp_path / "sig"))
    data = str(tmp_path / "d.data")
    write_data_key(data)
    rsyslog = Rsyslog(tmp_path / "rsyslog")
    rsyslog.start()
    try:
        base = AuditConfig(path=str(tmp_path / "audit"), fsync=False, signing_key_file=priv,
                           checkpoint_every_records=10, encryption_key_file=data)
        shipped = dataclasses.replace(base, ship=rsyslog.ship())
        for n, config in enumerate((base, shipped, base, shipped)):
            # 64-bit ints: format 1 (msgpack) stores no bigger ones
            write_audit_trail(config, (record(i, 2 ** 60) for i in range(n * 15, n * 15 + 15)),
                              identity=ORDERS, batch=5, pause=0.001)
    finally:
        rsyslog.stop()
    versions = [msgpack.unpackb(ps[0], raw=False)["seg"]["v"]
                for _p, ps in frames_of(tmp_path / "audit")]
    assert versions == [1, 3, 1, 3]
    result = verify(str(tmp_path / "audit"), keyring=load_keyring([pub]),
                    decryptor=load_decryptor([data]), identity=ORDERS)
    assert result.ok and result.records == 60 and result.restarts == 3, result
    assert [f.code for f in result.findings] == []
    assert list(iter_records(str(tmp_path / "audit"), decryptor=load_decryptor([data]))) == \
        [record(i, 2 ** 60) for i in range(60)]
