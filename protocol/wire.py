"""Wire vocabulary: the membership messages, the message kinds and the size limits.

Theory of operation
- Every message a peer sends is one of the frozen dataclasses in `Message`: the membership and
  dissemination messages defined here and the task messages of `protocol.task_messages`.
  `protocol.codec` turns one to bytes and back; `protocol.envelope` carries them between peers.
- Message kinds are an append-only IntEnum: the numbers are part of the protocol. Never reuse or
  renumber one; add new kinds at the end.
- The limits below bound what a decoder accepts, so no input can make a peer allocate past them.
  Encoders check their integers against the same `MAX_UINT` (`protocol.fields.encodable`).
- Incarnations live below `MAX_INCARNATION`, far under `MAX_UINT`: a claim about a member is
  accepted only below it and within `INCARNATION_STEP` of what the receiver knows, so a
  refutation (claim + 1) always fits and no one message can push a member out of range.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import msgpack

from protocol.tasks.messages import TaskMessage

MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
"""Largest envelope accepted: a push-pull of about 20,000 members fits."""
MAX_MESSAGE_BYTES = MAX_ENVELOPE_BYTES
MAX_MESSAGES = 100_000
"""Most messages in one envelope, and most entries in one push-pull."""
MAX_ADDR_CHARS = 262
"""An address is host:port; 253 for a DNS name plus brackets, colon and port."""
MAX_NAME_CHARS = 128
MAX_EVENT_PAYLOAD = 8 * 1024
"""Largest user event payload (Serf allows 512 bytes by default, 9 KiB at most)."""
MAX_ROLES = 64
MAX_STATE_MODELS = 8
"""Most models a peer state names (`PeerState.models`): a peer calling more advertises those
whose breaker is not closed first, then the costliest."""
RUN_COUNTS = ("started", "ok", "failed", "duplicates", "takeovers", "fenced", "cancelled")
"""What `PeerState.runs` counts, in order: executions started on the peer; ended ok; ended
failed or timed out; started for a task another run had claimed before; claims of a later
epoch than the first (takeovers); stopped by a fence; stopped by a cancel."""
MAX_UINT = 2**63 - 1
"""Largest integer any field carries; decoders refuse more and encoders never make more."""
MAX_INCARNATION = 2**62
"""Largest incarnation a peer holds or accepts. Suspicions and deaths are accepted only below
it, so the refutation (claim + 1) never exceeds it; restarts (+1 each) stay far under
`MAX_UINT`. Reaching it takes `MAX_INCARNATION / INCARNATION_STEP` (2**42) forged messages."""
INCARNATION_STEP = 2**20
"""Most an unsigned claim (suspect, dead, a push-pull row) may exceed the incarnation the
receiver knows. A member's incarnation only grows by its own refutations and restarts, one at
a time, so an honest gap this large means a peer missed a million of them; a larger claim is
dropped, which at worst loses one suspicion the claimant's peers still hold."""


class Kind(IntEnum):
    """Message kinds. Append-only: the numbers are part of the protocol."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    ALIVE = 5
    SUSPECT = 6
    DEAD = 7
    PUSH_PULL = 8
    USER_EVENT = 9
    PEER_STATE = 10
    TASK = 11
    CLAIM = 12
    RESULT = 13
    CANCEL = 14
    EXECUTION = 15  # retired (decision 23): never sent, refused on decode
    TASK_HELD = 16
    TASK_DIGESTS = 17  # retired (decision 31): never sent, refused on decode
    TASK_WANT = 18
    TASK_ASK = 19
    TASK_GRANT = 20
    TASK_SYNC = 21  # retired (decision 44): never sent, refused on decode
    TASK_READ = 22
    TASK_LIST = 23
    TASK_PAGE = 24
    EPOCH_GRANT = 25
    TASK_SHARDS = 26
    CHECKPOINT = 27
    TASK_HAVE = 28
    TASK_PROGRESS = 29


class Status(IntEnum):
    """Member status as carried in push-pull. Append-only."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe of `target`; answered with `Ack(seq)`. `seen` is the incarnation the prober
    knows of the target: a target past it answers with its current alive record too, so a
    prober holding a stale suspicion learns the refutation it missed."""

    seq: int
    target: bytes
    seen: int = 0


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to probe `target` at `target_addr` and relay the ack (or a nack)."""

    seq: int
    target: bytes
    target_addr: str
    seen: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a ping with the same `seq`."""

    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """An indirect prober reached no one: tells the requester its own path may be fine."""

    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    """A member's signed statement: "I am at `addr` with `incarnation`"."""

    public_key: bytes
    addr: str
    incarnation: int
    sig: bytes
    node_id: bytes  # sha256(public_key); derived on decode, never sent

    def signed_payload(self) -> bytes:
        """The payload the signature covers (see `identity.signing_input`)."""
        return alive_payload(self.public_key, self.addr, self.incarnation)


