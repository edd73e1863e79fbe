"""The NumPy reference: each operation of a Llama decoder written as its formula, in float32.

This is the oracle every faster path is checked against, so clarity wins over speed here; the one
concession is that weights are dequantized once, by the backend, not on every call.
Shapes: T tokens, D model width, H query heads, G key/value heads, E head width.
"""

from __future__ import annotations

import math

import numpy as np


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def linear(x: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """x @ W^T. The checkpoint's W is [out, in]; the backend keeps W^T, [in, out], row-major, because a
    plain row-major product is about a quarter faster than x @ W.T at the batch sizes we decode with."""
    return x @ weight_t


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """scale * cos and sin of position * inv_freq[i], each [T, E/2]. inv_freq is the model's schedule
    (models.rope: theta^(-2i/E), or scaled); angles in float64, as positions reach 10^5."""
    angles = np.outer(positions.astype(np.float64), np.asarray(inv_freq, dtype=np.float64))
    return (scale * np.cos(angles)).astype(np.float32), (scale * np.sin(angles)).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, halves: bool = False) -> np.ndarray:
    """Rotate each pair of every head by its angle: pair i is (x[2i], x[2i+1]), or with `halves`
    (x[i], x[i + E/2]).

    GGUF files store Llama's q/k weights permuted for adjacent pairs (llama.cpp's "normal" RoPE), so
    no rotate-half shuffle is needed; Qwen's are stored as trained, for halves ("NeoX").
    x: [T, heads, E]; cos, sin: [T, E/2].
    """
    E = x.shape[-1]
    first, second = (slice(0, E // 2), slice(E // 2, E)) if halves else (slice(0, E, 2), slice(1, E, 2))
    x0, x1 = x[..., first], x[..., second]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., first] = x0 * c - x1 * s
    out[..., second] = x0 * s + x1 * c
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: int = 0, softcap: float = 0.0
) -> np.ndarray:
    """Causal grouped-query attention of T new queries over S = start + T cached keys.

    q: [T, H, E]; k, v: [S, G, E], H a multiple of G (each key head serves H/G query heads).
    Query t sits at position start + t and sees keys 0 .. start + t, or with a sliding window only
    the last `window` of them (Mistral's). With `softcap` c, each score s is c·tanh(s/c) (Gemma 2).
    Returns [T, H, E].
    """
    T, H, E = q.shape
    S, G, _ = k.shape
    group = H // G
    qg = q.reshape(T, G, group, E).transpose(1, 2, 0, 3)  # [G, group, T, E]
    kg, vg = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [G, S, E]
    scores = qg @ kg[:, None].swapaxes(-1, -2) / math.sqrt(E)  # [G, group, T, S]
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    behind = (start + np.arange(T))[:, None] - np.arange(S)[None, :]  # query position - key position
    visible = (behind >= 0) & ((behind < window) if window else True)
    scores = np.where(visible, scores, -np.inf)
    out = softmax(scores) @ vg[:, None]  # [G, group, T, E]
    return out.transpose(2, 0, 1, 3).reshape(T, H, E)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU in its tanh form (Gemma's `gelu_pytorch_tanh`)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """down(silu(gate(x)) * up(x)), with each weight transposed as `linear` takes it."""
    return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)
