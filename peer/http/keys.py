"""The network keyring: GET and POST /v1/keys (install, use, remove a key).

Invariants:
- Keys never leave the peer through the API: answers name keys by their id only.
- A change that would cut the peer off is refused: a key is used only once installed, and the
  primary key cannot be removed.
- A change is saved to the data directory before the transport uses it, so a restart keeps
  the keyring the network now speaks; asking for what already holds changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from peer.http.common import Json, bad_request, json_object
from peer.keys import save_keyring
from peer.runtime.keyring import Keyring, decode_key, key_id_of
from peer.runtime.transport import Transport

log = logging.getLogger(__name__)


class KeyApi:
    """The /v1/keys endpoints of one peer.

    Args:
        transport: the peer's transport (it holds the keyring in use).
        data_dir: where the keyring copy is saved after a change.
    """

    def __init__(self, transport: Transport, data_dir: Path) -> None:
        self.transport = transport
        self.data_dir = data_dir

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.get("/v1/keys", self._get), web.post("/v1/keys", self._post)]

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(keys_json(self.transport.keyring))

    async def _post(self, request: web.Request) -> web.Response:
        body = await json_object(request, required={"action", "key"}, optional=set())
        action, key_text = body["action"], body["key"]
        if action not in ("install", "use", "remove"):
            raise bad_request(f"action must be 'install', 'use' or 'remove', got {action!r}")
        if not isinstance(key_text, str):
            raise bad_request("key must be a string (the base64 key from `grapevine keygen`)")
        try:
            key = decode_key(key_text)
        except ValueError as exc:
            raise bad_request(f"key: {exc}") from None
        current = self.transport.keyring
        key_id = key_id_of(key).hex()
        if action == "install":
            updated = Keyring(current.primary, (*current.accepted, key), current.network_id)
        elif action == "use":
            if key not in current.keys:
                raise bad_request(
                    f"key {key_id} is not installed; install it on every peer first, then use it"
                )
            updated = Keyring(key, current.keys, current.network_id)
        else:
            if key == current.primary:
                raise bad_request(
                    f"key {key_id} is the primary key; use another key first, then remove this one"
                )
            if key not in current.keys:
                raise bad_request(f"key {key_id} is not in the keyring")
            updated = Keyring(
                current.primary, [k for k in current.accepted if k != key], current.network_id
            )
        if updated != current:
            save_keyring(self.data_dir, updated)
            self.transport.set_keyring(updated)
            log.info("keyring changed (%s %s): %r", action, key_id, updated)
        return web.json_response(keys_json(updated))


def keys_json(keyring: Keyring) -> Json:
    """Return the API form of a keyring: key ids only, never keys."""
    return {
        "primary": key_id_of(keyring.primary).hex(),
        "accepted": [key_id_of(k).hex() for k in keyring.accepted],
    }
