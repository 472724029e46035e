/*
 * tiles_bf16.c: y[M,N] = x[M,K] @ W^T on AMX-BF16 tiles for prompt chunks (tram_tiles_bf16): the
 * weight, of any type the AVX-512 pass decodes, is decoded 32 rows at a time into bfloat16 tiles that
 * every activation row then meets, and the activations are rounded to bfloat16 once per call, as
 * transformers' bfloat16 models have them. Each dot product accumulates in float32 inside the tile, over
 * the whole row, with no per-block close.
 *
 * Why: the integer kernels close every block of 32 (a float scale for the weights' block and one for the
 * activations' per output), which on AMX-INT8 costs more vector work than the tile products themselves:
 * SmolLM2's Q4_1 blocks at 512 rows ran at 0.26 TMAC/s on 2 cores, where torch's bfloat16 GEMM ran the
 * same shapes at 0.5-0.75. torch's GEMM is not reachable from C (the compiled step runs whole blocks in
 * one call), and decoding each matrix once per call into a bfloat16 copy costs a tenth of the products at
 * 512 rows; hence this file. Only for the prompt rows of long prompts (block_step.c's rule,
 * TILES_FROM_ROWS below): decoding rows keep the integer kernels, whose results do not depend on the batch.
 *
 * Layout. A tile of activations: 16 rows of 32 bfloat16 (their row-major copy, rows K apart). A tile of
 * weights: 16 rows of 16 pairs, row r holding elements 2r, 2r + 1 of a block of 32 for each of 16 weight
 * rows (TDPBF16PS's pairs); a panel holds K / 32 such tiles for each half of 32 weight rows, made from
 * the rows decoded to float32, rounded to bfloat16 and gathered pair by pair. Per block of 32 elements,
 * two activation tiles (32 rows) times two weight tiles (32 columns) into four accumulators (tiles 0-3;
 * 4-5 activations, 6-7 weights). Each output's sum runs over the blocks in order and does not depend
 * on M, the other rows or the thread count (threads split the panels).
 *
 * The same chunks' attention (tram_attend_tiles, called by block_step.c's attend_tile per block of keys):
 * the queries of a tile of rows and their keys as tiles of bfloat16, the scores as tile products, the
 * online softmax of kernels.h's attend_fn in float32 (exp16), then the probabilities, rounded, times the
 * values as tile products added into each query's output. Its f32 vector kernel ran at 45% of the
 * cores' float32 peak and took a quarter of SmolLM2's 512-token prefill once the projections ran on tiles.
 * Keys and values come as float32 rows (a Q8_0 cache's decoded by block_step.c) or a 16-bit cache's own.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)
#include <immintrin.h>

#define TTARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16"
#define TFN static __attribute__((target(TTARGET), noinline))
#define PANEL 32  /* weight rows a panel */
#endif

/* The prompt rows of a prompt of this many tokens or more take the tiles (block_step.c's tile_rows):
 * from 64 rows in a call they beat the integer kernels (SmolLM2's Q4_1 blocks, one build, alternating:
 * 0.86x the time at 64 rows, 0.55x at 128, 0.39x at 512; 1.2x at 32, where decoding each matrix costs
 * more than it saves). A long prompt's short tail chunk, or its few tokens past a prefix-cache hit, pay
 * that cost so that every chunking of a prompt computes it alike. */
#define TILES_FROM_ROWS 64

#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

TFN void tiles_start(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
    __asm__ volatile("" : : "r"(&c) : "memory");  /* ldtilecfg's asm names no memory: the stores first */
    _tile_loadconfig(&c);
}

TFN void tiles_end(void) { _tile_release(); }

/* n floats (a multiple of 16) -> bfloat16, round to nearest even. */
TFN void to_bf16(const float *x, long n, uint16_t *out) {
    for (long i = 0; i < n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
}

/* Activation row m (x, K floats; NULL: a zero row past M) into xb, bfloat16 in the order panel_rows reads
 * its tiles: for each block of 32 rows, block i of K / 32, its two tiles of 16 rows x 32 elements, so that
 * the tiles a panel meets lie one after another (rows K apart, they ran 0.6 of the tile loads' speed). */
TFN void tile_rows(const float *x, long m, long K, uint16_t *xb) {
    uint16_t *dst = xb + (m / 32 * 32) * K + (m % 32 / 16) * 512 + (m % 16) * 32;
    for (long i = 0; i < K / 32; i++, dst += 1024) {
        if (!x) {
            memset(dst, 0, 64);
            continue;
        }
        const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + 32 * i));
        const __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + 32 * i + 16));
        _mm512_storeu_si512(dst, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    }
}

