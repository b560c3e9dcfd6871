/* Quantized matrix-vector products for CPU decoding: 4-bit weights (llama.cpp's Q4_0 / Q4_1
 * blocks of 32) times activations quantized on the fly to int8 blocks of 32 (Q8_1-style),
 * with integer dot products: AVX-512 VNNI (vpdpbusd) where the CPU has it, AVX2 (vpmaddubsw)
 * elsewhere on x86, and a scalar loop everywhere (the reference the tests hold the others to).
 * The path is chosen at run time (__builtin_cpu_supports), so one build serves every x86 CPU.
 * Rows are shared among ``threads`` threads of a small persistent pool (below).
 *
 * Layout (keenlm.quant.q4 documents and builds it): for N output rows and K inputs, K a
 * multiple of 32,
 *   qs  uint8 (N, K/2)   block j of row n is bytes [16 j, 16 j + 16): byte i holds weight
 *                        32 j + i in its low nibble and weight 32 j + 16 + i in its high one
 *                        (ggml's order, so GGUF Q4 blocks need no reshuffle)
 *   d, m float (N, K/32) weight = d q + m, q in [0, 15]  (Q4_0: m = -8 d)
 * Activations x (B, K) float -> xq int8 (B, K), xd = max|x| / 127 per block, xs = xd sum(xq),
 * so that  y[b, n] = sum_j d[n, j] xd[b, j] sum_i q xq  +  m[n, j] xs[b, j].
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KEENLM_X86 1
#endif

enum { PATH_AUTO = 0, PATH_SCALAR = 1, PATH_AVX2 = 2, PATH_VNNI = 3, PATH_VNNI512 = 4 };
#define MAX_ROWS 16

static int cpu_path(void) {
#ifdef KEENLM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512bw"))
        return PATH_VNNI512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return PATH_AVX2;
#endif
    return PATH_SCALAR;
}

/* x (B, K) -> int8 blocks of 32: round(x / xd), xd = max|x| / 127 (0 for an all-zero block). */
static void quantize_rows(const float *x, int8_t *xq, float *xd, float *xs, int B, int K) {
    const int nb = K / 32;
    for (int b = 0; b < B; b++) {
        for (int j = 0; j < nb; j++) {
            const float *v = x + (size_t)b * K + 32 * j;
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(v[i]));
            const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
            int sum = 0;
            int8_t *q = xq + (size_t)b * K + 32 * j;
            for (int i = 0; i < 32; i++) {
                const int r = (int)lrintf(v[i] * inv);
                q[i] = (int8_t)r;
                sum += r;
            }
            xd[(size_t)b * nb + j] = d;
            xs[(size_t)b * nb + j] = d * (float)sum;
        }
    }
}

/* The reference: plain loops over the same integers. */
static void rows_scalar(const uint8_t *qs, const float *d, const float *m, const int8_t *xq,
                        const float *xd, const float *xs, float *out, int N, int K, int B,
                        int n0, int n1) {
    const int nb = K / 32;
    for (int n = n0; n < n1; n++) {
        for (int b = 0; b < B; b++) {
            float acc = 0.f;
            for (int j = 0; j < nb; j++) {
                const uint8_t *w = qs + (size_t)n * (K / 2) + 16 * j;
                const int8_t *x = xq + (size_t)b * K + 32 * j;
                int isum = 0;
                for (int i = 0; i < 16; i++)
                    isum += (w[i] & 15) * x[i] + (w[i] >> 4) * x[i + 16];
                acc += d[(size_t)n * nb + j] * xd[(size_t)b * nb + j] * (float)isum
                       + m[(size_t)n * nb + j] * xs[(size_t)b * nb + j];
            }
            out[(size_t)b * N + n] = acc;
        }
    }
}

#ifdef KEENLM_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One block's 32 weights as unsigned bytes in x's order: [low nibbles | high nibbles]. */
__attribute__((target("avx2,fma"))) static inline __m256i unpack_block(const uint8_t *w) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)w);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

