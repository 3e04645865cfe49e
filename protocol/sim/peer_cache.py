"""A simulated peer's own verified-signature cache, counting what a real peer would verify.

A real peer verifies every signature it has not verified before, through its own bounded cache
(`protocol.identity.VerifiedCache`). Simulated peers normally share one cache, so 1,000 peers
pay once for a signature; that hides each peer's work, which is what a measurement of the task
plane's cost per task needs. `PeerCache` keeps each peer's own record of the digests it has
verified (same capacity and eviction as a real peer's cache) and counts `verified`, `hits` and
`failures` exactly as that peer would, while the Ed25519 work itself is done once, by the shared
cache it asks.

Invariants:
- `verify` answers exactly what `VerifiedCache.verify` answers for the same arguments.
- `verified` counts the digests new to this peer that verified; `hits` those it had verified
  before and still remembers; `failures` those that did not verify (never remembered).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, VerifiedCache, signing_input


class PeerCache(VerifiedCache):
    """One peer's cache counting its own verifications, with the work shared.

    Args:
        shared: the cache that does (and remembers) the Ed25519 work for every peer.
        capacity: digests this peer remembers, as a real peer's cache.
    """

    __slots__ = ("shared", "digests")

    def __init__(self, shared: VerifiedCache, capacity: int = 65536) -> None:
        super().__init__(capacity)
        self.shared = shared
        self.digests: OrderedDict[bytes, None] = OrderedDict()
        """Digests this peer verified, least recently used first."""

    def verify(
        self, domain: bytes, network_id: bytes, public_key: bytes, payload: bytes, sig: bytes
    ) -> bool:
        """Return what `VerifiedCache.verify` returns, counting as this peer's own cache."""
        if len(public_key) != PUBLIC_KEY_BYTES or len(sig) != SIGNATURE_BYTES:
            self.failures += 1
            return False
        message = signing_input(domain, network_id, payload)
        digest = hashlib.sha256(public_key + sig + message).digest()
        if digest in self.digests:
            self.hits += 1
            self.digests.move_to_end(digest)
            return True
        if not self.shared.verify(domain, network_id, public_key, payload, sig):
            self.failures += 1
            return False
        self.verified += 1
        self.digests[digest] = None
        if len(self.digests) > self.capacity:
            self.digests.popitem(last=False)
        return True
