"""Per-hop sealing: round trips, forgery, replay and clock windows, rotation."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer.runtime.keyring import Keyring, key_id_of
from peer.runtime.sealing import (
    HEADER_BYTES,
    OVERHEAD,
    ROUTE_BLOB_GET,
    ROUTE_BLOB_PUSH,
    ROUTE_ENVELOPE,
    STREAM_CHUNK,
    STREAM_HEAD_BYTES,
    TAG_BYTES,
    Opener,
    Sealer,
    SealError,
    stream_bytes,
)

NOW = 1_700_000_000.0
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
BOOT = b"boot0001"


def make_sealer(keyring: Keyring, boot_id: bytes = BOOT) -> Sealer:
    counter = itertools.count()
    return Sealer(keyring, boot_id, random_bytes=lambda n: next(counter).to_bytes(n, "big"))


def reason_of(opener: Opener, frame: bytes, now: float = NOW) -> str:
    with pytest.raises(SealError) as info:
        opener.open(frame, now)
    return info.value.reason


# Round trip and forgery


def test_round_trip() -> None:
    keyring = Keyring(KEY_A)
    sealer, opener = make_sealer(keyring), Opener(keyring)
    frames = [sealer.seal(b"hello %d" % i, NOW) for i in range(3)]
    assert [opener.open(frame, NOW + 1) for frame in frames] == [b"hello 0", b"hello 1", b"hello 2"]
    assert len(frames[0]) == len(b"hello 0") + OVERHEAD
    assert sealer.seq == 3
    assert opener.accepted == 3 and not opener.rejected


def test_empty_plaintext_round_trips() -> None:
    keyring = Keyring(KEY_A)
    assert Opener(keyring).open(make_sealer(keyring).seal(b"", NOW), NOW) == b""


def test_frame_layout() -> None:
    frame = make_sealer(Keyring(KEY_A)).seal(b"x", NOW)
    assert frame[:2] == b"GV" and frame[2] == 2
    assert frame[3:7] == key_id_of(KEY_A)
    assert frame[7:15] == BOOT
    assert int.from_bytes(frame[15:23], "big") == 1
    assert int.from_bytes(frame[23:31], "big") == int(NOW * 1000)
    assert frame[31:43] == bytes(12)  # the first injected nonce
    assert HEADER_BYTES == 31


def test_wrong_key_is_unknown_key() -> None:
    frame = make_sealer(Keyring(KEY_A)).seal(b"secret", NOW)
    opener = Opener(Keyring(KEY_B))
    assert reason_of(opener, frame) == "unknown_key"
    assert opener.rejected == {"unknown_key": 1} and opener.accepted == 0


def test_same_key_other_network_id_fails_decryption() -> None:
    frame = make_sealer(Keyring(KEY_A)).seal(b"secret", NOW)
    opener = Opener(Keyring(KEY_A, network_id=bytes(16)))
    assert reason_of(opener, frame) == "decrypt_failed"


def test_forged_key_id_fails_decryption() -> None:
    frame = make_sealer(Keyring(KEY_B)).seal(b"secret", NOW)
    forged = frame[:3] + key_id_of(KEY_A) + frame[7:]
    assert reason_of(Opener(Keyring(KEY_A)), forged) == "decrypt_failed"


@pytest.mark.parametrize("index", range(7, OVERHEAD + len(b"payload")))
def test_any_flipped_bit_past_the_key_id_is_rejected(index: int) -> None:
    keyring = Keyring(KEY_A)
    frame = bytearray(make_sealer(keyring).seal(b"payload", NOW))
    frame[index] ^= 0x01
    assert reason_of(Opener(keyring), bytes(frame)) == "decrypt_failed"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[: OVERHEAD - 1], "too_short"),
        (lambda f: b"XX" + f[2:], "bad_magic"),
        (lambda f: f[:2] + b"\x01" + f[3:], "bad_version"),
        (lambda f: f[:3] + b"\xff\xff\xff\xff" + f[7:], "unknown_key"),
        (lambda f: f + bytes(100), "too_large"),
    ],
)
def test_structural_rejections(mutate: object, reason: str) -> None:
    keyring = Keyring(KEY_A)
    frame = make_sealer(keyring).seal(b"x" * 10, NOW)
    opener = Opener(keyring, max_frame=len(frame) + 50)
    assert callable(mutate)
    assert reason_of(opener, mutate(frame)) == reason
    assert opener.rejected == {reason: 1}


def test_forged_frames_do_not_touch_replay_state() -> None:
    keyring = Keyring(KEY_A)
    sealer, opener = make_sealer(keyring), Opener(keyring)
    frame = sealer.seal(b"x", NOW)
    # A forger copies the header of a real frame, bumps its seq and garbles the body.
    forged = bytearray(frame)
    forged[15:23] = (10**6).to_bytes(8, "big")
    assert reason_of(opener, bytes(forged)) == "decrypt_failed"
    assert opener.open(frame, NOW) == b"x"  # seq 1 is still inside the window


# Replay window


def test_replay_of_the_same_frame_is_rejected() -> None:
    keyring = Keyring(KEY_A)
    sealer, opener = make_sealer(keyring), Opener(keyring)
    frame = sealer.seal(b"once", NOW)
    assert opener.open(frame, NOW) == b"once"
    assert reason_of(opener, frame) == "replay"
    assert opener.accepted == 1 and opener.rejected == {"replay": 1}


def test_out_of_order_within_window_is_accepted_once() -> None:
    keyring = Keyring(KEY_A)
    sealer, opener = make_sealer(keyring), Opener(keyring, window=64)
    frames = [sealer.seal(b"%d" % i, NOW) for i in range(1, 65)]
    order = [63, 0, 31, 62, 1, *range(2, 31), *range(32, 62)]
    assert sorted(order) == list(range(64))
    for i in order:
        assert opener.open(frames[i], NOW) == b"%d" % (i + 1)
    for i in order:
        assert reason_of(opener, frames[i]) == "replay"


def test_seq_older_than_window_is_rejected() -> None:
    keyring = Keyring(KEY_A)
    sealer, opener = make_sealer(keyring), Opener(keyring, window=8)
    frames = [sealer.seal(b"%d" % seq, NOW) for seq in range(1, 11)]
    opener.open(frames[9], NOW)  # seq 10: the window now covers 3..10
    assert reason_of(opener, frames[0]) == "replay"  # seq 1
    assert reason_of(opener, frames[1]) == "replay"  # seq 2
    assert opener.open(frames[2], NOW) == b"3"  # seq 3, the oldest still inside


def test_large_jump_clears_the_window() -> None:
    keyring = Keyring(KEY_A)
    sealer, opener = make_sealer(keyring), Opener(keyring, window=16)
    first = sealer.seal(b"1", NOW)
    opener.open(first, NOW)
    sealer.seq = 10_000
    opener.open(sealer.seal(b"late", NOW), NOW)
    assert reason_of(opener, first) == "replay"
    sealer.seq = 9_990
    assert opener.open(sealer.seal(b"inside", NOW), NOW) == b"inside"


def test_senders_are_tracked_separately() -> None:
    keyring = Keyring(KEY_A)
    opener = Opener(keyring)
    one, two = make_sealer(keyring, b"sender-1"), make_sealer(keyring, b"sender-2")
    assert opener.open(one.seal(b"a", NOW), NOW) == b"a"
    assert opener.open(two.seal(b"b", NOW), NOW) == b"b"  # also seq 1, other boot id


def test_boot_id_memory_is_bounded_least_recently_used_first() -> None:
    keyring = Keyring(KEY_A)
    opener = Opener(keyring, max_senders=3)
    sealers = [make_sealer(keyring, b"sender-%d" % i) for i in range(4)]
    first_frames = [sealer.seal(b"x", NOW) for sealer in sealers]
    for frame in first_frames[:3]:
        opener.open(frame, NOW)
    opener.open(sealers[0].seal(b"y", NOW), NOW)  # sender 0 is now the most recent
    opener.open(first_frames[3], NOW)  # evicts sender 1, the least recently used
    assert opener.senders == 3
    assert reason_of(opener, first_frames[0]) == "replay"
    assert reason_of(opener, first_frames[2]) == "replay"
    # Sender 1 was forgotten; its frame is accepted again, bounded by the timestamp window.
    assert opener.open(first_frames[1], NOW) == b"x"


# Timestamps


def test_timestamp_skew_both_ways() -> None:
    keyring = Keyring(KEY_A)
    opener = Opener(keyring, max_skew=30.0)
    sealer = make_sealer(keyring)
    assert opener.open(sealer.seal(b"edge", NOW - 30.0), NOW) == b"edge"
    assert opener.open(sealer.seal(b"edge", NOW + 30.0), NOW) == b"edge"
    assert reason_of(opener, sealer.seal(b"old", NOW - 31.0)) == "stale_timestamp"
    assert reason_of(opener, sealer.seal(b"new", NOW + 31.0)) == "future_timestamp"
    assert opener.rejected == {"stale_timestamp": 1, "future_timestamp": 1}


def test_stale_frame_does_not_consume_its_sequence_number() -> None:
    keyring = Keyring(KEY_A)
    opener, sealer = Opener(keyring, max_skew=10.0), make_sealer(keyring)
    frame = sealer.seal(b"x", NOW)
    assert reason_of(opener, frame, NOW + 11) == "stale_timestamp"
    assert opener.open(frame, NOW + 9) == b"x"


def test_sealer_refuses_unrepresentable_time() -> None:
    with pytest.raises(OverflowError):
        make_sealer(Keyring(KEY_A)).seal(b"x", -1.0)


# Rotation


def test_rotation_both_directions() -> None:
    old = Keyring(KEY_A)
    rotated = old.rotate(KEY_B)
    assert rotated.primary == KEY_B and rotated.accepted == (KEY_A,)
    assert rotated.network_id == old.network_id

    # Step 1: a peer that only accepts the new key still seals with the old one.
    step1 = Keyring(KEY_A, [KEY_B], network_id=old.network_id)
    # Step 2 peers seal with the new key and still accept the old one.
    assert Opener(step1).open(make_sealer(rotated).seal(b"new->old", NOW), NOW) == b"new->old"
    assert Opener(rotated).open(make_sealer(step1).seal(b"old->new", NOW), NOW) == b"old->new"
    # Step 3: the old key is gone; frames still sealed with it are refused.
    step3 = Keyring(KEY_B, network_id=old.network_id)
    assert reason_of(Opener(step3), make_sealer(old).seal(b"late", NOW)) == "unknown_key"


def test_rotate_drops_the_new_key_from_accepted() -> None:
    keyring = Keyring(KEY_A, [KEY_B]).rotate(KEY_B)
    assert keyring.keys == (KEY_B, KEY_A)


def test_rekeyed_sealer_and_opener_carry_sequence_and_replay_state_over() -> None:
    old = Keyring(KEY_A)
    rotated = old.rotate(KEY_B)
    sealer, opener = make_sealer(old), Opener(old, max_skew=5.0, window=64)
    before = sealer.seal(b"before", NOW)
    assert opener.open(before, NOW) == b"before"
    assert reason_of(opener, b"garbage" * 10) == "bad_magic"

    new_sealer, new_opener = sealer.rekeyed(rotated), opener.rekeyed(rotated)
    assert (new_sealer.boot_id, new_sealer.seq) == (BOOT, 1)
    assert (new_opener.max_skew, new_opener.window) == (5.0, 64)
    assert reason_of(new_opener, before) == "replay"  # accepted under the old keyring
    assert new_opener.open(new_sealer.seal(b"after", NOW), NOW) == b"after"
    assert new_opener.senders == 1 and new_opener.accepted == 2
    assert new_opener.rejected is opener.rejected
    assert new_opener.rejected == {"bad_magic": 1, "replay": 1}


# Robustness


@given(st.binary(max_size=200), st.floats(allow_nan=False, allow_infinity=False))
def test_random_bytes_only_raise_seal_error(frame: bytes, now: float) -> None:
    opener = Opener(Keyring(KEY_A))
    with contextlib.suppress(SealError):
        opener.open(frame, now)
    assert opener.accepted == 0


@given(st.binary(min_size=OVERHEAD, max_size=200), st.integers(0, 2**64 - 1))
def test_random_frames_with_valid_prefix_only_raise_seal_error(body: bytes, stamp: int) -> None:
    opener = Opener(Keyring(KEY_A))
    frame = b"GV\x02" + key_id_of(KEY_A) + body[:16] + stamp.to_bytes(8, "big") + body[16:]
    with pytest.raises(SealError) as info:
        opener.open(frame, NOW)
    assert info.value.reason == "decrypt_failed"
    assert not opener.senders


@given(st.lists(st.integers(1, 300), max_size=60), st.integers(1, 70))
def test_replay_window_matches_a_model(seqs: list[int], window: int) -> None:
    keyring = Keyring(KEY_A)
    opener, sealer = Opener(keyring, window=window), make_sealer(keyring)
    frames: dict[int, bytes] = {}
    for seq in sorted(set(seqs)):
        sealer.seq = seq - 1
        frames[seq] = sealer.seal(b"%d" % seq, NOW)
    seen: set[int] = set()
    for seq in seqs:
        highest = max(seen, default=0)
        fresh = seq not in seen and seq > highest - window
        try:
            opener.open(frames[seq], NOW)
            accepted = True
        except SealError as exc:
            assert exc.reason == "replay"
            accepted = False
        assert accepted == fresh
        if accepted:
            seen.add(seq)


# Routes and streams


def test_a_frame_opens_only_on_the_route_it_was_sealed_for() -> None:
    keyring = Keyring(KEY_A)
    frame = make_sealer(keyring).seal(b"x" * 100, NOW, ROUTE_ENVELOPE)
    opener = Opener(keyring)
    assert reason_of_route(opener, frame, ROUTE_BLOB_PUSH) == "decrypt_failed"
    assert opener.open(frame, NOW, ROUTE_ENVELOPE) == b"x" * 100  # the failure changed nothing


def reason_of_route(opener: Opener, frame: bytes, route: bytes) -> str:
    with pytest.raises(SealError) as info:
        opener.open(frame, NOW, route)
    return info.value.reason


def test_check_prefix_refuses_strangers_from_seven_bytes() -> None:
    opener = Opener(Keyring(KEY_A))
    opener.check_prefix(b"GV\x02" + key_id_of(KEY_A))
    for prefix, reason in [
        (b"GV\x02" + key_id_of(KEY_B), "unknown_key"),
        (b"XX\x02" + key_id_of(KEY_A), "bad_magic"),
        (b"GV\x01" + key_id_of(KEY_A), "bad_version"),
        (b"GV", "too_short"),
    ]:
        with pytest.raises(SealError, match=reason):
            opener.check_prefix(prefix)
    assert sum(opener.rejected.values()) == 4 and opener.accepted == 0


def _open_whole(opener: Opener, stream: bytes, route: bytes, max_size: int) -> bytes:
    opening = opener.open_stream(stream[:STREAM_HEAD_BYTES], NOW, route, max_size)
    rest, plain = stream[STREAM_HEAD_BYTES:], b""
    while size := opening.next_chunk_bytes:
        plain += opening.open_chunk(rest[:size])
        rest = rest[size:]
    assert rest == b""
    return plain


@pytest.mark.parametrize("size", [0, 1, STREAM_CHUNK, STREAM_CHUNK + 1, 3 * STREAM_CHUNK - 5])
def test_streams_round_trip_chunk_by_chunk(size: int) -> None:
    keyring = Keyring(KEY_A)
    data = bytes(i % 251 for i in range(size))
    stream = make_sealer(keyring).seal_stream(data, NOW, ROUTE_BLOB_PUSH)
    assert len(stream) == stream_bytes(size)
    assert _open_whole(Opener(keyring), stream, ROUTE_BLOB_PUSH, size) == data


def test_a_stream_is_refused_at_its_head_when_too_long_replayed_or_on_another_route() -> None:
    keyring = Keyring(KEY_A)
    stream = make_sealer(keyring).seal_stream(b"d" * 1000, NOW, ROUTE_BLOB_PUSH)
    head = stream[:STREAM_HEAD_BYTES]
    opener = Opener(keyring)
    for route, max_size, reason in [
        (ROUTE_BLOB_GET, 1000, "decrypt_failed"),
        (ROUTE_BLOB_PUSH, 999, "too_large"),
    ]:
        with pytest.raises(SealError, match=reason):
            opener.open_stream(head, NOW, route, max_size)
    assert opener.senders == 0  # refused heads do not touch the replay windows
    opener.open_stream(head, NOW, ROUTE_BLOB_PUSH, 1000)
    with pytest.raises(SealError, match="replay"):
        opener.open_stream(head, NOW, ROUTE_BLOB_PUSH, 1000)


def test_stream_chunks_cannot_be_reordered_or_forged() -> None:
    keyring = Keyring(KEY_A)
    sealer = make_sealer(keyring)
    data = bytes(range(256)) * (2 * STREAM_CHUNK // 256)
    stream = sealer.seal_stream(data, NOW, ROUTE_BLOB_PUSH)
    chunk = STREAM_CHUNK + TAG_BYTES
    first = stream[STREAM_HEAD_BYTES : STREAM_HEAD_BYTES + chunk]
    second = stream[STREAM_HEAD_BYTES + chunk :]
    opener = Opener(keyring)
    opening = opener.open_stream(stream[:STREAM_HEAD_BYTES], NOW, ROUTE_BLOB_PUSH, len(data))
    with pytest.raises(SealError, match="decrypt_failed"):
        opening.open_chunk(second)  # the second chunk in the first place
    flipped = bytearray(first)
    flipped[10] ^= 1
    with pytest.raises(SealError, match="decrypt_failed"):
        opening.open_chunk(bytes(flipped))
    assert opening.open_chunk(first) == data[:STREAM_CHUNK]
    assert opener.rejected == {"decrypt_failed": 2}
