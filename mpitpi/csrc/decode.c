/* The fused decode step: one call per layer half for B rows, each a token of its own
 * sequence at its own position and KV cache (a row_t), or drafted tokens of one sequence at
 * consecutive positions. Each row gets exactly the arithmetic it would get alone (B = 1):
 * per-row buffers keep the alignment of row 0, loops are split the same way for any B. So a
 * sequence decodes to the same numbers in a batch as alone. Per row:
 *
 *   decode_attn: h = rmsnorm(x) * w; qkv = Wqkv h (+b); rope on q and k; k, v appended to
 *                this rank's KV cache at pos; each query head attends over its KV head's
 *                keys [start, pos]; out = Wo o (+b): this rank's partial (dim,) sum.
 *   decode_mlp:  h = rmsnorm(x) * w; g, u = W13 h (+b); a = silu(g) * u; out = W2 a (+b).
 *
 * Python keeps the layer loop and the all-reduce of ``out``; everything between two
 * all-reduces is here, in one OpenMP parallel region per call (a world of one rank with
 * every layer resident runs all layers in one call and one region: decode_layers; norm_out
 * then norms the rows for the vocabulary product, the same way in either case). The
 * small per-row steps (norm, SiLU, quantising a product's input) are split by spans of the
 * row, so one row a step keeps every thread busy (span). Each thread streams its
 * own stretch of a product's rows, then takes what is left of the others' stretches in
 * chunks, so when one core is busy with other work the free threads take over its share
 * instead of waiting for it (product). Weights stay in their storage
 * dtype (a weight_t says which); scratch buffers come from the caller: nothing is allocated
 * per token. Attention takes the keys in blocks of ATT_BLOCK (a score buffer on the stack). */
#include <float.h>
#include <omp.h>

#include "common.h"

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_I8 = 3, W_I4 = 4 };

typedef struct {            /* one (rows, cols) matrix as stored, see weights.py */
    const void *data;       /* int4: (rows, cols / 2) bytes */
    const void *scale;      /* int8: (rows, ceil(cols / group)) fp32; int4: (rows, cols / 32)
                               fp16; else NULL */
    const uint16_t *min;    /* int4: (rows, cols / 32) fp16 offsets, else NULL */
    const float *bias;      /* (rows,) or NULL */
    int64_t rows, cols, dtype, group;
    int64_t tile;           /* int4, int8: TILE when tile_i4 / tile_i8 rearranged its rows,
                               else 0 */
    const float *steps;     /* int4 in coded tiles: tile_i4's rs (min then holds the rows
                               after the last tile alone), else NULL */
} weight_t;

typedef struct {            /* caller-owned buffers, sized for the largest use; per row: */
    float *h;               /* (dim,) the normed input */
    float *mid;             /* (n_q + 2 n_kv) hd for qkv, or 2 f for gate/up */
    float *act;             /* (n_q hd,) attention output, or (f,) silu(g) * u */
    int16_t *xq;            /* activations quantised for int8 weights, (max cols,), or to
                               int8 for int4 weights (the same buffer) */
    float *xs;              /* their per-group scales */
    float *xsum;            /* int4: per block, the scale times the sum of the block */
    int64_t sh, smid, sact, sxq, sxs;   /* row strides of each (multiples of 16 elements) */
    int64_t wide;           /* prompt rows: activations of int4 weights to int16, not int8
                               (quantize_x16; the same numbers as kernels.matvec's wide) */
} scratch_t;

typedef struct {            /* one row of a step: its token's place */
    void *cache_k, *cache_v;    /* its sequence's (n_kv, cap, hd) caches of this layer */
    const float *cos, *sin;     /* (hd,) rope tables at pos */
    int64_t cap, start, pos;    /* cache row stride; keys [start, pos] are attended */
    int64_t kv16;               /* the caches hold fp16 (raw bits), else fp32 */
} row_t;

/* y[b][o] = W[o] . x[b] (+ bias[o]) for weight rows [o0, o1) and each of B input rows
 * (x row stride xs, y row stride ys): a weight row is read once for all B. */
static void rows(const weight_t *w, const float *x, int64_t xs, int64_t B, const scratch_t *s,
                 float *y, int64_t ys, int64_t o0, int64_t o1) {
    int64_t in = w->cols, tiled = w->tile ? w->rows / w->tile * w->tile : 0;
    if (w->dtype == W_I4) {   /* groups of input rows share each unpacked block (tiles: 8) */
        int64_t nb = in / 32;
        for (int64_t o = o0, n; o < o1; o += n) {
            n = o < tiled ? w->tile : 1;   /* a whole tile: chunks start at tiles */
            const uint8_t *q = (const uint8_t *)w->data + o * (in / 2);
            const uint16_t *d = (const uint16_t *)w->scale + o * nb;
            const uint16_t *m = w->min + (w->steps && o >= tiled ? o - tiled : o) * nb;
            const float *rs = w->steps && n > 1 ? w->steps + 2 * o : NULL;   /* its group's */
            if (s->wide)
                (n > 1 ? dot_i4w_tile_batch : dot_i4w_batch)(q, d, m, s->xq, s->sxq, s->xs,
                                                             s->xsum, s->sxs, B, nb, y + o, ys,
                                                             NULL, rs);
            else {
                if (n == 1)   /* a tile's contiguous bytes stream faster without (matvec.c) */
                    prefetch_i4(w->data, o, in / 2, w->rows);
                (n > 1 ? dot_i4_tile_batch : dot_i4_batch)(q, d, m, (int8_t *)s->xq,
                                                           2 * s->sxq, s->xs, s->xsum, s->sxs,
                                                           B, nb, y + o, ys, NULL, rs);
            }
        }
    } else if (w->dtype == W_I8) {   /* groups of input rows share each widened block */
        int64_t ng = (in + w->group - 1) / w->group;
        for (int64_t o = o0, n; o < o1; o += n) {
            n = o < tiled ? w->tile : 1;
            (n > 1 ? dot_i8_tile_batch : dot_i8_batch)(
                (const int8_t *)w->data + o * in, (const float *)w->scale + o * ng, s->xq,
                s->sxq, s->xs, s->sxs, x, xs, B, in, w->group, in / w->group, y + o, ys);
        }
    } else {   /* float weights: groups of up to 4 input rows share each widened weight */
        int kind = w->dtype == W_F32 ? 0 : w->dtype == W_BF16 ? 1 : 2;
        size_t size = w->dtype == W_F32 ? 4 : 2;
        for (int64_t o = o0; o < o1; o++) {
            prefetch_float(w->data, o, in * size, w->rows, B);
            dot_float_batch(kind, (const char *)w->data + o * in * size, x, xs,
                            (const uint16_t *)s->xq, s->sxq, B, in, y + o, ys);
        }
    }
    if (w->bias)
        for (int64_t b = 0; b < B; b++)
            for (int64_t o = o0; o < o1; o++) y[b * ys + o] += w->bias[o];
}

