/* Portable C: the formats' layouts, activation quantization, and the dot products every other
 * instruction set is tested against (same integer sums, same rounding; only float order differs). */
#include <math.h>
#include <string.h>

#include "cpu.h"

float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t fp32_to_fp16(float f) { /* round to nearest even; enough for tests and caches */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xFF) - 127 + 15;
    uint32_t mant = x & 0x7FFFFF;
    if (((x >> 23) & 0xFF) == 0xFF) return (uint16_t)(sign | 0x7C00 | (mant ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7C00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp), half = 1u << (shift - 1), r = mant >> shift;
        uint32_t rest = mant & ((1u << shift) - 1);
        if (rest > half || (rest == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((uint32_t)exp << 10) | (mant >> 13), rest = mant & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

int block_size(int t) {
    switch (t) {
    case T_F32: case T_F16: return 1;
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: case T_IQ4_NL: return QK;
    case T_Q2_K: case T_Q3_K: case T_Q4_K: case T_Q5_K: case T_Q6_K: case T_IQ4_XS: return QK_K;
    default: return 0;
    }
}

size_t row_bytes(int t, int n) {
    switch (t) {
    case T_F32: return (size_t)n * 4;
    case T_F16: return (size_t)n * 2;
    case T_Q4_0: return (size_t)n / QK * sizeof(block_q4_0);
    case T_Q4_1: return (size_t)n / QK * sizeof(block_q4_1);
    case T_Q5_0: return (size_t)n / QK * sizeof(block_q5_0);
    case T_Q5_1: return (size_t)n / QK * sizeof(block_q5_1);
    case T_Q8_0: return (size_t)n / QK * sizeof(block_q8_0);
    case T_IQ4_NL: return (size_t)n / QK * sizeof(block_iq4_nl);
    case T_Q2_K: return (size_t)n / QK_K * sizeof(block_q2_K);
    case T_Q3_K: return (size_t)n / QK_K * sizeof(block_q3_K);
    case T_Q4_K: return (size_t)n / QK_K * sizeof(block_q4_K);
    case T_Q5_K: return (size_t)n / QK_K * sizeof(block_q5_K);
    case T_Q6_K: return (size_t)n / QK_K * sizeof(block_q6_K);
    case T_IQ4_XS: return (size_t)n / QK_K * sizeof(block_iq4_xs);
    default: return 0;
    }
}

int takes_q8(int t) { return t != T_F32 && t != T_F16; }

/* Symmetric int8 per 32 values: d = max|x| / 127, q = round(x / d). */
void quantize_q8_generic(const float *x, block_q8 *y, int n) {
    for (int b = 0; b < n / QK; b++, x += QK) {
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK; i++) {
            int q = (int)lrintf(x[i] * id);
            y[b].qs[i] = (int8_t)q;
            sum += q;
        }
        y[b].d = d;
        y[b].s = d * (float)sum;
    }
}

static float dot_f32(int n, const void *w, const void *x) {
    const float *a = w, *b = x;
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static float dot_f16(int n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += fp16_to_fp32(a[i]) * b[i];
    return s;
}

static float dot_q4_0(int n, const void *w, const void *xv) {
    const block_q4_0 *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        int isum = 0;
        for (int i = 0; i < 16; i++) {
            isum += ((bw[b].qs[i] & 0xF) - 8) * x[b].qs[i] + ((bw[b].qs[i] >> 4) - 8) * x[b].qs[i + 16];
        }
        s += fp16_to_fp32(bw[b].d) * x[b].d * (float)isum;
    }
    return s;
}

static float dot_q4_1(int n, const void *w, const void *xv) {
    const block_q4_1 *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        int isum = 0;
        for (int i = 0; i < 16; i++) isum += (bw[b].qs[i] & 0xF) * x[b].qs[i] + (bw[b].qs[i] >> 4) * x[b].qs[i + 16];
        s += fp16_to_fp32(bw[b].d) * x[b].d * (float)isum + fp16_to_fp32(bw[b].m) * x[b].s;
    }
    return s;
}

static float dot_q8_0(int n, const void *w, const void *xv) {
    const block_q8_0 *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        int isum = 0;
        for (int i = 0; i < QK; i++) isum += bw[b].qs[i] * x[b].qs[i];
        s += fp16_to_fp32(bw[b].d) * x[b].d * (float)isum;
    }
    return s;
}

