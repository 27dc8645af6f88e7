"""Connections still in their TLS handshake make room on a full inbound listener.

Found by a hostile review (issue 8: "the sidecar stays responsive to well-behaved clients"
during connection floods): plain TCP connections that never send a TLS byte, from a few
sources each within ``max_connections_per_source``, filled ``max_connections`` of the
inbound listener and were reopened whenever ``handshake_timeout`` closed them; a caller with
a valid certificate was refused every time. Now a newcomer on a full listener closes the
oldest pending (not yet authenticated) connection of the source holding the most of them
(``sidecar_connections_refused_total{reason="handshake_evicted"}``); an established
connection is never closed for it, and the per-source limit stays as it was.

Sources are told apart by address (127.0.0.2... are loopback aliases on Linux; ``::1`` on a
dual-stack listener). Every loop is bounded in count and time; every process is stopped by
its pid (the ``procs`` fixture).
"""

from __future__ import annotations

import contextlib
import http.client as httpclient
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Pki,
    free_port,
    http,
    loopback_alias_works,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)

ALIASES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

pytestmark = pytest.mark.skipif(not all(loopback_alias_works(a) for a in ALIASES),
                                reason="127.0.0.2-4 are not usable loopback addresses here")

# The defaults' ratio (max_connections 1024 = 4 x max_connections_per_source 256), small.
LIMITS = {"max_connections": 8, "max_connections_per_source": 5}
EVICTED = "handshake_evicted"


# --- helpers --------------------------------------------------------------------------------


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (what a client sends first)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="orders")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100
    return hello


HALF_HELLO = "half_hello"
SILENT = "silent"


def flood_connection(port: int, source: str, kind: str, host: str = "127.0.0.1") -> socket.socket:
    """One connection from ``source`` that never completes a handshake: silent (not one
    TLS byte) or the first half of a ClientHello."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.bind((source, 0))
        s.connect((host, port))
        if kind == HALF_HELLO:
            hello = client_hello()
            s.sendall(hello[: len(hello) // 2])
    except BaseException:
        s.close()
        raise
    return s


def closed_by_server(s: socket.socket, wait: float = 3.0) -> bool:
    """Did the sidecar close ``s`` (EOF or reset within ``wait`` seconds)?"""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def still_open(s: socket.socket) -> bool:
    """``s`` not closed by the sidecar (checked without waiting)."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


