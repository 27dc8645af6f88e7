"""``sidecar audit collect`` against lines anyone who can send syslog to the collector can
write (a hostile review, thirty-fifth session).

Found: (1) a skipped line was tied to a seq only by the first 4 seq-like tokens in its first
4,096 characters, so decoys or padding before the real ``seq`` got a forged allow past;
(2) only the LAST ``sidecar@32473`` element of a line, and the last copy of a repeated param,
was compared with the JSON (the parts path the same), so seq 2's element put before a genuine
allow's made a SIEM show seq 2 as that allow; (3) the seq pattern backtracked quadratically in
a run of blanks (0.25 s of CPU per 4 KiB line); (4) a line just under the 16 MiB line bound
of ``{"seq":1,"a":[{},{},...]}`` made collect hold about 1 GB.

The trail is written by a real writer and shipped to a REAL rsyslog (tests/test_audit_ship.py);
the injected lines are data; every collect is the CLI as a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.audit import ship
from sidecar.audit.record import AuditRecord
from sidecar.audit.signing import write_keypair
from sidecar.config.audit import AuditConfig
from tests.harness import sidecar_cli, wait_for, write_audit_trail
from tests.test_audit_ship import ORDERS, Rsyslog

LONG_PATH = "/admin/" + "p" * 6000  # its message (over 4,096 bytes) is shipped in parts
PART_SEQ_RECORD = 7  # the record with LONG_PATH (an allow)
# The longest collector line collect reads (docs/audit.md): the longest message the shipper
# writes, 7.3 MiB (a 1 MiB frame's body as JSON, 6 characters a byte at most, and the frame in
# base64), and the collector's own fields, rounded up to a MiB.
LINE_BOUND = 8 * 1024 * 1024


class Trail:
    def __init__(self, root: Path, lines: list[str], pub: str) -> None:
        self.root, self.lines, self.pub = root, lines, pub
        self.runs = 0

    def sd(self, seq: int) -> str:
        """The structured data element of seq's (whole) message, as rsyslog wrote it."""
        line = next(x for x in self.lines if f'[sidecar@32473 seq="{seq}" ' in x
                    and '"part"' not in x)
        at = line.index("[sidecar@32473")
        return line[at:line.index("]", at) + 1]

    def message(self, seq: int) -> tuple[str, str, str]:
        """(msgid, structured data, JSON) of seq's whole message."""
        line = next(x for x in self.lines if f'[sidecar@32473 seq="{seq}" ' in x
                    and '"part"' not in x)
        msgid, sd, msg = line.split("\t", 2)
        return msgid, sd, msg

    def collect(self, extra: list[str]) -> tuple[int, str]:
        """collect of the genuine lines and ``extra``; when it exits 0, verify of the copy
        must say OK (the rebuilt trail is the genuine one)."""
        self.runs += 1
        src = self.root / f"in-{self.runs}.log"
        src.write_text("".join(line + "\n" for line in self.lines + extra))
        out = self.root / f"out-{self.runs}"
        got = sidecar_cli("audit", "collect", str(src), "-o", str(out))
        assert "Traceback" not in got.stderr, got.stderr
        if got.returncode == 0:
            checked = sidecar_cli("audit", "verify", str(out), "--pubkey", self.pub,
                                  "--id", ORDERS, "--json")
            assert json.loads(checked.stdout)["ok"], checked.stdout
        return got.returncode, got.stdout + got.stderr


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Trail:
    root = tmp_path_factory.mktemp("collect35")
    rs = Rsyslog(root / "rsyslog")
    rs.start()
    try:
        priv, pub, _ = write_keypair(str(root / "sig"))
        cfg = AuditConfig(path=str(root / "audit"), fsync=False, signing_key_file=priv,
                          checkpoint_every_records=25, ship=rs.ship())
        recs = [AuditRecord(time=1_700_000_000.0 + i, request_id=f"r{i}",
                            decision="deny" if i < 5 else "allow",
                            status=403 if i < 5 else 200,
                            rule="default deny" if i < 5 else "ops", method="DELETE",
                            path=LONG_PATH if i + 1 == PART_SEQ_RECORD else "/admin/users/1")
                for i in range(10)]
        w = write_audit_trail(cfg, recs, identity=ORDERS, batch=5, pause=0.001)
        seal = f'seq="{w.statistics().next_seq - 1}"'
        assert wait_for(lambda: any(seal in x for x in rs.lines()), timeout=15)
    finally:
        rs.stop()
    lines = rs.lines()
    assert any('"part":1,' in x and f'seq="{PART_SEQ_RECORD}"' in x for x in lines)
    t = Trail(root, lines, pub)
    assert '"d":"deny"' in t.message(2)[2] and '"d":"allow"' in t.message(6)[2]
    code, out = t.collect([])  # the genuine copy collects and verifies
    assert code == 0 and "skipped" not in out, out
    return t


