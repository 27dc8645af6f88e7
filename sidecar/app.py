"""Builds every component from the config and owns the root nursery, signals and drain.

Theory of operation: ``run(config)`` loads the workload certificate (a bad one stops the
start with a clear error: there is nothing safe to serve without it) and the policy (a bad
or missing policy does *not* stop the start: the sidecar runs and denies everything, fail
closed, and says so loudly, so that a fix of the file takes effect by itself). It then starts,
each with ``nursery.start`` so that a listener counts as up only once it listens: the audit
writer, the inbound and outbound listeners, the admin and health servers, the file watchers
and the JWKS fetchers. SIGTERM or SIGINT starts the drain: readiness turns false, accept loops
stop, idle keep-alive connections close, in-flight requests finish within
``limits.drain_timeout``, the audit queue is flushed, and the process exits 0. SIGHUP and
SIGUSR1 make every file watcher look at its files now (``sidecar.reload.handle_signal``; the
first process passes them on to the other workers), SIGUSR2 is logged and ignored: none of them
ends the process, not even while it starts.

With ``workers: N`` the first process binds every listening port once (``bind_shared``: no
SO_REUSEPORT) and starts N-1 more (``sidecar run --worker-index I``), handing them those
sockets (``pass_fds``, and ``SIDECAR_LISTEN_FDS``: listener name -> descriptor); each accepts
on them with its own Trio loop, and the kernel gives each connection to one of them. Until
the twenty-ninth session every worker bound its own socket with SO_REUSEPORT, and any process
of the sidecar's uid (a root app container in the pod, after ``setuid``) could join the group
and take a share of its connections (found by a hostile review). Only worker 0 serves
the admin and health ports; each worker writes its own audit chain in ``<audit path>/worker-I``.
The first process stops the others on every way out of ``run``; on Linux each worker also gets
SIGTERM from the kernel when the first process dies, however it dies (``PR_SET_PDEATHSIG``), so
it drains and exits instead of serving on, unsupervised, as an orphan. The other direction: the
first process looks at its workers once a second (``_supervise_workers``); one that exited, for
any reason, is reaped, logged (``worker_exited``), counted, and started again with the same
sockets after a backoff (1 s, doubling to 30 s while it keeps dying soon after its start), and
``/readyz`` says ``workers_not_running`` until it runs again. Until the twenty-ninth session a
killed worker was left a zombie and the pod served on at a fraction of its capacity, ready, with
no sign (found by a hostile review). While the sidecar drains no worker is started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from sidecar import logs
from sidecar.config.model import SidecarConfig
from sidecar.config.values import format_address
from sidecar.errors import ConfigError, SidecarError
from sidecar.gate import Gate, PolicyHolder
from sidecar.http.untrusted import RUN_AS_PARAMETERS, HeaderFilter
from sidecar.identity.trust import load_bundle
from sidecar.inbound import InboundProxy, open_app_stream
from sidecar.keysources import KeySources
from sidecar.metrics import SidecarMetrics
from sidecar.net.lifetime import SWEEP_INTERVAL, Lifetimes, LiveConnection
from sidecar.net.listen import (
    ConnectionTracker,
    SourceLimiter,
    accept_loop,
    adopt_listener,
    bind_shared,
    inherited_sockets,
    listener_port,
    open_listener,
)
from sidecar.net.pool import UpstreamPool
from sidecar.net.resolve import install as install_resolver
from sidecar.net.transport import SocketTransport
from sidecar.outbound import OutboundProxy
from sidecar.output import safe_lines
from sidecar.refusals import RefusalThinner
from sidecar.reload import (
    IGNORED_SIGNALS,
    RELOAD_SIGNALS,
    FileWatcher,
    fingerprint,
    handle_signal,
    ignore_signals_until_handled,
)
from sidecar.telemetry import Telemetry
from sidecar.tlsstate import TlsSnapshot, TlsState, load_rotated_svid, seen_shadows

if TYPE_CHECKING:  # imported where used (optional parts), named here for their types
    from sidecar.alert_poster import AlertPoster
    from sidecar.alerts import Alert, BurstDetector
    from sidecar.audit.writer import AuditWriter
    from sidecar.authn.authenticator import Authenticator
    from sidecar.config.model import OutboundConfig
    from sidecar.identity.svid import Svid
    from sidecar.identity.trust import PeerChain, TrustBundle
    from sidecar.policy.loaded import Policy
    from sidecar.policy.loader import ParsedFiles
    from sidecar.ratelimit import RateLimiter


class StartupError(SidecarError):
    """Something the sidecar needs at start is not available (a port, a file)."""


class Sidecar:
    """Every component of one running sidecar process, and its status for the admin port."""

    def __init__(self, cfg: SidecarConfig, *, worker_index: int = 0) -> None:
        self.cfg = cfg
        self.worker_index = worker_index
        self.metrics = SidecarMetrics()
        ident = cfg.identity
        # The watchers' first fingerprints, taken before the files are read (``_start_prints``).
        self._start_prints: dict[str, str] = {
            "certificates": _start_print([ident.cert, ident.key, ident.bundle]),
            **{f"trust_domain {td}": _start_print([path]) for td, path in ident.trust_domains}}
        self.tls = TlsState.load(ident.cert, ident.key, ident.bundle, ident.trust_domains)
        # The roots of each trust domain as last loaded (not as narrowed by a withdrawal): put
        # back when its files are back to the set in force (``_roots_restored``).
        self._loaded_bundles: dict[str, TrustBundle] = dict(self.tls.trust.bundles)
        self.own_id = self.tls.spiffe_id
        self.metrics.certificate_expiry_timestamp_seconds.set(self.tls.snapshot.svid.trust_ends)
        self.policies = PolicyHolder(cfg.policy)
        self._parsed_policy_files: ParsedFiles | None = None
        self.authenticator: Authenticator | None = None
        self.limiter: RateLimiter | None = None
        self.detector: BurstDetector | None = None
        self.alert_poster: AlertPoster | None = None
        self.audit: AuditWriter | None = None
        if cfg.audit is not None:
            from sidecar.audit.writer import AuditWriter

            audit_cfg = cfg.audit
            if cfg.workers > 1:
                audit_cfg = dataclasses.replace(
                    audit_cfg, path=os.path.join(audit_cfg.path, f"worker-{worker_index}"))
            self.audit = AuditWriter(audit_cfg, on_alert=self._audit_alert,
                                     identity=self.own_id)
            self._export_audit_statistics(self.audit)
        self.telemetry = Telemetry(self.metrics, self.audit, self.own_id)
        self.telemetry.refusals = RefusalThinner(cfg.limits.refused_records_per_source,
                                                 cfg.limits.refused_records_per_second,
                                                 cfg.limits.refused_summary_interval)
        self.tap = self.telemetry.tap  # served on the admin port as /tap
        limits = cfg.limits
        # One filter for both listeners; the policy's claim headers join it at every swap.
        self.header_filter = HeaderFilter(
            allow_underscores=cfg.headers.allow_underscores,
            pass_through=cfg.headers.pass_through,
            run_as=[n for n in RUN_AS_PARAMETERS
                    if n not in cfg.headers.pass_through_parameters])
        self.lifetimes = Lifetimes.for_limits(limits, self._connection_retired)
        self.outbound_proxies: list[OutboundProxy] = []
        self.pools: list[UpstreamPool] = []  # swept once a second (``_sweep_pools``)
        self._nursery: trio.Nursery | None = None
        if cfg.policy is not None:
            self._setup_policy_consumers()
        self.gate = Gate(self.own_id, self.policies,
                         allow_from=cfg.inbound.allow_from if cfg.inbound else None,
                         authenticator=self.authenticator, limiter=self.limiter,
                         detector=self.detector, on_alert=self._raise_alert)
        self.lifetimes.next_policy_event = self.gate.next_rule_expiry
        if self.detector is not None:
            self.telemetry.on_credential_failure = self._tls_credential_failure
        if self.authenticator is not None:
            from sidecar.introspect import Introspector

            # mtls introspection presents this workload's own (rotating) SVID files.
            self.gate.introspector = Introspector(self.authenticator,
                                                  identity=lambda: (ident.cert, ident.key),
                                                  metrics=self.metrics)
        self.trackers: list[ConnectionTracker] = []
        self.stops: list[trio.CancelScope] = []
        self.listening = False
        self.draining = False
        self.ports: dict[str, int] = {}
        self.workers: list[subprocess.Popen[bytes]] = []  # the first process's other workers
        # The first process: starts worker I (1..N-1) again, with the sockets and environment
        # of the first start (``run``); None in the workers, and with ``workers: 1``.
        self.spawn_worker: WorkerSpawner | None = None
        # A worker: the pipe end on which it tells the first process it listens (``run``).
        self.listening_fd: int | None = None
        self._worker_exits = self.metrics.registry.counter(
            "sidecar_worker_exits_total",
            "Workers (workers > 1) that exited without being stopped by the first process, by "
            "worker index; each is started again after a backoff, unless the sidecar drains.",
            ("worker",))
        # With ``workers`` > 1: the listening sockets every worker shares, by listener name
        # (bound by the first process: ``bind_shared``); ``_serve`` accepts on them.
        self.shared_listeners: dict[str, socket.socket] = {}
        self._load_initial_policy()

    # -- policy --------------------------------------------------------------------------
    def _policy_paths(self) -> list[str]:
        assert self.cfg.policy is not None
        return list(self.cfg.policy_paths) or [self.cfg.policy]

    def _load_policy_file(self) -> Policy:
        """The policy as this sidecar enforces it: its own section only (docs/policy.md).

        Runs in a reload thread; afterwards the C heap is trimmed (``release_memory``), so
        the transient memory of reading a big policy does not stay in the RSS."""
        from sidecar.policy.loader import ParsedFiles, load_policy_set
        from sidecar.reload import release_memory

        if self._parsed_policy_files is None:
            self._parsed_policy_files = ParsedFiles()
        try:
            return load_policy_set(self._policy_paths(), only=self.own_id,
                                   cache=self._parsed_policy_files)
        finally:
            release_memory()

    def _load_initial_policy(self) -> None:
        if self.cfg.policy is None:
            if self.cfg.inbound is not None and self.cfg.inbound.allow_from is None:
                logs.log("no_policy", "warning", message="no policy and no inbound.allow_from: "
                         "every inbound request is denied (fail closed)")
            return
        self._start_prints["policy"] = _start_print(self._policy_paths())
        try:
            policy = self._load_policy_file()
        except Exception as exc:  # noqa: BLE001 -- whatever the loader raises, start fail closed
            # (It caught ConfigError and OSError only: a loader bug -- an OverflowError from
            # `rate: .inf` -- ended the process at start, and the workers were not stopped.)
            error = self._policy_error(exc)
            self.policies.record_failure(error)
            self.metrics.policy_reloads_total.labels("failed").inc()
            logs.log("policy_invalid", "error", source=self.cfg.policy, error=error,
                     broken_files=_broken_files(exc),
                     message="POLICY NOT LOADED: every request is denied until it is fixed")
            return
        self._apply_policy(policy)

    def _policy_error(self, exc: BaseException) -> str:
        """A policy load failure as logged and shown in ``/policy``: a ``ConfigError`` or
        ``OSError`` names its file (and line and key); anything else is a loader bug, named
        with the policy's files and the exception's type."""
        if isinstance(exc, (ConfigError, OSError)):
            return str(exc)
        from sidecar.policy.loader import policy_label

        return (f"{policy_label(self._policy_paths())}: the policy could not be loaded "
                f"({type(exc).__name__}: {exc})")

    def _apply_policy(self, policy: Policy) -> None:
        now = time.time()
        self.policies.swap(policy, now)
        self.metrics.policy_reloads_total.labels("ok").inc()
        self.metrics.set_policy(policy.version, now)
        if policy.section(self.own_id) is None:
            logs.log("no_policy_section", "warning", identity=self.own_id,
                     message="the policy has no section for this identity: inbound denied")
        logs.log("policy_loaded", version=policy.version, source=self.cfg.policy,
                 files=len(policy.files), sections_skipped=policy.skipped)
        # TCP and upgraded streams were decided once, under the old policy, and so were the
        # requests in flight; a rule's expires_at changes the policy again by itself.
        self.lifetimes.policy_changed(now)

    def _policy_reload_failed(self, exc: BaseException) -> None:
        error = self._policy_error(exc)
        self.policies.record_failure(error)
        self.metrics.policy_reloads_total.labels("failed").inc()
        logs.log("policy_reload_failed", "error", source=self.cfg.policy, error=error,
                 broken_files=_broken_files(exc), message="keeping the policy in force")

    def _policy_restored(self) -> None:
        self.policies.last_error = None
        logs.log("policy_restored", source=self.cfg.policy,
                 version=getattr(self.policies.policy, "version", None),
                 message="the policy files are back to the policy in force")

    def _setup_policy_consumers(self) -> None:
        """JWT authenticator, rate limiter and burst detector follow the policy."""
        from sidecar.alert_poster import AlertPoster
        from sidecar.alerts import BurstDetector
        from sidecar.authn.authenticator import Authenticator
        from sidecar.policy.sections import PolicyExtras
        from sidecar.ratelimit import RateLimiter

        self.authenticator = authenticator = Authenticator(PolicyExtras())
        # A key removed from a provider's JWKS (file reload or refetch) is a revocation of
        # the tokens it signed: the streams authorised with one end (policy_refused).
        authenticator.on_keys_removed = lambda: self.lifetimes.recheck_policy(time.time())
        self.limiter = limiter = RateLimiter(())
        self.detector = detector = BurstDetector(())
        self.alert_poster = AlertPoster(self.metrics)
        self.key_sources = key_sources = KeySources(authenticator, self.metrics)

        def follow(policy: Policy) -> None:
            extras = policy.extras
            self.header_filter.set_claim_headers(policy.claim_headers)
            # Cookie for a provider reading cookies: a wrapped Cookie (Grpc-Metadata-Cookie)
            # would reach a gRPC service as its only `cookie`, an unverified session beside
            # the verified one (found by a hostile review).
            self.header_filter.set_token_headers(
                loc.name if loc.kind == "header" else "cookie"
                for provider in extras.jwt_providers.values()
                for loc in provider.locations if loc.kind in ("header", "cookie"))
            authenticator.update(extras)
            key_sources.sync(extras.jwt_providers)
            limiter.update(extras.rate_limits)
            detector.update(extras.alerts)
            for name in extras.jwt_providers:
                self.metrics.jwks_age_seconds.labels(name).set_function(
                    functools.partial(self._jwks_age, name))


        self.policies.listeners.append(follow)

    def _jwks_age(self, name: str) -> float:
        age = self.key_sources.ages(time.time()).get(name)
        return float("nan") if age is None else age

    def _export_audit_statistics(self, writer: AuditWriter) -> None:
        """sidecar_audit_* series read the writer's statistics() at every scrape."""
        m = self.metrics
        m.audit_queue_depth.set_function(lambda: writer.statistics().queue_depth)
        written = m.audit_records_written_total.labels()
        lost = m.audit_records_lost_total.labels()
        ship_sent = m.audit_ship_sent_total.labels()
        ship_dropped = m.audit_ship_dropped_total.labels()
        thread_cpu = m.audit_thread_cpu_seconds_total.labels()

        def sync() -> None:
            stats = writer.statistics()
            written.value = float(stats.written)
            lost.value = float(stats.lost)
            thread_cpu.value = stats.thread_cpu_seconds
            if writer.shipper is not None:
                ship_sent.value = float(stats.shipped)
                ship_dropped.value = float(stats.ship_dropped)
                m.audit_ship_queue_depth.set(stats.ship_queue_depth)
                m.audit_ship_queue_bytes.set(stats.ship_queue_bytes)
                m.audit_ship_connected.set(1 if stats.ship_connected else 0)
            if stats.last_checkpoint is not None:
                m.audit_checkpoint_seq.set(stats.last_checkpoint.seq)
                m.audit_checkpoint_timestamp_seconds.set(stats.last_checkpoint.time)

        m.scrape_hooks.append(sync)

    # -- alerts --------------------------------------------------------------------------
    def _raise_alert(self, alert: Alert) -> None:
        """A burst of failures: log line + metric + webhook (the poster), audit record."""
        if self.audit is not None:
            from sidecar.audit.record import alert_record

            self.audit.submit(alert_record(
                time=time.time(), rule=alert.rule, reason="failure_burst",
                peer=alert.source if alert.by == "peer" else None,
                source=alert.source if alert.by == "address" else "",
                extra={"failures": alert.failures, "window_seconds": alert.window_seconds,
                       "block_seconds": alert.block_seconds, "by": alert.by,
                       # by subject/issuer: the token subject or issuer the burst is about
                       **({"alert_source": alert.source}
                          if alert.by in ("subject", "issuer") else {})}))
        if self.alert_poster is not None:  # set with the detector, the only source of alerts
            self.alert_poster.submit(alert)
        if alert.block_seconds > 0:
            self.lifetimes.block(alert.by, alert.source)

    def _connection_retired(self, conn: LiveConnection, reason: str) -> None:
        self.telemetry.connection_retired(conn.direction, conn.listener, conn.source,
                                          conn.peer, reason, conn.opened)

    def _tls_credential_failure(self, source: str) -> None:
        """An inbound peer's certificate failed: the peer's own failure (by: address rules;
        there is no verified peer identity to count by: peer)."""
        if self.detector is None:  # registered only with a detector
            return
        # (the detector's clock is the gate's: monotonic)
        for alert in self.detector.record_failure(None, source, time.monotonic()):
            self._raise_alert(alert)

    def _audit_alert(self, kind: str, message: str) -> None:
        """The audit writer's ``on_alert(kind, message)``: write failed, records lost,
        recovered (docs/audit.md). Recovery is logged but is not an alert."""
        if kind == "audit_recovered":
            logs.log("audit_recovered", "warning", message=message)
            return
        self.metrics.alerts_total.labels(kind).inc()
        logs.log("audit_alert", "error", alert=kind, message=message)

    # -- status for the admin port -------------------------------------------------------
    def ready(self) -> tuple[bool, list[str]]:
        """``/readyz``: (ready, the reasons it is not), e.g. ``listeners_not_up``, ``draining``."""
        reasons = []
        now = time.time()
        if not self.listening:
            reasons.append("listeners_not_up")
        if self.draining:
            reasons.append("draining")
        if not self.tls.valid(now):
            expired = now >= self.tls.snapshot.svid.trust_ends
            reasons.append("certificate_expired" if expired else "certificate_not_yet_valid")
        if self.cfg.policy is not None and self.policies.policy is None:
            reasons.append("policy_not_loaded")
        if self.cfg.policy is not None and self.key_sources.first_fetch_pending():
            reasons.append("jwks_first_fetch_pending")
        if self.audit is not None and not self.audit.accepting():
            reasons.append("audit_not_writable")
        if self.running_workers() < self.cfg.workers:
            reasons.append("workers_not_running")
        return not reasons, reasons

    def running_workers(self) -> int:
        """The processes of this sidecar that run and listen, this one included (its
        children: those of the first process; ``poll`` reaps one that exited). A worker that
        starts counts once it says it listens (``WorkerSpawner.listening``): one that dies at
        every start never counts, so readiness does not flap while it is tried again."""
        if self.spawn_worker is None:  # (``workers: 1``, or a worker: worker 0 answers /readyz)
            return self.cfg.workers
        spawner = self.spawn_worker
        return 1 + sum(1 for child in self.workers
                       if child.poll() is None and spawner.listening(child))

    def audit_head(self) -> dict[str, Any] | None:
        """The newest signed audit checkpoint (``/audit/head``), None when there is none."""
        checkpoint = self.audit.last_checkpoint if self.audit is not None else None
        if checkpoint is None:
            return None
        return {"checkpoint": checkpoint.to_json(), "worker": self.worker_index}

    def policy_status(self) -> dict[str, object]:
        """``/policy``: the policy holder's status (version, reloads, last error)."""
        return self.policies.status()

    def effective_config(self) -> dict[str, Any]:
        """``/config``: the configuration in force, secrets redacted."""
        from sidecar.config.model import redacted

        return redacted(self.cfg)

    # -- running -------------------------------------------------------------------------
    async def _serve(self, name: str, addr: tuple[str, int],
                     make_handler: Callable[[int, ConnectionTracker], InboundProxy | OutboundProxy],
                     nursery: trio.Nursery, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        shared = self.shared_listeners.pop(name, None)
        try:
            if shared is not None:
                _check_shared_address(shared, addr)
                listener = adopt_listener(shared)
            else:
                listener = await open_listener(addr[0], addr[1])
        except OSError as exc:
            raise StartupError(f"cannot listen on {format_address(addr)} ({name}): "
                               f"{exc.strerror or exc}") from None
        port = listener_port(listener)
        tracker = ConnectionTracker()
        stop = trio.CancelScope()
        self.trackers.append(tracker)
        self.stops.append(stop)
        handler = make_handler(port, tracker)
        self.ports[name] = port
        task_status.started(port)

        def refused(reason: str) -> None:
            self.metrics.requests_refused_total.labels(
                "inbound" if name == "inbound" else "outbound", reason).inc()
            self.metrics.connections_refused_total.labels(name, reason).inc()

        await accept_loop(listener, handler.handle, tracker, self.cfg.limits.max_connections,
                          refused, stop,
                          SourceLimiter(self.cfg.limits.max_connections_per_source))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the audit writer, listeners and background tasks; serve until cancelled."""
        install_resolver(self.metrics)  # every name lookup of this run (sidecar/net/resolve.py)
        with _receive_signals() as signals:
            await self._run(signals, task_status)
            logs.log("stopped", worker=self.worker_index)

    async def _run(self, signals: AsyncIterator[int], task_status: trio.TaskStatus[None]) -> None:
        cfg = self.cfg
        async with trio.open_nursery() as root:
            if self.audit is not None:
                await root.start(self.audit.run)
            async with trio.open_nursery() as serving:
                await self._start_listeners(serving)
                await self._start_background(serving)
                self.listening = True
                # Everything loaded so far (modules, config, policy, certificates) lives as
                # long as the process: move it out of the collector's view, so that the
                # collections the data path triggers do not walk it again and again.
                gc.collect()
                gc.freeze()
                logs.log("listening", identity=self.own_id, worker=self.worker_index,
                         ports=self.ports, policy_version=getattr(self.policies.policy,
                                                                  "version", None))
                task_status.started()
                self._say_listening()
                async for signum in signals:
                    if handle_signal(signum):
                        self._pass_on(signum)
                        continue
                    logs.log("draining", signal=signal.Signals(signum).name,
                             grace_seconds=cfg.limits.drain_timeout)
                    break
                await self.drain()
                serving.cancel_scope.cancel()
            self.telemetry.flush_refusals()  # (the last summaries, before the trail closes)
            if self.audit is not None:
                with trio.move_on_after(cfg.limits.drain_timeout) as scope:
                    scope.shield = True
                    await self.audit.aclose()
            root.cancel_scope.cancel()

    def _say_listening(self) -> None:
        """A worker: one byte to the first process (``WorkerSpawner.listening``) once it
        listens; a first process that is gone (EPIPE) is no error of this worker's."""
        fd, self.listening_fd = self.listening_fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, b"1")
        os.close(fd)

    def _pass_on(self, signum: int) -> None:
        """A reload signal to the first process reaches the other workers too."""
        if signum in RELOAD_SIGNALS:
            for child in self.workers:
                if child.poll() is None:
                    child.send_signal(signum)

    async def drain(self) -> None:
        """Stop accepting, let open connections finish (idle ones are cut after a short grace),
        wait at most ``limits.drain_timeout``."""
        self.draining = True
        for stop in self.stops:
            stop.cancel()
        for tracker in self.trackers:
            tracker.start_drain()
        with trio.move_on_after(self.cfg.limits.drain_timeout):
            for tracker in self.trackers:
                await tracker.wait_closed()

    async def _start_listeners(self, nursery: trio.Nursery) -> None:
        cfg = self.cfg
        limits = cfg.limits
        header_filter = self.header_filter
        if cfg.inbound is not None:
            inbound = cfg.inbound
            async def connect_app() -> SocketTransport:
                return SocketTransport((await open_app_stream(inbound.app,
                                                              inbound.app_source)).socket)

            app_pool = UpstreamPool(connect_app,
                                    size=limits.pool_size, idle_timeout=limits.pool_idle_timeout,
                                    max_head=limits.max_header_bytes * 2, network=False)
            self.pools.append(app_pool)

            def make_inbound(port: int, tracker: ConnectionTracker) -> InboundProxy:
                return InboundProxy(port=port, tls=self.tls, gate=self.gate,
                                    telemetry=self.telemetry, app_pool=app_pool,
                                    app_addr=inbound.app, limits=limits,
                                    protocol=inbound.protocol, tracker=tracker,
                                    header_filter=header_filter, lifetimes=self.lifetimes,
                                    app_source=inbound.app_source)

            await nursery.start(self._serve, "inbound", inbound.listen, make_inbound, nursery)
        for ob in cfg.outbound:
            def make_outbound(port: int, tracker: ConnectionTracker,
                              ob: OutboundConfig = ob) -> OutboundProxy:
                proxy = OutboundProxy(ob, port=port, tls=self.tls, gate=self.gate,
                                      telemetry=self.telemetry, limits=limits, tracker=tracker,
                                      header_filter=header_filter, lifetimes=self.lifetimes)
                self.outbound_proxies.append(proxy)
                self.pools.append(proxy.pool)
                return proxy

            await nursery.start(self._serve, ob.name, ob.listen, make_outbound, nursery)

    async def _start_background(self, nursery: trio.Nursery) -> None:
        cfg = self.cfg
        ident = cfg.identity
        if self.alert_poster is not None:  # with a policy (_setup_policy_consumers)
            await nursery.start(self.alert_poster.run)
            self.key_sources.attach(nursery)
        self._nursery = nursery
        if self.worker_index == 0 and self.spawn_worker is not None:
            nursery.start_soon(self._supervise_workers, self.spawn_worker)
        await nursery.start(self.lifetimes.run)
        nursery.start_soon(self._sweep_pools)
        nursery.start_soon(self._summarise_refusals)
        # Every watcher starts from the fingerprint taken BEFORE its files were loaded at start
        # (``_start_prints``): taken here, after, a change landing in between (a root removed,
        # a new policy) counted as in force and was never applied (found by a hostile review).
        # A watcher's ``on_restored`` puts back roots withdrawn from a trust domain whose
        # files are back to the set in force (``_roots_restored``).
        prints = self._start_prints
        cert_watch = FileWatcher(
            "certificates", [ident.cert, ident.key, ident.bundle],
            load=functools.partial(load_rotated_svid, ident.cert, ident.key, ident.bundle,
                                   self.own_id),
            apply=self._apply_svid, on_error=self._own_reload_failed,
            interval=ident.watch_interval, initial=prints["certificates"],
            on_restored=self._own_restored)
        await nursery.start(cert_watch.run)
        for td, path in ident.trust_domains:
            # Each federated bundle is watched on its own: a broken partner bundle keeps the
            # partner's last good roots and touches no other trust domain.
            bundle_watch = FileWatcher(
                f"trust_domain {td}", [path],
                load=functools.partial(load_bundle, td, path),
                apply=self._apply_bundle,
                on_error=functools.partial(self._bundle_reload_failed, td, path),
                interval=ident.watch_interval, initial=prints[f"trust_domain {td}"],
                on_restored=functools.partial(self._roots_restored, td))
            await nursery.start(bundle_watch.run)
        if cfg.policy is not None:
            initial = prints["policy"]
            if self.policies.policy is None:
                initial = "failed-at-start"  # force a load as soon as the file changes or is fixed
            watch = FileWatcher("policy", self._policy_paths(), load=self._load_policy_file,
                                apply=self._apply_policy, on_error=self._policy_reload_failed,
                                interval=cfg.policy_watch_interval, initial=initial,
                                on_restored=self._policy_restored)
            if self.policies.policy is None:
                watch.mark_failed(prints["policy"])
            await nursery.start(watch.run)
        if self.worker_index == 0 and cfg.admin.listen is not None:
            from sidecar.admin import ADMIN_LIMITS, serve_admin
            from sidecar.config.values import is_loopback

            if not is_loopback(cfg.admin.listen[0]):
                # Not refused (some scrape /metrics over the pod network), but said: these
                # pages have no authentication and show the config, policy and live requests.
                logs.log("admin_not_loopback", "warning", listen=cfg.admin.listen[0],
                         port=cfg.admin.listen[1],
                         pages="/config /policy /tap /metrics /audit/head /readyz")
            admin_limits = dataclasses.replace(
                ADMIN_LIMITS, max_connections_per_source=cfg.admin.max_connections_per_source)
            port = await self._start_server(
                nursery, "admin", cfg.admin.listen,
                functools.partial(serve_admin, limits=admin_limits,
                                  on_refused=self._count_refused("admin")),
                cfg.admin.listen, self, self.metrics)
            self.ports["admin"] = port
        if self.worker_index == 0 and cfg.admin.health_listen is not None:
            from sidecar.admin import HEALTH_LIMITS, serve_health
            from sidecar.admin_pages import app_probes_from_env

            health_limits = dataclasses.replace(
                HEALTH_LIMITS, max_connections_per_source=cfg.admin.max_connections_per_source)
            port = await self._start_server(
                nursery, "health", cfg.admin.health_listen,
                functools.partial(serve_health, limits=health_limits,
                                  on_refused=self._count_refused("health"),
                                  on_probe=self._count_probe),
                cfg.admin.health_listen, self, app_probes_from_env())
            self.ports["health"] = port

    async def _supervise_workers(self, spawn: WorkerSpawner) -> None:
        """The first process, once a second: a worker that exited (killed, crashed, OOM,
        stopped by hand) is reaped, logged and counted, and started again with the first
        start's sockets and environment -- after ``WORKER_BACKOFF_FIRST`` seconds, doubling up
        to ``WORKER_BACKOFF_MAX`` for each exit that follows its start by less than
        ``WORKER_BACKOFF_MAX`` (a worker that dies at start must not spin). While the
        sidecar drains an exit is still logged, but no worker starts: the drain ends with
        every worker stopped (``_stop_children``)."""
        started = {slot: time.monotonic() for slot in range(len(self.workers))}
        backoff = {slot: 0.0 for slot in range(len(self.workers))}
        due: dict[int, float] = {}  # slot -> when its worker starts again
        while True:
            now = time.monotonic()
            for slot, child in enumerate(self.workers):
                if slot in due or child.poll() is None:
                    continue
                code = child.returncode
                lived = now - started[slot]
                if lived >= WORKER_BACKOFF_MAX:
                    backoff[slot] = 0.0
                backoff[slot] = min(WORKER_BACKOFF_MAX,
                                    max(WORKER_BACKOFF_FIRST, backoff[slot] * 2))
                due[slot] = now + backoff[slot]
                self._worker_exits.labels(str(slot + 1)).inc()
                logs.log("worker_exited", "error", worker=slot + 1, pid=child.pid,
                         exit_code=code if code >= 0 else None,
                         signal=_signal_name(-code) if code < 0 else None,
                         ran_seconds=round(lived, 1),
                         restart_in_seconds=None if self.draining else backoff[slot])
            for slot, when in sorted(due.items()):
                if when > now or self.draining:
                    continue
                try:
                    child = spawn(slot + 1)
                except OSError as exc:  # (no fork, pipe: out of memory, pids; try again later)
                    backoff[slot] = min(WORKER_BACKOFF_MAX, backoff[slot] * 2)
                    due[slot] = now + backoff[slot]
                    logs.log("worker_restart_failed", "error", worker=slot + 1, error=str(exc),
                             restart_in_seconds=backoff[slot])
                    continue
                del due[slot]
                started[slot] = time.monotonic()
                spawn.forget(self.workers[slot])
                self.workers[slot] = child  # (in place: ``run``'s list, stopped at the end)
                logs.log("worker_restarted", "warning", worker=slot + 1, pid=child.pid)
            await trio.sleep(WORKER_POLL_INTERVAL)

    async def _summarise_refusals(self) -> None:
        """Every ``limits.refused_summary_interval``: the summaries of the refused
        connections that got no record of their own (sidecar/refusals.py)."""
        while True:
            await trio.sleep(self.cfg.limits.refused_summary_interval)
            self.telemetry.flush_refusals()

    def _count_probe(self, result: str) -> None:
        self.metrics.app_probes_total.labels(result).inc()

    def _count_refused(self, listener: str) -> Callable[[str], None]:
        def refused(reason: str) -> None:
            self.metrics.connections_refused_total.labels(listener, reason).inc()
        return refused

    @staticmethod
    async def _start_server(nursery: trio.Nursery, name: str, addr: tuple[str, int],
                            fn: Callable[..., Awaitable[object]], *args: object) -> int:
        try:
            return int(await nursery.start(fn, *args))
        except OSError as exc:
            raise StartupError(f"cannot listen on {format_address(addr)} ({name}): "
                               f"{exc.strerror or exc}") from None

    def _apply_svid(self, svid: Svid) -> None:
        snapshot = self.tls.with_svid(svid)
        self._apply_tls(snapshot)
        self._loaded_bundles[snapshot.trust.own] = snapshot.trust.bundles[snapshot.trust.own]

    def _apply_bundle(self, bundle: TrustBundle) -> None:
        self.tls.swap(self.tls.with_bundle(bundle))
        self._loaded_bundles[bundle.trust_domain] = bundle
        self.metrics.certificate_reloads_total.labels("ok").inc()
        # (no roots: the trust domain's X.509 trust was withdrawn, it now admits nobody)
        logs.log("trust_bundle_reloaded", "info" if bundle.roots else "warning",
                 trust_domain=bundle.trust_domain, roots=len(bundle.roots))
        for ca, other in seen_shadows(bundle):
            # (a partner's CA named like another domain's intermediate: that domain's peers
            # it issued fail their handshakes while the bundle holds it; docs/identity.md)
            logs.log("trust_bundle_shadows_intermediate", "warning",
                     trust_domain=bundle.trust_domain, ca=ca, shadowed_trust_domain=other)
        self._trust_changed()

    def _apply_tls(self, snapshot: TlsSnapshot) -> None:
        self.tls.swap(snapshot)
        self.metrics.certificate_expiry_timestamp_seconds.set(snapshot.svid.trust_ends)
        self.metrics.certificate_reloads_total.labels("ok").inc()
        logs.log("certificates_reloaded", spiffe_id=str(snapshot.svid.spiffe_id),
                 not_after=snapshot.svid.not_after)
        self._trust_changed()

    async def _sweep_pools(self) -> None:
        """Once a second, close pooled upstream connections idle past
        ``limits.pool_idle_timeout`` or past their trust or age (``UpstreamPool.sweep``)."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            for pool in list(self.pools):
                await pool.sweep()

    def _trust_changed(self) -> None:
        """Bundles (or our own SVID) changed: judge open connections and pooled ones again."""
        trust = self.tls.trust
        now = time.time()

        def trusted(peer: str, chain: PeerChain) -> float | None:
            try:
                return trust.check_peer(peer, chain, now)
            except SidecarError:
                return None

        self.lifetimes.recheck_trust(trusted)
        if self._nursery is not None:
            for proxy in self.outbound_proxies:
                self._nursery.start_soon(proxy.pool.retire_idle)

    def _own_reload_failed(self, exc: BaseException) -> None:
        """The own certificate set did not load: the set in force stays, except roots the
        bundle file no longer lists, which are withdrawn at once (trusting less never waits
        for the rest of the set: ``TlsState.with_roots_withdrawn``)."""
        self._tls_reload_failed(exc)
        snap = self.tls.snapshot
        self._withdraw_unlisted(snap.trust.own, snap.svid.bundle_path)

    def _bundle_reload_failed(self, trust_domain: str, path: str, exc: BaseException) -> None:
        """A federated bundle did not load (or apply): its last good roots stay, except those
        the file no longer lists, withdrawn at once as for the own bundle."""
        self._tls_reload_failed(exc)
        self._withdraw_unlisted(trust_domain, path)

    def _own_restored(self) -> None:
        """The own certificate files are back to the set in force (``on_restored``)."""
        self._roots_restored(self.tls.trust.own)

    def _roots_restored(self, trust_domain: str) -> None:
        """After a failure, ``trust_domain``'s files are back to the set in force (a wrong
        bundle reverted, a deleted file put back): nothing is loaded, so the roots a
        withdrawal took from the set in force (``_withdraw_unlisted``) are put back -- the
        file lists them again, and the set that lists them loaded. Before, they stayed
        withdrawn: a wrong bundle reverted to the very file in force left every caller
        refused until a restart (found by a hostile review). Log ``certificates_restored``
        (``roots_restored``: how many came back)."""
        loaded = self._loaded_bundles.get(trust_domain)
        current = self.tls.trust.bundles.get(trust_domain)
        if loaded is None or current is None:
            return
        back = len(loaded.root_ders - current.root_ders)
        if back:
            try:
                widened = self.tls.with_bundle(loaded)
            except (SidecarError, ValueError) as exc:  # (another bundle claims its CA now)
                self._tls_reload_failed(exc)
                return
            # (``narrow`` installs a snapshot without counting a reload; the set in force is
            # the one that loaded. Trusting more ends no connection: nothing to judge again.)
            self.tls.narrow(widened)
        self.tls.last_error = None
        logs.log("certificates_restored", trust_domain=trust_domain,
                 roots=len(loaded.roots), roots_restored=back,
                 message="the files are back to the set in force")

    def _withdraw_unlisted(self, trust_domain: str, path: str) -> None:
        try:
            narrowed = self.tls.with_roots_withdrawn(trust_domain, path)
        except (SidecarError, OSError, ValueError):
            return  # the bundle file alone does not parse either: nothing is withdrawn
        if narrowed is None:
            return
        self.tls.narrow(narrowed)
        bundle = narrowed.trust.bundles[trust_domain]
        logs.log("trust_roots_withdrawn", "warning", trust_domain=trust_domain,
                 roots=len(bundle.roots),
                 message="roots removed from the trust domain's bundle file are no longer "
                         "trusted; its other roots stay until the file loads")
        self._trust_changed()

    def _tls_reload_failed(self, exc: BaseException) -> None:
        self.tls.record_failure(str(exc))
        self.metrics.certificate_reloads_total.labels("failed").inc()
        logs.log("certificate_reload_failed", "error", error=str(exc),
                 message="keeping the certificates in force")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _receive_signals() -> Iterator[AsyncIterator[int]]:
    """Every signal the sidecar handles, received from the start of ``Sidecar.run`` to its end.

    One that comes while the process starts is handled once it listens, and a second SIGTERM
    waits unread instead of ending the process in its drain or audit flush (a worker can get
    one from each exiting thread of a first process that was killed: PR_SET_PDEATHSIG follows
    the parent thread by thread). Trio hands the signals left unread at the end to the
    handlers from before, so SIGTERM and SIGINT are ignored under the receiver -- blocked
    while the handlers change, so that none is lost -- and restored after it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS, *RELOAD_SIGNALS,
                                       *IGNORED_SIGNALS) as signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            yield signals
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        for signum, handler in previous.items():
            if handler is not None:  # (None: not set from Python; left as it is)
                signal.signal(signum, handler)


