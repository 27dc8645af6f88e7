"""`workers: N`: the first process binds every listener once and the workers inherit it.

A hostile review (session 29) found that with ``workers`` > 1 each worker bound each
listener itself with SO_REUSEPORT, and Linux lets any socket of the same effective uid join
such a group: a root app container in the pod, after ``setuid(65532)`` (CAP_SETUID is a
default capability), took half of the sidecar's inbound mTLS connections, which the sidecar
never answered or recorded. Now the first process binds each listener without SO_REUSEPORT
before it starts the others and hands them the bound socket (``pass_fds`` and
``SIDECAR_LISTEN_FDS``), as nginx and gunicorn do.

For every listener of one real sidecar with ``workers: 2`` (an inbound and an outbound one,
shared by the module): a socket of the test's own uid (the sidecar's) can no longer bind its
port, with SO_REUSEPORT or without; the kernel lists one listening socket on the port, and
both worker processes hold that very socket; and every worker still serves (each one's audit
trail has requests of each listener).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.audit.segments import iter_records
from tests.harness import (
    ROOT,
    Pki,
    Proc,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.test_workers import _children

OUTBOUND = "self-call"
LISTENERS = ("inbound", OUTBOUND)
# The ways a process of the sidecar's uid might try to share a listener's port.
JOINS: dict[str, tuple[tuple[int, int], ...]] = {
    "SO_REUSEPORT": ((socket.SOL_SOCKET, socket.SO_REUSEPORT),),
    "SO_REUSEPORT and SO_REUSEADDR": ((socket.SOL_SOCKET, socket.SO_REUSEPORT),
                                      (socket.SOL_SOCKET, socket.SO_REUSEADDR)),
    "SO_REUSEADDR": ((socket.SOL_SOCKET, socket.SO_REUSEADDR),),
    "no option": (),
}
REQUESTS = 40  # per listener, each on a new connection




@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("workers-inherit")
    pki = Pki(tmp / "pki")
    app_proc, app_port = start_app(tmp)
    started: list[Proc] = [app_proc]
    try:
        audit = tmp / "audit"
        inbound_port = free_port()
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{inbound_port}", "app": f"127.0.0.1:{app_port}",
            "allow_from": [spiffe("frontend"), spiffe("orders")]},
            outbound=[{"name": OUTBOUND, "listen": f"127.0.0.1:{free_port()}",
                       "upstream": f"127.0.0.1:{inbound_port}", "identity": spiffe("orders")}],
            audit={"path": str(audit)}, workers=2)
        sidecar = start_sidecar(tmp, "orders", cfg)
        started.append(sidecar)
        wait_for(lambda: (audit / "worker-1").exists() and len(_children(sidecar.pid)) == 1,
                 timeout=20)
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        yield {"sidecar": sidecar, "audit": audit, "ctx": ctx, "tmp": tmp,
               "worker": _children(sidecar.pid)[0]}
    finally:
        for proc in reversed(started):
            proc.stop(timeout=30)


def _listening_inodes(port: int) -> list[int]:
    """The inodes of the sockets in LISTEN state on ``port`` (any address), from /proc."""
    inodes = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.append(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(int(target[len("socket:["):-1]))
    return held


@pytest.mark.parametrize("join", sorted(JOINS))
@pytest.mark.parametrize("listener", LISTENERS)
def test_a_socket_of_the_sidecars_uid_cannot_join_a_listener(mesh: dict[str, Any],
                                                              listener: str, join: str) -> None:
    """The test runs as the sidecar's uid: what the app container could do after setuid."""
    assert os.geteuid() == os.stat(f"/proc/{mesh['sidecar'].pid}").st_uid
    port = mesh["sidecar"].port(listener)
    joiner = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        for level, option in JOINS[join]:
            joiner.setsockopt(level, option, 1)
        with pytest.raises(OSError) as err:
            joiner.bind(("127.0.0.1", port))
            joiner.listen(16)
        assert err.value.errno == 98  # EADDRINUSE
    finally:
        joiner.close()


@pytest.mark.parametrize("listener", LISTENERS)
def test_both_workers_hold_the_one_listening_socket(mesh: dict[str, Any],
                                                    listener: str) -> None:
    (inode,) = _listening_inodes(mesh["sidecar"].port(listener))
    for pid in (mesh["sidecar"].pid, mesh["worker"]):
        assert inode in _socket_inodes(pid), pid


def test_every_worker_serves_every_listener(mesh: dict[str, Any]) -> None:
    sidecar: SidecarProc = mesh["sidecar"]
    for i in range(REQUESTS):  # a new connection each time: the kernel spreads them
        assert http(sidecar.port("inbound"), "GET", f"/direct/{i}",
                    ctx=mesh["ctx"]).status == 200
        assert http(sidecar.port(OUTBOUND), "GET", f"/via-outbound/{i}").status == 200

    def served() -> dict[tuple[int, str], int] | None:
        counts: dict[tuple[int, str], int] = {}
        for worker in (0, 1):
            for record in iter_records(str(mesh["audit"] / f"worker-{worker}")):
                if record.event == "request":
                    key = (worker, record.direction)
                    counts[key] = counts.get(key, 0) + 1
        inbound = sum(n for (_, d), n in counts.items() if d == "inbound")
        outbound = sum(n for (_, d), n in counts.items() if d == "outbound")
        return counts if inbound == 2 * REQUESTS and outbound == REQUESTS else None

    counts = wait_for(served, timeout=20)
    for worker in (0, 1):
        for direction in ("inbound", "outbound"):
            assert counts.get((worker, direction), 0) > 0, counts


def test_a_taken_port_still_stops_the_start(tmp_path: Path) -> None:
    """The first process binds before it starts a worker: a taken port ends the start with
    the address and listener named, exit 2, as before."""
    pki = Pki(tmp_path / "pki")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{port}", "app": f"127.0.0.1:{free_port()}",
            "allow_from": [spiffe("frontend")]}, workers=3)
        path = tmp_path / "orders.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(path)],
                                cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
            raise
        assert proc.returncode == 2, err
        assert f"cannot listen on 127.0.0.1:{port} (inbound)" in err, err
        assert "Traceback" not in err
    finally:
        taken.close()
