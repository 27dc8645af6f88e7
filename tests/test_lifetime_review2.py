"""Trust that ended while a connection still used it, second pass (found by a hostile review
of trust lifetime), each as a family through real sidecars, real certificates and real files.

* A plain request in flight through an OUTBOUND listener (a long download or upload) went on
  to its end over an upstream connection whose trust ended -- the upstream's chain expired,
  its CA was removed from the bundle, the own certificate expired -- while the same request
  inbound is cut. The app-side connection now carries the upstream connection's admission
  while the request is in flight and is cut after ``connection_close_grace``
  (``peer_cert_expired``, ``peer_untrusted``, ``own_cert_expired``); egress withdrawn keeps
  its ``policy_refused``. A change that still trusts the upstream leaves it alone.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from sidecar.identity.ca import DevCA, write_svid
from tests.harness import (
    TD,
    Pki,
    free_port,
    read_head,
    replace_file,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)
from tests.test_connection_lifetime_e2e import closed, wait_closed
from tests.test_lifetime_review import (
    _drain,
    _policy_doc,
    _reloads,
    _short_lived_identity,
    _start,
    _still_going,
    _write,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

GRACE = "500ms"


class _EndlessUpstream:
    """A TLS server on 127.0.0.1 (not a sidecar: it never ends a connection by itself)
    presenting the SVID in ``ident`` and requiring a client certificate of ``bundle``: a GET
    gets an endless body, a POST's body is read for as long as it comes."""

    def __init__(self, ident: Path, bundle: str) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(ident / "tls.crt"), str(ident / "tls.key"))
        self.ctx.load_verify_locations(bundle)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        chunk = b"0" * (1 << 16)
        try:
            conn.settimeout(30)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                head = read_head(tls)
                if head.startswith(b"GET"):
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1099511627776\r\n\r\n")
                    while not self._stop.is_set():
                        tls.sendall(chunk)
                else:
                    while not self._stop.is_set() and tls.recv(1 << 16):
                        pass
        except (OSError, ValueError, EOFError):
            pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass


def _other_root_identity(tmp: Path, name: str) -> tuple[Path, bytes]:
    """An SVID for ``name`` in the own trust domain from another CA; (dir, that CA's PEM)."""
    other = DevCA.create(TD)
    return write_svid(other.issue(spiffe(name)), other, tmp / f"{name}-other"), \
        other.bundle_pem


# how the upstream's trust ends -> the reason the request in flight is cut with
OUTBOUND_TRUST_ENDS = {
    "upstream_chain_expires": "peer_cert_expired",
    "upstream_ca_removed": "peer_untrusted",
    "own_chain_expires": "own_cert_expired",
    "own_intermediate_expires": "own_cert_expired",
    "egress_withdrawn": "policy_refused",
}


def _outbound_setup(tmp: Path, pki: Pki, how: str) -> tuple[Path, Path, _EndlessUpstream,
                                                             Path | None, bytes]:
    """(frontend identity dir, upstream identity dir, upstream server, the frontend's bundle
    file to rewrite, what must stay in it)."""
    front = pki.identity("frontend")
    up_bundle = pki.bundle
    if how == "upstream_chain_expires":
        now = time.time()
        up = write_svid(pki.ca.issue(spiffe("orders"), ttl_seconds=68, not_before=now - 60),
                        pki.ca, tmp / "orders-short")
    elif how == "upstream_ca_removed":
        up, other_pem = _other_root_identity(tmp, "orders")
        front = write_svid(pki.ca.issue(spiffe("frontend")), pki.ca, tmp / "frontend-own")
        own_pem = Path(pki.bundle).read_bytes()
        (front / "ca.crt").write_bytes(own_pem + other_pem)
        return front, up, _EndlessUpstream(up, up_bundle), front / "ca.crt", own_pem
    elif how.startswith("own_"):
        chain = "leaf" if how == "own_chain_expires" else "intermediate"
        front, bundle, _ = _short_lived_identity(tmp, pki, "frontend", chain, 8)
        if chain == "intermediate":
            (front / "ca.crt").write_bytes((front / "ca.crt").read_bytes()
                                           + Path(pki.bundle).read_bytes())
            trusted = tmp / "up-bundle.crt"
            trusted.write_bytes(Path(pki.bundle).read_bytes() + Path(bundle).read_bytes())
            up_bundle = str(trusted)
        up = pki.identity("orders")
    else:
        up = pki.identity("orders")
    return front, up, _EndlessUpstream(up, up_bundle), None, b""


@pytest.mark.parametrize("kind", ["download", "upload"])
@pytest.mark.parametrize("how", list(OUTBOUND_TRUST_ENDS))
def test_an_outbound_request_in_flight_ends_when_its_upstreams_trust_ends(
        tmp_path, pki, procs, kind, how):
    front, _, upstream, bundle_file, keep = _outbound_setup(tmp_path, pki, how)
    try:
        policy = _write(tmp_path, _policy_doc([], egress=[spiffe("orders")]))
        cfg = sidecar_config(front, outbound=[{
            "name": "orders", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{upstream.port}", "identity": spiffe("orders")}],
            policy=policy, limits={"connection_close_grace": GRACE})
        out = start_sidecar(tmp_path, "frontend", cfg)
        procs.append(out)
        reason = OUTBOUND_TRUST_ENDS[how]
        with socket.create_connection(("127.0.0.1", out.port("orders")), timeout=10) as s:
            _start(s, kind)
            if bundle_file is not None:
                # The control: a bundle that still holds the upstream's CA (one more root).
                replace_file(bundle_file, bundle_file.read_bytes()
                             + DevCA.create(TD).bundle_pem)
                wait_for(lambda: out.metric("sidecar_certificate_reloads_total",
                                            result="ok") >= 1)
                _still_going(s, kind)
                assert closed(out, reason, "outbound") == 0
                replace_file(bundle_file, keep)
            elif how == "egress_withdrawn":
                _write(tmp_path, _policy_doc([], egress=[spiffe("billing")]))
                wait_for(lambda: _reloads(out) >= 2)
            wait_closed(out, reason, "outbound")
            assert _drain(s), f"the {kind} went on after its upstream's trust ended ({how})"
    finally:
        upstream.close()
