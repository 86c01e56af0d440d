/* mpllama's decode kernels for CPU ranks with AVX-512 (this file and the three beside
 * it): one-row products (bf16, fp32, int8), float32 logits of bf16 rows, one-query
 * attention over the block pool, a decode layer's small steps fused (bf16 or float32),
 * and a decode step's whole layer as two calls.
 * Built on first use by cpu_kernels.py with the machine's C compiler, with the files
 * beside it (cpu_kernels.h says what they share), and called through ctypes on torch
 * tensors' memory. This file: the products on AVX-512 (one row, a decode step's few rows,
 * int8), and two small helpers; cpu_kernels_amx.c: the products on AMX tiles, where the
 * CPU has them; cpu_kernels_int4.c: int4 weights' product, on either;
 * cpu_kernels_attention.c: one-query attention; cpu_kernels_layer.c: a decode layer's
 * small steps and the whole layer as two calls.
 *
 * Needs AVX-512 with bf16 and VNNI dot products (cpu_kernels.CPU_FLAGS).
 *
 * Why: a single request's decode step is bound by reading the weights, once per token.
 * oneDNN's packed product reads a weight at about 65% of what this CPU's memory gives
 * when the input has one row (it is built for blocks of rows); these loops stream the
 * same packed weight once, front to back, at close to the memory's speed. The weights
 * stay in oneDNN's packed layout, so batched steps keep oneDNN's kernels on the same
 * bytes (cpu_kernels.py checks the layout on this machine before any kernel reads it).
 *
 * Threads: OpenMP, linked against the libgomp torch has already loaded, so these loops
 * run on torch's own thread pool and its thread count.
 */
#include "cpu_kernels.h"

/* y[n] = sum_k w[n,k] x[k] for n < Np (rows padded to whole blocks).
 * w: bf16 in oneDNN's blocked layout [Np/nb][K/2][nb][2], nb = 64 rows a block, or 32
 * where oneDNN packs for AMX; x: K bf16; y: Np bf16, rounded to nearest even from float32
 * sums (as oneDNN rounds), or the float32 sums of the first ``valid`` rows (out_bf16 0:
 * a row's logits). One block, nb a constant where it is inlined. */
static inline void gemv_bf16_block(const uint16_t *p, const uint32_t *pairs, void *y, int64_t n0,
                                   int64_t valid, int64_t K, const int nb, const int every,
                                   const int out_bf16) {
    __m512 a[4];
    for (int c = 0; c < nb / 16; c++) a[c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K / 2; k++, p += 2 * nb) {
        for (int c = 0; c < nb / (every ? 16 : 32); c++) ahead(p + 32 * c);
        __m512bh xk = (__m512bh)_mm512_set1_epi32((int)pairs[k]);
        for (int c = 0; c < nb / 16; c++)
            a[c] = _mm512_dpbf16_ps(a[c], (__m512bh)_mm512_loadu_si512(p + 32 * c), xk);
    }
    for (int c = 0; c < nb / 16 && 16 * c < valid; c++)
        store_act(y, n0 + 16 * c, a[c], tail(valid - 16 * c), out_bf16);
}

/* Which of the weight's lines gemv_bf16 asks for ahead: two in four (0: as measured best
 * on the AMD EPYC) or every one (1: on an Intel Xeon with AMX, bf16 products of the bench
 * model's shapes read 18-25% faster so, cold, in blocks of 32 rows or of 64). Set once,
 * by the loader, from the CPU's vendor (cpu_kernels.py). */
static int bf16_every_line = 0;
void set_bf16_every_line(int every) { bf16_every_line = every; }

/* One row on AVX-512: y [N] (bf16, or float32 with out_bf16 0) of the weight's N real
 * rows of Np. Also gemm_bf16's one-row case: its sums are a pass's, in the same order, and
 * it asks for the weight ahead as a pass does not. */
