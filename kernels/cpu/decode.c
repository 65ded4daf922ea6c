/* CPU kernels of the decode step that torch runs as many small ops: compiled once per machine by
 * kernels/native.py (-O3 -march=native: the compiler vectorises the head_dim loops for the CPU it runs on)
 * and called through ctypes, which releases the GIL for the call.
 *
 * bfloat16 values travel as uint16_t; every sum is accumulated in float32. OpenMP threads are torch's own
 * (the process loads one libgomp), their number passed in by the caller.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define MAX_HEAD_DIM 256
#define MAX_HEADS 64
#define MAX_ROW 2048 /* kv_heads * head_dim */
#define MAX_BLOCK 64

/* exp(x) for x <= 0 (softmax arguments after the max is subtracted), to about 2 ulp, in plain arithmetic the
 * compiler vectorises: 2^(x log2 e) split into an integer power (exponent bits) and a polynomial on [-0.5, 0.5]. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float k = __builtin_rintf(t); /* inlined (vrndscale), unlike roundf */
    const float f = (t - k) * 0.69314718055994531f; /* e^f, |f| <= ln2 / 2 */
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } s;
    s.u = (uint32_t)((int32_t)k + 127) << 23;
    return p * s.f;
}

/* Paged attention of short runs of new tokens: decodes (one new token per sequence) and the positions of a
 * speculative verify pass (a few consecutive new tokens of one sequence), grouped-query heads sharing each KV
 * head.
 *
 * Sequence i has nq[i] new tokens (nq NULL: one each) at query rows q_rows[i] .. q_rows[i] + nq[i] - 1 of
 * q, out: [*, num_heads, head_dim] bf16, and ctx[i] tokens in context counting all of them: its new token j
 * attends to the first ctx[i] - nq[i] + 1 + j tokens (causal), token p in block tables[i * table_stride +
 * p / block_size], row p % block_size of k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim] bf16.
 * One pass over the context with a running max per (token, head) (online softmax): no buffer grows with the
 * context (the AVX512-BF16 path takes CHUNK_KEYS keys' scores, then their weights in bf16 against V; the others a
 * block or a tile at a time). Sequences that share the blocks of a prefix attend to it together (see
 * paged_decode_attention_bf16). Returns 0, or -1 when a shape is beyond the fixed bounds (the caller then uses the
 * torch path). */

#define MAX_NEW 32 /* new tokens of one sequence */

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAS_BF16_DOT 1
#define HAS_AVX2_TILE 0
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAS_BF16_DOT 0
#define HAS_AVX2_TILE 1
#else
#define HAS_BF16_DOT 0
#define HAS_AVX2_TILE 0
#endif

/* A row's result, normalised and rounded to bf16. */
static inline void store_row(const float *acc, float l, int64_t head_dim, uint16_t *out_row) {
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < head_dim; d++) out_row[d] = f32_to_bf16(acc[d] * inv);
}

/* The tiled kernels keep each row's softmax sum in L_LANES partial sums (a vector add a tile instead of a horizontal
 * sum and a scalar chain through memory), summed once when the row is stored. */
#define L_LANES 16

/* A tiled task's rows (token j0 + r / group, query head g * group + r % group) from their accumulators and partial
 * sums (L_LANES a row, added in a fixed order). */
static inline void store_task_rows(const float *acc, const float *l, int64_t nr, int64_t group, int64_t j0, int64_t g,
                                   int64_t num_heads, int64_t head_dim, int64_t q_row0, uint16_t *out) {
    for (int64_t r = 0; r < nr; r++) {
        const int64_t j = j0 + r / group, h = g * group + r % group;
        float lsum[L_LANES];
        for (int i = 0; i < L_LANES; i++) lsum[i] = l[r * L_LANES + i];
        for (int w = L_LANES / 2; w > 0; w /= 2)
            for (int i = 0; i < w; i++) lsum[i] += lsum[i + w];
        store_row(acc + r * head_dim, lsum[0], head_dim, out + ((q_row0 + j) * num_heads + h) * head_dim);
    }
}

/* One row of a task (a new token under one query head): its query (head_dim bf16 values) and the keys it attends
 * to (the context's first `seen`). */
typedef struct {
    const uint16_t *q;
    int64_t seen;
} RowRef;

#if HAS_BF16_DOT || HAS_AVX2_TILE
/* One cache's rows (K or V, KV head g) of keys from .. min(from + count, n) - 1 fetched into the cache. */
static inline __attribute__((always_inline)) void prefetch_rows(const uint16_t *cache, const int64_t *table,
                                                                int64_t from, int64_t count, int64_t n, int64_t g,
                                                                int64_t row, int64_t head_dim, int64_t block_size) {
    const int64_t end = from + count < n ? from + count : n;
    int64_t blk = from / block_size, in_blk = from % block_size; /* one division, not one per key */
    for (int64_t at = from; at < end; at++) {
        const char *p = (const char *)(cache + (table[blk] * block_size + in_blk) * row + g * head_dim);
        for (int64_t b = 0; b < head_dim * 2; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
        if (++in_blk == block_size) {
            in_blk = 0;
            blk++;
        }
    }
}

/* KV head g's K and V rows of keys from .. min(from + count, n) - 1 fetched into the cache. */
static inline __attribute__((always_inline)) void prefetch_keys(
        const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table, int64_t from, int64_t count, int64_t n,
        int64_t g, int64_t row, int64_t head_dim, int64_t block_size) {
    prefetch_rows(k_cache, table, from, count, n, g, row, head_dim, block_size);
    prefetch_rows(v_cache, table, from, count, n, g, row, head_dim, block_size);
}
#endif

#if HAS_BF16_DOT
#define TILE 16 /* keys per step: one vector of scores per row */

/* Softmax weights of 16 scores s in base 2 (log2(e) folded into them) against an integral running max m: 2^(s - m)
 * as 2^f (f = s - round(s), exact) times 2^(round(s) - m) (an exact power of two, at least 2^-126). A weight's bits
 * under another integral max differ by that power of two alone, so rounding them to bf16 and summing them in float32
 * give the same bits up to that power wherever the max moves (a row over a shared prefix and then its own keys, or
 * over all of them in one call). e^x on |x| <= ln2 / 2 to degree 5 (relative error < 3e-6; the weights are rounded
 * to bf16's 8 bits). */
static inline __m512 pow2_weights(__m512 s, __m512 m) {
    const __m512 k = _mm512_roundscale_ps(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(s, k), _mm512_set1_ps(0.69314718055994531f));
    __m512 p = _mm512_set1_ps(1.0f / 120.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, _mm512_max_ps(_mm512_sub_ps(k, m), _mm512_set1_ps(-126.0f)));
}

/* A 16 x 16 matrix of 32-bit elements transposed in registers: m[i] lane j -> m[j] lane i (four rounds of
 * unpacks and 128-bit lane shuffles, 64 instructions). */
static inline void transpose16(__m512i m[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(m[2 * i], m[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(m[2 * i], m[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        m[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
        m[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    }
}

/* A tile's K rows (nt <= TILE keys of head_dim bf16 values) as head_dim / 2 vectors of bf16 pairs, pair-major:
 * kt[i] lane t holds key t's values 2i and 2i + 1 (keys past nt: zero). */
static inline __attribute__((always_inline)) void k_pairs(__m512i *kt, const uint16_t *const *kr, int64_t nt,
                                                          const int64_t head_dim) {
    for (int64_t c = 0; c < head_dim / 32; c++) {
        __m512i m[16];
        for (int64_t t = 0; t < TILE; t++) m[t] = t < nt ? _mm512_loadu_si512(kr[t] + 32 * c) : _mm512_setzero_si512();
        transpose16(m);
        for (int t = 0; t < 16; t++) kt[16 * c + t] = m[t];
    }
}

/* R rows' scores over a tile: row r's query (qr[r], head_dim bf16 values) against the tile's keys in pair-major
 * form (`k_pairs`), each pair of query values broadcast to the 16 keys' lanes: 16 scores a vector with no
 * horizontal sums. Two sums a row hide the products' latency; scaled by `scale` into s + r * stride. */
#define QK_ROWS(R)                                                                                             \
    static inline __attribute__((always_inline)) void qk_rows_##R(float *s, int64_t stride,                    \
                                                                  const uint16_t *const *qr, const __m512i *kt, \
                                                                  const int64_t head_dim, __m512 scale) {      \
        __m512 a[2 * R];                                                                                       \
        for (int r = 0; r < 2 * R; r++) a[r] = _mm512_setzero_ps();                                            \
        for (int64_t i = 0; i < head_dim / 2; i += 2)                                                          \
            for (int h = 0; h < 2; h++) {                                                                      \
                const __m512bh k = (__m512bh)kt[i + h];                                                        \
                for (int r = 0; r < R; r++)  /* the query pair as the broadcast memory operand */             \
                    __asm__("vdpbf16ps %2%{1to16%}, %1, %0"                                                    \
                            : "+v"(a[2 * r + h]) : "v"(k), "m"(*(const uint32_t *)(qr[r] + 2 * (i + h))));      \
            }                                                                                                  \
        for (int r = 0; r < R; r++)                                                                            \
            _mm512_storeu_ps(s + r * stride, _mm512_mul_ps(_mm512_add_ps(a[2 * r], a[2 * r + 1]), scale));     \
    }
QK_ROWS(1)
QK_ROWS(2)
QK_ROWS(3)
QK_ROWS(4)
#undef QK_ROWS

/* A tile's V rows (nt <= TILE keys of head_dim bf16 values) in key pairs for pair dot products: vp[p * W + c]
 * (W = head_dim / 16) lane x holds keys 2p and 2p + 1's value 16c + x (the even key in the low half; past nt: 0).
 * One two-source word permute a vector. */
static inline __attribute__((always_inline)) void v_pairs(__m512i *vp, const uint16_t *const *vr, int64_t nt,
                                                          const int64_t head_dim) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    const int64_t w = head_dim / 16;
    for (int64_t p = 0; 2 * p < nt; p++)
        for (int64_t c = 0; c < head_dim / 32; c++) {
            const __m512i a = _mm512_loadu_si512(vr[2 * p] + 32 * c);
            const __m512i b = 2 * p + 1 < nt ? _mm512_loadu_si512(vr[2 * p + 1] + 32 * c) : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + p * w + 2 * c, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vp + p * w + 2 * c + 1, _mm512_permutex2var_epi16(a, hi, b));
        }
}

/* The tile's weighted V rows added to R rows' accumulators (acc + r * W * 16), with R * W sums in registers: per
 * key pair, the pair's W vectors of V (`v_pairs`) against each row's two bf16 weights (w + r * TILE, broadcast
 * from memory), in pair dot products (float32 sums). One function per (R, W), so the sums are a fixed-size array
 * the compiler keeps in registers. */
#define PV_ROWS(R, W)                                                                                          \
    static inline __attribute__((always_inline)) void pv_rows_##R##_##W(float *acc, const uint16_t *w,        \
                                                                        const __m512i *vp, int64_t pairs) {    \
        __m512 a[R * W];                                                                                       \
        for (int r = 0; r < R; r++)                                                                            \
            for (int c = 0; c < W; c++) a[r * W + c] = _mm512_loadu_ps(acc + (r * W + c) * 16);              \
        for (int64_t p = 0; p < pairs; p++)                                                                    \
            for (int c = 0; c < W; c++) {                                                                      \
                const __m512i v = _mm512_loadu_si512(vp + p * W + c);                                          \
                for (int r = 0; r < R; r++)                                                                    \
                    __asm__("vdpbf16ps %2%{1to16%}, %1, %0"                                                    \
                            : "+v"(a[r * W + c]) : "v"(v), "m"(*(const uint32_t *)(w + r * TILE + 2 * p)));    \
            }                                                                                                  \
        for (int r = 0; r < R; r++)                                                                            \
            for (int c = 0; c < W; c++) _mm512_storeu_ps(acc + (r * W + c) * 16, a[r * W + c]);               \
    }
PV_ROWS(1, 4)
PV_ROWS(2, 4)
PV_ROWS(3, 4)
PV_ROWS(4, 4)
PV_ROWS(1, 8)
PV_ROWS(2, 8)
#undef PV_ROWS

/* Rows r0 .. of a tile through `pv_rows`: for head_dim 64, R = min(nr - r0, 4); for 128, min(nr - r0, 2) (the
 * sums stay within 16 registers); other sizes one row, its sums in memory. Returns the rows taken. */
static inline __attribute__((always_inline)) int64_t pv_tile(float *acc, const uint16_t *w, const __m512i *vp,
                                                             int64_t pairs, int64_t r0, int64_t nr,
                                                             const int64_t head_dim) {
    const int64_t left = nr - r0;
    float *a = acc + r0 * head_dim;
    const uint16_t *wr = w + r0 * TILE;
    if (head_dim == 64) {
        if (left >= 4) { pv_rows_4_4(a, wr, vp, pairs); return 4; }
        if (left == 3) { pv_rows_3_4(a, wr, vp, pairs); return 3; }
        if (left == 2) { pv_rows_2_4(a, wr, vp, pairs); return 2; }
        pv_rows_1_4(a, wr, vp, pairs);
        return 1;
    }
    if (head_dim == 128) {
        if (left >= 2) { pv_rows_2_8(a, wr, vp, pairs); return 2; }
        pv_rows_1_8(a, wr, vp, pairs);
        return 1;
    }
    const int64_t wide = head_dim / 16;
    for (int64_t c = 0; c < wide; c++) {
        __m512 s = _mm512_loadu_ps(a + 16 * c);
        for (int64_t p = 0; p < pairs; p++)
            __asm__("vdpbf16ps %2%{1to16%}, %1, %0"
                    : "+v"(s) : "v"(_mm512_loadu_si512(vp + p * wide + c)), "m"(*(const uint32_t *)(wr + 2 * p)));
        _mm512_storeu_ps(a + 16 * c, s);
    }
    return 1;
}

/* The tile's K or V rows of keys p0 .. p0 + nt - 1 (KV head g) through the block table. */
static inline __attribute__((always_inline)) void tile_rows(const uint16_t **out, const uint16_t *cache,
                                                            const int64_t *table, int64_t p0, int64_t nt, int64_t g,
                                                            int64_t row, int64_t head_dim, int64_t block_size) {
    int64_t blk = p0 / block_size, in_blk = p0 % block_size; /* one division per tile, not per key */
    for (int64_t t = 0; t < nt; t++) {
        out[t] = cache + (table[blk] * block_size + in_blk) * row + g * head_dim;
        if (++in_blk == block_size) {
            in_blk = 0;
            blk++;
        }
    }
}

/* How many tiles ahead attend_tiles fetches K and V rows. One tile of a decode row's keys is computed in about the
 * time its rows take to arrive from memory, so fetching only the next one kept too few lines in flight: on the 2-core
 * AVX512-BF16 machine, 64 decodes over 320 unshared keys each read 26 GB/s of K and V (30 layers, 18 ms) at one
 * tile, 15% less time at two; three or more gave no more there and slowed the rows that share a prefix (their
 * tiles take longer to compute and the lines fetched ahead wait in L1). */
#define PREFETCH_TILES 2

/* The tile `steps` after the current one in attend_tiles' visiting order (a chunk's K tiles, then its V tiles, then
 * the next chunk's K tiles): its rows fetched into the cache. `i`: the current tile's index in that order within
 * the chunk at c0 of cn keys (K tiles 0 .. nk - 1, V tiles nk .. 2 nk - 1); keys from n on are not fetched. */
static inline __attribute__((always_inline)) void prefetch_tile_ahead(
        const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table, int64_t c0, int64_t cn, int64_t i,
        int64_t steps, int64_t n, int64_t g, int64_t row, int64_t head_dim, int64_t block_size) {
    const int64_t nk = (cn + TILE - 1) / TILE, j = i + steps;
    if (j < nk) prefetch_rows(k_cache, table, c0 + j * TILE, TILE, n, g, row, head_dim, block_size);
    else if (j < 2 * nk) prefetch_rows(v_cache, table, c0 + (j - nk) * TILE, TILE, n, g, row, head_dim, block_size);
    else prefetch_rows(k_cache, table, c0 + cn + (j - 2 * nk) * TILE, TILE, n, g, row, head_dim, block_size);
}

#define CHUNK_KEYS 128 /* keys whose scores are all computed before their softmax weights (a multiple of TILE) */
/* attend_tiles' scratch for nr rows, in floats: the chunk's scores, a tile's weights, its V pairs */
#define SCRATCH_FLOATS(nr, hd) ((nr) * (CHUNK_KEYS + TILE / 2) + TILE * (hd) / 2)

/* Rows rows[0 .. nr - 1] under KV head g over the keys p_begin .. p_end - 1 (p_begin a multiple of TILE; keys a row
 * does not see are skipped), continuing each row's online softmax: its running max m[r], partial sums l[r * L_LANES
 * ..] and accumulator acc + r * head_dim. CHUNK_KEYS keys at a time, in two passes. Scores (in base 2: log2(e)
 * folded into the scale): TILE keys at a time, the tile's K rows transposed once into bf16 pairs (`k_pairs`), then
 * each row's 16 scores from pair dot products (vdpbf16ps, float32 sums) of its broadcast query pairs, 4 rows at a
 * time (`qk_rows_*`). Then each row's max over the chunk, rounded to an integer, and its accumulator and sums
 * rescaled once (by a power of two) if the max grew. Weights: per tile, each row's 16 weights (`pow2_weights`)
 * rounded to bf16 (their sum, in float32, is of the rounded weights: the V rows' mean under the weights used), and
 * the tile's V rows in key pairs (`v_pairs`) against them in pair dot products, up to 4 rows at a time
 * (`pv_tile`). Every row's arithmetic is its own: the rows taken together (those of one sequence, or of several
 * sequences over the prefix they share) change nothing in any row's result, nor does where its chunks start (at 0
 * alone, at the shared prefix's end after it): with an integral max the weights differ only by powers of two.
 * Inlined per head_dim, so the loops over it have a fixed length. */
static inline __attribute__((always_inline)) void attend_tiles(
        const RowRef *rows, int64_t nr, float *acc, float *m, float *l, int64_t p_begin, int64_t p_end,
        const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table, int64_t g, int64_t kv_heads,
        const int64_t head_dim, int64_t block_size, float scale, float *scratch) {
    const int64_t row = kv_heads * head_dim;
    float *s = scratch;                             /* [nr][CHUNK_KEYS]: the chunk's scores */
    uint16_t *w = (uint16_t *)(s + nr * CHUNK_KEYS); /* [nr][TILE]: a tile's weights in bf16 */
    __m512i *vp = (__m512i *)(s + nr * (CHUNK_KEYS + TILE / 2)); /* [TILE / 2][head_dim / 16]: `v_pairs` */
    const __m512 scale_v = _mm512_set1_ps((float)((double)scale * 1.4426950408889634)); /* scores in base 2 */
    int64_t n = 0;
    for (int64_t r = 0; r < nr; r++) n = rows[r].seen > n ? rows[r].seen : n;
    n = n < p_end ? n : p_end;
    for (int64_t c0 = p_begin; c0 < n; c0 += CHUNK_KEYS) {
        const int64_t cn = n - c0 < CHUNK_KEYS ? n - c0 : CHUNK_KEYS;
        for (int64_t p0 = c0; p0 < c0 + cn; p0 += TILE) {
            const int64_t nt = c0 + cn - p0 < TILE ? c0 + cn - p0 : TILE;
            const uint16_t *kr[TILE];
            __m512i kt[MAX_HEAD_DIM / 2]; /* the tile's K in pairs, pair-major */
            tile_rows(kr, k_cache, table, p0, nt, g, row, head_dim, block_size);
            /* The K rows of the tile PREFETCH_TILES ahead (a block table scatters a context in blocks the hardware
             * prefetcher does not follow), or near the chunk's end its first V rows. */
            prefetch_tile_ahead(k_cache, v_cache, table, c0, cn, (p0 - c0) / TILE, PREFETCH_TILES, n, g, row, head_dim,
                                block_size);
            k_pairs(kt, kr, nt, head_dim);
            for (int64_t r0 = 0; r0 < nr; r0 += 4) { /* every row's scores, 4 rows at a time */
                const uint16_t *qr[4];
                const int64_t k = nr - r0 < 4 ? nr - r0 : 4;
                for (int64_t r = 0; r < k; r++) qr[r] = rows[r0 + r].q;
                float *sr = s + r0 * CHUNK_KEYS + (p0 - c0);
                if (k == 4) qk_rows_4(sr, CHUNK_KEYS, qr, kt, head_dim, scale_v);
                else if (k == 3) qk_rows_3(sr, CHUNK_KEYS, qr, kt, head_dim, scale_v);
                else if (k == 2) qk_rows_2(sr, CHUNK_KEYS, qr, kt, head_dim, scale_v);
                else qk_rows_1(sr, CHUNK_KEYS, qr, kt, head_dim, scale_v);
            }
        }
        for (int64_t r = 0; r < nr; r++) { /* each row's max over the keys it sees in the chunk */
            if (rows[r].seen <= c0) continue;
            const int64_t lim = rows[r].seen - c0 < cn ? rows[r].seen - c0 : cn;
            const float *sr = s + r * CHUNK_KEYS;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            int64_t t = 0;
            for (; t + 16 <= lim; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + t));
            if (t < lim) mx = _mm512_mask_max_ps(mx, (__mmask16)((1u << (lim - t)) - 1u), mx, _mm512_loadu_ps(sr + t));
            const float cmax = __builtin_rintf(_mm512_reduce_max_ps(mx)); /* integral: see `pow2_weights` */
            if (cmax > m[r]) { /* new running max: rescale what is accumulated (by a power of two, exactly) */
                const float c = m[r] == -INFINITY ? 0.0f : ldexpf(1.0f, (int)(m[r] - cmax));
                _mm512_storeu_ps(l + r * L_LANES, _mm512_mul_ps(_mm512_loadu_ps(l + r * L_LANES), _mm512_set1_ps(c)));
                for (int64_t x = 0; x < head_dim; x++) acc[r * head_dim + x] *= c;
                m[r] = cmax;
            }
        }
        for (int64_t p0 = c0; p0 < c0 + cn; p0 += TILE) {
            const int64_t nt = c0 + cn - p0 < TILE ? c0 + cn - p0 : TILE;
            const uint16_t *vr[TILE];
            tile_rows(vr, v_cache, table, p0, nt, g, row, head_dim, block_size);
            prefetch_tile_ahead(k_cache, v_cache, table, c0, cn, (cn + TILE - 1) / TILE + (p0 - c0) / TILE,
                                PREFETCH_TILES, n, g, row, head_dim, block_size); /* V rows, then the next chunk's K */
            v_pairs(vp, vr, nt, head_dim);
            for (int64_t r = 0; r < nr; r++) {
                __m256i *wr = (__m256i *)(w + r * TILE);
                if (rows[r].seen <= p0) { /* this row's keys ended before the tile: its weights are 0 */
                    _mm256_storeu_si256(wr, _mm256_setzero_si256());
                    continue;
                }
                const int64_t lim = rows[r].seen - p0 < nt ? rows[r].seen - p0 : nt;
                const __mmask16 keys = (__mmask16)((1u << lim) - 1u); /* the keys this row sees */
                const __m512 sv = _mm512_loadu_ps(s + r * CHUNK_KEYS + (p0 - c0));
                const __m256bh e = _mm512_cvtneps_pbh(_mm512_maskz_mov_ps(keys, pow2_weights(sv, _mm512_set1_ps(m[r]))));
                _mm256_storeu_si256(wr, (__m256i)e);
                _mm512_storeu_ps(l + r * L_LANES, _mm512_add_ps(_mm512_loadu_ps(l + r * L_LANES), _mm512_cvtpbh_ps(e)));
            }
            for (int64_t r = 0; r < nr;) r += pv_tile(acc, w, vp, (nt + 1) / 2, r, nr, head_dim);
        }
    }
}

#define TILED_DIM 32 /* head_dim a multiple of this: whole vectors of bf16 pairs */
#endif

#if HAS_AVX2_TILE
#define TILE 16 /* keys per step: two vectors of scores per row */
#define HALF 8  /* keys of one score vector */
#ifndef PREFETCH_KEYS /* how far ahead the K and V rows are fetched (a block table scatters them) */
#define PREFETCH_KEYS 16
#endif

/* exp_nonpos on 8 lanes: the same polynomial, the power of two built in the exponent bits. */
static inline __m256 exp_nonpos_v8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 k = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, k), _mm256_set1_ps(0.69314718055994531f));
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e)); /* k >= -126: a normal power of two */
}