#if defined(I4_TILE_PAIR)
/* One decode row (B = 1, int8 activations) against weight rows [a0, a1) and [b0, b1) of a
 * tiled int4 matrix: tile k of the one beside tile k of the other (dot_i4_tile_pair), then
 * what one has beyond the other and rows past the last tile as rows() takes them. The same
 * numbers as rows() over each range. */
static void rows_pair(const weight_t *w, const float *x, const scratch_t *s, float *y,
                      int64_t a0, int64_t a1, int64_t b0, int64_t b1) {
    int64_t tile = w->tile, tiled = w->rows / tile * tile, nb = w->cols / 32;
    int64_t na = ((a1 < tiled ? a1 : tiled) - a0) / tile, nt = ((b1 < tiled ? b1 : tiled) - b0) / tile;
    int64_t n = na < nt ? na : nt;
    n = n < 0 ? 0 : n;   /* (chunks start on tiles: a range starts at or before the last) */
    for (int64_t k = 0; k < n; k++) {
        const uint8_t *q[2];
        const uint16_t *d[2], *m[2];
        const float *rs[2];
        float *yk[2];
        for (int i = 0; i < 2; i++) {
            int64_t o = (i ? b0 : a0) + k * tile;
            q[i] = (const uint8_t *)w->data + o * (w->cols / 2);
            d[i] = (const uint16_t *)w->scale + o * nb;
            m[i] = w->steps ? NULL : w->min + o * nb;   /* coded tiles: no offsets here */
            rs[i] = w->steps ? w->steps + 2 * o : NULL;
            yk[i] = y + o;
        }
        dot_i4_tile_pair(q, d, m, rs, (const int8_t *)s->xq, s->xs, s->xsum, nb, yk);
    }
    for (int64_t k = 0; w->bias && k < n * tile; k++) {
        y[a0 + k] += w->bias[a0 + k];
        y[b0 + k] += w->bias[b0 + k];
    }
    rows(w, x, 0, 1, s, y, 0, a0 + n * tile, a1);
    rows(w, x, 0, 1, s, y, 0, b0 + n * tile, b1);
}
#endif

/* Whether w's product for B rows reads each thread's stretch as two streams (rows_pair): int4
 * tiles against one decode row on builds with dot_i4_tile_pair, while mpitpi_streams is 2. */
static int two_streams(const weight_t *w, int64_t B, const scratch_t *s) {
#if defined(I4_TILE_PAIR)
    return mpitpi_streams == 2 && w->dtype == W_I4 && w->tile && B == 1 && !s->wide;
#else
    (void)w, (void)B, (void)s;
    return 0;
#endif
}

/* Thread t of T's span [*e0, *e1) of a row of w's input (w->cols elements): split at
 * multiples of 256 (whole SILU_CHUNKs and groups of 4 int4 blocks, as quantize_x8 lays them
 * out), for int8 at multiples of its column groups as well. With one row per step, every
 * thread prepares its span of the row (norm, silu, quantisation) instead of one thread the
 * whole row while the others wait; each element, group or block gets the same arithmetic
 * whatever the split, so a row's numbers do not depend on it. */
#define SILU_CHUNK 256   /* silu(g) * u in pieces of this many, the same split for any B */
static void span(const weight_t *w, int64_t t, int64_t T, int64_t *e0, int64_t *e1) {
    int64_t a = SILU_CHUNK;
    if (w->dtype == W_I8)   /* the least common multiple with the group */
        for (int64_t g = w->group, k = a; ; k += a)
            if (k % g == 0) { a = k; break; }
    int64_t n = w->cols / a;
    *e0 = n * t / T * a;
    *e1 = t + 1 == T ? w->cols : n * (t + 1) / T * a;
}

/* Thread t of T quantizes its span of input row b (x: (cols,)) for w's kernels: int8
 * weights by their groups, int4 by blocks (int16 for prompt rows, else int8), bf16 weights
 * (BF16_DOT) to bf16; nothing for float weights. No barrier: the caller's. */
