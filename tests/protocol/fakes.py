"""Test doubles for the protocol core: signed records, a recording port, an in-memory link.

- `signer(i)` / `addr(i)` / `alive(i)` make the identity, address and signed alive record of
  test peer `i`; the same `i` always gives the same bytes.
- `RecordingPort` stands in for `protocol.node.Node` under a bare `Membership`, recording every
  send, broadcast, notification, timer and durable record so a rule can be checked in isolation.
- `Link` is h11's "two-party link" grown to several parties: it owns real `Node`s, delivers each
  `Send` at once by calling `handle` on the destination, drops messages a predicate picks, and
  steps a fake clock from one `wake_at` to the next. Nothing sleeps; everything is seeded.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

from protocol.codec import decode_message, encode_message
from protocol.config import NodeConfig, lan
from protocol.effects import Command, Effects, Note, Persist, Send
from protocol.envelope import decode_envelope, encode_envelope
from protocol.identity import DOMAIN_ALIVE, DOMAIN_PEER_STATE, Signer, VerifiedCache
from protocol.membership import Membership
from protocol.node import Node
from protocol.timers import Timer
from protocol.wire import (
    Alive,
    Message,
    ModelUsage,
    PeerState,
    Ping,
    alive_payload,
    peer_state_payload,
)

NETWORK = lan().network_id
N = TypeVar("N")
C = TypeVar("C", bound=Command)


def signer(i: int, network_id: bytes = NETWORK) -> Signer:
    """The identity of test peer `i`."""
    return Signer(hashlib.sha256(b"k%d" % i).digest(), network_id)


def addr(i: int) -> str:
    """The address of test peer `i`."""
    return f"n{i}:1"


def node_id(i: int) -> bytes:
    """The node id of test peer `i`."""
    return signer(i).node_id


def alive(
    i: int, incarnation: int = 0, at: str | None = None, network_id: bytes = NETWORK
) -> Alive:
    """Peer `i`'s alive record, signed by `i` for `network_id`."""
    s = signer(i, network_id)
    where = addr(i) if at is None else at
    sig = s.sign(DOMAIN_ALIVE, alive_payload(s.public_key, where, incarnation))
    return Alive(s.public_key, where, incarnation, sig, s.node_id)


def peer_state(
    i: int,
    version: int,
    roles: tuple[str, ...],
    free_slots: int = 1,
    queue_len: int = 0,
    load: float = 0.0,
    incarnation: int = 0,
    agents: int = 0,
    spend_micro: int = 0,
    models: tuple[ModelUsage, ...] = (),
    runs: tuple[int, ...] = (),
) -> PeerState:
    """Peer `i`'s state, signed by `i`."""
    payload = peer_state_payload(
        node_id(i),
        incarnation,
        version,
        roles,
        free_slots,
        queue_len,
        load,
        agents,
        spend_micro,
        models,
        runs,
    )
    sig = signer(i).sign(DOMAIN_PEER_STATE, payload)
    return PeerState(
        node_id(i),
        version,
        roles,
        free_slots,
        queue_len,
        load,
        incarnation,
        sig,
        agents,
        spend_micro,
        models,
        runs,
    )


def envelope(i: int, *messages: Message | bytes) -> bytes:
    """An envelope from peer `i` carrying `messages` (encoded unless already bytes)."""
    raw = [m if isinstance(m, bytes) else encode_message(m) for m in messages]
    return encode_envelope(node_id(i), addr(i), raw)


def opened(data: bytes) -> list[Message]:
    """The decoded messages of an envelope."""
    return [decode_message(raw) for raw in decode_envelope(data).messages]


def of_type(items: list[N] | list[Note] | list[Message], kind: type[N]) -> list[N]:
    """The items that are instances of `kind`, in order."""
    return [x for x in items if isinstance(x, kind)]


@dataclass
class RecordingPort:
    """A `membership.Port` that records everything instead of acting on it."""

    sends: list[tuple[str, list[Message], bool]] = field(default_factory=list)
    gossiped: dict[Hashable, Message] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    timers: list[tuple[float, Timer]] = field(default_factory=list)
    persists: list[Persist] = field(default_factory=list)
    confirmed_down: list[bytes] = field(default_factory=list)

    def send(self, addr: str, messages: list[bytes], piggyback: bool) -> None:
        self.sends.append((addr, [decode_message(m) for m in messages], piggyback))

    def gossip(self, key: Hashable, message: bytes) -> None:
        self.gossiped[key] = decode_message(message)

    def note(self, note: Note) -> None:
        self.notes.append(note)

    def schedule(self, at: float, timer: Timer) -> None:
        self.timers.append((at, timer))

    def persist(self, kind: str, key: bytes, value: bytes) -> None:
        self.persists.append(Persist(kind, key, value))

    def member_confirmed_down(self, node_id: bytes) -> None:
        self.confirmed_down.append(node_id)

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self.sends.clear()
        self.gossiped.clear()
        self.notes.clear()
        self.timers.clear()
        self.persists.clear()
        self.confirmed_down.clear()


def membership(
    config: NodeConfig | None = None, members: int = 0, seed: int = 1
) -> tuple[Membership, RecordingPort]:
    """Peer 0's `Membership` on a recording port, already knowing peers 1..`members`."""
    port = RecordingPort()
    m = Membership(
        config or lan(), signer(0), addr(0), 0, random.Random(seed), VerifiedCache(), port
    )
    for i in range(1, members + 1):
        m.apply_alive(0.0, alive(i), addr(i), None)
    port.clear()
    return m, port


