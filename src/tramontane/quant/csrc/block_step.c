/*
 * block_step.c: one transformer block for a step of new tokens, one per row, in place on the residual
 * stream x [B, dim]:
 *     x += wo . attention(rope(q), cache)      with q, k, v = wqkv . rmsnorm(x), k/v stored first
 *     x += w2 . (silu(g) * u)                  with g, u = w13 . rmsnorm(x)
 * or, for a Mixtral block (E > 0), the feed-forward as the sum over the row's top K of E experts of
 *     softmax(top-K router logits)[k] * w2[e] . (silu(w1[e] . xn) * w3[e] . xn),  xn = rmsnorm(x)
 * added in increasing expert order, as model/moe.py sums them (the router runs in float32, the
 * experts are packed stacks indexed by expert; each expert runs once over the rows that chose it).
 * the same arithmetic as model/transformer.py (RMSNorm in float32, RoPE on interleaved pairs, softmax
 * attention over the visible keys, SwiGLU), with the projections as packed matmuls (matmul.c) and the
 * attention and SwiGLU inner loops from the instruction set's table. Rows whose position is -1
 * (padding) write nothing to the cache and get no attention output.
 *
 * Two cache layouts. Offline (the rolling KVCache): row b owns [Hkv, S, D] of the layer's buffer, its
 * token goes to slot qpos % S and it attends the slots whose recorded position kpos is visible. Paged
 * (the serving pool): rows are tokens of sequences, several rows may belong to one sequence (a prefill
 * chunk beside other sequences' decode tokens); every row's key and value are stored before any row
 * attends, and row b then reads its own sequence's positions straight from the pool through its block
 * table. Worked example, bs = 4, row at position 9 with table [7, 2, 5] and window 4: positions 6..9,
 * slots 2*4+2, 2*4+3, 5*4+0, 5*4+1 = 10, 11, 20, 21. Either cache stores each head's key and value as
 * a row of D elements of type kvt: float32, or rounded to half, bfloat16 or Q8_0 (blocks.c); 16-bit
 * rows are widened in registers as they are attended, Q8_0 rows met by rounded queries (the integer
 * settings) or else decoded block by block into the thread's scratch.
 * Threads: each matmul splits its output rows (matmul.c), the attention its tiles of rows x kv heads;
 * the norms, the gating and the residual adds run inside the projections' parallel regions (row_work,
 * matmul_hooks), or where a step's rows take the bfloat16 tiles or adapters sit between, split from
 * ROWS_SPLIT rows on; the rotation and the cache stores run in each attention item where every row
 * attends alone (attend_rows: decoding), else on the calling thread before the attention (a chunk's
 * rows read one another's keys, and two of them may share a rolling cache's slot).
 * Also owns the extent each of the step's buffers must have (tram_block_extents) and the range check
 * of the paged rows (tram_block_rows_ok), which the binding runs before any pointer is followed.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#ifdef TRAM_X86
#include <xmmintrin.h>
#endif

const char *const tram_block_buffer_names[BUF_COUNT] = {
    [BUF_X] = "x", [BUF_NORM1] = "attn_norm", [BUF_NORM2] = "ffn_norm", [BUF_WQKV] = "wqkv",
    [BUF_WO] = "wo", [BUF_W13] = "w13", [BUF_W2] = "w2", [BUF_CS] = "cos_sin", [BUF_KC] = "k_cache",
    [BUF_VC] = "v_cache", [BUF_KPOS] = "kpos", [BUF_QPOS] = "qpos", [BUF_GATE] = "gate", [BUF_W1E] = "w1e",
    [BUF_W3E] = "w3e", [BUF_TABLES] = "tables", [BUF_SEQ] = "seq", [BUF_LROW] = "lora_row",
    [BUF_LCOLS] = "lora_cols", [BUF_LORA] = "lora", [BUF_WK] = "wk", [BUF_WV] = "wv", [BUF_W3] = "w3",
    [BUF_PROMPTS] = "prompts",
};

void tram_block_pieces(block_args *a, int has_k, int has_v, int has_3) {
    const long q = a->H * a->D, kv = a->Hkv * a->D, F = a->E > 0 ? 0 : a->F;
    a->rows_qkv[2] = has_v ? kv : 0;
    a->rows_qkv[1] = has_k ? kv + (has_v ? 0 : kv) : 0;
    a->rows_qkv[0] = q + (has_k ? 0 : kv + (has_v ? 0 : kv));
    a->rows_13[1] = has_3 ? F : 0;
    a->rows_13[0] = has_3 ? F : 2 * F;
}

int tram_block_extents(const block_args *a, size_t need[BUF_COUNT]) {
    const long B = a->B, H = a->H, Hkv = a->Hkv, D = a->D;
    long HD, rows;  /* rows: of q, k and v (tram_block_pieces splits them; checked here first) */
    if (__builtin_mul_overflow(H, D, &HD) || __builtin_mul_overflow(H + 2 * Hkv, D, &rows)) return -1;
    int bad = tram_extent(&need[BUF_X], 4, B, a->dim, 1, 1);
    bad |= tram_extent(&need[BUF_NORM1], 4, a->dim, 1, 1, 1) | tram_extent(&need[BUF_NORM2], 4, a->dim, 1, 1, 1);
    bad |= tram_packed_extent(&need[BUF_WQKV], a->tqkv, a->rows_qkv[0], a->dim);
    bad |= tram_packed_extent(&need[BUF_WK], a->tk, a->rows_qkv[1], a->dim);
    bad |= tram_packed_extent(&need[BUF_WV], a->tv, a->rows_qkv[2], a->dim);
    bad |= tram_packed_extent(&need[BUF_WO], a->to, a->dim, HD);
    const long E = a->E, moe = E > 0;
    bad |= tram_packed_extent(&need[BUF_W13], a->t13, a->rows_13[0], a->dim);
    bad |= tram_packed_extent(&need[BUF_W3], a->t3, a->rows_13[1], a->dim);
    bad |= tram_packed_extent(&need[BUF_W2], a->t2, moe ? E * a->dim : a->dim, a->F);  /* (E <= INT_MAX) */
    bad |= tram_extent(&need[BUF_GATE], 4, E, a->dim, 1, 1);
    bad |= tram_packed_extent(&need[BUF_W1E], a->t1e, E * a->F, a->dim);
    bad |= tram_packed_extent(&need[BUF_W3E], a->t3e, E * a->F, a->dim);
    bad |= tram_extent(&need[BUF_CS], 4, B, D / 2, 2, 1);
    const int offline = a->P == 0;
    const long cache_rows = a->mapped ? a->R : B;  /* offline */
    const long rows_or_slots = offline ? cache_rows : a->P, per_row = offline ? a->S : 1;  /* [B,Hkv,S,D] | [P,Hkv,D] */
    const size_t kv_row = tram_row_bytes(a->kvt, D);
    bad |= tram_extent(&need[BUF_KC], kv_row, rows_or_slots, Hkv, per_row, 1);
    bad |= tram_extent(&need[BUF_VC], kv_row, rows_or_slots, Hkv, per_row, 1);
    bad |= tram_extent(&need[BUF_KPOS], 8, offline ? cache_rows : 0, a->S, 1, 1);
    bad |= tram_extent(&need[BUF_QPOS], 8, B, 1, 1, 1);
    bad |= tram_extent(&need[BUF_TABLES], 4, offline ? 0 : a->R, a->T, 1, 1);
    bad |= tram_extent(&need[BUF_SEQ], 4, offline && !a->mapped ? 0 : B, 1, 1, 1);
    bad |= tram_extent(&need[BUF_PROMPTS], 4, a->prompts ? (offline ? cache_rows : a->R) : 0, 1, 1, 1);
    bad |= tram_extent(&need[BUF_LROW], 4, a->L > 0 ? B : 0, 1, 1, 1);
    bad |= tram_extent(&need[BUF_LCOLS], 4, a->L > 0 ? 4 : 0, a->L + 1, 1, 1);
    need[BUF_LORA] = 0;  /* tram_block_lora_extent, from lora_cols */
    return bad ? -1 : 0;
}

