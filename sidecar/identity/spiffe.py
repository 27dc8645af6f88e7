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
(exactly one segment) and the last segment may be ``**`` (one or more segments). Nothing
else is special: no regular expressions, no partial-segment globs, no wildcard trust
domain. Because the literal parts of a pattern were validated at compile time and an ID
has no escapes, matching is plain string comparison segment by segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")

ONE_SEGMENT = "*"
REST_SEGMENTS = "**"


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
        seg = self.segments
        return seg[1] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None

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
        raise ValueError(f"{what} {s!r}: must start with 'spiffe://'")
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
    if len(td.encode("utf-8")) > MAX_TRUST_DOMAIN_BYTES:
        raise ValueError(f"{what} {s!r}: the trust domain is longer than 255 bytes")
    if not _TRUST_DOMAIN_CHARS.fullmatch(td):
        raise ValueError(
            f"{what} {s!r}: trust domain characters are limited to lower-case letters,"
            " digits, '.', '-' and '_'"
        )
    if path == "/":
        raise ValueError(f"{what} {s!r}: the path must not be a bare '/'")
    if path.endswith("/"):
        raise ValueError(f"{what} {s!r}: the path must not end with '/'")
    return td, path


def _check_segment(s: str, seg: str, *, what: str) -> None:
    if seg == "":
        raise ValueError(f"{what} {s!r}: the path contains an empty segment")
    if seg in (".", ".."):
        raise ValueError(f"{what} {s!r}: the path contains a '{seg}' segment")
    if not _SEGMENT_CHARS.fullmatch(seg):
        raise ValueError(
            f"{what} {s!r}: path characters are limited to letters, digits, '.', '-' and '_'"
        )


def parse_spiffe_id(s: str) -> SpiffeId:
    """Parse ``s`` per the SPIFFE ID standard; raise ValueError saying which rule it breaks."""
    td, path = _split(s, what="SPIFFE ID")
    if path:
        for seg in path[1:].split("/"):
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

    ``segments`` holds literal segments, ``"*"`` (one segment) and, last only, ``"**"``
    (one or more segments). A pattern without wildcards matches exactly one ID.
    """

    text: str
    trust_domain: str
    segments: tuple[str, ...]

    @property
    def is_exact(self) -> bool:
        """True when the pattern has no wildcard (callers may index exact IDs in a dict)."""
        return ONE_SEGMENT not in self.segments and REST_SEGMENTS not in self.segments

    def __str__(self) -> str:
        return self.text

    def matches(self, spiffe_id: str | SpiffeId) -> bool:
        """True when ``spiffe_id`` is a valid SPIFFE ID this pattern covers.

        Fails closed: a malformed ID matches nothing, not even ``**``.
        """
        s = str(spiffe_id)
        if not s.startswith(SCHEME_PREFIX) or len(s) > MAX_ID_BYTES:
            return False
        rest = s[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        td, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash + 1 :])
        if td != self.trust_domain:
            return False
        got = tuple(path.split("/")) if slash >= 0 else ()
        want = self.segments
        if want and want[-1] == REST_SEGMENTS:
            head = want[:-1]
            if len(got) <= len(head):
                return False
        elif len(got) != len(want):
            return False
        else:
            head = want
        for pat, seg in zip(head, got, strict=False):
            if pat == ONE_SEGMENT:
                if not _valid_segment(seg):
                    return False
            elif pat != seg:
                return False
        # Segments swallowed by "**" were never compared to a literal: check their syntax.
        return all(_valid_segment(seg) for seg in got[len(head) :])


def _valid_segment(seg: str) -> bool:
    return seg not in (".", "..") and _SEGMENT_CHARS.fullmatch(seg) is not None


def compile_pattern(s: str) -> SpiffePattern:
    """Compile an identity pattern; raise ValueError with the rule it breaks.

    ``spiffe://td/ns/shop/sa/*`` matches every service account of namespace ``shop``;
    ``spiffe://td/**`` matches every workload of trust domain ``td`` (not the bare
    trust-domain ID). ``*`` and ``**`` must be whole segments; ``**`` only last.
    """
    td, path = _split(s, what="SPIFFE pattern")
    segments = tuple(path[1:].split("/")) if path else ()
    for i, seg in enumerate(segments):
        if seg == REST_SEGMENTS:
            if i != len(segments) - 1:
                raise ValueError(f"SPIFFE pattern {s!r}: '**' is allowed only as the last segment")
            continue
        if seg == ONE_SEGMENT:
            continue
        if "*" in seg:
            raise ValueError(f"SPIFFE pattern {s!r}: '*' must be a whole path segment")
        _check_segment(s, seg, what="SPIFFE pattern")
    return SpiffePattern(text=s, trust_domain=td, segments=segments)
