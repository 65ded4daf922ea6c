/* What the C kernels share: bfloat16 <-> float32 conversions (bf16 values travel as uint16_t), one at a time and,
 * with AVX2, eight at a time. */
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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* 8 bf16 values widened to float32. */
static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Eight float32 -> bf16 bit patterns in the low halves of int32 lanes: round to nearest even, a NaN stays NaN
 * (f32_to_bf16, eight at a time). */
static inline __m256i bf16_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                              _mm256_set1_epi32(0x7f800000));
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(rounded, nan, is_nan);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
/* The float32 sums acc[t][r] of a tiled kernel whose lanes are its outputs, rounded to bf16 (nearest even) into
 * rows r0 .. r0 + MB - 1 of y [., n], columns col0 + 16 t .. + 15 for t < TN; columns from n on are not written
 * (a last tile's padding rows), tiles from n on not at all. */
static inline __attribute__((always_inline)) void store_tiles_bf16(uint16_t *y, int64_t n, int64_t col0, int64_t r0,
                                                                   __m512 acc[4][8], const int TN, const int MB) {
    for (int t = 0; t < TN; t++) {
        const int64_t c0 = col0 + 16 * t;
        if (c0 >= n) break;
        const __mmask16 keep = n - c0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c0)) - 1);
        for (int r = 0; r < MB; r++)
            _mm256_mask_storeu_epi16(y + (r0 + r) * n + c0, keep, (__m256i)_mm512_cvtneps_pbh(acc[t][r]));
    }
}
#endif

#endif
