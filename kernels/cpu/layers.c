/* A decode step's transformer layers in one call: what LlamaModel.forward runs layer by layer through the other
 * kernels of this library (the AVX2 int4 matmul, rotary embedding with the K/V write, paged decode attention,
 * residual add with RMS norm, SiLU-and-multiply), in the same order with the same arguments, so the results are
 * bit for bit the layer-by-layer path's. One call instead of ~9 per layer saves their Python wrappers (~10 us
 * each, a few ms of a ~14 ms single-request step on a 2-core AVX2 machine). It serves only the steps every one
 * of those kernels takes: int4 weights with groups of 32 at M <= Q4_MAX_M, decodes the attention kernel reads
 * alone (no shared-prefix cascade, no prefill), no LoRA; the caller checks that. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The kernels of decode.c and quant.c it calls. */
int q4_gemm_bf16(const uint16_t *x, const uint8_t *codes, const float *scales, const float *zeros, uint16_t *y,
                 int64_t m, int64_t n, int64_t k, int num_threads);
int q4_gemm_fits(int64_t m, int64_t n, int64_t k);
int rope_write_kv_bf16(const uint16_t *qkv, const int64_t *positions, const float *cos_t, const float *sin_t,
                       uint16_t *q_out, uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots,
                       int64_t num_tokens, int64_t num_heads, int64_t kv_heads, int64_t head_dim, int num_threads);
int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, uint16_t *out,
                                float *out_f32, float *lse, const int64_t *q_rows, const int64_t *nq,
                                const int64_t *ctx, const int64_t *tables, int64_t table_stride, int64_t num_seqs,
                                int64_t num_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
                                int num_threads);
int add_rms_norm_bf16(float *x, const uint16_t *delta, const float *weight, uint16_t *out, int64_t num_tokens,
                      int64_t hidden, float eps, int num_threads);
int silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t num_tokens, int64_t inter, int num_threads);

/* One layer's pointers, as int64 in this order (kernels/native.py builds the table). */
enum { QKV, O = 3, GATE_UP = 6, DOWN = 9, POST_NORM = 12, NEXT_NORM, K_CACHE, V_CACHE, LAYER_FIELDS };

#define PTR(type, v) ((type)(intptr_t)(v))

static int gemm(const uint16_t *x, const int64_t *w, uint16_t *y, int64_t m, int64_t n, int64_t k, int threads) {
    return q4_gemm_bf16(x, PTR(const uint8_t *, w[0]), PTR(const float *, w[1]), PTR(const float *, w[2]), y, m, n, k,
                        threads);
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
                       int num_threads) {
    const int64_t t = num_tokens, qd = num_heads * head_dim, width = qd + 2 * kv_heads * head_dim;
    /* The matmuls' bounds, all checked now: the gate/up and down products run after the first residual add. */
    if (num_layers < 1 || !q4_gemm_fits(t, width, hidden) || !q4_gemm_fits(t, hidden, qd) ||
        !q4_gemm_fits(t, 2 * inter, hidden) || !q4_gemm_fits(t, hidden, inter) || num_threads < 1)
        return -1;
    const size_t elems = (size_t)(t * (width + 2 * qd + 2 * hidden + 3 * inter));
    uint16_t *buf = malloc(elems * sizeof(uint16_t));
    if (!buf) return -1;
    uint16_t *qkv = buf, *q = qkv + t * width, *attn = q + t * qd, *o = attn + t * qd, *hs = o + t * hidden;
    uint16_t *gu = hs + t * hidden, *act = gu + t * 2 * inter;
    int rc = 0;
    for (int64_t l = 0; l < num_layers && rc == 0; l++) {
        const int64_t *p = layers + l * LAYER_FIELDS;
        uint16_t *kc = PTR(uint16_t *, p[K_CACHE]), *vc = PTR(uint16_t *, p[V_CACHE]);
        if (gemm(l == 0 ? hs0 : hs, p + QKV, qkv, t, width, hidden, num_threads) ||
            rope_write_kv_bf16(qkv, positions, cos_t, sin_t, q, kc, vc, slots, t, num_heads, kv_heads, head_dim,
                               num_threads) ||
            paged_decode_attention_bf16(q, kc, vc, attn, NULL, NULL, q_rows, nq, ctx, tables, table_stride, num_seqs,
                                        num_heads, kv_heads, head_dim, block_size, scale, num_threads) ||
            gemm(attn, p + O, o, t, hidden, qd, num_threads)) {
            rc = l == 0 ? -1 : -2;
            break;
        }
        add_rms_norm_bf16(x, o, PTR(const float *, p[POST_NORM]), hs, t, hidden, eps, num_threads);
        if (gemm(hs, p + GATE_UP, gu, t, 2 * inter, hidden, num_threads)) {
            rc = -2;
            break;
        }
        silu_mul_bf16(gu, act, t, inter, num_threads);
        if (gemm(act, p + DOWN, down, t, hidden, inter, num_threads)) {
            rc = -2;
            break;
        }
        if (l + 1 < num_layers) add_rms_norm_bf16(x, down, PTR(const float *, p[NEXT_NORM]), hs, t, hidden, eps,
                                                  num_threads);
    }
    free(buf);
    return rc;
}