/* In and out features of projection g (0 wqkv, 1 wo, 2 w13, 3 w2). */
static void lora_dims(const block_args *a, int g, long *in, long *out) {
    const long HD = a->H * a->D, width = (a->H + 2 * a->Hkv) * a->D;
    const long ins[4] = {a->dim, HD, a->dim, a->F}, outs[4] = {width, a->dim, 2 * a->F, a->dim};
    *in = ins[g], *out = outs[g];
}

int tram_block_lora_extent(const block_args *a, size_t *need, long *row) {
    *need = 0, *row = -1;
    for (int g = 0; g < 4 && a->L > 0; g++) {
        const int32_t *cols = a->lora_cols + g * (a->L + 1);
        if (cols[0] != 0 || (a->E > 0 && g >= 2 && cols[a->L] != 0)) return -1;
        for (long s = 0; s < a->L; s++)
            if (cols[s + 1] < cols[s]) return -1;
        long in, out;
        lora_dims(a, g, &in, &out);
        size_t bytes;
        if (tram_extent(&bytes, 4, cols[a->L], in + out, 1, 1) || __builtin_add_overflow(*need, bytes, need)) return -1;
    }
    for (long b = 0; b < a->B && a->L > 0; b++)
        if (a->lora_row[b] < -1 || a->lora_row[b] >= a->L) return *row = b, -1;
    return 0;
}

/* First position a paged row at qpos attends. */
static int64_t first_key(const block_args *a, int64_t qpos) {
    return a->window > 0 && qpos - a->window + 1 > 0 ? qpos - a->window + 1 : 0;
}

/* The cache row of row b (offline). */
static long cache_row(const block_args *a, long b) { return a->mapped ? a->seq[b] : b; }

int tram_block_rows_ok(const block_args *a, long *row) {
    const long blocks = a->P > 0 ? a->P / a->bs : 0;
    for (long b = 0; b < a->B && a->P == 0 && a->mapped; b++)
        if (*row = b, a->seq[b] < 0 || a->seq[b] >= a->R) return -1;
    for (long b = 0; b < a->B && a->P > 0; b++) {
        const int64_t q = a->qpos[b];
        *row = b;
        if (q < 0) continue;  /* padding */
        if (a->seq[b] < 0 || a->seq[b] >= a->R || q / a->bs >= a->T) return -1;
        const int64_t lo = first_key(a, q);
        if (q - lo + 1 > a->S) return -1;
        const int32_t *table = a->tables + (size_t)a->seq[b] * a->T;
        for (int64_t j = lo / a->bs; j <= q / a->bs; j++)
            if (table[j] < 0 || table[j] >= blocks) return -1;
    }
    return 0;
}

/* Each row's sum of squares, added in element order: one row's adds are a chain, each waiting for the
 * last (576 of them a row: 3% of a 16-row decode step on SmolLM2, the other thread waiting), so NORM_ROWS
 * rows run their chains side by side, each in its own order (the same bits as a row alone). */
#define NORM_ROWS 8

static void sums_of_squares(const float *x, long B, long n, float *ss) {
    long b = 0;
    for (; b + NORM_ROWS <= B; b += NORM_ROWS) {
        float s[NORM_ROWS] = {0.0f};
        for (long i = 0; i < n; i++)
            for (int r = 0; r < NORM_ROWS; r++) s[r] += x[(b + r) * n + i] * x[(b + r) * n + i];
        memcpy(ss + b, s, sizeof s);
    }
    for (; b < B; b++) {
        float s = 0.0f;
        for (long i = 0; i < n; i++) s += x[b * n + i] * x[b * n + i];
        ss[b] = s;
    }
}

