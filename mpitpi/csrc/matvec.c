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

int mpitpi_prefetch = 7;
int mpitpi_streams = 2;

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

/* Groups of rows a product hands out: each full group of ``tile`` rows (tile_i4, tile_i8),
 * then each row after them. Unit u covers rows [*o0, *o0 + its count). */
static inline int64_t tile_units(int64_t rows, int64_t tile) {
    return tile ? rows / tile + rows % tile : rows;
}
static inline int64_t tile_unit(int64_t u, int64_t rows, int64_t tile, int64_t *o0) {
    int64_t full = tile ? rows / tile : 0;
    *o0 = u < full ? u * tile : full * tile + (u - full);
    return u < full ? tile : 1;
}

/* tile: 0 for plain rows, TILE for a matrix tile_i8 rearranged */
void matvec_i8(const float *restrict x, const int8_t *restrict w, const float *restrict scale,
               float *restrict y, int64_t T, int64_t in, int64_t out, int64_t group,
               int64_t tile) {
    int64_t n_groups = (in + group - 1) / group, full = in / group;
    int16_t *xq = malloc(sizeof(int16_t) * T * in);
    float *xs = malloc(sizeof(float) * T * n_groups);
    for (int64_t t = 0; t < T; t++)
        quantize_x(x + t * in, in, group, xq + t * in, xs + t * n_groups);
    #pragma omp parallel for schedule(static)   /* rows of x by fours share widened weights */
    for (int64_t u = 0; u < tile_units(out, tile); u++) {
        int64_t o, n = tile_unit(u, out, tile, &o);
        (n > 1 ? dot_i8_tile_batch : dot_i8_batch)(w + o * in, scale + o * n_groups, xq, in,
                                                   xs, n_groups, x, in, T, in, group, full,
                                                   y + o, out);
    }
    free(xq);
    free(xs);
}

/* An int8 matrix's full groups of TILE rows, written as plain rows (w (rows, in), scale
 * (rows, in / group) fp32; in a whole number of groups of at most I8_TILE_GROUP), rearranged
 * in place into tiles (common.h). One thread, as tile_i4. */
void tile_i8(int8_t *w, float *scale, int64_t rows, int64_t in, int64_t group) {
    const int64_t T = TILE ? TILE : 1, ng = in / group;   /* 1: never used, no division by 0 */
    if (!TILE || rows < T || in % group || group > I8_TILE_GROUP)
        return;
    int8_t *tw = malloc((size_t)(T * in));
    float *ts = malloc(sizeof(float) * T * ng);
    for (int64_t g = 0; g < rows / T; g++) {
        int8_t *wg = w + g * T * in;
        float *sg = scale + g * T * ng;
        memcpy(tw, wg, (size_t)(T * in));
        memcpy(ts, sg, sizeof(float) * T * ng);
        for (int64_t k = 0; k < T; k++) {
            for (int64_t p = 0; p < in / 2; p++)
                memcpy(wg + (p * T + k) * 2, tw + k * in + 2 * p, 2);
            for (int64_t j = 0; j < ng; j++) sg[j * T + k] = ts[k * ng + j];
        }
    }
    free(tw);
    free(ts);
}

/* The number of rows of a tile in this build (0: int4 and int8 matrices keep plain rows) */
int64_t weight_tile(void) { return TILE; }

/* 1 where int6 tiles' decode rows take int8 activations (dot_i6_tile), else 0: int16 */
int64_t int6_decode_int8(void) {
#if defined(I6_NARROW)
    return 1;
#else
    return 0;
#endif
}

/* Coded tiles (quant.py): the smallest step F 2^e >= x with F in 4..7 and e >= -24, and the
 * step after s. A code of at most 8 bits times such a step has at most 11 significant bits,
 * so it is a value of fp16 and of fp32 exactly. */
static float code_step(float x) {   /* x rounded up to 3 significant bits, at least 2^-22 */
    const float least = 0x1p-22f;
    if (!(x > least))
        return least;
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + (1u << 21) - 1) & ~((1u << 21) - 1);   /* a carry out of the mantissa: 8 -> 4 */
    memcpy(&x, &u, 4);
    return x;
}
static float next_step(float s) {   /* s has 3 significant bits: the next such float */
    uint32_t u;
    memcpy(&u, &s, 4);
    u += 1u << 21;
    memcpy(&s, &u, 4);
    return s;
}

