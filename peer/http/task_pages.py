"""The network scope of `GET /v1/tasks`: one page of a listing gathered from every live member.

docs/http-api.md is the contract. `peer.http.tasks` routes `?scope=network` here once it has
checked the filters both scopes share (`state`, `role`, `owner`).

Invariants:
- Every parameter is checked before any peer is asked: `limit` is 1 to `MAX_PAGE` (default
  `DEFAULT_PAGE`), `cursor` is empty or a full task id (64 hex digits); anything else is 400.
- The answer is `{tasks, next_cursor, partial, missing}`: `tasks` in id order, each task once;
  `next_cursor` the id to pass as `cursor` for the next page, null on the last; `partial` true
  when a member did not answer in time, `missing` those members' ids. Following `next_cursor`
  from an empty cursor to null lists every task the answering members arbitrate exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from peer.http.common import Json, bad_request
from peer.node_ids import node_id_text
from peer.runtime.task_listing import NetworkListing
from protocol.tasks.listing import PageQuery
from protocol.tasks.messages import MAX_PAGE, TaskSummary

DEFAULT_PAGE = 100
"""Tasks on one page of a network listing when the request names no `limit`."""
TASK_ID_DIGITS = 64


def summary_json(s: TaskSummary) -> Json:
    """The API form of one row of a network listing."""
    return {
        "id": s.task_id.hex(),
        "role": s.role,
        "state": s.state,
        "outcome": s.outcome or None,
        "origin": node_id_text(s.origin),
        "owner": node_id_text(s.owner) if s.owner else None,
        "epoch": s.epoch,
        "created": s.created,
    }


def page_query(params: Mapping[str, str], state: str, role: str, owner: bytes) -> PageQuery:
    """The page a network listing request names.

    Args:
        params: the request's query parameters (`limit`, `cursor`).
        state: the state filter, already checked ("" for any).
        role: the role filter ("" for any).
        owner: the owner filter, a node id (b"" for any), already checked.

    Raises:
        Problem: 400, naming the parameter that is wrong.
    """
    limit_text = params.get("limit", str(DEFAULT_PAGE))
    if not limit_text.isdigit() or not 0 < int(limit_text) <= MAX_PAGE:
        raise bad_request(
            f"limit must be an integer from 1 to {MAX_PAGE} with scope=network, got {limit_text!r}"
        )
    cursor = params.get("cursor", "").strip().lower()
    if cursor and (
        len(cursor) != TASK_ID_DIGITS or any(c not in "0123456789abcdef" for c in cursor)
    ):
        raise bad_request(
            f"cursor must be a full task id ({TASK_ID_DIGITS} hex digits), the next_cursor of "
            f"the previous page; got {cursor[:70]!r}"
        )
    return PageQuery(bytes.fromhex(cursor), int(limit_text), state, role, owner)


async def network_page(
    listing: NetworkListing, params: Mapping[str, str], state: str, role: str, owner: bytes
) -> web.Response:
    """Answer `GET /v1/tasks?scope=network` (see the module invariants).

    Raises:
        Problem: 400 for a bad `limit` or `cursor`.
    """
    page = await listing.page(page_query(params, state, role, owner))
    body: Json = {
        "tasks": [summary_json(s) for s in page.tasks],
        "next_cursor": page.next_cursor.hex() if page.next_cursor is not None else None,
        "partial": bool(page.missing),
        "missing": [node_id_text(m) for m in page.missing],
    }
    return web.json_response(body)
