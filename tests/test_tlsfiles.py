"""``sidecar.net.tlsfiles.FileContext``: a client context made again when its files change."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from sidecar.net.tlsfiles import FileContext
from tests.harness import KubeletVolume, ThrowawayCA


def test_made_again_only_when_a_file_changes_and_retried_after_a_bad_file(
        tmp_path: Path) -> None:
    volume = KubeletVolume(tmp_path / "ca")
    volume.publish({"ca.pem": ThrowawayCA("first").cert_pem})
    made: list[ssl.SSLContext] = []

    def make() -> ssl.SSLContext:
        made.append(ssl.create_default_context(cafile=volume.path("ca.pem")))
        return made[-1]

    tls = FileContext(make, (volume.path("ca.pem"), None))
    first = tls.current()
    assert tls.current() is first and len(made) == 1 and not tls.changed()
    volume.publish({"ca.pem": b"-----BEGIN CERTIFICATE-----\nhalf"})  # caught half written
    assert tls.changed()
    with pytest.raises(ssl.SSLError):
        tls.current()
    assert tls.context is first and tls.changed()  # kept, and tried again next time
    volume.publish({"ca.pem": ThrowawayCA("second").cert_pem})
    second = tls.current()
    assert second is not first and len(made) == 2 and not tls.changed()


def test_a_missing_file_fails_and_its_return_is_seen(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ThrowawayCA().write(ca)
    tls = FileContext(lambda: ssl.create_default_context(cafile=str(ca)), (str(ca),))
    ca.unlink()
    with pytest.raises(OSError):
        tls.current()
    ThrowawayCA().write(ca)
    assert tls.current() is tls.context


def test_a_fifo_put_where_a_file_was_fails_at_once(tmp_path: Path) -> None:
    """``ssl`` would wait forever on a FIFO (and with it the event loop that asked): the
    file is refused as not regular, and the last context is kept."""
    import os
    import threading

    ca = tmp_path / "ca.pem"
    ThrowawayCA().write(ca)
    tls = FileContext(lambda: ssl.create_default_context(cafile=str(ca)), (str(ca),))
    kept = tls.context
    ca.unlink()
    os.mkfifo(ca)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            tls.current()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 -- what it raised is the assertion
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock it before failing: open the FIFO's write end once
        os.close(os.open(ca, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("current() blocked on a FIFO")
    assert isinstance(outcome[0], OSError) and "not a regular file" in str(outcome[0])
    assert tls.context is kept
