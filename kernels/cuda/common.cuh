// Shared pieces of the appliance's CUDA kernels: GGML block layouts, the 8-bit activation blocks,
// and one "unit" decoder per weight format.
//
// A unit is 32 consecutive weights of a row, aligned with one 32-value activation block. Every
// format decodes a unit to eight packed int8x4 words plus scales, so one dot-product loop (__dp4a)
// serves all of them:  unit . activations = d8 * (w0 * sum(v[0..3] . q8) + w1 * sum(v[4..7] . q8)) + c * s8
// where d8 is the activation block's scale and s8 = d8 * sum(q8). Layouts: kernels/dequant.py. Q2_K has a
// minimum per 16 values, so its halves take their own coefficient (c, c1) of their own activation sums.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

#define QK 32     // values per block in the 32-wide formats, and per activation block
#define QK_K 256  // values per super-block in the K formats
#define WARP 32

// Format codes, the same numbers as GGML's type ids (gguf.GGMLQuantizationType).
enum QType {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13,
    Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23, BF16 = 30
};

// IQ4_NL and IQ4_XS's sixteen non-linear levels (GGML's kvalues_iq4nl).
__constant__ int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Activations quantized to 8 bits per 32 values (GGML's Q8_1): scale d and d * sum(qs).
struct block_q8_1 {
    half2 ds;  // x: d, y: s
    int8_t qs[QK];
};

struct Unit {
    int v[8];    // 32 weights as int8x4 words
    float w0;    // scale of words 0..3
    float w1;    // scale of words 4..7
    float c;     // coefficient of the activation block's sum (HasHalves: of words 0..3's values' sum)
    float c1;    // HasHalves formats only (Q2_K): coefficient of words 4..7's values' sum
};

__device__ __forceinline__ float ldh(const uint8_t* p) {
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}

// Four bytes that are 2-byte aligned (the 32-wide formats' blocks are 18/20/34 bytes long).
__device__ __forceinline__ int ld_int_a2(const uint8_t* p) {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    return static_cast<int>(h[0] | (static_cast<unsigned>(h[1]) << 16));
}

__device__ __forceinline__ int ld_int_a4(const uint8_t* p) { return *reinterpret_cast<const int*>(p); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Bytes per row of `cols` weights.
__host__ __device__ __forceinline__ long row_bytes(int qt, int cols) {
    switch (qt) {
        case Q4_0: return (long)cols / QK * 18;
        case Q4_1: return (long)cols / QK * 20;
        case Q5_0: return (long)cols / QK * 22;
        case Q5_1: return (long)cols / QK * 24;
        case Q8_0: return (long)cols / QK * 34;
        case IQ4_NL: return (long)cols / QK * 18;
        case Q2_K: return (long)cols / QK_K * 84;
        case Q3_K: return (long)cols / QK_K * 110;
        case Q4_K: return (long)cols / QK_K * 144;
        case Q5_K: return (long)cols / QK_K * 176;
        case Q6_K: return (long)cols / QK_K * 210;
        case IQ4_XS: return (long)cols / QK_K * 136;
        case F16: case BF16: return (long)cols * 2;
        default: return (long)cols * 4;
    }
}

// Unit u (weights 32u .. 32u+31) of a row.
template <int QT>
__device__ __forceinline__ Unit load_unit(const uint8_t* row, int u);

template <>
__device__ __forceinline__ Unit load_unit<Q4_0>(const uint8_t* row, int u) {
    const uint8_t* b = row + u * 18;  // d, 16 bytes of nibbles: low nibbles are values 0..15
    Unit r;
    const float d = ldh(b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = ld_int_a2(b + 2 + 4 * i);
        r.v[i] = q & 0x0F0F0F0F;
        r.v[i + 4] = (q >> 4) & 0x0F0F0F0F;
    }
    r.w0 = r.w1 = d;
    r.c = -8.0f * d;
    return r;
}

template <>
__device__ __forceinline__ Unit load_unit<Q4_1>(const uint8_t* row, int u) {
    const uint8_t* b = row + u * 20;  // d, m, 16 bytes of nibbles
    Unit r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = ld_int_a4(b + 4 + 4 * i);
        r.v[i] = q & 0x0F0F0F0F;
        r.v[i + 4] = (q >> 4) & 0x0F0F0F0F;
    }
    r.w0 = r.w1 = ldh(b);
    r.c = ldh(b + 2);
    return r;
}

// Bits 0..3 of x to bit 4 of bytes 0..3 (the fifth bit of four 5-bit values).
__device__ __forceinline__ int spread_bit4(unsigned x) {
    return static_cast<int>(((x & 1u) | ((x & 2u) << 7) | ((x & 4u) << 14) | ((x & 8u) << 21)) << 4);
}

template <>
__device__ __forceinline__ Unit load_unit<Q5_0>(const uint8_t* row, int u) {
    const uint8_t* b = row + u * 22;  // d, 32 fifth bits (value j: bit j), 16 bytes of nibbles as Q4_0's
    const unsigned qh = static_cast<unsigned>(ld_int_a2(b + 2));
    Unit r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = ld_int_a2(b + 6 + 4 * i);
        r.v[i] = (q & 0x0F0F0F0F) | spread_bit4(qh >> (4 * i));
        r.v[i + 4] = ((q >> 4) & 0x0F0F0F0F) | spread_bit4(qh >> (16 + 4 * i));
    }
    const float d = ldh(b);
    r.w0 = r.w1 = d;
    r.c = -16.0f * d;
    return r;
}

