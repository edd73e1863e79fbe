/* The arm64 dot products, written once and compiled twice by arm.c: as plain NEON and as NEON with
 * the dotprod extension. The variants differ only in DOT_S8(acc, a, b): acc + the signed int8 dot
 * product of 16 bytes, 4 bytes into each int32 lane (vmull + vpadal on armv8-a, one sdot with
 * dotprod). Every quantized format becomes int8 x int8 here (nibbles 0..15 are valid int8s), so no
 * sign trick is needed. Needs: ISA (the target attribute), NAME(x) (a prefix) and DOT_S8. */

#define FN static __attribute__((target(ISA)))

/* 16 packed bytes -> the low nibbles (values 0..15) and the high ones (16..31). */
FN inline void NAME(nibbles)(const uint8_t *qs, int8x16_t *lo, int8x16_t *hi) {
    uint8x16_t raw = vld1q_u8(qs);
    *lo = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0F)));
    *hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
}

/* The integer dot of 32 weights (two vectors) with one q8 block, as 4 int32 lanes. */
FN inline int32x4_t NAME(dot32)(int8x16_t w0, int8x16_t w1, const block_q8 *x) {
    return DOT_S8(DOT_S8(vdupq_n_s32(0), w0, vld1q_s8(x->qs)), w1, vld1q_s8(x->qs + 16));
}

FN float NAME(dot_f32)(int n, const void *w, const void *x) {
    const float *a = w, *b = x;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

FN float NAME(dot_f16)(int n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(a + i));
        acc0 = vfmaq_f32(acc0, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(b + i));
        acc1 = vfmaq_f32(acc1, vcvt_high_f32_f16(h), vld1q_f32(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < n; i++) s += h2f(a[i]) * b[i];
    return s;
}

FN float NAME(dot_q4_0)(int n, const void *w, const void *xv) {
    const block_q4_0 *bw = w;
    const block_q8 *x = xv;
    const int8x16_t eight = vdupq_n_s8(8);
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK; b++) {
        int8x16_t lo, hi;
        NAME(nibbles)(bw[b].qs, &lo, &hi);
        int32x4_t p = NAME(dot32)(vsubq_s8(lo, eight), vsubq_s8(hi, eight), &x[b]);
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), h2f(bw[b].d) * x[b].d);
    }
    return vaddvq_f32(acc);
}

FN float NAME(dot_q4_1)(int n, const void *w, const void *xv) {
    const block_q4_1 *bw = w;
    const block_q8 *x = xv;
    float32x4_t acc = vdupq_n_f32(0.0f);
    float mins = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        int8x16_t lo, hi;
        NAME(nibbles)(bw[b].qs, &lo, &hi);
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(NAME(dot32)(lo, hi, &x[b])), h2f(bw[b].d) * x[b].d);
        mins += h2f(bw[b].m) * x[b].s;
    }
    return vaddvq_f32(acc) + mins;
}

FN float NAME(dot_q8_0)(int n, const void *w, const void *xv) {
    const block_q8_0 *bw = w;
    const block_q8 *x = xv;
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK; b++) {
        int32x4_t p = NAME(dot32)(vld1q_s8(bw[b].qs), vld1q_s8(bw[b].qs + 16), &x[b]);
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), h2f(bw[b].d) * x[b].d);
    }
    return vaddvq_f32(acc);
}

FN float NAME(dot_q4_K)(int n, const void *w, const void *xv) {
    const block_q4_K *bw = w;
    const block_q8 *x = xv;
    const uint8x16_t low = vdupq_n_u8(0x0F);
    float32x4_t acc = vdupq_n_f32(0.0f);
    float mins = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        float d = h2f(bw[b].d), dmin = h2f(bw[b].dmin);
        for (int i = 0; i < 4; i++, x += 2) { /* 32 bytes: sub-block 2i in the low nibbles, 2i+1 high */
            uint8x16_t r0 = vld1q_u8(bw[b].qs + 32 * i), r1 = vld1q_u8(bw[b].qs + 32 * i + 16);
            uint8_t sc0, m0, sc1, m1;
            k4_scale_min(2 * i, bw[b].scales, &sc0, &m0);
            k4_scale_min(2 * i + 1, bw[b].scales, &sc1, &m1);
            int8x16_t lo0 = vreinterpretq_s8_u8(vandq_u8(r0, low)), lo1 = vreinterpretq_s8_u8(vandq_u8(r1, low));
            int8x16_t hi0 = vreinterpretq_s8_u8(vshrq_n_u8(r0, 4)), hi1 = vreinterpretq_s8_u8(vshrq_n_u8(r1, 4));
            int32x4_t p0 = NAME(dot32)(lo0, lo1, &x[0]), p1 = NAME(dot32)(hi0, hi1, &x[1]);
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p0), d * sc0 * x[0].d);
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p1), d * sc1 * x[1].d);
            mins += dmin * (m0 * x[0].s + m1 * x[1].s);
        }
    }
    return vaddvq_f32(acc) - mins;
}

FN float NAME(dot_q6_K)(int n, const void *w, const void *xv) {
    const block_q6_K *bw = w;
    const block_q8 *x = xv;
    const uint8x16_t low = vdupq_n_u8(0x0F), two = vdupq_n_u8(3);
    const int8x16_t bias = vdupq_n_s8(32);
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK_K; b++) {
        float d = h2f(bw[b].d);
        for (int c = 0; c < 8; c++, x++) { /* chunk c: values 32c .. 32c+31, two halves of 16 with their own scales */
            int h = c / 4, k = c % 4;
            int32x4_t p = vdupq_n_s32(0);
            for (int half = 0; half < 2; half++) {
                int at = 16 * half;
                uint8x16_t lo = vld1q_u8(bw[b].ql + 64 * h + 32 * (k & 1) + at);
                lo = k < 2 ? vandq_u8(lo, low) : vshrq_n_u8(lo, 4);
                uint8x16_t hb = vld1q_u8(bw[b].qh + 32 * h + at); /* bits 2k, 2k+1: the top two of the value */
                uint8x16_t top = vandq_u8(vshlq_u8(hb, vdupq_n_s8((int8_t)(-2 * k))), two);
                int8x16_t q = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, vshlq_n_u8(top, 4))), bias);
                int32x4_t part = DOT_S8(vdupq_n_s32(0), q, vld1q_s8(x->qs + at));
                p = vmlaq_n_s32(p, part, bw[b].scales[2 * c + half]);
            }
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), d * x->d);
        }
    }
    return vaddvq_f32(acc);
}

#undef FN
