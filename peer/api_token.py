"""The local API's bearer token: where a peer keeps it and how its clients find it.

Every route of a peer's local HTTP API asks for `Authorization: Bearer <token>`. The token is
the operator's (`grapevine agent --api-token-file FILE`, so the peers of one operator can share
one), or else the peer's own, made at its first start in `<data_dir>/api.token`.

Invariants:
- A generated token is 32 random bytes as URL-safe base64 text, written to a temporary file of
  mode 0600 in the data directory and linked into place, so a reader never sees a partial
  file and two peers starting on one directory agree on one token; a restart reuses it.
- A token is one line of printable ASCII without spaces; an empty or malformed token file is
  an error naming the file, never an empty token.
- A peer refuses a token file (the operator's or its own) that group or others may read or
  write, like the identity file: anyone who reads it holds the API. Clients only present a
  token, so they read whatever file they are pointed at.
- Clients look, in order: the token file they were given, the data directory they were given,
  `$GRAPEVINE_API_TOKEN`, `$GRAPEVINE_API_TOKEN_FILE`, then `api.token` in
  `$GRAPEVINE_DATA_DIR` or the peer's default data directory (`DEFAULT_DATA_DIR`). A place
  named explicitly must hold a token; a default place may be empty.
- Stdlib only: the client commands import this and must start fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from peer.secret_files import ExposedSecretError, read_secret_file

TOKEN_FILE_NAME = "api.token"
DEFAULT_DATA_DIR = Path("grapevine-data")
"""The data directory of `grapevine agent` when none is configured (relative to where it
runs); `peer.settings` takes it from here so that clients need not import the settings."""
TOKEN_ENV = "GRAPEVINE_API_TOKEN"
TOKEN_FILE_ENV = "GRAPEVINE_API_TOKEN_FILE"
DATA_DIR_ENV = "GRAPEVINE_DATA_DIR"
TOKEN_HELP = (
    "pass --token-file FILE, set GRAPEVINE_API_TOKEN, or give the peer's --data-dir DIR "
    "(its token is DIR/api.token)"
)
"""How a command-line user passes the token; the CLI's errors end with it."""
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 512


class TokenError(ValueError):
    """A token file is missing, unreadable or malformed; the message names the file."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A token and where it was found (for messages; the token itself is never shown)."""

    value: str
    source: str


def token_path(data_dir: Path) -> Path:
    """Where a peer keeps the token it generated: `<data_dir>/api.token`."""
    return data_dir / TOKEN_FILE_NAME


def check_token(text: str, source: str) -> str:
    """Return `text` stripped of surrounding white space if it is a usable token.

    Raises:
        TokenError: it is empty, too long, or not printable ASCII without spaces.
    """
    token = text.strip()
    if not token:
        raise TokenError(f"{source} holds no API token (it is empty)")
    if len(token) > MAX_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise TokenError(
            f"{source} does not hold an API token (one line of at most {MAX_TOKEN_CHARS} "
            "printable ASCII characters without spaces)"
        )
    return token


def read_token_file(path: Path, *, private: bool = True) -> str:
    """Return the token held by `path`.

    Args:
        path: the token file.
        private: refuse the file if group or others may read or write it (a peer's reads);
            a client presenting a token it was pointed at passes False.

    Raises:
        TokenError: the file cannot be read, holds no usable token, or is `private` and
            accessible by group or others.
    """
    try:
        data = read_secret_file(path, "an API token") if private else path.read_bytes()
    except ExposedSecretError as exc:
        raise TokenError(str(exc)) from None
    except OSError as exc:
        raise TokenError(f"cannot read the API token file {path} ({exc.strerror})") from None
    return check_token(data.decode("ascii", errors="replace"), f"the API token file {path}")


def load_or_create_token(data_dir: Path) -> str:
    """Return the token in `<data_dir>/api.token`, generating it first if there is none.

    Raises:
        TokenError: the file exists but is unusable, or cannot be created.
    """
    path = token_path(data_dir)
    if path.exists():
        return read_token_file(path)
    import secrets  # the peer makes tokens; the client commands only read them (start-up)

    token = secrets.token_urlsafe(TOKEN_BYTES)
    scratch = data_dir / f".{TOKEN_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(token + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(scratch, path)  # never replaces: a peer that got there first wins
        except FileExistsError:
            return read_token_file(path)
    except OSError as exc:
        raise TokenError(f"cannot create the API token file {path} ({exc.strerror})") from None
    finally:
        scratch.unlink(missing_ok=True)
    return token


def find_token(
    token_file: Path | None = None,
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ApiToken | None:
    """Find the token a client should send (the order is in the module invariants).

    Args:
        token_file: a file the user named (`--token-file`); it must hold a token.
        data_dir: the peer's data directory the user named (`--data-dir`); its `api.token`
            must exist.
        env: the environment; `os.environ` by default.

    Returns:
        The token and where it came from, or None when no place holds one.

    Raises:
        TokenError: a place named explicitly holds no usable token, or a token file exists
            but cannot be read.
    """
    env = os.environ if env is None else env
    if token_file is not None:
        return ApiToken(read_token_file(token_file, private=False), str(token_file))
    if data_dir is not None:
        path = token_path(data_dir)
        return ApiToken(read_token_file(path, private=False), str(path))
    if env.get(TOKEN_ENV):
        return ApiToken(check_token(env[TOKEN_ENV], f"${TOKEN_ENV}"), f"${TOKEN_ENV}")
    if env.get(TOKEN_FILE_ENV):
        path = Path(env[TOKEN_FILE_ENV]).expanduser()
        return ApiToken(read_token_file(path, private=False), f"{path} (${TOKEN_FILE_ENV})")
    default = Path(env[DATA_DIR_ENV]).expanduser() if env.get(DATA_DIR_ENV) else DEFAULT_DATA_DIR
    path = token_path(default)
    if not path.exists():
        return None
    return ApiToken(read_token_file(path, private=False), str(path))
