"""Network keys and keyrings: key text, key and network ids, keyring files.

Invariants:
- Every key is 32 bytes; a `Keyring` holds exactly one primary key, accepted keys that are
  distinct from it and from each other, and a 16-byte network id.
- The network id never changes for the life of a network: `Keyring.rotate` carries it over and
  `dump_keyring_text` always writes it.
- Key material never appears in a `Keyring` repr, only key ids.
- Malformed key text or keyring files raise `ValueError` saying what is wrong (for a file, on
  which line).

A network is defined by a 32-byte network key (`generate_network_key`, `grapevine keygen`); the
AEAD framing that uses these keys lives in `peer.runtime.sealing`.

Network id and rotation

The network id is ``SHA-256(b"grapevine/network-id/v1" || key)[:16]`` of the key the network was
*created* with. It names the network in every signature (see `protocol.identity`), so it must
never change. A `Keyring` derives it from its primary key when none is given; once a network
rotates its key, the keyring carries the original id explicitly, and the keyring file stores
it (``network <hex>``), so peers keep the same id for the life of the network.

Rotation without downtime, in three rollouts:

1. add the new key as ``accepted`` on every peer (everyone can now open it);
2. make it ``primary`` everywhere, keeping the old one accepted (`Keyring.rotate`); peers that
   still seal with the old key are understood by those that already switched, and vice versa;
3. remove the old key once no peer seals with it (``Opener.rejected["unknown_key"]`` stays flat).

Keyring file format (UTF-8 text, ``#`` comments and blank lines ignored)::

    network <32 hex digits>      (optional; derived from the primary key when absent)
    primary <base64 key>         (exactly one)
    accepted <base64 key>        (zero or more)

A file holding just one base64 key (the output of ``grapevine keygen``) is a keyring with that
key as primary.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

KEY_BYTES = 32
NETWORK_ID_BYTES = 16
KEY_ID_BYTES = 4

_NETWORK_ID_DOMAIN = b"grapevine/network-id/v1"


def generate_network_key() -> bytes:
    """Return a fresh 32-byte network key from the OS random source."""
    return os.urandom(KEY_BYTES)


def encode_key(key: bytes) -> str:
    """Return the standard base64 text of a 32-byte key.

    Raises:
        ValueError: the key is not 32 bytes.
    """
    _check_key(key)
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """Parse the standard base64 text of a 32-byte key (surrounding whitespace ignored).

    Raises:
        ValueError: the text is not base64 or does not decode to exactly 32 bytes.
    """
    stripped = text.strip()
    try:
        key = base64.b64decode(stripped.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(
            f"a network key is {KEY_BYTES} bytes in standard base64 (as printed by "
            "`grapevine keygen`); this text is not valid base64"
        ) from None
    if len(key) != KEY_BYTES:
        raise ValueError(
            f"a network key is {KEY_BYTES} bytes in standard base64; this one decodes to "
            f"{len(key)} bytes"
        )
    return key


def key_id_of(key: bytes) -> bytes:
    """Return the 4-byte key id carried in frames sealed under `key`."""
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def network_id_of(key: bytes) -> bytes:
    """Return the 16-byte network id of a network created with `key`.

    Raises:
        ValueError: the key is not 32 bytes.
    """
    _check_key(key)
    return hashlib.sha256(_NETWORK_ID_DOMAIN + key).digest()[:NETWORK_ID_BYTES]


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"a network key is {KEY_BYTES} bytes, got {len(key)}")


class Keyring:
    """One primary key (seals and opens), accepted keys (open only) and the network id."""

    __slots__ = ("accepted", "network_id", "primary")

    def __init__(
        self, primary: bytes, accepted: Sequence[bytes] = (), network_id: bytes | None = None
    ) -> None:
        """Build a keyring.

        Args:
            primary: the key every frame is sealed with.
            accepted: further keys frames may be opened with; duplicates and the primary
                itself are dropped, order is kept.
            network_id: the network's 16-byte id; None derives it from `primary`, which is
                right only for a network that has never rotated its key.

        Raises:
            ValueError: a key is not 32 bytes or the network id is not 16 bytes.
        """
        _check_key(primary)
        unique: list[bytes] = []
        for key in accepted:
            _check_key(key)
            if key != primary and key not in unique:
                unique.append(key)
        if network_id is None:
            network_id = network_id_of(primary)
        elif len(network_id) != NETWORK_ID_BYTES:
            raise ValueError(f"a network id is {NETWORK_ID_BYTES} bytes, got {len(network_id)}")
        self.primary = bytes(primary)
        self.accepted: tuple[bytes, ...] = tuple(bytes(key) for key in unique)
        self.network_id = bytes(network_id)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The primary key followed by the accepted keys."""
        return (self.primary, *self.accepted)

    def rotate(self, new_primary: bytes) -> Keyring:
        """Return a keyring sealing with `new_primary`, still opening the current keys.

        Args:
            new_primary: the key to seal with from now on.

        Returns:
            A keyring with `new_primary` as primary, the old primary first among the accepted
            keys, and the same network id.

        Raises:
            ValueError: the new key is not 32 bytes.
        """
        return Keyring(new_primary, (self.primary, *self.accepted), self.network_id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyring):
            return NotImplemented
        return (self.primary, self.accepted, self.network_id) == (
            other.primary,
            other.accepted,
            other.network_id,
        )

    def __hash__(self) -> int:
        return hash((self.primary, self.accepted, self.network_id))

    def __repr__(self) -> str:
        # Never print key material.
        return (
            f"Keyring(primary={key_id_of(self.primary).hex()}, "
            f"accepted={[key_id_of(k).hex() for k in self.accepted]}, "
            f"network_id={self.network_id.hex()})"
        )


