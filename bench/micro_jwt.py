"""Micro-benchmark: JWT verification cost, uncached (ES256, RS256) and cached.

Four figures, each the mean of a loop bounded by a count and a time budget:
``verify_token`` for an ES256 and an RS256 token (signature + claims, the uncached path), a
``VerificationCache.lookup`` hit (what a repeated token costs), and the whole cached
``Authenticator.authenticate`` call the data path makes (header scan, cache hit, revocation
check, AuthFacts). Prints human lines and one ``BENCHJSON {...}`` line; exits 3 when
``sidecar.authn`` is not there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAX_ITERATIONS = 200_000
TIME_BUDGET_S = 0.2 if os.environ.get("BENCH_QUICK") == "1" else 1.0


def time_per_call(fn: Callable[[], object]) -> float:
    """Mean microseconds per call of ``fn()``, bounded by MAX_ITERATIONS and TIME_BUDGET_S."""
    n, batch, start = 0, 10, time.perf_counter()
    while n < MAX_ITERATIONS and time.perf_counter() - start < TIME_BUDGET_S:
        for _ in range(batch):
            fn()
        n += batch
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    """Run the micro-benchmark and print its results."""
    try:
        import jwt as pyjwt
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        from sidecar.authn.authenticator import Authenticator
        from sidecar.authn.cache import VerificationCache
        from sidecar.authn.jwks import parse_jwks
        from sidecar.authn.jwt import verify_token
        from sidecar.authn.revocation import RevocationList
        from sidecar.policy.sections import JwtProvider, PolicyExtras, Revocation
    except ImportError as exc:
        print(f"jwt verification: unavailable ({exc})")
        return 3
    now = time.time()
    ec_priv = ec.generate_private_key(ec.SECP256R1())
    rsa_priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = {"keys": [
        dict(pyjwt.algorithms.ECAlgorithm.to_jwk(ec_priv.public_key(), as_dict=True), kid="e"),
        dict(pyjwt.algorithms.RSAAlgorithm.to_jwk(rsa_priv.public_key(), as_dict=True), kid="r"),
    ]}
    keys = parse_jwks(json.dumps(jwks).encode(), "bench")
    provider = JwtProvider(name="corp", issuer="https://login.example.com/",
                           audiences=("shop-api",), algorithms=("ES256", "RS256"))
    claims = {"iss": provider.issuer, "aud": "shop-api", "sub": "alice", "jti": "bench-1",
              "scope": "orders:read", "iat": int(now), "exp": int(now) + 3600}
    es = pyjwt.encode(claims, ec_priv, algorithm="ES256", headers={"kid": "e"})
    rs = pyjwt.encode(claims, rsa_priv, algorithm="RS256", headers={"kid": "r"})
    # A realistic revocation list: lookups stay dict probes whatever its length.
    revocations = RevocationList([Revocation(jti=f"revoked-{i}") for i in range(1000)])
    cache = VerificationCache()
    cache.store("corp", es, verify_token(es, provider, keys, now), now)
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": provider},
                                      revocations=tuple(Revocation(jti=f"r{i}")
                                                        for i in range(1000))))
    auth.set_keys("corp", keys, now)
    headers = [(b"host", b"orders"), (b"accept", b"*/*"), (b"user-agent", b"bench"),
               (b"authorization", f"Bearer {es}".encode())]
    assert auth.authenticate(["corp"], headers, "", now).claims

    results = {
        "es256_verify_us": time_per_call(lambda: verify_token(es, provider, keys, now)),
        "rs256_verify_us": time_per_call(lambda: verify_token(rs, provider, keys, now)),
        "cache_lookup_us": time_per_call(lambda: cache.lookup("corp", es, now, revocations)),
        "authenticate_cached_us": time_per_call(
            lambda: auth.authenticate(["corp"], headers, "", now)),
    }
    print(f"jwt: ES256 verify (uncached)        {results['es256_verify_us']:8.1f} us")
    print(f"jwt: RS256 verify (uncached)        {results['rs256_verify_us']:8.1f} us")
    print(f"jwt: cache lookup (hit)             {results['cache_lookup_us']:8.2f} us")
    print(f"jwt: authenticate, cached, per req  {results['authenticate_cached_us']:8.2f} us")
    print("BENCHJSON " + json.dumps({k: round(v, 3) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
