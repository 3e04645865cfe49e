"""Who may call the local HTTP API, and what a request must look like before any handler runs.

A web page in the operator's browser can send requests to 127.0.0.1 (a "simple" cross-origin
POST, or a DNS name rebound to loopback); a process of another user on the machine can connect
too. `RequestGuard` turns both away before a handler reads anything, as Jupyter's token and
Host/Origin checks do; Serf's RPC auth key and Consul's ACL tokens are the same idea.

Invariants (checked in this order, for every route, unknown routes included):
- Host: the request's `Host` is the API's own address: the address of the socket it arrived
  on, plus `localhost`, `127.0.0.1` and `[::1]` when that socket is on loopback, plus the host
  name the API was started on; always with the API's port. Else 403 (DNS rebinding).
- Origin: a request with an `Origin` header comes from a web page; it is served only when the
  origin is the API's own (`http://` and an accepted Host). Else 403 (cross-site requests).
- Token: `Authorization: Bearer <token>` with the peer's token, compared in constant time;
  or, for a GET or HEAD only, the dashboard's session cookie (`session_cookie_name`, its value
  `session_value(token)`, set HttpOnly and SameSite=Strict by `peer.http.dashboard` once the
  browser showed the token). Else 401 with `WWW-Authenticate: Bearer` and a detail saying how
  to pass it; except that a browser's page load (GET with `Accept: text/html`) of an open path
  (`RequestGuard.open_paths`: the dashboard's page) goes to its handler, which answers how to
  get in. The cookie never authorizes a request that changes state: such a request from the
  page must carry the header, which a page of another site cannot add (no CSRF), and a page
  of another site never sends a SameSite=Strict cookie anyway.
- Body: a POST or PUT that carries a body says it is `application/json`. Else 415, so no
  browser form or "simple" cross-origin request (text/plain) reaches a handler with a body.
- Text: the path and every query parameter are valid UTF-8 once percent-decoded. Else 400
  naming the parameter (aiohttp would quietly replace the bad bytes).

Connections (`API_LIMITS`, enforced by `peer.runtime.serving`): the API holds at most 128
connections, 64 from one address. A connection becomes trusted once one of its requests
passed the token check (`trust_connection`); until then it is closed 10 s after it opened (so
a request head has 10 s), and it is the first closed when a new connection would exceed a cap.
A trusted connection waits at most 30 s for its next request head. So half-sent requests from
a process that does not hold the token, even on this machine (where every client's address is
127.0.0.1), cannot keep the operator's requests out. An authenticated request's body must have
arrived whole within `BODY_TIMEOUT` seconds, else 408.

Every refusal is counted by reason in `RequestGuard.refused` (the reasons are `API_REFUSALS`;
`GET /metrics` exports them as `grapevine_api_refusals_total{reason}`): connections refused or
closed over the caps, and requests turned away by a check above, cut off by the body deadline,
or answered 400 (a malformed body or parameter) or 413 (a body over its size limit) by a
handler. A request is counted once, under the first check it failed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
from collections import Counter
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote_to_bytes, urlsplit

from aiohttp import web

from peer.http.common import Handler, Problem, bad_request, problem_response
from peer.runtime.serving import CONNECTION_REFUSALS, ServerLimits, trust_connection

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
BODY_METHODS = ("POST", "PUT", "PATCH")
SAFE_METHODS = ("GET", "HEAD")
SESSION_LABEL = b"grapevine dashboard session v1"
JSON_TYPE = "application/json"
REALM = 'Bearer realm="grapevine"'
TOKEN_DETAIL = (
    "every request needs the header `Authorization: Bearer <token>`; the token is the "
    "operator's (--api-token-file of `grapevine agent`) or the peer's own, in "
    "<data_dir>/api.token. `grapevine` commands find it through --data-dir, --token-file or "
    "GRAPEVINE_API_TOKEN; the Python client takes GrapevineClient(api, token=...)"
)

API_LIMITS: Final = ServerLimits(
    max_connections=128, max_per_source=64, idle_timeout=30.0, linger=2.0, prove_within=10.0
)
"""The API server's connection caps. 128 connections in all keeps the API's descriptors with
the transport's 512 well under the usual limit of 1024; 64 from one address is room for a
busy local script plus followed event streams (every local client shares 127.0.0.1, so on
loopback this is the cap on all of them), while a remote source (an API beyond loopback) holds
at most half. 30 s idle is above the clients' 15 s keep-alive, so a pooled connection is closed
by its client first. 10 s to prove a connection is ample for a request head on any link, and
is how long a process without the token holds each of its connections."""
BODY_TIMEOUT: Final = 60.0
"""Seconds an authenticated request's body may take to arrive in all: the largest submission
(about 130 MB of JSON) at 2 MB/s. Shorter cuts a slow writer loose sooner; it can only be the
operator's own client, as the body is read after the token check."""
REQUEST_REFUSALS: Final = (
    "foreign_host",
    "foreign_origin",
    "token_missing",
    "token_wrong",
    "unsupported_media_type",
    "bad_request",
    "body_too_large",
    "body_timeout",
)
"""Why a request was refused, one per check: a `Host` not the API's (403), a foreign `Origin`
(403), no token or a wrong one (401), a body not typed JSON (415), a request a check or a
handler answered 400 or 413, a body that came too late (408)."""
API_REFUSALS: Final = CONNECTION_REFUSALS + REQUEST_REFUSALS
"""Every reason `RequestGuard.refused` counts (a fixed set: the metric's label values)."""
_STATUS_REFUSALS = {400: "bad_request", 413: "body_too_large"}
"""Answers of a handler (or of the text check) that count as refusals, by status."""


