"""Dissemination: piggybacking, gossip rounds, the recently-seen skip, seeds and leaving.

Invariants:
- Every envelope this peer sends leaves through `send` or `gossip_round`, so broadcasts ride
  along whatever has room (memberlist's piggybacking) and each is handed out at most its
  retransmit limit (`protocol.gossip.BroadcastQueue`).
- Gossip goes to up members and to members dead for less than `gossip_to_the_dead`, so a
  falsely declared peer hears of it and refutes.
- Broadcast kinds (alive, suspect, dead, user event, peer state, task record) are idempotent
  under their merge rules, so byte-identical copies received recently are skipped before
  decoding: the same fact arrives many times during dissemination, and re-applying it would
  change nothing. Claims, results and cancels are not skipped: one dropped because what it
  builds on had not arrived yet (a claim's predecessor, a cancel's task record) must be
  applied when it comes again. (A cancel that came before its record was skipped for good at
  a quiet replica, whose recent set never turned over: the replicas disagreed forever.)
- Seeds given to `join` with `remember` are tried again by reconnect for as long as they are
  not known up, so a partition that cut us off from everyone but a seed still heals.
- Answers go to where the sender is known to be, never to where an envelope says it is
  (`reply_addr`): a known member's address comes from its own signed alive record. A sender
  not known here gets a label starting with `UNKNOWN_SENDER`, to which nothing is ever sent;
  the one exception is the answer to a join request, the handshake that must reach a stranger
  (`push_pull_answer_addr`).
- Push-pull answers are rate-limited per address (`PUSH_PULL_ANSWER_INTERVAL`): a full state
  is the largest answer a peer gives, so no one can make us send it to anyone repeatedly.
- Lazy messages (`send_lazy`: replica syncs, which only repair what a loss left short) wait
  for the next envelope to their address and ride in front of its messages, so they keep
  their order with what we send there later; `flush_lazy` sends what is still waiting, alone.
  Never on a probe-class envelope (its lane must stay light), and never past
  `LAZY_RIDE_BYTES` (decision 63).
"""

from __future__ import annotations

from collections.abc import Callable

from protocol.config import NodeConfig, retransmit_limit
from protocol.effects import Dropped, Note, Send
from protocol.envelope import encode_envelope
from protocol.gossip import MESSAGE_OVERHEAD, BroadcastQueue
from protocol.member_table import Member, Rng
from protocol.membership import Membership
from protocol.wire import Kind, Status

_BROADCAST_KINDS = frozenset(
    {
        Kind.ALIVE,
        Kind.SUSPECT,
        Kind.DEAD,
        Kind.USER_EVENT,
        Kind.PEER_STATE,
        Kind.TASK,
    }
)
_RECENT_CAPACITY = 4096
_ENVELOPE_OVERHEAD = 64
PROBE_KINDS = frozenset({Kind.PING, Kind.INDIRECT_PING, Kind.ACK, Kind.NACK})
"""Message kinds that make an envelope probe-class: the SWIM failure detector's own traffic
(`Send.probe`; the host's probe lane, `peer.runtime.lanes`)."""
LAZY_RIDE_BYTES = 512 * 1024
"""Most bytes of lazy messages that ride on one envelope (far below `MAX_ENVELOPE_BYTES`); the
rest waits for the next one or `flush_lazy`."""

UNKNOWN_SENDER = "unknown sender at "
"""How the reply address of a sender not known here starts (the address it claims follows, for
the notes): sends to it are dropped, never made."""
PUSH_PULL_ANSWER_INTERVAL = 1.0
"""Least time (seconds) between two push-pull answers to one address. A peer asks each partner
once per push-pull or reconnect interval (tens of seconds), so honest peers never meet it,
while a flood of requests naming one address gets at most one full state a second sent there;
a longer interval would delay a rejoin after a crash by as much."""


