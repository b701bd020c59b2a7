/* y = x @ W.T for GGUF block-quantized weights W, in fp32, batch-invariant.
 *
 * W is held in the file's own blocks, rows in output order: Q4_1 (20 bytes per 32 inputs: fp16 d, fp16 m,
 * 16 bytes of 4-bit q; low nibbles are inputs 0..15, high nibbles 16..31; w = q * d + m) or Q8_0 (34 bytes:
 * fp16 d, 32 int8 q; w = q * d).
 *
 * Each weight is dequantized exactly as the dense fp32 model holds it (q * d is exact in fp32, so the fused
 * q * d + m rounds once, like the dense model's separate multiply and add), multiplied with fp32
 * activations and summed in fp32: the same model, summed in another order than a dense GEMM.
 *
 * Batch-invariant: a row's output is summed in one fixed order (block by block into 32 lane accumulators,
 * then a fixed pairwise reduction), whatever M is and wherever the row sits among the others, so a token
 * verified in a tree and the same token decoded alone get bit-identical projections.
 *
 * Fast: a decoding step reads 0.63 (Q4_1) or 1.06 (Q8_0) bytes per weight instead of 4, and weight bytes
 * are what a CPU decoding step waits for. Rows are taken TILE at a time so that a block is dequantized once
 * for several rows of a verification tree.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <immintrin.h>

#define QK 32
#define Q4_BYTES 20
#define Q8_BYTES 34
#ifndef PREFETCH
#define PREFETCH 4096
#endif

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* the fixed reduction of 32 lane sums: a[j] + a[j+16], then halves again, then (0+2) + (1+3) */
static inline float reduce16(const float *s16) {
    float s8[8], s4[4];
    for (int j = 0; j < 8; j++) s8[j] = s16[j] + s16[j + 8];
    for (int j = 0; j < 4; j++) s4[j] = s8[j] + s8[j + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#if defined(__AVX512F__)
#define TILE 8
typedef struct { __m512 lo, hi; } wblock;   /* inputs 0..15 and 16..31 of a block */

static inline wblock load_q4_1(const uint8_t *blk) {
    __m512 d = _mm512_set1_ps(half_to_float(blk)), m = _mm512_set1_ps(half_to_float(blk + 2));
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 4)));
    __m512i lo = _mm512_and_si512(q, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(q, 4);
    wblock w = {_mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m), _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m)};
    return w;
}

static inline wblock load_q8_0(const uint8_t *blk) {
    __m512 d = _mm512_set1_ps(half_to_float(blk));
    __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)));
    __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)));
    wblock w = {_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d)};
    return w;
}

#define DEFINE_KERNEL(NAME, LOAD, BYTES)                                                                  \
static inline __attribute__((always_inline)) void NAME##_rows(const float *x, int K, const uint8_t *wrow, float *y, int N, int n, int r0, \
                               int rows) {                                                               \
    const int nb = K / QK;                                                                               \
    __m512 lo[TILE], hi[TILE];                                                                           \
    for (int r = 0; r < TILE; r++) lo[r] = hi[r] = _mm512_setzero_ps();                                  \
    for (int b = 0; b < nb; b++) {                                                                       \
        wblock w = LOAD(wrow + (size_t)b * BYTES);                                                       \
        for (int r = 0; r < rows; r++) {                                                                 \
            const float *xr = x + (size_t)(r0 + r) * K + (size_t)b * QK;                                 \
            lo[r] = _mm512_fmadd_ps(w.lo, _mm512_loadu_ps(xr), lo[r]);                                   \
            hi[r] = _mm512_fmadd_ps(w.hi, _mm512_loadu_ps(xr + 16), hi[r]);                              \
        }                                                                                                \
    }                                                                                                    \
    for (int r = 0; r < rows; r++) {                                                                     \
        float s16[16];                                                                                   \
        _mm512_storeu_ps(s16, _mm512_add_ps(lo[r], hi[r]));                                              \
        y[(size_t)(r0 + r) * N + n] = reduce16(s16);                                                     \
    }                                                                                                    \
}
#else
/* portable fallback (AVX2 machines and others): the same arithmetic per lane, left to the compiler */
#define TILE 4
typedef struct { float v[QK]; } wblock;

static inline wblock load_q4_1(const uint8_t *blk) {
    wblock w;
    float d = half_to_float(blk), m = half_to_float(blk + 2);
    for (int j = 0; j < 16; j++) {
        w.v[j] = __builtin_fmaf((float)(blk[4 + j] & 15), d, m);
        w.v[j + 16] = __builtin_fmaf((float)(blk[4 + j] >> 4), d, m);
    }
    return w;
}

