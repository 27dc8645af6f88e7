"""``policy replay`` decides as the data path did: what the sidecar judged besides the method
and the path is recorded and judged again (found by the twenty-eighth session's hostile
review: ``POST /orders/1?_method=DELETE``, refused live by a rule denying DELETE, was replayed
as a plain POST -- "changed deny -> allow" under the very policy that refused it -- and a
trail recorded under an open policy replayed against the DELETE deny said "no change"; the
same for ``COPY /public/x`` with ``Destination: /admin/config`` under ``deny /admin/**``).

Real sidecars, real trails: the family of judged facts (the query's override parameter in
two spellings, a urlencoded form's, a multipart form's and a JSON body's override field, a
Destination as a path and as a URI) and of requests refused before those checks ran (their
Destination and query recorded from the head; a body never read: ``unread``, uncertain), sent
through a mesh pair under a policy that refuses them (the inbound records judged, the
outbound ones unchanged) and to an inbound sidecar under an open one; each trail replayed
under the same policy (no change), under the other (changed, certain unless something was
never read) and under one between. Plain requests' records do not grow. A record written
before the change (without the fields) is judged as before; forged fields are malformed.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import harness as H

ORDERS = H.spiffe("orders")
FRONTEND = H.spiffe("frontend")
JUDGED_KEYS = ("overrides", "destination", "unread")

FE = {"name": "fe", "allow": {"from": [FRONTEND]}}
NO_DELETE = {"name": "no-delete",
             "deny": {"methods": ["DELETE"], "paths": ["/orders/**", "/locked/**"]}}
NO_ADMIN = {"name": "no-admin", "deny": {"paths": ["/admin/**"]}}
LOCKED = {"name": "locked", "deny": {"methods": ["POST", "COPY"], "paths": ["/locked/**"]}}


def policy(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "trust_domain": H.TD,
            "services": {ORDERS: {"rules": [*rules, FE]}, FRONTEND: {"egress": [ORDERS]}}}


POLICIES = {
    "deny": policy(NO_DELETE, NO_ADMIN, LOCKED),  # refuses every member but the controls
    "open": policy(),  # refuses nothing
    "unlocked": policy(NO_DELETE, NO_ADMIN),  # the head of /locked/ passes, the rest is judged
}

FORM = [("Content-Type", "application/x-www-form-urlencoded")]
JSON_TYPE = [("Content-Type", "application/json")]
MULTIPART = [("Content-Type", "multipart/form-data; boundary=XyZ")]
MULTIPART_BODY = (b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n"
                  b"--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n"
                  b"--XyZ--\r\n")


@dataclass(frozen=True)
class Member:
    """One request of the family. ``x``: the judged fields its inbound record has under the
    ``deny`` policy (``x_open``: under ``open``, when they differ). ``replayed``: per
    (trail, policy) replay, the change expected -- None (no change), or (after, rule,
    uncertain)."""

    name: str
    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    x: dict[str, Any] = field(default_factory=dict)
    x_open: dict[str, Any] | None = None
    deny_rule: str | None = None  # the rule that refuses it live under ``deny``
    replayed: dict[tuple[str, str], tuple[str, str, bool] | None] = field(default_factory=dict)


def judged(rule: str) -> dict[tuple[str, str], tuple[str, str, bool] | None]:
    """A judged member: refused by ``rule`` under deny (and unlocked), allowed under open."""
    return {("deny", "open"): ("allow", "fe", False), ("open", "deny"): ("deny", rule, False),
            ("deny", "unlocked"): None, ("open", "unlocked"): ("deny", rule, False)}


def early(unlocked: tuple[str, str, bool] | None, open_unlocked: str | None, *,
          open_uncertain: bool = False) -> dict[tuple[str, str], tuple[str, str, bool] | None]:
    """A member refused by its own decision under deny (rule ``locked``); ``open_unlocked``:
    the rule that refuses what it named, recorded under open, when the head of /locked/
    passes (None: nothing was recorded, nothing refuses it)."""
    return {("deny", "open"): ("allow", "fe", open_uncertain),
            ("open", "deny"): ("deny", "locked", False), ("deny", "unlocked"): unlocked,
            ("open", "unlocked"): None if open_unlocked is None
            else ("deny", open_unlocked, False)}


MEMBERS = [
    # -- judged facts: refused by what they name under deny -------------------------------
    Member("query-override", "POST", "/orders/1?_method=DELETE", body=b"",
           x={"overrides": ["DELETE"]}, deny_rule="no-delete", replayed=judged("no-delete")),
    Member("query-override-header-name", "POST", "/orders/2?a=1&X-HTTP-Method-Override=delete",
           body=b"", x={"overrides": ["DELETE"]}, deny_rule="no-delete",
           replayed=judged("no-delete")),
    Member("form-body-override", "POST", "/orders/3", FORM, b"a=1&_method=DELETE",
           x={"overrides": ["DELETE"]}, deny_rule="no-delete", replayed=judged("no-delete")),
    Member("multipart-body-override", "POST", "/orders/4", MULTIPART, MULTIPART_BODY,
           x={"overrides": ["DELETE"]}, deny_rule="no-delete", replayed=judged("no-delete")),
    Member("json-body-override", "POST", "/orders/5", JSON_TYPE, b'{"a": 1, "_method": "DELETE"}',
           x={"overrides": ["DELETE"]}, deny_rule="no-delete", replayed=judged("no-delete")),
    Member("query-and-body-override", "POST", "/orders/6?_method=PUT", FORM, b"_method=DELETE",
           x={"overrides": ["PUT", "DELETE"]}, deny_rule="no-delete",
           replayed=judged("no-delete")),
    Member("destination-path", "COPY", "/public/x", [("Destination", "/%61dmin/config")],
           x={"destination": "/admin/config"}, deny_rule="no-admin", replayed=judged("no-admin")),
    Member("destination-uri", "MOVE", "/public/y",
           [("Destination", "http://127.0.0.1/admin/z?q=1")],
           x={"destination": "/admin/z"}, deny_rule="no-admin", replayed=judged("no-admin")),
    # -- refused by their own decision before those checks ran ----------------------------
    # (the query's methods and the Destination are read from the head and recorded: judged
    # by replay when a policy lets the request itself in)
    Member("refused-first-query", "POST", "/locked/1?_method=DELETE", body=b"",
           x={"overrides": ["DELETE"]}, deny_rule="locked", replayed=early(None, "no-delete")),
    Member("refused-first-destination", "COPY", "/locked/3", [("Destination", "/admin/c")],
           x={"destination": "/admin/c"}, deny_rule="locked",
           replayed=early(None, "no-admin")),
    # (a body never read, a query override that is no method: not known -- uncertain)
    Member("refused-first-form-body", "POST", "/locked/2", FORM, b"_method=DELETE",
           x={"unread": ["body"]}, x_open={"overrides": ["DELETE"]}, deny_rule="locked",
           replayed=early(("allow", "fe", True), "no-delete", open_uncertain=True)),
    Member("refused-first-json-body", "POST", "/locked/5", JSON_TYPE, b'{"_method": "DELETE"}',
           x={"unread": ["body"]}, x_open={"overrides": ["DELETE"]}, deny_rule="locked",
           replayed=early(("allow", "fe", True), "no-delete", open_uncertain=True)),
    Member("refused-first-bad-query", "POST", "/locked/4?_method=no+such", body=b"",
           x={"unread": ["query"]}, x_open={}, deny_rule="locked",
           replayed=early(("allow", "fe", True), None, open_uncertain=True)),
    # -- controls: nothing judged besides method and path; their records do not grow ------
    Member("plain-get", "GET", "/orders/9"),
    Member("plain-query", "GET", "/orders/9?method=x&b=2"),
    Member("plain-form", "POST", "/orders/9", FORM, b"a=1&payment_method=card"),
    Member("plain-json", "POST", "/orders/9", JSON_TYPE, b'{"payment_method": "card"}'),
]
IDS = [m.name for m in MEMBERS]


class Trails:
    """The family sent through a mesh pair under ``deny`` (frontend's outbound listener ->
    orders' inbound) and straight to an inbound sidecar under ``open``; both trails audited,
    the request id of each member kept per trail."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Any] = []
        self.app, app_port = H.start_app(tmp)
        self.procs.append(self.app)
        self.files = {name: H.write_policy(tmp / f"{name}.yaml", doc)
                      for name, doc in POLICIES.items()}
        self.audit = {"deny": tmp / "audit-deny", "outbound": tmp / "audit-outbound",
                      "open": tmp / "audit-open"}
        self.ids: dict[str, dict[str, str]] = {"deny": {}, "open": {}}
        self.status: dict[str, dict[str, int]] = {"deny": {}, "open": {}}
        self._exported: dict[str, list[dict[str, Any]]] = {}
        try:
            pki = H.Pki(tmp / "pki")
            _inbound, outbound = H.start_mesh_pair(
                tmp, pki, app_port, Path(self.files["deny"]), self.procs,
                audit={"orders": self.audit["deny"], "frontend": self.audit["outbound"]})
            self.outbound = outbound
            cfg = H.sidecar_config(
                pki.identity("orders", dirname="orders-open"),
                inbound={"listen": f"127.0.0.1:{H.free_port()}", "app": f"127.0.0.1:{app_port}"},
                policy=self.files["open"], audit={"path": str(self.audit["open"])})
            self.open = H.start_sidecar(tmp, "orders-open", cfg)
            self.procs.append(self.open)
            ctx = H.mtls_context(pki.identity("frontend", dirname="client"), pki.bundle)
            for m in MEMBERS:
                for trail, port, tls in (("deny", outbound.port("orders"), None),
                                         ("open", self.open.port("inbound"), ctx)):
                    resp = H.http(port, m.method, m.target, body=m.body,
                                  headers=[*m.headers, ("X-Member", m.name)], ctx=tls)
                    self.status[trail][m.name] = resp.status
            for proc in (self.open, _inbound, outbound):  # (stopped: every record written)
                proc.stop()
            for trail in ("deny", "open"):
                # (one request record each, in the order sent: one request at a time)
                recs = [r for r in self.export(trail) if r["event"] == "request"]
                assert len(recs) == len(MEMBERS), recs
                self.ids[trail] = {m.name: r["request_id"]
                                   for m, r in zip(MEMBERS, recs, strict=True)}
        except BaseException:
            self.close()
            raise

    def export(self, trail: str) -> list[dict[str, Any]]:
        """The trail's records (read once: the sidecars have stopped)."""
        if trail not in self._exported:
            self._exported[trail] = H.audit_export(self.audit[trail])
        return self._exported[trail]

    def records(self, trail: str) -> dict[str, dict[str, Any]]:
        by_id = {r["request_id"]: r for r in self.export(trail) if r["event"] == "request"}
        return {name: by_id[rid] for name, rid in self.ids[trail].items()}

    def replay(self, trail: str, policy_name: str) -> subprocess.CompletedProcess[str]:
        return H.sidecar_cli("policy", "replay", self.files[policy_name], "--audit",
                             str(self.audit[trail]), "-o", "json")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)