def forged_allow(trail: Trail, seq: int) -> str:
    """A JSON message for ``seq`` showing an allow, not one the shipper writes (no ``prev``
    or ``frame``): collect does not read it, so it must tie it to seq."""
    msg = json.loads(trail.message(seq)[2])
    rec = dict(msg["record"])
    rec.update(d="allow", st=200, rule="admins")
    return json.dumps({"seq": seq, "kind": msg["kind"], "digest": msg["digest"],
                       "record": rec}, separators=(",", ":"))


# -- (1) every seq a skipped line names, wherever it is in the line


@pytest.mark.parametrize("variant", ["decoys", "many-decoys", "padding", "late-param"])
def test_a_skipped_line_naming_a_frame_past_decoys_or_padding_is_broken(
        trail: Trail, variant: str) -> None:
    sd2 = trail.sd(2)
    sds = {
        "decoys": "".join(f'[d{i}@1 seq="90000000{i}"]' for i in range(4)) + sd2,
        "many-decoys": "".join(f'[d{i}@1 seq="9{i:08d}"]' for i in range(200)) + sd2,
        "padding": '[a@1 pad="' + "x" * 4200 + '"]' + sd2,
        # the seq param itself after 5,000 characters of the element
        "late-param": '[sidecar@32473 pad="' + "x" * 5000 + '" seq="2"]',
    }[variant]
    code, out = trail.collect([f"audit\t{sds}\t{forged_allow(trail, 2)}"])
    assert code == 1, out
    assert "seems to be the message for seq 2" in out, out


def test_a_skipped_line_with_the_sd_id_and_a_seq_anywhere_names_it(trail: Trail) -> None:
    # No JSON message at all: the SD-ID, then 8 KiB of text, then the seq.
    line = "audit\t-\tsidecar@32473 " + "z " * 4096 + 'seq="3" the deny was an allow'
    code, out = trail.collect([line])
    assert code == 1 and "seems to be the message for seq 3" in out, out


# -- (2) one sidecar@32473 element, each param once


def test_a_second_sd_element_before_the_genuine_one_is_refused_as_edited(trail: Trail) -> None:
    msgid, sd6, msg6 = trail.message(6)  # a genuine allow
    code, out = trail.collect([f"{msgid}\t{trail.sd(2)}{sd6}\t{msg6}"])
    assert code == 1, out
    assert "does not match its frame (structured data: sidecar@32473 2 times)" in out, out


@pytest.mark.parametrize("how", ["param twice", "escaped bracket"])
def test_a_repeated_or_hidden_sd_param_is_refused_as_edited(trail: Trail, how: str) -> None:
    msgid, sd6, msg6 = trail.message(6)
    if how == "param twice":
        edited = sd6.replace('[sidecar@32473 seq="6"', '[sidecar@32473 seq="2" seq="6"')
        said = "structured data: a param twice"
    else:
        # RFC 5424 6.3.3: ``\]`` in a value does not end the element; before, the element
        # was read only up to it, and the seq="2" after it (a SIEM's) was not compared.
        edited = sd6.replace('[sidecar@32473 seq="6"', '[sidecar@32473 pad="\\]" seq="2"')
        said = "structured data seq='2'"
    assert edited != sd6
    code, out = trail.collect([f"{msgid}\t{edited}\t{msg6}"])
    assert code == 1 and said in out, out


