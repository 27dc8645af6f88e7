"""Keeps every JWT provider's key set loaded: JWKS files (watched) and JWKS URIs (fetched).

Theory of operation: the policy declares providers, so the set of key sources changes with
policy reloads. ``KeySources.sync(providers)`` runs after each policy swap: a provider whose
source is unchanged keeps its task; a new or changed one gets a new task (a JWKS file is also
loaded at once, so its first requests never see "no keys"); a removed one is cancelled. Each
source runs in its own cancel scope inside the nursery given to ``attach``. Fetches never
happen on the request path.

Readiness: the ``jwks_uri`` providers known when ``attach`` runs (the sidecar's start) are
"pending" until their fetcher's first attempt ends, success or failure (bounded by the
fetch timeouts). ``first_fetch_pending()`` names them, so ``/readyz`` does not send traffic
to a sidecar that would refuse every valid token only because its keys are still on the way.
Providers added by a later policy reload are not gated: a slow JWKS server must not take
every sidecar of the mesh out of service at once.

Withdrawal: a ``jwks_file`` (changed, or read when the policy names it) or a fetched set
that does not load as a whole keeps the set in force, except the keys it no longer lists,
withdrawn at once (``withdraw_unlisted``, shared with the fetcher; ``jwks.still_listed``:
trusting less never waits for the rest of the set, as for trust bundles). Two hostile
reviews found a removed key kept verifying beside one broken entry: until a restart for a
file, for ``jwks_max_stale`` for a fetched set. A file reverted to the content in force
after such a refusal is loaded again (it may list a key the refusal withdrew).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from sidecar import logs
from sidecar.errors import ConfigError, Problem
from sidecar.policy.sections import JwtProvider
from sidecar.reload import FileWatcher, fingerprint

if TYPE_CHECKING:
    from sidecar.authn.authenticator import Authenticator
    from sidecar.authn.jwks import KeySet
    from sidecar.metrics import SidecarMetrics

# The watcher's starting point when the file did not load when the policy named it: matches
# no content, so whatever the file holds once it settles is loaded (and reported) again.
_NOT_LOADED = "not-loaded"


class JwksFileRefused(ConfigError):
    """A ``jwks_file`` that was read but does not load; ``document`` holds the bytes read, so
    the keys they no longer list are withdrawn from exactly what was refused."""

    def __init__(self, problems: list[Problem], document: bytes) -> None:
        super().__init__(problems)
        self.document = document


def read_jwks_file(path: str) -> KeySet:
    """``jwks_fetch.load_jwks_file``, but a document that is read and refused raises
    ``JwksFileRefused`` (with its bytes)."""
    from sidecar.authn.jwks import MAX_JWKS_BYTES, parse_jwks
    from sidecar.config.source import read_regular

    try:
        data = read_regular(path, MAX_JWKS_BYTES + 1)  # a FIFO or device: refused, not waited on
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read JWKS: {exc.strerror or exc}")]
                          ) from None
    try:
        return parse_jwks(data, path)
    except ConfigError as exc:
        raise JwksFileRefused(exc.problems, data) from None


def withdraw_unlisted(prov: JwtProvider, authenticator: Authenticator, document: bytes,
                      source: dict[str, str],
                      on_dropped: Callable[[str], None] | None) -> None:
    """``document`` (``prov``'s JWKS, from a ``jwks_file`` or fetched from its verified
    ``jwks_uri``: ``source`` names it) did not load as a whole: withdraw the keys in force it
    no longer lists (``jwks.still_listed``); the others stay until a document loads. One
    that is no JSON object with a ``keys`` list withdraws nothing. Logged as
    ``jwks_keys_unlisted``; ``on_dropped("withdrawn")`` when no key is left."""
    from sidecar.authn.jwks import still_listed

    in_force = authenticator.keys(prov.name)
    if in_force is None or not len(in_force):
        return
    kept = still_listed(document, in_force)
    if kept is None or kept is in_force:
        return
    gone = in_force.fingerprint() - kept.fingerprint()
    # As obtained when the set it narrows was: narrowing is no fresh fetch (the age gauge,
    # and jwks_max_stale for a fetcher started again, keep counting from then).
    since = authenticator.held_since(prov.name)
    authenticator.set_keys(prov.name, kept, since if since is not None else time.time())
    logs.log("jwks_keys_unlisted", "warning" if len(kept) else "error", provider=prov.name,
             **source, withdrawn=len(gone), kept=len(kept),
             kids=sorted(kid for kid, _, _ in gone if kid is not None),
             message="keys the key set no longer lists are no longer used; the keys it "
                     "still lists stay until it loads as a whole")
    if not len(kept) and on_dropped is not None:
        on_dropped("withdrawn")


class KeySources:
    """The running key source of every JWT provider (see the module docstring)."""

    def __init__(self, authenticator: Authenticator, metrics: SidecarMetrics) -> None:
        self.authenticator = authenticator
        self.metrics = metrics
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, tuple[tuple[object, ...], trio.CancelScope]] = {}
        self._providers: dict[str, JwtProvider] = {}
        self._pending: dict[str, trio.CancelScope] = {}
        self._gate_start = False

    def attach(self, nursery: trio.Nursery) -> None:
        """Start the sources in ``nursery``; the ``jwks_uri`` ones known now gate readiness."""
        self._nursery = nursery
        self._gate_start = True
        try:
            self.sync(self._providers)
        finally:
            self._gate_start = False

    def first_fetch_pending(self) -> list[str]:
        """Providers (known at start) whose first ``jwks_uri`` fetch has not ended yet."""
        return sorted(self._pending)

    def sync(self, providers: Mapping[str, JwtProvider]) -> None:
        """Match the running sources to ``providers``: keep unchanged ones, restart changed ones,
        start new ones, cancel removed ones."""
        self._providers = dict(providers)
        for name, prov in providers.items():
            source = (prov.jwks_file, prov.jwks_uri, prov.discovery_url, prov.jwks_ca,
                      prov.jwks_refresh_seconds, prov.jwks_min_refetch_seconds,
                      prov.jwks_max_stale_seconds)
            current = self._running.get(name)
            if current is not None and current[0] == source:
                continue
            if current is not None:
                current[1].cancel()
                del self._running[name]
                self._pending.pop(name, None)
            # The watcher starts from the file as it was *before* this load read it: a
            # change in between is one it sees. Before (found by a hostile review) it
            # fingerprinted the file when its task ran, and a change landing between the
            # load and that first look was taken as in force and never applied.
            initial = self._load_file(prov) if prov.jwks_file else None
            if self._nursery is None:
                continue
            scope = trio.CancelScope()
            self._running[name] = (source, scope)
            if (prov.jwks_uri or prov.discovery_url) and self._gate_start:
                self._pending[name] = scope
            self._nursery.start_soon(self._run_source, prov, scope, initial)
        for name in list(self._running):
            if name not in providers:
                self._running.pop(name)[1].cancel()
                self._pending.pop(name, None)

    def _load_file(self, prov: JwtProvider) -> str:
        """Load ``prov``'s ``jwks_file`` now; return the fingerprint its watcher starts from
        (taken before the read; ``_NOT_LOADED`` when it did not load)."""
        path = prov.jwks_file
        if not path:
            return _NOT_LOADED
        before = fingerprint([path])
        try:
            keys = read_jwks_file(path)
        except Exception as exc:  # noqa: BLE001 -- a bad key file keeps the old keys...
            logs.log("jwks_file_invalid", "error", provider=prov.name, path=prov.jwks_file,
                     error=str(exc))
            self._withdraw_unlisted(prov, exc)  # ...but for those it no longer lists
            return _NOT_LOADED
        self._apply_file(prov, keys)
        return before if before is not None else _NOT_LOADED

    def _apply_file(self, prov: JwtProvider, keys: KeySet) -> None:
        """Swap in a key set read from ``prov``'s ``jwks_file``; each key it skipped is
        logged (``jwks_key_skipped``, as for a fetched set: a file's were not logged)."""
        from sidecar.jwks_fetch import withdrawn

        for note in keys.skipped:
            logs.log("jwks_key_skipped", "warning", provider=prov.name, path=prov.jwks_file,
                     detail=note)
        self.authenticator.set_keys(prov.name, keys, time.time())
        if keys.withdrawn:  # (an emptied file: the operator withdrew every key)
            withdrawn(prov, keys, {"path": prov.jwks_file or ""}, self._dropped(prov.name))

    def _file_refused(self, prov: JwtProvider, exc: BaseException) -> None:
        """A changed ``jwks_file`` did not load: the set in force stays, but for the keys the
        file no longer lists (``_withdraw_unlisted``)."""
        logs.log("jwks_file_reload_failed", "error", provider=prov.name, error=str(exc))
        self._withdraw_unlisted(prov, exc)

    def _withdraw_unlisted(self, prov: JwtProvider, exc: BaseException) -> None:
        """Withdraw the keys in force that the refused ``jwks_file`` no longer lists (a
        file that could not be read withdraws nothing)."""
        if isinstance(exc, JwksFileRefused):
            withdraw_unlisted(prov, self.authenticator, exc.document,
                              {"path": prov.jwks_file or ""}, self._dropped(prov.name))

    def _dropped(self, name: str) -> Callable[[str], None]:
        """Count a provider left without keys, by cause (``on_dropped``)."""
        return lambda cause: self.metrics.jwks_keys_dropped_total.labels(name, cause).inc()

    async def _run_source(self, prov: JwtProvider, scope: trio.CancelScope,
                          initial: str | None = None) -> None:
        if not (prov.jwks_file or prov.jwks_uri or prov.discovery_url):
            return
        watcher = self._file_watcher(prov, initial) if prov.jwks_file else None
        with scope:
            while True:
                try:
                    await self._source_loop(prov, scope, watcher)
                except Exception as exc:  # noqa: BLE001 -- keep the last keys, try again
                    logs.log("jwks_source_failed", "error", provider=prov.name,
                             error=repr(exc))
                await trio.sleep(5.0)

    def _file_watcher(self, prov: JwtProvider, initial: str | None) -> FileWatcher:
        """The watcher of ``prov``'s ``jwks_file``, from ``initial`` (``_load_file``): made
        once per source, so a watcher run again after a failure keeps where it was."""
        path = prov.jwks_file or ""

        def restored() -> None:
            # Back to the content in force after a refused change: loaded again, since that
            # refusal may have withdrawn keys this content lists (a reverted bad edit).
            self._load_file(prov)

        return FileWatcher(
            f"jwks:{prov.name}", [path],
            load=lambda: read_jwks_file(path),
            apply=lambda keys: self._apply_file(prov, keys),
            on_error=lambda exc: self._file_refused(prov, exc),
            interval=2.0, initial=initial if initial is not None else _NOT_LOADED,
            on_restored=restored)

    async def _source_loop(self, prov: JwtProvider, scope: trio.CancelScope,
                           watcher: FileWatcher | None = None) -> None:
        if watcher is not None:
            await watcher.run()
        else:
            from sidecar.jwks_fetch import run_jwks_fetcher

            async with trio.open_nursery() as inner:
                # start() returns once the first fetch attempt has ended.
                fetches = self.metrics.jwks_fetches_total

                def counted(ok: bool) -> None:
                    fetches.labels(prov.name, "ok" if ok else "failed").inc()

                await inner.start(functools.partial(run_jwks_fetcher, prov,
                                                    self.authenticator, on_result=counted,
                                                    on_dropped=self._dropped(prov.name)))
                if self._pending.get(prov.name) is scope:
                    del self._pending[prov.name]

    def ages(self, now: float) -> dict[str, float | None]:
        """Seconds since each provider's key set was loaded (None: never)."""
        stats = self.authenticator.statistics(now)["providers"]
        return {name: s["key_set_age_seconds"] for name, s in stats.items()}
