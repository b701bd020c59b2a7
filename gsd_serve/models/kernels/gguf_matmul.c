/* y = x @ W.T for GGUF block-quantized weights W, in fp32, batch-invariant; and the rest of a Llama layer.
 *
 * W comes from the file's blocks (Q4_1: per 32 inputs an fp16 scale d, an fp16 minimum m and 32 4-bit q,
 * w = q * d + m; Q8_0: an fp16 d and 32 int8 q, w = q * d), repacked per output row by gguf_blocks.py as
 * [d of every block (fp16)] [m of every block (fp16), Q4_1 only] [q of every block]: the same bytes, laid out
 * so that a row's scales convert to fp32 16 at a time. Q4_1 q: 16 bytes per block, low nibbles are inputs
 * 0..15, high nibbles 16..31. Q8_0 q: 32 int8 per block.
 *
 * Each weight is dequantized exactly as the dense fp32 model holds it (q * d is exact in fp32, so the fused
 * q * d + m rounds once, like the dense model's separate multiply and add), multiplied with fp32
 * activations and summed in fp32: the same model, summed in another order than a dense GEMM.
 *
 * Batch-invariant: a row's output is summed in one fixed order (block by block into 32 lane accumulators,
 * then a fixed pairwise reduction), whatever M is and wherever the row sits among the others, so a token
 * verified in a tree and the same token decoded alone get bit-identical projections.
 *
 * Fast: a decoding step reads 0.63 (Q4_1) or 1.06 (Q8_0) bytes per weight instead of 4. With AVX-512 a
 * Q4_1 block dequantizes through a 16-entry table (i * d + m for i = 0..15, one FMA) indexed by the nibbles
 * (vpermps), and up to TILE rows of x share each dequantized block.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* Which paths this build takes. The vector paths need x86 intrinsics (<immintrin.h>) and the CPU features
 * the compiler targets (-march); every other build, and any build with -DGSD_PORTABLE, takes the portable C
 * paths, which compute the same sums in the same fixed orders within each path. */
#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && !defined(GSD_PORTABLE)
#include <immintrin.h>
#define GSD_X86 1
#endif
#if defined(GSD_X86) && defined(__AVX512F__)
#define GSD_AVX512 1    /* the AVX-512 paths below */
#endif
#if defined(GSD_X86) && defined(__F16C__)
#define GSD_F16C 1      /* fp16 -> fp32 in one instruction */
#endif
#if defined(GSD_X86) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(GSD_AVX512)
#define GSD_AVX2 1      /* the AVX2 paths below (every AVX2 CPU also has FMA and F16C) */
#endif

#define QK 32
#define TILE 8

/* The functions Python calls: gsd_serve/models/gguf_kernels.py types its ctypes calls from these declarations
 * (every pointer a void pointer; int, long and float as they are), and the compiler checks the definitions
 * below against them. */
void q4_1_matmul(const float *x, int M, int K, const uint8_t *w, int N, float *y);
void q8_0_matmul(const float *x, int M, int K, const uint8_t *w, int N, float *y);
void rms_norm(const float *x, const float *w, float eps, int rows, int d, float *out);
void layer_forward(int kind, float *h, int n, int d, const float *norm1, float eps1, const uint8_t *qkv_w,
                   const uint8_t *o_w, const float *norm2, float eps2, const uint8_t *gate_up_w, int ff,
                   const uint8_t *down_w, const float *cos_, const float *sin_, int nseq, const int *bounds,
                   float *const *k_bufs, float *const *v_bufs, const long *caps, const long *starts,
                   const uint8_t *const *masks, int H, int KVH, int hd, float scale, float *scratch);
#define MAX_BLOCKS 4096     /* inputs per row up to 131072 */

/* the fixed reduction of 32 lane sums: s16[j] = a[j] + a[j+16], then halves again, then (0+2) + (1+3) */
static inline float reduce16(const float *s16) {
    float s8[8], s4[4];
    for (int j = 0; j < 8; j++) s8[j] = s16[j] + s16[j + 8];
    for (int j = 0; j < 4; j++) s4[j] = s8[j] + s8[j + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* fp16 scales -> fp32 (exact) */
static inline void halves_to_floats(const uint8_t *src, int n, float *dst) {
    int b = 0;
#if defined(GSD_AVX512)
    for (; b + 16 <= n; b += 16)
        _mm512_storeu_ps(dst + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * b))));
#endif
    for (; b < n; b++) {
        uint16_t h;
        memcpy(&h, src + 2 * b, 2);
#if defined(GSD_F16C)
        dst[b] = _cvtsh_ss(h);
#else   /* CPUs without F16C: the same exact conversion in integer arithmetic */
        const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, mant = h & 0x3ff;
        uint32_t bits;
        if (e == 31) bits = sign | 0x7f800000u | (mant << 13);                    /* inf, nan */
        else if (e) bits = sign | ((e + 112) << 23) | (mant << 13);               /* normal */
        else {                                                                    /* zero, subnormal: mant * 2^-24 */
            float f = (float)mant * 5.9604644775390625e-8f;
            memcpy(&bits, &f, 4);
            bits |= sign;
        }
        memcpy(dst + b, &bits, 4);
#endif
    }
}

