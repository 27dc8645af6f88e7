"""YAML anchors, aliases and merge keys as a family, through every reader of a policy or
config file, in real processes (a hostile review after ``sidecar inject`` was found hanging on
alias bombs; ``tests/test_k8s_cli.py`` has the injector's own family).

The policy and the config are read by ``config.source.parse_yaml``, which builds values from
the parser's events and never expands an alias: every anchor, alias and merge key is a
problem at its line (reading stops after 100), so a bomb costs what its bytes cost. Each
member here is written in each place (the first key of the file, the last one, inside the
section a running sidecar builds, in a tenant's file of a policy directory) and must be
refused -- with the file, the line of its first anchor, alias or merge key, and the exit code
the docs give for invalid input -- within a time bound: a hang fails the test (a subprocess
timeout), it does not hang it. A running sidecar reloading a directory keeps the policy in
force through every member and names the file and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.harness import (
    Pki,
    free_port,
    http,
    mtls_context,
    sidecar_cli,
    sidecar_cli_many,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)

ORDERS = spiffe("orders")
MESH = "version: 1\ntrust_domain: demo.local\n"
TENANT = "version: 1\n"  # every file of a policy set states its version
SECTION = ("services:\n  " + ORDERS + ":\n    rules:\n"
           "    - {name: no-admin, deny: {paths: [/admin]}}\n    - {name: any, allow: {}}\n")
PROBLEM = r"(YAML anchors and aliases are not supported|YAML merge keys are not supported|" \
          r"keys must be plain strings|a key is a plain string)"
MARKERS = ("&", "*", "<<", "!!merge")
SIZE = 8 * 2**20 - 4096  # under the 8 MiB a file may hold, with room for the rest


def _laughs(width: int = 9, levels: int = 9) -> list[str]:
    out = ["x0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    out += [f"x{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * width) + "]" for k in range(1, levels)]
    return out


def _mappings(width: int = 9, levels: int = 9) -> list[str]:
    out = ["m0: &m0 {" + ", ".join(f"k{i}: lol" for i in range(width)) + "}"]
    out += [f"m{k}: &m{k} {{" + ", ".join(f"k{i}: *m{k - 1}" for i in range(width)) + "}"
            for k in range(1, levels)]
    return out


def _merges(width: int = 10, levels: int = 7) -> list[str]:
    out = ["g0: &g0 {k0: a, k1: b, k2: c}"]
    out += [f"g{k}: &g{k} {{<<: [" + ", ".join([f"*g{k - 1}"] * width) + "]}"
            for k in range(1, levels + 1)]
    return out


def _filled(head: str, item: str, tail: str) -> list[str]:
    """One line ``head item, item, ... tail`` of about ``SIZE`` bytes."""
    return [head + ", ".join([item] * ((SIZE - len(head)) // (len(item) + 2))) + tail]


# name -> the lines of the member: top-level entries of a mapping (indented where placed).
MEMBERS: dict[str, list[str]] = {
    "aliases in sequences (billion laughs)": _laughs(),
    "aliases in mappings": _mappings(),
    "nested anchors": ["n: &outer {inner: &inner [x, y], again: *inner}", "o: [*outer, *outer]"],
    "an anchor alone": ["p: &lonely {a: b}"],
    "an anchored scalar and its alias": ["s: &s text", "t: *s"],
    "an alias as a key": ["k: &k name", "? *k", ": v"],
    "an anchored key": ["&key q: v"],
    "a merge of an inline mapping": ["r: {<<: {a: b}, c: d}"],
    "a merge of an anchor": ["u: &u {a: b}", "w: {<<: *u, c: d}"],
    "a merge of a list of anchors": ["u2: &u2 {a: b}", "w2: {<<: [*u2, *u2], c: d}"],
    "an explicitly tagged merge": ["u3: &u3 {a: b}", "w3: {!!merge x: *u3}"],
    "nested merges": _merges(),
    "8 MiB of aliases": ["z0: &z [lol]", *_filled("z1: [", "*z", "]")],
    "8 MiB of anchors": _filled("z2: [", "&z x", "]"),
    "8 MiB of merge keys": ["z0: &z {a: b}", *_filled("z3: [", "{<<: *z}", "]")],
}


def _indent(lines: list[str], spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in lines)


# place -> the policy text with the member there.
PLACES = {
    "first key": lambda lines: _indent(lines, 0) + MESH + SECTION,
    "last key": lambda lines: MESH + SECTION + _indent(lines, 0),
    "own section": lambda lines: MESH + SECTION.replace(
        "    rules:\n", "    x-bomb:\n" + _indent(lines, 6) + "    rules:\n"),
}


def _line(text: str) -> int:
    """The line of the first anchor, alias or merge key of ``text``."""
    for n, line in enumerate(text.splitlines(), start=1):
        if any(m in line for m in MARKERS):
            return n
    raise AssertionError("no member in the text")


def _run(*args: str, bound: float = 30.0) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    try:
        r = sidecar_cli(*args, timeout=bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sidecar {' '.join(args)}: still busy after {bound} s")
    assert time.monotonic() - start < bound
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-2000:]
    assert len(out) < 100_000, (args, len(out))  # reading stopped at the problem cap
    return r


def _refused(r: subprocess.CompletedProcess[str], code: int, path: Path, line: int) -> None:
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-2000:]
    assert len(out) < 100_000, len(out)  # reading stopped at the problem cap
    assert r.returncode == code, (r.returncode, out[-2000:])
    assert re.search(re.escape(str(path)) + f":{line}: .*{PROBLEM}", out), out[-2000:]


def _many(jobs: dict, bound: float = 30.0) -> dict:
    """Every job (key -> argv) in one process (``sidecar_cli_many``), each within ``bound``
    (``_refused`` checks each output as ``_run`` does); key -> result."""
    results = sidecar_cli_many(list(jobs.values()), bound=bound,
                               timeout=120 + 10 * len(jobs))
    return dict(zip(jobs, results, strict=True))


def _same(batch: subprocess.CompletedProcess[str], args: list[str]) -> None:
    """The process boundary: ``python -m sidecar ARGS`` (through ``_run``: bounded, no
    traceback) says what the in-process run said, with the same exit status."""
    r = _run(*args)
    assert (r.returncode, r.stdout, r.stderr) == \
        (batch.returncode, batch.stdout, batch.stderr), args


def test_every_member_fits_in_a_file_and_holds_a_marker():
    for name, lines in MEMBERS.items():
        for place, build in PLACES.items():
            text = build(lines)
            assert len(text.encode()) <= 8 * 2**20, (name, place)
            _line(text)


@pytest.fixture(scope="module")
def policy_checks(tmp_path_factory) -> dict:
    """``sidecar policy check`` of every member in every place, each its own ``mesh.yaml``,
    all in one process; (name, place) -> (path, text, result)."""
    base = tmp_path_factory.mktemp("policy-check")
    cases = {}
    for i, name in enumerate(MEMBERS):
        for place in sorted(PLACES):
            text = PLACES[place](MEMBERS[name])
            path = base / f"m{i}-{place.replace(' ', '-')}" / "mesh.yaml"
            path.parent.mkdir()
            path.write_text(text)
            cases[name, place] = (path, text)
    results = _many({key: ["policy", "check", str(path)] for key, (path, _t) in cases.items()})
    return {key: (*cases[key], results[key]) for key in cases}


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("name", list(MEMBERS))
def test_policy_check_refuses_every_member_in_every_place(policy_checks, name, place):
    path, text, r = policy_checks[name, place]
    _refused(r, 1, path, _line(text))


@pytest.mark.parametrize("name", ["aliases in sequences (billion laughs)", "8 MiB of aliases"])
def test_policy_check_in_its_own_process_says_the_same(policy_checks, name):
    path, _text, batch = policy_checks[name, "first key"]
    _same(batch, ["policy", "check", str(path)])


def _policy_commands(target: Path, tmp: Path) -> dict[str, tuple[list[str], int]]:
    """Every other command that reads a policy file, and its exit code for invalid input."""
    return {
        "policy lint": (["policy", "lint", str(target)], 1),
        "policy explain": (["policy", "explain", str(target), "--to", ORDERS, "--from",
                            spiffe("frontend"), "--method", "GET", "--path", "/"], 1),
        "policy split": (["policy", "split", str(target), "--by", "namespace", "--out",
                          str(tmp / "split")], 1),
        "policy check (directory)": (["policy", "check", str(target.parent)], 1),
        # replay: 2 for an invalid policy (``replay.cmd_replay``); the trail is never reached
        "policy replay": (["policy", "replay", str(target.parent), "--audit", str(tmp)], 2),
    }


@pytest.fixture(scope="module")
def policy_commands(tmp_path_factory) -> dict:
    """Every policy command of ``_policy_commands`` on every member, in a tenant's file of a
    policy directory of its own (the mesh file beside it valid), all in one process;
    name -> (target, text, {command: (args, code, result)})."""
    base = tmp_path_factory.mktemp("policy-commands")
    cases, jobs = {}, {}
    for i, name in enumerate(MEMBERS):
        tmp = base / f"m{i}"
        d = tmp / "policy"
        d.mkdir(parents=True)
        text = PLACES["own section"](MEMBERS[name]).replace(MESH, TENANT)
        (d / "mesh.yaml").write_text(MESH)
        target = d / "ns-default.yaml"
        target.write_text(text)
        commands = _policy_commands(target, tmp)
        cases[name] = (target, text, commands)
        jobs.update({(name, command): args for command, (args, _code) in commands.items()})
    results = _many(jobs)
    return {name: (target, text, {command: (args, code, results[name, command])
                                  for command, (args, code) in commands.items()})
            for name, (target, text, commands) in cases.items()}


@pytest.mark.parametrize("name", list(MEMBERS))
def test_every_policy_command_refuses_every_member(policy_commands, name):
    """In a tenant's file of a policy directory (the mesh file beside it is valid)."""
    target, text, results = policy_commands[name]
    assert len(results) == 5
    for command, (_args, code, r) in results.items():
        assert r.returncode == code, (command, r.returncode, (r.stdout + r.stderr)[-2000:])
        _refused(r, code, target, _line(text))


