"""Accept loops with connection limits, and the drain that SIGTERM starts.

Theory of operation: each listener runs an accept loop owned by the app's nursery. A
connection beyond ``max_connections`` is closed at once (refused, never queued), and so is
one whose source address already holds ``max_connections_per_source`` of them
(``SourceLimiter``): one neighbour can take its share of a listener, never all of it. Every
connection task registers with the ``ConnectionTracker``; while it waits for the next
request on a keep-alive connection it holds an *idle* cancel scope. Draining stops the
accept loops, cuts the idle waits to ``IDLE_DRAIN_GRACE`` seconds (those connections then
close), lets in-flight requests finish, and tells handlers to answer with
``Connection: close``. The grace is not zero because "idle" only means no byte has been
read yet: a client that connected (or reused a keep-alive connection) just before the drain
may have its request on the wire, and closing at once would leave it without any response.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sidecar import logs
from sidecar.net.streams import IdleBound, close_quietly

ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
HANDLER_TASK_NAME = "sidecar.net.listen.connection"
IDLE_DRAIN_GRACE = 1.0  # seconds an idle connection may still deliver a request once draining


class ConnectionTracker:
    """Counts open connections and knows which ones are idle, for limits and drain."""

    def __init__(self) -> None:
        self.open = 0
        self.draining = False
        self.idle: set[IdleBound] = set()  # the idle waits now (register_idle)
        self._all_closed = trio.Event()
        self._all_closed.set()

    def enter(self) -> None:
        """A connection opened on this listener."""
        self.open += 1
        if self.open == 1:
            self._all_closed = trio.Event()

    def leave(self) -> None:
        """A connection closed; the last one wakes ``wait_closed``."""
        self.open -= 1
        if self.open == 0:
            self._all_closed.set()

    def idle_scope(self, deadline: float) -> trio.CancelScope:
        """The cancel scope of one idle wait, cut short while draining."""
        if self.draining:
            deadline = min(deadline, trio.current_time() + IDLE_DRAIN_GRACE)
        return trio.CancelScope(deadline=deadline)

    def register_idle(self, scope: IdleBound) -> None:
        """An idle wait began (a drain may cut it)."""
        self.idle.add(scope)

    def unregister_idle(self, scope: IdleBound) -> None:
        """An idle wait ended."""
        self.idle.discard(scope)

    def start_drain(self) -> None:
        """Draining: idle connections end within ``IDLE_DRAIN_GRACE``, busy ones after their
        request."""
        self.draining = True
        cut = trio.current_time() + IDLE_DRAIN_GRACE
        for scope in list(self.idle):
            scope.deadline = min(scope.deadline, cut)

    async def wait_closed(self) -> None:
        """Wait until no connection of this listener is open."""
        await self._all_closed.wait()


class SourceLimiter:
    """Open connections per source address; pure bookkeeping (no sockets, no clock).

    A source is the peer's IP address (an IPv4-mapped IPv6 address counts as its IPv4
    address). Entries exist only while a source has a connection open, so the table is
    bounded by the listener's own connection limit. ``per_source <= 0`` disables the limit.
    Counting is per process: with ``workers: N`` each worker counts its own connections.
    """

    def __init__(self, per_source: int) -> None:
        self.per_source = per_source
        self._open: dict[str, int] = {}
        self.refused = 0

    def try_enter(self, source: str) -> bool:
        """Count one more connection from ``source``; False (nothing counted) if over."""
        held = self._open.get(source, 0)
        if self.per_source > 0 and held >= self.per_source:
            self.refused += 1
            return False
        self._open[source] = held + 1
        return True

    def held(self, source: str) -> int:
        """How many connections ``source`` has open."""
        return self._open.get(source, 0)

    def leave(self, source: str) -> None:
        """A connection from ``source`` closed."""
        held = self._open.get(source, 0) - 1
        if held > 0:
            self._open[source] = held
        else:
            self._open.pop(source, None)

    def statistics(self) -> dict[str, Any]:
        """Sources with open connections, the busiest one's count, refusals so far."""
        return {"sources": len(self._open), "busiest": max(self._open.values(), default=0),
                "per_source": self.per_source, "refused": self.refused}


def source_address(sock: Any) -> str | None:
    """The peer's IP address as the per-source limits count it; None if it is gone."""
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    host = peer[0] if isinstance(peer, tuple) else str(peer)
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


async def open_listener(host: str, port: int, *, reuse_port: bool = False) -> trio.SocketListener:
    """A TCP listener; SO_REUSEPORT lets several worker processes share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def listener_port(listener: trio.SocketListener) -> int:
    """The port ``listener`` is bound to (the real one when 0 was asked for)."""
    return int(listener.socket.getsockname()[1])


async def accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    tracker: ConnectionTracker,
    max_connections: int,
    on_refused: Callable[[str], None],
    stop: trio.CancelScope,
    sources: SourceLimiter | None = None,
) -> None:
    """Accept until ``stop`` is cancelled; spawn ``handler`` per connection in a nursery.

    ``on_refused`` gets ``max_connections`` or ``max_connections_per_source`` (or
    ``accept_resource_exhausted``) for every connection closed without being served.
    """
    async with trio.open_nursery() as nursery:
        with stop:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in ACCEPT_RETRY_ERRNOS:
                        on_refused("accept_resource_exhausted")
                        await trio.sleep(0.05)
                        continue
                    raise
                if tracker.open >= max_connections:
                    on_refused("max_connections")
                    await trio.aclose_forcefully(stream)
                    continue
                source = source_address(stream.socket) if sources is not None else None
                if sources is not None and (source is None or not sources.try_enter(source)):
                    on_refused("max_connections_per_source")
                    await trio.aclose_forcefully(stream)
                    continue
                tracker.enter()
                # A constant name: Trio would otherwise build one string per connection.
                nursery.start_soon(_run_handler, handler, stream, tracker, sources, source,
                                   name=HANDLER_TASK_NAME)
        await close_quietly(listener)


async def _run_handler(handler: Callable[[trio.SocketStream], Awaitable[None]],
                       stream: trio.SocketStream, tracker: ConnectionTracker,
                       sources: SourceLimiter | None = None, source: str | None = None) -> None:
    try:
        await handler(stream)
    except Exception as exc:  # noqa: BLE001
        # One connection's bug must never take the process (and every other connection)
        # down. The client sees a closed connection; the log gets the details.
        logs.log("internal_error", "error", error=repr(exc),
                 traceback="".join(traceback.format_exception(exc))[-4000:])
    finally:
        tracker.leave()
        if sources is not None and source is not None:
            sources.leave(source)
        await trio.aclose_forcefully(stream)
