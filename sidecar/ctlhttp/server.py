"""A small bounded HTTP/1.1 server (h11 over Trio, TLS optional) for the control plane.

Theory of operation
-------------------
The admin and health servers and the admission webhook are the same server with different
routes and bounds (``ServerLimits``). ``serve`` listens (on an IP address as the data path
does, ``sidecar.net.listen.open_listener``: ``[::]`` is dual stack; ``_open_listeners``), and
for each connection:

* Connection limits, checked at accept: at most ``max_connections`` at once and at most
  ``max_connections_per_source`` from one source address. A connection beyond the
  per-source share is closed unserved at once (it costs the neighbour nothing to retry, and
  the other sources, the kubelet or the API server, keep theirs). At ``max_connections``
  either (``wait_for_slot``: the webhook, which must not drop the API server) accepting
  pauses, so extra clients wait in the kernel backlog instead of growing our memory; or the
  newcomer (within its share) takes the slot of the oldest connection of another address
  that has not completed a request head -- silent since it opened, half-way through a head,
  or idle between keep-alive requests; its cancel scope is cancelled (``_Slot``,
  ``_idle_victim``) -- as the inbound listener's ``handshake_evicted`` does for handshakes.
  Before the thirty-first session only the heaviest source lost a connection: one local
  process holding one silent connection from each of 64 loopback addresses (Linux lets any
  process use any address of 127.0.0.0/8) took every slot, no source was over another, and
  every other local client was refused (found by a hostile review). A connection whose head
  is complete -- being answered, a ``/tap`` long poll -- is never taken by that rule, nor
  one of the newcomer's own address (its share is its own: a newcomer over it is refused as
  before, and may be served by the probe reserve below). When there is no such connection,
  a newcomer whose *source group* (``source_group``: every loopback address is one, an
  IPv6 address its /64, any other address itself) holds at least two fewer connections
  than the heaviest group takes the oldest connection of the address holding the most in
  that group, and failing that the same rule by address (``_heaviest``; several neighbours
  within their shares filled every slot, and the kubelet was refused; the groups since the
  thirty-first session: busy connections from many loopback addresses, one each, kept a
  newcomer from another host out of a non-loopback port); any other newcomer is closed
  unserved. Each refusal, and each connection closed to make room, is reported through
  ``on_refused(reason)``. With a ``probe_reserve``, a connection these limits would refuse
  is served from the reserve instead, for ``probe_paths`` only (one request,
  ``RESERVE_HEAD_TIMEOUT``, 429 for any other path; when full, a newcomer takes the
  reserve's oldest connection); it counts as refused unless it asked for a probe path. The
  local clients of a loopback port usually share one address (127.0.0.1), and one
  scraper's share left the probes unanswered.
* TLS (``tls`` given): the context is read at accept time, so a certificate swapped by a
  reload serves new handshakes while open connections keep theirs; the handshake runs under
  ``handshake_timeout``.
* Requests: up to ``max_requests_per_connection`` on one connection. The head must arrive
  within ``head_timeout`` (the first) or ``idle_timeout`` (the next ones: the keep-alive
  idle time; a head begun but not finished by then is answered 408 and the connection
  closed, one not begun is just closed) and be at most ``max_head_bytes``, counted as the
  data path counts it: every byte up to and including the final CRLFCRLF, 431 beyond (while
  a head is awaited, no read goes past what is left of that limit beside the bytes h11
  holds, so that an oversized head is seen incomplete, and refused, by h11, or is one byte
  over once complete and refused by ``next_event``; before the twenty-sixth session a head
  of the limit plus one byte was served); a body is read only
  when the handler asks (``Request.read_body(limit)``, under ``request_timeout`` from the
  head), and a body the handler did not read is skipped if it is at most
  ``discard_body_bytes``, otherwise the answer closes the connection. Body bytes held while
  being read count against a budget shared by all connections (``body_budget_bytes``) and by
  those of one source address (``body_budget_per_source``): a declared ``Content-Length`` is
  reserved before a byte of the body is read, a chunked body as it grows, and given back
  when ``read_body`` returns or fails (an error, the client gone, a cancellation). A body
  that does not fit is not read: ``BodyOverBudget`` (a generic 503 unless the handler
  answers it, and the connection closes). Before the twenty-fifth session only the
  connection limits bounded it: a hostile review held 60 webhook connections of one source,
  each with a 3 MiB body all but one byte sent, and the webhook grew by 210 MiB (its limit:
  256 MiB). The answer must be written within ``write_timeout``. A malformed request gets
  ``bad_request(status)`` and the connection closes; so does a request framed by both
  ``Content-Length`` and ``Transfer-Encoding``, which h11 would read as chunked (the data
  path refuses it too). An absolute-form target (``GET http://127.0.0.1:9901/readyz``: RFC
  9112 3.2.2, a server must accept it; before the twenty-fourth session it was a path no
  route had, 404) is served as its path and query, its authority in ``Request.authority``
  (the admin port's loopback Host rule reads it too); one with no host or with userinfo
  (``http://user@host/``) is refused 400. Before closing with input possibly unread, the
  server *lingers* (half-close, discard briefly and boundedly) so the kernel does not reset
  the connection and destroy the answer. Status lines carry the canonical reason phrase
  (``sidecar.errors.reason_phrase``).
* A handler that raises gets a generic 500 and the log line ``error_event``; a connection
  that fails in any way never stops the server. The stream is closed in ``finally``
  (TLS close_notify bounded to 1 s, then forcefully).

``task_status.started(port)`` reports the bound port once listening (port 0 works in tests;
a name that resolves to several addresses with port 0 is served on the first only).
"""

