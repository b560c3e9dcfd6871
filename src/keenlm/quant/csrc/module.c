/* keenlm.quant._qdot, the Python module: one matrix product per call (q4_linear, q8_linear,
 * t2_linear) with the activations rounded in scratch of its own and the rows shared among the
 * pool's threads; the bf16 dequantization for prefill; and the capsule through which other
 * extensions (keenlm.infer._step) reach the kernels and the pool (qdot.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qdot.h"

#define MAX_ROWS 16

/* ------------------------------------------------------------------------------------------
 * Python entry points: one matrix product per call, rows shared among the pool's threads. */
typedef struct {
    const uint8_t *w; const half *d, *m; const int8_t *xq; const float *xd, *xs; float *out;
    int N, K, B, path, kind; /* FMT_Q4, FMT_Q8 or FMT_T2 */
} Job;

static void job_share(void *ctx, int ith, int nth) {
    const Job *j = ctx;
    int n0, n1;
    pool_share(j->N, ith, nth, &n0, &n1);
    if (n0 >= n1) return;
    if (j->kind == FMT_Q8)
        q8_rows(j->path, (const int8_t *)j->w, j->d, j->xq, j->xd, j->xs, j->out, j->N, j->K,
                j->B, n0, n1);
    else if (j->kind == FMT_T2)
        t2_rows(j->path, j->w, j->d, j->xq, j->xd, j->xs, j->out, j->N, j->K, j->B, n0, n1);
    else
        q4_rows(j->path, j->w, j->d, j->m, j->xq, j->xd, j->xs, j->out, j->N, j->K, j->B, n0, n1);
}

/* The activations rounded to int8 blocks in scratch of their own, then the job on the pool. */
static PyObject *run_job(Job w, const float *x, int threads) {
    const int nb = w.K / 32;
    int8_t *xq = malloc((size_t)w.B * w.K);
    float *xd = malloc(sizeof(float) * (size_t)w.B * nb);
    float *xs = malloc(sizeof(float) * (size_t)w.B * nb);
    if (!xq || !xd || !xs) {
        free(xq); free(xd); free(xs);
        return PyErr_NoMemory();
    }
    w.xq = xq; w.xd = xd; w.xs = xs;
    Py_BEGIN_ALLOW_THREADS
    quantize_rows(x, xq, xd, xs, w.B, w.K);
    pool_run(job_share, &w, w.N >= 64 ? threads : 1);
    Py_END_ALLOW_THREADS
    free(xq); free(xd); free(xs);
    Py_RETURN_NONE;
}

static int check_shape(const char *name, int N, int K, int B, int path) {
    if (N < 1 || K < 32 || K % 32 || B < 1 || B > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "%s: N=%d, K=%d (a multiple of 32), B=%d (1..%d)",
                     name, N, K, B, MAX_ROWS);
        return 0;
    }
    if (!path_ok(path)) {
        PyErr_Format(PyExc_ValueError, "%s: path %d is not available on this CPU", name, path);
        return 0;
    }
    return 1;
}

/* q4_linear(x, qs, d, m, out, N, K, B, path, threads): out (B, N) = x (B, K) @ W^T. */
static PyObject *q4_linear(PyObject *self, PyObject *args) {
    unsigned long long px, pqs, pd, pm, pout;
    int N, K, B, path, threads = 1;
    if (!PyArg_ParseTuple(args, "KKKKKiiii|i", &px, &pqs, &pd, &pm, &pout, &N, &K, &B, &path,
                          &threads))
        return NULL;
    if (path == PATH_AUTO) path = cpu_path();
    if (!check_shape("q4_linear", N, K, B, path)) return NULL;
    const Job w = {(const uint8_t *)(uintptr_t)pqs, (const half *)(uintptr_t)pd,
                   (const half *)(uintptr_t)pm, NULL, NULL, NULL, (float *)(uintptr_t)pout,
                   N, K, B, path, FMT_Q4};
    return run_job(w, (const float *)(uintptr_t)px, threads);
}

