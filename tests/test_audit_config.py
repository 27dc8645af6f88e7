"""The audit: section of the sidecar config."""

from __future__ import annotations

import os

import pytest

from sidecar.config.audit import AuditConfig, load_hmac_key, parse_audit_config
from sidecar.config.source import parse_yaml


def _parse(text: str, filename: str = "/etc/sidecar/sidecar.yaml") -> tuple[AuditConfig, list[str]]:
    raw, src = parse_yaml(text, filename)
    cfg = parse_audit_config(raw["audit"], ("audit",), src)
    return cfg, [str(p) for p in src.problems]


def test_defaults() -> None:
    cfg, problems = _parse("audit: {path: /var/log/audit}\n")
    assert problems == []
    assert cfg == AuditConfig(path="/var/log/audit")
    assert (cfg.max_segment_bytes, cfg.queue_size, cfg.on_failure, cfg.fsync) == (
        64 * 1024 * 1024, 10_000, "fail_closed", True)


def test_every_key() -> None:
    cfg, problems = _parse(
        "audit:\n  path: audit\n  max_segment_bytes: 1MiB\n  max_segments: 5\n"
        "  queue_size: 50\n  batch_size: 8\n  on_failure: fail_open\n  fsync: false\n"
        "  hmac_key_file: keys/audit.key\n")
    assert problems == []
    assert cfg == AuditConfig(path="/etc/sidecar/audit", max_segment_bytes=1024 * 1024,
                              max_segments=5, queue_size=50, batch_size=8,
                              on_failure="fail_open", fsync=False,
                              hmac_key_file="/etc/sidecar/keys/audit.key")


def test_problems_name_line_and_key() -> None:
    _cfg, problems = _parse(
        "audit:\n  path: /a\n  colour: red\n  queue_size: 0\n  on_failure: maybe\n"
        "  fsync: yes please\n  max_segment_bytes: 10\n  max_segments: 1\n")
    text = "\n".join(problems)
    assert "sidecar.yaml:3: audit.colour: unknown key" in text
    assert "sidecar.yaml:4: audit.queue_size:" in text
    assert "sidecar.yaml:5: audit.on_failure: must be one of" in text
    assert "audit.fsync: expected true or false" in text
    assert "audit.max_segment_bytes: at least 4096" in text
    assert "audit.max_segments:" in text
    assert len(problems) == 6


def test_path_required_and_mapping_required() -> None:
    _cfg, problems = _parse("audit: {fsync: true}\n")
    assert any("audit.path: is required" in p for p in problems)
    _cfg, problems = _parse("audit: /var/log\n")
    assert any("expected a mapping" in p for p in problems)


def test_hmac_key_file(tmp_path: os.PathLike[str]) -> None:
    key_file = os.path.join(tmp_path, "k")
    with open(key_file, "wb") as fh:
        fh.write(b"0123456789abcdef0123456789abcdef\n")
    assert load_hmac_key(key_file) == b"0123456789abcdef0123456789abcdef"
    with open(key_file, "wb") as fh:
        fh.write(b"short")
    with pytest.raises(ValueError, match="at least 16"):
        load_hmac_key(key_file)
    with pytest.raises(ValueError, match="cannot read"):
        load_hmac_key(os.path.join(tmp_path, "missing"))


def test_signing_keys() -> None:
    cfg, problems = _parse(
        "audit:\n  path: /var/audit\n  signing_key_file: /etc/keys/sig.pem\n"
        "  checkpoint_every_records: 50\n  checkpoint_every_seconds: 0.5\n")
    assert problems == []
    assert (cfg.signing_key_file, cfg.checkpoint_every_records, cfg.checkpoint_every_seconds) == (
        "/etc/keys/sig.pem", 50, 0.5)
    assert AuditConfig(path="x").checkpoint_every_seconds == 1.0
    _cfg, problems = _parse(
        "audit:\n  path: /var/audit\n  signing_key_file: /var/audit/keys/sig.pem\n"
        "  checkpoint_every_records: 0\n  checkpoint_every_seconds: 0\n")
    text = "\n".join(problems)
    assert "sidecar.yaml:3: audit.signing_key_file: must not be inside audit.path" in text
    assert "sidecar.yaml:4: audit.checkpoint_every_records:" in text
    assert "sidecar.yaml:5: audit.checkpoint_every_seconds:" in text


@pytest.mark.parametrize(("value", "expected"), [
    ("0", 0.0), ("0.005", 0.005), ("0.05", 0.05), ("1", 1.0), ("1.0", 1.0),
    ("-0.01", None), ("1.5", None), ("true", None), ("50ms", None), ("'0.05'", None),
    (".inf", None), (".nan", None), ("[0.05]", None),
])
def test_batch_linger_seconds(value: str, expected: float | None) -> None:
    cfg, problems = _parse(f"audit:\n  path: /var/audit\n  batch_linger_seconds: {value}\n")
    if expected is None:
        assert any(p.endswith("sidecar.yaml:3: audit.batch_linger_seconds: expected seconds "
                              "from 0 to 1") for p in problems), problems
        assert cfg.batch_linger_seconds == 0.25  # the default stays
    else:
        assert problems == [] and cfg.batch_linger_seconds == expected
    assert AuditConfig(path="x").batch_linger_seconds == 0.25


def test_the_old_import_path_still_works():
    """audit/config.py moved to config/audit.py; existing imports keep working."""
    import sidecar.audit
    import sidecar.audit.config as old

    assert old.AuditConfig is AuditConfig and old.parse_audit_config is parse_audit_config
    assert old.load_hmac_key is load_hmac_key and sidecar.audit.AuditConfig is AuditConfig
