"""Repair: how a task's objects reach the peers that lack them after a loss.

Invariants:
- Anti-entropy: with each push-pull a peer sends a digest of every task it holds whose replica
  set includes the partner; the receiver answers with its objects for tasks whose digests
  differ, and for tasks the sender lacks, and asks for the sender's. Its size follows what the
  two peers share, not the network's history.
- Replica sync: after a task changes, its replicas (and its origin) compare digests of it a few
  times, backing off (2, 8, 32 s), so an object lost on the way is repaired within seconds.
- Audience repair: when the live membership changes, the arbiter of each open task (first of
  its replica set) sends what it holds to audience members that never got it.
- Relay: the origin hands the claims and results it receives on to every peer it sent the
  record to, so no record holder misses the claim whatever the claimer's view.
- Reads: a `TaskRead` is answered with the task and a bounded number of its children.
- Tombstones take part in digests (`protocol.tasks.retention`) but are never asked for or sent.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.codec import encode_message
from protocol.tasks.core import MAX_WANT, STORE, TaskCore
from protocol.tasks.messages import TaskDigests, TaskRead, TaskSync, TaskWant
from protocol.tasks.state import TaskState

MAX_CHILDREN_SENT = 1024
"""Children of an asked-for task sent with it (a tree read; deeper levels are asked for)."""
SYNC_TICK = 0.5
"""How often due replica syncs are sent (seconds)."""
SYNC_FIRST, SYNC_BACKOFF, SYNC_LAST = 2.0, 4.0, 32.0
"""A changed task's replicas compare it after 2 s, then 8 s, then 32 s (see `sync`)."""


