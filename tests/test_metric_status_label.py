"""The app cannot blind ``sidecar_requests_total`` to denials with statuses of its choice.

Found by a hostile review: the status label was the app's status as it came, so an app (or
the peer behind an outbound listener, or any caller of an app that echoes a status) that
answered 400 distinct statuses filled the metric's 1,000 series, and every new series after
that -- the first 403 of ``default deny`` -- was folded into the all-``other`` series, where
alerts on ``decision="deny"`` never saw it. Now a status not in the registry is its class
(``telemetry.status_label``), and the metric folds the status alone first
(``Metric(fold_first=...)``), keeping direction, decision and rule.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from sidecar.metrics import SidecarMetrics
from sidecar.telemetry import REGISTERED_STATUSES, status_label
from tests.harness import (
    Pki,
    ScriptedServer,
    free_port,
    mtls_context,
    read_head,
    sidecar_config,
    spiffe,
    start_sidecar,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def test_registered_statuses_are_themselves_and_the_rest_their_class() -> None:
    assert REGISTERED_STATUSES == {s.value for s in HTTPStatus}
    for status in range(100, 600):
        want = str(status) if status in REGISTERED_STATUSES else f"{status // 100}xx"
        assert status_label(status) == want
    labels = {status_label(s) for s in range(100, 600)}
    assert len(labels) <= len(REGISTERED_STATUSES) + 5


@pytest.mark.parametrize("decision", ["deny", "dry_run", "allow"])
def test_a_full_metric_folds_the_status_and_keeps_the_decision(decision: str) -> None:
    metrics = SidecarMetrics(max_children=20)
    total = metrics.requests_total
    for i in range(20):  # an app's statuses fill the metric
        total.labels("inbound", "allow", "public", f"s{i}").inc()
    total.labels("inbound", decision, "default deny", "403").inc()
    total.labels("inbound", decision, "default deny", "4xx").inc()
    assert total.labels("inbound", decision, "default deny", "other").value == 2
    text = metrics.registry.render().decode()
    assert f'decision="{decision}",rule="default deny",status="other"}} 2' in text
    assert 'sidecar_metrics_label_overflow_total{metric="sidecar_requests_total"} 2' in text
    # Bounded all the same: at most as many again, then the all-"other" series.
    for i in range(40):
        total.labels("inbound", "deny", f"rule-{i}", "403").inc()
    assert len(total._children) <= 2 * 20 + 1
    assert total.labels("other", "other", "other", "other").value > 0


# ----------------------------------------------------------------------------- a real sidecar


class StatusApp(ScriptedServer):
    """Answers each request of a connection with the status its path ends in."""

    timeout = 30.0

    def serve(self, sock: socket.socket) -> None:
        while True:
            head = read_head(sock)
            if b"\r\n\r\n" not in head:
                return
            found = re.search(rb" /\w+/(\d{3}) ", head)
            status = int(found.group(1)) if found else 200
            body = b"" if status in (204, 304) or status < 200 else b"ok"
            sock.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, len(body), body))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Any]:
    pki = Pki(tmp_path / "pki")
    policy = tmp_path / "mesh.yaml"
    rules = "".join(f"""
      - name: r{n}
        allow: {{from: ["{spiffe("frontend")}"], paths: [/{n}/**]}}""" for n in "abc")
    policy.write_text(f"version: 1\ntrust_domain: demo.local\nservices:\n"
                      f"  {spiffe('orders')}:\n    rules:{rules}\n")
    with contextlib.ExitStack() as stack:
        app = StatusApp()
        stack.callback(app.close)
        proc = start_sidecar(tmp_path, "orders", sidecar_config(
            pki.identity("orders"), inbound={"listen": f"127.0.0.1:{free_port()}",
                                             "app": f"127.0.0.1:{app.port}"},
            policy=str(policy)))
        stack.callback(proc.stop, timeout=10)
        ctx = mtls_context(pki.identity("frontend", dirname="client"), pki.bundle)
        yield proc, ctx


def test_statuses_of_the_apps_choice_cannot_hide_a_deny(node: Any) -> None:
    proc, ctx = node
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", proc.port("inbound")),
                                                    timeout=10))
    with sock:
        for rule in "abc":
            for status in range(200, 600):  # 1,200 requests, 400 statuses a rule
                sock.sendall(b"GET /%s/%d HTTP/1.1\r\nHost: orders\r\n\r\n"
                             % (rule.encode(), status))
                data = read_head(sock)
                assert data.startswith(b"HTTP/1.1 %d" % status), data[:40]
                head, _, body = data.partition(b"\r\n\r\n")
                while b"content-length: 2" in head.lower() and len(body) < 2:
                    body += sock.recv(2 - len(body))
        sock.sendall(b"GET /admin HTTP/1.1\r\nHost: orders\r\n\r\n")
        assert read_head(sock).startswith(b"HTTP/1.1 403")
    deny = proc.metric("sidecar_requests_total", direction="inbound", decision="deny",
                       rule="default deny", status="403")
    assert deny == 1
    unregistered = [s for s in range(200, 300) if s not in REGISTERED_STATUSES]
    assert proc.metric("sidecar_requests_total", direction="inbound", decision="allow",
                       rule="ra", status="2xx") == len(unregistered)
    assert proc.metric("sidecar_requests_total", direction="inbound", decision="allow",
                       rule="rc", status="404") == 1
    assert proc.metric("sidecar_metrics_label_overflow_total",
                       metric="sidecar_requests_total") == 0