static void quantize_span(const weight_t *w, const float *x, const scratch_t *s, int64_t b,
                          int64_t t, int64_t T) {
    int64_t e0, e1;
    span(w, t, T, &e0, &e1);
    if (e1 <= e0)
        return;
    if (w->dtype == W_I8) {
        int64_t g0 = e0 / w->group;
        quantize_x(x + e0, e1 - e0, w->group, s->xq + b * s->sxq + e0, s->xs + b * s->sxs + g0);
    } else if (w->dtype == W_I4) {
        int64_t k0 = e0 / 32, nb = (e1 - e0) / 32;
        float *xs = s->xs + b * s->sxs + k0, *xsum = s->xsum + b * s->sxs + k0;
        if (s->wide)
            quantize_x16(x + e0, nb, s->xq + b * s->sxq + e0, xs, xsum);
        else   /* k0 and nb multiples of 4 but at the end: i4_slot's groups carry over */
            quantize_x8(x + e0, nb, (int8_t *)(s->xq + b * s->sxq) + e0, xs, xsum);
    }
#ifdef BF16_DOT
    else if (w->dtype == W_BF16)
        x_to_bf16(x + e0, e1 - e0, (uint16_t *)(s->xq + b * s->sxq) + e0);
#endif
}

/* Inside a parallel region, every thread: y[b] = W x[b] for B rows, weight rows handed out
 * in chunks. CHUNK_BYTES can be set at build time (CC wrapper passing -DCHUNK_BYTES=N) to
 * compare sizes on a host. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (512 * 1024)
#endif
/* How the threads of a product share its chunks: thread t owns chunks [n t / T, n (t + 1) / T)
 * and takes them in order, so each thread streams one contiguous stretch of the matrix (as
 * a static split: its prefetches run on across chunks); a thread done with its own stretch
 * takes the next chunks of the others' (through the same counters), so one slowed by other
 * work on its core is helped as with a dynamic schedule. claim: the caller's, CLAIM_STRIDE
 * int64 per thread of the team (a cache line each; CLAIM_WORDS sizes it), each thread's
 * stretch's next chunk. */
#define CLAIM_STRIDE 8
#define CLAIM_WORDS (omp_get_max_threads() * CLAIM_STRIDE)
/* w's rows in ``*chunk``-row chunks, ``*n`` of them; ``pairs``: read two at a time
 * (product_rows), so half as long, a pair the bytes of one chunk read alone: claims as long
 * as a whole chunk each left the threads waiting at the product's end twice as long */
static void chunking(const weight_t *w, int64_t T, int pairs, int64_t *chunk, int64_t *n) {
    int64_t c = w->rows / ((pairs ? 16 : 8) * T);
    /* at most 64 rows, or for int4 and int8 as many as make CHUNK_BYTES: longer chunks
     * keep each thread's stream going (the 1B shape: int8 3-6% and int4 5-7% faster than in
     * 64-row chunks, docs/BENCHMARKS.md); float weights keep 64 rows (2048 fp32 columns:
     * the same bytes) */
    int64_t row_bytes = w->dtype == W_I4 ? w->cols / 2 : w->cols;
    int64_t most = w->dtype == W_I4 || w->dtype == W_I8 ? CHUNK_BYTES / row_bytes : 64;
    most = pairs ? most / 2 : most;
    most = most < 64 ? 64 : most;
    c = c < 4 ? 4 : c > most ? most : c;
    if (w->tile)   /* int4 and int8 in tiles: whole tiles */
        c = (c + w->tile - 1) / w->tile * w->tile;
    *chunk = c;
    *n = (w->rows + c - 1) / c;
}

/* Before a product, every thread: its stretch's counter to the stretch's first chunk, and
 * its span of each input row quantized. The caller's barrier then separates this from
 * product_rows (and the previous product_rows' barrier from this: no thread still claims). */
static void product_start(const weight_t *w, const float *x, int64_t xs, int64_t B,
                          const scratch_t *s, int64_t *claim) {
    int64_t T = omp_get_num_threads(), t = omp_get_thread_num(), chunk, n;
    chunking(w, T, two_streams(w, B, s), &chunk, &n);
    claim[t * CLAIM_STRIDE] = n * t / T;
    for (int64_t b = 0; b < B; b++)
        quantize_span(w, x + b * xs, s, b, t, T);
}

/* Every thread: y[b] = W x[b] for B rows, its stretch's chunks then the others' (above);
 * ends with a barrier, after which y is complete. */
static void product_rows(const weight_t *w, const float *x, int64_t xs, int64_t B,
                         const scratch_t *s, float *y, int64_t ys, int64_t *claim) {
    int64_t T = omp_get_num_threads(), t = omp_get_thread_num(), chunk, n;
    int pairs = two_streams(w, B, s);
    chunking(w, T, pairs, &chunk, &n);
    for (int64_t k = 0; k < T; k++) {   /* its own stretch, then the others' in turn */
        int64_t u = (t + k) % T, start = n * u / T, end = n * (u + 1) / T;
        /* two streams: claim i < h takes chunks start + i and start + h + i together, the
         * last claim of an odd stretch its last chunk alone */
        int64_t h = pairs ? (end - start) / 2 : 0, last = end - h;
        for (int64_t c; (c = __atomic_fetch_add(claim + u * CLAIM_STRIDE, 1,
                                                __ATOMIC_RELAXED)) < last;) {
            int64_t o0 = (c < start + h ? c : c + h) * chunk;
            int64_t o1 = o0 + chunk < w->rows ? o0 + chunk : w->rows;
#if defined(I4_TILE_PAIR)
            if (c < start + h) {
                int64_t p0 = o0 + h * chunk, p1 = p0 + chunk < w->rows ? p0 + chunk : w->rows;
                rows_pair(w, x, s, y, o0, o1, p0, p1);
                continue;
            }
#endif
            rows(w, x, xs, B, s, y, ys, o0, o1);
        }
    }
    #pragma omp barrier
}

