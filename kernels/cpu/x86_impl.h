/* The x86 dot products, written once and compiled twice by x86.c: as AVX2 (+FMA, F16C) and as
 * AVX-512 VNNI. The variants differ only in DOT_U8S8, the unsigned-by-signed int8 dot product of
 * 32 bytes into 8 int32 lanes: maddubs + madd on AVX2, one vpdpbusd with VNNI. Needs: ISA (the
 * target attribute), NAME(x) (a prefix for each function) and DOT_U8S8. */

#define FN static inline __attribute__((target(ISA)))

FN float NAME(hsum)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 packed bytes -> 32 nibbles: low nibbles (values 0..15) then high (16..31). */
FN __m256i NAME(nibbles)(const uint8_t *qs) {
    __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

FN __m256i NAME(bytes)(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* signed x signed: |w| x (x with w's sign), so the unsigned-by-signed instruction applies. */
FN __m256i NAME(dot_s8s8)(__m256i w, __m256i x) {
    return DOT_U8S8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

static __attribute__((target(ISA))) float NAME(dot_f32)(int n, const void *w, const void *x) {
    const float *a = w, *b = x;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    float s = NAME(hsum)(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static __attribute__((target(ISA))) float NAME(dot_f16)(int n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i)));
        __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i + 8)));
        acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(b + i + 8), acc1);
    }
    float s = NAME(hsum)(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += fp16_to_fp32(a[i]) * b[i];
    return s;
}

static __attribute__((target(ISA))) float NAME(dot_q4_0)(int n, const void *w, const void *xv) {
    const block_q4_0 *bw = w;
    const block_q8 *x = xv;
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.0f; /* the -8 of every nibble: sum over blocks of d_w * x.s */
    for (int b = 0; b < n / QK; b++) {
        float d = _cvtsh_ss(bw[b].d);
        __m256i p = DOT_U8S8(NAME(nibbles)(bw[b].qs), NAME(bytes)(x[b].qs));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[b].d), acc);
        offset += d * x[b].s;
    }
    return NAME(hsum)(acc) - 8.0f * offset;
}

static __attribute__((target(ISA))) float NAME(dot_q4_1)(int n, const void *w, const void *xv) {
    const block_q4_1 *bw = w;
    const block_q8 *x = xv;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        __m256i p = DOT_U8S8(NAME(nibbles)(bw[b].qs), NAME(bytes)(x[b].qs));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(bw[b].d) * x[b].d), acc);
        mins += _cvtsh_ss(bw[b].m) * x[b].s;
    }
    return NAME(hsum)(acc) + mins;
}

static __attribute__((target(ISA))) float NAME(dot_q8_0)(int n, const void *w, const void *xv) {
    const block_q8_0 *bw = w;
    const block_q8 *x = xv;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n / QK; b++) {
        __m256i p = NAME(dot_s8s8)(NAME(bytes)(bw[b].qs), NAME(bytes)(x[b].qs));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(bw[b].d) * x[b].d), acc);
    }
    return NAME(hsum)(acc);
}

static __attribute__((target(ISA))) float NAME(dot_q4_K)(int n, const void *w, const void *xv) {
    const block_q4_K *bw = w;
    const block_q8 *x = xv;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        float d = _cvtsh_ss(bw[b].d), dmin = _cvtsh_ss(bw[b].dmin);
        for (int i = 0; i < 4; i++, x += 2) { /* 32 bytes: sub-block 2i in the low nibbles, 2i+1 high */
            __m256i raw = NAME(bytes)(bw[b].qs + 32 * i);
            uint8_t sc0, m0, sc1, m1;
            k4_scale_min(2 * i, bw[b].scales, &sc0, &m0);
            k4_scale_min(2 * i + 1, bw[b].scales, &sc1, &m1);
            __m256i p0 = DOT_U8S8(_mm256_and_si256(raw, low), NAME(bytes)(x[0].qs));
            __m256i p1 = DOT_U8S8(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low), NAME(bytes)(x[1].qs));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d * sc0 * x[0].d), acc);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d * sc1 * x[1].d), acc);
            mins += dmin * (m0 * x[0].s + m1 * x[1].s);
        }
    }
    return NAME(hsum)(acc) - mins;
}

