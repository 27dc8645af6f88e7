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
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from sidecar import logs
from sidecar.policy.sections import JwtProvider
from sidecar.reload import FileWatcher

if TYPE_CHECKING:
    from sidecar.authn.authenticator import Authenticator
    from sidecar.authn.jwks import KeySet
    from sidecar.metrics import SidecarMetrics


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
            if prov.jwks_file:
                self._load_file(prov)
            if self._nursery is None:
                continue
            scope = trio.CancelScope()
            self._running[name] = (source, scope)
            if (prov.jwks_uri or prov.discovery_url) and self._gate_start:
                self._pending[name] = scope
            self._nursery.start_soon(self._run_source, prov, scope)
        for name in list(self._running):
            if name not in providers:
                self._running.pop(name)[1].cancel()
                self._pending.pop(name, None)

    def _load_file(self, prov: JwtProvider) -> None:
        from sidecar.jwks_fetch import load_jwks_file

        path = prov.jwks_file
        if not path:
            return
        try:
            keys = load_jwks_file(path)
        except Exception as exc:  # noqa: BLE001 -- a bad key file keeps the old keys
            logs.log("jwks_file_invalid", "error", provider=prov.name, path=prov.jwks_file,
                     error=str(exc))
            return
        self._apply_file(prov, keys)

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

    def _dropped(self, name: str) -> Callable[[str], None]:
        """Count a provider left without keys, by cause (``on_dropped``)."""
        return lambda cause: self.metrics.jwks_keys_dropped_total.labels(name, cause).inc()

    async def _run_source(self, prov: JwtProvider, scope: trio.CancelScope) -> None:
        if not (prov.jwks_file or prov.jwks_uri or prov.discovery_url):
            return
        with scope:
            while True:
                try:
                    await self._source_loop(prov, scope)
                except Exception as exc:  # noqa: BLE001 -- keep the last keys, try again
                    logs.log("jwks_source_failed", "error", provider=prov.name,
                             error=repr(exc))
                await trio.sleep(5.0)

    async def _source_loop(self, prov: JwtProvider, scope: trio.CancelScope) -> None:
        path = prov.jwks_file
        if path:
            from sidecar.jwks_fetch import load_jwks_file

            watcher = FileWatcher(
                f"jwks:{prov.name}", [path],
                load=lambda: load_jwks_file(path),
                apply=lambda keys: self._apply_file(prov, keys),
                on_error=lambda exc: logs.log("jwks_file_reload_failed", "error",
                                              provider=prov.name, error=str(exc)),
                interval=2.0)
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
