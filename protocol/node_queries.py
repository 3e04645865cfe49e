"""The host's read-only query facade over one node's state (STYLE rule 13).

Invariants:
- Every method here only reads: no query changes protocol state, arms a timer or emits an
  effect, so the host may call them at any time, between or during its own calls.
- The objects returned are the protocol's own (a `TaskState`, a `Member`), shared for speed:
  the host reads them and never changes them. Collections come back as fresh lists, copies or
  read-only views; `held_tasks` iterates the live table, so the host finishes with it before
  its next call into the node.
- Nothing in `peer/` reads a part of the node (`tasks`, `membership`, ...) directly; it asks
  here, so those parts can change shape without touching the shell.

`NodeQueries` is a mixin of `protocol.node.Node`, which builds the parts it reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType

from protocol.identity import VerifiedCache
from protocol.member_table import Member
from protocol.membership import Membership
from protocol.node_port import NodePort
from protocol.peer_states import PeerStates
from protocol.tasks.listing import PageQuery
from protocol.tasks.messages import Checkpoint, TaskPage, TaskSummary
from protocol.tasks.plane import Tasks
from protocol.tasks.state import TaskState
from protocol.tasks.tombstone import Tombstone
from protocol.user_events import UserEvents
from protocol.wire import PeerState


class NodeQueries:
    """The read-only queries of `protocol.node.Node`, over the parts it composes."""

    tasks: Tasks
    advertisements: PeerStates
    membership: Membership
    user_events: UserEvents
    port: NodePort
    cache: VerifiedCache

    def task(self, task_id: bytes) -> TaskState | None:
        """The state of a task held here, or None."""
        return self.tasks.tasks.get(task_id)

    def final_since(self, task_id: bytes) -> float | None:
        """When (node time) this peer learned the held task `task_id` was final, or None."""
        return self.tasks.final_at.get(task_id)

    def checkpoints(self, task_id: bytes) -> list[Checkpoint]:
        """The steps of the task's runs held here, by (epoch, owner, sequence number)."""
        st = self.tasks.tasks.get(task_id)
        return [c for _, c in sorted(st.checkpoints.items())] if st is not None else []

    def tombstone(self, task_id: bytes) -> Tombstone | None:
        """What is left of a task compacted here, or None (see `protocol.tasks.retention`)."""
        return self.tasks.tombstones.get(task_id)

    def tombstone_count(self) -> int:
        """Tombstones held here."""
        return len(self.tasks.tombstones)

    def held_tasks(self) -> Iterator[TaskState]:
        """Every task state held here, in no particular order."""
        return iter(self.tasks.tasks.values())

    def open_tasks(self) -> list[TaskState]:
        """The held tasks with neither an accepted result nor a cancel."""
        held = self.tasks.tasks
        return [held[t] for t in self.tasks.open if t in held]

    def children(self, task_id: bytes) -> list[TaskState]:
        """The held tasks whose record names `task_id` as parent, oldest first."""
        held = self.tasks.tasks
        kids = [held[c] for c in self.tasks.children.get(task_id, ()) if c in held]
        return sorted(kids, key=_age)

    def task_counters(self) -> dict[str, int]:
        """The task plane's event counters (result flips, conflicting grants, ...), a copy."""
        return dict(self.tasks.counters)

    def membership_counters(self) -> dict[str, int]:
        """The failure detector's event counters since the start: probes, indirect probes,
        suspicions started, suspected members that proved alive, and this peer's refutations
        of accusations about itself."""
        m = self.membership
        return {
            "probes": m.probes.probes_sent,
            "indirect probes": m.probes.indirect_probes,
            "suspicions": m.suspicions,
            "suspicions refuted": m.suspicions_refuted,
            "refutations": m.false_refutations,
        }

    def running_here(self) -> frozenset[bytes]:
        """Tasks whose execution holds a slot here."""
        return frozenset(self.tasks.slots.running)

    def suspended_here(self) -> frozenset[bytes]:
        """Tasks running here that wait on their children and have freed their slot."""
        return frozenset(self.tasks.slots.suspended)

    def peer_states(self) -> Mapping[bytes, PeerState]:
        """The latest state each peer advertised (roles, free slots, load), by node id."""
        return MappingProxyType(self.advertisements.states)

    def copies_needed(self) -> int:
        """Other peers that must hold a submission before it is acknowledged (see
        `protocol.tasks.merge.Merge.copies_needed`)."""
        return self.tasks.copies_needed()

    def told_of(self, task_id: bytes) -> bool:
        """Whether this peer is in the task's audience: its news reaches it without asking."""
        return self.tasks.told_of(task_id)

    def replica_set(self, task_id: bytes) -> list[bytes]:
        """The task's replica set in this peer's view, its arbiter first."""
        return self.tasks.replica_set(task_id)

    def own_task_page(self, query: PageQuery) -> tuple[tuple[TaskSummary, ...], bool]:
        """This peer's page of a network listing: the tasks held here that it arbitrates (see
        `protocol.tasks.listing`), and whether more match past them."""
        return self.tasks.listing.own_page(query)

    def task_page(self, request: int) -> TaskPage | None:
        """The page a peer answered the listing request `request` with (`Node.ask_task_pages`),
        once it came; None before, and once it expired."""
        return self.tasks.listing.page(request)

    def signatures_verified(self) -> int:
        """Signatures this peer verified (each object digest once: the cache remembers)."""
        return self.cache.verified

    def signature_cache_hits(self) -> int:
        """Signature checks answered by the cache instead of a fresh verification."""
        return self.cache.hits

    def capable(self, role: str) -> list[bytes]:
        """Live members advertising `role`, this peer included when it serves the role."""
        return self.port.capable(role)

    def is_down(self, node_id: bytes) -> bool:
        """Dead, left, or unknown (a member forgotten after its retention is long dead)."""
        return self.port.is_down(node_id)

    @property
    def dropped(self) -> int:
        """Inputs rejected (each also reported as a `Dropped` notification)."""
        return self.port.dropped

    def members(self) -> list[Member]:
        """Every member known, this peer included."""
        return list(self.membership.members.values())

    def member(self, node_id: bytes) -> Member | None:
        """The member with `node_id`, if known."""
        return self.membership.members.get(node_id)

    @property
    def incarnation(self) -> int:
        """This peer's current incarnation."""
        return self.membership.incarnation

    @property
    def ltime(self) -> int:
        """This peer's Lamport clock of user events (the last event's, once broadcast)."""
        return self.user_events.ltime


def _age(state: TaskState) -> tuple[float, bytes]:
    """Oldest first: by the record's creation time, then by task id."""
    created = state.record.created if state.record is not None else 0.0
    return (created, state.task_id)
