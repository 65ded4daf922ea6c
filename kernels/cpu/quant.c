/* int8 matrix product for small batches on CPUs with AVX2 (and FMA): y = x @ W^T for bf16 x [M, K]
 * (M <= QMAX_M) and an int8 weight quantized by groups of 32 along K (GGUF Q8_0: codes q in -127..127, int8
 * [N, K]; w = q * scale, scales float32 [N, K/32]), bf16 y [M, N].
 *
 * Where the CPU has no bf16 dot-product instructions torch's int8 paths for bf16 activations stream the weight
 * at a few GB/s (the default model's 49152x576 LM head: 4.7 ms a token at M = 1 on a 2-core AVX2 machine,
 * 1.5 ms here). This kernel uses integer dot products instead, the Q8_0 x Q8_0 scheme of llama.cpp's CPU
 * backend: each row of x is quantized once per call to int8 by groups of 32 (scale = the group's max |x| /
 * 127); each group's product is an exact integer dot product (_mm256_maddubs_epi16 takes one unsigned
 * operand: |qx| and q with qx's sign, |pair sums| <= 2 * 127 * 127, no saturation; a code of -128 would overflow
 * the sign flip, so the caller keeps such weights off this kernel), then _mm256_madd_epi16 into int32, scaled
 * and summed in float32. On CPUs with AVX512-VNNI the kernel of decode.c (q8_gemv_bf16) is used instead.
 *
 * Threads split the rows of W (each reads its rows once for every row of x). Returns 0, or -1 when a dimension
 * is outside the bounds (the caller then takes torch's path). Without AVX2 and FMA it returns -1. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define QMAX_M 16
#define QMAX_K 16384
#define QGROUP 32

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAS_AVX2 1
#else
#define HAS_AVX2 0
#endif

int quant_avx2_available(void) { return HAS_AVX2; }

#if HAS_AVX2
/* One row of x: int8 codes by groups of 32 and their scales sx[g]. */
static void quantize_x(const uint16_t *x, int64_t k, int8_t *q, float *sx) {
    for (int64_t g = 0; g < k / QGROUP; g++) {
        float v[QGROUP], amax = 0.0f;
        for (int j = 0; j < QGROUP; j++) {
            v[j] = bf16_to_f32(x[g * QGROUP + j]);
            const float a = v[j] < 0 ? -v[j] : v[j];
            amax = a > amax ? a : amax;
        }
        const float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        for (int j = 0; j < QGROUP; j++) q[g * QGROUP + j] = (int8_t)__builtin_lrintf(v[j] * inv);
        sx[g] = s;
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows r0 .. r0 + NB - 1 of x against one weight row: NB <= 8 accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_block(
    const int8_t *w, const float *scale, const int8_t *qx, const float *sx, int64_t groups, int64_t k, int64_t r0,
    const int NB, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[8];
    for (int r = 0; r < NB; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(w + g * QGROUP));
        const float d = scale[g];
        for (int r = 0; r < NB; r++) {
            const __m256i xq = _mm256_loadu_si256((const __m256i *)(qx + (r0 + r) * k + g * QGROUP));
            const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xq, xq), _mm256_sign_epi8(c, xq));
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * sx[(r0 + r) * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < NB; r++) out[r] = hsum8(acc[r]);
}

static inline __attribute__((always_inline)) void rows_of_x(
    const int8_t *w, const float *scale, const int8_t *qx, const float *sx, int64_t groups, int64_t k, int64_t m,
    float *out) {
    int64_t r0 = 0;
    for (; r0 + 8 <= m; r0 += 8) row_block(w, scale, qx, sx, groups, k, r0, 8, out + r0);
    switch (m - r0) {
    case 1: row_block(w, scale, qx, sx, groups, k, r0, 1, out + r0); break;
    case 2: row_block(w, scale, qx, sx, groups, k, r0, 2, out + r0); break;
    case 3: row_block(w, scale, qx, sx, groups, k, r0, 3, out + r0); break;
    case 4: row_block(w, scale, qx, sx, groups, k, r0, 4, out + r0); break;
    case 5: row_block(w, scale, qx, sx, groups, k, r0, 5, out + r0); break;
    case 6: row_block(w, scale, qx, sx, groups, k, r0, 6, out + r0); break;
    case 7: row_block(w, scale, qx, sx, groups, k, r0, 7, out + r0); break;
    default: break;
    }
}

static int gemm(const uint16_t *x, const int8_t *codes, const float *scales, uint16_t *y, int64_t m, int64_t n,
                int64_t k, int num_threads) {
    if (m < 1 || m > QMAX_M || n < 1 || k < QGROUP || k % QGROUP || k > QMAX_K || num_threads < 1) return -1;
    const int64_t groups = k / QGROUP;
    int8_t *qx = malloc((size_t)(m * k));
    float *sx = malloc(sizeof(float) * (size_t)(m * groups));
    if (qx == NULL || sx == NULL) {
        free(qx);
        free(sx);
        return -1;
    }
    for (int64_t r = 0; r < m; r++) quantize_x(x + r * k, k, qx + r * k, sx + r * groups);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n * k >= 65536)
    for (int64_t row = 0; row < n; row++) {
        float out[QMAX_M];
        rows_of_x(codes + row * k, scales + row * groups, qx, sx, groups, k, m, out);
        for (int64_t r = 0; r < m; r++) y[r * n + row] = f32_to_bf16(out[r]);
    }
    free(qx);
    free(sx);
    return 0;
}
#endif

