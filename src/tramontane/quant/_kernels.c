/*
 * tramontane.quant._kernels: float32 activations times GGUF-packed weights, without unpacking the
 * weights to float in memory.
 *
 *   matmul(x_ptr, w_ptr, y_ptr, M, N, K, qtype, n_threads)
 *       y[M,N] = x[M,K] @ W^T, W stored as N rows of GGML blocks of type `qtype` (row r starts at
 *       w_ptr + r * row_bytes, row_bytes = K / block_size * type_size). float32 accumulation, the
 *       activations are never quantized.
 *   dequantize_rows(w_ptr, out_ptr, N, K, qtype, n_threads)
 *       W -> float32 [N,K].
 *
 * Pointers are raw addresses (torch's data_ptr()); the caller (kernels.py) checks the buffers' sizes,
 * so these functions trust them. No alignment is assumed anywhere (every load is unaligned-safe).
 *
 * Block layouts are ggml's `block_*` structs, all little-endian (see weights/gguf_quants.py for the
 * same facts in torch). The kernels here are our own.
 *
 * Structure. The file is compiled three times over: once as plain C (the portable path, also what
 * aarch64 gets), and on x86-64 twice more by including itself with TRAM_PASS set, once for AVX2+FMA
 * and once for AVX-512 (F/BW/VL/DQ), with the ISA given per function by __attribute__((target)), so
 * the binary needs no -march flag and picks its path at run time with __builtin_cpu_supports.
 * Each vector pass provides, per type:
 *   - a block decoder (blocks -> float32), used by dequantize_rows and by the tiled path;
 *   - for Q4_0, Q4_1, Q8_0, Q4_K and Q6_K, a fused kernel for M <= FUSED_M activation rows: a block
 *     is widened to float in registers once and multiplied into each activation row; the block's
 *     scale multiplies each partial sum once and additive offsets go through per-32 sums of x;
 *     the weights of the group of rows a few KiB ahead are software-prefetched (streaming from DRAM
 *     the hardware prefetchers alone reach about half the bandwidth);
 * and one tiled path for larger M (and for the types without a fused kernel): RN weight rows are
 * decoded KC elements at a time into a small float buffer that stays in L1, then a register-blocked
 * RM x RN micro-kernel multiplies it into every activation row, so each weight block is decoded once
 * per MB activation rows.
 * Threads (OpenMP, count given per call; the team is libgomp's, shared with torch's when torch is
 * loaded first) split the N output rows in contiguous ranges of whole RN-row groups, so the result
 * does not depend on the thread count.
 */
#ifndef TRAM_PASS

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && !defined(TRAM_PORTABLE_ONLY)
#define TRAM_X86 1
#include <immintrin.h>
#endif

/* GGML type ids (ggml.h enum ggml_type). */
enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30, T_COUNT = 31
};

typedef struct { int block; int size; } tinfo;

/* Elements per block and bytes per block of each supported type; {0,0} = unsupported. */
static const tinfo TYPES[T_COUNT] = {
    [T_F32] = {1, 4},      [T_F16] = {1, 2},       [T_BF16] = {1, 2},
    [T_Q4_0] = {32, 18},   [T_Q4_1] = {32, 20},    [T_Q5_0] = {32, 22},
    [T_Q5_1] = {32, 24},   [T_Q8_0] = {32, 34},
    [T_Q4_K] = {256, 144}, [T_Q5_K] = {256, 176},  [T_Q6_K] = {256, 210},
};

#define RN 4     /* weight rows per tile */
#define KC 256   /* elements of a row decoded per step (a multiple of every block size) */
#define MB 64    /* activation rows sharing one decode of a weight tile */
#define FUSED_M 4  /* up to this many activation rows, the fused kernels (where a type has one) */

typedef void (*dec_fn)(const uint8_t *blocks, int nblocks, float *out);
/* Fused, M <= FUSED_M activation rows: y[m, 0..n) (rows ldy apart) = rows of w (rb bytes apart) . x[m];
 * xs: sums of x per 32 elements, [M][K/32]. */
typedef void (*fused_fn)(const uint8_t *w, size_t rb, long n, const float *x, const float *xs, long M,
                         long K, float *y, long ldy);
typedef void (*tile_fn)(dec_fn dec, int bs, int ts, const uint8_t *w, size_t rb, long n0, long n1,
                        const float *x, long M, long K, float *y, long N);

/* One query head over one kv head's cache rows: out[D] = softmax(q . k_s * scale) . v_s over the slots
 * s whose position kpos[s] is visible from qpos (0 <= kpos <= qpos, qpos - kpos < window when window
 * > 0); sc: S floats of scratch. */
typedef void (*attend_fn)(const float *q, const float *k, const float *v, long S, long D,
                          const int64_t *kpos, int64_t qpos, long window, float scale, float *sc, float *out);
/* out[i] = silu(g[i]) * u[i], silu(g) = g / (1 + e^-g). */
typedef void (*silu_fn)(const float *g, const float *u, float *out, long n);

typedef struct {
    const char *name;
    dec_fn dec[T_COUNT];
    fused_fn fused[T_COUNT];
    tile_fn tile;
    attend_fn attend;
    silu_fn silu_mul;
} isa_ops;

static inline int visible(int64_t kp, int64_t qpos, long window) {
    return kp >= 0 && kp <= qpos && (window <= 0 || qpos - kp < window);
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* IEEE half -> float, exactly (normals, subnormals, inf, nan). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    float f;
    if (exp == 0) {
        f = (float)man * (1.0f / 16777216.0f);  /* man * 2^-24 */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ggml's get_scale_min_k4: 12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K, Q5_K). */
static inline void k4_scales(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int i = 0; i < 4; i++) {
        sc[i] = s[i] & 63;
        mn[i] = s[i + 4] & 63;
        sc[i + 4] = (uint8_t)((s[i + 8] & 0x0f) | ((s[i] >> 6) << 4));
        mn[i + 4] = (uint8_t)((s[i + 8] >> 4) | ((s[i + 4] >> 6) << 4));
    }
}

/* ------------------------------------------------------------------------------------------------
 * Portable path: plain C decoders (the same arithmetic as weights/gguf_quants.py) and a tiled matmul
 * that decodes KC elements of one row at a time and dots them with every activation row.
 */

static void dec_f32_c(const uint8_t *b, int n, float *o) { memcpy(o, b, (size_t)n * 4); }

static void dec_f16_c(const uint8_t *b, int n, float *o) {
    for (int i = 0; i < n; i++) o[i] = f16_to_f32(rd16(b + 2 * i));
}

static void dec_bf16_c(const uint8_t *b, int n, float *o) {
    for (int i = 0; i < n; i++) o[i] = bf16_to_f32(rd16(b + 2 * i));
}

static void dec_q4_0_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 18, o += 32) {
        float d = f16_to_f32(rd16(b));
        for (int j = 0; j < 16; j++) {
            o[j] = d * (float)((b[2 + j] & 15) - 8);
            o[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
    }
}

static void dec_q4_1_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 20, o += 32) {
        float d = f16_to_f32(rd16(b)), m = f16_to_f32(rd16(b + 2));
        for (int j = 0; j < 16; j++) {
            o[j] = d * (float)(b[4 + j] & 15) + m;
            o[j + 16] = d * (float)(b[4 + j] >> 4) + m;
        }
    }
}

static void dec_q5_0_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 22, o += 32) {
        float d = f16_to_f32(rd16(b));
        uint32_t qh = rd32(b + 2);
        for (int j = 0; j < 16; j++) {
            int lo = (b[6 + j] & 15) | (int)(((qh >> j) & 1) << 4);
            int hi = (b[6 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            o[j] = d * (float)(lo - 16);
            o[j + 16] = d * (float)(hi - 16);
        }
    }
}

static void dec_q5_1_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 24, o += 32) {
        float d = f16_to_f32(rd16(b)), m = f16_to_f32(rd16(b + 2));
        uint32_t qh = rd32(b + 4);
        for (int j = 0; j < 16; j++) {
            int lo = (b[8 + j] & 15) | (int)(((qh >> j) & 1) << 4);
            int hi = (b[8 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            o[j] = d * (float)lo + m;
            o[j + 16] = d * (float)hi + m;
        }
    }
}

static void dec_q8_0_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 34, o += 32) {
        float d = f16_to_f32(rd16(b));
        for (int j = 0; j < 32; j++) o[j] = d * (float)(int8_t)b[2 + j];
    }
}

/* Q4_K: d | dmin | scales[12] | qs[128]; element 64j + 32h + l is nibble h of qs[32j + l], in
 * sub-block s = 2j + h: y = (d * sc[s]) * q - dmin * mn[s]. Q5_K adds qh[32] before qs: the fifth bit
 * of element l of sub-block s is bit s of qh[l]. */
