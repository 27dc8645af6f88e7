"""Outbound: the app talks plain HTTP (or TCP) to a local listener; the sidecar checks the
egress rules for its own identity, originates mTLS with the workload certificate, and refuses
the connection when the peer's SPIFFE ID is not the configured one.

Theory of operation: one ``OutboundProxy`` per configured upstream. Upstream mTLS connections
come from a keep-alive pool (a handshake costs milliseconds of CPU, many times a request), and
the peer's identity is checked once per connection, right after its handshake, against the
configured SPIFFE ID -- never against a hostname. Egress is decided per request against the
current policy, before any connection is opened.
"""

from __future__ import annotations

import time

import trio

from sidecar.config.model import OutboundConfig
from sidecar.errors import BadGateway, RequestRefused, Unavailable
from sidecar.gate import Gate, Verdict
from sidecar.http.headers import connection_tokens
from sidecar.http.request import RequestHead
from sidecar.http.untrusted import HeaderFilter
from sidecar.http.wire import MessageReader, Request
from sidecar.identity.svid import SvidError, peer_identity_from_der
from sidecar.net.forward import Exchange, forward, splice
from sidecar.net.listen import ConnectionTracker
from sidecar.net.pool import UpstreamPool
from sidecar.net.session import RequestContext, new_request_id, request_loop
from sidecar.net.streams import Endpoint, close_quietly
from sidecar.net.transport import SocketTransport, TlsTransport
from sidecar.policy.decision import RequestFacts
from sidecar.telemetry import Telemetry
from sidecar.tlsstate import TlsState


class OutboundProxy:
    """A local plain listener for one upstream identity."""

    def __init__(self, cfg: OutboundConfig, *, port: int, tls: TlsState, gate: Gate,
                 telemetry: Telemetry, limits, tracker: ConnectionTracker,
                 header_filter: HeaderFilter | None = None) -> None:
        self.cfg = cfg
        self.header_filter = header_filter or HeaderFilter()
        self.port = port
        self.tls = tls
        self.gate = gate
        self.telemetry = telemetry
        self.limits = limits
        self.tracker = tracker
        self.pool = UpstreamPool(self.connect, size=limits.pool_size,
                                 idle_timeout=limits.pool_idle_timeout,
                                 max_head=limits.max_header_bytes * 2)

    async def connect(self) -> TlsTransport:
        """Open an mTLS connection to the upstream and check it is who we expect."""
        host, port = self.cfg.upstream
        started = time.time()
        try:
            with trio.fail_after(self.limits.connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
                stream = TlsTransport(tcp.socket, self.tls.client_context_for(self.cfg.protocol),
                                      server_side=False)
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
        except trio.TooSlowError as exc:
            self.telemetry.connection_refused("outbound", f"{host}:{port}", None,
                                              "upstream_connect_timeout", started)
            raise BadGateway("upstream_connect_timeout") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            reason = "upstream_handshake_failed" if isinstance(
                exc, trio.BrokenResourceError) else "upstream_connect_failed"
            self.telemetry.connection_refused("outbound", f"{host}:{port}", None, reason,
                                              started)
            raise BadGateway(reason, repr(exc)) from exc
        self.telemetry.handshake("outbound")
        try:
            der = stream.getpeercert(binary_form=True)
            peer = peer_identity_from_der(der) if der else None
        except SvidError:
            peer = None
        if peer is None or peer.spiffe_id != self.cfg.identity:
            got = peer.spiffe_id if peer is not None else None
            self.telemetry.connection_refused("outbound", f"{host}:{port}", got,
                                              "peer_identity_mismatch", started)
            await trio.aclose_forcefully(stream)
            raise BadGateway("peer_identity_mismatch", f"expected {self.cfg.identity}, got {got}")
        return stream

    async def handle(self, tcp: trio.SocketStream) -> None:
        try:
            source = tcp.socket.getpeername()[0]
        except OSError:
            return
        self.telemetry.connection_opened("outbound")
        try:
            if self.cfg.protocol == "tcp":
                await self._tcp(tcp, source)
            else:
                await self._http(tcp, source)
        finally:
            self.telemetry.connection_closed("outbound")

    def _facts(self, source: str, method: str = "", path: str = "", host: str = "") -> RequestFacts:
        return RequestFacts(direction="outbound", peer=self.gate.own_id, source=source,
                            method=method, path=path, host=host, port=self.port,
                            listener=self.cfg.name, target=self.cfg.identity)

    async def _tcp(self, tcp: trio.SocketStream, source: str) -> None:
        started = time.time()
        request_id = new_request_id()
        facts = self._facts(source)
        verdict = Verdict(self.gate.egress(self.cfg.identity, time.time()))
        if not verdict.decision.allowed:
            self.telemetry.request(request_id, facts, verdict, 403, 0, 0, started)
            return
        try:
            upstream = await self.connect()
        except RequestRefused as exc:
            self.telemetry.request(request_id, facts, verdict, exc.status, 0, 0, started,
                                   error=exc.reason)
            return
        try:
            up, down = await splice(tcp, b"", upstream, b"", self.limits.tcp_idle_timeout)
        finally:
            await close_quietly(upstream)
        self.telemetry.request(request_id, facts, verdict, 200, up, down, started)

    async def _http(self, tcp: trio.SocketStream, source: str) -> None:
        limits = self.limits
        # The local app's requests are parsed by the lean reader; the peer parses them again
        # with h11 when they arrive (sidecar.http.wire explains the split).
        client = Endpoint(SocketTransport(tcp.socket),
                          MessageReader(requests=True, max_head=limits.max_header_bytes),
                          side="client")

        async def handle(ctx: RequestContext, event: Request, head: RequestHead) -> Exchange:
            path = head.target.split(b"?", 1)[0].decode("ascii", "replace")
            ctx.facts = self._facts(source, head.method, path, head.host)
            ctx.verdict = verdict = Verdict(self.gate.egress(self.cfg.identity, time.time()))
            if not verdict.decision.allowed:
                raise verdict.refusal()
            if not self.telemetry.accepting():
                raise Unavailable("audit_unavailable")
            headers = self.header_filter.clean(event.headers, frozenset(),
                                               connection_tokens(event.headers))
            return await forward(client, event, headers, self.pool, limits, head,
                                 close=self.tracker.draining)

        await request_loop(client, tracker=self.tracker, limits=limits, telemetry=self.telemetry,
                           handle=handle, source=source, peer=None)
