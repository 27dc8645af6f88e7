"""A null, ``~``, an empty value, ``[]`` and ``{}`` at every key of the config and of the
policy (found by a hostile review).

An explicit null used to mean "absent" at some keys, silently -- ``audit: ~`` turned the
audit trail off, ``policy: ~`` fell back to ``inbound.allow_from`` (and the outbound list as
egress), ``path_case:`` made deny rules case-sensitive, ``ship: {mode: ~}`` meant fail_open,
``allow:`` allowed everything -- and ``limits: []``, ``admin: 0``, ``headers: false`` took the
defaults; ``admin: {listen: 0}`` (or ``[]``, ``false``) switched the admin server off, and
``required_claims: []`` let a token without ``exp`` live for ever. Now a null is refused at
every key and list item while the file is read (``source.NULL_PROBLEM``, file:line:key), and
``[]`` or ``{}`` is either refused or means exactly what leaving the key out means (or a
documented, never looser, value: ``EXPLICIT``).

The family is data: the keys are not listed here but walked in two maximal documents (every
key the loaders know, ``test_the_maximal_documents_hold_every_key`` proves it by asking the
loaders which keys they know), and every key path -- nested keys, list items, map values --
gets every spelling. In process through the loaders and through the ``sidecar check`` and
``sidecar run --check`` commands, in real subprocesses for each spelling, and as a live
reload of a running sidecar (the policy in force stays, ``/policy`` names the key).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import main as sidecar_main
from sidecar.config.model import Limits, load_config
from sidecar.config.source import NULL_PROBLEM, format_path
from sidecar.errors import ConfigError, Problem
from sidecar.policy.loader import load_policy
from tests.harness import (
    Pki,
    http,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)

ORDERS = spiffe("orders")
JWKS = str(Path(__file__).resolve().parent.parent / "policies" / "jwks" / "corp.json")
SENTINEL = "__SENTINEL_VALUE__"
TS = "2030-01-31T18:00:00Z"

# Every way to write "no value" (refused at the key, with file:line:key) ...
NULLS = {"~": "~", "null": "null", "Null": "Null", "NULL": "NULL", "empty": "",
         "!!null": "!!null ''"}
# ... and the empty collections (refused, or the same as leaving the key out).
EMPTIES = {"[]": "[]", "{}": "{}"}
SPELLINGS = {**NULLS, **EMPTIES}

# Empty collections that load to something else than leaving the key out, each never looser.
EXPLICIT = {
    "inbound.allow_from": "[]: nobody is allowed in, as without allow_from",
    "services": "{}: no section for this sidecar, every request denied",
    f"services.{ORDERS}": "{}: a section without rules or egress denies everything",
    f"services.{ORDERS}.egress": "[]: the workload may call nobody, as without egress",
    f"services.{ORDERS}.rules[0].allow": "{}: a rule without conditions (documented; lint warns)",
    f"services.{ORDERS}.rules[1].deny": "{}: a deny rule without conditions denies everything",
    f"services.{ORDERS}.rules[2].allow": "{}: a rule without conditions (documented; lint warns)",
}


def maximal_config() -> dict[str, Any]:
    """A config holding every key (values valid for the loader; files are not opened)."""
    limits = {f.name: (f.default if f.default is not None else 360)
              for f in dataclasses.fields(Limits)}
    return {
        "identity": {"cert": "svid/tls.crt", "key": "svid/tls.key", "bundle": "svid/ca.crt",
                     "watch_interval": "2s",
                     "trust_domains": {"partner.example": {"bundle": "partner.pem"}}},
        "inbound": {"listen": "127.0.0.1:15443", "app": "127.0.0.1:8080", "protocol": "http",
                    "app_source_address": "127.0.0.6"},
        "outbound": [{"name": "pay", "listen": "127.0.0.1:15001",
                      "upstream": "127.0.0.1:16443", "identity": spiffe("payments"),
                      "protocol": "http"}],
        "policy": {"path": "mesh.yaml", "watch_interval": "2s"},
        "audit": {"path": "audit", "max_segment_bytes": "64MiB", "max_segments": 10,
                  "queue_size": 100, "batch_size": 10, "batch_linger_seconds": 0.05,
                  "on_failure": "fail_closed",
                  "fsync": True, "hmac_key_file": "keys/hmac", "signing_key_file": "keys/sign",
                  "checkpoint_every_records": 100, "checkpoint_every_seconds": 1.0,
                  "encryption_key_file": "keys/enc",
                  "ship": {"address": "127.0.0.1:6514", "ca_file": "ship/ca.pem",
                           "server_name": "siem", "cert_file": "ship/c.pem",
                           "key_file": "ship/k.pem", "queue_size": 100, "queue_bytes": "1MiB",
                           "mode": "required",
                           "app_name": "sidecar", "max_message_bytes": "4KiB"}},
        "admin": {"listen": "127.0.0.1:15000", "health_listen": "127.0.0.1:15021",
                  "max_connections_per_source": 32},
        "limits": limits,
        "workers": 1,
        "log": {"level": "info"},
        "headers": {"allow_underscores": False, "pass_through": ["x-forwarded-host"],
                    "pass_through_parameters": ["sudo", "doas"]},
    }


def maximal_configs() -> list[dict[str, Any]]:
    """The maximal config, it with ``policy`` as a list (the other shape of the key), and it
    without a policy but with ``inbound.allow_from`` (refused beside a policy)."""
    listed = maximal_config()
    listed["policy"] = ["mesh.yaml", "ns"]
    unpoliced = maximal_config()
    del unpoliced["policy"]
    unpoliced["inbound"]["allow_from"] = [spiffe("frontend")]
    return [maximal_config(), listed, unpoliced]


def maximal_policy() -> dict[str, Any]:
    """A policy holding every key, with one section (the running sidecar's own: a running
    sidecar validates only its own section and the mesh-wide parts)."""
    return {
        "version": 1, "revision": "r1", "trust_domain": "demo.local", "mode": "enforce",
        "jwt_providers": {
            "files": {"issuer": "https://idp.example", "audiences": ["orders"],
                      "algorithms": ["ES256"], "jwks_file": JWKS, "clock_skew": "30s",
                      "required_claims": ["exp"], "max_lifetime": "1h",
                      "from_headers": ["authorization", {"name": "x-token", "prefix": "T "}],
                      "from_params": ["token"], "from_cookies": ["tok"],
                      "forward_claims": {"sub": "x-sub"}, "forward_token": True,
                      "max_token_bytes": 8192, "typ": "at+jwt", "cert_binding": "if_present",
                      "forward_query_token": False},
            "uri": {"issuer": "https://127.0.0.1:9/idp2", "algorithms": ["ES256"],
                    "jwks_uri": "https://127.0.0.1:9/idp2/keys", "jwks_ca": "ca.pem",
                    "jwks_refresh": "5m", "jwks_min_refetch": "30s", "jwks_max_stale": "1h"},
            "disco": {"issuer": "https://127.0.0.1:9/idp3", "algorithms": ["ES256"],
                      "discovery": True},
            "intro": {"issuer": "https://127.0.0.1:9/idp4", "introspection": {
                "endpoint": "https://127.0.0.1:9/idp4/i", "ca": "ca.pem", "client_id": "c",
                "client_secret_file": "secret", "cache_ttl": "1m", "negative_ttl": "10s",
                "timeout": "2s", "max_concurrent": 4, "max_concurrent_per_caller": 2}},
            "intro-mtls": {"issuer": "https://127.0.0.1:9/idp5", "introspection": {
                "endpoint": "https://127.0.0.1:9/idp5/i", "client_id": "c", "mtls": True}},
        },
        "revocations": [{"jti": "j1", "sub": "s1", "until": TS, "note": "leaked"}],
        "api_keys": [{"name": "k1", "sha256": "a" * 64, "expires_at": TS}],
        "rate_limits": [{"name": "rl", "rate": "100/s", "burst": 10, "per": "peer",
                         "services": [ORDERS]}],
        "alerts": [{"name": "al", "threshold": 10, "window": "1m", "by": "peer",
                    "block": "5m", "webhook": "https://127.0.0.1:9/hook"}],
        "services": {ORDERS: {
            "mode": "enforce", "audience": "https://orders.example", "non_ascii_paths": "refuse",
            "path_case": "insensitive", "invalid_tokens": "refuse", "format_suffixes": "keep",
            "rules": [
                {"name": "reads", "description": "frontend reads", "mode": "enforce",
                 "expires_at": TS,
                 "allow": {"from": [spiffe("frontend")], "namespaces": ["demo"],
                           "methods": ["GET"], "paths": ["/orders/*"], "ports": [15443],
                           "listeners": ["inbound"], "hosts": ["orders.example"],
                           "jwt": {"provider": "files", "claims": {
                               "role": "admin", "tier": {"equals": "gold"},
                               "grp": {"one_of": ["a", "b"]},
                               "scope": {"contains": "orders:read"}}}}},
                {"name": "no-admin", "deny": {
                    "from": [spiffe("intruder")], "namespaces": ["other"],
                    "methods": ["DELETE"], "paths": ["/admin/**"], "ports": [15443],
                    "listeners": ["inbound"], "hosts": ["admin.example"],
                    "jwt": {"provider": "files", "claims": {"role": "guest"}},
                    "apikey": ["k1"]}},
                {"name": "any-key", "allow": {"apikey": True}},
            ],
            "egress": [spiffe("payments")]}},
    }


def key_paths(doc: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every key path of ``doc``: each mapping key, each list item, nested."""
    items = (doc.items() if isinstance(doc, dict)
             else enumerate(doc) if isinstance(doc, list) else ())
    for k, v in items:
        yield path + (k,)
        yield from key_paths(v, path + (k,))


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_DUMPER, sort_keys=False, default_flow_style=False, width=1000)


