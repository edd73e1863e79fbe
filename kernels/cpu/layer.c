/* A whole Llama layer range in one call: for each layer, RMSNorm, Q/K/V (with the biases and per-head
 * norms of the architectures that have them) and RoPE (K and V written
 * straight into each sequence's cache), attention over the cache, output projection and residual,
 * RMSNorm, gate/up with SiLU, down projection and residual. All threads run the whole range in one
 * pool task; the tokens of every sequence in the batch share each pass over a weight.
 *
 * Threads take work units (a head's rows, 32 rows of a weight, a token's attention for a KV head)
 * from a shared counter per phase rather than a fixed share, so a thread the shared machine
 * delays does not hold the others at the next barrier. Barriers per layer: 5 when a step has few
 * rows (each thread then norms them itself), else 7. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"
#include "matmul.h"

enum { PH_QKV, PH_ATTN, PH_WO, PH_GATE_UP, PH_DOWN, PHASES };
#define CHUNK 32   /* weight rows per work unit: one q8 block of the next activation */
#define PRIVATE_NORM_ROWS 4

typedef struct {
    const range_desc *r;
    const batch_desc *b;
    float *x;                           /* [T, D] residual stream, updated in place */
    float *h, *q, *att, *ff, *kv;       /* scratch: [T, D], [T, H*E], [T, H*E], [T, F], [T, 2*G*E] */
    void *hq, *attq, *ffq;              /* the same rows as q8 blocks */
    float *scores;                      /* per thread: [group * max keys] */
    int max_keys;
    int private_norm;                   /* T <= PRIVATE_NORM_ROWS: each thread norms all rows into its own */
    float *h_own;                       /* per thread [T, D] */
    void *hq_own;                       /* per thread [T] q8 rows of D */
    atomic_int *next;                   /* [layers * PHASES]: the next work unit of each phase */
} ctx_t;