/* The sums of 8 vectors, as one vector (lane t: the sum of d[t]'s lanes): two rounds of pairwise adds within
 * 128-bit lanes, then the two halves added. */
static inline __m256 hsum8(const __m256 d[HALF]) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
}

/* `attend_tiles` for the same rows as the AVX512-BF16 path's, on 8-lane float32 vectors, with an online softmax
 * a tile at a time and float32 weights: the rows' queries widened and scaled once, each tile's K and V rows widened
 * once for all the rows. Per row and tile of 16 keys: the row's query held in registers while its 16 scores are
 * summed (one load per FMA), in two vectors of 8 by `hsum8`; one running-max update, and the row's accumulator in
 * registers across the tile's 16 V rows. */
static inline __attribute__((always_inline)) void attend_tiles(
        const RowRef *rows, int64_t nr, float *acc, float *m, float *l, int64_t p_begin, int64_t p_end,
        const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table, int64_t g, int64_t kv_heads,
        const int64_t head_dim, int64_t block_size, float scale, float *scratch) {
    const int64_t row = kv_heads * head_dim;
    const int64_t block_stride = block_size * row;
    const int64_t wide = head_dim / 8; /* vectors of 8 float32 values */
    float *qf = scratch;               /* [nr][head_dim]: the rows' queries, scaled */
    float *s = qf + nr * head_dim;     /* [nr][TILE] */
    float *kf = s + nr * TILE;         /* [TILE][head_dim]: the tile's K rows in float32 */
    float *vf = kf + TILE * head_dim;  /* [TILE][head_dim]: its V rows */
    const __m256 scale_v = _mm256_set1_ps(scale);
    int64_t n = 0;
    for (int64_t r = 0; r < nr; r++) {
        n = rows[r].seen > n ? rows[r].seen : n;
        for (int64_t c = 0; c < wide; c++)
            _mm256_storeu_ps(qf + r * head_dim + 8 * c, _mm256_mul_ps(load_bf16x8(rows[r].q + 8 * c), scale_v));
    }
    n = n < p_end ? n : p_end;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t p0 = p_begin; p0 < n; p0 += TILE) {
        const int64_t nt = n - p0 < TILE ? n - p0 : TILE;
        int64_t blk = p0 / block_size, in_blk = p0 % block_size; /* one division per tile, not per key */
        for (int64_t t = 0; t < nt; t++) {
            const int64_t off = table[blk] * block_stride + in_blk * row + g * head_dim;
            if (p0 + t + PREFETCH_KEYS < n) { /* a later tile's rows (same block or the next one's) */
                const int64_t ahead = in_blk + PREFETCH_KEYS;
                const int64_t poff = ahead < block_size ? off + PREFETCH_KEYS * row
                                     : table[blk + ahead / block_size] * block_stride + (ahead % block_size) * row
                                       + g * head_dim;
                for (int64_t b = 0; b < head_dim * 2; b += 64) {
                    _mm_prefetch((const char *)(k_cache + poff) + b, _MM_HINT_T0);
                    _mm_prefetch((const char *)(v_cache + poff) + b, _MM_HINT_T0);
                }
            }
            for (int64_t c = 0; c < wide; c++) {
                _mm256_storeu_ps(kf + t * head_dim + 8 * c, load_bf16x8(k_cache + off + 8 * c));
                _mm256_storeu_ps(vf + t * head_dim + 8 * c, load_bf16x8(v_cache + off + 8 * c));
            }
            if (++in_blk == block_size) {
                in_blk = 0;
                blk++;
            }
        }
        for (int64_t r = 0; r < nr; r++) {
            if (rows[r].seen <= p0) continue; /* this row's keys ended before the tile */
            const float *qr = qf + r * head_dim;
            __m256 qv[MAX_HEAD_DIM / 8]; /* the row's query: registers for head_dim 64 */
            for (int64_t c = 0; c < wide; c++) qv[c] = _mm256_loadu_ps(qr + 8 * c);
            const int64_t lim = rows[r].seen - p0 < nt ? rows[r].seen - p0 : nt;
            __m256 sv[2];
            for (int64_t h = 0; h < 2; h++) {
                __m256 d[HALF];
                for (int64_t u = 0; u < HALF; u++) {
                    const int64_t t = h * HALF + u;
                    __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
                    if (t < nt) {
                        const float *kt = kf + t * head_dim;
                        int64_t c = 0;
                        for (; c + 1 < wide; c += 2) {
                            d0 = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kt + 8 * c), d0);
                            d1 = _mm256_fmadd_ps(qv[c + 1], _mm256_loadu_ps(kt + 8 * c + 8), d1);
                        }
                        if (c < wide) d0 = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kt + 8 * c), d0);
                    }
                    d[u] = _mm256_add_ps(d0, d1);
                }
                const __m256 keys = _mm256_castsi256_ps(
                    _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(lim - h * HALF)), lane));
                sv[h] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), hsum8(d), keys);
            }
            const float tile_max = hmax8(_mm256_max_ps(sv[0], sv[1]));
            if (tile_max > m[r]) { /* new running max: rescale what is accumulated */
                const float c = exp_nonpos(m[r] - tile_max);
                for (int i = 0; i < L_LANES; i++) l[r * L_LANES + i] *= c;
                for (int64_t x = 0; x < head_dim; x++) acc[r * head_dim + x] *= c;
                m[r] = tile_max;
            }
            const __m256 mv = _mm256_set1_ps(m[r]);
            /* keys past lim hold -inf: exp gives 0 (the argument clamped, then the product masked) */
            const __m256 e0 = _mm256_and_ps(_mm256_cmp_ps(sv[0], _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                            exp_nonpos_v8(_mm256_sub_ps(sv[0], mv)));
            const __m256 e1 = _mm256_and_ps(_mm256_cmp_ps(sv[1], _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                            exp_nonpos_v8(_mm256_sub_ps(sv[1], mv)));
            _mm256_storeu_ps(s + r * TILE, e0);
            _mm256_storeu_ps(s + r * TILE + HALF, e1);
            _mm256_storeu_ps(l + r * L_LANES, _mm256_add_ps(_mm256_loadu_ps(l + r * L_LANES), e0));
            _mm256_storeu_ps(l + r * L_LANES + HALF, _mm256_add_ps(_mm256_loadu_ps(l + r * L_LANES + HALF), e1));
        }
        for (int64_t r = 0; r < nr; r++) {
            if (rows[r].seen <= p0) continue;
            const int64_t lim = rows[r].seen - p0 < nt ? rows[r].seen - p0 : nt;
            const float *sr = s + r * TILE;
            float *ar = acc + r * head_dim;
            __m256 a[32]; /* head_dim <= 256 */
            for (int64_t c = 0; c < wide; c++) a[c] = _mm256_loadu_ps(ar + 8 * c);
            for (int64_t t = 0; t < lim; t++) {
                const __m256 e = _mm256_set1_ps(sr[t]);
                for (int64_t c = 0; c < wide; c++)
                    a[c] = _mm256_fmadd_ps(e, _mm256_loadu_ps(vf + t * head_dim + 8 * c), a[c]);
            }
            for (int64_t c = 0; c < wide; c++) _mm256_storeu_ps(ar + 8 * c, a[c]);
        }
    }
}

/* attend_tiles' scratch for nr rows, in floats: the queries, the tile's scores, its K and V rows */
#define SCRATCH_FLOATS(nr, hd) ((nr) * ((hd) + TILE) + 2 * TILE * (hd))
#define TILED_DIM 8 /* head_dim a multiple of this: whole vectors of float32 */
#endif

#if HAS_BF16_DOT || HAS_AVX2_TILE
/* `attend_tiles` of this build, inlined per head_dim so the loops over it have a fixed length. */
static void attend_tiles_any(const RowRef *rows, int64_t nr, float *acc, float *m, float *l, int64_t p_begin,
                             int64_t p_end, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table,
                             int64_t g, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
                             float *scratch) {
#define ATTEND(D)                                                                                              \
    attend_tiles(rows, nr, acc, m, l, p_begin, p_end, k_cache, v_cache, table, g, kv_heads, D, block_size, scale, \
                 scratch)
    if (head_dim == 64) ATTEND(64);
    else if (head_dim == 128) ATTEND(128);
    else ATTEND(head_dim);
#undef ATTEND
}

/* The rows of new tokens j0 .. j1 - 1 of a sequence (its first at query row q_row, nq new tokens, ctx_last tokens
 * in context counting them) under KV head g, token-major then query head, into rows[], their softmax state reset.
 * Returns their number. */
static int64_t seq_rows(RowRef *rows, float *acc, float *m, float *l, const uint16_t *q, int64_t q_row, int64_t j0,
                        int64_t j1, int64_t ctx_last, int64_t nq, int64_t g, int64_t group, int64_t num_heads,
                        int64_t head_dim) {
    const int64_t nr = (j1 - j0) * group;
    for (int64_t r = 0; r < nr; r++) {
        const int64_t j = j0 + r / group;
        rows[r].q = q + (q_row + j) * num_heads * head_dim + (g * group + r % group) * head_dim;
        rows[r].seen = ctx_last - (nq - 1 - j);
        m[r] = -INFINITY;
    }
    memset(l, 0, (size_t)(nr * L_LANES) * sizeof(float));
    memset(acc, 0, (size_t)(nr * head_dim) * sizeof(float));
    return nr;
}

#define MIN_SHARED_KEYS (2 * TILE) /* a prefix shorter than this is attended by each sequence alone */
#define CHUNK_ROWS 24              /* rows of one task over a shared prefix: enough to spread its tiles' K and V
                                      unpacking, few enough that a group of many sequences makes several tasks */

typedef struct {
    int64_t block, seq;
} FirstBlock;