#if defined(GSD_AVX2)
/* AVX2 (AMD EPYC before Zen 4, older Intel): 8-lane sums. A row's 32 inputs of a block are 4 chunks of 8
 * consecutive inputs; every chunk of every block adds into the same 8 lane accumulators in input order, then
 * one fixed reduction (hsum8). That order is the same whatever M is and whichever tile computes the row, so
 * the matmul stays batch-invariant. 8 lanes (not 32) so that one (output, row) pair needs one register:
 * tiles of several outputs x several rows fit the 16 ymm registers, and a tree's rows share each
 * dequantized weight from L1. */
#define AI __attribute__((always_inline)) inline

static AI float hsum8(__m256 v) {   /* lanes j + (j+4), then + (j+2), + (j+1) */
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

static AI float half_at(const uint8_t *p, int i) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return _cvtsh_ss(h);
}

/* one block's 32 weights as 4 chunks of 8 (inputs 0-7, 8-15, 16-23, 24-31) */
static AI void dequant_block(const int kind, const uint8_t *q, float d, float m, __m256 *w) {
    const __m256 dv = _mm256_set1_ps(d);
    if (kind == 4) {   /* low nibbles of bytes 0..15 are inputs 0..15, high nibbles 16..31 */
        const __m128i v = _mm_loadu_si128((const __m128i *)q), mask = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        const __m256 mv = _mm256_set1_ps(m);
        w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, mv);
        w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo))), dv, mv);
        w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, mv);
        w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi))), dv, mv);
    } else {           /* q * d is exact in fp32 */
        for (int c = 0; c < 4; c++)
            w[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                       _mm_loadl_epi64((const __m128i *)(q + 8 * c)))), dv);
    }
}

/* Outputs n0..n0+NR-1 for rows r0..r0+MR-1, each weight dequantized in registers and used at once: the
 * path of a decoding step and of small trees (up to 6 rows). Scales convert 8 blocks at a
 * time (a row's scales are followed by its minimums or q bytes, so the 16-byte loads stay inside the row). */
static AI void direct_tile(const int kind, const float *x, int K, const uint8_t *w, size_t row_bytes, int N,
                           float *y, int n0, const int NR, int r0, const int MR) {
    const int nb = K / QK, qbytes = kind == 4 ? 16 : 32, scale_bytes = kind == 4 ? 4 : 2;
    __m256 acc[8][6];   /* NR x MR <= 8 of them used */
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < MR; t++) acc[i][t] = _mm256_setzero_ps();
    const uint8_t *next = w + (size_t)(n0 + NR) * row_bytes;
    const size_t next_lines = (NR * row_bytes + 63) / 64;
    for (int b0 = 0; b0 < nb; b0 += 8) {
        float ds[8][8], ms[8][8];
        for (int i = 0; i < NR; i++) {
            const uint8_t *row = w + (size_t)(n0 + i) * row_bytes;
            _mm256_storeu_ps(ds[i], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * b0))));
            if (kind == 4)
                _mm256_storeu_ps(ms[i], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * nb + 2 * b0))));
        }
        const int bend = nb - b0 < 8 ? nb - b0 : 8;
        for (int bb = 0; bb < bend; bb++) {
            const int b = b0 + bb;
            /* the rows interleave NR streams, which the hardware prefetchers follow badly: fetch the next
             * tile's bytes (contiguous) a slice per block; prefetching past the matrix does not fault */
            for (size_t line = (size_t)b * next_lines / nb; line < (size_t)(b + 1) * next_lines / nb; line++)
                _mm_prefetch((const char *)(next + 64 * line), _MM_HINT_T0);
            for (int i = 0; i < NR; i++) {
                const uint8_t *row = w + (size_t)(n0 + i) * row_bytes;
                __m256 wc[4];
                dequant_block(kind, row + (size_t)nb * scale_bytes + (size_t)b * qbytes, ds[i][bb],
                              kind == 4 ? ms[i][bb] : 0.0f, wc);
                for (int t = 0; t < MR; t++) {
                    const float *xr = x + (size_t)(r0 + t) * K + (size_t)b * QK;
                    for (int c = 0; c < 4; c++)
                        acc[i][t] = _mm256_fmadd_ps(wc[c], _mm256_loadu_ps(xr + 8 * c), acc[i][t]);
                }
            }
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < MR; t++) y[(size_t)(r0 + t) * N + n0 + i] = hsum8(acc[i][t]);
}

/* Outputs n0..n0+NR-1 (dequantized into wbuf [NR, K] beforehand) for rows r0..r0+MR-1: NR x MR
 * accumulators (at most 3 x 4) over K in chunks of 8; with the NR weight chunks and one row's chunk that is
 * all 16 ymm registers, so each loaded chunk feeds 3 or 4 FMAs. */
