"""What the config and the policy commands said otherwise than the sidecar does (a hostile
review of the twenty-ninth session), as families of data, through the real commands and real
sidecars.

* ``inbound.allow_from`` beside ``policy`` was ignored without a word (no load error, no
  ``run --check`` / ``check`` finding, no log line): ``allow_from: [frontend]`` and a policy
  rule ``allow {paths: [/api/**]}`` served a caller named ``intruder``. The combination is
  now refused while the config loads, at the key's line (``ALLOW_FROM_WITH_POLICY``).
* ``policy explain`` without ``--host`` decided with Host "" -- a request the data path
  refuses with 400 before any rule -- so ``deny {hosts: [internal.example]}`` was shown
  failing and the request ALLOWED where the sidecar answers 403; and without ``--from`` it
  decided a request without a caller, which the mTLS listener never has. Both are usage
  errors now (``--host`` when a rule of the section reads it), and ``--tcp`` explains a
  stream as a ``protocol: tcp`` listener decides it (a deny on ``paths`` refuses every
  stream, an allow on ``paths`` none).
* ``policy split`` rewrote relative ``jwks_file``/``jwks_ca`` paths for the new directory but
  not ``introspection.ca`` / ``introspection.client_secret_file``, and still said ``ok``: the
  set it wrote named other files. Every path key (``cli.NAMED_FILE_KEYS``, derived here from
  the loader) is rewritten, and the load-back compares every provider with its paths
  resolved.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.policy.loader import load_policy, load_policy_set
from tests.harness import (
    TD,
    Pki,
    free_port,
    module_fixture,
    mtls_context,
    raw,
    sidecar_cli,
    sidecar_cli_many,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    write_policy,
)
from tests.test_config_null_values import maximal_policy

pytestmark = pytest.mark.usefixtures("no_internal_errors")

FRONT, INTRUDER = spiffe("frontend"), spiffe("intruder")
# What the refusal says (``config.model.ALLOW_FROM_WITH_POLICY``; read from the output, so
# that the tests run, and fail, against a tree without it).
ALLOW_FROM_WITH_POLICY = "ignored when a policy is set"


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000)


def _line_of(text: str, key: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip().startswith(key))


# --- 6: inbound.allow_from beside a policy ------------------------------------------------------

# Every way to name the policy, every shape of allow_from, on both kinds of listener.
POLICY_SPELLINGS: dict[str, Callable[[str], Any]] = {
    "path": lambda f: f, "mapping": lambda f: {"path": f, "watch_interval": "1s"},
    "list": lambda f: [f]}
ALLOW_FROM = {"one id": [FRONT], "empty": [], "wildcard": [spiffe("*")]}
PROTOCOLS = ("http", "tcp")
COMBINATIONS = [(s, a, p) for s in POLICY_SPELLINGS for a in ALLOW_FROM for p in PROTOCOLS]


def _config(tmp: Path, pki: Pki, name: str, *, policy: Any = None,
            allow_from: list[str] | None = None, protocol: str = "http") -> tuple[Path, str]:
    inbound: dict[str, Any] = {"listen": f"127.0.0.1:{free_port()}", "app": "127.0.0.1:9",
                               "protocol": protocol}
    if allow_from is not None:
        inbound["allow_from"] = allow_from
    cfg = sidecar_config(pki.identity("orders", dirname="orders-id"), inbound=inbound)
    if policy is not None:
        cfg["policy"] = policy
    path = tmp / f"{name}.yaml"
    text = _dump(cfg)
    path.write_text(text)
    return path, text


@pytest.fixture
def shop_policy(tmp_path: Path) -> str:
    return write_policy(tmp_path / "mesh.yaml", {
        "version": 1, "trust_domain": TD, "services": {spiffe("orders"): {"rules": [
            {"name": "api", "allow": {"paths": ["/api/**"]}}]}}})


def test_allow_from_beside_a_policy_is_refused_by_run_check_and_check(
        tmp_path: Path, pki: Pki, shop_policy: str) -> None:
    """Every combination, through ``run --check`` and ``check`` (one process: the real
    commands' code): refused, naming file, line and key (``test_the_controls_load``: either
    key alone loads)."""
    jobs, expected = [], []
    for spelling, shape, protocol in COMBINATIONS:
        name = f"{spelling}-{shape.replace(' ', '-')}-{protocol}"
        path, text = _config(tmp_path, pki, name, policy=POLICY_SPELLINGS[spelling](shop_policy),
                             allow_from=ALLOW_FROM[shape], protocol=protocol)
        want = f"{path}:{_line_of(text, 'allow_from:')}: inbound.allow_from: "
        for command in (["run", "-c", str(path), "--check"],
                        ["check", "-c", str(path), "--offline", "--no-ports"]):
            jobs.append(command)
            expected.append((name, want))
    results = sidecar_cli_many(jobs)
    wrong = []
    for (name, want), job, r in zip(expected, jobs, results, strict=True):
        out = r.stdout + r.stderr
        if r.returncode == 0 or want + ALLOW_FROM_WITH_POLICY not in out:
            wrong.append(f"{name} {job[0]}: exit {r.returncode}\n{out[-600:]}")
    assert not wrong, "\n".join(wrong)
    assert len(results) == 2 * len(COMBINATIONS) == 36


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_controls_load(tmp_path: Path, pki: Pki, shop_policy: str, protocol: str) -> None:
    """A policy alone, and allow_from alone, load; ``check`` says what a sidecar without a
    policy admits."""
    alone, _ = _config(tmp_path, pki, "policy-alone", policy=shop_policy, protocol=protocol)
    listed, _ = _config(tmp_path, pki, "list-alone", allow_from=[FRONT], protocol=protocol)
    nobody, _ = _config(tmp_path, pki, "nobody", protocol=protocol)
    jobs = [["run", "-c", str(p), "--check"] for p in (alone, listed, nobody)]
    jobs += [["check", "-c", str(p), "--offline", "--no-ports"] for p in (listed, nobody)]
    r = sidecar_cli_many(jobs)
    assert [x.returncode for x in r[:3]] == [0, 0, 0], [x.stdout + x.stderr for x in r]
    assert "inbound admits the callers of inbound.allow_from" in r[3].stdout + r[3].stderr
    assert "inbound denies every request" in r[4].stdout + r[4].stderr


def test_a_sidecar_given_both_does_not_start(tmp_path: Path, pki: Pki, shop_policy: str) -> None:
    """The real process: ``run`` refuses the config (before, it served ``intruder``)."""
    path, text = _config(tmp_path, pki, "both", policy=shop_policy, allow_from=[FRONT])
    r = sidecar_cli("run", "-c", str(path), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    line = _line_of(text, "allow_from:")
    assert f"{path}:{line}: inbound.allow_from: {ALLOW_FROM_WITH_POLICY}" in r.stderr, r.stderr


# --- 9: explain asks for what the live request has, and explains streams ------------------------

APP, CLIENT = spiffe("app"), spiffe("client")
PLAIN = spiffe("plain")  # a section no rule of which reads Host
HOSTS_POLICY = {"version": 1, "trust_domain": TD, "services": {
    APP: {"rules": [
        {"name": "no-internal", "deny": {"hosts": ["internal.example"]}},
        {"name": "api-host", "allow": {"from": [CLIENT], "hosts": ["api.example"],
                                       "paths": ["/a/**"]}},
        {"name": "open", "allow": {"from": [CLIENT], "paths": ["/o/**"]}}]},
    PLAIN: {"rules": [{"name": "no-admin", "deny": {"paths": ["/admin/**"]}},
                      {"name": "open", "allow": {"from": [CLIENT]}}]}}}
# Host spellings (those the rules name, as the data path folds them, and others) x paths.
HOSTS = ["internal.example", "INTERNAL.Example", "internal.example.", "internal.example:8443",
         "api.example", "API.EXAMPLE:443", "api.example.", "other.example", "127.0.0.1",
         "[::1]:15443", "internal.example.evil"]
PATHS = ["/a/x", "/o/x"]
HOST_MEMBERS = [(h, p) for h in HOSTS for p in PATHS]


class Live:
    """An app and one sidecar serving ``identity`` with ``policy`` on a ``protocol``
    listener (a TCP one forwards to an echo app); stopped by pid in ``close``."""

    def __init__(self, tmp: Path, identity: str, policy: dict[str, Any], protocol: str,
                 port: int | None = None) -> None:
        self.tmp, self.pki = tmp, Pki(tmp / "pki")
        self.procs: list[Any] = []
        self.echo: socket.socket | None = None
        try:
            if protocol == "tcp":
                self.echo = _echo_app()
                app = self.echo.getsockname()[1]
            else:
                proc, app = start_app(tmp)
                self.procs.append(proc)
            self.policy = write_policy(tmp / "mesh.yaml", policy)
            self.port = port or free_port()
            cfg = sidecar_config(self.pki.custom("self", identity), policy=self.policy, inbound={
                "listen": f"127.0.0.1:{self.port}", "app": f"127.0.0.1:{app}",
                "protocol": protocol})
            self.procs.append(start_sidecar(tmp, "sidecar", cfg))
        except BaseException:
            self.close()
            raise

    def ctx(self, caller: str) -> ssl.SSLContext:
        name = caller.rsplit("/", 1)[1] + "-" + caller.split("/ns/")[1].split("/")[0]
        if not (self.pki.root / name).exists():
            self.pki.custom(name, caller)
        return mtls_context(self.pki.root / name, self.pki.bundle)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=10)
        if self.echo is not None:
            self.echo.close()


def _echo_app() -> socket.socket:
    """A TCP app that echoes what it receives (a daemon thread; closed by the fixture)."""
    import contextlib
    import threading

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return lsock


hosts_live = module_fixture("explain-hosts", lambda tmp: Live(tmp, APP, HOSTS_POLICY, "http"))


def _explained_status(r: Any) -> int:
    """The status ``explain -o json`` says the sidecar answers: 400 for a request refused
    before any rule, the decision's status when denied, else 200."""
    doc = json.loads(r.stdout)
    if doc["refused_before_policy"] is not None:
        return 400
    return 200 if doc["allowed"] else int(doc["decision"]["status"])