static __attribute__((target(ISA))) float NAME(dot_q6_K)(int n, const void *w, const void *xv) {
    const block_q6_K *bw = w;
    const block_q8 *x = xv;
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n / QK_K; b++) {
        float d = _cvtsh_ss(bw[b].d);
        for (int h = 0; h < 2; h++) {
            __m256i l0 = NAME(bytes)(bw[b].ql + 64 * h), l1 = NAME(bytes)(bw[b].ql + 64 * h + 32);
            __m256i hi = NAME(bytes)(bw[b].qh + 32 * h);
            __m256i q[4] = {
                _mm256_and_si256(l0, low),
                _mm256_and_si256(l1, low),
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
            };
            for (int k = 0; k < 4; k++, x++) {
                __m256i top = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * k), two);
                __m256i v = _mm256_sub_epi8(_mm256_or_si256(q[k], _mm256_slli_epi16(top, 4)), bias);
                /* int16 pairs, then each half of 16 values times its own scale */
                __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(NAME(bytes)(x->qs), v));
                int c = 4 * h + k;
                __m256i scales = _mm256_set_m128i(_mm_set1_epi16(bw[b].scales[2 * c + 1]),
                                                  _mm_set1_epi16(bw[b].scales[2 * c]));
                __m256i p = _mm256_madd_epi16(pairs, scales);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x->d), acc);
            }
        }
    }
    return NAME(hsum)(acc);
}

/* quantize_fn: the portable C's steps in 8 lanes (max |x|, d = max / 127, round-to-even of x / d as
 * lrintf does), so the blocks are the same bit for bit. */
static __attribute__((target(ISA))) void NAME(quantize)(const float *x, block_q8 *y, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undo the packs' lane interleave */
    for (int b = 0; b < n / QK; b++, x += QK) {
        __m256 v[4] = {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), _mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)};
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float d = _mm_cvtss_f32(h) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)y[b].qs, _mm256_permutevar8x32_epi32(packed, order));
        y[b].d = d;
        y[b].s = d * (float)_mm_cvtsi128_si32(s4);
    }
}

/* dot4_fn per format: the weight block is unpacked once and dotted with 4 activation rows, in the
 * one-row dot's order of operations, so a token's result does not depend on its batch. */
#define X4(j) ((const block_q8 *)((const char *)xv + (j) * xstride))

/* out[j] = hsum(acc[j]) + add[j], its lanes added in hsum's order. */
FN void NAME(store4)(const __m256 *acc, const float *add, float *out) {
    __m128 b[4];
    for (int j = 0; j < 4; j++) b[j] = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
    _MM_TRANSPOSE4_PS(b[0], b[1], b[2], b[3]);
    __m128 r = _mm_add_ps(_mm_add_ps(b[0], b[2]), _mm_add_ps(b[1], b[3]));
    _mm_storeu_ps(out, _mm_add_ps(r, _mm_loadu_ps(add)));
}

static __attribute__((target(ISA))) void NAME(dot4_q4_0)(int n, const void *w, const void *xv, size_t xstride,
                                                        float *out) {
    const block_q4_0 *bw = w;
    const block_q8 *x[4] = {X4(0), X4(1), X4(2), X4(3)};
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float offset[4] = {0};
    for (int b = 0; b < n / QK; b++) {
        __m256i q = NAME(nibbles)(bw[b].qs);
        float d = _cvtsh_ss(bw[b].d);
        for (int j = 0; j < 4; j++) {
            __m256i p = DOT_U8S8(q, NAME(bytes)(x[j][b].qs));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[j][b].d), acc[j]);
            offset[j] += d * x[j][b].s;
        }
    }
    for (int j = 0; j < 4; j++) offset[j] = -8.0f * offset[j];
    NAME(store4)(acc, offset, out);
}

