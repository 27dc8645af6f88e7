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

Connections still in their handshake make room (``PendingConnections``): on a listener
whose handler authenticates its peers (``ConnectionTracker.handshakes``, set by the inbound
proxy), a connection is *pending* from its accept until the handler calls
``tracker.established()`` (the peer's certificate verified and its identity accepted). When
the listener is full, a newcomer within its per-source share is not refused while a pending
connection holds a slot: the oldest pending connection of the source holding the most of
them (the newcomer's own source first among equals) is closed (its handler cancelled,
counted as refused ``handshake_evicted``) and the newcomer takes its slot. Connections that
never send a TLS byte, or stop half-way through their ClientHello, from a few sources each
within its share filled every slot of the inbound listener until ``handshake_timeout`` and
were reopened at once, and no caller with a valid certificate was served (found by a
hostile review). An established connection is never closed to make room; a flooding source
loses its own pending connections before any other source's.

New handshakes are rate-limited per source (``HandshakeRate``): on a listener whose handler
sets ``ConnectionTracker.handshake_rate`` (the inbound proxy:
``limits.handshakes_per_source_per_second``), each accepted connection takes a token from its
source's bucket before anything else is done for it; one that finds none is closed at once,
before any TLS byte is read (refused ``handshake_rate``). ``max_connections_per_source``
bounds what a source holds at once, not how fast it opens and abandons connections: one
source replaying a captured ClientHello with 16 connections in flight, each closed after the
server's flight, cost the sidecar a whole core in server handshakes (~0.8 ms of CPU each;
7,354 in 6 s) and other callers' new connections 4 ms -> 19 ms (found by a hostile review,
thirty-fifth session).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import trio

from sidecar import logs
from sidecar.net.streams import IdleBound, close_quietly

ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
HANDLER_TASK_NAME = "sidecar.net.listen.connection"
LISTEN_BACKLOG = 1024
IDLE_DRAIN_GRACE = 1.0  # seconds an idle connection may still deliver a request once draining
# ``on_refused`` reason of a connection still in its handshake closed to make room for a
# newcomer on a full listener (``PendingConnections``).
REFUSED_HANDSHAKE_EVICTED = "handshake_evicted"
# ``on_refused`` reason of a connection closed at accept because its source opened more new
# connections than its handshake rate allows (``HandshakeRate``).
REFUSED_HANDSHAKE_RATE = "handshake_rate"
# Sources a ``HandshakeRate`` keeps a bucket for; beyond, the least recently seen is forgotten
# (its next connection starts with a full bucket again). ~250 bytes each: ~1 MB at most.
HANDSHAKE_RATE_SOURCES = 4096


class Admission:
    """One connection of a listener whose handler authenticates its peers, as the listener
    admitted it: pending (in ``PendingConnections``) until ``ConnectionTracker.established``,
    and cancelled through ``scope`` if it is closed to make room while still pending."""

    __slots__ = ("source", "scope", "pending", "evicted")

    def __init__(self, source: str) -> None:
        self.source = source
        self.scope = trio.CancelScope()
        self.pending = True
        self.evicted = False  # closed to make room: its slot and share were given back then


# The admission of the connection the current task serves (set by ``_run_handler``, once
# per connection; tasks the handler starts inherit it).
_ADMISSION: ContextVar[Admission | None] = ContextVar("sidecar_listen_admission", default=None)


