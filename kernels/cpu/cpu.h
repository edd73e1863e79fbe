/* The native CPU backend: shared types of the kernels, the ISA table and the thread pool.
 *
 * Weights stay in GGML's block formats, read in place from the memory-mapped file. Activations
 * are quantized per 32 values to int8 (a "q8" block: scale d, d * sum of the int8s, 32 int8s), so
 * every quantized format's dot product is an integer dot product per 32 values plus one float
 * multiply-add. A K-format's 32-value sub-blocks line up with these blocks, so one activation
 * format serves all weight formats. F16/F32 weights take float activations.
 */
#ifndef APPLIANCE_CPU_H
#define APPLIANCE_CPU_H

#include <stddef.h>
#include <stdint.h>

/* GGML's type ids, as the GGUF file writes them. */
enum {
    T_F32 = 0,
    T_F16 = 1,
    T_Q4_0 = 2,
    T_Q4_1 = 3,
    T_Q5_0 = 6,
    T_Q5_1 = 7,
    T_Q8_0 = 8,
    T_Q2_K = 10,
    T_Q3_K = 11,
    T_Q4_K = 12,
    T_Q5_K = 13,
    T_Q6_K = 14,
    T_IQ4_NL = 20,
    T_IQ4_XS = 23,
    T_COUNT = 24
};

#define QK 32
#define QK_K 256

typedef struct {
    float d;       /* scale: x ~ d * qs */
    float s;       /* d * sum(qs): what a weight block's offset (min) term multiplies */
    int8_t qs[QK];
} block_q8;

/* Weight blocks, byte for byte as ggml-common.h lays them out. */
typedef struct { uint16_t d; uint8_t qs[16]; } block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[16]; } block_q4_1;
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1;
typedef struct { uint16_t d; int8_t qs[32]; } block_q8_0;
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } block_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } block_q3_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6_K;
typedef struct { uint16_t d; uint8_t qs[16]; } block_iq4_nl;
typedef struct { uint16_t d, scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } block_iq4_xs;
_Static_assert(sizeof(block_q5_0) == 22 && sizeof(block_q5_1) == 24 && sizeof(block_q2_K) == 84 &&
                   sizeof(block_q3_K) == 110 && sizeof(block_q5_K) == 176 && sizeof(block_iq4_nl) == 18 &&
                   sizeof(block_iq4_xs) == 136,
               "block layouts as ggml-common.h's");

/* One row of weights (n values) dotted with one activation row: q8 blocks for the quantized
 * formats, floats for F16/F32. */
typedef float (*dot_fn)(int n, const void *w, const void *x);

/* One weight row dotted with 4 activation rows `xstride` bytes apart: out[j] = dot(w, x_j). Prefill
 * and batches use it so a weight block is unpacked once for 4 tokens. */
typedef void (*dot4_fn)(int n, const void *w, const void *x, size_t xstride, float *out);

/* The KV cache holds float16, as llama.cpp's does by default: half the memory and half the bytes
 * decode reads per key (appliance/bench/accuracy.py measures what it does to the logits). */
typedef uint16_t kv_t;

/* Attention of nq query heads that share one KV head: out[h] = softmax_p(q[h] . k[p] * scale) v[p]
 * over keys p < n; q and out hold the nq heads E floats apart, k and v rows are `stride` values
 * apart. scores: scratch of nq * n floats. */
typedef void (*attend_fn)(int E, int nq, const float *q, const kv_t *k, const kv_t *v, size_t stride, int n,
                          float scale, float *out, float *scores);

/* Activations to q8 blocks (n a multiple of 32); every variant's must equal the portable C's bit for bit. */
typedef void (*quantize_fn)(const float *x, block_q8 *y, int n);

/* An instruction-set variant. A NULL dot, dot4, attend or quantize means the portable C's (the
 * callers fall back, so a variant may add them one at a time). */
typedef struct {
    const char *name;
    dot_fn dot[T_COUNT];
    dot4_fn dot4[T_COUNT];
    attend_fn attend;
    quantize_fn quantize;
} isa_ops;

extern const isa_ops isa_generic;
/* Format t's dot product in the variant in use, else the portable C's (NULL: no kernel reads t). */
dot_fn dot_for(int t);
void attend_generic(int E, int nq, const float *q, const kv_t *k, const kv_t *v, size_t stride, int n, float scale,
                    float *out, float *scores);
#if defined(__x86_64__)
extern const isa_ops isa_avx2;
extern const isa_ops isa_avx512;
#elif defined(__aarch64__)
extern const isa_ops isa_neon;
extern const isa_ops isa_neon_dotprod;
#endif

#define MAX_ISAS 4
/* The variants this CPU runs, best first, into out; returns how many (isa.c). */
int detect_isas(const isa_ops *out[MAX_ISAS]);

/* Bytes of one row of n values in format t; 0 for an unsupported format. */
size_t row_bytes(int t, int n);
int block_size(int t);
/* Whether format t's weights take q8 activations (else float). */
int takes_q8(int t);

float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
/* With the variant in use (matmul.c), and the portable C's. */
void quantize_q8(const float *x, block_q8 *y, int n);
void quantize_q8_generic(const float *x, block_q8 *y, int n);

/* The K formats' 6-bit scale and min of sub-block j (ggml's get_scale_min_k4). */
static inline void k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* The thread pool: fn(ctx, ith, nth) runs on nth threads, the caller being thread 0. */
typedef void (*task_fn)(void *ctx, int ith, int nth);
int pool_threads(void);
void pool_set_threads(int n);
void pool_run(task_fn fn, void *ctx);
/* Inside a task: wait until all nth threads reach this point. */
void pool_barrier(void);

#endif