static __attribute__((target(ISA))) void NAME(dot4_q4_1)(int n, const void *w, const void *xv, size_t xstride,
                                                        float *out) {
    const block_q4_1 *bw = w;
    const block_q8 *x[4] = {X4(0), X4(1), X4(2), X4(3)};
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float mins[4] = {0};
    for (int b = 0; b < n / QK; b++) {
        __m256i q = NAME(nibbles)(bw[b].qs);
        float d = _cvtsh_ss(bw[b].d), m = _cvtsh_ss(bw[b].m);
        for (int j = 0; j < 4; j++) {
            __m256i p = DOT_U8S8(q, NAME(bytes)(x[j][b].qs));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[j][b].d), acc[j]);
            mins[j] += m * x[j][b].s;
        }
    }
    NAME(store4)(acc, mins, out);
}

static __attribute__((target(ISA))) void NAME(dot4_q8_0)(int n, const void *w, const void *xv, size_t xstride,
                                                        float *out) {
    const block_q8_0 *bw = w;
    const block_q8 *x[4] = {X4(0), X4(1), X4(2), X4(3)};
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const float zero[4] = {0};
    for (int b = 0; b < n / QK; b++) {
        __m256i q = NAME(bytes)(bw[b].qs), aq = _mm256_sign_epi8(q, q); /* |w|; x takes w's sign below */
        float d = _cvtsh_ss(bw[b].d);
        for (int j = 0; j < 4; j++) {
            __m256i p = DOT_U8S8(aq, _mm256_sign_epi8(NAME(bytes)(x[j][b].qs), q));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[j][b].d), acc[j]);
        }
    }
    NAME(store4)(acc, zero, out);
}

static __attribute__((target(ISA))) void NAME(dot4_q4_K)(int n, const void *w, const void *xv, size_t xstride,
                                                        float *out) {
    const block_q4_K *bw = w;
    const block_q8 *x[4] = {X4(0), X4(1), X4(2), X4(3)};
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float mins[4] = {0};
    for (int b = 0; b < n / QK_K; b++) {
        float d = _cvtsh_ss(bw[b].d), dmin = _cvtsh_ss(bw[b].dmin);
        for (int i = 0; i < 4; i++) {
            __m256i raw = NAME(bytes)(bw[b].qs + 32 * i);
            __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            uint8_t sc0, m0, sc1, m1;
            k4_scale_min(2 * i, bw[b].scales, &sc0, &m0);
            k4_scale_min(2 * i + 1, bw[b].scales, &sc1, &m1);
            for (int j = 0; j < 4; j++) {
                const block_q8 *xs = x[j] + 8 * b + 2 * i;
                __m256i p0 = DOT_U8S8(lo, NAME(bytes)(xs[0].qs)), p1 = DOT_U8S8(hi, NAME(bytes)(xs[1].qs));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d * sc0 * xs[0].d), acc[j]);
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d * sc1 * xs[1].d), acc[j]);
                mins[j] += dmin * (m0 * xs[0].s + m1 * xs[1].s);
            }
        }
    }
    for (int j = 0; j < 4; j++) mins[j] = -mins[j];
    NAME(store4)(acc, mins, out);
}

