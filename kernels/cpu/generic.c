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
    case T_Q4_0: case T_Q4_1: case T_Q8_0: return QK;
    case T_Q4_K: case T_Q6_K: return QK_K;
    default: return 0;
    }
}

size_t row_bytes(int t, int n) {
    switch (t) {
    case T_F32: return (size_t)n * 4;
    case T_F16: return (size_t)n * 2;
    case T_Q4_0: return (size_t)n / QK * sizeof(block_q4_0);
    case T_Q4_1: return (size_t)n / QK * sizeof(block_q4_1);
    case T_Q8_0: return (size_t)n / QK * sizeof(block_q8_0);
    case T_Q4_K: return (size_t)n / QK_K * sizeof(block_q4_K);
    case T_Q6_K: return (size_t)n / QK_K * sizeof(block_q6_K);
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
    .dot = {[T_F32] = dot_f32, [T_F16] = dot_f16, [T_Q4_0] = dot_q4_0, [T_Q4_1] = dot_q4_1,
            [T_Q8_0] = dot_q8_0, [T_Q4_K] = dot_q4_K, [T_Q6_K] = dot_q6_K},
};
