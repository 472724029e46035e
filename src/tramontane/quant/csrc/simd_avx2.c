/*
 * simd_avx2.c: the AVX2 + FMA + F16C pass of the vector kernels (8 float lanes), `tram_ops_avx2`.
 * simd.inc compiled with per-function target attributes: the module needs no -march flag, and isa.c
 * uses this table only where the CPU reports AVX2 and FMA. Empty on other architectures.
 */
#include "kernels.h"

#ifdef TRAM_X86
#define VL 8
#define SFX(n) n##_avx2
#define KTARGET "avx2,fma,f16c"
#define TRAM_OPS tram_ops_avx2
#define TRAM_OPS_NAME "avx2"
#include "simd.inc"
#else
typedef int tram_no_avx2;  /* an empty translation unit is not ISO C */
#endif