/* A row's nb fp16 values v as integer codes in [lo, hi] times one step: *step, or 0 where no
 * step of the first eight from the values' largest magnitude holds them all (a GGUF file's
 * blocks: arbitrary fp16); the codes go to code (nb bytes, as int8 where lo < 0). x: room for
 * nb floats. Loops without early exits, which the compiler vectorises: the layer prefetcher
 * tiles every streamed layer again per token. */
static int row_codes(const uint16_t *v, int64_t nb, int lo, int hi, float *step, float *x,
                     uint8_t *code) {
    float top = 0.f;
    int64_t b0 = 0;
#if defined(HAVE_F16X8)
    for (; b0 + 8 <= nb; b0 += 8) _mm256_storeu_ps(x + b0, f16x8(v + b0));
#endif
    for (int64_t b = b0; b < nb; b++) x[b] = f16_to_f32(v[b]);
    for (int64_t b = 0; b < nb; b++) top = fmaxf(top, fabsf(x[b]));
    /* quant.py's steps: the least at or above top / hi (in double: -ffast-math divides by
     * a reciprocal, and a float one can land above a step that top / hi equals) */
    float s = code_step((float)((double)top / (double)hi));
    for (int tries = 0; tries < 8; tries++, s = next_step(s)) {
        float inv = 1.f / s, lo_c = 0.f, hi_c = 0.f, off = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            float c = rintf(x[b] * inv);
            lo_c = fminf(lo_c, c);
            hi_c = fmaxf(hi_c, c);
            off = fmaxf(off, fabsf(c * s - x[b]));
        }
        if (lo_c >= (float)lo && hi_c <= (float)hi && off == 0.f) {
            for (int64_t b = 0; b < nb; b++) code[b] = (uint8_t)(int)rintf(x[b] * inv);
            *step = s;
            return 1;
        }
    }
    return 0;
}

/* An int4 (or int6) matrix's full groups of TILE rows, written as plain rows (q (rows,
 * in / 2), d and m (rows, in / 32); int6: m NULL and h (rows, in / 8)), rearranged in place
 * into tiles (common.h). With rs ((rows / TILE) 2 TILE fp32, which may lie in m's tiled rows:
 * in / 32 >= 4 gives them room) and an int4 matrix whose tiled rows' scales are unsigned
 * 8-bit codes and offsets signed ones, each times a step of the row (quant.py's coded rows),
 * the tiles are coded: block b of group g holds, in d's bytes at (g nb + b) 2 TILE, the rows'
 * TILE scale codes then their TILE offset codes; rs gets group g's TILE scale steps then its
 * TILE offset steps at g 2 TILE, and m's tiled rows are no longer read (the rows after the
 * last group keep theirs). Returns 1 when it coded the tiles. One thread: it runs beside the
 * model's compute (the layer prefetcher). */
int64_t tile_i4(uint8_t *q, uint16_t *d, uint16_t *m, uint8_t *h, int64_t rows, int64_t in,
                float *rs) {
    const int64_t T = TILE ? TILE : 1, nb = in / 32;   /* as tile_i8 */
    if (!TILE || rows < T)
        return 0;
    int coded = rs && m && !h && nb >= 4;
    float *st = coded ? malloc(sizeof(float) * rows / T * 2 * T) : NULL;   /* rs, once m is read */
    float *x = coded ? malloc(sizeof(float) * nb) : NULL;
    uint8_t *dc = coded ? malloc((size_t)(rows * nb)) : NULL;   /* codes, plain rows */
    uint8_t *mc = coded ? malloc((size_t)(rows * nb)) : NULL;
    for (int64_t o = 0; coded && o < rows / T * T; o++) {
        float *at = st + o / T * 2 * T + o % T;
        coded = row_codes(d + o * nb, nb, 0, 255, at, x, dc + o * nb) &&
                row_codes(m + o * nb, nb, -128, 127, at + T, x, mc + o * nb);
    }
    free(x);
    uint8_t *tq = malloc((size_t)(T * nb * 16)), *th = malloc((size_t)(T * nb * 8));
    uint16_t *td = malloc(sizeof(uint16_t) * T * nb), *tm = malloc(sizeof(uint16_t) * T * nb);
    for (int64_t g = 0; g < rows / T; g++) {
        uint8_t *qg = q + g * T * nb * 16, *hg = h ? h + g * T * nb * 8 : NULL;
        uint16_t *dg = d + g * T * nb, *mg = m ? m + g * T * nb : NULL;
        memcpy(tq, qg, (size_t)(T * nb * 16));
        memcpy(td, dg, sizeof(uint16_t) * T * nb);
        if (mg)
            memcpy(tm, mg, sizeof(uint16_t) * T * nb);
        if (hg)
            memcpy(th, hg, (size_t)(T * nb * 8));
        for (int64_t b = 0; b < nb; b++)
            for (int64_t k = 0; k < T; k++) {
                for (int t = 0; t < 4; t++)
                    memcpy(qg + ((b * 4 + t) * T + k) * 4, tq + (k * nb + b) * 16 + 4 * t, 4);
                for (int u = 0; hg && u < 2; u++)   /* int6: chunk u, row k's bytes 4u.. */
                    memcpy(hg + ((b * 2 + u) * T + k) * 4, th + (k * nb + b) * 8 + 4 * u, 4);
                if (coded) {
                    uint8_t *c = (uint8_t *)dg + b * 2 * T;
                    c[k] = dc[(g * T + k) * nb + b];
                    c[T + k] = mc[(g * T + k) * nb + b];
                    continue;
                }
                dg[b * T + k] = td[k * nb + b];
                if (mg)
                    mg[b * T + k] = tm[k * nb + b];
            }
    }
    if (coded)   /* m's tiled rows were read: rs may take their place */
        memcpy(rs, st, sizeof(float) * rows / T * 2 * T);
    free(st);
    free(dc);
    free(mc);
    free(tq);
    free(th);
    free(td);
    free(tm);
    return coded;
}

