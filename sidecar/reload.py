"""Watch files and swap in new state only when it parses fully.

Theory of operation: watching is polling, on purpose. Kubernetes updates a mounted ConfigMap
or Secret by writing a new ``..<timestamp>`` directory and atomically re-pointing the
``..data`` symlink; the visible file is a symlink through ``..data``. An inotify watch on the
old inode goes silent after the swap, while a poll that re-resolves the path every interval
sees it at once. A change is acted on only when the content hash differs and has stayed the
same for one whole interval (a file rewritten in place, in pieces, is never read half-way),
and the new content must parse and validate completely before the swap; otherwise the old
state stays, the error is logged with file:line:key and counted. The loader reads the files
itself, so they are fingerprinted again after it: a load that raced a new write (the files
changed between settling and reading) is dropped, and the new content settles first.

A watched path may be a directory (a policy set, docs/policy.md "Policy sets"): its
fingerprint covers the names and contents of the files in it, read through ``..data`` resolved
once, so a ConfigMap update is one change however many files it touches, and a directory
swapped while being hashed is simply hashed again at the next poll. The fingerprint covers
exactly the files the loader reads (``policyset.policy_file_names``, one list for both): they
disagreed once -- the poll hashed the first 2,000 entries of any kind, so in a directory with
many other files a policy change was never applied. A directory the loader refuses (more than
``MAX_POLICY_FILES`` policy files, unreadable) fingerprints as that error: it is loaded, and
refused with the error, never silently cut short.

Reload signals: SIGHUP and SIGUSR1 (``RELOAD_SIGNALS``; nginx, HAProxy and ghostunnel reload
on them) make every watcher of the process look at its files at once (``wake_watchers``)
instead of at its next poll; content found changed is then taken once it has held still for
``SIGNAL_SETTLE`` seconds (or the watcher's interval, if shorter) instead of a whole interval,
and is still loaded and validated whole, and dropped if it changes while being read. It used
to be taken at once -- "the signal says the files are written" -- but the signal is one for
the whole process and says that of one file at most (spiffe-helper's ``renew_signal`` after it
wrote the SVID): a policy being rewritten in place at that moment was loaded half-written,
cut before its deny rule (found by a hostile review). SIGUSR2 (``IGNORED_SIGNALS``) is logged
and ignored. Without a handler each of them would end the process at once (Python's default), with
no drain and no audit flush.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from sidecar import logs
from sidecar.config.source import read_regular
from sidecar.errors import ConfigError

FINGERPRINT_BYTES = 16 * 1024 * 1024  # per file: more than any loader accepts

# Polls in a row that found the files changed again before they settled, after which the
# watcher says so (``reload_unsettled``, once per such spell): a file that never holds
# still -- rewritten by a loop, or a symlink to a file that changes at every read such as
# ``/proc/self/status`` -- is never applied, and nothing said why before.
UNSETTLED_POLLS = 5

# After a reload signal, how long changed content must hold still (one re-read this much
# later, matching) before it is loaded; a watcher polling faster needs its interval only. A
# writer pausing this long half-way is read as it is, as one pausing a whole interval is
# without a signal (docs/config.md "Signals": write files atomically).
SIGNAL_SETTLE = 1.0

# Signals whose default action ends the process and that operators and init systems send to a
# running server, as data (docs/config.md "Signals"): the reload signals wake every watcher
# now; the ignored ones are only logged.
RELOAD_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGHUP, signal.SIGUSR1)
IGNORED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2,)


# Bytes read by one fingerprint in all (found by a hostile review: a directory of 2,000
# files of 16 MiB was read whole, 32 GiB, at every poll of every worker). More than any
# loader accepts in all (a policy set: 64 MiB); beyond it a file is fingerprinted by its
# size and modification time, so a change that could make the set loadable (a file shrunk
# or removed) is still seen.
FINGERPRINT_TOTAL_BYTES = 65 * 1024 * 1024


class _Budget:
    """The bytes a fingerprint may still read."""

    def __init__(self) -> None:
        self.left = FINGERPRINT_TOTAL_BYTES


def fingerprint(paths: Sequence[str]) -> str | None:
    """Content hash of the files and directories (following symlinks), or None if one cannot
    be read; at most ``FINGERPRINT_TOTAL_BYTES`` are read, later files count by size and
    modification time."""
    h = hashlib.sha256()
    budget = _Budget()
    for path in paths:
        try:
            if os.path.isdir(path):
                _hash_directory(h, path, budget)
            else:
                _hash_file(h, path, budget)
        except OSError:
            return None
        h.update(b"\0")
    return h.hexdigest()


def _hash_file(h: Any, path: str, budget: _Budget) -> None:
    # A FIFO put where the file was would block this poll (and every later one) forever:
    # only regular files are read, without blocking.
    if budget.left <= 0:
        st = os.stat(path)
        h.update(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
        return
    data = read_regular(path, min(FINGERPRINT_BYTES, budget.left))
    budget.left -= len(data)
    h.update(data)


def _hash_directory(h: Any, path: str, budget: _Budget) -> None:
    """Names and contents of the files the policy loader reads from directory ``path``
    (``policy_file_names``: its visible *.yaml / *.yml entries, through a Kubernetes
    ``..data`` link when there is one), in name order; a directory the loader refuses
    counts as its error -- among them one whose visible entries are not the ``..data``
    version's links (a visible file replaced by an edited copy, a file dropped beside the
    links, a policy suffix in another case): hashing only ``..data`` took such an edit for no
    change at all, never loaded nor reported (found by a hostile review, session 29)."""
    from sidecar.policy.policyset import policy_file_names

    try:
        link, names = policy_file_names(path)
    except ConfigError as exc:
        # A change like any other: loaded, and refused with this error (the policy in force
        # stays) -- never a fingerprint of part of the files.
        h.update(b"\0refused\0" + str(exc).encode("utf-8", "surrogateescape"))
        return
    base = link or path
    for name in names:
        full = os.path.join(base, name)
        if not os.path.isfile(full):
            # Its name counts (never its content: a FIFO is not read): an entry that turns
            # into a dangling symlink, a FIFO or a directory is a change to load and report.
            h.update(name.encode("utf-8", "surrogateescape") + b"\0-\0")
            continue
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
        _hash_file(h, full, budget)
        h.update(b"\0")


class FileWatcher:
    """Polls ``paths``; on a content change calls ``load()`` and then ``apply(result)``.

    ``load`` is synchronous and raises on bad input; ``apply`` runs only with a complete,
    valid result. ``on_error(exc)`` reports a failed load; the previous state stays in force.
    ``on_restored()`` (optional) says that after a failure the files are back to the content
    in force (a bad update reverted, a deleted file put back): nothing is loaded.
    ``wake()`` (a reload signal, ``wake_watchers``) makes the running watcher check now.
    """

    def __init__(self, name: str, paths: Sequence[str], load: Callable[[], Any],
                 apply: Callable[[Any], None], on_error: Callable[[BaseException], None],
                 interval: float, initial: str | None = None,
                 retry_failed_after: float = 30.0,
                 on_restored: Callable[[], None] | None = None) -> None:
        self.name = name
        self.paths = list(paths)
        self.load = load
        self.apply = apply
        self.on_error = on_error
        self.interval = interval
        self.last = initial if initial is not None else fingerprint(self.paths)
        self.last_failed: str | None = None
        self.failed_at = 0.0
        self.settling: str | None = None
        self.settling_since = 0.0  # when ``settling`` was first seen (monotonic)
        self.unsettled = 0  # polls in a row whose new content had changed again
        self.retry_failed_after = retry_failed_after
        self.on_restored = on_restored
        self._woken: trio.Event | None = None  # set by wake(); made by run()

    def mark_failed(self, seen: str | None = None) -> None:
        """The content on disk has failed to load (e.g. at start, outside the watcher): it is
        tried again when it changes, or after ``retry_failed_after`` as it is. ``seen``: the
        fingerprint taken before that load read the files (``fingerprint``, or ``"missing"``);
        without it the files are fingerprinted now -- after the load, so a change that landed
        in between would count as the content that failed (found by a hostile review)."""
        self.last_failed = seen if seen is not None else fingerprint(self.paths)
        self.failed_at = time.monotonic()

    def _settle_from(self, current: str) -> None:
        """``current`` is new content, not yet looked at: it starts settling now."""
        if current != self.settling:
            self.settling = current
            self.settling_since = time.monotonic()

    def _held_still(self, current: str) -> str | None:
        """After a reload signal: the fingerprint once ``current`` has held still for
        ``SIGNAL_SETTLE`` (or one interval, if shorter) since it was first seen -- re-read
        after a sleep when it is newer than that (this runs in the reload thread)."""
        self._settle_from(current)
        wait = self.settling_since + min(SIGNAL_SETTLE, self.interval) - time.monotonic()
        if wait <= 0:
            return current
        time.sleep(wait)
        again = fingerprint(self.paths)
        if again is not None and again != current:
            self._settle_from(again)
        return again

    def _check(self, now: bool = False) -> tuple[str | None, bool, Any, BaseException | None]:
        """Fingerprint and, if changed, load. Touches no shared state (runs in a thread).

        Returns (fingerprint, attempted, result, error). Content that failed to load is
        tried again every ``retry_failed_after`` seconds even when unchanged: a certificate
        that was "not yet valid" (clock skew) becomes valid without anyone touching it.
        ``now`` (a reload signal): changed content is loaded once it has held still for
        ``SIGNAL_SETTLE`` (or one interval, if shorter) instead of a whole interval, and
        content that failed is tried again at once.
        """
        current = fingerprint(self.paths)
        if current is None or current == self.last:
            return current, False, None, None
        if now and current != self.last_failed:
            # The signal is the whole process's (spiffe-helper's renew_signal after an SVID
            # renewal): it says nothing of the other files. A policy being rewritten in place
            # was loaded half-written, cut before its deny rule (found by a hostile review).
            held = self._held_still(current)
            if held != current:
                return held, False, None, None
        elif not now and current != self.settling and current != self.last_failed:
            # New content is applied only once it has stayed the same for a whole interval:
            # a file written in place, in pieces, can be valid YAML half-way through (cut at
            # a rule boundary, it could even be more permissive). Atomic swaps (Kubernetes
            # ..data, rename) settle at once and cost one interval of delay.
            self._settle_from(current)
            return current, False, None, None
        if not now and current == self.last_failed and (
                time.monotonic() - self.failed_at < self.retry_failed_after):
            return current, False, None, None
        try:
            result = self.load()
        except Exception as exc:  # noqa: BLE001 -- any load failure keeps the old state
            error: BaseException | None = exc
            result = None
        else:
            error = None
        after = fingerprint(self.paths)
        if after != current:
            # The loader read the files again, and they changed since they settled: what it
            # read may be a write in progress (an editor, `kubectl cp`, a script rewriting the
            # file in place), cut at a point where it still parses -- say before a deny rule.
            # Neither applied nor counted as a failure: the new content settles first.
            if after is not None:
                self._settle_from(after)
            return after, False, None, None
        return current, True, result, error

    def _settle(self, current: str | None, attempted: bool, result: Any,
                error: BaseException | None) -> bool:
        self._note_unsettled(current, attempted)
        if current is None:
            if self.last_failed != "missing":
                self.last_failed = "missing"
                self.on_error(FileNotFoundError(f"cannot read {', '.join(self.paths)}"))
            return False
        if current == self.last and self.last_failed not in (None, current):
            # After a failure (a bad update, a missing file) the files are back to what is in
            # force: nothing to load, but the failure is over.
            self.last_failed = None
            if self.on_restored is not None:
                self.on_restored()
        if not attempted:
            return False
        if error is not None:
            self.last_failed = current
            self.failed_at = time.monotonic()
            self.on_error(error)
            return False
        try:
            self.apply(result)
        except Exception:
            # Loaded but not applied (a bundle whose CA is in another trust domain's): a
            # failure of this content, not the set in force. Recorded as "in force" before
            # the apply, it was never tried again once the conflict was gone, and reverting
            # to it "restored" roots no file listed (found by a hostile review).
            self.last_failed = current
            self.failed_at = time.monotonic()
            raise
        self.last = current
        self.last_failed = None
        logs.log("reloaded", what=self.name)
        return True

    def _note_unsettled(self, current: str | None, attempted: bool) -> None:
        """Count the polls in a row that found content other than the last that was looked
        at and not loaded it (it changed again); at ``UNSETTLED_POLLS`` log
        ``reload_unsettled`` (warning) once, until the files hold still or go back."""
        if attempted or current is None or current in (self.last, self.last_failed):
            self.unsettled = 0
            return
        self.unsettled += 1
        if self.unsettled == UNSETTLED_POLLS:
            logs.log("reload_unsettled", "warning", what=self.name, paths=self.paths,
                     polls=self.unsettled)

    def poll_once(self, now: bool = False) -> bool:
        """Check once, synchronously; return True if new state was applied."""
        return self._settle(*self._check(now))

    def wake(self) -> None:
        """Check at once instead of at the next poll (from the watcher's own Trio run)."""
        if self._woken is not None:
            self._woken.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll every ``interval`` (or at once when woken) until cancelled; parse in a
        thread, apply on the Trio thread."""
        self._woken = trio.Event()
        token = trio.lowlevel.current_trio_token()
        _running[self] = token
        try:
            task_status.started()
            while True:
                with trio.move_on_after(self.interval):
                    await self._woken.wait()
                now = self._woken.is_set()
                if now:
                    self._woken = trio.Event()  # a signal during the check: check again
                # Parsing a large policy takes a while: do it in a thread so the data path
                # never stalls; the swap itself happens back on the Trio thread, atomically.
                checked = await trio.to_thread.run_sync(functools.partial(self._check, now),
                                                        abandon_on_cancel=True)
                try:
                    self._settle(*checked)
                except Exception as exc:  # noqa: BLE001 -- a failed apply must not stop watching
                    self.on_error(exc)
        finally:
            del _running[self]


# The watchers running now, each with the Trio run it belongs to (a process normally has one).
_running: dict[FileWatcher, trio.lowlevel.TrioToken] = {}


def wake_watchers() -> list[str]:
    """Every watcher running in the caller's Trio run checks its files now; their names."""
    token = trio.lowlevel.current_trio_token()
    woken = [w for w, t in list(_running.items()) if t is token]
    for watcher in woken:
        watcher.wake()
    return [w.name for w in woken]


def handle_signal(signum: int) -> bool:
    """A reload signal wakes every watcher (``reload_signal``); an ignored one is logged
    (``signal_ignored``). True for those two kinds (keep running); False for any other
    signal (the caller stops)."""
    if signum in RELOAD_SIGNALS:
        logs.log("reload_signal", signal=signal.Signals(signum).name, watchers=wake_watchers())
        return True
    if signum in IGNORED_SIGNALS:
        logs.log("signal_ignored", "warning", signal=signal.Signals(signum).name)
        return True
    return False


def ignore_signals_until_handled() -> None:
    """Until a Trio run handles them (``handle_signal``), the reload and ignored signals do
    nothing: a SIGHUP while the process starts must not end it. Inherited by child
    processes (each handles them once it runs). Main thread only; elsewhere a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (*RELOAD_SIGNALS, *IGNORED_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)


def release_memory() -> None:
    """Give freed C-heap memory back to the system after a big transient load (a policy of
    thousands of services read in a reload thread): glibc keeps per-thread arenas and raises
    its mmap threshold, so without a trim that memory stays in the RSS. No-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def realpath_snapshot(path: str) -> str:
    """Resolve ``..data`` style symlinks once (used to read a consistent file set)."""
    return os.path.realpath(path)
