"""Admin and health servers over real sockets on 127.0.0.1, with a real status object."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from sidecar.admin import serve_admin, serve_health
from sidecar.admin_pages import AppProbe, app_probes_from_env, parse_app_probes
from sidecar.ctlhttp.server import ServerLimits
from sidecar.errors import ConfigError
from sidecar.metrics import SidecarMetrics
from tests.harness import ThrowawayCA, serve_trio


class SidecarStatus:
    """A real AdminStatus: the state app.py would hold, set directly by the tests."""

    def __init__(self) -> None:
        self.policy_loaded = False
        self.draining = False
        self.broken = False

    def ready(self) -> tuple[bool, list[str]]:
        if self.broken:
            raise RuntimeError("status provider broke")
        reasons = []
        if not self.policy_loaded:
            reasons.append("policy_not_loaded")
        if self.draining:
            reasons.append("draining")
        return not reasons, reasons

    def policy_status(self) -> dict[str, Any]:
        return {
            "version": "v7",
            "loaded_at": 1_700_000_000.0,
            "last_reload_error": None,
            "source": "/etc/sidecar/policy/mesh.yaml",
        }

    def effective_config(self) -> dict[str, Any]:
        return {"identity": {"key": "[redacted]"}, "admin": {"listen": "127.0.0.1:15000"}}


Response = tuple[int, dict[str, str], bytes]


async def fetch(port: int, path: str, method: str = "GET", headers: list[tuple[str, str]] | None = None) -> Response:
    """One request on a fresh connection, read with an h11 client."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        hdrs = [("host", "localhost"), ("connection", "close"), *(headers or [])]
        await stream.send_all(
            conn.send(h11.Request(method=method, target=path, headers=hdrs))
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        return await read_response(stream, conn)


async def read_response(stream: trio.abc.Stream, conn: h11.Connection) -> Response:
    status, got, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            got = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, got, body


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (bounded by the caller's timeout)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


async def start_admin(nursery: trio.Nursery, limits: ServerLimits) -> int:
    """An admin server with ``limits`` (a fresh status and metrics) on a free port; its port."""
    port: int = await nursery.start(
        lambda task_status: serve_admin(("127.0.0.1", 0), SidecarStatus(), SidecarMetrics(),
                                        limits=limits, task_status=task_status))
    return port


def run(test: Callable[[trio.Nursery], Awaitable[None]], timeout: float = 15) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                await test(nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_admin_endpoints() -> None:
    status = SidecarStatus()
    metrics = SidecarMetrics()
    metrics.requests_total.labels("inbound", "allow", "frontend-reads", "200").inc(3)

    async def test(nursery: trio.Nursery) -> None:
        port = await nursery.start(serve_admin, ("127.0.0.1", 0), status, metrics)
        assert port > 0

        code, _, body = await fetch(port, "/healthz")
        assert (code, body) == (200, b"ok\n")

        code, headers, body = await fetch(port, "/metrics")
        assert code == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert (
            b'sidecar_requests_total{direction="inbound",decision="allow",'
            b'rule="frontend-reads",status="200"} 3' in body
        )

        code, headers, body = await fetch(port, "/policy")
        assert code == 200 and headers["content-type"] == "application/json"
        assert json.loads(body)["version"] == "v7"
        assert headers["cache-control"] == "no-store"

        code, _, body = await fetch(port, "/config")
        assert json.loads(body)["identity"]["key"] == "[redacted]"

        code, _, body = await fetch(port, "/nope")
        assert (code, body) == (404, b"not found\n")
        code, _, _ = await fetch(port, "/healthz?x=1")
        assert code == 200

        code, headers, _ = await fetch(port, "/healthz", method="POST", headers=[("content-length", "0")])
        assert code == 405 and headers["allow"] == "GET, HEAD"
        code, _, _ = await fetch(port, "/metrics", method="DELETE")
        assert code == 405

        code, headers, body = await fetch(port, "/healthz", method="HEAD")
        assert code == 200 and body == b"" and headers["content-length"] == "3"

    run(test)


def test_readyz_flips_and_fails_closed() -> None:
    status = SidecarStatus()

    async def test(nursery: trio.Nursery) -> None:
        port = await nursery.start(serve_admin, ("127.0.0.1", 0), status, SidecarMetrics())
        code, _, body = await fetch(port, "/readyz")
        assert code == 503
        assert json.loads(body) == {"ready": False, "reasons": ["policy_not_loaded"]}
        status.policy_loaded = True
        code, _, body = await fetch(port, "/readyz")
        assert code == 200 and json.loads(body) == {"ready": True, "reasons": []}
        status.draining = True  # readiness goes false during drain
        code, _, body = await fetch(port, "/readyz")
        assert code == 503 and json.loads(body)["reasons"] == ["draining"]
        status.broken = True  # a status that raises means "not ready"
        code, _, body = await fetch(port, "/readyz")
        assert code == 503 and json.loads(body)["reasons"] == ["status_unavailable"]
        code, _, _ = await fetch(port, "/healthz")  # liveness is unaffected
        assert code == 200

    run(test)


def test_keep_alive_and_request_cap() -> None:
    async def test(nursery: trio.Nursery) -> None:
        limits = ServerLimits(max_requests_per_connection=3)
        port = await start_admin(nursery, limits)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for n in range(3):
                await stream.send_all(
                    conn.send(h11.Request(method="GET", target="/healthz",
                                          headers=[("host", "127.0.0.1")]))
                    + (conn.send(h11.EndOfMessage()) or b"")
                )
                code, got, body = await read_response(stream, conn)
                assert (code, body) == (200, b"ok\n")
                # The last answer the cap allows says that the connection ends with it (a
                # client that sent another request on it got a reset before).
                assert (got.get("connection") == "close") is (n == 2), (n, got)
                if n < 2:
                    conn.start_next_cycle()
            # The server closes after the cap: the next read sees EOF.
            assert await stream.receive_some(10) == b""

    run(test)


def test_bad_requests_get_generic_errors() -> None:
    async def test(nursery: trio.Nursery) -> None:
        port = await nursery.start(serve_admin, ("127.0.0.1", 0), SidecarStatus(), SidecarMetrics())
        out = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431 ") and out.endswith(b"request header fields too large\n")
        # Heads between the 8 KiB limit and twice it: two reads of the whole limit each made
        # one of them, which h11 never saw incomplete (found by a hostile review: up to 16 KiB
        # was served). Each is refused; one just under the limit is served.
        for size in (8_300, 12_000, 16_200):
            out = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: "
                                     + b"a" * size + b"\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 431 "), (size, out[:40])
        out = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX: "
                                 + b"a" * 8_000 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 "), out[:40]
        out = await raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ") and out.endswith(b"bad request\n")
        # A request with a body is answered, then the connection is closed (body never read).
        out = await raw_exchange(
            port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\nabc"
        )
        assert out.startswith(b"HTTP/1.1 200 ") and b"connection: close" in out.lower()

    run(test)


def test_slow_head_is_cut_off() -> None:
    async def test(nursery: trio.Nursery) -> None:
        limits = ServerLimits(head_timeout=0.3)
        port = await start_admin(nursery, limits)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\n")  # never finishes the head
            got = b""
            with trio.fail_after(3):
                while chunk := await stream.receive_some(4096):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 408 ")  # begun, not finished: 408, then closed
            idle = await trio.open_tcp_stream("127.0.0.1", port)  # never sends anything
            with trio.fail_after(3):
                assert await idle.receive_some(10) == b""
            await idle.aclose()

    run(test)


def test_connection_cap() -> None:
    async def test(nursery: trio.Nursery) -> None:
        limits = ServerLimits(max_connections=2)
        port = await start_admin(nursery, limits)
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.sleep(0.1)  # let the server accept both
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(3):
            assert await extra.receive_some(10) == b""  # closed at once
        await extra.aclose()
        for s in held:
            await s.aclose()
        await trio.sleep(0.1)
        code, _, _ = await fetch(port, "/healthz")  # capacity is back
        assert code == 200

    run(test)


# --- health server ----------------------------------------------------------------------------


async def tiny_app(
    *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED, tls: ssl.SSLContext | None = None
) -> None:
    """An app with /ok (200), /sick (500) and /slow (answers after 10 s)."""

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            await answer(stream)
        except trio.BrokenResourceError:
            pass  # a client speaking the wrong protocol (plain HTTP to TLS)
        finally:
            await stream.aclose()

    async def answer(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
            elif isinstance(event, h11.Request):
                target = event.target
                break
            else:
                return
        if target == b"/slow":
            await trio.sleep(10)
        code = {b"/ok": 200, b"/sick": 500, b"/slow": 200}.get(target, 404)
        await stream.send_all(
            conn.send(h11.Response(status_code=code, headers=[("content-length", "4")]))
            + conn.send(h11.Data(data=b"body"))
            + (conn.send(h11.EndOfMessage()) or b"")
        )

    await serve_trio(handle, tls, task_status)


def test_https_app_probe(tmp_path: Path) -> None:
    server_ctx = ThrowawayCA().server_context(tmp_path)  # the app's own, trusted by no one

    async def test(nursery: trio.Nursery) -> None:
        app_port = await nursery.start(
            lambda task_status: tiny_app(task_status=task_status, tls=server_ctx)
        )
        probes = {
            "/app-health/web/livez": AppProbe(app_port, "/ok", "HTTPS"),
            "/app-health/web/plain": AppProbe(app_port, "/ok", "HTTP"),  # wrong scheme
        }
        port = await nursery.start(
            lambda task_status: serve_health(
                ("127.0.0.1", 0), SidecarStatus(), probes, probe_timeout=1, task_status=task_status
            )
        )
        code, _, _ = await fetch(port, "/app-health/web/livez")
        assert code == 200
        code, _, _ = await fetch(port, "/app-health/web/plain")
        assert code == 503

    run(test)


def test_health_server_routes_and_app_probes() -> None:
    status = SidecarStatus()

    async def test(nursery: trio.Nursery) -> None:
        app_port = await nursery.start(tiny_app)
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()
        probes = {
            "/app-health/orders/livez": AppProbe(app_port, "/ok"),
            "/app-health/orders/readyz": AppProbe(app_port, "/sick"),
            "/app-health/orders/startupz": AppProbe(app_port, "/slow"),
            "/app-health/gone/livez": AppProbe(dead_port, "/ok"),
        }
        port = await nursery.start(
            lambda task_status: serve_health(
                ("127.0.0.1", 0), status, probes, probe_timeout=0.5, task_status=task_status
            )
        )
        code, _, body = await fetch(port, "/healthz")
        assert (code, body) == (200, b"ok\n")
        code, _, body = await fetch(port, "/readyz")
        assert (code, body) == (503, b"not ready\n")  # no reasons on this port
        status.policy_loaded = True
        code, _, body = await fetch(port, "/readyz")
        assert (code, body) == (200, b"ready\n")

        code, _, body = await fetch(port, "/app-health/orders/livez")
        assert (code, body) == (200, b"")  # the app's status, empty body
        code, _, body = await fetch(port, "/app-health/orders/readyz")
        assert (code, body) == (500, b"")
        code, _, _ = await fetch(port, "/app-health/gone/livez")
        assert code == 503  # connection refused
        with trio.fail_after(3):
            code, _, _ = await fetch(port, "/app-health/orders/startupz")
        assert code == 503  # no answer within the probe timeout
        for path in ("/app-health/orders/other", "/metrics", "/config", "/policy"):
            code, _, _ = await fetch(port, path)
            assert code == 404, path

    run(test)


def test_parse_app_probes() -> None:
    text = json.dumps(
        {
            "/app-health/orders/livez": {"port": 8080, "path": "/healthz", "scheme": "HTTP"},
            "/app-health/orders/readyz": {"port": 8443, "path": "/ready", "scheme": "https"},
        }
    )
    probes = parse_app_probes(text)
    assert probes["/app-health/orders/livez"] == AppProbe(8080, "/healthz", "HTTP")
    assert probes["/app-health/orders/readyz"].scheme == "HTTPS"
    assert parse_app_probes(None) == {} and parse_app_probes("  ") == {}
    assert app_probes_from_env({}) == {}
    assert app_probes_from_env({"SIDECAR_APP_PROBES": text}) == probes


def test_parse_app_probes_reports_every_problem() -> None:
    bad = json.dumps(
        {
            "/elsewhere": {"port": 80, "path": "/"},
            "/app-health/a/livez": {"port": 0, "path": "x", "scheme": "FTP", "extra": 1},
            "/app-health/b/livez": {"port": True, "path": "/a b"},
            "/app-health/c/livez": "nope",
        }
    )
    with pytest.raises(ConfigError) as info:
        parse_app_probes(bad)
    messages = [str(p) for p in info.value.problems]
    assert all(m.startswith("SIDECAR_APP_PROBES") for m in messages)
    assert len(messages) == 8, messages
    with pytest.raises(ConfigError):
        parse_app_probes("{not json")
    with pytest.raises(ConfigError):
        parse_app_probes("[1, 2]")


# --- found by a hostile review: /tap took a negative sequence number and NaN/inf waits -----


@pytest.mark.parametrize("query", ["after=-1", "after=-99999999999999999999", "wait=nan",
                                   "after=0&wait=nan", "wait=inf", "wait=-inf", "after=abc",
                                   "after=1e3", "a=1&b=2&c=3&d=4&e=5"])
def test_tap_refuses_a_bad_query(query: str) -> None:
    from sidecar.admin import tap_reply
    from sidecar.tap import Tap

    async def main() -> None:
        reply = await tap_reply(Tap(), query)
        assert reply.status == 400

    trio.run(main)


@pytest.mark.parametrize("query", ["", "after=0&wait=0", "after=5&wait=-1", "wait=1e308&after=0"])
def test_tap_answers_a_good_query(query: str) -> None:
    from sidecar.admin import tap_reply
    from sidecar.tap import Tap

    async def main() -> None:
        tap = Tap()
        tap.MAX_WAIT = 0.05
        reply = await tap_reply(tap, query)
        assert reply.status == 200 and json.loads(reply.body)["seq"] >= 0

    trio.run(main)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST", True), ("::ffff:127.0.0.1", False),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False),
    ("admin.example", False), ("localhost.example", False)])
def test_admin_listen_loopback_or_not(host: str, loopback: bool) -> None:
    from sidecar.config.values import is_loopback

    assert is_loopback(host) is loopback