template <>
__device__ __forceinline__ Unit load_unit<Q5_1>(const uint8_t* row, int u) {
    const uint8_t* b = row + u * 24;  // d, m, 32 fifth bits, 16 bytes of nibbles
    const unsigned qh = static_cast<unsigned>(ld_int_a2(b + 4));
    Unit r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = ld_int_a2(b + 8 + 4 * i);
        r.v[i] = (q & 0x0F0F0F0F) | spread_bit4(qh >> (4 * i));
        r.v[i + 4] = ((q >> 4) & 0x0F0F0F0F) | spread_bit4(qh >> (16 + 4 * i));
    }
    r.w0 = r.w1 = ldh(b);
    r.c = ldh(b + 2);
    return r;
}

// Four nibbles (the low four bits of each byte) as their four IQ4 levels.
__device__ __forceinline__ int iq4_word(int nibbles) {
    int r = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) r |= static_cast<int>(static_cast<uint8_t>(IQ4_LEVELS[(nibbles >> (8 * k)) & 0xF])) << (8 * k);
    return r;
}

template <>
__device__ __forceinline__ Unit load_unit<IQ4_NL>(const uint8_t* row, int u) {
    const uint8_t* b = row + u * 18;  // d, 16 bytes of nibbles (as Q4_0's) indexing the levels
    Unit r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = ld_int_a2(b + 2 + 4 * i);
        r.v[i] = iq4_word(q & 0x0F0F0F0F);
        r.v[i + 4] = iq4_word((q >> 4) & 0x0F0F0F0F);
    }
    r.w0 = r.w1 = ldh(b);
    r.c = 0.0f;
    return r;
}

template <>
__device__ __forceinline__ Unit load_unit<IQ4_XS>(const uint8_t* row, int u) {
    // Super-block: d, 16 high scale bits (2 per sub-block), 4 bytes of low scale nibbles, 128 bytes of
    // nibbles, 16 per sub-block of 32 (as IQ4_NL's block); sub-block j's scale is d * (6-bit ls - 32).
    const uint8_t* b = row + (u >> 3) * 136;
    const int j = u & 7;
    const unsigned short hs = *reinterpret_cast<const unsigned short*>(b + 2);
    const int ls = ((b[4 + j / 2] >> (4 * (j & 1))) & 0xF) | (((hs >> (2 * j)) & 3) << 4);
    const uint8_t* q = b + 8 + 16 * j;
    Unit r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int w = ld_int_a4(q + 4 * i);
        r.v[i] = iq4_word(w & 0x0F0F0F0F);
        r.v[i + 4] = iq4_word((w >> 4) & 0x0F0F0F0F);
    }
    r.w0 = r.w1 = ldh(b) * (ls - 32);
    r.c = 0.0f;
    return r;
}