int q8_gemm_bf16(const uint16_t *x, const int8_t *codes, const float *scales, uint16_t *y, int64_t m, int64_t n,
                 int64_t k, int num_threads) {
#if HAS_AVX2
    return gemm(x, codes, scales, y, m, n, k, num_threads);
#else
    (void)x; (void)codes; (void)scales; (void)y; (void)m; (void)n; (void)k; (void)num_threads;
    return -1;
#endif
}

/* int4 matrix product for small batches on CPUs with AVX2 (and FMA): y = x @ W^T for bf16 x [M, K] (M <=
 * Q4_MAX_M) and an int4 weight with groups of 32 along K in the canonical packing (uint8 [N, K/2], element 2j
 * in the low nibble of byte j, 2j + 1 in the high one; w = code * scale + zero, float32 scales and zeros
 * [N, K/32]), bf16 y [M, N].
 *
 * x is quantized per row and group of 32 to int16 with a power-of-two scale d = 2^(e - 15), 2^e the power of two
 * above the group's max |x|: x / d is exact for every bf16 element within a factor 128 of the group's largest
 * (its 8 significant bits fit in 15), the rest are rounded by at most d / 2 <= max|x| / 2^15, and scale * d is
 * exact. A group's 16 code bytes are read as eight 16-bit lanes, lane i holding
 * the codes of elements 4i .. 4i + 3 in its four nibbles, broadcast to both halves of a 256-bit register: masking
 * the low half with 0x000F and the high half with 0x00F0 gives elements 4i and 16 * (4i + 1), the same after a
 * shift by 8 elements 4i + 2 and 16 * (4i + 3), with no shuffle. x is stored in that order (its elements 4i,
 * then 4i + 1, then 4i + 2, then 4i + 3), so that two _mm256_madd_epi16 give the group's integer dot product,
 * exact (|sums| <= 4 * 240 * 32767 per lane), the high half 16 times too large: each group's float32 scale
 * vector (d, and d / 16 in the high half) takes the 16 back out. The zeros add sum_g zero[n, g] * (the exact
 * float32 sum of x's group). A group's codes are read once for every row of x.
 *
 * Threads split the rows of W. Returns 0, or -1 when a dimension is outside the bounds (the caller then takes
 * another path). Without AVX2 and FMA it returns -1. */
#define Q4_MAX_M 16
#ifndef Q4_PREFETCH
#define Q4_PREFETCH 2
#endif

/* Whether the kernel takes these dimensions on this CPU. */
int q4_gemm_fits(int64_t m, int64_t n, int64_t k) {
    return HAS_AVX2 && m >= 1 && m <= Q4_MAX_M && n >= 1 && k >= QGROUP && k % QGROUP == 0 && k <= QMAX_K;
}

#if HAS_AVX2
/* One row of x: int16 codes by groups of 32 in the kernel's order, each group's scale vector dv[8 g .. 8 g + 7]
 * (d four times, d / 16 four times) and its float32 sum s[g]. */
static void quantize_x16(const uint16_t *x, int64_t k, int16_t *q, float *dv, float *s) {
    for (int64_t g = 0; g < k / QGROUP; g++) {
        float v[QGROUP], amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < QGROUP; j++) {
            v[j] = bf16_to_f32(x[g * QGROUP + j]);
            const float a = v[j] < 0 ? -v[j] : v[j];
            amax = a > amax ? a : amax;
            sum += v[j];
        }
        int e = 0;
        frexpf(amax, &e); /* amax < 2^e, and a bf16 amax <= (1 - 2^-8) 2^e: at most 32640 d */
        const float d = amax > 0.0f ? ldexpf(1.0f, e - 15) : 0.0f, inv = amax > 0.0f ? ldexpf(1.0f, 15 - e) : 0.0f;
        for (int j = 0; j < QGROUP; j++) /* element 4i + c goes to 8c + i */
            q[g * QGROUP + 8 * (j % 4) + j / 4] = (int16_t)__builtin_lrintf(v[j] * inv);
        for (int j = 0; j < 8; j++) dv[8 * g + j] = j < 4 ? d : d / 16.0f;
        s[g] = sum;
    }
}

