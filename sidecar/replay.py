"""``sidecar policy replay NEW_POLICY --audit PATH``: re-decide recorded requests.

Theory of operation: every inbound request record in the audit trail carries the facts the
decision was made on (peer, source, method, normalised path, host, port) and the outcome.
Replay rebuilds ``RequestFacts`` from each record, decides it again under the new policy with
the same pure ``decide()`` the data path uses, and lists the records whose outcome changes.

Tokens are never stored, only their issuer and subject: a rule that tests other claims
cannot be re-checked exactly. Such changes are flagged ``uncertain`` instead of guessed. Nor
is a token that failed verification recorded, except as the outcome of a request refused for
it before the rules (rule ``invalid token``): such a request presents an invalid token again.

What the listener judged besides the method and the path is in the record's ``extra``
(``sidecar.inbound``, only when there is any): ``overrides``, the methods its query or POST
body named as method overrides, ``destination``, the normalised path of a WebDAV
``Destination``, and ``routes``, the paths its query routes it as on ``/`` or a front
controller (``paths.QUERY_ROUTES``), each with ``all`` or ``deny`` (the rules that judge
it); the path with spaces and ``+`` trimmed from its ends (``paths.space_trimmed``) is
computed here, as the data path computes it. They are judged as the data path judges them (and ``policy explain`` the
query's): the request's own decision, then, if it lets the request in, the Destination's
path with its method, then each override method on its path; the first refusal is the
decision. ``unread`` names what a request refused before those checks carried and the
sidecar never read (``body``: a POST body whose override fields were not read; ``query``,
``destination``: one that would be refused, 400): a change that lets such a request in is
``uncertain``. Found by a hostile review: ``POST /orders/1?_method=DELETE``, refused live,
was replayed as a plain POST. A record written before these fields is judged as before.

What a record does not hold is not guessed (found by the twenty-ninth session's hostile
review). A token's claims but ``iss`` and ``sub``: each rule of the new section that could
match the request by its other conditions and tests a claim the record does not settle is
tried both ways (``_claim_trials``); a stream record or an older one without its port: each
port the section's rules name, and one they do not. A record whose outcomes differ between
the tries is listed as ``uncertain``, with the rules and tests (or ports) it hangs on -- also
when the outcome computed with what the record holds is the recorded one: "no change" is
never said of a decision that hangs on what the trail does not record. (Under the very
policy that decided the record, ``policy_version``, the recorded outcome is one of those
tried, and it stands: that policy had the whole token and the port.) Records of a ``protocol: tcp``
listener (no method, path or host; ``_is_stream``) are re-decided as the listener decides a
stream (``decide`` with no method and no credentials: ``from``, ``namespaces``, ``ports`` and
``listeners`` only); before, every one was skipped, and a policy refusing the caller's
streams replayed as "0 would change".

A request that presented an API key the recording sidecar did not recognise (unknown,
expired, or defined only for another section: that sidecar never loaded it) was decided as
if it had none; its record says only ``extra.apikey_unknown: true`` (never the key). Where
a rule of the new section that tests API keys could match it by its other conditions, the
record is listed as ``uncertain`` (``UNCERTAIN_APIKEY``): the new policy may name that key
(found by the thirty-fifth session's hostile review: such a request was replayed as
"no change" where the new policy let it in).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sidecar.audit.crypto import load_decryptor
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import (
    RecordFilter,
    StoredRecord,
    iter_stored,
    path_problem,
    resolve_segments,
)
from sidecar.authn.extract import MAX_PATH_SEGMENTS_READ, PATH_TOKEN_FORM
from sidecar.errors import ConfigError
from sidecar.http.request import MAX_HOST_CHARS, MAX_METHOD_OVERRIDES
from sidecar.output import Progress, add_output_flag, emit, safe
from sidecar.policy.compiled import Section, claim_holds, compile_section, request_holds
from sidecar.policy.decision import (
    INVALID_TOKEN_RULE,
    NO_AUTH,
    REASON_CLAIMS_MISMATCH,
    REASON_TOKEN_INVALID,
    AuthFacts,
    Decision,
    RequestFacts,
)
from sidecar.policy.engine import decide
from sidecar.policy.loader import load_policy_set, policy_label
from sidecar.policy.model import Rule
from sidecar.policy.paths import MAX_QUERY_ROUTES, MAX_TARGET_BYTES, space_trimmed
from sidecar.policy.second import judge_rest, second_readings


@dataclass(frozen=True)
class ReplayChange:
    """One recorded request whose outcome changes under the new policy: the record, its
    recorded outcome (``before``), the new decision, and ``uncertain`` when the change hangs on
    token claims the audit trail does not record (so it may not really happen)."""

    record: AuditRecord
    before: str
    after: Decision
    uncertain: bool
    # Why it is uncertain (``UNCERTAIN_CLAIMS``, ``UNREAD``'s texts); None when it is not.
    why: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The change as a JSON-ready mapping, one entry of the report's ``changed`` list."""
        r = self.record
        return {
            "time": r.time, "request_id": r.request_id, "peer": r.peer, "method": r.method,
            "path": r.path, "before": self.before, "before_rule": r.rule,
            "after": outcome(self.after), "after_rule": self.after.rule,
            "after_reason": self.after.reason, "uncertain": self.uncertain,
            "uncertain_reason": self.why,
        }


