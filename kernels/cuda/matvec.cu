// Decode: quantized weights times up to 8 activation columns (batch rows), integer dot products.
//
// Activations arrive as 8-bit blocks (norm.cu writes them); a warp computes one output row for all
// NCOLS columns, so each weight unit is read once per batch. Lane l takes units l, l+32, ... of
// the row, then the warp sums. With `accumulate` the result is added to `out` (the residual).
#include "common.cuh"

template <int QT>
__device__ __forceinline__ float dot_any(const uint8_t* row, int u, const Unit& w, const block_q8_1& a) {
    if constexpr (IsFloat<QT>::value) return float_unit_dot<QT>(row, u, a);
    else if constexpr (HasHalves<QT>::value) return unit_dot_halves(w, a);
    else return unit_dot(w, a);
}

template <int QT>
__device__ __forceinline__ Unit load_any(const uint8_t* row, int u) {
    if constexpr (IsFloat<QT>::value) return Unit{};
    else return load_unit<QT>(row, u);
}

// One row's dot products with NCOLS activation columns, summed over the warp (every lane gets them).
template <int QT, int NCOLS>
__device__ __forceinline__ void row_dots(const uint8_t* row, int units, const block_q8_1* act, float* sums) {
    const int lane = threadIdx.x;
#pragma unroll
    for (int c = 0; c < NCOLS; ++c) sums[c] = 0.0f;
    for (int u = lane; u < units; u += WARP) {
        const Unit w = load_any<QT>(row, u);
#pragma unroll
        for (int c = 0; c < NCOLS; ++c) sums[c] += dot_any<QT>(row, u, w, act[c * units + u]);
    }
#pragma unroll
    for (int c = 0; c < NCOLS; ++c) sums[c] = warp_sum(sums[c]);
}

// out[c * ldo + r] (+)= W[r, :] . x[c, :] for rows r of W; blockDim (32, 4), one warp per row.
// ldo lets Q, K and V (formats may differ) write side by side into one [T, (H + 2G) * E] buffer.
template <int QT, int NCOLS>
__device__ void matvec(const uint8_t* __restrict__ w, int rows, int cols, const block_q8_1* __restrict__ act,
                       float* __restrict__ out, int ldo, int accumulate) {
    const int r = blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) return;
    float sums[NCOLS];
    row_dots<QT, NCOLS>(w + r * row_bytes(QT, cols), cols / QK, act, sums);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int c = 0; c < NCOLS; ++c) {
            float* o = out + (long)c * ldo + r;
            *o = accumulate ? *o + sums[c] : sums[c];
        }
    }
}

// SwiGLU fused with its gate and up products: silu(Wg.x) * (Wu.x), quantized for the down product.
// blockDim (32, 8): a block makes 32 consecutive outputs (one activation block), 4 per warp.
template <int QT, int NCOLS>
__device__ void matvec_swiglu(const uint8_t* __restrict__ wg, const uint8_t* __restrict__ wu, int rows, int cols,
                              const block_q8_1* __restrict__ act, block_q8_1* __restrict__ out) {
    // Q3_K's unit takes more registers: at 8 columns it runs as two passes of 4 (its weights read twice), not spill.
    constexpr int PASS = QT == Q3_K && NCOLS == 8 ? 4 : NCOLS;
    __shared__ float h[NCOLS][QK];
    const long rb = row_bytes(QT, cols);
    const int units = cols / QK;
    for (int k = 0; k < 4; ++k) {
        const int local = threadIdx.y * 4 + k, r = blockIdx.x * QK + local;
#pragma unroll
        for (int c0 = 0; c0 < NCOLS; c0 += PASS) {
            float g[PASS], up[PASS];
            row_dots<QT, PASS>(wg + r * rb, units, act + c0 * units, g);
            row_dots<QT, PASS>(wu + r * rb, units, act + c0 * units, up);
            if (threadIdx.x == 0) {
#pragma unroll
                for (int c = 0; c < PASS; ++c) h[c0 + c][local] = g[c] / (1.0f + __expf(-g[c])) * up[c];
            }
        }
    }
    __syncthreads();
    for (int c = threadIdx.y; c < NCOLS; c += blockDim.y)
        quantize_lane(h[c][threadIdx.x], out + (long)c * (rows / QK) + blockIdx.x, threadIdx.x);
}

#define MATVEC_ENTRY(name, QT, N)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128) matvec_##name##_b##N(                                       \
        const uint8_t* w, int rows, int cols, const block_q8_1* act, float* out, int ldo, int accumulate) {      \
        matvec<QT, N>(w, rows, cols, act, out, ldo, accumulate);                                                  \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) swiglu_##name##_b##N(                                       \
        const uint8_t* wg, const uint8_t* wu, int rows, int cols, const block_q8_1* act, block_q8_1* out) {      \
        matvec_swiglu<QT, N>(wg, wu, rows, cols, act, out);                                                       \
    }
#define MATVEC_ALL(name, QT) MATVEC_ENTRY(name, QT, 1) MATVEC_ENTRY(name, QT, 2) MATVEC_ENTRY(name, QT, 4) \
    MATVEC_ENTRY(name, QT, 8)
FOR_EACH_QTYPE(MATVEC_ALL)