trails = H.module_fixture("replay28", Trails)


@pytest.fixture(scope="module")
def replays(trails: Trails) -> dict[tuple[str, str], tuple[int, dict[str, dict[str, Any]]]]:
    """Every (trail, policy) replay once: (exit status, the changes by member name)."""
    out = {}
    for trail in ("deny", "open"):
        names = {rid: name for name, rid in trails.ids[trail].items()}
        for pol in POLICIES:
            r = trails.replay(trail, pol)
            assert r.returncode in (0, 1), r.stdout + r.stderr
            doc = json.loads(r.stdout)
            assert doc["replayed"] == len(MEMBERS), doc
            out[(trail, pol)] = (r.returncode, {names[c["request_id"]]: c
                                                for c in doc["changed"]})
    return out


def test_the_family_was_refused_and_let_through_live(trails: Trails) -> None:
    """(The premise: live, ``deny`` refuses each member by what it names, ``open`` none.)"""
    for m in MEMBERS:
        if m.deny_rule is not None:
            assert trails.status["deny"][m.name] == 403, m.name
        else:
            assert trails.status["deny"][m.name] == 200, m.name
        expected_open = 400 if m.name == "refused-first-bad-query" else None
        assert trails.status["open"][m.name] not in (401, 403), m.name
        if expected_open is not None:
            assert trails.status["open"][m.name] == expected_open


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("trail", ["deny", "open"])
def test_each_record_holds_what_was_judged_and_no_more(trails: Trails, trail: str,
                                                       name: str) -> None:
    m = next(m for m in MEMBERS if m.name == name)
    rec = trails.records(trail)[name]
    assert rec["direction"] == "inbound"
    if m.deny_rule is not None and trail == "deny":
        assert (rec["decision"], rec["rule"]) == ("deny", m.deny_rule), rec
    expected = m.x if trail == "deny" or m.x_open is None else m.x_open
    got = {k: v for k, v in rec["extra"].items() if k in JUDGED_KEYS}
    assert got == expected, (trail, name, rec["extra"])
    if m.deny_rule is None:  # an ordinary request's record does not grow
        assert set(rec["extra"]) == {"service", "port"}, rec["extra"]


