"""What a provider's error means to the model client: retry it, fail the call, or fail it as a
credential problem; and how long the provider asked the client to wait.

Invariants:
- Only litellm's exception types and HTTP status codes decide, never the message text.
- A rejected credential (HTTP 401 or 403) is a configuration problem: never retried, and not
  an outage (the provider answered), so it never counts against a breaker.
- `Retry-After` is read as seconds or an HTTP date (RFC 9110 §10.2.3), and `retry-after-ms`
  as milliseconds (OpenAI, Azure); a value that is neither, or that lies in the past, is no
  value.
- An error litellm wraps (a stream that failed midway, `MidStreamFallbackError`) is judged by
  its own type and status, a retryable one, but its wait is read from the provider's error it
  wraps: that one carries the response headers.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

CREDENTIAL_STATUSES = (401, 403)
"""HTTP statuses that mean the key is missing, wrong or not allowed this model."""


class ErrorKind(enum.Enum):
    """How the model client treats a failed attempt."""

    RETRY = "retry"
    """A provider outage or throttling (429, 5xx, connection, timeout): retry after a backoff;
    counts against the model's breaker."""
    FAIL = "fail"
    """The provider refused this request (bad request, unknown model, context window): fail
    the call at once; the provider is up."""
    CREDENTIAL = "credential"
    """The provider refused the key: fail the call at once and say which key; the provider
    is up."""


def classify(litellm: Any, exc: BaseException) -> ErrorKind:
    """The kind of a failed `litellm.acompletion` attempt.

    Args:
        litellm: the litellm module (its exception types).
        exc: what the attempt raised.
    """
    if isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError):
        return ErrorKind.CREDENTIAL
    if getattr(exc, "status_code", None) in CREDENTIAL_STATUSES:
        # litellm maps some providers' 403 to a plain APIError.
        return ErrorKind.CREDENTIAL
    retryable = (
        litellm.RateLimitError,
        litellm.APIConnectionError,
        litellm.Timeout,
        litellm.InternalServerError,
        litellm.ServiceUnavailableError,
        litellm.BadGatewayError,
    )
    return ErrorKind.RETRY if isinstance(exc, retryable) else ErrorKind.FAIL


def retry_after(exc: BaseException, wall_now: float) -> float | None:
    """Seconds the provider asked to wait before the next attempt, if it said.

    Args:
        exc: a litellm exception (its response headers are read).
        wall_now: the current Unix time, for a `Retry-After` given as an HTTP date.
    """
    headers = _headers(exc)
    if headers is None:
        return None
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    value = headers.get("retry-after")
    if not isinstance(value, str):
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    delay = when.timestamp() - wall_now
    return delay if delay > 0 else None


def _headers(exc: BaseException) -> Mapping[str, Any] | None:
    wrapped = getattr(exc, "original_exception", None)
    if isinstance(wrapped, BaseException) and wrapped is not exc:
        inner = _headers(wrapped)
        if inner is not None:
            return inner
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    if headers is None or not hasattr(headers, "get"):
        return None
    # httpx.Headers is case-insensitive; a plain dict from another provider may not be.
    if isinstance(headers, dict):
        return {str(key).lower(): value for key, value in headers.items()}
    return headers  # type: ignore[no-any-return]


def _number(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None