#if defined(I6_NARROW)
/* One plain int6 row (the layout of quant.py; q, d, h at the row's start) against one row of
 * int8 activations (quantize_x8: i4_slot order; xsum times -32, as matvec_i4 passes it):
 * the numbers dot_i6_tile gives a row of a tile (the same exact integer sums, then the same
 * float steps block by block), so that a vocabulary row gets them whether a rank's slice puts
 * it in a tile or after the last one. These are at most TILE - 1 rows a matrix: plain C. */
static float dot_i6_row(const uint8_t *q, const uint16_t *d, const uint8_t *h,
                        const int8_t *xq, const float *xs, const float *xsum, int64_t nb) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t p = 0;
        for (int j = 0; j < 16; j++) {   /* q byte j: columns j and j + 16 */
            int field = h[b * 8 + (j & 7)] >> (j < 8 ? 0 : 4);
            int lo = (q[b * 16 + j] & 15) | (field & 3) << 4;
            int hi = q[b * 16 + j] >> 4 | (field >> 2 & 3) << 4;
            p += lo * xq[i4_slot(b, j, nb)] + hi * xq[i4_slot(b, j + 16, nb)];
        }
        float dv = f16_to_f32(d[b]);
        acc = fmaf((float)p, dv * xs[b], acc);
        acc = fmaf(dv, xsum[b], acc);
        __asm__("" : "+x"(acc));   /* block by block, in order, as the tile's lanes */
    }
    return acc;
}
#endif

/* tile: 0 for plain rows, TILE for a matrix tile_i4 rearranged; wide: x in int16 per block
 * (quantize_x16: prompt rows and logits), else int8 (quantize_x8: decode). h: NULL for int4;
 * int6's top-bit plane (m unused, NULL), with the offset -32 d of every block taken as m = d
 * against xsum times -32 (both exact): always wide, except decode rows where the build has
 * dot_i6_tile (I6_NARROW) and the matrix is tiled or has fewer rows than a tile: its tiles
 * and dot_i6_row for the rows after them. rs: a coded matrix's steps (tile_i4; m then holds
 * the offsets of the rows after the last tile alone), else NULL. */
