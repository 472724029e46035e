/*
 * matmul.c: the packed matmul and the row dequantizer over OpenMP threads. Owns the split of the N
 * output rows between threads (whole RN-row groups: a fixed contiguous share each, or, for a big matrix
 * at a few rows, chunks taken as the threads free up, or, two threads at more rows, chunks from both ends;
 * the result does not depend on the thread count),
 * the choice between an instruction set's fused small-M kernel and its tiled path (or, in the integer
 * modes, a type's integer-activation kernel: x rounded to int8 once per call, per 256 for the K-quants
 * and per 32 for Q4_0/Q4_1/Q8_0; in the default "q16" mode twice, x and what the first rounding left at
 * 1/256 of its scale, as two rows), and the per-32 (Q2_K: per-16) sums of x the kernels take, and the
 * interleaved Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q3_K (blocks.h): split in whole groups of 8 rows, put
 * back in GGML's layout where no integer kernel runs them, gathered row by row for lookups. Pointers
 * are trusted: module.c checked the buffers' extents.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* Row range [*n0, *n1) of thread t out of nt: contiguous, whole RN-row groups. */
static void split_rows(long N, int t, int nt, long unit, long *n0, long *n1) {
    long units = (N + unit - 1) / unit;
    long u0 = units * t / nt, u1 = units * (t + 1) / nt;
    *n0 = u0 * unit < N ? u0 * unit : N;
    *n1 = u1 * unit < N ? u1 * unit : N;
}

/* A call of a few activation rows (at most DYNAMIC_M) and at least DYNAMIC_WORK weight bytes gives its
 * output rows to the threads in chunks of whole groups, each taken by whichever thread is free next,
 * about CHUNKS a thread: with a fixed half each, the first to finish waited for the other (one thread
 * often streamed its half 10-25% slower than the other here). Measured against the fixed halves, builds
 * alternating in one process, M = 1: SmolLM2's tied Q8_0 head (49152 x 576) 10-19% faster, a Mistral-7B
 * layer's Q4_0 matrices 7-8%. Smaller matrices keep the fixed halves (SmolLM2's blocks: 32% slower in
 * chunks, whose starts cost more than they even out); more rows walk the activations once per chunk,
 * and took these chunks 6% slower at M = 16 and 512 (end_chunk's, below, keep each thread's side in
 * order). Each row computes alike in any chunk and on any thread. */
#define CHUNKS 8
#define DYNAMIC_M 4
#define DYNAMIC_WORK (4L << 20)

/* Units [*u, *u + n) of a chunk: the next free one (the shared counter `next`), or *u >= total. */
static long take_chunk(long *next, long n) {
    long u;
#ifdef _OPENMP
#pragma omp atomic capture
#endif
    {
        u = *next;
        *next += n;
    }
    return u;
}

/* Two threads on more rows than DYNAMIC_M (a batch of decoding rows: compute-bound, where a chunk's start
 * costs little) take chunks of one range from both ends as they free up: thread 0 from the front, thread
 * 1 from the back, each walking its side in order as with a fixed half, the two sides meeting wherever
 * the threads' speeds put them. Every claim counts against one total (take_chunk on `next`), so the two
 * sides never share a chunk. A served step's threads share the 2 cores with the server's event loop and
 * its clients: with fixed halves, one thread waited at the end of each projection for the other (the
 * worker 8% of a 16-client run's samples in the barrier), and here, where one core often ran a third
 * slower than the other, so did an offline batch. Measured against the fixed halves on a Zen 3, builds
 * alternating in one process: SmolLM2's Q4_0 / Q8_0 head (49152 x 576) at 16 rows 0.88 / 0.88 of the
 * time, 1536 x 576 at 8 rows 0.82 / 0.97, 576 x 576 at 16 rows 1.02 / 0.96; Q4_K / Q6_K 1536 x 1024
 * 0.87 / 1.07, 4096 x 4096 1.02 / 0.87; SmolLM2 Q4_0's 16-row decoding blocks 0.94; `tramontane serve`
 * with 16 clients (benchmarks/serve_load.py, runs alternating) 352-358 -> 384-441 tok/s. Returns the
 * first of `units` of thread t's next chunk of `chunk` units (`mine`: how many it claimed), or `units`
 * when all are taken. */
