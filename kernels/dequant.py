"""GGML block formats to float32, one routine per format.

Each routine is written straight from the block layout in ggml's `ggml-common.h`, so that it can be
read against it line by line. Rows are independent: a weight of shape [rows, cols] is stored as
`rows` runs of `cols / block_size` blocks, and arrives here as uint8 of shape [rows, bytes_per_row].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q

QK = 32  # values per block in the 32-wide formats


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """View a [rows, bytes] uint8 array as [rows, n_blocks, block_bytes]."""
    rows = raw.reshape(-1, raw.shape[-1])
    return rows.reshape(rows.shape[0], -1, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two little-endian bytes per value (last axis) to float32, keeping a trailing axis of 1."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 packed bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """A little-endian uint32 per block -> its 32 bits as 0/1, bit j belonging to element j."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int8)


def dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 18)  # d: f16, qs: 16 bytes
    d, qs = _f16(b[..., 0:2]), b[..., 2:18]
    return ((_nibbles(qs) - 8) * d).reshape(b.shape[0], -1)


def dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 20)  # d: f16, m: f16, qs: 16 bytes
    d, m, qs = _f16(b[..., 0:2]), _f16(b[..., 2:4]), b[..., 4:20]
    return (_nibbles(qs) * d + m).reshape(b.shape[0], -1)


def dequant_q5_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 22)  # d: f16, qh: u32, qs: 16 bytes
    d, qh, qs = _f16(b[..., 0:2]), b[..., 2:6], b[..., 6:22]
    q = _nibbles(qs) | (_high_bits(qh).reshape(qs.shape[:-1] + (32,)) << 4)
    return ((q - 16) * d).reshape(b.shape[0], -1)


def dequant_q5_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 24)  # d: f16, m: f16, qh: u32, qs: 16 bytes
    d, m, qh, qs = _f16(b[..., 0:2]), _f16(b[..., 2:4]), b[..., 4:8], b[..., 8:24]
    q = _nibbles(qs) | (_high_bits(qh).reshape(qs.shape[:-1] + (32,)) << 4)
    return (q * d + m).reshape(b.shape[0], -1)


def dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 34)  # d: f16, qs: 32 x int8
    d, qs = _f16(b[..., 0:2]), np.ascontiguousarray(b[..., 2:34]).view(np.int8)
    return (qs.astype(np.float32) * d).reshape(b.shape[0], -1)


