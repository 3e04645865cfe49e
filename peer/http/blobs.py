"""Blob bytes by digest: GET /v1/blobs/{digest}.

Invariants:
- A blob is answered by its SHA-256 digest, fetched from other peers (the designated holders,
  origins and owners of the tasks held here that reference it, then the other live peers) when
  this peer has no intact copy; a copy fetched for a read is kept for the blob service's grace
  period.
- A peer without a blob service answers 503 for every blob: it cannot tell whether one exists.
"""

from __future__ import annotations

from aiohttp import web

from peer.http.common import Problem, bad_request
from peer.runtime.blob_references import task_blobs
from peer.runtime.blobs import BlobService, BlobUnavailable
from protocol.blobs import DIGEST_BYTES, parse_blob_ref


class BlobApi:
    """The /v1/blobs endpoint of one peer.

    Args:
        blobs: the peer's blob service, or None when it serves no blobs.
    """

    def __init__(self, blobs: BlobService | None) -> None:
        self.blobs = blobs

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.get("/v1/blobs/{digest}", self._get)]

    async def _get(self, request: web.Request) -> web.Response:
        text = request.match_info["digest"]
        digest = _digest_of_text(text)
        if digest is None:
            raise bad_request(f"a blob digest is 64 hex digits (SHA-256), got {text[:70]!r}")
        if self.blobs is None:
            raise Problem(503, "Service Unavailable", "this peer does not serve blobs")
        try:
            data = await self.blobs.get(digest, _hints(self.blobs, digest))
        except BlobUnavailable as exc:
            raise Problem(404, "Not Found", f"blob {digest.hex()}: {exc}") from None
        return web.Response(body=data, content_type="application/octet-stream")


def _hints(blobs: BlobService, digest: bytes) -> list[bytes]:
    """The peers likely to hold the blob `digest`: the owners of accepted results whose output
    references it, the designated holders of the tasks held here referencing it, and their
    origins and result owners."""
    first: list[bytes] = []
    then: list[bytes] = []
    for state in blobs.driver.node.held_tasks():
        if digest not in task_blobs(state):
            continue
        if state.accepted is not None and _names(state.accepted.output, digest):
            first.append(state.accepted.owner)
        then += blobs.task_holders(state.task_id)
        if state.record is not None:
            then.append(state.record.origin)
        then += [r.owner for r in state.results.values() if _names(r.output, digest)]
    return list(dict.fromkeys(first + then))


def _names(payload: bytes, digest: bytes) -> bool:
    ref = parse_blob_ref(payload)
    return ref is not None and ref[0] == digest


def _digest_of_text(text: str) -> bytes | None:
    """Parse a blob digest given as 64 hex digits (any case); None if it is not one."""
    text = text.strip().lower()
    if len(text) != 2 * DIGEST_BYTES or any(c not in "0123456789abcdef" for c in text):
        return None
    return bytes.fromhex(text)
