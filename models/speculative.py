"""Speculative decoding: draft a few tokens cheaply, check them all in one pass of the model.

A decode step runs [last token, d1 .. dk] instead of [last token]. Row i's logits give the token
after input i, so the model's choice at row 0 is checked against d1, at row 1 against d2, and so on:
the longest agreeing prefix is kept, plus the model's own token after it, and every layer range
forgets the cache positions past it (KVCache.truncate; workers by the position on the next message).
A decode step is memory-bound (one pass over the weights whatever the rows), and over the LAN it is
one round trip, so m accepted drafts are m tokens for nearly free.

Greedy output is the same token for token as without drafts. Sampled output keeps the model's
distribution by the speculative sampling rule, for a draft that is one token with certainty (q = 1):
take d with probability p(d), else draw from p with d removed. The draws come from the generation's
seeded stream, so the same seed gives the same text (not the text of a run without drafts).

Drafts come from prompt lookup: the last few tokens' earlier occurrence in the prompt and the text
so far, and what followed it (code, summaries and chat about a document repeat their prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.sampling import Sampler

K_MAX = 6  # drafts per step at most


class Drafter(Protocol):
    """Proposes up to k tokens to follow `history` (prompt and generated ids); [] for no guess."""

    def draft(self, history: list[int], k: int) -> list[int]: ...


class PromptLookup:
    """The continuation of the latest earlier occurrence of the last n tokens, n from max_ngram down."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def draft(self, history: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        ids = np.asarray(history, dtype=np.int64)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if ids.size <= n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every earlier n-gram
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                at = int(hits[-1]) + n  # the most recent occurrence: the text's current habit
                return ids[at : at + k].tolist()
        return []


@dataclass
class Speculation:
    """An engine's drafting: who drafts, how many at most, and what one more row costs relative to a
    whole step (small on a memory-bound device, smaller still when a LAN round trip is in the step)."""

    drafter: Drafter
    k_max: int = K_MAX
    row_cost: float = 0.1


class DraftLength:
    """k for the next step of one generation, from its measured acceptance: the k that maximises
    expected tokens per unit of step time, E(k) = (1 - a^(k+1)) / (1 - a) over 1 + k * row_cost."""

    def __init__(self, spec: Speculation, prior: float = 0.6):
        self.spec = spec
        self.acceptance = prior  # per drafted token, a running estimate
        self.drafted = 0
        self.accepted = 0
        self.steps = 0

    def record(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.drafted += drafted
            self.accepted += accepted
            self.steps += 1
            # the longest agreeing prefix: accepted of drafted, and one refusal unless all agreed
            rate = accepted / (accepted + (accepted < drafted))
            self.acceptance = 0.7 * self.acceptance + 0.3 * rate

    @property
    def k(self) -> int:
        a = min(self.acceptance, 0.98)
        best, best_rate = 0, 1.0
        for k in range(1, self.spec.k_max + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (1 + k * self.spec.row_cost)
            if rate > best_rate:
                best, best_rate = k, rate
        return best if best else 1  # always probe with one: acceptance can only be measured by drafting


DRAFTS = ("auto", "lookup", "none")


def speculation_for(draft: str, offloading: bool = True) -> Speculation | None:
    """`--draft`: lookup drafts by prompt lookup; none: no drafts; auto: lookup when layers run on workers (a LAN
    round trip saved per accepted draft), none all local, where bench-offload measured drafts slower on the C
    kernels (a refused draft's row is not free there). A draft model's name or file is appliance/startup.py's
    (models/draft_model.py)."""
    if draft not in DRAFTS:
        raise ValueError(f"--draft must be one of {', '.join(DRAFTS)}, got {draft!r}")
    if draft == "none" or (draft == "auto" and not offloading):
        return None
    return Speculation(PromptLookup())


def choose(sampler: Sampler, logits: np.ndarray, history: list[int], draft: int | None) -> int:
    """The token at one verified row: the sampler's own choice when there is no draft or it is greedy
    (the draft is kept iff it is that choice); else the speculative sampling rule for q = 1."""
    if draft is None or sampler.params.temperature == 0:
        return sampler(logits, history)
    p = sampler.probabilities(logits, history)
    if sampler.rng.random() < p[draft]:
        return draft
    p = p.copy()
    p[draft] = 0.0
    total = p.sum()
    if total <= 0:  # the draft held all the mass after all (rounding): it is the only token left
        return draft
    return int(sampler.rng.choice(p.size, p=p / total))
