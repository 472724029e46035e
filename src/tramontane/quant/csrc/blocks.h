/*
 * blocks.h: the GGML block types the kernels read. Owns the type ids and their geometry (elements
 * and bytes per block), the little-endian byte readers, IEEE half / bfloat16 to float conversion, the
 * unpacking of the K-quants' six-bit scales, and the declarations of the portable per-type decoders
 * (defined in blocks.c).
 *
 * Block layouts are ggml's `block_*` structs, all little-endian (weights/gguf_quants.py states the
 * same facts in torch). No alignment is assumed: every read goes through memcpy.
 */
#ifndef TRAM_BLOCKS_H
#define TRAM_BLOCKS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Symbols shared between the files of the module but not exported from the shared object. */
#if defined(__GNUC__) || defined(__clang__)
#define TRAM_HIDDEN __attribute__((visibility("hidden")))
#else
#define TRAM_HIDDEN
#endif

/* GGML type ids (ggml.h enum ggml_type). */
enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30,
    T_Q4_0_R8 = 66,  /* not GGML's: Q4_0 rows interleaved 8 by 8 for the integer kernel (below) */
    T_Q4_1_R8 = 67,  /* not GGML's: the same for Q4_1 */
    T_Q4_K_R8 = 68,  /* not GGML's: the same for Q4_K (its scales rearranged too, below) */
    T_Q6_K_R8 = 69,  /* not GGML's: the same for Q6_K (below) */
    T_Q3_K_R8 = 70,  /* not GGML's: the same for Q3_K (below) */
    T_Q8_0_R8 = 71,  /* not GGML's: the same for Q8_0 */
    T_Q5_0_R8 = 72,  /* not GGML's: the same for Q5_0 (its fifth bits rearranged, below) */
    T_Q5_1_R8 = 73,  /* not GGML's: the same for Q5_1 */
    T_COUNT = 74
};

/* Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K and Q3_K interleaved (T_Q4_0_R8 ... T_Q5_1_R8): matrices of a
 * multiple of 8 rows with the bytes of each 8 rows (a group) rearranged block by block, the same number of
 * bytes as in GGML's layout, so that the integer kernel (simd_q8.inc) reads a block's 8 scales with one
 * load and four quant bytes of each of the 8 rows with another. Block i of a group, for Q4_0, Q4_1,
 * Q5_0, Q5_1, Q8_0 and Q4_K:
 *   - the 8 rows' float16 scales d (16 bytes), then (Q4_1, Q5_1: m, Q4_K: dmin) their 8 second fields;
 *   - Q5_0 and Q5_1 only: the 8 rows' fifth bits (32 bytes), row r's in bytes 4r..4r+3, arranged as its
 *     quant bytes below: bit c of byte k is the fifth bit of element 4c + k, bit 4 + c that of element
 *     16 + 4c + k (c, k < 4), so that one shift and one mask put the fifth bits of load c's low nibbles
 *     (or high ones) at bit 4 of their bytes (tram_fifth_word);
 *   - Q4_K only: the 8 rows' six-bit sub-block scales (48 bytes), then their mins (48 bytes), each as
 *     two 32-byte vectors A (sub-blocks 0..3) and B (4..7) after unpacking: byte j = 16 L + k of A,
 *     k = 4 s + (r % 4) and L = r / 4, holds row r's value for sub-block s (B: s + 4), so that one byte
 *     shuffle within 128-bit lanes gives a sub-block's 8 values (rows 0..3 low, 4..7 high). Stored:
 *     byte j of the first 32 = A_j's low nibble | B_j's low nibble << 4; byte k of the last 16 = the
 *     top two bits of A_k, A_16+k, B_k, B_16+k at bits 0, 2, 4, 6 (tram_k4r8_field);
 *   - the quants: for c = 0, 1, ... the quant bytes 4c..4c+3 of row 0, of row 1, ..., of row 7 (4 x 32
 *     bytes for Q4_0/Q4_1/Q5_0/Q5_1's 16 quant bytes per row, 8 x 32 for Q8_0's 32, 32 x 32 for Q4_K's 128).
 * Ranges of whole groups of rows stay contiguous; a single row is not (an embedding lookup gathers
 * it: tram_interleaved_row).
 * Q6_K interleaved (T_Q6_K_R8), super-block i of a group (8 x 210 bytes): the 8 rows' float16 d (16
 * bytes); their int8 sub-block scales as 4 vectors of 32 bytes, vector v holding sub-blocks 4v..4v+3 with
 * row r's scale of sub-block s at byte 16 (r / 4) + 4 (s % 4) + r % 4 (one shuffle within 128-bit
 * lanes gives a sub-block's 8 scales); then for c = 0..47 bytes 4c..4c+3 of each row's ql (c < 32) and
 * qh (c >= 32: bytes 4(c - 32)..) side by side, rows 0..7.
 * Q3_K interleaved (T_Q3_K_R8), super-block i of a group (8 x 110 bytes): the 8 rows' float16 d (16
 * bytes); their six-bit scale fields (sc + 32, k3_field) as 4 vectors V_t of 32 bytes arranged as Q6_K's
 * int8 scales above (row r's field of sub-block s at byte 16 (r / 4) + 4 (s % 4) + r % 4 of V_(s / 4)),
 * stored in 96 bytes: byte j of the first 32 = V0_j | V1_j << 4 (low nibbles), of the next 32 = V2_j |
 * V3_j << 4, of the last 32 = the top two bits of V0_j, V1_j, V2_j, V3_j at bits 0, 2, 4, 6
 * (tram_q3r8_field); then for c = 0..23 bytes 4c..4c+3 of each row's hmask (c < 8) and qs (c >= 8:
 * bytes 4(c - 8)..) side by side, rows 0..7.
 */
