"""h11 as the parser of everything that arrives from the network.

Theory of operation: requests arriving at the inbound listener and responses coming back
from a peer sidecar are parsed by h11, event by event, exactly as h11 reads them. h11 is only
the *reader* here: what the sidecar sends is serialised by ``sidecar.http.wire`` from values
that were already validated, so h11's send path (which validates every header again and runs
the state machine a second time) is not on the data path.

* ``H11RequestReader``: an h11 SERVER connection per request. When a request has been read
  to its end, the next one is parsed by a fresh h11 connection that receives the bytes left
  over (pipelined requests included) -- h11 cannot start a new cycle before it has seen the
  response go out, and the response does not go through it.
* ``H11ResponseReader``: an h11 CLIENT connection per exchange, told which request it is
  answering by a template request of the same method (the answer to HEAD has no body; a 101
  is only valid after an Upgrade). The template's bytes are discarded.

Both return the ``sidecar.http.wire`` events, and raise ``wire.ParseError`` for whatever
h11 refuses (its status hint kept: 431 for an oversized head).
"""

from __future__ import annotations

import h11

from sidecar.http.wire import (
    CLOSED,
    END,
    NEED_DATA,
    PAUSED,
    Headers,
    MessageReader,
    ParseError,
    Request,
    Response,
    keep_alive_of,
)

_END = h11.EndOfMessage()


def _headers(h: h11._headers.Headers) -> Headers:
    items = getattr(h, "_full_items", None)
    if items is None:  # pragma: no cover -- another h11 layout: the public, slower way
        return list(h)
    return [(n, v) for _, n, v in items]


def _parse_error(exc: h11.RemoteProtocolError) -> ParseError:
    hint = exc.error_status_hint
    if hint == 431:
        return ParseError("header_too_large", 431)
    return ParseError("malformed_http", hint if 400 <= hint < 500 else 400)


def _next(conn: h11.Connection) -> object:
    """The next h11 event as a wire event; heads are returned as h11 events for the caller."""
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise _parse_error(exc) from exc
    t = type(event)
    if t is h11.Data:
        data = event.data
        return data if type(data) is bytes else bytes(data)  # h11 may hand a bytearray
    if t is h11.EndOfMessage:
        return END
    if event is h11.NEED_DATA:
        return NEED_DATA
    if event is h11.PAUSED:
        return PAUSED
    if t is h11.ConnectionClosed:
        return CLOSED
    return event


class H11RequestReader:
    """Requests from the network, one h11 server connection per request.

    h11 parses the heads. A chunked body is *not* left to h11: it accepts any bytes after the
    ';' of a chunk-size line (a bare CR, NUL, controls) and up to 20 hex digits, and hands
    out every chunk as its own event. Once a chunked head has been read, the bytes h11 holds
    go to ``sidecar.http.wire.MessageReader``'s chunk parser (RFC 9112 7.1.1 extensions only,
    bounded chunk-size lines, framing overhead bounded, small chunks coalesced); the next
    request is parsed by a fresh h11 connection from what it leaves over.
    """

    __slots__ = ("conn", "max_head", "keep_alive", "body")

    def __init__(self, max_head: int) -> None:
        self.max_head = max_head
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.keep_alive = True
        self.body: MessageReader | None = None  # the chunked body being read, if any

    def feed(self, data: bytes) -> None:
        if self.body is not None:
            self.body.feed(data)
        else:
            self.conn.receive_data(data)

    def next_event(self) -> object:
        body = self.body
        if body is not None:
            return body.next_event()
        event = _next(self.conn)
        if type(event) is h11.Request:
            headers = _headers(event.headers)
            size = len(event.method) + len(event.target) + sum(
                len(n) + len(v) + 4 for n, v in headers)
            if size > self.max_head:
                # h11 bounds only a head still incomplete: one that arrived whole in a single
                # read could be larger than the limit. Enforce it exactly.
                raise ParseError("header_too_large", 431)
            self.keep_alive = keep_alive_of(headers, event.http_version)
            if any(n == b"transfer-encoding" for n, _ in headers):
                # h11 accepted only "chunked" (anything else is a 501 already).
                body = self.body = MessageReader(requests=True, max_head=self.max_head)
                data, closed = self.conn.trailing_data
                body.start_chunked(data)
                if closed:
                    body.feed(b"")
            return Request(event.method, event.target, headers, event.http_version)
        return event

    def buffered(self) -> bool:
        if self.body is not None:
            return self.body.buffered()
        return bool(self.conn.trailing_data[0])

    def trailing(self) -> bytes:
        if self.body is not None:
            return self.body.trailing()
        return self.conn.trailing_data[0]

    def start_next(self) -> None:
        body = self.body
        if body is not None:
            data, closed = body.trailing(), body._eof
            self.body = None
        else:
            data, closed = self.conn.trailing_data
        conn = self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
        if data:
            conn.receive_data(data)
        if closed:
            conn.receive_data(b"")

    def at_rest(self) -> bool:
        """The current request was read to its end and nothing more has arrived."""
        if self.body is not None:
            return self.body.at_rest()
        conn = self.conn
        if conn.their_state is h11.SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if type(event) is not h11.EndOfMessage:
                return False
        if conn.their_state not in (h11.DONE, h11.IDLE):
            return False
        return not conn.trailing_data[0]


_templates: dict[tuple[bytes, bool], h11.Request] = {}


def _template(method: bytes, upgrade: bool) -> h11.Request:
    key = (method, upgrade)
    req = _templates.get(key)
    if req is None:
        headers = [(b"host", b"upstream")]
        if upgrade:
            headers += [(b"connection", b"upgrade"), (b"upgrade", b"upstream")]
        req = h11.Request(method=method, target=b"/", headers=headers)
        if len(_templates) < 64:
            _templates[key] = req
    return req


class H11ResponseReader:
    """Responses from the network, one h11 client connection per exchange."""

    __slots__ = ("conn", "max_head", "keep_alive")

    def __init__(self, max_head: int) -> None:
        self.max_head = max_head
        self.conn: h11.Connection | None = None
        self.keep_alive = True

    def expect_response(self, method: bytes, upgrade: bool = False) -> None:
        old = self.conn
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_head)
        conn.send(_template(method, upgrade))
        conn.send(_END)
        if old is not None:
            data, closed = old.trailing_data
            if data:
                conn.receive_data(data)
            if closed:
                conn.receive_data(b"")
        self.conn = conn

    def feed(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.receive_data(data)

    def next_event(self) -> object:
        assert self.conn is not None
        event = _next(self.conn)
        t = type(event)
        if t is h11.Response or t is h11.InformationalResponse:
            headers = _headers(event.headers)
            self.keep_alive = keep_alive_of(headers, event.http_version)
            return Response(event.status_code, event.reason, headers, event.http_version)
        return event

    def buffered(self) -> bool:
        return self.conn is not None and bool(self.conn.trailing_data[0])

    def trailing(self) -> bytes:
        return self.conn.trailing_data[0] if self.conn is not None else b""

    def reusable(self) -> bool:
        conn = self.conn
        return (conn is not None and conn.our_state is h11.DONE
                and conn.their_state is h11.DONE and not conn.trailing_data[0])

    def message_complete(self) -> bool:
        conn = self.conn
        return conn is not None and conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
