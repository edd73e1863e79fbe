"""Structured output and tools as the HTTP APIs ask for them, turned into models/constraint.py grammars and
models/tools.py prompts: OpenAI's `response_format`, Ollama's `format`, Anthropic's `output_config.format`;
OpenAI/Ollama `tools` (a function each) and OpenAI's `tool_choice`. Each protocol's module maps its own field
names onto these; a bad schema or tool is a GrammarError or ToolError (400 in the protocol's shape)."""

from __future__ import annotations

from typing import Any

from appliance.serving.fields import ToolError
from appliance.serving.state import ServerState
from models.tools import Tool, call_grammar


def schema_grammar(state: ServerState, schema: Any, strict: bool = True) -> str:
    return state.engine.grammars.json_schema(schema, strict)


def any_json(state: ServerState) -> str:
    """JSON mode: any JSON object."""
    return state.engine.grammars.json_schema({"type": "object"}, strict=False)


def openai_format(state: ServerState, response_format: Any) -> str | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}} (the schema is enforced either way; strict also closes objects)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return any_json(state)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ToolError("response_format json_schema needs {'name': ..., 'schema': {...}}")
        return schema_grammar(state, spec.get("schema", {}), strict=spec.get("strict") is True)
    raise ToolError("response_format type must be 'text', 'json_object' or 'json_schema'")


def function_tools(specs: list[Any] | None) -> list[Tool]:
    """OpenAI's and Ollama's tools: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    tools = []
    for i, spec in enumerate(specs or []):
        fn = spec.get("function") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or spec.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools.{i}: a tool is {{'type': 'function', 'function': {{'name': ...}}}}")
        tools.append(tool(fn.get("name"), fn.get("description"), fn.get("parameters"), f"tools.{i}"))
    return tools


def tool(name: Any, description: Any, parameters: Any, where: str) -> Tool:
    if not isinstance(name, str) or not name:
        raise ToolError(f"{where}: a tool needs a name")
    if parameters is not None and not isinstance(parameters, dict):
        raise ToolError(f"{where}: parameters must be a JSON schema object")
    return Tool(name, description if isinstance(description, str) else "", parameters or {"type": "object"})


def choose(tools: list[Tool], choice: str | None) -> tuple[list[Tool], list[Tool]]:
    """(the tools offered in the prompt, the tools one of which must be called: empty when none must).
    choice: "auto", "none", "required" or a tool's name."""
    if choice in (None, "auto"):
        return tools, []
    if choice == "none":
        return [], []
    if not tools:
        raise ToolError(f"tool_choice {choice!r} needs tools")
    if choice == "required":
        return tools, tools
    named = [t for t in tools if t.name == choice]
    if not named:
        raise ToolError(f"tool_choice names {choice!r}, which is not among the tools")
    return tools, named


def forced_grammar(state: ServerState, forced: list[Tool]) -> str | None:
    return call_grammar(state.engine.grammars, forced, state.engine.tool_format) if forced else None
