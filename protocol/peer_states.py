"""Peer states: each peer's small advertisement of the roles it runs and how busy it is.

Invariants:
- A state is signed by its peer (`DOMAIN_PEER_STATE`) and verified against the public key of
  the member it names, so no peer can speak for another: an unsigned or forged state changes
  nothing and is reported as `Dropped`.
- Per peer the state with the greatest `(incarnation, version)` wins; an older or equal one
  changes nothing and is not even verified.
- A state's incarnation is bounded on receipt like any claim about a member (below
  `MAX_INCARNATION`, within `INCARNATION_STEP` of the member's known incarnation); its version
  counts only that peer's own states, so only the peer itself could inflate it, and the
  signature already stops anyone else.
- A state for a peer not yet a known member is kept aside (bounded, oldest dropped first) and
  verified and applied once the member is known: its gossiped copies are skipped as already
  seen meanwhile.
- Our own states carry the incarnation we started with and a version counting up from 1, so a
  restarted peer's states supersede those of its earlier lives; a record of an earlier life of
  ours is superseded rather than adopted.
- Only our states that were gossiped leave this peer (`published`; push-pull carries that one,
  `shared`): a version made for our own reading (every execution's start and end changes the
  free slots) is new to every peer that receives it, and each one gossips it on, so sharing
  it in push-pull spread one unplanned version per member and exchange (decision 63).
- `full_since` remembers since when a peer has advertised no free slot (read by the task rules).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

from protocol.codec import encode_message
from protocol.effects import Dropped, Note
from protocol.identity import DOMAIN_PEER_STATE, Signer, VerifiedCache
from protocol.member_table import Member
from protocol.wire import (
    INCARNATION_STEP,
    MAX_INCARNATION,
    ModelUsage,
    PeerState,
    peer_state_payload,
)

_EARLY_STATES = 1024
"""Peer states held for members not yet known (oldest dropped first)."""


class Port(Protocol):
    """What peer states need from the node: a way to gossip and to report drops."""

    def gossip(self, key: Hashable, message: bytes) -> None: ...
    def note(self, note: Note) -> None: ...


class PeerStates:
    """The latest state of every peer, ours included.

    Args:
        signer: this peer's identity; it signs our states.
        incarnation: this peer's starting incarnation (orders our states across restarts).
        cache: verifies other peers' signatures.
        member: the known member with a node id, or None.
        port: where our own and newly learnt states are gossiped, and drops reported.
    """

    def __init__(
        self,
        signer: Signer,
        incarnation: int,
        cache: VerifiedCache,
        member: Callable[[bytes], Member | None],
        port: Port,
    ) -> None:
        self.signer = signer
        self.node_id = signer.node_id
        self.cache = cache
        self.member = member
        self.port = port
        self.states: dict[bytes, PeerState] = {}
        self.roles_version = 0
        """Counts changes to which other peers are held and the roles they advertise, so
        `NodePort.capable` knows when its cached lists are stale."""
        self._early: dict[bytes, tuple[PeerState, str]] = {}
        self._full_since: dict[bytes, float] = {}
        self._order = (min(incarnation, MAX_INCARNATION), 0)
        self.published: PeerState | None = None
        """Our newest state gossiped: the only one of ours other peers are given."""
        self.runs: tuple[int, ...] = ()
        """Our run counts (`RUN_COUNTS`) our next state carries (`NodePort.runs_changed`)."""
        self.usage: tuple[int, int, tuple[ModelUsage, ...]] = (0, 0, ())
        """(agents, spend_micro, models) our states carry (`NodePort.usage_changed` sets
        it)."""

    def advertise(
        self,
        roles: tuple[str, ...],
        free_slots: int,
        queue_len: int,
        load: float,
        gossip: bool = True,
    ) -> None:
        """Make and sign a new state of ours, and gossip it unless `gossip` is False (then
        `gossip_own` sends the newest one later)."""
        incarnation, version = self._order[0], self._order[1] + 1
        self._order = (incarnation, version)
        roles, load = tuple(roles), float(load)
        agents, spend, models = self.usage
        payload = peer_state_payload(
            self.node_id,
            incarnation,
            version,
            roles,
            free_slots,
            queue_len,
            load,
            agents,
            spend,
            models,
            self.runs,
        )
        sig = self.signer.sign(DOMAIN_PEER_STATE, payload)
        state = PeerState(
            self.node_id,
            version,
            roles,
            free_slots,
            queue_len,
            load,
            incarnation,
            sig,
            agents,
            spend,
            models,
            self.runs,
        )
        self.states[self.node_id] = state
        if gossip:
            self.gossip_own()

    def gossip_own(self) -> None:
        """Queue our newest state for gossip (it replaces any older one still queued)."""
        state = self.states.get(self.node_id)
        if state is not None:
            self.published = state
            self.port.gossip(("state", self.node_id), encode_message(state))

    def shared(self) -> tuple[PeerState, ...]:
        """The states a push-pull carries: every other peer's, and our newest gossiped one."""
        others = tuple(s for n, s in self.states.items() if n != self.node_id)
        return others if self.published is None else (*others, self.published)

    def apply(self, now: float, state: PeerState, raw: bytes | None, src: str) -> bool:
        """Merge a state received from `src` (`raw` its wire bytes, None to re-encode).

        Returns:
            True if what the task rules read changed: the peer's roles or whether it is full.
        """
        m = self.member(state.node_id)
        if m is None:
            # Gossip may bring a peer's state before its alive record; its copies are then
            # skipped as already seen, so keep it until the member is known.
            early = self._early.get(state.node_id)
            if early is None or early[0].order < state.order:
                self._early[state.node_id] = (state, src)
                if len(self._early) > _EARLY_STATES:
                    self._early.pop(next(iter(self._early)))
            return False
        known = self.states.get(state.node_id)
        if known is not None and known.order >= state.order:
            return False
        if not self._credible(state, m, src):
            return False
        if state.node_id == self.node_id:
            # A record from an earlier life of ours: supersede it rather than adopt it.
            self._order = max(self._order, state.order)
            return False
        self.states[state.node_id] = state
        if known is None or known.roles != state.roles:
            self.roles_version += 1
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

    def _credible(self, state: PeerState, m: Member, src: str) -> bool:
        if state.incarnation > min(m.incarnation + INCARNATION_STEP, MAX_INCARNATION):
            self.port.note(Dropped(src, "peer state with an incarnation beyond the member's"))
            return False
        ok = self.cache.verify(
            DOMAIN_PEER_STATE,
            self.signer.network_id,
            m.alive.public_key,
            state.signed_payload(),
            state.sig,
        )
        if not ok:
            self.port.note(Dropped(src, "peer state with a bad signature"))
        return ok

    def member_known(self, now: float, node_id: bytes) -> bool:
        """A member became known or came back: apply the state kept aside for it, if any.

        Returns:
            As `apply`.
        """
        early = self._early.pop(node_id, None)
        return early is not None and self.apply(now, early[0], None, early[1])

    def forget(self, node_id: bytes) -> None:
        """Drop what we know of a member that was reaped."""
        if self.states.pop(node_id, None) is not None:
            self.roles_version += 1
        self._full_since.pop(node_id, None)

    def full_since(self, node_id: bytes) -> float | None:
        """Since when `node_id` has advertised no free execution slot (None: it has one)."""
        return self._full_since.get(node_id)