def _replaced(doc: Any, path: tuple, value: Any) -> Any:
    out = copy.deepcopy(doc)
    parent = out
    for part in path[:-1]:
        parent = parent[part]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


_DELETE = object()


def spelled(doc: Any, path: tuple, spelling: str) -> tuple[str, int]:
    """``doc`` as block YAML with the value at ``path`` written as ``spelling``; and the
    line it is on."""
    text = _dump(_replaced(doc, path, SENTINEL))
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if SENTINEL in ln)
    return text.replace(SENTINEL, spelling), line


def _plain(value: Any) -> Any:
    """A loaded value without what names where it came from (lines, keys, files)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in {"line", "key", "index", "file", "source", "raw"}}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(map(repr, value))
    return value


def _load_config(text: str, name: str) -> Any:
    return _plain(load_config(text, name))


def _load_policy(text: str, name: str, only: str | None = None) -> Any:
    p = load_policy(text, name, only=only)
    return _plain({"trust_domain": p.trust_domain, "mode": p.mode, "extras": p.extras,
                   "services": dict(p.services)})


def _refusal(problems: list[Problem], name: str, path: tuple, line: int,
             null: bool) -> Problem | None:
    """The problem naming ``path`` (or, for an empty collection, a key under it) at ``line``."""
    key = format_path(path)
    for p in problems:
        if p.file != name or p.line != line:
            continue
        if null and p.key == key and p.message == NULL_PROBLEM:
            return p
        if not null and (p.key == key or p.key.startswith((key + ".", key + "["))):
            return p
    return None


def _check_family(docs: list[Any], load: Any, name: str) -> list[str]:
    """Every key path of every doc in every spelling through ``load``; what went wrong."""
    failures: list[str] = []
    for doc in docs:
        for path in key_paths(doc):
            key = format_path(path)
            # The document is dumped once per path (``spelled`` with the sentinel itself),
            # and loaded without the key at most once (``left_out``): every spelling of the
            # path is that text with the sentinel replaced.
            marked, line = spelled(doc, path, SENTINEL)
            without_key: list[tuple[bool, Any]] = []

            def left_out(doc: Any = doc, path: tuple = path,
                         memo: list = without_key) -> tuple[bool, Any]:
                """(loads, what it loads to or None): the doc without the key at ``path``."""
                if not memo:
                    try:
                        memo.append((True, load(_dump(_replaced(doc, path, _DELETE)), name)))
                    except ConfigError:
                        memo.append((False, None))
                return memo[0]

            for label, spelling in SPELLINGS.items():
                text = marked.replace(SENTINEL, spelling)
                try:
                    got = load(text, name)
                except ConfigError as exc:
                    if _refusal(exc.problems, name, path, line, label in NULLS) is None and (
                            label in NULLS or left_out()[0]):
                        # (An empty collection refused elsewhere -- `api_keys: []` and a
                        # rule naming a key -- is refused as leaving the key out is.)
                        failures.append(f"{key} = {label}: refused, but not at {name}:{line}: "
                                        f"{key}: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001 -- a crash is the finding
                    failures.append(f"{key} = {label}: {type(exc).__name__}: {exc}")
                    continue
                if label in NULLS:
                    failures.append(f"{key} = {label}: accepted")
                    continue
                without = left_out()[1]
                if got != without and key not in EXPLICIT:
                    failures.append(f"{key} = {label}: accepted, and not as if left out")
    return failures


def test_every_config_key_refuses_a_null_and_an_empty_collection_means_the_default():
    failures = _check_family(maximal_configs(), _load_config, "/etc/sidecar/config.yaml")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("only", [None, ORDERS], ids=["policy check", "running sidecar"])
def test_every_policy_key_refuses_a_null_and_an_empty_collection_means_the_default(only):
    def load(text: str, name: str) -> Any:
        return _load_policy(text, name, only)

    failures = _check_family([maximal_policy()], load, "/etc/policy/mesh.yaml")
    assert not failures, "\n".join(failures)


def _schema_keys(doc: Any, load: Any, name: str) -> dict[str, tuple[set[str], set[str]]]:
    """Mapping position -> (keys the loader knows there, keys the doc holds there): an
    unknown key at each mapping makes the loader list the keys it knows. The values of an
    open mapping (one whose keys the file chooses: services, providers, claims) and the
    items of a list share one position."""
    known_at: dict[tuple, set[str]] = {}
    for path in [(), *key_paths(doc)]:
        node = doc
        for part in path:
            node = node[part]
        if not isinstance(node, dict):
            continue
        try:
            load(_dump(_replaced(doc, path + ("zz_unknown",), 1)), name)
            continue
        except ConfigError as exc:
            said = [p.message for p in exc.problems
                    if p.key == format_path(path + ("zz_unknown",))
                    and p.message.startswith("unknown key (expected one of: ")]
        if said:
            known_at[path] = set(
                said[0].removeprefix("unknown key (expected one of: ")[:-1].split(", "))
    out: dict[str, tuple[set[str], set[str]]] = {}
    for path, known in known_at.items():
        where = tuple("*" if isinstance(part, int) or (path[:i] not in known_at and i)
                      else part for i, part in enumerate(path))
        node = doc
        for part in path:
            node = node[part]
        out.setdefault(format_path(where), (known, set()))[1].update(node)
    return out


def test_the_maximal_documents_hold_every_key():
    """The family above covers every key because the maximal documents hold every key the
    loaders know, at every mapping (asked of the loaders, not listed here)."""
    positions: dict[str, tuple[set[str], set[str]]] = {}
    for doc in maximal_configs():  # (the keys the documents hold together)
        for k, (known, held) in _schema_keys(doc, _load_config, "c.yaml").items():
            positions.setdefault(f"config {k}", (known, set()))[1].update(held)
    positions.update({f"policy {k}": v for k, v in
                      _schema_keys(maximal_policy(), _load_policy, "p.yaml").items()})
    # The mappings whose keys the loaders check (and whose values are open: services,
    # providers, claims, trust domains are names the file chooses).
    assert len(positions) >= 20, sorted(positions)
    missing = {where: sorted(known - held) for where, (known, held) in positions.items()
               if known - held}
    assert not missing, missing


# --- the commands and a running sidecar ---------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    """``sidecar ARGS`` in this process (the same code as the command): exit code, output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sidecar_main(list(args))
    return code, out.getvalue() + err.getvalue()


