"""A peer's identity key file: ``<data_dir>/identity.key``, its Ed25519 private key.

Invariants:
- The file is created once, atomically (a temporary file with mode 0600, fsynced, then hard
  linked into place, which never overwrites), and never rewritten: two processes racing to
  create it end with the same key, the first one's.
- A key file readable or writable by group or others is refused (`StoreError`, saying to chmod
  600 it), not used; so is one that does not hold a base64 32-byte key.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.runtime.store_errors import StoreError
from peer.secret_files import ExposedSecretError, read_secret_file

IDENTITY_NAME = "identity.key"
PRIVATE_KEY_BYTES = 32


def load_or_create_identity(data_dir: Path) -> bytes:
    """Return the peer's raw 32-byte Ed25519 private key, creating it on first use.

    The key lives in ``<data_dir>/identity.key`` as base64 text, mode 0600.

    Returns:
        The private key bytes (feed them to `protocol.identity.Signer`).

    Raises:
        StoreError: the key file is readable or writable by group or others (chmod 600 it),
            or does not hold a base64 32-byte key.
        OSError: the file cannot be read or created.
    """
    path = data_dir / IDENTITY_NAME
    try:
        return _read_identity(path)
    except FileNotFoundError:
        pass
    key = Ed25519PrivateKey.generate().private_bytes_raw()
    tmp = path.with_name(f"{IDENTITY_NAME}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a crash; O_EXCL below guarantees mode 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # A hard link, unlike os.replace, never overwrites: if the file appeared meanwhile,
        # the existing identity wins and ours is discarded.
        os.link(tmp, path)
    except FileExistsError:
        return _read_identity(path)
    finally:
        tmp.unlink()
    fsync_dir(data_dir)
    return key


def _read_identity(path: Path) -> bytes:
    try:
        text = read_secret_file(path, "this peer's private key")
    except ExposedSecretError as exc:
        raise StoreError(str(exc)) from None
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != PRIVATE_KEY_BYTES:
        raise StoreError(
            f"{path} does not hold a base64 {PRIVATE_KEY_BYTES}-byte Ed25519 private key; "
            "restore it from backup, or delete it to start as a new peer"
        )
    return key


def fsync_dir(path: Path) -> None:
    """Make the directory entries of `path` durable (after a file was linked into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
