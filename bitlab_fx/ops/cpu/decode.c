/* decode.c: M == 1 (one token: the decode step of a language model), output rows [n0, n1) of a thread
 * in one loop per weight format and ISA: ternary, int8 and int4 weights on AVX2 and AVX-512 VNNI
 * (256-bit), 4 rows per tile with the next tile's rows prefetched and a 4-lane vector epilogue that
 * rounds like the scalar rescale. run_thread (bitlab_cpu.c) calls them through bitlab_decode_*; with per-group
 * scales, ternary and int8 groups of whole units run the same rows functions over each group's units, the
 * group sums rescaled and added in RESCALE_BODY's order (decode_groups.c picks the loop and holds the others).
 * x86 only (ARM64: decode_neon.c). */
#include "bitlab_cpu.h"

#ifdef BITLAB_X86
/* Decode epilogue shared by the AVX2 and VNNI decode loops: four rows' int32 vectors -> their
 * four sums (one hadd tree), then the epilogue of bitlab_cpu.h on 4 lanes: the integer biases of int_bias_at,
 * y = (float)exact * ws / s (+ bias), which rounds exactly like epilogue1 (separate IEEE mul, div, add; no FMA). */
static inline __attribute__((always_inline)) TGT_AVX2 __m128i sum4_rows(__m256i t0, __m256i t1, __m256i t2,
                                                                        __m256i t3) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(t0, t1), _mm256_hadd_epi32(t2, t3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* epilogue1 of rows n .. n+3 of the one token, from their exact sums */
static inline __attribute__((always_inline)) TGT_AVX2 void epilogue4(const job_t *j, int64_t n, __m128i exact) {
    if (j->bias_q || j->bias_tok)
        exact = _mm_add_epi32(exact, _mm_setr_epi32(int_bias_at(j, 0, n), int_bias_at(j, 0, n + 1),
                                                    int_bias_at(j, 0, n + 2), int_bias_at(j, 0, n + 3)));
    __m128 ws = j->ws_kind ? _mm_loadu_ps(j->ws + n) : _mm_set1_ps(j->ws[0]);
    __m128 y = _mm_div_ps(_mm_mul_ps(_mm_cvtepi32_ps(exact), ws), _mm_set1_ps(j->s[0]));
    if (j->bias) y = _mm_add_ps(y, _mm_loadu_ps(j->bias + n));
    _mm_storeu_ps(j->out + n, y);
}

/* acc = sum(code * xq) with unsigned codes = w + off (off 1 for ternary, 8 for int4): subtract off * sum(xq) */
static inline __attribute__((always_inline)) TGT_AVX2 void store4_rows(const job_t *j, int64_t n, __m128i acc,
                                                                       int32_t off) {
    epilogue4(j, n, _mm_sub_epi32(acc, _mm_set1_epi32((int32_t)((uint32_t)off * (uint32_t)j->gsum[0]))));
}

static inline __attribute__((always_inline)) void store1_row(const job_t *j, int64_t n, int32_t acc, int32_t off) {
    j->out[n] = epilogue1(j, 0, n, (int32_t)((uint32_t)acc - (uint32_t)off * (uint32_t)j->gsum[0]));
}

/* A decode driver: output rows [n0, n1) in 4-row tiles (prefetching the next tile's rows), then the ragged
 * end one row at a time. ROWS(w, stride, NR, xq, u0, u1, pf) returns the NR rows' sums of code * xq over the
 * units (128-blocks, 64-k chunks, 32-k chunks) [u0, u1); STRIDE: bytes per stored row; COUNT: the units of a
 * row; OFF: codes are w + OFF. */
#define DEFINE_DECODE(NAME, TGT, ROWS, STRIDE, COUNT, OFF)                                                      \
    static TGT void NAME(const job_t *j, int64_t n0, int64_t n1) {                                             \
        const int64_t stride = (STRIDE), count = (COUNT);                                                      \
        const uint8_t *w = (const uint8_t *)j->w;                                                              \
        int64_t n = n0;                                                                                        \
        for (; n + 4 <= n1; n += 4)                                                                            \
            store4_rows(j, n, ROWS(w + n * stride, stride, 4, j->xq, 0, count, n + 8 <= n1 ? 4 * stride : 0), OFF); \
        for (; n < n1; n++)                                                                                    \
            store1_row(j, n, _mm_cvtsi128_si32(ROWS(w + n * stride, stride, 1, j->xq, 0, count, 0)), OFF);     \
    }

/* A per-group decode driver (groups of whole units: gs / UNIT_K of them): like DEFINE_DECODE, with ROWS run over
 * each group's units and the group sums rescaled as they come (group_add, bitlab_cpu.h). */
#define DEFINE_DECODE_GROUPS(NAME, TGT, ROWS, STRIDE, UNIT_K, OFF)                                              \
    static inline __attribute__((always_inline)) TGT void NAME##_tile(const job_t *j, int64_t n, const int NR,  \
                                                                      int64_t pf) {                           \
        const int64_t stride = (STRIDE), per = j->gs / (UNIT_K);                                               \
        const uint8_t *w = (const uint8_t *)j->w + n * stride;                                                 \
        __m128 y = _mm_setzero_ps();                                                                           \
        for (int64_t g = 0; g < j->G; g++)                                                                     \
            y = group_add(j, n, NR, g, ROWS(w, stride, NR, j->xq, g * per, (g + 1) * per, pf), OFF, y);        \
        group_store(j, n, NR, y);                                                                              \
    }                                                                                                          \
    DEFINE_ROW_WALK(NAME, TGT, STRIDE)

