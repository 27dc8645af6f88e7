"""``sidecar policy replay`` reads no more of a record than the data path can record (found
by the thirty-third session's hostile review: one 50 KB record of 3,000 ``x.routes`` and 16
``x.overrides`` cost minutes of CPU, every route judged for every override, claim trial and
port).

- The family of fields replay reads, each one past the data path's bound (the routes' count
  and each route's length, the Destination's, the path's, the Host's, the
  service's, the overrides' count, ``unread``'s): each is a malformed record, skipped and
  named on stderr, exit 2, as a bad ``x.port`` always was; the same fields at the bound are
  replayed.
- A record as long as the data path makes it -- a real sidecar's, for a request with 8 query
  routes and 16 override methods (8 in the query, 8 in its form body) -- is replayed, with
  the outcome the new policy gives.
- The backstop: a record within every bound whose trials (ports, claim tests) multiply past
  ``MAX_WORK_PER_RECORD`` is listed uncertain (``too many trials``), the trials left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit.config import AuditConfig
from sidecar.audit.record import AuditRecord
from sidecar.authn.extract import MAX_PATH_SEGMENTS_READ, PATH_TOKEN_FORM
from sidecar.http.request import MAX_HOST_CHARS, MAX_METHOD_OVERRIDES
from sidecar.policy.paths import MAX_QUERY_ROUTES, MAX_TARGET_BYTES
from sidecar.replay import UNREAD
from tests import harness as H

pytestmark = pytest.mark.usefixtures("no_internal_errors")

# The data path's bounds, from its own constants: the routes it judges (more is 400); a
# normalised path of an 8 KiB target (three characters a byte at most; a ``rest_route``
# gains ``/wp-json``), its token segments written as their digests (``path_for_records``);
# the query's and the body's override methods; a Host (``split_host``) with its port; a
# SPIFFE ID.
MAX_RECORDED_ROUTES = MAX_QUERY_ROUTES
MAX_RECORDED_PATH_CHARS = (3 * MAX_TARGET_BYTES + len("/wp-json/")
                           + (MAX_PATH_SEGMENTS_READ + 1) * len(PATH_TOKEN_FORM.format("0" * 64)))
MAX_RECORDED_OVERRIDES = 2 * MAX_METHOD_OVERRIDES
MAX_RECORDED_HOST_CHARS = MAX_HOST_CHARS + len(".:65535")
MAX_RECORDED_SERVICE_CHARS = 2048

ORDERS = H.spiffe("orders")
FRONTEND = H.spiffe("frontend")
METHODS = ["PUT", "DELETE", "PATCH", "GET", "HEAD", "OPTIONS", "PROPFIND", "MOVE",
           "COPY", "LOCK", "UNLOCK", "MKCOL", "PROPPATCH", "SEARCH", "REPORT", "MKCALENDAR"]
OPEN = {"version": 1, "trust_domain": H.TD, "services": {ORDERS: {"rules": [
    {"name": "fe", "allow": {"from": [FRONTEND]}}]}}}
NO_SEARCH = {"version": 1, "trust_domain": H.TD, "services": {ORDERS: {"rules": [
    {"name": "no-search", "deny": {"methods": ["SEARCH"]}},
    {"name": "fe", "allow": {"from": [FRONTEND]}}]}}}


class Live:
    """One real sidecar (open policy, audited) and the record of one request at the data
    path's bounds: 8 routes (``rest_route`` four times: each is two routes, both recorded)
    and 16 override methods."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list[Any] = []
        self.tmp = tmp
        self.audit = tmp / "audit"
        try:
            app, app_port = H.start_app(tmp)
            self.procs.append(app)
            pki = H.Pki(tmp / "pki")
            self.open = H.write_policy(tmp / "open.yaml", OPEN)
            self.no_search = H.write_policy(tmp / "no-search.yaml", NO_SEARCH)
            srv = H.start_sidecar(tmp, "orders", H.sidecar_config(
                pki.identity("orders"), policy=self.open,
                inbound={"listen": f"127.0.0.1:{H.free_port()}", "app": f"127.0.0.1:{app_port}"},
                audit={"path": str(self.audit), "fsync": False}))
            self.procs.append(srv)
            ctx = H.mtls_context(pki.identity("frontend"), pki.bundle)
            query = "&".join([*(f"rest_route=/r{i}" for i in range(4)),
                              *(f"_method={m}" for m in METHODS[:8])])
            body = "&".join(f"_method={m}" for m in METHODS[8:]).encode()
            self.status = H.http(srv.port("inbound"), "POST", f"/orders/1?{query}", body=body,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"},
                                 ctx=ctx).status
        except BaseException:
            self.close()
            raise
        srv.stop()
        self.procs.remove(srv)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


