/* Quantized matrix-vector products for CPU decoding: 4-bit weights (llama.cpp's Q4_0 / Q4_1
 * blocks of 32) times activations quantized on the fly to int8 blocks of 32 (Q8_1-style),
 * with integer dot products: AVX-512 VNNI (vpdpbusd) where the CPU has it, AVX2 (vpmaddubsw)
 * elsewhere on x86, and a scalar loop everywhere (the reference the tests hold the others to).
 * The path is chosen at run time (__builtin_cpu_supports), so one build serves every x86 CPU.
 * Rows are shared among the threads of keenlm's pool (pool.c); the decode step of
 * keenlm.infer._step calls the same kernels through the capsule qdot.h describes.
 *
 * Layout (keenlm.quant.q4 documents and builds it): for N output rows and K inputs, K a
 * multiple of 32,
 *   qs  uint8 (N, K/2)   block j of row n is bytes [16 j, 16 j + 16): byte i holds weight
 *                        32 j + i in its low nibble and weight 32 j + 16 + i in its high one
 *                        (ggml's order, so GGUF Q4 blocks need no reshuffle)
 *   d, m fp16 (N, K/32)  weight = d q + m, q in [0, 15]  (Q4_0: m = -8 d); fp16 as GGUF
 *                        stores them (4.5 bits per weight in all, not 6 with float scales)
 * Activations x (B, K) float -> xq int8 (B, K), xd = max|x| / 127 per block, xs = xd sum(xq),
 * so that  y[b, n] = sum_j d[n, j] xd[b, j] sum_i q xq  +  m[n, j] xs[b, j].
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qdot.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KEENLM_X86 1
#endif

#define MAX_ROWS 16
#define T512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

static int cpu_path(void) {
#ifdef KEENLM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c")
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
static void rows_scalar(const uint8_t *qs, const half *d, const half *m, const int8_t *xq,
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
                acc += h2f(d[(size_t)n * nb + j]) * xd[(size_t)b * nb + j] * (float)isum
                       + h2f(m[(size_t)n * nb + j]) * xs[(size_t)b * nb + j];
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
        const half *dr = d + (size_t)n * nb, *mr = m + (size_t)n * nb;                      \
        __m256 acc[MAX_ROWS];                                                               \
        float macc[MAX_ROWS];                                                               \
        for (int b = 0; b < B; b++) { acc[b] = _mm256_setzero_ps(); macc[b] = 0.f; }        \
        for (int j = 0; j < nb; j++) {                                                      \
            const __m256i w = unpack_block(wr + 16 * j);                                    \
            for (int b = 0; b < B; b++) {                                                   \
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * K + 32 * j)); \
                const __m256i dot = DOT;                                                    \
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),                          \
                                         _mm256_set1_ps(h2f(dr[j]) * xd[(size_t)b * nb + j]), acc[b]); \
                macc[b] += h2f(mr[j]) * xs[(size_t)b * nb + j];                             \
            }                                                                               \
        }                                                                                   \
        for (int b = 0; b < B; b++) out[(size_t)b * N + n] = hsum256(acc[b]) + macc[b];     \
    }

__attribute__((target("avx2,fma")))
static void rows_avx2(const uint8_t *qs, const half *d, const half *m, const int8_t *xq,
                      const float *xd, const float *xs, float *out, int N, int K, int B,
                      int n0, int n1) {
    const __m256i ones = _mm256_set1_epi16(1);
    /* u8 x s8 pairs summed to int16 (|15 * 127 * 2| fits), then pairs of those to int32 */
    ROWS_BODY(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
}

__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
static void rows_vnni(const uint8_t *qs, const half *d, const half *m, const int8_t *xq,
                      const float *xd, const float *xs, float *out, int N, int K, int B,
                      int n0, int n1) {
    ROWS_BODY(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x))
}

/* AVX-512 VNNI, two blocks (64 weights) per instruction: the codes of blocks j and j + 1 are
 * spread to [lo(j) | hi(j) | lo(j+1) | hi(j+1)] -- x's order -- and vpdpbusd gives 16 int32
 * lanes, 8 per block; the per-block scales are laid out the same way. A tile is R weight rows
 * times C activation rows (R, C <= 4, constants where the tile is used, so that the 16
 * accumulators stay in registers): each weight load serves C activation rows and each
 * activation load R weight rows. An odd last block uses 256 bits. */
T512 static inline __m512i spread_pair(const uint8_t *w) {
    const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w));
    const __m512i dup = _mm512_shuffle_i64x2(a, a, _MM_SHUFFLE(1, 1, 0, 0)); /* c0 c0 c1 c1 */
    const __m512i hi = _mm512_mask_srli_epi16(dup, 0xFF00FF00u, dup, 4);      /* lanes 1, 3 */
    return _mm512_and_si512(hi, _mm512_set1_epi8(0x0F));
}

T512 static inline __m512 pair_scales(const float *s) { /* [s0 x 8 | s1 x 8] */
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(
        _mm_castpd_ps(_mm_load_sd((const double *)s))));
}

/* four fp16 scales as floats */
T512 static inline __m128 load4h(const half *s) {
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)s));
}

T512 static inline __m512 pair_scales_h(const half *s) { /* [s0 x 8 | s1 x 8] */
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    uint32_t two;
    memcpy(&two, s, 4);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(
        _mm_cvtph_ps(_mm_cvtsi32_si128((int)two))));
}

/* sum_j a[j] b[j] for fp16 a, 16 lanes at a time (scales against activation sums) */
T512 static inline float dot512h(const half *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        const __m512 av = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const void *)(a + j)));
        acc = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(k, b + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* sum_j a[j] b[j], 16 lanes at a time (the Q4_1 offsets against the activation sums) */
T512 static inline float dot512(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + j), _mm512_maskz_loadu_ps(k, b + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* q8 != 0: Q8_0 weights (int8 codes, flipped to unsigned by xor 0x80; the 128 sum(xq) this
 * adds per block is taken off in the tail); else Q4 (offsets m). */
T512 static inline __attribute__((always_inline)) void tile512(
        const int R, const int C, const int q8, const uint8_t *w, const half *d, const half *m,
        const int8_t *xq, const float *xd, const float *xs, float *out, int N, int K, int n0,
        int b0) {
    const int nb = K / 32, pairs = nb / 2;
    const size_t wrow = q8 ? (size_t)K : (size_t)K / 2;
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    int p0 = 0; /* the first pair the pair loop takes */
    {
        /* Four blocks (128 weights) per step. Q4: one 64-byte load holds their codes; its low
         * nibbles are weights 0-15 of each block and its high nibbles weights 16-31, so the
         * activations are regrouped to match (two 128-bit shuffles per activation row, not per
         * weight row), both halves accumulate into the same int32 lanes (4 lanes per block),
         * and one conversion and one FMA serve 128 weights instead of 64. Q8_0: the codes are
         * regrouped the same way (two shuffles per weight row). */
        const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        const __m512i low = _mm512_set1_epi8(0x0F);
        const int quads = nb / 4;
        for (int g = 0; g < quads; g++) {
            __m512i xlo[4], xhi[4];
            __m512 xsc[4];
            for (int c = 0; c < C; c++) {
                const int8_t *x = xq + (size_t)(b0 + c) * K + 128 * g;
                const __m512i a = _mm512_loadu_si512((const void *)x);
                const __m512i b = _mm512_loadu_si512((const void *)(x + 64));
                xlo[c] = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(2, 0, 2, 0));
                xhi[c] = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 1, 3, 1));
                xsc[c] = _mm512_permutexvar_ps(idx4, _mm512_castps128_ps512(
                    _mm_loadu_ps(xd + (size_t)(b0 + c) * nb + 4 * g)));
            }
            for (int r = 0; r < R; r++) {
                __m512i lo, hi;
                if (q8) { /* Q8_0: the four blocks' codes regrouped as the activations are */
                    const uint8_t *wr = w + (size_t)(n0 + r) * wrow + 128 * g;
                    const __m512i flip = _mm512_set1_epi8((char)0x80);
                    const __m512i a = _mm512_xor_si512(_mm512_loadu_si512((const void *)wr), flip);
                    const __m512i b = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr + 64)), flip);
                    lo = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(2, 0, 2, 0));
                    hi = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 1, 3, 1));
                } else {
                    const __m512i q = _mm512_loadu_si512((const void *)(w + (size_t)(n0 + r) * wrow + 64 * g));
                    lo = _mm512_and_si512(q, low);
                    hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
                }
                const __m512 dsc = _mm512_permutexvar_ps(idx4, _mm512_castps128_ps512(
                    load4h(d + (size_t)(n0 + r) * nb + 4 * g)));
                for (int c = 0; c < C; c++) {
                    const __m512i dot = _mm512_dpbusd_epi32(
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[c]), hi, xhi[c]);
                    acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                                _mm512_mul_ps(dsc, xsc[c]), acc[r][c]);
                }
            }
        }
        p0 = 2 * quads;
    }
    for (int p = p0; p < pairs; p++) {
        __m512i xv[4];
        __m512 xsc[4];
        for (int c = 0; c < C; c++) {
            xv[c] = _mm512_loadu_si512((const void *)(xq + (size_t)(b0 + c) * K + 64 * p));
            xsc[c] = pair_scales(xd + (size_t)(b0 + c) * nb + 2 * p);
        }
        for (int r = 0; r < R; r++) {
            const uint8_t *wr = w + (size_t)(n0 + r) * wrow;
            const __m512i wv = q8 ? _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr + 64 * p)),
                                                     _mm512_set1_epi8((char)0x80))
                                  : spread_pair(wr + 32 * p);
            const __m512 dsc = pair_scales_h(d + (size_t)(n0 + r) * nb + 2 * p);
            for (int c = 0; c < C; c++) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[c]);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dsc, xsc[c]),
                                            acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const size_t n = (size_t)(n0 + r);
        const half *dr = d + n * nb;
        for (int c = 0; c < C; c++) {
            const size_t b = (size_t)(b0 + c);
            const float *xdb = xd + b * nb, *xsb = xs + b * nb;
            const int8_t *x = xq + b * K;
            float y = _mm512_reduce_add_ps(acc[r][c]);
            if (q8) {
                y -= 128.f * dot512h(dr, xsb, 2 * pairs);
                for (int j = 2 * pairs; j < nb; j++) { /* the odd last block */
                    const int8_t *wj = (const int8_t *)w + n * wrow + 32 * j;
                    int isum = 0;
                    for (int i = 0; i < 32; i++) isum += wj[i] * x[32 * j + i];
                    y += h2f(dr[j]) * xdb[j] * (float)isum;
                }
            } else {
                y += dot512h(m + n * nb, xsb, nb);
                if (nb & 1) { /* the odd last block */
                    const int j = nb - 1;
                    const __m256i wv = unpack_block(w + n * wrow + 16 * j);
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * j));
                    const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, xv);
                    y += hsum256(_mm256_cvtepi32_ps(dot)) * h2f(dr[j]) * xdb[j];
                }
            }
            out[b * N + n] = y;
        }
    }
}

#define TILE_CASES(Q8)                                                                       \
    switch (4 * (R - 1) + (C - 1)) {                                                         \
    case 0: tile512(1, 1, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 1: tile512(1, 2, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 2: tile512(1, 3, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 3: tile512(1, 4, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 4: tile512(2, 1, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 5: tile512(2, 2, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 6: tile512(2, 3, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 7: tile512(2, 4, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 8: tile512(3, 1, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 9: tile512(3, 2, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;                \
    case 10: tile512(3, 3, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;               \
    case 11: tile512(3, 4, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;               \
    case 12: tile512(4, 1, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;               \
    case 13: tile512(4, 2, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;               \
    case 14: tile512(4, 3, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;               \
    default: tile512(4, 4, Q8, w, d, m, xq, xd, xs, out, N, K, n0, b0); break;               \
    }

/* Rows [nstart, nend) in tiles of 4 weight rows x 4 activation rows. */
T512 static void rows_vnni512(const uint8_t *w, const half *d, const half *m, const int8_t *xq,
                              const float *xd, const float *xs, float *out, int N, int K, int B,
                              int nstart, int nend) {
    for (int n0 = nstart; n0 < nend; n0 += 4) {
        const int R = nend - n0 < 4 ? nend - n0 : 4;
        for (int b0 = 0; b0 < B; b0 += 4) {
            const int C = B - b0 < 4 ? B - b0 : 4;
            TILE_CASES(0)
        }
    }
}

T512 static void q8_vnni512(const int8_t *q8, const half *d, const int8_t *xq, const float *xd,
                            const float *xs, float *out, int N, int K, int B, int nstart,
                            int nend) {
    const uint8_t *w = (const uint8_t *)q8;
    const half *m = NULL;
    for (int n0 = nstart; n0 < nend; n0 += 4) {
        const int R = nend - n0 < 4 ? nend - n0 : 4;
        for (int b0 = 0; b0 < B; b0 += 4) {
            const int C = B - b0 < 4 ? B - b0 : 4;
            TILE_CASES(1)
        }
    }
}

#endif

/* ------------------------------------------------------------------------------------------
 * Ternary weights in llama.cpp's TQ2_0 blocks (BitNet b1.58 models): per row, K/256 blocks of
 * 64 bytes of 2-bit codes and one scale d; w = d (q - 1), q in {0, 1, 2}. Byte 32 c + i of a
 * block holds in bits 2l the code of weight 128 c + 32 l + i. So plane l of the 64 bytes holds
 * activation blocks 8 blk + l (bytes 0-31) and 8 blk + 4 + l (bytes 32-63), and
 *   y = sum_blk d sum_j xd_j (q . xq)_j  -  sum_blk d sum_j xs_j       (j: the block's 8)
 * with vpdpbusd taking the codes (unsigned) against the int8 activations. */
static void t2_scalar(const uint8_t *qs, const half *d, const int8_t *xq, const float *xd,
                      const float *xs, float *out, int N, int K, int B, int n0, int n1) {
    const int nq = K / 256, nb = K / 32;
    for (int n = n0; n < n1; n++)
        for (int b = 0; b < B; b++) {
            float acc = 0.f;
            for (int blk = 0; blk < nq; blk++) {
                const uint8_t *q = qs + (size_t)n * (K / 4) + 64 * blk;
                float sum = 0.f;
                for (int c = 0; c < 2; c++)
                    for (int l = 0; l < 4; l++) {
                        const int j = 8 * blk + 4 * c + l;
                        const int8_t *x = xq + (size_t)b * K + 32 * j;
                        int isum = 0;
                        for (int i = 0; i < 32; i++) isum += ((q[32 * c + i] >> (2 * l)) & 3) * x[i];
                        sum += xd[(size_t)b * nb + j] * (float)isum - xs[(size_t)b * nb + j];
                    }
                acc += h2f(d[(size_t)n * nq + blk]) * sum;
            }
            out[(size_t)b * N + n] = acc;
        }
}

#ifdef KEENLM_X86
T512 static inline __attribute__((always_inline)) void t2_tile512(
        const int R, const int C, const uint8_t *qs, const half *d, const int8_t *xq,
        const float *xd, const float *xs, float *out, int N, int K, int n0, int b0) {
    const int nq = K / 256, nb = K / 32;
    const __m512i three = _mm512_set1_epi8(3);
    __m512 acc[4][4];
    float tail[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            acc[r][c] = _mm512_setzero_ps();
            tail[r][c] = 0.f;
        }
    for (int blk = 0; blk < nq; blk++) {
        __m512i q[4];
        __m512 dv[4];
        for (int r = 0; r < R; r++) {
            q[r] = _mm512_loadu_si512((const void *)(qs + (size_t)(n0 + r) * (K / 4) + 64 * blk));
            dv[r] = _mm512_set1_ps(h2f(d[(size_t)(n0 + r) * nq + blk]));
        }
        for (int l = 0; l < 4; l++) {
            const __m512i idx = _mm512_set_epi32(4 + l, 4 + l, 4 + l, 4 + l, 4 + l, 4 + l, 4 + l,
                                                 4 + l, l, l, l, l, l, l, l, l);
            __m512i xv[4];
            __m512 xsc[4];
            for (int c = 0; c < C; c++) {
                const int8_t *x = xq + (size_t)(b0 + c) * K + 256 * blk;
                xv[c] = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(x + 32 * l))),
                    _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * l)), 1);
                xsc[c] = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(
                    _mm256_loadu_ps(xd + (size_t)(b0 + c) * nb + 8 * blk)));
            }
            for (int r = 0; r < R; r++) {
                const __m512i plane = _mm512_and_si512(
                    l ? _mm512_srli_epi16(q[r], 2 * l) : q[r], three);
                for (int c = 0; c < C; c++) {
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), plane, xv[c]);
                    acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                                _mm512_mul_ps(dv[r], xsc[c]), acc[r][c]);
                }
            }
        }
        for (int c = 0; c < C; c++) { /* the -1 of every code: d times the block's sum(x) */
            const float *xsb = xs + (size_t)(b0 + c) * nb + 8 * blk;
            const float xsum = xsb[0] + xsb[1] + xsb[2] + xsb[3] + xsb[4] + xsb[5] + xsb[6] + xsb[7];
            for (int r = 0; r < R; r++) tail[r][c] += h2f(d[(size_t)(n0 + r) * nq + blk]) * xsum;
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[(size_t)(b0 + c) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][c]) - tail[r][c];
}

T512 static void t2_vnni512(const uint8_t *qs, const half *d, const int8_t *xq, const float *xd,
                            const float *xs, float *out, int N, int K, int B, int nstart,
                            int nend) {
    for (int n0 = nstart; n0 < nend; n0 += 4) {
        const int R = nend - n0 < 4 ? nend - n0 : 4;
        for (int b0 = 0; b0 < B; b0 += 4) {
            const int C = B - b0 < 4 ? B - b0 : 4;
#define T2(R_, C_) t2_tile512(R_, C_, qs, d, xq, xd, xs, out, N, K, n0, b0)
            switch (4 * (R - 1) + (C - 1)) {
            case 0: T2(1, 1); break;  case 1: T2(1, 2); break;  case 2: T2(1, 3); break;
            case 3: T2(1, 4); break;  case 4: T2(2, 1); break;  case 5: T2(2, 2); break;
            case 6: T2(2, 3); break;  case 7: T2(2, 4); break;  case 8: T2(3, 1); break;
            case 9: T2(3, 2); break;  case 10: T2(3, 3); break; case 11: T2(3, 4); break;
            case 12: T2(4, 1); break; case 13: T2(4, 2); break; case 14: T2(4, 3); break;
            default: T2(4, 4); break;
            }
#undef T2
        }
    }
}
#endif

#ifdef KEENLM_X86
/* Q8_0 on AVX2 (llama.cpp's sign trick): |w| (unsigned) times x with w's sign, in int16 pairs
 * (127 * 127 * 2 fits), then to int32; one block of 32 per instruction. */
__attribute__((target("avx2,fma")))
static void q8_avx2(const int8_t *q8, const half *d, const int8_t *xq, const float *xd,
                    float *out, int N, int K, int B, int n0, int n1) {
    const int nb = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int n = n0; n < n1; n++) {
        const int8_t *wr = q8 + (size_t)n * K;
        const half *dr = d + (size_t)n * nb;
        for (int b = 0; b < B; b++) {
            const int8_t *x = xq + (size_t)b * K;
            const float *xdb = xd + (size_t)b * nb;
            __m256 acc = _mm256_setzero_ps();
            for (int j = 0; j < nb; j++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + 32 * j));
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * j));
                const __m256i dot = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(h2f(dr[j]) * xdb[j]), acc);
            }
            out[(size_t)b * N + n] = hsum256(acc);
        }
    }
}
#endif

/* Q8_0 reference (llama.cpp's Q8_0: int8 codes in blocks of 32, one scale d each; w = d q):
 *   q8  int8 (N, K)   d float (N, K/32)
 * y[b, n] = sum_j d[n, j] xd[b, j] sum_i q xq. */
static void q8_scalar(const int8_t *q8, const half *d, const int8_t *xq, const float *xd,
                      float *out, int N, int K, int B, int n0, int n1) {
    const int nb = K / 32;
    for (int n = n0; n < n1; n++)
        for (int b = 0; b < B; b++) {
            float acc = 0.f;
            for (int j = 0; j < nb; j++) {
                int isum = 0;
                for (int i = 0; i < 32; i++)
                    isum += q8[(size_t)n * K + 32 * j + i] * xq[(size_t)b * K + 32 * j + i];
                acc += h2f(d[(size_t)n * nb + j]) * xd[(size_t)b * nb + j] * (float)isum;
            }
            out[(size_t)b * N + n] = acc;
        }
}

/* ------------------------------------------------------------------------------------------
 * Dispatch: one entry per weight format, the path chosen by the caller (tests force each). */
static void q4_rows(int path, const uint8_t *qs, const half *d, const half *m,
                    const int8_t *xq, const float *xd, const float *xs, float *out,
                    int N, int K, int B, int n0, int n1) {
#ifdef KEENLM_X86
    if (path == PATH_VNNI512) { rows_vnni512(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
    if (path == PATH_VNNI) { rows_vnni(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
    if (path == PATH_AVX2) { rows_avx2(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
#endif
    rows_scalar(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1);
}

static void q8_rows(int path, const int8_t *q8, const half *d, const int8_t *xq,
                    const float *xd, const float *xs, float *out, int N, int K, int B,
                    int n0, int n1) {
#ifdef KEENLM_X86
    if (path == PATH_VNNI512) { q8_vnni512(q8, d, xq, xd, xs, out, N, K, B, n0, n1); return; }
    if (path == PATH_VNNI || path == PATH_AVX2) { q8_avx2(q8, d, xq, xd, out, N, K, B, n0, n1); return; }
#endif
    q8_scalar(q8, d, xq, xd, out, N, K, B, n0, n1);
}

static void t2_rows(int path, const uint8_t *qs, const half *d, const int8_t *xq,
                    const float *xd, const float *xs, float *out, int N, int K, int B,
                    int n0, int n1) {
#ifdef KEENLM_X86
    if (path == PATH_VNNI512) { t2_vnni512(qs, d, xq, xd, xs, out, N, K, B, n0, n1); return; }
#endif
    t2_scalar(qs, d, xq, xd, xs, out, N, K, B, n0, n1);
}

static int path_ok(int path) {
    if (path == PATH_SCALAR) return 1;
#ifdef KEENLM_X86
    return path >= PATH_AVX2 && path <= cpu_path();
#else
    return 0;
#endif
}

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
