/* The fused decode step: one call per layer half for one new token (T = 1).
 *
 *   decode_attn: h = rmsnorm(x) * w; qkv = Wqkv h (+b); rope on q and k; k, v appended to
 *                this rank's KV cache at pos; each query head attends over its KV head's
 *                keys [start, pos]; out = Wo o (+b): this rank's partial (dim,) sum.
 *   decode_mlp:  h = rmsnorm(x) * w; g, u = W13 h (+b); a = silu(g) * u; out = W2 a (+b).
 *
 * Python keeps the layer loop and the all-reduce of ``out``; everything between two
 * all-reduces is here, in one OpenMP parallel region per call. Products hand out rows in
 * small chunks (dynamic schedule), so when one core is busy with other work the free
 * threads take over its share instead of waiting for it. Weights stay in their storage
 * dtype (a weight_t says which); scratch buffers come from the caller: nothing is allocated
 * per token. Attention uses an online softmax (one pass over the keys, no score buffer). */
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
} weight_t;

typedef struct {            /* caller-owned buffers, sized for the largest use */
    float *h;               /* (dim,) the normed input */
    float *mid;             /* (n_q + 2 n_kv) hd for qkv, or 2 f for gate/up */
    float *act;             /* (n_q hd,) attention output, or (f,) silu(g) * u */
    int16_t *xq;            /* activations quantised for int8 weights, (max cols,), or to
                               int8 for int4 weights (the same buffer) */
    float *xs;              /* their per-group scales */
    float *xsum;            /* int4: per block, the scale times the sum of the block */
} scratch_t;

static inline float dot_f32(const float *restrict w, const float *restrict x, int64_t n) {
    float a = 0.f;
    for (int64_t i = 0; i < n; i++) a += w[i] * x[i];
    return a;
}

static inline float dot_bf16(const uint16_t *restrict w, const float *restrict x, int64_t n) {
    float a = 0.f;
    for (int64_t i = 0; i < n; i++) a += bf16_to_f32(w[i]) * x[i];
    return a;
}

static inline float dot_f16(const uint16_t *restrict w, const float *restrict x, int64_t n) {
    float a = 0.f;
    int64_t i = 0;
#ifdef HAVE_F16X8
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(f16x8(w + i), _mm256_loadu_ps(x + i), acc);
    a = hsum(acc);
#endif
    for (; i < n; i++) a += f16_to_f32(w[i]) * x[i];
    return a;
}

/* y[o] = W[o] . x (+ b[o]) for rows [o0, o1). */
static void rows(const weight_t *w, const float *x, const scratch_t *s, float *y, int64_t o0,
                 int64_t o1) {
    int64_t in = w->cols;
    switch (w->dtype) {
    case W_F32:
        for (int64_t o = o0; o < o1; o++) y[o] = dot_f32((const float *)w->data + o * in, x, in);
        break;
    case W_BF16:
        for (int64_t o = o0; o < o1; o++)
            y[o] = dot_bf16((const uint16_t *)w->data + o * in, x, in);
        break;
    case W_F16:
        for (int64_t o = o0; o < o1; o++)
            y[o] = dot_f16((const uint16_t *)w->data + o * in, x, in);
        break;
    case W_I8: {
        int64_t ng = (in + w->group - 1) / w->group, full = in / w->group;
        for (int64_t o = o0; o < o1; o++)
            y[o] = dot_i8_row((const int8_t *)w->data + o * in, s->xq,
                              (const float *)w->scale + o * ng, s->xs, x, in, w->group, full);
        break;
    }
    default: {
        int64_t nb = in / 32;
        for (int64_t o = o0; o < o1; o++)
            y[o] = dot_i4_row((const uint8_t *)w->data + o * (in / 2),
                              (const uint16_t *)w->scale + o * nb, w->min + o * nb,
                              (const int8_t *)s->xq, s->xs, s->xsum, nb);
    }
    }
    if (w->bias)
        for (int64_t o = o0; o < o1; o++) y[o] += w->bias[o];
}

