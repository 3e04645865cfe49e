"""The blob store: blobs on disk under ``<data_dir>/blobs``, one file per digest, with a quota
on the blobs other peers push here.

Invariants:
- A blob file is ``blobs/<64 hex digits>`` and holds exactly the bytes hashing to that name. It
  is written to a temporary file in the blob directory, fsynced and renamed into place (then the
  directory fsynced), so after a crash — kill -9 included — it is either whole or absent.
  Temporary files a crash left behind are removed at the next open. Reading re-hashes a blob: a
  file that does not match (disk corruption, tampering) is deleted and treated as absent.
- Received bytes are hashed before they are in place: a mismatch is dropped, never stored. A
  pushed blob is streamed (`BlobWriter`): its pieces go to the temporary file as they arrive,
  hashed on the way, so a push holds one piece in memory, never the blob.
- A blob's file time is when it was last stored: storing a blob already held (put, fetched or
  pushed again) refreshes it (`stored_at`), so the grace a new use gets counts from then.
- Blobs other peers push here are held within a quota (`BlobStore.quota`, bytes): a push is
  admitted (`admit_push`) before its bytes are read, and refused when it would exceed it. Each
  carries a marker file (``blobs/<hex>.pushed``) written before the blob is renamed into place,
  so the accounting survives a restart and no pushed blob is ever unmarked. A blob this peer
  stores as its own (`put`) stops counting against the quota.
- The store decides nothing about deleting: `peer.runtime.blobs.BlobService` deletes a blob
  (`delete`) once no task held here needs it.
- Every method may be called from a worker thread; the quota's bookkeeping is locked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from protocol.blobs import DIGEST_BYTES, blob_digest

log = logging.getLogger(__name__)

BLOBS_DIR = "blobs"
"""The blob directory's name inside a peer's data directory."""
PUSH_QUOTA = 4 * 1024**3
"""Default most bytes of blobs pushed by other peers a peer holds at once: 64 blobs of the
largest size. Lower bounds what a member can make a peer store; too low, and pushes of real
inputs are refused (the pusher then tries the next designated holder)."""
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
            digest = digest_named(marker.name.removesuffix(_PUSHED_MARK))
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

    def stored_at(self, digest: bytes) -> float | None:
        """When the blob named `digest` was last stored here (wall-clock seconds, its file
        time); None if it is not held."""
        try:
            return self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def held(self) -> dict[bytes, float]:
        """Digest -> `stored_at` of every blob held here."""
        found: dict[bytes, float] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                digest = digest_named(entry.name)
                if digest is None:
                    continue  # a marker or a temporary file
                try:
                    found[digest] = entry.stat().st_mtime
                except FileNotFoundError:
                    continue  # deleted meanwhile
        return found

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
        already held refreshes its time, and one pushed by another peer becomes this peer's own
        (no longer counted against the quota).

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

    def admit_push(self, task_id: bytes, digest: bytes, size: int) -> str | None:
        """Set `size` bytes of the quota aside for a push about to be read. The store knows no
        tasks: `task_id` is for `peer.runtime.blobs.BlobService`, which checks it first.

        Returns:
            None when admitted (pair with `release_push`), else the refusal's reason:
            "blob_over_quota" (nothing set aside).
        """
        with self._lock:
            if sum(self._pushed.values()) + self._reserved + size > self.quota:
                return "blob_over_quota"
            self._reserved += size
            return None

    def release_push(self, size: int) -> None:
        """Give back what `admit_push(..., size)` set aside (the push was stored or dropped)."""
        with self._lock:
            self._reserved -= size

    def open_push(self, digest: bytes) -> BlobWriter:
        """Start receiving a blob another peer pushes as `digest`, within an `admit_push` of its
        size: a temporary file in the blob directory that its pieces are written to.

        Raises:
            OSError: the temporary file cannot be created.
        """
        return BlobWriter(self, digest)

    def delete(self, digest: bytes) -> int:
        """Delete the blob named `digest` (whoever stored it); return the bytes freed (0 if it
        was not held).

        Raises:
            OSError: the directory cannot be written.
        """
        path = self.path(digest)
        with self._lock:  # against `install` of the same digest (see there)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            path.unlink(missing_ok=True)
            self._marker(digest).unlink(missing_ok=True)
            self._pushed.pop(digest, None)
        self.sync_dir()
        return size

    def temporary_path(self, digest: bytes) -> Path:
        """A fresh temporary file name for the blob `digest` (removed at the next open)."""
        return self.path(digest).with_name(
            f"{digest.hex()}{_TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"
        )

    def install(self, digest: bytes, tmp: Path, size: int, *, pushed: bool) -> None:
        """Put the fsynced temporary file `tmp`, holding the blob `digest` of `size` bytes, in
        place; if the blob is held already, drop `tmp` and refresh the blob's time. A `pushed`
        blob is marked (before it is in place: a crash leaves an orphan marker, removed at the
        next open, never an unmarked pushed blob) and counted against the quota.

        Raises:
            OSError: the directory cannot be written (`tmp` is removed).
        """
        path = self.path(digest)
        # Under the lock, as `delete` is: a delete of the same digest (its last task compacted)
        # from another thread between the rename and the count left a pushed size counted
        # for a file that was gone (CI, tests/peer/test_blob_retention.py).
        with self._lock:
            try:
                if path.is_file():
                    tmp.unlink()
                    os.utime(path)
                    return
                if pushed:
                    self._marker(digest).touch(mode=0o600)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                if pushed and not path.is_file():
                    self._marker(digest).unlink(missing_ok=True)
                raise
            if pushed:
                self._pushed[digest] = size
        self.sync_dir()

    def sync_dir(self) -> None:
        """Make the directory's entries (renames, deletions) durable."""
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _marker(self, digest: bytes) -> Path:
        return self.root / f"{digest.hex()}{_PUSHED_MARK}"

    def _write(self, digest: bytes, data: bytes) -> None:
        path = self.path(digest)
        if path.is_file():
            os.utime(path)  # a new use of it: its grace counts from now
            return
        tmp = self.temporary_path(digest)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.install(digest, tmp, len(data), pushed=False)


