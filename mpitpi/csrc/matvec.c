/* Matrix-vector products for decode: y (T, out) = x (T, in) @ W (out, in)^T, small T.
 *
 * Decode reads every weight once per token, so it is bound by memory bandwidth when the
 * loop keeps up with it. Every product here takes each weight row against up to four rows
 * of x at a time with the row kernels of common.h (AVX-512 or AVX2 intrinsics where the
 * host has them, plain C that the compiler vectorises elsewhere; -march=native, see
 * kernels.py), so a row of x gets the same numbers whatever T is.
 * Weights stay in their storage dtype and are widened to fp32 in registers:
 *   f32, bf16 (raw bits), f16 (raw bits, F16C), i8 (times fp32 scales), i4 (blocks of 32
 *   with fp16 scale and offset; see quant.py and common.h).
 * dequant_i8 / dequant_i4 write an integer matrix out in fp32 or bf16 for torch's prompt product.
 * Work is split over output rows with OpenMP (the same runtime torch uses).
 */
#include "common.h"

/* Float weights: output rows split over the threads, each weight row against the T rows of
 * x by fours (dot_float_batch: each row's numbers are the same whatever T is). */
static void matvec_float(int kind, size_t size, const float *x, const void *w, float *y,
                         int64_t T, int64_t in, int64_t out) {
    uint16_t *xb = NULL;
#ifdef BF16_DOT
    if (kind == 1) {   /* the rows of x in bf16, once (see dot_float_batch) */
        xb = malloc(sizeof(uint16_t) * T * in);
        for (int64_t t = 0; t < T; t++) x_to_bf16(x + t * in, in, xb + t * in);
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        prefetch_float(w, o, in * size, out, T);
        dot_float_batch(kind, (const char *)w + o * in * size, x, in, xb, in, T, in, y + o,
                        out);
    }
    free(xb);
}

/* 1 where bf16 weights round the rows of x to bf16 (dot_float_batch), else 0 */
int bf16_rounds_x(void) {
#ifdef BF16_DOT
    return 1;
#else
    return 0;
#endif
}

void matvec_f32(const float *x, const float *w, float *y, int64_t T, int64_t in, int64_t out) {
    matvec_float(0, sizeof(float), x, w, y, T, in, out);
}

void matvec_bf16(const float *x, const uint16_t *w, float *y, int64_t T, int64_t in,
                 int64_t out) {
    matvec_float(1, sizeof(uint16_t), x, w, y, T, in, out);
}

void matvec_f16(const float *x, const uint16_t *w, float *y, int64_t T, int64_t in,
                int64_t out) {
    matvec_float(2, sizeof(uint16_t), x, w, y, T, in, out);
}

void matvec_i8(const float *restrict x, const int8_t *restrict w, const float *restrict scale,
               float *restrict y, int64_t T, int64_t in, int64_t out, int64_t group) {
    int64_t n_groups = (in + group - 1) / group, full = in / group;
    int16_t *xq = malloc(sizeof(int16_t) * T * in);
    float *xs = malloc(sizeof(float) * T * n_groups);
    for (int64_t t = 0; t < T; t++)
        quantize_x(x + t * in, in, group, xq + t * in, xs + t * n_groups);
    #pragma omp parallel for schedule(static)   /* rows of x by fours share widened weights */
    for (int64_t o = 0; o < out; o++)
        dot_i8_batch(w + o * in, scale + o * n_groups, xq, in, xs, n_groups, x, in, T, in, group,
                     full, y + o, out);
    free(xq);
    free(xs);
}

/* Groups of rows a product hands out: each full group of ``tile`` rows (tile_i4), then
 * each row after them. Unit u covers rows [*o0, *o0 + its count). */
static inline int64_t i4_units(int64_t rows, int64_t tile) {
    return tile ? rows / tile + rows % tile : rows;
}
static inline int64_t i4_unit(int64_t u, int64_t rows, int64_t tile, int64_t *o0) {
    int64_t full = tile ? rows / tile : 0;
    *o0 = u < full ? u * tile : full * tile + (u - full);
    return u < full ? tile : 1;
}

