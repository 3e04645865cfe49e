"""Membership forgery against three real peers on 127.0.0.1 (issue 11, finding 2).

The attacker is an admitted member as the issue defines one: it holds the network key and an
identity of its own (an Ed25519 key generated as `grapevine agent` generates `identity.key`),
and it speaks the wire protocol itself: it seals envelopes with the network key and posts
them straight to a victim's gossip port, each one carrying its own signed alive record first,
so that it is a member the victim knows. It sends what the protocol lets any member send
(suspicions and deaths are unsigned; a peer state it can sign only with its own key):

- (a) SUSPECT about a live member with incarnation 2**63 - 1: once made the member refute with
  2**63, which no decoder accepts, leaving it dead everywhere and unable to restart.
- (b) a forged PEER_STATE for the victim with version 2**63 - 1 and no roles: once pinned the
  victim's advertisement everywhere (its roles vanished) and broke joins through it.
- (c) one unsigned DEAD about the owner of a running task: once started a second execution
  before the owner refuted.

Each test asserts the attack now fails and the peers keep serving, over their HTTP APIs.
Every wait is bounded in time (`wait_for`, `hold`); the cluster ends every process it
started, by pid.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.runtime.keyring import Keyring, load_keyring_text
from peer.runtime.sealing import BOOT_ID_BYTES, Sealer
from peer.runtime.transport import ENVELOPE_PATH
from protocol.codec import encode_message
from protocol.envelope import encode_envelope
from protocol.identity import DOMAIN_ALIVE, DOMAIN_PEER_STATE, Signer
from protocol.wire import (
    MAX_INCARNATION,
    MAX_UINT,
    Alive,
    Dead,
    Message,
    PeerState,
    Suspect,
    alive_payload,
    peer_state_payload,
)
from scripts.local_cluster import (
    LocalCluster,
    Peer,
    free_port,
    members_of,
    query,
    wait_for,
    wait_ready,
    wait_views,
)
from tests.e2e.cluster_helpers import run_showing_logs

pytestmark = pytest.mark.e2e

ROLES = ["echo", "sleep"]
"""The built-in roles every peer of these clusters serves."""
HOLD = 4.0
"""Seconds a property must keep holding after an attack: several probe and gossip rounds of
the "local" profile, so a forged fact would have spread and acted by then."""
TASK_SECONDS = 8.0
"""How long the task of (c) runs: long enough that a takeover would start within it."""


class Attacker:
    """An admitted member speaking the wire protocol itself (see the module docstring).

    Args:
        keyring: the network's keyring (the attacker holds the key).
    """

    def __init__(self, keyring: Keyring) -> None:
        # As the store creates `identity.key` for `grapevine agent`.
        self.signer = Signer(Ed25519PrivateKey.generate().private_bytes_raw(), keyring.network_id)
        self.node_id = self.signer.node_id
        self.addr = f"127.0.0.1:{free_port()}"  # nothing listens: its probes go unanswered
        self._sealer = Sealer(keyring, os.urandom(BOOT_ID_BYTES))
        payload = alive_payload(self.signer.public_key, self.addr, 1)
        self._alive = Alive(
            self.signer.public_key,
            self.addr,
            1,
            self.signer.sign(DOMAIN_ALIVE, payload),
            self.node_id,
        )

    async def send(self, peer: Peer, *messages: Message) -> None:
        """Post one sealed envelope (our alive record, then `messages`) to `peer`'s gossip
        port, as a member's transport would."""
        encoded = [encode_message(self._alive), *(encode_message(m) for m in messages)]
        frame = self._sealer.seal(encode_envelope(self.node_id, self.addr, encoded), time.time())
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.post(f"http://{peer.bind}{ENVELOPE_PATH}", data=frame) as answer,
        ):
            assert answer.status == 204, f"{peer.name} refused the sealed envelope"

    def forged_state(self, node_id: bytes, incarnation: int) -> PeerState:
        """A state for `node_id` at the highest version, advertising no roles, signed with the
        attacker's own key (the only one it has)."""
        fields = (node_id, incarnation, MAX_UINT, (), 0, 0, 0.0, 0, 0)
        sig = self.signer.sign(DOMAIN_PEER_STATE, peer_state_payload(*fields))
        return PeerState(node_id, MAX_UINT, (), 0, 0, 0.0, incarnation, sig)


