// RoPE in GGUF's pairwise layout, fused with the store of keys and values into the KV cache.
#include "common.cuh"

// qkv [T, (H + 2G) * E] (the fused Q, K, V products of T tokens); positions [T] and slots [T] say
// where each token sits and whose cache it goes to. Writes the rotated queries to q [T, H, E], and
// the rotated keys and the values to cache [slot][layer][position][G][E] (half), whose per-slot
// stride is slot_stride elements and per-layer stride layer_stride. Each adjacent pair
// (x[2i], x[2i+1]) of a head turns by position * inv_freq[i] (the model's schedule, models/rope.py:
// theta^(-2i/E) or scaled), and cos and sin are scaled by `scale` (YaRN's). grid T, blockDim 128.
extern "C" __global__ void rope_store(const float* __restrict__ qkv, const int* __restrict__ positions,
                                      const int* __restrict__ slots, int n_heads, int n_kv_heads, int head_dim,
                                      const double* __restrict__ inv_freq, float scale, float* __restrict__ q, half* __restrict__ k_cache,
                                      half* __restrict__ v_cache, long slot_stride, long layer_stride, int layer) {
    const int t = blockIdx.x, pos = positions[t];
    const int half_dim = head_dim / 2, width = (n_heads + 2 * n_kv_heads) * head_dim;
    const float* row = qkv + (long)t * width;
    const long base = slots[t] * slot_stride + layer * layer_stride + (long)pos * n_kv_heads * head_dim;
    for (int p = threadIdx.x; p < (n_heads + n_kv_heads) * half_dim; p += blockDim.x) {
        const int head = p / half_dim, i = p % half_dim;
        // Angles in double: positions reach 10^5 and float loses the low bits of pos * freq.
        const double angle = pos * inv_freq[i];
        double s, c;
        sincos(angle, &s, &c);
        s *= scale, c *= scale;
        const float x0 = row[head * head_dim + 2 * i], x1 = row[head * head_dim + 2 * i + 1];
        const float r0 = x0 * (float)c - x1 * (float)s, r1 = x0 * (float)s + x1 * (float)c;
        if (head < n_heads) {
            float* dst = q + ((long)t * n_heads + head) * head_dim + 2 * i;
            dst[0] = r0, dst[1] = r1;
        } else {
            half* dst = k_cache + base + (head - n_heads) * head_dim + 2 * i;
            dst[0] = __float2half(r0), dst[1] = __float2half(r1);
        }
    }
    const float* v = row + (n_heads + n_kv_heads) * head_dim;
    for (int i = threadIdx.x; i < n_kv_heads * head_dim; i += blockDim.x) v_cache[base + i] = __float2half(v[i]);
}