static int by_first_block(const void *a, const void *b) {
    const FirstBlock *x = a, *y = b;
    if (x->block != y->block) return x->block < y->block ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Keys sequences i and h both see and hold in the same blocks, in whole tiles: their tables' common leading
 * blocks within what each one's first new token sees. */
static int64_t shared_keys(const int64_t *tables, int64_t stride, const int64_t *ctx, const int64_t *nq, int64_t i,
                           int64_t h, int64_t block_size) {
    const int64_t si = ctx[i] - (nq ? nq[i] : 1) + 1, sh = ctx[h] - (nq ? nq[h] : 1) + 1;
    const int64_t seen = si < sh ? si : sh;
    const int64_t *ti = tables + i * stride, *th = tables + h * stride;
    int64_t b = 0;
    while (b < seen / block_size && ti[b] == th[b]) b++;
    const int64_t keys = b * block_size;
    return keys / TILE * TILE;
}

/* The groups of sequences that attend to a shared prefix together: fb[] gets the sequences sorted by first block,
 * grp[3 x] .. grp[3 x + 2] group x's range [begin, end) in fb (two sequences or more) and its shared keys (at least
 * MIN_SHARED_KEYS, whole tiles seen by every row of the group). Consecutive sequences stay together while they
 * share that much with the group's first. Returns the number of groups. */
static int64_t shared_groups(const int64_t *tables, int64_t stride, const int64_t *ctx, const int64_t *nq,
                             int64_t num_seqs, int64_t block_size, FirstBlock *fb, int64_t *grp) {
    for (int64_t i = 0; i < num_seqs; i++) {
        fb[i].block = tables[i * stride];
        fb[i].seq = i;
    }
    qsort(fb, (size_t)num_seqs, sizeof(FirstBlock), by_first_block);
    int64_t ngrp = 0;
    for (int64_t a = 0; a < num_seqs;) {
        int64_t b = a + 1, keys = INT64_MAX;
        while (b < num_seqs) {
            const int64_t k = shared_keys(tables, stride, ctx, nq, fb[b].seq, fb[a].seq, block_size);
            const int64_t kk = k < keys ? k : keys;
            if (kk < MIN_SHARED_KEYS) break;
            keys = kk;
            b++;
        }
        if (b - a > 1) {
            grp[3 * ngrp] = a;
            grp[3 * ngrp + 1] = b;
            grp[3 * ngrp + 2] = keys;
            ngrp++;
        }
        a = b;
    }
    return ngrp;
}
#endif

/* One new token's attention, every head, in plain C the compiler vectorises (CPUs without AVX512-BF16). */
static void attend_row(const uint16_t *qr, const uint16_t *k_cache, const uint16_t *v_cache, int64_t n,
                       const int64_t *table, int64_t num_heads, int64_t kv_heads, int64_t head_dim,
                       int64_t block_size, float scale, uint16_t *out_row) {
    const int64_t group = num_heads / kv_heads;
    const int64_t row = kv_heads * head_dim;
    const int64_t block_stride = block_size * row;
    float qf[MAX_HEADS][MAX_HEAD_DIM] __attribute__((aligned(64)));
    float acc[MAX_HEADS][MAX_HEAD_DIM] __attribute__((aligned(64)));
    float s[MAX_HEADS][MAX_BLOCK] __attribute__((aligned(64)));
    float kv[MAX_ROW] __attribute__((aligned(64)));
    float m[MAX_HEADS], l[MAX_HEADS];
    for (int64_t h = 0; h < num_heads; h++) {
        for (int64_t d = 0; d < head_dim; d++) {
            qf[h][d] = bf16_to_f32(qr[h * head_dim + d]) * scale;
            acc[h][d] = 0.0f;
        }
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    for (int64_t p0 = 0; p0 < n; p0 += block_size) {
        const int64_t nt = n - p0 < block_size ? n - p0 : block_size;
        const int64_t base = table[p0 / block_size] * block_stride;
        for (int64_t t = 0; t < nt; t++) {
            const uint16_t *kr = k_cache + base + t * row;
            for (int64_t j = 0; j < row; j++) kv[j] = bf16_to_f32(kr[j]);
            for (int64_t h = 0; h < num_heads; h++) {
                const float *kh = kv + (h / group) * head_dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; d++) dot += qf[h][d] * kh[d];
                s[h][t] = dot;
            }
        }
        for (int64_t h = 0; h < num_heads; h++) {
            float bm = m[h];
            for (int64_t t = 0; t < nt; t++) bm = s[h][t] > bm ? s[h][t] : bm;
            if (bm > m[h]) {
                const float c = exp_nonpos(m[h] - bm);
                l[h] *= c;
                for (int64_t d = 0; d < head_dim; d++) acc[h][d] *= c;
                m[h] = bm;
            }
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < nt; t++) {
                s[h][t] = exp_nonpos(s[h][t] - bm);
                sum += s[h][t];
            }
            l[h] += sum;
        }
        for (int64_t t = 0; t < nt; t++) {
            const uint16_t *vr = v_cache + base + t * row;
            for (int64_t j = 0; j < row; j++) kv[j] = bf16_to_f32(vr[j]);
            for (int64_t h = 0; h < num_heads; h++) {
                const float *vh = kv + (h / group) * head_dim;
                const float e = s[h][t];
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) acc[h][d] += e * vh[d];
            }
        }
    }
    for (int64_t h = 0; h < num_heads; h++)
        store_row(acc[h], l[h], head_dim, out_row + h * head_dim);
}

/* Which code path decode attention takes in this build: 2 tiled on AVX512-BF16 pair dot products, 1 tiled on
 * AVX2 float32 vectors, 0 one row at a time in plain C. */
int decode_attention_path(void) { return HAS_BF16_DOT ? 2 : HAS_AVX2_TILE ? 1 : 0; }

/* The groups paged_decode_attention_bf16 forms for these sequences (its arguments of the same names): seqs[] the
 * sequences in group order, groups[3 x] .. groups[3 x + 2] group x's [begin, end) in seqs and its shared keys.
 * Returns the number of groups, or -1 where this build attends to each sequence alone (no tiled path). */
int decode_attention_groups(const int64_t *tables, int64_t table_stride, const int64_t *ctx, const int64_t *nq,
                            int64_t num_seqs, int64_t block_size, int64_t *seqs, int64_t *groups) {
#if HAS_BF16_DOT || HAS_AVX2_TILE
    FirstBlock *fb = malloc((size_t)(num_seqs > 0 ? num_seqs : 1) * sizeof(FirstBlock));
    if (!fb) return -1;
    const int64_t n = shared_groups(tables, table_stride, ctx, nq, num_seqs, block_size, fb, groups);
    for (int64_t i = 0; i < num_seqs; i++) seqs[i] = fb[i].seq;
    free(fb);
    return n;
#else
    (void)tables, (void)table_stride, (void)ctx, (void)nq, (void)num_seqs, (void)block_size, (void)seqs, (void)groups;
    return -1;
#endif
}

int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                uint16_t *out, const int64_t *q_rows, const int64_t *nq,
                                const int64_t *ctx, const int64_t *tables, int64_t table_stride, int64_t num_seqs,
                                int64_t num_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                float scale, int num_threads) {
    const int64_t group = num_heads / kv_heads;
    if (num_heads > MAX_HEADS || kv_heads * head_dim > MAX_ROW || head_dim > MAX_HEAD_DIM ||
        group * kv_heads != num_heads || block_size > MAX_BLOCK)
        return -1;
    int64_t rows = 0, work = 0, max_new = 1;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t k = nq ? nq[i] : 1;
        if (k < 1 || k > MAX_NEW || ctx[i] < k) return -1;
        rows += k;
        work += k * ctx[i];
        max_new = k > max_new ? k : max_new;
    }
    int64_t *first = malloc((size_t)(num_seqs + 1) * sizeof(int64_t)); /* each sequence's first output row */
    if (!first) return -1;
    first[0] = 0;
    for (int64_t i = 0; i < num_seqs; i++) first[i + 1] = first[i] + (nq ? nq[i] : 1);
    int rc = 0;
#if HAS_BF16_DOT || HAS_AVX2_TILE
    if (head_dim % TILED_DIM == 0) {
        /* Sequences whose tables start with the same blocks (a prompt prefix the prefix cache holds once) attend to
         * those keys together: groups of them, CHUNK_ROWS rows a task, go over the shared tiles once (each tile's K
         * transposed and V widened once for all their rows), then each sequence over the rest of its own context
         * with its rows' running softmax. Every row's arithmetic is the one it has alone (`attend_tiles`): grouping
         * changes no result. Groups: sequences sorted by first block, consecutive ones kept together while they
         * share at least MIN_SHARED_KEYS with the group's first. */
        FirstBlock *fb = malloc((size_t)num_seqs * sizeof(FirstBlock));
        int64_t *grp = malloc((size_t)(3 * num_seqs + 1) * sizeof(int64_t)); /* (begin, end, keys) into fb */
        if (!fb || !grp) {
            free(fb);
            free(grp);
            free(first);
            return -1;
        }
        const int64_t ngrp = shared_groups(tables, table_stride, ctx, nq, num_seqs, block_size, fb, grp);
        /* A run of a sequence's new tokens is cut so that there are about two tasks per thread when the sequences
         * alone are too few (one decode, one verify pass). */
        const int64_t base_tasks = num_seqs * kv_heads;
        int64_t split = base_tasks >= 2 * num_threads ? 1 : (2 * num_threads + base_tasks - 1) / base_tasks;
        int64_t run = (max_new + split - 1) / split;
        run = run < 1 ? 1 : run;
        /* Segments of fb: (begin, end, shared keys). Each group; and the sequences between groups, as one segment of
         * no shared keys when each sequence is one run (a task of several still fetches the next one's first keys
         * while one is attended), else as tasks (sequence, a run of its new tokens, KV head) of their own. */
        int64_t *seg = malloc((size_t)(3 * (2 * ngrp + 1)) * sizeof(int64_t));
        int64_t nseg = 0, nrun = 0, max_rows = run * group;
        if (seg)
            for (int64_t p = 0, x = 0; p < num_seqs;) {
                if (x < ngrp && grp[3 * x] == p) {
                    seg[3 * nseg] = p;
                    seg[3 * nseg + 1] = grp[3 * x + 1];
                    seg[3 * nseg + 2] = grp[3 * x + 2];
                    nseg++;
                    p = grp[3 * x + 1];
                    x++;
                    continue;
                }
                const int64_t stop = x < ngrp ? grp[3 * x] : num_seqs;
                if (split == 1) {
                    seg[3 * nseg] = p;
                    seg[3 * nseg + 1] = stop;
                    seg[3 * nseg + 2] = 0;
                    nseg++;
                } else {
                    for (int64_t q = p; q < stop; q++)
                        nrun += ((first[fb[q].seq + 1] - first[fb[q].seq]) + run - 1) / run;
                }
                p = stop;
            }
        /* Chunks of CHUNK_ROWS rows or more, one task each per KV head. */
        int64_t ntask = nrun * kv_heads;
        for (int64_t x = 0; x < nseg; x++) {
            int64_t rows_now = 0;
            for (int64_t p = seg[3 * x]; p < seg[3 * x + 1]; p++) {
                rows_now += (first[fb[p].seq + 1] - first[fb[p].seq]) * group;
                if (rows_now >= CHUNK_ROWS || p + 1 == seg[3 * x + 1]) {
                    ntask += kv_heads;
                    max_rows = rows_now > max_rows ? rows_now : max_rows;
                    rows_now = 0;
                }
            }
        }
        /* (sequence, j0, g, -1) or (begin, end, g, shared keys) of a chunk of a segment */
        int64_t *task = malloc((size_t)(4 * ntask + 4) * sizeof(int64_t));
        if (!task || !seg) {
            free(task);
            free(seg);
            free(fb);
            free(grp);
            free(first);
            return -1;
        }
        int64_t t = 0;
        for (int64_t x = 0; x < nseg; x++) {
            int64_t rows_now = 0, begin = seg[3 * x];
            for (int64_t p = seg[3 * x]; p < seg[3 * x + 1]; p++) {
                rows_now += (first[fb[p].seq + 1] - first[fb[p].seq]) * group;
                if (rows_now >= CHUNK_ROWS || p + 1 == seg[3 * x + 1]) {
                    for (int64_t g = 0; g < kv_heads; g++, t++) {
                        task[4 * t] = begin;
                        task[4 * t + 1] = p + 1;
                        task[4 * t + 2] = g;
                        task[4 * t + 3] = seg[3 * x + 2];
                    }
                    begin = p + 1;
                    rows_now = 0;
                }
            }
        }
        if (split > 1)
            for (int64_t p = 0, x = 0; p < num_seqs; p++) {
                while (x < ngrp && grp[3 * x + 1] <= p) x++;
                if (x < ngrp && grp[3 * x] <= p) continue; /* in a group */
                const int64_t i = fb[p].seq;
                for (int64_t j0 = 0; j0 < first[i + 1] - first[i]; j0 += run)
                    for (int64_t g = 0; g < kv_heads; g++, t++) {
                        task[4 * t] = i;
                        task[4 * t + 1] = j0;
                        task[4 * t + 2] = g;
                        task[4 * t + 3] = -1;
                    }
            }
        /* acc, running max and sum per row; attend_tiles' scratch (this build's) */
        const size_t per_thread = (size_t)(max_rows * (head_dim + 1 + L_LANES) + SCRATCH_FLOATS(max_rows, head_dim))
                                  * sizeof(float);
#pragma omp parallel num_threads(num_threads) if (ntask > 1 && work * num_heads > 2048)
        {
            float *work_buf = aligned_alloc(64, (per_thread + 63) / 64 * 64);
            RowRef *rows = malloc((size_t)max_rows * sizeof(RowRef));
#pragma omp for schedule(dynamic, 1)
            for (int64_t x = 0; x < ntask; x++) {
                if (!work_buf || !rows) continue;
                const int64_t g = task[4 * x + 2], keys = task[4 * x + 3];
                float *acc = work_buf, *m = acc + max_rows * head_dim, *l = m + max_rows,
                      *scratch = l + max_rows * L_LANES;
                if (keys < 0) {
                    const int64_t i = task[4 * x], j0 = task[4 * x + 1];
                    const int64_t k = first[i + 1] - first[i];
                    const int64_t j1 = j0 + run < k ? j0 + run : k;
                    const int64_t nr = seq_rows(rows, acc, m, l, q, q_rows[i], j0, j1, ctx[i], k, g, group,
                                                num_heads, head_dim);
                    attend_tiles_any(rows, nr, acc, m, l, 0, INT64_MAX, k_cache, v_cache, tables + i * table_stride,
                                     g, kv_heads, head_dim, block_size, scale, scratch);
                    store_task_rows(acc, l, nr, group, j0, g, num_heads, head_dim, q_rows[i], out);
                    continue;
                }
                const int64_t begin = task[4 * x], end = task[4 * x + 1];
                int64_t nr = 0;
                for (int64_t p = begin; p < end; p++) {
                    const int64_t i = fb[p].seq, k = first[i + 1] - first[i];
                    nr += seq_rows(rows + nr, acc + nr * head_dim, m + nr, l + nr * L_LANES, q, q_rows[i], 0, k,
                                   ctx[i], k, g, group, num_heads, head_dim);
                }
                if (keys > 0)
                    attend_tiles_any(rows, nr, acc, m, l, 0, keys, k_cache, v_cache,
                                     tables + fb[begin].seq * table_stride, g, kv_heads, head_dim, block_size, scale,
                                     scratch);
                int64_t r0 = 0;
                for (int64_t p = begin; p < end; p++) {
                    const int64_t i = fb[p].seq, k = first[i + 1] - first[i], nr_i = k * group;
                    if (p + 1 < end) /* the next sequence's first keys of its own, while this one's are attended */
                        prefetch_keys(k_cache, v_cache, tables + fb[p + 1].seq * table_stride, keys, TILE,
                                      ctx[fb[p + 1].seq], g, kv_heads * head_dim, head_dim, block_size);
                    attend_tiles_any(rows + r0, nr_i, acc + r0 * head_dim, m + r0, l + r0 * L_LANES, keys,
                                     INT64_MAX, k_cache, v_cache, tables + i * table_stride, g, kv_heads, head_dim,
                                     block_size, scale, scratch);
                    store_task_rows(acc + r0 * head_dim, l + r0 * L_LANES, nr_i, group, 0, g, num_heads, head_dim,
                                    q_rows[i], out);
                    r0 += nr_i;
                }
            }
            if (!work_buf || !rows) rc = -1;
            free(work_buf);
            free(rows);
        }
        free(task);
        free(seg);
        free(fb);
        free(grp);
        free(first);
        return rc;
    }
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (rows > 1 && work > 2048)
    for (int64_t x = 0; x < rows; x++) {
        int64_t i = 0;
        while (first[i + 1] <= x) i++;
        const int64_t k = first[i + 1] - first[i], j = x - first[i];
        const int64_t qrow = q_rows[i] + j;
        attend_row(q + qrow * num_heads * head_dim, k_cache, v_cache, ctx[i] - (k - 1 - j), tables + i * table_stride,
                   num_heads, kv_heads, head_dim, block_size, scale,
                   out + qrow * num_heads * head_dim);
    }
    free(first);
    return rc;
}

