"""The workload's current certificate and the TLS contexts built from it.

Swapped atomically by the certificate reloader: a handshake reads ``server_context`` /
``client_context`` once when it starts, so existing connections keep the context they began
with while new handshakes use the new certificate.
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
    """Load and check the three files from one consistent snapshot; build both contexts."""
    svid = load_svid(cert, key, bundle, time.time())
    return TlsSnapshot(svid, server_context(svid), client_context(svid), time.time())