def _real_config(tmp_path: Path, pki: Pki, policy: str) -> dict[str, Any]:
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": "127.0.0.1:0", "app": "127.0.0.1:9"})
    cfg["policy"] = {"path": policy, "watch_interval": "100ms"}
    return cfg


def _rotated(doc: Any) -> Iterator[tuple[tuple, str, str]]:
    """Every key path of ``doc`` with one null spelling each, in turn (every spelling used)."""
    labels = list(NULLS)
    for i, path in enumerate(key_paths(doc)):
        label = labels[i % len(labels)]
        yield path, label, NULLS[label]


def _expect_named(code: int, out: str, where: str, key: str, what: str) -> None:
    assert "Traceback" not in out, (what, out)
    assert code != 0, (what, out)
    assert f"{where} {key}: no value" in out, (what, out)


def _every_key_through_the_commands(doc: Any, target: Path, cfg: Path) -> None:
    """``doc`` written to ``target`` with a null at each key in turn; ``check`` and ``run
    --check`` of ``cfg`` (in turn) name file, line and key."""
    for n, (path, label, spelling) in enumerate(_rotated(doc)):
        text, line = spelled(doc, path, spelling)
        target.write_text(text)
        command = (["check", "-c", str(cfg), "--offline", "--no-ports"] if n % 2
                   else ["run", "-c", str(cfg), "--check"])
        code, out = _cli(*command)
        _expect_named(code, out, f"{target}:{line}:", format_path(path),
                      f"{command[0]} {format_path(path)} = {label}")


