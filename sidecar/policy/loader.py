"""Mesh policy YAML -> validated, compiled, immutable ``Policy``.

The loader walks the plain values from ``sidecar.config.source.parse_yaml`` and reports
every problem it finds (file, line, key path) before raising one ``ConfigError``: a person
fixing a policy should see all the mistakes in one run. Unknown keys are errors, empty
lists are errors (omit the key to mean "anything"), and references to JWT providers or
API keys that the file does not define are errors, because each of those is a rule that
silently does something other than what its author meant.

Loading is pure apart from ``load_policy_file`` reading the file: no clock, no network,
no other files (``jwks_file`` paths are resolved against the policy's directory but not
opened). The result is safe to build in a reload task and swap in atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping
from datetime import date, datetime
from types import MappingProxyType
from typing import Any, Literal, cast

from sidecar.config.source import MAX_DOCUMENT_BYTES, Source, format_path, parse_yaml
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
    {"version", "trust_domain", "mode", "jwt_providers", "revocations", "api_keys",
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
    keys: set[str],
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
                         path_case=path_case)


# --- entry points ---------------------------------------------------------------------


def load_policy(text: bytes | str, filename: str) -> Policy:
    """Parse, validate and compile a policy; raise ``ConfigError`` listing every problem.

    ``filename`` names the file in problems, and relative ``jwks_file``/``jwks_ca`` paths
    are resolved against its directory.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else text
    version = hashlib.sha256(raw).hexdigest()
    doc, src = parse_yaml(raw, filename)
    r = _Reader(src)
    top = r.mapping(doc, (), TOP_KEYS)
    if top is None:
        src.raise_if_problems()
        raise AssertionError("unreachable")
    if top.get("version") != 1:
        r.problem(("version",), "expected version: 1")
    trust_domain = r.string(top.get("trust_domain"), ("trust_domain",)) or ""
    if trust_domain and not _TRUST_DOMAIN.match(trust_domain):
        r.problem(("trust_domain",), "invalid trust domain (lower-case letters, digits, . - _)")
    mode: Mode = "enforce"
    if "mode" in top:
        mode = r.mode(top["mode"], ("mode",)) or "enforce"

    base_dir = os.path.dirname(os.path.abspath(filename))
    providers: dict[str, JwtProvider] = {}
    if "jwt_providers" in top:
        pm = r.mapping(top["jwt_providers"], ("jwt_providers",), None) or {}
        for name, spec in pm.items():
            pp: P = ("jwt_providers", name)
            if not _NAME.match(name):
                r.problem(pp, "invalid provider name")
                continue
            provider = _provider(r, name, spec, pp, base_dir)
            if provider is not None:
                providers[name] = provider
            else:
                providers[name] = JwtProvider(name, "", (), ())  # placeholder; error reported
    revocations = _revocations(r, top["revocations"], ("revocations",)) if "revocations" in top else ()
    api_keys = _api_keys(r, top["api_keys"], ("api_keys",)) if "api_keys" in top else ()
    rate_limits = _rate_limits(r, top["rate_limits"], ("rate_limits",)) if "rate_limits" in top else ()
    alerts = _alerts(r, top["alerts"], ("alerts",)) if "alerts" in top else ()
    key_names = {k.name for k in api_keys}
    # A raw api_keys entry that failed validation still defines its name, so that a typo in
    # one key does not cascade into "undefined key" errors in every rule using it.
    raw_keys = top.get("api_keys")
    for item in raw_keys if isinstance(raw_keys, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            key_names.add(item["name"])

    services: dict[str, ServicePolicy] = {}
    if "services" not in top:
        r.problem(("services",), "missing key: services (a mapping of SPIFFE ID -> section)")
    else:
        sm = r.mapping(top["services"], ("services",), None) or {}
        for identity, spec in sm.items():
            svc = _service(r, identity, spec, ("services", identity), providers, key_names)
            if svc is not None:
                services[identity] = svc

    src.raise_if_problems()
    sections: dict[str, Section] = {
        sid: compile_section(sid, trust_domain, svc.mode or mode, svc.rules, svc.egress or (),
                             fold_case=svc.paths_fold_case)
        for sid, svc in services.items()
    }
    extras = PolicyExtras(
        jwt_providers=providers, revocations=revocations, api_keys=api_keys,
        rate_limits=rate_limits, alerts=alerts,
    )
    return Policy(
        version=version, filename=filename, trust_domain=trust_domain, mode=mode,
        extras=extras, services=MappingProxyType(services),
        sections=MappingProxyType(sections),
    )


def load_policy_file(path: str) -> Policy:
    """Read and load one policy file; an unreadable file is a ``ConfigError`` naming it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read file: {exc.strerror}")]) from None
    return load_policy(data, path)
