"""Upstream connections kept private to one app connection end with their trust, as pooled ones.

Found by a hostile review (session 27): an app request through an outbound listener that
carries connection-oriented authentication (``Authorization: NTLM ...``, Negotiate,
Kerberos, CredSSP -- ``CONNECTION_AUTH_SCHEMES`` -- or that the upstream answered with a 401
asking for one) keeps its upstream mTLS connection for that app connection alone
(``Endpoint.private``, ``sidecar.net.forward``), outside the pool. The once-a-second sweep
looked only at the pool, so such a connection stayed open, uncounted, past its peer's
certificate, a bundle that no longer trusts its root, ``max_connection_age`` and
``pool_idle_timeout``, until the app's next request or its ``idle_timeout``.

The family, through a real outbound sidecar and a scripted mTLS upstream: every reason an
idle upstream connection must go (``WHYS``) x every way an app connection keeps one
(``HOLDERS``: each connection-oriented scheme, a 401 challenge, and the pooled control), idle;
and for the reasons that are a loss of trust, the same connections while a request runs
over them (``in_flight``: the request is cut). Each reason runs once (one sidecar, one
upstream, all members at once); each member is asserted on its own upstream connection:
closed by the sidecar with no further request, and the closure counted with its reason.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.http.request import CONNECTION_AUTH_SCHEMES
from sidecar.identity.ca import DevCA, write_svid
from tests.harness import (
    TD,
    Pki,
    ScriptedServer,
    free_port,
    http,
    mtls_context,
    read_head,
    replace_file,
    request_target,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

# How an app connection holds its upstream connection: a request header each (None: the
# upstream's 401 asks for NTLM; "pooled": no connection-oriented authentication at all, the
# control). Built from the schemes forward.py keeps private, so a new one is covered too.
HOLDERS: dict[str, dict[str, str] | None] = {
    **{scheme.decode(): {"Authorization": f"{scheme.decode().upper()} TlRMTVNTUAABAAAAB4IIog=="}
       for scheme in sorted(CONNECTION_AUTH_SCHEMES)},
    "challenge_401": None,
    "pooled": {},
}


@dataclass(frozen=True)
class Why:
    """Why an idle upstream connection must go: the limits it runs under, the reason its
    closure is counted with (None: not a retirement -- ``pool_idle_timeout`` closes it as
    stale), and whether it is a loss of trust (then a request in flight is cut too)."""

    limits: dict[str, Any]
    reason: str | None
    cuts_in_flight: bool = False


WHYS: dict[str, Why] = {
    # the upstream's leaf expires (it is issued for a few seconds)
    "peer_cert_expired": Why({}, "peer_cert_expired", True),
    # the bundle file drops the upstream's root and loads (a bundle change)
    "bundle_drops_root": Why({}, "peer_untrusted", True),
    # the bundle file is replaced by an unrelated root: the own set fails, the roots it no
    # longer lists are withdrawn at once (``trust_roots_withdrawn``)
    "roots_withdrawn": Why({}, "peer_untrusted", True),
    # (a grace longer than the test: the app connections, retired for their own age, stay)
    "max_age": Why({"max_connection_age": "4s", "max_connection_age_jitter": 0,
                    "connection_close_grace": "120s"}, "max_age"),
    "pool_idle_timeout": Why({"pool_idle_timeout": "4s"}, None),
    # the own certificate is rotated (a new SVID from the same root)
    "own_cert_rotated": Why({}, "own_cert_rotated"),
}
PEER_TTL = 6  # seconds the upstream's leaf is valid for, in "peer_cert_expired"
SLOW_BYTES = 300  # an in-flight answer: one byte every 0.1 s (30 s: longer than any wait)

MEMBERS = [(why, holder, "idle") for why in WHYS for holder in HOLDERS] + [
    (why, holder, "in_flight") for why in WHYS if WHYS[why].cuts_in_flight for holder in HOLDERS]


@dataclass
class Seen:
    """One upstream connection as the scripted upstream saw it."""

    requests: int = 0
    ended: float | None = None  # monotonic time the sidecar closed or reset it


class Upstream(ScriptedServer):
    """An mTLS upstream (``orders``), or a plain app, answering keep-alive requests: ``.../slow`` gets a body
    dribbled for ``SLOW_BYTES`` tenths of a second, ``/challenge...`` a 401 offering NTLM,
    anything else a 200. Each connection is named by the path of its first request
    (``/<label>/...``) and recorded in ``seen``."""

    timeout = 60.0

    def __init__(self, client_bundle: Path | None) -> None:
        ctx = None  # (None: a plain app behind an inbound listener)
        if client_bundle is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_verify_locations(str(client_bundle))
            ctx.verify_mode = ssl.CERT_REQUIRED
        self.seen: dict[str, Seen] = {}
        self.requests_before: dict[str, int] = {}  # (each connection's, before the wait)
        self.slow_started: set[str] = set()
        self.lock = threading.Lock()
        super().__init__(ctx)

    def present(self, d: Path) -> None:
        """Present the SVID written in ``d`` to the connections accepted from now on."""
        assert self.ctx is not None
        self.ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))

    def serve(self, sock: socket.socket) -> None:
        seen: Seen | None = None
        try:
            while True:
                head = read_head(sock)
                if b"\r\n\r\n" not in head:
                    break  # the sidecar closed it
                target = request_target(head)
                label = target.split("/")[1]
                if seen is None:
                    with self.lock:
                        seen = self.seen.setdefault(label, Seen())
                seen.requests += 1
                if target.endswith("/slow"):
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % SLOW_BYTES)
                    with self.lock:
                        self.slow_started.add(label)
                    for _ in range(SLOW_BYTES):
                        if self.stopped.is_set():
                            return
                        sock.sendall(b"x")
                        time.sleep(0.1)
                elif target.startswith("/challenge"):
                    sock.sendall(b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: NTLM\r\n"
                                 b"content-length: 0\r\n\r\n")
                else:
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except OSError:  # (a reset from the sidecar; ssl.SSLError is one)
            pass
        if seen is not None and not self.stopped.is_set():
            seen.ended = time.monotonic()


def _label(holder: str, state: str) -> str:
    # (a 401-challenge holder's paths start with /challenge: the upstream answers 401 there)
    return f"challenge-{state}" if holder == "challenge_401" else f"{holder}-{state}"


@dataclass
class Outcome:
    """What one reason's run left: the upstream's view, the sidecar's log, and the moment
    the reason took effect."""

    upstream: Upstream
    sidecar: Any
    upstream_source: str
    members: list[tuple[str, str]]  # (holder, state)
    requests_before: dict[str, int] = field(default_factory=dict)
    closed_log: list[dict[str, Any]] = field(default_factory=list)


def _hold(port: int, upstream: Upstream, holder: str, state: str, conns: list[Any],
          threads: list[threading.Thread], ctx: ssl.SSLContext | None = None) -> None:
    """Open a client connection (the app's to an outbound listener; a peer's, over mTLS
    with ``ctx``, to an inbound one) that holds its upstream connection as ``holder`` says:
    idle after one request, or (``in_flight``) running a slow answer over the same upstream
    connection (its second request)."""
    import http.client as httpclient

    c = (httpclient.HTTPConnection("127.0.0.1", port, timeout=60) if ctx is None
         else httpclient.HTTPSConnection("127.0.0.1", port, timeout=60, context=ctx))
    conns.append(c)
    label = _label(holder, state)
    headers = HOLDERS[holder] or {}
    r = http(port, "GET", f"/{label}/first", headers=headers, conn=c)
    assert r.status == (401 if holder == "challenge_401" else 200), (holder, r.status)
    if state == "in_flight":
        def slow() -> None:
            try:
                http(port, "GET", f"/{label}/slow", headers=headers, conn=c, timeout=60)
            except (OSError, httpclient.HTTPException):
                pass  # (cut: what the test expects)

        t = threading.Thread(target=slow, daemon=True)
        t.start()
        threads.append(t)
        # (running before the next member's request: the pooled one then takes no other)
        wait_for(lambda: label in upstream.slow_started, timeout=10)


def _run(tmp: Path, why: str, procs: list[Any]) -> Outcome:
    spec = WHYS[why]
    pki = Pki(tmp / "pki")  # the frontend's root (R0)
    orders_ca = DevCA.create(TD)  # the upstream's root (R1), in the frontend's bundle too
    frontend = pki.identity("frontend")
    both_roots = pki.ca.bundle_pem + orders_ca.bundle_pem
    replace_file(frontend / "ca.crt", both_roots)
    upstream = Upstream(Path(pki.bundle))
    try:
        cfg = sidecar_config(frontend, outbound=[{
            "name": "orders", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{upstream.port}", "identity": spiffe("orders")}],
            limits={"idle_timeout": "120s", **spec.limits})
        sidecar = start_sidecar(tmp, "frontend", cfg)
        procs.append(sidecar)
        ttl = PEER_TTL if why == "peer_cert_expired" else 86400
        start = time.time()
        expires = start + ttl
        upstream.present(write_svid(orders_ca.issue(spiffe("orders"), ttl_seconds=ttl + 60,
                                                    not_before=start - 60),
                                    orders_ca, tmp / "orders"))
        port = sidecar.port("orders")
        members = [(h, s) for (w, h, s) in MEMBERS if w == why]
        conns: list[Any] = []
        threads: list[threading.Thread] = []
        out = Outcome(upstream, sidecar, f"127.0.0.1:{upstream.port}", members)
        try:
            # The private ones first, then the pooled in-flight one, then the pooled idle one:
            # each takes a new upstream connection (none is idle in the pool meanwhile).
            order = sorted(members, key=lambda m: (m[0] == "pooled", m[1] == "idle"))
            for holder, state in order:
                _hold(port, upstream, holder, state, conns, threads)
            assert len(upstream.seen) == len(members), sorted(upstream.seen)
            assert all(s.ended is None for s in upstream.seen.values())
            out.requests_before = {k: s.requests for k, s in upstream.seen.items()}
            # The reason takes effect.
            # (the own bundle is watched with the own certificate: one set, reloaded whole)
            reloads = len(sidecar.log_events("certificates_reloaded"))
            if why == "bundle_drops_root":
                replace_file(frontend / "ca.crt", pki.ca.bundle_pem)
                wait_for(lambda: len(sidecar.log_events("certificates_reloaded")) > reloads,
                         timeout=10)
            elif why == "roots_withdrawn":
                replace_file(frontend / "ca.crt", DevCA.create(TD).bundle_pem)
                wait_for(lambda: sidecar.log_events("trust_roots_withdrawn"), timeout=10)
            elif why == "own_cert_rotated":
                issued = pki.ca.issue(spiffe("frontend"))
                replace_file(frontend / "tls.key", issued.key_pem)
                replace_file(frontend / "tls.crt", issued.chain_pem)
                wait_for(lambda: len(sidecar.log_events("certificates_reloaded")) > reloads,
                         timeout=10)
            elif why == "peer_cert_expired":
                time.sleep(max(0.0, expires - time.time()))
            # Every upstream connection is closed by the sidecar with no further request
            # (generous: the sweep runs once a second; the age and idle limits are 2-3 s).
            try:
                wait_for(lambda: all(s.ended is not None for s in upstream.seen.values()),
                         timeout=20)
            except TimeoutError:
                pass  # (each member says which of them stayed open)
            if spec.reason is not None:
                try:
                    wait_for(lambda: len([e for e in sidecar.log_events("connection_closed")
                                          if e.get("reason") == spec.reason]) >= len(members),
                             timeout=5)
                except TimeoutError:
                    pass
            out.closed_log = sidecar.log_events("connection_closed")
        finally:
            for c in conns:
                c.close()
            for t in threads:
                t.join(timeout=10)
        return out
    finally:
        upstream.close()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Callable[[str], Outcome]]:
    """Each reason's run, made once per module (per xdist worker) when a member asks for it;
    every process started is stopped by pid at the end."""
    procs: list[Any] = []
    done: dict[str, Outcome] = {}

    def get(why: str) -> Outcome:
        if why not in done:
            done[why] = _run(tmp_path_factory.mktemp(why), why, procs)
        return done[why]

    try:
        yield get
    finally:
        for p in reversed(procs):
            p.stop(timeout=10)


@pytest.mark.parametrize(("why", "holder", "state"), MEMBERS,
                         ids=[f"{w}-{h}-{s}" for w, h, s in MEMBERS])
def test_upstream_connection_ends_with_its_trust_without_a_request(
        outcomes: Callable[[str], Outcome], why: str, holder: str, state: str) -> None:
    """Each idle upstream connection -- pooled, or kept private to one app connection by
    connection-oriented authentication -- is closed by the sidecar once its peer's leaf
    expires, its root leaves the bundle, it reaches ``max_connection_age``, it idles past
    ``pool_idle_timeout`` or the own certificate rotates, with no request to look at it, and
    its closure is counted with that reason; one a request runs over is cut with the
    request when its trust ends. Found by a hostile review: the private ones stayed open to
    a peer no longer trusted, uncounted, until the app's next request or ``idle_timeout``."""
    out = outcomes(why)
    spec = WHYS[why]
    label = _label(holder, state)
    seen = out.upstream.seen[label]
    assert seen.ended is not None, f"{label}: the upstream connection is still open"
    assert seen.requests == out.requests_before[label], "a further request reached it"
    if spec.reason is None:
        return
    idle = sum(s == "idle" for _, s in out.members)
    by_pool = [e for e in out.closed_log if e.get("source") == out.upstream_source
               and e.get("reason") == spec.reason]
    if state == "idle" and holder != "pooled":
        # Every idle upstream connection's closure is counted with the reason (the pool's,
        # named by the upstream's address), one each: the private ones as the pooled one.
        assert len(by_pool) == idle, (spec.reason, len(by_pool), idle)
    elif state == "idle":
        assert by_pool, spec.reason  # (the control: the pooled one's, at least)
    else:
        # A request in flight over it is cut as the app connection it serves: counted there.
        cut = [e for e in out.closed_log if e.get("source") != out.upstream_source
               and e.get("direction") == "outbound" and e.get("reason") == spec.reason]
        assert len(cut) == len(out.members) - idle, (spec.reason, len(cut))
    assert out.sidecar.metric("sidecar_connections_closed_total", direction="outbound",
                              reason=spec.reason) >= len(by_pool)


