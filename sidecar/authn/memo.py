"""A connection's memo of its last verified credentials, for ``Authenticator.authenticate``.

Theory of operation
-------------------
A keep-alive connection usually sends the same ``Authorization`` value on every request.
The data path passes one ``CredentialMemo`` per connection, and ``authenticate`` then
answers a request whose credential headers are exactly those of the connection's last
verified request (same names, same values, same order) with that request's ``AuthFacts``,
without extracting, hashing or looking the token up again. The memo holds only a fully
verified outcome: every provider either absent or verified (no failure), no API key header
(API keys can expire per key), no introspected provider, and only providers whose every
token location is a header (a query or cookie token is not compared). It counts only while
everything its answer came from is unchanged:

* ``generation``: every ``update`` (providers, revocations, API keys: each policy load) and
  every ``set_keys`` (key rotation, a refresh) starts a new one, and a memo of an older
  generation is not read;
* the providers the section names (the same set object, so the same policy section), the
  service's default audience and the connection's certificate thumbprint;
* expiry: the earliest ``expires_at`` of the verification cache's entries it used (the
  token's ``exp`` or the cache's max TTL, whichever is first), checked against ``now``;
* revocation: checked on every request, as the cache does (the list is also replaced only
  by ``update``, which starts a new generation).

A request that holds a copy of a token of the section's issuers in a place no provider
reads (``extract.copies``) is never answered from here: that place is no credential header.

Anything else -- a different or repeated header, an API key, an expired or revoked token --
takes the whole path, which refuses what must be refused. A cache of size 0 keeps no memo.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sidecar.policy.decision import NO_AUTH, AuthFacts

if TYPE_CHECKING:
    from sidecar.authn.cache import CachedToken

NOT_KEPT = -math.inf  # the expiry of a memo that holds nothing (no ``now`` is before it)


class CredentialMemo:
    """One connection's last fully verified credentials (see the module docstring): made
    by the data path per connection, read and written only by ``authenticate``."""

    __slots__ = ("generation", "providers", "audience", "x5t", "names", "guard_query", "seen",
                 "auth", "tokens", "expires_at")

    def __init__(self) -> None:
        self.generation = -1  # never an authenticator's: the first request sets it up
        self.providers: object = None
        self.audience: str | None = None
        self.x5t: str | None = None
        self.names: frozenset[bytes] | None = None
        # ``?access_token=`` is a place no provider reads (``extract.Guards``): a request
        # whose query may hold it is authenticated in full, never answered from here.
        self.guard_query = False
        self.seen: list[tuple[bytes, bytes]] | tuple[()] = ()
        self.auth: AuthFacts = NO_AUTH
        self.tokens: tuple[CachedToken, ...] = ()
        self.expires_at = NOT_KEPT