/* ------------------------------------------------------------------------------------------ */
/* Decode (M == 1, ternary, per-tensor or per-channel scale): output rows [n0, n1) in one      */
/* function, 4 rows per tile, no per-tile calls. The byte masks 3 << 2r leave code * 4^r, so   */
/* run r of a 128-block accumulates 4^r * sum(code * x) in its own chain (exact shifts back at  */
/* the end; the four chains also hide vpdpbusd's latency). The next tile's rows are prefetched  */
/* (each tile starts new pages, where the hardware prefetcher is cold). The four row sums are   */
/* reduced together and rescaled with 4-lane vector ops, which round exactly like the scalar    */
/* (float)a * ws / s + bias.                                                                    */
/* ------------------------------------------------------------------------------------------ */
static inline __attribute__((always_inline)) TGT_VNNI __m128i
decode_rows_part(const uint8_t *w, int64_t stride, const int NR, const int8_t *x, int64_t blocks, int64_t pf);

static inline __attribute__((always_inline)) TGT_VNNI __m128i
decode_rows(const uint8_t *w, int64_t stride, const int NR, const int8_t *x, int64_t b0, int64_t b1, int64_t pf) {
    const int64_t blocks = b1 - b0;
    w += b0 * 32;
    x += b0 * 128;
    if (blocks <= DECODE_MAX_RUNS / 4) return decode_rows_part(w, stride, NR, x, blocks, pf);
    __m128i total = _mm_setzero_si128(); /* very long rows: exact int32 partial sums, added with wrap */
    for (int64_t b = 0; b < blocks; b += DECODE_MAX_RUNS / 4) {
        int64_t nb = blocks - b < DECODE_MAX_RUNS / 4 ? blocks - b : DECODE_MAX_RUNS / 4;
        total = _mm_add_epi32(total, decode_rows_part(w + b * 32, stride, NR, x + b * 128, nb, pf));
    }
    return total;
}

