"""The state the task rules share, and the small helpers every part of them uses.

`Tasks` (in `protocol.tasks.plane`) is assembled from one mixin per concept (repair, merge,
grants, execution), each a subclass of `TaskCore`, so they share one peer's task state and
one port without passing it around.

Invariants:
- Input from peers comes with the address it came from; `LOCAL` marks objects made here (no
  address is empty, so no peer can pose as it) and `STORE` objects re-applied from the store
  on restart (verified like any peer's).
- Objects made here go to the task's audience (`protocol.tasks.placement.audience`) directly
  and nowhere else; `TaskState.sent_to` remembers who got them. A claim or checkpoint made
  here waits up to `LINGER` for the next objects of its run made here and goes with them: all
  at once with the run's result, or when the first one's time is up. A record submitted here
  waits for the input to settle, and goes with our claim if we claimed the task meanwhile.
- Each task has at most one pending wake-up (`TaskStandby`), the earliest asked for.
- Decisions wait for `settle`: tasks touched by an input are listed in `unsettled` and looked
  at once the whole input is applied.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from protocol.codec import encode_message
from protocol.effects import Command, Dropped
from protocol.identity import Signer, VerifiedCache
from protocol.membership import Port as MembershipPort
from protocol.slots import SlotLedger
from protocol.tasks.messages import (
    Checkpoint,
    Claim,
    EpochGrant,
    Inventory,
    Result,
    TaskHave,
    TaskWant,
)
from protocol.tasks.placement import CandidateRankings, ReplicaSets, audience, top_by_score
from protocol.tasks.state import TaskState, hrw_score
from protocol.tasks.tombstone import Tombstone
from protocol.timers import LingerDue, TaskStandby
from protocol.wire import Message

LOCAL, STORE = "", "store"
"""The `src` of objects made here (no address is empty, so no peer can pose as it), and of
objects re-applied from the store on restart (verified like any peer's)."""

MAX_WANT = 10_000
"""Task ids asked for, or compared, in one message."""
SYNC_BATCH_BYTES = 512 * 1024
"""Task objects sent to one peer are split into batches of about this many bytes."""
INVENTORY_BATCH_BYTES = 256 * 1024
"""Bytes of inventories (about 64 per task and 57 per key) in one `TaskHave`."""

ParkedKey = tuple[str, bytes, int, bytes]
"""("claim", "result", "grant" or "checkpoint", task id, epoch, owner or grantee (a
checkpoint's owner and sequence number)) of an object kept aside (see `merge`)."""
Parkable = Claim | Result | EpochGrant | Checkpoint
"""The objects kept while they wait for what they build on (see `Merge._park`)."""


class Lingering(NamedTuple):
    """Objects of a run made here not sent to the task's audience yet (see `TaskCore.linger`)."""

    due: float
    """When they go without waiting for more (`LINGER` after the first)."""
    raws: tuple[bytes, ...]
    """The encoded claim and checkpoints in the order made, after the task's record when it
    was submitted here."""
    extras: tuple[tuple[bytes, bytes], ...] = ()
    """(node id, message) sent to one peer only, after the objects: progress reports of the
    run's steps (`TaskCore.send_with_run`)."""


LINGER = 0.05
"""Seconds the first claim or checkpoint of a run made here waits for more before it is sent
(see `TaskCore.linger`). A short task's steps and result follow its claim within
milliseconds, and then travel in one envelope per destination (decisions 50, 85 and 97). They
are on our disk meanwhile (a restart resumes them)."""


class View(Protocol):
    """What the task rules need to know about membership."""

    def is_down(self, node_id: bytes) -> bool: ...
    def confirmed_down(self, node_id: bytes) -> bool: ...
    def capable(self, role: str) -> list[bytes]: ...
    def addr_of(self, node_id: bytes) -> str | None: ...
    def full_since(self, node_id: bytes) -> float | None: ...
    def down_since(self, node_id: bytes) -> float | None: ...
    def dead_since(self, after: float) -> list[bytes]: ...
    def live_members(self) -> tuple[bytes, ...]: ...
    def known_members(self) -> tuple[bytes, ...]: ...
    def advertises(self, node_id: bytes, role: str) -> bool | None: ...


class Port(MembershipPort, Protocol):
    """What the task rules need from the node: membership's port, and three more."""

    def send_to_random(
        self, k: int, messages: list[bytes], exclude: frozenset[bytes] = frozenset()
    ) -> None: ...
    def slots_changed(self) -> None: ...
    def command(self, command: Command) -> None: ...
    def send_lazy(self, addr: str, messages: list[bytes]) -> None: ...
    def flush_lazy(self) -> None: ...


class TaskCore(ABC):
    """One peer's task state and the helpers its rules share."""

    def __init__(
        self,
        signer: Signer,
        network_id: bytes,
        incarnation: Callable[[], int],
        standby_delay: float,
        replication: int,
        cache: VerifiedCache,
        port: Port,
        view: View,
        *,
        retention: float,
        tombstone_grace: float,
        down_grace: float,
    ) -> None:
        self.signer = signer
        self.node_id = signer.node_id
        self.network_id = network_id
        self.incarnation = incarnation
        self.standby_delay = standby_delay
        self.down_grace = down_grace
        """Seconds a member declared dead here keeps its place in line and its claims (see
        `in_line` and `claim_rule`): a live member falsely declared dead refutes within
        them."""
        self.replication = replication
        self.cache = cache
        self.port = port
        self.view = view
        self.replicas = ReplicaSets(replication + 1)
        self.repaired_for: tuple[bytes, ...] = ()
        """The live membership the audiences of open tasks were last repaired for."""
        self.sync_due: dict[bytes, tuple[float, float]] = {}
        """Tasks that changed lately -> (next replica sync, its interval); see `repair`."""
        self.next_sync = 0.0
        """When due replica syncs are next sent."""
        self.alike: dict[bytes, tuple[bytes, set[bytes]]] = {}
        """Tasks in their replica syncs -> (our digest, the peers whose inventory showed it
        too): those need no inventory of ours while we hold the same (see `Repair.sync`)."""
        self.tasks: dict[bytes, TaskState] = {}
        self.slots: SlotLedger[bytes, int] = SlotLedger()
        """Tasks executing here, by id, with the epoch they run under; suspended ones (waiting
        on their children) hold no slot."""
        self.open: set[bytes] = set()
        """Tasks with a record and neither an accepted result nor a cancel."""
        self.children: dict[bytes, set[bytes]] = {}
        """Parent task id -> ids of the held tasks whose record names it."""
        self.roles: frozenset[str] = frozenset()
        self.passed: set[bytes] = set()
        """Tasks we were first in line for but passed for lack of a free slot."""
        self.max_running = 0
        """Executions this peer runs at once before it passes its turn to standbys."""
        self.quiet_until = 0.0
        """After a stall no claim is made before this time: what we missed arrives first."""
        self.counters: Counter[str] = Counter()
        self.last_down = 0.0
        """When a member last went down: the standby order of unclaimed tasks changed then."""
        self.parked: dict[ParkedKey, tuple[Parkable, bytes, str]] = {}
        """Claims and results that arrived before what they build on (a claim, a grant, the
        record), oldest first."""
        self.parked_by_task: dict[bytes, list[ParkedKey]] = {}
        self.asked: dict[bytes, float] = {}
        """When the sender of a task's parked objects was last asked for what they build on."""
        self.rankings = CandidateRankings()
        """Open tasks' candidates in HRW order (see `candidates`)."""
        self.pulled = False
        """Whether this peer pulled its shards from the live members since it started."""
        self.pull_at: float | None = None
        """When this peer pulls its shards, once it has joined (see `repair`)."""
        self.took_part = False
        """Whether a peer sent us a task object before any anti-entropy summary came: we were
        a member when the network's first tasks were made, so the pull is skipped (see
        `Repair.on_shards`)."""
        self.restored = False
        """Whether this peer restored task objects or tombstones from its store (it restarted:
        what changed while it was down is pulled, whatever came first)."""
        self.shard_answered: dict[bytes, float] = {}
        """When each partner's anti-entropy summary was last answered (see `repair`)."""
        self.armed: dict[bytes, float] = {}
        """The pending wake-up (`TaskStandby`) of each task, by the time it is armed for."""
        self.unsettled: dict[bytes, None] = {}
        """Tasks to decide on once the current input is fully applied (see `settle`)."""
        self.held_owed: dict[bytes, bytes] = {}
        """Records received in the input being applied, by task id, with their origin: it is
        told we hold them once the input is settled (`Merge.pay_held`)."""
        self.lingering: dict[bytes, Lingering] = {}
        """Claims and checkpoints made here not sent to the audience yet, by task id, in the
        order of their times to go."""
        self.unspread: dict[bytes, bytes] = {}
        """Records submitted here in the input being applied, by task id: they go out once
        it is settled, with our claim if we made one (`spread_submitted`)."""
        self.asks_made: dict[bytes, tuple[bytes, int, float]] = {}
        """Per task this peer asks a grant of: (whom it asks, asks made to it in a row, when
        it may ask again), see `Executions.ask`."""
        self.asks_answered: dict[tuple[bytes, bytes], float] = {}
        """When each (task id, asker) was last answered, oldest first, recent ones only
        (`Grants.on_ask`)."""
        # Retention (see `protocol.tasks.retention`).
        self.retention = retention
        self.tombstone_grace = tombstone_grace
        self.final_at: dict[bytes, float] = {}
        """Held tasks with an accepted result or a cancel, by when they got it here."""
        self.compaction_due: list[tuple[float, bytes]] = []
        """Heap of (when its tree may be due for compaction, task id)."""
        self.tombstones: dict[bytes, Tombstone] = {}
        """What is left of the tasks compacted here, by id."""
        self.expiry_due: list[tuple[float, bytes]] = []
        """Heap of (when the tombstone expires, task id)."""
        self.retention_armed: float | None = None
        """When the pending `RetentionDue` fires (None: none pending)."""

    @abstractmethod
    def fence(self, now: float, task_id: bytes, epoch: int, reason: str) -> None:
        """Stop our execution of `epoch` of the task, if it still runs (see `execution`)."""

    @abstractmethod
    def hand_on(self, now: float, st: TaskState) -> None:
        """As the task's primary with no free slot, grant our turn to a standby (see
        `grants`)."""

    @abstractmethod
    def grant_takeover(
        self, now: float, st: TaskState, epoch: int, asker: bytes, src: str | None
    ) -> None:
        """As the task's arbiter, grant takeover `epoch` to `asker` (see `grants`)."""

    @abstractmethod
    def apply_epoch_grant(self, now: float, g: EpochGrant, raw: bytes, src: str) -> None:
        """Keep an arbiter's grant of a takeover epoch (see `merge`)."""

    @abstractmethod
    def has_room(self) -> bool:
        """Whether a slot is free here (see `execution`)."""

    def state_of(self, task_id: bytes, now: float) -> TaskState:
        """The task's state, created empty if not held yet."""
        st = self.tasks.get(task_id)
        if st is None:
            st = self.tasks[task_id] = TaskState(task_id, now)
        return st

    def verified(
        self, domain: bytes, key: bytes, payload: bytes, sig: bytes, src: str, what: str
    ) -> bool:
        """Whether the signature checks out; a bad one is counted and noted as dropped."""
        if self.cache.verify(domain, self.network_id, key, payload, sig):
            return True
        self.counters[f"bad signature: {what}"] += 1
        self.port.note(Dropped(src, f"{what} with a bad signature"))
        return False

    def ask_for(self, src: str, task_id: bytes) -> None:
        """Ask the peer at `src` for what we lack of the task (not ourselves or the store):
        our inventory where we hold some of it, so only the rest comes back, else all of it."""
        if src in (LOCAL, STORE):
            return
        if task_id in self.tasks:
            self.send_inventories(src, [task_id], reply=False)
        else:
            self.port.send(src, [encode_message(TaskWant((task_id,)))], piggyback=False)

    def send_objects(self, addr: str, task_ids: Iterable[bytes]) -> None:
        """Send every object held of these tasks to `addr`, in batches."""
        self.send_messages(
            addr, (obj for tid in task_ids if (st := self.tasks.get(tid)) for obj in st.objects())
        )

    def send_messages(self, addr: str, messages: Iterable[Message]) -> None:
        """Send these task objects to `addr`, in batches of about `SYNC_BATCH_BYTES`."""
        batch: list[bytes] = []
        size = 0
        for obj in messages:
            raw = encode_message(obj)
            batch.append(raw)
            size += len(raw)
            if size > SYNC_BATCH_BYTES:
                self.port.send(addr, batch, piggyback=False)
                batch, size = [], 0
        if batch:
            self.port.send(addr, batch, piggyback=False)

    def send_inventories(
        self, addr: str, task_ids: Iterable[bytes], reply: bool, lazy: bool = False
    ) -> None:
        """Send our inventory of these held tasks to `addr` (`TaskHave`), in batches; `lazy`
        ones ride with the next envelope there (`Port.send_lazy`)."""
        send = self.port.send_lazy if lazy else lambda a, m: self.port.send(a, m, False)
        batch: list[Inventory] = []
        size = 0
        for tid in task_ids:
            st = self.tasks.get(tid)
            if st is None:
                continue
            # Kept while its replicas still compare it (`sync_due`), rebuilt when asked later.
            inv = st.inventory(keep=tid in self.sync_due)
            batch.append(inv)
            size += 64 + len(inv.keys)
            if size >= INVENTORY_BATCH_BYTES:
                send(addr, [encode_message(TaskHave(tuple(batch), reply))])
                batch, size = [], 0
        if batch:
            send(addr, [encode_message(TaskHave(tuple(batch), reply))])

    def candidates(self, st: TaskState, epoch: int) -> list[bytes]:
        """Live peers able to run `epoch` of the task in HRW order, its primary first (for a
        takeover, without the owner it takes over from)."""
        assert st.record is not None
        claim = st.claim
        exclude = claim.owner if epoch > 1 and claim is not None else b""
        capable = self.view.capable(st.record.role)
        return self.rankings.rank(st.task_id, [n for n in capable if n != exclude])

    def in_line(self, st: TaskState, epoch: int, now: float) -> list[bytes]:
        """The peers in line to run `epoch` of the task, in HRW order: its candidates and,
        for epoch 1, the members able to run it that were declared dead here within the last
        `down_grace` seconds. Such a member may be alive and have claimed the task (a busy
        peer is declared dead and refutes seconds later), so the next peer in line asks it
        before claiming, as a standby asks its primary (decision 80)."""
        ranked = self.candidates(st, epoch)
        if epoch != 1 or self.last_down < now - self.down_grace:
            return ranked
        assert st.record is not None
        role = st.record.role
        lately = [
            n for n in self.view.dead_since(now - self.down_grace) if self.view.advertises(n, role)
        ]
        if not lately:
            return ranked
        return sorted([*ranked, *lately], key=lambda n: hrw_score(st.task_id, n), reverse=True)

    # Placement: who receives a task's objects.

    def audience(self, st: TaskState) -> set[bytes]:
        """The peers that must receive the objects of `st` directly (see `placement`)."""
        return self.audience_with_self(st) - {self.node_id}

    def audience_with_self(self, st: TaskState) -> set[bytes]:
        """The task's audience, this peer included if it belongs to it."""
        replicas = self.replicas.of(st.task_id, self.view.live_members())
        return audience(st, replicas, *self.waits_for(st))

    def waits_for(self, st: TaskState) -> tuple[bytes | None, int | None]:
        """(first in line, epoch) while the task waits for an owner: unclaimed, or its owner
        is down; else (None, None)."""
        if st.record is None or st.accepted is not None or st.cancel is not None:
            return None, None
        claim = st.claim
        if claim is not None and not self.view.is_down(claim.owner):
            return None, None
        epoch = 1 if claim is None else claim.epoch + 1
        ranked = self.candidates(st, epoch)
        return (ranked[0] if ranked else None), epoch

    def replica_set(self, task_id: bytes) -> list[bytes]:
        """The task's replica set in our view, its arbiter first."""
        return self.replicas.of(task_id, self.view.live_members())

    def arbiter(self, st: TaskState) -> bytes | None:
        """The task's arbiter in our view: the first live member of its home, the top k
        members by HRW among every member known whatever its status; None while none of them
        is live (then no takeover is granted until one returns, or is forgotten)."""
        home = top_by_score(st.task_id, self.view.known_members(), self.replicas.k)
        return next((n for n in home if not self.view.is_down(n)), None)

    def may_arbitrate(self, task_id: bytes, node_id: bytes) -> bool:
        """Whether `node_id` may grant takeovers of the task: it is in the task's home (see
        `arbiter`). Liveness is left out on purpose: every receiver must judge a grant alike
        whatever it believes of who is up, or replicas that judged differently would never
        converge (decision 25)."""
        return node_id in top_by_score(task_id, self.view.known_members(), self.replicas.k)

    def linger(self, now: float, st: TaskState, raw: bytes) -> None:
        """Send our claim or checkpoint `raw` to the task's audience with the next objects of
        its run made here: the result, or whatever lingers `LINGER` after the first."""
        # To every member of the audience alike. The candidate ranked next after us used to
        # get the claim at once, lest a death of ours heard within the linger (a forged
        # rumour, or a busy peer falsely declared dead) had it claim too (decision 50). Since
        # decision 80 a member declared dead keeps its place in line for `down_grace`: the
        # next candidate asks us and gets the claim in the answer. The envelope that claim
        # cost at once, before its run's result, was one of about eleven per task at 30 peers
        # (decision 85). An agent's run writes a checkpoint before and after each model call:
        # sent at once, each cost one envelope per replica, 15 of a task's 126 at 100 peers;
        # lingering, a short run's steps go with its result (decision 97).
        waiting = self.lingering.get(st.task_id)
        if waiting is not None:
            self.lingering[st.task_id] = waiting._replace(raws=(*waiting.raws, raw))
            return
        if not self.lingering:
            self.port.schedule(now + LINGER, LingerDue())
        self.lingering[st.task_id] = Lingering(now + LINGER, (raw,))

    def spread_submitted(self) -> None:
        """Send the records submitted in the input just settled: each with our claim, when
        we claimed its task meanwhile, else alone at once."""
        # A task submitted here while we have a slot to spare is placed to run here (decision
        # 96): its record, claim and result then reach each replica in one envelope, not two.
        # The client's acknowledgement waits for the replicas to hold the record, so it waits
        # for the claim's linger at most.
        for task_id, raw in self.unspread.items():
            st = self.tasks.get(task_id)
            waiting = self.lingering.get(task_id)
            if waiting is not None:
                self.lingering[task_id] = waiting._replace(raws=(raw, *waiting.raws))
            elif st is not None:
                self.spread(st, [raw])
        self.unspread.clear()

    def send_lingering(self, now: float) -> None:
        """Send the lingering objects whose time to wait is up at `now` (`LingerDue` fired;
        every one at `math.inf`)."""
        for task_id, waiting in list(self.lingering.items()):
            if waiting.due > now:
                self.port.schedule(waiting.due, LingerDue())  # in the order of their times
                return
            st = self.tasks.get(task_id)
            if st is None:
                del self.lingering[task_id]
            else:
                self.spread(st, [])  # takes them out of `lingering`

    def spread(self, st: TaskState, raws: list[bytes]) -> None:
        """Send objects made here to the task's audience (after those still lingering, and
        with the messages waiting for them: `send_with_run`)."""
        # Directly, and nowhere else: gossiping them to every peer made a task cost O(N)
        # (decision 18).
        waiting = self.lingering.pop(st.task_id, None)
        targets = self.audience(st)  # this peer excluded
        objects = [*waiting.raws, *raws] if waiting is not None else raws
        extras: dict[bytes, list[bytes]] = {}
        for node_id, raw in waiting.extras if waiting is not None else ():
            extras.setdefault(node_id, []).append(raw)
        for node_id in sorted(targets | extras.keys()):
            addr = self.view.addr_of(node_id)
            messages = [*(objects if node_id in targets else ()), *extras.get(node_id, ())]
            if addr is not None and messages:
                self.port.send(addr, messages, piggyback=False)
        st.add_sent_to(targets)

    def send_with_run(self, task_id: bytes, node_id: bytes, addr: str, raw: bytes) -> None:
        """Send `raw` (a progress report) to `node_id` at `addr` with the objects of our run of
        the task still lingering, or at once if none linger."""
        # A step is reported once its checkpoint is written: sent ahead of it, the report
        # cost an envelope of its own, and showed watchers a step that a takeover would not
        # resume from had we died within the linger (decision 97).
        waiting = self.lingering.get(task_id)
        if waiting is None:
            self.port.send(addr, [raw], piggyback=False)
            return
        self.lingering[task_id] = waiting._replace(extras=(*waiting.extras, (node_id, raw)))

    # Timing.

    def wake(self, task_id: bytes, at: float) -> None:
        """Look at the task again at `at` (or earlier, if a wake-up is already armed)."""
        # Every look at an open task may ask to look again later, and a busy network changes
        # the view (and so causes looks) many times a second: keep one wake-up per task, the
        # earliest, or timers pile up by the thousand (seen with 100 peers and 1,000 tasks).
        armed = self.armed.get(task_id)
        if armed is not None and armed <= at:
            return
        self.armed[task_id] = at
        self.port.schedule(at, TaskStandby(task_id, at))

    def urgency(self, task_id: bytes) -> tuple[int, float, bytes]:
        """The order tasks are decided in: highest priority first, then first come."""
        # First come, first served: by id alone, a task whose id sorts last waited for as long
        # as others kept arriving (seconds under steady load). The id breaks ties, so the order
        # never depends on set iteration (hash randomisation would make simulated runs differ
        # between processes).
        st = self.tasks[task_id]
        return (-st.record.priority if st.record is not None else 0, st.first_seen, task_id)