UNCERTAIN_CLAIMS = "claims not recorded"
# A request that presented an API key the recording sidecar did not recognise
# (``extra.apikey_unknown``), replayed where a rule of the new section tests API keys.
UNCERTAIN_APIKEY = "an unrecognised API key was presented (not recorded)"
# ``extra.unread``'s values (``sidecar.inbound._unjudged``): what a request refused before
# its later checks carried and the sidecar never read, and why a change that lets such a
# request in is uncertain.
UNREAD: dict[str, str] = {
    "body": "refused before its body's method-override fields were read",
    "query": "its query's method-override parameter was not read (400 if it is no method)",
    "destination": "its Destination was not read (400 if it cannot be judged)",
    "routes": "its query's route was not read (400 if it cannot be judged)",
    "search_routes": "its query's search-like route (q, r, p, route on / or a front "
                     "controller) is not recorded: it may hold what the caller searched for",
}
# ``extra.overrides``: at most the query's and the body's distinct methods, each a method
# the data path serves (``sidecar.http.request._METHOD``).
MAX_RECORDED_OVERRIDES = 2 * MAX_METHOD_OVERRIDES
_METHOD = re.compile(r"[A-Z][A-Z-]{0,31}")
# What the data path can record, and so what replay reads (``replay_problem``; found by the
# thirty-third session's hostile review: one 50 KB record of 3,000 routes and 16 overrides
# cost minutes of CPU, each route judged for each override, claim trial and port). A path
# (the request's, a route's, a Destination's) is normalised from a target of at most
# ``MAX_TARGET_BYTES`` (each byte at most a three-character escape; a ``rest_route`` gains
# ``/wp-json``), and ``path_for_records`` writes at most ``MAX_PATH_SEGMENTS_READ`` segments
# and the rest as a token's digest form.
MAX_RECORDED_PATH_CHARS = (3 * MAX_TARGET_BYTES + len("/wp-json/")
                           + (MAX_PATH_SEGMENTS_READ + 1) * len(PATH_TOKEN_FORM.format("0" * 64)))
# The routes the data path judges (``paths.query_routes``: more is 400), of which it records
# those every rule judged.
MAX_RECORDED_ROUTES = MAX_QUERY_ROUTES
# A Host the data path judged (``request.split_host``: a name, one more for a final dot, and
# a port; an IPv6 literal is shorter).
MAX_RECORDED_HOST_CHARS = MAX_HOST_CHARS + 1 + len(":65535")
# A SPIFFE ID (``x.service``) is at most 2048 bytes (SPIFFE-ID spec, "Maximum length").
MAX_RECORDED_SERVICE_CHARS = 2048


def outcome(decision: Decision) -> str:
    """A decision as the audit trail records it: ``allow``, ``deny``, or ``dry-run`` for a deny
    that dry-run let through, so that recorded and replayed outcomes compare as equals."""
    if decision.dry_run and decision.would == "deny":
        return "dry-run"
    return decision.action