def load_keyring_text(text: str) -> Keyring:
    """Parse a keyring file (see the module docstring for its format).

    Args:
        text: the whole file.

    Returns:
        The keyring it describes.

    Raises:
        ValueError: the file is empty, has an unknown or malformed line, a bad key or network
            id, or not exactly one primary key. The message names the line.
    """
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not lines:
        raise ValueError("keyring file is empty: expected a base64 key or 'primary <key>' line")
    if len(lines) == 1 and len(lines[0][1].split()) == 1:
        number, line = lines[0]
        return Keyring(_decode_at(number, line))
    primary: bytes | None = None
    accepted: list[bytes] = []
    network_id: bytes | None = None
    for number, line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"keyring line {number}: expected '<field> <value>', got {line!r}")
        field, value = parts
        if field == "primary":
            if primary is not None:
                raise ValueError(f"keyring line {number}: a second primary key")
            primary = _decode_at(number, value)
        elif field == "accepted":
            accepted.append(_decode_at(number, value))
        elif field == "network":
            if network_id is not None:
                raise ValueError(f"keyring line {number}: a second network id")
            try:
                network_id = bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"keyring line {number}: network id is not hex") from None
            if len(network_id) != NETWORK_ID_BYTES:
                raise ValueError(
                    f"keyring line {number}: a network id is {NETWORK_ID_BYTES * 2} hex digits"
                )
        else:
            raise ValueError(
                f"keyring line {number}: unknown field {field!r} "
                "(expected 'primary', 'accepted' or 'network')"
            )
    if primary is None:
        raise ValueError("keyring file has no 'primary <key>' line")
    return Keyring(primary, accepted, network_id)


def _decode_at(number: int, text: str) -> bytes:
    try:
        return decode_key(text)
    except ValueError as exc:
        raise ValueError(f"keyring line {number}: {exc}") from None


def dump_keyring_text(keyring: Keyring) -> str:
    """Return the keyring file text for `keyring`; `load_keyring_text` reads it back equal.

    The network id is always written, so a later rotation keeps it.
    """
    lines = [f"network {keyring.network_id.hex()}", f"primary {encode_key(keyring.primary)}"]
    lines += [f"accepted {encode_key(key)}" for key in keyring.accepted]
    return "\n".join(lines) + "\n"