class Dissemination:
    """How this peer's messages and broadcasts reach the others.

    Args:
        config: the node's configuration.
        node_id: this peer's id (the sender of every envelope).
        addr: this peer's address (the reply address of every envelope).
        rng: the node's injected randomness.
        membership: who there is to send to.
        queue: the broadcasts waiting to go out; the node's port queues them (membership
            gossips its own alive record while it is built, before this object exists).
        sink: receives every envelope to send, in order.
        note: reports what this refuses (sends to an unknown sender, rate-limited answers).
    """

    def __init__(
        self,
        config: NodeConfig,
        node_id: bytes,
        addr: str,
        rng: Rng,
        membership: Membership,
        queue: BroadcastQueue,
        sink: Callable[[Send], None],
        note: Callable[[Note], None],
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.addr = addr
        self.rng = rng
        self.membership = membership
        self.sink = sink
        self.note = note
        self.queue = queue
        self.seeds: list[str] = []
        self.joining: set[str] = set()
        """Seeds asked to join and not answered yet."""
        self._recent: set[bytes] = set()
        self._recent_old: set[bytes] = set()
        self.leave_msg: bytes | None = None
        self.leave_transmits = 0
        self._answered: dict[str, float] = {}
        """When each address last got a push-pull answer, oldest first (recent ones only)."""
        self._lazy: dict[str, list[bytes]] = {}
        """Lazy messages waiting for an envelope to their address (`send_lazy`)."""

    def reply_addr(self, sender: bytes, claimed: str) -> str:
        """Where answers to `sender` go: its address in the member table, or, for a sender not
        known here, `UNKNOWN_SENDER` + the address it `claimed` (which nothing is sent to)."""
        m = self.membership.members.get(sender)
        if m is None or sender == self.node_id:
            return UNKNOWN_SENDER + claimed
        return m.addr

    def push_pull_answer_addr(
        self, now: float, sender: bytes, claimed: str, join: bool
    ) -> str | None:
        """Where to answer a push-pull request, or None (reported) when it gets no answer.

        A known sender is answered at its known address; an unknown one only if it is joining,
        at the address it claims. Either way at most one answer per address per
        `PUSH_PULL_ANSWER_INTERVAL`.
        """
        addr = self.reply_addr(sender, claimed)
        if addr.startswith(UNKNOWN_SENDER):
            if not join:
                self.note(Dropped(claimed, "push-pull request from an unknown sender"))
                return None
            addr = claimed
        while self._answered:
            oldest = next(iter(self._answered))
            if now - self._answered[oldest] < PUSH_PULL_ANSWER_INTERVAL:
                break
            del self._answered[oldest]
        if addr in self._answered:
            self.note(Dropped(addr, "push-pull answer rate-limited"))
            return None
        self._answered[addr] = now
        return addr

    def send(self, addr: str, messages: list[bytes], piggyback: bool) -> None:
        """Send `messages` to `addr` in one envelope, topped up with broadcasts if asked."""
        if addr.startswith(UNKNOWN_SENDER):
            self.note(Dropped(addr, "no answer to a sender not known here"))
            return
        if piggyback:
            used = _ENVELOPE_OVERHEAD + sum(len(m) + MESSAGE_OVERHEAD for m in messages)
            messages = messages + self._broadcasts(self.config.gossip.packet_budget - used)
        probe = any(len(m) > 1 and m[1] in PROBE_KINDS for m in messages)
        if addr in self._lazy and not probe:
            messages = self._riding(addr) + messages
        self.sink(Send(addr, encode_envelope(self.node_id, self.addr, messages), probe))

    def send_lazy(self, addr: str, messages: list[bytes]) -> None:
        """Send `messages` to `addr` with the next envelope that goes there, or alone at the
        next `flush_lazy`."""
        if addr.startswith(UNKNOWN_SENDER):
            self.note(Dropped(addr, "no answer to a sender not known here"))
            return
        self._lazy.setdefault(addr, []).extend(messages)

    def flush_lazy(self) -> None:
        """Send every lazy message still waiting, in envelopes of their own."""
        while self._lazy:
            addr = next(iter(self._lazy))
            self.sink(Send(addr, encode_envelope(self.node_id, self.addr, self._riding(addr))))

    def _riding(self, addr: str) -> list[bytes]:
        """Take the lazy messages for `addr` that fit in `LAZY_RIDE_BYTES` (at least one)."""
        waiting = self._lazy[addr]
        size, count = 0, 0
        for m in waiting:
            size += len(m) + MESSAGE_OVERHEAD
            if count and size > LAZY_RIDE_BYTES:
                break
            count += 1
        taken, rest = waiting[:count], waiting[count:]
        if rest:
            self._lazy[addr] = rest
        else:
            del self._lazy[addr]
        return taken

    def seen_recently(self, raw: bytes) -> bool:
        """True if these exact bytes of a broadcast kind were received recently."""
        return raw in self._recent or raw in self._recent_old

    def remember(self, raw: bytes) -> None:
        """Remember a message received, once its whole envelope decoded: a dropped envelope
        must leave no trace, or its good messages would be skipped when they arrive again in
        a valid one."""
        # Messages are fixarrays, so raw[1] is the kind (see `protocol.codec`).
        if len(raw) < 2 or raw[1] not in _BROADCAST_KINDS:
            return
        self._recent.add(raw)
        if len(self._recent) >= _RECENT_CAPACITY:
            self._recent_old, self._recent = self._recent, set()

    def add_seeds(self, seeds: list[str], remember: bool) -> list[str]:
        """Record a join through `seeds`; return the ones to ask (every one but ourselves)."""
        asked = []
        for seed in seeds:
            if seed == self.addr:
                continue
            if remember and seed not in self.seeds:
                self.seeds.append(seed)
            self.joining.add(seed)
            asked.append(seed)
        return asked

    def reconnect_target(self) -> str | None:
        """A dead member or a seed not known up, picked at random, or None."""
        m = self.membership
        candidates = [x.addr for x in m.others() if x.status == Status.DEAD]
        up_addrs = {x.addr for x in m.others() if x.up}
        candidates += [s for s in self.seeds if s not in up_addrs]
        if not candidates:
            return None
        return candidates[self.rng.randrange(len(candidates))]

    def leave(self, msg: bytes) -> None:
        """Track our own departure `msg` (already queued) until enough peers were sent it."""
        self.leave_msg = msg

    def leave_done(self) -> bool:
        """True once the leave was sent to `gossip_fanout` peers, or as often as the retransmit
        limit allows when that is lower, or there is no one to tell."""
        if self.leave_msg is None:
            return False
        return (
            self.leave_transmits >= self.config.gossip.gossip_fanout
            or ("member", self.node_id) not in self.queue
            or self.membership.alive_count() <= 1
        )

    def gossip_round(self, now: float) -> None:
        """Send queued broadcasts to `gossip_fanout` random reachable members."""
        if not len(self.queue):
            return
        targets = self._gossip_targets(now)
        budget = self.config.gossip.packet_budget - _ENVELOPE_OVERHEAD
        for extra in range(self.config.gossip.backlog_packets):
            # After the first packet, more only while news nobody was sent yet waits.
            if extra and not self.queue.fresh():
                return
            for target in targets:
                messages = self._broadcasts(budget, solo=True)
                if not messages:
                    return
                self.sink(Send(target.addr, encode_envelope(self.node_id, self.addr, messages)))

    def _gossip_targets(self, now: float) -> list[Member]:
        grace = self.config.swim.gossip_to_the_dead

        def reachable(m: Member) -> bool:
            return m.up or (m.status == Status.DEAD and now - m.since < grace)

        return self.membership.random_members(self.config.gossip.gossip_fanout, reachable)

    def _broadcasts(self, budget: int, solo: bool = False) -> list[bytes]:
        if not len(self.queue):
            return []
        limit = retransmit_limit(self.config.gossip.retransmit_mult, self.membership.alive_count())
        out = self.queue.get(budget, limit, solo)
        if self.leave_msg is not None and self.leave_msg in out:
            self.leave_transmits += 1
        return out
