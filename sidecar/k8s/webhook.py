"""The mutating admission webhook: routes and certificate on the control-plane HTTP server.

Theory of operation
-------------------
The decision is made by ``sidecar.k8s.admission.review_pod`` (pure); this module only moves
bytes and bounds every wait:

* ``ServingCertificate`` holds the current ``ssl.SSLContext``. ``watch()`` runs the
  sidecar's own file watcher (``sidecar.reload.FileWatcher``) on the certificate and key
  files: when their content changed and has settled for one poll, ``load()`` builds a new
  context and it is swapped in one assignment. Each new connection wraps its socket with
  whatever context is current at accept time, so new handshakes use the new certificate and
  connections already open keep theirs. A new pair that does not load (key/cert mismatch,
  half-written files during a Secret ``..data`` swap, expired) is reported and the old
  context stays; it is tried again when the files change, or after 30 s as they are (a
  certificate not valid yet becomes valid). Polling every few seconds is cheap
  (cert-manager rotates weeks ahead of expiry) and avoids inotify's symlink-swap pitfalls.
* ``serve_webhook`` runs ``sidecar.ctlhttp.server.serve`` over TLS with the webhook's bounds
  (``WebhookLimits.server_limits``). It accepts at most ``max_connections`` connections at
  once (accepting pauses at the limit, so excess clients wait in the kernel backlog instead
  of growing our memory), and at most ``max_connections_per_source`` from one source address: a
  connection beyond that is closed at once, so one client holding keep-alive connections
  can take its share and never the slots the API server needs (``failurePolicy: Fail``
  would otherwise stop pod creation in every meshed namespace). Each connection: TLS
  handshake under a timeout, then up to ``max_requests_per_connection`` keep-alive
  requests, each with a deadline for its head and body, a short idle timeout between
  requests (5 s: the API server opens a new connection, or retries on a closed one, for
  the next review) and a body cap (3 MiB by default; bigger -> 413). Bodies being read hold
  at most ``reading_bytes`` (16 MiB) in all and ``reading_bytes_per_source`` (8 MiB) per
  source address, counted from their ``Content-Length`` before they are read (chunked: as
  they arrive); one that does not fit is answered 503 ``busy`` and the connection closed
  (found by a hostile review: 60 connections of one source, each holding a 3 MiB body all
  but one byte sent, took 210 MiB of the webhook's 256). Refused connections
  are counted (``WebhookStats``) and shown at ``GET /metrics``.
* Routes: ``POST /mutate`` (namespaces labelled ``enabled``) and ``POST /mutate-required``
  (``required``) -> AdmissionReview answer; ``GET /healthz`` -> 200;
  ``GET /metrics`` -> the webhook's counters (Prometheus text); a known path
  with another method -> 405 with ``Allow``; anything else -> 404. Malformed reviews get a
  400 JSON body and the connection (and server) carry on; malformed HTTP gets a 400 JSON
  body and the connection closes.
* A review is pure CPU: about 0.8 s per MiB for the largest pods (a 3 MiB review, the body
  cap, about 2.5 s). It runs in a worker thread (``trio.to_thread.run_sync``), at most
  ``REVIEW_THREADS`` at once and only while their bodies fit ``review_bytes`` (``ReviewGate``:
  others wait their turn in order, each until its request's deadline, with at most
  ``waiting_bytes`` of bodies waiting; otherwise 503), so the event loop goes on accepting, handshaking, and answering
  ``/healthz`` and small reviews meanwhile (found by a hostile review: one large review
  blocked every other connection, the kubelet's probes included, for its whole time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import trio
from cryptography import x509

from sidecar.config.source import read_whole
from sidecar.ctlhttp.reply import JSON, Reply
from sidecar.ctlhttp.server import (
    BodyOverBudget,
    BodyTooLarge,
    Handler,
    Request,
    ServerLimits,
    serve,
)
from sidecar.identity.svid import MAX_FILE_BYTES as MAX_PEM_FILE_BYTES
from sidecar.identity.tls import limit_key_exchange, memory_files, server_only_fresh_sessions
from sidecar.k8s.admission import MAX_REVIEW_BYTES, AdmissionAnswer, review_pod
from sidecar.k8s.flags import add_webhook_arguments, inject_options_from_args
from sidecar.k8s.inject import InjectOptions
from sidecar.k8s.rules import mode_for_path
from sidecar.logs import log
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.metrics import Registry
from sidecar.reload import (
    IGNORED_SIGNALS,
    RELOAD_SIGNALS,
    FileWatcher,
    fingerprint,
    handle_signal,
    ignore_signals_until_handled,
)

_T = TypeVar("_T")


@dataclass(frozen=True)
class WebhookLimits:
    """Bounds on everything a client can make the webhook wait for or hold."""

    max_body: int = MAX_REVIEW_BYTES
    max_head: int = 16 * 1024
    handshake_timeout: float = 5.0
    request_timeout: float = 10.0  # head + body of one request, and sending the answer
    idle_timeout: float = 5.0  # between keep-alive requests
    max_connections: int = 512
    max_connections_per_source: int = 64
    max_requests_per_connection: int = 1000
    # Reviews at once: at most REVIEW_THREADS, whose bodies add up to at most
    # ``review_bytes`` (a review's working set is some 25 times its body: one 3 MiB review
    # took 80 MB); bodies read and waiting for a review add up to at most ``waiting_bytes``
    # (more than two threads review within one request's deadline), beyond it 503 at once.
    review_bytes: int = MAX_REVIEW_BYTES
    waiting_bytes: int = 4 * MAX_REVIEW_BYTES
    # Bodies still being read: their declared (or, chunked, received) bytes add up to at most
    # ``reading_bytes``, and those of one source address to ``reading_bytes_per_source`` (at
    # least ``max_body``); a body that does not fit is answered 503 before it is read. Found
    # by a hostile review: only the connection limits bounded them (512 x 3 MiB).
    reading_bytes: int = 16 * 1024 * 1024
    reading_bytes_per_source: int = 8 * 1024 * 1024

    def server_limits(self) -> ServerLimits:
        """The same bounds for the control-plane server (``sidecar.ctlhttp.server``)."""
        return ServerLimits(
            max_head_bytes=self.max_head, head_timeout=self.request_timeout,
            idle_timeout=self.idle_timeout, request_timeout=self.request_timeout,
            write_timeout=self.request_timeout, handshake_timeout=self.handshake_timeout,
            max_connections=self.max_connections,
            max_connections_per_source=self.max_connections_per_source,
            max_requests_per_connection=self.max_requests_per_connection,
            discard_body_bytes=4096, wait_for_slot=True,
            body_budget_bytes=self.reading_bytes,
            body_budget_per_source=self.reading_bytes_per_source)


class WebhookStats:
    """The webhook's counters, rendered at ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.connections_refused = self.registry.counter(
            "sidecar_webhook_connections_refused_total",
            "Webhook connections closed unserved by a connection limit, by reason.",
            ("reason",))
        self.connections_open = self.registry.gauge(
            "sidecar_webhook_connections_open", "Webhook connections open now.")
        self.reviews = self.registry.counter(
            "sidecar_webhook_reviews_total",
            "AdmissionReviews answered, by result (injected, allowed, denied, malformed).",
            ("result",))

    def render(self) -> bytes:
        """The webhook's counters in Prometheus text format, the body of ``GET /metrics``."""
        return self.registry.render()


