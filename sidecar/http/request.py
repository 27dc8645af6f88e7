"""Request facts from an h11 request head. Pure.

Everything that can make a request ambiguous is refused here, before any rule runs:
duplicate Host or Authorization headers (header-concatenation bypasses), a Host that
disagrees with itself, absolute-form targets on inbound, and -- in ``sidecar.policy.paths``
-- every ambiguous path encoding.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_plus

from sidecar.errors import BadRequest, HeadersTooLarge, PayloadTooLarge

# The fields check_head looks at, by kind (one dictionary lookup per field). The first
# five may appear once only (Cookie may repeat: it is the one singleton that is counted but
# not refused).
_HOST, _LENGTH, _ONCE, _DESTINATION, _COOKIE, _TE, _EXPECT, _UPGRADE, _CONNECTION = range(9)
_FIELD_KINDS = {b"host": _HOST, b"content-length": _LENGTH, b"authorization": _ONCE,
                b"x-api-key": _ONCE, b"destination": _DESTINATION, b"cookie": _COOKIE,
                b"transfer-encoding": _TE, b"expect": _EXPECT, b"upgrade": _UPGRADE,
                b"connection": _CONNECTION}
# h11 lets control characters other than NUL, CR and LF through in field values (RFC 9110
# says they are invalid but MAY be kept); an app may read them differently, so refuse.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Methods are case-sensitive (RFC 9110 9.1), but some apps upper-case them: "delete" would
# slip past a rule for DELETE and be served as one. Only upper-case method names pass.
_METHOD = re.compile(rb"[A-Z][A-Z-]{0,31}")
# RFC 9112 3.2 / RFC 3986 3.2.2-3.2.3: Host = uri-host [ ":" port ]. The uri-host accepted is
# a reg-name of unreserved characters only (letters, digits, "-", ".", "_", "~": no
# percent-escape, no sub-delim, which also covers an IPv4 address) or an IPv6 literal in
# brackets; the port is 1-5 digits. Anything else -- a list, userinfo, whitespace, a second
# port, a path, a backslash, an escape, non-ASCII, a bracketed name -- could be read as
# another host by the app than by the policy's host rules, and is refused (``bad_host``).
# The one definition of a Host value: ``split_host`` (the policy's ``normalise_host`` too).
HOST_SYNTAX = re.compile(r"([A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?")
# The longest host (without the port): a DNS name has at most 253 characters (one more with
# a final dot); an IPv6 literal is shorter. A longer one names no host anyone can reach,
# and was kept whole -- in the audit record of every request (one caller wrote 30 KiB per
# request to the audit volume, 100 times a usual record), the log, the caches -- found by a
# hostile review: refused (``bad_host``).
MAX_HOST_CHARS = 253
MAX_PORT = 65535
# Host values seen and accepted -> the lower-case str form ``RequestHead.host`` holds
# (bounded like ``_METHODS``: only values that passed are kept).
_HOSTS: dict[bytes, str] = {}
_HOSTS_MAX = 256
# Methods seen and accepted -> their str form, so the checks above run once per method name
# (bounded: only names that passed are kept, at most _METHODS_MAX of them).
_METHODS: dict[bytes, str] = {}
_METHODS_MAX = 64
_VERSIONS = (b"1.1", b"1.0")
# RFC 9110 7.8: an Upgrade protocol, ``protocol-name ["/" protocol-version]``, both tokens.
_PROTOCOL = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?")


class RequestHead(NamedTuple):
    """The parts of a request head the data path needs, validated. (Immutable; a named
    tuple rather than a frozen dataclass, which takes four times as long to build, once
    per request on each proxy.)"""

    method: str
    target: bytes
    host: str
    has_body: bool
    expect_continue: bool
    upgrade: bytes | None
    connection: bool = False  # a Connection field is present (it may list hop-by-hop names)
    # Fields to normalise before forwarding: a Content-Length with leading zeros (forwarded
    # as its canonical decimal), an Expect the sidecar does not answer (on a request without
    # a body or an HTTP/1.0 one: dropped).
    normalise: bool = False
    # A WebDAV Destination field is present (COPY, MOVE: a second path the policy judges
    # too, ``read_destination``); at most one.
    destination: bool = False
    # The Authorization field uses a scheme that authenticates the connection (NTLM,
    # Negotiate, Kerberos, CredSSP: ``CONNECTION_AUTH_SCHEMES``): the upstream connection
    # is the client's alone (``sidecar.net.forward``).
    connection_auth: bool = False


# A RequestHead from all its fields in order, without the named tuple's Python-level
# ``__new__`` (once per request on each proxy).
_new_head: Callable[[tuple[Any, ...]], RequestHead] = functools.partial(
    tuple.__new__, RequestHead)


def check_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], *,
               max_headers: int, max_body: int, http_version: bytes = b"1.1",
               values_checked: bool = False) -> RequestHead:
    """Validate what h11 cannot know is dangerous for a proxy; raise a ``RequestRefused``.

    ``values_checked``: the head comes from the strict reader (``sidecar.http.wire``), whose
    field-value grammar already refuses every control character ``_CONTROL`` finds, so the
    scan is skipped (the data path; ``tests/test_wire.py`` holds the reader to that)."""
    if http_version not in _VERSIONS:
        raise BadRequest("bad_http_version")  # h11 parses "HTTP/2.0" as if it were 1.x
    if len(headers) > max_headers:
        raise HeadersTooLarge("too_many_headers")
    seen: list[bytes] = []
    host = None
    content_length = None
    chunked = False
    expect = False
    upgrade = None
    conn_upgrade = False
    connection = False
    odd_length = False
    destination = False
    connection_auth = False
    kind_of = _FIELD_KINDS.get
    for name, value in headers:
        if not values_checked and _CONTROL.search(value) is not None:
            raise BadRequest("bad_header_value", name.decode("latin-1"))
        kind = kind_of(name)
        if kind is None:
            continue  # most fields: one dictionary lookup, no chain of comparisons
        if kind <= _COOKIE:
            if name in seen:
                if kind != _COOKIE:
                    raise BadRequest("duplicate_header", name.decode())
            else:
                seen.append(name)
            if kind == _HOST:
                host = value
            elif kind == _DESTINATION:
                destination = True
            elif name == b"authorization":
                # (a Bearer or Basic value, nearly all of them, at one slice and compare)
                connection_auth = value[:1] in _CONNECTION_AUTH_FIRST \
                    and _authenticates_connection(value)
            elif kind == _LENGTH:
                # h11 already checked it is digits; re-checked so this function is total.
                if not value.isdigit():
                    raise BadRequest("bad_content_length")
                content_length = int(value)
                odd_length = value[0] == 48 and len(value) > 1  # leading zeros: "0003"
        elif kind == _TE:
            chunked = True
        elif kind == _EXPECT:
            if value.lower() != b"100-continue":
                raise BadRequest("bad_expect")
            expect = True
        elif kind == _UPGRADE:
            # Several Upgrade fields are one comma-separated list (RFC 9110 5.3).
            upgrade = value if upgrade is None else upgrade + b", " + value
        else:
            connection = True
            conn_upgrade = conn_upgrade or _lists_upgrade(value)
    host_name = _HOSTS.get(host) if host is not None else None
    if host_name is None:
        host_name = _check_host(host)
    if not target.startswith(b"/"):
        # absolute-form, authority-form and asterisk-form are not accepted: the policy
        # matches origin-form paths, and a second authority would be a second truth.
        raise BadRequest("bad_target_form")
    method_name = _METHODS.get(method)
    if method_name is None:
        method_name = _check_method(method)
    if chunked and content_length is not None:
        # RFC 9112 6.1/6.3: both is smuggling material (h11 lets Transfer-Encoding win, an
        # app may believe Content-Length): refused, and the connection closes.
        raise BadRequest("length_and_chunked")
    if chunked and http_version != b"1.1":
        raise BadRequest("transfer_encoding_http10")  # RFC 9112 6.1: 1.0 has no TE
    if max_body and content_length is not None and content_length > max_body:
        raise PayloadTooLarge("body_too_large")
    if upgrade is not None and conn_upgrade:
        protocols = [token.strip(b" \t") for token in upgrade.split(b",")]
        if any(_is_http2(token) for token in protocols):
            # An h2c upgrade would turn the connection into HTTP/2 that the sidecar cannot
            # see: every request after the first would bypass the policy (h2c smuggling).
            raise BadRequest("h2c_upgrade")
        if any(_carries_http(token) for token in protocols):
            # The same for every other upgrade whose connection goes on carrying HTTP
            # requests: RFC 2817's ``TLS/1.x`` (CUPS and IPP servers take it: the requests
            # inside the TLS reached the app unjudged, found by a hostile review), an
            # ``HTTP/1.x`` "upgrade", SPDY.
            raise BadRequest("http_upgrade")
        named = [token for token in protocols if token]
        if not named or any(_PROTOCOL.fullmatch(token) is None for token in named):
            # RFC 9110 7.8: Upgrade = 1#protocol, protocol = name ["/" version], tokens
            # (found by a hostile review: an empty Upgrade, "," or "a b" went to the app
            # as an upgrade request).
            raise BadRequest("bad_upgrade")
        if http_version != b"1.1":
            # RFC 9110 7.8: a server MUST ignore Upgrade in an HTTP/1.0 request (found by a
            # hostile review: forwarded to the app as an HTTP/1.1 upgrade); it is dropped
            # with the other hop-by-hop fields.
            conn_upgrade = False
    has_body = chunked or bool(content_length)
    if has_body and upgrade is not None and conn_upgrade:
        # An upgrade request with a body (RFC 9110 allows it; no WebSocket handshake has
        # one): the app's connection must end after it, and ``Connection: upgrade, close``
        # is read as keep-alive by servers that compare the whole value with "close"
        # (Python's http.server, Werkzeug), which then ran the unread body as their next
        # request, past the policy (found by a hostile review, thirty-second session).
        raise BadRequest("upgrade_with_body")
    # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored (found
    # by a hostile review: the sidecar sent "100 Continue" to an HTTP/1.0 client, which
    # reads it as the final answer). Expect is never forwarded: answered here, or dropped.
    expect_continue = expect and has_body and http_version == b"1.1"
    return _new_head((method_name, target, host_name,
                      has_body, expect_continue, upgrade if conn_upgrade else None,
                      connection, odd_length or (expect and not expect_continue),
                      destination, connection_auth))


_SCHEME = re.compile(rb"[ \t]*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)")
# Authentication schemes that authenticate a connection rather than a request, compared
# lower-cased: NTLM and Negotiate (RFC 4559; IIS and http.sys), Kerberos (http.sys's own
# scheme, its context cached per connection as IIS does by default; WinRM offers it, the
# Ruby WinRM client sends it) and CredSSP (WinRM: the delegated credentials and the
# message encryption belong to the connection's security context). Found by a hostile
# review: a Kerberos or CredSSP connection went back to the shared pool, and the next
# caller's request ran as the user who had authenticated it.
CONNECTION_AUTH_SCHEMES = frozenset({b"ntlm", b"negotiate", b"kerberos", b"credssp"})
# The first characters of those schemes (and of the whitespace before one): a value that
# starts with anything else (Bearer, Basic: nearly all of them) is passed over at one slice.
_CONNECTION_AUTH_FIRST = b"NnKkCc \t"


def _authenticates_connection(value: bytes) -> bool:
    """An Authorization value whose scheme (its first token, any case) authenticates the
    connection rather than the request (``CONNECTION_AUTH_SCHEMES``)."""
    m = _SCHEME.match(value)
    return m is not None and m.group(1).lower() in CONNECTION_AUTH_SCHEMES


# A Destination that names a host (RFC 4918 10.3: an absolute URI, or an absolute path).
_DESTINATION_URI = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)(.*)", re.S)


def read_destination(value: bytes, *, allow_non_ascii: bool = False
                     ) -> tuple[bytes, str | None, str, str, str]:
    """A WebDAV ``Destination`` value (RFC 4918 10.3) as (its ``scheme://authority`` as
    sent, empty for a path; its host as ``split_host`` reads it, None for a path; its path
    normalised as a request target's, and as it is forwarded (``normalise_both``); its
    query), so the policy judges the path a COPY or
    MOVE writes to as it judges the request's own. Anything else -- another scheme,
    userinfo, no path, an ambiguous path -- is ``BadRequest("bad_destination")``."""
    from sidecar.policy.paths import normalise_both

    value = value.strip(b" \t")
    prefix, host = b"", None
    if not value.startswith(b"/"):
        m = _DESTINATION_URI.fullmatch(value)
        if m is None:
            raise BadRequest("bad_destination", "not an absolute URI or path")
        authority, rest = m.group(1).decode("latin-1"), m.group(2)
        found = split_host(authority)
        if found is None or not rest.startswith(b"/"):
            raise BadRequest("bad_destination", "not an http(s) URI with a host and a path")
        prefix, host, value = value[:len(value) - len(rest)], found[0], rest
    try:
        path, forward, query = normalise_both(value, allow_non_ascii=allow_non_ascii)
    except BadRequest as exc:
        raise BadRequest("bad_destination", exc.reason) from None
    return prefix, host, path, forward, query


def destination_of(value: bytes, request_host: str, *, allow_non_ascii: bool = False
                   ) -> tuple[bytes, str, str, str]:
    """``read_destination`` of a request whose Host field is ``request_host``: (the
    ``scheme://authority`` prefix, the normalised path, the path as forwarded, the query).
    The app applies the Destination to its own server: a URI naming another host than the
    request's Host is ``BadRequest("bad_destination")``, never judged under the other
    host's rules and written here (found by a review: a deny rule with ``hosts`` let
    ``Destination: http://elsewhere/admin`` through). The data path's and ``policy
    explain``'s reading."""
    prefix, host, path, forward, query = read_destination(value,
                                                          allow_non_ascii=allow_non_ascii)
    if host is not None:
        own = split_host(request_host)
        if own is None or own[0].rstrip(".") != host.rstrip("."):
            raise BadRequest("bad_destination", "names another host than the Host field")
    return prefix, path, forward, query


# Query parameters that frameworks read as the method to run instead of the request's own
# (compared as ``sidecar.authn.extract.param_name`` folds a name: decoded, cut at NUL, PHP's
# ``.``/space/``[`` read as ``_``, case folded): ``_method`` is Symfony's and Laravel's
# (``enableHttpMethodParameterOverride``, on by default in Laravel: the query is read for a
# POST), Spring's ``HiddenHttpMethodFilter`` and Jersey's ``HttpMethodOverrideFilter``
# (``getParameter``: the query too) and Express ``method-override('_method')``'s; the
# override headers' names are read from the query by the configurable ones. Found by a
# hostile review: ``POST /orders/7?_method=DELETE`` was judged as a POST and run as DELETE.
# ``x-tunneled-method`` is Perl's: Plack::Middleware::MethodOverride's and Catalyst's
# REST-for-browsers parameter (query or form; noticed while fixing the twenty-ninth
# session's review).
METHOD_OVERRIDE_PARAMS = frozenset({
    "_method", "x-http-method-override", "x-http-method", "x-method-override",
    "x-tunneled-method",
})


MAX_METHOD_OVERRIDES = 8  # distinct methods one query may name (more: 400 bad_method)
# Parameters of one query whose decoded names hold "method" (``payment_method``), each read
# every way a reader reads it; more is 400 (``bad_method``). Before the thirty-second session
# every name of a query with a "%" was read so: about 50 ms of CPU per 30 KiB query of "%"
# names on the outbound listener (found by a hostile review).
MAX_OVERRIDE_NAMES = 64
# Every override parameter's name holds "method", and every reading of a name keeps a run of
# its decoded letters: a name that cannot decode to hold "method" (each letter as itself in
# any case or percent-encoded) is no override's, found without decoding it.
_METHOD_LETTERS = (r"(?:m|%[46]d)(?:e|%[46]5)(?:t|%[57]4)(?:h|%[46]8)(?:o|%[46]f)"
                   r"(?:d|%[46]4)")
_METHOD_SPELT = re.compile(_METHOD_LETTERS, re.IGNORECASE)


# Characters that Java's ``equalsIgnoreCase`` and .NET's case-insensitive comparisons take for
# ASCII letters (their upper or lower case is one): the long s is "S", the dotless i "I", the
# Kelvin sign "k". Hadoop's ``getDoAs`` reads ``doa\u017f`` as ``doAs`` (found by the review
# of this session's fix).
_ASCII_FOLDS = str.maketrans({"\u017f": "s", "\u0131": "i", "\u212a": "k"})
# Parameters of one query whose decoded names hold a run-as name (``sudoers`` holds
# ``sudo``) that are read every way a reader reads them; past that the request is 400
# (``run_as_parameter``): no real query has many, and each costs a few readings.
MAX_RUN_AS_CANDIDATES = 16
# ``%uXXXX``: Jetty 9's and IIS's escape for one UTF-16 unit (``%u0073`` is "s").
_PERCENT_U = re.compile(r"%u([0-9a-fA-F]{4})")


def _percent_u(text: str) -> str:
    """``text`` with each ``%uXXXX`` as the UTF-8 percent-escapes of its character."""
    if "%u" not in text and "%U" not in text:
        return text
    return _PERCENT_U.sub(lambda m: quote(chr(int(m.group(1), 16)), safe=""), text)


def refuse_run_as(query: str, names: frozenset[str]) -> None:
    """``BadRequest("run_as_parameter")`` when a parameter of ``query`` is read as one of
    ``names`` (``HeaderFilter.run_as``, lower-cased) by a common reader: decoded (``%XX``,
    ``+``, Jetty's and IIS's ``%uXXXX``), PHP's and Rack's readings
    (``sidecar.authn.extract.param_names``), any case as Java and .NET compare it (the long s
    is an "s"), a leading ``?`` dropped (Node's ``URLSearchParams`` after a second ``?``).

    Linear in the query: C scans when no name can be spelt in it (no ``%`` and no name in its
    letters); else the query decoded once, and only a parameter whose decoded name holds a
    name is read the ways the readers read it (a query of many ``%`` names cost 30 ms of CPU
    per request on the outbound listener before: the review of this session's fix)."""
    if not names or not query:
        return
    lower = query.lower()
    if "%" not in query and not any(n in lower for n in names):
        return
    raw_names = [part.partition("=")[0] for part in re.split(r"[&;]", query)]
    if "%" in query:  # (the names alone, decoded at once: values do not count)
        whole = unquote_plus(_percent_u("\x00".join(raw_names)), errors="replace")
        if not any(n in whole.lower().translate(_ASCII_FOLDS) for n in names):
            return
    from sidecar.authn.extract import QUERY, param_names

    candidates = 0
    for raw in raw_names:
        if "%" not in raw and not any(n in raw.lower() for n in names):
            continue  # (C scans: most names of a query that holds one)
        name = _percent_u(raw).lstrip("?")
        plain = unquote_plus(name, errors="replace").lower().translate(_ASCII_FOLDS)
        if not any(n in plain for n in names):
            continue  # (no reading of a name can hold what its decoded text does not)
        candidates += 1
        if candidates > MAX_RUN_AS_CANDIDATES:  # (each is read six ways: bounded work)
            raise BadRequest("run_as_parameter", "too many names holding a run-as name")
        if any(reading.translate(_ASCII_FOLDS) in names
               for reading in param_names(name, QUERY)):
            raise BadRequest("run_as_parameter", "run-as query parameter")


def method_overrides(query: str) -> tuple[str, ...]:
    """The methods a request's query asks the app to run instead of its own (upper-cased as
    every override reader does; each once, in order), or ``()``. A non-empty value that is
    not a method the data path serves (``_METHOD`` once upper-cased; ASCII only: ``str.upper``
    folds ``\u017f`` to ``S``) is ``BadRequest("bad_method")``: an app may still read it as
    one. An empty value names no method (no reader runs it as one)."""
    if not query or _METHOD_SPELT.search(query) is None:
        return ()  # (no name can fold to an override parameter's: C scans)
    from sidecar.authn.extract import param_name

    found: list[str] = []
    candidates = 0
    # Only the parameters whose names may spell one are visited: each place "method" may be
    # spelt (a C scan finds them), in the parameter around it, when it is in the name.
    last = -1
    for spelt in _METHOD_SPELT.finditer(query):
        at = spelt.start()
        start = max(query.rfind("&", 0, at), query.rfind(";", 0, at)) + 1
        if start == last or "=" in query[start:at]:
            continue  # (the same parameter again, or its value)
        last = start
        ends = [i for i in (query.find("&", at), query.find(";", at)) if i >= 0]
        name, _, value = query[start:min(ends) if ends else len(query)].partition("=")
        # A leading "?" is dropped as Node's URLSearchParams drops it after a second "?"
        # (``/x??_method=DELETE``; found by the review of the thirty-second session's run-as
        # check, which had the same gap).
        name = name.lstrip("?")
        candidates += 1
        if candidates > MAX_OVERRIDE_NAMES:  # (each is read every way: bounded work)
            raise BadRequest("bad_method", "too many names holding 'method'")
        if param_name(name) not in METHOD_OVERRIDE_PARAMS:
            continue
        upper = method_value(unquote_plus(value, errors="replace"))
        if upper is None:
            continue
        if upper not in found:
            if len(found) >= MAX_METHOD_OVERRIDES:  # (each is judged: bounded work)
                raise BadRequest("bad_method", "too many method-override values")
            found.append(upper)
    return tuple(found)


def method_value(text: str) -> str | None:
    """The method an override parameter's decoded value names (upper-cased, as every
    override reader does), None for an empty value (no reader runs it as one);
    ``BadRequest("bad_method")`` for a value that is not a method the data path serves
    (``_METHOD`` once upper-cased; ASCII only: ``str.upper`` folds ``\u017f`` to ``S``)."""
    if not text:
        return None
    upper = text.upper()
    if not text.isascii() or _METHOD.fullmatch(upper.encode("ascii")) is None:
        raise BadRequest("bad_method", "method-override parameter")
    return upper


def _lists_upgrade(value: bytes) -> bool:
    """A Connection value lists the ``upgrade`` token (RFC 9110 7.6.1: a comma-separated
    list of tokens with optional whitespace, compared case-insensitively) -- as a token,
    not as a substring: ``noupgrade`` or ``upgraded`` is another connection option."""
    lower = value.lower()
    if lower.find(b"upgrade") < 0:  # (find: see _has_close in sidecar.http.wire)
        return False
    return any(token.strip(b" \t") == b"upgrade" for token in lower.split(b","))


# Upgrade protocols (``name`` of ``name[/version]``, lower-cased) after whose 101 the
# connection carries HTTP requests the sidecar would not see (HTTP/2 is ``_is_http2``'s).
HTTP_CARRYING_UPGRADES = frozenset({b"tls", b"ssl", b"http", b"https", b"spdy"})


def _carries_http(token: bytes) -> bool:
    """An Upgrade protocol in ``HTTP_CARRYING_UPGRADES`` (any version, any case)."""
    return token.strip(b" \t").lower().partition(b"/")[0] in HTTP_CARRYING_UPGRADES


def _is_http2(token: bytes) -> bool:
    """An Upgrade protocol (``name[/version]``, RFC 9110 7.8) that means HTTP/2: ``h2c``,
    ``h2`` and their drafts (``h2c-14``), ``HTTP/2``, ``HTTP/2.0``, ``http2``."""
    name, _, version = token.strip(b" \t").lower().partition(b"/")
    return (name.startswith(b"h2") or name.startswith(b"http2")
            or (name == b"http" and version.startswith(b"2")))


def split_host(value: str) -> tuple[str, str] | None:
    """A Host value as (host for comparison, port: "" when none), or None when it is not
    ``uri-host [":" port]`` as ``HOST_SYNTAX`` reads it, or its host is longer than a DNS
    name may be (``MAX_HOST_CHARS``, one more with a final dot).

    The host is lower-cased; an IPv6 literal must parse and is written in its one canonical
    form (``canonical_ipv6``: ``[0:0::1]``, ``[::0001]`` and ``[::1]`` are one host, and
    ``[::ffff:127.0.0.1]`` is ``127.0.0.1``); a host that ends in a number is an IPv4
    address to URL parsers and resolvers (``inet_aton`` reads ``127.1``, ``0x7f.0.0.1``,
    ``0177.0.0.1`` and ``2130706433`` as 127.0.0.1) and is accepted only as four decimal
    numbers without leading zeros (``ipv4_problem``). Only bracketed literals, which are
    rare, take the slow path."""
    m = HOST_SYNTAX.fullmatch(value)
    if m is None:
        return None
    host, port = m.group(1), m.group(2)
    if len(host) > MAX_HOST_CHARS and not (len(host) == MAX_HOST_CHARS + 1
                                           and host.endswith(".")):
        return None
    # An empty label (``x..``, ``.x``, ``a..b``) names no host (one final dot is the root's)
    # and a port past 65535 no port: both were folded away (``x..`` matched ``hosts: [x]``,
    # ``x:99999`` too; found by a hostile review), where an app's own routing may not.
    if port is not None and int(port) > MAX_PORT:
        return None
    if host[0] == "." or ".." in host:
        return None
    if host[0] == "[":
        canonical = canonical_ipv6(host[1:-1])
        if canonical is None:
            return None
        return canonical, port or ""
    if ipv4_problem(host) is not None:
        return None
    return host.lower(), port or ""


def canonical_ipv6(text: str) -> str | None:
    """The one form an IPv6 address is compared in (RFC 5952: lower case, no leading zeros,
    the longest run of zero fields as ``::``), in brackets -- or, for an IPv4-mapped address
    (``::ffff:a.b.c.d`` in any spelling), the IPv4 address itself, which is what an app on a
    dual-stack socket sees; None when ``text`` is not an IPv6 address (a zone id is not
    part of one here)."""
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    if addr.scope_id is not None:
        return None
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return f"[{addr.compressed}]"


def ipv4_problem(host: str) -> str | None:
    """Why a reg-name that ends in a number is not an IPv4 address written one way, or None
    (also None for a name that does not end in a number: not an address). The WHATWG URL
    parser and ``inet_aton`` read a name whose last label is a number (decimal, or hex
    with ``0x``) as an IPv4 address of one to four parts, each decimal, octal (a leading 0)
    or hex: ``127.1``, ``0177.0.0.1``, ``0x7f000001`` and ``2130706433`` are all 127.0.0.1
    to them, and a policy comparing names would not see it."""
    name = host.rstrip(".")
    last = name.rpartition(".")[2]
    if not (last.isdigit() or last[:2] in ("0x", "0X")):
        return None
    parts = name.split(".")
    if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and (p == "0" or p[0] != "0")
                               and int(p) <= 255 for p in parts):
        return None
    return ("a host ending in a number is an IPv4 address: write it as four decimal numbers "
            "without leading zeros (127.0.0.1)")


