/* The decode step of a Llama-family model with Q4 (or ternary TQ2_0) projections and a Q8_0
 * embedding and head, in C: one call per generated token (for up to 16 rows), no Python and no PyTorch dispatch
 * inside it. keenlm.infer.engine builds the model description and documents the contract;
 * the per-op reference is the PyTorch model itself (keenlm.model.transformer), which the
 * tests hold this step to.
 *
 * One step, for rows b < B, each at its own cache position len[b] of its own cache row slot[b]
 * (it writes its key and value there and attends to the positions s <= len[b] that its mask
 * allows), rotary position pos[b]:
 *   x = embed(token)
 *   per layer: h = rmsnorm(x); [q | k | v] = Wqkv h; rope(q, k); cache[t] = k, v;
 *              a = softmax(q K^T / sqrt(D)) V per head (grouped-query: H / Hk heads per
 *              key/value head); x += Wo a; h = rmsnorm(x); [g | u] = Wgu h;
 *              x += Wdown (silu(g) u)
 *   logits = Whead rmsnorm(x)
 *
 * LoRA adapters (keenlm.model.lora), when the model has them: each projection group (qkv, o,
 * gate_up, down) also holds A (rank rows per projection of the group, fp32) and B (its output
 * rows x rank, fp32, scaled by alpha / rank), and adds B (A x) to the base's output, with x
 * the group's input in fp32 (not its int8 rounding), as the PyTorch layer does. A x is
 * computed by the thread that owns the row b (beside its rounding of x); B's rows go with the
 * base's rows a thread computes, so the adapters add no barrier.
 *
 * Threads: the whole step is one job of keenlm's pool (quant/csrc/pool.c, reached through
 * _qdot's capsule): every thread runs this same sequence, takes its share of each matrix's
 * rows, of the rows b in the element-wise parts and of the (row, head) pairs of attention,
 * and meets the others at a barrier between dependent parts (about 10 per layer).
 *
 * Legend: B rows, C width, H query heads, Hk key/value heads, D head dim, F feed-forward
 * width, V vocabulary, L layers, S cache length (max_len). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../quant/csrc/qdot.h"

#define MAX_ROWS 16
#define PTRS_PER_LAYER 14
#define PTRS_GLOBAL 7
#define LORA_PTRS_PER_LAYER 8

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* the element-wise loops compiled for AVX-512, AVX2 and baseline x86-64, chosen at load */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

static const QdotAPI *q;

/* a projection's weights: Q4 blocks (codes, scales, offsets) or TQ2_0 (codes, scales) */
typedef struct { int kind; const uint8_t *qs; const half *d, *m; } W;

typedef struct {
    W qkv, o, gu, down;
    const float *norm_in, *norm_post;
    const float *la[4], *lb[4]; /* LoRA A and scaled B of qkv, o, gate_up, down (or null) */
} Layer;

typedef struct {
    int L, C, H, Hk, D, F, V, rope_len, rank; /* rank 0: no adapters */
    float eps;
    const int8_t *emb_q; const half *emb_d;
    const int8_t *head_q; const half *head_d;
    const float *norm_f, *rope_cos, *rope_sin;
    Layer *layers;
} Model;

/* ------------------------------------------------------------------------------------------
 * Element-wise parts. exp is a Cody-Waite range reduction and a degree-6 polynomial (Cephes'
 * expf; ~1 ulp on the range used here), plain arithmetic so that the loops vectorize. */
static inline float exp_poly(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s = {.i = ((int32_t)n + 127) << 23};
    return p * s.f;
}

CLONES static void rmsnorm(const float *x, const float *w, float *out, int C, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < C; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)C + eps);
#pragma omp simd
    for (int i = 0; i < C; i++) out[i] = x[i] * r * w[i];
}

