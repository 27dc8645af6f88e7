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
body named as method overrides, and ``destination``, the normalised path of a WebDAV
``Destination``. They are judged as the data path judges them (and ``policy explain`` the
query's): the request's own decision, then, if it lets the request in, the Destination's
path with its method, then each override method on its path; the first refusal is the
decision. ``unread`` names what a request refused before those checks carried and the
sidecar never read (``body``: a POST body whose override fields were not read; ``query``,
``destination``: one that would be refused, 400): a change that lets such a request in is
``uncertain``. Found by a hostile review: ``POST /orders/1?_method=DELETE``, refused live,
was replayed as a plain POST. A record written before these fields is judged as before.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from sidecar.audit.crypto import load_decryptor
from sidecar.audit.record import AuditRecord
from sidecar.audit.segments import (
    RecordFilter,
    StoredRecord,
    iter_stored,
    path_problem,
    resolve_segments,
)
from sidecar.errors import ConfigError
from sidecar.http.request import MAX_METHOD_OVERRIDES
from sidecar.output import Progress, add_output_flag, emit, safe
from sidecar.policy.decision import (
    INVALID_TOKEN_RULE,
    REASON_TOKEN_INVALID,
    AuthFacts,
    Decision,
    RequestFacts,
)
from sidecar.policy.engine import decide
from sidecar.policy.loader import load_policy_set, policy_label


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
# ``extra.unread``'s values (``sidecar.inbound._unjudged``): what a request refused before
# its later checks carried and the sidecar never read, and why a change that lets such a
# request in is uncertain.
UNREAD: dict[str, str] = {
    "body": "refused before its body's method-override fields were read",
    "query": "its query's method-override parameter was not read (400 if it is no method)",
    "destination": "its Destination was not read (400 if it cannot be judged)",
}
# ``extra.overrides``: at most the query's and the body's distinct methods, each a method
# the data path serves (``sidecar.http.request._METHOD``).
MAX_RECORDED_OVERRIDES = 2 * MAX_METHOD_OVERRIDES
_METHOD = re.compile(r"[A-Z][A-Z-]{0,31}")


def outcome(decision: Decision) -> str:
    """A decision as the audit trail records it: ``allow``, ``deny``, or ``dry-run`` for a deny
    that dry-run let through, so that recorded and replayed outcomes compare as equals."""
    if decision.dry_run and decision.would == "deny":
        return "dry-run"
    return decision.action


def replay_problem(rec: AuditRecord) -> str | None:
    """What makes a (well-formed) record unfit for replay: the ``extra`` fields replay reads
    (``service``, a string; ``port``, an integer 0..65535; ``overrides``, a list of at most
    ``MAX_RECORDED_OVERRIDES`` methods; ``destination``, a path; ``unread``, a list of
    ``UNREAD``'s names) of the wrong type or value."""
    extra = rec.extra
    if not extra:
        return None
    service, port = extra.get("service"), extra.get("port")
    if service is not None and not isinstance(service, str):
        return f"field 'x.service' is a {type(service).__name__}, not a string"
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 <= port <= 65535):
        return f"field 'x.port' {port!r} is not a port number"
    overrides, destination, unread = (extra.get("overrides"), extra.get("destination"),
                                      extra.get("unread"))
    if overrides is not None and (
            not isinstance(overrides, list) or len(overrides) > MAX_RECORDED_OVERRIDES
            or not all(isinstance(m, str) and _METHOD.fullmatch(m) for m in overrides)):
        return "field 'x.overrides' is not a list of methods"
    if destination is not None and (not isinstance(destination, str)
                                    or not destination.startswith("/")):
        return "field 'x.destination' is not a path"
    if unread is not None and (not isinstance(unread, list)
                               or not all(isinstance(u, str) and u in UNREAD for u in unread)):
        return f"field 'x.unread' is not a list of {', '.join(UNREAD)}"
    return None


def judged(policy: object, service: str, facts: RequestFacts, auth: AuthFacts, now: float,
           extra: dict[str, object] | None) -> Decision:
    """The decision of a recorded request as the data path makes it (``sidecar.inbound``):
    its own; if that lets it in, its Destination's path (``extra.destination``) with its
    method; then each method its query or body named (``extra.overrides``) on its path --
    the first refusal is the decision. None refusing, the first of them whose deny dry-run
    lets through (``dry-run``) is the decision when the request's own is not already one,
    as the data path records it (``sidecar.inbound._observed``; found by a hostile review:
    replay said "allow" for ``POST ?_method=DELETE`` under a dry-run section denying DELETE,
    where a plain ``DELETE`` is ``dry-run``). A record without these fields: its own
    decision."""
    new = decide(policy, service, facts, auth, now)  # type: ignore[arg-type]
    if not extra or not new.allowed:
        return new
    observed = None
    destination = extra.get("destination")
    if isinstance(destination, str):
        other = decide(policy, service, facts._replace(path=destination), auth,  # type: ignore[arg-type]
                       now)
        if not other.allowed:
            return other
        if other.dry_run:
            observed = other
    for method in extra.get("overrides") or ():  # type: ignore[attr-defined]
        if method != facts.method:
            other = decide(policy, service, facts._replace(method=method), auth,  # type: ignore[arg-type]
                           now)
            if not other.allowed:
                return other
            if other.dry_run and observed is None:
                observed = other
    return observed if observed is not None and not new.dry_run else new


def replay(policy: object, records: Iterator[AuditRecord], identity: str | None
           ) -> tuple[int, list[ReplayChange]]:
    """Re-decide every inbound request record; return (records replayed, changes). Records
    with a ``replay_problem`` are skipped (``cmd_replay`` names them)."""
    changes: list[ReplayChange] = []
    count = 0
    providers = getattr(getattr(policy, "extras", None), "jwt_providers", {}) or {}
    for rec in records:
        if rec.event != "request" or rec.direction != "inbound" or not rec.method:
            continue
        if replay_problem(rec) is not None:
            continue
        service = identity or (rec.extra or {}).get("service")
        if not service:
            continue
        count += 1
        facts = RequestFacts(direction="inbound", peer=rec.peer, source=rec.source.rsplit(":", 1)[0]
                             if rec.source.count(":") == 1 else rec.source,
                             method=rec.method, path=rec.path, host=rec.host,
                             port=int((rec.extra or {}).get("port", 0) or 0), listener="inbound")
        claims = {}
        if rec.token_issuer:
            for name, prov in providers.items():
                if prov.issuer == rec.token_issuer:
                    claims[name] = {"iss": rec.token_issuer, "sub": rec.token_subject}
        # A request refused (or, in dry-run, recorded) for a token no provider accepted
        # (``invalid_tokens: refuse``) presented one: it is presented again. Which provider
        # refused it is not recorded (an entry under the rule's name, which names none).
        refused_token = rec.rule == INVALID_TOKEN_RULE and rec.reason == REASON_TOKEN_INVALID
        auth = AuthFacts(claims=claims, apikey=rec.apikey,
                         token_errors={INVALID_TOKEN_RULE: REASON_TOKEN_INVALID}
                         if refused_token else {})
        new = judged(policy, service, facts, auth, rec.time, rec.extra)
        before = rec.decision
        after = outcome(new)
        if after != before:
            why = UNCERTAIN_CLAIMS if new.reason == "claims_mismatch" or refused_token or (
                rec.token_issuer is not None and new.reason.startswith("token")) else None
            unread = (rec.extra or {}).get("unread")
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
