"""Log-probabilities of tokens, as OpenAI's `logprobs` reports them: the model's own distribution.

A token's logprob is log softmax of the logits row it was chosen from, in float64, over the raw
logits: before the repetition penalty, temperature, top-k and top-p (those shape how a token is
drawn, not what the model thinks of it). Computed only for generations that ask, so one that does
not pays no full-vocabulary softmax per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP = 20  # the most alternatives per token OpenAI's API allows (chat's top_logprobs)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's logprob and the `top` most likely tokens of its row, best first, as (id, logprob)."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float64; NaN reads as -inf, as sampling reads it."""
    x = np.nan_to_num(np.asarray(logits, dtype=np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max)
    top = x.max(axis=-1, keepdims=True)
    with np.errstate(under="ignore", invalid="ignore"):
        shifted = x - top
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprob(logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """The logprob of `token` under one logits row [vocab], with that row's n_top best tokens."""
    lp = log_softmax(logits)
    top: tuple[tuple[int, float], ...] = ()
    if n_top > 0:
        n = min(n_top, lp.size)
        best = np.argpartition(-lp, n - 1)[:n]
        best = best[np.lexsort((best, -lp[best]))]  # by logprob, ties by id: the same order every time
        top = tuple((int(i), float(lp[i])) for i in best)
    return TokenLogprob(int(token), float(lp[token]), top)
