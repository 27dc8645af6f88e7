"""The admin server (loopback) and the health server (kubelet probes): the I/O half.

Theory of operation
-------------------
Both servers are the control-plane server (``sidecar.ctlhttp.server``) with the pages of
``sidecar.admin_pages`` (pure). Its bounds hold here: one task per connection, at most
``max_connections`` at once and at most ``max_connections_per_source`` from one source
address (extra connections are closed straight away, and counted through ``on_refused``),
the stream closed in ``finally``. When every connection is taken, a newcomer takes the slot
of the oldest connection of another address still waiting for a request head (since the
thirty-first session: one local process held a silent connection from each of 64 loopback
addresses and every other local client got 429), else of the heaviest source group (all
loopback addresses one, an IPv6 address its /64: ``source_group``) or address. Every wait
is bounded: the request head must arrive within ``head_timeout`` (which is also the
keep-alive idle timeout) and be at most ``max_head_bytes``; an answer must be written
within ``write_timeout``; a connection serves at most ``max_requests_per_connection``
requests. Request bodies are never read: a request that has one is answered and the
connection closed, so no body can hold a task.

The health server faces the pod network, so it is stricter (``HEALTH_LIMITS``): one request
per connection (``Connection: close``, no keep-alive), 2 s for the head. A kubelet opens a
fresh connection per probe anyway; a neighbour that opens connections and sends nothing
holds each for 2 s at most, and only up to its per-source share, so the kubelet (another
source: the node's address) is still answered.

Only GET and HEAD exist here; anything else is 405. On a loopback address the admin server
answers only a local Host (``host_is_local``; else 421): a browser page re-pointed at
127.0.0.1 by DNS rebinding sends its own name. Both servers keep a reserve of connections
beyond their limits for /healthz and /readyz (``PROBE_RESERVE``): the local clients of a
loopback port usually share one address, 127.0.0.1 (not all: any process may connect from
any address of 127.0.0.0/8, each its own share, which is why waiting connections make room
on a full server). Errors carry the generic bodies of ``sidecar.errors``; details go to the
log.

What waits lives here: /tap on the admin port (a bounded long poll on the tap's ring) and
the application probes on the health port, which GET the app on 127.0.0.1 with the
control-plane client (``sidecar.ctlhttp.client``) under a timeout, any failure being 503.

Both report their real port through ``task_status.started(port)`` once listening, so port
0 works in tests.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from sidecar import __version__
from sidecar.admin_pages import AdminStatus, AppProbe, admin_page, health_page
from sidecar.ctlhttp.client import ClientError, Target, request
from sidecar.ctlhttp.reply import JSON, Reply
from sidecar.ctlhttp.server import Handler, Request, ServerLimits, serve
from sidecar.logs import log
from sidecar.metrics import SidecarMetrics

PROBE_TIMEOUT_SECONDS = 5.0
PROBE_UNAVAILABLE_STATUS = 503
PROBE_MAX_HEAD_BYTES = 16 * 1024

# The admin port's bounds are the server's defaults; the health port faces the pod network,
# so no keep-alive and a short head timeout.
# Both keep a reserve of PROBE_RESERVE connections beyond their limits for /healthz and
# /readyz only (``ServerLimits.probe_paths``): on a loopback port the local clients usually
# share 127.0.0.1, and a scraper holding that address's share locked the probes out.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
PROBE_RESERVE = 8
ADMIN_LIMITS = ServerLimits(probe_paths=PROBE_PATHS, probe_reserve=PROBE_RESERVE)
HEALTH_LIMITS = ServerLimits(head_timeout=2.0, max_requests_per_connection=1,
                             max_connections=256, keep_alive=False,
                             probe_paths=PROBE_PATHS, probe_reserve=PROBE_RESERVE)
BASE_HEADERS = (("cache-control", "no-store"), ("x-content-type-options", "nosniff"),
                ("server", "trio-mesh-sidecar"))

# /tap's numbers, in ASCII decimal digits only: ``int``/``float`` also take ``1_0``, spaces
# around, other scripts' digits (``%D9%A3``) and ``nan``; such a query is a 400.
_AFTER = re.compile(r"[0-9]{1,20}")
_WAIT = re.compile(r"[-+]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][-+]?[0-9]{1,4})?")

Route = Callable[..., Awaitable[Reply]]  # (path without query[, query]) -> reply


def _readiness(status: AdminStatus) -> tuple[bool, list[str]]:
    try:
        ready, reasons = status.ready()
        return bool(ready), [str(r) for r in reasons]
    except Exception as exc:  # noqa: BLE001 -- fail closed: a status that cannot answer is not ready
        log("admin_request_failed", "error", path="/readyz", error=repr(exc))
        return False, ["status_unavailable"]


def admin_route(status: AdminStatus, metrics: SidecarMetrics) -> Route:
    """The admin server's routes (usable without a socket)."""
    tap = getattr(status, "tap", None)  # sidecar.tap.Tap of the running sidecar, if any

    async def route(path: str, query: str = "") -> Reply:
        if path == "/tap" and tap is not None:
            return await tap_reply(tap, query)
        return admin_page(path, status, metrics, lambda: _readiness(status))

    return route


