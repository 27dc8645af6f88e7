"""The admin server (loopback) and the health server (kubelet probes), on trio + h11.

Theory of operation
-------------------
Both servers share one small HTTP/1.1 loop (``serve_http``): one task per connection, at
most ``max_connections`` at once and at most ``max_connections_per_source`` from one source
address (extra connections are closed straight away, and counted through ``on_refused``),
the stream closed in ``finally``. Every wait is bounded: the request head must arrive within
``head_timeout`` (which is also the keep-alive idle timeout) and be at most
``max_head_bytes``; an answer must be written within ``write_timeout``; a connection serves
at most ``max_requests_per_connection`` requests. Request bodies are never read: a request
that has one is answered and the connection closed, so no body can hold a task.

The health server faces the pod network, so it is stricter (``HEALTH_LIMITS``): one request
per connection (``Connection: close``, no keep-alive), 2 s for the head. A kubelet opens a
fresh connection per probe anyway; a neighbour that opens connections and sends nothing
holds each for 2 s at most, and only up to its per-source share, so the kubelet (another
source: the node's address) is still answered.

Only GET and HEAD exist here; anything else is 405. Errors carry the generic bodies of
``sidecar.errors``; details go to the log.

The servers differ only in their routes:

* admin (``serve_admin``): /healthz /readyz /metrics /policy /config /tap /audit/head. It
  shows the effective config and the policy status, so it belongs on loopback.
* health (``serve_health``): /healthz, /readyz (no reasons) and /app-health/... which
  proxies kubelet application probes, rewritten by the injector, to the app on 127.0.0.1
  (``SIDECAR_APP_PROBES``). Nothing else, because the kubelet (and so the pod network)
  reaches it.

Both report their real port through ``task_status.started(port)`` once listening, so port
0 works in tests.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import h11
import trio

from sidecar import __version__
from sidecar.errors import ConfigError, Problem, generic_body, reason_phrase
from sidecar.logs import log
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.metrics import SidecarMetrics
from sidecar.net.listen import SourceLimiter, source_address

APP_PROBES_ENV = "SIDECAR_APP_PROBES"
APP_HEALTH_PREFIX = "/app-health/"
MAX_APP_PROBES = 100
PROBE_TIMEOUT_SECONDS = 5.0
PROBE_UNAVAILABLE_STATUS = 503
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


class AdminStatus(Protocol):
    """What the admin and health servers ask the running sidecar (app.py provides it)."""

    def ready(self) -> tuple[bool, list[str]]:
        """``(ready, reasons)``: reasons are short codes explaining why not ready."""
        ...

    def policy_status(self) -> dict[str, Any]:
        """``version``, ``loaded_at``, ``last_reload_error``, ``source`` of the policy."""
        ...

    def effective_config(self) -> dict[str, Any]:
        """The effective sidecar config, already redacted."""
        ...


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds of one HTTP server (see docs/operations.md)."""

    max_head_bytes: int = 8 * 1024
    head_timeout: float = 10.0
    write_timeout: float = 10.0
    max_requests_per_connection: int = 100
    max_connections: int = 64
    max_connections_per_source: int = 32
    keep_alive: bool = True  # False: every answer says Connection: close


