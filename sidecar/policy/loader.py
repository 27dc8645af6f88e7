"""Mesh policy YAML -> validated, compiled, immutable ``Policy``.

The loader walks the plain values from ``sidecar.config.source.parse_yaml`` and reports
every problem it finds (file, line, key path) before raising one ``ConfigError``: a person
fixing a policy should see all the mistakes in one run. Unknown keys are errors, empty
lists are errors (omit the key to mean "anything"), and references to JWT providers or
API keys that the file does not define are errors, because each of those is a rule that
silently does something other than what its author meant.

Loading is pure apart from ``read_policy_set`` reading the policy's files (one file, or
the files of directories: a policy set, see "entry points" below): no clock, no network, no
other files (``jwks_file`` paths are resolved against the defining file's directory but not
opened). The result is safe to build in a reload task and swap in atomically.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import hashlib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime
from types import MappingProxyType
from typing import Any, Literal, cast

from sidecar.config.source import MAX_DOCUMENT_BYTES, Source, format_path, gc_paused, parse_yaml
from sidecar.errors import BadRequest, ConfigError, Problem
from sidecar.policy.compiled import Section, compile_section
from sidecar.policy.model import (
    ClaimCondition,
    ClaimOp,
    Conditions,
    EgressEntry,
    JwtCondition,
    Mode,
    Policy,
    Rule,
    ServicePolicy,
)
from sidecar.policy.paths import normalise_target
from sidecar.policy.sections import (
    DEFAULT_TOKEN_LOCATIONS,
    AlertRule,
    ApiKey,
    Introspection,
    JwtProvider,
    PolicyExtras,
    RateLimit,
    Revocation,
    TokenLocation,
)

P = tuple[str | int, ...]

TOP_KEYS = frozenset(
    {"version", "revision", "trust_domain", "mode", "jwt_providers", "revocations", "api_keys",
     "rate_limits", "alerts", "services"}
)
SERVICE_KEYS = frozenset({"rules", "egress", "mode", "non_ascii_paths", "audience", "path_case"})
RULE_KEYS = frozenset({"name", "description", "allow", "deny", "mode", "expires_at"})
CONDITION_KEYS = frozenset(
    {"from", "namespaces", "methods", "paths", "ports", "listeners", "hosts", "jwt", "apikey"}
)
PROVIDER_KEYS = frozenset(
    {"issuer", "audiences", "algorithms", "jwks_file", "jwks_uri", "jwks_ca", "jwks_refresh",
     "jwks_min_refetch", "clock_skew", "required_claims", "max_lifetime", "from_headers",
     "from_params", "from_cookies", "forward_claims", "forward_token", "max_token_bytes",
     "discovery", "typ", "cert_binding", "forward_query_token", "introspection"}
)
ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# Headers a forwarded claim may never overwrite: framing, routing and the sidecar's own.
FORBIDDEN_FORWARD_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade",
     "authorization", "cookie", "x-forwarded-client-cert", "x-api-key", "proxy-authorization",
     "keep-alive", "trailer"}
)

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_ID_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))
MAX_ID_LENGTH = 2048


@functools.lru_cache(maxsize=8192)  # identities repeat across a mesh's rules and egress lists
def spiffe_problem(value: str, *, wildcards: bool) -> str | None:
    """Why ``value`` is not a valid SPIFFE ID (or pattern, with ``wildcards``), or None."""
    if len(value) > MAX_ID_LENGTH:
        return "SPIFFE ID is too long"
    if not value.startswith("spiffe://"):
        return "expected a SPIFFE ID like spiffe://trust.domain/ns/NAMESPACE/sa/ACCOUNT"
    segments = value[len("spiffe://"):].split("/")
    if not _TRUST_DOMAIN.match(segments[0]):
        if "*" in segments[0]:
            return "the trust domain cannot be a wildcard"
        return "invalid trust domain (lower-case letters, digits, '.', '-', '_')"
    for seg in segments[1:]:
        if seg == "*" and wildcards:
            continue
        if "*" in seg:
            if wildcards:
                return "'*' must be a whole segment (one segment; no regular expressions)"
            return "wildcards are not allowed here"
        if seg in ("", ".", "..") or not _ID_SEGMENT.match(seg):
            return f"invalid SPIFFE ID path segment {seg!r}"
    return None


def parse_duration(value: object) -> float:
    """``30`` / ``"30s"`` / ``"250ms"`` / ``"5m"`` / ``"1h"`` / ``"1d"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m or 1h")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError("a duration must be a finite number >= 0")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError("expected a duration like 30s, 5m or 1h")


def parse_timestamp(value: object) -> float:
    """An RFC 3339 timestamp with a time zone (YAML may already have parsed it) -> unix time."""
    if isinstance(value, datetime):
        stamp = value
    elif isinstance(value, date):
        raise ValueError("expected a timestamp with time and zone, e.g. 2030-01-31T18:00:00Z")
    elif isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                "expected an RFC 3339 timestamp, e.g. 2030-01-31T18:00:00Z"
            ) from None
    else:
        raise ValueError("expected an RFC 3339 timestamp, e.g. 2030-01-31T18:00:00Z")
    if stamp.tzinfo is None:
        raise ValueError("the timestamp needs a time zone (Z or +HH:MM)")
    return stamp.timestamp()


@functools.lru_cache(maxsize=8192)  # patterns like /admin/** repeat in every section
def normalise_path_pattern(pattern: str) -> str:
    """A policy path pattern in the same normal form as request paths, or ValueError."""
    if not pattern.startswith("/"):
        raise ValueError("a path pattern starts with '/'")
    if "?" in pattern or "#" in pattern:
        raise ValueError("a path pattern cannot contain '?' or '#' (queries are never matched)")
    segments = pattern.split("/")[1:]
    for i, seg in enumerate(segments):
        if "*" in seg and seg not in ("*", "**"):
            raise ValueError("'*' and '**' must be whole segments (no regular expressions)")
        if seg == "**" and i != len(segments) - 1:
            raise ValueError("'**' is only allowed as the last segment")
    from urllib.parse import quote

    raw = quote(pattern, safe=_PATH_SAFE).encode("ascii")
    try:
        path, _ = normalise_target(raw, allow_non_ascii=True)
    except BadRequest as exc:
        raise ValueError(f"not a valid normalised path ({exc.reason})") from None
    return path