static AI void buffered_tile(const float *wbuf, const float *x, int K, int N, float *y, int n0, const int NR,
                             int r0, const int MR) {
    __m256 acc[3][4];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < MR; t++) acc[i][t] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8) {
        __m256 wv[3];
        for (int i = 0; i < NR; i++) wv[i] = _mm256_loadu_ps(wbuf + (size_t)i * K + k);
        for (int t = 0; t < MR; t++) {
            const __m256 xv = _mm256_loadu_ps(x + (size_t)(r0 + t) * K + k);
            for (int i = 0; i < NR; i++) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < MR; t++) y[(size_t)(r0 + t) * N + n0 + i] = hsum8(acc[i][t]);
}

static AI void buffered_rows(const float *wbuf, const float *x, int M, int K, int N, float *y, int n0,
                             const int NR) {
    int r0 = 0;
    for (; r0 + 4 <= M; r0 += 4) buffered_tile(wbuf, x, K, N, y, n0, NR, r0, 4);
    if (M - r0 == 3) buffered_tile(wbuf, x, K, N, y, n0, NR, r0, 3);
    else if (M - r0 == 2) buffered_tile(wbuf, x, K, N, y, n0, NR, r0, 2);
    else if (M - r0 == 1) buffered_tile(wbuf, x, K, N, y, n0, NR, r0, 1);
}

static AI void dequant_rows(const int kind, const uint8_t *w, size_t row_bytes, int K, int n0, const int NR,
                            float *wbuf) {
    const int nb = K / QK, qbytes = kind == 4 ? 16 : 32, scale_bytes = kind == 4 ? 4 : 2;
    for (int i = 0; i < NR; i++) {
        const uint8_t *row = w + (size_t)(n0 + i) * row_bytes;
        for (int b = 0; b < nb; b++) {
            __m256 wc[4];
            dequant_block(kind, row + (size_t)nb * scale_bytes + (size_t)b * qbytes, half_at(row, b),
                          kind == 4 ? half_at(row + 2 * nb, b) : 0.0f, wc);
            for (int c = 0; c < 4; c++) _mm256_storeu_ps(wbuf + (size_t)i * K + (size_t)b * QK + 8 * c, wc[c]);
        }
    }
}

/* direct tiles: NR outputs x M rows, M <= 6, NR x M <= 8 accumulators (measured faster than the buffered
 * path below 7 rows on a Zen 3) */
static inline int direct_width(int M) { return M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1; }

static AI void direct_group(const int kind, const float *x, int M, int K, const uint8_t *w, size_t row_bytes,
                            int N, float *y, int n0, const int NR) {
    switch (M) {
        case 1: direct_tile(kind, x, K, w, row_bytes, N, y, n0, NR, 0, 1); break;
        case 2: direct_tile(kind, x, K, w, row_bytes, N, y, n0, NR, 0, 2); break;
        case 3: direct_tile(kind, x, K, w, row_bytes, N, y, n0, NR, 0, 3); break;
        case 4: direct_tile(kind, x, K, w, row_bytes, N, y, n0, NR, 0, 4); break;
        case 5: direct_tile(kind, x, K, w, row_bytes, N, y, n0, NR, 0, 5); break;
        default: direct_tile(kind, x, K, w, row_bytes, N, y, n0, NR, 0, 6); break;
    }
}

#define DEFINE_MATMUL(NAME, KIND)                                                                          \
void NAME(const float *x, int M, int K, const uint8_t *w, int N, float *y) {                             \
    const size_t row_bytes = (size_t)(K / QK) * (KIND == 4 ? 20 : 34);                                    \
    if (M <= 6) {                                                                                         \
        const int NR = direct_width(M), groups = N / NR;                                                  \
        _Pragma("omp parallel for schedule(static)")                                                     \
        for (int g = 0; g < groups; g++) {                                                                \
            switch (NR) {                                                                                 \
                case 8: direct_group(KIND, x, M, K, w, row_bytes, N, y, g * 8, 8); break;                 \
                case 4: direct_group(KIND, x, M, K, w, row_bytes, N, y, g * 4, 4); break;                 \
                case 2: direct_group(KIND, x, M, K, w, row_bytes, N, y, g * 2, 2); break;                 \
                default: direct_group(KIND, x, M, K, w, row_bytes, N, y, g, 1); break;                    \
            }                                                                                             \
        }                                                                                                 \
        for (int n = groups * NR; n < N; n++) direct_group(KIND, x, M, K, w, row_bytes, N, y, n, 1);      \
        return;                                                                                           \
    }                                                                                                     \
    const int groups = (N + 2) / 3;                                                                       \
    _Pragma("omp parallel")                                                                              \
    {                                                                                                     \
        float *wbuf = (float *)aligned_alloc(64, sizeof(float) * 3 * (size_t)K);                          \
        _Pragma("omp for schedule(static)")                                                              \
        for (int g = 0; g < groups; g++) {                                                                \
            const int n0 = 3 * g;                                                                         \
            if (n0 + 3 <= N) {                                                                            \
                dequant_rows(KIND, w, row_bytes, K, n0, 3, wbuf);                                         \
                for (size_t at = 0; at < 3 * row_bytes; at += 64)   /* the next tile's rows, during this one */ \
                    _mm_prefetch((const char *)(w + (size_t)(n0 + 3) * row_bytes + at), _MM_HINT_T0);     \
                buffered_rows(wbuf, x, M, K, N, y, n0, 3);                                                \
            } else {                                                                                      \
                for (int n = n0; n < N; n++) {                                                            \
                    dequant_rows(KIND, w, row_bytes, K, n, 1, wbuf);                                      \
                    buffered_rows(wbuf, x, M, K, N, y, n, 1);                                             \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        free(wbuf);                                                                                       \
    }                                                                                                     \
}

#elif defined(GSD_AVX512)
/* AVX-512 (Intel since Skylake-SP, AMD since Zen 4): 32 lane sums per (output, row), as two 16-lane
 * accumulators (inputs 0-15 and 16-31 of every block, blocks in input order), then lo + hi and reduce16's
 * order; the same order whatever M is and wherever a row sits, so batch-invariant. */
#define AI __attribute__((always_inline)) inline

/* reduce16's order with shuffles: lanes j + (j+8), then + (j+4), + (j+2), + (j+1) */
static AI float hsum16(__m512 v) {
    __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

/* a block's 32 weights: inputs 0..15 in lo, 16..31 in hi. Q4_1 through a 16-entry table (i * d + m, rounded
 * once like the dense model's q * d + m) indexed by the nibbles (vpermps reads an index's low 4 bits). */
static AI void dequant512(const int kind, const uint8_t *q, float d, float m, __m512 *lo, __m512 *hi) {
    if (kind == 4) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(d), _mm512_set1_ps(m));
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
        *lo = _mm512_permutexvar_ps(idx, table);
        *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
    } else {   /* q * d is exact in fp32 */
        const __m512 dv = _mm512_set1_ps(d);
        *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), dv);
        *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), dv);
    }
}

