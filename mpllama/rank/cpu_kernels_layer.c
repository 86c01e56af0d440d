/* A decode layer on the CPU: its small steps fused (norms, RoPE with the cache writes,
 * SiLU), and the whole layer for a decode step's rows as two calls. */
#include "cpu_kernels.h"

/* A decode layer's small steps, fused: each replaces several torch ops (a few microseconds of dispatch each,
 * which at one row cost more than their arithmetic). bf16 or float32 in and out (the
 * ``bf16`` flag, as for attention), float32 inside. */

/* Per row of D: h = x + delta (delta NULL: h = x, not written), then RMSNorm:
 * out = act(act(h / sqrt(mean(h^2) + eps)) * w), act() rounding to bf16 where
 * model.RMSNorm rounds (nothing in float32). The residual stream (x, h) is float32 in
 * either type, as model.Transformer keeps it; delta, w and out are the activations' type. */
static inline void add_rmsnorm(const float *x, const void *delta, const void *w, float *h,
                               void *out, int64_t M, int64_t D, float eps, const int bf16) {
#pragma omp parallel for schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        const int64_t row = m * D;
        const float *hx = delta ? h : x; /* where the row's h is read back from */
        __m512 ss = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 k = tail(D - d);
            __m512 v = _mm512_maskz_loadu_ps(k, x + row + d);
            if (delta) {
                v = _mm512_add_ps(v, load_act(delta, row + d, k, bf16));
                _mm512_mask_storeu_ps(h + row + d, k, v);
            }
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 k = tail(D - d);
            const __m512 normed = round_act(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, hx + row + d), r), bf16);
            store_act(out, row + d, _mm512_mul_ps(normed, load_act(w, d, k, bf16)), k, bf16);
        }
    }
}

void add_rmsnorm_bf16(const float *x, const uint16_t *delta, const uint16_t *w, float *h,
                      uint16_t *out, int64_t M, int64_t D, float eps) {
    add_rmsnorm(x, delta, w, h, out, M, D, eps, 1);
}

void add_rmsnorm_f32(const float *x, const float *delta, const float *w, float *h, float *out,
                     int64_t M, int64_t D, float eps) {
    add_rmsnorm(x, delta, w, h, out, M, D, eps, 0);
}

/* One new token per row: rotate its q and k heads (RoPE, Meta's interleaved pairs) and
 * write its k and v into the caches at the row's position.
 *   qkv   [B, (H + 2*KV) * D], the fused projection's output (q heads, k, v);
 *   cis   [B, D/2, 2] float32, cos and sin of the row's position;
 *   pos   [B], the cache position each row writes;
 *   cache_k, cache_v  [P, KV, D];  q [B, H, D] out. */
static inline void rope_write(const void *qkv, const float *cis, const int64_t *pos,
                              void *cache_k, void *cache_v, void *q, int64_t B, int64_t H,
                              int64_t KV, int64_t D, const int bf16) {
    const int64_t stride = (H + 2 * KV) * D;
    /* pairs (x0, x1) -> (x0 c - x1 s, x0 s + x1 c), 8 pairs (16 values) at a time */
    const __m512i swap = _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
#pragma omp parallel for schedule(static) if (B > 1)
    for (int64_t b = 0; b < B; b++) {
        const float *cs = cis + b * D;
        for (int64_t head = 0; head < H + KV; head++) {
            const int64_t src = b * stride + head * D;
            void *dst = head < H ? q : cache_k;
            const int64_t at = head < H ? (b * H + head) * D : (pos[b] * KV + head - H) * D;
            for (int64_t d = 0; d < D; d += 16) {
                const __mmask16 k = tail(D - d);
                const __m512 v = load_act(qkv, src + d, k, bf16);
                const __m512 c = _mm512_maskz_loadu_ps(k, cs + d); /* c0 s0 c1 s1 ... */
                const __m512 cos = _mm512_moveldup_ps(c), sin = _mm512_movehdup_ps(c);
                const __m512 vs = _mm512_permutexvar_ps(swap, v); /* x1 x0 ... */
                /* even lanes: x0 c - x1 s; odd lanes: x1 c + x0 s */
                store_act(dst, at + d, _mm512_fmaddsub_ps(v, cos, _mm512_mul_ps(vs, sin)), k, bf16);
            }
        }
        memcpy((void *)offset(cache_v, pos[b] * KV * D, bf16),
               offset(qkv, b * stride + (H + KV) * D, bf16), KV * D * (bf16 ? 2 : 4));
    }
}

