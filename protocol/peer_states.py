"""Peer states: each peer's small advertisement of the roles it runs and how busy it is.

Invariants:
- Per peer the state with the greatest version wins; an older or equal one changes nothing.
- A state for a peer not yet a known member is kept aside (bounded, oldest dropped first) and
  applied once the member is known: its gossiped copies are skipped as already seen meanwhile.
- Our own version starts at `incarnation << 32` and only grows, so a restarted peer's states
  supersede those of its earlier lives; a record of an earlier life of ours is superseded
  rather than adopted.
- `full_since` remembers since when a peer has advertised no free slot (read by the task rules).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

from protocol.codec import encode_message
from protocol.wire import PeerState

_EARLY_STATES = 1024
"""Peer states held for members not yet known (oldest dropped first)."""


class Port(Protocol):
    """What peer states need from the node: a way to gossip."""

    def gossip(self, key: Hashable, message: bytes) -> None: ...


class PeerStates:
    """The latest state of every peer, ours included.

    Args:
        node_id: this peer's id.
        incarnation: this peer's starting incarnation (orders our states across restarts).
        is_member: whether a node id is a known member.
        port: where our own and newly learnt states are gossiped.
    """

    def __init__(
        self, node_id: bytes, incarnation: int, is_member: Callable[[bytes], bool], port: Port
    ) -> None:
        self.node_id = node_id
        self.is_member = is_member
        self.port = port
        self.states: dict[bytes, PeerState] = {}
        self._early: dict[bytes, PeerState] = {}
        self._full_since: dict[bytes, float] = {}
        self._version = incarnation << 32

    def advertise(
        self, roles: tuple[str, ...], free_slots: int, queue_len: int, load: float
    ) -> None:
        """Make and gossip a new state of ours."""
        self._version += 1
        state = PeerState(
            self.node_id, self._version, tuple(roles), free_slots, queue_len, float(load)
        )
        self.states[self.node_id] = state
        self.port.gossip(("state", self.node_id), encode_message(state))

    def apply(self, now: float, state: PeerState, raw: bytes | None) -> bool:
        """Merge a state received (`raw` its wire bytes, None to re-encode).

        Returns:
            True if what the task rules read changed: the peer's roles or whether it is full.
        """
        if not self.is_member(state.node_id):
            # Gossip may bring a peer's state before its alive record; its copies are then
            # skipped as already seen, so keep it until the member is known.
            early = self._early.get(state.node_id)
            if early is None or early.version < state.version:
                self._early[state.node_id] = state
                if len(self._early) > _EARLY_STATES:
                    self._early.pop(next(iter(self._early)))
            return False
        known = self.states.get(state.node_id)
        if known is not None and known.version >= state.version:
            return False
        if state.node_id == self.node_id:
            # A record from an earlier life of ours: supersede it rather than adopt it.
            self._version = state.version
            return False
        self.states[state.node_id] = state
        self.port.gossip(("state", state.node_id), raw or encode_message(state))
        if state.free_slots > 0:
            self._full_since.pop(state.node_id, None)
        else:
            self._full_since.setdefault(state.node_id, now)
        # The task rules read roles and fullness, not the number of free slots: a peer going
        # from 3 free slots to 2 changes no decision, and re-deciding every open task on each
        # such change costs O(open tasks) per gossiped state.
        return known is None or (known.roles, known.free_slots > 0) != (
            state.roles,
            state.free_slots > 0,
        )

    def member_known(self, now: float, node_id: bytes) -> bool:
        """A member became known or came back: apply the state kept aside for it, if any.

        Returns:
            As `apply`.
        """
        early = self._early.pop(node_id, None)
        return early is not None and self.apply(now, early, None)

    def forget(self, node_id: bytes) -> None:
        """Drop what we know of a member that was reaped."""
        self.states.pop(node_id, None)
        self._full_since.pop(node_id, None)

    def full_since(self, node_id: bytes) -> float | None:
        """Since when `node_id` has advertised no free execution slot (None: it has one)."""
        return self._full_since.get(node_id)