def replay_problem(rec: AuditRecord) -> str | None:
    """What makes a (well-formed) record unfit for replay: the ``extra`` fields replay reads
    (``service``, a SPIFFE ID's string; ``port``, an integer 0..65535; ``overrides``, a list
    of at most ``MAX_RECORDED_OVERRIDES`` methods; ``destination``, a path;
    ``routes``, a list of at most ``MAX_RECORDED_ROUTES`` [path, ``all`` or ``deny``];
    ``unread``, a list of ``UNREAD``'s names; ``apikey_unknown``, true) of the wrong type or value, or more than the
    data path records (a path longer than ``MAX_RECORDED_PATH_CHARS``, the request's own
    included; a Host longer than a judged one; the request's method is counted in the
    work instead, ``_work``). Before the thirty-third session
    only their shape was checked: one record of 3,000 routes cost minutes (hostile review)."""
    if rec.event == "request" and rec.direction == "inbound":
        # (what ``replay`` judges of the record itself: its path and host)
        if len(rec.path) > MAX_RECORDED_PATH_CHARS:
            return f"field 'path' is longer than {MAX_RECORDED_PATH_CHARS} characters"
        if len(rec.host) > MAX_RECORDED_HOST_CHARS:
            return f"field 'host' is longer than {MAX_RECORDED_HOST_CHARS} characters"
    extra = rec.extra
    if not extra:
        return None
    service, port = extra.get("service"), extra.get("port")
    if service is not None and not isinstance(service, str):
        return f"field 'x.service' is a {type(service).__name__}, not a string"
    if service is not None and len(service) > MAX_RECORDED_SERVICE_CHARS:
        return f"field 'x.service' is longer than {MAX_RECORDED_SERVICE_CHARS} characters"
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 <= port <= 65535):
        return f"field 'x.port' {port!r} is not a port number"
    overrides, destination, unread = (extra.get("overrides"), extra.get("destination"),
                                      extra.get("unread"))
    if isinstance(overrides, list) and len(overrides) > MAX_RECORDED_OVERRIDES:
        return f"field 'x.overrides' holds more than {MAX_RECORDED_OVERRIDES} methods"
    if overrides is not None and (
            not isinstance(overrides, list)
            or not all(isinstance(m, str) and _METHOD.fullmatch(m) for m in overrides)):
        return "field 'x.overrides' is not a list of methods"
    if destination is not None and (not isinstance(destination, str)
                                    or not destination.startswith("/")):
        return "field 'x.destination' is not a path"
    if isinstance(destination, str) and len(destination) > MAX_RECORDED_PATH_CHARS:
        return f"field 'x.destination' is longer than {MAX_RECORDED_PATH_CHARS} characters"
    routes = extra.get("routes")
    if isinstance(routes, list) and len(routes) > MAX_RECORDED_ROUTES:
        return f"field 'x.routes' holds more than {MAX_RECORDED_ROUTES} routes"
    if routes is not None and (not isinstance(routes, list) or not all(
            isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
            and r[0].startswith("/") and r[1] in ("all", "deny") for r in routes)):
        return "field 'x.routes' is not a list of [path, \"all\" or \"deny\"]"
    if routes is not None and any(len(r[0]) > MAX_RECORDED_PATH_CHARS for r in routes):
        return f"field 'x.routes' holds a path longer than {MAX_RECORDED_PATH_CHARS} characters"
    marker = extra.get("apikey_unknown")
    if marker is not None and marker is not True:
        return "field 'x.apikey_unknown' is not true"
    if unread is not None and (not isinstance(unread, list) or len(unread) > len(UNREAD)
                               or not all(isinstance(u, str) and u in UNREAD for u in unread)):
        return f"field 'x.unread' is not a list of {', '.join(UNREAD)}"
    return None


def judged(policy: object, service: str, facts: RequestFacts, auth: AuthFacts, now: float,
           extra: dict[str, object] | None) -> Decision:
    """The decision of a recorded request as the data path makes it (``sidecar.inbound``):
    its own; if that lets it in, its Destination's path (``extra.destination``) with its
    method, its second paths (``second_paths``), then each method its query or body named
    (``extra.overrides``) on its path and each second path (``second.judge_rest``, the data
    path's own order; before the thirty-first session replay judged overrides on the path
    alone) -- the first refusal is the decision. None refusing, the first of them whose deny dry-run
    lets through (``dry-run``) is the decision when the request's own is not already one,
    as the data path records it (``sidecar.inbound._observed``; found by a hostile review:
    replay said "allow" for ``POST ?_method=DELETE`` under a dry-run section denying DELETE,
    where a plain ``DELETE`` is ``dry-run``). A record without these fields: its own
    decision."""
    new = decide(policy, service, facts, auth, now)  # type: ignore[arg-type]
    if not new.allowed or (not extra and space_trimmed(facts.path) is None):
        return new
    extra = extra or {}
    destination = extra.get("destination")
    found = judge_rest(lambda f: decide(policy, service, f, auth, now),  # type: ignore[arg-type]
                       facts, destination=destination if isinstance(destination, str) else None,
                       readings=second_paths(facts.path, extra),
                       overrides=tuple(extra.get("overrides") or ()))  # type: ignore[arg-type]
    return new if found is None or (found.allowed and new.dry_run) else found


