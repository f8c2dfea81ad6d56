/* Runs one of csrc/matvec.c's products on inputs from a file, for test_neon.py: built for
 * aarch64 and run under qemu-user, where Python and torch are not available.
 *
 * usage: products IN OUT. IN: int64 kind, T, in, out, then x (T, in) fp32, then the weight
 * as stored (kind 0 fp32, 1 bf16, 2 f16: (out, in); 3 int8: (out, in) + scales
 * (out, ceil(in / group)) fp32, group in a sixth int64; 4 int4 with int8 activations and
 * 5 with int16 ones: (out, in / 2) bytes + d, m (out, in / 32) fp16; 6 int6: (out, in / 2)
 * bytes + top bits (out, in / 4) + d (out, in / 32) fp16). OUT: y (T, out) fp32.
 * Integer matrices in plain rows (tile 0). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

void matvec_f32(const float *, const float *, float *, int64_t, int64_t, int64_t);
void matvec_bf16(const float *, const uint16_t *, float *, int64_t, int64_t, int64_t);
void matvec_f16(const float *, const uint16_t *, float *, int64_t, int64_t, int64_t);
void matvec_i8(const float *, const int8_t *, const float *, float *, int64_t, int64_t, int64_t,
               int64_t, int64_t);
void matvec_i4(const float *, const uint8_t *, const uint16_t *, const uint16_t *,
               const uint8_t *, const float *, float *, int64_t, int64_t, int64_t, int64_t,
               int64_t);

static void *take(FILE *f, size_t n) {
    void *p = malloc(n ? n : 1);
    if (fread(p, 1, n, f) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    int64_t *h = take(f, 5 * sizeof(int64_t));
    int64_t kind = h[0], T = h[1], in = h[2], out = h[3], group = h[4];
    float *x = take(f, sizeof(float) * T * in), *y = malloc(sizeof(float) * T * out);
    if (kind == 0) {
        matvec_f32(x, take(f, 4 * out * in), y, T, in, out);
    } else if (kind == 1 || kind == 2) {
        uint16_t *w = take(f, 2 * out * in);
        (kind == 1 ? matvec_bf16 : matvec_f16)(x, w, y, T, in, out);
    } else if (kind == 3) {
        int8_t *w = take(f, out * in);
        float *s = take(f, 4 * out * ((in + group - 1) / group));
        matvec_i8(x, w, s, y, T, in, out, group, 0);
    } else if (kind == 6) {
        uint8_t *w = take(f, out * in / 2), *top = take(f, out * in / 4);
        uint16_t *d = take(f, 2 * out * (in / 32));
        matvec_i4(x, w, d, NULL, top, NULL, y, T, in, out, 0, 1);
    } else {
        uint8_t *w = take(f, out * in / 2);
        uint16_t *d = take(f, 2 * out * (in / 32)), *m = take(f, 2 * out * (in / 32));
        matvec_i4(x, w, d, m, NULL, NULL, y, T, in, out, 0, kind == 5);
    }
    fclose(f);
    FILE *o = fopen(argv[2], "wb");
    if (!o || fwrite(y, sizeof(float), T * out, o) != (size_t)(T * out)) return 2;
    fclose(o);
    return 0;
}