HOSTS_KEPT: Final = 64
"""Socket addresses whose accepted `Host` values a guard keeps (`RequestGuard._allowed_hosts`)."""


def address_form(host: str, port: int) -> str:
    """The "host:port" a client puts in `Host` for `host` (IPv6 bracketed), lowercase."""
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def own_hosts(local_ip: str, port: int, names: Iterable[str]) -> frozenset[str]:
    """The `Host` values that name an API reached on (`local_ip`, `port`).

    Args:
        local_ip: the address of the socket the request arrived on.
        port: the API's port.
        names: host names the API was started on (its `--api` host when it is a name).
    """
    hosts = {local_ip.split("%", 1)[0], *names}
    try:
        ip = ipaddress.ip_address(local_ip.split("%", 1)[0])
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is not None:
        hosts.add(ip.compressed)
        if ip.is_loopback:
            hosts.update(LOOPBACK_NAMES)
    forms = {address_form(host, port) for host in hosts}
    if port == 80:  # a client leaves the default port out of Host
        forms |= {form.rsplit(":", 1)[0] for form in forms}
    return frozenset(forms)


def session_cookie_name(port: int) -> str:
    """The dashboard's session cookie of the API on `port`.

    Browsers send a host's cookies to all its ports: one name per port keeps the sessions of
    two peers on one machine (each with its own token) apart.
    """
    return f"grapevine-session-{port}"


