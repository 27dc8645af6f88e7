"""Hostile trails: records, anchors and key files whose fields have the wrong type or value,
written by the real ``AuditWriter`` (which stores a plain ``dict`` entry as it is, signed
like any other) and read by the real CLI (``python -m sidecar ...``).

The family is data: every stored field of a record x every wrong type (``WRONG``). Each
member must be reported -- ``verify``: a ``malformed_record`` error naming its seq and
field; ``export`` / ``tail`` / ``policy replay``: one line on stderr naming the seq, the
record skipped, the rest read -- and never end in a Python traceback (docs/audit.md, CLI).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sidecar.audit.chain import LENGTH
from sidecar.audit.crypto import write_data_key
from sidecar.audit.record import MAX_TIME
from sidecar.audit.segments import list_segments, read_frames, verify
from sidecar.audit.signing import Checkpoint, load_keyring, write_keypair
from sidecar.config.audit import AuditConfig
from tests.harness import ROOT, sidecar_cli, write_audit_trail

IDENT = "spiffe://demo.local/ns/demo/sa/orders"
POLICY = str(ROOT / "policies" / "demo.yaml")
GOOD: dict[str, Any] = {
    "t": 1000.0, "ev": "request", "id": "r", "dir": "inbound",
    "peer": "spiffe://demo.local/ns/demo/sa/frontend", "src": "10.0.0.1:5000",
    "iss": "https://idp", "sub": "alice", "jti": "ab" * 32, "key": "k1", "m": "GET",
    "host": "orders", "path": "/orders", "d": "allow", "rule": "frontend-reads-and-places-orders",
    "why": "allowed", "pv": "v1", "st": 200, "bi": 0, "bo": 10, "ms": 1.5,
    "x": {"service": IDENT, "port": 8443},
}

# What a reader must accept per stored key (docs/audit.md, "Record fields"); anything
# else is malformed. Written here from the documentation, not from the code under test.
TEXT = ("ev", "id", "dir", "src", "m", "host", "path", "d", "rule", "why", "pv")
OPTIONAL_TEXT = ("peer", "iss", "sub", "jti", "key")
COUNTS = ("st", "bi", "bo")


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _plain(v: Any) -> bool:
    """A value ``extra`` may hold: scalars, lists, maps with string keys, finite numbers."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_plain(i) for i in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(i) for k, i in v.items())
    return v is None or isinstance(v, str | bytes | bool | int)


def acceptable(key: str, value: Any) -> bool:
    if key in TEXT:
        return isinstance(value, str)
    if key in OPTIONAL_TEXT:
        return value is None or isinstance(value, str)
    if key in COUNTS:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if key == "t":
        return _finite_number(value) and 0 <= value <= MAX_TIME
    if key == "ms":
        return _finite_number(value)
    if key == "x":
        return value is None or (isinstance(value, dict) and _plain(value))
    return _plain(value)  # an unknown key (a newer writer's): goes to extra


WRONG: dict[str, Any] = {
    "none": None, "bool": True, "int": 7, "huge_int": 2**64 - 1, "nan": math.nan,
    "inf": math.inf, "str": "text", "bytes": b"\xff\xfe", "list": [1, 2], "map": {"a": 1},
}
KEYS = [*GOOD, "zz_unknown"]


