/* mpllama's products on AMX tiles (Intel Sapphire Rapids on): bf16 of one row and of
 * several, int8's batched ones, and int4 weights. Without the compiler's AMX flags the
 * file builds stubs, never called (use_amx stays 0). */
#include "cpu_kernels.h"

int use_amx = 0;

/* bf16 products: where the CPU has AMX, every bf16 product of mpllama's, of one row or
 * several, runs on the tiles: the same packed weight, read in the same order whatever the
 * row count, so a row's sums are the same alone as in any batch (a tile row's
 * accumulation does not see the other rows: checked bit for bit,
 * tests/test_cpu_kernels.py).
 * Why both: AVX-512's dot products round between a pair's two products in another order
 * than the tiles do (their sums differ in the last bits), so a one-row kernel on AVX-512
 * beside batches on AMX would make a row's result depend on its batch. Measured here
 * (48 cold 2816x1024 weights, 2 threads, benchmarks/RESULTS.md): one row 31 GB/s against
 * the AVX-512 kernel's 20-23; 16 / 32 rows 470 / 710 GFLOP/s against its 100.
 * Off until amx_request() gets the kernel's leave to use the tiles (Linux asks each
 * process to request it: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). */
#if defined(__AMX_BF16__) && defined(__AMX_INT8__) /* cpu_kernels.py passes all or none */
#include <sys/syscall.h>
#include <unistd.h>

static int amx_granted = 0;

int amx_request(void) {
    if (!amx_granted) amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                            18 /* XFEATURE_XTILEDATA */) == 0;
    return amx_granted;
}

/* Whether the bf16 products use the tiles (only where granted); what they do now. Tests
 * run both paths. */
int set_amx(int on) { return use_amx = on && amx_granted; }
int amx_on(void) { return use_amx; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config_t;

/* The tiles every kernel here uses, for a run of r0 rows and a second run of r1 (0: none;
 * only amx_int4_product has two): 0, 1 the first run's two sets of 16 outputs (32-bit sums);
 * 2, 3 the second run's; 4, 7 the runs' inputs (64 bytes a row: 32 bf16 or 64 int8
 * values); 5, 6 the weight's 16 rows of input pairs (bf16) or quads (int8) x 16 outputs,
 * one for each output set. */
static void tile_config(int r0, int r1) {
    tile_config_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {r0, r0, r1, r1, r0, 16, 16, r1};
    for (int t = 0; t < 8; t++) c.rows[t] = rows[t], c.colsb[t] = rows[t] ? 64 : 0;
    _tile_loadconfig(&c);
}

/* y = x @ w.T for M rows of x [M, K] bf16 and w in the blocked layout [Np/nb][K/2][nb][2];
 * y [M, N] (row stride N; N <= Np the real rows) bf16 rounded to nearest even from the
 * float32 sums (out_bf16), or float32. Each block of nb outputs, for each run of up to
 * 16 rows: 32 outputs at a time (two column tiles), over the inputs 32 at a time. The
 * first run asks for the weight's every line AHEAD (16 KB) into L2 as it reads (one row
 * 31 GB/s against 30 without, 4-8 rows 33-34 against 20; the later runs find the block
 * in L2). */
void amx_product(const uint16_t *w, const uint16_t *x, void *y, int64_t M, int64_t N, int64_t Np,
                 int64_t K, int64_t nb, const int out_bf16) {
    const int64_t stride = nb * 4, step = 16 * stride; /* bytes: a pair of inputs, 32 inputs */
#pragma omp parallel
    {
        int configured = 0; /* the rows the tiles are set up for */
        float sums[16 * 64];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < Np / nb; b++) {
            const char *block = (const char *)(w + b * nb * K);
            const int64_t n0 = b * nb, valid = N - n0 < nb ? N - n0 : nb;
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                const int rows = M - m0 < 16 ? (int)(M - m0) : 16;
                if (rows != configured) tile_config(configured = rows, 0);
                for (int64_t j = 0; j < nb / 16; j += 2) {
                    _tile_zero(0);
                    _tile_zero(1);
                    const char *p = block + 64 * j;
                    for (int64_t k = 0; k < K; k += 32, p += step) {
                        if (m0 == 0 && j == 0)
                            for (int64_t l = 0; l < step; l += 64)
                                _mm_prefetch(p + AHEAD + l, _MM_HINT_T1);
                        _tile_loadd(4, x + m0 * K + k, K * 2);
                        _tile_loadd(5, p, stride);
                        _tile_loadd(6, p + 64, stride);
                        _tile_dpbf16ps(0, 4, 5);
                        _tile_dpbf16ps(1, 4, 6);
                    }
                    _tile_stored(0, sums + 16 * j, nb * 4);
                    _tile_stored(1, sums + 16 * j + 16, nb * 4);
                }
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t c = 0; c < nb / 16 && 16 * c < valid; c++)
                        store_act(y, (m0 + r) * N + n0 + 16 * c, _mm512_loadu_ps(sums + r * nb + 16 * c),
                                  tail(valid - 16 * c), out_bf16);
            }
        }
        if (configured) _tile_release();
    }
}