def test_every_policy_command_in_its_own_process_says_the_same(policy_commands):
    """The process boundary, once per command: a real ``python -m sidecar``."""
    _target, _text, results = policy_commands["nested merges"]
    for _command, (args, _code, batch) in results.items():
        _same(batch, args)


CONFIG = "identity: {cert: c.pem, key: k.pem, bundle: b.pem}\n"
# The config readers and their exit codes for invalid input.
CONFIG_READERS = ((["run", "-c", "{}", "--check"], 2),
                  (["run", "-c", "{}", "--check", "--config-only"], 2),
                  (["check", "-c", "{}", "--offline"], 1))


@pytest.fixture(scope="module")
def config_readers(tmp_path_factory) -> dict:
    """Every member first and last in a config, through every config reader, and in the
    policy file a config names (``run --check``), all in one process;
    name -> [(path, line, code, args, result)]."""
    base = tmp_path_factory.mktemp("config-readers")
    pki = Pki(base / "pki")
    cases: dict = {}
    for i, name in enumerate(MEMBERS):
        tmp = base / f"m{i}"
        tmp.mkdir()
        policy = tmp / "policy.yaml"
        policy.write_text(PLACES["last key"](MEMBERS[name]))
        with_policy = tmp / "with-policy.yaml"
        cfg = sidecar_config(pki.identity("orders"),
                             inbound={"listen": "127.0.0.1:0", "app": "127.0.0.1:9"})
        cfg["policy"] = str(policy)
        with_policy.write_text(yaml.safe_dump(cfg))
        cases[name] = []
        for path, text in ((tmp / "first.yaml", _indent(MEMBERS[name], 0) + CONFIG),
                           (tmp / "last.yaml", CONFIG + _indent(MEMBERS[name], 0))):
            path.write_text(text)
            cases[name] += [(path, _line(text), code, [a.format(path) for a in args])
                            for args, code in CONFIG_READERS]
        cases[name].append((policy, _line(policy.read_text()), 2,
                            ["run", "-c", str(with_policy), "--check"]))
    results = _many({(name, n): args for name, jobs in cases.items()
                     for n, (*_, args) in enumerate(jobs)})
    return {name: [(*job, results[name, n]) for n, job in enumerate(jobs)]
            for name, jobs in cases.items()}


