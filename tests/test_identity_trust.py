"""Trust domains (issue 14): bundle formats, the trust-domain rule, the config keys.

Pure checks on real certificates; the same rule through running sidecars is in
tests/test_trust_domains_e2e.py.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.config.model import load_config
from sidecar.errors import ConfigError
from sidecar.identity.bundle import MAX_BUNDLE_KEYS, parse_bundle, spiffe_bundle_json
from sidecar.identity.ca import DevCA
from sidecar.identity.svid import (
    RULE_BUNDLE_INVALID,
    RULE_TRUST_DOMAIN_MISMATCH,
    RULE_TRUST_DOMAIN_NOT_FEDERATED,
    SvidError,
    load_roots,
)
from sidecar.identity.trust import (
    PeerChain,
    TrustStore,
    bundle_from_certs,
    load_bundle,
)

CLUSTER, PARTNER = "cluster.local", "partner.example"


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def sid(td: str, name: str = "frontend") -> str:
    return f"spiffe://{td}/ns/shop/sa/{name}"


@pytest.fixture(scope="module")
def cas() -> tuple[DevCA, DevCA]:
    return DevCA.create(CLUSTER), DevCA.create(PARTNER)


def store(cas: tuple[DevCA, DevCA], *, federate: bool = True) -> TrustStore:
    cluster, partner = cas
    own = bundle_from_certs(CLUSTER, "own.pem", [cluster.root])
    fed = [bundle_from_certs(PARTNER, "partner.json", [partner.root])] if federate else []
    return TrustStore.build(own, fed)


def chain_of(ca: DevCA, spiffe_id: str) -> PeerChain:
    """What OpenSSL reports for a leaf issued by ``ca`` directly: verified = leaf, root."""
    leaf = ca.issue(spiffe_id).cert
    return PeerChain((der(leaf), der(ca.root)), (der(leaf),))


# -- bundle formats ---------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["pem", "spiffe_json"])
def test_a_bundle_holds_at_most_256_roots_in_either_form(form: str, tmp_path) -> None:
    """Both forms are bounded alike, in the file the sidecar loads (before, only the JSON
    form was: a 1 MiB PEM file of 1,380 roots stalled every connection at each change while
    the contexts loaded them)."""
    roots = [DevCA.create(f"td{i}.example").root for i in range(MAX_BUNDLE_KEYS + 1)]

    def write(certs: list[x509.Certificate]) -> str:
        path = tmp_path / f"{len(certs)}.{form}"
        path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
                         if form == "pem" else spiffe_bundle_json(certs))
        return str(path)

    assert len(parse_bundle(Path(write(roots[:2])).read_bytes())) == 2
    assert len(load_roots(Path(write(roots[:MAX_BUNDLE_KEYS])).read_bytes(), "b")) == \
        MAX_BUNDLE_KEYS
    over = write(roots)
    with pytest.raises(SvidError, match="more than 256") as err:
        load_roots(Path(over).read_bytes(), over)
    assert err.value.rule == RULE_BUNDLE_INVALID and over in str(err.value)
    with pytest.raises(ValueError, match="more than 256"):
        parse_bundle(Path(over).read_bytes())


def test_spiffe_bundle_format_takes_x509_svid_keys_only(cas) -> None:
    cluster, partner = cas
    doc = json.loads(spiffe_bundle_json([cluster.root, partner.root]))
    doc["keys"].append({"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256",
                        "x": "AA", "y": "AA"})
    doc["keys"].append({"use": "something-new", "x5c": ["!!"]})
    roots = parse_bundle(json.dumps(doc).encode())
    assert [der(c) for c in roots] == [der(cluster.root), der(partner.root)]


def test_pem_bundle(cas) -> None:
    cluster, partner = cas
    roots = parse_bundle(cluster.bundle_pem + partner.bundle_pem)
    assert len(roots) == 2


def test_x5c_read_as_the_standard_tells_a_consumer(cas) -> None:
    """X509-SVID 6.2: of several x5c values only the first is the root (the others are
    ignored, never trusted); an x509-svid key without x5c, or with an empty one, is ignored
    (before, both refused the whole bundle, which kept the last one -- roots the publisher
    had removed included -- in force)."""
    cluster, partner = cas
    root = json.loads(spiffe_bundle_json([cluster.root]))["keys"][0]
    other = json.loads(spiffe_bundle_json([partner.root]))["keys"][0]["x5c"][0]
    doc = {"keys": [{**root, "x5c": [root["x5c"][0], other, "not even base64"]},
                    {"use": "x509-svid", "kty": "EC"}, {"use": "x509-svid", "x5c": []}]}
    assert parse_bundle(json.dumps(doc).encode()) == [cluster.root]
    # Only ignored keys: no root at all -- refused as the own bundle, a withdrawal of the
    # trust domain's X.509 trust as a federated one (as a bundle with no x509-svid key).
    for only in ({"use": "x509-svid", "x5c": []}, {"use": "x509-svid"}):
        data = json.dumps({"keys": [only]}).encode()
        with pytest.raises(ValueError, match="no key with"):
            parse_bundle(data)
        assert parse_bundle(data, allow_empty=True) == []


@pytest.mark.parametrize("doc, says", [
    (b"{not json", "not valid JSON"),
    (b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON: nested deeper"),
    (b'{"keys": [], "keys": []}', "not valid JSON: member 'keys' appears twice"),
    (b'{"keys": [{"use": "x509-svid", "use": "jwt-svid"}]}', "appears twice"),
    (b'{"keys": [NaN]}', "not valid JSON: NaN"),
    (b'{"nokeys": []}', "'keys' list"),
    (b'{"keys": {}}', "'keys' list"),
    (b'{"keys": [1]}', "not an object"),
    (b'{"keys": [{"use": "x509-svid", "x5c": "AAAA"}]}', "list of base64"),
    (b'{"keys": [{"use": "x509-svid", "x5c": [7]}]}', "list of base64"),
    (b'{"keys": [{"use": "x509-svid", "x5c": ["a", "b"]}]}', "base64 DER"),
    (b'{"keys": [{"use": "x509-svid", "x5c": ["%%%"]}]}', "base64 DER"),
    (b'{"keys": [{"use": "x509-svid", "x5c": ["' + base64.b64encode(b"junk") + b'"]}]}',
     "base64 DER"),
])
def test_broken_spiffe_bundles_are_refused_with_the_reason(tmp_path, doc, says) -> None:
    with pytest.raises(ValueError, match=says):
        parse_bundle(doc)
    path = tmp_path / "b.json"
    path.write_bytes(doc)
    with pytest.raises(SvidError) as err:
        load_bundle(PARTNER, str(path))
    assert err.value.rule == RULE_BUNDLE_INVALID and err.value.file == str(path)


# Documents that hold no X.509 root at all (found by a hostile review: refused as broken, so
# the last roots stayed in force and a partner's only CA could not be withdrawn).
EMPTY_BUNDLES = [b"", b"\n  \n", b'{"keys": []}',
                 b'{"keys": [{"use": "jwt-svid", "kty": "EC"}]}',
                 b'  {"keys": [], "spiffe_sequence": 7}']


@pytest.mark.parametrize("doc", EMPTY_BUNDLES)
def test_an_empty_federated_bundle_withdraws_the_trust_domains_roots(cas, tmp_path,
                                                                      doc) -> None:
    cluster, partner = cas
    with pytest.raises(ValueError):  # never for the own bundle
        parse_bundle(doc)
    path = tmp_path / "partner.json"
    path.write_bytes(doc)
    empty = load_bundle(PARTNER, str(path))
    assert empty.roots == () and empty.root_ders == frozenset()
    trust = store(cas).with_bundle(empty, 1)
    assert partner.bundle_pem not in trust.all_roots_pem
    with pytest.raises(SvidError) as err:
        trust.check_peer(sid(PARTNER), chain_of(partner, sid(PARTNER)), time.time())
    assert err.value.rule == RULE_TRUST_DOMAIN_NOT_FEDERATED
    trust.check_peer(sid(CLUSTER), chain_of(cluster, sid(CLUSTER)), time.time())


def test_a_root_naming_another_trust_domain_is_refused_in_a_bundle(cas) -> None:
    cluster, partner = cas
    with pytest.raises(SvidError) as err:
        bundle_from_certs(CLUSTER, "ca.crt", [cluster.root, partner.root])
    assert err.value.rule == RULE_TRUST_DOMAIN_MISMATCH
    assert "identity.trust_domains" in str(err.value)


def test_own_trust_domain_cannot_be_listed_as_federated(cas) -> None:
    cluster, _ = cas
    own = bundle_from_certs(CLUSTER, "own.pem", [cluster.root])
    with pytest.raises(SvidError, match="own"):
        TrustStore.build(own, [bundle_from_certs(CLUSTER, "again.pem", [cluster.root])])


# -- the rule ---------------------------------------------------------------------------------

def test_each_domain_accepts_its_own_roots(cas) -> None:
    cluster, partner = cas
    s = store(cas)
    s.check_peer(sid(CLUSTER), chain_of(cluster, sid(CLUSTER)), time.time())
    s.check_peer(sid(PARTNER), chain_of(partner, sid(PARTNER)), time.time())


@pytest.mark.parametrize("issuer, td", [(1, CLUSTER), (0, PARTNER)],
                         ids=["partner-issues-cluster-id", "cluster-issues-partner-id"])
def test_cross_domain_issuance_is_refused(cas, issuer, td) -> None:
    ca = cas[issuer]
    with pytest.raises(SvidError) as err:
        store(cas).check_peer(sid(td), chain_of(ca, sid(td)), time.time())
    assert err.value.rule == RULE_TRUST_DOMAIN_MISMATCH


def test_unlisted_domain_is_not_federated(cas) -> None:
    cluster, partner = cas
    with pytest.raises(SvidError) as err:
        store(cas, federate=False).check_peer(sid(PARTNER), chain_of(partner, sid(PARTNER)),
                                              time.time())
    assert err.value.rule == RULE_TRUST_DOMAIN_NOT_FEDERATED


def test_sent_chain_is_tried_when_openssl_chose_another_anchor(cas) -> None:
    """An intermediate of the cluster CA: OpenSSL's chain reported as ending elsewhere (as it
    may with cross-signing) is re-verified against the domain's own roots only."""
    cluster, partner = cas
    inter = cluster.new_intermediate()
    leaf = inter.issue(sid(CLUSTER)).cert
    sent = (der(leaf), der(inter.cert))
    s = store(cas)
    s.check_peer(sid(CLUSTER), PeerChain((der(leaf), der(partner.root)), sent), time.time())
    with pytest.raises(SvidError):  # and without the intermediate it cannot be built
        s.check_peer(sid(CLUSTER), PeerChain((der(leaf), der(partner.root)), sent[:1]),
                     time.time())
    with pytest.raises(SvidError):  # no chain at all (old Python): fail closed
        s.check_peer(sid(CLUSTER), PeerChain((), ()), time.time())