/* The index of each row's largest value (the first of equal ones) of float32 x [s, v], rows over the threads:
 * greedy sampling's choice (torch's argmax took ~1 ms for 64 rows of 49,152 logits on 2 threads; this ~0.2).
 * Returns 0, or -1 when a row holds a NaN (the caller then asks torch, whose argmax takes a NaN as the largest). */
int argmax_rows_f32(const float *x, int64_t s, int64_t v, int64_t *out, int num_threads) {
    int rc = 0;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (s * v >= 65536)
    for (int64_t r = 0; r < s; r++) {
        const float *row = x + r * v;
        float best = -INFINITY;
        int64_t at = 0, nan = 0;
#if defined(__AVX512F__)
        __m512 bv = _mm512_set1_ps(-INFINITY);
        __m512i bi = _mm512_setzero_si512();
        const __m512i step = _mm512_set1_epi32(16);
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 bad = 0;
        int64_t i = 0;
        for (; i + 16 <= v && v <= INT32_MAX; i += 16) {
            const __m512 a = _mm512_loadu_ps(row + i);
            const __mmask16 gt = _mm512_cmp_ps_mask(a, bv, _CMP_GT_OQ); /* strictly larger: each lane keeps its first */
            bad |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
            bv = _mm512_mask_mov_ps(bv, gt, a);
            bi = _mm512_mask_mov_epi32(bi, gt, idx);
            idx = _mm512_add_epi32(idx, step);
        }
        nan = bad != 0;
        float lanes[16];
        int32_t where[16];
        _mm512_storeu_ps(lanes, bv);
        _mm512_storeu_si512(where, bi);
        for (int j = 0; j < 16 && i > 0; j++)
            if (lanes[j] > best || (lanes[j] == best && where[j] < at)) {
                best = lanes[j];
                at = where[j];
            }
        for (; i < v; i++) {
            if (row[i] != row[i]) nan = 1;
            if (row[i] > best) {
                best = row[i];
                at = i;
            }
        }
#else
        for (int64_t i = 0; i < v; i++) {
            if (row[i] != row[i]) nan = 1;
            if (row[i] > best) {
                best = row[i];
                at = i;
            }
        }
#endif
        out[r] = at;
        if (nan) rc = -1; /* every thread writes the same value */
    }
    return rc;
}

/* Rotary embedding of a step's new q and k (HF rotate-half layout) and the write of their K and V rows into
 * the layer's arena, in one pass over the fused projection's output.
 *
 * qkv: [T, (num_heads + 2 * kv_heads) * head_dim] bf16 rows (q heads, then k heads, then v heads);
 * positions: [T]; cos, sin: float32 tables [max_len, head_dim]; q_out: [T, num_heads, head_dim] bf16;
 * k_cache, v_cache: the layer's arena seen as [slots, kv_heads, head_dim] bf16, token t written at row
 * slots[t]. Rotation in float32, rounded to bf16 once. */
int rope_write_kv_bf16(const uint16_t *qkv, const int64_t *positions, const float *cos_t, const float *sin_t,
                       uint16_t *q_out, uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots,
                       int64_t num_tokens, int64_t num_heads, int64_t kv_heads, int64_t head_dim, int num_threads) {
    if (head_dim % 2 || head_dim > MAX_HEAD_DIM) return -1;
    const int64_t half = head_dim / 2;
    const int64_t width = (num_heads + 2 * kv_heads) * head_dim;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_tokens >= 64)
    for (int64_t t = 0; t < num_tokens; t++) {
        const uint16_t *row = qkv + t * width;
        const float *c = cos_t + positions[t] * head_dim, *s = sin_t + positions[t] * head_dim;
        for (int64_t h = 0; h < num_heads + kv_heads; h++) {
            const uint16_t *src = row + h * head_dim;
            uint16_t *dst = h < num_heads ? q_out + (t * num_heads + h) * head_dim
                                          : k_cache + (slots[t] * kv_heads + (h - num_heads)) * head_dim;
            for (int64_t d = 0; d < half; d++) {
                const float a = bf16_to_f32(src[d]), b = bf16_to_f32(src[d + half]);
                dst[d] = f32_to_bf16(a * c[d] - b * s[d]);
                dst[d + half] = f32_to_bf16(b * c[d + half] + a * s[d + half]);
            }
        }
        memcpy(v_cache + slots[t] * kv_heads * head_dim, row + (num_heads + kv_heads) * head_dim,
               sizeof(uint16_t) * (size_t)(kv_heads * head_dim));
    }
    return 0;
}

/* The residual add and the RMS norm that follows it: x [T, hidden] float32 += delta (bf16, or NULL for
 * none); out [T, hidden] bf16 = x / sqrt(mean(x^2) + eps) * weight. */
int add_rms_norm_bf16(float *x, const uint16_t *delta, const float *weight, uint16_t *out, int64_t num_tokens,
                      int64_t hidden, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_tokens >= 64)
    for (int64_t t = 0; t < num_tokens; t++) {
        float *xr = x + t * hidden;
        float ss = 0.0f;
        if (delta) {
            const uint16_t *dr = delta + t * hidden;
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < hidden; i++) {
                xr[i] += bf16_to_f32(dr[i]);
                ss += xr[i] * xr[i];
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < hidden; i++) ss += xr[i] * xr[i];
        }
        const float r = 1.0f / sqrtf(ss / (float)hidden + eps);
        uint16_t *o = out + t * hidden;
        for (int64_t i = 0; i < hidden; i++) o[i] = f32_to_bf16(xr[i] * r * weight[i]);
    }
    return 0;
}

/* SiLU(gate) * up of the fused gate/up projection: gu [T, 2 * inter] bf16 (gate columns, then up), out
 * [T, inter] bf16, in float32 and rounded once. */
int silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t num_tokens, int64_t inter, int num_threads) {
    /* SiLU(a) = a * sigmoid(a), sigmoid from e = exp(-|a|) <= 1 (exp_nonpos vectorises; expf does not):
     * 1 / (1 + e) for a >= 0, e / (1 + e) below. Rows are split in column chunks so a decode step's few rows
     * still use every thread. */
    const int64_t chunk = 512;
    const int64_t per_row = (inter + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_tokens * inter >= 8192)
    for (int64_t job = 0; job < num_tokens * per_row; job++) {
        const int64_t t = job / per_row, i0 = (job % per_row) * chunk;
        const int64_t i1 = i0 + chunk < inter ? i0 + chunk : inter;
        const uint16_t *g = gu + t * 2 * inter, *u = g + inter;
        uint16_t *o = out + t * inter;
#pragma omp simd
        for (int64_t i = i0; i < i1; i++) {
            const float a = bf16_to_f32(g[i]);
            const float e = exp_nonpos(a < 0.0f ? a : -a);
            const float sig = (a < 0.0f ? e : 1.0f) / (1.0f + e);
            o[i] = f32_to_bf16(a * sig * bf16_to_f32(u[i]));
        }
    }
    return 0;
}

/* ---- int8 matrix-vector product for the few rows of a decode step (AVX512-VNNI) ----
 *
 * y[r, n] = sum_k x[r, k] * w[n, k] for up to MAX_M rows of bf16 x and an int8 weight quantized by groups of
 * 32 along k (GGUF Q8_0: codes [N, K] int8, value = code * scale[n, g]; the default model's tied embedding
 * and LM head), as the int8 dot-product instruction computes it: each group of 32 elements of x is quantized
 * to int8 with its own scale (amax / 127), the group's integer dot product with the codes is exact, and is
 * scaled by (weight scale * x scale) in float32. The weight's bytes are read once for all rows of x. The
 * instruction multiplies unsigned by signed bytes: x goes in as xq + 128, and 128 * sum(codes of the group)
 * comes back out through `scaled_sums` = scale[n, g] * sum(codes[n, g]), computed once per weight by the
 * caller. (For int4 weights the same scheme measured no faster than aten's int4pack kernel, with twice its
 * error: they stay with aten.) Without AVX512-VNNI it returns -1 and the caller uses torch's kernels. */

#define MAX_M 8
#define MAX_K 16384

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAS_VNNI 1
#else
#define HAS_VNNI 0
#endif

int q8_gemv_available(void) { return HAS_VNNI; }

#if HAS_VNNI
/* Quantize one row of x by groups of 32: q[k] int8, sx[g] the group's scale. */
static void quantize_row(const uint16_t *x, int64_t k, int8_t *q, float *sx) {
    for (int64_t g = 0; g < k / 32; g++) {
        float amax = 0.0f, v[32];
        for (int j = 0; j < 32; j++) {
            v[j] = bf16_to_f32(x[g * 32 + j]);
            const float a = v[j] < 0 ? -v[j] : v[j];
            amax = a > amax ? a : amax;
        }
        const float s = amax / 127.0f;
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        for (int j = 0; j < 32; j++) q[g * 32 + j] = (int8_t)__builtin_lrintf(v[j] * inv);
        sx[g] = s;
    }
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

int q8_gemv_bf16(const uint16_t *x, const int8_t *codes, const float *scale, const float *scaled_sums, uint16_t *y,
                 int64_t m, int64_t n, int64_t k, int num_threads) {
#if HAS_VNNI
    if (m < 1 || m > MAX_M || k % 64 || k > MAX_K) return -1;
    const int64_t groups = k / 32;
    uint8_t xu[MAX_M][MAX_K] __attribute__((aligned(64)));
    float sx[MAX_M][MAX_K / 32];
    for (int64_t r = 0; r < m; r++) {
        int8_t q[MAX_K];
        quantize_row(x + r * k, k, q, sx[r]);
        for (int64_t i = 0; i < k; i++) xu[r][i] = (uint8_t)(q[i] + 128);
    }
    const __m512i pair_lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n * k >= 65536)
    for (int64_t row = 0; row < n; row++) {
        const int8_t *c = codes + row * k;
        const float *d = scale + row * groups;
        const float *ss = scaled_sums + row * groups;
        __m512 acc[MAX_M];
        for (int64_t r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t p = 0; p < groups / 2; p++) {
            const __m512i w = _mm512_loadu_si512((const void *)(c + p * 64));
            const __m512 dv = _mm512_permutexvar_ps(pair_lanes, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(d + 2 * p)))));
            for (int64_t r = 0; r < m; r++) {
                const __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                                      _mm512_load_si512((const void *)(xu[r] + p * 64)), w);
                const __m512 s = _mm512_mul_ps(dv, _mm512_permutexvar_ps(pair_lanes,
                                 _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(sx[r] + 2 * p))))));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc[r]);
            }
        }
        for (int64_t r = 0; r < m; r++) {
            float corr = 0.0f;
            const float *sxr = sx[r];
#pragma omp simd reduction(+ : corr)
            for (int64_t g = 0; g < groups; g++) corr += ss[g] * sxr[g];
            const float v = hsum(acc[r]) - 128.0f * corr;
            y[r * n + row] = f32_to_bf16(v);
        }
    }
    return 0;
#else
    (void)x; (void)codes; (void)scale; (void)scaled_sums; (void)y; (void)m; (void)n; (void)k; (void)num_threads;
    return -1;
#endif
}

/* ---- int8 matrix product with the outputs in the lanes (AVX512-VNNI) ----
 *
 * The same product and x quantization as q8_gemv_bf16, for up to Q8T_MAX_M rows of x, on the weight in a tiled
 * layout (`q8t_pack` of kernels/native.py, built once): tiles of 16 weight rows; per tile and group of 32 k, eight
 * 64-byte chunks of 4 k, the 4 codes of row i (k = 32 g + 4 c .. + 3) in bytes 4 i .. 4 i + 3. One vpdpbusd then
 * multiplies 16 rows' 4 codes by the same 4 bytes of x broadcast to every lane: the lanes are the outputs, each
 * loaded chunk serves every row of x, and nothing is summed across lanes. Per tile and group, dss holds the 16
 * scales d, then 128 * d * (the group's sum of codes) for each row: x goes in as xq + 128 (the instruction's
 * unsigned operand), so y = sum_g sx[g] * (d * isum - 128 d sum(codes)). Threads split the tiles. Returns -1 when
 * a dimension is outside the bounds or the CPU has no AVX512-VNNI and AVX512-BF16 (its rounding to bf16). */
#define Q8T_MAX_M 64
#if HAS_VNNI && defined(__AVX512BF16__)
#define HAS_Q8T 1
#else
#define HAS_Q8T 0
#endif

int q8t_available(void) { return HAS_Q8T; }

int q8t_gemm_fits(int64_t m, int64_t n, int64_t k) {
    return HAS_Q8T && m >= 1 && m <= Q8T_MAX_M && n >= 1 && k >= 32 && k % 32 == 0 && k <= MAX_K;
}

#if HAS_Q8T
/* TN tiles from col0 against rows r0 .. r0 + MB - 1 of x (xu: x's codes + 128, sx: their scales). SPLIT: two
 * chains of integer sums per tile and row. */
