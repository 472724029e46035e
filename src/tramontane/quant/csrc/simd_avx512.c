/*
 * simd_avx512.c: the AVX-512 (F/BW/VL/DQ with VNNI) pass of the vector kernels (16 float lanes, the
 * integer dot products through vpdpbusd / vpdpwssd: TRAM_VNNI, simd_q8.inc; AMX tiles for the legacy
 * types' many rows where the CPU has them: simd_amx.inc), `tram_ops_avx512`.
 * simd.inc compiled with per-function target attributes: the module needs no -march flag, and isa.c
 * uses this table only where the CPU reports all five extensions (an AVX-512 CPU without VNNI, Skylake
 * or older, gets the AVX2 pass). Empty on other architectures.
 */
#include "kernels.h"

#ifdef TRAM_X86
#define VL 16
#define SFX(n) n##_avx512
#define TRAM_VNNI 1
#if defined(__clang__) || __GNUC__ >= 11  /* compilers that know AMX: tile kernels, used where isa.c */
#define TRAM_AMX 1                         /* found them granted (tram_amx, simd_amx.inc) */
#define KTARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8"
#else
#define KTARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"
#endif
#define TRAM_OPS tram_ops_avx512
#define TRAM_OPS_NAME "avx512"
#include "simd.inc"
#else
typedef int tram_no_avx512;  /* an empty translation unit is not ISO C */
#endif
