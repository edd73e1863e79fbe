"""Tool calls in the model's own format: tools rendered into the prompt, the calls it writes parsed back, and the
grammar that forces a call when one is required.

Three formats, read off the file's chat template. Hermes' (Qwen2.5, Qwen3, SmolLM3, Hermes): each call is
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, among text. Llama 3.1+'s JSON calls: the reply
is the call, `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` at times). Mistral's (v0.3, Nemo,
Small): the reply is `[TOOL_CALLS]` and a JSON list of `{"name", "arguments"}`, each call known by an id of nine
letters and digits. A template that writes any of them itself is given the tools and the messages as
transformers gives them (`tools=`, assistant `tool_calls`, `tool` turns). Any other template (SmolLM2's has no
tools section) gets the generic form of Hermes' format: the tools described in a system turn (Qwen2.5's words),
earlier calls written as the assistant's text and results as `<tool_response>` user turns.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from models.chat import ChatTemplate
from models.constraint import JSON_OPTIONS, Grammars, closed


@dataclass(frozen=True)
class ToolFormat:
    """How a family writes a call: between `open` and `close` ("": the reply itself is the call, from its start
    to its end), its arguments under `key`."""

    name: str
    open: str
    close: str
    key: str
    lead: str = ""  # a marker the model may write before a call that has no `open`
    listed: bool = False  # the reply is a JSON list of calls (Mistral's), not one call

    def head(self) -> re.Pattern[str]:
        """A call's start, up to its arguments' first character."""
        kind = r'(?:"type"\s*:\s*"function"\s*,\s*)?'
        return re.compile(rf'\s*\{{\s*{kind}"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"{self.key}"\s*:\s*(?=\S)')


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments")
LLAMA3 = ToolFormat("llama3", "", "", "parameters", lead="<|python_tag|>")
MISTRAL = ToolFormat("mistral", "", "", "arguments", lead="[TOOL_CALLS]", listed=True)


def tool_format(template: ChatTemplate) -> tuple[ToolFormat, bool]:
    """The format a model writes calls in, and whether its own template renders tools and calls (else the
    generic Hermes prompt does)."""
    if "<tool_call>" in template.source:
        return HERMES, True
    if "[TOOL_CALLS]" in template.source:
        return MISTRAL, True
    if '"parameters": ' in template.source and "ipython" in template.source:  # Llama 3.1, 3.2, 3.3
        return LLAMA3, True
    return HERMES, False


GENERIC_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_function(self) -> dict[str, Any]:
        """As OpenAI and transformers' templates spell a tool."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI carries it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def nine(call_id: str | None, index: int) -> str:
    """A call id as Mistral's templates require it (nine letters and digits): one already so stays, any other (an
    OpenAI call_..., Anthropic's toolu_...) maps to nine hex digits of its hash, the same each time; none: by
    its place in the conversation."""
    if call_id and len(call_id) == 9 and call_id.isalnum():
        return call_id
    return hashlib.sha256((call_id or f"call-{index}").encode()).hexdigest()[:9]


def render(template: ChatTemplate, messages: list[dict[str, Any]], tools: list[Tool]) -> str:
    """The prompt for a conversation that may hold tool calls ({"role": "assistant", "content", "tool_calls":
    [{"name", "arguments": dict}]}) and results ({"role": "tool", "content"}), with `tools` offered (none: not
    mentioned)."""
    fmt, writes = tool_format(template)
    if writes:
        turns = [
            {
                **m,
                "tool_calls": [
                    {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in m["tool_calls"]
                ],
            }
            if m.get("tool_calls")
            else {k: v for k, v in m.items() if k != "tool_calls"}  # Llama's template tests for the key
            for m in messages
        ]
        if fmt is MISTRAL:
            _call_ids(messages, turns)
        return template.render(turns, tools=[t.as_function() for t in tools] or None)
    turns = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(
                f"{HERMES.open}\n{json.dumps({'name': c['name'], 'arguments': c['arguments']})}\n{HERMES.close}"
                for c in m["tool_calls"]
            )
            turns.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).lstrip("\n")})
        elif m["role"] == "tool":
            turns.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            turns.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        described = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t.as_function()) for t in tools))
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + described}
        else:
            turns.insert(0, {"role": "system", "content": described})
    return template.render(turns)


