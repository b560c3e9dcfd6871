/* Ternary weights in llama.cpp's TQ2_0 blocks times int8 activations (keenlm.quant.tq2): the
 * scalar reference and the AVX-512 VNNI tiles, behind t2_rows (qdot.h). */
#include <stdint.h>
#include <stdlib.h>

#include "qdot.h"

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

void t2_rows(int path, const uint8_t *qs, const half *d, const int8_t *xq,
                    const float *xd, const float *xs, float *out, int N, int K, int B,
                    int n0, int n1) {
#ifdef KEENLM_X86
    if (path == PATH_VNNI512) { t2_vnni512(qs, d, xq, xd, xs, out, N, K, B, n0, n1); return; }
#endif
    t2_scalar(qs, d, xq, xd, xs, out, N, K, B, n0, n1);
}
