// Prefill and large batches: y[T, N] (+)= x[T, K] . W[N, K]^T on the tensor cores (y's rows ldy apart).
//
// A block makes a 64 x 64 tile of y. Per step of 32 along K, half its threads dequantize one unit
// of 64 weight rows to half precision in shared memory and the other half convert 64 tokens'
// activations; four warps then multiply 32 x 32 sub-tiles with WMMA (16 x 16 x 16, float sums).
#include <mma.h>

#include "common.cuh"

using namespace nvcuda;

#define MM_TILE 64
#define MM_PAD 8  // halves of padding per shared row, against bank conflicts

template <int QT>
__device__ void matmat(const uint8_t* __restrict__ w, int n_rows, int k_cols, const float* __restrict__ x, int tokens,
                       float* __restrict__ y, int ldy, int accumulate) {
    __shared__ __align__(32) half ws[MM_TILE][QK + MM_PAD];
    __shared__ __align__(32) half xs[MM_TILE][QK + MM_PAD];
    __shared__ __align__(32) float cs[MM_TILE][MM_TILE + 4];
    const int n0 = blockIdx.x * MM_TILE, t0 = blockIdx.y * MM_TILE;
    const int tid = threadIdx.x, warp = tid >> 5;
    const int wt = (warp >> 1) * 32, wn = (warp & 1) * 32;  // this warp's sub-tile: tokens, rows
    const long rb = row_bytes(QT, k_cols);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int k0 = 0; k0 < k_cols; k0 += QK) {
        float v[QK];
        if (tid < MM_TILE) {
            const int n = n0 + tid;
            if (n < n_rows) dequant_unit<QT>(w + n * rb, k0 / QK, v);
            else
#pragma unroll
                for (int i = 0; i < QK; ++i) v[i] = 0.0f;
#pragma unroll
            for (int i = 0; i < QK; i += 2) *reinterpret_cast<half2*>(&ws[tid][i]) = __floats2half2_rn(v[i], v[i + 1]);
        } else {
            const int t = tid - MM_TILE;
            if (t0 + t < tokens) {
                const float4* src = reinterpret_cast<const float4*>(x + (long)(t0 + t) * k_cols + k0);
#pragma unroll
                for (int i = 0; i < QK / 4; ++i) {
                    const float4 f = src[i];
                    v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < QK; ++i) v[i] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < QK; i += 2) *reinterpret_cast<half2*>(&xs[t][i]) = __floats2half2_rn(v[i], v[i + 1]);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < QK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &xs[wt + 16 * i][kk], QK + MM_PAD);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &ws[wn + 16 * j][kk], QK + MM_PAD);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&cs[wt + 16 * i][wn + 16 * j], acc[i][j], MM_TILE + 4, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < MM_TILE * MM_TILE; e += blockDim.x) {
        const int t = e / MM_TILE, n = e % MM_TILE;
        if (t0 + t < tokens && n0 + n < n_rows) {
            float* o = y + (long)(t0 + t) * ldy + n0 + n;
            *o = accumulate ? *o + cs[t][n] : cs[t][n];
        }
    }
}

// grid (ceil(N / 64), ceil(T / 64)), blockDim 128.
#define MATMAT_ENTRY(name, QT)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128) matmat_##name(const uint8_t* w, int n_rows, int k_cols, \
                                                                    const float* x, int tokens, float* y,     \
                                                                    int ldy, int accumulate) {                \
        matmat<QT>(w, n_rows, k_cols, x, tokens, y, ldy, accumulate);                                            \
    }
FOR_EACH_QTYPE(MATMAT_ENTRY)