/* ROWS (a constant, <= TILE) rows of x from r0 against output n (its scales dv/mv, its q bytes): each
 * dequantized block feeds every row; the inputs come from L1 as memory operands of the FMAs (measured as fast
 * as tiles of 2-4 outputs that keep inputs in registers, on a Zen 5) */
static AI void dot_rows(const int kind, const float *x, int K, const uint8_t *q, const float *dv, const float *mv,
                        float *y, int N, int n, int r0, const int ROWS) {
    const int nb = K / QK, qbytes = kind == 4 ? 16 : 32;
    __m512 lo[TILE], hi[TILE];
    for (int r = 0; r < ROWS; r++) lo[r] = hi[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512 wl, wh;
        dequant512(kind, q + (size_t)b * qbytes, dv[b], kind == 4 ? mv[b] : 0.0f, &wl, &wh);
        for (int r = 0; r < ROWS; r++) {
            const float *xr = x + (size_t)(r0 + r) * K + (size_t)b * QK;
            lo[r] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xr), lo[r]);
            hi[r] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xr + 16), hi[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) y[(size_t)(r0 + r) * N + n] = hsum16(_mm512_add_ps(lo[r], hi[r]));
}

/* outputs n_begin..n_end-1 of every row. The outputs go in panels of ~256 KB of blocks; within a panel the
 * row tiles run one after another over every output, so a tile's inputs stay in L1 while the panel's blocks
 * come from L2. (Every output over all rows at once re-read a tree's inputs from L2 per output: 32 rows took
 * 2.2x as long.) */
static AI void outputs512(const int kind, const float *x, int M, int K, const uint8_t *w, int N, float *y,
                          int n_begin, int n_end) {
    const int nb = K / QK;
    const size_t row_bytes = (size_t)nb * (kind == 4 ? 20 : 34), q_at = (size_t)nb * (kind == 4 ? 4 : 2);
    const int panel = row_bytes * 64 >= 262144 ? 64 : (int)(262144 / row_bytes);   /* outputs */
    float dv[MAX_BLOCKS], mv[MAX_BLOCKS];
    for (int p0 = n_begin; p0 < n_end; p0 += panel) {
        const int p1 = p0 + panel < n_end ? p0 + panel : n_end;
        for (int r0 = 0; r0 < M; r0 += TILE) {
            const int rows = M - r0 < TILE ? M - r0 : TILE;
            for (int n = p0; n < p1; n++) {
                const uint8_t *row = w + (size_t)n * row_bytes;
                halves_to_floats(row, nb, dv);
                if (kind == 4) halves_to_floats(row + 2 * (size_t)nb, nb, mv);
#define ROWS512(R) dot_rows(kind, x, K, row + q_at, dv, mv, y, N, n, r0, R)
                switch (rows) {   /* constant row counts, so that the accumulators live in registers */
                    case 8: ROWS512(8); break;
                    case 7: ROWS512(7); break;
                    case 6: ROWS512(6); break;
                    case 5: ROWS512(5); break;
                    case 4: ROWS512(4); break;
                    case 3: ROWS512(3); break;
                    case 2: ROWS512(2); break;
                    default: ROWS512(1); break;
                }
#undef ROWS512
            }
        }
    }
}