@pytest.mark.parametrize("name", IDS)
def test_outbound_records_do_not_grow(trails: Trails, name: str) -> None:
    """The outbound listener judges egress only (no method, path, override or Destination):
    its records keep their fields, and replay, which re-decides inbound records, passes
    them over."""
    recs = [r for r in trails.export("outbound") if r["event"] == "request"]
    assert len(recs) == len(MEMBERS)
    rec = recs[IDS.index(name)]
    assert rec["direction"] == "outbound" and rec["extra"]["target"] == ORDERS, rec
    assert not set(rec["extra"]) & set(JUDGED_KEYS), rec
    r = H.sidecar_cli("policy", "replay", trails.files["deny"], "--audit",
                      str(trails.audit["outbound"]), "-o", "json") if name == IDS[0] else None
    if r is not None:
        assert r.returncode == 0 and json.loads(r.stdout)["replayed"] == 0, r.stdout + r.stderr


@pytest.mark.parametrize("trail", ["deny", "open"])
def test_the_same_policy_changes_nothing(replays: Any, trail: str) -> None:
    code, changed = replays[(trail, trail)]
    assert (code, changed) == (0, {}), changed


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("case", [("deny", "open"), ("open", "deny"), ("deny", "unlocked"),
                                  ("open", "unlocked")], ids="-under-".join)
