"""Lanes: SWIM probe traffic goes through the transport ahead of task traffic.

A busy peer is not a dead peer. A probe, or its ack, that waits behind task objects makes a
loaded peer look silent, and its peers suspect it and hand its work to others: the false
positive Lifeguard (Dadgar, Phillips and Currey, 2018) attributes to slow message processing.
So the transport carries two lanes:

- The probe lane: an envelope of at most `PROBE_ENVELOPE_BYTES` that carries a probe-class
  message (`PROBE_KINDS`: ping, indirect ping, ack, nack), with whatever gossip rode along
  (at most `GossipConfig.packet_budget` bytes). It is sent at once, alone, on the
  destination's probe channel (a WebSocket of its own, over connections of its own: decision
  76), and handled as soon as it is read.
- The bulk lane: everything else. It is sent coalesced per destination, on the
  destination's channel (`peer.runtime.channels`), and on receipt handed on by `BulkLane` in
  slices, one per event-loop turn, in arrival order, each sized to hold the loop about
  `SLICE_SECONDS`: every step of a probe's round trip (a dozen loop turns or so: reading the
  request, handling it, posting the ack) then waits at most one slice, instead of a whole
  envelope of task objects.

Invariants:
- Classifying decodes the envelope (`protocol.envelope`; its messages stay encoded) and reads
  each message's kind byte; the wire format is unchanged, so peers without lanes
  interoperate. Anything that does not decode as an envelope is bulk and is handed on whole
  (the node refuses it as before).
- Slicing only regroups, like `protocol.envelope.merge_envelopes` in reverse: every message
  is handed on once, in order, under the envelope's sender, as if it had been sent in several
  envelopes. A malformed message then costs its slice, not the whole envelope.
- `BulkLane` hands on at most one slice per loop turn, envelopes in arrival order; `handle`
  returns once every slice of its envelope was handed on, so a channel's next message (or a
  request's answer) waits for it (backpressure per sender).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from protocol.dissemination import PROBE_KINDS
from protocol.envelope import Envelope, decode_envelope, encode_envelope
from protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)

PROBE_ENVELOPE_BYTES: Final = 16 * 1024
"""Largest envelope the probe lane carries. A probe or ack with its piggybacked gossip is at
most `GossipConfig.packet_budget` (8 KiB by default) plus an alive record; anything larger is
bulk, whatever it carries, so what skips the bulk lane's slicing stays cheap to handle."""
SLICE_SECONDS: Final = 0.004
"""How long one slice should hold the event loop. A probe's round trip between two peers
takes a dozen loop turns or so at each, so a busy peer adds about 12 x 4 ms to it, far below
the probe timeout (200 ms on the local profile). Shorter slices cost more steps per envelope
(each one a node call and a disk write, a fraction of a millisecond)."""
SLICE_BYTES: Final = 256 * 1024
"""Most bytes of messages in one slice (a single larger message goes alone)."""
FIRST_SLICE_MESSAGES: Final = 16
"""Messages in the first slice, before any has been timed."""

Receive = Callable[[str, bytes], None]
"""Takes one envelope from a source (the transport's `on_receive`)."""


def is_probe_class(data: bytes) -> bool:
    """Whether the encoded envelope `data` belongs on the probe lane (see the module doc)."""
    if len(data) > PROBE_ENVELOPE_BYTES:
        return False
    try:
        envelope = decode_envelope(data)
    except RemoteProtocolError:
        return False
    # A message is a fixarray whose first element is its kind (`protocol.codec`), so its
    # second byte is the kind while kinds stay below 128.
    return any(len(raw) > 1 and raw[1] in PROBE_KINDS for raw in envelope.messages)


def hand_on(receive: Receive, source: str, data: bytes) -> bool:
    """Call `receive(source, data)`; False, logged, if it raised. The protocol never raises on
    input, so this guards the host's own bugs: one bad envelope must not stop the lanes."""
    try:
        receive(source, data)
    except Exception:
        log.exception("handling a frame from %s failed", source)
        return False
    return True


def next_slice(envelope: Envelope, start: int, count: int) -> tuple[bytes, int]:
    """The envelope of up to `count` messages of `envelope` from index `start`, within
    `SLICE_BYTES` bytes of messages (at least one message), and how many it holds."""
    end, size = start, 0
    limit = min(len(envelope.messages), start + max(1, count))
    while end < limit:
        size += len(envelope.messages[end])
        if end > start and size > SLICE_BYTES:
            break
        end += 1
    piece = list(envelope.messages[start:end])
    return encode_envelope(envelope.sender, envelope.sender_addr, piece), end - start


