"""Blob bytes by digest: GET /v1/blobs/{digest}.

Invariants:
- A blob is answered by its SHA-256 digest, fetched from other peers (its rendezvous holders,
  then the peers the task plane hints at) when this peer has no intact copy.
- A peer without a blob service answers 503 for every blob: it cannot tell whether one exists.
"""

from __future__ import annotations

from aiohttp import web

from peer.http.common import Problem, bad_request
from peer.runtime.blobs import BlobService, BlobUnavailable, blob_hints, digest_of_text
from peer.runtime.driver import Driver


class BlobApi:
    """The /v1/blobs endpoint of one peer.

    Args:
        driver: the peer's driver (where the hints about a blob's holders come from).
        blobs: the peer's blob service, or None when it serves no blobs.
    """

    def __init__(self, driver: Driver, blobs: BlobService | None) -> None:
        self.driver = driver
        self.blobs = blobs

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.get("/v1/blobs/{digest}", self._get)]

    async def _get(self, request: web.Request) -> web.Response:
        text = request.match_info["digest"]
        digest = digest_of_text(text)
        if digest is None:
            raise bad_request(f"a blob digest is 64 hex digits (SHA-256), got {text[:70]!r}")
        if self.blobs is None:
            raise Problem(503, "Service Unavailable", "this peer does not serve blobs")
        try:
            data = await self.blobs.get(digest, blob_hints(self.driver, digest))
        except BlobUnavailable as exc:
            raise Problem(404, "Not Found", f"blob {digest.hex()}: {exc}") from None
        return web.Response(body=data, content_type="application/octet-stream")
