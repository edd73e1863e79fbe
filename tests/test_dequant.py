"""Each dequantization routine against a line-by-line transcription of ggml's C, and against gguf-py."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from kernels.dequant import DEQUANT, dequantize


def _f16(b: bytes) -> float:
    return float(np.frombuffer(b, dtype=np.float16)[0])


def c_transcription(qtype: Q, block: bytes) -> list[float]:
    """ggml's dequantize_row_* for one block, element by element."""
    if qtype == Q.Q4_0:
        d, qs = _f16(block[0:2]), block[2:18]
        return [((qs[j] & 0x0F) - 8) * d for j in range(16)] + [((qs[j] >> 4) - 8) * d for j in range(16)]
    if qtype == Q.Q4_1:
        d, m, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:20]
        return [(qs[j] & 0x0F) * d + m for j in range(16)] + [(qs[j] >> 4) * d + m for j in range(16)]
    if qtype in (Q.Q5_0, Q.Q5_1):
        d = _f16(block[0:2])
        m, off = (_f16(block[2:4]), 4) if qtype == Q.Q5_1 else (0.0, 2)
        qh = int.from_bytes(block[off : off + 4], "little")
        qs = block[off + 4 : off + 20]
        lo, hi = [], []
        for j in range(16):
            xh_0 = ((qh >> j) << 4) & 0x10
            xh_1 = (qh >> (j + 12)) & 0x10
            x0, x1 = (qs[j] & 0x0F) | xh_0, (qs[j] >> 4) | xh_1
            if qtype == Q.Q5_0:
                lo.append((x0 - 16) * d)
                hi.append((x1 - 16) * d)
            else:
                lo.append(x0 * d + m)
                hi.append(x1 * d + m)
        return lo + hi
    if qtype == Q.Q8_0:
        d = _f16(block[0:2])
        return [int.from_bytes(block[2 + j : 3 + j], "little", signed=True) * d for j in range(32)]
    raise AssertionError(qtype)


BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24, Q.Q8_0: 34}


@pytest.mark.parametrize("qtype", list(BLOCK_BYTES))
def test_block_formats_match_ggml_c_code(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, blocks = 3, 5
    raw = rng.integers(0, 256, size=(rows, blocks * BLOCK_BYTES[qtype]), dtype=np.uint8)
    # keep scales finite and modest: random bytes could spell inf/NaN halves
    for r in range(rows):
        for b in range(blocks):
            o = b * BLOCK_BYTES[qtype]
            raw[r, o : o + 2] = np.frombuffer(np.float16(rng.uniform(-2, 2)).tobytes(), np.uint8)
            if qtype in (Q.Q4_1, Q.Q5_1):
                raw[r, o + 2 : o + 4] = np.frombuffer(np.float16(rng.uniform(-2, 2)).tobytes(), np.uint8)
    ours = dequantize(raw, qtype, (rows, blocks * 32))
    expected = [
        [
            v
            for b in range(blocks)
            for v in c_transcription(qtype, raw[r, b * BLOCK_BYTES[qtype] :][: BLOCK_BYTES[qtype]].tobytes())
        ]
        for r in range(rows)
    ]
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, np.array(expected, dtype=np.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 1024)])
def test_matches_gguf_py_on_quantized_data(qtype, shape):
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    raw = quants.quantize(data, qtype) if qtype != Q.F32 else data
    ours = dequantize(raw, qtype, shape)
    np.testing.assert_array_equal(ours, quants.dequantize(raw, qtype).astype(np.float32).reshape(shape))
    # and it really is the original data, to the format's precision
    assert (
        np.abs(ours - data).max()
        <= {Q.Q4_0: 0.5, Q.Q4_1: 0.35, Q.Q5_0: 0.25, Q.Q5_1: 0.2}.get(qtype, 0.02) * np.abs(data).max()
    )


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS])
def test_k_formats_match_gguf_py(qtype):
    """gguf-py cannot quantize to K and I formats: compare on random blocks with sane f16 scales."""
    from tests.gguf_factory import random_k_blocks

    raw = random_k_blocks(np.random.default_rng(int(qtype)), (5, 3 * 256), qtype, scale=1.0)
    ours = dequantize(raw, qtype, (5, 768))
    np.testing.assert_array_equal(ours, quants.dequantize(raw, qtype).astype(np.float32))
    assert ours.std() > 0


def test_every_supported_format_has_a_test():
    tested = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32}
    tested |= {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS}
    assert set(DEQUANT) == tested
