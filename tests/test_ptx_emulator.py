"""The PTX emulator itself: SIMT semantics on tiny kernels compiled in the test, and each sanitizer check.

Every check is shown both ways: the faulty kernel raises SanitizerError naming kernel, address and
lanes, and its corrected twin runs clean. tests/test_cuda_emulated.py runs the product's kernels.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.ptx.compile import cu_ptx
from tests.ptx.emulator import EmulatorError, Program
from tests.ptx.memory import GLOBAL_BASE, GlobalMemory, SanitizerError
from tests.ptx.parse import parse

HEADER = '#include "common.cuh"\n'


def run(src: str, name: str, grid, block, *args, shared: int = 0):
    """Launch `name` from CUDA source; arrays are copied in and back (each in its own allocation)."""
    gmem = GlobalMemory()
    kernel = Program(parse(cu_ptx(HEADER + src)), gmem).kernel(name)
    raw, arrays = [], []
    for a in args:
        if isinstance(a, np.ndarray):
            ptr = gmem.alloc(a.nbytes)
            gmem.view(ptr - GLOBAL_BASE, a.nbytes)[:] = a.reshape(-1).view(np.uint8)
            arrays.append((a, ptr))
            raw.append(struct.pack("<Q", ptr))
        elif isinstance(a, float):
            raw.append(struct.pack("<f", a))
        else:
            raw.append(struct.pack("<i", a))
    kernel.launch(gmem, grid, block, kernel.pack_params(raw), shared)
    for a, ptr in arrays:
        a.reshape(-1).view(np.uint8)[:] = gmem.view(ptr - GLOBAL_BASE, a.nbytes)


# -- semantics -------------------------------------------------------------------------------------------

DIVERGE = """
extern "C" __global__ void diverge(const int* n, int* out) {
    const int t = threadIdx.x + blockIdx.x * blockDim.x;
    int acc = 0;
    for (int i = 0; i < n[t]; ++i) acc += (i & 1) ? i * 3 : -i;  // a different trip count per thread
    if (t % 3 == 0) acc = -acc;
    else if (t % 3 == 1) acc ^= 0x55;
    out[t] = acc + __shfl_xor_sync(0xffffffffu, t, 5);  // every lane is back before the shuffle
}
"""


def test_divergent_loops_and_branches_reconverge():
    n = np.random.default_rng(0).integers(0, 20, 64).astype(np.int32)
    out = np.zeros(64, np.int32)
    run(DIVERGE, "diverge", (2,), (32,), n, out)
    want = []
    for t, k in enumerate(n):
        acc = sum(i * 3 if i & 1 else -i for i in range(k))
        acc = -acc if t % 3 == 0 else acc ^ 0x55 if t % 3 == 1 else acc
        want.append(acc + ((t % 32) ^ 5) + 32 * (t // 32))
    np.testing.assert_array_equal(out, want)


WARP_OPS = """
extern "C" __global__ void warp_ops(const float* x, float* out, unsigned* ballots) {
    const int l = threadIdx.x;
    const float v = x[l];
    out[l] = __shfl_up_sync(0xffffffffu, v, 3);
    out[32 + l] = __shfl_down_sync(0xffffffffu, v, 5);
    out[64 + l] = __shfl_sync(0xffffffffu, v, 7);
    out[96 + l] = __shfl_xor_sync(0xffffffffu, v, 9, 16);  // width 16: within half-warps
    out[128 + l] = __shfl_down_sync(0xffffffffu, v, 2, 8);  // clamped at the end of each 8-lane segment
    ballots[l] = __ballot_sync(0xffffffffu, v > 0.0f);
    ballots[32 + l] = __all_sync(0xffffffffu, v > -100.0f) + 2 * __any_sync(0xffffffffu, v > 100.0f);
}
"""


def test_shuffle_modes_widths_and_votes():
    x = np.random.default_rng(1).standard_normal(32).astype(np.float32)
    out, ballots = np.zeros(160, np.float32), np.zeros(64, np.uint32)
    run(WARP_OPS, "warp_ops", (1,), (32,), x, out, ballots)
    lane = np.arange(32)
    np.testing.assert_array_equal(out[:32], x[np.where(lane >= 3, lane - 3, lane)])
    np.testing.assert_array_equal(out[32:64], x[np.where(lane + 5 < 32, lane + 5, lane)])
    np.testing.assert_array_equal(out[64:96], np.full(32, x[7]))
    np.testing.assert_array_equal(out[96:128], x[(lane & ~15) | ((lane ^ 9) & 15)])
    seg_end = (lane & ~7) + 7
    np.testing.assert_array_equal(out[128:160], x[np.where(lane + 2 <= seg_end, lane + 2, lane)])
    assert (ballots[:32] == int(sum(1 << i for i in range(32) if x[i] > 0))).all()
    assert (ballots[32:] == 1).all()


ARITH = """
extern "C" __global__ void arith(const float* x, const int* a, float* f, int* i, unsigned short* h) {
    const int t = threadIdx.x;
    f[t] = rsqrtf(fabsf(x[t]) + 1.0f);
    f[32 + t] = __expf(x[t]);
    f[64 + t] = x[t] / 3.0f;
    f[96 + t] = roundf(x[t] * 10.0f);
    f[128 + t] = __half2float(__float2half(x[t]));
    i[t] = __dp4a(a[t], a[31 - t], t);
    i[32 + t] = __vsubss4(a[t], 0x20202020);
    i[64 + t] = a[t] / (t - 16 == 0 ? 1 : t - 16);
    i[96 + t] = (int)(x[t] * 1e9f);  // saturates
    h[t] = __half_as_ushort(__float2half_rn(x[t] * 1000.0f));
}
"""


def test_arithmetic_conversions_and_byte_ops():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(32) * 4).astype(np.float32)
    x[:2] = [0.05, -0.25]  # roundf's halves: 0.5 and -2.5 away from zero
    a = rng.integers(-(2**31), 2**31, 32).astype(np.int32)
    f, i, h = np.zeros(160, np.float32), np.zeros(128, np.int32), np.zeros(32, np.uint16)
    run(ARITH, "arith", (1,), (32,), x, a, f, i, h)
    np.testing.assert_allclose(f[:32], 1 / np.sqrt(np.abs(x) + 1), rtol=1e-6)
    np.testing.assert_allclose(f[32:64], np.exp(x), rtol=1e-5)
    np.testing.assert_allclose(f[64:96], x / 3, rtol=1e-6)
    np.testing.assert_array_equal(f[96:128], np.trunc(x * np.float32(10) + np.copysign(0.5, x)))
    np.testing.assert_array_equal(f[128:160], x.astype(np.float16).astype(np.float32))
    b = a.view(np.int8).reshape(32, 4).astype(int)
    rb = np.ascontiguousarray(a[::-1]).view(np.int8).reshape(32, 4).astype(int)
    np.testing.assert_array_equal(i[:32], (b * rb).sum(axis=1) + np.arange(32))
    sat = np.clip(b - 32, -128, 127).astype(np.int8).reshape(-1).view(np.int32)
    np.testing.assert_array_equal(i[32:64], sat)
    d = np.array([t - 16 if t != 16 else 1 for t in range(32)])
    np.testing.assert_array_equal(i[64:96], np.trunc(a / d).astype(np.int64))
    big = np.trunc((x * np.float32(1e9)).astype(np.float64))
    np.testing.assert_array_equal(i[96:128], np.clip(big, -(2**31), 2**31 - 1))
    np.testing.assert_array_equal(h, (x * np.float32(1000)).astype(np.float16).view(np.uint16))


DYNAMIC = """
extern "C" __global__ void dynamic_shared(const float* x, float* out) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}
"""


def test_dynamic_shared_memory_and_barriers():
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    run(DYNAMIC, "dynamic_shared", (1,), (64,), x, out, shared=256)
    np.testing.assert_array_equal(out, x[::-1])
    with pytest.raises(SanitizerError, match=r"dynamic_shared: out-of-bounds shared write .* by lanes \[63\]"):
        run(DYNAMIC, "dynamic_shared", (1,), (64,), x, out, shared=252)  # one float short


def test_an_unknown_opcode_is_an_error_naming_it():
    ptx = """
