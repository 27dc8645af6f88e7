"""``sidecar policy check|lint|explain``: the functions the CLI calls.

``add_policy_parsers(subparsers)`` registers the three commands (each sets
``func=cmd_...`` as its default); the ``cmd_*`` functions take the parsed Namespace and
return the exit code: 0 ok / allowed, 1 errors / warnings / denied, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, TextIO

from sidecar.errors import ConfigError, Problem
from sidecar.identity.spiffe import parse_spiffe_id
from sidecar.output import add_output_flag, emit
from sidecar.policy.explain import explain
from sidecar.policy.lint import LintWarning, lint
from sidecar.policy.loader import load_policy_file, parse_timestamp
from sidecar.policy.model import Policy

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2


def _load(path: str, err: TextIO, quiet: bool = False) -> Policy | None:
    policy, problems = _load_problems(path)
    if policy is None and not quiet:
        for problem in problems:
            print(f"error: {problem}", file=err)
        print(f"{len(problems)} error(s) in {path}", file=err)
    return policy


def _load_problems(path: str) -> tuple[Policy | None, list[Problem]]:
    try:
        return load_policy_file(path), []
    except ConfigError as exc:
        return None, list(exc.problems)


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
        out += [LintWarning(policy.filename, None, f"jwt_providers.{p.name}.{key}", code,
                            f"{path} does not exist")
                for key, path, code in files if path is not None and not os.path.isfile(path)]
    return out


def _missing_jwks(policy: Policy) -> list[str]:
    return [str(w) for w in _missing_jwks_findings(policy)]


def _streams(args: argparse.Namespace) -> tuple[TextIO, TextIO]:
    return (getattr(args, "stdout", None) or sys.stdout,
            getattr(args, "stderr", None) or sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a policy file; print every problem with file:line:key."""
    out, err = _streams(args)
    table = getattr(args, "output_format", "table") == "table"
    policy, problems = _load_problems(args.file)
    doc: dict[str, Any] = {"kind": "PolicyCheck", "file": args.file, "ok": False,
                           "version": None, "sections": 0, "rules": 0, "jwt_providers": 0,
                           "errors": [_problem_doc(p) for p in problems]}
    if policy is not None:
        missing = _missing_jwks_findings(policy)
        doc["errors"] = [{"file": w.file, "line": w.line, "key": w.key,
                          "message": f"[{w.code}] {w.message}"} for w in missing]
        doc.update(ok=not missing, version=policy.version, sections=len(policy.services),
                   rules=policy.rule_count(), jwt_providers=len(policy.extras.jwt_providers))
    if table:
        if policy is None:
            _load(args.file, err)
            return EXIT_FOUND
        for line in _missing_jwks(policy):
            print(f"error: {line}", file=err)
        if not doc["ok"]:
            return EXIT_FOUND
    emit(args, doc, lambda: (
        f"ok: {args.file} version {str(doc['version'])[:12]}: {doc['sections']} section(s), "
        f"{doc['rules']} rule(s), {doc['jwt_providers']} JWT provider(s)"), out)
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


def cmd_lint(args: argparse.Namespace) -> int:
    """Validate, then print findings; exit 1 when one is at or above ``--fail-on``.

    Several files may be given (``lint policies/*.yaml``); each is loaded and linted on
    its own. Load errors are errors, lint findings are warnings.
    """
    out, err = _streams(args)
    now = _now(args, err)
    if now is None:
        return EXIT_USAGE
    ignores = _parse_ignore(args.ignore)
    table = getattr(args, "output_format", "table") == "table"
    files_doc: list[dict[str, Any]] = []
    lines: list[str] = []
    total_errors = total_warnings = total_ignored = 0
    for path in args.files:
        policy, problems = _load_problems(path)
        entry: dict[str, Any] = {"file": path, "version": None,
                                 "errors": [_problem_doc(p) for p in problems],
                                 "findings": [], "ignored": 0}
        if policy is None:
            total_errors += len(problems)
            if table:
                for problem in problems:
                    print(f"error: {problem}", file=err)
                print(f"{len(problems)} error(s) in {path}", file=err)
        else:
            entry["version"] = policy.version
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
            lines.append(f"{len(kept)} warning(s) in {path}{suffix}" if kept
                         else f"ok: {path}: no warnings{suffix}")
        files_doc.append(entry)
    failed = total_errors > 0 or (args.fail_on == "warning" and total_warnings > 0)
    doc = {"kind": "PolicyLint", "ok": not failed, "fail_on": args.fail_on,
           "errors": total_errors, "warnings": total_warnings, "ignored": total_ignored,
           "files": files_doc}
    emit(args, doc, lambda: "\n".join(lines), out)
    return EXIT_FOUND if failed else EXIT_OK