/* q8_linear(x, q8, d, out, N, K, B, path, threads): out (B, N) = x (B, K) @ W^T, Q8_0. */
static PyObject *q8_linear(PyObject *self, PyObject *args) {
    unsigned long long px, pq, pd, pout;
    int N, K, B, path, threads = 1;
    if (!PyArg_ParseTuple(args, "KKKKiiii|i", &px, &pq, &pd, &pout, &N, &K, &B, &path, &threads))
        return NULL;
    if (path == PATH_AUTO) path = cpu_path();
    if (!check_shape("q8_linear", N, K, B, path)) return NULL;
    const Job w = {(const uint8_t *)(uintptr_t)pq, (const half *)(uintptr_t)pd, NULL, NULL,
                   NULL, NULL, (float *)(uintptr_t)pout, N, K, B, path, FMT_Q8};
    return run_job(w, (const float *)(uintptr_t)px, threads);
}

/* t2_linear(x, qs, d, out, N, K, B, path, threads): out (B, N) = x (B, K) @ W^T for TQ2_0
 * weights (codes (N, K/4), d (N, K/256)); path 4: AVX-512 VNNI, others: the scalar loop. */
static PyObject *t2_linear(PyObject *self, PyObject *args) {
    unsigned long long px, pq, pd, pout;
    int N, K, B, path, threads = 1;
    if (!PyArg_ParseTuple(args, "KKKKiiii|i", &px, &pq, &pd, &pout, &N, &K, &B, &path, &threads))
        return NULL;
    if (path == PATH_AUTO) path = cpu_path();
    if (!check_shape("t2_linear", N, K, B, path)) return NULL;
    if (K % 256) {
        PyErr_Format(PyExc_ValueError, "t2_linear: K=%d is not a multiple of 256", K);
        return NULL;
    }
    const Job w = {(const uint8_t *)(uintptr_t)pq, (const half *)(uintptr_t)pd, NULL, NULL,
                   NULL, NULL, (float *)(uintptr_t)pout, N, K, B, path, FMT_T2};
    return run_job(w, (const float *)(uintptr_t)px, threads);
}

/* ------------------------------------------------------------------------------------------
 * Prefill (more rows than the kernels take): the weights dequantized to bf16 in one threaded
 * pass, for a bf16 GEMM (keenlm.quant.q4.Q4Linear.prefill). Round to nearest even; weights
 * are finite (d, m, codes from a file or quantize_q4), so NaN needs no case of its own. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

typedef struct { const uint8_t *w; const half *d, *m; uint16_t *out; int N, K, kind; } Deq;

static void deq_share(void *ctx, int ith, int nth) {
    const Deq *j = ctx;
    const int nb = j->K / 32;
    int n0, n1;
    pool_share(j->N, ith, nth, &n0, &n1);
    for (int n = n0; n < n1; n++) {
        uint16_t *o = j->out + (size_t)n * j->K;
        if (j->kind == FMT_T2) { /* w = d (q - 1), weight 256 blk + 128 c + 32 l + i */
            for (int blk = 0; blk < j->K / 256; blk++) {
                const uint8_t *q = j->w + (size_t)n * (j->K / 4) + 64 * blk;
                const float d = h2f(j->d[(size_t)n * (j->K / 256) + blk]);
                for (int c = 0; c < 2; c++)
                    for (int l = 0; l < 4; l++)
                        for (int i = 0; i < 32; i++)
                            o[256 * blk + 128 * c + 32 * l + i] =
                                to_bf16(d * (float)(((q[32 * c + i] >> (2 * l)) & 3) - 1));
            }
            continue;
        }
        for (int b = 0; b < nb; b++) {
            const float d = h2f(j->d[(size_t)n * nb + b]);
            if (j->kind == FMT_Q8) {
                const int8_t *q = (const int8_t *)j->w + (size_t)n * j->K + 32 * b;
                for (int i = 0; i < 32; i++) o[32 * b + i] = to_bf16(d * (float)q[i]);
            } else {
                const uint8_t *q = j->w + (size_t)n * (j->K / 2) + 16 * b;
                const float m = h2f(j->m[(size_t)n * nb + b]);
                for (int i = 0; i < 16; i++) {
                    o[32 * b + i] = to_bf16(d * (float)(q[i] & 15) + m);
                    o[32 * b + 16 + i] = to_bf16(d * (float)(q[i] >> 4) + m);
                }
            }
        }
    }
}