/* Weight rows n0 .. n0 + RB - 1 against rows r0 .. r0 + MB - 1 of x: RB * MB <= 8 accumulators in registers. */
static inline __attribute__((always_inline)) void q4_tile(
    const uint8_t *codes, const float *scales, const float *zeros, const int16_t *qx, const float *dx,
    const float *sx, int64_t groups, int64_t n, int64_t n0, int64_t r0, const int RB, const int MB, uint16_t *y) {
    const int64_t k = groups * QGROUP;
    const __m256i mask = _mm256_setr_epi16(0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0xF0, 0xF0, 0xF0, 0xF0,
                                           0xF0, 0xF0, 0xF0, 0xF0);
    __m256 acc[4][4];
    for (int b = 0; b < RB; b++)
        for (int r = 0; r < MB; r++) acc[b][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        for (int b = 0; b < RB; b++) {
            const __m256i v =
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(codes + (n0 + b) * (k / 2) + g * 16)));
            const __m256i c01 = _mm256_and_si256(v, mask), c23 = _mm256_and_si256(_mm256_srli_epi16(v, 8), mask);
            const __m256 sc = _mm256_broadcast_ss(scales + (n0 + b) * groups + g);
            for (int r = 0; r < MB; r++) {
                const int16_t *xq = qx + (r0 + r) * k + g * QGROUP;
                const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(c01, _mm256_load_si256((const __m256i *)xq)),
                                                   _mm256_madd_epi16(c23, _mm256_load_si256((const __m256i *)(xq + 16))));
                const __m256 d = _mm256_load_ps(dx + ((r0 + r) * groups + g) * 8);
                acc[b][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sc, d), acc[b][r]);
            }
        }
    }
    for (int b = 0; b < RB; b++) {
        const float *z = zeros + (n0 + b) * groups;
        for (int r = 0; r < MB; r++) {
            const float *s = sx + (r0 + r) * groups;
            __m256 t = acc[b][r];
            int64_t g = 0;
            for (; g + 8 <= groups; g += 8) t = _mm256_fmadd_ps(_mm256_loadu_ps(z + g), _mm256_loadu_ps(s + g), t);
            float base = 0.0f;
            for (; g < groups; g++) base += z[g] * s[g];
            y[(r0 + r) * n + n0 + b] = f32_to_bf16(hsum8(t) + base);
        }
    }
}

/* The decode case, one row of x: q4_tile's loop for four weight rows with the accumulators in named registers
 * (GCC kept q4_tile's array of them on the stack here, a store and a reload on every group's chain). */
