"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import ModelError


class InvalidParameterError(ModelError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps all
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 is none
    seed: int | None = None  # same seed, same text

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InvalidParameterError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidParameterError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidParameterError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise InvalidParameterError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def penalize(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """CTRL's repetition penalty: tokens already seen lose likelihood (divide if positive, else multiply)."""
    logits = logits.astype(np.float64)
    if penalty != 1.0 and history:
        seen = np.unique(np.asarray(history))
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    return logits


class Sampler:
    """Draws tokens for one generation; its random stream is fixed by the seed."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def probabilities(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """The distribution sampled from: penalty, then temperature, then top-k, then top-p."""
        p = self.params
        logits = penalize(logits, history, p.repetition_penalty) / p.temperature
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]  # mass of strictly more likely tokens
            probs[order[before >= p.top_p]] = 0.0  # keeps the smallest set reaching top_p
            probs /= probs.sum()
        return probs

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(penalize(logits, history, self.params.repetition_penalty)))
        return int(self.rng.choice(logits.size, p=self.probabilities(logits, history)))