from __future__ import annotations

import errno
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import h11
import trio

from sidecar.ctlhttp.reply import Reply
from sidecar.errors import reason_phrase
from sidecar.logs import log
from sidecar.net.listen import SourceLimiter, open_listener, source_address
from sidecar.net.transport import MAX_HANDSHAKE_READS

LINGER_SECONDS = 1.0
RESERVE_HEAD_TIMEOUT = 2.0
LINGER_MAX_BYTES = 256 * 1024
_READ_SIZE = 65536
# accept() errors that mean "out of resources for now": pause and go on (as trio does).
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds of one server (see the module docstring; docs/operations.md lists the values)."""

    max_head_bytes: int = 8 * 1024
    head_timeout: float = 10.0
    write_timeout: float = 10.0
    max_requests_per_connection: int = 100
    max_connections: int = 64
    max_connections_per_source: int = 32
    keep_alive: bool = True  # False: every answer says Connection: close
    idle_timeout: float | None = None  # head of a later request; None: head_timeout
    request_timeout: float = 10.0  # reading a body the handler asked for
    handshake_timeout: float = 5.0  # TLS only
    discard_body_bytes: int = 0  # unread body skipped to keep the connection
    wait_for_slot: bool = False  # at max_connections: True waits, False closes
    # Connections beyond the limits that are still served for these paths only (one request,
    # RESERVE_HEAD_TIMEOUT for the head; any other path is a 429): see ``serve``.
    probe_paths: frozenset[str] = frozenset()
    probe_reserve: int = 0
    # Body bytes held while being read, by all connections and by those of one source
    # address (``Request.read_body``; <= 0: no bound). A body that does not fit is refused
    # before it is read (``BodyOverBudget``).
    body_budget_bytes: int = 4 * 1024 * 1024
    body_budget_per_source: int = 1024 * 1024


class BodyTooLarge(Exception):
    """The request body is over the limit the handler gave (answer 413)."""


class BodyOverBudget(Exception):
    """The request body does not fit the bytes the server may hold for bodies being read
    (``ServerLimits.body_budget_bytes``, ``body_budget_per_source``): answer 503 and close."""


class _BodyBudget:
    """Body bytes held while being read, by the whole server and per source address; pure
    bookkeeping. Entries exist only while a source holds bytes."""

    __slots__ = ("total", "per_source", "held", "_by_source")

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.held = 0
        self._by_source: dict[str, int] = {}

    def take(self, source: str, size: int) -> bool:
        """Hold ``size`` more bytes for ``source``; False (nothing held) if they do not fit."""
        mine = self._by_source.get(source, 0)
        if (0 < self.total < self.held + size) or (0 < self.per_source < mine + size):
            return False
        self.held += size
        self._by_source[source] = mine + size
        return True

    def give(self, source: str, size: int) -> None:
        """``size`` bytes held for ``source`` are no longer held."""
        self.held -= size
        mine = self._by_source.get(source, 0) - size
        if mine > 0:
            self._by_source[source] = mine
        else:
            self._by_source.pop(source, None)


def source_group(address: str) -> str:
    """The group a source address is counted in when the server is full and one source must
    give up a connection to another (``serve``): ``127.0.0.1`` and ``::1`` are
    ``localhost``, every other loopback address (the rest of 127.0.0.0/8, and their
    IPv4-mapped forms) is ``loopback`` -- one process may connect from any of them (Linux
    routes the whole /8 to ``lo``) --, a global, unique-local
    or site IPv6 address is its /64 (``2001:db8:1:2::/64``: one host or pod is given a whole
    prefix as easily as one address), a link-local IPv6 address stays itself (every host on
    the link shares fe80::/64), and any other address, or a text that is no address, is
    itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        # (127.0.0.1 and ::1, where every local client connects from unless it binds
        # another address on purpose, are a group of their own: a process that holds the
        # server from many other loopback addresses -- busy, long polls or unread answers --
        # is then the heaviest group, and 127.0.0.1 takes a slot from it; found by a review
        # of the thirty-first session's fix, which grouped all of 127/8 with 127.0.0.1)
        return "localhost" if int(ip) in (0x7F000001, 1) else "loopback"
    if isinstance(ip, ipaddress.IPv4Address) or ip.is_link_local or ip.is_unspecified:
        return str(ip)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class _Slot:
    """One connection being served in one of ``serve``'s slots (not the probe reserve), as
    the accept loop sees it: its source address and group, the scope that closes it, and
    whether it is waiting for a request head (from its accept -- the TLS handshake
    included -- until a head is complete, and again between keep-alive requests; a head
    half sent counts as waiting). Only such a connection is taken for a newcomer by the
    oldest-waiting rule (``serve``)."""

    __slots__ = ("address", "group", "scope", "awaiting_head")

    def __init__(self, address: str) -> None:
        self.address = address
        self.group = source_group(address)
        self.scope = trio.CancelScope()
        self.awaiting_head = True


