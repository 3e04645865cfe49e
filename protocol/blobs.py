"""Content-addressed blobs: the reference a task carries instead of a payload too large to inline.

Invariants:
- A blob is bytes named by their SHA-256 digest; whoever holds bytes whose digest matches holds
  the blob, so copies from any peer are interchangeable and a corrupted or forged copy is
  detected by hashing it.
- A reference is exactly ``REF_PREFIX + <64 lowercase hex digits> + b":" + <size>``, the size in
  decimal without leading zeros and in ``(MAX_INLINE_PAYLOAD, BLOB_LIMIT]``. Anything else —
  upper-case hex, a sign, spaces, a size that would have fit inline — is not a reference but an
  ordinary payload, so no inline input is ever mistaken for one by accident.
- Which peers hold a task's blobs is a pure function of the task id and the membership
  (`designated_holders`): its replica set (`protocol.tasks.placement`, the first
  `replication + 1` members in rendezvous (HRW) order of the task id by
  `protocol.tasks.state.hrw_score`), then `HOLDER_SLACK` more in that order. A peer pushes a
  blob only to the designated holders of a task that references it, and a peer accepts a push
  only when it is one in its own view, so every peer that agrees on the live members agrees on
  the holders, with no directory to keep.

This module does no I/O; storing, sending and fetching blobs is `peer.runtime.blobs`'s job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from protocol.tasks.messages import MAX_INLINE_PAYLOAD
from protocol.tasks.state import hrw_score

REF_PREFIX = b"grapevine-blob:v1:"
"""Every reference starts with these bytes."""
DIGEST_BYTES = 32
BLOB_LIMIT = 64 * 1024 * 1024
"""Largest blob (task input or output), in bytes. Each is held in memory whole while it is
sealed, sent, hashed and handed to a role, so this bounds a peer's memory per transfer."""
MAX_REF_BYTES = len(REF_PREFIX) + 2 * DIGEST_BYTES + 1 + len(str(BLOB_LIMIT))
"""Length of the longest reference (93 bytes)."""
HOLDER_SLACK = 2
"""Members after a task's replica set, in rendezvous order, that are still designated holders
of its blobs. They are where a pusher turns when replicas refuse or cannot be reached, and they
absorb a join or death the pusher and the receiver have not both seen yet: one slot per
failure tolerated. More slack lets a member aim pushes at more peers per task id; none would
make one full or unreachable replica fail the submission."""


def blob_digest(data: bytes) -> bytes:
    """Return the 32-byte SHA-256 digest that names `data`."""
    return hashlib.sha256(data).digest()


def is_blob_size(size: int) -> bool:
    """Whether a payload of `size` bytes is a blob: over `MAX_INLINE_PAYLOAD`, at most
    `BLOB_LIMIT`."""
    return MAX_INLINE_PAYLOAD < size <= BLOB_LIMIT


def blob_ref(data: bytes) -> bytes:
    """Return the reference a task carries in place of `data`.

    Raises:
        ValueError: `data` fits inline (at most `MAX_INLINE_PAYLOAD` bytes) or exceeds
            `BLOB_LIMIT`.
    """
    if not is_blob_size(len(data)):
        raise ValueError(
            f"a blob holds {MAX_INLINE_PAYLOAD + 1} to {BLOB_LIMIT} bytes, got {len(data)}"
        )
    return make_ref(blob_digest(data), len(data))


def make_ref(digest: bytes, size: int) -> bytes:
    """Return the reference to the blob named `digest` of `size` bytes.

    Raises:
        ValueError: the digest is not 32 bytes or the size is outside the blob range.
    """
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"a blob digest is {DIGEST_BYTES} bytes, got {len(digest)}")
    if not is_blob_size(size):
        raise ValueError(f"a blob holds {MAX_INLINE_PAYLOAD + 1} to {BLOB_LIMIT} bytes, got {size}")
    return REF_PREFIX + digest.hex().encode("ascii") + b":" + str(size).encode("ascii")


def parse_blob_ref(payload: bytes) -> tuple[bytes, int] | None:
    """Return (digest, size) if `payload` is exactly a blob reference, else None.

    Never raises: any payload that is not in the exact format is an ordinary payload.
    """
    if len(payload) > MAX_REF_BYTES or not payload.startswith(REF_PREFIX):
        return None
    hex_digest, sep, size_text = payload[len(REF_PREFIX) :].partition(b":")
    if not sep or len(hex_digest) != 2 * DIGEST_BYTES or not _lower_hex(hex_digest):
        return None
    if not size_text.isdigit() or size_text.startswith(b"0"):
        return None
    size = int(size_text)
    if not is_blob_size(size):
        return None
    return bytes.fromhex(hex_digest.decode("ascii")), size


def _lower_hex(text: bytes) -> bool:
    return all(c in b"0123456789abcdef" for c in text)


def designated_holders(task_id: bytes, members: Iterable[bytes], replication: int) -> list[bytes]:
    """Return the members designated to hold the blobs of task `task_id`, in the order a pusher
    tries them: its replica set (the first `replication + 1` in rendezvous order of the task id,
    as `protocol.tasks.placement.top_by_score` ranks them), then `HOLDER_SLACK` more.

    Args:
        task_id: the id of a task whose input or output is a blob.
        members: the members up in the caller's view (alive or suspect), itself included.
        replication: `TaskConfig.replication`.
    """
    return blob_holders(task_id, members, replication + 1 + HOLDER_SLACK)


def blob_holders(digest: bytes, members: Iterable[bytes], k: int) -> list[bytes]:
    """Return the first `k` of `members` in rendezvous order for `digest` (any 32-byte key:
    a task id for `designated_holders`, a blob digest to spread fetches).

    Args:
        digest: the key ranked by.
        members: candidate node ids (duplicates are counted once).
        k: how many to return; fewer if there are fewer members, none if `k` <= 0.

    Returns:
        Node ids, highest `hrw_score(digest, node_id)` first (ties broken by node id).
    """
    if k <= 0:
        return []
    ranked = sorted(set(members), key=lambda node_id: (hrw_score(digest, node_id), node_id))
    ranked.reverse()
    return ranked[:k]