def test_explain_with_host_decides_as_the_sidecar(hosts_live: Live) -> None:
    """Every Host x path: ``explain --host H`` gives the status the sidecar answers."""
    jobs = [["policy", "explain", hosts_live.policy, "--to", APP, "--from", CLIENT,
             "--host", host, "--path", path, "-o", "json"] for host, path in HOST_MEMBERS]
    results = sidecar_cli_many(jobs)
    ctx = hosts_live.ctx(CLIENT)
    wrong, seen = [], set()
    for (host, path), r in zip(HOST_MEMBERS, results, strict=True):
        assert r.returncode in (0, 1), (host, path, r.stdout + r.stderr)
        said = _explained_status(r)
        head = raw(hosts_live.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                   "Connection: close\r\n\r\n".encode(), ctx=ctx)
        live = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        seen.add(live)
        if said != live:
            wrong.append(f"Host {host} {path}: explain {said}, sidecar {live}")
    assert not wrong, "\n".join(wrong)
    assert {200, 403} <= seen, seen  # the family holds both outcomes


def test_explain_asks_for_the_host_when_a_rule_reads_it(hosts_live: Live) -> None:
    """Without ``--host`` (or with an empty one) a request to a section whose rules read
    Host is a usage error naming the rule -- before, Host "" was decided: ALLOW for
    ``internal.example``, which the sidecar refuses. A section no rule of which reads Host
    needs none (the control)."""
    base = ["policy", "explain", hosts_live.policy, "--from", CLIENT]
    jobs = [[*base, "--to", APP, "--path", path, *extra]
            for path in PATHS for extra in ([], ["-o", "json"], ["--host", ""])]
    controls = [[*base, "--to", PLAIN, "--path", path] for path in ("/admin/x", "/x")]
    results = sidecar_cli_many(jobs + controls)
    for job, r in zip(jobs, results[:len(jobs)], strict=True):
        assert r.returncode == 2, (job, r.stdout + r.stderr)
        assert "--host" in r.stderr and "Traceback" not in r.stderr, (job, r.stderr)
        assert "" in job or "'api-host'" in r.stderr, (job, r.stderr)
    assert [r.returncode for r in results[len(jobs):]] == [1, 0], results[len(jobs):]
    # The finding's request, through the real process: refused as a usage error.
    r = sidecar_cli(*base, "--to", APP, "--path", "/x")
    assert r.returncode == 2 and "'api-host'" in r.stderr and "--host" in r.stderr, r.stderr


