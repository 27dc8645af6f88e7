"""Name resolution has its own bounded threads (sidecar/net/resolve.py), tested with the real
system resolver against a real DNS server.

A hostile review found that a slow resolver for one upstream name stalled every policy and
certificate reload: Trio's getaddrinfo threads share Trio's default limiter (40 threads) with
the file watchers, and a lookup abandoned at ``connect_timeout`` kept its thread until DNS
answered. The scenario (tests/dns_namespace.py) runs a real frontend and ``orders`` sidecar
inside ``unshare -rnm`` (``-nm`` as root, as in .ci/run) with a DNS server on 127.0.0.1:53 of
that namespace; the tests here judge what it saw. Skipped, with the reason, where the
namespaces cannot be made (no user namespaces, no CAP_SYS_ADMIN).

The family, as data: a name whose answer is slow (``late``: coalesced, cached) and names
that never answer (``hang``), more of them than the resolver has threads (``busy``) and more
calls than Trio's default pool has threads (the stall).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.net.resolve import RESULTS
from tests import dns_namespace as ns
from tests.harness import ROOT

# How to enter the namespaces: unprivileged (a user namespace), or as root without one.
UNSHARE: tuple[tuple[str, ...], ...] = (("unshare", "-rnm"), ("unshare", "-nm"))


def _namespace(resolv: Path) -> tuple[str, ...] | None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for prefix in UNSHARE:
        try:
            probe = subprocess.run(
                [*prefix, "sh", "-c", f"mount --bind {resolv} /etc/resolv.conf"],
                capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dns")
    resolv = tmp / "resolv.conf"
    resolv.write_text(ns.RESOLV_CONF)
    prefix = _namespace(resolv)
    if prefix is None:
        pytest.skip("needs `unshare -rnm` or `unshare -nm` with `mount --bind` (user or "
                    "network namespaces not permitted here)")
    script = (f"mount --bind {resolv} /etc/resolv.conf && "
              f"exec {sys.executable} -m tests.dns_namespace {tmp}")
    done = subprocess.run([*prefix, "sh", "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, f"scenario failed:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    if not result["late_queries"]:
        pytest.skip("the system resolver does not ask the nameserver of resolv.conf here "
                    "(nsswitch sends host lookups elsewhere)")
    return result


def test_a_reload_is_applied_while_lookups_hang(seen: dict[str, Any]) -> None:
    # 45 calls whose upstream names never resolve used to pin all of Trio's 40 default
    # threads, and the policy watcher waited for one: a withdrawn egress stayed allowed.
    assert set(seen["hang_calls"]) == {"HTTP/1.1 502 Bad Gateway"}
    assert seen["orders_before"] == ["HTTP/1.1 200 OK"]  # an IP upstream needs no thread
    assert seen["reloaded"], f"policy reload not applied within {ns.RELOAD_BOUND}s"
    assert seen["orders_after"] == ["HTTP/1.1 403 Forbidden"]
    assert seen["faults"] == []


def test_concurrent_lookups_of_a_name_share_one_query(seen: dict[str, Any]) -> None:
    # Two bursts of 30 calls at once to a listener whose name answers after 0.5 s: one
    # lookup, one query per record type (A, AAAA); the first burst joined it, the second
    # burst's new connections found the answer in the cache.
    assert set(seen["late_calls"]) == {"HTTP/1.1 200 OK"}
    assert set(seen["late_calls_again"]) == {"HTTP/1.1 200 OK"}
    assert seen["late_queries"] == {f"{ns.LATE_NAME}/1": 1, f"{ns.LATE_NAME}/28": 1}
    assert seen["metrics"]["resolved"] >= 1
    assert seen["metrics"]["cached"] >= 1


def test_hung_names_are_asked_once_each(seen: dict[str, Any]) -> None:
    # 45 calls over 10 names that never answer: at most one query per name and type, and only
    # for the names that got one of the 8 resolver threads.
    queries = seen["hang_queries"]
    assert queries and max(queries.values()) == 1, queries
    assert len({key.split("/")[0] for key in queries}) == 8, queries


def test_no_thread_left_lookups_fail_fast_and_are_counted(seen: dict[str, Any]) -> None:
    # 10 hung names, 8 threads: the other 2 names fail after the bounded wait (busy), the
    # calls waiting on hung lookups give up at connect_timeout (abandoned), and the gauge
    # shows the 8 threads still waiting for DNS.
    metrics = seen["metrics"]
    assert metrics["busy"] >= 1, metrics
    assert metrics["abandoned"] >= 1, metrics
    assert seen["in_flight"] == 8
    assert seen["saturated_logs"] == 1


def test_every_lookup_result_is_documented() -> None:
    docs = (ROOT / "docs" / "metrics.md").read_text()
    row = next(line for line in docs.splitlines() if "`sidecar_dns_lookups_total`" in line)
    for result in RESULTS:
        assert f"`{result}`" in row, result