static float dot_q4_K(int n, const void *w, const void *xv) {
    const block_q4_K *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        float d = fp16_to_fp32(bw[b].d), dmin = fp16_to_fp32(bw[b].dmin);
        for (int j = 0; j < 8; j++, x++) {
            uint8_t sc, m;
            k4_scale_min(j, bw[b].scales, &sc, &m);
            const uint8_t *q = bw[b].qs + 32 * (j / 2);
            int shift = (j & 1) * 4, isum = 0;
            for (int i = 0; i < QK; i++) isum += ((q[i] >> shift) & 0xF) * x->qs[i];
            s += d * sc * x->d * (float)isum - dmin * m * x->s;
        }
    }
    return s;
}

static float dot_q6_K(int n, const void *w, const void *xv) {
    const block_q6_K *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        float d = fp16_to_fp32(bw[b].d);
        for (int c = 0; c < 8; c++, x++) { /* chunk c: values 32c .. 32c+31 */
            int h = c / 4, k = c % 4, isum[2] = {0, 0};
            for (int i = 0; i < QK; i++) {
                uint8_t lo = bw[b].ql[64 * h + 32 * (k & 1) + i];
                int q = ((k < 2 ? lo & 0xF : lo >> 4) | (((bw[b].qh[32 * h + i] >> (2 * k)) & 3) << 4)) - 32;
                isum[i / 16] += q * x->qs[i];
            }
            s += d * x->d * (float)(bw[b].scales[2 * c] * isum[0] + bw[b].scales[2 * c + 1] * isum[1]);
        }
    }
    return s;
}

/* IQ4_NL and IQ4_XS: a 4-bit index into these values (ggml's kvalues_iq4nl). */
static const int8_t iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* Q5_0 and Q5_1: value j < 16 is the low nibble of qs[j], value j + 16 the high one, each with bit
 * j (j + 16) of qh as its fifth bit; Q5_0 is centred (- 16), Q5_1 has an offset m. */
static int q5_value(const uint8_t *qs, uint32_t qh, int i) {
    int nib = i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4;
    return nib | (int)(((qh >> i) & 1) << 4);
}

static float dot_q5_0(int n, const void *w, const void *xv) {
    const block_q5_0 *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        uint32_t qh;
        memcpy(&qh, bw[b].qh, 4);
        int isum = 0;
        for (int i = 0; i < QK; i++) isum += (q5_value(bw[b].qs, qh, i) - 16) * x[b].qs[i];
        s += fp16_to_fp32(bw[b].d) * x[b].d * (float)isum;
    }
    return s;
}

static float dot_q5_1(int n, const void *w, const void *xv) {
    const block_q5_1 *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        uint32_t qh;
        memcpy(&qh, bw[b].qh, 4);
        int isum = 0;
        for (int i = 0; i < QK; i++) isum += q5_value(bw[b].qs, qh, i) * x[b].qs[i];
        s += fp16_to_fp32(bw[b].d) * x[b].d * (float)isum + fp16_to_fp32(bw[b].m) * x[b].s;
    }
    return s;
}

static float dot_iq4_nl(int n, const void *w, const void *xv) {
    const block_iq4_nl *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        int isum = 0;
        for (int i = 0; i < 16; i++) {
            isum += iq4_values[bw[b].qs[i] & 0xF] * x[b].qs[i] + iq4_values[bw[b].qs[i] >> 4] * x[b].qs[i + 16];
        }
        s += fp16_to_fp32(bw[b].d) * x[b].d * (float)isum;
    }
    return s;
}

/* Q2_K and Q3_K: value 128h + 32j + l (q8 block c = 4h + j) is bits 2j, 2j+1 of qs[32h + l], with one
 * scale per 16 values (index 2c + l / 16). */
static float dot_q2_K(int n, const void *w, const void *xv) {
    const block_q2_K *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        float d = fp16_to_fp32(bw[b].d), dmin = fp16_to_fp32(bw[b].dmin);
        for (int c = 0; c < 8; c++, x++) {
            const uint8_t *q = bw[b].qs + 32 * (c / 4);
            int shift = 2 * (c % 4), isum[2] = {0, 0}, xsum[2] = {0, 0};
            for (int l = 0; l < QK; l++) {
                isum[l / 16] += ((q[l] >> shift) & 3) * x->qs[l];
                xsum[l / 16] += x->qs[l];
            }
            const uint8_t *sc = bw[b].scales + 2 * c;
            s += x->d * (d * (float)((sc[0] & 0xF) * isum[0] + (sc[1] & 0xF) * isum[1]) -
                         dmin * (float)((sc[0] >> 4) * xsum[0] + (sc[1] >> 4) * xsum[1]));
        }
    }
    return s;
}

