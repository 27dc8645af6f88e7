"""Keeps every JWT provider's key set loaded: JWKS files (watched) and JWKS URIs (fetched).

Theory of operation: the policy declares providers, so the set of key sources changes with
policy reloads. ``KeySources.sync(providers)`` runs after each policy swap: a provider whose
source is unchanged keeps its task; a new or changed one gets a new task (a JWKS file is also
loaded at once, so its first requests never see "no keys"); a removed one is cancelled. Each
source runs in its own cancel scope inside the nursery given to ``attach``. Fetches never
happen on the request path.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from sidecar import logs
from sidecar.reload import FileWatcher


class KeySources:
    def __init__(self, authenticator: Any, metrics: Any) -> None:
        self.authenticator = authenticator
        self.metrics = metrics
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, tuple[tuple[Any, ...], trio.CancelScope]] = {}
        self._providers: dict[str, Any] = {}

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.sync(self._providers)

    def sync(self, providers: dict[str, Any]) -> None:
        self._providers = dict(providers)
        for name, prov in providers.items():
            source = (prov.jwks_file, prov.jwks_uri, prov.jwks_ca, prov.jwks_refresh_seconds,
                      prov.jwks_min_refetch_seconds)
            current = self._running.get(name)
            if current is not None and current[0] == source:
                continue
            if current is not None:
                current[1].cancel()
                del self._running[name]
            if prov.jwks_file:
                self._load_file(prov)
            if self._nursery is None:
                continue
            scope = trio.CancelScope()
            self._running[name] = (source, scope)
            self._nursery.start_soon(self._run_source, prov, scope)
        for name in list(self._running):
            if name not in providers:
                self._running.pop(name)[1].cancel()

    def _load_file(self, prov: Any) -> None:
        from sidecar.authn.jwks_fetch import load_jwks_file

        try:
            keys = load_jwks_file(prov.jwks_file)
        except Exception as exc:  # noqa: BLE001 -- a bad key file keeps the old keys
            logs.log("jwks_file_invalid", "error", provider=prov.name, path=prov.jwks_file,
                     error=str(exc))
            return
        self.authenticator.set_keys(prov.name, keys, time.time())

    async def _run_source(self, prov: Any, scope: trio.CancelScope) -> None:
        with scope:
            if prov.jwks_file:
                from sidecar.authn.jwks_fetch import load_jwks_file

                watcher = FileWatcher(
                    f"jwks:{prov.name}", [prov.jwks_file],
                    load=lambda: load_jwks_file(prov.jwks_file),
                    apply=lambda keys: self.authenticator.set_keys(prov.name, keys, time.time()),
                    on_error=lambda exc: logs.log("jwks_file_reload_failed", "error",
                                                  provider=prov.name, error=str(exc)),
                    interval=2.0)
                await watcher.run()
            elif prov.jwks_uri:
                from sidecar.authn.jwks_fetch import run_jwks_fetcher

                await run_jwks_fetcher(prov, self.authenticator)

    def ages(self, now: float) -> dict[str, float | None]:
        stats = self.authenticator.statistics(now)["providers"]
        return {name: s["key_set_age_seconds"] for name, s in stats.items()}
