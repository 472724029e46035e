/*
 * blocks.c: the GGML type table and the portable (plain C) per-type block decoders. They are the
 * scalar instruction set's decoders (scalar.c) and the reference the vector decoders (simd_decode.inc)
 * follow; aarch64 and any other non-x86 build runs these. Also the encoder of the KV cache's row types
 * (F32, F16, BF16, Q8_0), rounding as model/kv_types.py does, so that both paths read the same values.
 */
#include <math.h>

#include "kernels.h"

const tinfo tram_types[T_COUNT] = {
    [T_F32] = {1, 4},      [T_F16] = {1, 2},       [T_BF16] = {1, 2},
    [T_Q4_0] = {32, 18},   [T_Q4_1] = {32, 20},    [T_Q5_0] = {32, 22},
    [T_Q5_1] = {32, 24},   [T_Q8_0] = {32, 34},
    [T_Q2_K] = {256, 84},  [T_Q3_K] = {256, 110},
    [T_Q4_K] = {256, 144}, [T_Q5_K] = {256, 176},  [T_Q6_K] = {256, 210},
    [T_Q4_0_R8] = {32, 18}, [T_Q4_1_R8] = {32, 20}, [T_Q4_K_R8] = {256, 144},
    [T_Q6_K_R8] = {256, 210}, [T_Q3_K_R8] = {256, 110}, [T_Q8_0_R8] = {32, 34},
    [T_Q5_0_R8] = {32, 22}, [T_Q5_1_R8] = {32, 24},
};

void tram_dec_f32_c(const uint8_t *b, int n, float *o) { memcpy(o, b, (size_t)n * 4); }

void tram_dec_f16_c(const uint8_t *b, int n, float *o) {
    for (int i = 0; i < n; i++) o[i] = f16_to_f32(rd16(b + 2 * i));
}

void tram_dec_bf16_c(const uint8_t *b, int n, float *o) {
    for (int i = 0; i < n; i++) o[i] = bf16_to_f32(rd16(b + 2 * i));
}

void tram_dec_q4_0_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 18, o += 32) {
        float d = f16_to_f32(rd16(b));
        for (int j = 0; j < 16; j++) {
            o[j] = d * (float)((b[2 + j] & 15) - 8);
            o[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
    }
}

void tram_dec_q4_1_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 20, o += 32) {
        float d = f16_to_f32(rd16(b)), m = f16_to_f32(rd16(b + 2));
        for (int j = 0; j < 16; j++) {
            o[j] = d * (float)(b[4 + j] & 15) + m;
            o[j + 16] = d * (float)(b[4 + j] >> 4) + m;
        }
    }
}

void tram_dec_q5_0_c(const uint8_t *b, int nb, float *o) {
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

void tram_dec_q5_1_c(const uint8_t *b, int nb, float *o) {
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

void tram_dec_q8_0_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 34, o += 32) {
        float d = f16_to_f32(rd16(b));
        for (int j = 0; j < 32; j++) o[j] = d * (float)(int8_t)b[2 + j];
    }
}

/* Q2_K: scales[16] | qs[64] | d | dmin. Element 128h + 32j + l is bits 2j..2j+1 of qs[32h + l]; it
 * lies in sub-block s = 8h + 2j + l / 16 (of 16 elements), whose byte scales[s] holds the scale (low
 * nibble) and the min (high nibble): y = (d * sc) * q - dmin * mn. */
void tram_dec_q2_k_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 84, o += 256) {
        float d = f16_to_f32(rd16(b + 80)), dmin = f16_to_f32(rd16(b + 82));
        for (int s = 0; s < 16; s++) {
            float dl = d * (float)(b[s] & 15), ml = dmin * (float)(b[s] >> 4);
            const int h = s / 8, j = (s / 2) % 4, l0 = 16 * (s & 1);
            for (int l = l0; l < l0 + 16; l++)
                o[128 * h + 32 * j + l] = dl * (float)((b[16 + 32 * h + l] >> (2 * j)) & 3) - ml;
        }
    }
}

/* Q3_K: hmask[32] | qs[64] | scales[12] | d. Element 128h + 32j + l has its low two bits at bits
 * 2j..2j+1 of qs[32h + l] and its third at bit 4h + j of hmask[l]; y = (d * sc[element / 16]) * (q - 4)
 * (ggml phrases it as "subtract 4 where the hmask bit is clear": the same number). */