static void dec_qk_c(const uint8_t *b, int nb, float *o, int five) {
    const int ts = five ? 176 : 144;
    for (int i = 0; i < nb; i++, b += ts, o += 256) {
        float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
        uint8_t sc[8], mn[8];
        k4_scales(b + 4, sc, mn);
        const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
        for (int s = 0; s < 8; s++) {
            float dl = d * (float)sc[s], ml = dmin * (float)mn[s];
            for (int l = 0; l < 32; l++) {
                int q = (qs[32 * (s / 2) + l] >> (4 * (s & 1))) & 15;
                if (five) q |= ((qh[l] >> s) & 1) << 4;
                o[32 * s + l] = dl * (float)q - ml;
            }
        }
    }
}

static void dec_q4_k_c(const uint8_t *b, int nb, float *o) { dec_qk_c(b, nb, o, 0); }
static void dec_q5_k_c(const uint8_t *b, int nb, float *o) { dec_qk_c(b, nb, o, 1); }

/* Q6_K: ql[128] | qh[64] | scales int8[16] | d. Element 128h + 32k + l takes nibble k/2 of
 * ql[64h + 32(k%2) + l] and bits 2k..2k+1 of qh[32h + l]; q - 32, scaled by d * sc[element / 16]. */
static void dec_q6_k_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 210, o += 256) {
        float d = f16_to_f32(rd16(b + 208));
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < 32; l++) {
                    int lo = (b[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15;
                    int hi = (b[128 + 32 * h + l] >> (2 * k)) & 3;
                    int e = 128 * h + 32 * k + l;
                    o[e] = (d * (float)sc[e / 16]) * (float)((lo | (hi << 4)) - 32);
                }
    }
}

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

static void attend_c(const float *q, const float *k, const float *v, long S, long D, const int64_t *kpos,
                     int64_t qpos, long window, float scale, float *sc, float *out) {
    float mx = -INFINITY, sum = 0.0f;
    for (long s = 0; s < S; s++) {
        sc[s] = visible(kpos[s], qpos, window) ? dot_c(q, k + s * D, D) * scale : -INFINITY;
        if (sc[s] > mx) mx = sc[s];
    }
    for (long d = 0; d < D; d++) out[d] = 0.0f;
    if (mx == -INFINITY) return;
    for (long s = 0; s < S; s++) {
        if (sc[s] == -INFINITY) continue;
        float p = expf(sc[s] - mx);
        sum += p;
        for (long d = 0; d < D; d++) out[d] += p * v[s * D + d];
    }
    for (long d = 0; d < D; d++) out[d] /= sum;
}

static void silu_mul_c(const float *g, const float *u, float *out, long n) {
    for (long i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static const isa_ops OPS_C = {
    "scalar",
    {[T_F32] = dec_f32_c, [T_F16] = dec_f16_c, [T_BF16] = dec_bf16_c, [T_Q4_0] = dec_q4_0_c,
     [T_Q4_1] = dec_q4_1_c, [T_Q5_0] = dec_q5_0_c, [T_Q5_1] = dec_q5_1_c, [T_Q8_0] = dec_q8_0_c,
     [T_Q4_K] = dec_q4_k_c, [T_Q5_K] = dec_q5_k_c, [T_Q6_K] = dec_q6_k_c},
    {0},
    tile_c,
    attend_c,
    silu_mul_c,
};

/* ------------------------------------------------------------------------------------------------
 * The vector passes. */
#ifdef TRAM_X86
#define TRAM_PASS 1

#define VL 8
#define SFX(n) n##_avx2
#define KTARGET "avx2,fma,f16c"
#include "_kernels.c"
#undef VL
#undef SFX
#undef KTARGET

#define VL 16
#define SFX(n) n##_avx512
#define KTARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#include "_kernels.c"
#undef VL
#undef SFX
#undef KTARGET

#undef TRAM_PASS
#endif

/* ------------------------------------------------------------------------------------------------
 * Dispatch and threading. */

static const isa_ops *g_ops = NULL;
static const isa_ops *g_best = NULL;

static void init_isa(void) {
    g_best = &OPS_C;
#ifdef TRAM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) g_best = &OPS_avx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        g_best = &OPS_avx512;
#endif
    g_ops = g_best;
}

/* Row range [*n0, *n1) of thread t out of nt: contiguous, whole RN-row groups. */
static void split_rows(long N, int t, int nt, long *n0, long *n1) {
    long units = (N + RN - 1) / RN;
    long u0 = units * t / nt, u1 = units * (t + 1) / nt;
    *n0 = u0 * RN < N ? u0 * RN : N;
    *n1 = u1 * RN < N ? u1 * RN : N;
}

static int thread_count(int n_threads, long N, long work_bytes) {
    long groups = (N + RN - 1) / RN;
    if (work_bytes < (32L << 10)) return 1;  /* waking a second thread costs more than it saves */
    if (n_threads > groups) n_threads = (int)groups;
    return n_threads < 1 ? 1 : n_threads;
}

static int needs_xs(int qtype) {
    return qtype == T_Q4_0 || qtype == T_Q4_1 || qtype == T_Q5_1 || qtype == T_Q4_K || qtype == T_Q5_K;
}

/* Returns 0, or -1 when out of memory. */
static int run_matmul(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N,
                      long K, int qtype, int n_threads) {
    const tinfo ti = TYPES[qtype];
    const size_t rb = (size_t)(K / ti.block) * ti.size;
    fused_fn fused = M <= FUSED_M && K % 32 == 0 ? ops->fused[qtype] : NULL;  /* F16/BF16: 32 at a time */
    float *xs = NULL;
    if (fused && needs_xs(qtype)) {
        xs = malloc(sizeof(float) * (size_t)(M * (K / 32)));
        if (!xs) return -1;
        for (long b = 0; b < M * (K / 32); b++) {
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += x[32 * b + j];
            xs[b] = s;
        }
    }
    int nth = thread_count(n_threads, N, (long)(rb * (size_t)N) + M * K * 4);
    (void)nth;  /* unused without OpenMP */
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        long n0, n1;
        split_rows(N, t, nt, &n0, &n1);
        if (n1 > n0) {
            if (fused)
                fused(w + (size_t)n0 * rb, rb, n1 - n0, x, xs, M, K, y + n0, N);
            else
                ops->tile(ops->dec[qtype], ti.block, ti.size, w, rb, n0, n1, x, M, K, y, N);
        }
    }
    free(xs);
    return 0;
}

static void run_dequant(const isa_ops *ops, const uint8_t *w, float *out, long N, long K, int qtype,
                        int n_threads) {
    const tinfo ti = TYPES[qtype];
    const size_t rb = (size_t)(K / ti.block) * ti.size;
    const dec_fn dec = ops->dec[qtype];
    int nth = thread_count(n_threads, N, (long)(rb * (size_t)N));
    (void)nth;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        long n0, n1;
        split_rows(N, t, nt, &n0, &n1);
        for (long n = n0; n < n1; n++) dec(w + (size_t)n * rb, (int)(K / ti.block), out + (size_t)n * (size_t)K);
    }
}


/* ------------------------------------------------------------------------------------------------
 * One transformer block for a step of one new token per sequence (the decoding loop), in place on
 * the residual stream x [B, dim]:
 *     x += wo . attention(rope(q), cache)      with q, k, v = wqkv . rmsnorm(x), k/v stored first
 *     x += w2 . (silu(g) * u)                  with g, u = w13 . rmsnorm(x)
 * the same arithmetic as model/transformer.py (RMSNorm in float32, RoPE on interleaved pairs, softmax
 * attention over the visible cache slots, SwiGLU), with the projections as packed matmuls. Rows whose
 * position is -1 (padding) write nothing to the cache and get no attention output. */

typedef struct {
    float *x;                           /* [B, dim] residual stream, updated in place */
    long B, dim, H, Hkv, D, F;          /* rows, model dim, heads, kv heads, head dim, ffn hidden */
    const float *norm1, *norm2;         /* [dim] attention_norm and ffn_norm weights */
    float eps;
    const uint8_t *wqkv, *wo, *w13, *w2;  /* packed [(H+2Hkv)D, dim], [dim, HD], [2F, dim], [dim, F] */
    int tqkv, to, t13, t2;              /* their GGML types */
    const float *cs;                    /* [B, D/2, 2] cos, sin of each row's position */
    float *kc, *vc;                     /* this layer's cache [B, Hkv, S, D] */
    long S;
    const int64_t *kpos;                /* [B, S] position held by each slot (-1 = empty), this step's included */
    const int64_t *qpos;                /* [B] position of each row's new token (-1 = padding) */
    long window;                        /* sliding window, 0 = none */
    int threads;
} block_args;

