"""Addresses in the config are one host written one way (found by a hostile review).

``parse_address`` took any text as a host: ``[]:80`` listened on every interface, ``[zzz]``,
``a b`` and zone ids loaded (and failed first at the start, or at the first connect), and the
spellings a resolver reads as 127.0.0.1 -- ``127.1``, ``0x7f.0.0.1``, ``2130706433``,
``0177.0.0.1``, ``[::ffff:127.0.0.1]``, ``[::127.0.0.1]`` -- loaded as other hosts to the
check that two listeners do not share an address and to the admin loopback warning. Each is
now refused at its key with file and line, by the loader, ``run --check`` and ``check``.
"""

from __future__ import annotations

import pytest
import yaml

from sidecar.config.model import load_config
from sidecar.config.values import parse_address
from sidecar.errors import ConfigError
from tests.harness import free_port, sidecar_cli

BAD_HOSTS = [
    "[]", "[zzz]", "[v1.x]", "[fe80::1%eth0]", "[fe80::1%25eth0]", "[::1%1]",
    "[::ffff:127.0.0.1]", "[::FFFF:7f00:1]", "[0:0:0:0:0:ffff:10.0.0.1]",  # IPv4-mapped
    "[::127.0.0.1]", "[::a00:1]", "[::2]",  # IPv4-compatible
    "127.1", "127.0.1", "0x7f.0.0.1", "0X7F.0.0.1", "0177.0.0.1", "2130706433", "0x7f000001",
    "127.0.0.01", "010.0.0.1", "256.0.0.1", "1.2.3.4.5", "127.0.0.1.", "0", "a.1",
    "a b", " 127.0.0.1", "127.0.0.1 ", "a\tb", "exa\x1bmple", "ex/ample", "ex@ample", "..",
    "a..b", ".a", "é.example", "x" * 254,
]
BAD_PORTS = ["080", "00", "+80", "-1", "65536", "8_0", "٨٠", " 80", "80 ", "0x50", ""]
GOOD_HOSTS = ["localhost", "localhost.", "collector.audit.svc.cluster.local", "0.0.0.0",
              "127.0.0.1", "10.0.0.255", "1e100.net", "x1.example", "a_b-c.example",
              "[::]", "[::1]", "[0::1]", "[2001:db8::1]", "[64:ff9b::a00:1]", "[2002:a00:1::]"]
# The config's address keys.
KEYS = [("inbound", "listen"), ("inbound", "app"), ("outbound", 0, "listen"),
        ("outbound", 0, "upstream"), ("admin", "listen"), ("admin", "health_listen")]


def _config(path: tuple, value: str) -> dict:
    cfg = {
        "identity": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem"},
        "inbound": {"listen": f"127.0.0.1:{free_port()}", "app": "127.0.0.1:8080"},
        "outbound": [{"name": "orders", "listen": f"127.0.0.1:{free_port()}",
                      "upstream": "orders.shop:15443",
                      "identity": "spiffe://demo.local/ns/shop/sa/orders"}],
        "admin": {"listen": f"127.0.0.1:{free_port()}",
                  "health_listen": f"127.0.0.1:{free_port()}"},
    }
    node = cfg
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return cfg


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path).replace(".0.", "[0].")


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_a_host_not_written_one_way_is_refused(host):
    with pytest.raises(ValueError):
        parse_address(f"{host}:80")


@pytest.mark.parametrize("port", BAD_PORTS)
def test_a_port_not_in_decimal_is_refused(port):
    for host in ("127.0.0.1", "[::1]", "localhost"):
        with pytest.raises(ValueError):
            parse_address(f"{host}:{port}")


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_names_and_addresses_written_one_way_stay_accepted(host):
    assert parse_address(f"{host}:80") == (host.strip("[]"), 80)
    assert parse_address(f"{host}:0") == (host.strip("[]"), 0)


@pytest.mark.parametrize("host", BAD_HOSTS + ["127.0.0.1:080"])
@pytest.mark.parametrize("path", KEYS, ids=_key)
def test_every_address_key_refuses_them_with_file_line_and_key(host, path):
    value = host if host.endswith(":080") else f"{host}:15000"
    text = yaml.safe_dump(_config(path, value))
    with pytest.raises(ConfigError) as err:
        load_config(text, "/etc/sidecar.yaml")
    problems = [p for p in err.value.problems if p.key == _key(path)]
    assert problems and problems[0].file == "/etc/sidecar.yaml" and problems[0].line, \
        str(err.value)


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_every_address_key_takes_a_host_written_one_way(host):
    text = yaml.safe_dump(_config(("outbound", 0, "upstream"), f"{host}:15443"))
    assert load_config(text, "/etc/sidecar.yaml").outbound[0].upstream == (host.strip("[]"),
                                                                           15443)


def test_two_listeners_on_one_address_in_a_mapped_spelling_cannot_load():
    """``[::ffff:127.0.0.1]:P`` and ``127.0.0.1:P`` are one socket address on a dual-stack
    host: the mapped spelling is refused, not taken as another address."""
    port = free_port()
    cfg = _config(("inbound", "listen"), f"127.0.0.1:{port}")
    cfg["admin"]["listen"] = f"[::ffff:127.0.0.1]:{port}"
    with pytest.raises(ConfigError, match=r"admin\.listen: an IPv4-mapped IPv6 address"):
        load_config(yaml.safe_dump(cfg), "/etc/sidecar.yaml")


@pytest.mark.parametrize("host", ["[]", "[fe80::1%eth0]", "127.1", "[::ffff:127.0.0.1]",
                                  "a b", "2130706433"])
def test_run_check_and_check_refuse_them(tmp_path, host):
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump(_config(("inbound", "app"), f"{host}:8080")))
    for args in (["run", "-c", str(cfg), "--check", "--config-only"],
                 ["check", "-c", str(cfg), "--offline"]):
        r = sidecar_cli(*args, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "Traceback" not in out, (args, out[-2000:])
        assert f"{cfg}:" in out and "inbound.app:" in out, (args, out[-2000:])