/* Inside a parallel region, every thread: y = W x, rows handed out in chunks. */
static void product(const weight_t *w, const float *x, const scratch_t *s, float *y) {
    #pragma omp single
    {
        if (w->dtype == W_I8) quantize_x(x, w->cols, w->group, s->xq, s->xs);
        if (w->dtype == W_I4) quantize_x8(x, w->cols / 32, (int8_t *)s->xq, s->xs, s->xsum);
    }
    int64_t chunk = w->rows / (8 * omp_get_num_threads());
    chunk = chunk < 4 ? 4 : chunk > 64 ? 64 : chunk;
    int64_t n = (w->rows + chunk - 1) / chunk;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n; c++) {
        int64_t o0 = c * chunk, o1 = o0 + chunk < w->rows ? o0 + chunk : w->rows;
        rows(w, x, s, y, o0, o1);
    }
}

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *h) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) h[i] = w[i] * (x[i] * r);
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

/* One query head over keys [start, pos] of its KV head: o = softmax(q k^T / sqrt(hd)) v. */
static void attend(const float *q, const float *keys, const float *vals, int64_t start,
                   int64_t pos, int64_t hd, float *o) {
    float m = -INFINITY, l = 0.f, scale = 1.f / sqrtf((float)hd);
    for (int64_t d = 0; d < hd; d++) o[d] = 0.f;
    for (int64_t p = start; p <= pos; p++) {
        float s = dot_f32(keys + p * hd, q, hd) * scale;
        if (s > m) {               /* a new maximum: rescale what was summed so far */
            float c = expf(m - s);
            l *= c;
            for (int64_t d = 0; d < hd; d++) o[d] *= c;
            m = s;
        }
        float e = expf(s - m);
        l += e;
        const float *v = vals + p * hd;
        for (int64_t d = 0; d < hd; d++) o[d] += e * v[d];
    }
    for (int64_t d = 0; d < hd; d++) o[d] /= l;
}

/* x += out, inside the parallel region: a world of one rank has nothing to all-reduce. */
static void accumulate(float *x, const float *out, int64_t n) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] += out[i];
}

/* cache_k, cache_v: (n_kv, max_len, hd); kv_of_q: (n_q,) local KV head of each query head;
 * x: (dim,); out: (dim,) this rank's partial sum, also added into x when ``add`` is set. */
void decode_attn(float *x, const float *norm, float eps, const weight_t *wqkv,
                 const weight_t *wo, const float *cos, const float *sin, float *cache_k,
                 float *cache_v, int64_t max_len, int64_t start, int64_t pos, int64_t n_q,
                 int64_t n_kv, int64_t hd, const int64_t *kv_of_q, const scratch_t *s,
                 float *out, int64_t add) {
    int64_t dim = wqkv->cols;
    #pragma omp parallel
    {
        #pragma omp single
        rms_norm(x, norm, eps, dim, s->h);
        product(wqkv, s->h, s, s->mid);
        float *q = s->mid, *k = q + n_q * hd, *v = k + n_kv * hd;
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < n_q + n_kv; j++) {
            if (j < n_q) {
                rope(q + j * hd, cos, sin, hd);
            } else {
                int64_t h = j - n_q;
                rope(k + h * hd, cos, sin, hd);
                memcpy(cache_k + (h * max_len + pos) * hd, k + h * hd, hd * sizeof(float));
                memcpy(cache_v + (h * max_len + pos) * hd, v + h * hd, hd * sizeof(float));
            }
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < n_q; j++) {
            int64_t h = kv_of_q[j];
            attend(q + j * hd, cache_k + h * max_len * hd, cache_v + h * max_len * hd, start,
                   pos, hd, s->act + j * hd);
        }
        product(wo, s->act, s, out);
        if (add) accumulate(x, out, dim);
    }
}

/* x: (dim,); out: (dim,) this rank's partial sum, added into x when ``add`` is set; w13 holds
 * gate rows, then up rows. */
void decode_mlp(float *x, const float *norm, float eps, const weight_t *w13,
                const weight_t *w2, const scratch_t *s, float *out, int64_t add) {
    int64_t dim = w13->cols, f = w13->rows / 2;
    #pragma omp parallel
    {
        #pragma omp single
        rms_norm(x, norm, eps, dim, s->h);
        product(w13, s->h, s, s->mid);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < f; i++) {
            float g = s->mid[i];
            s->act[i] = g / (1.f + expf(-g)) * s->mid[f + i];
        }
        product(w2, s->act, s, out);
        if (add) accumulate(x, out, dim);
    }
}
