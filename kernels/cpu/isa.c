/* The one choice of instruction-set variants, best first, by what the CPU reports: module.c uses
 * it at import, and the arm64 test driver (tests/native/arm_driver.c) under qemu. */
#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP /* older kernel headers */
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#include "cpu.h"

int detect_isas(const isa_ops *out[MAX_ISAS]) {
    int n = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        out[n++] = &isa_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        out[n++] = &isa_avx2;
#elif defined(__aarch64__)
#if defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) out[n++] = &isa_neon_dotprod;
#endif
    out[n++] = &isa_neon; /* Advanced SIMD is part of every arm64 CPU */
#endif
    out[n++] = &isa_generic;
    return n;
}