static void gemv_bf16_rows(const uint16_t *w, const uint16_t *x, void *y, int64_t N, int64_t Np,
                           int64_t K, int64_t nb, const int out_bf16) {
    const uint32_t *pairs = (const uint32_t *)x;
    const int every = bf16_every_line;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < Np / nb; b++) {
        const int64_t n0 = b * nb, valid = N - n0 < nb ? N - n0 : nb;
        if (nb == 32 && every)
            gemv_bf16_block(w + n0 * K, pairs, y, n0, valid, K, 32, 1, out_bf16);
        else if (nb == 32)
            gemv_bf16_block(w + n0 * K, pairs, y, n0, valid, K, 32, 0, out_bf16);
        else if (every)
            gemv_bf16_block(w + n0 * K, pairs, y, n0, valid, K, NB, 1, out_bf16);
        else
            gemv_bf16_block(w + n0 * K, pairs, y, n0, valid, K, NB, 0, out_bf16);
    }
}

void gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t Np, int64_t K,
               int64_t nb) {
    if (use_amx)
        amx_product(w, x, y, 1, Np, Np, K, nb, 1);
    else
        gemv_bf16_rows(w, x, y, Np, Np, K, nb, 1);
}

/* The same for float32: w in oneDNN's blocked layout [Np/nb][K][nb], x: K, y: Np. */
static inline void gemv_f32_block(const float *p, const float *x, float *out, int64_t K,
                                  const int nb) {
    __m512 a[4];
    for (int c = 0; c < nb / 16; c++) a[c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++, p += nb) {
        __m512 xk = _mm512_set1_ps(x[k]);
        for (int c = 0; c < nb / 16; c++) a[c] = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16 * c), xk, a[c]);
    }
    for (int c = 0; c < nb / 16; c++) _mm512_storeu_ps(out + 16 * c, a[c]);
}

void gemv_f32(const float *w, const float *x, float *y, int64_t Np, int64_t K, int64_t nb) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < Np / nb; b++) {
        if (nb == 32)
            gemv_f32_block(w + b * 32 * K, x, y + b * 32, K, 32);
        else
            gemv_f32_block(w + b * NB * K, x, y + b * NB, K, NB);
    }
}

/* One pass of gemm_bf16_block over a block p: R rows from row m0 sharing each weight load;
 * pass and share as gemm_bf16_block has them. */
static inline __attribute__((always_inline)) void gemm_bf16_pass(
    const uint16_t *p, const uint16_t *x, void *y, int64_t m0, int64_t n0, int64_t valid,
    int64_t N, int64_t K, const char *next, int64_t pass, int64_t share, const int out_bf16,
    const int nb, const int R) {
    /* R rows (a constant: a pass of fewer than four rows makes only its own dot products,
     * each row's in the same order as in a pass of four) */
    __m512 a[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < nb / 16; c++) a[r][c] = _mm512_setzero_ps();
    const uint32_t *xr[4];
    for (int r = 0; r < R; r++) xr[r] = (const uint32_t *)(x + (m0 + r) * K);
    /* the k this pass fetches for next: k % share == pass - 1, counted, not divided
     * (a 64-bit division each k cost more than the dot products on an Intel Xeon) */
    int64_t due = share ? pass - 1 : -1;
    for (int64_t k = 0; k < K / 2; k++, p += 2 * nb) {
        if (k == due) {
            const char *line = next + k * 4 * nb; /* k's 4 * nb bytes there */
            for (int l = 0; l < 4 * nb; l += 64) _mm_prefetch(line + l, _MM_HINT_T1);
            due += share;
        }
        __m512bh wc[4];
        for (int c = 0; c < nb / 16; c++) wc[c] = (__m512bh)_mm512_loadu_si512(p + 32 * c);
        for (int r = 0; r < R; r++) {
            const __m512bh xk = (__m512bh)_mm512_set1_epi32((int)xr[r][k]);
            for (int c = 0; c < nb / 16; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], wc[c], xk);
        }
    }
    for (int64_t r = 0; r < R; r++) {
        const int64_t out = (m0 + r) * N + n0;
        for (int c = 0; c < nb / 16 && 16 * c < valid; c++)
            store_act(y, out + 16 * c, a[r][c], tail(valid - 16 * c), out_bf16);
    }
}

