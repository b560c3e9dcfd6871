/* The LoRA adapters of step.c (see its header comment): t = A x per row, then B t added to the
 * output rows a thread computes. Included by step.c after the Step type; not a unit of its own. */
/* The adapters' first half for this thread's rows b: t[b] = A x[b], RG = rank x projections
 * in the group (A is RG x K). */
CLONES static void lora_down(Step *st, const float *A, int RG, const float *x, int K, int ith,
                             int nth) {
    for (int b = ith; b < st->B; b += nth)
        for (int j = 0; j < RG; j++) {
            const float *a = A + (size_t)j * K, *xb = x + (size_t)b * K;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < K; i++) sum += a[i] * xb[i];
            st->t[(size_t)b * RG + j] = sum;
        }
}

/* The second half for output rows n0..n1 of every row b: out[b][n] += Bs[n] . t[b][seg(n)],
 * where seg(n) is the projection of the group row n belongs to (rows before s1: the first,
 * before s2: the second, then the third) and picks its rank entries of t. */
CLONES static void lora_up(Step *st, const float *Bs, int RG, int N, float *out, int n0, int n1,
                           int s1, int s2) {
    const int r = st->M->rank;
    for (int b = 0; b < st->B; b++) {
        const float *tb = st->t + (size_t)b * RG;
        float *ob = out + (size_t)b * N;
        for (int n = n0; n < n1; n++) {
            const float *bn = Bs + (size_t)n * r, *tn = tb + (n < s1 ? 0 : n < s2 ? r : 2 * r);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < r; j++) sum += bn[j] * tn[j];
            ob[n] += sum;
        }
    }
}