static inline __attribute__((always_inline)) void q8t_block(
    const int8_t *codes, const float *dss, const uint8_t *xu, const float *sx, int64_t groups, int64_t n,
    int64_t col0, int64_t r0, const int TN, const int MB, const int SPLIT, uint16_t *y) {
    const int64_t k = groups * 32, tstride = groups * 512;
    __m512 acc[4][8];
    __m512i ia[4][8], ib[4][8];
    for (int t = 0; t < TN; t++)
        for (int r = 0; r < MB; r++) acc[t][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        for (int t = 0; t < TN; t++) {
            const char *nc = (const char *)(codes + (TN + t) * tstride + g * 512);
            for (int c = 0; c < 8; c++) _mm_prefetch(nc + 64 * c, _MM_HINT_T0);
            _mm_prefetch((const char *)(dss + (TN + t) * groups * 32 + g * 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(dss + (TN + t) * groups * 32 + g * 32 + 16), _MM_HINT_T0);
        }
        for (int t = 0; t < TN; t++)
            for (int r = 0; r < MB; r++) {
                ia[t][r] = _mm512_setzero_si512();
                if (SPLIT) ib[t][r] = _mm512_setzero_si512();
            }
        for (int c = 0; c < 8; c++)
            for (int t = 0; t < TN; t++) {
                const __m512i w = _mm512_loadu_si512((const void *)(codes + t * tstride + g * 512 + c * 64));
                for (int r = 0; r < MB; r++) {
                    int32_t four;
                    __builtin_memcpy(&four, xu + (r0 + r) * k + g * 32 + c * 4, sizeof four);
                    if (SPLIT && (c & 1))
                        ib[t][r] = _mm512_dpbusd_epi32(ib[t][r], _mm512_set1_epi32(four), w);
                    else
                        ia[t][r] = _mm512_dpbusd_epi32(ia[t][r], _mm512_set1_epi32(four), w);
                }
            }
        for (int t = 0; t < TN; t++) {
            const __m512 d = _mm512_loadu_ps(dss + t * groups * 32 + g * 32);
            const __m512 s128 = _mm512_loadu_ps(dss + t * groups * 32 + g * 32 + 16);
            for (int r = 0; r < MB; r++) {
                const __m512i is = SPLIT ? _mm512_add_epi32(ia[t][r], ib[t][r]) : ia[t][r];
                const __m512 v = _mm512_fmsub_ps(d, _mm512_cvtepi32_ps(is), s128);
                acc[t][r] = _mm512_fmadd_ps(v, _mm512_set1_ps(sx[(r0 + r) * groups + g]), acc[t][r]);
            }
        }
    }
    store_tiles_bf16(y, n, col0, r0, acc, TN, MB);
}

/* One tile against every row of x: blocks of 8 rows, the last block's size a constant. */
static void q8t_tile(const int8_t *cb, const float *db, const uint8_t *xu, const float *sx, int64_t groups,
                     int64_t n, int64_t col0, int64_t m, uint16_t *y) {
    int64_t r0 = 0;
    for (; r0 + 8 <= m; r0 += 8) q8t_block(cb, db, xu, sx, groups, n, col0, r0, 1, 8, 0, y);
    switch (m - r0) {
    case 1: q8t_block(cb, db, xu, sx, groups, n, col0, r0, 1, 1, 1, y); break;
    case 2: q8t_block(cb, db, xu, sx, groups, n, col0, r0, 1, 2, 1, y); break;
    case 3: q8t_block(cb, db, xu, sx, groups, n, col0, r0, 1, 3, 1, y); break;
    case 4: q8t_block(cb, db, xu, sx, groups, n, col0, r0, 1, 4, 0, y); break;
    case 5: q8t_block(cb, db, xu, sx, groups, n, col0, r0, 1, 5, 0, y); break;
    case 6: q8t_block(cb, db, xu, sx, groups, n, col0, r0, 1, 6, 0, y); break;
    case 7: q8t_block(cb, db, xu, sx, groups, n, col0, r0, 1, 7, 0, y); break;
    default: break;
    }
}
#endif

int q8t_gemm_bf16(const uint16_t *x, const int8_t *codes, const float *dss, uint16_t *y, int64_t m, int64_t n,
                  int64_t k, int num_threads) {
#if HAS_Q8T
    if (!q8t_gemm_fits(m, n, k) || num_threads < 1) return -1;
    const int64_t groups = k / 32, tiles = (n + 15) / 16;
    uint8_t *xu = aligned_alloc(64, (size_t)((m * k + 63) / 64 * 64));
    float *sx = malloc(sizeof(float) * (size_t)(m * groups));
    int8_t *q = malloc((size_t)k);
    if (xu == NULL || sx == NULL || q == NULL) {
        free(xu);
        free(sx);
        free(q);
        return -1;
    }
    for (int64_t r = 0; r < m; r++) {
        quantize_row(x + r * k, k, q, sx + r * groups);
        for (int64_t i = 0; i < k; i++) xu[r * k + i] = (uint8_t)(q[i] + 128);
    }
    free(q);
    /* Enough independent sums in flight: up to four rows take two tiles a pass (two chains each for one or two
     * rows), more one tile and blocks of 8 rows. */
    const int64_t tn = m <= 4 ? 2 : 1;
    const int64_t blocks = (tiles + tn - 1) / tn;
    steal_range ranges[STEAL_MAX_THREADS];
    const int parts = steal_init(ranges, num_threads, blocks);
#pragma omp parallel num_threads(num_threads) if (n * k >= 65536)
    {
        const int id = omp_get_thread_num();
        int64_t b;
        while ((b = steal_next(ranges, parts, id, NULL)) >= 0) {
            const int64_t t0 = b * tn, col0 = 16 * t0;
            const int8_t *cb = codes + t0 * groups * 512;
            const float *db = dss + t0 * groups * 32;
            if (tiles - t0 >= tn && tn == 2 && m == 1)
                q8t_block(cb, db, xu, sx, groups, n, col0, 0, 2, 1, 1, y);
            else if (tiles - t0 >= tn && tn == 2 && m == 2)
                q8t_block(cb, db, xu, sx, groups, n, col0, 0, 2, 2, 1, y);
            else if (tiles - t0 >= tn && tn == 2 && m == 3)
                q8t_block(cb, db, xu, sx, groups, n, col0, 0, 2, 3, 0, y);
            else if (tiles - t0 >= tn && tn == 2)
                q8t_block(cb, db, xu, sx, groups, n, col0, 0, 2, 4, 0, y);
            else
                for (int64_t t = t0; t < t0 + tn && t < tiles; t++)
                    q8t_tile(codes + t * groups * 512, dss + t * groups * 32, xu, sx, groups, n, 16 * t, m, y);
        }
    }
    free(xu);
    free(sx);
    return 0;
#else
    (void)x; (void)codes; (void)dss; (void)y; (void)m; (void)n; (void)k; (void)num_threads;
    return -1;
#endif
}

/* ---- exact logits for each row's leading candidates (an int8 head with groups of 32) ----
 *
 * logits [S, V] float32 (from a bf16 or int8-activation product) are replaced, at each row's k largest entries
 * (k <= REFINE_MAX_K; ties keep the lower index), by the float32 dot product of hidden [S, H] float32 with the
 * dequantized weight row (code * scale, each rounded to float32, as the torch path dequantizes them): greedy
 * choices and top logprobs then follow the float32 model. One pass over each row keeps a sorted list of k (blocks
 * of 32 whose largest is not above the smallest kept are skipped whole; a NaN is never kept). Rows go to threads. Returns -1 when k or the dimensions are outside the bounds. */
#define REFINE_MAX_K 64

/* Whether any of the 32 floats at p is above t (a NaN is not: ordered comparisons), in two or four vector compares:
 * refine_top_q8's scan spends its time here, skipping blocks below its kept candidates (a block max reduced in scalar
 * code took ~35 us a 49,152-logit row). */
static inline int any_above32(const float *p, float t) {
#if defined(__AVX512F__)
    const __m512 tv = _mm512_set1_ps(t);
    return (_mm512_cmp_ps_mask(_mm512_loadu_ps(p), tv, _CMP_GT_OQ) |
            _mm512_cmp_ps_mask(_mm512_loadu_ps(p + 16), tv, _CMP_GT_OQ)) != 0;
#elif defined(__AVX2__)
    const __m256 tv = _mm256_set1_ps(t);
    const __m256 a = _mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), tv, _CMP_GT_OQ),
                                  _mm256_cmp_ps(_mm256_loadu_ps(p + 8), tv, _CMP_GT_OQ));
    const __m256 b = _mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 16), tv, _CMP_GT_OQ),
                                  _mm256_cmp_ps(_mm256_loadu_ps(p + 24), tv, _CMP_GT_OQ));
    return _mm256_movemask_ps(_mm256_or_ps(a, b)) != 0;
#else
    for (int i = 0; i < 32; i++)
        if (p[i] > t) return 1;
    return 0;
#endif
}

/* One row: its k largest logits (row [V] float32) replaced by the exact products of h [hdim]. */
static void refine_row(float *row, const float *h, const int8_t *codes, const float *scales, int64_t vocab,
                       int64_t hdim, int64_t groups, int64_t k) {
    float tv[REFINE_MAX_K];
    int64_t ti[REFINE_MAX_K];
    int64_t n = 0; /* tv[0 .. n) ascending: tv[0] the smallest kept */
    for (int64_t j = 0; j < vocab; j++) {
        if (n == k && (j & 31) == 0) { /* skip blocks of 32 with nothing above the kept */
            while (j + 32 <= vocab && !any_above32(row + j, tv[0])) j += 32;
            if (j >= vocab) break;
        }
        const float v = row[j];
        if (v != v || (n == k && !(v > tv[0]))) continue; /* a NaN, or not above the smallest kept */
        int64_t p;
        if (n < k) { /* insert into the first n, keeping them ascending */
            p = n++;
            while (p > 0 && tv[p - 1] >= v) {
                tv[p] = tv[p - 1];
                ti[p] = ti[p - 1];
                p--;
            }
        } else { /* drop tv[0], insert v */
            p = 0;
            while (p + 1 < k && tv[p + 1] < v) {
                tv[p] = tv[p + 1];
                ti[p] = ti[p + 1];
                p++;
            }
        }
        tv[p] = v;
        ti[p] = j;
    }
    for (int64_t c = 0; c < n; c++) {
        const int8_t *q = codes + ti[c] * hdim;
        const float *sc = scales + ti[c] * groups;
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            float part = 0.0f;
#pragma omp simd reduction(+ : part)
            for (int i = 0; i < 32; i++) part += h[g * 32 + i] * ((float)q[g * 32 + i] * sc[g]);
            acc += part;
        }
        row[ti[c]] = acc;
    }
}

int refine_top_q8(float *logits, const float *hidden, const int8_t *codes, const float *scales, int64_t s,
                  int64_t vocab, int64_t hdim, int64_t k, int num_threads) {
    if (k < 1 || k > REFINE_MAX_K || k > vocab || hdim < 32 || hdim % 32 || s < 1 || num_threads < 1) return -1;
    const int64_t groups = hdim / 32;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (s >= 2)
    for (int64_t r = 0; r < s; r++) refine_row(logits + r * vocab, hidden + r * hdim, codes, scales, vocab, hdim, groups, k);
    return 0;
}

/* The same from the head's bf16 logits [S, V]: each row widened to float32 into out [S, V], then refined while it
 * is still in cache (one pass over the bf16 row instead of a conversion of all rows and a second read of each). */
int refine_top_q8_bf16(float *out, const uint16_t *logits, const float *hidden, const int8_t *codes,
                       const float *scales, int64_t s, int64_t vocab, int64_t hdim, int64_t k, int num_threads) {
    if (k < 1 || k > REFINE_MAX_K || k > vocab || hdim < 32 || hdim % 32 || s < 1 || num_threads < 1) return -1;
    const int64_t groups = hdim / 32;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (s >= 2)
    for (int64_t r = 0; r < s; r++) {
        float *row = out + r * vocab;
        const uint16_t *src = logits + r * vocab;
#pragma omp simd
        for (int64_t j = 0; j < vocab; j++) row[j] = bf16_to_f32(src[j]);
        refine_row(row, hidden + r * hdim, codes, scales, vocab, hdim, groups, k);
    }
    return 0;
}

/* ---- segmented LoRA for decode-sized segments ----
 *
 * y[t, :] += expand(shrink(x[t, :])) for every row t of each segment, with the segment's adapter weights:
 * x [T, in] bf16, y [T, out] bf16 updated in place (one rounding). Segment s covers rows [starts[s], ends[s])
 * and reads A^T ([in, r_s], r_s = sum_j ranks[s * nslices + j]) at a_ptrs[s] and B^T ([r_s, out]) at
 * b_ptrs[s], float32 (sgmv_f32w_bf16) or bfloat16 (sgmv_bf16w_bf16: half the bytes to stream, which is what a
 * decode step's LoRA costs when each adapter has a few rows; products exact and sums float32; where the CPU has
 * AVX512-BF16 both products run as bf16 pair dot products, x as given and the rank-sized intermediate rounded to
 * bf16 for the expand, as a bf16 model rounds it and as the kernel for prompt-sized segments does). B^T is block
 * diagonal: output slice j (outs[j] columns, in order) is fed by the next ranks[s * nslices + j] rank rows; the
 * zero blocks are never read. The rows are taken in blocks of up to SGMV_ROWS of one segment, each weight read
 * feeding every row of its block; threads take blocks (one adapter's whole decode batch is spread over every
 * thread). Returns -1 when a dimension is beyond the fixed bounds. */

#define MAX_RANK 1024
#define MAX_IN 16384
#define MAX_OUT 65536
#define MAX_SLICES 8
#define SGMV_ROWS 8 /* rows of one segment that share each weight read */
#define SGMV_AHEAD 2 /* rows of B^T ahead that the AVX2 decode blocks prefetch */
#define SGMV_ACC 4096 /* float32 sums an expand keeps in L1 (AVX2): R rows of 4096 / R columns */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAS_SGMV_AVX512 1
#define HAS_SGMV_AVX2 0
#define SGMV_LONG_ROWS SGMV_ROWS /* rows of a long segment's blocks */
#elif defined(__AVX2__) && defined(__FMA__)
#define HAS_SGMV_AVX512 0
#define HAS_SGMV_AVX2 1
#define SGMV_LONG_ROWS 6 /* AVX2's 16 registers: 6 rows x 16 columns of sums */
#else
#define HAS_SGMV_AVX512 0
#define HAS_SGMV_AVX2 0
#define SGMV_LONG_ROWS SGMV_ROWS
#endif

#if HAS_SGMV_AVX512
/* 16 weights (fewer where m says) as float32, from float32 or bfloat16 storage */
static inline __attribute__((always_inline)) __m512 sgmv_load(const void *w, int64_t at, __mmask16 m, const int wbf16) {
    if (wbf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + at);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)w + at);
}

/* y[0:16] (m lanes) += v, rounded to bf16 as f32_to_bf16 does (nearest even, NaN stays NaN) */
static inline void sgmv_add_store(uint16_t *y, __m512 v, __mmask16 m) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, y);
    const __m512 s = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)), v);
    const __m512i u = _mm512_castps_si512(s);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_mask_storeu_epi16(y, m, _mm512_cvtepi32_epi16(r));
}

static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* tmp[q][r0 : r0 + 16 * RT] = xf[q] @ A^T[:, r0 : r0 + 16 * RT] for the R rows (masked past r_total) */
static inline __attribute__((always_inline)) void sgmv_shrink(const float *xf, const void *a, int64_t in_dim,
                                                              int64_t r_total, int64_t r0, float *tmp, const int R,
                                                              const int RT, const int wbf16) {
    __mmask16 m[12];
    __m512 acc[SGMV_ROWS][12];
#pragma GCC unroll 12
    for (int k = 0; k < RT; k++) m[k] = lanes(r_total - r0 - 16 * k);
#pragma GCC unroll 8
    for (int q = 0; q < R; q++)
#pragma GCC unroll 12
        for (int k = 0; k < RT; k++) acc[q][k] = _mm512_setzero_ps();
    const int64_t esize = wbf16 ? 2 : 4;
    for (int64_t i = 0; i < in_dim; i++) {
        /* the rows a few iterations ahead: short strided runs that the hardware prefetcher does not see coming */
        const char *ahead = (const char *)a + ((i + 16) * r_total + r0) * esize;
        if (i + 16 < in_dim)
            for (int64_t off = 0; off < 16 * RT * esize; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
        __m512 xv[SGMV_ROWS];
#pragma GCC unroll 8
        for (int q = 0; q < R; q++) xv[q] = _mm512_set1_ps(xf[q * in_dim + i]);
#pragma GCC unroll 12
        for (int k = 0; k < RT; k++) {
            const __m512 av = sgmv_load(a, i * r_total + r0 + 16 * k, m[k], wbf16);
#pragma GCC unroll 8
            for (int q = 0; q < R; q++) acc[q][k] = _mm512_fmadd_ps(xv[q], av, acc[q][k]);
        }
    }
#pragma GCC unroll 8
    for (int q = 0; q < R; q++)
#pragma GCC unroll 12
        for (int k = 0; k < RT; k++) _mm512_mask_storeu_ps(tmp + q * MAX_RANK + r0 + 16 * k, m[k], acc[q][k]);
}

#if defined(__AVX512BF16__)
/* The lanes of a chunk of 32 values with n left (every one, some, none). */
static inline __mmask32 lanes32(int64_t n) {
    return n >= 32 ? (__mmask32)0xffffffffu : n <= 0 ? 0 : (__mmask32)((1u << n) - 1u);
}

/* One step of the pair products: rows w0 and w0 + stride (the second none where `pair` is 0: an odd count's last
 * row) over C chunks of 32 values, interleaved word by word (an unpack pairs words within 128-bit lanes), against
 * each of the R rows' broadcast bf16 pair v[q]: chunk c's sums go to acc[q][2c] (its values 0-3, 8-11, 16-19,
 * 24-27) and acc[q][2c + 1] (4-7, 12-15, 20-23, 28-31; `pairs_in_order` puts them back). Loads unmasked where
 * `full`, else masked by m[c] (zero past the end). The two rows `ahead` values on are fetched meanwhile (0: none):
 * short strided runs that the hardware prefetcher does not see coming. */
static inline __attribute__((always_inline)) void pairs_step(__m512 acc[SGMV_ROWS][12], const uint16_t *w0,
                                                             int64_t stride, int pair, const __mmask32 *m, int full,
                                                             const __m512bh *v, int64_t ahead, const int R,
                                                             const int C) {
    const uint16_t *w1 = w0 + stride;
    if (ahead)
        for (int64_t off = 0; off < 64 * C; off += 64) {
            _mm_prefetch((const char *)(w0 + ahead) + off, _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + ahead) + off, _MM_HINT_T0);
        }
#pragma GCC unroll 6
    for (int c = 0; c < C; c++) {
        const __m512i v0 = full ? _mm512_loadu_si512(w0 + 32 * c) : _mm512_maskz_loadu_epi16(m[c], w0 + 32 * c);
        const __m512i v1 = !pair ? _mm512_setzero_si512()
                           : full ? _mm512_loadu_si512(w1 + 32 * c) : _mm512_maskz_loadu_epi16(m[c], w1 + 32 * c);
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(v0, v1), hi = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
#pragma GCC unroll 8
        for (int q = 0; q < R; q++) {
            acc[q][2 * c] = _mm512_dpbf16_ps(acc[q][2 * c], lo, v[q]);
            acc[q][2 * c + 1] = _mm512_dpbf16_ps(acc[q][2 * c + 1], hi, v[q]);
        }
    }
}

/* A chunk's two sums from `pairs_step` as its values 0-15 (*first) and 16-31 (*second), in order. */
static inline __attribute__((always_inline)) void pairs_in_order(__m512 lo, __m512 hi, __m512 *first,
                                                                 __m512 *second) {
    const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    *first = _mm512_permutex2var_ps(lo, i0, hi);
    *second = _mm512_permutex2var_ps(lo, i1, hi);
}

/* tmp[q][r0 : r0 + 32 * RC] = x[q] @ A^T[:, r0 : r0 + 32 * RC] for the R rows from bf16 weights, by pair dot
 * products (`pairs_step`): rows i and i + 1 of A^T against x's pair (x[q][i], x[q][i + 1]) broadcast (xb: the
 * block's nb rows of bf16; rows past nb read row 0, never stored). The products are exact in float32 as the
 * float32 path's are; the sums pair two products a step. Ranks past r_total: masked loads (zero) and stores. */