static long end_chunk(long *next, long chunk, long units, int t, long *mine) {
    const long chunks = (units + chunk - 1) / chunk;
    if (take_chunk(next, 1) >= chunks) return units;
    const long k = (*mine)++;
    return (t == 0 ? k : chunks - 1 - k) * chunk;
}

/* From ROW_CHUNKS_FROM activation rows on (prompt chunks), the integer kernels' threads take chunks of
 * ROW_CHUNK rows against the whole matrix instead, as they free up: with fixed halves of the output rows,
 * the first thread to finish waited for the other about a tenth of a 512-row call. The kernels walk the
 * matrix once per block of rows anyway (from cache after the first). Measured against the fixed halves,
 * builds alternating in one process: SmolLM2's Q4_0 blocks at M = 512 4% faster (16 to 64 rows a chunk:
 * 1.5-8%, 32 the best of three runs), a Mistral-7B layer's at M = 256 13%. */
#define ROW_CHUNKS_FROM 64
#define ROW_CHUNK 32

/* y[m, n0..n1) = the sum of y2's rows 2m and 2m + 1 there, for rows m in [m0, m1): q16's two int8 rows
 * a row, where a kernel writes their results apart. */
static void sum_pairs(float *y, const float *y2, long N, long m0, long m1, long n0, long n1) {
    for (long m = m0; m < m1; m++)
        for (long c = n0; c < n1; c++) y[m * N + c] = y2[2 * m * N + c] + y2[(2 * m + 1) * N + c];
}

/* The integer kernel on activation rows [m0, m1) against all N output rows: views of the rounded rows
 * (xq: blk elements per scale; their sums xs, `span` elements each; two int8 rows a row with `two`) and
 * of the output (y2: both int8 rows' results where the kernel writes them apart, summed here). */
static void row_chunk(fused_q8_fn fused_q8, const uint8_t *w, size_t rb, long N, long K, long blk,
                      const q8_rows *xq, const float *xs, int span, int two, long m0, long m1, float *y,
                      float *y2) {
    const long q0 = two ? 2 * m0 : m0, q1 = two ? 2 * m1 : m1;
    const q8_rows part = {xq->q + q0 * xq->ld, xq->ld, xq->d + q0 * (K / blk), xq->bs + q0 * (K / 16), xq->pair, NULL, NULL};
    const float *xs0 = xs ? xs + q0 * (K / span) : NULL;
    if (!y2) {
        fused_q8(w, rb, N, &part, xs0, q1 - q0, K, y + m0 * N, N);
        return;
    }
    fused_q8(w, rb, N, &part, xs0, q1 - q0, K, y2 + q0 * N, N);
    sum_pairs(y, y2, N, m0, m1, 0, N);
}

static int thread_count(int n_threads, long N, long work_bytes) {
    long groups = (N + RN - 1) / RN;
    if (work_bytes < (32L << 10)) return 1;  /* waking a second thread costs more than it saves */
    if (n_threads > groups) n_threads = (int)groups;
    return n_threads < 1 ? 1 : n_threads;
}

/* Elements of x per block sum the fused kernel of qtype reads: the span of the additive offsets it
 * applies through sums (Q2_K's mins cover 16 elements, the others' offsets 32); 0 when it reads none.
 * (Q5_0's sums serve its integer kernel's -16; its float kernel does not read them.) */
static int xs_span(int qtype) {
    if (qtype == T_Q2_K) return 16;
    if (tram_r8_base(qtype) >= 0) qtype = tram_r8_base(qtype);
    if (qtype == T_Q4_0 || qtype == T_Q4_1 || qtype == T_Q5_0 || qtype == T_Q5_1 || qtype == T_Q4_K || qtype == T_Q5_K)
        return 32;
    return 0;
}

/* Sums of x [M, K] per `span` elements -> malloc'd [M][K/span] (K % span == 0), or NULL when out of
 * memory. */
