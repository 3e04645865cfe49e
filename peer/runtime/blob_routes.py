"""Blobs between peers: the transport's two blob routes and the client that calls them.

Blobs (`protocol.blobs`, docs/tasks.md "Blobs") travel over the transport's server as sealed
streams (`peer.runtime.sealing`, "Stream layout": the length authenticated first, then 64 KiB
chunks each authenticated on its own), with a `Sealer` and an `Opener` of their own (their own
sequence numbers and replay windows), so that a long blob transfer can never push envelope
frames out of a replay window or the reverse:
- ``POST /gv/v1/blob/push``: a stream of ``digest (32) + task id (32) + data``, the task id
  naming the task the blob is pushed for (one whose input or output it is). From the first
  chunk the receiver's holder (`BlobHolder.admit_push`) decides: a peer that is not one of the
  task's designated holders in its own view refuses it with 403 and
  ``rejected["blob_not_holder"]``, one without room in its quota with 507 and
  ``rejected["blob_over_quota"]``, each before any more is read. An admitted push is streamed
  to a temporary file as its chunks are authenticated and put in place only if `data` hashes to
  `digest` (204); else it is dropped, counted ``rejected["blob_digest_mismatch"]`` (422). A
  push that fails on the way (cut short, forged chunk, disk full: 507 and
  ``rejected["blob_store_failed"]``) leaves nothing behind. The task id came with the
  designated-holder rule (issue 11); a peer from before it hashes ``task id + data`` and answers
  422, and a push from before it has its data's first 32 bytes read as a task id (403, or 422
  for the rest): both fail closed, and a network runs one version (decision 20).
- ``POST /gv/v1/blob/get``: a stream of ``digest``; the answer is a stream of ``digest + data``
  (200) or 404 when the blob is not held here. The fetcher reads no answer longer than the
  size the blob's reference gives, and checks the digest too, so a copy from any peer is as
  good as the original.

Invariants:
- Nobody without a network key can read, inject or request a blob, and a stranger's blob
  request costs `PREFIX_BYTES` of reading (`peer.runtime.intake`).
- A push's bytes past its first chunk are read only once its length is authenticated and its
  task, digest and length are admitted; it holds at most `PUSH_BUFFER` bytes in memory,
  whatever its size. A push, a get and an answer are sealed for their own routes, so none
  opens as another, and no envelope frame opens as any of them.
- A push or a fetch takes at most `blob_timeout` seconds in all, each piece `read_timeout`.

The blob opener tolerates a clock skew of `BLOB_MAX_SKEW`; replaying a captured blob stream
gains nothing, since content is checked by digest and answers are sealed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Final, Protocol, TypeVar

import aiohttp
from aiohttp import web

from peer.runtime.blob_store import BlobWriter
from peer.runtime.intake import BODY_ERRORS, Intake, problem, source_of
from peer.runtime.keyring import Keyring
from peer.runtime.sealing import (
    ROUTE_BLOB_ANSWER,
    ROUTE_BLOB_GET,
    ROUTE_BLOB_PUSH,
    STREAM_CHUNK,
    Opener,
    Sealer,
    SealError,
    StreamOpening,
    stream_bytes,
)
from protocol.blobs import BLOB_LIMIT, DIGEST_BYTES

BLOB_PUSH_PATH: Final = "/gv/v1/blob/push"
BLOB_GET_PATH: Final = "/gv/v1/blob/get"
PUSH_HEAD_BYTES: Final = 2 * DIGEST_BYTES
"""Bytes before a push's data: the blob's digest and the id of the task it is pushed for."""
NO_TASK: Final = bytes(32)
"""The task id of a push made for no task: only a bare `BlobStore` (no holder rule, as a
transport on its own in tests) accepts it; a peer's blob service refuses it."""
BLOB_FRAME_BYTES: Final = stream_bytes(PUSH_HEAD_BYTES + BLOB_LIMIT)
"""Largest blob stream: a push of the largest blob, sealed."""
PUSH_BUFFER: Final = 2 * STREAM_CHUNK
"""Bytes a push being received counts against the intake's memory bound: the chunk being
read and the one being written (the rest of the blob is on disk)."""
BLOB_MAX_SKEW: Final = 600.0
"""Seconds a blob stream's timestamp may differ from the receiver's clock: a blob request is
sealed before it waits, behind others, for one of the connections to its peer."""
BLOB_TIMEOUT: Final = 120.0
"""Seconds one blob push or fetch may take in total, connecting included (a 64 MiB blob at
1 MB/s takes about 67 s)."""
ANSWER_TEXT_BYTES: Final = 1024
"""Most bytes of an answer read when no blob is expected (a status line's explanation)."""

