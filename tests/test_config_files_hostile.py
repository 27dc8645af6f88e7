"""Config and policy files as a hostile reviewer leaves them (found by a hostile review).

Every file a person names in the config or the policy is read the same way
(``sidecar.config.source.read_regular``): a regular file, opened without blocking. A FIFO,
a device or a directory where a file belongs is refused at once with the file named --
before, a FIFO hung ``sidecar check``, ``sidecar run --check``, ``sidecar policy ...`` and
the start of ``sidecar run`` for ever, stopped the policy watcher, and a FIFO as an
introspection ``client_secret_file`` stopped the event loop. A path with a NUL byte is
refused where it is written (file, line, key) -- before, ``open`` raised ``ValueError`` and
``sidecar check`` and ``run --check`` ended in a traceback.

Real files, real subprocesses, real sidecars; every subprocess is bounded by a timeout (a
hang is a failure, not a wait).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sidecar.config.source import read_capped
from sidecar.errors import ConfigError
from tests.harness import (
    Pki,
    http,
    sidecar_cli,
    sidecar_cli_many,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)

POLICY = {"version": 1, "trust_domain": "demo.local",
          "services": {spiffe("orders"): {"rules": [
              {"name": "any-get", "allow": {"methods": ["GET"]}}]}}}


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


def _directory(path: Path) -> str:
    path.mkdir()
    return str(path)


def _device(path: Path) -> str:
    del path
    return "/dev/zero"  # endless: a plain read would take everything it is allowed


# Each way a path names something that is not a regular file.
NOT_REGULAR: dict[str, Callable[[Path], str]] = {
    "fifo": _fifo, "directory": _directory, "device": _device,
}


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr


def _unblock(fifo: str) -> None:
    """Open ``fifo`` for writing once a reader waits on it (bounded: 200 tries), so that a
    reader that blocks on it -- the bug -- gets an empty file and the test fails instead of
    hanging."""
    for _ in range(200):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError:
            time.sleep(0.05)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_read_capped_refuses_what_is_not_a_regular_file(tmp_path, kind):
    path = NOT_REGULAR[kind](tmp_path / "x.yaml")
    if kind == "fifo":
        threading.Thread(target=_unblock, args=(path,), daemon=True).start()
    with pytest.raises(ConfigError, match="not a regular file"):
        read_capped(path)


def test_read_capped_refuses_a_nul_in_the_path():
    with pytest.raises(ConfigError, match="NUL"):
        read_capped("/tmp/a\0b.yaml")


def _config(tmp_path: Path, pki: Pki, **extra) -> dict:
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": "127.0.0.1:0", "app": "127.0.0.1:9"}, **extra)
    return cfg


def _cli_cases(tmp_path: Path, pki: Pki, target: str) -> dict[str, list[str]]:
    """Every command that reads a file people name, made to read ``target``."""
    good_policy = write_policy(tmp_path / "good.yaml", POLICY)
    cfg_with_policy = tmp_path / "cfg-policy.yaml"
    cfg_with_policy.write_text(yaml.safe_dump(_config(tmp_path, pki, policy=target)))
    jwks_policy = dict(POLICY, jwt_providers={"p": {"issuer": "https://idp.example",
                                                    "jwks_file": target,
                                                    "algorithms": ["ES256"],
                                                    "audiences": ["a"]}})
    jwks_policy["services"] = {spiffe("orders"): {"rules": [
        {"name": "tok", "allow": {"jwt": {"provider": "p"}}}]}}
    cfg_with_jwks = tmp_path / "cfg-jwks.yaml"
    cfg_with_jwks.write_text(yaml.safe_dump(_config(
        tmp_path, pki, policy=write_policy(tmp_path / "jwks-policy.yaml", jwks_policy))))
    audit = tmp_path / "audit"
    audit.mkdir()
    identity_cases: dict[str, list[str]] = {}
    for key in ("cert", "key", "bundle"):
        cfg = _config(tmp_path, pki)
        cfg["identity"][key] = target
        path = tmp_path / f"cfg-{key}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        identity_cases[f"check -c (identity.{key})"] = ["check", "-c", str(path)]
        identity_cases[f"run --check (identity.{key})"] = ["run", "-c", str(path), "--check"]
    return {
        **identity_cases,
        "policy check": ["policy", "check", target],
        "policy lint": ["policy", "lint", target],
        "policy explain": ["policy", "explain", target, "--to", spiffe("orders"), "--from",
                           spiffe("frontend"), "--method", "GET", "--path", "/"],
        "policy replay": ["policy", "replay", target, "--audit", str(audit)],
        "policy split": ["policy", "split", target, "--by", "namespace", "--out",
                         str(tmp_path / "split")],
        "policy check (set)": ["policy", "check", good_policy, target],
        "check -c": ["check", "-c", target],
        "run --check": ["run", "-c", target, "--check"],
        "run --check --config-only": ["run", "-c", target, "--check", "--config-only"],
        "check -c (policy:)": ["check", "-c", str(cfg_with_policy)],
        "run --check (policy:)": ["run", "-c", str(cfg_with_policy), "--check"],
        "check -c (jwks_file)": ["check", "-c", str(cfg_with_jwks)],
        "run --check (jwks_file)": ["run", "-c", str(cfg_with_jwks), "--check"],
    }


# One case of each distinct command, run also in its own process (the process boundary).
ONE_PER_COMMAND = ("check -c", "run --check", "run --check --config-only", "policy check",
                   "policy lint", "policy explain", "policy replay", "policy split")


@pytest.mark.parametrize("kind", sorted(NOT_REGULAR))
def test_every_command_refuses_a_file_that_is_not_regular(tmp_path, pki, kind):
    """Every case in one process (``sidecar_cli_many``: a job still waiting after 30 s, or a
    run of them after 120 s, fails naming it); for the FIFO, one case of each command also
    in its own ``python -m sidecar``, which must say the same."""
    target = NOT_REGULAR[kind](tmp_path / "target.yaml")
    cases = _cli_cases(tmp_path, pki, target)
    results = dict(zip(cases, sidecar_cli_many(cases.values(), bound=30, timeout=120),
                       strict=True))
    for name, r in results.items():
        _no_traceback(r)
        assert r.returncode != 0, (name, r.stdout, r.stderr)
        assert target in r.stdout + r.stderr, (name, r.stdout, r.stderr)
    if kind != "fifo":
        return
    for name in ONE_PER_COMMAND:
        try:
            r = sidecar_cli(*cases[name], timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} on a {kind}: still waiting after 30 s")
        batch = results[name]
        assert (r.returncode, r.stdout, r.stderr) == \
            (batch.returncode, batch.stdout, batch.stderr), name


# Every key of the config that names a file, with a NUL in the name.
NUL = "/etc/sidecar/a\0b"


def _nul_configs(tmp_path: Path, pki: Pki) -> dict[str, dict]:
    base = _config(tmp_path, pki)
    out: dict[str, dict] = {}
    for key in ("cert", "key", "bundle"):
        cfg = yaml.safe_load(yaml.safe_dump(base))
        cfg["identity"][key] = NUL
        out[f"identity.{key}"] = cfg
    cfg = yaml.safe_load(yaml.safe_dump(base))
    cfg["identity"]["trust_domains"] = {"partner.example": {"bundle": NUL}}
    out["identity.trust_domains.partner.example.bundle"] = cfg
    out["policy"] = dict(base, policy=NUL)
    out["policy[0]"] = dict(base, policy=[NUL])
    out["policy.path"] = dict(base, policy={"path": NUL})
    out["audit.path"] = dict(base, audit={"path": NUL})
    for key in ("signing_key_file", "encryption_key_file", "hmac_key_file"):
        out[f"audit.{key}"] = dict(base, audit={"path": str(tmp_path / "audit"), key: NUL})
    for key in ("ca_file", "cert_file", "key_file"):
        ship = {"address": "127.0.0.1:6514", "ca_file": str(tmp_path / "ca.pem"),
                "cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k.pem")}
        ship[key] = NUL
        out[f"audit.ship.{key}"] = dict(base, audit={"path": str(tmp_path / "audit"),
                                                     "ship": ship})
    return out


def test_a_nul_in_any_config_path_is_refused_with_file_line_and_key(tmp_path, pki):
    """Every key through the three commands in one process (``sidecar_cli_many``); the first
    key through each command also in its own ``python -m sidecar``, which must say the
    same."""
    jobs = []
    for i, (key, cfg) in enumerate(_nul_configs(tmp_path, pki).items()):
        path = tmp_path / f"k{i}" / "nul.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(cfg))
        jobs += [(key, ["run", "-c", str(path), "--check"]),
                 (key, ["run", "-c", str(path), "--check", "--config-only"]),
                 (key, ["check", "-c", str(path)])]
    results = sidecar_cli_many([args for _key, args in jobs], bound=30, timeout=180)
    for (key, args), r in zip(jobs, results, strict=True):
        _no_traceback(r)
        if args[0] == "run":
            assert r.returncode == 2, (key, args, r.stdout, r.stderr)
            assert "nul.yaml:" in r.stderr and f"{key}: a file path cannot contain a NUL" \
                in r.stderr, (key, args, r.stderr)
        else:
            assert r.returncode == 1 and "NUL" in r.stdout + r.stderr, \
                (key, r.stdout, r.stderr)
    for (key, args), batch in list(zip(jobs, results, strict=True))[:3]:
        r = sidecar_cli(*args, timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == \
            (batch.returncode, batch.stdout, batch.stderr), (key, args)


def test_a_nul_in_a_policy_path_is_refused_with_file_line_and_key(tmp_path):
    provider = {"issuer": "https://idp.example", "algorithms": ["ES256"], "audiences": ["a"]}
    cases = {
        "jwt_providers.p.jwks_file": dict(provider, jwks_file=NUL),
        "jwt_providers.p.jwks_ca": dict(provider, jwks_uri="https://idp.example/k", jwks_ca=NUL),
        "jwt_providers.p.introspection.client_secret_file": {
            "issuer": "https://idp.example", "audiences": ["a"],
            "introspection": {"endpoint": "https://idp.example/i", "client_id": "c",
                              "client_secret_file": NUL}},
        "jwt_providers.p.introspection.ca": {
            "issuer": "https://idp.example", "audiences": ["a"],
            "introspection": {"endpoint": "https://idp.example/i", "client_id": "c",
                              "mtls": True, "ca": NUL}},
    }
    paths = {}
    for i, (key, prov) in enumerate(cases.items()):
        (tmp_path / f"k{i}").mkdir()
        paths[key] = write_policy(tmp_path / f"k{i}" / "p.yaml",
                                  dict(POLICY, jwt_providers={"p": prov}))
    # All in one process; the first also in its own, which must say the same.
    results = sidecar_cli_many([["policy", "check", p] for p in paths.values()], bound=30)
    for key, r in zip(cases, results, strict=True):
        _no_traceback(r)
        assert r.returncode == 1 and f"{key}: a file path cannot contain a NUL" in r.stdout \
            + r.stderr, (key, r.stdout, r.stderr)
    r = sidecar_cli("policy", "check", next(iter(paths.values())), timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == \
        (results[0].returncode, results[0].stdout, results[0].stderr)


def _watched_sidecar(tmp_path: Path, pki: Pki, procs: list) -> tuple:
    """A running sidecar watching ``mesh.yaml`` every 100 ms: (sidecar, path, version)."""
    policy = tmp_path / "mesh.yaml"
    write_policy(policy, POLICY)
    cfg = _config(tmp_path, pki, policy=str(policy))
    cfg["policy"]["watch_interval"] = "100ms"
    b = start_sidecar(tmp_path, "orders", cfg)
    procs.append(b)
    return b, policy, http(b.port("admin"), "GET", "/policy").json()["version"]


def test_a_fifo_swapped_in_for_the_policy_keeps_the_policy_and_the_watcher(tmp_path, pki,
                                                                         procs):
    """A FIFO renamed over the policy file: the reload fails (named, counted), the old
    policy stays, and the watcher still takes the next good file."""
    b, policy, before = _watched_sidecar(tmp_path, pki, procs)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.replace(fifo, policy)
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="failed") >= 1,
             timeout=10)
    assert any("mesh.yaml" in e["error"] for e in b.log_events("policy_reload_failed"))
    assert http(b.port("admin"), "GET", "/policy").json()["version"] == before
    locked = dict(POLICY, services={spiffe("orders"): {"rules": []}})
    os.unlink(policy)
    write_policy(policy, locked)
    wait_for(lambda: http(b.port("admin"), "GET", "/policy").json()["version"] != before,
             timeout=10)
    assert http(b.port("admin"), "GET", "/policy").json()["last_reload_error"] is None


def test_a_policy_that_never_holds_still_is_named_and_the_policy_in_force_stays(tmp_path, pki,
                                                                               procs):
    """The policy path made a symlink to a file that changes at every read
    (``/proc/self/status``): it never settles, so it is never applied -- and before, nothing
    said so. Now ``reload_unsettled`` (warning) names the watcher and the path, once; the
    policy in force stays; a good file put back is taken as usual."""
    b, policy, before = _watched_sidecar(tmp_path, pki, procs)
    os.unlink(policy)
    os.symlink("/proc/self/status", policy)
    wait_for(lambda: b.log_events("reload_unsettled"), timeout=10)
    time.sleep(1.0)  # ten more polls: still one line for the spell
    events = b.log_events("reload_unsettled")
    assert len(events) == 1, events
    assert events[0]["what"] == "policy" and events[0]["paths"] == [str(policy)]
    assert events[0]["level"] == "warning"
    assert http(b.port("admin"), "GET", "/policy").json()["version"] == before
    os.unlink(policy)
    locked = dict(POLICY, services={spiffe("orders"): {"rules": []}})
    write_policy(policy, locked)
    wait_for(lambda: http(b.port("admin"), "GET", "/policy").json()["version"] != before,
             timeout=10)
    assert len(b.log_events("reload_unsettled")) == 1


# Deny rules that denied nothing (each condition could never hold for any request), as data:
# each is now refused at load, so a reload to it keeps the policy in force and names it.
DENIES_NOTHING = {
    "methods: ['*']": "not a method wildcard",
    "methods: [GET_ALL]": "no request has this method",
    "listeners: [inbnd]": "inbound listener only",
    "hosts: ['.']": "not only dots",
    "ports: [0700]": "'0700' is read as the number 448",
    "namespaces: [no]": "'no' is read as false",
}


def test_a_deny_rule_that_could_never_hold_is_refused_on_reload(tmp_path, pki, procs):
    b, policy, before = _watched_sidecar(tmp_path, pki, procs)
    for n, (cond, message) in enumerate(DENIES_NOTHING.items(), start=1):
        text = ("version: 1\ntrust_domain: demo.local\nservices:\n"
                f"  {spiffe('orders')}:\n    rules:\n"
                f"      - name: nothing-{n}\n        deny: {{{cond}}}\n"
                "      - name: any-get\n        allow: {methods: [GET]}\n")
        policy.write_text(text)
        wait_for(lambda n=n: b.metric("sidecar_policy_reloads_total", result="failed") >= n,
                 timeout=10)
        status = http(b.port("admin"), "GET", "/policy").json()
        assert status["version"] == before, cond
        err = status["last_reload_error"]
        assert "mesh.yaml:7:" in err and "rules[0].deny" in err and message in err, (cond, err)


def _outbound(name: str, listen: str) -> dict:
    return {"name": name, "listen": listen, "upstream": "127.0.0.1:1",
            "identity": spiffe("payments")}


# Configs that loaded (and then could not start, or polled without pause, or put an outbound
# listener's traffic under the inbound listener's name): (change, key, message).
BAD_CONFIGS = [
    ({"outbound": [_outbound("inbound", "127.0.0.1:15001")]}, "outbound[0].name",
     "the inbound listener's name"),
    ({"outbound": [_outbound('a b"c', "127.0.0.1:15001")]}, "outbound[0].name", "names use"),
    ({"outbound": [_outbound("a" * 129, "127.0.0.1:15001")]}, "outbound[0].name", "names use"),
    ({"outbound": [_outbound("-x", "127.0.0.1:15001")]}, "outbound[0].name", "names use"),
    ({"outbound": [_outbound("é", "127.0.0.1:15001")]}, "outbound[0].name", "names use"),
    ({"outbound": [_outbound("a", "127.0.0.1:15001"), _outbound("b", "127.0.0.1:15001")]},
     "outbound[1].listen", "the same address as outbound[0].listen"),
    # An outbound listener takes no credentials: loopback only (found by a hostile review:
    # a wildcard loaded without a word, and anyone reaching the pod called peers as it).
    ({"outbound": [_outbound("a", "0.0.0.0:15001")]}, "outbound[0].listen",
     "must listen on a loopback address"),
    ({"outbound": [_outbound("a", "[::]:15001")]}, "outbound[0].listen",
     "must listen on a loopback address"),
    ({"outbound": [_outbound("a", "10.0.0.7:15001")]}, "outbound[0].listen",
     "must listen on a loopback address"),
    ({"outbound": [_outbound("a", "orders.example:15001")]}, "outbound[0].listen",
     "must listen on a loopback address"),
    ({"outbound": [_outbound("a", "127.0.0.1:15009")],
      "inbound": {"listen": "[::]:15009", "app": "127.0.0.1:9"}},
     "outbound[0].listen", "the same address as inbound.listen"),
    ({"admin": {"listen": "127.0.0.1:15000", "health_listen": "127.0.0.1:15000"}},
     "admin.health_listen", "the same address as admin.listen"),
    ({"inbound": {"listen": "127.0.0.1:15000", "app": "127.0.0.1:9"},
      "admin": {"listen": "127.0.0.1:15000"}}, "admin.listen", "the same address as inbound"),
    # One address in other spellings (found by the hostile review of config values).
    ({"inbound": {"listen": "[::1]:15000", "app": "127.0.0.1:9"},
      "admin": {"listen": "[0:0::0001]:15000"}}, "admin.listen", "the same address as inbound"),
    ({"inbound": {"listen": "[::1]:15000", "app": "127.0.0.1:9"},
      "admin": {"listen": "[0:0:0:0:0:0:0:1]:15000"}}, "admin.listen", "the same address as"),
    ({"outbound": [_outbound("a", "[0::1]:15001"), _outbound("b", "[::1]:15001")]},
     "outbound[1].listen", "the same address as outbound[0].listen"),
    ({"outbound": [_outbound("a", "LOCALHOST:15001"), _outbound("b", "localhost:15001")]},
     "outbound[1].listen", "the same address as outbound[0].listen"),
    ({"inbound": {"listen": "127.0.0.1:\u0661\u0665\u0664\u0664\u0663", "app": "127.0.0.1:9"}},
     "inbound.listen", "port must be a number"),
    ({"inbound": {"listen": "127.0.0.1:\u00b2", "app": "127.0.0.1:9"}}, "inbound.listen",
     "port must be a number"),
    ({"identity_watch": 0}, "identity.watch_interval", "at least 100ms"),
    ({"identity_watch": "1ms"}, "identity.watch_interval", "at least 100ms"),
    ({"identity_watch": 0.000000001}, "identity.watch_interval", "at least 100ms"),
    ({"policy": {"path": "p.yaml", "watch_interval": 0}}, "policy.watch_interval",
     "at least 100ms"),
    ({"policy": {"path": "p.yaml", "watch_interval": "99ms"}}, "policy.watch_interval",
     "at least 100ms"),
]
# ...and what stays valid next to them.
GOOD_CONFIGS = [
    {"outbound": [_outbound("orders.v2_a:1", "127.0.0.1:15001")]},
    {"outbound": [_outbound("a", "127.0.0.1:15001"), _outbound("b", "127.0.0.2:15001")]},
    {"outbound": [_outbound("a", "127.0.0.1:0"), _outbound("b", "127.0.0.1:0")]},
    {"identity_watch": "100ms", "policy": {"path": "p.yaml", "watch_interval": 0.1}},
]


def _with(tmp_path: Path, pki: Pki, change: dict) -> Path:
    cfg = _config(tmp_path, pki)
    cfg["admin"] = {"listen": "127.0.0.1:0"}
    change = dict(change)
    if "identity_watch" in change:
        cfg["identity"]["watch_interval"] = change.pop("identity_watch")
    cfg.update(change)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def test_config_listeners_names_and_intervals_that_could_not_work_are_refused(tmp_path, pki):
    from sidecar.config.model import load_config_file

    write_policy(tmp_path / "p.yaml", POLICY)
    for change, key, message in BAD_CONFIGS:
        path = _with(tmp_path, pki, change)
        with pytest.raises(ConfigError) as info:
            load_config_file(str(path))
        assert any(p.key == key and message in p.message and p.line
                   for p in info.value.problems), (change, info.value.problems)
    for change in GOOD_CONFIGS:
        load_config_file(str(_with(tmp_path, pki, change)))
    # As a user meets it: run --check names file, line and key (exit 2), no traceback.
    r = sidecar_cli("run", "-c", str(_with(tmp_path, pki, BAD_CONFIGS[5][0])), "--check")
    _no_traceback(r)
    assert r.returncode == 2 and "cfg.yaml:" in r.stderr and "outbound[1].listen: the same " \
        "address as outbound[0].listen" in r.stderr, r.stderr


# Characters a terminal (or a CI log viewer) acts on, as YAML double-quoted escapes.
TERMINAL_CONTROLS = ["\\e]0;owned\\a", "\\e[2J", "\\x9b31m", "\\u202e", "\\L", "\\P", "\\x7f",
                     "\\0", "\\b", "\\r", "\\x85", "\\u200f", "\\ufeff"]


def test_problems_never_write_control_characters_to_a_terminal(tmp_path):
    """Found by a hostile review: a key or value holding escapes went raw into ``policy
    check``'s (and ``run --check``'s) messages: ``\\e]0;...`` retitles the terminal, ``\\e[2J``
    clears it, U+202E reverses what a reviewer reads. Each is written as its escape."""
    lines = ["version: 1", "trust_domain: demo.local", "services:"]
    for n, esc in enumerate(TERMINAL_CONTROLS):
        lines += [f'  "spiffe://demo.local/ns/a/sa/s{n}{esc}":',
                  "    rules:", f'      - name: r{n}', f'        allow: {{from: ["spiffe://x{esc}"]}}',
                  f'    "unknown{esc}": 1']
    path = tmp_path / "esc.yaml"
    path.write_text("\n".join(lines) + "\n")
    for fmt in ("table", "json", "yaml"):
        r = sidecar_cli("policy", "check", str(path), "-o", fmt, timeout=30)
        _no_traceback(r)
        assert r.returncode == 1, r.stderr
        out = r.stdout + r.stderr
        assert "unknown" in out and "spiffe://x" in out
        bad = sorted({c for c in out if not c.isprintable() and c != "\n"})
        assert not bad, (fmt, bad)


def test_a_reverted_update_or_a_restored_file_clears_the_reload_error(tmp_path, pki, procs):
    """Found by a hostile review: after a bad update was reverted (or a deleted file put
    back) to the very bytes in force, nothing changed to load and /policy kept showing the
    old failure for ever. Now the failure is over: ``policy_restored`` and no error."""
    b, policy, before = _watched_sidecar(tmp_path, pki, procs)
    good = policy.read_bytes()
    undo = {"a bad update reverted": lambda: policy.write_text("version: 1\nmode: sometimes\n"),
            "the file deleted and put back": policy.unlink}
    for n, (what, breaking) in enumerate(undo.items(), start=1):
        breaking()
        wait_for(lambda n=n: b.metric("sidecar_policy_reloads_total", result="failed") >= n,
                 timeout=10)
        assert http(b.port("admin"), "GET", "/policy").json()["last_reload_error"], what
        policy.write_bytes(good)
        wait_for(lambda n=n: len(b.log_events("policy_restored")) >= n, timeout=10)
        status = http(b.port("admin"), "GET", "/policy").json()
        assert status["last_reload_error"] is None and status["version"] == before, what
