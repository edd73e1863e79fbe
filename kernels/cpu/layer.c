/* A whole Llama layer range in one call: for each layer, RMSNorm, Q/K/V with RoPE (K and V written
 * straight into each sequence's cache), attention over the cache, output projection and residual,
 * RMSNorm, gate/up with SiLU, down projection and residual. All threads run the whole range in one
 * pool task, meeting at 7 barriers per layer; the tokens of every sequence in the batch share each
 * pass over a weight. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"
#include "matmul.h"

typedef struct {
    const range_desc *r;
    const batch_desc *b;
    float *x;                           /* [T, D] residual stream, updated in place */
    float *h, *q, *att, *ff, *kv;       /* scratch: [T, D], [T, H*E], [T, H*E], [T, F], [T, 2*G*E] */
    void *hq, *attq, *ffq;              /* the same rows as q8 blocks */
    float *scores;                      /* per thread: [max keys] */
    int max_keys;
} ctx_t;

static void rmsnorm_row(const float *x, const float *w, float *y, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

static size_t q8_row(int n) { return (size_t)n / QK * sizeof(block_q8); }

/* Rows r0..r1 of y[T, ldo] = act @ W^T. */
static void mm(const ctx_t *c, const weight_desc *w, const float *x, const void *xq, int cols, float *out, int ldo,
               int r0, int r1) {
    matmul_args a = {.w = w->data, .type = w->type, .rows = w->rows, .cols = cols, .nx = c->b->T,
                     .x = x, .xq = (void *)xq, .out = out, .ldo = ldo};
    matmul_rows(&a, r0, r1);
}

/* Norm and quantize rows of x into h / hq. */
static void norm_rows(const ctx_t *c, const float *w, int ith, int nth) {
    const range_desc *r = c->r;
    int j0, j1;
    split(c->b->T, ith, nth, &j0, &j1);
    for (int j = j0; j < j1; j++) {
        rmsnorm_row(c->x + (size_t)j * r->dim, w, c->h + (size_t)j * r->dim, r->dim, r->eps);
        quantize_q8(c->h + (size_t)j * r->dim, (block_q8 *)((char *)c->hq + j * q8_row(r->dim)), r->dim);
    }
}

static void quantize_rows(const ctx_t *c, const float *x, void *xq, int n, int ith, int nth) {
    int j0, j1;
    split(c->b->T, ith, nth, &j0, &j1);
    for (int j = j0; j < j1; j++) quantize_q8(x + (size_t)j * n, (block_q8 *)((char *)xq + j * q8_row(n)), n);
}

static void rope_pairs(float *v, const float *cs, const float *sn, int E) {
    for (int i = 0; i < E / 2; i++) {
        float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * cs[i] - b * sn[i];
        v[2 * i + 1] = a * sn[i] + b * cs[i];
    }
}

/* Heads as the unit of work for Q, K and V: each thread computes whole heads for every token, so
 * it can rotate them and file K and V in the caches without waiting for the others. */
static void qkv(const ctx_t *c, const layer_desc *L, int layer, int ith, int nth) {
    const range_desc *r = c->r;
    const batch_desc *b = c->b;
    int H = r->n_heads, G = r->n_kv_heads, E = r->head_dim, T = b->T, u0, u1;
    split(H + 2 * G, ith, nth, &u0, &u1);
    for (int u = u0; u < u1; u++) {
        const weight_desc *w = u < H ? &L->wq : u < H + G ? &L->wk : &L->wv;
        int head = u < H ? u : u < H + G ? u - H : u - H - G;
        float *out = u < H ? c->q : c->kv + (u < H + G ? 0 : G * E);
        int ldo = u < H ? H * E : 2 * G * E;
        mm(c, w, c->h, c->hq, r->dim, out, ldo, head * E, (head + 1) * E);
        for (int t = 0; t < T; t++) {
            float *v = out + (size_t)t * ldo + head * E;
            if (u < H + G) rope_pairs(v, b->cos + (size_t)t * E / 2, b->sin + (size_t)t * E / 2, E);
            if (u >= H) { /* file it in its sequence's cache at its position */
                int s = b->seq_of[t];
                const seq_desc *sq = &b->seqs[s];
                int pos = sq->start + (t - sq->first);
                float *cache = u < H + G ? sq->k : sq->v;
                memcpy(cache + (((size_t)layer * sq->capacity + pos) * G + head) * E, v, (size_t)E * 4);
            }
        }
    }
}

/* (token, head) pairs as the unit: scores over the token's visible keys, softmax, sum of values. */
static void attention(const ctx_t *c, int layer, int ith, int nth) {
    const range_desc *r = c->r;
    const batch_desc *b = c->b;
    int H = r->n_heads, G = r->n_kv_heads, E = r->head_dim, group = H / G, u0, u1;
    float *sc = c->scores + (size_t)ith * c->max_keys, scale = 1.0f / sqrtf((float)E);
    split(b->T * H, ith, nth, &u0, &u1);
    for (int u = u0; u < u1; u++) {
        int t = u / H, h = u % H, g = h / group;
        const seq_desc *sq = &b->seqs[b->seq_of[t]];
        int n_keys = sq->start + (t - sq->first) + 1;
        const float *q = c->q + (size_t)t * H * E + h * E;
        size_t stride = (size_t)G * E;
        const float *k = sq->k + ((size_t)layer * sq->capacity * G + g) * E;
        const float *v = sq->v + ((size_t)layer * sq->capacity * G + g) * E;
        float mx = -INFINITY;
        for (int p = 0; p < n_keys; p++) {
            float s = 0.0f;
            const float *kp = k + p * stride;
            for (int e = 0; e < E; e++) s += q[e] * kp[e];
            sc[p] = s * scale;
            mx = fmaxf(mx, sc[p]);
        }
        float sum = 0.0f;
        for (int p = 0; p < n_keys; p++) sum += (sc[p] = expf(sc[p] - mx));
        float *o = c->att + (size_t)t * H * E + h * E, inv = 1.0f / sum;
        memset(o, 0, (size_t)E * 4);
        for (int p = 0; p < n_keys; p++) {
            const float *vp = v + p * stride;
            float wgt = sc[p] * inv;
            for (int e = 0; e < E; e++) o[e] += wgt * vp[e];
        }
    }
}

/* out[t, r0..r1) = act @ W^T added to the residual stream. */
static void residual(const ctx_t *c, const weight_desc *w, const float *act, const void *actq, int cols, float *tmp,
                     int ith, int nth) {
    int r0, r1, D = c->r->dim;
    split(w->rows, ith, nth, &r0, &r1);
    mm(c, w, act, actq, cols, tmp, D, r0, r1);
    for (int t = 0; t < c->b->T; t++)
        for (int i = r0; i < r1; i++) c->x[(size_t)t * D + i] += tmp[(size_t)t * D + i];
}

static void ffn_gate_up(const ctx_t *c, const layer_desc *L, int ith, int nth) {
    int F = c->r->hidden_dim, T = c->b->T, r0, r1;
    split(F, ith, nth, &r0, &r1);
    float *up = c->kv; /* free after attention: [T, F] fits in the scratch sized for it */
    mm(c, &L->w_gate, c->h, c->hq, c->r->dim, c->ff, F, r0, r1);
    mm(c, &L->w_up, c->h, c->hq, c->r->dim, up, F, r0, r1);
    for (int t = 0; t < T; t++) {
        for (int i = r0; i < r1; i++) {
            float g = c->ff[(size_t)t * F + i];
            c->ff[(size_t)t * F + i] = g / (1.0f + expf(-g)) * up[(size_t)t * F + i];
        }
    }
}

static void range_task(void *arg, int ith, int nth) {
    ctx_t *c = arg;
    const range_desc *r = c->r;
    int HE = r->n_heads * r->head_dim;
    for (int l = 0; l < r->n_layers; l++) {
        const layer_desc *L = &r->layers[l];
        norm_rows(c, L->attn_norm, ith, nth);
        pool_barrier();
        qkv(c, L, l, ith, nth);
        pool_barrier();
        attention(c, l, ith, nth);
        pool_barrier();
        quantize_rows(c, c->att, c->attq, HE, ith, nth);
        pool_barrier();
        residual(c, &L->wo, c->att, c->attq, HE, c->h, ith, nth);
        pool_barrier();
        norm_rows(c, L->ffn_norm, ith, nth);
        pool_barrier();
        ffn_gate_up(c, L, ith, nth);
        pool_barrier();
        quantize_rows(c, c->ff, c->ffq, r->hidden_dim, ith, nth);
        pool_barrier();
        residual(c, &L->w_down, c->ff, c->ffq, r->hidden_dim, c->h, ith, nth);
        pool_barrier();
    }
}

int range_forward(const range_desc *r, const batch_desc *b, float *x) {
    int T = b->T, D = r->dim, HE = r->n_heads * r->head_dim, F = r->hidden_dim, GE2 = 2 * r->n_kv_heads * r->head_dim;
    int max_keys = 1;
    for (int s = 0; s < b->n_seqs; s++)
        if (b->seqs[s].start + b->seqs[s].n > max_keys) max_keys = b->seqs[s].start + b->seqs[s].n;
    int kvw = GE2 > F ? GE2 : F; /* the K/V scratch doubles as the up projection's */
    size_t floats = (size_t)T * (D + 2 * HE + F + kvw) + (size_t)pool_threads() * max_keys;
    size_t q8 = (size_t)T * (q8_row(D) + q8_row(HE) + q8_row(F));
    char *mem = malloc(floats * 4 + q8);
    if (!mem) return -1;
    ctx_t c = {.r = r, .b = b, .x = x, .max_keys = max_keys};
    float *f = (float *)mem;
    c.h = f, f += (size_t)T * D;
    c.q = f, f += (size_t)T * HE;
    c.att = f, f += (size_t)T * HE;
    c.ff = f, f += (size_t)T * F;
    c.kv = f, f += (size_t)T * kvw;
    c.scores = f, f += (size_t)pool_threads() * max_keys;
    char *p = (char *)f;
    c.hq = p, p += T * q8_row(D);
    c.attq = p, p += T * q8_row(HE);
    c.ffq = p;
    pool_run(range_task, &c);
    free(mem);
    return 0;
}