#define ROWS_BODY(DOT)                                                                      \
    const int nb = K / 32;                                                                  \
    for (int n = n0; n < n1; n++) {                                                         \
        const uint8_t *wr = qs + (size_t)n * (K / 2);                                       \
        const float *dr = d + (size_t)n * nb, *mr = m + (size_t)n * nb;                     \
        __m256 acc[MAX_ROWS];                                                               \
        float macc[MAX_ROWS];                                                               \
        for (int b = 0; b < B; b++) { acc[b] = _mm256_setzero_ps(); macc[b] = 0.f; }        \
        for (int j = 0; j < nb; j++) {                                                      \
            const __m256i w = unpack_block(wr + 16 * j);                                    \
            for (int b = 0; b < B; b++) {                                                   \
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * K + 32 * j)); \
                const __m256i dot = DOT;                                                    \
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),                          \
                                         _mm256_set1_ps(dr[j] * xd[(size_t)b * nb + j]), acc[b]); \
                macc[b] += mr[j] * xs[(size_t)b * nb + j];                                  \
            }                                                                               \
        }                                                                                   \
        for (int b = 0; b < B; b++) out[(size_t)b * N + n] = hsum256(acc[b]) + macc[b];     \
    }

__attribute__((target("avx2,fma")))
static void rows_avx2(const uint8_t *qs, const float *d, const float *m, const int8_t *xq,
                      const float *xd, const float *xs, float *out, int N, int K, int B,
                      int n0, int n1) {
    const __m256i ones = _mm256_set1_epi16(1);
    /* u8 x s8 pairs summed to int16 (|15 * 127 * 2| fits), then pairs of those to int32 */
    ROWS_BODY(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
}

__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
static void rows_vnni(const uint8_t *qs, const float *d, const float *m, const int8_t *xq,
                      const float *xd, const float *xs, float *out, int N, int K, int B,
                      int n0, int n1) {
    ROWS_BODY(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x))
}

/* AVX-512 VNNI, two blocks (64 weights) per instruction: the codes of blocks j and j + 1 are
 * spread to [lo(j) | hi(j) | lo(j+1) | hi(j+1)] -- x's order -- and vpdpbusd gives 16 int32
 * lanes, 8 per block; the per-block scales d xd are laid out the same way. Rows are taken four
 * at a time so that each activation load serves four rows. An odd last block uses 256 bits. */
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
static inline __m512i spread_pair(const uint8_t *w) {
    const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w));
    const __m512i dup = _mm512_shuffle_i64x2(a, a, _MM_SHUFFLE(1, 1, 0, 0)); /* c0 c0 c1 c1 */
    const __m512i hi = _mm512_mask_srli_epi16(dup, 0xFF00FF00u, dup, 4);      /* lanes 1, 3 */
    return _mm512_and_si512(hi, _mm512_set1_epi8(0x0F));
}

__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
static inline __m512 pair_scales(const float *s) { /* [s0 x 8 | s1 x 8] */
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(
        _mm_castpd_ps(_mm_load_sd((const double *)s))));
}

__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
static void rows_vnni512(const uint8_t *qs, const float *d, const float *m, const int8_t *xq,
                         const float *xd, const float *xs, float *out, int N, int K, int B,
                         int nstart, int nend) {
    const int nb = K / 32, pairs = nb / 2;
    float *sc = malloc(sizeof(float) * 4 * (nb + 1));
    if (!sc) return; /* the caller has checked a larger allocation; never taken in practice */
    for (int b = 0; b < B; b++) {
        const int8_t *x = xq + (size_t)b * K;
        const float *xdb = xd + (size_t)b * nb, *xsb = xs + (size_t)b * nb;
        for (int n0 = nstart; n0 < nend; n0 += 4) {
            const int R = nend - n0 < 4 ? nend - n0 : 4;
            __m512 acc[4];
            float tail[4];
            for (int r = 0; r < R; r++) {
                const float *dr = d + (size_t)(n0 + r) * nb, *mr = m + (size_t)(n0 + r) * nb;
                float moff = 0.f;
                for (int j = 0; j < nb; j++) {
                    sc[r * (nb + 1) + j] = dr[j] * xdb[j];
                    moff += mr[j] * xsb[j];
                }
                tail[r] = moff;
                acc[r] = _mm512_setzero_ps();
            }
            for (int p = 0; p < pairs; p++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(x + 64 * p));
                for (int r = 0; r < R; r++) {
                    const __m512i w = spread_pair(qs + (size_t)(n0 + r) * (K / 2) + 32 * p);
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                             pair_scales(sc + r * (nb + 1) + 2 * p), acc[r]);
                }
            }
            for (int r = 0; r < R; r++) {
                float y = _mm512_reduce_add_ps(acc[r]) + tail[r];
                if (nb & 1) { /* the odd last block */
                    const int j = nb - 1;
                    const __m256i w = unpack_block(qs + (size_t)(n0 + r) * (K / 2) + 16 * j);
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * j));
                    const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv);
                    y += hsum256(_mm256_cvtepi32_ps(dot)) * sc[r * (nb + 1) + j];
                }
                out[(size_t)b * N + n0 + r] = y;
            }
        }
    }
    free(sc);
}
#endif


