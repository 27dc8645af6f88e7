"""A bounded soak through two real sidecars: allowed, denied and malformed traffic mixed.

Short form in CI (``SOAK_SECONDS``, default 20 s of load after a 3 s warm-up); run longer with
``SOAK_SECONDS=600 pytest tests/test_soak.py``. Asserts: zero errors for well-formed allowed
requests, RSS and open file descriptors of each sidecar flat after warm-up, and
``sidecar_connections_open`` back to 0 once the clients are gone.
"""

from __future__ import annotations

import http.client as httpclient
import os
import random
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    TD,
    free_port,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
WARMUP_SECONDS = 3.0
CLIENTS = 8
RSS_GROWTH_LIMIT = 15 * 1024 * 1024
FD_SLACK = 8


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _policy() -> dict[str, Any]:
    return {
        "version": 1, "trust_domain": TD,
        "services": {
            spiffe("orders"): {"rules": [
                {"name": "frontend-orders", "allow": {
                    "from": [spiffe("frontend")], "methods": ["GET", "POST"],
                    "paths": ["/orders", "/orders/**"]}},
                {"name": "nobody-reaches-admin", "deny": {"paths": ["/admin/**"]}},
            ]},
            spiffe("frontend"): {"egress": [spiffe("orders")]},
        },
    }


class Load:
    """``CLIENTS`` threads sending a fixed mix until ``stop``; every outcome is counted."""

    MIX = ("get", "get", "get", "post", "keepalive", "denied", "ambiguous", "garbage")

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads)

    def _note(self, kind: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.counts[f"{kind}:{'ok' if ok else 'bad'}"] += 1
            if not ok and len(self.failures) < 20:
                self.failures.append(f"{kind}: {detail}")

    def _request(self, method: str, path: str, body: bytes | None = None,
                 conn: httpclient.HTTPConnection | None = None) -> tuple[int, bytes]:
        own = conn is None
        c = conn or httpclient.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            c.request(method, path, body=body)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            if own:
                c.close()

    def _client(self, idx: int) -> None:
        rnd = random.Random(idx)
        n = 0
        while not self.stop.is_set() and n < 1_000_000:
            n += 1
            kind = rnd.choice(self.MIX)
            try:
                if kind == "get":
                    status, body = self._request("GET", f"/orders/{idx}-{n}")
                    self._note(kind, status == 200 and f"{idx}-{n}".encode() in body,
                               str(status))
                elif kind == "post":
                    size = rnd.randrange(0, 200_000)
                    status, body = self._request("POST", "/orders", body=b"p" * size)
                    self._note(kind, status == 200 and f'"length": {size}'.encode() in body,
                               str(status))
                elif kind == "keepalive":
                    conn = httpclient.HTTPConnection("127.0.0.1", self.port, timeout=15)
                    try:
                        for j in range(5):
                            status, _ = self._request("GET", f"/orders/k{j}", conn=conn)
                            self._note(kind, status == 200, str(status))
                    finally:
                        conn.close()
                elif kind == "denied":
                    status, _ = self._request("GET", "/admin/users")
                    self._note(kind, status == 403, str(status))
                elif kind == "ambiguous":
                    status, _ = self._request("GET", "/orders/%2e%2e/admin/users")
                    self._note(kind, status == 400, str(status))
                else:  # a malformed head: the outbound sidecar answers 400 itself
                    with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                        s.sendall(b"GET /orders HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n")
                        data = s.recv(4096)
                    self._note(kind, data.startswith(b"HTTP/1.1 400"), repr(data[:40]))
            except (OSError, httpclient.HTTPException) as exc:
                self._note(kind, False, repr(exc))


@pytest.mark.slow
def test_soak_mixed_traffic_no_errors_flat_memory_and_fds(tmp_path, pki, app, procs):
    policy = write_policy(tmp_path / "mesh.yaml", _policy())
    # Keep-alive bounds as in production, scaled down: the caller's pool gives up idle
    # connections before the peer closes them (pool_idle_timeout < idle_timeout).
    b_cfg = sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"}, policy=policy,
        limits={"idle_timeout": "2s"}, audit={"path": str(tmp_path / "audit"), "fsync": False})
    b = start_sidecar(tmp_path, "orders", b_cfg)
    procs.append(b)
    a_cfg = sidecar_config(pki.identity("frontend"), outbound=[{
        "name": "orders", "listen": f"127.0.0.1:{free_port()}",
        "upstream": f"127.0.0.1:{b.port('inbound')}", "identity": spiffe("orders")}],
        policy=policy, limits={"idle_timeout": "2s", "pool_idle_timeout": "1s"})
    a = start_sidecar(tmp_path, "frontend", a_cfg)
    procs.append(a)
    sidecars = {"frontend": a, "orders": b}

    def quiet() -> None:
        for p in sidecars.values():
            wait_for(lambda p=p: p.metric("sidecar_connections_open") == 0, timeout=15,
                     interval=0.2)

    warm = Load(a.port("orders"))
    warm.start()
    time.sleep(WARMUP_SECONDS)
    warm.finish()
    quiet()
    base = {n: (_rss(p.pid), _fds(p.pid)) for n, p in sidecars.items()}

    load = Load(a.port("orders"))
    started = time.monotonic()
    load.start()
    samples: dict[str, list[int]] = {n: [] for n in sidecars}
    try:  # the client threads are stopped also when a sample fails (a sidecar gone)
        while time.monotonic() - started < SOAK_SECONDS:
            time.sleep(min(1.0, SOAK_SECONDS / 10))
            for n, p in sidecars.items():
                samples[n].append(_rss(p.pid))
    finally:
        load.finish()
    elapsed = time.monotonic() - started
    quiet()
    end = {n: (_rss(p.pid), _fds(p.pid)) for n, p in sidecars.items()}

    total = sum(load.counts.values()) + sum(warm.counts.values())
    print(f"\nsoak {elapsed:.0f}s, {total} requests "
          f"({sum(load.counts.values()) / elapsed:.0f}/s): {dict(sorted(load.counts.items()))}")
    for n in sidecars:
        print(f"  {n}: rss {base[n][0] >> 20} -> {end[n][0] >> 20} MiB "
              f"(peak {max(samples[n]) >> 20}), fds {base[n][1]} -> {end[n][1]}")

    assert not load.failures and not warm.failures, load.failures + warm.failures
    for kind in ("get", "post", "keepalive", "denied", "ambiguous", "garbage"):
        assert load.counts[f"{kind}:ok"] > 0, load.counts
    for n in sidecars:
        assert end[n][0] - base[n][0] < RSS_GROWTH_LIMIT, (n, base[n], end[n])
        assert abs(end[n][1] - base[n][1]) <= FD_SLACK, (n, base[n], end[n])
        assert sidecars[n].metric("sidecar_connections_open") == 0
    assert b.proc.poll() is None and a.proc.poll() is None
