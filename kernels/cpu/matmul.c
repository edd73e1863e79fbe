/* y = x W^T straight from W's blocks: threads split W's rows; each thread takes a tile of rows at a
 * time and runs every activation row over it, so a weight block is read from memory once per
 * step whatever the batch (the tile stays in L1 while the batch passes over it). */
#include <stdlib.h>

#include "cpu.h"
#include "matmul.h"

#define TILE 16

const isa_ops *cur_isa = &isa_generic;

dot_fn dot_for(int t) { return cur_isa->dot[t] ? cur_isa->dot[t] : isa_generic.dot[t]; }

void quantize_q8(const float *x, block_q8 *y, int n) {
    (cur_isa->quantize ? cur_isa->quantize : quantize_q8_generic)(x, y, n);
}

size_t act_bytes(int t, int n) { return takes_q8(t) ? (size_t)n / QK * sizeof(block_q8) : (size_t)n * 4; }


const void *act_row(int t, const float *x, const void *xq, int n, int j) {
    return takes_q8(t) ? (const void *)((const char *)xq + (size_t)j * act_bytes(t, n)) : (const void *)(x + (size_t)j * n);
}

void matmul_rows(const matmul_args *a, int r0, int r1) {
    dot_fn dot = dot_for(a->type);
    dot4_fn dot4 = cur_isa->dot4[a->type]; /* NULL: one row at a time */
    size_t rb = row_bytes(a->type, a->cols), ab = act_bytes(a->type, a->cols);
    for (int t0 = r0; t0 < r1; t0 += TILE) {
        int t1 = t0 + TILE < r1 ? t0 + TILE : r1, j = 0;
        for (; dot4 && j + 4 <= a->nx; j += 4) {
            const void *xj = act_row(a->type, a->x, a->xq, a->cols, j);
            float *out = a->out + (size_t)j * a->ldo, o[4];
            for (int r = t0; r < t1; r++) {
                dot4(a->cols, a->w + (size_t)r * rb, xj, ab, o);
                for (int i = 0; i < 4; i++) out[(size_t)i * a->ldo + r] = o[i];
            }
        }
        for (; j < a->nx; j++) {
            const void *xj = act_row(a->type, a->x, a->xq, a->cols, j);
            float *out = a->out + (size_t)j * a->ldo;
            for (int r = t0; r < t1; r++) out[r] = dot(a->cols, a->w + (size_t)r * rb, xj);
        }
    }
}

void split(int n, int ith, int nth, int *lo, int *hi) {
    int per = (n + nth - 1) / nth;
    *lo = ith * per < n ? ith * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

static void matmul_task(void *ctx, int ith, int nth) {
    matmul_args *a = ctx;
    if (takes_q8(a->type)) {
        int j0, j1;
        split(a->nx, ith, nth, &j0, &j1);
        size_t ab = act_bytes(a->type, a->cols);
        for (int j = j0; j < j1; j++) quantize_q8(a->x + (size_t)j * a->cols, (block_q8 *)((char *)a->xq + j * ab), a->cols);
        pool_barrier();
    }
    int r0, r1;
    split(a->rows, ith, nth, &r0, &r1);
    matmul_rows(a, r0, r1);
}

int matmul(matmul_args *a) {
    void *xq = NULL;
    if (takes_q8(a->type)) {
        xq = malloc(act_bytes(a->type, a->cols) * (size_t)a->nx);
        if (!xq) return -1;
    }
    a->xq = xq;
    pool_run(matmul_task, a);
    free(xq);
    return 0;
}