template <>
__device__ __forceinline__ Unit load_unit<Q2_K>(const uint8_t* row, int u) {
    // Super-block: 16 bytes of 4-bit scale | 4-bit min per 16 values, 64 bytes of 2-bit values, d, dmin. Half n
    // (128 values) of it: bytes 32n .. 32n+31, its quarter k at bits 2k; value = d*sc*q - dmin*m.
    const uint8_t* b = row + (u >> 3) * 84;
    const int j = u & 7, n = j >> 2, k = j & 3, s = 8 * n + 2 * k;
    const uint8_t* q = b + 16 + 32 * n;
    Unit r;
#pragma unroll
    for (int i = 0; i < 8; ++i) r.v[i] = (ld_int_a4(q + 4 * i) >> (2 * k)) & 0x03030303;
    const float d = ldh(b + 80), dmin = ldh(b + 82);
    r.w0 = d * (b[s] & 0xF);
    r.w1 = d * (b[s + 1] & 0xF);
    r.c = -dmin * (b[s] >> 4);
    r.c1 = -dmin * (b[s + 1] >> 4);
    return r;
}

// Q3_K's 16 six-bit scales from its 12 bytes: low nibbles of bytes 0..7 (then their high nibbles), the top two
// bits from bytes 8..11 (two bits per scale, by which nibble set it is).
__device__ __forceinline__ int q3k_scale(const uint8_t* sc, int s) {
    const int b = s & 3, w = s >> 2;
    const int nib = w < 2 ? sc[4 * (w & 1) + b] & 0xF : sc[4 * (w & 1) + b] >> 4;
    return (nib | (((sc[8 + b] >> (2 * w)) & 3) << 4)) - 32;
}

template <>
__device__ __forceinline__ Unit load_unit<Q3_K>(const uint8_t* row, int u) {
    // Super-block: 32 bytes of high bits (value l of quarter j: bit j of byte l), 64 bytes of 2-bit values (as
    // Q2_K's), 12 bytes of scales, d; value = d * scale * (q - (high bit ? 0 : 4)).
    const uint8_t* b = row + (u >> 3) * 110;
    const int j = u & 7, n = j >> 2, k = j & 3, s = 8 * n + 2 * k;
    const uint8_t* q = b + 32 + 32 * n;
    Unit r;
    const float d = ldh(b + 108);
    r.w0 = d * q3k_scale(b + 96, s);
    r.w1 = d * q3k_scale(b + 96, s + 1);
    r.c = 0.0f;
    const unsigned short* qw = reinterpret_cast<const unsigned short*>(q);
    const unsigned short* hw = reinterpret_cast<const unsigned short*>(b);
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // two bytes at a time: 2-byte aligned (110-byte blocks)
        const unsigned lo = (qw[2 * i] | (static_cast<unsigned>(qw[2 * i + 1]) << 16)) >> (2 * k);
        const unsigned hi = (hw[2 * i] | (static_cast<unsigned>(hw[2 * i + 1]) << 16)) >> j;
        r.v[i] = __vsubss4(static_cast<int>((lo & 0x03030303u) | ((hi & 0x01010101u) << 2)), 0x04040404);
    }
    return r;
}

template <>
__device__ __forceinline__ Unit load_unit<Q8_0>(const uint8_t* row, int u) {
    const uint8_t* b = row + u * 34;  // d, 32 x int8
    Unit r;
#pragma unroll
    for (int i = 0; i < 8; ++i) r.v[i] = ld_int_a2(b + 2 + 4 * i);
    r.w0 = r.w1 = ldh(b);
    r.c = 0.0f;
    return r;
}

// Sub-block j's scale and min, six bits each, from a K super-block's 12 bytes (Q4_K and Q5_K).
__device__ __forceinline__ void k4_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