class PendingConnections:
    """The connections of one listener still in their handshake, per source, oldest first;
    finds the oldest one of the source holding the most in O(1) (sources are kept in
    buckets by how many they hold: ``_by_count``, ``_most``). Pure bookkeeping."""

    def __init__(self) -> None:
        self._by_source: dict[str, dict[Admission, None]] = {}  # (insertion order: oldest first)
        self._by_count: dict[int, dict[str, None]] = {}
        self._most = 0
        self.count = 0  # pending connections of every source

    def held(self, source: str) -> int:
        """How many pending connections ``source`` has."""
        mine = self._by_source.get(source)
        return len(mine) if mine is not None else 0

    def add(self, entry: Admission) -> None:
        """A connection of ``entry.source`` is pending from now on (the newest of its source)."""
        source = entry.source
        mine = self._by_source.setdefault(source, {})
        count = len(mine)
        if count:
            self._unbucket(source, count)
        mine[entry] = None
        self.count += 1
        self._by_count.setdefault(count + 1, {})[source] = None
        if count + 1 > self._most:
            self._most = count + 1

    def remove(self, entry: Admission) -> None:
        """``entry`` is pending no longer (established, closed or evicted)."""
        source = entry.source
        mine = self._by_source[source]
        count = len(mine)
        del mine[entry]
        self.count -= 1
        emptied = self._unbucket(source, count)
        if count > 1:
            self._by_count.setdefault(count - 1, {})[source] = None
        else:
            del self._by_source[source]
        if emptied and count == self._most:
            # (the source moved one bucket down, so that bucket is the fullest now)
            self._most = count - 1

    def oldest_of_most(self, newcomer: str | None) -> Admission | None:
        """The oldest pending connection of the source holding the most of them (of
        ``newcomer``'s own source if it is one of those); None if none is pending."""
        if self._most == 0:
            return None
        sources = self._by_count[self._most]
        source = newcomer if newcomer is not None and newcomer in sources \
            else next(iter(sources))
        return next(iter(self._by_source[source]))

    def _unbucket(self, source: str, count: int) -> bool:
        """Take ``source`` out of bucket ``count``; True if that bucket is now empty."""
        bucket = self._by_count[count]
        del bucket[source]
        if bucket:
            return False
        del self._by_count[count]
        return True