static inline __attribute__((always_inline)) TGT_VNNI __m128i
decode_rows_part(const uint8_t *w, int64_t stride, const int NR, const int8_t *x, int64_t blocks, int64_t pf) {
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i mk1 = _mm256_slli_epi16(m3, 2), mk2 = _mm256_slli_epi16(m3, 4), mk3 = _mm256_slli_epi16(m3, 6);
    __m256i a[4][4];
    for (int n = 0; n < NR; n++)
        for (int r = 0; r < 4; r++) a[n][r] = _mm256_setzero_si256();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *xb = x + b * 128;
        __m256i x0 = _mm256_loadu_si256((const __m256i *)xb), x1 = _mm256_loadu_si256((const __m256i *)(xb + 32));
        __m256i x2 = _mm256_loadu_si256((const __m256i *)(xb + 64)), x3 = _mm256_loadu_si256((const __m256i *)(xb + 96));
        if (pf && (b & 1))
            for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * stride + pf + b * 32), _MM_HINT_T0);
        for (int n = 0; n < NR; n++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + n * stride + b * 32));
            a[n][0] = _mm256_dpbusd_epi32(a[n][0], _mm256_and_si256(wv, m3), x0);
            a[n][1] = _mm256_dpbusd_epi32(a[n][1], _mm256_and_si256(wv, mk1), x1);
            a[n][2] = _mm256_dpbusd_epi32(a[n][2], _mm256_and_si256(wv, mk2), x2);
            a[n][3] = _mm256_dpbusd_epi32(a[n][3], _mm256_and_si256(wv, mk3), x3);
            PINV(a[n][0]); PINV(a[n][1]); PINV(a[n][2]); PINV(a[n][3]);
        }
    }
    __m256i t[4];
    for (int n = 0; n < 4; n++) {
        if (n < NR) {
            t[n] = _mm256_add_epi32(a[n][0], _mm256_srai_epi32(a[n][1], 2));
            t[n] = _mm256_add_epi32(t[n], _mm256_add_epi32(_mm256_srai_epi32(a[n][2], 4), _mm256_srai_epi32(a[n][3], 6)));
        } else {
            t[n] = _mm256_setzero_si256();
        }
    }
    return sum4_rows(t[0], t[1], t[2], t[3]);
}

DEFINE_DECODE(decode_vnni, TGT_VNNI, decode_rows, j->Kp / 4, j->Kp / 128, 1)
void bitlab_decode_vnni(const job_t *j, int64_t n0, int64_t n1) { decode_vnni(j, n0, n1); }

/* Decode with int8 weights (M == 1, VNNI): vpdpbusd wants one unsigned operand, so the activations go
 * in as xq + 128 (u8) and each row's sum of weights, from a second vpdpbusd against ones, takes
 * 128 * sum(w) back out: exact for every xq including -128. Rows are K bytes (not padded): whole
 * 32-byte chunks here, the tail in scalar code. */
static inline __attribute__((always_inline)) TGT_VNNI __m128i
decode_rows_i8(const int8_t *w, int64_t stride, const int NR, const uint8_t *xu, int64_t chunks, int64_t pf,
               __m128i *wsum4) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256i a[4], s[4];
    for (int n = 0; n < 4; n++) a[n] = s[n] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; c++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xu + c * 32));
        if (pf && !(c & 1))
            for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * stride + pf + c * 32), _MM_HINT_T0);
        for (int n = 0; n < NR; n++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + n * stride + c * 32));
            a[n] = _mm256_dpbusd_epi32(a[n], xv, wv);
            s[n] = _mm256_dpbusd_epi32(s[n], ones, wv);
            PINV(a[n]); PINV(s[n]);
        }
    }
    *wsum4 = sum4_rows(s[0], s[1], s[2], s[3]);
    return sum4_rows(a[0], a[1], a[2], a[3]);
}

static TGT_VNNI int decode_i8_vnni(const job_t *j, int64_t n0, int64_t n1) {
    const int64_t K = j->K, chunks = K / 32;
    const int8_t *w = (const int8_t *)j->w;
    uint8_t *xu = (uint8_t *)malloc((size_t)(chunks * 32 + 1));
    if (!xu) return -1;
    for (int64_t k = 0; k < chunks * 32; k++) xu[k] = (uint8_t)(j->xq[k] ^ 0x80);
    int64_t n = n0;
    for (; n < n1; n += 4) {
        int nr = n1 - n < 4 ? (int)(n1 - n) : 4;
        int64_t pf = n + 8 <= n1 ? 4 * K : 0; /* the next tile's rows */
        int32_t t[4], ws[4];
        if (nr == 4) {
            __m128i wsum, acc = decode_rows_i8(w + n * K, K, 4, xu, chunks, pf, &wsum);
            _mm_storeu_si128((__m128i *)t, acc);
            _mm_storeu_si128((__m128i *)ws, wsum);
        } else { /* one row at a time in the ragged end */
            for (int r = 0; r < nr; r++) {
                __m128i wr, ar = decode_rows_i8(w + (n + r) * K, K, 1, xu, chunks, 0, &wr);
                t[r] = _mm_cvtsi128_si32(ar);
                ws[r] = _mm_cvtsi128_si32(wr);
            }
        }
        for (int r = 0; r < nr; r++) {
            const int8_t *row = w + (n + r) * K;
            int32_t tail = 0;
            for (int64_t k = chunks * 32; k < K; k++) tail += (int32_t)row[k] * j->xq[k];
            /* = sum_k xq * w; the partial sums may wrap, the result is exact mod 2^32 (and in range) */
            t[r] = (int32_t)((uint32_t)t[r] - 128u * (uint32_t)ws[r] + (uint32_t)tail);
        }
        if (nr == 4) epilogue4(j, n, _mm_loadu_si128((const __m128i *)t));
        else
            for (int r = 0; r < nr; r++) j->out[n + r] = epilogue1(j, 0, n + r, t[r]);
    }
    free(xu);
    return 0;
}
int bitlab_decode_i8_vnni(const job_t *j, int64_t n0, int64_t n1) { return decode_i8_vnni(j, n0, n1); }

