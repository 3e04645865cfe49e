"""The text form of node ids in the API and on the command line: lowercase base32 without
padding, 52 characters for 32 bytes.

Stdlib only: the `grapevine` client commands check an id before sending it, and must start
fast; the API (`peer.http.common`) writes and parses ids with the same two functions.
"""

from __future__ import annotations

import base64

NODE_ID_CHARS = 52
"""Characters of a node id's text form (32 bytes in base32, unpadded)."""
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


_TEXTS: dict[bytes, str] = {}
"""Text forms already made: every task event names its owner, and a network has few peers."""
_TEXTS_KEPT = 4096


def node_id_text(node_id: bytes) -> str:
    """Return the text form of a node id: lowercase base32 without padding."""
    if type(node_id) is not bytes:  # a bytearray or memoryview cannot be a key
        return _text(node_id)
    text = _TEXTS.get(node_id)
    if text is None:
        if len(_TEXTS) >= _TEXTS_KEPT:
            _TEXTS.clear()  # ids seen once (a hostile or churning network) do not pile up
        text = _TEXTS[node_id] = _text(node_id)
    return text


def _text(node_id: bytes) -> str:
    return base64.b32encode(node_id).decode("ascii").lower().rstrip("=")


def node_id_from_text(text: str) -> bytes | None:
    """The node id whose text form is `text` (any case, surrounding blanks ignored); None when
    `text` is not one (wrong length or letters, or not the form `node_id_text` writes)."""
    clean = text.strip().lower()
    if len(clean) != NODE_ID_CHARS or not _ALPHABET.issuperset(clean):
        return None
    raw = base64.b32decode(clean.upper() + "====")
    return raw if node_id_text(raw) == clean else None
