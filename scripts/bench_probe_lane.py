"""Probe ack latency while two peers' transports flood each other with task objects.

    .venv/bin/python scripts/bench_probe_lane.py [--envelopes 12] [--messages 1500]

Two real `peer.runtime.transport.Transport`s on 127.0.0.1 (sealed, coalescing as a peer's do)
send each other `--envelopes` envelopes of `--messages` task-sized messages each, all at
once, while each pings the other every `--ping-interval` seconds. Their receivers are
`FloodNode`s: each task message costs `--cost` seconds of CPU on the event loop (what a node
pays to verify one signed task object, ~100 us measured with PyNaCl), and each ping is
answered with an ack at once, as `protocol.probing` does. A table gives the round trip of every
ping sent during the flood, with the lanes (`peer.runtime.lanes`) and without them (the probe
lane closed and each envelope handed on whole, as before the lanes existed), in the same run.
A ping with no ack within `LOST_AFTER` seconds counts as lost. Bounded: each run ends when both
floods were handled, or after `--deadline` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import msgpack

from peer.runtime import channel_receiver, lanes, transport
from peer.runtime.keyring import Keyring
from peer.runtime.transport import Transport
from protocol.codec import decode_message, encode_message
from protocol.envelope import decode_envelope, encode_envelope, merge_envelopes
from protocol.wire import Ack, Kind, Ping

KEY = bytes(range(32))
TASK_COST = 100e-6
"""Seconds of CPU one task message costs its receiver (one Ed25519 verify and its merge)."""
LOST_AFTER = 2.0
"""Seconds after which a ping without an ack counts as lost."""
_TASK_KIND = Kind.TASK


def node_id(name: bytes) -> bytes:
    """A stand-in node id."""
    return hashlib.sha256(name).digest()


def task_message(i: int, size: int) -> bytes:
    """An encoded message of kind TASK about `size` bytes long, distinct for each `i` (never
    decoded: only its kind and its cost matter here)."""
    payload = i.to_bytes(8, "big") * (size // 8) + bytes(size % 8)
    return bytes(msgpack.packb([_TASK_KIND, payload]))


@dataclass
class FloodNode:
    """Stands in for a peer's node behind a transport: pays `cost` per task message, acks
    pings at once, and records the round trip of its own pings.

    Attributes:
        tasks_handled: task messages handled so far.
        rtts: round trip (seconds) of each acked ping, by sequence number.
    """

    name: bytes
    cost: float = TASK_COST
    transport: Transport | None = None
    tasks_handled: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)
    rtts: dict[int, float] = field(default_factory=dict)

    @property
    def node_id(self) -> bytes:
        return node_id(self.name)

    @property
    def addr(self) -> str:
        assert self.transport is not None
        return f"127.0.0.1:{self.transport.port}"

    def envelope(self, messages: list[bytes]) -> bytes:
        """An envelope from this node."""
        return encode_envelope(self.node_id, self.addr, messages)

    def ping(self, target: FloodNode, seq: int) -> None:
        """Send a ping to `target` now."""
        assert self.transport is not None
        self.sent_at[seq] = time.perf_counter()
        ping = encode_message(Ping(seq, target.node_id))
        self.transport.send(target.addr, self.envelope([ping]), probe=True)

    def __call__(self, src: str, data: bytes) -> None:
        envelope = decode_envelope(data)
        for raw in envelope.messages:
            if raw[1] == _TASK_KIND:
                until = time.perf_counter() + self.cost
                while time.perf_counter() < until:
                    pass
                self.tasks_handled += 1
                continue
            msg = decode_message(raw)
            if isinstance(msg, Ping):
                assert self.transport is not None
                ack = self.envelope([encode_message(Ack(msg.seq))])
                self.transport.send(envelope.sender_addr, ack, probe=True)
            elif isinstance(msg, Ack) and msg.seq in self.sent_at:
                self.rtts.setdefault(msg.seq, time.perf_counter() - self.sent_at[msg.seq])


@dataclass(frozen=True)
class FloodResult:
    """One flood: the round trips of the pings sent while it ran, and what it took."""

    rtts: list[float]
    """Round trips (seconds) of the pings acked within `LOST_AFTER`, both directions."""
    lost: int
    """Pings sent during the flood without an ack within `LOST_AFTER`."""
    seconds: float
    """Time from the first task envelope sent to the last task message handled."""
    tasks: int
    """Task messages handled, both sides."""
    probe_sends: int
    """Sends that took the probe lane, both sides."""


@contextlib.contextmanager
def without_lanes() -> Iterator[None]:
    """The transport as it was before the lanes: probe-class envelopes ride the bulk lane
    (queued and coalesced per destination) and a received envelope is handed on whole."""

    async def whole(lane: lanes.BulkLane, source: str, data: bytes) -> bool:
        return lanes.hand_on(lane.receive, source, data)

    send = transport.Transport.send

    def bulk_send(self: transport.Transport, addr: str, data: bytes, probe: bool = False) -> None:
        send(self, addr, data, False)

    with (
        mock.patch.object(transport.Transport, "send", bulk_send),
        mock.patch.object(transport, "is_probe_class", lambda data: False),
        mock.patch.object(channel_receiver, "is_probe_class", lambda data: False),
        mock.patch.object(lanes.BulkLane, "handle", whole),
    ):
        yield


async def flood(
    envelopes: int,
    messages: int,
    *,
    message_bytes: int = 150,
    cost: float = TASK_COST,
    ping_interval: float = 0.05,
    deadline: float = 60.0,
) -> FloodResult:
    """Run one flood both ways between two transports and ping throughout (see the module
    docstring); returns once both floods were handled and the last ping's ack came or
    `LOST_AFTER` passed, or after `deadline` seconds."""
    a, b = FloodNode(b"a", cost), FloodNode(b"b", cost)
    for node in (a, b):
        node.transport = Transport(
            "127.0.0.1", 0, Keyring(KEY), node.name * 8, node, coalesce=merge_envelopes
        )
        await node.transport.start()
    assert a.transport is not None and b.transport is not None
    try:
        total = envelopes * messages
        started = time.perf_counter()
        for k in range(envelopes):
            for src, dst in ((a, b), (b, a)):
                batch = [task_message(k * messages + i, message_bytes) for i in range(messages)]
                assert src.transport is not None
                src.transport.send(dst.addr, src.envelope(batch))
        seq = 0
        end = started + deadline
        while (a.tasks_handled < total or b.tasks_handled < total) and time.perf_counter() < end:
            seq += 1
            a.ping(b, seq)
            b.ping(a, seq)
            await asyncio.sleep(ping_interval)
        seconds = time.perf_counter() - started
        settle = time.perf_counter() + LOST_AFTER
        while time.perf_counter() < settle and (len(a.rtts) < seq or len(b.rtts) < seq):
            await asyncio.sleep(0.01)
        rtts = [rtt for node in (a, b) for rtt in node.rtts.values() if rtt <= LOST_AFTER]
        return FloodResult(
            rtts=rtts,
            lost=2 * seq - len(rtts),
            seconds=seconds,
            tasks=a.tasks_handled + b.tasks_handled,
            probe_sends=a.transport.probe_sends + b.transport.probe_sends,
        )
    finally:
        await a.transport.stop()
        await b.transport.stop()


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `values`, nearest rank; NaN if there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envelopes", type=int, default=12, help="per direction (default 12)")
    parser.add_argument("--messages", type=int, default=1500, help="per envelope (default 1500)")
    parser.add_argument("--bytes", type=int, default=150, help="per message (default 150)")
    parser.add_argument("--cost", type=float, default=TASK_COST, help="seconds per message")
    parser.add_argument("--ping-interval", type=float, default=0.05, help="seconds (0.05)")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds per run (60)")
    args = parser.parse_args(argv)

    async def run() -> FloodResult:
        return await flood(
            args.envelopes,
            args.messages,
            message_bytes=args.bytes,
            cost=args.cost,
            ping_interval=args.ping_interval,
            deadline=args.deadline,
        )

    with without_lanes():
        before = asyncio.run(run())
    after = asyncio.run(run())
    print(
        f"{args.envelopes} envelopes x {args.messages} messages x {args.bytes} B each way, "
        f"{args.cost * 1e6:.0f} us per message, a ping each way every {args.ping_interval} s"
    )
    header = ("transport", "pings", "lost", "p50 ms", "p99 ms", "max ms", "flood s", "msgs/s")
    print(" | ".join(header))
    for name, r in (("without lanes", before), ("with lanes", after)):
        row = (
            name,
            str(len(r.rtts) + r.lost),
            str(r.lost),
            f"{percentile(r.rtts, 50) * 1000:.0f}",
            f"{percentile(r.rtts, 99) * 1000:.0f}",
            f"{max(r.rtts, default=float('nan')) * 1000:.0f}",
            f"{r.seconds:.2f}",
            f"{r.tasks / r.seconds:.0f}",
        )
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
