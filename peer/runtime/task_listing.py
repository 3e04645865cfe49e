"""Network listings gathered at this peer: every live member's page of the tasks it
arbitrates, merged into one page (`GET /v1/tasks?scope=network`).

Invariants:
- Each live member is asked once per page (this peer answers from its own state, unasked), at
  most `CONCURRENCY` at once; one that has not answered `PEER_TIMEOUT` seconds after it was
  asked is reported in `missing`, and its tasks are absent from the page.
- The page is `protocol.tasks.listing.merge_pages` over the pages that came: the smallest
  `limit` ids above the cursor, each once, and the cursor of the next page.
- This peer asks no faster than members answer (`ANSWER_RATE`, `ANSWER_BURST`: one token per
  page, shared by every listing served here), so a client paging through a long listing slows
  down instead of being refused by the members' rate limits.
- Answers are read from the node's state, polled every `POLL` seconds, as `Driver.fetch` does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from peer.runtime.driver import Driver
from protocol.tasks.listing import ANSWER_BURST, ANSWER_RATE, PageQuery, merge_pages
from protocol.tasks.messages import TaskSummary

PEER_TIMEOUT = 2.0
"""Seconds a member has to answer before the listing goes on without it (reported missing)."""
CONCURRENCY = 16
"""Members asked at once: a large network is asked in a sliding window, so one listing never
queues hundreds of sends in the transport at once."""
POLL = 0.02
"""Seconds between looks for the pages that came."""


@dataclass(frozen=True, slots=True)
class NetworkPage:
    """One page of a network listing.

    Attributes:
        tasks: the summaries, in task id order.
        next_cursor: the id to ask the next page after; None when no member has more.
        missing: the members asked that did not answer in time, in id order.
    """

    tasks: list[TaskSummary]
    next_cursor: bytes | None
    missing: list[bytes]


class NetworkListing:
    """Gathers network listings through one peer's driver.

    Args:
        driver: the peer's driver.
        timeout: see `PEER_TIMEOUT`.
        concurrency: see `CONCURRENCY`.
    """

    def __init__(
        self, driver: Driver, timeout: float = PEER_TIMEOUT, concurrency: int = CONCURRENCY
    ) -> None:
        self.driver = driver
        self.timeout = timeout
        self.concurrency = concurrency
        self._tokens = float(ANSWER_BURST)
        self._counted: float | None = None
        """When `_tokens` was last counted (None: never; the budget starts full)."""

    async def page(self, query: PageQuery) -> NetworkPage:
        """Gather the page `query` names from every live member."""
        await self._pace()
        node = self.driver.node
        peers = sorted(m.node_id for m in node.members() if m.up and m.node_id != node.node_id)
        pages: list[tuple[Sequence[TaskSummary], bool]] = [node.own_task_page(query)]
        waiting = deque(peers)
        asked: dict[bytes, tuple[int, float]] = {}
        """Members asked and not answered yet: their request id and deadline."""
        missing: list[bytes] = []
        loop = asyncio.get_running_loop()
        while waiting or asked:
            room = self.concurrency - len(asked)
            if waiting and room > 0:
                batch = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                requests = self.driver.ask_task_pages(batch, query)
                deadline = loop.time() + self.timeout
                for peer in batch:
                    if peer in requests:
                        asked[peer] = (requests[peer], deadline)
                    else:
                        missing.append(peer)  # no longer known here: nowhere to ask
            now = loop.time()
            for peer, (request, deadline) in list(asked.items()):
                page = node.task_page(request)
                if page is not None:
                    pages.append((page.tasks, page.more))
                    del asked[peer]
                elif now >= deadline:
                    missing.append(peer)
                    del asked[peer]
            if asked:
                await asyncio.sleep(POLL)
        tasks, cursor = merge_pages(pages, query.capped)
        return NetworkPage(tasks, cursor, sorted(missing))

    async def _pace(self) -> None:
        """Wait for a token of this peer's listing budget (see the module invariants)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        since = 0.0 if self._counted is None else now - self._counted
        self._tokens = min(float(ANSWER_BURST), self._tokens + since * ANSWER_RATE)
        self._counted = now
        self._tokens -= 1.0
        if self._tokens < 0.0:
            # The debt is counted now, so listings waiting at once queue up behind each other.
            await asyncio.sleep(-self._tokens / ANSWER_RATE)
