"""Segment files on disk: verify catches tampering, reading, resume points."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from sidecar.audit.chain import LENGTH
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import (
    NOTE_NO_KEY,
    RecordFilter,
    find_resume_point,
    iter_records,
    iter_stored,
    list_segments,
    parse_time,
    read_frames,
    segment_name,
    verify,
)
from sidecar.config.audit import AuditConfig
from tests.harness import write_audit_trail


def write_trail(directory: Path, n: int, start: int = 0, **cfg: object) -> None:
    """Write ``n`` records through a real writer, in batches of 4, then close it."""
    config = AuditConfig(path=str(directory), fsync=False, **cfg)  # type: ignore[arg-type]
    write_audit_trail(config, (AuditRecord(time=1000.0 + i, request_id=f"r{i}",
                                           peer=f"spiffe://td/p{i % 3}",
                                           decision="allow" if i % 2 else "deny",
                                           rule=f"rule{i % 2}")
                               for i in range(start, start + n)), batch=4, pause=0.001)


def frames_of(path: str) -> list[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        return list(read_frames(fh))


def segment_paths(directory: Path) -> list[str]:
    return [s.path for s in list_segments(str(directory))]


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    d = tmp_path / "audit"
    write_trail(d, 60, max_segment_bytes=4096)
    return d


def test_intact_trail_verifies(trail: Path) -> None:
    assert len(segment_paths(trail)) >= 3
    result = verify(str(trail))
    assert result.ok and result.broken is None
    assert result.records == 60 and result.starts_at == 0 and result.sealed
    assert result.notes == [NOTE_NO_KEY] and result.findings == []
    assert [r.request_id for r in iter_records(str(trail))] == [f"r{i}" for i in range(60)]


def _rewrite(path: str, payloads: list[bytes]) -> None:
    with open(path, "wb") as fh:
        for p in payloads:
            fh.write(LENGTH.pack(len(p)) + p)


def test_edited_byte_is_caught(trail: Path) -> None:
    path = segment_paths(trail)[1]
    offset, payload = frames_of(path)[2]
    i = payload.rfind(b"rule")  # inside the rule name string: still valid msgpack
    data = bytearray(Path(path).read_bytes())
    data[offset + 4 + i] ^= 0x01
    Path(path).write_bytes(bytes(data))
    result = verify(str(trail))
    assert not result.ok and result.broken is not None
    assert result.broken.segment == os.path.basename(path)
    assert result.broken.seq == msgpack.unpackb(payload)["seq"] + 1


@pytest.mark.parametrize("how", ["delete", "swap", "insert"])
def test_deleted_swapped_inserted_records_are_caught(trail: Path, how: str) -> None:
    path = segment_paths(trail)[1]
    payloads = [p for _, p in frames_of(path)]
    if how == "delete":
        del payloads[3]
    elif how == "swap":
        payloads[2], payloads[3] = payloads[3], payloads[2]
    else:
        payloads.insert(3, payloads[2])
    _rewrite(path, payloads)
    result = verify(str(trail))
    assert not result.ok and result.broken is not None
    assert result.broken.segment == os.path.basename(path)


def test_truncated_segment_is_caught(trail: Path) -> None:
    path = segment_paths(trail)[-1]
    size = os.path.getsize(path)
    os.truncate(path, size - 3)
    result = verify(str(trail))
    assert not result.ok and result.broken is not None
    assert "truncated" in result.broken.message


def test_middle_segment_cut_at_a_frame_boundary_is_caught(trail: Path) -> None:
    path = segment_paths(trail)[1]
    offsets = frames_of(path)
    os.truncate(path, offsets[-2][0])  # drop the seal and the last record cleanly
    result = verify(str(trail))
    assert not result.ok and result.broken is not None


def test_missing_middle_segment_is_caught(trail: Path) -> None:
    os.unlink(segment_paths(trail)[1])
    result = verify(str(trail))
    assert not result.ok and result.broken is not None
    assert "missing" in result.broken.message


def test_missing_oldest_segment_is_reported_not_hidden(trail: Path) -> None:
    os.unlink(segment_paths(trail)[0])
    result = verify(str(trail))
    assert result.starts_at and result.starts_at > 0
    assert any("retained chain starts at seq" in n for n in result.notes)
    # The writer keeps every segment (retention: all in its headers): not retention, a
    # removal (tests/test_audit_forged_tails.py has the family, retention on and off).
    assert not result.ok and [f.code for f in result.errors] == ["oldest_segments_missing"]
    assert not verify(str(trail), require_genesis=True).ok


def test_one_segment_file_and_unsealed_note(trail: Path) -> None:
    first = segment_paths(trail)[0]
    assert verify(first).ok
    last = segment_paths(trail)[-1]
    os.truncate(last, frames_of(last)[-1][0])  # remove the final seal cleanly
    result = verify(str(trail))
    assert result.ok and not result.sealed
    assert any("not sealed" in n for n in result.notes)


def test_empty_directory_and_missing_path(tmp_path: Path) -> None:
    assert not verify(str(tmp_path)).ok
    assert not verify(str(tmp_path / "nope")).ok


def test_filters_and_stored_seq(trail: Path) -> None:
    f = RecordFilter(since=1010.0, until=1019.0, decision="allow", peer="spiffe://td/p1")
    got = [r.request_id for r in iter_records(str(trail), f)]
    assert got == [f"r{i}" for i in range(10, 20) if i % 2 and i % 3 == 1]
    seqs = [s.seq for s in iter_stored(str(trail))]
    assert seqs == sorted(seqs) and len(set(seqs)) == 60


def test_reading_stops_at_damage_and_reports_it(trail: Path) -> None:
    path = segment_paths(trail)[0]
    os.truncate(path, frames_of(path)[-1][0] - 2)  # into the last record before the seal
    damage: list[str] = []
    records = list(iter_stored(str(trail), on_damage=damage.append))
    # (the last good frame's records are not shown: nothing after the damage links to it,
    # the twenty-ninth session's review of the readers)
    assert damage and "truncated" in damage[0] and len(records) == 58
    assert any("are not shown" in d for d in damage), damage


def test_resume_point(trail: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert find_resume_point(str(tmp_path / "empty"), None).next_seq == 0
    rp = find_resume_point(str(trail), None)
    result = verify(str(trail))
    assert rp.next_seq == (result.head_seq or 0) + 1 and rp.prev == result.head_digest
    assert rp.sealed and rp.damage is None
    last = segment_paths(trail)[-1]
    os.truncate(last, os.path.getsize(last) - 1)
    rp2 = find_resume_point(str(trail), None)
    assert rp2.damage and "truncated" in rp2.damage and rp2.next_seq == rp.next_seq - 1
    # A newest segment with no good frame at all: resume from the one before.
    Path(trail / segment_name(10**6, 0.0)).write_bytes(b"\x00\x00")
    rp3 = find_resume_point(str(trail), None)
    assert rp3.next_seq == rp2.next_seq and rp3.damage is not None


def test_segment_names_sort_in_chain_order(tmp_path: Path) -> None:
    names = [segment_name(s, 1700000000.25) for s in (10, 9, 100)]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [s.start_seq for s in list_segments(str(tmp_path))] == [9, 10, 100]
    assert names[0] == "audit-00000000000000000010-20231114T221320250000Z.log"


# Names that only look like segment names: a second name for one segment's bytes made
# export and tail read its records twice (found by a hostile review). Each is ignored.
LOOKALIKE_NAMES = [
    "audit-00000000000000000010-20231114T221320250000Z.log\n",  # `$` matched before it
    "audit-0000000000000000001\u0660-20231114T221320250000Z.log",  # an Arabic-Indic zero
    "audit-00000000000000000010-2023111\uff14T221320250000Z.log",  # a fullwidth four
    "audit-00000000000000000010-20231114T221320250000Z.log.bak",
    "x-audit-00000000000000000010-20231114T221320250000Z.log",
]


@pytest.mark.parametrize("name", LOOKALIKE_NAMES)
def test_only_names_the_writer_makes_are_segments(tmp_path: Path, name: str) -> None:
    real = segment_name(10, 1700000000.25)
    (tmp_path / real).write_bytes(b"")
    (tmp_path / name).write_bytes(b"")
    assert [s.name for s in list_segments(str(tmp_path))] == [real]


def test_export_reads_a_trail_with_a_lookalike_copy_once(trail: Path) -> None:
    before = len(list(iter_records(str(trail))))
    first = list_segments(str(trail))[0]
    (trail / (first.name + "\n")).write_bytes(Path(first.path).read_bytes())
    assert len(list(iter_records(str(trail)))) == before


def test_parse_time() -> None:
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2023-11-14T22:13:20Z") == 1700000000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1700000000.0
    assert parse_time("2023-11-14T22:13:20") == 1700000000.0
    with pytest.raises(ValueError):
        parse_time("yesterday")