static inline void q4_four_rows(const uint8_t *codes, const float *scales, const float *zeros, const int16_t *qx,
                                const float *dx, const float *sx, int64_t groups, int64_t n0, uint16_t *y) {
    const int64_t half = groups * (QGROUP / 2);
    const __m256i mask = _mm256_setr_epi16(0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0xF0, 0xF0, 0xF0, 0xF0,
                                           0xF0, 0xF0, 0xF0, 0xF0);
    const uint8_t *c0 = codes + n0 * half, *c1 = c0 + half, *c2 = c1 + half, *c3 = c2 + half;
    const float *s0 = scales + n0 * groups, *s1 = s0 + groups, *s2 = s1 + groups, *s3 = s2 + groups;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define Q4_ROW(c, s, a)                                                                                              \
    do {                                                                                                           \
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)((c) + g * 16)));          \
        const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(v, mask), x01),                     \
                                           _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 8), mask), x23)); \
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(_mm256_broadcast_ss((s) + g), d), a);            \
    } while (0)
    /* The hardware prefetcher falls behind on these streams (the loads stall): fetch the codes, scales and zeros
     * of the same rows Q4_PREFETCH tiles on, a cache line of each every four groups (a tile's scales and its zeros
     * take as many bytes as one of its rows of codes). Prefetches past the end of an array do not fault. */
    const int64_t ahead = Q4_PREFETCH * 4 * half;
    const char *sn = (const char *)(scales + (n0 + Q4_PREFETCH * 4) * groups);
    const char *zn = (const char *)(zeros + (n0 + Q4_PREFETCH * 4) * groups);
    for (int64_t g = 0; g < groups; g++) {
        if ((g & 3) == 0) {
            _mm_prefetch((const char *)(c0 + ahead + g * 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(c1 + ahead + g * 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(c2 + ahead + g * 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(c3 + ahead + g * 16), _MM_HINT_T0);
            _mm_prefetch(sn + g * 16, _MM_HINT_T0);
            _mm_prefetch(zn + g * 16, _MM_HINT_T0);
        }
        const __m256i x01 = _mm256_load_si256((const __m256i *)(qx + g * QGROUP));
        const __m256i x23 = _mm256_load_si256((const __m256i *)(qx + g * QGROUP + 16));
        const __m256 d = _mm256_load_ps(dx + g * 8);
        Q4_ROW(c0, s0, a0);
        Q4_ROW(c1, s1, a1);
        Q4_ROW(c2, s2, a2);
        Q4_ROW(c3, s3, a3);
    }
#undef Q4_ROW
    const __m256 acc[4] = {a0, a1, a2, a3};
    for (int b = 0; b < 4; b++) {
        const float *z = zeros + (n0 + b) * groups;
        __m256 t = acc[b];
        int64_t g = 0;
        for (; g + 8 <= groups; g += 8) t = _mm256_fmadd_ps(_mm256_loadu_ps(z + g), _mm256_loadu_ps(sx + g), t);
        float base = 0.0f;
        for (; g < groups; g++) base += z[g] * sx[g];
        y[n0 + b] = f32_to_bf16(hsum8(t) + base);
    }
}

/* RB weight rows against every row of x, in tiles of at most 8 accumulators. */
static inline __attribute__((always_inline)) void q4_rows(
    const uint8_t *codes, const float *scales, const float *zeros, const int16_t *qx, const float *dx,
    const float *sx, int64_t groups, int64_t n, int64_t n0, int64_t m, const int RB, uint16_t *y) {
    const int MB = 8 / RB > 4 ? 4 : 8 / RB;
    int64_t r0 = 0;
    for (; r0 + MB <= m; r0 += MB) q4_tile(codes, scales, zeros, qx, dx, sx, groups, n, n0, r0, RB, MB, y);
    switch (m - r0) {
    case 1: q4_tile(codes, scales, zeros, qx, dx, sx, groups, n, n0, r0, RB, 1, y); break;
    case 2: q4_tile(codes, scales, zeros, qx, dx, sx, groups, n, n0, r0, RB, 2, y); break;
    case 3: q4_tile(codes, scales, zeros, qx, dx, sx, groups, n, n0, r0, RB, 3, y); break;
    default: break;
    }
}

static int q4_gemm(const uint16_t *x, const uint8_t *codes, const float *scales, const float *zeros, uint16_t *y,
                   int64_t m, int64_t n, int64_t k, int num_threads) {
    if (!q4_gemm_fits(m, n, k) || num_threads < 1) return -1;
    const int64_t groups = k / QGROUP;
    int16_t *qx = aligned_alloc(64, (size_t)(m * k) * sizeof(int16_t));
    float *dx = aligned_alloc(64, sizeof(float) * (size_t)(9 * m * groups + 16));
    if (qx == NULL || dx == NULL) {
        free(qx);
        free(dx);
        return -1;
    }
    float *sx = dx + 8 * m * groups;
    for (int64_t r = 0; r < m; r++) quantize_x16(x + r * k, k, qx + r * k, dx + 8 * r * groups, sx + r * groups);
    /* Four weight rows a pass at one or two rows of x (more independent chains, each code group loaded once), two
     * at three or four, one above. */
    const int64_t rb = m <= 2 ? 4 : m <= 4 ? 2 : 1;
    const int64_t blocks = (n + rb - 1) / rb;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n * k >= 65536)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * rb;
        if (n0 + rb <= n && rb == 4 && m == 1)
            q4_four_rows(codes, scales, zeros, qx, dx, sx, groups, n0, y);
        else if (n0 + rb <= n && rb == 4)
            q4_rows(codes, scales, zeros, qx, dx, sx, groups, n, n0, m, 4, y);
        else if (n0 + rb <= n && rb == 2)
            q4_rows(codes, scales, zeros, qx, dx, sx, groups, n, n0, m, 2, y);
        else
            for (int64_t row = n0; row < n && row < n0 + rb; row++)
                q4_rows(codes, scales, zeros, qx, dx, sx, groups, n, row, m, 1, y);
    }
    free(qx);
    free(dx);
    return 0;
}
#endif

int q4_gemm_bf16(const uint16_t *x, const uint8_t *codes, const float *scales, const float *zeros, uint16_t *y,
                 int64_t m, int64_t n, int64_t k, int num_threads) {
#if HAS_AVX2
    return q4_gemm(x, codes, scales, zeros, y, m, n, k, num_threads);
#else
    (void)x; (void)codes; (void)scales; (void)zeros; (void)y; (void)m; (void)n; (void)k; (void)num_threads;
    return -1;
#endif
}

/* int4 matrix product on CPUs with AVX512-BF16: y = x @ W^T for bf16 x [M, K] (M <= Q4B_MAX_M) and an int4 weight
 * with groups of 32 along K, in the tiled layout `q4b_pack` of kernels/native.py builds once per weight:
 *
 * - codes: tiles of 16 weight rows; per tile and group of 32 k, four 64-byte chunks of 8 k each. In a chunk, the
 *   16-bit word w (0..31) holds in its nibble j (0..3) the code of weight row 16 t + w / 2 at k = 32 g + 8 c + 2 j +
 *   w % 2. Shifted into bits 3..6 of a word and or-ed with 0x4180 (the bf16 of 16), nibble j of every word is a
 *   bf16 16 + code, exactly: one shift and one bit-select per 32 weights, and the 32 words are the pairs (k, k + 1)
 *   of 16 rows that vdpbf16ps multiplies by the pair of x broadcast to every lane. The lanes are the outputs: no
 *   horizontal sums, and each dequantized register serves every row of x.
 * - dm: per tile and group, 16 float32 scales d, then 16 float32 m - 16 d (m: the zero): w = d * code + m =
 *   d * (16 + code) + (m - 16 d), so y[r, n] = sum_g d[n, g] * S[r, n, g] + (m - 16 d)[n, g] * X[r, g], S the
 *   group's pair-dot sums of x with 16 + code, X the float32 sum of x's group. Rows past N (the last tile) have
 *   zero codes' scales and are never stored. With `half`, dm holds 16 fp16 scales then 16 fp16 zeros per tile and
 *   group (where both are exact in fp16, as GGUF stores them: a quarter of the weight's bytes instead of a third)
 *   and m - 16 d is formed in float32 in the kernel.
 *
 * Products are exact in float32 (8 significant bits times 5); sums are float32, y rounded once to bf16. Threads
 * split the tiles; a tile's codes stay in cache while every block of rows of x passes over them. Returns 0, or -1
 * when a dimension is outside the bounds or the CPU has no AVX512-BF16. */
