"""Keep-alive pool of upstream HTTP/1.1 connections.

Theory of operation: a request takes an idle connection (LIFO, so a few hot connections
stay warm and the rest age out) or opens a new one; when the exchange ended cleanly on both
sides, the connection goes back for reuse, otherwise it is closed. The pool bounds only the
*idle* connections: the number in use is already bounded by the listener's connection limit,
because each client connection holds at most one upstream connection at a time.

A pooled connection can die while idle (the app closed it, the peer sidecar restarted). Such
connections are detected before reuse (``looks_alive``) and, for requests without a body, a
failure on a reused connection before any response byte is retried once on a new one. The
check is a system call, and it is made before *every* reuse, however recently the connection
was released: bytes an upstream sends after a complete response (a body on a HEAD or 204
answer, more bytes than its Content-Length, an unsolicited second response) are on the socket
by then, and the next request -- often another caller's -- would read them as its answer
(a hostile review found that skipping the check for connections released less than 3 ms ago
handed such bytes to the next request nearly every time). Bytes that arrive later still race
the check, as with any HTTP/1.1 pool; the reader refuses to pool a connection after the
answers most apps get wrong that way (see ``MessageReader.reusable``).

``on_acquire(ep)`` (optional) is told of every connection handed out, in the task of the
request that takes it (the outbound listener binds the request in flight -- and an upgraded
stream for good -- to that connection's peer and its trust). ``retire(ep, now)`` (optional; ``now`` is the run's clock, read once by the pool)
says a connection must not be used again although it is alive: past its maximum age, made
with an older own certificate, or admitted under a bundle that has changed since
(``sidecar.outbound.retire_reason``). It is asked before every reuse and every return to the
pool, and ``sweep`` asks it for every idle connection at once (once a second, and after a
rotation or a bundle change), closing those idle past ``idle_timeout`` too. A connection in
use is not the pool's to judge: ``on_acquire`` binds it to the request that took it, and
that request's connection is retired when the upstream connection passes its age or its
trust ends (``sidecar.net.lifetime``, ``Lifetimes.sweep``).

A connection one client keeps for itself between its requests (connection-oriented
authentication: ``Endpoint.private``, ``sidecar.net.forward``) is idle as well, though never
handed to anyone else: ``hold`` sets it aside for that client, ``reclaim`` hands it back
for the client's next request, and ``sweep`` judges it as any idle connection (idle past
``idle_timeout``, or refused by ``retire``) and closes it, so the client's next request
takes a connection from the pool. While a request runs over it, it is in use like any
connection handed out (``on_acquire``: the request in flight is bound to its trust).

The usual exchange takes the connection released last and gives it back, neither of which
waits for anything: ``take`` and ``keep`` do that without a coroutine (two per request
less on each proxy); ``acquire`` and ``release`` are the complete, awaitable forms, and
``acquire`` closes what ``take`` found unusable. ``take`` stops at the first unusable
connection (it is set aside, not closed: closing awaits), so its caller must call
``acquire`` at once when it returns None.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from sidecar.http.wire import MessageReader
from sidecar.net.streams import Endpoint, looks_alive, run_clock


@dataclass
class PoolStatistics:
    """Counts of one upstream pool: idle connections now, opened, reused, closed as stale,
    and connections set aside for one client each now (``hold``; those whose client let
    them go are counted until the next ``sweep`` drops them)."""

    idle: int
    opened: int
    reused: int
    closed_stale: int
    private: int = 0


class UpstreamPool:
    """Idle connections to one upstream address (the app, or one peer sidecar)."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[trio.abc.Stream]],
        *,
        size: int,
        idle_timeout: float,
        max_head: int = 64 * 1024,
        network: bool = True,
        retire: Callable[[Endpoint, float], bool] | None = None,
        on_acquire: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self._retire = retire
        self._on_acquire = on_acquire
        self._connect = connect
        self._size = size
        self._idle_timeout = idle_timeout
        self._max_head = max_head
        self._network = network  # a peer sidecar (True) or the local app: same strict reader
        # Whether a connection that carried a request body may be kept after a complete
        # answer (``sidecar.net.forward``): to a peer (outbound), yes; to the local app
        # (inbound), never -- see the module docstring of ``forward``.
        self.reuse_after_body = network
        self._idle: list[tuple[float, Endpoint]] = []
        # Connections set aside for one client each (``hold``): connection -> (when set
        # aside, the client endpoint whose ``private`` it is). An entry whose client let it
        # go (``client.private`` is no longer it: its connection ended and closed it) is
        # dropped by the next ``sweep``.
        self._private: dict[Endpoint, tuple[float, Endpoint]] = {}
        self._unusable: list[Endpoint] = []  # set aside by ``take``, closed by ``acquire``
        self.opened = 0
        self.reused = 0
        self.closed_stale = 0
        self.retired = 0
        self._clock: Callable[[], float] | None = None

    def _now(self) -> float:
        # The run's clock, bound on first use (the pool may be built before the run).
        clock = self._clock
        if clock is None:
            clock = self._clock = run_clock()
        return clock()

    def take(self, upgrade: bool = False) -> Endpoint | None:
        """The connection released last, if it may be reused as it is; None when there is
        none or it may not (then call ``acquire`` at once: it closes what was set aside)."""
        idle = self._idle
        if not idle:
            return None
        now = self._now()
        since, ep = idle.pop()
        age = now - since
        if age < self._idle_timeout and looks_alive(ep.stream):
            if self._retire is None or not self._retire(ep, now):
                self.reused += 1
                if self._on_acquire is not None:
                    self._on_acquire(ep)
                return ep
            self.retired += 1
        else:
            self.closed_stale += 1
        self._unusable.append(ep)
        return None

    def hold(self, ep: Endpoint, client: Endpoint) -> bool:
        """Set ``ep`` aside as ``client``'s own (``client.private``), for that client's next
        request only, if its exchange completed cleanly and ``retire`` does not refuse it
        (as ``keep``); False: the caller closes it. Until ``reclaim`` takes it back it is
        idle and ``sweep`` judges it with the pooled ones."""
        if not ep.reader.reusable():
            return False
        now = self._now()
        if self._retire is not None and self._retire(ep, now):
            self.retired += 1
            return False
        ep.bytes_in = ep.bytes_out = 0
        self._private[ep] = (now, client)
        client.private = ep
        return True

    def reclaim(self, ep: Endpoint) -> bool:
        """Whether ``ep`` -- a connection a client kept for itself, never pooled
        (``Endpoint.private``, set aside by ``hold``) -- may carry that client's next
        request: idle less than ``idle_timeout``, alive, and not one ``retire`` refuses
        (told to ``on_acquire`` as a reuse). False: the caller closes it."""
        now = self._now()
        entry = self._private.pop(ep, None)
        if (entry is not None and now - entry[0] >= self._idle_timeout) \
                or not looks_alive(ep.stream):
            self.closed_stale += 1
            return False
        if self._retire is not None and self._retire(ep, now):
            self.retired += 1
            return False
        self.reused += 1
        if self._on_acquire is not None:
            self._on_acquire(ep)
        return True

    async def acquire(self, upgrade: bool = False) -> tuple[Endpoint, bool]:
        """An endpoint ready for a new request, and whether it was reused."""
        while True:
            unusable = self._unusable
            while unusable:
                await trio.aclose_forcefully(unusable.pop().stream)
            if not self._idle:
                break
            ep = self.take(upgrade)
            if ep is not None:
                return ep, True
        stream = await self._connect()
        self.opened += 1
        ep = Endpoint(stream, MessageReader(requests=False, max_head=self._max_head))
        if self._on_acquire is not None:
            self._on_acquire(ep)
        return ep, False

    def keep(self, ep: Endpoint) -> bool:
        """Keep ``ep`` for reuse if its exchange completed cleanly (True); False: the caller
        closes it."""
        if ep.reader.reusable() and len(self._idle) < self._size:
            now = self._now()
            if self._retire is None or not self._retire(ep, now):
                ep.bytes_in = ep.bytes_out = 0
                self._idle.append((now, ep))
                return True
        return False

    async def release(self, ep: Endpoint) -> None:
        """Return ``ep`` for reuse if its exchange completed cleanly, else close it."""
        if not self.keep(ep):
            await trio.aclose_forcefully(ep.stream)

    async def sweep(self) -> int:
        """Close the idle connections past ``idle_timeout`` and those ``retire`` refuses now
        (their peer's or the own chain expired, their maximum age, a bundle that no longer
        verifies the peer, an own certificate rotated since), pooled or set aside for one
        client (``hold``); return how many. The sidecar calls it once a second
        (``SWEEP_INTERVAL``) and after a trust change: ``take`` looks only at the connection
        released last, so before the twenty-sixth session the ones under it were never
        looked at -- held open past their peer's certificate and ``max_connection_age``, and
        never counted (found by a hostile review); nor, before the twenty-seventh, the ones
        a client kept for itself (NTLM, Negotiate), which stayed open to a peer no longer
        trusted until that client's next request or its ``idle_timeout`` (found by a
        hostile review)."""
        idle, private = self._idle, self._private
        if not idle and not private:
            return 0
        now = self._now()
        retire, limit = self._retire, self._idle_timeout
        gone: list[Endpoint] = []
        if idle:
            keep: list[tuple[float, Endpoint]] = []
            for since, ep in idle:
                if now - since >= limit:
                    self.closed_stale += 1
                    gone.append(ep)
                elif retire is not None and retire(ep, now):
                    self.retired += 1
                    gone.append(ep)
                else:
                    keep.append((since, ep))
            if gone:
                self._idle = keep
        if private:
            for ep, (since, client) in list(private.items()):
                if client.private is not ep:  # (let go: its client's connection closed it)
                    del private[ep]
                    continue
                if now - since >= limit:
                    self.closed_stale += 1
                elif retire is not None and retire(ep, now):
                    self.retired += 1
                else:
                    continue
                # Taken from its client before any await: its next request takes a
                # connection from the pool, never this one being closed.
                del private[ep]
                client.private = None
                gone.append(ep)
        for ep in gone:
            await trio.aclose_forcefully(ep.stream)
        return len(gone)

    async def retire_idle(self) -> int:
        """``sweep`` now (after a rotation or a bundle change)."""
        return await self.sweep()

    async def aclose(self) -> None:
        """Close every idle connection (those set aside for a client too)."""
        idle, self._idle = self._idle, []
        unusable, self._unusable = self._unusable, []
        private, self._private = self._private, {}
        held = []
        for ep, (_, client) in private.items():
            if client.private is ep:
                client.private = None
                held.append(ep)
        for ep in unusable + [ep for _, ep in idle] + held:
            await trio.aclose_forcefully(ep.stream)

    def statistics(self) -> PoolStatistics:
        """The pool's counts now."""
        return PoolStatistics(len(self._idle), self.opened, self.reused, self.closed_stale,
                              len(self._private))