static float *block_sums(const float *x, long M, long K, int span) {
    const long n = M * (K / span);
    float *xs = malloc(sizeof(float) * (size_t)n);
    if (!xs) return NULL;
    for (long b = 0; b < n; b++) {
        float s = 0.0f;
        for (int j = 0; j < span; j++) s += x[span * b + j];
        xs[b] = s;
    }
    return xs;
}

static int g_q8 = 2;  /* "q16", the default (kernels.py) */

void tram_set_q8(int mode) { g_q8 = mode == 2 ? 2 : mode != 0; }
int tram_q8(void) { return g_q8; }

/* Sums of the rounded x (d * q) per `span` (16 or 32) elements of rows [r0, r1) into xs [rows][K/span],
 * as block_sums, from the sums of q per 16 (bs): the offsets and mins of the integer kernels meet the
 * same rounded x as the quants, so that each product is exactly sum(W * rounded x) and its error scales
 * with |W|, not with |W - offset|. */
static void rounded_sums(const q8_rows *xq, float *xs, long r0, long r1, long K, long blk, int span) {
    const long per = span / 16, spans = blk / span;  /* spans per scale: the scale's index without a
                                                        * division per span (a quarter of their time) */
    long b = r0 * (K / span);
    for (long db = r0 * (K / blk); db < r1 * (K / blk); db++)
        for (long e = 0; e < spans; e++, b++) {
            int s = 0;
            for (long j = 0; j < per; j++) s += xq->bs[per * b + j];
            xs[b] = xq->d[db] * (float)s;
        }
}

/* Interleaved Q4_K under q16 meets a pair's mins once (k4r8_apply): the first row of each pair in rows
 * [r0, r1) (r0 even) takes the sum of both rows' sums; the second's are left unread. */
static void pair_sums(float *xs, long r0, long r1, long K, int span) {
    const long nb = K / span;
    for (long r = r0; r < r1; r += 2)
        for (long b = 0; b < nb; b++) xs[r * nb + b] += xs[(r + 1) * nb + b];
}

/* Elements per activation scale of the integer kernel of qtype: 256 for the K-quants (Q8_K, as their
 * super-blocks), 32 for the legacy types (Q8_0, one scale per weight block). */
static long q8_block(int qtype) {
    if (tram_r8_base(qtype) >= 0) qtype = tram_r8_base(qtype);
    return qtype >= T_Q2_K && qtype <= T_Q6_K ? 256 : 32;
}

/* x [M, K] (K % blk == 0) rounded to int8 per blk elements (the instruction set's quantize_q8: d = max
 * |x| / 127, q = round(x / d), the sums of q per 16). With `two` ("q16"), 2M rows: row 2m as above, row
 * 2m + 1 what row m's rounding left (x - d q, at most d / 2 per element) rounded with the scale d / 256:
 * the two together carry x to 1/65024 of each block's largest |x|, and as 256 q1 + q2 they are one
 * integer at scale d / 256 (the instruction set's round_q16, both in one pass). One malloc'd buffer
 * (mem) holds the rows, their scales and sums. */
typedef struct {
    int8_t *q;
    long ld;
    float *d;
    int16_t *bs;
    void *mem;
} q8_buf;

/* The rounded rows' stride (q8_rows' ld): K, or K + 64 where K is a multiple of 1 KB. A kernel of many
 * rows reads block i of each row in turn; rows 1 KB apart or a multiple of it put those reads in at most
 * 4 of the L1's 64 sets (at 4096 all in one: 8 ways for 32 rows), and the reads went to L2. A line more
 * a row spreads them over all the sets (one thread on a Zen 4, interleaved Q4_0 4096 x 4096 at 32 rows,
 * q16's 64 int8 rows: 6.9-7.2 -> 5.8-5.9 ms; 4096 x 14336 24.2 -> 22.0 ms; 7B-shaped Q4_0 prefill of 512
 * tokens, 2 threads, alternating: 19.2, 19.7 -> 22.5, 22.7 tok/s). */
static long q8_stride(long K) { return K % 1024 == 0 ? K + 64 : K; }

