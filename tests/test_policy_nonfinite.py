"""Non-finite numbers in a policy, and exceptions no check foresaw (found by a hostile review).

`rate: .inf` (also `1.0e+400`, a 400-digit "N/s") passed `rate > 0` and raised OverflowError
from the default burst: `policy check` printed a traceback, a sidecar started with it exited
(instead of starting and denying, docs/policy.md "Fail closed") and a reload error named no
file, line or key. Every number of a policy is now finite (``Reader.number``, durations and
claims as before), and no exception but ``ConfigError`` leaves a load.

``SPELLINGS`` x ``KEYS`` is the family as data: every numeric policy key with every
spelling of infinity and NaN is refused with file, line and key -- in process, by
``sidecar policy check`` on a policy set, at a sidecar's start (it starts and denies) and on
its reloads (the policy in force stays).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sidecar.errors import ConfigError
from sidecar.policy.loader import load_policy_set
from tests.harness import (
    Pki,
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    wait_port,
)

BIG = "1" + "0" * 400  # a float() of it is infinity
SPELLINGS = (".inf", "-.inf", "+.inf", ".Inf", ".INF", ".nan", ".NaN", "1.0e+400", "-1.0e+400",
             "1e400", "!!float .inf", "!!float -.inf", "!!float .nan", BIG, f'"{BIG}"',
             '"inf"', '"nan"', '"inf/s"', '"nan/s"', '"-inf/s"', f'"{BIG}/s"', f'"{BIG}/h"',
             '"1.0e400/s"', f'"{BIG}s"', '"Infinity"')
JWKS = "issuer: https://login.example.com/, algorithms: [ES256], jwks_file: jwks.json"
OPAQUE = ("issuer: https://idp.example.com, introspection: {endpoint: https://idp.example.com/"
          "introspect, client_id: orders, client_secret_file: secret")
HEADER = "version: 1\ntrust_domain: demo.local\n"
# In a template: @N@ the file's number (its own names, so that a policy set of all of them
# merges), @V@ the value, @S@ a section, @R@ the start of a section whose last rule follows.
# The section is @ID@'s (``k<N>``, or the running sidecar's own: a sidecar reads only its own
# section) and holds a deny rule for /admin/** and an allow-all rule.
RULES = "{name: no-admin, deny: {paths: [/admin/**]}}, {name: any, allow: {}}"
RULE = "services:\n  spiffe://demo.local/ns/demo/sa/@ID@: {rules: [" + RULES + ", "
SECTION = RULE[:-2] + "]}\n"
SID = r"services\.spiffe://demo\.local/ns/demo/sa/\w+\.rules\[2\]"
# Keys where a string is a value too (a claim): only the spellings YAML reads as numbers.
STRING_KEYS = frozenset({"claims equals", "claims one_of"})
NUMBERS = tuple(v for v in SPELLINGS if not isinstance(yaml.safe_load(v), str))
# key -> (file template, key path the refusal names).
KEYS: dict[str, tuple[str, str]] = {
    "rate_limits.rate": ("@S@rate_limits:\n  - {name: rl@N@, rate: @V@}\n",
                         r"rate_limits\[0\]\.rate"),
    "rate_limits.burst": ("@S@rate_limits:\n  - {name: rl@N@, rate: 10, burst: @V@}\n",
                          r"rate_limits\[0\]\.burst"),
    "alerts.threshold": ("@S@alerts:\n  - {name: al@N@, threshold: @V@, window: 1m}\n",
                         r"alerts\[0\]\.threshold"),
    "alerts.window": ("@S@alerts:\n  - {name: al@N@, threshold: 5, window: @V@}\n",
                      r"alerts\[0\]\.window"),
    "alerts.block": ("@S@alerts:\n  - {name: al@N@, threshold: 5, window: 1m, block: @V@}\n",
                     r"alerts\[0\]\.block"),
    **{f"jwt_providers.{key}": (f"@S@jwt_providers:\n  p@N@: {{{JWKS}, {key}: @V@}}\n",
                                rf"jwt_providers\.p\d+\.{key}")
       for key in ("jwks_refresh", "jwks_min_refetch", "clock_skew", "max_lifetime",
                   "max_token_bytes")},
    **{f"introspection.{key}": (f"@S@jwt_providers:\n  p@N@: {{{OPAQUE}, {key}: @V@}}}}\n",
                                rf"jwt_providers\.p\d+\.introspection\.{key}")
       for key in ("cache_ttl", "negative_ttl", "timeout", "max_concurrent",
                   "max_concurrent_per_caller")},
    "api_keys.expires_at": ("@S@api_keys:\n  - {name: key@N@, sha256: '@H@', expires_at: @V@}\n",
                            r"api_keys\[0\]\.expires_at"),
    "revocations.until": ("@S@revocations:\n  - {jti: j@N@, until: @V@}\n",
                          r"revocations\[0\]\.until"),
    "claims equals": (f"jwt_providers:\n  p@N@: {{{JWKS}}}\n@R@{{name: c, allow: {{jwt: "
                      "{provider: p@N@, claims: {level: @V@}}}}]}\n",
                      SID + r"\.allow\.jwt\.claims\.level"),
    "claims one_of": (f"jwt_providers:\n  p@N@: {{{JWKS}}}\n@R@{{name: c, allow: {{jwt: "
                      "{provider: p@N@, claims: {level: {one_of: [@V@]}}}}}]}\n",
                      SID + r"\.allow\.jwt\.claims\.level\.one_of(\[0\])?"),
    "ports": ("@R@{name: c, allow: {ports: [@V@]}}]}\n", SID + r"\.allow\.ports\[0\]"),
    "rule expires_at": ("@R@{name: c, allow: {}, expires_at: @V@}]}\n", SID + r"\.expires_at"),
}


def _member(key: str, n: int, value: str, ident: str = "") -> tuple[str, int, str]:
    """File number ``n`` of ``key`` holding ``value``, its section ``ident``'s (default
    ``k<n>``): (text, line of the value, key path)."""
    template, path = KEYS[key]
    text = (HEADER + template.replace("@S@", SECTION).replace("@R@", RULE)
            .replace("@ID@", ident or "k@N@").replace("@N@", str(n))
            .replace("@H@", f"{n:064x}"))
    line = text[:text.index("@V@")].count("\n") + 1
    return text.replace("@V@", value), line, path


GOOD_VALUES = {"api_keys.expires_at": "2030-01-01T00:00:00Z",
               "revocations.until": "2030-01-01T00:00:00Z",
               "rule expires_at": "2030-01-01T00:00:00Z", "alerts.window": "1m",
               "jwt_providers.max_token_bytes": "4096"}


def test_every_spelling_at_every_key_is_refused_with_file_line_and_key(tmp_path):
    """In process, the whole policy and a sidecar's own section (``only``): a ConfigError
    naming file, line and key, never another exception. Each template loads with a finite
    value (so a refusal is the value's). Failures are collected, so that one run names every
    member that slips through."""
    for n, key in enumerate(KEYS):
        path = tmp_path / f"good-{n}.yaml"
        path.write_text(_member(key, n, GOOD_VALUES.get(key, "5"))[0])
        load_policy_set([str(path)])
    wrong: list[str] = []
    for n, key in enumerate(KEYS):
        for i, value in enumerate(NUMBERS if key in STRING_KEYS else SPELLINGS):
            text, line, keypath = _member(key, n, value)
            path = tmp_path / f"p{n}-{i}.yaml"
            path.write_text(text)
            for only in (None, spiffe(f"k{n}")):
                try:
                    load_policy_set([str(path)], only=only)
                    wrong.append(f"{key} {value[:12]}: loaded")
                except ConfigError as exc:
                    if not re.search(re.escape(str(path)) + f":{line}: {keypath}: ", str(exc)):
                        wrong.append(f"{key} {value[:12]}: {str(exc)[:300]}")
                except Exception as exc:  # noqa: BLE001 -- the bug this test is for
                    wrong.append(f"{key} {value[:12]}: {type(exc).__name__}: {exc}")
    assert not wrong, "\n".join(wrong)


def test_policy_check_names_every_key_with_every_spelling(tmp_path):
    """``sidecar policy check DIR`` per spelling, one file per key: exit 1, every key named
    with its file and line, no traceback."""
    wrong: list[str] = []
    for i, value in enumerate(SPELLINGS):
        pset = tmp_path / f"set{i}"
        pset.mkdir()
        expected = []
        for n, key in enumerate(KEYS):
            if key in STRING_KEYS and value not in NUMBERS:
                continue
            text, line, keypath = _member(key, n, value)
            path = pset / f"ns-{n:02d}.yaml"
            path.write_text(text)
            expected.append(re.escape(str(path)) + f":{line}: {keypath}: ")
        r = sidecar_cli("policy", "check", str(pset), timeout=120)
        out = r.stdout + r.stderr
        if r.returncode != 1 or "Traceback" in out:
            wrong.append(f"{value[:16]}: exit {r.returncode}: {out[-500:]}")
        wrong.extend(f"{value[:16]}: not named: {e}" for e in expected if not re.search(e, out))
    assert not wrong, "\n".join(wrong)


def test_no_other_exception_leaves_a_load(tmp_path, monkeypatch):
    """An exception no check foresaw, raised while one file's values are read (here: planted
    in the alerts parser), is a ConfigError naming that file of the set."""
    import sidecar.policy.loader as loader

    def broken(*args, **kwargs):
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(loader, "parse_alerts", broken)
    (tmp_path / "a-mesh.yaml").write_text(_member("rate_limits.rate", 0, "5")[0])
    (tmp_path / "b-alerts.yaml").write_text(_member("alerts.window", 1, "1m")[0])
    for only in (None, spiffe("k1")):
        with pytest.raises(ConfigError) as err:
            load_policy_set([str(tmp_path)], only=only)
        assert str(err.value) == (f"{tmp_path / 'b-alerts.yaml'}: not loaded: unexpected "
                                  "OverflowError while reading it (cannot convert float "
                                  "infinity to integer); please report this as a bug")


GOOD = HEADER + SECTION.replace("@ID@", "orders")


def _start(tmp_path: Path, pki: Pki, app: int, policy: Path, *, wait: bool):
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"})
    cfg["policy"] = {"path": str(policy), "watch_interval": "100ms"}
    return start_sidecar(tmp_path, "orders", cfg, wait=wait)


def test_a_sidecar_started_with_an_infinite_rate_runs_and_denies(tmp_path, pki: Pki, app,
                                                                  procs):
    """Fail closed at start (it exited with a traceback): running, not ready, every request
    denied, the error names file, line and key; the fixed file is then taken."""
    policy = tmp_path / "mesh.yaml"
    text, line, _ = _member("rate_limits.rate", 0, ".inf", "orders")
    policy.write_text(text)
    b = _start(tmp_path, pki, app, policy, wait=False)
    procs.append(b)
    wait_port(b.port("admin"), proc=b.proc)
    wait_port(b.port("inbound"), proc=b.proc)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(b.port("inbound"), "GET", "/x", ctx=ctx).status == 403
    ready = http(b.port("admin"), "GET", "/readyz")
    assert ready.status == 503 and "policy_not_loaded" in ready.json()["reasons"]
    error = http(b.port("admin"), "GET", "/policy").json()["last_reload_error"]
    assert f"{policy}:{line}: rate_limits[0].rate: expected requests per second" in error, error
    assert "Traceback" not in b.output() and "OverflowError" not in b.output()
    policy.write_text(GOOD)
    wait_for(lambda: http(b.port("admin"), "GET", "/readyz").status == 200, timeout=10)
    assert http(b.port("inbound"), "GET", "/x", ctx=ctx).status == 200
    assert b.proc.poll() is None


def test_a_running_sidecar_keeps_its_policy_through_every_key(tmp_path, pki: Pki, app, procs):
    """The policy file rewritten with each key in turn, each with another spelling (all of
    them used), in the sidecar's own section where the key is a section's: every reload is
    refused naming file, line and key, and the policy in force -- its deny rule, its allow
    -- still answers."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(GOOD)
    b = _start(tmp_path, pki, app, policy, wait=True)
    procs.append(b)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    port = b.port("inbound")
    before = http(b.port("admin"), "GET", "/policy").json()["version"]
    assert http(port, "GET", "/admin/x", ctx=ctx).status == 403
    keys = list(KEYS)
    for i in range(max(len(KEYS), len(SPELLINGS))):
        key = keys[i % len(keys)]
        values = NUMBERS if key in STRING_KEYS else SPELLINGS
        value = values[i % len(values)]
        text, line, keypath = _member(key, i, value, "orders")
        replace_file(policy, text)
        wait_for(lambda i=i: b.metric("sidecar_policy_reloads_total", result="failed") >= i + 1,
                 timeout=30)
        status = http(b.port("admin"), "GET", "/policy").json()
        assert status["version"] == before, (key, value)
        assert re.search(re.escape(str(policy)) + f":{line}: {keypath}: ",
                         status["last_reload_error"]), (key, value, status["last_reload_error"])
        assert http(port, "GET", "/admin/x", ctx=ctx).status == 403, (key, value)
        assert http(port, "GET", "/x", ctx=ctx).status == 200, (key, value)
    assert b.proc.poll() is None


@pytest.mark.parametrize(("skew", "ok"), [("10m", True), ("600", True), ("601", False),
                                          ("11m", False), ("1.0e+99", False), ("24h", False)])
def test_clock_skew_is_bounded(tmp_path: Path, skew: str, ok: bool) -> None:
    """A finite but huge clock_skew (1.0e+99 was taken) kept every token alive past its exp."""
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    policy = tmp_path / "p.yaml"
    policy.write_text(HEADER + f"jwt_providers:\n  p: {{{JWKS}, clock_skew: {skew}}}\n"
                      "services: {}\n")
    if ok:
        load_policy_set([str(policy)])
        return
    with pytest.raises(ConfigError) as info:
        load_policy_set([str(policy)])
    assert "jwt_providers.p.clock_skew" in str(info.value) and "at most 10m" in str(info.value)
