"""The decoder's resource bounds: nesting depth, and allocation at most a small multiple of the
input size, whatever the array lengths claim; and encoders held to the decoder's integer range.

The property tests measure with tracemalloc: the peak while decoding stays under
`ALLOCATION_FACTOR * len(input) + SLACK`, and nothing but `RemoteProtocolError` escapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import fields
from protocol.codec import decode_message, encode_message
from protocol.envelope import PROTOCOL_VERSION, decode_envelope, encode_envelope, peek_sender
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.fields import ALLOCATION_FACTOR, MAX_DEPTH, check_shape
from protocol.identity import DOMAIN_ALIVE, Signer
from protocol.wire import (
    MAX_UINT,
    Alive,
    Kind,
    MemberEntry,
    Ping,
    PushPull,
    Status,
    Suspect,
    alive_payload,
)

SLACK = 64 * 1024
"""Allocation not proportional to the input: exception objects, messages, interpreter noise."""
NID = hashlib.sha256(b"sender").digest()
Decode = Callable[[bytes], object]


def peak_while(decode: Decode, data: bytes) -> int:
    """Decode `data` (accepting `RemoteProtocolError` only) and return the traced peak."""
    tracemalloc.start()
    try:
        with contextlib.suppress(RemoteProtocolError):
            decode(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def in_envelope(body: bytes) -> bytes:
    """An envelope whose message list is `body` (any msgpack bytes, not checked)."""
    head = b"".join(bytes(msgpack.packb(v)) for v in (PROTOCOL_VERSION, NID, "h:1"))
    return b"\x94" + head + body


def assert_bounded(data: bytes) -> None:
    for decode in (decode_message, decode_envelope):
        assert peak_while(decode, data) <= ALLOCATION_FACTOR * len(data) + SLACK
    wrapped = in_envelope(data)
    assert peak_while(decode_envelope, wrapped) <= ALLOCATION_FACTOR * len(wrapped) + SLACK


# The reported inputs.


def test_a_5000_byte_message_of_nested_claims_allocates_little() -> None:
    # 4,998 bytes of arrays, each claiming 4,990 elements: within msgpack's own cap (the size)
    data = (b"\xdc" + struct.pack(">H", 4990)) * 1666
    with pytest.raises(RemoteProtocolError):
        decode_message(data)
    assert peak_while(decode_message, data) <= ALLOCATION_FACTOR * len(data) + SLACK


def test_a_100_kb_envelope_of_nested_claims_allocates_little() -> None:
    data = in_envelope((b"\xdd" + struct.pack(">I", 100_000)) * 20_000)
    assert len(data) > 100_000
    with pytest.raises(RemoteProtocolError):
        decode_envelope(data)
    assert peak_while(decode_envelope, data) <= ALLOCATION_FACTOR * len(data) + SLACK


def test_a_large_honest_push_pull_decodes_within_the_bound() -> None:
    s = Signer(hashlib.sha256(b"k").digest(), b"net")
    sig = s.sign(DOMAIN_ALIVE, alive_payload(s.public_key, "10.0.0.1:7946", 3))
    a = Alive(s.public_key, "10.0.0.1:7946", 3, sig, s.node_id)
    msg = PushPull(False, True, tuple(MemberEntry(a, Status.ALIVE, 3) for _ in range(5000)), ())
    data = encode_message(msg)
    assert decode_message(data) == msg
    assert peak_while(decode_message, data) <= ALLOCATION_FACTOR * len(data) + SLACK


# Nesting depth.


def nested(depth: int, filler: int = 0) -> bytes:
    """A value nested `depth` arrays deep, preceded at the top by `filler` empty arrays (enough
    of them force the walk that small inputs skip)."""
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return bytes(msgpack.packb([*([[]] * filler), value] if depth else value))


@pytest.mark.parametrize("filler", [0, 40])
def test_nesting_up_to_the_cap_passes_and_deeper_is_refused(filler: int) -> None:
    check_shape(nested(MAX_DEPTH, filler))
    with pytest.raises(RemoteProtocolError, match="nested deeper"):
        check_shape(nested(MAX_DEPTH + 1, filler))
    with pytest.raises(RemoteProtocolError):
        decode_message(nested(MAX_DEPTH + 1, filler))


def test_the_deepest_message_is_well_within_the_cap() -> None:
    check_shape(nested(4 * 2), max_depth=MAX_DEPTH // 2)


@pytest.mark.parametrize(
    "data",
    [
        b"\x92\x01",  # an array missing an element
        b"\x91\x01\x02",  # trailing bytes
        b"\xdc\x00\x03\x01\x02",  # array16 claiming three elements, holding two
        b"\xc4\x05abc",  # binary claiming more bytes than there are
        b"\x81\x01\x02",  # a map
        b"\xd4\x01\x00",  # an ext type
        b"\xc1",  # never used
    ],
)
def test_the_walk_refuses_malformed_input(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        fields.unpack_strict(data, len(data))
    with pytest.raises(RemoteProtocolError):
        check_shape(b"\x92\x90" + data, max_depth=1)  # [[], data]: two arrays force the walk


def test_the_walk_accepts_every_honest_shape() -> None:
    for value in ([], [[]] * 20, [b"x" * 300, "s" * 40, 1.5, -3, None, True] * 9, [[1, [2]]] * 9):
        data = bytes(msgpack.packb(value))
        check_shape(data, max_depth=3)
        assert fields.unpack_strict(data, len(data)) == value


# Properties over arbitrary nested input.

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_claim = st.integers(0, 300) | st.integers(0, 2**32 - 1)  # often within msgpack's own cap
_array_header = st.one_of(
    st.integers(0, 15).map(lambda n: bytes([0x90 | n])),
    _claim.map(lambda n: b"\xdc" + struct.pack(">H", min(n, 0xFFFF))),
    _claim.map(lambda n: b"\xdd" + struct.pack(">I", n)),
)
_scalar = st.sampled_from(
    [
        *[b"\xc0", b"\xc3", b"\x01", b"\x7f", b"\xe0", b"\xa2ab", b"\xc4\x01x", b"\x80", b"\x90"],
        *[b"\xca" + bytes(4), b"\xcb" + bytes(8), b"\xd3" + bytes(8), b"\xcf" + b"\xff" * 8],
    ]
)
_token = st.one_of(_array_header, _array_header, _array_header, _scalar)


@st.composite
def _claims(draw: st.DrawFn) -> bytes:
    """A short run of tokens repeated up to 2,000 times, then a few more: inputs of up to tens
    of kilobytes whose arrays nest deep and claim lengths the input may or may not hold."""
    run = b"".join(draw(st.lists(_token, min_size=1, max_size=8)))
    tail = b"".join(draw(st.lists(_token, max_size=8)))
    return run * draw(st.integers(1, 2000)) + tail


_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=12),
    max_leaves=400,
)


@FUZZ
@given(_claims())
def test_arbitrary_array_claims_allocate_at_most_a_multiple_of_the_input(data: bytes) -> None:
    assert_bounded(data)


@FUZZ
@given(_values)
def test_arbitrary_nested_values_allocate_at_most_a_multiple_of_the_input(value: Any) -> None:
    assert_bounded(bytes(msgpack.packb(value)))


@FUZZ
@given(st.integers(1, 2000), st.integers(0, 2**16), _claims())
def test_deep_prefixes_allocate_at_most_a_multiple_of_the_input(
    depth: int, claim: int, rest: bytes
) -> None:
    assert_bounded(b"\xdd" + struct.pack(">I", claim) * depth + rest)


# Encoders use the decoder's integer range.


@pytest.mark.parametrize("value", [0, MAX_UINT])
def test_every_integer_the_encoder_makes_decodes(value: int) -> None:
    msg = Suspect(NID, value, NID)
    assert decode_message(encode_message(msg)) == msg
    assert fields.uint(value) == fields.encodable(value)


@pytest.mark.parametrize(
    "msg",
    [Suspect(NID, MAX_UINT + 1, NID), Ping(-1, NID), Ping(1, NID, 2**64)],
)
def test_the_encoder_refuses_integers_the_decoder_would(msg: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(msg)


def test_a_message_passes_the_walk_and_decodes() -> None:
    data = encode_message(Suspect(NID, 7, NID))
    check_shape(data, max_depth=1)
    assert msgpack.unpackb(data)[0] == Kind.SUSPECT


def test_peek_sender_reads_the_head_of_any_size_of_envelope_and_refuses_other_heads() -> None:
    sender = bytes(range(32))
    small = encode_envelope(sender, "127.0.0.1:1", [b"x"])
    large = encode_envelope(sender, "127.0.0.1:1", [b"y" * 100_000])
    assert peek_sender(small) == peek_sender(large) == sender
    wrong_version = msgpack.packb([PROTOCOL_VERSION + 1, sender, "127.0.0.1:1", []])
    short_id = encode_envelope(sender[:31], "127.0.0.1:1", [])
    for head in (b"", b"\xc1", wrong_version, short_id, msgpack.packb([1, 2, 3])):
        assert peek_sender(head) is None