/* ------------------------------------------------------------------------------------------
 * Threads: a small persistent pool (the decode step calls the kernel ~200 times per token, a
 * few tens of microseconds each, so threads cannot be started per call). The caller's thread
 * takes the first share of the rows; each worker spins briefly for the next job, then sleeps
 * on a condition variable, so an idle pool costs nothing. */
#include <pthread.h>
#include <stdatomic.h>

#define MAX_THREADS 16
#define SPIN 200000

typedef struct {
    const uint8_t *qs; const float *d, *m; const int8_t *xq; const float *xd, *xs; float *out;
    int N, K, B, path, parts;
    int q8; /* 1: Q8_0 weights (qs holds int8 codes, m unused) */
} Job;

static Job job;
static atomic_int job_gen = 0, job_done = 0;
static int pool_size = 0; /* workers started (threads - 1) */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;

static void run_rows(int path, const uint8_t *qs, const float *d, const float *m,
                     const int8_t *xq, const float *xd, const float *xs, float *out,
                     int N, int K, int B, int n0, int n1);
static void run_q8_rows(int path, const int8_t *q8, const float *d, const int8_t *xq,
                        const float *xd, const float *xs, float *out, int N, int K, int B,
                        int n0, int n1);

static void run_part(int part) {
    /* rows in multiples of 4 (the 512-bit path's row group), shares as even as that allows */
    const int groups = (job.N + 3) / 4;
    const int g0 = groups * part / job.parts, g1 = groups * (part + 1) / job.parts;
    const int n0 = 4 * g0, n1 = 4 * g1 < job.N ? 4 * g1 : job.N;
    if (n0 >= n1) return;
    if (job.q8)
        run_q8_rows(job.path, (const int8_t *)job.qs, job.d, job.xq, job.xd, job.xs, job.out,
                    job.N, job.K, job.B, n0, n1);
    else
        run_rows(job.path, job.qs, job.d, job.m, job.xq, job.xd, job.xs, job.out, job.N, job.K,
                 job.B, n0, n1);
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg; /* 1 .. pool_size */
    int seen = 0;
    for (;;) {
        int gen, spins = 0;
        while ((gen = atomic_load_explicit(&job_gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN) {
#ifdef KEENLM_X86
                _mm_pause();
#endif
                continue;
            }
            pthread_mutex_lock(&pool_lock);
            while (atomic_load_explicit(&job_gen, memory_order_acquire) == seen)
                pthread_cond_wait(&pool_wake, &pool_lock);
            pthread_mutex_unlock(&pool_lock);
            spins = 0;
        }
        seen = gen;
        if (id < job.parts) run_part(id);
        atomic_fetch_add_explicit(&job_done, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own when it needs them. */
static void forget_pool(void) {
    pool_size = 0;
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
}

static void ensure_pool(int workers) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, forget_pool);
        registered = 1;
    }
    while (pool_size < workers && pool_size < MAX_THREADS - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(pool_size + 1)) != 0) break;
        pthread_detach(t);
        pool_size++;
    }
}

