"""A loss of trust cuts what is in flight at once, not after ``connection_close_grace``
(found by the twenty-second session's hostile review of trust lifetime).

Before, a TCP or upgraded stream, a download or an upload kept running for
``limits.connection_close_grace`` (10 s by default) after its peer's CA was removed from the
bundle (``peer_untrusted``), a certificate of the peer's or the own chain expired
(``peer_cert_expired``, ``own_cert_expired``), the credentials it was authorised with
expired (``credential_expired``), a reload refused it (``policy_refused``: a revoked token,
a removed key, a rule taken away) or an alert blocked its source (``source_blocked``). Only
retirements that are not a loss of trust (``max_age``, ``own_cert_rotated``) keep the grace
(docs/identity.md "Connection lifetime").

The family, as data: every such reason x (inbound, outbound) x (TCP stream, upgraded stream,
download, upload) -- the three HTTP kinds at once through one sidecar --, with real sidecars, short-lived certificates, bundle and policy rewrites.
The grace is 30 s; the cut must come within ``CUT_WITHIN`` of the retirement, and the
``connection_closed`` record names the reason. Combinations that cannot happen are listed
with why (``NOT_APPLICABLE``). The groups run at once, each in a thread of its own with its
own sidecar (``family``; ``_run_family`` of tests/test_lifetime_review.py).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.identity.ca import DevCA, write_svid
from sidecar.net.lifetime import CLOSE_REASONS, CUT_AT_ONCE, GRACEFUL_REASONS
from tests.harness import (
    TD,
    Pki,
    audit_export,
    free_port,
    mtls_context,
    read_head,
    replace_file,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)
from tests.test_connection_lifetime_e2e import closed
from tests.test_lifetime_review import (
    BIG,
    _api_key,
    _Body,
    _drain,
    _Member,
    _outcome,
    _policy_doc,
    _read_some,
    _reloads,
    _run_family,
    _stamp,
    _write,
)
from tests.test_lifetime_review2 import _EndlessUpstream

pytestmark = pytest.mark.usefixtures("no_internal_errors")

GRACE = "30s"
CUT_WITHIN = 6.0  # seconds from the retirement to the cut: far below the grace
EXPIRES_IN = 14.0  # a certificate or credential that ends while the transfer runs

KINDS = ["tcp", "upgrade", "download", "upload"]
# reason -> how it is brought about, per direction
INBOUND = ["peer_untrusted", "peer_cert_expired", "own_cert_expired", "credential_expired",
           "policy_refused", "source_blocked"]
OUTBOUND = ["peer_untrusted", "peer_cert_expired", "own_cert_expired", "policy_refused"]
NOT_APPLICABLE = {
    ("inbound", "credential_expired", "tcp"): "a TCP stream is authorised by the peer's "
                                              "certificate alone: it carries no token or key",
    ("outbound", "credential_expired"): "an outbound listener authorises the app's requests "
                                        "by egress, not by the app's credentials",
    ("outbound", "source_blocked"): "alerts judge inbound callers only",
}
CASES = [("inbound", r, k) for r in INBOUND for k in KINDS
         if ("inbound", r, k) not in NOT_APPLICABLE] + \
        [("outbound", r, k) for r in OUTBOUND for k in KINDS]
# The kinds one sidecar serves (a TCP listener, or an HTTP one for the other three): one
# sidecar, one trust event, every kind of the group in flight on its own connection.
GROUPS = {"tcp": ("tcp",), "http": ("upgrade", "download", "upload")}
GROUPED = sorted({(d, r, "tcp" if k == "tcp" else "http") for d, r, k in CASES})


def test_every_reason_is_classified() -> None:
    """Each retirement reason either keeps the grace or cuts at once, and every one that
    cuts at once is tested in both directions or named as not applicable."""
    assert set(CLOSE_REASONS) == GRACEFUL_REASONS | CUT_AT_ONCE
    assert not GRACEFUL_REASONS & CUT_AT_ONCE
    assert GRACEFUL_REASONS == {"max_age", "own_cert_rotated"}
    for reason in CUT_AT_ONCE:
        for direction, tested in (("inbound", INBOUND), ("outbound", OUTBOUND)):
            assert reason in tested or (direction, reason) in NOT_APPLICABLE, (direction,
                                                                               reason)


class _Upstream(_EndlessUpstream):
    """A TLS upstream that never ends a connection by itself (not a sidecar: only the sidecar
    under test may cut): an upgrade is echoed, a GET answered with an endless body, a POST's
    body read for as long as it comes."""

    timeout = 60.0

    def serve(self, sock: socket.socket) -> None:
        head = read_head(sock)
        if b"upgrade: echo" in head.lower():
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                         b"Connection: upgrade\r\n\r\n")
            while not self.stopped.is_set():
                data = sock.recv(1 << 16)
                if not data:
                    return
                sock.sendall(data)
        elif head.startswith(b"GET"):
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1099511627776\r\n\r\n")
            chunk = b"0" * (1 << 16)
            while not self.stopped.is_set():
                sock.sendall(chunk)
        else:
            while not self.stopped.is_set() and sock.recv(1 << 16):
                pass


def _short(pki: Pki, tmp: Path, name: str) -> Path:
    """An SVID for ``name`` of ``pki``'s CA whose leaf ends ``EXPIRES_IN`` from now."""
    now = time.time()
    return write_svid(pki.ca.issue(spiffe(name), ttl_seconds=EXPIRES_IN + 60,
                                   not_before=now - 60), pki.ca, tmp / f"{name}-short")


