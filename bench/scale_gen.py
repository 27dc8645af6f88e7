"""Generator of mesh policies for the scale benchmark and the differential tests.

``policy_doc(services)`` is one policy as plain values: mesh-wide parts (two JWT providers,
API keys, revocations, rate limits, alerts) and ``services`` sections spread over
``namespaces(services)`` namespaces. Each section has one allow rule, one deny rule and one
egress entry, as in issue 17's measurements; every tenth section also requires a token of
one of the providers and every seventh an API key, so that references cross files once the
policy is split. ``policy_yaml`` renders it as one block-style YAML file.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

TRUST_DOMAIN = "mesh.local"


def namespaces(services: int) -> int:
    """How many namespaces ``services`` sections are spread over (about 20 per namespace)."""
    return max(1, services // 20)


def service_id(i: int, services: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/ns-{i % namespaces(services)}/sa/svc-{i}"


def policy_doc(services: int, *, jwks_file: str = "jwks.json") -> dict[str, Any]:
    """The generated policy as plain values (dicts and lists, insertion-ordered)."""
    doc: dict[str, Any] = {
        "version": 1,
        "trust_domain": TRUST_DOMAIN,
        "mode": "enforce",
        "jwt_providers": {
            name: {"issuer": f"https://{name}.example", "audiences": ["mesh"],
                   "algorithms": ["RS256"], "jwks_file": jwks_file}
            for name in ("corp", "partners")
        },
        "revocations": [{"jti": "revoked-1"}, {"sub": "mallory"}],
        "api_keys": [{"name": f"key-{k}", "sha256": hashlib.sha256(f"key-{k}".encode()).hexdigest()}
                     for k in range(3)],
        "rate_limits": [{"name": "per-peer", "rate": "100/s", "burst": 200}],
        "alerts": [{"name": "burst", "threshold": 50, "window": "10s"}],
        "services": {},
    }
    for i in range(services):
        me = service_id(i, services)
        caller = service_id((i + 1) % services, services)
        allow: dict[str, Any] = {"from": [caller], "methods": ["GET", "POST"],
                                 "paths": [f"/api/{i}/**"]}
        if i % 10 == 0:
            allow["jwt"] = {"provider": "corp" if i % 20 == 0 else "partners"}
        elif i % 7 == 0:
            allow["apikey"] = [f"key-{i % 3}"]
        doc["services"][me] = {
            "rules": [
                {"name": "callers", "allow": allow},
                {"name": "no-admin", "deny": {"paths": ["/admin/**"]}},
            ],
            "egress": [service_id((i + 2) % services, services)],
        }
    return doc


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    return s if s[:1].isalnum() or s[:1] == "/" else f'"{s}"'


def _emit(v: Any, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(v, dict):
        for k, val in v.items():
            if isinstance(val, dict | list) and val and not _flat(val):
                out.append(f"{pad}{k}:")
                _emit(val, indent + 2, out)
            else:
                out.append(f"{pad}{k}: {_inline(val)}")
    else:
        for item in v:
            if isinstance(item, dict):
                sub: list[str] = []
                _emit(item, indent + 2, sub)
                out.append(f"{pad}- {sub[0].lstrip()}")
                out.extend(sub[1:])
            else:
                out.append(f"{pad}- {_inline(item)}")


def _flat(v: Any) -> bool:
    return isinstance(v, list) and all(not isinstance(x, dict | list) for x in v)


def _inline(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return _scalar(v)


def render(doc: dict[str, Any]) -> str:
    """Block-style YAML for a policy document (only the shapes ``policy_doc`` makes)."""
    out: list[str] = []
    _emit(doc, 0, out)
    return "\n".join(out) + "\n"


def policy_yaml(services: int, **kw: Any) -> str:
    return render(policy_doc(services, **kw))


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    sys.stdout.write(policy_yaml(n))
    os.sys.stdout.flush()
