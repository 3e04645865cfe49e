"""The errors of the API client (`peer.client`), apart from it so that its HTTP layer
(`peer.client_http`) raises them too without an import cycle.

Invariants:
- `ClientError`: the peer could not be reached or did not answer HTTP/JSON; `ApiError`: it
  answered an error status (RFC 9457 problem details when it sent them); both are
  `GrapevineError`s. `WrongPort` is the `ClientError` of an address that is a peer's gossip
  port, not its API.
- Standard library only, and cheap to import.
"""

from __future__ import annotations

import json

DEFAULT_API = "127.0.0.1:8946"
"""Where `grapevine agent` serves its API unless told otherwise (`--api`)."""


class GrapevineError(Exception):
    """Base of the errors this client raises."""


class ClientError(GrapevineError):
    """The peer's API could not be reached, or its answer was not valid HTTP/JSON.

    Attributes:
        api: the address the client was talking to, as given (e.g. "127.0.0.1:8946").
        reason: a short lowercase cause, e.g. "connection refused" or "timed out".
    """

    def __init__(self, api: str, reason: str) -> None:
        super().__init__(f"cannot reach the peer API at {api} ({reason})")
        self.api = api
        self.reason = reason


class WrongPort(ClientError):
    """The address is a peer's gossip port (`grapevine agent --bind`), not its API (`--api`)."""

    def __init__(self, api: str) -> None:
        super().__init__(api, "a gossip port, not the API")

    def __str__(self) -> str:
        return (
            f"{self.api} is a peer's gossip port (its --bind address), not its API; the API is "
            f"the address `grapevine agent` printed as (api ...): {DEFAULT_API} unless its "
            "--api said otherwise"
        )


class ApiError(GrapevineError):
    """The peer answered with an error status and (usually) RFC 9457 problem details.

    Attributes:
        status: the HTTP status code.
        title: the problem's short summary (the reason phrase when the body had none).
        detail: the problem's explanation; may be empty.
    """

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.status = status
        self.title = title
        self.detail = detail


def api_error(status: int, reason: str, body: str) -> ApiError:
    """The `ApiError` for an error answer: its RFC 9457 problem details when the body holds
    them, else the reason phrase and the start of the body."""
    title = reason or f"HTTP {status}"
    detail = ""
    try:
        problem = json.loads(body)
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        title = str(problem.get("title") or title)
        detail = str(problem.get("detail") or "")
    elif body.strip():
        detail = body.strip()[:200]
    return ApiError(status, title, detail)
