/* tiles.c: the small-M path (M below the batched threshold, and M == 1 where no decode loop applies):
 * register tiles of up to 4 weight rows x 4 tokens computing exact int32 dot products of ternary or int8
 * weights, in scalar code and AVX2, with the AVX2 function tables (one entry per tile shape; the VNNI
 * tiles are in tiles_vnni.c); dot_tile, which picks a tile per ISA and format; and gemm_cols, which walks
 * a thread's output columns and rescales. */
#include "bitlab_cpu.h"

/* ------------------------------------------------------------------------------------------ */
/* Ternary dot-product tiles: acc[n*MR+m] = sum over runs [r0, r1) of xq[m] * code[n]          */
/* ------------------------------------------------------------------------------------------ */
static void tern_scalar(const uint8_t *const *w, int nr, const int8_t *const *x, int mr, int64_t r0, int64_t r1,
                        int32_t *acc) {
    for (int n = 0; n < nr; n++)
        for (int m = 0; m < mr; m++) {
            int32_t a = 0;
            for (int64_t run = r0; run < r1; run++) {
                const uint8_t *wb = w[n] + (run >> 2) * 32;
                const int8_t *xr = x[m] + run * 32;
                int sh = (int)(run & 3) * 2;
                for (int j = 0; j < 32; j++) a += ((wb[j] >> sh) & 3) * xr[j];
            }
            acc[n * mr + m] = a;
        }
}

#ifdef BITLAB_X86
/* AVX2: maddubs(code u8, xq s8) -> int16 pairs, summed in int16 for <= 32 runs, then madd to int32. */
static inline __attribute__((always_inline)) TGT_AVX2 void
tern_avx2_body(const uint8_t *const *w, const int NR, const int8_t *const *x, const int MR, int64_t r0, int64_t r1,
               int32_t *acc) {
    const __m256i m3 = _mm256_set1_epi8(3), one16 = _mm256_set1_epi16(1);
    __m256i a32[MAXT][MAXT];
    for (int n = 0; n < NR; n++)
        for (int m = 0; m < MR; m++) a32[n][m] = _mm256_setzero_si256();
    const int64_t next = NR > 1 ? (int64_t)(w[1] - w[0]) * NR : 0;
    int64_t run = r0;
    while (run < r1) {
        __m256i a16[MAXT][MAXT];
        for (int n = 0; n < NR; n++)
            for (int m = 0; m < MR; m++) a16[n][m] = _mm256_setzero_si256();
        int64_t lim = run + 32 < r1 ? run + 32 : r1;
        for (; run < lim && (run & 3); run++) { /* unaligned head, one run at a time */
            __m128i sh = _mm_cvtsi32_si128((int)(run & 3) * 2);
            for (int m = 0; m < MR; m++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x[m] + run * 32));
                for (int n = 0; n < NR; n++) {
                    __m256i c = _mm256_and_si256(
                        _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(w[n] + (run >> 2) * 32)), sh), m3);
                    a16[n][m] = _mm256_add_epi16(a16[n][m], _mm256_maddubs_epi16(c, xv));
                }
            }
        }
        for (; run + 4 <= lim; run += 4) { /* whole 128-blocks */
            __m256i wv[MAXT];
            for (int n = 0; n < NR; n++) wv[n] = _mm256_loadu_si256((const __m256i *)(w[n] + (run >> 2) * 32));
            if (MR == 1 && next && (run & 4)) /* decode: prefetch the next tile's rows (see the VNNI body) */
                for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w[n] + next + (run >> 2) * 32), _MM_HINT_T0);
            for (int r = 0; r < 4; r++) {
                __m256i c[MAXT];
                for (int n = 0; n < NR; n++) c[n] = _mm256_and_si256(_mm256_srli_epi16(wv[n], 2 * r), m3);
                for (int m = 0; m < MR; m++) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(x[m] + (run + r) * 32));
                    for (int n = 0; n < NR; n++) {
                        a16[n][m] = _mm256_add_epi16(a16[n][m], _mm256_maddubs_epi16(c[n], xv));
                        PIN(a16[n][m]);
                    }
                }
            }
        }
        for (; run < lim; run++) { /* tail runs */
            __m128i sh = _mm_cvtsi32_si128((int)(run & 3) * 2);
            for (int m = 0; m < MR; m++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x[m] + run * 32));
                for (int n = 0; n < NR; n++) {
                    __m256i c = _mm256_and_si256(
                        _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(w[n] + (run >> 2) * 32)), sh), m3);
                    a16[n][m] = _mm256_add_epi16(a16[n][m], _mm256_maddubs_epi16(c, xv));
                }
            }
        }
        for (int n = 0; n < NR; n++)
            for (int m = 0; m < MR; m++) a32[n][m] = _mm256_add_epi32(a32[n][m], _mm256_madd_epi16(a16[n][m], one16));
    }
    for (int n = 0; n < NR; n++)
        for (int m = 0; m < MR; m++) acc[n * MR + m] = hsum_epi32(a32[n][m]);
}