/* Room for M rows of x rounded. Returns 0, or -1 when out of memory. */
static int q8_alloc(long M, long K, long blk, int two, q8_buf *b) {
    const long R = two ? 2 * M : M, nb = K / blk;
    b->ld = q8_stride(K);
    const size_t nq = (size_t)(R * b->ld), nd = (size_t)(R * nb), ns = (size_t)(R * (K / 16));
    const size_t od = (nq + 63) & ~(size_t)63, ob = od + ((nd * 4 + 63) & ~(size_t)63);
    char *p = malloc(ob + ns * 2);
    if (!p) return -1;
    b->q = (int8_t *)p, b->d = (float *)(p + od), b->bs = (int16_t *)(p + ob);
    b->mem = p;
    return 0;
}

/* Rows [m0, m1) of x rounded into b. */
static void q8_fill(const isa_ops *ops, const float *x, long m0, long m1, long K, long blk, int two,
                    const q8_buf *b) {
    const long nb = K / blk;
    if (!two && b->ld == K) {
        ops->quantize_q8(x + m0 * K, (m1 - m0) * nb, blk, NULL, b->q + m0 * K, b->d + m0 * nb, b->bs + m0 * (K / 16));
        return;
    }
    for (long m = m0; m < m1; m++)  /* a row at a time: rows ld apart */
        if (two)
            tram_round_q16(ops, x + m * K, K, b->ld, blk, b->q + 2 * m * b->ld, b->d + 2 * m * nb, b->bs + 2 * m * (K / 16));
        else
            ops->quantize_q8(x + m * K, nb, blk, NULL, b->q + m * b->ld, b->d + m * nb, b->bs + m * (K / 16));
}

int tram_q16_rows(const isa_ops *ops, const float *x, long M, long K, q8_rows *xq, void **mem) {
    q8_buf b;
    if (q8_alloc(M, K, 32, 1, &b)) return -1;
    q8_fill(ops, x, 0, M, K, 32, 1, &b);
    *xq = (q8_rows){b.q, b.ld, b.d, b.bs, 1, NULL, NULL};
    *mem = b.mem;
    return 0;
}

void tram_round_q16(const isa_ops *ops, const float *x, long K, long ld, long blk, int8_t *q, float *d, int16_t *bs) {
    const long nb = K / blk;
    ops->round_q16(x, nb, blk, q, d, bs, q + ld, d + nb, bs + K / 16);
}

/* Interleaved rows (T_Q4_0_R8 ... T_Q5_1_R8) back to GGML's layout (type `base`) in a malloc'd copy (NULL
 * when out of memory). */
static uint8_t *plain_rows(const uint8_t *w, long N, long K, int base) {
    uint8_t *out = malloc(tram_row_bytes(base, K) * (size_t)N);
    if (out) tram_interleave_rows(w, out, N, K, base, 0);
    return out;
}

int tram_matmul(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N, long K,
                int qtype, int n_threads) {
    return tram_matmul_hooked(ops, x, w, y, M, N, K, qtype, n_threads, NULL);
}

/* The hooks' calls, where there are any. */
static void run_before(const matmul_hooks *h, long m0, long m1) {
    if (h && h->before && m0 < m1) h->before(h->ctx, m0, m1);
}

/* `before` over all M rows ahead of the matmul (its rows not rounded in the parallel region): from
 * BEFORE_SPLIT rows on (a prompt chunk under the exact setting) split over the threads. */
#define BEFORE_SPLIT 64
static void run_before_all(const matmul_hooks *h, long M, int n_threads) {
    if (!h || !h->before) return;
    if (M < BEFORE_SPLIT || n_threads < 2) {
        run_before(h, 0, M);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
        int t, nt;
        tram_team(&t, &nt);
        long m0, m1;
        split_rows(M, t, nt, 1, &m0, &m1);
        run_before(h, m0, m1);
    }
}

static void run_after(const matmul_hooks *h, const float *y, long N, long m0, long m1, long n0, long n1) {
    if (h && h->after && m0 < m1 && n0 < n1) h->after(h->ctx, y, N, m0, m1, n0, n1);
}