/* One step's 512 bytes of int4 values s into u: 1024 bf16 values (q - 8), in the tiles'
 * layout, 128 from each 64 bytes (unpack4); ask: for the bytes INT8_AHEAD on into L2 too
 * (the first pass over a block). */
static inline void expand4(const uint8_t *s, uint16_t *u, __m512i table, int ask) {
    if (ask)
        for (int l = 0; l < 512; l += 64) _mm_prefetch((const char *)s + INT8_AHEAD + l, _MM_HINT_T1);
    for (int c = 0; c < 8; c++) {
        __m512bh v[4];
        unpack4(s + 64 * c, table, v);
        for (int i = 0; i < 4; i++) _mm512_store_si512(u + 128 * c + 32 * i, (__m512i)v[i]);
    }
}

/* int4_product (cpu_kernels_int4.c) on AMX tiles, for any number of rows M, given each
 * row's sums of x per group (xsum [M, K/gs]). For each block and pass of up to 32 rows
 * (two runs of up to 16), group by group: each step of 32 inputs is unpacked (a table
 * lookup, vpermw, per 32 values: unpack4) into one of four small buffers in L1, the step
 * after next's while the tiles take this one; the tiles sum (q - 8) x exactly per
 * product, in float32;
 * then y += sums * scale + zero * sum(x over the group), in group order. A row's result
 * depends only on its own values, so it is the same alone as in any batch. Unpacking into
 * L1 step by step, not a whole block into L2 first, measured 1.5x faster at one row (24 of
 * the bench model's 2816x1024 weights: 2.8 -> 1.8 ms; benchmarks/RESULTS.md). Two steps
 * ahead, not one: a tile load reads what the unpacking just stored, and at one step's
 * distance it waited (our reading: stores leave the core only after the tile work before
 * them, which has long latency); one row of a 1024x4096 weight in groups of 128, hot in
 * L2, one thread: 13.6 -> 20.7 GB/s (groups of 32: 13.3 -> 14.0).
 * unpack4_biased's shifts and selects in place of the lookups measured slower here (18.1).
 * Its passes use both runs' tiles (tile_config). */
void amx_int4_product(const uint8_t *w, const uint16_t *sz, const uint16_t *x, const float *xsum,
                      void *y, int64_t M, int64_t N, int64_t Np, int64_t K, int64_t gs,
                      int out_bf16) {
    const int64_t G = K / gs;
    const __m512i table = int4_table();
#pragma omp parallel
    {
        uint16_t buffer[4][1024] __attribute__((aligned(64)));
        int configured = -1;
        float sums[32 * 32];
        __m512 out[32][2];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < Np / 32; b++) {
            const uint8_t *src = w + b * 16 * K;
            const int64_t n0 = b * 32, valid = N - n0 < 32 ? N - n0 : 32;
            for (int64_t m0 = 0; m0 < M; m0 += 32) {
                const int r0 = M - m0 < 16 ? (int)(M - m0) : 16;
                const int r1 = M - m0 - 16 <= 0 ? 0 : M - m0 - 16 < 16 ? (int)(M - m0 - 16) : 16;
                if (r0 * 32 + r1 != configured) {
                    tile_config(r0, r1);
                    configured = r0 * 32 + r1;
                }
                for (int64_t g = 0; g < G; g++) {
                    _tile_zero(0);
                    _tile_zero(1);
                    if (r1) {
                        _tile_zero(2);
                        _tile_zero(3);
                    }
                    if (g == 0) {
                        expand4(src, buffer[0], table, m0 == 0);
                        if (K > 32) expand4(src + 16 * 32, buffer[1], table, m0 == 0);
                    }
                    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
                        const uint16_t *u = buffer[(k / 32) & 3];
                        _tile_loadd(5, u, 128);
                        _tile_loadd(6, u + 32, 128);
                        _tile_loadd(4, x + m0 * K + k, K * 2);
                        _tile_dpbf16ps(0, 4, 5);
                        _tile_dpbf16ps(1, 4, 6);
                        if (r1) {
                            _tile_loadd(7, x + (m0 + 16) * K + k, K * 2);
                            _tile_dpbf16ps(2, 7, 5);
                            _tile_dpbf16ps(3, 7, 6);
                        }
                        if (k + 64 < K) /* the step after next's, this group's or the next's */
                            expand4(src + 16 * (k + 64), buffer[(k / 32 + 2) & 3], table, m0 == 0);
                    }
                    _tile_stored(0, sums, 128);
                    _tile_stored(1, sums + 16, 128);
                    if (r1) {
                        _tile_stored(2, sums + 16 * 32, 128);
                        _tile_stored(3, sums + 16 * 32 + 16, 128);
                    }
                    const uint16_t *q = sz + (b * G + g) * 64;
                    const __m512 scale[2] = {load_bf16(q, 0xFFFF), load_bf16(q + 16, 0xFFFF)};
                    const __m512 zero[2] = {load_bf16(q + 32, 0xFFFF), load_bf16(q + 48, 0xFFFF)};
                    for (int r = 0; r < r0 + r1; r++)
                        for (int c = 0; c < 2; c++)
                            out[r][c] = int4_part(out[r][c], g, _mm512_loadu_ps(sums + r * 32 + 16 * c),
                                                  scale[c], zero[c], xsum[(m0 + r) * G + g]);
                }
                for (int64_t r = 0; r < r0 + r1; r++)
                    for (int c = 0; c < 2 && 16 * c < valid; c++)
                        store_act(y, (m0 + r) * N + n0 + 16 * c, out[r][c], tail(valid - 16 * c), out_bf16);
            }
        }
        if (configured >= 0) _tile_release();
    }
}

