"""The sidecar config loader: every problem at once, with file, line and key."""

from __future__ import annotations

import pytest

from sidecar.config.model import load_config, load_config_file, redacted
from sidecar.config.values import parse_address, parse_duration, parse_size
from sidecar.errors import ConfigError

GOOD = """\
identity:
  cert: certs/tls.crt
  key: certs/tls.key
  bundle: /abs/ca.crt
inbound:
  listen: 0.0.0.0:15443
  app: 127.0.0.1:8080
outbound:
  - name: orders
    listen: 127.0.0.1:15001
    upstream: "[::1]:15443"
    identity: spiffe://cluster.local/ns/shop/sa/orders
    protocol: tcp
policy: {path: mesh.yaml, watch_interval: 500ms}
limits: {handshake_timeout: 2s, max_header_bytes: 16KiB, max_connections: 10, drain_timeout: 1m}
workers: 2
log: {level: debug}
"""


def test_good_config_and_relative_paths(tmp_path):
    f = tmp_path / "sidecar.yaml"
    f.write_text(GOOD)
    cfg = load_config_file(str(f))
    assert cfg.identity.cert == str(tmp_path / "certs" / "tls.crt")
    assert cfg.identity.bundle == "/abs/ca.crt"
    assert cfg.inbound.listen == ("0.0.0.0", 15443) and cfg.inbound.protocol == "http"
    ob = cfg.outbound[0]
    assert ob.upstream == ("::1", 15443) and ob.protocol == "tcp"
    assert cfg.policy == str(tmp_path / "mesh.yaml") and cfg.policy_watch_interval == 0.5
    assert cfg.limits.handshake_timeout == 2.0 and cfg.limits.max_header_bytes == 16384
    assert cfg.limits.drain_timeout == 60.0 and cfg.limits.idle_timeout == 60.0  # default
    assert cfg.workers == 2 and cfg.log_level == "debug"
    assert "raw" not in redacted(cfg)


def test_every_problem_reported_at_once_with_line_and_key():
    text = """\
identity:
  cert: a.crt
  bundle: ca.crt
inbound:
  listen: 0.0.0.0
  app: 127.0.0.1:99999
  protocl: http
outbound:
  - listen: 127.0.0.1:15001
    upstream: x:1
    identity: https://not-spiffe
limits: {idle_timeout: soon, max_headers: 0}
surprise: 1
"""
    with pytest.raises(ConfigError) as err:
        load_config(text, "s.yaml")
    got = {(p.line, p.key) for p in err.value.problems}
    assert (1, "identity.key") in got or any(k == "identity.key" for _, k in got)
    assert (5, "inbound.listen") in got
    assert (6, "inbound.app") in got
    assert (7, "inbound.protocl") in got
    assert (11, "outbound[0].identity") in got
    assert (12, "limits.idle_timeout") in got and (12, "limits.max_headers") in got
    assert (13, "surprise") in got
    assert all(str(p).startswith("s.yaml:") for p in err.value.problems)


def test_needs_a_listener():
    with pytest.raises(ConfigError, match="at least one of"):
        load_config("identity: {cert: a, key: b, bundle: c}\n", "s.yaml")


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(ConfigError) as err:
        load_config("identity:\n  cert: [a\n", "s.yaml")
    assert err.value.problems[0].line is not None


@pytest.mark.parametrize("text,seconds", [(30, 30.0), ("250ms", 0.25), ("5m", 300.0),
                                          ("1h", 3600.0), ("2d", 172800.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


# 309 digits and more read as infinity (no bound at all), and ``\d`` took every Unicode
# digit (found by a hostile review: both loaded).
@pytest.mark.parametrize("bad", ["-1s", "soon", True, "nan", float("inf"), "9" * 309 + "s",
                                 "9" * 400, "1" * 400 + ".5h", "\u0663s", "\u0661\u0660m",
                                 "\uff15s", "\u09e7d"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["1" * 400, "9" * 21, str(2**50 + 1), 2**50 + 1, "2000000GiB",
                                 "\u0663KiB", "\uff11MiB", -1, "1.5KiB"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("value", [0, 1023, "9MiB", "1" * 400])
def test_max_header_bytes_out_of_bounds_names_the_line_and_key(value):
    text = GOOD.replace("max_header_bytes: 16KiB", f"max_header_bytes: {value}")
    with pytest.raises(ConfigError) as info:
        load_config(text, "side.yaml")
    assert "side.yaml:15: limits.max_header_bytes" in str(info.value)


def test_sizes_and_addresses():
    assert parse_size("64KiB") == 65536 and parse_size("1MB") == 1_000_000 and parse_size(7) == 7
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("::1:80", "host", "host:x", "host:70000", ""):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_allow_from_patterns_are_checked():
    base = "identity: {cert: a, key: b, bundle: c}\ninbound:\n  listen: :1\n  app: a:1\n"
    cfg = load_config(base.replace(":1\n  app", "127.0.0.1:1\n  app")
                      + "  allow_from: [spiffe://td/ns/*/sa/x]\n", "s.yaml")
    assert cfg.inbound.allow_from == ("spiffe://td/ns/*/sa/x",)
    with pytest.raises(ConfigError) as err:
        load_config(base.replace(":1\n  app", "127.0.0.1:1\n  app")
                    + "  allow_from: [spiffe://td/ns/a*/sa/x, 'http://x']\n", "s.yaml")
    assert {p.key for p in err.value.problems} == {"inbound.allow_from[0]",
                                                   "inbound.allow_from[1]"}


def test_connection_limits_per_source():
    base = ("identity: {cert: /a, key: /b, bundle: /c}\noutbound: []\n"
            "inbound: {listen: '127.0.0.1:1', app: '127.0.0.1:2'}\n")
    cfg = load_config(base, "s.yaml")
    assert cfg.limits.max_connections_per_source == 256
    assert cfg.admin.max_connections_per_source == 32
    cfg = load_config(base + "limits: {max_connections_per_source: 4}\n"
                             "admin: {max_connections_per_source: 2}\n", "s.yaml")
    assert cfg.limits.max_connections_per_source == 4
    assert cfg.admin.max_connections_per_source == 2
    assert cfg.admin.listen == ("127.0.0.1", 15000)  # other admin defaults kept
    with pytest.raises(ConfigError) as err:
        load_config(base + "limits: {max_connections_per_source: 0}\n"
                           "admin: {max_connections_per_source: many}\n", "s.yaml")
    text = str(err.value)
    assert "s.yaml:4: limits.max_connections_per_source" in text
    assert "s.yaml:5: admin.max_connections_per_source" in text
