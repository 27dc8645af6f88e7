"""`workers: N`: the first process supervises the others.

A hostile review (session 29) found that with ``workers: 2`` a worker that died (SIGKILL; the
OOM killer or a crash alike) was neither restarted nor reported: it stayed a zombie, no log
line named it, ``/readyz`` stayed 200 and the pod served on at half its capacity. Only the
other direction (the first process dies -> its workers get SIGTERM) was handled.

Now the first process looks at its workers once a second: an exited worker is reaped, logged
(``worker_exited``), counted (``sidecar_worker_exits_total``) and started again with the same
sockets after a backoff (1 s doubling to 30 s), ``/readyz`` says ``workers_not_running``
until the new one listens, and nothing is started while the sidecar drains.

Families (as data): every way a worker dies (``DEATHS``), on one module sidecar with an
inbound and an outbound listener; every way a worker keeps dying (``KEEPS_DYING``), each on a
sidecar of its own (the backoff is per sidecar); and a worker that dies while the first process
drains.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.audit.segments import iter_records
from tests.harness import (
    Pki,
    Proc,
    ScriptedServer,
    SidecarProc,
    free_port,
    http,
    metric_value,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.test_workers import _children

OUTBOUND = "self-call"
REQUESTS = 40  # per listener, each on a new connection: the kernel spreads them
# Each way a worker ends, and what ``worker_exited`` says of it: (field, value).
DEATHS: dict[str, tuple[int, tuple[str, object]]] = {
    "SIGKILL (OOM killer)": (signal.SIGKILL, ("signal", "SIGKILL")),
    "SIGTERM (drains, exits 0)": (signal.SIGTERM, ("exit_code", 0)),
    "SIGABRT (a crash)": (signal.SIGABRT, ("signal", "SIGABRT")),
    "SIGSEGV (a crash)": (signal.SIGSEGV, ("signal", "SIGSEGV")),
}


def _readyz(sidecar: SidecarProc) -> tuple[int, str]:
    try:
        resp = http(sidecar.port("admin"), "GET", "/readyz", timeout=2)
    except OSError as exc:
        return 0, repr(exc)
    return resp.status, resp.body.decode(errors="replace")


def _live_children(pid: int) -> list[int]:
    """The children of ``pid`` that are not zombies."""
    live = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.append(child)
    return live


def _served(audit: Path, worker: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in iter_records(str(audit / f"worker-{worker}")):
        if record.event == "request":
            counts[record.direction] = counts.get(record.direction, 0) + 1
    return counts


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def _two_workers(tmp: Path, app_port: int, **extra: Any) -> tuple[SidecarProc, Path, Pki]:
    pki = Pki(tmp / "pki")
    audit = tmp / "audit"
    inbound_port = free_port()
    cfg = sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{inbound_port}", "app": f"127.0.0.1:{app_port}",
        "allow_from": [spiffe("frontend"), spiffe("orders")]},
        outbound=[{"name": OUTBOUND, "listen": f"127.0.0.1:{free_port()}",
                   "upstream": f"127.0.0.1:{inbound_port}", "identity": spiffe("orders")}],
        audit={"path": str(audit)}, workers=2, **extra)
    sidecar = start_sidecar(tmp, "orders", cfg)  # (ready: every worker listens)
    wait_for(lambda: len(_live_children(sidecar.pid)) == 1, timeout=20)
    return sidecar, audit, pki


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("worker-supervision")
    app_proc, app_port = start_app(tmp)
    started: list[Proc] = [app_proc]
    try:
        sidecar, audit, pki = _two_workers(tmp, app_port)
        started.append(sidecar)
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        yield {"sidecar": sidecar, "audit": audit, "ctx": ctx, "deaths": 0}
    finally:
        for proc in reversed(started):
            proc.stop(timeout=30)


@pytest.mark.parametrize("death", sorted(DEATHS))
def test_a_worker_that_dies_is_reaped_logged_and_restarted(mesh: dict[str, Any],
                                                           death: str) -> None:
    sidecar: SidecarProc = mesh["sidecar"]
    sig, (field, value) = DEATHS[death]
    wait_for(lambda: _readyz(sidecar)[0] == 200, timeout=40)
    (worker,) = _live_children(sidecar.pid)
    before = _served(mesh["audit"], 1)
    os.kill(worker, sig)
    mesh["deaths"] += 1

    # Not ready, and says why, until a worker listens in its place.
    status, body = wait_for(lambda: (r := _readyz(sidecar))[0] == 503 and r, timeout=20)
    assert "workers_not_running" in body, body
    exited = wait_for(lambda: [e for e in sidecar.log_events("worker_exited")
                               if e.get("pid") == worker], timeout=20)
    assert len(exited) == 1, exited
    assert exited[0]["level"] == "error" and exited[0]["worker"] == 1, exited
    assert exited[0][field] == value, exited
    metrics = http(sidecar.port("admin"), "GET", "/metrics").body.decode()
    assert metric_value(metrics, "sidecar_worker_exits_total", worker="1") == mesh["deaths"]

    wait_for(lambda: _readyz(sidecar)[0] == 200, timeout=40)
    (new,) = _live_children(sidecar.pid)
    assert new != worker
    assert worker not in _children(sidecar.pid)  # reaped: no zombie left
    restarted = [e for e in sidecar.log_events("worker_restarted") if e.get("pid") == new]
    assert len(restarted) == 1 and restarted[0]["worker"] == 1, restarted

    # The new worker serves on both inherited listeners.
    for i in range(REQUESTS):
        assert http(sidecar.port("inbound"), "GET", f"/direct/{i}",
                    ctx=mesh["ctx"]).status == 200
        assert http(sidecar.port(OUTBOUND), "GET", f"/via-outbound/{i}").status == 200

    def grew() -> dict[str, int] | None:
        now = _served(mesh["audit"], 1)
        ok = all(now.get(d, 0) > before.get(d, 0) for d in ("inbound", "outbound"))
        return now if ok else None

    wait_for(grew, timeout=20)


def _break_config(sidecar: SidecarProc, tmp: Path) -> None:
    sidecar.cfg_path.write_text("identity: [this is not\n")


def _change_listeners(sidecar: SidecarProc, tmp: Path) -> None:
    cfg = dict(sidecar.cfg)
    cfg["outbound"] = [*cfg["outbound"], {**cfg["outbound"][0], "name": "another",
                                          "listen": f"127.0.0.1:{free_port()}"}]
    sidecar.cfg_path.write_text(yaml.safe_dump(cfg))


def _kill_each_start(sidecar: SidecarProc, tmp: Path) -> None:
    """A thread that SIGKILLs every worker as soon as it appears (stops with the sidecar)."""
    def kill() -> None:
        while sidecar.proc.poll() is None:
            for child in _live_children(sidecar.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except OSError:
                    pass
            threading.Event().wait(0.02)

    threading.Thread(target=kill, daemon=True).start()


# Each way a worker keeps dying: what the test does to the running sidecar.
KEEPS_DYING: dict[str, Callable[[SidecarProc, Path], None]] = {
    "its config no longer parses": _break_config,
    "its config names other listeners": _change_listeners,
    "killed at every start": _kill_each_start,
}
EXITS = 3  # the first exit and two after restarts: backoffs 1, 2, 4 s


@pytest.mark.parametrize("how", sorted(KEEPS_DYING))
def test_a_worker_that_keeps_dying_backs_off(tmp_path: Path, how: str) -> None:
    app_proc, app_port = start_app(tmp_path)
    sidecar, _, _ = _two_workers(tmp_path, app_port)
    try:
        (worker,) = _live_children(sidecar.pid)
        KEEPS_DYING[how](sidecar, tmp_path)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: _readyz(sidecar)[0] == 503, timeout=20)
        statuses: list[int] = []

        def exits() -> list[dict[str, Any]] | None:
            statuses.append(_readyz(sidecar)[0])
            found = sidecar.log_events("worker_exited")
            return found if len(found) >= EXITS else None

        exited = wait_for(exits, timeout=60)[:EXITS]
        restarted = sidecar.log_events("worker_restarted")
        # Each exit waits twice as long as the one before it, from 1 s.
        assert [e["restart_in_seconds"] for e in exited] == [1.0, 2.0, 4.0], exited
        # Counted, not timed: a restart comes no sooner than its backoff after its exit.
        for exit_event, restart in zip(exited, restarted, strict=False):
            assert _ts(restart) - _ts(exit_event) >= exit_event["restart_in_seconds"] - 0.01
        assert len(restarted) in (EXITS - 1, EXITS), (exited, restarted)
        # A worker that never listens never counts: /readyz did not turn 200 in between.
        assert 200 not in statuses, statuses
        assert _readyz(sidecar)[0] == 503
    finally:
        sidecar.stop(timeout=30)
        app_proc.stop(timeout=30)
    assert sidecar.proc.returncode == 0


class HoldingApp(ScriptedServer):
    """An app that answers no request until ``release``: keeps the sidecar's drain open."""

    timeout = 60.0

    def __init__(self) -> None:
        self.release = threading.Event()
        self.held = 0
        self.lock = threading.Lock()
        super().__init__()

    def answer(self, sock: socket.socket, head: bytes) -> None:
        with self.lock:
            self.held += 1
        self.release.wait(60)
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")