def run(cfg: SidecarConfig, *, worker_index: int | None = None) -> int:
    """Run the sidecar until SIGTERM; with ``workers > 1`` also supervise the other workers,
    which are stopped on every way out of here."""
    logs.configure(level=cfg.log_level)
    ignore_signals_until_handled()  # (inherited by the workers until they handle them)
    children: list[subprocess.Popen[bytes]] = []
    shared: dict[str, socket.socket] = {}
    spawn: WorkerSpawner | None = None
    listening_fd: int | None = None
    try:
        try:
            if worker_index is None:
                worker_index = 0
                if cfg.workers > 1:
                    shared = _bind_shared_listeners(cfg)
                    env = {**os.environ, LISTEN_FDS_ENV: json.dumps(
                        {name: sock.fileno() for name, sock in shared.items()})}
                    spawn = WorkerSpawner(cfg, env, [sock.fileno() for sock in shared.values()])
                    for i in range(1, cfg.workers):
                        children.append(spawn(i))
            else:
                shared = _inherited_listeners(cfg)
                listening_fd = _listening_fd()
            sidecar = Sidecar(cfg, worker_index=worker_index)
        except (SidecarError, OSError, ValueError) as exc:  # SvidError: bad certificate files
            print("sidecar: cannot start: " + "\n".join(safe_lines(exc)), file=sys.stderr)
            return 2
        sidecar.workers = children
        sidecar.spawn_worker = spawn
        sidecar.listening_fd = listening_fd
        sidecar.shared_listeners = dict(shared)
        failed: list[BaseException] = []
        try:
            trio.run(sidecar.run)
        except* StartupError as group:
            failed.extend(_leaves(group))
    finally:
        _stop_children(children)
        if spawn is not None:
            spawn.close()
        for sock in shared.values():
            sock.close()  # (closed already by its accept loop when it ran: a no-op then)
    if failed:
        print("sidecar: cannot start: " + "\n".join(safe_lines(failed[0])), file=sys.stderr)
        return 2
    return 0


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The first process's look at its workers (``Sidecar._supervise_workers``): how often, and the
# wait before a worker that exited starts again (doubled for each quick exit, up to the max).
WORKER_POLL_INTERVAL = 1.0
WORKER_BACKOFF_FIRST = 1.0
WORKER_BACKOFF_MAX = 30.0
# The first process's listening sockets, as a worker inherits them: a JSON object listener
# name ("inbound", or an outbound's name) -> file descriptor (``_bind_shared_listeners``).
LISTEN_FDS_ENV = "SIDECAR_LISTEN_FDS"
# A worker's write end of the pipe on which it tells the first process it listens.
LISTENING_FD_ENV = "SIDECAR_WORKER_LISTENING_FD"


