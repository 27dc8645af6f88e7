"""Audit records: wire form, token hashing, building records from decisions."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from sidecar.audit.record import (
    _USUALLY_NONE,
    FIELD_NAMES,
    MAX_EXTRA_KEYS,
    MAX_JTI_HASHES,
    WIRE_KEYS,
    AuditRecord,
    _jti_hashes,
    alert_record,
    connection_refused_record,
    decision_value,
    hash_token_id,
    record_from,
    request_record,
    request_wire,
)
from sidecar.policy.decision import (
    NO_AUTH,
    REASON_ALLOWED,
    REASON_DEFAULT_DENY,
    REASON_DRY_RUN,
    REASON_RATE_LIMITED,
    AuthFacts,
    Decision,
    RequestFacts,
)

FACTS = RequestFacts(direction="inbound", peer="spiffe://cluster.local/ns/a/sa/b",
                     source="10.0.0.1:5555", method="GET", path="/orders/1",
                     host="orders", port=15443)


def test_wire_keys_are_short_unique_and_cover_every_field() -> None:
    assert set(WIRE_KEYS) == {f for f in AuditRecord.__dataclass_fields__}
    assert len(set(WIRE_KEYS.values())) == len(WIRE_KEYS)
    assert FIELD_NAMES == tuple(WIRE_KEYS)


def test_wire_round_trip_leaves_out_none() -> None:
    rec = AuditRecord(time=1.5, request_id="r1", peer=None, path="/x", status=200,
                      extra={"a": 1})
    wire = rec.to_wire()
    assert "peer" not in wire and wire["path"] == "/x" and wire["x"] == {"a": 1}
    back = AuditRecord.from_wire(msgpack.unpackb(msgpack.packb(wire)))
    assert back == rec


def test_unknown_wire_keys_survive_in_extra() -> None:
    back = AuditRecord.from_wire({"t": 2.0, "zz": 5})
    assert back.time == 2.0 and back.extra == {"zz": 5}


def test_extra_is_bounded() -> None:
    rec = AuditRecord(time=0.0, extra={str(i): i for i in range(MAX_EXTRA_KEYS + 10)})
    assert len(rec.to_wire()["x"]) == MAX_EXTRA_KEYS


def test_token_id_is_hashed_never_stored() -> None:
    auth = AuthFacts(claims={"corp": {"iss": "https://idp/", "sub": "alice", "jti": "tok-1"}},
                     apikey="batch-job")
    d = Decision("allow", "r", REASON_ALLOWED, "v1")
    rec = record_from(d, FACTS, time=1.0, auth=auth)
    assert rec.token_issuer == "https://idp/" and rec.token_subject == "alice"
    assert rec.token_id_hash == hashlib.sha256(b"tok-1").hexdigest() == hash_token_id("tok-1")
    assert "tok-1" not in repr(rec.to_wire())
    assert rec.apikey == "batch-job"


@pytest.mark.parametrize(
    ("decision", "expected", "event"),
    [
        (Decision("allow", "r", REASON_ALLOWED, "v1"), "allow", "request"),
        (Decision("deny", "default deny", REASON_DEFAULT_DENY, "v1", status=403), "deny",
         "request"),
        (Decision("allow", "r", REASON_DRY_RUN, "v1", dry_run=True, would="deny"), "dry-run",
         "request"),
        (Decision("allow", "r", REASON_ALLOWED, "v1", dry_run=True, would="allow"), "allow",
         "request"),
        (Decision("deny", "limit", REASON_RATE_LIMITED, "v1", status=429), "deny",
         "rate_limited"),
    ],
)
def test_record_from_decision(decision: Decision, expected: str, event: str) -> None:
    rec = record_from(decision, FACTS, time=9.0, request_id="abc", bytes_out=12)
    assert decision_value(decision) == expected
    assert (rec.decision, rec.event, rec.rule, rec.reason, rec.policy_version) == (
        expected, event, decision.rule, decision.reason, "v1")
    assert (rec.peer, rec.source, rec.method, rec.path, rec.host) == (
        FACTS.peer, FACTS.source, "GET", "/orders/1", "orders")
    assert rec.status == decision.status and rec.bytes_out == 12 and rec.request_id == "abc"


def test_record_from_without_facts_and_outbound_target() -> None:
    d = Decision("deny", "", "bad_path", "v1", status=400)
    assert record_from(d, None, time=1.0).path == ""
    out = RequestFacts(direction="outbound", peer=None, source="127.0.0.1", method="GET",
                       path="/", host="h", port=15001, target="spiffe://td/x")
    rec = record_from(Decision("allow", "egress", REASON_ALLOWED, "v1"), out, time=1.0)
    assert rec.direction == "outbound" and rec.extra == {"target": "spiffe://td/x"}
    with pytest.raises(TypeError):
        record_from(d, None, time=1.0, no_such_field=1)


def test_record_from_lets_every_keyword_win_over_what_was_derived() -> None:
    # record_from builds the record positionally, then applies the keywords: each one,
    # None included, must win over what the decision, facts and token said.
    auth = AuthFacts(claims={"p": {"iss": "i", "sub": "s", "jti": "j"}}, apikey="k")
    d = Decision("allow", "r", REASON_RATE_LIMITED, "v1", status=429)
    samples: dict[str, object] = {"event": "other", "request_id": None, "direction": None,
                                  "peer": None, "source": None, "token_issuer": None,
                                  "token_subject": "x", "token_id_hash": None,
                                  "apikey": None, "method": None, "host": None, "path": None,
                                  "rule": None, "reason": None,
                                  "policy_version": None, "status": None, "bytes_in": None,
                                  "bytes_out": 9, "duration_ms": None, "extra": {"a": 1}}
    # (``time`` and ``decision`` are record_from's own parameters.)
    assert set(samples) == set(FIELD_NAMES) - {"time", "decision"}
    for facts in (FACTS, None):
        for name, value in samples.items():
            rec = record_from(d, facts, time=1.0, auth=auth, **{name: value})
            assert getattr(rec, name) == value, name
        rec = record_from(d, facts, time=1.0, auth=auth)
        assert (rec.event, rec.status, rec.token_issuer, rec.apikey) == (
            "rate_limited", 429, "i", "k")


def test_token_fields_follow_each_claims_mapping_and_stay_bounded() -> None:
    # The token fields are remembered for the last claims mapping and the jti hashes in a
    # bounded table: alternating mappings, equal mappings that are different objects, and
    # more jti values than the table holds all give each record its own token's fields.
    d = Decision("allow", "r", REASON_ALLOWED, "v1")
    a = AuthFacts(claims={"p": {"iss": "ia", "sub": "alice", "jti": "ja"}})
    b = AuthFacts(claims={"p": {"iss": "ib", "sub": "bob", "jti": 7}})  # jti not a string
    c = AuthFacts(claims={"p": {"iss": "ia", "sub": "alice", "jti": "ja"}})
    for auth, want in [(a, ("ia", "alice", hash_token_id("ja"))), (b, ("ib", "bob", None)),
                       (a, ("ia", "alice", hash_token_id("ja"))),
                       (c, ("ia", "alice", hash_token_id("ja"))), (b, ("ib", "bob", None)),
                       (AuthFacts(apikey="k"), (None, None, None))]:
        rec = record_from(d, FACTS, time=1.0, auth=auth)
        assert (rec.token_issuer, rec.token_subject, rec.token_id_hash) == want
        assert rec.apikey == auth.apikey
    for i in range(MAX_JTI_HASHES * 2 + 3):
        jti = f"jti-{i}"
        rec = record_from(d, FACTS, time=1.0,
                          auth=AuthFacts(claims={"p": {"iss": 5, "sub": None, "jti": jti}}))
        assert (rec.token_issuer, rec.token_subject) == (None, None)
        assert rec.token_id_hash == hashlib.sha256(jti.encode()).hexdigest()
        assert len(_jti_hashes) <= MAX_JTI_HASHES


def test_request_record_is_record_from_with_every_value_given() -> None:
    # The data path's positional call builds the record record_from builds.
    auth = AuthFacts(claims={"p": {"iss": "i", "sub": "s", "jti": "j"}}, apikey="k")
    for d in (Decision("allow", "r", REASON_ALLOWED, "v1"),
              Decision("deny", "limit", REASON_RATE_LIMITED, "v1", status=429),
              Decision("allow", "r", REASON_DRY_RUN, "v1", dry_run=True, would="deny")):
        for a in (auth, None):
            assert request_record(d, FACTS, 2.5, a, "id", 201, 3, 4, 1.5, {"e": 1}) == \
                record_from(d, FACTS, time=2.5, auth=a, request_id="id", status=201,
                            bytes_in=3, bytes_out=4, duration_ms=1.5, extra={"e": 1})


def test_request_wire_is_the_stored_map_of_request_record() -> None:
    # The data path submits the stored map built directly (no AuditRecord, no to_wire):
    # for every shape -- peer or none; no credentials (None, NO_AUTH), a token with all, some or none of
    # its fields, an API key; no, a small, a shared and an oversized extra; every kind of
    # decision -- the same keys in the same order with the same values, so the frames
    # stored are byte for byte those of request_record(...).to_wire().
    from sidecar.audit.record import SharedExtra

    auths = [None, AuthFacts(claims={"p": {"iss": "i", "sub": "s", "jti": "j"}}),
             AuthFacts(claims={"p": {"iss": "i", "sub": "s", "jti": "j"}}, apikey="k"),
             AuthFacts(claims={"p": {"iss": "i"}}), AuthFacts(claims={"p": {"sub": 5}}),
             AuthFacts(claims={}, apikey="k"), AuthFacts(claims={}), NO_AUTH]
    extras = [None, {"e": 1}, SharedExtra(service="s", port=1),
              {f"k{i}": i for i in range(MAX_EXTRA_KEYS + 5)}]
    decisions = [Decision("allow", "r", REASON_ALLOWED, "v1"),
                 Decision("deny", "limit", REASON_RATE_LIMITED, "v1", status=429),
                 Decision("allow", "r", REASON_DRY_RUN, "v1", dry_run=True, would="deny")]
    packer = msgpack.Packer(use_bin_type=True)
    seen = 0
    for facts in (FACTS, FACTS._replace(peer=None)):
        for d in decisions:
            for a in auths:
                for x in extras:
                    args = (d, facts, 2.5, a, "id", 201, 3, 4, 1.5, x)
                    wire, want = request_wire(*args), request_record(*args).to_wire()
                    assert type(wire) is dict
                    assert list(wire.items()) == list(want.items()), (wire, want)
                    assert packer.pack(wire) == packer.pack(want)
                    seen += 1
    assert seen == 2 * 3 * 8 * 4


def test_record_from_keeps_the_extra_it_is_given() -> None:
    # A caller may share one read-only ``extra`` between records (Telemetry does, per
    # connection): the record holds that mapping and nothing changes it.
    shared = {"service": "spiffe://td/me", "port": 15443}
    d = Decision("allow", "r", REASON_ALLOWED, "v1")
    out = RequestFacts(direction="outbound", peer=None, source="127.0.0.1", method="GET",
                       path="/", host="h", port=15001, target="spiffe://td/x")
    for facts in (FACTS, out, None):
        rec = record_from(d, facts, time=1.0, extra=shared)
        assert rec.extra is shared
        rec.to_wire()
        assert record_from(d, facts, time=1.0, extra=None).extra is None
    assert shared == {"service": "spiffe://td/me", "port": 15443}


@pytest.mark.parametrize("name", FIELD_NAMES)
@pytest.mark.parametrize("tokens", ["set", "none", "token_only"])
def test_to_wire_leaves_out_exactly_the_none_fields_in_table_order(name: str,
                                                                   tokens: str) -> None:
    # Every way ``to_wire`` builds the map: with token/API-key fields set (the whole map),
    # without (the map of the usual fields), and with a token but no API key: each field
    # None, empty or set, in turn.
    full: dict[str, object] = {f: f"v-{f}" for f in FIELD_NAMES}
    full["extra"] = {"e": 1}
    if tokens == "none":
        full.update(dict.fromkeys(_USUALLY_NONE))
    elif tokens == "token_only":  # a verified token, no API key: a map of its own
        full["apikey"] = None
    for value in (None, "", 0, f"v-{name}") if name != "extra" else (None, {}, {"e": 1}):
        rec = AuditRecord(**{**full, name: value})  # type: ignore[arg-type]
        expected = [(key, getattr(rec, f)) for f, key in WIRE_KEYS.items()
                    if getattr(rec, f) is not None]
        assert list(rec.to_wire().items()) == expected


def test_connection_refused_and_alert_records() -> None:
    c = connection_refused_record(time=1.0, direction="inbound", source="1.2.3.4:5",
                                  reason="handshake_failed")
    assert (c.event, c.decision, c.reason) == ("connection_refused", "deny", "handshake_failed")
    a = alert_record(time=1.0, rule="brute", reason="auth_failures", peer="spiffe://td/x",
                     extra={"count": 10})
    assert (a.event, a.rule, a.extra) == ("alert", "brute", {"count": 10})
