"""Every CUDA kernel the product launches, run by the PTX emulator under its sanitizer, against NumPy.

The production Device class (kernels/cuda_backend.py) runs unchanged over tests/ptx/driver.py's fake
pycuda; its kernels come from PTX that nvcc builds from the same sources as the committed fatbin
(checked first). Smoke sizes by default; APPLIANCE_TESTS=full runs larger shapes. The whole backend
(engine, scheduler, offload worker) on the emulator: tests/test_cuda_backend_emulated.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from kernels import cuda_backend as cb
from kernels import reference
from kernels.cuda import build
from kernels.dequant import dequantize
from tests.gguf_factory import K_FORMATS, random_k_blocks
from tests.ptx import compile as ptx_compile
from tests.ptx import driver, mirror
from tests.scale import full_or

FORMATS = {fmt: qt for qt, fmt in cb.KERNEL_FORMATS.items()}
Q8 = np.dtype([("ds", "<f2", 2), ("qs", "i1", 32)])  # block_q8_1 as the kernels write it


@pytest.fixture(scope="module")
def gpu():
    return driver.FakeGpu()


@pytest.fixture(scope="module")
def real_gpu():
    """With MIRROR_ENV set (`make gpu-check`): this machine's GPU, through the real pycuda; set to
    "emulated", a second emulated GPU instead (the mirrored run's path, exercised without a GPU)."""
    mode = os.environ.get(mirror.MIRROR_ENV)
    if mode == "emulated":
        with pytest.MonkeyPatch.context() as mp:
            driver.install(mp, driver.FakeGpu())
            return cb.Device()
    return cb.Device() if mode else None


@pytest.fixture
def dev(gpu, real_gpu, monkeypatch):
    """The production Device over the fake driver (one emulated GPU per module: the PTX loads once);
    under `make gpu-check`, every launch mirrored on the real GPU and each read-back compared."""
    driver.install(monkeypatch, gpu)
    if not hasattr(gpu, "device"):
        gpu.device = cb.Device()
    if real_gpu is None:
        yield gpu.device
        return
    both = mirror.MirrorDevice(gpu.device, real_gpu)
    yield both
    assert both.mismatches == [], "the GPU's results differ from the emulator's"


def test_the_emulated_ptx_is_built_from_the_sources_of_the_committed_fatbin():
    _, hashes = ptx_compile.product_ptx()
    manifest = json.loads(build.MANIFEST.read_text())
    assert hashes == manifest["sources"], "the fatbin is stale: run `make fatbin` and commit it"
    assert build.stale_reasons() == []


def q8_1(x: np.ndarray) -> np.ndarray:
    """NumPy's form of common.cuh's quantize_lane: 32 values to one block (d = amax / 127, rounded half away)."""
    b = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(amax[:, None] == 0, 0, b / d[:, None])
    out = np.zeros(len(b), Q8)
    out["qs"] = np.trunc(r + np.copysign(np.float32(0.5), r))
    out["ds"][:, 0], out["ds"][:, 1] = d, b.sum(axis=1)
    return out


def exact_sums(blocks: np.ndarray) -> np.ndarray:
    """Blocks whose sum field is d * sum(qs), so that a mat-vec's result is exactly W . q8_values(blocks)
    (quantize_lane writes the float sum instead, which the formats' offset terms then use)."""
    out = blocks.copy()
    out["ds"][:, 1] = blocks["ds"][:, 0].astype(np.float32) * blocks["qs"].astype(np.float32).sum(axis=1)
    return out


def sum_rounding(blocks: np.ndarray, w: np.ndarray, width: int) -> np.ndarray:
    """Bound on what the half-precision sum field moves a mat-vec result by: a format's offset term
    c * s has |c| at most the block's largest weight, and s is off by at most 2^-11 of itself."""
    s = np.abs(blocks["ds"][:, 1].astype(np.float32)).reshape(width, -1)
    wmax = np.abs(w).reshape(w.shape[0], -1, 32).max(axis=2)
    return s @ wmax.T * 2.0**-11 + 1e-4


def q8_values(blocks: np.ndarray) -> np.ndarray:
    return (blocks["qs"].astype(np.float32) * blocks["ds"][:, :1].astype(np.float32)).reshape(-1)


def weights(rng, fmt: str, rows: int, cols: int) -> np.ndarray:
    """Random weights in a kernel format, as the file's bytes [rows, row_bytes]."""
    qt = FORMATS[fmt]
    if qt in K_FORMATS:
        return random_k_blocks(rng, (rows, cols), qt, 16 / np.sqrt(cols))  # sums of order 1 at any width
    data = (rng.standard_normal((rows, cols)) * 0.5).astype(np.float32)
    return data.astype(np.float16).view(np.uint8) if qt == Q.F16 else quants.quantize(data, qt)


def upload_weights(dev, raw):
    return dev.upload(np.ascontiguousarray(raw))


def cols_for(fmt: str) -> int:
    return full_or(1024, 256 if FORMATS[fmt] in K_FORMATS else 128)


# -- norms and quantization ---------------------------------------------------------------------------


def test_rmsnorm_quant_writes_floats_and_8bit_blocks(dev):
    rng = np.random.default_rng(1)
    rows, dim = 3, full_or(2048, 320)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    y, q = dev.alloc(rows * dim * 4), dev.alloc(rows * dim // 32 * 36)
    dev.rmsnorm_quant(dev.upload(x), dev.upload(w), rows, dim, 1e-5, y, q)
    got = dev.to_host(y, (rows, dim))
    np.testing.assert_allclose(got, reference.rmsnorm(x, w, 1e-5), rtol=2e-5, atol=2e-5)
    blocks = dev.to_host(q, (rows * dim // 32,), Q8)
    want = q8_1(got)
    np.testing.assert_array_equal(blocks["qs"], want["qs"])
    np.testing.assert_allclose(blocks["ds"].astype(np.float32), want["ds"].astype(np.float32), rtol=2e-3, atol=1e-3)


def test_quantize_q8_1_matches_numpy_including_a_zero_block(dev):
    rng = np.random.default_rng(2)
    rows, dim = 2, full_or(4096, 288)  # 9 blocks: the second grid column has one live warp
    x = rng.standard_normal((rows, dim)).astype(np.float32) * 3
    x[1, :32] = 0.0
    q = dev.alloc(rows * dim // 32 * 36)
    dev.quantize(dev.upload(x), rows, dim, q)
    blocks = dev.to_host(q, (rows * dim // 32,), Q8)
    want = q8_1(x)
    np.testing.assert_array_equal(blocks["qs"], want["qs"])
    np.testing.assert_allclose(blocks["ds"].astype(np.float32), want["ds"].astype(np.float32), rtol=2e-3, atol=1e-3)


def test_silu_mul(dev):
    rng = np.random.default_rng(3)
    n = full_or(100_000, 1000)
    g, u = (rng.standard_normal(n).astype(np.float32) * 4 for _ in range(2))
    out = dev.alloc(n * 4)
    dev.silu_mul(dev.upload(g), dev.upload(u), out, n)
    np.testing.assert_allclose(dev.to_host(out, (n,)), reference.silu(g) * u, rtol=1e-5, atol=1e-6)


# -- mat-vec, SwiGLU, mat-mat -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_matvec_every_format_and_width(dev, fmt):
    rng = np.random.default_rng(4)
    rows, cols = 6, cols_for(fmt)  # 6 rows: the second block's last two warps return at once
    raw = weights(rng, fmt, rows, cols)
    w = dequantize(raw, FORMATS[fmt], (rows, cols))
    wd = upload_weights(dev, raw)
    for width in cb.WIDTHS:
        x = rng.standard_normal((width, cols)).astype(np.float32)
        act = exact_sums(q8_1(x))
        ldo = rows + 3
        base = rng.standard_normal((width, ldo)).astype(np.float32)
        for accumulate in (False, True):
            out = dev.upload(base)
            dev.matvec(fmt, wd, rows, cols, dev.upload(act), out, width, ldo, accumulate)
            got = dev.to_host(out, (width, ldo))
            want = q8_values(act).reshape(width, cols) @ w.T + (base[:, :rows] if accumulate else 0)
            bound = sum_rounding(act, w, width) + 1e-5 * np.abs(want)
            assert (np.abs(got[:, :rows] - want) <= bound).all(), f"b{width} acc={accumulate}: {got[:, :rows] - want}"
            np.testing.assert_array_equal(got[:, rows:], base[:, rows:])  # nothing written past the rows


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_swiglu_vec_every_format(dev, fmt):
    rng = np.random.default_rng(5)
    rows, cols = 64, cols_for(fmt)
    raw_g, raw_u = weights(rng, fmt, rows, cols), weights(rng, fmt, rows, cols)
    wg, wu = (dequantize(r, FORMATS[fmt], (rows, cols)) for r in (raw_g, raw_u))
    gd, ud = upload_weights(dev, raw_g), upload_weights(dev, raw_u)
    for width in cb.WIDTHS:
        x = rng.standard_normal((width, cols)).astype(np.float32)
        act = exact_sums(q8_1(x))
        out = dev.alloc(width * rows // 32 * 36)
        dev.swiglu_vec(fmt, gd, ud, rows, cols, dev.upload(act), out, width)
        blocks = dev.to_host(out, (width * rows // 32,), Q8)
        xa = q8_values(act).reshape(width, cols)
        h = reference.silu(xa @ wg.T) * (xa @ wu.T)
        np.testing.assert_allclose(q8_values(blocks).reshape(width, rows), h, rtol=0, atol=np.abs(h).max() / 100)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_matmat_tensor_cores_every_format(dev, fmt):
    rng = np.random.default_rng(6)
    rows, cols, tokens = 70, cols_for(fmt), full_or(130, 5)  # 70 rows: a second, mostly empty tile
    raw = weights(rng, fmt, rows, cols)
    w = dequantize(raw, FORMATS[fmt], (rows, cols))
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    ldy = rows + 2
    base = rng.standard_normal((tokens, ldy)).astype(np.float32)
    y = dev.upload(base)
    dev.matmat(fmt, upload_weights(dev, raw), rows, cols, dev.upload(x), tokens, y, ldy, True)
    got = dev.to_host(y, (tokens, ldy))
    want = x.astype(np.float16).astype(np.float32) @ w.astype(np.float16).astype(np.float32).T + base[:, :rows]
    np.testing.assert_allclose(got[:, :rows], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    np.testing.assert_array_equal(got[:, rows:], base[:, rows:])


# -- embedding, RoPE, attention, sampling -------------------------------------------------------------


@pytest.mark.parametrize("fmt", [*FORMATS, "f32"])
def test_embed_every_format(dev, fmt):
    rng = np.random.default_rng(7)
    vocab, dim = 9, cols_for(fmt) if fmt != "f32" else 64
    if fmt == "f32":
        raw = rng.standard_normal((vocab, dim)).astype(np.float32).view(np.uint8)
        table = raw.view(np.float32)
    else:
        raw = weights(rng, fmt, vocab, dim)
        table = dequantize(raw, FORMATS[fmt], (vocab, dim))
    ids = np.array([3, 0, 8, 3], np.int32)
    out = dev.alloc(len(ids) * dim * 4)
    dev.embed(fmt, dev.upload(raw), dim, dev.upload(ids), out, len(ids))
    np.testing.assert_allclose(dev.to_host(out, (len(ids), dim)), table[ids], rtol=1e-6, atol=1e-7)


def rope_case(E: int, T: int):
    inv_freq = (10000.0 ** (-np.arange(0, E, 2) / E)) * np.linspace(1.0, 0.25, E // 2)  # not the plain schedule
    positions = np.array([0, 5, 70_001][:T] + list(range(7, 7 + max(0, T - 3))), np.int32)
    return inv_freq, positions


def test_rope_store_rotates_queries_and_keys_and_stores_values(dev):
    rng = np.random.default_rng(8)
    H, G, E, T, layers, ctx, slots = 4, 2, 64, 3, 2, 70_010, 2
    inv_freq, positions = rope_case(E, T)
    slot_ids = np.array([1, 0, 1], np.int32)
    scale, layer = 1.25, 1
    qkv = rng.standard_normal((T, (H + 2 * G) * E)).astype(np.float32)
    layer_stride = ctx * G * E
    slot_stride = layers * layer_stride
    cache_bytes = slots * slot_stride * 2
    k_cache, v_cache = dev.alloc(cache_bytes), dev.alloc(cache_bytes)
    q = dev.alloc(T * H * E * 4)
    dev.launch(
        "rope_store", "PPPiiiPfPPPlli", (T, 1), (128, 1, 1),
        dev.upload(qkv), dev.upload(positions), dev.upload(slot_ids), H, G, E, dev.upload(inv_freq.astype(np.float64)),
        scale, q, k_cache, v_cache, slot_stride, layer_stride, layer,
    )  # fmt: skip
    cos, sin = reference.rope_tables(positions, inv_freq, scale)
    want_q = reference.rope(qkv[:, : H * E].reshape(T, H, E), cos, sin)
    want_k = reference.rope(qkv[:, H * E : (H + G) * E].reshape(T, G, E), cos, sin)
    np.testing.assert_allclose(dev.to_host(q, (T, H, E)), want_q, rtol=1e-5, atol=1e-5)
    kc = dev.to_host(k_cache, (slots, layers, ctx, G, E), np.float16)
    vc = dev.to_host(v_cache, (slots, layers, ctx, G, E), np.float16)
    for t in range(T):
        k = kc[slot_ids[t], layer, positions[t]].astype(np.float32)
        np.testing.assert_allclose(k, want_k[t], rtol=2e-3, atol=2e-3)
        v = vc[slot_ids[t], layer, positions[t]]
        np.testing.assert_array_equal(v, qkv[t, (H + G) * E :].reshape(G, E).astype(np.float16))


@pytest.mark.parametrize("E", cb.HEAD_DIMS)
def test_attend_split_and_combine_match_causal_attention(dev, E):
    rng = np.random.default_rng(9)
    H, G, layers, slots, splits = 6, 2, 2, 2, 3
    ctx = full_or(300, 40)
    T, layer = 2, 1
    positions = np.array([ctx - 1, 3], np.int32)  # a long and a short context (some stretches are empty)
    slot_ids = np.array([0, 1], np.int32)
    layer_stride, slot_stride = ctx * G * E, layers * ctx * G * E
    kc = (rng.standard_normal((slots, layers, ctx, G, E)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((slots, layers, ctx, G, E)).astype(np.float16)
    q = rng.standard_normal((T, H, E)).astype(np.float32)
    part_ml, part_acc = dev.alloc(T * H * splits * 2 * 4), dev.alloc(T * H * splits * E * 4)
    out = dev.alloc(T * H * E * 4)
    dq, dk, dv = dev.upload(q), dev.upload(kc), dev.upload(vc)
    dp, ds = dev.upload(positions), dev.upload(slot_ids)
    dev.launch(
        f"attend_split_e{E}", "PPPPPiilliiPP", (G, splits, T), (128, 1, 1),
        dq, dk, dv, dp, ds, H, G, slot_stride, layer_stride, layer, splits, part_ml, part_acc,
    )  # fmt: skip
    dev.launch("attend_combine", "PPiiiP", (H, T), (E, 1, 1), part_ml, part_acc, H, E, splits, out)
    got = dev.to_host(out, (T, H, E))
    for t in range(T):
        n = positions[t] + 1
        k = kc[slot_ids[t], layer, :n].astype(np.float32)
        v = vc[slot_ids[t], layer, :n].astype(np.float32)
        want = reference.attention(q[t : t + 1], k, v, n - 1)
        np.testing.assert_allclose(got[t], want[0], rtol=1e-4, atol=1e-4)


def splitmix_draw(seed: int, step: int) -> float:
    m = (1 << 64) - 1
    s = ((seed << 32) ^ ((step * 0x9E3779B97F4A7C15) & m) ^ 1) & m
    s = (s + 0x9E3779B97F4A7C15) & m
    s = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & m
    s = ((s ^ (s >> 27)) * 0x94D049BB133111EB) & m
    s ^= s >> 31
    return float(np.float32((s >> 40) * (1.0 / 16777216.0)))


def expected_token(z: np.ndarray, t: float, top_k: int, top_p: float, u: float) -> int:
    """sample.cu's rule: keep the top_k, then the smallest most-likely set reaching top_p, then draw in id order."""
    z = (z / np.float32(t)).astype(np.float32)
    p = np.exp((z - z.max()).astype(np.float64))
    keep = np.ones(len(z), bool)
    if 0 < top_k < len(z):
        keep &= z >= np.sort(z)[-top_k]
    if top_p < 1.0:
        order = np.argsort(-z, kind="stable")
        order = order[keep[order]]
        mass = np.cumsum(p[order])
        n = int(np.searchsorted(mass, top_p * p[keep].sum())) + 1
        keep &= z >= z[order[n - 1]]
    mass = np.cumsum(np.where(keep, p, 0.0))
    return int(np.searchsorted(mass, u * mass[-1], side="right"))


def test_sample_greedy_and_seeded_draws(dev):
    rng = np.random.default_rng(10)
    vocab = full_or(49152, 3000)
    rows = 4
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    logits[0, [17, 2900]] = 40.0  # a tie: the lower id wins
    cases = [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 40, 1.0), (0.7, 0, 0.9)]
    params = np.concatenate([cb.sample_params(1, t, k, p, seed=11, step=3) for t, k, p in cases])
    lg, pd, out = dev.upload(logits), dev.upload(params), dev.alloc(rows * 4)
    dev.sample(lg, vocab, pd, out, rows)
    got = dev.to_host(out, (rows,), np.int32)
    assert got[0] == 17
    for r in range(1, rows):
        t, k, p = cases[r]
        assert got[r] == expected_token(logits[r], t, k, p, splitmix_draw(11, 3)), f"row {r} ({cases[r]})"