void tram_rms_norm_rows(const float *x, const float *w, float eps, long B, long n, float *out) {
    float ss[NORM_ROWS];
    for (long b = 0; b < B; b++) {
        const float *xr = x + b * n;
        if (b % NORM_ROWS == 0) sums_of_squares(xr, B - b < NORM_ROWS ? B - b : NORM_ROWS, n, ss);
        float r = 1.0f / sqrtf(ss[b % NORM_ROWS] / (float)n + eps);
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

/* Pool slot of position p of row b's sequence (paged; tram_block_rows_ok checked the table). */
static size_t paged_slot(const block_args *a, long b, int64_t p) {
    return (size_t)a->tables[(size_t)a->seq[b] * a->T + p / a->bs] * a->bs + p % a->bs;
}

/* Cache row (of D elements) of kv head g of row b's key at its new position (offline: [B, Hkv, S];
 * paged: [P / bs, Hkv, bs], each block's rows head by head). */
static size_t store_at(const block_args *a, long b, long g) {
    if (a->P > 0) {
        const size_t slot = paged_slot(a, b, a->qpos[b]);
        return (slot / (size_t)a->bs * (size_t)a->Hkv + (size_t)g) * (size_t)a->bs + slot % (size_t)a->bs;
    }
    return ((size_t)cache_row(a, b) * a->Hkv + g) * a->S + a->qpos[b] % a->S;
}

void tram_store_row(const isa_ops *ops, int kvt, const float *x, long n, uint8_t *out) {
    if (kvt == T_F16 && ops->enc_f16)
        ops->enc_f16(x, n, out);
    else
        tram_enc_row(kvt, x, n, out);
}

/* Row b's kv head g: its query heads and key rotated, its key and value stored. */
static void rope_and_store_head(const isa_ops *ops, const block_args *a, float *qkv, long b, long g) {
    const long D = a->D, group = a->H / a->Hkv, width = (a->H + 2 * a->Hkv) * D;
    const size_t at = store_at(a, b, g) * tram_row_bytes(a->kvt, D);
    float *row = qkv + b * width;
    rope_heads(row + g * group * D, group, D, a->cs + b * D);
    rope_heads(row + (a->H + g) * D, 1, D, a->cs + b * D);
    tram_store_row(ops, a->kvt, row + (a->H + g) * D, D, a->kc + at);
    tram_store_row(ops, a->kvt, row + (a->H + a->Hkv + g) * D, D, a->vc + at);
}

/* Rotate q and k heads of each row and store k, v in the row's cache slot. */
static void rope_and_store(const isa_ops *ops, const block_args *a, float *qkv) {
    for (long b = 0; b < a->B; b++)
        for (long g = 0; g < a->Hkv && a->qpos[b] >= 0; g++) rope_and_store_head(ops, a, qkv, b, g);
}

/* The keys row b attends, as cache rows from its kv head's base (key_base): *n of them, in
 * position order on either cache (offline, position p sits in slot p % S; a tile of mapped rows relies
 * on the caller storing every position of its span, as a prompt chunk does). */
static void row_keys(const block_args *a, long b, size_t *off, long *n) {
    const int64_t q = a->qpos[b];
    long count = 0;  /* the count and bounds in locals: a store to off may alias *n and a's fields, so
                      * that kept each step waiting on the last (a 32k-key attention 10% slower) */
    if (a->P > 0) {
        const int64_t lo = first_key(a, q), bs = a->bs;
        const size_t stride = (size_t)a->Hkv;
        const int32_t *table = a->tables + (size_t)a->seq[b] * a->T;
        int64_t j = lo / bs, o = lo % bs;
        for (int64_t p = lo; p <= q; p++) {
            off[count++] = (size_t)table[j] * (size_t)bs * stride + (size_t)o;  /* kv head 0's row */
            if (++o == bs) o = 0, j++;
        }
        *n = count;
        return;
    }
    const long S = a->S, window = a->window;
    const int64_t *kpos = a->kpos + cache_row(a, b) * S;
    const int64_t p0 = q - S + 1 > 0 ? q - S + 1 : 0;  /* the positions the slots can hold */
    long slot = (long)(p0 % S);  /* then one step at a time: no division per key */
    for (int64_t p = p0; p <= q; p++, slot = slot + 1 == S ? 0 : slot + 1)
        if (kpos[slot] == p && visible(p, q, window)) off[count++] = (size_t)slot;
    *n = count;
}

/* The cache row where kv head g's keys of row b start (values: the same row of vc). */
static size_t key_base(const block_args *a, long b, long g) {
    return a->P > 0 ? (size_t)g * (size_t)a->bs : ((size_t)cache_row(a, b) * a->Hkv + g) * a->S;
}

/* Rows of one sequence at consecutive positions attend in tiles of up to ATT_RT rows (ATT_RT_TILES for
 * the rows that take the bfloat16 tiles, whose queries go 16 to a tile): their keys start at the same
 * position, so each row's keys are a prefix of the tile's last row's. */
#define ATT_RT 8
#define ATT_RT_TILES 16

/* How many rows from b form one tile (1 offline, for padding, or where the next row differs); tiles:
 * the step's rows that take the bfloat16 tiles (NULL: none). */
static long tile_len(const block_args *a, long b, const uint8_t *tiles) {
    const int64_t q = a->qpos[b];
    const long most = tiles && tiles[b] ? ATT_RT_TILES : ATT_RT;
    long len = 1;
    if ((a->P == 0 && !a->mapped) || q < 0) return 1;
    while (len < most && b + len < a->B && a->seq[b + len] == a->seq[b] && a->qpos[b + len] == q + len &&
           first_key(a, q + len) == first_key(a, q))
        len++;
    return len;
}

/* Per-thread scratch of attend_rows: the keys' cache rows, one block's element offsets, the scores of a
 * block, each query's running (max, sum), its number of keys (in all, in the block), the tile's
 * queries and, for a cache that is not float32, one block of keys and values decoded; for a Q8_0 cache
 * read with rounded queries, the block's key rows and the queries' int8 rounding. */
typedef struct {
    size_t *off;          /* [nkeys] */
    size_t *off_next;     /* [nkeys]: the keys of the thread's next item, where they are another row's */
    size_t *boff;         /* [ATT_KB] */
    const uint8_t **krows, **vrows;  /* [ATT_KB + ATT_NEXT] each: a block's rows, then the next one's first */
    float *sc, *ml;       /* [nq * ATT_KB], [2 * nq] */
    float *kbuf, *vbuf;   /* [ATT_KB * D] each (none for float32); kbuf: attend_q8_0's w where not decoded */
    float *qd;            /* [2 * nq * D / 32] (q16: two rows a query) */
    long *n, *nb;         /* [nq] each */
    const float **q;      /* [nq] */
    float **out;          /* [nq] */
    int16_t *qbs;         /* [2 * nq * D / 16] */
    int8_t *qq;           /* [2 * nq * D] */
    void *amx;            /* tram_attend_tiles' scratch (where the step's rows take the tiles) */
} att_scratch;

/* Every part but the last holds a multiple of 8 bytes (nq = ATT_RT x the group, a multiple of 8; ATT_KB
 * even), so each keeps the alignment of the one before it. */
static size_t att_bytes(long nkeys, long nq, long D, int decoded) {
    const size_t floats = (size_t)(nq * ATT_KB + 2 * nq) + (size_t)(decoded ? 2 * ATT_KB * D + 2 * nq * (D / 32) : 0);
    const size_t rounded = decoded ? (size_t)(2 * nq * (D / 16)) * 2 + (size_t)(2 * nq * D) : 0;  /* q16: 2 rows */
    return sizeof(size_t) * (size_t)(2 * nkeys + ATT_KB) + sizeof(uint8_t *) * 2 * (ATT_KB + ATT_NEXT) + sizeof(float) * floats +
           (sizeof(long) * 2 + sizeof(float *) * 2) * (size_t)nq + rounded;
}

static att_scratch att_carve(char *mem, long nkeys, long nq, long D, int decoded) {
    att_scratch t;
    t.off = (size_t *)mem;
    t.off_next = t.off + nkeys;
    t.boff = t.off_next + nkeys;
    t.krows = (const uint8_t **)(t.boff + ATT_KB);
    t.vrows = t.krows + ATT_KB + ATT_NEXT;
    t.sc = (float *)(t.vrows + ATT_KB + ATT_NEXT);
    t.ml = t.sc + nq * ATT_KB;
    t.kbuf = t.ml + 2 * nq;
    t.vbuf = t.kbuf + (decoded ? ATT_KB * D : 0);
    t.qd = t.vbuf + (decoded ? ATT_KB * D : 0);
    t.n = (long *)(t.qd + (decoded ? 2 * nq * (D / 32) : 0));
    t.nb = t.n + nq;
    t.q = (const float **)(t.nb + nq);
    t.out = (float **)(t.q + nq);
    t.qbs = (int16_t *)(t.out + nq);
    t.qq = (int8_t *)(t.qbs + (decoded ? 2 * nq * (D / 16) : 0));
    t.amx = (char *)t.qq + (decoded ? 2 * nq * D : 0);
    t.amx = (char *)t.amx + (64 - (uintptr_t)t.amx % 64) % 64;
    return t;
}

/* The instruction set's attention over a 16-bit cache's own rows (kernels.h), or NULL: the rows are
 * decoded to float32 first. */
static attend16_fn in_place16(const isa_ops *ops, int kvt) {
    return kvt == T_F16 ? ops->attend_f16 : kvt == T_BF16 ? ops->attend_bf16 : NULL;
}

/* The m keys and values of cache rows base + rows[i] as attend reads them (*k, *v, t->boff): float32
 * rows, and 16-bit ones where in_place16 has a kernel, where they lie (boff: element offsets from the
 * cache's start; *k and *v set for float32 only); other types decoded into the scratch, row i at i * D;
 * no k asked for (a Q8_0 cache met with rounded queries): their rows as they are, t->krows and t->vrows,
 * and the next block's first `next` (<= ATT_NEXT) after them, for the kernel to prefetch.
 * boff has ATT_PAD(m) entries. */
static void key_block(const isa_ops *ops, const block_args *a, size_t base, const size_t *rows, long m, long next,
                      const att_scratch *t, const float **k, const float **v) {
    const long D = a->D;
    if (!k) {
        const size_t rb = tram_row_bytes(a->kvt, D);
        for (long i = 0; i < m + next; i++) t->krows[i] = a->kc + (base + rows[i]) * rb, t->vrows[i] = a->vc + (base + rows[i]) * rb;
        return;
    }
    if (a->kvt == T_F32 || in_place16(ops, a->kvt)) {
        for (long i = 0; i < ATT_PAD(m); i++) t->boff[i] = (base + rows[i < m ? i : 0]) * (size_t)D;
        if (a->kvt == T_F32) *k = (const float *)a->kc, *v = (const float *)a->vc;
        return;
    }
    const size_t rb = tram_row_bytes(a->kvt, D);
    const int nblk = (int)(D / tram_types[a->kvt].block);
    for (long i = 0; i < m; i++) {
        ops->dec[a->kvt](a->kc + (base + rows[i]) * rb, nblk, t->kbuf + i * D);
        ops->dec[a->kvt](a->vc + (base + rows[i]) * rb, nblk, t->vbuf + i * D);
    }
    for (long i = 0; i < ATT_PAD(m); i++) t->boff[i] = (size_t)(i < m ? i : 0) * (size_t)D;
    *k = t->kbuf, *v = t->vbuf;
}

/* The floating-point unit's state while a tile attends: subnormal results flushed to zero and subnormal
 * inputs read as zero (MXCSR's FTZ and DAZ bits). A key whose score lies some 80 below the best has a
 * probability under 2^-126, and that times a Q8_0 value's scale likewise: each such product took a
 * microcode assist of ~100 cycles (a 32k-key attention of random rows spent 45% of its time there).
 * Flushed, such a key weighs 0 where it weighed less than 2^-126 of the best key. Returns the state to
 * restore. */
static unsigned flush_subnormals(void) {
#ifdef TRAM_X86
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);
    return csr;
#else
    return 0;
#endif
}

static void restore_fp(unsigned csr) {
#ifdef TRAM_X86
    _mm_setcsr(csr);
#else
    (void)csr;
#endif
}

/* The tile of rows [b0, b0 + rows) and kv head g: its group's query heads of every row over the last
 * row's keys (each row over its own prefix of them), block by block of ATT_KB keys. held: which row's
 * keys t->off holds (held[0], -1 for none) and how many (held[1]): the kv heads of a tile share them. */
static void attend_tile(const isa_ops *ops, const block_args *a, const float *qkv, float *att, long b0,
                        long rows, long g, const att_scratch *t, long *held, int tiles, tram_pf *pf) {
    const long D = a->D, H = a->H, group = a->H / a->Hkv, width = (a->H + 2 * a->Hkv) * D;
    long last = 0;
    if (a->qpos[b0] >= 0) {
        if (held[0] != b0 + rows - 1) row_keys(a, b0 + rows - 1, t->off, held + 1), held[0] = b0 + rows - 1;
        last = held[1];
    }
    if (last == 0) {  /* padding, or nothing visible */
        for (long r = 0; r < rows; r++) memset(att + ((b0 + r) * H + g * group) * D, 0, sizeof(float) * group * D);
        return;
    }
    long nq = 0;
    for (long r = 0; r < rows; r++)
        for (long h = g * group; h < (g + 1) * group; h++, nq++) {
            t->q[nq] = qkv + (b0 + r) * width + h * D;
            t->out[nq] = att + ((b0 + r) * H + h) * D;
            t->n[nq] = last - (rows - 1 - r);  /* consecutive positions from the same first key */
            t->ml[2 * nq] = -INFINITY, t->ml[2 * nq + 1] = 0.0f;
        }
    const size_t base = key_base(a, b0, g);
    const float scale = 1.0f / sqrtf((float)D);
    const int on_tiles = tiles && tram_attend_tiles_ok(nq, D);  /* a Q8_0 cache's rows decoded to float32 first */
    const int rounded = a->kvt == T_Q8_0 && ops->attend_q8_0 && tram_q8() && !on_tiles;  /* the fast activations' path */
    const attend16_fn wide = in_place16(ops, a->kvt);
    const int pair = rounded && tram_q8() == 2;  /* q16: each query as two int8 rows, as matmul.c's x */
    const q8_rows xq = {t->qq, D, t->qd, t->qbs, pair, NULL, NULL};
    for (long j = 0; j < nq && rounded; j++) {
        int8_t *qq = t->qq + (j << pair) * D;
        float *qd = t->qd + (j << pair) * (D / 32);
        int16_t *qbs = t->qbs + (j << pair) * (D / 16);
        if (pair)
            tram_round_q16(ops, t->q[j], D, D, 32, qq, qd, qbs);
        else
            ops->quantize_q8(t->q[j], D / 32, 32, NULL, qq, qd, qbs);
    }
    for (long i0 = 0; i0 < last; i0 += ATT_KB) {
        const long m = last - i0 < ATT_KB ? last - i0 : ATT_KB;
        for (long j = 0; j < nq; j++) t->nb[j] = t->n[j] - i0 < 0 ? 0 : t->n[j] - i0 < m ? t->n[j] - i0 : m;
        const float *k = NULL, *v = NULL;
        const long next = last - i0 - m < ATT_NEXT ? last - i0 - m : ATT_NEXT;
        key_block(ops, a, base, t->off + i0, m, next, t, rounded ? NULL : &k, &v);
        if (rounded)
            ops->attend_q8_0(&xq, t->out, nq, t->nb, t->krows, t->vrows, m + next, D, scale, t->sc, t->ml, t->kbuf);
        else if (on_tiles)  /* float32 rows (decoded or not) or a 16-bit cache's */
            tram_attend_tiles(t->q, t->out, nq, t->nb, wide ? (const void *)a->kc : k, wide ? (const void *)a->vc : v,
                              wide ? a->kvt : T_F32, t->boff, D, scale, t->sc, t->ml, t->amx);
        else if (wide)
            wide(t->q, t->out, nq, t->nb, a->kc, a->vc, t->boff, D, scale, t->sc, t->ml, pf);
        else
            ops->attend(t->q, t->out, nq, t->nb, k, v, t->boff, D, scale, t->sc, t->ml, pf);
    }
    for (long j = 0; j < nq; j++) {
        const float sum = t->ml[2 * j + 1];
        for (long d = 0; d < D; d++) t->out[j][d] /= sum;
    }
}

/* The next item (decoding: tiles of one row) this thread attends as its rows to request (kernels.h's
 * tram_pf): the keys its row's cache rows hold, listed into t->off_next unless they are the row t->off
 * holds (held). Returns 0 for a padding row (nothing listed). The caller requests them only up to
 * PF_MOST keys: a longer run of rows the hardware's prefetchers find on their own, and requested ahead
 * they would leave L2 before the item in hand had streamed its own. */
#define PF_MOST 256
static long take_item(long *claimed) { return __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED); }

