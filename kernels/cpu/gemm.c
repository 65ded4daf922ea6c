/* Dense matrix product with float32 weights for bf16 activations, on CPUs with AVX2 and FMA but without bf16
 * dot products: y = x @ W^T for bf16 x [M, K] (rows ldx apart), W float32 [N, K], bf16 y [M, N] (rows ldy
 * apart), each output the float32 sum of the products rounded once to bf16 (nearest even, as torch rounds).
 * `gemm_f32w_f32` is the same product for float32 x and float32 y (no rounding anywhere: the LM head's logits
 * from the float32 final hidden states, exact to float32 summation).
 *
 * This is the batched path of such CPUs (the weight's dense float32 copy, from 16 rows up: prefill chunks and
 * large decode batches). W is held in panels of 16 output columns, the panel's K rows one after the other
 * (wp [N/16][K][16]: panel p, row k holds W[16p .. 16p+15, k]), so one panel is one contiguous run that a tile
 * reads from the start to the end. A tile is 6 rows of x by one panel: 12 accumulators (6 x 2 registers of 8),
 * per k two loads of the panel, 6 broadcasts of x and 12 FMAs, the sums never leaving registers until the tile's
 * bf16 store. x is converted to float32 once per call (the threads convert a share of its rows each); the
 * threads then split the panels, each panel read once from memory and kept in cache for all the row tiles.
 *
 * On a 2-core AVX2 machine this is 1.3x oneDNN's float32 kernel on its blocked layout at M = 64-128 for the
 * default model's 30 layers of weights (each read from memory once per step), and it needs no conversion of x
 * or y by the caller. Returns 0, or -1 when it cannot take the product (N not a multiple of 16, a dimension out
 * of range, no memory for x's float32 copy, a CPU or build without AVX2 and FMA): the caller takes another path. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define GEMM_PANEL 16 /* output columns of a panel: two AVX2 registers */
#define GEMM_TILE 6   /* rows of x a tile keeps in registers (12 accumulators + 2 panel loads + 1 broadcast) */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMM_AVX2 1
#else
#define GEMM_AVX2 0
#endif

int gemm_f32w_available(void) { return GEMM_AVX2; }

#if GEMM_AVX2
/* 16 outputs (lo: columns 0-7, hi: 8-15) stored as bf16. packus works within 128-bit lanes ([lo0-3 hi0-3 |
 * lo4-7 hi4-7]); the permute puts the four 64-bit quarters back in column order. */
static inline void store_bf16x16(uint16_t *dst, __m256 lo, __m256 hi) {
    const __m256i packed = _mm256_packus_epi32(bf16_bits8(lo), bf16_bits8(hi));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permute4x64_epi64(packed, 0xD8));
}

/* Row i of a tile (i < rows): its two accumulators take x[i][j] times the panel's row j. */
#define TILE_ROW(i)                                                                                                \
    if (rows > i) {                                                                                                \
        const __m256 a = _mm256_broadcast_ss(xf + i * ldxf + j);                                                   \
        c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                                                                 \
        c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                                                                 \
    }

/* `rows` (1..6, a constant where it is inlined: the tests on it fold away) rows of xf (float32, rows ldxf apart)
 * by one panel -> y: bf16 (uint16_t, rows ldy apart), or float32 when y_f32. */
static inline __attribute__((always_inline)) void tile(const int rows, const float *xf, int64_t ldxf, int64_t k,
                                                        const float *w, void *y, int64_t ldy, int y_f32) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t j = 0; j < k; j++) {
        const __m256 b0 = _mm256_load_ps(w + GEMM_PANEL * j), b1 = _mm256_load_ps(w + GEMM_PANEL * j + 8);
        TILE_ROW(0) TILE_ROW(1) TILE_ROW(2) TILE_ROW(3) TILE_ROW(4) TILE_ROW(5)
    }
    const __m256 lo[GEMM_TILE] = {c00, c10, c20, c30, c40, c50}, hi[GEMM_TILE] = {c01, c11, c21, c31, c41, c51};
    for (int i = 0; i < rows; i++) {
        if (y_f32) {
            float *yf = (float *)y + i * ldy;
            _mm256_storeu_ps(yf, lo[i]);
            _mm256_storeu_ps(yf + 8, hi[i]);
        } else {
            store_bf16x16((uint16_t *)y + i * ldy, lo[i], hi[i]);
        }
    }
}
#undef TILE_ROW