# --- the pool's own bookkeeping, in-process ---------------------------------------------------


@pytest.mark.parametrize(("let_go", "held"), [(1, 0), (0, 1), (2, 3)])
def test_a_private_connection_its_client_let_go_is_dropped_uncounted_and_a_held_one_swept(
        let_go: int, held: int) -> None:
    """``hold`` registers a connection set aside for one client; when that client's
    connection ends (``request_loop`` clears ``client.private`` and closes it) the next sweep
    forgets it without counting or closing it again, and one still held is swept past
    ``idle_timeout`` (taken from its client first: its next request takes a pooled one).
    Members: how many clients let theirs go, how many still hold one."""
    import trio
    import trio.testing

    from sidecar.http.wire import END, MessageReader
    from sidecar.net.pool import UpstreamPool
    from sidecar.net.streams import Endpoint

    ends: list[Any] = []

    async def connect() -> Any:
        a, b = socket.socketpair()  # (the upstream's end stays a plain socket)
        ends.append(b)
        return trio.SocketStream(trio.socket.from_stdlib_socket(a))

    async def main() -> None:
        pool = UpstreamPool(connect, size=4, idle_timeout=5.0, network=True)
        clients = []
        for _ in range(let_go + held):
            ep, _ = await pool.acquire()
            ep.reader.expect_response(b"GET")
            ep.reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            while ep.reader.next_event() is not END:
                pass
            client = Endpoint(trio.testing.memory_stream_pair()[0],
                              MessageReader(requests=True))
            assert pool.hold(ep, client) and client.private is ep
            clients.append(client)
        for client in clients[:let_go]:  # (as ``request_loop`` ends a connection)
            private, client.private = client.private, None
            assert private is not None
            await trio.aclose_forcefully(private.stream)
        assert pool.statistics().private == let_go + held
        assert await pool.sweep() == 0
        assert pool.statistics().private == held and pool.closed_stale == 0
        await trio.sleep(5.0)  # (a mock clock: no real wait)
        assert await pool.sweep() == held
        assert pool.statistics().private == 0 and pool.closed_stale == held
        assert all(client.private is None for client in clients)
        await pool.aclose()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        for end in ends:
            end.close()