static int plan_ahead(const block_args *a, long item, att_scratch *t, const long *held, tram_pf *pf) {
    const long b = item / a->Hkv;
    if (a->qpos[b] < 0) return 0;
    long n = held[1];
    if (held[0] == b)
        pf->rows = t->off;
    else
        row_keys(a, b, t->off_next, &n), pf->rows = t->off_next;
    pf->k = a->kc, pf->v = a->vc, pf->base = key_base(a, b, item % a->Hkv), pf->rb = tram_row_bytes(a->kvt, a->D);
    pf->n = n, pf->i = 0;
    return 1;
}

/* Whether no two of the step's rows (at most ALONE_ROWS: longer steps are not checked) share a cache row
 * or sequence. */
#define ALONE_ROWS 64
static int rows_apart(const block_args *a) {
    if (a->B > ALONE_ROWS) return 0;
    for (long b = 0; b < a->B && (a->P > 0 || a->mapped); b++)
        for (long c = 0; c < b && a->qpos[b] >= 0; c++)
            if (a->qpos[c] >= 0 && a->seq[c] == a->seq[b]) return 0;
    return 1;
}

/* att [B, H, D] from qkv [B, width], whose rows are rotated and stored first: tiles of rows times kv heads
 * over the threads; the rows flagged in `amx` (NULL: none) on AMX-BF16 tiles (tram_attend_tiles; a Q8_0
 * cache's rows decoded to float32 for them). Where every row attends alone (decoding: tiles of one row,
 * rows_apart), each item, a row and a kv head, rotates and stores that head's rows itself, on the thread
 * that attends them; otherwise the calling thread does every row's before the attention (a chunk's rows
 * read one another's keys). Done by the calling thread for all rows, it had been ~2% of a 16-row decode
 * step of SmolLM2, the other thread waiting. The threads take the items in order as they free up;
 * decoding, each takes its next item before it attends the one in hand and requests that item's keys
 * and values from memory while it does (plan_ahead, kernels.h's tram_pf): SmolLM2 Q4_1 at 16 rows, the
 * blocks' time 3-4.5% shorter than with no requests, in one process, calls alternating with and without
 * (one row: 0-2%). Returns 0, or -1 when out of memory. */
