/* conv.c: bitlab_im2col_s8, the int8 im2col the conv ops run before bitlab_linear_q (portable C, OpenMP
 * over chunks of output positions). */
#include "bitlab_cpu.h"

/* int8 im2col for conv2d: out[(b * Ho + i) * Wo + j][(c * kh + a) * kw + q] = x[b][c][i*sh - ph + a*dh][j*sw - pw + q*dw]
 * (0 outside the image), the order of F.unfold transposed. Tasks are chunks of up to 64 output positions of one
 * output row (b, i), smaller when that leaves too few tasks (a 1-D conv has Ho = 1), so every thread gets work;
 * inside a chunk the inner loop walks j (reading x contiguously when sw = 1) and writes into the chunk's
 * positions x K block, which stays in cache. */
void bitlab_im2col_s8(const int8_t *x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                      int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Ho, int64_t Wo,
                      int8_t *out, int nthreads) {
    const int64_t K = C * kh * kw;
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((double)B * Ho * Wo * K < 1e5) nt = 1;
    int64_t jc = 64;  /* positions per chunk: fewer when there are too few chunks to share out */
    while (jc > 8 && B * Ho * ((Wo + jc - 1) / jc) < 4 * nt) jc /= 2;
    const int64_t chunks = (Wo + jc - 1) / jc;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t t = 0; t < B * Ho * chunks; t++) {
        const int64_t bi = t / chunks, j0 = (t % chunks) * jc;
        const int64_t b = bi / Ho, i = bi % Ho, jn = Wo - j0 < jc ? Wo - j0 : jc;
        int8_t *block = out + (bi * Wo + j0) * K;
        for (int64_t c = 0; c < C; c++) {
            const int8_t *plane = x + (b * C + c) * H * W;
            for (int64_t a = 0; a < kh; a++) {
                const int64_t y = i * sh - ph + a * dh;
                for (int64_t q = 0; q < kw; q++) {
                    int8_t *dst = block + (c * kh + a) * kw + q;
                    if (y < 0 || y >= H) {
                        for (int64_t j = 0; j < jn; j++) dst[j * K] = 0;
                        continue;
                    }
                    const int8_t *row = plane + y * W;
                    const int64_t x0 = (j0 * sw) + q * dw - pw;  /* input column of the chunk's first j */
                    int64_t j = 0;
                    for (; j < jn && x0 + j * sw < 0; j++) dst[j * K] = 0;  /* left padding */
                    if (sw == 1)
                        for (; j < jn && x0 + j < W; j++) dst[j * K] = row[x0 + j];
                    else
                        for (; j < jn && x0 + j * sw < W; j++) dst[j * K] = row[x0 + j * sw];
                    for (; j < jn; j++) dst[j * K] = 0;  /* right padding */
                }
            }
        }
    }
}
