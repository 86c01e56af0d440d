/* mpllama's decode kernels for CPU ranks with AVX-512: one-row products (bf16, fp32,
 * int8), float32 logits of bf16 rows, one-query attention over the block pool, a decode
 * layer's small steps fused (bf16 or float32), and a decode step's whole layer as two
 * calls.
 * Built on first use by cpu_kernels.py with the machine's C compiler, and called through
 * ctypes on torch tensors' memory.
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
 * decode step 5-16% faster at every memory speed (16 KB: 0-8%; the L1 hint: 40% slower).
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

/* y[n] = sum_k w[n,k] x[k] for n < Np (rows padded to whole blocks).
 * w: bf16 in oneDNN's blocked layout [Np/nb][K/2][nb][2], nb = 64 rows a block, or 32
 * where oneDNN packs for AMX; x: K bf16; y: Np bf16, rounded to nearest even from float32
 * sums (as oneDNN rounds). One block, nb a constant where it is inlined. */
static inline void gemv_bf16_block(const uint16_t *p, const uint32_t *pairs, uint16_t *out,
                                   int64_t K, const int nb, const int every) {
    __m512 a[4];
    for (int c = 0; c < nb / 16; c++) a[c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K / 2; k++, p += 2 * nb) {
        for (int c = 0; c < nb / (every ? 16 : 32); c++) ahead(p + 32 * c);
        __m512bh xk = (__m512bh)_mm512_set1_epi32((int)pairs[k]);
        for (int c = 0; c < nb / 16; c++)
            a[c] = _mm512_dpbf16_ps(a[c], (__m512bh)_mm512_loadu_si512(p + 32 * c), xk);
    }
    for (int c = 0; c < nb / 16; c++)
        _mm256_storeu_si256((__m256i *)(out + 16 * c), (__m256i)_mm512_cvtneps_pbh(a[c]));
}

/* Which of the weight's lines gemv_bf16 asks for ahead: two in four (0: as measured best
 * on the AMD EPYC) or every one (1: on an Intel Xeon with AMX, bf16 products of the bench
 * model's shapes read 18-25% faster so, cold, in blocks of 32 rows or of 64). Set once,
 * by the loader, from the CPU's vendor (cpu_kernels.py). */
static int bf16_every_line = 0;
void set_bf16_every_line(int every) { bf16_every_line = every; }

/* ---------------------------------------------------------------- bf16 products on AMX
 * On a CPU with AMX (Intel Sapphire Rapids on), every bf16 product of mpllama's, of one
 * row or several, runs on the tiles: the same packed weight, read in the same order by
 * row count, so a row's sums are the same alone as in any batch (a tile row's
 * accumulation does not see the other rows: checked bit for bit, tests/test_cpu_kernels.py).
 * Why both: AVX-512's dot products round between a pair's two products in another order
 * than the tiles do (their sums differ in the last bits), so a one-row kernel on AVX-512
 * beside batches on AMX would make a row's result depend on its batch. Measured here
 * (48 cold 2816x1024 weights, 2 threads, benchmarks/RESULTS.md): one row 31 GB/s against
 * the AVX-512 kernel's 20-23; 16 / 32 rows 470 / 710 GFLOP/s against its 100.
 * Off until amx_request() gets the kernel's leave to use the tiles (Linux asks each
 * process to request it: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). */
#ifdef __AMX_BF16__
#include <sys/syscall.h>
#include <unistd.h>

static int amx_granted = 0, amx = 0;

int amx_request(void) {
    if (!amx_granted) amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                            18 /* XFEATURE_XTILEDATA */) == 0;
    return amx_granted;
}

/* Whether the bf16 products use the tiles (only where granted); what they do now. Tests
 * run both paths. */