void matvec_i4(const float *restrict x, const uint8_t *restrict q, const uint16_t *restrict d,
               const uint16_t *m, const uint8_t *restrict h, const float *rs,
               float *restrict y, int64_t T,
               int64_t in, int64_t out, int64_t tile, int64_t wide) {
    int64_t nb = in / 32, full = tile ? out / tile * tile : 0;
#if defined(I6_NARROW)
    /* int6 decode rows of a tiled matrix (or one too small to tile): int8 activations */
    int narrow6 = h && !wide && (full || out < TILE);
#else
    int narrow6 = 0;
#endif
    if (h) {
        wide = !narrow6;
        m = d;
    }
    void *xq = malloc((size_t)(T * in) * (wide ? 2 : 1));
    float *xs = malloc(sizeof(float) * T * nb), *xsum = malloc(sizeof(float) * T * nb);
    for (int64_t t = 0; t < T; t++)
        if (wide)
            quantize_x16(x + t * in, nb, (int16_t *)xq + t * in, xs + t * nb, xsum + t * nb);
        else
            quantize_x8(x + t * in, nb, (int8_t *)xq + t * in, xs + t * nb, xsum + t * nb);
    for (int64_t i = 0; h && i < T * nb; i++) xsum[i] *= -32.f;
    /* rows of x by fours share unpacked blocks. Tiles handed out 32 at a time, not in one
     * stretch a thread: the 1B shape's int6 vocabulary (213 MB), 1 rank, 2 threads, the
     * tiles leaving reads ahead to the hardware (lookahead.py), in one process alternating
     * with the static split: 0.90-0.92x the time (16, 32 or 64 at a time), the token
     * 0.94-0.98x; the two builds swapped every 16 tokens (jobs/ab_kernels.py, 30 rounds)
     * 0.985x, 0.96x in the slower half of the rounds (a core slowed by a neighbour is
     * helped), 1.007x in the faster. int8 (matvec_i8), whose tiles ask ahead, took 1.04x
     * so: it stays static. */
    /* one decode row of a tiled matrix: two streams (as decode.c's rows_pair), tile v beside
     * tile v + P, the two halves of the matrix read side by side, P pairs handed out 16 at a
     * time (a claim the bytes of 32 tiles, as below); then the tile left over and the rows
     * after the tiles. */
    int64_t P = 0;
#if defined(I4_TILE_PAIR)
#if defined(I6_TILE_PAIR)
    const int pair6 = 1;
#else
    const int pair6 = 0;   /* int6 keeps one stream */
#endif
    if (T == 1 && !wide && mpitpi_streams == 2 && (pair6 || !h))
        P = tile ? full / tile / 2 : 0;
    #pragma omp parallel for schedule(dynamic, 16)
    for (int64_t v = 0; v < P; v++) {
        const uint8_t *qk[2], *hk[2];
        const uint16_t *dk[2], *mk[2];
        const float *rk[2];
        float *yk[2];
        for (int k = 0; k < 2; k++) {
            int64_t o = (v + k * P) * tile;
            qk[k] = q + o * (in / 2);
            dk[k] = d + o * nb;
            mk[k] = rs ? NULL : m + o * nb;   /* coded tiles: no offsets here */
            hk[k] = h ? h + o * nb * 8 : NULL;
            rk[k] = rs ? rs + 2 * o : NULL;
            yk[k] = y + o;
        }
#if defined(I6_TILE_PAIR)
        if (h) {
            dot_i6_tile_pair(qk, dk, hk, xq, xs, xsum, nb, yk);
            continue;
        }
#endif
        (void)hk;
        dot_i4_tile_pair(qk, dk, mk, rk, xq, xs, xsum, nb, yk);
    }
#endif
    #pragma omp parallel for schedule(dynamic, 32)
    for (int64_t u = 2 * P; u < tile_units(out, tile); u++) {
        int64_t o, n = tile_unit(u, out, tile, &o);
        const uint8_t *qo = q + o * (in / 2);
        const uint16_t *dq = d + o * nb, *mq = m + (rs && o >= full ? o - full : o) * nb;
        const float *ro = rs && n > 1 ? rs + 2 * o : NULL;   /* group o / n: 2 n steps */
#if defined(I6_NARROW)
        if (narrow6) {
            if (n > 1)
                dot_i6_tile_batch(qo, dq, mq, xq, in, xs, xsum, nb, T, nb, y + o, out,
                                  h + o * nb * 8, NULL);
            else   /* a row after the last tile */
                for (int64_t t = 0; t < T; t++)
                    y[t * out + o] = dot_i6_row(qo, dq, h + o * nb * 8, (int8_t *)xq + t * in,
                                                xs + t * nb, xsum + t * nb, nb);
            continue;
        }
#endif
        if (wide)
            (n > 1 ? dot_i4w_tile_batch : dot_i4w_batch)(qo, dq, mq, xq, in, xs, xsum, nb, T,
                                                         nb, y + o, out, h ? h + o * nb * 8
                                                                           : NULL, ro);
        else {
            if (n == 1)   /* a tile's rows lie together: prefetches measured slower there
                           * (67 MB of int4 tiles, 1 thread: 3.8-4.7 ms without, 5.2-7.0 with) */
                prefetch_i4(q, o, in / 2, out);
            (n > 1 ? dot_i4_tile_batch : dot_i4_batch)(qo, dq, mq, xq, in, xs, xsum, nb, T, nb,
                                                       y + o, out, NULL, ro);
        }
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

/* Every thread's room for one unit's rows (i4_unit_rows) */
typedef struct { uint8_t *q, *h; float *d, *m; } i4_buf_t;
static i4_buf_t i4_buf(int64_t nb) {
    int64_t n = TILE ? TILE : 1;
    i4_buf_t b = {malloc((size_t)(n * nb * 16)), malloc((size_t)(n * nb * 8)),
                  malloc(sizeof(float) * n * nb), malloc(sizeof(float) * n * nb)};
    return b;
}
static void i4_buf_free(i4_buf_t b) {
    free(b.q);
    free(b.h);
    free(b.d);
    free(b.m);
}

/* Block b's scale and offset of weight row o of an int4 or int6 matrix (h, m as matvec_i4;
 * rs: coded tiles; full: the rows in tiles of tile rows) in fp32: where a tile holds it, and
 * int6's offset -32 d. */
static void i4_scale_at(const uint16_t *d, const uint16_t *m, const float *rs, int64_t o,
                        int64_t b, int64_t nb, int64_t tile, int64_t full, float *dv,
                        float *mv) {
    if (o < full) {
        int64_t g = o / tile, k = o % tile;
        if (rs) {
            const int8_t *c = (const int8_t *)(d + g * tile * nb) + b * 2 * tile;
            *dv = (float)(uint8_t)c[k] * rs[g * 2 * tile + k];
            *mv = (float)c[tile + k] * rs[g * 2 * tile + tile + k];
            return;
        }
        *dv = f16_to_f32(d[(g * nb + b) * tile + k]);
        *mv = m ? f16_to_f32(m[(g * nb + b) * tile + k]) : -32.f * *dv;
        return;
    }
    *dv = f16_to_f32(d[o * nb + b]);
    *mv = m ? f16_to_f32(m[(rs ? o - full : o) * nb + b]) : -32.f * *dv;
}

/* Rows [o, o + n) of an int4 (int6: h, m NULL) matrix, one unit of tile_unit, in the row
 * layout: a whole tile's bytes are copied out of its tiles into buf, plain rows pointed at
 * where they lie; every row's scales and offsets in fp32 (buf). *r: the rows' bytes, top
 * bits (NULL where the matrix has none), scales and offsets. */
static void i4_unit_rows(const uint8_t *q, const uint8_t *h, const uint16_t *d,
                         const uint16_t *m, const float *rs, int64_t o, int64_t n, int64_t nb,
                         int64_t rows, int64_t tile, i4_buf_t buf, i4_buf_t *r) {
    int64_t full = tile ? rows / tile * tile : 0;
    *r = (i4_buf_t){(uint8_t *)q + o * nb * 16, h ? (uint8_t *)h + o * nb * 8 : NULL, buf.d,
                    buf.m};
    for (int64_t k = 0; k < n; k++)
        for (int64_t b = 0; b < nb; b++)
            i4_scale_at(d, m, rs, o + k, b, nb, tile, full, buf.d + k * nb + b,
                        buf.m + k * nb + b);
    if (n == 1)
        return;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t k = 0; k < n; k++) {
            for (int t = 0; t < 4; t++)
                memcpy(buf.q + (k * nb + b) * 16 + 4 * t, r->q + ((b * 4 + t) * n + k) * 4, 4);
            for (int u = 0; h && u < 2; u++)
                memcpy(buf.h + (k * nb + b) * 8 + 4 * u, r->h + ((b * 2 + u) * n + k) * 4, 4);
        }
    r->q = buf.q;
    r->h = h ? buf.h : NULL;
}

/* out (n, in) fp32 = rows index[0..n) of an int4 matrix (int6: h, m NULL; tile, rs: as
 * matvec_i4), the numbers dequant_i4 gives them. */
void rows_i4(const uint8_t *q, const uint16_t *d, const uint16_t *m, const uint8_t *h,
             const float *rs, const int64_t *index, int64_t n, float *out, int64_t rows,
             int64_t in, int64_t tile) {
    int64_t nb = in / 32, full = tile ? rows / tile * tile : 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t o = index[i];
        for (int64_t b = 0; b < nb; b++) {
            uint8_t raw[16], top[8];
            int64_t at = o * nb + b;   /* plain rows: the block */
            const uint8_t *p = q + at * 16, *hp = h ? h + at * 8 : NULL;
            if (o < full) {            /* a tile: 4 chunks of 4 tile bytes, this row at 4 k */
                int64_t g = o / tile, k = o % tile;
                for (int t = 0; t < 4; t++)
                    memcpy(raw + 4 * t, q + (g * nb + b) * 16 * tile + (t * tile + k) * 4, 4);
                for (int u = 0; h && u < 2; u++)   /* int6: 2 chunks (tile_i4) */
                    memcpy(top + 4 * u, h + (g * nb + b) * 8 * tile + (u * tile + k) * 4, 4);
                p = raw;
                hp = h ? top : NULL;
            }
            float dv, mv;
            i4_scale_at(d, m, rs, o, b, nb, tile, full, &dv, &mv);
            dequant_i4_block(p, hp, dv, mv, out + i * in + b * 32);
        }
    }
}

