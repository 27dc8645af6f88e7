"""The mesh-wide sections of a policy file -> the values of ``sidecar.policy.sections``.

``jwt_providers`` (with token introspection), ``revocations``, ``api_keys``, ``rate_limits``
and ``alerts``: each parser takes one file's raw value, reports every problem through the
file's ``Reader`` (file, line, key) and returns what was valid. The loader
(``sidecar.policy.loader``) merges the files' results and checks the rules' references
against them. Pure: no I/O (``jwks_file`` paths are resolved, never opened).
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, cast

from sidecar.config.source import Path as P
from sidecar.config.source import Reader, format_path
from sidecar.config.values import host_problem, ipv6_problem
from sidecar.http.headers import HOP_BY_HOP
from sidecar.http.untrusted import (
    CATALOGUE,
    CLIENT_CERT,
    FORWARDING,
    IDENTITY,
    OVERRIDE,
    SIDECAR_SET,
    fold,
)
from sidecar.identity.spiffe import spiffe_problem
from sidecar.policy.sections import (
    DEFAULT_JWKS_REFRESH_SECONDS,
    DEFAULT_TOKEN_LOCATIONS,
    INTROSPECTION_MAX_CONCURRENT,
    AlertRule,
    ApiKey,
    Introspection,
    JwtProvider,
    RateLimit,
    Revocation,
    TokenLocation,
)

PROVIDER_KEYS = frozenset(
    {"issuer", "audiences", "algorithms", "jwks_file", "jwks_uri", "jwks_ca", "jwks_refresh",
     "jwks_min_refetch", "jwks_max_stale", "clock_skew", "required_claims", "max_lifetime", "from_headers",
     "from_params", "from_cookies", "forward_claims", "forward_token", "max_token_bytes",
     "discovery", "typ", "cert_binding", "forward_query_token", "introspection"}
)
ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# Headers a forwarded claim may never overwrite: framing, routing, credentials, every
# hop-by-hop field, ``expect`` and the sidecar's own (``x-forwarded-client-cert``,
# ``x-request-id``, ``x-forwarded-proto``: a claim under one of them would reach the app as a
# second value next to the verified one). Compared as the header filter compares names:
# lower case, ``_`` read as ``-`` (CGI, WSGI and PHP make ``X_Request_Id`` and
# ``X-Request-Id`` one variable; found by a hostile review: ``x-request-id``,
# ``x_forwarded_client_cert`` and ``content_length`` loaded).
FORBIDDEN_FORWARD_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade",
     "authorization", "cookie", "x-forwarded-client-cert", "x-api-key", "proxy-authorization",
     "keep-alive", "trailer", "expect"}
    | {fold(name).decode("latin-1") for name in HOP_BY_HOP}
    | {fold(name).decode("latin-1") for name in SIDECAR_SET}
)
# Names whose value an app runs as the request's path, method or target rather than reads
# as a fact: the catalogue's request-override family (``X-HTTP-Method-Override``,
# ``X-Original-URL``...) and WebDAV's ``Destination``, which the policy judges as a path. A
# claim forwarded under one of them would make the app run what the token holder put in the
# claim, unjudged (found by a hostile review: ``policy check`` accepted
# ``forward_claims: {sub: x-http-method-override}``).
# Since the thirty-third session also the names an app reads as facts of the connection
# rather than of the user -- the catalogue's forwarding family (the client's address, host,
# scheme: ``x-forwarded-for``, ``forwarded``, ``x-real-ip``...) and client-certificate
# family -- and the representation and range of the body and answer (``content-type``,
# ``content-encoding``: the sidecar judged the body, its form and JSON overrides, by the
# caller's; a claim under one of them would have the app parse it otherwise), which a hostile
# review found loading: a token holder's claim would have become the client's address.
# The forwarding family's and the client-certificate family's prefix entries
# (``x-forwarded``, ``fly-forwarded-``, ``cloudfront-``, ``x-original-``, ``cf-``,
# ``ssl-client-``...) and Envoy's ``x-envoy-`` are refused whole -- the review of the first
# list found ``x-forwarded-tls-client-cert``, ``x-forwarded-method`` and
# ``cloudfront-viewer-address`` still loading --, but for the user-identity names a claim is
# meant for under ``x-forwarded-`` (oauth2-proxy's and Traefik's ``x-forwarded-user``,
# ``-email``, ``-groups``...) and the catalogue's exact identity names.
_REPRESENTATION = frozenset({"content-type", "content-encoding", "content-range",
                             "content-language", "content-location", "content-disposition",
                             "range", "if-range", "accept-encoding"})
CLAIM_IDENTITY_NAMES = frozenset(f"x-forwarded-{what}" for what in (
    "user", "email", "groups", "preferred-username", "access-token", "name", "roles",
    "subject", "uid", "login", "tenant")) | frozenset(
    fold(e.name).decode("latin-1") for e in CATALOGUE if e.family == IDENTITY and not e.prefix)
_OVERRIDE_EXACT = frozenset(fold(e.name).decode("latin-1") for e in CATALOGUE
                            if e.family in (OVERRIDE, FORWARDING, CLIENT_CERT)
                            and not e.prefix) | {"destination"} | _REPRESENTATION
_OVERRIDE_PREFIXES = tuple(fold(e.name).decode("latin-1") for e in CATALOGUE
                           if e.family == OVERRIDE and e.prefix)
_FACT_PREFIXES = tuple(fold(e.name).decode("latin-1") for e in CATALOGUE
                       if e.family in (FORWARDING, CLIENT_CERT) and e.prefix) + ("x-envoy-",)


def forbidden_claim_header(header: str) -> bool:
    """Whether a claim may not be forwarded under ``header`` (any case, ``_`` for ``-``, and
    in its CGI spelling ``HTTP_...``, which some apps read literally): one the sidecar sets
    or reads, a framing, credential or hop-by-hop header, a request-override, forwarding or
    client-certificate one, or one of the body's representation or range."""
    folded = fold(header).decode("latin-1")
    for name in (folded, folded[5:] if folded.startswith("http-") else None):
        if name is None:
            continue
        if name in FORBIDDEN_FORWARD_HEADERS or name in _OVERRIDE_EXACT \
                or name.startswith(_OVERRIDE_PREFIXES):
            return True
        if name.startswith(_FACT_PREFIXES) and name not in CLAIM_IDENTITY_NAMES:
            return True
    return False


