"""Trust lifetimes, third hostile review: requests admitted after the trust ended, through
real sidecars and certificates valid for seconds.

* The gap between a certificate's not-after time and the sweep that finds it (once a
  second): a keep-alive connection whose peer's chain -- or the sidecar's own chain it was
  made with -- had expired still had its next request read, judged and forwarded to the app
  until the sweep ran (up to a second later): a plain request, a request pipelined behind
  one answered across the expiry, an upgrade to a stream. The request loop now asks the
  connection before it admits each request (``LiveConnection.trust_ended``): the
  connection ends unanswered, as the sweep would have ended it idle, and its
  ``connection_closed`` record and metric say why. Every cell of (trust kind: peer leaf,
  peer intermediate, own leaf, own intermediate) x (request kind) is checked.
* A plain request in flight (a long download or upload, server-sent events) authorised by
  an introspected token was never asked about again, while an upgraded stream is: revoked
  at the authorisation server, or the server failing, it ran on to its end. It is now
  re-introspected when its cached answer runs out, as a stream is, and cut on an inactive
  answer or a failed call (``credential_expired``); a request whose token stays active goes
  on.
* A request whose decision waits for token introspection was forwarded when the answer
  came, although the connection had been retired meanwhile (its peer's certificate expired,
  its CA left the bundle): the retirement cuts only after ``connection_close_grace``. It is
  now refused (a generic 403); a policy reload during the wait was already judged by the
  decision (the control).
* A TCP stream was judged again by a policy change only once it was spliced: a reload that
  refused it while the sidecar was still connecting to the app (inbound) or the upstream
  (outbound) was missed and the stream ran on. It is now judged from its decision on; one
  refused while connecting does not start (its record: 403).
* The introspection cache counted ``cache_ttl`` on the wall clock only: stepped back (NTP, a
  resumed VM), it kept an active answer -- a token revoked at the server since -- for as
  long as the step, and the sweep asked about a stream's token that much later. The TTL
  now also runs on the monotonic clock.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sidecar.identity.ca import write_svid
from tests.harness import (
    TD,
    Pki,
    ScriptedServer,
    SidecarProc,
    audit_export,
    free_port,
    mtls_context,
    read_head,
    replace_file,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_connection_lifetime_e2e import audited, closed, wait_closed
from tests.test_lifetime_review import _drain, _inbound, _short_lived_identity, _start, _still_going
from tests.test_lifetime_review2 import _idp
from tests.test_peer_certificates_review import _ca, _leaf, _pem, _write_identity

pytestmark = pytest.mark.usefixtures("no_internal_errors")

LEAD = 6.0  # seconds from now to the expiry: room to start a sidecar and open connections
AFTER = 0.02  # how long after the not-after time the late requests are sent
SLOW = 1.0  # the answered request a pipelined one waits behind (the test app's /slow)
GET = b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n"
UPGRADE = b"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n"


def _exchange(tls: ssl.SSLSocket, request: bytes) -> bytes:
    """Send ``request``, read its answer's head and (Content-Length) body; the head."""
    tls.sendall(request)
    head = read_head(tls)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""
    while len(body) < length:
        more = tls.recv(65536)
        if not more:
            break
        body += more
    return head