/* y = x @ w.T in float32 for x [M, K] bf16 (rows contiguous) and w bf16 in oneDNN's
 * blocked layout [Np/nb][K/2][nb][2] (gemv_bf16's); y [M, N] float32, N <= Np the
 * weight's real rows. For the logits: kept in float32, where a bf16 result would round
 * them to steps of 1/16 around 10 and leave near-ties to the rounding. Four rows at a
 * time share each weight load, so a block (in L2 by then) is read M/4 times. One block
 * b of blocks, nb a constant where it is inlined. */
static inline void gemm_bf16_block(const uint16_t *w, const uint16_t *x, void *y, int64_t b,
                                   int64_t blocks, int64_t M, int64_t N, int64_t K,
                                   const int out_bf16, const int nb) {
    const int64_t passes = (M + 3) / 4, n0 = b * nb;
    const int64_t valid = N - n0 < nb ? N - n0 : nb;
    /* The first pass over a block reads it from memory; the others, from L2, are bound
     * by the dot products. From three passes on (9 rows), they fetch the next block into
     * L2 meanwhile, a share each (pass j the k with k % (passes - 1) == j - 1), so its
     * first pass finds it there: memory and arithmetic overlap. With two passes, memory
     * bounds the whole product, and the second pass fetching a whole block measured
     * slower (benchmarks/RESULTS.md, "Figures behind the code"). */
    const char *next = b + 1 < blocks ? (const char *)(w + (b + 1) * nb * K) : NULL;
    const uint16_t *p = w + b * nb * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t pass = m0 / 4, share = pass > 0 && next && passes >= 3 ? passes - 1 : 0;
        switch (M - m0 < 4 ? M - m0 : 4) {
        case 4: gemm_bf16_pass(p, x, y, m0, n0, valid, N, K, next, pass, share, out_bf16, nb, 4); break;
        case 3: gemm_bf16_pass(p, x, y, m0, n0, valid, N, K, next, pass, share, out_bf16, nb, 3); break;
        case 2: gemm_bf16_pass(p, x, y, m0, n0, valid, N, K, next, pass, share, out_bf16, nb, 2); break;
        default: gemm_bf16_pass(p, x, y, m0, n0, valid, N, K, next, pass, share, out_bf16, nb, 1);
        }
    }
}

static inline void gemm_bf16(const uint16_t *w, const uint16_t *x, void *y, int64_t M,
                             int64_t N, int64_t Np, int64_t K, const int out_bf16, int64_t nb) {
    if (use_amx) {
        amx_product(w, x, y, M, N, Np, K, nb, out_bf16);
        return;
    }
    if (M == 1) {
        gemv_bf16_rows(w, x, y, N, Np, K, nb, out_bf16);
        return;
    }
    const int64_t blocks = Np / nb;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        if (nb == 32)
            gemm_bf16_block(w, x, y, b, blocks, M, N, K, out_bf16, 32);
        else
            gemm_bf16_block(w, x, y, b, blocks, M, N, K, out_bf16, NB);
    }
}

void gemm_bf16_f32(const uint16_t *w, const uint16_t *x, float *y, int64_t M, int64_t N,
                   int64_t Np, int64_t K, int64_t nb) {
    gemm_bf16(w, x, y, M, N, Np, K, 0, nb);
}

/* The same with the result rounded to bf16 (nearest even, from the float32 sums, as
 * oneDNN rounds): the rows of a batched decode step, where it runs faster than oneDNN's
 * own product on the same packed weight at up to a few dozen rows. */
void gemm_bf16_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t M, int64_t N,
                    int64_t Np, int64_t K, int64_t nb) {
    gemm_bf16(w, x, y, M, N, Np, K, 1, nb);
}