#define Q4B_MAX_M 64

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define HAS_Q4B 1
#else
#define HAS_Q4B 0
#endif

int q4b_available(void) { return HAS_Q4B; }

int q4b_gemm_fits(int64_t m, int64_t n, int64_t k) {
    return HAS_Q4B && m >= 1 && m <= Q4B_MAX_M && n >= 1 && k >= QGROUP && k % QGROUP == 0 && k <= QMAX_K;
}

#if HAS_Q4B
static inline __m512bh q4b_bcast(const uint16_t *x) {
    int32_t pair;
    __builtin_memcpy(&pair, x, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(pair);
}

/* The next TN tiles' codes and scales for group g, fetched ahead (the hardware prefetcher alone falls behind). */
static inline __attribute__((always_inline)) void q4b_prefetch(const uint8_t *codes, const void *dm, int64_t groups,
                                                               int64_t g, const int TN, const int HALF) {
    const int64_t tstride = groups * 256;
    for (int t = 0; t < TN; t++) {
        const char *nc = (const char *)(codes + (TN + t) * tstride + g * 256);
        const char *nd = HALF ? (const char *)((const uint16_t *)dm + (TN + t) * groups * 32 + g * 32)
                              : (const char *)((const float *)dm + (TN + t) * groups * 32 + g * 32);
        _mm_prefetch(nc, _MM_HINT_T0);
        _mm_prefetch(nc + 64, _MM_HINT_T0);
        _mm_prefetch(nc + 128, _MM_HINT_T0);
        _mm_prefetch(nc + 192, _MM_HINT_T0);
        _mm_prefetch(nd, _MM_HINT_T0);
        if (!HALF) _mm_prefetch(nd + 64, _MM_HINT_T0);
    }
}

/* Tile t's 16 scales d and zero - 16 d of group g (fp16 layout: zero - 16 d formed here in float32). */
static inline __attribute__((always_inline)) void q4b_scales(const void *dm, int64_t groups, int t, int64_t g,
                                                             const int HALF, __m512 *d, __m512 *mz) {
    if (HALF) {
        const uint16_t *h = (const uint16_t *)dm + t * groups * 32 + g * 32;
        *d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
        const __m512 zero = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 16)));
        *mz = _mm512_fmadd_ps(*d, _mm512_set1_ps(-16.0f), zero);
    } else {
        const float *f = (const float *)dm + t * groups * 32 + g * 32;
        *d = _mm512_loadu_ps(f);
        *mz = _mm512_loadu_ps(f + 16);
    }
}

/* A 64-byte chunk of codes as its four vectors of bf16 16 + code pairs: (v << s & 0x78) | 0x4180. */
static inline __attribute__((always_inline)) void q4b_expand(__m512i w, __m512bh a[4]) {
    const __m512i lowbits = _mm512_set1_epi16(0x78), magic = _mm512_set1_epi16(0x4180);
    a[0] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi16(w, 3), lowbits, magic, 0xEA);
    a[1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 1), lowbits, magic, 0xEA);
    a[2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 5), lowbits, magic, 0xEA);
    a[3] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 9), lowbits, magic, 0xEA);
}

/* TN tiles (16 TN weight rows from col0) against rows r0 .. r0 + MB - 1 of x. SPLIT: two chains of sums per tile and
 * row (a few rows: more independent dot products in flight). */
