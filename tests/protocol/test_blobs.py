"""Blob references and rendezvous holders (protocol/blobs.py): pure, table-driven."""

from __future__ import annotations

import hashlib

import pytest

from protocol.blobs import (
    BLOB_LIMIT,
    MAX_REF_BYTES,
    REF_PREFIX,
    blob_holders,
    blob_ref,
    make_ref,
    parse_blob_ref,
)
from protocol.tasks.messages import MAX_INLINE_PAYLOAD
from protocol.tasks.state import hrw_score

DATA = b"x" * (MAX_INLINE_PAYLOAD + 1)
DIGEST = hashlib.sha256(DATA).digest()
HEX = DIGEST.hex().encode()


def test_a_reference_names_the_digest_and_size_and_parses_back() -> None:
    ref = blob_ref(DATA)
    assert ref == REF_PREFIX + HEX + b":" + str(len(DATA)).encode()
    assert parse_blob_ref(ref) == (DIGEST, len(DATA))
    assert len(ref) <= MAX_INLINE_PAYLOAD
    longest = make_ref(DIGEST, BLOB_LIMIT)
    assert len(longest) == MAX_REF_BYTES
    assert parse_blob_ref(longest) == (DIGEST, BLOB_LIMIT)


@pytest.mark.parametrize("size", [0, 1, MAX_INLINE_PAYLOAD, BLOB_LIMIT + 1])
def test_only_payloads_too_large_to_inline_and_within_the_limit_become_blobs(size: int) -> None:
    with pytest.raises(ValueError, match="blob holds"):
        make_ref(DIGEST, size)


def test_blob_ref_refuses_an_inline_sized_payload() -> None:
    with pytest.raises(ValueError, match="got 5"):
        blob_ref(b"small")
    with pytest.raises(ValueError, match="digest is 32 bytes"):
        make_ref(b"short", MAX_INLINE_PAYLOAD + 1)


SIZE = str(MAX_INLINE_PAYLOAD + 1).encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"hello",
        REF_PREFIX,
        REF_PREFIX + HEX,  # no size
        REF_PREFIX + HEX + b":",  # empty size
        REF_PREFIX + HEX.upper() + b":" + SIZE,  # upper-case hex
        REF_PREFIX + HEX[:-1] + b":" + SIZE,  # 63 digits
        REF_PREFIX + HEX + b"0:" + SIZE,  # 65 digits
        REF_PREFIX + b"g" + HEX[1:] + b":" + SIZE,  # not hex
        REF_PREFIX + HEX + b":0" + SIZE,  # leading zero
        REF_PREFIX + HEX + b":+" + SIZE,  # sign
        REF_PREFIX + HEX + b": " + SIZE,  # space
        REF_PREFIX + HEX + b":" + SIZE + b"\n",  # trailing newline
        REF_PREFIX + HEX + b":" + SIZE + b":1",  # extra field
        REF_PREFIX + HEX + b":100",  # would have fitted inline
        REF_PREFIX + HEX + b":" + str(BLOB_LIMIT + 1).encode(),  # over the limit
        b"grapevine-blob:v2:" + HEX + b":" + SIZE,  # another version
        b" " + REF_PREFIX + HEX + b":" + SIZE,
        REF_PREFIX + HEX + b":" + "１２３４５６".encode(),  # non-ASCII digits
        REF_PREFIX + HEX + b":" + b"9" * 200,  # huge
    ],
)
def test_anything_but_the_exact_format_is_an_ordinary_payload(payload: bytes) -> None:
    assert parse_blob_ref(payload) is None


def test_holders_are_the_members_in_rendezvous_order() -> None:
    members = [bytes([i]) * 32 for i in range(10)]
    ranked = blob_holders(DIGEST, members, 10)
    scores = [hrw_score(DIGEST, m) for m in ranked]
    assert scores == sorted(scores, reverse=True)
    assert sorted(ranked) == sorted(members)
    assert blob_holders(DIGEST, members, 3) == ranked[:3]
    assert blob_holders(DIGEST, reversed(members), 3) == ranked[:3]  # order-independent
    assert blob_holders(DIGEST, members + members, 20) == ranked  # duplicates once
    assert blob_holders(DIGEST, members, 0) == []
    assert blob_holders(DIGEST, members, -1) == []
    assert blob_holders(DIGEST, [], 3) == []


def test_a_member_joining_or_leaving_moves_no_other_holder() -> None:
    members = [bytes([i]) * 32 for i in range(8)]
    before = blob_holders(DIGEST, members, 8)
    newcomer = b"\xee" * 32
    after = blob_holders(DIGEST, [*members, newcomer], 9)
    assert [m for m in after if m != newcomer] == before
    gone = before[0]
    assert blob_holders(DIGEST, [m for m in members if m != gone], 7) == before[1:]


def test_different_blobs_spread_over_different_holders() -> None:
    members = [bytes([i]) * 32 for i in range(8)]
    firsts = {blob_holders(bytes([i]) * 32, members, 1)[0] for i in range(64)}
    assert len(firsts) >= 5
