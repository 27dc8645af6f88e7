"""Ed25519 and Ed448 public keys that verify nothing: shared by every place that takes one in.

OpenSSL (and so ``cryptography``) accepts any encoding of a point as an Ed25519 public key,
including points of small order, under which anyone can make signatures that verify (the
identity point: R = identity, S = 0 verifies every message). ``weak_public_key`` names them,
as libsodium's blocklist does; the audit keyring (``sidecar.audit.signing.load_keyring``) and
key sets (``sidecar.authn.jwks``) and certificates (``sidecar.identity.svid.crypto_problem``:
bundle roots, peer chains, the sidecar's own) refuse them. Found by hostile reviews (session
29): such a key in a keyring let a forged trail verify, and in a JWKS let anyone mint tokens;
(session 35) the same for Ed448, which was thought refused by OpenSSL and is not: under the
all-zero placeholder (a point of order 4) a signature of 114 zero bytes verified any claims.
"""

from __future__ import annotations

from typing import Any

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


# Ed448's field and curve (RFC 8032 5.2: an untwisted Edwards curve, a = 1, cofactor 4).
_P448 = 2**448 - 2**224 - 1
_D448 = _P448 - 39081


def weak_ed448_public_key(raw: bytes) -> str | None:
    """Why the 57-byte Ed448 public key ``raw`` must not verify anything, or None: an
    encoding RFC 8032 5.2.3 does not decode (y not reduced modulo p -- which the seven bits
    after it, always zero in a real key, make it --, no point of the curve, x = 0 with the
    sign bit set) or a point of small order ([4]P is the identity: the identity, (0, -1), and
    (+-1, 0), whose encoding is the all-zero placeholder). OpenSSL loads all of them, and
    under (+-1, 0) a signature of zeros verifies every message (found by a hostile review,
    thirty-fifth session)."""
    if len(raw) != 57:
        return "not 57 bytes"
    number = int.from_bytes(raw, "little")
    sign = number >> 455
    y = number & ((1 << 455) - 1)
    if y >= _P448:
        return "not a canonical encoding"
    # x^2 = (y^2 - 1) / (d y^2 - 1); p = 3 mod 4, so a root is (x^2)^((p + 1) / 4).
    yy = y * y % _P448
    x2 = (yy - 1) * pow(_D448 * yy - 1, _P448 - 2, _P448) % _P448
    x = pow(x2, (_P448 + 1) // 4, _P448)
    if x * x % _P448 != x2:
        return "not a point of the curve"
    if x == 0 and sign:
        return "not a canonical encoding"
    for _ in range(2):  # [4]P by two doublings (the Edwards law, a = 1)
        xx, yy, xy = x * x % _P448, y * y % _P448, x * y % _P448
        t = _D448 * xx * yy % _P448
        x, y = (2 * xy * pow(1 + t, _P448 - 2, _P448) % _P448,
                (yy - xx) * pow(1 - t, _P448 - 2, _P448) % _P448)
    if x == 0 and y == 1:
        return "a point of small order, under which anyone can sign"
    return None


def weak_edwards_key(key: Any) -> str | None:
    """``weak_public_key`` or ``weak_ed448_public_key`` of a ``cryptography`` Ed25519 or
    Ed448 public key object; None for any other key."""
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    if isinstance(key, ed25519.Ed25519PublicKey):
        return weak_public_key(key.public_bytes_raw())
    if isinstance(key, ed448.Ed448PublicKey):
        return weak_ed448_public_key(key.public_bytes_raw())
    return None
