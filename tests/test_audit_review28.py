"""Hostile review 28 of the audit trail: format-2 encrypted trails, the readers, a hostile
collector. Each attack is made on a copy of a real trail (a real writer shipping to a real
rsyslog, signed and encrypted: format 2 with encrypted groups) and checked through the real
CLI.

* F1: the readers (``export``, ``tail``, ``policy replay`` with ``--data-key``) opened a
  group without checking each record against its digest ``d``: a group encrypted again by
  the data key's holder (a deny made an allow, every ``d`` kept) was shown as the allow,
  exit 0, while ``verify --data-key`` said BROKEN. Now it is damage: named on stderr
  (segment, seq), the damage exit code, the record never shown. ``verify --pubkey`` without
  ``--data-key`` says the ciphertext was not checked against the digests.
* F3: the readers showed frames that break a segment's structure, which verify refuses
  without a key: after the seal, a header in the middle, a seq reused or skipped, a segment
  not starting with its header. Now they stop there as at damage.
* F4: a member other than ``d`` on a group's frame (``d, n, c`` on its last, ``n, c`` on a
  format-1 ``erc``) was covered by no digest and verified OK: now a malformed frame.
* F2: ``audit collect`` dropped lines that look like ours but are not as shipped (a member
  twice, seq as text, no ``prev``, the record twice, a raw control character) without a
  word: now counted and placed; one naming the seq of a frame read is BROKEN (exit 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sidecar.audit.chain import LENGTH, sealed_link
from sidecar.audit.crypto import Encryptor, load_data_key, load_decryptor
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import list_segments, read_frames
from tests.harness import sidecar_cli
from tests.test_audit_format2 import build_trail
from tests.test_audit_ship import FRONTEND, ORDERS

N = 90
BYTES_RECORD = 7  # a record JSON cannot hold (a bytes value): a format-1 ``erc`` frame


def record(i: int) -> AuditRecord:
    extra: dict[str, Any] = {"service": ORDERS, "port": 8080}
    if i == BYTES_RECORD:
        extra["b"] = b"\x00\xff"
    deny = i % 3 == 0
    return AuditRecord(time=1_700_000_000.0 + i / 10, request_id=f"rq{i:04d}", peer=FRONTEND,
                       source="10.0.0.1:5000", method="GET", path=f"/o/{i}",
                       decision="deny" if deny else "allow", status=403 if deny else 200,
                       rule="default deny" if deny else "reads",
                       reason="default_deny" if deny else "allowed", extra=extra)


@dataclasses.dataclass
class Trail:
    root: Path
    audit: Path
    pub: str
    data: str
    lines: list[str]

    def copy(self, tmp: Path) -> Path:
        out = tmp / "audit"
        shutil.copytree(self.audit, out)
        return out


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Trail:
    """One real format-2 trail, signed and encrypted, and what rsyslog received of it."""
    root = tmp_path_factory.mktemp("review28")
    made = build_trail(root, True, (record(i) for i in range(N)))
    assert made.data is not None
    t = Trail(made.root, made.audit, made.pub, made.data, made.lines)
    assert len(list_segments(str(t.audit))) >= 2
    return t


def payloads(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        return [p for _o, p in read_frames(fh)]


def write_frames(path: str, frames: list[bytes]) -> None:
    Path(path).write_bytes(b"".join(LENGTH.pack(len(p)) + p for p in frames))


def unpack(payload: bytes) -> dict[str, Any]:
    return msgpack.unpackb(payload, raw=False)  # type: ignore[no-any-return]


def pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)  # type: ignore[no-any-return]


def cli(*args: str) -> tuple[int, str, str]:
    r = sidecar_cli(*args, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout, r.stderr


# The readers, each as (arguments, the exit code for damage); the ids they show.
def readers(t: Trail, d: Path, policy: Path) -> dict[str, tuple[list[str], int]]:
    return {
        "export": (["audit", "export", str(d), "--data-key", t.data], 1),
        "tail": (["audit", "tail", str(d), "-n", "1000", "--data-key", t.data], 1),
        "tail -n 0": (["audit", "tail", str(d), "-n", "0", "--data-key", t.data], 1),
        "policy replay": (["policy", "replay", str(policy), "--audit", str(d), "--identity",
                           ORDERS, "--data-key", t.data], 2),
    }


def allow_none(tmp: Path) -> Path:
    """A policy under which every recorded allow would change (so replay lists records)."""
    p = tmp / "allow-none.yaml"
    p.write_text(f"version: 1\ntrust_domain: demo.local\nservices:\n  {ORDERS}:\n"
                 "    rules: []\n")
    return p


def test_the_honest_trail_reads_whole_with_every_check(trail: Trail, tmp_path: Path) -> None:
    """The control: nothing here is refused, the checks are quiet on a writer's trail."""
    code, out, err = cli("audit", "export", str(trail.audit), "--data-key", trail.data)
    assert code == 0 and err == "", err
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == \
        [f"rq{i:04d}" for i in range(N)]
    code, out, err = cli("audit", "tail", str(trail.audit), "-n", "5", "--data-key", trail.data)
    assert code == 0 and err == "" and len(out.splitlines()) == 5, err
    code, out, err = cli("audit", "tail", str(trail.audit), "-n", "0", "--data-key", trail.data)
    assert code == 0 and err == "" and out == "", err
    code, out, err = cli("policy", "replay", str(allow_none(tmp_path)), "--audit",
                         str(trail.audit), "--identity", ORDERS, "--data-key", trail.data)
    assert code == 1 and "rq0001" in out and err == "", err  # allows that would change
    code, out, _ = cli("audit", "verify", str(trail.audit), "--pubkey", trail.pub,
                       "--data-key", trail.data)
    assert code == 0 and "not checked against their digests" not in out, out
    code, out, err = cli("audit", "collect", *_rsyslog_file(trail, tmp_path, []), "-o",
                         str(tmp_path / "collected"))
    assert code == 0 and "skipped" not in err, err


