"""Characters that are structure to the YAML 1.1 reader but not to people and their tools, or
invisible (found by a hostile review): refused anywhere in a file before it is parsed.

U+0085, U+2028 and U+2029 are line breaks to PyYAML/libyaml only: a rule written after one,
inside what grep, sed, ``git diff`` and editors show as a comment, was enforced (a
Trojan-Source style backdoor), and line numbers disagreed with the editor's. A CR not
followed by LF is a line end there too. Bidi controls reorder what is shown; zero-width and
other format characters (Unicode category Cf) make two values that look alike differ.

``FAMILY`` is the family as data: every member is refused with ``file:line`` (counted by LF)
and its code point and name, in a comment, a plain scalar, a quoted scalar and a key, in a
policy file, a file of a policy set and the sidecar config, in process and by the CLI
(``policy check``, ``run --check``, ``sidecar inject``); a running sidecar keeps its policy
through every member. Its neighbours -- a BOM first, CRLF, accents, CJK, a no-break space,
an escape in double quotes -- keep loading.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.config.model import load_config_file
from sidecar.config.source import parse_yaml
from sidecar.errors import ConfigError
from sidecar.policy.loader import load_policy_set
from tests.harness import (
    ROOT,
    Pki,
    http,
    mtls_context,
    sidecar_cli,
    spiffe,
    start_inbound,
    wait_for,
)
from tests.test_k8s_cli import DEPLOYMENT

ORDERS = spiffe("orders")
FRONT = spiffe("frontend")
# code point -> the name the refusal gives it
FAMILY: dict[int, str] = {
    # line breaks to YAML 1.1 only (and a CR that ends no CRLF)
    0x000D: "CARRIAGE RETURN not followed by a LINE FEED",
    0x0085: "NEXT LINE (NEL)",
    0x2028: "LINE SEPARATOR",
    0x2029: "PARAGRAPH SEPARATOR",
    # bidirectional controls
    0x061C: "ARABIC LETTER MARK",
    0x200E: "LEFT-TO-RIGHT MARK",
    0x200F: "RIGHT-TO-LEFT MARK",
    0x202A: "LEFT-TO-RIGHT EMBEDDING",
    0x202B: "RIGHT-TO-LEFT EMBEDDING",
    0x202C: "POP DIRECTIONAL FORMATTING",
    0x202D: "LEFT-TO-RIGHT OVERRIDE",
    0x202E: "RIGHT-TO-LEFT OVERRIDE",
    0x2066: "LEFT-TO-RIGHT ISOLATE",
    0x2067: "RIGHT-TO-LEFT ISOLATE",
    0x2068: "FIRST STRONG ISOLATE",
    0x2069: "POP DIRECTIONAL ISOLATE",
    # other invisible format characters (category Cf)
    0x200B: "ZERO WIDTH SPACE",
    0x200C: "ZERO WIDTH NON-JOINER",
    0x200D: "ZERO WIDTH JOINER",
    0x2060: "WORD JOINER",
    0x00AD: "SOFT HYPHEN",
    0xFEFF: "ZERO WIDTH NO-BREAK SPACE",  # not as the first character
    0x2061: "FUNCTION APPLICATION",
    0x2064: "INVISIBLE PLUS",
    0x180E: "MONGOLIAN VOWEL SEPARATOR",
    0xFFF9: "INTERLINEAR ANNOTATION ANCHOR",
    0xE0001: "LANGUAGE TAG",
    0xE0041: "TAG LATIN CAPITAL LETTER A",
}

POLICY_HEAD = ("version: 1\ntrust_domain: demo.local\nservices:\n"
               f"  {ORDERS}: {{rules: [{{name: any, allow: {{}}}}]}}\n")
CONFIG_HEAD = ("identity: {cert: c.pem, key: k.pem, bundle: b.pem}\n"
               "inbound: {listen: '127.0.0.1:15443', app: '127.0.0.1:8080'}\n"
               "admin: {listen: '127.0.0.1:15000'}\nworkers: 1\n")
# Where the member goes (X), on line 5 of the file: kind -> context -> that line.
LINE5: dict[str, dict[str, str]] = {
    "policy": {"comment": "# reviewed by security, SEC-1234 X - name: sec",
               "plain scalar": "revision: rX1", "quoted scalar": 'revision: "rX1"',
               "key": "reviXsion: r1"},
    "config": {"comment": "# reviewed by security, SEC-1234 X log: {level: debug}",
               "plain scalar": "log: {level: inXfo}", "quoted scalar": 'log: {level: "inXfo"}',
               "key": "loXg: {level: info}"},
}
HEADS = {"policy": POLICY_HEAD, "config": CONFIG_HEAD}


def _file(kind: str, context: str, cp: int) -> tuple[str, str]:
    """The file's text with the member, and what its refusal says after the file name."""
    line = LINE5[kind][context]
    column = line.index("X") + 1
    name = re.escape(FAMILY[cp])
    return (HEADS[kind] + line.replace("X", chr(cp)) + "\n",
            rf":5: U\+{cp:04X} {name}.* at column {column}: ")


