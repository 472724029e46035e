/*
 * block_step.c: one transformer block for a step of one new token per sequence (the decoding loop),
 * in place on the residual stream x [B, dim]:
 *     x += wo . attention(rope(q), cache)      with q, k, v = wqkv . rmsnorm(x), k/v stored first
 *     x += w2 . (silu(g) * u)                  with g, u = w13 . rmsnorm(x)
 * or, for a Mixtral block (E > 0), the feed-forward as the sum over the row's top K of E experts of
 *     softmax(top-K router logits)[k] * w2[e] . (silu(w1[e] . xn) * w3[e] . xn),  xn = rmsnorm(x)
 * added in increasing expert order, as model/moe.py sums them (the router runs in float32, the
 * experts are packed stacks indexed by expert, so only the chosen experts' rows are read).
 * the same arithmetic as model/transformer.py (RMSNorm in float32, RoPE on interleaved pairs, softmax
 * attention over the visible cache slots, SwiGLU), with the projections as packed matmuls (matmul.c)
 * and the attention and SwiGLU inner loops from the instruction set's table. Rows whose position is -1
 * (padding) write nothing to the cache and get no attention output.
 * Also owns the extent each of the step's buffers must have (tram_block_extents), which the binding
 * checks before any pointer is followed.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

const char *const tram_block_buffer_names[BUF_COUNT] = {
    [BUF_X] = "x", [BUF_NORM1] = "attn_norm", [BUF_NORM2] = "ffn_norm", [BUF_WQKV] = "wqkv",
    [BUF_WO] = "wo", [BUF_W13] = "w13", [BUF_W2] = "w2", [BUF_CS] = "cos_sin", [BUF_KC] = "k_cache",
    [BUF_VC] = "v_cache", [BUF_KPOS] = "kpos", [BUF_QPOS] = "qpos", [BUF_GATE] = "gate", [BUF_W1E] = "w1e",
    [BUF_W3E] = "w3e",
};

int tram_block_extents(const block_args *a, size_t need[BUF_COUNT]) {
    const long B = a->B, H = a->H, Hkv = a->Hkv, D = a->D;
    long HD, rows;
    if (__builtin_mul_overflow(H, D, &HD) || __builtin_mul_overflow(H + 2 * Hkv, D, &rows)) return -1;
    int bad = tram_extent(&need[BUF_X], 4, B, a->dim, 1, 1);
    bad |= tram_extent(&need[BUF_NORM1], 4, a->dim, 1, 1, 1) | tram_extent(&need[BUF_NORM2], 4, a->dim, 1, 1, 1);
    bad |= tram_packed_extent(&need[BUF_WQKV], a->tqkv, rows, a->dim);
    bad |= tram_packed_extent(&need[BUF_WO], a->to, a->dim, HD);
    const long E = a->E, moe = E > 0;
    bad |= tram_packed_extent(&need[BUF_W13], a->t13, moe ? 0 : 2 * a->F, a->dim);
    bad |= tram_packed_extent(&need[BUF_W2], a->t2, moe ? E * a->dim : a->dim, a->F);  /* (E <= INT_MAX) */
    bad |= tram_extent(&need[BUF_GATE], 4, E, a->dim, 1, 1);
    bad |= tram_packed_extent(&need[BUF_W1E], a->t1e, E * a->F, a->dim);
    bad |= tram_packed_extent(&need[BUF_W3E], a->t3e, E * a->F, a->dim);
    bad |= tram_extent(&need[BUF_CS], 4, B, D / 2, 2, 1);
    bad |= tram_extent(&need[BUF_KC], 4, B, Hkv, a->S, D) | tram_extent(&need[BUF_VC], 4, B, Hkv, a->S, D);
    bad |= tram_extent(&need[BUF_KPOS], 8, B, a->S, 1, 1) | tram_extent(&need[BUF_QPOS], 8, B, 1, 1, 1);
    return bad ? -1 : 0;
}

static void rms_norm_rows(const float *x, const float *w, float eps, long B, long n, float *out) {
    for (long b = 0; b < B; b++) {
        const float *xr = x + b * n;
        float ss = 0.0f;
        for (long i = 0; i < n; i++) ss += xr[i] * xr[i];
        float r = 1.0f / sqrtf(ss / (float)n + eps);
        for (long i = 0; i < n; i++) out[b * n + i] = xr[i] * r * w[i];
    }
}

