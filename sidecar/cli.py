"""``sidecar <command>``: argument parsing only; every command lives in its own module."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

# The most any seconds option takes (a year): past it a sleep or deadline is never reached.
MAX_OPTION_SECONDS = 365 * 86400.0


def seconds(text: str) -> float:
    """The argparse type of every seconds option (``top --interval``/``--window``, ``tap
    --duration``, ``audit tail --interval``, ``webhook --reload-interval``/``--idle-timeout``):
    a finite number above 0 and at most ``MAX_OPTION_SECONDS``. ``nan``, ``inf``, 0,
    negatives and garbage are a usage error (exit 2): ``float`` takes ``nan``, which every
    comparison calls false, so a loop never drew or a JSON document said ``NaN``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_OPTION_SECONDS):
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_OPTION_SECONDS:.0f}, "
            f"not {text!r}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from sidecar.app import run
    from sidecar.config.model import load_config_file
    from sidecar.errors import ConfigError

    try:
        cfg = load_config_file(args.config)
    except ConfigError as exc:
        print(f"sidecar: invalid config:\n{exc}", file=sys.stderr)
        return 2
    if args.check and args.config_only:
        print(f"{args.config}: ok (config file only)")
        return 0
    if args.check:
        # The offline file checks of ``sidecar check``: certificate, key and bundle readable
        # and consistent, policy loads, audit keys present. No ports, no network.
        from sidecar.check import run_check_errors

        failures = run_check_errors(args.config)
        from sidecar.output import safe, safe_lines

        for f in failures:
            # The details quote the config's values (file paths): each line ``safe``.
            detail = "\n  ".join(safe_lines(f.detail))
            hint = "\n  ".join(safe_lines(f.hint))
            print(f"sidecar: {safe(f.title)}: {detail}\n  hint: {hint}", file=sys.stderr)
        if failures:
            return 2
        print(f"{args.config}: ok")
        return 0
    return run(cfg, worker_index=args.worker_index)


def _cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_demo(serve=args.serve, keep=args.keep)


def _cmd_apikey_new(args: argparse.Namespace) -> int:
    from sidecar.authn.apikeys import cmd_apikey_new

    return cmd_apikey_new(args)


def version_document() -> dict[str, str]:
    """What ``sidecar version -o json`` prints (stable; docs/operations.md)."""
    import platform

    from sidecar import __version__

    return {"kind": "Version", "version": __version__,
            "python": platform.python_version(), "platform": sys.platform}


def _cmd_version(args: argparse.Namespace) -> int:
    from sidecar.output import emit

    doc = version_document()
    emit(args, doc, lambda: doc["version"])
    return 0


def _cmd_completion(args: argparse.Namespace) -> int:
    from sidecar.completion import generate

    sys.stdout.write(generate(build_parser(), args.shell))
    return 0


def _add_policy_parsers(sub: Any) -> None:
    p = sub.add_parser("policy", help=SUMMARY["policy"])
    policy_sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    from sidecar.policy.cli import add_policy_parsers

    add_policy_parsers(policy_sub)
    from sidecar.replay import add_replay_parser

    add_replay_parser(policy_sub)


def _add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help=SUMMARY["run"])
    p.add_argument("-c", "--config", required=True, help="sidecar config file (YAML)")
    p.add_argument("--check", action="store_true",
                   help="validate the config and the files it names (certificate, key, "
                        "bundle, policy, audit keys), then exit")
    p.add_argument("--config-only", action="store_true",
                   help="with --check: the config file alone, not the files it names "
                        "(e.g. checking a ConfigMap away from the pod)")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_run)


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help=SUMMARY["demo"])
    p.add_argument("--serve", action="store_true",
                   help="keep the demo running and print curl commands to try")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (CA key included) when the demo ends")
    p.set_defaults(func=_cmd_demo)


def _add_check_parser(sub: Any) -> None:
    from sidecar.check import add_check_parser

    add_check_parser(sub)


def _add_live_parsers(sub: Any) -> None:
    from sidecar.live import add_live_parsers

    add_live_parsers(sub)


def _add_identity_parsers(sub: Any) -> None:
    from sidecar.identity.cli import add_ca_parsers, add_cert_parsers

    add_ca_parsers(sub)
    add_cert_parsers(sub)


def _add_audit_parsers(sub: Any) -> None:
    p = sub.add_parser("audit", help=SUMMARY["audit"])
    audit_sub = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    from sidecar.audit.cli import add_audit_parsers

    add_audit_parsers(audit_sub)