def test_sidecar_check_and_run_check_name_a_null_at_every_config_key(tmp_path, pki):
    good = write_policy(tmp_path / "mesh.yaml", {
        "version": 1, "trust_domain": "demo.local",
        "services": {ORDERS: {"rules": [{"name": "any", "allow": {}}]}}})
    base = _real_config(tmp_path, pki, good)
    base["limits"] = {"idle_timeout": "30s"}
    base["headers"] = {"pass_through": ["x-forwarded-host"]}
    base["audit"] = {"path": str(tmp_path / "audit"),
                     "ship": {"address": "127.0.0.1:6514", "ca_file": str(tmp_path / "ca.pem")}}
    cfg = tmp_path / "config.yaml"
    _every_key_through_the_commands(base, cfg, cfg)


def test_sidecar_check_and_run_check_name_a_null_at_every_policy_key(tmp_path, pki):
    policy = tmp_path / "mesh.yaml"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(_dump(_real_config(tmp_path, pki, str(policy))))
    _every_key_through_the_commands(maximal_policy(), policy, cfg)


@pytest.mark.parametrize("label", ["~", "empty", "!!null"])
def test_the_real_commands_name_a_null_key(tmp_path, pki, label):
    """The same through real processes (three spellings; every spelling above): ``audit``
    (it switched the trail off) in the config, ``path_case`` (case-sensitive deny rules) in
    the policy."""
    policy_doc = maximal_policy()
    text, pline = spelled(policy_doc, ("services", ORDERS, "path_case"), NULLS[label])
    policy = tmp_path / "mesh.yaml"
    policy.write_text(text)
    base = _real_config(tmp_path, pki, str(policy))
    cfg = tmp_path / "config.yaml"
    ctext, cline = spelled(dict(base, audit={"path": "x"}), ("audit",), NULLS[label])
    cfg.write_text(ctext)
    for args in (["run", "-c", str(cfg), "--check"], ["check", "-c", str(cfg)]):
        r = sidecar_cli(*args, timeout=60)
        _expect_named(r.returncode, r.stdout + r.stderr, f"{cfg}:{cline}:", "audit",
                      " ".join(args))
    cfg.write_text(_dump(base))
    for args in (["run", "-c", str(cfg), "--check"], ["check", "-c", str(cfg), "--offline"],
                 ["policy", "check", str(policy)]):
        r = sidecar_cli(*args, timeout=60)
        _expect_named(r.returncode, r.stdout + r.stderr, f"{policy}:{pline}:",
                      f"services.{ORDERS}.path_case", " ".join(args))


