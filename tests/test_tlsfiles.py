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