static inline __attribute__((always_inline)) void q4b_block(
    const uint8_t *codes, const void *dm, const uint16_t *x, const float *xs, int64_t groups, int64_t n,
    int64_t col0, int64_t r0, const int TN, const int MB, const int SPLIT, const int HALF, uint16_t *y) {
    const int64_t k = groups * QGROUP, tstride = groups * 256;
    __m512 acc[4][8], ga[4][8], gb[4][8];
    for (int t = 0; t < TN; t++)
        for (int r = 0; r < MB; r++) acc[t][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        q4b_prefetch(codes, dm, groups, g, TN, HALF);
        for (int t = 0; t < TN; t++)
            for (int r = 0; r < MB; r++) {
                ga[t][r] = _mm512_setzero_ps();
                if (SPLIT) gb[t][r] = _mm512_setzero_ps();
            }
        for (int c = 0; c < 4; c++) {
            for (int t = 0; t < TN; t++) {
                __m512bh a[4];
                q4b_expand(_mm512_loadu_si512((const void *)(codes + t * tstride + g * 256 + c * 64)), a);
                for (int r = 0; r < MB; r++) {
                    const uint16_t *xr = x + (r0 + r) * k + g * QGROUP + c * 8;
                    ga[t][r] = _mm512_dpbf16_ps(ga[t][r], a[0], q4b_bcast(xr));
                    if (SPLIT) {
                        gb[t][r] = _mm512_dpbf16_ps(gb[t][r], a[1], q4b_bcast(xr + 2));
                        ga[t][r] = _mm512_dpbf16_ps(ga[t][r], a[2], q4b_bcast(xr + 4));
                        gb[t][r] = _mm512_dpbf16_ps(gb[t][r], a[3], q4b_bcast(xr + 6));
                    } else {
                        ga[t][r] = _mm512_dpbf16_ps(ga[t][r], a[1], q4b_bcast(xr + 2));
                        ga[t][r] = _mm512_dpbf16_ps(ga[t][r], a[2], q4b_bcast(xr + 4));
                        ga[t][r] = _mm512_dpbf16_ps(ga[t][r], a[3], q4b_bcast(xr + 6));
                    }
                }
            }
        }
        for (int t = 0; t < TN; t++) {
            __m512 d, mz;
            q4b_scales(dm, groups, t, g, HALF, &d, &mz);
            for (int r = 0; r < MB; r++) {
                const __m512 s = SPLIT ? _mm512_add_ps(ga[t][r], gb[t][r]) : ga[t][r];
                acc[t][r] = _mm512_fmadd_ps(s, d, acc[t][r]);
                acc[t][r] = _mm512_fmadd_ps(mz, _mm512_set1_ps(xs[(r0 + r) * groups + g]), acc[t][r]);
            }
        }
    }
    store_tiles_bf16(y, n, col0, r0, acc, TN, MB);
}

/* Against every row of x: two tiles from col0 at once (`two`, m <= 4: more independent sums in flight), or one tile
 * in blocks of 8 rows, the last block's size a constant. */
static inline __attribute__((always_inline)) void q4b_rows_(
    const uint8_t *cb, const void *db, const uint16_t *x, const float *xs, int64_t groups, int64_t n, int64_t col0,
    int64_t m, int two, const int HALF, uint16_t *y) {
    if (two) {
        if (m == 1) q4b_block(cb, db, x, xs, groups, n, col0, 0, 2, 1, 1, HALF, y);
        else if (m == 2) q4b_block(cb, db, x, xs, groups, n, col0, 0, 2, 2, 1, HALF, y);
        else if (m == 3) q4b_block(cb, db, x, xs, groups, n, col0, 0, 2, 3, 1, HALF, y);
        else q4b_block(cb, db, x, xs, groups, n, col0, 0, 2, 4, 0, HALF, y);
        return;
    }
    int64_t r0 = 0;
    for (; r0 + 8 <= m; r0 += 8) q4b_block(cb, db, x, xs, groups, n, col0, r0, 1, 8, 0, HALF, y);
    switch (m - r0) {
    case 1: q4b_block(cb, db, x, xs, groups, n, col0, r0, 1, 1, 1, HALF, y); break;
    case 2: q4b_block(cb, db, x, xs, groups, n, col0, r0, 1, 2, 1, HALF, y); break;
    case 3: q4b_block(cb, db, x, xs, groups, n, col0, r0, 1, 3, 1, HALF, y); break;
    case 4: q4b_block(cb, db, x, xs, groups, n, col0, r0, 1, 4, 0, HALF, y); break;
    case 5: q4b_block(cb, db, x, xs, groups, n, col0, r0, 1, 5, 0, HALF, y); break;
    case 6: q4b_block(cb, db, x, xs, groups, n, col0, r0, 1, 6, 0, HALF, y); break;
    case 7: q4b_block(cb, db, x, xs, groups, n, col0, r0, 1, 7, 0, HALF, y); break;
    default: break;
    }
}

/* q4b_rows_ with float32 or fp16 scales. */
static void q4b_rows(const uint8_t *cb, const void *db, const uint16_t *x, const float *xs, int64_t groups,
                     int64_t n, int64_t col0, int64_t m, int two, int half, uint16_t *y) {
    if (half)
        q4b_rows_(cb, db, x, xs, groups, n, col0, m, two, 1, y);
    else
        q4b_rows_(cb, db, x, xs, groups, n, col0, m, two, 0, y);
}

