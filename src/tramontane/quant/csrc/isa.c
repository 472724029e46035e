/*
 * isa.c: run-time choice of the instruction set. At module init the best table this CPU runs is
 * picked with __builtin_cpu_supports (AVX-512 F/BW/VL/DQ + VNNI, else AVX2 + FMA, else the portable C),
 * and whether that pass may use AMX tiles (tram_amx) and bfloat16 ones (tram_amx_bf16);
 * tests may switch to any table the CPU can run (set_isa) and back.
 */
#include <string.h>

#include "kernels.h"

#if defined(TRAM_X86) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

static const isa_ops *g_ops = NULL;   /* in use */
static const isa_ops *g_best = NULL;  /* the best this CPU runs */
int tram_amx_granted = 0;
static int g_amx_bf16 = 0;

/* AMX-INT8 and AMX-TILE (CPUID leaf 7: EDX bits 25 and 24), then Linux's permission for the tiles'
 * 8 KB of state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, feature 18): without it the first tile
 * instruction faults. */
static int amx_granted(void) {
#if defined(TRAM_X86) && defined(__linux__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & (3u << 24)) != (3u << 24)) return 0;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

/* AMX-BF16 (CPUID leaf 7: EDX bit 22), on top of amx_granted's tiles. */
static int amx_bf16(void) {
#if defined(TRAM_X86) && defined(__linux__)
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1u);
#else
    return 0;
#endif
}

int tram_amx_bf16(void) { return g_amx_bf16; }

void tram_isa_init(void) {
    g_best = &tram_ops_scalar;
#ifdef TRAM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) g_best = &tram_ops_avx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        g_best = &tram_ops_avx512;
    tram_amx_granted = g_best == &tram_ops_avx512 && amx_granted();
    g_amx_bf16 = tram_amx_granted && amx_bf16();
#endif
    g_ops = g_best;
}

const isa_ops *tram_isa_current(void) { return g_ops; }

int tram_isa_names(const char *names[3]) {
    int n = 0;
#ifdef TRAM_X86
    if (g_best == &tram_ops_avx512) names[n++] = tram_ops_avx512.name;
    if (g_best == &tram_ops_avx512 || g_best == &tram_ops_avx2) names[n++] = tram_ops_avx2.name;
#endif
    names[n++] = tram_ops_scalar.name;
    return n;
}

int tram_isa_select(const char *name) {
    const isa_ops *want = NULL;
    if (!strcmp(name, "scalar")) want = &tram_ops_scalar;
#ifdef TRAM_X86
    if (!strcmp(name, "avx2") && (g_best == &tram_ops_avx2 || g_best == &tram_ops_avx512)) want = &tram_ops_avx2;
    if (!strcmp(name, "avx512") && g_best == &tram_ops_avx512) want = &tram_ops_avx512;
#endif
    if (!strcmp(name, "best")) want = g_best;
    if (!want) return -1;
    g_ops = want;
    return 0;
}