async def tap_reply(tap: Any, query: str) -> Reply:
    """``GET /tap?after=SEQ&wait=SECONDS``: the decisions after SEQ (long poll).

    Without ``after`` it answers at once with the current sequence number and no event:
    a new watcher sees what happens from then on. Otherwise it waits up to ``wait``
    seconds (default 1, at most ``tap.MAX_WAIT``) for at least one event. The data path
    only appends to the tap's bounded ring; a watcher that falls behind is told how many
    events it missed (``dropped``) instead of slowing anything down. The answer is built
    by ``Tap.answer``: at most 1,000 events and about 64 KiB of JSON (the watcher pages on
    with ``after``), a few answers at a time, with checkpoints -- it runs on the data
    path's event loop (found by a hostile review: answers of ~470 KB built in one step
    each made a denied request 13 times slower while four clients asked in a loop).
    """
    import math
    from urllib.parse import parse_qs

    try:
        params = parse_qs(query, keep_blank_values=True, max_num_fields=4)
        if any(len(params.get(name, ())) > 1 for name in ("after", "wait")):
            return Reply.error(400)  # one value each: which one counts is no guess
        raw_after = params["after"][0] if "after" in params else None
        raw_wait = params.get("wait", ["1"])[0]
        if (raw_after is not None and not _AFTER.fullmatch(raw_after)) \
                or not _WAIT.fullmatch(raw_wait):
            return Reply.error(400)
        after = int(raw_after) if raw_after is not None else None
        wait = float(raw_wait)
    except (ValueError, IndexError):
        return Reply.error(400)
    if not math.isfinite(wait):
        return Reply.error(400)  # a wait is a number of seconds
    wait = min(max(wait, 0.0), tap.MAX_WAIT)
    tap.watch()
    if after is not None:
        deadline = trio.current_time() + wait
        while tap.seq <= after and trio.current_time() < deadline:
            await trio.sleep(tap.POLL_INTERVAL)
            tap.watch()
    return Reply(200, await tap.answer(after), JSON)


def _get_only(route: Route, host_check: bool = False) -> Handler:
    """The server handler of a GET/HEAD-only route: 405 for anything else; with
    ``host_check``, 421 for a request whose Host is a name other than localhost
    (``host_is_local``)."""

    async def handle(request: Request) -> Reply:
        if request.method not in ("GET", "HEAD"):
            return Reply.error(405, (("allow", "GET, HEAD"),))
        if host_check and not (all(host_is_local(value) for name, value in request.headers
                                   if name == b"host")
                               and (request.authority is None
                                    or host_is_local(request.authority.encode("latin-1")))):
            # (an absolute-form target's authority is the host asked for: RFC 9112 3.2.2
            # has a server use it instead of Host; both must name this machine here)
            return Reply.error(421)
        return await route(request.path, request.target.partition("?")[2])

    return handle


_IPV4 = re.compile(r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
                   r"(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")
_PORT = re.compile(r"(?::[0-9]{1,5})?")


