"""A loaded model that turns prompts into streamed text.

The token's path: tokenize -> embed -> each layer range in turn -> head -> sample, repeated.
Prefill sends the whole prompt through in one pass; decode then sends one token at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from models.chat import ChatTemplate
from models.errors import ContextLengthError
from models.llama import Llama, Session
from models.memory import release_memory
from models.sampling import InvalidParameterError, Sampler, SamplingParams
from models.tokenizer import Tokenizer


class OffloadStage(Protocol):
    """Runs layers [first_remote_layer, n) somewhere else (offload.coordinator.Coordinator: LAN workers)."""

    first_remote_layer: int

    def run(self, hiddens: list[np.ndarray], sessions: list[Session]) -> list[np.ndarray]: ...
    def release(self, session: Session) -> None: ...


class Engine:
    """offload: runs the layers after the local ones elsewhere; without it every layer runs here."""

    def __init__(self, model: Llama, offload: OffloadStage | None = None):
        self.model, self.offload = model, offload
        meta = model.file.metadata
        self.tokenizer = Tokenizer(meta)
        tok = self.tokenizer
        self.chat_template = ChatTemplate(
            meta.get("tokenizer.chat_template"),
            bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
            eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "",
        )
        n = offload.first_remote_layer if offload is not None else model.config.n_layers
        self.ranges = [(0, n)] if n else []  # the layers run here

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None) -> Engine:
        engine = cls(Llama.load(str(path), backend, threads))
        release_memory()
        return engine

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
        # The template writes the BOS (and any EOS) text itself where the model wants one.
        return self.tokenizer.encode(self.chat_template.render(messages), add_bos=False, add_eos=False)

    def forward(self, ids: list[int], session: Session) -> np.ndarray:
        """Logits [T, vocab] for the next T tokens of a session, through every layer range."""
        return self.model.head(self._hidden([ids], [session])[0])

    def hidden_states(self, ids: list[int], session: Session) -> np.ndarray:
        """The last layer's hidden states [T, D] (before the final norm) for the next T tokens."""
        return self._hidden([ids], [session])[0]

    def next_logits(self, ids: list[int], session: Session) -> np.ndarray:
        """Logits [vocab] after the last of ids: the head runs on one position, not all of a prompt's."""
        return self.next_logits_batch([ids], [session])[0]

    def next_logits_batch(self, batch: list[list[int]], sessions: list[Session]) -> np.ndarray:
        """next_logits for several sessions in one pass over the weights: [batch, vocab]."""
        last = np.stack([h[-1] for h in self._hidden(batch, sessions)])
        return self.model.head(last)

    def _hidden(self, batch: list[list[int]], sessions: list[Session]) -> list[np.ndarray]:
        hiddens = [self.model.embed(ids) for ids in batch]
        for layers in self.ranges:
            hiddens = self.model.run_layers_batch(layers, hiddens, sessions)
        if self.offload is not None:
            hiddens = self.offload.run(hiddens, sessions)
        return hiddens

    def release(self, session: Session) -> None:
        """Free what a finished session holds beyond this process (its KV caches on workers)."""
        if self.offload is not None:
            self.offload.release(session)

    def score(self, ids: list[int]) -> Scoring:
        """The next token's logits after `ids`, as a job the scheduler prefills in its chunks."""
        return Scoring(self, ids)

    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams | None = None,
        max_tokens: int | None = 128,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> Generation:
        """ignore_eos: run on past the model's own end-of-generation tokens (fixed-length output, for benchmarks)."""
        model_stops = frozenset() if ignore_eos else self.tokenizer.stop_ids
        return Generation(
            self, prompt_ids, sampling or SamplingParams(), max_tokens, stop, model_stops | set(stop_token_ids)
        )


