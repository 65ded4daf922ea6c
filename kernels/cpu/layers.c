/* A step's transformer layers in one call: what LlamaModel.forward runs layer by layer through the other kernels
 * of this library (the int4 matmul: AVX512-BF16 on the tiled layout, or AVX2, per weight, or the dense bf16
 * kernel of gemm.c on the weight's dense copy; rotary embedding with the K/V write, paged attention, residual add
 * with RMS norm, SiLU-and-multiply), in the same order with the same arguments, so the results are bit for bit the
 * layer-by-layer path's. One call instead of ~9 per layer saves their Python wrappers (~10 us each, a few ms of a
 * ~14 ms single-request step on a 2-core AVX2 machine; ~2-2.5 ms of a step that carries a prompt chunk on the
 * 2-core AVX512-BF16 one). It serves only the steps every one of those kernels takes: int4 weights with groups of
 * 32 at M <= Q4_MAX_M (Q4B_MAX_M; any M the dense copy takes), new tokens the attention kernel reads (decodes,
 * verify passes, prompt chunks in runs of MAX_NEW), LoRA segments the SGMV kernel takes; the caller checks that. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* The kernels of decode.c and quant.c it calls. */
int q4_gemm_bf16(const uint16_t *x, const uint8_t *codes, const float *scales, const float *zeros, uint16_t *y,
                 int64_t m, int64_t n, int64_t k, int num_threads);
int q4_gemm_fits(int64_t m, int64_t n, int64_t k);
int q4b_gemm_bf16(const uint16_t *x, const uint8_t *codes, const void *dm, int half, uint16_t *y, int64_t m,
                  int64_t n, int64_t k, int num_threads);
int q4b_gemm_fits(int64_t m, int64_t n, int64_t k);
int gemm_bf16w_bf16(const uint16_t *x, int64_t ldx, const uint16_t *wp, uint16_t *y, int64_t ldy, int64_t m,
                    int64_t n, int64_t k, int num_threads);
int gemm_bf16w_min_rows(void);
int gemm_bf16w_available(void);
int gemm_bf16w_next(const uint16_t *x, int64_t ldx, const uint16_t *wp, uint16_t *y, int64_t ldy, int64_t m,
                    int64_t n, int64_t k, const pf_region *side, int64_t nside, const uint16_t *next_wp,
                    int64_t next_n, int64_t next_k, int num_threads);
int rope_write_kv_bf16(const uint16_t *qkv, const int64_t *positions, const float *cos_t, const float *sin_t,
                       uint16_t *q_out, uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots,
                       int64_t num_tokens, int64_t num_heads, int64_t kv_heads, int64_t head_dim, int num_threads);
int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, uint16_t *out,
                                const int64_t *q_rows, const int64_t *nq,
                                const int64_t *ctx, const int64_t *tables, int64_t table_stride, int64_t num_seqs,
                                int64_t num_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
                                int num_threads);
int add_rms_norm_bf16(float *x, const uint16_t *delta, const float *weight, uint16_t *out, int64_t num_tokens,
                      int64_t hidden, float eps, int num_threads);
int silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t num_tokens, int64_t inter, int num_threads);
int sgmv_fits(int64_t in_dim, int64_t out_dim, int64_t nslices, const int64_t *outs, int64_t rank);
int sgmv_f32w_bf16(const uint16_t *x, uint16_t *y, int64_t nseg, const int64_t *starts, const int64_t *ends,
                   const int64_t *a_ptrs, const int64_t *b_ptrs, const int64_t *ranks, int64_t nslices,
                   const int64_t *outs, int64_t in_dim, int64_t out_dim, int num_threads);
int sgmv_bf16w_bf16(const uint16_t *x, uint16_t *y, int64_t nseg, const int64_t *starts, const int64_t *ends,
                    const int64_t *a_ptrs, const int64_t *b_ptrs, const int64_t *ranks, int64_t nslices,
                    const int64_t *outs, int64_t in_dim, int64_t out_dim, int num_threads);

/* A step's LoRA, for the four projection groups (q/k/v, o, gate/up, down) of every layer: the token segments
 * [starts[s], ends[s]) and, per (layer, group, segment), the A^T and B^T pointers (0: no LoRA there) and the
 * rank of each of the group's output slices (nslices[group] of them, outs[group][j] columns each; MAX_GROUP_SLICES
 * entries per segment). What sgmv_cpu_ of kernels/lora.py hands the SGMV kernel op by op, the segments without
 * weights left out the same way. */
