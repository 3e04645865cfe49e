"""The blob store: blobs on disk under ``<data_dir>/blobs``, one file per digest, with a quota
on the blobs other peers push here.

Invariants:
- A blob file is ``blobs/<64 hex digits>`` and holds exactly the bytes hashing to that name. It
  is written to a temporary file, fsynced and renamed into place (then the directory fsynced),
  so after a crash — kill -9 included — it is either whole or absent. Reading re-hashes it: a
  file that does not match (disk corruption, tampering) is deleted and treated as absent.
- Received blobs are hashed before they are stored; a mismatch is dropped, never stored.
- Blobs other peers push here are held within a quota (`BlobStore.quota`, bytes): a push is
  admitted (`reserve_push`) before its bytes are read, and refused when it would exceed it.
  Each carries a marker file (``blobs/<hex>.pushed``, whose time is the receipt time) written
  before the blob is renamed into place, so no pushed blob is ever unmarked; `sweep` deletes
  those no task references once they are older than a grace period. This peer's own blobs
  (`put`: its inputs and outputs) and the blobs it fetched (`receive`) carry no marker and
  are never swept.
- Every method may be called from a worker thread; the quota's bookkeeping is locked.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Collection
from pathlib import Path

from protocol.blobs import DIGEST_BYTES, blob_digest

log = logging.getLogger(__name__)

BLOBS_DIR = "blobs"
"""The blob directory's name inside a peer's data directory."""
PUSH_QUOTA = 4 * 1024**3
"""Default most bytes of blobs pushed by other peers a peer holds at once: 64 blobs of the
largest size. Lower bounds what a member can make a peer store; too low, and pushes of real
inputs are refused (the pusher then tries the next holder in rendezvous order)."""
_TMP_MARK = ".tmp-"
_PUSHED_MARK = ".pushed"


class BlobStore:
    """Blobs on disk, one file per digest (see the module invariants).

    Args:
        root: the blob directory (``<data_dir>/blobs``); created with mode 0700 if missing.
            Temporary files a crash left behind are removed.
        quota: most bytes of blobs pushed here by other peers held at once (see `PUSH_QUOTA`).
    """

    def __init__(self, root: Path, *, quota: int = PUSH_QUOTA) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.root.glob(f"*{_TMP_MARK}*"):
            leftover.unlink(missing_ok=True)
        self.quota = quota
        self.corrupt = 0
        """Stored files found not to match their name on reading (and deleted)."""
        self._lock = threading.Lock()  # pushes are stored from worker threads
        self._pushed: dict[bytes, int] = {}
        """Digest -> size of the blobs held because another peer pushed them."""
        self._reserved = 0
        for marker in self.root.glob(f"*{_PUSHED_MARK}"):
            digest = _digest_named(marker.name.removesuffix(_PUSHED_MARK))
            try:
                size = self.path(digest).stat().st_size if digest is not None else None
            except FileNotFoundError:
                size = None
            if digest is None or size is None:
                marker.unlink(missing_ok=True)  # a crash between marking and storing
                continue
            self._pushed[digest] = size

    def path(self, digest: bytes) -> Path:
        """The file that holds the blob named `digest`."""
        return self.root / digest.hex()

    def has(self, digest: bytes) -> bool:
        """Whether the blob named `digest` is stored here (not re-hashed)."""
        return len(digest) == DIGEST_BYTES and self.path(digest).is_file()

    @property
    def held_for_others(self) -> int:
        """Bytes of the blobs held here because another peer pushed them."""
        with self._lock:
            return sum(self._pushed.values())

    def get(self, digest: bytes) -> bytes | None:
        """Return the blob named `digest`, its bytes checked, or None if not held (intact)."""
        if len(digest) != DIGEST_BYTES:
            return None
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if blob_digest(data) != digest:
            self.corrupt += 1
            log.error("blob %s on disk does not match its digest; deleted", digest.hex()[:12])
            self.delete(digest)
            return None
        return data

    def put(self, data: bytes) -> bytes:
        """Store `data` durably as this peer's own blob; return its digest. Storing a blob
        already held is a no-op, except that one pushed by another peer becomes this peer's own
        (no longer counted against the quota, never swept).

        Raises:
            OSError: the file cannot be written (disk full, permissions).
        """
        digest = blob_digest(data)
        self._write(digest, data)
        with self._lock:
            adopted = self._pushed.pop(digest, None) is not None
        if adopted:
            self._marker(digest).unlink(missing_ok=True)
        return digest

    def receive(self, digest: bytes, data: bytes) -> bool:
        """Store a blob this peer fetched as `digest`, if `data` really hashes to it.

        Returns:
            False (nothing stored) on a mismatch.

        Raises:
            OSError: the file cannot be written.
        """
        if len(digest) != DIGEST_BYTES or blob_digest(data) != digest:
            return False
        self._write(digest, data)
        return True

    # Blobs other peers push

    def reserve_push(self, size: int) -> bool:
        """Set `size` bytes of the quota aside for a push about to be read; False (nothing set
        aside) when the quota has no room for it. Pair with `release_push`."""
        with self._lock:
            if sum(self._pushed.values()) + self._reserved + size > self.quota:
                return False
            self._reserved += size
            return True

    def release_push(self, size: int) -> None:
        """Give back what `reserve_push(size)` set aside (the push was stored or dropped)."""
        with self._lock:
            self._reserved -= size

    def receive_pushed(self, digest: bytes, data: bytes) -> bool:
        """Store a blob another peer pushed as `digest`, if `data` really hashes to it; it
        counts against the quota and is swept unless a task references it (`sweep`). Call
        within a `reserve_push` of its size.

        Returns:
            False (nothing stored) on a mismatch.

        Raises:
            OSError: the file cannot be written.
        """
        if len(digest) != DIGEST_BYTES or blob_digest(data) != digest:
            return False
        if self.path(digest).is_file():
            return True  # this peer's own, or pushed before: nothing changes
        self._write(digest, data, mark_pushed=True)
        with self._lock:
            self._pushed[digest] = len(data)
        return True

    def sweep(self, referenced: Collection[bytes], now: float, grace: float) -> list[bytes]:
        """Delete the blobs other peers pushed here more than `grace` seconds ago that no digest
        in `referenced` names.

        Args:
            referenced: digests some task held here references (`referenced_blobs`).
            now: wall-clock seconds (``time.time()``): receipt times are file times.
            grace: seconds a pushed blob may wait for a task referencing it (the submitter
                pushes an input before it submits the task).

        Returns:
            The digests deleted.
        """
        with self._lock:
            candidates = [d for d in self._pushed if d not in referenced]
        deleted: list[bytes] = []
        for digest in candidates:
            try:
                received = self._marker(digest).stat().st_mtime
            except FileNotFoundError:
                continue  # adopted by `put` meanwhile
            if now - received >= grace:
                self.delete(digest)
                deleted.append(digest)
        return deleted

    def delete(self, digest: bytes) -> int:
        """Delete the blob named `digest` (whoever stored it); return the bytes freed (0 if it
        was not held). Retention deletes blobs with their tasks through this too.

        Raises:
            OSError: the directory cannot be written.
        """
        path = self.path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        path.unlink(missing_ok=True)
        self._marker(digest).unlink(missing_ok=True)
        with self._lock:
            self._pushed.pop(digest, None)
        self._sync_dir()
        return size

    def _marker(self, digest: bytes) -> Path:
        return self.root / f"{digest.hex()}{_PUSHED_MARK}"

    def _write(self, digest: bytes, data: bytes, *, mark_pushed: bool = False) -> None:
        path = self.path(digest)
        if path.is_file():
            return
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            if mark_pushed:
                # Marked before it is in place: a crash leaves an orphan marker (removed at
                # the next open), never an unmarked pushed blob that would never be swept.
                self._marker(digest).touch(mode=0o600)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if mark_pushed:
                self._marker(digest).unlink(missing_ok=True)
            raise
        self._sync_dir()

    def _sync_dir(self) -> None:
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _digest_named(name: str) -> bytes | None:
    if len(name) != 2 * DIGEST_BYTES or any(c not in "0123456789abcdef" for c in name):
        return None
    return bytes.fromhex(name)