/* dequantize_bf16(w, d, m, out, N, K, kind, threads): out (N, K) bf16 of Q4 (kind 0: codes
 * (N, K/2), offsets m), Q8_0 (1: codes (N, K)) or TQ2_0 (2: codes (N, K/4)) weights. */
static PyObject *dequantize_bf16(PyObject *self, PyObject *args) {
    unsigned long long pw, pd, pm, pout;
    int N, K, kind, threads;
    if (!PyArg_ParseTuple(args, "KKKKiiii", &pw, &pd, &pm, &pout, &N, &K, &kind, &threads))
        return NULL;
    if (N < 1 || K < 32 || K % (kind == FMT_T2 ? 256 : 32) || kind < FMT_Q4 || kind > FMT_T2
        || (kind == FMT_Q4 && !pm)) {
        PyErr_Format(PyExc_ValueError, "dequantize_bf16: N=%d, K=%d, format %d", N, K, kind);
        return NULL;
    }
    Deq j = {(const uint8_t *)(uintptr_t)pw, (const half *)(uintptr_t)pd,
             (const half *)(uintptr_t)pm, (uint16_t *)(uintptr_t)pout, N, K, kind};
    Py_BEGIN_ALLOW_THREADS
    pool_run_once(deq_share, &j, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* quantize_q8(x, xq, xd, xs, B, K): the activation quantization alone, for the tests. */
static PyObject *quantize_q8(PyObject *self, PyObject *args) {
    unsigned long long px, pq, pd, ps;
    int B, K;
    if (!PyArg_ParseTuple(args, "KKKKii", &px, &pq, &pd, &ps, &B, &K)) return NULL;
    if (K < 32 || K % 32 || B < 1) {
        PyErr_Format(PyExc_ValueError, "quantize_q8: K=%d (a multiple of 32), B=%d", K, B);
        return NULL;
    }
    quantize_rows((const float *)(uintptr_t)px, (int8_t *)(uintptr_t)pq, (float *)(uintptr_t)pd,
                  (float *)(uintptr_t)ps, B, K);
    Py_RETURN_NONE;
}

static PyObject *best_path(PyObject *self, PyObject *args) { return PyLong_FromLong(cpu_path()); }

static PyMethodDef methods[] = {
    {"q4_linear", q4_linear, METH_VARARGS, "out (B, N) = x (B, K) @ W^T for Q4 weights"},
    {"q8_linear", q8_linear, METH_VARARGS, "out (B, N) = x (B, K) @ W^T for Q8_0 weights"},
    {"t2_linear", t2_linear, METH_VARARGS, "out (B, N) = x (B, K) @ W^T for TQ2_0 weights"},
    {"quantize_q8", quantize_q8, METH_VARARGS, "int8 blocks of 32 of float activations"},
    {"dequantize_bf16", dequantize_bf16, METH_VARARGS, "Q4, Q8_0 or TQ2_0 weights to bf16 (prefill)"},
    {"best_path", best_path, METH_NOARGS, "1 scalar, 2 AVX2, 3 VNNI (256-bit), 4 VNNI (512-bit)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qdot", NULL, -1, methods};

static QdotAPI api = {QDOT_API_VERSION, cpu_path, quantize_rows, q4_rows, q8_rows, t2_rows,
                      pool_run, pool_barrier, pool_share};

PyMODINIT_FUNC PyInit__qdot(void) {
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    PyObject *cap = PyCapsule_New(&api, "keenlm.quant._qdot._C_API", NULL);
    if (!cap || PyModule_AddObject(mod, "_C_API", cap) < 0) {
        Py_XDECREF(cap);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