#define GROUPS 4
#define MAX_GROUP_SLICES 3
typedef struct {
    int64_t nseg;
    const int64_t *starts, *ends;
    const int64_t *ptrs;   /* [layers, GROUPS, nseg, 2] */
    const int64_t *ranks;  /* [layers, GROUPS, nseg, MAX_GROUP_SLICES] */
    const int64_t *nslices; /* [GROUPS] */
    const int64_t *outs;   /* [GROUPS, MAX_GROUP_SLICES] */
    int bf16;              /* the weights' dtype: bfloat16 (1) or float32 (0) */
} Lora;

/* Whether the SGMV kernel takes group g of layer l (its slices, and every segment's total rank at these dims). */
static int lora_group_fits(const Lora *lo, int64_t l, int64_t g, int64_t in_dim, int64_t out_dim) {
    if (lo->nslices[g] < 1 || lo->nslices[g] > MAX_GROUP_SLICES) return 0;
    for (int64_t s = 0; s < lo->nseg; s++) {
        if (!lo->ptrs[((l * GROUPS + g) * lo->nseg + s) * 2]) continue; /* no weights there */
        const int64_t *rk = lo->ranks + ((l * GROUPS + g) * lo->nseg + s) * MAX_GROUP_SLICES;
        int64_t r = 0;
        for (int64_t j = 0; j < lo->nslices[g]; j++) r += rk[j];
        if (!sgmv_fits(in_dim, out_dim, lo->nslices[g], lo->outs + g * MAX_GROUP_SLICES, r)) return 0;
    }
    return 1;
}

static int lora_fits(const Lora *lo, int64_t num_layers, const int64_t *in_dims, const int64_t *out_dims) {
    if (lo->nseg == 0) return 1;
    for (int g = 0; g < GROUPS; g++)
        for (int64_t l = 0; l < num_layers; l++)
            if (!lora_group_fits(lo, l, g, in_dims[g], out_dims[g])) return 0;
    return 1;
}

/* y += the LoRA delta of x for group g of layer l: the segments with weights there, in order, in one call. */
static int lora_apply(const Lora *lo, int64_t l, int g, const uint16_t *x, uint16_t *y, int64_t in_dim,
                      int64_t out_dim, int64_t *work, int threads) {
    if (lo->nseg == 0) return 0;
    const int64_t n = lo->nseg, ns = lo->nslices[g];
    int64_t *st = work, *en = st + n, *a = en + n, *b = a + n, *rk = b + n, k = 0;
    for (int64_t s = 0; s < n; s++) {
        const int64_t *p = lo->ptrs + ((l * GROUPS + g) * n + s) * 2;
        if (!p[0] || lo->ends[s] <= lo->starts[s]) continue;
        st[k] = lo->starts[s];
        en[k] = lo->ends[s];
        a[k] = p[0];
        b[k] = p[1];
        for (int64_t j = 0; j < ns; j++) rk[k * ns + j] = lo->ranks[((l * GROUPS + g) * n + s) * MAX_GROUP_SLICES + j];
        k++;
    }
    if (k == 0) return 0;
    const int64_t *outs = lo->outs + g * MAX_GROUP_SLICES;
    return lo->bf16 ? sgmv_bf16w_bf16(x, y, k, st, en, a, b, rk, ns, outs, in_dim, out_dim, threads)
                    : sgmv_f32w_bf16(x, y, k, st, en, a, b, rk, ns, outs, in_dim, out_dim, threads);
}

/* The memory lora_apply reads for group g of layer l: each segment's A^T (one run) and the diagonal blocks of its
 * B^T (a run of outs[j] columns in each of the slice's rk[j] rows), into side (nseg * (1 + MAX_GROUP_SLICES)
 * entries); returns how many. */
