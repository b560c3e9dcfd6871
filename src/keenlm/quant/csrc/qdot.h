/* What keenlm's compiled kernels share among their files and with other extensions.
 *
 * keenlm.quant._qdot holds the quantized matrix-vector kernels (qdot.c, tq2.c), one persistent
 * thread pool (pool.c) and the Python module over them (module.c). Other extensions (keenlm.infer._step, the decode step) reach them
 * through a PyCapsule, ``keenlm.quant._qdot._C_API``, holding a QdotAPI: one pool per process,
 * and the kernels compiled once. */
#ifndef KEENLM_QDOT_H
#define KEENLM_QDOT_H

#include <stdint.h>
#include <string.h>

typedef uint16_t half; /* IEEE binary16 bits: the weights' block scales */

/* fp16 (IEEE binary16, as GGUF stores block scales) to float: plain bit arithmetic, so that
 * the scalar paths need no F16C; the vector paths convert with vcvtph2ps. */
static inline float h2f(half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1F, mant = h & 0x3FFu;
    uint32_t bits;
    if (e == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13); /* inf, nan */
    } else if (e) {
        bits = sign | ((e + 112) << 23) | (mant << 13);
    } else { /* zero and subnormals: mant 2^-24 */
        const float f = (float)mant * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

enum { PATH_AUTO = 0, PATH_SCALAR = 1, PATH_AVX2 = 2, PATH_VNNI = 3, PATH_VNNI512 = 4 };
/* weight formats: Q4 blocks of 32 (codes, scales, offsets), Q8_0, ternary TQ2_0 */
enum { FMT_Q4 = 0, FMT_Q8 = 1, FMT_T2 = 2 };
#define QDOT_MAX_THREADS 16
#define QDOT_API_VERSION 3 /* raise when QdotAPI changes */

/* A job for the pool: fn(ctx, ith, nth) runs on nth threads at once, ith = 0 on the caller. */
typedef void (*pool_fn)(void *ctx, int ith, int nth);

typedef struct {
    int version;
    int (*cpu_path)(void);
    /* x (B, K) float -> int8 blocks of 32: xq (B, K), xd = max|x| / 127 and xs = xd sum(xq)
     * per block (B, K / 32) */
    void (*quantize_rows)(const float *x, int8_t *xq, float *xd, float *xs, int B, int K);
    /* out[b, n] for rows n0 <= n < n1 of Q4 weights (qs, d, m) (N, K) times xq (B, K) */
    void (*q4_rows)(int path, const uint8_t *qs, const half *d, const half *m,
                    const int8_t *xq, const float *xd, const float *xs, float *out, int N, int K,
                    int B, int n0, int n1);
    /* the same for Q8_0 weights (q8 int8 (N, K), d (N, K / 32)) */
    void (*q8_rows)(int path, const int8_t *q8, const half *d, const int8_t *xq,
                    const float *xd, const float *xs, float *out, int N, int K, int B, int n0,
                    int n1);
    /* the same for TQ2_0 weights (codes (N, K/4), d (N, K / 256)) */
    void (*t2_rows)(int path, const uint8_t *qs, const half *d, const int8_t *xq,
                    const float *xd, const float *xs, float *out, int N, int K, int B, int n0,
                    int n1);
    /* run fn on nth threads (the caller's and nth - 1 of the pool's); one job at a time */
    void (*pool_run)(pool_fn fn, void *ctx, int nth);
    /* inside a job: wait until all nth threads of the job have reached this point */
    void (*pool_barrier)(int nth);
    /* rows [n0, n1) of N that thread ith of nth takes: groups of 4 (the kernels' row tile) */
    void (*pool_share)(int N, int ith, int nth, int *n0, int *n1);
} QdotAPI;

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KEENLM_X86 1
#endif
#define T512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/* qdot.c (Q4, Q8_0, activation rounding) and tq2.c (TQ2_0): the kernels, as the capsule holds
 * them; module.c is the Python module over them */
int cpu_path(void);
int path_ok(int path);
void quantize_rows(const float *x, int8_t *xq, float *xd, float *xs, int B, int K);
void q4_rows(int path, const uint8_t *qs, const half *d, const half *m, const int8_t *xq,
             const float *xd, const float *xs, float *out, int N, int K, int B, int n0, int n1);
void q8_rows(int path, const int8_t *q8, const half *d, const int8_t *xq, const float *xd,
             const float *xs, float *out, int N, int K, int B, int n0, int n1);
void t2_rows(int path, const uint8_t *qs, const half *d, const int8_t *xq, const float *xd,
             const float *xs, float *out, int N, int K, int B, int n0, int n1);

/* pool.c */
void pool_run(pool_fn fn, void *ctx, int nth);
/* the same, for a job followed by work on other threads (torch's): the workers sleep at once */
void pool_run_once(pool_fn fn, void *ctx, int nth);
void pool_barrier(int nth);
void pool_share(int N, int ith, int nth, int *n0, int *n1);

#endif