int tram_matmul_hooked(const isa_ops *ops, const float *x, const uint8_t *w, float *y, long M, long N, long K,
                       int qtype, int n_threads, const matmul_hooks *h) {
    const int base = tram_r8_base(qtype);
    if (base >= 0 && !(g_q8 && ops->fused_q8[qtype])) {  /* the exact setting, the portable pass */
        run_before_all(h, M, n_threads);
        uint8_t *plain = plain_rows(w, N, K, base);
        const int rc = plain ? tram_matmul(ops, x, plain, y, M, N, K, base, n_threads) : -1;
        free(plain);
        if (!rc) run_after(h, y, N, 0, M, 0, N);
        return rc;
    }
    const tinfo ti = tram_types[qtype];
    const size_t rb = tram_row_bytes(qtype, K);
    fused_fn fused = M <= FUSED_M && K % 32 == 0 ? ops->fused[qtype] : NULL;  /* F16/BF16: 32 at a time */
    const long blk = q8_block(qtype);
    /* One kernel at every M where it has one: a row's result does not depend on how many rows share
     * the call (a served request's answer on the batch it lands in). */
    fused_q8_fn fused_q8 = g_q8 && K % blk == 0 ? ops->fused_q8[qtype] : NULL;
    float *xs = NULL;
    q8_buf qb = {NULL, 0, NULL, NULL, NULL};
    const int span = xs_span(qtype);
    const int two = fused_q8 && g_q8 == 2;  /* "q16": x as two int8 rows, their products summed */
    const long MQ = two ? 2 * M : M;
    float *y2 = NULL;  /* q16 on the row kernels: both rows' results, summed after */
    int nth = thread_count(n_threads, N, (long)(rb * (size_t)N) + M * K * 4);
    /* Several rows: each thread rounds its share of them inside the parallel region (the other threads
     * would only wait); one row is rounded before it. */
    const int shared = fused_q8 && M > 1 && nth > 1;
    if (!shared) run_before_all(h, M, n_threads);
    if (fused_q8) fused = NULL;
    if (fused_q8 && q8_alloc(M, K, blk, two, &qb)) return -1;
    const q8_rows xq = {qb.q, qb.ld, qb.d, qb.bs, two && base >= 0, NULL, NULL};  /* pair: the interleaved kernels sum each pair */
    if (fused_q8 && !shared) q8_fill(ops, x, 0, M, K, blk, two, &qb);
    if ((fused || fused_q8) && span &&
        !(xs = fused_q8 ? malloc(sizeof(float) * (size_t)(MQ * (K / span))) : block_sums(x, M, K, span))) {
        free(qb.mem);
        return -1;
    }
    const int fold = xq.pair && base == T_Q4_K;  /* pair_sums */
    if (fused_q8 && xs && !shared) rounded_sums(&xq, xs, 0, MQ, K, blk, span);
    if (fused_q8 && xs && !shared && fold) pair_sums(xs, 0, MQ, K, span);
    if (two && !xq.pair && !(y2 = malloc(sizeof(float) * (size_t)(MQ * N)))) {
        free(xs), free(qb.mem);
        return -1;
    }
    const long unit = base >= 0 ? 8 : RN, units = (N + unit - 1) / unit;
    const int dynamic = nth > 1 && M <= DYNAMIC_M && (double)rb * (double)N >= (double)DYNAMIC_WORK;
    const int by_rows = fused_q8 && nth > 1 && M >= ROW_CHUNKS_FROM;
    const int ends = nth == 2 && !by_rows && M > DYNAMIC_M;
    long chunk = units / ((long)CHUNKS * nth), next = 0;  /* whole groups; next: the first not taken */
    if (chunk < 4) chunk = units < 4 ? units : 4;  /* (decoding's interleaved rows walk 4 groups at once) */
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int t, nt;
        tram_team(&t, &nt);
        long n0, n1;
        if (shared) {
            split_rows(M, t, nt, 1, &n0, &n1);
            run_before(h, n0, n1);
            q8_fill(ops, x, n0, n1, K, blk, two, &qb);
            if (xs) rounded_sums(&xq, xs, two ? 2 * n0 : n0, two ? 2 * n1 : n1, K, blk, span);
            if (xs && fold) pair_sums(xs, 2 * n0, 2 * n1, K, span);
#ifdef _OPENMP
#pragma omp barrier
#endif
        }
        if (by_rows) {
            for (long m0 = ROW_CHUNK * take_chunk(&next, 1); m0 < M; m0 = ROW_CHUNK * take_chunk(&next, 1)) {
                const long m1 = m0 + ROW_CHUNK < M ? m0 + ROW_CHUNK : M;
                row_chunk(fused_q8, w, rb, N, K, blk, &xq, xs, span, two, m0, m1, y, y2);
                run_after(h, y, N, m0, m1, 0, N);
            }
        } else {
            long u, take, mine = 0;  /* this thread's first range of units: a chunk, or its fixed share */
            if (dynamic)
                u = take_chunk(&next, chunk), take = chunk;
            else if (ends)
                u = end_chunk(&next, chunk, units, t, &mine), take = chunk;
            else
                split_rows(units, t, nt, 1, &u, &take), take -= u;
            while (u < units && take > 0) {
                n0 = u * unit;
                n1 = (u + take) * unit < N ? (u + take) * unit : N;
                if (fused_q8)
                    fused_q8(w + (size_t)n0 * rb, rb, n1 - n0, &xq, xs, MQ, K, (y2 ? y2 : y) + n0, N);
                else if (fused)
                    fused(w + (size_t)n0 * rb, rb, n1 - n0, x, xs, M, K, y + n0, N);
                else
                    ops->tile(ops->dec[qtype], ti.block, ti.size, w, rb, n0, n1, x, M, K, y, N);
                if (y2) sum_pairs(y, y2, N, 0, M, n0, n1);
                run_after(h, y, N, 0, M, n0, n1);
                if (ends)  /* the next chunk from this thread's end, or done */
                    u = end_chunk(&next, chunk, units, t, &mine);
                else
                    u = dynamic ? take_chunk(&next, chunk) : units;  /* the next free chunk, or done */
            }
        }
    }
    free(y2);
    free(xs);
    free(qb.mem);
    return 0;
}