class Repair(TaskCore):
    """Anti-entropy, replica sync, audience repair, relay and reads."""

    def digests(self, partner: bytes | None) -> TaskDigests:
        """The anti-entropy summary sent with a push-pull to `partner`: the tasks held here whose
        replica set (in our view) includes it. Its size follows what the two share, not the
        network's history (None, an unknown partner: nothing)."""
        if partner is None:
            return TaskDigests(())
        live = self.view.live_members()
        held = ((tid, st.digest()) for tid, st in self.tasks.items())
        compacted = ((tid, stone.digest()) for tid, stone in self.tombstones.items())
        return TaskDigests(
            tuple(
                (tid, digest)
                for entries in (held, compacted)
                for tid, digest in entries
                if partner in self.replicas.of(tid, live)
            )
        )

    def on_digests(self, src: str, sender: bytes, msg: TaskDigests) -> None:
        """Answer a partner's anti-entropy summary."""
        # A tombstone held here neither asks nor answers: every replica compacts by itself.
        differ = [
            tid
            for tid, d in msg.entries
            if tid not in self.tombstones
            and (tid not in self.tasks or self.tasks[tid].digest() != d)
        ]
        theirs = {tid for tid, _ in msg.entries}
        live = self.view.live_members()
        mine_only = [
            tid for tid in self.tasks if tid not in theirs and sender in self.replicas.of(tid, live)
        ]
        self.send_objects(src, differ + mine_only)
        if differ:
            self.port.send(src, [encode_message(TaskWant(tuple(differ[:MAX_WANT])))], False)

    def with_children(self, task_ids: Iterable[bytes]) -> list[bytes]:
        """These tasks, each followed by a bounded number of its children held here."""
        # A reader asking for a task wants its tree too: the children held here (this peer
        # submitted them, running the task) follow it.
        out: list[bytes] = []
        for tid in task_ids:
            out.append(tid)
            out.extend(sorted(self.children.get(tid, ()))[:MAX_CHILDREN_SENT])
        return out

    def fetch(self, task_ids: list[bytes]) -> None:
        """Ask the peers that hold these tasks for every object of them and of their children:
        the replica set, and for a task held here its claim's owner and its origin (the
        origins of its children, when they are delegated from its execution)."""
        live = self.view.live_members()
        targets: dict[bytes, list[bytes]] = {}
        for tid in task_ids[:MAX_WANT]:
            peers = set(self.replicas.of(tid, live))
            st = self.tasks.get(tid)
            if st is not None and st.record is not None:
                peers.add(st.record.origin)
            if st is not None and st.claim is not None:
                peers.add(st.claim.owner)
            for node_id in peers - {self.node_id}:
                targets.setdefault(node_id, []).append(tid)
        for node_id, ids in sorted(targets.items()):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self.port.send(addr, [encode_message(TaskRead(tuple(ids)))], piggyback=False)

    def mark_changed(self, task_id: bytes, now: float) -> None:
        """The task changed here: its replicas compare it soon (see `sync`)."""
        self.sync_due[task_id] = (now + SYNC_FIRST, SYNC_FIRST)

    def sync(self, now: float) -> None:
        """Send the replica syncs that are due."""
        # A task object goes to each replica once, directly; one lost on the way would wait for
        # a random push-pull to pair the right two peers. So after a task changes, its replicas
        # compare digests of it with each other (and with its origin) a few times, backing off
        # (2, 8, 32 s): cheap where nothing was lost, and repair within seconds where it was.
        due = sorted(t for t, (at, _) in self.sync_due.items() if at <= now)
        if not due:
            return
        live = self.view.live_members()
        batches: dict[bytes, list[tuple[bytes, bytes]]] = {}
        for tid in due:
            _, interval = self.sync_due.pop(tid)
            st = self.tasks.get(tid)
            if st is None:
                continue
            if interval * SYNC_BACKOFF <= SYNC_LAST:
                self.sync_due[tid] = (now + interval * SYNC_BACKOFF, interval * SYNC_BACKOFF)
            replicas = self.replicas.of(tid, live)
            targets = set(replicas)
            if self.node_id in replicas and st.record is not None:
                targets.add(st.record.origin)
            for node_id in targets - {self.node_id}:
                batches.setdefault(node_id, []).append((tid, st.digest()))
        for node_id, entries in sorted(batches.items()):
            addr = self.view.addr_of(node_id)
            for k in range(0, len(entries), MAX_WANT):
                if addr is not None:
                    msg = encode_message(TaskSync(tuple(entries[k : k + MAX_WANT])))
                    self.port.send(addr, [msg], piggyback=False)

    def on_sync(self, src: str, msg: TaskSync) -> None:
        """Answer a replica sync: send what differs, ask for what we lack."""
        want: list[bytes] = []
        differ: list[bytes] = []
        for tid, digest in msg.entries:
            st = self.tasks.get(tid)
            if tid in self.tombstones:
                continue
            if st is None or st.digest() != digest:
                want.append(tid)
                if st is not None:
                    differ.append(tid)
        self.send_objects(src, differ)
        if want:
            self.port.send(src, [encode_message(TaskWant(tuple(want[:MAX_WANT])))], False)

    def relay(self, st: TaskState, raw: bytes, src: str, author: bytes) -> None:
        """As the task's origin, hand a received claim or result on to the record's holders."""
        # The origin sent the record to the audience of its view; a claimer's view of that
        # audience may differ (a peer's roles or liveness not yet known to it), and a record
        # holder that never hears of the claim would claim too. Receivers drop known objects
        # before verifying them: a copy costs bytes, not a signature check.
        if src == STORE or st.record is None or st.record.origin != self.node_id:
            return
        for node_id in sorted(st.sent_to - {author}):
            addr = self.view.addr_of(node_id)
            if addr is not None and addr != src:
                self.port.send(addr, [raw], piggyback=False)

    def repair(self) -> None:
        """After a change of the live membership, send open tasks to their new audience."""
        # The arbiter of each open task (first of its replica set) sends what it holds to
        # audience members that never got it (a new replica, the next standby after one died).
        # Final tasks reach new replicas through anti-entropy.
        live = self.view.live_members()
        if live == self.repaired_for:
            return
        self.repaired_for = live
        for tid in sorted(self.open):
            st = self.tasks[tid]
            if st.record is None or self.replicas.of(tid, live)[0] != self.node_id:
                continue
            missing = self.audience(st) - st.sent_to
            if missing:
                self.counters["audience repairs"] += 1
                self._send_objects_to(missing, tid)
                st.sent_to |= missing

    def _send_objects_to(self, node_ids: set[bytes], task_id: bytes) -> None:
        for node_id in sorted(node_ids):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self.send_objects(addr, [task_id])