def test_explain_asks_for_the_caller(hosts_live: Live) -> None:
    """Every request the mTLS listener decides has a caller: without ``--from``, explain is
    a usage error -- HTTP or TCP, with or without a Host, table or json."""
    p = hosts_live.policy
    jobs = [["policy", "explain", p, "--to", APP, "--host", "api.example", "--path", "/a/x"],
            ["policy", "explain", p, "--to", PLAIN, "--path", "/x"],
            ["policy", "explain", p, "--to", PLAIN, "--path", "/x", "-o", "json"],
            ["policy", "explain", p, "--to", spiffe("nobody"), "--path", "/x"],
            ["policy", "explain", p, "--to", PLAIN, "--tcp"]]
    for job, r in zip(jobs, sidecar_cli_many(jobs), strict=True):
        assert r.returncode == 2 and "--from is required" in r.stderr, (job, r.stdout + r.stderr)


# A stream's family: each caller meets one rule of one kind (its own deny or allow, with one
# request or credential condition a stream cannot carry, or a stream condition), or none.
DB = spiffe("db")
LAYER7: dict[str, dict[str, Any]] = {
    "methods": {"methods": ["DELETE"]}, "paths": {"paths": ["/admin/**"]},
    "hosts": {"hosts": ["db.internal"]}, "jwt": {"jwt": {"provider": "corp"}},
    "claims": {"jwt": {"provider": "corp", "claims": {"role": "guest"}}},
    "apikey": {"apikey": True},
    "everything": {"methods": ["GET"], "paths": ["/**"], "hosts": ["db.internal"]}}


