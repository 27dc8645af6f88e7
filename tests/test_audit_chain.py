"""The hash chain on bytes alone: encoding, linking, and every kind of tampering."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from sidecar.audit.chain import (
    ALG_HMAC,
    GENESIS,
    LENGTH,
    ChainError,
    ChainHead,
    ChainVerifier,
    FrameError,
    decode_frame,
    link_digest,
)

KEY = b"k" * 32


def _split(data: bytes) -> list[bytes]:
    """Length-prefixed frames -> payloads."""
    out, i = [], 0
    while i < len(data):
        (n,) = LENGTH.unpack(data[i:i + 4])
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _segment(n: int = 5, key: bytes | None = None, seal: bool = True) -> list[bytes]:
    head = ChainHead(key=key)
    data = head.header(1.0) + head.records({"t": float(i), "id": f"r{i}"} for i in range(n))
    if seal:
        data += head.frame("end", {"why": "shutdown"})
    return _split(data)


def _check(payloads: list[bytes], key: bytes | None = None, **kw: bool) -> ChainVerifier:
    v = ChainVerifier(key, **kw)
    v.start_segment()
    for p in payloads:
        v.accept(p)
    return v


def test_genesis_and_links() -> None:
    frames = _segment()
    first = msgpack.unpackb(frames[0])
    assert first["seq"] == 0 and first["prev"] == GENESIS and first["seg"]["alg"] == "sha256"
    second = msgpack.unpackb(frames[1])
    assert second["prev"] == hashlib.sha256(frames[0]).digest()
    v = _check(frames)
    assert v.last is not None and v.last.seq == 6 and v.sealed


def test_records_batch_equals_one_by_one() -> None:
    a, b = ChainHead(), ChainHead()
    wires = [{"t": float(i)} for i in range(4)]
    assert a.records(wires) == b"".join(b.records([w]) for w in wires)
    assert a.state == b.state


@pytest.mark.parametrize("first_seq", [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32])
@pytest.mark.parametrize("encrypted", [False, True])
def test_spliced_frames_are_exactly_the_packed_frame_maps(first_seq: int, encrypted: bool) -> None:
    # Frames are spliced from fixed bytes around the record's one msgpack encoding (and
    # ``erc`` bodies around the ciphertext): byte for byte what packing the map gives, for
    # every msgpack int width of seq and every bin header width of the ciphertext.
    from sidecar.audit.crypto import Decryptor, Encryptor

    key = b"d" * 32
    encryptor = Encryptor(key) if encrypted else None
    head = ChainHead(first_seq)
    head.journal = []
    wires = [{"t": 1.0, "path": "p" * n} for n in (0, 200, 300, 70_000)]
    data = head.records(wires, encryptor)
    payloads = _split(data)
    assert len(payloads) == len(wires) == len(head.journal)
    for payload, (seq, kind, journalled, _digest, wire) in zip(payloads, head.journal,
                                                             strict=True):
        assert payload == journalled
        obj = msgpack.unpackb(payload)
        assert obj["seq"] == seq and kind == ("erc" if encrypted else "rec")
        assert payload == msgpack.packb(obj, use_bin_type=True)
        if encrypted:
            header = {"enc": {"kid": encryptor.kid}}  # type: ignore[union-attr]
            assert Decryptor([key]).record(seq, obj["erc"], header) == wire
        else:
            assert obj["rec"] == wire


@pytest.mark.parametrize("first_seq", [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32])
@pytest.mark.parametrize("encrypted", [False, True])
def test_format_2_frames_are_exactly_the_packed_frame_maps(first_seq: int,
                                                           encrypted: bool) -> None:
    # json_records splices the usual frame (a 2- or 4-byte seq, a str16 text) with struct
    # calls and every other one from parts: byte for byte what packing the map gives, for
    # every msgpack int width of seq and str header width of the text, and the chain goes
    # over those plaintext frames, encrypted or not.
    from sidecar.audit.chain import FORMAT_JSON, json_record_frame
    from sidecar.audit.crypto import Encryptor

    head = ChainHead(first_seq)
    head.journal, head.version = [], FORMAT_JSON
    texts = [b'{"p":"' + b"p" * n + b'"}' for n in (0, 25, 26, 245, 246, 300, 65_529, 70_000)]
    data = head.json_records([None] * len(texts), texts, Encryptor(b"d" * 32) if encrypted else None)
    payloads = _split(data)
    assert len(payloads) == len(texts) == len(head.journal)
    prev = GENESIS
    for i, (payload, (seq, kind, journalled, digest, detail)) in enumerate(
            zip(payloads, head.journal, strict=True)):
        assert payload == journalled and seq == first_seq + i
        plain = json_record_frame(seq, prev, texts[i])
        assert plain == msgpack.packb({"seq": seq, "prev": prev, "rec": texts[i].decode()},
                                      use_bin_type=True)
        assert digest == hashlib.sha256(plain).digest() and detail == (prev, texts[i])
        obj = msgpack.unpackb(payload)
        assert payload == msgpack.packb(obj, use_bin_type=True)
        if encrypted:
            assert kind == "erc" and obj["erc"]["d"] == digest
        else:
            assert kind == "rec" and payload == plain
        prev = digest
    assert head.state == (first_seq + len(texts), prev)


def test_restore_rolls_back_the_head() -> None:
    head = ChainHead()
    state = head.state
    head.records([{"t": 1.0}])
    head.restore(state)
    assert head.state == (0, GENESIS)


@pytest.mark.parametrize("index", [1, 3])
def test_edited_frame_breaks_the_next_link(index: int) -> None:
    frames = _segment()
    body = msgpack.unpackb(frames[index])
    body["rec"]["id"] = "forged"
    frames[index] = msgpack.packb(body)
    with pytest.raises(ChainError, match="does not chain") as exc:
        _check(frames)
    assert exc.value.seq == index + 1


def test_deleted_swapped_inserted_frames() -> None:
    frames = _segment()
    with pytest.raises(ChainError, match="seq skipped from 1 to 3"):
        _check(frames[:2] + frames[3:])
    with pytest.raises(ChainError, match="seq skipped"):
        _check([frames[0], frames[2], frames[1], *frames[3:]])
    # An insertion that keeps seq and prev right for itself still breaks the next frame.
    forged = msgpack.packb({"seq": 2, "prev": hashlib.sha256(frames[1]).digest(),
                            "rec": {"t": 0.0}})
    with pytest.raises(ChainError, match="seq 2 reused after seq 2"):
        _check(frames[:2] + [forged] + frames[2:])


def test_structure_rules() -> None:
    frames = _segment()
    with pytest.raises(ChainError, match="does not start with a header"):
        _check(frames[1:])
    with pytest.raises(ChainError, match="after the segment's seal"):
        _check(frames + [frames[-1]])
    bad_genesis = msgpack.packb({"seq": 0, "prev": b"x" * 32,
                                 "seg": {"v": 1, "alg": "sha256"}})
    with pytest.raises(ChainError, match="all-zero prev"):
        _check([bad_genesis])
    mid_header = msgpack.packb({"seq": 1, "prev": link_digest(frames[0], None),
                                "seg": {"alg": "sha256"}})
    with pytest.raises(ChainError, match="middle of a segment"):
        _check([frames[0], mid_header])


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"seq": -1, "prev": GENESIS, "rec": {}}),
     msgpack.packb({"seq": 1, "prev": b"short", "rec": {}}),
     msgpack.packb({"seq": 1, "prev": GENESIS, "nope": {}}),
     msgpack.packb({"seq": 1, "prev": GENESIS, "rec": 5})],
)
def test_decode_frame_rejects_garbage(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(payload)


def test_retained_chain_may_start_above_zero() -> None:
    head = ChainHead(next_seq=100, prev=b"p" * 32)
    frames = _split(head.header(1.0) + head.records([{"t": 1.0}]))
    v = _check(frames)
    assert v.first is not None and v.first.seq == 100


def test_hmac_chain_needs_the_key_and_a_keyed_verifier_refuses_plain_sha256() -> None:
    frames = _segment(key=KEY)
    assert msgpack.unpackb(frames[0])["seg"]["alg"] == ALG_HMAC
    assert _check(frames, KEY, require_mac=True).sealed
    with pytest.raises(ChainError, match="HMAC key is needed"):
        _check(frames)
    with pytest.raises(ChainError, match="does not chain"):
        _check(frames, b"w" * 32)
    # An attacker without the key rebuilds the chain with plain SHA-256: refused.
    with pytest.raises(ChainError, match="not HMAC-authenticated"):
        _check(_segment(), KEY, require_mac=True)
