/* What the matrix-vector kernels (matvec.c) and the fused decode step (decode.c) share:
 * widening bf16/f16 to fp32, the int8 row product with activations quantised to int16 per
 * group of input columns, and the int4 row product with activations quantised to int8 per
 * block of 32. Everything here is static inline: each .c file gets its own. */
#ifndef MPITPI_COMMON_H
#define MPITPI_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>   /* aarch64: NEON paths below, checked under qemu-user (test_neon.py) */
#endif

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__) && defined(__FMA__)
    return _cvtsh_ss(h);
#elif defined(__ARM_NEON)   /* a native half type: loops of it vectorise to fcvtl */
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {                      /* zero or subnormal */
        float f = (float)m * (1.0f / 16777216.0f);
        return s ? -f : f;
    }
    u = e == 31 ? s | 0x7f800000u | (m << 13) : s | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* fp32 -> fp16 raw bits, rounded to nearest even (as torch's conversion); callers clamp to
 * fp16's largest finite value first (+-65504), so the software version below only meets
 * finite values, normal or subnormal in fp16. */
static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__) && defined(__FMA__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#elif defined(__ARM_NEON)
    __fp16 h = (__fp16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
#else
    uint32_t x, s;
    memcpy(&x, &f, 4);
    s = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x47800000u)              /* 65536 or more, inf, nan */
        return (uint16_t)(s | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (x < 0x38800000u) {             /* below 2^-14: fp16 subnormal, steps of 2^-24 */
        float a;
        memcpy(&a, &x, 4);
        return (uint16_t)(s | (uint32_t)lrintf(a * 16777216.0f));
    }
    x -= 0x38000000u;                  /* exponent bias 127 -> 15 */
    return (uint16_t)(s | ((x + 0xfffu + ((x >> 13) & 1u)) >> 13));
#endif
}

/* int8 with one fp32 scale per row and group of ``group`` input columns (a multiple of 32;
 * the last group of a row may be shorter): scale is (out, ceil(in / group)), see quant.py.
 * x is quantised per group to int16 (error 1/65534 of the group's largest |x|, far below
 * the weights' own) so that AVX2's vpmaddwd multiplies 16 pairs and adds them pairwise
 * into int32 in one instruction (with VNNI, vpdpwssd also accumulates); each group's int32
 * sum is then converted once and scaled by (weight scale x activation scale). The short
 * last group is done in fp32. */
static inline void quantize_x(const float *x, int64_t in, int64_t group, int16_t *xq, float *xs) {
    for (int64_t g0 = 0, g = 0; g0 < in; g0 += group, g++) {
        int64_t g1 = g0 + group < in ? g0 + group : in;
        float m = 0.f;
        for (int64_t i = g0; i < g1; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
        float s = m > 0.f ? m / 32767.f : 1.f, inv = 1.f / s;
        for (int64_t i = g0; i < g1; i++) xq[i] = (int16_t)lrintf(x[i] * inv);
        xs[g] = s;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)   /* multiply-add-accumulate in one */
#define DPWSSD(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#else
#define DPWSSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif
#if defined(__AVX512VNNI__)
#define DPWSSD512(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#else
#define DPWSSD512(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#endif

static inline float dot_i8_row(const int8_t *w, const int16_t *xq, const float *ws, const float *xs,
                        const float *x, int64_t in, int64_t group, int64_t full) {
    float sum = 0.f;
#if defined(__AVX512BW__) && defined(__AVX512F__)
    /* 32 weights per instruction: half the instructions of the AVX2 loop below */
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < full; g++) {
        const int8_t *wg = w + g * group;
        const int16_t *xg = xq + g * group;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0;
        for (int64_t i = 0; i < group; i += 64) {
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wg + i)));
            a0 = DPWSSD512(a0, w0, _mm512_loadu_si512((const void *)(xg + i)));
            if (i + 32 < group) {
                __m512i w1 = _mm512_cvtepi8_epi16(
                    _mm256_loadu_si256((const __m256i *)(wg + i + 32)));
                a1 = DPWSSD512(a1, w1, _mm512_loadu_si512((const void *)(xg + i + 32)));
            }
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)),
                              _mm512_set1_ps(ws[g] * xs[g]), acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < full; g++) {
        const int8_t *wg = w + g * group;
        const int16_t *xg = xq + g * group;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0;
        for (int64_t i = 0; i < group; i += 32) {
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + i)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + i + 16)));
            a0 = DPWSSD(a0, w0, _mm256_loadu_si256((const __m256i *)(xg + i)));
            a1 = DPWSSD(a1, w1, _mm256_loadu_si256((const __m256i *)(xg + i + 16)));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)),
                              _mm256_set1_ps(ws[g] * xs[g]), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_hadd_ps(h, h);
    sum = _mm_cvtss_f32(_mm_hadd_ps(h, h));
#elif defined(__ARM_NEON)
    /* 16 weights a step: widened to int16, multiplied by the int16 activations into int32 */
    for (int64_t g = 0; g < full; g++) {
        int32x4_t a0 = vdupq_n_s32(0), a1 = a0;
        for (int64_t i = g * group; i < (g + 1) * group; i += 16) {
            int8x16_t wv = vld1q_s8(w + i);
            int16x8_t lo = vmovl_s8(vget_low_s8(wv)), hi = vmovl_s8(vget_high_s8(wv));
            int16x8_t x0 = vld1q_s16(xq + i), x1 = vld1q_s16(xq + i + 8);
            a0 = vmlal_s16(a0, vget_low_s16(lo), vget_low_s16(x0));
            a1 = vmlal_s16(a1, vget_high_s16(lo), vget_high_s16(x0));
            a0 = vmlal_s16(a0, vget_low_s16(hi), vget_low_s16(x1));
            a1 = vmlal_s16(a1, vget_high_s16(hi), vget_high_s16(x1));
        }
        sum += (float)vaddvq_s32(vaddq_s32(a0, a1)) * ws[g] * xs[g];
    }
#else
    for (int64_t g = 0; g < full; g++) {
        int32_t a = 0;
        for (int64_t i = g * group; i < (g + 1) * group; i++) a += (int32_t)w[i] * xq[i];
        sum += (float)a * ws[g] * xs[g];
    }
#endif
    if (full * group < in) {
        float a = 0.f;
        for (int64_t i = full * group; i < in; i++) a += (float)w[i] * x[i];
        sum += a * ws[full];
    }
    return sum;
}

/* One int8 weight row against R input rows (R = 1 .. 4): each 32 weights are widened to int16
 * once for all R. Every row gets the same operations in the same order whatever R is (one
 * accumulator per row, one noinline finish), so a row's result does not depend on the rows
 * beside it. y[r * ys] receives row r's product. */
#if defined(__AVX512BW__) && defined(__AVX512F__)
static __attribute__((noinline)) float i8_finish(__m512 acc, const int8_t *w, const float *x,
                                                 const float *ws, int64_t in, int64_t group,
                                                 int64_t full) {
    float sum = _mm512_reduce_add_ps(acc);
    if (full * group < in) {
        float a = 0.f;
        for (int64_t i = full * group; i < in; i++) a += (float)w[i] * x[i];
        sum += a * ws[full];
    }
    return sum;
}

#define DOT_I8_ROWS(R)                                                                    \
static inline void dot_i8_rows##R(const int8_t *w, int16_t *const *xq, const float *ws,    \
                                  float *const *xs, const float *const *x, int64_t in,     \
                                  int64_t group, int64_t full, float *y, int64_t ys) {     \
    __m512 acc[R];                                                                        \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                             \
    for (int64_t g = 0; g < full; g++) {                                                  \
        const int8_t *wg = w + g * group;                                                 \
        __m512i a0[R], a1[R];                                                             \
        for (int r = 0; r < R; r++) { a0[r] = _mm512_setzero_si512(); a1[r] = a0[r]; }     \
        for (int64_t i = 0; i < group; i += 64) {                                         \
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wg + i))); \
            for (int r = 0; r < R; r++)                                                   \
                a0[r] = DPWSSD512(a0[r], w0,                                              \
                                  _mm512_loadu_si512((const void *)(xq[r] + g * group + i))); \
            if (i + 32 < group) {                                                         \
                __m512i w1 = _mm512_cvtepi8_epi16(                                        \
                    _mm256_loadu_si256((const __m256i *)(wg + i + 32)));                  \
                for (int r = 0; r < R; r++)                                               \
                    a1[r] = DPWSSD512(a1[r], w1, _mm512_loadu_si512(                      \
                        (const void *)(xq[r] + g * group + i + 32)));                     \
            }                                                                             \
        }                                                                                 \
        for (int r = 0; r < R; r++)                                                       \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[r], a1[r])),  \
                                     _mm512_set1_ps(ws[g] * xs[r][g]), acc[r]);           \
    }                                                                                     \
    for (int r = 0; r < R; r++)                                                           \
        y[r * ys] = i8_finish(acc[r], w, x[r], ws, in, group, full);                      \
}
#else
#define DOT_I8_ROWS(R)                                                                    \
static inline void dot_i8_rows##R(const int8_t *w, int16_t *const *xq, const float *ws,    \
                                  float *const *xs, const float *const *x, int64_t in,     \
                                  int64_t group, int64_t full, float *y, int64_t ys) {     \
    for (int r = 0; r < R; r++)                                                           \
        y[r * ys] = dot_i8_row(w, xq[r], ws, xs[r], x[r], in, group, full);               \
}
#endif
DOT_I8_ROWS(1)
DOT_I8_ROWS(2)
DOT_I8_ROWS(3)
DOT_I8_ROWS(4)

/* F##R(...) for a group of R = 1 .. 4 input rows: the dispatch of every row-group kernel
 * (dot_i8_rows, dot_i4_rows, dot_f32_rows, ...) */
#define ROWS_CALL(F, R, ...)                                                              \
    switch (R) {                                                                          \
    case 1: F##1(__VA_ARGS__); break;                                                     \
    case 2: F##2(__VA_ARGS__); break;                                                     \
    case 3: F##3(__VA_ARGS__); break;                                                     \
    default: F##4(__VA_ARGS__);                                                           \
    }
/* ... and for R = 1 .. 8 (the tiles) */
#define ROWS_CALL8(F, R, ...)                                                             \
    switch (R) {                                                                          \
    case 1: F##1(__VA_ARGS__); break;                                                     \
    case 2: F##2(__VA_ARGS__); break;                                                     \
    case 3: F##3(__VA_ARGS__); break;                                                     \
    case 4: F##4(__VA_ARGS__); break;                                                     \
    case 5: F##5(__VA_ARGS__); break;                                                     \
    case 6: F##6(__VA_ARGS__); break;                                                     \
    case 7: F##7(__VA_ARGS__); break;                                                     \
    default: F##8(__VA_ARGS__);                                                           \
    }

/* NAME: y[b * ys] = weight row w . x[b] for B input rows, G at a time (ROWS: dot_i8_rows, or
 * dot_i8_tile for a tile of rows, y[b * ys + k] for its row k; CALL: ROWS_CALL for G = 4,
 * ROWS_CALL8 for 8): xq, xs, x hold each row's quantised activations, scales and fp32 values
 * at strides sq, ss, sx. A row gets the same operations in any group. */
#define I8_BATCH(NAME, ROWS) I8_BATCH_G(NAME, ROWS, 4, ROWS_CALL)
#define I8_BATCH_G(NAME, ROWS, G, CALL)                                                   \
static inline void NAME(const int8_t *w, const float *ws, int16_t *xq, int64_t sq,        \
                        float *xs, int64_t ss, const float *x, int64_t sx, int64_t B,      \
                        int64_t in, int64_t group, int64_t full, float *y, int64_t ys) {   \
    for (int64_t b0 = 0; b0 < B; b0 += G) {                                               \
        int16_t *q[G];                                                                    \
        float *s[G];                                                                      \
        const float *xr[G];                                                               \
        int64_t R = B - b0 < G ? B - b0 : G;                                              \
        for (int64_t r = 0; r < R; r++) {                                                 \
            q[r] = xq + (b0 + r) * sq;                                                    \
            s[r] = xs + (b0 + r) * ss;                                                    \
            xr[r] = x + (b0 + r) * sx;                                                    \
        }                                                                                 \
        float *yo = y + b0 * ys;                                                          \
        CALL(ROWS, R, w, q, ws, s, xr, in, group, full, yo, ys)                           \
    }                                                                                     \
}
I8_BATCH(dot_i8_batch, dot_i8_rows)

#if defined(__F16C__) && defined(__FMA__)
#define HAVE_F16X8 1
/* gcc does not vectorise scalar F16C conversions: eight at a time by hand. */
static inline __m256 f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

#endif

/* int4 (quant.py): a row is nb blocks of 32 columns, 16 bytes each (byte j: column j in the
 * low nibble, j + 16 in the high one) with an fp16 scale d and offset m per block, so a
 * weight is n d + m for its 4-bit n in 0..15. x is quantised per block to int8 (x ~ xs[b] a,
 * |a| <= 127; the error, 1/254 of the block's largest |x|, measured in docs/BENCHMARKS.md),
 * and xsum[b] = xs[b] * (sum of the block's a). A block's share of the row product is then
 *     d xs[b] (sum over j of n_j a_j)  +  m xsum[b]
 * with the integer sum in one instruction on AVX2 (vpmaddubsw: unsigned n times signed a,
 * pairs added; with VNNI vpdpbusd also adds the quads). */
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && defined(__FMA__)
/* The AVX-512 loops (i4_step) take four blocks per register: the 64 bytes of blocks
 * b..b+3 give their low nibbles (each block's columns 0-15) in one register and their high
 * nibbles (columns 16-31) in another, each 16-byte lane one block. The activations are
 * stored to match, once per product instead of reordering the nibbles for every weight
 * row: in each group of four blocks (the last group may hold fewer, r), the blocks'
 * columns 0-15, then their columns 16-31. */
