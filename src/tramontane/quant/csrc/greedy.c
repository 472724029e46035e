/*
 * greedy.c: greedy decoding's tokens from a Q8_0 head (interleaved, T_Q8_0_R8: SmolLM2's tied
 * embeddings, the Q8_0 output layers of GGUF files) without computing every logit as the matmul does.
 * Written here because no library computes an argmax under a proven bound on a quantized matmul.
 *
 * Under q16 (matmul.c) a logit L is the sum over blocks b of d_b dx_b / 256 dot(w_b, 256 q1_b + q2_b):
 * x's rounding to int8 (q1, scale dx) and what it left (q2, |q2| <= 128, at dx / 256). A first pass takes
 * q1 alone (the bound kernel, simd_q8.inc): P = sum_b d_b dx_b dot(w_b, q1_b), half the products, and
 * |L - P| <= E = sum_b A_b dx_b / 2 with A_b = |d_b| sum|w_b|. The largest L of a row is at least the
 * largest P - E (lo), so a logit with P + E < lo is not the largest, and only the groups of 8 rows that
 * reach lo are computed as the matmul computes them (its own kernel at one q16 pair: the same bits as
 * every other row count, matmul.c). Among those exact logits the first of the largest is the token:
 * exactly the argmax of the matmul's logits (numpy's rule); with a logit bias every row shares (a served
 * benchmark's banned tokens), of the logits plus the bias (row_token). SmolLM2's hidden states of 200
 * decoding steps left 2 groups to compute in the median row, 32 at most, of 6144.
 *
 * Rounding: P and L are both sums of at most nb + 1 float roundings of terms whose magnitudes add to at
 * most 128 sum_b A_b dx_b (|q1 + q2 / 256| <= 127.5), and P +- E round once more, so E is widened by
 * (nb + 16) 2^-15 of sum_b A_b dx_b (2 * 128 * (nb + 8) * 2^-24, with room). A row whose scales could
 * make subnormal products (0 < dx < 2^-60) or overflow (dx > 1e30), or whose bounds are not finite
 * numbers below 1e30 (an infinite or NaN scale in the head), takes every logit and the instruction
 * set's argmax; a call with a NaN or an infinity in x is left to the matmul (rounded_alike).
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define GREEDY_ROWS 16 /* q16 pairs one bound pass takes (its accumulators in registers) */

static float bound_scale(long nb) { return 0.5f + (float)(nb + 16) * 0x1p-15f; }

/* Whether the bound holds at row scales d[0..nb): each finite, and zero or at least 2^-60. */
static int scales_fine(const float *d, long nb) {
    for (long i = 0; i < nb; i++)
        if (!(d[i] == 0.0f || (d[i] >= 0x1p-60f && d[i] <= 1e30f))) return 0;
    return 1;
}

/* Whether x rounded as every kernel meets it alike: finite scales and no quant of -128. A NaN or an
 * infinity in x rounds to -128 (or to an infinite scale), which the one-row kernel meets unlike the
 * matmul's many-row one (vpsignb cannot negate -128): their logits may then differ, so such a call is
 * left to the matmul. Finite x rounds to -127..127. */
static int rounded_alike(const q8_rows *xq, long M, long K) {
    const long nb = K / 32;
    for (long r = 0; r < 2 * M; r++) {
        for (long i = 0; i < nb; i++)
            if (!isfinite(xq->d[r * nb + i])) return 0;
        for (long k = 0; k < K; k++)
            if (xq->q[r * xq->ld + k] == -128) return 0;
    }
    return 1;
}

/* The q16 pairs of rows [m0, m0 + ...) of xq (a view). */
static q8_rows rows_from(const q8_rows *xq, long m0, long K) {
    const long nb = K / 32;
    return (q8_rows){xq->q + 2 * m0 * xq->ld, xq->ld, xq->d + 2 * m0 * nb, xq->bs + 2 * m0 * (K / 16), 1, NULL, NULL};
}

