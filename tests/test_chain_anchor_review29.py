"""The chain check anchored where the handshake does not (found by the twenty-ninth session's
hostile review of identities and trust over time).

The handshake's OpenSSL (no X509_V_FLAG_PARTIAL_CHAIN) anchors a chain only at a self-signed
certificate of the bundle and takes an issuer only when the child's authority key identifier
agrees with it; it also holds a leaf's host-like commonName to the chain's DNS name
constraints. ``svid.verify_chain`` (cryptography's path builder) took ANY bundle certificate
as an anchor -- an intermediate the bundle lists -- ignored the key identifiers and the
commonName. It is what ``TrustStore.check_peer`` verifies a chain with again (a bundle
change, a pooled connection's reuse), what ``load_svid`` takes ``Svid.trust_ends`` from, and
what a bundle's roots are judged with, so:

* a partner re-issuing the intermediate its bundle lists (same key and name) made the
  re-check anchor at it: the root's notAfter fell out of the connection's trust end, and the
  open connection outlived the root while new ones were refused;
* a root withdrawn while its intermediate stayed listed (or replaced by one with the same
  name and key and another key identifier) ended new connections, not open or pooled ones;
* an own ``tls.crt`` of leaf + intermediate with a bundle listing root and intermediate got a
  ``trust_ends`` without the root: no ``own_cert_expired`` cut, /readyz 200, the expiry
  metric wrong.

The families, as data:

(1) in process, a differential against a real OpenSSL verification (an in-memory handshake
    with the sidecar's own client context): every chain a peer sends x every bundle shape,
    the authority-key-identifier variants, the commonName / name-constraint variants and a
    root whose own signature does not verify (OpenSSL does not check it). For each: the
    verdict and the chain's trust end of ``verify_chain``, of ``check_peer`` re-verifying
    what the peer sent and taking the handshake's chain, and of ``load_svid`` as an own SVID
    equal OpenSSL's.
(2) through real sidecars, the review's scenarios (``WORLD``): a federated bundle losing its
    root while its intermediate stays (inbound, outbound pooled), the own bundle losing it
    (the set fails, the root is withdrawn), the own root re-issued with another key
    identifier, a partner re-issuing the listed intermediate before its root expires (PEM
    and SPIFFE JSON bundles), and an own root that expires first while the bundle lists the
    intermediate. The controls: a peer and an upstream under the partner's other root, a peer
    under a long-lived root of the re-issuing partner (kept), and a partner that changes
    nothing (cut at its root's expiry, as the re-issuing ones now are).

Found while fixing, and in the family: OpenSSL builds the chain trusted-first and does not
go back -- once a certificate of the bundle may issue the top of the chain it takes it and
goes on through the bundle only, so a listed intermediate that names the right key but
chains to no root of the bundle (``R+I_aki``) fails a peer that sends a good intermediate;
the chain check, which found the other path, accepted it.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity import svid
from sidecar.identity.bundle import spiffe_bundle_json
from sidecar.identity.svid import SvidError, load_svid, verify_chain
from sidecar.identity.tls import client_context, memory_files
from sidecar.identity.trust import PeerChain, TrustStore, bundle_from_certs
from tests.harness import (
    TD,
    Pki,
    ScriptedServer,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    read_head,
    replace_file,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    wait_ready,
)
from tests.test_trust_review28 import _get

pytestmark = pytest.mark.usefixtures("no_internal_errors")

DAY = 86400.0
KU_CA = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
KU_LEAF = x509.KeyUsage(True, False, False, False, False, False, False, False, False)


# --- certificates -----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _aki(key: ec.EllipticCurvePrivateKey) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())


def ca_cert(td: str, subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
            signer: ec.EllipticCurvePrivateKey, *, ends: float,
            ski: x509.SubjectKeyIdentifier | None = None,
            aki: x509.AuthorityKeyIdentifier | None = None, serial: int | None = None,
            nc: x509.NameConstraints | None = None) -> x509.Certificate:
    """A CA certificate of ``td`` (SPIFFE ID without a path); ``aki`` None: none."""
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
         .not_valid_before(_utc(time.time() - 3600)).not_valid_after(_utc(ends))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(KU_CA, critical=True)
         .add_extension(ski or _ski(key), critical=False)
         .add_extension(x509.SubjectAlternativeName(
             [x509.UniformResourceIdentifier(f"spiffe://{td}")]), critical=False))
    if aki is not None:
        b = b.add_extension(aki, critical=False)
    if nc is not None:
        b = b.add_extension(nc, critical=True)
    return b.sign(signer, hashes.SHA256())


def root(td: str, cn: str, *, ends: float, key: ec.EllipticCurvePrivateKey | None = None,
         ski: x509.SubjectKeyIdentifier | None = None,
         nc: x509.NameConstraints | None = None) -> Ca:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return Ca(ca_cert(td, _name(cn), _name(cn), key, key, ends=ends, ski=ski, nc=nc), key)


def intermediate(td: str, cn: str, above: Ca, *, ends: float,
                 key: ec.EllipticCurvePrivateKey | None = None,
                 aki: x509.AuthorityKeyIdentifier | None = None) -> Ca:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return Ca(ca_cert(td, _name(cn), above.cert.subject, key, above.key, ends=ends,
                      aki=aki or _aki(above.key)), key)


def leaf(above: Ca, spiffe_id: str, *, ends: float, cn: str = "w", dns: tuple[str, ...] = (),
         aki: x509.AuthorityKeyIdentifier | None | str = "auto",
         key: ec.EllipticCurvePrivateKey | None = None) -> tuple[x509.Certificate, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    sans += [x509.DNSName(d) for d in dns]
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(above.cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(_utc(time.time() - 600)).not_valid_after(_utc(ends))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(KU_LEAF, critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
         .add_extension(x509.SubjectAlternativeName(sans), critical=False))
    if aki == "auto":
        b = b.add_extension(_aki(above.key), critical=False)
    elif isinstance(aki, x509.AuthorityKeyIdentifier):
        b = b.add_extension(aki, critical=False)
    return b.sign(above.key, hashes.SHA256()), key


def reissued(cert: x509.Certificate, signer: Any, *, ski: x509.SubjectKeyIdentifier | None = None,
             aki: x509.AuthorityKeyIdentifier | None = None,
             ends: float | None = None) -> x509.Certificate:
    """``cert`` again with a new serial (same name and key), optionally another subject key
    identifier, authority key identifier or end, signed by ``signer``."""
    b = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
         .public_key(cert.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(cert.not_valid_before_utc)
         .not_valid_after(_utc(ends) if ends is not None else cert.not_valid_after_utc))
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectKeyIdentifier) and ski is not None:
            value = ski
        if isinstance(value, x509.AuthorityKeyIdentifier) and aki is not None:
            value = aki
        b = b.add_extension(value, critical=ext.critical)
    return b.sign(signer, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: Any) -> bytes:
    out: bytes = key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return out


def der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def ends_of(chain: list[x509.Certificate]) -> float:
    return min(c.not_valid_after_utc.timestamp() for c in chain)


# --- (1) the differential: verify_chain against the handshake's OpenSSL -----------------------

PEER = spiffe("frontend")


@dataclass
class Pieces:
    """One PKI of the own trust domain, every certificate a member may send or list: the
    root ends first (2 days), so a chain's trust end says whether it reached the root."""

    certs: dict[str, x509.Certificate] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)  # a leaf's name -> its key
    cas: dict[str, Ca] = field(default_factory=dict)


