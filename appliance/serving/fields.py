"""Request fields the HTTP APIs (OpenAI's, Ollama's) check alike: text that is valid Unicode, chat messages with
their tool calls."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, model_validator

from models.errors import ModelError


def _unicode(text: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"), which is no text the tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from e
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class ToolError(ModelError):
    """A tool, tool call or tool choice the request spells wrongly (a 400)."""


def arguments(value: Any, where: str) -> dict:
    """A call's arguments as a prompt carries them: OpenAI sends JSON text, Ollama an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value or "{}")
        except ValueError as e:
            raise ToolError(f"{where}: arguments are not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ToolError(f"{where}: arguments must be a JSON object")
    return value


class Message(BaseModel):
    """One turn of a chat, rendered by the model's own chat template: also an assistant's tool calls (OpenAI's
    and Ollama's [{"function": {"name", "arguments"}}], arguments as JSON text or an object) and a tool's result."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = None  # may be left out only by an assistant turn that calls tools
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None  # a tool turn's: the call it answers (OpenAI's)

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant turn with tool_calls may leave it out)")
        return self

    def turn(self) -> dict[str, Any]:
        """As models/tools.py renders a turn: tool calls as {"name", "arguments": dict}."""
        calls = []
        for i, call in enumerate(self.tool_calls or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ToolError(f"tool_calls.{i}: a call is {{'function': {{'name': ..., 'arguments': ...}}}}")
            call_id = call.get("id") if isinstance(call.get("id"), str) else None
            calls.append(
                {"name": fn["name"], "arguments": arguments(fn.get("arguments", {}), f"tool_calls.{i}"), "id": call_id}
            )
        turn = {"role": self.role, "content": self.content or "", **({"tool_calls": calls} if calls else {})}
        if self.role == "tool" and self.tool_call_id:
            turn["tool_call_id"] = self.tool_call_id
        return turn