#define I4_GROUPED 1
static inline int64_t i4_slot(int64_t b, int64_t i, int64_t nb) {
    int64_t g = b / 4, r = nb - 4 * g < 4 ? nb - 4 * g : 4;
    return g * 128 + (i >= 16 ? r * 16 : 0) + (b % 4) * 16 + (i & 15);
}
#else
static inline int64_t i4_slot(int64_t b, int64_t i, int64_t nb) {
    (void)nb;
    return b * 32 + i;
}
#endif

/* x (nb blocks of 32) -> xq in i4_slot order, xs, xsum (above). Vector builds find the
 * largest |x| and round x / s in registers: the same numbers as the scalar loop (a maximum
 * does not depend on order; the conversion rounds to nearest-even, as lrintf does). */
static inline void quantize_x8(const float *x, int64_t nb, int8_t *xq, float *xs, float *xsum) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
#if defined(I4_GROUPED)
        __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
#elif defined(__AVX2__)
        const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 v[4], t;
        for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(xb + 8 * k);
        t = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], mag), _mm256_and_ps(v[1], mag)),
                          _mm256_max_ps(_mm256_and_ps(v[2], mag), _mm256_and_ps(v[3], mag)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#else
        float m = 0.f;
        for (int i = 0; i < 32; i++) m = fabsf(xb[i]) > m ? fabsf(xb[i]) : m;
#endif
        float s = m > 0.f ? m / 127.f : 1.f, inv = 1.f / s;
        int sum = 0;
#if defined(I4_GROUPED)   /* columns 0-15 and 16-31 each go to 16 consecutive slots */
        __m512i a0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        __m512i a1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(xq + i4_slot(b, 0, nb)), _mm512_cvtepi32_epi8(a0));
        _mm_storeu_si128((__m128i *)(xq + i4_slot(b, 16, nb)), _mm512_cvtepi32_epi8(a1));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
#elif defined(__AVX2__)   /* the block's 32 slots in column order; |a| <= 127 packs exactly */
        __m256i a[4];
        for (int k = 0; k < 4; k++) a[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(inv)));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a[0], a[1]),
                                       _mm256_packs_epi32(a[2], a[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + i4_slot(b, 0, nb)), p);
        __m256i t4 = _mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), _mm256_add_epi32(a[2], a[3]));
        __m128i t2 = _mm_add_epi32(_mm256_castsi256_si128(t4), _mm256_extracti128_si256(t4, 1));
        t2 = _mm_add_epi32(t2, _mm_shuffle_epi32(t2, 0x4e));
        sum = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 0xb1)));
#else
        for (int i = 0; i < 32; i++) {
            int v = (int)lrintf(xb[i] * inv);
            xq[i4_slot(b, i, nb)] = (int8_t)v;
            sum += v;
        }
#endif
        xs[b] = s;
        xsum[b] = s * (float)sum;
    }
}

/* One block's 32 weights n d + m in fp32, in column order; int6 (hb: the block's 8 bytes of
 * top bits, quant.py) with m = -32 d: n d - 32 d is (n - 32) d exactly (a 6-bit integer
 * times an fp16 scale needs 17 of fp32's 24 bits), as quant.dequantize_int6 computes it. */
static inline void dequant_i4_block(const uint8_t *q, const uint8_t *hb, float d, float m,
                                    float *w) {
    for (int j = 0; j < 16; j++) {
        int f = hb ? (hb[j & 7] >> (j & 8 ? 4 : 0)) & 15 : 0;   /* the byte's top bits */
        w[j] = (float)((q[j] & 15) | (f & 3) << 4) * d + m;
        w[j + 16] = (float)((q[j] >> 4) | (f >> 2) << 4) * d + m;
    }
}

static inline int32_t dot_i4_block(const uint8_t *q, const int8_t *a) {
    int32_t s = 0;
    for (int j = 0; j < 16; j++) s += (q[j] & 15) * a[j] + (q[j] >> 4) * a[j + 16];
    return s;
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(a, b) _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
#elif defined(__AVXVNNI__)
#define DPBUSD(a, b) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
#else
#define DPBUSD(a, b) _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
#endif
/* a0 . b0 + a1 . b1 per group of four bytes, as int32 (a unsigned 4-bit, b signed 8-bit:
 * without VNNI the int16 pair sums, at most 4 x 15 x 128, cannot saturate) */
#if defined(__AVX512VNNI__)
#define DPBUSD512X2(a0, b0, a1, b1) \
    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), a0, b0), a1, b1)
#else
#define DPBUSD512X2(a0, b0, a1, b1)                                                     \
    _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(a0, b0),                    \
                                       _mm512_maddubs_epi16(a1, b1)), _mm512_set1_epi16(1))
#endif

#if defined(__AVX2__) && defined(HAVE_F16X8)
/* Blocks [b, nb) one at a time in 256-bit registers: the blocks after the last group of
 * eight (a 576-column row is 18 blocks: 2 of them here, not in scalar code). */
static inline float dot_i4_tail(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                                const int8_t *xq, const float *xs, const float *xsum,
                                int64_t b, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    float off = 0.f;
    for (; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(q + b * 16));
        __m256i n = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                                     _mm256_set1_epi8(15));
        __m256i p = DPBUSD(n, _mm256_loadu_si256((const __m256i *)(xq + b * 32)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(f16_to_f32(d[b]) * xs[b]),
                              acc);
        off += f16_to_f32(m[b]) * xsum[b];
    }
    return hsum(acc) + off;
}
#endif

#if defined(I4_GROUPED) && defined(HAVE_F16X8)
/* Up to eight blocks [b, b + n) of one weight row, unpacked once for every input row: the
 * low / high nibbles of blocks b..b+3 (l0, h0) and b+4..b+7 (l1, h1), and the blocks'
 * scales and offsets in fp32; lanes of blocks past n are zero (masked loads: nothing past
 * the row is read). */
typedef struct {
    __m512i l0, h0, l1, h1;
    __m256 d, m;
} i4_step_t;

static inline __mmask64 i4_bytes(int blocks) {   /* the first 16 x blocks bytes, blocks <= 4 */
    return blocks >= 4 ? ~(__mmask64)0 : ((__mmask64)1 << (16 * blocks)) - 1;
}

static inline i4_step_t i4_unpack(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                                  int64_t b, int n) {
    const __m512i low = _mm512_set1_epi8(15);
    __m512i r0, r1;
    i4_step_t w;
    if (n == 8) {
        r0 = _mm512_loadu_si512((const void *)(q + b * 16));
        r1 = _mm512_loadu_si512((const void *)(q + b * 16 + 64));
        w.d = f16x8(d + b);
        w.m = f16x8(m + b);
    } else {
        int n0 = n < 4 ? n : 4;
        r0 = _mm512_maskz_loadu_epi8(i4_bytes(n0), q + b * 16);
        r1 = n > 4 ? _mm512_maskz_loadu_epi8(i4_bytes(n - n0), q + b * 16 + 64)
                   : _mm512_setzero_si512();
        __mmask8 k = (__mmask8)((1u << n) - 1);
        w.d = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(k, d + b));
        w.m = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(k, m + b));
    }
    w.l0 = _mm512_and_si512(r0, low);
    w.h0 = _mm512_and_si512(_mm512_srli_epi16(r0, 4), low);
    w.l1 = w.h1 = r1;   /* zero, and unused by i4_step, when n <= 4 */
    if (n > 4) {
        w.l1 = _mm512_and_si512(r1, low);
        w.h1 = _mm512_and_si512(_mm512_srli_epi16(r1, 4), low);
    }
    return w;
}

/* One input row's share of those blocks: block k's int32 sums lie in lane k of p0 (blocks
 * 0-3) or p1 (4-7) and take the block's scale d xs from one vector of the eight; the
 * offsets' m xsum add up in macc. */
static inline void i4_step(const i4_step_t *w, const int8_t *xq, const float *xs,
                           const float *xsum, int64_t b, int n, __m512 *acc0, __m512 *acc1,
                           __m256 *macc) {
    const __m512i pick0 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i pick1 = _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4);
    const int8_t *x = xq + b * 32;
    __m512i x0l, x0h, x1l, x1h;
    __m256 sv, sumv;
    if (n == 8) {
        x0l = _mm512_loadu_si512((const void *)x);
        x0h = _mm512_loadu_si512((const void *)(x + 64));
        x1l = _mm512_loadu_si512((const void *)(x + 128));
        x1h = _mm512_loadu_si512((const void *)(x + 192));
        sv = _mm256_loadu_ps(xs + b);
        sumv = _mm256_loadu_ps(xsum + b);
    } else {   /* the last group holds n0 (or n1) blocks: low halves, then high (i4_slot) */
        int n0 = n < 4 ? n : 4, n1 = n - n0;
        x0l = _mm512_maskz_loadu_epi8(i4_bytes(n0), x);
        x0h = _mm512_maskz_loadu_epi8(i4_bytes(n0), x + 16 * n0);
        x1l = x1h = _mm512_setzero_si512();
        if (n1 > 0) {
            x1l = _mm512_maskz_loadu_epi8(i4_bytes(n1), x + 128);
            x1h = _mm512_maskz_loadu_epi8(i4_bytes(n1), x + 128 + 16 * n1);
        }
        __mmask8 k = (__mmask8)((1u << n) - 1);
        sv = _mm256_maskz_loadu_ps(k, xs + b);
        sumv = _mm256_maskz_loadu_ps(k, xsum + b);
    }
    __m512 s = _mm512_zextps256_ps512(_mm256_mul_ps(w->d, sv));
    *macc = _mm256_fmadd_ps(w->m, sumv, *macc);
    __m512i p0 = DPBUSD512X2(w->l0, x0l, w->h0, x0h);
    *acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_permutexvar_ps(pick0, s), *acc0);
    if (n > 4) {   /* a row's last step of 1-4 blocks leaves acc1 as it is (its lanes: 0) */
        __m512i p1 = DPBUSD512X2(w->l1, x1l, w->h1, x1h);
        *acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_permutexvar_ps(pick1, s), *acc1);
    }
}

/* A row's total, out of line: the same operations for a row whatever the rows beside it */
static __attribute__((noinline)) float i4_sum(__m512 acc0, __m512 acc1, __m256 macc) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1),
                                              _mm512_zextps256_ps512(macc)));
}
#endif

/* One weight row against R input rows (R = 1 .. 4: the decode rows of a batch): each step of
 * blocks is unpacked once for all R. Every row gets the same operations in the same order
 * whatever R is (one accumulator per row, one noinline finish), so a row's result does not
 * depend on the rows beside it, and equals dot_i4_row's. */
#if defined(I4_GROUPED) && defined(HAVE_F16X8)
#define DOT_I4_ROWS(R)                                                                    \
static inline void dot_i4_rows##R(const uint8_t *q, const uint16_t *d, const uint16_t *m,  \
                                  int8_t *const *xq, float *const *xs,                     \
                                  float *const *xsum, int64_t nb, float *y, int64_t ys,   \
                                  const uint8_t *h, const float *rs) {                    \
    __m512 acc0[R], acc1[R];                                                              \
    __m256 macc[R];                                                                       \
    for (int r = 0; r < R; r++) {                                                         \
        acc0[r] = acc1[r] = _mm512_setzero_ps();                                          \
        macc[r] = _mm256_setzero_ps();                                                    \
    }                                                                                     \
    int64_t b = 0;                                                                        \
    for (; b + 8 <= nb; b += 8) {                                                         \
        i4_step_t w = i4_unpack(q, d, m, b, 8);                                           \
        for (int r = 0; r < R; r++)                                                       \
            i4_step(&w, xq[r], xs[r], xsum[r], b, 8, &acc0[r], &acc1[r], &macc[r]);       \
    }                                                                                     \
    if (b < nb) {                                                                         \
        i4_step_t w = i4_unpack(q, d, m, b, (int)(nb - b));                               \
        for (int r = 0; r < R; r++)                                                       \
            i4_step(&w, xq[r], xs[r], xsum[r], b, (int)(nb - b), &acc0[r], &acc1[r],      \
                    &macc[r]);                                                            \
    }                                                                                     \
    for (int r = 0; r < R; r++)                                                           \
        y[r * ys] = i4_sum(acc0[r], acc1[r], macc[r]);                                    \
    (void)h, (void)rs;                                                                       \
}
DOT_I4_ROWS(1)
#endif

