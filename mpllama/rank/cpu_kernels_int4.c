/* int4 weights (quant.Int4Weight: w = (q - 8) * scale + zero, q 0..15, a bf16 scale and
 * zero per group of gs inputs) times bf16 rows, for any number of rows M: y [M, N] (row
 * stride N), bf16 (out_bf16) or float32. One layout for both kernels:
 *   w   Np/32 blocks of 32 outputs, each 16 K bytes: the block's values (q - 8) in the
 *       bf16 layout the products read ([K/2][32][2]), 128 at a time in 64 bytes (two
 *       input pairs, four runs of 32): value j of run i in bits 4i..4i+3 of 16-bit word
 *       j (cpu_products.int4_product packs it; unpack4 in cpu_kernels.h reads it);
 *   sz  [Np/32][K/gs][2][32] bf16: each block's scales, then zeros, per group.
 * Where the bf16 products run on AMX tiles, int4's do too (amx_int4_product); elsewhere on
 * AVX-512 (int4_avx512). Either way every row's sums are its own, in the same order
 * whatever the row count, so a row's result is the same alone as in any batch. */
#include "cpu_kernels.h"

/* The AVX-512 kernel: each 64 bytes hold two input pairs' values for a block's 32 outputs,
 * in the runs vdpbf16ps takes against a pair broadcast (outputs 0-15, 16-31), so
 * unpack4_biased puts them straight into registers, with no buffer. For B blocks of 32
 * outputs and R rows (constants, and the arrays sized for the most, so the sums stay in
 * registers: sized [R] they were variable-length arrays, and gcc kept them on the stack,
 * a store and a load in every vdpbf16ps chain), group by group: each row's float32 sums of
 * (1 + q/16) x over the group's pairs in order, then out += unbias4(sums) * scale +
 * zero * sum(x over the group). The first pass over a block asks for every line
 * INT8_AHEAD on, into L2, as the int8 one-row product does: one row read 11.5 GB/s from
 * memory asking 16 KB ahead (AHEAD, the bf16 product's), 19.5 at 48 KB (24 of Llama 3.2
 * 1B's 16384x2048 w13, 384 MiB, runs interleaved; no change where the weights sit in L3). */
enum { INT4_MAX_B = 2, INT4_MAX_R = 8 };

static inline __attribute__((always_inline)) void int4_rows(
    const uint8_t *w, const uint16_t *sz, const uint32_t *pairs, const float *xsum, void *y,
    int64_t b, int64_t m0, int64_t N, int64_t K, int64_t gs, int out_bf16, int ask, const int R,
    const int B) {
    const int64_t G = K / gs;
    __m512 out[INT4_MAX_B][INT4_MAX_R][2];
    for (int64_t g = 0; g < G; g++) {
        __m512 a[INT4_MAX_B][INT4_MAX_R][2];
        for (int j = 0; j < B; j++)
            for (int r = 0; r < R; r++) a[j][r][0] = a[j][r][1] = _mm512_setzero_ps();
        for (int64_t p = g * gs / 2; p < (g + 1) * gs / 2; p += 2) {
            __m512bh v[INT4_MAX_B][4];
            for (int j = 0; j < B; j++) {
                const uint8_t *s = w + (b + j) * 16 * K + 32 * p;
                if (ask) _mm_prefetch((const char *)s + INT8_AHEAD, _MM_HINT_T1);
                unpack4_biased(s, v[j]);
            }
            for (int r = 0; r < R; r++) {
                const __m512bh x0 = (__m512bh)_mm512_set1_epi32((int)pairs[(m0 + r) * K / 2 + p]);
                const __m512bh x1 = (__m512bh)_mm512_set1_epi32((int)pairs[(m0 + r) * K / 2 + p + 1]);
                for (int j = 0; j < B; j++) {
                    a[j][r][0] = _mm512_dpbf16_ps(a[j][r][0], v[j][0], x0);
                    a[j][r][1] = _mm512_dpbf16_ps(a[j][r][1], v[j][1], x0);
                }
                for (int j = 0; j < B; j++) {
                    a[j][r][0] = _mm512_dpbf16_ps(a[j][r][0], v[j][2], x1);
                    a[j][r][1] = _mm512_dpbf16_ps(a[j][r][1], v[j][3], x1);
                }
            }
        }
        for (int j = 0; j < B; j++) {
            const uint16_t *q = sz + ((b + j) * G + g) * 64;
            const __m512 scale[2] = {load_bf16(q, 0xFFFF), load_bf16(q + 16, 0xFFFF)};
            const __m512 zero[2] = {load_bf16(q + 32, 0xFFFF), load_bf16(q + 48, 0xFFFF)};
            for (int r = 0; r < R; r++) {
                const float xs = xsum[(m0 + r) * G + g];
                for (int c = 0; c < 2; c++)
                    out[j][r][c] = int4_part(out[j][r][c], g, unbias4(a[j][r][c], xs), scale[c], zero[c], xs);
            }
        }
    }
    for (int j = 0; j < B; j++) {
        const int64_t n0 = (b + j) * 32, valid = N - n0 < 32 ? N - n0 : 32;
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 2 && 16 * c < valid; c++)
                store_act(y, (m0 + r) * N + n0 + 16 * c, out[j][r][c], tail(valid - 16 * c), out_bf16);
    }
}

