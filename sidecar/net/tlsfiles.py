"""A TLS client context made from files, and made again when those files change.

The control plane's long-lived clients (the audit shipper's collector connection, the JWKS
fetcher, the introspection client) hold a context for hours; the files it was made from -- a
CA bundle, a client certificate and key, mounted from a ConfigMap or Secret -- are rotated in
place. So the context is not remembered but re-checked: ``current()`` reads the files (through
the symlink a Kubernetes volume update swaps; regular files only, opened without blocking,
``config.source.read_regular``) and makes a new context when their content differs from what
the context in use was made from.

The context is made from the bytes read, never from the paths: the CA bundle goes to
OpenSSL as ``cadata``, the certificate and key through anonymous in-memory files
(``identity.tls.memory_files``, as the sidecar's own SVID). So what is loaded is exactly
what was compared -- a file swapped between the reading and the loading (for a FIFO, on which
``ssl`` would block the event loop forever, or for a half-written file) cannot get in.

A file that cannot be read, is not a regular file, is larger than ``MAX_TLS_FILE_BYTES``, or
does not load (caught half written) raises from ``current()`` (``OSError`` or
``ssl.SSLError``) and leaves the last context and its state as they were, so the next call
tries again.
"""

from __future__ import annotations

import errno
import hashlib
import ssl

from sidecar.config.source import read_regular
from sidecar.identity.tls import limit_key_exchange, memory_files

# A CA bundle, certificate chain or key file larger than this is refused (a bundle of a few
# hundred roots is well under it).
MAX_TLS_FILE_BYTES = 1024 * 1024


class FileContext:
    """A client context (TLS 1.2 or later; the chain and host name checked) that trusts the
    CA bundle ``ca`` (None: the system's trust store) and, with ``cert`` and ``key``,
    presents that certificate; made again by ``current()`` when one of the files changed."""

    def __init__(self, ca: str | None, cert: str | None = None, key: str | None = None) -> None:
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        self.files = [f for f in (ca, cert, key) if f]
        self._ca, self._cert = ca, cert
        self._state: str | None = None
        self.made = 0  # contexts made so far (tests)
        self.context = self.current()  # OSError / ssl.SSLError: the caller's to report

    def changed(self) -> bool:
        """Whether a file differs from what the context in use was made from (a file that
        cannot be read counts as changed: the next ``current()`` fails)."""
        try:
            return _digest(self.read()) != self._state
        except OSError:
            return True

    def current(self) -> ssl.SSLContext:
        """The context for the next handshake (made again if a file changed)."""
        blobs = self.read()
        state = _digest(blobs)
        if state != self._state:
            self.context = self.make(blobs)
            self._state = state
        return self.context

    def read(self) -> list[bytes]:
        """The files' bytes, in the order ``files`` names them; ``OSError`` when one is
        missing, unreadable, not a regular file or too large."""
        blobs = []
        for path in self.files:
            data = read_regular(path, MAX_TLS_FILE_BYTES + 1)
            if len(data) > MAX_TLS_FILE_BYTES:
                raise OSError(errno.EFBIG, f"larger than {MAX_TLS_FILE_BYTES} bytes", path)
            blobs.append(data)
        return blobs

    def make(self, blobs: list[bytes]) -> ssl.SSLContext:
        """A context from ``read()``'s bytes alone (no path is opened)."""
        rest = blobs
        if self._ca:
            if b"-----BEGIN" not in blobs[0]:
                raise ssl.SSLError(errno.EINVAL, f"{self._ca}: not a PEM CA bundle")
            # ``cadata`` takes ASCII text only; PEM blocks are ASCII, and what OpenSSL skips
            # between them when it reads a file (a byte order mark, comments naming issuers
            # in UTF-8, as curl's and Mozilla's bundles have) is dropped the same way.
            pem = blobs[0].decode("ascii", errors="ignore")
            ctx = ssl.create_default_context(cadata=pem)  # the bundle only, no system roots
            rest = blobs[1:]
        else:
            ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        limit_key_exchange(ctx)  # no finite-field groups (sidecar/identity/tls.py)
        if self._cert:
            with memory_files(rest[0], rest[1]) as (chain_path, key_path):
                ctx.load_cert_chain(chain_path, key_path)
        self.made += 1
        return ctx


def _digest(blobs: list[bytes]) -> str:
    h = hashlib.sha256()
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "big"))
        h.update(blob)
    return h.hexdigest()