QK_K = 256  # values per super-block in the K formats


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and 8 six-bit mins packed into 12 bytes (ggml's get_scale_min_k4)."""
    q = packed.astype(np.int32)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 8 sub-blocks of 32: sub-block 2i is the low nibbles of bytes 32i..32i+31, 2i+1 the high."""
    q = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=-2).reshape(*qs.shape[:-1], 8, 32).astype(np.int8)


def dequant_q4_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 144)  # d: f16, dmin: f16, scales: 12 bytes, qs: 128 bytes
    d, dmin, (sc, mn) = _f16(b[..., 0:2]), _f16(b[..., 2:4]), _k_scales_mins(b[..., 4:16])
    q = _k_nibbles(b[..., 16:144])
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(b.shape[0], -1)


def dequant_q5_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 176)  # d, dmin: f16, scales: 12 bytes, qh: 32 bytes, qs: 128 bytes
    d, dmin, (sc, mn) = _f16(b[..., 0:2]), _f16(b[..., 2:4]), _k_scales_mins(b[..., 4:16])
    qh = b[..., 16:48]
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # sub-block s: bit s of qh[l]
    q = _k_nibbles(b[..., 48:176]) | (high.astype(np.int8) << 4)
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(b.shape[0], -1)


def dequant_q6_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 210)  # ql: 128 bytes, qh: 64 bytes, scales: 16 x int8, d: f16
    ql, qh = b[..., 0:128], b[..., 128:192]
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    halves = []
    for h in range(2):  # each half of 128 values: 64 bytes of ql, 32 bytes of qh
        lo, hi = ql[..., 64 * h : 64 * h + 64], qh[..., 32 * h : 32 * h + 32]
        low4 = [lo[..., 0:32] & 0x0F, lo[..., 32:64] & 0x0F, lo[..., 0:32] >> 4, lo[..., 32:64] >> 4]
        halves += [(low4[k].astype(np.int8) | (((hi >> (2 * k)) & 3).astype(np.int8) << 4)) - 32 for k in range(4)]
    q = np.stack(halves, axis=-2).reshape(*b.shape[:-1], 16, 16)  # 16 groups of 16 values, one scale each
    return ((d * sc)[..., None] * q).reshape(b.shape[0], -1)


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 64 bytes -> 256 values: each half of 128 is 32 bytes read four times, two bits at a
    time (shift 0, 2, 4, 6), so value 128h + 32j + l is bits 2j..2j+1 of byte 32h + l."""
    q = qs.reshape(*qs.shape[:-1], 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    return ((q >> shifts) & 3).reshape(*qs.shape[:-1], 256).astype(np.int8)


def _per_16(scale: np.ndarray) -> np.ndarray:
    """16 scales (one per 16 values, in value order) -> one per value."""
    return np.repeat(scale, 16, axis=-1)


def dequant_q2_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 84)  # scales: 16 bytes (low nibble scale, high nibble min), qs: 64 bytes, d, dmin: f16
    sc, d, dmin = b[..., 0:16], _f16(b[..., 80:82]), _f16(b[..., 82:84])
    q = _two_bit_planes(b[..., 16:80]).astype(np.float32)
    scale, low = _per_16((sc & 0x0F).astype(np.float32)), _per_16((sc >> 4).astype(np.float32))
    return (d * scale * q - dmin * low).reshape(b.shape[0], -1)


def dequant_q3_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 110)  # hmask: 32 bytes, qs: 64 bytes, scales: 12 bytes (16 six-bit), d: f16
    hmask, packed, d = b[..., 0:32], b[..., 96:108].astype(np.int32), _f16(b[..., 108:110])
    s = np.arange(16)
    low = np.where(s < 8, packed[..., s % 8] & 0x0F, packed[..., s % 8] >> 4)
    high = (packed[..., 8 + s % 4] >> (2 * (s // 4))) & 3
    scale = _per_16((low | (high << 4)).astype(np.float32) - 32)
    # the high bit of value 128h + 32j + l is bit 4h + j of hmask[l]; a clear bit subtracts 4
    hbit = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [..., 8, 32]: bit k of byte l
    q = _two_bit_planes(b[..., 32:96]) - 4 * (1 - hbit.reshape(*hmask.shape[:-1], 256).astype(np.int8))
    return (d * scale * q).reshape(b.shape[0], -1)


IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def dequant_iq4_nl(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 18)  # d: f16, qs: 16 bytes of 4-bit indices into a non-linear table
    return (_f16(b[..., 0:2]) * IQ4_VALUES[_nibbles(b[..., 2:18])]).reshape(b.shape[0], -1)


def dequant_iq4_xs(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 136)  # d: f16, scales_h: u16, scales_l: 4 bytes, qs: 128 bytes (8 groups of 32)
    d = _f16(b[..., 0:2])
    scales_h = np.ascontiguousarray(b[..., 2:4]).view("<u2").astype(np.int32)  # [..., 1]
    ib = np.arange(8)
    low = (b[..., 4 + ib // 2].astype(np.int32) >> (4 * (ib % 2))) & 0x0F
    scale = (low | (((scales_h >> (2 * ib)) & 3) << 4)).astype(np.float32) - 32  # [..., 8]
    q = IQ4_VALUES[_nibbles(b[..., 8:136].reshape(*b.shape[:-1], 8, 16))]  # [..., 8, 32]
    return ((d * scale)[..., None] * q).reshape(b.shape[0], -1)


def dequant_f16(raw: np.ndarray) -> np.ndarray:
    return np.asarray(raw).view(np.float16).astype(np.float32)


def dequant_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32."""
    return (np.asarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequant_f32(raw: np.ndarray) -> np.ndarray:
    return np.asarray(raw).view(np.float32)


DEQUANT: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: dequant_f32,
    Q.F16: dequant_f16,
    Q.BF16: dequant_bf16,
    Q.Q4_0: dequant_q4_0,
    Q.Q4_1: dequant_q4_1,
    Q.Q5_0: dequant_q5_0,
    Q.Q5_1: dequant_q5_1,
    Q.Q8_0: dequant_q8_0,
    Q.Q2_K: dequant_q2_k,
    Q.Q3_K: dequant_q3_k,
    Q.Q4_K: dequant_q4_k,
    Q.Q5_K: dequant_q5_k,
    Q.Q6_K: dequant_q6_k,
    Q.IQ4_NL: dequant_iq4_nl,
    Q.IQ4_XS: dequant_iq4_xs,
}

SUPPORTED_TYPES = tuple(t.name for t in DEQUANT)


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize a whole tensor to float32 of its logical (row-major, numpy-order) shape."""
    return DEQUANT[qtype](raw).reshape(shape)
