/* Matrix-vector products for decode: y (T, out) = x (T, in) @ W (out, in)^T, small T.
 *
 * Decode reads every weight once per token, so it is bound by memory bandwidth when the
 * loop keeps up with it. These loops do: four weight rows at a time share each load of x
 * (x stays in L1 even for long rows) and give four independent accumulator chains; the
 * compiler vectorises them for the host it is built on (-march=native, see kernels.py).
 * Weights stay in their storage dtype and are widened to fp32 in registers:
 *   f32, bf16 (raw bits), f16 (raw bits, F16C), i8 (times a per-output-row fp32 scale).
 * Work is split over output rows with OpenMP (the same runtime torch uses).
 */
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
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

/* Rows one at a time: the fastest measured while x fits in L1 (in <= 4096). */
#define MATVEC_ROWS1(NAME, WT, LOAD)                                                    \
static void NAME(const float *restrict x, const WT *restrict w, const float *restrict scale, \
                 float *restrict y, int64_t T, int64_t in, int64_t out, int64_t ld) { \
    _Pragma("omp parallel for schedule(static)")                                        \
    for (int64_t o = 0; o < out; o++) {                                                 \
        const WT *wr = w + o * in;                                                      \
        for (int64_t t = 0; t < T; t++) {                                               \
            const float *xt = x + t * in;                                               \
            float a = 0.f;                                                              \
            for (int64_t i = 0; i < in; i++) a += LOAD(wr, i) * xt[i];                  \
            y[t * ld + o] = scale ? a * scale[o] : a;                                   \
        }                                                                               \
    }                                                                                   \
}

/* Four rows at a time share each load of x: faster once x no longer fits in L1. */
#define MATVEC_ROWS4(NAME, WT, LOAD)                                                    \
static void NAME(const float *restrict x, const WT *restrict w, const float *restrict scale, \
                 float *restrict y, int64_t T, int64_t in, int64_t out, int64_t ld) { \
    int64_t blocks = out / 4;                                                           \
    _Pragma("omp parallel for schedule(static)")                                        \
    for (int64_t b = 0; b < blocks; b++) {                                              \
        int64_t o = b * 4;                                                              \
        const WT *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;         \
        for (int64_t t = 0; t < T; t++) {                                               \
            const float *xt = x + t * in;                                               \
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;                               \
            for (int64_t i = 0; i < in; i++) {                                          \
                float xi = xt[i];                                                       \
                a0 += LOAD(w0, i) * xi;                                                 \
                a1 += LOAD(w1, i) * xi;                                                 \
                a2 += LOAD(w2, i) * xi;                                                 \
                a3 += LOAD(w3, i) * xi;                                                 \
            }                                                                           \
            float *yt = y + t * ld + o;                                                 \
            if (scale) {                                                                \
                a0 *= scale[o]; a1 *= scale[o + 1]; a2 *= scale[o + 2]; a3 *= scale[o + 3]; \
            }                                                                           \
            yt[0] = a0; yt[1] = a1; yt[2] = a2; yt[3] = a3;                             \
        }                                                                               \
    }                                                                                   \
}

/* The exported entry point: long rows by fours, the rest (and the tail) one at a time. */
#define MATVEC(NAME, WT, LOAD)                                                          \
MATVEC_ROWS1(NAME##_rows1, WT, LOAD)                                                    \
MATVEC_ROWS4(NAME##_rows4, WT, LOAD)                                                    \
void NAME(const float *x, const WT *w, const float *scale, float *y,                    \
          int64_t T, int64_t in, int64_t out) {                                         \
    if (in <= 4096) {                                                                   \
        NAME##_rows1(x, w, scale, y, T, in, out, out);                                  \
        return;                                                                         \
    }                                                                                   \
    int64_t head = out / 4 * 4;                                                         \
    NAME##_rows4(x, w, scale, y, T, in, head, out);                                     \
    if (head < out)                                                                     \
        NAME##_rows1(x, w + head * in, scale ? scale + head : 0, y + head, T, in,       \
                     out - head, out);                                                  \
}

#define LOAD_F32(p, i) ((p)[i])
#define LOAD_BF16(p, i) bf16_to_f32((p)[i])
#define LOAD_F16(p, i) f16_to_f32((p)[i])
#define LOAD_I8(p, i) ((float)(p)[i])

MATVEC(matvec_f32, float, LOAD_F32)
MATVEC(matvec_bf16, uint16_t, LOAD_BF16)
MATVEC(matvec_i8, int8_t, LOAD_I8)

#if defined(__F16C__) && defined(__FMA__)
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

void matvec_f16(const float *restrict x, const uint16_t *restrict w, const float *restrict scale,
                float *restrict y, int64_t T, int64_t in, int64_t out) {
    int64_t blocks = (out + 3) / 4, in8 = in / 8 * 8;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t o0 = b * 4, o1 = o0 + 4 < out ? o0 + 4 : out, n = o1 - o0;
        const uint16_t *wr[4];
        for (int64_t r = 0; r < 4; r++) wr[r] = w + (o0 + (r < n ? r : 0)) * in;
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * in;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < in8; i += 8) {
                __m256 xi = _mm256_loadu_ps(xt + i);
                a0 = _mm256_fmadd_ps(f16x8(wr[0] + i), xi, a0);
                a1 = _mm256_fmadd_ps(f16x8(wr[1] + i), xi, a1);
                a2 = _mm256_fmadd_ps(f16x8(wr[2] + i), xi, a2);
                a3 = _mm256_fmadd_ps(f16x8(wr[3] + i), xi, a3);
            }
            float acc[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
            for (int64_t r = 0; r < n; r++) {
                for (int64_t i = in8; i < in; i++) acc[r] += f16_to_f32(wr[r][i]) * xt[i];
                y[t * out + o0 + r] = scale ? acc[r] * scale[o0 + r] : acc[r];
            }
        }
    }
}
#else
MATVEC(matvec_f16, uint16_t, LOAD_F16)
#endif
