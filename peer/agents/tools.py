"""The tools an agent's model may call, their JSON schemas, and the workspace jail.

Invariants:
- A tool is a Python callable; its schema (litellm/OpenAI "function" format) is generated
  by pydantic from its type hints (any type pydantic describes: str, numbers, bool, lists,
  dicts, Optional, Literal, enums, nested pydantic models and dataclasses) and from its
  docstring (first line: the description; an "Args:" section: each parameter's), so schema
  and code never disagree. A keyword-only `context` parameter receives the `ToolContext` and
  is not shown to the model.
- The model's arguments are validated by the same pydantic model, strictly, as the JSON they
  came as (a string is not coerced to a number, 1 is not true); the tool receives the
  validated values (enum members, nested model instances). Schemas carry no "title" keys:
  they cost prompt tokens and tell the model nothing the names do not.
- Import-path tools ("package.module:function") are imported when the toolbox is built, so a
  typo fails at startup, not in the middle of a task.
- Calling a tool never raises (except cancellation): bad arguments, an unknown name or the
  tool's own exception become a result "error: ..." that the model reads and can act on.
  Sync tools run in a thread so they cannot stall the peer's event loop.
- `read_file` and `write_file` stay inside the workspace: relative paths only, no "..", no
  symbolic link followed at any step of the open, and no write to a file with other hard
  links (`peer.agents.jail`).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from pydantic_core import ErrorDetails

from peer.agents.jail import read_beneath, write_beneath
from peer.agents.spec import BUILTIN_TOOLS, is_import_path

MAX_FILE = 256 * 1024
"""Largest file `read_file` returns and `write_file` writes, in bytes."""
MAX_RESULT = 64 * 1024
"""Longest tool result given back to the model, in characters (longer ones are cut)."""

_JSON_TYPE_ERRORS = {
    "string_type": "string",
    "int_type": "integer",
    "float_type": "number",
    "bool_type": "boolean",
    "list_type": "array",
    "dict_type": "object",
    "model_type": "object",
    "dataclass_type": "object",
}
"""pydantic's error type for a value of the wrong JSON type -> the JSON type wanted."""
_VERBATIM_KEYS = frozenset({"default", "enum", "const", "examples"})
"""Schema keys whose values are data, not schemas (a "title" inside them is kept)."""
_ARG_LINE = re.compile(r"\s+(\w+)(?: \([^)]*\))?:\s*(.*)")


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What the built-in tools need from the running agent."""

    workspace: Path
    """The directory `read_file` and `write_file` are jailed in."""
    delegate: Callable[[str, str], Awaitable[str]]
    """delegate(role, request): run a child task, return its answer or a refusal."""
    spawn: Callable[[str, str, str], Awaitable[str]]
    """spawn(role, system, model): ask the network for a new agent, return the outcome."""


async def delegate(role: str, request: str, *, context: ToolContext) -> str:
    """Give part of the work to an agent of another role and wait for its answer.

    Args:
        role: the role that should do it, e.g. "researcher".
        request: what it should do, self-contained: it sees nothing else of this task.
    """
    return await context.delegate(role, request)


async def spawn_agent(role: str, system: str, model: str, *, context: ToolContext) -> str:
    """Start a new agent for a role somewhere in the network, where there is room.

    Args:
        role: the role the new agent serves.
        system: its system prompt.
        model: its litellm model string ("grapevine/offline" needs no network).
    """
    return await context.spawn(role, system, model)


def read_file(path: str, *, context: ToolContext) -> str:
    """Read a text file from the workspace.

    Args:
        path: relative to the workspace, e.g. "notes/plan.md".
    """
    return read_beneath(context.workspace, path, MAX_FILE).decode("utf-8", errors="replace")


def write_file(path: str, content: str, *, context: ToolContext) -> str:
    """Write a text file in the workspace (parent folders are created).

    Args:
        path: relative to the workspace, e.g. "notes/plan.md".
        content: the whole new content of the file.
    """
    data = content.encode("utf-8")
    if len(data) > MAX_FILE:
        limit = MAX_FILE // 1024
        raise ValueError(f"content is {len(data)} bytes, more than the {limit} KiB limit")
    write_beneath(context.workspace, path, data)
    return f"wrote {len(data)} bytes to {path}"


def final_answer(answer: str, *, context: ToolContext) -> str:
    """Finish the task with this answer (nothing after it runs).

    Args:
        answer: the complete answer to the request.
    """
    return answer


_BUILTINS: dict[str, Callable[..., Any]] = {
    "delegate": delegate,
    "spawn_agent": spawn_agent,
    "read_file": read_file,
    "write_file": write_file,
    "final_answer": final_answer,
}
CHILD_TOOLS = frozenset({"delegate", "spawn_agent"})
"""Built-ins that wait on child tasks (the runtime suspends the task around them)."""


@dataclass(frozen=True, slots=True)
class Tool:
    """One callable tool and the schema the model sees."""

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]
    arguments: type[pydantic.BaseModel]
    """The pydantic model of its parameters: the schema's source and the calls' validator."""
    wants_context: bool


class Toolbox:
    """The tools one agent may call.

    Args:
        tools: the tools, by name.
    """

    def __init__(self, tools: Sequence[Tool]) -> None:
        self.tools = {tool.name: tool for tool in tools}

    @classmethod
    def load(cls, names: Sequence[str]) -> Toolbox:
        """Build a toolbox from an `AgentSpec`'s tool names.

        Raises:
            ValueError: a name is neither a built-in nor an importable "module:function", a
                tool's signature has a parameter type a schema cannot express, or two tools
                share a name. The message names the tool.
        """
        tools: list[Tool] = []
        for name in names:
            if name in _BUILTINS:
                tool = describe(name, _BUILTINS[name])
            elif is_import_path(name):
                tool = describe(name.partition(":")[2], _import(name))
            else:
                raise ValueError(
                    f"tool {name!r}: neither a built-in ({', '.join(BUILTIN_TOOLS)}) nor a "
                    '"package.module:function" path'
                )
            if any(t.name == tool.name for t in tools):
                raise ValueError(f"tool {name!r}: another tool is already named {tool.name!r}")
            tools.append(tool)
        return cls(tools)

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """The tool schemas to pass with every model call."""
        return [tool.schema for tool in self.tools.values()]

    async def call(self, name: str, arguments: dict[str, Any], context: ToolContext) -> str:
        """Run one tool call; every failure becomes a result starting with "error: "."""
        tool = self.tools.get(name)
        if tool is None:
            return f"error: there is no tool {name!r} (tools: {', '.join(self.tools)})"
        try:
            kwargs = validate_arguments(tool, arguments)
        except ValueError as exc:
            return f"error: {name}: {exc}"
        if tool.wants_context:
            kwargs["context"] = context
        try:
            if inspect.iscoroutinefunction(tool.function):
                value = await tool.function(**kwargs)
            else:
                value = await asyncio.to_thread(tool.function, **kwargs)
        except Exception as exc:
            return f"error: {type(exc).__name__}: {exc}"[:MAX_RESULT]
        return _text(value)[:MAX_RESULT]


def describe(name: str, function: Callable[..., Any]) -> Tool:
    """The `Tool` for `function`, its schema generated by pydantic from the signature and
    docstring.

    Raises:
        ValueError: a parameter has no annotation or one pydantic cannot describe, or is
            variadic or keyword-only (other than `context`). The message names it.
    """
    try:
        hints = typing.get_type_hints(function)
    except Exception as exc:
        raise ValueError(f"tool {name!r}: cannot read its annotations ({exc})") from None
    doc = inspect.getdoc(function) or ""
    descriptions = _arg_descriptions(doc)
    fields: dict[str, Any] = {}
    wants_context = False
    for param in inspect.signature(function).parameters.values():
        if param.kind is param.KEYWORD_ONLY and param.name == "context":
            wants_context = True
            continue
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise ValueError(f"tool {name!r}: parameter {param.name!r} must be a named one")
        if param.name not in hints:
            raise ValueError(
                f"tool {name!r}: parameter {param.name!r} must be annotated with a type "
                "pydantic can describe (str, int, float, bool, list[str], Literal, an enum, a "
                "model, ...)"
            )
        annotation = hints[param.name]
        try:
            pydantic.TypeAdapter(annotation).json_schema()
        except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError) as exc:
            reason = str(exc).splitlines()[0]
            raise ValueError(
                f"tool {name!r}: parameter {param.name!r}: {annotation!r} has no JSON schema "
                f"({reason})"
            ) from None
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (
            annotation,
            pydantic.Field(default, description=descriptions.get(param.name)),
        )
    model = pydantic.create_model(
        f"{name}_arguments",
        __config__=pydantic.ConfigDict(extra="forbid", strict=True),
        **fields,
    )
    parameters = untitled(model.model_json_schema())
    parameters.setdefault("required", [])
    parameters.pop("additionalProperties", None)
    description = doc.splitlines()[0] if doc else name
    return Tool(
        name=name,
        function=function,
        schema={
            "type": "function",
            "function": {"name": name, "description": description, "parameters": parameters},
        },
        arguments=model,
        wants_context=wants_context,
    )


def validate_arguments(tool: Tool, arguments: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments to call `tool` with: the model's `arguments`, validated.

    Raises:
        ValueError: an argument is missing, unknown or of the wrong type; the message says
            which ("missing argument(s) text", "argument 'keep[0]' must be string, got int").
    """
    try:
        valid = tool.arguments.model_validate_json(json.dumps(arguments))
    except pydantic.ValidationError as exc:
        raise ValueError(_argument_errors(exc.errors(include_url=False))) from None
    return {key: getattr(valid, key) for key in type(valid).model_fields}