/* Inside a parallel region, every thread: y[b] = W x[b] for B rows (x complete). */
static void product(const weight_t *w, const float *x, int64_t xs, int64_t B,
                    const scratch_t *s, float *y, int64_t ys, int64_t *claim) {
    product_start(w, x, xs, B, s, claim);
    #pragma omp barrier
    product_rows(w, x, xs, B, s, y, ys, claim);
}

/* 1 / rms of x (n,) with eps: one out-of-line loop, so a row's scale is the same number
 * whichever thread computes it. */
static __attribute__((noinline)) float inv_rms(const float *x, float eps, int64_t n) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    return 1.f / sqrtf(ss / (float)n + eps);
}

/* h[i] = w[i] * (x[i] * r) for i in [i0, i1): a row's norm once its scale r is known */
static void scale_row(const float *x, const float *w, float r, int64_t i0, int64_t i1,
                      float *h) {
    for (int64_t i = i0; i < i1; i++) h[i] = w[i] * (x[i] * r);
}

/* Inside a parallel region, every thread: its span (for the product ``next``, whose
 * product_start quantizes the same span) of h[b] = rmsnorm(x[b]) * w for B rows (x: (B,
 * dim)), each row's scale computed by every thread itself. No barrier: the caller's. */
static void norm_rows(const float *x, const float *w, float eps, int64_t B, const scratch_t *s,
                      const weight_t *next) {
    int64_t T = omp_get_num_threads(), t = omp_get_thread_num(), dim = next->cols, i0, i1;
    span(next, t, T, &i0, &i1);
    for (int64_t b = 0; b < B; b++)
        scale_row(x + b * dim, w, inv_rms(x + b * dim, eps, dim), i0, i1, s->h + b * s->sh);
}

/* Rotate-half rope of one head in place; cos, sin: (hd,) at this position. */
static void rope(float *v, const float *cos, const float *sin, int64_t hd) {
    int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* One query head over keys [start, pos] of its KV head: o = softmax(q k^T / sqrt(hd)) v,
 * by blocks of ATT_BLOCK keys: their scores, the block's maximum (the sums so far rescaled
 * when it rises), the exponentials in one loop the compiler vectorises (libmvec), then the
 * values. The same steps for a row whatever the other rows are. Plain C (specialised for
 * 64- and 128-dim heads where there is no vector version below). The running maximum starts
 * at -FLT_MAX, not -INFINITY: -ffast-math lets the compiler assume there are no infinities;
 * the first block's rescale is then exp(-FLT_MAX - max) = 0 of nothing summed yet. */
#define ATT_BLOCK 64
#define ATTEND(NAME, HD, KT, KF)                                                          \
static void NAME(const float *q, const KT *keys, const KT *vals, int64_t start,             \
                 int64_t pos, int64_t hd_, float *o) {                                    \
    const int64_t hd = HD ? HD : hd_;                                                     \
    float m = -FLT_MAX, l = 0.f, scale = 1.f / sqrtf((float)hd), s[ATT_BLOCK];            \
    for (int64_t d = 0; d < hd; d++) o[d] = 0.f;                                          \
    for (int64_t p0 = start; p0 <= pos; p0 += ATT_BLOCK) {                                \
        int64_t n = pos + 1 - p0 < ATT_BLOCK ? pos + 1 - p0 : ATT_BLOCK;                  \
        float bm = m;                                                                     \
        for (int64_t j = 0; j < n; j++) {                                                 \
            const KT *k = keys + (p0 + j) * hd;                                           \
            float a = 0.f;                                                                \
            for (int64_t d = 0; d < hd; d++) a += KF(k[d]) * q[d];                        \
            s[j] = a * scale;                                                             \
            bm = s[j] > bm ? s[j] : bm;                                                   \
        }                                                                                 \
        if (bm > m) {             /* a new maximum: rescale what was summed so far */     \
            float c = expf(m - bm);                                                       \
            l *= c;                                                                       \
            for (int64_t d = 0; d < hd; d++) o[d] *= c;                                   \
            m = bm;                                                                       \
        }                                                                                 \
        for (int64_t j = 0; j < n; j++) s[j] = expf(s[j] - m);                            \
        for (int64_t j = 0; j < n; j++) {                                                 \
            const KT *v = vals + (p0 + j) * hd;                                           \
            l += s[j];                                                                    \
            for (int64_t d = 0; d < hd; d++) o[d] += s[j] * KF(v[d]);                     \
        }                                                                                 \
    }                                                                                     \
    for (int64_t d = 0; d < hd; d++) o[d] /= l;                                           \
}
#define AS_F32(v) (v)
ATTEND(attend_any, 0, float, AS_F32)
ATTEND(attend_any_h, 0, uint16_t, f16_to_f32)

/* The vector version: the same blocks, but the scores of VW keys at a time, each key's
 * products summed in its own register and the VW registers then summed lane-wise in one
 * fixed tree (sum_each: lane j is key j's score, whatever the other keys are), instead of
 * one horizontal sum per key; q (scaled once) and o stay in registers. C harness, 64-1000
 * keys, ns a key: 64-dim heads 5.4-5.6 -> 2.7-3.8 with AVX-512, 5.6-5.7 -> 3.7-4.1 with
 * AVX2; 128-dim heads (bound by their multiply-adds) 7.2-9.2 -> 6.0-8.3 with AVX-512, about
 * the same with AVX2 (docs/BENCHMARKS.md). */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vec_t;