# The health port: reachable from the pod network, so no keep-alive and a short head timeout.
HEALTH_LIMITS = ServerLimits(head_timeout=2.0, max_requests_per_connection=1,
                             max_connections=256, keep_alive=False)


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: status, body, content type."""

    status: int
    body: bytes = b""
    content_type: str = TEXT

    @classmethod
    def error(cls, status: int) -> Reply:
        """A generic error answer (no detail ever reaches the client)."""
        return cls(status, (generic_body(status) + "\n").encode())

    @classmethod
    def json(cls, status: int, value: Any) -> Reply:
        body = json.dumps(value, sort_keys=True, default=str, separators=(",", ":")) + "\n"
        return cls(status, body.encode(), JSON)


Route = Callable[..., Awaitable[Reply]]  # (path without query[, query]) -> reply


# --- the HTTP loop ----------------------------------------------------------------------------


async def serve_http(
    listen: tuple[str, int],
    route: Route,
    *,
    name: str,
    limits: ServerLimits = ServerLimits(),
    on_refused: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve GET/HEAD requests with ``route`` until cancelled; reports the bound port.

    ``on_refused(reason)`` is called for each connection closed unserved by a limit
    (``max_connections`` or ``max_connections_per_source``).
    """
    host, port = listen
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        # A name that resolves to several addresses would get one random port each.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    actual_port: int = listeners[0].socket.getsockname()[1]
    open_connections = 0
    sources = SourceLimiter(limits.max_connections_per_source)

    def refuse(reason: str) -> None:
        if on_refused is not None:
            on_refused(reason)

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal open_connections
        if open_connections >= limits.max_connections:
            refuse("max_connections")
            await trio.aclose_forcefully(stream)
            return
        source = source_address(stream.socket)
        if source is None or not sources.try_enter(source):
            refuse("max_connections_per_source")
            await trio.aclose_forcefully(stream)
            return
        open_connections += 1
        try:
            await _serve_connection(stream, route, limits, name)
        except Exception as exc:  # noqa: BLE001 -- one bad connection never stops the server
            log("admin_request_failed", "error", server=name, error=repr(exc))
        finally:
            open_connections -= 1
            sources.leave(source)
            await stream.aclose()

    task_status.started(actual_port)
    await trio.serve_listeners(handle, listeners)