static void rms_norm_rows(const float *x, const float *w, float eps, long B, long n, float *out) {
    for (long b = 0; b < B; b++) {
        const float *xr = x + b * n;
        float ss = 0.0f;
        for (long i = 0; i < n; i++) ss += xr[i] * xr[i];
        float r = 1.0f / sqrtf(ss / (float)n + eps);
        for (long i = 0; i < n; i++) out[b * n + i] = xr[i] * r * w[i];
    }
}

/* Rotate q and k heads of each row (interleaved pairs) and store k, v in the row's cache slot. */
static void rope_and_store(const block_args *a, float *qkv) {
    const long D = a->D, half = D / 2, width = (a->H + 2 * a->Hkv) * D;
    for (long b = 0; b < a->B; b++) {
        if (a->qpos[b] < 0) continue;
        float *row = qkv + b * width;
        const float *cs = a->cs + b * D;
        for (long h = 0; h < a->H + a->Hkv; h++)
            for (long i = 0; i < half; i++) {
                float *p = row + h * D + 2 * i, x0 = p[0], x1 = p[1], c = cs[2 * i], s = cs[2 * i + 1];
                p[0] = x0 * c - x1 * s;
                p[1] = x0 * s + x1 * c;
            }
        const long slot = a->qpos[b] % a->S;
        for (long g = 0; g < a->Hkv; g++) {
            size_t at = (((size_t)b * a->Hkv + g) * a->S + slot) * D;
            memcpy(a->kc + at, row + (a->H + g) * D, sizeof(float) * D);
            memcpy(a->vc + at, row + (a->H + a->Hkv + g) * D, sizeof(float) * D);
        }
    }
}

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

