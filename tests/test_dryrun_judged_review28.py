"""A deny that dry-run lets through is recorded as one when the request reaches it through a
method override or a WebDAV ``Destination``, and ``policy replay`` decides it the same way.

Found by the twenty-eighth session's review of its fixes: with the orders section in
``mode: dry-run`` (and, separately, with the deny rules ``mode: dry-run`` in an enforcing
section), ``POST /orders/1?_method=DELETE``, a form's ``_method=DELETE`` and ``COPY
/public/x`` with ``Destination: /admin/config`` were recorded ``decision=allow rule=fe`` --
no ``dry_run``, no ``would: deny`` -- while a plain ``DELETE /orders/1`` was recorded
``dry-run`` (docs/policy.md "Modes"); switching the section to enforce then refused
requests the dry-run trail never flagged, and ``policy replay`` (``judged()``, which took an
override's or the Destination's decision only when it refused) repeated it.

Real sidecars, real trails, the real CLI: the family of what the data path judges besides
the method and the path (the query's override parameter in two spellings, a urlencoded, a
multipart and a JSON body's field, a Destination as a path and as a URI) x the ways a deny
is let through by dry-run (a dry-run section, observed deny rules in an enforcing section),
each record checked; enforcing controls (the same rules enforced: 403, ``deny``, unchanged),
a request whose own decision is already a dry-run deny (it keeps it), observed denies
followed by an enforced one (still refused) and plain requests. Every trail is replayed
under its own policy (no change: replay agrees with the record) and across the policies
(the new outcome is the one the sidecar recorded live under that policy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import harness as H
from tests.test_replay_review28 import FORM, JSON_TYPE, MULTIPART, MULTIPART_BODY

ORDERS = H.spiffe("orders")
FRONTEND = H.spiffe("frontend")

FE = {"name": "fe", "allow": {"from": [FRONTEND]}}


def _rules(mode: str | None) -> list[dict[str, Any]]:
    """The deny rules (``mode``: each one's own, None: the section's), an enforced one
    (``locked``: refuses whatever the section's mode) and the allow."""
    own = {"mode": mode} if mode is not None else {}
    return [
        {"name": "no-delete", **own, "deny": {"methods": ["DELETE"], "paths": ["/orders/**"]}},
        {"name": "no-admin", **own, "deny": {"paths": ["/admin/**"]}},
        {"name": "no-post", **own, "deny": {"methods": ["POST"], "paths": ["/orders/7"]}},
        {"name": "locked", "mode": "enforce",
         "deny": {"methods": ["PUT"], "paths": ["/orders/**", "/public/**"]}},
        FE,
    ]


def _policy(section: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "trust_domain": H.TD, "services": {ORDERS: section}}


POLICIES = {
    "dry-section": _policy({"mode": "dry-run", "rules": _rules(None)}),
    "observed-rules": _policy({"rules": _rules("dry-run")}),
    "enforce": _policy({"rules": _rules(None)}),  # the controls: every deny refuses
    "open": _policy({"rules": [FE]}),  # nothing refused: every field recorded
}
DRY = ("dry-section", "observed-rules")



@dataclass(frozen=True)
class Member:
    """One request. ``live``: per policy, the outcome its record says (``allow``, ``deny``,
    ``dry-run``) and the rule; a policy not named: ``(dry-run, rule)`` under the two dry
    policies, ``(deny, rule)`` under enforce, ``(allow, fe)`` under open."""

    name: str
    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = b""
    rule: str = "fe"  # the rule that denies it (dry-run, enforced: refused)
    live: dict[str, tuple[str, str]] = field(default_factory=dict)

    def outcome(self, policy: str) -> tuple[str, str]:
        if policy in self.live:
            return self.live[policy]
        if self.rule == "fe" or policy == "open":
            return ("allow", "fe")
        return ("dry-run" if policy in DRY else "deny", self.rule)


MEMBERS = [
    # -- reached through what the data path judges besides method and path ----------------
    Member("query-override", "POST", "/orders/1?_method=DELETE", rule="no-delete"),
    Member("query-override-header-name", "POST", "/orders/2?a=1&X-HTTP-Method-Override=delete",
           rule="no-delete"),
    Member("form-body-override", "POST", "/orders/3", FORM, b"a=1&_method=DELETE",
           rule="no-delete"),
    Member("multipart-body-override", "POST", "/orders/4", MULTIPART, MULTIPART_BODY,
           rule="no-delete"),
    Member("json-body-override", "POST", "/orders/5", JSON_TYPE,
           b'{"a": 1, "_method": "DELETE"}', rule="no-delete"),
    Member("destination-path", "COPY", "/public/x", [("Destination", "/%61dmin/config")],
           None, rule="no-admin"),
    Member("destination-uri", "MOVE", "/public/y",
           [("Destination", "http://127.0.0.1/admin/z?q=1")], None, rule="no-admin"),
    # -- its own decision a dry-run deny already: it keeps it (not the override's rule) ---
    Member("own-dry-run-kept", "POST", "/orders/7?_method=DELETE", rule="no-post"),
    # -- an observed deny, then an enforced one: still refused, by the enforced rule ------
    Member("observed-then-enforced-body", "POST", "/orders/6?_method=DELETE", FORM,
           b"_method=PUT",
           live={**{p: ("deny", "locked") for p in DRY}, "enforce": ("deny", "no-delete")}),
    Member("observed-destination-then-enforced-query", "COPY", "/public/z?_method=PUT",
           [("Destination", "/admin/config")], None,
           live={**{p: ("deny", "locked") for p in DRY}, "enforce": ("deny", "no-admin")}),
    # -- controls ---------------------------------------------------------------------------
    Member("plain-delete", "DELETE", "/orders/1", body=None, rule="no-delete"),
    Member("plain-get", "GET", "/orders/9", body=None),
    Member("allowed-override", "POST", "/orders/9?_method=PATCH"),
    Member("allowed-destination", "COPY", "/public/a", [("Destination", "/public/b")], None),
]
IDS = [m.name for m in MEMBERS]
JUDGED = {"query-override", "query-override-header-name", "form-body-override",
          "multipart-body-override", "json-body-override", "destination-path",
          "destination-uri"}


class Trails:
    """The family sent to one inbound sidecar per policy (one request at a time, in order),
    each audited; the sidecars stopped (every record written) before anything is read."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list[Any] = []
        self.files: dict[str, str] = {}
        self.audit: dict[str, Path] = {}
        self.status: dict[str, dict[str, int]] = {}
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        try:
            app, app_port = H.start_app(tmp)
            self.procs.append(app)
            pki = H.Pki(tmp / "pki")
            ctx = H.mtls_context(pki.identity("frontend", dirname="client"), pki.bundle)
            sidecars = {}
            for name, doc in POLICIES.items():
                self.files[name] = H.write_policy(tmp / f"{name}.yaml", doc)
                self.audit[name] = tmp / f"audit-{name}"
                cfg = H.sidecar_config(
                    pki.identity("orders", dirname=f"orders-{name}"),
                    inbound={"listen": f"127.0.0.1:{H.free_port()}",
                             "app": f"127.0.0.1:{app_port}"},
                    policy=self.files[name], audit={"path": str(self.audit[name])})
                sidecars[name] = H.start_sidecar(tmp, f"orders-{name}", cfg)
                self.procs.append(sidecars[name])
            for name, sc in sidecars.items():
                self.status[name] = {}
                for m in MEMBERS:
                    resp = H.http(sc.port("inbound"), m.method, m.target, body=m.body,
                                  headers=[*m.headers, ("X-Member", m.name)], ctx=ctx)
                    self.status[name][m.name] = resp.status
                sc.stop()
                recs = [r for r in H.audit_export(self.audit[name]) if r["event"] == "request"]
                assert len(recs) == len(MEMBERS), recs
                self.records[name] = dict(zip(IDS, recs, strict=True))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)


trails = H.module_fixture("dryjudged28", Trails)


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_the_record_says_what_the_sidecar_decided(trails: Trails, policy: str,
                                                  name: str) -> None:
    """Dry-run and observed denies reached through an override or a Destination are
    recorded ``dry-run`` with the rule and reason that would have refused (as a plain
    ``DELETE`` is) and the request is served; the enforcing controls refuse them (403,
    ``deny``) as before; what refuses still refuses."""
    m = next(m for m in MEMBERS if m.name == name)
    rec = trails.records[policy][name]
    status = trails.status[policy][name]
    outcome, rule = m.outcome(policy)
    assert (rec["decision"], rec["rule"]) == (outcome, rule), (policy, name, rec)
    if outcome == "deny":
        assert status == 403 and rec["status"] == 403, (status, rec)
        assert rec["reason"] == "denied_by_rule", rec
    else:  # served: the app's answer (COPY and MOVE: 501 from the test app)
        assert status not in (401, 403) and rec["status"] == status, (status, rec)
        assert rec["reason"] == ("denied_by_rule" if outcome == "dry-run" else "allowed"), rec
    if name in JUDGED:  # (what was judged is in the record: replay reads it)
        assert set(rec["extra"]) & {"overrides", "destination"}, rec["extra"]


def test_the_family_is_the_hole(trails: Trails) -> None:
    """(The premise: each judged member is let through by its own decision -- ``fe`` for
    the request as sent -- and only what it names is denied.)"""
    for name in JUDGED:
        assert trails.records["open"][name]["decision"] == "allow"
        assert trails.status["enforce"][name] == 403, name


# (trail, policy) replays: each trail under its own policy, and across.
CASES = [(p, p) for p in POLICIES] + [
    ("open", "dry-section"), ("open", "observed-rules"), ("dry-section", "enforce"),
    ("observed-rules", "enforce"), ("dry-section", "open"), ("observed-rules", "open"),
    ("dry-section", "observed-rules"), ("observed-rules", "dry-section"),
]


@pytest.fixture(scope="module")
def replays(trails: Trails) -> dict[tuple[str, str], tuple[int, dict[str, dict[str, Any]]]]:
    """Every case replayed once, all in one interpreter: (exit status, changes by member)."""
    runs = H.sidecar_cli_many(
        [["policy", "replay", trails.files[pol], "--audit", str(trails.audit[trail]),
          "-o", "json"] for trail, pol in CASES])
    out = {}
    for (trail, pol), r in zip(CASES, runs, strict=True):
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        assert doc["replayed"] == len(MEMBERS), doc
        names = {rec["request_id"]: n for n, rec in trails.records[trail].items()}
        out[(trail, pol)] = (r.returncode, {names[c["request_id"]]: c for c in doc["changed"]})
    return out


@pytest.mark.parametrize("policy", list(POLICIES))
def test_replay_under_the_same_policy_agrees_with_the_records(replays: Any,
                                                              policy: str) -> None:
    code, changed = replays[(policy, policy)]
    assert (code, changed) == (0, {}), changed


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != c[1]], ids="-under-".join)
def test_replay_decides_as_the_sidecar_recorded_live(replays: Any, case: tuple[str, str],
                                                     name: str) -> None:
    """The new outcome of each record is the one the sidecar recorded for the same
    request under that policy (``dry-run`` with its rule for a dry-run deny reached through
    an override or a Destination); certain: nothing was left unread."""
    m = next(m for m in MEMBERS if m.name == name)
    trail, pol = case
    before, after = m.outcome(trail), m.outcome(pol)
    _code, changed = replays[case]
    if before[0] == after[0]:
        assert name not in changed, changed.get(name)
        return
    c = changed[name]
    assert (c["before"], c["after"], c["after_rule"], c["uncertain"]) \
        == (before[0], after[0], after[1], False), c
