"""Parsers for small scalar values that people write in YAML: durations, sizes, addresses,
timestamps. The one definition of each for the config, the audit config and the policy."""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import date, datetime

# ASCII digits only (``\d`` also takes Arabic-Indic and other Unicode digits, which float()
# reads: a value a person cannot check by eye).
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*([0-9]+)\s*(b|kib|mib|gib|kb|mb|gb|k|m|g)?\s*$", re.IGNORECASE)
# The largest size any setting takes (1 PiB): a 400-digit number is no bound a person meant.
MAX_SIZE = 2**50
_SIZE_UNITS = {
    None: 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
    "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
}


def parse_duration(value: object) -> float:
    """``30`` / ``"30s"`` / ``"250ms"`` / ``"5m"`` / ``"1h"`` / ``"7d"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m or 1h")
    if isinstance(value, int | float):
        # NaN and infinity would silently disable a bound (and NaN makes trio raise).
        if not math.isfinite(value) or value < 0:
            raise ValueError("a duration must be a finite number >= 0")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
            if not math.isfinite(seconds):
                # 309 digits or more read as infinity: no bound at all (a hostile review)
                raise ValueError("a duration must be a finite number >= 0")
            return seconds
    raise ValueError("expected a duration like 30s, 5m or 1h")


def parse_timestamp(value: object) -> float:
    """An RFC 3339 timestamp with a time zone (YAML may already have parsed it) -> unix time."""
    if isinstance(value, datetime):
        stamp = value
    elif isinstance(value, date):
        raise ValueError("expected a timestamp with time and zone, e.g. 2030-01-31T18:00:00Z")
    elif isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                "expected an RFC 3339 timestamp, e.g. 2030-01-31T18:00:00Z"
            ) from None
    else:
        raise ValueError("expected an RFC 3339 timestamp, e.g. 2030-01-31T18:00:00Z")
    if stamp.tzinfo is None:
        raise ValueError("the timestamp needs a time zone (Z or +HH:MM)")
    return stamp.timestamp()


def parse_size(value: object) -> int:
    """``1024`` / ``"64KiB"`` / ``"1MiB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 64KiB or 1MiB")
    size: int | None = None
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        size = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if m and len(m.group(1)) <= 20:
            unit = m.group(2).lower() if m.group(2) else None
            size = int(m.group(1)) * _SIZE_UNITS[unit]
        elif m:
            size = MAX_SIZE + 1
    if size is None:
        raise ValueError("expected a size like 64KiB or 1MiB")
    if size > MAX_SIZE:
        raise ValueError("a size must be at most 1PiB")
    return size


# A host name: labels of letters, digits, '-' and '_', dot-separated, an optional final dot.
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")


def parse_address(value: object) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` / ``"[::1]:8080"`` / ``"name:443"`` -> (host, port).

    The host is one address written one way (found by a hostile review: ``[]:80`` listened on
    every interface, ``[zzz]``, ``a b`` and zone ids loaded, and ``127.1``, ``0x7f.0.0.1``,
    ``2130706433`` or ``[::ffff:127.0.0.1]`` were 127.0.0.1 to the resolver but another host
    to the check that two listeners do not share an address and to the admin loopback
    warning): a name (``host_problem``), an IPv4 address as four decimal numbers without
    leading zeros, or a bracketed IPv6 address without zone id that is not an IPv4-mapped or
    IPv4-compatible one. The port is decimal digits without leading zeros."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected HOST:PORT")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [IPV6]:PORT")
        port_s = rest[1:]
        why = ipv6_problem(host)
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            raise ValueError("expected HOST:PORT")
        if ":" in host:
            raise ValueError("write IPv6 addresses as [ADDR]:PORT")
        why = host_problem(host)
    if why is not None:
        raise ValueError(why)
    if (not (port_s.isascii() and port_s.isdigit()) or not 0 <= int(port_s) <= 65535
            or (port_s[0] == "0" and port_s != "0")):
        raise ValueError("port must be a number from 0 to 65535 (decimal, no leading zeros)")
    return host, int(port_s)


def host_problem(host: str) -> str | None:
    """Why ``host`` (not bracketed) is not a host name or an IPv4 address written one way, or
    None. A host whose last label is a number is an IPv4 address to ``inet_aton`` and the
    resolver (``127.1``, ``0177.0.0.1``, ``0x7f.0.0.1``, ``2130706433`` are 127.0.0.1)."""
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        return "expected a host name (letters, digits, '.', '-', '_') or an IP address"
    last = host.rstrip(".").rpartition(".")[2]
    if last.isdigit() or last[:2].lower() == "0x":
        try:
            canonical = str(ipaddress.IPv4Address(host))
        except ValueError:
            canonical = ""
        if canonical != host:
            return ("a host ending in a number is an IPv4 address: write it as four decimal "
                    "numbers without leading zeros (127.0.0.1)")
    return None


def ipv6_problem(text: str) -> str | None:
    """Why ``text`` (the inside of ``[...]``) is not an IPv6 address written for one host, or
    None: a zone id (``%eth0``) is not taken, nor an IPv4-mapped (``::ffff:a.b.c.d``) or
    IPv4-compatible (``::a.b.c.d``, deprecated) address: write the IPv4 address."""
    if "%" in text:
        return "an IPv6 zone id (%...) is not supported here"
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        return "expected an IPv6 address in [...]"
    if addr.ipv4_mapped is not None:
        return f"an IPv4-mapped IPv6 address: write the IPv4 address ({addr.ipv4_mapped})"
    if int(addr) >> 32 == 0 and int(addr) > 1:
        return (f"an IPv4-compatible IPv6 address (deprecated, RFC 4291): write the IPv4 "
                f"address ({ipaddress.IPv4Address(int(addr))})")
    return None


def format_address(addr: tuple[str, int]) -> str:
    """``(host, port)`` -> ``host:port``, with an IPv6 host in brackets (``[::1]:8080``): the
    inverse of ``parse_address``."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether a listen host keeps a server on this machine (``localhost`` or a loopback
    address); an empty host, a wildcard or any other name does not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False