/* Returns 0, or -1 when out of memory. */
static int run_block(const isa_ops *ops, const block_args *a) {
    const long B = a->B, dim = a->dim, HD = a->H * a->D, width = (a->H + 2 * a->Hkv) * a->D, F = a->F;
    size_t floats = (size_t)B * (dim + width + HD + 3 * F + dim) + (size_t)B * a->H * a->S;
    float *buf = malloc(sizeof(float) * floats);
    if (!buf) return -1;
    float *xn = buf, *qkv = xn + B * dim, *att = qkv + B * width, *h13 = att + B * HD, *gu = h13 + B * 2 * F;
    float *y = gu + B * F, *sc = y + B * dim;
    int rc = 0;
    rms_norm_rows(a->x, a->norm1, a->eps, B, dim, xn);
    rc |= run_matmul(ops, xn, a->wqkv, qkv, B, width, dim, a->tqkv, a->threads);
    rope_and_store(a, qkv);
    attend_rows(ops, a, qkv, att, sc);
    rc |= run_matmul(ops, att, a->wo, y, B, dim, HD, a->to, a->threads);
    for (long i = 0; i < B * dim; i++) a->x[i] += y[i];
    rms_norm_rows(a->x, a->norm2, a->eps, B, dim, xn);
    rc |= run_matmul(ops, xn, a->w13, h13, B, 2 * F, dim, a->t13, a->threads);
    for (long b = 0; b < B; b++) ops->silu_mul(h13 + b * 2 * F, h13 + b * 2 * F + F, gu + b * F, F);
    rc |= run_matmul(ops, gu, a->w2, y, B, dim, F, a->t2, a->threads);
    for (long i = 0; i < B * dim; i++) a->x[i] += y[i];
    free(buf);
    return rc ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * Python bindings. */

static int check_common(long N, long K, int qtype, int n_threads) {
    if (qtype < 0 || qtype >= T_COUNT || TYPES[qtype].block == 0) {
        PyErr_Format(PyExc_ValueError, "unsupported GGML type id %d for the packed kernels", qtype);
        return -1;
    }
    if (N < 0 || K <= 0 || K % TYPES[qtype].block) {
        PyErr_Format(PyExc_ValueError, "bad shape N=%ld K=%ld: K must be a positive multiple of %d",
                     N, K, TYPES[qtype].block);
        return -1;
    }
    if (K / TYPES[qtype].block > 0x7fffffffL) {
        PyErr_SetString(PyExc_ValueError, "K too large");
        return -1;
    }
    if (n_threads < 1) {
        PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %d", n_threads);
        return -1;
    }
    return 0;
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    unsigned long long xp, wp, yp;
    Py_ssize_t M, N, K;
    int qtype, nth;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKnnnii", &xp, &wp, &yp, &M, &N, &K, &qtype, &nth)) return NULL;
    if (check_common((long)N, (long)K, qtype, nth)) return NULL;
    if (M < 0) return PyErr_Format(PyExc_ValueError, "bad M=%zd", M);
    if (M == 0 || N == 0) Py_RETURN_NONE;
    if (!xp || !wp || !yp) return PyErr_Format(PyExc_ValueError, "null pointer");
    const isa_ops *ops = g_ops;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_matmul(ops, (const float *)(uintptr_t)xp, (const uint8_t *)(uintptr_t)wp,
                    (float *)(uintptr_t)yp, (long)M, (long)N, (long)K, qtype, nth);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_dequantize_rows(PyObject *self, PyObject *args) {
    unsigned long long wp, op;
    Py_ssize_t N, K;
    int qtype, nth;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnii", &wp, &op, &N, &K, &qtype, &nth)) return NULL;
    if (check_common((long)N, (long)K, qtype, nth)) return NULL;
    if (N == 0) Py_RETURN_NONE;
    if (!wp || !op) return PyErr_Format(PyExc_ValueError, "null pointer");
    const isa_ops *ops = g_ops;
    Py_BEGIN_ALLOW_THREADS
    run_dequant(ops, (const uint8_t *)(uintptr_t)wp, (float *)(uintptr_t)op, (long)N, (long)K, qtype,
                nth);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int check_type_k(int qtype, long K, const char *what) {
    if (qtype < 0 || qtype >= T_COUNT || TYPES[qtype].block == 0 || K <= 0 || K % TYPES[qtype].block) {
        PyErr_Format(PyExc_ValueError, "%s: GGML type %d cannot hold rows of %ld", what, qtype, K);
        return -1;
    }
    return 0;
}

static PyObject *py_decode_block(PyObject *self, PyObject *args) {
    unsigned long long x, n1, n2, wqkv, wo, w13, w2, cs, kc, vc, kpos, qpos;
    Py_ssize_t B, dim, H, Hkv, D, F, S, window;
    float eps;
    int tqkv, to, t13, t2, nth;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnnnnnKKfKiKiKiKiKKKnKKni", &x, &B, &dim, &H, &Hkv, &D, &F, &n1, &n2, &eps,
                          &wqkv, &tqkv, &wo, &to, &w13, &t13, &w2, &t2, &cs, &kc, &vc, &S, &kpos, &qpos,
                          &window, &nth))
        return NULL;
    if (B < 1 || dim < 1 || H < 1 || Hkv < 1 || H % Hkv || D < 2 || D % 2 || F < 1 || S < 1 || nth < 1)
        return PyErr_Format(PyExc_ValueError, "bad block shape B=%zd dim=%zd H=%zd Hkv=%zd D=%zd F=%zd S=%zd",
                            B, dim, H, Hkv, D, F, S);
    if (check_type_k(tqkv, dim, "wqkv") || check_type_k(to, H * D, "wo") || check_type_k(t13, dim, "w13") ||
        check_type_k(t2, F, "w2"))
        return NULL;
    if (!x || !n1 || !n2 || !wqkv || !wo || !w13 || !w2 || !cs || !kc || !vc || !kpos || !qpos)
        return PyErr_Format(PyExc_ValueError, "null pointer");
    block_args a = {(float *)(uintptr_t)x, B, dim, H, Hkv, D, F,
                    (const float *)(uintptr_t)n1, (const float *)(uintptr_t)n2, eps,
                    (const uint8_t *)(uintptr_t)wqkv, (const uint8_t *)(uintptr_t)wo,
                    (const uint8_t *)(uintptr_t)w13, (const uint8_t *)(uintptr_t)w2, tqkv, to, t13, t2,
                    (const float *)(uintptr_t)cs, (float *)(uintptr_t)kc, (float *)(uintptr_t)vc, S,
                    (const int64_t *)(uintptr_t)kpos, (const int64_t *)(uintptr_t)qpos, window, nth};
    const isa_ops *ops = g_ops;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_block(ops, &a);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
#ifdef TRAM_X86
    if (g_best == &OPS_avx512) return Py_BuildValue("(sss)", "avx512", "avx2", "scalar");
    if (g_best == &OPS_avx2) return Py_BuildValue("(ss)", "avx2", "scalar");
#endif
    return Py_BuildValue("(s)", "scalar");
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(g_ops->name);
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const isa_ops *want = NULL;
    if (!strcmp(name, "scalar")) want = &OPS_C;
#ifdef TRAM_X86
    if (!strcmp(name, "avx2") && (g_best == &OPS_avx2 || g_best == &OPS_avx512)) want = &OPS_avx2;
    if (!strcmp(name, "avx512") && g_best == &OPS_avx512) want = &OPS_avx512;
#endif
    if (!strcmp(name, "best")) want = g_best;
    if (!want) return PyErr_Format(PyExc_ValueError, "instruction set %s not available here", name);
    PyObject *prev = PyUnicode_FromString(g_ops->name);
    g_ops = want;
    return prev;
}

static PyObject *py_has_openmp(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef METHODS[] = {
    {"matmul", py_matmul, METH_VARARGS,
     "matmul(x_ptr, w_ptr, y_ptr, M, N, K, qtype, n_threads): y[M,N] = x[M,K] @ W^T, float32, W as N "
     "rows of GGML blocks. Raw addresses: the caller guarantees the buffers' sizes."},
    {"dequantize_rows", py_dequantize_rows, METH_VARARGS,
     "dequantize_rows(w_ptr, out_ptr, N, K, qtype, n_threads): W -> float32 [N,K]."},
    {"decode_block", py_decode_block, METH_VARARGS,
     "decode_block(x, B, dim, H, Hkv, D, F, norm1, norm2, eps, wqkv, tqkv, wo, to, w13, t13, w2, t2, cs, "
     "kc, vc, S, kpos, qpos, window, n_threads): one transformer block for one new token per row, in "
     "place on x (see run_block). Raw addresses: the caller guarantees the buffers' sizes."},
    {"isas", py_isas, METH_NOARGS, "Instruction sets this CPU can run, best first."},
    {"isa", py_isa, METH_NOARGS, "The instruction set in use."},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name): use 'avx512', 'avx2', 'scalar' or 'best' (for tests); returns the previous one."},
    {"has_openmp", py_has_openmp, METH_NOARGS, "Whether the module was built with OpenMP threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "Packed GGUF matmul kernels (see kernels.py).", -1, METHODS,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    init_isa();
    return PyModule_Create(&MODULE);
}

#else /* TRAM_PASS ================================================================================
 * One vector pass: VL float lanes, functions suffixed by SFX, compiled for KTARGET. */

#define KFN static __attribute__((target(KTARGET), noinline))
#define KINL static inline __attribute__((target(KTARGET), always_inline))

#define VF SFX(vf)
#define VI SFX(vi)
#define VB SFX(vb)
#define VSB SFX(vsb)
#define VU SFX(vu)
typedef float VF __attribute__((vector_size(VL * 4)));
typedef int32_t VI __attribute__((vector_size(VL * 4)));
typedef uint8_t VB __attribute__((vector_size(VL)));
typedef int8_t VSB __attribute__((vector_size(VL)));
typedef uint32_t VU __attribute__((vector_size(VL * 4)));

#define ldf SFX(ldf)
#define stf SFX(stf)
#define ldu8 SFX(ldu8)
#define lds8 SFX(lds8)
#define cvt SFX(cvt)
#define splat SFX(splat)
#define hsum SFX(hsum)
#define h2f SFX(h2f)
#define mk SFX(mk)
#define q5f SFX(q5f)
#define bcast0 SFX(bcast0)
#define q4f SFX(q4f)
#define ldh SFX(ldh)
#define ldbh SFX(ldbh)

KINL VF ldf(const float *p) { VF v; memcpy(&v, p, sizeof v); return v; }
KINL void stf(float *p, VF v) { memcpy(p, &v, sizeof v); }
KINL VF cvt(VI v) { return __builtin_convertvector(v, VF); }
#if VL == 16
KINL VF splat(float f) { return (VF)_mm512_set1_ps(f); }
#else
KINL VF splat(float f) { return (VF)_mm256_set1_ps(f); }
#endif
KINL float h2f(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }

#if VL == 16
KINL VI ldu8(const uint8_t *p) { return (VI)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
KINL VI lds8(const uint8_t *p) { return (VI)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
KINL float hsum(VF v) { return _mm512_reduce_add_ps((__m512)v); }
KINL VF ldh(const uint8_t *p) { return (VF)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
KINL VF ldbh(const uint8_t *p) {
    return (VF)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
#else
KINL VI ldu8(const uint8_t *p) { return (VI)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
KINL VI lds8(const uint8_t *p) { return (VI)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
KINL float hsum(VF v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
KINL VF ldh(const uint8_t *p) { return (VF)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
KINL VF ldbh(const uint8_t *p) {
    return (VF)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
}
#endif

/* ---- decoders: nb blocks -> float32 ---- */

KFN void SFX(dec_f32)(const uint8_t *b, int n, float *o) { memcpy(o, b, (size_t)n * 4); }

KFN void SFX(dec_f16)(const uint8_t *b, int n, float *o) {
    int i = 0;
    for (; i + VL <= n; i += VL) stf(o + i, ldh(b + 2 * i));
    for (; i < n; i++) o[i] = h2f(b + 2 * i);
}

KFN void SFX(dec_bf16)(const uint8_t *b, int n, float *o) {
    int i = 0;
    for (; i + VL <= n; i += VL) stf(o + i, ldbh(b + 2 * i));
    for (; i < n; i++) o[i] = bf16_to_f32(rd16(b + 2 * i));
}

KFN void SFX(dec_q4_0)(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 18, o += 32) {
        VF d = splat(h2f(b));
        for (int g = 0; g < 16; g += VL) {
            VI v = ldu8(b + 2 + g);
            stf(o + g, cvt((v & 15) - 8) * d);
            stf(o + 16 + g, cvt((v >> 4) - 8) * d);
        }
    }
}

KFN void SFX(dec_q4_1)(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 20, o += 32) {
        VF d = splat(h2f(b)), m = splat(h2f(b + 2));
        for (int g = 0; g < 16; g += VL) {
            VI v = ldu8(b + 4 + g);
            stf(o + g, cvt(v & 15) * d + m);
            stf(o + 16 + g, cvt(v >> 4) * d + m);
        }
    }
}

/* Lane index vector 0..VL-1, for the per-element shifts of Q5's fifth bits. */
#if VL == 16
#define LANES ((VI){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})
#else
#define LANES ((VI){0, 1, 2, 3, 4, 5, 6, 7})
#endif

/* 32 five-bit values of a Q5_0/Q5_1 block (qs at `qs`, fifth bits in `qh`), as int32 vectors. */
KINL void SFX(q5_vals)(const uint8_t *qs, uint32_t qh, int g, VI *lo, VI *hi) {
    VI v = ldu8(qs + g);
    VU h = (VU){0} + qh;
    /* logical shifts of the broadcast word: bit (g + lane) for the low half, (16 + g + lane) high */
    VI bl = (VI)(h >> (VU)(LANES + g)), bh = (VI)(h >> (VU)(LANES + 16 + g));
    *lo = (v & 15) | ((bl & 1) << 4);
    *hi = (v >> 4) | ((bh & 1) << 4);
}

KFN void SFX(dec_q5_0)(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 22, o += 32) {
        VF d = splat(h2f(b));
        uint32_t qh = rd32(b + 2);
        for (int g = 0; g < 16; g += VL) {
            VI lo, hi;
            SFX(q5_vals)(b + 6, qh, g, &lo, &hi);
            stf(o + g, cvt(lo - 16) * d);
            stf(o + 16 + g, cvt(hi - 16) * d);
        }
    }
}

KFN void SFX(dec_q5_1)(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 24, o += 32) {
        VF d = splat(h2f(b)), m = splat(h2f(b + 2));
        uint32_t qh = rd32(b + 4);
        for (int g = 0; g < 16; g += VL) {
            VI lo, hi;
            SFX(q5_vals)(b + 8, qh, g, &lo, &hi);
            stf(o + g, cvt(lo) * d + m);
            stf(o + 16 + g, cvt(hi) * d + m);
        }
    }
}

KFN void SFX(dec_q8_0)(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 34, o += 32) {
        VF d = splat(h2f(b));
        for (int g = 0; g < 32; g += VL) stf(o + g, cvt(lds8(b + 2 + g)) * d);
    }
}

KINL void SFX(dec_qk)(const uint8_t *b, int nb, float *o, const int five) {
    const int ts = five ? 176 : 144;
    for (int i = 0; i < nb; i++, b += ts, o += 256) {
        float d = h2f(b), dmin = h2f(b + 2);
        uint8_t sc[8], mn[8];
        k4_scales(b + 4, sc, mn);
        const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
        for (int s = 0; s < 8; s++) {
            VF dl = splat(d * (float)sc[s]), ml = splat(dmin * (float)mn[s]);
            for (int g = 0; g < 32; g += VL) {
                VI v = ldu8(qs + 32 * (s / 2) + g);
                VI q = (s & 1) ? (v >> 4) : (v & 15);
                if (five) q |= ((ldu8(qh + g) >> s) & 1) << 4;
                stf(o + 32 * s + g, cvt(q) * dl - ml);
            }
        }
    }
}

KFN void SFX(dec_q4_k)(const uint8_t *b, int nb, float *o) { SFX(dec_qk)(b, nb, o, 0); }
KFN void SFX(dec_q5_k)(const uint8_t *b, int nb, float *o) { SFX(dec_qk)(b, nb, o, 1); }

/* The four 6-bit values q - 32 of Q6_K elements 128h + 32k + g + lane, k = 0..3. */
KINL void SFX(q6_vals)(const uint8_t *b, int h, int g, VI q[4]) {
    VI a = ldu8(b + 64 * h + g), c = ldu8(b + 64 * h + 32 + g), hb = ldu8(b + 128 + 32 * h + g);
    q[0] = ((a & 15) | ((hb & 3) << 4)) - 32;
    q[1] = ((c & 15) | ((hb & 12) << 2)) - 32;
    q[2] = ((a >> 4) | (hb & 48)) - 32;
    q[3] = ((c >> 4) | ((hb >> 2) & 48)) - 32;
}

KFN void SFX(dec_q6_k)(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 210, o += 256) {
        float d = h2f(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int h = 0; h < 2; h++)
            for (int g = 0; g < 32; g += VL) {
                VI q[4];
                SFX(q6_vals)(b, h, g, q);
                for (int k = 0; k < 4; k++)
                    stf(o + 128 * h + 32 * k + g, cvt(q[k]) * splat(d * (float)sc[8 * h + 2 * k + g / 16]));
            }
    }
}

/* ---- fused kernels for M <= 4 activation rows ----
 * Per block of one weight row, the quants are widened in registers once and multiplied into each of
 * the MX activation rows; the block's scale multiplies each partial sum once; additive offsets
 * (Q4_1's m, Q4_K's mins) go through per-32 sums of x (xs) instead of touching every element.
 * acc[mx] / macc[mx]: the accumulators of activation row mx for this weight row. */

/* Four halves at p as floats [h0, h1, h2, h3]; p must have 8 readable bytes. */
KINL __m128 SFX(h4)(const uint8_t *p) { return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)); }

#if VL == 16
KINL VF bcast0(__m128 v) { return (VF)_mm512_broadcastss_ps(v); }
/* Nibble (the low 4 bits of each lane) to float, with the lane's value minus `off`: one permute. */
KINL VF q4f(VI v, const int off) {
    const __m512 t0 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 t8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    return (VF)_mm512_permutexvar_ps((__m512i)v, off ? t8 : t0);
}
#else
KINL VF bcast0(__m128 v) { return (VF)_mm256_broadcastss_ps(v); }
KINL VF q4f(VI v, const int off) { return cvt((v & 15) - off); }
#endif

KINL float SFX(hsum8)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* lo . x[0:16] + hi . x[16:32] in VL lanes (summed later): one 32-weight block of a 4- or 5-bit type,
 * low nibbles first. */
KINL VF SFX(dot32)(const VF *lo, const VF *hi, const float *xr) {
    VF p = lo[0] * ldf(xr) + hi[0] * ldf(xr + 16);
    for (int g = 1; g < 16 / VL; g++) p += lo[g] * ldf(xr + g * VL) + hi[g] * ldf(xr + 16 + g * VL);
    return p;
}

/* Blocks holding y = d q + m (Q4_1, Q5_1): acc += d (q . x) per activation row; macc += [d, m] * xs, the
 * m part through the block sums (lane 1). dm = [d, m, -, -]. */
KINL void SFX(acc_scale_min)(const VF *lo, const VF *hi, __m128 dm, const float *x, long ldx, const int MX,
                             const float *xs, long ldxs, VF *acc, __m128 *macc) {
    VF d = bcast0(dm);
    for (int mx = 0; mx < MX; mx++) {
        acc[mx] += d * SFX(dot32)(lo, hi, x + mx * ldx);
        macc[mx] = _mm_fmadd_ps(dm, _mm_set1_ps(xs[mx * ldxs]), macc[mx]);
    }
}

/* Q4_0: y = d (q - 8). With AVX-512 the -8 rides in the permute table; with AVX2 it goes through the
 * block sums instead (d (q . x) - 8 d xs: cheaper than a subtraction per lane); macc lane 0 collects
 * d * xs. */
KINL void SFX(blk_q4_0)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, __m128 *macc) {
    const int off = VL == 16 ? 8 : 0;
    VF lo[16 / VL], hi[16 / VL];
    for (int g = 0; g < 16 / VL; g++) {
        VI v = ldu8(b + 2 + g * VL);
        lo[g] = q4f(v, off);
        hi[g] = q4f(v >> 4, off);
    }
    __m128 dv = SFX(h4)(b);  /* [d, -, -, -] */
    VF d = bcast0(dv);
    for (int mx = 0; mx < MX; mx++) {
        acc[mx] += d * SFX(dot32)(lo, hi, x + mx * ldx);
        if (!off) macc[mx] = _mm_fmadd_ps(dv, _mm_set1_ps(xs[mx * ldxs]), macc[mx]);
    }
}

/* Q4_1: sum (d q + m) x = d (q . x) + m sum(x). macc lane 1 collects m * xs. */
KINL void SFX(blk_q4_1)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, __m128 *macc) {
    VF lo[16 / VL], hi[16 / VL];
    for (int g = 0; g < 16 / VL; g++) {
        VI v = ldu8(b + 4 + g * VL);
        lo[g] = q4f(v, 0);
        hi[g] = q4f(v >> 4, 0);
    }
    SFX(acc_scale_min)(lo, hi, SFX(h4)(b), x, ldx, MX, xs, ldxs, acc, macc);
}