static inline float dot_i4_row(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                               const int8_t *xq, const float *xs, const float *xsum,
                               int64_t nb) {
#if defined(I4_GROUPED) && defined(HAVE_F16X8)
    int8_t *x[1] = {(int8_t *)xq};
    float *s[1] = {(float *)xs}, *t[1] = {(float *)xsum}, y;
    dot_i4_rows1(q, d, m, x, s, t, nb, &y, 0, NULL, NULL);
    return y;
#else
    float sum = 0.f;
    int64_t b = 0;
#if defined(__AVX2__) && defined(HAVE_F16X8)
    const __m256i low = _mm256_set1_epi8(15);
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8) {   /* eight blocks share one load of their scales */
        float s[8];
        _mm256_storeu_ps(s, _mm256_mul_ps(f16x8(d + b), _mm256_loadu_ps(xs + b)));
        macc = _mm256_fmadd_ps(f16x8(m + b), _mm256_loadu_ps(xsum + b), macc);
        for (int k = 0; k < 8; k++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(q + (b + k) * 16));
            __m256i n = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
            __m256i p = DPBUSD(n, _mm256_loadu_si256((const __m256i *)(xq + (b + k) * 32)));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s[k]), acc);
        }
    }
    sum = hsum(acc) + hsum(macc) + dot_i4_tail(q, d, m, xq, xs, xsum, b, nb);
    b = nb;
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
    /* a block: its 16 bytes -> low and high nibbles (columns 0-15, 16-31), each a signed
     * 8-bit dot product with the activations (sdot: 4 products added per lane) */
    const uint8x16_t low = vdupq_n_u8(15);
    for (; b < nb; b++) {
        uint8x16_t raw = vld1q_u8(q + b * 16);
        int8x16_t n0 = vreinterpretq_s8_u8(vandq_u8(raw, low));
        int8x16_t n1 = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
        int32x4_t p = vdotq_s32(vdupq_n_s32(0), n0, vld1q_s8(xq + b * 32));
        p = vdotq_s32(p, n1, vld1q_s8(xq + b * 32 + 16));
        sum += f16_to_f32(d[b]) * xs[b] * (float)vaddvq_s32(p) + f16_to_f32(m[b]) * xsum[b];
    }
#endif
    for (; b < nb; b++)
        sum += f16_to_f32(d[b]) * xs[b] * (float)dot_i4_block(q + b * 16, xq + b * 32) +
               f16_to_f32(m[b]) * xsum[b];
    return sum;
#endif
}

#if !(defined(I4_GROUPED) && defined(HAVE_F16X8))
#define DOT_I4_ROWS(R)                                                                    \
static inline void dot_i4_rows##R(const uint8_t *q, const uint16_t *d, const uint16_t *m,  \
                                  int8_t *const *xq, float *const *xs,                     \
                                  float *const *xsum, int64_t nb, float *y, int64_t ys,   \
                                  const uint8_t *h, const float *rs) {                    \
    for (int r = 0; r < R; r++)                                                           \
        y[r * ys] = dot_i4_row(q, d, m, xq[r], xs[r], xsum[r], nb);                       \
    (void)h, (void)rs;                                                                       \
}
DOT_I4_ROWS(1)
#endif
DOT_I4_ROWS(2)
DOT_I4_ROWS(3)
DOT_I4_ROWS(4)

/* While weight row o (rb bytes) is multiplied, the int4 loops (always) and the float loops
 * (with two or more rows of x) ask for rb bytes further on, into L2: int4 4 KB past row o's
 * start for rows under 4 KB and 2 KB for longer ones, float 4 rows on. Measured on one AMD
 * EPYC, 1 thread, 200-300 MB out of cache, ms: int4 one row of x, 2048 columns 17.4 ->
 * 14.6, 8192 columns 16.2 -> 14.7; fp32 576 columns, 4 rows of x 27.6 -> 17.7 (without it
 * memory and arithmetic took turns). Where it did not pay it is left out: int8 rows (2048
 * columns 20.5 -> 21.5-25.8) and a single row of float weights (fp32 2048 columns 14.1 ->
 * 16.8 four rows on, 15.1 2 KB on). A prefetch never faults. */
static inline void prefetch_ahead(const void *w, int64_t o, int64_t rb, int64_t rows,
                                  int64_t ahead) {
    int64_t at = o * rb + ahead;
    if (at + rb <= rows * rb)
        for (int64_t c = 0; c < rb; c += 64) __builtin_prefetch((const char *)w + at + c, 0, 2);
}
/* That policy, for the row of int4 bytes o, and for the row of float weights o against B
 * rows of x */
static inline void prefetch_i4(const void *q, int64_t o, int64_t rb, int64_t rows) {
    prefetch_ahead(q, o, rb, rows, rb < 4096 ? 4096 : 2048);
}
static inline void prefetch_float(const void *w, int64_t o, int64_t rb, int64_t rows,
                                  int64_t B) {
    if (B > 1)
        prefetch_ahead(w, o, rb, rows, 4 * rb);
}

/* NAME: one int4 weight row against B input rows (row b's int8 activations at xq + b * sxq,
 * scales and scaled sums at xs, xsum + b * sxs), groups of up to four sharing each
 * unpacked step: y[b * ys] = the row's product with row b, as dot_i4_row gives it (ROWS:
 * dot_i4_rows; dot_i4_tile for a tile of rows, y[b * ys + k] for its row k). */
#define I4_BATCH(NAME, ROWS, XT) I4_BATCH_G(NAME, ROWS, XT, 4, ROWS_CALL)
#define I4_BATCH_G(NAME, ROWS, XT, G, CALL)                                               \
static inline void NAME(const uint8_t *q, const uint16_t *d, const uint16_t *m, XT *xq,   \
                        int64_t sxq, float *xs, float *xsum, int64_t sxs, int64_t B,       \
                        int64_t nb, float *y, int64_t ys, const uint8_t *h, const float *rs) { \
    for (int64_t b0 = 0; b0 < B; b0 += G) {                                               \
        XT *xr[G];                                                                        \
        float *sr[G], *tr[G];                                                             \
        int64_t R = B - b0 < G ? B - b0 : G;                                              \
        for (int64_t r = 0; r < R; r++) {                                                 \
            xr[r] = xq + (b0 + r) * sxq;                                                  \
            sr[r] = xs + (b0 + r) * sxs;                                                  \
            tr[r] = xsum + (b0 + r) * sxs;                                                \
        }                                                                                 \
        float *yo = y + b0 * ys;                                                          \
        CALL(ROWS, R, q, d, m, xr, sr, tr, nb, yo, ys, h, rs)                                 \
    }                                                                                     \
}
I4_BATCH(dot_i4_batch, dot_i4_rows, int8_t)

/* int4 against int16 activations (prompt rows, the int4 vocabulary's logits): x is quantised
 * per block of 32 to int16 (quantize_x16: error 1/65534 of the block's largest |x|, where
 * decode's int8 has 1/254), and a block's share is d xs[b] (sum of n_j a_j) + m xsum[b] as
 * above. The integer sums are exact (|sum| <= 15 x 32767 x 32 < 2^24, so their conversion to
 * fp32 is exact too) and every row's float steps are the same two fused multiply-adds per
 * block in block order, in the tiles' lanes as in dot_i4w_row: a row gets the same numbers
 * whatever rows lie beside it, in a tile or not, on every build with FMA.
 * The activations are stored in pair order, to match the tiles' unpacking (DOT_I4W_TILE):
 * int32 word 4t + k of a block holds the int16 pair of columns (4t, 4t + 2), (4t + 1,
 * 4t + 3), (16 + 4t, 18 + 4t), (17 + 4t, 19 + 4t) for k = 0 .. 3. */
static inline int i4w_slot(int c) {
    int h = c >= 16, t = (c & 15) >> 2, k = c & 3;
    return 2 * (4 * t + 2 * h + (k & 1)) + (k >> 1);
}

static inline void quantize_x16(const float *x, int64_t nb, int16_t *xq, float *xs,
                                float *xsum) {
    for (int64_t b = 0; b < nb; b++) {
        int16_t a[32];   /* rounded as int8 weights' activations are (quantize_x), in pair order */
        quantize_x(x + b * 32, 32, 32, a, xs + b);
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            xq[b * 32 + i4w_slot(i)] = a[i];
            sum += a[i];
        }
        xsum[b] = xs[b] * (float)sum;
    }
}

/* h: NULL for int4; for int6 (quant.py) the top-bit plane, with m = d and xsum scaled by
 * -32 by the caller (matvec_i4), so that the offset term is d (-32 xs sum a). */
static inline float dot_i4w_row(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                                const int16_t *xq, const float *xs, const float *xsum,
                                int64_t nb, const uint8_t *h) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = q + b * 16, *hb = h ? h + b * 8 : NULL;
        const int16_t *a = xq + b * 32;
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
            int f = hb ? (hb[j & 7] >> (j & 8 ? 4 : 0)) & 15 : 0;   /* the byte's top bits */
            s += ((qb[j] & 15) | (f & 3) << 4) * a[i4w_slot(j)] +
                 ((qb[j] >> 4) | (f >> 2) << 4) * a[i4w_slot(j + 16)];
        }
        acc = fmaf((float)s, f16_to_f32(d[b]) * xs[b], acc);
        acc = fmaf(f16_to_f32(m[b]), xsum[b], acc);
    }
    return acc;
}
#define DOT_I4W_ROWS(R)                                                                   \
static inline void dot_i4w_rows##R(const uint8_t *q, const uint16_t *d, const uint16_t *m, \
                                   int16_t *const *xq, float *const *xs,                   \
                                   float *const *xsum, int64_t nb, float *y, int64_t ys,  \
                                   const uint8_t *h, const float *rs) {                   \
    for (int r = 0; r < R; r++)                                                           \
        y[r * ys] = dot_i4w_row(q, d, m, xq[r], xs[r], xsum[r], nb, h);                   \
    (void)rs;                                                                             \
}
DOT_I4W_ROWS(1)
DOT_I4W_ROWS(2)
DOT_I4W_ROWS(3)
DOT_I4W_ROWS(4)
I4_BATCH(dot_i4w_batch, dot_i4w_rows, int16_t)

/* Tiles. Where the build has them, the full groups of TILE weight rows of an int4 or int8
 * matrix are stored interleaved (tile_i4 / tile_i8 in matvec.c, run on the layers' and the
 * vocabulary's matrices as they are read), so that one vector register holds a few columns
 * of each of the group's rows, one row per 32-bit lane. A multiply-add against activation
 * bytes broadcast to every lane then adds their products into each row's own lane: no
 * horizontal sum per row, the rows' scales are one vector, their results are stored at
 * once, and one unpacked block serves up to eight input rows (8 decode rows of SmolLM2 on 2
 * ranks against four: AVX-512 7.3-7.7 -> 6.4-6.6 ms, the MLP halves 25% faster; AVX2
 * 9.9-10.0 -> 9.3-9.4 ms; sixteen spilled registers and was slower). A row's integer sums are
 * exact, so only the order of float additions differs from the plain-row kernels.
 * TILE is 16 on AVX-512 builds (512-bit registers), 8 on AVX2 builds, 0 elsewhere.
 *
 * int4, group g (rows TILE g ..), block b: 16 TILE bytes, chunk t (0..3) of 4 TILE bytes
 * holding bytes 4t..4t+3 of each row's 16-byte block (row k at 4 k: the low nibbles are its
 * columns 4t..4t+3, the high ones 16+4t..16+4t+3); scales and offsets: the group's fp16
 * values of block b, TILE in a row. In-cache throughput (C harness, 1 thread, AMD EPYC with
 * VNNI, docs/BENCHMARKS.md): 576 x 1536 with 1 row of x 32 -> 112 G weights/s, with 8 rows
 * 56 -> 165.
 * int8 (only widths that are a whole number of column groups of at most I8_TILE_GROUP, so a
 * group's int32 sums cannot overflow and no fp32 tail remains), column pair p (columns 2p,
 * 2p + 1): 2 TILE bytes, row k's two at 2k, widened to int16 in one register and multiplied
 * against the activations' pair; scales: the group's fp32 scales of column group j, TILE in
 * a row. The same multiply count as plain rows, but one widening per TILE rows and no
 * horizontal sums: the 8 decode rows of SmolLM2's int8 vocabulary slice (24576 x 576) 5.1 ->
 * 2.0 ms in a C harness.
 * Rows past the last full group keep the row layout. */

/* Tiles read their bytes in order, but the kernels compute between loads, so the hardware
 * prefetcher alone keeps too few lines in flight: every block asks for the line PF_BYTES
 * ahead of it in the weight stream, and the same number of blocks ahead in the streams of
 * scales (and int6's top bits) beside it. 300 MB of coded int4 tiles, 2048 / 8192 columns,
 * C harness, AMD EPYC with VNNI: 2 threads 53-60 / 43-48 -> 72-82 / 70-82 GB/s (a plain read
 * 77-85), 1 thread 28 / 23 -> 41 / 40 (docs/BENCHMARKS.md). The lines are asked for as
 * non-temporal (PF_LOC 0, prefetchnta): a weight is read once a pass, so it need not push
 * other lines out of L2 and L3. Same harness, 600 MB, 2 threads, 30 rounds against a plain
 * read of the same bytes in the same round (AMD EPYC, avx512 vnni bf16): int4 0.94 -> 1.02,
 * int6 0.98 -> 1.04 of it (hints 1 and 2 read as 3); the 1B shape's int4 decode 0.96 of the
 * time. Scales are asked for once a 64-byte line, int6's top bits every line (one in two
 * before): int6 1.04 -> 1.06, int4 in L2 3.4 -> 3.9 times the read. PF_BYTES and PF_LOC
 * are settable at build time (a CC wrapper passing -DPF_BYTES=N) to compare on a host. */
#ifndef PF_BYTES
#define PF_BYTES 8192
#endif
#ifndef PF_LOC
#define PF_LOC 0
#endif
/* Which tiles ask for lines ahead, a bit each: 1 int4, 2 int6, 4 int8 (matvec.c; all by
 * default). Set between passes (kernels.set_prefetch, lookahead.py), never during one: it
 * changes how soon bytes arrive, not one number. Whether asking pays moves with the moment
 * on a shared host. 1B int4 decode, AMD EPYC with VNNI, memory slow (torch sum 30-57 GB/s):
 * the int4 and int6 tiles without it 0.95-0.97x the time, int8 1.05-1.34x; in earlier
 * sessions' fast moments (80-90 GB/s) the int4 tiles needed it (53-60 -> 72-82 GB/s). */