def test_replacing_a_bundle_keeps_the_others_and_moves_the_generation(cas) -> None:
    cluster, partner = cas
    s = store(cas)
    other = DevCA.create(PARTNER)
    s2 = s.with_bundle(bundle_from_certs(PARTNER, "p.json", [other.root]), 7)
    assert s2.generation == 7 and s2.own == CLUSTER
    s2.check_peer(sid(CLUSTER), chain_of(cluster, sid(CLUSTER)), time.time())
    with pytest.raises(SvidError):
        s2.check_peer(sid(PARTNER), chain_of(partner, sid(PARTNER)), time.time())
    s2.check_peer(sid(PARTNER), chain_of(other, sid(PARTNER)), time.time())


# -- config -----------------------------------------------------------------------------------

BASE = """\
identity:
  cert: tls.crt
  key: tls.key
  bundle: ca.crt
{extra}inbound: {{listen: 127.0.0.1:1, app: 127.0.0.1:2}}
"""


def test_trust_domains_config(tmp_path) -> None:
    text = BASE.format(extra="  trust_domains:\n    partner.example: {bundle: p.json}\n")
    cfg = load_config(text, str(tmp_path / "s.yaml"))
    assert cfg.identity.trust_domains == (("partner.example", str(tmp_path / "p.json")),)


