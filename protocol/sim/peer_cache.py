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

from protocol.identity import VerifiedCache


class PeerCache(VerifiedCache):
    """One peer's cache counting its own verifications, with the work shared.

    Args:
        shared: the cache that does (and remembers) the Ed25519 work for every peer.
        capacity: digests this peer remembers, as a real peer's cache.
    """

    __slots__ = ("shared",)

    def __init__(self, shared: VerifiedCache, capacity: int = 65536) -> None:
        super().__init__(capacity)
        self.shared = shared

    def check(
        self,
        domain: bytes,
        network_id: bytes,
        public_key: bytes,
        payload: bytes,
        sig: bytes,
        message: bytes,
    ) -> bool:
        """Ask the shared cache, which does the Ed25519 work once for every peer."""
        return self.shared.verify(domain, network_id, public_key, payload, sig)