# ------------------------------------------------------------------ F1: re-encrypted groups


def _deny_group(t: Trail) -> tuple[str, list[bytes], list[int], int]:
    """A segment, its frames, the indexes of a group of several records, and which of the
    group's records is a deny."""
    for seg in reversed(list_segments(str(t.audit))):  # the newest first (tail -n 0)
        frames = payloads(seg.path)
        header = unpack(frames[0])["seg"]
        group: list[int] = []
        for i, p in enumerate(frames):
            body = unpack(p).get("erc")
            if not (isinstance(body, dict) and "d" in body):
                group = []
                continue
            group.append(i)
            if "c" in body:
                fr = [unpack(frames[j]) for j in group]
                texts = load_decryptor([t.data]).group(
                    fr[0]["seq"], [f["erc"]["d"] for f in fr], fr[-1]["erc"], header)
                denies = [k for k, text in enumerate(texts) if b'"d":"deny"' in text]
                if len(group) > 1 and denies:
                    return seg.path, frames, list(group), denies[0]
                group = []
    raise AssertionError("no group of several records with a deny")


def reencrypt(t: Trail, d: Path) -> tuple[str, int]:
    """In the copy ``d``: the group encrypted again with the data key, one deny made an
    allow, every ``d`` kept (what the data key's holder can do). Its segment and seq."""
    path, frames, group, k = _deny_group(t)
    path = str(d / Path(path).name)
    header = unpack(frames[0])["seg"]
    fr = [unpack(frames[j]) for j in group]
    digests = [f["erc"]["d"] for f in fr]
    texts = load_decryptor([t.data]).group(fr[0]["seq"], digests, fr[-1]["erc"], header)
    texts[k] = texts[k].replace(b'"d":"deny"', b'"d":"allow"').replace(b'"st":403',
                                                                       b'"st":200')
    bodies = Encryptor(load_data_key(t.data)).group_bodies(fr[0]["seq"], texts, digests)
    for j, f, body in zip(group, fr, bodies, strict=True):
        f["erc"] = unpack(body)
        frames[j] = pack(f)
    write_frames(path, frames)
    return Path(path).name, fr[k]["seq"]