/* Q3_K's 16 six-bit scales: low 4 bits from bytes 0..7 (low nibbles, then high), top 2 from 8..11. */
static int q3_scale(const uint8_t *p, int i) {
    int low = i < 8 ? p[i] & 0xF : p[i - 8] >> 4;
    return (low | (((p[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32;
}

static float dot_q3_K(int n, const void *w, const void *xv) {
    const block_q3_K *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        float d = fp16_to_fp32(bw[b].d);
        for (int c = 0; c < 8; c++, x++) {
            const uint8_t *q = bw[b].qs + 32 * (c / 4);
            int shift = 2 * (c % 4), isum[2] = {0, 0};
            for (int l = 0; l < QK; l++) { /* a clear bit c of hmask[l] lowers the value by 4 */
                int v = ((q[l] >> shift) & 3) - (((bw[b].hmask[l] >> c) & 1) ? 0 : 4);
                isum[l / 16] += v * x->qs[l];
            }
            s += d * x->d * (float)(q3_scale(bw[b].scales, 2 * c) * isum[0] + q3_scale(bw[b].scales, 2 * c + 1) * isum[1]);
        }
    }
    return s;
}

static float dot_q5_K(int n, const void *w, const void *xv) {
    const block_q5_K *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        float d = fp16_to_fp32(bw[b].d), dmin = fp16_to_fp32(bw[b].dmin);
        for (int j = 0; j < 8; j++, x++) {
            uint8_t sc, m;
            k4_scale_min(j, bw[b].scales, &sc, &m);
            const uint8_t *q = bw[b].qs + 32 * (j / 2);
            int shift = (j & 1) * 4, isum = 0;
            for (int i = 0; i < QK; i++) isum += (((q[i] >> shift) & 0xF) | (((bw[b].qh[i] >> j) & 1) << 4)) * x->qs[i];
            s += d * sc * x->d * (float)isum - dmin * m * x->s;
        }
    }
    return s;
}

static float dot_iq4_xs(int n, const void *w, const void *xv) {
    const block_iq4_xs *bw = w;
    const block_q8 *x = xv;
    float s = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        float d = fp16_to_fp32(bw[b].d);
        for (int j = 0; j < 8; j++, x++) {
            int ls = ((bw[b].scales_l[j / 2] >> (4 * (j % 2))) & 0xF) | (((bw[b].scales_h >> (2 * j)) & 3) << 4);
            const uint8_t *q = bw[b].qs + 16 * j;
            int isum = 0;
            for (int i = 0; i < 16; i++) isum += iq4_values[q[i] & 0xF] * x->qs[i] + iq4_values[q[i] >> 4] * x->qs[i + 16];
            s += d * (float)(ls - 32) * x->d * (float)isum;
        }
    }
    return s;
}

/* Two passes per head: scores, then the softmax-weighted sum of values (normalised once at the end). */
void attend_generic(int E, int nq, const float *q, const kv_t *k, const kv_t *v, size_t stride, int n, float scale,
                    float *out, float *scores) {
    for (int h = 0; h < nq; h++) {
        const float *qh = q + (size_t)h * E;
        float *sc = scores + (size_t)h * n, *o = out + (size_t)h * E, mx = -INFINITY, sum = 0.0f;
        for (int p = 0; p < n; p++) {
            sc[p] = dot_f16(E, k + p * stride, qh) * scale;
            mx = fmaxf(mx, sc[p]);
        }
        for (int p = 0; p < n; p++) sum += (sc[p] = expf(sc[p] - mx));
        memset(o, 0, (size_t)E * 4);
        for (int p = 0; p < n; p++) {
            const kv_t *vp = v + p * stride;
            for (int e = 0; e < E; e++) o[e] += sc[p] * fp16_to_fp32(vp[e]);
        }
        for (int e = 0; e < E; e++) o[e] /= sum;
    }
}

const isa_ops isa_generic = {
    .name = "generic",
    .attend = attend_generic,
    .quantize = quantize_q8_generic,
    .dot = {[T_F32] = dot_f32, [T_F16] = dot_f16, [T_Q4_0] = dot_q4_0, [T_Q4_1] = dot_q4_1, [T_Q5_0] = dot_q5_0,
            [T_Q5_1] = dot_q5_1, [T_Q8_0] = dot_q8_0, [T_Q2_K] = dot_q2_K, [T_Q3_K] = dot_q3_K,
            [T_Q4_K] = dot_q4_K, [T_Q5_K] = dot_q5_K, [T_Q6_K] = dot_q6_K, [T_IQ4_NL] = dot_iq4_nl,
            [T_IQ4_XS] = dot_iq4_xs},
};
