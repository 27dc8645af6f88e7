"""sidecar.k8s.webhook end to end: real HTTPS on 127.0.0.1, real AdmissionReviews, rotation."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from cryptography import x509

from sidecar.k8s.inject import SIDECAR_CONTAINER, STATUS_ANNOTATION, InjectOptions
from sidecar.k8s.patch import apply_patch
from sidecar.k8s.webhook import (
    CertificateLoadError,
    ServingCertificate,
    WebhookLimits,
    parse_listen,
    serve_webhook,
)
from tests.harness import KubeletVolume, ServerCert, ThrowawayCA

TEST_TIMEOUT = 20.0


def serving_cert(ca: ThrowawayCA, *, days: float = 1.0) -> ServerCert:
    """A webhook serving certificate (its Service's DNS name and 127.0.0.1)."""
    return ca.issue(common_name="sidecar-injector.mesh.svc",
                    dns=("sidecar-injector.mesh.svc",), days=days)


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    serial: int

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One HTTPS keep-alive connection to the webhook."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int, ca: ThrowawayCA) -> Client:
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port,
                                                     ssl_context=ca.client_context())
        await stream.do_handshake()
        return cls(stream)

    def serial(self) -> int:
        der = self.stream.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number

    async def request(self, method: str, target: str, body: bytes = b"") -> Reply:
        headers = [("host", "sidecar-injector.mesh.svc"), ("content-length", str(len(body)))]
        if body:
            headers.append(("content-type", "application/json"))
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
        assert response is not None
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(response.status_code, dict(response.headers), b"".join(chunks),
                     self.serial())

    async def aclose(self) -> None:
        await self.stream.aclose()


def review(pod: dict[str, Any], uid: str = "4d6a2c1e-uid") -> bytes:
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": "shop", "operation": "CREATE", "object": pod,
                    "userInfo": {"username": "admin"}, "dryRun": False}}).encode()


def pod(meta: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": meta if meta is not None else {"generateName": "frontend-",
                                                       "namespace": "shop"},
            "spec": {"containers": [{"name": "frontend", "image": "frontend:1"}], **spec}}


Scenario = Callable[[int, ThrowawayCA, KubeletVolume, ServingCertificate], Awaitable[None]]


def run_webhook(tmp_path: Path, scenario: Scenario, *, limits: WebhookLimits | None = None,
                reload_interval: float = 0.05) -> None:
    """Start the webhook on 127.0.0.1 (port 0) with a fresh CA, run ``scenario``, stop."""
    ca = ThrowawayCA()
    data = KubeletVolume(tmp_path)
    data.publish(serving_cert(ca).tls_secret())
    serving = ServingCertificate(data.path("tls.crt"), data.path("tls.key"), time.time())

    async def main() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(serving.watch, reload_interval)
                port = await nursery.start(serve_webhook, "127.0.0.1", 0, serving,
                                           InjectOptions(), limits)
                await scenario(port, ca, data, serving)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_healthz_and_pod_injection_over_https(tmp_path: Path) -> None:
    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume, _: ServingCertificate) -> None:
        client = await Client.connect(port, ca)
        assert client.stream.selected_alpn_protocol() in (None, "http/1.1")
        health = await client.request("GET", "/healthz")
        assert (health.status, health.body) == (200, b"ok\n")
        obj = pod()  # generateName, no name yet, no initContainers
        reply = await client.request("POST", "/mutate", review(obj, uid="abc-123"))
        assert reply.status == 200
        assert reply.headers[b"content-type"] == b"application/json"
        resp = reply.json()["response"]
        assert resp["uid"] == "abc-123" and resp["allowed"] is True
        assert resp["patchType"] == "JSONPatch"
        patched = apply_patch(obj, json.loads(base64.b64decode(resp["patch"])))
        assert patched["spec"]["initContainers"][0]["name"] == SIDECAR_CONTAINER
        assert "name" not in patched["metadata"]
        # already injected -> allowed, no patch (same keep-alive connection)
        again = await client.request("POST", "/mutate", review(patched, uid="def-456"))
        assert again.json()["response"] == {"uid": "def-456", "allowed": True}
        await client.aclose()

    run_webhook(tmp_path, scenario)


