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
 * 512 rows; hence this file. Only for many rows of one sequence (block_step.c's rule, TILES_FROM_ROWS in
 * kernels.py): decoding rows keep the integer kernels, whose results do not depend on the batch.
 *
 * Layout. A tile of activations: 16 rows of 32 bfloat16 (their row-major copy, rows K apart). A tile of
 * weights: 16 rows of 16 pairs, row r holding elements 2r, 2r + 1 of a block of 32 for each of 16 weight
 * rows (TDPBF16PS's pairs); a panel holds K / 32 such tiles for each half of 32 weight rows, made from
 * the rows decoded to float32, rounded to bfloat16 and gathered pair by pair. Per block of 32 elements,
 * two activation tiles (32 rows) times two weight tiles (32 columns) into four accumulators (tiles 0-3;
 * 4-5 activations, 6-7 weights). Each output's sum runs over the blocks in order and does not depend
 * on M, the other rows or the thread count (threads split the panels).
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)
#include <cpuid.h>
#include <immintrin.h>

#define TTARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16"
#define TFN static __attribute__((target(TTARGET), noinline))
#define PANEL 32  /* weight rows a panel */
#endif

/* A sequence's run of this many rows or more in a call (a prompt chunk) takes the tiles: from 64 rows
 * they beat the integer kernels (SmolLM2's Q4_1 blocks, one build, alternating: 0.86x the time at 64
 * rows, 0.55x at 128, 0.39x at 512; 1.2x at 32, where decoding each matrix costs more than it saves). */
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

/* The panel of weight rows n0..n0 + 31 (of N; rows past N zero): each decoded to float32 (f: K floats),
 * rounded to bfloat16 (rows: 16 x K), then for each half and block i the 16 x 16 pairs of tile (i, half)
 * at pan + (2 i + half) * 256 words. */
TFN void make_panel(const isa_ops *ops, const uint8_t *w, int qtype, long n0, long N, long K, float *f,
                    uint16_t *rows, uint8_t *plain, uint32_t *pan) {
    const int base = tram_r8_base(qtype), t = base >= 0 ? base : qtype;
    const size_t rb = tram_row_bytes(t, K);
    const int nb = (int)(K / tram_types[t].block);
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)(K / 2)));
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
        for (long i = 0; i < K / 32; i++) {
            uint32_t *tile = pan + (2 * i + h) * 256;
            for (int p = 0; p < 16; p++)  /* tile row p: pair p of block i, of each of the 16 rows */
                _mm512_storeu_si512(tile + 16 * p, _mm512_i32gather_epi32(idx, (const int *)rows + 16 * i + p, 4));
        }
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
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)(Mp * K));
    if (!xb) return -1;
    int nth = n_threads < panels ? n_threads : (int)panels, oom = 0;
    (void)nth;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int th = 0, nt = 1;
#ifdef _OPENMP
        th = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        for (long m = th; m < Mp; m += nt) tile_rows(m < M ? x + m * K : NULL, m, K, xb);
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

/* CPUID leaf 7: EDX bit 22 AMX-BF16 (and the tile data isa.c asked Linux for, tram_amx). */
static int amx_bf16(void) {
    unsigned a, b, c, d;
    return tram_amx() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1u);
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
    static int have = -1;
    if (have < 0) have = amx_bf16();
    const int base = tram_r8_base(qtype), t = base >= 0 ? base : qtype;
    return have && ops == &tram_ops_avx512 && N > 0 && K > 0 && K % 32 == 0 && tram_type_ok(t) && ops->dec[t] != NULL;
#else
    (void)ops, (void)N, (void)K, (void)qtype;
    return 0;
#endif
}

int tram_tiles_bf16(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N, long K,
                    int qtype, int n_threads) {
#if defined(TRAM_X86) && (defined(__clang__) || __GNUC__ >= 11)
    if (tram_tiles_ok(ops, N, K, qtype)) return M > 0 ? tiles_run(ops, x, w, y, M, N, K, qtype, n_threads) : 0;
#endif
    return tram_matmul(ops, x, w, y, M, N, K, qtype, n_threads);
}