class HandshakeRate:
    """New connections per source, as a token bucket: ``rate`` a second, up to ``burst`` at
    once; pure bookkeeping (the caller gives the clock). A source is an address
    (``rate_source``), as for ``max_connections_per_source``. The table is bounded
    (``max_sources``, least recently seen forgotten first: O(1)); a forgotten source is
    one whose bucket is most likely full again anyway. Per accept: one dictionary lookup,
    a move to the end, a few float operations. Counting is per process (``workers: N``)."""

    __slots__ = ("rate", "burst", "max_sources", "_buckets", "refused", "forgotten",
                 "on_refused")

    def __init__(self, rate: float, burst: int,
                 max_sources: int = HANDSHAKE_RATE_SOURCES) -> None:
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.max_sources = max(1, max_sources)
        # source -> [tokens, time of the last look], least recently seen first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.refused = 0
        self.forgotten = 0
        # Called with the source address of each refused connection (its log line and audit
        # record, thinned: ``Telemetry.connection_rate_limited``); set by the handler.
        self.on_refused: Callable[[str], None] | None = None

    def admit(self, source: str, now: float) -> bool:
        """Take a token for one new connection from ``source`` at ``now``; False (nothing
        taken) if its bucket is empty."""
        key = rate_source(source) if ":" in source else source
        buckets = self._buckets
        entry = buckets.get(key)
        if entry is None:
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
                self.forgotten += 1
            buckets[key] = [self.burst - 1.0, now]
            return True
        buckets.move_to_end(key)
        tokens = entry[0] + (now - entry[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        entry[1] = now
        if tokens < 1.0:
            entry[0] = tokens
            self.refused += 1
            return False
        entry[0] = tokens - 1.0
        return True

    def statistics(self) -> dict[str, Any]:
        """Sources with a bucket, the limits, refusals and forgotten sources so far."""
        return {"sources": len(self._buckets), "rate": self.rate, "burst": self.burst,
                "refused": self.refused, "forgotten": self.forgotten}


def rate_source(address: str) -> str:
    """The source ``HandshakeRate`` counts ``address`` in: the address itself (an IPv6 zone id
    dropped, an IPv4-mapped one as its IPv4 address). Not an IPv6 /64: on IPv6 Kubernetes
    the pods of a node, or of a whole cluster, often share one, and eight honest peers
    opening their pools at once were refused 302 of 512 connections (found by the review of
    the thirty-fifth session's fix)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class ConnectionTracker:
    """Counts open connections and knows which ones are idle, for limits and drain, and
    (``handshakes``) which ones are still in their handshake, to make room when full."""

    def __init__(self) -> None:
        self.open = 0
        self.draining = False
        self.idle: set[IdleBound] = set()  # the idle waits now (register_idle)
        # True: the listener's handler authenticates its peers and calls ``established()``
        # for each connection that passed; until then a connection is pending and may be
        # closed to make room on a full listener (the module docstring). False (a handler
        # that reports nothing, e.g. an outbound listener's): no connection ever is.
        self.handshakes = False
        self.pending = PendingConnections()
        # New connections per source (``HandshakeRate``), checked at accept before anything
        # else; None (the default, and ``limits.handshakes_per_source_per_second: 0``): no
        # rate. Set by a handler whose connections cost a handshake (the inbound proxy).
        self.handshake_rate: HandshakeRate | None = None
        self.evicted = 0  # pending connections closed to make room so far
        self._all_closed = trio.Event()
        self._all_closed.set()

    def established(self) -> None:
        """The connection the current task serves passed its handshake and identity check:
        it is never closed to make room from now on. O(1); nothing outside a connection
        task of a tracked listener, or when called again."""
        entry = _ADMISSION.get()
        if entry is not None and entry.pending:  # (not once evicted: make_room)
            entry.pending = False
            self.pending.remove(entry)

    def make_room(self, newcomer: str | None) -> Admission | None:
        """Close the oldest pending connection of the source holding the most of them (see
        ``PendingConnections.oldest_of_most``) and return it; None (nothing done) if none
        is pending. Its slot is free at once (its task ends at its next checkpoint); the
        caller gives back its per-source share."""
        victim = self.pending.oldest_of_most(newcomer) if self.handshakes else None
        if victim is None:
            return None
        self.pending.remove(victim)
        victim.pending = False
        victim.evicted = True
        victim.scope.cancel()
        self.evicted += 1
        self.leave()
        return victim

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


def _listening_options(sock: Any, family: int) -> None:
    """The options of every TCP listener of the sidecar, set before its bind: SO_REUSEADDR,
    and on IPv6 dual stack, whatever the host's net.ipv6.bindv6only says (`[::]` takes IPv4
    clients too on every listener: docs/config.md "Listening addresses"). Never
    SO_REUSEPORT: Linux lets any socket of the same effective uid join a SO_REUSEPORT group
    and take a share of its connections (found by a hostile review: a root app container
    in the pod, setuid to the sidecar's uid, took half of the inbound mTLS connections).
    Workers share one socket instead (``bind_shared``, ``adopt_listener``)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def open_listener(host: str, port: int) -> trio.SocketListener:
    """A TCP listener of this process alone (no SO_REUSEPORT: ``_listening_options``)."""
    family = _family(host)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        _listening_options(sock, family)
        await sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def bind_shared(host: str, port: int) -> socket.socket:
    """A listening TCP socket (a blocking stdlib one) for every worker of ``workers: N``:
    the first process binds each listener once, before it starts the other workers, and
    hands them the socket (``adopt_listener``), as nginx and gunicorn do. Its port is held
    by one socket without SO_REUSEPORT, so no other socket can bind it, whatever its uid."""
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _listening_options(sock, family)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def adopt_listener(sock: socket.socket) -> trio.SocketListener:
    """A Trio listener on ``sock``, a listening TCP socket another process bound
    (``bind_shared``); several processes accept on it, the kernel hands each connection to
    one of them. OSError when ``sock`` is not a listening TCP socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
            sock.type != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise OSError(errno.EINVAL, "the inherited socket is not a listening TCP socket")
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def inherited_sockets(text: str) -> dict[str, socket.socket]:
    """The listening sockets a worker got from the first process: ``text`` is the JSON
    object listener name -> file descriptor (``bind_shared``'s sockets, passed with
    ``pass_fds``). ValueError when it is not such an object; OSError when a descriptor is
    not an open socket (nothing is kept open then)."""
    import json

    mapping = json.loads(text)
    if not isinstance(mapping, dict) or not all(
            isinstance(name, str) and type(fd) is int and fd > 2 for name, fd in mapping.items()):
        raise ValueError("expected a JSON object of listener name -> file descriptor")
    sockets: dict[str, socket.socket] = {}
    try:
        for name, fd in mapping.items():
            sockets[name] = socket.socket(fileno=fd)
    except BaseException:
        for sock in sockets.values():
            sock.close()  # (this worker's copies: the first process keeps its own)
        raise
    return sockets


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
    ``accept_resource_exhausted``) for every connection closed without being served, and
    ``handshake_evicted`` for a connection still in its handshake closed to make room for a
    newcomer on a full listener (``tracker.handshakes``: the module docstring), and
    ``handshake_rate`` for one whose source is past its rate of new connections
    (``tracker.handshake_rate``; also told to its ``on_refused``).
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
                full = tracker.open >= max_connections
                if full and not tracker.handshakes:
                    on_refused("max_connections")
                    await trio.aclose_forcefully(stream)
                    continue
                rate = tracker.handshake_rate
                source = source_address(stream.socket) \
                    if sources is not None or rate is not None else None
                if rate is not None and source is not None and \
                        not rate.admit(source, trio.current_time()):
                    # (before ``_made_room``: a refused newcomer never evicts anyone)
                    on_refused(REFUSED_HANDSHAKE_RATE)
                    # (closed here and now: a flood's connections are refused at the rate
                    # they come; ``aclose_forcefully``'s cancel scope and checkpoint were a
                    # quarter of the cost of each -- the accept above checkpoints)
                    stream.socket.close()
                    if rate.on_refused is not None:
                        try:
                            rate.on_refused(source)
                        except Exception as exc:  # noqa: BLE001  (never the accept loop)
                            logs.log("internal_error", "error", error=repr(exc),
                                     traceback="".join(
                                         traceback.format_exception(exc))[-4000:])
                    continue
                if full and not _made_room(tracker, sources, source, on_refused):
                    on_refused("max_connections")
                    await trio.aclose_forcefully(stream)
                    continue
                if sources is not None and (source is None or not sources.try_enter(source)):
                    on_refused("max_connections_per_source")
                    await trio.aclose_forcefully(stream)
                    continue
                tracker.enter()
                admission = None
                if tracker.handshakes:
                    admission = Admission(source or "")
                    tracker.pending.add(admission)
                # A constant name: Trio would otherwise build one string per connection.
                nursery.start_soon(_run_handler, handler, stream, tracker, sources, source,
                                   admission, name=HANDLER_TASK_NAME)
        await close_quietly(listener)


def _made_room(tracker: ConnectionTracker, sources: SourceLimiter | None, source: str | None,
               on_refused: Callable[[str], None]) -> bool:
    """On a full listener: close a pending connection (``ConnectionTracker.make_room``) for
    a newcomer from ``source`` that its per-source share lets in; False (nothing closed)
    when there is none or the newcomer would be refused anyway."""
    if sources is not None:
        if source is None:
            return False
        held = sources.held(source)
        if sources.per_source > 0 and held >= sources.per_source:
            return False
    victim = tracker.make_room(source)
    if victim is None:
        return False
    if sources is not None:
        sources.leave(victim.source)
    on_refused(REFUSED_HANDSHAKE_EVICTED)
    return True


async def _run_handler(handler: Callable[[trio.SocketStream], Awaitable[None]],
                       stream: trio.SocketStream, tracker: ConnectionTracker,
                       sources: SourceLimiter | None = None, source: str | None = None,
                       admission: Admission | None = None) -> None:
    try:
        if admission is None:
            await handler(stream)
        else:
            _ADMISSION.set(admission)
            with admission.scope:  # (cancelled when it is closed to make room: make_room)
                await handler(stream)
    except Exception as exc:  # noqa: BLE001
        # One connection's bug must never take the process (and every other connection)
        # down. The client sees a closed connection; the log gets the details.
        logs.log("internal_error", "error", error=repr(exc),
                 traceback="".join(traceback.format_exception(exc))[-4000:])
    finally:
        if admission is None or not admission.evicted:
            # (an evicted one gave its slot and share back when it was closed: make_room)
            if admission is not None and admission.pending:
                admission.pending = False
                tracker.pending.remove(admission)
            tracker.leave()
            if sources is not None and source is not None:
                sources.leave(source)
        await trio.aclose_forcefully(stream)
