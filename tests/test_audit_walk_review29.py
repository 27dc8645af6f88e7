"""Hostile review 29 of the audit trail: an attacker who holds the audit directory. Every
trail is written by the real writer (``AuditWriter``, signing, HMAC, format-1 encrypted),
attacked on disk as the review did, and checked through the real CLI (``audit verify``,
``export``, ``tail``, ``policy replay``).

* F2: the whole trail replaced by a short forged history past the NEWEST anchor (joined like
  failed writes, sealed without a key, or headers only), then the real writer restarts and
  signs over it: ``verify --pubkey --id --anchor NEWEST`` said OK (``anchor_not_checked``, a
  warning). Now an error unless a signature vouches for the retained chain from its start
  (its first verified signature before any restart; a restart at the first frame with its
  checkpoint next is that writer's own start). Honest retention stays a warning.
* F3: a keyless writer's sealed history within ``every``, signed over by the restarted
  writer: OK with no finding. An unsigned seal before the first signature is now
  ``unsigned_start`` whatever the count (a warning with ``--accept-unsigned-start``).
* F4: the retention count was padded by header-only segments chained into the unsigned
  tail, and skipped when headers said ``all`` then ``N``. Now only segments the signatures
  cover count (and the one rotated into after a signed seal), and the mixed case is checked.
* F5: the readers checked seqs within a segment only: an old segment copied in, a segment
  twice, a middle one deleted passed, exit 0. F6: they checked no link: a deny edited to an
  allow in place was shown, exit 0.
* F8: verify's capped findings rescanned every finding per call, and per-segment findings
  were not capped. F9: a planted header at seq 2**64-1 killed the writer at start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sidecar.audit.chain import ALG_HMAC, LENGTH, link_digest
from sidecar.audit.config import AuditConfig
from sidecar.audit.crypto import write_data_key
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import find_resume_point, list_segments, read_frames, segment_name
from sidecar.audit.signing import write_keypair
from tests.harness import sidecar_cli, write_audit_trail
from tests.test_audit_ship import FRONTEND, ORDERS

EVERY = 10  # checkpoint_every_records of every trail here
VARIANTS = ("plain", "hmac", "enc1")


@dataclasses.dataclass(frozen=True)
class Keys:
    root: Path
    priv: str
    pub: str
    hmac: str
    data: str

    def hmac_key(self) -> bytes:
        return Path(self.hmac).read_bytes().strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("review29-keys")
    priv, pub, _ = write_keypair(str(root / "sig"))
    (root / "hmac.key").write_bytes(b"k" * 32)
    write_data_key(str(root / "d.data"))
    return Keys(root, priv, pub, str(root / "hmac.key"), str(root / "d.data"))


def config(keys: Keys, audit: Path, variant: str, *, signing: bool = True,
           **kw: Any) -> AuditConfig:
    """The real writer's configuration for ``variant``: plain SHA-256, HMAC, or format-1
    encrypted (a data key, no shipping)."""
    return AuditConfig(path=str(audit), fsync=False, checkpoint_every_records=EVERY,
                       signing_key_file=keys.priv if signing else None,
                       hmac_key_file=keys.hmac if variant == "hmac" else None,
                       encryption_key_file=keys.data if variant == "enc1" else None, **kw)


def records(n: int, start: int = 0) -> list[AuditRecord]:
    out = []
    for i in range(start, start + n):
        deny = i % 3 == 0
        out.append(AuditRecord(time=time.time(), request_id=f"rq{i:05d}", peer=FRONTEND,
                               source="10.0.0.1:5000", method="GET", path=f"/o/{i}",
                               decision="deny" if deny else "allow", status=403 if deny else 200,
                               rule="default deny" if deny else "reads",
                               reason="default_deny" if deny else "allowed",
                               extra={"service": ORDERS, "port": 8080}))
    return out


def write(keys: Keys, audit: Path, variant: str, n: int, start: int = 0, **kw: Any) -> Any:
    """``n`` records through a real writer (one run: a restart when ``audit`` has segments)."""
    return write_audit_trail(config(keys, audit, variant, **kw), records(n, start),
                             identity=ORDERS, batch=5, pause=0.001)


def key_args(keys: Keys, variant: str) -> list[str]:
    """What verify needs to check a ``variant`` trail with the public key."""
    args = ["--pubkey", keys.pub, "--id", ORDERS]
    if variant == "hmac":
        args += ["--hmac-key-file", keys.hmac]
    if variant == "enc1":
        args += ["--data-key", keys.data]
    return args


def payloads(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        return [p for _o, p in read_frames(fh)]


def write_frames(path: Path | str, frames: list[bytes]) -> None:
    Path(path).write_bytes(b"".join(LENGTH.pack(len(p)) + p for p in frames))


def unpack(payload: bytes) -> dict[str, Any]:
    return msgpack.unpackb(payload, raw=False)  # type: ignore[no-any-return]


def pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)  # type: ignore[no-any-return]


# The warning filters a fresh interpreter starts with (``python -m sidecar`` without -W).
_FRESH_FILTERS: list[tuple[Any, type[Warning], str | None]] = [
    ("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
    ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
    ("ignore", ResourceWarning, None)]


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


class _Busy(BaseException):
    """A job still busy after its time (no ``except Exception`` in the command takes it)."""


def cli_many(jobs: Any, *, timeout: float = 180.0) -> list[subprocess.CompletedProcess[str]]:
    """Each job's ``sidecar ARGS`` as ``tests.harness.sidecar_cli_many`` runs it --
    ``sidecar.cli.main(ARGS)``, stdout and stderr captured apart, the exit status as ``python
    -m sidecar`` gives it (``SystemExit`` read as the interpreter reads it; an escaped
    exception printed as a traceback on stderr, status 1), warnings printed on stderr as a
    fresh interpreter prints them -- but in this process: the families here check the
    commands' messages and exit status over many inputs, not the process boundary, and an
    interpreter started per test (about a quarter of a CPU-second) was most of their cost.
    (The process boundary of these commands: ``sidecar_cli`` in the honest-trail controls
    below, and the suite's CLI tests.) ``timeout`` bounds each job (an alarm, in the main
    thread): one still busy then fails the test, naming it."""
    if os.environ.get("SIDECAR_TEST_EXEC") == "1":  # (every command in a process of its own)
        return [sidecar_cli(*job, timeout=timeout) for job in jobs]
    from sidecar.cli import main

    results = []
    for job in jobs:
        argv = [str(a) for a in job]
        out, err = io.StringIO(), io.StringIO()
        code: int | str | None
        saved_stdin = sys.stdin
        sys.stdin = io.StringIO("")
        alarm = threading.current_thread() is threading.main_thread()
        if alarm:
            def busy(_sig: int, _frame: Any) -> None:
                raise _Busy
            previous = signal.signal(signal.SIGALRM, busy)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                    warnings.catch_warnings():
                warnings.resetwarnings()
                for action, category, module in reversed(_FRESH_FILTERS):
                    warnings.filterwarnings(action, category=category, module=module or "")
                warnings.showwarning = _show_warning
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
                except _Busy:
                    raise AssertionError(f"sidecar {' '.join(argv)}: still busy after "
                                         f"{timeout} s") from None
                except BaseException:  # noqa: BLE001 (as the interpreter reports it)
                    traceback.print_exc()
                    code = 1
        finally:
            sys.stdin = saved_stdin
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        if code is None:
            code = 0
        elif not isinstance(code, int):
            err.write(f"{code}\n")
            code = 1
        results.append(subprocess.CompletedProcess(["sidecar", *argv], code, out.getvalue(),
                                                   err.getvalue()))
    return results


def run(*jobs: list[str]) -> list[tuple[int, dict[str, Any] | str, str]]:
    """Each job through the real CLI (``cli_many``); verify's JSON parsed."""
    out = []
    for r in cli_many(jobs):
        assert "Traceback" not in r.stderr, r.stderr
        try:
            doc: dict[str, Any] | str = json.loads(r.stdout)
        except ValueError:
            doc = r.stdout
        out.append((r.returncode, doc, r.stderr))
    return out


