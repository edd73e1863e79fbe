/* A layer range's weights as the fused forward pass reads them, and a batch of sequences. */
#ifndef APPLIANCE_LAYER_H
#define APPLIANCE_LAYER_H

#include "cpu.h"

typedef struct {
    const uint8_t *data; /* rows x row_bytes(type, cols), in place in the mapped file */
    int type, rows;
} weight_desc;

typedef struct {
    const float *attn_norm, *ffn_norm;
    weight_desc wq, wk, wv, wo, w_gate, w_up, w_down;
    /* NULL where the architecture has none: q/k/v biases [H*E], [G*E], [G*E] (Qwen2), and RMSNorm
     * weights [E] applied to each q and k head before RoPE (Qwen3). */
    const float *bq, *bk, *bv, *q_norm, *k_norm;
} layer_desc;

typedef struct {
    int dim, n_heads, n_kv_heads, head_dim, hidden_dim, n_layers;
    float eps;
    int rope_halves; /* RoPE turns (v[i], v[i + E/2]) (Qwen's "NeoX" layout), else adjacent pairs */
    int window;      /* keys a query sees, its own included (a sliding window); 0: all before it */
    layer_desc *layers;
} range_desc;

typedef struct {
    int first, n, start; /* its rows of the batch, and the position of the first */
    kv_t *k, *v;         /* its cache: [layers, capacity, G, E] each, float16 */
    int capacity;
} seq_desc;

typedef struct {
    int T, n_seqs;
    const seq_desc *seqs;
    const int *seq_of;          /* [T]: the sequence each row belongs to */
    const float *cos, *sin;     /* [T, E/2]: each row's RoPE angles */
} batch_desc;

/* x [T, D] through every layer of r, in place. 0, or -1 when out of memory. */
int range_forward(const range_desc *r, const batch_desc *b, float *x);

/* The attention step alone, as range_forward runs it, for tests: T queries q [T, H*E] at positions
 * start.. over keys and values [start + T, G, E]; out [T, H*E]. 0, or -1 when out of memory. */
int attention_forward(int H, int G, int E, int T, int start, const float *q, const kv_t *k, const kv_t *v,
                      float *out);

#endif
