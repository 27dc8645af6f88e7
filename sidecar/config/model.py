"""The sidecar config file -> frozen dataclasses.

``load_config_file(path)`` validates the whole file and raises one ``ConfigError`` listing
every problem with file, line and key path. Relative file paths in the config resolve
against the config file's directory. See docs/config.md for the reference.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from sidecar.config.source import Path, Reader, Source, format_path, parse_yaml, read_yaml_file
from sidecar.config.values import is_loopback, parse_size
from sidecar.identity.spiffe import spiffe_problem

Protocol = Literal["http", "tcp"]


@dataclass(frozen=True)
class IdentityConfig:
    """``identity``: the sidecar's own SVID (cert and key files), its trust domain's bundle,
    how often the files are checked for rotation, and the federated trust domains' bundles.
    File paths are absolute (resolved against the config file's directory)."""

    cert: str
    key: str
    bundle: str  # the bundle of the sidecar's own trust domain (the one in its SVID)
    watch_interval: float = 2.0
    # Federated trust domains: (trust domain, bundle file), each reloaded on its own.
    trust_domains: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Limits:
    """Every wait and every size has a bound. Defaults are safe for production."""

    handshake_timeout: float = 10.0
    header_timeout: float = 15.0  # time to receive a whole request head
    idle_timeout: float = 60.0  # keep-alive idle, client side
    connect_timeout: float = 5.0  # upstream connect (+ handshake on outbound)
    response_timeout: float = 60.0  # upstream response head after the request was sent
    body_timeout: float = 60.0  # max stall between two body chunks, either direction
    tcp_idle_timeout: float = 3600.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_body_bytes: int = 0  # 0 = unlimited (streamed)
    max_connections: int = 1024  # per listener
    max_connections_per_source: int = 256  # per listener and source address
    pool_size: int = 64  # idle upstream connections kept per upstream
    pool_idle_timeout: float = 30.0
    drain_timeout: float = 20.0
    # Connection lifetime (sidecar.net.lifetime): a connection is retired once it is older
    # than max_connection_age minus a random share of max_connection_age_jitter (0 = no
    # limit); a retired HTTP connection ends after its next response (Connection: close),
    # a TCP or upgraded stream, and a request still in flight, after connection_close_grace
    # (a retirement for a loss of trust cuts them at once: sidecar.net.lifetime).
    max_connection_age: float = 3600.0
    max_connection_age_jitter: float | None = None  # None: a tenth of max_connection_age
    connection_close_grace: float = 10.0
    # Refused connections (sidecar/refusals.py): a full audit record and log line each up
    # to this many a second per source address, and across sources; the rest are counted
    # in one summary per source every refused_summary_interval.
    refused_records_per_source: int = 10
    refused_records_per_second: int = 100
    refused_summary_interval: float = 10.0
    # New inbound connections (each a TLS handshake, ~0.8 ms of the sidecar's CPU) per source
    # address a second, as a token bucket of handshake_burst_per_source: the
    # excess is closed at accept, before any TLS byte (sidecar.net.listen.HandshakeRate;
    # refused ``handshake_rate``). 0 = no rate. Per worker process.
    handshakes_per_source_per_second: float = 100.0
    handshake_burst_per_source: int = 200

    @property
    def connection_age_jitter(self) -> float:
        """The effective jitter in seconds: a tenth of ``max_connection_age`` when not configured,
        otherwise the configured value capped at ``max_connection_age`` (a retirement age never goes
        below zero)."""
        if self.max_connection_age_jitter is None:
            return self.max_connection_age / 10
        return min(self.max_connection_age_jitter, self.max_connection_age)


@dataclass(frozen=True)
class InboundConfig:
    """``inbound``: the mTLS listener callers reach and the local app it forwards to.
    ``allow_from`` (SPIFFE IDs) is the access list of a sidecar without a policy; a config
    that gives both is refused (``ALLOW_FROM_WITH_POLICY``)."""

    listen: tuple[str, int]
    app: tuple[str, int]
    protocol: Protocol = "http"
    allow_from: tuple[str, ...] | None = None  # only without a policy (refused with one)
    # ``app_source_address``: the address the connections to the app come from (bound before
    # connecting), so that the app can tell the mesh's callers from its own pod's local
    # clients; None lets the kernel choose (``any``). See ``app_source``.
    app_source: str | None = None


# The default source of the inbound listener's connections to an app on an IPv4 loopback
# address: Istio's choice (its inbound passthrough comes from 127.0.0.6), so that an app that
# trusts 127.0.0.1 as "this pod" does not take every mesh caller for a local one.
DEFAULT_APP_SOURCE_V4 = "127.0.0.6"


def app_source(value: Any, app_host: str) -> str | None | Exception:
    """``inbound.app_source_address`` as configured (absent: ``value`` is None) for the app at
    ``app_host``: an IP address (of the app's family), ``any`` (None: the kernel chooses), or,
    absent, ``DEFAULT_APP_SOURCE_V4`` for an app on an IPv4 loopback address and None
    otherwise (IPv6 has one loopback address only). An Exception names what is wrong."""
    try:
        app_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = \
            ipaddress.ip_address(app_host)
    except ValueError:
        app_ip = None  # a name: resolved when connecting
    if value is None:
        return DEFAULT_APP_SOURCE_V4 if (app_ip is not None and app_ip.version == 4
                                         and app_ip.is_loopback) else None
    if value == "any":
        return None
    if not isinstance(value, str):
        return ValueError("expected an IP address or 'any'")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return ValueError("expected an IP address or 'any'")
    if str(ip) != value or getattr(ip, "scope_id", None):
        return ValueError(f"write the address as {ip.compressed} (no zone, no leading zeros)")
    if ip.is_unspecified or ip.is_multicast:
        return ValueError("expected a unicast address of this host, or 'any'")
    if app_ip is not None and app_ip.version != ip.version:
        return ValueError(f"the app ({app_host}) is IPv{app_ip.version}: so must this be")
    return str(ip)


@dataclass(frozen=True)
class OutboundConfig:
    """One ``outbound`` entry: a plaintext listener for the local app, forwarded over mTLS to
    ``upstream``, which must present the SPIFFE ID ``identity``. ``name`` is unique (default
    ``outbound-N``) and names the listener in logs, metrics and the audit trail."""

    name: str
    listen: tuple[str, int]
    upstream: tuple[str, int]
    identity: str
    protocol: Protocol = "http"


@dataclass(frozen=True)
class AdminConfig:
    """``admin``: the admin server (default ``127.0.0.1:15000``; an empty ``listen`` turns it
    off) and the optional separate health server for probes (off unless ``health_listen`` is
    set), with a per-source connection cap applied to each."""

    listen: tuple[str, int] | None = ("127.0.0.1", 15000)
    health_listen: tuple[str, int] | None = None
    max_connections_per_source: int = 32  # admin and health servers, each


@dataclass(frozen=True)
class HeaderConfig:
    """What happens to caller headers that the catalogue (sidecar.http.untrusted) covers."""

    allow_underscores: bool = False  # keep header names containing "_" (nginx drops them)
    pass_through: tuple[str, ...] = ()  # catalogue names forwarded anyway
    # Run-as query parameters forwarded anyway (sidecar.http.untrusted.RUN_AS_PARAMETERS:
    # the others are refused, 400 run_as_parameter).
    pass_through_parameters: tuple[str, ...] = ()


@dataclass(frozen=True)
class SidecarConfig:
    """The whole validated config file: what ``load_config_file`` returns and reload swaps in.
    ``source`` is the file it came from; ``raw`` keeps the top-level plain values (not compared,
    not shown by ``repr``); ``redacted`` is what may be shown."""

    source: str
    identity: IdentityConfig
    inbound: InboundConfig | None
    outbound: tuple[OutboundConfig, ...]
    policy: str | None  # how the policy is named in logs and status (its paths, joined)
    policy_watch_interval: float
    audit: Any  # sidecar.config.audit.AuditConfig | None
    admin: AdminConfig
    limits: Limits
    workers: int = 1
    log_level: str = "info"
    headers: HeaderConfig = field(default_factory=HeaderConfig)
    policy_paths: tuple[str, ...] = ()  # files and/or directories of one policy (set)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_TOP = {"identity", "inbound", "outbound", "policy", "audit", "admin", "limits", "workers", "log",
        "headers"}