def host_is_local(value: bytes) -> bool:
    """Whether a Host field names this server by address or as ``localhost``: an IPv4 or
    bracketed IPv6 literal, ``localhost`` or a ``*.localhost`` name (RFC 6761: always the
    loopback), each with an optional port. A loopback admin port answers only those: a web
    page whose name an attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name,
    and could otherwise read /config, /policy and the live requests of /tap from a browser
    on the machine."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return False
    host = text[:-len(port.group())] if (port := re.search(r":[0-9]{1,5}$", text)) else text
    if not _PORT.fullmatch(text[len(host):]):
        return False
    if _IPV4.fullmatch(host) or _IPV6.fullmatch(host):
        return True
    name = host.lower().removesuffix(".")
    return name == "localhost" or (name.endswith(".localhost")
                                   and re.fullmatch(r"[a-z0-9.-]+", name) is not None
                                   and ".." not in name)


async def serve_admin(
    listen: tuple[str, int],
    status: AdminStatus,
    metrics: SidecarMetrics,
    *,
    limits: ServerLimits = ADMIN_LIMITS,
    on_refused: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the admin server until cancelled; ``task_status.started(port)`` once listening.
    On a loopback address it answers only requests whose Host is local (``host_is_local``)."""
    from sidecar.config.values import is_loopback

    handler = _get_only(admin_route(status, metrics), host_check=is_loopback(listen[0]))
    await serve(listen, handler, name="admin", limits=limits,
                base_headers=BASE_HEADERS, error_event="admin_request_failed",
                on_refused=on_refused, task_status=task_status)


# --- health and application probes -------------------------------------------------------------


def _probe_context() -> ssl.SSLContext:
    # Like the kubelet's own HTTPS probes: no certificate check. The connection stays on
    # the pod's loopback and carries no credentials.
    from sidecar.identity.tls import limit_key_exchange

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    limit_key_exchange(context)  # (no finite-field groups: sidecar/identity/tls.py)
    return context


async def probe_app(probe: AppProbe, timeout: float = PROBE_TIMEOUT_SECONDS,
                    on_result: Callable[[str], None] | None = None) -> int:
    """GET the app's probe path on loopback; its status code, or 503 if it did not answer
    with a valid head (no connection, a timeout, or a head the control-plane client refuses:
    a status outside 100-599, a control character in the reason, more than 8 1xx answers,
    a 101 -- never relayed, never read as healthy; logged as ``app_probe_failed``).
    ``on_result`` is told ``ok`` (200-399, what the kubelet counts as healthy),
    ``unhealthy`` (the app's own 400-599) or ``failed`` (the 503)."""
    https = probe.scheme == "HTTPS"
    target = Target("https" if https else "http", "127.0.0.1", probe.port, probe.path,
                    f"127.0.0.1:{probe.port}")
    try:
        with trio.fail_after(timeout):
            answer = await request(
                target, ssl_context=_probe_context() if https else None,
                server_hostname="localhost", connect_timeout=timeout, read_timeout=timeout,
                max_head_bytes=PROBE_MAX_HEAD_BYTES, read_body=False,
                user_agent=f"trio-mesh-sidecar-probe/{__version__}")
    except (trio.TooSlowError, ClientError) as exc:
        log("app_probe_failed", "warning", port=probe.port, path=probe.path,
            error=(str(exc) or type(exc).__name__)[:300])
        if on_result is not None:
            on_result("failed")
        return PROBE_UNAVAILABLE_STATUS
    if on_result is not None:
        on_result("ok" if 200 <= answer.status < 400 else "unhealthy")
    return answer.status


def health_route(
    status: AdminStatus, app_probes: Mapping[str, AppProbe], probe_timeout: float,
    on_probe: Callable[[str], None] | None = None,
) -> Route:
    """The health server's routes (usable without a socket); ``on_probe`` as ``probe_app``'s
    ``on_result``."""
    probes = dict(app_probes)

    async def route(path: str, query: str = "") -> Reply:
        page = health_page(path, probes, lambda: _readiness(status))
        if isinstance(page, AppProbe):
            return Reply(await probe_app(page, probe_timeout, on_probe))
        return page

    return route


async def serve_health(
    listen: tuple[str, int],
    status: AdminStatus,
    app_probes: Mapping[str, AppProbe],
    *,
    probe_timeout: float = PROBE_TIMEOUT_SECONDS,
    limits: ServerLimits = HEALTH_LIMITS,
    on_refused: Callable[[str], None] | None = None,
    on_probe: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the health server until cancelled; ``task_status.started(port)`` once listening.
    ``on_probe`` is told each app probe's result (``probe_app``)."""
    await serve(listen, _get_only(health_route(status, app_probes, probe_timeout, on_probe)),
                name="health", limits=limits, base_headers=BASE_HEADERS,
                error_event="admin_request_failed", on_refused=on_refused,
                task_status=task_status)