/* threads split the outputs into contiguous ranges */
#define DEFINE_MATMUL(NAME, KIND)                                                                          \
void NAME(const float *x, int M, int K, const uint8_t *w, int N, float *y) {                             \
    _Pragma("omp parallel")                                                                              \
    {                                                                                                     \
        const int nt = omp_get_num_threads(), t = omp_get_thread_num(), per = (N + nt - 1) / nt;          \
        const int a = t * per < N ? t * per : N, b = a + per < N ? a + per : N;                           \
        if (a < b) outputs512(KIND, x, M, K, w, N, y, a, b);                                              \
    }                                                                                                     \
}

#else   /* portable: 32-lane sums per (output, row) */
/* the same arithmetic per lane, left to the compiler (CPUs without AVX2 or AVX-512) */
static inline __attribute__((always_inline)) void dot_rows(
        int kind, const float *x, int K, const uint8_t *q, int qbytes, const float *dv, const float *mv,
        float *y, int N, int n, int r0, const int ROWS) {
    const int nb = K / QK;
    float acc[TILE][QK];
    memset(acc, 0, sizeof acc);
    for (int b = 0; b < nb; b++) {
        float w[QK];
        const uint8_t *qb = q + (size_t)b * qbytes;
        if (kind == 4) {
            for (int j = 0; j < 16; j++) {
                w[j] = __builtin_fmaf((float)(qb[j] & 15), dv[b], mv[b]);
                w[j + 16] = __builtin_fmaf((float)(qb[j] >> 4), dv[b], mv[b]);
            }
        } else {
            for (int j = 0; j < QK; j++) w[j] = (float)(int8_t)qb[j] * dv[b];
        }
        for (int r = 0; r < ROWS; r++) {
            const float *xr = x + (size_t)(r0 + r) * K + (size_t)b * QK;
            for (int j = 0; j < QK; j++) acc[r][j] = __builtin_fmaf(w[j], xr[j], acc[r][j]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float s16[16];
        for (int j = 0; j < 16; j++) s16[j] = acc[r][j] + acc[r][j + 16];
        y[(size_t)(r0 + r) * N + n] = reduce16(s16);
    }
}

/* x [M, K] fp32, W [N rows of repacked blocks] -> y [M, N]; threads split the outputs. KIND 4: Q4_1, 8: Q8_0
 * (a constant per function, so that each kind compiles to its own loop) */
#define DEFINE_MATMUL(NAME, KIND)                                                                          \
void NAME(const float *x, int M, int K, const uint8_t *w, int N, float *y) {                             \
    const int nb = K / QK, qbytes = KIND == 4 ? 16 : 32;                                                  \
    const size_t row_bytes = (size_t)nb * (KIND == 4 ? 20 : 34);                                          \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int n = 0; n < N; n++) {                                                                         \
        const uint8_t *row = w + (size_t)n * row_bytes;                                                   \
        float dv[MAX_BLOCKS], mv[MAX_BLOCKS];                                                             \
        halves_to_floats(row, nb, dv);                                                                    \
        if (KIND == 4) halves_to_floats(row + 2 * nb, nb, mv);                                            \
        const uint8_t *q = row + (size_t)nb * (KIND == 4 ? 4 : 2);                                        \
        int r0 = 0;                                                                                       \
        /* constant row counts, so that the accumulators live in registers */                             \
        for (; r0 + TILE <= M; r0 += TILE) dot_rows(KIND, x, K, q, qbytes, dv, mv, y, N, n, r0, TILE);    \
        switch (M - r0) {                                                                                 \
            case 7: dot_rows(KIND, x, K, q, qbytes, dv, mv, y, N, n, r0, 7); break;                       \
            case 6: dot_rows(KIND, x, K, q, qbytes, dv, mv, y, N, n, r0, 6); break;                       \
            case 5: dot_rows(KIND, x, K, q, qbytes, dv, mv, y, N, n, r0, 5); break;                       \
            case 4: dot_rows(KIND, x, K, q, qbytes, dv, mv, y, N, n, r0, 4); break;                       \
            case 3: dot_rows(KIND, x, K, q, qbytes, dv, mv, y, N, n, r0, 3); break;                       \
            case 2: dot_rows(KIND, x, K, q, qbytes, dv, mv, y, N, n, r0, 2); break;                       \
            case 1: dot_rows(KIND, x, K, q, qbytes, dv, mv, y, N, n, r0, 1); break;                       \
            default: break;                                                                               \
        }                                                                                                 \
    }                                                                                                     \
}

#endif

DEFINE_MATMUL(q4_1_matmul, 4)
DEFINE_MATMUL(q8_0_matmul, 8)

/* ---- the rest of a Llama layer, per token, in fixed orders (so batch-invariant like the matmuls) ---- */
#include <math.h>

/* out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), rows of d floats (LlamaRMSNorm in fp32) */
void rms_norm(const float *x, const float *w, float eps, int rows, int d, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * d;
        float s16[16] = {0};
        int j = 0;
        for (; j + 16 <= d; j += 16)
            for (int l = 0; l < 16; l++) s16[l] += xr[j + l] * xr[j + l];
        float ss = reduce16(s16);
        for (; j < d; j++) ss += xr[j] * xr[j];
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        float *o = out + (size_t)r * d;
        for (j = 0; j < d; j++) o[j] = w[j] * (xr[j] * inv);
    }
}

