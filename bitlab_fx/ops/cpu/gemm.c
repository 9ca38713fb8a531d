/* gemm.c: the batched GEMM (M >= a threshold, see use_panel in bitlab_cpu.c): the micro-kernels (AVX2
 * 4 rows x 16 tokens for ternary and int4 weights, AVX-512 VNNI 12 x 32 and 24 x 16 for all formats),
 * the unpacking of packed ternary and int4 weight rows into their blocked layout, and panel_cols, which
 * walks a thread's output columns and rescales. The micro-kernels are x86 only (elsewhere use_panel
 * never picks this path). */
#include "bitlab_cpu.h"

/* ------------------------------------------------------------------------------------------ */
/* Batched GEMM (M >= a threshold): tokens in vector lanes.                                    */
/* Activations are transposed once per call into tiles of PMT tokens, as unsigned bytes        */
/* xq + 128: xt[tile][q][PMT][4] with q = k / 4. A block of PNC weight rows is unpacked once   */
/* per call into signed bytes (code - 1 for ternary) in the blocked layout of PANEL_W. Each dword (4 */
/* consecutive k of one row) is broadcast to all lanes and multiplied with the 4 activations   */
/* of PMT tokens at once, so a micro-kernel holds a PNC x PMT block of int32 sums in registers: */
/*   tile[c][m] = sum_k (xq[m,k] + 128) * w[c,k]   and   sum_k xq*w = tile - 128 * sum_k w.     */
/* ------------------------------------------------------------------------------------------ */
/* w8 is blocked: [Kp/128][NC][128], so row c of step q sits at a constant offset c * 128 from
 * w8 + (q / 32) * NC * 128 + (q % 32) * 4 (no per-row pointer registers). */
#define PANEL_W(w8, NC, q) ((w8) + ((q) >> 5) * (NC) * 128 + ((q) & 31) * 4)

#ifdef BITLAB_X86
static inline __attribute__((always_inline)) int32_t load_i32(const int8_t *p) {
    int32_t d;
    memcpy(&d, p, 4);
    return d;
}

/* AVX2: maddubs(u8 act, s8 w) -> int16 pairs (|pair| <= 2*255 = 510), summed in int16 for up to
 * 64 steps (<= 32640), then madd with ones into int32. */
