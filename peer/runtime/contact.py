"""When this peer last heard from each member: the wall-clock time of the last envelope
each sender's id came in (the `last_seen` of `GET /v1/members`).

The transport records every envelope it accepted, before the node decodes it. Only the
envelope's head is read here (`protocol.envelope.peek_sender`): decoding the whole envelope a
second time would cost about 20 µs per 8 KiB, reading its sender under 1 µs whatever its size.
An envelope whose head is not an envelope's is not recorded (the node drops it).

Invariants:
- A time is recorded only for a frame that opened under the network key, so a stranger cannot
  make a member look alive here; a member holding the key can name another sender (the
  envelope's sender is not signed), as it can in the envelope itself.
- At most `max_senders` ids are remembered, the least recently heard forgotten first, so
  made-up sender ids cannot grow the table without bound.
- Times are what the transport's clock read on receipt (unix seconds); they never move back
  for one sender.
"""

from __future__ import annotations

from collections import OrderedDict

from protocol.envelope import peek_sender

MAX_SENDERS = 4096
"""Senders remembered; far more than the members of any network this peer keeps in view."""


class LastContact:
    """The last time each sender was heard from (see the module invariants).

    Args:
        max_senders: senders remembered at most.
    """

    def __init__(self, max_senders: int = MAX_SENDERS) -> None:
        self.max_senders = max_senders
        self._heard: OrderedDict[bytes, float] = OrderedDict()

    def heard(self, envelope: bytes, now: float) -> None:
        """Record that `envelope` (opened, not yet decoded) arrived at `now`."""
        sender = peek_sender(envelope)
        if sender is None:
            return
        self._heard[sender] = max(now, self._heard.get(sender, now))
        self._heard.move_to_end(sender)
        if len(self._heard) > self.max_senders:
            self._heard.popitem(last=False)

    def get(self, node_id: bytes) -> float | None:
        """When `node_id` was last heard from, or None if not since this peer started."""
        return self._heard.get(node_id)