/* Panel `p` of the weight against every row of xf -> y's columns 16p .. 16p + 15. */
static void panel(const float *xf, int64_t ldxf, int64_t m, int64_t k, const float *wp, int64_t p, void *y,
                  int64_t ldy, int y_f32) {
    const float *w = wp + p * k * GEMM_PANEL;
    const size_t esize = y_f32 ? sizeof(float) : sizeof(uint16_t);
    char *yc = (char *)y + (size_t)(p * GEMM_PANEL) * esize;
    int64_t r = 0;
#define TILE(rows) tile(rows, xf + r * ldxf, ldxf, k, w, yc + (size_t)(r * ldy) * esize, ldy, y_f32)
    for (; r + GEMM_TILE <= m; r += GEMM_TILE) TILE(GEMM_TILE);
    switch (m - r) { /* the last rows: each count its own unrolled copy */
    case 5: TILE(5); break;
    case 4: TILE(4); break;
    case 3: TILE(3); break;
    case 2: TILE(2); break;
    case 1: TILE(1); break;
    default: break;
    }
#undef TILE
}

/* The shared driver: bf16 x (converted to float32 once, the threads a share of the rows each) or float32 x (read
 * in place), then the threads split the panels. */
static int gemm_run(const void *x, int x_f32, int64_t ldx, const float *wp, void *y, int y_f32, int64_t ldy,
                    int64_t m, int64_t n, int64_t k, int num_threads) {
    if (m < 1 || n < GEMM_PANEL || n % GEMM_PANEL != 0 || k < 1 || ldx < k || ldy < n || num_threads < 1)
        return -1;
    if (((uintptr_t)wp & 31) != 0) return -1; /* the panels are read with aligned loads */
    float *xf = x_f32 ? NULL : malloc(sizeof(float) * (size_t)(m * k));
    if (!x_f32 && xf == NULL) return -1;
    const float *xs = x_f32 ? (const float *)x : xf;
    const int64_t ldxf = x_f32 ? ldx : k;
    const uint16_t *xb = (const uint16_t *)x;
    const int64_t panels = n / GEMM_PANEL;
#pragma omp parallel num_threads(num_threads) if (m * n * k >= 65536)
    {
        if (!x_f32) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++)
                for (int64_t j = 0; j < k; j++) xf[i * k + j] = bf16_to_f32(xb[i * ldx + j]);
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) panel(xs, ldxf, m, k, wp, p, y, ldy, y_f32);
    }
    free(xf);
    return 0;
}
#else
/* Without AVX2 and FMA the kernel takes nothing: the caller uses another path. */
static int gemm_run(const void *x, int x_f32, int64_t ldx, const float *wp, void *y, int y_f32, int64_t ldy,
                    int64_t m, int64_t n, int64_t k, int num_threads) {
    (void)x; (void)x_f32; (void)ldx; (void)wp; (void)y; (void)y_f32; (void)ldy; (void)m; (void)n; (void)k;
    (void)num_threads;
    return -1;
}
#endif

int gemm_f32w_bf16(const uint16_t *x, int64_t ldx, const float *wp, uint16_t *y, int64_t ldy, int64_t m, int64_t n,
                   int64_t k, int num_threads) {
    return gemm_run(x, 0, ldx, wp, y, 0, ldy, m, n, k, num_threads);
}

int gemm_f32w_f32(const float *x, int64_t ldx, const float *wp, float *y, int64_t ldy, int64_t m, int64_t n, int64_t k,
                  int num_threads) {
    return gemm_run(x, 1, ldx, wp, y, 1, ldy, m, n, k, num_threads);
}

/* ---- dense matrix product with bf16 weights on CPUs with AVX512-BF16 ----
 *
 * y = x @ W^T for bf16 x [M, K] (rows ldx apart, K even), W bf16 [N, K] held in paired panels of 16 output
 * columns (wp [N/16][K/2][16][2]: panel p, pair j, lane c holds W[16p + c, 2j] and W[16p + c, 2j + 1]), bf16 y
 * [M, N] (rows ldy apart). One vdpbf16ps multiplies a panel's pair j (one 64-byte load) by x's pair j of one row
 * (broadcast to the 16 lanes): the products are exact in float32, the sums float32, rounded once to bf16 at the
 * store (nearest even, as torch rounds).
 *
 * A tile is up to 8 rows of x by up to 3 panels: 24 accumulators, per pair 3 loads of the panels, 8 broadcasts of
 * x and 24 vdpbf16ps, the sums in registers until the tile's store. The threads split the panels in contiguous
 * ranges (3 panels a group, a group read from memory once and kept in cache for all the row tiles). The weights
 * are read once a call: from ~32 rows on the product is bound by the instruction's rate, not by memory. */