# --- the inbound listener's app connections ----------------------------------------------------

INBOUND_POLICY = f"""\
version: 1
trust_domain: {TD}
services:
  {spiffe("orders")}:
    rules:
      - name: frontend
        allow: {{from: ["{spiffe("frontend")}"]}}
"""


@pytest.fixture(scope="module")
def inbound_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """An inbound sidecar (``pool_idle_timeout`` 4 s) before a plain app, one peer
    connection per holder, each left idle after its request; the app's view once every app
    connection closed (or 20 s passed). Its process is stopped by pid at the end."""
    tmp = tmp_path_factory.mktemp("inbound")
    pki = Pki(tmp / "pki")
    (tmp / "mesh.yaml").write_text(INBOUND_POLICY)
    app = Upstream(None)
    procs: list[Any] = []
    conns: list[Any] = []
    try:
        sidecar = start_sidecar(tmp, "orders", sidecar_config(
            pki.identity("orders"), inbound={"listen": f"127.0.0.1:{free_port()}",
                                             "app": f"127.0.0.1:{app.port}"},
            policy=str(tmp / "mesh.yaml"),
            limits={"idle_timeout": "120s", "pool_idle_timeout": "4s"}))
        procs.append(sidecar)
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        # (the private ones first: each takes a new app connection)
        for holder in sorted(HOLDERS, key=lambda h: h == "pooled"):
            _hold(sidecar.port("inbound"), app, holder, "idle", conns, [], ctx)
        assert len(app.seen) == len(HOLDERS) and all(s.ended is None for s in app.seen.values())
        app.requests_before = {k: s.requests for k, s in app.seen.items()}
        try:
            wait_for(lambda: all(s.ended is not None for s in app.seen.values()), timeout=20)
        except TimeoutError:
            pass  # (each member says which of them stayed open)
        yield app
    finally:
        for c in conns:
            c.close()
        for p in reversed(procs):
            p.stop(timeout=10)
        app.close()


@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_an_idle_app_connection_is_closed_past_pool_idle_timeout_private_or_pooled(
        inbound_run: Upstream, holder: str) -> None:
    """The inbound listener keeps an app connection private to its peer's connection as
    the outbound one does (the same pool code): idle there past ``pool_idle_timeout`` it is
    closed by the sweep as a pooled one is, with no request -- before, it stayed open for as
    long as the peer's connection did (found by the same hostile review)."""
    seen = inbound_run.seen[_label(holder, "idle")]
    assert seen.ended is not None, f"{holder}: the app connection is still open"
    assert seen.requests == inbound_run.requests_before[_label(holder, "idle")]