template <>
__device__ __forceinline__ Unit load_unit<Q4_K>(const uint8_t* row, int u) {
    // Super-block: d, dmin, 12 bytes of six-bit scales/mins, 128 bytes of nibbles. Sub-block j of 32:
    // the low (j even) or high (j odd) nibbles of bytes 32*(j/2) .. +31; value = d*sc_j*q - dmin*m_j.
    const uint8_t* b = row + (u >> 3) * 144;
    const int j = u & 7;
    int sc, mn;
    k4_scale_min(b + 4, j, sc, mn);
    const uint8_t* q = b + 16 + 32 * (j >> 1);
    const int shift = 4 * (j & 1);
    Unit r;
#pragma unroll
    for (int i = 0; i < 8; ++i) r.v[i] = (ld_int_a4(q + 4 * i) >> shift) & 0x0F0F0F0F;
    r.w0 = r.w1 = ldh(b) * sc;
    r.c = -ldh(b + 2) * mn;
    return r;
}

template <>
__device__ __forceinline__ Unit load_unit<Q6_K>(const uint8_t* row, int u) {
    // Super-block: ql 128 bytes, qh 64 bytes, 16 int8 scales, d. Half h (128 values) takes ql[64h..],
    // qh[32h..]; its quarter k (32 values) is the low (k<2) or high nibbles of ql[64h + 32(k&1)..],
    // with bits 2k..2k+1 of qh as bits 4..5; value = d * scale[g] * (q - 32), g = 16-value group.
    const uint8_t* b = row + (u >> 3) * 210;
    const int j = u & 7, h = j >> 2, k = j & 3;
    const uint8_t* ql = b + 64 * h + 32 * (k & 1);
    const uint8_t* qh = b + 128 + 32 * h;
    const int lshift = 4 * (k >> 1), hshift = 2 * k;
    Unit r;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int lo = (ld_int_a2(ql + 4 * i) >> lshift) & 0x0F0F0F0F;
        const int hi = ((ld_int_a2(qh + 4 * i) >> hshift) & 0x03030303) << 4;
        r.v[i] = __vsubss4(lo | hi, 0x20202020);
    }
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = ldh(b + 208);
    r.w0 = d * sc[2 * j];
    r.w1 = d * sc[2 * j + 1];
    r.c = 0.0f;
    return r;
}

template <>
__device__ __forceinline__ Unit load_unit<Q5_K>(const uint8_t* row, int u) {
    // Super-block: d, dmin, 12 bytes of scales/mins (as Q4_K's), 32 bytes of fifth bits (value l of sub-block j:
    // bit j of byte l), 128 bytes of nibbles (as Q4_K's); value = d*sc_j*q - dmin*m_j.
    const uint8_t* b = row + (u >> 3) * 176;
    const int j = u & 7;
    int sc, mn;
    k4_scale_min(b + 4, j, sc, mn);
    const uint8_t* q = b + 48 + 32 * (j >> 1);
    const int shift = 4 * (j & 1);
    Unit r;
#pragma unroll
    for (int i = 0; i < 8; ++i)
        r.v[i] = ((ld_int_a4(q + 4 * i) >> shift) & 0x0F0F0F0F) | (((ld_int_a4(b + 16 + 4 * i) >> j) & 0x01010101) << 4);
    r.w0 = r.w1 = ldh(b) * sc;
    r.c = -ldh(b + 2) * mn;
    return r;
}

// Formats whose two halves take their own coefficient (c, c1) of their own activation sums.
template <int QT>
struct HasHalves {
    static constexpr bool value = QT == Q2_K;
};

// The same contract for the float formats has no integer form: they are dotted in float instead.
template <int QT>
struct IsFloat {
    static constexpr bool value = QT == F16 || QT == F32 || QT == BF16;
};

__device__ __forceinline__ float bf16(unsigned short h) { return __uint_as_float(static_cast<unsigned>(h) << 16); }

// Q2_K's: each half's minimum times that half's own activation sum (dp4a against ones).
__device__ __forceinline__ float unit_dot_halves(const Unit& w, const block_q8_1& a) {
    const int* q = reinterpret_cast<const int*>(a.qs);
    int s0 = 0, s1 = 0, m0 = 0, m1 = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) s0 = __dp4a(w.v[i], q[i], s0), m0 = __dp4a(0x01010101, q[i], m0);
