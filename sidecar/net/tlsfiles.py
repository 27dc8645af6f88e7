"""A TLS client context made from files, and made again when those files change.

The control plane's long-lived clients (the audit shipper's collector connection, the JWKS
fetcher) hold a context for hours; the files it was made from -- a CA bundle, a client
certificate and key, mounted from a ConfigMap or Secret -- are rotated in place. So the
context is not remembered but re-checked: ``current()`` compares each file's inode, size and
modification time (``os.stat`` follows the symlink a Kubernetes volume update swaps) with
what the context was made from, and makes a new one when any differ. A file that cannot be
read, or does not load (caught half written), raises from ``current()`` and leaves the last
context and its state as they were, so the next call tries again.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterable

FileState = tuple[tuple[int, int, int] | None, ...]


def files_state(paths: Iterable[str]) -> FileState:
    """(inode, size, mtime in ns) of each file; None for one that cannot be read."""
    state: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
            state.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            state.append(None)
    return tuple(state)


class FileContext:
    """``make()``'s context, made again by ``current()`` when one of ``files`` changed."""

    def __init__(self, make: Callable[[], ssl.SSLContext], files: Iterable[str | None]) -> None:
        self._make = make
        self.files = [f for f in files if f]
        self._state = files_state(self.files)
        self.context = make()  # OSError / ssl.SSLError: the caller's to report

    def changed(self) -> bool:
        """Whether a file differs from what the context in use was made from."""
        return files_state(self.files) != self._state

    def current(self) -> ssl.SSLContext:
        """The context for the next handshake (made again if a file changed)."""
        state = files_state(self.files)
        if state != self._state:
            self.context = self._make()
            self._state = state
        return self.context