/* ------------------------------------------------------------------------------------------ */
/* int8 weight tiles: acc[n*MR+m] = sum_{k in [k0,k1)} xq[m][k] * w[n][k]                       */
/* maddubs(|w|, sign(xq, w)) is exact while xq != -128 (then |pair| <= 128*127*2 < 32768);    */
/* otherwise ("wide") sign-extend both to int16 and use madd.                                 */
/* ------------------------------------------------------------------------------------------ */
static inline __attribute__((always_inline)) TGT_AVX2 void
i8_avx2_body(const int8_t *const *w, const int NR, const int8_t *const *x, const int MR, int64_t k0, int64_t k1,
             int32_t *acc, const int wide) {
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i a[MAXT][MAXT];
    for (int n = 0; n < NR; n++)
        for (int m = 0; m < MR; m++) a[n][m] = _mm256_setzero_si256();
    int64_t k = k0;
    (void)wide;
    for (; k + 32 <= k1; k += 32) {
        __m256i wv[MAXT], aw[MAXT];
        for (int n = 0; n < NR; n++) {
            wv[n] = _mm256_loadu_si256((const __m256i *)(w[n] + k));
            aw[n] = _mm256_abs_epi8(wv[n]);
        }
        for (int m = 0; m < MR; m++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x[m] + k));
            for (int n = 0; n < NR; n++) {
                __m256i p = _mm256_maddubs_epi16(aw[n], _mm256_sign_epi8(xv, wv[n]));
                a[n][m] = _mm256_add_epi32(a[n][m], _mm256_madd_epi16(p, one16));
            }
        }
    }
    for (int n = 0; n < NR; n++)
        for (int m = 0; m < MR; m++) {
            int32_t s = hsum_epi32(a[n][m]);
            for (int64_t kk = k; kk < k1; kk++) s += (int32_t)w[n][kk] * x[m][kk];
            acc[n * MR + m] = s;
        }
}

/* exact for any int8 values (xq == -128 included): sign-extend to int16, madd; one (n, m) pair at a time */
static TGT_AVX2 __attribute__((unused)) void i8_wide_avx2(const int8_t *const *w, int nr, const int8_t *const *x,
                                                          int mr, int64_t k0, int64_t k1, int32_t *acc) {
    for (int n = 0; n < nr; n++)
        for (int m = 0; m < mr; m++) {
            __m256i a = _mm256_setzero_si256();
            int64_t k = k0;
            for (; k + 16 <= k1; k += 16)
                a = _mm256_add_epi32(a, _mm256_madd_epi16(
                                            _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[n] + k))),
                                            _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x[m] + k)))));
            int32_t s = hsum_epi32(a);
            for (; k < k1; k++) s += (int32_t)w[n][k] * x[m][k];
            acc[n * mr + m] = s;
        }
}

#define DEF_AVX2_TERN(NR, MR)                                                                                          \
    static TGT_AVX2 void tern_avx2_##NR##_##MR(const uint8_t *const *w, const int8_t *const *x, int64_t r0,      \
                                               int64_t r1, int32_t *acc) {                                        \
        tern_avx2_body(w, NR, x, MR, r0, r1, acc);                                                               \
    }
#define DEF_AVX2_I8(NR, MR)                                                                                       \
    static TGT_AVX2 void i8_avx2_##NR##_##MR(const int8_t *const *w, const int8_t *const *x, int64_t k0,         \
                                             int64_t k1, int32_t *acc, int wide) {                                \
        if (wide) i8_wide_avx2(w, NR, x, MR, k0, k1, acc);                                                       \
        else i8_avx2_body(w, NR, x, MR, k0, k1, acc, 0);                                                         \
    }
DEF_ALL(DEF_AVX2_TERN)
DEF_ALL(DEF_AVX2_I8)
const tern_fn bitlab_tern_avx2[4][4] = TABLE(tern_avx2);
const i8_fn bitlab_i8_avx2[4][4] = TABLE(i8_avx2);
#define TERN_AVX2 bitlab_tern_avx2
#define I8_AVX2 bitlab_i8_avx2
#define TERN_VNNI bitlab_tern_vnni
#define I8_VNNI bitlab_i8_vnni
#endif /* BITLAB_X86 */