/* w (rows, in) = n d + m of an int4 matrix ((n - 32) d of an int6 one: h, m NULL; tile, rs:
 * as matvec_i4), in fp32 or (bf16 == 1)
 * bf16 bits: torch's prompt product runs on such a copy (weights.Weight, choices.py). */
void dequant_i4(const uint8_t *restrict q, const uint16_t *restrict d,
                const uint16_t *restrict m, const uint8_t *restrict h, const float *rs,
                void *restrict w, int64_t rows, int64_t in, int bf16, int64_t tile) {
    int64_t nb = in / 32;
    #pragma omp parallel
    {
        i4_buf_t buf = i4_buf(nb);
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < tile_units(rows, tile); u++) {
            int64_t o, n = tile_unit(u, rows, tile, &o);
            i4_buf_t r;
            i4_unit_rows(q, h, d, m, rs, o, n, nb, rows, tile, buf, &r);
            for (int64_t k = 0; k < n; k++)
                for (int64_t b = 0; b < nb; b++) {
                    float v[32];
                    const uint8_t *hb = r.h ? r.h + (k * nb + b) * 8 : NULL;
                    dequant_i4_block(r.q + (k * nb + b) * 16, hb, r.d[k * nb + b],
                                     r.m[k * nb + b], v);
                    put_row(v, 32, w, (o + k) * in + b * 32, bf16);
                }
        }
        i4_buf_free(buf);
    }
}

