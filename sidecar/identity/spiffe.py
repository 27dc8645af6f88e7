"""SPIFFE IDs as values, and the one-segment wildcard patterns the policy uses.

Theory of operation
-------------------
A SPIFFE ID is ``spiffe://<trust-domain><path>`` (SPIFFE ID standard, section 2). We parse it
by hand rather than with ``urllib.parse`` because the standard is *narrower* than a URL: no
userinfo, port, query, fragment or percent-encoding, a lower-case trust domain, and path
segments from a small alphabet. Anything outside that grammar is refused with a message
naming the rule, so a typo in a policy file or a strange certificate is never "normalised"
into someone else's identity.

Patterns (``compile_pattern``) are SPIFFE IDs in which a whole path segment may be ``*``
(exactly one segment). Nothing else is special: no ``**``, no regular expressions, no
partial-segment globs, no wildcard trust domain. Because the literal parts of a pattern were
validated at compile time and an ID has no escapes, matching is plain string comparison
segment by segment.

This module is the one definition of the identity grammar: the config (``inbound.allow_from``,
``outbound[].identity``, ``identity.trust_domains``), the policy (section identities, ``from``,
``egress``, ``rate_limits[].services``, ``trust_domain``, ``namespaces``), lint and explain all
check and split identities here (docs/policy.md, "Identities and patterns").

A *namespace* exists only for the Kubernetes shape ``spiffe://<td>/ns/<X>/sa/<Y>``
(``SpiffeId.namespace``, ``namespace_of``): an ID that merely starts with ``/ns/X`` is not in
namespace ``X``, so a ``namespaces`` condition fails closed for every other layout.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")

ONE_SEGMENT = "*"
_LIKE = "a SPIFFE ID like spiffe://trust.domain/ns/NAMESPACE/sa/ACCOUNT"


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed, valid SPIFFE ID; ``path`` is ``""`` or starts with ``/``."""

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        """Path segments without slashes (empty for a trust-domain ID)."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """``X`` for the Kubernetes shape ``/ns/X/sa/Y``, else None."""
        return _namespace(self.segments)

    @property
    def service_account(self) -> str | None:
        """``Y`` for the Kubernetes shape ``/ns/X/sa/Y``, else None."""
        seg = self.segments
        return seg[3] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None


def _split(s: str, *, what: str) -> tuple[str, str]:
    """Check the parts common to IDs and patterns; return (trust_domain, path)."""
    if not isinstance(s, str):
        raise ValueError(f"{what} must be a string")
    if not s:
        raise ValueError(f"{what} is empty")
    if len(s.encode("utf-8")) > MAX_ID_BYTES:
        raise ValueError(f"{what} is longer than {MAX_ID_BYTES} bytes")
    if not s.startswith(SCHEME_PREFIX):
        if s.lower().startswith(SCHEME_PREFIX):
            raise ValueError(f"{what} {s!r}: the scheme must be lower-case 'spiffe'")
        raise ValueError(f"{what} {s!r}: must start with 'spiffe://' (expected {_LIKE})")
    rest = s[len(SCHEME_PREFIX) :]
    for ch, name in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if ch in rest:
            raise ValueError(f"{what} {s!r}: must not contain {name}")
    slash = rest.find("/")
    td, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if not td:
        raise ValueError(f"{what} {s!r}: the trust domain is missing")
    if "@" in td:
        raise ValueError(f"{what} {s!r}: must not contain userinfo")
    if ":" in td:
        raise ValueError(f"{what} {s!r}: must not contain a port")
    if "*" in td:
        raise ValueError(f"{what} {s!r}: the trust domain cannot be a wildcard")
    if why := trust_domain_problem(td):
        raise ValueError(f"{what} {s!r}: {why}")
    if path == "/":
        raise ValueError(f"{what} {s!r}: the path must not be a bare '/'")
    if path.endswith("/"):
        raise ValueError(f"{what} {s!r}: the path must not end with '/'")
    return td, path


def trust_domain_problem(td: str) -> str | None:
    """Why ``td`` is not a trust domain name (the policy's ``trust_domain``), or None."""
    if len(td.encode("utf-8")) > MAX_TRUST_DOMAIN_BYTES:
        return "the trust domain is longer than 255 bytes"
    if not _TRUST_DOMAIN_CHARS.fullmatch(td):
        return ("invalid trust domain: trust domain characters are limited to lower-case"
                " letters, digits, '.', '-' and '_'")
    return None


def segment_problem(seg: str) -> str | None:
    """Why ``seg`` cannot be one path segment (also a ``namespaces`` entry), or None."""
    if seg == "":
        return "the path contains an empty segment"
    if seg in (".", ".."):
        return f"the path contains a '{seg}' segment"
    if not _SEGMENT_CHARS.fullmatch(seg):
        return "path characters are limited to letters, digits, '.', '-' and '_'"
    return None


def _check_segment(s: str, seg: str, *, what: str) -> None:
    if why := segment_problem(seg):
        raise ValueError(f"{what} {s!r}: {why}")


def parse_spiffe_id(s: str) -> SpiffeId:
    """Parse ``s`` per the SPIFFE ID standard; raise ValueError saying which rule it breaks."""
    td, path = _split(s, what="SPIFFE ID")
    if path:
        for seg in path[1:].split("/"):
            if "*" in seg:  # a pattern where an exact ID is needed: say so, not "characters"
                raise ValueError(f"SPIFFE ID {s!r}: wildcards are not allowed here (an exact ID)")
            _check_segment(s, seg, what="SPIFFE ID")
    return SpiffeId(td, path)


def is_spiffe_id(s: str) -> bool:
    """True when ``s`` parses as a SPIFFE ID."""
    try:
        parse_spiffe_id(s)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SpiffePattern:
    """A compiled identity pattern; build with ``compile_pattern``.

    ``segments`` holds literal segments and ``"*"`` (exactly one segment). A pattern without
    wildcards matches exactly one ID.
    """

    text: str
    trust_domain: str
    segments: tuple[str, ...]

    @property
    def is_exact(self) -> bool:
        """True when the pattern has no wildcard (callers may index exact IDs in a dict)."""
        return ONE_SEGMENT not in self.segments

    def __str__(self) -> str:
        return self.text

    def matches(self, spiffe_id: str | SpiffeId) -> bool:
        """True when ``spiffe_id`` is a valid SPIFFE ID this pattern covers.

        Fails closed: a malformed ID matches nothing, not even ``*``.
        """
        got = id_segments(str(spiffe_id))
        if got is None or len(got) != len(self.segments) + 1 or got[0] != self.trust_domain:
            return False
        for pat, seg in zip(self.segments, got[1:], strict=True):
            if pat == ONE_SEGMENT:
                if not _valid_segment(seg):
                    return False
            elif pat != seg:
                return False
        return True


def _valid_segment(seg: str) -> bool:
    return segment_problem(seg) is None


def compile_pattern(s: str) -> SpiffePattern:
    """Compile an identity pattern; raise ValueError with the rule it breaks.

    ``spiffe://td/ns/shop/sa/*`` matches every service account of namespace ``shop``.
    ``*`` must be a whole segment and matches exactly one; there is no ``**``.
    """
    td, path = _split(s, what="SPIFFE pattern")
    segments = tuple(path[1:].split("/")) if path else ()
    for seg in segments:
        if seg == ONE_SEGMENT:
            continue
        if "*" in seg:
            raise ValueError(f"SPIFFE pattern {s!r}: '*' must be a whole segment and"
                             " matches exactly one ('**' is not an identity wildcard)")
        _check_segment(s, seg, what="SPIFFE pattern")
    return SpiffePattern(text=s, trust_domain=td, segments=segments)


@functools.lru_cache(maxsize=8192)  # identities repeat across a mesh's rules and egress lists
def spiffe_problem(value: str, *, wildcards: bool) -> str | None:
    """Why ``value`` is not a SPIFFE ID (with ``wildcards``: not a pattern), or None.

    The validating form of ``parse_spiffe_id`` / ``compile_pattern`` for loaders that
    collect problems instead of raising.
    """
    try:
        if wildcards:
            compile_pattern(value)
        else:
            parse_spiffe_id(value)
    except ValueError as exc:
        return str(exc)
    return None


def id_segments(s: str) -> tuple[str, ...] | None:
    """``spiffe://td/ns/a/sa/b`` -> ``("td", "ns", "a", "sa", "b")``; None if not SPIFFE.

    A split, not a check: for IDs and patterns already validated (loaded policy, verified
    certificate), on the data path. ``PeerIdentity`` values come from ``parse_spiffe_id``.
    """
    if not s.startswith(SCHEME_PREFIX) or len(s) > MAX_ID_BYTES:
        return None
    return tuple(s[len(SCHEME_PREFIX) :].split("/"))


def _namespace(path: tuple[str, ...]) -> str | None:
    return path[1] if len(path) == 4 and path[0] == "ns" and path[2] == "sa" else None


def namespace_of(spiffe_id: str, trust_domain: str) -> str | None:
    """``X`` for ``spiffe://<trust_domain>/ns/X/sa/Y``, else None (same as ``SpiffeId.namespace``).

    Only identities of ``trust_domain`` have a namespace: a federated peer that happens to
    use the same path layout must not pass a ``namespaces`` condition.
    """
    segs = id_segments(spiffe_id)
    if segs is None or segs[0] != trust_domain:
        return None
    return _namespace(segs[1:])