static int attend_rows(const isa_ops *ops, const block_args *a, float *qkv, float *att, const uint8_t *amx) {
    const long B = a->B, Hkv = a->Hkv, nkeys = ATT_PAD(a->S), D = a->D;
    const long nq = (amx ? ATT_RT_TILES : ATT_RT) * (a->H / Hkv);
    const int decoded = a->kvt != T_F32;
    long *start = malloc(sizeof(long) * (size_t)(B + 1)), tiles = 0;
    if (!start) return -1;
    for (long b = 0; b < B; b += tile_len(a, b, amx)) start[tiles++] = b;
    start[tiles] = B;
    const int store = tiles == B && rows_apart(a);
    if (!store) rope_and_store(ops, a, qkv);
    const long items = tiles * Hkv;
    int nth = a->threads < items ? a->threads : (int)items;
    if (a->S * a->D * B * a->H < 32768) nth = 1;
    size_t per_thread = att_bytes(nkeys, nq, D, decoded);
    if (amx) per_thread += tram_attend_tiles_bytes(nq, D) + 64;
    per_thread = (per_thread + 63) / 64 * 64;
    char *mem = malloc(per_thread * (size_t)nth);
    long *held = malloc(sizeof(long) * 2 * (size_t)nth);
    if (!mem || !held) {
        free(mem), free(held), free(start);
        return -1;
    }
    for (int th = 0; th < nth; th++) held[2 * th] = -1;
    long claimed = 0;  /* items are taken in order, each thread one ahead of the one it attends */
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int th, nt;
        tram_team(&th, &nt);
        att_scratch t = att_carve(mem + per_thread * (size_t)th, nkeys, nq, D, decoded);
        long *own = held + 2 * th;
        for (long it = take_item(&claimed), next; it < items; it = store ? next : take_item(&claimed)) {
            next = store ? take_item(&claimed) : items;  /* decoding: one ahead, its rows requested meanwhile */
            const long tile = it / Hkv;
            const long b0 = start[tile];
            tram_pf ahead;
            const int listed = store && !amx && next < items && plan_ahead(a, next, &t, own, &ahead);
            tram_pf *pf = listed && ahead.n <= PF_MOST ? &ahead : NULL;
            if (store && a->qpos[b0] >= 0) rope_and_store_head(ops, a, qkv, b0, it % Hkv);
            const unsigned csr = flush_subnormals();
            attend_tile(ops, a, qkv, att, b0, start[tile + 1] - b0, it % Hkv, &t, own, amx && amx[b0], pf);
            restore_fp(csr);
            if (pf) tram_pf_step(pf, 2 * pf->n);  /* what this item's scores left */
            if (listed && ahead.rows == t.off_next) {  /* the next item's keys, already listed */
                size_t *keys = t.off;
                t.off = t.off_next, t.off_next = keys;
                own[0] = next / Hkv, own[1] = ahead.n;
            }
        }
    }
    free(held);
    free(mem);
    free(start);
    return 0;
}

static void add_rows(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] += y[i];
}

