"""Start ``python -m sidecar ...`` processes by forking a warm interpreter (test speed only).

The suite starts a few thousand ``python -m sidecar`` processes; each paid about 0.2-0.5 s of
CPU to start the interpreter and import trio, cryptography, PyYAML and the package before it
did anything, and the suite is bound by CPU on two cores (README "Development"). Here one
process per test worker (the *zygote*) imports them once; each command is then a ``fork`` of
it that runs ``sidecar/__main__.py`` as ``python -m sidecar`` would (``runpy``, the same
``sys.argv``, exit status, standard streams, working directory and environment), in a process
of its own with its own pid -- a real process, started another way.

What differs from ``python -m sidecar``, so what the suite still starts by ``exec``: the
interpreter's command line (``/proc/PID/cmdline`` is the zygote's) and options read at
interpreter start (``PYTHON*`` variables other than ``PYTHONUNBUFFERED``: a job whose
environment sets them otherwise than the zygote's is exec'd). Tests that check the process
boundary itself (``tests/test_cli_imports.py``, signals, workers) start their processes with
``subprocess`` as before, and ``SIDECAR_TEST_EXEC=1`` makes every command exec'd.

Protocol: a ``SOCK_SEQPACKET`` socket pair. The worker sends one JSON message per job with
three descriptors (its standard input, output and error); the zygote answers ``{"id": N,
"pid": P}`` when it forked and ``{"id": N, "status": S}`` when the process ended (S as
``Popen.returncode``: the exit status, or minus the signal).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The zygote: imports what the commands import, then forks one child per job.
_ZYGOTE = r"""
import json, os, select, signal, socket, sys
fd = int(sys.argv[1])
chan = socket.socket(fileno=fd)
import sidecar.cli, sidecar.app
if sys.argv[2] == "cli":
    import sidecar.check, sidecar.audit.cli, sidecar.policy.cli, sidecar.k8s.cli
    import sidecar.replay, sidecar.tap, sidecar.live
else:  # what ``sidecar run`` imports only once it runs
    import h11, sidecar.admin, sidecar.ctlhttp.client, sidecar.ctlhttp.server
    import sidecar.identity.bundle, sidecar.audit.writer, sidecar.alert_poster
    import cryptography.hazmat.backends.openssl.backend
import runpy, atexit, traceback, threading, gc
# What the zygote holds now lives as long as each child: out of the collector's view, so
# that a child's collections -- ``sidecar run`` makes a full one when it starts listening --
# do not walk it (and do not write to its pages, which the fork shares).
gc.collect()
gc.freeze()
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)
jobs = {}

def send(obj):
    chan.sendall(json.dumps(obj).encode())