def probe(m: Membership, port: RecordingPort, now: float) -> tuple[int, bytes]:
    """Run one ProbeDue on a bare `Membership`; return the probe's seq and target."""
    port.clear()
    m.probes.on_probe_due(now)
    ping = port.sends[0][1][0]
    assert isinstance(ping, Ping)
    return ping.seq, ping.target


Drop = Callable[[str, str, bytes], bool]


class Link:
    """Real `Node`s connected in memory with zero latency, under one fake clock.

    Attributes:
        nodes: the running nodes by address; a crashed node is simply absent.
        notes: every notification each address produced, in order.
        timeline: every (time, address, notification), in order.
        log: every (time, source, Send) the nodes emitted, delivered or not.
        effects: every (address, Effects) returned, in order (for replay checks).
        drop: a predicate (src, dst, data) choosing messages the network loses.
    """

    def __init__(
        self, count: int, config: NodeConfig | None = None, seed: int = 1, now: float = 0.0
    ) -> None:
        self.config = config or lan()
        self.seed = seed
        self.now = now
        self.nodes: dict[str, Node] = {}
        self.notes: dict[str, list[Note]] = {}
        self.commands: dict[str, list[Command]] = {}
        self.wake: dict[str, float | None] = {}
        self.timeline: list[tuple[float, str, Note | Command]] = []
        self.log: list[tuple[float, str, Send]] = []
        self.effects: list[tuple[str, Effects]] = []
        self.drop: Drop = lambda src, dst, data: False
        self._pending: deque[tuple[str, Send]] = deque()
        for i in range(count):
            self.start(i)

    def start(self, i: int, incarnation: int = 0) -> Node:
        """Start peer `i` at the current time (its first tick collects its start-up effects)."""
        rng = random.Random(self.seed * 1000 + i)
        node = Node(
            self.config, signer(i, self.config.network_id), addr(i), rng, self.now, incarnation
        )
        self.nodes[addr(i)] = node
        self.notes.setdefault(addr(i), [])
        self.commands.setdefault(addr(i), [])
        self.run(i, node.tick(self.now))
        return node

    def crash(self, i: int) -> None:
        """Stop peer `i` without a word; messages to it are lost from now on."""
        del self.nodes[addr(i)]
        self.wake.pop(addr(i), None)

    def node(self, i: int) -> Node:
        return self.nodes[addr(i)]

    def run(self, i: int, fx: Effects) -> Effects:
        """Take the effects of a call made on peer `i` and deliver its sends (and replies)."""
        return self._run(addr(i), fx)

    def _run(self, a: str, fx: Effects) -> Effects:
        self._record(a, fx)
        while self._pending:
            src, send = self._pending.popleft()
            dst = self.nodes.get(send.addr)
            if dst is None or self.drop(src, send.addr, send.data):
                continue
            self._record(send.addr, dst.handle(self.now, src, send.data))
        return fx

    def join(self, i: int, seed: int = 0) -> Effects:
        """Join peer `i` through peer `seed`."""
        return self.run(i, self.node(i).join(self.now, [addr(seed)]))

    def advance(self, until: float) -> None:
        """Tick every node at each of its `wake_at` deadlines up to `until`, in time order."""
        while True:
            due = [w for a, w in self.wake.items() if w is not None and w <= until]
            if not due:
                break
            self.now = max(self.now, min(due))
            for a in sorted(self.wake):
                w = self.wake[a]
                if w is not None and w <= self.now and a in self.nodes:
                    self._run(a, self.nodes[a].tick(self.now))
        self.now = max(self.now, until)

    def notes_of(self, i: int, kind: type[N]) -> list[N]:
        """Peer `i`'s notifications of type `kind`."""
        return of_type(self.notes[addr(i)], kind)

    def commands_of(self, i: int, kind: type[C]) -> list[C]:
        """Peer `i`'s commands of type `kind`."""
        return [c for c in self.commands[addr(i)] if isinstance(c, kind)]

    def when(self, i: int, kind: type[Note | Command]) -> list[float]:
        """The times at which peer `i` produced a notification or command of type `kind`."""
        return [t for t, a, note in self.timeline if a == addr(i) and isinstance(note, kind)]

    def sent(self, src: int, dst: int, kind: type[Message]) -> list[float]:
        """The times at which peer `src` sent a message of type `kind` to peer `dst`."""
        return [
            t
            for t, a, send in self.log
            if a == addr(src) and send.addr == addr(dst) and of_type(opened(send.data), kind)
        ]

    def _record(self, a: str, fx: Effects) -> None:
        self.effects.append((a, fx))
        self.notes[a].extend(fx.notes)
        self.commands[a].extend(fx.commands)
        self.timeline.extend((self.now, a, note) for note in fx.notes)
        self.timeline.extend((self.now, a, command) for command in fx.commands)
        self.wake[a] = fx.wake_at
        for send in fx.sends:
            self.log.append((self.now, a, send))
            self._pending.append((a, send))


def mesh(count: int, config: NodeConfig | None = None, seed: int = 1) -> Link:
    """`count` peers, each joined through peer 0, after two seconds of gossip."""
    link = Link(count, config, seed)
    for i in range(1, count):
        link.join(i)
    link.advance(link.now + 2.0)
    return link