static inline __attribute__((always_inline)) TGT_AVX2 void
panel_avx2_body(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile, const int FLUSH_STEPS) {
    enum { MT = PANEL_AVX2_MT };
    const __m256i one16 = _mm256_set1_epi16(1);
    memset(tile, 0, sizeof(int32_t) * PANEL_AVX2_NC * MT);
    int64_t q = q0;
    while (q < q1) { /* 8 named int16 accumulators stay in registers; int32 sums live in the tile */
        int64_t lim = q + FLUSH_STEPS < q1 ? q + FLUSH_STEPS : q1;
#define AVX2_ROWS(X) X(0) X(1) X(2) X(3)
#define DECL(c) __m256i a##c##_0 = _mm256_setzero_si256(), a##c##_1 = _mm256_setzero_si256();
        AVX2_ROWS(DECL)
#undef DECL
        while (q < lim) { /* within one 128-k block the weight dwords of consecutive steps are 4 bytes apart */
          int64_t seg = ((q >> 5) + 1) << 5 < lim ? ((q >> 5) + 1) << 5 : lim;
          const int8_t *wq = PANEL_W(w8, PANEL_AVX2_NC, q);
          const uint8_t *xp = xt + q * MT * 4;
          for (; q < seg; q++, wq += 4, xp += MT * 4) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)xp), x1 = _mm256_loadu_si256((const __m256i *)(xp + 32));
#define STEP(c)                                                                                                \
    {                                                                                                          \
        __m256i b = _mm256_set1_epi32(load_i32(wq + c * 128));                                                \
        a##c##_0 = _mm256_add_epi16(a##c##_0, _mm256_maddubs_epi16(x0, b));                                    \
        a##c##_1 = _mm256_add_epi16(a##c##_1, _mm256_maddubs_epi16(x1, b));                                    \
        PIN(a##c##_0);                                                                                         \
        PIN(a##c##_1);                                                                                         \
    }
            AVX2_ROWS(STEP)
#undef STEP
          }
        }
#define FLUSH(c)                                                                                               \
    {                                                                                                          \
        __m256i *t0 = (__m256i *)(tile + c * MT), *t1 = (__m256i *)(tile + c * MT + 8);                        \
        _mm256_storeu_si256(t0, _mm256_add_epi32(_mm256_loadu_si256(t0), _mm256_madd_epi16(a##c##_0, one16))); \
        _mm256_storeu_si256(t1, _mm256_add_epi32(_mm256_loadu_si256(t1), _mm256_madd_epi16(a##c##_1, one16))); \
    }
        AVX2_ROWS(FLUSH)
#undef FLUSH
#undef AVX2_ROWS
    }
}

/* |w| <= 1 (ternary): 64 steps of |pair| <= 510; int4 (|w| <= 8, |pair| <= 4080): 8 steps */
static TGT_AVX2 void panel_avx2(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile) {
    panel_avx2_body(w8, xt, q0, q1, tile, 64);
}
static TGT_AVX2 void panel_avx2_i4(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile) {
    panel_avx2_body(w8, xt, q0, q1, tile, 8);
}

/* One int4 row (rb packed bytes) -> signed w in the permuted chunk order, into the blocked panel layout
 * (128 bytes = 2 chunks per block, blocks dst_stride apart), and each group's sum of w (groups of
 * gchunks chunks, the last one to Kp) into wsum[]. */
static TGT_AVX2 void unpack_i4_row_avx2(const uint8_t *src, int64_t rb, int8_t *dst, int64_t dst_stride, int64_t Kp,
                                        int64_t gchunks, int64_t G, int32_t *wsum) {
    const __m256i eight = _mm256_set1_epi8(8), zero = _mm256_setzero_si256();
    const int64_t chunks = Kp / 64;
    __m256i cs = zero;
    int64_t g = 0, gend = G > 1 ? gchunks : chunks, gstart = 0;
    for (int64_t c = 0; c < chunks; c++) {
        __m256i lo, hi;
        i4_codes(i4_load(src, rb, c), &lo, &hi);
        int8_t *d = dst + (c >> 1) * dst_stride + (c & 1) * 64;
        _mm256_storeu_si256((__m256i *)d, _mm256_sub_epi8(lo, eight));
        _mm256_storeu_si256((__m256i *)(d + 32), _mm256_sub_epi8(hi, eight));
        cs = _mm256_add_epi64(cs, _mm256_add_epi64(_mm256_sad_epu8(lo, zero), _mm256_sad_epu8(hi, zero)));
        if (c + 1 == gend) {
            int64_t t[4];
            _mm256_storeu_si256((__m256i *)t, cs);
            wsum[g] = (int32_t)(t[0] + t[1] + t[2] + t[3] - (c + 1 - gstart) * 64 * 8);
            cs = zero;
            gstart = c + 1;
            g++;
            gend = g == G - 1 ? chunks : gend + gchunks;
        }
    }
}

/* One packed ternary row of Kp (a multiple of 128) weights -> signed w = code - 1, written straight
 * into the blocked panel layout (128 bytes per block, blocks dst_stride apart), and the sum of w over
 * each group of `gruns` 32-runs (the last group runs to Kp) into wsum[]: sad_epu8 adds up the codes
 * in the same pass, and sum(w) = sum(code) - count. */
static TGT_AVX2 void unpack_tern_row_avx2(const uint8_t *src, int8_t *dst, int64_t dst_stride, int64_t Kp,
                                          int64_t gruns, int64_t G, int32_t *wsum) {
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1), zero = _mm256_setzero_si256();
    const int64_t runs = Kp / 32;
    __m256i cs = zero;
    int64_t g = 0, gend = G > 1 ? gruns : runs, gstart = 0;
    for (int64_t b = 0; b < Kp / 128; b++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(src + b * 32));
        for (int r = 0; r < 4; r++) {
            __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, 2 * r), m3);
            _mm256_storeu_si256((__m256i *)(dst + b * dst_stride + r * 32), _mm256_sub_epi8(c, one));
            cs = _mm256_add_epi64(cs, _mm256_sad_epu8(c, zero));
            int64_t run = b * 4 + r + 1; /* runs done */
            if (run == gend) {
                int64_t t[4];
                _mm256_storeu_si256((__m256i *)t, cs);
                wsum[g] = (int32_t)(t[0] + t[1] + t[2] + t[3] - (run - gstart) * 32);
                cs = zero;
                gstart = run;
                g++;
                gend = g == G - 1 ? runs : gend + gruns;
            }
        }
    }
}

/* AVX-512 VNNI: vpdpbusd(acc, u8 act, s8 w) accumulates straight into int32; 12 rows x 2 zmm of
 * 16 tokens = 24 accumulators of the 32 zmm registers. */
/* named accumulators: gcc keeps a 12x2 array of __m512i in memory, 24 named ones in registers */
#define ROWS12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define ROWS24(X) ROWS12(X) X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)

/* 12 rows x 32 tokens (2 zmm) */
static TGT_VNNI void panel_v512(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile) {
    enum { MT = PANEL_V512_MT };
#define DECL(c) __m512i a##c##_0 = _mm512_setzero_si512(), a##c##_1 = _mm512_setzero_si512();
    ROWS12(DECL)
#undef DECL
    for (int64_t q = q0; q < q1;) { /* segments within one 128-k block: pointer bumps, no index math */
      int64_t seg = ((q >> 5) + 1) << 5 < q1 ? ((q >> 5) + 1) << 5 : q1;
      const int8_t *wq = PANEL_W(w8, PANEL_V512_NC, q);
      const uint8_t *xp = xt + q * MT * 4;
      for (; q < seg; q++, wq += 4, xp += MT * 4) {
        __m512i x0 = _mm512_loadu_si512(xp), x1 = _mm512_loadu_si512(xp + 64);
#define STEP(c)                                                                                                \
    {                                                                                                          \
        __m512i b = _mm512_set1_epi32(load_i32(wq + c * 128));                                                 \
        a##c##_0 = _mm512_dpbusd_epi32(a##c##_0, x0, b);                                                       \
        a##c##_1 = _mm512_dpbusd_epi32(a##c##_1, x1, b);                                                       \
    }
        ROWS12(STEP)
#undef STEP
      }
    }
#define STORE(c)                                                                                               \
    _mm512_storeu_si512(tile + c * MT, a##c##_0);                                                              \
    _mm512_storeu_si512(tile + c * MT + 16, a##c##_1);
    ROWS12(STORE)
#undef STORE
}

/* 24 rows x 16 tokens (1 zmm): for 9..16 tokens, where a 32-token tile would waste half its lanes */
static TGT_VNNI void panel_v512_16(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile) {
    enum { MT = 16 };
#define DECL(c) __m512i a##c = _mm512_setzero_si512();
    ROWS24(DECL)
#undef DECL
    for (int64_t q = q0; q < q1;) {
      int64_t seg = ((q >> 5) + 1) << 5 < q1 ? ((q >> 5) + 1) << 5 : q1;
      const int8_t *wq = PANEL_W(w8, 24, q);
      const uint8_t *xp = xt + q * MT * 4;
      for (; q < seg; q++, wq += 4, xp += MT * 4) {
        __m512i x0 = _mm512_loadu_si512(xp);
#define STEP(c) a##c = _mm512_dpbusd_epi32(a##c, x0, _mm512_set1_epi32(load_i32(wq + c * 128)));
        ROWS24(STEP)
#undef STEP
      }
    }
#define STORE(c) _mm512_storeu_si512(tile + c * MT, a##c);
    ROWS24(STORE)
#undef STORE
}
const panel_fn bitlab_panel_v512_16 = panel_v512_16;
const panel_fn bitlab_panel_v512 = panel_v512;
#endif /* BITLAB_X86 */

/* y[m, n] from a panel tile: tile[g][c][mm] - 128 * sum of the group's weights */
static inline float rescale_panel(const job_t *j, const int32_t *tile, int64_t gstride, const int32_t *wsum,
                                  int64_t n, int64_t m) {
    RESCALE_BODY((int32_t)((uint32_t)tile[g * gstride] - (uint32_t)XT_OFFSET * (uint32_t)wsum[g])) /* exact mod 2^32 */
}

/* batched path: blocks of pnc output channels in [n0, n1) against every tile of pmt tokens */
BITLAB_INTERNAL int bitlab_panel_cols(job_t *j, int64_t n0, int64_t n1) {
    const int NC = j->pnc, MT = j->pmt;
    const int64_t Kp = j->Kp, Q = Kp / 4, G = j->G, tiles = (j->M + MT - 1) / MT;
    const int64_t Kb = (Kp + 127) / 128, gstride = (int64_t)NC * MT;
    int8_t *w8 = (int8_t *)aligned_alloc(64, (size_t)(NC * Kb * 128));
    int8_t *row = (int8_t *)aligned_alloc(64, (size_t)(Kb * 128));
    int32_t *wsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(NC * G));
    int32_t *tile = (int32_t *)aligned_alloc(64, sizeof(int32_t) * (size_t)(G * gstride));
    if (!w8 || !row || !wsum || !tile) {
        free(w8); free(row); free(wsum); free(tile);
        return -1;
    }
    panel_fn fn = NULL;
#ifdef BITLAB_X86
    if (j->isa == ISA_VNNI) fn = MT == 16 ? bitlab_panel_v512_16 : bitlab_panel_v512;
    else fn = j->wfmt == W_INT4 ? panel_avx2_i4 : panel_avx2;
#endif
#ifdef BITLAB_ARM
    fn = bitlab_panel_arm(j);
#endif
    memset(row, 0, (size_t)(Kb * 128));
    for (int64_t n = n0; n < n1; n += NC) {
        int nc = n1 - n < NC ? (int)(n1 - n) : NC;
        for (int c = 0; c < NC; c++) {
            if (c >= nc) {
                memset(row, 0, (size_t)Kp);
            } else {
#ifdef BITLAB_X86
                if (j->wfmt == W_TERNARY) {
                    unpack_tern_row_avx2((const uint8_t *)j->w + (n + c) * (Kp / 4), w8 + c * 128, (int64_t)NC * 128,
                                         Kp, j->gs / 32, G, wsum + c * G);
                    continue;
                }
                if (j->wfmt == W_INT4) {
                    const int64_t rb = (j->K + 1) / 2;
                    unpack_i4_row_avx2((const uint8_t *)j->w + (n + c) * rb, rb, w8 + c * 128, (int64_t)NC * 128, Kp,
                                       j->gs / 64, G, wsum + c * G);
                    continue;
                }
#endif
#ifdef BITLAB_ARM
                bitlab_unpack_row_arm(j, n + c, row); /* any format: Kp signed weights in the order of xq */
#else
                memcpy(row, (const int8_t *)j->w + (n + c) * j->K, (size_t)j->K);
                memset(row + j->K, 0, (size_t)(Kp - j->K));
#endif
                for (int64_t g = 0; g < G; g++) {
                    int64_t k0 = g * j->gs, k1 = g == G - 1 ? Kp : k0 + j->gs;
                    wsum[c * G + g] = XT_OFFSET ? bitlab_row_sum(j, row + k0, k1 - k0) : 0;
                }
            }
            for (int64_t b = 0; b < Kb; b++) memcpy(w8 + (b * NC + c) * 128, row + b * 128, 128);
        }
        for (int64_t t = 0; t < tiles; t++) {
            const uint8_t *xt = j->xt + t * Q * MT * 4;
            for (int64_t g = 0; g < G; g++) {
                int64_t q0 = g * j->gs / 4, q1 = g == G - 1 ? Q : (g + 1) * j->gs / 4;
                fn(w8, xt, q0, q1, tile + g * gstride);
            }
            int64_t mm_end = j->M - t * MT < MT ? j->M - t * MT : MT;
            for (int64_t mm = 0; mm < mm_end; mm++) {
                float *o = j->out + (t * MT + mm) * j->N + n;
                for (int c = 0; c < nc; c++)
                    o[c] = rescale_panel(j, tile + c * MT + mm, gstride, wsum + c * G, n + c, t * MT + mm);
            }
        }
    }
    free(w8); free(row); free(wsum); free(tile);
    return 0;
}