@pytest.mark.parametrize("reader", ["export", "tail", "tail -n 0", "policy replay"])
def test_a_group_encrypted_again_is_damage_to_every_reader(
        trail: Trail, tmp_path: Path, reader: str) -> None:
    d = trail.copy(tmp_path)
    segment, seq = reencrypt(trail, d)
    forged = f"rq{seq - 1:04d}"  # (seq 0 is the header; records follow it)
    args, damage = readers(trail, d, allow_none(tmp_path))[reader]
    newest = list_segments(str(d))[-1].name
    if reader == "tail -n 0" and segment != newest:
        pytest.skip("the group is not in the newest segment (tail -n 0 reads only that)")
    code, out, err = cli(*args)
    assert code == damage, (code, err)
    assert forged not in out, out  # never shown, as the allow or at all
    assert segment in err and f"record {seq} " in err, err
    assert "not to the record its digest was made from" in err, err
    # verify says the same, and without the data key says what it did not check.
    code, out, _ = cli("audit", "verify", str(d), "--pubkey", trail.pub, "--data-key",
                       trail.data)
    assert code == 1 and "not to the record its digest was made from" in out, out


def test_verify_without_the_data_key_says_the_ciphertext_was_not_checked(
        trail: Trail, tmp_path: Path) -> None:
    d = trail.copy(tmp_path)
    reencrypt(trail, d)
    code, out, _ = cli("audit", "verify", str(d), "--pubkey", trail.pub)
    assert code == 0, out  # the chain is over the plaintext: the public key cannot see it
    assert "not checked against their digests" in out and "--data-key" in out, out


# ---------------------------------------------------------- F3: a segment's structure


def _forged_rec(seq: int, prev: bytes, rid: str) -> bytes:
    text = json.dumps({"t": 1700000100.0, "ev": "request", "id": rid, "dir": "inbound",
                       "peer": FRONTEND, "m": "GET", "path": "/admin", "d": "allow",
                       "rule": "reads", "st": 200, "x": {"service": ORDERS}},
                      separators=(",", ":"))
    return pack({"seq": seq, "prev": prev, "rec": text})


def _link(p: bytes) -> bytes:
    """The link digest of frame ``p`` as the writer makes it: an encrypted record of a group
    links by ``sealed_link`` over its ``d`` (format 3, what a shipping writer writes since
    the twenty-ninth session), any other frame by the SHA-256 of its bytes."""
    frame = unpack(p)
    erc = frame.get("erc")
    if isinstance(erc, dict) and "d" in erc:
        return sealed_link(frame["seq"], frame["prev"], erc["d"], None)
    return hashlib.sha256(p).digest()


def after_seal(frames: list[bytes]) -> list[bytes]:
    last = unpack(frames[-1])
    assert "end" in last
    return frames + [_forged_rec(last["seq"] + 1, _link(frames[-1]), "forged")]


def mid_header(frames: list[bytes]) -> list[bytes]:
    """The seal cut, a second header (format 1, no encryption) then a clear record: which
    also switched the reader's idea of the header (the clear-record check off)."""
    body = frames[:-1]
    header = {k: v for k, v in unpack(frames[0])["seg"].items() if k not in ("enc", "restart")}
    header["v"] = 1
    s0 = unpack(body[-1])["seq"] + 1
    h = pack({"seq": s0, "prev": _link(body[-1]), "seg": header})
    rec = pack({"seq": s0 + 1, "prev": _link(h), "rec": {
        "t": 1700000100.0, "ev": "request", "id": "forged", "dir": "inbound", "m": "GET",
        "path": "/admin", "d": "allow", "rule": "reads", "st": 200}})
    return body + [h, rec]


def seq_reused(frames: list[bytes]) -> list[bytes]:
    body = frames[:-1]
    last = unpack(body[-1])["seq"]
    return body + [_forged_rec(last, _link(body[-1]), "forged")]