def _disjoint_groups(paths: list[tuple], size: int) -> list[list[tuple]]:
    """``paths`` in groups of at most ``size`` in which no path is inside another (so that
    all of a group's nulls can be written into one file)."""
    groups: list[list[tuple]] = []
    for path in paths:
        for group in groups:
            if len(group) < size and not any(
                    p[:len(path)] == path or path[:len(p)] == p for p in group):
                group.append(path)
                break
        else:
            groups.append([path])
    return groups


def test_a_reload_to_a_null_at_any_policy_key_keeps_the_policy_in_force(tmp_path, pki, procs):
    """A running sidecar: each reload writes nulls (every spelling, in turn) at many keys at
    once; each is refused, named in ``/policy`` with file:line:key, and the policy in force
    stays; then the good file is taken again."""
    policy = tmp_path / "mesh.yaml"
    doc = maximal_policy()
    good = _dump(doc)
    policy.write_text(good)
    b = start_sidecar(tmp_path, "orders", _real_config(tmp_path, pki, str(policy)))
    procs.append(b)
    status = http(b.port("admin"), "GET", "/policy").json()
    assert status["last_reload_error"] is None, status
    before = status["version"]
    labels = list(NULLS)
    groups = _disjoint_groups(list(key_paths(doc)), 40)
    for n, group in enumerate(groups, start=1):
        marked = doc
        for i, path in enumerate(group):
            marked = _replaced(marked, path, f"{SENTINEL}{i}_")
        text = _dump(marked)
        lines = {i: next(j for j, ln in enumerate(text.splitlines(), 1)
                         if f"{SENTINEL}{i}_" in ln) for i in range(len(group))}
        for i in range(len(group)):
            text = text.replace(f"{SENTINEL}{i}_", NULLS[labels[(n + i) % len(labels)]])
        policy.write_text(text)
        wait_for(lambda n=n: b.metric("sidecar_policy_reloads_total", result="failed") >= n,
                 timeout=10)
        status = http(b.port("admin"), "GET", "/policy").json()
        assert status["version"] == before
        err = status["last_reload_error"]
        for i, path in enumerate(group):
            assert f"{policy}:{lines[i]}: {format_path(path)}: no value" in err, (path, err)
    policy.write_text(good.replace("revision: r1", "revision: r2"))
    wait_for(lambda: http(b.port("admin"), "GET", "/policy").json()["version"] != before,
             timeout=10)
    assert http(b.port("admin"), "GET", "/policy").json()["last_reload_error"] is None