#define V_LOAD _mm512_loadu_ps
#define V_LOADH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define V_STORE _mm512_storeu_ps
#define V_SET1 _mm512_set1_ps
#define V_ZERO _mm512_setzero_ps
#define V_MUL _mm512_mul_ps
#define V_FMA _mm512_fmadd_ps
/* 16 vectors -> one whose lane j is the sum of a[j]'s lanes */
static inline vec_t sum_each(const vec_t *a) {
    vec_t b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)   /* 128-bit lanes 0-1: a[2i]'s halves added; 2-3: a[2i+1]'s */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)   /* 128-bit lane k: vector 4i + k's four partial sums */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)   /* in 128-bit lane k: two sums of 4i + k, two of 4i + 4 + k */
        d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
    vec_t e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88),
                            _mm512_shuffle_ps(d[0], d[1], 0xDD));   /* lane 4k + i: 4i + k */
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12,
                                                  8, 4, 0), e);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VW 8
typedef __m256 vec_t;
#define V_LOAD _mm256_loadu_ps
#define V_LOADH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define V_STORE _mm256_storeu_ps
#define V_SET1 _mm256_set1_ps
#define V_ZERO _mm256_setzero_ps
#define V_MUL _mm256_mul_ps
#define V_FMA _mm256_fmadd_ps
/* 8 vectors -> one whose lane j is the sum of a[j]'s lanes */
static inline vec_t sum_each(const vec_t *a) {
    vec_t b[4], c[2];
    for (int i = 0; i < 4; i++)   /* 128-bit lane 0: a[2i]'s halves added; lane 1: a[2i+1]'s */
        b[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
    for (int i = 0; i < 2; i++)   /* lane 0: two sums of 4i and of 4i+2; lane 1: 4i+1, 4i+3 */
        c[i] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm256_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    vec_t e = _mm256_add_ps(_mm256_shuffle_ps(c[0], c[1], 0x88),
                            _mm256_shuffle_ps(c[0], c[1], 0xDD));  /* 0 2 4 6 | 1 3 5 7 */
    return _mm256_permutevar8x32_ps(e, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

#ifdef VW
#define ATTEND_V(NAME, HD, KT, LK)                                                        \
static void NAME(const float *q, const KT *keys, const KT *vals, int64_t start,             \
                 int64_t pos, int64_t hd_, float *o) {                                    \
    enum { NV = HD / VW };                                                                \
    float m = -FLT_MAX, l = 0.f, s[ATT_BLOCK] __attribute__((aligned(64)));               \
    vec_t qv[NV], acc[NV];                                                                \
    (void)hd_;                                                                            \
    for (int d = 0; d < NV; d++) {                                                        \
        qv[d] = V_MUL(V_LOAD(q + VW * d), V_SET1(1.f / sqrtf((float)HD)));                \
        acc[d] = V_ZERO();                                                                \
    }                                                                                     \
    for (int64_t p0 = start; p0 <= pos; p0 += ATT_BLOCK) {                                \
        int64_t n = pos + 1 - p0 < ATT_BLOCK ? pos + 1 - p0 : ATT_BLOCK;                  \
        float bm = m;                                                                     \
        for (int64_t j0 = 0; j0 < n; j0 += VW) {                                          \
            int64_t nj = n - j0 < VW ? n - j0 : VW;                                       \
            vec_t part[VW];       /* key j0 + j's products, summed over the head by lanes */ \
            for (int64_t j = 0; j < VW; j++) {                                            \
                if (j < nj) {                                                             \
                    const KT *k = keys + (p0 + j0 + j) * HD;                              \
                    vec_t t = V_MUL(LK(k), qv[0]);                                        \
                    for (int d = 1; d < NV; d++)                                          \
                        t = V_FMA(LK(k + VW * d), qv[d], t);                              \
                    part[j] = t;                                                          \
                } else                                                                    \
                    part[j] = V_ZERO();                                                   \
            }                                                                             \
            V_STORE(s + j0, sum_each(part));                                              \
            for (int64_t j = j0; j < j0 + nj; j++) bm = s[j] > bm ? s[j] : bm;            \
        }                                                                                 \
        if (bm > m) {             /* a new maximum: rescale what was summed so far */     \
            float c = expf(m - bm);                                                       \
            l *= c;                                                                       \
            for (int d = 0; d < NV; d++) acc[d] = V_MUL(acc[d], V_SET1(c));               \
            m = bm;                                                                       \
        }                                                                                 \
        for (int64_t j = 0; j < n; j++) s[j] = expf(s[j] - m);                            \
        for (int64_t j = 0; j < n; j++) {                                                 \
            const KT *v = vals + (p0 + j) * HD;                                           \
            l += s[j];                                                                    \
            for (int d = 0; d < NV; d++)                                                  \
                acc[d] = V_FMA(V_SET1(s[j]), LK(v + VW * d), acc[d]);                     \
        }                                                                                 \
    }                                                                                     \
    for (int d = 0; d < NV; d++) V_STORE(o + VW * d, V_MUL(acc[d], V_SET1(1.f / l)));     \
}
ATTEND_V(attend_64, 64, float, V_LOAD)
ATTEND_V(attend_128, 128, float, V_LOAD)
ATTEND_V(attend_64_h, 64, uint16_t, V_LOADH)
ATTEND_V(attend_128_h, 128, uint16_t, V_LOADH)
#else              /* plain C specialised for the size (NEON: gcc vectorises it) */
ATTEND(attend_64, 64, float, AS_F32)
ATTEND(attend_128, 128, float, AS_F32)
ATTEND(attend_64_h, 64, uint16_t, f16_to_f32)
ATTEND(attend_128_h, 128, uint16_t, f16_to_f32)
#endif

/* Query head q of row r over KV head h of its caches (fp32 or fp16) -> o (hd,). */
static void attend(const float *q, const row_t *r, int64_t h, int64_t hd, float *o) {
    int64_t off = h * r->cap * hd;
    if (r->kv16) {
        const uint16_t *k = (const uint16_t *)r->cache_k + off, *v = (const uint16_t *)r->cache_v + off;
        (hd == 64 ? attend_64_h : hd == 128 ? attend_128_h : attend_any_h)(q, k, v, r->start,
                                                                          r->pos, hd, o);
    } else {
        const float *k = (const float *)r->cache_k + off, *v = (const float *)r->cache_v + off;
        (hd == 64 ? attend_64 : hd == 128 ? attend_128 : attend_any)(q, k, v, r->start, r->pos,
                                                                      hd, o);
    }
}

/* Ask for the keys and values [start, pos] of KV head h of row r ahead of use: a head's
 * cache was last read a whole pass ago and comes from memory in short streams. */
static void prefetch_kv(const row_t *r, int64_t h, int64_t hd) {
    int64_t size = r->kv16 ? 2 : 4, bytes = (r->pos + 1 - r->start) * hd * size;
    int64_t at = (h * r->cap + r->start) * hd * size;
    for (int64_t c = 0; c < bytes; c += 64) {
        __builtin_prefetch((const char *)r->cache_k + at + c, 0, 3);
        __builtin_prefetch((const char *)r->cache_v + at + c, 0, 3);
    }
}

/* Item i of B rows x n_q query heads (row i / n_q, head i % n_q): its query q attends over
 * its row's caches into o. At the first query head of each KV head, the next item's KV
 * head (another head, or the next row) is asked for, so it arrives while this one runs. */
static void attend_item(const float *q, const row_t *r, int64_t i, int64_t B, int64_t n_q,
                        const int64_t *kv_of_q, int64_t hd, float *o) {
    int64_t b = i / n_q, j = i % n_q;
    if (j == 0 || kv_of_q[j] != kv_of_q[j - 1]) {
        int64_t n = i + 1;
        while (n < B * n_q && n / n_q == b && kv_of_q[n % n_q] == kv_of_q[j]) n++;
        if (n < B * n_q) prefetch_kv(r + n / n_q, kv_of_q[n % n_q], hd);
    }
    attend(q, r + b, kv_of_q[j], hd, o);
}

/* A new key or value (hd,) into position pos of KV head h of row r's cache: fp32 as it is,
 * or fp16 clamped to +-65504 and rounded to nearest even (model.py's torch writer does the
 * same, so a prompt row and a decode row store the same bits). */
static void store_kv(void *cache, const row_t *r, int64_t h, const float *src, int64_t hd) {
    int64_t at = (h * r->cap + r->pos) * hd, i = 0;
    if (!r->kv16) {
        memcpy((float *)cache + at, src, hd * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)cache + at;
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= hd; i += 8) {
        __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(src + i),
                                               _mm256_set1_ps(-65504.f)), _mm256_set1_ps(65504.f));
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    for (; i < hd; i++)
        dst[i] = f32_to_f16(src[i] < -65504.f ? -65504.f : src[i] > 65504.f ? 65504.f : src[i]);
}

/* x += out, inside the parallel region: a world of one rank has nothing to all-reduce. */
static void accumulate(float *x, const float *out, int64_t n) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] += out[i];
}