/* Row x's K values quantized as quant.quantize_rows does, per each of G equal groups:
 * u8[k] = round_half_even(x[k] / scale) + 128, xs[g] = scale = max(max|x|, 1e-12) / 127.
 * 16 values at a time: the same IEEE operations as the scalar form (a correctly rounded
 * division, then rounding to nearest even), so the same bytes. */
static void quantize_row(const void *x, int x_bf16, int64_t K, int64_t G, uint8_t *u8, float *xs) {
    const int64_t Kg = K / G;
    for (int64_t g = 0; g < G; g++) {
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t k = g * Kg; k < (g + 1) * Kg; k += 16)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_act(x, k, 0xFFFF, x_bf16)));
        const float scale = fmaxf(_mm512_reduce_max_ps(vmax), 1e-12f) / 127.0f;
        const __m512 vs = _mm512_set1_ps(scale), bias = _mm512_set1_ps(128.0f);
        xs[g] = scale;
        for (int64_t k = g * Kg; k < (g + 1) * Kg; k += 16) {
            const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load_act(x, k, 0xFFFF, x_bf16), vs),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)(u8 + k),
                             _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(_mm512_add_ps(r, bias))));
        }
    }
}

/* x @ w.T for one row x of K values (bf16 if x_bf16, else float32) and an int8 weight
 * [N, K] quantized in G equal groups along K, each group packed by oneDNN's
 * qlinear_prepack: [N/64][K/G/4][64][4] int8, then N int32 (minus each row's sum).
 * scales: G x N float32 (group-major). y: N values in x's type.
 *
 * Bit for bit what quant.Int8Weight computes through oneDNN for the same row: each
 * group's values quantized as quantize_rows does (scale = max(max|x|, 1e-12) / 127,
 * round half to even, plus 128), their integer products summed exactly (VNNI), less
 * 128 x the row's sum, then float(sum) * w_scale * x_scale, the groups added in order,
 * rounded once to x's type. u8: a workspace of K bytes. */
void gemv_int8(const int8_t *const *w, const float *scales, const void *x, int x_bf16,
               void *y, int64_t N, int64_t K, int64_t G, uint8_t *u8) {
    const int64_t Kg = K / G;
    float xs[64];
    quantize_row(x, x_bf16, K, G, u8, xs);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < N / NB; b++) {
        __m512 out[4];
        for (int64_t g = 0; g < G; g++) {
            const int8_t *p = w[g] + b * NB * Kg;
            const uint32_t *quads = (const uint32_t *)(u8 + g * Kg);
            __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
            __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
            for (int64_t k = 0; k < Kg / 4; k++, p += 4 * NB) {
                _mm_prefetch((const char *)p + INT8_AHEAD, _MM_HINT_T1);
                _mm_prefetch((const char *)p + INT8_AHEAD + 64, _MM_HINT_T1);
                const __m512i xk = _mm512_set1_epi32((int)quads[k]);
                a0 = _mm512_dpbusd_epi32(a0, xk, _mm512_loadu_si512(p));
                a1 = _mm512_dpbusd_epi32(a1, xk, _mm512_loadu_si512(p + 64));
                a2 = _mm512_dpbusd_epi32(a2, xk, _mm512_loadu_si512(p + 128));
                a3 = _mm512_dpbusd_epi32(a3, xk, _mm512_loadu_si512(p + 192));
            }
            const int32_t *minus_sums = (const int32_t *)(w[g] + N * Kg) + b * NB;
            const float *ws = scales + g * N + b * NB;
            const __m512i acc[4] = {a0, a1, a2, a3};
            for (int c = 0; c < 4; c++)
                out[c] = int8_part(out[c], g, acc[c], minus_sums + 16 * c, ws + 16 * c, xs[g]);
        }
        for (int c = 0; c < 4; c++) {
            if (x_bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)y + b * NB + 16 * c),
                                    (__m256i)_mm512_cvtneps_pbh(out[c]));
            else
                _mm512_storeu_ps((float *)y + b * NB + 16 * c, out[c]);
        }
    }
}

