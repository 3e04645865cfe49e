"""Seed addresses: parsing "host:port" strings and resolving them to every address they name.

Invariants:
- `parse_seed` accepts "host:port", "[v6]:port", a bare host or a bare IPv6 literal (the
  default port then applies), and raises `ValueError` naming the input for anything else.
- Resolution returns every A and AAAA record of a name, in resolver order, each once, as
  "ip:port" ("[v6]:port" for IPv6) — the form peers advertise and the transport dials. A DNS
  name with several records is several seeds, so one dead record does not block a join.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_PORT = 7946

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$"
)

GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]


@dataclass(frozen=True, slots=True)
class Seed:
    """A seed as configured: a host (name or IP literal, IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)

    @property
    def is_literal(self) -> bool:
        """True if `host` is an IP address, which never needs re-resolving."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def format_address(host: str, port: int) -> str:
    """Return "host:port", bracketing IPv6 literals ("[::1]:7946")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_seed(text: str, default_port: int = DEFAULT_PORT) -> Seed:
    """Parse one seed address.

    Args:
        text: "host:port", "[v6]:port", "host", "v6" or "[v6]".
        default_port: the port used when `text` names none.

    Returns:
        The seed.

    Raises:
        ValueError: the text is not an address; the message quotes it and says why.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("seed address is empty; expected host:port, e.g. seed.example.org:7946")
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep:
            raise ValueError(f"seed {text!r}: '[' without a matching ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"seed {text!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else None
        if not _is_ipv6(host):
            raise ValueError(f"seed {text!r}: {host!r} in brackets is not an IPv6 address")
    elif raw.count(":") > 1:
        if not _is_ipv6(raw):
            raise ValueError(f"seed {text!r}: not host:port; write IPv6 addresses as [addr]:port")
        host, port_text = raw, None
    else:
        host, sep, port_part = raw.partition(":")
        port_text = port_part if sep else None
        if not _HOSTNAME.match(host) and not _is_ipv4(host):
            raise ValueError(f"seed {text!r}: {host!r} is not a host name or IP address")
    return Seed(host, _port(text, port_text, default_port))


def parse_seeds(texts: Sequence[str], default_port: int = DEFAULT_PORT) -> list[Seed]:
    """Parse several seeds, dropping duplicates (order kept).

    Raises:
        ValueError: one of them is not an address.
    """
    seeds: list[Seed] = []
    for text in texts:
        seed = parse_seed(text, default_port)
        if seed not in seeds:
            seeds.append(seed)
    return seeds


async def resolve_seed(seed: Seed, getaddrinfo: GetAddrInfo | None = None) -> list[str]:
    """Return every address `seed` names, as "ip:port", each once.

    Raises:
        OSError: the name does not resolve (`socket.gaierror`).
    """
    lookup = getaddrinfo or asyncio.get_running_loop().getaddrinfo
    infos = await lookup(seed.host, seed.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[str] = []
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = format_address(str(sockaddr[0]).partition("%")[0], int(sockaddr[1]))
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True, slots=True)
class Resolved:
    """The result of resolving several seeds."""

    addresses: list[str]
    """Every address found, each once, in seed order."""
    failures: dict[str, str]
    """Seeds that did not resolve, with the resolver's reason."""


async def resolve_seeds(seeds: Sequence[Seed], getaddrinfo: GetAddrInfo | None = None) -> Resolved:
    """Resolve every seed concurrently; a name that fails is reported, not raised."""
    results = await asyncio.gather(
        *(resolve_seed(seed, getaddrinfo) for seed in seeds), return_exceptions=True
    )
    addresses: list[str] = []
    failures: dict[str, str] = {}
    for seed, result in zip(seeds, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, OSError):
                raise result
            failures[str(seed)] = _resolve_reason(result)
            continue
        addresses += [a for a in result if a not in addresses]
    return Resolved(addresses, failures)


def _resolve_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"does not resolve: {exc.strerror or exc}".lower()
    return str(exc) or type(exc).__name__


def _port(text: str, port_text: str | None, default_port: int) -> int:
    if port_text is None:
        return default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"seed {text!r}: port {port_text!r} is not a number from 1 to 65535")
    return int(port_text)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False