class BlobWriter:
    """A pushed blob being received: its pieces are written to a temporary file in the blob
    directory and hashed as they arrive; `commit` puts it in place only if the bytes hash to
    its name. Exactly one of `commit` and `abort` ends it; every method blocks on disk I/O.

    Raises:
        OSError: the temporary file cannot be created.
    """

    def __init__(self, store: BlobStore, digest: bytes) -> None:
        self._store = store
        self._digest = digest
        self._hash = hashlib.sha256()
        self._size = 0
        self._tmp = store.temporary_path(digest)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb")

    def write(self, piece: bytes) -> None:
        """Append `piece` (hashed, then written).

        Raises:
            OSError: the disk refused it (disk full); call `abort`.
        """
        self._hash.update(piece)
        self._file.write(piece)
        self._size += len(piece)

    def commit(self) -> bool:
        """Verify the digest, fsync and put the blob in place (`BlobStore.install`).

        Returns:
            False on a digest mismatch: nothing is stored and the temporary file is gone.

        Raises:
            OSError: it could not be written (the temporary file is gone too).
        """
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self.abort()
            raise
        if len(self._digest) != DIGEST_BYTES or self._hash.digest() != self._digest:
            self._tmp.unlink(missing_ok=True)
            return False
        self._store.install(self._digest, self._tmp, self._size, pushed=True)
        return True

    def abort(self) -> None:
        """Drop what was received: close and delete the temporary file."""
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def digest_named(name: str) -> bytes | None:
    """The digest a blob file name (64 lowercase hex digits) stands for; None for any other."""
    if len(name) != 2 * DIGEST_BYTES or any(c not in "0123456789abcdef" for c in name):
        return None
    return bytes.fromhex(name)