KINL void SFX(blk_q8_0)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, float *macc) {
    VF q[32 / VL];
    for (int g = 0; g < 32 / VL; g++) q[g] = cvt(lds8(b + 2 + g * VL));
    VF d = bcast0(SFX(h4)(b));
    for (int mx = 0; mx < MX; mx++) {
        const float *xr = x + mx * ldx;
        VF p = q[0] * ldf(xr);
        for (int g = 1; g < 32 / VL; g++) p += q[g] * ldf(xr + g * VL);
        acc[mx] += d * p;
    }
    (void)xs, (void)ldxs, (void)macc;
}

/* Q6_K quants to bytes, q - 32 in element order (see dec_q6_k_c), with 32-byte vector ops. x86 has
 * no byte shifts: shift 16-bit words, then mask off what crossed from the neighbouring byte. */
typedef uint8_t SFX(vb32) __attribute__((vector_size(32)));
typedef uint16_t SFX(vh16) __attribute__((vector_size(32)));
#define SHL(v, n) ((SFX(vb32))((SFX(vh16))(v) << (n)))
#define SHR(v, n) ((SFX(vb32))((SFX(vh16))(v) >> (n)))
#if VL == 16
/* AVX-512BW: a whole half (128 quants) in two 64-byte vectors. ql[64h..64h+63] holds the low nibbles
 * of k = 0, 1 (its low nibbles) and of k = 2, 3 (its high nibbles); the two high bits of k sit at bits
 * 2k..2k+1 of qh[32h + l] and are moved to bits 4..5 by a word shift of 4, 2, 0 or -2 bits. */