def seq_copied(frames: list[bytes]) -> list[bytes]:
    """A forged record at the right place, then the same frame again (the copy is refused;
    the first is what verify --pubkey reports as an unsigned tail)."""
    body = frames[:-1]
    rec = _forged_rec(unpack(body[-1])["seq"] + 1, _link(body[-1]), "forged-twice")
    return body + [rec, rec]


def seq_skipped(frames: list[bytes]) -> list[bytes]:
    body = frames[:-1]
    return body + [_forged_rec(unpack(body[-1])["seq"] + 2, _link(body[-1]), "forged")]


def no_header(frames: list[bytes]) -> list[bytes]:
    first = unpack(frames[0])
    return [_forged_rec(first["seq"], first["prev"], "forged")]


STRUCTURE: dict[str, tuple[Callable[[list[bytes]], list[bytes]], str]] = {
    "a frame after the seal": (after_seal, "after the segment's seal"),
    "a header in the middle": (mid_header, "header frame in the middle"),
    "a seq reused": (seq_reused, "reused after seq"),
    "a frame copied in twice": (seq_copied, "reused after seq"),
    "a seq skipped": (seq_skipped, "seq skipped from"),
    "no header first": (no_header, "does not start with a header"),
}


@pytest.mark.parametrize("reader", ["export", "tail", "tail -n 0"])
@pytest.mark.parametrize("variant", list(STRUCTURE))
def test_a_frame_that_breaks_the_segment_structure_is_not_read(
        trail: Trail, tmp_path: Path, variant: str, reader: str) -> None:
    d = trail.copy(tmp_path)
    newest = list_segments(str(d))[-1]
    change, says = STRUCTURE[variant]
    write_frames(newest.path, change(payloads(newest.path)))
    code, out, _ = cli("audit", "verify", str(d))  # no key needed to see it
    assert code == 1 and "BROKEN" in out, out
    args, damage = readers(trail, d, allow_none(tmp_path))[reader]
    code, out, err = cli(*args)
    assert code == damage, (code, err)
    if variant == "a frame copied in twice":
        assert out.count("forged-twice") <= 1, out
    else:
        assert "forged" not in out, out
    assert newest.name in err and says in err and "verify: broken" in err, err


# ------------------------------------------------------ F4: members no digest covers


def _erc_index(frames: list[bytes], kind: str) -> int | None:
    for i, p in enumerate(frames):
        body = unpack(p).get("erc")
        if not isinstance(body, dict):
            continue
        if kind == "group member" and "d" in body and "c" not in body:
            return i
        if kind == "group last" and "d" in body and "c" in body:
            return i
        if kind == "format-1 erc" and "d" not in body:
            return i
    return None


EXTRA: dict[str, tuple[str, Any]] = {
    "64 KiB with an escape": ("stash", b"\x1b[2J" + b"A" * 65536),
    "an empty name": ("", 0),
    "a second digest": ("dd", bytes(32)),
    "a nonce": ("n", bytes(12)),  # (extra on a group member only: the others have one)
}
FRAME_KINDS = ["group member", "group last", "format-1 erc"]
# (a nonce is extra on a group member only: the other kinds carry one)
EXTRA_CASES = [(extra, kind) for extra in EXTRA for kind in FRAME_KINDS
               if EXTRA[extra][0] != "n" or kind == "group member"]


@pytest.mark.parametrize(("extra", "kind"), EXTRA_CASES)
def test_a_member_no_writer_makes_is_a_malformed_frame(
        trail: Trail, tmp_path: Path, kind: str, extra: str) -> None:
    name, value = EXTRA[extra]
    d = trail.copy(tmp_path)
    for seg in list_segments(str(d)):
        frames = payloads(seg.path)
        i = _erc_index(frames, kind)
        if i is not None:
            break
    else:
        raise AssertionError(f"no {kind} frame")
    f = unpack(frames[i])
    f["erc"][name] = value
    frames[i] = pack(f)
    write_frames(seg.path, frames)
    for keys in ([], ["--data-key", trail.data]):
        code, out, _ = cli("audit", "verify", str(d), "--pubkey", trail.pub, *keys)
        assert code == 1 and "malformed encrypted record" in out, out
        assert "\x1b" not in out
    code, out, err = cli("audit", "export", str(d), "--data-key", trail.data)
    assert code == 1 and seg.name in err and "malformed encrypted record" in err, err