/* From Q4U_MIN_M rows of x on, the same product with each row's running sum kept in units of the lane's current
 * group scale u (the last nonzero scale d of the lane's groups so far; 1 before the first): at the start of a group,
 * acc = acc * (u_old / u) + ((zero - 16 d) / u) * X[r, g], then the group's pair-dot products add straight into
 * acc (lanes whose d is 0 masked off: their group adds only zero * X), and y = acc * u at the end. One register a
 * row carries the whole of K, with no second register for the group's sums: 16 independent chains of vdpbf16ps
 * (8 rows of two tiles) where the kernel above, one accumulator and one group sum a row, keeps 8 in flight against
 * the instruction's ~6-cycle latency. The default model's 120 layer matmuls, 2 threads, AVX512-BF16 EPYC: M = 8 /
 * 16 / 32 / 64 3.0 / 5.1 / 9.3 / 18.0 ms against 3.2 / 5.6 / 10.6 / 20.3 (one process, alternating); below 8 rows
 * it was slower (1-5 rows: 5-27%), so the kernel above keeps them. x's pairs go in as
 * the instruction's broadcast memory operand (inline assembly: the intrinsic's separate broadcast cost ~7%).
 * Each row's arithmetic is the same whatever the block it is in, so a row's result is the same at any M >= 8.
 * The rescaling rounds once a group (float32, relative 2^-24): the error stays the output's bf16 rounding. */
#define Q4U_MIN_M 8

static inline __attribute__((always_inline)) void q4u_block(
    const uint8_t *codes, const void *dm, const uint16_t *x, const float *xs, int64_t groups, int64_t n,
    int64_t col0, int64_t r0, const int TN, const int MB, const int HALF, uint16_t *y) {
    const int64_t k = groups * QGROUP, tstride = groups * 256;
    __m512 acc[2][8], u[2];
    __mmask16 live[2];
    _Pragma("GCC unroll 16") for (int t = 0; t < TN; t++) {
        u[t] = _mm512_set1_ps(1.0f);
        _Pragma("GCC unroll 16") for (int r = 0; r < MB; r++) acc[t][r] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < groups; g++) {
        q4b_prefetch(codes, dm, groups, g, TN, HALF);
        _Pragma("GCC unroll 16") for (int t = 0; t < TN; t++) {
            __m512 d, mz;
            q4b_scales(dm, groups, t, g, HALF, &d, &mz);
            live[t] = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            const __m512 un = _mm512_mask_mov_ps(u[t], live[t], d);
            const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), un);
            const __m512 ratio = _mm512_mul_ps(u[t], inv), mzu = _mm512_mul_ps(mz, inv);
            u[t] = un;
            _Pragma("GCC unroll 16") for (int r = 0; r < MB; r++)
                acc[t][r] = _mm512_fmadd_ps(acc[t][r], ratio,
                                            _mm512_mul_ps(mzu, _mm512_set1_ps(xs[(r0 + r) * groups + g])));
        }
        _Pragma("GCC unroll 16") for (int c = 0; c < 4; c++) {
            _Pragma("GCC unroll 16") for (int t = 0; t < TN; t++) {
                __m512bh a[4];
                q4b_expand(_mm512_loadu_si512((const void *)(codes + t * tstride + g * 256 + c * 64)), a);
                _Pragma("GCC unroll 16") for (int r = 0; r < MB; r++) {
                    const uint32_t *xr = (const uint32_t *)(x + (r0 + r) * k + g * QGROUP + c * 8);
                    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)
                        __asm__("vdpbf16ps %2%{1to16%}, %1, %0%{%3%}"
                                : "+v"(acc[t][r]) : "v"(a[j]), "m"(xr[j]), "Yk"(live[t]));
                }
            }
        }
    }
    _Pragma("GCC unroll 16") for (int t = 0; t < TN; t++) {
        const int64_t c0 = col0 + 16 * t;
        if (c0 >= n) break;
        const __mmask16 keep = n - c0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c0)) - 1);
        _Pragma("GCC unroll 16") for (int r = 0; r < MB; r++)
            _mm256_mask_storeu_epi16(y + (r0 + r) * n + c0, keep,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[t][r], u[t])));
    }
}

/* Rows r0 .. r0 + mb - 1 (1 <= mb <= 8) against TN tiles, the block's size a constant. */
static inline __attribute__((always_inline)) void q4u_few(
    const uint8_t *cb, const void *db, const uint16_t *x, const float *xs, int64_t groups, int64_t n, int64_t col0,
    int64_t r0, int64_t mb, const int TN, const int HALF, uint16_t *y) {
    switch (mb) {
    case 1: q4u_block(cb, db, x, xs, groups, n, col0, r0, TN, 1, HALF, y); break;
    case 2: q4u_block(cb, db, x, xs, groups, n, col0, r0, TN, 2, HALF, y); break;
    case 3: q4u_block(cb, db, x, xs, groups, n, col0, r0, TN, 3, HALF, y); break;
    case 4: q4u_block(cb, db, x, xs, groups, n, col0, r0, TN, 4, HALF, y); break;
    case 5: q4u_block(cb, db, x, xs, groups, n, col0, r0, TN, 5, HALF, y); break;
    case 6: q4u_block(cb, db, x, xs, groups, n, col0, r0, TN, 6, HALF, y); break;
    case 7: q4u_block(cb, db, x, xs, groups, n, col0, r0, TN, 7, HALF, y); break;
    default: q4u_block(cb, db, x, xs, groups, n, col0, r0, TN, 8, HALF, y); break;
    }
}