static inline __attribute__((always_inline)) void sgmv_shrink_pairs(const uint16_t *xb, int64_t nb, const void *a,
                                                                    int64_t in_dim, int64_t r_total, int64_t r0,
                                                                    float *tmp, const int R, const int RC) {
    const uint16_t *w = (const uint16_t *)a;
    __mmask32 m[6];
    __m512 acc[SGMV_ROWS][12];
    const uint16_t *xr[SGMV_ROWS];
#pragma GCC unroll 8
    for (int q = 0; q < R; q++) xr[q] = xb + (q < nb ? q : 0) * in_dim;
#pragma GCC unroll 6
    for (int c = 0; c < RC; c++) m[c] = lanes32(r_total - r0 - 32 * c);
#pragma GCC unroll 8
    for (int q = 0; q < R; q++)
#pragma GCC unroll 12
        for (int k = 0; k < 2 * RC; k++) acc[q][k] = _mm512_setzero_ps();
    const int full = r_total - r0 >= 32 * RC;
    for (int64_t i = 0; i < in_dim; i += 2) {
        const int pair = i + 1 < in_dim;
        __m512bh xv[SGMV_ROWS];
#pragma GCC unroll 8
        for (int q = 0; q < R; q++) {
            uint32_t two;
            if (pair) __builtin_memcpy(&two, xr[q] + i, sizeof two);
            else two = xr[q][i];
            xv[q] = (__m512bh)_mm512_set1_epi32((int)two);
        }
        pairs_step(acc, w + i * r_total + r0, r_total, pair, m, full, xv, i + 16 < in_dim ? 16 * r_total : 0, R,
                   RC);
    }
#pragma GCC unroll 8
    for (int q = 0; q < R; q++)
#pragma GCC unroll 6
        for (int c = 0; c < RC; c++) {
            float *t = tmp + q * MAX_RANK + r0 + 32 * c;
            __m512 first, second;
            pairs_in_order(acc[q][2 * c], acc[q][2 * c + 1], &first, &second);
            _mm512_mask_storeu_ps(t, (__mmask16)m[c], first);
            _mm512_mask_storeu_ps(t + 16, (__mmask16)(m[c] >> 16), second);
        }
}

/* y[q][c0 : c0 + nc] += tmp[q][r0 : r1] @ B^T[r0 : r1, c0 : c0 + nc] for the nb of the R rows from bf16 weights, by
 * pair dot products (`pairs_step`): rows r and r + 1 of B^T against the pair of the row's sums rounded to bf16 (as
 * a bf16 model's LoRA rounds its intermediate); 32 * CC columns a pass, put back in order when added to y. */
static inline __attribute__((always_inline)) void sgmv_expand_pairs(const float *tmp, uint16_t *y, int64_t nb,
                                                                    const void *b, int64_t out_dim, int64_t r0,
                                                                    int64_t r1, int64_t c0, int64_t nc, const int R,
                                                                    const int CC) {
    const uint16_t *w = (const uint16_t *)b;
    uint16_t tb[SGMV_ROWS][MAX_RANK + 1]; /* the sums in bf16, a zero past r1 for an odd count */
#pragma GCC unroll 8
    for (int q = 0; q < R; q++) {
        int64_t r = r0;
        for (; r + 16 <= r1; r += 16)
            _mm256_storeu_si256((__m256i *)(tb[q] + r - r0),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(tmp + q * MAX_RANK + r)));
        for (; r < r1; r++) tb[q][r - r0] = f32_to_bf16(tmp[q * MAX_RANK + r]);
        tb[q][r1 - r0] = 0;
    }
    for (int64_t cb = 0; cb < nc; cb += 32 * CC) {
        __mmask32 m[4];
        __m512 acc[SGMV_ROWS][12];
#pragma GCC unroll 4
        for (int c = 0; c < CC; c++) m[c] = lanes32(nc - cb - 32 * c);
        const int full = nc - cb >= 32 * CC;
#pragma GCC unroll 8
        for (int q = 0; q < R; q++)
#pragma GCC unroll 8
            for (int k = 0; k < 2 * CC; k++) acc[q][k] = _mm512_setzero_ps();
        for (int64_t r = r0; r < r1; r += 2) {
            __m512bh tv[SGMV_ROWS];
#pragma GCC unroll 8
            for (int q = 0; q < R; q++) {
                uint32_t two;
                __builtin_memcpy(&two, tb[q] + r - r0, sizeof two);
                tv[q] = (__m512bh)_mm512_set1_epi32((int)two);
            }
            pairs_step(acc, w + r * out_dim + c0 + cb, out_dim, r + 1 < r1, m, full, tv, r + 8 < r1 ? 8 * out_dim : 0,
                       R, CC);
        }
#pragma GCC unroll 8
        for (int64_t q = 0; q < nb; q++)
#pragma GCC unroll 4
            for (int c = 0; c < CC; c++) {
                uint16_t *dst = y + q * out_dim + c0 + cb + 32 * c;
                __m512 first, second;
                pairs_in_order(acc[q][2 * c], acc[q][2 * c + 1], &first, &second);
                if ((__mmask16)m[c]) sgmv_add_store(dst, first, (__mmask16)m[c]);
                if ((__mmask16)(m[c] >> 16)) sgmv_add_store(dst + 16, second, (__mmask16)(m[c] >> 16));
            }
    }
}
#define SGMV_PAIRS 1
#else
#define SGMV_PAIRS 0
#endif

/* One block of R rows (a constant: 2, 4 or 8; xf holds them as float32): tmp = xf @ A^T in passes of up to
 * 16 * MAX_RT ranks (each pass as many 16-rank tiles as the ranks left need), then y += tmp @ B^T in tiles of
 * 16 * CT columns of each slice. The accumulators (R per tile) stay in registers: enough independent chains to
 * hide the FMA latency, and no work on ranks past r_total. */
static inline __attribute__((always_inline)) void sgmv_block(
    const float *xf, const uint16_t *xb, uint16_t *y, int64_t nb, const void *a, const void *b, const int64_t *rk,
    int64_t nslices,
    const int64_t *outs, int64_t in_dim, int64_t out_dim, int64_t r_total, float *tmp, const int R, const int MAX_RT,
    const int CT, const int wbf16) {
#if SGMV_PAIRS
    if (wbf16 && xb != NULL) {
        for (int64_t r0 = 0; r0 < r_total;) {
            const int64_t chunks = (r_total - r0 + 31) / 32;
            if (chunks >= 6 && MAX_RT >= 12) {
                sgmv_shrink_pairs(xb, nb, a, in_dim, r_total, r0, tmp, R, 6);
                r0 += 192;
            } else if (chunks >= 4 && MAX_RT >= 8) {
                sgmv_shrink_pairs(xb, nb, a, in_dim, r_total, r0, tmp, R, 4);
                r0 += 128;
            } else if (chunks >= 3 && MAX_RT >= 6) {
                sgmv_shrink_pairs(xb, nb, a, in_dim, r_total, r0, tmp, R, 3);
                r0 += 96;
            } else if (chunks >= 2 && MAX_RT >= 4) {
                sgmv_shrink_pairs(xb, nb, a, in_dim, r_total, r0, tmp, R, 2);
                r0 += 64;
            } else {
                sgmv_shrink_pairs(xb, nb, a, in_dim, r_total, r0, tmp, R, 1);
                r0 += 32;
            }
        }
    }
#endif
    for (int64_t r0 = (SGMV_PAIRS && wbf16 && xb != NULL) ? r_total : 0; r0 < r_total;) {
        const int64_t tiles = (r_total - r0 + 15) / 16;
        if (tiles >= 12 && MAX_RT >= 12) {
            sgmv_shrink(xf, a, in_dim, r_total, r0, tmp, R, 12, wbf16);
            r0 += 192;
        } else if (tiles >= 8 && MAX_RT >= 8) {
            sgmv_shrink(xf, a, in_dim, r_total, r0, tmp, R, 8, wbf16);
            r0 += 128;
        } else if (tiles >= 6 && MAX_RT >= 6) {
            sgmv_shrink(xf, a, in_dim, r_total, r0, tmp, R, 6, wbf16);
            r0 += 96;
        } else if (tiles >= 4 && MAX_RT >= 4) {
            sgmv_shrink(xf, a, in_dim, r_total, r0, tmp, R, 4, wbf16);
            r0 += 64;
        } else if (tiles == 3 && MAX_RT >= 3) {
            sgmv_shrink(xf, a, in_dim, r_total, r0, tmp, R, 3, wbf16);
            r0 += 48;
        } else if (tiles >= 2) {
            sgmv_shrink(xf, a, in_dim, r_total, r0, tmp, R, 2, wbf16);
            r0 += 32;
        } else {
            sgmv_shrink(xf, a, in_dim, r_total, r0, tmp, R, 1, wbf16);
            r0 += 16;
        }
    }
    int64_t r0 = 0, c0 = 0;
#if SGMV_PAIRS
    if (wbf16 && xb != NULL) {
        for (int64_t j = 0; j < nslices; j++) {
            if (rk[j] > 0) sgmv_expand_pairs(tmp, y, nb, b, out_dim, r0, r0 + rk[j], c0, outs[j], R, CT / 2);
            r0 += rk[j];
            c0 += outs[j];
        }
        return;
    }
#endif
    for (int64_t j = 0; j < nslices; j++) {
        const int64_t nc = outs[j];
        for (int64_t cb = 0; rk[j] > 0 && cb < nc; cb += 16 * CT) {
            __mmask16 m[8];
            __m512 acc[SGMV_ROWS][8];
#pragma GCC unroll 8
            for (int k = 0; k < CT; k++) m[k] = lanes(nc - cb - 16 * k);
#pragma GCC unroll 8
            for (int q = 0; q < R; q++)
#pragma GCC unroll 8
                for (int k = 0; k < CT; k++) acc[q][k] = _mm512_setzero_ps();
            for (int64_t r = r0; r < r0 + rk[j]; r++) {
                const int64_t at = r * out_dim + c0 + cb;
                if (r + 8 < r0 + rk[j])
                    for (int64_t off = 0; off < 16 * CT * (wbf16 ? 2 : 4); off += 64)
                        _mm_prefetch((const char *)b + (at + 8 * out_dim) * (wbf16 ? 2 : 4) + off, _MM_HINT_T0);
                __m512 t[SGMV_ROWS];
#pragma GCC unroll 8
                for (int q = 0; q < R; q++) t[q] = _mm512_set1_ps(tmp[q * MAX_RANK + r]);
#pragma GCC unroll 8
                for (int k = 0; k < CT; k++) {
                    const __m512 bv = sgmv_load(b, at + 16 * k, m[k], wbf16);
#pragma GCC unroll 8
                    for (int q = 0; q < R; q++) acc[q][k] = _mm512_fmadd_ps(t[q], bv, acc[q][k]);
                }
            }
#pragma GCC unroll 8
            for (int64_t q = 0; q < nb; q++)
#pragma GCC unroll 8
                for (int k = 0; k < CT; k++)
                    if (m[k]) sgmv_add_store(y + q * out_dim + c0 + cb + 16 * k, acc[q][k], m[k]);
        }
        r0 += rk[j];
        c0 += nc;
    }
}

/* The block's rows: the kernel for the fewest rows that hold them (2, 4 or 8) */
static inline __attribute__((always_inline)) void sgmv_rows(
    const float *xf, const uint16_t *xb, uint16_t *y, int64_t nb, const void *a, const void *b, const int64_t *rk,
    int64_t nslices,
    const int64_t *outs, int64_t in_dim, int64_t out_dim, int64_t r_total, float *tmp, float *acc,
    const int wbf16) {
    (void)acc;
    if (nb <= 2)
        sgmv_block(xf, xb, y, nb, a, b, rk, nslices, outs, in_dim, out_dim, r_total, tmp, 2, 12, 8, wbf16);
    else if (nb <= 4)
        sgmv_block(xf, xb, y, nb, a, b, rk, nslices, outs, in_dim, out_dim, r_total, tmp, 4, 4, 4, wbf16);
    else
        sgmv_block(xf, xb, y, nb, a, b, rk, nslices, outs, in_dim, out_dim, r_total, tmp, 8, 2, 2, wbf16);
}
#elif HAS_SGMV_AVX2
/* AVX2: the blocks on 8-lane vectors, two kinds. A decode block (2 or 4 rows of one adapter) streams its weights
 * from memory once, row after row of A^T and of B^T's diagonal blocks (a few KB each: prefetched a row or 1 KB
 * ahead, the hardware prefetcher starting cold on each), its sums in L1; a rank of up to 32 / 16 is summed in
 * registers in one pass. A long segment's block of 6 rows (prefill) reads weights that the segment's other blocks
 * keep in cache, in register tiles of 6 rows by 16 ranks or columns (12 accumulators, two loads, one broadcast of
 * the 16 ymm registers). A rank or width that is not a multiple of 8 leaves a tail of under 8, in scalar code.
 * Ranks 8-64 of 32 adapters, 2 rows each (a decode step's LoRA on the default model, 586 MB of bf16 weights):
 * 50-58 ms against the plain loops' 62-78; a 2,048-token prefill step of 32 adapters, 0.62 s against 2.05 s for
 * torch's float32 products. */
static inline __attribute__((always_inline)) __m256 sgmv_load8(const void *w, int64_t at, const int wbf16) {
    return wbf16 ? load_bf16x8((const uint16_t *)w + at) : _mm256_loadu_ps((const float *)w + at);
}

static inline float sgmv_load1(const void *w, int64_t at, const int wbf16) {
    return wbf16 ? bf16_to_f32(((const uint16_t *)w)[at]) : ((const float *)w)[at];
}

/* dst[0:8] (bf16) += v, rounded once */
static inline void sgmv_add8(uint16_t *dst, __m256 v) {
    const __m256i bits = bf16_bits8(_mm256_add_ps(load_bf16x8(dst), v));
    _mm_storeu_si128((__m128i *)dst, _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}

/* One step of an R x T register tile, the shrink's and the expand's alike: acc[q][k] += p[q * ld] * the 8 weights
 * at w[at + 8 * k] (one weight row's T vectors loaded once for the R rows). */
static inline __attribute__((always_inline)) void sgmv_tile_step(__m256 acc[SGMV_ROWS][4], const float *p, int64_t ld,
                                                                 const void *w, int64_t at, const int R, const int T,
                                                                 const int wbf16) {
    __m256 wv[4];
#pragma GCC unroll 4
    for (int k = 0; k < T; k++) wv[k] = sgmv_load8(w, at + 8 * k, wbf16);
#pragma GCC unroll 8
    for (int q = 0; q < R; q++) {
        const __m256 v = _mm256_broadcast_ss(p + q * ld);
#pragma GCC unroll 4
        for (int k = 0; k < T; k++) acc[q][k] = _mm256_fmadd_ps(v, wv[k], acc[q][k]);
    }
}

/* tmp[q][r0 : r0 + 8 * T] = xf[q] @ A^T[:, r0 : r0 + 8 * T] for the R rows (every tile full) */
static inline __attribute__((always_inline)) void sgmv_shrink8(const float *xf, const void *a, int64_t in_dim,
                                                               int64_t r_total, int64_t r0, float *tmp, const int R,
                                                               const int T, const int wbf16) {
    __m256 acc[SGMV_ROWS][4];
#pragma GCC unroll 8
    for (int q = 0; q < R; q++)
#pragma GCC unroll 4
        for (int k = 0; k < T; k++) acc[q][k] = _mm256_setzero_ps();
    const int64_t esize = wbf16 ? 2 : 4;
    for (int64_t i = 0; i < in_dim; i++) {
        /* short strided runs the hardware prefetcher does not see coming: ask for the rows a few ahead */
        if (i + 16 < in_dim)
            for (int64_t off = 0; off < 8 * T * esize; off += 64)
                _mm_prefetch((const char *)a + ((i + 16) * r_total + r0) * esize + off, _MM_HINT_T0);
        sgmv_tile_step(acc, xf + i, in_dim, a, i * r_total + r0, R, T, wbf16);
    }
#pragma GCC unroll 8
    for (int q = 0; q < R; q++)
#pragma GCC unroll 4
        for (int k = 0; k < T; k++) _mm256_storeu_ps(tmp + q * MAX_RANK + r0 + 8 * k, acc[q][k]);
}

/* y[q][c : c + 8 * T] += tmp[q][r0 : r1] @ B^T[r0 : r1, c : c + 8 * T] for the nb of the R rows, the sums in
 * registers (prefill blocks: B^T's rows come from cache, every block of the segment reads them) */
static inline __attribute__((always_inline)) void sgmv_expand8(const float *tmp, uint16_t *y, int64_t nb,
                                                               const void *b, int64_t out_dim, int64_t r0, int64_t r1,
                                                               int64_t c, const int R, const int T, const int wbf16) {
    __m256 acc[SGMV_ROWS][4];
#pragma GCC unroll 8
    for (int q = 0; q < R; q++)
#pragma GCC unroll 4
        for (int k = 0; k < T; k++) acc[q][k] = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; r++) sgmv_tile_step(acc, tmp + r, MAX_RANK, b, r * out_dim + c, R, T, wbf16);
#pragma GCC unroll 8
    for (int64_t q = 0; q < nb; q++)
#pragma GCC unroll 4
        for (int k = 0; k < T; k++) sgmv_add8(y + q * out_dim + c + 8 * k, acc[q][k]);
}

/* tmp[q][0 : r_total] = xf[q] @ A^T for the R rows, A^T read once, row after row (its rows are contiguous): the
 * partial sums in tmp (L1), updated for each of A^T's rows; a tail of under 8 ranks in scalar code. */