static void run_parallel(int threads) {
    int parts = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    job.parts = 1;
    if (parts == 1) { run_part(0); return; }
    ensure_pool(parts - 1);
    job.parts = parts = pool_size + 1 < parts ? pool_size + 1 : parts;
    atomic_store_explicit(&job_done, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool_lock);
    atomic_fetch_add_explicit(&job_gen, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    run_part(0);
    while (atomic_load_explicit(&job_done, memory_order_acquire) < pool_size) {
#ifdef KEENLM_X86
        _mm_pause();
#endif
    }
}

static void run_rows(int path, const uint8_t *qs, const float *d, const float *m,
                     const int8_t *xq, const float *xd, const float *xs, float *out,
                     int N, int K, int B, int n0, int n1) {
#ifdef KEENLM_X86
    if (path == PATH_VNNI512) { rows_vnni512(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
    if (path == PATH_VNNI) { rows_vnni(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
    if (path == PATH_AVX2) { rows_avx2(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
#endif
    rows_scalar(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1);
}

static int path_ok(int path) {
    if (path == PATH_SCALAR) return 1;
#ifdef KEENLM_X86
    const int best = cpu_path();
    return path >= PATH_AVX2 && path <= best;
#else
    return 0;
#endif
}

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;

/* What q4_linear and q8_linear share: the activations rounded to int8 blocks in scratch of
 * their own, then the weights' rows shared among the pool's threads, one job at a time. */
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
    pthread_mutex_lock(&call_lock);
    job = w;
    run_parallel(w.N >= 64 ? threads : 1);
    pthread_mutex_unlock(&call_lock);
    Py_END_ALLOW_THREADS
    free(xq); free(xd); free(xs);
    Py_RETURN_NONE;
}

/* q4_linear(x, qs, d, m, out, N, K, B, path, threads): out (B, N) = x (B, K) @ W^T. */
static PyObject *q4_linear(PyObject *self, PyObject *args) {
    unsigned long long px, pqs, pd, pm, pout;
    int N, K, B, path, threads = 1;
    if (!PyArg_ParseTuple(args, "KKKKKiiii|i", &px, &pqs, &pd, &pm, &pout, &N, &K, &B, &path,
                          &threads))
        return NULL;
    if (N < 1 || K < 32 || K % 32 || B < 1 || B > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "q4_linear: N=%d, K=%d (a multiple of 32), B=%d (1..%d)",
                     N, K, B, MAX_ROWS);
        return NULL;
    }
    if (path == PATH_AUTO) path = cpu_path();
    if (!path_ok(path)) {
        PyErr_Format(PyExc_ValueError, "q4_linear: path %d is not available on this CPU", path);
        return NULL;
    }
    const Job w = {(const uint8_t *)(uintptr_t)pqs, (const float *)(uintptr_t)pd,
                   (const float *)(uintptr_t)pm, NULL, NULL, NULL, (float *)(uintptr_t)pout,
                   N, K, B, path, 1, 0};
    return run_job(w, (const float *)(uintptr_t)px, threads);
}


/* ------------------------------------------------------------------------------------------
 * Q8 weights (llama.cpp's Q8_0: int8 codes in blocks of 32, one scale d each; w = d q):
 *   q8  int8 (N, K)   d float (N, K/32)
 * y[b, n] = sum_j d[n, j] xd[b, j] sum_i q xq. VNNI multiplies unsigned by signed bytes, so the
 * codes are flipped to q + 128 (one xor) and 128 sum(xq) = 128 xs / xd is taken off again. */
static void q8_scalar(const int8_t *q8, const float *d, const int8_t *xq, const float *xd,
                      float *out, int N, int K, int B, int n0, int n1) {
    const int nb = K / 32;
    for (int n = n0; n < n1; n++)
        for (int b = 0; b < B; b++) {
            float acc = 0.f;
            for (int j = 0; j < nb; j++) {
                int isum = 0;
                for (int i = 0; i < 32; i++)
                    isum += q8[(size_t)n * K + 32 * j + i] * xq[(size_t)b * K + 32 * j + i];
                acc += d[(size_t)n * nb + j] * xd[(size_t)b * nb + j] * (float)isum;
            }
            out[(size_t)b * N + n] = acc;
        }
}

#ifdef KEENLM_X86
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
static void q8_vnni512(const int8_t *q8, const float *d, const int8_t *xq, const float *xd,
                       const float *xs, float *out, int N, int K, int B, int n0, int n1) {
    const int nb = K / 32, pairs = nb / 2;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int b = 0; b < B; b++) {
        const int8_t *x = xq + (size_t)b * K;
        const float *xdb = xd + (size_t)b * nb, *xsb = xs + (size_t)b * nb;
        for (int n = n0; n < n1; n++) {
            const int8_t *w = q8 + (size_t)n * K;
            const float *dr = d + (size_t)n * nb;
            __m512 acc = _mm512_setzero_ps();
            float y = 0.f;
            for (int p = 0; p < pairs; p++) {
                const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + 64 * p)), flip);
                const __m512i xv = _mm512_loadu_si512((const void *)(x + 64 * p));
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                float s[2] = {dr[2 * p] * xdb[2 * p], dr[2 * p + 1] * xdb[2 * p + 1]};
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), pair_scales(s), acc);
            }
            y = _mm512_reduce_add_ps(acc);
            for (int j = 2 * pairs; j < nb; j++) { /* the odd last block */
                int isum = 0;
                for (int i = 0; i < 32; i++) isum += w[32 * j + i] * x[32 * j + i];
                y += dr[j] * xdb[j] * (float)isum;
            }
            for (int j = 0; j < 2 * pairs; j++) y -= 128.f * dr[j] * xsb[j]; /* the +128 taken off */
            out[(size_t)b * N + n] = y;
        }
    }
}
#endif