static void i8_scalar(const int8_t *const *w, int nr, const int8_t *const *x, int mr, int64_t k0, int64_t k1,
                      int32_t *acc) {
    for (int n = 0; n < nr; n++)
        for (int m = 0; m < mr; m++) {
            int32_t a = 0;
            for (int64_t k = k0; k < k1; k++) a += (int32_t)w[n][k] * x[m][k];
            acc[n * mr + m] = a;
        }
}

/* acc over k-range of one group, in the weight format's units */
static void dot_tile(const job_t *j, const void *const *w, int nr, const int8_t *const *x, int mr, int64_t k0,
                     int64_t k1, int32_t *acc) {
    if (j->wfmt == W_TERNARY) {
        const uint8_t *const *wt = (const uint8_t *const *)w;
        int64_t r0 = k0 / 32, r1 = (k1 + 31) / 32;
#ifdef BITLAB_X86
        if (j->isa == ISA_VNNI && r1 - r0 > DECODE_MAX_RUNS) { /* keep the 4^r-scaled chains in int32 */
            int32_t part[MAXT * MAXT];
            memset(acc, 0, sizeof(int32_t) * (size_t)(nr * mr));
            for (int64_t a = r0; a < r1; a += DECODE_MAX_RUNS) {
                int64_t b = a + DECODE_MAX_RUNS < r1 ? a + DECODE_MAX_RUNS : r1;
                TERN_VNNI[nr - 1][mr - 1](wt, x, a, b, part);
                for (int t = 0; t < nr * mr; t++) acc[t] = (int32_t)((uint32_t)acc[t] + (uint32_t)part[t]);
            }
            return;
        }
        if (j->isa == ISA_VNNI) { TERN_VNNI[nr - 1][mr - 1](wt, x, r0, r1, acc); return; }
        if (j->isa == ISA_AVX2) { TERN_AVX2[nr - 1][mr - 1](wt, x, r0, r1, acc); return; }
#endif
        tern_scalar(wt, nr, x, mr, r0, r1, acc);
    } else {
        const int8_t *const *w8 = (const int8_t *const *)w;
#ifdef BITLAB_X86
        if (j->isa == ISA_VNNI && !j->has_m128) { I8_VNNI[nr - 1][mr - 1](w8, x, k0, k1, acc, 0); return; }
        if (j->isa >= ISA_AVX2) { I8_AVX2[nr - 1][mr - 1](w8, x, k0, k1, acc, j->has_m128); return; }
#endif
        i8_scalar(w8, nr, x, mr, k0, k1, acc);
    }
}

static inline float rescale(const job_t *j, const int32_t *accg, int64_t n, int64_t m) {
    /* accg: G partial sums of xq * code (ternary: minus sum xq) or xq * w (int8) */
    const int32_t *gsum = j->gsum + m * j->G;
    RESCALE_BODY(accg[g] - (j->wfmt == W_TERNARY ? gsum[g] : 0))
}

/* the small-M path: output columns [n0, n1) in tiles of nr rows x mr tokens, every group through dot_tile */
BITLAB_INTERNAL int bitlab_gemm_cols(job_t *j, int64_t n0, int64_t n1) {
    const int NR = j->nr, MR = j->mr;
    int64_t wstride = j->wfmt == W_TERNARY ? j->Kp / 4 : j->K;
    int32_t acc[MAXT * MAXT];
    int32_t *accg = (int32_t *)malloc(sizeof(int32_t) * MAXT * MAXT * (size_t)(j->G > 0 ? j->G : 1));
    if (!accg) return -1;
    for (int64_t n = n0; n < n1; n += NR) {
        int nr = n1 - n < NR ? (int)(n1 - n) : NR;
        const void *wp[MAXT];
        for (int a = 0; a < nr; a++) wp[a] = (const int8_t *)j->w + (n + a) * wstride;
        for (int64_t m = 0; m < j->M; m += MR) {
            int mr = j->M - m < MR ? (int)(j->M - m) : MR;
            const int8_t *xp[MAXT];
            for (int b = 0; b < mr; b++) xp[b] = j->xq + (m + b) * j->Kp;
            for (int64_t g = 0; g < j->G; g++) {
                int64_t k0 = g * j->gs, k1 = (g == j->G - 1) ? j->K : k0 + j->gs;
                if (j->wfmt == W_TERNARY && g == j->G - 1) k1 = j->Kp;
                dot_tile(j, wp, nr, xp, mr, k0, k1, acc);
                for (int t = 0; t < nr * mr; t++) accg[t * j->G + g] = acc[t];
            }
            for (int a = 0; a < nr; a++)
                for (int b = 0; b < mr; b++)
                    j->out[(m + b) * j->N + n + a] = rescale(j, accg + (a * mr + b) * j->G, n + a, m + b);
        }
    }
    free(accg);
    return 0;
}
