"""``sidecar policy explain`` refuses run-as query parameters as the data path does (found by
the thirty-third session's hostile review: ``/orders?doas=root`` was shown ALLOW where the
sidecar answers 400 ``run_as_parameter`` before any rule runs; docs/policy.md "explain").

The whole family of tests/test_run_as_parameters.py -- every member in every spelling a
common reader takes for it, in every place of the query -- and its controls, sent to one real
sidecar (default ``headers``) and explained under the same policy file: explain shows the
400 and its reason exactly where the sidecar answers 400, and decides the controls as it
lets them through. A few through the CLI (``-o json`` and the text).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.http.untrusted import RUN_AS_PARAMETERS
from sidecar.policy.explain import explain
from sidecar.policy.loader import load_policy_set
from tests import harness as H
from tests.test_run_as_parameters import CONTROLS, QUERIES, _spellings

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ORDERS = H.spiffe("orders")
FRONTEND = H.spiffe("frontend")
POLICY = {"version": 1, "trust_domain": H.TD, "services": {ORDERS: {"rules": [
    {"name": "fe", "allow": {"from": [FRONTEND]}}]}}}
MEMBERS = [template.format(p=spelling) for name in RUN_AS_PARAMETERS
           for spelling in _spellings(name) for template in QUERIES.values()]
CLI_QUERIES = ["doas=root", "user.name=admin", "%73udo=1"]


class Live:
    """One real inbound sidecar under ``POLICY`` (default ``headers``), and the status it
    answers each member and control with."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list[Any] = []
        try:
            app, app_port = H.start_app(tmp)
            self.procs.append(app)
            pki = H.Pki(tmp / "pki")
            self.policy = H.write_policy(tmp / "policy.yaml", POLICY)
            srv = H.start_sidecar(tmp, "orders", H.sidecar_config(
                pki.identity("orders"), policy=self.policy,
                inbound={"listen": f"127.0.0.1:{H.free_port()}", "app": f"127.0.0.1:{app_port}"}))
            self.procs.append(srv)
            ctx = H.mtls_context(pki.identity("frontend"), pki.bundle)
            self.status = {q: H.http(srv.port("inbound"), "GET", f"/orders?{q}", ctx=ctx).status
                           for q in {*MEMBERS, *CONTROLS, *CLI_QUERIES}}
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


live = H.module_fixture("explain-run-as", Live)


def test_explain_refuses_what_the_data_path_refuses(live: Live) -> None:
    """Every member: 400 on the data path, and explain shows it refused before policy with
    ``run_as_parameter``; every control: let through, and explain allows it."""
    policy = load_policy_set([live.policy])
    wrong = []
    for query in [*MEMBERS, *CONTROLS]:
        shown = explain(policy, ORDERS, caller=FRONTEND, method="GET",
                        target=f"/orders?{query}", host="orders", port=1,
                        listener="inbound", now=time.time())
        got = (400, shown.refused_reason) if shown.refused_reason is not None \
            else (200 if shown.allowed else 403, None)
        want = (400, "run_as_parameter") if live.status[query] == 400 \
            else (live.status[query], None)
        if got != want:
            wrong.append((query, live.status[query], got))
    assert not wrong, wrong
    assert all(live.status[q] == 400 for q in MEMBERS)
    assert all(live.status[q] == 200 for q in CONTROLS)


@pytest.mark.parametrize("query", CLI_QUERIES)
def test_the_cli_shows_the_refusal(live: Live, query: str) -> None:
    assert live.status[query] == 400
    args = ("policy", "explain", live.policy, "--to", ORDERS, "--from", FRONTEND,
            "--path", f"/orders?{query}")
    r = H.sidecar_cli(*args, "-o", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout)["refused_before_policy"] == "run_as_parameter"
    text = H.sidecar_cli(*args)
    assert text.returncode == 1 and "run_as_parameter" in text.stdout, text.stdout
    assert "DENY 400" in text.stdout and "ALLOW" not in text.stdout, text.stdout