/* A tile of pairs from 16 rows of pairs (row r at words + r * stride, 32-bit words = bfloat16 pairs):
 * tile row p = word p of each row, the transposition TDPBF16PS's second operand wants. */
TFN void pair_tile(const uint32_t *words, long stride, uint32_t *tile) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)stride));
    for (int p = 0; p < 16; p++) _mm512_storeu_si512(tile + 16 * p, _mm512_i32gather_epi32(idx, (const int *)words + p, 4));
}

/* The panel of weight rows n0..n0 + 31 (of N; rows past N zero): each decoded to float32 (f: K floats),
 * rounded to bfloat16 (rows: 16 x K), then for each half and block i the 16 x 16 pairs of tile (i, half)
 * at pan + (2 i + half) * 256 words. */
TFN void make_panel(const isa_ops *ops, const uint8_t *w, int qtype, long n0, long N, long K, float *f,
                    uint16_t *rows, uint8_t *plain, uint32_t *pan) {
    const int base = tram_r8_base(qtype), t = base >= 0 ? base : qtype;
    const size_t rb = tram_row_bytes(t, K);
    const int nb = (int)(K / tram_types[t].block);
    for (int h = 0; h < 2; h++) {
        for (int r = 0; r < 16; r++) {
            const long n = n0 + 16 * h + r;
            if (n >= N) {
                memset(rows + r * K, 0, sizeof(uint16_t) * (size_t)K);
                continue;
            }
            const uint8_t *src = w + (size_t)n * rb;
            if (base >= 0) {  /* out of its group of 8 */
                tram_interleaved_row(w + (size_t)(n / 8) * 8 * rb, (int)(n % 8), K, t, plain);
                src = plain;
            }
            ops->dec[t](src, nb, f);
            to_bf16(f, K, rows + r * K);
        }
        for (long i = 0; i < K / 32; i++)  /* tile (i, h): pair p of block i, of each of the 16 rows */
            pair_tile((const uint32_t *)rows + 16 * i, K / 2, pan + (2 * i + h) * 256);
    }
}

/* Rows m0..m0 + 31 of the activations (xb: tile_rows' layout, zero past M) against a panel: y's rows
 * (N apart) from column n0, 32 of them; rows past M and columns past N are not written. */