def _listener_addresses(cfg: SidecarConfig) -> list[tuple[str, tuple[str, int]]]:
    """Every listener the workers share (the inbound and outbound ones), by name."""
    wanted = [("inbound", cfg.inbound.listen)] if cfg.inbound is not None else []
    return wanted + [(ob.name, ob.listen) for ob in cfg.outbound]


def _bind_shared_listeners(cfg: SidecarConfig) -> dict[str, socket.socket]:
    """The first process of ``workers: N``: every listener bound once, before any other
    worker starts (``bind_shared``), so that none is ever bound with SO_REUSEPORT, which any
    process of the sidecar's uid could join (found by a hostile review). StartupError,
    naming the address and listener, when one cannot be bound (nothing is left open)."""
    bound: dict[str, socket.socket] = {}
    try:
        for name, addr in _listener_addresses(cfg):
            try:
                bound[name] = bind_shared(addr[0], addr[1])
            except OSError as exc:
                raise StartupError(f"cannot listen on {format_address(addr)} ({name}): "
                                   f"{exc.strerror or exc}") from None
    except BaseException:
        for sock in bound.values():
            sock.close()
        raise
    return bound


def _inherited_listeners(cfg: SidecarConfig) -> dict[str, socket.socket]:
    """A worker (``--worker-index``): the sockets the first process bound for it
    (``LISTEN_FDS_ENV``), one for each of its listeners; none when the variable is unset (a
    worker started by hand binds its own: the first process's ports are taken, so it stops
    with ``cannot listen``). StartupError when the variable names other listeners than the
    config's (the config file changed between the two starts) or is not such an object."""
    text = os.environ.pop(LISTEN_FDS_ENV, None)
    if text is None:
        return {}
    try:
        sockets = inherited_sockets(text)
    except (ValueError, OSError) as exc:
        raise StartupError(f"{LISTEN_FDS_ENV}: {exc}") from None
    names = [name for name, _ in _listener_addresses(cfg)]
    if sorted(sockets) != sorted(names):
        for sock in sockets.values():
            sock.close()
        raise StartupError(f"{LISTEN_FDS_ENV} names the listeners {sorted(sockets)}, the "
                           f"config {sorted(names)}: was the config changed while the workers "
                           "started?")
    return sockets