def test_malformed_review_is_400_and_server_keeps_answering(tmp_path: Path) -> None:
    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume, _: ServingCertificate) -> None:
        client = await Client.connect(port, ca)
        bad = await client.request("POST", "/mutate", b"{\"apiVersion\": 1")
        assert bad.status == 400
        assert bad.json()["error"].startswith("malformed AdmissionReview")
        ok = await client.request("POST", "/mutate", review(pod()))
        assert ok.status == 200 and ok.json()["response"]["allowed"] is True
        await client.aclose()
        # garbage instead of HTTP: 400 and the connection closes; the server stays up
        raw = await trio.open_ssl_over_tcp_stream("127.0.0.1", port,
                                                  ssl_context=ca.client_context())
        await raw.send_all(b"\x00\x01 not http at all\r\n\r\n")
        received = b""
        while chunk := await raw.receive_some(65536):
            received += chunk
        assert received.startswith(b"HTTP/1.1 400")
        await raw.aclose()
        fresh = await Client.connect(port, ca)
        assert (await fresh.request("GET", "/healthz")).status == 200
        await fresh.aclose()

    run_webhook(tmp_path, scenario)


def test_wrong_method_unknown_path_and_oversized_body(tmp_path: Path) -> None:
    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume, _: ServingCertificate) -> None:
        for method, target, status, allow in (("GET", "/mutate", 405, b"POST"),
                                              ("POST", "/healthz", 405, b"GET, HEAD"),
                                              ("GET", "/other", 404, None)):
            client = await Client.connect(port, ca)
            reply = await client.request(method, target)
            assert reply.status == status
            assert reply.headers.get(b"allow") == allow
            await client.aclose()
        client = await Client.connect(port, ca)
        reply = await client.request("POST", "/mutate", b"x" * 5000)
        assert reply.status == 413
        await client.aclose()

    run_webhook(tmp_path, scenario, limits=WebhookLimits(max_body=4096))


def test_idle_client_is_disconnected(tmp_path: Path) -> None:
    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume, _: ServingCertificate) -> None:
        client = await Client.connect(port, ca)
        with trio.fail_after(5):
            assert await client.stream.receive_some(100) == b""  # server closed on us
        await client.aclose()

    run_webhook(tmp_path, scenario, limits=WebhookLimits(request_timeout=0.3))


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume, _: ServingCertificate) -> None:
        client = await Client.connect(port, ca)
        assert (await client.request("GET", "/healthz")).status == 200  # kept alive...
        with trio.fail_after(5):  # ...until it has been idle for idle_timeout
            assert await client.stream.receive_some(100) == b""
        await client.aclose()

    run_webhook(tmp_path, scenario, limits=WebhookLimits(idle_timeout=0.3))


def test_default_limits_are_short_idle_and_per_source() -> None:
    limits = WebhookLimits()
    assert limits.idle_timeout <= 5 and limits.max_connections_per_source < limits.max_connections


def test_certificate_rotation_via_data_swap(tmp_path: Path) -> None:
    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume,
                       serving: ServingCertificate) -> None:
        old = await Client.connect(port, ca)
        old_serial = old.serial()

        # a half-written / mismatched pair is refused and the old certificate stays
        wrong_cert, wrong_key = serving_cert(ca), serving_cert(ca)
        data.publish({"tls.crt": wrong_cert.cert_pem, "tls.key": wrong_key.key_pem})
        for _ in range(100):
            if serving.statistics()["failures"]:
                break
            await trio.sleep(0.02)
        assert serving.statistics()["failures"] >= 1
        probe = await Client.connect(port, ca)
        assert probe.serial() == old_serial
        await probe.aclose()

        # a good new pair: new handshakes present it; the open connection keeps working
        new = serving_cert(ca)
        new_serial = new.serial
        data.publish(new.tls_secret())
        seen = old_serial
        for _ in range(100):
            client = await Client.connect(port, ca)
            seen = client.serial()
            reply = await client.request("POST", "/mutate", review(pod()))
            assert reply.status == 200
            await client.aclose()
            if seen == new_serial:
                break
            await trio.sleep(0.02)
        assert seen == new_serial
        assert serving.statistics()["reloads"] == 1
        assert (await old.request("GET", "/healthz")).status == 200
        assert old.serial() == old_serial
        await old.aclose()

    run_webhook(tmp_path, scenario)


