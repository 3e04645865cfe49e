"""Identity: node ids, domain- and network-separated signatures, the verified-digest cache."""

from __future__ import annotations

import hashlib

import pytest

from protocol.errors import LocalProtocolError
from protocol.identity import (
    DOMAIN_ALIVE,
    DOMAIN_LEAVE,
    NODE_ID_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Signer,
    VerifiedCache,
    node_id_of,
    short_id,
    signing_input,
)

NET = b"grapevine-test"


def signer(i: int = 0, network_id: bytes = NET) -> Signer:
    return Signer(hashlib.sha256(b"test key %d" % i).digest(), network_id)


def test_signer_exposes_its_identity() -> None:
    s = signer()
    assert len(s.public_key) == PUBLIC_KEY_BYTES
    assert s.node_id == node_id_of(s.public_key) == hashlib.sha256(s.public_key).digest()
    assert len(s.node_id) == NODE_ID_BYTES
    assert s.network_id == NET
    assert signer().public_key == s.public_key  # same key bytes, same identity
    assert signer(1).public_key != s.public_key


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_signer_rejects_bad_private_key_length(length: int) -> None:
    with pytest.raises(LocalProtocolError):
        Signer(b"\x01" * length, NET)


def test_sign_verify_round_trip() -> None:
    s = signer()
    sig = s.sign(DOMAIN_ALIVE, b"payload")
    assert len(sig) == SIGNATURE_BYTES
    assert VerifiedCache().verify(DOMAIN_ALIVE, NET, s.public_key, b"payload", sig)


def test_domain_separation() -> None:
    s = signer()
    sig = s.sign(DOMAIN_ALIVE, b"payload")
    assert not VerifiedCache().verify(DOMAIN_LEAVE, NET, s.public_key, b"payload", sig)


def test_network_separation() -> None:
    s = signer()
    sig = s.sign(DOMAIN_ALIVE, b"payload")
    assert not VerifiedCache().verify(DOMAIN_ALIVE, b"other-net", s.public_key, b"payload", sig)


def test_signing_input_is_unambiguous() -> None:
    # The length prefix keeps the network/payload boundary from sliding.
    assert signing_input(DOMAIN_ALIVE, b"ab", b"c") != signing_input(DOMAIN_ALIVE, b"a", b"bc")
    assert signing_input(DOMAIN_ALIVE, b"n", b"p") != signing_input(DOMAIN_LEAVE, b"n", b"p")


def test_wrong_key_fails() -> None:
    sig = signer(0).sign(DOMAIN_ALIVE, b"payload")
    assert not VerifiedCache().verify(DOMAIN_ALIVE, NET, signer(1).public_key, b"payload", sig)


def test_tampered_payload_fails() -> None:
    s = signer()
    sig = s.sign(DOMAIN_ALIVE, b"payload")
    assert not VerifiedCache().verify(DOMAIN_ALIVE, NET, s.public_key, b"payloaD", sig)


@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_tampered_signature_fails(index: int) -> None:
    s = signer()
    sig = bytearray(s.sign(DOMAIN_ALIVE, b"payload"))
    sig[index] ^= 0x01
    assert not VerifiedCache().verify(DOMAIN_ALIVE, NET, s.public_key, b"payload", bytes(sig))


@pytest.mark.parametrize(
    ("public_key", "sig"),
    [
        (b"", b"\x00" * 64),
        (b"\x00" * 31, b"\x00" * 64),
        (b"\x00" * 33, b"\x00" * 64),
        (None, b""),
        (None, b"\x00" * 63),
        (None, b"\x00" * 65),
        (b"\xff" * 32, b"\x00" * 64),  # 32 bytes but not a valid curve point
    ],
)
def test_malformed_keys_and_signatures_return_false(public_key: bytes | None, sig: bytes) -> None:
    key = signer().public_key if public_key is None else public_key
    cache = VerifiedCache()
    assert cache.verify(DOMAIN_ALIVE, NET, key, b"payload", sig) is False
    assert cache.failures == 1
    assert cache.verified == 0


def test_cache_counts_verifications_and_hits() -> None:
    s = signer()
    sig = s.sign(DOMAIN_ALIVE, b"payload")
    cache = VerifiedCache()
    assert cache.verify(DOMAIN_ALIVE, NET, s.public_key, b"payload", sig)
    assert (cache.verified, cache.hits, cache.failures) == (1, 0, 0)
    assert cache.verify(DOMAIN_ALIVE, NET, s.public_key, b"payload", sig)
    assert (cache.verified, cache.hits, cache.failures) == (1, 1, 0)


def test_cache_does_not_confuse_domains() -> None:
    s = signer()
    sig = s.sign(DOMAIN_ALIVE, b"payload")
    cache = VerifiedCache()
    assert cache.verify(DOMAIN_ALIVE, NET, s.public_key, b"payload", sig)
    assert not cache.verify(DOMAIN_LEAVE, NET, s.public_key, b"payload", sig)
    assert (cache.verified, cache.hits, cache.failures) == (1, 0, 1)


def test_cache_remembers_only_successes() -> None:
    s = signer()
    bad = bytes(64)
    cache = VerifiedCache()
    for _ in range(3):
        assert not cache.verify(DOMAIN_ALIVE, NET, s.public_key, b"payload", bad)
    assert (cache.verified, cache.hits, cache.failures) == (0, 0, 3)


def test_node_id_of_is_sha256() -> None:
    assert node_id_of(b"\x01" * 32) == hashlib.sha256(b"\x01" * 32).digest()


def test_short_id() -> None:
    assert short_id(bytes(32)) == "aaaaaaaaaa"
    nid = node_id_of(signer().public_key)
    assert len(short_id(nid)) == 10
    assert short_id(nid, 6) == short_id(nid)[:6]
    assert short_id(nid).isalnum() and short_id(nid) == short_id(nid).lower()
    assert short_id(node_id_of(signer(1).public_key)) != short_id(nid)


def test_cache_forgets_the_oldest_generation_and_keeps_what_is_hit() -> None:
    s = signer()
    sigs = {p: s.sign(DOMAIN_ALIVE, p) for p in (b"p0", b"p1", b"p2", b"p3")}
    cache = VerifiedCache(capacity=4)  # two generations of two digests

    def check(payload: bytes) -> tuple[int, int]:
        before = (cache.verified, cache.hits)
        assert cache.verify(DOMAIN_ALIVE, NET, s.public_key, payload, sigs[payload])
        return cache.verified - before[0], cache.hits - before[1]

    assert [check(p) for p in (b"p0", b"p1")] == [(1, 0), (1, 0)]
    assert check(b"p0") == (0, 1)  # in the older generation: a hit, and kept on
    assert check(b"p2") == (1, 0)  # the recent generation is full: p1's goes
    assert check(b"p0") == (0, 1)
    assert check(b"p1") == (1, 0)  # forgotten: verified again
    assert [check(p) for p in (b"p3", b"p2")] == [(1, 0), (1, 0)]  # p2 went with p0's turn