/* Decode with int4 weights (VNNI): vpdpbusd(u = w + 8, xq) per half-chunk, one chain per row and parity. */
static inline __attribute__((always_inline)) TGT_VNNI __m128i
decode_rows_i4(const uint8_t *w, int64_t rb, const int NR, const int8_t *x, int64_t c0, int64_t c1, int64_t pf) {
    __m256i a[4][2];
    for (int n = 0; n < 4; n++) a[n][0] = a[n][1] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; c++) {
        __m256i xe = _mm256_loadu_si256((const __m256i *)(x + c * 64));
        __m256i xo = _mm256_loadu_si256((const __m256i *)(x + c * 64 + 32));
        if (pf && !(c & 1))
            for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * rb + pf + c * 32), _MM_HINT_T0);
        for (int n = 0; n < NR; n++) {
            __m256i lo, hi;
            i4_codes(i4_load(w + n * rb, rb, c), &lo, &hi);
            a[n][0] = _mm256_dpbusd_epi32(a[n][0], lo, xe);
            a[n][1] = _mm256_dpbusd_epi32(a[n][1], hi, xo);
            PINV(a[n][0]); PINV(a[n][1]);
        }
    }
    return sum4_rows(_mm256_add_epi32(a[0][0], a[0][1]), _mm256_add_epi32(a[1][0], a[1][1]),
                     _mm256_add_epi32(a[2][0], a[2][1]), _mm256_add_epi32(a[3][0], a[3][1]));
}

DEFINE_DECODE(decode_i4_vnni, TGT_VNNI, decode_rows_i4, (j->K + 1) / 2, ((j->K + 1) / 2 + 31) / 32, 8)
void bitlab_decode_i4_vnni(const job_t *j, int64_t n0, int64_t n1) { decode_i4_vnni(j, n0, n1); }

/* Decode (M == 1) with int4 weights on AVX2: maddubs(u, xq) pairs <= 2 * 15 * 128 = 3840, two per chunk
 * into one int16 accumulator per row, widened every 4 chunks (<= 30720). */
static inline __attribute__((always_inline)) TGT_AVX2 __m128i
decode_rows_i4_avx2(const uint8_t *w, int64_t rb, const int NR, const int8_t *x, int64_t c0, int64_t c1,
                    int64_t pf) {
    (void)pf; /* no software prefetch in this loop (the DEFINE_DECODE signature passes one) */
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i a32[4];
    for (int n = 0; n < 4; n++) a32[n] = _mm256_setzero_si256();
    int64_t c = c0;
    while (c < c1) {
        int64_t lim = c + 4 < c1 ? c + 4 : c1;
        __m256i a16[4];
        for (int n = 0; n < NR; n++) a16[n] = _mm256_setzero_si256();
        for (; c < lim; c++) {
            __m256i xe = _mm256_loadu_si256((const __m256i *)(x + c * 64));
            __m256i xo = _mm256_loadu_si256((const __m256i *)(x + c * 64 + 32));
            for (int n = 0; n < NR; n++) {
                __m256i lo, hi;
                i4_codes(i4_load(w + n * rb, rb, c), &lo, &hi);
                a16[n] = _mm256_add_epi16(a16[n], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe),
                                                                   _mm256_maddubs_epi16(hi, xo)));
            }
        }
        for (int n = 0; n < NR; n++) a32[n] = _mm256_add_epi32(a32[n], _mm256_madd_epi16(a16[n], one16));
    }
    return sum4_rows(a32[0], a32[1], a32[2], a32[3]);
}