static void run_q8_rows(int path, const int8_t *q8, const float *d, const int8_t *xq,
                        const float *xd, const float *xs, float *out, int N, int K, int B,
                        int n0, int n1) {
#ifdef KEENLM_X86
    if (path == PATH_VNNI512) { q8_vnni512(q8, d, xq, xd, xs, out, N, K, B, n0, n1); return; }
#endif
    q8_scalar(q8, d, xq, xd, out, N, K, B, n0, n1);
}

/* q8_linear(x, q8, d, out, N, K, B, path): out (B, N) = x (B, K) @ W^T for Q8_0 weights.
 * path 1: scalar; 4: AVX-512 VNNI; 0: the best this CPU has (other x86 CPUs: scalar for now). */
static PyObject *q8_linear(PyObject *self, PyObject *args) {
    unsigned long long px, pq, pd, pout;
    int N, K, B, path, threads = 1;
    if (!PyArg_ParseTuple(args, "KKKKiiii|i", &px, &pq, &pd, &pout, &N, &K, &B, &path, &threads))
        return NULL;
    if (N < 1 || K < 32 || K % 32 || B < 1 || B > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "q8_linear: N=%d, K=%d (a multiple of 32), B=%d (1..%d)",
                     N, K, B, MAX_ROWS);
        return NULL;
    }
    if (path == PATH_AUTO) path = cpu_path() == PATH_VNNI512 ? PATH_VNNI512 : PATH_SCALAR;
    if (path != PATH_SCALAR && !(path == PATH_VNNI512 && path_ok(path))) {
        PyErr_Format(PyExc_ValueError, "q8_linear: path %d is not available", path);
        return NULL;
    }
    const Job w = {(const uint8_t *)(uintptr_t)pq, (const float *)(uintptr_t)pd, NULL, NULL,
                   NULL, NULL, (float *)(uintptr_t)pout, N, K, B, path, 1, 1};
    return run_job(w, (const float *)(uintptr_t)px, threads);
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
    {"quantize_q8", quantize_q8, METH_VARARGS, "int8 blocks of 32 of float activations"},
    {"best_path", best_path, METH_NOARGS, "1 scalar, 2 AVX2, 3 VNNI (256-bit), 4 VNNI (512-bit)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qdot", NULL, -1, methods};

PyMODINIT_FUNC PyInit__qdot(void) { return PyModule_Create(&module); }
