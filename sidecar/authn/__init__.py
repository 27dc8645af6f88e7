"""End-user authentication: JWT verification, JWKS key sets, cache, revocation, API keys.

Pure: no sockets, no Trio, no TLS and no clock here (``now`` is
passed in). The data path uses ``sidecar.authn.authenticator.Authenticator``; the I/O around
it is in the shell: the JWKS fetcher task and file loader in ``sidecar.jwks_fetch``, token
introspection calls in ``sidecar.introspect``. See docs/authn.md.
"""
