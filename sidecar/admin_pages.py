"""What the admin and health servers answer, as values: the pure half of ``sidecar.admin``.

Theory of operation
-------------------
A route here is a plain function of the path and the running sidecar's status
(``AdminStatus``, provided by app.py) to a ``Reply``; nothing here touches a socket, sleeps or
reads the clock. The two answers that wait on something are left to the I/O half
(``sidecar.admin``): ``health_page`` returns the ``AppProbe`` to run instead of a reply for
/app-health/... paths, and /tap (a long poll) is answered there. Readiness is passed in as a
function, so the I/O half decides what a status that cannot answer means (not ready, logged).

* admin: /healthz /readyz /metrics /policy /config /audit/head (and /tap in the I/O half). It
  shows the effective config and the policy status, so it belongs on loopback.
* health: /healthz, /readyz (no reasons) and the /app-health/... probes of
  ``SIDECAR_APP_PROBES`` (parsed here, every problem reported at once). Nothing else, because
  the kubelet (and so the pod network) reaches it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sidecar.ctlhttp.reply import Reply
from sidecar.errors import ConfigError, Problem
from sidecar.jsondoc import JsonDocError, read_json
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.metrics import SidecarMetrics

APP_PROBES_ENV = "SIDECAR_APP_PROBES"
APP_HEALTH_PREFIX = "/app-health/"
MAX_APP_PROBES = 100
Readiness = Callable[[], tuple[bool, list[str]]]


class AdminStatus(Protocol):
    """What the admin and health servers ask the running sidecar (app.py provides it)."""

    def ready(self) -> tuple[bool, list[str]]:
        """``(ready, reasons)``: reasons are short codes explaining why not ready."""
        ...

    def policy_status(self) -> dict[str, Any]:
        """``version``, ``loaded_at``, ``last_reload_error``, ``source`` of the policy."""
        ...

    def effective_config(self) -> dict[str, Any]:
        """The effective sidecar config, already redacted."""
        ...




def admin_page(path: str, status: AdminStatus, metrics: SidecarMetrics,
               readiness: Readiness) -> Reply:
    """The admin server's answer for ``path`` (no query), /tap aside."""
    if path == "/healthz":
        return Reply(200, b"ok\n")
    if path == "/readyz":
        ready, reasons = readiness()
        return Reply.json(200 if ready else 503, {"ready": ready, "reasons": reasons})
    if path == "/metrics":
        return Reply(200, metrics.render(), METRICS_CONTENT_TYPE)
    if path == "/policy":
        return Reply.json(200, status.policy_status())
    if path == "/config":
        return Reply.json(200, status.effective_config())
    if path == "/audit/head":
        # The newest signed checkpoint: copy it off the pod to anchor the trail
        # (``sidecar audit verify --anchor``). 404 without signing or before the first.
        head = getattr(status, "audit_head", None)
        value = head() if head is not None else None
        return Reply.json(200, value) if value is not None else Reply.error(404)
    return Reply.error(404)


@dataclass(frozen=True, slots=True)
class AppProbe:
    """One rewritten kubelet probe: GET ``path`` on 127.0.0.1:``port``."""

    port: int
    path: str
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"


def parse_app_probes(text: str | None) -> dict[str, AppProbe]:
    """Parse ``SIDECAR_APP_PROBES`` (JSON); every problem is reported in one ConfigError."""
    if text is None or not text.strip():
        return {}
    problems: list[Problem] = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(APP_PROBES_ENV, None, key, message))

    try:
        raw = read_json(text)
    except JsonDocError as exc:
        raise ConfigError([Problem(APP_PROBES_ENV, None, "", f"not valid JSON: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([Problem(APP_PROBES_ENV, None, "", "must be a JSON object")])
    if len(raw) > MAX_APP_PROBES:
        problem("", f"at most {MAX_APP_PROBES} probes")
    probes: dict[str, AppProbe] = {}
    for key, spec in raw.items():
        if not key.startswith(APP_HEALTH_PREFIX) or not _clean_path(key) or "?" in key:
            problem(key, f"probe paths must start with {APP_HEALTH_PREFIX} (no query)")
            continue
        if not isinstance(spec, dict):
            problem(key, "must be an object with port, path and optional scheme")
            continue
        unknown = set(spec) - {"port", "path", "scheme"}
        if unknown:
            problem(key, f"unknown keys: {', '.join(sorted(unknown))}")
        port = spec.get("port")
        path = spec.get("path")
        scheme = str(spec.get("scheme", "HTTP")).upper()
        ok = True
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problem(key, "port must be an integer from 1 to 65535")
            ok = False
        if not isinstance(path, str) or not path.startswith("/") or not _clean_path(path):
            problem(key, "path must start with / and hold no spaces or control characters")
            ok = False
        if scheme not in ("HTTP", "HTTPS"):
            problem(key, "scheme must be HTTP or HTTPS")
            ok = False
        if ok:
            assert isinstance(port, int) and isinstance(path, str)
            probes[key] = AppProbe(port, path, "HTTPS" if scheme == "HTTPS" else "HTTP")
    if problems:
        raise ConfigError(problems)
    return probes


def app_probes_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, AppProbe]:
    """The probe map from the environment (empty when the variable is not set)."""
    return parse_app_probes(environ.get(APP_PROBES_ENV))


def _clean_path(path: str) -> bool:
    return len(path) <= 2048 and all(33 <= ord(c) < 127 for c in path)


def health_page(path: str, probes: Mapping[str, AppProbe],
                readiness: Readiness) -> Reply | AppProbe:
    """The health server's answer for ``path``, or the app probe to run for it."""
    if path == "/healthz":
        return Reply(200, b"ok\n")
    if path == "/readyz":
        ready, _ = readiness()
        return Reply(200, b"ready\n") if ready else Reply(503, b"not ready\n")
    probe = probes.get(path)
    if probe is not None:
        return probe
    return Reply.error(404)