TFN void panel_rows(const uint16_t *xb, const uint32_t *pan, long m0, long M, long n0, long N, long K, float *y,
                    float *tmp) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t *a = xb + m0 * K;  /* this block's 2 x K / 32 tiles, in order */
    for (long i = 0; i < K / 32; i++) {
        _tile_loadd(4, a + 1024 * i, 64);
        _tile_loadd(5, a + 1024 * i + 512, 64);
        _tile_loadd(6, pan + 512 * i, 64);
        _tile_loadd(7, pan + 512 * i + 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (m0 + 32 <= M && n0 + 32 <= N) {
        _tile_stored(0, y + m0 * N + n0, 4 * N);
        _tile_stored(1, y + m0 * N + n0 + 16, 4 * N);
        _tile_stored(2, y + (m0 + 16) * N + n0, 4 * N);
        _tile_stored(3, y + (m0 + 16) * N + n0 + 16, 4 * N);
        return;
    }
    _tile_stored(0, tmp, 128);  /* tmp [32][32]: the edge through a copy */
    _tile_stored(1, tmp + 16, 128);
    _tile_stored(2, tmp + 16 * 32, 128);
    _tile_stored(3, tmp + 16 * 32 + 16, 128);
    const long cols = N - n0 < 32 ? N - n0 : 32;
    for (long r = 0; r < 32 && m0 + r < M; r++) memcpy(y + (m0 + r) * N + n0, tmp + 32 * r, sizeof(float) * cols);
}

static int tiles_run(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N, long K,
                     int qtype, int n_threads) {
    const long Mp = (M + 31) / 32 * 32, panels = (N + PANEL - 1) / PANEL;
    const int base = tram_r8_base(qtype), t = base >= 0 ? base : qtype;
    uint16_t *xb = aligned_alloc(64, sizeof(uint16_t) * (size_t)(Mp * K));  /* (a multiple of 64 bytes) */
    if (!xb) return -1;
    int nth = n_threads < panels ? n_threads : (int)panels, oom = 0;
    (void)nth;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int th, nt;
        tram_team(&th, &nt);
        for (long m = Mp * th / nt; m < Mp * (th + 1) / nt; m++) tile_rows(m < M ? x + m * K : NULL, m, K, xb);
        const size_t rows_bytes = sizeof(uint16_t) * 16 * (size_t)K, pan_bytes = sizeof(uint16_t) * PANEL * (size_t)K;
        char *mem = malloc(sizeof(float) * (size_t)K + rows_bytes + pan_bytes + tram_row_bytes(t, K) + 4096 + 64);
        int ok = mem != NULL;
#ifdef _OPENMP
#pragma omp atomic update
#endif
        oom |= !ok;
#ifdef _OPENMP
#pragma omp barrier
#endif
        if (!oom) {
            float *f = (float *)mem, *tmp = (float *)(mem + sizeof(float) * (size_t)K);
            uint16_t *rows = (uint16_t *)(mem + sizeof(float) * (size_t)K + 4096);
            uint32_t *pan = (uint32_t *)((char *)rows + rows_bytes);
            uint8_t *plain = (uint8_t *)pan + pan_bytes;
            const long p0 = panels * th / nt, p1 = panels * (th + 1) / nt;
            tiles_start();
            for (long p = p0; p < p1; p++) {
                make_panel(ops, w, qtype, p * PANEL, N, K, f, rows, plain, pan);
                for (long m0 = 0; m0 < M; m0 += 32) panel_rows(xb, pan, m0, M, p * PANEL, N, K, y, tmp);
            }
            tiles_end();
        }
        free(mem);
    }
    free(xb);
    return oom ? -1 : 0;
}

/* e^x for x <= 0 (scores less their maximum), 16 lanes: 2^(x log2 e) as 2^i times Cephes' exp2f polynomial
 * of the fraction in [-0.5, 0.5] (relative error about 2e-7; the probabilities are then rounded to
 * bfloat16). */
TFN __m512 exp16(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
    const __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, i);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, i);
}

/* 16 elements at element i of rows of type kvt (T_F32, T_F16 or T_BF16: a KV cache's) as bfloat16. */
TFN __m256i bf16_of(const void *rows, size_t i, int kvt) {
    if (kvt == T_BF16) return _mm256_loadu_si256((const __m256i *)((const uint16_t *)rows + i));
    const __m512 f = kvt == T_F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)rows + i)))
                                  : _mm512_loadu_ps((const float *)rows + i);
    return (__m256i)_mm512_cvtneps_pbh(f);
}

/* The same in the low or high halves of 16 words. */
TFN __m512i bf16_words(const void *rows, size_t i, int kvt, int high) {
    const __m512i w = _mm512_cvtepu16_epi32(bf16_of(rows, i, kvt));
    return high ? _mm512_slli_epi32(w, 16) : w;
}

/* Scratch of tram_attend_tiles (its `mem`), carved: the queries' tiles qa [nq16 / 16][D / 32][16 x 32],
 * the keys' kt [ATT_KB / 16][D / 32][16 x 16 pairs], the probabilities' pa [nq16 / 16][ATT_KB / 32][16 x 32],
 * the values' vt [ATT_KB / 32][D / 16][16 x 16 pairs], and a tile of floats. */
/* The block's m keys as tiles: key tile t, chunk c of 32 elements: row p = elements 2p, 2p + 1 of its 16 keys
 * (zero past m). */
