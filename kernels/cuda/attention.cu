// Grouped-query attention over the KV cache, split along the keys (flash-decoding).
//
// Each query token t (a decoding sequence's one new token, or one token of a prompt) sees keys
// 0 .. positions[t] of its slot's cache. A block takes one key/value head, all the query heads that
// share it, and one of n_splits stretches of the keys, so long contexts fill the GPU and every key
// is read once per group; attend_combine merges the stretches with their softmax maxima and sums.
#include <math_constants.h>

#include "common.cuh"

#define GMAX 8      // query heads per key/value head, at most
#define AT_WARPS 4

// grid (G, n_splits, T), blockDim 128. q [T, H, E] float; caches half [slot][layer][pos][G][E].
// Partial results: part_ml [T, H, n_splits, 2] (max, sum), part_acc [T, H, n_splits, E].
template <int E>
__device__ void attend_split(const float* __restrict__ q, const half* __restrict__ k_cache,
                             const half* __restrict__ v_cache, const int* __restrict__ positions,
                             const int* __restrict__ slots, int n_heads, int n_kv_heads, long slot_stride,
                             long layer_stride, int layer, int n_splits, float* __restrict__ part_ml,
                             float* __restrict__ part_acc) {
    constexpr int EPL = E / WARP;  // head elements per lane
    __shared__ float sm_ml[AT_WARPS][GMAX][2];
    __shared__ float sm_acc[AT_WARPS][GMAX][E];
    const int kvh = blockIdx.x, split = blockIdx.y, t = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = n_heads / n_kv_heads;
    const int n_keys = positions[t] + 1, chunk = (n_keys + n_splits - 1) / n_splits;
    const int k_begin = split * chunk, k_end = min(n_keys, k_begin + chunk);
    const float scale = rsqrtf((float)E);

    float qv[GMAX][EPL], acc[GMAX][EPL], m[GMAX], l[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        m[g] = -CUDART_INF_F, l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            const int h = kvh * group + g;
            qv[g][e] = g < group ? q[((long)t * n_heads + h) * E + lane * EPL + e] * scale : 0.0f;
            acc[g][e] = 0.0f;
        }
    }
    const long stride = (long)n_kv_heads * E;
    const long base = slots[t] * slot_stride + layer * layer_stride + kvh * E + lane * EPL;
    for (int key = k_begin + warp; key < k_end; key += AT_WARPS) {
        float kv[EPL], vv[EPL];
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            kv[e] = __half2float(k_cache[base + key * stride + e]);
            vv[e] = __half2float(v_cache[base + key * stride + e]);
        }
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
            if (g < group) {
                float s = 0.0f;
#pragma unroll
                for (int e = 0; e < EPL; ++e) s += qv[g][e] * kv[e];
                s = warp_sum(s);
                const float m_new = fmaxf(m[g], s), old = __expf(m[g] - m_new), p = __expf(s - m_new);
                l[g] = l[g] * old + p;
#pragma unroll
                for (int e = 0; e < EPL; ++e) acc[g][e] = acc[g][e] * old + p * vv[e];
                m[g] = m_new;
            }
        }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        if (lane == 0) sm_ml[warp][g][0] = m[g], sm_ml[warp][g][1] = l[g];
#pragma unroll
        for (int e = 0; e < EPL; ++e) sm_acc[warp][g][lane * EPL + e] = acc[g][e];
    }
    __syncthreads();
    // Merge the warps: thread i takes element i % E of query head i / E.
    for (int i = threadIdx.x; i < group * E; i += blockDim.x) {
        const int g = i / E, e = i % E;
        float mx = -CUDART_INF_F;
        for (int w = 0; w < AT_WARPS; ++w) mx = fmaxf(mx, sm_ml[w][g][0]);
        float sum = 0.0f, a = 0.0f;
        for (int w = 0; w < AT_WARPS; ++w) {
            const float f = mx == -CUDART_INF_F ? 0.0f : __expf(sm_ml[w][g][0] - mx);
            sum += sm_ml[w][g][1] * f;
            a += sm_acc[w][g][e] * f;
        }
        const long row = ((long)t * n_heads + kvh * group + g) * n_splits + split;
        part_acc[row * E + e] = a;
        if (e == 0) part_ml[2 * row] = mx, part_ml[2 * row + 1] = sum;
    }
}

// out [T, H, E] from the stretches' partial results; grid (H, T), blockDim E.
extern "C" __global__ void attend_combine(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                          int n_heads, int head_dim, int n_splits, float* __restrict__ out) {
    const int h = blockIdx.x, t = blockIdx.y, e = threadIdx.x;
    const long row0 = ((long)t * n_heads + h) * n_splits;
    float mx = -CUDART_INF_F;
    for (int s = 0; s < n_splits; ++s) mx = fmaxf(mx, part_ml[2 * (row0 + s)]);
    float sum = 0.0f, a = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        const float m = part_ml[2 * (row0 + s)];
        if (m == -CUDART_INF_F) continue;
        const float f = __expf(m - mx);
        sum += part_ml[2 * (row0 + s) + 1] * f;
        a += part_acc[(row0 + s) * head_dim + e] * f;
    }
    out[((long)t * n_heads + h) * head_dim + e] = a / sum;
}

#define ATTEND_ENTRY(E)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128, 4) attend_split_e##E(                                        \
        const float* q, const half* k_cache, const half* v_cache, const int* positions, const int* slots,          \
        int n_heads, int n_kv_heads, long slot_stride, long layer_stride, int layer, int n_splits, float* part_ml, \
        float* part_acc) {                                                                                        \
        attend_split<E>(q, k_cache, v_cache, positions, slots, n_heads, n_kv_heads, slot_stride, layer_stride,    \
                        layer, n_splits, part_ml, part_acc);                                                      \
    }
ATTEND_ENTRY(64)
ATTEND_ENTRY(128)
