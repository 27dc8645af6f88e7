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
import sys
import time
from typing import Any, TextIO

from sidecar.config.values import parse_timestamp
from sidecar.errors import ConfigError
from sidecar.policy.explain import explain
from sidecar.policy.lint import lint
from sidecar.policy.loaded import Policy
from sidecar.policy.loader import load_policy_set, policy_label

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2


def _load(paths: list[str], err: TextIO) -> Policy | None:
    try:
        return load_policy_set(paths)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=err)
        print(f"{len(exc.problems)} error(s) in {policy_label(paths)}", file=err)
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
        out += [f"{_provider_file(policy, p.name)}: jwt_providers.{p.name}.{key}: [{code}] {path} does not exist"
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
    data = check_summary(policy)
    files = f" ({len(data['files'])} files)" if len(data["files"]) > 1 else ""
    print(
        f"ok: {data['policy']}{files} version {data['version'][:12]}: {data['sections']} "
        f"section(s), {data['rules']} rule(s), {data['jwt_providers']} JWT provider(s)",
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
    label = policy_label(args.file)
    if warnings:
        print(f"{len(warnings)} warning(s) in {label}", file=out)
        return EXIT_FOUND
    print(f"ok: {label}: no warnings", file=out)
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


def _rebase_provider_files(mesh: dict[str, Any], old: str, new: str) -> None:
    """Relative ``jwks_file``/``jwks_ca`` paths are relative to the policy file: keep them
    pointing at the same files from the new directory."""
    for spec in (mesh.get("jwt_providers") or {}).values():
        for key in ("jwks_file", "jwks_ca"):
            if isinstance(spec, dict) and isinstance(spec.get(key), str) and not (
                    os.path.isabs(spec[key])):
                spec[key] = os.path.relpath(os.path.join(old, spec[key]), new)


def cmd_split(args: argparse.Namespace) -> int:
    """Split one policy file into a directory of files, one per namespace + one mesh-wide."""
    import yaml

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
    with open(args.file, "rb") as fh:
        raw = fh.read()
    doc, _ = parse_yaml(raw, args.file)
    files = split_policy(doc, raw)
    _rebase_provider_files(files[MESH_FILE], os.path.dirname(os.path.abspath(args.file)),
                           os.path.abspath(args.out))
    os.makedirs(args.out, exist_ok=True)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    sizes: dict[str, int] = {}
    for name, part in files.items():
        text = ("# written by `sidecar policy split`; one file of a policy set "
                "(docs/policy.md)\n" + yaml.dump(part, Dumper=dumper, sort_keys=False,
                                                 allow_unicode=True, default_flow_style=False,
                                                 width=100))
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as fh:
            fh.write(text)
        sizes[name] = len(text.encode())
    again = _load([args.out], err)
    if again is None or len(again.services) != len(policy.services) or (
            again.rule_count() != policy.rule_count()):
        print(f"error: the files written to {args.out} do not load back as the same policy",
              file=err)
        return EXIT_FOUND
    big = sorted(n for n, size in sizes.items() if size > CONFIGMAP_LIMIT)
    print(f"ok: {args.file} -> {args.out}: {len(files)} file(s), {len(policy.services)} "
          f"section(s), version {again.short_version}", file=out)
    for name in big:
        print(f"warning: {name} is {sizes[name]} bytes, over the 1 MiB ConfigMap limit",
              file=out)
    return EXIT_FOUND if big else EXIT_OK


def add_policy_parsers(subparsers: Any) -> None:
    """Register ``check``, ``lint`` and ``explain`` under an argparse subparsers object."""
    files_help = "policy YAML file(s) and/or directories of them (one policy set)"
    p = subparsers.add_parser("check", help="validate a policy (file or set)")
    p.add_argument("file", nargs="+", help=files_help)
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("lint", help="validate and warn about likely mistakes")
    p.add_argument("file", nargs="+", help=files_help)
    p.add_argument("--now", help="evaluate expiry at this RFC 3339 time (default: now)")
    p.set_defaults(func=cmd_lint)

    p = subparsers.add_parser("explain", help="show the decision for one request and why")
    p.add_argument("file", nargs="+", help=files_help)
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

    p = subparsers.add_parser("split", help="split one policy file into a directory of files")
    p.add_argument("file", help="the policy YAML file")
    p.add_argument("--by", choices=["namespace"], default="namespace",
                   help="one file per namespace (the only way for now)")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.set_defaults(func=cmd_split)
