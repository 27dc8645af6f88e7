"""JWKS key sets and their refresh schedule. Pure: no sockets, files or clock.

Theory of operation
-------------------
``parse_jwks`` turns the bytes of a JSON Web Key Set into an immutable ``KeySet``: kid ->
``PublicJwk`` (a ready-to-use ``cryptography`` public key plus the algorithm family it may
verify). Everything that could make a key dangerous is decided here, once per key set,
not per request:

* a set that publishes *private* key material (``d``, ``p``, ``q``...) is refused whole:
  whoever produced it is broken, and keeping the last good set is the safe reaction;
* symmetric ``oct`` keys are never used (HMAC with a published key is no authentication);
* keys marked for encryption (``use: enc``, ``key_ops`` without ``verify``), RSA keys below
  2048 or above 16384 bits, with an even modulus or an exponent outside FIPS 186-5 (odd,
  65537 to 2^256: 3 is weak, a huge one makes every check expensive), keys whose ``alg``
  can never verify with them (``ES384`` on a P-256 key), keys whose ``x5c`` certificate is
  for another key (or whose chain, ``x5t`` or ``x5t#S256`` does not hold together), and key
  types we do not verify with are skipped, and listed in ``skipped`` so the caller can log
  them;
* ``kty``, ``kid``, ``alg``, ``use`` and ``crv`` of another JSON type than a string, and
  a duplicate ``kid``, are errors: which key would win, or what the member means, is
  otherwise an accident.

A document refused whole still withdraws: ``still_listed`` says which keys of the set in
force it still lists (same material, kid and pinned alg), and the caller keeps only those --
trusting less never waits for the rest of the set (a removed key kept verifying beside one
broken entry, found by two hostile reviews). A document that is no JSON object with a
``keys`` list withdraws nothing.

The refresh schedule is a value (``RefreshState``) plus pure functions of ``now``; the async
fetcher (``sidecar.jwks_fetch``) owns one state per provider and only asks it when to fetch. An
unknown ``kid`` in a token may trigger a refetch, but at most one per
``min_refetch_seconds`` *whatever* the kids an attacker picks: the bound is on fetches, not
on distinct kids. A signal that arrives inside the quiet interval is remembered
(``pending_unknown_kid``) and served when the interval ends, so a genuine rotation is picked
up at most ``min_refetch_seconds`` late.

Jitter: every sidecar of a rollout starts within seconds of the others, and every sidecar
sees an identity provider's outage end at the same moment; with fixed intervals they would
all refetch in lockstep from then on. So each fetch draws a number in [0, 1) (``draw``,
passed to ``on_fetch_started`` by the shell, which owns the random source) and the wait
after it is shortened by up to ``REFRESH_JITTER`` (a success) or ``BACKOFF_JITTER`` (a
failure) of its length. Jitter only ever shortens a wait: "every sidecar has fetched within
``refresh_seconds``" (the key-rotation guidance in docs/authn.md) stays true, and the backoff
cap stays a cap. The unknown-kid bound (``min_refetch_seconds``) is never jittered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sidecar.edwards import weak_edwards_key
from sidecar.errors import ConfigError, Problem
from sidecar.jsondoc import JsonDocError, read_json

MAX_JWKS_BYTES = 1024 * 1024
MAX_KEYS = 100
MIN_RSA_BITS = 2048
# Past 16384 bits OpenSSL, Go and Java refuse RSA verification too; an exponent outside
# FIPS 186-5's [65537, 2**256) is either weak (3) or a way to make each check expensive.
MAX_RSA_BITS = 16384
MIN_RSA_EXPONENT = 65537
MAX_RSA_EXPONENT_BITS = 256
MAX_X5C_CERTIFICATES = 10
_STRING_MEMBERS = ("kty", "alg", "use", "crv")

# The only algorithms a provider may allow: public-key signatures. "none" and HS* are absent
# on purpose, so no configuration can ever reach them.
ALGORITHM_FAMILY: Mapping[str, str] = MappingProxyType(
    {
        "RS256": "RSA",
        "RS384": "RSA",
        "RS512": "RSA",
        "PS256": "RSA",
        "PS384": "RSA",
        "PS512": "RSA",
        "ES256": "EC",
        "ES384": "EC",
        "ES512": "EC",
        "EdDSA": "OKP",
    }
)
# ECDSA binds the curve to the algorithm: an ES256 token must be checked with a P-256 key.
EC_CURVE_FOR_ALG: Mapping[str, str] = MappingProxyType(
    {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
)
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
# The key kinds the product verifies with, by ``kty`` -> the ``crv`` values it supports (None:
# the type has no curve). Decided from the JWK's own members *before* PyJWT parses it: any
# other kind (X25519/X448, secp256k1, brainpool, an unknown ``kty``...) is skipped and logged
# (``jwks_key_skipped``), and only a key of a supported kind that does not load is fatal for
# the set. Before (found by a hostile review), PyJWT's refusal of a curve it does not know
# ("Invalid curve") was read as a broken key: one X25519 key in an IdP's set made every
# later rotation of that set refused, so the removed key stayed trusted.
SUPPORTED_KEYS: Mapping[str, frozenset[str] | None] = MappingProxyType({
    "RSA": None,
    "EC": frozenset(EC_CURVE_FOR_ALG.values()),
    "OKP": frozenset({"Ed25519", "Ed448"}),
})


@cache
def _jwk_parsers() -> Mapping[str, Any]:
    # PyJWT (and the urllib/http.client it pulls in) is imported when the first key set is
    # parsed, not at start: a sidecar whose policy has no JWT provider never needs it.
    from jwt.algorithms import get_default_algorithms

    return MappingProxyType(get_default_algorithms())


@dataclass(frozen=True, slots=True)
class PublicJwk:
    """One usable verification key.

    ``family`` is "RSA", "EC" or "OKP"; ``curve`` the JWK ``crv`` for EC/OKP keys;
    ``alg`` the algorithm the JWK pins (its ``alg`` member), or None.
    """

    kid: str | None
    family: str
    key: Any  # a cryptography public key object
    curve: str | None = None
    alg: str | None = None

    def can_verify(self, alg: str) -> bool:
        """Whether this key may verify a signature made with ``alg``."""
        if ALGORITHM_FAMILY.get(alg) != self.family:
            return False
        if self.alg is not None and self.alg != alg:
            return False
        if self.family == "EC":
            return EC_CURVE_FOR_ALG.get(alg) == self.curve
        return True


@dataclass(frozen=True, slots=True)
class KeySet:
    """An immutable set of verification keys from one JWKS document.

    ``by_kid`` maps kid -> key; ``unnamed`` holds keys without a kid (usable only by tokens
    without a kid, and only when exactly one of them fits the algorithm). ``skipped``
    describes keys that were ignored, for logs.
    """

    source: str
    by_kid: Mapping[str, PublicJwk] = field(default_factory=dict)
    unnamed: tuple[PublicJwk, ...] = ()
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.unnamed)

    @property
    def withdrawn(self) -> bool:
        """The document listed no usable key: the provider has none (every token refused)."""
        return not self.by_kid and not self.unnamed

    def find(self, kid: str | None, alg: str) -> PublicJwk | None:
        """The key for a token's ``kid`` that can verify ``alg``, or None."""
        if kid is not None:
            key = self.by_kid.get(kid)
            return key if key is not None and key.can_verify(alg) else None
        candidates = [k for k in self.unnamed if k.can_verify(alg)]
        if not candidates:
            candidates = [k for k in self.by_kid.values() if k.can_verify(alg)]
        # Several candidates and no kid: trying each would multiply the signature checks an
        # attacker can make us do, so refuse instead.
        return candidates[0] if len(candidates) == 1 else None

    def fingerprint(self) -> frozenset[tuple[str | None, str | None, str]]:
        """Identity of the keys (kid, pinned ``alg``, public numbers) to tell a rotation
        from a refresh: a key whose ``alg`` changed verifies other tokens, it is changed."""
        return frozenset(_identity(k) for k in self._all())

    def kidless_choice(self) -> dict[str, tuple[str | None, str | None, str] | None]:
        """Per algorithm, the key a token without ``kid`` is checked with (None: refused,
        none or several fit). A refresh that only adds keys can change it: one more key of
        the same type makes such tokens ambiguous, so it counts as a change."""
        return {alg: None if (k := self.find(None, alg)) is None else _identity(k)
                for alg in ALGORITHM_FAMILY}

    def _all(self) -> tuple[PublicJwk, ...]:
        return tuple(self.by_kid.values()) + self.unnamed


