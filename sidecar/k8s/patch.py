"""RFC 6902 JSON patches between two JSON values, for the admission webhook's answer.

Theory of operation
-------------------
``json_patch(before, after)`` walks both values together:

* mappings: keys only in ``before`` -> ``remove``; only in ``after`` -> ``add``; in both ->
  recurse (so a change deep in a container yields one small op, not a whole-pod replace);
* lists: same length -> recurse per index; ``after`` = ``before`` plus new items at the end
  -> ``add .../-`` per item; new items at the front -> ``add .../0``.. (the injector prepends
  the sidecar to ``initContainers`` / ``containers``); anything else -> one ``replace`` of the
  whole list (always correct, just larger);
* scalars that differ (or a type change) -> ``replace``.

Keys are escaped per RFC 6901 (``~`` -> ``~0``, ``/`` -> ``~1``): annotation keys such as
``sidecar.mesh.dev/status`` contain a slash.

``apply_patch`` is the inverse used by the tests and by the webhook's own self-check; it
supports exactly the ops ``json_patch`` emits (add, remove, replace).
"""

from __future__ import annotations

import copy
from typing import Any

JsonPatch = list[dict[str, Any]]


def escape_pointer_token(token: str | int) -> str:
    """One JSON Pointer reference token (RFC 6901)."""
    return str(token).replace("~", "~0").replace("/", "~1")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def json_patch(before: Any, after: Any, path: str = "") -> JsonPatch:
    """The RFC 6902 operations that turn ``before`` into ``after`` (``[]`` when equal)."""
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        ops: JsonPatch = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": f"{path}/{escape_pointer_token(key)}"})
        for key, value in after.items():
            child = f"{path}/{escape_pointer_token(key)}"
            if key not in before:
                ops.append({"op": "add", "path": child, "value": copy.deepcopy(value)})
            else:
                ops.extend(json_patch(before[key], value, child))
        return ops
    if isinstance(before, list) and isinstance(after, list):
        return _list_patch(before, after, path)
    return [{"op": "replace", "path": path, "value": copy.deepcopy(after)}]


def _list_patch(before: list[Any], after: list[Any], path: str) -> JsonPatch:
    n, m = len(before), len(after)
    if n == m:
        ops: JsonPatch = []
        for i, (old, new) in enumerate(zip(before, after, strict=True)):
            ops.extend(json_patch(old, new, f"{path}/{i}"))
        return ops
    if m > n and after[:n] == before:
        return [{"op": "add", "path": f"{path}/-", "value": copy.deepcopy(v)}
                for v in after[n:]]
    if m > n and after[m - n:] == before:
        return [{"op": "add", "path": f"{path}/{i}", "value": copy.deepcopy(v)}
                for i, v in enumerate(after[:m - n])]
    return [{"op": "replace", "path": path, "value": copy.deepcopy(after)}]


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {path!r}")
    tokens = [_unescape(t) for t in path[1:].split("/")]
    node = doc
    for token in tokens[:-1]:
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node, tokens[-1]


def apply_patch(doc: Any, ops: JsonPatch) -> Any:
    """Apply ``add`` / ``remove`` / ``replace`` ops to a copy of ``doc`` and return it."""
    result = copy.deepcopy(doc)
    for op in ops:
        kind, path = op["op"], op["path"]
        if path == "":
            if kind not in ("replace", "add"):
                raise ValueError(f"cannot {kind} the whole document")
            result = copy.deepcopy(op["value"])
            continue
        parent, token = _parent(result, path)
        if isinstance(parent, list):
            if kind == "add":
                index = len(parent) if token == "-" else int(token)
                if not 0 <= index <= len(parent):
                    raise ValueError(f"index out of range in {path!r}")
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[int(token)]
            elif kind == "replace":
                parent[int(token)] = copy.deepcopy(op["value"])
            else:
                raise ValueError(f"unsupported op {kind!r}")
        else:
            if kind in ("add", "replace"):
                if kind == "replace" and token not in parent:
                    raise ValueError(f"replace of a missing member {path!r}")
                parent[token] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[token]
            else:
                raise ValueError(f"unsupported op {kind!r}")
    return result