def raw_id(text: str) -> bytes:
    """A node id from its API form (lowercase base32 without padding)."""
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


def three_peers(cluster: LocalCluster) -> list[Peer]:
    """Three peers serving the built-in roles, the second and third joining through the first."""
    seed = cluster.add()
    return [seed, cluster.add(join=[seed]), cluster.add(join=[seed])]


async def member_of(observer: Peer, node_id: str) -> dict[str, Any] | None:
    """What `observer` says about the member `node_id` (None: not known there)."""
    return next((m for m in await members_of(observer) if m["id"] == node_id), None)


async def dropped(peer: Peer) -> int:
    """Messages `peer` dropped as not credible or malformed (`GET /v1/metrics`)."""
    metrics = await query(peer, lambda c: c.metrics())
    return int(metrics["dropped"])


async def wait_all_serving(peers: list[Peer]) -> None:
    """Every peer answers, sees every peer alive, and sees every peer's roles."""
    await wait_ready(peers, timeout=30)
    await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=20)
    await wait_for(
        "every peer's roles known everywhere", lambda: roles_everywhere(peers, peers), 20
    )


async def roles_everywhere(observers: list[Peer], peers: list[Peer]) -> tuple[bool, object]:
    """Whether every observer sees every peer in `peers` alive, advertising `ROLES`."""
    seen: dict[str, object] = {}
    for observer in observers:
        members = {m["id"]: m for m in await members_of(observer)}
        for peer in peers:
            m = members.get(peer.node_id)
            if m is None or m["status"] != "alive" or sorted(m["roles"]) != ROLES:
                seen[f"{peer.name}@{observer.name}"] = m and (m["status"], m["roles"])
    return not seen, seen


