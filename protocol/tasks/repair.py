"""Repair: how a task's objects reach the peers that lack them after a loss.

Invariants:
- Anti-entropy: with each push-pull a peer sends a summary of the tasks it and its partner must
  both hold (in its view: both are replicas, or one is the origin and the other a replica): one
  digest per shard (the first byte of the task id), at most 256, whatever the history. The
  partner answers, for the shards whose digests differ, with its (task id, digest) entries
  there (at most `SHARD_ENTRIES` per answer, by id; the rest waits for the next exchange), and
  the first peer sends the tasks the partner lacks, asks for those it lacks, and sends its
  inventory of those both hold differently (decision 31). Answers are rate-limited per partner.
- Only the objects one side lacks travel: one side sends its inventory (`TaskHave`, object
  keys, not contents), the other sends what the inventory lacks and, where it lacks something
  itself, its own inventory back, once (decision 44). A whole task is sent only to a peer that
  holds none of it.
- Replica sync: after a task changes, its replicas (and its origin) send each other their
  inventory of it a few times, backing off (2, 8, 32 s), so an object lost on the way is
  repaired within seconds; the origin also sends its own to every peer it knows holds the
  record, in the home or not. The origin of an open task, where its result is waited for,
  goes on comparing it every 32 s until the result is here. Due syncs go out every
  `SYNC_TICK`, one message per partner.
- Audience repair: when the live membership changes, the arbiter of each open task (first of
  its replica set) sends what it holds to audience members that never got it, and every copy
  held outside its home (not as its origin) is compared with the home again (replica sync).
- Relay: the origin hands the claims and results it receives on to every peer it sent the
  record to or that told it it holds the record, so no record holder misses the claim
  whatever the claimer's view.
- Reads: a `TaskRead` is answered with the task and a bounded number of its children.
- Handoff: a peer that joins (new, or restarted) into a network that holds tasks (its first
  summary received tells) sends its summary to every live member once, a moment later, so it
  pulls the shards it is now a replica of at once rather than one push-pull at a time.
- Tombstones take no part in anti-entropy: they are never asked for or sent, and every replica
  compacts by itself (`protocol.tasks.retention`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from protocol.codec import encode_message
from protocol.effects import Dropped
from protocol.errors import RemoteProtocolError
from protocol.tasks.core import MAX_WANT, STORE, TaskCore
from protocol.tasks.inventory import holds_more, missing_from, parse_keys
from protocol.tasks.messages import TaskHave, TaskRead, TaskShards, TaskWant
from protocol.tasks.state import TaskState
from protocol.wire import Message

SHARD_ENTRIES = 4096
"""Most (task id, digest) entries in one anti-entropy answer (about 180 KB)."""
SHARD_ANSWER_INTERVAL = 1.0
"""Least seconds between two anti-entropy answers to one partner: each costs a pass over the
tasks held, so a member flooding summaries gets at most one a second."""
PULL_DELAY = 1.0
"""Seconds after joining before a peer pulls its shards (see `_pull`): members answer only
peers they know, so the join must have spread first."""
MAX_CHILDREN_SENT = 1024
"""Children of an asked-for task sent with it (a tree read; deeper levels are asked for)."""
SYNC_TICK = 2.0
"""How often due replica syncs are sent (seconds): at 30 peers and 100 tasks/s, 0.5 s sent an
inventory per task 12 times, 2 s 5 times (simulator; decision 49)."""
SYNC_FIRST, SYNC_BACKOFF, SYNC_LAST = 2.0, 4.0, 32.0
"""A changed task's replicas compare it after 2 s, then 8 s, then 32 s (see `sync`)."""


