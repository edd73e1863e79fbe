/* x86-64 variants: AVX2 (+FMA, F16C) and AVX-512 VNNI, from one source (x86_impl.h). */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>

#include "cpu.h"

#define ISA "avx2,fma,f16c"
#define NAME(x) avx2_##x
#define DOT_U8S8(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1))
#include "x86_impl.h"
#undef ISA
#undef NAME
#undef DOT_U8S8

#define ISA "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
#define NAME(x) avx512_##x
#define DOT_U8S8(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#include "x86_impl.h"
#undef ISA
#undef NAME
#undef DOT_U8S8

#define OPS(p)                                                                                               \
    {[T_F32] = p##dot_f32, [T_F16] = p##dot_f16, [T_Q4_0] = p##dot_q4_0, [T_Q4_1] = p##dot_q4_1,             \
     [T_Q8_0] = p##dot_q8_0, [T_Q4_K] = p##dot_q4_K, [T_Q6_K] = p##dot_q6_K}

#define OPS4(p)                                                                                              \
    {[T_Q4_0] = p##dot4_q4_0, [T_Q4_1] = p##dot4_q4_1, [T_Q8_0] = p##dot4_q8_0, [T_Q4_K] = p##dot4_q4_K,             \
     [T_Q6_K] = p##dot4_q6_K}

const isa_ops isa_avx2 = {.name = "avx2", .dot = OPS(avx2_), .dot4 = OPS4(avx2_), .attend = avx2_attend,
                           .quantize = avx2_quantize};
const isa_ops isa_avx512 = {.name = "avx512vnni", .dot = OPS(avx512_), .dot4 = OPS4(avx512_), .attend = avx512_attend,
                             .quantize = avx512_quantize};
#endif