_T = TypeVar("_T")


class BlobHolder(Protocol):
    """Where pushed blobs go and served blobs come from: a peer's
    `peer.runtime.blobs.BlobService` (the designated-holder rule, then its store), or a bare
    `peer.runtime.blob_store.BlobStore` (the quota only).

    `get`, `open_push` and the writer's methods block on disk I/O and hashing; they run in a
    thread. `admit_push` and `release_push` do not block.
    """

    def get(self, digest: bytes) -> bytes | None: ...

    def admit_push(self, task_id: bytes, digest: bytes, size: int) -> str | None:
        """None to admit a push of `size` bytes (set aside until `release_push`), else the
        reason it is refused (a key of the intake's refusal counters)."""
        ...

    def release_push(self, size: int) -> None: ...

    def open_push(self, digest: bytes) -> BlobWriter: ...


class BlobTransferError(Exception):
    """A blob push or fetch failed; `reason` is short and lowercase ("connection refused",
    "HTTP 503", "digest mismatch", ...)."""

    def __init__(self, addr: str, reason: str) -> None:
        super().__init__(f"{addr}: {reason}")
        self.addr = addr
        self.reason = reason


class BlobRoutes:
    """The blob routes of one transport, both sides.

    Args:
        keyring: the network keyring.
        boot_id: the transport's boot id.
        intake: the transport's bounded reads and refusals (its `rejected` counts these too).
        clock: wall-clock seconds.
        blob_timeout: seconds one push or fetch may take in all.
    """

    def __init__(
        self,
        keyring: Keyring,
        boot_id: bytes,
        intake: Intake,
        clock: Callable[[], float],
        blob_timeout: float,
    ) -> None:
        self._sealer = Sealer(keyring, boot_id)
        self._opener = Opener(keyring, max_skew=BLOB_MAX_SKEW, max_frame=BLOB_FRAME_BYTES)
        self._opener.rejected = intake.rejected  # one set of counters for every refusal
        self._intake = intake
        self._clock = clock
        self._blob_timeout = blob_timeout
        self.store: BlobHolder | None = None
        """Serves and receives blobs; without one the blob routes answer 503."""
        self.blobs_in = 0
        self.blobs_out = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def rekey(self, keyring: Keyring) -> None:
        """Seal and open with `keyring` from now on, keeping sequence and replay state."""
        self._sealer = self._sealer.rekeyed(keyring)
        self._opener = self._opener.rekeyed(keyring)

    def add_to(self, app: web.Application) -> None:
        """Serve the blob routes on `app`."""
        app.router.add_post(BLOB_PUSH_PATH, self._handle)
        app.router.add_post(BLOB_GET_PATH, self._handle)

    # Client side

    async def push(
        self,
        session: aiohttp.ClientSession,
        addr: str,
        digest: bytes,
        data: bytes,
        task_id: bytes = NO_TASK,
    ) -> None:
        """See `peer.runtime.transport.Transport.push_blob`."""
        if len(digest) != DIGEST_BYTES or len(task_id) != DIGEST_BYTES:
            raise BlobTransferError(addr, "a digest and a task id are 32 bytes each")
        async with self._exchange(
            session, addr, BLOB_PUSH_PATH, ROUTE_BLOB_PUSH, digest + task_id + data
        ) as (response):
            if response.status >= 300:
                raise await _transfer_error(addr, response)
        self.blobs_out += 1

    async def fetch(
        self, session: aiohttp.ClientSession, addr: str, digest: bytes, size: int
    ) -> bytes | None:
        """See `peer.runtime.transport.Transport.fetch_blob`."""
        longest = DIGEST_BYTES + size
        async with self._exchange(session, addr, BLOB_GET_PATH, ROUTE_BLOB_GET, digest) as response:
            if response.status == 404:
                return None
            if response.status >= 300:
                raise await _transfer_error(addr, response)
            length = response.content_length
            if length is not None and length > stream_bytes(longest):
                self._intake.rejected["too_large"] += 1
                raise BlobTransferError(
                    addr, f"an answer of {length} bytes exceeds the blob's size"
                )
            try:
                opening = await self._intake.read_head(
                    response.content, self._opener, ROUTE_BLOB_ANSWER, longest, self._clock()
                )
                plain = await self._intake.read_stream(response.content, opening)
            except SealError as exc:
                raise BlobTransferError(addr, f"sealed answer refused: {exc.reason}") from None
            self.bytes_in += stream_bytes(opening.size)
        if plain[:DIGEST_BYTES] != digest:
            raise BlobTransferError(addr, "the answer is not the blob asked for")
        data = plain[DIGEST_BYTES:]
        if not await asyncio.to_thread(_matches, digest, data):
            self._intake.rejected["blob_digest_mismatch"] += 1
            raise BlobTransferError(addr, "digest mismatch")
        self.blobs_in += 1
        return data

    @contextlib.asynccontextmanager
    async def _exchange(
        self, session: aiohttp.ClientSession, addr: str, path: str, route: bytes, plain: bytes
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Post `plain` sealed as a stream for `route`; yield the answer; turn every failure
        to reach the peer or read its answer into `BlobTransferError`."""
        try:
            stream = self._sealer.seal_stream(plain, self._clock(), route)
        except OverflowError as exc:
            raise BlobTransferError(addr, f"cannot seal: {exc}") from None
        # No read deadline of its own: a push's answer waits on the receiver's fsync, and a
        # fetch's pieces are read through the intake, each within its read timeout.
        timeout = aiohttp.ClientTimeout(total=self._blob_timeout)
        try:
            async with session.post(
                f"http://{addr}{path}",
                data=stream,
                headers={"Content-Type": "application/octet-stream"},
                timeout=timeout,
            ) as response:
                self.bytes_out += len(stream)
                yield response
        except aiohttp.ClientConnectorError as exc:
            raise BlobTransferError(addr, connect_reason(exc)) from None
        except asyncio.IncompleteReadError:
            raise BlobTransferError(addr, "the answer was cut short") from None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            )
            raise BlobTransferError(addr, reason) from None

    # Server side

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        source = source_of(request)
        store = self.store
        if store is None:
            return problem(503, "this peer holds no blobs", close=True)
        length = request.content_length
        if length is not None and length > BLOB_FRAME_BYTES:
            return self._intake.refuse(source, "too_large", f"{length} bytes")
        push = request.path == BLOB_PUSH_PATH
        route = ROUTE_BLOB_PUSH if push else ROUTE_BLOB_GET
        longest = PUSH_HEAD_BYTES + BLOB_LIMIT if push else DIGEST_BYTES
        try:
            async with asyncio.timeout(self._blob_timeout):
                opening = await self._intake.read_head(
                    request.content, self._opener, route, longest, self._clock()
                )
                if length is not None and length != stream_bytes(opening.size):
                    return self._intake.refuse(source, "bad_length", f"{length} bytes")
                if push:
                    return await self._receive_push(request, source, store, opening)
                digest = await self._intake.read_stream(request.content, opening)
        except SealError as exc:
            return self._intake.refused_frame(source, exc, "blob stream: ")
        except BODY_ERRORS as exc:
            return self._intake.refuse_body(source, exc)
        self.bytes_in += stream_bytes(opening.size)
        if len(digest) != DIGEST_BYTES:
            return self._intake.refuse(source, "bad_blob_request", f"{len(digest)}-byte digest")
        data = await asyncio.to_thread(store.get, digest)
        if data is None:
            return problem(404, "not held here")
        answer = self._sealer.seal_stream(digest + data, self._clock(), ROUTE_BLOB_ANSWER)
        self.blobs_out += 1
        self.bytes_out += len(answer)
        return web.Response(body=answer, content_type="application/octet-stream")

    async def _receive_push(
        self, request: web.Request, source: str, store: BlobHolder, opening: StreamOpening
    ) -> web.StreamResponse:
        """Admit a push stream from its first chunk, then stream the rest to disk (`_handle`'s
        deadline and error handling apply)."""
        size = opening.size - PUSH_HEAD_BYTES
        if size <= 0:
            return self._intake.refuse(source, "bad_blob_request", f"a {opening.size}-byte push")
        first = opening.open_chunk(
            await self._intake.read_exactly(request.content, opening.next_chunk_bytes)
        )
        digest, task_id = first[:DIGEST_BYTES], first[DIGEST_BYTES:PUSH_HEAD_BYTES]
        refusal = store.admit_push(task_id, digest, size)
        if refusal is not None:
            what = f"blob {digest.hex()[:12]} for task {task_id.hex()[:12]}, {size} bytes"
            return self._intake.refuse(source, refusal, what)
        try:
            with self._intake.buffering(PUSH_BUFFER):
                writer = await _on_disk(store.open_push, digest)
                try:
                    stored = await self._stream_to(writer, request, opening, first)
                except BaseException:
                    writer.abort()
                    raise
        except NotStored as exc:
            self._intake.rejected["blob_store_failed"] += 1
            self._intake.log_refusal(source, f"blob {digest.hex()[:12]} not stored: {exc}")
            return problem(507, "blob_store_failed", close=True)
        finally:
            store.release_push(size)
        self.bytes_in += stream_bytes(opening.size)
        if not stored:
            self._intake.rejected["blob_digest_mismatch"] += 1
            self._intake.log_refusal(source, f"blob {digest.hex()[:12]}: digest mismatch")
            return problem(422, "blob_digest_mismatch")
        self.blobs_in += 1
        return web.Response(status=204)

    async def _stream_to(
        self, writer: BlobWriter, request: web.Request, opening: StreamOpening, first: bytes
    ) -> bool:
        """Write the data of the push whose first chunk is `first`, then each further chunk as
        it opens; return `writer.commit()`."""
        await _on_disk(writer.write, first[PUSH_HEAD_BYTES:])
        while sealed_bytes := opening.next_chunk_bytes:
            sealed = await self._intake.read_exactly(request.content, sealed_bytes)
            await _on_disk(writer.write, opening.open_chunk(sealed))
        return await _on_disk(writer.commit)


class NotStored(Exception):
    """A pushed blob could not be written to this peer's disk (the `OSError` is the cause)."""


async def _on_disk(call: Callable[..., _T], *args: object) -> _T:
    """Run a blocking disk call in a thread; its `OSError` becomes `NotStored`, so that it is
    not mistaken for a network error (`TimeoutError` is an `OSError` too)."""
    try:
        return await asyncio.to_thread(call, *args)
    except OSError as exc:
        raise NotStored(str(exc)) from exc


def connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    """A short, lowercase reason a connection could not be made."""
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(os_error, TimeoutError):
        return "timed out"
    return os_error.strerror.lower() if os_error.strerror else str(os_error) or "cannot connect"


async def _transfer_error(addr: str, response: aiohttp.ClientResponse) -> BlobTransferError:
    text = (await response.content.read(ANSWER_TEXT_BYTES)).decode("utf-8", errors="replace")
    text = text.strip()[:200]
    return BlobTransferError(addr, f"HTTP {response.status}" + (f" ({text})" if text else ""))


def _matches(digest: bytes, data: bytes) -> bool:
    return hashlib.sha256(data).digest() == digest