# A forwarded claim's header name: letters, digits, ``-`` and ``_``. A gateway or CGI
# adapter reads the other token characters (``.``, ``~``, ``!``...) as ``_``, so a claim
# sent as ``x.user`` would reach the app as ``X_USER`` -- the very variable a caller's own
# ``X-User`` becomes, which the filter keeps (it removes the names the claims use).
CLAIM_HEADER = re.compile(r"[A-Za-z0-9_-]+")

# Names of providers, rules, API keys, rate limits and alerts. (``\Z``, not ``$``: with
# ``match``, ``$`` also matches before a final newline, and ``"x-user\n"`` passed.)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
# ASCII digits only (``\d`` also takes Arabic-Indic and other digits, which float() reads).
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|m|h)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# A rate is finite and within these (per second; ``Reader.number``): `.inf`, `1e400` and a
# 400-digit "N/s" crashed the loader (OverflowError from the default burst, found by a hostile
# review). The most is the most a burst may be (the default burst is the rate rounded up); the
# least, one request a day, keeps `1 / rate` (Retry-After) finite.
MIN_RATE = 1 / 86400
MAX_RATE = 1_000_000.0
RATE_PROBLEM = ("expected requests per second > 0 -- from one a day to 1,000,000 -- as a number "
                "or like 100/s, 30/m, 1000/h")


MAX_CLOCK_SKEW_SECONDS = 600.0  # jwt_providers[].clock_skew: ten minutes at most


def read_name(r: Reader, value: Any, path: P) -> str | None:
    """A name of a provider, rule, API key, rate limit or alert: letters, digits, ``._:-``,
    starting with a letter or digit, at most 128 characters; None if invalid (reported)."""
    s = r.string(value, path)
    if s is not None and not NAME.match(s):
        r.problem(path, "names use letters, digits, '.', '_', ':', '-' (at most 128)")
        return None
    return s


