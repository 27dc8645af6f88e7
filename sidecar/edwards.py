"""Ed25519 public keys that verify nothing: shared by every place that takes one in.

OpenSSL (and so ``cryptography``) accepts any encoding of a point as an Ed25519 public key,
including points of small order, under which anyone can make signatures that verify (the
identity point: R = identity, S = 0 verifies every message). ``weak_public_key`` names them,
as libsodium's blocklist does; the audit keyring (``sidecar.audit.signing.load_keyring``) and
key sets (``sidecar.authn.jwks``) refuse them. Found by hostile reviews (session 29): such a
key in a keyring let a forged trail verify, and in a JWKS let anyone mint tokens.
"""

from __future__ import annotations

# Ed25519's field and curve (RFC 8032 5.1): what ``weak_public_key`` needs to decode a point.
_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P


def weak_public_key(raw: bytes) -> str | None:
    """Why the 32-byte Ed25519 public key ``raw`` must not verify anything, or None.

    OpenSSL (and so ``cryptography``) accepts any encoding of a point as a public key, but a
    point of small order (the identity, an all-zero "placeholder" key, the six others of
    order 2, 4 and 8) verifies signatures anyone makes: under the identity, R = identity and
    S = 0 verify every message (found by a hostile review: such a key in the keyring let a
    re-chained trail verify). So are refused, as libsodium refuses them: a y coordinate not
    reduced modulo p (a second spelling of a point) and a point of small order ([8]P is the
    identity)."""
    if len(raw) != 32:
        return "not 32 bytes"
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P:
        return "not a canonical encoding"
    # x^2 = (y^2 - 1) / (d y^2 + 1); its sign does not matter here ([8](-P) = -[8]P).
    yy = y * y % _P
    x2 = (yy - 1) * pow(_D * yy + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if x * x % _P != x2:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if x * x % _P != x2:
        return "not a point of the curve"
    for _ in range(3):  # [8]P by three doublings (the twisted Edwards law, a = -1)
        xy = x * y % _P
        t = _D * xy * xy % _P
        x, y = (2 * xy * pow(1 + t, _P - 2, _P) % _P,
                (y * y + x * x) * pow(1 - t, _P - 2, _P) % _P)
    if x == 0 and y == 1:
        return "a point of small order, under which anyone can sign"
    return None
