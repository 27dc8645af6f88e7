"""``sidecar policy check|lint|explain``: the functions the CLI calls.

``add_policy_parsers(subparsers)`` registers the three commands (each sets
``func=cmd_...`` as its default); the ``cmd_*`` functions take the parsed Namespace and
return the exit code: 0 ok / allowed, 1 errors / warnings / denied, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from sidecar.errors import ConfigError
from sidecar.policy.explain import explain
from sidecar.policy.lint import lint
from sidecar.policy.loader import load_policy_file, parse_timestamp
from sidecar.policy.model import Policy

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2


def _load(path: str, err: TextIO) -> Policy | None:
    try:
        return load_policy_file(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=err)
        print(f"{len(exc.problems)} error(s) in {path}", file=err)
        return None


def _now(args: argparse.Namespace, err: TextIO) -> float | None:
    raw = getattr(args, "now", None)
    if not raw:
        return time.time()
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        print(f"usage error: --now: {exc}", file=err)
        return None


def _missing_jwks(policy: Policy) -> list[str]:
    out = []
    for p in policy.extras.jwt_providers.values():
        intro = p.introspection
        # Every file a provider names: (key, path, code).
        files = [("jwks_file", p.jwks_file, "missing-jwks-file"),
                 ("jwks_ca", p.jwks_ca, "missing-file")]
        if intro is not None:
            files += [("introspection.client_secret_file", intro.client_secret_file,
                       "missing-file"), ("introspection.ca", intro.ca, "missing-file")]
        out += [f"{policy.filename}: jwt_providers.{p.name}.{key}: [{code}] {path} does not exist"
                for key, path, code in files if path is not None and not os.path.isfile(path)]
    return out


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a policy file; print every problem with file:line:key."""
    out: TextIO = getattr(args, "stdout", None) or sys.stdout
    err: TextIO = getattr(args, "stderr", None) or sys.stderr
    policy = _load(args.file, err)
    if policy is None:
        return EXIT_FOUND
    missing = _missing_jwks(policy)
    for line in missing:
        print(f"error: {line}", file=err)
    if missing:
        return EXIT_FOUND
    print(
        f"ok: {args.file} version {policy.short_version}: {len(policy.services)} section(s), "
        f"{policy.rule_count()} rule(s), {len(policy.extras.jwt_providers)} JWT provider(s)",
        file=out,
    )
    return EXIT_OK


def cmd_lint(args: argparse.Namespace) -> int:
    """Validate, then print warnings; exit 1 when there are any."""
    out: TextIO = getattr(args, "stdout", None) or sys.stdout
    err: TextIO = getattr(args, "stderr", None) or sys.stderr
    now = _now(args, err)
    if now is None:
        return EXIT_USAGE
    policy = _load(args.file, err)
    if policy is None:
        return EXIT_FOUND
    warnings = [str(w) for w in lint(policy, now)] + _missing_jwks(policy)
    for line in warnings:
        print(f"warning: {line}", file=out)
    if warnings:
        print(f"{len(warnings)} warning(s) in {args.file}", file=out)
        return EXIT_FOUND
    print(f"ok: {args.file}: no warnings", file=out)
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the decision and its trail; exit 0 when allowed, 1 when denied."""
    out: TextIO = getattr(args, "stdout", None) or sys.stdout
    err: TextIO = getattr(args, "stderr", None) or sys.stderr
    now = _now(args, err)
    if now is None:
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
    print(result.render(), file=out)
    return EXIT_OK if result.allowed else EXIT_FOUND


def add_policy_parsers(subparsers: Any) -> None:
    """Register ``check``, ``lint`` and ``explain`` under an argparse subparsers object."""
    p = subparsers.add_parser("check", help="validate a policy file")
    p.add_argument("file", help="policy YAML file")
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("lint", help="validate and warn about likely mistakes")
    p.add_argument("file", help="policy YAML file")
    p.add_argument("--now", help="evaluate expiry at this RFC 3339 time (default: now)")
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
    p.set_defaults(func=cmd_explain)
