"""Audit records: one value per decision, refused connection or alert.

Pure: no clock, no I/O. The data path builds an ``AuditRecord`` (usually with
``record_from(decision, facts, time=now, ...)``) and hands it to the writer; the writer
stores ``record.to_wire()``, a msgpack-friendly dict with short, stable keys (the table
``WIRE_KEYS`` below is public: docs/audit.md documents it for independent verifiers). A
request's record is built directly as that map (``request_wire``) or, for a writer that
stores JSON, as a row of its values behind its shape's keys (``request_row``): the same
record, stored the same.

A token is never recorded: only the issuer, the subject and the SHA-256 of its ``jti``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from sidecar.policy.decision import (
    NO_AUTH,
    REASON_RATE_LIMITED,
    AuthFacts,
    Decision,
    RequestFacts,
    decided_claims,
)

Direction = Literal["inbound", "outbound", "connection"]
DecisionValue = Literal["allow", "deny", "dry-run"]

EVENT_REQUEST = "request"
EVENT_CONNECTION_REFUSED = "connection_refused"
EVENT_ALERT = "alert"
EVENT_RATE_LIMITED = "rate_limited"
EVENT_CONNECTION_CLOSED = "connection_closed"
EVENT_REFUSED_SUMMARY = "connection_refused_summary"
EVENT_STREAM_CLOSED = "stream_closed"

MAX_EXTRA_KEYS = 32


@dataclass(slots=True)
class AuditRecord:
    """Who accessed what, when, from where, and what the sidecar decided.

    ``decision`` is "allow", "deny" or "dry-run" (a deny that dry-run mode let through);
    ``status`` is the HTTP status the client got (0 for a refused connection);
    ``extra`` is a small optional mapping (at most ``MAX_EXTRA_KEYS`` keys) of msgpack
    scalars for event-specific details (an alert's threshold, a handshake error class).
    """

    time: float
    event: str = EVENT_REQUEST
    request_id: str = ""
    direction: str = "inbound"
    peer: str | None = None
    source: str = ""
    token_issuer: str | None = None
    token_subject: str | None = None
    token_id_hash: str | None = None
    apikey: str | None = None
    method: str = ""
    host: str = ""
    path: str = ""
    decision: str = ""
    rule: str = ""
    reason: str = ""
    policy_version: str = ""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    duration_ms: float = 0.0
    extra: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The stored form: short keys, ``None`` values left out (``_wire_of``)."""
        out: dict[str, Any] = _wire_of(self)
        if self.extra is not None and len(self.extra) > MAX_EXTRA_KEYS:
            out["x"] = dict(list(self.extra.items())[:MAX_EXTRA_KEYS])
        return out

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> AuditRecord:
        """Rebuild a record; unknown keys (from a newer writer) go into ``extra``.
        ``RecordError`` when a field has the wrong type or value (``check_wire``)."""
        check_wire(wire)
        kw: dict[str, Any] = {}
        unknown: dict[str, Any] = {}
        for key, value in wire.items():
            name = _FIELD_OF_KEY.get(key)
            if name is None:
                unknown[str(key)] = value
            else:
                kw[name] = value
        if "time" not in kw:
            kw["time"] = 0.0
        if unknown:
            extra = dict(kw.get("extra") or {})
            extra.update(unknown)
            kw["extra"] = extra
        return cls(**kw)

    def as_dict(self) -> dict[str, Any]:
        """Long field names, for export (JSON lines, CSV)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class RecordError(ValueError):
    """A stored record one of whose fields has the wrong type or value: never written by a
    sidecar, so damage or a forgery. ``key`` is the stored key (``t``, ``x``...)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"field {key!r}: {message}")
        self.key = key


# Record times a reader accepts: unix seconds from 1970 to the end of year 9999 (what an
# RFC 3339 time can say). Anything else is not a time a sidecar wrote.
MAX_TIME = 253402300799.0
# How deep ``extra`` values (and unknown keys' values) may nest.
MAX_VALUE_DEPTH = 8

