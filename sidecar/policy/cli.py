"""``sidecar policy check|lint|explain|split``: the functions the CLI calls.

``add_policy_parsers(subparsers)`` registers the commands (each sets ``func=cmd_...`` as
its default); the ``cmd_*`` functions take the parsed Namespace and return the exit code:
0 ok / allowed, 1 errors / warnings / denied, 2 usage. Each command takes the policy as one
or more files and/or directories (one policy set, docs/policy.md "Policy sets"). What a
command found is built as data first (``check_summary``...) and only then printed, so that
other output formats can share the data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, TextIO

from sidecar.config.source import read_capped
from sidecar.config.values import parse_timestamp
from sidecar.errors import ConfigError, Problem
from sidecar.identity.spiffe import parse_spiffe_id
from sidecar.output import add_output_flag, dump_yaml, emit, safe
from sidecar.policy.explain import explain
from sidecar.policy.lint import LintWarning, lint
from sidecar.policy.loaded import Policy, narrow_extras
from sidecar.policy.loader import load_policy_set, policy_label
from sidecar.policy.policyset import NAMED_FILE_KEYS

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2


def _load(paths: list[str], err: TextIO) -> Policy | None:
    policy, problems = _load_problems(paths)
    if policy is None:
        _print_problems(problems, policy_label(paths), err)
    return policy


def _load_problems(paths: list[str]) -> tuple[Policy | None, list[Problem]]:
    """Load ``paths`` as one policy set; (policy, []) or (None, every problem)."""
    try:
        return load_policy_set(paths), []
    except ConfigError as exc:
        return None, list(exc.problems)


def _print_problems(problems: list[Problem], label: str, err: TextIO, tail: str = "") -> None:
    for problem in problems:
        print(f"error: {problem}", file=err)
    print(f"{len(problems)} error(s) in {safe(label)}{tail}", file=err)


def _problem_doc(p: Problem) -> dict[str, Any]:
    return {"file": p.file, "line": p.line, "key": p.key, "message": p.message}


def _now(args: argparse.Namespace, err: TextIO) -> float | None:
    raw = getattr(args, "now", None)
    if not raw:
        return time.time()
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        print(f"usage error: --now: {exc}", file=err)
        return None


def _missing_jwks_findings(policy: Policy) -> list[LintWarning]:
    out = []
    for p in policy.extras.jwt_providers.values():
        intro = p.introspection
        # Every file a provider names: (key, path, code).
        files = [("jwks_file", p.jwks_file, "missing-jwks-file"),
                 ("jwks_ca", p.jwks_ca, "missing-file")]
        if intro is not None:
            files += [("introspection.client_secret_file", intro.client_secret_file,
                       "missing-file"), ("introspection.ca", intro.ca, "missing-file")]
        out += [LintWarning(_provider_file(policy, p.name), None,
                            f"jwt_providers.{p.name}.{key}", code, f"{path} does not exist")
                for key, path, code in files if path is not None and not os.path.isfile(path)]
    return out


def _provider_file(policy: Policy, name: str) -> str:
    """The file of a set that defines provider ``name``."""
    return policy.defined_in.get(f"jwt_providers.{name}", policy.filename)


def check_summary(policy: Policy) -> dict[str, Any]:
    """What ``policy check`` reports about a valid policy, as data."""
    return {
        "policy": policy.filename, "version": policy.version, "files": list(policy.files),
        "sections": len(policy.services), "rules": policy.rule_count(),
        "jwt_providers": len(policy.extras.jwt_providers),
    }


def _streams(args: argparse.Namespace) -> tuple[TextIO, TextIO]:
    return (getattr(args, "stdout", None) or sys.stdout,
            getattr(args, "stderr", None) or sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a policy (one file or set); print every problem with file:line:key."""
    out, err = _streams(args)
    table = getattr(args, "output_format", "table") == "table"
    label = policy_label(args.file)
    policy, problems = _load_problems(args.file)
    doc: dict[str, Any] = {"kind": "PolicyCheck", "file": label, "ok": False,
                           "version": None, "files": [], "sections": 0, "rules": 0,
                           "jwt_providers": 0, "errors": [_problem_doc(p) for p in problems]}
    missing: list[LintWarning] = []
    if policy is not None:
        missing = _missing_jwks_findings(policy)
        summary = check_summary(policy)
        doc.update({k: summary[k] for k in ("version", "files", "sections", "rules",
                                            "jwt_providers")})
        doc["errors"] = [{"file": w.file, "line": w.line, "key": w.key,
                          "message": f"[{w.code}] {w.message}"} for w in missing]
        doc["ok"] = not missing
    if table:
        if policy is None:
            _print_problems(problems, label, err)
            return EXIT_FOUND
        for w in missing:
            print(f"error: {w}", file=err)
        if not doc["ok"]:
            return EXIT_FOUND

    def text() -> str:
        files = f" ({len(doc['files'])} files)" if len(doc["files"]) > 1 else ""
        return (f"ok: {safe(label)}{files} version {str(doc['version'])[:12]}: {doc['sections']} "
                f"section(s), {doc['rules']} rule(s), {doc['jwt_providers']} JWT provider(s)")

    emit(args, doc, text, out)
    return EXIT_OK if doc["ok"] else EXIT_FOUND