@pytest.mark.parametrize("name", list(MEMBERS))
def test_the_config_readers_refuse_every_member(config_readers, name):
    """``run --check`` (exit 2), ``run --check --config-only`` (2) and ``check -c`` (1), with
    the member first and last in the config, and in the policy file a config names."""
    assert len(config_readers[name]) == 7
    for path, line, code, args, r in config_readers[name]:
        assert r.returncode == code, (args, r.returncode, (r.stdout + r.stderr)[-2000:])
        _refused(r, code, path, line)


def test_the_config_readers_in_their_own_process_say_the_same(config_readers):
    """The process boundary, once per reader (the member first) and for the policy a config
    names: a real ``python -m sidecar``."""
    jobs = config_readers["aliases in mappings"]
    for *_, args, batch in [*jobs[:3], jobs[6]]:
        _same(batch, args)


MANY_FILES = 200


def _aliases_file() -> str:
    return TENANT + "x0: &a [a]\n" + "".join(f"x{j + 1}: *a\n" for j in range(150))


def test_the_problems_of_a_policy_set_stop_at_100(tmp_path):
    """Each file stopped at 100 problems, but a directory of 200 such files made 20,000
    (1,000 files: a 7 MB error, in ``/policy`` and a log line at every reload)."""
    d = tmp_path / "policy"
    d.mkdir()
    (d / "mesh.yaml").write_text(MESH + SECTION)
    for i in range(MANY_FILES):
        (d / f"ns-t{i:03d}.yaml").write_text(_aliases_file())
    for args, code in ((["policy", "check", str(d)], 1), (["policy", "lint", str(d)], 1),
                       (["policy", "replay", str(d), "--audit", str(tmp_path)], 2)):
        r = _run(*args)
        out = r.stdout + r.stderr
        assert r.returncode == code, out[-2000:]
        assert "100 problems in the policy files: stopped reading them here" in out, out[-2000:]
        assert out.count("YAML anchors and aliases are not supported") <= 100, args
        assert len(out) < 50_000, (args, len(out))