#define BGEMM_ROWS 8
#define BGEMM_PANELS 3
/* From this many rows on the product goes here rather than to the int4 kernel of quant.c (whose codes are a
 * quarter of the bytes: below, both are bound by memory). The default model's 120 layer matmuls, 2-core
 * AVX512-BF16 machine: M = 16 / 20 / 24 / 32 / 64 6.4 / 5.9 / 6.0 / 7.7 / 14.3 ms against 4.9 / 6.1 / 7.1 / 9.1 /
 * 17.7 for the int4 kernel. */
#define GEMM_BF16W_MIN_ROWS 20

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GEMM_BF16 1
#else
#define GEMM_BF16 0
#endif

int gemm_bf16w_available(void) { return GEMM_BF16; }
int gemm_bf16w_min_rows(void) { return GEMM_BF16W_MIN_ROWS; }

#if GEMM_BF16
/* A thread's walk over the side regions (`pf_region`): the threads claim them in order from a shared counter
 * (*claim, up to end), so a thread that has finished its panels leaves none behind; the run it is in (lines from
 * p to run_end; rows_left more runs `stride` bytes apart, `bytes` each, after `row`); done once none is left. */
typedef struct {
    const pf_region *reg;
    int64_t *claim, end;
    const char *p, *run_end, *row;
    int64_t rows_left, stride, bytes;
    int done;
} side_cursor;

/* The first run of the next unclaimed region with something in it; p == run_end and done when none is left. */
static __attribute__((noinline, cold)) void side_next_region(side_cursor *c) {
    c->p = c->run_end = NULL;
    c->rows_left = 0;
    while (!c->done) {
        const int64_t i = __atomic_fetch_add(c->claim, 1, __ATOMIC_RELAXED);
        if (i >= c->end) {
            c->done = 1;
            return;
        }
        const pf_region *r = c->reg + i;
        if (r->rows > 0 && r->bytes > 0) {
            c->row = r->base;
            c->rows_left = r->rows - 1;
            c->stride = r->stride;
            c->bytes = r->bytes;
            c->p = (const char *)((uintptr_t)r->base & ~(uintptr_t)63); /* from the line the run starts in */
            c->run_end = r->base + r->bytes;
            return;
        }
    }
}

/* MB rows of x from row r0 against TP panels from panel p0 -> y's columns 16 p0 .. 16 (p0 + TP) - 1 (n: y's width;
 * columns from n on are not written). */
static inline __attribute__((always_inline)) const char *bgemm_tile(
    const uint16_t *x, int64_t ldx, const uint16_t *wp, int64_t k, int64_t p0, uint16_t *y, int64_t ldy, int64_t n,
    int64_t r0, const char *pf, const char *pf_end, side_cursor *side, const int MB, const int TP, const int SIDE) {
    __m512 acc[BGEMM_PANELS][BGEMM_ROWS];
    /* the side lines, one every other pair step, while unclaimed regions last (the run's state in registers) */
    const char *sp = NULL, *se = NULL, *srow = NULL;
    int64_t srows = 0, sstride = 0, sbytes = 0;
    if (SIDE) {
        if (side->p >= side->run_end && side->rows_left == 0 && !side->done) side_next_region(side);
        sp = side->p, se = side->run_end, srow = side->row;
        srows = side->rows_left, sstride = side->stride, sbytes = side->bytes;
    }
    _Pragma("GCC unroll 8") for (int t = 0; t < TP; t++)
        _Pragma("GCC unroll 8") for (int r = 0; r < MB; r++) acc[t][r] = _mm512_setzero_ps();
    const uint16_t *w = wp + p0 * k * 16;
    const uint16_t *xr = x + r0 * ldx;
    for (int64_t j = 0; j < k; j += 2) {
        if (pf < pf_end) {
            _mm_prefetch(pf, _MM_HINT_T1);
            pf += 64;
        }
        if (SIDE && (j & 2) && sp < se) { /* every other pair step */
            _mm_prefetch(sp, _MM_HINT_T1);
            sp += 64;
            if (sp >= se) {
                if (srows > 0) { /* the region's next row */
                    srows--;
                    srow += sstride;
                    sp = (const char *)((uintptr_t)srow & ~(uintptr_t)63);
                    se = srow + sbytes;
                } else { /* the next region, in this same tile */
                    side_next_region(side);
                    sp = side->p, se = side->run_end, srow = side->row;
                    srows = side->rows_left, sstride = side->stride, sbytes = side->bytes;
                }
            }
        }
        __m512bh b[BGEMM_PANELS];
        _Pragma("GCC unroll 8") for (int t = 0; t < TP; t++)
            b[t] = (__m512bh)_mm512_loadu_si512((const void *)(w + t * k * 16 + j * 16));
        _Pragma("GCC unroll 8") for (int r = 0; r < MB; r++) {
            int32_t pair;
            __builtin_memcpy(&pair, xr + r * ldx + j, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            _Pragma("GCC unroll 8") for (int t = 0; t < TP; t++) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], a, b[t]);
        }
    }
    _Pragma("GCC unroll 8") for (int t = 0; t < TP; t++) {
        const int64_t c0 = (p0 + t) * 16;
        const __mmask16 keep = n - c0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c0)) - 1);
        _Pragma("GCC unroll 8") for (int r = 0; r < MB; r++)
            _mm256_mask_storeu_epi16(y + (r0 + r) * ldy + c0, keep, (__m256i)_mm512_cvtneps_pbh(acc[t][r]));
    }
    if (SIDE) {
        side->p = sp, side->run_end = se, side->row = srow;
        side->rows_left = srows;
    }
    return pf;
}