/* The interleaved type of a GGML type, or -1; and back. */
static inline int tram_r8_of(int qtype) {
    return qtype == T_Q4_0 ? T_Q4_0_R8 : qtype == T_Q4_1 ? T_Q4_1_R8 : qtype == T_Q4_K ? T_Q4_K_R8
         : qtype == T_Q6_K ? T_Q6_K_R8 : qtype == T_Q3_K ? T_Q3_K_R8 : qtype == T_Q8_0 ? T_Q8_0_R8
         : qtype == T_Q5_0 ? T_Q5_0_R8 : qtype == T_Q5_1 ? T_Q5_1_R8 : -1;
}
static inline int tram_r8_base(int qtype) {
    return qtype == T_Q4_0_R8 ? T_Q4_0 : qtype == T_Q4_1_R8 ? T_Q4_1 : qtype == T_Q4_K_R8 ? T_Q4_K
         : qtype == T_Q6_K_R8 ? T_Q6_K : qtype == T_Q3_K_R8 ? T_Q3_K : qtype == T_Q8_0_R8 ? T_Q8_0
         : qtype == T_Q5_0_R8 ? T_Q5_0 : qtype == T_Q5_1_R8 ? T_Q5_1 : -1;
}

typedef struct { int block; int size; } tinfo;

/* Elements per block and bytes per block of each supported type; {0,0} = unsupported. */
extern TRAM_HIDDEN const tinfo tram_types[T_COUNT];

/* Whether the kernels run GGML type `qtype`. */
static inline int tram_type_ok(int qtype) {
    return qtype >= 0 && qtype < T_COUNT && tram_types[qtype].block != 0;
}

/* Bytes of one packed row of K elements (K a multiple of the type's block size). */
static inline size_t tram_row_bytes(int qtype, long K) {
    return (size_t)(K / tram_types[qtype].block) * (size_t)tram_types[qtype].size;
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

/* Q3_K's 12 scale bytes: scale i is a six-bit field minus 32, the field's low four bits nibble i / 8
 * of byte i % 8, its top two bits 2(i / 4), 2(i / 4) + 1 of byte 8 + i % 4. k3_field reads field i;
 * k3_put_field writes it. */
static inline int k3_field(const uint8_t *s, int i) {
    return ((s[i % 8] >> (4 * (i / 8))) & 15) | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4);
}
static inline void k3_put_field(uint8_t *s, int i, int v) {
    const int n = 4 * (i / 8), t = 2 * (i / 4);
    s[i % 8] = (uint8_t)((s[i % 8] & ~(15 << n)) | ((v & 15) << n));
    s[8 + i % 4] = (uint8_t)((s[8 + i % 4] & ~(3 << t)) | (((v >> 4) & 3) << t));
}

/* Q3_K's 16 signed scales. */
static inline void k3_scales(const uint8_t *s, int *sc) {
    for (int i = 0; i < 16; i++) sc[i] = k3_field(s, i) - 32;
}

/* Portable decoders, nb blocks (for the float types: n elements) -> float32, the same arithmetic as
 * weights/gguf_quants.py. */
TRAM_HIDDEN void tram_dec_f32_c(const uint8_t *b, int n, float *o);
TRAM_HIDDEN void tram_dec_f16_c(const uint8_t *b, int n, float *o);
TRAM_HIDDEN void tram_dec_bf16_c(const uint8_t *b, int n, float *o);
TRAM_HIDDEN void tram_dec_q4_0_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q4_1_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q5_0_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q5_1_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q8_0_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q2_k_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q3_k_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q4_k_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q5_k_c(const uint8_t *b, int nb, float *o);
TRAM_HIDDEN void tram_dec_q6_k_c(const uint8_t *b, int nb, float *o);

/* n floats (a multiple of the type's block) as a row of a KV cache type: T_F32, T_F16, T_BF16 or T_Q8_0. */
TRAM_HIDDEN void tram_enc_row(int type, const float *x, long n, uint8_t *out);
static inline int tram_kv_type_ok(int type) { return type == T_F32 || type == T_F16 || type == T_BF16 || type == T_Q8_0; }

/* N rows (a multiple of 8) of K elements of GGML type qtype (tram_r8_of(qtype) >= 0) to the interleaved
 * layout (to_r8 != 0) or back, group by group; src and dst distinct. */
TRAM_HIDDEN void tram_interleave_rows(const uint8_t *src, uint8_t *dst, long N, long K, int qtype, int to_r8);
/* Row r (0..7) of an interleaved group of rows of K elements of GGML type qtype, in GGML's layout at
 * `row` (tram_row_bytes(qtype, K) bytes). */
TRAM_HIDDEN void tram_interleaved_row(const uint8_t *group, int r, long K, int qtype, uint8_t *row);

#endif /* TRAM_BLOCKS_H */