int set_amx(int on) { return amx = on && amx_granted; }
int amx_on(void) { return amx; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config_t;

/* Tiles 0, 1: two sets of 16 outputs for `rows` rows (float32); 2: those rows' 32 inputs
 * (bf16); 3, 4: 16 input pairs x 16 outputs of the weight, one for each of 0 and 1. */
static void amx_config(int rows) {
    tile_config_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 5; t++) c.rows[t] = t < 3 ? rows : 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* y = x @ w.T for M rows of x [M, K] bf16 and w in the blocked layout [Np/nb][K/2][nb][2];
 * y [M, N] (row stride N; N <= Np the real rows) bf16 rounded to nearest even from the
 * float32 sums (out_bf16), or float32. Each block of nb outputs, for each run of up to
 * 16 rows: 32 outputs at a time (two column tiles), over the inputs 32 at a time. The
 * first run asks for the weight's every line AHEAD (16 KB) into L2 as it reads (31 GB/s
 * one row against 26 without; the later runs find the block in L2). */
static void amx_product(const uint16_t *w, const uint16_t *x, void *y, int64_t M, int64_t N,
                        int64_t Np, int64_t K, int64_t nb, const int out_bf16) {
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
                if (rows != configured) amx_config(configured = rows);
                for (int64_t j = 0; j < nb / 16; j += 2) {
                    _tile_zero(0);
                    _tile_zero(1);
                    const char *p = block + 64 * j;
                    for (int64_t k = 0; k < K; k += 32, p += step) {
                        if (m0 == 0 && j == 0)
                            for (int64_t l = 0; l < step; l += 64)
                                _mm_prefetch(p + AHEAD + l, _MM_HINT_T1);
                        _tile_loadd(2, x + m0 * K + k, K * 2);
                        _tile_loadd(3, p, stride);
                        _tile_loadd(4, p + 64, stride);
                        _tile_dpbf16ps(0, 2, 3);
                        _tile_dpbf16ps(1, 2, 4);
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

/* int4 weights (quant.Int4Weight: w = (q - 8) * scale + zero, q 0..15, a bf16 scale and
 * zero per group of gs inputs) times bf16 rows, for any number of rows M: y [M, N] (row
 * stride N), bf16 (out_bf16) or float32.
 *   w   Np/32 blocks of 32 outputs, each 16 K bytes: the block's values (q - 8) in the
 *       bf16 layout amx_product reads ([K/2][32][2]), 64 at a time in 32 bytes, value j
 *       of each 64 in byte j's low half and value 32 + j in its high half
 *       (cpu_kernels.Int4Product packs it);
 *   sz  [Np/32][K/gs][2][32] bf16: each block's scales, then zeros, per group.
 * For each block and pass of up to 32 rows (two runs of up to 16), group by group: each
 * step of 32 inputs is unpacked (a table lookup, vpermw, per 32 values) into one of two
 * small buffers in L1, the next step's while the tiles take this one; the tiles sum
 * (q - 8) x exactly per product, in float32; then y += sums * scale + zero * sum(x over
 * the group), in group order. A row's result depends only on its own values, so it is
 * the same alone as in any batch. Unpacking into L1 step by step, not a whole block into
 * L2 first, measured 1.5x faster at one row (24 of the bench model's 2816x1024 weights:
 * 2.8 -> 1.8 ms; benchmarks/RESULTS.md).
 * Tiles: 0, 1 the first run's two sets of 16 outputs (r0 rows), 2, 3 the second run's (r1
 * rows, none where 0); 4, 7 the runs' inputs; 5, 6 the weight's 16 pairs x 16 outputs. */
static void int4_config(int r0, int r1) {
    tile_config_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {r0, r0, r1, r1, r0, 16, 16, r1};
    for (int t = 0; t < 8; t++) c.rows[t] = rows[t], c.colsb[t] = rows[t] ? 64 : 0;
    _tile_loadconfig(&c);
}

/* One step's 512 bytes of int4 values s into u: 1024 bf16 values (q - 8), in the tiles'
 * layout; ask: for the bytes INT8_AHEAD on into L2 too (the first pass over a block). */
static inline void expand4(const uint8_t *s, uint16_t *u, __m512i table, int ask) {
    if (ask)
        for (int l = 0; l < 512; l += 64) _mm_prefetch((const char *)s + INT8_AHEAD + l, _MM_HINT_T1);
    for (int c = 0; c < 16; c++) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *)(s + 32 * c)));
        _mm512_store_si512(u + 64 * c, _mm512_permutexvar_epi16(v, table));
        _mm512_store_si512(u + 64 * c + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table));
    }
}

