"""The native CPU kernels against the NumPy reference: every format, every variant this CPU runs,
odd sizes (rows not a multiple of the thread count, batches of 1 to 9)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from kernels import native
from kernels.dequant import dequantize
from kernels.reference import attention as reference_attention

pytestmark = pytest.mark.skipif(not native.available(), reason=native.why_missing())

# Per format: values per block, bytes per block, and where its float16 scales sit in a block.
LAYOUT = {
    Q.Q4_0: (32, 18, [0]),
    Q.Q4_1: (32, 20, [0, 2]),
    Q.Q5_0: (32, 22, [0]),
    Q.Q5_1: (32, 24, [0, 2]),
    Q.Q8_0: (32, 34, [0]),
    Q.IQ4_NL: (32, 18, [0]),
    Q.Q2_K: (256, 84, [80, 82]),
    Q.Q3_K: (256, 110, [108]),
    Q.Q4_K: (256, 144, [0, 2]),
    Q.Q5_K: (256, 176, [0, 2]),
    Q.Q6_K: (256, 210, [208]),
    Q.IQ4_XS: (256, 136, [0]),
}


def random_weight(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of qtype, [rows, bytes per row] uint8, with scales of a realistic size."""
    if qtype == Q.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    per_block, nbytes, scales = LAYOUT[qtype]
    blocks = rng.integers(0, 256, (rows, cols // per_block, nbytes), dtype=np.uint8)
    for at in scales:
        blocks[..., at : at + 2] = rng.uniform(0.001, 0.02, blocks.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: Q, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ dequantize(raw, qtype, (rows, cols)).T.astype(np.float64)


FLOAT = (Q.F32, Q.F16)
TYPES = sorted(native.NATIVE_TYPES)


@pytest.fixture(params=native.isas() if native.available() else [])
def isa(request):
    before = native.isa()
    native.set_isa(request.param)
    yield request.param
    native.set_isa(before)


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    before = native.threads()
    native.set_threads(request.param)
    yield request.param
    native.set_threads(before)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(qtype, isa, threads):
    rng = np.random.default_rng(int(qtype))
    per_block = native.block_size(qtype) if qtype not in FLOAT else 32
    for rows, cols, batch in [(37, 2 * per_block, 1), (5, 3 * per_block, 9), (131, per_block, 4)]:
        raw = random_weight(qtype, rows, cols, rng)
        x = rng.standard_normal((batch, cols)).astype(np.float32)
        want = reference(raw, qtype, rows, cols, x)
        got = native.matmul(raw, qtype, (rows, cols), x)
        assert got.shape == (batch, rows)
        # 8-bit activations round each value by up to 1/254 of its block's largest: about 0.3% of a dot
        # product's typical size; float weights take float activations.
        scale = np.abs(want).max()
        tol = 1e-5 if qtype in FLOAT else 1e-2
        err = np.abs(got - want).max() / scale
        assert err < tol, f"{qtype.name} [{rows}x{cols}] batch {batch} on {isa}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_variants_agree_with_portable_c(qtype):
    """Each variant sums the same integers as the portable C: only float rounding may differ."""
    rng = np.random.default_rng(7)
    per_block = native.block_size(qtype) if qtype not in FLOAT else 32
    raw = random_weight(qtype, 19, 4 * per_block, rng)
    x = rng.standard_normal((5, 4 * per_block)).astype(np.float32)  # 4 rows a kernel call, then 1
    before = native.isa()
    try:
        native.set_isa("generic")
        portable = native.matmul(raw, qtype, (19, 4 * per_block), x)
        for name in native.isas():
            native.set_isa(name)
            got = native.matmul(raw, qtype, (19, 4 * per_block), x)
            np.testing.assert_allclose(got, portable, rtol=1e-4, atol=1e-4 * np.abs(portable).max(), err_msg=name)
    finally:
        native.set_isa(before)


def test_quantize_is_the_reference_rounding_bit_for_bit(isa):
    """Every variant's q8 blocks: d = max|x| / 127, q = x * (1/d) rounded half to even, s = d * sum(q)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(32 * 40) * rng.uniform(0.01, 100, 32 * 40)).astype(np.float32)
    x[:32] = 0  # an all-zero block: d = 0
    x[32:64] = [127, *(np.arange(-15, 16) + 0.5)]  # d = 1: exact halves to round to even
    got = native.quantize(x)
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv[:, None]).astype(np.int8)
    np.testing.assert_array_equal(got["d"], d)
    np.testing.assert_array_equal(got["qs"], q)
    np.testing.assert_array_equal(got["s"], d * q.sum(axis=1, dtype=np.int32).astype(np.float32))


# (H, G, E, T, start): SmolLM2's heads at decode and prefill, head sizes the vector path takes
# (multiples of 64) and those it leaves to the portable C, whole and partial q8 blocks, a key count
# that is not a multiple of 8, and grouped units (many tokens) beside single-head units (few).
ATTENTION_SHAPES = [
    (9, 3, 64, 1, 0),
    (9, 3, 64, 1, 300),
    (9, 3, 64, 21, 5),
    (8, 2, 128, 3, 70),
    (6, 2, 40, 5, 9),
    (2, 1, 96, 7, 0),
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_attention_matches_reference(shape, isa, threads):
    H, G, E, T, start = shape
    rng = np.random.default_rng(H * E + T)
    q = rng.standard_normal((T, H, E)).astype(np.float32)
    k, v = (rng.standard_normal((start + T, G, E)).astype(np.float32) for _ in range(2))
    cached = [a.astype(native.KV_DTYPE).astype(np.float64) for a in (k, v)]  # as the float16 cache holds them
    want = reference_attention(q.astype(np.float64), *cached, start)
    got = native.attention(q, k, v, start)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=f"{shape} on {isa}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_a_row_does_not_depend_on_its_batch(qtype, isa):
    """Batches take 4 rows per kernel call: each row's sums in the one-row kernel's order, bit for bit."""
    rng = np.random.default_rng(11)
    per_block = native.block_size(qtype) if qtype not in FLOAT else 32
    raw = random_weight(qtype, 7, 3 * per_block, rng)
    x = rng.standard_normal((6, 3 * per_block)).astype(np.float32)
    together = native.matmul(raw, qtype, (7, 3 * per_block), x)
    alone = np.concatenate([native.matmul(raw, qtype, (7, 3 * per_block), row[None]) for row in x])
    np.testing.assert_array_equal(together, alone)


def test_bad_arguments_are_value_errors():
    raw = random_weight(Q.Q4_0, 4, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="bytes"):
        native.matmul(raw[:3], Q.Q4_0, (4, 64), np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="blocks"):
        native.matmul(raw, Q.Q4_0, (4, 48), np.zeros((1, 48), np.float32))
    with pytest.raises(ValueError, match="not available"):
        native.set_isa("no-such-isa")
    with pytest.raises(ValueError, match="attention takes"):
        native.attention(np.zeros((2, 4, 8), np.float32), np.zeros((1, 2, 8), np.float32), np.zeros((1, 2, 8)), 0)
