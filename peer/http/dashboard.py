"""The web dashboard: GET / (the page, and the login of a browser) and GET /dashboard/{asset}.

A browser cannot add a bearer header to a page load, so it is let in as Jupyter does:
`grapevine agent` prints a login URL at start, `http://<api>/?token=<code>`; visiting it sets
the session cookie (`peer.http.guard.session_value`) and redirects to `/`, so the code does not
stay in the address bar, the history or a Referer. The page then reads the API with that
cookie, like any client (docs/dashboard.md).

Invariants:
- The code of the printed URL is random, held in memory only, and valid once; `?token=` also
  takes the API token itself (for a peer started before, or a second browser). Both compare
  in constant time; a wrong or spent one sets nothing.
- Without a session, `/` answers only a page saying how to get in (401), never data; every
  other dashboard path (the assets) is guarded like the API (`peer.http.guard`). Reached
  from another site, that page reloads itself once from this origin, so a browser holding
  the (SameSite=Strict) cookie gets in.
- The cookie is HttpOnly (the page's script cannot read it), SameSite=Strict (no other site's
  request carries it) and Path=/; it authorizes safe requests only (the guard's rule).
- Every dashboard answer forbids framing and other origins' scripts, styles and connections
  (Content-Security-Policy), and the page is never cached.
"""

from __future__ import annotations

import hmac
import html
import secrets
from importlib import resources
from typing import Final

from aiohttp import web

from peer.http.guard import REALM, RequestGuard, session_value
from peer.runtime.serving import trust_connection

ASSETS: Final = {
    "app.js": "text/javascript",
    "style.css": "text/css",
}
"""The assets served under /dashboard/, by file name, with their content types."""
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOGIN_CODE_BYTES = 32


def static_file(name: str) -> bytes:
    """The bytes of the packaged asset `name` (peer/dashboard/static/)."""
    return resources.files("peer.dashboard").joinpath("static", name).read_bytes()


def browser_host(address: str) -> str:
    """The "host:port" a browser on this machine uses for an API listening on `address`.

    A wildcard address is not one a browser can connect to: it is reached on loopback.
    """
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if host in ("[::]", "::"):
        return f"[::1]:{port}"
    return address


class DashboardApi:
    """The dashboard's routes of one peer.

    Args:
        guard: the API's guard (its token's session value and cookie name).
        token: the API token (`?token=` takes it as well as the login code).
    """

    def __init__(self, guard: RequestGuard, token: str) -> None:
        self.guard = guard
        self._token = token
        self._session = session_value(token)
        self._login_code: str | None = secrets.token_urlsafe(LOGIN_CODE_BYTES)
        self._page = static_file("index.html")
        self._assets = {name: static_file(name) for name in ASSETS}
        guard.open_paths = guard.open_paths | {"/"}

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.get("/", self._index), web.get("/dashboard/{asset}", self._asset)]

    def login_url(self, address: str) -> str | None:
        """The one-time login URL of the API at `address`, or None once it was used."""
        if self._login_code is None:
            return None
        return f"http://{browser_host(address)}/?token={self._login_code}"

    async def _index(self, request: web.Request) -> web.Response:
        given = request.query.get("token")
        if given is not None:
            return self._login(request, given)
        if not self.guard.authorized(request):
            return _how_to_get_in(request, "")
        response = web.Response(body=self._page, content_type="text/html", charset="utf-8")
        return _hardened(response)

    def _login(self, request: web.Request, given: str) -> web.Response:
        if not self._accepts(given):
            reason = "That link's token is not valid here (a login link works once)."
            return _how_to_get_in(request, reason)
        trust_connection(request)
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(
            self.guard.cookie, self._session, path="/", httponly=True, samesite="Strict"
        )
        return _hardened(response)

    def _accepts(self, given: str) -> bool:
        data = given.encode("utf-8", errors="surrogatepass")
        code = self._login_code
        if code is not None and hmac.compare_digest(data, code.encode("ascii")):
            self._login_code = None
            return True
        return hmac.compare_digest(data, self._token.encode("ascii"))

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["asset"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        response = web.Response(body=self._assets[name], content_type=ASSETS[name])
        return _hardened(response)


def _hardened(response: web.Response) -> web.Response:
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-store"
    return response


def _how_to_get_in(request: web.Request, reason: str) -> web.Response:
    host = html.escape(request.host)
    note = f"<p><strong>{html.escape(reason)}</strong></p>" if reason else ""
    # A SameSite=Strict cookie is not sent on a navigation started by another site (a link
    # in a web mail, or the redirect after a login link opened from one): load the page
    # again from here, which sends it if the browser holds it.
    again = request.headers.get("Sec-Fetch-Site") == "cross-site" and not reason
    refresh = '<meta http-equiv="refresh" content="0">\n' if again else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{refresh}<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Grapevine: sign in</title></head>
<body>
<h1>Grapevine dashboard</h1>{note}
<p>This peer's dashboard needs its API token. Open the link <code>grapevine agent</code>
printed when it started (<code>http://{host}/?token=…</code>; each such link works once), or
<code>http://{host}/?token=TOKEN</code> with the API token: the operator's
<code>--api-token-file</code>, or else the peer's own in <code>DATA_DIR/api.token</code>.</p>
</body></html>
"""
    response = web.Response(status=401, text=body, content_type="text/html")
    response.headers["WWW-Authenticate"] = REALM
    return _hardened(response)
