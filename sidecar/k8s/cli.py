"""``sidecar inject`` and ``sidecar webhook``: argument parsing and file handling only.

``sidecar inject -f FILE|- [-o FILE|-]`` reads one or more YAML documents, injects every pod
template it finds (see ``sidecar.k8s.inject``) and writes the documents back in the same
order. Exit codes: 0 ok, 1 a pod breaks an admission rule (the message names it), 2 unreadable
input/usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import yaml

from sidecar.k8s.inject import InjectError, InjectOptions, inject_document
from sidecar.k8s.rules import NAMESPACE_MODES

_DEFAULTS = InjectOptions()


def _address(value: str) -> str:
    from sidecar.config.values import parse_address

    try:
        parse_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_injection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the injected sidecar (shared by ``inject`` and ``webhook``)."""
    parser.add_argument("--image", default=_DEFAULTS.image,
                        help=f"sidecar image (default {_DEFAULTS.image})")
    parser.add_argument("--no-native", dest="native", action="store_false",
                        help="add the sidecar as the first regular container instead of a "
                             "native sidecar (init container with restartPolicy: Always, "
                             "Kubernetes 1.29+)")
    parser.add_argument("--cert-secret", default=None, metavar="NAME",
                        help="mount workload certificates from this Secret (tls.crt, tls.key, "
                             "ca.crt) instead of the csi-driver-spiffe CSI volume")
    parser.add_argument("--policy-configmap", default=_DEFAULTS.policy_configmap,
                        metavar="NAME", help="ConfigMap holding mesh.yaml "
                                             f"(default {_DEFAULTS.policy_configmap})")
    parser.add_argument("--policy-extra-configmap", action="append", default=[],
                        metavar="NAME", help="another ConfigMap of the policy set (e.g. the "
                        "namespace's own sections), mounted with --policy-configmap in one "
                        "directory; optional in the pod's namespace; repeatable")
    parser.add_argument("--config-configmap", default=_DEFAULTS.config_configmap,
                        metavar="NAME", help="ConfigMap holding sidecar.yaml "
                                             f"(default {_DEFAULTS.config_configmap})")
    parser.add_argument("--audit-signing-secret", default=None, metavar="NAME",
                        help="Secret with key.pem (sidecar audit keygen): mounted read-only "
                             "into the sidecar container only, at "
                             "/etc/sidecar/audit-signing (audit.signing_key_file)")
    parser.add_argument("--audit-collector", default=None, metavar="HOST:PORT", type=_address,
                        help="syslog collector for audit.ship (SIDECAR_AUDIT_COLLECTOR, used "
                             "when the sidecar config's audit.ship has no address)")
    parser.add_argument("--allow-config-configmap", action="append", default=[],
                        metavar="NAME", dest="allowed_config_configmaps",
                        help="a ConfigMap a pod may name with the annotation "
                             "sidecar.mesh.dev/config-configmap (repeatable; the default "
                             "--config-configmap is always allowed)")


def inject_options_from_args(args: argparse.Namespace) -> InjectOptions:
    """``InjectOptions`` from the flags of ``add_injection_arguments``."""
    return InjectOptions(
        image=args.image,
        native=args.native,
        cert_secret=args.cert_secret,
        policy_configmap=args.policy_configmap,
        policy_extra_configmaps=tuple(args.policy_extra_configmap),
        config_configmap=args.config_configmap,
        audit_signing_secret=getattr(args, "audit_signing_secret", None),
        audit_collector=getattr(args, "audit_collector", None),
        allowed_config_configmaps=tuple(args.allowed_config_configmaps),
        namespace_mode=getattr(args, "namespace_mode", "enabled"),
    )


def _read(path: str, stdin: TextIO) -> str:
    if path == "-":
        return stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def cmd_inject(args: argparse.Namespace, stdin: TextIO | None = None,
               stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Inject the sidecar into the manifests of ``args.file``; write them to ``args.output``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        text = _read(args.file, stdin)
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except (OSError, UnicodeDecodeError) as exc:
        print(f"sidecar inject: cannot read {args.file}: {exc}", file=stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"sidecar inject: {args.file} is not valid YAML: {exc}", file=stderr)
        return 2
    options = inject_options_from_args(args)
    out: list[Any] = []
    injected = 0
    for index, doc in enumerate(docs):
        try:
            new_doc, count = inject_document(doc, options)
        except InjectError as exc:
            name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc, dict) else "?"
            print(f"sidecar inject: {args.file}: document {index + 1} ({name}): "
                  f"admission rule {exc.rule}: {exc}", file=stderr)
            return 1
        out.append(new_doc)
        injected += count
    rendered = yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False)
    if args.output == "-":
        stdout.write(rendered)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(rendered)
        except OSError as exc:
            print(f"sidecar inject: cannot write {args.output}: {exc}", file=stderr)
            return 2
    print(f"sidecar inject: {injected} pod template(s) injected in {len(out)} document(s)",
          file=stderr)
    return 0


def add_inject_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inject`` under a ``sidecar`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "inject", help="add the sidecar to Kubernetes manifests (like istioctl kube-inject)")
    p.add_argument("-f", "--file", required=True, metavar="FILE",
                   help="manifest file (YAML, multi-document allowed); - for stdin")
    p.add_argument("-o", "--output", default="-", metavar="FILE",
                   help="where to write the result (default -: stdout)")
    p.add_argument("--namespace-mode", choices=sorted(NAMESPACE_MODES), default="enabled",
                   help="the target namespace's mode (its sidecar.mesh.dev/inject label): "
                        "enabled (a pod may opt out with the label) or required (no opt-out; "
                        "hostNetwork pods refused); default enabled")
    add_injection_arguments(p)
    p.set_defaults(func=cmd_inject)
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a whole number >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``webhook`` flags (also used by ``python -m sidecar.k8s.webhook``)."""
    parser.add_argument("--listen", default="0.0.0.0:8443", metavar="ADDR",
                        help="HOST:PORT to serve HTTPS on (default 0.0.0.0:8443)")
    parser.add_argument("--cert", required=True, metavar="FILE",
                        help="serving certificate chain (PEM), e.g. /tls/tls.crt")
    parser.add_argument("--key", required=True, metavar="FILE",
                        help="serving private key (PEM), e.g. /tls/tls.key")
    parser.add_argument("--reload-interval", type=float, default=5.0, metavar="SECONDS",
                        help="how often to check the certificate files for rotation "
                             "(default 5)")
    parser.add_argument("--max-connections-per-source", type=_positive_int, default=64,
                        metavar="N", help="connections one source address may hold open; "
                                          "more are closed at once (default 64)")
    parser.add_argument("--idle-timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                        help="close a keep-alive connection idle this long (default 5)")
    add_injection_arguments(parser)


def add_webhook_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``webhook`` under a ``sidecar`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "webhook", help="serve the Kubernetes mutating admission webhook (HTTPS)")
    add_webhook_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from sidecar.k8s.webhook import cmd_webhook

        return cmd_webhook(args)

    p.set_defaults(func=run)
    return p