def _stream_members(port: int) -> list[tuple[str, str, dict[str, Any] | None, bool]]:
    """(member, caller, its rule or None, stream let in live). A deny rule is applied with
    its request conditions left out (it denies the caller's every stream); an allow rule with
    one never matches a stream (the caller is denied by default)."""
    members: list[tuple[str, str, dict[str, Any] | None, bool]] = []
    for kind, cond in LAYER7.items():
        denied = spiffe(f"deny-{kind}")
        members.append((f"deny {kind}", denied,
                        {"deny": {"from": [denied], **copy.deepcopy(cond)}}, False))
        allowed = spiffe(f"allow-{kind}")
        members.append((f"allow {kind}", allowed,
                        {"allow": {"from": [allowed], **copy.deepcopy(cond)}}, False))
    port_rule = spiffe("port-denied")
    other_port = spiffe("other-port")
    listener = spiffe("listener-denied")
    ns_caller = spiffe("x", ns="quarantine")
    members += [
        ("deny ports (this listener)", port_rule, {"deny": {"from": [port_rule],
                                                            "ports": [port]}}, False),
        ("deny ports (another)", other_port, {"deny": {"from": [other_port], "ports": [1]}},
         True),
        ("deny listeners", listener, {"deny": {"from": [listener],
                                               "listeners": ["inbound"]}}, False),
        ("deny namespaces", ns_caller, {"deny": {"namespaces": ["quarantine"]}}, False),
        ("allow ports", spiffe("port-allowed"), {"allow": {"from": [spiffe("port-allowed")],
                                                           "ports": [port]}}, True),
        ("plain", spiffe("plain-caller"), None, True),
        ("stranger", spiffe("stranger"), None, False),
    ]
    return members


def _stream_policy(port: int) -> dict[str, Any]:
    members = _stream_members(port)
    rules = [{"name": f"r{i}", **rule} for i, (_, _, rule, _) in enumerate(members) if rule]
    # Every caller but the stranger and the allow-rule members is let in by a plain allow.
    plain = [c for name, c, rule, _ in members if name != "stranger"
             and not (rule and "allow" in rule)]
    rules.append({"name": "streams", "allow": {"from": plain}})
    return {"version": 1, "trust_domain": TD,
            "jwt_providers": {"corp": {"issuer": "https://idp.example", "audiences": ["db"],
                                       "algorithms": ["ES256"], "jwks_file": "keys.json"}},
            "api_keys": [{"name": "k", "sha256": "a" * 64}],
            "services": {DB: {"rules": rules}}}