TFN void key_tiles(const void *k, int kvt, const size_t *off, long m, long D, uint32_t *kt) {
    uint32_t rows[16 * 16];
    for (long t = 0; t * 16 < m; t++)
        for (long c = 0; c < D / 32; c++) {
            for (long j = 0; j < 16; j++) {
                if (t * 16 + j >= m) {
                    memset(rows + 16 * j, 0, 64);
                    continue;
                }
                const size_t at = off[t * 16 + j] + 32 * (size_t)c;
                const __m256i lo = bf16_of(k, at, kvt), hi = bf16_of(k, at + 16, kvt);
                _mm512_storeu_si512(rows + 16 * j, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
            }
            pair_tile(rows, 16, kt + (t * (D / 32) + c) * 256);
        }
}

/* The block's values as tiles: keys 32 kc.., elements 16 dt..: row p = keys 2p, 2p + 1's elements, paired. */
TFN void value_tiles(const void *v, int kvt, const size_t *off, long m, long D, uint32_t *vt) {
    for (long kc = 0; kc * 32 < m; kc++)
        for (long dt = 0; dt < D / 16; dt++) {
            uint32_t *tile = vt + (kc * (D / 16) + dt) * 256;
            for (long p = 0; p < 16; p++) {
                const long i = kc * 32 + 2 * p;
                __m512i w = _mm512_setzero_si512();
                if (i < m) w = bf16_words(v, off[i] + 16 * (size_t)dt, kvt, 0);
                if (i + 1 < m) w = _mm512_or_si512(w, bf16_words(v, off[i + 1] + 16 * (size_t)dt, kvt, 1));
                _mm512_storeu_si512(tile + 16 * p, w);
            }
        }
}

/* Query j's scores sj of its n keys into its running (max, sum) ml, as probabilities rounded to bfloat16
 * into pr (ATT_KB of them, zero past n); out is rescaled where the maximum rose, zeroed at its first keys. */
TFN void softmax_row(const float *sj, long n, float *ml, float *out, long D, uint16_t *pr) {
    __m512 mv = _mm512_set1_ps(ml[0]);
    for (long i = 0; i < n; i += 16) mv = _mm512_max_ps(mv, _mm512_maskz_loadu_ps(i + 16 <= n ? 0xffff : (__mmask16)((1u << (n - i)) - 1), sj + i));
    const float mx = _mm512_reduce_max_ps(mv);
    const int first = ml[0] == -INFINITY;
    const float rescale = first ? 0.0f : mx == ml[0] ? 1.0f : expf(ml[0] - mx);
    __m512 sum = _mm512_setzero_ps();
    for (long i = 0; i < ATT_KB; i += 16) {
        const __mmask16 live = i >= n ? 0 : i + 16 <= n ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sj + i), _mm512_set1_ps(mx))));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i *)(pr + i), (__m256i)_mm512_cvtneps_pbh(e));
    }
    ml[1] = ml[1] * rescale + _mm512_reduce_add_ps(sum);
    ml[0] = mx;
    if (first)
        memset(out, 0, sizeof(float) * (size_t)D);
    else if (rescale != 1.0f)
        for (long d = 0; d < D; d += 16) _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(out + d), _mm512_set1_ps(rescale)));
}

TFN void attend_tiles(const float *const *q, float *const *out, long nq, const long *n, const void *k,
                      const void *v, int kvt, const size_t *off, long D, float scale, float *sc, float *ml, void *mem) {
    const long nq16 = (nq + 15) / 16 * 16, kc = D / 32;
    long m = 0;
    for (long j = 0; j < nq; j++) m = n[j] > m ? n[j] : m;
    uint16_t *qa = mem, *pa = qa + nq16 * D;
    uint32_t *kt = (uint32_t *)(pa + nq16 * ATT_KB), *vt = kt + ATT_KB * D / 2;
    float *tmp = (float *)(vt + ATT_KB * D / 2);
    for (long j = 0; j < nq16; j++)  /* queries: tile j / 16, chunk c, row j % 16 */
        for (long c = 0; c < kc; c++) {
            uint16_t *dst = qa + ((j / 16 * kc + c) * 16 + j % 16) * 32;
            if (j >= nq) {
                memset(dst, 0, 64);
                continue;
            }
            _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(q[j] + 32 * c)));
            _mm256_storeu_si256((__m256i *)(dst + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(q[j] + 32 * c + 16)));
        }
    key_tiles(k, kvt, off, m, D, kt);
    value_tiles(v, kvt, off, m, D, vt);
    for (long qt = 0; qt < nq16 / 16; qt++) {
        for (long t = 0; t * 16 < m; t++) {  /* scores */
            _tile_zero(0);
            for (long c = 0; c < kc; c++) {
                _tile_loadd(4, qa + (qt * kc + c) * 512, 64);
                _tile_loadd(6, kt + (t * kc + c) * 256, 64);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, tmp, 64);
            for (long r = 0; r < 16 && qt * 16 + r < nq; r++)
                _mm512_storeu_ps(sc + (qt * 16 + r) * ATT_KB + 16 * t, _mm512_mul_ps(_mm512_loadu_ps(tmp + 16 * r), _mm512_set1_ps(scale)));
        }
        for (long r = 0; r < 16; r++) {
            const long j = qt * 16 + r;
            uint16_t *pr = pa + (qt * 16 + r) * ATT_KB;
            if (j < nq && n[j] > 0) softmax_row(sc + j * ATT_KB, n[j], ml + 2 * j, out[j], D, pr);
            else memset(pr, 0, 2 * ATT_KB);
        }
        for (long dt = 0; dt < D / 16; dt++) {  /* values */
            _tile_zero(1);
            for (long c = 0; c * 32 < m; c++) {
                _tile_loadd(5, pa + qt * 16 * ATT_KB + 32 * c, 2 * ATT_KB);
                _tile_loadd(7, vt + (c * (D / 16) + dt) * 256, 64);
                _tile_dpbf16ps(1, 5, 7);
            }
            _tile_stored(1, tmp, 64);
            for (long r = 0; r < 16; r++) {
                const long j = qt * 16 + r;
                if (j < nq && n[j] > 0)
                    _mm512_storeu_ps(out[j] + 16 * dt, _mm512_add_ps(_mm512_loadu_ps(out[j] + 16 * dt), _mm512_loadu_ps(tmp + 16 * r)));
            }
        }
    }
}

