"""The I/O shell around key sets: fetch a provider's JWKS over HTTPS, or read it from a file.

Theory of operation
-------------------
``run_jwks_fetcher`` is one long-lived Trio task per provider with a ``jwks_uri`` or
``discovery`` (then each attempt first fetches the issuer metadata and takes its checked
``jwks_uri``, see ``oauth.check_metadata``; a bad document is a failed attempt). It owns a
``RefreshState`` (pure schedule, see ``jwks``) and loops: sleep until the schedule says a
fetch is due *or* the authenticator signals an unknown ``kid`` (a one-slot memory channel;
signals that find the slot full are dropped - one pending signal is as good as a thousand);
ask the schedule whether the signal may trigger a fetch; fetch; parse; swap the key set into
the authenticator. Fetches never run on the request path. Each attempt takes a jitter draw
from the task's own ``random.Random`` (seeded from the OS, or given by a test), so sidecars
that started together drift apart instead of refetching in lockstep.

A failed fetch (connect/TLS error, timeout, non-200, oversized or unusable document) keeps
the last good key set in use and is logged; its age keeps growing in ``statistics`` -- for at
most ``jwks_max_stale`` after the last success: then the set is dropped (the provider has no
keys, every token ``no_keys``; ``jwks_keys_stale``), so blocking the JWKS endpoint cannot pin
a compromised key for ever. A well-formed set that lists no usable key is no failure: it is
swapped in like any other (the identity provider withdrew its keys; ``jwks_keys_withdrawn``). The
task reports ``started`` after the *first* attempt, whatever its outcome, so the caller can
tell whether the provider starts with keys (``authenticator.keys(name)``) without the
sidecar hanging on a dead JWKS server.

``fetch_jwks`` is one GET through the control-plane client (``sidecar.ctlhttp.client``):
https only, certificate and host name checked against ``jwks_ca`` (or the system store),
TLS >= 1.2, no redirects, no compression, body capped at 1 MiB, every step under a deadline.
The fetcher's context is made again at a fetch when the ``jwks_ca`` file changed
(``sidecar.net.tlsfiles``): a bundle rotated in place is used without a policy change.

A fetched URL is never logged or put in an error message whole: its path or query may hold
a token (``?access_token=``), so the log lines (``jwks_fetch_failed``, ``jwks_fetched``,
``jwks_key_skipped``, ``jwks_keys_stale``, ``jwks_keys_withdrawn``, ``jwks_keys_unlisted``)
and the errors (the control-plane client's, a JWKS's or a metadata document's problems) name
it as ``shown_url`` does: scheme and host only. Found by a hostile review: the whole URL,
with the password and token the policy put in it, went to every failed fetch's line and to
``sidecar check``. (A user name or password in the URL is refused at load: ``url_problem``.)
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import Callable

import trio

from sidecar.authn.authenticator import Authenticator
from sidecar.authn.jwks import (
    MAX_JWKS_BYTES,
    KeySet,
    RefreshState,
    initial_refresh_state,
    next_fetch_at,
    on_fetch_failed,
    on_fetch_started,
    on_fetch_succeeded,
    on_unknown_kid,
    parse_jwks,
)
from sidecar.authn.oauth import MAX_METADATA_BYTES, check_metadata
from sidecar.config.source import read_regular
from sidecar.ctlhttp.client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    ClientError,
    parse_url,
    request,
    shown_url,
)
from sidecar.errors import ConfigError, Problem
from sidecar.logs import log
from sidecar.net.tlsfiles import FileContext
from sidecar.policy.sections import JwtProvider

# Every failure of a fetch is the control-plane client's error (kept under its old name).
JwksFetchError = ClientError


def jwks_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Client context for JWKS fetches: verify the chain and host name, TLS >= 1.2; made
    from the bytes of ``ca_file`` as read (``FileContext``; None: the system's roots)."""
    return FileContext(ca_file).context


async def fetch_jwks(uri: str, ssl_context: ssl.SSLContext, *,
                     connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                     read_timeout: float = DEFAULT_READ_TIMEOUT,
                     max_bytes: int = MAX_JWKS_BYTES,
                     accept: str = "application/json, application/jwk-set+json") -> bytes:
    """GET ``uri`` (https only) and return the body of a 200 response.

    Raises ``JwksFetchError`` for every failure, with the cause chained.
    """
    status, body = await https_request(uri, ssl_context, connect_timeout=connect_timeout,
                                       read_timeout=read_timeout, max_bytes=max_bytes,
                                       headers=[("accept", accept)])
    if status != 200:
        raise JwksFetchError(f"HTTP status {status}")
    return body