class KeepAlive:
    """An established mTLS keep-alive connection from ``source`` (one request answered)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, source: str) -> None:
        self.conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5,
                                               source_address=(source, 0))
        assert self.get("/first") == 200

    def get(self, path: str) -> int:
        return http(0, "GET", path, conn=self.conn).status

    def close(self) -> None:
        self.conn.close()


def served(port: int, ctx: ssl.SSLContext, source: str = "127.0.0.1",
           host: str = "127.0.0.1") -> bool:
    """One request from ``source`` over a new mTLS connection: answered 200?"""
    conn = httpclient.HTTPSConnection(host, port, context=ctx, timeout=5,
                                      source_address=(source, 0))
    try:
        return http(0, "GET", "/served", conn=conn).status == 200
    except (OSError, httpclient.HTTPException):
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def inbound_sidecar(tmp: Path, procs: list[Any], *, listen: str = "127.0.0.1",
                    limits: dict[str, Any] | None = None) -> Iterator[tuple[Any, int,
                                                                             ssl.SSLContext]]:
    pki = Pki(tmp / "pki")
    app, app_port = start_app(tmp)
    procs.append(app)
    port = free_port()
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"{listen}:{port}" if ":" not in listen
                                  else f"[{listen}]:{port}",
                                  "app": f"127.0.0.1:{app_port}",
                                  "allow_from": [spiffe("frontend")]},
                         limits={**LIMITS, "handshake_timeout": "30s", **(limits or {})})
    proc = start_sidecar(tmp, "orders", cfg)
    procs.append(proc)
    yield proc, port, mtls_context(pki.identity("frontend"), pki.bundle)


def open_inbound(proc: Any) -> float:
    """Established inbound connections open now (``sidecar_connections_open``)."""
    return float(proc.metric("sidecar_connections_open", direction="inbound"))


def refused(proc: Any, reason: str, listener: str = "inbound") -> float:
    return float(proc.metric("sidecar_connections_refused_total", listener=listener,
                             reason=reason))


@contextlib.contextmanager
def held(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for s in sockets:
            s.close()


def settle() -> None:
    """Let the sidecar accept what the kernel queued (no result depends on more)."""
    time.sleep(0.3)


# --- the review's scenario, as a family ------------------------------------------------------


@pytest.mark.parametrize("kind", [SILENT, HALF_HELLO])
def test_two_flooding_sources_cannot_lock_out_a_caller(tmp_path: Path, procs: list[Any],
                                                       kind: str) -> None:
    """4 + 4 unauthenticated connections fill the listener (each source within its share);
    a caller with a valid certificate from the first flooder's own address is served, by
    closing that source's oldest pending connection (its own source first among equals),
    and nothing else."""
    with inbound_sidecar(tmp_path, procs) as (proc, port, ctx):
        flood_a = [flood_connection(port, "127.0.0.1", kind) for _ in range(4)]
        flood_b = [flood_connection(port, ALIASES[0], kind) for _ in range(4)]
        with held(flood_a + flood_b):
            settle()
            assert served(port, ctx)
            assert closed_by_server(flood_a[0])  # the oldest of the newcomer's source
            assert all(still_open(s) for s in flood_a[1:] + flood_b)
            assert refused(proc, EVICTED) == 1
            assert refused(proc, "max_connections") == 0
            # Again and again: the flooder fills the slot again, the next caller takes it.
            for i in range(3):
                wait_for(lambda: open_inbound(proc) == 0, timeout=10)
                settle()
                flood_a.append(flood_connection(port, "127.0.0.1", kind))
                settle()
                assert served(port, ctx)
                assert closed_by_server(flood_a[i + 1])
                assert refused(proc, EVICTED) == i + 2
            assert all(still_open(s) for s in flood_a[4:] + flood_b)
            assert refused(proc, "max_connections") == 0


@pytest.mark.parametrize("kind", [SILENT, HALF_HELLO])
def test_flooder_loses_its_own_pending_connections_first(tmp_path: Path, procs: list[Any],
                                                         kind: str) -> None:
    """One heavy flooder (5 pending) and a lighter source (3 pending, opened earlier):
    newcomers from either source close the heavy source's connections, oldest first, never
    the lighter source's older ones."""
    with inbound_sidecar(tmp_path, procs, limits={"max_connections_per_source": 6}) \
            as (proc, port, ctx):
        light = [flood_connection(port, ALIASES[1], kind) for _ in range(3)]
        heavy = [flood_connection(port, ALIASES[0], kind) for _ in range(5)]
        with held(light + heavy):
            settle()
            newcomers = [flood_connection(port, ALIASES[0], kind),
                         flood_connection(port, ALIASES[1], kind)]
            with held(newcomers):
                settle()
                assert closed_by_server(heavy[0]) and closed_by_server(heavy[1])
                assert all(still_open(s) for s in heavy[2:] + light + newcomers)
                assert refused(proc, EVICTED) == 2
                # A caller from a third source is served too (heavy holds 4 + 1 now).
                assert served(port, ctx, source=ALIASES[2])
                assert closed_by_server(heavy[2])
                assert all(still_open(s) for s in light)


def test_several_sources_half_hellos_and_silence_mixed(tmp_path: Path, procs: list[Any]) -> None:
    """Four sources, silent and half-sent ClientHellos mixed, 2 each: every caller from
    127.0.0.1 is served."""
    with inbound_sidecar(tmp_path, procs) as (proc, port, ctx):
        flood = [flood_connection(port, src, kind)
                 for src in ("127.0.0.1", *ALIASES) for kind in (SILENT, HALF_HELLO)]
        with held(flood):
            settle()
            assert sum(served(port, ctx) for _ in range(6)) == 6
            # (a caller that comes before the previous one's slot is free takes a pending
            # connection's, one that comes after takes the free one)
            assert 1 <= refused(proc, EVICTED) <= 6
            assert refused(proc, "max_connections") == 0
            assert sum(not still_open(s) for s in flood) == refused(proc, EVICTED)


