"""A TLS client context made from files, and made again when those files change.

The control plane's long-lived clients (the audit shipper's collector connection, the JWKS
fetcher) hold a context for hours; the files it was made from -- a CA bundle, a client
certificate and key, mounted from a ConfigMap or Secret -- are rotated in place. So the
context is not remembered but re-checked: ``current()`` compares the files' content hash
(``sidecar.reload.fingerprint``, the policy and certificate watchers' own: it follows the
symlink a Kubernetes volume update swaps, and reads only regular files) with what the
context was made from, and makes a new one when it differs. A file that cannot be read, is
not a regular file (``ssl`` would block on a FIFO put there), or does not load (caught half
written) raises from ``current()`` and leaves the last context and its state as they were,
so the next call tries again.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Callable, Iterable

from sidecar.reload import fingerprint


class FileContext:
    """``make()``'s context, made again by ``current()`` when one of ``files`` changed."""

    def __init__(self, make: Callable[[], ssl.SSLContext], files: Iterable[str | None]) -> None:
        self._make = make
        self.files = [f for f in files if f]
        self._state: str | None = None
        self.context = self.current()  # OSError / ssl.SSLError: the caller's to report

    def changed(self) -> bool:
        """Whether a file differs from what the context in use was made from."""
        return fingerprint(self.files) != self._state

    def current(self) -> ssl.SSLContext:
        """The context for the next handshake (made again if a file changed)."""
        state = fingerprint(self.files)
        if state is None:
            # Missing, unreadable or not a regular file (``ssl`` would block on a FIFO put
            # there, and with it the event loop): not loaded, this attempt fails.
            raise OSError(errno.EINVAL, "a TLS file is missing or not a regular file",
                          " ".join(self.files))
        if state != self._state:
            self.context = self._make()
            self._state = state
        return self.context
