"""The admin and health ports taken from many source addresses (thirty-first session's review).

Found by the review (each test fails on the code before its fix):

* One local process bound 127.0.1.1 ... 127.0.1.64 (Linux routes all of 127.0.0.0/8 to
  ``lo``, and any process may connect from any of it) and held one silent connection from
  each: every admin slot was taken, no source held more than another, so the "heaviest
  source" rule found no one to close, and every other local client -- the Prometheus
  scrape, ``sidecar tap``/``top``, ``sidecar check --admin`` -- fell into the probe reserve
  and got 429. Now a newcomer to a full server takes the slot of the oldest connection of
  another address that has not completed a request head (silent, half a head, idle between
  keep-alive requests); a connection whose head is complete (a ``/tap`` long poll) is never
  taken by that rule.
* Sources are grouped when one must give up a connection to another
  (``sidecar.ctlhttp.server.source_group``): every loopback address is one, an IPv6 address
  its /64. Busy connections from many loopback addresses on a non-loopback port (a
  hostNetwork pod) left a newcomer from another host refused, as every address held one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import time
from collections.abc import Iterator

import pytest
import trio

from tests.harness import (
    Pki,
    SidecarProc,
    free_port,
    http,
    loopback_alias_works,
    metric_value,
    sidecar_config,
    start_app,
    start_sidecar,
)
from tests.test_admin_review import _port, _read_answer
from tests.test_listener_unauth_budget import closed_by_server

ADMIN_SLOTS = 64  # sidecar.ctlhttp.server.ServerLimits.max_connections (the admin port)
HEALTH_SLOTS = 256  # sidecar.admin.HEALTH_LIMITS.max_connections
SHARE = 4  # admin.max_connections_per_source in this test's config (per address)

needs_aliases = pytest.mark.skipif(
    not loopback_alias_works("127.0.1.1") or not loopback_alias_works("127.0.3.1"),
    reason="127.0.1.1 is not a usable loopback address here")


def _aliases(count: int, base: str) -> list[str]:
    """``count`` loopback addresses from ``base`` on (127.0.1.1, 127.0.1.2, ...)."""
    first = ipaddress.IPv4Address(base)
    return [str(first + i) for i in range(count)]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProc]:
    tmp = tmp_path_factory.mktemp("admin-sources-review31")
    with contextlib.ExitStack() as stack:
        app, app_port = start_app(tmp)
        stack.callback(app.stop)
        cfg = sidecar_config(Pki(tmp / "pki").identity("orders"),
                             inbound={"listen": f"127.0.0.1:{free_port()}",
                                      "app": f"127.0.0.1:{app_port}"})
        cfg["admin"]["health_listen"] = f"127.0.0.1:{free_port()}"
        cfg["admin"]["max_connections_per_source"] = SHARE
        proc = start_sidecar(tmp, "sources", cfg)
        stack.callback(proc.stop, timeout=10)
        yield proc


# How each held connection waits for its (next) request head: the bytes sent, and whether
# an answer is read first (the keep-alive member: one request answered, then idle).
HOLDERS: dict[str, tuple[bytes, bool]] = {
    "silent since it opened": (b"", False),
    "half a head": (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a", False),
    "idle between keep-alive requests": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                         True),
}


@contextlib.contextmanager
def _hold(port: int, sources: list[str], first: bytes,
          answered: bool) -> Iterator[list[socket.socket]]:
    """One connection from each of ``sources``, in order, each sending ``first`` (and
    reading its answer when ``answered``), held open until the block ends."""
    held: list[socket.socket] = []
    try:
        for source in sources:
            s = socket.socket()
            held.append(s)
            s.settimeout(5)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            if first:
                s.sendall(first)
            if answered:
                assert _read_answer(s).startswith(b"HTTP/1.1 200"), source
        yield held
    finally:
        for s in held:
            s.close()
        time.sleep(0.3)  # the server has seen them close and let their slots go


def _refused_full(proc: SidecarProc, which: str) -> float:
    return metric_value(http(proc.port("admin"), "GET", "/metrics", timeout=5).body.decode(),
                        "sidecar_connections_refused_total", listener=which,
                        reason="max_connections")


# (port, slots, the newcomer's page, its answer when served: a page outside the probe
# reserve, which answers only /healthz and /readyz and 429 for anything else)
PORTS = {"admin": (ADMIN_SLOTS, "/metrics", 200), "health": (HEALTH_SLOTS, "/nope", 404)}
MEMBERS = [(which, holder) for which in PORTS for holder in HOLDERS
           if not (which == "health" and HOLDERS[holder][1])]  # (no keep-alive on health)


@needs_aliases
def test_waiting_connections_from_many_loopback_addresses_make_room(
        sidecar: SidecarProc) -> None:
    """Every slot held by one connection from each of many loopback addresses, each waiting
    for a head: a newcomer from 127.0.0.1 is served, in the slot of the oldest holder."""
    failures = []
    for which, holder in MEMBERS:
        port = _port(sidecar, which)
        slots, path, served = PORTS[which]
        first, answered = HOLDERS[holder]
        before = _refused_full(sidecar, which)
        with _hold(port, _aliases(slots, "127.0.1.1"), first, answered) as held:
            got = http(port, "GET", path, timeout=5)
            oldest_closed = closed_by_server(held[0])
        after = _refused_full(sidecar, which)
        if got.status != served or not oldest_closed or after < before + 1:
            failures.append((which, holder, got.status, oldest_closed, after - before))
    assert failures == []


@needs_aliases
def test_a_connection_being_answered_is_never_taken(sidecar: SidecarProc) -> None:
    """The control: a ``/tap`` long poll (its head complete, its answer pending) is the
    oldest connection of a full admin port, from another loopback address; newcomers from
    127.0.0.1 and from more loopback addresses take the silent ones' slots, one after the
    other, and the long poll is answered at its end."""
    port = _port(sidecar, "admin")
    seq = http(port, "GET", "/tap", timeout=5).json()["seq"]
    with contextlib.ExitStack() as stack:
        tap = socket.socket()
        stack.callback(tap.close)
        tap.settimeout(10)
        tap.bind(("127.0.2.1", 0))
        tap.connect(("127.0.0.1", port))
        tap.sendall(f"GET /tap?after={seq}&wait=4 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Connection: close\r\n\r\n".encode())
        time.sleep(0.5)  # its head is read: the handler waits for events
        stack.enter_context(_hold(port, _aliases(ADMIN_SLOTS - 1, "127.0.1.1"), b"", False))
        assert http(port, "GET", "/metrics", timeout=5).status == 200
        # More newcomers than silent holders: each takes the oldest silent one's slot.
        stack.enter_context(_hold(port, _aliases(ADMIN_SLOTS, "127.0.3.1"), b"", False))
        assert http(port, "GET", "/metrics", timeout=5).status == 200
        answer = _read_answer(tap)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    document = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert document["seq"] >= seq and isinstance(document["events"], list)


# --- source groups ------------------------------------------------------------------------

GROUPS: dict[str, str] = {
    "127.0.0.1": "localhost",
    "::1": "localhost",
    "::ffff:127.0.0.1": "localhost",
    "127.0.1.64": "loopback",
    "127.255.255.254": "loopback",
    "::ffff:127.0.0.2": "loopback",
    "2001:db8:1:2::1": "2001:db8:1:2::/64",
    "2001:db8:1:2:ffff:ffff:ffff:ffff": "2001:db8:1:2::/64",
    "2001:db8:1:2:abcd::5": "2001:db8:1:2::/64",
    "2001:db8:1:3::1": "2001:db8:1:3::/64",
    "fd00::2": "fd00::/64",
    "fd00:0:0:1::2": "fd00:0:0:1::/64",
    "fe80::1": "fe80::1",  # link-local: every host of the link is in fe80::/64
    "fe80::1%eth0": "fe80::1",
    "10.0.0.1": "10.0.0.1",
    "10.0.0.2": "10.0.0.2",
    "::ffff:10.0.0.1": "10.0.0.1",
    "192.0.2.7": "192.0.2.7",
    "not an address": "not an address",
}


def test_source_groups() -> None:
    from sidecar.ctlhttp.server import source_group  # (here: the rest runs without it)

    got = {address: source_group(address) for address in GROUPS}
    assert got == GROUPS


# The busy holders of a full server (oldest first), and which of them is closed for a
# newcomer from another group (``victim_slot``: none waits for a head, so the heaviest
# group's, then the heaviest address's): the oldest of
# the address holding the most in the heaviest group -- a kubelet beside the pods of its
# node is not taken for them. In process, on ``_Slot`` records (no network: a second group
# needs an address other than loopback).
BUSY: dict[str, tuple[list[str], str, int | None]] = {
    "one each from four loopback addresses": (
        ["127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"], "2001:db8::1", 0),
    "one, then three from another loopback address": (
        ["127.0.1.1", "127.0.1.2", "127.0.1.2", "127.0.1.2"], "2001:db8::1", 1),
    # (one of the same /64: the address rule of the eighteenth session, the one holding two)
    "a /64 of many addresses against one of it": (
        ["2001:db8:0:1::9", "2001:db8:0:1::a", "2001:db8:0:1::a"], "2001:db8:0:1::1", 1),
    "one address over none": (["2001:db8:0:1::9", "2001:db8:0:1::a"], "2001:db8:0:1::1",
                              None),
    "a /64 of many addresses against another /64": (
        ["2001:db8:0:1::9", "2001:db8:0:1::a", "2001:db8:0:1::a"], "2001:db8:0:2::1", 1),
    "no group over its share": (["127.0.0.1", "2001:db8::1"], "10.0.0.1", None),
    # (busy connections from many loopback aliases yield to 127.0.0.1: a review of the fix)
    "loopback aliases against 127.0.0.1": (
        ["127.0.4.1", "127.0.4.2", "127.0.4.3"], "127.0.0.1", 0),
    "loopback aliases against ::1": (["127.0.4.1", "127.0.4.2"], "::1", 0),
    "127.0.0.1 against a loopback alias": (["127.0.0.1", "127.0.0.1"], "127.0.4.1", 0),
}


@pytest.mark.parametrize("member", list(BUSY))
def test_busy_connections_of_one_group_yield_to_another_group(member: str) -> None:
    from sidecar.ctlhttp.server import _Slot, victim_slot

    sources, newcomer, victim = BUSY[member]

    async def pick() -> tuple[list[_Slot], _Slot | None]:  # (a slot's scope needs a run)
        served = [_Slot(address) for address in sources]
        for slot in served:
            slot.awaiting_head = False  # (busy: never the oldest-waiting rule's)
        return served, victim_slot(served, newcomer)

    served, got = trio.run(pick)
    assert got is (None if victim is None else served[victim]), (member, got)