def session_value(token: str) -> str:
    """The session cookie's value for `token`: a MAC of a fixed label under the token.

    It stands for the token in safe requests only, so the cookie jar never holds the token
    itself; it stays valid while the token does (across restarts, at every peer sharing it).
    """
    mac = hmac.new(token.encode("ascii"), SESSION_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")


def forbidden(detail: str) -> Problem:
    """A 403 answer: the request came from somewhere the API does not serve."""
    return Problem(403, "Forbidden", detail)


class RequestGuard:
    """The checks of the module invariants for one peer's API (`middleware` runs them).

    Args:
        token: the peer's API token.
        body_timeout: seconds a request's body may take to arrive (see `BODY_TIMEOUT`).
    """

    def __init__(self, token: str, body_timeout: float = BODY_TIMEOUT) -> None:
        self._token = token.encode("ascii")
        self._session = session_value(token).encode("ascii")
        self.body_timeout = body_timeout
        self.cookie = ""
        """The name of the session cookie (`session_cookie_name` of the API's port; set by
        `PeerApi.start`, none accepted before)."""
        self.open_paths: frozenset[str] = frozenset()
        """Paths whose page loads reach their handler without a token (see the module)."""
        self.names: frozenset[str] = frozenset()
        """Host names the API was started on, accepted in `Host` besides its socket's address
        (set by `PeerApi.start`)."""
        self.refused: Counter[str] = Counter()
        """Connections and requests refused, by reason (one of `API_REFUSALS`)."""
        self._hosts: dict[tuple[str, int, frozenset[str]], frozenset[str]] = {}
        """`own_hosts` by socket address and names: parsing the address for every request was
        about 1% of a busy peer's CPU. An API listens on a few addresses, so this stays small
        (`HOSTS_KEPT` bounds it all the same)."""

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse `request` as the module invariants say, or else pass it to `handler`."""
        try:
            return await self._checked(request, handler)
        except Problem as exc:
            self._count_status(exc.status)
            raise
        except web.HTTPException as exc:
            self._count_status(exc.status)
            raise

    def _count_status(self, status: int) -> None:
        reason = _STATUS_REFUSALS.get(status)
        if reason is not None:
            self.refused[reason] += 1

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        allowed = self._allowed_hosts(request)
        host = request.headers.get("Host", "").strip().lower()
        if host not in allowed:
            self.refused["foreign_host"] += 1
            raise forbidden(
                f"Host {host[:100]!r} is not this API's address; use one of "
                f"{', '.join(sorted(allowed))}"
            )
        origin = request.headers.get("Origin")
        if origin is not None and not _own_origin(origin, allowed):
            self.refused["foreign_origin"] += 1
            raise forbidden(
                f"requests from web pages of other origins ({origin[:100]!r}) are refused"
            )
        if not self.authorized(request):
            if self._open_page_load(request):
                return await handler(request)
            missing = "Authorization" not in request.headers
            title = "the request carries no API token" if missing else "the API token is wrong"
            self.refused["token_missing" if missing else "token_wrong"] += 1
            return problem_response(
                401, "Unauthorized", f"{title}: {TOKEN_DETAIL}", {"WWW-Authenticate": REALM}
            )
        trust_connection(request)
        with_body = request.method in BODY_METHODS and request.body_exists
        if with_body and request.content_type != JSON_TYPE:
            self.refused["unsupported_media_type"] += 1
            raise Problem(
                415,
                "Unsupported Media Type",
                f"request bodies must be {JSON_TYPE}, got {request.content_type[:100]!r}",
            )
        check_url_text(request)
        if not with_body:
            return await handler(request)
        return await self._body_in_time(request, handler)

    async def _body_in_time(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Run `handler`, ending it with a 408 if the body has not all arrived in time."""
        arriving = True

        def arrived() -> None:
            if arriving:
                deadline.reschedule(None)

        try:
            async with asyncio.timeout(self.body_timeout) as deadline:
                request.content.on_eof(arrived)
                try:
                    return await handler(request)
                finally:
                    arriving = False
        except TimeoutError:
            if not deadline.expired():
                raise
            self.refused["body_timeout"] += 1
            raise Problem(
                408,
                "Request Timeout",
                f"the request body did not arrive within {self.body_timeout:g} s",
            ) from None

    def _allowed_hosts(self, request: web.Request) -> frozenset[str]:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname:
            return frozenset()
        key = (str(sockname[0]), int(sockname[1]), self.names)
        hosts = self._hosts.get(key)
        if hosts is None:
            if len(self._hosts) >= HOSTS_KEPT:
                self._hosts.clear()
            hosts = self._hosts[key] = own_hosts(*key)
        return hosts

    def authorized(self, request: web.Request) -> bool:
        """Whether `request` carries the token, or the session cookie in a safe request."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = credentials.strip().encode("utf-8", errors="surrogatepass")
            return hmac.compare_digest(given, self._token)
        return self.has_session(request)

    def has_session(self, request: web.Request) -> bool:
        """Whether `request` is safe (GET, HEAD) and carries the dashboard's session cookie."""
        if request.method not in SAFE_METHODS or not self.cookie:
            return False
        given = request.cookies.get(self.cookie, "").encode("utf-8", errors="surrogatepass")
        return hmac.compare_digest(given, self._session)

    def _open_page_load(self, request: web.Request) -> bool:
        return (
            request.method == "GET"
            and request.path in self.open_paths
            and "text/html" in request.headers.get("Accept", "")
        )


def _own_origin(origin: str, allowed: frozenset[str]) -> bool:
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    return parts.scheme == "http" and parts.netloc.lower() in allowed


def check_url_text(request: web.Request) -> None:
    """Refuse a path or query parameter that is not valid UTF-8 once percent-decoded.

    Raises:
        Problem: 400 naming the path or the query parameter.
    """
    try:
        unquote_to_bytes(request.raw_path.partition("?")[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the path is not valid UTF-8 once percent-decoded") from None
    for pair in request.rel_url.raw_query_string.split("&"):
        raw_name, _, raw_value = pair.partition("=")
        try:
            name = unquote_to_bytes(raw_name.replace("+", " ")).decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("a query parameter's name is not valid UTF-8") from None
        try:
            unquote_to_bytes(raw_value.replace("+", " ")).decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(f"query parameter {name!r} is not valid UTF-8") from None