def parse_provider(r: Reader, name: str, value: Any, path: P, base_dir: str) -> JwtProvider | None:
    """One ``jwt_providers.NAME`` entry -> ``JwtProvider``, or None if it has any problem
    (each reported; a half-valid provider is never returned). Exactly one key source
    (``jwks_file``, ``jwks_uri``, ``discovery``, ``introspection``); ``none`` and HMAC
    algorithms are refused; ``jwks_file`` is resolved against ``base_dir``, never opened."""
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
        jwks_file = r.file(jwks_file, path + ("jwks_file",), optional=False, base_dir=base_dir)
        if jwks_ca is not None:
            r.problem(path + ("jwks_ca",), "jwks_ca only applies to jwks_uri and discovery")
            ok = False
    if jwks_uri is not None:
        u = r.string(jwks_uri, path + ("jwks_uri",))
        if u is not None and not u.startswith("https://"):
            r.problem(path + ("jwks_uri",), "jwks_uri must be an https:// URL")
            ok = False
        elif u is not None and (why := url_problem(u)) is not None:
            r.problem(path + ("jwks_uri",), why)
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
        if discovery_url is not None and (why := url_problem(discovery_url)) is not None:
            r.problem(path + ("issuer" if discovery is True else "discovery",), why)
            ok = False
    if jwks_ca is not None and intro_raw is not None:
        r.problem(path + ("jwks_ca",), "jwks_ca only applies to jwks_uri and discovery; "
                  "use introspection.ca")
        ok = False
    if jwks_ca is not None:
        jwks_ca = r.file(jwks_ca, path + ("jwks_ca",), optional=False, base_dir=base_dir)
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
                            ("jwks_max_stale", "jwks_max_stale_seconds"),
                            ("clock_skew", "clock_skew_seconds"),
                            ("max_lifetime", "max_lifetime_seconds")):
        if key in m:
            d = r.duration(m[key], path + (key,))
            if d is None:
                ok = False
            elif key == "clock_skew" and d > MAX_CLOCK_SKEW_SECONDS:
                # (finite, but a token lives this much past its exp: 1e99 was taken, and
                # tokens never expired)
                r.problem(path + (key,), f"at most {MAX_CLOCK_SKEW_SECONDS // 60:g}m: every "
                          "token is accepted this long after its exp")
                ok = False
            kwargs[field_name] = d
    stale = kwargs.get("jwks_max_stale_seconds")
    if stale is not None:
        # At least one refresh interval: a set must be able to be refetched before it is
        # dropped. Only for fetched sets: a jwks_file is read locally, never stale.
        refresh = kwargs.get("jwks_refresh_seconds") or DEFAULT_JWKS_REFRESH_SECONDS
        if "jwks_uri" not in m and "discovery" not in m:
            r.problem(path + ("jwks_max_stale",), "applies to jwks_uri and discovery only")
            ok = False
        elif stale < refresh:
            r.problem(path + ("jwks_max_stale",),
                      f"must be at least jwks_refresh ({refresh:g}s)")
            ok = False
    if "required_claims" in m:
        rc = m["required_claims"]
        if rc == []:
            # The default is [exp]: an empty list let a token without exp live for ever.
            r.problem(path + ("required_claims",), "an empty list: leave the key out (an "
                      "introspection provider requires nothing by default)" if intro_raw
                      is not None else "an empty list would drop the default [exp] (a token "
                      "without exp would never expire): name the claims, or leave the key "
                      "out for [exp]")
            ok = False
        elif isinstance(rc, list):
            for i, c in enumerate(rc):
                if not isinstance(c, str) or not c:
                    r.problem(path + ("required_claims", i), "expected a claim name")
                    ok = False
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
                hname, prefix = item.get("name", ""), item.get("prefix", "")
                if not isinstance(prefix, str):
                    r.problem(ip + ("prefix",), "expected a string")
                    ok = False
                    continue
            else:
                r.problem(ip, "expected a header name or {name, prefix}")
                ok = False
                continue
            if not isinstance(hname, str) or not TOKEN.match(hname):
                r.problem(ip + ("name",) if isinstance(item, dict) else ip, "invalid header name")
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
            if not isinstance(header, str) or not TOKEN.match(header):
                r.problem(fp + (claim,), "expected a header name")
                ok = False
            elif not CLAIM_HEADER.fullmatch(header):
                r.problem(fp + (claim,), "expected a header name of letters, digits, '-' and "
                          "'_' (an app's gateway reads other characters as '_': the name "
                          "would reach the app as one a caller can send)")
                ok = False
            elif forbidden_claim_header(header):
                r.problem(fp + (claim,), f"a claim cannot be forwarded as {header.lower()}: the "
                          "sidecar sets it, reads it, it is hop-by-hop, or the app would run "
                          "it as the request's path or method")
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
     "timeout", "max_concurrent", "max_concurrent_per_caller"}
)


