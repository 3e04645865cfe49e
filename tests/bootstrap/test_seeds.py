"""Seed parsing and resolution: ports, IPv6, several records per name, dedup, failures."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from bootstrap.seeds import Seed, parse_seed, parse_seeds, resolve_seed, resolve_seeds


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("seed.example.org:7000", "seed.example.org", 7000),
        ("seed.example.org", "seed.example.org", 7946),
        ("10.0.0.1", "10.0.0.1", 7946),
        ("10.0.0.1:1", "10.0.0.1", 1),
        ("[::1]:7946", "::1", 7946),
        ("[fe80::1]", "fe80::1", 7946),
        ("::1", "::1", 7946),
        ("  localhost:8000 ", "localhost", 8000),
    ],
)
def test_parse(text: str, host: str, port: int) -> None:
    assert parse_seed(text) == Seed(host, port)


def test_str_brackets_ipv6() -> None:
    assert str(parse_seed("[::1]:9")) == "[::1]:9" and str(parse_seed("a:9")) == "a:9"
    assert parse_seed("::1").is_literal and not parse_seed("a.b").is_literal


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("host:", "port ''"),
        ("host:0", "port '0'"),
        ("host:65536", "port '65536'"),
        ("host:http", "port 'http'"),
        ("[::1", "matching ']'"),
        ("[::1]x", "':port'"),
        ("[example.org]:1", "not an IPv6"),
        ("1:2:3", "[addr]:port"),
        ("bad host:1", "not a host name"),
        ("-x.org", "not a host name"),
    ],
)
def test_parse_refuses_clearly(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_seed(text)
    assert why in str(info.value)
    if text:
        assert repr(text) in str(info.value)


def test_parse_seeds_dedups() -> None:
    assert parse_seeds(["a", "a:7946", "b"]) == [Seed("a", 7946), Seed("b", 7946)]


def _info(family: socket.AddressFamily, ip: str, port: int) -> tuple[Any, ...]:
    sockaddr = (ip, port) if family == socket.AF_INET else (ip, port, 0, 0)
    return (family, socket.SOCK_STREAM, 6, "", sockaddr)


async def test_a_name_with_several_records_is_several_addresses_once_each() -> None:
    async def fake(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        assert host == "seeds.example.org"
        return [
            _info(socket.AF_INET, "10.0.0.1", port),
            _info(socket.AF_INET, "10.0.0.2", port),
            _info(socket.AF_INET, "10.0.0.1", port),
            _info(socket.AF_INET6, "fe80::1%eth0", port),
        ]

    got = await resolve_seed(Seed("seeds.example.org", 7946), fake)
    assert got == ["10.0.0.1:7946", "10.0.0.2:7946", "[fe80::1]:7946"]


async def test_localhost_resolves_for_real_without_duplicates() -> None:
    got = await resolve_seed(Seed("localhost", 7946))
    assert "127.0.0.1:7946" in got
    assert len(got) == len(set(got))
    assert await resolve_seed(Seed("::1", 5)) == ["[::1]:5"]


async def test_resolve_seeds_reports_failures_and_keeps_the_rest() -> None:
    async def fake(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        if host == "gone.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [_info(socket.AF_INET, "10.0.0.9", port)]

    got = await resolve_seeds([Seed("gone.example", 1), Seed("a", 2), Seed("b", 2)], fake)
    assert got.addresses == ["10.0.0.9:2"]
    assert got.failures == {"gone.example:1": "does not resolve: name or service not known"}
