"""In-process peers for API tests: a real Node, Driver and Transport on 127.0.0.1, no store."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.runtime.driver import Driver
from peer.runtime.sealing import Keyring
from peer.runtime.transport import Transport
from protocol.config import local, with_network
from protocol.identity import Signer
from protocol.node import Node
from protocol.wire import merge_envelopes


class NullStore:
    """Accepts every durable write and keeps nothing (these tests never restart a peer)."""

    def put_many(self, records: Any) -> None:
        pass

    def save_members(self, rows: Any) -> None:
        pass


async def start_peer(index: int, key: bytes, incarnation: int) -> tuple[Driver, Transport]:
    """A started peer on an ephemeral port, its node on the local profile."""
    loop = asyncio.get_running_loop()
    keyring = Keyring(key)
    transport = Transport(
        "127.0.0.1", 0, keyring, bytes([index]) * 8, lambda s, d: None, coalesce=merge_envelopes
    )
    await transport.start()
    signer = Signer(Ed25519PrivateKey.generate().private_bytes_raw(), keyring.network_id)
    config = with_network(local(), keyring.network_id)
    address = f"127.0.0.1:{transport.port}"
    node = Node(config, signer, address, random.Random(index), loop.time(), incarnation)
    driver = Driver(node, transport, NullStore())
    transport.on_receive = driver.receive
    driver.start()
    return driver, transport