static int64_t lora_regions(const Lora *lo, int64_t l, int g, int64_t in_dim, int64_t out_dim, pf_region *side) {
    if (lo->nseg == 0) return 0;
    const int64_t n = lo->nseg, ns = lo->nslices[g], esz = lo->bf16 ? 2 : 4;
    const int64_t *outs = lo->outs + g * MAX_GROUP_SLICES;
    int64_t k = 0;
    for (int64_t s = 0; s < n; s++) {
        const int64_t *p = lo->ptrs + ((l * GROUPS + g) * n + s) * 2;
        if (!p[0] || lo->ends[s] <= lo->starts[s]) continue;
        const int64_t *rk = lo->ranks + ((l * GROUPS + g) * n + s) * MAX_GROUP_SLICES;
        int64_t r_total = 0;
        for (int64_t j = 0; j < ns; j++) r_total += rk[j];
        side[k++] = (pf_region){(const char *)(intptr_t)p[0], 1, 0, in_dim * r_total * esz};
        for (int64_t j = 0, r0 = 0, c0 = 0; j < ns; r0 += rk[j], c0 += outs[j], j++)
            if (rk[j] > 0)
                side[k++] = (pf_region){(const char *)(intptr_t)p[1] + (r0 * out_dim + c0) * esz, rk[j], out_dim * esz,
                                        outs[j] * esz};
    }
    return k;
}

/* The K/V blocks a step's attention reads, each once: every sequence's first ceil(ctx / block_size) blocks (a block
 * that several sequences share, their prompt's cached prefix, listed once), into ids; returns how many, or -1
 * without memory. */
static int64_t kv_block_ids(const int64_t *tables, int64_t stride, const int64_t *ctx, int64_t num_seqs,
                            int64_t block_size, int64_t *ids) {
    int64_t n = 0, max_id = 0;
    for (int64_t i = 0; i < num_seqs; i++)
        for (int64_t b = 0; b < (ctx[i] + block_size - 1) / block_size; b++)
            max_id = tables[i * stride + b] > max_id ? tables[i * stride + b] : max_id;
    uint64_t *seen = calloc((size_t)(max_id / 64 + 1), sizeof(uint64_t));
    if (!seen) return -1;
    for (int64_t i = 0; i < num_seqs; i++)
        for (int64_t b = 0; b < (ctx[i] + block_size - 1) / block_size; b++) {
            const int64_t id = tables[i * stride + b];
            if (id < 0 || seen[id >> 6] >> (id & 63) & 1) continue;
            seen[id >> 6] |= (uint64_t)1 << (id & 63);
            ids[n++] = id;
        }
    free(seen);
    return n;
}

/* A layer's K and V blocks `ids` (block_size rows of `row` bf16 each) as side regions, K then V a block. */
static int64_t kv_regions(const uint16_t *kc, const uint16_t *vc, const int64_t *ids, int64_t n, int64_t block_size,
                          int64_t row, pf_region *side) {
    const int64_t bytes = block_size * row * 2;
    for (int64_t j = 0; j < n; j++) {
        side[2 * j] = (pf_region){(const char *)(kc + ids[j] * block_size * row), 1, 0, bytes};
        side[2 * j + 1] = (pf_region){(const char *)(vc + ids[j] * block_size * row), 1, 0, bytes};
    }
    return 2 * n;
}

/* y [rows, out_dim] bf16 += the LoRA delta of x [rows, in_dim] bf16 for group g of layer l of a step's table (the
 * op-by-op layers' call: the table is built once a step, not once a projection). Returns 0; -1 when the kernel
 * cannot take it (a segment past the rows, a group or layer out of range, dimensions it does not fit), nothing
 * changed then. */
int lora_group_bf16(const uint16_t *x, uint16_t *y, int64_t rows, int64_t in_dim, int64_t out_dim, int64_t l,
                    int64_t num_layers, int64_t g, int64_t nseg, const int64_t *starts, const int64_t *ends,
                    const int64_t *ptrs, const int64_t *ranks, const int64_t *nslices, const int64_t *outs, int bf16,
                    int num_threads) {
    const Lora lo = {nseg, starts, ends, ptrs, ranks, nslices, outs, bf16};
    if (nseg == 0) return 0;
    if (g < 0 || g >= GROUPS || l < 0 || l >= num_layers || nseg < 0 || num_threads < 1 ||
        !lora_group_fits(&lo, l, g, in_dim, out_dim))
        return -1;
    for (int64_t s = 0; s < nseg; s++)
        if (starts[s] < 0 || ends[s] > rows) return -1;
    int64_t *work = malloc(sizeof(int64_t) * (size_t)((4 + MAX_GROUP_SLICES) * nseg));
    if (work == NULL) return -1;
    const int rc = lora_apply(&lo, l, (int)g, x, y, in_dim, out_dim, work, num_threads);
    free(work);
    return rc;
}