async def https_request(uri: str, ssl_context: ssl.SSLContext, *, method: str = "GET",
                        headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                        read_timeout: float = DEFAULT_READ_TIMEOUT,
                        max_bytes: int = MAX_JWKS_BYTES) -> tuple[int, bytes]:
    """One HTTP/1.1 request to ``uri`` (https only) on a fresh connection: (status, body).

    For JWKS, discovery metadata and token introspection: ``sidecar.ctlhttp.client`` with
    https required. The server is checked against ``ssl_context`` (which may also carry a
    client certificate); no redirects are followed, the body is capped at ``max_bytes``,
    connecting and the whole exchange each run under a deadline. ``JwksFetchError`` for
    every failure; the message never holds request headers or body (they may carry secrets).
    """
    target = parse_url(uri, schemes=("https",))
    try:
        answer = await request(target, method=method, headers=headers or (), body=body,
                               ssl_context=ssl_context, connect_timeout=connect_timeout,
                               read_timeout=read_timeout, max_body_bytes=max_bytes)
    except ClientError as exc:
        # The client names the request target (path and query) in some messages: shown
        # here as scheme and host only, as every message of a fetched URL is.
        raise type(exc)(scrubbed(str(exc), uri)) from exc.__cause__
    return answer.status, answer.body


def scrubbed(message: str, uri: str) -> str:
    """``message`` with ``uri`` -- whole, or its path and query, or as the control-plane
    client's ``Target.label`` spells it -- shown as ``shown_url`` shows it."""
    shown = shown_url(uri)
    try:
        target = parse_url(uri)
    except ClientError:
        return message.replace(uri, shown)
    for spelled in (uri, target.label):
        message = message.replace(spelled, shown)
    if target.target not in ("", "/"):
        message = message.replace(target.target, "(path and query not shown)")
    return message


def load_jwks_file(path: str) -> KeySet:
    """Read and parse a JWKS file; ``ConfigError`` (with the path) on any problem.

    For the file reloader: on error keep the current key set and report the problems.
    """
    try:
        data = read_regular(path, MAX_JWKS_BYTES + 1)  # a FIFO or device: refused, not waited on
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read JWKS: {exc.strerror or exc}")]
                          ) from None
    return parse_jwks(data, path)