def _add_apikey_parsers(sub: Any) -> None:
    p = sub.add_parser("apikey", help=SUMMARY["apikey"])
    apikey_sub = p.add_subparsers(dest="apikey_command", metavar="SUBCOMMAND", required=True)
    p = apikey_sub.add_parser("new", help="print a fresh API key once, and the policy entry")
    p.add_argument("name", help="the key's name, as rules and audit records show it")
    p.set_defaults(func=_cmd_apikey_new)


def _add_k8s_parsers(sub: Any) -> None:
    from sidecar.k8s.cli import add_inject_parser, add_webhook_parser

    add_inject_parser(sub)
    add_webhook_parser(sub)


def _add_version_parser(sub: Any) -> None:
    from sidecar.output import add_output_flag

    p = sub.add_parser("version", help=SUMMARY["version"])
    add_output_flag(p)
    p.set_defaults(func=_cmd_version)


def _add_completion_parser(sub: Any) -> None:
    p = sub.add_parser("completion", help=SUMMARY["completion"],
                       description="bash: source <(sidecar completion bash); zsh: "
                                   "source <(sidecar completion zsh); fish: sidecar completion "
                                   "fish | source")
    p.add_argument("shell", choices=("bash", "zsh", "fish"))
    p.set_defaults(func=_cmd_completion)


# The top-level commands in the order ``sidecar --help`` lists them: (names, the function
# that adds their parsers, importing the modules they need).
COMMANDS: tuple[tuple[tuple[str, ...], Callable[[Any], None]], ...] = (
    (("run",), _add_run_parser),
    (("demo",), _add_demo_parser),
    (("check",), _add_check_parser),
    (("tap", "top"), _add_live_parsers),
    (("ca", "cert"), _add_identity_parsers),
    (("policy",), _add_policy_parsers),
    (("audit",), _add_audit_parsers),
    (("apikey",), _add_apikey_parsers),
    (("inject", "webhook"), _add_k8s_parsers),
    (("version",), _add_version_parser),
    (("completion",), _add_completion_parser),
)

# What ``sidecar --help`` says of each command: the help its own parser is added with (the
# same words; tests/test_cli_imports.py compares the two helps). With these the top-level
# help, and the error for a mistyped command, need none of the commands' modules.
SUMMARY: dict[str, str] = {
    "run": "run the sidecar with a config file",
    "demo": "run a self-contained two-sidecar demo on loopback",
    "check": "pre-flight checks of a config (and live checks of a running sidecar)",
    "tap": "print a running sidecar's decisions as they happen",
    "top": "request rates by caller, rule and status, live",
    "ca": "development certificate authority",
    "cert": "workload certificates (X.509-SVIDs)",
    "policy": "check, lint, explain and replay mesh policies",
    "audit": "verify, export and follow the audit trail",
    "apikey": "API keys for service callers",
    "inject": "add the sidecar to Kubernetes manifests (like istioctl kube-inject)",
    "webhook": "serve the Kubernetes mutating admission webhook (HTTPS)",
    "version": "print the version",
    "completion": "print a shell completion script (bash, zsh, fish)",
}


def build_parser(only: str | None = None, *, summary: bool = False) -> argparse.ArgumentParser:
    """The ``sidecar`` parser. With ``only`` a command's name (``main`` passes the first
    argument): just that command's parsers, so that a command imports only its own modules
    -- a running sidecar never imports the CA, policy, audit, replay and Kubernetes tools,
    ``policy check`` not Trio (about a third of its time at 10,000 services, issue 17), and
    ``audit verify`` starts in half the time; with ``--version`` none. Otherwise every
    command, in ``COMMANDS``' order: with ``summary`` as names and ``SUMMARY``'s words only
    (what ``--help``, no command and a mistyped one need: no module imported), else whole
    (``completion``)."""
    from sidecar import __version__

    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Zero-trust service-mesh sidecar: mTLS with SPIFFE identities, JWT, "
                    "YAML micro-segmentation policy, verifiable audit trail.")
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if only == "--version":
        return parser  # it prints and exits as it is parsed: no command needed
    chosen = [add for names, add in COMMANDS if only in names]
    if summary and not chosen:
        for name, words in SUMMARY.items():
            sub.add_parser(name, help=words)
        return parser
    for add in chosen or [add for _names, add in COMMANDS]:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sidecar`` command: parse ``argv`` (default: the process arguments), run the
    subcommand and return its exit status. Ctrl-C gives 130; a reader that went away
    (``... | head``) gives 0, quietly, since what it read was written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None, summary=True)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`sidecar audit export ... | head`): what it wanted was
        # written. Point stdout at /dev/null so the interpreter's final flush is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
