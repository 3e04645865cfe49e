"""Wire codec: round trips of every kind, strict rejection, and fuzzing of the decoders.

Whatever the bytes, `decode_envelope` and `decode_message` either return a value or raise
`RemoteProtocolError`; nothing else escapes and no small input makes them allocate much.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import time
import tracemalloc
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import fields as field_checks
from protocol.codec import RETIRED_KINDS, decode_message, encode_message
from protocol.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    decode_envelope,
    encode_envelope,
    merge_envelopes,
)
from protocol.errors import RemoteProtocolError
from protocol.identity import DOMAIN_ALIVE, DOMAIN_PEER_STATE, Signer, node_id_of
from protocol.tasks.messages import (
    INVENTORY_KEY,
    KEY_CLAIM,
    KEY_STEPS,
    Cancel,
    Checkpoint,
    Claim,
    EpochGrant,
    Inventory,
    Result,
    TaskAsk,
    TaskGrant,
    TaskHave,
    TaskHeld,
    TaskList,
    TaskPage,
    TaskProgress,
    TaskRead,
    TaskRecord,
    TaskShards,
    TaskSummary,
    TaskWant,
    task_id_of,
)
from protocol.wire import (
    MAX_ADDR_CHARS,
    MAX_ENVELOPE_BYTES,
    MAX_EVENT_PAYLOAD,
    MAX_MESSAGE_BYTES,
    MAX_NAME_CHARS,
    MAX_UINT,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Kind,
    MemberEntry,
    Message,
    Nack,
    PeerState,
    Ping,
    PushPull,
    Status,
    Suspect,
    UserEvent,
    alive_payload,
    peer_state_payload,
)

NET = b"grapevine-test"
SIG = bytes(range(64))
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def signer(i: int) -> Signer:
    return Signer(hashlib.sha256(b"wire key %d" % i).digest(), NET)


def nid(i: int) -> bytes:
    return node_id_of(signer(i).public_key)


def alive(i: int, incarnation: int = 0, addr: str | None = None) -> Alive:
    s = signer(i)
    addr = addr or f"10.0.0.{i}:7946"
    sig = s.sign(DOMAIN_ALIVE, alive_payload(s.public_key, addr, incarnation))
    return Alive(s.public_key, addr, incarnation, sig, s.node_id)


def task_record(i: int = 1) -> TaskRecord:
    key = signer(i).public_key
    origin = node_id_of(key)
    data = b"summarise this"
    digest = hashlib.sha256(data).digest()
    task_id = task_id_of(origin, "idem-1", b"", "writer", digest, 5, b"", 30.0)
    return TaskRecord(
        key, 1700000000.5, "writer", data, 5, b"", "idem-1", b"", 30.0, TRACEPARENT, SIG,
        task_id, origin,
    )  # fmt: skip


def peer_state(i: int) -> PeerState:
    roles = ("writer", "planner")
    payload = peer_state_payload(nid(i), 4, 7, roles, 2, 3, 0.25, 5, 6)
    sig = signer(i).sign(DOMAIN_PEER_STATE, payload)
    return PeerState(nid(i), 7, roles, 2, 3, 0.25, 4, sig, 5, 6)


SAMPLES: dict[Kind, Message] = {
    Kind.PING: Ping(1, nid(1)),
    Kind.INDIRECT_PING: IndirectPing(2, nid(2), "[::1]:7946"),
    Kind.ACK: Ack(MAX_UINT),
    Kind.NACK: Nack(0),
    Kind.ALIVE: alive(3, incarnation=9),
    Kind.SUSPECT: Suspect(nid(1), 4, nid(2)),
    Kind.DEAD: Dead(nid(1), 5, nid(1)),
    Kind.PUSH_PULL: PushPull(
        join=True,
        reply=False,
        members=tuple(
            MemberEntry(alive(i, incarnation=i), status, i) for i, status in enumerate(Status)
        ),
        states=(peer_state(1), peer_state(2)),
    ),
    Kind.USER_EVENT: UserEvent(nid(4), 11, "deploy", b"\x00payload"),
    Kind.PEER_STATE: peer_state(5),
    Kind.TASK: task_record(),
    Kind.CLAIM: Claim(task_record().task_id, signer(2).public_key, 3, 1, SIG, nid(2)),
    Kind.RESULT: Result(
        task_record().task_id, 1, signer(2).public_key, "ok", b"answer", (10, 20, 30), SIG, nid(2)
    ),
    Kind.CANCEL: Cancel(task_record().task_id, signer(1).public_key, "user asked", SIG, nid(1)),
    Kind.TASK_HELD: TaskHeld(task_record().task_id),
    Kind.TASK_SHARDS: TaskShards(
        1, ((0, b"12345678"), (255, b"")), ((nid(1), b"12345678"),), nid(1)
    ),
    Kind.TASK_HAVE: TaskHave(
        (
            Inventory(
                nid(1),
                b"87654321",
                b"12345678",
                INVENTORY_KEY.pack(KEY_CLAIM, 1, nid(2), 0, 0)
                + INVENTORY_KEY.pack(KEY_STEPS, 1, nid(2), 1, 4),
            ),
            Inventory(nid(2), b"abcdefgh", b"", b""),
        ),
        True,
    ),
    Kind.TASK_READ: TaskRead((nid(4), nid(5))),
    Kind.TASK_WANT: TaskWant((nid(1), nid(2))),
    Kind.TASK_ASK: TaskAsk(nid(1), 2),
    Kind.TASK_GRANT: TaskGrant(nid(1), 1, nid(3)),
    Kind.EPOCH_GRANT: EpochGrant(nid(1), 2, nid(3), signer(4).public_key, SIG, nid(4)),
    Kind.CHECKPOINT: Checkpoint(nid(1), 2, 3, signer(4).public_key, b"step", SIG, nid(4)),
    Kind.TASK_LIST: TaskList(7, nid(1), 50, "done", "echo"),
    Kind.TASK_PROGRESS: TaskProgress(nid(1), 2, "model-call", 12.5, (("model", "m"), ("n", 3))),
    Kind.TASK_PAGE: TaskPage(
        7,
        (
            TaskSummary(nid(2), "echo", "done", "ok", nid(3), nid(4), 1, 12.5),
            TaskSummary(nid(5), "echo", "pending", "", nid(3), b"", 0, 13.0),
        ),
        True,
    ),
}

VALID_ENCODINGS = [encode_message(m) for m in SAMPLES.values()]


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj))


def test_every_kind_has_a_sample() -> None:
    assert set(SAMPLES) == set(Kind) - RETIRED_KINDS


@pytest.mark.parametrize("kind", list(SAMPLES), ids=lambda k: k.name)
def test_message_round_trip(kind: Kind) -> None:
    msg = SAMPLES[kind]
    data = encode_message(msg)
    assert msgpack.unpackb(data)[0] == kind
    assert decode_message(data) == msg


def test_empty_push_pull_round_trip() -> None:
    msg = PushPull(join=False, reply=True, members=(), states=())
    assert decode_message(encode_message(msg)) == msg


def test_derived_fields_come_from_the_key() -> None:
    decoded = decode_message(encode_message(alive(7)))
    assert isinstance(decoded, Alive)
    assert decoded.node_id == hashlib.sha256(decoded.public_key).digest()


@pytest.mark.parametrize(
    "kind", [Kind.TASK, Kind.CLAIM, Kind.RESULT, Kind.CANCEL, Kind.EPOCH_GRANT, Kind.CHECKPOINT]
)
def test_signed_task_objects_of_one_author_share_its_key_and_node_id(kind: Kind) -> None:
    # Decoded twice, from different bytes objects: the key and the node id derived from it
    # are the same objects both times (a peer holds thousands of one author's objects).
    data = encode_message(SAMPLES[kind])
    first, second = decode_message(bytes(data)), decode_message(bytes(bytearray(data)))
    assert first == second
    keys = [getattr(m, name) for m in (first, second) for name in KEY_FIELDS[kind][:1]]
    ids = [getattr(m, name) for m in (first, second) for name in KEY_FIELDS[kind][1:]]
    assert keys[0] is keys[1] and ids[0] is ids[1]
    assert ids[0] == hashlib.sha256(keys[0]).digest()


KEY_FIELDS = {
    Kind.TASK: ("origin_key", "origin"),
    Kind.CLAIM: ("owner_key", "owner"),
    Kind.RESULT: ("owner_key", "owner"),
    Kind.CANCEL: ("by_key", "by"),
    Kind.EPOCH_GRANT: ("arbiter_key", "arbiter"),
    Kind.CHECKPOINT: ("owner_key", "owner"),
}
"""Per signed task object: (its public key's field, the node id derived from it)."""


def test_the_signers_remembered_stay_bounded_and_are_still_checked() -> None:
    for i in range(field_checks.KNOWN_SIGNERS + 10):
        key, node = field_checks.signer(i.to_bytes(32, "big"))
        assert node == hashlib.sha256(key).digest()
    assert len(field_checks._signers) <= field_checks.KNOWN_SIGNERS
    with pytest.raises(RemoteProtocolError):
        field_checks.signer(b"short")
    with pytest.raises(RemoteProtocolError):
        field_checks.signer([1, 2])


def test_alive_signature_covers_its_payload() -> None:
    a = alive(1, incarnation=3)
    assert a.signed_payload() == alive_payload(a.public_key, a.addr, a.incarnation)


def test_envelope_round_trip() -> None:
    messages = VALID_ENCODINGS
    data = encode_envelope(nid(1), "127.0.0.1:7946", messages)
    assert decode_envelope(data) == Envelope(nid(1), "127.0.0.1:7946", tuple(messages))
    assert [decode_message(m) for m in decode_envelope(data).messages] == list(SAMPLES.values())


def test_empty_envelope_round_trip() -> None:
    assert decode_envelope(encode_envelope(nid(1), "h:1", [])).messages == ()


# Rejections.


def test_rejects_oversize_envelope() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_envelope(b"\x90" * (MAX_ENVELOPE_BYTES + 1))


def test_rejects_oversize_message() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_message(b"\x90" * (MAX_MESSAGE_BYTES + 1))


@pytest.mark.parametrize(
    "envelope",
    [
        [PROTOCOL_VERSION + 1, nid(1), "h:1", []],
        [0, nid(1), "h:1", []],
        [True, nid(1), "h:1", []],  # bool is not a version
        [1.0, nid(1), "h:1", []],
        ["1", nid(1), "h:1", []],
    ],
)
def test_rejects_wrong_version(envelope: list[Any]) -> None:
    with pytest.raises(RemoteProtocolError, match="version"):
        decode_envelope(pack(envelope))


@pytest.mark.parametrize(
    "envelope",
    [
        [PROTOCOL_VERSION, nid(1), "h:1"],
        [PROTOCOL_VERSION, nid(1), "h:1", [], []],
        [PROTOCOL_VERSION, nid(1)[:31], "h:1", []],
        [PROTOCOL_VERSION, "x" * 32, "h:1", []],
        [PROTOCOL_VERSION, nid(1), "", []],
        [PROTOCOL_VERSION, nid(1), "h" * (MAX_ADDR_CHARS + 1), []],
        [PROTOCOL_VERSION, nid(1), b"h:1", []],
        [PROTOCOL_VERSION, nid(1), "h:1", [pack([Kind.ACK, 1]).decode("latin-1")]],
        [PROTOCOL_VERSION, nid(1), "h:1", [[Kind.ACK, 1]]],
        [PROTOCOL_VERSION, nid(1), "h:1", b""],
        {"version": PROTOCOL_VERSION},
        "envelope",
        None,
    ],
)
def test_rejects_bad_envelope_shape(envelope: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_envelope(pack(envelope))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x93\x01",  # truncated array
        pack([Kind.ACK, 1]) + b"\x00",  # trailing bytes
        pack(msgpack.ExtType(1, b"x")),
        pack([Kind.ACK, msgpack.ExtType(1, b"x")]),
        pack([Kind.ACK, msgpack.Timestamp(1)]),
        pack({"kind": 3}),
        pack([Kind.ACK, {}]),
        pack([Kind.PING, {1: 2}, nid(1)]),
        pack([]),
        pack(3),
        pack([999, 1]),
        pack([0, 1]),
        pack([-1, 1]),
        pack([True, 1]),  # bool is not a kind
        pack([3.0, 1]),
        pack(["ACK", 1]),
    ],
)
def test_rejects_malformed_or_unknown(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(data)


def test_rejects_ext_types_in_envelope() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_envelope(pack([PROTOCOL_VERSION, nid(1), "h:1", [msgpack.ExtType(5, b"")]]))


def test_a_listing_filtered_by_owner_takes_the_longer_form_and_round_trips() -> None:
    plain = TaskList(7, b"", 50, "", "")
    filtered = TaskList(7, b"", 50, "", "", owner=nid(9))
    assert len(msgpack.unpackb(encode_message(plain))) == 6  # unchanged for older peers
    assert len(msgpack.unpackb(encode_message(filtered))) == 7
    assert decode_message(encode_message(filtered)) == filtered
    for owner in (b"", b"x" * 31, "n" * 32, 5):
        with pytest.raises(RemoteProtocolError):
            decode_message(pack([Kind.TASK_LIST, 7, b"", 50, "", "", owner]))


@pytest.mark.parametrize("kind", list(SAMPLES), ids=lambda k: k.name)
def test_rejects_wrong_arity(kind: Kind) -> None:
    fields = msgpack.unpackb(encode_message(SAMPLES[kind]))
    with pytest.raises(RemoteProtocolError):
        decode_message(pack([*fields, 0]))
    with pytest.raises(RemoteProtocolError):
        decode_message(pack(fields[:-1]))


@pytest.mark.parametrize(
    "fields",
    [
        # wrong field types
        [Kind.PING, "1", nid(1)],
        [Kind.PING, 1.0, nid(1)],
        [Kind.PING, 1, "n" * 32],
        [Kind.PING, 1, nid(1)[:31]],
        [Kind.PING, 1, nid(1) + b"\x00"],
        [Kind.PING, None, nid(1)],
        [Kind.SUSPECT, nid(1), 1, None],
        [Kind.DEAD, nid(1), [1], nid(2)],
        [Kind.USER_EVENT, nid(1), 1, "name", "payload is not bytes"],
        [Kind.TASK_SHARDS, 2, [], [], b""],  # level
        [Kind.TASK_SHARDS, 0, [[256, b"12345678"]], [], b""],  # shard out of range
        [Kind.TASK_SHARDS, 0, [[1, b"short"]], [], b""],
        [Kind.TASK_SHARDS, 1, [[1, b""], [1, b""]], [], b""],  # a shard repeated
        [Kind.TASK_SHARDS, 1, [], [[nid(1), b"short"]], b""],
        [Kind.TASK_SHARDS, 1, [], [nid(1)], b""],
        [Kind.TASK_HAVE, [], 1],  # reply is a boolean
        [Kind.TASK_HAVE, [[nid(1), b"short", b"", b""]], True],  # the digest
        [Kind.TASK_HAVE, [[nid(1), b"12345678", b"short", b""]], True],  # the record tag
        [Kind.TASK_HAVE, [[nid(1), b"12345678", b"", b"\x01"]], True],  # part of a key
        [Kind.TASK_HAVE, [[nid(1), b"12345678", b""]], True],  # an inventory's fields
        [Kind.TASK_HAVE, [[nid(1), b"12345678", b"", "keys"]], True],
        [Kind.TASK_HAVE, [[nid(1), b"12345678", b"", b"\x00" * 57 * 4097]], True],  # too many
        # retired kinds, even well formed
        [Kind.TASK_DIGESTS, [[nid(1), b"12345678"]]],
        [Kind.TASK_SYNC, [[nid(1), b"12345678"]]],
        [Kind.TASK_WANT, nid(1)],
        # booleans are not integers
        [Kind.ACK, True],
        [Kind.NACK, False],
        [Kind.SUSPECT, nid(1), True, nid(2)],
        # negative and too-large integers
        [Kind.ACK, -1],
        [Kind.ACK, MAX_UINT + 1],
        [Kind.ACK, 2**64 - 1],
        [Kind.SUSPECT, nid(1), -5, nid(2)],
        # overlong or empty names and addresses
        [Kind.INDIRECT_PING, 1, nid(1), "a" * (MAX_ADDR_CHARS + 1)],
        [Kind.INDIRECT_PING, 1, nid(1), ""],
        [Kind.USER_EVENT, nid(1), 1, "n" * (MAX_NAME_CHARS + 1), b""],
        [Kind.USER_EVENT, nid(1), 1, "", b""],
        [Kind.USER_EVENT, nid(1), 1, "n", b"p" * (MAX_EVENT_PAYLOAD + 1)],
        [Kind.ALIVE, alive(1).public_key, "a" * (MAX_ADDR_CHARS + 1), 0, SIG],
        [Kind.ALIVE, alive(1).public_key[:31], "h:1", 0, SIG],
        [Kind.ALIVE, alive(1).public_key, "h:1", 0, SIG[:63]],
        # peer state
        [Kind.PEER_STATE, nid(1), 1, ["r"] * 65, 0, 0, 0.0, 0, SIG],
        [Kind.PEER_STATE, nid(1), 1, [""], 0, 0, 0.0, 0, SIG],
        [Kind.PEER_STATE, nid(1), 1, ["r"], 0, 0, 1, 0, SIG],  # load must be a float
        [Kind.PEER_STATE, nid(1), 1, ["r"], 0, 0, -0.5, 0, SIG],
        [Kind.PEER_STATE, nid(1), 1, ["r"], 0, 0, float("nan"), 0, SIG],
        [Kind.PEER_STATE, nid(1), 1, ["r"], 0, 0, float("inf"), 0, SIG],
        [Kind.PEER_STATE, nid(1), 1, "r", 0, 0, 0.0, 0, SIG],
        [Kind.PEER_STATE, nid(1), 1, ["r"], 0, 0, 0.0, -1, SIG],  # incarnation
        [Kind.PEER_STATE, nid(1), 1, ["r"], 0, 0, 0.0, 0, SIG[:63]],  # signature
        [Kind.PEER_STATE, nid(1), 1, ["r"], 0, 0, 0.0, 0, None],
        # a retired kind (v1's execution log), even well formed
        [Kind.EXECUTION, nid(1), 1, alive(1).public_key, 1, "ok", SIG],
        # result usage
        [Kind.RESULT, nid(1), 1, alive(1).public_key, "ok", b"", [1, 2], SIG],
        [Kind.RESULT, nid(1), 1, alive(1).public_key, "ok", b"", [1, 2, -3], SIG],
    ],
)
def test_rejects_bad_fields(fields: list[Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(pack(fields))


@pytest.mark.parametrize(
    "traceparent",
    [
        TRACEPARENT.upper(),
        TRACEPARENT[:-1],
        TRACEPARENT + "-extra",
        "01" + TRACEPARENT[2:],  # only version 00 is carried
        "00-" + "0" * 32 + TRACEPARENT[35:],  # an all-zero trace id
        TRACEPARENT[:36] + "0" * 16 + TRACEPARENT[52:],  # an all-zero parent id
        TRACEPARENT.replace("-", "_"),
        " " * 55,
        TRACEPARENT.encode(),
        None,
    ],
)
def test_rejects_a_task_record_with_a_bad_traceparent(traceparent: Any) -> None:
    fields = msgpack.unpackb(encode_message(task_record()))
    assert fields[10] == TRACEPARENT
    fields[10] = traceparent
    with pytest.raises(RemoteProtocolError, match="traceparent"):
        decode_message(pack(fields))


def test_a_task_record_without_trace_context_round_trips_and_signs_its_traceparent() -> None:
    untraced = replace(task_record(), traceparent="")
    assert decode_message(encode_message(untraced)) == untraced
    assert untraced.signed_payload() != task_record().signed_payload()


def _push_pull_with_row(row: list[Any]) -> bytes:
    return pack([Kind.PUSH_PULL, False, False, [row], []])


def _alive_row(status: Any, incarnation: Any = 0) -> list[Any]:
    a = alive(1)
    return [a.public_key, a.addr, a.incarnation, a.sig, status, incarnation]


@pytest.mark.parametrize("status", [len(Status), 99, -1, "alive", None, [0]])
def test_rejects_bad_status_in_push_pull(status: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="status"):
        decode_message(_push_pull_with_row(_alive_row(status)))


@pytest.mark.parametrize("status", [True, 1.0])
def test_rejects_non_integer_status_in_push_pull(status: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(_push_pull_with_row(_alive_row(status)))


@pytest.mark.parametrize(
    "message",
    [
        [Kind.PUSH_PULL, 1, 0, [], []],  # flags must be booleans
        [Kind.PUSH_PULL, False, False, {}, []],
        [Kind.PUSH_PULL, False, False, [], None],
        [Kind.PUSH_PULL, False, False, [_alive_row(0)[:5]], []],
        [Kind.PUSH_PULL, False, False, [_alive_row(0, -1)], []],
        [Kind.PUSH_PULL, False, False, [], [[nid(1), 1]]],
    ],
)
def test_rejects_bad_push_pull(message: list[Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(pack(message))


# Resource limits.


@pytest.mark.parametrize("decode", [decode_message, decode_envelope])
@pytest.mark.parametrize(
    "header",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 2**32 - 1 elements
        b"\xdc\xff\xff",  # array16 claiming 65,535
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
    ],
)
def test_huge_length_claims_are_rejected_cheaply(decode: Any, header: bytes) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(RemoteProtocolError):
            decode(header + b"\x00" * 16)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 1_000_000


@pytest.mark.parametrize("decode", [decode_message, decode_envelope])
def test_nested_array_claims_do_not_amplify_memory(decode: Any) -> None:
    data = (b"\xdd" + struct.pack(">I", 100_000)) * 100  # 500 bytes
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


# Fuzzing: nothing but RemoteProtocolError escapes.

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decodes_or_rejects(data: bytes) -> None:
    for decode in (decode_envelope, decode_message):
        with contextlib.suppress(RemoteProtocolError):
            decode(data)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _decodes_or_rejects(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_ENCODINGS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


@FUZZ
@given(mutated())
def test_fuzz_mutated_messages(data: bytes) -> None:
    _decodes_or_rejects(data)


@FUZZ
@given(mutated())
def test_fuzz_mutated_messages_inside_envelopes(data: bytes) -> None:
    envelope = decode_envelope(encode_envelope(nid(1), "h:1", [data]))
    with contextlib.suppress(RemoteProtocolError):
        decode_message(envelope.messages[0])


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=80)
    | st.sampled_from([nid(1), alive(1).public_key, SIG, "h:1", 0, 1, 2, 3, 4, 1.0])
)
_values = _scalars | st.lists(_scalars, max_size=8)
SAMPLE_FIELDS = [msgpack.unpackb(m) for m in VALID_ENCODINGS]


@st.composite
def substituted(draw: st.DrawFn) -> list[Any]:
    """A valid message's fields with one field, or one element of an array field, replaced:
    the right shape with a wrong value, which is what reaches the per-field checks."""
    fields = list(draw(st.sampled_from(SAMPLE_FIELDS)))
    at = draw(st.integers(1, len(fields) - 1))
    inner = fields[at]
    if isinstance(inner, list) and inner and draw(st.booleans()):
        inner = list(inner)
        inner[draw(st.integers(0, len(inner) - 1))] = draw(_values)
        fields[at] = inner
    else:
        fields[at] = draw(_values)
    return fields


@FUZZ
@given(substituted())
def test_fuzz_substituted_fields(fields: list[Any]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(pack(fields))


@FUZZ
@given(st.sampled_from(list(Kind)), st.lists(_values, max_size=12))
def test_fuzz_structured_messages(kind: Kind, fields: list[Any]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(pack([int(kind), *fields]))


@FUZZ
@given(st.lists(_values, min_size=3, max_size=5))
def test_fuzz_structured_envelopes(fields: list[Any]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_envelope(pack(fields))


def test_merge_envelopes_joins_one_senders_messages_in_order_within_the_limit() -> None:
    first = encode_envelope(nid(1), "127.0.0.1:1", [b"a", b"b"])
    second = encode_envelope(nid(1), "127.0.0.1:1", [b"c"])
    other = encode_envelope(nid(2), "127.0.0.1:2", [b"d"])
    [merged, last] = merge_envelopes([first, second, other])
    assert decode_envelope(merged).messages == (b"a", b"b", b"c")
    assert last == other
    assert merge_envelopes([b"not an envelope", first]) == [b"not an envelope", first]
    big = [encode_envelope(nid(1), "127.0.0.1:1", [bytes(600)]) for _ in range(4)]
    out = merge_envelopes(big, limit=1500)
    assert [len(decode_envelope(e).messages) for e in out] == [2, 2]


def test_decoding_the_same_bytes_again_returns_the_envelope_decoded_last() -> None:
    # A host decodes one received object in its lane classifier, its slicer and the node: the
    # second and third decodes of that very object cost nothing, and change nothing.
    data = encode_envelope(b"\x01" * 32, "10.0.0.1:7946", [b"\x91\x01", b"\x91\x02"])
    first = decode_envelope(data)
    assert decode_envelope(data) is first
    copy = bytes(bytearray(data))
    assert copy is not data
    assert decode_envelope(copy) == first and decode_envelope(copy) is not first
    mutable = bytearray(data)
    assert decode_envelope(mutable) == first  # decoded, never kept: it could change
    mutable[-1] ^= 0xFF
    assert decode_envelope(bytes(mutable)) != first
    with pytest.raises(RemoteProtocolError):
        decode_envelope(b"\x93" + data[1:])
    with pytest.raises(RemoteProtocolError):
        decode_envelope(b"\x93" + data[1:])
