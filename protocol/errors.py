"""The two kinds of protocol error, split as h11 splits them.

`LocalProtocolError` is the caller's fault (misuse of the API) and is raised to the caller.
`RemoteProtocolError` is a peer's fault (bad bytes, bad signature); the codec raises it and the
node converts it into a `Dropped` notification at the boundary, leaving state unchanged.
"""

from __future__ import annotations


class LocalProtocolError(Exception):
    """The local caller used the protocol API incorrectly."""


class RemoteProtocolError(Exception):
    """A peer sent input that violates the protocol; the input is dropped, state unchanged."""