_LIMIT_DURATIONS = {
    "handshake_timeout", "header_timeout", "idle_timeout", "connect_timeout",
    "response_timeout", "body_timeout", "tcp_idle_timeout", "pool_idle_timeout", "drain_timeout",
    "max_connection_age", "max_connection_age_jitter", "connection_close_grace",
    "refused_summary_interval",
}
_LIMIT_SIZES = {"max_header_bytes", "max_body_bytes"}
MIN_HEADER_BYTES, MAX_HEADER_BYTES = 1024, 8 * 1024 * 1024
_LIMIT_COUNTS = {"max_headers", "max_connections", "max_connections_per_source", "pool_size",
                 "refused_records_per_source", "refused_records_per_second",
                 "handshake_burst_per_source"}
_LIMIT_RATES = {"handshakes_per_source_per_second"}  # per second; 0 = off
MAX_LIMIT_RATE = 1_000_000


MAX_TRUST_DOMAINS = 64


def _trust_domains(r: Reader, value: Any) -> tuple[tuple[str, str], ...]:
    """``identity.trust_domains``: federated trust domain -> ``{bundle: file}``."""
    from sidecar.identity.spiffe import parse_spiffe_id

    if value is None:
        return ()
    p: Path = ("identity", "trust_domains")
    if not isinstance(value, dict):
        r.src.problem(p, "expected a mapping of trust domain -> {bundle: file}")
        return ()
    if len(value) > MAX_TRUST_DOMAINS:
        r.src.problem(p, f"at most {MAX_TRUST_DOMAINS} trust domains")
    out: list[tuple[str, str]] = []
    for td, entry in value.items():
        tp = p + (td,)
        try:
            parsed = parse_spiffe_id(f"spiffe://{td}") if isinstance(td, str) else None
        except ValueError as exc:
            r.src.problem(tp, f"not a trust domain name: {exc}")
            continue
        if parsed is None or parsed.path:
            r.src.problem(tp, "not a trust domain name (lower-case letters, digits, . - _)")
            continue
        m = r.fields(entry, tp, {"bundle"})
        bundle = r.file(r.required(m, "bundle", tp), tp + ("bundle",))
        if bundle:
            out.append((td, bundle))
    return tuple(out)