# --- the values that used to be swallowed -------------------------------------------------


# Config values that used to load as the default (or switch a server off), as data:
# (path, value) -- each is now refused at that key.
SWALLOWED = [
    (("limits",), []), (("limits",), ""), (("limits",), 0), (("limits",), False),
    (("admin",), []), (("admin",), 0), (("admin",), ""), (("log",), []), (("log",), False),
    (("headers",), []), (("headers",), 0), (("identity",), []),
    (("admin", "listen"), 0), (("admin", "listen"), False), (("admin", "listen"), []),
    (("admin", "listen"), {}), (("admin", "health_listen"), 0),
    (("admin", "health_listen"), False), (("admin", "health_listen"), []),
]


@pytest.mark.parametrize("path,value", SWALLOWED, ids=[f"{format_path(p)}={v!r}"
                                                       for p, v in SWALLOWED])
def test_falsy_values_are_not_the_default(path, value):
    doc = _replaced(maximal_config(), path, value)
    with pytest.raises(ConfigError) as err:
        load_config(_dump(doc), "/etc/c.yaml")
    assert any(p.key.startswith(format_path(path)) for p in err.value.problems), str(err.value)


def test_admin_off_is_an_empty_string():
    """``admin.listen: ""`` (quoted) is the one way to turn the admin server off."""
    doc = _replaced(maximal_config(), ("admin", "listen"), "")
    assert load_config(_dump(doc), "/etc/c.yaml").admin.listen is None
    doc = _replaced(maximal_config(), ("admin", "health_listen"), "")
    assert load_config(_dump(doc), "/etc/c.yaml").admin.health_listen is None