async def _serve_connection(
    stream: trio.abc.Stream, route: Route, limits: ServerLimits, name: str
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
    for _ in range(limits.max_requests_per_connection):
        try:
            request = await _next_request(stream, conn, limits.head_timeout)
        except h11.RemoteProtocolError as exc:
            await _send_reply(stream, conn, Reply.error(exc.error_status_hint), False, True, limits)
            await _linger(stream)
            return
        if request is None:
            return
        has_body = _has_body(conn)
        method = request.method.decode("ascii", "replace")
        path, _, query = request.target.decode("latin-1").partition("?")
        if method not in ("GET", "HEAD"):
            reply = Reply(405, (generic_body(405) + "\n").encode())
        else:
            try:
                reply = await (route(path, query) if getattr(route, "takes_query", False)
                               else route(path))
            except Exception as exc:  # a broken status provider must not kill the server
                log("admin_request_failed", "error", server=name, path=path, error=repr(exc))
                reply = Reply.error(500)
        close = has_body or not limits.keep_alive or _client_wants_close(request)
        sent = await _send_reply(stream, conn, reply, method == "HEAD", close, limits)
        if sent and has_body:
            await _linger(stream)
        if not sent or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


LINGER_SECONDS = 1.0
LINGER_MAX_BYTES = 256 * 1024


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then discard what the client still sends, briefly and boundedly.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the
    answer we just wrote before the client reads it (an oversized head, an unread body).
    """
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    with trio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_eof()
            discarded = 0
            while discarded < LINGER_MAX_BYTES:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                discarded += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _next_request(
    stream: trio.abc.Stream, conn: h11.Connection, timeout: float
) -> h11.Request | None:
    """The next request head, or None when the peer closes or is too slow."""
    with trio.move_on_after(timeout):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(4096)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed, or PAUSED after a previous cycle
    return None  # head timeout / idle keep-alive timeout: just close


def _has_body(conn: h11.Connection) -> bool:
    # A request without a body yields EndOfMessage at once, with no more bytes needed.
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return True
    return not isinstance(event, h11.EndOfMessage)


def _client_wants_close(request: h11.Request) -> bool:
    for key, value in request.headers:
        if key == b"connection" and b"close" in value.lower():
            return True
    return False


async def _send_reply(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    reply: Reply,
    head_only: bool,
    close: bool,
    limits: ServerLimits,
) -> bool:
    headers = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        ("server", "trio-mesh-sidecar"),
    ]
    if reply.status == 405:
        headers.append(("allow", "GET, HEAD"))
    if close:
        headers.append(("connection", "close"))
    try:
        data = conn.send(h11.Response(status_code=reply.status, headers=headers,
                                     reason=reason_phrase(reply.status))) or b""
        if reply.body and not head_only:
            data += conn.send(h11.Data(data=reply.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return False
    with trio.move_on_after(limits.write_timeout):
        try:
            await stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
    return False


# --- admin ------------------------------------------------------------------------------------


def _readiness(status: AdminStatus) -> tuple[bool, list[str]]:
    try:
        ready, reasons = status.ready()
        return bool(ready), [str(r) for r in reasons]
    except Exception as exc:  # fail closed: a status that cannot answer is not ready
        log("admin_request_failed", "error", path="/readyz", error=repr(exc))
        return False, ["status_unavailable"]


def admin_route(status: AdminStatus, metrics: SidecarMetrics) -> Route:
    """The admin server's routes (usable without a socket)."""
    tap = getattr(status, "tap", None)  # sidecar.tap.Tap of the running sidecar, if any

    async def route(path: str, query: str = "") -> Reply:
        if path == "/tap" and tap is not None:
            return await tap_reply(tap, query)
        if path == "/healthz":
            return Reply(200, b"ok\n")
        if path == "/readyz":
            ready, reasons = _readiness(status)
            return Reply.json(200 if ready else 503, {"ready": ready, "reasons": reasons})
        if path == "/metrics":
            return Reply(200, metrics.render(), METRICS_CONTENT_TYPE)
        if path == "/policy":
            return Reply.json(200, status.policy_status())
        if path == "/config":
            return Reply.json(200, status.effective_config())
        if path == "/audit/head":
            # The newest signed checkpoint: copy it off the pod to anchor the trail
            # (``sidecar audit verify --anchor``). 404 without signing or before the first.
            head = getattr(status, "audit_head", None)
            value = head() if head is not None else None
            return Reply.json(200, value) if value is not None else Reply.error(404)
        return Reply.error(404)

    route.takes_query = True  # type: ignore[attr-defined]
    return route


async def tap_reply(tap: Any, query: str) -> Reply:
    """``GET /tap?after=SEQ&wait=SECONDS``: the decisions after SEQ (long poll).

    Without ``after`` it answers at once with the current sequence number and no event:
    a new watcher sees what happens from then on. Otherwise it waits up to ``wait``
    seconds (default 1, at most ``tap.MAX_WAIT``) for at least one event. The data path
    only appends to the tap's bounded ring; a watcher that falls behind is told how many
    events it missed (``dropped``) instead of slowing anything down.
    """
    from urllib.parse import parse_qs

    try:
        params = parse_qs(query, max_num_fields=4)
        after = int(params["after"][0]) if "after" in params else None
        wait = float(params.get("wait", ["1"])[0])
    except (ValueError, IndexError):
        return Reply.error(400)
    wait = min(max(wait, 0.0), tap.MAX_WAIT)
    tap.watch()
    if after is not None:
        deadline = trio.current_time() + wait
        while tap.seq <= after and trio.current_time() < deadline:
            await trio.sleep(tap.POLL_INTERVAL)
            tap.watch()
    return Reply.json(200, tap.read(after))


async def serve_admin(
    listen: tuple[str, int],
    status: AdminStatus,
    metrics: SidecarMetrics,
    *,
    limits: ServerLimits = ServerLimits(),
    on_refused: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the admin server until cancelled; ``task_status.started(port)`` once listening."""
    await serve_http(
        listen, admin_route(status, metrics), name="admin", limits=limits,
        on_refused=on_refused, task_status=task_status
    )


# --- health and application probes -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppProbe:
    """One rewritten kubelet probe: GET ``path`` on 127.0.0.1:``port``."""

    port: int
    path: str
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"


def parse_app_probes(text: str | None) -> dict[str, AppProbe]:
    """Parse ``SIDECAR_APP_PROBES`` (JSON); every problem is reported in one ConfigError."""
    if text is None or not text.strip():
        return {}
    problems: list[Problem] = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(APP_PROBES_ENV, None, key, message))

    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError([Problem(APP_PROBES_ENV, None, "", f"not valid JSON: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([Problem(APP_PROBES_ENV, None, "", "must be a JSON object")])
    if len(raw) > MAX_APP_PROBES:
        problem("", f"at most {MAX_APP_PROBES} probes")
    probes: dict[str, AppProbe] = {}
    for key, spec in raw.items():
        if not key.startswith(APP_HEALTH_PREFIX) or not _clean_path(key) or "?" in key:
            problem(key, f"probe paths must start with {APP_HEALTH_PREFIX} (no query)")
            continue
        if not isinstance(spec, dict):
            problem(key, "must be an object with port, path and optional scheme")
            continue
        unknown = set(spec) - {"port", "path", "scheme"}
        if unknown:
            problem(key, f"unknown keys: {', '.join(sorted(unknown))}")
        port = spec.get("port")
        path = spec.get("path")
        scheme = str(spec.get("scheme", "HTTP")).upper()
        ok = True
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problem(key, "port must be an integer from 1 to 65535")
            ok = False
        if not isinstance(path, str) or not path.startswith("/") or not _clean_path(path):
            problem(key, "path must start with / and hold no spaces or control characters")
            ok = False
        if scheme not in ("HTTP", "HTTPS"):
            problem(key, "scheme must be HTTP or HTTPS")
            ok = False
        if ok:
            assert isinstance(port, int) and isinstance(path, str)
            probes[key] = AppProbe(port, path, "HTTPS" if scheme == "HTTPS" else "HTTP")
    if problems:
        raise ConfigError(problems)
    return probes


def app_probes_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, AppProbe]:
    """The probe map from the environment (empty when the variable is not set)."""
    return parse_app_probes(environ.get(APP_PROBES_ENV))


def _clean_path(path: str) -> bool:
    return len(path) <= 2048 and all(33 <= ord(c) < 127 for c in path)


async def probe_app(probe: AppProbe, timeout: float = PROBE_TIMEOUT_SECONDS) -> int:
    """GET the app's probe path on loopback; its status code, or 503 if it did not answer."""
    try:
        with trio.fail_after(timeout):
            return await _probe_exchange(probe)
    except (trio.TooSlowError, OSError, trio.BrokenResourceError, h11.ProtocolError,
            ConnectionError):  # fmt: skip
        return PROBE_UNAVAILABLE_STATUS


async def _probe_exchange(probe: AppProbe) -> int:
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", probe.port)
    try:
        if probe.scheme == "HTTPS":
            # Like the kubelet's own HTTPS probes: no certificate check. The connection
            # stays on the pod's loopback and carries no credentials.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            tls = trio.SSLStream(stream, context, server_hostname="localhost")
            stream = tls
            await tls.do_handshake()
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
        request = h11.Request(
            method="GET",
            target=probe.path,
            headers=[
                ("host", f"127.0.0.1:{probe.port}"),
                ("user-agent", f"trio-mesh-sidecar-probe/{__version__}"),
                ("connection", "close"),
            ],
        )
        await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(4096)))
                continue
            if isinstance(event, h11.Response):
                return event.status_code
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("app closed before answering")
            # 1xx informational answers: keep reading.
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


def health_route(
    status: AdminStatus, app_probes: Mapping[str, AppProbe], probe_timeout: float
) -> Route:
    """The health server's routes (usable without a socket)."""
    probes = dict(app_probes)

    async def route(path: str) -> Reply:
        if path == "/healthz":
            return Reply(200, b"ok\n")
        if path == "/readyz":
            ready, _ = _readiness(status)
            return Reply(200, b"ready\n") if ready else Reply(503, b"not ready\n")
        probe = probes.get(path)
        if probe is not None:
            return Reply(await probe_app(probe, probe_timeout))
        return Reply.error(404)

    return route


async def serve_health(
    listen: tuple[str, int],
    status: AdminStatus,
    app_probes: Mapping[str, AppProbe],
    *,
    probe_timeout: float = PROBE_TIMEOUT_SECONDS,
    limits: ServerLimits = HEALTH_LIMITS,
    on_refused: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the health server until cancelled; ``task_status.started(port)`` once listening."""
    await serve_http(
        listen,
        health_route(status, app_probes, probe_timeout),
        name="health",
        limits=limits,
        on_refused=on_refused,
        task_status=task_status,
    )