/* One row: two blocks at a time, so four chains of vdpbf16ps run side by side where one
 * block's two would wait on each other's latency (each output's sums in the same order,
 * so the same bits). More rows: in eights, then a four, then the last one to three
 * together, each row's sums in the same order either way. Eights against fours only:
 * 16 / 32 rows 8% faster (24 of the bench model's int4 weights, tiles off: 17.2 -> 15.7 ms,
 * 33.0 -> 30.4), bound by vdpbf16ps as the bf16 product is. */
static void int4_avx512(const uint8_t *w, const uint16_t *sz, const uint16_t *x, const float *xsum,
                        void *y, int64_t M, int64_t N, int64_t Np, int64_t K, int64_t gs,
                        int out_bf16) {
    const uint32_t *pairs = (const uint32_t *)x;
    const int64_t blocks = Np / 32;
    if (M == 1) {
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < blocks; b += 2) {
            if (b + 1 < blocks)
                int4_rows(w, sz, pairs, xsum, y, b, 0, N, K, gs, out_bf16, 1, 1, 2);
            else
                int4_rows(w, sz, pairs, xsum, y, b, 0, N, K, gs, out_bf16, 1, 1, 1);
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t m0 = 0;
        for (; m0 + 8 <= M; m0 += 8)
            int4_rows(w, sz, pairs, xsum, y, b, m0, N, K, gs, out_bf16, m0 == 0, 8, 1);
        for (; m0 + 4 <= M; m0 += 4)
            int4_rows(w, sz, pairs, xsum, y, b, m0, N, K, gs, out_bf16, m0 == 0, 4, 1);
        switch (M - m0) {
        case 3: int4_rows(w, sz, pairs, xsum, y, b, m0, N, K, gs, out_bf16, m0 == 0, 3, 1); break;
        case 2: int4_rows(w, sz, pairs, xsum, y, b, m0, N, K, gs, out_bf16, m0 == 0, 2, 1); break;
        case 1: int4_rows(w, sz, pairs, xsum, y, b, m0, N, K, gs, out_bf16, m0 == 0, 1, 1); break;
        }
    }
}

void int4_product(const uint8_t *w, const uint16_t *sz, const uint16_t *x, void *y, int64_t M,
                  int64_t N, int64_t Np, int64_t K, int64_t gs, int out_bf16) {
    const int64_t G = K / gs;
    float *xsum = malloc(M * G * sizeof(float)); /* each row's sum of x per group */
#pragma omp parallel for schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 16)
                a = _mm512_add_ps(a, load_bf16(x + m * K + k, 0xFFFF));
            xsum[m * G + g] = _mm512_reduce_add_ps(a);
        }
    if (use_amx)
        amx_int4_product(w, sz, x, xsum, y, M, N, Np, K, gs, out_bf16);
    else
        int4_avx512(w, sz, x, xsum, y, M, N, Np, K, gs, out_bf16);
    free(xsum);
}
