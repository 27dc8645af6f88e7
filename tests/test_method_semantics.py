"""HEAD follows GET in deny rules (HEAD runs the GET handler in nearly every framework)."""

from __future__ import annotations

import time

import pytest

from sidecar.policy.decision import NO_AUTH, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.lint import lint
from sidecar.policy.loader import load_policy
from tests.harness import module_fixture, spiffe
from tests.test_hostile_http import POLICY_START, SIDES, H, Mesh, exchange, statuses

# Every request here must end in a generic answer, never in an unhandled exception.
pytestmark = pytest.mark.usefixtures("no_internal_errors")

POLICY = POLICY_START + f"""\
services:
  {spiffe("orders")}:
    rules:
      - name: no-secret-reads
        deny: {{methods: [GET], paths: [/secret]}}
      - name: head-only
        allow: {{from: ["{spiffe("frontend")}"], methods: [HEAD], paths: [/probe]}}
      - name: frontend
        allow: {{from: ["{spiffe("frontend")}"]}}
  {spiffe("frontend")}:
    egress: ["{spiffe("orders")}"]
"""


def _facts(method: str, path: str) -> RequestFacts:
    return RequestFacts(direction="inbound", peer=spiffe("frontend"), source="127.0.0.1",
                        method=method, path=path, host="orders", port=1, listener="inbound")


def test_deny_on_get_denies_head() -> None:
    policy = load_policy(POLICY, "p.yaml")
    for method, allowed in (("GET", False), ("HEAD", False), ("POST", True)):
        d = decide(policy, spiffe("orders"), _facts(method, "/secret"), NO_AUTH, time.time())
        assert d.allowed is allowed, (method, d)


def test_lint_points_out_head_without_get() -> None:
    policy = load_policy(POLICY, "p.yaml")
    codes = [w.code for w in lint(policy, time.time())]
    assert "head-runs-get" in codes


mesh = module_fixture("methods", lambda tmp: Mesh(tmp, policy=POLICY))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_head_is_denied_where_get_is(mesh: Mesh, side: str, method: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, f"{method} /secret HTTP/1.1\r\n".encode() + H
                   + b"Connection: close\r\n\r\n")
    assert statuses(out) == [403], out[:300]
    assert mesh.app.targets_since(mark) == []
    out = exchange(mesh, side, f"{method} /public HTTP/1.1\r\n".encode() + H
                   + b"Connection: close\r\n\r\n")
    assert statuses(out) == [200], out[:300]