def test_established_keep_alive_connections_are_never_evicted(tmp_path: Path,
                                                              procs: list[Any]) -> None:
    """A listener full of established keep-alive connections refuses newcomers as before
    (``max_connections``), flood or caller: none of the established ones is closed for
    them, and each still serves its next request. With pending ones among them, only those
    make room."""
    with inbound_sidecar(tmp_path, procs) as (proc, port, ctx):
        kept = [KeepAlive(port, ctx, src) for src in ("127.0.0.1", ALIASES[0])
                for _ in range(4)]
        try:
            flood = [flood_connection(port, ALIASES[1], SILENT) for _ in range(4)]
            flood += [flood_connection(port, ALIASES[2], HALF_HELLO) for _ in range(4)]
            with held(flood):
                assert all(closed_by_server(s) for s in flood)
                assert not served(port, ctx, source=ALIASES[1])
            assert refused(proc, EVICTED) == 0
            assert refused(proc, "max_connections") == 9
            assert all(k.get(f"/again-{i}") == 200 for i, k in enumerate(kept))
            # Half of them go: pending connections take the free slots; a caller then
            # takes a pending one's slot, never an established one's.
            for k in kept[4:]:
                k.close()
            wait_for(lambda: served(port, ctx, source=ALIASES[0]), timeout=10)
            wait_for(lambda: open_inbound(proc) == 4, timeout=10)
            settle()
            before_evicted = refused(proc, EVICTED)
            flood = [flood_connection(port, ALIASES[1], SILENT) for _ in range(4)]
            with held(flood):
                settle()
                assert served(port, ctx, source=ALIASES[2])
                assert refused(proc, EVICTED) == before_evicted + 1
                assert closed_by_server(flood[0])
                assert all(still_open(s) for s in flood[1:])
                assert all(k.get(f"/third-{i}") == 200 for i, k in enumerate(kept[:4]))
        finally:
            for k in kept:
                k.close()


def test_per_source_limit_still_holds_on_a_full_listener(tmp_path: Path, procs: list[Any]) -> None:
    """A newcomer whose source already holds its share is refused as before, and closes
    nothing: eviction never lets a source past ``max_connections_per_source``."""
    with inbound_sidecar(tmp_path, procs) as (proc, port, ctx):
        flood = [flood_connection(port, ALIASES[0], SILENT) for _ in range(5)]
        flood += [flood_connection(port, ALIASES[1], SILENT) for _ in range(3)]
        with held(flood):
            settle()
            extra = flood_connection(port, ALIASES[0], SILENT)
            with held([extra]):
                assert closed_by_server(extra)
                assert all(still_open(s) for s in flood)
                assert refused(proc, EVICTED) == 0
                assert refused(proc, "max_connections") == 1