/* Splits fused q|k|v rows [T, (H + 2 KVH) * hd], applies RoPE (HF Llama: x * cos + rotate_half(x) * sin,
 * cos/sin [T, hd]) to q and k, writes roped q to q_out [T, H, hd] and k, v into the layer's cache buffers
 * (k_cache/v_cache [KVH, capacity, hd]) at slots start..start+T-1. */
void rope_split(const float *qkv, const float *cos_, const float *sin_, int T, int H, int KVH, int hd,
                float *q_out, float *k_cache, float *v_cache, long capacity, long start) {
    const int half = hd / 2, width = (H + 2 * KVH) * hd;
    for (int t = 0; t < T; t++) {
        const float *row = qkv + (size_t)t * width, *c = cos_ + (size_t)t * hd, *s = sin_ + (size_t)t * hd;
        for (int h = 0; h < H + KVH; h++) {
            const float *x = row + (size_t)h * hd;
            float *o = h < H ? q_out + ((size_t)t * H + h) * hd
                             : k_cache + ((size_t)(h - H) * capacity + start + t) * hd;
            for (int j = 0; j < half; j++) {
                o[j] = x[j] * c[j] - x[j + half] * s[j];
                o[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
            }
        }
        for (int h = 0; h < KVH; h++)
            memcpy(v_cache + ((size_t)h * capacity + start + t) * hd, row + (size_t)(H + KVH + h) * hd,
                   sizeof(float) * hd);
    }
}

/* exp(x) for the softmax, 16 lanes at a time where AVX-512 exists: 2^k * p(r) with r = x - k ln2, a degree-6
 * polynomial (relative error ~2e-7, like expf). One fixed formula per lane, so results do not depend on how
 * many keys a query sees; scalar tails use the same formula. */
static inline float exp_poly(float x) {
    if (x < -87.0f) return 0.0f;
    float k = nearbyintf(x * 1.44269504088896341f);
    float r = __builtin_fmaf(k, -0.693145751953125f, x);
    r = __builtin_fmaf(k, -1.428606765330187e-06f, r);
    float p = 1.0f / 720;
    p = __builtin_fmaf(p, r, 1.0f / 120);
    p = __builtin_fmaf(p, r, 1.0f / 24);
    p = __builtin_fmaf(p, r, 1.0f / 6);
    p = __builtin_fmaf(p, r, 0.5f);
    p = __builtin_fmaf(p, r, 1.0f);
    p = __builtin_fmaf(p, r, 1.0f);
    return ldexpf(p, (int)k);
}

static void exp_shifted(float *s, int count, float shift) {
    int j = 0;
#if defined(GSD_AVX512)
    const __m512 sh = _mm512_set1_ps(shift);
    for (; j + 16 <= count; j += 16) {
        __m512 x = _mm512_sub_ps(_mm512_loadu_ps(s + j), sh);
        __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
        __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-0.693145751953125f), x);
        r = _mm512_fmadd_ps(k, _mm512_set1_ps(-1.428606765330187e-06f), r);
        __m512 p = _mm512_set1_ps(1.0f / 720);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        __m512 e = _mm512_scalef_ps(p, k);
        _mm512_storeu_ps(s + j, _mm512_mask_blend_ps(low, e, _mm512_setzero_ps()));
    }
#endif
#if defined(GSD_AVX2)
    /* 8 lanes at a time; the tail goes through the same vector code (padded), so every value gets one formula */
    const __m256 sh = _mm256_set1_ps(shift);
    for (; j < count; j += 8) {
        float pad[8] = {0};
        const int n = count - j < 8 ? count - j : 8;
        float *src = n == 8 ? s + j : pad;
        if (n < 8) memcpy(pad, s + j, sizeof(float) * n);
        __m256 x = _mm256_sub_ps(_mm256_loadu_ps(src), sh);
        __m256 low = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
        __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        k = _mm256_min_ps(k, _mm256_set1_ps(127.0f));
        __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-0.693145751953125f), x);
        r = _mm256_fmadd_ps(k, _mm256_set1_ps(-1.428606765330187e-06f), r);
        __m256 p = _mm256_set1_ps(1.0f / 720);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
        /* 2^k built in the exponent field (k >= -126 here, a normal number), so p * 2^k rounds once */
        __m256 two_k = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_max_ps(k, _mm256_set1_ps(-126.0f))), _mm256_set1_epi32(127)), 23));
        __m256 e = _mm256_andnot_ps(low, _mm256_mul_ps(p, two_k));
        if (n == 8) _mm256_storeu_ps(s + j, e);
        else {
            _mm256_storeu_ps(pad, e);
            memcpy(s + j, pad, sizeof(float) * n);
        }
    }
#endif
    for (; j < count; j++) s[j] = exp_poly(s[j] - shift);
}

/* q . k over a head (hd a multiple of 16): 16 lane sums, then one fixed reduction */
static inline __attribute__((always_inline)) float dot_hd(const float *q, const float *k, const int hd) {
#if defined(GSD_AVX512)
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
    for (int a = 16; a < hd; a += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + a), _mm512_loadu_ps(k + a), acc);
    __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