/* The attention half inside a parallel region, every thread. x: (B, dim) rows, r: (B,)
 * their places; kv_of_q: (n_q,) local KV head of each query head; out: (B, dim) this rank's
 * partial sums, also added into x when ``add`` is set. Rows of one sequence come in
 * position order: a row attends to the keys the rows before wrote. Ends with a barrier. */
static void attn_half(float *x, const float *norm, float eps, const weight_t *wqkv,
                      const weight_t *wo, const row_t *r, int64_t B, int64_t n_q,
                      int64_t n_kv, int64_t hd, const int64_t *kv_of_q, const scratch_t *s,
                      float *out, int64_t add, int64_t *claim) {
    int64_t dim = wqkv->cols, nh = n_q + n_kv;
    int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    norm_rows(x, norm, eps, B, s, wqkv);
    product_start(wqkv, s->h, s->sh, B, s, claim);
    #pragma omp barrier
    product_rows(wqkv, s->h, s->sh, B, s, s->mid, s->smid, claim);
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < B * nh; i++) {
        int64_t b = i / nh, j = i % nh;
        const row_t *rb = r + b;
        float *q = s->mid + b * s->smid, *k = q + n_q * hd, *v = k + n_kv * hd;
        if (j < n_q) {
            rope(q + j * hd, rb->cos, rb->sin, hd);
        } else {
            int64_t h = j - n_q;
            rope(k + h * hd, rb->cos, rb->sin, hd);
            store_kv(rb->cache_k, rb, h, k + h * hd, hd);
            store_kv(rb->cache_v, rb, h, v + h * hd, hd);
        }
    }
    /* each thread a contiguous run of the B n_q items (row, query head): whole KV heads'
     * query heads where they divide evenly, so a KV head is read by one core, and the one
     * after it asked for on the core that uses it (static against dynamic, 1B shape: 13 ->
     * 9 us a layer) */
    int64_t i0 = B * n_q * t / T, i1 = B * n_q * (t + 1) / T;
    if (i0 < i1)
        prefetch_kv(r + i0 / n_q, kv_of_q[i0 % n_q], hd);
    for (int64_t i = i0; i < i1; i++) {
        int64_t b = i / n_q, j = i % n_q;
        attend_item(s->mid + b * s->smid + j * hd, r, i, B, n_q, kv_of_q, hd,
                    s->act + b * s->sact + j * hd);
    }
    #pragma omp barrier
    product(wo, s->act, s->sact, B, s, out, dim, claim);
    if (add) accumulate(x, out, B * dim);
}