def verify(d: Path, *args: str) -> list[str]:
    return ["audit", "verify", str(d), *args, "-o", "json"]


def codes(doc: Any, severity: str | None = None) -> set[str]:
    assert isinstance(doc, dict), doc
    return {f["code"] for f in doc["findings"] if severity in (None, f["severity"])}


class Forger:
    """Frames as someone holding the directory writes them (no signing key): plain SHA-256,
    or HMAC with the pod's HMAC key."""

    def __init__(self, seq: int, prev: bytes, hmac_key: bytes | None) -> None:
        self.seq, self.prev, self.key = seq, prev, hmac_key

    def frame(self, kind: str, body: dict[str, Any]) -> bytes:
        p = pack({"seq": self.seq, "prev": self.prev, kind: body})
        self.prev, self.seq = link_digest(p, self.key), self.seq + 1
        return p

    def history(self, audit: Path, count: int, *, sealed: bool, segments: int = 3,
                retention: Any = 3, prev_name: str | None = None, first: int = 0) -> str | None:
        """``segments`` segments holding ``count`` forged allow records in all, joined like
        failed writes (no seal, no restart) or sealed without a key; the last file name."""
        t0 = time.time() - 60
        per = [count // segments + (1 if i < count % segments else 0) for i in range(segments)]
        for i, n in enumerate(per):
            start, created = self.seq, t0 + i
            hdr: dict[str, Any] = {"v": 1, "alg": ALG_HMAC if self.key else "sha256",
                                   "created": created, "retention": retention}
            if prev_name:
                hdr.update(prev_segment=prev_name, prev_sealed=sealed)
            frames = [self.frame("seg", hdr)]
            for j in range(n):
                rec = AuditRecord(time=created + j / 100, request_id=f"forged{first + i}-{j}",
                                  peer=FRONTEND, method="GET", path="/admin",
                                  decision="allow", status=200, rule="r")
                frames.append(self.frame("rec", rec.to_wire()))
            if sealed:
                frames.append(self.frame("end", {"why": "rotate" if i < segments - 1
                                                 else "shutdown", "time": created + 0.5}))
            prev_name = segment_name(start, created)
            write_frames(audit / prev_name, frames)
        return prev_name


def anchor_file(writer: Any, path: Path) -> Path:
    """The writer's newest checkpoint, as ``/audit/head`` gives it, saved off the pod."""
    path.write_text(json.dumps({"checkpoint": writer.last_checkpoint.to_json()}))
    return path


# --------------------------------------------------------------------- F2 / F3: forged history

# (shape, forged records): joined like failed writes at and below ``every``, sealed by a
# keyless writer, header-only segments (the genuine trail simply deleted), and one over
# ``every`` (unsigned_start caught it already: the control of the count).
HISTORIES = [("joins", EVERY), ("joins", 1), ("sealed", EVERY), ("headers_only", 0),
             ("joins", EVERY + 1)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("shape", "count"), HISTORIES,
                         ids=[f"{s}-{c}" for s, c in HISTORIES])
def test_forged_history_past_the_newest_anchor_is_broken(
        keys: Keys, tmp_path: Path, variant: str, shape: str, count: int) -> None:
    """F2: the genuine trail deleted, a forged history written past its newest anchor, the
    real writer restarted over it: with that anchor BROKEN (``anchor_not_checked`` an
    error); without it, what the docs promise (a warning only within ``every`` unless a
    keyless seal shows, F3)."""
    audit = tmp_path / "audit"
    writer = write(keys, audit, variant, 25)
    anchor = anchor_file(writer, tmp_path / "newest.json")
    newest = writer.last_checkpoint.seq
    for seg in list_segments(str(audit)):
        Path(seg.path).unlink()
    forger = Forger(newest + 5000, bytes(32), keys.hmac_key() if variant == "hmac" else None)
    forger.history(audit, count, sealed=shape == "sealed")
    write(keys, audit, variant, 3, start=1000)  # the real sidecar restarts, signs over it
    (a_code, a_doc, _), (code, doc, _), (acc_code, acc_doc, _) = run(
        verify(audit, *key_args(keys, variant), "--anchor", str(anchor)),
        verify(audit, *key_args(keys, variant)),
        verify(audit, *key_args(keys, variant), "--accept-unsigned-start"))
    assert a_code == 1 and "anchor_not_checked" in codes(a_doc, "error"), a_doc
    if shape == "sealed" or count > EVERY:
        assert code == 1 and "unsigned_start" in codes(doc, "error"), doc
        # ``--accept-unsigned-start``: a warning, as for a trail that ran unsigned first.
        assert acc_code == 0 and "unsigned_start" in codes(acc_doc, "warning"), acc_doc
    else:
        # Within ``every`` and no keyless seal: what a crash leaves (documented).
        assert code == 0 and codes(doc, "error") == set(), doc


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("count", [1, EVERY - 1, EVERY, 3 * EVERY])
def test_keyless_sealed_history_is_unsigned_start(keys: Keys, tmp_path: Path, variant: str,
                                                  count: int) -> None:
    """F3: a real keyless writer's sealed history (any count, at and around ``every``), then
    the real writer with the key restarts: ``unsigned_start`` (error; a warning with
    ``--accept-unsigned-start``); a crash instead of the seal stays the documented
    ``unsealed_restart`` warning when within ``every``."""
    audit = tmp_path / "audit"
    write(keys, audit, variant, count, signing=False)
    write(keys, audit, variant, 3, start=1000)
    crashed = tmp_path / "crashed"
    write(keys, crashed, variant, count, signing=False)
    seg = list_segments(str(crashed))[-1].path
    frames = payloads(seg)
    assert "end" in unpack(frames[-1])
    write_frames(seg, frames[:-1])  # the seal cut: a crash
    write(keys, crashed, variant, 3, start=1000)
    (code, doc, _), (acc_code, acc_doc, _), (c_code, c_doc, _) = run(
        verify(audit, *key_args(keys, variant)),
        verify(audit, *key_args(keys, variant), "--accept-unsigned-start"),
        verify(crashed, *key_args(keys, variant)))
    assert code == 1 and "unsigned_start" in codes(doc, "error"), doc
    assert acc_code == 0 and "unsigned_start" in codes(acc_doc, "warning"), acc_doc
    if count <= EVERY:
        assert c_code == 0 and "unsealed_restart" in codes(c_doc, "warning"), c_doc
    else:
        assert c_code == 1 and "unsigned_start" in codes(c_doc, "error"), c_doc


@pytest.mark.parametrize("variant", VARIANTS)
def test_honest_retention_keeps_an_old_anchor_a_warning(keys: Keys, tmp_path: Path,
                                                        variant: str) -> None:
    """The controls of F2: anchors that honest retention left behind stay a warning, exit
    0 -- the oldest retained segment a rotation's (first signature before any restart), and
    one a restarted writer's (restart at the first frame, its checkpoint next)."""
    audit = tmp_path / "audit"
    first = write(keys, audit, variant, 60, max_segment_bytes=2048, max_segments=2)
    anchor = anchor_file(first, tmp_path / "old.json")
    rotated = tmp_path / "rotated"
    shutil.copytree(audit, rotated)
    write(keys, rotated, variant, 40, start=500, max_segment_bytes=2048, max_segments=2)
    # The restart's segment and exactly one rotation after it (its segments about 1.5 times
    # as large as the size limit): retention keeps those two.
    frames = [p for seg in list_segments(str(audit)) for p in payloads(seg.path)]
    per_frame = sum(len(p) + 4 for p in frames) / len(frames)
    write(keys, audit, variant, 20, start=500, max_segments=2,
          max_segment_bytes=int(per_frame * 24 / 1.5))
    segs = list_segments(str(audit))
    assert len(segs) == 2 and "restart" in unpack(payloads(segs[0].path)[0])["seg"], segs
    results = run(*(verify(d, *key_args(keys, variant), "--anchor", str(anchor))
                    for d in (rotated, audit)))
    for code, doc, _ in results:
        assert code == 0 and "anchor_not_checked" in codes(doc, "warning"), doc


# ------------------------------------------------------------------- F4: the retention count

def retention_trail(keys: Keys, audit: Path, variant: str) -> list[str]:
    """A real signing writer's trail that retention has cut (3 segments kept)."""
    write(keys, audit, variant, 120, max_segment_bytes=4096, max_segments=3)
    segs = [s.path for s in list_segments(str(audit))]
    assert len(segs) == 3 and unpack(payloads(segs[0])[0])["seq"] > 0, segs
    return segs


def pad(keys: Keys, audit: Path, variant: str, after: str, count: int) -> None:
    """``count`` header-only segments chained after segment file ``after`` (no key needed)."""
    last = payloads(after)[-1]
    key = keys.hmac_key() if variant == "hmac" else None
    forger = Forger(unpack(last)["seq"] + 1, link_digest(last, key), key)
    forger.history(audit, 0, sealed=False, segments=count, prev_name=Path(after).name)


# (what is done to the newest segment before padding, how many header-only segments)
PADDINGS = [("seal_cut", 1), ("seal_cut", 2), ("to_checkpoint", 1), ("to_checkpoint", 2)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("cut", "count"), PADDINGS, ids=[f"{c}-{n}" for c, n in PADDINGS])
def test_retention_count_is_not_padded_by_unsigned_segments(
        keys: Keys, tmp_path: Path, variant: str, cut: str, count: int) -> None:
    """F4a: the 2 oldest of 3 signed segments deleted, the newest cut (its seal, or back to
    its last checkpoint), header-only segments chained into the unsigned tail: still fewer
    segments covered by a signature than the writer keeps."""
    audit = tmp_path / "audit"
    segs = retention_trail(keys, audit, variant)
    # The newest segment holding a checkpoint is kept (the newest may hold only a few
    # records after its rotation); every other is deleted.
    base = [s for s in segs if any("chk" in unpack(p) for p in payloads(s))][-1]
    frames = payloads(base)
    if cut == "seal_cut":
        frames = frames[:-1]
    else:
        last_chk = max(i for i, p in enumerate(frames) if "chk" in unpack(p))
        frames = frames[:last_chk + 1]
    write_frames(base, frames)
    for s in segs:
        if s != base:
            Path(s).unlink()
    pad(keys, audit, variant, base, count)
    [(code, doc, _)] = run(verify(audit, *key_args(keys, variant)))
    assert code == 1 and "oldest_segments_missing" in codes(doc, "error"), doc


@pytest.mark.parametrize("variant", VARIANTS)
def test_retention_count_controls(keys: Keys, tmp_path: Path, variant: str) -> None:
    """The controls of F4a: a retention trail as written, and one whose newest segment holds
    only the header of the rotation into it (a crash right after): OK."""
    audit = tmp_path / "audit"
    segs = retention_trail(keys, audit, variant)
    crashed = tmp_path / "crashed"
    shutil.copytree(audit, crashed)
    newest = crashed / Path(segs[-1]).name
    write_frames(newest, payloads(str(newest))[:1])
    for code, doc, _ in run(verify(audit, *key_args(keys, variant)),
                            verify(crashed, *key_args(keys, variant))):
        assert code == 0 and codes(doc, "error") == set(), doc


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("deleted", [0, 1, 2])
def test_retention_all_then_n_is_counted(keys: Keys, tmp_path: Path, variant: str,
                                         deleted: int) -> None:
    """F4b: a first run keeping every segment (``retention: all``), a second with
    ``max_segments: 10``; the oldest segments deleted, fewer than 10 left: BROKEN (0: the
    control, OK)."""
    audit = tmp_path / "audit"
    write(keys, audit, variant, 25, max_segment_bytes=1500)
    write(keys, audit, variant, 10, start=100, max_segment_bytes=1500, max_segments=10)
    segs = list_segments(str(audit))
    assert 3 <= len(segs) < 10
    headers = [unpack(payloads(s.path)[0])["seg"]["retention"] for s in segs]
    assert headers[0] == "all" and headers[-1] == 10, headers
    for s in segs[:deleted]:
        Path(s.path).unlink()
    [(code, doc, _)] = run(verify(audit, *key_args(keys, variant)))
    if deleted:
        assert code == 1 and "oldest_segments_missing" in codes(doc, "error"), doc
    else:
        assert code == 0, doc


# ------------------------------------------------------------- F5 / F6: the readers' checks

READ_N = 60


@pytest.fixture(scope="module")
def reader_trails(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """One real multi-segment trail per variant, built once, when a test first needs it."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            audit = tmp_path_factory.mktemp(f"review29-read-{variant}") / "audit"
            write(keys, audit, variant, READ_N, max_segment_bytes=2048)
            assert len(list_segments(str(audit))) >= 4
            built[variant] = audit
        return built[variant]

    return get


def allow_none(tmp: Path) -> Path:
    """A policy under which every recorded allow would change (so replay lists them)."""
    p = tmp / "allow-none.yaml"
    p.write_text(f"version: 1\ntrust_domain: demo.local\nservices:\n  {ORDERS}:\n"
                 "    rules: []\n")
    return p


def read_all(keys: Keys, d: Path, variant: str, tmp: Path, *, processes: bool = False
             ) -> dict[str, tuple[int, str, str]]:
    """Every reader over ``d`` through the real CLI (``processes``: each ``python -m sidecar``
    in a process of its own; else ``cli_many``): exit code, stdout, stderr."""
    data = ["--data-key", keys.data] if variant == "enc1" else []
    jobs = {
        "export": ["audit", "export", str(d), *data],
        "tail": ["audit", "tail", str(d), "-n", "1000", *data],
        "tail -n 3": ["audit", "tail", str(d), "-n", "3", *data],
        "policy replay": ["policy", "replay", str(allow_none(tmp)), "--audit", str(d),
                          "--identity", ORDERS, *data],
    }
    results = [sidecar_cli(*job, timeout=180) for job in jobs.values()] if processes \
        else cli_many(jobs.values())
    out = {}
    for name, r in zip(jobs, results, strict=True):
        assert "Traceback" not in r.stderr, r.stderr
        out[name] = (r.returncode, r.stdout, r.stderr)
    return out


def shown(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


DAMAGE = {"export": 1, "tail": 1, "tail -n 3": 1, "policy replay": 2}
CROSS = ("old_copied_later", "duplicate_later", "duplicate_earlier", "middle_deleted")


def cross_attack(d: Path, attack: str) -> None:
    segs = list_segments(str(d))
    if attack == "old_copied_later":  # an old segment copied in under a later name
        shutil.copy(segs[1].path, d / segment_name(segs[-1].start_seq + 100, time.time() + 9e5))
    elif attack.startswith("duplicate"):  # a segment twice: its seq, another stamp
        stamp = time.time() + (9e5 if attack == "duplicate_later" else -9e5)
        shutil.copy(segs[2].path, d / segment_name(segs[2].start_seq, stamp))
    else:
        Path(segs[2].path).unlink()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attack", CROSS)
def test_readers_check_seqs_across_segments(keys: Keys, reader_trails: Callable[[str], Path],
                                            tmp_path: Path, variant: str, attack: str) -> None:
    """F5: a segment that does not continue the one before -- an old one copied in, one
    twice, one missing -- is refused or said (exit as for damage), as verify says BROKEN; no
    seq is shown twice, and ``tail`` shows the trail's newest records, never old ones."""
    d = tmp_path / "audit"
    shutil.copytree(reader_trails(variant), d)
    genuine = read_all(keys, d, variant, tmp_path)
    cross_attack(d, attack)
    got = read_all(keys, d, variant, tmp_path)
    for name, (code, out, err) in got.items():
        assert code == DAMAGE[name], (name, code, err)
        assert "seq" in err and ("reused" in err or "skipped" in err), (name, err)
        if name != "policy replay":
            seqs = [r["seq"] for r in shown(out)]
            assert seqs == sorted(set(seqs)), (name, seqs)
    assert shown(got["tail -n 3"][1]) == shown(genuine["tail -n 3"][1])
    [(code, _doc, _)] = run(verify(d, *(["--hmac-key-file", keys.hmac]
                                        if variant == "hmac" else [])))
    assert code == 1


EDITS = ("first", "middle", "before_seal", "newest_record")


def edit_in_place(keys: Keys, d: Path, variant: str, where: str) -> str:
    """A deny record edited to an allow where it is, not re-chained (format 1 encrypted:
    decrypted, edited and encrypted again with the data key); its request id."""
    from sidecar.audit.crypto import Decryptor, Encryptor, load_data_key

    dk = load_data_key(keys.data)
    segs = [s.path for s in list_segments(str(d))
            if any("rec" in unpack(p) or "erc" in unpack(p) for p in payloads(s.path))]
    seg = segs[-1 if where == "newest_record" else 1]
    frames = payloads(seg)
    header = unpack(frames[0])["seg"]
    denies: list[tuple[int, dict[str, Any]]] = []
    for i, p in enumerate(frames):
        frame = unpack(p)
        wire = frame.get("rec") or (Decryptor([dk]).record(frame["seq"], frame["erc"], header)
                                    if "erc" in frame else None)
        if wire is not None and wire["d"] == "deny":
            denies.append((i, wire))
    pick, wire = {"first": denies[0], "middle": denies[len(denies) // 2],
                  "before_seal": denies[-1], "newest_record": denies[-1]}[where]
    frame = unpack(frames[pick])
    wire.update(d="allow", st=200)
    if "rec" in frame:
        frame["rec"] = wire
    else:
        body = Encryptor(dk).bodies(frame["seq"], [pack(wire)])[0]
        frame["erc"] = msgpack.unpackb(body, raw=False)
    frames[pick] = pack(frame)
    write_frames(seg, frames)
    return str(wire["id"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("where", EDITS)
def test_readers_check_links(keys: Keys, reader_trails: Callable[[str], Path], tmp_path: Path,
                             variant: str, where: str) -> None:
    """F6: a deny edited to an allow in place (not re-chained): verify without a key is
    BROKEN, and so is every reader now (exit as for damage), the edited record never shown.
    An HMAC chain's links need the key the readers do not take: they say so (a note)."""
    d = tmp_path / "audit"
    shutil.copytree(reader_trails(variant), d)
    edited = edit_in_place(keys, d, variant, where)
    got = read_all(keys, d, variant, tmp_path)
    [(code, _doc, _)] = run(verify(d, *(["--hmac-key-file", keys.hmac]
                                        if variant == "hmac" else [])))
    assert code == 1
    for name, (code, out, err) in got.items():
        if variant == "hmac":
            # (``policy replay`` gives the readers no place for a note: not said there)
            assert name == "policy replay" or "links were not checked" in err, (name, err)
            continue
        assert code == DAMAGE[name], (name, code, err)
        assert "does not chain" in err, (name, err)
        assert edited not in out, (name, out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_readers_quiet_on_the_honest_trail(keys: Keys, reader_trails: Callable[[str], Path],
                                           tmp_path: Path, variant: str) -> None:
    """The control: every record read once, in order, exit 0 (replay: 1, allows would
    change), nothing said but the HMAC note. (Each reader a ``python -m sidecar`` process:
    the process boundary of the readers the families above run in the test's process.)"""
    got = read_all(keys, reader_trails(variant), variant, tmp_path, processes=True)
    for name, (code, _out, err) in got.items():
        assert code == (1 if name == "policy replay" else 0), (name, err)
        if variant != "hmac":
            assert err == "", (name, err)
        elif name != "policy replay":
            assert err.startswith("note: the segments are HMAC-authenticated"), (name, err)
    assert [r["request_id"] for r in shown(got["export"][1])] == \
        [f"rq{i:05d}" for i in range(READ_N)]
    assert [r["request_id"] for r in shown(got["tail -n 3"][1])] == \
        [f"rq{i:05d}" for i in range(READ_N - 3, READ_N)]


# ------------------------------------------------------------ F8: findings a forger repeats

def test_repeated_findings_are_listed_up_to_the_cap(tmp_path: Path) -> None:
    """F8: a forged directory (no key) of 150 restart segments, each unsealed, a shutdown
    seal with a header after it that records no restart, a claim ``prev_sealed: true``, and
    250 malformed records: each code is listed at most 100 times, the rest counted in one
    more finding (before, per-segment findings were not capped, and each capped one
    rescanned every finding listed: quadratic)."""
    from sidecar.audit.segments import MAX_FINDINGS_PER_CODE

    d = tmp_path / "audit"
    d.mkdir()
    forger = Forger(0, bytes(32), None)
    t0 = 1.8e9
    for i in range(151):
        start = forger.seq
        hdr: dict[str, Any] = {"v": 1, "alg": "sha256", "created": t0 + i, "retention": "all"}
        if i:
            hdr.update(prev_segment="x", prev_sealed=True,
                       restart={"time": t0 + i, "after_seq": start - 1, "prev_sealed": True})
        frames = [forger.frame("seg", hdr)]
        for _ in range(250 if i == 150 else 1):
            frames.append(forger.frame("rec", {"t": t0 + i, "ev": "request", "d": "allow",
                                               "st": -1}))
        write_frames(d / segment_name(start, t0 + i), frames)
    [(code, doc, _)] = run(verify(d))
    assert code == 1 and isinstance(doc, dict)
    by_code: dict[str, list[dict[str, Any]]] = {}
    for f in doc["findings"]:
        by_code.setdefault(f["code"], []).append(f)
    for name, total in (("unsealed_restart", 150), ("prev_sealed_mismatch", 150),
                        ("malformed_record", 400)):
        found = by_code[name]
        assert len(found) == MAX_FINDINGS_PER_CODE + 1, (name, len(found))
        assert found[-1]["message"] == \
            f"and {total - MAX_FINDINGS_PER_CODE} more {name} findings (not listed)"
    assert by_code["unsealed_restart"][-1]["severity"] == "warning"


# --------------------------------------------------------- F9: a seq no writer can go on from

PLANTED = [2**64 - 1, 2**63, 2**63 + 7]


@pytest.mark.parametrize("alone", [False, True], ids=["after_a_trail", "alone"])
@pytest.mark.parametrize("seq", PLANTED)
def test_a_planted_huge_seq_is_damage_the_writer_declares(keys: Keys, tmp_path: Path, seq: int,
                                                          alone: bool) -> None:
    """F9: a segment whose only frame is a header at a seq no writer reaches (2**63 and
    above; 2**64-1 cannot be continued at all) is damage: the real writer starts, goes on
    after the last good frame before it and declares the break; verify is BROKEN (no
    traceback)."""
    from sidecar.audit.segments import MAX_RESUME_SEQ

    audit = tmp_path / "audit"
    audit.mkdir()
    if not alone:
        write(keys, audit, "plain", 12)
    good = find_resume_point(str(audit), None)
    planted = audit / segment_name(seq, time.time())
    write_frames(planted, [pack({"seq": seq, "prev": bytes(32), "seg": {
        "v": 1, "alg": "sha256", "created": time.time(), "retention": "all"}})])
    rp = find_resume_point(str(audit), None)
    assert rp.next_seq == good.next_seq < MAX_RESUME_SEQ
    assert rp.damaged_segment == planted.name and rp.damage and "beyond" in rp.damage
    write(keys, audit, "plain", 3, start=100)  # the real writer: no crash
    newest = [s for s in list_segments(str(audit)) if s.name != planted.name][-1]
    header = unpack(payloads(newest.path)[0])["seg"]
    assert header["break"]["segment"] == planted.name, header
    [(code, doc, _)] = run(verify(audit, "--pubkey", keys.pub))
    assert code == 1 and isinstance(doc, dict) and doc["broken"], doc