def test_expired_or_garbage_certificate_is_refused(tmp_path: Path) -> None:
    ca = ThrowawayCA()
    data = KubeletVolume(tmp_path)
    expired = serving_cert(ca, days=-0.5)
    data.publish(expired.tls_secret())
    with pytest.raises(CertificateLoadError, match="expired"):
        ServingCertificate(data.path("tls.crt"), data.path("tls.key"), time.time())
    data.publish({"tls.crt": b"garbage", "tls.key": expired.key_pem})
    with pytest.raises(CertificateLoadError):
        ServingCertificate(data.path("tls.crt"), data.path("tls.key"), time.time())


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:8443") == ("0.0.0.0", 8443)
    assert parse_listen("[::]:8443") == ("::", 8443)
    assert parse_listen(":9443") == ("", 9443)
    for bad in ("8443", "host:", "host:http", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_module_runs_as_a_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    ca = ThrowawayCA()
    issued = serving_cert(ca)
    serial = issued.serial
    (tmp_path / "tls.crt").write_bytes(issued.cert_pem)
    (tmp_path / "tls.key").write_bytes(issued.key_pem)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.k8s.webhook", "--listen", "127.0.0.1:0",
         "--cert", str(tmp_path / "tls.crt"), "--key", str(tmp_path / "tls.key")],
        stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 20
        assert proc.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if '"webhook_listening"' in line:
                port = json.loads(line)["port"]
        assert port, "webhook did not report listening"

        async def call() -> Reply:
            client = await Client.connect(port, ca)
            reply = await client.request("POST", "/mutate", review(pod()))
            await client.aclose()
            return reply

        reply = trio.run(call)
        assert reply.status == 200 and reply.serial == serial
        assert json.loads(base64.b64decode(reply.json()["response"]["patch"]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_status_annotation_constant_matches_docs() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "k8s.md").read_text()
    assert STATUS_ANNOTATION in docs
    for event in ("webhook_listening", "webhook_review", "webhook_bad_request",
                  "webhook_cert_reloaded", "webhook_cert_reload_failed"):
        assert event in docs


def test_a_large_review_does_not_stall_the_other_connections(tmp_path: Path) -> None:
    """A review is pure CPU (a pod of 40,000 volumes near the 3 MiB cap: about a second). It
    used to run on the event loop, so while it ran no other connection got an answer: the
    kubelet's ``/healthz`` probe and every other pod's review waited (found by a hostile
    review). Now it runs in a worker thread. While one large review is answered, another
    connection polls ``/healthz``: the longest wait between two of its answers must be well
    under the review's own time (a ratio of two times of the same run, not a fixed bound;
    on the event loop the wait was the whole review)."""
    big = pod()
    big["spec"]["volumes"] = [{"name": f"v{i}", "emptyDir": {}} for i in range(85_000)]
    body = review(big, uid="big")
    assert len(body) < 3 * 1024 * 1024

    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume,
                       _: ServingCertificate) -> None:
        poller = await Client.connect(port, ca)
        reviewer = await Client.connect(port, ca)
        answers: list[float] = []
        window: dict[str, float] = {}

        async def poll() -> None:
            while "answered" not in window:
                reply = await poller.request("GET", "/healthz")
                assert reply.status == 200
                answers.append(time.monotonic())
                await trio.sleep(0.005)  # (a bounded number of polls)

        async def big_review() -> None:
            window["sent"] = time.monotonic()
            reply = await reviewer.request("POST", "/mutate", body)
            window["answered"] = time.monotonic()
            assert reply.status == 200 and reply.json()["response"]["uid"] == "big"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.05)
            nursery.start_soon(big_review)
        took = window["answered"] - window["sent"]
        inside = [window["sent"]] + [t for t in answers
                                     if window["sent"] < t < window["answered"]]
        inside.append(window["answered"])
        longest = max(b - a for a, b in zip(inside, inside[1:], strict=False))
        assert took > 0.2, took  # (a review too quick to show anything: make it larger)
        assert longest < took / 2, (longest, took, len(inside))
        await poller.aclose()
        await reviewer.aclose()

    run_webhook(tmp_path, scenario, limits=WebhookLimits(request_timeout=30.0,
                                                         max_requests_per_connection=100_000))
