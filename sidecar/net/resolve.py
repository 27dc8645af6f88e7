"""The sidecar's own hostname resolver: name lookups never share Trio's default thread pool.

Why
---
Trio's ``getaddrinfo`` runs ``socket.getaddrinfo`` in a worker thread under Trio's *default*
``CapacityLimiter`` (40 threads). A caller's deadline (``limits.connect_timeout``) abandons the
wait, not the thread: it keeps its token until the system resolver answers, which with glibc's
retries over a search list (``ndots:5`` in a Kubernetes pod) takes minutes. The file watchers
(policy, certificates, bundles, ``jwks_file``) also run in threads under that default limiter,
so 40 slow lookups of one upstream name froze every reload: a withdrawn egress stayed allowed
for as long as DNS was slow (found by a hostile review).

What
----
``install`` (called once per ``trio.run`` of a process that connects by name: every ``sidecar
run`` worker) sets a ``Resolver`` with ``trio.socket.set_custom_hostname_resolver``, so every
``trio.open_tcp_stream``, ``trio.socket`` ``connect``/``bind`` of the process resolves here:
outbound upstreams, the inbound app address, the control-plane client (JWKS, discovery,
introspection, alert webhooks) and the audit shipper.

* **Its own threads.** At most ``MAX_THREADS`` (8) lookups run at once, under a
  ``CapacityLimiter`` of their own: hung lookups pin these threads, never the default pool.
* **Bounded wait.** A lookup that finds every thread taken waits at most ``QUEUE_WAIT``
  (1 s) for one -- less if the caller's deadline comes first -- and fails with ``EAI_AGAIN``
  ("resolver busy", result ``busy``); at most ``MAX_QUEUED`` (64) lookups wait at once, the
  next fails at once. Nothing queues without bound.
* **Cancellable.** A caller waits on an event, so its deadline frees it at once; the thread
  runs on (a blocking ``getaddrinfo`` cannot be stopped) and its answer fills the cache.
* **Single flight.** Concurrent lookups of the same ``(host, port, family, type, proto,
  flags)`` share one thread and one set of DNS queries.
* **Short positive cache.** An answer is reused for ``CACHE_TTL`` (5 s), at most
  ``CACHE_ENTRIES`` (256) keys, oldest dropped first. ``getaddrinfo`` gives no TTL; 5 s absorbs
  reconnect bursts (a pool refilling, an app retrying) and still follows an address change
  within seconds. A stale address cannot impersonate a peer: outbound connections check the
  peer's SPIFFE ID after every handshake. Failures are not cached (the next lookup asks
  again), but concurrent ones share their one failure.
* **Numeric hosts never touch a thread.** An IP literal is answered by ``getaddrinfo`` with
  ``AI_NUMERICHOST | AI_NUMERICSERV`` in the event loop (Trio does the same before calling a
  custom resolver; this resolver checks again, for direct callers).

Counted in ``sidecar_dns_lookups_total{result}`` (``resolved``, ``cached``, ``failed``,
``busy``, ``abandoned``) and ``sidecar_dns_lookups_in_flight`` (threads in ``getaddrinfo`` now,
abandoned ones included); ``dns_resolver_saturated`` is logged (at most once a minute) when
every thread is taken. docs/operations.md "Name resolution", docs/metrics.md.
"""

from __future__ import annotations

import copy
import socket
import time
from collections import OrderedDict
from typing import Any

import trio

from sidecar import logs
from sidecar.metrics import SidecarMetrics

MAX_THREADS = 8
QUEUE_WAIT = 1.0
MAX_QUEUED = 64
CACHE_TTL = 5.0
CACHE_ENTRIES = 256
SATURATED_LOG_INTERVAL = 60.0

# The outcomes a lookup is counted under (``sidecar_dns_lookups_total{result}``).
RESULTS: tuple[str, ...] = ("resolved", "cached", "failed", "busy", "abandoned")

_NUMERIC_ONLY = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV

Key = tuple[Any, Any, int, int, int, int]
Answer = list[tuple[Any, ...]]


class _Flight:
    """One ``getaddrinfo`` call shared by every concurrent lookup of its key."""

    __slots__ = ("answer", "done", "error", "key")

    def __init__(self, key: Key) -> None:
        self.key = key
        self.done = trio.Event()
        self.answer: Answer = []
        self.error: BaseException | None = None


class ResolverBusy(socket.gaierror):
    """Every lookup thread stayed taken for ``QUEUE_WAIT``: the lookup was not started. An
    ``OSError``, so callers treat it like any failed lookup (outbound: 502
    ``upstream_connect_failed``)."""

    def __init__(self, *_args: object) -> None:  # (``copy.copy`` passes the args back)
        super().__init__(socket.EAI_AGAIN, "resolver busy: every lookup thread is taken")


