"""End-user authentication: JWT verification, JWKS key sets, cache, revocation, API keys.

The data path uses ``sidecar.authn.authenticator.Authenticator``; the JWKS fetcher task and
file loader are in ``sidecar.authn.jwks_fetch``. See docs/authn.md.
"""