def child(job, fds):
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    chan.close()
    os.close(wake_r)
    os.close(wake_w)
    for target, f in enumerate(fds):
        os.dup2(f, target)
    for f in fds:
        if f > 2:
            os.close(f)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = [os.path.join(os.path.dirname(sidecar.cli.__file__), "__main__.py"), *job["argv"]]
    code = 0
    try:
        if job.get("code") is not None:  # ``python -c CODE ARGV``
            sys.argv = ["-c", *job["argv"]]
            exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__"})
        else:
            runpy.run_module("sidecar", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = None
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    if code is None:  # (as the interpreter ends on an uncaught KeyboardInterrupt)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)

while True:
    ready, _, _ = select.select([chan, wake_r], [], [])
    if wake_r in ready:
        os.read(wake_r, 4096)
    while jobs:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        send({"id": jobs.pop(pid), "status": os.waitstatus_to_exitcode(status)})
    if chan in ready:
        try:
            data, fds, _flags, _addr = socket.recv_fds(chan, 1 << 20, 3)
        except OSError:
            data = b""
        if not data:
            for pid in jobs:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(0)
        job = json.loads(data)
        pid = os.fork()
        if pid == 0:
            child(job, fds)
        for f in fds:
            os.close(f)
        jobs[pid] = job["id"]
        send({"id": job["id"], "pid": pid})
"""

# ``PYTHON*`` variables read when an interpreter starts: a job that sets them otherwise than
# the zygote's environment is exec'd (PYTHONUNBUFFERED: the zygote's streams are unbuffered,
# which a buffered command's output does not tell apart once it has ended).
_START_VARIABLES_IGNORED = {"PYTHONUNBUFFERED"}


def _start_variables(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k.startswith("PYTHON") and k not in _START_VARIABLES_IGNORED}


class ForkedProcess:
    """The part of ``subprocess.Popen`` the harness uses, for a process the zygote forked."""

    def __init__(self, server: _Zygote, job: int) -> None:
        self._server = server
        self._job = job
        self._ended = threading.Event()
        self.returncode: int | None = None
        self.pid = 0
        self.args: list[str] = []

    def _end(self, status: int) -> None:
        self.returncode = status
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Zygote:
    def __init__(self, kind: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(os.devnull, "rb") as null_in, open(os.devnull, "wb") as null_out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE, str(theirs.fileno()), kind], stdin=null_in,
                stdout=null_out, stderr=null_out, pass_fds=(theirs.fileno(),),
                cwd=str(ROOT), env=self.env)
        theirs.close()
        self.chan = ours
        self.lock = threading.Lock()
        self.next_id = 0
        self.waiting: dict[int, ForkedProcess] = {}
        self.started: dict[int, threading.Event] = {}
        self.reader = threading.Thread(target=self._read, name="forkserver", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.chan.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                with self.lock:
                    for proc in list(self.waiting.values()):
                        if proc.returncode is None:
                            proc._end(-signal.SIGKILL)
                    for event in self.started.values():
                        event.set()
                return
            msg = json.loads(data)
            with self.lock:
                proc = self.waiting.get(msg["id"])
                if proc is None:
                    continue
                if "pid" in msg:
                    proc.pid = msg["pid"]
                    self.started.pop(msg["id"]).set()
                else:
                    del self.waiting[msg["id"]]
                    proc._end(msg["status"])

    def start(self, argv: list[str], env: dict[str, str], cwd: str,
              fds: tuple[int, int, int], code: str | None = None) -> ForkedProcess | None:
        with self.lock:
            if self.proc.poll() is not None:
                return None
            self.next_id += 1
            job = self.next_id
            proc = ForkedProcess(self, job)
            proc.args = ([sys.executable, "-c", code, *argv] if code is not None
                         else [sys.executable, "-m", "sidecar", *argv])
            started = threading.Event()
            self.waiting[job] = proc
            self.started[job] = started
            socket.send_fds(self.chan, [json.dumps({"id": job, "argv": argv, "env": env,
                                                    "cwd": cwd, "code": code}).encode()],
                            list(fds))
        if not started.wait(60) or proc.pid == 0:
            raise RuntimeError("the fork server did not start the process")
        return proc

    def stop(self) -> None:
        self.chan.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# Two zygotes per worker: one for ``sidecar run`` (it imports what a sidecar imports, so a
# sidecar's memory is what it would be exec'd), one for the other commands (the CLI's
# modules too).
_zygotes: dict[str, _Zygote] = {}
_zygote_lock = threading.Lock()


def _server(kind: str) -> _Zygote | None:
    if os.environ.get("SIDECAR_TEST_EXEC") == "1":
        return None
    with _zygote_lock:
        zygote = _zygotes.get(kind)
        if zygote is None or zygote.proc.poll() is not None:
            zygote = _zygotes[kind] = _Zygote(kind)
            atexit.register(zygote.stop)
        return zygote


def start(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
          stdin: int | None = None, stdout: int, stderr: int,
          code: str | None = None) -> ForkedProcess | None:
    """Fork ``python -m sidecar ARGV`` (with ``code``: ``python -c CODE ARGV``, in the
    zygote that has imported the CLI's modules) with these descriptors (``stdin`` None:
    /dev/null), environment (default: this process's) and working directory (default: the
    project's); None when it must be exec'd instead (see the module docstring)."""
    server = _server("run" if argv[:1] == ["run"] and code is None else "cli")
    if server is None:
        return None
    env = dict(os.environ if env is None else env)
    if _start_variables(env) != _start_variables(server.env):
        return None
    null = None
    if stdin is None:
        null = os.open(os.devnull, os.O_RDONLY)
        stdin = null
    try:
        return server.start([str(a) for a in argv], env, cwd or str(ROOT),
                            (stdin, stdout, stderr), code)
    finally:
        if null is not None:
            os.close(null)


def run(argv: list[str], *, timeout: float, cwd: str | None = None,
        input_text: str | None = None,
        code: str | None = None) -> subprocess.CompletedProcess[str] | None:
    """``subprocess.run([python, -m, sidecar, *argv], capture_output=True, text=True)`` (with
    ``code``: ``[python, -c, code, *argv]``) by a fork (None: exec it instead). Output is
    read as ``text=True`` reads it (the locale's encoding, universal newlines)."""
    import io
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryFile() as inp:
        if input_text is not None:
            inp.write(input_text.encode())
            inp.seek(0)
        proc = start(argv, cwd=cwd, stdin=inp.fileno() if input_text is not None else None,
                     stdout=out.fileno(), stderr=err.fileno(), code=code)
        if proc is None:
            return None
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            raise
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(io.TextIOWrapper(f, newline=None).read())
        return subprocess.CompletedProcess(proc.args, status, texts[0], texts[1])
