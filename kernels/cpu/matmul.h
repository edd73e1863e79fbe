/* The matrix product the Python module and the fused layer share. */
#ifndef APPLIANCE_MATMUL_H
#define APPLIANCE_MATMUL_H

#include "cpu.h"

extern const isa_ops *cur_isa;

typedef struct {
    const uint8_t *w; /* rows x row_bytes(type, cols), as the file stores it */
    int type, rows, cols, nx;
    const float *x; /* nx x cols */
    void *xq;       /* nx activation rows in the form dot takes (q8 blocks), or NULL for float */
    float *out;     /* nx rows, ldo apart; columns [0, rows) written */
    int ldo;
} matmul_args;

/* Bytes of one activation row of n values prepared for weights of type t. */
size_t act_bytes(int t, int n);
const void *act_row(int t, const float *x, const void *xq, int n, int j);
/* Rows [r0, r1) of out for every activation row; a->xq already prepared. */
void matmul_rows(const matmul_args *a, int r0, int r1);
/* [lo, hi): thread ith's share of n items. */
void split(int n, int ith, int nth, int *lo, int *hi);
/* The whole product on the pool (quantizes x itself). 0, or -1 when out of memory. */
int matmul(matmul_args *a);

#endif