def _connected_to(pid: int, port: int) -> bool:
    """Whether ``pid`` holds an established TCP connection to 127.0.0.1:``port``."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(int(target[len("socket:["):-1]))
    with open("/proc/net/tcp") as fh:
        for row in fh.read().splitlines()[1:]:
            fields = row.split()
            if (fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port
                    and int(fields[9]) in held):
                return True
    return False


def test_a_worker_that_dies_while_the_first_process_drains_is_not_restarted(
        tmp_path: Path) -> None:
    app = HoldingApp()
    sidecar, _, pki = _two_workers(tmp_path, app.port, limits={"drain_timeout": "30s"})
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    senders: list[threading.Thread] = []
    try:
        (worker,) = _live_children(sidecar.pid)

        def send(i: int) -> None:
            try:
                http(sidecar.port("inbound"), "GET", f"/held/{i}", ctx=ctx, timeout=60)
            except OSError:
                pass

        # Requests in flight until the first process holds one (its drain then waits).
        for i in range(40):
            senders.append(threading.Thread(target=send, args=(i,), daemon=True))
            senders[-1].start()
            try:
                wait_for(lambda: _connected_to(sidecar.pid, app.port), timeout=2)
                break
            except TimeoutError:  # (worker 1 took it: one more)
                continue
        assert _connected_to(sidecar.pid, app.port)
        sidecar.signal(signal.SIGTERM)
        wait_for(lambda: sidecar.log_events("draining"), timeout=20)
        os.kill(worker, signal.SIGKILL)
        exited = wait_for(lambda: [e for e in sidecar.log_events("worker_exited")
                                   if e.get("pid") == worker], timeout=20)
        assert exited[0]["restart_in_seconds"] is None, exited
        # Well past the backoff (1 s) and a look (1 s): nothing was started.
        threading.Event().wait(3)
        assert sidecar.proc.poll() is None  # (still draining)
        assert _live_children(sidecar.pid) == []
        assert sidecar.log_events("worker_restarted") == []
        app.release.set()
        assert sidecar.proc.wait(timeout=40) == 0
        assert sidecar.log_events("worker_restarted") == []
    finally:
        app.release.set()
        sidecar.stop(timeout=30)
        app.close()
        for sender in senders:
            sender.join(timeout=10)


def test_sigterm_to_the_first_process_stops_every_worker_and_starts_none(
        tmp_path: Path) -> None:
    app_proc, app_port = start_app(tmp_path)
    sidecar, _, _ = _two_workers(tmp_path, app_port)
    try:
        (worker,) = _live_children(sidecar.pid)
        sidecar.signal(signal.SIGTERM)
        assert sidecar.proc.wait(timeout=40) == 0
        assert not os.path.exists(f"/proc/{worker}")
        assert sidecar.log_events("worker_restarted") == []
        assert sidecar.log_events("worker_exited") == []  # (stopped, not exited by itself)
    finally:
        sidecar.stop(timeout=30)
        app_proc.stop(timeout=30)
