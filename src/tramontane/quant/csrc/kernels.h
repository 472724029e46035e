/*
 * kernels.h: the internal interface between the files of tramontane.quant._kernels (float32
 * activations times GGUF-packed weights, without unpacking the weights to float in memory).
 * Owns the tiling constants, the kernel function types, the per-instruction-set `isa_ops` table and
 * the declarations each file provides to the others.
 *
 * Files:
 *   blocks.h / blocks.c   GGML block types, fp16/bf16 conversion, the portable per-type decoders
 *   scalar.c              the portable instruction set: tiled matmul, attention, SwiGLU in plain C
 *   simd.inc (+ simd_*.inc), compiled once per vector instruction set by simd_avx2.c and
 *                         simd_avx512.c: decoders, fused small-M kernels, tiled path, attention
 *   isa.c                 which instruction set runs (chosen at run time, settable for tests)
 *   matmul.c              matmul and dequantize over threads (row splitting)
 *   greedy.c              greedy tokens from a Q8_0 head: a bound pass, then the exact logits of a few groups
 *   rows.c                each row's argmax of a step's logits, the rows over the threads
 *   tiles_bf16.c          prompt chunks' matmuls on AMX-BF16 tiles (weights decoded to bfloat16 per panel)
 *   block_step.c          one transformer block of a one-token decoding step
 *   module.c              the Python bindings: argument parsing, extent checks, module init
 *
 * Structure. The portable path is plain C (what aarch64 gets). On x86-64 the vector source is
 * compiled twice more, once for AVX2+FMA and once for AVX-512 (F/BW/VL/DQ with VNNI; AMX tiles where
 * the CPU and Linux grant them, simd_amx.inc), with the ISA given per function by
 * __attribute__((target)), so the binary needs no -march flag and picks its path at run time with
 * __builtin_cpu_supports. Each vector pass provides, per type:
 *   - a block decoder (blocks -> float32), used by dequantize_rows and by the tiled path;
 *   - for every type but F32, a fused kernel for M <= FUSED_M activation rows: a block is widened
 *     to float in registers once and multiplied into each activation row; the block's scale
 *     multiplies each partial sum once and additive offsets go through per-32 sums of x (per-16 for
 *     Q2_K's mins); the weights of the group of rows a few KiB ahead are software-prefetched
 *     (streaming from DRAM the hardware prefetchers alone reach about half the bandwidth);
 *   - for the K-quants, Q4_0, Q4_1 and Q8_0, an integer-activation kernel (simd_q8.inc): x rounded to
 *     int8 once per call, quants multiplied as bytes (AVX-512: vpdpbusd; the interleaved legacy types'
 *     and Q4_K's batches of 16+ rows on AMX tiles, simd_amx.inc; the same integers, so the same bits, in every
 *     pass); the default where matmul.c and kernels.py say it measured faster, off under the exact
 *     (float32) setting;
 * and one tiled path for larger M (and for the types without a fused kernel): RN weight rows are
 * decoded KC elements at a time into a small float buffer that stays in L1, then a register-blocked
 * RM x RN micro-kernel multiplies it into every activation row, so each weight block is decoded once
 * per MB activation rows.
 * Threads (OpenMP, count given per call; the team is libgomp's, shared with torch's when torch is
 * loaded first) split the N output rows in contiguous ranges of whole RN-row groups, so the result
 * does not depend on the thread count.
 */