def _parse_ignore(items: list[str] | None) -> list[tuple[str, str]]:
    """``--ignore CODE`` or ``--ignore CODE@TEXT`` (only findings whose key or message
    contains TEXT, e.g. a rule name); comma-separated lists allowed."""
    out = []
    for item in items or ():
        for part in item.split(","):
            code, _, text = part.strip().partition("@")
            if code:
                out.append((code, text))
    return out


_RULE_KEY = re.compile(r"^services\.(.+?)\.rules\[(\d+)\]")


def _rule_name(policy: Policy, w: LintWarning) -> str | None:
    """The name of the rule a finding is about (its key says ``rules[N]``), if any."""
    m = _RULE_KEY.match(w.key)
    section = policy.services.get(m.group(1)) if m else None
    if m is None or section is None or int(m.group(2)) >= len(section.rules):
        return None
    return str(section.rules[int(m.group(2))].name)


def _ignored(w: LintWarning, rule: str | None, ignores: list[tuple[str, str]]) -> bool:
    return any(w.code == code and (not text or text == rule or text in w.key
                                   or text in w.message)
               for code, text in ignores)


EACH_HINT = "to lint separate policies one by one, add --each"


def _separate_policies(paths: list[str], problems: list[Problem]) -> bool:
    """Were several plain files, read as one set, refused because they do not merge?

    A merge conflict is reported on one file naming the other (the loader's guarantee:
    "service X is also defined in b.yaml:3", "trust_domain is ... in b.yaml:1"), so a problem
    of one given file that names another given file is a conflict between them, not a
    mistake inside one file. That is what ``lint a.yaml b.yaml`` on two complete policies
    meets, and ``--each`` is what its user meant."""
    if len(paths) < 2 or not all(os.path.isfile(p) for p in paths):
        return False
    return any(p.file in paths and any(q != p.file and q in p.message for q in paths)
               for p in problems)


def cmd_lint(args: argparse.Namespace) -> int:
    """Validate, then print findings; exit 1 when one is at or above ``--fail-on``.

    The paths are one policy set, as for ``check``; with ``--each`` every path is loaded and
    linted on its own (``lint --each policies/*.yaml``). Load errors are errors, lint
    findings are warnings.
    """
    out, err = _streams(args)
    now = _now(args, err)
    if now is None:
        return EXIT_USAGE
    ignores = _parse_ignore(args.ignore)
    table = getattr(args, "output_format", "table") == "table"
    # One policy set of every path, or (--each) every path a policy of its own.
    groups = [[p] for p in args.file] if args.each else [list(args.file)]
    files_doc: list[dict[str, Any]] = []
    lines: list[str] = []
    hint = None
    total_errors = total_warnings = total_ignored = 0
    for paths in groups:
        label = policy_label(paths)
        policy, problems = _load_problems(paths)
        entry: dict[str, Any] = {"file": label, "files": [], "version": None,
                                 "errors": [_problem_doc(p) for p in problems],
                                 "findings": [], "ignored": 0}
        if policy is None:
            total_errors += len(problems)
            if not args.each and _separate_policies(paths, problems):
                hint = EACH_HINT
            if table:
                _print_problems(problems, label, err,
                                f"; read as one policy set: {hint}" if hint else "")
        else:
            entry.update(files=list(policy.files), version=policy.version)
            findings = list(lint(policy, now)) + _missing_jwks_findings(policy)
            named = [(w, _rule_name(policy, w)) for w in findings]
            kept = [(w, rule) for w, rule in named if not _ignored(w, rule, ignores)]
            entry["ignored"] = len(findings) - len(kept)
            entry["findings"] = [{"file": w.file, "line": w.line, "key": w.key, "rule": rule,
                                  "code": w.code, "severity": "warning", "message": w.message}
                                 for w, rule in kept]
            total_warnings += len(kept)
            total_ignored += entry["ignored"]
            lines.extend(f"warning: {w}" for w, _ in kept)
            suffix = f" ({entry['ignored']} ignored)" if entry["ignored"] else ""
            lines.append(f"{len(kept)} warning(s) in {safe(label)}{suffix}" if kept
                         else f"ok: {safe(label)}: no warnings{suffix}")
        files_doc.append(entry)
    failed = total_errors > 0 or (args.fail_on == "warning" and total_warnings > 0)
    doc = {"kind": "PolicyLint", "ok": not failed, "fail_on": args.fail_on,
           "errors": total_errors, "warnings": total_warnings, "ignored": total_ignored,
           "hint": hint, "files": files_doc}
    emit(args, doc, lambda: "\n".join(lines), out)
    return EXIT_FOUND if failed else EXIT_OK


