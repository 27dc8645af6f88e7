"""The workload's current certificate and the TLS contexts built from it.

Swapped atomically by the certificate reloader: a handshake reads ``server_context`` /
``client_context`` once when it starts, so existing connections keep the context they began
with while new handshakes use the new certificate.

Each snapshot holds two variants of each context: HTTP listeners advertise ALPN ``http/1.1``,
opaque TCP listeners (``protocol: tcp``) advertise no ALPN at all, since they do not speak
HTTP and a peer must not be told they do.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

from sidecar.identity.svid import Svid, load_svid
from sidecar.identity.tls import client_context, server_context


@dataclass(frozen=True)
class TlsSnapshot:
    svid: Svid
    server: ssl.SSLContext
    client: ssl.SSLContext
    loaded_at: float
    server_tcp: ssl.SSLContext
    client_tcp: ssl.SSLContext


class TlsState:
    """Holder of the current ``TlsSnapshot``; readers never see a half-built one."""

    def __init__(self, snapshot: TlsSnapshot) -> None:
        self._snap = snapshot
        self.last_error: str | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0

    @classmethod
    def load(cls, cert: str, key: str, bundle: str) -> TlsState:
        return cls(build_snapshot(cert, key, bundle))

    @property
    def snapshot(self) -> TlsSnapshot:
        return self._snap

    @property
    def server_context(self) -> ssl.SSLContext:
        return self._snap.server

    @property
    def client_context(self) -> ssl.SSLContext:
        return self._snap.client

    def server_context_for(self, protocol: str) -> ssl.SSLContext:
        """The inbound context for a listener of ``protocol`` (``http`` or ``tcp``)."""
        snap = self._snap
        return snap.server_tcp if protocol == "tcp" else snap.server

    def client_context_for(self, protocol: str) -> ssl.SSLContext:
        """The outbound context for an upstream of ``protocol`` (``http`` or ``tcp``)."""
        snap = self._snap
        return snap.client_tcp if protocol == "tcp" else snap.client

    @property
    def spiffe_id(self) -> str:
        return str(self._snap.svid.spiffe_id)

    def swap(self, snapshot: TlsSnapshot) -> None:
        self._snap = snapshot
        self.last_error = None
        self.reloads_ok += 1

    def valid(self, now: float) -> bool:
        svid = self._snap.svid
        return svid.not_before <= now < svid.not_after


def build_snapshot(cert: str, key: str, bundle: str) -> TlsSnapshot:
    """Load and check the three files from one consistent snapshot; build every context."""
    svid = load_svid(cert, key, bundle, time.time())
    return TlsSnapshot(svid, server_context(svid), client_context(svid), time.time(),
                       server_context(svid, alpn=()), client_context(svid, alpn=()))