def url_problem(url: str) -> str | None:
    """Why a URL the sidecar fetches (``jwks_uri``, discovery, an introspection endpoint, an
    alert webhook) cannot name one host, or None: read by the control-plane client's
    ``parse_url``, its host one name or address written one way, as in the config
    (``host_problem``, ``ipv6_problem``: ``https://127.1/``, ``https://0x7f.0.0.1/``,
    ``https://[::ffff:127.0.0.1]/``, a zone id are refused at load, where they used to load
    and fail, or be resolved to another address, at the first fetch; found by a hostile
    review). A user name or password in it (``https://user:pass@host/``) is refused too: the
    client never sends them, and such a URL was logged whole on every failed fetch (found by
    a hostile review; a URL is now shown as scheme and host only, ``shown_url``)."""
    from urllib.parse import urlsplit

    from sidecar.ctlhttp.client import ClientError, parse_url, shown_url

    try:
        host = parse_url(url).host
    except ClientError as exc:
        return str(exc)
    if "@" in urlsplit(url).netloc:
        return (f"a user name or password in a URL is never sent (put no credentials in a "
                f"URL): {shown_url(url)}")
    return ipv6_problem(host) if ":" in host else host_problem(host)


def _introspection(r: Reader, value: Any, path: P, base_dir: str) -> Introspection | None:
    m = r.mapping(value, path, INTROSPECTION_KEYS)
    if m is None:
        return None
    ok = True
    endpoint = r.string(m.get("endpoint"), path + ("endpoint",))
    if endpoint is not None and not endpoint.startswith("https://"):
        r.problem(path + ("endpoint",), "endpoint must be an https:// URL")
        ok = False
    elif endpoint is not None and (why := url_problem(endpoint)) is not None:
        r.problem(path + ("endpoint",), why)
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
        kw["client_secret_file"] = r.file(secret, path + ("client_secret_file",), optional=False,
                                          base_dir=base_dir)
        ok = ok and kw["client_secret_file"] is not None
    if "ca" in m:
        kw["ca"] = r.file(m["ca"], path + ("ca",), optional=False, base_dir=base_dir)
        ok = ok and kw["ca"] is not None
    # Each must be more than 0: a cache_ttl of 0 turned every active answer into
    # "inactive", a negative_ttl of 0 let a revoked token count as "not asked about", and a
    # timeout of 0 makes every call fail (found by a hostile review).
    for key, field_name in (("cache_ttl", "cache_ttl_seconds"),
                            ("negative_ttl", "negative_ttl_seconds"),
                            ("timeout", "timeout_seconds")):
        if key in m:
            d = r.duration(m[key], path + (key,))
            if d == 0:
                r.problem(path + (key,), "must be more than 0")
                d = None
            ok = ok and d is not None
            kw[field_name] = d
    if "max_concurrent" in m:
        kw["max_concurrent"] = r.integer(m["max_concurrent"], path + ("max_concurrent",), 1, 256)
        ok = ok and kw["max_concurrent"] is not None
    if "max_concurrent_per_caller" in m:
        where = path + ("max_concurrent_per_caller",)
        share = kw["max_concurrent_per_caller"] = r.integer(m["max_concurrent_per_caller"],
                                                            where, 1, 256)
        ok = ok and share is not None
        most = kw.get("max_concurrent") or INTROSPECTION_MAX_CONCURRENT
        if share is not None and share > most:
            r.problem(where, f"cannot be more than max_concurrent ({most})")
            ok = False
    if not ok or endpoint is None or client_id is None:
        return None
    return Introspection(endpoint=endpoint, client_id=client_id, mtls=mtls is True, **kw)


def parse_revocations(r: Reader, value: Any, path: P) -> tuple[Revocation, ...]:
    """``revocations`` -> the valid entries, each revoking a token ``jti`` and/or every token
    of a ``sub``, optionally ``until`` a time; invalid entries are reported and left out."""
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