/* One layer's pointers, as int64 in this order (kernels/native.py builds the table). */
enum { QKV, O = 4, GATE_UP = 8, DOWN = 12, POST_NORM = 16, NEXT_NORM, K_CACHE, V_CACHE, LAYER_FIELDS };

#define PTR(type, v) ((type)(intptr_t)(v))

/* A weight's four fields: codes, scales, zeros in the canonical layout (the AVX2 int4 kernel), or codes, scales
 * and 0 (float32 scales) or 1 (fp16) in the AVX512-BF16 kernel's tiled layout; then its dense bf16 copy in the
 * paired panels of gemm_bf16w_bf16 (0: none held), which takes the product from gemm_bf16w_min_rows() rows on,
 * and at every M in a step that computes prompt tokens, as `linear` of kernels/quant_cpu.py does op by op. */
static int dense_takes(const int64_t *w, int64_t m, int prompt) {
    return w[3] != 0 && (prompt || m >= gemm_bf16w_min_rows());
}

/* The product of weight w; `next` (NULL: none) is the weight of the product that comes after it, `next_n` by
 * `next_k`: where both are dense, each thread's last group here prefetches its first group there (those come from
 * memory: a layer's weights are read once a step and the model's do not fit in cache). */
static int gemm(const uint16_t *x, const int64_t *w, uint16_t *y, int64_t m, int64_t n, int64_t k, int prompt,
                const pf_region *side, int64_t nside, const int64_t *next, int64_t next_n, int64_t next_k,
                int threads) {
    if (dense_takes(w, m, prompt)) {
        const int dense_next = next != NULL && dense_takes(next, m, prompt);
        return gemm_bf16w_next(x, k, PTR(const uint16_t *, w[3]), y, n, m, n, k, side, nside,
                               dense_next ? PTR(const uint16_t *, next[3]) : NULL, next_n, next_k, threads);
    }
    if (w[2] == 0 || w[2] == 1)
        return q4b_gemm_bf16(x, PTR(const uint8_t *, w[0]), PTR(const void *, w[1]), (int)w[2], y, m, n, k, threads);
    return q4_gemm_bf16(x, PTR(const uint8_t *, w[0]), PTR(const float *, w[1]), PTR(const float *, w[2]), y, m, n, k,
                        threads);
}

static int gemm_fits(const int64_t *w, int64_t m, int64_t n, int64_t k, int prompt) {
    if (dense_takes(w, m, prompt)) return m >= 1 && n >= 1 && k >= 2 && k % 2 == 0;
    return w[2] == 0 || w[2] == 1 ? q4b_gemm_fits(m, n, k) : q4_gemm_fits(m, n, k);
}

/* lora_regions for the product of weight w at t rows into side, where that product takes the list (the dense one;
 * none without a side buffer): 0 otherwise. */
static int64_t lora_list(const Lora *lo, const int64_t *w, int64_t t, int prompt, int64_t l, int g, int64_t in_dim,
                         int64_t out_dim, pf_region *side) {
    return side && dense_takes(w, t, prompt) ? lora_regions(lo, l, g, in_dim, out_dim, side) : 0;
}

/* x [T, hidden] float32: the residual stream, updated in place; hs0 [T, hidden] bf16: the first layer's normed
 * input; layers [num_layers, LAYER_FIELDS]; the step's metadata as the rotary and attention kernels take it.
 * down [T, hidden] bf16 gets the last layer's down projection (the caller adds it and applies the final norm).
 * Every layer but the last ends with the residual add and the next layer's input norm.
 *
 * Returns 0; -1 when a kernel refused the step before x changed (the caller runs the layers one op at a time:
 * the K/V the first layer wrote are written again, to the same values); -2 when one failed after (out of
 * memory: the step is lost). */
