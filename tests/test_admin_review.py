"""The admin and health ports under a hostile review, through a real sidecar on 127.0.0.1.

Found by the review (each test fails on the code before its fix):

* A request head sent too slowly (slowloris) was closed at the head timeout without a word,
  though docs/operations.md lists 408 among the admin port's answers: now ``408`` and closed,
  on both ports, for every way a head can be cut; a connection that sent nothing (or an
  idle keep-alive one) is still closed silently.
* Every local client of a loopback admin port is one source (127.0.0.1): one scraper
  holding that source's share made every other local connection, the liveness and
  readiness probes too, be closed unserved. A reserve of connections beyond the limits now
  answers /healthz and /readyz (and nothing else: 429) while the shares are taken.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness import (
    Pki,
    SidecarProc,
    free_port,
    http,
    metric_value,
    raw,
    read_head,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)

ADMIN_HEAD_TIMEOUT = 10.0  # sidecar.ctlhttp.server.ServerLimits.head_timeout (admin)
HEALTH_HEAD_TIMEOUT = 2.0  # sidecar.admin.HEALTH_LIMITS
SHARE = 4  # admin.max_connections_per_source in this test's config


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProc]:
    tmp = tmp_path_factory.mktemp("admin-review")
    pki = Pki(tmp / "pki")
    with contextlib.ExitStack() as stack:
        app, app_port = start_app(tmp)
        stack.callback(app.stop)
        cfg = sidecar_config(pki.identity("orders"),
                             inbound={"listen": f"127.0.0.1:{free_port()}",
                                      "app": f"127.0.0.1:{app_port}",
                                      "allow_from": [spiffe("frontend")]})
        cfg["admin"]["health_listen"] = f"127.0.0.1:{free_port()}"
        cfg["admin"]["max_connections_per_source"] = SHARE
        proc = start_sidecar(tmp, "admin-review", cfg)
        stack.callback(proc.stop, timeout=10)
        yield proc


def _port(proc: SidecarProc, which: str) -> int:
    key = "listen" if which == "admin" else "health_listen"
    return int(proc.cfg["admin"][key].rsplit(":", 1)[1])


# --- slow heads: 408 ------------------------------------------------------------------------

# How the head is cut: the bytes sent at once (a whole first request, for the keep-alive
# member), then the bytes dripped one at a time, never finishing the head.
SLOW_HEADS: dict[str, tuple[bytes, bytes]] = {
    "in the method": (b"", b"GE"),
    "in the target": (b"", b"GET /heal"),
    "in the version": (b"", b"GET /healthz HTT"),
    "after the request line": (b"", b"GET /healthz HTTP/1.1\r\n"),
    "in a field": (b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaa"),
    "before the blank line": (b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
    "a second request on a kept-alive connection": (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"GET /readyz HTTP/1.1\r\nHost"),
}


def _read_answer(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length body (bounded by read_head and the length)."""
    data = read_head(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _drip(port: int, first: bytes, drip: bytes, budget: float, out: dict[str, object],
          name: str, source: str) -> None:
    """Send ``first``, then ``drip`` one byte every 0.25 s (bounded by ``budget``) until the
    server answers or closes; record what came back after the first answer and when."""
    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=budget,
                                    source_address=(source, 0))
    try:
        if first:
            sock.sendall(first)
            _read_answer(sock)
        sock.settimeout(0.25)
        got = b""
        for byte in (drip[i:i + 1] for i in range(len(drip))):
            if time.monotonic() - start > budget:
                break
            with contextlib.suppress(OSError):
                sock.sendall(byte)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            got += chunk
            break
        # The drip ended (or an answer began): read until the server closes, bounded.
        deadline = start + budget
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        out[name] = (got, time.monotonic() - start)
    finally:
        sock.close()


@pytest.mark.parametrize("which,timeout", [("admin", ADMIN_HEAD_TIMEOUT),
                                           ("health", HEALTH_HEAD_TIMEOUT)])
