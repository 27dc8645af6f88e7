"""The ship queue and its resend window are bounded in bytes as well as in frames.

A record is as large as the request head it records (a path can be as long as
``limits.max_header_bytes`` allows), so a count alone let a caller who sends long paths
while the collector is away make the sidecar hold ``queue_size`` large frames. The bound
is checked on the ``Shipper`` itself, through the config loader, and end to end: a real
sidecar, a real rsyslog that is away and comes back, requests with long paths.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from sidecar.audit import shipper as shipper_module
from sidecar.audit.shipper import Shipper
from sidecar.config.audit import ShipConfig
from tests.harness import (
    free_port,
    http,
    https_server_material,
    mtls_context,
    sidecar_config,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_audit_ship import FRONTEND, ORDERS, Rsyslog


def _shipper(tmp_path: Path, **kw: object) -> Shipper:
    ca_file, _ctx = https_server_material(tmp_path / "tls")
    return Shipper(ShipConfig(address=("127.0.0.1", 1), ca_file=str(ca_file),
                              **kw))  # type: ignore[arg-type]


def test_offer_keeps_the_frames_that_fit_the_bytes_in_order(tmp_path: Path) -> None:
    s = _shipper(tmp_path, queue_bytes=64 * 1024)
    big = [bytes([65 + i]) * 20_000 for i in range(5)]
    s.offer(big[:2])
    assert s.queue_bytes == 40_000 and s.dropped == 0
    s.offer(big[2:])  # 20,000 more fit (60,000 of 65,536); the last two do not
    assert list(s._queue) == big[:3]
    assert s.queue_bytes == 60_000 and s.dropped == 2
    s.offer([b"x" * 5_536])  # exactly to the bound
    assert s.queue_bytes == 65_536 and s.dropped == 2
    s.offer([b"y"])
    assert s.dropped == 3 and s.queue_depth == 4


def test_required_refuses_while_the_bytes_are_at_their_bound(tmp_path: Path) -> None:
    s = _shipper(tmp_path, queue_bytes=64 * 1024, mode="required")
    s.connected = True
    assert s.accepting()
    s.offer([b"z" * (64 * 1024)])
    assert s.queue_depth == 1 and not s.accepting()


def test_the_resend_window_is_bounded_in_bytes_and_frames(tmp_path: Path) -> None:
    s = _shipper(tmp_path)
    frame = b"f" * (1024 * 1024)
    for _ in range(40):  # 40 MiB sent in batches of one frame
        s._remember([frame], len(frame))
    assert s._recent_bytes <= shipper_module.RESEND_BYTES
    assert sum(len(f) for batch, _, _ in s._recent for f in batch) == s._recent_bytes
    small = [b"s"] * 1000
    for _ in range(10):  # 10,000 frames in batches of 1,000
        s._remember(list(small), len(small))
    assert s._recent_frames <= shipper_module.RESEND_FRAMES
    assert sum(len(batch) for batch, _, _ in s._recent) == s._recent_frames


def test_frames_sent_again_after_a_break_fit_the_queues_bytes(tmp_path: Path) -> None:
    s = _shipper(tmp_path, queue_bytes=64 * 1024)
    sent = [bytes([97 + i]) * 10_000 for i in range(8)]  # 80,000 bytes sent
    s._remember(sent[:4], 40_000)
    s._remember(sent[4:], 40_000)
    s.offer([b"n" * 20_000])  # queued since
    s._requeue_recent()
    # The newest sent frames that fit in front of the queued one, oldest dropped, counted.
    assert list(s._queue) == sent[-4:] + [b"n" * 20_000]
    assert s.queue_bytes == 60_000 and s.dropped == 4 and s.resent == 4
    assert s._recent_bytes == 0 and not s._recent


# Sizes the loader takes and refuses (file:line:key, like every other key).
GOOD_SIZES = [("64KiB", 64 * 1024), (65_536, 65_536), ("256MiB", 256 * 1024 * 1024),
              ("16GiB", 16 * 1024 ** 3)]
BAD_SIZES = [0, 1, "63KiB", 65_535, "17GiB", "1PiB", -1, "x", "1.5MiB", True, [1], {"a": 1},
             "64 KiB MiB"]


@pytest.mark.parametrize(("value", "size"), GOOD_SIZES, ids=[str(v) for v, _ in GOOD_SIZES])
def test_queue_bytes_sizes_load(value: object, size: int) -> None:
    from sidecar.config.audit import parse_audit_config
    from sidecar.config.source import parse_yaml

    raw, src = parse_yaml("audit:\n  path: /a\n  ship:\n    address: c:6514\n"
                          f"    ca_file: /ca.pem\n    queue_bytes: {value!r}\n"
                          .replace("'", '"'), "/etc/s.yaml")
    config = parse_audit_config(raw["audit"], ("audit",), src)
    assert not src.problems and config is not None and config.ship is not None
    assert config.ship.queue_bytes == size


@pytest.mark.parametrize("value", BAD_SIZES, ids=[repr(v) for v in BAD_SIZES])
def test_queue_bytes_refuses_with_file_line_and_key(value: object) -> None:
    import json

    from sidecar.config.audit import parse_audit_config
    from sidecar.config.source import parse_yaml

    raw, src = parse_yaml("audit:\n  path: /a\n  ship:\n    address: c:6514\n"
                          f"    ca_file: /ca.pem\n    queue_bytes: {json.dumps(value)}\n",
                          "/etc/s.yaml")
    parse_audit_config(raw["audit"], ("audit",), src)
    text = "\n".join(str(p) for p in src.problems)
    assert "s.yaml:6: audit.ship.queue_bytes:" in text, text


def test_default_bounds_the_queue_to_64_mib() -> None:
    assert ShipConfig(address=None, ca_file="/ca.pem").queue_bytes == 64 * 1024 * 1024


def test_long_paths_while_the_collector_is_away_stay_within_queue_bytes(
        tmp_path, pki, app, procs):
    # A real sidecar ships to a real rsyslog that is not there yet (fail_open): a peer's
    # requests with 7 KB paths (denied, so recorded) pile up at most queue_bytes of
    # frames; the rest is dropped and counted; the collector, once there, gets what fit.
    collector = Rsyslog(tmp_path / "rsyslog")
    policy = write_policy(tmp_path / "mesh.yaml", {
        "version": 1, "trust_domain": "demo.local", "services": {ORDERS: {"rules": [
            {"name": "reads", "allow": {"from": [FRONTEND], "paths": ["/orders/**"]}}]}}})
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}",
                                  "app": f"127.0.0.1:{app}"},
                         policy=policy,
                         audit={"path": str(tmp_path / "audit"), "on_failure": "fail_open",
                                "ship": {"address": f"127.0.0.1:{collector.port}",
                                         "ca_file": str(collector.ca_file),
                                         "queue_bytes": "256KiB"}})
    b = start_sidecar(tmp_path, "orders", cfg)
    procs.append(b)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    sent = 60
    for i in range(sent):
        assert http(b.port("inbound"), "GET", f"/long-{i:03d}/" + "p" * 7_000, ctx=ctx,
                    timeout=10).status == 403
    assert wait_for(lambda: (b.metric("sidecar_audit_ship_dropped_total") or 0) > 0,
                    timeout=20)
    queued = b.metric("sidecar_audit_ship_queue_bytes")
    assert queued is not None and 0 < queued <= 256 * 1024
    # (each record's message goes in 3 parts at audit.ship.max_message_bytes' default: all
    # of them would be 3 * sent messages)
    assert b.metric("sidecar_audit_ship_queue_depth") < 3 * sent
    collector.start()
    procs.append(collector.proc)
    try:
        assert wait_for(lambda: b.metric("sidecar_audit_ship_connected") == 1
                        and b.metric("sidecar_audit_ship_queue_depth") == 0, timeout=30)
        dropped = b.metric("sidecar_audit_ship_dropped_total")
    finally:
        b.signal(signal.SIGTERM)
        b.proc.wait(timeout=30)
    # The final seal, shipped before the sidecar exited, is what rsyslog writes last.
    assert wait_for(lambda: any(line.startswith("checkpoint") and '"shutdown"' in line
                                for line in collector.lines()), timeout=15)
    collector.stop()
    messages = _joined(collector.lines())
    arrived = {i for i in range(sent) if any(f"/long-{i:03d}/" in m for m in messages)}
    # What fit the queue arrived (the first requests: the queue keeps frames in order);
    # what did not is counted; the disk has every record.
    assert 0 < len(arrived) < sent
    assert arrived == set(range(len(arrived)))
    assert sent - len(arrived) <= dropped


def _joined(lines: list[str]) -> list[str]:
    """The collector's lines with the parts of each message sent in parts
    (``audit.ship.max_message_bytes``) joined into it, whole ones as they are."""
    import base64

    parts: dict[tuple[int, str], dict[int, bytes]] = {}
    out = []
    for line in lines:
        at = line.find('{"part":')
        if at < 0:
            out.append(line)
            continue
        part = json.loads(line[at:])
        parts.setdefault((part["seq"], part["digest"]), {})[part["part"]] = \
            base64.b64decode(part["data"])
    for held in parts.values():
        out.append(b"".join(held[i] for i in sorted(held)).decode())
    return out
