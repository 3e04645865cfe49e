"""Peer identity: Ed25519 keys in, node ids, domain-separated signatures, a verification cache.

Invariants:
- A node id is SHA-256 of the raw 32-byte Ed25519 public key; nothing else names a peer.
- Every signature covers `domain || len(network_id) || network_id || payload`, so a signature
  made for one kind of object or one network never verifies as another.
- Verification is the CPU bottleneck, so it goes through libsodium (PyNaCl: 86 us a verify and
  29 us a sign on the 2-core reference machine, against 158 and 49 us with `cryptography`;
  docs/decisions.md), and a bounded cache remembers digests that verified. Only successes are
  cached: a forged object costs its sender a full verification every time, never a cache slot
  that could evict good entries.
- Key *generation* needs an OS random source and lives in `peer/`; this module only loads keys.
"""

from __future__ import annotations

import base64
import hashlib

from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import CryptoError

from protocol.errors import LocalProtocolError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NODE_ID_BYTES = 32

DOMAIN_ALIVE = b"grapevine/alive/v1"
DOMAIN_LEAVE = b"grapevine/leave/v1"
DOMAIN_PEER_STATE = b"grapevine/peer-state/v1"


def node_id_of(public_key: bytes) -> bytes:
    """Return the node id (SHA-256) of a raw Ed25519 public key."""
    return hashlib.sha256(public_key).digest()


def short_id(node_id: bytes, length: int = 10) -> str:
    """Return a human-readable prefix of a node id (lowercase base32, no padding)."""
    return base64.b32encode(node_id).decode("ascii").lower()[:length]


def signing_input(domain: bytes, network_id: bytes, payload: bytes) -> bytes:
    """The exact bytes a signature covers; the network id is length-prefixed so no two
    (domain, network, payload) triples share an input."""
    return domain + b"\x00" + len(network_id).to_bytes(1, "big") + network_id + payload


class Signer:
    """An Ed25519 private key bound to one network."""

    __slots__ = ("_key", "public_key", "node_id", "network_id")

    def __init__(self, private_key: bytes, network_id: bytes) -> None:
        """Load a raw 32-byte Ed25519 private key.

        Raises:
            LocalProtocolError: the key is not 32 bytes.
        """
        if len(private_key) != 32:
            raise LocalProtocolError("an Ed25519 private key is 32 raw bytes")
        public_key, self._key = crypto_sign_seed_keypair(private_key)
        self.public_key: bytes = public_key
        self.node_id: bytes = node_id_of(self.public_key)
        self.network_id = network_id

    def sign(self, domain: bytes, payload: bytes) -> bytes:
        """Return the 64-byte signature of `payload` under `domain` and this network."""
        signed: bytes = crypto_sign(signing_input(domain, self.network_id, payload), self._key)
        return signed[:SIGNATURE_BYTES]


class VerifiedCache:
    """Remembers which (domain, network, key, payload, signature) digests verified.

    Deterministic, so simulated peers may share one instance: 1,000 peers then pay once for
    the same signature instead of 1,000 times.
    """

    __slots__ = ("_recent", "_older", "capacity", "verified", "hits", "failures")

    def __init__(self, capacity: int = 65536) -> None:
        # Two generations of digests: new ones go into the recent set; when it holds half the
        # capacity it becomes the older one and the oldest generation goes, so between half
        # the capacity and all of it is remembered. A hit in the older set is kept on. An LRU
        # OrderedDict held the same digests in 1.6x the memory (a linked node each): 10 MB a
        # peer when full, which bench_soak's RSS grew by over its first minutes (decision 81).
        self._recent: set[bytes] = set()
        self._older: set[bytes] = set()
        self.capacity = capacity
        self.verified = 0
        """Signatures checked with real Ed25519 work."""
        self.hits = 0
        """Checks answered from the cache."""
        self.failures = 0
        """Signatures that did not verify."""

    def verify(
        self, domain: bytes, network_id: bytes, public_key: bytes, payload: bytes, sig: bytes
    ) -> bool:
        """Return True if `sig` is `public_key`'s signature of `payload` under `domain`.

        Never raises on malformed keys or signatures: they simply do not verify.
        """
        if len(public_key) != PUBLIC_KEY_BYTES or len(sig) != SIGNATURE_BYTES:
            self.failures += 1
            return False
        message = signing_input(domain, network_id, payload)
        digest = hashlib.sha256(public_key + sig + message).digest()
        if digest in self._recent:
            self.hits += 1
            return True
        if digest in self._older:
            self.hits += 1
            self._remember(digest)
            return True
        if not self.check(domain, network_id, public_key, payload, sig, message):
            self.failures += 1
            return False
        self.verified += 1
        self._remember(digest)
        return True

    def _remember(self, digest: bytes) -> None:
        self._recent.add(digest)
        if len(self._recent) >= max(1, self.capacity // 2):
            self._older, self._recent = self._recent, set()

    def check(
        self,
        domain: bytes,
        network_id: bytes,
        public_key: bytes,
        payload: bytes,
        sig: bytes,
        message: bytes,
    ) -> bool:
        """The Ed25519 work behind `verify` for a digest not remembered (`message` is the
        signing input of the other arguments). The simulator overrides it to share the work
        between peers while each peer's cache still counts its own (`protocol.sim.peer_cache`).
        """
        try:
            crypto_sign_open(sig + message, public_key)
        except (CryptoError, ValueError, TypeError):
            return False
        return True