/* gemm_int8 on AMX tiles, for groups of a multiple of 64 inputs: for each block of 64
 * outputs and run of up to 16 rows, each group's integer sums 32 outputs at a time (two
 * column tiles, qlinear_prepack's layout read 16 input quads by 16 outputs a tile), then
 * gemm_int8's float steps on them in the same order. The integer sums are exact on
 * either path, so each row's result is the same bits as on AVX-512 VNNI, alone or in any
 * batch. The first run asks for the weight's every line INT8_AHEAD into L2. */
void amx_int8_product(const int8_t *const *w, const float *scales, const float *xs,
                      const uint8_t *u8, void *y, int64_t M, int64_t N, int64_t K, int64_t G,
                      const int x_bf16) {
    const int64_t Kg = K / G;
#pragma omp parallel
    {
        int configured = 0;
        int32_t sums[16 * NB];
        __m512 out[16][4];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < N / NB; b++) {
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                const int rows = M - m0 < 16 ? (int)(M - m0) : 16;
                if (rows != configured) tile_config(configured = rows, 0);
                for (int64_t g = 0; g < G; g++) {
                    const char *block = (const char *)(w[g] + b * NB * Kg);
                    for (int64_t j = 0; j < 4; j += 2) {
                        _tile_zero(0);
                        _tile_zero(1);
                        /* 16 quads of inputs (64) by 64 outputs: 4 KB a step */
                        for (int64_t k = 0; k < Kg; k += 64) {
                            const char *p = block + k * NB + 64 * j;
                            if (m0 == 0 && j == 0)
                                for (int64_t l = 0; l < 64 * NB; l += 64)
                                    _mm_prefetch(p + INT8_AHEAD + l, _MM_HINT_T1);
                            _tile_loadd(4, u8 + m0 * K + g * Kg + k, K);
                            _tile_loadd(5, p, 4 * NB);
                            _tile_loadd(6, p + 64, 4 * NB);
                            _tile_dpbusd(0, 4, 5);
                            _tile_dpbusd(1, 4, 6);
                        }
                        _tile_stored(0, sums + 16 * j, 4 * NB);
                        _tile_stored(1, sums + 16 * j + 16, 4 * NB);
                    }
                    const int32_t *minus_sums = (const int32_t *)(w[g] + N * Kg) + b * NB;
                    const float *ws = scales + g * N + b * NB;
                    for (int r = 0; r < rows; r++)
                        for (int c = 0; c < 4; c++)
                            out[r][c] = int8_part(out[r][c], g, _mm512_loadu_si512(sums + r * NB + 16 * c),
                                                  minus_sums + 16 * c, ws + 16 * c, xs[(m0 + r) * G + g]);
                }
                for (int r = 0; r < rows; r++)
                    for (int c = 0; c < 4; c++)
                        store_act(y, (m0 + r) * N + b * NB + 16 * c, out[r][c], 0xFFFF, x_bf16);
            }
        }
        if (configured) _tile_release();
    }
}
#else
void amx_int4_product(const uint8_t *w, const uint16_t *sz, const uint16_t *x, const float *xsum,
                      void *y, int64_t M, int64_t N, int64_t Np, int64_t K, int64_t gs,
                      int out_bf16) {}
int amx_request(void) { return 0; }
int set_amx(int on) {
    (void)on;
    return 0;
}
int amx_on(void) { return 0; }
void amx_product(const uint16_t *w, const uint16_t *x, void *y, int64_t M, int64_t N, int64_t Np,
                 int64_t K, int64_t nb, const int out_bf16) {}
void amx_int8_product(const int8_t *const *w, const float *scales, const float *xs,
                      const uint8_t *u8, void *y, int64_t M, int64_t N, int64_t K, int64_t G,
                      const int x_bf16) {}
#endif
