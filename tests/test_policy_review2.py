"""Policy addresses and policy size, second hostile review.

Hosts: an IPv6 literal that carries an IPv4 address -- IPv4-compatible (``[::10.0.0.1]``),
NAT64 (``[64:ff9b::a00:1]``, and the local-use ``64:ff9b:1::/48``), 6to4 (``[2002:a00:1::]``),
Teredo (``2001::/32``) -- passed a deny rule for ``10.0.0.1`` (only IPv4-mapped literals were
read as their IPv4 address). Now a deny rule naming an IPv4 address holds against every such
literal of it (one whose address cannot be told, NAT64 local-use, against every deny rule that
names an IPv4 address), an allow rule never admits one, and a rule cannot name one (refused at
load, file:line:key).
"""

from __future__ import annotations

import re

import pytest
import yaml

from sidecar.errors import ConfigError
from sidecar.policy.decision import NO_AUTH, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.loader import load_policy
from tests.harness import (
    Pki,
    http,
    mtls_context,
    sidecar_cli,
    spiffe,
    start_inbound,
    write_policy,
)

ORDERS = spiffe("orders")
# IPv4 address -> IPv6 literals that carry it, in several spellings each.
CARRIED = {
    "10.0.0.1": [
        "[::10.0.0.1]", "[::a00:1]", "[0:0:0:0:0:0:a00:1]", "[::0A00:0001]",  # compatible
        "[64:ff9b::10.0.0.1]", "[64:ff9b::a00:1]", "[64:FF9B:0:0:0:0:a00:1]",  # NAT64
        "[2002:a00:1::]", "[2002:a00:1::1]", "[2002:0A00:0001:ffff::9]",  # 6to4
        "[2001:0:4136:e378:8000:63bf:f5ff:fffe]", "[2001::f5ff:fffe]",  # Teredo (client)
        "[::ffff:0:10.0.0.1]", "[::ffff:0:a00:1]",  # IPv4-translated (SIIT)
        "[fe80::5efe:10.0.0.1]", "[2001:db8::200:5efe:a00:1]",  # ISATAP
    ],
    "127.0.0.1": ["[::127.0.0.1]", "[::7f00:1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]",
                  "[2001::80ff:fffe]"],
}
# NAT64 local-use (RFC 8215): the operator picks where the IPv4 address sits.
UNKNOWN = ["[64:ff9b:1::a00:1]", "[64:ff9b:1:a00:1::]", "[64:FF9B:1:0:7f:0:1:0]"]
# Spellings of the IPv4 address a rule may use (all one host).
RULE_SPELLINGS = {"10.0.0.1": ["10.0.0.1", "10.0.0.1.", "[::ffff:10.0.0.1]", "[::ffff:a00:1]"],
                  "127.0.0.1": ["127.0.0.1", "[::FFFF:7f00:1]"]}
# Never a host entry: zone ids, non-canonical IPv4 (refused before this review, kept).
NOT_AN_ENTRY = ["[fe80::1%eth0]", "[fe80::1%25eth0]", "010.0.0.1", "0x0a.0.0.1", "10.1",
                "167772161", "10.0.0.01", "[::ffff:10.0.0.1]:80", "10.0.0.1:80"]


def _members(carried: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(ipv4, literal) for ipv4, literals in carried.items() for literal in literals]


def _policy(rules: list[dict]) -> str:
    return yaml.safe_dump({"version": 1, "trust_domain": "demo.local",
                           "services": {ORDERS: {"rules": rules}}})


def _decide(policy, host: str):
    facts = RequestFacts("inbound", spiffe("frontend"), "127.0.0.1", "GET", "/", host.lower(),
                         15443, "inbound")
    return decide(policy, ORDERS, facts, NO_AUTH, 0.0)


@pytest.mark.parametrize("ipv4,literal", _members(CARRIED))
def test_a_deny_rule_holds_against_every_literal_that_carries_its_address(ipv4, literal):
    for spelling in RULE_SPELLINGS[ipv4]:
        policy = load_policy(_policy([{"name": "no-ip", "deny": {"hosts": [spelling]}},
                                      {"name": "any", "allow": {}}]), "mesh.yaml")
        for port in ("", ":15443"):
            for host in (literal, literal.upper()):
                d = _decide(policy, host + port)
                assert (d.action, d.rule) == ("deny", "no-ip"), (spelling, host + port)
        assert _decide(policy, "orders.example").action == "allow"