static inline __attribute__((always_inline)) void sgmv_shrink_rows(const float *xf, const void *a, int64_t in_dim,
                                                                   int64_t r_total, float *tmp, const int R,
                                                                   const int wbf16) {
    const int64_t full = r_total / 8 * 8;
    for (int q = 0; q < R; q++)
        for (int64_t r = 0; r < r_total; r++) tmp[q * MAX_RANK + r] = 0.0f;
    const int64_t esize = wbf16 ? 2 : 4;
    for (int64_t i = 0; i < in_dim; i++) {
        for (int64_t off = 0; off < r_total * esize; off += 64) /* A^T is one run: the bytes 1 KB ahead */
            _mm_prefetch((const char *)a + i * r_total * esize + 1024 + off, _MM_HINT_T0);
        __m256 xv[SGMV_ROWS];
#pragma GCC unroll 8
        for (int q = 0; q < R; q++) xv[q] = _mm256_broadcast_ss(xf + q * in_dim + i);
        for (int64_t c = 0; c < full; c += 8) {
            const __m256 w = sgmv_load8(a, i * r_total + c, wbf16);
#pragma GCC unroll 8
            for (int q = 0; q < R; q++) {
                float *t = tmp + q * MAX_RANK + c;
                _mm256_storeu_ps(t, _mm256_fmadd_ps(xv[q], w, _mm256_loadu_ps(t)));
            }
        }
        for (int64_t c = full; c < r_total; c++) {
            const float w = sgmv_load1(a, i * r_total + c, wbf16);
            for (int q = 0; q < R; q++) tmp[q * MAX_RANK + c] += xf[q * in_dim + i] * w;
        }
    }
}

/* y[q][c0 : c0 + nc] += tmp[q][r0 : r1] @ B^T[r0 : r1, c0 : c0 + nc] for the nb of the R rows, B^T read row after
 * row over chunks of columns whose R rows of float32 sums stay in L1 (acc, 16 KB); a tail of under 8 columns in
 * scalar code. */
static inline __attribute__((always_inline)) void sgmv_expand_rows(const float *tmp, uint16_t *y, int64_t nb,
                                                                   const void *b, int64_t out_dim, int64_t r0,
                                                                   int64_t r1, int64_t c0, int64_t nc, float *acc,
                                                                   const int R, const int wbf16) {
    const int64_t chunk = SGMV_ACC / R, esize = wbf16 ? 2 : 4;
    for (int64_t cb = 0; cb < nc; cb += chunk) {
        const int64_t n = nc - cb < chunk ? nc - cb : chunk, full = n / 8 * 8;
        for (int q = 0; q < R; q++)
            for (int64_t c = 0; c < n; c++) acc[q * chunk + c] = 0.0f;
        for (int64_t r = r0; r < r1; r++) {
            const int64_t at = r * out_dim + c0 + cb;
            if (r + SGMV_AHEAD < r1) /* a row's run is a few KB: the prefetcher would start cold on each */
                for (int64_t off = 0; off < n * esize; off += 64)
                    _mm_prefetch((const char *)b + (at + SGMV_AHEAD * out_dim) * esize + off, _MM_HINT_T0);
            __m256 tv[SGMV_ROWS];
#pragma GCC unroll 8
            for (int q = 0; q < R; q++) tv[q] = _mm256_broadcast_ss(tmp + q * MAX_RANK + r);
            for (int64_t c = 0; c < full; c += 8) {
                const __m256 w = sgmv_load8(b, at + c, wbf16);
#pragma GCC unroll 8
                for (int q = 0; q < R; q++) {
                    float *s = acc + q * chunk + c;
                    _mm256_storeu_ps(s, _mm256_fmadd_ps(tv[q], w, _mm256_loadu_ps(s)));
                }
            }
            for (int64_t c = full; c < n; c++) {
                const float w = sgmv_load1(b, at + c, wbf16);
                for (int q = 0; q < R; q++) acc[q * chunk + c] += tmp[q * MAX_RANK + r] * w;
            }
        }
        for (int64_t q = 0; q < nb; q++) {
            uint16_t *dst = y + q * out_dim + c0 + cb;
            int64_t c = 0;
            for (; c < full; c += 8) sgmv_add8(dst + c, _mm256_loadu_ps(acc + q * chunk + c));
            for (; c < n; c++) dst[c] = f32_to_bf16(bf16_to_f32(dst[c]) + acc[q * chunk + c]);
        }
    }
}

/* A decode block of R rows (2 or 4; xf holds them as float32). A rank that is a multiple of 8 and at most 32 (2
 * rows) or 16 (4 rows) is summed in registers in one pass over A^T's rows; any other in tmp. The expand streams
 * B^T's rows. */
static inline __attribute__((always_inline)) void sgmv_block8(
    const float *xf, uint16_t *y, int64_t nb, const void *a, const void *b, const int64_t *rk, int64_t nslices,
    const int64_t *outs, int64_t in_dim, int64_t out_dim, int64_t r_total, float *tmp, float *acc, const int R,
    const int wbf16) {
    const int TM = 8 / R;
    if (r_total % 8 == 0 && r_total <= 8 * TM) {
        const int64_t tiles = r_total / 8;
        if (tiles == 1) sgmv_shrink8(xf, a, in_dim, r_total, 0, tmp, R, 1, wbf16);
        else if (tiles == 2 && TM >= 2) sgmv_shrink8(xf, a, in_dim, r_total, 0, tmp, R, 2, wbf16);
        else if (tiles == 3 && TM >= 3) sgmv_shrink8(xf, a, in_dim, r_total, 0, tmp, R, 3, wbf16);
        else if (TM >= 4) sgmv_shrink8(xf, a, in_dim, r_total, 0, tmp, R, 4, wbf16);
    } else {
        sgmv_shrink_rows(xf, a, in_dim, r_total, tmp, R, wbf16);
    }
    int64_t r0 = 0, c0 = 0;
    for (int64_t j = 0; j < nslices; j++) {
        if (rk[j] > 0) sgmv_expand_rows(tmp, y, nb, b, out_dim, r0, r0 + rk[j], c0, outs[j], acc, R, wbf16);
        r0 += rk[j];
        c0 += outs[j];
    }
}

/* A block of up to SGMV_LONG_ROWS (6) rows of a long segment (prefill): both products in register tiles of 6 rows
 * by 16 ranks or columns (12 accumulators, two weight loads and one broadcast per step), the weights re-read
 * from cache by each block; tiles of 8 and scalar code for what is left past a multiple of 16 or of 8. */
static inline __attribute__((always_inline)) void sgmv_block_tiled(
    const float *xf, uint16_t *y, int64_t nb, const void *a, const void *b, const int64_t *rk, int64_t nslices,
    const int64_t *outs, int64_t in_dim, int64_t out_dim, int64_t r_total, float *tmp, const int wbf16) {
    const int R = SGMV_LONG_ROWS;
    int64_t r0 = 0;
    for (; r0 + 16 <= r_total; r0 += 16) sgmv_shrink8(xf, a, in_dim, r_total, r0, tmp, R, 2, wbf16);
    for (; r0 + 8 <= r_total; r0 += 8) sgmv_shrink8(xf, a, in_dim, r_total, r0, tmp, R, 1, wbf16);
    for (int64_t q = 0; q < R; q++)
        for (int64_t r = r0; r < r_total; r++) {
            float s = 0.0f;
            for (int64_t i = 0; i < in_dim; i++) s += xf[q * in_dim + i] * sgmv_load1(a, i * r_total + r, wbf16);
            tmp[q * MAX_RANK + r] = s;
        }
    int64_t c0 = 0;
    r0 = 0;
    for (int64_t j = 0; j < nslices; j++) {
        const int64_t nc = outs[j], r1 = r0 + rk[j];
        int64_t c = 0;
        if (rk[j] > 0) {
            for (; c + 16 <= nc; c += 16) sgmv_expand8(tmp, y, nb, b, out_dim, r0, r1, c0 + c, R, 2, wbf16);
            for (; c + 8 <= nc; c += 8) sgmv_expand8(tmp, y, nb, b, out_dim, r0, r1, c0 + c, R, 1, wbf16);
            for (int64_t q = 0; q < nb; q++)
                for (int64_t cc = c; cc < nc; cc++) {
                    float s = 0.0f;
                    for (int64_t r = r0; r < r1; r++)
                        s += tmp[q * MAX_RANK + r] * sgmv_load1(b, r * out_dim + c0 + cc, wbf16);
                    uint16_t *dst = y + q * out_dim + c0 + cc;
                    *dst = f32_to_bf16(bf16_to_f32(*dst) + s);
                }
        }
        r0 = r1;
        c0 += nc;
    }
}

static inline __attribute__((always_inline)) void sgmv_rows(
    const float *xf, const uint16_t *xb, uint16_t *y, int64_t nb, const void *a, const void *b, const int64_t *rk,
    int64_t nslices,
    const int64_t *outs, int64_t in_dim, int64_t out_dim, int64_t r_total, float *tmp, float *acc, const int wbf16) {
    (void)xb;
    if (nb <= 2)
        sgmv_block8(xf, y, nb, a, b, rk, nslices, outs, in_dim, out_dim, r_total, tmp, acc, 2, wbf16);
    else if (nb <= 4)
        sgmv_block8(xf, y, nb, a, b, rk, nslices, outs, in_dim, out_dim, r_total, tmp, acc, 4, wbf16);
    else
        sgmv_block_tiled(xf, y, nb, a, b, rk, nslices, outs, in_dim, out_dim, r_total, tmp, wbf16);
}
#else
/* Without AVX-512 or AVX2: the same blocks in plain loops the compiler vectorises, the partial sums in memory. */
static inline __attribute__((always_inline)) void sgmv_rows(
    const float *xf, const uint16_t *xb, uint16_t *y, int64_t nb, const void *a, const void *b, const int64_t *rk,
    int64_t nslices,
    const int64_t *outs, int64_t in_dim, int64_t out_dim, int64_t r_total, float *tmp, float *acc_buf,
    const int wbf16) {
    (void)acc_buf, (void)xb;
    const float *af = (const float *)a, *bf = (const float *)b;
    const uint16_t *ah = (const uint16_t *)a, *bh = (const uint16_t *)b;
    for (int64_t q = 0; q < nb; q++) {
        float *tq = tmp + q * MAX_RANK;
        for (int64_t r = 0; r < r_total; r++) tq[r] = 0.0f;
        for (int64_t i = 0; i < in_dim; i++) {
            const float xi = xf[q * in_dim + i];
#pragma omp simd
            for (int64_t r = 0; r < r_total; r++)
                tq[r] += xi * (wbf16 ? bf16_to_f32(ah[i * r_total + r]) : af[i * r_total + r]);
        }
    }
    float acc[256];
    int64_t r0 = 0, c0 = 0;
    for (int64_t j = 0; j < nslices; j++) {
        const int64_t nc = outs[j];
        for (int64_t q = 0; q < nb && rk[j] > 0; q++) {
            for (int64_t cb = 0; cb < nc; cb += 256) {
                const int64_t cn = nc - cb < 256 ? nc - cb : 256;
                for (int64_t c = 0; c < cn; c++) acc[c] = 0.0f;
                for (int64_t r = r0; r < r0 + rk[j]; r++) {
                    const float t = tmp[q * MAX_RANK + r];
                    const int64_t at = r * out_dim + c0 + cb;
#pragma omp simd
                    for (int64_t c = 0; c < cn; c++) acc[c] += t * (wbf16 ? bf16_to_f32(bh[at + c]) : bf[at + c]);
                }
                uint16_t *yr = y + q * out_dim + c0 + cb;
                for (int64_t c = 0; c < cn; c++) yr[c] = f32_to_bf16(bf16_to_f32(yr[c]) + acc[c]);
            }
        }
        r0 += rk[j];
        c0 += nc;
    }
}
#endif

/* A segment of n rows is taken in blocks of SGMV_LONG_ROWS rows (8; AVX2: 6) when that still leaves every thread
 * two of them, else of SGMV_ROWS / 2 (8 rows of one adapter: two blocks of 4, one per thread, rather than one block
 * for one thread). */
static inline int64_t sgmv_block_rows(int64_t n, int num_threads) {
    return n >= 2 * SGMV_LONG_ROWS * num_threads ? SGMV_LONG_ROWS : SGMV_ROWS / 2;
}

static inline __attribute__((always_inline)) int sgmv_body(
    const uint16_t *x, uint16_t *y, int64_t nseg, const int64_t *starts, const int64_t *ends, const int64_t *a_ptrs,
    const int64_t *b_ptrs, const int64_t *ranks, int64_t nslices, const int64_t *outs, int64_t in_dim,
    int64_t out_dim, int num_threads, const int wbf16) {
    if (in_dim > MAX_IN || out_dim > MAX_OUT || nslices > MAX_SLICES || nslices < 1 || num_threads < 1) return -1;
    int64_t width = 0;
    for (int64_t j = 0; j < nslices; j++) width += outs[j];
    if (width != out_dim) return -1;
    for (int64_t s = 0; s < nseg; s++) {
        int64_t r = 0;
        for (int64_t j = 0; j < nslices; j++) r += ranks[s * nslices + j];
        if (r > MAX_RANK) return -1;
    }
    int64_t nblk = 0;
    for (int64_t s = 0; s < nseg; s++) {
        const int64_t n = ends[s] - starts[s], bs = sgmv_block_rows(n, num_threads);
        nblk += (n + bs - 1) / bs;
    }
    int64_t *blk = malloc(sizeof(int64_t) * 3 * (size_t)(nblk > 0 ? nblk : 1)); /* (segment, first row, rows) */
    /* per thread: the block's rows as float32 [SGMV_ROWS][in_dim], its rank-sized partial sums [SGMV_ROWS][MAX_RANK],
     * and SGMV_ACC float32 sums of the expand where it keeps them in memory (AVX2) */
    const size_t per_thread = (size_t)SGMV_ROWS * (size_t)(in_dim + MAX_RANK) + SGMV_ACC;
    float *scratch = malloc(sizeof(float) * per_thread * (size_t)num_threads);
    if (blk == NULL || scratch == NULL) {
        free(blk);
        free(scratch);
        return -1;
    }
    /* threads when the blocks' work pays for a parallel region: each block reads its adapter's weights (a decode
     * step of 32 adapters with one row each is megabytes of them over only 32 rows) and converts its rows */
    int64_t work = 0;
    for (int64_t s = 0, n = 0; s < nseg; s++) {
        const int64_t len = ends[s] - starts[s], bs = sgmv_block_rows(len, num_threads);
        int64_t r = 0;
        for (int64_t j = 0; j < nslices; j++) r += ranks[s * nslices + j];
        work += len * in_dim + (len + bs - 1) / bs * r * (in_dim + out_dim);
        for (int64_t t = starts[s]; t < ends[s]; t += bs, n++) {
            blk[3 * n] = s;
            blk[3 * n + 1] = t;
            blk[3 * n + 2] = ends[s] - t < bs ? ends[s] - t : bs;
        }
    }
#pragma omp parallel num_threads(num_threads) if (nblk > 1 && work >= 32768)
    {
        float *xf = scratch + per_thread * (size_t)omp_get_thread_num();
        float *tmp = xf + (size_t)SGMV_ROWS * (size_t)in_dim;
#pragma omp for schedule(dynamic)
        for (int64_t n = 0; n < nblk; n++) {
            const int64_t s = blk[3 * n], t0 = blk[3 * n + 1], nb = blk[3 * n + 2];
            const int64_t *rk = ranks + s * nslices;
            int64_t r_total = 0;
            for (int64_t j = 0; j < nslices; j++) r_total += rk[j];
            const int64_t padded = nb <= 2 ? 2 : nb <= 4 ? 4 : SGMV_LONG_ROWS; /* the rows the block's kernel reads */
            for (int64_t q = 0; q < padded; q++)
                for (int64_t i = 0; i < in_dim; i++)
                    xf[q * in_dim + i] = q < nb ? bf16_to_f32(x[(t0 + q) * in_dim + i]) : 0.0f;
            sgmv_rows(xf, x + t0 * in_dim, y + t0 * out_dim, nb, (const void *)(intptr_t)a_ptrs[s], (const void *)(intptr_t)b_ptrs[s],
                      rk, nslices, outs, in_dim, out_dim, r_total, tmp, tmp + SGMV_ROWS * MAX_RANK, wbf16);
        }
    }
    free(blk);
    free(scratch);
    return 0;
}

/* The SGMV kernel's code path in this build: 2 AVX-512, 1 AVX2, 0 plain C. */
int sgmv_path(void) { return HAS_SGMV_AVX512 ? 2 : HAS_SGMV_AVX2 ? 1 : 0; }

/* Whether sgmv_*_bf16 takes a projection of these dimensions and slices with this total rank. */
int sgmv_fits(int64_t in_dim, int64_t out_dim, int64_t nslices, const int64_t *outs, int64_t rank) {
    if (in_dim > MAX_IN || out_dim > MAX_OUT || nslices > MAX_SLICES || nslices < 1 || rank > MAX_RANK) return 0;
    int64_t width = 0;
    for (int64_t j = 0; j < nslices; j++) width += outs[j];
    return width == out_dim;
}

int sgmv_f32w_bf16(const uint16_t *x, uint16_t *y, int64_t nseg, const int64_t *starts, const int64_t *ends,
                   const int64_t *a_ptrs, const int64_t *b_ptrs, const int64_t *ranks, int64_t nslices,
                   const int64_t *outs, int64_t in_dim, int64_t out_dim, int num_threads) {
    return sgmv_body(x, y, nseg, starts, ends, a_ptrs, b_ptrs, ranks, nslices, outs, in_dim, out_dim, num_threads, 0);
}