def victim_slot(served: Sequence[_Slot], newcomer: str) -> _Slot | None:
    """Of ``served`` (oldest first), the connection a newcomer from address ``newcomer``
    takes the slot of on a full server: the oldest one still waiting for a request head,
    from another address (whatever its group; a newcomer's own address's connections are
    its own: a client that fills the server with them gains nothing by closing one); else
    one of the heaviest group, else of the heaviest address, when it holds at least two
    more than the newcomer's (``heaviest_slot``; the module docstring). None: no one is
    over its share."""
    for slot in served:
        if slot.awaiting_head and slot.address != newcomer and not slot.scope.cancel_called:
            return slot
    return (heaviest_slot(served, source_group(newcomer), lambda slot: slot.group)
            or heaviest_slot(served, newcomer, lambda slot: slot.address))


def heaviest_slot(served: Iterable[_Slot], newcomer: str,
                  key: Callable[[_Slot], str]) -> _Slot | None:
    """Of ``served`` (oldest first), the connection to close, not yet closed, in the source
    (``key``: a connection's group or its address) holding the most, if that source holds at
    least two more than the newcomer's source ``newcomer`` will once it is let in (else None:
    no one is over its share): the oldest connection of the address holding the most in that
    source (within a group, the address that filled it loses first, not another client of
    the same /64, such as the kubelet beside the pods of its node)."""
    live: dict[str, list[_Slot]] = {}
    for slot in served:
        if not slot.scope.cancel_called:
            live.setdefault(key(slot), []).append(slot)
    if not live:
        return None
    heaviest = max(live, key=lambda src: len(live[src]))
    if len(live[heaviest]) < len(live.get(newcomer, ())) + 2:
        return None
    by_address: dict[str, list[_Slot]] = {}
    for slot in live[heaviest]:
        by_address.setdefault(slot.address, []).append(slot)
    return max(by_address.values(), key=len)[0]


class _Closed(Exception):
    """The peer went away or did not keep up."""


class _TooSlow(_Closed):
    """The deadline came while waiting for the peer's bytes."""


