"""The flags of ``sidecar inject`` and ``sidecar webhook``, and the options they make.

Shared by ``sidecar.k8s.cli`` (the ``sidecar`` subcommands) and ``sidecar.k8s.webhook``
(``python -m sidecar.k8s.webhook``), so that neither imports the other's command code.
"""

from __future__ import annotations

import argparse
import re

from sidecar.cli import seconds
from sidecar.k8s.inject import InjectOptions

_DEFAULTS = InjectOptions()


def _address(value: str) -> str:
    from sidecar.config.values import parse_address

    try:
        parse_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


# Dots a relative collector host needs: as many as a Service's full name,
# NAME.NAMESPACE.svc.cluster.local. A pod's resolver (ndots:5, the search list
# <namespace>.svc.<domain> svc.<domain> <domain>) tries a name with fewer dots under the
# search domains first, and a tenant can answer there: "siem.logging" is first asked as
# siem.logging.<tenant>.svc.cluster.local, which a headless Service "logging" and a pod with
# hostname "siem" and subdomain "logging" create. A single label is also what the kubelet
# writes for the pod itself into every container's /etc/hosts ("<podIP> <hostname>").
COLLECTOR_MIN_DOTS = 4


def collector_host_problem(host: str) -> str | None:
    """Why a pod could make the collector ``host`` (``parse_address``'s host) resolve to an
    address of its choosing (a tenant's pod or Service), or None: an IP address, a name with
    a trailing dot (absolute: no search list) of two labels or more, or a relative name with
    ``COLLECTOR_MIN_DOTS`` dots or more. Found by a hostile review (session 29): with
    ``--audit-collector siem:6514`` a pod whose hostname was ``siem`` received the audit
    trail of its own sidecar."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    absolute = host.endswith(".")
    dots = host.rstrip(".").count(".")
    if dots == 0:
        return ("a single label, which any pod can make its own name in its containers' "
                "/etc/hosts (its hostname) or its namespace's DNS (a Service)")
    if not absolute and dots < COLLECTOR_MIN_DOTS:
        return (f"a relative name of {dots + 1} labels, which a pod's resolver first looks "
                "up under the pod's own namespace, where a tenant can create it")
    return None


def collector_address(value: str) -> str:
    """The argparse type of ``--audit-collector``: ``HOST:PORT`` whose host no pod can make
    resolve to itself (``collector_host_problem``): a usage error (exit 2) here, not a
    webhook that hands every tenant the audit trail."""
    from sidecar.config.values import parse_address

    _address(value)
    host = parse_address(value)[0]
    why = collector_host_problem(host)
    if why is not None:
        raise argparse.ArgumentTypeError(
            f"{_shown(value)}: the host is {why}; name the collector by the full name of its "
            "Service (NAME.NAMESPACE.svc.cluster.local), a name ending in '.', or an IP "
            "address")
    return value


# A Secret's or ConfigMap's name: a DNS subdomain (RFC 1123), as the API server requires.
_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
MAX_OBJECT_NAME = 253
MAX_IMAGE = 4096


def object_name(value: str) -> str:
    """The argparse type of the Secret and ConfigMap flags: a name the API server takes (a
    DNS subdomain: lower-case letters, digits, '-' and '.', at most 253 characters). An
    empty value (``--audit-signing-secret "$UNSET"``) or a typo is a usage error (exit 2)
    here, not a manifest or a patch the API server refuses for every pod later -- or, for
    an empty ``--cert-secret`` / ``--audit-signing-secret``, silently no Secret at all."""
    if len(value) > MAX_OBJECT_NAME or not _OBJECT_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{_shown(value)} is not a Kubernetes object name (lower-case letters, digits, "
            f"'-' and '.', starting and ending with a letter or digit, at most "
            f"{MAX_OBJECT_NAME} characters)")
    return value


def image_reference(value: str) -> str:
    """The argparse type of ``--image``: a non-empty reference of printable ASCII without
    spaces (at most 4,096 characters); the registry has the last word on the rest."""
    if not value or len(value) > MAX_IMAGE or not all("!" <= c <= "~" for c in value):
        raise argparse.ArgumentTypeError(
            f"{_shown(value)} is not an image reference (printable ASCII, no spaces, "
            f"1 to {MAX_IMAGE} characters)")
    return value


def _shown(value: str) -> str:
    from sidecar.output import safe

    return "'" + safe(value[:80]) + ("...'" if len(value) > 80 else "'")


def add_injection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the injected sidecar (shared by ``inject`` and ``webhook``)."""
    parser.add_argument("--image", default=_DEFAULTS.image, type=image_reference,
                        help=f"sidecar image (default {_DEFAULTS.image})")
    parser.add_argument("--no-native", dest="native", action="store_false",
                        help="add the sidecar as the first regular container instead of a "
                             "native sidecar (init container with restartPolicy: Always, "
                             "Kubernetes 1.29+)")
    parser.add_argument("--cert-secret", default=None, metavar="NAME", type=object_name,
                        help="mount workload certificates from this Secret (tls.crt, tls.key, "
                             "ca.crt) instead of the csi-driver-spiffe CSI volume")
    parser.add_argument("--policy-configmap", default=_DEFAULTS.policy_configmap, type=object_name,
                        metavar="NAME", help="ConfigMap holding mesh.yaml "
                                             f"(default {_DEFAULTS.policy_configmap})")
    parser.add_argument("--policy-extra-configmap", action="append", default=[], type=object_name,
                        metavar="NAME", help="another ConfigMap of the policy set (e.g. the "
                        "namespace's own sections), mounted with --policy-configmap in one "
                        "directory; optional in the pod's namespace; repeatable")
    parser.add_argument("--config-configmap", default=_DEFAULTS.config_configmap, type=object_name,
                        metavar="NAME", help="ConfigMap holding sidecar.yaml "
                                             f"(default {_DEFAULTS.config_configmap})")
    parser.add_argument("--audit-signing-secret", default=None, metavar="NAME", type=object_name,
                        help="Secret with key.pem (sidecar audit keygen): mounted read-only "
                             "into the sidecar container only, at "
                             "/etc/sidecar/audit-signing (audit.signing_key_file)")
    parser.add_argument("--audit-data-key-secret", default=None, metavar="NAME",
                        type=object_name,
                        help="Secret with key.data (sidecar audit keygen --data-key): mounted "
                             "read-only into the sidecar container only, at "
                             "/etc/sidecar/audit-data-key (audit.encryption_key_file)")
    parser.add_argument("--audit-collector", default=None, metavar="HOST:PORT",
                        type=collector_address,
                        help="syslog collector for audit.ship (SIDECAR_AUDIT_COLLECTOR, used "
                             "when the sidecar config's audit.ship has no address)")
    parser.add_argument("--allow-config-configmap", action="append", default=[], type=object_name,
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
        audit_data_key_secret=getattr(args, "audit_data_key_secret", None),
        audit_collector=getattr(args, "audit_collector", None),
        allowed_config_configmaps=tuple(args.allowed_config_configmaps),
        namespace_mode=getattr(args, "namespace_mode", "enabled"),
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a whole number >= 1")
    return value


def add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``webhook`` flags (also used by ``python -m sidecar.k8s.webhook``)."""
    parser.add_argument("--listen", default="0.0.0.0:8443", metavar="ADDR",
                        help="HOST:PORT to serve HTTPS on (default 0.0.0.0:8443)")
    parser.add_argument("--cert", required=True, metavar="FILE",
                        help="serving certificate chain (PEM), e.g. /tls/tls.crt")
    parser.add_argument("--key", required=True, metavar="FILE",
                        help="serving private key (PEM), e.g. /tls/tls.key")
    parser.add_argument("--reload-interval", type=seconds, default=5.0, metavar="SECONDS",
                        help="how often to check the certificate files for rotation "
                             "(default 5)")
    parser.add_argument("--max-connections-per-source", type=_positive_int, default=64,
                        metavar="N", help="connections one source address may hold open; "
                                          "more are closed at once (default 64)")
    parser.add_argument("--idle-timeout", type=seconds, default=5.0, metavar="SECONDS",
                        help="close a keep-alive connection idle this long (default 5)")
    add_injection_arguments(parser)
