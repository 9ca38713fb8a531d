/* tiles_vnni.c: the small-M register tiles on AVX-512 VNNI (vpdpbusd on 256-bit registers) for ternary
 * and int8 weights, and their function tables; tiles.c has the scalar and AVX2 tiles and calls these
 * through bitlab_tern_vnni / bitlab_i8_vnni. x86 only. */
#include "bitlab_cpu.h"

#ifdef BITLAB_X86
/* ------------------------------------------------------------------------------------------ */
/* Ternary: acc[n*MR+m] = sum over runs [r0, r1) of xq[m] * code[n]                          */
/* ------------------------------------------------------------------------------------------ */
/* VNNI (AVX-512 VNNI on 256-bit registers): vpdpbusd accumulates u8*s8 quads straight into int32. */
static inline __attribute__((always_inline)) TGT_VNNI void
tern_vnni_body(const uint8_t *const *w, const int NR, const int8_t *const *x, const int MR, int64_t r0, int64_t r1,
               int32_t *acc) {
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256i a[MAXT][MAXT];
    for (int n = 0; n < NR; n++)
        for (int m = 0; m < MR; m++) a[n][m] = _mm256_setzero_si256();
    int64_t run = r0;
    for (; run < r1 && (run & 3); run++) {
        __m128i sh = _mm_cvtsi32_si128((int)(run & 3) * 2);
        for (int m = 0; m < MR; m++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x[m] + run * 32));
            for (int n = 0; n < NR; n++) {
                __m256i c = _mm256_and_si256(
                    _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(w[n] + (run >> 2) * 32)), sh), m3);
                a[n][m] = _mm256_dpbusd_epi32(a[n][m], c, xv);
            }
        }
    }
    if (MR == 1) {
        /* decode (one activation row): no shifts. Masking the byte with 3 << 2r leaves code * 4^r
         * (<= 128, a valid u8), so run r accumulates 4^r * sum(code * x) in its own accumulator;
         * every lane is then a multiple of 4^r and shifts back exactly at the end. Four independent
         * dpbusd chains per row also hide the instruction's latency. */
        __m256i ar[MAXT][4];
        const __m256i mk[4] = {m3, _mm256_slli_epi16(m3, 2), _mm256_slli_epi16(m3, 4), _mm256_slli_epi16(m3, 6)};
        for (int n = 0; n < NR; n++)
            for (int r = 0; r < 4; r++) ar[n][r] = _mm256_setzero_si256();
        /* the rows of the next tile follow these in memory: prefetch them as we go. Rows are short
         * (K/4 bytes) and each tile spans new pages, where the hardware prefetcher starts cold. */
        const int64_t next = NR > 1 ? (int64_t)(w[1] - w[0]) * NR : 0;
        for (; run + 4 <= r1; run += 4) {
            __m256i wv[MAXT];
            for (int n = 0; n < NR; n++) wv[n] = _mm256_loadu_si256((const __m256i *)(w[n] + (run >> 2) * 32));
            if (next && (run & 4))
                for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w[n] + next + (run >> 2) * 32), _MM_HINT_T0);
            for (int r = 0; r < 4; r++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x[0] + (run + r) * 32));
                for (int n = 0; n < NR; n++) {
                    ar[n][r] = _mm256_dpbusd_epi32(ar[n][r], _mm256_and_si256(wv[n], mk[r]), xv);
                    PIN(ar[n][r]);
                }
            }
        }
        for (int n = 0; n < NR; n++) {
            __m256i t = _mm256_add_epi32(ar[n][0], _mm256_srai_epi32(ar[n][1], 2));
            t = _mm256_add_epi32(t, _mm256_add_epi32(_mm256_srai_epi32(ar[n][2], 4), _mm256_srai_epi32(ar[n][3], 6)));
            a[n][0] = _mm256_add_epi32(a[n][0], t);
        }
    }
    for (; run + 4 <= r1; run += 4) {
        __m256i wv[MAXT];
        for (int n = 0; n < NR; n++) wv[n] = _mm256_loadu_si256((const __m256i *)(w[n] + (run >> 2) * 32));
        for (int r = 0; r < 4; r++) {
            __m256i c[MAXT];
            for (int n = 0; n < NR; n++) c[n] = _mm256_and_si256(_mm256_srli_epi16(wv[n], 2 * r), m3);
            for (int m = 0; m < MR; m++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x[m] + (run + r) * 32));
                for (int n = 0; n < NR; n++) {
                    a[n][m] = _mm256_dpbusd_epi32(a[n][m], c[n], xv);
                    PIN(a[n][m]);
                }
            }
        }
    }
    for (; run < r1; run++) {
        __m128i sh = _mm_cvtsi32_si128((int)(run & 3) * 2);
        for (int m = 0; m < MR; m++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x[m] + run * 32));
            for (int n = 0; n < NR; n++) {
                __m256i c = _mm256_and_si256(
                    _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(w[n] + (run >> 2) * 32)), sh), m3);
                a[n][m] = _mm256_dpbusd_epi32(a[n][m], c, xv);
            }
        }
    }
    for (int n = 0; n < NR; n++)
        for (int m = 0; m < MR; m++) acc[n * MR + m] = hsum_epi32(a[n][m]);
}

