/* arm64 variants: NEON (every armv8-a CPU) and NEON + dotprod (armv8.2-a and later: Cortex-A55/A76,
 * Jetson Orin, Apple, Graviton 2+), from one source (arm_impl.h). */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <string.h>

#include "cpu.h"

/* A block's float16 scale: one fcvt on arm64. */
static inline float h2f(uint16_t h) {
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

/* armv8-a has no int8 dot instruction: widen to int16 products, then add pairs into int32 lanes. */
static inline int32x4_t neon_dot_s8(int32x4_t acc, int8x16_t a, int8x16_t b) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
}

#define ISA "arch=armv8-a"
#define NAME(x) neon_##x
#define DOT_S8(acc, a, b) neon_dot_s8((acc), (a), (b))
#include "arm_impl.h"
#undef ISA
#undef NAME
#undef DOT_S8

#define ISA "arch=armv8.2-a+dotprod"
#define NAME(x) neondp_##x
#define DOT_S8(acc, a, b) vdotq_s32((acc), (a), (b))
#include "arm_impl.h"
#undef ISA
#undef NAME
#undef DOT_S8

#define OPS(p)                                                                                               \
    {[T_F32] = p##dot_f32, [T_F16] = p##dot_f16, [T_Q4_0] = p##dot_q4_0, [T_Q4_1] = p##dot_q4_1,             \
     [T_Q8_0] = p##dot_q8_0, [T_Q4_K] = p##dot_q4_K, [T_Q6_K] = p##dot_q6_K}

const isa_ops isa_neon = {.name = "neon", .dot = OPS(neon_)};
const isa_ops isa_neon_dotprod = {.name = "neon-dotprod", .dot = OPS(neondp_)};
#endif