void rope_write_bf16(const uint16_t *qkv, const float *cis, const int64_t *pos,
                     uint16_t *cache_k, uint16_t *cache_v, uint16_t *q, int64_t B, int64_t H,
                     int64_t KV, int64_t D) {
    rope_write(qkv, cis, pos, cache_k, cache_v, q, B, H, KV, D, 1);
}

void rope_write_f32(const float *qkv, const float *cis, const int64_t *pos, float *cache_k,
                    float *cache_v, float *q, int64_t B, int64_t H, int64_t KV, int64_t D) {
    rope_write(qkv, cis, pos, cache_k, cache_v, q, B, H, KV, D, 0);
}

/* out = act(silu(gate)) * up per row, gate and up the halves of gu [M, 2F] (the fused
 * w1/w3 product's output); silu(g) = g / (1 + e^-g). */
static inline void silu_mul(const void *gu, void *out, int64_t M, int64_t F, const int bf16) {
#pragma omp parallel for schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        const int64_t g = m * 2 * F, u = g + F;
        for (int64_t i = 0; i < F; i += 16) {
            const __mmask16 k = tail(F - i);
            const __m512 gv = load_act(gu, g + i, k, bf16);
            const __m512 s = _mm512_div_ps(
                gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            store_act(out, m * F + i, _mm512_mul_ps(round_act(s, bf16), load_act(gu, u + i, k, bf16)),
                      k, bf16);
        }
    }
}

void silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t M, int64_t F) {
    silu_mul(gu, out, M, F, 1);
}

void silu_mul_f32(const float *gu, float *out, int64_t M, int64_t F) { silu_mul(gu, out, M, F, 0); }

/* A layer for one new token of each of M rows, bf16 or float32, as two calls (the
 * attention half, the feed-forward half), each ending in a row-parallel product whose
 * output the caller sums over the ranks before the next call. The same kernels as above,
 * in the same order and with the same roundings as the layer's torch path with them
 * (model.TransformerBlock.fused): only Python's part between them goes. One row's
 * products are the one-row kernels (gemv_*); several rows' are gemm_bf16 or gemm_int8, as
 * OneRowProduct.batched and Int8OneRow.batched run them, so a row's bits do not depend
 * on the path. Layouts:
 * row_decode.py's structs. */

typedef struct {
    int64_t kind;            /* 0: bf16 (gemv_bf16); 1: int8 (gemv_int8); 2: float32 (gemv_f32);
                                3: int4 (int4_product) */
    const void *w;           /* bf16, float32: the packed weight; int8: its groups' tensors */
    const void *scales;      /* int8: [groups, N] float32; int4: its bf16 scales and zeros */
    int64_t N, K, groups;    /* N: output rows, padded to whole blocks but for int8; groups:
                                int8's input groups, int4's inputs a group */
    int64_t rows;            /* the real output rows: an output row's stride for M > 1 */
    int64_t nb;              /* bf16, float32: rows a packed block (64, or 32 for AMX) */
} product_t;

typedef struct {
    product_t wqkv, wo, w13, w2;
    const void *attn_norm, *ffn_norm;
    void *cache_k, *cache_v; /* [P, KV, D] */
} layer_t;

typedef struct {
    int64_t dim, H, KV, D, F;    /* this rank's sizes; F: the feed-forward's hidden size */
    int64_t bf16;                /* the activations' type: bf16 (1) or float32 (0) */
    float eps, scale;
    /* workspace, each as large as its product for the most rows a call takes */
    void *normed, *qkv, *q, *attn, *gu, *act;
    uint8_t *u8; /* int8 products' quantized rows: the most rows x the widest input */
} row_shape_t;

/* y = x @ w.T for M rows of x: M == 1 the one-row kernels (y padded to p->N); M > 1 bf16
 * or int8 in a bf16 model (row_decode.py builds no other), y [M, p->rows]. */