/* The number of rows of an int4 tile in this build (0: it keeps plain rows) */
int64_t i4_tile(void) { return I4_TILE; }

/* An int4 matrix's full groups of I4_TILE rows, written as plain rows (q (rows, in / 2),
 * d and m (rows, in / 32)), rearranged in place into tiles (common.h). One thread: it runs
 * beside the model's compute (the layer prefetcher). */
void tile_i4(uint8_t *q, uint16_t *d, uint16_t *m, int64_t rows, int64_t in) {
    const int64_t T = I4_TILE, nb = in / 32;
    if (!T || rows < T)
        return;
    uint8_t *tq = malloc((size_t)(T * nb * 16));
    uint16_t *td = malloc(sizeof(uint16_t) * T * nb), *tm = malloc(sizeof(uint16_t) * T * nb);
    for (int64_t g = 0; g < rows / T; g++) {
        uint8_t *qg = q + g * T * nb * 16;
        uint16_t *dg = d + g * T * nb, *mg = m + g * T * nb;
        memcpy(tq, qg, (size_t)(T * nb * 16));
        memcpy(td, dg, sizeof(uint16_t) * T * nb);
        memcpy(tm, mg, sizeof(uint16_t) * T * nb);
        for (int64_t b = 0; b < nb; b++)
            for (int64_t k = 0; k < T; k++) {
                for (int t = 0; t < 4; t++)
                    memcpy(qg + ((b * 4 + t) * T + k) * 4, tq + (k * nb + b) * 16 + 4 * t, 4);
                dg[b * T + k] = td[k * nb + b];
                mg[b * T + k] = tm[k * nb + b];
            }
    }
    free(tq);
    free(td);
    free(tm);
}

/* tile: 0 for plain rows, I4_TILE for a matrix tile_i4 rearranged */
void matvec_i4(const float *restrict x, const uint8_t *restrict q, const uint16_t *restrict d,
               const uint16_t *restrict m, float *restrict y, int64_t T, int64_t in,
               int64_t out, int64_t tile) {
    int64_t nb = in / 32;
    int8_t *xq = malloc((size_t)(T * in));
    float *xs = malloc(sizeof(float) * T * nb), *xsum = malloc(sizeof(float) * T * nb);
    for (int64_t t = 0; t < T; t++)
        quantize_x8(x + t * in, nb, xq + t * in, xs + t * nb, xsum + t * nb);
    #pragma omp parallel for schedule(static)   /* rows of x by fours share unpacked blocks */
    for (int64_t u = 0; u < i4_units(out, tile); u++) {
        int64_t o, n = i4_unit(u, out, tile, &o);
        for (int64_t k = 0; k < n; k++) prefetch_i4(q, o + k, in / 2, out);
        if (n > 1)
            dot_i4_tile_batch(q + o * (in / 2), d + o * nb, m + o * nb, xq, in, xs, xsum, nb,
                              T, nb, y + o, out);
        else
            dot_i4_batch(q + o * (in / 2), d + o * nb, m + o * nb, xq, in, xs, xsum, nb, T,
                         nb, y + o, out);
    }
    free(xq);
    free(xs);
    free(xsum);
}

/* fp32 -> bf16 bits, rounded to nearest even (as torch's .to(torch.bfloat16); no NaNs here) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One row's n dequantized values v out as fp32 (bf16 == 0) or bf16 bits (bf16 == 1). */
static inline void put_row(const float *v, int64_t n, void *w, int64_t at, int bf16) {
    if (bf16)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)w)[at + i] = f32_to_bf16(v[i]);
    else
        memcpy((float *)w + at, v, sizeof(float) * n);
}

/* w (rows, in) = n d + m of an int4 matrix (tile: as matvec_i4), in fp32 or (bf16 == 1)
 * bf16 bits: torch's prompt product runs on such a copy (weights.Weight, choices.py). */