async def run_jwks_fetcher(provider: JwtProvider, authenticator: Authenticator, *,
                           connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                           read_timeout: float = DEFAULT_READ_TIMEOUT,
                           rng: random.Random | None = None,
                           on_result: Callable[[bool], None] | None = None,
                           on_dropped: Callable[[str], None] | None = None,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Keep ``provider``'s key set fresh from its ``jwks_uri`` (or discovery) until cancelled.

    ``rng`` is the source of the schedule's jitter (a fresh OS-seeded one by default);
    ``on_result(ok)`` is told the outcome of every attempt (the fetch counter);
    ``on_dropped(cause)`` when the provider is left without keys: ``withdrawn`` (a fetched
    set lists none) or ``stale`` (``jwks_max_stale`` passed without a successful fetch).
    """
    if not (provider.jwks_uri or provider.discovery_url):
        raise ValueError(f"provider {provider.name!r} has no jwks_uri and no discovery")
    # Made again at a fetch when the jwks_ca file changed (a rotated bundle, same path).
    ssl_context = FileContext(provider.jwks_ca)
    jitter = rng if rng is not None else random.Random()  # spreads load; no secret here
    send, receive = trio.open_memory_channel[None](1)

    def unknown_kid() -> None:
        try:
            send.send_nowait(None)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # a signal is already pending; one is enough

    state = initial_refresh_state(provider.jwks_refresh_seconds,
                                  provider.jwks_min_refetch_seconds)
    authenticator.set_unknown_kid_listener(provider.name, unknown_kid)
    started = False
    # Until when (trio time) the last good set may be used while fetches fail; inf: there
    # is no set to drop (none yet, or already dropped). A fetcher started again (a reload
    # that changed jwks_refresh, jwks_ca, jwks_max_stale...) keeps the set in force and so
    # counts from when that set was obtained, not from its own start: a review found a
    # reload during an outage turned the bound off, the old keys used for ever.
    held = authenticator.held_since(provider.name)
    stale_at = (float("inf") if held is None else
                trio.current_time() + held + provider.jwks_max_stale_seconds - time.time())
    try:
        while True:
            due = next_fetch_at(state, trio.current_time())
            signalled = False
            with trio.move_on_at(min(due, stale_at)):
                await receive.receive()
                signalled = True
            if not signalled and trio.current_time() >= stale_at:
                stale_at = float("inf")
                _drop_stale(provider, authenticator, on_dropped)
                continue
            if signalled:
                state, fetch_now = on_unknown_kid(state, trio.current_time())
                if not fetch_now:
                    continue
            state = on_fetch_started(state, trio.current_time(), jitter.random())
            state = await _fetch_once(provider, authenticator, state, ssl_context,
                                      connect_timeout, read_timeout, signalled, on_dropped)
            ok = state.consecutive_failures == 0
            if ok:
                stale_at = trio.current_time() + provider.jwks_max_stale_seconds
            if on_result is not None:
                on_result(ok)
            if not started:
                started = True
                task_status.started()
    finally:
        authenticator.remove_unknown_kid_listener(provider.name, unknown_kid)
        send.close()


def _drop_stale(provider: JwtProvider, authenticator: Authenticator,
                on_dropped: Callable[[str], None] | None) -> None:
    """``jwks_max_stale`` passed since the last successful fetch: stop using the set."""
    authenticator.set_keys(provider.name, KeySet(source="stale"), time.time())
    log("jwks_keys_stale", "error", provider=provider.name,
        uri=shown_url(provider.jwks_uri or provider.discovery_url or ""),
        max_stale_seconds=provider.jwks_max_stale_seconds)
    if on_dropped is not None:
        on_dropped("stale")


def withdrawn(provider: JwtProvider, keys: KeySet, source: dict[str, str],
              on_dropped: Callable[[str], None] | None) -> None:
    """Report a key set (fetched or read from ``jwks_file``: ``source`` names it) that lists
    no usable key, now in use: every token of the provider is refused."""
    log("jwks_keys_withdrawn", "error", provider=provider.name, **source,
        skipped=len(keys.skipped))
    if on_dropped is not None:
        on_dropped("withdrawn")


async def _fetch_once(provider: JwtProvider, authenticator: Authenticator,
                      state: RefreshState, tls: FileContext,
                      connect_timeout: float, read_timeout: float,
                      signalled: bool,
                      on_dropped: Callable[[str], None] | None = None) -> RefreshState:
    uri = provider.jwks_uri or provider.discovery_url or ""
    data: bytes | None = None
    try:
        try:
            ssl_context = tls.current()
        except (OSError, ssl.SSLError) as exc:
            raise JwksFetchError(f"cannot load jwks_ca: {exc}") from exc
        if provider.discovery_url:
            # Metadata first, on every refresh: an issuer may move its jwks_uri, and a
            # document that stops naming our issuer must stop feeding us keys.
            meta = await fetch_jwks(provider.discovery_url, ssl_context,
                                    connect_timeout=connect_timeout, read_timeout=read_timeout,
                                    max_bytes=MAX_METADATA_BYTES, accept="application/json")
            uri = check_metadata(meta, provider.issuer, shown_url(provider.discovery_url))
        data = await fetch_jwks(uri, ssl_context, connect_timeout=connect_timeout,
                                read_timeout=read_timeout)
        keys = parse_jwks(data, shown_url(uri))
    except Exception as exc:  # noqa: BLE001 -- any failure keeps the last good keys
        # JwksFetchError and ConfigError are the expected ones; anything else is a bug
        # somewhere below, and must not kill the task that keeps the other keys fresh.
        expected = isinstance(exc, JwksFetchError | ConfigError)
        log("jwks_fetch_failed", "warning" if expected else "error", provider=provider.name,
            uri=shown_url(uri), error=scrubbed(str(exc) if expected else repr(exc), uri),
            failures=state.consecutive_failures + 1,
            have_keys=authenticator.keys(provider.name) is not None)
        if data is not None and isinstance(exc, ConfigError):
            # Refused as a whole, but the keys it no longer lists are withdrawn at once
            # (``keysources.withdraw_unlisted``; found by a hostile review: a removed key
            # kept verifying for ``jwks_max_stale`` beside one broken entry).
            from sidecar.keysources import withdraw_unlisted

            withdraw_unlisted(provider, authenticator, data, {"uri": shown_url(uri)},
                              on_dropped)
        return on_fetch_failed(state, trio.current_time())
    authenticator.set_keys(provider.name, keys, time.time())
    shown = shown_url(uri)
    log("jwks_fetched", "info" if signalled else "debug", provider=provider.name, uri=shown,
        keys=len(keys), unknown_kid=signalled)
    for note in keys.skipped:
        log("jwks_key_skipped", "warning", provider=provider.name, uri=shown, detail=note)
    if keys.withdrawn:
        withdrawn(provider, keys, {"uri": shown}, on_dropped)
    return on_fetch_succeeded(state, trio.current_time())