@pytest.mark.parametrize("extra, key", [
    ("  trust_domains: [a]\n", "identity.trust_domains"),
    ("  trust_domains:\n    Partner.Example: {bundle: p.json}\n",
     "identity.trust_domains.Partner.Example"),
    ("  trust_domains:\n    partner.example/x: {bundle: p.json}\n",
     "identity.trust_domains.partner.example/x"),
    ("  trust_domains:\n    partner.example: {}\n",
     "identity.trust_domains.partner.example.bundle"),
    ("  trust_domains:\n    partner.example: {bundle: p.json, url: x}\n",
     "identity.trust_domains.partner.example.url"),
])
def test_bad_trust_domains_name_line_and_key(extra, key) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(BASE.format(extra=extra), "s.yaml")
    keys = {p.key for p in err.value.problems}
    assert key in keys, keys
    assert all(p.line >= 5 for p in err.value.problems)


def test_lifetime_limits_config() -> None:
    cfg = load_config(BASE.format(extra="") + "limits: {max_connection_age: 10m}\n", "s.yaml")
    assert cfg.limits.max_connection_age == 600 and cfg.limits.connection_age_jitter == 60
    cfg = load_config(BASE.format(extra="") + "limits: {max_connection_age: 0}\n", "s.yaml")
    assert cfg.limits.max_connection_age == 0
    with pytest.raises(ConfigError) as err:
        load_config(BASE.format(extra="")
                    + "limits: {max_connection_age: 1m, max_connection_age_jitter: 2m}\n",
                    "s.yaml")
    assert [p.key for p in err.value.problems] == ["limits.max_connection_age_jitter"]