/* TP panels from p0 against every row of x. The thread's next panels (up to a group's) are prefetched into L2
 * meanwhile, a line per pair step; in its last group, `after` .. `after_end` instead (the first group of its range
 * in the product that comes next, or nothing). */
static inline __attribute__((always_inline)) void bgemm_group(const uint16_t *x, int64_t ldx, const uint16_t *wp,
                                                               int64_t k, int64_t p0, uint16_t *y, int64_t ldy,
                                                               int64_t m, int64_t n, int64_t p_end, side_cursor *side,
                                                               const char *after, const char *after_end,
                                                               const int TP, const int SIDE) {
    const int64_t next = p_end - (p0 + TP) < BGEMM_PANELS ? p_end - (p0 + TP) : BGEMM_PANELS;
    const char *pf = (const char *)(wp + (p0 + TP) * k * 16), *pf_end = pf + next * k * 32;
    if (next <= 0 && after != NULL) pf = after, pf_end = after_end;
    int64_t r = 0;
#define BTILE(MB) bgemm_tile(x, ldx, wp, k, p0, y, ldy, n, r, pf, pf_end, side, MB, TP, SIDE)
    for (; r + BGEMM_ROWS <= m; r += BGEMM_ROWS) pf = BTILE(BGEMM_ROWS);
    switch (m - r) { /* the last rows: each count its own unrolled copy */
    case 7: BTILE(7); break;
    case 6: BTILE(6); break;
    case 5: BTILE(5); break;
    case 4: BTILE(4); break;
    case 3: BTILE(3); break;
    case 2: BTILE(2); break;
    case 1: BTILE(1); break;
    default: break;
    }
#undef BTILE
}

/* The thread's panel groups, with or without side lines. */
static inline __attribute__((always_inline)) void bgemm_thread(const uint16_t *x, int64_t ldx, const uint16_t *wp,
                                                                uint16_t *y, int64_t ldy, int64_t m, int64_t n,
                                                                int64_t k, steal_range *ranges, int parts, int id,
                                                                side_cursor *side, const char *after,
                                                                const char *after_end, const int SIDE) {
    const int64_t panels = (n + 15) / 16;
    int64_t g, own_end;
    for (;;) {
        /* whether the next unit is from this thread's own range (a race with a thief only makes a unit it took from
         * another range prefetch `after` too: harmless) */
        const uint64_t v = id < parts ? __atomic_load_n(&ranges[id].word, __ATOMIC_RELAXED) : 0;
        const int own = (uint32_t)v < (uint32_t)(v >> 32);
        if ((g = steal_next(ranges, parts, id, &own_end)) < 0) break;
        const int64_t p = g * BGEMM_PANELS, end = own_end * BGEMM_PANELS < panels ? own_end * BGEMM_PANELS : panels;
        const char *a = own && own_end == g + 1 ? after : NULL, *ae = a ? after_end : NULL;
        if (panels - p >= BGEMM_PANELS)
            bgemm_group(x, ldx, wp, k, p, y, ldy, m, n, end, side, a, ae, BGEMM_PANELS, SIDE);
        else if (panels - p == 2) bgemm_group(x, ldx, wp, k, p, y, ldy, m, n, end, side, a, ae, 2, SIDE);
        else bgemm_group(x, ldx, wp, k, p, y, ldy, m, n, end, side, a, ae, 1, SIDE);
    }
}

/* The product, and while it runs the threads prefetch the `nside` side regions (none: side NULL) in order, each
 * claiming the next one when it is done with its last, a line every other pair step of its tiles (into L2; what L2
 * cannot hold moves on to L3). A pair step of a full tile (8 rows by 3 panels) is 24 vdpbf16ps, so the side lines
 * come at about the machine's spare bandwidth while the product is bound by its instructions (decode batches of
 * 20-64 rows and up). On the 2-core AVX512-BF16 machine a line every pair step was no faster for the LoRA weights
 * and slower for the K/V blocks, two lines a pair step slower still. */