def second_paths(path: str, extra: Mapping[str, object]) -> list[tuple[str, bool]]:
    """The paths the data path judges a request as besides its own
    (``second.second_readings``, as ``sidecar.inbound`` reads them), each with whether every rule judges it (else deny
    rules only): its query's routes (``extra.routes``) and the path and each route with
    spaces and ``+`` trimmed from their ends (``paths.space_trimmed``, computed here)."""
    routes = [(r[0], r[1] == "all") for r in extra.get("routes") or ()  # type: ignore[attr-defined]
              if isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)]
    return second_readings(path, routes)


UNCERTAIN_PORT = "port not recorded"
# Per record at most 2**MAX_CLAIM_TRIALS variants of the section (rules whose claim tests the
# record does not settle) and MAX_PORT_TRIALS ports are tried; beyond, it is uncertain.
MAX_CLAIM_TRIALS = 6
MAX_PORT_TRIALS = 32
# A port no rule names (the loader takes 1..65535): the ports a rule does not name, as one.
_UNNAMED_PORT = 0
# Variant sections compiled (``_held``), kept across records: a trail repeats its routes.
MAX_TRIAL_SECTIONS = 256
# At most this much work per record, counted in characters judged (``_work``: each
# decision of each port tried and claim trial costs ``DECISION_WORK`` and the length of its
# path, method and host; a decision's cost grows with them): past it the port trials, then
# the claim trials are left out and the record is uncertain (``TOO_MANY_TRIALS``). A record of the
# data path's bounds judges at most 291 paths (a Destination, 8 routes, 9 trimmed paths, 16
# overrides on the path and each reading): with short paths (as requests are) and all 2**6
# claim trials, within the cap; one such request alone with paths of the longest kind too. A
# backstop (found by the thirty-third session's hostile review, as the bounds of
# ``replay_problem``): at most about a second per record.
MAX_WORK_PER_RECORD = 10_000_000
DECISION_WORK = 400
TOO_MANY_TRIALS = "too many trials"


def _work(facts: RequestFacts, extra: Mapping[str, object], stream: bool) -> int:
    """The work of ``judged`` for one recorded request at most (``MAX_WORK_PER_RECORD``'s
    units): ``DECISION_WORK`` and the length of the path, method and host judged for each
    decision ``second.judge_rest`` makes -- its own, its Destination's, each second path's,
    and each override method's on its path and on each second path; one for a stream."""
    base = DECISION_WORK + len(facts.method) + len(facts.host)
    own = base + len(facts.path)
    if stream:
        return own
    readings = sum(base + len(p) for p, _ in second_paths(facts.path, extra))
    overrides, destination = extra.get("overrides") or (), extra.get("destination")
    return (own + readings + len(overrides) * (own + readings)  # type: ignore[arg-type]
            + (base + len(destination) if isinstance(destination, str) else 0))


def _is_stream(rec: AuditRecord) -> bool:
    """A stream of a ``protocol: tcp`` listener (``sidecar.inbound``'s ``_tcp``): no method,
    path or host, and decided by the policy (a rule is named; a request refused before any
    rule -- malformed, timed out -- names none, and every HTTP request has a method)."""
    return not rec.method and not rec.path and not rec.host and bool(rec.rule)


def _known_claims(rec: AuditRecord) -> dict[str, Any]:
    """What the record holds of its token's claims: ``iss``, and ``sub`` when it was a
    string (``sidecar.audit.record._claims_fields``; a None is no reading of anything)."""
    known: dict[str, Any] = {"iss": rec.token_issuer}
    if rec.token_subject is not None:
        known["sub"] = rec.token_subject
    return known


def _settled(rule: Rule, known: Mapping[str, Any]) -> bool | None:
    """Whether ``rule``'s claim tests hold for a token of which only ``known`` is recorded:
    True, False, or None when a test the record does not settle decides. An allow rule's
    test of a plain name the record holds reads exactly that member; any other reads members
    the record does not hold. A deny rule's holds when any reading does (names in any case,
    ``claim_holds``): holding on ``known`` it holds on the whole token, failing it may not."""
    assert rule.when.jwt is not None
    deny = rule.effect == "deny"
    open_test = False
    for cond in rule.when.jwt.claims:
        held = claim_holds(cond, known, deny)
        if deny:
            open_test = open_test or not held
        elif "." in cond.claim or cond.claim not in known:
            open_test = True
        elif not held:
            return False  # (the tests are ANDed: one failing settles the rule)
    return None if open_test else True


