/* kernels._cpu: the Python face of the native kernels. Buffers come in through the buffer
 * protocol (numpy arrays, memmaps of the GGUF file), so nothing here needs numpy's headers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "cpu.h"
#include "matmul.h"

/* Variants this CPU runs, best first. */
static const isa_ops *available[4];
static int n_available;

static void detect(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        available[n_available++] = &isa_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        available[n_available++] = &isa_avx2;
#elif defined(__aarch64__) && defined(__linux__)
    unsigned long hw = getauxval(AT_HWCAP);
    if (hw & HWCAP_ASIMDDP) available[n_available++] = &isa_neon_dotprod;
    available[n_available++] = &isa_neon; /* Advanced SIMD is part of arm64 */
#endif
    available[n_available++] = &isa_generic;
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
    if (t < 0 || t >= T_COUNT || !cur_isa->dot[t]) {
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

static PyMethodDef methods[] = {
    {"isas", py_isas, METH_NOARGS, "Instruction-set variants this CPU runs, best first."},
    {"isa", py_isa, METH_NOARGS, "The variant in use."},
    {"set_isa", py_set_isa, METH_O, "Use the named variant (one of isas())."},
    {"threads", py_threads, METH_NOARGS, "Threads the kernels run on."},
    {"set_threads", py_set_threads, METH_O, "Run the kernels on n threads."},
    {"row_bytes", py_row_bytes, METH_VARARGS, "Bytes of one row of n values of a GGML type (0: unsupported)."},
    {"matmul", py_matmul, METH_VARARGS, "matmul(w, type, rows, cols, x, out): out = x @ W^T from W's blocks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "Native CPU kernels on GGML blocks.", -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) {
    detect();
    return PyModule_Create(&module);
}