int tram_dequantize(const isa_ops *ops, const uint8_t *w, float *out, long N, long K, int qtype,
                    int n_threads) {
    const int base = tram_r8_base(qtype);
    if (base >= 0) {  /* back to GGML's layout first */
        uint8_t *plain = plain_rows(w, N, K, base);
        const int rc = plain ? tram_dequantize(ops, plain, out, N, K, base, n_threads) : -1;
        free(plain);
        return rc;
    }
    const tinfo ti = tram_types[qtype];
    const size_t rb = tram_row_bytes(qtype, K);
    const dec_fn dec = ops->dec[qtype];
    int nth = thread_count(n_threads, N, (long)(rb * (size_t)N));
    (void)nth;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int t, nt;
        tram_team(&t, &nt);
        long n0, n1;
        split_rows(N, t, nt, RN, &n0, &n1);
        for (long n = n0; n < n1; n++) dec(w + (size_t)n * rb, (int)(K / ti.block), out + (size_t)n * (size_t)K);
    }
    return 0;
}

int tram_lookup(const isa_ops *ops, const uint8_t *w, const int64_t *idx, long n, long K, int qtype, float *out) {
    const int base = tram_r8_base(qtype), t = base >= 0 ? base : qtype;
    const size_t rb = tram_row_bytes(t, K);
    const int nb = (int)(K / tram_types[t].block);
    uint8_t *row = base >= 0 ? malloc(rb) : NULL;
    if (base >= 0 && !row) return -1;
    for (long i = 0; i < n; i++) {
        const uint8_t *src = w + (size_t)idx[i] * rb;
        if (row) {  /* gathered out of its group of 8 */
            tram_interleaved_row(w + (size_t)(idx[i] / 8) * 8 * rb, (int)(idx[i] % 8), K, t, row);
            src = row;
        }
        ops->dec[t](src, nb, out + (size_t)i * (size_t)K);
    }
    free(row);
    return 0;
}