@pytest.mark.parametrize("how", ["element", "param"])
def test_a_part_with_a_second_sd_element_or_param_is_refused(trail: Trail, how: str) -> None:
    part = next(x for x in trail.lines
                if '"part":1,' in x and f'seq="{PART_SEQ_RECORD}"' in x)
    msgid, sd, data = part.split("\t", 2)
    if how == "element":
        edited = f"{msgid}\t{trail.sd(2)}{sd}\t{data}"
    else:
        edited = f"{msgid}\t" + sd.replace(f'seq="{PART_SEQ_RECORD}"',
                                          f'seq="2" seq="{PART_SEQ_RECORD}"', 1) + f"\t{data}"
    code, out = trail.collect([edited])
    # (a copy of a genuine part, relabelled: before, the duplicate was dropped unread)
    assert code == 1 and "seems to be the message for seq" in out, out


# -- (3) the seq pattern is linear


def _unbounded_backtracking_repeats(pattern: str) -> list[str]:
    """The repeats of ``pattern`` that are unbounded and may give back what they matched
    (greedy or lazy, not possessive): two of them in a row over the same characters
    backtrack quadratically."""
    from re import _constants as c  # type: ignore[attr-defined]
    from re import _parser  # type: ignore[attr-defined]

    found: list[str] = []

    def walk(items) -> None:  # type: ignore[no-untyped-def]
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                if av[1] == c.MAXREPEAT:
                    found.append(f"{op} {av[2]!r}")
                walk(av[2])
            elif op == c.POSSESSIVE_REPEAT:
                walk(av[2])
            elif op in (c.SUBPATTERN,):
                walk(av[3])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                walk(av[1])
            elif op == c.BRANCH:
                for branch in av[1]:
                    walk(branch)
            elif op == c.ATOMIC_GROUP:
                walk(av)

    walk(_parser.parse(pattern))
    return found


def test_the_seq_pattern_has_no_unbounded_backtracking_repeat(trail: Trail) -> None:
    # Structural (no timing): before, ``\\s*"?\\s*`` let the engine split a run of blanks
    # between the two stars every way, 0.25 s of CPU per 4 KiB line of ``seq=`` and blanks.
    assert _unbounded_backtracking_repeats(r'a\s*"?\s*b')  # (the check sees the old shape)
    assert _unbounded_backtracking_repeats(ship._SEQ_NAMED.pattern) == []
    # What it names: every spelling, any number of blanks; not a number that is no integer.
    names = {
        'seq="5"': ["5"], '"seq":6': ["6"], '"seq": "7"': ["7"], '"seq"   :   8': ["8"],
        '"seq":' + " " * 5000 + "9": ["9"], 'seq = "10"': ["10"],
        '"seq":1.5': [], '"seq":1e400': [], "seq=" + " " * 5000 + "x": [],
        'seq="1" seq="2" x seq="3"': ["1", "2", "3"],
        # (since the review of this fix: any spelling JSON allows, see below)
        '"seq":2.0': ["2"], '"seq":2e0': ["2"], '"seq":20E-1': ["2"], '"s\\u0065q":2': ["2"],
        '"\\u0073\\u0065\\u0071" : 2.5e1': ["25"], '"seq":2.': ["2"], '"seq":2e': [],
    }
    for text, seqs in names.items():
        found = [ship._seq_text(m) for m in ship._SEQ_NAMED.findall(text)]
        assert [str(seq) for seq in found if seq is not None] == seqs, text[:40]
    # And in a real collect: JSON's blanks before the number (no bound a forger could pass).
    forged = forged_allow(trail, 4).replace('{"seq":4,', '{"seq":' + " " * 3000 + "4,", 1)
    code, out = trail.collect([f"audit\t-\t{forged}"])
    assert code == 1 and "seems to be the message for seq 4" in out, out


# -- (4) the line bound and the JSON a line may hold, against memory