def _explain_doc(result: Any, policy: Policy) -> dict[str, Any]:
    d = result.decision
    section = policy.services.get(result.identity)
    return {
        "kind": "PolicyExplain",
        "policy": policy.filename,
        "files": list(policy.files),
        "section_file": (section.file or policy.filename) if section is not None else None,
        "to": result.identity,
        "protocol": "http",  # (``--tcp``: "tcp", ``_explain_stream``)
        "target": result.raw_target,
        "path": result.path,
        "query": result.query,
        "normalisation": result.normalisation,
        "refused_before_policy": result.refused_reason,
        "destination": result.destination,
        "second_paths": [{"path": other, "rules": "all" if every else "deny"}
                         for other, every in result.second],
        "overrides": list(result.overrides),
        "section_found": result.section_found,
        "allowed": result.allowed,
        "decision": None if d is None else {
            "action": d.action, "status": d.status or None, "rule": d.rule, "reason": d.reason,
            "version": d.version, "dry_run": d.dry_run, "would": d.would},
        "rules": [{"name": r.name, "effect": r.effect, "line": r.line, "status": r.status,
                   "dry_run": r.dry_run,
                   "conditions": [{"name": c.name, "held": c.held, "detail": c.detail}
                                  for c in r.conditions]}
                  for r in result.rules],
    }


def _spiffe_arg(flag: str, value: str | None, err: TextIO) -> bool:
    if value is None:
        return True
    try:
        parse_spiffe_id(value)
        return True
    except ValueError as exc:
        print(f"usage error: {flag} {value!r} is not a SPIFFE ID ({exc}); "
              "expected e.g. spiffe://cluster.local/ns/shop/sa/orders", file=err)
        return False


# What a TCP stream lacks, as the flags that would give it (``--tcp`` refuses each): a stream
# has no method, target, Host or credentials (docs/policy.md "TCP listeners").
REQUEST_ONLY_FLAGS = (("--method", "method"), ("--path", "path"), ("--host", "host"),
                      ("--claims", "claims"), ("--provider", "provider"),
                      ("--token-invalid", "token_invalid"), ("--apikey", "apikey"),
                      ("--destination", "destination"))