extern int mpitpi_prefetch;
/* How many streams a thread reads an int4 product's decode row from (2: its stretch's two
 * halves side by side, decode.c's product_rows, or the matrix's, matvec.c's matvec_i4; 1: in
 * order). matvec.c; 2 by default. Set between products (kernels.set_streams), never during
 * one: it changes no number. */
extern int mpitpi_streams;
/* dot_i4_tile_pair (the AVX-512 and AVX2 tile builds) over its body: both groups coded
 * (rs[0], rs[1] set) or both fp16; a copy of the loop for each, with and without requests
 * for lines ahead (mpitpi_prefetch read once a call: read at every line, as a global the
 * loop might change, it cost the AVX-512 loop a fifth of its speed in L2) */
#define I4_TILE_PAIR_CALL                                                                 \
static inline void dot_i4_tile_pair(const uint8_t *const *q, const uint16_t *const *d,     \
                                    const uint16_t *const *m, const float *const *rs,     \
                                    const int8_t *xq, const float *xs, const float *xsum, \
                                    int64_t nb, float *const *y) {                        \
    int ask = mpitpi_prefetch & 1;                                                        \
    if (rs[0] && ask)                                                                     \
        dot_i4_tile_pair_body(q, d, m, rs, xq, xs, xsum, nb, y, 1, 1);                   \
    else if (rs[0])                                                                       \
        dot_i4_tile_pair_body(q, d, m, rs, xq, xs, xsum, nb, y, 1, 0);                   \
    else if (ask)                                                                         \
        dot_i4_tile_pair_body(q, d, m, rs, xq, xs, xsum, nb, y, 0, 1);                   \
    else                                                                                  \
        dot_i4_tile_pair_body(q, d, m, rs, xq, xs, xsum, nb, y, 0, 0);                   \
}
#define PF_AT(p, ahead) __builtin_prefetch((const char *)(p) + (ahead), 0, PF_LOC)
/* int4 tiles, block b at qb (16 TILE bytes): the scales' 2 TILE bytes a block (coded:
 * d alone; fp16: d and m), int6's 8 TILE bytes of top bits. int6 asks twice as many blocks
 * ahead (its three streams: 600 MB, 2 threads, against a plain read in the same round,
 * 100 rounds: 1.06 -> 1.13 of it while memory was slow, 1.01 -> 1.06 while fast; int4 at
 * that distance 1.03 -> 1.01 slow, 0.89 -> 0.94 fast: kept at PF_BYTES). */
/* block b's scales (and fp16 offsets), asked for once per 64-byte line, ``ahead`` bytes on */
#define I4_SCALES_AHEAD(d, m, rs, b, ahead)                                               \
    do {                                                                                  \
        if ((b) * 2 * TILE % 64 == 0) {                                                   \
            PF_AT((const uint8_t *)(d) + (b) * 2 * TILE, ahead);                          \
            if (!(rs)) PF_AT((const uint8_t *)(m) + (b) * 2 * TILE, ahead);               \
        }                                                                                 \
    } while (0)
#define I4_TILE_PREFETCH(qb, d, m, rs, h, b)                                              \
    do {                                                                                  \
        const int64_t a_ = (h) ? 2 * PF_BYTES : PF_BYTES;   /* weight bytes ahead */      \
        if (!(mpitpi_prefetch & ((h) ? 2 : 1))) break;                                    \
        for (int k_ = 0; k_ < 16 * TILE; k_ += 64) PF_AT((qb) + k_, a_);                  \
        I4_SCALES_AHEAD(d, m, rs, b, a_ / 8);                                             \
        for (int k_ = 0; (h) && k_ < 8 * TILE; k_ += 64)                                  \
            PF_AT((h) + (b) * 8 * TILE + k_, a_ / 2);                                     \
    } while (0)
/* The AVX-512 int4 decode tile (DOT_I4_TILE) asks for its weight lines one at a time, each
 * as it loads the chunk PF_BYTES behind it, not a block's four at once, and for the scales
 * as above. 1B int4 decode in one process (AMD EPYC with VNNI, memory slow to middling, 16
 * rounds each): 0.95-0.97x the time of the four at once (two runs); against no requests
 * 0.98-1.03x (lookahead.py chooses). */
#define I4_TILE_PREFETCH_SCALES(d, m, rs, b)                                              \
    do {                                                                                  \
        if (mpitpi_prefetch & 1) I4_SCALES_AHEAD(d, m, rs, b, PF_BYTES / 8);              \
    } while (0)
#define I4_TILE_PREFETCH_LINE(qb, t)                                                      \
    do {                                                                                  \
        if (mpitpi_prefetch & 1) PF_AT((qb) + 64 * (t), PF_BYTES);                        \
    } while (0)
/* int8 tiles: pair p's 2 TILE bytes at w (asked for once per 64-byte line); column group j's
 * TILE fp32 scales at ws, a group of ``group`` columns being group TILE bytes of weights */
#define I8_TILE_PREFETCH_W(w, p)                                                          \
    do {                                                                                  \
        if ((mpitpi_prefetch & 4) && (p) * 2 * TILE % 64 == 0)                            \
            PF_AT((w) + (p) * 2 * TILE, PF_BYTES);                                        \
    } while (0)
#define I8_TILE_PREFETCH_S(ws, j, group)                                                  \
    do {                                                                                  \
        if (mpitpi_prefetch & 4) PF_AT((ws) + (j) * TILE, PF_BYTES * 4 / (group));        \
    } while (0)

#if defined(I4_GROUPED) && defined(HAVE_F16X8)
#define TILE 16
/* The group's scales and offsets of block b in fp32, one row per lane: fp16 values, or in a
 * coded tile (rs: tile_i4) a byte per row and value, 16 unsigned scale codes then 16 signed
 * offset codes, times the rows' steps rs[0..15] and rs[16..31]. Code times step is exact in
 * fp32 and equals the fp16 value it stands for (quant.py), so both give the same numbers. */
#define I4_DM512(d, m, rs, b, dv, mv)                                                     \
    do {                                                                                  \
        if (rs) {                                                                         \
            const __m128i *c_ = (const __m128i *)((const uint8_t *)(d) + (b) * 32);       \
            __m512i dc_ = _mm512_cvtepu8_epi32(_mm_loadu_si128(c_));                      \
            __m512i mc_ = _mm512_cvtepi8_epi32(_mm_loadu_si128(c_ + 1));                  \
            dv = _mm512_mul_ps(_mm512_cvtepi32_ps(dc_), _mm512_loadu_ps(rs));             \
            mv = _mm512_mul_ps(_mm512_cvtepi32_ps(mc_), _mm512_loadu_ps((rs) + 16));      \
        } else {                                                                          \
            dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((d) + (b) * 16)));  \
            mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((m) + (b) * 16)));  \
        }                                                                                 \
        /* opaque from here: a loop specialised for one kind of scales (dot_i4_tile) may  \
         * not fold the step into the products that follow (-ffast-math would reassociate \
         * code x step x xs), so both kinds give the same numbers */                     \
        __asm__("" : "+v"(dv), "+v"(mv));                                                 \
    } while (0)
#define X4(x, c) _mm512_set1_epi32(*(const int32_t *)((x) + 4 * (c)))   /* 4 bytes, each lane */
#if defined(__AVX512VNNI__)
#define DP512(acc, a, b) _mm512_dpbusd_epi32(acc, a, b)
/* DP512 against 4 activation bytes at x, broadcast to every lane by vpdpbusd's own memory
 * operand ({1to16}). Compilers load them with a vpbroadcastd apiece instead, and the loads
 * bounded the tile loop as much as the arithmetic (C harness, 1 MB in L2, AMD EPYC with VNNI,
 * 1 thread: with the two changes in DOT_I4_TILE, 55 -> 69 GB/s, docs/BENCHMARKS.md). */
static inline __m512i dp512_x4(__m512i acc, __m512i w, const int8_t *x) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)x));
    return acc;
}
/* The high nibbles of a chunk v stay in place (v & 0xf0: 16 times their value, an unsigned
 * byte vpdpbusd takes as it is): one instruction, not a shift and a mask. Their products
 * are then sums of multiples of 16 (at most 4 x 4 x 240 x 128 in a lane: no overflow), so
 * shifting the sum right by 4 gives exactly the sum of the nibbles' products. C harness,
 * data in L2, 2 threads, AMD EPYC: 158-178 -> 175-180 GB/s on a quiet host, 88-150 ->
 * 92-190 while another tenant took arithmetic (docs/BENCHMARKS.md). */
#define I4_HIGH(v, low) _mm512_and_si512(v, _mm512_set1_epi8((char)0xf0))
/* A block's eight column quads for one input row: the int32 sums of each row's lane */
#define I4_TILE_SUMS(w, xl, xh)                                                           \
    ({ __m512i p0 = dp512_x4(_mm512_setzero_si512(), w[0], xl);                           \
       __m512i p1 = dp512_x4(_mm512_setzero_si512(), w[4], xh);                           \
       p0 = dp512_x4(p0, w[1], (xl) + 4); p1 = dp512_x4(p1, w[5], (xh) + 4);              \
       p0 = dp512_x4(p0, w[2], (xl) + 8); p1 = dp512_x4(p1, w[6], (xh) + 8);              \
       p0 = dp512_x4(p0, w[3], (xl) + 12); p1 = dp512_x4(p1, w[7], (xh) + 12);            \
       _mm512_add_epi32(p0, _mm512_srai_epi32(p1, 4)); })
#else   /* without VNNI: the eight vpmaddubsw summed in int16 (at most 8 x 2 x 15 x 127 =
         * 30480, no saturation), widened once by vpmaddwd (as the AVX2 tile); high nibbles
         * kept in place would saturate those sums, so they are shifted down */
#define I4_HIGH(v, low) _mm512_and_si512(_mm512_srli_epi16(v, 4), low)
#define I4_TILE_SUMS(w, xl, xh)                                                           \
    ({ __m512i s0 = _mm512_add_epi16(_mm512_maddubs_epi16(w[0], X4(xl, 0)),                \
                                     _mm512_maddubs_epi16(w[1], X4(xl, 1)));               \
       __m512i s1 = _mm512_add_epi16(_mm512_maddubs_epi16(w[2], X4(xl, 2)),                \
                                     _mm512_maddubs_epi16(w[3], X4(xl, 3)));               \
       __m512i s2 = _mm512_add_epi16(_mm512_maddubs_epi16(w[4], X4(xh, 0)),                \
                                     _mm512_maddubs_epi16(w[5], X4(xh, 1)));               \
       __m512i s3 = _mm512_add_epi16(_mm512_maddubs_epi16(w[6], X4(xh, 2)),                \
                                     _mm512_maddubs_epi16(w[7], X4(xh, 3)));               \
       _mm512_madd_epi16(_mm512_add_epi16(_mm512_add_epi16(s0, s1), _mm512_add_epi16(s2, s3)), \
                         _mm512_set1_epi16(1)); })
#endif

/* One group of 16 weight rows (q, d, m at the group's start) against R input rows (R = 1 ..
 * 8; xq in i4_slot order, quantize_x8): y[r * ys + k] = row k's product with input row r.
 * Input row r gets the same operations whatever R is. The blocks are walked by i4_slot's
 * groups of four (a block's activation offsets are then a pointer step, not i4_slot's
 * arithmetic per block), and coded and fp16 scales each get their own copy of the loop
 * (dot_i4_tile calls the body with rs known non-NULL, or NULL): about 25 scalar
 * instructions fewer per 256-byte block.
 * Each 64-byte chunk is loaded once (I4_IN_REG): left alone, the compiler folds the load
 * into both of its masks and reads it twice. A coded block's scale codes multiply its integer
 * sums in integer (|sum| <= 32 x 15 x 127 = 60960, times a code <= 255 stays below 2^24: the
 * product and its conversion to fp32 are exact), its offset codes go to an accumulator of
 * their own, and the rows' steps multiply both once, after the last block: three vector
 * operations a block fewer than scaling every block's codes by the steps. A coded row's
 * numbers then differ from an fp16 tile's by float rounding alone (the same integer sums,
 * other float steps). */