def test_another_policy_changes_what_the_sidecar_would_now_decide(
        replays: Any, case: tuple[str, str], name: str) -> None:
    m = next(m for m in MEMBERS if m.name == name)
    _code, changed = replays[case]
    expected = m.replayed.get(case)
    if expected is None:
        assert name not in changed, changed.get(name)
        return
    after, rule, uncertain = expected
    c = changed[name]
    assert (c["after"], c["after_rule"], c["uncertain"]) == (after, rule, uncertain), c
    if uncertain:
        reason = c["uncertain_reason"]
        assert reason and ("body" in reason if "body" in m.x.get("unread", [])
                           else "query" in reason), c
    else:
        assert c["uncertain_reason"] is None, c


def test_the_table_says_why_a_change_is_uncertain(trails: Trails) -> None:
    r = H.sidecar_cli("policy", "replay", trails.files["unlocked"], "--audit",
                      str(trails.audit["deny"]))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if "/locked/2" in line]
    assert len(lines) == 1 and "uncertain: refused before its body's method-override" in lines[0]


def test_every_reader_takes_the_records(trails: Trails) -> None:
    """verify, export (JSON lines and CSV) and tail read a trail with the fields."""
    path = str(trails.audit["deny"])
    v = H.sidecar_cli("audit", "verify", path)
    assert v.returncode == 0, v.stdout + v.stderr
    csv = H.sidecar_cli("audit", "export", path, "--format", "csv")
    assert csv.returncode == 0 and '""overrides"":[""DELETE""]' in csv.stdout, csv.stderr
    assert '""destination"":""/admin/config""' in csv.stdout
    t = H.sidecar_cli("audit", "tail", path, "-n", "100")
    assert t.returncode == 0 and '"unread":["body"]' in t.stdout.replace(" ", ""), t.stderr