def _check_shared_address(sock: socket.socket, addr: tuple[str, int]) -> None:
    """An inherited socket is bound to the port its listener's config names (any port for
    port 0); OSError otherwise (the config changed between the first process's start and
    this worker's)."""
    port = int(sock.getsockname()[1])
    if addr[1] not in (0, port):
        raise OSError(errno.EINVAL, f"the inherited socket listens on port {port}")


class WorkerSpawner:
    """Starts worker I with the shared sockets ``fds`` and ``env``: at the first start and again
    from ``Sidecar._supervise_workers``. The fds stay open in the first process while it
    serves (its own accept loops use them), so a restart hands on the very same sockets.

    A restart forks under Trio, whose handlers now hold the reload and ignored signals: the
    child puts back SIG_IGN for them before exec, as ``ignore_signals_until_handled`` left them
    for the first start, so that a SIGHUP passed on while it starts does not end it. Each
    worker gets the write end of a pipe (``LISTENING_FD_ENV``) and writes one byte on it once
    it listens (``Sidecar._say_listening``): ``listening`` tells a started worker from one
    that still starts, or died starting."""

    def __init__(self, cfg: SidecarConfig, env: dict[str, str], fds: list[int]) -> None:
        self.cfg = cfg
        self.env = env
        self.fds = fds
        self._tie = _die_with_parent(os.getpid())
        self._pipes: dict[int, int] = {}  # pid -> read end, until the worker said it listens
        self._listening: set[int] = set()  # pids

    def _prepare(self) -> None:
        for signum in (*RELOAD_SIGNALS, *IGNORED_SIGNALS):
            signal.signal(signum, signal.SIG_IGN)
        if self._tie is not None:
            self._tie()

    def __call__(self, index: int) -> subprocess.Popen[bytes]:
        read_end, write_end = os.pipe()
        try:
            os.set_blocking(read_end, False)
            child = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "-c", self.cfg.source,
                 "--worker-index", str(index)], preexec_fn=self._prepare,
                env={**self.env, LISTENING_FD_ENV: str(write_end)},
                pass_fds=[*self.fds, write_end])
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._pipes[child.pid] = read_end
        return child

    def listening(self, child: subprocess.Popen[bytes]) -> bool:
        """Whether ``child`` said it listens (a byte on its pipe; the end of the pipe without
        one: it exited while it started)."""
        if child.pid in self._listening:
            return True
        fd = self._pipes.get(child.pid)
        if fd is None:
            return False
        try:
            said = os.read(fd, 1)
        except BlockingIOError:
            return False
        except OSError:
            said = b""
        os.close(fd)
        del self._pipes[child.pid]
        if said:
            self._listening.add(child.pid)
        return bool(said)

    def forget(self, child: subprocess.Popen[bytes]) -> None:
        """``child`` exited and was replaced: its pipe and pid are no longer of use."""
        self._listening.discard(child.pid)
        fd = self._pipes.pop(child.pid, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close the read ends of the workers' "listening" pipes (the first process ends)."""
        for fd in self._pipes.values():
            os.close(fd)
        self._pipes.clear()


def _listening_fd() -> int | None:
    """A worker: the pipe end on which it says it listens (``LISTENING_FD_ENV``), None when
    the variable is unset or not a descriptor number (a worker started by hand)."""
    text = os.environ.pop(LISTENING_FD_ENV, None)
    if text is None or not text.isdigit():
        return None
    fd = int(text)
    try:
        os.set_inheritable(fd, False)
    except OSError:
        return None
    return fd


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """Linux: what a worker runs between fork and exec so that it gets SIGTERM (drains and
    exits) when the first process dies, however it dies -- SIGKILL, a crash, an unhandled
    signal (found by a hostile review: a SIGHUP killed the first process and its worker kept
    serving, with no admin port and no supervisor). A first process that died before the
    prctl took effect (``getppid`` is no longer ``parent``) sent no signal: the worker ends
    at once. Elsewhere: None (the first process still stops its workers on every way out of
    ``run``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = ctypes.c_ulong(signal.SIGTERM)
    zero = ctypes.c_ulong(0)

    def tie() -> None:
        prctl(PR_SET_PDEATHSIG, sigterm, zero, zero, zero)
        if os.getppid() != parent:
            os._exit(1)

    return tie


def _start_print(paths: list[str]) -> str:
    """The fingerprint a watcher of ``paths`` starts from, taken before the files are first
    read: any change after it, however soon, is a change to load. Files that cannot be read
    then count as ``"missing"`` (the watcher's word for them: anything readable differs)."""
    return fingerprint(paths) or "missing"


def _broken_files(exc: BaseException) -> list[str]:
    """The files a failed policy load names, each once, in order: the log's ``error`` is cut
    at 1,024 characters, and a directory's every broken file must still be named."""
    if not isinstance(exc, ConfigError):
        return []
    return list(dict.fromkeys(problem.file for problem in exc.problems))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