KINL void SFX(q6_bytes)(const uint8_t *b, int8_t *q) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30), c32 = _mm512_set1_epi8(32);
    for (int h = 0; h < 2; h++) {
        __m512i a = _mm512_loadu_si512((const void *)(b + 64 * h));
        __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        __m512i h01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_slli_epi16(hb, 4)), _mm256_slli_epi16(hb, 2), 1);
        __m512i h23 = _mm512_inserti64x4(_mm512_castsi256_si512(hb), _mm256_srli_epi16(hb, 2), 1);
        __m512i lo = _mm512_and_si512(a, m4), hi = _mm512_and_si512(_mm512_srli_epi16(a, 4), m4);
        /* 0xF8: A | (B & C) */
        _mm512_store_si512((void *)(q + 128 * h), _mm512_sub_epi8(_mm512_ternarylogic_epi32(lo, h01, m30, 0xF8), c32));
        _mm512_store_si512((void *)(q + 128 * h + 64), _mm512_sub_epi8(_mm512_ternarylogic_epi32(hi, h23, m30, 0xF8), c32));
    }
}
#else
KINL void SFX(q6_bytes)(const uint8_t *b, int8_t *q) {
    for (int h = 0; h < 2; h++) {
        SFX(vb32) a0, a1, hb;
        memcpy(&a0, b + 64 * h, 32);
        memcpy(&a1, b + 64 * h + 32, 32);
        memcpy(&hb, b + 128 + 32 * h, 32);
        SFX(vb32) q0 = ((a0 & 15) | (SHL(hb, 4) & 48)) - 32, q1 = ((a1 & 15) | (SHL(hb, 2) & 48)) - 32;
        SFX(vb32) q2 = ((SHR(a0, 4) & 15) | (hb & 48)) - 32, q3 = ((SHR(a1, 4) & 15) | (SHR(hb, 2) & 48)) - 32;
        /* 16-byte stores: each later 16-byte load is then forwarded from exactly one store */
        _mm_store_si128((__m128i *)(q + 128 * h), _mm256_castsi256_si128((__m256i)q0));
        _mm_store_si128((__m128i *)(q + 128 * h + 16), _mm256_extracti128_si256((__m256i)q0, 1));
        _mm_store_si128((__m128i *)(q + 128 * h + 32), _mm256_castsi256_si128((__m256i)q1));
        _mm_store_si128((__m128i *)(q + 128 * h + 48), _mm256_extracti128_si256((__m256i)q1, 1));
        _mm_store_si128((__m128i *)(q + 128 * h + 64), _mm256_castsi256_si128((__m256i)q2));
        _mm_store_si128((__m128i *)(q + 128 * h + 80), _mm256_extracti128_si256((__m256i)q2, 1));
        _mm_store_si128((__m128i *)(q + 128 * h + 96), _mm256_castsi256_si128((__m256i)q3));
        _mm_store_si128((__m128i *)(q + 128 * h + 112), _mm256_extracti128_si256((__m256i)q3, 1));
    }
}
#endif
#undef SHL
#undef SHR

/* The 16 sub-block scales d * sc[i] of a Q6_K block as floats. */
KINL void SFX(q6_scales)(const uint8_t *b, float *s16) {
    __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128(rd16(b + 208)));
    __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
    __m256 dv = _mm256_broadcastss_ps(d);
    _mm256_storeu_ps(s16, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
    _mm256_storeu_ps(s16 + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
}

KINL void SFX(blk_q6_k)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, float *macc) {
    int8_t q[256] __attribute__((aligned(64)));
    float s16[16] __attribute__((aligned(64)));
    SFX(q6_bytes)(b, q);
    SFX(q6_scales)(b, s16);
    __asm__("" : : "r"(s16), "r"(q) : "memory");  /* reload from memory: broadcasts fold into the FMAs */
    /* several chains per activation row: one accumulator would make a single row latency-bound */
    const int NCH = MX == 1 ? 4 : 2;
    VF a[4][4];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        VF qf[16 / VL];
        for (int g = 0; g < 16 / VL; g++) qf[g] = cvt(lds8((const uint8_t *)q + 16 * i + g * VL));
        VF s = splat(s16[i]);
        for (int mx = 0; mx < MX; mx++) {
            const float *xr = x + mx * ldx + 16 * i;
            VF p = qf[0] * ldf(xr);
            for (int g = 1; g < 16 / VL; g++) p += qf[g] * ldf(xr + g * VL);
            if (i < NCH)
                a[mx][i] = p * s;
            else
                a[mx][i % NCH] += p * s;
        }
    }
    for (int mx = 0; mx < MX; mx++) {
        VF t = a[mx][0];
        for (int c = 1; c < NCH; c++) t += a[mx][c];
        acc[mx] += t;
    }
    (void)xs, (void)ldxs, (void)macc;
}

/* Q4_K/Q5_K 6-bit scales and mins (get_scale_min_k4) as 8 bytes each, with word arithmetic. */
KINL void SFX(k4_sm)(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    uint32_t w0 = rd32(s), w1 = rd32(s + 4), w2 = rd32(s + 8);
    uint32_t sl = w0 & 0x3f3f3f3fu, sh = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
    uint32_t ml = w1 & 0x3f3f3f3fu, mh = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u);
    *sc = sl | ((uint64_t)sh << 32);
    *mn = ml | ((uint64_t)mh << 32);
}

KINL __m256 SFX(u8x8f)(uint64_t v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)v))); }

/* Five-bit quants to float: `nib` holds the low four bits in bits 0..3 (bits above are ignored), `hb`
 * the fifth bit at bit 4 (other bits ignored); minus `off`. AVX-512: one permute over a 32-entry
 * table does the conversion and the offset. */
#if VL == 16
KINL VF q5f(VI nib, VI hb, const int off) {
    const __m512 t0 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 t1 = _mm512_setr_ps(16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
    const __m512 c = _mm512_set1_ps((float)off);
    /* 0xE4: (A & C) | (B & ~C), C = 0x0F: low nibble of nib, the rest from hb */
    __m512i idx = _mm512_ternarylogic_epi32((__m512i)nib, (__m512i)hb, _mm512_set1_epi32(0x0f), 0xE4);
    return (VF)_mm512_permutex2var_ps(_mm512_sub_ps(t0, c), idx, _mm512_sub_ps(t1, c));
}
#else
KINL VF q5f(VI nib, VI hb, const int off) { return cvt(((nib & 15) | (hb & 16)) - off); }
#endif

/* A value's bit `bit` moved to bit 4 (the other bits are don't-cares for q5f). */
KINL VI SFX(bit_to_4)(VI v, const int bit) { return bit <= 4 ? v << (4 - bit) : (VI)((VU)v >> (bit - 4)); }

/* The 32 quants of a Q5_0/Q5_1 block as floats minus `off`: lo[g] elements g*VL.., hi[g] 16 + g*VL.. */
KINL void SFX(q5_block)(const uint8_t *qs, uint32_t qh, const int off, VF *lo, VF *hi) {
    for (int g = 0; g < 16 / VL; g++) {
        VI v = ldu8(qs + g * VL);
#if VL == 16
        /* the fifth bits of the 16 lanes are the 16-bit halves of qh: expand them as lane masks */
        VI bl = (VI)_mm512_movm_epi32((__mmask16)qh), bh = (VI)_mm512_movm_epi32((__mmask16)(qh >> 16));
#else
        VU h = (VU){0} + qh;
        VI bl = (VI)(h >> (VU)(LANES + g * VL)) << 4, bh = (VI)(h >> (VU)(LANES + 16 + g * VL)) << 4;
#endif
        lo[g] = q5f(v, bl, off);
        hi[g] = q5f((VI)((VU)v >> 4), bh, off);
    }
}

/* Q5_0: y = d (q - 16). */
KINL void SFX(blk_q5_0)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, float *macc) {
    VF lo[16 / VL], hi[16 / VL];
    SFX(q5_block)(b + 6, rd32(b + 2), 16, lo, hi);
    VF d = bcast0(SFX(h4)(b));
    for (int mx = 0; mx < MX; mx++) {
        acc[mx] += d * SFX(dot32)(lo, hi, x + mx * ldx);
    }
    (void)xs, (void)ldxs, (void)macc;
}

/* Q5_1: y = d q + m, the m part through the block sums as in Q4_1 (macc lane 1). */
KINL void SFX(blk_q5_1)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, __m128 *macc) {
    VF lo[16 / VL], hi[16 / VL];
    SFX(q5_block)(b + 8, rd32(b + 4), 0, lo, hi);
    SFX(acc_scale_min)(lo, hi, SFX(h4)(b), x, ldx, MX, xs, ldxs, acc, macc);
}

/* Q4_K / Q5_K: sum over sub-blocks s of (d sc_s) (q . x)_s - (dmin mn_s) xs_s; macc collects the
 * mins. Q5_K's fifth bit of element l of sub-block s is bit s of qh[l]. */