def build_config(raw: Any, src: Source) -> SidecarConfig:
    """Validate parsed values into a ``SidecarConfig``; every problem is collected and raised
    as one ``ConfigError`` naming file, line and key (nothing half-built is returned)."""
    base = os.path.dirname(os.path.abspath(src.filename))
    r = Reader(src, base)
    top = r.fields(raw, (), _TOP)

    ident_val = r.required(top, "identity", ())
    ident_raw = r.fields(ident_val, ("identity",),
                         {"cert", "key", "bundle", "watch_interval", "trust_domains"}
                         ) if ident_val is not None else {}
    identity = IdentityConfig(
        cert=r.file(r.required(ident_raw, "cert", ("identity",)), ("identity", "cert")) or "",
        key=r.file(r.required(ident_raw, "key", ("identity",)), ("identity", "key")) or "",
        bundle=r.file(r.required(ident_raw, "bundle", ("identity",)), ("identity", "bundle")) or "",
        watch_interval=_watch_interval(r, ident_raw, ("identity",)),
        trust_domains=_trust_domains(r, ident_raw.get("trust_domains")),
    )

    inbound = None
    inbound_raw: dict[str, Any] | None = None
    if top.get("inbound") is not None:
        p: Path = ("inbound",)
        m = inbound_raw = r.fields(top["inbound"], p, {"listen", "app", "protocol", "allow_from",
                                                       "app_source_address"})
        allow_from = None
        if "allow_from" in m:
            af = m["allow_from"]
            if not isinstance(af, list):
                src.problem(p + ("allow_from",), "expected a list of SPIFFE IDs")
            else:
                for i, x in enumerate(af):
                    if not isinstance(x, str):
                        src.problem(p + ("allow_from", i), "expected a SPIFFE ID")
                    elif err := spiffe_problem(x, wildcards=True):
                        src.problem(p + ("allow_from", i), err)
                allow_from = tuple(af)
        app = r.address(r.required(m, "app", p), p + ("app",)) or ("", 0)
        source = app_source(m.get("app_source_address"), app[0])
        if "app_source_address" in m and m["app_source_address"] is None:
            source = ValueError("expected an IP address or 'any'")  # (no value: not absent)
        if isinstance(source, Exception):
            src.problem(p + ("app_source_address",), str(source))
            source = None
        inbound = InboundConfig(
            listen=r.address(r.required(m, "listen", p), p + ("listen",)) or ("", 0),
            app=app,
            protocol=r.choice(m.get("protocol"), p + ("protocol",), ("http", "tcp"), "http"),  # type: ignore[arg-type]
            allow_from=allow_from,
            app_source=source,
        )

    outbound: list[OutboundConfig] = []
    ob_raw = top.get("outbound")
    if ob_raw is not None and not isinstance(ob_raw, list):
        src.problem(("outbound",), "expected a list of outbound listeners")
        ob_raw = []
    names: set[str] = set()
    for i, item in enumerate(ob_raw or []):
        p = ("outbound", i)
        m = r.fields(item, p, {"name", "listen", "upstream", "identity", "protocol"})
        if not isinstance(item, dict):
            continue  # reported; an empty mapping gets "is required" for each key
        ident = r.string(r.required(m, "identity", p), p + ("identity",), optional=True) or ""
        if ident and (err := spiffe_problem(ident, wildcards=False)):
            src.problem(p + ("identity",), err)
        name = r.string(m.get("name"), p + ("name",), optional=True) or f"outbound-{i}"
        if not LISTENER_NAME.fullmatch(name):
            # The name is a metric label, a log field and an audit field.
            src.problem(p + ("name",), "names use letters, digits, '.', '_', ':', '-' (at most "
                        "128, starting with a letter or digit)")
        elif name == "inbound":
            src.problem(p + ("name",), "'inbound' is the inbound listener's name")
        elif name in names:
            src.problem(p + ("name",), "duplicate outbound name")
        names.add(name)
        listen = r.address(r.required(m, "listen", p), p + ("listen",)) or ("", 0)
        if listen[0] and not is_loopback(listen[0]):
            # (found by a hostile review: 0.0.0.0 loaded without a word)
            src.problem(p + ("listen",), "an outbound listener takes no credentials and sends "
                        "every request as this workload: it must listen on a loopback address "
                        "(127.0.0.1, ::1 or localhost), where only the local app reaches it")
        outbound.append(OutboundConfig(
            name=name,
            listen=listen,
            upstream=r.address(r.required(m, "upstream", p), p + ("upstream",)) or ("", 0),
            identity=ident,
            protocol=r.choice(m.get("protocol"), p + ("protocol",), ("http", "tcp"), "http"),  # type: ignore[arg-type]
        ))

    if inbound is None and not outbound:
        src.problem((), "configure at least one of: inbound, outbound")

    policy = None
    policy_paths: list[str] = []
    policy_watch = 2.0
    if top.get("policy") is not None:
        pv, pp = top["policy"], cast(Path, ("policy",))
        if isinstance(pv, dict):
            pm = r.fields(pv, ("policy",), {"path", "watch_interval"})
            pv, pp = r.required(pm, "path", ("policy",)), ("policy", "path")
            policy_watch = _watch_interval(r, pm, ("policy",))
        # One file or directory, or a list of them (several ConfigMaps): one policy set.
        if isinstance(pv, list) and pv:
            policy_paths = [f for i, v in enumerate(pv) if (f := r.file(v, pp + (i,)))]
        elif isinstance(pv, list):
            src.problem(pp, "expected a path or a non-empty list of paths")
        elif (f := r.file(pv, pp)) is not None:
            policy_paths = [f]
        policy = ", ".join(policy_paths) or None
        if inbound_raw is not None and "allow_from" in inbound_raw:
            src.problem(("inbound", "allow_from"), ALLOW_FROM_WITH_POLICY)

    audit = None
    if top.get("audit") is not None:
        from sidecar.config.audit import parse_audit_config

        araw = top["audit"]
        if isinstance(araw, dict) and isinstance(araw.get("path"), str):
            araw = dict(araw)
            araw["path"] = r.file(araw["path"], ("audit", "path"))
        audit = parse_audit_config(araw, ("audit",), src)

    admin = AdminConfig()
    if "admin" in top:
        m = r.fields(top["admin"], ("admin",),
                     {"listen", "health_listen", "max_connections_per_source"})
        admin = AdminConfig(
            listen=_optional_address(r, m["listen"], ("admin", "listen"))
            if "listen" in m else AdminConfig.listen,
            health_listen=_optional_address(r, m["health_listen"], ("admin", "health_listen"))
            if "health_listen" in m else None,
            max_connections_per_source=r.positive_int(
                m["max_connections_per_source"], ("admin", "max_connections_per_source"))
            or AdminConfig.max_connections_per_source
            if "max_connections_per_source" in m else AdminConfig.max_connections_per_source,
        )

    _one_listener_per_address(src, inbound, outbound, admin)

    limits_kw: dict[str, Any] = {}
    if "limits" in top:
        known = _LIMIT_DURATIONS | _LIMIT_SIZES | _LIMIT_COUNTS | _LIMIT_RATES
        m = r.fields(top["limits"], ("limits",), known)
        for key, value in m.items():
            p = ("limits", key)
            if key in _LIMIT_DURATIONS:
                v: Any = r.duration(value, p)
                if key == "refused_summary_interval" and v is not None and not 1 <= v <= 3600:
                    src.problem(p, "must be between 1s and 1h")
                    v = None
            elif key in _LIMIT_SIZES:
                try:
                    v = parse_size(value)
                except ValueError as exc:
                    src.problem(p, str(exc))
                    v = None
                if key == "max_header_bytes" and v is not None and not (
                        MIN_HEADER_BYTES <= v <= MAX_HEADER_BYTES):
                    # 0 answered every request with 431 (a hostile review: it loaded).
                    src.problem(p, "must be between 1KiB and 8MiB")
                    v = None
            elif key in _LIMIT_COUNTS:
                v = r.positive_int(value, p)
                if v is not None and (key.startswith("refused_records")
                                      or key == "handshake_burst_per_source") \
                        and v > 1_000_000:
                    src.problem(p, "at most 1000000")
                    v = None
            elif key in _LIMIT_RATES:
                v = r.number(value, p, 0, MAX_LIMIT_RATE,
                             f"expected a number from 0 (no limit) to {MAX_LIMIT_RATE}")
            else:
                continue
            if v is not None:
                limits_kw[key] = v
        age = limits_kw.get("max_connection_age", Limits.max_connection_age)
        if age and (limits_kw.get("max_connection_age_jitter") or 0.0) > age:
            src.problem(("limits", "max_connection_age_jitter"),
                        "must not be larger than max_connection_age")

    workers = 1
    if "workers" in top:
        workers = r.positive_int(top["workers"], ("workers",)) or 1
        if workers > 64:
            src.problem(("workers",), "at most 64")
    log_level = "info"
    if "log" in top:
        m = r.fields(top["log"], ("log",), {"level"})
        log_level = r.choice(m.get("level"), ("log", "level"), ("debug", "info", "warning", "error"), "info")

    headers = HeaderConfig()
    if "headers" in top:
        from sidecar.http.untrusted import pass_through_problem

        p = ("headers",)
        m = r.fields(top["headers"], p, {"allow_underscores", "pass_through",
                                          "pass_through_parameters"})
        allow_us = m.get("allow_underscores", False)
        if not isinstance(allow_us, bool):
            src.problem(p + ("allow_underscores",), "expected true or false")
            allow_us = False
        passed: list[str] = []
        pt = m.get("pass_through", [])
        if not isinstance(pt, list):
            src.problem(p + ("pass_through",), "expected a list of header names")
        else:
            for i, name in enumerate(pt):
                if not isinstance(name, str):
                    src.problem(p + ("pass_through", i), "expected a header name")
                elif err := pass_through_problem(name):
                    src.problem(p + ("pass_through", i), err)
                else:
                    passed.append(name.lower())
        forwarded: list[str] = []
        listed = m.get("pass_through_parameters", [])
        if not isinstance(listed, list):
            src.problem(p + ("pass_through_parameters",),
                        "expected a list of run-as query parameter names")
        else:
            from sidecar.http.untrusted import RUN_AS_PARAMETERS

            for i, name in enumerate(listed):
                if not isinstance(name, str) or name.lower() not in RUN_AS_PARAMETERS:
                    src.problem(p + ("pass_through_parameters", i),
                                f"expected one of {', '.join(RUN_AS_PARAMETERS)} (the run-as "
                                "query parameters the sidecar refuses; others are forwarded "
                                "already)")
                else:
                    forwarded.append(name.lower())
        headers = HeaderConfig(allow_underscores=allow_us, pass_through=tuple(passed),
                               pass_through_parameters=tuple(forwarded))

    src.raise_if_problems()
    return SidecarConfig(
        source=src.filename, identity=identity, inbound=inbound, outbound=tuple(outbound),
        policy=policy, policy_paths=tuple(policy_paths), policy_watch_interval=policy_watch, audit=audit, admin=admin,
        limits=Limits(**limits_kw), workers=workers, log_level=log_level, headers=headers,
        raw=top,
    )


