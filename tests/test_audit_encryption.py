"""Encryption at rest: round trip, wrong key, a flipped ciphertext byte; integrity checkable
with the public signing key alone; export, tail, verify and policy replay with --data-key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.audit.crypto import Decryptor, load_data_key, write_data_key
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import iter_records, list_segments, verify
from sidecar.audit.signing import load_keyring, write_keypair
from sidecar.audit.writer import AuditWriter
from sidecar.config.audit import AuditConfig
from tests.harness import sidecar_cli, spiffe, write_audit_trail, write_policy
from tests.test_audit_attacks import flip_denies, read_trail, rechain

ORDERS = spiffe("orders")
FRONTEND = spiffe("frontend")
N = 20


def record(i: int) -> AuditRecord:
    # (a tenth of a second apart: a signing writer's records before its first checkpoint
    # span no more than its time bound, and verify --data-key now dates encrypted ones)
    return AuditRecord(time=1000.0 + i / 10, request_id=f"secret-request-{i}", peer=FRONTEND,
                       method="GET", path=f"/orders/{i}", decision="deny" if i % 2 else "allow",
                       rule="reads", status=403 if i % 2 else 200)


def write(d: Path, data_key: Path, signing_key: Path | None = None) -> None:
    config = AuditConfig(path=str(d), fsync=False, encryption_key_file=str(data_key),
                         signing_key_file=str(signing_key) if signing_key else None,
                         max_segment_bytes=1500)
    write_audit_trail(config, (record(i) for i in range(N)), identity=ORDERS)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    priv, pub, _ = write_keypair(str(tmp_path / "sig"))
    write_data_key(str(tmp_path / "data"))
    write_data_key(str(tmp_path / "other"))
    return {"priv": priv, "pub": pub, "data": str(tmp_path / "data"),
            "other": str(tmp_path / "other")}


def test_round_trip_and_what_each_key_shows(tmp_path: Path, keys: dict[str, str]) -> None:
    d = tmp_path / "audit"
    write(d, Path(keys["data"]), Path(keys["priv"]))
    raw = b"".join(Path(s.path).read_bytes() for s in list_segments(str(d)))
    assert b"secret-request" not in raw and b"/orders/" not in raw and b"deny" not in raw
    # The public key alone: complete, in order, signed; records counted, not read.
    signed = verify(str(d), keyring=load_keyring([keys["pub"]]))
    assert signed.ok and signed.records == N and signed.unsigned_tail_records == 0, signed
    assert len(list_segments(str(d))) >= 2
    # The data key reads them.
    got = list(iter_records(str(d), decryptor=Decryptor([load_data_key(keys["data"])])))
    assert [r.request_id for r in got] == [f"secret-request-{i}" for i in range(N)]
    assert got[3] == record(3)
    out = sidecar_cli("audit", "export", str(d), "--data-key", keys["data"])
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["path"] for line in out.stdout.splitlines()] == \
        [f"/orders/{i}" for i in range(N)]
    tail = sidecar_cli("audit", "tail", str(d), "-n", "3", "--data-key", keys["data"])
    assert tail.returncode == 0 and [json.loads(x)["request_id"] for x in
                                     tail.stdout.splitlines()] == \
        [f"secret-request-{i}" for i in range(N - 3, N)]
    check = sidecar_cli("audit", "verify", str(d), "--pubkey", keys["pub"],
                        "--data-key", keys["data"])
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("key", ["none", "other"])
def test_without_or_with_the_wrong_key_nothing_is_read(tmp_path: Path, keys: dict[str, str],
                                                       key: str) -> None:
    d = tmp_path / "audit"
    write(d, Path(keys["data"]))
    args = [] if key == "none" else ["--data-key", keys["other"]]
    out = sidecar_cli("audit", "export", str(d), *args)
    assert out.returncode == 1 and out.stdout == ""
    # Another key has another key id: named, not tried.
    assert "not among the keys given" in out.stderr
    tail = sidecar_cli("audit", "tail", str(d), *args)
    assert tail.returncode == 1 and tail.stdout == ""
    if key == "other":
        check = sidecar_cli("audit", "verify", str(d), *args)
        # (a data key of another id is a missing key, exit 2, not damage: session 29)
        assert check.returncode == 2 and "give the data key for key id" in check.stderr


def test_flipped_ciphertext_byte(tmp_path: Path, keys: dict[str, str]) -> None:
    d = tmp_path / "audit"
    write(d, Path(keys["data"]), Path(keys["priv"]))
    data_key = ["--data-key", keys["data"]]

    def flip(segments: list) -> None:
        for _p, frames in segments:
            for f in frames:
                if "erc" in f:
                    c = bytearray(f["erc"]["c"])
                    c[0] ^= 1
                    f["erc"]["c"] = bytes(c)
                    return

    # Flipped and re-chained (the chain alone, without keys, cannot tell) ...
    rechain(d, flip)
    assert verify(str(d)).ok
    # ... the AEAD tag catches it for the data-key holder, the signatures for the auditor.
    out = sidecar_cli("audit", "export", str(d), *data_key)
    assert out.returncode == 1 and "does not decrypt" in out.stderr
    check = sidecar_cli("audit", "verify", str(d), *data_key)
    assert check.returncode == 1 and "does not decrypt" in check.stdout
    assert not verify(str(d), keyring=load_keyring([keys["pub"]])).ok


def test_flipped_byte_in_place_breaks_the_chain(tmp_path: Path, keys: dict[str, str]) -> None:
    d = tmp_path / "audit"
    write(d, Path(keys["data"]))
    seg = list_segments(str(d))[0].path
    data = bytearray(Path(seg).read_bytes())
    data[-40] ^= 0x10  # inside the last frames' ciphertext
    Path(seg).write_bytes(bytes(data))
    assert not verify(str(d)).ok


def test_review_attack_on_an_encrypted_trail(tmp_path: Path, keys: dict[str, str]) -> None:
    """Re-chaining ciphertext needs no data key; the signatures still catch it."""
    d = tmp_path / "audit"
    write(d, Path(keys["data"]), Path(keys["priv"]))
    segments = read_trail(d)
    assert not any("rec" in f for _p, fr in segments for f in fr)
    def drop_first_record(segs: list) -> None:
        for _p, fr in segs:
            for i, f in enumerate(fr):
                if "erc" in f:
                    del fr[i]
                    return

    rechain(d, drop_first_record)
    assert verify(str(d)).ok
    assert not verify(str(d), keyring=load_keyring([keys["pub"]])).ok
    assert flip_denies  # the plaintext attack of test_audit_attacks needs the data key


def test_policy_replay_reads_an_encrypted_trail(tmp_path: Path, keys: dict[str, str]) -> None:
    d = tmp_path / "audit"
    write(d, Path(keys["data"]))
    policy = write_policy(tmp_path / "mesh.yaml", {
        "version": 1, "trust_domain": "demo.local", "services": {ORDERS: {"rules": [
            {"name": "reads", "allow": {"from": [FRONTEND], "paths": ["/orders/**"]}}]}}})
    blind = sidecar_cli("policy", "replay", policy, "--audit", str(d), "--identity", ORDERS)
    assert blind.returncode == 2 and "undecryptable" in blind.stderr
    out = sidecar_cli("policy", "replay", policy, "--audit", str(d), "--identity", ORDERS,
                      "--data-key", keys["data"], "--format", "json")
    assert out.returncode == 1, out.stdout + out.stderr  # the recorded denies now allowed
    result = json.loads(out.stdout)
    assert result["replayed"] == N and len(result["changed"]) == N // 2


def test_data_key_problems(tmp_path: Path) -> None:
    from sidecar.errors import ConfigError

    bad = tmp_path / "bad"
    bad.write_text("c2hvcnQ=\n")  # base64 of 5 bytes
    with pytest.raises(ConfigError, match="encryption_key_file"):
        AuditWriter(AuditConfig(path=str(tmp_path / "a"), encryption_key_file=str(bad)))
    out = sidecar_cli("audit", "export", str(tmp_path), "--data-key", str(bad))
    assert out.returncode == 2 and "32 bytes in base64" in out.stderr
    k = sidecar_cli("audit", "keygen", str(tmp_path / "dk"), "--data-key")
    assert k.returncode == 0 and len(load_data_key(str(tmp_path / "dk.data"))) == 32


@pytest.mark.parametrize("fsync", [True, False])
def test_a_rotated_data_key_encrypts_the_next_segment(
        tmp_path: Path, keys: dict[str, str], fsync: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The data key's Secret is rotated (a kubelet-style volume swap): at the next batch the
    segment is sealed and the next one, named for the new key, holds the records after it,
    without a restart. The same key written again, a file caught half written, and a removed
    file change nothing (the last two are said once each). Both keys read the whole trail;
    either alone does not."""
    import io

    import trio

    from sidecar import logs
    from sidecar.audit import writer as writer_module
    from sidecar.audit.chain import decode_frame
    from sidecar.audit.crypto import data_key_id
    from sidecar.audit.segments import read_frames
    from tests.harness import KubeletVolume

    monkeypatch.setattr(writer_module, "DATA_KEY_RECHECK_SECONDS", 0.0)  # every batch
    a, b = (Path(keys[k]).read_bytes() for k in ("data", "other"))
    kid_a, kid_b = (data_key_id(load_data_key(keys[k])) for k in ("data", "other"))
    volume = KubeletVolume(tmp_path / "data-key")
    volume.publish({"key": a})
    d = tmp_path / "audit"
    config = AuditConfig(path=str(d), fsync=fsync, encryption_key_file=volume.path("key"),
                         signing_key_file=keys["priv"], batch_linger_seconds=0)
    writer = AuditWriter(config, identity=ORDERS)

    def header_kids() -> list[str]:
        kids = []
        for seg in list_segments(str(d)):
            with open(seg.path, "rb") as fh:
                _off, payload = next(read_frames(fh))
            _seq, _prev, kind, body = decode_frame(payload)
            assert kind == "seg"
            kids.append(body["enc"]["kid"])
        return kids

    async def main() -> None:
        async def burst(start: int) -> None:
            for i in range(start, start + 10):
                assert writer.submit(record(i))
            with trio.fail_after(10):
                while writer.written < start + 10:
                    await trio.sleep(0.005)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                await burst(0)
                assert header_kids() == [kid_a]
                volume.publish({"key": b})
                await burst(10)
                assert header_kids() == [kid_a, kid_b]
                for content in (b + b"\n\n",  # the same key: no new segment
                                b"c2hvcnQ=\n",  # not 32 bytes: the last key stays
                                None):  # removed: likewise
                    volume.publish({"key": content} if content is not None else {"x": b""})
                    await burst(writer.written)
                    assert header_kids() == [kid_a, kid_b]
                await writer.aclose()

    out = io.StringIO()
    logs.configure(stream=out)
    try:
        trio.run(main)
    finally:
        logs.reset()
    total = 50
    both = Decryptor([load_data_key(keys["data"]), load_data_key(keys["other"])])
    checked = verify(str(d), keyring=load_keyring([keys["pub"]]), decryptor=both)
    assert checked.ok and checked.sealed and checked.records == total, checked
    got = list(iter_records(str(d), decryptor=both))
    assert [r.request_id for r in got] == [f"secret-request-{i}" for i in range(total)]
    for only in ("data", "other"):
        one = verify(str(d), keyring=load_keyring([keys["pub"]]),
                     decryptor=Decryptor([load_data_key(keys[only])]))
        assert not one.ok
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    reloaded = [e for e in events if e["event"] == "audit_data_key_reloaded"]
    assert [(e["kid"], e["previous_kid"]) for e in reloaded] == [(kid_b, kid_a)]
    invalid = [e for e in events if e["event"] == "audit_data_key_invalid"]
    assert len(invalid) == 2 and all(e["kid"] == kid_b for e in invalid)
    # The segment the rotation ended is sealed for rotation, signed like any seal.
    assert checked.unsigned_tail_records == 0