def _other(tmp: Path, name: str) -> tuple[Path, bytes]:
    """An SVID for ``name`` in the own trust domain from another root; (dir, root PEM)."""
    other = DevCA.create(TD)
    return write_svid(other.issue(spiffe(name)), other, tmp / f"{name}-other"), \
        other.bundle_pem


def _begin(sock: socket.socket, kind: str, headers: dict[str, str]) -> None:
    """Start the transfer of ``kind`` on ``sock`` and see it flow."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if kind == "upgrade":
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: echo\r\n"
                     f"Connection: upgrade\r\n{extra}\r\n".encode())
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101"), head
        _going(sock, kind)
    elif kind in ("download", "tcp"):  # (a TCP stream carries an HTTP download)
        sock.sendall(f"GET /big?n={BIG} HTTP/1.1\r\nHost: orders\r\n{extra}\r\n".encode())
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        _read_some(sock, 1 << 20)
    else:
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: orders\r\nContent-Length: {BIG}\r\n"
                     f"{extra}\r\n".encode())
        sock.sendall(b"x" * (1 << 20))


def _going(sock: socket.socket, kind: str) -> None:
    if kind == "upgrade":
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
    elif kind == "upload":
        sock.sendall(b"x" * (1 << 16))
    else:
        _read_some(sock, 1 << 16)


def _inbound(tmp: Path, pki: Pki, app: int, procs: list[Any], reason: str, kind: str
             ) -> tuple[Any, Callable[[], socket.socket], dict[str, str], Callable[[], None]]:
    """(sidecar, opener of a client connection, headers, trigger) of an inbound case."""
    protocol = "tcp" if kind == "tcp" else "http"
    server = _short(pki, tmp, "orders") if reason == "own_cert_expired" \
        else pki.identity("orders")
    client = _short(pki, tmp, "frontend") if reason == "peer_cert_expired" \
        else pki.identity("frontend")
    own_pem = Path(pki.bundle).read_bytes()
    if reason == "peer_untrusted":
        client, other_pem = _other(tmp, "frontend")
        (server / "ca.crt").write_bytes(own_pem + other_pem)
    rule: dict[str, Any] = {"name": "callers", "allow": {"from": [spiffe("frontend")]}}
    headers: dict[str, str] = {}
    keys: list[dict[str, Any]] = []
    if reason == "credential_expired":
        key, entry = _api_key("victim", expires_at=_stamp(time.time() + EXPIRES_IN))
        rule["allow"]["apikey"] = True
        headers["x-api-key"] = key
        keys.append(entry)
    doc = _policy_doc([rule], api_keys=keys)
    if reason == "source_blocked":
        doc["alerts"] = [{"name": "burst", "threshold": 3, "window": "1m", "by": "address",
                          "block": "5m"}]
    policy = _write(tmp, doc)
    proc = start_sidecar(tmp, "orders", sidecar_config(server, inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}",
        "protocol": protocol}, policy=policy, limits={"connection_close_grace": GRACE},
        audit={"path": str(tmp / "audit")}))
    procs.append(proc)
    port = proc.port("inbound")
    ctx = mtls_context(client, pki.bundle)

    def opener() -> socket.socket:
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))

    def trigger() -> None:
        if reason == "peer_untrusted":
            replace_file(server / "ca.crt", own_pem)
        elif reason == "policy_refused":
            before = _reloads(proc)
            _write(tmp, _policy_doc([{"name": "callers",
                                      "allow": {"from": [spiffe("someone-else")]}}]))
            wait_for(lambda: _reloads(proc) > before)
        elif reason == "source_blocked":
            anonymous = ssl.create_default_context(cafile=pki.bundle)
            anonymous.check_hostname = False
            for _ in range(3):  # no client certificate: credential failures of 127.0.0.1
                try:
                    with anonymous.wrap_socket(socket.create_connection(
                            ("127.0.0.1", port), timeout=5)) as s:
                        s.recv(1)
                except OSError:
                    pass
        # (expiries need no trigger: the time passes)

    return proc, opener, headers, trigger


def _outbound(tmp: Path, pki: Pki, procs: list[Any], reason: str, kind: str
              ) -> tuple[Any, Callable[[], socket.socket], dict[str, str], Callable[[], None],
                         _Upstream]:
    """(sidecar, opener, headers, trigger, upstream) of an outbound case."""
    front = _short(pki, tmp, "frontend") if reason == "own_cert_expired" \
        else pki.identity("frontend")
    up = _short(pki, tmp, "orders") if reason == "peer_cert_expired" \
        else pki.identity("orders")
    own_pem = Path(pki.bundle).read_bytes()
    if reason == "peer_untrusted":
        up, other_pem = _other(tmp, "orders")
        (front / "ca.crt").write_bytes(own_pem + other_pem)
    upstream = _Upstream(up, pki.bundle)
    procs.append(upstream)
    policy = _write(tmp, _policy_doc([], egress=[spiffe("orders")]))
    proc = start_sidecar(tmp, "frontend", sidecar_config(front, outbound=[{
        "name": "orders", "listen": f"127.0.0.1:{free_port()}",
        "upstream": f"127.0.0.1:{upstream.port}", "identity": spiffe("orders"),
        "protocol": "tcp" if kind == "tcp" else "http"}],
        policy=policy, limits={"connection_close_grace": GRACE},
        audit={"path": str(tmp / "audit")}))
    procs.append(proc)
    port = proc.port("orders")

    def opener() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    def trigger() -> None:
        if reason == "peer_untrusted":
            replace_file(front / "ca.crt", own_pem)
        elif reason == "policy_refused":
            before = _reloads(proc)
            _write(tmp, _policy_doc([], egress=[spiffe("billing")]))
            wait_for(lambda: _reloads(proc) > before)

    return proc, opener, {}, trigger, upstream


class _Stoppable:
    def __init__(self, upstream: _Upstream) -> None:
        self.upstream = upstream

    def stop(self, timeout: float = 0) -> None:
        self.upstream.close()


# the reasons a certificate or credential brings about by expiring (EXPIRES_IN after it is made)
EXPIRING = frozenset({"peer_cert_expired", "own_cert_expired", "credential_expired"})


@pytest.mark.parametrize(("direction", "reason", "group"), GROUPED)
def test_a_loss_of_trust_cuts_what_is_in_flight_at_once(family, request, direction, reason,
                                                        group):
    # Every member of CASES, the kinds of a group at once (a certificate waits EXPIRES_IN to
    # expire once per group, not once per kind), and the groups at once (``family``: each
    # group's sidecar, connections and checks in a thread of its own).
    _outcome(family, request)


def _cut(tmp_path, pki, app, procs, member, direction, reason, group):
    kinds = [k for k in GROUPS[group] if (direction, reason, k) in CASES]
    made = time.time()  # (what expires is made after this, and ends EXPIRES_IN after it)
    if direction == "inbound":
        proc, opener, headers, trigger = _inbound(tmp_path, pki, app, procs, reason, kinds[0])
    else:
        proc, opener, headers, trigger, upstream = _outbound(tmp_path, pki, procs, reason,
                                                             kinds[0])
        procs[procs.index(upstream)] = _Stoppable(upstream)
    socks = [opener() for _ in kinds]
    try:
        for sock, kind in zip(socks, kinds, strict=True):
            _begin(sock, kind, headers)
        member.set_up()
        trigger()
        if reason in EXPIRING:
            member.sleep_until(made + EXPIRES_IN - 1)
        # (an expiry: up to EXPIRES_IN and the once-a-second sweep)
        wait_for(lambda: closed(proc, reason, direction) >= 1, timeout=EXPIRES_IN + 20)
        retired = time.monotonic()
        for sock, kind in zip(socks, kinds, strict=True):
            left = max(0.1, CUT_WITHIN - (time.monotonic() - retired))
            assert _drain(sock, timeout=left), \
                f"the {kind} ran on after {reason} ({direction}; the grace is {GRACE})"
        assert time.monotonic() - retired < CUT_WITHIN
    finally:
        for sock in socks:
            sock.close()
    cut = [e for e in proc.log_events("connection_closed") if e.get("reason") == reason
           and e.get("direction") == direction]
    assert len(cut) >= len(kinds), proc.log_events("connection_closed")
    if direction == "outbound" or reason != "source_blocked":
        assert all(e.get("peer") == spiffe("orders" if direction == "outbound"
                                           else "frontend") for e in cut), cut
    # Each cut request or stream keeps its one record, and it says why it was cut (before
    # the twenty-fourth session a cut HTTP request's said only ``connection_closed``).
    proc.stop(timeout=10)
    ends = [(r.get("extra") or {}).get("error") for r in audit_export(tmp_path / "audit")
            if r.get("event") in ("request", "stream_closed") and r.get("status") in (0, 200)
            and str((r.get("extra") or {}).get("error", "")).startswith("connection_closed")]
    assert ends == [f"connection_closed:{reason}"] * len(kinds), (kinds, ends)
    # ... and each a warning line: a stream's ``stream_closed``, a request's
    # ``request_refused`` (status 0; a debug line before the twenty-fourth session).
    lines = [e for e in proc.log_events() if e.get("event") in ("request_refused", "stream_closed")
             and e.get("reason") == f"connection_closed:{reason}"]
    assert sorted((e["event"], e.get("status")) for e in lines) == sorted(
        ("stream_closed", 200 if k == "tcp" else 0) if k in ("tcp", "upgrade")
        else ("request_refused", 0) for k in kinds), lines


FAMILY: dict[str, _Body] = {
    "test_a_loss_of_trust_cuts_what_is_in_flight_at_once": (
        _cut, lambda direction, reason, group: (EXPIRES_IN if reason in EXPIRING else 0.0,
                                                False)),
}


@pytest.fixture(scope="module")
def family(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, _Member]:
    return _run_family(request, tmp_path_factory, FAMILY)
