"""The store's errors, apart so that the identity file's reader raises them too."""

from __future__ import annotations


class StoreError(Exception):
    """The data directory cannot be used as it is; the message says what to fix."""


class StoreWriteError(StoreError):
    """A write was not committed (disk full, I/O error): nothing of it is on disk; the store
    stays usable and a later write may succeed."""