def _shape(section: Section | None) -> tuple[list[int], tuple[Rule, ...]]:
    """What replay reads of a section once, not per record: the ports its rules name, and
    its rules with claim tests."""
    if section is None:
        return [], ()
    ports = sorted({p for r in section.rules if r.when.ports is not None for p in r.when.ports})
    return ports, tuple(r for r in section.rules
                        if r.when.jwt is not None and r.when.jwt.claims)


def _open_rules(section: Section, claim_rules: tuple[Rule, ...], facts: list[RequestFacts],
                auth: AuthFacts, now: float, known: Mapping[str, Any]) -> list[Rule]:
    """The rules of ``section`` whose claim tests the record does not settle (``_settled``)
    and that could match it by everything else: not expired, a token of their provider
    verified, their request conditions holding for one of ``facts`` (the request, its
    Destination's path, its override methods, at each port tried)."""
    out = []
    for rule in claim_rules:  # (``_shape``: the section's rules with claim tests)
        jwt = rule.when.jwt
        if jwt is None or jwt.provider not in auth.claims \
                or rule.expired(now) or _settled(rule, known) is not None:
            continue
        if any(request_holds(rule.when, f, section.trust_domain, True, section.fold_case,
                             rule.effect, section.fold_formats, section.deny_case)
               for f in facts):
            out.append(rule)
    return out


def _token_rules(section: Section, facts: list[RequestFacts], now: float) -> list[Rule]:
    """The rules of ``section`` naming a JWT provider that could match one of ``facts`` by
    their request conditions (for a token whose provider the record does not name)."""
    return [r for r in section.rules if r.when.jwt is not None and not r.expired(now)
            and any(request_holds(r.when, f, section.trust_domain, True, section.fold_case,
                                  r.effect, section.fold_formats, section.deny_case)
                    for f in facts)]


def _key_rules(section: Section, facts: list[RequestFacts], now: float) -> list[Rule]:
    """The rules of ``section`` testing an API key that could match one of ``facts`` by
    their request conditions (for a request that presented a key the recording sidecar did
    not recognise, ``extra.apikey_unknown``: which key it was is not recorded)."""
    return [r for r in section.rules if r.when.apikey is not None and not r.expired(now)
            and any(request_holds(r.when, f, section.trust_domain, True, section.fold_case,
                                  r.effect, section.fold_formats, section.deny_case)
                    for f in facts)]


def _held(section: Section, held: frozenset[str]) -> Section:
    """``section`` with the claim tests of the rules named in ``held`` passed: their jwt
    condition asks only for a token of their provider (the record has one)."""
    rules = tuple(
        replace(r, when=replace(r.when, jwt=replace(r.when.jwt, claims=())))
        if r.name in held and r.when.jwt is not None else r
        for r in section.rules)
    return compile_section(section.identity, section.trust_domain, section.mode, rules,
                           section.egress, section.fold_case, section.refuse_invalid_tokens,
                           section.fold_formats, section.deny_case)


class _Trial:
    """The new policy with one section tried another way (``_held``): what ``decide`` reads
    of a policy, its ``section`` and ``version``."""

    def __init__(self, policy: Any, identity: str, section: Section) -> None:
        self._policy, self._identity, self._section = policy, identity, section
        self.version: str = policy.version

    def section(self, identity: str) -> Section | None:
        return self._section if identity == self._identity else self._policy.section(identity)


def _describe(rule: Rule) -> str:
    assert rule.when.jwt is not None
    tests = " and ".join(c.describe() for c in rule.when.jwt.claims)
    return f"rule {rule.name!r} tests {rule.when.jwt.provider}: {tests}"