def _explain_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags of ``explain`` before the policy is read, if anything.

    Every request the mTLS listener decides has a caller, and every HTTP request a target:
    ``--from`` was optional, and a request without a caller -- which the data path never
    decides -- was explained instead (found by a hostile review, session 29: a deny rule on
    ``from`` shown failing, the request allowed)."""
    if args.caller is None:
        return ("--from is required: the caller's SPIFFE ID (every request the inbound "
                "listener decides comes with one, from the caller's certificate)")
    if args.port is not None and not 0 < args.port < 65536:
        return f"--port {args.port} is no TCP port (1-65535)"
    if getattr(args, "tcp", False):
        given = [flag for flag, dest in REQUEST_ONLY_FLAGS
                 if getattr(args, dest, None) is not None]
        if given:
            return (f"{given[0]} does not apply with --tcp: a stream has no method, target, "
                    "Host or credentials")
    elif args.path is None:
        return "--path is required: the raw request target (or --tcp for a stream)"
    elif args.host is not None and not args.host:
        return "--host is empty: a request without a Host is refused with 400 before any rule"
    return None


def _explain_needs(section: Any, tcp: bool, args: argparse.Namespace) -> str | None:
    """A flag the request needs to be decided as the data path decides it, if missing.

    ``--port`` when a deny rule has a ``ports`` condition: a port no request has (0) fails
    every one, and the deny rule was shown not holding where the sidecar refuses the request
    (found by a hostile review, session 26; an allow rule's is shown failing, and explain
    refuses more, never less). ``--host`` when any rule has a ``hosts`` condition: without
    it the request was decided with Host "", which the data path never decides (a request
    without a Host is refused with 400 before any rule), so a deny rule on ``hosts`` was
    shown failing and the request ALLOWED where the sidecar refuses it with 403 (found by a
    hostile review, session 29). Without such a rule the Host cannot change the decision
    (only ``hosts`` reads it); a stream has none."""
    rules = tuple(section.rules) if section is not None else ()
    if args.port is None:
        named = sorted(r.name for r in rules if r.effect == "deny" and r.when.ports is not None)
        if named:
            return (f"deny rule {named[0]!r} of the --to section has a ports condition: give "
                    "--port (the listening port the request arrives on)")
    if not tcp and args.host is None:
        named = sorted(r.name for r in rules if r.when.hosts is not None)
        if named:
            return (f"rule {named[0]!r} of the --to section has a hosts condition: give "
                    "--host (the request's Host; a request without one is refused with 400 "
                    "before any rule)")
    return None


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the decision and its trail; exit 0 when allowed, 1 when denied."""
    out, err = _streams(args)
    now = _now(args, err)
    if now is None:
        return EXIT_USAGE
    if not (_spiffe_arg("--to", args.to, err) and _spiffe_arg("--from", args.caller, err)):
        return EXIT_USAGE
    tcp = bool(getattr(args, "tcp", False))
    if (usage := _explain_usage(args)) is not None:
        print(f"usage error: {usage}", file=err)
        return EXIT_USAGE
    claims_doc: Any = None
    if args.claims is not None:
        try:
            claims_doc = json.loads(args.claims)
        except ValueError as exc:
            print(f"usage error: --claims is not valid JSON: {exc}", file=err)
            return EXIT_USAGE
        if not isinstance(claims_doc, dict):
            print("usage error: --claims must be a JSON object", file=err)
            return EXIT_USAGE
    policy = _load(args.file, err)
    if policy is None:
        return EXIT_FOUND
    if (usage := _explain_needs(policy.section(args.to), tcp, args)) is not None:
        print(f"usage error: {usage}", file=err)
        return EXIT_USAGE
    if tcp:
        doc, text = _explain_stream(policy, args, now)
        emit(args, doc, lambda: text, out)
        return EXIT_OK if doc["allowed"] else EXIT_FOUND
    # What the --to section's sidecar loads (``narrow_extras``, as the loader narrows a
    # running sidecar's policy): only the providers and API keys its own rules name.
    view = narrow_extras(policy.extras, policy.services.get(args.to))
    problem, notes, apikey = _credential_flags(policy, view, args, now)
    if problem is not None:
        print(f"usage error: {problem}", file=err)
        return EXIT_USAGE
    providers = [args.provider] if args.provider else list(view.jwt_providers)
    claims = {p: claims_doc for p in providers} if claims_doc is not None else {}
    token_errors = {p: "invalid" for p in args.token_invalid or ()}
    result = explain(
        policy, args.to, caller=args.caller, method=args.method or "GET", target=args.path,
        host=args.host or "", port=args.port or 0, listener=args.listener,
        claims=claims, token_errors=token_errors, apikey=apikey, now=now,
        destination=args.destination,
    )
    doc = _explain_doc(result, policy)
    doc["notes"] = notes
    emit(args, doc, lambda: "\n".join([*(f"note:   {safe(n)}" for n in notes),
                                        result.render()]), out)
    return EXIT_OK if result.allowed else EXIT_FOUND