#define I4_IN_REG(v) __asm__("" : "+v"(v))
#define DOT_I4_TILE(R)                                                                    \
static inline __attribute__((always_inline)) void dot_i4_tile##R##_body(                   \
        const uint8_t *q, const uint16_t *d, const uint16_t *m, int8_t *const *xq,         \
        float *const *xs, float *const *xsum, int64_t nb, float *y, int64_t ys,           \
        const uint8_t *h, const float *rs) {                                              \
    const __m512i low = _mm512_set1_epi8(15);                                             \
    __m512 acc[R], macc[R];   /* coded: the scales' and the offsets' terms, in codes */   \
    for (int r = 0; r < R; r++) acc[r] = macc[r] = _mm512_setzero_ps();                   \
    for (int64_t g0 = 0; g0 < nb; g0 += 4) {                                              \
        int64_t n4 = nb - g0 < 4 ? nb - g0 : 4;   /* blocks in this group of i4_slot's */ \
        for (int64_t k = 0; k < n4; k++) {                                                \
            int64_t b = g0 + k, lo = 32 * g0 + 16 * k, hi = lo + 16 * n4;   /* i4_slot */ \
            const uint8_t *qb = q + b * 256;                                              \
            I4_TILE_PREFETCH_SCALES(d, m, rs, b);                                         \
            __m512i w[8];                                                                 \
            for (int t = 0; t < 4; t++) {                                                 \
                __m512i v = _mm512_loadu_si512((const void *)(qb + 64 * t));              \
                I4_TILE_PREFETCH_LINE(qb, t);                                             \
                I4_IN_REG(v);                                                             \
                w[t] = _mm512_and_si512(v, low);                      /* columns 4t.. */  \
                w[4 + t] = I4_HIGH(v, low);                           /* 16+4t.. */       \
            }                                                                             \
            if (rs) {   /* 16 unsigned scale codes, then 16 signed offset codes */        \
                const __m128i *c_ = (const __m128i *)((const uint8_t *)d + b * 32);       \
                __m512i dc = _mm512_cvtepu8_epi32(_mm_loadu_si128(c_));                   \
                __m512 mc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c_ + 1))); \
                for (int r = 0; r < R; r++) {                                             \
                    const int8_t *xl = xq[r] + lo, *xh = xq[r] + hi;                      \
                    __m512i p = _mm512_mullo_epi32(I4_TILE_SUMS(w, xl, xh), dc);          \
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(xs[r][b]), \
                                             acc[r]);                                     \
                    macc[r] = _mm512_fmadd_ps(mc, _mm512_set1_ps(xsum[r][b]), macc[r]);   \
                }                                                                         \
                continue;                                                                 \
            }                                                                             \
            __m512 dv, mv;                                                                \
            I4_DM512(d, m, rs, b, dv, mv);                                                \
            for (int r = 0; r < R; r++) {                                                 \
                const int8_t *xl = xq[r] + lo, *xh = xq[r] + hi;                          \
                __m512i p = I4_TILE_SUMS(w, xl, xh);                                      \
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),                           \
                                         _mm512_mul_ps(dv, _mm512_set1_ps(xs[r][b])), acc[r]); \
                acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[r][b]), acc[r]);         \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    if (rs)   /* steps: the rows' 16 scale steps, then their 16 offset steps */           \
        for (int r = 0; r < R; r++)                                                       \
            acc[r] = _mm512_fmadd_ps(macc[r], _mm512_loadu_ps(rs + 16),                   \
                                     _mm512_mul_ps(acc[r], _mm512_loadu_ps(rs)));         \
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ys, acc[r]);                    \
    (void)h;                                                                              \
}                                                                                         \
static inline void dot_i4_tile##R(const uint8_t *q, const uint16_t *d, const uint16_t *m,  \
                                  int8_t *const *xq, float *const *xs,                     \
                                  float *const *xsum, int64_t nb, float *y, int64_t ys,   \
                                  const uint8_t *h, const float *rs) {                    \
    if (rs)                                                                               \
        dot_i4_tile##R##_body(q, d, m, xq, xs, xsum, nb, y, ys, h, rs);                   \
    else                                                                                  \
        dot_i4_tile##R##_body(q, d, m, xq, xs, xsum, nb, y, ys, h, NULL);                 \
}

/* Two groups of 16 weight rows against one input row, block by block: group k's weights
 * at q[k], its scales at d[k] and m[k] (coded: rs[k]), its 16 products to y[k]. Each group
 * gets exactly dot_i4_tile1's operations in the same order (the same numbers), but a block of
 * one group is read beside the same block of the other: two streams of weight lines instead
 * of one. A thread reading its part of a matrix as two streams a megabyte or more apart
 * keeps more lines in flight than the hardware prefetcher gives one stream: C harness, 600 MB
 * of coded int4 tiles, 2 threads, against a plain read in the same round (AMD EPYC with VNNI,
 * docs/BENCHMARKS.md), while memory was fast (48-52 GB/s) one stream 0.89-0.91 of the read,
 * two streams 1.1 MB apart 1.00, 4.6 MB or more 0.98-1.01; 288 KB apart 0.96; neighbouring
 * tiles 0.68; four streams 0.85. While slow (31-34 GB/s) both about 1.0. The 1B shape's int4
 * decode in one process, both alternating on the same weights: 0.97x the time (30 rounds,
 * 36-52 GB/s; decode.c's rows_pair pairs each thread's chunks half its part apart). */
static inline __attribute__((always_inline)) void dot_i4_tile_pair_body(
        const uint8_t *const *q, const uint16_t *const *d, const uint16_t *const *m,
        const float *const *rs, const int8_t *xq, const float *xs, const float *xsum,
        int64_t nb, float *const *y, int coded, int ask) {
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[2], macc[2];
    for (int k = 0; k < 2; k++) acc[k] = macc[k] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < nb; g0 += 4) {
        int64_t n4 = nb - g0 < 4 ? nb - g0 : 4;   /* blocks in this group of i4_slot's */
        for (int64_t j = 0; j < n4; j++) {
            int64_t b = g0 + j, lo = 32 * g0 + 16 * j, hi = lo + 16 * n4;   /* i4_slot */
            const int8_t *xl = xq + lo, *xh = xq + hi;
            for (int k = 0; k < 2; k++) {
                const uint8_t *qb = q[k] + b * 256;
                if (ask) I4_SCALES_AHEAD(d[k], m[k], coded, b, PF_BYTES / 8);
                __m512i w[8];
                for (int t = 0; t < 4; t++) {
                    __m512i v = _mm512_loadu_si512((const void *)(qb + 64 * t));
                    if (ask) PF_AT(qb + 64 * t, PF_BYTES);   /* as I4_TILE_PREFETCH_LINE */
                    I4_IN_REG(v);
                    w[t] = _mm512_and_si512(v, low);
                    w[4 + t] = I4_HIGH(v, low);
                }
                if (coded) {   /* as DOT_I4_TILE's coded blocks */
                    const __m128i *c_ = (const __m128i *)((const uint8_t *)d[k] + b * 32);
                    __m512i dc = _mm512_cvtepu8_epi32(_mm_loadu_si128(c_));
                    __m512 mc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c_ + 1)));
                    __m512i p = _mm512_mullo_epi32(I4_TILE_SUMS(w, xl, xh), dc);
                    acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(xs[b]),
                                             acc[k]);
                    macc[k] = _mm512_fmadd_ps(mc, _mm512_set1_ps(xsum[b]), macc[k]);
                    continue;
                }
                __m512 dv, mv;
                I4_DM512(d[k], m[k], NULL, b, dv, mv);
                __m512i p = I4_TILE_SUMS(w, xl, xh);
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                         _mm512_mul_ps(dv, _mm512_set1_ps(xs[b])), acc[k]);
                acc[k] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[b]), acc[k]);
            }
        }
    }
    for (int k = 0; k < 2; k++) {
        if (coded)
            acc[k] = _mm512_fmadd_ps(macc[k], _mm512_loadu_ps(rs[k] + 16),
                                     _mm512_mul_ps(acc[k], _mm512_loadu_ps(rs[k])));
        _mm512_storeu_ps(y[k], acc[k]);
    }
}
I4_TILE_PAIR_CALL
#define I4_TILE_PAIR 1   /* this build has dot_i4_tile_pair (decode.c's rows_pair) */

#if defined(__AVX512VNNI__) && defined(__GFNI__)
/* int6 tiles (the layout below, DOT_I4W_TILE) against int8 activations: the vocabulary's
 * decode rows. With int16 activations (vpdpwssd, two columns a lane) unpacking the 6-bit
 * values into int16 lanes took about 60 vector operations per 16 x 32 block and the product
 * ran at 50-60 GB/s in L2 on 2 threads, below the memory's fast moments (C harness, AMD EPYC
 * with VNNI, docs/BENCHMARKS.md). Here each chunk t of q gives its low-nibble columns' bytes
 * L = (q & 15) | (top << 4) and its high-nibble columns' bytes H = (q >> 4) | (top << 4),
 * values 0..63 that vpdpbusd takes as unsigned bytes against the int8 activations (i4_slot
 * order, quantize_x8). gf2p8affineqb moves bits within each byte without the spill across
 * bytes of a 16-bit shift: the top-bit field to bits 4-5, q's high nibble down. About 34
 * operations a block. The offset -32 d is int4's offset term with m = d against xsum times
 * -32 (matvec_i4), as in the int16 kernels. An int8 activation's rounding (1/254 of its
 * block's largest |x|) is a quarter of an int6 weight's (1/64 of its block's largest |w|). */
#define I6_NARROW 1
/* gf2p8affineqb's matrix: output bit o gets input bit i when byte 7 - o of the qword has bit
 * i set. GF_MOVE(o, i, n): n bits from i.. to o.. */
#define GF_MOVE(o, i, n)                                                                  \
    ((n) > 0 ? ((uint64_t)1 << (i)) << 8 * (7 - (o)) : 0) |                              \
    ((n) > 1 ? ((uint64_t)1 << ((i) + 1)) << 8 * (6 - (o)) : 0) |                         \
    ((n) > 2 ? ((uint64_t)1 << ((i) + 2)) << 8 * (5 - (o)) : 0) |                         \
    ((n) > 3 ? ((uint64_t)1 << ((i) + 3)) << 8 * (4 - (o)) : 0)
static inline __m512i gf_move(__m512i x, uint64_t matrix) {
    return _mm512_gf2p8affine_epi64_epi8(x, _mm512_set1_epi64((long long)matrix), 0);
}
#define DOT_I6_TILE(R)                                                                    \
static inline void dot_i6_tile##R(const uint8_t *q, const uint16_t *d, const uint16_t *m,  \
                                  int8_t *const *xq, float *const *xs,                     \
                                  float *const *xsum, int64_t nb, float *y, int64_t ys,   \
                                  const uint8_t *h, const float *rs) {                    \
    const __m512i low = _mm512_set1_epi8(15);                                             \
    __m512 acc[R];                                                                        \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                             \
    for (int64_t g0 = 0; g0 < nb; g0 += 4) {                                              \
        int64_t n4 = nb - g0 < 4 ? nb - g0 : 4;   /* blocks in this group of i4_slot's */ \
        for (int64_t k = 0; k < n4; k++) {                                                \
            int64_t b = g0 + k, lo = 32 * g0 + 16 * k, hi = lo + 16 * n4;   /* i4_slot */ \
            const uint8_t *qb = q + b * 256;                                              \
            I4_TILE_PREFETCH(qb, d, m, rs, h, b);                                         \
            __m512i w[8];                                                                 \
            for (int t = 0; t < 4; t++) {   /* fields: low nibbles of f for t < 2 */      \
                __m512i v = _mm512_loadu_si512((const void *)(qb + 64 * t));              \
                __m512i f = _mm512_loadu_si512((const void *)(h + b * 128 + 64 * (t & 1))); \
                I4_IN_REG(v);                                                             \
                __m512i tl = gf_move(f, t < 2 ? GF_MOVE(4, 0, 2) : GF_MOVE(4, 4, 2));     \
                __m512i th = gf_move(f, t < 2 ? GF_MOVE(4, 2, 2) : GF_MOVE(4, 6, 2));     \
                w[t] = _mm512_ternarylogic_epi32(v, tl, low, 0xec);   /* (v & low) | tl */ \
                w[4 + t] = _mm512_or_si512(gf_move(v, GF_MOVE(0, 4, 4)), th);             \
            }                                                                             \
            __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + b * 16))); \
            for (int r = 0; r < R; r++) {                                                 \
                const int8_t *xl = xq[r] + lo, *xh = xq[r] + hi;                          \
                __m512i p0 = dp512_x4(_mm512_setzero_si512(), w[0], xl);                  \
                __m512i p1 = dp512_x4(_mm512_setzero_si512(), w[4], xh);                  \
                for (int c = 1; c < 4; c++) {                                             \
                    p0 = dp512_x4(p0, w[c], xl + 4 * c);                                  \
                    p1 = dp512_x4(p1, w[4 + c], xh + 4 * c);                              \
                }                                                                         \
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)),     \
                                         _mm512_mul_ps(dv, _mm512_set1_ps(xs[r][b])), acc[r]); \
                acc[r] = _mm512_fmadd_ps(dv, _mm512_set1_ps(xsum[r][b]), acc[r]);         \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ys, acc[r]);                    \
    (void)m, (void)rs;                                                                    \
}
/* Two groups of 16 int6 rows against one input row, block by block (as dot_i4_tile_pair):
 * group k at q[k], d[k], h[k], its 16 products to y[k], each with exactly dot_i6_tile1's
 * operations. matvec.c's decode row of a tiled vocabulary pairs tile u with tile u + half. */
