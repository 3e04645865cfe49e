"""Serving an aiohttp application on one TCP address: the one place the runner is set up.

The peer serves two applications (the sealed transport and the local API) with the same
lifecycle: set up a runner, bind one site, read back the port the OS picked for port 0, and
clean up the runner if binding fails so no half-started server is left behind.
"""

from __future__ import annotations

from aiohttp import web

SHUTDOWN_TIMEOUT = 1.0
"""Seconds in-flight requests get to finish when a server stops."""


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on (host, port).

    Returns:
        The running runner (call `cleanup()` to stop) and the bound port (the OS's choice when
        `port` is 0).

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


def host_port(host: str, port: int) -> str:
    """The address as "host:port", with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
