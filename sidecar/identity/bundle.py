"""Trust bundle files: PEM, or the SPIFFE trust bundle format (a JWKS document).

Theory of operation
-------------------
A bundle is the set of root certificates of one trust domain. Two file formats are read,
told apart by their first non-blank byte (the two cannot be confused: PEM starts with
``-----``, JSON with ``{``):

* PEM: one or more ``CERTIFICATE`` blocks.
* SPIFFE trust bundle (SPIFFE Trust Domain and Bundle standard, section 4), as SPIRE's bundle
  endpoint serves it: a JWK Set whose keys with ``"use": "x509-svid"`` each carry one root
  certificate, base64 DER, in ``x5c``. Read as the X509-SVID standard (6.2) tells a consumer
  to: a key whose ``x5c`` is missing or empty is ignored, and of several ``x5c`` values only
  the first is the root (the rest are ignored, never trusted). Keys with ``"use": "jwt-svid"``
  (JWT signing keys) or any other use are skipped, as the standard asks; ``spiffe_sequence``
  and ``spiffe_refresh_hint`` are accepted and ignored (the sidecar polls the file).

Pure: bytes in, certificates out, ``ValueError`` naming what is wrong. Callers add the file
name and the rule code.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography import x509

from sidecar.jsondoc import JsonDocError, read_json

MAX_BUNDLE_KEYS = 256
X509_SVID_USE = "x509-svid"


def parse_bundle(data: bytes, *, allow_empty: bool = False) -> list[x509.Certificate]:
    """The root certificates in ``data`` (PEM or SPIFFE JSON); ValueError if none or broken.

    ``allow_empty`` (a federated trust domain's bundle): a file that is empty or blank, or a
    SPIFFE bundle without an ``x509-svid`` key, is read as *no roots* -- the trust domain's
    X.509 trust was withdrawn -- instead of an error that would keep the last roots in force.
    A file that does not parse stays an error."""
    text = data.lstrip()
    if allow_empty and not text:
        return []
    if text.startswith(b"{"):
        certs = _parse_spiffe_json(text)
        if not certs and not allow_empty:
            raise ValueError("SPIFFE bundle has no key with \"use\": \"x509-svid\"")
        return certs
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"no PEM certificate: {exc}") from exc
    if not certs:
        raise ValueError("the bundle holds no certificate")
    if len(certs) > MAX_BUNDLE_KEYS:  # (as ``svid.load_roots``, which the sidecar reads with)
        raise ValueError(f"the bundle holds more than {MAX_BUNDLE_KEYS} certificates")
    return certs


def _parse_spiffe_json(data: bytes) -> list[x509.Certificate]:
    # The strict reader (sidecar/jsondoc.py), as for every document another party writes: a
    # member named twice, NaN, or nesting past its bound is refused with a message (a bundle
    # nested 100,000 levels deep ended `sidecar run` and `check` in a RecursionError).
    try:
        doc: Any = read_json(data)
    except JsonDocError as exc:
        raise ValueError(f"SPIFFE bundle is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("SPIFFE bundle must be a JSON object with a 'keys' list")
    keys = doc["keys"]
    if len(keys) > MAX_BUNDLE_KEYS:
        raise ValueError(f"SPIFFE bundle has more than {MAX_BUNDLE_KEYS} keys")
    certs: list[x509.Certificate] = []
    for i, key in enumerate(keys):
        if not isinstance(key, dict):
            raise ValueError(f"keys[{i}] is not an object")
        if key.get("use") != X509_SVID_USE:
            continue  # jwt-svid and unknown uses are not X.509 roots
        x5c = key.get("x5c")
        if x5c is None or x5c == []:
            continue  # X509-SVID 6.2: an entry without x5c MUST be ignored
        if not isinstance(x5c, list) or not isinstance(x5c[0], str):
            raise ValueError(f"keys[{i}]: x5c must be a list of base64 DER certificates")
        # X509-SVID 6.2: the first value is the root; all but the first MUST be ignored
        # (a publisher that adds its chain there adds nothing we trust).
        try:
            der = base64.b64decode(x5c[0], validate=True)
            certs.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"keys[{i}].x5c[0] is not a base64 DER certificate: {exc}") \
                from exc
    return certs


def spiffe_bundle_json(certs: list[x509.Certificate], sequence: int = 1) -> bytes:
    """A SPIFFE trust bundle document for ``certs``, shaped like SPIRE's bundle endpoint
    output (the tests write federated bundles with it; kept next to the parser so the two
    agree on the format)."""
    from cryptography.hazmat.primitives import serialization

    keys = []
    for cert in certs:
        keys.append({
            "use": X509_SVID_USE,
            "kty": "EC" if "EllipticCurve" in type(cert.public_key()).__name__ else "RSA",
            "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
        })
    return json.dumps({"keys": keys, "spiffe_sequence": sequence,
                       "spiffe_refresh_hint": 300}, indent=2).encode()
