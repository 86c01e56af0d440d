/* What mpllama's CPU kernels share, across the files cpu_kernels.py builds into one
 * library (cpu_kernels.c, cpu_kernels_amx.c, cpu_kernels_attention.c,
 * cpu_kernels_layer.c): the packed layouts' block, how far ahead products ask for their
 * bytes, bf16 and activation loads and stores, e^x, int8's float steps, and the
 * functions one file calls in another. */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NB 64 /* output rows per packed block: oneDNN's blocking for one-row products */

/* The bf16 one-row product asks for its weight's bytes this far ahead, into L2. On huge
 * pages (as ranks allocate), a bf16 decode step of the bench model ran 2-7% faster with
 * it, interleaved, at every memory speed this machine showed (32 or 48 KB: the same);
 * with it, float32 products ran slower and the plain pass of reads up to 9%, so they
 * leave their reads to the CPU's prefetchers, as do batched products (10-20% slower at
 * 2-8 rows with it, on 4 KiB pages). The L1 hint made bf16 slower. The int8 one-row
 * product asks further ahead, INT8_AHEAD: two of every four lines 48 KB on made an int8
 * decode step 5-16% faster at every memory speed (16 KB: 0-8%; the L1 hint: 40% slower);
 * int4's products ask as far (1.7x at one row from memory on AVX-512, cpu_kernels_int4.c).
 * (benchmarks/RESULTS.md, "Figures behind the code".) */
#define AHEAD 16384
#define INT8_AHEAD 49152
static inline void ahead(const void *p) { _mm_prefetch((const char *)p + AHEAD, _MM_HINT_T1); }

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}

/* v rounded to bf16 (nearest even) and back */
static inline __m512 bf16x16_round(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void store_bf16(uint16_t *p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __mmask16 tail(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* Activations of either type: bf16 (uint16_t) or float32, chosen by a flag that each
 * exported function passes as a constant, so the compiler makes one copy per type. */
static inline __m512 load_act(const void *p, int64_t i, __mmask16 m, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + i, m) : _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

static inline void store_act(void *p, int64_t i, __m512 v, __mmask16 m, int bf16) {
    if (bf16)
        store_bf16((uint16_t *)p + i, v, m);
    else
        _mm512_mask_storeu_ps((float *)p + i, m, v);
}

/* v as the activation type holds it: rounded to bf16, or float32 as it is */
static inline __m512 round_act(__m512 v, int bf16) { return bf16 ? bf16x16_round(v) : v; }

static inline const void *offset(const void *p, int64_t i, int bf16) {
    return (const char *)p + i * (bf16 ? 2 : 4);
}

/* e^x for 16 floats: Cephes' expf (a degree-6 polynomial on x - n ln2, scaled by 2^n),
 * within 2 ulp over float's range. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)),
                      _mm512_set1_ps(88.3762626647949f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* The 16 outputs c of a row of an int4 weight after group g: its float32 sums of (q - 8) x
 * over the group times the group's scales, plus the zeros times the row's sum of x over
 * the group (xs), added to what the groups before gave. Both int4 kernels' last step. */
static inline __m512 int4_part(__m512 out, int64_t g, __m512 sums, __m512 scale, __m512 zero,
                               float xs) {
    const __m512 part = _mm512_fmadd_ps(sums, scale, _mm512_mul_ps(zero, _mm512_set1_ps(xs)));
    return g == 0 ? part : _mm512_add_ps(out, part);
}

/* The 16 outputs c of a row from its integer sums for group g: float(sums - 128 x the
 * weight row's sum) * w_scale * x_scale, added to what the groups before gave. */
static inline __m512 int8_part(__m512 out, int64_t g, __m512i sums, const int32_t *minus_sums,
                               const float *ws, float x_scale) {
    const __m512i exact =
        _mm512_add_epi32(sums, _mm512_slli_epi32(_mm512_loadu_si512(minus_sums), 7));
    const __m512 part = _mm512_mul_ps(
        _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_loadu_ps(ws)), _mm512_set1_ps(x_scale));
    return g == 0 ? part : _mm512_add_ps(out, part);
}

/* int4 weights' values q (0..15) to bf16 (q - 8) by a word lookup (vpermw, which reads
 * the low five bits of each index word): word i of the table holds (i & 15) - 8, so a
 * value in a word's low four bits indexes it whatever the bit above. */
static inline __m512i int4_table(void) {
    uint16_t t[32];
    for (int i = 0; i < 32; i++) {
        const float v = (float)((i & 15) - 8);
        uint32_t u;
        memcpy(&u, &v, 4);
        t[i] = (uint16_t)(u >> 16);
    }
    return _mm512_loadu_si512(t);
}

/* 64 bytes of int4 values (Int4Product's layout: 32 words, each holding value j of four
 * runs of 32, run i in its bits 4i..4i+3) into the four runs v[0..3] as bf16 (q - 8): one
 * load, three shifts, four lookups; a word's bits above the run's are the next run's, and
 * the table repeats itself past 15. Unpacking 32 bytes a run pair (vpmovzxbw, then two
 * lookups) took a shuffle more per 64 values, on the port the lookups and vdpbf16ps use. */
static inline __attribute__((always_inline)) void unpack4(const uint8_t *s, __m512i table, __m512bh v[4]) {
    const __m512i w = _mm512_loadu_si512(s);
    v[0] = (__m512bh)_mm512_permutexvar_epi16(w, table);
    v[1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
    v[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table);
    v[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table);
}

/* The same 64 bytes as unpack4, each value as bf16 1 + q/16 (0x3F80 | q << 3): a shift and
 * a bitwise select a run, on ports the lookups would share with vdpbf16ps. Products with
 * these are exact too; unbias4 turns a row's float32 sums of (1 + q/16) x over a group
 * into its sums of (q - 8) x: 16 sums - 24 sum(x). The values are about 6x the size of
 * (q - 8) / 16, so the sums carry more rounding: on a 2048x2048 weight in groups of 128,
 * 0.02% of the bf16 outputs differ from the exact sums', and the error against float64 is
 * unchanged (its 99th percentile 3.5e-3, bf16's own rounding). */
static inline __attribute__((always_inline)) void unpack4_biased(const uint8_t *s, __m512bh v[4]) {
    const __m512i w = _mm512_loadu_si512(s), m = _mm512_set1_epi16(0x0078),
                  one = _mm512_set1_epi16(0x3F80);
    v[0] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi16(w, 3), m, one, 0xEA); /* a & b | c */
    v[1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 1), m, one, 0xEA);
    v[2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 5), m, one, 0xEA);
    v[3] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 9), m, one, 0xEA);
}