/* The FFN half inside a parallel region, every thread. x: (B, dim); out: (B, dim) this
 * rank's partial sums, added into x when ``add`` is set; w13 holds gate rows, then up rows.
 * Each thread computes silu(g) * u on its span of w2's input and quantizes that span: one
 * barrier between the products. Ends with a barrier. */
static void mlp_half(float *x, const float *norm, float eps, const weight_t *w13,
                     const weight_t *w2, int64_t B, const scratch_t *s, float *out,
                     int64_t add, int64_t *claim) {
    int64_t dim = w13->cols, f = w13->rows / 2, e0, e1;
    int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    norm_rows(x, norm, eps, B, s, w13);
    product_start(w13, s->h, s->sh, B, s, claim);
    #pragma omp barrier
    product_rows(w13, s->h, s->sh, B, s, s->mid, s->smid, claim);
    span(w2, t, T, &e0, &e1);   /* whole SILU_CHUNKs, the same pieces for any split */
    for (int64_t b = 0; b < B; b++) {
        const float *g = s->mid + b * s->smid, *u = g + f;
        float *a = s->act + b * s->sact;
        for (int64_t c0 = e0; c0 < e1; c0 += SILU_CHUNK) {
            int64_t c1 = c0 + SILU_CHUNK < f ? c0 + SILU_CHUNK : f;
            for (int64_t i = c0; i < c1; i++)
                a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
        }
    }
    product_start(w2, s->act, s->sact, B, s, claim);
    #pragma omp barrier
    product_rows(w2, s->act, s->sact, B, s, out, dim, claim);
    if (add) accumulate(x, out, B * dim);
}

/* One layer's attention half for B rows in one parallel region (attn_half). */
void decode_attn(float *x, const float *norm, float eps, const weight_t *wqkv,
                 const weight_t *wo, const row_t *r, int64_t B, int64_t n_q, int64_t n_kv,
                 int64_t hd, const int64_t *kv_of_q, const scratch_t *s, float *out,
                 int64_t add) {
    int64_t claim[CLAIM_WORDS];
    #pragma omp parallel
    attn_half(x, norm, eps, wqkv, wo, r, B, n_q, n_kv, hd, kv_of_q, s, out, add, claim);
}

/* One layer's FFN half for B rows in one parallel region (mlp_half). */
void decode_mlp(float *x, const float *norm, float eps, const weight_t *w13,
                const weight_t *w2, int64_t B, const scratch_t *s, float *out, int64_t add) {
    int64_t claim[CLAIM_WORDS];
    #pragma omp parallel
    mlp_half(x, norm, eps, w13, w2, B, s, out, add, claim);
}

/* A world of one rank with every layer in memory: layers [0, n) for the rows of a step in
 * one parallel region, each as attn_half then mlp_half with ``add`` set (the partial sums
 * go into x; there is nothing to all-reduce; accumulate's barrier orders each half before
 * the next norm). norms: (2 n) each layer's attention norm, then its FFN norm; w: (4 n) each
 * layer's wqkv, wo, w13, w2; r: (n, B) the rows' places in each layer (the DecodeStep's
 * table). The same arithmetic as a call per half from Python, the same numbers. */
void decode_layers(float *x, int64_t n, const float *const *norms, float eps,
                   const weight_t *w, const row_t *r, int64_t B, int64_t n_q, int64_t n_kv,
                   int64_t hd, const int64_t *kv_of_q, const scratch_t *s, float *out) {
    int64_t claim[CLAIM_WORDS];
    #pragma omp parallel
    for (int64_t i = 0; i < n; i++) {
        attn_half(x, norms[2 * i], eps, w + 4 * i, w + 4 * i + 1, r + i * B, B, n_q, n_kv,
                  hd, kv_of_q, s, out, 1, claim);
        mlp_half(x, norms[2 * i + 1], eps, w + 4 * i + 2, w + 4 * i + 3, B, s, out, 1,
                 claim);
    }
}

/* The fused step's last norm, one thread: out[b] = rmsnorm(x[b]) * w for B rows (x, out:
 * (B, dim)), each row by inv_rms and scale_row as the layers' norms. */
void norm_out(const float *x, const float *w, float eps, int64_t B, int64_t dim, float *out) {
    for (int64_t b = 0; b < B; b++)
        scale_row(x + b * dim, w, inv_rms(x + b * dim, eps, dim), 0, dim, out + b * dim);
}

/* matvec.c's products and lookups, which decode_token calls as kernels.py does */
void matvec_f32(const float *x, const float *w, float *y, int64_t T, int64_t in, int64_t out);
void matvec_bf16(const float *x, const uint16_t *w, float *y, int64_t T, int64_t in,
                 int64_t out);
void matvec_f16(const float *x, const uint16_t *w, float *y, int64_t T, int64_t in,
                int64_t out);
void matvec_i8(const float *x, const int8_t *w, const float *scale, float *y, int64_t T,
               int64_t in, int64_t out, int64_t group, int64_t tile);
void matvec_i4(const float *x, const uint8_t *q, const uint16_t *d, const uint16_t *m,
               const uint8_t *h, const float *rs, float *y, int64_t T, int64_t in,
               int64_t out, int64_t tile, int64_t wide);