def _call_ids(messages: list[dict[str, Any]], turns: list[dict[str, Any]]) -> None:
    """Mistral's ids on each call and each result: a result without its call's id answers the earliest call
    not yet answered."""
    pending: list[str] = []
    count = 0
    for m, turn in zip(messages, turns, strict=True):
        for call, rendered in zip(m.get("tool_calls") or [], turn.get("tool_calls") or [], strict=True):
            rendered["id"] = nine(call.get("id"), count)
            pending.append(rendered["id"])
            count += 1
        if m["role"] == "tool":
            given = m.get("tool_call_id")
            turn["tool_call_id"] = nine(given, count) if given else (pending[0] if pending else nine(None, count))
            if turn["tool_call_id"] in pending:
                pending.remove(turn["tool_call_id"])


def call_grammar(grammars: Grammars, tools: list[Tool], fmt: ToolFormat = HERMES) -> str:
    """A grammar for exactly one call of one of `tools` in `fmt`, its arguments valid against the tool's parameters
    (no properties beyond those listed, as OpenAI's strict mode)."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, fmt.key: closed(t.parameters)},
            "required": ["name", fmt.key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"x-guidance": JSON_OPTIONS, **(options[0] if len(options) == 1 else {"anyOf": options})}
    around = [json.dumps(fmt.open + "\n"), "call", json.dumps("\n" + fmt.close)] if fmt.open else ["call"]
    if fmt.listed:
        around = ['"["', "call", '"]"']
    return grammars.lark(f"start: {' '.join(around)}\ncall: %json {json.dumps(schema)}\n")


@dataclass
class Event:
    """What the parser reads out of the text: plain text ("content"), a call's name ("call", with its index), or
    more of its arguments' JSON text ("arguments")."""

    kind: str
    text: str = ""
    index: int = 0