def _explain_doc(result: Any) -> dict[str, Any]:
    d = result.decision
    return {
        "kind": "PolicyExplain",
        "to": result.identity,
        "target": result.raw_target,
        "path": result.path,
        "query": result.query,
        "normalisation": result.normalisation,
        "refused_before_policy": result.refused_reason,
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


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the decision and its trail; exit 0 when allowed, 1 when denied."""
    out, err = _streams(args)
    now = _now(args, err)
    if now is None:
        return EXIT_USAGE
    if not (_spiffe_arg("--to", args.to, err) and _spiffe_arg("--from", args.caller, err)):
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
    providers = [args.provider] if args.provider else list(policy.extras.jwt_providers)
    claims = {p: claims_doc for p in providers} if claims_doc is not None else {}
    token_errors = {p: "invalid" for p in args.token_invalid or ()}
    result = explain(
        policy, args.to, caller=args.caller, method=args.method, target=args.path,
        host=args.host or "", port=args.port or 0, listener=args.listener or "",
        claims=claims, token_errors=token_errors, apikey=args.apikey, now=now,
        merge_slashes=args.merge_slashes,
    )
    emit(args, _explain_doc(result), result.render, out)
    return EXIT_OK if result.allowed else EXIT_FOUND


def add_policy_parsers(subparsers: Any) -> None:
    """Register ``check``, ``lint`` and ``explain`` under an argparse subparsers object."""
    p = subparsers.add_parser("check", help="validate a policy file")
    p.add_argument("file", help="policy YAML file")
    add_output_flag(p)
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("lint", help="validate and warn about likely mistakes")
    p.add_argument("files", nargs="+", metavar="FILE", help="policy YAML file(s)")
    p.add_argument("--now", help="evaluate expiry at this RFC 3339 time (default: now)")
    p.add_argument("--ignore", action="append", metavar="CODE[@TEXT]",
                   help="suppress findings with this code (only those whose key or message "
                        "contains TEXT, e.g. a rule name); repeatable, comma-separated")
    p.add_argument("--fail-on", choices=("warning", "error"), default="warning",
                   help="exit 1 on any warning (default) or only on errors")
    add_output_flag(p)
    p.set_defaults(func=cmd_lint)

    p = subparsers.add_parser("explain", help="show the decision for one request and why")
    p.add_argument("file", help="policy YAML file")
    p.add_argument("--to", required=True, help="SPIFFE ID of the called workload (section)")
    p.add_argument("--from", dest="caller", help="SPIFFE ID of the caller")
    p.add_argument("--method", default="GET", help="HTTP method (default GET)")
    p.add_argument("--path", required=True, help="raw request target, e.g. /orders/1?x=y")
    p.add_argument("--claims", help="JSON object: verified token claims")
    p.add_argument("--provider", help="the --claims belong to this provider only")
    p.add_argument("--token-invalid", action="append", metavar="PROVIDER",
                   help="simulate an invalid token for PROVIDER (repeatable)")
    p.add_argument("--apikey", help="name of a valid API key presented")
    p.add_argument("--host", help="Host header")
    p.add_argument("--port", type=int, help="local listening port")
    p.add_argument("--listener", help="listener name")
    p.add_argument("--now", help="decide at this RFC 3339 time (default: now)")
    p.add_argument("--merge-slashes", action="store_true",
                   help="merge '//' instead of refusing it (as the data path option)")
    add_output_flag(p)
    p.set_defaults(func=cmd_explain)