_STR_KEYS = frozenset(("ev", "id", "dir", "src", "m", "host", "path", "d", "rule", "why", "pv"))
_OPTIONAL_STR_KEYS = frozenset(("peer", "iss", "sub", "jti", "key"))
_COUNT_KEYS = frozenset(("st", "bi", "bo"))


def _kind(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_value(key: str, value: Any, depth: int = 0) -> None:
    """A value of ``extra`` (or of an unknown key): msgpack scalars, lists and maps with
    string keys, finite numbers, nested at most ``MAX_VALUE_DEPTH`` deep."""
    if value is None or isinstance(value, str | bytes | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RecordError(key, f"holds {value!r}, not a finite number")
        return
    if depth >= MAX_VALUE_DEPTH:
        raise RecordError(key, f"nests deeper than {MAX_VALUE_DEPTH} levels")
    if isinstance(value, list):
        for item in value:
            _check_value(key, item, depth + 1)
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise RecordError(key, f"has a {_kind(k)} key, not a string")
            _check_value(key, item, depth + 1)
        return
    raise RecordError(key, f"holds a {_kind(value)}")


def check_wire(wire: Mapping[str, Any]) -> None:
    """``RecordError`` naming the first field of a stored record that has the wrong type or
    value (docs/audit.md, "Record fields"): ``t`` a finite number of unix seconds in
    1970..9999, ``ms`` a finite number, ``st``/``bi``/``bo`` integers >= 0, the text fields
    strings (``peer``, ``iss``, ``sub``, ``jti``, ``key`` may be nil), ``x`` a map with
    string keys; values in ``x`` and of unknown keys: scalars, lists, maps, finite numbers."""
    if not isinstance(wire, Mapping):
        raise RecordError("(record)", f"is a {_kind(wire)}, not a map")
    for key, value in wire.items():
        if key in _STR_KEYS:
            if not isinstance(value, str):
                raise RecordError(key, f"is a {_kind(value)}, not a string")
        elif key in _OPTIONAL_STR_KEYS:
            if value is not None and not isinstance(value, str):
                raise RecordError(key, f"is a {_kind(value)}, not a string")
        elif key == "t":
            if not _is_number(value):
                raise RecordError(key, f"is a {_kind(value)}, not a finite number of seconds")
            if not 0 <= value <= MAX_TIME:
                raise RecordError(key, f"{value!r} is not a time between 1970 and 9999")
        elif key == "ms":
            if not _is_number(value):
                raise RecordError(key, f"is a {_kind(value)}, not a finite number")
        elif key in _COUNT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RecordError(key, f"{value!r} is not an integer >= 0")
        elif key == "x":
            if value is not None and not isinstance(value, dict):
                raise RecordError(key, f"is a {_kind(value)}, not a map")
            if value:
                _check_value(key, value)
        elif not isinstance(key, str):  # msgpack allows bytes keys; no writer makes one
            raise RecordError("(record)", f"has a {_kind(key)} key, not a string")
        else:
            _check_value(key, value)


class SharedExtra(dict[str, Any]):
    """A read-only ``extra`` that many records share (the fixed fields of a connection:
    ``Telemetry`` keeps one per listener port and per target). Changing it raises
    ``TypeError``, so what was encoded from it once stays true: the syslog shipper
    encodes its JSON once (``json``, filled in by ``sidecar.audit.ship``) instead of once
    per record. Equal to, and stored exactly as, the plain ``dict`` of the same items."""

    __slots__ = ("json",)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.json: str | None = None

    def _read_only(self, *_args: Any, **_kw: Any) -> Any:
        raise TypeError("a shared audit extra is read-only: copy it to change it")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only


# Public and stable: field name -> stored key. Never reuse a key for another meaning.
WIRE_KEYS: dict[str, str] = {
    "time": "t",
    "event": "ev",
    "request_id": "id",
    "direction": "dir",
    "peer": "peer",
    "source": "src",
    "token_issuer": "iss",
    "token_subject": "sub",
    "token_id_hash": "jti",
    "apikey": "key",
    "method": "m",
    "host": "host",
    "path": "path",
    "decision": "d",
    "rule": "rule",
    "reason": "why",
    "policy_version": "pv",
    "status": "st",
    "bytes_in": "bi",
    "bytes_out": "bo",
    "duration_ms": "ms",
    "extra": "x",
}
_WIRE_ITEMS = tuple(WIRE_KEYS.items())
_FIELD_OF_KEY = {key: name for name, key in WIRE_KEYS.items()}
FIELD_NAMES: tuple[str, ...] = tuple(WIRE_KEYS)
_FIELD_SET = frozenset(FIELD_NAMES)


# Fields that are None in most records (no token, no API key, no extra): a record with
# none of the four token fields gets a map built without them. Same keys, same order.
_USUALLY_NONE = ("token_issuer", "token_subject", "token_id_hash", "apikey")


def _make_wire_of() -> Callable[[AuditRecord], dict[str, Any]]:
    # ``to_wire`` runs once per record on the writer's path; a loop of getattr over the
    # table cost a quarter more than straight-line code, so the straight-line code is
    # generated from the table (one place to change): build the whole map in one step,
    # then drop the None values, in table order. Each entry of the map costs about as
    # much as the rest of a check, so when the ``_USUALLY_NONE`` fields are all None (most
    # requests) the map is built without them, and ``extra`` (last in the table, so its
    # key stays last) is added only when set: 9,000 instead of 14,700 instructions.
    assert _WIRE_ITEMS[-1][0] == "extra"
    common = [(n, k) for n, k in _WIRE_ITEMS[:-1] if n not in _USUALLY_NONE]
    lines = ["def wire_of(r):",
             "    if " + " and ".join(f"r.{name} is None" for name in _USUALLY_NONE) + ":",
             "        out = {" + ", ".join(f"{key!r}: r.{name}" for name, key in common) + "}"]
    lines += [f"        if r.{name} is None:\n            del out[{key!r}]" for name, key in common]
    lines += ["        if r.extra is not None:", "            out['x'] = r.extra",
              "        return out"]
    # A request with a verified token and no API key (the other usual case): the same,
    # with the three token fields (a None among them is dropped as usual).
    token = [(n, k) for n, k in _WIRE_ITEMS[:-1] if n != "apikey"]
    lines += ["    if r.apikey is None:",
              "        out = {" + ", ".join(f"{key!r}: r.{name}" for name, key in token) + "}"]
    lines += [f"        if r.{name} is None:\n            del out[{key!r}]" for name, key in token]
    lines += ["        if r.extra is not None:", "            out['x'] = r.extra",
              "        return out"]
    lines += ["    out = {" + ", ".join(f"{key!r}: r.{name}" for name, key in _WIRE_ITEMS) + "}"]
    lines += [f"    if r.{name} is None:\n        del out[{key!r}]" for name, key in _WIRE_ITEMS]
    lines.append("    return out")
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), namespace)  # noqa: S102 -- built from the constant table above
    return namespace["wire_of"]  # type: ignore[no-any-return]