static __attribute__((target(ISA))) void NAME(dot4_q6_K)(int n, const void *w, const void *xv, size_t xstride,
                                                        float *out) {
    const block_q6_K *bw = w;
    const block_q8 *x[4] = {X4(0), X4(1), X4(2), X4(3)};
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const float zero[4] = {0};
    for (int b = 0; b < n / QK_K; b++) {
        float d = _cvtsh_ss(bw[b].d);
        for (int h = 0; h < 2; h++) {
            __m256i l0 = NAME(bytes)(bw[b].ql + 64 * h), l1 = NAME(bytes)(bw[b].ql + 64 * h + 32);
            __m256i hi = NAME(bytes)(bw[b].qh + 32 * h);
            __m256i q[4] = {
                _mm256_and_si256(l0, low),
                _mm256_and_si256(l1, low),
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
            };
            for (int k = 0; k < 4; k++) {
                __m256i top = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * k), two);
                __m256i v = _mm256_sub_epi8(_mm256_or_si256(q[k], _mm256_slli_epi16(top, 4)), bias);
                __m256i av = _mm256_sign_epi8(v, v);
                int c = 4 * h + k;
                __m256i scales = _mm256_set_m128i(_mm_set1_epi16(bw[b].scales[2 * c + 1]),
                                                  _mm_set1_epi16(bw[b].scales[2 * c]));
                for (int j = 0; j < 4; j++) {
                    const block_q8 *xs = x[j] + 8 * b + c;
                    __m256i pairs = _mm256_maddubs_epi16(av, _mm256_sign_epi8(NAME(bytes)(xs->qs), v));
                    __m256i p = _mm256_madd_epi16(pairs, scales);
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xs->d), acc[j]);
                }
            }
        }
    }
    NAME(store4)(acc, zero, out);
}

#undef X4

/* The 8 sums of 8 vectors, as one vector: s[i] = sum of v[i]'s lanes. */
FN __m256 NAME(hsum8)(const __m256 *v) {
    __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* e^x for x <= 0 (softmax after subtracting the max), to about 1e-7 relative: x = n ln2 + r,
 * e^r by Cephes' expf polynomial, 2^n by the exponent bits. */
FN __m256 NAME(exp_neg)(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* 8 float16 values of the cache as floats. */
FN __m256 NAME(kv8)(const kv_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* attend_fn for E a multiple of 64. Scores 8 keys at a time for each head (the 8 key rows stay in
 * L1 for the group's heads); the value sum holds 64 output floats in 8 registers per pass. */
static __attribute__((target(ISA))) void NAME(attend)(int E, int nq, const float *q, const kv_t *k, const kv_t *v,
                                                     size_t stride, int n, float scale, float *out, float *scores) {
    if (E % 64) {
        attend_generic(E, nq, q, k, v, stride, n, scale, out, scores);
        return;
    }
    int p = 0;
    for (; p + 8 <= n; p += 8) {
        for (int h = 0; h < nq; h++) {
            const float *qh = q + (size_t)h * E;
            const kv_t *kp = k + p * stride;
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int e = 0; e < E; e += 8) {
                __m256 qv = _mm256_loadu_ps(qh + e);
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qv, NAME(kv8)(kp + i * stride + e), acc[i]);
            }
            _mm256_storeu_ps(scores + (size_t)h * n + p, _mm256_mul_ps(NAME(hsum8)(acc), _mm256_set1_ps(scale)));
        }
    }
    for (; p < n; p++)
        for (int h = 0; h < nq; h++) scores[(size_t)h * n + p] = NAME(dot_f16)(E, k + p * stride, q + (size_t)h * E) * scale;
    for (int h = 0; h < nq; h++) {
        float *sc = scores + (size_t)h * n, mx = -INFINITY;
        for (int i = 0; i < n; i++) mx = sc[i] > mx ? sc[i] : mx;
        __m256 vmx = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 e = NAME(exp_neg)(_mm256_sub_ps(_mm256_loadu_ps(sc + i), vmx));
            _mm256_storeu_ps(sc + i, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = NAME(hsum)(vsum);
        for (; i < n; i++) sum += (sc[i] = expf(sc[i] - mx));
        __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (int e0 = 0; e0 < E; e0 += 64) {
            __m256 o[8];
            for (int c = 0; c < 8; c++) o[c] = _mm256_setzero_ps();
            for (int j = 0; j < n; j++) {
                __m256 w = _mm256_broadcast_ss(sc + j);
                const kv_t *vp = v + j * stride + e0;
                for (int c = 0; c < 8; c++) o[c] = _mm256_fmadd_ps(w, NAME(kv8)(vp + 8 * c), o[c]);
            }
            for (int c = 0; c < 8; c++) _mm256_storeu_ps(out + (size_t)h * E + e0 + 8 * c, _mm256_mul_ps(o[c], inv));
        }
    }
}

#undef FN