#endif

static int g_tiles_on = 1;

int tram_set_tiles(int on) {
    const int was = g_tiles_on;
    g_tiles_on = on != 0;
    return was;
}

long tram_tiles_from(void) {
#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)
    return g_tiles_on && tram_q8() && tram_isa_current() == &tram_ops_avx512 && tram_tiles_ok(&tram_ops_avx512, 32, 32, T_F32)
               ? TILES_FROM_ROWS
               : 0;
#else
    return 0;
#endif
}

int tram_tiles_ok(const isa_ops *ops, long N, long K, int qtype) {
#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)
    const int base = tram_r8_base(qtype), t = base >= 0 ? base : qtype;
    return tram_amx_bf16() && ops == &tram_ops_avx512 && N > 0 && K > 0 && K % 32 == 0 && tram_type_ok(t) && ops->dec[t] != NULL;
#else
    (void)ops, (void)N, (void)K, (void)qtype;
    return 0;
#endif
}

#define ATT_TILES_NQ 128
#define ATT_TILES_D 256

size_t tram_attend_tiles_bytes(long nq, long D) {
    const size_t nq16 = (size_t)(nq + 15) / 16 * 16;
    return 2 * nq16 * (size_t)D + 4 * (size_t)ATT_KB * (size_t)D + 2 * nq16 * ATT_KB + 4 * (size_t)ATT_KB * (size_t)D +
           4 * 256 + 64;
}

int tram_attend_tiles_ok(long nq, long D) {
#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)
    return tram_tiles_ok(&tram_ops_avx512, 32, 32, T_F32) && nq <= ATT_TILES_NQ && D <= ATT_TILES_D && D % 32 == 0;
#else
    (void)nq, (void)D;
    return 0;
#endif
}

void tram_attend_tiles(const float *const *q, float *const *out, long nq, const long *n, const void *k,
                       const void *v, int kvt, const size_t *off, long D, float scale, float *sc, float *ml, void *mem) {
#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)
    tiles_start();
    attend_tiles(q, out, nq, n, k, v, kvt, off, D, scale, sc, ml, mem);
    tiles_end();
#else
    (void)q, (void)out, (void)nq, (void)n, (void)k, (void)v, (void)kvt, (void)off, (void)D, (void)scale, (void)sc, (void)ml;
    (void)mem;
#endif
}

int tram_tiles_bf16(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N, long K,
                    int qtype, int n_threads) {
#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)
    if (tram_tiles_ok(ops, N, K, qtype)) return M > 0 ? tiles_run(ops, x, w, y, M, N, K, qtype, n_threads) : 0;
#endif
    return tram_matmul(ops, x, w, y, M, N, K, qtype, n_threads);
}
