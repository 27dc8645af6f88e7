"""The name-resolution scenario of tests/test_dns_resolver.py, run inside a private network and
mount namespace (``unshare -rnm``, or ``unshare -nm`` as root): its own loopback, a DNS
server on 127.0.0.1:53 and a resolv.conf bind-mounted over /etc/resolv.conf for this process
tree only. Nothing outside the namespace is touched.

``python -m tests.dns_namespace DIR`` (from the repository root, inside the namespace) runs:

1. ``late.mesh.test`` answers after ``LATE_DELAY``: ``LATE_CALLS`` concurrent calls to an
   outbound listener with that upstream (the real ``orders`` sidecar), twice (``pool_size:
   1``, so the second burst opens new connections, well within the 5 s the answer is cached)
   -- how many DNS queries of each type the name got.
2. ``hang<N>.partner.test`` (``HANG_NAMES`` names, one outbound listener each) never answers
   (resolv.conf ``timeout:25 attempts:1``): ``HANG_CALLS`` concurrent calls spread over them;
   then, while those lookups still hang, one call to ``orders`` (an IP upstream), the policy
   rewritten to withdraw egress to ``orders``, whether the reload is applied within
   ``RELOAD_BOUND`` seconds, and a call to ``orders`` after it.

It prints one JSON object (the last line of its output) for the tests to judge.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sidecar.net.resolve import RESULTS
from tests.harness import (
    Pki,
    free_port,
    http,
    metric_value,
    sidecar_config,
    sidecar_log_faults,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)

RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:25 attempts:1\n"
LATE_NAME = "late.mesh.test"
LATE_DELAY = 0.5
LATE_CALLS = 30
HANG_NAMES = 10  # more than the resolver's 8 threads: the last ones find them all taken
HANG_CALLS = 45  # more than Trio's default 40 threads
RELOAD_BOUND = 10.0  # well under the 25 s the hung lookups take

FRONT, ORDERS, PARTNER = spiffe("frontend"), spiffe("orders"), spiffe("partner")


def loopback_up() -> None:
    """``ip link set lo up`` without iproute2 (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0))
        flags = struct.unpack("16sh", ifr[:18])[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))


class DnsServer:
    """UDP DNS on 127.0.0.1:53: counts every query by (name, type); ``LATE_NAME`` gets its
    A record (127.0.0.1; AAAA: no data) after ``LATE_DELAY``; every other name no answer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.queries: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                name, qtype, end = self._question(data)
            except (IndexError, struct.error, UnicodeDecodeError):
                continue
            with self._lock:
                self.queries[(name, qtype)] += 1
            if name == LATE_NAME:
                timer = threading.Timer(LATE_DELAY, self._answer, (data, end, qtype, peer))
                timer.daemon = True
                timer.start()

    @staticmethod
    def _question(data: bytes) -> tuple[str, int, int]:
        labels, pos = [], 12
        while data[pos]:
            labels.append(data[pos + 1:pos + 1 + data[pos]].decode("ascii").lower())
            pos += 1 + data[pos]
        qtype = struct.unpack(">H", data[pos + 1:pos + 3])[0]
        return ".".join(labels), qtype, pos + 5

    def _answer(self, data: bytes, end: int, qtype: int, peer: Any) -> None:
        record = (b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4)
                  + socket.inet_aton("127.0.0.1")) if qtype == 1 else b""
        head = data[:2] + struct.pack(">HHHHH", 0x8180, 1, 1 if record else 0, 0, 0)
        try:
            self.sock.sendto(head + data[12:end] + record, peer)
        except OSError:
            pass

    def counts(self, suffix: str) -> dict[str, int]:
        with self._lock:
            return {f"{n}/{t}": c for (n, t), c in self.queries.items() if n.endswith(suffix)}


def call(port: int, out: list[str]) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out.append(s.recv(100).split(b"\r\n", 1)[0].decode("latin-1"))
    except OSError as exc:
        out.append(repr(exc))


def concurrent_calls(ports: list[int]) -> list[str]:
    out: list[str] = []
    threads = [threading.Thread(target=call, args=(p, out)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return sorted(out)


def policy(revision: str, orders: bool) -> str:
    egress = f'"{ORDERS}", "{PARTNER}"' if orders else f'"{PARTNER}"'
    return (f"version: 1\nrevision: {revision}\ntrust_domain: demo.local\nservices:\n"
            f"  {FRONT}:\n    egress: [{egress}]\n"
            f"  {ORDERS}:\n    rules: [{{name: all, allow: {{from: [\"{FRONT}\"]}}}}]\n")


def run(tmp: Path) -> dict[str, Any]:
    dns = DnsServer()
    procs: list[Any] = []
    result: dict[str, Any] = {}
    try:
        pki = Pki(tmp / "pki")
        pol = tmp / "policy.yaml"
        pol.write_text(policy("r1", True))
        app_proc, app_port = start_app(tmp)
        procs.append(app_proc)
        orders = start_sidecar(tmp, "orders", sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(pol)))
        procs.append(orders)
        outbound = [
            {"name": "orders", "listen": f"127.0.0.1:{free_port()}",
             "upstream": f"127.0.0.1:{orders.port('inbound')}", "identity": ORDERS},
            {"name": "late", "listen": f"127.0.0.1:{free_port()}",
             "upstream": f"{LATE_NAME}:{orders.port('inbound')}", "identity": ORDERS},
        ] + [{"name": f"partner{i}", "listen": f"127.0.0.1:{free_port()}",
              "upstream": f"hang{i}.partner.test:15443", "identity": PARTNER}
             for i in range(HANG_NAMES)]
        front = start_sidecar(tmp, "frontend", sidecar_config(
            pki.identity("frontend"), outbound=outbound, policy=str(pol),
            limits={"connect_timeout": "3s", "pool_size": 1}))
        procs.append(front)
        admin = front.port("admin")

        result["late_calls"] = concurrent_calls([front.port("late")] * LATE_CALLS)
        result["late_calls_again"] = concurrent_calls([front.port("late")] * LATE_CALLS)
        result["late_queries"] = dns.counts(LATE_NAME)
        hang_ports = [front.port(f"partner{i % HANG_NAMES}") for i in range(HANG_CALLS)]
        result["hang_calls"] = concurrent_calls(hang_ports)
        result["hang_queries"] = dns.counts(".partner.test")
        metrics = front.metrics()
        result["metrics"] = {
            r: metric_value(metrics, "sidecar_dns_lookups_total", result=r)
            for r in RESULTS
        } if "sidecar_dns_lookups_total" in metrics else {}
        result["in_flight"] = (metric_value(metrics, "sidecar_dns_lookups_in_flight")
                               if "sidecar_dns_lookups_in_flight" in metrics else None)

        def version() -> str:
            return str(json.loads(http(admin, "GET", "/policy", timeout=5).body)["version"])

        before: list[str] = []
        call(front.port("orders"), before)
        result["orders_before"] = before
        old = version()
        pol.write_text(policy("r2", False))
        try:
            wait_for(lambda: version() != old, timeout=RELOAD_BOUND, interval=0.1)
            result["reloaded"] = True
        except TimeoutError:
            result["reloaded"] = False
        after: list[str] = []
        call(front.port("orders"), after)
        result["orders_after"] = after
        result["saturated_logs"] = len(front.log_events("dns_resolver_saturated"))
        result["faults"] = sidecar_log_faults(front)
    finally:
        for p in reversed(procs):
            p.stop(timeout=10)
        dns.sock.close()
    return result


def main() -> int:
    tmp = Path(sys.argv[1])
    started = time.monotonic()
    loopback_up()
    result = run(tmp)
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
