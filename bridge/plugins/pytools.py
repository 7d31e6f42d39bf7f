"""Bridge-side tools: Python functions named in the configuration, run by the bridge itself.

`tools = ["mypkg.tools:get_weather"]` makes `get_weather` a tool of the owner
`bridge`, offered to the devices whose policy grants `bridge/get_weather`. Its
JSON Schema comes from the type hints (pydantic) and its descriptions from the
docstring (the first paragraph, and Google-style `Args:` lines), so a tool is
written once, as a plain function. The arguments the model sends are
validated against the same model before the function runs; a coroutine
function is awaited, a plain one runs in a small thread pool; either way it
has `timeout_ms` to answer.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import to_jsonable_python

from bridge.plugins.toolcalls import MAX_ERROR_CHARS, Outcome
from bridge.plugins.toolcards import (
    BRIDGE_OWNER,
    DEFAULT_TIMEOUT_MS,
    MAX_DESCRIPTION,
    NAME_RE,
    CardError,
    ToolSpec,
    check_parameters,
)

THREADS = 4
_ARG_LINE = re.compile(r"^\s{0,8}(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


class ToolLoadError(ValueError):
    """A configured tool that cannot be loaded; the message names it and says why."""


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The description (first paragraph) and the `Args:` descriptions of a docstring."""
    text = inspect.cleandoc(doc or "")
    paragraphs = re.split(r"\n\s*\n", text, maxsplit=1)
    summary = " ".join(paragraphs[0].split()) if text else ""
    if summary.lower().startswith(("args:", "arguments:", "parameters:")):
        summary = ""
    args: dict[str, str] = {}
    lines = text.splitlines()
    current: str | None = None
    inside = False
    for line in lines:
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            inside = True
            current = None
            continue
        if not inside:
            continue
        if not stripped:
            current = None
            continue
        if not line.startswith((" ", "\t")) and stripped.endswith(":"):
            inside = False  # the next section (Returns:, Raises:)
            continue
        m = _ARG_LINE.match(line)
        indent = len(line) - len(line.lstrip())
        if m and (current is None or indent <= 4):
            current = m.group(1).lstrip("*")
            args[current] = m.group(2).strip()
        elif current is not None:
            args[current] = f"{args[current]} {stripped}".strip()
    return summary, args


def _strip_titles(schema: Any) -> Any:
    """pydantic's schema without its generated `title`s (the model sees names already)."""
    if isinstance(schema, list):
        return [_strip_titles(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs") and isinstance(value, dict):
            out[key] = {name: _strip_titles(sub) for name, sub in value.items()}
        else:
            out[key] = _strip_titles(value)
    return out


@dataclass
class PyTool:
    """One bridge-side tool: its spec (owner `bridge`), the function, its arguments model."""

    spec: ToolSpec
    fn: Callable[..., Any]
    arguments: type[BaseModel]
    is_async: bool


def make_tool(fn: Callable[..., Any], timeout_ms: int = DEFAULT_TIMEOUT_MS) -> PyTool:
    """Describe a function as a tool (raises ToolLoadError when it cannot be one)."""
    name = getattr(fn, "__name__", "")
    if not NAME_RE.match(name):
        raise ToolLoadError(f"{name!r} is not a tool name (1-64 of A-Z a-z 0-9 _ -)")
    try:
        hints = get_type_hints(fn)
    except Exception as exc:
        raise ToolLoadError(f"{name}: its type hints cannot be read: {exc}") from None
    summary, arg_docs = parse_docstring(fn.__doc__)
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ToolLoadError(f"{name}: parameter {param.name} must be a named parameter")
        if param.name not in hints:
            raise ToolLoadError(f"{name}: parameter {param.name} needs a type hint")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (
            hints[param.name],
            Field(default, description=arg_docs.get(param.name)),
        )
    try:
        model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        schema = _strip_titles(model.model_json_schema())
    except Exception as exc:
        raise ToolLoadError(f"{name}: no JSON Schema for its parameters: {exc}") from None
    try:
        check_parameters(schema, f"{name} parameters")
    except CardError as exc:
        raise ToolLoadError(str(exc)) from None
    spec = ToolSpec(BRIDGE_OWNER, name, summary[:MAX_DESCRIPTION], schema, timeout_ms)
    return PyTool(spec, fn, model, inspect.iscoroutinefunction(fn))


def load_tool(ref: str, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> PyTool:
    """Import `package.module:function` and describe it as a tool."""
    module_name, colon, attr = ref.partition(":")
    if not colon or not module_name or not attr:
        raise ToolLoadError(f"tool {ref!r}: write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ToolLoadError(f"tool {ref!r}: cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ToolLoadError(f"tool {ref!r}: {module_name} has no function {attr}")
    return make_tool(fn, timeout_ms)


def load_tools(refs: list[str], timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[PyTool]:
    """Every configured tool; two with the same name are refused."""
    tools = [load_tool(ref, timeout_ms) for ref in refs]
    names = [t.spec.name for t in tools]
    for n in names:
        if names.count(n) > 1:
            raise ToolLoadError(f"two configured tools are named {n}")
    return tools


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown argument" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "bad arguments: " + "; ".join(parts)


class PyToolRunner:
    """Runs bridge-side tools: coroutines on the loop, plain functions in THREADS threads.

    A plain function that outlives its timeout keeps its thread until it
    returns (Python cannot stop a thread); its result is dropped, and with all
    threads taken later calls wait and time out instead of piling up threads.
    """

    def __init__(self, tools: list[PyTool]) -> None:
        self.tools = {t.spec.name: t for t in tools}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools.values()]

    async def run(self, name: str, arguments: dict[str, Any]) -> Outcome:
        tool = self.tools.get(name)
        if tool is None:
            return Outcome.failed(f"no bridge tool {name}")
        try:
            parsed = tool.arguments.model_validate(arguments)
        except ValidationError as exc:
            return Outcome.failed(_describe(exc))
        kwargs = {k: getattr(parsed, k) for k in type(parsed).model_fields}
        timeout = tool.spec.timeout_ms / 1000
        try:
            if tool.is_async:
                value = await asyncio.wait_for(tool.fn(**kwargs), timeout)
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="bridge-tool")
                loop = asyncio.get_running_loop()
                work = loop.run_in_executor(self._pool, functools.partial(tool.fn, **kwargs))
                value = await asyncio.wait_for(work, timeout)
        except TimeoutError:
            return Outcome.failed(f"{name} did not answer within {tool.spec.timeout_ms} ms")
        except Exception as exc:
            return Outcome.failed(f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        try:
            return Outcome.result(to_jsonable_python(value))
        except Exception as exc:
            return Outcome.failed(f"{name} returned something that is not JSON: {exc}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