class CallParser:
    """Splits generated text, piece by piece, into content and tool calls, streaming each call's arguments as they
    grow (what OpenAI's tool_call deltas carry). A block that does not parse as a call stays content."""

    def __init__(self, fmt: ToolFormat = HERMES) -> None:
        self.fmt, self._head = fmt, fmt.head()
        self.buffer = ""
        # "content", "head" (inside a call, before its arguments), "arguments"; or "start" when the reply itself
        # may be the call (a format without `open`): until its first character shows
        self.mode = "content" if fmt.open else "start"
        self.calls: list[ToolCall] = []
        self.content = ""
        self._sent = 0  # argument characters already handed out for the current call
        self._trim = False

    def feed(self, piece: str) -> list[Event]:
        self.buffer += piece
        events: list[Event] = []
        open_, close_ = self.fmt.open, self.fmt.close
        while True:
            if self.mode == "start":
                text, lead = self.buffer.lstrip(), self.fmt.lead
                if not text or (lead and lead.startswith(text) and text != lead):
                    return events  # not yet known
                if lead and text.startswith(lead):
                    text = text[len(lead) :]
                    self.buffer, self.mode = text, "list" if self.fmt.listed else "head"
                elif text.startswith("[" if self.fmt.listed else "{"):
                    self.buffer, self.mode = text, "list" if self.fmt.listed else "head"
                else:
                    self.mode = "content"
                continue
            if self.mode == "list":  # a list of calls: read whole at the end
                return events
            if self.mode == "content":
                if not open_:  # the reply was not a call: all of it is text
                    self._content(events, self.buffer)
                    self.buffer = ""
                    return events
                if self._trim:  # the newlines after a call belong to it
                    self.buffer = self.buffer.lstrip("\n")
                    self._trim = not self.buffer
                at = self.buffer.find(open_)
                if at < 0:
                    keep = next((k for k in range(len(open_) - 1, 0, -1) if self.buffer.endswith(open_[:k])), 0)
                    sent = self.buffer[: len(self.buffer) - keep].rstrip("\n")  # newlines may lead into a call
                    self._content(events, sent)
                    self.buffer = self.buffer[len(sent) :]
                    return events
                self._content(events, self.buffer[:at].rstrip("\n") if at else "")
                self.buffer, self.mode = self.buffer[at + len(open_) :], "head"
            close = self.buffer.find(close_) if close_ else -1  # no `close`: the call ends with the reply
            if self.mode == "head":
                head = self._head.match(self.buffer)
                if head:
                    self.calls.append(ToolCall(json.loads(f'"{head.group(1)}"'), ""))
                    events.append(Event("call", self.calls[-1].name, len(self.calls) - 1))
                    self.buffer, self.mode, self._sent = self.buffer[head.end() :], "arguments", 0
                    continue
                if close < 0:
                    return events
                self._whole(events, self.buffer[:close])  # another shape (keys swapped, spaces): parsed whole
            elif close < 0:  # arguments so far: all up to the last "}" (the call's own closing brace is last)
                end = self.buffer.rfind("}")
                if end > self._sent:
                    self._arguments(events, self.buffer[self._sent : end])
                    self._sent = end
                return events
            else:
                self._close(events, self.buffer[:close])
            self.buffer, self.mode, self._trim = self.buffer[close + len(close_) :], "content", True

    def finish(self) -> list[Event]:
        """The end of the text: what is held back comes out (an unclosed call's arguments as they are; in a format
        without `close` the end closes the call)."""
        events: list[Event] = []
        if self.mode in ("content", "start"):
            self._content(events, self.buffer)
        elif self.mode == "list":
            self._list(events, self.buffer)
        elif self.mode == "arguments":
            if self.fmt.close:
                self._arguments(events, self.buffer[self._sent :])
            else:
                self._close(events, self.buffer)
        elif self.fmt.close:
            self._content(events, self.fmt.open + self.buffer)
        else:
            self._whole(events, self.buffer)
        self.buffer = ""
        return events

    def _close(self, events: list[Event], text: str) -> None:
        """The rest of a call's arguments: `text` up to its end, less the call's own closing brace."""
        text = text.rstrip()
        self._arguments(events, text[self._sent : -1 if text.endswith("}") else len(text)])

    def _content(self, events: list[Event], text: str) -> None:
        if text:
            self.content += text
            events.append(Event("content", text))

    def _arguments(self, events: list[Event], text: str) -> None:
        if text:
            self.calls[-1].arguments += text
            events.append(Event("arguments", text, len(self.calls) - 1))

    def _list(self, events: list[Event], text: str) -> None:
        """Mistral's reply: a JSON list of calls, each with a nine-character id; anything else is text."""
        try:
            calls = json.loads(text)
            if not isinstance(calls, list) or not calls:
                raise TypeError
            parsed = [(c["name"], c.get("arguments", {})) for c in calls]
            if not all(isinstance(name, str) for name, _ in parsed):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._content(events, text)
            return
        for name, arguments in parsed:
            self.calls.append(ToolCall(name, json.dumps(arguments), id=uuid.uuid4().hex[:9]))
            events.append(Event("call", name, len(self.calls) - 1))
            events.append(Event("arguments", self.calls[-1].arguments, len(self.calls) - 1))

    def _whole(self, events: list[Event], block: str) -> None:
        try:
            call = json.loads(block)
            name, arguments = call["name"], call.get("arguments", call.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._content(events, f"{self.fmt.open}{block}{self.fmt.close}")
            return
        self.calls.append(ToolCall(name, json.dumps(arguments)))
        events.append(Event("call", name, len(self.calls) - 1))
        events.append(Event("arguments", self.calls[-1].arguments, len(self.calls) - 1))


def parse(text: str, fmt: ToolFormat = HERMES) -> tuple[str, list[ToolCall]]:
    """A whole reply's content and its tool calls."""
    parser = CallParser(fmt)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls
