/* Quantized matrix-vector products for CPU decoding: 4-bit weights (llama.cpp's Q4_0 / Q4_1
 * blocks of 32) times activations quantized on the fly to int8 blocks of 32 (Q8_1-style),
 * with integer dot products: AVX-512 VNNI (vpdpbusd) where the CPU has it, AVX2 (vpmaddubsw)
 * elsewhere on x86, and a scalar loop everywhere (the reference the tests hold the others to).
 * The path is chosen at run time (__builtin_cpu_supports), so one build serves every x86 CPU.
 * Ternary TQ2_0 weights are in tq2.c; the Python module in module.c.
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qdot.h"

#define MAX_ROWS 16

int cpu_path(void) {
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
void quantize_rows(const float *x, int8_t *xq, float *xd, float *xs, int B, int K) {
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
void q4_rows(int path, const uint8_t *qs, const half *d, const half *m,
                    const int8_t *xq, const float *xd, const float *xs, float *out,
                    int N, int K, int B, int n0, int n1) {
#ifdef KEENLM_X86
    if (path == PATH_VNNI512) { rows_vnni512(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
    if (path == PATH_VNNI) { rows_vnni(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
    if (path == PATH_AVX2) { rows_avx2(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1); return; }
#endif
    rows_scalar(qs, d, m, xq, xd, xs, out, N, K, B, n0, n1);
}

void q8_rows(int path, const int8_t *q8, const half *d, const int8_t *xq,
                    const float *xd, const float *xs, float *out, int N, int K, int B,
                    int n0, int n1) {
#ifdef KEENLM_X86
    if (path == PATH_VNNI512) { q8_vnni512(q8, d, xq, xd, xs, out, N, K, B, n0, n1); return; }
    if (path == PATH_VNNI || path == PATH_AVX2) { q8_avx2(q8, d, xq, xd, out, N, K, B, n0, n1); return; }
#endif
    q8_scalar(q8, d, xq, xd, out, N, K, B, n0, n1);
}


int path_ok(int path) {
    if (path == PATH_SCALAR) return 1;
#ifdef KEENLM_X86
    return path >= PATH_AVX2 && path <= cpu_path();
#else
    return 0;
#endif
}