#ifndef TRAM_KERNELS_H
#define TRAM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "blocks.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Inside an OpenMP parallel region: this thread's index and the team's size (0 and 1 without OpenMP). */
static inline void tram_team(int *th, int *nt) {
#ifdef _OPENMP
    *th = omp_get_thread_num(), *nt = omp_get_num_threads();
#else
    *th = 0, *nt = 1;
#endif
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && !defined(TRAM_PORTABLE_ONLY)
#define TRAM_X86 1
#endif

#define RN 4     /* weight rows per tile */
#define KC 256   /* elements of a row decoded per step (a multiple of every block size) */
#define MB 64    /* activation rows sharing one decode of a weight tile */
#define FUSED_M 4  /* up to this many activation rows, the fused kernels (where a type has one) */

typedef void (*dec_fn)(const uint8_t *blocks, int nblocks, float *out);
/* Fused, M <= FUSED_M activation rows: y[m, 0..n) (rows ldy apart) = rows of w (rb bytes apart) . x[m];
 * xs: sums of x per 32 elements, [M][K/32] (Q2_K: per 16, [M][K/16]; NULL for the types that read none). */
typedef void (*fused_fn)(const uint8_t *w, size_t rb, long n, const float *x, const float *xs, long M,
                         long K, float *y, long ldy);
/* Activations rounded to int8 per 256 elements for the K-quants ("Q8_K", as llama.cpp's K-quant dot
 * products take them), per 32 for the legacy types ("Q8_0"): row m, element k is about
 * d[m * K/blk + k/blk] * q[m * K + k]; bs[m * K/16 + j] is the sum of q over elements 16j..16j+15
 * (the integer offsets of Q3_K and Q6_K go through it, and the sums of the rounded x, xs).
 * pair ("q16", the interleaved types' kernels): rows 2m and 2m + 1 are two parts of one activation row
 * m, x and what its rounding left at 1/256 of its step (matmul.c); the kernel writes their results' sum as
 * row m of y. tab and wide (NULL where not made), made once a call by the interleaved types' kernels of
 * many rows (simd_q8.inc): the closes' activation scales of a block of rows (r8_scales) and, for Q8_0,
 * each pair as one int16 row, 256 q1 + q2 (r8_wide). ld: elements from one row of q to the next, K or
 * more (matmul.c's q8_stride: rows a multiple of 1 KB apart would all fall in a few of the L1's sets).
 * Row m's scales and sums stay K / blk and K / 16 apart. */
typedef struct {
    const int8_t *q;
    long ld;
    const float *d;
    const int16_t *bs;
    int pair;
    const float *tab;
    const int16_t *wide;
} q8_rows;
/* Fused with integer dot products, any M: as fused_fn, x given as its int8 rounding xq (and, for the
 * types with offsets or mins, the sums xs of the rounded x, laid out as the float kernel takes them). */
typedef void (*fused_q8_fn)(const uint8_t *w, size_t rb, long n, const q8_rows *xq, const float *xs, long M,
                            long K, float *y, long ldy);
/* nb blocks of blk floats at x rounded to int8 (q, scales d, sums of q per 16 in bs), as q8_rows; with
 * `fixed`, block b's scale is fixed[b] / 256 (q16's second part, fixed = the first part's scales). */
typedef void (*q8_fn)(const float *x, long nb, long blk, const float *fixed, int8_t *q, float *d, int16_t *bs);
/* q16's two parts of nb blocks of blk floats at x in one pass: q, d, bs as q8_fn rounds x, and q2, d2,
 * bs2 as q8_fn rounds what that left, x - d q, with fixed = d (tram_round_q16). */
typedef void (*q16_fn)(const float *x, long nb, long blk, int8_t *q, float *d, int16_t *bs, int8_t *q2, float *d2,
                       int16_t *bs2);
/* Tiled: y[m, n] (rows N apart) for n in [n0, n1), every m < M, from rows of w decoded with `dec`. */
typedef void (*tile_fn)(dec_fn dec, int bs, int ts, const uint8_t *w, size_t rb, long n0, long n1,
                        const float *x, long M, long K, float *y, long N);

/* One block of keys (at most ATT_KB) folded into the running softmax of nq queries that share them
 * (online softmax: Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018), so that
 * no query ever holds more than a block of scores, however long its context. Query j (D floats at q[j])
 * sees the first n[j] (0..ATT_KB) of the block's keys, key i at k + off[i] and its value at v + off[i]
 * (element offsets: the caller decides the layout and which keys are visible); ml[2j] is its running
 * maximum score, ml[2j + 1] its running sum of e^(score - max) and out[j] its running sum of
 * e^(score - max) v, which a block that raises the maximum rescales. The caller starts every ml at
 * (-inf, 0), out[j] is not read before its first key, and out[j] / ml[2j + 1] is the attention once
 * every block is in. The block's keys and values are read once for all the queries (the heads of one kv
 * head, the rows of one prefill chunk), and a query's result does not depend on which others share the
 * call. off holds ATT_PAD(max n) entries (the caller pads with a valid offset); sc is scratch of
 * nq * ATT_KB floats; pf (NULL: none): other rows to request from memory as it goes (tram_pf). */
#define ATT_PAD(n) (((n) + 7) & ~7L)
#define ATT_KB 64
#define ATT_NEXT 16  /* attend_q8_fn: rows of the next block's keys given along, to prefetch */
/* Cache rows an attention kernel requests into L2 a few at a time between its own loads (tram_pf_step;
 * NULL: none): the keys and values of the next item its thread attends (block_step.c's attend_rows), so
 * that they arrive while this one computes. A decoding row's keys were last read a whole step ago, and
 * the step's weights have since gone through every cache: attending them cold took 2.3x as long as a
 * second pass over the same keys (SmolLM2, 16 rows of ~40 keys). Requested all at once before the
 * item they gained nothing (the loads that need them first wait behind the queue), nor the values
 * asked beside each key instead of after all the keys. */
typedef struct {
    const uint8_t *k, *v;  /* the layer's keys and values */
    const size_t *rows;    /* [n] the next item's cache rows, base + rows[i] (each rb bytes from k and v) */
    size_t base, rb;
    long n, i;             /* rows to request (each a key and a value); the next of the 2n, keys first */
} tram_pf;
#define PF_ROWS 6  /* rows requested per step (a key's or a value's): 8 keys scored (and one a value mixed) */

static inline void tram_pf_step(tram_pf *p, long rows) {
    for (long r = 0; p && r < rows && p->i < 2 * p->n; r++, p->i++) {  /* the keys first: scored first */
        const long i = p->i < p->n ? p->i : p->i - p->n;
        const char *row = (const char *)(p->i < p->n ? p->k : p->v) + (p->base + p->rows[i]) * p->rb;
        for (size_t o = 0; o < p->rb; o += 64) __builtin_prefetch(row + o, 0, 2);
    }
}

typedef void (*attend_fn)(const float *const *q, float *const *out, long nq, const long *n, const float *k,
                          const float *v, const size_t *off, long D, float scale, float *sc, float *ml, tram_pf *pf);
/* As attend_fn over a float16 or bfloat16 cache, its rows as they are (off: element offsets), widened in
 * registers: the same floats, and so the same result, as attend_fn on the rows decoded. */
typedef void (*attend16_fn)(const float *const *q, float *const *out, long nq, const long *n, const uint8_t *k,
                            const uint8_t *v, const size_t *off, long D, float scale, float *sc, float *ml,
                            tram_pf *pf);
/* As attend_fn over a Q8_0 cache: key and value i as Q8_0 rows of D elements at krows[i] and vrows[i],
 * the queries as their int8 rounding per 32 (xq: row j of D for query j; with pair, under q16, rows 2j
 * and 2j + 1, the query and what its rounding left, as matmul.c's pairs). The scores come from
 * integer dot products (as llama.cpp scores a q8_0 cache) and each value is decoded in registers and
 * met by the queries in turn: the fast activations' path (the exact one decodes keys and values).
 * krows and vrows hold `given` entries: this block's keys, then the next block's first (ATT_NEXT at most:
 * the kernel prefetches them). w is scratch of (D / 32 + 4) * ATT_KB floats. */
typedef void (*attend_q8_fn)(const q8_rows *xq, float *const *out, long nq, const long *n,
                             const uint8_t *const *krows, const uint8_t *const *vrows, long given, long D,
                             float scale, float *sc, float *ml, float *w);
/* out[i] = silu(g[i]) * u[i], silu(g) = g / (1 + e^-g). */
typedef void (*silu_fn)(const float *g, const float *u, float *out, long n);
/* The index of the largest of x[0..n) (n >= 1), the first of equal ones; the first NaN where there is
 * one: numpy's argmax, and torch's. */
typedef long (*argmax_fn)(const float *x, long n);
/* n floats -> a KV cache's row of their type at out, bit for bit blocks.c's tram_enc_row. */
typedef void (*enc_fn)(const float *x, long n, uint8_t *out);

/* Greedy decoding's first look at a Q8_0 head (interleaved, T_Q8_0_R8): rows [0, n) of w (whole pairs
 * of groups of 8) against M <= 16 rows of x rounded to int8 (q1, as q16's first rows) given as q1 + 128
 * (xu, rows K apart) and their scales dx (rows K / 32 apart): per row j, ghi[j * ldg + g] the largest
 * bound P + cE of group g's logits and lo[j] raised to the largest P - cE, bad[j] set where any is not a
 * finite number (simd_q8.inc, greedy.c); ab: room for 16 K / 32 floats. */
typedef void (*bound_fn)(const uint8_t *w, size_t rb, long n, const uint8_t *xu, const float *dx, long M, long K,
                         float c, float *ab, float *ghi, long ldg, float *lo, uint8_t *bad);
/* The kernels of one instruction set. */
typedef struct {
    const char *name;
    dec_fn dec[T_COUNT];
    fused_fn fused[T_COUNT];
    tile_fn tile;
    attend_fn attend;
    silu_fn silu_mul;
    fused_q8_fn fused_q8[T_COUNT];  /* the K-quants with integer-activation kernels (NULL: none) */
    q8_fn quantize_q8;              /* their activations' rounding (where fused_q8 has any) */
    q16_fn round_q16;               /* the same as q16's two parts, in one pass */
    attend_q8_fn attend_q8_0;       /* attention over a Q8_0 cache with rounded queries (NULL: none) */
    attend16_fn attend_f16, attend_bf16;  /* over a 16-bit cache's own rows (NULL: decoded first) */
    enc_fn enc_f16;                       /* a float16 cache's rows (NULL: tram_enc_row) */
    argmax_fn argmax;
    bound_fn bound_q8r8;  /* NULL where the pass has no VNNI */
} isa_ops;

static inline int visible(int64_t kp, int64_t qpos, long window) {
    return kp >= 0 && kp <= qpos && (window <= 0 || qpos - kp < window);
}

/* *out = unit * a * b * c * d bytes (factors >= 0); returns 0, or -1 when that overflows size_t. */
static inline int tram_extent(size_t *out, size_t unit, long a, long b, long c, long d) {
    size_t n = unit;
    if (__builtin_mul_overflow(n, (size_t)a, &n) || __builtin_mul_overflow(n, (size_t)b, &n) ||
        __builtin_mul_overflow(n, (size_t)c, &n) || __builtin_mul_overflow(n, (size_t)d, &n))
        return -1;
    *out = n;
    return 0;
}

/* *out = bytes of `rows` packed rows of K elements of qtype (K a multiple of its block size). */
static inline int tram_packed_extent(size_t *out, int qtype, long rows, long K) {
    return tram_extent(out, (size_t)tram_types[qtype].size, K / tram_types[qtype].block, rows, 1, 1);
}

/* block_step.c: a key's or value's row of n floats into a KV cache row of type kvt, as the compiled step
 * stores them: a float16 row through the pass's encoder where it has one (ops->enc_f16), the others
 * (and the portable pass's) through tram_enc_row; the same bits either way. */
TRAM_HIDDEN void tram_store_row(const isa_ops *ops, int kvt, const float *x, long n, uint8_t *out);

/* scalar.c, simd_avx2.c, simd_avx512.c */
extern TRAM_HIDDEN const isa_ops tram_ops_scalar;
#ifdef TRAM_X86
extern TRAM_HIDDEN const isa_ops tram_ops_avx2;
extern TRAM_HIDDEN const isa_ops tram_ops_avx512;
#endif

/* isa.c: the instruction set in use (the best this CPU runs unless a test chose another). */
TRAM_HIDDEN void tram_isa_init(void);
/* isa.c: whether the AVX-512 pass may use AMX tiles (the CPU has AMX-INT8 and Linux granted the tile
 * data to this process), for its integer kernels at 16 activation rows and more (simd_amx.inc); read
 * inline, as the Q4_K kernels ask at every super-block (K4_JOIN). */
extern TRAM_HIDDEN int tram_amx_granted;
static inline int tram_amx(void) { return tram_amx_granted; }
/* isa.c: whether those tiles also multiply bfloat16 (AMX-BF16: tiles_bf16.c). */
TRAM_HIDDEN int tram_amx_bf16(void);
TRAM_HIDDEN const isa_ops *tram_isa_current(void);
/* The instruction sets this CPU runs, best first, into names[3]; returns their count. */
TRAM_HIDDEN int tram_isa_names(const char *names[3]);
/* Use `name` ('avx512', 'avx2', 'scalar' or 'best'); returns 0, or -1 when this CPU cannot. */
TRAM_HIDDEN int tram_isa_select(const char *name);

/* matmul.c. x [M, K] as the interleaved kernels' q16 pairs per 32 elements (2M int8 rows, pair set) into
 * xq, their memory *mem (malloc'd, the caller's to free); returns 0, or -1 when out of memory. */
TRAM_HIDDEN int tram_q16_rows(const isa_ops *ops, const float *x, long M, long K, q8_rows *xq, void **mem);
/* A logit bias every row shares: vals[i] added to the logit of token ids[i] (n distinct ids in [0, N)). */
typedef struct {
    const int64_t *ids;
    const float *vals;
    long n;
} tram_bias;
/* greedy.c. out[m] = the argmax of row m of x [M, K] @ W^T plus the bias (float32 sums), W a Q8_0 head
 * (T_Q8_0_R8, N rows), the logits as tram_matmul computes them under q16 without computing them all;
 * returns 0, -1 when out of memory, or 1 where it does not apply (another type or setting, a pass
 * without VNNI, x not finite): then nothing was written. */
TRAM_HIDDEN int tram_greedy_rows(const isa_ops *ops, const float *x, const uint8_t *w, long M, long N, long K,
                                 int qtype, const tram_bias *bias, int n_threads, int64_t *out);
/* rows.c. out[m] = argmax of row m of x [M, N] (argmax_fn), rows split over n_threads threads. */
TRAM_HIDDEN void tram_argmax_rows(const isa_ops *ops, const float *x, long M, long N, int64_t *out, int n_threads);

/* matmul.c. y[M,N] = x[M,K] @ W^T, W as N rows of GGML blocks of type qtype (row r at w + r * row
 * bytes; the interleaved types: groups of 8 rows at w + 8 g * row bytes); returns 0, or -1 when out of
 * memory. */
TRAM_HIDDEN int tram_matmul(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N,
                            long K, int qtype, int n_threads);
/* The caller's per-row work that a matmul runs on its own threads (block_step.c: the norms, the gating
 * and the residual adds between the projections, which the calling thread had run alone with the other
 * waiting): `before` makes rows [m0, m1) of x, each thread the rows it then rounds to int8 (all of them
 * first, on the calling thread, where the rows are not rounded in the parallel region); `after` takes
 * rows [m0, m1) x columns [n0, n1) of y once they are final. Either may be NULL. */
typedef struct {
    void (*before)(const void *ctx, long m0, long m1);
    void (*after)(const void *ctx, const float *y, long ldy, long m0, long m1, long n0, long n1);
    const void *ctx;
} matmul_hooks;
/* tram_matmul with the caller's hooks (NULL: none). */
TRAM_HIDDEN int tram_matmul_hooked(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N,
                                   long K, int qtype, int n_threads, const matmul_hooks *h);
/* tiles_bf16.c. As tram_matmul, with x rounded to bfloat16 and multiplied on AMX-BF16 tiles where
 * tram_tiles_ok (else tram_matmul itself): prompt chunks' many rows. */
TRAM_HIDDEN int tram_tiles_bf16(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N,
                                long K, int qtype, int n_threads);
/* Whether tram_tiles_bf16 runs W [N, K] of qtype (a supported type) on tiles: the AVX-512 pass in use, AMX-BF16
 * granted, K a multiple of 32. */
TRAM_HIDDEN int tram_tiles_ok(const isa_ops *ops, long N, long K, int qtype);
/* The fewest tokens of a prompt whose prompt rows take the tiles (block_step.c, kernels.py), or 0 where
 * none do: no AMX-BF16, another instruction set chosen, the exact setting, or switched off
 * (tram_set_tiles(0), for tests; returns the previous switch). */
TRAM_HIDDEN long tram_tiles_from(void);
/* attend_fn's contract (one block of keys for nq queries; keys and values rows of kvt: T_F32, or a 16-bit
 * cache's own, T_F16 or T_BF16, off in elements) on AMX-BF16 tiles: the queries, keys, probabilities and
 * values rounded to bfloat16, their products summed in float32; each query's result its own. For the
 * prompt chunks that take the tiles (block_step.c), where tram_attend_tiles_ok; mem:
 * tram_attend_tiles_bytes of scratch. */
TRAM_HIDDEN int tram_attend_tiles_ok(long nq, long D);
TRAM_HIDDEN size_t tram_attend_tiles_bytes(long nq, long D);
TRAM_HIDDEN void tram_attend_tiles(const float *const *q, float *const *out, long nq, const long *n, const void *k,
                                   const void *v, int kvt, const size_t *off, long D, float scale, float *sc,
                                   float *ml, void *mem);
TRAM_HIDDEN int tram_set_tiles(int on);
/* Activations of the fused kernels: 1 = rounded to int8 per 256 (Q8_K) or 32 for the types with
 * integer kernels, 2 = the same as two int8 rows (x and what its rounding left, matmul.c), 0 = float32
 * everywhere (the exact path). Process-wide, set from Python. */
TRAM_HIDDEN void tram_set_q8(int mode);
TRAM_HIDDEN int tram_q8(void);
/* One row x of K floats as q16's two int8 rows (q, q + ld; scales d, d + K / blk; sums bs, bs + K / 16):
 * x rounded per blk, then what that left at 1/256 of each block's step (the instruction set's round_q16). */
TRAM_HIDDEN void tram_round_q16(const isa_ops *ops, const float *x, long K, long ld, long blk, int8_t *q, float *d,
                                int16_t *bs);
/* out[N,K] = W as float32; returns 0, or -1 when out of memory. */
TRAM_HIDDEN int tram_dequantize(const isa_ops *ops, const uint8_t *w, float *out, long N, long K, int qtype,
                                 int n_threads);

/* out[i] = row idx[i] of W [N,K] as float32, i < n (every idx in [0, N): checked by the caller); returns
 * 0, or -1 when out of memory. */
TRAM_HIDDEN int tram_lookup(const isa_ops *ops, const uint8_t *w, const int64_t *idx, long n, long K, int qtype,
                            float *out);

/* block_step.c: one transformer block for a step of new tokens, one per row, on an offline or a paged
 * cache (see there). */
typedef struct {
    float *x;                           /* [B, dim] residual stream, updated in place */
    long B, dim, H, Hkv, D, F;          /* rows, model dim, heads, kv heads, head dim, ffn hidden */
    const float *norm1, *norm2;         /* [dim] attention_norm and ffn_norm weights */
    float eps;
    const uint8_t *wqkv, *wo, *w13, *w2;  /* packed [(H+2Hkv)D, dim], [dim, HD], [2F, dim], [dim, F] */
    int tqkv, to, t13, t2;              /* their GGML types */
    /* q, k, v (gate, up) of different types, as GGUF's mixed recipes write them (Q4_K_M: attn_v Q8_0 in
     * some layers, Q5_0 q and k where rows are too short for Q4_K): wk, wv, w3 hold the part starting
     * there, of type tk, tv, t3; one that is empty (NULL, no bytes) continues the piece before it. So
     * wqkv holds q, then k unless wk is given, then v unless wv is given; w13 holds gate, then up unless
     * w3 is given. Rows of each piece (0: not given) in rows_qkv[wqkv, wk, wv] and rows_13[w13, w3]. */
    const uint8_t *wk, *wv, *w3;
    int tk, tv, t3;
    long rows_qkv[3], rows_13[2];
    const float *cs;                    /* [B, D/2, 2] cos, sin of each row's position */
    uint8_t *kc, *vc;                   /* this layer's cache: offline [B, Hkv, S, D], paged [P / bs, Hkv, bs,
                                           D] (a block's rows head by head), each row of D elements stored
                                           as type kvt (F32, F16, BF16 or Q8_0) */
    int kvt;
    long S;                             /* offline: slots per row; paged: the most keys a row attends */
    const int64_t *kpos;                /* offline: [B, S] position held by each slot (-1 = empty), this
                                           step's included; paged: unused */
    const int64_t *qpos;                /* [B] position of each row's new token (-1 = padding) */
    long window;                        /* sliding window, 0 = none */
    int threads;
    /* Mixtral blocks (E > 0): the feed-forward is K of E experts, routed per row; w13 is unused and w2
     * is the stack of the experts' down projections [E, dim, F]. */
    long E, K;                          /* experts, experts per token (0, 0 for a dense block) */
    const float *gate;                  /* [E, dim] float32 router */
    const uint8_t *w1e, *w3e;           /* packed stacks [E, F, dim] (gate and up projections) */
    int t1e, t3e;                       /* their GGML types */
    /* Paged cache (P > 0): row b belongs to the sequence whose block table is tables[seq[b]] (T block
     * ids, -1 = none); its token at position p lives in pool slot table[p / bs] * bs + p % bs, and it
     * attends positions max(0, qpos - window + 1) .. qpos of its own sequence, every one of them. */
    long P, bs, R, T;                   /* pool slots (a multiple of bs), block size, tables, blocks per table */
    const int32_t *tables, *seq;        /* [R, T], [B] */
    /* Offline with rows mapped (`mapped`: seq given): row b is a token of cache row seq[b] < R (a prompt
     * chunk, several rows per cache row, stored before any attends; the caller keeps the chunk from
     * overwriting slots it reads); k_cache, v_cache [R, Hkv, S, D], kpos [R, S]. Unmapped: row b is cache
     * row b. Either way a row attends its visible positions in position order, slot p % S. */
    int mapped;
    /* Each sequence's prompt length (a paged step's R tables, an offline cache's rows), or NULL: row b is
     * a prompt row where qpos[b] < prompts[its sequence]; those of a prompt of tram_tiles_from() tokens
     * or more take the bfloat16 tiles (block_step.c's tile_rows). */
    const int32_t *prompts;
    /* LoRA adapters (L > 0 slots): row b adds the delta of adapter slot lora_row[b] (-1: none) to the
     * output of each projection g (0 wqkv, 1 wo, 2 w13, 3 w2). Slot s of projection g has rank
     * r = cols[g][s+1] - cols[g][s] (cols = lora_cols [4, L+1], cols[g][0] = 0, R_g = cols[g][L]); `lora`
     * holds, projection after projection, A [R_g, in_g] (the slots' rows stacked) then each slot's
     * B [out_g, r] (scale folded in), slot after slot. */
    long L;
    const int32_t *lora_row, *lora_cols;  /* [B], [4, L+1] */
    const float *lora;
} block_args;

/* The buffers of a block step, in the order of tram_block_buffer_names. */
enum {
    BUF_X, BUF_NORM1, BUF_NORM2, BUF_WQKV, BUF_WO, BUF_W13, BUF_W2, BUF_CS, BUF_KC, BUF_VC, BUF_KPOS,
    BUF_QPOS, BUF_GATE, BUF_W1E, BUF_W3E, BUF_TABLES, BUF_SEQ, BUF_LROW, BUF_LCOLS, BUF_LORA, BUF_WK, BUF_WV,
    BUF_W3, BUF_PROMPTS, BUF_COUNT
};
/* Their names in the Python binding. */
extern TRAM_HIDDEN const char *const tram_block_buffer_names[BUF_COUNT];
/* rows_qkv and rows_13 of `a` from which of wk, wv, w3 are given (a dense block; a Mixtral one has no
 * w13 pieces). */
TRAM_HIDDEN void tram_block_pieces(block_args *a, int has_k, int has_v, int has_3);
/* Bytes each buffer must hold for the shapes and types in `a` (validated first: positive dims, supported
 * types whose blocks divide the rows), but `lora`'s (tram_block_lora_extent, once lora_cols is checked);
 * returns 0, or -1 when a size does not fit in size_t. */
TRAM_HIDDEN int tram_block_extents(const block_args *a, size_t need[BUF_COUNT]);
/* Paged: -1 when row b's sequence, its block table or its span of keys is out of range (checked before
 * the step reads any), *row = b; 0 when every row is in range, or the cache is offline. */
TRAM_HIDDEN int tram_block_rows_ok(const block_args *a, long *row);
/* LoRA (L > 0): the bytes `lora` must hold; -1 when lora_cols is malformed (a row of cols not rising
 * from 0, a Mixtral block with adapters on w13 or w2) or a row's slot is out of [-1, L) (*row = that
 * row, else -1). 0 bytes without adapters. */
TRAM_HIDDEN int tram_block_lora_extent(const block_args *a, size_t *need, long *row);
/* Returns 0, or -1 when out of memory. */
TRAM_HIDDEN int tram_run_block(const isa_ops *ops, const block_args *a);
/* out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * w for B rows of n floats (out may be x): the blocks' norm. */
TRAM_HIDDEN void tram_rms_norm_rows(const float *x, const float *w, float eps, long B, long n, float *out);

#endif /* TRAM_KERNELS_H */