static inline __m512 unbias4(__m512 sums, float xs) {
    return _mm512_fmsub_ps(sums, _mm512_set1_ps(16.0f), _mm512_set1_ps(24.0f * xs));
}

/* Whether the bf16 products and int8's batched ones run on AMX tiles (cpu_kernels_amx.c:
 * set only where Linux let this process use them). */
extern int use_amx;

/* cpu_kernels_amx.c */
void amx_product(const uint16_t *w, const uint16_t *x, void *y, int64_t M, int64_t N, int64_t Np,
                 int64_t K, int64_t nb, int out_bf16);
void amx_int8_product(const int8_t *const *w, const float *scales, const float *xs,
                      const uint8_t *u8, void *y, int64_t M, int64_t N, int64_t K, int64_t G,
                      int x_bf16);
void amx_int4_product(const uint8_t *w, const uint16_t *sz, const uint16_t *x, const float *xsum,
                      void *y, int64_t M, int64_t N, int64_t Np, int64_t K, int64_t gs,
                      int out_bf16);

/* cpu_kernels_int4.c */
void int4_product(const uint8_t *w, const uint16_t *sz, const uint16_t *x, void *y, int64_t M,
                  int64_t N, int64_t Np, int64_t K, int64_t gs, int out_bf16);

/* cpu_kernels.c */
void gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t Np, int64_t K,
               int64_t nb);
void gemv_f32(const float *w, const float *x, float *y, int64_t Np, int64_t K, int64_t nb);
void gemm_bf16_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t M, int64_t N,
                    int64_t Np, int64_t K, int64_t nb);
void gemv_int8(const int8_t *const *w, const float *scales, const void *x, int x_bf16,
               void *y, int64_t N, int64_t K, int64_t G, uint8_t *u8);
void gemm_int8(const int8_t *const *w, const float *scales, const void *x, int x_bf16,
               void *y, int64_t M, int64_t N, int64_t K, int64_t G, uint8_t *u8);

/* cpu_kernels_attention.c */
void attend_decode_bf16(const uint16_t *q, const uint16_t *kc, const uint16_t *vc,
                        const int64_t *firsts, const int64_t *counts, const int64_t *offsets,
                        uint16_t *out, int64_t B, int64_t KV, int64_t G, int64_t D, float scale);
void attend_decode_f32(const float *q, const float *kc, const float *vc,
                       const int64_t *firsts, const int64_t *counts, const int64_t *offsets,
                       float *out, int64_t B, int64_t KV, int64_t G, int64_t D, float scale);