class Request:
    """One request as the handler sees it: method, path (no query), headers, and its body on
    demand."""

    def __init__(self, conn: _Connection, head: h11.Request, deadline: float,
                 target: str | None = None, authority: str | None = None) -> None:
        self._conn = conn
        self.method = head.method.decode("ascii", "replace")
        # (``target``: the origin form of an absolute-form target, ``origin_form``; its
        # authority in ``authority``, None for an origin-form target)
        self.target = head.target.decode("latin-1") if target is None else target
        self.authority = authority
        self.path = self.target.split("?", 1)[0]
        self.headers: Sequence[tuple[bytes, bytes]] = head.headers
        self.deadline = deadline

    async def read_body(self, limit: int) -> bytes:
        """The whole body (at most ``limit`` bytes, by ``request_timeout``); ``BodyTooLarge``
        when it is over, ``BodyOverBudget`` when the server holds too many bodies being read
        (the module docstring). The bytes are counted in the budget until this returns."""
        declared = 0
        for name, value in self.headers:
            if name == b"content-length":
                declared = int(value)
                if declared > limit:
                    raise BodyTooLarge()
        conn = self._conn
        budget, source = conn.budget, conn.source
        # The declared length is held before a byte of the body is read; a chunked body's
        # bytes as they come.
        if declared and not budget.take(source, declared):
            raise BodyOverBudget()
        held = declared
        chunks: list[bytes] = []
        try:
            size = 0
            while True:
                event = await conn.next_event(self.deadline)
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > limit:
                        raise BodyTooLarge()
                    if size > held:
                        if not budget.take(source, size - held):
                            raise BodyOverBudget()
                        held = size
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                else:
                    raise _Closed()
        finally:
            chunks.clear()  # (a traceback that keeps this frame keeps no body bytes)
            if held:
                budget.give(source, held)


Handler = Callable[[Request], Awaitable[Reply]]


class _Connection:
    """A stream plus an h11 server state machine, every wait bounded."""

    def __init__(self, stream: trio.abc.Stream, limits: ServerLimits, budget: _BodyBudget,
                 source: str) -> None:
        self.stream = stream
        self.limits = limits
        self.budget = budget
        self.source = source
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        self.refused_method = b""  # (a head parsed, then refused as too large: its method)
        self.head_start = b""  # (the first bytes of the head awaited: ``next_event``)

    def refused_a_head_request(self) -> bool:
        """Whether the head just refused (``h11.RemoteProtocolError``) is a HEAD's, whose
        answer has no body: read from its method when it was parsed, else from the first
        bytes of the head (``next_event`` keeps them). A HEAD with a header h11 refuses got the
        400's body after its head (found by the review of the thirty-fifth session's fix)."""
        if self.refused_method:
            return self.refused_method == b"HEAD"
        return self.head_start == b"HEAD "

    async def next_event(self, deadline: float) -> Any:
        while True:
            awaiting_head = self.h11.their_state is h11.IDLE
            held_before = 0
            if awaiting_head:
                buffered = self.h11.trailing_data[0]
                held_before = len(buffered)
                self.head_start = buffered[:64].lstrip(b"\r\n")[:5]
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                # A head is counted as the data path counts it (``sidecar.http.wire``): every
                # byte up to and including the final CRLFCRLF, at most ``max_head_bytes``.
                # h11 checks only an *incomplete* head (``> max_incomplete_event_size``), so
                # a head of the limit plus one byte, completed by its last byte, passed (as
                # did one pipelined whole behind a body); it is counted here, once parsed.
                if awaiting_head and isinstance(event, h11.Request) and (
                        held_before - len(self.h11.trailing_data[0])
                        > self.limits.max_head_bytes):
                    self.refused_method = event.method
                    raise h11.RemoteProtocolError("request head too large",
                                                  error_status_hint=431)
                return event
            # While a head is awaited, read no more than what is left of max_head_bytes
            # beside what h11 holds already: h11 only checks the size of an *incomplete*
            # head, so a read past the limit could complete an oversized one (reads of the
            # whole limit each let two of them make a head of twice the limit: found by a
            # hostile review).
            size = _READ_SIZE
            if self.h11.their_state is h11.IDLE:
                held = len(self.h11.trailing_data[0])
                size = max(1, min(_READ_SIZE, self.limits.max_head_bytes - held))
            with trio.move_on_at(deadline):
                try:
                    data = await self.stream.receive_some(size)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _Closed() from exc
                self.h11.receive_data(bytes(data))
                continue
            raise _TooSlow()

    async def finish_body(self, deadline: float, wait: bool) -> bool:
        """Whether the request is complete, once a body the handler did not read is skipped
        (at most ``discard_body_bytes``, and only when ``wait``); False: close after the
        answer."""
        if self.h11.their_state is not h11.SEND_BODY:
            return self.h11.their_state is h11.DONE
        try:
            # No waiting yet: a body-less request has its end already parsed.
            event = self.h11.next_event()
        except h11.RemoteProtocolError:
            return False
        if isinstance(event, h11.EndOfMessage):
            return True
        budget = self.limits.discard_body_bytes
        if not wait or budget <= 0:
            return False
        if isinstance(event, h11.Data):
            budget -= len(event.data)
        while budget >= 0 and self.h11.their_state is h11.SEND_BODY:
            event = await self.next_event(deadline)
            if isinstance(event, h11.Data):
                budget -= len(event.data)
            elif isinstance(event, h11.ConnectionClosed):
                return False
        return budget >= 0

    def head_started(self) -> bool:
        """Whether some bytes of a next request head have arrived (h11 holds them)."""
        return self.h11.their_state is h11.IDLE and bool(self.h11.trailing_data[0])

    async def send_timeout(self, reply: Reply, base_headers: Sequence[tuple[str, str]]) -> bool:
        """Write ``reply`` (a 408) while no request head is complete, then close. h11 sends
        a response only to a request it has read, so this head is written here, in the same
        form as ``send``'s."""
        fields = [("content-type", reply.content_type), ("content-length", str(len(reply.body))),
                  *base_headers, *reply.headers, ("connection", "close")]
        data = (f"HTTP/1.1 {reply.status} {reason_phrase(reply.status)}\r\n".encode()
                + b"".join(f"{k}: {v}\r\n".encode() for k, v in fields) + b"\r\n" + reply.body)
        return await self._write(data)

    async def send(self, reply: Reply, head_only: bool, close: bool,
                   base_headers: Sequence[tuple[str, str]]) -> bool:
        headers = [("content-type", reply.content_type),
                   ("content-length", str(len(reply.body))), *base_headers, *reply.headers]
        if close:
            headers.append(("connection", "close"))
        data = b""
        try:
            head = h11.Response(status_code=reply.status, headers=headers,
                                reason=reason_phrase(reply.status))
            data = self.h11.send(head) or b""
            if reply.body and not head_only:
                data += self.h11.send(h11.Data(data=reply.body)) or b""
            data += self.h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # A HEAD whose head h11 could not parse: h11 does not know it is a HEAD's answer
            # and wants the body its Content-Length declares. The head alone is the answer,
            # and the connection closes after it (nothing more is read or sent on it).
            if not (head_only and close and data):
                return False
        return await self._write(data)

    async def _write(self, data: bytes) -> bool:
        """Send ``data`` within ``write_timeout``; False when it could not be sent."""
        with trio.move_on_after(self.limits.write_timeout):
            try:
                await self.stream.send_all(data)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return False

    async def linger(self) -> None:
        """Half-close, then discard what the client still sends, briefly and boundedly.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the answer just written before the client reads it (an oversized head, an unread
        body)."""
        with trio.move_on_after(LINGER_SECONDS):
            try:
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
                discarded = 0
                while discarded < LINGER_MAX_BYTES:
                    chunk = await self.stream.receive_some(_READ_SIZE)
                    if not chunk:
                        return
                    discarded += len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


