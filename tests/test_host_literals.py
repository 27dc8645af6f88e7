"""IP literals in a policy's ``hosts`` and in a request's Host (found by a hostile review).

A deny rule for ``[::1]`` held only against that spelling: ``[0:0::1]``, ``[0::1]``,
``[::0001]`` and upper-case hex are the same address and passed, and so did a rule written
in one of those spellings against ``[::1]``. An IPv4-mapped literal (``[::ffff:127.0.0.1]``)
passed a rule for ``127.0.0.1``, and so did the spellings the Host grammar takes as a
reg-name but URL parsers and ``inet_aton`` read as 127.0.0.1 (``127.1``, ``0x7f.0.0.1``,
``0177.0.0.1``, ``2130706433``). Now an IPv6 literal is compared in its RFC 5952 form (an
IPv4-mapped one as its IPv4 address), in the policy (at load) and in the request (only
bracketed literals take that path), a zone id is refused, and a host ending in a number
must be four decimal numbers (else refused at load, and 400 ``bad_host`` on the data path).
"""

from __future__ import annotations

import pytest
import yaml

from sidecar.errors import BadRequest, ConfigError
from sidecar.http.request import check_head, split_host
from sidecar.policy.decision import NO_AUTH, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.loader import load_policy
from tests.harness import (
    Pki,
    http,
    mtls_context,
    spiffe,
    start_inbound,
    write_policy,
)

# Spellings of one address -> the form it is compared in.
SAME_HOST = {
    "[::1]": ["[::1]", "[0:0::1]", "[0::1]", "[::0001]", "[0:0:0:0:0:0:0:1]", "[::0:1]",
              "[0000:0000:0000:0000:0000:0000:0000:0001]", "[0::0:0:1]"],
    "[2001:db8::1]": ["[2001:DB8::1]", "[2001:db8:0:0:0:0:0:1]", "[2001:0DB8::0001]",
                      "[2001:db8::0:1]"],
    "[2001:db8:0:1:1:1:1:1]": ["[2001:db8::1:1:1:1:1]", "[2001:DB8:0:1:1:1:1:1]"],
    "[2001:db8::1:0:0:1]": ["[2001:db8:0:0:1:0:0:1]"],
    "127.0.0.1": ["127.0.0.1", "[::ffff:127.0.0.1]", "[::FFFF:127.0.0.1]", "[::ffff:7f00:1]",
                  "[0:0:0:0:0:ffff:7f00:0001]", "[::ffff:7F00:1]", "[0::ffff:127.0.0.1]"],
}
# Never a host: zone ids, and hosts that end in a number but are not a.b.c.d in decimal.
NOT_A_HOST = [
    "[fe80::1%25eth0]", "[fe80::1%eth0]", "[::1%1]", "[::ffff:127.1]",
    "127.1", "127.0.1", "0x7f.0.0.1", "0X7F.0.0.1", "0177.0.0.1", "2130706433", "0x7f000001",
    "017700000001", "127.0.0.01", "127.000.000.001", "127.0.0.0x1", "1.2.3.4.5", "256.0.0.1",
    "a.1", "orders.1", "0x", "0",
    # Empty labels: a name with one is no host (one final dot is the root's); folding them
    # let ``orders.example..`` match ``hosts: [orders.example]`` (hostile review).
    "orders.example..", ".orders.example", "orders..example", "..", ".", "a...",
]
# Ports no socket has: refused with any host (``x:99999`` matched ``hosts: [x]``).
BAD_PORTS = [":65536", ":99999", ":70000"]
# Still hosts, as they were.
STILL_HOSTS = ["127.0.0.1", "127.0.0.1.", "0.0.0.0", "10.0.0.255", "orders.example",
               "1e100.net", "x1.example", "example.com.", "a-1.b_2.c~3", "localhost"]


def _members() -> list[tuple[str, str]]:
    return [(canonical, s) for canonical, spellings in SAME_HOST.items() for s in spellings]


@pytest.mark.parametrize("canonical,spelling", _members())
@pytest.mark.parametrize("port", ["", ":15443"])
def test_every_spelling_of_an_address_is_one_host(canonical, spelling, port):
    assert split_host(spelling + port) == (canonical, port[1:])


