"""Connections that outlived their trust in their graceful close, or after a bundle lost an
intermediate (found by the twenty-eighth session's hostile review of trust lifetime).

* A connection in its graceful close (retired for ``max_age``, ``connection_close_grace``
  running) was never cut when the upstream of its request in flight expired, or the own
  chain that upstream connection was made with: ``Lifetimes.sweep`` looked at the upstream
  only after the age, and a connection past its age never got there again. The download,
  upload or request over a private (NTLM) upstream connection ran on for the grace.
* A stream or a request in flight authorised by an introspected token was never asked about
  again past its connection's age (``reauth_at`` sat behind the age too, and ``reauth``
  returned for any retirement): a token revoked at the authorisation server ran on.
* A bundle that lists an intermediate besides its root completes the chain of a peer that
  sends its leaf only. With the intermediate removed from the file, a new connection was
  refused but open, in-flight and pooled ones were kept: ``TrustStore.check_peer`` took the
  chain OpenSSL verified at the handshake because its anchor was still listed.

The families, as data, through real sidecars, real certificates that expire, real bundle and
policy rewrites and a real authorisation server: (1)+(2) every reason that cuts at once x
direction x kind, each on a connection already in its graceful close (``GRACEFUL``: one
sidecar, inbound and outbound, one wait for every member; its own certificate expires last,
so the members of the other reasons are the control that the grace still holds until then);
(3) the own and a federated bundle x the connections a peer completed from its intermediate
(``INTERMEDIATE``), with peers that send their whole chain as the control.

Each way a connection's trust ends has its own loopback source address, so the sidecar's
``connection_closed`` log lines say which reason ended which member.
"""

from __future__ import annotations