def _tcp_live(tmp: Path) -> Live:
    port = free_port()
    (tmp / "keys.json").write_text('{"keys": []}')
    return Live(tmp, DB, _stream_policy(port), "tcp", port=port)


tcp_live = module_fixture("explain-tcp", _tcp_live)


def _stream_let_in(live: Live, caller: str) -> bool:
    with live.ctx(caller).wrap_socket(socket.create_connection(("127.0.0.1", live.port),
                                                               timeout=5)) as s:
        try:
            s.sendall(b"ping")
            return s.recv(16) == b"ping"
        except (OSError, ssl.SSLError):
            return False


def test_explain_tcp_decides_a_stream_as_the_tcp_listener(tcp_live: Live) -> None:
    """Every member: ``explain --tcp`` lets the stream in exactly when the sidecar's TCP
    listener does, and says which rule decided; the same caller's HTTP explanation differs
    for the members a stream is decided otherwise for (why ``--tcp`` is needed)."""
    members = _stream_members(tcp_live.port)
    base = ["policy", "explain", tcp_live.policy, "--to", DB, "--port", str(tcp_live.port)]
    jobs = [[*base, "--from", caller, "--tcp", "-o", "json"] for _, caller, _, _ in members]
    http_jobs = [[*base, "--from", caller, "--host", "db.internal", "--path", "/x"]
                 for _, caller, _, _ in members]
    results = sidecar_cli_many(jobs + http_jobs)
    wrong = []
    differs = 0
    for i, (name, caller, _, want) in enumerate(members):
        r, h = results[i], results[len(members) + i]
        live = _stream_let_in(tcp_live, caller)
        doc = json.loads(r.stdout)
        said = r.returncode == 0 and doc["allowed"] is True and doc["protocol"] == "tcp"
        if said != live or live != want:
            wrong.append(f"{name}: explain --tcp {said}, sidecar {live}, expected {want}")
        differs += (h.returncode == 0) != live
    assert not wrong, "\n".join(wrong)
    assert differs >= len(LAYER7), differs
    # The table names the stream and the rule.
    r = sidecar_cli(*base, "--from", spiffe("deny-paths"), "--tcp")
    assert r.returncode == 1 and "stream: tcp" in r.stdout, r.stdout + r.stderr
    assert "left out: the stream could carry any request" in r.stdout, r.stdout


@pytest.mark.parametrize("flag", [("--path", "/x"), ("--method", "GET"), ("--host", "h"),
                                  ("--claims", "{}"), ("--provider", "corp"),
                                  ("--token-invalid", "corp"), ("--apikey", "k")])
def test_explain_tcp_refuses_what_a_stream_has_not(tcp_live: Live, flag: tuple[str, str]) -> None:
    r = sidecar_cli("policy", "explain", tcp_live.policy, "--to", DB, "--from", spiffe("plain"),
                    "--port", "1", "--tcp", *flag)
    assert r.returncode == 2 and f"{flag[0]} does not apply with --tcp" in r.stderr, r.stderr


# --- 10: split keeps every file a provider names -------------------------------------------------


