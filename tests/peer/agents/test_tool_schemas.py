"""Tool schemas through pydantic: Optional, Literal, enums, nested models, defaults, and the
strict validation of the model's arguments against the same model (issue 13)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Literal

import pydantic

from peer.agents.tools import Toolbox, ToolContext, describe, untitled


class Depth(enum.Enum):
    SHALLOW = "shallow"
    DEEP = "deep"


class Source(pydantic.BaseModel):
    """Where a fact comes from."""

    url: str = pydantic.Field(description="the page")
    year: int | None = None


CALLS: list[tuple[Any, ...]] = []


def search(
    query: str,
    depth: Depth,
    lang: Literal["en", "fr"] = "en",
    limit: int | None = None,
    sources: list[Source] | None = None,
) -> str:
    """Search the archive.

    Args:
        query: what to look for.
        depth: how far to dig.
        lang: the language of the results.
        limit: at most this many results.
        sources: pages to start from.
    """
    CALLS.append((query, depth, lang, limit, sources))
    return f"{query}:{depth.value}:{lang}:{limit}:{len(sources or [])}"


def _context(tmp_path: Path) -> ToolContext:
    async def nothing(*args: str) -> str:
        return ""

    return ToolContext(tmp_path, nothing, nothing)


def test_schema_of_optional_literal_enum_and_nested_model() -> None:
    schema = describe("search", search).schema["function"]
    assert schema["description"] == "Search the archive."
    parameters = schema["parameters"]
    assert parameters["required"] == ["query", "depth"]
    properties = parameters["properties"]
    assert properties["query"] == {"type": "string", "description": "what to look for."}
    assert properties["depth"] == {"$ref": "#/$defs/Depth", "description": "how far to dig."}
    assert parameters["$defs"]["Depth"] == {"enum": ["shallow", "deep"], "type": "string"}
    assert properties["lang"] == {
        "enum": ["en", "fr"],
        "type": "string",
        "default": "en",
        "description": "the language of the results.",
    }
    assert properties["limit"] == {
        "anyOf": [{"type": "integer"}, {"type": "null"}],
        "default": None,
        "description": "at most this many results.",
    }
    assert parameters["$defs"]["Source"] == {
        "description": "Where a fact comes from.",
        "type": "object",
        "properties": {
            "url": {"type": "string", "description": "the page"},
            "year": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
        },
        "required": ["url"],
    }
    assert "title" not in str(parameters)


def test_a_property_named_title_is_kept() -> None:
    def note(title: str, body: str = "") -> str:
        """Write a note."""
        return title

    properties = describe("note", note).schema["function"]["parameters"]["properties"]
    assert properties == {"title": {"type": "string"}, "body": {"type": "string", "default": ""}}
    assert untitled({"default": {"title": "kept"}, "title": "x"}) == {"default": {"title": "kept"}}


async def test_calls_get_validated_values(tmp_path: Path) -> None:
    box = Toolbox([describe("search", search)])
    CALLS.clear()
    arguments = {"query": "bees", "depth": "deep", "sources": [{"url": "u", "year": 2020}]}
    assert await box.call("search", arguments, _context(tmp_path)) == "bees:deep:en:None:1"
    _, depth, lang, limit, sources = CALLS[0]
    assert depth is Depth.DEEP and lang == "en" and limit is None
    assert sources == [Source(url="u", year=2020)]


async def test_bad_arguments_say_what_is_wrong(tmp_path: Path) -> None:
    box = Toolbox([describe("search", search)])
    ctx = _context(tmp_path)
    CALLS.clear()
    bad_enum = await box.call("search", {"query": "q", "depth": "abyss"}, ctx)
    assert bad_enum.startswith("error: search: argument 'depth': Input should be 'shallow' or")
    bad_literal = await box.call("search", {"query": "q", "depth": "deep", "lang": "de"}, ctx)
    assert bad_literal.startswith("error: search: argument 'lang': Input should be 'en' or 'fr'")
    nested = await box.call("search", {"query": "q", "depth": "deep", "sources": [{"url": 3}]}, ctx)
    assert nested == "error: search: argument 'sources[0].url' must be string, got int"
    as_text = await box.call("search", {"query": "q", "depth": "deep", "limit": "3"}, ctx)
    assert as_text == "error: search: argument 'limit' must be integer, got string"
    assert CALLS == []