static inline wblock load_q8_0(const uint8_t *blk) {
    wblock w;
    float d = half_to_float(blk);
    for (int j = 0; j < QK; j++) w.v[j] = (float)(int8_t)blk[2 + j] * d;
    return w;
}

#define DEFINE_KERNEL(NAME, LOAD, BYTES)                                                                  \
static inline __attribute__((always_inline)) void NAME##_rows(const float *x, int K, const uint8_t *wrow, float *y, int N, int n, int r0, \
                               int rows) {                                                               \
    const int nb = K / QK;                                                                               \
    float acc[TILE][QK];                                                                                 \
    memset(acc, 0, sizeof acc);                                                                          \
    for (int b = 0; b < nb; b++) {                                                                       \
        wblock w = LOAD(wrow + (size_t)b * BYTES);                                                       \
        for (int r = 0; r < rows; r++) {                                                                 \
            const float *xr = x + (size_t)(r0 + r) * K + (size_t)b * QK;                                 \
            for (int j = 0; j < QK; j++) acc[r][j] = __builtin_fmaf(w.v[j], xr[j], acc[r][j]);           \
        }                                                                                                \
    }                                                                                                    \
    for (int r = 0; r < rows; r++) {                                                                     \
        float s16[16];                                                                                   \
        for (int j = 0; j < 16; j++) s16[j] = acc[r][j] + acc[r][j + 16];                               \
        y[(size_t)(r0 + r) * N + n] = reduce16(s16);                                                     \
    }                                                                                                    \
}
#endif

/* x [M, K] fp32, W [N, K/32 blocks] -> y [M, N]; threads split the outputs */
#define DEFINE_MATMUL(NAME, BYTES)                                                                        \
void NAME(const float *x, int M, int K, const uint8_t *w, int N, float *y) {                            \
    const size_t row_bytes = (size_t)(K / QK) * BYTES;                                                   \
    _Pragma("omp parallel for schedule(static)")                                                        \
    for (int n = 0; n < N; n++) {                                                                        \
        /* one row's worth of weights PREFETCH bytes ahead: the demand loads alone leave bandwidth unused */ \
        const char *ahead = (const char *)w + (size_t)n * row_bytes + PREFETCH;                          \
        for (size_t off = 0; off < row_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);        \
        /* constant row counts, so that the accumulators live in registers */                            \
        int r0 = 0;                                                                                      \
        for (; r0 + TILE <= M; r0 += TILE) NAME##_rows(x, K, w + (size_t)n * row_bytes, y, N, n, r0, TILE); \
        for (; r0 < M; r0++) NAME##_rows(x, K, w + (size_t)n * row_bytes, y, N, n, r0, 1);               \
    }                                                                                                    \
}

DEFINE_KERNEL(q4_1_matmul, load_q4_1, Q4_BYTES)
DEFINE_KERNEL(q8_0_matmul, load_q8_0, Q8_BYTES)
DEFINE_MATMUL(q4_1_matmul, Q4_BYTES)
DEFINE_MATMUL(q8_0_matmul, Q8_BYTES)

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
#if defined(__AVX512F__)
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
    for (; j < count; j++) s[j] = exp_poly(s[j] - shift);
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
            float mx = -INFINITY;
            for (int j = 0; j < visible; j++) {
                if (m && !m[j]) { scores[j] = -INFINITY; continue; }
                const float *kv = K + (size_t)j * hd;
                float s16[16] = {0};
                for (int a = 0; a + 16 <= hd; a += 16)
                    for (int l = 0; l < 16; l++) s16[l] += qv[a + l] * kv[a + l];
                float sc = reduce16(s16) * scale;
                scores[j] = sc;
                if (sc > mx) mx = sc;
            }
            exp_shifted(scores, visible, mx);      /* masked keys: exp(-inf) = 0 */
            float sum = 0.0f;
            for (int j = 0; j < visible; j++) sum += scores[j];
            float *o = out + ((size_t)t * H + h) * hd;
            for (int a = 0; a < hd; a++) o[a] = 0.0f;
            for (int j = 0; j < visible; j++) {
                if (scores[j] == 0.0f) continue;
                const float p = scores[j], *vv = V + (size_t)j * hd;
                for (int a = 0; a < hd; a++) o[a] += p * vv[a];
            }
            const float inv = 1.0f / sum;
            for (int a = 0; a < hd; a++) o[a] *= inv;
            if (scores != scores_stack) free(scores);
        }
    }
}
