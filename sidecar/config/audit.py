"""The ``audit:`` section of the sidecar config -> ``AuditConfig`` (docs/audit.md).

``sidecar.config.model`` calls ``parse_audit_config(raw, ("audit",), src)`` while it loads
the config; every problem is reported through the same ``Reader`` (file, line, key) and
nothing is raised here, so one run of the loader reports every mistake in the file at once.
``load_hmac_key`` reads the HMAC key file at start (capped, like every file people edit).
The old import path ``sidecar.audit.config`` still works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.config.source import Path, Reader, Source, read_capped
from sidecar.config.values import parse_address, parse_size
from sidecar.errors import ConfigError

OnFailure = Literal["fail_closed", "fail_open"]
ShipMode = Literal["fail_open", "required"]

DEFAULT_MAX_SEGMENT_BYTES = 64 * 1024 * 1024
MIN_SEGMENT_BYTES = 4096
MAX_QUEUE_SIZE = 1_000_000
# ``ship.queue_bytes``: the frames waiting for the collector, in bytes. A record is as large
# as what it records (an 8 KiB path, a host, a token's subject), so ``queue_size`` alone let
# 10,000 frames of 10-20 KiB each -- 100-200 MiB -- pile up while the collector was away.
DEFAULT_SHIP_QUEUE_BYTES = 64 * 1024 * 1024
MIN_SHIP_QUEUE_BYTES = 64 * 1024
MAX_SHIP_QUEUE_BYTES = 16 * 1024 * 1024 * 1024
# ``ship.max_message_bytes``: the longest syslog message sent whole; a longer one (a record
# of a long path, a checkpoint of a long SPIFFE ID) goes in parts that ``sidecar audit
# collect`` joins (``ship.split_messages``). Collectors cut longer messages: rsyslog's
# default ``maxMessageSize`` is 8 KiB, which let messages of at most 8,096 bytes through whole
# (measured with rsyslog 8.2302), RFC 5425 4.3.1 asks receivers for 2,048 octets and
# recommends 8,192 (found by a hostile review: a record of a 7.6 KB path reached rsyslog
# cut, was counted as sent, and the collector's copy read as tampered with). The default
# keeps well under every such limit; a record's message is about 700 bytes.
DEFAULT_MAX_MESSAGE_BYTES = 4096
MIN_MAX_MESSAGE_BYTES = 2048
MAX_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_BATCH_SIZE = 65_536
MIN_HMAC_KEY_BYTES = 16
MAX_HMAC_KEY_FILE_BYTES = 64 * 1024

_KNOWN = frozenset({
    "path", "max_segment_bytes", "max_segments", "queue_size", "batch_size", "on_failure",
    "fsync", "hmac_key_file", "signing_key_file", "checkpoint_every_records",
    "checkpoint_every_seconds", "encryption_key_file", "ship", "batch_linger_seconds",
})
_SHIP_KNOWN = frozenset({
    "address", "ca_file", "server_name", "cert_file", "key_file", "queue_size", "queue_bytes",
    "mode", "app_name", "max_message_bytes",
})
DEFAULT_CHECKPOINT_RECORDS = 1000
DEFAULT_CHECKPOINT_SECONDS = 1.0
# After a batch, how long the writer lets more records arrive before the next one (unless a
# full batch waits): the bound on how much later than its request a record reaches the file
# and the collector. Longer batches cost less per record (docs/audit.md, "Cost").
DEFAULT_BATCH_LINGER_SECONDS = 0.25
MAX_BATCH_LINGER_SECONDS = 1.0


@dataclass(frozen=True)
class ShipConfig:
    """``audit.ship``: where and how to ship (docs/audit.md)."""

    address: tuple[str, int] | None  # None: from SIDECAR_AUDIT_COLLECTOR (the injector)
    ca_file: str
    server_name: str | None = None  # default: the address's host
    cert_file: str | None = None
    key_file: str | None = None
    queue_size: int = 10_000
    queue_bytes: int = DEFAULT_SHIP_QUEUE_BYTES
    mode: ShipMode = "fail_open"
    app_name: str = "sidecar"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class AuditConfig:
    """Where and how audit records are written.

    ``path`` is a directory of segment files. ``max_segments`` (None = keep all) deletes
    the oldest segments on rotation; ``sidecar audit verify`` then reports where the
    retained chain starts. ``fsync`` syncs once per batch (not per record).
    """

    path: str
    max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES
    queue_size: int = 10_000
    batch_size: int = 512
    batch_linger_seconds: float = DEFAULT_BATCH_LINGER_SECONDS
    on_failure: OnFailure = "fail_closed"
    fsync: bool = True
    hmac_key_file: str | None = None
    max_segments: int | None = None
    signing_key_file: str | None = None
    checkpoint_every_records: int = DEFAULT_CHECKPOINT_RECORDS
    checkpoint_every_seconds: float = DEFAULT_CHECKPOINT_SECONDS
    encryption_key_file: str | None = None
    ship: ShipConfig | None = None


def parse_audit_config(raw: Any, path: Path, src: Source) -> AuditConfig:
    """Validate the ``audit`` mapping; problems go to ``src`` (unknown keys are errors).

    Always returns a value (with defaults where a key was wrong) so that the caller can
    keep validating the rest of the file; the caller raises with ``src.raise_if_problems``.
    """
    r = Reader(src)
    raw = r.mapping(raw, path, _KNOWN, "expected a mapping, e.g. {path: /var/log/sidecar/audit}")
    if raw is None:
        return AuditConfig(path="")

    directory = ""
    if raw.get("path") is None:
        src.problem(path + ("path",), "is required (a directory for audit segment files)")
    else:
        directory = r.file(raw["path"], path + ("path",)) or ""

    kw: dict[str, Any] = {}
    _size(raw, "max_segment_bytes", path, src, kw, MIN_SEGMENT_BYTES, None)
    if raw.get("max_segments") is not None:
        # Two is the floor: the segment being written plus the one it chains from.
        v = r.integer(raw["max_segments"], path + ("max_segments",), 2, 1_000_000)
        if v is not None:
            kw["max_segments"] = v
    if raw.get("queue_size") is not None:
        v = r.integer(raw["queue_size"], path + ("queue_size",), 1, MAX_QUEUE_SIZE)
        if v is not None:
            kw["queue_size"] = v
    if raw.get("batch_size") is not None:
        v = r.integer(raw["batch_size"], path + ("batch_size",), 1, MAX_BATCH_SIZE)
        if v is not None:
            kw["batch_size"] = v
    if raw.get("batch_linger_seconds") is not None:
        sec = r.number(raw["batch_linger_seconds"], path + ("batch_linger_seconds",), 0,
                       MAX_BATCH_LINGER_SECONDS,
                       f"expected seconds from 0 to {MAX_BATCH_LINGER_SECONDS:g}")
        if sec is not None:
            kw["batch_linger_seconds"] = sec
    if raw.get("on_failure") is not None:
        v_of = raw["on_failure"]
        if v_of not in ("fail_closed", "fail_open"):
            src.problem(path + ("on_failure",), "must be one of: fail_closed, fail_open")
        else:
            kw["on_failure"] = v_of
    if "fsync" in raw and (fsync := r.boolean(raw["fsync"], path + ("fsync",))) is not None:
        kw["fsync"] = fsync
    if raw.get("hmac_key_file") is not None:
        key_file = r.file(raw["hmac_key_file"], path + ("hmac_key_file",), optional=False)
        if key_file is not None:
            kw["hmac_key_file"] = key_file
    if raw.get("signing_key_file") is not None:
        key_file = r.file(raw["signing_key_file"], path + ("signing_key_file",), optional=False)
        if key_file is not None:
            kw["signing_key_file"] = key_file
    if raw.get("checkpoint_every_records") is not None:
        v = r.integer(raw["checkpoint_every_records"], path + ("checkpoint_every_records",),
                   1, 1_000_000)
        if v is not None:
            kw["checkpoint_every_records"] = v
    if raw.get("checkpoint_every_seconds") is not None:
        sec = r.number(raw["checkpoint_every_seconds"], path + ("checkpoint_every_seconds",),
                       0.05, 3600, "expected seconds from 0.05 to 3600")
        if sec is not None:
            kw["checkpoint_every_seconds"] = sec
    if raw.get("encryption_key_file") is not None:
        key_file = r.file(raw["encryption_key_file"], path + ("encryption_key_file",), optional=False)
        if key_file is not None:
            kw["encryption_key_file"] = key_file
    if raw.get("ship") is not None:
        ship = _parse_ship(r, raw["ship"], path + ("ship",))
        if ship is not None:
            kw["ship"] = ship
    for name in ("signing_key_file", "encryption_key_file"):
        if directory and kw.get(name):
            _check_outside(kw[name], directory, path + (name,), src)
    return AuditConfig(path=directory, **kw)


def _parse_ship(r: Reader, raw: Any, path: Path) -> ShipConfig | None:
    """``audit.ship``: the syslog-over-TLS collector (docs/audit.md, "Shipping")."""
    src = r.src
    raw = r.mapping(raw, path, _SHIP_KNOWN,
                    "expected a mapping, e.g. {address: collector:6514, ca_file: ca.pem}")
    if raw is None:
        return None
    ok = True
    address: tuple[str, int] | None = None
    if raw.get("address") is not None:  # omitted: SIDECAR_AUDIT_COLLECTOR at start
        try:
            address = parse_address(raw.get("address"))
        except ValueError as exc:
            src.problem(path + ("address",), f"{exc} (the collector, e.g. siem.example:6514)")
            ok = False
    files: dict[str, Any] = {}
    for name in ("ca_file", "cert_file", "key_file"):
        if raw.get(name) is not None:
            f = r.file(raw[name], path + (name,), optional=False)
            if f is None:
                ok = False
            else:
                files[name] = f
    if "ca_file" not in files and raw.get("ca_file") is None:
        src.problem(path + ("ca_file",), "is required (CA bundle that signed the collector)")
        ok = False
    if ("cert_file" in files) != ("key_file" in files):
        src.problem(path, "cert_file and key_file go together (client certificate)")
        ok = False
    kw: dict[str, Any] = {}
    if raw.get("queue_size") is not None:
        v = r.integer(raw["queue_size"], path + ("queue_size",), 1, MAX_QUEUE_SIZE)
        if v is not None:
            kw["queue_size"] = v
    _size(raw, "queue_bytes", path, src, kw, MIN_SHIP_QUEUE_BYTES, MAX_SHIP_QUEUE_BYTES)
    _size(raw, "max_message_bytes", path, src, kw, MIN_MAX_MESSAGE_BYTES, MAX_MAX_MESSAGE_BYTES)
    if raw.get("mode") is not None:
        if raw["mode"] not in ("fail_open", "required"):
            src.problem(path + ("mode",), "must be one of: fail_open, required")
        else:
            kw["mode"] = raw["mode"]
    for name in ("server_name", "app_name"):
        value = raw.get(name)
        if value is not None:
            if not isinstance(value, str) or not value or len(value) > 48 or not all(
                    33 <= ord(c) <= 126 for c in value):
                src.problem(path + (name,), "expected printable ASCII without spaces "
                                            "(at most 48 characters)")
            else:
                kw[name] = value
    if not ok:
        return None
    return ShipConfig(address=address, **files, **kw)


def _size(raw: dict[str, Any], key: str, path: Path, src: Source,
          kw: dict[str, Any], low: int, high: int | None) -> None:
    """``kw[key]``: ``raw[key]`` as a size (``64KiB``) from ``low`` to ``high`` bytes, if given;
    else a problem at ``path + (key,)``."""
    if raw.get(key) is None:
        return
    try:
        size = parse_size(raw[key])
    except ValueError as exc:
        src.problem(path + (key,), str(exc))
        return
    if size < low:
        src.problem(path + (key,), f"at least {low} bytes")
    elif high is not None and size > high:
        src.problem(path + (key,), f"at most {high} bytes")
    else:
        kw[key] = size


def _check_outside(key_file: str, directory: str, path: Path, src: Source) -> None:
    # A key on the audit volume signs for whoever can write that volume: refuse it.
    key_abs, dir_abs = os.path.realpath(key_file), os.path.realpath(directory)
    if key_abs == dir_abs or key_abs.startswith(dir_abs.rstrip(os.sep) + os.sep):
        src.problem(path, "must not be inside audit.path (the key would be writable by "
                          "whoever can write the trail)")


def load_hmac_key(key_file: str) -> bytes:
    """Read an HMAC key file: its bytes with surrounding whitespace stripped.

    Raises ``ValueError`` (with a message fit for a person) when the file cannot be read
    or holds fewer than ``MIN_HMAC_KEY_BYTES`` bytes.
    """
    try:
        key = read_capped(key_file, MAX_HMAC_KEY_FILE_BYTES)
    except ConfigError as exc:
        raise ValueError(f"cannot read HMAC key file {key_file}: "
                         f"{exc.problems[0].message.removeprefix('cannot read file: ')}") from None
    # As before the shared read: the first 64 KiB are the key (no real key is near that).
    key = key[:MAX_HMAC_KEY_FILE_BYTES].strip()
    if len(key) < MIN_HMAC_KEY_BYTES:
        raise ValueError(f"HMAC key file {key_file} must hold at least {MIN_HMAC_KEY_BYTES} bytes")
    return key