def untitled(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its "title" keywords (a property named "title" stays)."""

    def clean(value: Any) -> Any:
        if isinstance(value, list):
            return [clean(item) for item in value]
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "title":
                continue
            if key in ("properties", "$defs") and isinstance(item, dict):
                out[key] = {name: clean(sub) for name, sub in item.items()}
            elif key in _VERBATIM_KEYS:
                out[key] = item
            else:
                out[key] = clean(item)
        return out

    cleaned: dict[str, Any] = clean(schema)
    return cleaned


def _argument_errors(errors: Sequence[ErrorDetails]) -> str:
    """One message for pydantic's errors, missing and unknown arguments first, each as a list."""
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
    if missing:
        return f"missing argument(s) {', '.join(missing)}"
    if unknown:
        return f"unknown argument(s) {', '.join(sorted(unknown))}"
    parts = []
    for error in errors:
        where = _location(error["loc"])
        wanted = _JSON_TYPE_ERRORS.get(error["type"])
        if wanted is not None:
            parts.append(f"argument {where!r} must be {wanted}, got {_json_kind(error['input'])}")
        else:
            parts.append(f"argument {where!r}: {error['msg']}")
    return "; ".join(parts)


def _location(loc: tuple[int | str, ...]) -> str:
    text = str(loc[0])
    for step in loc[1:]:
        text += f"[{step}]" if isinstance(step, int) else f".{step}"
    return text


def _json_kind(value: object) -> str:
    names = {bool: "boolean", int: "int", float: "number", str: "string", list: "array"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return names.get(type(value), type(value).__name__)


def _import(path: str) -> Callable[..., Any]:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(
            f"tool {path!r}: cannot import {module_name} ({type(exc).__name__}: {exc})"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"tool {path!r}: {module_name} has no function {attribute!r}")
    return typing.cast(Callable[..., Any], function)


def _arg_descriptions(doc: str) -> dict[str, str]:
    descriptions: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args:
            if line and not line[0].isspace():
                break
            match = _ARG_LINE.fullmatch(line)
            if match:
                descriptions[match[1]] = match[2]
    return descriptions


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
