"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Every finite parameter gives a valid token: the arithmetic is done in float64 after subtracting
the maximum, so a temperature of 1e-300 (scaled logits that would overflow) is simply greedy-like,
and a huge one is near uniform.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from models.errors import ModelError

SEED_SPACE = 2**64  # seeds are folded into [0, 2**64): any integer, negative or huge, is a seed


class InvalidParameterError(ModelError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps all
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 is none
    seed: int | None = None  # same seed, same text; folded into [0, 2**64)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidParameterError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameterError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise InvalidParameterError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidParameterError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidParameterError(f"seed must be an integer, got {self.seed!r}")


def penalize(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """CTRL's repetition penalty: tokens already seen lose likelihood (divide if positive, else multiply).

    float64, NaN read as -inf and infinities clipped to the largest finite value, so the rest of
    sampling only ever sees finite numbers or -inf."""
    logits = np.nan_to_num(logits.astype(np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max)
    if penalty != 1.0 and history:
        seen = np.unique(np.asarray(history))
        with np.errstate(over="ignore", under="ignore"):
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        logits = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(np.float64).max)
    return logits


class Draw(NamedTuple):
    """One token chosen where the head ran (the GPU's `sample` kernel, same order of operations as
    Sampler.probabilities): its random stream is (seed, step), so a seed repeats its text on that backend."""

    temperature: float
    top_k: int
    top_p: float
    seed: int  # 32 bits
    step: int


class Sampler:
    """Draws tokens for one generation; its random stream is fixed by the seed."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % SEED_SPACE)
        seed = secrets.randbits(64) if params.seed is None else params.seed % SEED_SPACE
        self._device_seed = (seed ^ (seed >> 32)) & 0xFFFFFFFF  # the device's stream: not drawn from rng's

    def draw(self, step: int) -> Draw | None:
        """This sampler's token `step` as the device draws it, or None where only the host can (the kernel
        has no repetition penalty, and divides float32 logits by the temperature: below 1e-3 that overflows,
        where the host's float64 does not)."""
        p = self.params
        if p.repetition_penalty != 1.0 or 0 < p.temperature < 1e-3:
            return None
        return Draw(p.temperature, p.top_k, p.top_p, self._device_seed, step & 0xFFFFFFFF)

    def probabilities(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """The distribution sampled from: penalty, then temperature, then top-k, then top-p."""
        p = self.params
        logits = penalize(logits, history, p.repetition_penalty)
        top = logits.max()
        if top == -np.inf:  # nothing is possible: fall back to uniform rather than fail
            return np.full(logits.size, 1.0 / logits.size)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            scaled = (logits - top) / p.temperature  # <= 0, the best token exactly 0: exp never overflows
        scaled = np.nan_to_num(scaled, nan=-np.inf)
        if 0 < p.top_k < scaled.size:
            kth = np.partition(scaled, -p.top_k)[-p.top_k]
            scaled[scaled < kth] = -np.inf
        with np.errstate(under="ignore"):
            probs = np.exp(scaled)
        probs /= probs.sum()  # >= 1: the best token contributes exp(0)
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]  # mass of strictly more likely tokens
            probs[order[before >= p.top_p]] = 0.0  # keeps the smallest set reaching top_p
            probs /= probs.sum()
        return probs

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        if self.params.temperature == 0:
            if self.params.repetition_penalty == 1.0:  # plain greedy: argmax of the float32 row as it is,
                best = int(np.argmax(logits))  # unless it holds a NaN (argmax finds the first), read as -inf
                if not np.isnan(logits[best]):
                    return best
            return int(np.argmax(penalize(logits, history, self.params.repetition_penalty)))
        return int(self.rng.choice(logits.size, p=self.probabilities(logits, history)))