#elif defined(GSD_AVX2)
    /* lanes 0-7 and 8-15 of the 16 lane sums, then reduce16's order */
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(q + 8), _mm256_loadu_ps(k + 8));
    for (int a = 16; a < hd; a += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + a), _mm256_loadu_ps(k + a), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + a + 8), _mm256_loadu_ps(k + a + 8), a1);
    }
    return hsum8(_mm256_add_ps(a0, a1));
#else
    float s16[16] = {0};
    for (int a = 0; a < hd; a += 16)
        for (int l = 0; l < 16; l++) s16[l] = __builtin_fmaf(q[a + l], k[a + l], s16[l]);
    return reduce16(s16);
#endif
}

/* scores[j] = (q . K[j]) * scale for keys 0..count-1, four keys at a time (independent chains) */
static inline __attribute__((always_inline)) void key_scores(const float *q, const float *K, int count,
                                                             const int HD, float scale, float *scores) {
    int j = 0;
    for (; j + 4 <= count; j += 4) {
        const float *k0 = K + (size_t)j * HD;
        float a = dot_hd(q, k0, HD), b = dot_hd(q, k0 + HD, HD);
        float c = dot_hd(q, k0 + 2 * HD, HD), d = dot_hd(q, k0 + 3 * HD, HD);
        scores[j] = a * scale;
        scores[j + 1] = b * scale;
        scores[j + 2] = c * scale;
        scores[j + 3] = d * scale;
    }
    for (; j < count; j++) scores[j] = dot_hd(q, K + (size_t)j * HD, HD) * scale;
}

/* o = sum_j p[j] V[j] / sum_j p[j] over the keys in slot order (keys with p = 0 skipped), lane sums of p in a
 * fixed order; HD constant where it can be, so the accumulators stay in registers */
static inline __attribute__((always_inline)) void weighted_sum(const float *p, int count, const float *V,
                                                               const int HD, float *o) {
    /* in slot order over the keys the query sees (p > 0): a tree node's ancestors sit at other slots than
     * the same tokens decoded one by one, so lane-wise sums would group them differently */
    float sum = 0.0f;
    int j;
    for (j = 0; j < count; j++)
        if (p[j] != 0.0f) sum += p[j];
#if defined(GSD_AVX512)
    __m512 acc[16];
    if (HD <= 256) {
        for (int a = 0; a < HD / 16; a++) acc[a] = _mm512_setzero_ps();
        for (j = 0; j < count; j++) {
            if (p[j] == 0.0f) continue;
            const __m512 pj = _mm512_set1_ps(p[j]);
            const float *vv = V + (size_t)j * HD;
            for (int a = 0; a < HD / 16; a++) acc[a] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vv + 16 * a), acc[a]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sum);
        for (int a = 0; a < HD / 16; a++) _mm512_storeu_ps(o + 16 * a, _mm512_mul_ps(acc[a], inv));
        return;
    }
#elif defined(GSD_AVX2)
    __m256 acc[8];
    if (HD <= 64) {
        for (int a = 0; a < HD / 8; a++) acc[a] = _mm256_setzero_ps();
        for (j = 0; j < count; j++) {
            if (p[j] == 0.0f) continue;
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float *vv = V + (size_t)j * HD;
            for (int a = 0; a < HD / 8; a++) acc[a] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vv + 8 * a), acc[a]);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (int a = 0; a < HD / 8; a++) _mm256_storeu_ps(o + 8 * a, _mm256_mul_ps(acc[a], inv));
        return;
    }
#endif
    for (int a = 0; a < HD; a++) o[a] = 0.0f;
    for (j = 0; j < count; j++) {
        if (p[j] == 0.0f) continue;
        const float *vv = V + (size_t)j * HD;
        for (int a = 0; a < HD; a++) o[a] = __builtin_fmaf(p[j], vv[a], o[a]);
    }
    const float inv = 1.0f / sum;
    for (int a = 0; a < HD; a++) o[a] *= inv;
}

/* Attention of q [T, H, hd] over the cache's first L entries (k/v_cache [KVH, capacity, hd]), query head h
 * reading kv head h / (H / KVH). mask [T, L] (1 = attend) or NULL: query t sees keys < L - T + t + 1.
 * Scores, softmax and the weighted sum run over the visible keys in slot order, so a query's result depends
 * only on what it sees. out [T, H, hd]. */