#pragma unroll
    for (int i = 4; i < 8; ++i) s1 = __dp4a(w.v[i], q[i], s1), m1 = __dp4a(0x01010101, q[i], m1);
    return __low2float(a.ds) * (w.w0 * s0 + w.w1 * s1 + w.c * m0 + w.c1 * m1);
}

// Dot product of one unit with one activation block.
__device__ __forceinline__ float unit_dot(const Unit& w, const block_q8_1& a) {
    const int* q = reinterpret_cast<const int*>(a.qs);
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) s0 = __dp4a(w.v[i], q[i], s0);
#pragma unroll
    for (int i = 4; i < 8; ++i) s1 = __dp4a(w.v[i], q[i], s1);
    const float2 ds = __half22float2(a.ds);
    return ds.x * (w.w0 * s0 + w.w1 * s1) + w.c * ds.y;
}

// Float weights against an activation block: 32 products.
template <int QT>
__device__ __forceinline__ float float_unit_dot(const uint8_t* row, int u, const block_q8_1& a) {
    float acc = 0.0f;
    if (QT == F16) {
        const half2* w = reinterpret_cast<const half2*>(row + u * 64);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const float2 f = __half22float2(w[i]);
            acc += f.x * a.qs[2 * i] + f.y * a.qs[2 * i + 1];
        }
    } else if (QT == BF16) {
        const unsigned short* w = reinterpret_cast<const unsigned short*>(row + u * 64);
#pragma unroll
        for (int i = 0; i < 32; ++i) acc += bf16(w[i]) * a.qs[i];
    } else {
        const float* w = reinterpret_cast<const float*>(row + u * 128);
#pragma unroll
        for (int i = 0; i < 32; ++i) acc += w[i] * a.qs[i];
    }
    return acc * __low2float(a.ds);
}

// 32 weights of unit u as floats (for the mat-mat kernels and the embedding gather).
template <int QT>
__device__ __forceinline__ void dequant_unit(const uint8_t* row, int u, float* out) {
    if constexpr (QT == F16) {
        const half* w = reinterpret_cast<const half*>(row) + u * QK;
#pragma unroll
        for (int i = 0; i < QK; ++i) out[i] = __half2float(w[i]);
    } else if constexpr (QT == BF16) {
        const unsigned short* w = reinterpret_cast<const unsigned short*>(row) + u * QK;
#pragma unroll
        for (int i = 0; i < QK; ++i) out[i] = bf16(w[i]);
    } else if constexpr (QT == F32) {
        const float* w = reinterpret_cast<const float*>(row) + u * QK;
#pragma unroll
        for (int i = 0; i < QK; ++i) out[i] = w[i];
    } else {
        const Unit w = load_unit<QT>(row, u);
        // A weight is w * q + c with the activation-sum coefficient c spread over the 32 values.
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float scale = i < 4 ? w.w0 : w.w1;
            const float c = HasHalves<QT>::value && i >= 4 ? w.c1 : w.c;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int q = static_cast<int8_t>((w.v[i] >> (8 * k)) & 0xFF);
                out[4 * i + k] = scale * q + c;
            }
        }
    }
}

// Quantize 32 values held one per lane into an activation block (lane 0 writes the scales).
__device__ __forceinline__ void quantize_lane(float x, block_q8_1* dst, int lane) {
    const float amax = warp_max(fabsf(x));
    const float sum = warp_sum(x);
    const float d = amax / 127.0f;
    const int8_t q = amax == 0.0f ? 0 : static_cast<int8_t>(roundf(x / d));
    dst->qs[lane] = q;
    if (lane == 0) dst->ds = __floats2half2_rn(d, sum);
}

// Instantiate a kernel template for every weight format under the name prefix_<format>.
#define FOR_EACH_QTYPE(X)                                                                                       \
    X(q4_0, Q4_0) X(q4_1, Q4_1) X(q5_0, Q5_0) X(q5_1, Q5_1) X(q8_0, Q8_0) X(iq4_nl, IQ4_NL) X(q2_k, Q2_K)         \
    X(q3_k, Q3_K) X(q4_k, Q4_K) X(q5_k, Q5_K) X(q6_k, Q6_K) X(iq4_xs, IQ4_XS) X(f16, F16) X(bf16, BF16)
