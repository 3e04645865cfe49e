"""Where a peer's network keyring comes from, and where rotations are kept.

Invariants:
- A keyring copy in the data directory (written by key rotations through the API) wins over
  the configured key file, so a restarted peer keeps the keys it rotated to.
- Without either, a peer refuses to start unless insecure development mode is on; then it uses
  `DEV_KEY`, which is public (all zeros): anyone can join such a network.
- The keyring copy is written atomically with mode 0600 and never contains anything but keys
  and the network id.
- A key file (configured or copy) that group or others may read or write is refused with one
  line naming it and the fix (`chmod 600 FILE`), like the identity file: a shared key is no
  secret.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from peer.runtime.keyring import Keyring, dump_keyring_text, load_keyring_text
from peer.secret_files import ExposedSecretError, read_secret_file
from peer.settings import AgentSettings, SettingsError

log = logging.getLogger(__name__)

KEYRING_NAME = "keyring"
DEV_KEY = bytes(32)
"""The well-known insecure development key. Never use it on a network others can reach."""

NO_KEY_HELP = (
    "no network key: every peer of a network needs the same secret key. Create one with\n"
    "    grapevine keygen --output network.key\n"
    "copy it to every machine (it is a secret: keep it mode 600), and start with\n"
    "    grapevine agent --network-key-file network.key ...\n"
    "For a throwaway local test only, --insecure-dev uses a public all-zero key."
)


def keyring_path(data_dir: Path) -> Path:
    """Return where the data directory's keyring copy lives."""
    return data_dir / KEYRING_NAME


def load_network_keyring(settings: AgentSettings) -> Keyring:
    """Return the keyring this peer should use (see the module invariants for the order).

    Raises:
        SettingsError: no key is configured (and insecure dev mode is off), or a key file
            cannot be read or parsed, or group or others may access it. The message says
            what to do.
    """
    copy = keyring_path(settings.data_dir)
    if copy.exists():
        keyring = _read(copy, "keyring copy")
        if settings.network_key_file is not None:
            configured = _read(settings.network_key_file, "network_key_file")
            if configured.primary not in keyring.keys:
                log.warning(
                    "%s holds a key that the rotated keyring %s does not; using %s",
                    settings.network_key_file,
                    copy,
                    copy,
                )
        return keyring
    if settings.network_key_file is not None:
        return _read(settings.network_key_file, "network_key_file")
    if settings.insecure_dev:
        log.warning(
            "INSECURE DEVELOPMENT MODE: sealing with the public all-zero network key; anyone "
            "who can reach %s can join this network and read its traffic",
            settings.bind,
        )
        return Keyring(DEV_KEY)
    raise SettingsError(NO_KEY_HELP)


def save_keyring(data_dir: Path, keyring: Keyring) -> None:
    """Write `keyring` to the data directory's copy atomically, mode 0600."""
    path = keyring_path(data_dir)
    tmp = path.with_name(f"{KEYRING_NAME}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, dump_keyring_text(keyring).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path, what: str) -> Keyring:
    try:
        text = read_secret_file(path, "the network key").decode("utf-8")
    except ExposedSecretError as exc:
        raise SettingsError(str(exc)) from None
    except OSError as exc:
        raise SettingsError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{what} {path}: not a text key file") from None
    try:
        return load_keyring_text(text)
    except ValueError as exc:
        raise SettingsError(f"{what} {path}: {exc}") from None