/* ------------------------------------------------------------------------------------------ */
/* int8: acc[n*MR+m] = sum_{k in [k0,k1)} xq[m][k] * w[n][k], via maddubs' operands |w| and sign(xq, w) */
/* (exact while xq != -128; dot_tile sends the "wide" case to the AVX2 tiles)                  */
/* ------------------------------------------------------------------------------------------ */
static inline __attribute__((always_inline)) TGT_VNNI void
i8_vnni_body(const int8_t *const *w, const int NR, const int8_t *const *x, const int MR, int64_t k0, int64_t k1,
             int32_t *acc, const int wide) {
    (void)wide; /* dpbusd has no int16 intermediate; sign(-128) is still wrong, so "wide" uses AVX2 */
    __m256i a[MAXT][MAXT];
    for (int n = 0; n < NR; n++)
        for (int m = 0; m < MR; m++) a[n][m] = _mm256_setzero_si256();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
        __m256i wv[MAXT], aw[MAXT];
        for (int n = 0; n < NR; n++) {
            wv[n] = _mm256_loadu_si256((const __m256i *)(w[n] + k));
            aw[n] = _mm256_abs_epi8(wv[n]);
        }
        for (int m = 0; m < MR; m++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x[m] + k));
            for (int n = 0; n < NR; n++) a[n][m] = _mm256_dpbusd_epi32(a[n][m], aw[n], _mm256_sign_epi8(xv, wv[n]));
        }
    }
    for (int n = 0; n < NR; n++)
        for (int m = 0; m < MR; m++) {
            int32_t s = hsum_epi32(a[n][m]);
            for (int64_t kk = k; kk < k1; kk++) s += (int32_t)w[n][kk] * x[m][kk];
            acc[n * MR + m] = s;
        }
}

#define DEF_VNNI_TERN(NR, MR)                                                                                          \
    static TGT_VNNI void tern_vnni_##NR##_##MR(const uint8_t *const *w, const int8_t *const *x, int64_t r0,      \
                                               int64_t r1, int32_t *acc) {                                        \
        tern_vnni_body(w, NR, x, MR, r0, r1, acc);                                                               \
    }
#define DEF_VNNI_I8(NR, MR)                                                                                       \
    static TGT_VNNI void i8_vnni_##NR##_##MR(const int8_t *const *w, const int8_t *const *x, int64_t k0,         \
                                             int64_t k1, int32_t *acc, int wide) {                                \
        i8_vnni_body(w, NR, x, MR, k0, k1, acc, wide);                                                           \
    }
DEF_ALL(DEF_VNNI_TERN)
DEF_ALL(DEF_VNNI_I8)
const tern_fn bitlab_tern_vnni[4][4] = TABLE(tern_vnni);
const i8_fn bitlab_i8_vnni[4][4] = TABLE(i8_vnni);
#endif /* BITLAB_X86 */