int decode_layers_bf16(float *x, const uint16_t *hs0, uint16_t *down, const int64_t *layers, int64_t num_layers,
                       const int64_t *positions, const float *cos_t, const float *sin_t, const int64_t *slots,
                       const int64_t *q_rows, const int64_t *nq, const int64_t *ctx, const int64_t *tables,
                       int64_t table_stride, int64_t num_seqs, int64_t num_tokens, int64_t hidden, int64_t num_heads,
                       int64_t kv_heads, int64_t head_dim, int64_t inter, int64_t block_size, float eps, float scale,
                       int64_t lora_nseg, const int64_t *lora_starts, const int64_t *lora_ends,
                       const int64_t *lora_ptrs, const int64_t *lora_ranks, const int64_t *lora_nslices,
                       const int64_t *lora_outs, int lora_bf16, int prompt, int num_threads) {
    const int64_t t = num_tokens, qd = num_heads * head_dim, width = qd + 2 * kv_heads * head_dim;
    const Lora lo = {lora_nseg, lora_starts, lora_ends, lora_ptrs, lora_ranks, lora_nslices, lora_outs, lora_bf16};
    const int64_t in_dims[GROUPS] = {hidden, qd, hidden, inter}, out_dims[GROUPS] = {width, hidden, 2 * inter, hidden};
    /* The products' bounds, all checked now: the gate/up and down products run after the first residual add. */
    if (num_layers < 1 || num_threads < 1 || lora_nseg < 0 || !lora_fits(&lo, num_layers, in_dims, out_dims))
        return -1;
    for (int64_t l = 0; l < num_layers; l++) {
        const int64_t *p = layers + l * LAYER_FIELDS;
        if (!gemm_fits(p + QKV, t, width, hidden, prompt) || !gemm_fits(p + O, t, hidden, qd, prompt) ||
            !gemm_fits(p + GATE_UP, t, 2 * inter, hidden, prompt) || !gemm_fits(p + DOWN, t, hidden, inter, prompt))
            return -1;
    }
    if (block_size < 1) return -1;
    int64_t nblocks = 0; /* the K/V blocks the sequences' attention reads, shared ones counted for each */
    for (int64_t i = 0; i < num_seqs; i++) {
        if (ctx[i] < 1) return -1;
        nblocks += (ctx[i] + block_size - 1) / block_size;
    }
    const size_t elems = (size_t)(t * (width + 2 * qd + 2 * hidden + 3 * inter));
    uint16_t *buf = malloc(elems * sizeof(uint16_t));
    int64_t *work = malloc(sizeof(int64_t) * (size_t)((4 + MAX_GROUP_SLICES) * (lora_nseg > 0 ? lora_nseg : 1)));
    if (!buf || !work) {
        free(buf);
        free(work);
        return -1;
    }
    /* While a projection's dense product runs (bound by its instructions), its threads prefetch what kernels after
     * it read from memory (`pf_region`): the LoRA weights its group's SGMV reads and, during the gate/up and down
     * products, the next layer's K/V blocks (its attention's reads), shared between the two in proportion to
     * their pair steps (gu_share 1024ths). side: room for a group's LoRA regions, then the K/V regions; a product's
     * list is its LoRA regions moved right before its share of the K/V ones. The int4 kernel (fewer rows, bound by
     * memory itself) takes no list, and none is built for it (`lora_list`; the K/V one only where a gate/up or
     * down product is dense). Without memory for the lists the step runs without them. */
    int dense_mlp = 0;
    for (int64_t l = 0; l < num_layers && gemm_bf16w_available(); l++)
        dense_mlp |= dense_takes(layers + l * LAYER_FIELDS + GATE_UP, t, prompt) ||
                     dense_takes(layers + l * LAYER_FIELDS + DOWN, t, prompt);
    const int64_t lora_max = (1 + MAX_GROUP_SLICES) * lora_nseg, kv_cap = dense_mlp ? nblocks : 0;
    const int64_t gu_steps = (2 * inter + 47) / 48 * hidden, down_steps = (hidden + 47) / 48 * inter;
    const int64_t gu_share = 1024 * gu_steps / (gu_steps + down_steps);
    pf_region *side = malloc(sizeof(pf_region) * (size_t)(lora_max + 2 * kv_cap + 1));
    pf_region *kv_side = side ? side + lora_max : NULL;
    int64_t *kv_ids = side && kv_cap > 0 ? malloc(sizeof(int64_t) * (size_t)kv_cap) : NULL;
    const int64_t kv_n = kv_ids ? kv_block_ids(tables, table_stride, ctx, num_seqs, block_size, kv_ids) : 0; /* -1: none */
    uint16_t *qkv = buf, *q = qkv + t * width, *attn = q + t * qd, *o = attn + t * qd, *hs = o + t * hidden;
    uint16_t *gu = hs + t * hidden, *act = gu + t * 2 * inter;
    int rc = 0;
    for (int64_t l = 0; l < num_layers && rc == 0; l++) {
        const int64_t *p = layers + l * LAYER_FIELDS;
        uint16_t *kc = PTR(uint16_t *, p[K_CACHE]), *vc = PTR(uint16_t *, p[V_CACHE]);
        const uint16_t *in = l == 0 ? hs0 : hs;
        const int64_t *after_down = l + 1 < num_layers ? p + LAYER_FIELDS + QKV : NULL; /* the next layer's */
        if (gemm(in, p + QKV, qkv, t, width, hidden, prompt, side,
                 lora_list(&lo, p + QKV, t, prompt, l, 0, hidden, width, side), p + O, hidden, qd, num_threads) ||
            lora_apply(&lo, l, 0, in, qkv, hidden, width, work, num_threads) ||
            rope_write_kv_bf16(qkv, positions, cos_t, sin_t, q, kc, vc, slots, t, num_heads, kv_heads, head_dim,
                               num_threads) ||
            paged_decode_attention_bf16(q, kc, vc, attn, q_rows, nq, ctx, tables, table_stride, num_seqs,
                                        num_heads, kv_heads, head_dim, block_size, scale, num_threads) ||
            gemm(attn, p + O, o, t, hidden, qd, prompt, side, lora_list(&lo, p + O, t, prompt, l, 1, qd, hidden, side),
                 p + GATE_UP, 2 * inter, hidden, num_threads) ||
            lora_apply(&lo, l, 1, attn, o, qd, hidden, work, num_threads)) {
            rc = l == 0 ? -1 : -2;
            break;
        }
        add_rms_norm_bf16(x, o, PTR(const float *, p[POST_NORM]), hs, t, hidden, eps, num_threads);
        int64_t nkv = 0;
        if (kv_n > 0 && l + 1 < num_layers) {
            const int64_t *pn = p + LAYER_FIELDS;
            nkv = kv_regions(PTR(const uint16_t *, pn[K_CACHE]), PTR(const uint16_t *, pn[V_CACHE]), kv_ids, kv_n,
                             block_size, kv_heads * head_dim, kv_side);
        }
        const int64_t kv_gu = nkv * gu_share / 1024;
        int64_t nl = lora_list(&lo, p + GATE_UP, t, prompt, l, 2, hidden, 2 * inter, side);
        if (nl) memmove(kv_side - nl, side, sizeof(pf_region) * (size_t)nl);
        if (gemm(hs, p + GATE_UP, gu, t, 2 * inter, hidden, prompt, side ? kv_side - nl : NULL, nl + kv_gu,
                 p + DOWN, hidden, inter, num_threads) ||
            lora_apply(&lo, l, 2, hs, gu, hidden, 2 * inter, work, num_threads)) {
            rc = -2;
            break;
        }
        silu_mul_bf16(gu, act, t, inter, num_threads);
        nl = lora_list(&lo, p + DOWN, t, prompt, l, 3, inter, hidden, side);
        if (nl) memmove(kv_side + kv_gu - nl, side, sizeof(pf_region) * (size_t)nl);
        if (gemm(act, p + DOWN, down, t, hidden, inter, prompt, side ? kv_side + kv_gu - nl : NULL,
                 nl + nkv - kv_gu, after_down, width, hidden, num_threads) ||
            lora_apply(&lo, l, 3, act, down, inter, hidden, work, num_threads)) {
            rc = -2;
            break;
        }
        if (l + 1 < num_layers) add_rms_norm_bf16(x, down, PTR(const float *, p[NEXT_NORM]), hs, t, hidden, eps,
                                                  num_threads);
    }
    free(buf);
    free(work);
    free(side);
    free(kv_ids);
    return rc;
}