def replay(policy: object, records: Iterator[AuditRecord], identity: str | None
           ) -> tuple[int, list[ReplayChange]]:
    """Re-decide every inbound request record (and stream record of a ``protocol: tcp``
    listener, ``_is_stream``); return (records replayed, changes). Records with a
    ``replay_problem`` are skipped (``cmd_replay`` names them). What a record does not hold
    (claims but ``iss`` and ``sub``; an older record's port) is tried every way that can
    matter (module docstring): a decision that hangs on it is never "no change"."""
    changes: list[ReplayChange] = []
    count = 0
    providers = getattr(getattr(policy, "extras", None), "jwt_providers", {}) or {}
    trials: dict[tuple[str, frozenset[str]], Section] = {}
    shapes: dict[str, tuple[list[int], tuple[Rule, ...]]] = {}
    for rec in records:
        if rec.event != "request" or rec.direction != "inbound":
            continue
        # (a stream record has no method: all of them were skipped before -- a policy
        # refusing the caller's streams replayed as "0 would change"; hostile review)
        stream = not rec.method and _is_stream(rec)
        if not rec.method and not stream:
            continue
        if replay_problem(rec) is not None:
            continue
        service = identity or (rec.extra or {}).get("service")
        if not service:
            continue
        count += 1
        extra = rec.extra or {}
        recorded_port = extra.get("port")
        facts = RequestFacts(direction="inbound", peer=rec.peer, source=rec.source.rsplit(":", 1)[0]
                             if rec.source.count(":") == 1 else rec.source,
                             method=rec.method, path=rec.path, host=rec.host,
                             port=int(recorded_port or 0), listener="inbound")
        section = getattr(policy, "section", lambda _: None)(service)
        shape = shapes.get(service)
        if shape is None:
            shape = shapes[service] = _shape(section)
        # The ports to try: the recorded one; without one (a record from before ``x.port``),
        # each port the section's rules name and one they do not.
        named, claim_rules = shape
        ports = ([facts.port] if recorded_port is not None or not named
                 else [*named, _UNNAMED_PORT][:MAX_PORT_TRIALS])
        too_many: list[str] = []
        if recorded_port is None and len(named) + 1 > MAX_PORT_TRIALS:
            too_many.append(f"{UNCERTAIN_PORT}: rules name {len(named)} ports")
        tried = [facts._replace(port=p) for p in ports]
        # A backstop on the work per record (``MAX_WORK_PER_RECORD``): past it, the port
        # trials and then the claim trials are left out, and the record is uncertain.
        each = _work(facts, extra, stream)
        if len(tried) > 1 and len(tried) * each > MAX_WORK_PER_RECORD:
            too_many.append(f"{UNCERTAIN_PORT}: {TOO_MANY_TRIALS} (rules name "
                            f"{len(named)} ports)")
            tried = tried[:1]
        refused_token = False
        auth = NO_AUTH  # a stream: no credentials (``Gate.inbound(tcp=True)``)
        open_rules: list[Rule] = []
        if not stream:
            known = _known_claims(rec)
            claims = {}
            if rec.token_issuer:
                for name, prov in providers.items():
                    if prov.issuer == rec.token_issuer:
                        claims[name] = known
            # A request refused (or, in dry-run, recorded) for a token no provider accepted
            # (``invalid_tokens: refuse``) presented one: it is presented again. Which provider
            # refused it is not recorded (an entry under the rule's name, which names none).
            refused_token = rec.rule == INVALID_TOKEN_RULE and rec.reason == REASON_TOKEN_INVALID
            auth = AuthFacts(claims=claims, apikey=rec.apikey,
                             token_errors={INVALID_TOKEN_RULE: REASON_TOKEN_INVALID}
                             if refused_token else {})
            if section is not None:
                judged_facts = [*tried]
                destination = extra.get("destination")
                for f in tried:
                    if isinstance(destination, str):
                        judged_facts.append(f._replace(path=destination))
                    judged_facts.extend(f._replace(path=p)
                                        for p, _ in second_paths(f.path, extra))
                    judged_facts.extend(f._replace(method=m)
                                        for m in extra.get("overrides") or ())
                # Rules testing claims the record does not hold (all but ``iss``, ``sub``),
                # tried passing and failing: before, replay decided with the two claims, a
                # relaxed or a new claim test came out as before, "no change" (hostile
                # review: a recorded claims_mismatch now let in, a 200 now denied on ``role``).
                open_rules = _open_rules(section, claim_rules, judged_facts, auth, rec.time,
                                         known)
                if not claims and not refused_token and (
                        rec.token_issuer or rec.token_subject or rec.token_id_hash
                        or rec.reason == REASON_CLAIMS_MISMATCH):
                    # A token was verified, of no provider the new policy has by that issuer
                    # (or none recorded: an introspected one without ``iss``).
                    unplaced = _token_rules(section, judged_facts, rec.time)
                    if unplaced:
                        too_many.append(f"{UNCERTAIN_CLAIMS}: the token's provider is not "
                                        f"recorded; rules {', '.join(repr(r.name) for r in unplaced)}"
                                        " name providers")
                if extra.get("apikey_unknown") is True and rec.apikey is None:
                    # An API key was presented that the recording sidecar did not recognise
                    # (defined for another section, or nowhere, or expired): decided as
                    # absent then; a rule of the new policy testing keys may recognise it.
                    # Which key it was is not recorded (found by a hostile review: a new
                    # policy naming it let the request in, replayed as "no change").
                    keyed = _key_rules(section, judged_facts, rec.time)
                    if keyed:
                        too_many.append(f"{UNCERTAIN_APIKEY}: rules "
                                        f"{', '.join(repr(r.name) for r in keyed)} test "
                                        "API keys")
                if len(open_rules) > MAX_CLAIM_TRIALS:
                    too_many.append(f"{UNCERTAIN_CLAIMS}: {len(open_rules)} rules test claims "
                                    "the trail does not hold")
                    open_rules = []
        if open_rules and len(tried) * (2 ** len(open_rules)) * each > MAX_WORK_PER_RECORD:
            too_many.append(f"{UNCERTAIN_CLAIMS}: {TOO_MANY_TRIALS} ({len(open_rules)} rules "
                            "test claims the trail does not hold)")
            open_rules = []
        held_sets = [frozenset(r.name for r, on in zip(open_rules, bits, strict=True) if on)
                     for bits in itertools.product((False, True), repeat=len(open_rules))]
        # (held_sets[0] is the empty set: the record's own claims, as decided before)
        results: list[list[Decision]] = []  # [port][held set]
        for f in tried:
            row = []
            for held in held_sets:
                pol: object = policy
                if held:
                    assert section is not None
                    variant = trials.get((service, held))
                    if variant is None:
                        if len(trials) >= MAX_TRIAL_SECTIONS:
                            trials.clear()
                        variant = trials[(service, held)] = _held(section, held)
                    pol = _Trial(policy, service, variant)
                row.append(decide(pol, service, f, auth, rec.time)  # type: ignore[arg-type]
                           if stream else judged(pol, service, f, auth, rec.time, rec.extra))
            results.append(row)
        before = rec.decision
        decisions = [d for row in results for d in row]
        differ = [d for d in decisions if outcome(d) != before]
        if rec.policy_version == getattr(policy, "version", None) \
                and len(differ) < len(decisions):
            # The very policy that decided it (its version), on the facts it had: the
            # claims and port the record does not hold gave the recorded outcome, one of
            # those tried. (A trail replayed under its own policy changes nothing.)
            continue
        whys: list[str] = list(too_many)
        if any(len({outcome(d) for d in row}) > 1 for row in results):
            whys.append(f"{UNCERTAIN_CLAIMS}: " + "; ".join(_describe(r) for r in open_rules))
        if any(len({outcome(row[i]) for row in results}) > 1 for i in range(len(held_sets))):
            whys.append(f"{UNCERTAIN_PORT}: rules name ports {named}")
        if not differ and "search_routes" in (extra.get("unread") or ()) \
                and any(d.allowed for d in decisions):
            # Let in, as live: a deny rule of this policy might refuse the search-like route
            # the record does not hold (``sidecar.inbound._note_routes``).
            whys.append(UNREAD["search_routes"])
        if not differ and not whys:
            continue
        new = differ[0] if differ else decisions[0]
        why = "; ".join(whys) if whys else None
        if why is None and len(differ) == len(decisions):
            # (a claims_mismatch here is settled by what the record holds: the rules whose
            # tests it does not settle were tried both ways, and every try agreed)
            why = UNCERTAIN_CLAIMS if refused_token or (
                rec.token_issuer is not None and new.reason.startswith("token")) else None
            unread = extra.get("unread")
            if why is None and unread and new.allowed:
                # Let in now, it would reach checks it never reached: what they read was
                # never read (``extra.unread``), so whether they refuse it is not known.
                why = "; ".join(UNREAD[u] for u in unread)
        changes.append(ReplayChange(rec, before, new, why is not None, why))
    return count, changes