static inline __attribute__((always_inline)) void dot_i6_tile_pair_body(
        const uint8_t *const *q, const uint16_t *const *d, const uint8_t *const *h,
        const int8_t *xq, const float *xs, const float *xsum, int64_t nb, float *const *y,
        int ask) {
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g0 = 0; g0 < nb; g0 += 4) {
        int64_t n4 = nb - g0 < 4 ? nb - g0 : 4;   /* blocks in this group of i4_slot's */
        for (int64_t j = 0; j < n4; j++) {
            int64_t b = g0 + j, lo = 32 * g0 + 16 * j, hi = lo + 16 * n4;   /* i4_slot */
            const int8_t *xl = xq + lo, *xh = xq + hi;
            for (int k = 0; k < 2; k++) {
                const uint8_t *qb = q[k] + b * 256;
                if (ask) {   /* as I4_TILE_PREFETCH for int6 */
                    for (int k_ = 0; k_ < 16 * TILE; k_ += 64) PF_AT(qb + k_, 2 * PF_BYTES);
                    I4_SCALES_AHEAD(d[k], d[k], 0, b, 2 * PF_BYTES / 8);
                    for (int k_ = 0; k_ < 8 * TILE; k_ += 64)
                        PF_AT(h[k] + b * 8 * TILE + k_, PF_BYTES);
                }
                __m512i w[8];
                for (int t = 0; t < 4; t++) {
                    __m512i v = _mm512_loadu_si512((const void *)(qb + 64 * t));
                    __m512i f = _mm512_loadu_si512((const void *)(h[k] + b * 128 + 64 * (t & 1)));
                    I4_IN_REG(v);
                    __m512i tl = gf_move(f, t < 2 ? GF_MOVE(4, 0, 2) : GF_MOVE(4, 4, 2));
                    __m512i th = gf_move(f, t < 2 ? GF_MOVE(4, 2, 2) : GF_MOVE(4, 6, 2));
                    w[t] = _mm512_ternarylogic_epi32(v, tl, low, 0xec);
                    w[4 + t] = _mm512_or_si512(gf_move(v, GF_MOVE(0, 4, 4)), th);
                }
                __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d[k] + b * 16)));
                __m512i p0 = dp512_x4(_mm512_setzero_si512(), w[0], xl);
                __m512i p1 = dp512_x4(_mm512_setzero_si512(), w[4], xh);
                for (int c = 1; c < 4; c++) {
                    p0 = dp512_x4(p0, w[c], xl + 4 * c);
                    p1 = dp512_x4(p1, w[4 + c], xh + 4 * c);
                }
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)),
                                         _mm512_mul_ps(dv, _mm512_set1_ps(xs[b])), acc[k]);
                acc[k] = _mm512_fmadd_ps(dv, _mm512_set1_ps(xsum[b]), acc[k]);
            }
        }
    }
    for (int k = 0; k < 2; k++) _mm512_storeu_ps(y[k], acc[k]);
}
static inline void dot_i6_tile_pair(const uint8_t *const *q, const uint16_t *const *d,
                                    const uint8_t *const *h, const int8_t *xq,
                                    const float *xs, const float *xsum, int64_t nb,
                                    float *const *y) {
    if (mpitpi_prefetch & 2)   /* read once a call, as dot_i4_tile_pair */
        dot_i6_tile_pair_body(q, d, h, xq, xs, xsum, nb, y, 1);
    else
        dot_i6_tile_pair_body(q, d, h, xq, xs, xsum, nb, y, 0);
}
#define I6_TILE_PAIR 1

#endif

/* One group of 16 int8 rows (w, ws at the group's start) against R input rows of int16
 * activations (quantize_x): y[r * ys + k] = row k's product with input row r. */
#define X2(x, p) _mm512_set1_epi32(*(const int32_t *)((x) + 2 * (p)))   /* 2 int16, each lane */
#define DOT_I8_TILE(R)                                                                    \
static inline void dot_i8_tile##R(const int8_t *w, int16_t *const *xq, const float *ws,    \
                                  float *const *xs, const float *const *x, int64_t in,     \
                                  int64_t group, int64_t full, float *y, int64_t ys) {     \
    (void)x, (void)full;   /* a tiled width has no fp32 tail (as dot_i8_rows' arguments) */ \
    __m512 acc[R];                                                                        \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                             \
    for (int64_t j = 0; j < in / group; j++) {                                            \
        __m512i a[R];                                                                     \
        for (int r = 0; r < R; r++) a[r] = _mm512_setzero_si512();                        \
        I8_TILE_PREFETCH_S(ws, j, group);                                                 \
        for (int64_t p = j * group / 2; p < (j + 1) * group / 2; p++) {                   \
            I8_TILE_PREFETCH_W(w, p);                                                     \
            __m512i wp = _mm512_cvtepi8_epi16(                                            \
                _mm256_loadu_si256((const __m256i *)(w + p * 32)));                       \
            for (int r = 0; r < R; r++) a[r] = DPWSSD512(a[r], wp, X2(xq[r], p));         \
        }                                                                                 \
        __m512 sv = _mm512_loadu_ps(ws + j * 16);                                         \
        for (int r = 0; r < R; r++)                                                       \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r]),                            \
                                     _mm512_mul_ps(sv, _mm512_set1_ps(xs[r][j])), acc[r]); \
    }                                                                                     \
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ys, acc[r]);                    \
}

/* One group of 16 int4 rows against R input rows of int16 activations (quantize_x16): a
 * 64-byte chunk t of a block gives four registers of int16 column pairs, one row per lane
 * (v & 15: columns 4t, 4t + 2; v >> 8: 4t + 1, 4t + 3; v >> 4 and v >> 12: the same plus 16),
 * each multiplied against the activations' matching pair with vpdpwssd. */
/* DPWSSD512 against the int16 pair at x broadcast to every lane: with VNNI by vpdpwssd's own
 * memory operand, as dp512_x4 (the int6 product 31.7 -> 33.1 GB/s on one thread in L2) */
#if defined(__AVX512VNNI__)
static inline __m512i dpw512_x2(__m512i acc, __m512i w, const int16_t *x) {
    __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)x));
    return acc;
}
#define DPW512_X2(acc, w, x) dpw512_x2(acc, w, x)
#else
#define DPW512_X2(acc, w, x) DPWSSD512(acc, w, _mm512_set1_epi32(*(const int32_t *)(x)))
#endif
/* int6 (quant.py) in these tiles: h is the top-bit plane, tiled as tile_i4 does it (block
 * b of a group: two chunks of 4 TILE bytes, row k's h bytes 4u..4u+3 at 4k in chunk u), so
 * that chunk t of q (bytes 4t..4t+3 of each row) finds its fields in chunk t & 1, low
 * nibbles for t < 2, high ones after. With f those fields (byte i of a lane: q byte i's),
 * each int16 value of w[0..3] gets its top 2 bits in its bits 4-5. */
static inline void i6_top512(__m512i *w, __m512i f) {
    const __m512i top = _mm512_set1_epi16(0x30);   /* 0xf8: w | (shifted f & top) */
    w[0] = _mm512_ternarylogic_epi32(w[0], _mm512_slli_epi16(f, 4), top, 0xf8);  /* 4t, 4t+2 */
    w[1] = _mm512_ternarylogic_epi32(w[1], _mm512_srli_epi16(f, 4), top, 0xf8);  /* 4t+1, +3 */
    w[2] = _mm512_ternarylogic_epi32(w[2], _mm512_slli_epi16(f, 2), top, 0xf8);  /* the +16s */
    w[3] = _mm512_ternarylogic_epi32(w[3], _mm512_srli_epi16(f, 6), top, 0xf8);
}

#define DOT_I4W_TILE(R)                                                                   \
static inline __attribute__((always_inline)) void dot_i4w_tile##R##_body(                  \
        const uint8_t *q, const uint16_t *d, const uint16_t *m, int16_t *const *xq,        \
        float *const *xs, float *const *xsum, int64_t nb, float *y, int64_t ys,           \
        const uint8_t *h, const float *rs) {                                              \
    const __m512i low = _mm512_set1_epi16(15);                                            \
    __m512 acc[R];                                                                        \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                             \
    for (int64_t b = 0; b < nb; b++) {                                                    \
        const uint8_t *qb = q + b * 256;                                                  \
        I4_TILE_PREFETCH(qb, d, m, rs, h, b);                                             \
        __m512i w[16];                                                                    \
        for (int t = 0; t < 4; t++) {                                                     \
            __m512i v = _mm512_loadu_si512((const void *)(qb + 64 * t));                  \
            I4_IN_REG(v);                                                                 \
            w[4 * t] = _mm512_and_si512(v, low);                                          \
            w[4 * t + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 8), low);                \
            w[4 * t + 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);                \
            w[4 * t + 3] = _mm512_srli_epi16(v, 12);                                      \
        }                                                                                 \
        for (int t = 0; h && t < 4; t++) {   /* int6: the top bits (i6_top512) */         \
            __m512i f = _mm512_loadu_si512((const void *)(h + b * 128 + 64 * (t & 1)));   \
            i6_top512(w + 4 * t, t < 2 ? f : _mm512_srli_epi16(f, 4));                    \
        }                                                                                 \
        __m512 dv, mv;                                                                    \
        I4_DM512(d, m, rs, b, dv, mv);                                                    \
        for (int r = 0; r < R; r++) {                                                     \
            const int16_t *a = xq[r] + b * 32;                                            \
            __m512i p0 = _mm512_setzero_si512(), p1 = _mm512_setzero_si512();             \
            for (int p = 0; p < 16; p += 2) {                                             \
                p0 = DPW512_X2(p0, w[p], a + 2 * p);                                      \
                p1 = DPW512_X2(p1, w[p + 1], a + 2 * p + 2);                              \
            }                                                                             \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)),         \
                                     _mm512_mul_ps(dv, _mm512_set1_ps(xs[r][b])), acc[r]); \
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[r][b]), acc[r]);             \
        }                                                                                 \
    }                                                                                     \
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ys, acc[r]);                    \
}                                                                                         \
/* a copy of the loop for each of int4 and int6 (h), coded and fp16 scales (rs) */        \
static inline void dot_i4w_tile##R(const uint8_t *q, const uint16_t *d, const uint16_t *m, \
                                   int16_t *const *xq, float *const *xs,                   \
                                   float *const *xsum, int64_t nb, float *y, int64_t ys,  \
                                   const uint8_t *h, const float *rs) {                   \
    if (h && rs)                                                                          \
        dot_i4w_tile##R##_body(q, d, m, xq, xs, xsum, nb, y, ys, h, rs);                  \
    else if (h)                                                                           \
        dot_i4w_tile##R##_body(q, d, m, xq, xs, xsum, nb, y, ys, h, NULL);                \
    else if (rs)                                                                          \
        dot_i4w_tile##R##_body(q, d, m, xq, xs, xsum, nb, y, ys, NULL, rs);               \
    else                                                                                  \
        dot_i4w_tile##R##_body(q, d, m, xq, xs, xsum, nb, y, ys, NULL, NULL);             \
}
#elif defined(__AVX2__) && defined(HAVE_F16X8)
#define TILE 8
/* As I4_DM512 for 8 rows: a coded block's 8 scale codes, then 8 offset codes */
#define I4_DM256(d, m, rs, b, dv, mv)                                                     \
    do {                                                                                  \
        if (rs) {                                                                         \
            const uint8_t *c_ = (const uint8_t *)(d) + (b) * 16;                          \
            __m128i dc_ = _mm_loadl_epi64((const __m128i *)c_);                           \
            __m128i mc_ = _mm_loadl_epi64((const __m128i *)(c_ + 8));                     \
            dv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(dc_)),             \
                               _mm256_loadu_ps(rs));                                      \
            mv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mc_)),             \
                               _mm256_loadu_ps((rs) + 8));                                \
        } else {                                                                          \
            dv = f16x8((d) + (b) * 8);                                                    \
            mv = f16x8((m) + (b) * 8);                                                    \
        }                                                                                 \
    } while (0)
#define X4(x, c) _mm256_set1_epi32(*(const int32_t *)((x) + 4 * (c)))   /* 4 bytes, each lane */
#define X2(x, p) _mm256_set1_epi32(*(const int32_t *)((x) + 2 * (p)))   /* 2 int16, each lane */

/* The AVX2 int4 tile: 8 rows. The eight vpmaddubsw of a block (unsigned 4-bit weights times
 * signed 8-bit activations, pairs added) are summed in int16 (at most 8 x 2 x 15 x 127 =
 * 30480, no saturation), then widened once with vpmaddwd. Coded scales as in the AVX-512
 * tile: codes times integer sums, the steps after the last block. */
#define DOT_I4_TILE(R)                                                                    \
static inline void dot_i4_tile##R(const uint8_t *q, const uint16_t *d, const uint16_t *m,  \
                                  int8_t *const *xq, float *const *xs,                     \
                                  float *const *xsum, int64_t nb, float *y, int64_t ys,   \
                                  const uint8_t *h, const float *rs) {                    \
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);                \
    __m256 acc[R], macc[R];                                                               \
    for (int r = 0; r < R; r++) acc[r] = macc[r] = _mm256_setzero_ps();                   \
    for (int64_t b = 0; b < nb; b++) {                                                    \
        const uint8_t *qb = q + b * 128;                                                  \
        I4_TILE_PREFETCH(qb, d, m, rs, h, b);                                             \
        __m256i w[8];                                                                     \
        for (int t = 0; t < 4; t++) {                                                     \
            __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 32 * t));               \
            w[t] = _mm256_and_si256(v, low);                      /* columns 4t..4t+3 */  \
            w[4 + t] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);   /* 16+4t.. */    \
        }                                                                                 \
        __m256 dv = _mm256_setzero_ps(), mv = dv;                                        \
        __m256i dc = _mm256_setzero_si256();                                              \
        if (rs) {   /* 8 unsigned scale codes, then 8 signed offset codes */              \
            const uint8_t *c_ = (const uint8_t *)d + b * 16;                              \
            dc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c_));              \
            __m128i mc_ = _mm_loadl_epi64((const __m128i *)(c_ + 8));                     \
            mv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mc_));                           \
        } else                                                                            \
            I4_DM256(d, m, rs, b, dv, mv);                                                \
        int64_t lo = i4_slot(b, 0, nb), hi = i4_slot(b, 16, nb);                          \
        for (int r = 0; r < R; r++) {                                                     \
            const int8_t *xl = xq[r] + lo, *xh = xq[r] + hi;                              \
            __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(w[0], X4(xl, 0)),           \
                                          _mm256_maddubs_epi16(w[1], X4(xl, 1)));          \
            __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(w[2], X4(xl, 2)),           \
                                          _mm256_maddubs_epi16(w[3], X4(xl, 3)));          \
            __m256i s2 = _mm256_add_epi16(_mm256_maddubs_epi16(w[4], X4(xh, 0)),           \
                                          _mm256_maddubs_epi16(w[5], X4(xh, 1)));          \
            __m256i s3 = _mm256_add_epi16(_mm256_maddubs_epi16(w[6], X4(xh, 2)),           \
                                          _mm256_maddubs_epi16(w[7], X4(xh, 3)));          \
            __m256i p = _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(s0, s1),       \
                                                           _mm256_add_epi16(s2, s3)), ones); \
            if (rs) {                                                                     \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_mullo_epi32(p, dc)),    \
                                         _mm256_set1_ps(xs[r][b]), acc[r]);               \
                macc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xsum[r][b]), macc[r]);       \
                continue;                                                                 \
            }                                                                             \
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),                               \
                                     _mm256_mul_ps(dv, _mm256_set1_ps(xs[r][b])), acc[r]); \
            acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xsum[r][b]), acc[r]);             \
        }                                                                                 \
    }                                                                                     \
    if (rs)   /* steps: the rows' 8 scale steps, then their 8 offset steps */             \
        for (int r = 0; r < R; r++)                                                       \
            acc[r] = _mm256_fmadd_ps(macc[r], _mm256_loadu_ps(rs + 8),                    \
                                     _mm256_mul_ps(acc[r], _mm256_loadu_ps(rs)));         \
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * ys, acc[r]);                    \
    (void)h;                                                                              \
}