void rows_i4(const uint8_t *q, const uint16_t *d, const uint16_t *m, const uint8_t *h,
             const float *rs, const int64_t *index, int64_t n, float *out, int64_t rows,
             int64_t in, int64_t tile);
void rows_i8(const int8_t *q, const float *scale, const int64_t *index, int64_t n, float *out,
             int64_t rows, int64_t in, int64_t group, int64_t tile);

typedef struct {            /* a vocabulary matrix: a weight_t, and int6's top-bit plane */
    weight_t w;
    const uint8_t *hi;      /* int6 (w.dtype W_I4, w.min NULL): (rows, cols / 4), else NULL */
} vocab_t;

typedef struct {            /* a world of one rank's whole step for B decode rows */
    float *x, *out, *h;     /* (B, dim) each: the rows, the layers' partial sums, normed x */
    float *logits;          /* (B, vocab) */
    const vocab_t *embed;   /* the rows' lookup; NULL: the caller wrote x */
    const vocab_t *head;    /* the vocabulary product */
    const float *const *norms;   /* the layer stack, as decode_layers takes it */
    const weight_t *w;
    int64_t n_layers, B, n_q, n_kv, hd;
    const int64_t *kv_of_q;
    const scratch_t *s;
    const float *norm;      /* (dim,) the final norm */
    float eps;
} token_t;

/* out (n, cols) fp32 = rows index[0..n) of v as weights.Weight.rows gives them: float
 * storage widened, int4 / int6 / int8 as rows_i4 / rows_i8 (kernels.rows; the caller
 * passes quantized matrices only when their rows are tiled, as Weight.rows sends to C). */
static void lookup(const vocab_t *v, const int64_t *index, int64_t n, float *out) {
    const weight_t *w = &v->w;
    int64_t in = w->cols;
    if (w->dtype == W_I4)
        rows_i4(w->data, w->scale, w->min, v->hi, w->steps, index, n, out, w->rows, in,
                w->tile);
    else if (w->dtype == W_I8)
        rows_i8(w->data, w->scale, index, n, out, w->rows, in, w->group, w->tile);
    else
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < in; c++) {
                int64_t at = index[i] * in + c;
                out[i * in + c] = w->dtype == W_F32 ? ((const float *)w->data)[at]
                                : w->dtype == W_BF16 ? bf16_to_f32(((const uint16_t *)w->data)[at])
                                : f16_to_f32(((const uint16_t *)w->data)[at]);
            }
}

/* y (B, rows) = x (B, cols) @ v.T as weights.Weight.__call__(x, decode=True, logits=True)
 * computes it with the kernels (no bias: a vocabulary has none). */
static void vocab_product(const vocab_t *v, const float *x, int64_t B, float *y) {
    const weight_t *w = &v->w;
    if (w->dtype == W_I4)
        matvec_i4(x, w->data, w->scale, w->min, v->hi, w->steps, y, B, w->cols, w->rows,
                  w->tile, 0);
    else if (w->dtype == W_I8)
        matvec_i8(x, w->data, w->scale, y, B, w->cols, w->rows, w->group, w->tile);
    else if (w->dtype == W_F32)
        matvec_f32(x, w->data, y, B, w->cols, w->rows);
    else if (w->dtype == W_BF16)
        matvec_bf16(x, w->data, y, B, w->cols, w->rows);
    else
        matvec_f16(x, w->data, y, B, w->cols, w->rows);
}

/* The index of the largest of y[0..n), the first of ties (numpy's argmax; NaN aside). */
static int64_t argmax(const float *y, int64_t n) {
    float m = y[0];
    for (int64_t i = 1; i < n; i++) m = y[i] > m ? y[i] : m;   /* vectorised */
    int64_t i = 0;
    while (i < n - 1 && y[i] != m) i++;
    return i;
}

/* A world of one rank with every layer in memory, greedy: the whole step for B decode rows
 * in one call. tokens (B,) are looked up into x (unless t->embed is NULL), run through every
 * layer (decode_layers, r: its (n_layers, B) places), normed (norm_out), multiplied by the
 * vocabulary (vocab_product) and best (B,) gets each row's argmax: the numbers and tokens
 * of the calls kernels.py makes one by one, without Python between them (after the weights
 * have streamed through the caches, each Python step between two calls ran cold). */
void decode_token(const token_t *t, const int64_t *tokens, const row_t *r, int64_t *best) {
    int64_t B = t->B, dim = t->w[0].cols, vocab = t->head->w.rows;
    if (t->embed)
        lookup(t->embed, tokens, B, t->x);
    decode_layers(t->x, t->n_layers, t->norms, t->eps, t->w, r, B, t->n_q, t->n_kv, t->hd,
                  t->kv_of_q, t->s, t->out);
    norm_out(t->x, t->norm, t->eps, B, dim, t->h);
    vocab_product(t->head, t->h, B, t->logits);
    for (int64_t b = 0; b < B; b++)
        best[b] = argmax(t->logits + b * vocab, vocab);
}

/* Prompt rows' attention, each row as the decode step attends it alone (the same loop, so
 * a row's numbers do not depend on the other rows of its chunk): q (T, n_q, hd) with rope
 * applied; row t attends keys [r[t].start, r[t].pos] of its KV head in r[t]'s cache,
 * written before the call; out (T, n_q hd). */
void attend_rows(const float *q, const row_t *r, int64_t T, int64_t n_q, int64_t hd,
                 const int64_t *kv_of_q, float *out) {
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < T * n_q; i++)
        attend_item(q + i * hd, r, i, T, n_q, kv_of_q, hd, out + i * hd);
}
