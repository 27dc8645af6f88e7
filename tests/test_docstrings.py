"""Every public definition of the ``sidecar`` package has a docstring, except those on the
allowlist, and the allowlist only shrinks.

A public definition is a module-level function or class whose name does not start with ``_``,
and a method (or property) of such a class whose name does not start with ``_``, in a module
whose dotted path has no ``_``-prefixed part (``__init__`` and ``__main__`` count as public).
``@overload`` stubs are not definitions. The walk reads the source with ``ast``: nothing is
imported or run.

``tests/docstring_allowlist.txt`` lists the ones still missing, one ``module:Qualified.name``
a line. A new public definition without a docstring fails the test; so does an allowlisted
one that now has a docstring or no longer exists (take it off the list). After adding
docstrings, or after merges, regenerate the list with::

    python tests/test_docstrings.py --write-allowlist
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sidecar"
ALLOWLIST = Path(__file__).resolve().parent / "docstring_allowlist.txt"
HEADER = (
    "# Public definitions of the sidecar package that still lack a docstring (see\n"
    "# tests/test_docstrings.py). This list only shrinks; regenerate it with\n"
    "#   python tests/test_docstrings.py --write-allowlist\n"
)

FunctionDef = ast.FunctionDef | ast.AsyncFunctionDef


def _public(name: str) -> bool:
    return not name.startswith("_")


def _is_overload(node: FunctionDef) -> bool:
    return any((isinstance(d, ast.Name) and d.id == "overload")
               or (isinstance(d, ast.Attribute) and d.attr == "overload")
               for d in node.decorator_list)


def module_name(path: Path) -> str:
    """``sidecar/audit/cli.py`` -> ``sidecar.audit.cli`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def public_modules() -> Iterator[Path]:
    """The package's modules whose dotted path has no private part."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if all(_public(p) or p in ("__init__", "__main__") for p in parts):
            yield path


def definitions(tree: ast.Module) -> Iterator[tuple[str, bool]]:
    """(qualified name, has a docstring) for each public definition in a module."""
    for node in tree.body:
        if isinstance(node, FunctionDef) and _public(node.name) and not _is_overload(node):
            yield node.name, ast.get_docstring(node) is not None
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            yield node.name, ast.get_docstring(node) is not None
            for item in node.body:
                if (isinstance(item, FunctionDef) and _public(item.name)
                        and not _is_overload(item)):
                    yield f"{node.name}.{item.name}", ast.get_docstring(item) is not None


def scan() -> tuple[int, list[str]]:
    """(number of public definitions, sorted ``module:name`` of those without a docstring)."""
    total, missing = 0, []
    for path in public_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, documented in definitions(tree):
            total += 1
            if not documented:
                missing.append(f"{module_name(path)}:{name}")
    return total, sorted(missing)


def read_allowlist() -> set[str]:
    """The allowlist's entries (comments and blank lines skipped)."""
    lines = ALLOWLIST.read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def write_allowlist() -> int:
    """Rewrite the allowlist with what is missing now; return how many that is."""
    _, missing = scan()
    ALLOWLIST.write_text(HEADER + "".join(f"{m}\n" for m in missing), encoding="utf-8")
    return len(missing)


def test_public_definitions_have_docstrings_or_are_allowlisted() -> None:
    _, missing = scan()
    new = sorted(set(missing) - read_allowlist())
    assert not new, ("public definitions without a docstring (write one; the allowlist "
                     "only shrinks):\n  " + "\n  ".join(new))


def test_allowlist_has_no_stale_entries() -> None:
    _, missing = scan()
    stale = sorted(read_allowlist() - set(missing))
    assert not stale, ("allowlisted but documented now, or gone: regenerate with "
                       "`python tests/test_docstrings.py --write-allowlist`\n  "
                       + "\n  ".join(stale))


def test_the_walk_sees_what_it_should(tmp_path: Path) -> None:
    # The scanner itself: each kind of definition is found, private ones and overloads are not.
    source = '''
"""module"""
from typing import overload
def f(): pass
def g():
    """doc"""
async def h(): pass
def _private(): pass
@overload
def o(x: int) -> int: ...
class C:
    def m(self): pass
    @property
    def p(self):
        """doc"""
    def _hidden(self): pass
    def __init__(self): pass
class _Private:
    def m(self): pass
'''
    found = dict(definitions(ast.parse(source)))
    assert found == {"f": False, "g": True, "h": False, "C": False, "C.m": False, "C.p": True}


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-allowlist"]:
        print(f"{write_allowlist()} entries written to {ALLOWLIST.relative_to(ROOT)}")
    elif not sys.argv[1:]:
        total, missing = scan()
        print(f"{len(missing)} of {total} public definitions have no docstring")
    else:
        sys.exit("usage: python tests/test_docstrings.py [--write-allowlist]")
