"""Drafts from a small model with the served model's vocabulary, held whole here (`--draft FILE`).

It proposes its own greedy continuation of the text so far; the served model checks the drafts in one step
(models/speculative.py), so the output is the served model's whatever the draft says. The drafter keeps the
KV of the last few texts it drafted for (the scheduler's generations): the next call for a text that starts
the same way only runs the ids that differ, after forgetting the positions past the common prefix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.engine import Engine
from models.llama import Session
from models.prefix_cache import common_prefix


class ModelDrafter:
    name = "draft-model"

    def __init__(self, engine: Engine, sessions: int = 16):
        self.engine = engine
        self.max_sessions = sessions
        self._sessions: list[tuple[list[int], Session]] = []  # (ids run through it, its KV), most recent last

    @classmethod
    def load(
        cls, path: str | Path, tokens: list[str], backend: str = "auto", threads: int | None = None
    ) -> ModelDrafter:
        """A draft model for a model whose vocabulary is `tokens`: refused unless its own is the same."""
        engine = Engine.load(path, backend, threads)
        mine, theirs = engine.model.file.metadata.get("tokenizer.ggml.tokens"), tokens
        if mine != theirs:
            raise ValueError(
                f"--draft {Path(path).name}: its vocabulary ({len(mine or [])} tokens) is not the served model's"
                f" ({len(theirs or [])} tokens); a draft model must share it token for token"
            )
        return cls(engine)

    def draft(self, history: list[int], k: int) -> list[int]:
        ctx = self.engine.model.config.context_length
        if k <= 0 or not history or len(history) + k > ctx:
            return []
        ran, session = self._closest(history)
        # the last id runs again: its logits give the first draft
        common = min(common_prefix(ran, history), len(history) - 1)
        self.engine.rollback(session, common)
        logits = self.engine.next_logits(history[common:], session)
        drafts: list[int] = []
        while True:
            drafts.append(int(np.argmax(logits)))
            if len(drafts) == k:
                break
            logits = self.engine.next_logits(drafts[-1:], session)
        self._sessions.append((history + drafts[:-1], session))
        return drafts

    def _closest(self, history: list[int]) -> tuple[list[int], Session]:
        """The kept session sharing the longest prefix with history (taken out), or a new one."""
        best, best_len = None, 0
        for i, (ran, _) in enumerate(self._sessions):
            n = common_prefix(ran, history)
            if n > best_len:
                best, best_len = i, n
        if best is None:
            if len(self._sessions) >= self.max_sessions:
                self._sessions.pop(0)  # the least recently used
            return [], Session()
        return self._sessions.pop(best)