class ReviewGate:
    """Who may run a review now (``WebhookLimits.review_bytes``, ``waiting_bytes``,
    ``REVIEW_THREADS``): first come, first served, each waiting only until its request's
    deadline. Found by a hostile review: a review waited for a thread with no bound, so 20
    concurrent 3 MiB reviews were answered up to 23 s later (the API server gives up after
    ``timeoutSeconds: 10``, so the webhook worked for nobody while every review behind them
    timed out), and two of them at once, plus the bodies waiting, took the webhook past
    its 256 MiB memory limit (292 MiB resident: OOM-killed, and with ``failurePolicy:
    Fail`` no pod created in any meshed namespace)."""

    def __init__(self, limits: WebhookLimits) -> None:
        self.limits = limits
        self.running = 0
        self.running_bytes = 0
        self.waiting_bytes = 0
        self._queue: list[object] = []
        self._lot = trio.lowlevel.ParkingLot()

    def _may_start(self, ticket: object, size: int) -> bool:
        if self._queue[0] is not ticket or self.running >= REVIEW_THREADS:
            return False
        return self.running == 0 or self.running_bytes + size <= self.limits.review_bytes

    async def run(self, size: int, deadline: float,
                  work: Callable[[], _T]) -> tuple[bool, _T | None]:
        """``(True, work())`` run in a worker thread, or ``(False, None)`` when the queue is
        full or no turn came by ``deadline``."""
        if self.waiting_bytes + size > self.limits.waiting_bytes:
            return False, None
        ticket = object()
        self._queue.append(ticket)
        self.waiting_bytes += size
        started = False
        try:
            with trio.move_on_at(deadline):
                while not self._may_start(ticket, size):
                    await self._lot.park()
                started = True
                self.running += 1
                self.running_bytes += size
        finally:
            self._queue.remove(ticket)
            self.waiting_bytes -= size
            self._lot.unpark_all()  # the next one in the queue may start now
        if not started:
            return False, None
        try:
            return True, await trio.to_thread.run_sync(work)
        finally:
            self.running -= 1
            self.running_bytes -= size
            self._lot.unpark_all()