def _leaves(value: Any, inner: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[tuple[str, ...], Any] = {}
        for f in dataclasses.fields(value):
            out.update(_leaves(getattr(value, f.name), (*inner, f.name)))
        return out
    return {inner: value}


def _relative_maximal_policy() -> dict[str, Any]:
    """The policy holding every key (``test_config_null_values``), every file a provider
    names relative -- and each at another place relative to its file."""
    doc = maximal_policy()
    p = doc["jwt_providers"]
    p["files"]["jwks_file"] = "keys/corp.json"
    p["uri"]["jwks_ca"] = "../shared/uri-ca.pem"
    p["intro"]["introspection"]["ca"] = "certs/intro-ca.pem"
    p["intro"]["introspection"]["client_secret_file"] = "./secret.txt"
    p["intro-mtls"]["introspection"]["ca"] = "../shared/./mtls-ca.pem"
    return doc


def _path_keys() -> set[tuple[str, tuple[str, ...]]]:
    """Every value of a provider that changes when the same text is read from another
    directory (asked of the loader, not listed here): the paths relative to the file."""
    text = _dump(_relative_maximal_policy())
    here = load_policy(text, "/etc/policy/mesh.yaml").extras.jwt_providers
    there = load_policy(text, "/srv/other/dir/mesh.yaml").extras.jwt_providers
    return {("jwt_providers", key) for name in here
            for key, value in _leaves(here[name]).items() if value != _leaves(there[name])[key]}


PATH_KEYS = sorted(_path_keys())


def test_the_path_keys_are_those_the_loader_resolves() -> None:
    """``split`` rewrites the keys of ``cli.NAMED_FILE_KEYS``: exactly the loader's."""
    from sidecar.policy.cli import NAMED_FILE_KEYS

    assert set(PATH_KEYS) == set(NAMED_FILE_KEYS)
    assert len(PATH_KEYS) == 4


def _files(root: Path, doc: dict[str, Any]) -> None:
    for spec in doc["jwt_providers"].values():
        for path in (spec.get("jwks_file"), spec.get("jwks_ca"),
                     *(spec.get("introspection", {}).get(k) for k in ("ca",
                                                                     "client_secret_file"))):
            if path and not os.path.isabs(path):
                target = root / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("{}")


# Where the set goes, relative to the source file's directory.
OUTS = {"sibling": "../out", "inside": "sub/deeper", "elsewhere": "../a/b/c",
        "apart": None}


@pytest.mark.parametrize("where", sorted(OUTS))
def test_split_keeps_every_file_a_provider_names(tmp_path: Path, where: str) -> None:
    """Split the policy holding every key into each place: ``ok``, ``policy check`` of the
    set finds every file, and every provider loads from the set as from the source, its
    files resolved to the same paths (and the rest of the mesh-wide parts the same)."""
    src = tmp_path / "src"
    src.mkdir()
    doc = _relative_maximal_policy()
    _files(src, doc)
    source = src / "mesh.yaml"
    source.write_text(_dump(doc))
    rel = OUTS[where]
    out = str(tmp_path / "abs" / "out") if rel is None else f"{src}/{rel}"  # (as typed)
    split, check = sidecar_cli_many([["policy", "split", str(source), "--out", out],
                                     ["policy", "check", out]])
    assert split.returncode == 0 and split.stdout.startswith("ok:"), split.stdout + split.stderr
    before = load_policy_set([str(source)])
    after = load_policy_set([out])
    wrong = [f"{name}.{'.'.join(inner)}: {_leaves(after.extras.jwt_providers[name])[inner]} "
             f"!= {_leaves(spec)[inner]}"
             for name, spec in before.extras.jwt_providers.items()
             for _, inner in PATH_KEYS
             if _leaves(after.extras.jwt_providers[name]).get(inner)
             != _leaves(spec).get(inner)]
    assert not wrong, "\n".join(wrong)
    assert after.extras == before.extras
    assert check.returncode == 0, check.stdout + check.stderr


def test_split_of_the_finding(tmp_path: Path) -> None:
    """The finding's policy through the real process: the introspection CA and secret
    beside the source stay found from the set."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ca.pem").write_text("x")
    (src / "secret.txt").write_text("s")
    (src / "pol.yaml").write_text(_dump({
        "version": 1, "trust_domain": TD,
        "jwt_providers": {"opaque": {"issuer": "https://idp.example.com", "audiences": ["o"],
                                     "introspection": {
                                         "endpoint": "https://idp.example.com/introspect",
                                         "ca": "ca.pem", "client_id": "orders",
                                         "client_secret_file": "secret.txt"}}},
        "services": {spiffe("app"): {"rules": [
            {"name": "u", "allow": {"jwt": {"provider": "opaque"}}}]}}}))
    out = tmp_path / "out"
    r = sidecar_cli("policy", "split", str(src / "pol.yaml"), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    r = sidecar_cli("policy", "check", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    [provider] = load_policy_set([str(out)]).extras.jwt_providers.values()
    assert provider.introspection is not None
    assert provider.introspection.ca == str(src / "ca.pem")
    assert provider.introspection.client_secret_file == str(src / "secret.txt")