EMPTY_KEY_SET = KeySet(source="")


def _identity(key: PublicJwk) -> tuple[str | None, str | None, str]:
    return key.kid, key.alg, repr(_public_numbers(key.key))


def _public_numbers(key: Any) -> Any:
    if hasattr(key, "public_numbers"):
        return key.public_numbers()
    return key.public_bytes_raw()  # Ed25519 / Ed448


def _one_key(raw: Any, index: int, source: str, problems: list[Problem]) -> PublicJwk | str:
    """A usable key, or a string saying why this entry is skipped (problems: fatal)."""
    where = f"keys[{index}]"
    if not isinstance(raw, dict):
        problems.append(Problem(source, None, where, "each key must be a JSON object"))
        return "not an object"
    kid = raw.get("kid")
    # ``kid: null`` is no absent kid (as ``alg: null`` is no absent alg): read as absent,
    # the key served every token without a kid (found by a hostile review).
    if "kid" in raw and not isinstance(kid, str):
        problems.append(Problem(source, None, where + ".kid", "kid must be a string"))
        return "bad kid"
    for member in _STRING_MEMBERS:
        if member in raw and not isinstance(raw[member], str):
            problems.append(Problem(source, None, f"{where}.{member}",
                                    f"{member} must be a string"))
            return f"bad {member}"
    label = f"{where} (kid {kid!r})"
    present_private = [m for m in _PRIVATE_MEMBERS if m in raw]
    kty = raw.get("kty")
    if kty == "oct":
        return f"{label}: symmetric 'oct' keys are never used"
    if present_private:
        problems.append(
            Problem(source, None, where, "the key set publishes private key material; refused")
        )
        return "private"
    if raw.get("use", "sig") != "sig":
        return f"{label}: use is not 'sig'"
    ops = raw.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return f"{label}: key_ops does not include 'verify'"
    alg = raw.get("alg")
    if alg is not None and alg not in ALGORITHM_FAMILY:
        return f"{label}: algorithm {alg!r} is not supported"
    if not isinstance(kty, str) or kty not in SUPPORTED_KEYS:
        return f"{label}: key type {kty!r} is not supported"
    curves = SUPPORTED_KEYS[kty]
    if curves is not None and "crv" in raw and raw["crv"] not in curves:
        # (a missing crv is a broken key of a supported type: PyJWT refuses it, fatal)
        return f"{label}: curve {raw['crv']!r} is not supported"
    parser_name = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}[kty]
    from jwt.exceptions import InvalidKeyError

    try:
        key = _jwk_parsers()[parser_name].from_jwk(raw)
    except (InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        problems.append(Problem(source, None, where, f"invalid {kty} key: {exc}"))
        return "invalid"
    curve: str | None = None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"{label}: RSA key of {key.key_size} bits is below {MIN_RSA_BITS}"
        if key.key_size > MAX_RSA_BITS:
            return f"{label}: RSA key of {key.key_size} bits is above {MAX_RSA_BITS}"
        e, n = key.public_numbers().e, key.public_numbers().n
        if n % 2 == 0:
            return f"{label}: RSA modulus is even (2 is a factor anyone knows)"
        if e < MIN_RSA_EXPONENT or e.bit_length() > MAX_RSA_EXPONENT_BITS or e % 2 == 0:
            return (f"{label}: RSA exponent outside FIPS 186-5 (odd, from {MIN_RSA_EXPONENT} "
                    f"to 2^{MAX_RSA_EXPONENT_BITS})")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        curve = str(raw.get("crv"))
        if curve not in EC_CURVE_FOR_ALG.values():
            return f"{label}: curve {curve!r} is not supported"
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        curve = str(raw.get("crv"))
        # A point of small order (the identity, an all-zero placeholder) or a second
        # spelling of one: anyone can sign under it (found by a hostile review: such a key
        # let a forged admin token in). Ed448's too: OpenSSL loads them, and a signature of
        # zeros verified under the all-zero Ed448 key (found by the thirty-fifth session's).
        weak = weak_edwards_key(key)
        if weak is not None:
            problems.append(Problem(source, None, where, f"invalid OKP key: {weak}"))
            return "invalid"
    else:  # a private key slipped through from_jwk: never use it
        problems.append(Problem(source, None, where, "not a public key"))
        return "not public"
    jwk = PublicJwk(kid=kid, family=str(kty), key=key, curve=curve, alg=alg)
    if alg is not None and not jwk.can_verify(alg):
        return f"{label}: algorithm {alg!r} does not fit a {kty} {curve or ''} key"
    if "x5c" in raw:
        mismatch = _x5c_mismatch(raw, key)
        if mismatch:
            return f"{label}: {mismatch}"
    return jwk


def _x5c_mismatch(raw: dict[str, Any], key: Any) -> str | None:
    """Why the key's ``x5c`` chain contradicts it (RFC 7517 4.7-4.9), or None.

    The chain is not trusted for anything (the key set's TLS origin is what we trust), but a
    key whose own certificate names another key is a contradiction: which one did the
    publisher mean? Such a key is not used."""
    import base64
    import binascii
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    chain = raw["x5c"]
    if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_X5C_CERTIFICATES \
            or not all(isinstance(c, str) for c in chain):
        return f"x5c must be a list of 1 to {MAX_X5C_CERTIFICATES} base64 certificates"
    try:
        ders = [base64.b64decode(c, validate=True) for c in chain]
        certs = [x509.load_der_x509_certificate(der) for der in ders]
    except (binascii.Error, ValueError):
        return "x5c holds something that is not a base64 DER certificate"
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    try:
        if certs[0].public_key().public_bytes(*spki) != key.public_bytes(*spki):
            return "the first x5c certificate is for another key"
        for cert, issuer in zip(certs, certs[1:], strict=False):
            cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return "the x5c chain does not hold together (each certificate issued by the next)"
    for member, digest in (("x5t", hashlib.sha1), ("x5t#S256", hashlib.sha256)):
        if member in raw:
            want = base64.urlsafe_b64encode(digest(ders[0]).digest()).rstrip(b"=").decode()
            if raw[member] != want:
                return f"{member} is not the thumbprint of the first x5c certificate"
    return None


def parse_jwks(data: bytes, source: str) -> KeySet:
    """Parse a JWKS document into a ``KeySet``; raise ``ConfigError`` listing every problem.

    A well-formed document with no usable key (``{"keys": []}``, every key skipped: marked
    ``use: enc``, of a kind not supported...) is an empty ``KeySet`` (``withdrawn``), not an
    error: it is the identity provider's statement that no key is valid -- how it revokes a
    compromised one -- and the caller swaps it in (every token of the provider is then
    refused, ``no_keys``). Before (found by a hostile review) it was refused like a broken
    document, and the withdrawn key stayed trusted until a restart. Only a document that
    does not parse, or holds a key that is broken or dangerous, raises (the caller keeps the
    last good set).
    """
    if len(data) > MAX_JWKS_BYTES:
        raise ConfigError([Problem(source, None, "", f"JWKS larger than {MAX_JWKS_BYTES} bytes")])
    try:
        doc = read_json(data)
    except JsonDocError as exc:
        raise ConfigError([Problem(source, None, "", f"JWKS is not valid JSON: {exc}")]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError([Problem(source, None, "keys", "JWKS must be an object with a 'keys' list")])
    raw_keys: list[Any] = doc["keys"]
    if len(raw_keys) > MAX_KEYS:
        raise ConfigError([Problem(source, None, "keys", f"more than {MAX_KEYS} keys")])
    problems: list[Problem] = []
    by_kid: dict[str, PublicJwk] = {}
    unnamed: list[PublicJwk] = []
    skipped: list[str] = []
    for index, raw in enumerate(raw_keys):
        result = _one_key(raw, index, source, problems)
        if isinstance(result, str):
            skipped.append(result)
        elif result.kid is None:
            unnamed.append(result)
        elif result.kid in by_kid:
            problems.append(Problem(source, None, f"keys[{index}].kid", f"duplicate kid {result.kid!r}"))
        else:
            by_kid[result.kid] = result
    if problems:
        raise ConfigError(problems)
    return KeySet(
        source=source,
        by_kid=MappingProxyType(by_kid),
        unnamed=tuple(unnamed),
        skipped=tuple(skipped),
    )



# ----------------------------------------------------------- keys a refused document still lists

_ANY = object()  # a member of another JSON type than a string: it names nothing (see below)


@dataclass(frozen=True, slots=True)
class _Listing:
    """What one entry of a refused JWKS document says about a key: its material
    (``_material``), and its ``kid`` and pinned ``alg`` (None: absent; ``_ANY``: the member
    is there but not a string, so it says nothing)."""

    material: tuple[Any, ...]
    kid: object
    alg: object

    def names(self, key: PublicJwk, material: tuple[Any, ...]) -> bool:
        return (material == self.material
                and (self.kid is _ANY or self.kid == key.kid)
                and (self.alg is _ANY or self.alg == key.alg))


def _material(key: PublicJwk) -> tuple[Any, ...]:
    """The public key itself: type, curve, numbers (never the encoding: a coordinate sent
    in 31 bytes instead of 32 is the same point)."""
    numbers = _public_numbers(key.key)
    if isinstance(numbers, rsa.RSAPublicNumbers):
        return ("RSA", None, numbers.n, numbers.e)
    if isinstance(numbers, ec.EllipticCurvePublicNumbers):
        return ("EC", key.curve, numbers.x, numbers.y)
    return (key.family, key.curve, bytes(numbers))


def _b64_int(value: Any) -> int | None:
    raw = _b64(value)
    return None if raw is None else int.from_bytes(raw, "big")


def _b64(value: Any) -> bytes | None:
    import base64
    import binascii

    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value.encode("ascii") + b"=" * (-len(value) % 4),
                                altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None


def _raw_material(raw: dict[str, Any]) -> tuple[Any, ...] | None:
    """``_material`` read from the members of an entry that does not load (None: the
    members do not say which key it is)."""
    kty, crv = raw.get("kty"), raw.get("crv")
    if kty == "RSA":
        n, e = _b64_int(raw.get("n")), _b64_int(raw.get("e"))
        return None if n is None or e is None else ("RSA", None, n, e)
    if not isinstance(crv, str):
        return None
    if kty == "EC":
        x, y = _b64_int(raw.get("x")), _b64_int(raw.get("y"))
        return None if x is None or y is None else ("EC", crv, x, y)
    if kty == "OKP":
        x_raw = _b64(raw.get("x"))
        return None if x_raw is None else ("OKP", crv, x_raw)
    return None


def _listing(raw: Any, index: int) -> _Listing | None:
    """The key one entry of a refused document names, or None when it names none usable."""
    problems: list[Problem] = []
    result = _one_key(raw, index, "", problems)
    if isinstance(result, PublicJwk):
        return _Listing(_material(result), result.kid, result.alg)
    if not problems or not isinstance(raw, dict):
        # Skipped (use: enc, key_ops without verify, an alg it can never verify, a
        # contradicting x5c...): loaded whole, the document would not have this key either.
        return None
    if raw.get("use", "sig") != "sig":
        return None
    if any(name in raw for name in _PRIVATE_MEMBERS):
        # Its private half published: whoever read the document can sign with the key, so
        # the entry keeps nothing (the key goes, whatever the private members hold).
        return None
    ops = raw.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    material = _raw_material(raw)
    if material is None:
        return None

    def member(name: str) -> object:
        if name not in raw:
            return None
        return raw[name] if isinstance(raw[name], str) else _ANY

    return _Listing(material, member("kid"), member("alg"))


def still_listed(data: bytes, in_force: KeySet) -> KeySet | None:
    """After the JWKS document ``data`` failed to load as a whole (``parse_jwks`` raised):
    the keys of ``in_force`` it still lists, as a ``KeySet`` (``in_force`` itself when it
    lists them all); None when it is no JSON object with a ``keys`` list (more likely a
    wrong or half-written document than the end of every key: it withdraws nothing).

    Withdrawing a key only ever trusts less, so it never waits for the rest of the set (as
    for trust bundles): an operator or identity provider that removed a key (compromised)
    and, in the same edit, published one entry that does not load (a typo'd new key, an
    off-curve point, a duplicate kid) had the whole set refused, and the REMOVED key kept
    verifying -- until a restart for a ``jwks_file``, for ``jwks_max_stale`` for a fetched
    set (found by two hostile reviews). Keys the document adds wait for one that loads.

    A key stays when an entry names the same key material (type, curve, public numbers)
    with the same ``kid`` (absent for a key without one) and the same pinned ``alg``: a
    kid or alg that changed is another key, and a typo can only drop a key, never keep one
    it does not spell out. An entry with private members (``d``, ``k``...) keeps nothing:
    its key's private half is public now. An entry that loads on its own is read as loaded (one that is
    skipped -- ``use: enc``, an x5c for another key... -- names nothing); one that does not
    (a broken member next to unchanged ones) is read from its raw members, where a ``kid``
    or ``alg`` of another JSON type than a string names nothing either way. Only the first
    ``MAX_KEYS`` entries are read (a longer list is refused too)."""
    if len(data) > MAX_JWKS_BYTES:
        return None
    try:
        doc = read_json(data)
    except JsonDocError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return None
    listings = [listing for index, raw in enumerate(doc["keys"][:MAX_KEYS])
                if (listing := _listing(raw, index)) is not None]

    def listed(key: PublicJwk) -> bool:
        material = _material(key)
        return any(listing.names(key, material) for listing in listings)

    by_kid = {kid: key for kid, key in in_force.by_kid.items() if listed(key)}
    unnamed = tuple(key for key in in_force.unnamed if listed(key))
    if len(by_kid) == len(in_force.by_kid) and len(unnamed) == len(in_force.unnamed):
        return in_force
    return KeySet(source=in_force.source, by_kid=MappingProxyType(by_kid), unnamed=unnamed)


# ---------------------------------------------------------------------------- refresh schedule


@dataclass(frozen=True, slots=True)
class RefreshState:
    """When a provider's JWKS was last fetched, and how that went.

    Times are on the caller's clock (the fetcher uses a monotonic clock).
    """

    refresh_seconds: float
    min_refetch_seconds: float
    last_attempt_at: float | None = None
    last_success_at: float | None = None
    consecutive_failures: int = 0
    pending_unknown_kid: bool = False
    unknown_kid_fetches: int = 0
    draw: float = 0.0  # in [0, 1): this attempt's share of the jitter (see the module doc)


REFRESH_JITTER = 0.2  # a refresh comes 0-20 % early: a 5 min interval spreads over 1 min
BACKOFF_JITTER = 0.5  # a retry after a failure comes 0-50 % early ("equal jitter")


def _clamp_draw(draw: float) -> float:
    return min(max(draw, 0.0), 0.999999)


def initial_refresh_state(refresh_seconds: float, min_refetch_seconds: float) -> RefreshState:
    """A state that asks for a fetch right away."""
    return RefreshState(refresh_seconds=max(refresh_seconds, 0.001),
                        min_refetch_seconds=max(min_refetch_seconds, 0.0))


def next_fetch_at(state: RefreshState, now: float) -> float:
    """When the next fetch is due (``now`` or earlier means: fetch now).

    After a success: ``refresh_seconds`` later. After failures: exponential backoff from
    one second, capped at ``refresh_seconds`` (a provider with no keys yet recovers fast,
    a flapping server is not hammered). Either wait is shortened by the attempt's jitter
    ``draw``: by up to ``REFRESH_JITTER`` resp. ``BACKOFF_JITTER`` of its length.
    """
    if state.last_attempt_at is None:
        return now
    if state.consecutive_failures:
        backoff = min(state.refresh_seconds, 2.0 ** min(state.consecutive_failures - 1, 30))
        due = state.last_attempt_at + backoff * (1.0 - BACKOFF_JITTER * state.draw)
    else:
        due = state.last_attempt_at + state.refresh_seconds * (
            1.0 - REFRESH_JITTER * state.draw)
    if state.pending_unknown_kid:
        due = min(due, state.last_attempt_at + state.min_refetch_seconds)
    return due


def on_unknown_kid(state: RefreshState, now: float) -> tuple[RefreshState, bool]:
    """A token named a kid we do not have: may we fetch now?

    Yes only if no fetch (of any kind) started within ``min_refetch_seconds``; otherwise
    the signal is remembered and ``next_fetch_at`` serves it when the interval ends.
    """
    last = state.last_attempt_at
    if last is None or now - last >= state.min_refetch_seconds:
        return replace(state, pending_unknown_kid=False,
                       unknown_kid_fetches=state.unknown_kid_fetches + 1), True
    return replace(state, pending_unknown_kid=True), False


def on_fetch_started(state: RefreshState, now: float, draw: float = 0.0) -> RefreshState:
    """Record that a fetch starts at ``now`` (this is what the refetch bound counts).

    ``draw`` is a fresh random number in [0, 1) from the caller's random source; it decides
    how early the wait after this attempt ends (0: not early at all).
    """
    return replace(state, last_attempt_at=now, pending_unknown_kid=False,
                   draw=_clamp_draw(draw))


def on_fetch_succeeded(state: RefreshState, now: float) -> RefreshState:
    """Record a fetch that produced a usable key set."""
    return replace(state, last_success_at=now, consecutive_failures=0)


def on_fetch_failed(state: RefreshState, now: float) -> RefreshState:
    """Record a failed fetch (network, HTTP status or unusable document)."""
    return replace(state, consecutive_failures=state.consecutive_failures + 1)


def key_set_age(fetched_at: float | None, now: float) -> float | None:
    """Seconds since the key set in use was obtained; None when there is none."""
    return None if fetched_at is None else max(0.0, now - fetched_at)