@pytest.mark.parametrize("ipv4,literal", _members(CARRIED))
def test_an_allow_rule_does_not_admit_a_literal_that_carries_its_address(ipv4, literal):
    for spelling in RULE_SPELLINGS[ipv4]:
        policy = load_policy(_policy([{"name": "ip", "allow": {"hosts": [spelling]}}]),
                             "mesh.yaml")
        assert _decide(policy, ipv4).action == "allow"
        for port in ("", ":15443"):
            d = _decide(policy, literal + port)
            assert (d.action, d.reason) == ("deny", "default_deny"), (spelling, literal)


@pytest.mark.parametrize("literal", UNKNOWN)
def test_a_literal_whose_ipv4_address_cannot_be_told_is_denied_by_any_ipv4_deny_rule(literal):
    for ipv4 in ("10.0.0.1", "192.0.2.7"):
        policy = load_policy(_policy([{"name": "no-ip", "deny": {"hosts": [ipv4]}},
                                      {"name": "any", "allow": {}}]), "mesh.yaml")
        assert (_decide(policy, literal).action, _decide(policy, literal).rule) == \
            ("deny", "no-ip")
        allow = load_policy(_policy([{"name": "ip", "allow": {"hosts": [ipv4]}}]), "mesh.yaml")
        assert _decide(allow, literal).action == "deny"
    # A deny rule for names only is not widened.
    names = load_policy(_policy([{"name": "no-name", "deny": {"hosts": ["a.example"]}},
                                 {"name": "any", "allow": {}}]), "mesh.yaml")
    assert _decide(names, literal).action == "allow"


@pytest.mark.parametrize("entry", [lit for _, lit in _members(CARRIED)] + UNKNOWN + NOT_AN_ENTRY)
@pytest.mark.parametrize("effect", ["allow", "deny"])
def test_a_rule_cannot_name_a_literal_that_carries_an_ipv4_address(entry, effect):
    text = _policy([{"name": "r", effect: {"hosts": ["a.example", entry]}}])
    with pytest.raises(ConfigError) as err:
        load_policy(text, "/etc/mesh.yaml")
    assert f"/etc/mesh.yaml:7: services.{ORDERS}.rules[0].{effect}.hosts[1]:" in str(err.value)


def test_other_ipv6_literals_and_names_are_compared_as_before():
    policy = load_policy(_policy([
        {"name": "no-v6", "deny": {"hosts": ["[2001:db8::1]", "[::1]", "[::]"]}},
        {"name": "any", "allow": {}}]), "mesh.yaml")
    for host in ("[2001:DB8::1]", "[::1]", "[0::0]"):
        assert _decide(policy, host).rule == "no-v6", host
    for host in ("[2001:db8::2]", "[::ffff:10.0.0.1]", "orders.example", "[2001:1::1]"):
        assert _decide(policy, host).action == "allow", host


def test_through_a_real_sidecar(tmp_path, pki: Pki, app, procs):
    """Over real mTLS: a deny rule for 127.0.0.1 refuses every literal carrying it (403);
    other Hosts pass."""
    policy = write_policy(tmp_path / "mesh.yaml", {
        "version": 1, "trust_domain": "demo.local",
        "services": {ORDERS: {"rules": [
            {"name": "no-local4", "deny": {"hosts": ["127.0.0.1"]}},
            {"name": "any", "allow": {}}]}}})
    b = start_inbound(tmp_path, pki, app, procs, policy=policy)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    port = b.port("inbound")
    assert http(port, headers={"Host": "orders.example"}, ctx=ctx).status == 200
    assert http(port, headers={"Host": "[2001:db8::1]"}, ctx=ctx).status == 200
    for literal in CARRIED["127.0.0.1"] + UNKNOWN:
        for suffix in ("", ":15443"):
            r = http(port, headers={"Host": literal + suffix}, ctx=ctx)
            assert r.status == 403, (literal + suffix, r.status)


# --- the URLs a policy makes the sidecar fetch --------------------------------------------

BAD_URL_HOSTS = ["127.1", "0x7f.0.0.1", "0177.0.0.1", "2130706433", "127.0.0.01", "0",
                 "[::ffff:127.0.0.1]", "[::127.0.0.1]", "[fe80::1%25eth0]", "127.0.0.1."]