def _credential_flags(policy: Policy, view: Any, args: argparse.Namespace, now: float
                      ) -> tuple[str | None, list[str], str | None]:
    """The credentials of ``explain`` as the --to section's sidecar reads them: (a usage
    error, notes for the output, the API key name to decide with).

    That sidecar loads only the JWT providers and API keys its own rules name
    (``narrow_extras``). Before the thirty-fifth session explain took any name -- another
    section's provider or key, or one defined nowhere -- and decided as if the sidecar had
    verified it: ALLOW, or 403, where the sidecar answers 401 (found by a hostile review).
    Now:

    - ``--provider`` / ``--token-invalid`` naming a provider the section's sidecar does not
      load is a usage error: what it does with such a token depends on where the token is
      and what it names (a provider of the section reading that place refuses it, an invalid
      token; one in a place none reads is not seen), which the flags do not say.
    - ``--apikey`` naming a key of the policy that sidecar does not load is decided exactly
      as the data path decides it: an ``x-api-key`` no loaded key is counts as none
      (``Authenticator._check_apikey``), and a note says so; so is an expired key of the
      section's (``ApiKeyTable.check``). A name no ``api_keys`` entry
      of the policy has is a usage error (a typo, like an unknown ``--to``).
    """
    section = args.to
    where = (f"section {section}" if section in policy.services
             else f"{section} (no section in this policy: that sidecar denies everything)")
    loaded = ", ".join(sorted(safe(n) for n in view.jwt_providers)) or "none"
    for flag, names in (("--provider", [args.provider] if args.provider else []),
                        ("--token-invalid", list(args.token_invalid or ()))):
        for name in names:
            if name in view.jwt_providers:
                continue
            if name in policy.extras.jwt_providers:
                return (f"{flag} {safe(name)}: provider {safe(name)} is not named by any rule "
                        f"of {safe(where)}: that sidecar does not load it, so it never "
                        "verifies a token of it (a provider of the section reading the "
                        "token's place refuses it as invalid, one in a place none reads is "
                        "not seen); give --token-invalid with a provider the section names, "
                        f"or leave the token out (loaded there: {loaded})", [], None)
            return (f"{flag} {safe(name)}: no provider {safe(name)} is defined in the policy "
                    f"(loaded by {safe(where)}: {loaded})", [], None)
    name = args.apikey
    if name is None:
        return None, [], None
    keys = ", ".join(sorted({safe(k.name) for k in view.api_keys})) or "none"
    entries = [k for k in view.api_keys if k.name == name]
    if entries:
        if any(k.expires_at is None or now < k.expires_at for k in entries):
            return None, [], name
        return None, [f"API key {name} has expired (expires_at): the sidecar does not "
                      "recognise it, and a key it does not recognise counts as no key -- "
                      "decided without one, as the sidecar decides it"], None
    if not any(k.name == name for k in policy.extras.api_keys):
        return (f"--apikey {safe(name)}: no API key {safe(name)} is defined in the policy "
                f"(loaded by {safe(where)}: {keys})", [], None)
    return None, [f"API key {name} is not named by any rule of {where}: that sidecar does "
                  "not load it, and a key it does not recognise counts as no key -- "
                  "decided without one, as the sidecar decides it"], None


# The conditions an opaque stream has (``compiled.stream_holds``); the others are request
# and credential conditions: left out of a deny rule, never met by an allow rule.
STREAM_CONDITIONS = frozenset({"from", "namespaces", "ports", "listeners"})
REQUEST_CONDITIONS = ("methods", "paths", "hosts", "jwt", "apikey")  # (``Conditions`` fields)


def _stream_trail(section: Any, facts: Any, now: float) -> list[dict[str, Any]]:
    """Every rule of ``section`` as a stream meets it: the conditions a stream has, checked;
    the others left out of a deny rule (it denies more) and never met for an allow rule."""
    from sidecar.policy.compiled import ConditionResult, request_trace, stream_holds

    rules: list[dict[str, Any]] = []
    for rule in section.rules:
        deny = rule.effect == "deny"
        conds = [c for c in request_trace(rule.when, facts, section.trust_domain)
                 if c.name in STREAM_CONDITIONS]
        conds += [ConditionResult(name, deny, "left out: the stream could carry any request"
                                  if deny else "a stream has none: never met")
                  for name in REQUEST_CONDITIONS if getattr(rule.when, name) is not None]
        held = (stream_holds(rule.when, facts, section.trust_domain) if deny
                else all(c.held for c in conds))
        status = "expired" if rule.expired(now) else "matched" if held else "not matched"
        dry = rule.mode == "dry-run" or (rule.mode is None and section.mode == "dry-run")
        rules.append({"name": rule.name, "effect": rule.effect, "line": rule.line,
                      "status": status, "dry_run": dry,
                      "conditions": [{"name": c.name, "held": c.held, "detail": c.detail}
                                     for c in conds]})
    return rules


