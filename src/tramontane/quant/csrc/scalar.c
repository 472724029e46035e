/*
 * scalar.c: the portable instruction set ("scalar"): a tiled matmul that decodes KC elements of one
 * row at a time (blocks.c's decoders) and dots them with every activation row, the attention of one
 * head over a block of its cache rows, and SwiGLU's silu(g) * u, all in plain C. No fused small-M kernels here:
 * every M takes the tiled path.
 */
#include <math.h>

#include "kernels.h"

static float dot_c(const float *a, const float *b, long n) {
    float s[8] = {0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

static void tile_c(dec_fn dec, int bs, int ts, const uint8_t *w, size_t rb, long n0, long n1,
                   const float *x, long M, long K, float *y, long N) {
    float buf[KC];
    for (long n = n0; n < n1; n++) {
        const uint8_t *row = w + (size_t)n * rb;
        for (long m = 0; m < M; m++) y[m * N + n] = 0.0f;
        for (long kc = 0; kc < K; kc += KC) {
            long kcl = K - kc < KC ? K - kc : KC;
            dec(row + (size_t)(kc / bs) * ts, (int)(kcl / bs), buf);
            for (long m = 0; m < M; m++) y[m * N + n] += dot_c(buf, x + m * K + kc, kcl);
        }
    }
}

/* One query over one block of n keys, folded into its running (max, sum) ml and out (kernels.h). */
static void attend_one_c(const float *q, const float *k, const float *v, const size_t *off, long n, long D,
                         float scale, float *sc, float *ml, float *out) {
    if (n == 0) return;
    float mx = ml[0], sum = 0.0f;
    for (long i = 0; i < n; i++) {
        sc[i] = dot_c(q, k + off[i], D) * scale;
        if (sc[i] > mx) mx = sc[i];
    }
    const int first = ml[0] == -INFINITY;
    const float rescale = first ? 0.0f : expf(ml[0] - mx);
    for (long d = 0; d < D; d++) out[d] = first ? 0.0f : out[d] * rescale;
    for (long i = 0; i < n; i++) {
        float p = expf(sc[i] - mx);
        sum += p;
        for (long d = 0; d < D; d++) out[d] += p * v[off[i] + d];
    }
    ml[0] = mx;
    ml[1] = ml[1] * rescale + sum;
}

static void attend_c(const float *const *q, float *const *out, long nq, const long *n, const float *k,
                     const float *v, const size_t *off, long D, float scale, float *sc, float *ml, tram_pf *pf) {
    for (long j = 0; j < nq; j++) {
        attend_one_c(q[j], k, v, off, n[j], D, scale, sc + j * ATT_KB, ml + 2 * j, out[j]);
        tram_pf_step(pf, PF_ROWS * ((n[j] + 7) / 8));
    }
}

static void silu_mul_c(const float *g, const float *u, float *out, long n) {
    for (long i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static long argmax_c(const float *x, long n) {
    long best = 0;
    for (long i = 0; i < n; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}

const isa_ops tram_ops_scalar = {
    "scalar",
    {[T_F32] = tram_dec_f32_c, [T_F16] = tram_dec_f16_c, [T_BF16] = tram_dec_bf16_c,
     [T_Q4_0] = tram_dec_q4_0_c, [T_Q4_1] = tram_dec_q4_1_c, [T_Q5_0] = tram_dec_q5_0_c,
     [T_Q5_1] = tram_dec_q5_1_c, [T_Q8_0] = tram_dec_q8_0_c, [T_Q2_K] = tram_dec_q2_k_c,
     [T_Q3_K] = tram_dec_q3_k_c, [T_Q4_K] = tram_dec_q4_k_c, [T_Q5_K] = tram_dec_q5_k_c,
     [T_Q6_K] = tram_dec_q6_k_c},
    {0},
    tile_c,
    attend_c,
    silu_mul_c,
    {0},
    NULL,
    NULL,
    .argmax = argmax_c,
};