@pytest.mark.parametrize("host", NOT_A_HOST)
@pytest.mark.parametrize("port", ["", ":15443"])
def test_hosts_that_cannot_be_read_one_way_are_refused(host, port):
    _refused_as_bad_host(host + port)


def _refused_as_bad_host(value: str) -> None:
    assert split_host(value) is None
    with pytest.raises(BadRequest) as err:
        check_head(b"GET", b"/", [(b"host", value.encode())], max_headers=10, max_body=0)
    assert err.value.reason == "bad_host"


@pytest.mark.parametrize("host", ["orders.example", "orders.example.", "[::1]", "127.0.0.1"])
@pytest.mark.parametrize("port", BAD_PORTS)
def test_a_port_past_65535_is_refused(host, port):
    _refused_as_bad_host(host + port)
    assert split_host(host + ":65535") is not None


@pytest.mark.parametrize("host", STILL_HOSTS)
def test_names_and_dotted_decimal_addresses_stay_hosts(host):
    assert split_host(host) == (host.lower(), "")
    assert split_host(host + ":80") == (host.lower(), "80")


def _policy(rule_host: str) -> str:
    return yaml.safe_dump({
        "version": 1, "trust_domain": "demo.local",
        "services": {spiffe("orders"): {"rules": [
            {"name": "no-local", "deny": {"hosts": [rule_host]}},
            {"name": "any", "allow": {}}]}}})


@pytest.mark.parametrize("canonical,spelling", _members())
def test_a_rule_in_any_spelling_holds_against_every_spelling(canonical, spelling):
    policy = load_policy(_policy(spelling), "mesh.yaml")
    rule = policy.services[spiffe("orders")].rules[0]
    # (a deny rule also holds the forms of an IPv4 address carried in an IPv6 literal)
    assert {h for h in rule.when.hosts if " " not in h} == {canonical}
    for request_host in SAME_HOST[canonical]:
        for port in ("", ":15443"):
            facts = RequestFacts("inbound", spiffe("frontend"), "127.0.0.1", "GET", "/",
                                 request_host.lower() + port, 15443, "inbound")
            decision = decide(policy, spiffe("orders"), facts, NO_AUTH, 0.0)
            assert (decision.action, decision.rule) == ("deny", "no-local"), request_host


@pytest.mark.parametrize("host", NOT_A_HOST)
def test_a_rule_for_a_host_no_request_can_name_is_refused_at_load(host):
    with pytest.raises(ConfigError) as err:
        load_policy(_policy(host), "/etc/mesh.yaml")
    where = f"/etc/mesh.yaml:6: services.{spiffe('orders')}.rules[0].deny.hosts[0]:"
    assert where in str(err.value), str(err.value)


def test_through_a_real_sidecar(tmp_path, pki: Pki, app, procs):
    """Deny rules for ``[::1]`` and ``127.0.0.1`` hold against every spelling over real mTLS;
    the IPv4 spellings a resolver reads as 127.0.0.1 are refused (400) before any rule."""
    policy = write_policy(tmp_path / "mesh.yaml", {
        "version": 1, "trust_domain": "demo.local",
        "services": {spiffe("orders"): {"rules": [
            {"name": "no-local6", "deny": {"hosts": ["[0::0001]"]}},
            {"name": "no-local4", "deny": {"hosts": ["[::ffff:7f00:1]"]}},
            {"name": "any", "allow": {}}]}}})
    b = start_inbound(tmp_path, pki, app, procs, policy=policy)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    port = b.port("inbound")
    assert http(port, headers={"Host": "orders.example"}, ctx=ctx).status == 200
    for canonical in ("[::1]", "127.0.0.1"):
        for spelling in SAME_HOST[canonical]:
            for suffix in ("", ":15443"):
                r = http(port, headers={"Host": spelling + suffix}, ctx=ctx)
                assert r.status == 403, (spelling + suffix, r.status)
    for host in NOT_A_HOST + [f"orders.example{p}" for p in BAD_PORTS]:
        r = http(port, headers={"Host": host}, ctx=ctx)
        assert r.status == 400, (host, r.status)