# ``inbound.allow_from`` beside ``policy``: the policy alone decides who gets in, so the list
# would be ignored -- and was, without a word, while its author took it for the caller
# allow-list (ghostunnel's ``--allow-uri``, its model, is always enforced): a caller outside it
# was served whenever a rule let it in (found by a hostile review, session 29). Refused at load
# (``check``, ``run --check``, the start and a reload), at the key's line.
ALLOW_FROM_WITH_POLICY = (
    "ignored when a policy is set (the policy alone decides who gets in): move these callers "
    "into the policy -- a `from` condition on its allow rules -- and remove allow_from")

# An outbound listener's name: a metric label, a log and audit field (like a policy rule's).
LISTENER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Polling faster re-reads (and hashes) the watched files without pause: a reload storm.
MIN_WATCH_INTERVAL = 0.1
_ANY_HOST = ("", "0.0.0.0", "::")


def _optional_address(r: Reader, value: Any, path: Path) -> tuple[str, int] | None:
    """``admin.listen`` / ``admin.health_listen``: an address, or ``""`` (a quoted empty
    string) for "off". Any other value that is not an address -- ``0``, ``false``, ``[]``,
    ``{}`` -- is refused: each used to switch the server off silently (a null is refused
    while the file is read, ``source.NULL_PROBLEM``)."""
    if isinstance(value, str) and not value:
        return None
    return r.address(value, path)