.version 8.0
.target sm_87
.address_size 64
.visible .entry odd(.param .u64 p)
{
    .reg .b32 %r<3>;
    mov.u32 %r1, 1;
    frobnicate.b32 %r2, %r1;
    ret;
}
"""
    with pytest.raises(EmulatorError, match="unknown opcode 'frobnicate.b32'"):
        Program(parse(ptx), GlobalMemory()).kernel("odd")


# -- the sanitizer -----------------------------------------------------------------------------------------

GLOBAL_OOB = """
extern "C" __global__ void shift_read(const float* x, float* out, int step) {
    out[threadIdx.x] = x[threadIdx.x + step];
}
"""


def test_out_of_bounds_global_read_names_kernel_address_and_lanes():
    x, out = np.zeros(32, np.float32), np.zeros(32, np.float32)
    run(GLOBAL_OOB, "shift_read", (1,), (32,), x, out, 0)
    with pytest.raises(SanitizerError, match=r"shift_read: out-of-bounds global read of 4 bytes at 0x7f.* \[30, 31\]"):
        run(GLOBAL_OOB, "shift_read", (1,), (32,), x, out, 2)
    with pytest.raises(SanitizerError, match=r"out-of-bounds global read .* lanes \[0\]"):
        run(GLOBAL_OOB, "shift_read", (1,), (32,), x, out, -1)


SHARED = """
extern "C" __global__ void shared_ops(const int* mode, float* out) {
    __shared__ float s[64];
    const int t = threadIdx.x, m = mode[0];
    if (m == 0) {  // correct: each thread its own slot, a barrier before reading others'
        s[t] = t;
        __syncthreads();
        out[t] = s[63 - t];
    } else if (m == 1) {  // reads slots nobody wrote
        if (t < 32) s[t] = t;
        __syncthreads();
        out[t] = s[(t + 16) % 64];
    } else if (m == 2) {  // every thread writes slot 0
        s[0] = t;
        __syncthreads();
        out[t] = s[0];
    } else if (m == 3) {  // reads a slot another thread wrote, with no barrier between
        s[t] = t;
        out[t] = s[t ^ 1];
    } else if (m == 4) {  // two threads write one slot in different instructions, with no barrier
        if (t == 3) s[5] = 1.0f;
        if (t == 9) reinterpret_cast<unsigned short*>(s)[10] = 7;  // a narrower store: its own instruction
        __syncthreads();
        out[t] = t;
    } else if (m == 7) {  // overwrites a slot others read, with no barrier between
        s[t] = t;
        __syncthreads();
        out[t] = s[(t + 1) % 64];
        s[t] = -t;
    } else if (m == 5) {  // past the end of the block's shared memory
        s[t + 1] = t;
        __syncthreads();
        out[t] = t;
    } else {  // a barrier only half the block reaches
        if (t < 32) __syncthreads();
        out[t] = t;
    }
}
"""


@pytest.mark.parametrize(
    "mode, message",
    [
        (1, r"shared_ops: read of uninitialised shared memory at 0x80 by threads \[16, 17, .*\(32 lanes\)"),
        (2, r"shared_ops: shared memory race \(two threads write one address in one instruction\) at 0x0"),
        (3, r"shared_ops: shared memory race \(read after write, no barrier between\) at 0x4: thread 1 wrote"),
        (4, r"shared_ops: shared memory race \(write after write, no barrier between\) at 0x14: threads 3 and \[9\]"),
        (7, r"shared_ops: shared memory race \(write after read, no barrier between\) at 0x0: thread 63 read"),
        (5, r"shared_ops: out-of-bounds shared write of 4 bytes at 0x100 .* by lanes \[63\]"),
        (6, r"shared_ops: barrier .* not reached by all threads of block 0: threads \[32, 33, .*\(32 lanes\)"),
    ],
)
def test_shared_memory_and_barrier_checks(mode, message):
    out = np.zeros(64, np.float32)
    with pytest.raises(SanitizerError, match=message):
        run(SHARED, "shared_ops", (1,), (64,), np.array([mode], np.int32), out)


def test_correct_shared_memory_use_runs_clean():
    out = np.zeros(64, np.float32)
    run(SHARED, "shared_ops", (1,), (64,), np.array([0], np.int32), out)
    np.testing.assert_array_equal(out, np.arange(64)[::-1])


PARTIAL_SHUFFLE = """
extern "C" __global__ void partial_shuffle(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // half the warp named in the mask is away
    out[threadIdx.x] = v;
}
"""


def test_a_shuffle_some_named_lanes_miss_is_an_error():
    with pytest.raises(SanitizerError, match=r"partial_shuffle: shfl.sync with member mask 0xffffffff .* \[16, 17"):
        run(PARTIAL_SHUFFLE, "partial_shuffle", (1,), (32,), np.zeros(32, np.float32))


MISALIGNED = """
extern "C" __global__ void misaligned(const unsigned char* p, int* out) {
    out[threadIdx.x] = *reinterpret_cast<const int*>(p + threadIdx.x * 2);
}
"""


def test_a_misaligned_global_access_is_an_error():
    with pytest.raises(SanitizerError, match=r"misaligned: misaligned read of 4 bytes at 0x.* lanes \[1, 3, 5"):
        run(MISALIGNED, "misaligned", (1,), (32,), np.zeros(128, np.uint8), np.zeros(32, np.int32))


# -- the mirror (`make gpu-check`: each kernel test on the emulator and the GPU, results compared) --------


def test_the_mirror_runs_both_devices_and_reports_where_their_results_differ(monkeypatch):
    """Without a GPU, labelled so: the emulator on both sides of tests/ptx/mirror.py. Same inputs give
    no difference; a subject whose output is overwritten is caught, naming the last launch."""
    from kernels import cuda_backend as cb
    from tests.ptx import driver
    from tests.ptx.mirror import MirrorDevice, differences

    sides = []
    for _ in range(2):
        driver.install(monkeypatch, driver.FakeGpu())
        sides.append(cb.Device())
    both = MirrorDevice(*sides)
    rng = np.random.default_rng(0)
    rows, cols, width = 8, 64, 2
    w = rng.integers(0, 256, (rows, cols // 32 * 34), dtype=np.uint8)
    w.reshape(rows, -1, 34)[:, :, :2] = np.array([0.01], np.float16).view(np.uint8)  # q8_0 blocks: a sane scale
    x, q, y = both.upload(rng.standard_normal((width, cols)).astype(np.float32)), both.alloc(256), both.alloc(256)
    both.quantize(x, width, cols, q)
    both.matvec("q8_0", both.upload(w), rows, cols, q, y, width, rows, False)
    got = both.to_host(y, (width, rows))
    assert both.mismatches == [] and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, sides[0].to_host(y, (width, rows)))
    sides[1].to_device(both.translate(y) + 4, np.float32([1e3]))  # the subject's row 0, column 1 goes wrong
    both.to_host(y, (width, rows))
    assert len(both.mismatches) == 1 and "after matvec_q8_0_b2" in both.mismatches[0]
    assert "1 of 16 differ, first at (0, 1)" in both.mismatches[0]
    with pytest.raises(ValueError, match="in no mirrored allocation"):
        both.translate(0x10)
    assert differences(np.int8([3, -2]), np.int8([4, -2])) == ""  # a quantization's rounding boundary
    assert differences(np.int32([7]), np.int32([8])) != ""  # a sampled token is exact
