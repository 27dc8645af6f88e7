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
    tls = FileContext(volume.path("ca.pem"))
    first = tls.current()
    assert tls.current() is first and tls.made == 1 and not tls.changed()
    volume.publish({"ca.pem": b"-----BEGIN CERTIFICATE-----\nhalf"})  # caught half written
    assert tls.changed()
    with pytest.raises(ssl.SSLError):
        tls.current()
    assert tls.context is first and tls.changed()  # kept, and tried again next time
    volume.publish({"ca.pem": ThrowawayCA("second").cert_pem})
    second = tls.current()
    assert second is not first and tls.made == 2 and not tls.changed()


def test_the_context_is_made_from_the_bytes_read_not_from_the_paths(tmp_path: Path) -> None:
    """What is loaded is what was compared: the files are replaced by FIFOs between the
    reading and the making, and the making neither blocks nor sees the change (``ssl``
    opening the path itself would wait forever on the FIFO: the event loop with it). The
    context trusts the CA read, and presents the certificate read (a real handshake)."""
    import os
    import socket
    import threading

    ca, client_ca = ThrowawayCA("server side"), ThrowawayCA("client side")
    ca_file = tmp_path / "ca.pem"
    ca.write(ca_file)
    cert_file, key_file = _client_certificate(client_ca, tmp_path / "client")
    tls = FileContext(str(ca_file), cert_file, key_file)
    blobs = tls.read()
    for path in (str(ca_file), cert_file, key_file):
        os.unlink(path)
        os.mkfifo(path)
    made: list[ssl.SSLContext] = []
    worker = threading.Thread(target=lambda: made.append(tls.make(blobs)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "make() opened a path: it blocked on the FIFO"
    ctx = made[0]
    # A server of ``ca`` that requires a client certificate of ``client_ca``.
    server_ctx = ca.server_context(tmp_path / "server")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=client_ca.cert_pem.decode())
    listener = socket.create_server(("127.0.0.1", 0))
    peer: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as s:
            cert = s.getpeercert()
            peer.append(dict(x[0] for x in cert["subject"])["commonName"])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with socket.create_connection(listener.getsockname(), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
    server.join(timeout=5)
    listener.close()
    assert peer == ["client"]


def _client_certificate(ca: ThrowawayCA, directory: Path) -> tuple[str, str]:
    """A clientAuth certificate named ``client`` issued by ``ca``: (cert file, key file)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "client.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(directory / "client.crt"), str(directory / "client.key")


def test_a_bundle_with_text_around_its_certificates_loads_as_from_a_file(
        tmp_path: Path) -> None:
    """A byte order mark and comments in UTF-8 between the certificates (curl's and
    Mozilla's bundles name issuers like "NetLock Arany (Class Gold) F\u0151tan\u00fas\u00edtv\u00e1ny") are what
    OpenSSL skips when it reads the file itself: the bundle loads, and trusts its CAs."""
    import socket
    import threading

    ca, other = ThrowawayCA("bundled"), ThrowawayCA("also bundled")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("\ufeff# Issuer: CN=T\u00dcB\u0130TAK Kamu SM SSL K\u00f6k Sertifikas\u0131\n".encode()
                       + other.cert_pem
                       + "\n# NetLock Arany (Class Gold) F\u0151tan\u00fas\u00edtv\u00e1ny\n".encode()
                       + ca.cert_pem)
    ctx = FileContext(str(bundle)).context
    assert len(ctx.get_ca_certs()) == 2
    listener = socket.create_server(("127.0.0.1", 0))
    server_ctx = ca.server_context(tmp_path / "server")

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True):
            pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                assert s.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        server.join(timeout=5)
        listener.close()


def test_what_is_refused_before_ssl_sees_it(tmp_path: Path) -> None:
    """A file over the size bound, a CA bundle that is not text, a certificate without its
    key: refused with a reason, never handed to ``ssl``."""
    from sidecar.net.tlsfiles import MAX_TLS_FILE_BYTES

    big = tmp_path / "big.pem"
    big.write_bytes(ThrowawayCA().cert_pem + b"#" * MAX_TLS_FILE_BYTES)
    with pytest.raises(OSError, match="larger than"):
        FileContext(str(big))
    binary = tmp_path / "der.crt"
    binary.write_bytes(b"\x30\x82\xff\xfe" * 64)
    with pytest.raises(ssl.SSLError, match="not a PEM CA bundle"):
        FileContext(str(binary))
    with pytest.raises(ValueError, match="needs its key"):
        FileContext(None, str(big), None)


def test_a_missing_file_fails_and_its_return_is_seen(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ThrowawayCA().write(ca)
    tls = FileContext(str(ca))
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
    tls = FileContext(str(ca))
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
