/* kernels._cpu: the Python face of the native kernels. Buffers come in through the buffer
 * protocol (numpy arrays, memmaps of the GGUF file), so nothing here needs numpy's headers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "layer.h"
#include "matmul.h"

/* Variants this CPU runs, best first. */
static const isa_ops *available[MAX_ISAS];
static int n_available;

static void detect(void) {
    n_available = detect_isas(available);
    cur_isa = available[0];
}

static PyObject *py_isas(PyObject *self, PyObject *args) {
    PyObject *t = PyTuple_New(n_available);
    for (int i = 0; i < n_available; i++) PyTuple_SET_ITEM(t, i, PyUnicode_FromString(available[i]->name));
    return t;
}

static PyObject *py_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(cur_isa->name); }

static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    for (int i = 0; i < n_available; i++) {
        if (strcmp(available[i]->name, name) == 0) {
            cur_isa = available[i];
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "instruction set %s is not available on this CPU", name);
    return NULL;
}

static PyObject *py_threads(PyObject *self, PyObject *args) { return PyLong_FromLong(pool_threads()); }

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "threads must be in [1, 1024]");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS pool_set_threads((int)n);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_row_bytes(PyObject *self, PyObject *args) {
    int t, n;
    if (!PyArg_ParseTuple(args, "ii", &t, &n)) return NULL;
    return PyLong_FromSize_t(t >= 0 && t < T_COUNT ? row_bytes(t, n) : 0);
}

/* Checks shared by the entry points: a weight of `rows` rows of `cols` values of type t. */
static int check_weight(int t, int rows, int cols, const Py_buffer *w) {
    if (t < 0 || t >= T_COUNT || !dot_for(t)) {
        PyErr_Format(PyExc_ValueError, "weight type %d has no native kernel", t);
        return -1;
    }
    if (rows < 1 || cols < 1 || cols % block_size(t) != 0) {
        PyErr_Format(PyExc_ValueError, "a [%d, %d] weight does not fit type %d's blocks", rows, cols, t);
        return -1;
    }
    if ((size_t)w->len != row_bytes(t, cols) * (size_t)rows) {
        PyErr_Format(PyExc_ValueError, "weight buffer is %zd bytes, expected %zu", w->len,
                     row_bytes(t, cols) * (size_t)rows);
        return -1;
    }
    return 0;
}

/* matmul(w, type, rows, cols, x, out): out[nx, rows] = x[nx, cols] @ W^T. */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    Py_buffer w, x, out;
    int t, rows, cols;
    if (!PyArg_ParseTuple(args, "y*iiiy*w*", &w, &t, &rows, &cols, &x, &out)) return NULL;
    PyObject *result = NULL;
    if (check_weight(t, rows, cols, &w) < 0) goto done;
    if (x.len % ((Py_ssize_t)cols * 4) != 0 || x.len == 0) {
        PyErr_SetString(PyExc_ValueError, "x must be float32 [n, cols]");
        goto done;
    }
    int nx = (int)(x.len / ((Py_ssize_t)cols * 4));
    if (out.len != (Py_ssize_t)nx * rows * 4) {
        PyErr_SetString(PyExc_ValueError, "out must be float32 [n, rows]");
        goto done;
    }
    matmul_args a = {.w = w.buf, .type = t, .rows = rows, .cols = cols, .nx = nx, .x = x.buf, .out = out.buf, .ldo = rows};
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = matmul(&a);
    Py_END_ALLOW_THREADS if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

/* The address of an object's buffer. The caller keeps the object alive as long as the address is
 * used (the Python side holds every array a prepared range points into). */
static const void *address(PyObject *obj, Py_ssize_t want, int writable) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    const void *p = view.buf;
    Py_ssize_t len = view.len;
    PyBuffer_Release(&view);
    if (want >= 0 && len != want) {
        PyErr_Format(PyExc_ValueError, "a buffer is %zd bytes, expected %zd", len, want);
        return NULL;
    }
    return p;
}

static void free_range(PyObject *capsule) {
    range_desc *r = PyCapsule_GetPointer(capsule, "appliance.range");
    if (r) free(r->layers);
    free(r);
}

static int parse_weight(PyObject *tuple, int cols, weight_desc *w) {
    PyObject *buf;
    if (!PyArg_ParseTuple(tuple, "Oii", &buf, &w->type, &w->rows)) return -1;
    if (w->type < 0 || w->type >= T_COUNT || !dot_for(w->type) || cols % block_size(w->type) != 0) {
        PyErr_Format(PyExc_ValueError, "weight type %d has no native kernel for %d columns", w->type, cols);
        return -1;
    }
    w->data = address(buf, (Py_ssize_t)(row_bytes(w->type, cols) * (size_t)w->rows), 0);
    return w->data ? 0 : -1;
}

