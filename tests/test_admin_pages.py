"""The admin and health pages as values (sidecar/admin_pages.py): no sockets, no clock.

The servers that carry them, and the waits (/tap, application probes), are tested over real
sockets in tests/test_admin.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.admin_pages import AppProbe, admin_page, health_page
from sidecar.ctlhttp.reply import Reply
from sidecar.metrics import CONTENT_TYPE, SidecarMetrics


class Status:
    def __init__(self, head: dict[str, Any] | None = None) -> None:
        self.head = head

    def ready(self) -> tuple[bool, list[str]]:
        return True, []

    def policy_status(self) -> dict[str, Any]:
        return {"version": "v7", "source": "mesh.yaml"}

    def effective_config(self) -> dict[str, Any]:
        return {"admin": {"listen": "127.0.0.1:15000"}}

    def audit_head(self) -> dict[str, Any] | None:
        return self.head


def ready() -> tuple[bool, list[str]]:
    return True, []


def not_ready() -> tuple[bool, list[str]]:
    return False, ["no_policy"]


def body(reply: Reply) -> Any:
    return json.loads(reply.body)


def test_admin_pages() -> None:
    metrics = SidecarMetrics()
    status = Status({"seq": 3})
    page = admin_page("/healthz", status, metrics, ready)
    assert (page.status, page.body) == (200, b"ok\n")
    assert body(admin_page("/readyz", status, metrics, ready)) == {"ready": True, "reasons": []}
    refused = admin_page("/readyz", status, metrics, not_ready)
    assert refused.status == 503 and body(refused) == {"ready": False, "reasons": ["no_policy"]}
    page = admin_page("/metrics", status, metrics, ready)
    assert page.content_type == CONTENT_TYPE and page.body == metrics.render()
    assert body(admin_page("/policy", status, metrics, ready))["version"] == "v7"
    assert "admin" in body(admin_page("/config", status, metrics, ready))
    assert body(admin_page("/audit/head", status, metrics, ready)) == {"seq": 3}
    assert admin_page("/audit/head", Status(None), metrics, ready).status == 404
    assert admin_page("/nope", status, metrics, ready).status == 404


@pytest.mark.parametrize(("path", "readiness", "want"), [
    ("/healthz", ready, (200, b"ok\n")),
    ("/readyz", ready, (200, b"ready\n")),
    ("/readyz", not_ready, (503, b"not ready\n")),  # no reasons on the pod network
])
def test_health_pages(path: str, readiness: Any, want: tuple[int, bytes]) -> None:
    page = health_page(path, {}, readiness)
    assert isinstance(page, Reply) and (page.status, page.body) == want


def test_health_page_names_the_probe_to_run_and_nothing_else() -> None:
    probe = AppProbe(8080, "/livez")
    probes = {"/app-health/web/livez": probe}
    assert health_page("/app-health/web/livez", probes, ready) is probe
    for path in ("/app-health/web/other", "/metrics", "/config", "/policy"):
        page = health_page(path, probes, ready)
        assert isinstance(page, Reply) and page.status == 404