def hostile_records(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """(what, stored record): every key of a record set to ``value`` in turn, between good
    records; plus the review's record (``x`` not a map next to an unknown key) and replay's
    own fields in ``x`` (``service``, ``port``)."""
    out: list[tuple[str, dict[str, Any]]] = [("good", dict(GOOD))]
    for key in KEYS:
        out.append((key, {**GOOD, "id": f"bad-{key}", key: value}))
    out.append(("x+unknown", {"t": 1.0, "x": value, "zz": 1}))
    out.append(("x.service", {**GOOD, "id": "bad-service", "x": {"service": value}}))
    out.append(("x.port", {**GOOD, "id": "bad-port", "x": {"service": IDENT, "port": value}}))
    out.append(("good", {**GOOD, "id": "last"}))
    return out


def expected_bad(what: str, rec: dict[str, Any], value: Any, *, replay: bool = False) -> bool:
    if what == "good":
        return False
    if what == "x+unknown":
        return not (acceptable("x", value) and acceptable("zz", 1))
    if what == "x.service":
        ok = acceptable("x", rec["x"])
        return not ok or (replay and not (value is None or isinstance(value, str)))
    if what == "x.port":
        ok = acceptable("x", rec["x"])
        port_ok = value is None or (isinstance(value, int) and not isinstance(value, bool)
                                    and 0 <= value <= 65535)
        return not ok or (replay and not port_ok)
    return not acceptable(what, value)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub, _ = write_keypair(str(d / "signing"))
    data = str(d / "d.data")
    write_data_key(data)
    return {"priv": priv, "pub": pub, "data": data}


def write_entries(directory: Path, entries: Iterable[Any], keys: dict[str, str],
                  **cfg: Any) -> None:
    config = AuditConfig(path=str(directory), fsync=False, signing_key_file=keys["priv"],
                         checkpoint_every_records=7, **cfg)
    write_audit_trail(config, entries, identity=IDENT, batch=4, pause=0.001)


def record_seqs(directory: Path) -> list[int]:
    out = []
    for seg in list_segments(str(directory)):
        with open(seg.path, "rb") as fh:
            for _o, payload in read_frames(fh):
                frame = msgpack.unpackb(payload, strict_map_key=False)
                if "rec" in frame or "erc" in frame:
                    out.append(frame["seq"])
    return out


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return sidecar_cli(*args, timeout=120)


@pytest.mark.parametrize("name", list(WRONG))
def test_every_field_with_a_wrong_type_is_reported_never_a_traceback(
        tmp_path: Path, keys: dict[str, str], name: str) -> None:
    value = WRONG[name]
    records = hostile_records(value)
    d = tmp_path / "audit"
    write_entries(d, [r for _w, r in records], keys)
    seqs = record_seqs(d)
    assert len(seqs) == len(records)
    bad = {seq for seq, (what, rec) in zip(seqs, records, strict=True)
           if expected_bad(what, rec, value)}
    bad_replay = {seq for seq, (what, rec) in zip(seqs, records, strict=True)
                  if expected_bad(what, rec, value, replay=True)}
    good = set(seqs) - bad

    # verify: one malformed_record error per bad record, naming its seq and field.
    result = verify(str(d), keyring=load_keyring([keys["pub"]]))
    found = {f.seq for f in result.findings if f.code == "malformed_record"}
    assert found == bad, (name, result.findings)
    assert result.ok is (not bad)
    for f in result.findings:
        assert "field" in f.message or "clear" in f.message

    with ThreadPoolExecutor(4) as pool:
        export, csv_export, tail, replay, cli_verify = pool.map(lambda a: run(*a), [
            ("audit", "export", str(d)),
            ("audit", "export", str(d), "--format", "csv", "--since", "0"),
            ("audit", "tail", str(d), "-n", "1000", "--since", "0"),
            ("policy", "replay", POLICY, "--audit", str(d), "--identity", IDENT),
            ("audit", "verify", str(d), "--pubkey", keys["pub"], "-o", "json"),
        ])
    for r in (export, csv_export, tail, replay, cli_verify):
        assert "Traceback" not in r.stderr, r.stderr
    # export and tail: the bad records skipped and named (one line each), exit 1.
    for r in (export, tail):
        assert r.returncode == (1 if bad else 0), r.stderr
        printed = {json.loads(line)["seq"] for line in r.stdout.splitlines()}
        assert printed == good
        named = [line for line in r.stderr.splitlines() if "malformed record" in line]
        assert len(named) == len(bad)
        for seq in bad:
            assert any(f"seq {seq}: malformed record: field" in line for line in named), seq
    assert csv_export.returncode == export.returncode
    assert len(csv_export.stdout.splitlines()) == 1 + len(good)
    # policy replay: exit 2 when a record could not be replayed ("no change" unproven).
    assert replay.returncode == 2 if bad_replay else replay.returncode in (0, 1), \
        replay.stdout + replay.stderr
    for seq in bad_replay:
        assert f"seq {seq}: malformed record" in replay.stderr
    doc = json.loads(cli_verify.stdout)
    assert cli_verify.returncode == (1 if bad else 0)
    assert {f["seq"] for f in doc["findings"] if f["code"] == "malformed_record"} == bad


def test_the_reviews_record_in_an_unsigned_tail(tmp_path: Path, keys: dict[str, str]) -> None:
    """{"t": 1.0, "x": "ab", "zz": 1}: verify said OK, export and tail crashed."""
    d = tmp_path / "audit"
    write_entries(d, [GOOD, {"t": 1.0, "x": "ab", "zz": 1}, GOOD], keys)
    result = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert not result.ok and [f.code for f in result.errors] == ["malformed_record"]
    assert "field 'x'" in result.errors[0].message
    for cmd in (("export", str(d)), ("tail", str(d))):
        r = run("audit", *cmd)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.count("malformed record") == 1 and len(r.stdout.splitlines()) == 2


def test_record_time_out_of_range_for_tail(tmp_path: Path, keys: dict[str, str]) -> None:
    for t in (math.nan, math.inf, -math.inf, 2**64 - 1, 1e300, -1e20, -1.0):
        d = tmp_path / f"audit-{t}"
        write_entries(d, [{**GOOD, "t": t}, GOOD], keys)
        r = run("audit", "tail", str(d), "--since", "10")
        assert r.returncode == 1 and "Traceback" not in r.stderr, (t, r.stderr)
        assert "field 't'" in r.stderr and len(r.stdout.splitlines()) == 1


def _frames(directory: Path) -> list[tuple[str, list[bytes]]]:
    out = []
    for seg in list_segments(str(directory)):
        with open(seg.path, "rb") as fh:
            out.append((seg.path, [p for _o, p in read_frames(fh)]))
    return out


def _rewrite(path: str, frames: list[dict[str, Any]]) -> None:
    """Re-chain one segment (SHA-256, as an attacker without any key can)."""
    import hashlib

    out = bytearray()
    prev = frames[0]["prev"]
    for f in frames:
        f["prev"] = prev
        payload = msgpack.packb(f, use_bin_type=True)
        out += LENGTH.pack(len(payload)) + payload
        prev = hashlib.sha256(payload).digest()
    Path(path).write_bytes(bytes(out))


def test_clear_records_in_an_encrypted_segment_are_a_problem(
        tmp_path: Path, keys: dict[str, str]) -> None:
    """A forger without the data key appends records in the clear to an encrypted segment
    (re-chained after the last checkpoint): a problem with or without --data-key, and
    never exported."""
    d = tmp_path / "audit"
    write_entries(d, [{**GOOD, "id": f"r{i}"} for i in range(10)], keys,
                  encryption_key_file=keys["data"])
    path, payloads = _frames(d)[-1]
    frames = [msgpack.unpackb(p) for p in payloads]
    last_chk = max(i for i, f in enumerate(frames) if "chk" in f)
    kept = frames[:last_chk + 1]
    seq = kept[-1]["seq"]
    forged = [{"seq": seq + 1 + i, "prev": b"", "rec": {**GOOD, "id": f"FORGED{i}"}}
              for i in range(3)]
    _rewrite(path, kept + forged)
    for data_key in (None, keys["data"]):
        from sidecar.audit.crypto import Decryptor, load_data_key

        dec = Decryptor([load_data_key(data_key)]) if data_key else None
        result = verify(str(d), keyring=load_keyring([keys["pub"]]), decryptor=dec)
        assert not result.ok
        assert {f.seq for f in result.errors if f.code == "malformed_record"} == \
            {seq + 1, seq + 2, seq + 3}
        assert "in the clear" in result.errors[0].message
    r = run("audit", "export", str(d), "--data-key", keys["data"])
    assert r.returncode == 1 and "FORGED" not in r.stdout and "Traceback" not in r.stderr
    assert r.stderr.count("in the clear") == 3
    assert len(r.stdout.splitlines()) == len(record_seqs(d)) - 3


def test_encrypted_records_in_a_clear_segment_are_a_problem(
        tmp_path: Path, keys: dict[str, str]) -> None:
    d = tmp_path / "audit"
    write_entries(d, [GOOD] * 3, keys)
    path, payloads = _frames(d)[-1]
    frames = [msgpack.unpackb(p) for p in payloads]
    i = next(i for i, f in enumerate(frames) if "rec" in f)
    frames[i] = {"seq": frames[i]["seq"], "prev": b"", "erc": {"n": b"0" * 12, "c": b"x" * 40}}
    _rewrite(path, frames)
    result = verify(str(d))
    assert not result.ok and [f.code for f in result.errors] == ["malformed_record"]
    assert "declares no encryption" in result.errors[0].message


# ---------------------------------------------------------------- files given to the CLI

# A public key on a curve the cryptography library cannot load (secp112r1).
EC112_PUB = """-----BEGIN PUBLIC KEY-----
MDIwEAYHKoZIzj0CAQYFK4EEAAYDHgAENhTQhmsWlY3FjCxinzhs2GUlbI0WAWDq
IKZvcw==
-----END PUBLIC KEY-----
"""


@pytest.fixture
def small_trail(tmp_path: Path, keys: dict[str, str]) -> Path:
    d = tmp_path / "audit"
    write_entries(d, [GOOD] * 3, keys)
    return d


def test_bad_key_and_anchor_files_are_errors_not_tracebacks(
        tmp_path: Path, small_trail: Path) -> None:
    d = str(small_trail)
    ec = tmp_path / "ec112.pub"
    ec.write_text(EC112_PUB)
    nolabel = tmp_path / "nolabel.pub"
    nolabel.write_text("-----BEGIN PUBLIC KEY\nxx\n-----END ")
    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 50000 + b"]" * 50000)
    deep2 = tmp_path / "deep2.json"
    deep2.write_bytes(b'{"checkpoint":' + b"[" * 30000 + b"]" * 30000 + b"}")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        ("--pubkey", str(ec)), ("--pubkey", str(nolabel)), ("--anchor", str(deep)),
        ("--anchor", str(deep2)), ("--pubkey", str(fifo)), ("--anchor", str(fifo)),
        ("--data-key", str(fifo)), ("--hmac-key-file", str(fifo)),
        ("--pubkey", "/dev/null"),
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: sidecar_cli("audit", "verify", d, *c, timeout=20),
                                cases))
    for case, r in zip(cases, results, strict=True):
        assert r.returncode == 2, (case, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), (case, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (case, r.stderr)
    assert "not a regular file" in results[4].stderr


def test_export_to_an_unwritable_output_is_exit_2(tmp_path: Path, small_trail: Path) -> None:
    for target in (tmp_path, tmp_path / "nonexistent" / "x"):
        r = run("audit", "export", str(small_trail), "-o", str(target))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: cannot write") and r.stdout == ""


@pytest.mark.parametrize("interval", ["nan", "inf", "-inf", "0", "-1"])
def test_tail_follow_interval_must_be_positive_and_finite(small_trail: Path,
                                                          interval: str) -> None:
    r = sidecar_cli("audit", "tail", str(small_trail), "-f", "--interval", interval,
                    timeout=20)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--interval" in r.stderr


def test_hmac_trail_without_its_key_is_a_missing_key_not_broken(
        tmp_path: Path, keys: dict[str, str]) -> None:
    """Checked with --pubkey alone, an HMAC trail cannot be verified: exit 2 with the key
    named, as for any key verify needs and was not given; never BROKEN."""
    hmac_key = tmp_path / "hmac"
    hmac_key.write_text("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\n")
    d = tmp_path / "audit"
    write_entries(d, [GOOD] * 10, keys, hmac_key_file=str(hmac_key))
    result = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert not result.ok and result.missing_key and "--hmac-key-file" in result.missing_key
    for extra in ([], ["-o", "json"]):
        r = run("audit", "verify", str(d), "--pubkey", keys["pub"], *extra)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith("error: cannot verify") and "--hmac-key-file" in r.stderr
        assert "BROKEN" not in r.stdout + r.stderr
    ok = run("audit", "verify", str(d), "--pubkey", keys["pub"], "--hmac-key-file", str(hmac_key))
    assert ok.returncode == 0, ok.stdout


# ------------------------------------------------------------------------------ anchors


def _anchored_trail(tmp_path: Path, keys: dict[str, str], **cfg: Any) -> tuple[Path, Any]:
    from sidecar.audit.writer import AuditWriter

    d = tmp_path / "audit"
    config = AuditConfig(path=str(d), fsync=False, signing_key_file=keys["priv"],
                         checkpoint_every_records=7, max_segment_bytes=4096, **cfg)
    writer: AuditWriter = write_audit_trail(config, [GOOD] * 40, identity=IDENT, batch=4,
                                            pause=0.001)
    assert writer.last_checkpoint is not None
    return d, writer.last_checkpoint.to_json()


def _anchor_variants(good: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The genuine anchor with one field changed, for every field it has."""
    import base64
    import copy

    out: dict[str, dict[str, Any]] = {}

    def variant(name: str, edit: Any) -> None:
        a = copy.deepcopy(good)
        edit(a)
        out[name] = a

    variant("kind", lambda a: a.update(kind="chk" if a["kind"] == "end" else "end"))
    variant("prev", lambda a: a.update(prev="00" * 32))
    variant("sig", lambda a: a.update(sig=base64.b64encode(bytes(64)).decode()))
    for key, value in good["fields"].items():
        changed: Any = {"time": value + 1.0 if isinstance(value, float) else value,
                        "id": "spiffe://demo.local/ns/evil/sa/x", "kid": "ffffffffffffffff",
                        "every": [1, 1.0], "why": "rotate"}.get(key, "x")
        if key == "time":
            changed = int(value)  # the same number as an int is another field value
        variant(f"field {key!r}", lambda a, k=key, v=changed: a["fields"].__setitem__(k, v))
        variant(f"field {key!r} removed", lambda a, k=key: a["fields"].pop(k))
    variant("field 'extra' added", lambda a: a["fields"].__setitem__("extra", 1))
    return out


def test_an_anchor_must_equal_the_chains_checkpoint_in_every_field(
        tmp_path: Path, keys: dict[str, str]) -> None:
    d, good = _anchored_trail(tmp_path, keys)
    keyring = load_keyring([keys["pub"]])
    assert verify(str(d), keyring=keyring, anchors=[Checkpoint.from_json(good)]).ok
    variants = _anchor_variants(good)
    assert {"kind", "prev", "sig", "field 'time'", "field 'id'", "field 'kid'",
            "field 'every'", "field 'why'"} <= set(variants)
    for name, obj in variants.items():
        anchor = Checkpoint.from_json(obj)
        field = name.replace(" removed", "").replace(" added", "")
        for ring in (None, keyring):
            result = verify(str(d), keyring=ring, anchors=[anchor])
            assert not result.ok, (name, ring)
            assert f"({field} differs)" in str(result.broken), (name, result.broken)
        # With the public key the anchor's own signature is checked too.
        result = verify(str(d), keyring=keyring, anchors=[anchor])
        assert "anchor_signature" in [f.code for f in result.errors], name
    # Through the CLI: exit 1, the field named.
    bad = tmp_path / "bad-anchor.json"
    bad.write_text(json.dumps({"checkpoint": variants["field 'id'"]}))
    r = run("audit", "verify", str(d), "--anchor", str(bad))
    assert r.returncode == 1 and "field 'id' differs" in r.stdout, r.stdout


def test_an_anchor_older_than_the_retained_chain_is_a_warning(
        tmp_path: Path, keys: dict[str, str]) -> None:
    """Honest retention: exit 0, but a warning line (and JSON finding) says plainly that
    the anchor could not be checked; the newest anchor is the one to give."""
    d, old = _anchored_trail(tmp_path, keys, max_segments=2)
    config = AuditConfig(path=str(d), fsync=False, signing_key_file=keys["priv"],
                         checkpoint_every_records=7, max_segment_bytes=4096, max_segments=2)
    new = write_audit_trail(config, [GOOD] * 60, identity=IDENT, batch=4, pause=0.001)
    assert list_segments(str(d))[0].start_seq > old["seq"]
    result = verify(str(d), keyring=load_keyring([keys["pub"]]),
                    anchors=[Checkpoint.from_json(old)])
    assert result.ok and [(f.severity, f.code) for f in result.findings] == \
        [("warning", "anchor_not_checked")]
    old_file, new_file = tmp_path / "old.json", tmp_path / "new.json"
    old_file.write_text(json.dumps(old))
    new_file.write_text(json.dumps({"checkpoint": new.last_checkpoint.to_json()}))
    r = run("audit", "verify", str(d), "--pubkey", keys["pub"], "--anchor", str(old_file))
    assert r.returncode == 0
    assert any(line.startswith("warning: anchor_not_checked") and "could NOT be checked" in line
               for line in r.stdout.splitlines()), r.stdout
    doc = json.loads(run("audit", "verify", str(d), "--pubkey", keys["pub"], "--anchor",
                         str(old_file), "-o", "json").stdout)
    assert [(f["severity"], f["code"]) for f in doc["findings"]] == \
        [("warning", "anchor_not_checked")]
    r = run("audit", "verify", str(d), "--pubkey", keys["pub"], "--anchor", str(new_file))
    assert r.returncode == 0 and "anchors: 1 matched" in r.stdout and "warning" not in r.stdout


# ------------------------------------------------------------------------------ restarts


def _cut_seal(directory: Path, after_last_checkpoint: bool = False) -> None:
    """A crash, or an attacker hiding one: the newest segment loses its seal (and, with
    ``after_last_checkpoint``, everything after its last checkpoint)."""
    path, payloads = _frames(directory)[-1]
    frames = [msgpack.unpackb(p) for p in payloads]
    assert "end" in frames[-1]
    keep = len(frames) - 1
    if after_last_checkpoint:
        keep = max(i for i, f in enumerate(frames) if "chk" in f) + 1
    data = b"".join(LENGTH.pack(len(p)) + p for p in payloads[:keep])
    Path(path).write_bytes(data)


def _append_segment(directory: Path, header: dict[str, Any], records: int) -> None:
    """A forged segment after the newest one: ``header``, then unsigned records."""
    import hashlib

    from sidecar.audit.segments import segment_name

    _path, payloads = _frames(directory)[-1]
    seq = msgpack.unpackb(payloads[-1])["seq"] + 1
    prev = hashlib.sha256(payloads[-1]).digest()
    frames = [{"seq": seq, "prev": prev, "seg": header}]
    frames += [{"seq": seq + 1 + i, "prev": b"", "rec": {**GOOD, "id": f"F{i}"}}
               for i in range(records)]
    name = directory / segment_name(seq, 1_900_000_000.0)
    name.write_bytes(b"")
    _rewrite(str(name), frames)


def _restart_header(after_seq: int, sealed: bool) -> dict[str, Any]:
    return {"v": 1, "alg": "sha256", "created": 1.9e9, "prev_segment": "x",
            "prev_sealed": sealed, "restart": {"time": 1.9e9, "after_seq": after_seq,
                                               "prev_sealed": sealed,
                                               "last_signed_seq": after_seq}}


@pytest.mark.parametrize("claim", [False, True])
def test_a_forged_restart_after_signed_checkpoints_is_a_problem(
        tmp_path: Path, keys: dict[str, str], claim: bool) -> None:
    """Cut back to the last checkpoint (the seal goes), then a forged restart segment with
    records within the unsigned bound: the real writer signs a checkpoint with every
    restart header, so its absence is an error with --pubkey; the header's claim that
    the segment before was sealed is checked against what verify saw."""
    d = tmp_path / "audit"
    write_entries(d, [GOOD] * 12, keys)
    _cut_seal(d, after_last_checkpoint=True)
    head = msgpack.unpackb(_frames(d)[-1][1][-1])["seq"]
    _append_segment(d, _restart_header(head, claim), 5)
    result = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert not result.ok and "restart_not_signed" in [f.code for f in result.errors]
    codes = [f.code for f in result.findings]
    assert "unsealed_restart" in codes  # observed, whatever the header says
    assert ("prev_sealed_mismatch" in codes) is claim
    plain = verify(str(d))
    assert [f.code for f in plain.errors] == (["prev_sealed_mismatch"] if claim else [])
    assert "unsealed_restart" in [f.code for f in plain.findings]


def test_a_restart_header_rewritten_to_hide_a_crash(tmp_path: Path,
                                                    keys: dict[str, str]) -> None:
    """A real restart after a crash says prev_sealed: false; rewriting it to true (and
    re-chaining) used to silence unsealed_restart without any key."""
    d = tmp_path / "audit"
    write_entries(d, [GOOD] * 10, keys)
    _cut_seal(d)
    write_entries(d, [GOOD] * 10, keys)  # the real writer restarts on the unsealed trail
    honest = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert honest.ok and [f.code for f in honest.findings] == ["unsealed_restart"]
    path, payloads = _frames(d)[-1]
    frames = [msgpack.unpackb(p) for p in payloads]
    assert frames[0]["seg"]["prev_sealed"] is False and "chk" in frames[1]
    frames[0]["seg"]["prev_sealed"] = True
    frames[0]["seg"]["restart"]["prev_sealed"] = True
    first_prev = frames[0]["prev"]
    _rewrite(path, frames)
    assert msgpack.unpackb(_frames(d)[-1][1][0])["prev"] == first_prev
    plain = verify(str(d))
    assert not plain.ok and [f.code for f in plain.errors] == ["prev_sealed_mismatch"]
    assert "unsealed_restart" in [f.code for f in plain.findings]
    signed = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert not signed.ok and "signature does not verify" in str(signed.broken)


def test_honest_restarts_stay_clean(tmp_path: Path, keys: dict[str, str]) -> None:
    d = tmp_path / "audit"
    for _run in range(3):
        write_entries(d, [GOOD] * 9, keys)  # clean shutdowns: sealed, then restarts
    result = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert result.ok and result.restarts == 2 and result.findings == [], result.findings


# ---------------------------------------------------------------------------- identities

OTHER = "spiffe://demo.local/ns/evil/sa/x"


def _trail_of(directory: Path, keys: dict[str, str], *identities: str) -> None:
    """One run per identity, all signed with the one key (a key shared in a namespace)."""
    for ident in identities:
        config = AuditConfig(path=str(directory), fsync=False, signing_key_file=keys["priv"],
                             checkpoint_every_records=7)
        write_audit_trail(config, [GOOD] * 10, identity=ident, batch=4, pause=0.001)


def test_verify_id_refuses_another_sidecars_trail(tmp_path: Path, keys: dict[str, str]) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    _trail_of(mine, keys, IDENT)
    _trail_of(theirs, keys, OTHER)
    ring = load_keyring([keys["pub"]])
    assert verify(str(mine), keyring=ring, identity=IDENT).ok
    result = verify(str(theirs), keyring=ring, identity=IDENT)
    assert not result.ok and result.identities == [OTHER]
    wrong = [f for f in result.errors if f.code == "wrong_identity"]
    assert len(wrong) == 1 and OTHER in wrong[0].message  # one finding per identity
    r = run("audit", "verify", str(theirs), "--pubkey", keys["pub"], "--id", IDENT)
    assert r.returncode == 1 and "wrong_identity" in r.stdout and OTHER in r.stdout
    r = run("audit", "verify", str(mine), "--pubkey", keys["pub"], "--id", IDENT)
    assert r.returncode == 0 and f"identity: {IDENT}" in r.stdout
    # Without --id the identity is printed, for the auditor to see whose trail it is.
    r = run("audit", "verify", str(theirs), "--pubkey", keys["pub"])
    assert r.returncode == 0 and f"identity: {OTHER}" in r.stdout.splitlines()
    doc = json.loads(run("audit", "verify", str(theirs), "--pubkey", keys["pub"],
                         "-o", "json").stdout)
    assert doc["identities"] == [OTHER]
    # An anchor naming another identity is refused by --id too, even one not in the chain.
    chk = _checkpoint_named(theirs)
    result = verify(str(mine), keyring=ring, identity=IDENT,
                    anchors=[Checkpoint.from_json(chk)])
    assert "wrong_identity" in [f.code for f in result.errors]


def _checkpoint_named(directory: Path) -> dict[str, Any]:
    for _path, payloads in _frames(directory):
        for p in payloads:
            f = msgpack.unpackb(p)
            if "chk" in f:
                return Checkpoint.from_frame(f["seq"], f["prev"], "chk", f["chk"]).to_json()
    raise AssertionError("no checkpoint")


def test_a_trail_naming_several_identities_is_a_problem_without_id(
        tmp_path: Path, keys: dict[str, str]) -> None:
    d = tmp_path / "audit"
    _trail_of(d, keys, IDENT, OTHER)  # another sidecar's run spliced onto this trail
    result = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert not result.ok and result.identities == [IDENT, OTHER]
    assert [f.code for f in result.errors] == ["several_identities"]
    r = run("audit", "verify", str(d), "--pubkey", keys["pub"])
    assert r.returncode == 1 and f"identities: {IDENT}, {OTHER}" in r.stdout


def test_verify_id_on_a_trail_that_names_nobody(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    write_audit_trail(AuditConfig(path=str(d), fsync=False), [GOOD] * 3, identity=IDENT)
    result = verify(str(d), identity=IDENT)
    assert not result.ok and [f.code for f in result.errors] == ["identity_not_named"]
    assert verify(str(d)).ok and verify(str(d)).identities == []


@pytest.mark.parametrize("records", [0, 3])
def test_a_forged_segment_claiming_hmac_after_a_plain_chain_is_broken(
        tmp_path: Path, keys: dict[str, str], records: int) -> None:
    """A forger appends a segment whose header says hmac-sha256 to a plain (signed) trail:
    without the HMAC key that was exit 2 ("cannot verify", as for a whole HMAC trail), so
    the forgery read as a setup problem. No key verifies both kinds of segment, so it is
    BROKEN (exit 1), naming the segment; a whole HMAC trail without its key stays exit 2."""
    d = tmp_path / "audit"
    write_entries(d, [GOOD] * 10, keys)
    head = msgpack.unpackb(_frames(d)[-1][1][-1])["seq"]
    header = {**_restart_header(head, True), "alg": "hmac-sha256"}
    _append_segment(d, header, records)
    result = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert not result.ok and result.missing_key is None
    assert result.broken is not None and "claims HMAC" in result.broken.message
    assert result.broken.seq == head + 1
    r = run("audit", "verify", str(d), "--pubkey", keys["pub"])
    assert r.returncode == 1 and "BROKEN" in r.stdout and "claims HMAC" in r.stdout
    assert "Traceback" not in r.stderr
