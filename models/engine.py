"""A loaded model that turns prompts into streamed text.

The token's path: tokenize -> embed -> each layer range in turn -> head -> sample, repeated.
Prefill sends the whole prompt through in one pass; decode then sends one token at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from models.chat import ChatTemplate
from models.constraint import Constraint, Grammars
from models.detokenize import IncrementalDecoder
from models.errors import ContextLengthError
from models.llama import KVCache, Llama, Session
from models.logprobs import MAX_TOP, TokenLogprob, token_logprob
from models.lora import LoraAdapter
from models.memory import release_memory
from models.prefix_cache import PrefixCache, RemoteKept
from models.sampling import Draw, InvalidParameterError, Sampler, SamplingParams
from models.speculative import DraftLength, Speculation, choose
from models.store import model_name
from models.tokenizer import Tokenizer
from models.tools import Tool, tool_format
from models.tools import render as render_chat


class OffloadStage(Protocol):
    """Runs layers [first_remote_layer, n) somewhere else (offload.coordinator.Coordinator: LAN workers)."""

    first_remote_layer: int

    def run(self, hiddens: list[np.ndarray], sessions: list[Session]) -> list[np.ndarray]: ...
    def release(self, session: Session) -> None: ...
    def rollback(self, session: Session, length: int) -> None: ...
    def keep(self, session: Session, length: int) -> RemoteKept | None: ...  # the prefix cache's (RemotePrefix)
    def resume(self, kept: RemoteKept, length: int, session: Session) -> None: ...


class Engine:
    """offload: runs the layers after the local ones elsewhere; without it every layer runs here.
    speculation: drafts checked in each decode step (models.speculative); None decodes one token a step."""

    def __init__(self, model: Llama, offload: OffloadStage | None = None, speculation: Speculation | None = None):
        self.model, self.offload, self.speculation = model, offload, speculation
        meta = model.file.metadata
        self.tokenizer = Tokenizer(meta)
        tok = self.tokenizer
        self.chat_template = ChatTemplate(
            meta.get("tokenizer.chat_template"),
            bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
            eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "",
        )
        self.tool_format = tool_format(self.chat_template)[0]  # how its calls are written and parsed
        n = offload.first_remote_layer if offload is not None else model.config.n_layers
        self.ranges = [(0, n)] if n else []  # the layers run here
        self.grammars = Grammars(self.tokenizer)  # structured output: schemas compiled for this vocabulary
        self.prefix_cache: PrefixCache | None = None  # enable_prefix_cache
        self.resident = True  # False once unloaded, until a step prepares the layers again

    def enable_prefix_cache(self, max_bytes: int) -> None:
        """Keep finished generations' KV (up to max_bytes here) for later prompts that start the same way;
        offload workers keep their layers' part."""
        if max_bytes > 0:
            self.prefix_cache = PrefixCache(max_bytes, self._new_cache, remote=self.offload)

    def unload(self) -> None:
        """Free the local layers' weights and the prefix cache (Ollama's keep_alive 0); the next step loads
        them again. Only while nothing runs: the scheduler calls it when idle."""
        self.model.unload()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.resident = False

    def _new_cache(self, layers: tuple[int, int]) -> KVCache:
        return self.model.layer_range(*layers).new_cache()

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None) -> Engine:
        engine = cls(Llama.load(str(path), backend, threads))
        release_memory()
        return engine

    @property
    def name(self) -> str:
        """models.store.model_name: the store's name for a known model, else the file's stem."""
        return model_name(self.model.file.path)

    def prompt_ids(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a plain prompt, or for one user turn rendered with the model's chat template."""
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return self.chat_ids(messages)
        return self.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[dict], tools: Sequence[Tool] = ()) -> list[int]:
        """A conversation (with tool calls and results, models/tools.py) and the tools offered, as prompt ids."""
        # The template writes the BOS (and any EOS) text itself where the model wants one.
        text = render_chat(self.chat_template, messages, list(tools))
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

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
        return self.step(batch, sessions)[0]

    def step(self, batch: list[list[int]], sessions: list[Session]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One batched pass: each sequence's next-token logits [batch, vocab], and its last layer's
        hidden states [T_j, D] (what an embedding is pooled from)."""
        hiddens = self._hidden(batch, sessions)
        return self.model.head(np.stack([h[-1] for h in hiddens])), hiddens

    def step_drawing(
        self, batch: list[list[int]], sessions: list[Session], draws: list[Draw | None]
    ) -> tuple[list[np.ndarray | None], list[int | None], list[np.ndarray]]:
        """step(), where a row with a draw may get its token chosen where the head runs (the GPU's sampling
        kernel: its ids come back, not its logits): per row its logits (None where drawn there), its token
        (None where not) and its hidden states. Without such a head every row gets its logits."""
        if not self.model.picks or not any(draws):
            logits, hiddens = self.step(batch, sessions)
            return list(logits), [None] * len(batch), hiddens
        hiddens = self._hidden(batch, sessions)
        logits, tokens = self.model.head_pick(np.stack([h[-1] for h in hiddens]), draws)
        rows = [None if t is not None else logits[i] for i, t in enumerate(tokens)]
        return rows, tokens, hiddens

    def _hidden(self, batch: list[list[int]], sessions: list[Session]) -> list[np.ndarray]:
        self.resident = True
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

    def rollback(self, session: Session, length: int) -> None:
        """Keep the first `length` positions of a session everywhere (drafts the model refused)."""
        session.truncate(length)
        if self.offload is not None:
            self.offload.rollback(session, length)

    def embed(self, ids: list[int]) -> Embedding:
        """A text's embedding, as a job the scheduler prefills in its chunks."""
        return Embedding(self, ids)

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
        logprobs: int | None = None,
        echo: bool = False,
        constraint: Constraint | None = None,
        adapter: LoraAdapter | None = None,
    ) -> Generation:
        """ignore_eos: run on past the model's own end-of-generation tokens (fixed-length output, for benchmarks);
        logprobs, echo, constraint: see Generation; adapter: the LoRA adapter it runs with (models/lora.py)."""
        model_stops = frozenset() if ignore_eos else self.tokenizer.stop_ids
        return Generation(
            self,
            prompt_ids,
            sampling or SamplingParams(),
            max_tokens,
            stop,
            model_stops | set(stop_token_ids),
            logprobs,
            echo,
            constraint,
            adapter,
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

    def draw(self) -> Draw | None:
        """How this step's token may be chosen on the device (Engine.step_drawing), or None: its logits are
        needed here. Only a Generation samples."""
        return None

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

    def advance(
        self, n_fed: int, logits: np.ndarray, hidden: np.ndarray | None = None, token: int | None = None
    ) -> str:
        if self._fed(n_fed):
            self.logits = np.asarray(logits, dtype=np.float32)
            self.finish_reason = "scored"
            self.engine.release(self.session)
        return ""


class Embedding(PromptRun):
    """A text's embedding: the mean over every position of the last layer's hidden states after the
    final norm, scaled to unit length (llama.cpp's `--pooling mean`). Prefilled by the scheduler like
    any prompt; the chunks' rows are summed as they pass, so no [T, D] array is kept."""

    def __init__(self, engine: Engine, ids: list[int]):
        ctx = engine.model.config.context_length
        if not ids or len(ids) > ctx:
            raise ContextLengthError(f"{len(ids)} tokens: an embedding takes 1 to {ctx} (the context window)")
        super().__init__(engine, ids)
        self._sum = np.zeros(engine.model.config.dim, dtype=np.float64)
        self.vector: np.ndarray | None = None

    def advance(
        self, n_fed: int, logits: np.ndarray | None, hidden: np.ndarray | None = None, token: int | None = None
    ) -> str:
        if hidden is None:
            raise ValueError("an embedding needs the hidden states of its positions")
        self._sum += self.engine.model.final_norm(hidden).sum(axis=0, dtype=np.float64)
        if self._fed(n_fed):
            mean = self._sum / len(self.prompt_ids)
            self.vector = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
            self.finish_reason = "embedded"
            self.engine.release(self.session)
        return ""


class Generation(PromptRun):
    """One streamed completion: iterate for text pieces; afterwards read the ids, text and why it ended.

    logprobs: None for none, else how many alternatives (0 to MAX_TOP) each generated token's
    `TokenLogprob` carries (in `logprobs`; `piece_tokens[i]` is how many of them the i-th text piece
    covers). echo: also the prompt's tokens' logprobs (`prompt_logprobs`, the first None): the head
    then runs on every prompt position of this request, not just the last; with echo, max_tokens may
    be 0 (score the prompt, sample nothing). constraint: a grammar's token mask (models/constraint.py) applied to
    each step's logits before sampling; the text ends ("stop") once the grammar is complete, and a text cut off
    by max_tokens before that ends "length" as any other."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int | None,
        stop: Sequence[str],
        stop_ids: set[int],
        logprobs: int | None = None,
        echo: bool = False,
        constraint: Constraint | None = None,
        adapter: LoraAdapter | None = None,
    ):
        ctx = engine.model.config.context_length
        least = 0 if echo else 1  # echo with max_tokens 0 scores the prompt only
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < least):
            kind = "an integer >= 0 with echo" if echo else "a positive integer"
            raise InvalidParameterError(f"max_tokens must be {kind}, got {max_tokens!r}")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP:
            raise InvalidParameterError(f"logprobs takes 0 to {MAX_TOP} alternatives, got {logprobs!r}")
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
        self.session.adapter = adapter  # before the prefix cache looks: positions reused ran with the same one
        self.max_tokens = min(ctx if max_tokens is None else max_tokens, ctx - len(prompt_ids))
        self.n_top = logprobs
        self.echo = echo
        self.logprobs: list[TokenLogprob] = []
        self.piece_tokens: list[int] = []
        self.prompt_logprobs: list[TokenLogprob | None] = [None]
        self.stop = list(stop)
        self.stop_ids = stop_ids
        self.sampler = Sampler(sampling)
        self.constraint = constraint
        self.token_ids: list[int] = []
        self._history = list(prompt_ids)  # what the repetition penalty looks at: prompt and output
        self._decoder = IncrementalDecoder(partial(engine.tokenizer.decode, continuation=True))  # llama.cpp keeps
        # a SentencePiece reply's leading space
        self.text = ""
        self._emitted = 0  # characters of text already handed out
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.stop_sequence: str | None = None  # the stop string that ended the text, if one did
        cache = engine.prefix_cache
        # the prompt's leading positions already computed by an earlier request (echo scores every position)
        self.cached_tokens = 0 if cache is None or echo else cache.restore(self.prompt_ids, self.session)
        self._prefilled = self.cached_tokens
        self.drafting = DraftLength(engine.speculation) if engine.speculation is not None else None
        self._drafts: list[int] | None = None  # proposed for the step in flight
        self._drawn = 0  # tokens chosen on the device: the step of its random stream

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def next_input(self, prefill_chunk: int | None = None) -> list[int]:
        """The ids to run next: the rest of the prompt (at most prefill_chunk of it), else the last
        token, followed by drafts for it when the engine speculates."""
        if not self.prompt_done:
            return super().next_input(prefill_chunk)
        if self.drafting is None or self.constraint is not None:  # a grammar's text is not drafted
            return [self.token_ids[-1]]
        room = self.max_tokens - len(self.token_ids) - 1  # the model's own token after the drafts counts too
        self._drafts = self.engine.speculation.drafter.draft(self._history, min(self.drafting.k, room))
        return [self.token_ids[-1], *self._drafts]

    def draw(self) -> Draw | None:
        """The device may choose this step's token unless the host needs the logits: for logprobs, a
        grammar's mask, echo, drafts to verify, or a repetition penalty."""
        if self.n_top is not None or self.constraint is not None or self.echo or self.drafting is not None:
            return None
        return self.sampler.draw(self._drawn)

    def advance(
        self, n_fed: int, logits: np.ndarray | None, hidden: np.ndarray | None = None, token: int | None = None
    ) -> str:
        """Take the logits after running next_input(); sample once the prompt is in; return new text.
        A step with drafts needs `hidden` (its rows' logits are computed here) and may add several tokens.
        token: chosen already, on the device, from this step's draw() (then logits is None)."""
        if not self.prompt_done:
            if self.echo and self.n_top is not None:
                self._score_prompt(hidden)
            if not self._fed(n_fed):
                return ""  # a prompt chunk: nothing to sample yet
            if self.max_tokens == 0:
                return self._finish("length")
        drafts, self._drafts = self._drafts, None
        if drafts:
            if hidden is None or n_fed != 1 + len(drafts):
                raise ValueError(
                    f"a step with {len(drafts)} drafts needs the hidden states of its {1 + len(drafts)} rows"
                )
            return self._verify(drafts, self.engine.model.head(hidden))
        if token is not None:
            self._drawn += 1
            return self._take(token, logits)
        masked = logits if self.constraint is None else self.constraint.mask(logits)
        return self._take(self.sampler(masked, self._history), logits)

    def _verify(self, drafts: list[int], rows: np.ndarray) -> str:
        """Take the model's token at each row while it agrees with the draft there (and the one after);
        the session forgets the positions of the drafts it refused."""
        text, kept = "", 0
        for i, row in enumerate(rows):
            draft = drafts[i] if i < len(drafts) else None
            token = choose(self.sampler, row, self._history, draft)
            text += self._take(token, row)
            if self.done or token != draft:
                break
            kept += 1
        self.drafting.record(len(drafts), kept)
        if not self.done:  # the cache keeps the prompt and every token but the newest (the next input)
            self.engine.rollback(self.session, len(self.prompt_ids) + len(self.token_ids) - 1)
        return text

    def _take(self, token: int, raw: np.ndarray) -> str:
        """One chosen token: the end, or more text (held back while a stop string may be forming). raw:
        the model's own logits for it (logprobs are taken before any grammar's mask)."""
        if self.constraint is not None:
            self.constraint.accept(token)
        if token in self.stop_ids or (
            self.constraint is not None and self.constraint.finished and token in self.engine.tokenizer.stop_ids
        ):  # not part of the text, so no logprob of its own (as OpenAI's)
            self.text = self._decoder.final()
            return self._finish("stop")
        if self.n_top is not None:
            self.logprobs.append(token_logprob(raw, token, self.n_top))
        self.token_ids.append(token)
        self._history.append(token)
        self._decoder.add(token)
        text = self._decoder.text  # complete characters only: an unfinished UTF-8 sequence waits
        start = max(0, self._emitted - self._hold)
        found = [(i, s) for s in self.stop if (i := text.find(s, start)) >= 0]
        if found:
            at, self.stop_sequence = min(found, key=lambda f: f[0])  # the earliest; on a tie, the first listed
            self.text = text[:at]
            self._drop_logprobs_past_text()
            return self._finish("stop")
        if self.constraint is not None and self.constraint.finished:  # the grammar admits nothing more
            self.text = self._decoder.final()
            return self._finish("stop")
        if len(self.token_ids) >= self.max_tokens:
            self.text = self._decoder.final()
            return self._finish("length")
        self.text = text
        return self._emit(len(text) - self._hold)  # a stop string may still be forming in the last _hold chars

    def _score_prompt(self, hidden: np.ndarray | None) -> None:
        """The logprobs of the prompt ids this chunk's positions predict (the last prompt position
        predicts the first generated token, which advance() scores from its own row)."""
        if hidden is None:
            raise ValueError("echo needs the hidden states of the prompt's positions")
        start = self._prefilled
        targets = self.prompt_ids[start + 1 : start + len(hidden) + 1]
        if not targets:
            return
        rows = self.engine.model.head(hidden[: len(targets)])
        self.prompt_logprobs += [token_logprob(row, t, self.n_top or 0) for row, t in zip(rows, targets, strict=True)]

    def _drop_logprobs_past_text(self) -> None:
        """A stop string cut the text: the logprobs of tokens that begin past the cut go too."""
        kept, length = 0, 0
        for lp in self.logprobs:
            if length >= len(self.text):
                break
            length += len(self.engine.tokenizer.token_piece(lp.id))
            kept += 1
        del self.logprobs[kept:]

    def _emit(self, upto: int) -> str:
        piece = self.text[self._emitted : upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        if piece and self.n_top is not None:
            self.piece_tokens.append(len(self.logprobs))
        return piece

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        if self.engine.prefix_cache is not None:  # this conversation's KV, for its next turn: every id but
            # the newest, which never ran (or ran as a draft it refused: its position holds the draft's KV)
            self.engine.prefix_cache.store((self.prompt_ids + self.token_ids)[:-1], self.session)
        self.engine.release(self.session)
        return self._emit(len(self.text))

    def step(self) -> str:
        """One pass of the model for this generation alone (the scheduler batches them instead): new text."""
        ids = self.next_input()
        logits, tokens, hiddens = self.engine.step_drawing([ids], [self.session], [self.draw()])
        return self.advance(len(ids), logits[0], hiddens[0], tokens[0])

    def __iter__(self) -> Iterator[str]:
        while not self.done:
            piece = self.step()
            if piece:
                yield piece

    def run(self) -> str:
        """Generate to the end and return the whole text."""
        for _ in self:
            pass
        return self.text