/* A float32 vector of n values, or NULL for None (a tensor the architecture does not have). */
static int optional_vector(PyObject *obj, int n, const float **out) {
    *out = obj == Py_None ? NULL : address(obj, (Py_ssize_t)n * 4, 0);
    return obj == Py_None || *out ? 0 : -1;
}

/* prepare_range((dim, heads, kv_heads, head_dim, hidden, eps, rope_halves, window), layers): layers is
 * a list of (attn_norm, ffn_norm, wq, wk, wv, wo, w_gate, w_up, w_down, bq, bk, bv, q_norm, k_norm),
 * norms and biases float32 arrays (the last five None where absent), each weight (blocks, type, rows).
 * Returns an opaque handle for range_forward. */
static PyObject *py_prepare_range(PyObject *self, PyObject *args) {
    range_desc spec = {0};
    PyObject *layers;
    if (!PyArg_ParseTuple(args, "(iiiiifii)O!", &spec.dim, &spec.n_heads, &spec.n_kv_heads, &spec.head_dim,
                          &spec.hidden_dim, &spec.eps, &spec.rope_halves, &spec.window, &PyList_Type, &layers))
        return NULL;
    if (spec.n_kv_heads < 1 || spec.n_heads % spec.n_kv_heads || spec.head_dim % 2 || spec.dim % QK ||
        spec.hidden_dim % QK || (spec.n_heads * spec.head_dim) % QK) {
        PyErr_SetString(PyExc_ValueError, "these model dimensions have no native kernel");
        return NULL;
    }
    range_desc *r = malloc(sizeof *r);
    *r = spec;
    r->n_layers = (int)PyList_GET_SIZE(layers);
    r->layers = calloc((size_t)r->n_layers, sizeof(layer_desc));
    PyObject *capsule = PyCapsule_New(r, "appliance.range", free_range);
    int HE = r->n_heads * r->head_dim, GE = r->n_kv_heads * r->head_dim;
    for (int i = 0; i < r->n_layers; i++) {
        layer_desc *L = &r->layers[i];
        PyObject *an, *fn, *w[7], *bq, *bk, *bv, *qn, *kn;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(layers, i), "OOOOOOOOOOOOOO", &an, &fn, &w[0], &w[1], &w[2], &w[3],
                              &w[4], &w[5], &w[6], &bq, &bk, &bv, &qn, &kn))
            goto fail;
        if (optional_vector(bq, HE, &L->bq) || optional_vector(bk, GE, &L->bk) || optional_vector(bv, GE, &L->bv) ||
            optional_vector(qn, r->head_dim, &L->q_norm) || optional_vector(kn, r->head_dim, &L->k_norm))
            goto fail;
        if (!(L->attn_norm = address(an, (Py_ssize_t)r->dim * 4, 0))) goto fail;
        if (!(L->ffn_norm = address(fn, (Py_ssize_t)r->dim * 4, 0))) goto fail;
        weight_desc *ws[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        int cols[7] = {r->dim, r->dim, r->dim, HE, r->dim, r->dim, r->hidden_dim};
        int rows[7] = {HE, GE, GE, r->dim, r->hidden_dim, r->hidden_dim, r->dim};
        for (int j = 0; j < 7; j++) {
            if (parse_weight(w[j], cols[j], ws[j]) < 0) goto fail;
            if (ws[j]->rows != rows[j]) {
                PyErr_Format(PyExc_ValueError, "layer %d: weight %d has %d rows, expected %d", i, j, ws[j]->rows,
                             rows[j]);
                goto fail;
            }
        }
    }
    return capsule;
fail:
    Py_DECREF(capsule);
    return NULL;
}

/* range_forward(handle, x, cos, sin, seqs): x [T, D] float32 through the range, in place. seqs
 * lists each sequence's (rows, start position, k cache, v cache, capacity), in x's row order. */
