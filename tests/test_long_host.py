"""A Host longer than a DNS name is refused (hostile review).

A Host value (RFC 3986 reg-name) had no length bound but the request head's
(``limits.max_header_bytes``, up to 8 MiB), and the sidecar kept it whole: in the audit
record of every request -- one caller wrote 30 KiB per request to the audit volume, a hundred
times a usual record, so the volume filled (a Kubernetes ``emptyDir`` past its ``sizeLimit``
gets the pod evicted) or, with ``max_segments``, the oldest decisions were deleted to make
room --, in the log line of every refusal, and in the caches (the head checker kept 256 Host
values, the gate 4,096 decisions keyed by them: 600 requests with new 200 KiB Host values
grew an inbound sidecar by 160 MiB). No host anyone can reach has a longer name than 253
characters (one more with a final dot), so a longer one is now 400 ``bad_host`` on both
listeners, like any other Host that names no host.

The family as data through a real outbound and inbound pair with audit trails: names at and
past the bound, with and without a final dot and a port, and long IPv6-looking literals.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.errors import generic_body
from sidecar.http.request import MAX_HOST_CHARS, split_host
from tests import harness as h
from tests.test_name_caches import App

pytestmark = pytest.mark.usefixtures("no_internal_errors")

MIB = 1024 * 1024
FRONTEND = h.spiffe("frontend")
ORDERS = h.spiffe("orders")


def name_of(length: int) -> str:
    """A DNS-shaped name of exactly ``length`` characters (labels of 63)."""
    labels, left = [], length
    while left > 0:
        take = min(63, left)
        labels.append("a" * take)
        left -= take + 1
    name = ".".join(labels)
    return name[:length] if len(name) >= length else name + "b" * (length - len(name))


ACCEPTED = {
    "253": name_of(MAX_HOST_CHARS),
    "253_port": name_of(MAX_HOST_CHARS) + ":8080",
    "253_final_dot": name_of(MAX_HOST_CHARS) + ".",
    "253_final_dot_port": name_of(MAX_HOST_CHARS) + ".:8080",
    "short": "orders",
    "ipv6": "[2001:db8::1]:8080",
}
REFUSED = {
    "254": name_of(MAX_HOST_CHARS + 1),
    "254_port": name_of(MAX_HOST_CHARS + 1) + ":8080",
    "254_final_dot": name_of(MAX_HOST_CHARS + 1) + ".",
    "253_two_dots": name_of(MAX_HOST_CHARS) + "..",
    "1000": name_of(1000),
    "30k": name_of(30_000),
    "30k_one_label": "a" * 30_000,
    "30k_digits": "1" * 30_000,
    "long_ipv6": "[" + "0:" * 2000 + "1]",
}


@pytest.mark.parametrize("label", list(ACCEPTED))
def test_a_host_of_a_dns_names_length_is_read(label: str) -> None:
    assert split_host(ACCEPTED[label]) is not None


@pytest.mark.parametrize("label", list(REFUSED))
def test_a_longer_host_is_no_host(label: str) -> None:
    assert split_host(REFUSED[label]) is None


POLICY = {
    "version": 1, "trust_domain": "demo.local",
    "services": {
        ORDERS: {"rules": [{"name": "open", "allow": {"from": [FRONTEND]}}]},
        FRONTEND: {"egress": [ORDERS]},
    },
}


class Pair:
    def __init__(self, tmp: Path) -> None:
        self.app = App()
        self.procs: list[h.SidecarProc] = []
        self.audit = {"orders": tmp / "audit-orders", "frontend": tmp / "audit-frontend"}
        try:
            pki = h.Pki(tmp / "pki")
            h.write_policy(tmp / "mesh.yaml", POLICY)
            self.inbound, self.outbound = h.start_mesh_pair(
                tmp, pki, self.app.port, tmp / "mesh.yaml", self.procs,
                limits={"max_header_bytes": "64KiB"}, audit=self.audit)
            self.ctx = h.mtls_context(pki.identity("frontend", dirname="client"), pki.bundle)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.app.close()

    def audit_bytes(self) -> dict[str, int]:
        return {name: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                for name, path in self.audit.items()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    built = Pair(tmp_path_factory.mktemp("long-host"))
    try:
        yield built
    finally:
        built.close()


def ask(pair: Pair, side: str, host: str) -> tuple[int, bytes]:
    """One request with ``host`` on a new connection; (status, body)."""
    if side == "outbound":
        sock: socket.socket = socket.create_connection(
            ("127.0.0.1", pair.outbound.port("orders")), timeout=10)
    else:
        sock = pair.ctx.wrap_socket(socket.create_connection(
            ("127.0.0.1", pair.inbound.port("inbound")), timeout=10))
    with sock:
        sock.sendall(f"GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        for _ in range(1000):  # (bounded: the answers are small)
            got = sock.recv(65536)
            if not got:
                break
            data += got
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("side", ["outbound", "inbound"])
@pytest.mark.parametrize("label", list(ACCEPTED))
def test_hosts_of_a_dns_names_length_pass(pair: Pair, side: str, label: str) -> None:
    assert ask(pair, side, ACCEPTED[label])[0] == 200


@pytest.mark.parametrize("side", ["outbound", "inbound"])
@pytest.mark.parametrize("label", list(REFUSED))
def test_longer_hosts_are_refused_generically(pair: Pair, side: str, label: str) -> None:
    status, body = ask(pair, side, REFUSED[label])
    assert status == 400
    assert re.fullmatch(rb"%s \(request id [0-9a-f]{16}\)\n" % generic_body(400).encode(),
                        body), body[:200]


def test_long_hosts_do_not_fill_the_audit_trail_or_memory(pair: Pair) -> None:
    # 600 requests with new 30 KiB Host values through the pair: kept whole, 18 MiB of
    # audit records on each side, and 4,096 cached decisions of them.
    deadline = time.monotonic() + 90
    time.sleep(1.0)  # (the records of the earlier tests written)
    before = pair.audit_bytes()
    rss_before = {p.log_path.stem: rss(p.pid) for p in pair.procs}
    failures: list[str] = []

    def send(first: int) -> None:
        # Requests n = first, first + 4, ..., each on a new connection.
        for n in range(first, 600, 4):
            if time.monotonic() > deadline:
                failures.append("too slow")
                return
            host = f"h{n:05d}" + "a" * 30_000
            try:
                with socket.create_connection(("127.0.0.1", pair.outbound.port("orders")),
                                              timeout=20) as sock:
                    sock.sendall(f"GET /x HTTP/1.1\r\nHost: {host}\r\n"
                                 "Connection: close\r\n\r\n".encode())
                    for _ in range(1000):  # (bounded: the answers are small)
                        if not sock.recv(65536):
                            break
            except OSError as exc:
                failures.append(repr(exc))
                return

    h.run_senders(send, [(i,) for i in range(4)], deadline, failures, grace=30)
    time.sleep(1.0)  # (batch_linger: the last records written)
    grown = {name: size - before[name] for name, size in pair.audit_bytes().items()}
    assert all(g < 2 * MIB for g in grown.values()), grown
    rss_grown = {p.log_path.stem: (rss(p.pid) - rss_before[p.log_path.stem]) // MIB
                 for p in pair.procs}
    assert all(g < 40 for g in rss_grown.values()), rss_grown


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