GOOD_URL_HOSTS = ["idp.example", "127.0.0.1", "[::1]", "localhost", "idp.example."]
# name -> (where the URL goes, the key path the problem is named at)
URL_KEYS = {
    "jwks_uri": (lambda u: {"jwt_providers": {"p": {"issuer": "https://idp.example",
                                                    "jwks_uri": u}}}, "jwt_providers.p.jwks_uri"),
    "discovery": (lambda u: {"jwt_providers": {"p": {"issuer": "https://idp.example",
                                                     "discovery": u}}},
                  "jwt_providers.p.discovery"),
    "issuer": (lambda u: {"jwt_providers": {"p": {"issuer": u.rstrip("/x"), "discovery": True}}},
               "jwt_providers.p.issuer"),
    "introspection": (lambda u: {"jwt_providers": {"p": {
        "issuer": "https://idp.example", "introspection": {
            "endpoint": u, "client_id": "c", "mtls": True}}}},
        "jwt_providers.p.introspection.endpoint"),
    "webhook": (lambda u: {"alerts": [{"name": "a", "threshold": 5, "window": "1m",
                                       "by": "peer", "webhook": u}]}, "alerts[0].webhook"),
}


def _url_policy(part: dict) -> str:
    for provider in part.get("jwt_providers", {}).values():
        provider.update({"algorithms": ["RS256"], "audiences": ["a"]})
    return yaml.safe_dump({"version": 1, "trust_domain": "demo.local",
                           "services": {ORDERS: {"rules": [{"name": "any", "allow": {}}]}},
                           **part})


@pytest.mark.parametrize("host", BAD_URL_HOSTS)
@pytest.mark.parametrize("field", list(URL_KEYS))
def test_a_url_host_not_written_one_way_is_refused_at_load(field, host):
    build, key = URL_KEYS[field]
    with pytest.raises(ConfigError) as err:
        load_policy(_url_policy(build(f"https://{host}:8443/x")), "/etc/mesh.yaml")
    assert re.search(rf"/etc/mesh\.yaml:\d+: {re.escape(key)}: ", str(err.value)), str(err.value)


@pytest.mark.parametrize("host", GOOD_URL_HOSTS)
@pytest.mark.parametrize("field", list(URL_KEYS))
def test_url_hosts_written_one_way_still_load(field, host):
    build, _ = URL_KEYS[field]
    load_policy(_url_policy(build(f"https://{host}:8443/x")), "/etc/mesh.yaml")


def test_policy_check_names_a_url_host(tmp_path):
    build, key = URL_KEYS["jwks_uri"]
    path = tmp_path / "mesh.yaml"
    path.write_text(_url_policy(build("https://0x7f.0.0.1/jwks")))
    r = sidecar_cli("policy", "check", str(path))
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out
    assert re.search(rf"{re.escape(str(path))}:\d+: {re.escape(key)}: a host ending in a number",
                     out), out


# --- the watcher's poll ------------------------------------------------------------------


def test_a_poll_reads_a_bounded_number_of_bytes(tmp_path, monkeypatch):
    """A policy directory of many large files was read whole at every poll (2,000 files of
    16 MiB: 32 GiB); now at most ``FINGERPRINT_TOTAL_BYTES`` in all, later files counted by
    size and modification time, so shrinking one is still a change."""
    import os

    import sidecar.reload as reload

    files = [tmp_path / f"p{i}.yaml" for i in range(6)]
    for f in files:
        with open(f, "wb") as fh:
            fh.truncate(12 * 2**20)  # sparse: 72 MiB in all, little disk
    read = []
    real = reload.read_regular

    def counting(path, limit):
        data = real(path, limit)
        read.append(len(data))
        return data

    monkeypatch.setattr(reload, "read_regular", counting)
    first = reload.fingerprint([str(tmp_path)])
    assert first is not None and sum(read) <= reload.FINGERPRINT_TOTAL_BYTES
    assert reload.fingerprint([str(tmp_path)]) == first
    os.truncate(files[-1], 2**20)
    assert reload.fingerprint([str(tmp_path)]) != first
    files[-1].unlink()
    assert reload.fingerprint([str(tmp_path)]) not in (first, None)