live = H.module_fixture("replay-bounds", Live)


def _rec(path: str = "/orders/1", method: str = "POST", host: str = "127.0.0.1:1",
         decision: str = "allow", rule: str = "fe", **extra: Any) -> AuditRecord:
    return AuditRecord(time=1.8e9, peer=FRONTEND, source="127.0.0.1", method=method,
                       host=host, path=path, decision=decision, rule=rule,
                       reason="allowed" if decision == "allow" else "denied_by_rule",
                       status=200 if decision == "allow" else 403,
                       extra={"service": ORDERS, "port": 1, **extra})


def _write(tmp: Path, records: list[AuditRecord]) -> str:
    H.write_audit_trail(AuditConfig(path=str(tmp), fsync=False), records, identity=ORDERS)
    return str(tmp)


LONG = "/" + "a" * (MAX_RECORDED_PATH_CHARS - 1)  # (a path of exactly the bound)
# Each member past the data path's bound by one (and the review's 3,000 routes), the field
# named on stderr (the request's method has no bound of its own: it counts in the work); beside it, the same field at the bound, replayed.
PAST: dict[str, tuple[str, dict[str, Any]]] = {
    "routes-count": ("x.routes", {"extra": {"routes": [[f"/r{i}", "all"]
                                                        for i in range(MAX_RECORDED_ROUTES + 1)]}}),
    "routes-review": ("x.routes", {"extra": {"routes": [[f"/orders/{i}", "all"]
                                                         for i in range(3000)],
                                             "overrides": METHODS}}),
    "route-length": ("x.routes", {"extra": {"routes": [[LONG + "b", "all"]]}}),
    "destination-length": ("x.destination", {"extra": {"destination": LONG + "b"}}),
    "overrides-count": ("x.overrides", {"extra": {"overrides": [
        *METHODS, "BIND"][:MAX_RECORDED_OVERRIDES + 1]}}),
    "unread-count": ("x.unread", {"extra": {"unread": [*UNREAD, "body"]}}),
    "service-length": ("x.service", {"extra": {"service": ORDERS + "x" * (
        MAX_RECORDED_SERVICE_CHARS - len(ORDERS) + 1)}}),
    "path-length": ("'path'", {"path": LONG + "b"}),
    "host-length": ("'host'", {"host": "h" * (MAX_RECORDED_HOST_CHARS + 1)}),
}
AT_BOUND: list[dict[str, Any]] = [
    {"extra": {"routes": [[f"/r{i}", "all"] for i in range(MAX_RECORDED_ROUTES)]}},
    {"extra": {"routes": [[LONG, "all"]], "destination": LONG}},
    {"extra": {"overrides": METHODS[:MAX_RECORDED_OVERRIDES], "unread": list(UNREAD)}},
    {"path": LONG, "method": "M" * 64, "host": "h" * MAX_RECORDED_HOST_CHARS},
]


def _record(kw: dict[str, Any]) -> AuditRecord:
    kw = dict(kw)
    extra = kw.pop("extra", {})
    return _rec(**kw, **extra)