def _explain_stream(policy: Policy, args: argparse.Namespace,
                    now: float) -> tuple[dict[str, Any], str]:
    """``explain --tcp``: the decision for a stream on a ``protocol: tcp`` listener, made as
    the data path makes it (``decide`` with no method, path, Host or credentials:
    ``inbound._tcp``), and each rule's trail with only the conditions a stream has.

    Before session 29 explain decided HTTP requests only, while a stream is decided
    otherwise (a deny rule on ``paths`` refuses every stream, an allow rule on ``paths`` none;
    a hostile review)."""
    from sidecar.policy.decision import NO_AUTH, RequestFacts
    from sidecar.policy.engine import decide

    facts = RequestFacts("inbound", args.caller, "127.0.0.1", "", "", "", args.port or 0,
                         args.listener)
    d = decide(policy, args.to, facts, NO_AUTH, now)
    section = policy.section(args.to)
    defined = policy.services.get(args.to)
    rules = _stream_trail(section, facts, now) if section is not None else []
    doc: dict[str, Any] = {
        "kind": "PolicyExplain", "policy": policy.filename, "files": list(policy.files),
        "section_file": (defined.file or policy.filename) if defined is not None else None,
        "to": args.to, "protocol": "tcp", "target": None, "path": None, "query": "",
        "normalisation": "", "refused_before_policy": None, "destination": None,
        "second_paths": [], "overrides": [],
        "section_found": section is not None, "allowed": d.allowed,
        "decision": {"action": d.action, "status": d.status or None, "rule": d.rule,
                     "reason": d.reason, "version": d.version, "dry_run": d.dry_run,
                     "would": d.would},
        "rules": rules,
    }
    lines = [f"to:     {safe(args.to)}",
             "stream: tcp (no method, path, Host or credentials: decided once, when it opens)"]
    if section is None:
        lines.append("section: none for this identity -> every stream is denied")
    for r in rules:
        mark = {"matched": "+", "expired": "~"}.get(r["status"], "-")
        at = f" (line {r['line']})" if r["line"] else ""
        dry = " [dry-run]" if r["dry_run"] else ""
        lines.append(f"  {mark} {r['effect']} {safe(r['name'])}{at}{dry}: {r['status']}")
        lines += [f"      {'ok  ' if c['held'] else 'FAIL'} {c['name']}: {safe(c['detail'])}"
                  for c in r["conditions"]]
    verdict = f"decision: {d.action.upper()}" + (f" {d.status}" if d.status else "")
    verdict += f"  rule={safe(d.rule)!r} reason={d.reason} version={d.version[:12]}"
    if d.dry_run:
        verdict += f"  (dry-run: would {d.would})"
    lines.append(verdict)
    return doc, "\n".join(lines)


CONFIGMAP_LIMIT = 1024 * 1024  # Kubernetes refuses a ConfigMap over 1 MiB
MESH_FILE = "mesh.yaml"
OTHER_FILE = "other.yaml"


def split_policy(doc: dict[str, Any], raw: bytes) -> dict[str, dict[str, Any]]:
    """One policy document -> {file name: document}: ``mesh.yaml`` with everything but the
    services, ``ns-NAMESPACE.yaml`` per namespace of the policy's trust domain, and
    ``other.yaml`` for identities without one. Every file carries the same ``revision`` (the
    source's, else the start of its SHA-256), so a set mixing two versions is refused."""
    import hashlib

    from sidecar.identity.spiffe import namespace_of

    revision = doc.get("revision") or hashlib.sha256(raw).hexdigest()[:16]
    head = {"version": doc.get("version", 1), "revision": revision}
    if "trust_domain" in doc:
        head["trust_domain"] = doc["trust_domain"]
    mesh = dict(head)
    mesh.update((k, v) for k, v in doc.items() if k not in ("services", *head))
    mesh["services"] = {}
    out: dict[str, dict[str, Any]] = {MESH_FILE: mesh}
    td = str(doc.get("trust_domain", ""))
    for identity, section in (doc.get("services") or {}).items():
        ns = namespace_of(identity, td)
        name = f"ns-{ns}.yaml" if ns else OTHER_FILE
        out.setdefault(name, dict(head, services={}))["services"][identity] = section
    return out


