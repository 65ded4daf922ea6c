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