static PyObject *py_range_forward(PyObject *self, PyObject *args) {
    PyObject *capsule, *xo, *co, *so, *seqs;
    if (!PyArg_ParseTuple(args, "OOOOO!", &capsule, &xo, &co, &so, &PyList_Type, &seqs)) return NULL;
    range_desc *r = PyCapsule_GetPointer(capsule, "appliance.range");
    if (!r) return NULL;
    int n = (int)PyList_GET_SIZE(seqs), T = 0;
    seq_desc *sq = calloc((size_t)n + 1, sizeof(seq_desc));
    int *seq_of = NULL;
    PyObject *result = NULL;
    size_t GE = (size_t)r->n_kv_heads * r->head_dim;
    for (int s = 0; s < n; s++) {
        PyObject *k, *v;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(seqs, s), "iiOOi", &sq[s].n, &sq[s].start, &k, &v, &sq[s].capacity))
            goto done;
        if (sq[s].n < 1 || sq[s].start < 0 || sq[s].start + sq[s].n > sq[s].capacity) {
            PyErr_SetString(PyExc_ValueError, "a sequence's positions do not fit its cache");
            goto done;
        }
        Py_ssize_t cache_bytes = (Py_ssize_t)((size_t)r->n_layers * sq[s].capacity * GE * sizeof(kv_t));
        if (!(sq[s].k = (kv_t *)address(k, cache_bytes, 1)) || !(sq[s].v = (kv_t *)address(v, cache_bytes, 1)))
            goto done;
        sq[s].first = T;
        T += sq[s].n;
    }
    float *x = (float *)address(xo, (Py_ssize_t)T * r->dim * 4, 1);
    const float *cs = address(co, (Py_ssize_t)T * r->head_dim / 2 * 4, 0);
    const float *sn = address(so, (Py_ssize_t)T * r->head_dim / 2 * 4, 0);
    if (!x || !cs || !sn) goto done;
    seq_of = malloc(sizeof(int) * (size_t)(T ? T : 1));
    for (int s = 0; s < n; s++)
        for (int t = 0; t < sq[s].n; t++) seq_of[sq[s].first + t] = s;
    batch_desc b = {.T = T, .n_seqs = n, .seqs = sq, .seq_of = seq_of, .cos = cs, .sin = sn};
    int rc = 0;
    if (T > 0) {
        Py_BEGIN_ALLOW_THREADS rc = range_forward(r, &b, x);
        Py_END_ALLOW_THREADS
    }
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    free(sq);
    free(seq_of);
    return result;
}

/* quantize(x, out): x float32 [n] (n a multiple of 32) as q8 blocks (float d, float s, 32 int8) into out. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    Py_buffer x, out;
    if (!PyArg_ParseTuple(args, "y*w*", &x, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = x.len / 4;
    if (x.len % (4 * QK) || out.len != n / QK * (Py_ssize_t)sizeof(block_q8)) {
        PyErr_SetString(PyExc_ValueError, "quantize takes float32 [32k] and a buffer of k q8 blocks");
    } else {
        quantize_q8(x.buf, out.buf, (int)n);
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

/* attention(q, k, v, heads, kv_heads, head_dim, start, out): causal grouped-query attention of q
 * [T, H*E] over k, v [start + T, G, E] (float16, as the cache holds them) into out [T, H*E], float32. */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    Py_buffer q, k, v, out;
    int H, G, E, start;
    if (!PyArg_ParseTuple(args, "y*y*y*iiiiw*", &q, &k, &v, &H, &G, &E, &start, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t row = (Py_ssize_t)H * E * 4;
    int T = row > 0 ? (int)(q.len / row) : 0;
    if (H < 1 || G < 1 || E < 1 || H % G || start < 0 || T < 1 || q.len != T * row || out.len != q.len ||
        k.len != (Py_ssize_t)((size_t)(start + T) * G * E * sizeof(kv_t)) || v.len != k.len) {
        PyErr_SetString(PyExc_ValueError, "attention takes q, out [T, H*E] float32 and k, v [start + T, G, E] float16");
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = attention_forward(H, G, E, T, start, q.buf, k.buf, v.buf, out.buf);
    Py_END_ALLOW_THREADS if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&q);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS, "quantize(x, out): activations as the q8 blocks the kernels take."},
    {"attention", py_attention, METH_VARARGS, "attention(q, k, v, H, G, E, start, out): the fused pass's attention."},
    {"isas", py_isas, METH_NOARGS, "Instruction-set variants this CPU runs, best first."},
    {"isa", py_isa, METH_NOARGS, "The variant in use."},
    {"set_isa", py_set_isa, METH_O, "Use the named variant (one of isas())."},
    {"threads", py_threads, METH_NOARGS, "Threads the kernels run on."},
    {"set_threads", py_set_threads, METH_O, "Run the kernels on n threads."},
    {"row_bytes", py_row_bytes, METH_VARARGS, "Bytes of one row of n values of a GGML type (0: unsupported)."},
    {"matmul", py_matmul, METH_VARARGS, "matmul(w, type, rows, cols, x, out): out = x @ W^T from W's blocks."},
    {"prepare_range", py_prepare_range, METH_VARARGS, "A layer range's weights as range_forward reads them."},
    {"range_forward", py_range_forward, METH_VARARGS, "A batch of sequences through a prepared layer range."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "Native CPU kernels on GGML blocks.", -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) {
    detect();
    return PyModule_Create(&module);
}
