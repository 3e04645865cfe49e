"""How a refused envelope is put in words (`peer.runtime.transport.refusal_reason`): what the
join report and `grapevine join` say about a seed that answered but refused us."""

from __future__ import annotations

import pytest

from peer.runtime.transport import refusal_reason

KEY = "it refused our network key: it belongs to another network, or has not installed ours"


@pytest.mark.parametrize(
    ("status", "answer", "said"),
    [
        (403, b"unknown_key\n", KEY),
        (403, b"decrypt_failed\n", KEY),
        (403, b"stale_timestamp\n", "it refused our clock: the two machines' clocks differ"),
        (403, b"future_timestamp\n", "it refused our clock: the two machines' clocks differ"),
        (403, b"replay\n", "HTTP 403 (replay)"),
        (
            401,
            b'{"title": "Unauthorized"}',
            "HTTP 401: not a peer's gossip port (is it a peer's API",
        ),
        (404, b"404: Not Found", "HTTP 404: not a peer's gossip port"),
        (503, b"busy\n", "HTTP 503 (busy)"),
        (500, b"<html>oops</html>", "HTTP 500"),
    ],
)
def test_refusals_are_put_in_words(status: int, answer: bytes, said: str) -> None:
    assert refusal_reason(status, answer).startswith(said)