/* Two groups of 8 rows against one input row, block by block, as the AVX-512 pair above:
 * each group gets exactly dot_i4_tile1's operations, the two read side by side. */
static inline __attribute__((always_inline)) void dot_i4_tile_pair_body(
        const uint8_t *const *q, const uint16_t *const *d, const uint16_t *const *m,
        const float *const *rs, const int8_t *xq, const float *xs, const float *xsum,
        int64_t nb, float *const *y, int coded, int ask) {
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[2], macc[2];
    for (int k = 0; k < 2; k++) acc[k] = macc[k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xl = xq + i4_slot(b, 0, nb), *xh = xq + i4_slot(b, 16, nb);
        for (int k = 0; k < 2; k++) {
            const uint8_t *qb = q[k] + b * 128;
            if (ask) {   /* as I4_TILE_PREFETCH */
                for (int k_ = 0; k_ < 16 * TILE; k_ += 64) PF_AT(qb + k_, PF_BYTES);
                I4_SCALES_AHEAD(d[k], m[k], coded, b, PF_BYTES / 8);
            }
            __m256i w[8];
            for (int t = 0; t < 4; t++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 32 * t));
                w[t] = _mm256_and_si256(v, low);
                w[4 + t] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
            __m256 dv = _mm256_setzero_ps(), mv = dv;
            __m256i dc = _mm256_setzero_si256();
            if (coded) {
                const uint8_t *c_ = (const uint8_t *)d[k] + b * 16;
                dc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c_));
                mv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c_ + 8))));
            } else
                I4_DM256(d[k], m[k], NULL, b, dv, mv);
            __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(w[0], X4(xl, 0)),
                                          _mm256_maddubs_epi16(w[1], X4(xl, 1)));
            __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(w[2], X4(xl, 2)),
                                          _mm256_maddubs_epi16(w[3], X4(xl, 3)));
            __m256i s2 = _mm256_add_epi16(_mm256_maddubs_epi16(w[4], X4(xh, 0)),
                                          _mm256_maddubs_epi16(w[5], X4(xh, 1)));
            __m256i s3 = _mm256_add_epi16(_mm256_maddubs_epi16(w[6], X4(xh, 2)),
                                          _mm256_maddubs_epi16(w[7], X4(xh, 3)));
            __m256i p = _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(s0, s1),
                                                           _mm256_add_epi16(s2, s3)), ones);
            if (coded) {
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_mullo_epi32(p, dc)),
                                         _mm256_set1_ps(xs[b]), acc[k]);
                macc[k] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xsum[b]), macc[k]);
                continue;
            }
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                     _mm256_mul_ps(dv, _mm256_set1_ps(xs[b])), acc[k]);
            acc[k] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xsum[b]), acc[k]);
        }
    }
    for (int k = 0; k < 2; k++) {
        if (coded)
            acc[k] = _mm256_fmadd_ps(macc[k], _mm256_loadu_ps(rs[k] + 8),
                                     _mm256_mul_ps(acc[k], _mm256_loadu_ps(rs[k])));
        _mm256_storeu_ps(y[k], acc[k]);
    }
}
I4_TILE_PAIR_CALL
#define I4_TILE_PAIR 1   /* this build has dot_i4_tile_pair (decode.c's rows_pair) */

/* The AVX2 int8 tile: 8 rows, vpmaddwd against each broadcast pair of int16 activations. */
#define DOT_I8_TILE(R)                                                                    \
static inline void dot_i8_tile##R(const int8_t *w, int16_t *const *xq, const float *ws,    \
                                  float *const *xs, const float *const *x, int64_t in,     \
                                  int64_t group, int64_t full, float *y, int64_t ys) {     \
    (void)x, (void)full;   /* a tiled width has no fp32 tail (as dot_i8_rows' arguments) */ \
    __m256 acc[R];                                                                        \
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                             \
    for (int64_t j = 0; j < in / group; j++) {                                            \
        __m256i a[R];                                                                     \
        for (int r = 0; r < R; r++) a[r] = _mm256_setzero_si256();                        \
        I8_TILE_PREFETCH_S(ws, j, group);                                                 \
        for (int64_t p = j * group / 2; p < (j + 1) * group / 2; p++) {                   \
            I8_TILE_PREFETCH_W(w, p);                                                     \
            __m256i wp = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + p * 16))); \
            for (int r = 0; r < R; r++) a[r] = DPWSSD(a[r], wp, X2(xq[r], p));            \
        }                                                                                 \
        __m256 sv = _mm256_loadu_ps(ws + j * 8);                                          \
        for (int r = 0; r < R; r++)                                                       \
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]),                            \
                                     _mm256_mul_ps(sv, _mm256_set1_ps(xs[r][j])), acc[r]); \
    }                                                                                     \
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * ys, acc[r]);                    \
}

/* The AVX2 int4 tile against int16 activations: 8 rows, as the AVX-512 one (vpmaddwd), and
 * int6's top bits as i6_top512 adds them. */
static inline void i6_top256(__m256i *w0, __m256i *w1, __m256i *w2, __m256i *w3, __m256i f) {
    const __m256i top = _mm256_set1_epi16(0x30);
    *w0 = _mm256_or_si256(*w0, _mm256_and_si256(_mm256_slli_epi16(f, 4), top));
    *w1 = _mm256_or_si256(*w1, _mm256_and_si256(_mm256_srli_epi16(f, 4), top));
    *w2 = _mm256_or_si256(*w2, _mm256_and_si256(_mm256_slli_epi16(f, 2), top));
    *w3 = _mm256_or_si256(*w3, _mm256_and_si256(_mm256_srli_epi16(f, 6), top));
}
#define DOT_I4W_TILE(R)                                                                   \
static inline void dot_i4w_tile##R(const uint8_t *q, const uint16_t *d, const uint16_t *m, \
                                   int16_t *const *xq, float *const *xs,                   \
                                   float *const *xsum, int64_t nb, float *y, int64_t ys,  \
                                   const uint8_t *h, const float *rs) {                   \
    const __m256i low = _mm256_set1_epi16(15);                                            \
    __m256 acc[R];                                                                        \
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                             \
    for (int64_t b = 0; b < nb; b++) {                                                    \
        const uint8_t *qb = q + b * 128;                                                  \
        I4_TILE_PREFETCH(qb, d, m, rs, h, b);                                             \
        __m256 dv, mv;                                                                    \
        I4_DM256(d, m, rs, b, dv, mv);                                                    \
        __m256i p[R];                                                                     \
        for (int r = 0; r < R; r++) p[r] = _mm256_setzero_si256();                        \
        for (int t = 0; t < 4; t++) {                                                     \
            __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 32 * t));               \
            __m256i w0 = _mm256_and_si256(v, low);                                        \
            __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(v, 8), low);                  \
            __m256i w2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);                  \
            __m256i w3 = _mm256_srli_epi16(v, 12);                                        \
            if (h) {   /* int6: the top bits (i6_top256) */                               \
                __m256i f = _mm256_loadu_si256((const __m256i *)(h + b * 64 + 32 * (t & 1))); \
                i6_top256(&w0, &w1, &w2, &w3, t < 2 ? f : _mm256_srli_epi16(f, 4));       \
            }                                                                             \
            for (int r = 0; r < R; r++) {                                                 \
                const int16_t *a = xq[r] + b * 32;                                        \
                p[r] = DPWSSD(p[r], w0, X2(a, 4 * t));                                    \
                p[r] = DPWSSD(p[r], w1, X2(a, 4 * t + 1));                                \
                p[r] = DPWSSD(p[r], w2, X2(a, 4 * t + 2));                                \
                p[r] = DPWSSD(p[r], w3, X2(a, 4 * t + 3));                                \
            }                                                                             \
        }                                                                                 \
        for (int r = 0; r < R; r++) {                                                     \
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[r]),                            \
                                     _mm256_mul_ps(dv, _mm256_set1_ps(xs[r][b])), acc[r]); \
            acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xsum[r][b]), acc[r]);             \
        }                                                                                 \
    }                                                                                     \
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * ys, acc[r]);                    \
}
#else
#define TILE 0
#endif

#if TILE
DOT_I4_TILE(1)
DOT_I4_TILE(2)
DOT_I4_TILE(3)
DOT_I4_TILE(4)
DOT_I8_TILE(1)
DOT_I8_TILE(2)
DOT_I8_TILE(3)
DOT_I8_TILE(4)
/* up to 8 input rows share each unpacked block */
DOT_I4_TILE(5)
DOT_I4_TILE(6)
DOT_I4_TILE(7)
DOT_I4_TILE(8)
DOT_I8_TILE(5)
DOT_I8_TILE(6)
DOT_I8_TILE(7)
DOT_I8_TILE(8)

/* One group of TILE rows against B input rows, as dot_i4_batch / dot_i8_batch: y[b * ys + k]
 * = row k's product with input row b. */
DOT_I4W_TILE(1)
DOT_I4W_TILE(2)
DOT_I4W_TILE(3)
DOT_I4W_TILE(4)
I4_BATCH_G(dot_i4_tile_batch, dot_i4_tile, int8_t, 8, ROWS_CALL8)
#if defined(I6_NARROW)
DOT_I6_TILE(1)
DOT_I6_TILE(2)
DOT_I6_TILE(3)
DOT_I6_TILE(4)
DOT_I6_TILE(5)
DOT_I6_TILE(6)
DOT_I6_TILE(7)
DOT_I6_TILE(8)
I4_BATCH_G(dot_i6_tile_batch, dot_i6_tile, int8_t, 8, ROWS_CALL8)
#endif
#if TILE == 16   /* AVX-512: eight rows of int16 activations per unpacked block too */
DOT_I4W_TILE(5)
DOT_I4W_TILE(6)
DOT_I4W_TILE(7)
DOT_I4W_TILE(8)
I4_BATCH_G(dot_i4w_tile_batch, dot_i4w_tile, int16_t, 8, ROWS_CALL8)
#else
I4_BATCH(dot_i4w_tile_batch, dot_i4w_tile, int16_t)
#endif
I8_BATCH_G(dot_i8_tile_batch, dot_i8_tile, 8, ROWS_CALL8)
#else
static inline void dot_i4_tile_batch(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                                     int8_t *xq, int64_t sxq, float *xs, float *xsum,
                                     int64_t sxs, int64_t B, int64_t nb, float *y, int64_t ys,
                                     const uint8_t *h, const float *rs) {
    (void)q, (void)d, (void)m, (void)xq, (void)sxq, (void)xs, (void)xsum, (void)sxs, (void)B;
    (void)nb, (void)y, (void)ys, (void)h, (void)rs;
    abort();   /* no build without TILE tiles a matrix (weight_tile() is 0) */
}
static inline void dot_i4w_tile_batch(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                                      int16_t *xq, int64_t sxq, float *xs, float *xsum,
                                      int64_t sxs, int64_t B, int64_t nb, float *y,
                                      int64_t ys, const uint8_t *h, const float *rs) {
    (void)q, (void)d, (void)m, (void)xq, (void)sxq, (void)xs, (void)xsum, (void)sxs, (void)B;
    (void)nb, (void)y, (void)ys, (void)h, (void)rs;
    abort();
}
static inline void dot_i8_tile_batch(const int8_t *w, const float *ws, int16_t *xq, int64_t sq,
                                     float *xs, int64_t ss, const float *x, int64_t sx,
                                     int64_t B, int64_t in, int64_t group, int64_t full,
                                     float *y, int64_t ys) {
    (void)w, (void)ws, (void)xq, (void)sq, (void)xs, (void)ss, (void)x, (void)sx, (void)B;
    (void)in, (void)group, (void)full, (void)y, (void)ys;
    abort();
}
#endif
#define I8_TILE_GROUP 256   /* 127 x 32767 x 256 < 2^31 */

/* Row o of an int8 matrix (rows rows of ``in`` columns, ng scales each) whose full groups of
 * ``tile`` rows are tiled (0: plain rows): its in values into row, its scales into s. */
static inline void i8_row_at(const int8_t *w, const float *scale, int64_t o, int64_t rows,
                             int64_t in, int64_t ng, int64_t tile, int8_t *row, float *s) {
    if (tile && o < rows / tile * tile) {
        int64_t g = o / tile, k = o % tile;
        const int8_t *base = w + g * tile * in + 2 * k;
        for (int64_t p = 0; p < in / 2; p++) memcpy(row + 2 * p, base + p * 2 * tile, 2);
        for (int64_t j = 0; j < ng; j++) s[j] = scale[(g * ng + j) * tile + k];
    } else {
        memcpy(row, w + o * in, (size_t)in);
        memcpy(s, scale + o * ng, sizeof(float) * ng);
    }
}