KINL void SFX(blk_qk)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                      long ldxs, VF *acc, __m256 *macc, const int five) {
    float s8[8] __attribute__((aligned(32)));
    uint64_t sc, mn;
    SFX(k4_sm)(b + 4, &sc, &mn);
    __m128 dd = SFX(h4)(b);  /* [d, dmin, -, -] */
    _mm256_store_ps(s8, _mm256_mul_ps(_mm256_broadcastss_ps(dd), SFX(u8x8f)(sc)));
    __m256 mins = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)), SFX(u8x8f)(mn));
    for (int mx = 0; mx < MX; mx++) macc[mx] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xs + mx * ldxs), macc[mx]);
    __asm__("" : : "r"(s8) : "memory");  /* reload from memory: broadcasts fold into the FMAs */
    const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
    VI hq[32 / VL];
    if (five)
        for (int g = 0; g < 32 / VL; g++) hq[g] = ldu8(qh + g * VL);
    const int NCH = MX == 1 ? 4 : 2;
    VF t[4][4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        VF lo[32 / VL], hi[32 / VL];
        for (int g = 0; g < 32 / VL; g++) {
            VI v = ldu8(qs + 32 * j + g * VL);
            if (five) {
                lo[g] = q5f(v, SFX(bit_to_4)(hq[g], 2 * j), 0);
                hi[g] = q5f((VI)((VU)v >> 4), SFX(bit_to_4)(hq[g], 2 * j + 1), 0);
            } else {
                lo[g] = q4f(v, 0);
                hi[g] = q4f(v >> 4, 0);
            }
        }
        VF s0 = splat(s8[2 * j]), s1 = splat(s8[2 * j + 1]);
        for (int mx = 0; mx < MX; mx++) {
            const float *xr = x + mx * ldx + 64 * j;
            VF p0 = lo[0] * ldf(xr), p1 = hi[0] * ldf(xr + 32);
            for (int g = 1; g < 32 / VL; g++) {
                p0 += lo[g] * ldf(xr + g * VL);
                p1 += hi[g] * ldf(xr + 32 + g * VL);
            }
            if (j < NCH)
                t[mx][j] = p0 * s0 + p1 * s1;
            else
                t[mx][j % NCH] += p0 * s0 + p1 * s1;
        }
    }
    for (int mx = 0; mx < MX; mx++) {
        VF u = t[mx][0];
        for (int c = 1; c < NCH; c++) u += t[mx][c];
        acc[mx] += u;
    }
}

KINL void SFX(blk_q4_k)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, __m256 *macc) {
    SFX(blk_qk)(b, x, ldx, MX, xs, ldxs, acc, macc, 0);
}

KINL void SFX(blk_q5_k)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, __m256 *macc) {
    SFX(blk_qk)(b, x, ldx, MX, xs, ldxs, acc, macc, 1);
}

/* F16 / BF16 rows, taken 32 elements at a time (the fused path runs them when K % 32 == 0). */
KINL void SFX(blk_f16)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                      long ldxs, VF *acc, float *macc) {
    VF w[32 / VL];
    for (int g = 0; g < 32 / VL; g++) w[g] = ldh(b + 2 * g * VL);
    for (int mx = 0; mx < MX; mx++) {
        const float *xr = x + mx * ldx;
        VF p = w[0] * ldf(xr);
        for (int g = 1; g < 32 / VL; g++) p += w[g] * ldf(xr + g * VL);
        acc[mx] += p;
    }
    (void)xs, (void)ldxs, (void)macc;
}

KINL void SFX(blk_bf16)(const uint8_t *b, const float *x, long ldx, const int MX, const float *xs,
                       long ldxs, VF *acc, float *macc) {
    VF w[32 / VL];
    for (int g = 0; g < 32 / VL; g++) w[g] = ldbh(b + 2 * g * VL);
    for (int mx = 0; mx < MX; mx++) {
        const float *xr = x + mx * ldx;
        VF p = w[0] * ldf(xr);
        for (int g = 1; g < 32 / VL; g++) p += w[g] * ldf(xr + g * VL);
        acc[mx] += p;
    }
    (void)xs, (void)ldxs, (void)macc;
}

/* Row drivers: R weight rows at a time, each block applied to MX activation rows (MX <= 4).
 * XSB: entries of xs per block. MT: type of the offset accumulator, MFINAL(m): its share of y. */
#if VL == 16
#define ROWS_FOR(MX) 4
#else
#define ROWS_FOR(MX) ((MX) <= 2 ? 4 : 2)  /* 16 ymm registers: keep R * MX accumulators <= 8 */
#endif
/* Software prefetch: while a group of rows is processed, the group PF_GROUPS ahead is requested at the
 * same pace, so that about PF_BYTES are in flight: the hardware prefetchers alone leave the kernels
 * well short of the memory bandwidth when the weights stream from DRAM. */