/* Every row of x against the two tiles from col0 (`two`; else the one), in blocks of up to 8 rows of as even a size
 * as that allows (9 rows: 5 + 4, not 8 + 1; a block of 16 rows of one tile measured no faster than 8 of two). */
static inline __attribute__((always_inline)) void q4u_rows_(
    const uint8_t *cb, const void *db, const uint16_t *x, const float *xs, int64_t groups, int64_t n, int64_t col0,
    int64_t m, int two, const int HALF, uint16_t *y) {
    int64_t r0 = 0;
    const int64_t nb = (m + 7) / 8;
    for (int64_t b = 0; b < nb; b++) {
        const int64_t mb = m / nb + (b < m % nb);
        if (two) q4u_few(cb, db, x, xs, groups, n, col0, r0, mb, 2, HALF, y);
        else q4u_few(cb, db, x, xs, groups, n, col0, r0, mb, 1, HALF, y);
        r0 += mb;
    }
}

static void q4u_rows(const uint8_t *cb, const void *db, const uint16_t *x, const float *xs, int64_t groups,
                     int64_t n, int64_t col0, int64_t m, int two, int half, uint16_t *y) {
    if (half)
        q4u_rows_(cb, db, x, xs, groups, n, col0, m, two, 1, y);
    else
        q4u_rows_(cb, db, x, xs, groups, n, col0, m, two, 0, y);
}

static int q4b_gemm(const uint16_t *x, const uint8_t *codes, const void *dm, int half, uint16_t *y, int64_t m,
                    int64_t n, int64_t k, int num_threads) {
    if (!q4b_gemm_fits(m, n, k) || num_threads < 1) return -1;
    const int unit = m >= Q4U_MIN_M;
    const int64_t groups = k / QGROUP, tiles = (n + 15) / 16;
    float *xs = malloc(sizeof(float) * (size_t)(m * groups));
    if (xs == NULL) return -1;
    /* x's sum per row and group, 8 lanes at a time (a scalar chain of 32 float adds per group took ~1 ms of a
     * 64-request decode step's 120 products, on one thread) */
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *xg = x + r * k + g * QGROUP;
            __m256 v = _mm256_setzero_ps();
            for (int j = 0; j < QGROUP; j += 8)
                v = _mm256_add_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(xg + j))), 16)));
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            xs[r * groups + g] = _mm_cvtss_f32(h);
        }
    /* Enough independent sums in flight: up to four rows of x take two tiles a pass (two chains each for up to
     * three rows), 5-7 one tile and blocks of 8 rows; from Q4U_MIN_M rows on two tiles a pass in blocks of up to 8
     * rows (q4u_rows). Four tiles a pass for one row measured slower from memory (1.6-1.9 against 1.4 ms for 106M
     * weights, 2 threads): more streams than the prefetches keep ahead. */
    const int64_t tn = m <= 4 || unit ? 2 : 1;
    const int64_t blocks = (tiles + tn - 1) / tn;
    const size_t esz = half ? sizeof(uint16_t) : sizeof(float); /* the scales' element size */
    void (*rows)(const uint8_t *, const void *, const uint16_t *, const float *, int64_t, int64_t, int64_t, int64_t,
                 int, int, uint16_t *) = unit ? q4u_rows : q4b_rows;
    steal_range ranges[STEAL_MAX_THREADS];
    const int parts = steal_init(ranges, num_threads, blocks);
#pragma omp parallel num_threads(num_threads) if (n * k >= 65536)
    {
        const int id = omp_get_thread_num();
        int64_t b;
        while ((b = steal_next(ranges, parts, id, NULL)) >= 0) {
            const int64_t t0 = b * tn, col0 = 16 * t0;
            if (tiles - t0 >= tn && tn == 2)
                rows(codes + t0 * groups * 256, (const char *)dm + esz * (size_t)(t0 * groups * 32), x, xs, groups, n,
                     col0, m, 1, half, y);
            else
                for (int64_t t = t0; t < t0 + tn && t < tiles; t++)
                    rows(codes + t * groups * 256, (const char *)dm + esz * (size_t)(t * groups * 32), x, xs, groups,
                         n, 16 * t, m, 0, half, y);
        }
    }
    free(xs);
    return 0;
}

#endif

int q4b_gemm_bf16(const uint16_t *x, const uint8_t *codes, const void *dm, int half, uint16_t *y, int64_t m,
                  int64_t n, int64_t k, int num_threads) {
#if HAS_Q4B
    return q4b_gemm(x, codes, dm, half, y, m, n, k, num_threads);
#else
    (void)x; (void)codes; (void)dm; (void)half; (void)y; (void)m; (void)n; (void)k; (void)num_threads;
    return -1;
#endif
}