void tram_dec_q3_k_c(const uint8_t *b, int nb, float *o) {
    for (int i = 0; i < nb; i++, b += 110, o += 256) {
        float d = f16_to_f32(rd16(b + 108));
        int sc[16];
        k3_scales(b + 96, sc);
        for (int s = 0; s < 16; s++) {
            float dl = d * (float)sc[s];
            const int h = s / 8, j = (s / 2) % 4, l0 = 16 * (s & 1);
            for (int l = l0; l < l0 + 16; l++) {
                int q = ((b[32 + 32 * h + l] >> (2 * j)) & 3) | (((b[l] >> (4 * h + j)) & 1) << 2);
                o[128 * h + 32 * j + l] = dl * (float)(q - 4);
            }
        }
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

void tram_dec_q4_k_c(const uint8_t *b, int nb, float *o) { dec_qk_c(b, nb, o, 0); }
void tram_dec_q5_k_c(const uint8_t *b, int nb, float *o) { dec_qk_c(b, nb, o, 1); }

/* Q6_K: ql[128] | qh[64] | scales int8[16] | d. Element 128h + 32k + l takes nibble k/2 of
 * ql[64h + 32(k%2) + l] and bits 2k..2k+1 of qh[32h + l]; q - 32, scaled by d * sc[element / 16]. */
void tram_dec_q6_k_c(const uint8_t *b, int nb, float *o) {
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

/* ggml's 12 scale bytes of a Q4_K block from its 8 six-bit scales and mins: the inverse of k4_scales
 * (every one of the 96 bits carries one bit of a field). */
static void k4_pack(const uint8_t *sc, const uint8_t *mn, uint8_t *s) {
    for (int i = 0; i < 4; i++) {
        s[i] = (uint8_t)(sc[i] | ((sc[i + 4] >> 4) << 6));
        s[i + 4] = (uint8_t)(mn[i] | ((mn[i + 4] >> 4) << 6));
        s[i + 8] = (uint8_t)((sc[i + 4] & 0x0f) | ((mn[i + 4] & 0x0f) << 4));
    }
}

/* Row r's six-bit value for sub-block s in a 48-byte Q4_K_R8 scale region (layout in blocks.h): its low
 * nibble and its top two bits, written (put) or read. */
static int tram_k4r8_field(uint8_t *reg, int r, int s, int put, int v) {
    const int L = r / 4, k = 4 * (s % 4) + r % 4, b = s / 4, j = 16 * L + k, sh = 2 * L + 4 * b;
    if (put) {
        reg[j] = (uint8_t)((reg[j] & (b ? 0x0f : 0xf0)) | ((v & 15) << (4 * b)));
        reg[32 + k] = (uint8_t)((reg[32 + k] & ~(3 << sh)) | (((v >> 4) & 3) << sh));
    }
    return ((reg[j] >> (4 * b)) & 15) | (((reg[32 + k] >> sh) & 3) << 4);
}

/* Row r's Q4_K scale bytes (12, GGML's) to or from the group's two scale regions (96 bytes). */
static void k4r8_scales(uint8_t *plain, uint8_t *mixed, int r, int to_r8) {
    uint8_t sc[8], mn[8];
    if (to_r8) k4_scales(plain, sc, mn);
    for (int s = 0; s < 8; s++) {
        sc[s] = (uint8_t)tram_k4r8_field(mixed, r, s, to_r8, sc[s]);
        mn[s] = (uint8_t)tram_k4r8_field(mixed + 48, r, s, to_r8, mn[s]);
    }
    if (!to_r8) k4_pack(sc, mn, plain);
}

/* n bytes from a to b (to_r8) or from b to a. */
static void swap_copy(uint8_t *a, uint8_t *b, size_t n, int to_r8) { memcpy(to_r8 ? b : a, to_r8 ? a : b, n); }

/* Row r of a Q6_K group (nb super-blocks, blocks.h's layout) to or from its GGML layout at `row`. */
static void r8_row_q6_k(uint8_t *row, uint8_t *group, int r, long nb, int to_r8) {
    for (long i = 0; i < nb; i++) {
        uint8_t *plain = row + 210 * (size_t)i, *mixed = group + 8 * 210 * (size_t)i;
        swap_copy(plain + 208, mixed + 2 * r, 2, to_r8);  /* d */
        for (int s = 0; s < 16; s++)  /* int8 scales: vector s / 4, lane r / 4, byte 4 (s % 4) + r % 4 */
            swap_copy(plain + 192 + s, mixed + 16 + 32 * (s / 4) + 16 * (r / 4) + 4 * (s % 4) + r % 4, 1, to_r8);
        for (int c = 0; c < 48; c++)  /* ql's 32 words, then qh's 16 */
            swap_copy(plain + 4 * c, mixed + 144 + 32 * c + 4 * r, 4, to_r8);
    }
}

/* Row r's six-bit field of sub-block s in a 96-byte Q3_K_R8 scale region (layout in blocks.h): its low
 * nibble and its top two bits, written (put) or read. */
static int tram_q3r8_field(uint8_t *reg, int r, int s, int put, int v) {
    const int t = s / 4, j = 16 * (r / 4) + 4 * (s % 4) + r % 4, n = 4 * (t % 2), sh = 2 * t;
    uint8_t *lo = reg + 32 * (t / 2) + j, *hi = reg + 64 + j;
    if (put) {
        *lo = (uint8_t)((*lo & ~(15 << n)) | ((v & 15) << n));
        *hi = (uint8_t)((*hi & ~(3 << sh)) | (((v >> 4) & 3) << sh));
    }
    return ((*lo >> n) & 15) | (((*hi >> sh) & 3) << 4);
}

/* Row r of a Q3_K group (nb super-blocks, blocks.h's layout) to or from its GGML layout at `row`. */
static void r8_row_q3_k(uint8_t *row, uint8_t *group, int r, long nb, int to_r8) {
    for (long i = 0; i < nb; i++) {
        uint8_t *plain = row + 110 * (size_t)i, *mixed = group + 8 * 110 * (size_t)i;
        swap_copy(plain + 108, mixed + 2 * r, 2, to_r8);  /* d */
        if (!to_r8) memset(plain + 96, 0, 12);  /* the fields below are or-ed in */
        for (int s = 0; s < 16; s++) {
            const int v = tram_q3r8_field(mixed + 16, r, s, to_r8, to_r8 ? k3_field(plain + 96, s) : 0);
            if (!to_r8) k3_put_field(plain + 96, s, v);
        }
        for (int c = 0; c < 24; c++)  /* hmask's 8 words, then qs's 16 */
            swap_copy(plain + 4 * c, mixed + 112 + 32 * c + 4 * r, 4, to_r8);
    }
}

/* A Q5_0/Q5_1 block's 32 fifth bits (GGML's qh: bit j of element j) as the interleaved layout holds them
 * (blocks.h: bit c of byte k for element 4c + k, bit 4 + c for element 16 + 4c + k), or back. */
static uint32_t tram_fifth_word(uint32_t v, int to_r8) {
    uint32_t out = 0;
    for (int k = 0; k < 4; k++)
        for (int c = 0; c < 4; c++) {
            const int at[2] = {8 * k + c, 8 * k + 4 + c}, from[2] = {4 * c + k, 16 + 4 * c + k};
            for (int h = 0; h < 2; h++) {
                const int src = to_r8 ? from[h] : at[h], dst = to_r8 ? at[h] : from[h];
                out |= ((v >> src) & 1u) << dst;
            }
        }
    return out;
}

/* Row r of an interleaved group of nb blocks of GGML type `base` to or from its GGML layout at `row`. */
static void r8_row(uint8_t *row, uint8_t *group, int r, long nb, int base, int to_r8) {
    if (base == T_Q6_K || base == T_Q3_K) {
        (base == T_Q6_K ? r8_row_q6_k : r8_row_q3_k)(row, group, r, nb, to_r8);
        return;
    }
    const size_t ts = (size_t)tram_types[base].size;
    const size_t head = base == T_Q4_1 || base == T_Q4_K || base == T_Q5_1 ? 4 : 2;  /* d (and m) */
    const size_t scales = base == T_Q4_K ? 12 : base == T_Q5_0 || base == T_Q5_1 ? 4 : 0;  /* K's scales, qh */
    for (long i = 0; i < nb; i++) {
        uint8_t *plain = row + ts * (size_t)i, *mixed = group + 8 * ts * (size_t)i;
        for (size_t h = 0; h < head; h += 2) {  /* the 8 rows' scales, then their second fields */
            uint8_t *m = mixed + 8 * h + 2 * (size_t)r;
            memcpy(to_r8 ? m : plain + h, to_r8 ? plain + h : m, 2);
        }
        if (base == T_Q4_K) k4r8_scales(plain + head, mixed + 8 * head, r, to_r8);
        if (scales == 4) {  /* the fifth bits */
            uint8_t *m = mixed + 8 * head + 4 * (size_t)r, *q = plain + head;
            const uint32_t word = tram_fifth_word(rd32(to_r8 ? q : m), to_r8);
            memcpy(to_r8 ? m : q, &word, 4);  /* little-endian, as rd32 reads it */
        }
        for (size_t c = 0; c < (ts - head - scales) / 4; c++) {
            uint8_t *m = mixed + 8 * (head + scales) + 32 * c + 4 * (size_t)r, *q = plain + head + scales + 4 * c;
            memcpy(to_r8 ? m : q, to_r8 ? q : m, 4);
        }
    }
}

/* One group of 8 rows of nb blocks of GGML type `base` to the interleaved layout (to_r8 != 0) or back. */
static void interleave_group(const uint8_t *src, uint8_t *dst, long nb, int base, int to_r8) {
    const size_t rb = (size_t)tram_types[base].size * (size_t)nb;
    for (int r = 0; r < 8; r++) {
        if (to_r8)
            r8_row((uint8_t *)src + (size_t)r * rb, dst, r, nb, base, 1);  /* src is only read */
        else
            r8_row(dst + (size_t)r * rb, (uint8_t *)src, r, nb, base, 0);
    }
}

void tram_interleave_rows(const uint8_t *src, uint8_t *dst, long N, long K, int qtype, int to_r8) {
    const size_t group = 8 * tram_row_bytes(qtype, K);
    const long nb = K / tram_types[qtype].block;
    for (long g = 0; g < N / 8; g++) interleave_group(src + g * group, dst + g * group, nb, qtype, to_r8);
}

void tram_interleaved_row(const uint8_t *group, int r, long K, int qtype, uint8_t *row) {
    r8_row(row, (uint8_t *)group, r, K / tram_types[qtype].block, qtype, 0);
}

/* float -> bfloat16, round to nearest even, as torch's .to(torch.bfloat16) (a NaN stays a quiet NaN of
 * its sign and payload, whose bits torch's paths differ on). */
static uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* float -> IEEE half, round to nearest even (overflow to inf, subnormals kept), as torch's .to(float16). */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;  /* NaN */
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  /* from 65520 (half-way past 65504) on: inf */
    if (ax < 0x38800000u) {  /* below 2^-14: a subnormal half, man = round(|f| * 2^24) (exact scaling) */
        float a;
        memcpy(&a, &ax, 4);
        return sign | (uint16_t)rintf(a * 16777216.0f);  /* 1024 rounds up into the smallest normal */
    }
    uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13), rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;  /* a carry moves into the exponent */
    return sign | (uint16_t)h;
}

/* Blocks of 32: scale d = max |x| / 127 stored as half, q = x / d rounded half to even (GGML's Q8_0,
 * whose reference rounds half away from zero: ties are rare and either reads back the same way). */
static void enc_q8_0(const float *x, long n, uint8_t *out) {
    for (long b = 0; b < n; b += 32, x += 32, out += 34) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        const float d = amax / 127.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
        const float id = isfinite(inv) ? inv : 0.0f;  /* a block below ~4e-37: d is subnormal, 1/d inf */
        const uint16_t dh = f32_to_f16(d);
        memcpy(out, &dh, 2);
        for (int i = 0; i < 32; i++) {
            const float r = rintf(x[i] * id);
            out[2 + i] = (uint8_t)(int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
        }
    }
}

void tram_enc_row(int type, const float *x, long n, uint8_t *out) {
    switch (type) {
        case T_F16:
            for (long i = 0; i < n; i++) {
                const uint16_t h = f32_to_f16(x[i]);
                memcpy(out + 2 * i, &h, 2);
            }
            break;
        case T_BF16:
            for (long i = 0; i < n; i++) {
                const uint16_t h = f32_to_bf16(x[i]);
                memcpy(out + 2 * i, &h, 2);
            }
            break;
        case T_Q8_0: enc_q8_0(x, n, out); break;
        default: memcpy(out, x, sizeof(float) * (size_t)n); break;  /* T_F32 */
    }
}