/* Rotate the n heads of D at p by the row's cos, sin pairs cs [D/2, 2] (interleaved pairs). */
static void rope_heads(float *p, long n, long D, const float *cs) {
    const long half = D / 2;
    for (long h = 0; h < n; h++)
        for (long i = 0; i < half; i++) {
            float *e = p + h * D + 2 * i, x0 = e[0], x1 = e[1], c = cs[2 * i], s = cs[2 * i + 1];
            e[0] = x0 * c - x1 * s;
            e[1] = x0 * s + x1 * c;
        }
}

/* Rotate q and k heads of each row and store k, v in the row's cache slot. */
static void rope_and_store(const block_args *a, float *qkv) {
    const long D = a->D, width = (a->H + 2 * a->Hkv) * D;
    for (long b = 0; b < a->B; b++) {
        if (a->qpos[b] < 0) continue;
        float *row = qkv + b * width;
        rope_heads(row, a->H + a->Hkv, D, a->cs + b * D);
        const long slot = a->qpos[b] % a->S;
        for (long g = 0; g < a->Hkv; g++) {
            size_t at = (((size_t)b * a->Hkv + g) * a->S + slot) * D;
            memcpy(a->kc + at, row + (a->H + g) * D, sizeof(float) * D);
            memcpy(a->vc + at, row + (a->H + a->Hkv + g) * D, sizeof(float) * D);
        }
    }
}

/* att [B, H, D]: each query head over its kv head's cache (B * H items over the threads). */
static void attend_rows(const isa_ops *ops, const block_args *a, const float *qkv, float *att, float *sc) {
    const long D = a->D, width = (a->H + 2 * a->Hkv) * D, items = a->B * a->H, group = a->H / a->Hkv;
    const float scale = 1.0f / sqrtf((float)D);
    int nth = a->threads < items ? a->threads : (int)items;
    if ((long)a->S * D * items < 32768) nth = 1;
    (void)nth;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(static)
#endif
    for (long it = 0; it < items; it++) {
        const long b = it / a->H, h = it % a->H, g = h / group;
        float *out = att + it * D;
        if (a->qpos[b] < 0) {
            memset(out, 0, sizeof(float) * D);
            continue;
        }
        const size_t base = ((size_t)b * a->Hkv + g) * a->S * D;
        ops->attend(qkv + b * width + h * D, a->kc + base, a->vc + base, a->S, D, a->kpos + b * a->S,
                    a->qpos[b], a->window, scale, sc + it * a->S, out);
    }
}

static void add_rows(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] += y[i];
}

/* Scratch of one step, carved from one allocation. */
typedef struct {
    float *xn, *qkv, *att, *h13, *gu, *y, *sc;  /* [B,dim] [B,width] [B,HD] [B,2F] [B,F] [B,dim] [B,H,S] */
    float *logits, *acc;                        /* Mixtral: [B,E] router logits, [dim] experts' sum */
} scratch;

/* Returns 0, or -1 when out of memory. */
static int attention_half(const isa_ops *ops, const block_args *a, const scratch *s) {
    const long B = a->B, dim = a->dim, HD = a->H * a->D, width = (a->H + 2 * a->Hkv) * a->D;
    int rc = 0;
    rms_norm_rows(a->x, a->norm1, a->eps, B, dim, s->xn);
    rc |= tram_matmul(ops, s->xn, a->wqkv, s->qkv, B, width, dim, a->tqkv, a->threads);
    rope_and_store(a, s->qkv);
    attend_rows(ops, a, s->qkv, s->att, s->sc);
    rc |= tram_matmul(ops, s->att, a->wo, s->y, B, dim, HD, a->to, a->threads);
    add_rows(a->x, s->y, B * dim);
    return rc;
}

static int ffn_half(const isa_ops *ops, const block_args *a, const scratch *s) {
    const long B = a->B, dim = a->dim, F = a->F;
    int rc = 0;
    rms_norm_rows(a->x, a->norm2, a->eps, B, dim, s->xn);
    rc |= tram_matmul(ops, s->xn, a->w13, s->h13, B, 2 * F, dim, a->t13, a->threads);
    for (long b = 0; b < B; b++) ops->silu_mul(s->h13 + b * 2 * F, s->h13 + b * 2 * F + F, s->gu + b * F, F);
    rc |= tram_matmul(ops, s->gu, a->w2, s->y, B, dim, F, a->t2, a->threads);
    add_rows(a->x, s->y, B * dim);
    return rc;
}