/* One row's search for its token among the exact logits (plus the bias) of the groups it computes. */
typedef struct {
    const isa_ops *ops;
    const uint8_t *w;
    size_t rb;
    long K;
    const q8_rows *xr;
    const tram_bias *bias;
    float *y;        /* room for the row's N logits (its fallback), its first 8 a group's */
    uint8_t *done;   /* the groups computed */
    int64_t best;    /* the first index of the largest so far (-1: none) */
    float top;
} row_search;

/* Group g's logits as the matmul computes them, each biased token's with its bias added (float32 sums,
 * as apply_logit_bias), into the search; the lowest index wins a tie whatever the order of groups. */
static void visit(row_search *s, long g) {
    if (s->done[g]) return;
    s->done[g] = 1;
    s->ops->fused_q8[T_Q8_0_R8](s->w + (size_t)8 * g * s->rb, s->rb, 8, s->xr, NULL, 2, s->K, s->y, 8);
    for (long b = 0; b < s->bias->n; b++)
        if (s->bias->ids[b] / 8 == g) s->y[s->bias->ids[b] % 8] += s->bias->vals[b];
    for (int r = 0; r < 8; r++)
        if (s->best < 0 || s->y[r] > s->top || (s->y[r] == s->top && 8 * g + r < s->best))
            s->best = 8 * g + r, s->top = s->y[r];
}

/* Row xr's token (s: its search, nothing done), from its groups' bounds ghi and its largest P - E (lo):
 * every group whose bound reaches the largest logit known so far, which starts at lo; with a bias (lo
 * may be a lowered token's), at the exact logits of the group of the largest bound and of every raised
 * token's group (a raised token's bound does not hold its bias; a lowered one's still bounds it). A
 * bad row computes every logit. */
static int64_t row_token(row_search *s, long N, const float *ghi, float lo, int bad) {
    const long G = N / 8;
    if (bad) {
        s->ops->fused_q8[T_Q8_0_R8](s->w, s->rb, N, s->xr, NULL, 2, s->K, s->y, N);
        for (long b = 0; b < s->bias->n; b++) s->y[s->bias->ids[b]] += s->bias->vals[b];
        return s->ops->argmax(s->y, N);
    }
    if (s->bias->n) {  /* lo may be a lowered token's: the floor is an exact logit */
        long first = 0;
        for (long g = 1; g < G; g++) first = ghi[g] > ghi[first] ? g : first;
        visit(s, first);
        for (long b = 0; b < s->bias->n; b++)
            if (s->bias->vals[b] > 0.0f) visit(s, s->bias->ids[b] / 8);
        lo = s->top;
    }
    for (long g = 0; g < G; g++)
        if (ghi[g] >= (s->best >= 0 && s->top > lo ? s->top : lo)) visit(s, g);
    return s->best;
}

typedef struct {
    uint8_t *xu, *bad, *done;
    float *dx, *ghi, *lo, *ab, *y;
} greedy_mem;

static void greedy_free(greedy_mem *g) {
    free(g->xu), free(g->bad), free(g->done), free(g->dx), free(g->ghi), free(g->lo), free(g->ab), free(g->y);
}

static int greedy_alloc(greedy_mem *g, long M, long N, long K, int nth) {
    const long nb = K / 32;
    g->xu = malloc((size_t)(M * K));
    g->bad = calloc((size_t)(M * nth), 1);
    g->dx = malloc(sizeof(float) * (size_t)(M * nb));
    g->ghi = malloc(sizeof(float) * (size_t)(M * (N / 8)));
    g->lo = malloc(sizeof(float) * (size_t)(M * nth));
    g->ab = malloc(sizeof(float) * 16 * (size_t)(nb * nth));
    g->y = malloc(sizeof(float) * (size_t)(N * nth));
    g->done = malloc((size_t)(N / 8 * nth));
    if (g->xu && g->bad && g->done && g->dx && g->ghi && g->lo && g->ab && g->y) return 0;
    greedy_free(g);
    return -1;
}