/* One pass of gemm_int8 over block b: R rows (a constant, 1-4) from row m0, sharing each
 * weight load; pass and share as gemm_bf16_block has them. */
static inline __attribute__((always_inline)) void gemm_int8_pass(
    const int8_t *const *w, const float *scales, const float *xs, const uint8_t *u8, void *y,
    int64_t b, int64_t m0, int64_t N, int64_t K, int64_t G, int64_t pass, int64_t share,
    int x_bf16, const int R) {
    const int64_t Kg = K / G;
    __m512 out[4][4];
    for (int64_t g = 0; g < G; g++) {
        const int8_t *p = w[g] + b * NB * Kg;
        const char *next = (const char *)(w[g] + (b + 1) * NB * Kg);
        const uint32_t *xr[4];
        for (int r = 0; r < R; r++) xr[r] = (const uint32_t *)(u8 + (m0 + r) * K + g * Kg);
        __m512i a[4][4];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_setzero_si512();
        int64_t due = share ? pass - 1 : -1; /* as gemm_bf16 counts it */
        for (int64_t k = 0; k < Kg / 4; k++, p += 4 * NB) {
            if (k == due) { /* k's 256 bytes of the next block */
                for (int l = 0; l < 256; l += 64) _mm_prefetch(next + k * 4 * NB + l, _MM_HINT_T1);
                due += share;
            }
            const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
            const __m512i w2 = _mm512_loadu_si512(p + 128);
            const __m512i w3 = _mm512_loadu_si512(p + 192);
            for (int r = 0; r < R; r++) {
                const __m512i xk = _mm512_set1_epi32((int)xr[r][k]);
                a[r][0] = _mm512_dpbusd_epi32(a[r][0], xk, w0);
                a[r][1] = _mm512_dpbusd_epi32(a[r][1], xk, w1);
                a[r][2] = _mm512_dpbusd_epi32(a[r][2], xk, w2);
                a[r][3] = _mm512_dpbusd_epi32(a[r][3], xk, w3);
            }
        }
        const int32_t *minus_sums = (const int32_t *)(w[g] + N * Kg) + b * NB;
        const float *ws = scales + g * N + b * NB;
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++)
                out[r][c] = int8_part(out[r][c], g, a[r][c], minus_sums + 16 * c, ws + 16 * c,
                                      xs[(m0 + r) * G + g]);
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++)
            store_act(y, (m0 + r) * N + b * NB + 16 * c, out[r][c], 0xFFFF, x_bf16);
}

/* The same for M rows of x (2 <= M <= 64): each row quantized on its own, four rows at a
 * time sharing each weight load (the last pass only its own one to three), so a block (in
 * L2 by then) is read M/4 times, and from three passes on the later passes fetch the next
 * block meanwhile, as gemm_bf16 does. Each row's integer sums are exact and its float
 * steps gemv_int8's, in the same order, so a row's result is bit for bit what it gives
 * alone. u8: a workspace of M x K bytes; y [M, N]. */
void gemm_int8(const int8_t *const *w, const float *scales, const void *x, int x_bf16,
               void *y, int64_t M, int64_t N, int64_t K, int64_t G, uint8_t *u8) {
    const int64_t Kg = K / G, blocks = N / NB, passes = (M + 3) / 4;
    float xs[64 * 64]; /* [M][G] */
    for (int64_t m = 0; m < M; m++)
        quantize_row(offset(x, m * K, x_bf16), x_bf16, K, G, u8 + m * K, xs + m * G);
    if (use_amx && Kg % 64 == 0) { /* as int8_one_row takes them: qlinear_prepack packs no other */
        amx_int8_product(w, scales, xs, u8, y, M, N, K, G, x_bf16);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t pass = m0 / 4;
            const int64_t share = pass > 0 && b + 1 < blocks && passes >= 3 ? passes - 1 : 0;
            switch (M - m0 < 4 ? M - m0 : 4) {
            case 4: gemm_int8_pass(w, scales, xs, u8, y, b, m0, N, K, G, pass, share, x_bf16, 4); break;
            case 3: gemm_int8_pass(w, scales, xs, u8, y, b, m0, N, K, G, pass, share, x_bf16, 3); break;
            case 2: gemm_int8_pass(w, scales, xs, u8, y, b, m0, N, K, G, pass, share, x_bf16, 2); break;
            default: gemm_int8_pass(w, scales, xs, u8, y, b, m0, N, K, G, pass, share, x_bf16, 1);
            }
        }
    }
}

