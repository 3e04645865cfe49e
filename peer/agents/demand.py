"""Signed LLM demand events: how peers share a network-wide model rate limit.

Theory of operation. With a network-wide requests-per-minute limit per model, every agent
host gossips its per-model demand every `DEMAND_INTERVAL` seconds as the user event
`DEMAND_EVENT`, and divides the limit by the demands it heard (`limits.NetworkShare`). User
events are unsigned and their origin is only a claim, so the payload carries its own proof:
`seal_demand` signs it with the origin's identity key under `DOMAIN_DEMAND`, and
`DemandBoard.observe` verifies it against the key membership holds for the claimed origin.

Payload: signature (64 bytes) ‖ incarnation (8 bytes, big-endian) ‖ sequence (8 bytes) ‖
`limits.encode_demand` JSON ({model: requests per minute}); the signature covers the rest.

Invariants:
- A demand counts only if the claimed origin is a known member other than this peer, the
  signature is that member's, and (incarnation, sequence) is above the last one taken from it
  (a replayed or reordered event changes nothing). The sequence restarts with the host; the
  incarnation rises with every restart, so the pair only grows.
- Values are bounded: each must be finite and >= 0 (the payload is refused otherwise), and
  counts at most the limit itself, since no peer can use more than the whole network's
  limit; at most `MAX_MODELS` models are tracked.
- A refused event changes no share: it is dropped and counted by reason (`dropped`).
- Pure: `now` is a parameter; the keys come from a lookup the host gives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from peer.agents.limits import MAX_DEMAND_BYTES, NetworkShare, decode_demand, encode_demand
from protocol.identity import SIGNATURE_BYTES, Signer, VerifiedCache, short_id

DEMAND_EVENT = "grapevine.llm-demand"
DEMAND_INTERVAL = 5.0
"""Seconds between two demand broadcasts; others forget a peer after 3 intervals of silence."""
DOMAIN_DEMAND = b"grapevine/llm-demand/v1"
"""Signature domain of demand payloads (see `protocol.identity.signing_input`)."""
MAX_MODELS = 64
"""Models whose demand a peer tracks; a further model is tracked only once one falls silent."""
NODE_ID_CHARS = 52
"""A node id as the API shows it: its whole base32 form."""
_COUNTER_BYTES = 8
HEADER_BYTES = SIGNATURE_BYTES + 2 * _COUNTER_BYTES
"""Signature and counters before the demand JSON of a payload."""

KeyOf = Callable[[bytes], bytes | None]
"""key_of(node_id): the Ed25519 public key membership holds for a member, or None."""


def seal_demand(
    signer: Signer, incarnation: int, sequence: int, demand: Mapping[str, float]
) -> bytes:
    """The signed payload of a demand event.

    Raises:
        ValueError: a negative or non-finite demand, an oversized encoding, or a counter
            outside 0..2**64-1.
    """
    try:
        counters = incarnation.to_bytes(_COUNTER_BYTES, "big") + sequence.to_bytes(
            _COUNTER_BYTES, "big"
        )
    except OverflowError:
        raise ValueError("demand counters must be within 0..2**64-1") from None
    body = counters + encode_demand(demand)
    return signer.sign(DOMAIN_DEMAND, body) + body


class DemandBoard:
    """The demands this peer believes, per model, and its share of each model's limit.

    Args:
        me: this peer's node id.
        limit: the network-wide requests per minute of each model (> 0).
        network_id: the network the signatures are bound to.
        key_of: the public key of a member (`Node.member`), None if unknown.
    """

    def __init__(self, me: bytes, limit: float, network_id: bytes, key_of: KeyOf) -> None:
        self.me = short_id(me, NODE_ID_CHARS)
        self.node_id = me
        self.limit = limit
        self.network_id = network_id
        self.key_of = key_of
        self.cache = VerifiedCache(capacity=256)
        self.dropped: Counter[str] = Counter()
        """Refused events by reason: unknown-origin, bad-signature, malformed, stale."""
        self._last: dict[bytes, tuple[int, int]] = {}
        """Per origin, the (incarnation, sequence) of the last demand taken."""
        self._shares: dict[str, NetworkShare] = {}

    def share(self, model: str, my_demand: float, now: float) -> float:
        """This peer's requests per minute of `model`'s network-wide limit at `now`."""
        share = self._shares.get(model)
        if share is None:
            share = self._shares[model] = NetworkShare(self.limit, 3 * DEMAND_INTERVAL)
        return share.share(self.me, my_demand, now)

    def observe(self, origin: bytes, payload: bytes, now: float) -> str | None:
        """Take in a demand event claimed to come from `origin`.

        Returns:
            None if it was taken, else the reason it was dropped (also counted in `dropped`).
        """
        if origin == self.node_id:
            return None
        reason = self._refusal(origin, payload)
        if reason is not None:
            self.dropped[reason] += 1
            return reason
        self._last[origin] = _counters(payload)
        demand = decode_demand(payload[HEADER_BYTES:])
        peer = short_id(origin, NODE_ID_CHARS)
        for model in set(demand) | set(self._shares):
            share = self._tracked(model, now)
            if share is not None:
                share.observe(peer, min(demand.get(model, 0.0), self.limit), now)
        return None

    def forget(self, gone: Callable[[bytes], bool]) -> None:
        """Forget the last counters of the origins `gone` says have left (bounds memory)."""
        for origin in [o for o in self._last if gone(o)]:
            del self._last[origin]

    def _refusal(self, origin: bytes, payload: bytes) -> str | None:
        if not HEADER_BYTES <= len(payload) <= HEADER_BYTES + MAX_DEMAND_BYTES:
            return "malformed"
        key = self.key_of(origin)
        if key is None:
            return "unknown-origin"
        sig, body = payload[:SIGNATURE_BYTES], payload[SIGNATURE_BYTES:]
        if not self.cache.verify(DOMAIN_DEMAND, self.network_id, key, body, sig):
            return "bad-signature"
        if _counters(payload) <= self._last.get(origin, (-1, -1)):
            return "stale"
        try:
            decode_demand(payload[HEADER_BYTES:])
        except ValueError:
            return "malformed"
        return None

    def _tracked(self, model: str, now: float) -> NetworkShare | None:
        share = self._shares.get(model)
        if share is not None:
            return share
        if len(self._shares) >= MAX_MODELS:
            silent = [m for m, s in self._shares.items() if s.peers(now) == 0]
            if not silent:
                self.dropped["too-many-models"] += 1
                return None
            del self._shares[silent[0]]
        share = self._shares[model] = NetworkShare(self.limit, 3 * DEMAND_INTERVAL)
        return share


def _counters(payload: bytes) -> tuple[int, int]:
    start = SIGNATURE_BYTES
    middle = start + _COUNTER_BYTES
    return (
        int.from_bytes(payload[start:middle], "big"),
        int.from_bytes(payload[middle:HEADER_BYTES], "big"),
    )