def _check_host(host: bytes | None) -> str:
    """``host`` (the Host field's value) lower-cased as a str if ``split_host`` accepts it,
    else ``BadRequest("bad_host")``; kept."""
    if host is None:  # no Host field
        raise BadRequest("bad_host")
    value = host.decode("latin-1")
    if split_host(value) is None:
        raise BadRequest("bad_host")
    name = value.lower()
    if len(_HOSTS) >= _HOSTS_MAX:
        _HOSTS.clear()
    _HOSTS[host] = name
    return name


def head_refusal(method: str, host: str) -> None:
    """``BadRequest`` when ``check_head`` would refuse this method or (non-empty) Host --
    for readers outside the data path (``policy explain``) that must agree with it."""
    try:
        raw_method, raw_host = method.encode("ascii"), host.encode("latin-1")
    except UnicodeEncodeError:
        raise BadRequest("bad_method" if not method.isascii() else "bad_host") from None
    _check_method(raw_method)
    if host:
        _check_host(raw_host)


def _check_method(method: bytes) -> str:
    """``method`` as a str if it is one the data path serves, else ``BadRequest``; kept."""
    if _METHOD.fullmatch(method) is None:
        raise BadRequest("bad_method")
    if method == b"CONNECT" or method == b"TRACE":
        raise BadRequest("method_not_allowed", method.decode("latin-1"))
    name = method.decode("ascii")
    if len(_METHODS) < _METHODS_MAX:
        _METHODS[method] = name
    return name