void attention(const float *q, const float *k_cache, const float *v_cache, long capacity, int L,
               const uint8_t *mask, int T, int H, int KVH, int hd, float scale, float *out) {
    const int group = H / KVH;
    #pragma omp parallel for schedule(static) collapse(2)
    for (int h = 0; h < H; h++) {
        for (int t = 0; t < T; t++) {
            const float *qv = q + ((size_t)t * H + h) * hd;
            const float *K = k_cache + (size_t)(h / group) * capacity * hd;
            const float *V = v_cache + (size_t)(h / group) * capacity * hd;
            const uint8_t *m = mask ? mask + (size_t)t * L : 0;
            const int visible = mask ? L : L - T + t + 1;
            float scores_stack[2048];
            float *scores = visible <= 2048 ? scores_stack : (float *)malloc(sizeof(float) * visible);
            if (hd == 64) key_scores(qv, K, visible, 64, scale, scores);
            else key_scores(qv, K, visible, hd, scale, scores);
            float mx = -INFINITY;
            for (int j = 0; j < visible; j++) {
                if (m && !m[j]) scores[j] = -INFINITY;
                else if (scores[j] > mx) mx = scores[j];
            }
            exp_shifted(scores, visible, mx);      /* masked keys: exp(-inf) = 0 */
            float *o = out + ((size_t)t * H + h) * hd;
            if (hd == 64) weighted_sum(scores, visible, V, 64, o);
            else weighted_sum(scores, visible, V, hd, o);
            if (scores != scores_stack) free(scores);
        }
    }
}

/* x = silu(gate) * up for gate_up [rows, 2 * f] (gate first) -> out [rows, f]; silu(g) = g / (1 + exp(-g)) */
static void silu_mul(const float *gate_up, int rows, int f, float *out) {
    float e[4096];
    for (int r = 0; r < rows; r++) {
        const float *g = gate_up + (size_t)r * 2 * f, *u = g + f;
        float *o = out + (size_t)r * f;
        for (int j0 = 0; j0 < f; j0 += 4096) {
            int cnt = f - j0 < 4096 ? f - j0 : 4096;
            for (int j = 0; j < cnt; j++) e[j] = -g[j0 + j];
            exp_shifted(e, cnt, 0.0f);
            for (int j = 0; j < cnt; j++) o[j0 + j] = g[j0 + j] / (1.0f + e[j]) * u[j0 + j];
        }
    }
}

/* One Llama decoder layer over n new tokens of one or more sequences, in place on the residual stream
 * h [n, d]: h += o_proj(attention(rope(qkv(norm1(h))))); h += down(silu(gate) * up) of norm2(h).
 * Sequence s owns rows bounds[s]..bounds[s+1]-1 and its layer cache k_bufs[s] / v_bufs[s]
 * ([KVH, caps[s], hd], new entries written at starts[s]..), attends under masks[s] ([rows, starts[s] + rows]
 * bytes, 1 = attend) or causally (NULL). Scratch: n * (d + qkv_n + 2 * H * hd + 2 * ff + ff) floats.
 * kind: 4 if the layer's four weight matrices are Q4_1 blocks, 8 if Q8_0.
 * One call per layer instead of ~10: the per-call cost of Python is what a 30-layer CPU step otherwise pays. */
static inline void block_matmul(int kind, const float *x, int M, int K, const uint8_t *w, int N, float *y) {
    if (kind == 8) q8_0_matmul(x, M, K, w, N, y);
    else q4_1_matmul(x, M, K, w, N, y);
}

void layer_forward(int kind, float *h, int n, int d, const float *norm1, float eps1, const uint8_t *qkv_w,
                   const uint8_t *o_w, const float *norm2, float eps2, const uint8_t *gate_up_w, int ff,
                   const uint8_t *down_w, const float *cos_, const float *sin_, int nseq, const int *bounds,
                   float *const *k_bufs, float *const *v_bufs, const long *caps, const long *starts,
                   const uint8_t *const *masks, int H, int KVH, int hd, float scale, float *scratch) {
    const int qkv_n = (H + 2 * KVH) * hd, attn_n = H * hd;
    float *x = scratch, *qkv = x + (size_t)n * d, *q = qkv + (size_t)n * qkv_n, *att = q + (size_t)n * attn_n;
    float *gu = att + (size_t)n * attn_n, *act = gu + (size_t)n * 2 * ff, *tmp = act + (size_t)n * ff;
    rms_norm(h, norm1, eps1, n, d, x);
    block_matmul(kind, x, n, d, qkv_w, qkv_n, qkv);
    for (int s = 0; s < nseq; s++) {
        const int a = bounds[s], rows = bounds[s + 1] - bounds[s];
        rope_split(qkv + (size_t)a * qkv_n, cos_ + (size_t)a * hd, sin_ + (size_t)a * hd, rows, H, KVH, hd,
                   q + (size_t)a * attn_n, k_bufs[s], v_bufs[s], caps[s], starts[s]);
        attention(q + (size_t)a * attn_n, k_bufs[s], v_bufs[s], caps[s], (int)(starts[s] + rows), masks[s], rows,
                  H, KVH, hd, scale, att + (size_t)a * attn_n);
    }
    block_matmul(kind, att, n, attn_n, o_w, d, tmp);
    for (size_t i = 0; i < (size_t)n * d; i++) h[i] += tmp[i];
    rms_norm(h, norm2, eps2, n, d, x);
    block_matmul(kind, x, n, d, gate_up_w, 2 * ff, gu);
    silu_mul(gu, n, ff, act);
    block_matmul(kind, act, n, ff, down_w, d, tmp);
    for (size_t i = 0; i < (size_t)n * d; i++) h[i] += tmp[i];
}