async def hold(
    what: str, check: Callable[[], Awaitable[tuple[bool, object]]], seconds: float
) -> None:
    """Check `check` every 0.25 s for `seconds`; fail at the first time it does not hold."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ok, seen = await check()
        assert ok, f"{what}: no longer true; saw {seen!r}"
        await asyncio.sleep(0.25)


async def wait_dropped(peers: list[Peer], before: dict[str, int]) -> None:
    """Wait until every peer in `peers` counted at least one more dropped message."""

    async def counted() -> tuple[bool, object]:
        now = {p.name: await dropped(p) for p in peers}
        return all(now[name] > count for name, count in before.items()), now

    await wait_for("the forged message counted as dropped", counted, timeout=10)


# (a)


def test_a_suspicion_at_the_top_of_the_range_is_dropped_and_the_member_restarts(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path / "cluster", extra_args=()) as cluster:
        peers = three_peers(cluster)
        assert cluster.key_file is not None
        attacker = Attacker(load_keyring_text(cluster.key_file.read_text()))
        run_showing_logs(suspect_at_the_top(cluster, peers, attacker), peers)


async def suspect_at_the_top(cluster: LocalCluster, peers: list[Peer], attacker: Attacker) -> None:
    await wait_all_serving(peers)
    observer, member = peers[0], peers[1]
    known = await member_of(observer, member.node_id)
    assert known is not None
    before = {p.name: await dropped(p) for p in (observer, member)}
    suspicion = Suspect(raw_id(member.node_id), MAX_UINT, attacker.node_id)
    # To a third peer, and to the member itself, as gossip would bring it there.
    for peer in (observer, member):
        await attacker.send(peer, suspicion)

    async def alive_everywhere() -> tuple[bool, object]:
        views = [await member_of(p, member.node_id) for p in peers]
        seen = [(v["status"], v["incarnation"]) if v else None for v in views]
        ok = all(v is not None and v["status"] == "alive" for v in views)
        return ok and all(v and v["incarnation"] < MAX_INCARNATION for v in views), seen

    await hold("the suspected member is alive everywhere, in range", alive_everywhere, HOLD)
    await wait_dropped([observer, member], before)

    # It can restart on its data directory: its stored incarnation is still in range.
    cluster.kill(member, signal.SIGKILL)
    cluster.start(member)
    await wait_ready([member], timeout=30)
    await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=20)
    mine = await member_of(member, member.node_id)
    assert mine is not None and known["incarnation"] < mine["incarnation"] < MAX_INCARNATION


# (b)


def test_a_forged_peer_state_pins_nothing_and_joins_through_the_victim_work(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path / "cluster", extra_args=()) as cluster:
        peers = three_peers(cluster)
        assert cluster.key_file is not None
        attacker = Attacker(load_keyring_text(cluster.key_file.read_text()))
        run_showing_logs(forged_state(cluster, peers, attacker), cluster.peers)


async def forged_state(cluster: LocalCluster, peers: list[Peer], attacker: Attacker) -> None:
    await wait_all_serving(peers)
    victim = peers[1]
    known = await member_of(peers[0], victim.node_id)
    assert known is not None
    before = {p.name: await dropped(p) for p in peers}
    forged = attacker.forged_state(raw_id(victim.node_id), known["incarnation"])
    for peer in peers:  # the victim itself included
        await attacker.send(peer, forged)
    await hold(
        "the victim's roles are advertised everywhere",
        lambda: roles_everywhere(peers, [victim]),
        HOLD,
    )
    await wait_dropped(peers, before)

    # A new peer joins through the victim and learns everyone, roles included.
    newcomer = cluster.add(join=[victim])
    everyone = [*peers, newcomer]
    await wait_ready([newcomer], timeout=30)
    await wait_views(everyone, {p.node_id: "alive" for p in everyone}, timeout=20)
    await wait_for(
        "every peer's roles known everywhere", lambda: roles_everywhere(everyone, everyone), 20
    )


# (c)


def test_one_unsigned_death_of_a_running_tasks_owner_starts_no_second_execution(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path / "cluster", extra_args=()) as cluster:
        peers = three_peers(cluster)
        assert cluster.key_file is not None
        attacker = Attacker(load_keyring_text(cluster.key_file.read_text()))
        run_showing_logs(death_of_the_owner(peers, attacker), peers)


async def death_of_the_owner(peers: list[Peer], attacker: Attacker) -> None:
    await wait_all_serving(peers)
    origin = peers[0]
    answer = await query(
        origin, lambda c: c.submit("sleep", f"{TASK_SECONDS:g}", idempotency_key="e2e-dead")
    )
    task_id = answer["id"]
    task: dict[str, Any] = {}

    async def running() -> tuple[bool, object]:
        nonlocal task
        task = await query(origin, lambda c: c.task(task_id))
        return task["state"] == "running" and task["owner"] is not None, task["state"]

    await wait_for("the task running", running, timeout=15)
    owner = next(p for p in peers if p.node_id == task["owner"])
    others = [p for p in peers if p is not owner]
    known = await member_of(others[0], owner.node_id)
    assert known is not None
    death = Dead(raw_id(owner.node_id), known["incarnation"], attacker.node_id)
    for peer in others:  # the peers that would take the task over
        await attacker.send(peer, death)

    async def one_execution() -> tuple[bool, object]:
        views = [await query(p, lambda c: c.task(task_id)) for p in peers]
        runs = {(e["epoch"], e["owner"]) for v in views for e in v["executions"]}
        ok = runs <= {(1, owner.node_id)} and all(v["duplicates"] == 0 for v in views)
        return ok, [(v["state"], v["owner"], v["epoch"], v["executions"]) for v in views]

    async def refuted() -> tuple[bool, object]:
        views = [await member_of(p, owner.node_id) for p in peers]
        seen = [(v["status"], v["incarnation"]) if v else None for v in views]
        ok = all(
            v and v["status"] == "alive" and v["incarnation"] > known["incarnation"] for v in views
        )
        return bool(ok), seen

    # The owner hears of its death and refutes; meanwhile and after, one execution only.
    start = time.monotonic()
    while time.monotonic() - start < 15:
        ok, seen = await one_execution()
        assert ok, f"a second execution started: {seen!r}"
        if (await refuted())[0]:
            break
        await asyncio.sleep(0.25)
    else:
        raise AssertionError(f"the owner did not refute its death: {(await refuted())[1]!r}")
    await hold("one execution of the task", one_execution, HOLD)

    async def done() -> tuple[bool, object]:
        ok, seen = await one_execution()
        assert ok, f"a second execution started: {seen!r}"
        views = [await query(p, lambda c: c.task(task_id)) for p in peers]
        return all(v["state"] == "done" for v in views), [v["state"] for v in views]

    await wait_for("the task done", done, timeout=TASK_SECONDS + 15)
    final = await query(origin, lambda c: c.task(task_id))
    assert final["result"]["outcome"] == "ok"
    assert (final["epoch"], final["result"]["owner"]) == (1, owner.node_id)