@functools.cache
def pieces() -> Pieces:
    now = time.time()
    p = Pieces()
    r = root(TD, "own root", ends=now + 2 * DAY)
    i = intermediate(TD, "own intermediate", r, ends=now + 5 * DAY)
    p.cas |= {"R": r, "I": i}
    p.certs |= {
        "R": r.cert, "I": i.cert,
        # R again: same name and key, another subject key identifier (the review's "reissued")
        "R_ski": reissued(r.cert, r.key, ski=x509.SubjectKeyIdentifier(os.urandom(20)),
                          ends=now + 3 * DAY),
        # R again with the same identifiers (a renewal): the same anchor to OpenSSL
        "R_same": reissued(r.cert, r.key),
        # I re-issued by its partner (same key, name and identifiers, a new serial)
        "I2": reissued(i.cert, r.key),
        # I re-issued with an authority key identifier that names no key of R
        "I_aki": reissued(i.cert, r.key, aki=x509.AuthorityKeyIdentifier(
            os.urandom(20), None, None)),
    }
    for name, above in (("L", i), ("L0", r)):
        p.certs[name], p.keys[name] = leaf(above, PEER, ends=now + 10 * DAY)
    # A root whose own signature is not its key's (subject = issuer, no key identifiers):
    # OpenSSL takes it as self-signed without verifying it, and so must the chain check.
    jkey, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    junk = Ca(ca_cert(TD, _name("junk-signed root"), _name("junk-signed root"), jkey, other,
                      ends=now + 4 * DAY), jkey)
    p.certs["J"] = junk.cert
    p.certs["LJ"], p.keys["LJ"] = leaf(junk, PEER, ends=now + 10 * DAY)
    return p


# What a peer sends (its leaf first) x what the bundle lists.
SENT = {"leaf": ["L"], "leaf+I": ["L", "I"], "leaf+I+R": ["L", "I", "R"],
        "leaf+I2": ["L", "I2"], "root-leaf": ["L0"], "root-leaf+R": ["L0", "R"],
        "junk-root-leaf": ["LJ"]}
BUNDLES = {"R": ["R"], "R+I": ["R", "I"], "I": ["I"], "R_ski": ["R_ski"],
           "R_ski+I": ["R_ski", "I"], "R+R_ski": ["R", "R_ski"], "R_ski+R": ["R_ski", "R"],
           "R_same+I": ["R_same", "I"], "R+I2": ["R", "I2"], "I2": ["I2"],
           "R+I_aki": ["R", "I_aki"], "R_ski+R_same": ["R_ski", "R_same"], "J": ["J"]}
CROSS = [(s, b) for s in SENT for b in BUNDLES]
# A few members whose verdict is the premise of the review (OpenSSL's, checked first).
PREMISES = {("leaf", "R+I"): True, ("leaf", "I"): False, ("leaf+I", "I"): False,
            ("leaf+I+R", "I"): False, ("root-leaf", "R_ski"): False,
            ("root-leaf", "R_ski+R"): True, ("leaf", "R+I_aki"): False,
            ("leaf", "R+I2"): True, ("leaf+I2", "I2"): False, ("junk-root-leaf", "J"): True,
            ("leaf+I", "R+I_aki"): False}


