"""RoPE's frequency schedule as a GGUF file declares it: plain, linear, YaRN, or Llama 3's per-pair factors.

Every schedule comes down to one inverse frequency per pair of a head (E/2 numbers) and one factor
that scales cos and sin (YaRN's attention temperature): `kernels.reference.rope_tables` turns those
and the positions into the tables every backend rotates with. Formulas as transformers'
`modeling_rope_utils` computes them, which is what the checkpoints were trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import UnsupportedModelError

SUPPORTED = ("none", "linear", "yarn", "llama3 (rope_freqs.weight)")


@dataclass(frozen=True)
class RopeSchedule:
    inv_freq: tuple[float, ...]  # E/2 angular speeds: position p turns pair i by p * inv_freq[i]
    attn_factor: float = 1.0  # scales cos and sin, so q·k by its square (YaRN's mscale)
    kind: str = "none"


def plain_inv_freq(theta: float, dim: int) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2: the original RoPE."""
    return theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def yarn(base: np.ndarray, theta: float, dim: int, factor: float, orig_ctx: int, fast: float, slow: float, ext: float):
    """YaRN: pairs that turn more than `fast` times over the original context keep their speed
    (extrapolate), those turning fewer than `slow` times are slowed by `factor` (interpolate), a
    linear ramp between; ext scales how much extrapolation is mixed in (1 = the paper's)."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(correction_dim(fast)), 0), min(math.ceil(correction_dim(slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 0.001), 0, 1)
    keep = (1 - ramp) * ext  # the share of the original speed
    return base / factor * (1 - keep) + base * keep


def schedule(meta: dict[str, Any], dim: int, theta: float, freq_factors: np.ndarray | None) -> RopeSchedule:
    """The schedule a file's metadata (and its optional rope_freqs.weight, Llama 3.1+) declares; an
    unknown scaling type is refused here, at load, rather than quietly rotating by the plain one."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.rope.{name}", default)

    base = plain_inv_freq(theta, dim)
    attn = float(key("scaling.attn_factor", 1.0))
    kind = str(key("scaling.type", "")).lower()
    factor = float(key("scaling.factor", key("scale_linear", 1.0)) or 1.0)
    if not kind:  # no type: llama.cpp applies a factor linearly (older files wrote only rope.scale_linear)
        kind = "linear" if factor != 1.0 else "none"
    if freq_factors is not None:
        factors = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
        if factors.shape != base.shape:
            raise UnsupportedModelError(f"rope_freqs.weight has {factors.size} factors; the heads need {base.size}")
        base, kind = base / factors, "llama3" if kind == "none" else kind
    if kind in ("none", "llama3"):
        return RopeSchedule(tuple(base), attn, kind)
    if kind == "linear":
        return RopeSchedule(tuple(base / factor), attn, kind)
    if kind == "yarn":
        orig = key("scaling.original_context_length")
        if orig is None:
            raise UnsupportedModelError(f"YaRN scaling needs {arch}.rope.scaling.original_context_length")
        inv = yarn(
            base,
            theta,
            dim,
            factor,
            int(orig),
            float(key("scaling.yarn_beta_fast", 32.0)),
            float(key("scaling.yarn_beta_slow", 1.0)),
            float(key("scaling.yarn_ext_factor", 1.0)),
        )
        mscale = key("scaling.yarn_attn_factor")
        mscale = float(mscale) if mscale is not None else (1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0)
        return RopeSchedule(tuple(inv), attn * mscale, kind)
    raise UnsupportedModelError(f"RoPE scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