def _refused(load, path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load(path)
    return str(err.value)


@pytest.mark.parametrize("context", list(LINE5["policy"]))
@pytest.mark.parametrize("cp", list(FAMILY), ids=lambda cp: f"U+{cp:04X}")
def test_every_member_is_refused_in_every_file_kind(tmp_path, cp, context):
    """A policy file, a file of a policy set (own section only, as a sidecar reads it) and
    the sidecar config: refused with file, line 5 (by LF), column, code point and name."""
    text, expected = _file("policy", context, cp)
    single = tmp_path / "policy.yaml"
    single.write_text(text, encoding="utf-8", newline="")
    out = _refused(lambda p: load_policy_set([str(p)]), single)
    assert re.fullmatch(re.escape(str(single)) + expected + ".*", out, re.S), out

    pset = tmp_path / "set"
    pset.mkdir()
    (pset / "mesh.yaml").write_text(POLICY_HEAD)
    member = pset / "ns-other.yaml"
    member.write_text("version: 1\ntrust_domain: demo.local\nservices: {}\n# x\n"
                      + text.split("\n")[4] + "\n", encoding="utf-8", newline="")
    out = _refused(lambda p: load_policy_set([str(p)], only=ORDERS), pset)
    assert re.fullmatch(re.escape(str(member)) + expected + ".*", out, re.S), out

    text, expected = _file("config", context, cp)
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(text, encoding="utf-8", newline="")
    out = _refused(lambda p: load_config_file(str(p)), cfg)
    assert re.fullmatch(re.escape(str(cfg)) + expected + ".*", out, re.S), out


@pytest.mark.parametrize("cp", list(FAMILY), ids=lambda cp: f"U+{cp:04X}")
def test_only_the_member_is_named_among_its_allowed_neighbours(tmp_path, cp):
    """A BOM first, CRLF line ends, accents and CJK, a no-break space, an escape of U+2028 in
    double quotes: none is named; the member on line 6 (by LF) is, and only it."""
    text = ("\ufeffversion: 1\r\ntrust_domain: demo.local\r\nrevision: \"caf\u00e9 \u65e5\u672c"
            "\u00a0\\u2028\"\r\nservices:\r\n"
            f"  {ORDERS}: {{rules: [{{name: any, allow: {{}}}}]}}\r\n"
            f"# note {chr(cp)} here\r\n")
    path = tmp_path / "policy.yaml"
    path.write_bytes(text.encode())
    with pytest.raises(ConfigError) as err:
        load_policy_set([str(path)])
    assert len(err.value.problems) == 1, str(err.value)
    assert re.match(re.escape(str(path)) + rf":6: U\+{cp:04X} .* at column 8: ",
                    str(err.value)), str(err.value)


def test_every_other_format_character_is_refused(tmp_path):
    """Each of the Unicode category Cf, not only the ones named in the table."""
    import unicodedata

    others = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    assert len(others) > 100
    path = tmp_path / "policy.yaml"
    for c in others:
        path.write_text(POLICY_HEAD + f"revision: r{chr(c)}1\n", encoding="utf-8")
        out = _refused(lambda p: load_policy_set([str(p)]), path)
        assert re.match(re.escape(str(path)) + rf":5: U\+{c:04X} .* at column 12: ", out), out


def _all_members(head: str, line: str) -> tuple[str, dict[int, int]]:
    """A file holding every member, one per line (in ``line``): text, code point -> line."""
    where: dict[int, int] = {}
    text = head
    for cp in FAMILY:
        where[cp] = text.count("\n") + 1
        text += line.replace("X", chr(cp)) + "\n"
    return text, where


def _names_every_member(out: str, path: Path, where: dict[int, int]) -> None:
    for cp, line in where.items():
        assert re.search(re.escape(str(path)) + rf":{line}: U\+{cp:04X} {re.escape(FAMILY[cp])}",
                         out), (hex(cp), out[-3000:])
    assert "Traceback" not in out


def test_policy_check_names_every_member_in_a_file_and_a_set(tmp_path):
    text, where = _all_members(POLICY_HEAD, "# reviewed X - name: sec")
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8", newline="")
    r = sidecar_cli("policy", "check", str(path))
    assert r.returncode == 1
    _names_every_member(r.stdout + r.stderr, path, where)

    pset = tmp_path / "set"
    pset.mkdir()
    (pset / "mesh.yaml").write_text(POLICY_HEAD)
    member = pset / "ns-other.yaml"
    text, where = _all_members("version: 1\ntrust_domain: demo.local\nservices: {}\n",
                               "# reviewed X - name: sec")
    member.write_text(text, encoding="utf-8", newline="")
    r = sidecar_cli("policy", "check", str(pset))
    assert r.returncode == 1
    _names_every_member(r.stdout + r.stderr, member, where)


def test_run_check_names_every_member_of_the_config(tmp_path):
    text, where = _all_members(CONFIG_HEAD, "# reviewed X workers: 64")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(text, encoding="utf-8", newline="")
    r = sidecar_cli("run", "-c", str(cfg), "--check", "--config-only")
    assert r.returncode != 0
    _names_every_member(r.stdout + r.stderr, cfg, where)


# The Deployment of test_k8s_cli with a comment before its containers (X: the member).
COMMENT = "      # reviewed by platform X      hostNetwork: true"
HEAD, CONTAINERS, TAIL = DEPLOYMENT.partition("      containers:\n")


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_sidecar_inject_refuses_every_member(tmp_path, stdin):
    """``sidecar inject`` reads manifests with PyYAML too: a line hidden in a comment there
    (``hostNetwork: true`` after a U+2028) would be injected and applied. Exit 2, each
    member named; the same manifest without them is injected."""
    text, where = _all_members(HEAD, COMMENT)
    text += CONTAINERS + TAIL
    path = tmp_path / "deploy.yaml"
    path.write_text(text, encoding="utf-8", newline="")
    if stdin:
        r = subprocess.run([sys.executable, "-m", "sidecar", "inject", "-f", "-"], input=text,
                           capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    else:
        r = sidecar_cli("inject", "-f", str(path))
    assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
    for cp, line in where.items():
        assert re.search(rf"sidecar inject: {re.escape('-' if stdin else str(path))}:{line}: "
                         rf"U\+{cp:04X} {re.escape(FAMILY[cp])}", r.stderr), (hex(cp), r.stderr)
    clean = tmp_path / "clean.yaml"
    clean.write_text(HEAD + COMMENT.replace(" X ", " ") + "\n" + CONTAINERS + TAIL)
    r = sidecar_cli("inject", "-f", str(clean))
    assert r.returncode == 0, r.stderr
    assert "hostNetwork" not in r.stdout and "sidecar" in r.stdout


GOOD = f"""version: 1
trust_domain: demo.local
services:
  {ORDERS}:
    path_case: sensitive
    rules:
      - name: frontend-reads-orders
        allow: {{from: [{FRONT}], methods: [GET], paths: [/orders/*]}}
"""
# The review's backdoor: one line to every tool but the YAML 1.1 reader (X is the member).
TROJAN = (GOOD + "      # reviewed by security, ticket SEC-1234X      - name: sec-1234X"
          "        allow: {from: [spiffe://demo.local/ns/demo/sa/*]}\n")


def test_a_running_sidecar_keeps_its_policy_through_every_member(tmp_path, pki: Pki, app,
                                                                  procs):
    """The backdoor written over a running sidecar's policy with each member in turn: the
    reload is refused with file:9 (the line grep shows) and the member named; the policy in
    force still answers as before (the intruder and the frontend's DELETE get 403)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(GOOD)
    b = start_inbound(tmp_path, pki, app, procs, policy=str(policy))
    front = mtls_context(pki.identity("frontend"), pki.bundle)
    intruder = mtls_context(pki.identity("intruder"), pki.bundle)
    port = b.port("inbound")
    before = http(b.port("admin"), "GET", "/policy").json()["version"]
    assert http(port, path="/orders/1", ctx=front).status == 200
    for n, cp in enumerate(FAMILY, start=1):
        policy.write_bytes(TROJAN.replace("X", chr(cp)).encode())
        wait_for(lambda n=n: b.metric("sidecar_policy_reloads_total", result="failed") >= n,
                 timeout=60)
        status = http(b.port("admin"), "GET", "/policy").json()
        assert status["version"] == before, hex(cp)
        assert re.search(re.escape(str(policy)) + rf":9: U\+{cp:04X} "
                         f"{re.escape(FAMILY[cp])}", status["last_reload_error"]), \
            (hex(cp), status["last_reload_error"])
        assert http(port, path="/orders/1", ctx=front).status == 200, hex(cp)
        assert http(port, "DELETE", "/orders/1", ctx=front).status == 403, hex(cp)
        assert http(port, "POST", "/admin/wipe", body=b"", ctx=intruder).status == 403, hex(cp)
    # the same rule written where people see it is taken
    policy.write_text(yaml.safe_dump(yaml.safe_load(TROJAN.replace("X", "\n"))))
    wait_for(lambda: http(b.port("admin"), "GET", "/policy").json()["version"] != before,
             timeout=10)
    assert http(port, "POST", "/admin/wipe", body=b"", ctx=intruder).status == 200


# Characters YAML itself refuses in a file: every C0 control but TAB, LF and CR, DEL, and every
# C1 control but NEL (a hidden line break, above). Each is named with its line (they were all
# "file is not valid UTF-8", without a line).
CONTROLS = [c for c in map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)])
            if c not in "\t\n\r\x85"]


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_a_control_character_is_named_with_its_line(char: str) -> None:
    text = f"version: 1\n\nx: a{char}b\n".encode()
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "p.yaml")
    [problem] = info.value.problems
    assert (problem.line, problem.message.split(" ")[0]) == (3, f"U+{ord(char):04X}"), problem
    bad = b"version: 1\nx: a\xffb\n"
    with pytest.raises(ConfigError) as info:
        parse_yaml(bad, "p.yaml")
    assert [(p.line, p.message) for p in info.value.problems] == [(2, "file is not valid UTF-8")]