def parse_api_keys(r: Reader, value: Any, path: P) -> tuple[ApiKey, ...]:
    """``api_keys`` -> the valid keys. Only the key's SHA-256 is held (64 hex digits,
    lower-cased), never the key itself; a name defined twice in the file is an error and the
    second entry is dropped. So is a SHA-256 listed twice, under any names: one key under two
    names got the last one's, so expiring the first entry (how a key is retired) left the
    key working under the second (found by a hostile review, twenty-seventh session); the
    problem names both entries."""
    if not isinstance(value, list):
        r.problem(path, "expected a list")
        return ()
    out: list[ApiKey] = []
    seen: set[str] = set()
    digests: dict[str, tuple[str | None, P]] = {}  # SHA-256 -> its first entry (name, path)
    for i, item in enumerate(value):
        ip = path + (i,)
        m = r.mapping(item, ip, frozenset({"name", "sha256", "expires_at"}))
        if m is None:
            continue
        name = read_name(r, m.get("name"), ip + ("name",))
        digest = m.get("sha256")
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            r.problem(ip + ("sha256",), "expected the key's SHA-256 as 64 hex digits")
            digest = None
        expires = r.timestamp(m["expires_at"], ip + ("expires_at",)) if "expires_at" in m else None
        if name is not None and name in seen:
            r.problem(ip + ("name",), f"API key {name!r} is defined twice")
            continue
        if digest is not None:
            first = digests.get(digest.lower())
            if first is not None:
                first_name, first_path = first
                line = r.src.line(first_path)
                where = format_path(first_path) + (f", line {line}" if line is not None else "")
                this = f"API key {name!r}" if name is not None else "this API key"
                that = f"API key {first_name!r}" if first_name is not None else "the API key"
                r.problem(ip + ("sha256",),
                          f"{this} has the same sha256 as {that} ({where}): one key has one "
                          "name (retire a key by removing or expiring its only entry)")
                continue
            digests[digest.lower()] = (name, ip)
        if name is not None and digest is not None:
            seen.add(name)
            out.append(ApiKey(name=name, sha256=digest.lower(), expires_at=expires))
    return tuple(out)


def parse_rate_limits(r: Reader, value: Any, path: P) -> tuple[RateLimit, ...]:
    """``rate_limits`` -> the valid token-bucket limits: ``rate`` as requests per second or
    ``N/s``, ``N/m``, ``N/h``; ``burst`` defaults to the rate per second rounded up (at least 1);
    counted ``per`` peer, apikey or subject, optionally only for some ``services``."""
    if not isinstance(value, list):
        r.problem(path, "expected a list")
        return ()
    seen: set[str] = set()
    out: list[RateLimit] = []
    for i, item in enumerate(value):
        ip = path + (i,)
        m = r.mapping(item, ip, frozenset({"name", "rate", "burst", "per", "services"}))
        if m is None:
            continue
        name = read_name(r, m.get("name"), ip + ("name",))
        if name is not None and name in seen:
            # (the later one was dropped without a word: found by a hostile review)
            r.problem(ip + ("name",), f"rate limit {name!r} is defined twice")
            continue
        if name is not None:
            seen.add(name)
        per_second = m.get("rate")
        if isinstance(per_second, str):
            rm = _RATE.match(per_second)
            per_second = float(rm.group(1)) / _RATE_UNITS[rm.group(2)] if rm else None
        rate = r.number(per_second, ip + ("rate",), MIN_RATE, MAX_RATE, RATE_PROBLEM)
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


def parse_alerts(r: Reader, value: Any, path: P) -> tuple[AlertRule, ...]:
    """``alerts`` -> the valid burst-alert rules (``threshold`` denials within ``window``,
    grouped ``by`` peer, address, subject or issuer). Deliberately asymmetric: only ``peer`` and
    ``address`` alerts may ``block``, because a token subject or issuer is chosen by the caller
    and blocking by it would let anyone lock real users out."""
    if not isinstance(value, list):
        r.problem(path, "expected a list")
        return ()
    seen: set[str] = set()
    out: list[AlertRule] = []
    for i, item in enumerate(value):
        ip = path + (i,)
        m = r.mapping(item, ip, frozenset({"name", "threshold", "window", "by", "block",
                                           "webhook"}))
        if m is None:
            continue
        name = read_name(r, m.get("name"), ip + ("name",))
        if name is not None and name in seen:
            # (the later one was dropped without a word: found by a hostile review)
            r.problem(ip + ("name",), f"alert {name!r} is defined twice")
            continue
        if name is not None:
            seen.add(name)
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
        elif webhook is not None and (why := url_problem(webhook)) is not None:
            r.problem(ip + ("webhook",), why)
            webhook = None
        if name and threshold and window is not None and block is not None and by:
            out.append(AlertRule(name, threshold, window, by, block, webhook))
    return tuple(out)
