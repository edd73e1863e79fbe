"""A loaded model that turns prompts into streamed text.

The token's path: tokenize -> embed -> each layer range in turn -> head -> sample, repeated.
Prefill sends the whole prompt through in one pass; decode then sends one token at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from models.chat import ChatTemplate
from models.errors import ContextLengthError
from models.llama import Llama, Session
from models.sampling import InvalidParameterError, Sampler, SamplingParams
from models.tokenizer import Tokenizer


class Engine:
    def __init__(self, model: Llama, ranges: Sequence[tuple[int, int]] | None = None):
        self.model = model
        meta = model.file.metadata
        self.tokenizer = Tokenizer(meta)
        tok = self.tokenizer
        self.chat_template = ChatTemplate(
            meta.get("tokenizer.chat_template"),
            bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
            eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "",
        )
        n = model.config.n_layers
        self.ranges = list(ranges or [(0, n)])
        covered = [i for a, b in self.ranges for i in range(a, b)]
        if covered != list(range(n)):
            raise ValueError(f"layer ranges {self.ranges} must cover [0, {n}) in order, once each")

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto") -> Engine:
        return cls(Llama.load(str(path), backend))

    @property
    def name(self) -> str:
        return self.model.file.path.stem

    def prompt_ids(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a plain prompt, or for one user turn rendered with the model's chat template."""
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return self.chat_ids(messages)
        return self.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes the BOS text itself where the model wants one.
        return self.tokenizer.encode(self.chat_template.render(messages), add_bos=False)

    def forward(self, ids: list[int], session: Session) -> np.ndarray:
        """Logits [T, vocab] for the next T tokens of a session, through every layer range."""
        return self.model.head(self._hidden(ids, session))

    def next_logits(self, ids: list[int], session: Session) -> np.ndarray:
        """Logits [vocab] after the last of ids: the head runs on one position, not all of a prompt's."""
        return self.model.head(self._hidden(ids, session)[-1:])[0]

    def _hidden(self, ids: list[int], session: Session) -> np.ndarray:
        hidden = self.model.embed(ids)
        for layers in self.ranges:
            hidden = self.model.run_layers(layers, hidden, session)
        return hidden

    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams | None = None,
        max_tokens: int | None = 128,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
    ) -> Generation:
        return Generation(self, prompt_ids, sampling or SamplingParams(), max_tokens, stop, stop_token_ids)


class Generation:
    """One streamed completion: iterate for text pieces; afterwards read the ids, text and why it ended."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int | None,
        stop: Sequence[str],
        stop_token_ids: Sequence[int],
    ):
        ctx = engine.model.config.context_length
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise InvalidParameterError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not prompt_ids:
            raise InvalidParameterError("the prompt is empty")
        if len(prompt_ids) >= ctx:
            raise ContextLengthError(
                f"the prompt is {len(prompt_ids)} tokens; the context window is {ctx} tokens "
                f"and at least one must be left to generate"
            )
        if any(not s for s in stop):
            raise InvalidParameterError("stop strings must not be empty")
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = min(max_tokens or ctx, ctx - len(prompt_ids))
        self.stop = list(stop)
        self.stop_ids = engine.tokenizer.stop_ids | set(stop_token_ids)
        self.sampler = Sampler(sampling)
        self.session = Session()
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def __iter__(self) -> Iterator[str]:
        tok, hold = self.engine.tokenizer, max((len(s) for s in self.stop), default=1) - 1
        history = list(self.prompt_ids)
        logits = self.engine.next_logits(self.prompt_ids, self.session)
        emitted = 0
        while True:
            token = self.sampler(logits, history)
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            self.token_ids.append(token)
            history.append(token)
            text = tok.decode(self.token_ids)
            cut = min((i for i in (text.find(s, max(0, emitted - hold)) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = text[:cut]
                self.finish_reason = "stop"
                break
            self.text = text
            safe = len(text) - hold
            while safe > emitted and text[safe - 1] == "\ufffd":  # an unfinished UTF-8 sequence
                safe -= 1
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if len(self.token_ids) >= self.max_tokens:
                self.finish_reason = "length"
                break
            logits = self.engine.next_logits([token], self.session)
        if len(self.text) > emitted:
            yield self.text[emitted:]

    def run(self) -> str:
        """Generate to the end and return the whole text."""
        for _ in self:
            pass
        return self.text