# ------------------------------------------------- F2: lines collect cannot read as ours


def _rsyslog_file(t: Trail, tmp: Path, extra: list[str]) -> list[str]:
    f = tmp / "received.log"
    f.write_text("\n".join(t.lines + extra) + "\n")
    return [str(f)]


def _deny_message(t: Trail) -> tuple[str, int]:
    for line in t.lines:
        if '"kind":"erc"' in line and '"d":"deny"' in line and '"frame"' not in line:
            obj = line[line.find('{"seq":'):]
            return line, json.loads(obj)["seq"]
    raise AssertionError("no deny record message")


def _without(text: str, start: str, end: str) -> str:
    return text[:text.find(start)] + text[text.find(end):]


# Each: the genuine message of a deny made a line a SIEM may show as an allow.
HOSTILE_LINES: dict[str, Callable[[str], str]] = {
    "a member twice": lambda m: m.replace('"d":"deny"', '"d":"allow","d":"deny"'),
    "seq as text": lambda m: m.replace('{"seq":', '{"seq":"', 1).replace(
        ',"kind"', '","kind"', 1).replace('"d":"deny"', '"d":"allow"'),
    "no prev": lambda m: _without(m, ',"prev":', ',"record":').replace('"d":"deny"',
                                                                        '"d":"allow"'),
    "the record twice": lambda m: m.replace('"record":{', '"record":{"d":"allow"},"record":{'),
    "a raw control character": lambda m: m.replace('"d":"deny"', '"d":"allow\x1b[1K"'),
    "the JSON spaced (only the structured data is ours)": lambda m: m.replace(
        '{"seq":', '{ "seq": ', 1).replace('"d":"deny"', '"d":"allow"'),
    "a frame that is not base64": lambda m: m[:m.find('{"seq":')] + m[m.find('{"seq":'):]
    .split(',"prev"')[0] + ',"frame":"!!!"}',
}


@pytest.mark.parametrize("how", list(HOSTILE_LINES))
def test_a_line_like_ours_naming_a_seq_read_is_broken(trail: Trail, tmp_path: Path,
                                                      how: str) -> None:
    line, seq = _deny_message(trail)
    forged = HOSTILE_LINES[how](line)
    assert forged != line
    files = _rsyslog_file(trail, tmp_path, [forged])
    out = tmp_path / "collected"
    code, stdout, err = cli("audit", "collect", *files, "-o", str(out))
    assert code == 1 and err.startswith("BROKEN:"), (stdout, err)
    assert f"{files[0]}:{len(trail.lines) + 1}" in err and f"seq {seq}" in err, err
    assert "\x1b" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("how", list(HOSTILE_LINES))
def test_a_line_like_ours_naming_no_seq_read_is_counted(trail: Trail, tmp_path: Path,
                                                        how: str) -> None:
    """The same line for a seq no message holds (a message cut by the collector, say): the
    trail is rebuilt (verify shows any gap), the line counted and placed."""
    line, seq = _deny_message(trail)
    forged = re.sub(r'(seq\W{0,3}?[:=]\s*"?\s*)' + str(seq) + "(?![0-9])", r"\g<1>987654321",
                    HOSTILE_LINES[how](line))
    assert forged.count("987654321") == 2, forged
    files = _rsyslog_file(trail, tmp_path, [forged, forged])
    code, stdout, err = cli("audit", "collect", *files, "-o", str(tmp_path / "collected"))
    assert code == 0, (stdout, err)
    n = len(trail.lines)
    assert "2 lines that look like audit messages were skipped" in err, err
    assert f"{files[0]}:{n + 1}, {files[0]}:{n + 2}" in err, err