@functools.cache
def _own_svid(tmp: str) -> Any:
    pki = Pki(Path(tmp) / "pki")
    d = pki.identity("orders")
    return load_svid(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt"), time.time())


class _Files:
    def __init__(self, root_dir: Path) -> None:
        self.root = root_dir
        self.n = itertools.count()

    def write(self, data: bytes) -> str:
        path = self.root / f"f{next(self.n)}.pem"
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> _Files:
    return _Files(tmp_path_factory.mktemp("chains"))


# The handshakes made (what was sent, its key, the bundle -> what OpenSSL verified): the same
# one is asked about by a member's own test and again by its family's checks (not vacuous,
# the store order), and its verdict depends on those inputs only; made once a module run.
_HANDSHAKES: dict[tuple[bytes, bytes, bytes], tuple[x509.Certificate, ...] | None] = {}
# the sidecar's client contexts, one per bundle (as the sidecar makes one per bundle in force
# and dials with it again and again; each handshake verifies the chain anew)
_CLIENTS: dict[tuple[str, bytes], ssl.SSLContext] = {}


def openssl_chain(files: _Files, sent: list[x509.Certificate], key: Any,
                  bundle: list[x509.Certificate]) -> list[x509.Certificate] | None:
    """The chain the sidecar's own client context (``tls.client_context``: the handshake's
    OpenSSL, its flags) verifies when a server presents ``sent``, with ``bundle`` as its
    roots; None when it refuses it. An in-memory handshake."""
    made = (pem(*sent), key_pem(key), pem(*bundle))
    if made not in _HANDSHAKES:
        chain = _handshake(files, *made)
        _HANDSHAKES[made] = None if chain is None else tuple(chain)
    verified = _HANDSHAKES[made]
    return None if verified is None else list(verified)


def _handshake(files: _Files, sent_pem: bytes, key: bytes,
               roots: bytes) -> list[x509.Certificate] | None:
    client = _CLIENTS.get((str(files.root), roots))
    if client is None:
        client = _CLIENTS[str(files.root), roots] = client_context(
            _own_svid(str(files.root)), alpn=(), roots_pem=roots)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with memory_files(sent_pem, key) as (chain_path, key_path):
        server.load_cert_chain(chain_path, key_path)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client.wrap_bio(bios[0], bios[1])
    s = server.wrap_bio(bios[2], bios[3], server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, end, out, into in (("c", c, bios[1], bios[2]), ("s", s, bios[3], bios[0])):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLCertVerificationError:
                    return None
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    if name == "c":
                        raise
                    done[name] = True  # (the server, after the client's alert)
            if data := out.read():
                into.write(data)
        if done["c"]:
            break
    assert done["c"], "the in-memory handshake did not finish"
    chain = c._sslobj.get_verified_chain()  # type: ignore[attr-defined]
    return [x509.load_der_x509_certificate(x.public_bytes(2)) for x in chain]


def ours(sent: list[x509.Certificate], bundle: list[x509.Certificate]
         ) -> list[x509.Certificate] | None:
    try:
        return verify_chain(sent[0], sent[1:], bundle, time.time())
    except SvidError:
        return None


def _agree(files: _Files, sent: list[x509.Certificate], key: Any,
           bundle: list[x509.Certificate], premise: bool | None = None) -> None:
    """verify_chain, check_peer (re-verifying what was sent; taking the handshake's chain)
    and load_svid judge ``sent`` under ``bundle`` as the handshake's OpenSSL does, and end
    its trust when the chain OpenSSL verified ends."""
    theirs = openssl_chain(files, sent, key, bundle)
    if premise is not None:
        assert (theirs is not None) == premise, "the premise: OpenSSL's verdict"
    mine = ours(sent, bundle)
    assert (mine is not None) == (theirs is not None), \
        f"verify_chain {'accepts' if mine else 'refuses'}, the handshake " \
        f"{'accepts' if theirs else 'refuses'}"
    now = time.time()
    store = TrustStore.build(bundle_from_certs(TD, "bundle.pem", bundle))
    sent_ders = tuple(der(c) for c in sent)
    if theirs is None:
        with pytest.raises(SvidError):
            store.check_peer(PEER, PeerChain((), sent_ders), now)
    else:
        assert mine is not None
        assert der(mine[-1]) in {der(c) for c in bundle}
        assert mine[-1].public_key() == theirs[-1].public_key(), "another anchor"
        assert ends_of(mine) == ends_of(theirs), "the trust end is not the handshake chain's"
        assert store.check_peer(PEER, PeerChain((), sent_ders), now) == ends_of(theirs)
        handshake = tuple(der(c) for c in theirs)
        assert store.check_peer(PEER, PeerChain(handshake, sent_ders), now) == ends_of(theirs)
    # As an own SVID: tls.crt = what was sent, ca.crt = the bundle.
    d = files.root / f"own{next(files.n)}"
    d.mkdir()
    (d / "tls.crt").write_bytes(pem(*sent))
    (d / "tls.key").write_bytes(key_pem(key))
    (d / "ca.crt").write_bytes(pem(*bundle))
    args = (str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt"), now)
    if theirs is None:
        with pytest.raises(SvidError):
            load_svid(*args)
    else:
        assert load_svid(*args).trust_ends == ends_of(theirs)


@pytest.mark.parametrize(("sent", "bundle"), CROSS, ids=[f"{s}-{b}" for s, b in CROSS])
def test_every_chain_under_every_bundle_shape_as_the_handshake(files: _Files, sent: str,
                                                                bundle: str) -> None:
    """A bundle's intermediate is no anchor; a bundle without a self-signed root verifies
    nothing; an issuer whose key identifier the child's AKI does not name is no issuer; the
    trust end is that of the chain to the self-signed root."""
    p = pieces()
    chain = [p.certs[n] for n in SENT[sent]]
    _agree(files, chain, p.keys[SENT[sent][0]], [p.certs[n] for n in BUNDLES[bundle]],
           PREMISES.get((sent, bundle)))


def test_the_cross_product_is_not_vacuous(files: _Files) -> None:
    """Both verdicts occur, and a chain completed from a listed intermediate ends with its
    root (the review's first finding in one line)."""
    p = pieces()
    verdicts = {openssl_chain(files, [p.certs[n] for n in SENT[s]], p.keys[SENT[s][0]],
                              [p.certs[n] for n in BUNDLES[b]]) is not None for s, b in CROSS}
    assert verdicts == {True, False}
    built = ours([p.certs["L"]], [p.certs["R"], p.certs["I"]])
    assert built is not None and ends_of(built) == p.certs["R"].not_valid_after_utc.timestamp()


# Authority key identifier variants of a leaf issued by R (bundle: R, or R with its twin of
# another SKI in either order): the key identifier, the serial and the directory name it
# names, each right or wrong; a directory name spelled in another case and spacing is the
# same name to OpenSSL (X509_NAME_cmp).
def _aki_members() -> dict[str, tuple[x509.AuthorityKeyIdentifier | None, bool]]:
    p = pieces()
    r = p.certs["R"]
    right_id = r.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    def named(name: x509.Name, serial: int, keyid: bytes | None = right_id
              ) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier(keyid, [x509.DirectoryName(name)], serial)

    respelled = _name("  OWN   Root ")
    return {
        "none": (None, True),
        "key-id": (x509.AuthorityKeyIdentifier(right_id, None, None), True),
        "other-key-id": (x509.AuthorityKeyIdentifier(os.urandom(20), None, None), False),
        "issuer-and-serial": (named(r.issuer, r.serial_number, None), True),
        "all-three": (named(r.issuer, r.serial_number), True),
        "other-serial": (named(r.issuer, r.serial_number + 1), False),
        "other-issuer": (named(_name("someone else"), r.serial_number), False),
        "issuer-respelled": (named(respelled, r.serial_number), True),
    }


AKI_MEMBERS = list(_aki_members())
AKI_BUNDLES = {"R": ["R"], "R+R_ski": ["R", "R_ski"], "R_ski+R": ["R_ski", "R"]}
AKI_CASES = [(m, b) for m in AKI_MEMBERS for b in AKI_BUNDLES]


@pytest.mark.parametrize(("member", "bundle"), AKI_CASES,
                         ids=[f"{m}-{b}" for m, b in AKI_CASES])
def test_authority_key_identifiers_as_the_handshake(files: _Files, member: str,
                                                    bundle: str) -> None:
    """A path builder that ignores the AKI took a twin root (same name and key, another key
    identifier) OpenSSL refuses; an AKI naming the right root in any way takes it, whichever
    of the twins the bundle lists first."""
    p = pieces()
    aki, premise = _aki_members()[member]
    cert, key = leaf(p.cas["R"], PEER, ends=time.time() + 10 * DAY, aki=aki)
    _agree(files, [cert], key, [p.certs[n] for n in AKI_BUNDLES[bundle]], premise)


# A leaf's commonName under DNS name constraints (on the root, or on an intermediate): a
# host-like one (cn2dnsid: two labels or more, letters, digits, "_", inner "-" and ".") is
# held to them unless the leaf has a DNS SAN; others are not names to OpenSSL.
NC_MEMBERS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "plain": ("w", (), True),
    "outside": ("evil.example.org", (), False),
    "outside-mixed-case": ("Evil.Example.ORG", (), False),
    "within": ("api.partner.example", (), True),
    "within-mixed-case": ("API.Partner.Example", (), True),
    "the-base-itself": ("partner.example", (), True),
    "suffix-not-a-label": ("evilpartner.example", (), False),
    "excluded": ("x.partner.example", (), False),
    "under-excluded": ("a.x.partner.example", (), False),
    "underscore": ("evil_host.example.org", (), False),
    "dotted-quad": ("10.0.0.1", (), False),
    "trailing-dot": ("evil.example.org.", (), True),
    "leading-hyphen": ("-evil.example.org", (), True),
    "double-dot": ("evil..example.org", (), True),
    "non-ascii": ("\u00e9vil.example.org", (), True),
    "one-label": ("localhost", (), True),
    "with-a-dns-san": ("evil.example.org", ("api.partner.example",), True),
}
NC_WHERE = ["root", "intermediate"]
NC_CASES = [(m, w) for m in NC_MEMBERS for w in NC_WHERE]


@functools.cache
def _nc_cas() -> dict[str, Ca]:
    now = time.time()
    nc = x509.NameConstraints(permitted_subtrees=[x509.DNSName("partner.example")],
                              excluded_subtrees=[x509.DNSName("x.partner.example")])
    constrained = root(TD, "constrained root", ends=now + 3 * DAY, nc=nc)
    plain = root(TD, "plain root", ends=now + 3 * DAY)
    key = ec.generate_private_key(ec.SECP256R1())
    below = Ca(ca_cert(TD, _name("constrained intermediate"), plain.cert.subject, key, plain.key,
                       ends=now + 2 * DAY, aki=_aki(plain.key), nc=nc), key)
    return {"root": constrained, "intermediate": below, "plain": plain}


@pytest.mark.parametrize(("member", "where"), NC_CASES, ids=[f"{m}-{w}" for m, w in NC_CASES])
def test_a_leaf_common_name_under_dns_name_constraints_as_the_handshake(
        files: _Files, member: str, where: str) -> None:
    """cryptography applies name constraints to subjectAltNames only; OpenSSL holds a leaf
    without a DNS SAN to them by its host-like commonName too."""
    cn, dns, premise = NC_MEMBERS[member]
    cas = _nc_cas()
    cert, key = leaf(cas[where], PEER, ends=time.time() + 10 * DAY, cn=cn, dns=dns)
    sent = [cert] if where == "root" else [cert, cas[where].cert]
    bundle = [cas["root"].cert] if where == "root" else [cas["plain"].cert]
    _agree(files, sent, key, bundle, premise)


# Same-named CAs (found by the hostile review of the fix above): two self-signed roots with
# one subject and their own keys, the certificate below carrying no authority key identifier
# (or the roots no subject key identifier): OpenSSL takes the first of them in its store --
# the bundle's order -- that may issue it and is valid now (else the one that expires last),
# and does not try the other when the signature fails. verify_chain tried each, so with the
# bundle [other root, signing root] it accepted what every handshake refuses, and took a
# trust end from a chain OpenSSL never builds. The family, as data: the other root's key
# (another; the signer's own, a renewal) x its validity (valid, expired, not yet valid) x
# the key identifiers (the child's AKI, the roots' SKIDs, each present or not) x the order of
# the same-named certificates in the bundle x how the leaf reaches the roots (directly; via
# an intermediate it sends; via one the bundle lists; via one of two same-named
# intermediates the bundle lists, each under its own root).
SAME_OTHER = ["other-key", "same-key"]
SAME_TIME = ["valid", "expired", "future"]
SAME_IDS = {"aki+skid": (True, True), "skid-only": (False, True), "aki-only": (True, False),
            "neither": (False, False)}
SAME_ORDER = ["other-first", "signer-first"]
SAME_PATH = ["direct", "sent-I", "bundle-I", "twin-I"]
SAME_CASES = [(o, t, i, r, p) for o in SAME_OTHER for t in SAME_TIME for i in SAME_IDS
              for r in SAME_ORDER for p in SAME_PATH]
# The review's shapes (OpenSSL's verdict, checked first).
SAME_PREMISES = {("other-key", "valid", "skid-only", "other-first", "direct"): False,
                 ("other-key", "valid", "skid-only", "signer-first", "direct"): True,
                 ("other-key", "valid", "aki-only", "other-first", "direct"): False,
                 ("other-key", "valid", "aki+skid", "other-first", "direct"): True,
                 ("other-key", "expired", "neither", "other-first", "direct"): True,
                 ("same-key", "valid", "neither", "other-first", "direct"): True}


def _same_name_ca(cn: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
                  signer: ec.EllipticCurvePrivateKey, *, start: float, end: float, ski: bool,
                  aki: bool) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(_utc(start)).not_valid_after(_utc(end))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(KU_CA, critical=True)
         .add_extension(x509.SubjectAlternativeName(
             [x509.UniformResourceIdentifier(f"spiffe://{TD}")]), critical=False))
    if ski:
        b = b.add_extension(_ski(key), critical=False)
    if aki:
        b = b.add_extension(_aki(signer), critical=False)
    return b.sign(signer, hashes.SHA256())


@functools.cache
def _same_name_pki(other: str, when: str, ids: str, path: str
                   ) -> tuple[list[x509.Certificate], Any, list[x509.Certificate],
                              list[dict[str, x509.Certificate]]]:
    """(what the peer sends, its key, the bundle's other certificates, its same-named
    pairs -- {"signer": .., "other": ..}, roots first) of one member, in either order."""
    now = time.time()
    child_aki, root_ski = SAME_IDS[ids]
    signer_key = ec.generate_private_key(ec.SECP256R1())
    other_key = signer_key if other == "same-key" else ec.generate_private_key(ec.SECP256R1())
    span = {"valid": (now - 3600, now + 4 * DAY), "expired": (now - 9 * DAY, now - DAY),
            "future": (now + DAY, now + 9 * DAY)}[when]
    roots = {"signer": _same_name_ca("same-name root", _name("same-name root"), signer_key,
                                     signer_key, start=now - 3600, end=now + 2 * DAY,
                                     ski=root_ski, aki=False),
             "other": _same_name_ca("same-name root", _name("same-name root"), other_key,
                                    other_key, start=span[0], end=span[1], ski=root_ski,
                                    aki=False)}
    if path == "direct":
        cert, key = leaf(Ca(roots["signer"], signer_key), PEER, ends=now + 10 * DAY,
                         aki="auto" if child_aki else None)
        return [cert], key, [], [roots]
    # An intermediate under the signing root (its AKI as the member says); for "twin-I" a
    # second one of the same name under the other root, with its own key.
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _same_name_ca("same-name intermediate", _name("same-name root"), inter_key,
                          signer_key, start=now - 3600, end=now + 3 * DAY, ski=True,
                          aki=child_aki)
    if path == "twin-I":
        twin = _same_name_ca("same-name intermediate", _name("same-name root"),
                             ec.generate_private_key(ec.SECP256R1()), other_key,
                             start=now - 3600, end=now + 3 * DAY, ski=True, aki=child_aki)
        cert, key = leaf(Ca(inter, inter_key), PEER, ends=now + 10 * DAY, aki=None)
        return [cert], key, [], [roots, {"signer": inter, "other": twin}]
    cert, key = leaf(Ca(inter, inter_key), PEER, ends=now + 10 * DAY,
                     aki="auto" if child_aki else None)
    if path == "sent-I":
        return [cert, inter], key, [], [roots]
    return [cert], key, [inter], [roots]


def _same_name_member(other: str, when: str, ids: str, order: str, path: str
                      ) -> tuple[list[x509.Certificate], Any, list[x509.Certificate]]:
    """(what the peer sends, its key, the bundle) of one member: the same certificates in
    either order."""
    sent, key, rest, pairs = _same_name_pki(other, when, ids, path)
    kinds = ("other", "signer") if order == "other-first" else ("signer", "other")
    bundle = [pair[k] for pair in pairs for k in kinds]
    return sent, key, bundle[:2] + rest + bundle[2:]


@pytest.mark.parametrize(("other", "when", "ids", "order", "path"), SAME_CASES,
                         ids=["-".join(c) for c in SAME_CASES])
def test_same_named_cas_as_the_handshake(files: _Files, other: str, when: str, ids: str,
                                         order: str, path: str) -> None:
    """Of two same-named CAs that may issue a certificate, the chain check takes the one
    OpenSSL takes -- the first valid one the bundle lists -- and only it: the verdict and
    the trust end are those of the handshake's chain in every order."""
    sent, key, bundle = _same_name_member(other, when, ids, order, path)
    _agree(files, sent, key, bundle, SAME_PREMISES.get((other, when, ids, order, path)))


def test_the_same_name_family_is_not_vacuous(files: _Files) -> None:
    """The order decides: for each way to the roots, some member the handshake accepts in
    one order and refuses in the other."""
    for path in SAME_PATH:
        flips = 0
        for other, when, ids in itertools.product(SAME_OTHER, SAME_TIME, SAME_IDS):
            verdicts = set()
            for order in SAME_ORDER:
                sent, key, bundle = _same_name_member(other, when, ids, order, path)
                verdicts.add(openssl_chain(files, sent, key, bundle) is not None)
            flips += verdicts == {True, False}
        assert flips >= 1, path


@pytest.mark.parametrize("path", SAME_PATH)
def test_same_named_cas_where_the_store_order_is_unknown_fail_closed(
        files: _Files, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a C library whose sort does not keep the bundle's order (not glibc), which
    same-named CA OpenSSL takes is unknown: the chain check accepts only a chain that every
    pick verifies, so it accepts a member only when the handshake accepts it in both
    orders (and then it does), its trust end the earliest of them."""
    monkeypatch.setattr(svid, "STORE_KEEPS_BUNDLE_ORDER", False)
    for other, when, ids in itertools.product(SAME_OTHER, SAME_TIME, SAME_IDS):
        handshakes = {}
        for order in SAME_ORDER:
            sent, key, bundle = _same_name_member(other, when, ids, order, path)
            handshakes[order] = openssl_chain(files, sent, key, bundle)
        both = all(c is not None for c in handshakes.values())
        for order in SAME_ORDER:
            sent, key, bundle = _same_name_member(other, when, ids, order, path)
            mine = ours(sent, bundle)
            assert (mine is not None) == both, (other, when, ids, order)
            if mine is not None:
                assert ends_of(mine) == min(ends_of(c) for c in handshakes.values()
                                            if c is not None)


# --- (2) through real sidecars: the review's scenarios ----------------------------------------

LEAD = 20.0  # seconds from the certificates' making to the short roots' expiry
SETTLE = 2.5  # past an expiry: the once-a-second sweep, and the cut reaching the client
PARTNER = "partner.test"
# the federated domains of the re-issued intermediate run: a PEM bundle, a SPIFFE JSON one,
# and one whose file is left alone (the control: cut at its root's expiry all the same)
REISSUE_DOMAINS = {"pem": "pem.partner.test", "json": "json.partner.test",
                   "unchanged": "ctl.partner.test"}


class _KeepAliveUpstream(ScriptedServer):
    """An upstream presenting ``chain``: keep-alive 200s; ``ended`` counts the connections
    the sidecar closed, ``accepted`` those it opened."""

    timeout = 60.0

    def __init__(self, tmp: Path, chain: list[x509.Certificate], key: Any) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        (tmp / "chain.pem").write_bytes(pem(*chain))
        (tmp / "key.pem").write_bytes(key_pem(key))
        ctx.load_cert_chain(str(tmp / "chain.pem"), str(tmp / "key.pem"))
        self.accepted = 0
        self.ended = 0
        self.lock = threading.Lock()
        super().__init__(ctx)

    def serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
        try:
            while b"\r\n\r\n" in read_head(sock):
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except OSError:
            pass
        with self.lock:
            self.ended += 1


def _identity(tmp: Path, name: str, chain: list[x509.Certificate], key: Any,
              bundle: list[x509.Certificate]) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "tls.crt").write_bytes(pem(*chain))
    (d / "tls.key").write_bytes(key_pem(key))
    (d / "ca.crt").write_bytes(pem(*bundle))
    return d


def _connect(port: int, ident: Path, server_roots: Path) -> socket.socket:
    ctx = mtls_context(ident, server_roots)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))


def _fresh(port: int, ident: Path, server_roots: Path) -> int | None:
    """A new connection's first answer, None when the handshake or the connection fails."""
    try:
        with _connect(port, ident, server_roots) as sock:
            return _get(sock)
    except (OSError, ssl.SSLError):
        return None


@dataclass
class Member:
    sock: socket.socket | None = None
    before: int | None = None  # the answer on the connection before the change
    after: int | None = None  # ... after it (None: the sidecar ended it)
    fresh: int | None = None  # a new connection's answer after the change
    reasons: dict[str, float] = field(default_factory=dict)  # closures counted, by reason
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class World:
    members: dict[str, Member] = field(default_factory=dict)
    in_time: bool = False  # every change applied before the short roots expired


def _closed(proc: SidecarProc, direction: str, reason: str) -> float:
    return proc.metric("sidecar_connections_closed_total", direction=direction, reason=reason)


def _build_world(tmp: Path, procs: list[Any], closers: list[Callable[[], None]]) -> World:
    world = World()
    now = time.time()
    short = now + LEAD
    app, app_port = start_app(tmp)
    procs.append(app)
    caller = spiffe("frontend")

    def own_pki(name: str) -> tuple[Pki, Path]:
        pki = Pki(tmp / name)
        return pki, pki.identity("orders")

    def partner_peer(td: str, above: Ca, name: str, *, send: list[x509.Certificate],
                     ends: float = now + DAY) -> tuple[Path, str]:
        sid = spiffe("frontend", td=td)
        cert, key = leaf(above, sid, ends=ends)
        return _identity(tmp, name, [cert, *send], key, []), sid

    started: dict[str, SidecarProc] = {}

    def start(name: str, ident: Path, allow: list[str], trust: dict[str, Path] | None = None,
              outbound: list[dict[str, Any]] | None = None) -> None:
        cfg = sidecar_config(ident, inbound={"listen": f"127.0.0.1:{free_port()}",
                                             "app": f"127.0.0.1:{app_port}",
                                             "allow_from": allow},
                             outbound=outbound, limits={"idle_timeout": "120s",
                                                        "pool_idle_timeout": "120s"})
        if trust:
            cfg["identity"]["trust_domains"] = {td: {"bundle": str(p)} for td, p in trust.items()}
        proc = start_sidecar(tmp, name, cfg, wait=False)
        procs.append(proc)
        started[name] = proc

    # A: a federated bundle {P1, PI1, P2} loses P1 (PI1 stays): inbound and outbound pooled.
    p1 = root(PARTNER, "partner root 1", ends=now + 3 * DAY)
    pi1 = intermediate(PARTNER, "partner intermediate 1", p1, ends=now + 3 * DAY)
    p2 = root(PARTNER, "partner root 2", ends=now + 3 * DAY)
    a_pki, a_ident = own_pki("a")
    fed_file = tmp / "partner.pem"
    fed_file.write_bytes(pem(p1.cert, pi1.cert, p2.cert))
    fed_peer, fed_id = partner_peer(PARTNER, pi1, "fed-peer", send=[pi1.cert])
    ctl_peer, ctl_id = partner_peer(PARTNER, p2, "fed-ctl-peer", send=[])
    ups = {}
    for label, above, send in (("pooled", pi1, [pi1.cert]), ("pooled-control", p2, [])):
        cert, key = leaf(above, spiffe("billing", td=PARTNER), ends=now + DAY)
        (tmp / f"up-{label}").mkdir()
        ups[label] = _KeepAliveUpstream(tmp / f"up-{label}", [cert, *send], key)
        closers.append(ups[label].close)
    start("a", a_ident, [fed_id], {PARTNER: fed_file}, outbound=[
        {"name": label, "listen": f"127.0.0.1:{free_port()}",
         "upstream": f"127.0.0.1:{up.port}", "identity": spiffe("billing", td=PARTNER)}
        for label, up in ups.items()])

    # B: the own bundle {R, I} loses R (the set fails: R withdrawn, I still listed).
    b_pki, b_ident = own_pki("b")
    b_inter = b_pki.ca.new_intermediate()
    (b_ident / "ca.crt").write_bytes(b_pki.ca.bundle_pem + b_inter.cert_pem)
    b_peer = write_svid_chain(tmp / "b-peer", b_inter, caller)
    start("b", b_ident, [caller])

    # C: the own root R replaced by R' (same name and key, another key identifier).
    c_pki, c_ident = own_pki("c")
    c_peer = c_pki.identity("frontend")
    start("c", c_ident, [caller])

    # D: partners re-issue the intermediate their bundle lists (P short-lived, PI -> PI2).
    d_pki, d_ident = own_pki("d")
    d_files: dict[str, Path] = {}
    d_new: dict[str, bytes] = {}
    d_peers: dict[str, Path] = {}
    for label, td in REISSUE_DOMAINS.items():
        p = root(td, f"{label} root", ends=short)
        pi = intermediate(td, f"{label} intermediate", p, ends=now + 3 * DAY)
        long_root = root(td, f"{label} long root", ends=now + 3 * DAY)
        pi2 = reissued(pi.cert, p.key, ends=now + 4 * DAY)
        old, new = [p.cert, pi.cert, long_root.cert], [p.cert, pi2, long_root.cert]
        as_json = label == "json"
        d_files[label] = tmp / f"{label}.{'json' if as_json else 'pem'}"
        d_files[label].write_bytes(spiffe_bundle_json(old) if as_json else pem(*old))
        if label != "unchanged":
            d_new[label] = spiffe_bundle_json(new) if as_json else pem(*new)
        d_peers[label], _ = partner_peer(td, pi, f"d-{label}-peer", send=[])  # leaf only
        if label == "pem":
            d_peers["long-root"], _ = partner_peer(td, long_root, "d-long-peer", send=[])
    start("d", d_ident, [spiffe("frontend", td=td) for td in REISSUE_DOMAINS.values()],
          {td: d_files[label] for label, td in REISSUE_DOMAINS.items()})

    # E: the own chain is leaf + I, the own bundle lists R (short-lived) and I.
    e_root = root(TD, "own short root", ends=short)
    e_inter = intermediate(TD, "own intermediate", e_root, ends=now + 3 * DAY)
    e_cert, e_key = leaf(e_inter, spiffe("orders"), ends=now + 2 * DAY)
    e_ident = _identity(tmp, "e", [e_cert, e_inter.cert], e_key, [e_root.cert, e_inter.cert])
    e_partner = root(PARTNER, "partner root e", ends=now + 3 * DAY)
    (tmp / "e-partner.pem").write_bytes(pem(e_partner.cert))
    e_peer, e_id = partner_peer(PARTNER, e_partner, "e-peer", send=[])
    e_roots = tmp / "e-roots.pem"
    e_roots.write_bytes(pem(e_root.cert))
    start("e", e_ident, [e_id], {PARTNER: tmp / "e-partner.pem"})

    for proc in started.values():
        wait_ready(proc)
    a, b, c, d, e = (started[n] for n in "abcde")
    roots = {"a": Path(a_pki.bundle), "b": Path(b_pki.bundle), "c": Path(c_pki.bundle),
             "d": Path(d_pki.bundle), "e": e_roots}
    e_metric = e.metric("sidecar_certificate_expiry_timestamp_seconds")

    inbound = {"fed-inbound": (a, fed_peer, "a"), "fed-inbound-control": (a, ctl_peer, "a"),
               "own-withdrawn": (b, b_peer, "b"), "own-reissued": (c, c_peer, "c"),
               "own-root-expires": (e, e_peer, "e")}
    inbound |= {f"reissued-{label}": (d, d_peers[label], "d") for label in d_peers}
    for name, (proc, ident, which) in inbound.items():
        sock = _connect(proc.port("inbound"), ident, roots[which])
        closers.append(sock.close)
        world.members[name] = Member(sock, before=_get(sock),
                                     details={"proc": proc, "ident": ident, "roots": which})
    for label in ups:
        got = http(a.port(label), "GET", "/first", timeout=10).status
        world.members[f"fed-outbound-{label}"] = Member(before=got)
    world.members["own-root-expires"].details["metric"] = e_metric

    # The changes.
    replace_file(fed_file, pem(pi1.cert, p2.cert))  # P1 withdrawn, PI1 still listed
    replace_file(b_ident / "ca.crt", b_inter.cert_pem)  # R withdrawn, I still listed
    r_twin = reissued(c_pki.ca.root, c_pki.ca.key, ski=x509.SubjectKeyIdentifier(os.urandom(20)))
    replace_file(c_ident / "ca.crt", pem(r_twin))
    for label, data in d_new.items():
        replace_file(d_files[label], data)
    try:
        wait_for(lambda: _closed(a, "inbound", "peer_untrusted") >= 1
                 and _closed(b, "inbound", "peer_untrusted") >= 1
                 and _closed(c, "inbound", "peer_untrusted") >= 1
                 and d.metric("sidecar_certificate_reloads_total", result="ok") >= 2,
                 timeout=10)
    except TimeoutError:
        pass
    world.in_time = time.time() < short - 1
    for name, member in world.members.items():
        if "proc" not in member.details or name.startswith(("reissued-", "own-root")):
            continue
        proc = member.details["proc"]
        member.after = _get(member.sock) if member.sock is not None else None
        member.fresh = _fresh(proc.port("inbound"), member.details["ident"],
                              roots[member.details["roots"]])
        member.reasons = {"peer_untrusted": _closed(proc, "inbound", "peer_untrusted")}
    for label, up in ups.items():
        member = world.members[f"fed-outbound-{label}"]
        member.after = http(a.port(label), "GET", "/again", timeout=10).status
        member.details |= {"accepted": up.accepted, "ended": up.ended}
        member.reasons = {"peer_untrusted": _closed(a, "outbound", "peer_untrusted")}

    # The short roots expire.
    time.sleep(max(0.0, short - time.time()) + SETTLE)
    for name, member in world.members.items():
        if not name.startswith(("reissued-", "own-root")):
            continue
        proc = member.details["proc"]
        member.after = _get(member.sock) if member.sock is not None else None
        member.fresh = _fresh(proc.port("inbound"), member.details["ident"],
                              roots[member.details["roots"]])
        member.reasons = {r: _closed(proc, "inbound", r)
                          for r in ("peer_cert_expired", "own_cert_expired")}
    world.members["own-root-expires"].details["readyz"] = http(
        e.port("admin"), "GET", "/readyz", timeout=5).status
    world.members["own-root-expires"].details["root_ends"] = \
        e_root.cert.not_valid_after_utc.timestamp()
    return world


def write_svid_chain(out: Path, ca: Any, spiffe_id: str) -> Path:
    """An SVID from ``ca`` (a ``DevCA`` intermediate) whose tls.crt is leaf + intermediate."""
    from sidecar.identity.ca import write_svid

    return write_svid(ca.issue(spiffe_id), ca, out)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The run, once per module; every process started is stopped by pid, every socket and
    scripted server closed, at the end."""
    procs: list[Any] = []
    closers: list[Callable[[], None]] = []
    try:
        yield _build_world(tmp_path_factory.mktemp("world"), procs, closers)
    finally:
        for close in closers:
            try:
                close()
            except OSError:
                pass
        for p in reversed(procs):
            p.stop(timeout=10)


# member -> (what the connection open before the change gets after it, a new connection's
# answer, the closure reason counted); None: ended / refused.
EXPECTED: dict[str, tuple[int | None, int | None, str | None]] = {
    "fed-inbound": (None, None, "peer_untrusted"),
    "fed-inbound-control": (200, 200, None),
    "own-withdrawn": (None, None, "peer_untrusted"),
    "own-reissued": (None, None, "peer_untrusted"),
    "reissued-pem": (None, None, "peer_cert_expired"),
    "reissued-json": (None, None, "peer_cert_expired"),
    "reissued-unchanged": (None, None, "peer_cert_expired"),
    "reissued-long-root": (200, 200, None),
    "own-root-expires": (None, None, "own_cert_expired"),
}


@pytest.mark.parametrize("member", sorted(EXPECTED))
def test_an_open_connection_ends_with_the_chain_the_handshake_anchors(world: World,
                                                                      member: str) -> None:
    """After a bundle change (or past a short root's expiry) an open connection is judged by
    the chain a new handshake would anchor -- at a self-signed root of the bundle -- and so
    ends when a new connection is refused; the controls, whose chain still verifies, are
    kept."""
    assert world.in_time, "the changes were not applied before the short roots expired " \
                          "(a machine too slow for LEAD)"
    m = world.members[member]
    after, fresh, reason = EXPECTED[member]
    assert m.before == 200
    assert m.after == after, f"the open connection got {m.after} (expected {after})"
    assert (m.fresh == 200) == (fresh == 200), f"a new connection got {m.fresh}"
    if reason is not None:
        assert m.reasons.get(reason, 0) >= 1, m.reasons


@pytest.mark.parametrize("label", ["pooled", "pooled-control"])
def test_a_pooled_upstream_connection_is_not_reused_past_its_roots_withdrawal(
        world: World, label: str) -> None:
    """The partner's root leaves its bundle, its intermediate stays: the pooled connection to
    the upstream under it is retired (``peer_untrusted``) and a new one refused (502); the
    control upstream, under the partner's other root, is reused."""
    m = world.members[f"fed-outbound-{label}"]
    assert m.before == 200
    if label == "pooled":
        assert m.after == 502 and m.details["ended"] >= 1, m.details
        assert m.reasons["peer_untrusted"] >= 1
    else:
        assert m.after == 200 and m.details == {"accepted": 1, "ended": 0}, m.details


def test_the_own_chain_ends_with_its_root_when_the_bundle_lists_the_intermediate(
        world: World) -> None:
    """tls.crt = leaf + I, the bundle lists R and I: the chain's end is R's (the expiry
    metric at start; /readyz refuses once R expired)."""
    m = world.members["own-root-expires"]
    assert m.details["metric"] == pytest.approx(m.details["root_ends"], abs=1)
    assert m.details["readyz"] == 503