/* Float weights (fp32, bf16 raw bits, f16 raw bits) against R fp32 input rows (R = 1 .. 4:
 * the decode rows of a batch, or the rows of a short prompt): each weight is widened once
 * and multiplied into every row. A row's sum runs in two vector accumulators (columns
 * 0-15 and 16-31 of each step of 32; the AVX2 build: 0-7 and 8-15 of each 16, then a
 * scalar tail) and ends in one out-of-line reduction, so a row gets the same operations in
 * the same order whatever R is and whatever rows lie beside it. Independent accumulators
 * per row keep the FMA units busy where one chain per row waited on its own latency (eight
 * decode rows of SmolLM2 fp32 took 3.4x one row's time, docs/BENCHMARKS.md). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define FROWS_512 1
#define FW 16                                        /* columns per vector */
typedef __m512 fvec_t;
static inline fvec_t wide_f32(const float *w, __mmask16 k) { return _mm512_maskz_loadu_ps(k, w); }
static inline fvec_t wide_bf16(const uint16_t *w, __mmask16 k) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
static inline fvec_t wide_f16(const uint16_t *w, __mmask16 k) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, w));
}
static inline fvec_t fvec_x(const float *x, __mmask16 k) { return _mm512_maskz_loadu_ps(k, x); }
#define FMADD(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FZERO() _mm512_setzero_ps()
static __attribute__((noinline)) float frows_sum(fvec_t a0, fvec_t a1, const void *w,
                                                 const float *x, int64_t i, int64_t n,
                                                 int kind) {
    (void)w; (void)x; (void)i; (void)n; (void)kind;   /* no scalar tail: masked steps */
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
static inline __mmask16 fmask(int64_t left) {   /* the first min(left, 16) lanes */
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (left > 0 ? left : 0)) - 1);
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FROWS_256 1
#define FW 8
typedef __m256 fvec_t;
static inline fvec_t wide_f32(const float *w, int k) { (void)k; return _mm256_loadu_ps(w); }
static inline fvec_t wide_bf16(const uint16_t *w, int k) {
    (void)k;
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline fvec_t wide_f16(const uint16_t *w, int k) { (void)k; return f16x8(w); }
static inline fvec_t fvec_x(const float *x, int k) { (void)k; return _mm256_loadu_ps(x); }
#define FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FZERO() _mm256_setzero_ps()
/* the columns past the last whole step of 16 one by one (kind: 0 f32, 1 bf16, 2 f16) */
static __attribute__((noinline)) float frows_sum(fvec_t a0, fvec_t a1, const void *w,
                                                 const float *x, int64_t i, int64_t n,
                                                 int kind) {
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++) {
        float wi = kind == 0 ? ((const float *)w)[i]
                 : kind == 1 ? bf16_to_f32(((const uint16_t *)w)[i])
                             : f16_to_f32(((const uint16_t *)w)[i]);
        s += wi * x[i];
    }
    return s;
}
#endif

#if defined(FROWS_512) || defined(FROWS_256)
/* NAME##R: y[r * ys] = w . x[r] for r < R over n columns, w of type WT widened by WIDEN.
 * The accumulators are named variables, not arrays: gcc kept arrays of them on the stack
 * (a store per FMA, and each widened weight loaded again per row). */
#define FROWS_STEP(WIDEN, R, K0, K1, I1)   /* I1: where the second vector starts */       \
    {                                                                                     \
        fvec_t w0 = WIDEN(w + i, K0), w1 = WIDEN(w + I1, K1);                             \
        a00 = FMADD(w0, fvec_x(x[0] + i, K0), a00);                                       \
        a01 = FMADD(w1, fvec_x(x[0] + I1, K1), a01);                                      \
        if (R > 1) {                                                                      \
            a10 = FMADD(w0, fvec_x(x[1] + i, K0), a10);                                   \
            a11 = FMADD(w1, fvec_x(x[1] + I1, K1), a11);                                  \
        }                                                                                 \
        if (R > 2) {                                                                      \
            a20 = FMADD(w0, fvec_x(x[2] + i, K0), a20);                                   \
            a21 = FMADD(w1, fvec_x(x[2] + I1, K1), a21);                                  \
        }                                                                                 \
        if (R > 3) {                                                                      \
            a30 = FMADD(w0, fvec_x(x[3] + i, K0), a30);                                   \
            a31 = FMADD(w1, fvec_x(x[3] + I1, K1), a31);                                  \
        }                                                                                 \
    }
#define DOT_F_ROWS(NAME, WT, WIDEN, KIND, R)                                              \
static inline void NAME##R(const WT *w, const float *const *x, int64_t n, float *y,       \
                           int64_t ys) {                                                  \
    fvec_t a00 = FZERO(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,          \
           a30 = a00, a31 = a00;                                                          \
    int64_t i = 0;                                                                        \
    for (; i + 2 * FW <= n; i += 2 * FW) FROWS_STEP(WIDEN, R, -1, -1, i + FW)                \
    FROWS_TAIL(WIDEN, R)                                                                  \
    y[0] = frows_sum(a00, a01, w, x[0], i, n, KIND);                                      \
    if (R > 1) y[ys] = frows_sum(a10, a11, w, x[1], i, n, KIND);                          \
    if (R > 2) y[2 * ys] = frows_sum(a20, a21, w, x[2], i, n, KIND);                      \
    if (R > 3) y[3 * ys] = frows_sum(a30, a31, w, x[3], i, n, KIND);                      \
}
#ifdef FROWS_512   /* the last 1-31 columns as one masked step (an empty second half
                      reads nothing, at an address inside the row) */
#define FROWS_TAIL(WIDEN, R)                                                              \
    if (i < n) {                                                                          \
        __mmask16 k0 = fmask(n - i), k1 = fmask(n - i - FW);                              \
        int64_t i1 = n - i > FW ? i + FW : i;                                             \
        FROWS_STEP(WIDEN, R, k0, k1, i1)                                                  \
        i = n;                                                                            \
    }
#else              /* frows_sum adds the last 1-15 columns */
#define FROWS_TAIL(WIDEN, R)
#endif
#define DOT_F_ROWS_ALL(NAME, WT, WIDEN, KIND)                                             \
DOT_F_ROWS(NAME, WT, WIDEN, KIND, 1)                                                      \
DOT_F_ROWS(NAME, WT, WIDEN, KIND, 2)                                                      \
DOT_F_ROWS(NAME, WT, WIDEN, KIND, 3)                                                      \
DOT_F_ROWS(NAME, WT, WIDEN, KIND, 4)
DOT_F_ROWS_ALL(dot_f32_rows, float, wide_f32, 0)
DOT_F_ROWS_ALL(dot_bf16_rows, uint16_t, wide_bf16, 1)
DOT_F_ROWS_ALL(dot_f16_rows, uint16_t, wide_f16, 2)
#else              /* plain C (and NEON, which gcc vectorises): one row at a time, in one
                      out-of-line copy of the loop whatever R (its vectorisation is gcc's) */
#define DOT_F_ROWS_ALL(NAME, WT, LOAD)                                                    \
static __attribute__((noinline)) void NAME##N(const WT *w, const float *const *x,       \
                                               int64_t R, int64_t n, float *y,            \
                                               int64_t ys) {                              \
    for (int64_t r = 0; r < R; r++) {                                                     \
        float a = 0.f;                                                                    \
        for (int64_t i = 0; i < n; i++) a += LOAD(w, i) * x[r][i];                        \
        y[r * ys] = a;                                                                    \
    }                                                                                     \
}                                                                                         \
static inline void NAME##1(const WT *w, const float *const *x, int64_t n, float *y,       \
                           int64_t ys) { NAME##N(w, x, 1, n, y, ys); }                    \
static inline void NAME##2(const WT *w, const float *const *x, int64_t n, float *y,       \
                           int64_t ys) { NAME##N(w, x, 2, n, y, ys); }                    \
static inline void NAME##3(const WT *w, const float *const *x, int64_t n, float *y,       \
                           int64_t ys) { NAME##N(w, x, 3, n, y, ys); }                    \
static inline void NAME##4(const WT *w, const float *const *x, int64_t n, float *y,       \
                           int64_t ys) { NAME##N(w, x, 4, n, y, ys); }
#define FLOAD_F32(p, i) ((p)[i])
#define FLOAD_BF16(p, i) bf16_to_f32((p)[i])
#define FLOAD_F16(p, i) f16_to_f32((p)[i])
DOT_F_ROWS_ALL(dot_f32_rows, float, FLOAD_F32)
DOT_F_ROWS_ALL(dot_bf16_rows, uint16_t, FLOAD_BF16)
DOT_F_ROWS_ALL(dot_f16_rows, uint16_t, FLOAD_F16)
#endif

/* bf16 weights on CPUs with AVX512_BF16: the rows of x are rounded to bf16 once per product
 * (to nearest even, as torch's bf16 prompt product does) and vdpbf16ps multiplies 32 pairs
 * and adds them into 16 fp32 lanes per instruction, twice the multiply-adds of widening
 * each weight and an FMA: y = sum over pairs of (x_bf16 w) in fp32. Two accumulators per
 * row (64 columns a step), a masked last step, one out-of-line sum: a row gets the same
 * operations whatever rows share the call. */
#if defined(FROWS_512) && defined(__AVX512BF16__)
#define BF16_DOT 1
static inline void x_to_bf16(const float *x, int64_t n, uint16_t *xb) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(xb + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 k = fmask(n - i);
        _mm256_mask_storeu_epi16(xb + i, k,
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, x + i)));
    }
}
static inline __mmask32 bmask(int64_t left) {   /* the first min(left, 32) lanes */
    return left >= 32 ? ~(__mmask32)0 : left <= 0 ? 0 : (((__mmask32)1 << left) - 1);
}
static __attribute__((noinline)) float bdot_sum(__m512 a0, __m512 a1) {
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#define BDOT(acc, W, r, at, k)                                                            \
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(k, x[r] + (at)), W)
#define BDOT_STEP(R, k0, k1, i1)                                                          \
    {                                                                                     \
        __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(k0, w + i);                      \
        __m512bh w1 = (__m512bh)_mm512_maskz_loadu_epi16(k1, w + (i1));                   \
        BDOT(a00, w0, 0, i, k0);                                                          \
        BDOT(a01, w1, 0, i1, k1);                                                         \
        if (R > 1) { BDOT(a10, w0, 1, i, k0); BDOT(a11, w1, 1, i1, k1); }                 \
        if (R > 2) { BDOT(a20, w0, 2, i, k0); BDOT(a21, w1, 2, i1, k1); }                 \
        if (R > 3) { BDOT(a30, w0, 3, i, k0); BDOT(a31, w1, 3, i1, k1); }                 \
    }
/* dot_bf16x_rows##R: y[r * ys] = w . xb[r] for r < R, w and xb[r] bf16, n columns */
#define DOT_BF16X_ROWS(R)                                                                 \
static inline void dot_bf16x_rows##R(const uint16_t *w, const uint16_t *const *x,         \
                                     int64_t n, float *y, int64_t ys) {                   \
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00,         \
           a30 = a00, a21 = a00, a31 = a00;                                               \
    int64_t i = 0;                                                                        \
    for (; i + 64 <= n; i += 64) BDOT_STEP(R, ~(__mmask32)0, ~(__mmask32)0, i + 32)       \
    if (i < n) BDOT_STEP(R, bmask(n - i), bmask(n - i - 32), n - i > 32 ? i + 32 : i)     \
    y[0] = bdot_sum(a00, a01);                                                            \
    if (R > 1) y[ys] = bdot_sum(a10, a11);                                                \
    if (R > 2) y[2 * ys] = bdot_sum(a20, a21);                                            \
    if (R > 3) y[3 * ys] = bdot_sum(a30, a31);                                            \
}
DOT_BF16X_ROWS(1)
DOT_BF16X_ROWS(2)
DOT_BF16X_ROWS(3)
DOT_BF16X_ROWS(4)
#endif

/* One weight row (kind 0 fp32, 1 bf16, 2 f16) against B input rows x[b] = x + b * sx,
 * groups of up to four sharing each widened weight: y[b * ys] = w . x[b]. Where BF16_DOT
 * is defined, bf16 weights take xb[b] = xb + b * sxb instead, the rows of x in bf16
 * (x_to_bf16); elsewhere xb is unused. Out of line: inlined into decode.c's product, gcc
 * loaded each widened weight again for every row (16 loads per 8 FMAs; eight fp32 rows of
 * SmolLM2 on 2 ranks: 44 -> 33 ms a pass). */
static __attribute__((noinline)) void dot_float_batch(int kind, const void *w,
                                                      const float *x, int64_t sx,
                                                      const uint16_t *xb, int64_t sxb,
                                                      int64_t B, int64_t n, float *y,
                                                      int64_t ys) {
    (void)xb;
    (void)sxb;
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
        const float *xr[4];
        int64_t R = B - b0 < 4 ? B - b0 : 4;
        for (int64_t r = 0; r < R; r++) xr[r] = x + (b0 + r) * sx;
        float *yo = y + b0 * ys;
        if (kind == 0) {
            ROWS_CALL(dot_f32_rows, R, (const float *)w, xr, n, yo, ys)
        } else if (kind == 1) {
#ifdef BF16_DOT
            const uint16_t *br[4];
            for (int64_t r = 0; r < R; r++) br[r] = xb + (b0 + r) * sxb;
            ROWS_CALL(dot_bf16x_rows, R, (const uint16_t *)w, br, n, yo, ys)
#else
            ROWS_CALL(dot_bf16_rows, R, (const uint16_t *)w, xr, n, yo, ys)
#endif
        } else {
            ROWS_CALL(dot_f16_rows, R, (const uint16_t *)w, xr, n, yo, ys)
        }
    }
}

#endif
