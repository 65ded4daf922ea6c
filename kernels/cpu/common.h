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

/* Work split with stealing. A product's units (panel groups, row blocks) are cut into one contiguous range per
 * thread, as a static schedule would; a thread takes its own range from the front (so it can prefetch what comes
 * next), and once that is empty takes units one at a time from the back of another thread's range. A thread the
 * OS preempts (the server's RPC threads, a co-located process: on a 2-core machine every one of them takes a core
 * from the team) then holds up the others for at most the unit it is in, instead of its whole share: with a
 * static split the team waits at the region's end for all of it. Each range is one 64-bit word (next in the low
 * half, end in the high half), changed by compare-and-swap, on its own cache line. */
#define STEAL_MAX_THREADS 64

typedef struct {
    _Alignas(64) uint64_t word;
} steal_range;

/* Ranges for `parts` threads over [0, units) (units < 2^32: a range's bounds are 32-bit halves), the static
 * schedule's cut. Call before the parallel region; a thread of the team that does not run (a smaller team) leaves
 * its range to be stolen. */
static inline int steal_init(steal_range *r, int parts, int64_t units) {
    if (parts > STEAL_MAX_THREADS) parts = STEAL_MAX_THREADS;
    for (int t = 0; t < parts; t++) {
        const uint64_t lo = (uint64_t)(units * t / parts), hi = (uint64_t)(units * (t + 1) / parts);
        r[t].word = lo | (hi << 32);
    }
    return parts;
}

/* The next unit of thread `id`: its own front first, then the back of the others' ranges; -1 when none is left.
 * *own_end (when not NULL) is the end of its own range when the unit is its own (what it may prefetch up to),
 * else the unit's own end. */
static inline int64_t steal_next(steal_range *r, int parts, int id, int64_t *own_end) {
    if (id < parts) {
        uint64_t v = __atomic_load_n(&r[id].word, __ATOMIC_RELAXED);
        while ((uint32_t)v < (uint32_t)(v >> 32)) {
            if (__atomic_compare_exchange_n(&r[id].word, &v, v + 1, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
                if (own_end) *own_end = (int64_t)(v >> 32);
                return (int64_t)(uint32_t)v;
            }
        }
    }
    for (int d = 1; d <= parts; d++) {
        const int t = (id + d) % parts;
        if (t == id) continue;
        uint64_t v = __atomic_load_n(&r[t].word, __ATOMIC_RELAXED);
        while ((uint32_t)v < (uint32_t)(v >> 32)) {
            const uint64_t end = (v >> 32) - 1;
            if (__atomic_compare_exchange_n(&r[t].word, &v, (v & 0xffffffffu) | (end << 32), 1, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED)) {
                if (own_end) *own_end = (int64_t)end + 1;
                return (int64_t)end;
            }
        }
    }
    return -1;
}

/* Memory a product prefetches beside its own weights, for kernels that run after it: `rows` runs of `bytes`
 * bytes, `stride` bytes apart, from `base` (one run: rows 1). The dense bf16 product at decode batch sizes is
 * bound by its instructions, not by memory, so lines it asks for meanwhile arrive without slowing it; the kernels
 * bound by memory after it (a step's LoRA, megabytes of adapter weights for a few rows each; the next layer's
 * attention over its K/V blocks) then find them in cache. */
typedef struct {
    const char *base;
    int64_t rows, stride, bytes;
} pf_region;

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