def test_reopening_flood_from_two_address_families(tmp_path: Path, procs: list[Any]) -> None:
    """The review's repro: a dual-stack listener, 4 silent connections from 127.0.0.1 and 4
    from ::1, each reopened as soon as the sidecar closes it; a caller with a valid
    certificate from 127.0.0.1 is served (before: 0 of 32 attempts)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not usable here")
    with inbound_sidecar(tmp_path, procs, listen="::",
                         limits={"handshake_timeout": "2s"}) as (proc, port, ctx):
        stop = time.monotonic() + 8
        opened = {"v4": 0, "v6": 0}

        def hold(source: str, key: str) -> None:
            while time.monotonic() < stop:
                try:
                    s = flood_connection(port, source, SILENT,
                                         host="::1" if ":" in source else "127.0.0.1")
                except OSError:
                    time.sleep(0.05)
                    continue
                opened[key] += 1
                with contextlib.closing(s):
                    s.settimeout(max(0.1, stop - time.monotonic()))
                    with contextlib.suppress(OSError):
                        s.recv(1)  # until the sidecar closes it

        threads = [threading.Thread(target=hold, args=("127.0.0.1", "v4"), daemon=True)
                   for _ in range(4)]
        threads += [threading.Thread(target=hold, args=("::1", "v6"), daemon=True)
                    for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            callers = tries = 0
            while callers < 6 and time.monotonic() < stop - 1.0:
                callers += 1
                # A well-behaved caller retries: its handshake can still be the oldest
                # pending one when the flooder reopens faster than it completes.
                for _ in range(6):
                    tries += 1
                    if served(port, ctx):
                        break
                else:
                    pytest.fail(f"caller {callers} not served in 6 tries")
                time.sleep(0.2)
        finally:
            for t in threads:
                t.join(timeout=15)
        assert callers >= 4
        assert refused(proc, EVICTED) >= callers
        assert refused(proc, "max_connections") == 0  # (a full listener always made room)
        assert opened["v4"] >= 4 and opened["v6"] >= 4


# --- the outbound listener: no handshake, nothing pending --------------------------------------


def test_outbound_listener_refuses_when_full_as_before(tmp_path: Path, procs: list[Any]) -> None:
    """An outbound listener shares the accept loop, but its connections (the local app's,
    plain) have no handshake to wait for: a full one refuses newcomers (``max_connections``)
    and closes none of its connections for them."""
    pki = Pki(tmp_path / "pki")
    app, app_port = start_app(tmp_path)
    procs.append(app)
    server = start_sidecar(tmp_path, "server", sidecar_config(
        pki.identity("orders"),
        inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}",
                 "allow_from": [spiffe("frontend")]}))
    procs.append(server)
    client = start_sidecar(tmp_path, "client", sidecar_config(
        pki.identity("frontend"),
        outbound=[{"name": "orders", "listen": f"127.0.0.1:{free_port()}",
                   "upstream": f"127.0.0.1:{server.port('inbound')}",
                   "identity": spiffe("orders")}],
        limits=LIMITS))
    procs.append(client)
    port = client.port("orders")
    flood = [flood_connection(port, src, SILENT) for src in ("127.0.0.1", ALIASES[0])
             for _ in range(4)]
    with held(flood):
        settle()
        extra = flood_connection(port, ALIASES[1], SILENT)
        with held([extra]):
            assert closed_by_server(extra)
            assert all(still_open(s) for s in flood)
        assert refused(client, "max_connections", listener="orders") == 1
        assert refused(client, EVICTED, listener="orders") == 0


# --- the bookkeeping itself (pure) -------------------------------------------------------------


def test_pending_connections_find_the_heaviest_sources_oldest() -> None:
    from sidecar.net.listen import Admission, PendingConnections

    pending = PendingConnections()
    assert pending.oldest_of_most("10.0.0.1") is None
    a = [Admission("10.0.0.1") for _ in range(3)]
    b = [Admission("10.0.0.2") for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        pending.add(x)
        pending.add(y)
    assert pending.count == 6
    # Equals: the newcomer's own source first; another newcomer gets the first to get there.
    assert pending.oldest_of_most("10.0.0.2") is b[0]
    assert pending.oldest_of_most("10.0.0.9") is a[0]
    pending.remove(a[0])
    assert pending.oldest_of_most("10.0.0.1") is b[0]  # 10.0.0.2 holds the most now
    pending.remove(b[1])  # (established: leaves from the middle)
    assert pending.oldest_of_most(None) in (a[1], b[0])
    for x in (a[1], a[2], b[0], b[2]):
        pending.remove(x)
    assert pending.count == 0 and pending.oldest_of_most(None) is None
    assert pending.held("10.0.0.1") == 0 and not pending._by_source and not pending._by_count


def test_pending_connections_match_a_naive_model() -> None:
    """Random adds and removes over a few sources: ``oldest_of_most`` is always the oldest
    entry of a source with the most entries (bounded: 2000 steps)."""
    import random

    from sidecar.net.listen import Admission, PendingConnections

    rng = random.Random(8)
    pending = PendingConnections()
    model: dict[str, list[Admission]] = {}
    for _ in range(2000):
        if model and rng.random() < 0.45:
            source = rng.choice(sorted(model))
            entry = model[source].pop(rng.randrange(len(model[source])))
            if not model[source]:
                del model[source]
            pending.remove(entry)
        else:
            source = f"10.0.0.{rng.randrange(5)}"
            entry = Admission(source)
            model.setdefault(source, []).append(entry)
            pending.add(entry)
        most = max((len(v) for v in model.values()), default=0)
        got = pending.oldest_of_most("10.0.0.0")
        if most == 0:
            assert got is None
            continue
        assert got is not None and len(model[got.source]) == most
        assert model[got.source][0] is got
        if len(model.get("10.0.0.0", [])) == most:
            assert got.source == "10.0.0.0"
        assert pending.count == sum(len(v) for v in model.values())
