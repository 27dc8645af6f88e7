"""The benchmark's JWT provider: one ES256 key, its JWKS, and a token the load generator
sends on every request of the ``-full`` setups.

Both proxies of a like-for-like pair verify the same token against the same key: the sidecar
reads the JWKS file named in its policy, Envoy gets the same JWKS inline in ``jwt_authn``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "https://issuer.bench.local/"
AUDIENCE = "bench-server"
SCOPE = "bench.read"  # the claim the rule of both proxies requires (one word of ``scope``)
KID = "bench-1"
LIFETIME_S = 24 * 3600


@dataclass(frozen=True)
class BenchJwt:
    """Where the JWKS is, what it holds, and the bearer token to send."""

    jwks_path: str
    jwks_json: str
    token: str

    @property
    def header(self) -> tuple[str, str]:
        return ("Authorization", f"Bearer {self.token}")


def make_jwt(directory: str) -> BenchJwt:
    """A fresh key, ``jwks.json`` in ``directory``, and a token valid for a day."""
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "alg": "ES256", "use": "sig"})
    jwks_json = json.dumps({"keys": [jwk]})
    path = os.path.join(directory, "jwks.json")
    with open(path, "w") as f:
        f.write(jwks_json)
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "bench-user", "scope":
                        f"{SCOPE} bench.write", "iat": now, "nbf": now - 60,
                        "exp": now + LIFETIME_S}, key, algorithm="ES256",
                       headers={"kid": KID})
    return BenchJwt(path, jwks_json, token)