void int4_product(const uint8_t *w, const uint16_t *sz, const uint16_t *x, void *y, int64_t M,
                  int64_t N, int64_t Np, int64_t K, int64_t gs, int out_bf16) {
    const int64_t G = K / gs;
    float *xsum = malloc(M * G * sizeof(float));
#pragma omp parallel for schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 16)
                a = _mm512_add_ps(a, load_bf16(x + m * K + k, 0xFFFF));
            xsum[m * G + g] = _mm512_reduce_add_ps(a);
        }
    __m512i table; /* word i: bf16 of (i & 15) - 8 */
    {
        uint16_t t[32];
        for (int i = 0; i < 32; i++) {
            const float v = (float)((i & 15) - 8);
            uint32_t u;
            memcpy(&u, &v, 4);
            t[i] = (uint16_t)(u >> 16);
        }
        table = _mm512_loadu_si512(t);
    }
#pragma omp parallel
    {
        uint16_t buffer[2][1024] __attribute__((aligned(64)));
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
                    int4_config(r0, r1);
                    configured = r0 * 32 + r1;
                }
                for (int64_t g = 0; g < G; g++) {
                    _tile_zero(0);
                    _tile_zero(1);
                    if (r1) {
                        _tile_zero(2);
                        _tile_zero(3);
                    }
                    if (g == 0) expand4(src, buffer[0], table, m0 == 0);
                    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
                        const uint16_t *u = buffer[(k / 32) & 1];
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
                        if (k + 32 < K) /* the next step's, the group's or the next group's */
                            expand4(src + 16 * (k + 32), buffer[(k / 32 + 1) & 1], table, m0 == 0);
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
                    for (int r = 0; r < r0 + r1; r++) {
                        const __m512 xs = _mm512_set1_ps(xsum[(m0 + r) * G + g]);
                        for (int c = 0; c < 2; c++) {
                            const __m512 part = _mm512_fmadd_ps(_mm512_loadu_ps(sums + r * 32 + 16 * c),
                                                                scale[c], _mm512_mul_ps(zero[c], xs));
                            out[r][c] = g == 0 ? part : _mm512_add_ps(out[r][c], part);
                        }
                    }
                }
                for (int64_t r = 0; r < r0 + r1; r++)
                    for (int c = 0; c < 2 && 16 * c < valid; c++)
                        store_act(y, (m0 + r) * N + n0 + 16 * c, out[r][c], tail(valid - 16 * c), out_bf16);
            }
        }
        if (configured >= 0) _tile_release();
    }
    free(xsum);
}
#else
void int4_product(const uint8_t *w, const uint16_t *sz, const uint16_t *x, void *y, int64_t M,
                  int64_t N, int64_t Np, int64_t K, int64_t gs, int out_bf16) {}
int amx_request(void) { return 0; }
int set_amx(int on) {
    (void)on;
    return 0;
}
int amx_on(void) { return 0; }
static const int amx = 0;
static void amx_product(const uint16_t *w, const uint16_t *x, void *y, int64_t M, int64_t N,
                        int64_t Np, int64_t K, int64_t nb, const int out_bf16) {}
#endif

void gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t Np, int64_t K,
               int64_t nb) {
    if (amx) {
        amx_product(w, x, y, 1, Np, Np, K, nb, 1);
        return;
    }
    const uint32_t *pairs = (const uint32_t *)x;
    const int every = bf16_every_line;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < Np / nb; b++) {
        if (nb == 32 && every)
            gemv_bf16_block(w + b * 32 * K, pairs, y + b * 32, K, 32, 1);
        else if (nb == 32)
            gemv_bf16_block(w + b * 32 * K, pairs, y + b * 32, K, 32, 0);
        else if (every)
            gemv_bf16_block(w + b * NB * K, pairs, y + b * NB, K, NB, 1);
        else
            gemv_bf16_block(w + b * NB * K, pairs, y + b * NB, K, NB, 0);
    }
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
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t rows = M - m0 < 4 ? M - m0 : 4;
        const int64_t pass = m0 / 4, share = pass > 0 && next && passes >= 3 ? passes - 1 : 0;
        __m512 a[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < nb / 16; c++) a[r][c] = _mm512_setzero_ps();
        const uint16_t *p = w + b * nb * K;
        const uint32_t *xr[4];
        for (int r = 0; r < 4; r++) xr[r] = (const uint32_t *)(x + (m0 + (r < rows ? r : 0)) * K);
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
            for (int r = 0; r < 4; r++) {
                const __m512bh xk = (__m512bh)_mm512_set1_epi32((int)xr[r][k]);
                for (int c = 0; c < nb / 16; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], wc[c], xk);
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            const int64_t out = (m0 + r) * N + n0;
            for (int c = 0; c < nb / 16 && 16 * c < valid; c++)
                store_act(y, out + 16 * c, a[r][c], tail(valid - 16 * c), out_bf16);
        }
    }
}