def test_a_running_sidecar_keeps_its_policy_through_every_member(tmp_path, pki: Pki, app,
                                                                  procs):
    """A sidecar watching a directory (mesh file + the orders namespace's file) every 100 ms:
    each member in each place is renamed over the namespace file in turn; every reload fails
    within the bound, ``/policy`` names the file and line, the deny rule in force still
    holds; then a good file is taken."""
    d = tmp_path / "policy"
    d.mkdir()
    (d / "mesh.yaml").write_text(MESH)
    tenant = d / "ns-default.yaml"
    tenant.write_text(TENANT + SECTION)
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"})
    cfg["policy"] = {"path": str(d), "watch_interval": "100ms"}
    b = start_sidecar(tmp_path, "orders", cfg)
    procs.append(b)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    port = b.port("inbound")
    before = http(b.port("admin"), "GET", "/policy").json()["version"]
    n = 0
    for name, lines in MEMBERS.items():
        for place, build in PLACES.items():
            text = build(lines).replace(MESH, TENANT)
            n += 1
            staged = tmp_path / "staged.yaml"
            staged.write_text(text)
            os.replace(staged, tenant)
            start = time.monotonic()
            wait_for(lambda n=n: b.metric("sidecar_policy_reloads_total", result="failed") >= n,
                     timeout=30)
            assert time.monotonic() - start < 30, (name, place)
            status = http(b.port("admin"), "GET", "/policy").json()
            assert status["version"] == before, (name, place)
            err = status["last_reload_error"]
            assert re.search(re.escape(str(tenant)) + f":{_line(text)}: .*{PROBLEM}", err), \
                (name, place, err[:2000])
            assert http(port, path="/admin", ctx=ctx).status == 403, (name, place)
            assert http(port, path="/x", ctx=ctx).status == 200, (name, place)
    # Many tenants' files of aliases at once: the error stops at 100 problems for the set.
    for i in range(MANY_FILES):
        (d / f"ns-t{i:03d}.yaml").write_text(_aliases_file())
    n += 1
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="failed") >= n, timeout=30)
    err = http(b.port("admin"), "GET", "/policy").json()["last_reload_error"]
    assert "100 problems in the policy files: stopped reading them here" in err, err[-500:]
    assert len(err) < 50_000, len(err)
    assert http(port, path="/admin", ctx=ctx).status == 403
    for i in range(MANY_FILES):
        (d / f"ns-t{i:03d}.yaml").unlink()
    staged = tmp_path / "staged.yaml"
    staged.write_text(TENANT + SECTION + "    - {name: extra, allow: {paths: [/extra]}}\n")
    os.replace(staged, tenant)
    wait_for(lambda: http(b.port("admin"), "GET", "/policy").json()["version"] != before,
             timeout=10)
    assert http(b.port("admin"), "GET", "/policy").json()["last_reload_error"] is None