def _collect_peak(src: Path, out: Path) -> tuple[int, int, str]:
    """(exit code, peak RSS in KiB, output) of a real ``sidecar audit collect`` process."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
             "capture_output=True, text=True, timeout=120); print(r.returncode); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "print(r.stdout + r.stderr)")
    got = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "sidecar",
                          "audit", "collect", str(src), "-o", str(out)],
                         capture_output=True, text=True, timeout=150)
    code, maxrss, text = got.stdout.split("\n", 2)
    return int(code), int(maxrss), text


def _bomb(length: int) -> str:
    """A collector line of ``length`` characters: ``{"seq":N,"a":[{},{},...]}`` (N a seq
    no frame has), each ``{}`` a dict when parsed."""
    head = 'audit\t[sidecar@32473 seq="999999"]\t{"seq":999999,"a":['
    count = (length - len(head) - 2) // 3
    return head + ",".join(["{}"] * count) + "]}"


@pytest.mark.parametrize("where", ["past", "under"])
def test_a_container_bomb_line_costs_collect_little_memory(trail: Trail, tmp_path: Path,
                                                          where: str) -> None:
    # past: just over the line bound, read past unheld; under: just under it, more JSON
    # than a message holds, refused unparsed. Before: 16 MiB lines were parsed whole, and
    # an 8 MiB one held 650 MB.
    length = LINE_BOUND + 64 if where == "past" else LINE_BOUND - 64
    line = _bomb(length)
    assert abs(len(line) - length) <= 3
    src = tmp_path / "bomb.log"
    src.write_text("".join(x + "\n" for x in trail.lines) + line + "\n")
    code, peak_kib, out = _collect_peak(src, tmp_path / "out")
    assert code == 0, out
    if where == "past":
        assert "1 lines longer than 8 MiB skipped" in out, out
    else:
        assert "1 lines that look like audit messages were skipped" in out, out
    assert peak_kib < 300 * 1024, f"collect held {peak_kib // 1024} MiB"
    checked = sidecar_cli("audit", "verify", str(tmp_path / "out"), "--pubkey", trail.pub,
                          "--json")
    assert json.loads(checked.stdout)["ok"], checked.stdout


class LargeRsyslog(Rsyslog):
    """The fixture's rsyslog taking messages of up to 8 MiB whole (its default frame and
    message sizes are 200,000 and 64 KiB)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        conf = self.conf.read_text()
        conf = conf.replace('maxMessageSize="64k"', 'maxMessageSize="8m"')
        conf = conf.replace('StreamDriver.AuthMode="anon"',
                            'StreamDriver.AuthMode="anon" MaxFrameSize="16000000"')
        self.conf.write_text(conf)


