/* The native kernels without Python, for the arm64 test (tests/test_cpu_arm64.py): cross-compiled
 * with the kernel sources and run under qemu-aarch64. It picks the variant as kernels._cpu does
 * (detect_isas), prints its name, then runs the commands on stdin, one per line, on files that
 * the test writes and reads back:
 *   threads N
 *   isa NAME                                use variant NAME (one of those listed) from here on
 *   quantize N X OUT                        X: N floats -> OUT: N/32 q8 blocks
 *   matmul TYPE ROWS COLS NX W X OUT        OUT [NX, ROWS] = X [NX, COLS] @ W^T, W as the file stores it
 *   layer DIR D H G E F EPS TYPES*7 NSEQ (N START CAPACITY)*NSEQ
 *        one Llama layer (range_forward) on DIR/{attn_norm,ffn_norm,wq,..,w_down,x,cos,sin,k0,v0,..}.bin;
 *        writes DIR/out.bin (x after the layer); the caches are updated in memory only.
 * Each command answers "ok"; an error exits 1 with its reason on stderr. Nothing is freed: a run is short. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/cpu/cpu.h"
#include "../../kernels/cpu/layer.h"
#include "../../kernels/cpu/matmul.h"

static void die(const char *what, const char *detail) {
    fprintf(stderr, "arm_driver: %s %s\n", what, detail);
    exit(1);
}

/* The whole file, which must be `want` bytes. */
static void *load(const char *path, size_t want) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open", path);
    void *buf = malloc(want ? want : 1);
    if (fread(buf, 1, want, f) != want || fgetc(f) != EOF) die("wrong size:", path);
    fclose(f);
    return buf;
}

static void save(const char *path, const void *buf, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, n, f) != n || fclose(f)) die("cannot write", path);
}

static const char *in_dir(const char *dir, const char *name) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s.bin", dir, name);
    return path;
}

static void run_layer(char *args) {
    static const char *parts[7] = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"};
    char dir[2048];
    range_desc r = {.n_layers = 1};
    layer_desc L = {0}; /* no biases or per-head norms */
    weight_desc *ws[7] = {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down};
    int n_seqs, used;
    if (sscanf(args, "%2047s %d %d %d %d %d %f %d %d %d %d %d %d %d %d%n", dir, &r.dim, &r.n_heads, &r.n_kv_heads,
               &r.head_dim, &r.hidden_dim, &r.eps, &ws[0]->type, &ws[1]->type, &ws[2]->type, &ws[3]->type,
               &ws[4]->type, &ws[5]->type, &ws[6]->type, &n_seqs, &used) != 15)
        die("bad layer command:", args);
    int D = r.dim, HE = r.n_heads * r.head_dim, GE = r.n_kv_heads * r.head_dim, F = r.hidden_dim;
    int cols[7] = {D, D, D, HE, D, D, F}, rows[7] = {HE, GE, GE, D, F, F, D};
    L.attn_norm = load(in_dir(dir, "attn_norm"), (size_t)D * 4);
    L.ffn_norm = load(in_dir(dir, "ffn_norm"), (size_t)D * 4);
    for (int j = 0; j < 7; j++) {
        ws[j]->rows = rows[j];
        ws[j]->data = load(in_dir(dir, parts[j]), row_bytes(ws[j]->type, cols[j]) * rows[j]);
    }
    r.layers = &L;
    seq_desc *sq = calloc((size_t)n_seqs, sizeof *sq);
    int T = 0;
    for (int s = 0; s < n_seqs; s++) {
        char *rest = args + used, name[16];
        int more;
        if (sscanf(rest, "%d %d %d%n", &sq[s].n, &sq[s].start, &sq[s].capacity, &more) != 3) die("bad sequence:", rest);
        used += more;
        sq[s].first = T;
        T += sq[s].n;
        size_t cache = (size_t)sq[s].capacity * GE * sizeof(kv_t);
        snprintf(name, sizeof name, "k%d", s);
        sq[s].k = load(in_dir(dir, name), cache);
        snprintf(name, sizeof name, "v%d", s);
        sq[s].v = load(in_dir(dir, name), cache);
    }
    int *seq_of = malloc(sizeof(int) * (size_t)T);
    for (int s = 0; s < n_seqs; s++)
        for (int t = 0; t < sq[s].n; t++) seq_of[sq[s].first + t] = s;
    float *x = load(in_dir(dir, "x"), (size_t)T * D * 4);
    batch_desc b = {.T = T, .n_seqs = n_seqs, .seqs = sq, .seq_of = seq_of,
                    .cos = load(in_dir(dir, "cos"), (size_t)T * r.head_dim / 2 * 4),
                    .sin = load(in_dir(dir, "sin"), (size_t)T * r.head_dim / 2 * 4)};
    if (range_forward(&r, &b, x) < 0) die("out of memory", "");
    save(in_dir(dir, "out"), x, (size_t)T * D * 4);
}

int main(void) {
    const isa_ops *isas[MAX_ISAS];
    int n = detect_isas(isas);
    cur_isa = isas[0];
    printf("isa %s\nisas", cur_isa->name);
    for (int i = 0; i < n; i++) printf(" %s", isas[i]->name);
    printf("\n");
    char line[8192], cmd[16], name[32], wp[2048], xp[2048], op[2048];
    while (fgets(line, sizeof line, stdin)) {
        int a, rows, cols, nx, used;
        if (sscanf(line, "%15s%n", cmd, &used) != 1) continue;
        if (!strcmp(cmd, "threads") && sscanf(line + used, "%d", &a) == 1) {
            pool_set_threads(a);
        } else if (!strcmp(cmd, "isa") && sscanf(line + used, "%31s", name) == 1) {
            for (a = 0; a < n && strcmp(isas[a]->name, name); a++) continue;
            if (a == n) die("variant not available:", name);
            cur_isa = isas[a];
        } else if (!strcmp(cmd, "quantize") && sscanf(line + used, "%d %2047s %2047s", &a, xp, op) == 3) {
            float *x = load(xp, (size_t)a * 4);
            block_q8 *y = malloc(sizeof(block_q8) * (size_t)(a / QK));
            quantize_q8(x, y, a);
            save(op, y, sizeof(block_q8) * (size_t)(a / QK));
        } else if (!strcmp(cmd, "matmul") &&
                   sscanf(line + used, "%d %d %d %d %2047s %2047s %2047s", &a, &rows, &cols, &nx, wp, xp, op) == 7) {
            if (a < 0 || a >= T_COUNT || !row_bytes(a, cols) || cols % block_size(a)) die("bad matmul:", line);
            matmul_args m = {.w = load(wp, row_bytes(a, cols) * rows), .type = a, .rows = rows, .cols = cols,
                             .nx = nx, .x = load(xp, (size_t)nx * cols * 4), .ldo = rows};
            m.out = malloc((size_t)nx * rows * 4);
            if (matmul(&m) < 0) die("out of memory", "");
            save(op, m.out, (size_t)nx * rows * 4);
        } else if (!strcmp(cmd, "layer")) {
            run_layer(line + used);
        } else {
            die("unknown command:", line);
        }
        printf("ok\n");
        fflush(stdout);
    }
    return 0;
}
