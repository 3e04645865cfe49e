"""Reading a file that holds a secret (network key, API token): refused if others may use it.

A secret that group or others can read is no longer a secret, and one they can write lets them
choose it; so such a file is refused rather than used, with one line naming it and the fix.
The identity key file (`peer.runtime.identity_file`) is read through here too.

Invariants:
- The mode is checked on the opened descriptor (`fstat`), so the file checked is the file read
  even if its path is swapped in between.
- Any group or other permission bit (mode & 0o077) refuses the file; the owner's are free.
- Stdlib only: the client commands import it through `peer.api_token` and must start fast.
"""

from __future__ import annotations

import os
from pathlib import Path


class ExposedSecretError(ValueError):
    """A secret file is readable or writable by group or others; the message says the fix."""


def read_secret_file(path: Path, holds: str) -> bytes:
    """Return the contents of `path`, a file only its owner may read or write.

    Args:
        path: the file.
        holds: what it holds, for the message ("the network key").

    Raises:
        ExposedSecretError: group or others may read or write it.
        OSError: it cannot be opened or read.
    """
    with open(path, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if mode & 0o077:
            raise ExposedSecretError(
                f"{path} is accessible by group or others (mode {mode & 0o777:o}); it holds "
                f"{holds}: run `chmod 600 {path}`"
            )
        return file.read()