static inline void gemm_bf16(const uint16_t *w, const uint16_t *x, void *y, int64_t M,
                             int64_t N, int64_t Np, int64_t K, const int out_bf16, int64_t nb) {
    if (amx) {
        amx_product(w, x, y, M, N, Np, K, nb, out_bf16);
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

#if defined(__AMX_INT8__) && defined(__AMX_BF16__)
/* gemm_int8 on AMX tiles, for groups of a multiple of 64 inputs: for each block of 64
 * outputs and run of up to 16 rows, each group's integer sums 32 outputs at a time (two
 * column tiles, qlinear_prepack's layout read 16 input quads by 16 outputs a tile), then
 * gemm_int8's float steps on them in the same order. The integer sums are exact on
 * either path, so each row's result is the same bits as on AVX-512 VNNI, alone or in any
 * batch. The first run asks for the weight's every line INT8_AHEAD into L2. */
static void amx_int8_product(const int8_t *const *w, const float *scales, const float *xs,
                             const uint8_t *u8, void *y, int64_t M, int64_t N, int64_t K,
                             int64_t G, const int x_bf16) {
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
                if (rows != configured) amx_config(configured = rows);
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
                            _tile_loadd(2, u8 + m0 * K + g * Kg + k, K);
                            _tile_loadd(3, p, 4 * NB);
                            _tile_loadd(4, p + 64, 4 * NB);
                            _tile_dpbusd(0, 2, 3);
                            _tile_dpbusd(1, 2, 4);
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
static void amx_int8_product(const int8_t *const *w, const float *scales, const float *xs,
                             const uint8_t *u8, void *y, int64_t M, int64_t N, int64_t K,
                             int64_t G, const int x_bf16) {}
#endif

/* The same for M rows of x (2 <= M <= 64): each row quantized on its own, four rows at a
 * time sharing each weight load, so a block (in L2 by then) is read M/4 times, and from
 * three passes on the later passes fetch the next block meanwhile, as gemm_bf16 does.
 * Each row's integer sums are exact and its float steps gemv_int8's, in the same order,
 * so a row's result is bit for bit what it gives alone. u8: a workspace of M x K bytes;
 * y [M, N]. */
void gemm_int8(const int8_t *const *w, const float *scales, const void *x, int x_bf16,
               void *y, int64_t M, int64_t N, int64_t K, int64_t G, uint8_t *u8) {
    const int64_t Kg = K / G, blocks = N / NB, passes = (M + 3) / 4;
    float xs[64 * 64]; /* [M][G] */
    for (int64_t m = 0; m < M; m++)
        quantize_row(offset(x, m * K, x_bf16), x_bf16, K, G, u8 + m * K, xs + m * G);
    if (amx && Kg % 64 == 0) { /* as int8_one_row takes them: qlinear_prepack packs no other */
        amx_int8_product(w, scales, xs, u8, y, M, N, K, G, x_bf16);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t rows = M - m0 < 4 ? M - m0 : 4;
            const int64_t pass = m0 / 4;
            const int64_t share = pass > 0 && b + 1 < blocks && passes >= 3 ? passes - 1 : 0;
            __m512 out[4][4];
            for (int64_t g = 0; g < G; g++) {
                const int8_t *p = w[g] + b * NB * Kg;
                const char *next = (const char *)(w[g] + (b + 1) * NB * Kg);
                const uint32_t *xr[4];
                for (int r = 0; r < 4; r++)
                    xr[r] = (const uint32_t *)(u8 + (m0 + (r < rows ? r : 0)) * K + g * Kg);
                __m512i a[4][4];
                for (int r = 0; r < 4; r++)
                    for (int c = 0; c < 4; c++) a[r][c] = _mm512_setzero_si512();
                int64_t due = share ? pass - 1 : -1; /* as gemm_bf16 counts it */
                for (int64_t k = 0; k < Kg / 4; k++, p += 4 * NB) {
                    if (k == due) { /* k's 256 bytes of the next block */
                        for (int l = 0; l < 256; l += 64)
                            _mm_prefetch(next + k * 4 * NB + l, _MM_HINT_T1);
                        due += share;
                    }
                    const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
                    const __m512i w2 = _mm512_loadu_si512(p + 128);
                    const __m512i w3 = _mm512_loadu_si512(p + 192);
                    for (int r = 0; r < 4; r++) {
                        const __m512i xk = _mm512_set1_epi32((int)xr[r][k]);
                        a[r][0] = _mm512_dpbusd_epi32(a[r][0], xk, w0);
                        a[r][1] = _mm512_dpbusd_epi32(a[r][1], xk, w1);
                        a[r][2] = _mm512_dpbusd_epi32(a[r][2], xk, w2);
                        a[r][3] = _mm512_dpbusd_epi32(a[r][3], xk, w3);
                    }
                }
                const int32_t *minus_sums = (const int32_t *)(w[g] + N * Kg) + b * NB;
                const float *ws = scales + g * N + b * NB;
                for (int64_t r = 0; r < rows; r++)
                    for (int c = 0; c < 4; c++)
                        out[r][c] = int8_part(out[r][c], g, a[r][c], minus_sums + 16 * c,
                                              ws + 16 * c, xs[(m0 + r) * G + g]);
            }
            for (int64_t r = 0; r < rows; r++)
                for (int c = 0; c < 4; c++)
                    store_act(y, (m0 + r) * N + b * NB + 16 * c, out[r][c], 0xFFFF, x_bf16);
        }
    }
}

/* ---------------------------------------------------------------- a decode layer's small
 * steps, fused: each replaces several torch ops (a few microseconds of dispatch each,
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

/* ---------------------------------------------------------------- a decode step's layer
 * A layer for one new token of each of M rows, bf16 or float32, as two calls (the
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
    if (p->kind == 3) /* int4 on AMX: any M, bf16 (row_decode.py builds no other) */
        int4_product((const uint8_t *)p->w, (const uint16_t *)p->scales, (const uint16_t *)x, y, M,
                     p->rows, p->N, p->K, p->groups, 1);
    else if (M > 1 && p->kind == 1)
        gemm_int8((const int8_t *const *)p->w, p->scales, x, bf16, y, M, p->N, p->K, p->groups, u8);
    else if (M > 1)
        gemm_bf16((const uint16_t *)p->w, (const uint16_t *)x, y, M, p->rows, p->N, p->K, 1, p->nb);
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
    attend_decode(s->q, L->cache_k, L->cache_v, firsts, counts, offsets, s->attn, M, s->KV,
                  s->H / s->KV, s->D, s->scale, bf16);
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