/* Where it does not run inside a projection (row_work), the per-row work between the matmuls (norms,
 * residual adds, gating) is split over the threads from this many rows on (a prompt chunk: 3-5% faster
 * on SmolLM2's 512-token prefill); below it, on the calling thread, as waking the other one costs more. */
#define ROWS_SPLIT 64

static int rows_split(const block_args *a) { return a->B >= ROWS_SPLIT && a->threads > 1; }

/* out [B, dim] = the rows of a->x normalised by w. */
static void norm_rows(const block_args *a, const float *w, float *out) {
    const long dim = a->dim;
    if (!rows_split(a)) {
        tram_rms_norm_rows(a->x, w, a->eps, a->B, dim, out);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(a->threads) schedule(static)
#endif
    for (long b = 0; b < a->B; b++) tram_rms_norm_rows(a->x + b * dim, w, a->eps, 1, dim, out + b * dim);
}

/* a->x [B, dim] += y. */
static void add_residual(const block_args *a, const float *y) {
    const long dim = a->dim;
    if (!rows_split(a)) {
        add_rows(a->x, y, a->B * dim);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(a->threads) schedule(static)
#endif
    for (long b = 0; b < a->B; b++) add_rows(a->x + b * dim, y + b * dim, dim);
}

/* Row b of gu [B, F] = silu(gate) * up of row b of h13 [B, 2F] (gate, then up). */
static void gate_row(const isa_ops *ops, long F, const float *h13, float *gu, long b) {
    ops->silu_mul(h13 + b * 2 * F, h13 + b * 2 * F + F, gu + b * F, F);
}

static void gate_rows(const isa_ops *ops, const block_args *a, const float *h13, float *gu) {
    if (!rows_split(a)) {
        for (long b = 0; b < a->B; b++) gate_row(ops, a->F, h13, gu, b);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(a->threads) schedule(static)
#endif
    for (long b = 0; b < a->B; b++) gate_row(ops, a->F, h13, gu, b);
}

/* LoRA scratch: one slot's rows of a projection's input and output, and their A products. */
typedef struct {
    float *x, *t, *y;  /* [B, max in], [B, max r], [B, max out] */
    long *rows;        /* [B] */
} lora_scratch;

/* Where projection g's A starts in a->lora (its B follows, R_g * in_g floats on). */
static const float *lora_at(const block_args *a, int g) {
    const float *p = a->lora;
    for (int j = 0; j < g; j++) {
        long in, out;
        lora_dims(a, j, &in, &out);
        p += (size_t)a->lora_cols[j * (a->L + 1) + a->L] * (size_t)(in + out);
    }
    return p;
}

/* y [B, out] += each row's adapter delta of projection g on x [B, in]: slot by slot, its rows gathered
 * (M = their count), t = x . A^T [M, r] then y += t . B^T, as F32 matmuls. Returns 0, or -1 when out of
 * memory. */
static int lora_add(const isa_ops *ops, const block_args *a, const lora_scratch *l, int g, const float *x,
                    float *y) {
    long in, out;
    lora_dims(a, g, &in, &out);
    const int32_t *cols = a->lora_cols + g * (a->L + 1);
    const float *A = lora_at(a, g), *Bs = A + (size_t)cols[a->L] * in;
    int rc = 0;
    for (long s = 0; s < a->L && !rc; s++) {
        const long r = cols[s + 1] - cols[s];
        long m = 0;
        for (long b = 0; b < a->B && r > 0; b++)
            if (a->lora_row[b] == s && a->qpos[b] >= 0) {
                l->rows[m] = b;
                memcpy(l->x + m++ * in, x + b * in, sizeof(float) * in);
            }
        if (m == 0) continue;
        rc |= tram_matmul(ops, l->x, (const uint8_t *)(A + (size_t)cols[s] * in), l->t, m, r, in, T_F32, a->threads);
        rc |= tram_matmul(ops, l->t, (const uint8_t *)(Bs + (size_t)cols[s] * out), l->y, m, out, r, T_F32,
                          a->threads);
        for (long i = 0; i < m; i++) add_rows(y + l->rows[i] * out, l->y + i * out, out);
    }
    return rc;
}

/* Which rows' projections run on bfloat16 tiles (tiles_bf16.c): the prompt rows of a prompt of `from`
 * tokens or more (a->prompts; from = tram_tiles_from(), 0: none), however its prompt was cut into
 * chunks or found in the prefix cache; the others, decoding rows among them (a recomputed answer's
 * too), keep the integer kernels, so that a decoded token does not depend on the prompts that share
 * its step. Returns whether any row does (flag[b] set per row). */
static int tile_rows(const block_args *a, long from, uint8_t *flag) {
    int any = 0;
    for (long b = 0; b < a->B; b++) {
        const int64_t q = a->qpos[b];
        const long prompt = from > 0 && a->prompts && q >= 0 ? a->prompts[a->P > 0 ? a->seq[b] : cache_row(a, b)] : 0;
        flag[b] = from > 0 && prompt >= from && q < prompt;
        any |= flag[b];
    }
    return any;
}

/* y [B, N] = x [B, K] . W^T, each run of rows flagged alike (tiles: NULL for none) in one call; h: the
 * per-row work the one call runs on its threads (rows_hooked; NULL with tiles). */
static int rows_matmul(const isa_ops *ops, const block_args *a, const uint8_t *tiles, const float *x,
                       const uint8_t *w, float *y, long N, long K, int t, const matmul_hooks *h) {
    if (!tiles) return tram_matmul_hooked(ops, x, w, y, a->B, N, K, t, a->threads, h);
    int rc = 0;
    for (long b0 = 0, b1; b0 < a->B; b0 = b1) {
        for (b1 = b0 + 1; b1 < a->B && tiles[b1] == tiles[b0]; b1++) {}
        rc |= (tiles[b0] ? tram_tiles_bf16 : tram_matmul)(ops, x + b0 * K, w, y + b0 * N, b1 - b0, N, K, t, a->threads);
    }
    return rc;
}

/* y [B, sum of rows] = x [B, K] . W^T for W the n pieces' rows stacked (piece i: rows[i] rows of type
 * t[i] at w[i]; rows[i] = 0: none). One piece runs straight into y (with h); several run into tmp [B,
 * rows[i]] each and are copied into their columns of y (at B = 1 the columns are contiguous: straight in). */
static int stacked_matmul(const isa_ops *ops, const block_args *a, const uint8_t *tiles, const float *x,
                          const uint8_t *const *w, const int *t, const long *rows, int n, float *y, long K,
                          float *tmp, const matmul_hooks *h) {
    const long B = a->B;
    long width = 0, col = 0;
    for (int i = 0; i < n; i++) width += rows[i];
    if (width == rows[0]) return rows_matmul(ops, a, tiles, x, w[0], y, width, K, t[0], h);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (rows[i] == 0) continue;
        float *out = B == 1 ? y + col : tmp;
        rc |= rows_matmul(ops, a, tiles, x, w[i], out, rows[i], K, t[i], NULL);
        for (long b = 0; b < B && out == tmp; b++)
            memcpy(y + b * width + col, tmp + b * rows[i], sizeof(float) * (size_t)rows[i]);
        col += rows[i];
    }
    return rc;
}

/* Scratch of one step, carved from one allocation. */
typedef struct {
    float *xn, *qkv, *att, *h13, *gu, *y;  /* [B,dim] [B,width] [B,HD] [B,2F] [B,F] [B,dim] */
    float *pieces;                         /* [B, max(width, 2F)]: split q/k/v or gate/up (else none) */
    /* Mixtral: [B,E] router logits, [B,dim] one expert's input rows, [B,dim] the experts' weighted sums,
     * [B,K] each row's routing weights and [B] those of one expert's rows */
    float *logits, *xe, *acc, *wsel, *wrow;
    long *chosen, *rows;                   /* [B,K] each row's experts (by id), [B] the rows of one expert */
    uint8_t *tiles;                        /* [B] rows whose projections take the tiles (tile_rows), or NULL */
    lora_scratch lora;                     /* L > 0 */
} scratch;

/* The per-row work between the projections, run by the projection's own threads (matmul_hooks) where
 * one call makes it (rows_hooked): the norm before the stacked q/k/v and the gate/up projections (each
 * thread the rows it then rounds), the gating before the down projection, and the residual adds after
 * the output and down projections (each thread its columns as they are done). The calling thread had
 * run them alone between the parallel regions, the other waiting. The same arithmetic per row. */
typedef struct {
    const isa_ops *ops;
    const block_args *a;
    const float *norm, *h13;  /* the norm's weights; gate_before's input */
    float *out;               /* norm_before's or gate_before's rows */
} row_work;

static void norm_before(const void *ctx, long m0, long m1) {
    const row_work *r = ctx;
    const long dim = r->a->dim;
    tram_rms_norm_rows(r->a->x + m0 * dim, r->norm, r->a->eps, m1 - m0, dim, r->out + m0 * dim);
}

static void gate_before(const void *ctx, long m0, long m1) {
    const row_work *r = ctx;
    for (long b = m0; b < m1; b++) gate_row(r->ops, r->a->F, r->h13, r->out, b);
}

static void residual_after(const void *ctx, const float *y, long ldy, long m0, long m1, long n0, long n1) {
    const row_work *r = ctx;
    for (long b = m0; b < m1; b++) add_rows(r->a->x + b * r->a->dim + n0, y + b * ldy + n0, n1 - n0);
}

/* Whether the projection of `rows` (a stack of n pieces; NULL: one matrix) is one call that can take the
 * step's per-row work: no rows on the bfloat16 tiles, one piece. */
static int rows_hooked(const scratch *s, const long *rows, int n) {
    int pieces = 0;
    for (int i = 0; rows && i < n; i++) pieces += rows[i] > 0;
    return !s->tiles && pieces <= 1;
}

/* Returns 0, or -1 when out of memory. */
static int attention_half(const isa_ops *ops, const block_args *a, const scratch *s) {
    const long dim = a->dim, HD = a->H * a->D;
    int rc = 0;
    const row_work norm = {ops, a, a->norm1, NULL, s->xn}, res = {ops, a, NULL, NULL, NULL};
    const matmul_hooks before = {norm_before, NULL, &norm}, after = {NULL, residual_after, &res};
    const int hq = rows_hooked(s, a->rows_qkv, 3), ho = rows_hooked(s, NULL, 0) && a->L == 0;
    if (!hq) norm_rows(a, a->norm1, s->xn);
    const uint8_t *const w[3] = {a->wqkv, a->wk, a->wv};
    const int t[3] = {a->tqkv, a->tk, a->tv};
    rc |= stacked_matmul(ops, a, s->tiles, s->xn, w, t, a->rows_qkv, 3, s->qkv, dim, s->pieces, hq ? &before : NULL);
    if (a->L > 0) rc |= lora_add(ops, a, &s->lora, 0, s->xn, s->qkv);
    rc |= attend_rows(ops, a, s->qkv, s->att, s->tiles);
    rc |= rows_matmul(ops, a, s->tiles, s->att, a->wo, s->y, dim, HD, a->to, ho ? &after : NULL);
    if (a->L > 0) rc |= lora_add(ops, a, &s->lora, 1, s->att, s->y);
    if (!ho) add_residual(a, s->y);
    return rc;
}

static int ffn_half(const isa_ops *ops, const block_args *a, const scratch *s) {
    const long dim = a->dim, F = a->F;
    int rc = 0;
    const row_work norm = {ops, a, a->norm2, NULL, s->xn}, gate = {ops, a, NULL, s->h13, s->gu};
    const matmul_hooks before = {norm_before, NULL, &norm};
    const matmul_hooks down = {gate_before, a->L == 0 ? residual_after : NULL, &gate};
    const int h13 = rows_hooked(s, a->rows_13, 2), h2 = rows_hooked(s, NULL, 0);
    if (!h13) norm_rows(a, a->norm2, s->xn);
    const uint8_t *const w[2] = {a->w13, a->w3};
    const int t[2] = {a->t13, a->t3};
    rc |= stacked_matmul(ops, a, s->tiles, s->xn, w, t, a->rows_13, 2, s->h13, dim, s->pieces, h13 ? &before : NULL);
    if (a->L > 0) rc |= lora_add(ops, a, &s->lora, 2, s->xn, s->h13);
    if (!h2) gate_rows(ops, a, s->h13, s->gu);
    rc |= rows_matmul(ops, a, s->tiles, s->gu, a->w2, s->y, dim, F, a->t2, h2 ? &down : NULL);
    if (a->L > 0) rc |= lora_add(ops, a, &s->lora, 3, s->gu, s->y);
    if (!h2 || a->L > 0) add_residual(a, s->y);
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

/* Expert e over the rows that chose it (one pass over its weights at M = their count), each row's
 * output weighted into its s->acc row; returns 0, or -1 when out of memory. */
static int expert_rows(const isa_ops *ops, const block_args *a, const scratch *s, long e) {
    const long B = a->B, dim = a->dim, F = a->F, K = a->K;
    long m = 0;
    for (long b = 0; b < B; b++)
        for (long k = 0; k < K && a->qpos[b] >= 0; k++)
            if (s->chosen[b * K + k] == e) s->rows[m] = b, s->wrow[m++] = s->wsel[b * K + k];
    if (m == 0) return 0;
    for (long i = 0; i < m; i++) memcpy(s->xe + i * dim, s->xn + s->rows[i] * dim, sizeof(float) * dim);
    size_t rb1 = 0, rb3 = 0, rb2 = 0;
    tram_packed_extent(&rb1, a->t1e, F, dim);  /* bytes of one expert's matrix (checked by the extents) */
    tram_packed_extent(&rb3, a->t3e, F, dim);
    tram_packed_extent(&rb2, a->t2, dim, F);
    float *h1 = s->h13, *h3 = s->h13 + B * F;
    int rc = tram_matmul(ops, s->xe, a->w1e + e * rb1, h1, m, F, dim, a->t1e, a->threads);
    rc |= tram_matmul(ops, s->xe, a->w3e + e * rb3, h3, m, F, dim, a->t3e, a->threads);
    for (long i = 0; i < m; i++) ops->silu_mul(h1 + i * F, h3 + i * F, s->gu + i * F, F);
    rc |= tram_matmul(ops, s->gu, a->w2 + e * rb2, s->y, m, dim, F, a->t2, a->threads);
    for (long i = 0; i < m; i++) {
        float *acc = s->acc + s->rows[i] * dim;
        for (long j = 0; j < dim; j++) acc[j] += s->y[i * dim + j] * s->wrow[i];
    }
    return rc;
}

/* The experts in increasing id, so each row's sum runs in the order model/moe.py adds them. */
static int moe_half(const isa_ops *ops, const block_args *a, const scratch *s) {
    const long B = a->B, dim = a->dim, E = a->E, K = a->K;
    norm_rows(a, a->norm2, s->xn);
    int rc = tram_matmul(ops, s->xn, (const uint8_t *)a->gate, s->logits, B, E, dim, 0, a->threads);  /* F32 */
    for (long b = 0; b < B; b++)
        if (a->qpos[b] >= 0) route(s->logits + b * E, E, K, s->chosen + b * K, s->wsel + b * K);
    memset(s->acc, 0, sizeof(float) * (size_t)(B * dim));
    for (long e = 0; e < E && !rc; e++) rc |= expert_rows(ops, a, s, e);
    for (long b = 0; b < B; b++)
        if (a->qpos[b] >= 0) add_rows(a->x + b * dim, s->acc + b * dim, dim);  /* padding: nothing reads it */
    return rc;
}

/* The LoRA scratch for a->L > 0 slots in one malloc'd block (returned, to free; NULL when L = 0 or out
 * of memory, *oom = 1 then). */
static void *lora_alloc(const block_args *a, lora_scratch *l, int *oom) {
    long max_in = 0, max_out = 0, max_r = 0;
    for (int g = 0; g < 4 && a->L > 0; g++) {
        long in, out;
        lora_dims(a, g, &in, &out);
        max_in = in > max_in ? in : max_in, max_out = out > max_out ? out : max_out;
        const int32_t *cols = a->lora_cols + g * (a->L + 1);
        for (long s = 0; s < a->L; s++) max_r = cols[s + 1] - cols[s] > max_r ? cols[s + 1] - cols[s] : max_r;
    }
    *oom = 0;
    if (a->L == 0) return NULL;
    const size_t floats = (size_t)a->B * (size_t)(max_in + max_r + max_out);
    char *mem = malloc(sizeof(float) * floats + sizeof(long) * (size_t)a->B);
    if (!mem) return *oom = 1, NULL;
    l->x = (float *)mem;
    l->t = l->x + a->B * max_in;
    l->y = l->t + a->B * max_r;
    l->rows = (long *)(mem + sizeof(float) * floats);
    return mem;
}

/* A block's scratch, kept from one call to the next: the largest asked for so far, lent to one call at a
 * time (a call finding it lent mallocs its own). A 7B model's 512-token prompt chunk asks for 126 MB a
 * block, which malloc maps afresh at each one (past glibc's largest mapping threshold, build/heap.py)
 * and the kernel zeroes page by page: 3% of the prefill's samples in clear_page and page faults. */
static pthread_mutex_t g_scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static void *g_scratch;
static size_t g_scratch_bytes;

/* `bytes` of scratch: the kept block (*kept = 1) or, where another call holds it, a malloc'd one (NULL
 * when out of memory). */
static void *scratch_take(size_t bytes, int *kept) {
    *kept = pthread_mutex_trylock(&g_scratch_lock) == 0;
    if (!*kept) return malloc(bytes);
    if (g_scratch_bytes < bytes) {
        free(g_scratch);
        g_scratch = malloc(bytes);
        g_scratch_bytes = g_scratch ? bytes : 0;
    }
    if (g_scratch) return g_scratch;
    pthread_mutex_unlock(&g_scratch_lock);
    *kept = 0;
    return NULL;
}

static void scratch_give(void *p, int kept) {
    if (kept)
        pthread_mutex_unlock(&g_scratch_lock);
    else
        free(p);
}

int tram_run_block(const isa_ops *ops, const block_args *a) {
    const long B = a->B, dim = a->dim, HD = a->H * a->D, width = (a->H + 2 * a->Hkv) * a->D, F = a->F;
    const long moe = a->E > 0 ? 1 : 0, split = a->rows_qkv[0] < width || a->rows_13[1] > 0;
    size_t floats = (size_t)B * (dim + width + HD + 3 * F + dim);
    floats += (size_t)moe * B * (a->E + 2 * dim + a->K + 1);
    floats += (size_t)split * B * (width > 2 * F ? width : 2 * F);
    int kept;
    float *buf = scratch_take(sizeof(float) * floats + (size_t)B, &kept);
    long *ids = moe ? malloc(sizeof(long) * (size_t)B * (a->K + 1)) : NULL;
    scratch s;
    int oom;
    void *lora_mem = lora_alloc(a, &s.lora, &oom);
    if (!buf || (moe && !ids) || oom) {
        scratch_give(buf, kept);
        free(ids);
        free(lora_mem);
        return -1;
    }
    s.xn = buf;
    s.qkv = s.xn + B * dim;
    s.att = s.qkv + B * width;
    s.h13 = s.att + B * HD;
    s.gu = s.h13 + B * 2 * F;
    s.y = s.gu + B * F;
    s.logits = s.y + B * dim;  /* the Mixtral part (empty for a dense block) */
    s.xe = s.logits + moe * B * a->E;
    s.acc = s.xe + moe * B * dim;
    s.wsel = s.acc + moe * B * dim;
    s.wrow = s.wsel + moe * B * a->K;
    s.pieces = s.wrow + moe * B;
    s.chosen = ids;
    s.rows = moe ? ids + B * a->K : NULL;
    s.tiles = (uint8_t *)(buf + floats);
    if (!tile_rows(a, tram_tiles_from(), s.tiles)) s.tiles = NULL;
    int rc = attention_half(ops, a, &s);
    rc |= a->E > 0 ? moe_half(ops, a, &s) : ffn_half(ops, a, &s);
    scratch_give(buf, kept);
    free(ids);
    free(lora_mem);
    return rc ? -1 : 0;
}