# Every file path a provider names (``policyset.NAMED_FILE_KEYS``, one list with the set's
# merge): a relative one is relative to the directory of the file that states it, so
# ``split`` rewrites each for the new directory and its load-back compares each resolved
# (``tests/test_policy_cli_review29.py`` derives the list from the loader).


def _rebase_named_files(mesh: dict[str, Any], old: str, new: str) -> None:
    """Every relative file path of a named entry (``NAMED_FILE_KEYS``: a provider's
    ``jwks_file``, ``jwks_ca``, ``introspection.ca`` and ``introspection.client_secret_file``)
    is relative to the policy file: keep it pointing at the same file from the new directory.
    (Before session 29 only ``jwks_file``/``jwks_ca`` were rewritten, and the set written
    named ``DIR/ca.pem`` for the introspection endpoint's CA; a hostile review.)"""
    for top, inner in NAMED_FILE_KEYS:
        for spec in (mesh.get(top) or {}).values():
            for part in inner[:-1]:
                spec = spec.get(part) if isinstance(spec, dict) else None
            value = spec.get(inner[-1]) if isinstance(spec, dict) else None
            if isinstance(spec, dict) and isinstance(value, str) and not os.path.isabs(value):
                spec[inner[-1]] = os.path.relpath(os.path.join(old, value), new)


def _split_differences(before: Policy, after: Policy) -> list[str]:
    """What the set written by ``split`` reads otherwise than the source: the counts, every
    mesh-wide part (revocations, API keys, rate limits, alerts) and every JWT provider as
    loaded -- its file paths resolved: the same text names other files from another
    directory (session 29: only the counts were compared, and ``ok`` was said of a set that
    named other introspection files)."""
    import dataclasses

    out = [f"{f.name}: not the same" for f in dataclasses.fields(before.extras)
           if f.name != "jwt_providers"
           and getattr(before.extras, f.name) != getattr(after.extras, f.name)]
    if len(after.services) != len(before.services):
        out.append(f"{len(after.services)} section(s), not {len(before.services)}")
    if after.rule_count() != before.rule_count():
        out.append(f"{after.rule_count()} rule(s), not {before.rule_count()}")
    was, now = before.extras.jwt_providers, after.extras.jwt_providers
    for name in sorted(set(was) | set(now)):
        a, b = was.get(name), now.get(name)
        if a == b:
            continue
        files = [f"{'.'.join(inner)} {_file_value(b, inner)} (source: {_file_value(a, inner)})"
                 for top, inner in NAMED_FILE_KEYS if top == "jwt_providers"
                 and _file_value(a, inner) != _file_value(b, inner)]
        out.append(f"jwt_providers.{name}: " + ("; ".join(files) if files
                                                else "not the same provider"))
    return out


def _file_value(entry: Any, inner: tuple[str, ...]) -> Any:
    """The value at ``inner`` of a loaded entry (attributes), None where there is none."""
    for part in inner:
        entry = getattr(entry, part, None)
    return entry