def test_required_claims_cannot_be_emptied():
    doc = _replaced(maximal_policy(), ("jwt_providers", "files", "required_claims"), [])
    with pytest.raises(ConfigError, match=r"jwt_providers\.files\.required_claims: an empty "
                                          r"list would drop the default \[exp\]"):
        load_policy(_dump(doc), "/etc/p.yaml")


def test_a_null_list_item_is_named_with_its_line():
    text = "version: 1\ntrust_domain: demo.local\nservices:\n  " + ORDERS + ":\n" \
        "    egress:\n      - " + spiffe("payments") + "\n      -\n      - ~\n"
    with pytest.raises(ConfigError) as err:
        load_policy(text, "/etc/p.yaml")
    got = {(p.line, p.key) for p in err.value.problems if p.message == NULL_PROBLEM}
    assert got == {(7, f"services.{ORDERS}.egress[1]"), (8, f"services.{ORDERS}.egress[2]")}, \
        str(err.value)


# --- size bounds ----------------------------------------------------------------------------


def test_huge_files_are_refused_with_the_bound_named(tmp_path):
    """A config or policy file over 8 MiB, and a policy set over 64 MiB in all (nine files
    of 7.5 MiB: each within its own bound), are refused naming the bound -- the set before
    the rest of it is read."""
    from sidecar.config.model import load_config_file
    from sidecar.policy.loader import MAX_POLICY_SET_BYTES, load_policy_set

    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (9 * 2**20) + b"\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: file is too large \(more than 8 MiB\)"):
        load_config_file(str(big))
    with pytest.raises(ConfigError, match=r"file is too large \(more than 8 MiB\)"):
        load_policy_set([str(big)])
    d = tmp_path / "set"
    d.mkdir()
    chunk = b"# " + b"x" * (7 * 2**20 + 2**19) + b"\n"
    for n in range(MAX_POLICY_SET_BYTES // len(chunk) + 1):
        (d / f"p{n}.yaml").write_bytes(chunk)
    with pytest.raises(ConfigError, match=r"the policy files hold more than 64 MiB in all"):
        load_policy_set([str(d)])
    with pytest.raises(ConfigError, match=r"the policy files hold more than 64 MiB in all"):
        load_policy_set([str(d / f"p{n}.yaml") for n in range(9)])
    r = sidecar_cli("policy", "check", str(d), timeout=60)
    assert r.returncode == 1 and "more than 64 MiB in all" in r.stdout + r.stderr, r
    assert "Traceback" not in r.stdout + r.stderr


def test_a_section_of_more_than_10000_rules_is_refused():
    """100,000 rules in one section (6.5 MB, within the file bound) took 13 s and 490 MiB to
    load in the sidecar; at most 10,000 are taken (10,001 refused, named)."""
    from sidecar.policy.loader import MAX_RULES_PER_SECTION

    head = f"version: 1\ntrust_domain: demo.local\nservices:\n  {ORDERS}:\n    rules:\n"
    rule = "    - {{name: r{0}, allow: {{paths: [/p{0}]}}}}\n"
    at_limit = head + "".join(rule.format(i) for i in range(MAX_RULES_PER_SECTION))
    assert len(load_policy(at_limit, "/etc/p.yaml", only=ORDERS).services[ORDERS].rules) \
        == MAX_RULES_PER_SECTION
    with pytest.raises(ConfigError, match=rf"/etc/p\.yaml:5: services\.{ORDERS}\.rules: more "
                                          r"than 10,000 rules in one section"):
        load_policy(at_limit + rule.format("x"), "/etc/p.yaml", only=ORDERS)