/* out (n, in) fp32 = rows index[0..n) of an int8 matrix (tile: as matvec_i8), the numbers
 * dequant_i8 gives them: an embedding lookup in a tiled vocabulary. */
void rows_i8(const int8_t *q, const float *scale, const int64_t *index, int64_t n, float *out,
             int64_t rows, int64_t in, int64_t group, int64_t tile) {
    int64_t ng = (in + group - 1) / group;
    int8_t *row = malloc((size_t)in);
    float *s = malloc(sizeof(float) * ng);
    for (int64_t i = 0; i < n; i++) {
        i8_row_at(q, scale, index[i], rows, in, ng, tile, row, s);
        for (int64_t c = 0; c < in; c++) out[i * in + c] = (float)row[c] * s[c / group];
    }
    free(row);
    free(s);
}

/* w (rows, in) = q times its group's scale, of an int8 matrix (tile: as matvec_i8), in fp32
 * or bf16 bits. */
void dequant_i8(const int8_t *restrict q, const float *restrict scale, void *restrict w,
                int64_t rows, int64_t in, int64_t group, int bf16, int64_t tile) {
    int64_t ng = (in + group - 1) / group;
    #pragma omp parallel
    {
        int8_t *row = malloc((size_t)in);
        float *s = malloc(sizeof(float) * ng);
        #pragma omp for schedule(static)
        for (int64_t o = 0; o < rows; o++) {
            i8_row_at(q, scale, o, rows, in, ng, tile, row, s);
            for (int64_t g = 0; g < ng; g++) {
                int64_t i1 = (g + 1) * group < in ? (g + 1) * group : in;
                float v[32];
                for (int64_t i0 = g * group; i0 < i1; i0 += 32) {   /* 32 columns at a time */
                    int64_t n = i1 - i0 < 32 ? i1 - i0 : 32;
                    for (int64_t i = 0; i < n; i++) v[i] = (float)row[i0 + i] * s[g];
                    put_row(v, n, w, o * in + i0, bf16);
                }
            }
        }
        free(row);
        free(s);
    }
}