def test_the_largest_honest_messages_are_still_read_and_a_bomb_is_not(tmp_path: Path) -> None:
    # The bounds sit between what the shipper can write and what a bomb needs: a record of a
    # near-1-MiB frame of control characters (6 characters of JSON a byte) shipped whole, one
    # of a million empty maps (a container a byte) shipped in parts, both kept as msgpack
    # (a bytes value) so that the message carries the frame and its JSON -- and next to them
    # the bomb line of the test above, just under the line bound.
    rs = LargeRsyslog(tmp_path / "rsyslog")
    rs.start()
    try:
        priv, pub, _ = write_keypair(str(tmp_path / "sig"))
        cfg = AuditConfig(path=str(tmp_path / "audit"), fsync=False, signing_key_file=priv,
                          checkpoint_every_records=25,
                          ship=rs.ship(max_message_bytes=64 * 1024 * 1024))
        recs = [AuditRecord(time=1_700_000_000.0, request_id="a", decision="allow",
                            status=200, rule="r"),
                AuditRecord(time=1_700_000_001.0, request_id="ctl", decision="allow",
                            status=200, rule="r", extra={"b": b"\x00", "s": "\x01" * 1_040_000}),
                AuditRecord(time=1_700_000_002.0, request_id="b", decision="deny",
                            status=403, rule="r")]
        w = write_audit_trail(cfg, recs, identity=ORDERS, batch=1, pause=0.001, deadline=120)
        seal = f'seq="{w.statistics().next_seq - 1}"'
        assert wait_for(lambda: any(seal in x for x in rs.lines()), timeout=90)
    finally:
        rs.stop()
    whole = rs.lines()
    longest = max(len(x) for x in whole)
    assert 7 * 1024 * 1024 < longest < LINE_BOUND - 64 * 1024
    assert ship.MAX_COLLECT_LINE == LINE_BOUND

    rs2 = Rsyslog(tmp_path / "rsyslog2")
    rs2.start()
    try:
        cfg2 = AuditConfig(path=str(tmp_path / "audit2"), fsync=False, signing_key_file=priv,
                           checkpoint_every_records=25, ship=rs2.ship())
        # A million empty maps, a container a byte, as 1,040 rows of 1,000 (one row
        # object shared): as many containers as one flat list of 1,040,000 and more
        # (1,041,040, in a 1.04 MB frame), but the writer's depth check
        # (``jsondoc.deeper_than``, run 4 times per record) walks a shared node once, so
        # it costs it 2,000 steps instead of 4 million (5.5 s of CPU).
        rows = [[{}] * 1000] * 1040
        recs2 = [AuditRecord(time=1_700_000_000.0, request_id="m", decision="allow",
                             status=200, rule="r", extra={"b": b"\x00", "l": rows})]
        w2 = write_audit_trail(cfg2, recs2, identity=ORDERS, batch=1, pause=0.001,
                                deadline=120)
        seal2 = f'seq="{w2.statistics().next_seq - 1}"'
        assert wait_for(lambda: any(seal2 in x for x in rs2.lines()), timeout=90)
    finally:
        rs2.stop()
    parts = rs2.lines()
    assert sum('"part":' in x for x in parts) > 100

    # (The whole messages are collected once, next to the bomb, below: the one line skipped
    # is the bomb, and the copy holds all three records and verifies.)
    src = tmp_path / "parts.log"
    src.write_text("".join(x + "\n" for x in parts))
    got = sidecar_cli("audit", "collect", str(src), "-o", str(tmp_path / "out-parts"),
                      timeout=120)
    assert got.returncode == 0 and "skipped" not in got.stdout + got.stderr, \
        got.stdout + got.stderr
    checked = sidecar_cli("audit", "verify", str(tmp_path / "out-parts"), "--pubkey",
                          pub, "--id", ORDERS, "--json")
    assert json.loads(checked.stdout)["ok"], checked.stdout

    src = tmp_path / "whole-and-bomb.log"
    src.write_text("".join(x + "\n" for x in whole) + _bomb(LINE_BOUND - 64) + "\n")
    code, peak_kib, out = _collect_peak(src, tmp_path / "out-bomb")
    assert code == 0 and "1 lines that look like audit messages were skipped" in out, out
    assert out.count("skipped") == 1, out  # (nothing else: the whole messages all read)
    assert peak_kib < 300 * 1024, f"collect held {peak_kib // 1024} MiB"
    checked = sidecar_cli("audit", "verify", str(tmp_path / "out-bomb"), "--pubkey", pub,
                          "--id", ORDERS, "--json")
    assert json.loads(checked.stdout)["ok"] and json.loads(checked.stdout)["records"] == 3, \
        checked.stdout


def test_skipped_lines_naming_more_seqs_than_collect_notes_are_broken(trail: Trail) -> None:
    # Every seq of every skipped line is noted, at most MAX_REFUSED_SEQS distinct ones: past
    # that which frames they name cannot be told, so the copy is refused (before, 4 per line).
    per_line = (1 << 20) // 2 + 1  # (two lines: just over MAX_REFUSED_SEQS in all)
    lines = [f"audit\t[sidecar@32473 x=\"{n}\"]\t" +
             " ".join(f"seq={10_000_000 + n * per_line + i}" for i in range(per_line))
             for n in range(2)]
    assert all(len(x) < LINE_BOUND for x in lines)
    assert 2 * per_line > 1 << 20  # (MAX_REFUSED_SEQS)
    code, out = trail.collect(lines)
    assert code == 1 and "name more than 1048576 seqs" in out, out


# -- (5) since the review of this fix: the seq in any spelling JSON allows, and the JSON
# object anywhere in the message (before, ``2.0``, ``2e0``, ``20E-1`` and ``"s\u0065q"``
# were skipped with "names no frame's seq", and a line without ``{"seq":`` nor
# ``sidecar@32473`` was not even counted, while a SIEM parsing the JSON showed seq 2, a deny,
# as an allow; collect exited 0 and the copy verified OK).