def cmd_split(args: argparse.Namespace) -> int:
    """Split one policy file into a directory of files, one per namespace + one mesh-wide."""

    from sidecar.config.source import parse_yaml

    out: TextIO = getattr(args, "stdout", None) or sys.stdout
    err: TextIO = getattr(args, "stderr", None) or sys.stderr
    policy = _load([args.file], err)
    if policy is None:
        return EXIT_FOUND
    if os.path.isdir(args.out) and any(n.endswith((".yaml", ".yml")) for n in os.listdir(args.out)):
        print(f"usage error: {args.out} already holds policy files; use an empty directory",
              file=err)
        return EXIT_USAGE
    raw = read_capped(args.file)
    doc, _ = parse_yaml(raw, args.file)
    files = split_policy(doc, raw)
    _rebase_named_files(files[MESH_FILE], os.path.dirname(os.path.abspath(args.file)),
                        os.path.abspath(args.out))
    os.makedirs(args.out, exist_ok=True)
    sizes: dict[str, int] = {}
    for name, part in files.items():
        text = ("# written by `sidecar policy split`; one file of a policy set "
                "(docs/policy.md)\n" + dump_yaml(part, width=100))
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as fh:
            fh.write(text)
        sizes[name] = len(text.encode())
    again = _load([args.out], err)
    differences = ["it does not load"] if again is None else _split_differences(policy, again)
    if again is None or differences:
        for what in differences:
            print(f"error: {safe(args.out)}: {safe(what)}", file=err)
        print(f"error: the files written to {safe(args.out)} do not load back as the same "
              "policy", file=err)
        return EXIT_FOUND
    big = sorted(n for n, size in sizes.items() if size > CONFIGMAP_LIMIT)
    print(f"ok: {args.file} -> {args.out}: {len(files)} file(s), {len(policy.services)} "
          f"section(s), version {again.short_version}", file=out)
    for name in big:
        print(f"warning: {name} is {sizes[name]} bytes, over the 1 MiB ConfigMap limit",
              file=out)
    return EXIT_FOUND if big else EXIT_OK


def add_policy_parsers(subparsers: Any) -> None:
    """Register ``check``, ``lint``, ``explain`` and ``split`` under an argparse subparsers
    object."""
    files_help = "policy YAML file(s) and/or directories of them (one policy set)"
    p = subparsers.add_parser("check", help="validate a policy (file or set)")
    p.add_argument("file", nargs="+", help=files_help)
    add_output_flag(p)
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("lint", help="validate and warn about likely mistakes")
    p.add_argument("file", nargs="+", help=files_help)
    p.add_argument("--each", action="store_true",
                   help="lint every path as a policy of its own (lint policies/*.yaml)")
    p.add_argument("--now", help="evaluate expiry at this RFC 3339 time (default: now)")
    p.add_argument("--ignore", action="append", metavar="CODE[@TEXT]",
                   help="suppress findings with this code (only those whose key or message "
                        "contains TEXT, e.g. a rule name); repeatable, comma-separated")
    p.add_argument("--fail-on", choices=("warning", "error"), default="warning",
                   help="exit 1 on any warning (default) or only on errors")
    add_output_flag(p)
    p.set_defaults(func=cmd_lint)

    p = subparsers.add_parser("explain", help="show the decision for one request and why")
    p.add_argument("file", nargs="+", help=files_help)
    p.add_argument("--to", required=True, help="SPIFFE ID of the called workload (section)")
    p.add_argument("--from", dest="caller", help="SPIFFE ID of the caller (required)")
    p.add_argument("--method", help="HTTP method (default GET)")
    p.add_argument("--path", help="raw request target, e.g. /orders/1?x=y (required, "
                                  "unless --tcp)")
    p.add_argument("--destination", help="a WebDAV Destination value (COPY, MOVE: the path "
                                         "written to, judged too)")
    p.add_argument("--claims", help="JSON object: verified token claims")
    p.add_argument("--provider", help="the --claims belong to this provider only")
    p.add_argument("--token-invalid", action="append", metavar="PROVIDER",
                   help="simulate an invalid token for PROVIDER (repeatable)")
    p.add_argument("--apikey", help="name of a valid API key presented")
    p.add_argument("--host", help="Host header (required when a rule of the --to section "
                                  "has a hosts condition)")
    p.add_argument("--port", type=int, help="local listening port (required when a deny rule "
                                            "of the --to section has a ports condition)")
    p.add_argument("--tcp", action="store_true",
                   help="decide a stream on a protocol: tcp listener (no method, path, Host "
                        "or credentials) instead of an HTTP request")
    p.add_argument("--listener", default="inbound",
                   help="listener name (default inbound: rules decide the inbound listener's "
                        "requests only)")
    p.add_argument("--now", help="decide at this RFC 3339 time (default: now)")
    add_output_flag(p)
    p.set_defaults(func=cmd_explain)

    p = subparsers.add_parser("split", help="split one policy file into a directory of files")
    p.add_argument("file", help="the policy YAML file")
    p.add_argument("--by", choices=["namespace"], default="namespace",
                   help="one file per namespace (the only way for now)")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.set_defaults(func=cmd_split)
