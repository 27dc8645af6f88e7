"""Moved: the ``audit:`` config section lives in ``sidecar.config.audit`` (with the rest of
the config). This name is kept so that existing imports keep working."""

from __future__ import annotations

from sidecar.config.audit import (
    DEFAULT_MAX_SEGMENT_BYTES,
    MIN_HMAC_KEY_BYTES,
    AuditConfig,
    ShipConfig,
    load_hmac_key,
    parse_audit_config,
)

__all__ = [
    "DEFAULT_MAX_SEGMENT_BYTES", "MIN_HMAC_KEY_BYTES", "AuditConfig", "ShipConfig",
    "load_hmac_key", "parse_audit_config",
]