class CertificateLoadError(Exception):
    """The webhook's certificate/key files could not be turned into a server context."""


def _server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    server_only_fresh_sessions(ctx)  # no session cache to fill (sidecar/identity/tls.py)
    limit_key_exchange(ctx)  # no finite-field groups (sidecar/identity/tls.py)
    with memory_files(cert_pem, key_pem) as (cert_path, key_path):
        ctx.load_cert_chain(cert_path, key_path)  # the bytes read (OpenSSL opens no file)
    return ctx


@dataclass(frozen=True, slots=True)
class _LoadedPair:
    context: ssl.SSLContext
    not_after: float
    not_after_iso: str


class ServingCertificate:
    """The webhook's serving certificate, swapped atomically when its files change."""

    def __init__(self, cert_path: str, key_path: str, now: float) -> None:
        """Load the pair now; raises ``CertificateLoadError`` (fail at start, not later)."""
        self.cert_path = cert_path
        self.key_path = key_path
        self._context: ssl.SSLContext | None = None
        self.reloads = 0
        self.failures = 0
        self.last_error = ""
        self.not_after = 0.0
        # What the watcher compares against: the content this first load saw (a change
        # between here and the watcher's start is then still noticed).
        self._fingerprint = fingerprint([cert_path, key_path])
        try:
            self._apply(self.load(now))
        except CertificateLoadError as exc:
            self._failed(exc)
            raise CertificateLoadError(self.last_error) from None

    @property
    def context(self) -> ssl.SSLContext:
        """The context new connections are wrapped with."""
        assert self._context is not None  # set by __init__ or it raised
        return self._context

    def _read_digest(self) -> tuple[bytes, bytes, bytes]:
        """(digest of both, certificate PEM, key PEM): regular files of at most 1 MiB each,
        a FIFO or ``/dev/zero`` refused at once (``read_whole``)."""
        cert = read_whole(self.cert_path, MAX_PEM_FILE_BYTES)
        key = read_whole(self.key_path, MAX_PEM_FILE_BYTES)
        return hashlib.sha256(cert + b"\0" + key).digest(), cert, key

    def load(self, now: float) -> _LoadedPair:
        """Read and check the pair and build its context; ``CertificateLoadError`` if it is
        unreadable, mismatched, expired or not valid yet. Changes nothing (the watcher
        calls it in a thread and swaps the result in with ``_apply``)."""
        try:
            _, cert_pem, key_pem = self._read_digest()
            leaf = x509.load_pem_x509_certificate(cert_pem)
            not_after = leaf.not_valid_after_utc.timestamp()
            if not_after <= now:
                raise CertificateLoadError(
                    f"certificate {self.cert_path} expired at "
                    f"{leaf.not_valid_after_utc.isoformat()}")
            if leaf.not_valid_before_utc.timestamp() > now + 300:
                raise CertificateLoadError(f"certificate {self.cert_path} is not valid yet")
            # Built from the very bytes checked above: a file changing meanwhile cannot
            # give OpenSSL another pair than the one checked.
            ctx = _server_context(cert_pem, key_pem)
        except CertificateLoadError:
            raise
        except OSError as exc:
            raise CertificateLoadError(f"{exc.filename}: {exc.strerror}" if exc.filename
                                       and exc.strerror else str(exc)) from exc
        except (ValueError, ssl.SSLError) as exc:
            raise CertificateLoadError(str(exc) or type(exc).__name__) from exc
        return _LoadedPair(ctx, not_after, leaf.not_valid_after_utc.isoformat())

    def _apply(self, pair: _LoadedPair) -> None:
        first = self._context is None
        self._context, self.not_after = pair.context, pair.not_after
        if not first:
            self.reloads += 1
            log("webhook_cert_reloaded", "info", cert=self.cert_path,
                not_after=pair.not_after_iso)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = str(exc) or type(exc).__name__
        log("webhook_cert_reload_failed", "warning", cert=self.cert_path, error=self.last_error)

    def statistics(self) -> dict[str, Any]:
        """Reload counters and the current certificate's expiry (epoch seconds)."""
        return {"reloads": self.reloads, "failures": self.failures,
                "not_after": self.not_after, "last_error": self.last_error}

    async def watch(self, interval: float, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the files with the sidecar's ``FileWatcher`` until cancelled."""
        watcher = FileWatcher("webhook certificate", [self.cert_path, self.key_path],
                              load=lambda: self.load(_wall_clock()), apply=self._apply,
                              on_error=self._failed, interval=interval,
                              initial=self._fingerprint)
        await watcher.run(task_status=task_status)


def _wall_clock() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


def _json(status: int, doc: dict[str, Any], *, close: bool = False,
          headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, AdmissionAnswer(status, doc).encode(), JSON, headers, close)


def _bad_request(status: int) -> Reply:
    return _json(status, {"error": "bad HTTP request"}, close=True)


def webhook_handler(options: InjectOptions, limits: WebhookLimits,
                    stats: WebhookStats) -> Handler:
    """The webhook's routes (see the module docstring)."""

    async def handle(request: Request) -> Reply:
        target, method = request.path, request.method
        if target in ("/healthz", "/metrics"):
            if method not in ("GET", "HEAD"):
                return _json(405, {"error": "method not allowed"}, close=True,
                             headers=(("allow", "GET, HEAD"),))
            if target == "/metrics":
                return Reply(200, stats.render(), METRICS_CONTENT_TYPE)
            return Reply(200, b"ok\n", "text/plain")
        mode = mode_for_path(target)
        if mode is None:
            return _json(404, {"error": "not found; POST AdmissionReviews to /mutate"},
                         close=True)
        if method != "POST":
            return _json(405, {"error": "method not allowed; use POST"}, close=True,
                         headers=(("allow", "POST"),))
        try:
            body = await request.read_body(limits.max_body)
        except BodyTooLarge:
            log("webhook_bad_request", "warning", error="body too large")
            return _json(413, {"error": f"body larger than {limits.max_body} bytes"}, close=True)
        except BodyOverBudget:  # too many bodies being read: not read, as a review refused
            stats.reviews.labels("busy").inc()
            log("webhook_bad_request", "warning", status=503, error="busy reading bodies")
            return _json(503, {"error": "busy; try again"}, close=True)
        # The path is the namespace's mode: the webhook configuration picks it from the
        # namespace label, which the pod's author does not control. The review and its
        # encoding run in a worker thread (see the module docstring).
        ran, result = await gate.run(
            len(body), request.deadline,
            functools.partial(_review, body, replace(options, namespace_mode=mode)))
        if not ran or result is None:
            stats.reviews.labels("busy").inc()
            log("webhook_bad_request", "warning", status=503, error="busy")
            return _json(503, {"error": "busy; try again"}, close=True)
        answer, encoded = result
        stats.reviews.labels(_review_result(answer)).inc()
        if answer.status != 200:
            log("webhook_bad_request", "warning", status=answer.status,
                error=str(answer.body.get("error", "")))
        else:
            response = answer.body.get("response", {})
            denied_by = {"rule": answer.rule} if answer.rule else {}
            log("webhook_review", "info", uid=response.get("uid"), injected=answer.injected,
                allowed=response.get("allowed"), mode=mode, **denied_by)
        return Reply(answer.status, encoded, JSON)

    gate = ReviewGate(limits)
    return handle


REVIEW_THREADS = 2  # reviews in worker threads at once (the module docstring)


def _review(body: bytes, options: InjectOptions) -> tuple[AdmissionAnswer, bytes]:
    """``review_pod`` and its encoded answer (in a worker thread)."""
    answer = review_pod(body, options)
    return answer, answer.encode()


def _review_result(answer: AdmissionAnswer) -> str:
    if answer.status != 200:
        return "malformed"
    if answer.injected:
        return "injected"
    return "allowed" if answer.body.get("response", {}).get("allowed") else "denied"


async def serve_webhook(host: str, port: int, certificate: ServingCertificate,
                        options: InjectOptions, limits: WebhookLimits | None = None, *,
                        stats: WebhookStats | None = None,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the webhook until cancelled; ``task_status.started(port)`` once listening."""
    limits = limits or WebhookLimits()
    counters = stats or WebhookStats()
    serving = functools.partial(
        serve, (host, port), webhook_handler(options, limits, counters), name="webhook",
        limits=limits.server_limits(), tls=lambda: certificate.context,
        bad_request=_bad_request, error_event="webhook_internal_error",
        on_refused=lambda reason: counters.connections_refused.labels(reason).inc(),
        on_connection=counters.connections_open.inc)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serving)
        log("webhook_listening", "info", host=host, port=bound)
        task_status.started(bound)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` -> (host, port); ValueError otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


async def run_webhook(host: str, port: int, certificate: ServingCertificate,
                      options: InjectOptions, reload_interval: float,
                      limits: WebhookLimits | None = None) -> None:
    """Serve, watch the certificate files, and stop cleanly on SIGTERM / SIGINT; SIGHUP and
    SIGUSR1 check the certificate files now, SIGUSR2 is logged and ignored
    (``sidecar.reload.handle_signal``: each of them used to end the webhook at once)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, *RELOAD_SIGNALS,
                                   *IGNORED_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(certificate.watch, reload_interval)
            await nursery.start(serve_webhook, host, port, certificate, options, limits)
            async for signum in signals:
                if handle_signal(signum):
                    continue
                log("webhook_stopping", "info", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def cmd_webhook(args: argparse.Namespace) -> int:
    """``sidecar webhook``: serve the mutating admission webhook until SIGTERM."""
    ignore_signals_until_handled()
    try:
        host, port = parse_listen(args.listen)
        certificate = ServingCertificate(args.cert, args.key, _wall_clock())
    except (ValueError, CertificateLoadError) as exc:
        log("webhook_start_failed", "error", error=str(exc))
        print(f"sidecar webhook: {exc}", file=sys.stderr)
        return 2
    limits = WebhookLimits(max_connections_per_source=args.max_connections_per_source,
                           idle_timeout=args.idle_timeout)
    trio.run(run_webhook, host, port, certificate, inject_options_from_args(args),
             float(args.reload_interval), limits)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sidecar.k8s.webhook ...`` (same flags as ``sidecar webhook``)."""
    parser = argparse.ArgumentParser(prog="python -m sidecar.k8s.webhook")
    add_webhook_arguments(parser)
    return cmd_webhook(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