def _counted(records: Iterator[AuditRecord], progress: Progress) -> Iterator[AuditRecord]:
    for n, rec in enumerate(records, 1):
        progress.update(n, "records")
        yield rec


def cmd_replay(args: argparse.Namespace) -> int:
    """``sidecar policy replay``: load the new policy, re-decide the trail's inbound requests and
    report what changes. Exit 0 when nothing changes, 1 when something does, 2 for an invalid
    policy, an unreadable trail or data key, a path holding no audit segment, a damaged segment or a malformed record (skipped
    and named on stderr; then "no change" could not be claimed)."""
    try:
        policy = load_policy_set(args.policy)
    except ConfigError as exc:
        print(f"sidecar: invalid policy:\n{exc}", file=sys.stderr)
        return 2
    # A path with no segment at all (a typo naming another directory, an empty one) is not
    # a trail that changes nothing: "0 would change" there would pass a CI gate unread.
    problem = path_problem(args.audit) or (
        None if resolve_segments(args.audit) else "no audit segments here (is this audit.path?)")
    if problem is not None:
        print(f"sidecar: cannot read audit trail {args.audit}: {problem}", file=sys.stderr)
        return 2
    filters = RecordFilter(peer=args.peer)
    damaged: list[str] = []
    malformed: list[str] = []

    def skipped(what: str) -> None:
        malformed.append(what)
        print(f"sidecar: skipped {safe(what)}", file=sys.stderr, flush=True)

    def fit(stored: Iterator[StoredRecord]) -> Iterator[AuditRecord]:
        for s in stored:
            problem = replay_problem(s.record)
            if problem is not None:
                skipped(f"{s.segment}: seq {s.seq}: malformed record: {problem}")
                continue
            yield s.record

    progress = Progress("replaying")
    try:
        decryptor = load_decryptor(args.data_key) if args.data_key else None
        records = fit(iter_stored(args.audit, filters, on_damage=damaged.append,
                                  decryptor=decryptor, on_malformed=skipped))
        count, changes = replay(policy, _counted(records, progress), args.identity)
    except ValueError as exc:  # a data key file that cannot be used
        print(f"sidecar: {safe(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sidecar: cannot read audit trail {safe(args.audit)}: {safe(exc.strerror)}",
              file=sys.stderr)
        return 2
    finally:
        progress.close()
    for d in damaged:
        # An encrypted trail read without (the right) --data-key lands here too: say so
        # rather than report "nothing would change" over records that were never read.
        print(f"sidecar: stopped reading a damaged or undecryptable segment: {safe(d)}",
              file=sys.stderr)
    label = policy_label(args.policy)
    doc = {"kind": "PolicyReplay", "policy": label, "files": list(policy.files),
           "version": policy.version, "replayed": count,
           "changed": [c.as_dict() for c in changes]}

    def table() -> str:
        lines = [f"replayed {count} request records under {safe(label)} "
                 f"(version {policy.version[:12]}): {len(changes)} would change"]
        for c in changes:
            r = c.record
            flag = f"  (uncertain: {c.why or UNCERTAIN_CLAIMS})" if c.uncertain else ""
            # Every field but the new decision comes from the trail: ``safe``.
            lines.append(f"  {safe(r.request_id or '-'):16} {safe(r.peer or '-')} "
                         f"{safe(r.method)} {safe(r.path)}: {safe(c.before)} [{safe(r.rule)}]"
                         f" -> {outcome(c.after)} [{c.after.rule}: {c.after.reason}]{flag}")
        return "\n".join(lines)

    if args.format == "json" and args.output_format == "table":
        args.output_format = "json"  # the older spelling of -o json
    emit(args, doc, table)
    if damaged or malformed:
        return 2  # part of the trail was not read: "no change" would not be true
    return 1 if changes else 0


def add_replay_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``replay`` subcommand (arguments and handler) under ``sidecar policy``."""
    p = subparsers.add_parser(
        "replay", help="re-decide recorded requests under a new policy; list what changes")
    p.add_argument("policy", nargs="+",
                   help="the new policy: file(s) and/or directories of one policy set")
    p.add_argument("--audit", required=True, help="audit directory or segment file")
    p.add_argument("--identity", default=None,
                   help="SPIFFE ID of the workload whose audit trail this is "
                        "(default: the one recorded in each record)")
    p.add_argument("--peer", default=None, help="only records from this caller")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="older spelling of -o (json = -o json)")
    add_output_flag(p)
    p.add_argument("--data-key", action="append", default=[], metavar="FILE",
                   help="data key file, to read an encrypted trail (audit.encryption_key_file)")
    p.set_defaults(func=cmd_replay)