static void rmsnorm_row(const float *x, const float *w, float *y, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

static size_t q8_row(int n) { return (size_t)n / QK * sizeof(block_q8); }

static block_q8 *q8_at(const void *base, int n, int row) { return (block_q8 *)((char *)base + row * q8_row(n)); }

/* Rows r0..r1 of out[T, ldo] = act @ W^T. */
static void mm(const ctx_t *c, const weight_desc *w, const float *x, const void *xq, int cols, float *out, int ldo,
               int r0, int r1) {
    matmul_args a = {.w = w->data, .type = w->type, .rows = w->rows, .cols = cols, .nx = c->b->T,
                     .x = x, .xq = (void *)xq, .out = out, .ldo = ldo};
    matmul_rows(&a, r0, r1);
}

/* The normed rows a matmul phase reads: its own copy for few rows (no barrier), else shared rows
 * the threads norm a share of each, then meet. */
static void normed(const ctx_t *c, const float *w, int ith, int nth, const float **h, const void **hq) {
    const range_desc *r = c->r;
    int T = c->b->T, j0 = 0, j1 = T;
    float *hh = c->h;
    void *hqq = c->hq;
    if (c->private_norm) {
        hh = c->h_own + (size_t)ith * T * r->dim;
        hqq = (char *)c->hq_own + (size_t)ith * T * q8_row(r->dim);
    } else {
        split(T, ith, nth, &j0, &j1);
    }
    for (int j = j0; j < j1; j++) {
        rmsnorm_row(c->x + (size_t)j * r->dim, w, hh + (size_t)j * r->dim, r->dim, r->eps);
        quantize_q8(hh + (size_t)j * r->dim, q8_at(hqq, r->dim, j), r->dim);
    }
    if (!c->private_norm) pool_barrier();
    *h = hh;
    *hq = hqq;
}

/* Work units of one phase, handed out in order until none is left: -1. */
static int next_unit(const ctx_t *c, int layer, int phase, int n_units) {
    int u = atomic_fetch_add_explicit(&c->next[layer * PHASES + phase], 1, memory_order_relaxed);
    return u < n_units ? u : -1;
}

/* Rotate pair i of a head, (v[2i], v[2i+1]) or with halves (v[i], v[i + E/2]), by its angle. */
static void rope(float *v, const float *cs, const float *sn, int E, int halves) {
    for (int i = 0; i < E / 2; i++) {
        int i0 = halves ? i : 2 * i, i1 = halves ? i + E / 2 : 2 * i + 1;
        float a = v[i0], b = v[i1];
        v[i0] = a * cs[i] - b * sn[i];
        v[i1] = a * sn[i] + b * cs[i];
    }
}

/* Heads as the unit of work for Q, K and V: a unit computes one head for every token, so it can add
 * its bias, norm and rotate it and file K and V in the caches without waiting for the others. */
static void qkv(const ctx_t *c, const layer_desc *L, int layer, const float *h, const void *hq) {
    const range_desc *r = c->r;
    const batch_desc *b = c->b;
    int H = r->n_heads, G = r->n_kv_heads, E = r->head_dim, T = b->T, u;
    while ((u = next_unit(c, layer, PH_QKV, H + 2 * G)) >= 0) {
        const weight_desc *w = u < H ? &L->wq : u < H + G ? &L->wk : &L->wv;
        int head = u < H ? u : u < H + G ? u - H : u - H - G;
        const float *bias = u < H ? L->bq : u < H + G ? L->bk : L->bv;
        const float *norm = u < H ? L->q_norm : u < H + G ? L->k_norm : NULL;
        float *out = u < H ? c->q : c->kv + (u < H + G ? 0 : G * E);
        int ldo = u < H ? H * E : 2 * G * E;
        mm(c, w, h, hq, r->dim, out, ldo, head * E, (head + 1) * E);
        for (int t = 0; t < T; t++) {
            float *v = out + (size_t)t * ldo + head * E;
            if (bias)
                for (int e = 0; e < E; e++) v[e] += bias[head * E + e];
            if (norm) rmsnorm_row(v, norm, v, E, r->eps);
            if (u < H + G) rope(v, b->cos + (size_t)t * E / 2, b->sin + (size_t)t * E / 2, E, r->rope_halves);
            if (u >= H) { /* file it in its sequence's cache at its position */
                int s = b->seq_of[t];
                const seq_desc *sq = &b->seqs[s];
                int pos = sq->start + (t - sq->first);
                kv_t *cache = (u < H + G ? sq->k : sq->v) + (((size_t)layer * sq->capacity + pos) * G + head) * E;
                for (int e = 0; e < E; e++) cache[e] = fp32_to_fp16(v[e]);
            }
        }
    }
}

/* A unit is a token and a KV head with the query heads that share it (its K and V rows are read
 * once for all of them: the cache is most of what decode reads besides the weights), or a single
 * query head when that leaves fewer units than threads. With a sliding window a token reads only
 * the last `window` keys.
 * The last tokens see the most keys, so units go out from the last token back. Each unit quantizes
 * its own heads' output when they are whole q8 blocks (else a separate pass does, after a barrier). */
static void attention(const ctx_t *c, int layer, int ith, int nth) {
    const range_desc *r = c->r;
    const batch_desc *b = c->b;
    int H = r->n_heads, G = r->n_kv_heads, E = r->head_dim, T = b->T, HE = H * E, group = H / G;
    int per = T * G >= nth ? group : 1, units_per_token = H / per, u;
    attend_fn attend = cur_isa->attend ? cur_isa->attend : attend_generic;
    float *sc = c->scores + (size_t)ith * group * c->max_keys, scale = 1.0f / sqrtf((float)E);
    size_t stride = (size_t)G * E;
    while ((u = next_unit(c, layer, PH_ATTN, T * units_per_token)) >= 0) {
        u = T * units_per_token - 1 - u;
        int t = u / units_per_token, h0 = (u % units_per_token) * per, g = h0 / group;
        const seq_desc *sq = &b->seqs[b->seq_of[t]];
        int n_keys = sq->start + (t - sq->first) + 1, first = 0;
        if (r->window && n_keys > r->window) first = n_keys - r->window, n_keys = r->window;
        const kv_t *k = sq->k + ((size_t)layer * sq->capacity + first) * stride + (size_t)g * E;
        const kv_t *v = sq->v + ((size_t)layer * sq->capacity + first) * stride + (size_t)g * E;
        float *o = c->att + (size_t)t * HE + (size_t)h0 * E;
        attend(E, per, c->q + (size_t)t * HE + (size_t)h0 * E, k, v, stride, n_keys, scale, o, sc);
        if (E % QK == 0) quantize_q8(o, q8_at(c->attq, HE, t) + h0 * E / QK, per * E);
    }
    if (E % QK) {
        pool_barrier();
        int j0, j1;
        split(T, ith, nth, &j0, &j1);
        for (int j = j0; j < j1; j++) quantize_q8(c->att + (size_t)j * HE, q8_at(c->attq, HE, j), HE);
    }
}

/* x[:, rows] += act @ W[rows]^T, CHUNK rows a unit (tmp: [T, D] scratch). */
static void residual(const ctx_t *c, const weight_desc *w, int layer, int phase, const float *act, const void *actq,
                     int cols, float *tmp) {
    int D = c->r->dim, u;
    while ((u = next_unit(c, layer, phase, D / CHUNK)) >= 0) {
        int r0 = u * CHUNK, r1 = r0 + CHUNK;
        mm(c, w, act, actq, cols, tmp, D, r0, r1);
        for (int t = 0; t < c->b->T; t++)
            for (int i = r0; i < r1; i++) c->x[(size_t)t * D + i] += tmp[(size_t)t * D + i];
    }
}

/* silu(gate) * up, CHUNK rows a unit, each unit quantizing the q8 block its rows make. */
static void ffn_gate_up(const ctx_t *c, const layer_desc *L, int layer, const float *h, const void *hq) {
    int F = c->r->hidden_dim, T = c->b->T, u;
    float *up = c->kv; /* free after attention: [T, F] fits in the scratch sized for it */
    while ((u = next_unit(c, layer, PH_GATE_UP, F / CHUNK)) >= 0) {
        int r0 = u * CHUNK, r1 = r0 + CHUNK;
        mm(c, &L->w_gate, h, hq, c->r->dim, c->ff, F, r0, r1);
        mm(c, &L->w_up, h, hq, c->r->dim, up, F, r0, r1);
        for (int t = 0; t < T; t++) {
            float *f = c->ff + (size_t)t * F;
            for (int i = r0; i < r1; i++) f[i] = f[i] / (1.0f + expf(-f[i])) * up[(size_t)t * F + i];
            quantize_q8(f + r0, q8_at(c->ffq, F, t) + r0 / QK, CHUNK);
        }
    }
}

static void range_task(void *arg, int ith, int nth) {
    ctx_t *c = arg;
    const range_desc *r = c->r;
    int HE = r->n_heads * r->head_dim;
    for (int l = 0; l < r->n_layers; l++) {
        const layer_desc *L = &r->layers[l];
        const float *h;
        const void *hq;
        normed(c, L->attn_norm, ith, nth, &h, &hq);
        qkv(c, L, l, h, hq);
        pool_barrier();
        attention(c, l, ith, nth);
        pool_barrier();
        residual(c, &L->wo, l, PH_WO, c->att, c->attq, HE, c->h);
        pool_barrier();
        normed(c, L->ffn_norm, ith, nth, &h, &hq);
        ffn_gate_up(c, L, l, h, hq);
        pool_barrier();
        residual(c, &L->w_down, l, PH_DOWN, c->ff, c->ffq, r->hidden_dim, c->h);
        pool_barrier();
    }
}

int range_forward(const range_desc *r, const batch_desc *b, float *x) {
    int T = b->T, D = r->dim, HE = r->n_heads * r->head_dim, F = r->hidden_dim, GE2 = 2 * r->n_kv_heads * r->head_dim;
    int nth = pool_threads(), group = r->n_heads / r->n_kv_heads, max_keys = 1, private_norm = T <= PRIVATE_NORM_ROWS;
    for (int s = 0; s < b->n_seqs; s++)
        if (b->seqs[s].start + b->seqs[s].n > max_keys) max_keys = b->seqs[s].start + b->seqs[s].n;
    int kvw = GE2 > F ? GE2 : F; /* the K/V scratch doubles as the up projection's */
    int own = private_norm ? nth : 0;
    size_t floats = (size_t)T * (D + 2 * HE + F + kvw) + (size_t)nth * group * max_keys + (size_t)own * T * D;
    size_t q8 = (size_t)T * (q8_row(D) + q8_row(HE) + q8_row(F)) + (size_t)own * T * q8_row(D);
    char *mem = malloc(floats * 4 + q8);
    atomic_int *next = calloc((size_t)r->n_layers * PHASES, sizeof(atomic_int));
    if (!mem || !next) {
        free(mem);
        free(next);
        return -1;
    }
    ctx_t c = {.r = r, .b = b, .x = x, .max_keys = max_keys, .private_norm = private_norm, .next = next};
    float *f = (float *)mem;
    c.h = f, f += (size_t)T * D;
    c.q = f, f += (size_t)T * HE;
    c.att = f, f += (size_t)T * HE;
    c.ff = f, f += (size_t)T * F;
    c.kv = f, f += (size_t)T * kvw;
    c.scores = f, f += (size_t)nth * group * max_keys;
    c.h_own = f, f += (size_t)own * T * D;
    char *p = (char *)f;
    c.hq = p, p += T * q8_row(D);
    c.attq = p, p += T * q8_row(HE);
    c.ffq = p, p += T * q8_row(F);
    c.hq_own = p;
    pool_run(range_task, &c);
    free(mem);
    free(next);
    return 0;
}

static void attention_task(void *arg, int ith, int nth) { attention(arg, 0, ith, nth); }

int attention_forward(int H, int G, int E, int T, int start, const float *q, const kv_t *k, const kv_t *v,
                      float *out) {
    range_desc r = {.dim = H * E, .n_heads = H, .n_kv_heads = G, .head_dim = E, .n_layers = 1};
    seq_desc sq = {.first = 0, .n = T, .start = start, .k = (kv_t *)k, .v = (kv_t *)v, .capacity = start + T};
    int *seq_of = calloc((size_t)T, sizeof(int)), nth = pool_threads(), keys = start + T;
    float *scores = malloc((size_t)nth * (H / G) * keys * 4);
    void *attq = malloc((size_t)T * q8_row(H * E) + sizeof(block_q8)); /* unused when E is not whole blocks */
    atomic_int *next = calloc(PHASES, sizeof(atomic_int));
    int rc = -1;
    if (seq_of && scores && attq && next) {
        batch_desc b = {.T = T, .n_seqs = 1, .seqs = &sq, .seq_of = seq_of};
        ctx_t c = {.r = &r, .b = &b, .q = (float *)q, .att = out, .attq = attq, .scores = scores, .max_keys = keys,
                   .next = next};
        pool_run(attention_task, &c);
        rc = 0;
    }
    free(seq_of);
    free(scores);
    free(attq);
    free(next);
    return rc;
}