int gemm_bf16w_next(const uint16_t *x, int64_t ldx, const uint16_t *wp, uint16_t *y, int64_t ldy, int64_t m,
                    int64_t n, int64_t k, const pf_region *side, int64_t nside, const uint16_t *next_wp,
                    int64_t next_n, int64_t next_k, int num_threads) {
    if (m < 1 || n < 1 || k < 2 || k % 2 != 0 || ldx < k || ldy < n || num_threads < 1 || nside < 0) return -1;
    const int64_t panels = (n + 15) / 16, groups = (panels + BGEMM_PANELS - 1) / BGEMM_PANELS;
    steal_range ranges[STEAL_MAX_THREADS];
    const int parts = steal_init(ranges, num_threads, groups);
    const int64_t next_groups = next_wp != NULL ? ((next_n + 15) / 16 + BGEMM_PANELS - 1) / BGEMM_PANELS : 0;
    int64_t claimed = 0; /* the side regions the threads have taken */
#pragma omp parallel num_threads(num_threads) if (m * n * k >= 65536)
    {
        const int id = omp_get_thread_num();
        /* the first group of this thread's range in the next product (the same cut of its groups, the same team) */
        const char *after = NULL, *after_end = NULL;
        if (next_groups > 0 && id < parts) {
            const int64_t first = next_groups * id / parts, last = next_groups * (id + 1) / parts;
            const int64_t next_panels = (next_n + 15) / 16, p0 = first * BGEMM_PANELS;
            const int64_t np = next_panels - p0 < BGEMM_PANELS ? next_panels - p0 : BGEMM_PANELS;
            if (last > first && np > 0) {
                after = (const char *)(next_wp + p0 * next_k * 16);
                after_end = after + np * next_k * 32;
            }
        }
        if (side != NULL && nside > 0) {
            side_cursor c = {side, &claimed, nside, NULL, NULL, NULL, 0, 0, 0, 0};
            bgemm_thread(x, ldx, wp, y, ldy, m, n, k, ranges, parts, id, &c, after, after_end, 1);
        } else {
            bgemm_thread(x, ldx, wp, y, ldy, m, n, k, ranges, parts, id, NULL, after, after_end, 0);
        }
    }
    return 0;
}

int gemm_bf16w_side(const uint16_t *x, int64_t ldx, const uint16_t *wp, uint16_t *y, int64_t ldy, int64_t m,
                    int64_t n, int64_t k, const pf_region *side, int64_t nside, int num_threads) {
    return gemm_bf16w_next(x, ldx, wp, y, ldy, m, n, k, side, nside, NULL, 0, 0, num_threads);
}

int gemm_bf16w_bf16(const uint16_t *x, int64_t ldx, const uint16_t *wp, uint16_t *y, int64_t ldy, int64_t m,
                    int64_t n, int64_t k, int num_threads) {
    return gemm_bf16w_side(x, ldx, wp, y, ldy, m, n, k, NULL, 0, num_threads);
}
#else
int gemm_bf16w_next(const uint16_t *x, int64_t ldx, const uint16_t *wp, uint16_t *y, int64_t ldy, int64_t m,
                    int64_t n, int64_t k, const pf_region *side, int64_t nside, const uint16_t *next_wp,
                    int64_t next_n, int64_t next_k, int num_threads) {
    (void)x; (void)ldx; (void)wp; (void)y; (void)ldy; (void)m; (void)n; (void)k; (void)side; (void)nside;
    (void)next_wp; (void)next_n; (void)next_k; (void)num_threads;
    return -1;
}

int gemm_bf16w_side(const uint16_t *x, int64_t ldx, const uint16_t *wp, uint16_t *y, int64_t ldy, int64_t m,
                    int64_t n, int64_t k, const pf_region *side, int64_t nside, int num_threads) {
    (void)x; (void)ldx; (void)wp; (void)y; (void)ldy; (void)m; (void)n; (void)k; (void)side; (void)nside;
    (void)num_threads;
    return -1;
}

int gemm_bf16w_bf16(const uint16_t *x, int64_t ldx, const uint16_t *wp, uint16_t *y, int64_t ldy, int64_t m,
                    int64_t n, int64_t k, int num_threads) {
    (void)x; (void)ldx; (void)wp; (void)y; (void)ldy; (void)m; (void)n; (void)k; (void)num_threads;
    return -1;
}
#endif