def origin_form(target: str) -> tuple[str, str | None] | None:
    """``(target, authority)``: an absolute-form target (``http://host:port/path?query``,
    either scheme, any case) as its path and query (``/`` when it has no path) and its
    authority; any other target as it is, with None. None for an absolute-form target that
    names no host or carries userinfo (refused 400: nothing here is a proxy, and a user
    name before the host is how such targets fool a reader)."""
    if target[:1] == "/" or "://" not in target:
        return target, None  # origin form (nearly every request), or asterisk form
    scheme, _, rest = target.partition("://")
    if scheme.lower() not in ("http", "https"):
        return target, None  # not a URI this server knows: a path no route has (404)
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1 and i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if not authority or "@" in authority:
        return None
    if not tail.startswith("/"):
        tail = "/" + tail  # (``http://h?q``: the path is empty, the query stays)
    return tail, authority


def _framed_both_ways(head: h11.Request) -> bool:
    names = {name for name, _ in head.headers}
    return b"content-length" in names and b"transfer-encoding" in names


def _wants_close(head: h11.Request) -> bool:
    return any(key == b"connection" and b"close" in value.lower() for key, value in head.headers)


async def _open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """The sockets ``serve`` listens on. An IP address is opened as the data path opens its
    listeners (``sidecar.net.listen.open_listener``), so a wildcard means the same on every
    listener: ``[::]`` takes IPv4 clients too (dual stack; their source is the IPv4 address,
    ``source_address``). ``trio.open_tcp_listeners`` sets IPV6_V6ONLY, and a health server
    on ``[::]`` refused an IPv4 kubelet probe while the inbound listener on ``[::]`` took
    IPv4 (found by a hostile review). An empty host (every address: the webhook's ``:PORT``)
    or a name is resolved by ``trio.open_tcp_listeners`` as before: one listener per
    address (``localhost``: 127.0.0.1 and ::1)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return list(await trio.open_tcp_listeners(port, host=host or None))
    return [await open_listener(host, port)]


@dataclass(frozen=True, slots=True)
class _Site:
    """What one ``serve`` call does with each connection."""

    handler: Handler
    name: str
    limits: ServerLimits
    base_headers: tuple[tuple[str, str], ...]
    bad_request: Callable[[int], Reply]
    error_event: str
    budget: _BodyBudget  # body bytes being read, shared by every connection of the server


async def _next_head(conn: _Connection, deadline: float, slot: _Slot | None) -> Any:
    """The next event while a request head is awaited; ``slot`` (if any) says so meanwhile:
    the connection may be taken for a newcomer until the head is complete (``serve``), never
    while it is answered or answers a malformed head."""
    if slot is None:
        return await conn.next_event(deadline)
    slot.awaiting_head = True
    try:
        return await conn.next_event(deadline)
    finally:
        slot.awaiting_head = False


async def _serve_requests(stream: trio.abc.Stream, site: _Site, source: str,
                          slot: _Slot | None = None) -> None:
    limits = site.limits
    conn = _Connection(stream, limits, site.budget, source)
    idle = limits.idle_timeout if limits.idle_timeout is not None else limits.head_timeout
    for served in range(limits.max_requests_per_connection):
        wait = limits.head_timeout if served == 0 else idle
        try:
            head = await _next_head(conn, trio.current_time() + wait, slot)
        except _TooSlow:
            # Part of a head arrived, the rest not in time (slowloris): 408 and close, as
            # the data path answers. An idle keep-alive connection (no byte of a next head)
            # is just closed. Before, both were closed without a word.
            if conn.head_started() and await conn.send_timeout(site.bad_request(408),
                                                               site.base_headers):
                await conn.linger()
            return
        except h11.RemoteProtocolError as exc:
            if await conn.send(site.bad_request(exc.error_status_hint),
                               conn.refused_a_head_request(), True, site.base_headers):
                await conn.linger()
            return
        if not isinstance(head, h11.Request):
            return  # ConnectionClosed, or PAUSED after a previous cycle
        if _framed_both_ways(head) or head.http_version not in (b"1.0", b"1.1"):
            # (h11 reads "HTTP/2.0", "HTTP/0.9", "HTTP/1.2"... as 1.1; the data path refuses
            # them as bad_http_version, and so does this server.)
            # h11 lets chunked win; the data path refuses the ambiguity, and so does this
            # server: 400, closed, the handler never sees the request. (A HEAD's answer has
            # no body: h11 refuses to send one, and a HEAD refused here got no answer at
            # all before the thirty-fifth session's review.)
            if await conn.send(site.bad_request(400), head.method == b"HEAD", True,
                               site.base_headers):
                await conn.linger()
            return
        form = origin_form(head.target.decode("latin-1"))
        if form is None:
            if await conn.send(site.bad_request(400), head.method == b"HEAD", True,
                               site.base_headers):
                await conn.linger()
            return
        request = Request(conn, head, trio.current_time() + limits.request_timeout, *form)
        try:
            reply = await site.handler(request)
        except h11.RemoteProtocolError as exc:  # a malformed body
            reply = replace(site.bad_request(exc.error_status_hint), close=True)
        except BodyTooLarge:
            reply = Reply.error(413, close=True)
        except BodyOverBudget:
            reply = Reply.error(503, close=True)
        except _Closed:
            raise  # the client went away or was too slow sending its body: just close
        except Exception as exc:  # noqa: BLE001 -- a broken handler must not kill the server
            log(site.error_event, "error", server=site.name, path=request.path, error=repr(exc))
            reply = Reply.error(500)
        complete = await conn.finish_body(request.deadline, wait=not reply.close)
        # (the last answer the connection may carry says so: it was closed after it without
        # a word, and a client that sent the next request got a reset -- the webhook's
        # 1,000th review on one connection; found in the thirty-sixth session)
        close = (reply.close or not complete or not limits.keep_alive or _wants_close(head)
                 or served == limits.max_requests_per_connection - 1)
        sent = await conn.send(reply, request.method == "HEAD", close, site.base_headers)
        if sent and not complete:
            await conn.linger()
        if not sent or close or conn.h11.our_state is not h11.DONE \
                or conn.h11.their_state is not h11.DONE:
            return
        conn.h11.start_next_cycle()


class _HandshakeReads(trio.abc.Stream):
    """The TCP stream under a TLS server's ``trio.SSLStream``, counting the reads the
    handshake makes: past ``MAX_HANDSHAKE_READS`` (the data path's bound,
    ``sidecar.net.transport``) a read fails, and the handshake with it. A hostile review
    sent the webhook a ClientHello with a 20 KB extension in 1-byte records, one per send,
    within the handshake timeout: 1.5 s of CPU for one connection with no certificate."""

    def __init__(self, tcp: trio.SocketStream) -> None:
        self.tcp = tcp
        self.reads = 0
        self.handshaking = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The TCP stream's next bytes; fails past the handshake's bound of reads."""
        if self.handshaking:
            self.reads += 1
            if self.reads > MAX_HANDSHAKE_READS:
                raise trio.BrokenResourceError("handshake_fragmented")
        return await self.tcp.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """As the TCP stream's."""
        await self.tcp.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """As the TCP stream's."""
        await self.tcp.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """As the TCP stream's."""
        await self.tcp.aclose()


