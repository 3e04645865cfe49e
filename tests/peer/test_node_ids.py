"""The text form of node ids (peer/node_ids.py), shared by the API and the command line."""

from __future__ import annotations

import hashlib

import pytest

from peer import node_ids
from peer.node_ids import NODE_ID_CHARS, node_id_from_text, node_id_text

ID = hashlib.sha256(b"a member").digest()


def test_an_id_round_trips_in_any_case_and_with_blanks() -> None:
    text = node_id_text(ID)
    assert len(text) == NODE_ID_CHARS and text == text.lower()
    assert node_id_from_text(text) == ID
    assert node_id_from_text(f"  {text.upper()}\n") == ID


@pytest.mark.parametrize(
    "text",
    [
        "",
        node_id_text(ID)[:-1],  # one character short
        node_id_text(ID) + "a",  # one too many
        "0" * NODE_ID_CHARS,  # not base32 letters
        "é" * NODE_ID_CHARS,
        node_id_text(ID)[:-1] + "7",  # the last character's unused bits set: not our form
    ],
    ids=["empty", "short", "long", "digits", "accents", "non-canonical"],
)
def test_what_is_not_an_id_is_none(text: str) -> None:
    assert node_id_from_text(text) is None


def test_texts_made_are_kept_within_a_bound_and_any_bytes_like_id_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(node_ids, "_TEXTS", {})
    monkeypatch.setattr(node_ids, "_TEXTS_KEPT", 3)
    ids = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    texts = [node_id_text(i) for i in ids]
    assert [node_id_text(i) for i in ids] == texts  # the same answer, kept or made again
    assert len(node_ids._TEXTS) <= 3
    assert node_id_text(bytearray(ids[0])) == texts[0]  # not hashable: made, not kept
    assert all(node_id_from_text(t) == i for t, i in zip(texts, ids, strict=True))
