/* One-query attention of a decode step's rows over the block pool (bf16 or float32). */
#include "cpu_kernels.h"

#define CHUNK 64     /* positions scored at a time (online softmax between chunks) */
#define MAX_H 128    /* query heads a task holds (all of a row's on this rank, at most) */
#define MAX_HD 16384 /* query heads x head size */

/* Ask for the n values at element i + lead of a cache, into L2. */
static inline void share_ahead(const void *cache, int64_t i, int64_t lead, int64_t n, int bf16) {
    const char *p = (const char *)offset(cache, i + lead, bf16);
    for (int64_t b = 0; b < n * (bf16 ? 2 : 4); b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

/* Attention of one new token per row over the positions it holds, G query heads per KV
 * head, bf16 or float32 throughout (``bf16``):
 *   q       [B, KV*G, D] (contiguous), each row's query;
 *   kc, vc  one layer's caches [P, KV, D]: cache position p, KV head h at (p*KV + h)*D;
 *   row b reads its segments firsts[i], counts[i] for i in offsets[b] .. offsets[b+1]-1,
 *   in order (consecutive cache positions each), whatever blocks they sit in;
 *   out     [B, KV*G, D].
 * A task is one row's heads (or, with fewer rows than threads, a share of them, only as
 * many shares as give every thread a task: a share's reads are strided, and 2-3 rows
 * split in shares for twice the threads read 1.3-2x slower than whole rows) and walks
 * the row's positions in order, every head of a position before the next: the bytes it
 * reads are one run per segment, front to back, which the CPU's prefetchers stream at
 * close to the memory's speed (a task per head of a position-major cache, or a
 * head-major cache, reads short runs far apart: 2-3x slower cold,
 * benchmarks/RESULTS.md, "Figures behind the code"). Each head's arithmetic is the same
 * as alone, in the same order. Scores and the softmax are in float32 (online: a chunk
 * of positions at a time), the weighted sum of v in float32, rounded to bf16 (for bf16)
 * once at the end. */
static inline void attend_decode(const void *q, const void *kc, const void *vc,
                                 const int64_t *firsts, const int64_t *counts,
                                 const int64_t *offsets, void *out, int64_t B, int64_t KV,
                                 int64_t G, int64_t D, float scale, const int bf16) {
    int64_t splits = 1; /* tasks per row, each a run of KV / splits heads */
    while (B * splits < omp_get_max_threads() && KV % (2 * splits) == 0) splits *= 2;
    const int64_t per = KV / splits, HG = per * G; /* KV heads, query heads a task */
    /* A task that reads a share of each position's heads (splits > 1: a row) asks for
     * its bytes AHEAD of its reads, within the segment: the CPU's prefetchers do not follow
     * its strided reads (1 row of 512 positions: 0.20 -> 0.10 ms a layer). A task reading
     * whole positions reads one run, which they stream; asking there measured 10-20%
     * slower (32 rows of 64 positions), the prefetches costing more than they gave. */
    const int64_t lead = splits > 1 ? AHEAD / (KV * D * (bf16 ? 2 : 4)) + 1 : INT64_MAX;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * splits; task++) {
        const int64_t b = task / splits, h0 = task % splits * per;
        const int64_t qb = (b * KV + h0) * G * D; /* this task's queries, in elements */
        float acc[MAX_HD], m[MAX_H], l[MAX_H], s[MAX_H * CHUNK];
        for (int64_t i = 0; i < HG * D; i++) acc[i] = 0.0f;
        for (int64_t g = 0; g < HG; g++) m[g] = -INFINITY, l[g] = 0.0f;
        for (int64_t seg = offsets[b]; seg < offsets[b + 1]; seg++) {
            for (int64_t s0 = 0; s0 < counts[seg]; s0 += CHUNK) {
                const int64_t n = counts[seg] - s0 < CHUNK ? counts[seg] - s0 : CHUNK;
                /* the first of this chunk's positions, at this task's first head */
                const int64_t kb = ((firsts[seg] + s0) * KV + h0) * D;
                /* this chunk's scores: s[g][j] = q_g . k_(s0+j) * scale */
                for (int64_t j = 0; j < n; j++) {
                    if (lead < counts[seg] - s0 - j) /* the position AHEAD, in the segment */
                        share_ahead(kc, kb + j * KV * D, lead * KV * D, per * D, bf16);
                    for (int64_t g = 0; g < HG; g++) {
                        const int64_t kr = kb + j * KV * D + g / G * D, qg = qb + g * D;
                        __m512 a = _mm512_setzero_ps();
                        if (bf16)
                            for (int64_t d = 0; d < D; d += 32)
                                a = _mm512_dpbf16_ps(
                                    a, (__m512bh)_mm512_loadu_si512((const uint16_t *)kc + kr + d),
                                    (__m512bh)_mm512_loadu_si512((const uint16_t *)q + qg + d));
                        else
                            for (int64_t d = 0; d < D; d += 16)
                                a = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)kc + kr + d),
                                                    _mm512_loadu_ps((const float *)q + qg + d), a);
                        s[g * CHUNK + j] = _mm512_reduce_add_ps(a) * scale;
                    }
                }
                /* online softmax: what is summed so far, rescaled to the new running max */
                for (int64_t g = 0; g < HG; g++) {
                    float *sg = s + g * CHUNK;
                    __m512 vmax = _mm512_set1_ps(m[g]);
                    for (int64_t j = 0; j < n; j += 16)
                        vmax = _mm512_mask_max_ps(vmax, tail(n - j), vmax,
                                                  _mm512_maskz_loadu_ps(tail(n - j), sg + j));
                    const float mx = _mm512_reduce_max_ps(vmax);
                    const float c = expf(m[g] - mx);
                    __m512 vsum = _mm512_setzero_ps();
                    for (int64_t j = 0; j < n; j += 16) {
                        const __mmask16 k = tail(n - j);
                        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg + j),
                                                             _mm512_set1_ps(mx)));
                        _mm512_mask_storeu_ps(sg + j, k, e);
                        vsum = _mm512_mask_add_ps(vsum, k, vsum, e);
                    }
                    const float sum = _mm512_reduce_add_ps(vsum);
                    l[g] = l[g] * c + sum;
                    m[g] = mx;
                    if (c != 1.0f)
                        for (int64_t d = 0; d < D; d++) acc[g * D + d] *= c;
                }
                /* acc[g] += sum_j p[g][j] * v_(s0+j) */
                for (int64_t j = 0; j < n; j++) {
                    if (lead < counts[seg] - s0 - j)
                        share_ahead(vc, kb + j * KV * D, lead * KV * D, per * D, bf16);
                    for (int64_t h = 0; h < per; h++) {
                        const int64_t vr = kb + j * KV * D + h * D;
                        for (int64_t d = 0; d < D; d += 16) {
                            const __m512 vv = load_act(vc, vr + d, 0xFFFF, bf16);
                            for (int64_t g = h * G; g < (h + 1) * G; g++) {
                                float *a = acc + g * D + d;
                                _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(s[g * CHUNK + j]),
                                                                    vv, _mm512_loadu_ps(a)));
                            }
                        }
                    }
                }
            }
        }
        for (int64_t g = 0; g < HG; g++) {
            const __m512 inv = _mm512_set1_ps(1.0f / l[g]);
            for (int64_t d = 0; d < D; d += 16)
                store_act(out, qb + g * D + d, _mm512_mul_ps(_mm512_loadu_ps(acc + g * D + d), inv),
                          0xFFFF, bf16);
        }
    }
}

void attend_decode_bf16(const uint16_t *q, const uint16_t *kc, const uint16_t *vc,
                        const int64_t *firsts, const int64_t *counts, const int64_t *offsets,
                        uint16_t *out, int64_t B, int64_t KV, int64_t G, int64_t D, float scale) {
    attend_decode(q, kc, vc, firsts, counts, offsets, out, B, KV, G, D, scale, 1);
}

void attend_decode_f32(const float *q, const float *kc, const float *vc,
                       const int64_t *firsts, const int64_t *counts, const int64_t *offsets,
                       float *out, int64_t B, int64_t KV, int64_t G, int64_t D, float scale) {
    attend_decode(q, kc, vc, firsts, counts, offsets, out, B, KV, G, D, scale, 0);
}
