/* What the C kernels share: bfloat16 <-> float32 conversions (bf16 values travel as uint16_t). */
#ifndef LORASERVE_COMMON_H
#define LORASERVE_COMMON_H

#include <stdint.h>

/* Bit casts through memcpy rather than a union: GCC vectorises loops over these for AVX2 only that way. */
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch does; a NaN stays NaN. Written as a select, not an early return: loops that
 * call it stay vectorisable where the compiler has no masked stores (AVX2). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

#endif