class Repair(TaskCore):
    """Anti-entropy, replica sync, audience repair, relay and reads."""

    def shard_summary(self, partner: bytes | None) -> TaskShards:
        """The anti-entropy summary sent with a push-pull to `partner` (None, an unknown
        partner: nothing)."""
        shared = self._shared(partner) if partner is not None else {}
        return TaskShards(
            0, tuple((s, _shard_digest(e)) for s, e in sorted(shared.items())), (), b""
        )

    def on_shards(self, now: float, src: str, sender: bytes, msg: TaskShards) -> None:
        """Answer a partner's summary with our entries where shards differ (level 0), or act
        on its answer (level 1)."""
        if not self.pulled and self.pull_at is None:
            # The first summary after we started (the seed's answer to our join, in a network
            # that holds tasks): pull the rest, once our join has spread (members answer only
            # peers they know). Unless peers sent us task objects before any summary came: we
            # were a member when the network's first tasks were made, and they came to us
            # directly, so a summary to every member would find nothing to hand off, and in a
            # network started all at once every peer's came at once, in the first minute of its
            # first job (a tenth of bench_agents' envelopes then; decision 91). A restarted
            # peer pulls whatever came first: what changed while it was down.
            if self.took_part and not self.restored:
                self.pulled = True
                self.counters["handoff pulls skipped: a member from the first tasks"] += 1
            else:
                self.pull_at = now + PULL_DELAY
        if msg.level == 0:
            last = self.shard_answered.get(sender)
            if last is not None and now - last < SHARD_ANSWER_INTERVAL:
                self.counters["anti-entropy summaries over the rate limit"] += 1
                return
            self.shard_answered[sender] = now
            self._answer_summary(src, sender, msg)
        else:
            self._compare_entries(src, sender, msg)

    def _shared(self, partner: bytes) -> dict[int, list[tuple[bytes, bytes]]]:
        # The tasks both peers must hold in our view: both are replicas, or one is the task's
        # origin and the other a replica (an origin outside the replica set, whose sends were
        # lost while it was taken for dead, must still get its record to the replicas: task
        # campaign, seed 251). Both sides can tell, so in agreeing views both list exactly
        # these, and their shards' digests match once repaired. Tombstones are left out: they
        # are never sent or asked for (every replica compacts by itself), so comparing them
        # repaired nothing, and with a week of them held it cost most of a busy peer's time
        # (bench_soak). A partner we do not see live yet (it just joined and pulls: see
        # `_pull`) counts as live: it proved it is up by sending.
        live = self.view.live_members()
        me = self.node_id
        # A live partner is in every cached set it belongs to; only one not yet live needs
        # each set recomputed with it (that recomputation, for every held task, was 2% of a
        # 30-peer network's samples when every partner was live).
        joining = partner not in live
        out: dict[int, list[tuple[bytes, bytes]]] = {}
        for tid, st in self.tasks.items():
            if joining:
                home = self.replicas.with_member(tid, live, partner)
            else:
                home = self.replicas.of(tid, live)
            origin = st.record.origin if st.record is not None else None
            if (partner in home and (me in home or origin == me)) or (
                origin == partner and me in home
            ):
                out.setdefault(tid[0], []).append((tid, st.digest()))
        for shard in out.values():
            shard.sort()
        return out

    def _answer_summary(self, src: str, sender: bytes, msg: TaskShards) -> None:
        mine = self._shared(sender)
        theirs = dict(msg.shards)
        differ = sorted(
            s for s in set(mine) | set(theirs) if _shard_digest(mine.get(s, [])) != theirs.get(s)
        )
        if not differ:
            return
        shards: list[tuple[int, bytes]] = []
        entries: list[tuple[bytes, bytes]] = []
        upto = b""
        for s in differ:
            own = mine.get(s, [])
            shards.append((s, _shard_digest(own) if own else b""))
            room = SHARD_ENTRIES - len(entries)
            entries.extend(own[:room])
            if len(own) > room:
                upto = own[room - 1][0] if room else (entries[-1][0] if entries else b"")
                break
        answer = TaskShards(1, tuple(shards), tuple(entries), upto)
        self.port.send(src, [encode_message(answer)], piggyback=False)

    def _compare_entries(self, src: str, sender: bytes, msg: TaskShards) -> None:
        scope = {s for s, _ in msg.shards}
        theirs = dict(msg.entries)
        mine = [
            (tid, d)
            for s, entries in self._shared(sender).items()
            if s in scope
            for tid, d in entries
            if not msg.upto or tid <= msg.upto
        ]
        ours = dict(mine)
        differ = [tid for tid, d in mine if theirs.get(tid) != d and tid not in self.tombstones]
        self.send_objects(src, [tid for tid in differ if tid not in theirs])
        self.send_inventories(src, [tid for tid in differ if tid in theirs], reply=True)
        want = [tid for tid, d in theirs.items() if tid not in self.tombstones and tid not in ours]
        if want:
            self.port.send(src, [encode_message(TaskWant(tuple(want[:MAX_WANT])))], False)

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
        """Ask the peers that hold these tasks for every object of them and of their children.
        For a task not held here: its replica set. For one held: its owner (which made its
        children and holds them), or its origin while it has no claim here, and the first
        of its replica set."""
        # Each peer asked answers with everything it holds of the task and its children: asking
        # the whole replica set as well as the owner and the origin had five peers send the same
        # tree (bench_agents: 5 times the tree for a read at a peer that held none of it).
        live = self.view.live_members()
        targets: dict[bytes, list[bytes]] = {}
        for tid in task_ids[:MAX_WANT]:
            replicas = self.replicas.of(tid, live)
            st = self.tasks.get(tid)
            if st is None or st.record is None:
                peers = set(replicas)
            else:
                peers = set(replicas[:1])
                peers.add(st.claim.owner if st.claim is not None else st.record.origin)
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
        # send each other (and its origin) their inventory of it a few times, backing off (2,
        # 8, 32 s): one message where nothing was lost, and the missing objects in one round
        # trip where something was (decision 44). A sync every 2 s rather than 0.5 s puts four
        # times the tasks in one message per partner (decision 49). A ring of replicas (each
        # syncing with the next) sent fewer still, but under the campaign's faults 14 seeds
        # of 1,500 ended with a holder short of a result: the redundancy is what repairs.
        due = sorted(t for t, (at, _) in self.sync_due.items() if at <= now)
        if not due:
            return
        live = self.view.live_members()
        batches: dict[bytes, list[bytes]] = {}
        settled: list[TaskState] = []
        for tid in due:
            _, interval = self.sync_due.pop(tid)
            st = self.tasks.get(tid)
            if st is None:
                continue
            if interval * SYNC_BACKOFF <= SYNC_LAST:
                self.sync_due[tid] = (now + interval * SYNC_BACKOFF, interval * SYNC_BACKOFF)
            elif self._waits_on(st):
                self.sync_due[tid] = (now + SYNC_LAST, SYNC_LAST)
            else:
                settled.append(st)
            replicas = self.replicas.of(tid, live)
            targets = set(replicas)
            if st.record is not None and self.node_id in replicas:
                targets.add(st.record.origin)
            if st.record is not None and st.record.origin == self.node_id:
                # The origin compares with every peer it sent the record to or that told it
                # it holds it, in the home or not: a former replica left outside the home
                # once the views agree is repaired here, not only by the relay's one copy.
                targets |= st.sent_to | st.holders
            targets.discard(self.node_id)
            targets -= self._alike_with(st)
            for node_id in targets:
                batches.setdefault(node_id, []).append(tid)
        for node_id, ids in sorted(batches.items()):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self.send_inventories(addr, ids, reply=True, lazy=True)
        for st in settled:
            st.forget_inventory()  # sent to every partner above, and rarely asked for again

    def _alike_with(self, st: TaskState) -> set[bytes]:
        """The peers whose inventory of the task, received since it last changed here, showed
        what we hold."""
        # Two replicas sync with each other after the same change, each on its own tick: the
        # first inventory to arrive compares both ways (the receiver sends what the sender
        # lacks and, asked to reply, asks for what it lacks itself), so the second is
        # redundant and is not sent. That halves the inventories a steady load costs (at 30
        # peers, about 4 TaskHave per task). A partner we heard nothing from, or whose copy
        # differed, is still synced with: the redundancy that repairs losses stays
        # (decision 86).
        # One round only: a partner that changed after its inventory syncs with us itself,
        # and should that be lost, our next round compares again (as the origin of an open
        # task must, every SYNC_LAST, until its result is here: decision 68).
        entry = self.alike.pop(st.task_id, None)
        if entry is None or entry[0] != st.digest():
            return set()
        return entry[1]

    def _note_alike(self, st: TaskState, sender: bytes) -> None:
        if st.task_id not in self.sync_due:
            return  # no sync of ours left to spare
        digest = st.digest()
        entry = self.alike.get(st.task_id)
        if entry is None or entry[0] != digest:
            self.alike[st.task_id] = (digest, {sender})
        else:
            entry[1].add(sender)

    def _waits_on(self, st: TaskState) -> bool:
        """Whether this peer is the origin of the open task (a client, or the run of its
        parent, waits here for its result)."""
        # The result goes to the origin directly, and the replicas compare with the origin
        # three times after it lands (2, 8, 32 s); push-pull pairs two given peers by luck
        # only (at 100 peers, minutes apart). Three lost copies left a lead waiting 6 minutes
        # for its last worker (bench_agents, decision 68): who waits keeps asking, every
        # SYNC_LAST, until the result is here. One inventory entry per open task per
        # partner, batched with the rest.
        return (
            st.record is not None and st.record.origin == self.node_id and st.task_id in self.open
        )

    def on_have(self, src: str, sender: bytes, msg: TaskHave) -> None:
        """Answer a peer's inventories (a replica sync, or repair): send the objects it lacks;
        if asked to (`reply`), ask for the tasks we hold none of and send our own inventory of
        those where it holds what we lack."""
        objects: list[Message] = []
        back: list[bytes] = []
        want: list[bytes] = []
        for inv in msg.entries[:MAX_WANT]:
            tid = inv.task_id
            if tid in self.tombstones:
                continue
            st = self.tasks.get(tid)
            if st is None:
                if msg.reply:
                    want.append(tid)
                continue
            if st.digest() == inv.digest:
                self._note_alike(st, sender)
                continue  # held alike: the common case costs a comparison
            try:
                keys = parse_keys(inv)
            except RemoteProtocolError as exc:
                self.counters["malformed inventories"] += 1
                self.port.note(Dropped(src, f"malformed inventory: {exc}"))
                continue
            objects.extend(missing_from(st, inv, keys))
            if msg.reply and holds_more(inv, st, keys):
                back.append(tid)
        self.send_messages(src, objects)
        self.send_inventories(src, back, reply=False)
        if want:
            self.port.send(src, [encode_message(TaskWant(tuple(want)))], False)

    def relay(self, st: TaskState, raw: bytes, src: str, author: bytes) -> None:
        """As the task's origin, hand a received claim or result on to the record's holders."""
        # The origin sent the record to the audience of its view; a claimer's view of that
        # audience may differ (a peer's roles or liveness not yet known to it), and a record
        # holder that never hears of the claim would claim too. The peers that told us they
        # hold the record (`TaskHeld`) are relayed to as well: one that was a replica in a
        # view of a partition or a crash, and is not in the home once the views agree, kept a
        # superseded result for good (task campaign, seed 899 with a 1 s sync tick; decision
        # 49). Receivers drop known objects before verifying them: a copy costs bytes, not a
        # signature check. Relaying only outside the home (the author sends to the home)
        # saved 1.3 envelopes of a task's 17 at 30 peers, but the task campaign then ended
        # with a peer outside the home short of a result (seed 119): the second copy is what
        # reaches a holder nobody tracks (decision 51).
        # The author sent its object to the home it sees, so the copy relayed is a second one
        # (or reaches a holder the author does not know): it waits for the next envelope to
        # its peer, or the next sync tick, rather than costing one of its own (decision 63).
        if src == STORE or st.record is None or st.record.origin != self.node_id:
            return
        for node_id in sorted((st.sent_to | st.holders) - {author}):
            addr = self.view.addr_of(node_id)
            if addr is not None and addr != src:
                self.port.send_lazy(addr, [raw])

    def repair(self, now: float) -> None:
        """After a change of the live membership, send open tasks to their new audience."""
        # The arbiter of each open task (first of its replica set) sends what it holds to
        # audience members that never got it (a new replica, the next standby after one died).
        # Final tasks reach new replicas through anti-entropy.
        live = self.view.live_members()
        if self.pull_at is not None and now >= self.pull_at:
            self._pull(live)
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
                st.add_sent_to(missing)
        self._resync_outside_home(now, live)

    def _resync_outside_home(self, now: float, live: tuple[bytes, ...]) -> None:
        # A peer in a task's home in one view (a partition's, or before a member joined) may
        # be outside it once the views agree: no replica syncs with it any more, and its copy
        # stayed short of what the home learned meanwhile for good if its own last sync was
        # lost (task campaign, seeds 773 and 2903; decision 51). So after the live membership
        # changes, each copy held outside its home (not as the origin, which the replicas
        # sync with) is compared with the home again, its backoff started over: one sync
        # left at 32 s, lost with both answers, left the copy short (seed 773).
        for tid, st in self.tasks.items():
            due = self.sync_due.get(tid)
            if due is not None and due[1] == SYNC_FIRST:
                continue  # compared within SYNC_FIRST anyway, then backing off
            if self.node_id in self.replicas.of(tid, live):
                continue
            if st.record is not None and st.record.origin == self.node_id:
                continue
            self.counters["copies outside the home synced again"] += 1
            self.sync_due[tid] = (now + SYNC_FIRST, SYNC_FIRST)

    def _pull(self, live: tuple[bytes, ...]) -> None:
        # Handoff: a peer that just joined (new, or restarted on its data dir) is a replica of
        # tasks it may not hold. It sends its summary to every live member at once instead of
        # waiting for push-pull to pair it with each: every member answers for the shards it
        # shares with us, and we ask for what we lack (decision 31). Once per life.
        self.pulled, self.pull_at = True, None
        self.counters["handoff pulls"] += 1
        for node_id in live:
            if node_id == self.node_id or node_id in self.shard_answered:
                continue  # we compared with it already (the seed's answer to our join)
            addr = self.view.addr_of(node_id)
            if addr is not None:
                summary = encode_message(self.shard_summary(node_id))
                self.port.send(addr, [summary], piggyback=False)

    def _send_objects_to(self, node_ids: set[bytes], task_id: bytes) -> None:
        for node_id in sorted(node_ids):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self.send_objects(addr, [task_id])


def _shard_digest(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A shard's digest: equal on two peers exactly when they list the same (id, digest)s."""
    h = hashlib.sha256()
    for tid, digest in entries:
        h.update(tid + digest)
    return h.digest()[:8]
