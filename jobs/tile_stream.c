/* The fused step's tile kernels on one matrix, outside the model: how fast they stream
 * weights against a plain read of the same bytes (jobs/tile-stream.sh builds one binary per
 * variant of mpitpi/csrc/common.h's build-time settings and alternates them).
 *
 *   tile_stream KIND MB [PASSES]
 *
 * KIND 0: a plain read (64-byte loads) of an int4 matrix's bytes; 4: coded int4 tiles against
 * one row of int8 activations (decode); 6: int6 tiles against int16 activations (prompt rows,
 * logits); 7: int6 tiles against int8 activations (decode, builds with dot_i6_tile); 8: int8
 * tiles (groups of 64 columns, fp32 scales) against int16 activations (decode). MB: the
 * matrix's size (600: out of every cache; 1: in L2). Two OpenMP
 * threads (OMP_NUM_THREADS) each take half of the tiles, as a static split. Prints GB/s of
 * each pass. The values are arbitrary: only the time counts. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "common.h"

/* which tiles ask for lines ahead (common.h): PREFETCH=N in the environment, else all */
int mpitpi_prefetch = 7;

/* n bytes on a 2 MiB boundary in 2 MiB pages where the kernel gives them (as the model's
 * weights, mpitpi/pages.py); HUGE=0 in the environment: 4 KiB pages */
static void *weights_alloc(size_t n) {
    size_t huge = 2 << 20, size = (n + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, size);
    if (p && !(getenv("HUGE") && atoi(getenv("HUGE")) == 0)) madvise(p, size, MADV_HUGEPAGE);
    return p;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s KIND(0|4|6|7|8) MB [PASSES]\n", argv[0]);
        return 2;
    }
#if !defined(I6_NARROW)
    if (atoi(argv[1]) == 7) {
        fprintf(stderr, "this build has no int6 kernel for int8 activations\n");
        return 2;
    }
#endif
    if (getenv("PREFETCH")) mpitpi_prefetch = atoi(getenv("PREFETCH"));
    int kind = atoi(argv[1]), passes = argc > 3 ? atoi(argv[3]) : 3;
    double mb = atof(argv[2]);
    int64_t cols = 2048, nb = cols / 32;
    /* q, codes, top bits; int8: weights and a scale a group */
    double row_bytes = kind == 8 ? cols + cols / 64 * 4 : cols / 2 + nb * 2 + (kind >= 6 ? cols / 4 : 0);
    int64_t rows = (int64_t)(mb * 1e6 / row_bytes) / TILE * TILE;
    uint8_t *q = weights_alloc(rows * cols / (kind == 8 ? 1 : 2)), *h = weights_alloc(rows * cols / 4 + 64);
    uint16_t *d = weights_alloc(rows * nb * 2 * (kind == 8 ? 2 : 1));
    float *rs = weights_alloc(rows * 2 * 4 + 64), *y = aligned_alloc(64, rows * 4);
    int16_t *xq = aligned_alloc(64, cols * 2);
    float *xs = aligned_alloc(64, nb * 4), *xsum = aligned_alloc(64, nb * 4);
    if (!q || !h || !d || !rs || !y || !xq || !xs || !xsum || rows < TILE) {
        fprintf(stderr, "cannot allocate %.0f MB\n", mb);
        return 1;
    }
    for (int64_t i = 0; i < rows * cols / (kind == 8 ? 1 : 2); i++) q[i] = (uint8_t)(i * 2654435761u >> 13);
    for (int64_t i = 0; i < rows * cols / 4; i++) h[i] = (uint8_t)(i * 2654435761u >> 11);
    for (int64_t i = 0; i < rows * nb; i++) d[i] = (uint16_t)(i * 40503u);
    if (kind == 8)   /* fp32 scales: 1e-3 */
        for (int64_t i = 0; i < rows * cols / 64; i++) ((float *)d)[i] = 1e-3f;
    for (int64_t i = 0; i < rows * 2; i++) rs[i] = 1e-3f;
    for (int64_t i = 0; i < cols; i++) xq[i] = (int16_t)(i * 7);
    for (int64_t i = 0; i < nb; i++) xs[i] = xsum[i] = 0.5f;
    int reps = mb < 50 ? (int)(1500 / mb) + 1 : 1;   /* small matrices: many passes a timing */
    for (int p = 0; p < passes; p++) {
        double t = omp_get_wtime();
        #pragma omp parallel
        {
            int th = omp_get_thread_num(), nt = omp_get_num_threads();
            int64_t g0 = rows / TILE * th / nt, g1 = rows / TILE * (th + 1) / nt;
            for (int r = 0; r < reps; r++)
                for (int64_t g = g0; g < g1; g++) {
                    int64_t o = g * TILE;
                    if (kind == 0) {   /* the tile's weight bytes, then its scale codes */
                        __m256i a = _mm256_setzero_si256();
                        const char *w = (const char *)q + o * cols / 2, *c = (const char *)(d + o * nb);
                        for (int64_t i = 0; i < TILE * cols / 2; i += 32)
                            a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(w + i)));
                        for (int64_t i = 0; i < TILE * nb * 2; i += 32)
                            a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(c + i)));
                        y[o] = (float)_mm256_extract_epi32(a, 0);
                    } else if (kind == 4)
                        dot_i4_tile_batch(q + o * cols / 2, d + o * nb, NULL, (int8_t *)xq, cols,
                                          xs, xsum, nb, 1, nb, y + o, rows, NULL, rs + 2 * o);
                    else if (kind == 8)
                        dot_i8_tile_batch((const int8_t *)q + o * cols,
                                          (const float *)d + o * (cols / 64), xq, cols, xs, 0,
                                          NULL, 0, 1, cols, 64, cols, y + o, rows);
#if defined(I6_NARROW)
                    else if (kind == 7)
                        dot_i6_tile_batch(q + o * cols / 2, d + o * nb, d + o * nb,
                                          (int8_t *)xq, cols, xs, xsum, nb, 1, nb, y + o, rows,
                                          h + o * nb * 8, NULL);
#endif
                    else
                        dot_i4w_tile_batch(q + o * cols / 2, d + o * nb, d + o * nb, xq, cols, xs,
                                           xsum, nb, 1, nb, y + o, rows, h + o * nb * 8,
                                           rs + 2 * o);
                }
        }
        printf("%.1f%s", rows * row_bytes * reps / (omp_get_wtime() - t) / 1e9,
               p + 1 < passes ? " " : "\n");
    }
    return 0;
}