class Resolver(trio.abc.HostnameResolver):
    """Bounded, coalescing, caching ``getaddrinfo`` (module docstring)."""

    def __init__(self, metrics: SidecarMetrics | None = None, *, threads: int = MAX_THREADS,
                 queue_wait: float = QUEUE_WAIT, max_queued: int = MAX_QUEUED,
                 ttl: float = CACHE_TTL, entries: int = CACHE_ENTRIES) -> None:
        self.limiter = trio.CapacityLimiter(threads)
        self.queue_wait = queue_wait
        self.max_queued = max_queued
        self.ttl = ttl
        self.entries = entries
        self._flights: dict[Key, _Flight] = {}
        self._queued = 0
        self._running = 0
        self._cache: OrderedDict[Key, tuple[float, Answer]] = OrderedDict()
        self._saturated_logged = -SATURATED_LOG_INTERVAL
        self._token = trio.lowlevel.current_trio_token()
        self._counts = {r: (metrics.dns_lookups_total.labels(r) if metrics else None)
                        for r in RESULTS}
        if metrics is not None:
            metrics.dns_lookups_in_flight.set_function(lambda: float(self._running))

    def _count(self, result: str) -> None:
        child = self._counts[result]
        if child is not None:
            child.inc()

    async def getaddrinfo(self, host: bytes | None, port: bytes | str | int | None,
                          family: int = 0, type: int = 0, proto: int = 0,
                          flags: int = 0) -> Answer:
        """``socket.getaddrinfo``'s answer: an IP literal at once, else from the cache, a
        lookup in flight or a new one (``ResolverBusy`` when no thread came free)."""
        try:
            return socket.getaddrinfo(host, port, family, type, proto, flags | _NUMERIC_ONLY)
        except socket.gaierror as exc:
            if exc.errno != socket.EAI_NONAME:
                raise
        key: Key = (host, port, family, type, proto, flags)
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > time.monotonic():
                self._cache.move_to_end(key)
                self._count("cached")
                return list(hit[1])
            del self._cache[key]
        flight = self._flights.get(key)
        if flight is None:
            if self._queued >= self.max_queued:
                self._count("busy")
                raise ResolverBusy()
            flight = self._flights[key] = _Flight(key)
            self._queued += 1  # until ``_fly`` has a thread for it or gives up
            trio.lowlevel.spawn_system_task(self._fly, flight, name=f"resolve {host!r}")
        try:
            await flight.done.wait()
        except trio.Cancelled:
            self._count("abandoned")
            raise
        if flight.error is not None:
            self._count("busy" if isinstance(flight.error, ResolverBusy) else "failed")
            # Each waiter raises its own copy: one exception object raised in many tasks
            # would collect all their tracebacks.
            raise copy.copy(flight.error) from None
        self._count("resolved")
        return list(flight.answer)

    async def _fly(self, flight: _Flight) -> None:
        """Wait (bounded) for a thread, then start the lookup in it. A system task: it must
        never raise, so every way out ends the flight."""
        try:
            with trio.move_on_after(self.queue_wait):
                await self.limiter.acquire_on_behalf_of(flight)
                self._start(flight)
                return
            self._land(flight, None, ResolverBusy(), release=False)
        except trio.Cancelled:  # the process is stopping
            self._land(flight, None, OSError("lookup cancelled"), release=False)
            raise
        except Exception as exc:  # noqa: BLE001 -- a bug: fail this lookup, not the process
            if not flight.done.is_set():
                self._land(flight, None, OSError(f"lookup failed: {exc!r}"), release=False)
            logs.log("internal_error", "error", error=repr(exc), where="dns resolver")
        finally:
            self._queued -= 1

    def _start(self, flight: _Flight) -> None:
        self._running += 1
        if self.limiter.available_tokens == 0:
            now = time.monotonic()
            if now - self._saturated_logged >= SATURATED_LOG_INTERVAL:
                self._saturated_logged = now
                logs.log("dns_resolver_saturated", "warning", threads=self.limiter.total_tokens,
                         message="every name-lookup thread is waiting for the resolver; "
                                 "further lookups fail after a short wait")
        token, key = self._token, flight.key

        def deliver(result: Any) -> None:  # in the worker thread (an ``outcome.Outcome``)
            answer: Answer | None = None
            error: BaseException | None = None
            try:
                answer = result.unwrap()
            except BaseException as exc:  # noqa: BLE001 -- handed to the waiters
                error = exc
            try:
                token.run_sync_soon(self._land, flight, answer, error)
            except trio.RunFinishedError:
                pass  # the process is stopping; nobody waits for the answer

        trio.lowlevel.start_thread_soon(lambda: socket.getaddrinfo(*key), deliver,
                                        name=f"sidecar resolve {key[0]!r}")

    def _land(self, flight: _Flight, answer: Answer | None, error: BaseException | None, *,
              release: bool = True) -> None:
        if release:
            self._running -= 1
            self.limiter.release_on_behalf_of(flight)
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if error is None and answer is not None:
            flight.answer = answer
            self._cache[flight.key] = (time.monotonic() + self.ttl, answer)
            self._cache.move_to_end(flight.key)
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        else:
            flight.error = error if error is not None else OSError("lookup gave no answer")
        flight.done.set()

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int],
                          flags: int) -> tuple[str, str]:
        """``socket.getnameinfo`` on the resolver's threads (the sidecar does not call it)."""
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags,
                                             limiter=self.limiter, abandon_on_cancel=True)


def install(metrics: SidecarMetrics | None = None) -> Resolver:
    """Resolve every name of this ``trio.run`` through a fresh ``Resolver`` (call it first
    thing inside the run: the setting is per run)."""
    resolver = Resolver(metrics)
    trio.socket.set_custom_hostname_resolver(resolver)
    return resolver