static void product(const product_t *p, const void *x, void *y, int64_t M, uint8_t *u8, int bf16) {
    if (p->kind == 3) /* int4: any M, bf16 (row_decode.py builds no other) */
        int4_product((const uint8_t *)p->w, (const uint16_t *)p->scales, (const uint16_t *)x, y, M,
                     p->rows, p->N, p->K, p->groups, 1);
    else if (M > 1 && p->kind == 1)
        gemm_int8((const int8_t *const *)p->w, p->scales, x, bf16, y, M, p->N, p->K, p->groups, u8);
    else if (M > 1)
        gemm_bf16_bf16((const uint16_t *)p->w, (const uint16_t *)x, (uint16_t *)y, M, p->rows, p->N, p->K,
                       p->nb);
    else if (p->kind == 0)
        gemv_bf16((const uint16_t *)p->w, (const uint16_t *)x, (uint16_t *)y, p->N, p->K, p->nb);
    else if (p->kind == 1)
        gemv_int8((const int8_t *const *)p->w, p->scales, x, bf16, y, p->N, p->K, p->groups, u8);
    else
        gemv_f32((const float *)p->w, (const float *)x, (float *)y, p->N, p->K, p->nb);
}

static inline void row_attention(const layer_t *L, const row_shape_t *s, float *h, const void *delta,
                                 const float *cis, const int64_t *pos, const int64_t *firsts,
                                 const int64_t *counts, const int64_t *offsets, int64_t M,
                                 void *out, const int bf16) {
    add_rmsnorm(h, delta, L->attn_norm, h, s->normed, M, s->dim, s->eps, bf16);
    product(&L->wqkv, s->normed, s->qkv, M, s->u8, bf16);
    rope_write(s->qkv, cis, pos, L->cache_k, L->cache_v, s->q, M, s->H, s->KV, s->D, bf16);
    if (bf16)
        attend_decode_bf16(s->q, L->cache_k, L->cache_v, firsts, counts, offsets, s->attn, M,
                           s->KV, s->H / s->KV, s->D, s->scale);
    else
        attend_decode_f32(s->q, L->cache_k, L->cache_v, firsts, counts, offsets, s->attn, M,
                          s->KV, s->H / s->KV, s->D, s->scale);
    product(&L->wo, s->attn, out, M, s->u8, bf16);
}

/* h: the rows' residual [M, dim], float32, first h += delta where delta is not NULL (the
 * previous layer's summed feed-forward output); then out = wo(attention(norm(h))), each
 * row's attention over its segments (row m's: offsets[m] .. offsets[m+1]-1 of firsts,
 * counts) after RoPE and the cache writes at pos[m]; cis [M, D/2, 2] float32. */
void row_attention_step(const layer_t *L, const row_shape_t *s, float *h, const void *delta,
                        const float *cis, const int64_t *pos, const int64_t *firsts,
                        const int64_t *counts, const int64_t *offsets, int64_t M, void *out) {
    if (s->bf16)
        row_attention(L, s, h, delta, cis, pos, firsts, counts, offsets, M, out, 1);
    else
        row_attention(L, s, h, delta, cis, pos, firsts, counts, offsets, M, out, 0);
}

static inline void row_feed_forward(const layer_t *L, const row_shape_t *s, float *h,
                                    const void *delta, int64_t M, void *out, const int bf16) {
    add_rmsnorm(h, delta, L->ffn_norm, h, s->normed, M, s->dim, s->eps, bf16);
    product(&L->w13, s->normed, s->gu, M, s->u8, bf16);
    silu_mul(s->gu, s->act, M, s->F, bf16);
    product(&L->w2, s->act, out, M, s->u8, bf16);
}

/* h += delta (the summed attention output), then out = w2(silu(w1 x) * w3 x) of
 * x = norm(h), for M rows. */
void row_feed_forward_step(const layer_t *L, const row_shape_t *s, float *h, const void *delta,
                           int64_t M, void *out) {
    if (s->bf16)
        row_feed_forward(L, s, h, delta, M, out, 1);
    else
        row_feed_forward(L, s, h, delta, M, out, 0);
}