class PromptRun:
    """A prompt fed through the model in chunks, with its own session: what Generation and Scoring
    share, and what the scheduler steps (next_input, then advance with the logits after it)."""

    max_tokens = 0  # tokens it may generate

    def __init__(self, engine: Engine, prompt_ids: list[int]):
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.session = Session()
        self.finish_reason: str | None = None
        self._prefilled = 0  # prompt ids already run through the model

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return 0

    @property
    def prompt_done(self) -> bool:
        return self._prefilled >= len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_input(self, prefill_chunk: int | None = None) -> list[int]:
        """The rest of the prompt, at most prefill_chunk of it."""
        end = len(self.prompt_ids) if prefill_chunk is None else self._prefilled + prefill_chunk
        return self.prompt_ids[self._prefilled : end]

    def _fed(self, n_fed: int) -> bool:
        """Count n_fed prompt ids as run; whether the prompt is now all in (the logits are the next token's)."""
        self._prefilled += n_fed
        return self.prompt_done


class Scoring(PromptRun):
    """The next token's logits after a sequence of ids (KServe `NAME-logits`): a prompt that is only
    prefilled, so a long one goes through the scheduler in chunks between other requests' tokens."""

    def __init__(self, engine: Engine, ids: list[int]):
        ctx = engine.model.config.context_length
        if not ids or len(ids) > ctx:
            raise ContextLengthError(f"{len(ids)} ids: scoring takes 1 to {ctx} (the context window)")
        super().__init__(engine, ids)
        self.logits: np.ndarray | None = None

    def advance(self, n_fed: int, logits: np.ndarray) -> str:
        if self._fed(n_fed):
            self.logits = np.asarray(logits, dtype=np.float32)
            self.finish_reason = "scored"
            self.engine.release(self.session)
        return ""


class Generation(PromptRun):
    """One streamed completion: iterate for text pieces; afterwards read the ids, text and why it ended."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int | None,
        stop: Sequence[str],
        stop_ids: set[int],
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
        super().__init__(engine, prompt_ids)
        self.max_tokens = min(max_tokens or ctx, ctx - len(prompt_ids))
        self.stop = list(stop)
        self.stop_ids = stop_ids
        self.sampler = Sampler(sampling)
        self.token_ids: list[int] = []
        self.text = ""
        self._emitted = 0  # characters of text already handed out
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def next_input(self, prefill_chunk: int | None = None) -> list[int]:
        """The ids to run next: the rest of the prompt (at most prefill_chunk of it), else the last token."""
        return super().next_input(prefill_chunk) if not self.prompt_done else [self.token_ids[-1]]

    def advance(self, n_fed: int, logits: np.ndarray) -> str:
        """Take the logits after running next_input(); sample once the prompt is in; return new text."""
        if not self.prompt_done and not self._fed(n_fed):
            return ""  # a prompt chunk: nothing to sample yet
        token = self.sampler(logits, self.prompt_ids + self.token_ids)
        if token in self.stop_ids:
            return self._finish("stop")
        self.token_ids.append(token)
        text = self.engine.tokenizer.decode(self.token_ids, continuation=True)
        found = [i for i in (text.find(s, max(0, self._emitted - self._hold)) for s in self.stop) if i >= 0]
        if found:
            self.text = text[: min(found)]
            return self._finish("stop")
        self.text = text
        if len(self.token_ids) >= self.max_tokens:
            return self._finish("length")
        safe = len(text) - self._hold  # a stop string may still be forming in the last _hold chars
        while safe > self._emitted and text[safe - 1] == "\ufffd":  # an unfinished UTF-8 sequence
            safe -= 1
        return self._emit(safe)

    def _emit(self, upto: int) -> str:
        piece = self.text[self._emitted : upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        return piece

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        self.engine.release(self.session)
        return self._emit(len(self.text))

    def __iter__(self) -> Iterator[str]:
        while not self.done:
            ids = self.next_input()
            piece = self.advance(len(ids), self.engine.next_logits(ids, self.session))
            if piece:
                yield piece

    def run(self) -> str:
        """Generate to the end and return the whole text."""
        for _ in self:
            pass
        return self.text