def _rest(tls: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the sidecar sends until it closes the connection (bounded)."""
    tls.settimeout(0.5)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            more = tls.recv(65536)
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            break
        if not more:
            break
        got += more
    return got


def _until(t: float) -> None:
    """Wait until Unix time ``t`` (no longer)."""
    time.sleep(max(0.0, t - time.time()))


def _not_after(path: Path) -> float:
    """The earliest not-after time of the certificates in the PEM file ``path``."""
    return min(c.not_valid_after_utc.timestamp()
               for c in x509.load_pem_x509_certificates(path.read_bytes()))


def _setup(tmp: Path, pki: Pki, app: int, procs: list[Any],
           trust: str) -> tuple[SidecarProc, list[ssl.SSLContext], float, str]:
    """An inbound sidecar and three client contexts whose connections' trust ends at the
    returned time (by ``trust``), and the reason the sweep records."""
    if trust.startswith("own-"):
        ident, _, _ = _short_lived_identity(tmp, pki, "orders", trust[4:], LEAD)
        ends = _not_after(ident / "tls.crt")
        both = Path(pki.bundle).read_bytes()
        if trust == "own-intermediate":  # clients trust the root of that chain too
            both = (ident / "ca.crt").read_bytes() + both
            (ident / "ca.crt").write_bytes(both)
        (tmp / "clients-bundle.crt").write_bytes(both)
        ctxs = [mtls_context(pki.identity("frontend"), str(tmp / "clients-bundle.crt"))] * 3
        reason = "own_cert_expired"
    else:
        ident = pki.identity("orders")
        expires = dt.datetime.fromtimestamp(time.time() + LEAD, dt.UTC)
        ctxs = []
        if trust == "peer-leaf":
            for i in range(3):
                now = time.time()
                issued = pki.ca.issue(spiffe("frontend"), ttl_seconds=expires.timestamp() - now
                                      + 60, not_before=now - 60)
                client = write_svid(issued, pki.ca, tmp / f"client-{i}")
                ctxs.append(mtls_context(client, pki.bundle))
            ends = min(_not_after(tmp / f"client-{i}" / "tls.crt") for i in range(3))
        else:
            root = _ca("root")
            inter = _ca("short-lived intermediate", root, not_after=expires)
            (ident / "ca.crt").write_bytes(Path(pki.bundle).read_bytes() + _pem(root.cert))
            for i in range(3):
                leaf, key = _leaf(inter, spiffe("frontend"))
                client = _write_identity(tmp / f"client-{i}", [leaf, inter.cert], key,
                                         root.cert)
                ctxs.append(mtls_context(client, str(ident / "ca.crt")))
            ends = inter.cert.not_valid_after_utc.timestamp()
        reason = "peer_cert_expired"
    cfg = sidecar_config(ident, inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}",
        "allow_from": [spiffe("frontend")]}, audit={"path": str(tmp / "audit-orders")},
        limits={"connection_close_grace": "500ms"})
    srv = start_sidecar(tmp, "orders", cfg)
    procs.append(srv)
    assert time.time() < ends - SLOW - 0.5, "the sidecar took too long to start"
    return srv, ctxs, ends, reason


TRUST_KINDS = ["peer-leaf", "peer-intermediate", "own-leaf", "own-intermediate"]


@pytest.mark.parametrize("trust", TRUST_KINDS)
def test_no_request_is_admitted_after_the_connections_trust_ended(tmp_path, pki, app, procs,
                                                                   trust):
    srv, ctxs, ends, reason = _setup(tmp_path, pki, app, procs, trust)
    port = srv.port("inbound")
    socks = []
    try:
        for ctx in ctxs:
            tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
            socks.append(tls)
            assert _exchange(tls, GET).startswith(b"HTTP/1.1 200"), "no keep-alive connection"
        keep, pipelined, upgrade = socks
        # A request answered across the expiry (admitted before it) with a second one
        # pipelined behind it: the second is read after the trust ended.
        _until(ends + AFTER - SLOW)
        pipelined.sendall(f"GET /slow?s={SLOW} HTTP/1.1\r\nHost: orders\r\n\r\n".encode() + GET)
        _until(ends + AFTER)
        for tls, request in ((keep, GET), (upgrade, UPGRADE)):
            try:
                tls.sendall(request)
            except OSError:
                pass  # closed already (the sweep came first): nothing admitted
        late = {"keep-alive": _rest(keep), "pipelined": _rest(pipelined),
                "upgrade": _rest(upgrade)}
    finally:
        for tls in socks:
            tls.close()
    # Every cell is checked before the test fails: (the /slow answer may come -- it was
    # admitted in time -- the request pipelined behind it must not)
    admitted = {kind: got[:60] for kind, got in late.items()
                if got.count(b"HTTP/1.1 ") > (1 if kind == "pipelined" else 0)}
    assert admitted == {}, admitted
    wait_closed(srv, reason)
    assert closed(srv, reason) >= 3
    assert audited(tmp_path, "orders", reason)


# -- requests in flight authorised by an introspected token ------------------------------------

# how the authorisation server stops vouching for the victim's token
WITHDRAWN = ["revoked", "server_fails", "answer_exp"]


@pytest.mark.parametrize("how", WITHDRAWN)
def test_a_request_in_flight_authorised_by_an_introspected_token_is_asked_about_again(
        tmp_path, pki, app, procs, how):
    idp = _idp(tmp_path, pki)
    try:
        (tmp_path / "policy").mkdir(parents=True, exist_ok=True)
        (tmp_path / "policy" / "secret").write_text("orders-secret\n")
        provider = {"issuer": idp.issuer, "audiences": ["orders"], "clock_skew": "1s",
                    "introspection": {
                        "endpoint": f"{idp.issuer}/introspect", "ca": idp.ca,
                        "client_id": "orders", "client_secret_file": "secret",
                        "cache_ttl": "2s", "negative_ttl": "1s", "timeout": "1s"}}
        rule = {"name": "calls", "allow": {"from": [spiffe("frontend")],
                                           "jwt": {"provider": "idp"}}}
        policy = write_policy(tmp_path / "policy" / "mesh.yaml", {
            "version": 1, "trust_domain": TD, "jwt_providers": {"idp": provider},
            "services": {spiffe("orders"): {"rules": [rule]}}})
        srv = _inbound(tmp_path, pki, app, procs, policy)
        front_dir = pki.identity("frontend")
        ctx = mtls_context(front_dir, pki.bundle)
        port = srv.port("inbound")
        ttl = {"ttl": "6"} if how == "answer_exp" else {}
        victim_token = idp.token(identity=front_dir, format="opaque", **ttl)
        control_token = idp.token(identity=front_dir, format="opaque")
        socks: dict[str, ssl.SSLSocket] = {}
        try:
            for name, kind, token in (("download", "download", victim_token),
                                      ("upload", "upload", victim_token),
                                      ("control", "download", control_token)):
                tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port),
                                                               timeout=10))
                socks[name] = tls
                _start(tls, kind, {"authorization": f"Bearer {token}"})
            if how == "revoked":
                idp.control(revoke=victim_token)
            elif how == "server_fails":
                idp.control(mode={"introspect": "fail"})
            wait_for(lambda: closed(srv, "credential_expired") >= 2, timeout=20)
            going = {name: not _drain(socks[name], timeout=5)
                     for name in ("download", "upload")}
            assert going == {"download": False, "upload": False}, going
            if how != "server_fails":
                _still_going(socks["control"], "download")
                assert closed(srv, "credential_expired") == 2
        finally:
            for tls in socks.values():
                tls.close()
    finally:
        idp.stop()
    assert audited(tmp_path, "orders", "credential_expired")


# -- a request whose decision waits (token introspection) while the connection's trust ends -----

# what ends the connection's trust while its request waits for the introspection answer
# -> the reason its connection is retired with (None: a policy reload, judged by the
# decision itself: the control)
DURING_DECISION = {"peer_cert_expires": "peer_cert_expired",
                   "peer_ca_removed": "peer_untrusted",
                   "policy_reload": None}


@pytest.mark.parametrize("how", list(DURING_DECISION))
def test_a_request_decided_after_its_connections_trust_ended_is_not_forwarded(
        tmp_path, pki, app, procs, how):
    from tests.idp import IdpProc
    from tests.test_lifetime_review2 import _other_root_identity

    idp = IdpProc(tmp_path / "idp", client_ca=pki.bundle,
                  clients={"orders": "orders-secret", "frontend": "frontend-secret"})
    try:
        (tmp_path / "policy").mkdir(parents=True, exist_ok=True)
        (tmp_path / "policy" / "secret").write_text("orders-secret\n")

        def doc(callers: list[str]) -> dict[str, Any]:
            provider = {"issuer": idp.issuer, "audiences": ["orders"], "clock_skew": "1s",
                        "introspection": {
                            "endpoint": f"{idp.issuer}/introspect", "ca": idp.ca,
                            "client_id": "orders", "client_secret_file": "secret",
                            "cache_ttl": "1h", "negative_ttl": "1s", "timeout": "10s"}}
            rule = {"name": "calls", "allow": {"from": callers, "jwt": {"provider": "idp"}}}
            return {"version": 1, "trust_domain": TD, "jwt_providers": {"idp": provider},
                    "services": {spiffe("orders"): {"rules": [rule]}}}

        policy = write_policy(tmp_path / "policy" / "mesh.yaml", doc([spiffe("frontend")]))
        orders = pki.identity("orders")
        own_bundle = Path(pki.bundle).read_bytes()
        client, client_bundle = pki.identity("frontend"), pki.bundle
        if how == "peer_ca_removed":
            client, other_pem = _other_root_identity(tmp_path, "frontend")
            (orders / "ca.crt").write_bytes(own_bundle + other_pem)
        # (a grace longer than the wait: a retirement cuts what still runs only after it)
        srv = start_sidecar(tmp_path, "orders", sidecar_config(orders, inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"}, policy=policy,
            audit={"path": str(tmp_path / "audit-orders")},
            limits={"connection_close_grace": "8s"}))
        procs.append(srv)
        if how == "peer_cert_expires":
            now = time.time()
            issued = pki.ca.issue(spiffe("frontend"), ttl_seconds=64, not_before=now - 60)
            client = write_svid(issued, pki.ca, tmp_path / "frontend-short")
            ends = _not_after(client / "tls.crt")
        token = idp.token(client="frontend", secret="frontend-secret", format="opaque")
        idp.control(mode={"introspect": "slow"}, delay=3)
        ctx = mtls_context(client, client_bundle)
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port("inbound")),
                                                      timeout=15)) as tls:
            if how == "peer_cert_expires":
                _until(ends - 1.0)  # the answer comes 2 s after the expiry
            tls.sendall(b"GET / HTTP/1.1\r\nHost: orders\r\nauthorization: Bearer "
                        + token.encode() + b"\r\n\r\n")
            if how == "peer_ca_removed":
                replace_file(orders / "ca.crt", own_bundle)
            elif how == "policy_reload":
                write_policy(tmp_path / "policy" / "mesh.yaml", doc([spiffe("billing")]))
            answer = _rest(tls, timeout=10)
        reason = DURING_DECISION[how]
        if reason is None:
            # Refused like any request the policy would not admit: a generic 403, no reason.
            assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
            assert b"peer_" not in answer and b"policy" not in answer, answer
        else:
            # A loss of trust cuts the connection at once (since the twenty-second session's
            # review; a generic 403 before): nothing is answered, nothing forwarded, and the
            # request still has its record.
            assert answer == b"", answer[:200]
            assert closed(srv, reason) >= 1
            assert audited(tmp_path, "orders", reason)
            srv.stop()
            recs = [r for r in audit_export(tmp_path / "audit-orders")
                    if r.get("event") == "request"]
            # (no decision yet: the error is the record's reason)
            assert [(r["status"], r["reason"]) for r in recs] == [
                (0, f"connection_closed:{reason}")], \
                recs
    finally:
        idp.stop()


# -- a TCP stream whose connect runs while the policy withdraws it --------------------------


class _HeldHandshake(ScriptedServer):
    """An upstream sidecar stand-in (TLS with ``ident``'s SVID, client certificates of
    ``bundle`` required) that holds each accepted connection before its handshake until
    ``go`` is set, then echoes."""

    timeout = 15.0

    def __init__(self, ident: Path, bundle: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(ident / "tls.crt"), str(ident / "tls.key"))
        ctx.load_verify_locations(bundle)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.accepted = threading.Event()
        self.go = threading.Event()
        super().__init__(ctx)

    def admit(self, conn: socket.socket) -> bool:
        def held() -> None:
            self.accepted.set()
            self.go.wait(10)
            self._connection(conn)

        threading.Thread(target=held, daemon=True).start()
        return False

    def serve(self, sock: socket.socket) -> None:
        for _ in range(10_000):  # (bounded)
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)


def test_an_outbound_tcp_stream_withdrawn_while_it_connects_does_not_start(tmp_path, pki,
                                                                          procs):
    doc = {"version": 1, "trust_domain": TD,
           "services": {spiffe("frontend"): {"rules": [], "egress": [spiffe("orders")]}}}
    policy = write_policy(tmp_path / "mesh.yaml", doc)
    upstream = _HeldHandshake(pki.identity("orders"), pki.bundle)
    try:
        out = start_sidecar(tmp_path, "frontend", sidecar_config(
            pki.identity("frontend"), outbound=[{
                "name": "orders", "listen": f"127.0.0.1:{free_port()}", "protocol": "tcp",
                "upstream": f"127.0.0.1:{upstream.port}", "identity": spiffe("orders")}],
            policy=policy, audit={"path": str(tmp_path / "audit-frontend")},
            # (a grace longer than the held connect: the stream is refused, not cut)
            limits={"connection_close_grace": "5s", "connect_timeout": "10s"}))
        procs.append(out)
        reloads = out.metric("sidecar_policy_reloads_total", result="ok")
        with socket.create_connection(("127.0.0.1", out.port("orders")), timeout=10) as app:
            app.sendall(b"ping")
            assert upstream.accepted.wait(10)
            # Egress withdrawn while the upstream's handshake is held.
            doc["services"][spiffe("frontend")]["egress"] = [spiffe("billing")]
            write_policy(tmp_path / "mesh.yaml", doc)
            wait_for(lambda: out.metric("sidecar_policy_reloads_total", result="ok")
                     > reloads, timeout=10)
            upstream.go.set()
            got = _rest(app, timeout=3)
        assert b"ping" not in got, "the stream started after its egress was withdrawn"
        [rec] = _request_records(tmp_path / "audit-frontend")
        assert rec["status"] == 403, rec
    finally:
        upstream.close()


def _request_records(directory: Path) -> list[dict[str, Any]]:
    """The trail's request records, once there are any: a stream's record is written when
    it ends, and the writer's batch goes to disk up to its linger later (an idle machine
    reads the trail before that)."""
    def found() -> list[dict[str, Any]]:
        return [r for r in audit_export(directory) if r.get("event") == "request"]

    wait_for(lambda: bool(found()), timeout=10)
    return found()


def test_an_inbound_tcp_stream_refused_while_it_connects_to_the_app_does_not_start(
        tmp_path, pki, procs):
    # The app's accept queue is kept full (backlog 0 and a connection waiting in it), so
    # the sidecar's connect waits for a retransmitted SYN until the queue is drained.
    app = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = [socket.socket() for _ in range(3)]
    served: list[socket.socket] = []
    try:
        for f in fillers:
            f.setblocking(False)
            try:
                f.connect(("127.0.0.1", app.getsockname()[1]))
            except BlockingIOError:
                pass

        def rules(caller: str) -> dict[str, Any]:
            return {"version": 1, "trust_domain": TD, "services": {spiffe("orders"): {
                "rules": [{"name": "callers", "allow": {"from": [spiffe(caller)]}}]}}}

        policy = write_policy(tmp_path / "mesh.yaml", rules("frontend"))
        srv = start_sidecar(tmp_path, "orders", sidecar_config(
            pki.identity("orders"), inbound={
                "listen": f"127.0.0.1:{free_port()}", "protocol": "tcp",
                "app": f"127.0.0.1:{app.getsockname()[1]}"},
            policy=policy, audit={"path": str(tmp_path / "audit-orders")},
            # (a grace longer than the held connect: the stream is refused, not cut)
            limits={"connection_close_grace": "5s", "connect_timeout": "10s"}))
        procs.append(srv)
        reloads = srv.metric("sidecar_policy_reloads_total", result="ok")
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port("inbound")),
                                                      timeout=10)) as tls:
            tls.sendall(b"ping")
            time.sleep(0.3)  # (the sidecar's connect to the app has begun)
            write_policy(tmp_path / "mesh.yaml", rules("billing"))
            wait_for(lambda: srv.metric("sidecar_policy_reloads_total", result="ok")
                     > reloads, timeout=10)

            def drain_queue() -> None:
                app.settimeout(0.2)
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    try:
                        conn, _ = app.accept()
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    served.append(conn)
                    conn.settimeout(0.5)
                    try:
                        data = conn.recv(65536)
                        if data:
                            conn.sendall(data)
                    except OSError:
                        pass

            thread = threading.Thread(target=drain_queue, daemon=True)
            thread.start()
            got = _rest(tls, timeout=5)
        assert b"ping" not in got, "the stream started after the policy refused it"
        [rec] = _request_records(tmp_path / "audit-orders")
        assert rec["status"] == 403, rec
    finally:
        app.close()
        for s in fillers + served:
            s.close()


# -- a wall clock stepped back --------------------------------------------------------------

# The introspection cache's readers: each must see the cached answer run out when its TTL
# has passed on the monotonic clock, whatever the wall clock (``now``) says. The wall clock
# cannot be stepped for a running sidecar without touching the machine's own clock, so the
# cache (the real one) is driven with explicit wall times and the real monotonic clock.
CACHE_READERS = {
    "lookup": lambda cache, now: cache.lookup("idp", b"d", now) is not None,
    "fresh": lambda cache, now: cache.fresh("idp", b"d", now) is not None,
    # (the sweep asks the server again at this wall time: it must not be in the future)
    "expires_at": lambda cache, now: cache.expires_at("idp", b"d") > time.time() + 0.01,
}
TTL = 0.3


@pytest.mark.parametrize("reader", list(CACHE_READERS))
@pytest.mark.parametrize("answer", ["active", "unavailable"])
def test_a_wall_clock_stepped_back_does_not_keep_a_cached_answer(reader, answer):
    from sidecar.authn.oauth import IntrospectionCache

    counts = CACHE_READERS[reader]
    cache = IntrospectionCache()
    # The answer is cached while the wall clock is an hour ahead; then it is stepped back
    # (to the machine's real time): by it, the answer would have an hour and TTL left.
    ahead = time.time() + 3600
    if answer == "active":
        cache.store("idp", b"d", {"active": True, "exp": ahead + 3600}, ahead, TTL, TTL)
    else:
        cache.store_unavailable("idp", b"d", ahead, TTL)
    assert counts(cache, ahead), "the answer is not kept at all"
    time.sleep(TTL + 0.05)
    assert not counts(cache, time.time()), "the answer outlived its TTL after a clock step"
