// Sampling on the device, so that only token ids come back: greedy, or temperature, top-k, top-p.
//
// One block per sequence. top-k and top-p are thresholds found by binary search over the ordered
// bit patterns of the scaled logits (32 block-wide passes each, exact for top-k); the draw walks
// the kept tokens in index order. It follows models/sampling.py's order of operations; at a top-p
// boundary tokens of exactly equal probability are kept together (the host keeps the lower ids).
#include <math_constants.h>

#include "common.cuh"

#define SAMPLE_THREADS 1024

struct SampleParams {
    float temperature;  // 0: greedy
    int top_k;          // 0: all
    float top_p;        // 1: all
    unsigned seed;
    unsigned step;      // advanced by the host each token: the random stream is (seed, step)
};

__device__ __forceinline__ unsigned order_key(float f) {  // monotone: a < b  <=>  key(a) < key(b)
    const unsigned b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ float block_sum(float x, float* scratch) {
    x = warp_sum(x);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < SAMPLE_THREADS / WARP; ++i) total += scratch[i];
    return total;
}

// The largest threshold key whose kept mass (count, or sum of p) reaches `need`, a bit at a time from the
// top: mass(key >= x) only falls as x grows. (A bisection of [0, 0xFFFFFFFF] computed its first middle
// as lo + (hi - lo + 1) / 2, which overflows to lo: it never moved, and top-k or top-p sampling hung.)
__device__ unsigned threshold(const float* z, int n, float zmax, bool by_mass, float need, float* scratch) {
    unsigned lo = 0;  // invariant: mass(key >= lo) >= need
    for (int bit = 31; bit >= 0; --bit) {
        const unsigned mid = lo | (1u << bit);
        float m = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            if (order_key(z[i]) >= mid) m += by_mass ? __expf(z[i] - zmax) : 1.0f;
        if (block_sum(m, scratch) >= need) lo = mid;
    }
    return lo;
}

// logits [B, V] (scaled in place by 1/temperature when sampling); token ids to tokens [B].
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample(float* __restrict__ logits, int vocab,
                                                                     const SampleParams* __restrict__ params,
                                                                     int* __restrict__ tokens) {
    __shared__ float scratch[SAMPLE_THREADS / WARP];
    __shared__ float best_v[SAMPLE_THREADS / WARP];
    __shared__ int best_i[SAMPLE_THREADS / WARP];
    __shared__ float chunk_mass[SAMPLE_THREADS];
    const SampleParams& p = params[blockIdx.x];  // read where used: fewer live registers (sm_100 spilled)
    float* z = logits + (long)blockIdx.x * vocab;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // Argmax, lowest index on ties (as numpy's).
    float bv = -CUDART_INF_F;
    int bi = vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (z[i] > bv) bv = z[i], bi = i;
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    if (lane == 0) best_v[warp] = bv, best_i[warp] = bi;
    __syncthreads();
    bv = best_v[0], bi = best_i[0];
    for (int w = 1; w < SAMPLE_THREADS / WARP; ++w)
        if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) bv = best_v[w], bi = best_i[w];
    if (p.temperature == 0.0f) {
        if (threadIdx.x == 0) tokens[blockIdx.x] = bi;
        return;
    }
    const float zmax = bv / p.temperature;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z[i] /= p.temperature;
    __syncthreads();

    unsigned keep = 0;  // tokens with order_key(z) >= keep survive
    if (p.top_k > 0 && p.top_k < vocab) keep = threshold(z, vocab, zmax, false, (float)p.top_k, scratch);
    float total = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (order_key(z[i]) >= keep) total += __expf(z[i] - zmax);
    total = block_sum(total, scratch);
    if (p.top_p < 1.0f) {
        // Among the top-k survivors, the smallest most-likely set reaching top_p of their mass.
        const unsigned kp = threshold(z, vocab, zmax, true, p.top_p * total, scratch);
        keep = max(keep, kp);
        total = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            if (order_key(z[i]) >= keep) total += __expf(z[i] - zmax);
        total = block_sum(total, scratch);
    }

    // A uniform draw from (seed, step) alone, splitmix64: a seed gives the same text wherever its row falls in
    // a batch (rows differ by their seeds).
    unsigned long long s = ((unsigned long long)p.seed << 32) ^ ((unsigned long long)p.step * 0x9E3779B97F4A7C15ull) ^
                           1ull;
    s += 0x9E3779B97F4A7C15ull;
    s = (s ^ (s >> 30)) * 0xBF58476D1CE4E5B9ull;
    s = (s ^ (s >> 27)) * 0x94D049BB133111EBull;
    s ^= s >> 31;
    const float target = (float)((s >> 40) * (1.0 / 16777216.0)) * total;

    // Each thread's contiguous chunk of ids, its mass, then a serial prefix over 1024 chunks.
    const int per = (vocab + blockDim.x - 1) / blockDim.x, begin = threadIdx.x * per, end = min(vocab, begin + per);
    float mine = 0.0f;
    int last_kept = -1;
    for (int i = begin; i < end; ++i)
        if (order_key(z[i]) >= keep) mine += __expf(z[i] - zmax), last_kept = i;
    chunk_mass[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float run = 0.0f;
        int chunk = -1;
        for (int c = 0; c < (int)blockDim.x; ++c) {
            if (chunk_mass[c] > 0.0f) chunk = c;
            if (run + chunk_mass[c] > target && chunk_mass[c] > 0.0f) break;
            run += chunk_mass[c];
        }
        chunk_mass[0] = run;
        best_i[0] = chunk;  // the chunk holding the draw (the last kept one if rounding ran past the end)
    }
    __syncthreads();
    if (threadIdx.x == best_i[0]) {
        float run = chunk_mass[0];
        int token = last_kept;
        for (int i = begin; i < end; ++i) {
            if (order_key(z[i]) < keep) continue;
            run += __expf(z[i] - zmax);
            if (run > target) {
                token = i;
                break;
            }
        }
        tokens[blockIdx.x] = token;
    }
}