def test_fields_past_the_data_paths_bounds_are_malformed_records(live: Live,
                                                                  tmp_path: Path) -> None:
    """Every member past its bound is skipped and named (exit 2, never judged, never a
    traceback); the records at the bounds beside them are replayed."""
    path = _write(tmp_path / "past", [_record(kw) for _, kw in PAST.values()]
                  + [_record(kw) for kw in AT_BOUND])
    r = H.sidecar_cli("policy", "replay", live.open, "--audit", path, "-o", "json",
                      timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    skipped = [line for line in r.stderr.splitlines() if "malformed record" in line]
    assert len(skipped) == len(PAST), r.stderr[-3000:]
    for line, (name, (field, _)) in zip(skipped, PAST.items(), strict=True):
        assert field in line, (name, line[:300])
    doc = json.loads(r.stdout)
    assert doc["replayed"] == len(AT_BOUND), doc


def test_a_record_at_the_data_paths_bounds_replays_as_the_data_path_judges(
        live: Live) -> None:
    """A real sidecar's record of a request with 8 routes and 16 override methods is read
    whole (not malformed), and judged: under a policy denying SEARCH (a method its body
    named) it changes allow -> deny; under its own policy nothing changes."""
    assert live.status == 200
    [rec] = [r for r in H.audit_export(live.audit) if r.get("path") == "/orders/1"]
    extra = rec["extra"] if "extra" in rec else rec["x"]
    assert len(extra["routes"]) == MAX_RECORDED_ROUTES, extra
    assert sorted(extra["overrides"]) == sorted(METHODS), extra
    same = H.sidecar_cli("policy", "replay", live.open, "--audit", str(live.audit), "-o", "json")
    assert same.returncode == 0, same.stdout + same.stderr
    assert json.loads(same.stdout)["replayed"] >= 1
    r = H.sidecar_cli("policy", "replay", live.no_search, "--audit", str(live.audit),
                      "-o", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    changed = [c for c in json.loads(r.stdout)["changed"] if c["path"] == "/orders/1"]
    assert [(c["before"], c["after"], c["after_rule"]) for c in changed] \
        == [("allow", "deny", "no-search")], changed


def test_trials_past_the_work_cap_are_left_out_and_uncertain(live: Live,
                                                             tmp_path: Path) -> None:
    """A record within every bound, without its port, under a section whose rules name 31
    ports and test 6 claims the trail does not hold (64 claim trials on 32 ports, each of 291
    decisions): the claim trials are left out and the record is uncertain, naming why."""
    (tmp_path / "corp.json").write_text(
        (Path(__file__).parent.parent / "policies" / "jwks" / "corp.json").read_text())
    rules: list[dict[str, Any]] = [
        {"name": f"claim{i}", "allow": {
            "paths": ["/**"], "ports": [8000 + i, 8100 + i, 8200 + i, 8300 + i, 8400 + i],
            "jwt": {"provider": "corp", "claims": {"role": f"r{i}"}}}} for i in range(6)]
    rules.append({"name": "p", "allow": {"ports": [9000]}})
    rules.append({"name": "fe", "allow": {"from": [FRONTEND]}})
    pol = H.write_policy(tmp_path / "trials.yaml", {
        "version": 1, "trust_domain": H.TD,
        "jwt_providers": {"corp": {"issuer": "https://login.example.com/",
                                   "audiences": ["shop-api"], "algorithms": ["ES256"],
                                   "jwks_file": "corp.json"}},
        "services": {ORDERS: {"rules": rules}}})
    rec = AuditRecord(time=1.8e9, peer=FRONTEND, source="127.0.0.1", method="POST",
                      host="127.0.0.1:1", path="/", decision="allow", rule="fe",
                      reason="allowed", status=200, token_issuer="https://login.example.com/",
                      extra={"service": ORDERS, "overrides": METHODS, "destination": "/d+",
                             "routes": [[f"/r{i}+", "all"] for i in range(8)]})
    path = _write(tmp_path / "trail", [rec])
    r = H.sidecar_cli("policy", "replay", pol, "--audit", path, "-o", "json", timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    [change] = json.loads(r.stdout)["changed"]
    assert change["uncertain"] is True
    assert "claims not recorded: too many trials (6 rules" in change["uncertain_reason"], change