def _watch_interval(r: Reader, m: dict[str, Any], path: Path) -> float:
    """``m["watch_interval"]`` (default 2 s); at least ``MIN_WATCH_INTERVAL``, ``0`` included
    (it used to mean the default, silently)."""
    if "watch_interval" not in m:
        return 2.0
    value = r.duration(m["watch_interval"], path + ("watch_interval",))
    if value is not None and value < MIN_WATCH_INTERVAL:
        r.problem(path + ("watch_interval",), "at least 100ms (a shorter poll re-reads the "
                  "files without pause)")
    return value or 2.0


def _address_key(host: str) -> str:
    """A listening host as compared: an IP address in one spelling (``[0::1]`` is ``::1``,
    ``[0:0::0]`` is ``::``), a name lower-cased."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower()


def _one_listener_per_address(src: Source, inbound: InboundConfig | None,
                              outbound: list[OutboundConfig], admin: AdminConfig) -> None:
    """Two listeners on one address (a wildcard host covers every address of its port) cannot
    both start: refused here, by ``run --check`` and ``check``, not first at the start."""
    seen: list[tuple[Path, tuple[str, int]]] = []
    listeners: list[tuple[Path, tuple[str, int] | None]] = [
        (("inbound", "listen"), inbound.listen if inbound else None),
        *((("outbound", i, "listen"), ob.listen) for i, ob in enumerate(outbound)),
        (("admin", "listen"), admin.listen), (("admin", "health_listen"), admin.health_listen)]
    for path, addr in listeners:
        if addr is None or not addr[1]:
            continue  # absent, or port 0: the system picks a free port
        addr = (_address_key(addr[0]), addr[1])
        for other, (host, port) in seen:
            if port == addr[1] and (host == addr[0] or host in _ANY_HOST
                                    or addr[0] in _ANY_HOST):
                src.problem(path, f"the same address as {format_path(other)}: two listeners "
                            "cannot share one")
                break
        seen.append((path, addr))


# Values built from a config file: a real one holds a few hundred (found by a hostile review:
# an 8 MiB list took 17 s and 630 MiB to refuse; now reading stops at the bound).
MAX_CONFIG_VALUES = 100_000
CONFIG_VALUES = (MAX_CONFIG_VALUES, f"more than {MAX_CONFIG_VALUES:,} values in a config file: "
                 "reading stopped here")


def load_config(text: str | bytes, filename: str) -> SidecarConfig:
    """Parse and validate config text; ``filename`` names it in errors and anchors relative
    paths."""
    raw, src = parse_yaml(text, filename, max_values=CONFIG_VALUES)
    return build_config(raw, src)


def load_config_file(path: str) -> SidecarConfig:
    """Read (size-capped), parse and validate a config file; an unreadable or invalid file is a
    ``ConfigError`` naming it."""
    raw, src = read_yaml_file(path, CONFIG_VALUES)
    return build_config(raw, src)


def redacted(cfg: SidecarConfig) -> dict[str, Any]:
    """The effective config for ``/config``: plain values, nothing secret.

    The config holds file *paths* only, never key material; the audit HMAC key file path is
    shown, its content never is.
    """
    import dataclasses

    out = dataclasses.asdict(cfg)
    out.pop("raw", None)
    return out
