"""One HTTP/1.1 request on a fresh connection, with h11 over Trio (TLS by stdlib ``ssl``).

Theory of operation
-------------------
Every control-plane call the sidecar makes (a JWKS or discovery document, a token
introspection, an alert webhook post, a kubelet probe forwarded to the app) is one request on
its own connection: ``Connection: close``, no pooling, no redirects, no compression. What
differs between callers is data, not code: the URL, the TLS context (``None`` for plain
``http``), the request headers and body, and the bounds.

Bounds: connecting (TCP and the TLS handshake) runs under ``connect_timeout``; writing the
request and reading the answer under ``read_timeout``; the response head is at most
``max_head_bytes`` (h11's incomplete-event limit) and the body at most ``max_body_bytes``
(checked against ``Content-Length`` first, then while reading). With ``read_body=False`` the
call returns as soon as the status line and headers are in (a probe or a webhook post only
wants the status). 1xx informational answers are skipped, at most ``MAX_INFORMATIONAL``. A
response with both ``Content-Length`` and ``Transfer-Encoding`` is refused (h11 would let the
chunked coding win), and so is a head h11 reads but the data path would refuse: a status
outside 100-599, an HTTP version other than 1.0 and 1.1, a control character in the reason
phrase or a field value (``_check_head``), and every head the data path's reader refuses
(``_check_raw_head``: a bare LF or CR, obs-fold, a repeated or listed Content-Length, one
of more than 18 digits, Transfer-Encoding on HTTP/1.0); h11 itself refuses other status lines (``000``,
``1000``, letters) and a ``101`` the request did not ask for.

The deadlines bound the time, not the work: parsing happens between reads, so a server that
sends a 1 MiB body as one-byte chunks made the event loop parse a million chunks (13 s of
CPU, every other task of the sidecar waiting) and one that streams ``100 Continue`` kept it
parsing until the deadline. So the body may arrive in at most ``MIN_BODY_PIECES +
max_body_bytes // MIN_MEAN_PIECE_BYTES`` pieces (h11 ``Data`` events: chunks, or reads of a
``Content-Length`` body), and at most ``MAX_INFORMATIONAL`` 1xx answers may come first.

Every failure is one ``ClientError`` (``ClientTimeout`` for a deadline) with the cause
chained; its message names the server and the failure, never the request headers or body,
which may carry secrets. Callers map it to their own outcome (keep the last keys, refuse the
token, count a failed post, answer 503).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from sidecar.http.wire import MessageReader, ParseError

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_MAX_HEAD_BYTES = 16 * 1024
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_USER_AGENT = "trio-mesh-sidecar"
MAX_INFORMATIONAL = 8
MIN_BODY_PIECES = 64
MIN_MEAN_PIECE_BYTES = 512
_READ_CHUNK = 65536
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
# What a reason phrase or a field value may not hold (RFC 9110 5.5, RFC 9112 4): the controls
# but HTAB, and DEL. h11 lets them through (it refuses only CR, LF and NUL).
_CONTROLS = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"


class ClientError(Exception):
    """A control-plane request failed; the message says why (for logs, never for clients)."""


class ClientTimeout(ClientError):
    """Connecting or the exchange did not finish within its deadline."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: scheme, the address to connect to, the request-target, Host."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    target: str  # path and query, as sent on the request line
    authority: str  # the Host header

    @property
    def label(self) -> str:
        """``scheme://authority/target`` for messages (no user info)."""
        return f"{self.scheme}://{self.authority}{self.target}"


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def shown_url(url: str) -> str:
    """``url`` as an error message may show it: its scheme and authority without userinfo,
    and no path or query -- a webhook's path or query often is its secret (Slack's
    /services/T/B/SECRET, ?token=), and these messages reach the log, ``/policy``'s
    ``last_reload_error`` and ``sidecar check`` (found by a hostile review: a typo in a port
    put the whole URL there)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(not shown: no scheme://)"
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    hidden = " (path and query not shown)" if len(rest) > len(authority) else ""
    return repr(f"{scheme[:20]}://{authority[:200]}") + hidden


def parse_url(url: str, *, schemes: Sequence[str] = ("http", "https")) -> Target:
    """Split ``url``; ``ClientError`` unless its scheme is one of ``schemes`` with a host.

    The host must be an IP address or an ASCII DNS name (labels of 1-63 letters, digits,
    ``-`` or ``_``; IDNs in their ``xn--`` form) and the path and query printable ASCII: a
    URL from a document someone else wrote (OpenID metadata's ``jwks_uri``) is refused here,
    not by an encoder deep in the resolver or the HTTP codec."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:
        raise ClientError(f"not a URL: {shown_url(url)}") from exc
    if parts.scheme not in schemes or not hostname:
        wanted = " or ".join(schemes)
        raise ClientError(f"not an {wanted} URL: {shown_url(url)}")
    if not _valid_host(hostname):
        raise ClientError(f"not a host name or address in URL: {shown_url(url)}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ClientError(f"bad port in URL: {shown_url(url)}") from exc
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not all(33 <= ord(c) < 127 for c in target):
        raise ClientError(f"the path of a URL must be printable ASCII: {shown_url(url)}")
    return Target(parts.scheme, hostname, port, target, parts.netloc.rpartition("@")[2])


@dataclass(frozen=True, slots=True)
class Response:
    """The status, headers and (unless not read) body of one answer."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


async def request(
    target: Target | str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    read_body: bool = True,
    user_agent: str = DEFAULT_USER_AGENT,
) -> Response:
    """Send one request and return the answer; ``ClientError`` for every failure.

    ``https`` needs ``ssl_context`` (it decides what is checked: chain, host name, client
    certificate); ``server_hostname`` overrides the name sent and checked (default: the
    URL's host).
    """
    where = parse_url(target) if isinstance(target, str) else target
    if where.scheme == "https" and ssl_context is None:
        raise ClientError(f"{where.label}: https needs a TLS context")
    stream = await _connect(where, ssl_context if where.scheme == "https" else None,
                            server_hostname, connect_timeout)
    try:
        with trio.fail_after(read_timeout):
            return await _exchange(stream, where, method, headers, body, max_head_bytes,
                                   max_body_bytes, read_body, user_agent)
    except trio.TooSlowError as exc:
        raise ClientTimeout(f"{where.label}: no complete response within {read_timeout}s") \
            from exc
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
            h11.ProtocolError) as exc:  # ssl.SSLError is an OSError
        raise ClientError(f"{where.label}: {exc!r}") from exc
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


async def _connect(where: Target, ssl_context: ssl.SSLContext | None,
                   server_hostname: str | None, timeout: float) -> trio.abc.Stream:
    address = f"{where.host}:{where.port}"
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(where.host, where.port)
            if ssl_context is not None:
                tls = trio.SSLStream(stream, ssl_context,
                                     server_hostname=server_hostname or where.host,
                                     https_compatible=True)
                stream = tls
                await tls.do_handshake()
            return stream
    except trio.TooSlowError as exc:
        error: ClientError = ClientTimeout(f"connect to {address} timed out")
        cause: BaseException = exc
    except (OSError, trio.BrokenResourceError, UnicodeError) as exc:
        # UnicodeError: a host name the resolver's IDNA encoder refuses (parse_url checks
        # URLs; a Target built by hand may still carry one).
        # A failed TLS handshake is a BrokenResourceError with no message of its own: name
        # its cause (a certificate or host-name mismatch) so the log says which.
        detail = str(exc) or repr(exc.__cause__ if exc.__cause__ is not None else exc)
        error, cause = ClientError(f"connect to {address} failed: {detail}"), exc
    if stream is not None:
        await trio.aclose_forcefully(stream)
    raise error from cause


async def _exchange(stream: trio.abc.Stream, where: Target, method: str,
                    headers: Sequence[tuple[str, str]], body: bytes, max_head_bytes: int,
                    max_body_bytes: int, read_body: bool, user_agent: str) -> Response:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
    all_headers = [("host", where.authority), *headers, ("user-agent", user_agent),
                   ("connection", "close")]
    if body or method not in ("GET", "HEAD"):
        all_headers.append(("content-length", str(len(body))))
    out = conn.send(h11.Request(method=method, target=where.target, headers=all_headers))
    if body:
        out += conn.send(h11.Data(data=body))
    await stream.send_all(out + conn.send(h11.EndOfMessage()))
    received = bytearray()
    head: h11.Response | None = None
    raw = bytearray()  # the bytes received until the final head (``_check_raw_head``)
    raw_start = 0  # where the next head begins in ``raw``
    pieces = MIN_BODY_PIECES + max_body_bytes // MIN_MEAN_PIECE_BYTES
    informational = MAX_INFORMATIONAL
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            # Until the head is in, read at most max_head_bytes at a time (h11 only checks
            # the size of an incomplete head).
            data = await stream.receive_some(
                _READ_CHUNK if head is not None else min(_READ_CHUNK, max_head_bytes))
            if head is None:
                raw += data
            conn.receive_data(bytes(data))  # b"" marks EOF; h11 then reports an error or the end
            continue
        if isinstance(event, h11.Response):
            _check_head(event)
            head = event
            names = {name for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                # h11 lets the chunked coding win; what framed this answer is ambiguous,
                # so it is refused, as the data path refuses it (RFC 9112 6.3).
                raise ClientError("response has both Content-Length and Transfer-Encoding")
            _check_raw_head(raw, raw_start)
            del raw[:]
            if not read_body:
                return Response(event.status_code, tuple(event.headers))
            for name, value in event.headers:
                if name == b"content-length" and int(value) > max_body_bytes:
                    raise ClientError(f"response of {int(value)} bytes is too large")
        elif isinstance(event, h11.Data):
            received += event.data
            if len(received) > max_body_bytes:
                raise ClientError(f"response larger than {max_body_bytes} bytes")
            pieces -= 1
            if pieces < 0:
                raise ClientError("response body in too many pieces (tiny chunks)")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None  # h11 yields a Response before any body
            return Response(head.status_code, tuple(head.headers), bytes(received))
        elif isinstance(event, h11.ConnectionClosed):
            raise ClientError("connection closed before the response ended")
        elif isinstance(event, h11.InformationalResponse):
            _check_head(event)
            raw_start = _check_raw_head(raw, raw_start)
            informational -= 1
            if informational < 0:
                raise ClientError(f"more than {MAX_INFORMATIONAL} informational (1xx) answers")


def _check_raw_head(raw: bytearray, start: int) -> int:
    """The end of the head h11 just read, which begins at ``raw[start]``; ``ClientError``
    unless the data path's reader (``sidecar.http.wire``) reads those bytes as a head too.
    h11 ends lines at a bare LF, unfolds obs-fold (RFC 9112 5.2) and takes a repeated or
    listed Content-Length with equal values, more than 18 digits of one, and
    Transfer-Encoding on an HTTP/1.0 answer, all of which the data path refuses: a head that
    means one thing to a lenient parser and another to a strict one is not believed (found
    by a hostile review)."""
    end = raw.find(b"\r\n\r\n", start)
    if end < 0:  # (h11 ended the head at a bare LF)
        raise ClientError("response head with a line not ended by CRLF")
    reader = MessageReader(requests=False, max_head=end + 4 - start)
    reader.expect_response(b"GET")
    reader.feed(raw[start:end + 4])
    try:
        reader.next_event()
    except ParseError as exc:
        raise ClientError(f"response head refused ({exc.reason})") from None
    return end + 4


def _check_head(event: h11.Response | h11.InformationalResponse) -> None:
    """Refuse what h11 accepts but the data path's reader (``sidecar.http.wire``) would not:
    a status outside 100-599 (h11 takes any three digits from 100: ``600``-``999``), an HTTP
    version other than 1.0 and 1.1 (``HTTP/0.9``), a control character in the reason
    phrase or a field value (an ESC, a BEL, DEL). A probe must not read ``200 O\\x1bK`` as
    healthy, nor relay a ``999`` to the kubelet as the app's answer."""
    status = event.status_code
    if not 100 <= status <= 599:
        raise ClientError(f"status {status} is not an HTTP status (100-599)")
    if event.http_version not in (b"1.0", b"1.1"):
        raise ClientError("response is not HTTP/1.0 or HTTP/1.1")
    if len(event.reason.translate(None, _CONTROLS)) != len(event.reason):
        raise ClientError("control character in the response's reason phrase")
    for _, value in event.headers:
        if len(value.translate(None, _CONTROLS)) != len(value):
            raise ClientError("control character in a response header value")
