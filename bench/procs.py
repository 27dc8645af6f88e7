"""Processes the benchmark starts, and what /proc says about them.

Theory of operation: every child goes through ``ProcessGroup.start`` which records it; the
group stops its children by pid (SIGTERM, then SIGKILL after a bounded wait) from ``close()``,
which ``run.py`` calls in a ``finally`` and also registers with ``atexit`` so Ctrl-C or an
exception anywhere still cleans up. Children are started in their own session so a Ctrl-C in the
terminal reaches only the harness, which then stops them in order. Nothing is ever killed by
name.

CPU time is read from ``/proc/<pid>/stat`` (utime + stime, in clock ticks, which already cover
every thread of the process) for the process and all its descendants (nginx's workers, the
sidecar's ``workers: N`` processes); peak RSS is ``VmHWM`` from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE_S = 5.0
READY_TIMEOUT_S = 20.0


_HANDED_OUT: deque[int] = deque(maxlen=256)  # this process's recent picks


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind to port 0, read it, close) and
    not among this process's recent picks: a port bound and closed again can be handed out
    twice before its first taker listens on it."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port
    raise OSError("no free port on 127.0.0.1")


def wait_for_port(port: int, timeout: float = READY_TIMEOUT_S,
                  proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port (bounded in time).

    Raises RuntimeError if the time runs out or ``proc`` exits first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before "
                               f"listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


def children_of(pid: int) -> list[int]:
    """Every descendant pid of ``pid`` (from /proc/*/stat parent links), at this instant."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(b")") + 2:].split()
        parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier and len(found) < 10_000:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    fields = raw[raw.rfind(b")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def stop_on_sigterm() -> None:
    """Make SIGTERM act as Ctrl-C in a bench script: ``KeyboardInterrupt``, so its ``finally``
    stops every process it started by pid (the default action would end the script at once
    and leave its children, which run in their own sessions, running)."""
    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of one process, summed by thread name: ``main`` for its
    first thread, else the name the kernel knows (``/proc/PID/task/TID/comm``: the
    sidecar's audit writer thread is ``sidecar-audit``). Read from ``schedstat``
    (nanoseconds; ``stat``'s utime + stime count 10 ms ticks, too coarse for one thread in a
    burst of a few seconds), else from ``stat``; empty if the process is gone."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                name = "main" if tid == str(pid) else f.read().strip()
            try:
                with open(f"{base}/schedstat") as f:
                    spent = int(f.read().split()[0]) / 1e9
            except (OSError, IndexError, ValueError):
                with open(f"{base}/stat", "rb") as f:
                    raw = f.read()
                fields = raw[raw.rfind(b")") + 2:].split()
                spent = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            continue  # the thread ended between the listing and the read
        out[name] = out.get(name, 0.0) + spent
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` plus all its live descendants."""
    return sum(cpu_seconds(p) for p in [pid, *children_of(pid)])


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (peak resident set size) of one process, in bytes; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """VmRSS (current resident set size) of one process, in bytes; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_peak_rss_bytes(pid: int) -> int:
    """The largest VmHWM among ``pid`` and its descendants (per-process peak, not a sum)."""
    return max(peak_rss_bytes(p) for p in [pid, *children_of(pid)])


@dataclass
class Started:
    """One process the benchmark started."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, max_bytes: int = 2000) -> str:
        """The end of the process's combined stdout/stderr log, for error messages."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


class ProcessGroup:
    """Owns every process the benchmark starts; ``close()`` stops them all by pid."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.started: list[Started] = []
        self._closed = False
        atexit.register(self.close)

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: str | None = None) -> Started:
        """Start ``argv`` with output to ``<log_dir>/<name>.log`` and remember it."""
        log_path = os.path.join(self.log_dir, f"{name}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                    start_new_session=True)
        started = Started(name, proc, log_path)
        self.started.append(started)
        return started

    def stop(self, started: Started) -> None:
        """Stop one process (and its descendants) by pid: SIGTERM, bounded wait, SIGKILL."""
        if started.proc.poll() is None:
            descendants = children_of(started.pid)
            _signal(started.pid, signal.SIGTERM)
            try:
                started.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal(started.pid, signal.SIGKILL)
                started.proc.wait(timeout=STOP_GRACE_S)
            # Workers normally exit with their parent; any straggler is stopped by its pid.
            for pid in descendants:
                _signal(pid, signal.SIGKILL)
        if started in self.started:
            self.started.remove(started)

    def close(self) -> None:
        """Stop every process still running, newest first. Safe to call more than once."""
        for started in reversed(list(self.started)):
            try:
                self.stop(started)
            except Exception:  # noqa: BLE001 - cleanup must go on for the others
                pass
        self._closed = True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def close_workdir(group: ProcessGroup, workdir: str, keep: bool,
                  say: Callable[[str], None]) -> None:
    """End of a bench run (``run.py``, ``paired.py``): stop every process of ``group`` by its
    pid, then remove ``workdir`` unless ``keep`` (``--keep``), saying where it is kept."""
    group.close()
    if keep:
        say(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
