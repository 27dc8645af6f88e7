"""The verifiable audit trail: records, hash chain, segment files, writer, CLI.

``record`` and ``chain`` are pure; ``signing`` (Ed25519 checkpoints, anchors) and
``crypto`` (AES-GCM at rest) hold the keys' logic; ``segments`` reads files (verify, export,
resume); ``writer`` is the async shell; ``ship`` streams frames to a syslog collector;
``cli`` is ``sidecar audit keygen|verify|collect|export|tail``. See docs/audit.md.

The names below are loaded on first use (PEP 562): the data path imports
``sidecar.audit.record`` for every sidecar, and a sidecar without ``audit:`` in its config
must not pay for the writer, the segment reader and msgpack.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AuditConfig": "config", "parse_audit_config": "config",  # sidecar.config.audit
    "AuditRecord": "record", "record_from": "record",
    "RecordFilter": "segments", "VerifyResult": "segments", "iter_records": "segments",
    "verify": "segments",
    "AuditWriter": "writer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