def test_a_slow_head_is_answered_408_and_closed(sidecar: SidecarProc, which: str,
                                                 timeout: float) -> None:
    port = _port(sidecar, which)
    results: dict[str, object] = {}
    budget = timeout + 4.0
    # Padded so that no drip ends before the head timeout (4 bytes a second at most); the
    # padding keeps the head unfinished (no line end), so it is never malformed either.
    members = {name: (first, drip + b"x" * int(timeout * 8))
               for name, (first, drip) in SLOW_HEADS.items()}
    # Each from its own address: within its share, so the full head timeout applies.
    threads = [threading.Thread(target=_drip, args=(port, first, drip, budget, results, name,
                                                    f"127.0.0.{10 + i}"))
               for i, (name, (first, drip)) in enumerate(members.items())]
    # A connection that never sends a byte: closed silently, no answer to no request.
    threads.append(threading.Thread(target=_drip, args=(port, b"", b"", budget, results,
                                                        "silent", "127.0.0.9")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(budget + 5)
    assert not any(t.is_alive() for t in threads)
    for name in SLOW_HEADS:
        got, took = results[name]  # type: ignore[misc]
        if which == "health" and SLOW_HEADS[name][0]:
            assert got == b"", name  # no keep-alive there: closed after the first answer
            continue
        assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), (name, got[:80])
        head, _, body = got.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower(), name
        assert body == b"request timeout\n", (name, body)  # generic, nothing else
        assert timeout - 0.5 <= took <= timeout + 3.0, (name, took)
    got, took = results["silent"]  # type: ignore[misc]
    assert got == b"" and took <= timeout + 3.0


# --- the probe reserve --------------------------------------------------------------------


@contextlib.contextmanager
def _held(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections from 127.0.0.1 to ``port`` that send nothing, held open."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(s)
        yield held
    finally:
        for s in held:
            s.close()


def _keep_alive_share(port: int, count: int) -> list[socket.socket]:
    """``count`` keep-alive connections that each got one answer (a scraper's pool)."""
    out = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _read_answer(s).startswith(b"HTTP/1.1 200")
        out.append(s)
    return out


PROBES = {"/healthz": 200, "/readyz": 200, "/healthz?verbose=1": 200}
NOT_PROBES = ["/metrics", "/config", "/policy", "/tap", "/audit/head", "//healthz",
              "/healthz/", "/nope"]


@pytest.mark.parametrize("which", ["admin", "health"])
@pytest.mark.parametrize("holders", ["silent", "keep-alive"])
def test_probes_are_answered_while_the_local_share_is_taken(sidecar: SidecarProc, which: str,
                                                            holders: str) -> None:
    port = _port(sidecar, which)
    before = _refused(sidecar, which)
    time.sleep(0.3)  # the connections closed before (metrics, readiness) have left the share
    with contextlib.ExitStack() as stack:
        if holders == "silent" or which == "health":  # the health port has no keep-alive
            stack.enter_context(_held(port, SHARE))
        else:
            for s in _keep_alive_share(port, SHARE):
                stack.callback(s.close)
        # The share is taken: a page that is no probe is refused.
        assert http(port, "GET", "/metrics", timeout=5).status == 429
        for path, status in PROBES.items():
            for method in ("GET", "HEAD"):
                resp = http(port, method, path, timeout=5)
                assert resp.status == status, (path, method)
                assert resp.headers.get("connection") == "close"
        for path in NOT_PROBES:
            resp = http(port, "GET", path, timeout=5)
            assert resp.status == 429, path
            assert resp.body == b"too many requests\n"  # never the page
        # The reserve full of silent connections: the newest still gets its probe.
        with _held(port, 12):
            assert http(port, "GET", "/readyz", timeout=5).status == 200
    # Every reserve connection that asked for no probe is counted as a refusal.
    wait_for(lambda: _refused(sidecar, which) >= before + len(NOT_PROBES), timeout=10)


def _refused(proc: SidecarProc, which: str) -> float:
    """The refusals counted for ``which``, read once the share is free again (until the
    server has seen the held connections close, /metrics is itself a 429 from the reserve)."""
    resp = wait_for(lambda: (r := http(proc.port("admin"), "GET", "/metrics", timeout=5))
                    .status == 200 and r, timeout=10)
    return metric_value(resp.body.decode(), "sidecar_connections_refused_total",
                        listener=which, reason="max_connections_per_source")


# --- HTTP versions ----------------------------------------------------------------------------

# h11 reads any "HTTP/d.d" as HTTP/1.1: "HTTP/2.0" was answered 200 on both ports.
BAD_VERSIONS = ["HTTP/0.9", "HTTP/1.2", "HTTP/1.9", "HTTP/2.0", "HTTP/3.0", "HTTP/9.9"]


@pytest.mark.parametrize("which", ["admin", "health"])
def test_only_http_1_0_and_1_1_are_answered(sidecar: SidecarProc, which: str) -> None:
    port = _port(sidecar, which)
    for version in BAD_VERSIONS:
        got = raw(port, f"GET /healthz {version}\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (version, got[:60])
        assert got.endswith(b"\r\n\r\nbad request\n"), version
    for version in ("HTTP/1.0", "HTTP/1.1"):  # the control
        got = raw(port, f"GET /healthz {version}\r\nHost: 127.0.0.1\r\n"
                        "Connection: close\r\n\r\n".encode())
        assert got.startswith(b"HTTP/1.1 200 OK\r\n"), version


# --- Host on the loopback admin port (DNS rebinding) ------------------------------------------

# A page on evil.example whose name is re-pointed at 127.0.0.1 sends its own name as Host:
# before, the admin port answered it /config, /policy and /tap (live requests) in a browser.
FOREIGN_HOSTS = ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}",
                 "localhost.evil.example", "EVIL.EXAMPLE.", "xn--80ak6aa92e.com",
                 "0x7f000001", "2130706433", "127.1", "256.0.0.1", "127.0.0.1:", "",
                 "127.0.0.1:{port}x", "local host", "a..localhost", "[::1"]
LOCAL_HOSTS = ["127.0.0.1", "127.0.0.1:{port}", "localhost", "LocalHost:{port}", "localhost.",
               "[::1]", "[::1]:{port}", "metrics.localhost:{port}", "10.1.2.3:{port}"]
ADMIN_PAGES = ["/config", "/policy", "/tap", "/metrics", "/readyz", "/healthz"]


def test_the_loopback_admin_port_answers_local_hosts_only(sidecar: SidecarProc) -> None:
    port = _port(sidecar, "admin")
    for host in FOREIGN_HOSTS:
        value = host.format(port=port)
        for path in ADMIN_PAGES:
            got = raw(port, f"GET {path} HTTP/1.1\r\nHost: {value}\r\nConnection: close\r\n\r\n".encode())
            assert got.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"), (value, path,
                                                                             got[:60])
            assert got.endswith(b"\r\n\r\nmisdirected request\n"), (value, path)
    for host in LOCAL_HOSTS:
        value = host.format(port=port)
        for path in ("/config", "/healthz"):
            got = raw(port, f"GET {path} HTTP/1.1\r\nHost: {value}\r\nConnection: close\r\n\r\n".encode())
            assert got.startswith(b"HTTP/1.1 200 OK\r\n"), (value, path, got[:60])
    # HTTP/1.0 without a Host: a local tool, answered.
    assert raw(port, b"GET /config HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")