/* The sum of n floats (n a multiple of 64), read once front to back on every thread's
 * share: what the memory gives a stream of reads, as the one-row products read their
 * weights (benchmarks measure the machine's bound with it). */
float stream_sum(const float *x, int64_t n) {
    float total = 0.0f;
#pragma omp parallel reduction(+ : total)
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = (n / 64 + threads - 1) / threads * 64;
        const int64_t lo = t * per, hi = lo + per < n ? lo + per : n;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        __m512 c = _mm512_setzero_ps(), d = _mm512_setzero_ps();
        for (int64_t i = lo; i < hi; i += 64) {
            a = _mm512_add_ps(a, _mm512_loadu_ps(x + i));
            b = _mm512_add_ps(b, _mm512_loadu_ps(x + i + 16));
            c = _mm512_add_ps(c, _mm512_loadu_ps(x + i + 32));
            d = _mm512_add_ps(d, _mm512_loadu_ps(x + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
    }
    return total;
}

/* Rows ids[0..n-1] of an int4 embedding table (quantize_int4's layout: packed [rows,
 * dim/2], the even value in the low nibble; bf16 scale and zero [rows, dim/gs, 2]), gs a
 * multiple of 32: out[i] = float(q - 8) * scale + zero, float32, as quant.Int4Table's
 * torch form computes it (the product is exact, a 4-bit value times a bf16 scale; one
 * rounding at the sum). */
void lookup_int4(const uint8_t *packed, const uint16_t *sz, const int64_t *ids, int64_t n,
                 int64_t dim, int64_t gs, float *out) {
    const int64_t G = dim / gs;
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi32(8);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = packed + ids[i] * (dim / 2);
        const uint16_t *row_sz = sz + ids[i] * G * 2;
        float *o = out + i * dim;
        for (int64_t g = 0; g < G; g++) {
            const __m512 s = _mm512_set1_ps(bf16_to_f32(row_sz[2 * g]));
            const __m512 z = _mm512_set1_ps(bf16_to_f32(row_sz[2 * g + 1]));
            for (int64_t d = g * gs; d < (g + 1) * gs; d += 32) {
                const __m128i b = _mm_loadu_si128((const __m128i *)(row + d / 2));
                const __m128i lo = _mm_and_si128(b, nibble);
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
                const __m128i halves[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
                for (int h = 0; h < 2; h++) {
                    const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(halves[h]), eight);
                    _mm512_storeu_ps(o + d + 16 * h,
                                     _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), s), z));
                }
            }
        }
    }
}

/* Rows ids[0..n-1] of an int8 embedding table q [rows, dim] with float32 scales
 * [rows, G] (one per G equal runs of a row): out[i] = float(q[id]) * its run's scale,
 * float32, as quant.Int8Table's torch form computes it (one rounding each). */
void lookup_int8(const int8_t *q, const float *scales, const int64_t *ids, int64_t n,
                 int64_t dim, int64_t G, float *out) {
    const int64_t run = dim / G;
    for (int64_t i = 0; i < n; i++) {
        const int8_t *row = q + ids[i] * dim;
        for (int64_t g = 0; g < G; g++) {
            const __m512 s = _mm512_set1_ps(scales[ids[i] * G + g]);
            for (int64_t d = g * run; d < (g + 1) * run; d += 16) {
                const __mmask16 k = tail((g + 1) * run - d);
                const __m128i v = _mm_maskz_loadu_epi8(k, row + d);
                _mm512_mask_storeu_ps(out + i * dim + d, k,
                                      _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), s));
            }
        }
    }
}
