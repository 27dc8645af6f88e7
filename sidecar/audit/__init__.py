"""The verifiable audit trail: records, hash chain, segment files, writer, CLI.

``record`` and ``chain`` are pure; ``segments`` reads files (verify, export, resume);
``writer`` is the async shell; ``cli`` is ``sidecar audit verify|export|tail``.
See docs/audit.md.
"""

from sidecar.audit.config import AuditConfig, parse_audit_config
from sidecar.audit.record import AuditRecord, record_from
from sidecar.audit.segments import RecordFilter, VerifyResult, iter_records, verify
from sidecar.audit.writer import AuditWriter

__all__ = [
    "AuditConfig", "AuditRecord", "AuditWriter", "RecordFilter", "VerifyResult",
    "iter_records", "parse_audit_config", "record_from", "verify",
]