#ifndef PF_BYTES
#define PF_BYTES 8192
#endif
#define PF_GROUPS(group_bytes) (((long)PF_BYTES + (long)(group_bytes) - 1) / (long)(group_bytes))
#define FUSED(NAME, TS, BS, XSB, MT, MZERO, MFINAL)                                                   \
    KINL void SFX(rows_##NAME)(const uint8_t *w, size_t rb, const int R, const float *x, long K,     \
                               const int MX, const float *xs, float *y, long ldy) {                  \
        VF acc[16];                                                                                   \
        MT macc[16];                                                                                  \
        const long nblk = K / BS, ldxs = K / 32;                                                      \
        const char *pf = (const char *)w + PF_GROUPS(R * rb) * R * rb;                                \
        for (int r = 0; r < R * MX; r++) acc[r] = (VF){0}, macc[r] = MZERO;                           \
        for (long i = 0; i < nblk; i++, pf += R * TS) {                                              \
            for (int o = 0; o < R * TS; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);                   \
            for (int r = 0; r < R; r++)                                                               \
                SFX(blk_##NAME)(w + r * rb + i * TS, x + i * BS, K, MX, xs + i * XSB, ldxs,           \
                                acc + r * MX, macc + r * MX);                                         \
        }                                                                                             \
        for (int r = 0; r < R; r++)                                                                   \
            for (int mx = 0; mx < MX; mx++)                                                           \
                y[mx * ldy + r] = hsum(acc[r * MX + mx]) + MFINAL(macc[r * MX + mx]);                 \
    }                                                                                                 \
    KINL void SFX(fused_##NAME##_mx)(const uint8_t *w, size_t rb, long n, const float *x,            \
                                     const float *xs, const int MX, long K, float *y, long ldy) {    \
        const int R = ROWS_FOR(MX);                                                                   \
        long i = 0;                                                                                   \
        for (; i + R <= n; i += R) SFX(rows_##NAME)(w + i * rb, rb, R, x, K, MX, xs, y + i, ldy);   \
        for (; i < n; i++) SFX(rows_##NAME)(w + i * rb, rb, 1, x, K, MX, xs, y + i, ldy);            \
    }                                                                                                 \
    KFN void SFX(fused_##NAME)(const uint8_t *w, size_t rb, long n, const float *x, const float *xs, \
                               long M, long K, float *y, long ldy) {                                  \
        switch (M) {                                                                                  \
            case 1: SFX(fused_##NAME##_mx)(w, rb, n, x, xs, 1, K, y, ldy); break;                     \
            case 2: SFX(fused_##NAME##_mx)(w, rb, n, x, xs, 2, K, y, ldy); break;                     \
            case 3: SFX(fused_##NAME##_mx)(w, rb, n, x, xs, 3, K, y, ldy); break;                     \
            case 4: SFX(fused_##NAME##_mx)(w, rb, n, x, xs, 4, K, y, ldy); break;                     \
            default: break;                                                                           \
        }                                                                                             \
    }

#define M_NONE(m) ((void)(m), 0.0f)
#define M_LANE1(m) _mm_cvtss_f32(_mm_movehdup_ps(m))
#define M_LANE0_X8(m) (-8.0f * _mm_cvtss_f32(m))
#define M_NEGSUM8(m) (-SFX(hsum8)(m))

FUSED(q4_0, 18, 32, 1, __m128, _mm_setzero_ps(), M_LANE0_X8)
FUSED(q4_1, 20, 32, 1, __m128, _mm_setzero_ps(), M_LANE1)
FUSED(q8_0, 34, 32, 1, float, 0.0f, M_NONE)
FUSED(q6_k, 210, 256, 8, float, 0.0f, M_NONE)
FUSED(q4_k, 144, 256, 8, __m256, _mm256_setzero_ps(), M_NEGSUM8)
FUSED(q5_0, 22, 32, 1, float, 0.0f, M_NONE)
FUSED(q5_1, 24, 32, 1, __m128, _mm_setzero_ps(), M_LANE1)
FUSED(q5_k, 176, 256, 8, __m256, _mm256_setzero_ps(), M_NEGSUM8)
FUSED(f16, 64, 32, 1, float, 0.0f, M_NONE)
FUSED(bf16, 64, 32, 1, float, 0.0f, M_NONE)

#undef M_NONE
#undef M_LANE1
#undef M_LANE0_X8
#undef M_NEGSUM8
#undef ROWS_FOR

/* ---- tiled path ---- */

#if VL == 16
#define RM 4
#else
#define RM 2
#endif

/* acc[i][j] (VL lanes each, at acc + (i*RN + j)*VL) += w row j . x row i over kcl elements.
 * wb: RN rows KC apart; x: rm rows ldx apart. Elements past the last whole vector go to lane 0. */
KINL void mk(const float *wb, const float *x, long ldx, long kcl, float *acc, const int rm) {
    VF a[RM][RN];
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < RN; j++) a[i][j] = ldf(acc + (i * RN + j) * VL);
    long k = 0;
    for (; k + VL <= kcl; k += VL) {
        VF wv[RN];
        for (int j = 0; j < RN; j++) wv[j] = ldf(wb + j * KC + k);
        for (int i = 0; i < rm; i++) {
            VF xv = ldf(x + i * ldx + k);
            for (int j = 0; j < RN; j++) a[i][j] += wv[j] * xv;
        }
    }
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < RN; j++) stf(acc + (i * RN + j) * VL, a[i][j]);
    for (; k < kcl; k++)
        for (int i = 0; i < rm; i++)
            for (int j = 0; j < RN; j++) acc[(i * RN + j) * VL] += wb[j * KC + k] * x[i * ldx + k];
}

KFN void SFX(mk_group)(const float *wb, const float *x, long ldx, long kcl, float *acc, int rm) {
    switch (rm) {
        case 1: mk(wb, x, ldx, kcl, acc, 1); break;
        case 2: mk(wb, x, ldx, kcl, acc, 2); break;
#if RM > 2
        case 3: mk(wb, x, ldx, kcl, acc, 3); break;
        case 4: mk(wb, x, ldx, kcl, acc, 4); break;
#endif
        default: break;
    }
}

KFN void SFX(tile)(dec_fn dec, int bs, int ts, const uint8_t *w, size_t rb, long n0, long n1,
                   const float *x, long M, long K, float *y, long N) {
    float wbuf[RN * KC] __attribute__((aligned(64)));
    float accb[MB * RN * VL] __attribute__((aligned(64)));
    const long pf_rows = RN * PF_GROUPS(RN * rb);  /* prefetch this many rows ahead (see FUSED) */
    for (long m0 = 0; m0 < M; m0 += MB) {
        long mb = M - m0 < MB ? M - m0 : MB;
        for (long nb = n0; nb < n1; nb += RN) {
            long rn = n1 - nb < RN ? n1 - nb : RN;
            memset(accb, 0, sizeof(float) * (size_t)(mb * RN * VL));
            if (rn < RN) memset(wbuf, 0, sizeof wbuf);  /* missing rows multiply as zeros */
            for (long kc = 0; kc < K; kc += KC) {
                long kcl = K - kc < KC ? K - kc : KC;
                const size_t off = (size_t)(kc / bs) * ts, bytes = (size_t)(kcl / bs) * ts;
                for (long j = 0; j < rn; j++) {
                    const char *pf = (const char *)w + (size_t)(nb + j + pf_rows) * rb + off;
                    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
                    dec(w + (size_t)(nb + j) * rb + off, (int)(kcl / bs), wbuf + j * KC);
                }
                for (long i = 0; i < mb; i += RM)
                    SFX(mk_group)(wbuf, x + (m0 + i) * K + kc, K, kcl, accb + i * RN * VL,
                                  (int)(mb - i < RM ? mb - i : RM));
            }
            for (long i = 0; i < mb; i++)
                for (long j = 0; j < rn; j++) y[(m0 + i) * N + nb + j] = hsum(ldf(accb + (i * RN + j) * VL));
        }
    }
}

/* ---- attention and SwiGLU helpers for the fused decode step ---- */

#if VL == 16
KINL VF SFX(vclamp)(VF x, float lo, float hi) {
    return (VF)_mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}
#else
KINL VF SFX(vclamp)(VF x, float lo, float hi) {
    return (VF)_mm256_min_ps(_mm256_max_ps((__m256)x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
}
#endif

/* e^x: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7 (relative error < 1e-7 on
 * that range), 2^n built in the exponent bits. Inputs are clamped to [-88, 88]; e^-88 comes out as 0. */
KINL VF SFX(vexp)(VF x) {
    x = SFX(vclamp)(x, -88.0f, 88.0f);
    VI n = __builtin_convertvector(x * splat(1.44269504f) + splat(128.5f), VI) - 128;  /* round(x/ln2) */
    VF nf = cvt(n);
    VF r = x - nf * splat(0.693145752f) - nf * splat(1.42860677e-06f);  /* ln2 split hi + lo */
    VF p = splat(1.0f / 5040);
    p = p * r + splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    return p * (VF)((n + 127) << 23);
}

KFN void SFX(silu_mul)(const float *g, const float *u, float *out, long n) {
    long i = 0;
    for (; i + VL <= n; i += VL) {
        VF gv = ldf(g + i);
        stf(out + i, gv / (splat(1.0f) + SFX(vexp)(-gv)) * ldf(u + i));
    }
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

KFN void SFX(attend)(const float *q, const float *k, const float *v, long S, long D, const int64_t *kpos,
                     int64_t qpos, long window, float scale, float *sc, float *out) {
    float mx = -INFINITY;
    for (long s = 0; s < S; s++) {
        if (!visible(kpos[s], qpos, window)) {
            sc[s] = -INFINITY;
            continue;
        }
        const float *ks = k + s * D;
        VF acc = splat(0.0f);
        long d = 0;
        for (; d + VL <= D; d += VL) acc += ldf(q + d) * ldf(ks + d);
        float t = hsum(acc);
        for (; d < D; d++) t += q[d] * ks[d];
        sc[s] = t * scale;
        if (sc[s] > mx) mx = sc[s];
    }
    if (mx == -INFINITY) {  /* nothing visible (callers skip such rows) */
        memset(out, 0, sizeof(float) * (size_t)D);
        return;
    }
    long s = 0;
    VF sumv = splat(0.0f);
    for (; s + VL <= S; s += VL) {  /* masked slots hold -inf: clamped to -88, e^-88 -> 0 */
        VF e = SFX(vexp)(ldf(sc + s) - splat(mx));
        stf(sc + s, e);
        sumv += e;
    }
    float sum = hsum(sumv);
    for (; s < S; s++) {
        sc[s] = sc[s] == -INFINITY ? 0.0f : expf(sc[s] - mx);
        sum += sc[s];
    }
    for (long d = 0; d < D; d++) out[d] = 0.0f;
    for (s = 0; s < S; s++) {
        if (sc[s] == 0.0f) continue;
        const float *vs = v + s * D;
        VF p = splat(sc[s]);
        long d = 0;
        for (; d + VL <= D; d += VL) stf(out + d, ldf(out + d) + p * ldf(vs + d));
        for (; d < D; d++) out[d] += sc[s] * vs[d];
    }
    for (long d = 0; d < D; d++) out[d] /= sum;
}

static const isa_ops SFX(OPS) = {
#if VL == 16
    "avx512",
#else
    "avx2",
#endif
    {[T_F32] = SFX(dec_f32), [T_F16] = SFX(dec_f16), [T_BF16] = SFX(dec_bf16),
     [T_Q4_0] = SFX(dec_q4_0), [T_Q4_1] = SFX(dec_q4_1), [T_Q5_0] = SFX(dec_q5_0),
     [T_Q5_1] = SFX(dec_q5_1), [T_Q8_0] = SFX(dec_q8_0), [T_Q4_K] = SFX(dec_q4_k),
     [T_Q5_K] = SFX(dec_q5_k), [T_Q6_K] = SFX(dec_q6_k)},
    {[T_Q4_0] = SFX(fused_q4_0), [T_Q4_1] = SFX(fused_q4_1), [T_Q8_0] = SFX(fused_q8_0),
     [T_Q5_0] = SFX(fused_q5_0), [T_Q5_1] = SFX(fused_q5_1), [T_Q4_K] = SFX(fused_q4_k),
     [T_Q5_K] = SFX(fused_q5_k), [T_Q6_K] = SFX(fused_q6_k), [T_F16] = SFX(fused_f16),
     [T_BF16] = SFX(fused_bf16)},
    SFX(tile),
    SFX(attend),
    SFX(silu_mul),
};

#undef RM
#undef LANES
#undef FUSED
#undef KFN
#undef KINL
#undef VF
#undef VI
#undef VB
#undef VSB
#undef ldf
#undef stf
#undef ldu8
#undef lds8
#undef cvt
#undef splat
#undef hsum
#undef h2f
#undef mk
#undef q5f
#undef bcast0
#undef q4f
#undef ldh
#undef ldbh
#undef VU

#endif /* TRAM_PASS */
