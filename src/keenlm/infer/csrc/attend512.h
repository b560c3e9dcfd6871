/* The grouped-query attention of step.c's AVX-512 path: the query heads that share one
 * key/value head at once. Included by step.c after exp_poly and attend (same arithmetic, in
 * another order); not a unit of its own. */
#if defined(KEENLM_X86) && defined(__GNUC__)
#define ATT512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))

/* The NQ query heads that share one key/value head, at once (grouped-query attention), head
 * dim 16 NV: each key and value row is loaded once for all of them, the queries and outputs
 * stay in registers. The same arithmetic as ``attend`` per head, in another order. */
ATT512 static inline __attribute__((always_inline)) void attend_group512(
        const int NQ, const int NV, const float *q, const float *k, const float *v,
        const uint8_t *mask, int S, float *p, float *out) {
    const int D = 16 * NV;
    const float scale = 1.f / sqrtf((float)D);
    __m512 qv[4][8];
    float mx[4];
    for (int h = 0; h < NQ; h++) {
        mx[h] = -INFINITY;
        for (int i = 0; i < NV; i++) qv[h][i] = _mm512_loadu_ps(q + (size_t)h * D + 16 * i);
    }
    for (int s = 0; s < S; s++) {
        if (!mask[s]) {
            for (int h = 0; h < NQ; h++) p[(size_t)h * S + s] = -INFINITY;
            continue;
        }
        __m512 kv[8];
        for (int i = 0; i < NV; i++) kv[i] = _mm512_loadu_ps(k + (size_t)s * D + 16 * i);
        for (int h = 0; h < NQ; h++) {
            __m512 acc = _mm512_mul_ps(qv[h][0], kv[0]);
            for (int i = 1; i < NV; i++) acc = _mm512_fmadd_ps(qv[h][i], kv[i], acc);
            const float sc = _mm512_reduce_add_ps(acc) * scale;
            p[(size_t)h * S + s] = sc;
            mx[h] = sc > mx[h] ? sc : mx[h];
        }
    }
    float inv[4];
    for (int h = 0; h < NQ; h++) {
        float *ph = p + (size_t)h * S, sum = 0.f;
        if (mx[h] == -INFINITY) { /* no visible key (a padding row): never read */
            for (int s = 0; s < S; s++) ph[s] = 0.f;
            inv[h] = 0.f;
            continue;
        }
        for (int s = 0; s < S; s++) {
            const float e = mask[s] ? exp_poly(ph[s] - mx[h]) : 0.f;
            ph[s] = e;
            sum += e;
        }
        inv[h] = 1.f / sum;
    }
    __m512 o[4][8];
    for (int h = 0; h < NQ; h++)
        for (int i = 0; i < NV; i++) o[h][i] = _mm512_setzero_ps();
    for (int s = 0; s < S; s++) {
        if (!mask[s]) continue;
        __m512 vv[8];
        for (int i = 0; i < NV; i++) vv[i] = _mm512_loadu_ps(v + (size_t)s * D + 16 * i);
        for (int h = 0; h < NQ; h++) {
            const __m512 w = _mm512_set1_ps(p[(size_t)h * S + s]);
            for (int i = 0; i < NV; i++) o[h][i] = _mm512_fmadd_ps(w, vv[i], o[h][i]);
        }
    }
    for (int h = 0; h < NQ; h++)
        for (int i = 0; i < NV; i++)
            _mm512_storeu_ps(out + (size_t)h * D + 16 * i,
                             _mm512_mul_ps(o[h][i], _mm512_set1_ps(inv[h])));
}

/* 1 when the grouped AVX-512 path took the group (head dims 64 and 128, up to 4 query heads
 * per key/value head), 0 for the per-head loop */
ATT512 static int attend_group_fast(int nq, int D, const float *q, const float *k, const float *v,
                                  const uint8_t *mask, int S, float *p, float *out) {
#define AG(NQ, NV) attend_group512(NQ, NV, q, k, v, mask, S, p, out); return 1
    if (D == 64) {
        switch (nq) { case 1: AG(1, 4); case 2: AG(2, 4); case 3: AG(3, 4); case 4: AG(4, 4); }
    } else if (D == 128) {
        switch (nq) { case 1: AG(1, 8); case 2: AG(2, 8); case 3: AG(3, 8); case 4: AG(4, 8); }
    }
#undef AG
    return 0;
}
#endif