class _Reader:
    """Typed accessors that report problems instead of raising."""

    def __init__(self, src: Source) -> None:
        self.src = src

    def problem(self, path: P, message: str) -> None:
        self.src.problem(path, message)

    def mapping(self, value: Any, path: P, known: frozenset[str] | None) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(path, "expected a mapping")
            return None
        if known is not None:
            for key in value:
                if key not in known:
                    self.problem(path + (key,), f"unknown key (known: {', '.join(sorted(known))})")
        return value

    def string(self, value: Any, path: P) -> str | None:
        if not isinstance(value, str) or not value:
            self.problem(path, "expected a non-empty string")
            return None
        return value

    def string_list(self, value: Any, path: P) -> list[tuple[str, P]] | None:
        if not isinstance(value, list):
            self.problem(path, "expected a list")
            return None
        if not value:
            self.problem(path, "empty list never matches; omit the key to match anything")
            return None
        out: list[tuple[str, P]] = []
        for i, item in enumerate(value):
            s = self.string(item, path + (i,))
            if s is not None:
                out.append((s, path + (i,)))
        return out

    def duration(self, value: Any, path: P) -> float | None:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return None

    def timestamp(self, value: Any, path: P) -> float | None:
        try:
            return parse_timestamp(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return None

    def integer(self, value: Any, path: P, lo: int, hi: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.problem(path, f"expected a whole number from {lo} to {hi}")
            return None
        return value

    def mode(self, value: Any, path: P) -> Mode | None:
        if value not in ("enforce", "dry-run"):
            self.problem(path, "expected enforce or dry-run")
            return None
        return cast(Mode, value)

    def name(self, value: Any, path: P) -> str | None:
        s = self.string(value, path)
        if s is not None and not _NAME.match(s):
            self.problem(path, "names use letters, digits, '.', '_', ':', '-' (at most 128)")
            return None
        return s


# --- non-rule sections ----------------------------------------------------------------


def _provider(r: _Reader, name: str, value: Any, path: P, base_dir: str) -> JwtProvider | None:
    m = r.mapping(value, path, PROVIDER_KEYS)
    if m is None:
        return None
    ok = True
    issuer = r.string(m.get("issuer"), path + ("issuer",))
    aud_raw = m.get("audiences")
    # Omitted: the receiving service's audience (its `audience`, else its SPIFFE ID).
    audiences: list[tuple[str, P]] | None = []
    if aud_raw is not None:
        audiences = r.string_list([aud_raw] if isinstance(aud_raw, str) else aud_raw,
                                  path + ("audiences",))
    algs: list[tuple[str, P]] | None = []
    if "algorithms" in m or "introspection" not in m:  # opaque tokens carry no algorithm
        algs = r.string_list(m.get("algorithms"), path + ("algorithms",))
    if algs is not None:
        for alg, apath in algs:
            if alg.lower() == "none":
                r.problem(apath, "'none' is never accepted: tokens must be signed")
                ok = False
            elif alg.upper().startswith("HS"):
                r.problem(apath, "HMAC algorithms are not accepted; use a public-key algorithm")
                ok = False
            elif alg not in ALGORITHMS:
                r.problem(apath, f"unknown algorithm (known: {', '.join(sorted(ALGORITHMS))})")
                ok = False
    jwks_file = m.get("jwks_file")
    jwks_uri = m.get("jwks_uri")
    jwks_ca = m.get("jwks_ca")
    discovery = m.get("discovery")
    intro_raw = m.get("introspection")
    sources = [k for k in ("jwks_file", "jwks_uri", "discovery", "introspection")
               if m.get(k) not in (None, False)]
    if len(sources) != 1:
        r.problem(path, "set exactly one of jwks_file, jwks_uri, discovery or introspection")
        ok = False
    if jwks_file is not None:
        f = r.string(jwks_file, path + ("jwks_file",))
        jwks_file = os.path.normpath(os.path.join(base_dir, f)) if f else None
        if jwks_ca is not None:
            r.problem(path + ("jwks_ca",), "jwks_ca only applies to jwks_uri and discovery")
            ok = False
    if jwks_uri is not None:
        u = r.string(jwks_uri, path + ("jwks_uri",))
        if u is not None and not u.startswith("https://"):
            r.problem(path + ("jwks_uri",), "jwks_uri must be an https:// URL")
            ok = False
    discovery_url = None
    if discovery is not None and discovery is not False:
        # true: the OpenID Connect location under the issuer; a string: that URL (e.g. the
        # RFC 8414 form https://host/.well-known/oauth-authorization-server/path).
        if discovery is True:
            if isinstance(issuer, str) and issuer.startswith("https://"):
                discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
            else:
                r.problem(path + ("discovery",), "discovery: true needs an https:// issuer")
                ok = False
        elif isinstance(discovery, str) and discovery.startswith("https://"):
            discovery_url = discovery
        else:
            r.problem(path + ("discovery",), "expected true or an https:// metadata URL")
            ok = False
    if jwks_ca is not None and intro_raw is not None:
        r.problem(path + ("jwks_ca",), "jwks_ca only applies to jwks_uri and discovery; "
                  "use introspection.ca")
        ok = False
    if jwks_ca is not None:
        ca = r.string(jwks_ca, path + ("jwks_ca",))
        jwks_ca = os.path.normpath(os.path.join(base_dir, ca)) if ca else None
    introspection = None
    if intro_raw is not None:
        introspection = _introspection(r, intro_raw, path + ("introspection",), base_dir)
        ok = ok and introspection is not None
    typ = None
    if "typ" in m:
        typ = r.string(m["typ"], path + ("typ",))
        if typ is None:
            ok = False
        elif intro_raw is not None:
            r.problem(path + ("typ",), "typ applies to JWTs, not to introspected tokens")
            ok = False
    if "cert_binding" in m:
        if m["cert_binding"] not in ("if_present", "required"):
            r.problem(path + ("cert_binding",), "expected if_present or required")
            ok = False
    for key in ("forward_query_token",):
        if key in m and not isinstance(m[key], bool):
            r.problem(path + (key,), "expected true or false")
            ok = False

    kwargs: dict[str, Any] = {}
    for key, field_name in (("jwks_refresh", "jwks_refresh_seconds"),
                            ("jwks_min_refetch", "jwks_min_refetch_seconds"),
                            ("clock_skew", "clock_skew_seconds"),
                            ("max_lifetime", "max_lifetime_seconds")):
        if key in m:
            d = r.duration(m[key], path + (key,))
            if d is None:
                ok = False
            kwargs[field_name] = d
    if "required_claims" in m:
        rc = m["required_claims"]
        if isinstance(rc, list) and all(isinstance(c, str) and c for c in rc):
            kwargs["required_claims"] = tuple(rc)
        else:
            r.problem(path + ("required_claims",), "expected a list of claim names")
            ok = False
    if "max_token_bytes" in m:
        kwargs["max_token_bytes"] = r.integer(m["max_token_bytes"], path + ("max_token_bytes",),
                                              256, 65536)
        ok = ok and kwargs["max_token_bytes"] is not None
    if "forward_token" in m:
        if not isinstance(m["forward_token"], bool):
            r.problem(path + ("forward_token",), "expected true or false")
            ok = False
        kwargs["forward_token"] = m["forward_token"]

    locations: list[TokenLocation] = []
    if "from_headers" in m:
        hp = path + ("from_headers",)
        items = m["from_headers"]
        if not isinstance(items, list) or not items:
            r.problem(hp, "expected a non-empty list of header names or {name, prefix}")
            ok = False
            items = []
        for i, item in enumerate(items):
            ip = hp + (i,)
            if isinstance(item, str):
                hname, prefix = item, ""
            elif isinstance(item, dict) and r.mapping(item, ip, frozenset({"name", "prefix"})):
                hname, prefix = str(item.get("name", "")), item.get("prefix", "")
                if not isinstance(prefix, str):
                    r.problem(ip + ("prefix",), "expected a string")
                    ok = False
                    continue
            else:
                r.problem(ip, "expected a header name or {name, prefix}")
                ok = False
                continue
            if not isinstance(hname, str) or not _TOKEN.match(hname):
                r.problem(ip, "invalid header name")
                ok = False
                continue
            locations.append(TokenLocation("header", hname.lower(), prefix))
    for key, kind in (("from_params", "query"), ("from_cookies", "cookie")):
        if key in m:
            names = r.string_list(m[key], path + (key,))
            if names is None:
                ok = False
                continue
            for n, _ in names:
                locations.append(TokenLocation(cast(Literal["query", "cookie"], kind), n))
    if "forward_claims" in m:
        fp = path + ("forward_claims",)
        fc = r.mapping(m["forward_claims"], fp, None)
        pairs: list[tuple[str, str]] = []
        for claim, header in (fc or {}).items():
            if not isinstance(header, str) or not _TOKEN.match(header):
                r.problem(fp + (claim,), "expected a header name")
                ok = False
            elif header.lower() in FORBIDDEN_FORWARD_HEADERS:
                r.problem(fp + (claim,), f"a claim cannot be forwarded as {header.lower()}")
                ok = False
            else:
                pairs.append((claim, header.lower()))
        kwargs["forward_claims"] = tuple(pairs)
        if fc is None:
            ok = False
    if not ok or issuer is None or audiences is None or algs is None:
        return None
    return JwtProvider(
        name=name,
        issuer=issuer,
        audiences=tuple(a for a, _ in audiences),
        algorithms=tuple(a for a, _ in algs),
        jwks_file=jwks_file,
        jwks_uri=jwks_uri,
        jwks_ca=jwks_ca,
        locations=tuple(locations) or DEFAULT_TOKEN_LOCATIONS,
        discovery_url=discovery_url,
        typ=typ,
        cert_binding=m.get("cert_binding", "if_present"),
        forward_query_token=m.get("forward_query_token", False),
        introspection=introspection,
        **kwargs,
    )


INTROSPECTION_KEYS = frozenset(
    {"endpoint", "ca", "client_id", "client_secret_file", "mtls", "cache_ttl", "negative_ttl",
     "timeout", "max_concurrent"}
)


def _introspection(r: _Reader, value: Any, path: P, base_dir: str) -> Introspection | None:
    m = r.mapping(value, path, INTROSPECTION_KEYS)
    if m is None:
        return None
    ok = True
    endpoint = r.string(m.get("endpoint"), path + ("endpoint",))
    if endpoint is not None and not endpoint.startswith("https://"):
        r.problem(path + ("endpoint",), "endpoint must be an https:// URL")
        ok = False
    client_id = r.string(m.get("client_id"), path + ("client_id",))
    secret = m.get("client_secret_file")
    mtls = m.get("mtls", False)
    if not isinstance(mtls, bool):
        r.problem(path + ("mtls",), "expected true or false")
        ok = False
    if (secret is None) == (mtls is not True):
        r.problem(path, "set exactly one of client_secret_file or mtls: true")
        ok = False
    kw: dict[str, Any] = {}
    if secret is not None:
        f = r.string(secret, path + ("client_secret_file",))
        kw["client_secret_file"] = os.path.normpath(os.path.join(base_dir, f)) if f else None
        ok = ok and f is not None
    if "ca" in m:
        ca = r.string(m["ca"], path + ("ca",))
        kw["ca"] = os.path.normpath(os.path.join(base_dir, ca)) if ca else None
        ok = ok and ca is not None
    for key, field_name in (("cache_ttl", "cache_ttl_seconds"),
                            ("negative_ttl", "negative_ttl_seconds"),
                            ("timeout", "timeout_seconds")):
        if key in m:
            d = r.duration(m[key], path + (key,))
            ok = ok and d is not None
            kw[field_name] = d
    if "max_concurrent" in m:
        kw["max_concurrent"] = r.integer(m["max_concurrent"], path + ("max_concurrent",), 1, 256)
        ok = ok and kw["max_concurrent"] is not None
    if not ok or endpoint is None or client_id is None:
        return None
    return Introspection(endpoint=endpoint, client_id=client_id, mtls=mtls is True, **kw)


def _revocations(r: _Reader, value: Any, path: P) -> tuple[Revocation, ...]:
    if not isinstance(value, list):
        r.problem(path, "expected a list")
        return ()
    out: list[Revocation] = []
    for i, item in enumerate(value):
        ip = path + (i,)
        m = r.mapping(item, ip, frozenset({"jti", "sub", "until", "note"}))
        if m is None:
            continue
        if "jti" not in m and "sub" not in m:
            r.problem(ip, "a revocation needs jti or sub")
            continue
        jti = r.string(m["jti"], ip + ("jti",)) if "jti" in m else None
        sub = r.string(m["sub"], ip + ("sub",)) if "sub" in m else None
        until = r.timestamp(m["until"], ip + ("until",)) if "until" in m else None
        out.append(Revocation(jti=jti, sub=sub, until=until))
    return tuple(out)


def _api_keys(r: _Reader, value: Any, path: P) -> tuple[ApiKey, ...]:
    if not isinstance(value, list):
        r.problem(path, "expected a list")
        return ()
    out: list[ApiKey] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        ip = path + (i,)
        m = r.mapping(item, ip, frozenset({"name", "sha256", "expires_at"}))
        if m is None:
            continue
        name = r.name(m.get("name"), ip + ("name",))
        digest = m.get("sha256")
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            r.problem(ip + ("sha256",), "expected the key's SHA-256 as 64 hex digits")
            digest = None
        expires = r.timestamp(m["expires_at"], ip + ("expires_at",)) if "expires_at" in m else None
        if name is not None and name in seen:
            r.problem(ip + ("name",), f"API key {name!r} is defined twice")
            continue
        if name is not None and digest is not None:
            seen.add(name)
            out.append(ApiKey(name=name, sha256=digest.lower(), expires_at=expires))
    return tuple(out)


def _rate_limits(r: _Reader, value: Any, path: P) -> tuple[RateLimit, ...]:
    if not isinstance(value, list):
        r.problem(path, "expected a list")
        return ()
    out: list[RateLimit] = []
    for i, item in enumerate(value):
        ip = path + (i,)
        m = r.mapping(item, ip, frozenset({"name", "rate", "burst", "per", "services"}))
        if m is None:
            continue
        name = r.name(m.get("name"), ip + ("name",))
        raw = m.get("rate")
        rate: float | None = None
        if isinstance(raw, int | float) and not isinstance(raw, bool) and raw > 0:
            rate = float(raw)
        elif isinstance(raw, str) and (rm := _RATE.match(raw)) and float(rm.group(1)) > 0:
            rate = float(rm.group(1)) / _RATE_UNITS[rm.group(2)]
        else:
            r.problem(ip + ("rate",), "expected requests per second > 0, or like 100/s, 30/m")
        burst = (r.integer(m["burst"], ip + ("burst",), 1, 1_000_000) if "burst" in m
                 else max(1, math.ceil(rate or 1)))
        per = m.get("per", "peer")
        if per not in ("peer", "apikey", "subject"):
            r.problem(ip + ("per",), "expected peer, apikey or subject")
            per = None
        services: list[str] = []
        if "services" in m:
            for sid, sp in r.string_list(m["services"], ip + ("services",)) or []:
                why = spiffe_problem(sid, wildcards=False)
                if why:
                    r.problem(sp, why)
                else:
                    services.append(sid)
        if name and rate is not None and burst is not None and per is not None:
            out.append(RateLimit(name, rate, burst, per, tuple(services)))
    return tuple(out)


def _alerts(r: _Reader, value: Any, path: P) -> tuple[AlertRule, ...]:
    if not isinstance(value, list):
        r.problem(path, "expected a list")
        return ()
    out: list[AlertRule] = []
    for i, item in enumerate(value):
        ip = path + (i,)
        m = r.mapping(item, ip, frozenset({"name", "threshold", "window", "by", "block",
                                           "webhook"}))
        if m is None:
            continue
        name = r.name(m.get("name"), ip + ("name",))
        threshold = r.integer(m.get("threshold"), ip + ("threshold",), 1, 1_000_000)
        window = r.duration(m.get("window"), ip + ("window",))
        if window is not None and window <= 0:
            r.problem(ip + ("window",), "the window must be longer than 0")
            window = None
        block = r.duration(m["block"], ip + ("block",)) if "block" in m else 0.0
        by = m.get("by", "peer")
        if by not in ("peer", "address", "subject", "issuer"):
            r.problem(ip + ("by",), "expected peer, address, subject or issuer")
            by = None
        elif by in ("subject", "issuer") and block:
            # A claimed subject is attacker-chosen: blocking by it would lock users out.
            r.problem(ip + ("block",), f"alerts by {by} cannot block (alert only)")
            block = None
        webhook = m.get("webhook")
        if webhook is not None and (
            not isinstance(webhook, str) or not webhook.startswith(("https://", "http://"))
        ):
            r.problem(ip + ("webhook",), "expected an http(s):// URL")
            webhook = None
        if name and threshold and window is not None and block is not None and by:
            out.append(AlertRule(name, threshold, window, by, block, webhook))
    return tuple(out)


# --- rules ----------------------------------------------------------------------------


def _claims(r: _Reader, value: Any, path: P) -> tuple[ClaimCondition, ...] | None:
    m = r.mapping(value, path, None)
    if m is None:
        return None
    if not m:
        r.problem(path, "empty claims; omit the key to require only a valid token")
        return None
    out: list[ClaimCondition] = []
    scalar = (str, int, float, bool)
    for claim, spec in m.items():
        cp = path + (claim,)
        if isinstance(spec, scalar):
            out.append(ClaimCondition(claim, "equals", (spec,)))
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            r.problem(cp, "expected a value or exactly one of {equals, one_of, contains}")
            continue
        (op, operand), = spec.items()
        if op in ("equals", "contains"):
            if not isinstance(operand, scalar):
                r.problem(cp + (op,), "expected a string, number or boolean")
                continue
            out.append(ClaimCondition(claim, cast(ClaimOp, op), (operand,)))
        elif op == "one_of":
            if (not isinstance(operand, list) or not operand
                    or not all(isinstance(v, scalar) for v in operand)):
                r.problem(cp + (op,), "expected a non-empty list of values")
                continue
            out.append(ClaimCondition(claim, "one_of", tuple(operand)))
        else:
            r.problem(cp + (op,), "unknown claim test (known: contains, equals, one_of)")
    return tuple(out)


def _conditions(
    r: _Reader, value: Any, path: P, providers: Mapping[str, JwtProvider], keys: set[str]
) -> Conditions | None:
    if value is None:
        return Conditions()  # `allow:` with nothing under it: no conditions (lint warns)
    m = r.mapping(value, path, CONDITION_KEYS)
    if m is None:
        return None
    before = len(r.src.problems)
    kw: dict[str, Any] = {}
    if "from" in m:
        peers = []
        for sid, sp in r.string_list(m["from"], path + ("from",)) or []:
            why = spiffe_problem(sid, wildcards=True)
            if why:
                r.problem(sp, why)
            peers.append(sid)
        kw["peers"] = tuple(peers)
    if "namespaces" in m:
        names = r.string_list(m["namespaces"], path + ("namespaces",)) or []
        for ns, sp in names:
            if not _ID_SEGMENT.match(ns):
                r.problem(sp, "invalid namespace name")
        kw["namespaces"] = frozenset(ns for ns, _ in names)
    if "methods" in m:
        methods = r.string_list(m["methods"], path + ("methods",)) or []
        for meth, sp in methods:
            if not _TOKEN.match(meth):
                r.problem(sp, "invalid HTTP method")
        kw["methods"] = frozenset(meth.upper() for meth, _ in methods)
    if "paths" in m:
        pats = []
        for pat, sp in r.string_list(m["paths"], path + ("paths",)) or []:
            try:
                pats.append(normalise_path_pattern(pat))
            except ValueError as exc:
                r.problem(sp, str(exc))
        kw["paths"] = tuple(dict.fromkeys(pats))
    if "ports" in m:
        pp = path + ("ports",)
        raw = m["ports"]
        if not isinstance(raw, list) or not raw:
            r.problem(pp, "expected a non-empty list of ports")
            raw = []
        kw["ports"] = frozenset(
            p for i, v in enumerate(raw) if (p := r.integer(v, pp + (i,), 1, 65535)) is not None
        )
    if "listeners" in m:
        kw["listeners"] = frozenset(
            s for s, _ in r.string_list(m["listeners"], path + ("listeners",)) or []
        )
    if "hosts" in m:
        hosts = r.string_list(m["hosts"], path + ("hosts",)) or []
        for h, sp in hosts:
            if not re.match(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)$", h):
                r.problem(sp, "expected a host name without port or scheme")
        kw["hosts"] = frozenset(h.lower().rstrip(".") for h, _ in hosts)
    if "jwt" in m:
        jp = path + ("jwt",)
        jm = r.mapping(m["jwt"], jp, frozenset({"provider", "claims"}))
        if jm is not None:
            provider = r.string(jm.get("provider"), jp + ("provider",))
            if provider is not None and provider not in providers:
                r.problem(jp + ("provider",), f"no jwt_providers entry named {provider!r}")
            claims = _claims(r, jm["claims"], jp + ("claims",)) if "claims" in jm else ()
            if provider is not None and claims is not None:
                kw["jwt"] = JwtCondition(provider, claims)
    if "apikey" in m:
        ap = path + ("apikey",)
        raw = m["apikey"]
        if raw is True:
            kw["apikey"] = True
        elif isinstance(raw, list):
            names = r.string_list(raw, ap) or []
            for n, sp in names:
                if n not in keys:
                    r.problem(sp, f"no api_keys entry named {n!r}")
            kw["apikey"] = frozenset(n for n, _ in names)
        else:
            r.problem(ap, "expected true (any valid key) or a list of key names")
    if len(r.src.problems) != before:
        return None
    return Conditions(**kw)


def _rule(
    r: _Reader, value: Any, path: P, index: int, providers: Mapping[str, JwtProvider],
    keys: set[str],
) -> Rule | None:
    m = r.mapping(value, path, RULE_KEYS)
    if m is None:
        return None
    name = r.name(m.get("name"), path + ("name",))
    effects = [e for e in ("allow", "deny") if e in m]
    if len(effects) != 1:
        r.problem(path, "a rule has exactly one of allow or deny")
        return None
    effect: Literal["allow", "deny"] = "allow" if effects[0] == "allow" else "deny"
    when = _conditions(r, m[effect], path + (effect,), providers, keys)
    if effect == "deny" and when is not None and when.methods and "GET" in when.methods:
        # HEAD runs the GET handler in nearly every framework: denying GET denies HEAD.
        when = dataclasses.replace(when, methods=when.methods | {"HEAD"})
    mode = r.mode(m["mode"], path + ("mode",)) if "mode" in m else None
    expires = r.timestamp(m["expires_at"], path + ("expires_at",)) if "expires_at" in m else None
    if "description" in m and not isinstance(m["description"], str):
        r.problem(path + ("description",), "expected a string")
    if name is None or when is None or ("mode" in m and mode is None):
        return None
    if "expires_at" in m and expires is None:
        return None
    return Rule(
        name=name, effect=effect, when=when, mode=mode,
        expires_at=expires, line=r.src.line(path), key=format_path(path), index=index,
    )


def _service(
    r: _Reader, identity: str, value: Any, path: P, providers: Mapping[str, JwtProvider],
    keys: set[str], file: str = "",
) -> ServicePolicy | None:
    why = spiffe_problem(identity, wildcards=False)
    if why:
        r.problem(path, why)
    m = r.mapping(value, path, SERVICE_KEYS)
    if m is None:
        return None
    rules: list[Rule] = []
    names: dict[str, int] = {}
    raw_rules = m.get("rules", [])
    if not isinstance(raw_rules, list):
        r.problem(path + ("rules",), "expected a list of rules")
        raw_rules = []
    for i, raw in enumerate(raw_rules):
        rule = _rule(r, raw, path + ("rules", i), len(rules), providers, keys)
        if rule is None:
            continue
        if rule.name in names:
            r.problem(path + ("rules", i, "name"),
                      f"rule name {rule.name!r} is already used in this service")
            continue
        names[rule.name] = i
        rules.append(rule)
    egress: tuple[EgressEntry, ...] | None = None
    if "egress" in m:
        ep = path + ("egress",)
        raw_egress = m["egress"]
        if not isinstance(raw_egress, list):
            r.problem(ep, "expected a list of SPIFFE IDs")
            raw_egress = []
        entries = []
        for i, sid in enumerate(raw_egress):
            if not isinstance(sid, str):
                r.problem(ep + (i,), "expected a SPIFFE ID")
                continue
            problem = spiffe_problem(sid, wildcards=True)
            if problem:
                r.problem(ep + (i,), problem)
                continue
            entries.append(EgressEntry(sid, r.src.line(ep + (i,)), format_path(ep + (i,))))
        egress = tuple(entries)
    mode = r.mode(m["mode"], path + ("mode",)) if "mode" in m else None
    non_ascii = m.get("non_ascii_paths", "refuse")
    if non_ascii not in ("refuse", "allow"):
        r.problem(path + ("non_ascii_paths",), "expected refuse or allow")
    audience = r.string(m["audience"], path + ("audience",)) if "audience" in m else None
    path_case = m.get("path_case")
    if path_case not in (None, "sensitive", "insensitive"):
        r.problem(path + ("path_case",), "expected sensitive or insensitive")
        path_case = None
    elif path_case == "insensitive" and non_ascii == "allow":
        # Unicode case mapping differs between frameworks (the Kelvin sign folds to "k" in
        # .NET, "ß" to "ss" in casefold); only ASCII letters fold the same everywhere.
        r.problem(path + ("path_case",),
                  "path_case: insensitive cannot be combined with non_ascii_paths: allow")
    return ServicePolicy(identity, tuple(rules), egress, mode, r.src.line(path), format_path(path),
                         non_ascii_paths=non_ascii == "allow", audience=audience,
                         path_case=path_case, file=file)


# --- entry points ---------------------------------------------------------------------
#
# Theory of operation (policy sets). A policy is one file or a *set* of files: the YAML
# files directly inside one or more directories (Kubernetes: ConfigMaps, e.g. one per
# namespace plus one mesh-wide). Every file is parsed on its own (its own line numbers), then
# merged by the rules in MERGE_RULES: a service section lives in exactly one file; a named
# mesh-wide entry (provider, API key, rate limit, alert) may be repeated only identically;
# the set-wide scalars (version, revision, trust_domain, mode) must agree wherever stated.
# A conflict names both files and lines. Then each part is validated once, against the merged
# providers and keys, so cross-file references are checked.
#
# ``only=IDENTITY`` (what a running sidecar asks for) skips every other service section
# while parsing: those sections are syntax-checked and their identities recorded (so a
# section defined in two files is still an error) but never built, validated or compiled,
# and the mesh-wide parts are narrowed to what the kept section references.

# The merge rules, as data: (key, kind). "scalar": must be equal wherever stated; "named":
# entries identified by name (a mapping key, or a list item's `name`), repeated only
# identically; "union": list entries merged, duplicates dropped; "owned": mapping entries
# that exactly one file may define. Each file's sections are validated by the same parsers
# as a single file's (with that file's line numbers), and the results merged in file order.
MERGE_RULES: tuple[tuple[str, str], ...] = (
    ("version", "scalar"), ("revision", "scalar"), ("trust_domain", "scalar"),
    ("mode", "scalar"), ("jwt_providers", "named"), ("api_keys", "named"),
    ("rate_limits", "named"), ("alerts", "named"), ("revocations", "union"),
    ("services", "owned"),
)
MAX_POLICY_FILES = 1000
POLICY_SUFFIXES = (".yaml", ".yml")


class _Doc:
    """One parsed file of a policy set."""

    def __init__(self, filename: str, digest: str, raw: bytes, only: str | None) -> None:
        self.filename = filename
        self.digest = digest
        select: dict[P, tuple[str, ...]] | None = (
            {("services",): (only,)} if only is not None else None)
        doc, src = parse_yaml(raw, filename, select)
        self.r = _Reader(src)
        self.top: dict[str, Any] = self.r.mapping(doc, (), TOP_KEYS) or {}
        # Skipped service identities -> line; None once compacted to ``skipped_hashes``.
        self.skipped: dict[str, int] | None = src.skipped.get(("services",), {})
        self.skipped_hashes: array.array[int] = array.array("q")
        self.parse_problems = len(src.problems)

    def compact(self) -> None:
        """Kept for the next load (``ParsedFiles``): the skipped identities as hashes only,
        which is all that finding a duplicate needs; the rare load that finds one parses
        the files again for names and lines (``_NeedNames``)."""
        if self.skipped is not None:
            # 8 bytes each (a set of Python ints would be 100): only iterated, in _merge.
            self.skipped_hashes = array.array("q", map(hash, self.skipped))
            self.skipped = None
            self.r.src.skipped.clear()

    def reuse(self) -> _Doc:
        """This parsed file for another load: only the problems found while parsing stay."""
        del self.r.src.problems[self.parse_problems:]
        return self

    def where(self, path: P) -> str:
        line = self.r.src.line(path)
        return f"{self.filename}:{line}" if line else self.filename


def _named_entries(doc: _Doc, key: str) -> list[tuple[str, Any, P]]:
    """(name, raw value, path) of a "named" section; unnamed/odd items keep their index."""
    value = doc.top.get(key)
    if isinstance(value, dict):
        return [(str(k), v, (key, k)) for k, v in value.items()]
    out: list[tuple[str, Any, P]] = []
    for i, item in enumerate(value if isinstance(value, list) else ()):
        name = item.get("name") if isinstance(item, dict) else None
        out.append((name if isinstance(name, str) else f"#{i}", item, (key, i)))
    return out


def _merge(docs: list[_Doc]) -> tuple[dict[str, Any], dict[str, tuple[_Doc, P]], int]:
    """Merge the files' top-level values by MERGE_RULES.

    Returns (merged top-level values, where each merged entry came from, how many service
    sections were skipped). A conflict is reported as a problem of the later file naming the
    earlier.
    """
    merged: dict[str, Any] = {}  # scalars by key, named entries by "key.name", services
    origin: dict[str, tuple[_Doc, P]] = {}
    skipped = 0
    owners: dict[str, tuple[_Doc, P]] = {}
    hashes: set[int] = set()  # hash() of every owner's identity, and those of compacted
    hashed: set[int] = set()  # files (see _Doc.compact); a match there needs the names
    for key, kind in MERGE_RULES:
        for doc in docs:
            if key not in doc.top:
                continue
            value = doc.top[key]
            if kind == "scalar":
                if key in merged and merged[key] != value:
                    first, fpath = origin[key]
                    doc.r.problem((key,), f"{key} is {value!r} here but {merged[key]!r} in "
                                  f"{first.where(fpath)}: the files are not of one policy")
                elif key not in merged:
                    merged[key], origin[key] = value, (doc, (key,))
            elif kind == "named":
                for name, item, path in _named_entries(doc, key):
                    tag = f"{key}.{name}"
                    if tag in origin:
                        first, fpath = origin[tag]
                        if first is not doc and merged[tag] != item:
                            doc.r.problem(path, f"{key} entry {name!r} is defined differently "
                                          f"in {first.where(fpath)}")
                        continue  # a name twice in one file: the section's parser says so
                    merged[tag], origin[tag] = item, (doc, path)
            elif kind == "owned":
                if not isinstance(value, dict):
                    doc.r.problem((key,), "expected a mapping of SPIFFE ID -> section")
                    continue
                for name in list(value) + list(doc.skipped or ()):
                    path = (key, name)
                    if name in owners:
                        first, _ = owners[name]
                        for d in (doc, first):  # skipped keys' lines are kept aside
                            if d.skipped is not None and name in d.skipped:
                                d.r.src.lines.setdefault(path, d.skipped[name])
                        doc.r.problem(path, f"service {name} is also defined in "
                                      f"{first.where(path)}: a section lives in one file")
                        continue
                    h = hash(name)
                    if h in hashed:
                        raise _NeedNames
                    owners[name] = (doc, path)
                    hashes.add(h)
                for h in doc.skipped_hashes:  # a compacted file: identities as hashes only
                    if h in hashes or h in hashed:
                        raise _NeedNames
                    hashed.add(h)
                bucket = merged.setdefault(key, {})
                for name, spec in value.items():
                    if owners[name][0] is doc:
                        bucket[name] = spec
                        origin[f"{key}.{name}"] = (doc, (key, name))
                skipped += len(doc.skipped_hashes) + sum(
                    1 for n in doc.skipped or () if owners[n][0] is doc)
    return merged, origin, skipped


class _NeedNames(Exception):
    """A duplicate identity involves a compacted file: parse the files again for names."""


def _set_version(docs: list[_Doc]) -> str:
    """One file: SHA-256 of its bytes. A set: SHA-256 over every file's name and digest, in
    set order -- the same files give the same version on every sidecar, whatever the mount
    point."""
    if len(docs) == 1:
        return docs[0].digest
    h = hashlib.sha256(b"sidecar-policy-set/1\n")
    for doc in docs:
        h.update(f"{os.path.basename(doc.filename)}\0{doc.digest}\n".encode())
    return h.hexdigest()


def _narrow(extras: PolicyExtras, svc: ServicePolicy | None) -> PolicyExtras:
    """The mesh-wide parts one section references: its providers and API keys, the rate
    limits that apply to it; revocations and alerts apply to every section and stay."""
    if svc is None:
        return PolicyExtras(revocations=extras.revocations, alerts=extras.alerts)
    providers = {r.when.jwt.provider for r in svc.rules if r.when.jwt is not None}
    wanted = [r.when.apikey for r in svc.rules if r.when.apikey is not None]
    any_key = any(w is True for w in wanted)
    key_names = {n for w in wanted if w is not True for n in w}
    return PolicyExtras(
        jwt_providers={n: p for n, p in extras.jwt_providers.items() if n in providers},
        revocations=extras.revocations,
        api_keys=tuple(k for k in extras.api_keys if any_key or k.name in key_names),
        rate_limits=tuple(rl for rl in extras.rate_limits
                          if not rl.services or svc.identity in rl.services),
        alerts=extras.alerts,
    )


def load_policy(text: bytes | str, filename: str, *, only: str | None = None) -> Policy:
    """Parse, validate and compile a one-file policy; raise ``ConfigError`` listing every
    problem. ``filename`` names the file in problems, and relative ``jwks_file``/``jwks_ca``
    paths are resolved against its directory. ``only``: see ``load_policy_set``.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return load_policy_files([(filename, raw)], only=only)


class ParsedFiles:
    """The parsed files of a policy set's last load, for the next one (a running sidecar's
    reloads): a file whose name and bytes are unchanged is not parsed again, so a reload
    that touches one namespace's file parses that file only. Single files are not kept
    (a reload means the file changed)."""

    def __init__(self) -> None:
        self.docs: dict[tuple[str, str, str | None], _Doc] = {}


def load_policy_files(files: list[tuple[str, bytes]], *, only: str | None = None,
                      label: str | None = None, cache: ParsedFiles | None = None) -> Policy:
    """Parse, merge, validate and compile a policy from (filename, bytes) pairs."""
    cache = cache if len(files) > 1 else None
    try:
        with gc_paused():
            return _load(files, only, label, cache)
    finally:
        for doc in cache.docs.values() if cache is not None else ():
            doc.compact()


def _load(files: list[tuple[str, bytes]], only: str | None, label: str | None,
          cache: ParsedFiles | None) -> Policy:
    docs: list[_Doc] = []
    failed: list[Problem] = []
    kept: dict[tuple[str, str, str | None], _Doc] = {}
    for filename, raw in files:
        key = (filename, hashlib.sha256(raw).hexdigest(), only)
        try:
            doc = cache.docs[key].reuse() if cache and key in cache.docs else _Doc(
                filename, key[1], raw, only)
        except ConfigError as exc:
            failed.extend(exc.problems)
            continue
        docs.append(doc)
        kept[key] = doc
    if cache is not None:
        cache.docs = kept
    if failed:
        raise ConfigError(failed)
    first = docs[0]
    try:
        merged, origin, skipped = _merge(docs)
    except _NeedNames:
        docs = [_Doc(d.filename, d.digest, raw, only) for d, (_, raw) in zip(docs, files, strict=True)]
        first = docs[0]
        if cache is not None:
            cache.docs = {(d.filename, d.digest, only): d for d in docs}
        merged, origin, skipped = _merge(docs)

    def reader(key: str) -> _Reader:
        return origin[key][0].r if key in origin else first.r

    def at(key: str) -> P:
        return origin[key][1] if key in origin else (key,)

    for doc in docs:
        if doc.top.get("version", None) != 1:
            doc.r.problem(("version",), "expected version: 1")
    trust_domain = reader("trust_domain").string(merged.get("trust_domain"),
                                                 at("trust_domain")) or ""
    if trust_domain and not _TRUST_DOMAIN.match(trust_domain):
        reader("trust_domain").problem(
            at("trust_domain"), "invalid trust domain (lower-case letters, digits, . - _)")
    mode: Mode = "enforce"
    if "mode" in merged:
        mode = reader("mode").mode(merged["mode"], at("mode")) or "enforce"
    if "revision" in merged:
        rev = merged["revision"]
        if isinstance(rev, bool) or not isinstance(rev, str | int) or rev == "":
            reader("revision").problem(at("revision"), "expected a string, e.g. a commit")
        _revision_agrees(docs, origin["revision"])

    providers: dict[str, JwtProvider] = {}
    for doc in docs:
        if "jwt_providers" in doc.top:
            for name, provider in _providers(doc, doc.top["jwt_providers"]).items():
                providers.setdefault(name, provider)
    revocations = _list_parts(docs, "revocations", _revocations)
    api_keys = _list_parts(docs, "api_keys", _api_keys)
    rate_limits = _list_parts(docs, "rate_limits", _rate_limits)
    alerts = _list_parts(docs, "alerts", _alerts)
    key_names = {k.name for k in api_keys}
    # A raw api_keys entry that failed validation still defines its name, so that a typo in
    # one key does not cascade into "undefined key" errors in every rule using it.
    for doc in docs:
        key_names.update(n for n, _, _ in _named_entries(doc, "api_keys") if n[:1] != "#")

    services: dict[str, ServicePolicy] = {}
    if "services" not in merged:
        first.r.problem(("services",), "missing key: services (a mapping of SPIFFE ID -> "
                        "section)")
    for identity, spec in merged.get("services", {}).items():
        doc, path = origin[f"services.{identity}"]
        svc = _service(doc.r, identity, spec, path, providers, key_names, doc.filename)
        if svc is not None:
            services[identity] = svc

    problems = [p for doc in docs for p in doc.r.src.problems]
    if problems:
        raise ConfigError(problems)
    sections: Mapping[str, Section] = _LazySections(services, trust_domain, mode)
    if only is not None:
        # A running sidecar: its section's tables are built here, in the reload thread,
        # never on the data path.
        sections = MappingProxyType({sid: sections[sid] for sid in services})
    extras = PolicyExtras(
        jwt_providers=providers, revocations=tuple(revocations), api_keys=api_keys,
        rate_limits=rate_limits, alerts=alerts,
    )
    if only is not None:
        extras = _narrow(extras, services.get(only))
    return Policy(
        version=_set_version(docs), filename=label or first.filename, trust_domain=trust_domain,
        mode=mode, extras=extras, services=MappingProxyType(services),
        sections=sections, files=tuple(d.filename for d in docs),
        defined_in={k: doc.filename for k, (doc, _) in origin.items()
                    if "." in k and not k.startswith("services.")},
        only=only, skipped=skipped,
    )


class _LazySections(Mapping[str, Section]):
    """The compiled sections of a whole-mesh load, each built on first use and kept.

    Compiling builds lookup tables and cannot fail (the loader validated everything), so
    ``policy check`` and ``lint`` need none of them and ``explain`` or ``replay`` build only
    the sections they decide for. Two threads asking at once at worst build a section twice.
    """

    def __init__(self, services: Mapping[str, ServicePolicy], trust_domain: str,
                 mode: Mode) -> None:
        self._services = services
        self._trust_domain = trust_domain
        self._mode = mode
        self._built: dict[str, Section] = {}

    def __getitem__(self, identity: str) -> Section:
        section = self._built.get(identity)
        if section is None:
            svc = self._services[identity]
            section = compile_section(identity, self._trust_domain, svc.mode or self._mode,
                                      svc.rules, svc.egress or (),
                                      fold_case=svc.paths_fold_case)
            self._built[identity] = section
        return section

    def __iter__(self) -> Iterator[str]:
        return iter(self._services)

    def __len__(self) -> int:
        return len(self._services)


def _revision_agrees(docs: list[_Doc], first: tuple[_Doc, P]) -> None:
    """With ``revision`` stated anywhere, every file states it: a file without it is a file
    of another (older) policy version, e.g. one ConfigMap not yet updated."""
    for doc in docs:
        if "revision" not in doc.top:
            doc.r.problem((), f"no revision here but revision {first[0].top['revision']!r} in "
                          f"{first[0].where(first[1])}: the files are not of one policy")


def _providers(doc: _Doc, value: Any) -> dict[str, JwtProvider]:
    """One file's ``jwt_providers``, each checked by ``_provider``; relative files are
    resolved against that file's directory."""
    r = doc.r
    base_dir = os.path.dirname(os.path.abspath(doc.filename))
    providers: dict[str, JwtProvider] = {}
    for name, spec in (r.mapping(value, ("jwt_providers",), None) or {}).items():
        pp: P = ("jwt_providers", name)
        if not _NAME.match(name):
            r.problem(pp, "invalid provider name")
            continue
        provider = _provider(r, name, spec, pp, base_dir)
        # A provider that failed validation still defines its name (placeholder; the error
        # is reported), so rules using it do not add "undefined provider" errors.
        providers[name] = provider if provider is not None else JwtProvider(name, "", (), ())
    return providers


def _list_parts(docs: list[_Doc], key: str, parse: Any) -> tuple[Any, ...]:
    """Each file's ``key`` list parsed by its section parser, merged in file order; an entry
    repeated identically in another file counts once (a differing one is a merge conflict)."""
    out: dict[Any, Any] = {}
    for doc in docs:
        if key in doc.top:
            for item in parse(doc.r, doc.top[key], (key,)):
                out.setdefault(getattr(item, "name", item), item)
    return tuple(out.values())


def read_policy_set(paths: Sequence[str]) -> list[tuple[str, bytes]]:
    """Read a policy: each path is a file, or a directory whose *.yaml/*.yml files (not
    hidden, not in subdirectories) belong to the set, in name order.

    A Kubernetes-mounted directory is read through its ``..data`` link, resolved once, and
    the link is checked again afterwards: a directory swapped while being read raises
    ``ConfigError`` (tried again at the next poll) instead of mixing two versions.
    """
    out: list[tuple[str, bytes]] = []
    for path in paths:
        if os.path.isdir(path):
            out.extend(_read_directory(path))
        else:
            out.append((path, _read_file(path)))
        if len(out) > MAX_POLICY_FILES:
            raise ConfigError([Problem(path, None, "", f"more than {MAX_POLICY_FILES} policy "
                                       "files")])
    return out


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read file: {exc.strerror}")]) from None


def _read_directory(path: str) -> list[tuple[str, bytes]]:
    link = os.path.join(path, "..data")
    before = os.path.realpath(link) if os.path.islink(link) else None
    base = before or path
    try:
        names = sorted(n for n in os.listdir(base)
                       if not n.startswith(".") and n.endswith(POLICY_SUFFIXES)
                       and os.path.isfile(os.path.join(base, n)))
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read directory: {exc.strerror}")]
                          ) from None
    if not names:
        raise ConfigError([Problem(path, None, "", "no policy files (*.yaml, *.yml) in the "
                                   "directory")])
    files = [(os.path.join(path, n), _read_file(os.path.join(base, n))) for n in names]
    after = os.path.realpath(link) if os.path.islink(link) else None
    if after != before:
        raise ConfigError([Problem(path, None, "", "the directory was swapped (..data) while "
                                   "being read; not applied, read again at the next check")])
    return files


def policy_label(paths: Sequence[str]) -> str:
    """How a policy made of ``paths`` is named in messages and status."""
    return ", ".join(paths)


def load_policy_set(paths: Sequence[str], *, only: str | None = None,
                    cache: ParsedFiles | None = None) -> Policy:
    """Read and load a policy from files and/or directories (see ``read_policy_set``).

    ``only=IDENTITY`` keeps just that identity's section and the mesh-wide parts it
    references; other sections are syntax-checked, never built (see the theory above).
    ``cache`` (a sidecar's reloads) skips parsing files unchanged since the last load.
    """
    return load_policy_files(read_policy_set(paths), only=only, label=policy_label(paths),
                             cache=cache)


def load_policy_file(path: str, *, only: str | None = None) -> Policy:
    """Read and load one policy file or directory; unreadable is a ``ConfigError`` naming it."""
    return load_policy_set([path], only=only)