/* rotate the pairs (x[i], x[i + D/2]) of each of n heads by pos's angles */
static void rope(float *x, int n, int D, const float *cos, const float *sin) {
    const int half = D / 2;
    for (int h = 0; h < n; h++) {
        float *a = x + (size_t)h * D, *b = a + half;
        for (int i = 0; i < half; i++) {
            const float x1 = a[i], x2 = b[i];
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

CLONES static void swiglu(const float *gu, float *out, int F) {
#pragma omp simd
    for (int i = 0; i < F; i++) out[i] = gu[i] / (1.f + exp_poly(-gu[i])) * gu[F + i];
}

/* One query head against positions 0..S-1 of its key/value head (rows of D floats). */
CLONES static void attend(const float *qh, const float *k, const float *v, const uint8_t *mask,
                          int S, int D, float *p, float *out) {
    const float scale = 1.f / sqrtf((float)D);
    float mx = -INFINITY;
    for (int s = 0; s < S; s++) {
        const float *ks = k + (size_t)s * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int i = 0; i < D; i++) dot += qh[i] * ks[i];
        p[s] = mask[s] ? dot * scale : -INFINITY;
        mx = p[s] > mx ? p[s] : mx;
    }
    for (int i = 0; i < D; i++) out[i] = 0.f;
    if (mx == -INFINITY) return; /* no visible key (a padding row): never read */
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int s = 0; s < S; s++) {
        const float e = mask[s] ? exp_poly(p[s] - mx) : 0.f;
        p[s] = e;
        sum += e;
    }
    for (int s = 0; s < S; s++) {
        if (p[s] == 0.f) continue;
        const float *vs = v + (size_t)s * D;
        const float w = p[s];
#pragma omp simd
        for (int i = 0; i < D; i++) out[i] += w * vs[i];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int i = 0; i < D; i++) out[i] *= inv;
}

#include "attend512.h" /* the grouped-query attention of the AVX-512 path */

/* ------------------------------------------------------------------------------------------
 * The step. */
typedef struct {
    const Model *M;
    const int64_t *tokens, *pos, *len, *slot; /* per row: position written, cache row */
    const uint8_t *mask;
    int64_t mask_stride;
    int B, R, S, tmax, path; /* R cache rows, S cache positions, tmax = max len */
    float *kc, *vc, *logits;
    /* scratch */
    float *x, *h, *qkv, *att, *o, *gu, *act, *xd, *xs, *p, *t;
    int8_t *xq;
} Step;

#include "lora.h" /* the LoRA adapters of a projection group */

static void quantize_share(Step *st, const float *src, int K, int ith, int nth) {
    for (int b = ith; b < st->B; b += nth)
        q->quantize_rows(src + (size_t)b * K, st->xq + (size_t)b * K, st->xd + (size_t)b * (K / 32),
                         st->xs + (size_t)b * (K / 32), 1, K);
}

/* This thread's share of a projection's output rows (and of its adapters' B, when Bs is set;
 * RG, s1, s2 as in lora_up). */
static void q4_share(Step *st, const W *w, int N, int K, float *out, int ith, int nth,
                     const float *Bs, int RG, int s1, int s2) {
    int n0, n1;
    q->pool_share(N, ith, nth, &n0, &n1);
    if (n0 >= n1) return;
    if (w->kind == FMT_T2)
        q->t2_rows(st->path, w->qs, w->d, st->xq, st->xd, st->xs, out, N, K, st->B, n0, n1);
    else
        q->q4_rows(st->path, w->qs, w->d, w->m, st->xq, st->xd, st->xs, out, N, K, st->B, n0, n1);
    if (Bs) lora_up(st, Bs, RG, N, out, n0, n1, s1, s2);
}

static void layer_step(Step *st, const Layer *ly, int l, int ith, int nth) {
    const Model *M = st->M;
    const int B = st->B, C = M->C, H = M->H, Hk = M->Hk, D = M->D, F = M->F;
    const int NQKV = (H + 2 * Hk) * D, half = D / 2, r = M->rank;
    for (int b = ith; b < B; b += nth)
        rmsnorm(st->x + (size_t)b * C, ly->norm_in, st->h + (size_t)b * C, C, M->eps);
    quantize_share(st, st->h, C, ith, nth);
    if (r) lora_down(st, ly->la[0], 3 * r, st->h, C, ith, nth);
    q->pool_barrier(nth);
    q4_share(st, &ly->qkv, NQKV, C, st->qkv, ith, nth, ly->lb[0], 3 * r, H * D, (H + Hk) * D);
    q->pool_barrier(nth);
    for (int b = ith; b < B; b += nth) { /* rotate q and k; write k and v at position t */
        float *row = st->qkv + (size_t)b * NQKV;
        const float *cs = M->rope_cos + (size_t)st->pos[b] * half;
        const float *sn = M->rope_sin + (size_t)st->pos[b] * half;
        rope(row, H + Hk, D, cs, sn);
        for (int g = 0; g < Hk; g++) {
            const size_t at = ((((size_t)l * st->R + st->slot[b]) * Hk + g) * st->S + st->len[b]) * D;
            memcpy(st->kc + at, row + (size_t)(H + g) * D, sizeof(float) * D);
            memcpy(st->vc + at, row + (size_t)(H + Hk + g) * D, sizeof(float) * D);
        }
    }
    q->pool_barrier(nth);
    const int rep = H / Hk;
    float *p = st->p + (size_t)ith * rep * (st->tmax + 1);
    for (int u = ith; u < B * Hk; u += nth) { /* a row's key/value head and its query heads */
        const int b = u / Hk, g = u % Hk, S1 = (int)st->len[b] + 1;
        const size_t base = (((size_t)l * st->R + st->slot[b]) * Hk + g) * st->S * D;
        const float *qg = st->qkv + (size_t)b * NQKV + (size_t)g * rep * D;
        const uint8_t *mask = st->mask + (size_t)b * st->mask_stride;
        float *og = st->att + (size_t)b * H * D + (size_t)g * rep * D;
#ifdef KEENLM_X86
        if (st->path == PATH_VNNI512
            && attend_group_fast(rep, D, qg, st->kc + base, st->vc + base, mask, S1, p, og))
            continue;
#endif
        for (int h = 0; h < rep; h++)
            attend(qg + (size_t)h * D, st->kc + base, st->vc + base, mask, S1, D, p,
                   og + (size_t)h * D);
    }
    q->pool_barrier(nth);
    quantize_share(st, st->att, H * D, ith, nth);
    if (r) lora_down(st, ly->la[1], r, st->att, H * D, ith, nth);
    q->pool_barrier(nth);
    q4_share(st, &ly->o, C, H * D, st->o, ith, nth, ly->lb[1], r, C, C);
    q->pool_barrier(nth);
    for (int b = ith; b < B; b += nth) {
        float *xb = st->x + (size_t)b * C;
        for (int i = 0; i < C; i++) xb[i] += st->o[(size_t)b * C + i];
        rmsnorm(xb, ly->norm_post, st->h + (size_t)b * C, C, M->eps);
    }
    quantize_share(st, st->h, C, ith, nth);
    if (r) lora_down(st, ly->la[2], 2 * r, st->h, C, ith, nth);
    q->pool_barrier(nth);
    q4_share(st, &ly->gu, 2 * F, C, st->gu, ith, nth, ly->lb[2], 2 * r, F, 2 * F);
    q->pool_barrier(nth);
    for (int b = ith; b < B; b += nth)
        swiglu(st->gu + (size_t)b * 2 * F, st->act + (size_t)b * F, F);
    quantize_share(st, st->act, F, ith, nth);
    if (r) lora_down(st, ly->la[3], r, st->act, F, ith, nth);
    q->pool_barrier(nth);
    q4_share(st, &ly->down, C, F, st->o, ith, nth, ly->lb[3], r, C, C);
    q->pool_barrier(nth);
    for (int b = ith; b < B; b += nth) {
        float *xb = st->x + (size_t)b * C;
        for (int i = 0; i < C; i++) xb[i] += st->o[(size_t)b * C + i];
    }
}

static void step_job(void *ctx, int ith, int nth) {
    Step *st = ctx;
    const Model *M = st->M;
    const int B = st->B, C = M->C, nb = C / 32;
    for (int b = ith; b < B; b += nth) { /* the embedding's Q8_0 rows */
        const int8_t *e = M->emb_q + (size_t)st->tokens[b] * C;
        const half *d = M->emb_d + (size_t)st->tokens[b] * nb;
        for (int i = 0; i < C; i++) st->x[(size_t)b * C + i] = h2f(d[i / 32]) * (float)e[i];
    }
    /* each layer starts with row-wise work on the rows this thread finished last */
    for (int l = 0; l < M->L; l++) layer_step(st, &M->layers[l], l, ith, nth);
    for (int b = ith; b < B; b += nth)
        rmsnorm(st->x + (size_t)b * C, M->norm_f, st->h + (size_t)b * C, C, M->eps);
    quantize_share(st, st->h, C, ith, nth);
    q->pool_barrier(nth);
    int n0, n1;
    q->pool_share(M->V, ith, nth, &n0, &n1);
    if (n0 < n1)
        q->q8_rows(st->path, M->head_q, M->head_d, st->xq, st->xd, st->xs, st->logits, M->V, C,
                   B, n0, n1);
}

/* ------------------------------------------------------------------------------------------
 * Python entry points. The pointers come from keenlm.infer.engine, which checks every tensor's
 * shape, type and contiguity first and keeps the tensors alive as long as the model. */
#define CAPSULE "keenlm.infer._step.Model"

static void free_model(PyObject *cap) {
    Model *M = PyCapsule_GetPointer(cap, CAPSULE);
    if (M) {
        free(M->layers);
        free(M);
    }
}

static const void *ptr_at(const uint64_t *p, int i) { return (const void *)(uintptr_t)p[i]; }

/* new_model(ptrs, n_ptrs, kinds, L, C, H, Hk, D, F, V, rope_len, eps, rank): ptrs holds, per
 * layer, qkv, o, gate_up, down as (codes, scales, offsets; 0 for TQ2_0) and the two norm
 * weights (14 pointers), then the embedding (codes, scales), the head (codes, scales), the
 * final norm and the rotary tables; with rank > 0, then per layer the LoRA (A, scaled B) of
 * qkv, o, gate_up, down (8 pointers: A (3r, C), B (NQKV, r), A (r, H D), B (C, r), A (2r, C),
 * B (2F, r), A (r, F), B (C, r), fp32); kinds (int32, 4 per layer) each projection's format
 * (FMT_Q4, FMT_T2). */
static PyObject *new_model(PyObject *self, PyObject *args) {
    unsigned long long pp, pk;
    int n, L, C, H, Hk, D, F, V, rope_len, rank;
    float eps;
    if (!PyArg_ParseTuple(args, "KiKiiiiiiiifi", &pp, &n, &pk, &L, &C, &H, &Hk, &D, &F, &V,
                          &rope_len, &eps, &rank))
        return NULL;
    if (L < 1 || C < 32 || C % 32 || H < 1 || Hk < 1 || H % Hk || D < 2 || D % 2
        || (H * D) % 32 || F < 32 || F % 32 || V < 1 || rope_len < 1 || rank < 0
        || n != PTRS_GLOBAL + PTRS_PER_LAYER * L + (rank ? LORA_PTRS_PER_LAYER * L : 0)) {
        PyErr_Format(PyExc_ValueError, "new_model: L=%d C=%d H=%d Hk=%d D=%d F=%d V=%d with %d "
                     "pointers do not describe a model this step runs", L, C, H, Hk, D, F, V, n);
        return NULL;
    }
    const uint64_t *p = (const uint64_t *)(uintptr_t)pp;
    const int32_t *kinds = (const int32_t *)(uintptr_t)pk;
    const int width[4] = {C, H * D, C, F}; /* each projection's input width */
    for (int i = 0; i < n; i++) {
        const int l = i / PTRS_PER_LAYER, k = i % PTRS_PER_LAYER;
        const int kind = i < PTRS_PER_LAYER * L && k < 12 ? kinds[4 * l + k / 3] : FMT_Q4;
        if (i >= PTRS_PER_LAYER * L + PTRS_GLOBAL) { /* the adapters: never null */
            if (!p[i]) {
                PyErr_Format(PyExc_ValueError, "new_model: LoRA pointer %d is null", i);
                return NULL;
            }
            continue;
        }
        if (i < PTRS_PER_LAYER * L && k < 12
            && !(kind == FMT_Q4 || (kind == FMT_T2 && width[k / 3] % 256 == 0))) {
            PyErr_Format(PyExc_ValueError, "new_model: layer %d projection %d has format %d "
                         "(Q4, or TQ2_0 with a width that is a multiple of 256)", l, k / 3, kind);
            return NULL;
        }
        if (!p[i] && !(kind == FMT_T2 && k % 3 == 2)) {
            PyErr_Format(PyExc_ValueError, "new_model: pointer %d is null", i);
            return NULL;
        }
    }
    Model *M = calloc(1, sizeof(Model));
    Layer *ls = calloc((size_t)L, sizeof(Layer));
    if (!M || !ls) {
        free(M); free(ls);
        return PyErr_NoMemory();
    }
    *M = (Model){L, C, H, Hk, D, F, V, rope_len, rank, eps};
    for (int l = 0; l < L; l++) {
        const uint64_t *lp = p + PTRS_PER_LAYER * l;
        W *w[4] = {&ls[l].qkv, &ls[l].o, &ls[l].gu, &ls[l].down};
        for (int k = 0; k < 4; k++)
            *w[k] = (W){kinds[4 * l + k], ptr_at(lp, 3 * k), ptr_at(lp, 3 * k + 1),
                        ptr_at(lp, 3 * k + 2)};
        ls[l].norm_in = ptr_at(lp, 12);
        ls[l].norm_post = ptr_at(lp, 13);
    }
    const uint64_t *g = p + PTRS_PER_LAYER * L;
    M->emb_q = ptr_at(g, 0); M->emb_d = ptr_at(g, 1);
    M->head_q = ptr_at(g, 2); M->head_d = ptr_at(g, 3);
    M->norm_f = ptr_at(g, 4); M->rope_cos = ptr_at(g, 5); M->rope_sin = ptr_at(g, 6);
    for (int l = 0; l < L && rank; l++) {
        const uint64_t *lp = g + PTRS_GLOBAL + LORA_PTRS_PER_LAYER * l;
        for (int k = 0; k < 4; k++) {
            ls[l].la[k] = ptr_at(lp, 2 * k);
            ls[l].lb[k] = ptr_at(lp, 2 * k + 1);
        }
    }
    M->layers = ls;
    PyObject *cap = PyCapsule_New(M, CAPSULE, free_model);
    if (!cap) {
        free(ls); free(M);
    }
    return cap;
}

/* step(model, tokens, pos, len, slot, mask, mask_stride, B, kc, vc, R, S, logits, threads,
 * path): tokens, pos (rotary), len, slot int64 (B); mask uint8 (B, mask_stride), 1 = visible;
 * kc, vc float (L, R, Hk, S, D); logits float (B, V) out. Row b writes cache row slot[b] at
 * position len[b] and attends to its positions 0..len[b] that its mask allows: rows of one
 * step may be at different lengths (continuous batching) and use any distinct cache rows. */
static PyObject *step(PyObject *self, PyObject *args) {
    PyObject *cap;
    unsigned long long ptok, ppos, plen, pslot, pmask, pk, pv, plog;
    long long stride;
    int B, R, S, threads, path;
    if (!PyArg_ParseTuple(args, "OKKKKKLiKKiiKii", &cap, &ptok, &ppos, &plen, &pslot, &pmask,
                          &stride, &B, &pk, &pv, &R, &S, &plog, &threads, &path))
        return NULL;
    const Model *M = PyCapsule_GetPointer(cap, CAPSULE);
    if (!M) return NULL;
    if (B < 1 || B > MAX_ROWS || R < B || S < 1) {
        PyErr_Format(PyExc_ValueError, "step: B=%d rows (1..%d) in a cache of %d rows and %d "
                     "positions", B, MAX_ROWS, R, S);
        return NULL;
    }
    const int64_t *len = (const int64_t *)(uintptr_t)plen, *slot = (const int64_t *)(uintptr_t)pslot;
    int tmax = 0;
    for (int b = 0; b < B; b++) {
        if (len[b] < 0 || len[b] >= S || stride < len[b] + 1 || slot[b] < 0 || slot[b] >= R) {
            PyErr_Format(PyExc_ValueError, "step: row %d at position %lld of cache row %lld (a "
                         "cache of %d rows, %d positions; mask width %lld)", b,
                         (long long)len[b], (long long)slot[b], R, S, stride);
            return NULL;
        }
        for (int c = 0; c < b; c++)
            if (slot[c] == slot[b]) {
                PyErr_Format(PyExc_ValueError, "step: rows %d and %d share cache row %lld", c,
                             b, (long long)slot[b]);
                return NULL;
            }
        tmax = len[b] > tmax ? (int)len[b] : tmax;
    }
    if (path == PATH_AUTO) path = q->cpu_path();
    if (path < PATH_SCALAR || path > q->cpu_path()) {
        PyErr_Format(PyExc_ValueError, "step: path %d is not available on this CPU", path);
        return NULL;
    }
    Step st = {M, (const int64_t *)(uintptr_t)ptok, (const int64_t *)(uintptr_t)ppos, len, slot,
               (const uint8_t *)(uintptr_t)pmask, stride, B, R, S, tmax, path,
               (float *)(uintptr_t)pk, (float *)(uintptr_t)pv, (float *)(uintptr_t)plog};
    for (int b = 0; b < B; b++)
        if (st.tokens[b] < 0 || st.tokens[b] >= M->V || st.pos[b] < 0
            || st.pos[b] >= M->rope_len) {
            PyErr_Format(PyExc_ValueError, "step: row %d has token %lld (vocabulary %d) at "
                         "position %lld (rotary table %d)", b, (long long)st.tokens[b], M->V,
                         (long long)st.pos[b], M->rope_len);
            return NULL;
        }
    const int HD = M->H * M->D, NQKV = (M->H + 2 * M->Hk) * M->D;
    int kmax = M->C > HD ? M->C : HD;
    kmax = kmax > M->F ? kmax : M->F;
    threads = threads < 1 ? 1 : threads > QDOT_MAX_THREADS ? QDOT_MAX_THREADS : threads;
    const size_t floats = (size_t)B * (3 * M->C + NQKV + HD + 3 * M->F + 2 * (kmax / 32)
                                       + 3 * M->rank)
                          + (size_t)threads * (M->H / M->Hk) * (tmax + 1);
    float *buf = malloc(sizeof(float) * floats);
    int8_t *xq = malloc((size_t)B * kmax);
    if (!buf || !xq) {
        free(buf); free(xq);
        return PyErr_NoMemory();
    }
    float *f = buf;
    st.x = f; f += (size_t)B * M->C;
    st.h = f; f += (size_t)B * M->C;
    st.o = f; f += (size_t)B * M->C;
    st.qkv = f; f += (size_t)B * NQKV;
    st.att = f; f += (size_t)B * HD;
    st.gu = f; f += (size_t)B * 2 * M->F;
    st.act = f; f += (size_t)B * M->F;
    st.xd = f; f += (size_t)B * (kmax / 32);
    st.xs = f; f += (size_t)B * (kmax / 32);
    st.t = f; f += (size_t)B * 3 * M->rank;
    st.p = f;
    st.xq = xq;
    Py_BEGIN_ALLOW_THREADS
    q->pool_run(step_job, &st, threads);
    Py_END_ALLOW_THREADS
    free(buf);
    free(xq);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"new_model", new_model, METH_VARARGS, "a model description for step (see keenlm.infer.engine)"},
    {"step", step, METH_VARARGS, "one decode step: logits of the next token of B rows"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_step", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__step(void) {
    q = PyCapsule_Import("keenlm.quant._qdot._C_API", 0);
    if (!q) return NULL;
    if (q->version != QDOT_API_VERSION) {
        PyErr_Format(PyExc_ImportError, "keenlm.infer._step was built against kernel API %d, "
                     "keenlm.quant._qdot has %d: reinstall keenlm", QDOT_API_VERSION, q->version);
        return NULL;
    }
    return PyModule_Create(&module);
}
