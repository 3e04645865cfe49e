"""Network keys and keyrings: key text, key and network ids, validation, keyring files."""

from __future__ import annotations

import base64

import pytest

from peer.runtime.keyring import (
    KEY_BYTES,
    Keyring,
    decode_key,
    dump_keyring_text,
    encode_key,
    generate_network_key,
    key_id_of,
    load_keyring_text,
    network_id_of,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


# Keys


def test_generated_keys_are_random_and_encode_round_trip() -> None:
    first, second = generate_network_key(), generate_network_key()
    assert len(first) == KEY_BYTES and first != second
    assert decode_key(encode_key(first)) == first
    assert decode_key(f"  {encode_key(first)}\n") == first


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
        (base64.b64encode(bytes(33)).decode(), "decodes to 33 bytes"),
        ("", "decodes to 0 bytes"),
        ("é" * 44, "not valid base64"),
    ],
)
def test_decode_key_rejects_bad_text_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_key(text)


def test_encode_key_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encode_key(bytes(31))


def test_network_id_is_domain_separated_and_16_bytes() -> None:
    assert len(network_id_of(KEY_A)) == 16
    assert network_id_of(KEY_A) != network_id_of(KEY_B)
    assert network_id_of(KEY_A) != key_id_of(KEY_A)[:16]
    assert Keyring(KEY_A).network_id == network_id_of(KEY_A)


# Keyrings


def test_keyring_validation() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Keyring(bytes(31))
    with pytest.raises(ValueError, match="32 bytes"):
        Keyring(KEY_A, [bytes(5)])
    with pytest.raises(ValueError, match="16 bytes"):
        Keyring(KEY_A, network_id=bytes(8))
    assert Keyring(KEY_A, [KEY_A, KEY_B, KEY_B]).accepted == (KEY_B,)


def test_keyring_repr_hides_keys() -> None:
    text = repr(Keyring(KEY_A, [KEY_B]))
    assert encode_key(KEY_A) not in text and KEY_A.hex() not in text
    assert key_id_of(KEY_A).hex() in text


# Keyring files


def test_keyring_text_round_trip() -> None:
    keyring = Keyring(KEY_A).rotate(KEY_B).rotate(bytes(32))
    text = dump_keyring_text(keyring)
    assert load_keyring_text(text) == keyring
    assert text.splitlines()[0] == f"network {network_id_of(KEY_A).hex()}"


def test_keygen_output_is_a_keyring() -> None:
    keyring = load_keyring_text(encode_key(KEY_A) + "\n")
    assert keyring == Keyring(KEY_A)


def test_keyring_text_with_comments_and_without_network() -> None:
    text = f"# rotated 2024-05\n\nprimary {encode_key(KEY_B)}\naccepted {encode_key(KEY_A)}\n"
    assert load_keyring_text(text) == Keyring(KEY_B, [KEY_A])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("not-a-key\n", "line 1: .*not valid base64"),
        (f"accepted {encode_key(KEY_A)}\n", "no 'primary"),
        (f"primary {encode_key(KEY_A)}\nprimary {encode_key(KEY_B)}\n", "line 2: a second"),
        (f"primary {encode_key(KEY_A)}\nsecondary {encode_key(KEY_B)}\n", "unknown field"),
        (f"primary {encode_key(KEY_A)} extra\n", "line 1: expected '<field> <value>'"),
        (f"primary {encode_key(KEY_A)}\naccepted YWJj\n", "line 2: .*decodes to 3 bytes"),
        (f"network zz\nprimary {encode_key(KEY_A)}\n", "line 1: network id is not hex"),
        (f"network abcd\nprimary {encode_key(KEY_A)}\n", "32 hex digits"),
        (f"network {'00' * 16}\nnetwork {'00' * 16}\nprimary {encode_key(KEY_A)}\n", "second"),
    ],
)
def test_bad_keyring_files_fail_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_keyring_text(text)
