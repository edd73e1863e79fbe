"""Request fields the HTTP APIs (OpenAI's, Ollama's) check alike: text that is valid Unicode, chat messages."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel


def _unicode(text: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"), which is no text the tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from e
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class Message(BaseModel):
    """One turn of a chat, rendered by the model's own chat template."""

    role: Literal["system", "user", "assistant"]
    content: Text