import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.identity.ca import DevCA, write_svid
from sidecar.net.lifetime import CUT_AT_ONCE
from tests.harness import (
    TD,
    Pki,
    SidecarProc,
    free_port,
    loopback_alias_works,
    mtls_context,
    read_head,
    read_head_bytewise,
    replace_file,
    request_target,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_lifetime_review import _api_key, _drain, _policy_doc, _stamp, _write
from tests.test_lifetime_review2 import _EndlessUpstream, _idp
from tests.test_trust_end_cuts import NOT_APPLICABLE, _begin, _going

pytestmark = [
    pytest.mark.usefixtures("no_internal_errors"),
    pytest.mark.skipif(not loopback_alias_works("127.0.0.2"),
                       reason="needs loopback addresses besides 127.0.0.1 (one per member)"),
]

# -- (1) and (2): trust ending for a connection in its graceful close --------------------------

# how a member's trust or authorisation ends -> the reason it is cut with
INBOUND_WAYS = {
    "peer_cert_expires": "peer_cert_expired",   # the caller's leaf
    "own_cert_expires": "own_cert_expired",     # the own leaf (last: every member's own)
    "apikey_expires": "credential_expired",     # its API key's expires_at
    "token_revoked": "credential_expired",      # re-introspected: inactive (finding 2)
    "root_removed": "peer_untrusted",           # the caller's root leaves the bundle
    "apikey_removed": "policy_refused",         # a reload removes its API key
    "source_blocked": "source_blocked",         # an alert blocks its address
}
OUTBOUND_WAYS = {
    "upstream_expires": "peer_cert_expired",    # the upstream's leaf (finding 1)
    "own_cert_expires": "own_cert_expired",     # the own leaf (finding 1)
    "upstream_root_removed": "peer_untrusted",  # the upstream's root leaves the bundle
    "egress_withdrawn": "policy_refused",       # a reload withdraws egress to it
}
INBOUND_KINDS = ["download", "upload", "upgrade"]
# (``private``: a download over an upstream connection the app connection keeps for itself,
# reclaimed for its second request -- NTLM)
OUTBOUND_KINDS = ["download", "private", "upload", "upgrade"]
GRACEFUL = [("inbound", w, k) for w in INBOUND_WAYS for k in INBOUND_KINDS] + \
           [("outbound", w, k) for w in OUTBOUND_WAYS for k in OUTBOUND_KINDS]
WAYS = {"inbound": INBOUND_WAYS, "outbound": OUTBOUND_WAYS}
# Each way's members connect from a loopback address of their own.
ALIASES = {("inbound", w): f"127.0.0.{11 + i}" for i, w in enumerate(INBOUND_WAYS)} | \
          {("outbound", w): f"127.0.0.{31 + i}" for i, w in enumerate(OUTBOUND_WAYS)}

LIMITS = {"max_connection_age": "2s", "max_connection_age_jitter": 0,
          "connection_close_grace": "120s", "idle_timeout": "120s",
          "pool_idle_timeout": "120s"}
LEAD = 12  # seconds from the start of the run to the expiries: open and age every member
OWN_AFTER = 6  # the own certificate expires this long after the others' trust ended
SETTLE = 2.5  # past an expiry: the once-a-second sweep, and the cut reaching the client
PARTNER = "partner.test"
NTLM = "Authorization: NTLM TlRMTVNTUAABAAAAB4IIog==\r\n"


def test_every_reason_that_cuts_at_once_is_a_member() -> None:
    """Every reason that cuts at once is brought about for a connection in its graceful
    close, in both directions, or named as not applicable there."""
    for direction, ways in WAYS.items():
        for reason in CUT_AT_ONCE:
            assert reason in ways.values() or (direction, reason) in NOT_APPLICABLE, \
                (direction, reason)


@dataclass
class _Seen:
    """One upstream connection as the scripted upstream saw it."""

    targets: list[str] = field(default_factory=list)
    ended: float | None = None  # monotonic time the sidecar closed or reset it


class _Upstream(_EndlessUpstream):
    """An mTLS upstream answering keep-alive requests (``_EndlessUpstream``'s TLS): a target
    ending in ``/slow`` gets an endless body dribbled, a POST's body is read for as long as
    it comes, an upgrade is echoed, anything else gets a 200; each connection is recorded
    in ``seen`` (the targets it carried, when the sidecar ended it)."""

    timeout = 120.0

    def __init__(self, ident: Path, bundle: str) -> None:
        self.seen: list[_Seen] = []
        self.lock = threading.Lock()
        super().__init__(ident, bundle)

    def present(self, ident: Path) -> None:
        """Present the SVID in ``ident`` to the connections accepted from now on."""
        assert self.ctx is not None
        self.ctx.load_cert_chain(str(ident / "tls.crt"), str(ident / "tls.key"))

    def by_label(self, label: str) -> list[_Seen]:
        with self.lock:
            return [s for s in self.seen if s.targets and s.targets[0].split("/")[1] == label]

    def serve(self, sock: socket.socket) -> None:
        seen = _Seen()
        with self.lock:
            self.seen.append(seen)
        try:
            while not self.stopped.is_set():
                head = read_head(sock)
                if b"\r\n\r\n" not in head:
                    break  # the sidecar closed it
                target = request_target(head)
                seen.targets.append(target)
                if b"upgrade: echo" in head.lower():
                    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                                 b"Connection: upgrade\r\n\r\n")
                    while data := sock.recv(1 << 16):
                        sock.sendall(data)
                    break
                if head.startswith(b"POST"):
                    while sock.recv(1 << 16):
                        pass
                    break
                if target.endswith("/slow"):
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1099511627776\r\n\r\n")
                    while not self.stopped.is_set():
                        sock.sendall(b"x" * 256)
                        time.sleep(0.05)
                    break
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except OSError:  # (a reset from the sidecar; ssl.SSLError is one)
            pass
        if not self.stopped.is_set():
            seen.ended = time.monotonic()


def _connect(port: int, source: str, ctx: ssl.SSLContext | None = None) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                   source_address=(source, 0))
    return ctx.wrap_socket(raw) if ctx is not None else raw


def _get(sock: socket.socket, target: str = "/", extra: str = "") -> int | None:
    """One keep-alive request on ``sock``: its status, None when the connection ended."""
    try:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: orders\r\n{extra}\r\n".encode())
        head = read_head_bytewise(sock)
        if not head:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while length > 0:
            data = sock.recv(min(length, 1 << 16))
            if not data:
                return None
            length -= len(data)
        return int(head.split(b" ", 2)[1])
    except (OSError, ValueError):
        return None


def _begin_outbound(sock: socket.socket, kind: str, label: str) -> None:
    """Start the transfer of ``kind`` through an outbound listener (the app's side)."""
    if kind == "private":  # (its first request keeps the upstream connection for it)
        assert _get(sock, f"/{label}/first", NTLM) == 200
    if kind in ("download", "private"):
        sock.sendall(f"GET /{label}/slow HTTP/1.1\r\nHost: orders\r\n"
                     f"{NTLM if kind == 'private' else ''}\r\n".encode())
        assert read_head_bytewise(sock).startswith(b"HTTP/1.1 200")
    else:
        _begin(sock, kind, {})


def _alive(sock: socket.socket, kind: str) -> bool:
    """Is the transfer on ``sock`` still going (a download still sends, an upload's
    connection is still open, a stream echoes)?"""
    try:
        if kind in ("download", "private", "out_download"):
            sock.settimeout(5)
            return bool(sock.recv(1 << 16))
        if kind == "upload":
            _going(sock, kind)
            sock.settimeout(0.3)
            try:
                return bool(sock.recv(1))  # (an upload gets nothing back while it runs)
            except TimeoutError:
                return True
        _going(sock, kind)
        return True
    except (OSError, AssertionError):
        return False
    finally:
        sock.settimeout(10)


def _until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _short(ca: DevCA, spiffe_id: str, ends: int, out: Path) -> Path:
    """An SVID for ``spiffe_id`` from ``ca`` whose leaf ends at ``ends`` (Unix time)."""
    start = int(time.time()) - 60
    return write_svid(ca.issue(spiffe_id, ttl_seconds=ends - start, not_before=start), ca, out)


def _closed(proc: SidecarProc, direction: str, reason: str) -> float:
    return proc.metric("sidecar_connections_closed_total", direction=direction, reason=reason)


@dataclass
class Member:
    """One connection of a family, and what the run saw of it."""

    sock: socket.socket
    kind: str
    going_graceful: bool = False  # still going in its graceful close, before its trust ended
    going_late: bool | None = None  # (own certificate: after the other members were cut)
    cut: bool = False  # ended by the sidecar before the end of the run
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What one run left: each member, the ``connection_closed`` lines by source address,
    and whether every member was in its graceful close before any expiry."""

    members: dict[tuple[str, ...], Member] = field(default_factory=dict)
    reasons: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    graceful_in_time: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)


def _graceful_run(tmp: Path, procs: list[Any], closers: list[Callable[[], None]]) -> Run:
    run = Run()
    pki = Pki(tmp / "pki")
    app, app_port = start_app(tmp)
    procs.append(app)
    idp = _idp(tmp, pki)
    closers.append(idp.stop)
    other = DevCA.create(TD)  # a second root: its callers and upstream lose it
    orders = pki.identity("orders")
    both = pki.ca.bundle_pem + other.bundle_pem
    replace_file(orders / "ca.crt", both)
    upstreams = {
        "upstream_expires": _Upstream(pki.identity("orders", dirname="up-exp"), pki.bundle),
        "own_cert_expires": _Upstream(pki.identity("orders", dirname="up-own"), pki.bundle),
        "upstream_root_removed": _Upstream(
            write_svid(other.issue(spiffe("orders")), other, tmp / "up-other"), pki.bundle),
        "egress_withdrawn": _Upstream(pki.identity("billing", dirname="up-billing"),
                                      pki.bundle),
    }
    closers.extend(u.close for u in upstreams.values())
    targets = {w: spiffe("billing" if w == "egress_withdrawn" else "orders")
               for w in OUTBOUND_WAYS}

    (tmp / "policy").mkdir(parents=True, exist_ok=True)
    (tmp / "policy" / "secret").write_text("orders-secret\n")
    expiring_key, expiring = _api_key("expiring")
    revocable_key, revocable = _api_key("revocable")
    provider = {"issuer": idp.issuer, "audiences": ["orders"], "clock_skew": "1s",
                "introspection": {"endpoint": f"{idp.issuer}/introspect", "ca": idp.ca,
                                  "client_id": "orders", "client_secret_file": "secret",
                                  "cache_ttl": "2s", "negative_ttl": "1s", "timeout": "2s"}}

    def policy(keys: list[dict[str, Any]], egress: list[str]) -> None:
        # (callers without credentials are ``gateway``: a rule that needs none must not
        # admit the members whose credentials end)
        doc = _policy_doc([
            {"name": "gateway", "allow": {"from": [spiffe("gateway")]}},
            {"name": "key", "allow": {"from": [spiffe("frontend")], "apikey": True}},
            {"name": "token", "allow": {"from": [spiffe("frontend")],
                                        "jwt": {"provider": "idp"}}}], api_keys=keys)
        doc["jwt_providers"]["idp"] = provider
        doc["services"][spiffe("orders")]["egress"] = egress
        doc["alerts"] = [{"name": "burst", "threshold": 3, "window": "1m", "by": "address",
                          "block": "5m"}]
        _write(tmp, doc)

    all_egress = sorted(set(targets.values()))
    policy([{**expiring, "expires_at": _stamp(time.time() + 3600)}, revocable], all_egress)
    cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                          "app": f"127.0.0.1:{app_port}"},
                         outbound=[{"name": w, "listen": f"127.0.0.1:{free_port()}",
                                    "upstream": f"127.0.0.1:{u.port}",
                                    "identity": targets[w]} for w, u in upstreams.items()],
                         policy=str(tmp / "policy" / "mesh.yaml"), limits=LIMITS)
    proc = start_sidecar(tmp, "orders", cfg)
    procs.append(proc)

    # The run's times: the expiries at ``ends``, the own certificate's ``OWN_AFTER`` later.
    ends = math.ceil(time.time()) + LEAD
    own_ends = ends + OWN_AFTER
    reloads = proc.metric("sidecar_policy_reloads_total", result="ok")
    policy([{**expiring, "expires_at": _stamp(ends)}, revocable], all_egress)
    rotated = _short(pki.ca, spiffe("orders"), own_ends, tmp / "orders-short")
    replace_file(orders / "tls.key", (rotated / "tls.key").read_bytes())
    replace_file(orders / "tls.crt", (rotated / "tls.crt").read_bytes())
    upstreams["upstream_expires"].present(_short(pki.ca, spiffe("orders"), ends,
                                                 tmp / "up-short"))
    wait_for(lambda: abs(proc.metric("sidecar_certificate_expiry_timestamp_seconds")
                         - own_ends) < 1.5, timeout=10)
    wait_for(lambda: proc.metric("sidecar_policy_reloads_total", result="ok") > reloads)

    front = pki.identity("frontend")
    token = idp.token(identity=front, format="opaque")
    callers = {"peer_cert_expires": _short(pki.ca, spiffe("gateway"), ends, tmp / "gw-short"),
               "root_removed": write_svid(other.issue(spiffe("gateway")), other,
                                          tmp / "gw-other")}
    gateway = pki.identity("gateway")
    headers = {"apikey_expires": {"x-api-key": expiring_key},
               "apikey_removed": {"x-api-key": revocable_key},
               "token_revoked": {"authorization": f"Bearer {token}"}}
    inbound = proc.port("inbound")
    for way in INBOUND_WAYS:
        ident = front if way in headers else callers.get(way, gateway)
        ctx = mtls_context(ident, pki.bundle)
        for kind in INBOUND_KINDS:
            sock = _connect(inbound, ALIASES["inbound", way], ctx)
            run.members["inbound", way, kind] = Member(sock, kind)
            _begin(sock, kind, headers.get(way, {}))
    for way in OUTBOUND_WAYS:
        for kind in OUTBOUND_KINDS:
            sock = _connect(proc.port(way), ALIASES["outbound", way])
            run.members["outbound", way, kind] = Member(sock, kind)
            _begin_outbound(sock, kind, f"{way}-{kind}")
    # The private member's second request went over the upstream connection of its first.
    for way, up in upstreams.items():
        run.members["outbound", way, "private"].details["private"] = [
            s.targets for s in up.by_label(f"{way}-private")]

    # Every member past its age: retired for max_age, in its graceful close, still going.
    n_in, n_out = len(INBOUND_WAYS) * len(INBOUND_KINDS), len(OUTBOUND_WAYS) * len(OUTBOUND_KINDS)
    try:
        wait_for(lambda: _closed(proc, "inbound", "max_age") >= n_in
                 and _closed(proc, "outbound", "max_age") >= n_out, timeout=ends - time.time())
    except TimeoutError:
        pass
    for member in run.members.values():
        member.going_graceful = _alive(member.sock, member.kind)
    run.graceful_in_time = time.time() < ends - 1

    # What ends trust now: a bundle without the other root, a reload without the revocable
    # key and without egress to billing, an alert; then the token's revocation (a reload
    # judges streams again: revoked after it, the token is found by its re-introspection).
    replace_file(orders / "ca.crt", pki.ca.bundle_pem)
    policy([{**expiring, "expires_at": _stamp(ends)}], [spiffe("orders")])
    anonymous = ssl.create_default_context(cafile=pki.bundle)
    anonymous.check_hostname = False
    for _ in range(3):  # no client certificate: credential failures of that address
        try:
            with _connect(inbound, ALIASES["inbound", "source_blocked"], anonymous) as s:
                s.recv(1)
        except OSError:
            pass
    try:
        wait_for(lambda: _closed(proc, "inbound", "peer_untrusted") >= 3
                 and _closed(proc, "outbound", "policy_refused") >= 4, timeout=5)
    except TimeoutError:
        pass
    idp.control(revoke=token)

    # The expiries (and the re-introspection); the own certificate's members still go.
    _until(max(ends, time.time() + 3) + SETTLE)
    deadline = time.monotonic() + 6
    for key, member in run.members.items():
        if key[1] != "own_cert_expires":
            member.cut = _drain(member.sock, timeout=max(0.1, deadline - time.monotonic()))
    for key, member in run.members.items():
        if key[1] == "own_cert_expires":
            member.going_late = _alive(member.sock, member.kind)
    _until(own_ends + SETTLE)
    deadline = time.monotonic() + 6
    for key, member in run.members.items():
        if key[1] == "own_cert_expires":
            member.cut = _drain(member.sock, timeout=max(0.1, deadline - time.monotonic()))
    run.log = proc.log_events("connection_closed")
    for (direction, way), alias in ALIASES.items():
        run.reasons[direction, way] = sorted(
            e.get("reason", "") for e in run.log
            if e.get("direction") == direction and e.get("source") == alias)
    return run


# -- (3) a bundle that loses the intermediate a peer's chain was completed from -----------------

DOMAINS = ["own", "federated"]
# what the peer sends: its leaf only (the bundle completes its chain) or leaf and intermediate
CHAINS = ["leaf", "full"]
# an inbound keep-alive connection (idle), an inbound download and upgraded stream, a
# download in flight through an outbound listener, an idle pooled upstream connection
HOLDS = ["keepalive", "download", "upgrade", "out_download", "out_pooled"]
INTERMEDIATE = [(d, c, h) for d in DOMAINS for c in CHAINS for h in HOLDS]


def _expected(domain: str, chain: str, hold: str) -> str | None:
    """The reason the member's connection is ended with (None: it is kept)."""
    if chain == "leaf":
        return "peer_untrusted"
    if domain == "own" and hold == "out_pooled":
        # (the own bundle is part of the own SVID set: its change is a rotation, and pooled
        # connections made with the older set are retired gracefully)
        return "own_cert_rotated"
    return None


def _intermediate_run(tmp: Path, procs: list[Any], closers: list[Callable[[], None]]) -> Run:
    run = Run()
    pki = Pki(tmp / "pki")
    app, app_port = start_app(tmp)
    procs.append(app)
    partner = DevCA.create(PARTNER)
    cas = {"own": pki.ca.new_intermediate(), "federated": partner.new_intermediate()}
    roots = {"own": pki.ca.bundle_pem, "federated": partner.bundle_pem}
    tds = {"own": TD, "federated": PARTNER}

    def identity(domain: str, chain: str, name: str) -> Path:
        d = tmp / f"{name}-{domain}-{chain}"
        if d.exists():
            return d
        issued = cas[domain].issue(spiffe(name, td=tds[domain]))
        d.mkdir()
        (d / "tls.crt").write_bytes(issued.cert_pem if chain == "leaf" else issued.chain_pem)
        (d / "tls.key").write_bytes(issued.key_pem)
        return d

    orders = pki.identity("orders")
    bundles = {"own": orders / "ca.crt", "federated": tmp / "partner.pem"}
    for domain, path in bundles.items():
        path.write_bytes(roots[domain] + cas[domain].cert_pem)  # root and intermediate
    upstreams = {(d, c): _Upstream(identity(d, c, "billing"), pki.bundle)
                 for d in DOMAINS for c in CHAINS}
    closers.extend(u.close for u in upstreams.values())
    policy = write_policy(tmp / "policy.yaml", {
        "version": 1, "trust_domain": TD, "services": {spiffe("orders"): {
            "rules": [{"name": "callers", "allow": {
                "from": [spiffe("frontend", td=tds[d]) for d in DOMAINS]}}],
            "egress": [spiffe("billing", td=tds[d]) for d in DOMAINS]}}})
    cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                          "app": f"127.0.0.1:{app_port}"},
                         outbound=[{"name": f"{d}-{c}", "listen": f"127.0.0.1:{free_port()}",
                                    "upstream": f"127.0.0.1:{upstreams[d, c].port}",
                                    "identity": spiffe("billing", td=tds[d])}
                                   for d in DOMAINS for c in CHAINS],
                         policy=policy, limits={"idle_timeout": "120s",
                                                "pool_idle_timeout": "120s"})
    cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(bundles["federated"])}}
    proc = start_sidecar(tmp, "orders", cfg)
    procs.append(proc)

    inbound = proc.port("inbound")
    for i, (domain, chain, hold) in enumerate(INTERMEDIATE):
        alias = f"127.0.0.{51 + i}"
        label = f"{domain}-{chain}-{hold}"
        if hold == "out_pooled":
            # (after the download on the same listener: this request's upstream connection
            # is a new one, then idle in the pool)
            with _connect(proc.port(f"{domain}-{chain}"), alias) as s:
                assert _get(s, f"/{label}/first") == 200
            wait_for(lambda label=label, up=upstreams[domain, chain]: up.by_label(label))
            run.members[domain, chain, hold] = Member(socket.socket(), hold, details={
                "alias": alias, "label": label})
            continue
        if hold == "out_download":
            sock = _connect(proc.port(f"{domain}-{chain}"), alias)
            _begin_outbound(sock, "download", label)
        else:
            ctx = mtls_context(identity(domain, chain, "frontend"), pki.bundle)
            sock = _connect(inbound, alias, ctx)
            if hold == "keepalive":
                assert _get(sock) == 200
            else:
                _begin(sock, hold, {})
        run.members[domain, chain, hold] = Member(sock, hold, details={"alias": alias})

    # The intermediate leaves each bundle file in turn (its root stays), the federated one
    # first: the own bundle's change is a rotation of the own set, which retires every
    # pooled connection (the federated control's too).
    closed = 0.0
    for domain in ("federated", "own"):
        replace_file(bundles[domain], roots[domain])
        closed += sum(d == domain and c == "leaf" for d, c, _ in INTERMEDIATE)
        try:
            wait_for(lambda closed=closed: _closed(proc, "inbound", "peer_untrusted")
                     + _closed(proc, "outbound", "peer_untrusted") >= closed, timeout=15)
            if domain == "own":
                wait_for(lambda: _closed(proc, "outbound", "own_cert_rotated") >= 1, timeout=5)
        except TimeoutError:
            pass
        for key, member in run.members.items():
            if key[0] != domain:
                continue
            chain, hold = key[1:]
            if hold == "out_pooled":
                up = upstreams[domain, chain]
                member.details["source"] = source = f"127.0.0.1:{up.port}"
                [seen] = up.by_label(member.details["label"])
                member.cut = seen.ended is not None
                if not member.cut:  # kept: it serves the next request (no new connection)
                    with _connect(proc.port(f"{domain}-{chain}"), member.details["alias"]) as s:
                        member.going_graceful = \
                            _get(s, f"/{member.details['label']}/again") == 200
                    member.details["targets"] = [
                        s.targets for s in up.by_label(member.details["label"])]
            else:
                source = member.details["alias"]
                if _expected(*key) is not None:
                    member.cut = _drain(member.sock, timeout=5) if hold != "keepalive" \
                        else _get(member.sock) is None
                else:
                    member.going_graceful = _get(member.sock) == 200 if hold == "keepalive" \
                        else _alive(member.sock, hold)
            run.reasons[domain, "-".join(key)] = sorted(
                e.get("reason", "") for e in proc.log_events("connection_closed")
                if e.get("source") == source)
    run.log = proc.log_events("connection_closed")
    return run


RUNS: dict[str, Callable[[Path, list[Any], list[Callable[[], None]]], Run]] = {
    "graceful": _graceful_run, "intermediate": _intermediate_run}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Run]]:
    """Each family's run, made once per module when a member first asks for it; every
    process started is stopped by pid, every socket and scripted server closed, at the end."""
    procs: list[Any] = []
    closers: list[Callable[[], None]] = []
    done: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in done:
            done[name] = RUNS[name](tmp_path_factory.mktemp(name), procs, closers)
            closers.extend(m.sock.close for m in done[name].members.values())
        return done[name]

    try:
        yield get
    finally:
        for close in closers:
            try:
                close()
            except OSError:
                pass
        for p in reversed(procs):
            p.stop(timeout=10)


@pytest.mark.parametrize(("direction", "way", "kind"), GRACEFUL,
                         ids=[f"{d}-{w}-{k}" for d, w, k in GRACEFUL])
def test_a_connection_in_its_graceful_close_is_cut_when_its_trust_ends(
        runs: Callable[[str], Run], direction: str, way: str, kind: str) -> None:
    """Past ``max_connection_age`` (retired, ``connection_close_grace`` 120 s running) the
    member still runs; when its trust or authorisation then ends it is cut at once, counted
    with that reason -- not left to run for the grace. Before, an outbound request in flight
    ran on past its upstream's (or the own) certificate's expiry, and a stream or request
    authorised by an introspected token was never asked about again."""
    run = runs("graceful")
    assert run.graceful_in_time, "the members were not in their graceful close before the " \
                                 "expiries (a machine too slow for LEAD)"
    member = run.members[direction, way, kind]
    assert member.going_graceful, "a member in its graceful close had ended before its trust"
    if way == "own_cert_expires":
        # (the control: nothing but the age ended for it while the others were cut)
        assert member.going_late, "a connection in its graceful close was cut with its trust"
    if kind == "private":
        assert [f"/{way}-private/first", f"/{way}-private/slow"] in member.details["private"], \
            member.details
    reason = WAYS[direction][way]
    assert member.cut, f"the {kind} ran on in its graceful close after {reason}"
    kinds = len(INBOUND_KINDS if direction == "inbound" else OUTBOUND_KINDS)
    assert run.reasons[direction, way] == sorted(["max_age"] * kinds + [reason] * kinds), \
        run.reasons[direction, way]


@pytest.mark.parametrize(("domain", "chain", "hold"), INTERMEDIATE,
                         ids=["-".join(m) for m in INTERMEDIATE])
def test_a_connection_whose_chain_needed_a_removed_bundle_intermediate_ends(
        runs: Callable[[str], Run], domain: str, chain: str, hold: str) -> None:
    """A peer that sends its leaf only was verified through an intermediate of the bundle;
    once that intermediate leaves the bundle file, its connections end as a new one is
    refused (``peer_untrusted``), inbound and outbound, in flight, idle or pooled, for the
    own bundle and a federated one. A peer that sends its intermediate still verifies: its
    connections are kept."""
    run = runs("intermediate")
    member = run.members[domain, chain, hold]
    expected = _expected(domain, chain, hold)
    reasons = run.reasons[domain, f"{domain}-{chain}-{hold}"]
    if expected is None:
        assert member.going_graceful and not member.cut, "a peer whose chain still verifies " \
                                                         "lost its connection"
        if hold == "out_pooled":  # (reused: one upstream connection carried both requests)
            assert member.details["targets"] == [[f"/{domain}-{chain}-{hold}/first",
                                                  f"/{domain}-{chain}-{hold}/again"]]
        assert reasons == [], reasons
    else:
        assert member.cut, f"the {hold} outlived the intermediate its chain was built with"
        assert reasons == [expected], reasons