async def _serve_connection(tcp: trio.SocketStream, site: _Site,
                            tls: Callable[[], ssl.SSLContext] | None, source: str,
                            slot: _Slot | None = None) -> None:
    stream: trio.abc.Stream = tcp
    try:
        if tls is not None:
            counted = _HandshakeReads(tcp)
            tls_stream = trio.SSLStream(counted, tls(), server_side=True)
            stream = tls_stream
            with trio.move_on_after(site.limits.handshake_timeout) as scope:
                await tls_stream.do_handshake()
            counted.handshaking = False
            if scope.cancelled_caught:
                return
        await _serve_requests(stream, site, source, slot)
    except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass  # nothing more we can tell this client
    finally:
        with trio.move_on_after(1.0):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)


async def serve(
    listen: tuple[str, int],
    handler: Handler,
    *,
    name: str,
    limits: ServerLimits = ServerLimits(),
    tls: Callable[[], ssl.SSLContext] | None = None,
    base_headers: Sequence[tuple[str, str]] = (),
    bad_request: Callable[[int], Reply] = Reply.error,
    error_event: str = "ctlhttp_request_failed",
    on_refused: Callable[[str], None] | None = None,
    on_connection: Callable[[int], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``listen`` (host, port) until cancelled; reports the bound port.

    ``tls``: returns the server context for a new connection (None: plain TCP).
    ``base_headers``: sent on every answer. ``bad_request(status)``: the answer to a
    malformed request. ``on_refused(reason)``: a connection closed unserved by a limit
    (``max_connections``, ``max_connections_per_source``), or closed to make room for a
    newcomer on a full server (``max_connections``). ``on_connection(+1 / -1)``: a
    connection starts being served / ends.
    """
    host, port = listen
    listeners = await _open_listeners(host, port)
    if port == 0 and len(listeners) > 1:
        # A name that resolves to several addresses would get one random port each.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    site = _Site(handler, name, limits, tuple(base_headers), bad_request, error_event,
                 _BodyBudget(limits.body_budget_bytes, limits.body_budget_per_source))
    slots = trio.Semaphore(max(1, limits.max_connections))
    sources = SourceLimiter(limits.max_connections_per_source)
    # The connections being served in the slots, oldest first (at most max_connections,
    # plus those closed to make room and not yet gone).
    served: list[_Slot] = []

    async def run_after_slot(tcp: trio.SocketStream, source: str) -> None:
        """Serve a newcomer once the connection closed for it has let its slot go (within
        2 s; else it is refused after all)."""
        got = False
        with trio.move_on_after(2.0):
            await slots.acquire()
            got = True
        if got:
            await run(tcp, source)
            return
        sources.leave(source)
        refuse("max_connections")
        await trio.aclose_forcefully(tcp)

    def refuse(reason: str) -> None:
        if on_refused is not None:
            on_refused(reason)

    # The probe reserve: connections the limits would refuse, served for ``probe_paths``
    # only. The local clients of a loopback admin port usually share one address
    # (127.0.0.1), so one local scraper holding its share locked out the liveness and
    # readiness probes; the reserve answers those, and only those, while the shares are
    # taken. Its connections serve one request with a short head timeout; when it is full
    # a newcomer takes its oldest connection (a probe is answered at once, so only a
    # silent one is old).
    reserved: list[trio.CancelScope] = []

    def reserve_handler(probed: list[bool]) -> Handler:
        async def handle(request: Request) -> Reply:
            if request.path in limits.probe_paths:
                probed.append(True)
                return await handler(request)
            return Reply.error(429, close=True)
        return handle

    reserve_site = replace(site, limits=replace(
        limits, head_timeout=min(limits.head_timeout, RESERVE_HEAD_TIMEOUT),
        max_requests_per_connection=1, keep_alive=False))

    def try_reserve(tcp: trio.SocketStream, source: str | None, reason: str,
                    nursery: trio.Nursery) -> bool:
        if limits.probe_reserve <= 0 or len(reserved) >= 2 * limits.probe_reserve:
            return False
        live = [scope for scope in reserved if not scope.cancel_called]
        if len(live) >= limits.probe_reserve:
            live[0].cancel()
        nursery.start_soon(run_reserved, tcp, source or "", reason)
        return True

    async def run_reserved(tcp: trio.SocketStream, source: str, reason: str) -> None:
        """Serve one probe from the reserve; a connection that asked for no probe path (a
        429, a silent one timed out or taken by a newcomer) counts as refused by ``reason``."""
        scope = trio.CancelScope()
        reserved.append(scope)
        probed: list[bool] = []
        try:
            with scope:
                await _serve_connection(tcp, replace(reserve_site,
                                                     handler=reserve_handler(probed)), tls,
                                        source)
            if scope.cancelled_caught:
                await trio.aclose_forcefully(tcp)
        except Exception as exc:  # noqa: BLE001 -- one bad connection never stops the server
            log(error_event, "error", server=name, error=repr(exc))
            await trio.aclose_forcefully(tcp)
        finally:
            reserved.remove(scope)
            if not probed:
                refuse(reason)

    async def run(tcp: trio.SocketStream, source: str) -> None:
        if on_connection is not None:
            on_connection(1)
        slot = _Slot(source)
        served.append(slot)
        try:
            with slot.scope:
                await _serve_connection(tcp, site, tls, source, slot)
            if slot.scope.cancelled_caught:
                await trio.aclose_forcefully(tcp)  # closed to make room for a newcomer
        except Exception as exc:  # noqa: BLE001 -- one bad connection never stops the server
            log(error_event, "error", server=name, error=repr(exc))
            await trio.aclose_forcefully(tcp)
        finally:
            served.remove(slot)
            if on_connection is not None:
                on_connection(-1)
            sources.leave(source)
            slots.release()

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            if limits.wait_for_slot:
                await slots.acquire()
            try:
                tcp = await listener.accept()
            except OSError as exc:
                if limits.wait_for_slot:
                    slots.release()
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log(error_event, "error", server=name, error=repr(exc))
                await trio.sleep(0.1)
                continue
            except BaseException:
                if limits.wait_for_slot:
                    slots.release()
                raise
            source = source_address(tcp.socket)
            if not limits.wait_for_slot:
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    # Full: the newcomer takes the slot of the oldest connection of another
                    # address still waiting for a request head (closed at once): one local
                    # process held a silent connection from each of 64 loopback addresses
                    # and every other local client was refused (thirty-first session's
                    # review). Else a source holding fewer connections than the heaviest
                    # group or address takes one of its connections: a few neighbours, each
                    # within its per-source share, filled every slot of the health port
                    # and the kubelet's probes were refused (found by a hostile review);
                    # now the sources converge on equal shares.
                    victim = victim_slot(served, source) if source is not None else None
                    if victim is None or source is None or not sources.try_enter(source):
                        if not try_reserve(tcp, source, "max_connections", nursery):
                            refuse("max_connections")
                            await trio.aclose_forcefully(tcp)
                        continue
                    refuse("max_connections")  # (the one closed to make room)
                    victim.scope.cancel()
                    nursery.start_soon(run_after_slot, tcp, source)
                    continue
            if source is None or not sources.try_enter(source):
                slots.release()
                if source is None or not try_reserve(tcp, source,
                                                     "max_connections_per_source", nursery):
                    refuse("max_connections_per_source")
                    await trio.aclose_forcefully(tcp)
                continue
            nursery.start_soon(run, tcp, source)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(listeners[0].socket.getsockname()[1])