# -- records written before the change, and forged fields -----------------------------------


def _write(tmp: Path, records: list[Any]) -> str:
    from sidecar.audit.config import AuditConfig

    H.write_audit_trail(AuditConfig(path=str(tmp), fsync=False), records, identity=ORDERS)
    return str(tmp)


def _rec(method: str, path: str, decision: str, rule: str, **extra: Any) -> Any:
    from sidecar.audit.record import AuditRecord

    return AuditRecord(time=1.8e9, peer=FRONTEND, source="127.0.0.1", method=method,
                       host="127.0.0.1:1", path=path, decision=decision, rule=rule,
                       reason="allowed" if decision == "allow" else "denied_by_rule",
                       status=200 if decision == "allow" else 403,
                       extra={"service": ORDERS, "port": 1, **extra})


def test_a_record_from_before_the_change_is_judged_as_before(trails: Trails,
                                                             tmp_path: Path) -> None:
    """Without the fields, a record is its method and path, as replay judged it before: the
    override of ``POST ?_method=DELETE`` recorded under an open policy is not known (no
    change under the DELETE deny), and its refusal, recorded without it, is a plain POST."""
    path = _write(tmp_path / "old", [
        _rec("POST", "/orders/1", "allow", "fe"),
        _rec("POST", "/orders/1", "deny", "no-delete"),
        _rec("COPY", "/public/x", "deny", "no-admin"),
    ])
    r = H.sidecar_cli("policy", "replay", trails.files["deny"], "--audit", path, "-o", "json")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["replayed"] == 3, r.stdout + r.stderr
    assert [(c["method"], c["before"], c["after"], c["uncertain"]) for c in doc["changed"]] \
        == [("POST", "deny", "allow", False), ("COPY", "deny", "allow", False)]


FORGED: dict[str, dict[str, Any]] = {
    "overrides-not-a-list": {"overrides": "DELETE"},
    "overrides-not-methods": {"overrides": ["delete"]},
    "overrides-not-strings": {"overrides": [1]},
    "overrides-too-many": {"overrides": [f"M{chr(65 + i)}" for i in range(17)]},
    "destination-not-a-path": {"destination": "admin"},
    "destination-not-a-string": {"destination": ["/admin"]},
    "unread-unknown": {"unread": ["cookie"]},
    "unread-not-a-list": {"unread": "body"},
}


def test_forged_fields_are_malformed_records(trails: Trails, tmp_path: Path) -> None:
    """A field of the wrong type or value is skipped and named (exit 2), never judged or
    a traceback; the well-formed record beside them is replayed."""
    path = _write(tmp_path / "forged", [
        _rec("POST", "/orders/1", "allow", "fe", **extra) for extra in FORGED.values()
    ] + [_rec("POST", "/orders/1", "allow", "fe", overrides=["DELETE"])])
    r = H.sidecar_cli("policy", "replay", trails.files["deny"], "--audit", path, "-o", "json")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    skipped = [line for line in r.stderr.splitlines() if "malformed record" in line]
    assert len(skipped) == len(FORGED), r.stderr
    for line, extra in zip(skipped, FORGED.values(), strict=True):
        assert f"'x.{next(iter(extra))}'" in line, line
    doc = json.loads(r.stdout)
    assert doc["replayed"] == 1 and [c["after_rule"] for c in doc["changed"]] == ["no-delete"]