_wire_of = _make_wire_of()
_FROM_DECISION: Any = object()  # record_from's status when not given


def hash_token_id(jti: str) -> str:
    """SHA-256 (hex) of a token's ``jti``: lets auditors correlate uses of one token
    without the record ever holding anything that could be replayed."""
    return hashlib.sha256(jti.encode("utf-8", "surrogatepass")).hexdigest()


def decision_value(decision: Decision) -> DecisionValue:
    """"dry-run" when dry-run mode let a deny through, otherwise the action."""
    if decision.dry_run and decision.would == "deny":
        return "dry-run"
    return decision.action


# The token fields of the last credentials recorded, by the identity of their claims
# mapping: a cached token's verified claims are one mapping, never changed once built
# (``AuthFacts``), shared by every request that presents the token, so a run of requests
# with one token looks the fields up once instead of three ``get`` calls and a SHA-256 of
# the ``jti`` each. The memo holds the mapping, so its identity cannot be reused while
# remembered.
_last_claims: list[Any] = [None, (None, None, None)]
# ``hash_token_id`` of recently seen ``jti`` values (a token's requests repeat it); bounded,
# forgotten all at once when full.
MAX_JTI_HASHES = 1024
_jti_hashes: dict[str, str] = {}


def _claims_fields(claims: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(issuer, subject, SHA-256 of jti) of one verified token's claims."""
    memo = _last_claims
    if claims is memo[0]:
        return memo[1]  # type: ignore[no-any-return]
    iss, sub, jti = claims.get("iss"), claims.get("sub"), claims.get("jti")
    jti_hash = None
    if isinstance(jti, str):
        jti_hash = _jti_hashes.get(jti)
        if jti_hash is None:
            if len(_jti_hashes) >= MAX_JTI_HASHES:
                _jti_hashes.clear()
            jti_hash = _jti_hashes[jti] = hash_token_id(jti)
    out = (iss if isinstance(iss, str) else None, sub if isinstance(sub, str) else None,
           jti_hash)
    memo[0], memo[1] = claims, out
    return out


def _token_fields(auth: AuthFacts | None,
                  provider: str | None) -> tuple[Any, Any, Any, Any]:
    """(token_issuer, token_subject, token_id_hash, apikey) of ``auth``.

    Several providers may have verified a token: the one recorded is the token of the
    deciding rule's provider (``Decision.provider``); when that rule names none (or its
    provider verified nothing), the first verified in the section's provider order, the
    order its rules first name them (``decided_claims``) -- the same in every process.
    Before, the first of a set's order was taken: which user a record named followed the
    hash seed (found by a hostile review)."""
    if auth is None:
        return None, None, None, None
    if not auth.claims:
        return None, None, None, auth.apikey
    claims = decided_claims(auth, provider)
    assert claims is not None
    return (*_claims_fields(claims), auth.apikey)


# ``extra``'s marker of a request that presented an ``x-api-key`` the sidecar did not
# recognise (``AuthFacts.apikey_unknown``): decided as if it had none, and recorded so,
# but ``policy replay`` must know a key was sent (a new policy naming it may let the
# request in). Never the key nor anything derived from it.
EXTRA_APIKEY_UNKNOWN = "apikey_unknown"


def _key_unknown_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``extra`` (may be shared, read-only: copied) with ``apikey_unknown: true``. Only for
    a request that carried a key: the others never get here."""
    out = dict(list(extra.items())[:MAX_EXTRA_KEYS - 1]) if extra else {}
    out[EXTRA_APIKEY_UNKNOWN] = True
    return out


def record_from(
    decision: Decision,
    facts: RequestFacts | None,
    *,
    time: float,
    auth: AuthFacts | None = None,
    request_id: str = "",
    status: Any = _FROM_DECISION,
    bytes_in: int = 0,
    bytes_out: int = 0,
    duration_ms: float = 0.0,
    extra: Any = _FROM_DECISION,
    **kw: Any,
) -> AuditRecord:
    """Build the record of one decision.

    ``facts`` may be None when the request was refused before its facts were known (e.g.
    an ambiguous path). Any ``AuditRecord`` field may be given in ``kw`` and wins over
    what was derived (typically ``request_id``, ``status``, ``bytes_in``, ``bytes_out``,
    ``duration_ms``, ``extra``). Unknown keyword names raise ``TypeError``. ``extra``
    defaults to ``{"target": ...}`` for an outbound request with a target, else None; the
    record keeps the mapping given (it is never changed: callers may share one, read-only,
    between records, as ``Telemetry`` does for a connection's fixed fields).

    With facts, the record is ``request_record``'s (one positional call: a dict of values
    and ``**`` cost twice as much), the token fields included; ``kw`` applied after.
    """
    if status is _FROM_DECISION:
        status = decision.status
    if facts is not None:
        if extra is _FROM_DECISION:
            # Outbound: the caller is our own app; the interesting identity is the target.
            extra = ({"target": facts.target}
                     if facts.direction == "outbound" and facts.target is not None else None)
        record = request_record(decision, facts, time, auth, request_id, status, bytes_in,
                                bytes_out, duration_ms, extra)
    else:
        iss, sub, jti, apikey = _token_fields(auth, decision.provider)
        if auth is not None and auth.apikey_unknown:
            extra = _key_unknown_extra(None if extra is _FROM_DECISION else extra)
        event = EVENT_RATE_LIMITED if decision.reason == REASON_RATE_LIMITED else EVENT_REQUEST
        record = AuditRecord(
            time, event, request_id, token_issuer=iss, token_subject=sub, token_id_hash=jti,
            apikey=apikey, decision=decision_value(decision), rule=decision.rule,
            reason=decision.reason, policy_version=decision.version, status=status,
            bytes_in=bytes_in, bytes_out=bytes_out, duration_ms=duration_ms,
            extra=None if extra is _FROM_DECISION else extra)
    if kw:
        for name, value in kw.items():
            if name not in _FIELD_SET:
                raise TypeError(f"record_from() got an unexpected keyword argument {name!r}")
            setattr(record, name, value)
    return record


def request_record(
    decision: Decision, facts: RequestFacts, time: float, auth: AuthFacts | None,
    request_id: str, status: int, bytes_in: int, bytes_out: int, duration_ms: float,
    extra: dict[str, Any] | None,
) -> AuditRecord:
    """``record_from`` of a request whose facts are known, every value given, positionally:
    the data path's call (``Telemetry.request``), without keyword matching per request."""
    reason = decision.reason
    if auth is not None:
        iss, sub, jti, apikey = _token_fields(auth, decision.provider)
        if auth.apikey_unknown:
            extra = _key_unknown_extra(extra)
    else:
        iss = sub = jti = apikey = None
    return AuditRecord(
        time, EVENT_RATE_LIMITED if reason == REASON_RATE_LIMITED else EVENT_REQUEST,
        request_id, facts.direction, facts.peer, facts.source,
        iss, sub, jti, apikey, facts.method, facts.host, facts.path,
        # decision_value(decision), without a call per record
        "dry-run" if decision.dry_run and decision.would == "deny" else decision.action,
        decision.rule, reason, decision.version, status, bytes_in, bytes_out, duration_ms,
        extra)


def request_wire(
    decision: Decision, facts: RequestFacts, time: float, auth: AuthFacts | None,
    request_id: str, status: int, bytes_in: int, bytes_out: int, duration_ms: float,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """``request_record(...).to_wire()``, built directly: the stored map of a request's record
    (short keys, None values left out, keys in ``WIRE_KEYS`` order), which the writer takes
    in place of an ``AuditRecord`` (``AuditWriter.submit``). The data path's call
    (``Telemetry.request``): no record object is built per request and none converted on
    the writer's side (a dataclass of 22 fields, then a map of them). ``facts``' strings
    and the decision's are never None (their types); ``peer``, the token fields and
    ``extra`` may be (then left out, as ``to_wire`` does)."""
    reason = decision.reason
    peer = facts.peer
    if auth is not None and auth is not NO_AUTH:
        iss, sub, jti, apikey = _token_fields(auth, decision.provider)
        if auth.apikey_unknown:  # (a key was presented: NO_AUTH never has one)
            extra = _key_unknown_extra(extra)
    else:  # no credentials (NO_AUTH: every request without a token or API key)
        iss = sub = jti = apikey = None
    event = EVENT_RATE_LIMITED if reason == REASON_RATE_LIMITED else EVENT_REQUEST
    # decision_value(decision), without a call per record
    value = "dry-run" if decision.dry_run and decision.would == "deny" else decision.action
    wire: dict[str, Any]
    if peer is not None and apikey is None and iss is None and sub is None and jti is None:
        # The usual shapes in one dict display each: no token (or a token without its
        # fields), and a token with all three fields (sidecar-full's inbound proxy).
        wire = {"t": time, "ev": event, "id": request_id, "dir": facts.direction,
                "peer": peer, "src": facts.source, "m": facts.method, "host": facts.host,
                "path": facts.path, "d": value, "rule": decision.rule, "why": reason,
                "pv": decision.version, "st": status, "bi": bytes_in, "bo": bytes_out,
                "ms": duration_ms}
    elif (peer is not None and apikey is None and iss is not None and sub is not None
          and jti is not None):
        wire = {"t": time, "ev": event, "id": request_id, "dir": facts.direction,
                "peer": peer, "src": facts.source, "iss": iss, "sub": sub, "jti": jti,
                "m": facts.method, "host": facts.host, "path": facts.path, "d": value,
                "rule": decision.rule, "why": reason, "pv": decision.version, "st": status,
                "bi": bytes_in, "bo": bytes_out, "ms": duration_ms}
    else:
        wire = {"t": time, "ev": event, "id": request_id, "dir": facts.direction}
        for key, val in (("peer", peer), ("src", facts.source), ("iss", iss), ("sub", sub),
                         ("jti", jti), ("key", apikey)):
            if val is not None:
                wire[key] = val
        wire.update(m=facts.method, host=facts.host, path=facts.path, d=value,
                    rule=decision.rule, why=reason, pv=decision.version, st=status,
                    bi=bytes_in, bo=bytes_out, ms=duration_ms)
    if extra is not None:
        wire["x"] = (extra if len(extra) <= MAX_EXTRA_KEYS
                     else dict(list(extra.items())[:MAX_EXTRA_KEYS]))
    return wire


class RowShape:
    """The keys, in stored order, of one usual shape of a request's record: a row
    ``(shape, value, value, ...)`` (``request_row``) is that record with its keys left out.
    ``fill`` is the writer's, set at the shape's first record: the generated function that
    makes the row's JSON (``ship.row_text``)."""

    __slots__ = ("keys", "fill")

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.fill: Callable[..., str | None] | None = None

    def __repr__(self) -> str:
        return f"RowShape({self.keys!r})"


_ROW_HEAD = ("t", "ev", "id", "dir", "peer", "src")
_ROW_TAIL = ("m", "host", "path", "d", "rule", "why", "pv", "st", "bi", "bo", "ms")
_ROW_TOKEN = ("iss", "sub", "jti")
# The four shapes ``request_row`` makes: without and with a token's three fields, without
# and with ``x`` (always last). The same keys, in the same order, as ``request_wire``'s maps.
ROW_PLAIN = RowShape(_ROW_HEAD + _ROW_TAIL)
ROW_PLAIN_X = RowShape(_ROW_HEAD + _ROW_TAIL + ("x",))
ROW_TOKEN = RowShape(_ROW_HEAD + _ROW_TOKEN + _ROW_TAIL)
ROW_TOKEN_X = RowShape(_ROW_HEAD + _ROW_TOKEN + _ROW_TAIL + ("x",))
ROW_SHAPES = (ROW_PLAIN, ROW_PLAIN_X, ROW_TOKEN, ROW_TOKEN_X)

Row = tuple[Any, ...]


def request_row(
    decision: Decision, facts: RequestFacts, time: float, auth: AuthFacts | None,
    request_id: str, status: int, bytes_in: int, bytes_out: int, duration_ms: float,
    extra: dict[str, Any] | None,
) -> Row | dict[str, Any]:
    """``request_wire``'s record as a row ``(shape, value, ...)`` when it has one of the
    usual shapes (``ROW_SHAPES``), else ``request_wire``'s map. What the data path submits
    to a writer that stores records as JSON (``AuditWriter.takes_rows``): a tuple of the
    values costs the request a sixth of a map of them (1.35 -> 0.19 us for 21 keys), and the
    writer fills the JSON from it without looking the shape up (``ship.row_text``).
    ``row_wire`` gives the map back; it equals ``request_wire(...)``'s."""
    peer = facts.peer
    if peer is None:
        return request_wire(decision, facts, time, auth, request_id, status, bytes_in,
                            bytes_out, duration_ms, extra)
    reason = decision.reason
    event = EVENT_RATE_LIMITED if reason == REASON_RATE_LIMITED else EVENT_REQUEST
    # decision_value(decision), without a call per record
    value = "dry-run" if decision.dry_run and decision.would == "deny" else decision.action
    if extra is not None and len(extra) > MAX_EXTRA_KEYS:
        extra = dict(list(extra.items())[:MAX_EXTRA_KEYS])
    if auth is not None and auth is not NO_AUTH:
        if auth.apikey_unknown:  # (a key was presented: NO_AUTH never has one)
            extra = _key_unknown_extra(extra)
        iss, sub, jti, apikey = _token_fields(auth, decision.provider)
        if apikey is None and iss is not None and sub is not None and jti is not None:
            if extra is None:
                return (ROW_TOKEN, time, event, request_id, facts.direction, peer,
                        facts.source, iss, sub, jti, facts.method, facts.host, facts.path,
                        value, decision.rule, reason, decision.version, status, bytes_in,
                        bytes_out, duration_ms)
            return (ROW_TOKEN_X, time, event, request_id, facts.direction, peer,
                    facts.source, iss, sub, jti, facts.method, facts.host, facts.path,
                    value, decision.rule, reason, decision.version, status, bytes_in,
                    bytes_out, duration_ms, extra)
        if apikey is not None or iss is not None or sub is not None or jti is not None:
            return request_wire(decision, facts, time, auth, request_id, status, bytes_in,
                                bytes_out, duration_ms, extra)
    if extra is None:
        return (ROW_PLAIN, time, event, request_id, facts.direction, peer, facts.source,
                facts.method, facts.host, facts.path, value, decision.rule, reason,
                decision.version, status, bytes_in, bytes_out, duration_ms)
    return (ROW_PLAIN_X, time, event, request_id, facts.direction, peer, facts.source,
            facts.method, facts.host, facts.path, value, decision.rule, reason,
            decision.version, status, bytes_in, bytes_out, duration_ms, extra)


def row_wire(row: Row) -> dict[str, Any]:
    """The stored map of a row (``request_row``): its shape's keys with its values."""
    return dict(zip(row[0].keys, row[1:], strict=True))


def connection_refused_record(
    *, time: float, direction: str, source: str, reason: str, request_id: str = "",
    extra: dict[str, Any] | None = None,
) -> AuditRecord:
    """A connection refused before any request: handshake failure, wrong peer identity. It
    has no ``peer``: a refused certificate's SPIFFE ID is only claimed (``extra``
    ``claimed_peer``, docs/audit.md)."""
    return AuditRecord(
        time=time, event=EVENT_CONNECTION_REFUSED, request_id=request_id,
        direction=direction, peer=None, source=source, decision="deny", reason=reason,
        extra=extra,
    )


def refused_summary_record(
    *, time: float, direction: str, source: str, count: int, reasons: dict[str, int],
    first: float, last: float, peers: list[str] | None = None,
) -> AuditRecord:
    """``count`` refused connections of one source, beyond the rate that gets a record each
    (``sidecar.refusals``): their reasons with how many of each, the first and the last."""
    return AuditRecord(
        time=time, event=EVENT_REFUSED_SUMMARY, direction=direction, source=source,
        decision="deny", reason="summary",
        extra={"count": count, "reasons": dict(reasons), "first": first, "last": last,
               "claimed_peers": list(peers or ())},
    )


def connection_closed_record(
    *, time: float, direction: str, source: str, reason: str, peer: str | None = None,
    extra: dict[str, Any] | None = None,
) -> AuditRecord:
    """An open connection the sidecar ended because it outlived its trust
    (``sidecar.net.lifetime``: max age, peer certificate expiry, bundle change...)."""
    return AuditRecord(
        time=time, event=EVENT_CONNECTION_CLOSED, direction=direction, peer=peer,
        source=source, decision="deny", reason=reason, extra=extra,
    )


def alert_record(
    *, time: float, rule: str, reason: str, peer: str | None = None, source: str = "",
    extra: dict[str, Any] | None = None,
) -> AuditRecord:
    """An alert raised by burst detection (``rule`` is the alert rule's name)."""
    return AuditRecord(
        time=time, event=EVENT_ALERT, direction="connection", peer=peer, source=source,
        rule=rule, reason=reason, extra=extra,
    )