# --- Absolute-form targets (RFC 9112 3.2.2: a server MUST accept them) --------------------------

# Before the twenty-fourth session ``GET http://127.0.0.1:P/healthz`` was a path no route had
# (404). Now it is served as its path and query; its authority is the host asked for, so on
# the loopback admin port it must be local as Host must (both are checked); one without a
# host or with userinfo is refused 400.
ABSOLUTE_LOCAL = ["http://127.0.0.1:{port}{path}", "HTTP://localhost:{port}{path}",
                  "http://[::1]:{port}{path}", "https://127.0.0.1{path}",
                  "http://metrics.localhost{path}"]
ABSOLUTE_BAD = ["http://{path}", "http://user@127.0.0.1:{port}{path}",
                "http://evil.example@127.0.0.1{path}", "http://:@127.0.0.1{path}"]


@pytest.mark.parametrize("which", ["admin", "health"])
def test_absolute_form_targets_are_served_as_their_path(sidecar: SidecarProc,
                                                         which: str) -> None:
    port = _port(sidecar, which)
    wrong = []

    def expect(target: str, host: str, status: bytes, label: str | None = None) -> None:
        got = raw(port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n"
                        "Connection: close\r\n\r\n".encode())
        if not got.startswith(b"HTTP/1.1 " + status + b"\r\n"):
            wrong.append((label or target, got[:40]))

    for form in ABSOLUTE_LOCAL:
        expect(form.format(port=port, path="/healthz"), f"127.0.0.1:{port}", b"200 OK")
    # The query goes with the path; no path at all is "/".
    expect(f"http://127.0.0.1:{port}?x=1", "127.0.0.1", b"404 Not Found", "no path")
    for form in ABSOLUTE_BAD:
        expect(form.format(port=port, path="/healthz"), "127.0.0.1", b"400 Bad Request")
    assert not wrong, wrong


def test_an_absolute_form_authority_must_be_local_on_the_loopback_admin_port(
        sidecar: SidecarProc) -> None:
    port = _port(sidecar, "admin")
    wrong = []
    for host in FOREIGN_HOSTS:
        value = host.format(port=port)
        if not value or " " in value or "[" in value:
            continue  # (not an authority a target can carry: h11 refuses the line)
        for path in ("/config", "/healthz"):
            # A foreign authority with a local Host, and the other way round: 421 both.
            for target, hosthdr in ((f"http://{value}{path}", f"127.0.0.1:{port}"),
                                    (f"http://127.0.0.1:{port}{path}", value)):
                got = raw(port, f"GET {target} HTTP/1.1\r\nHost: {hosthdr}\r\n"
                                "Connection: close\r\n\r\n".encode())
                if not got.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"):
                    wrong.append((target, hosthdr, got[:40]))
    got = raw(port, f"GET http://localhost:{port}/config HTTP/1.1\r\nHost: localhost:{port}\r\n"
                    "Connection: close\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 200 OK\r\n"), got[:60]
    assert not wrong, wrong