/* The K largest of E logits (ties: the lower index first), then sorted by expert id; weights are their
 * softmax over the K, in float32. */
static void route(const float *logits, long E, long K, long *experts, float *weights) {
    for (long k = 0; k < K; k++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long j = 0; j < k && !taken; j++) taken = experts[j] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        experts[k] = best;
    }
    float top = logits[experts[0]], sum = 0.0f;  /* experts[0] holds the largest */
    for (long k = 0; k < K; k++) sum += weights[k] = expf(logits[experts[k]] - top);
    for (long k = 0; k < K; k++) weights[k] /= sum;
    for (long k = 1; k < K; k++)  /* insertion sort by expert id, weights alongside (K is small) */
        for (long j = k; j > 0 && experts[j] < experts[j - 1]; j--) {
            long e = experts[j];
            float w = weights[j];
            experts[j] = experts[j - 1], weights[j] = weights[j - 1];
            experts[j - 1] = e, weights[j - 1] = w;
        }
}

/* One row's chosen experts, weighted and summed into s->acc; returns 0, or -1 when out of memory. */
static int experts_of_row(const isa_ops *ops, const block_args *a, const scratch *s, const float *xn,
                          const long *experts, const float *weights) {
    const long dim = a->dim, F = a->F;
    size_t rb1 = 0, rb3 = 0, rb2 = 0;
    tram_packed_extent(&rb1, a->t1e, F, dim);  /* bytes of one expert's matrix (checked by the extents) */
    tram_packed_extent(&rb3, a->t3e, F, dim);
    tram_packed_extent(&rb2, a->t2, dim, F);
    int rc = 0;
    memset(s->acc, 0, sizeof(float) * dim);
    for (long k = 0; k < a->K; k++) {
        const size_t e = (size_t)experts[k];
        rc |= tram_matmul(ops, xn, a->w1e + e * rb1, s->h13, 1, F, dim, a->t1e, a->threads);
        rc |= tram_matmul(ops, xn, a->w3e + e * rb3, s->h13 + F, 1, F, dim, a->t3e, a->threads);
        ops->silu_mul(s->h13, s->h13 + F, s->gu, F);
        rc |= tram_matmul(ops, s->gu, a->w2 + e * rb2, s->y, 1, dim, F, a->t2, a->threads);
        for (long i = 0; i < dim; i++) s->acc[i] += s->y[i] * weights[k];
    }
    return rc;
}

static int moe_half(const isa_ops *ops, const block_args *a, const scratch *s) {
    const long B = a->B, dim = a->dim, E = a->E, K = a->K;
    long experts[64];  /* K <= 64: checked by the binding */
    float weights[64];
    int rc = 0;
    rms_norm_rows(a->x, a->norm2, a->eps, B, dim, s->xn);
    rc |= tram_matmul(ops, s->xn, (const uint8_t *)a->gate, s->logits, B, E, dim, 0, a->threads);  /* F32 */
    for (long b = 0; b < B && !rc; b++) {
        if (a->qpos[b] < 0) continue;  /* padding: nothing reads this row */
        route(s->logits + b * E, E, K, experts, weights);
        rc |= experts_of_row(ops, a, s, s->xn + b * dim, experts, weights);
        add_rows(a->x + b * dim, s->acc, dim);
    }
    return rc;
}

int tram_run_block(const isa_ops *ops, const block_args *a) {
    const long B = a->B, dim = a->dim, HD = a->H * a->D, width = (a->H + 2 * a->Hkv) * a->D, F = a->F;
    size_t floats = (size_t)B * (dim + width + HD + 3 * F + dim) + (size_t)B * a->H * a->S;
    floats += (size_t)B * a->E + (size_t)dim;
    float *buf = malloc(sizeof(float) * floats);
    if (!buf) return -1;
    scratch s;
    s.xn = buf;
    s.qkv = s.xn + B * dim;
    s.att = s.qkv + B * width;
    s.h13 = s.att + B * HD;
    s.gu = s.h13 + B * 2 * F;
    s.y = s.gu + B * F;
    s.sc = s.y + B * dim;
    s.logits = s.sc + B * a->H * a->S;
    s.acc = s.logits + B * a->E;
    int rc = attention_half(ops, a, &s);
    rc |= a->E > 0 ? moe_half(ops, a, &s) : ffn_half(ops, a, &s);
    free(buf);
    return rc ? -1 : 0;
}