DEFINE_DECODE(decode_i4_avx2, TGT_AVX2, decode_rows_i4_avx2, (j->K + 1) / 2, ((j->K + 1) / 2 + 31) / 32, 8)

/* Decode (M == 1) on AVX2: like the VNNI loop (decode_rows), 4 rows per tile in one function, but maddubs
 * needs small codes: (byte >> 2r) & 3, products <= 2 * 128, one int16 accumulator per row gains
 * <= 4 * 512 per block, so it is widened to int32 every 8 blocks. */
static inline __attribute__((always_inline)) TGT_AVX2 __m128i
decode_rows_avx2(const uint8_t *w, int64_t stride, const int NR, const int8_t *x, int64_t b0, int64_t b1,
                 int64_t pf) {
    const __m256i m3 = _mm256_set1_epi8(3), one16 = _mm256_set1_epi16(1);
    __m256i a32[4];
    for (int n = 0; n < 4; n++) a32[n] = _mm256_setzero_si256();
    int64_t b = b0;
    while (b < b1) {
        int64_t lim = b + 8 < b1 ? b + 8 : b1;
        __m256i a16[4];
        for (int n = 0; n < NR; n++) a16[n] = _mm256_setzero_si256();
        for (; b < lim; b++) {
            const int8_t *xb = x + b * 128;
            if (pf && (b & 1))
                for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * stride + pf + b * 32), _MM_HINT_T0);
            __m256i wv[4];
            for (int n = 0; n < NR; n++) wv[n] = _mm256_loadu_si256((const __m256i *)(w + n * stride + b * 32));
            for (int r = 0; r < 4; r++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xb + 32 * r));
                for (int n = 0; n < NR; n++) {
                    __m256i c = _mm256_and_si256(_mm256_srli_epi16(wv[n], 2 * r), m3);
                    a16[n] = _mm256_add_epi16(a16[n], _mm256_maddubs_epi16(c, xv));
                    PIN(a16[n]);
                }
            }
        }
        for (int n = 0; n < NR; n++) a32[n] = _mm256_add_epi32(a32[n], _mm256_madd_epi16(a16[n], one16));
    }
    return sum4_rows(a32[0], a32[1], a32[2], a32[3]);
}

DEFINE_DECODE(decode_avx2, TGT_AVX2, decode_rows_avx2, j->Kp / 4, j->Kp / 128, 1)

/* Decode with int8 weights on AVX2 (no xq == -128): maddubs(|w|, sign(xq, w)), |pair| <= 2 * 128 * 127 < 32768,
 * widened to int32 by madd every chunk; 4 rows per tile, rows of K bytes, the tail in scalar code. */
static inline __attribute__((always_inline)) TGT_AVX2 __m128i
decode_rows_i8_avx2(const int8_t *w, int64_t K, const int NR, const int8_t *x, int64_t c0, int64_t c1, int64_t pf) {
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i a[4];
    for (int n = 0; n < 4; n++) a[n] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; c++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + c * 32));
        if (pf && !(c & 1))
            for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * K + pf + c * 32), _MM_HINT_T0);
        for (int n = 0; n < NR; n++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + n * K + c * 32));
            __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
            a[n] = _mm256_add_epi32(a[n], _mm256_madd_epi16(p, one16));
        }
    }
    return sum4_rows(a[0], a[1], a[2], a[3]);
}