def _forged_body(trail: Trail, seq: int) -> str:
    """The members after ``seq`` of a forged allow for ``seq`` (``forged_allow``)."""
    return forged_allow(trail, seq)[len(f'{{"seq":{seq},'):]


SPELLINGS = {
    "2.0": lambda body: '{"seq":2.0,' + body,
    "2e0": lambda body: '{"seq":2e0,' + body,
    "20E-1": lambda body: '{"seq":20E-1,' + body,
    "escaped key": lambda body: '{"s\\u0065q":2,' + body,
    "blank before colon": lambda body: '{"seq" :2,' + body,
    "blank after brace": lambda body: '{ "seq":2,' + body,
    "not the first member": lambda body: '{"kind":"rec","seq":2,'
                                         + body.replace('"kind":"rec",', "", 1),
    "digits as text, escaped key": lambda body: '{"\\u0073eq":"2",' + body,
    # (the review of this fix: read as a double, or with its digits escaped)
    "2.0000000000000001": lambda body: '{"seq":2.0000000000000001,' + body,
    "1.9999999999999999": lambda body: '{"seq":1.9999999999999999,' + body,
    "escaped digit": lambda body: '{"seq":"\\u0032",' + body,
}


@pytest.mark.parametrize("with_sd", [True, False], ids=["sd", "no-sd"])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_a_skipped_line_naming_a_frame_in_any_json_spelling_is_broken(
        trail: Trail, spelling: str, with_sd: bool) -> None:
    msgid, _sd, msg = trail.message(2)
    body = _forged_body(trail, 2)
    assert '"kind":"rec",' in body and '"d":"allow"' in body
    forged = SPELLINGS[spelling](body)
    parsed = json.loads(forged)  # what a SIEM reads: seq 2, an allow
    assert parsed["seq"] in (2, "2") and parsed["record"]["d"] == "allow"
    digest = json.loads(msg)["digest"]
    sd = f'[sidecar@32473 kind="rec" digest="{digest}"]' if with_sd else "-"
    code, out = trail.collect([f"{msgid}\t{sd}\t{forged}"])
    assert code == 1, out
    assert "seems to be the message for seq 2" in out, out


@pytest.mark.parametrize("value", ["2e0", "2.0000000000000001", "1.9999999999999999",
                                   '"\\u0032"', '"2"',
                                   # (more than 20 digits: the review of the third fix)
                                   "2000000000000000000000e-21",
                                   "200000000000000000000.0e-20",
                                   '"0000000000000000000002"'])
def test_a_decoy_brace_before_the_json_does_not_hide_its_seq(trail: Trail, value: str) -> None:
    # The first ``{`` of the line does not open JSON (a header field, another element):
    # the rest of the line is not parsed, and the seq is found by the pattern, read as a
    # JSON parser reads it (a double; digits escaped in a string).
    forged = ('{"kind":"rec","seq":' + value + ","
              + _forged_body(trail, 2).replace('"kind":"rec",', "", 1))
    code, out = trail.collect([f"audit\t[x@1 v=\"{{\"]\t{forged}"])
    assert code == 1 and "seems to be the message for seq 2" in out, out
    # An object that parses before it (not ours) does not hide it either.
    code, out = trail.collect([f"audit\t-\t{{\"app\":1}} {forged}"])
    assert code == 1 and "seems to be the message for seq 2" in out, out


def test_other_programs_json_lines_still_collect(trail: Trail) -> None:
    # Ordinary syslog lines of other programs: JSON without a seq, with a
    # seq no frame has (or no integer), text that is no JSON: collect reads the trail as
    # before (exit 0) and verify says OK (``Trail.collect``).
    junk = [
        'kernel\t-\t{"event":"link up","iface":"eth0","n":2}',
        'app\t-\t{"req":{"seq":999998},"status":200}',
        'app\t-\t{"seq":999999,"msg":"another counter"}',
        'app\t-\t{"seq":2.5,"msg":"no integer"} {"seq":-2} {"seq":"two"}',
        'app\t-\tsequence=2 seq 2 {not json}',
        'app\t-\t{"s\\u0065q":123456789,"x":"\\u00e9"}',
    ]
    code, out = trail.collect(junk)
    assert code == 0, out
    assert "BROKEN" not in out, out
