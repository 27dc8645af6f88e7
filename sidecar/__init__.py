"""A zero-trust service-mesh sidecar built on Trio.

See README.md for the picture: a pure, synchronous core (config, identity, policy,
JWT, header rules, audit records) inside a thin async shell (listeners, pools,
reloaders, writers).
"""

__version__ = "0.1.0"
