"""Rows: what the data path submits to a writer that stores JSON (``record.request_row``,
``ship.row_text``, ``AuditWriter.takes_rows``; docs/audit.md, "Cost"). A row must be
exactly the map ``request_wire`` builds -- the same keys, in the same order, the same values
-- and its JSON exactly that map's, whatever the request: every combination of credentials,
peer, extra and decision below, and rows whose values do not fit their shape's slots."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.audit.chain import FORMAT_LINKED, parse_record_json
from sidecar.audit.record import (
    MAX_EXTRA_KEYS,
    NO_AUTH,
    ROW_SHAPES,
    SharedExtra,
    request_row,
    request_wire,
    row_wire,
)
from sidecar.audit.segments import iter_records, verify
from sidecar.audit.ship import Collector, record_text, row_text, write_segments
from sidecar.audit.signing import load_keyring, write_keypair
from sidecar.audit.writer import AuditWriter
from sidecar.config.audit import AuditConfig
from sidecar.policy.decision import (
    REASON_ALLOWED,
    REASON_DRY_RUN,
    REASON_RATE_LIMITED,
    AuthFacts,
    Decision,
    RequestFacts,
)
from tests.harness import wait_for, write_audit_trail
from tests.test_audit_hostile_trails import _frames as frames_of
from tests.test_audit_ship import ORDERS, Rsyslog

PEER = "spiffe://td/ns/shop/sa/frontend"
TOKEN = {"iss": "https://idp.example", "sub": "user-1", "jti": "id-1", "scope": "a b"}
# Every kind of credentials a request can carry, as the gate reports them.
AUTHS: dict[str, AuthFacts | None] = {
    "none": None,
    "no credentials": NO_AUTH,
    "token": AuthFacts(claims={"corp": TOKEN}),
    "token without jti": AuthFacts(claims={"corp": {"iss": "https://idp", "sub": "u"}}),
    "token without sub": AuthFacts(claims={"corp": {"iss": "https://idp", "jti": "j"}}),
    "token with no fields": AuthFacts(claims={"corp": {"scope": "x"}}),
    "two tokens": AuthFacts(claims={"a": TOKEN, "b": {"iss": "https://other", "sub": "v"}}),
    "api key": AuthFacts(apikey="orders-key"),
    "token and api key": AuthFacts(claims={"corp": TOKEN}, apikey="orders-key"),
    "empty claims": AuthFacts(claims={}),
}
EXTRAS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "empty": {},
    "shared": SharedExtra(service="spiffe://td/ns/shop/sa/orders", port=15443),
    "error": {"service": "s", "error": "upstream_timeout"},
    "too many keys": {f"k{i}": i for i in range(MAX_EXTRA_KEYS + 8)},
}
DECISIONS = {
    "allow": Decision("allow", "r1", REASON_ALLOWED, "v1"),
    "deny": Decision("deny", "", "default_deny", "v1", 403),
    "dry-run": Decision("allow", "r2", REASON_DRY_RUN, "v1", dry_run=True, would="deny"),
    "rate limited": Decision("deny", "r3", REASON_RATE_LIMITED, "v1", 429),
}
PEERS = {"peer": PEER, "no peer": None}
CASES = list(itertools.product(AUTHS, EXTRAS, DECISIONS, PEERS))


def facts(peer: str | None, path: str = "/orders/1") -> RequestFacts:
    return RequestFacts(direction="inbound", peer=peer, source="10.0.0.1:4000", method="GET",
                        path=path, host="orders.shop", port=15443)


def both(auth_: str, extra_: str, decision_: str, peer_: str, **kw: Any) -> tuple[Any, Any]:
    """``request_row`` and ``request_wire`` of the named case; ``kw`` overrides arguments."""
    args = dict(decision=DECISIONS[decision_], facts=facts(PEERS[peer_]),
                time=1_700_000_000.25, auth=AUTHS[auth_], request_id="req-1", status=200,
                bytes_in=10, bytes_out=20, duration_ms=1.5, extra=EXTRAS[extra_])
    args.update(kw)
    return request_row(**args), request_wire(**args)


@pytest.mark.parametrize(("auth", "extra", "decision", "peer"), CASES,
                         ids=["/".join(c) for c in CASES])
def test_a_row_is_the_map_request_wire_builds(auth: str, extra: str, decision: str,
                                              peer: str) -> None:
    row, wire = both(auth, extra, decision, peer)
    if row.__class__ is tuple:
        assert row[0] in ROW_SHAPES
        got = row_wire(row)
        assert list(got) == list(wire) and got == wire
        assert list(got) == list(row[0].keys)
        # and its JSON is the map's, byte for byte
        assert row_text(row) == record_text(wire)
    else:
        assert row == wire
    # Rows are made for exactly the usual shapes: a peer, and no credentials or a token
    # with its three fields (and no API key).
    usual = (peer == "peer" and auth in ("none", "no credentials", "token", "two tokens",
                                         "token with no fields", "empty claims"))
    assert (row.__class__ is tuple) == usual


# Values that do not fit the slots a shape learnt from its first row (or that JSON cannot
# hold): the row's JSON is still its map's (or None for both, stored as msgpack).
ODD_VALUES: dict[str, dict[str, Any]] = {
    "int time": {"time": 1_700_000_000},
    "int duration": {"duration_ms": 2},
    "bool status": {"status": True},
    "float status": {"status": 200.0},
    "big int": {"bytes_in": 2 ** 70},
    "path beyond the BMP, quotes, controls": {"facts": facts(PEER, '/\U0001F600/"q"/\\\t\x01')},
    "lone surrogate in the path": {"facts": facts(PEER, "/\udc80")},
    "NaN duration": {"duration_ms": float("nan")},
    "infinite time": {"time": float("inf")},
    "bytes in extra": {"extra": {"b": b"\x00"}},
    "request id not a string": {"request_id": 7},
    "nested extra": {"extra": {"l": [1, 2.5, None, True, {"d": [[]]}]}},
}


@pytest.mark.parametrize("odd", list(ODD_VALUES))
@pytest.mark.parametrize("first", ["usual first", "odd first"])
def test_a_row_whose_values_do_not_fit_its_shape_still_gives_its_maps_json(
        odd: str, first: str) -> None:
    usual = [both(a, e, "allow", "peer") for a in ("none", "token") for e in ("none", "shared")]
    oddities = [both(a, e, "allow", "peer", **ODD_VALUES[odd])
                for a in ("none", "token") for e in ("none", "shared")]
    for row, wire in (usual + oddities if first == "usual first" else oddities + usual):
        assert row.__class__ is tuple
        text = row_text(row)
        assert text == record_text(wire)
        if text is not None:
            back = parse_record_json(text.decode())
            assert repr(back) == repr(json.loads(json.dumps(wire)))  # 1 is not 1.0 nor True


def _rows(n: int) -> list[Any]:
    """Rows of the four shapes and maps of other shapes, interleaved, with a record JSON
    cannot hold (stored as msgpack) among them."""
    out: list[Any] = []
    for i in range(n):
        auth = ("none", "token", "api key", "no credentials")[i % 4]
        extra = ("none", "shared", "error")[i % 3]
        row, _ = both(auth, extra, "allow" if i % 5 else "deny", "peer" if i % 7 else "no peer",
                      request_id=f"req-{i}", time=1_700_000_000.0 + i / 3)
        out.append(row)
    out[11] = both("none", "none", "allow", "peer", extra={"b": b"\x01"})[0]
    return out


def _stored(entry: Any) -> dict[str, Any]:
    return row_wire(entry) if entry.__class__ is tuple else entry


def test_a_shipping_writer_stores_rows_as_json_and_the_collector_gets_them_back(
        tmp_path: Path) -> None:
    rsyslog = Rsyslog(tmp_path / "rsyslog")
    rsyslog.start()
    try:
        priv, pub, _ = write_keypair(str(tmp_path / "sig"))
        config = AuditConfig(path=str(tmp_path / "audit"), fsync=False, signing_key_file=priv,
                             checkpoint_every_records=16, ship=rsyslog.ship())
        entries = _rows(40)
        assert sum(e.__class__ is tuple for e in entries) >= 15
        assert AuditWriter(config, identity=ORDERS).takes_rows
        writer = write_audit_trail(config, entries, identity=ORDERS, batch=8, pause=0.001)
        seal = f'seq="{writer.statistics().next_seq - 1}"'
        assert wait_for(lambda: any(seal in line for line in rsyslog.lines()), timeout=15)
    finally:
        rsyslog.stop()
    expected = [_stored(e) for e in entries]
    assert [r.to_wire() for r in iter_records(str(tmp_path / "audit"))] == expected
    keyring = load_keyring([pub])
    assert verify(str(tmp_path / "audit"), keyring=keyring).ok
    # Stored as JSON (format 2), but for the record JSON cannot hold.
    kinds = []
    for _path, payloads in frames_of(tmp_path / "audit"):
        for payload in payloads:
            raw = msgpack.unpackb(payload, raw=False)
            if "seg" in raw:
                assert raw["seg"]["v"] == FORMAT_LINKED
            if "rec" in raw:
                kinds.append(type(raw["rec"]))
    assert kinds.count(str) == len(entries) - 1 and kinds.count(dict) == 1
    # The collector's copy, made from rsyslog's lines, holds the same records.
    collector = Collector()
    collector.add(rsyslog.lines())
    collector.check()
    copy = tmp_path / "copy"
    write_segments(collector.frames, str(copy))
    assert [r.to_wire() for r in iter_records(str(copy))] == expected
    assert verify(str(copy), keyring=keyring).ok


def test_a_writer_that_does_not_ship_takes_maps_and_still_stores_a_row(
        tmp_path: Path) -> None:
    config = AuditConfig(path=str(tmp_path / "a"), fsync=False)
    assert not AuditWriter(config).takes_rows
    entries = _rows(12)
    entries[3] = both("none", "none", "allow", "peer", extra={"o": object()},
                      request_id="bad", time=5.0)[0]
    write_audit_trail(config, entries)
    got = [r.to_wire() for r in iter_records(str(tmp_path / "a"))]
    assert got[:3] + got[4:] == [_stored(e) for e in entries[:3] + entries[4:]]
    # A row that cannot be packed leaves its stand-in, named by the row's time and id.
    assert (got[3]["ev"], got[3]["id"], got[3]["t"]) == ("unencodable", "bad", 5.0)
    assert verify(str(tmp_path / "a")).ok


# Any text the data path may carry (facts are decoded from bytes; surrogates included).
_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=20)
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), _TEXT, st.binary(max_size=4))


@settings(max_examples=300, deadline=None)
@given(peer=st.one_of(st.none(), _TEXT), source=_TEXT, path=_TEXT, host=_TEXT, method=_TEXT,
       rule=_TEXT, reason=_TEXT, version=_TEXT, request_id=_TEXT,
       time=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(0, 2 ** 40)),
       duration=st.floats(allow_nan=True, allow_infinity=True),
       status=st.one_of(st.integers(0, 999), st.booleans()),
       claims=st.dictionaries(st.sampled_from(["iss", "sub", "jti", "scope"]), _TEXT),
       apikey=st.one_of(st.none(), _TEXT),
       extra=st.one_of(st.none(), st.dictionaries(_TEXT, _SCALAR, max_size=4)))
def test_any_request_gives_a_row_or_map_whose_json_is_request_wires(
        peer: str | None, source: str, path: str, host: str, method: str, rule: str,
        reason: str, version: str, request_id: str, time: float, duration: float,
        status: int, claims: dict[str, str], apikey: str | None,
        extra: dict[str, Any] | None) -> None:
    auth = AuthFacts(claims={"p": claims} if claims else {}, apikey=apikey)
    args = (Decision("allow", rule, reason, version), RequestFacts(
        direction="outbound", peer=peer, source=source, method=method, path=path, host=host,
        port=1), time, auth, request_id, status, 1, 2, duration, extra)
    row, wire = request_row(*args), request_wire(*args)
    got = row_wire(row) if row.__class__ is tuple else row
    assert list(got) == list(wire) and repr(got) == repr(wire)
    assert (row_text(row) if row.__class__ is tuple else record_text(row)) == record_text(wire)