void dequant_i4(const uint8_t *restrict q, const uint16_t *restrict d,
                const uint16_t *restrict m, void *restrict w, int64_t rows, int64_t in,
                int bf16, int64_t tile) {
    int64_t nb = in / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < rows; o++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t raw[16];
            float v[32], db, mb;
            i4_block_at(q, d, m, o, b, nb, rows, tile, raw, &db, &mb);
            dequant_i4_block(raw, db, mb, v);
            put_row(v, 32, w, o * in + b * 32, bf16);
        }
}

/* w (rows, in) = q times its group's scale, of an int8 matrix, in fp32 or bf16 bits. */
void dequant_i8(const int8_t *restrict q, const float *restrict scale, void *restrict w,
                int64_t rows, int64_t in, int64_t group, int bf16) {
    int64_t ng = (in + group - 1) / group;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < rows; o++)
        for (int64_t g = 0; g < ng; g++) {
            int64_t i1 = (g + 1) * group < in ? (g + 1) * group : in;
            float s = scale[o * ng + g], v[32];
            for (int64_t i0 = g * group; i0 < i1; i0 += 32) {   /* 32 columns at a time */
                int64_t n = i1 - i0 < 32 ? i1 - i0 : 32;
                for (int64_t i = 0; i < n; i++) v[i] = (float)q[o * in + i0 + i] * s;
                put_row(v, n, w, o * in + i0, bf16);
            }
        }
}

/* int4 with fp32 activations, for prompts: each block of 32 weights is dequantized once in
 * registers and used for up to TCH rows of x, so the products are the dequantized matrix's
 * (exact activations, no fp32 copy of the matrix in memory); tile: as matvec_i4. */
#define TCH 8
void matvec_i4_exact(const float *restrict x, const uint8_t *restrict q,
                     const uint16_t *restrict d, const uint16_t *restrict m, float *restrict y,
                     int64_t T, int64_t in, int64_t out, int64_t tile) {
    int64_t nb = in / 32;
    #pragma omp parallel for schedule(dynamic, 8)
    for (int64_t o = 0; o < out; o++) {
        for (int64_t t0 = 0; t0 < T; t0 += TCH) {
            int64_t nt = T - t0 < TCH ? T - t0 : TCH;
#if defined(__AVX512F__) && defined(HAVE_F16X8)
            __m512 acc[TCH][2];
            for (int t = 0; t < TCH; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                uint8_t bytes[16];
                float ds, ms;
                i4_block_at(q, d, m, o, b, nb, out, tile, bytes, &ds, &ms);
                __m128i raw = _mm_loadu_si128((const __m128i *)bytes);
                __m512 db = _mm512_set1_ps(ds), mb = _mm512_set1_ps(ms);
                __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                    _mm_and_si128(raw, _mm_set1_epi8(15))));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                    _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(15))));
                lo = _mm512_fmadd_ps(lo, db, mb);
                hi = _mm512_fmadd_ps(hi, db, mb);
                for (int t = 0; t < nt; t++) {
                    const float *xt = x + (t0 + t) * in + b * 32;
                    acc[t][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xt), acc[t][0]);
                    acc[t][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xt + 16), acc[t][1]);
                }
            }
            for (int t = 0; t < nt; t++)
                y[(t0 + t) * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
#else
            float acc[TCH][32];
            memset(acc, 0, sizeof(acc));
            for (int64_t b = 0; b < nb; b++) {
                uint8_t bytes[16];
                float w[32], ds, ms;
                i4_block_at(q, d, m, o, b, nb, out, tile, bytes, &ds, &ms);
                dequant_i4_block(bytes, ds, ms, w);
                for (int t = 0; t < nt; t++) {
                    const float *xt = x + (t0 + t) * in + b * 32;
                    for (int j = 0; j < 32; j++) acc[t][j] += w[j] * xt[j];
                }
            }
            for (int t = 0; t < nt; t++) {
                float s = 0.f;
                for (int j = 0; j < 32; j++) s += acc[t][j];
                y[(t0 + t) * out + o] = s;
            }
#endif
        }
    }
}