@dataclass(frozen=True, slots=True)
class Suspect:
    """`accuser` suspects `node_id` at `incarnation` of having failed."""

    node_id: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """`accuser` declares `node_id` dead at `incarnation`; accuser == node_id means it left."""

    node_id: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True, slots=True)
class MemberEntry:
    """One member of a push-pull state exchange."""

    alive: Alive
    status: Status
    incarnation: int


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full membership state. `reply` is False on the request, True on the answer; `join`
    marks a request from a peer joining through us, and is echoed on the answer."""

    join: bool
    reply: bool
    members: tuple[MemberEntry, ...]
    states: tuple[PeerState, ...]


@dataclass(frozen=True, slots=True)
class UserEvent:
    """An application broadcast; (`origin`, `ltime`) identifies it network-wide."""

    origin: bytes
    ltime: int
    name: str
    payload: bytes


class Breaker(IntEnum):
    """A model's circuit breaker at a peer, as its peer state advertises it."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """One model as a peer state advertises it: what the peer's calls of it cost and used so
    far, and its breaker and rate limit there now."""

    model: str
    spend_micro: int
    breaker: Breaker
    tokens: int = 0
    """Tokens (prompt and completion) its calls of the model used so far."""
    waits: int = 0
    """Times a call of the model waited for the peer's rate limit (or a provider's
    Retry-After) so far."""
    waiting: int = 0
    """Calls of the model waiting for a rate limit now."""


@dataclass(frozen=True, slots=True)
class PeerState:
    """A peer's small, bounded advertisement: what it can run and how busy it is, signed by
    the peer. `(incarnation, version)` orders updates from the same peer; the greatest wins.
    `incarnation` is the one the peer started this run with (so a restarted peer's states
    supersede its earlier lives') and `version` counts its states since."""

    node_id: bytes
    version: int
    roles: tuple[str, ...]
    free_slots: int
    queue_len: int
    load: float
    incarnation: int
    sig: bytes
    agents: int = 0
    """LLM agents the peer hosts (0 for a peer of built-in or Python roles only)."""
    spend_micro: int = 0
    """Micro-dollars its model calls cost (kept across its restarts: decision 52): what a
    dashboard at any peer sums into the network's spend."""
    models: tuple[ModelUsage, ...] = ()
    """Up to `MAX_STATE_MODELS` of the models it calls, with spend and breaker: a dashboard
    at any peer shows the network's spend by model and every open breaker (decision 54)."""
    runs: tuple[int, ...] = ()
    """The peer's executions since it started, counted as `RUN_COUNTS` names them, or () for
    none yet: a dashboard at any peer sums them into the network's totals (decision 64)."""

    @property
    def order(self) -> tuple[int, int]:
        """What orders this peer's states: the greater wins."""
        return (self.incarnation, self.version)

    def signed_payload(self) -> bytes:
        """The payload the signature covers (see `identity.signing_input`)."""
        return peer_state_payload(
            self.node_id,
            self.incarnation,
            self.version,
            self.roles,
            self.free_slots,
            self.queue_len,
            self.load,
            self.agents,
            self.spend_micro,
            self.models,
            self.runs,
        )


MembershipMessage = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead
"""The SWIM messages (`protocol.membership.Membership.dispatch` takes each one)."""

Message = MembershipMessage | PushPull | UserEvent | PeerState | TaskMessage
"""Every wire message."""


def alive_payload(public_key: bytes, addr: str, incarnation: int) -> bytes:
    """Canonical bytes an alive record's signature covers."""
    return bytes(msgpack.packb([public_key, addr, incarnation]))


def peer_state_payload(
    node_id: bytes,
    incarnation: int,
    version: int,
    roles: tuple[str, ...],
    free_slots: int,
    queue_len: int,
    load: float,
    agents: int,
    spend_micro: int,
    models: tuple[ModelUsage, ...] = (),
    runs: tuple[int, ...] = (),
) -> bytes:
    """Canonical bytes a peer state's signature covers (the models only when there are any or
    run counts follow, the run counts only when there are any, so a state without them signs
    as before decisions 54 and 64)."""
    fields: list[object] = [
        node_id,
        incarnation,
        version,
        list(roles),
        free_slots,
        queue_len,
        float(load),
        agents,
        spend_micro,
    ]
    if models or runs:
        fields.append(model_usage_fields(models))
    if runs:
        fields.append(list(runs))
    return bytes(msgpack.packb(fields))


def model_usage_fields(models: tuple[ModelUsage, ...]) -> list[list[object]]:
    """The wire form of `PeerState.models`: [model, spend, breaker], followed by [tokens,
    waits, waiting] only when one of them is not 0 (decision 59), so a state of decision 54's
    shape signs and encodes as it did."""
    out: list[list[object]] = []
    for m in models:
        entry: list[object] = [m.model, m.spend_micro, int(m.breaker)]
        if m.tokens or m.waits or m.waiting:
            entry += [m.tokens, m.waits, m.waiting]
        out.append(entry)
    return out