int sgmv_long_available(void);
int sgmv_long_bf16(const uint16_t *x, uint16_t *y, int64_t nseg, const int64_t *starts, const int64_t *ends,
                   const int64_t *a_ptrs, const int64_t *b_ptrs, const int64_t *ranks, int64_t nslices,
                   const int64_t *outs, int64_t in_dim, int64_t out_dim, int num_threads);

/* bf16 weights: the segments of more than SGMV_LONG_MIN_ROWS rows go to the kernel for prompt-sized segments where
 * the build has it (AVX512-BF16; its rank-sized intermediate rounded to bf16): from ~32 rows it is faster (32 / 64
 * / 128 rows of 32 adapters on the default model's four projection groups, two layers: 8.2 / 11.2 / 16.8 ms
 * against 11.2 / 17.8 / 33.3; 16 rows 7.5 against 7.0). The rest, and all of them elsewhere, go to the kernel
 * above. The fused decode layers call this too, so both paths split the same way. */
#define SGMV_LONG_MIN_ROWS 24

int sgmv_bf16w_bf16(const uint16_t *x, uint16_t *y, int64_t nseg, const int64_t *starts, const int64_t *ends,
                    const int64_t *a_ptrs, const int64_t *b_ptrs, const int64_t *ranks, int64_t nslices,
                    const int64_t *outs, int64_t in_dim, int64_t out_dim, int num_threads) {
    int64_t nlong = 0;
    for (int64_t s = 0; s < nseg; s++) nlong += ends[s] - starts[s] > SGMV_LONG_MIN_ROWS;
    if (nlong == 0 || !sgmv_long_available() || in_dim % 2 || nslices < 1 || nslices > MAX_SLICES)
        return sgmv_body(x, y, nseg, starts, ends, a_ptrs, b_ptrs, ranks, nslices, outs, in_dim, out_dim, num_threads,
                         1);
    /* the segments split in two lists: [0, nshort) the short ones, [nshort, nseg) the long ones */
    int64_t *part = malloc(sizeof(int64_t) * (size_t)nseg * (4 + (size_t)nslices));
    if (part == NULL) return -1;
    int64_t *st = part, *en = st + nseg, *ap = en + nseg, *bp = ap + nseg, *rk = bp + nseg;
    const int64_t nshort = nseg - nlong;
    for (int64_t s = 0, i = 0, k = nshort; s < nseg; s++) {
        const int64_t at = ends[s] - starts[s] > SGMV_LONG_MIN_ROWS ? k++ : i++;
        st[at] = starts[s];
        en[at] = ends[s];
        ap[at] = a_ptrs[s];
        bp[at] = b_ptrs[s];
        for (int64_t j = 0; j < nslices; j++) rk[at * nslices + j] = ranks[s * nslices + j];
    }
    int rc = 0;
    if (nshort > 0)
        rc = sgmv_body(x, y, nshort, st, en, ap, bp, rk, nslices, outs, in_dim, out_dim, num_threads, 1);
    if (rc == 0 && sgmv_long_bf16(x, y, nlong, st + nshort, en + nshort, ap + nshort, bp + nshort,
                                  rk + nshort * nslices, nslices, outs, in_dim, out_dim, num_threads) != 0)
        rc = sgmv_body(x, y, nlong, st + nshort, en + nshort, ap + nshort, bp + nshort, rk + nshort * nslices, nslices,
                       outs, in_dim, out_dim, num_threads, 1);
    free(part);
    return rc;
}

/* ---- segmented LoRA for prompt-sized segments (AVX512-BF16) ----
 *
 * The same y[t, :] += (x[t, :] @ A^T) @ B^T for segments of many rows (a prompt's chunk), bfloat16 weights, with
 * bf16 pair dot products. Each segment's A^T and B^T are first rewritten once as pairs of consecutive rows (lane j
 * of a 16-lane vector: rows k and k + 1 of column j, B^T's slices on their own, each padded to whole vectors), so
 * that one load gives vdpbf16ps 16 ranks' (shrink) or 16 output columns' (expand) pairs, which it multiplies by the
 * pair of x (of the rank-sized intermediate) given as its broadcast memory operand. Then rows in blocks of up to 8
 * of one segment, two vectors of lanes a pass (16 independent sums in flight). Products are exact in float32, sums
 * float32; the intermediate is rounded to bf16 between the two products (as torch's bf16 products round it), y
 * once. in_dim must be even. Returns -1 when a dimension is beyond the bounds or the CPU has no AVX512-BF16. */
#define SGMV_LONG_MB 8
#if HAS_SGMV_AVX512 && defined(__AVX512BF16__)
#define HAS_SGMV_LONG 1
#else
#define HAS_SGMV_LONG 0
#endif

int sgmv_long_available(void) { return HAS_SGMV_LONG; }

#if HAS_SGMV_LONG
/* Segment s's total rank (the sum of its slices'). */
static inline int64_t sgmv_rank(const int64_t *ranks, int64_t s, int64_t nslices) {
    int64_t r = 0;
    for (int64_t j = 0; j < nslices; j++) r += ranks[s * nslices + j];
    return r;
}

/* Two rows' 16 values (m lanes; q NULL: zeros) as bf16 pairs, lane j = (p[j], q[j]). */
static inline __m512i sgmv_pairs(const uint16_t *p, const uint16_t *q, __mmask16 m) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    if (q == NULL) return lo;
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, q));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

/* The paired layout's sizes, in 32-bit pairs: A^T [in/2][rp] (rp: the rank padded to 16), then per slice j
 * [(rk_j + 1) / 2][oc_j] (oc_j: its columns padded to 16). */
static inline int64_t sgmv_paired_size(const int64_t *rk, int64_t nslices, const int64_t *outs, int64_t in_dim) {
    int64_t r = 0, size = 0;
    for (int64_t j = 0; j < nslices; j++) {
        r += rk[j];
        size += (rk[j] + 1) / 2 * ((outs[j] + 15) / 16 * 16);
    }
    return size + in_dim / 2 * ((r + 15) / 16 * 16);
}

static void sgmv_pair_weights(const uint16_t *a, const uint16_t *b, const int64_t *rk, int64_t nslices,
                              const int64_t *outs, int64_t in_dim, int64_t out_dim, uint32_t *dst) {
    int64_t r_total = 0;
    for (int64_t j = 0; j < nslices; j++) r_total += rk[j];
    const int64_t rp = (r_total + 15) / 16 * 16;
    for (int64_t i = 0; i < in_dim; i += 2)
        for (int64_t c = 0; c < rp; c += 16)
            _mm512_storeu_si512((void *)(dst + i / 2 * rp + c),
                                sgmv_pairs(a + i * r_total + c, a + (i + 1) * r_total + c, lanes(r_total - c)));
    dst += in_dim / 2 * rp;
    int64_t r0 = 0, c0 = 0;
    for (int64_t j = 0; j < nslices; j++) {
        const int64_t oc = (outs[j] + 15) / 16 * 16;
        for (int64_t p = 0; p < (rk[j] + 1) / 2; p++) {
            const int64_t r = r0 + 2 * p;
            for (int64_t c = 0; c < oc; c += 16) {
                const uint16_t *next = 2 * p + 1 < rk[j] ? b + (r + 1) * out_dim + c0 + c : NULL;
                _mm512_storeu_si512((void *)(dst + p * oc + c),
                                    sgmv_pairs(b + r * out_dim + c0 + c, next, lanes(outs[j] - c)));
            }
        }
        dst += (rk[j] + 1) / 2 * oc;
        r0 += rk[j];
        c0 += outs[j];
    }
}

/* MB rows of x (from xr, row stride in_dim) against ranks rt0 .. rt0 + 16 TT - 1 (pa: A^T paired, rp ranks a row
 * pair): tmp[q][rank] rounded to bf16. */
static inline __attribute__((always_inline)) void sgmv_long_shrink(
    const uint16_t *xr, int64_t in_dim, const uint32_t *pa, int64_t rp, int64_t rt0, uint16_t *tmp, const int MB,
    const int TT) {
    __m512 acc[2][SGMV_LONG_MB];
    _Pragma("GCC unroll 8") for (int k = 0; k < TT; k++)
        _Pragma("GCC unroll 8") for (int q = 0; q < MB; q++) acc[k][q] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in_dim; i += 2) {
        __m512i w[2];
        _Pragma("GCC unroll 8") for (int k = 0; k < TT; k++)
            w[k] = _mm512_loadu_si512((const void *)(pa + i / 2 * rp + rt0 + 16 * k));
        _Pragma("GCC unroll 8") for (int q = 0; q < MB; q++)
            _Pragma("GCC unroll 8") for (int k = 0; k < TT; k++)
                __asm__("vdpbf16ps %2%{1to16%}, %1, %0"
                        : "+v"(acc[k][q]) : "v"(w[k]), "m"(*(const uint32_t *)(xr + q * in_dim + i)));
    }
    _Pragma("GCC unroll 8") for (int q = 0; q < MB; q++)
        _Pragma("GCC unroll 8") for (int k = 0; k < TT; k++)
            _mm256_storeu_si256((__m256i *)(tmp + q * (MAX_RANK + 16) + rt0 + 16 * k),
                                (__m256i)_mm512_cvtneps_pbh(acc[k][q]));
}

/* y[q, c0 + cb ..] += tmp[q, r0 ..] pairs @ slice's paired B^T (pb: [pairs][oc]) for MB rows, 16 CT columns from cb
 * (nc of them left in the slice). */
static inline __attribute__((always_inline)) void sgmv_long_expand(
    const uint16_t *tmp, uint16_t *yr, int64_t out_dim, const uint32_t *pb, int64_t pairs, int64_t oc, int64_t r0,
    int64_t c0, int64_t cb, int64_t nc, const int MB, const int CT) {
    __m512 acc[2][SGMV_LONG_MB];
    __mmask16 m[2];
    _Pragma("GCC unroll 8") for (int k = 0; k < CT; k++) {
        m[k] = lanes(nc - 16 * k);
        _Pragma("GCC unroll 8") for (int q = 0; q < MB; q++) acc[k][q] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; p++) {
        __m512i w[2];
        _Pragma("GCC unroll 8") for (int k = 0; k < CT; k++)
            w[k] = _mm512_loadu_si512((const void *)(pb + p * oc + cb + 16 * k));
        _Pragma("GCC unroll 8") for (int q = 0; q < MB; q++)
            _Pragma("GCC unroll 8") for (int k = 0; k < CT; k++)
                __asm__("vdpbf16ps %2%{1to16%}, %1, %0"
                        : "+v"(acc[k][q])
                        : "v"(w[k]), "m"(*(const uint32_t *)(tmp + q * (MAX_RANK + 16) + r0 + 2 * p)));
    }
    _Pragma("GCC unroll 8") for (int q = 0; q < MB; q++)
        _Pragma("GCC unroll 8") for (int k = 0; k < CT; k++)
            if (m[k]) sgmv_add_store(yr + q * out_dim + c0 + cb + 16 * k, acc[k][q], m[k]);
}

/* One block of MB rows of one segment over its paired weights. */
static inline __attribute__((always_inline)) void sgmv_long_block(
    const uint16_t *xr, uint16_t *yr, const uint32_t *pw, const int64_t *rk, int64_t nslices, const int64_t *outs,
    int64_t in_dim, int64_t out_dim, int64_t r_total, uint16_t *tmp, const int MB) {
    const int64_t rp = (r_total + 15) / 16 * 16;
    for (int64_t rt0 = 0; rt0 < rp; rt0 += 32) {
        if (rp - rt0 > 16) sgmv_long_shrink(xr, in_dim, pw, rp, rt0, tmp, MB, 2);
        else sgmv_long_shrink(xr, in_dim, pw, rp, rt0, tmp, MB, 1);
    }
    const uint32_t *pb = pw + in_dim / 2 * rp;
    int64_t r0 = 0, c0 = 0;
    for (int64_t j = 0; j < nslices; j++) {
        const int64_t oc = (outs[j] + 15) / 16 * 16, pairs = (rk[j] + 1) / 2;
        for (int64_t cb = 0; pairs > 0 && cb < outs[j]; cb += 32) {
            if (outs[j] - cb > 16) sgmv_long_expand(tmp, yr, out_dim, pb, pairs, oc, r0, c0, cb, outs[j] - cb, MB, 2);
            else sgmv_long_expand(tmp, yr, out_dim, pb, pairs, oc, r0, c0, cb, outs[j] - cb, MB, 1);
        }
        pb += pairs * oc;
        r0 += rk[j];
        c0 += outs[j];
    }
}
#endif

int sgmv_long_bf16(const uint16_t *x, uint16_t *y, int64_t nseg, const int64_t *starts, const int64_t *ends,
                   const int64_t *a_ptrs, const int64_t *b_ptrs, const int64_t *ranks, int64_t nslices,
                   const int64_t *outs, int64_t in_dim, int64_t out_dim, int num_threads) {
#if HAS_SGMV_LONG
    if (in_dim > MAX_IN || in_dim < 2 || in_dim % 2 || out_dim > MAX_OUT || nslices > MAX_SLICES || nslices < 1 ||
        num_threads < 1 || nseg < 0)
        return -1;
    int64_t width = 0, nblk = 0;
    for (int64_t j = 0; j < nslices; j++) width += outs[j];
    if (width != out_dim) return -1;
    int64_t *off = malloc(sizeof(int64_t) * (size_t)(nseg + 1));
    if (off == NULL) return -1;
    off[0] = 0;
    for (int64_t s = 0; s < nseg; s++) {
        if (sgmv_rank(ranks, s, nslices) > MAX_RANK) {
            free(off);
            return -1;
        }
        off[s + 1] = off[s] + sgmv_paired_size(ranks + s * nslices, nslices, outs, in_dim);
        nblk += (ends[s] - starts[s] + SGMV_LONG_MB - 1) / SGMV_LONG_MB;
    }
    int64_t *blk = malloc(sizeof(int64_t) * 2 * (size_t)(nblk > 0 ? nblk : 1)); /* (segment, first row) */
    uint32_t *paired = aligned_alloc(64, (sizeof(uint32_t) * (size_t)off[nseg] + 63) / 64 * 64 + 64);
    uint16_t *scratch = malloc(sizeof(uint16_t) * SGMV_LONG_MB * (MAX_RANK + 16) * (size_t)num_threads);
    if (blk == NULL || paired == NULL || scratch == NULL) {
        free(off);
        free(blk);
        free(paired);
        free(scratch);
        return -1;
    }
    for (int64_t s = 0, n = 0; s < nseg; s++)
        for (int64_t t = starts[s]; t < ends[s]; t += SGMV_LONG_MB, n++) {
            blk[2 * n] = s;
            blk[2 * n + 1] = t;
        }
#pragma omp parallel num_threads(num_threads) if (nblk > 1)
    {
#pragma omp for schedule(dynamic)
        for (int64_t s = 0; s < nseg; s++)
            sgmv_pair_weights((const uint16_t *)(intptr_t)a_ptrs[s], (const uint16_t *)(intptr_t)b_ptrs[s],
                              ranks + s * nslices, nslices, outs, in_dim, out_dim, paired + off[s]);
        uint16_t *tmp = scratch + (size_t)SGMV_LONG_MB * (MAX_RANK + 16) * (size_t)omp_get_thread_num();
        memset(tmp, 0, sizeof(uint16_t) * SGMV_LONG_MB * (MAX_RANK + 16));
#pragma omp for schedule(dynamic)
        for (int64_t n = 0; n < nblk; n++) {
            const int64_t s = blk[2 * n], t0 = blk[2 * n + 1];
            const int64_t nb = ends[s] - t0 < SGMV_LONG_MB ? ends[s] - t0 : SGMV_LONG_MB;
            const int64_t *rk = ranks + s * nslices;
            const int64_t r_total = sgmv_rank(ranks, s, nslices);
            const uint16_t *xr = x + t0 * in_dim;
            uint16_t *yr = y + t0 * out_dim;
#define LONG_BLOCK(MB) sgmv_long_block(xr, yr, paired + off[s], rk, nslices, outs, in_dim, out_dim, r_total, tmp, MB)
            switch (nb) {
            case 1: LONG_BLOCK(1); break;
            case 2: LONG_BLOCK(2); break;
            case 3: LONG_BLOCK(3); break;
            case 4: LONG_BLOCK(4); break;
            case 5: LONG_BLOCK(5); break;
            case 6: LONG_BLOCK(6); break;
            case 7: LONG_BLOCK(7); break;
            default: LONG_BLOCK(8); break;
            }
#undef LONG_BLOCK
        }
    }
    free(off);
    free(blk);
    free(paired);
    free(scratch);
    return 0;
#else
    (void)x; (void)y; (void)nseg; (void)starts; (void)ends; (void)a_ptrs; (void)b_ptrs; (void)ranks; (void)nslices;
    (void)outs; (void)in_dim; (void)out_dim; (void)num_threads;
    return -1;
#endif
}
