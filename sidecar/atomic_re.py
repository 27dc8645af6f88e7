"""``re.compile`` with possessive quantifiers written as the atomic groups they stand for.

The data path's readers use possessive quantifiers (``X*+``, ``X++``, ``X?+``, ``X{m,n}+``:
never give back what they matched, so a hostile input cannot make a pattern backtrack).
CPython 3.11 before 3.11.5 matched them wrongly when the repeated part could itself
backtrack (gh-106052): Debian 12's system Python, 3.11.2, found no ``_method`` member in a
JSON body that later releases read, so a body override went unseen (found when the suite
first ran on Debian's 3.11.2, thirty-seventh session). Python's documentation defines
``X*+`` as ``(?>X*)`` (and so on), and atomic groups were right in every 3.11 release, so on
those releases each pattern is compiled in that form. Later releases compile the pattern as
written: there the atomic form matches the same (``tests/test_atomic_re.py``) but one of
the JSON skim's patterns ran 2.5 times slower in it.
"""

from __future__ import annotations

import re
import sys
from typing import AnyStr

_GROUP_KINDS = (":", ">", "=", "!")
# CPython releases whose possessive quantifiers match wrongly (gh-106052, fixed in 3.11.5)
AFFECTED = sys.version_info < (3, 11, 5)


def atomic(pattern: str) -> str:
    """``pattern`` with every possessive quantifier written as an atomic group; a pattern
    without one comes back as it was. Refuses (``ValueError``) what it does not read: an
    unbalanced group, a group kind other than ``(?:``, ``(?>``, ``(?=``, ``(?!``, ``(?<=``,
    ``(?<!``, ``(?P<name>``, flags (``(?i)``, ``(?i:``), plain ``(``; not meant for verbose
    patterns."""
    out: list[str] = []  # the pattern so far, one item per atom (a group: one item)
    opened: list[int] = []  # where each open group begins in ``out``
    last: int | None = None  # where the last atom begins in ``out`` (None: no atom)
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            j = i + 2
            kind = pattern[i + 1:i + 2]
            if kind == "x":
                j = i + 4
            elif kind == "u":
                j = i + 6
            elif kind == "U":
                j = i + 10
            elif kind == "N" and pattern[j:j + 1] == "{":
                j = pattern.index("}", j) + 1
            elif kind.isdigit():
                while j < n and j < i + 4 and pattern[j].isdigit():
                    j += 1
            last = len(out)
            out.append(pattern[i:j])
            i = j
        elif c == "[":
            j = i + 1
            if pattern[j:j + 1] == "^":
                j += 1
            if pattern[j:j + 1] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            if j >= n:
                raise ValueError(f"unterminated character set at {i}")
            last = len(out)
            out.append(pattern[i:j + 1])
            i = j + 1
        elif c == "(":
            j = i + 1
            if pattern[j:j + 1] == "?":
                if pattern[j + 1:j + 2] in _GROUP_KINDS:
                    j += 2
                elif pattern[j + 1:j + 3] in ("<=", "<!"):
                    j += 3
                elif pattern[j + 1:j + 3] == "P<":
                    j = pattern.index(">", j) + 1
                elif flags := re.match(r"\?[aiLmsux-]+([:)])", pattern[j:]):
                    if flags.group(1) == ")":  # inline flags: no group, nothing to repeat
                        out.append(pattern[i:j + flags.end()])
                        last = None
                        i = j + flags.end()
                        continue
                    j += flags.end()
                else:
                    raise ValueError(f"group kind not read at {i}: {pattern[i:i + 6]!r}")
            opened.append(len(out))
            out.append(pattern[i:j])
            last = None
            i = j
        elif c == ")":
            if not opened:
                raise ValueError(f"unbalanced ) at {i}")
            start = opened.pop()
            group = "".join(out[start:]) + ")"
            del out[start:]
            last = len(out)
            out.append(group)
            i += 1
        elif c in "*+?" or (c == "{" and re.match(r"\{\d*(?:,\d*)?\}", pattern[i:])):
            quantifier = c if c != "{" else pattern[i:pattern.index("}", i) + 1]
            j = i + len(quantifier)
            if last is None:
                raise ValueError(f"nothing to repeat at {i}")
            if pattern[j:j + 1] == "+":  # possessive: (?>atom quantifier)
                repeated = "".join(out[last:]) + quantifier
                del out[last:]
                out.append(f"(?>{repeated})")
                j += 1
            elif pattern[j:j + 1] == "?":  # lazy
                out[-1] += quantifier + "?"
                j += 1
            else:
                out[-1] += quantifier
            last = None
            i = j
        else:
            last = None if c == "|" else len(out)
            out.append(c)
            i += 1
    if opened:
        raise ValueError("unbalanced (")
    return "".join(out)


def compile(pattern: AnyStr, flags: int | re.RegexFlag = 0) -> re.Pattern[AnyStr]:  # noqa: A001
    """``re.compile(pattern, flags)``; on an ``AFFECTED`` release, of ``atomic(pattern)``
    (bytes read as Latin-1)."""
    if not AFFECTED:
        return re.compile(pattern, flags)
    if isinstance(pattern, bytes):
        return re.compile(atomic(pattern.decode("latin-1")).encode("latin-1"), flags)
    return re.compile(atomic(pattern), flags)