def resized(count: int, taken: int, elapsed: float) -> int:
    """The message count of the next slice, after `taken` messages took `elapsed` seconds
    (`count` was asked for): aimed at `SLICE_SECONDS`, growing at most twofold a step, so one
    cheap slice followed by costly messages overshoots the target at most twice."""
    if taken < count:
        return count  # cut short by the envelope's end or `SLICE_BYTES`: nothing learnt
    if elapsed <= 0:
        return 2 * count
    return max(1, min(2 * count, int(count * SLICE_SECONDS / elapsed)))


class _Batch:
    """One received envelope on its way through the lane."""

    __slots__ = ("data", "done", "envelope", "failed", "next", "source")

    def __init__(self, source: str, data: bytes, done: asyncio.Future[bool]) -> None:
        self.source = source
        self.data = data
        self.done = done
        self.envelope: Envelope | None = None
        self.next = 0
        self.failed = False


class BulkLane:
    """The receive side of the bulk lane (see the module invariants).

    Args:
        receive: takes each slice (the transport's `on_receive`, looked up at each call).
        clock: seconds, to time slices.
    """

    __slots__ = ("_clock", "_count", "_queue", "_worker", "receive", "slices_in")

    def __init__(self, receive: Receive, clock: Callable[[], float] = time.perf_counter) -> None:
        self.receive = receive
        self._clock = clock
        self._queue: deque[_Batch] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._count = FIRST_SLICE_MESSAGES
        self.slices_in = 0
        """Slices handed on since the start."""

    @property
    def backlog(self) -> int:
        """Envelopes received and not yet fully handed on."""
        return len(self._queue)

    async def handle(self, source: str, data: bytes) -> bool:
        """Queue the envelope `data` from `source` and wait until all of it was handed on.

        Returns:
            False if handing on a slice of it failed, or the lane was closed first.
        """
        # Shielded: an envelope whose sender gave up waiting is still handed on, in order.
        return await asyncio.shield(self.submit(source, data))

    def submit(self, source: str, data: bytes) -> asyncio.Future[bool]:
        """Queue the envelope `data` from `source` without waiting; the future says, once all
        of it was handed on, whether that went well (as `handle` returns)."""
        loop = asyncio.get_running_loop()
        batch = _Batch(source, data, loop.create_future())
        self._queue.append(batch)
        if self._worker is None:
            self._worker = loop.create_task(self._run())
        return batch.done

    async def close(self) -> None:
        """Stop handing on; what is still queued is dropped (its `handle` returns False)."""
        worker, self._worker = self._worker, None
        for batch in self._queue:
            if not batch.done.done():
                batch.done.set_result(False)
        self._queue.clear()
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _run(self) -> None:
        try:
            while self._queue:
                self._step(self._queue[0])
                # One slice per loop turn: whatever became ready meanwhile (a probe read, an
                # ack to post) runs before the next one.
                await asyncio.sleep(0)
        finally:
            if self._worker is asyncio.current_task():
                self._worker = None

    def _step(self, batch: _Batch) -> None:
        """Hand on the next slice of `batch`, and finish it after its last one."""
        if batch.envelope is None:
            try:
                batch.envelope = decode_envelope(batch.data)
            except RemoteProtocolError:
                self._finish(batch, self._hand_on(batch.source, batch.data))
                return
        envelope = batch.envelope
        count = self._count
        if batch.next == 0 and len(envelope.messages) <= count and len(batch.data) <= SLICE_BYTES:
            piece, taken = batch.data, len(envelope.messages)
        else:
            piece, taken = next_slice(envelope, batch.next, count)
        started = self._clock()
        if not self._hand_on(batch.source, piece):
            batch.failed = True
        self._count = resized(count, taken, self._clock() - started)
        batch.next += taken
        if batch.next >= len(envelope.messages):
            self._finish(batch, not batch.failed)

    def _hand_on(self, source: str, piece: bytes) -> bool:
        self.slices_in += 1
        return hand_on(self.receive, source, piece)

    def _finish(self, batch: _Batch, ok: bool) -> None:
        self._queue.popleft()
        if not batch.done.done():
            batch.done.set_result(ok)