static TGT_AVX2 void decode_i8_avx2(const job_t *j, int64_t n0, int64_t n1) {
    const int64_t K = j->K, chunks = K / 32;
    const int8_t *w = (const int8_t *)j->w;
    for (int64_t n = n0; n < n1; n += 4) {
        int nr = n1 - n < 4 ? (int)(n1 - n) : 4;
        int32_t t[4];
        if (nr == 4) {
            int64_t pf = n + 8 <= n1 ? 4 * K : 0; /* the next tile's rows */
            _mm_storeu_si128((__m128i *)t, decode_rows_i8_avx2(w + n * K, K, 4, j->xq, 0, chunks, pf));
        } else {
            for (int r = 0; r < nr; r++)
                t[r] = _mm_cvtsi128_si32(decode_rows_i8_avx2(w + (n + r) * K, K, 1, j->xq, 0, chunks, 0));
        }
        for (int r = 0; r < nr; r++) {
            const int8_t *row = w + (n + r) * K;
            for (int64_t k = chunks * 32; k < K; k++) t[r] += (int32_t)row[k] * j->xq[k];
        }
        if (nr == 4) {
            store4_rows(j, n, _mm_loadu_si128((const __m128i *)t), 0);
        } else {
            for (int r = 0; r < nr; r++) store1_row(j, n + r, t[r], 0);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Decode with per-group scales (ws_kind 2), ternary groups of whole 128-blocks and int8 groups */
/* of whole 32-k chunks: the rows functions above over each group's units (DEFINE_DECODE_GROUPS, */
/* bitlab_decode_groups_*). The other per-group loops and the choice are in decode_groups.c.    */
/* ------------------------------------------------------------------------------------------ */
/* int8 rows for per-group scales on VNNI: vpdpbusd(u = w + 128 (w ^ 0x80), xq), exact mod 2^32 for every xq;
 * the driver takes 128 * sum(xq over the group) back out (OFF 128). Groups are whole 32-k chunks: no tail. */
static inline __attribute__((always_inline)) TGT_VNNI __m128i
decode_rows_i8u_vnni(const uint8_t *w, int64_t K, const int NR, const int8_t *x, int64_t c0, int64_t c1, int64_t pf) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256i a[4];
    for (int n = 0; n < 4; n++) a[n] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; c++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + c * 32));
        if (pf && !(c & 1))
            for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * K + pf + c * 32), _MM_HINT_T0);
        for (int n = 0; n < NR; n++) {
            __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + n * K + c * 32)), flip);
            a[n] = _mm256_dpbusd_epi32(a[n], u, xv);
            PINV(a[n]);
        }
    }
    return sum4_rows(a[0], a[1], a[2], a[3]);
}

/* int8 rows on AVX2 (no xq == -128) in the drivers' byte-pointer signature */
static inline __attribute__((always_inline)) TGT_AVX2 __m128i
decode_rows_i8g_avx2(const uint8_t *w, int64_t K, const int NR, const int8_t *x, int64_t c0, int64_t c1, int64_t pf) {
    return decode_rows_i8_avx2((const int8_t *)w, K, NR, x, c0, c1, pf);
}

DEFINE_DECODE_GROUPS(decode_groups_vnni, TGT_VNNI, decode_rows, j->Kp / 4, 128, 1)
DEFINE_DECODE_GROUPS(decode_groups_avx2, TGT_AVX2, decode_rows_avx2, j->Kp / 4, 128, 1)
DEFINE_DECODE_GROUPS(decode_groups_i8_vnni, TGT_VNNI, decode_rows_i8u_vnni, j->K, 32, 128)
DEFINE_DECODE_GROUPS(decode_groups_i8_avx2, TGT_AVX2, decode_rows_i8g_avx2, j->K, 32, 0)

BITLAB_INTERNAL void bitlab_decode_groups_vnni(const job_t *j, int64_t n0, int64_t n1) { decode_groups_vnni(j, n0, n1); }
BITLAB_INTERNAL void bitlab_decode_groups_avx2(const job_t *j, int64_t n0, int64_t n1) { decode_groups_avx2(j, n0, n1); }
BITLAB_INTERNAL void bitlab_decode_groups_i8_vnni(const job_t *j, int64_t n0, int64_t n1) {
    decode_groups_i8_vnni(j, n0, n1);
}
BITLAB_INTERNAL void bitlab_decode_groups_i8_avx2(const job_t *j, int64_t n0, int64_t n1) {
    decode_groups_i8_avx2(j, n0, n1);
}

void bitlab_decode_avx2(const job_t *j, int64_t n0, int64_t n1) { decode_avx2(j, n0, n1); }
void bitlab_decode_i8_avx2(const job_t *j, int64_t n0, int64_t n1) { decode_i8_avx2(j, n0, n1); }
void bitlab_decode_i4_avx2(const job_t *j, int64_t n0, int64_t n1) { decode_i4_avx2(j, n0, n1); }
#endif /* BITLAB_X86 */