/* xu and dx from the q16 pairs' first rows; lo at -inf. */
static void greedy_inputs(const q8_rows *xq, long M, long K, int nth, greedy_mem *g) {
    const long nb = K / 32;
    for (long m = 0; m < M; m++) {
        const int8_t *q = xq->q + 2 * m * xq->ld;
        for (long k = 0; k < K; k++) g->xu[m * K + k] = (uint8_t)(q[k] ^ 0x80);
        for (long i = 0; i < nb; i++) g->dx[m * nb + i] = xq->d[2 * m * nb + i];
    }
    for (long i = 0; i < M * nth; i++) g->lo[i] = -INFINITY;
}

/* Thread t's share of the bound pass: pairs of groups [p0, p1), every row. */
static void bound_share(const isa_ops *ops, const uint8_t *w, size_t rb, long M, long N, long K, long p0, long p1,
                        int t, const greedy_mem *g) {
    const long nb = K / 32, G = N / 8;
    for (long m0 = 0; m0 < M && p0 < p1; m0 += GREEDY_ROWS) {
        const long mm = M - m0 < GREEDY_ROWS ? M - m0 : GREEDY_ROWS;
        ops->bound_q8r8(w + (size_t)16 * p0 * rb, rb, 16 * (p1 - p0), g->xu + m0 * K, g->dx + m0 * nb, mm, K,
                        bound_scale(nb), g->ab + 16 * nb * t, g->ghi + m0 * G + 2 * p0, G, g->lo + t * M + m0,
                        g->bad + t * M + m0);
    }
}

/* Thread t's rows' tokens, once every share of the bound pass is in. */
static void tokens_share(const isa_ops *ops, const uint8_t *w, size_t rb, const q8_rows *xq, long M, long N, long K,
                         const tram_bias *bias, int t, int nt, const greedy_mem *g, int64_t *out) {
    const long G = N / 8;
    for (long m = t; m < M; m += nt) {
        float lo = -INFINITY;
        int bad = !scales_fine(xq->d + 2 * m * (K / 32), K / 32);
        for (int s = 0; s < nt; s++) {
            lo = g->lo[s * M + m] > lo ? g->lo[s * M + m] : lo;
            bad |= g->bad[s * M + m];
        }
        if (G % 2) g->ghi[m * G + G - 1] = INFINITY; /* a last group without its pair: computed */
        const q8_rows xr = rows_from(xq, m, K);
        row_search s = {ops, w, rb, K, &xr, bias, g->y + N * t, g->done + G * t, -1, 0.0f};
        memset(s.done, 0, (size_t)G);
        out[m] = row_token(&s, N, g->ghi + m * G, lo, bad);
    }
}

int tram_greedy_rows(const isa_ops *ops, const float *x, const uint8_t *w, long M, long N, long K, int qtype,
                     const tram_bias *bias, int n_threads, int64_t *out) {
    if (!ops->bound_q8r8 || !ops->fused_q8[T_Q8_0_R8] || qtype != T_Q8_0_R8 || tram_q8() != 2 || K % 32 || N % 8 ||
        M < 1)
        return 1;
    const long pairs = N / 16;
    const size_t rb = tram_row_bytes(qtype, K);
    int nth = n_threads < 1 ? 1 : n_threads;
    if (nth > pairs) nth = pairs > 0 ? (int)pairs : 1;
    q8_rows xq;
    void *rows;
    greedy_mem g;
    if (tram_q16_rows(ops, x, M, K, &xq, &rows)) return -1;
    if (!rounded_alike(&xq, M, K)) {
        free(rows);
        return 1;
    }
    if (greedy_alloc(&g, M, N, K, nth)) {
        free(rows);
        return -1;
    }
    greedy_inputs(&xq, M, K, nth, &g);
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int t, nt;
        tram_team(&t, &nt);
        const long p0 = pairs * t / nt, p1 = pairs * (t + 1) / nt;
        bound_share(ops, w, rb, M, N, K, p0, p1, t, &g);
#ifdef _OPENMP
#pragma omp barrier
#endif
        tokens_share(ops, w, rb, &xq, M, N, K, bias, t, nt, &g, out);
    }
    greedy_free(&g);
    free(rows);
    return 0;
}
