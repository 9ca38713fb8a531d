/* bitlab_fx CPU kernels: int8 activations x ternary (2-bit packed) or int8 weights.
 *
 * Plain C, no torch headers; loaded with ctypes (see __init__.py / _build.py). Compiled with
 * -O3 -ffp-contract=off (so the fp32 rescale rounds exactly like reference.py) and, when available,
 * -fopenmp (sharing torch's libgomp, so both use one thread pool).
 *
 * Math (identical to reference.py):
 *   s[m]  = (1 / max(|x[m,:]|, 1e-5)) * 127     per token (per row), or over all rows, or static
 *   xq    = clamp(round_half_even(x * s), -128, 127)
 *   acc   = sum_k xq[m,k] * w[n,k]                 exact int32
 *   y     = (float)acc * ws[n] / s[m]  (+ bias[n]) per tensor / per channel
 *   y     = (sum_g (float)acc_g * ws[n,g]) / s[m]  per group
 *
 * Ternary weights are packed as codes c = w + 1 in {0,1,2} (see quant/packing.py): in each
 * 128-wide block, byte j holds k = j, j+32, j+64, j+96 in bits 0-1, 2-3, 4-5, 6-7. A "run" below
 * is 32 consecutive k (run r of block b covers k = 128b + 32r .. +31). The small-M kernels compute
 * sum(xq * c) with unsigned codes and subtract sum(xq) once per row (and group); the batched GEMM
 * computes sum((xq + 128) * w) with signed w and subtracts 128 * sum(w) (same integers).
 *
 * Paths, per call: M == 1 (ternary, per-tensor/per-channel scales): decode_avx2/decode_vnni, one
 * loop over a thread's rows in 4-row tiles with a vector epilogue. Small M: dot-product tiles of
 * up to 4 rows x 4 tokens through function tables. M >= the batched threshold: panel_cols, tokens
 * in vector lanes (see "Batched GEMM" below).
 *
 * ISA: scalar (portable), AVX2 (maddubs, int16 partial sums flushed to int32 before they can
 * overflow), AVX-512 VNNI (vpdpbusd, int32 accumulation; 256-bit vectors except in the batched
 * GEMM, which uses all 32 zmm registers). Chosen at run time with __builtin_cpu_supports.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define BITLAB_X86 1
#include <immintrin.h>
#endif

#define BITLAB_ABI 7
#ifndef BITLAB_PART
#define BITLAB_PART 0 /* 0: whole library in one unit; 1: core + scalar + AVX2; 2: VNNI tiles */
#endif
#define EPS 1e-5f
#define MAXT 4 /* max register tile in n and in m */
/* The VNNI decode loops accumulate run r of each 128-block as 4^r * sum(code * xq): a lane gains
 * <= 4 * 128 * 128 per block in the last chain, so they fold into exact int32 sums every
 * DECODE_MAX_RUNS / 4 blocks (2^31 / 65536 = 32768 blocks would wrap). */
#define DECODE_MAX_RUNS (4 * 16384)

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };
enum { W_TERNARY = 0, W_INT8 = 1, W_INT4 = 2 };
enum { ACT_TOKEN = 0, ACT_TENSOR = 1, ACT_STATIC = 2, ACT_GIVEN = 3 };

#if BITLAB_PART != 2
static int g_isa = -1;

int bitlab_abi_version(void) { return BITLAB_ABI; }

int bitlab_best_isa(void) {
#ifdef BITLAB_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512bw"))
            return ISA_VNNI;
        return ISA_AVX2;
    }
#endif
    return ISA_SCALAR;
}

/* Select the ISA (clamped to what the CPU has); returns the one in use. */
int bitlab_set_isa(int isa) {
    int best = bitlab_best_isa();
    g_isa = (isa < 0 || isa > best) ? best : isa;
    return g_isa;
}

static int isa(void) {
    if (g_isa < 0) bitlab_set_isa(-1);
    return g_isa;
}
#endif

typedef void (*panel_fn)(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile);
/* w8 is blocked: [Kp/128][NC][128], so row c of step q sits at a constant offset c * 128 from
 * w8 + (q / 32) * NC * 128 + (q % 32) * 4 (no per-row pointer registers). */
#define PANEL_W(w8, NC, q) ((w8) + ((q) >> 5) * (NC) * 128 + ((q) & 31) * 4)

/* ------------------------------------------------------------------------------------------ */
/* Work description shared by all threads.                                                     */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    /* inputs */
    const float *x;        /* [M, K] fp32 (NULL when xq_in is given) */
    const int8_t *xq_in;   /* [M, K] pre-quantized activations (conv path) */
    const float *s_in;     /* [M] multipliers for xq_in */
    int64_t M, K, N;
    int wfmt;
    const void *w;         /* ternary: uint8 [N, Kp/4]; int8: int8 [N, K] */
    const float *ws;       /* [1], [N] or [N, G] */
    int ws_kind;           /* 0 per tensor, 1 per channel, 2 per group */
    int64_t G, gs;         /* groups, group size in k */
    const float *bias;     /* [N] or NULL */
    int act;
    float static_s;
    float *out;            /* [M, N] fp32 */
    /* scratch */
    int64_t Kp;            /* padded row length of xq */
    int8_t *xq;            /* [M, Kp] */
    float *s;              /* [M] */
    float *amax;           /* [M] */
    int32_t *gsum;         /* [M, G] sum of xq over each group */
    int has_m128;          /* some xq == -128 (only possible with a static scale) */
    int isa;
    int nr, mr;            /* register tile */
    /* batched GEMM (see "tokens in vector lanes") */
    uint8_t *xt;           /* [ceil(M/pmt)][Kp/4][pmt][4] xq + 128, or NULL: the small-M tiles */
    int pnc, pmt;          /* weight rows per block, tokens per tile */
    int failed;            /* a thread could not allocate its scratch */
} job_t;

/* ------------------------------------------------------------------------------------------ */
/* Activation quantization                                                                     */
/* ------------------------------------------------------------------------------------------ */
static float absmax_scalar(const float *x, int64_t n) {
    float m = 0.f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        m = a > m ? a : m;
    }
    return m;
}

static int quant_scalar(const float *x, int64_t n, float s, int8_t *q) {
    int m128 = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] * s;
        if (v != v) v = 0.f;
        v = v > 127.f ? 127.f : v;
        v = v < -128.f ? -128.f : v;
        int r = (int)nearbyintf(v);
        m128 |= (r == -128);
        q[i] = (int8_t)r;
    }
    return m128;
}

static int32_t sum_i8_scalar(const int8_t *q, int64_t n) {
    int32_t s = 0;
    for (int64_t i = 0; i < n; i++) s += q[i];
    return s;
}

#ifdef BITLAB_X86
/* Keep an accumulator in a register at this point: stops gcc from re-associating the add chains
 * into trees that need more registers than AVX2 has (which made it spill every accumulator). */
#define PIN(v) __asm__("" : "+x"(v))
#define PINV(v) __asm__("" : "+v"(v)) /* any of the 32 AVX-512 registers */
#define TGT_AVX2 __attribute__((target("avx2,fma")))
#define TGT_VNNI __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

static TGT_AVX2 float absmax_avx2(const float *x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
        m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i + 8)));
    }
    m0 = _mm256_max_ps(m0, m1);
    float t[8];
    _mm256_storeu_ps(t, m0);
    float m = absmax_scalar(x + i, n - i);
    for (int j = 0; j < 8; j++) m = t[j] > m ? t[j] : m;
    return m;
}

static TGT_AVX2 int quant_avx2(const float *x, int64_t n, float s, int8_t *q) {
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i vmin = _mm256_set1_epi32(0);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; j++) {
            __m256 f = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vs);
            /* max/min return the second operand for NaN -> clamps NaN to -128/127, never UB */
            f = _mm256_min_ps(_mm256_max_ps(f, lo), hi);
            v[j] = _mm256_cvtps_epi32(f); /* MXCSR default: round half to even */
            vmin = _mm256_min_epi32(vmin, v[j]);
        }
        __m256i p01 = _mm256_packs_epi32(v[0], v[1]);
        __m256i p23 = _mm256_packs_epi32(v[2], v[3]);
        __m256i b = _mm256_packs_epi16(p01, p23);
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(b, perm));
    }
    int32_t t[8];
    _mm256_storeu_si256((__m256i *)t, vmin);
    int m128 = 0;
    for (int j = 0; j < 8; j++) m128 |= (t[j] == -128);
    return m128 | quant_scalar(x + i, n - i, s, q + i);
}

static TGT_AVX2 int32_t sum_i8_avx2(const int8_t *q, int64_t n) {
    const __m256i one8 = _mm256_set1_epi8(1), one16 = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i p = _mm256_maddubs_epi16(one8, _mm256_loadu_si256((const __m256i *)(q + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, one16));
    }
    int32_t t[8];
    _mm256_storeu_si256((__m256i *)t, acc);
    int32_t s = sum_i8_scalar(q + i, n - i);
    for (int j = 0; j < 8; j++) s += t[j];
    return s;
}
#endif

static float row_absmax(const job_t *j, const float *x, int64_t n) {
#ifdef BITLAB_X86
    if (j->isa >= ISA_AVX2) return absmax_avx2(x, n);
#endif
    return absmax_scalar(x, n);
}

static int row_quant(const job_t *j, const float *x, int64_t n, float s, int8_t *q) {
#ifdef BITLAB_X86
    if (j->isa >= ISA_AVX2) return quant_avx2(x, n, s, q);
#endif
    return quant_scalar(x, n, s, q);
}

static int32_t row_sum(const job_t *j, const int8_t *q, int64_t n) {
#ifdef BITLAB_X86
    if (j->isa >= ISA_AVX2) return sum_i8_avx2(q, n);
#endif
    return sum_i8_scalar(q, n);
}

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
static inline __attribute__((always_inline)) TGT_AVX2 int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

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

typedef void (*tern_fn)(const uint8_t *const *, const int8_t *const *, int64_t, int64_t, int32_t *);
typedef void (*i8_fn)(const int8_t *const *, const int8_t *const *, int64_t, int64_t, int32_t *, int);

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
#define DEF_ALL(D) D(1, 1) D(2, 1) D(3, 1) D(4, 1) D(1, 2) D(2, 2) D(1, 3) D(2, 3) D(1, 4) D(2, 4)
/* tiles in use: M == 1 -> 4x1 (and n remainders 1..3 x 1); M >= 2 -> 2xMR (and 1xMR) */
#define TABLE(P)                                                                                              \
    {{P##_1_1, P##_1_2, P##_1_3, P##_1_4}, {P##_2_1, P##_2_2, P##_2_3, P##_2_4}, {P##_3_1, 0, 0, 0},          \
     {P##_4_1, 0, 0, 0}}
/* Tiles are split over two translation units (BITLAB_PART=1/2) so they compile in parallel. */
#if BITLAB_PART != 2
DEF_ALL(DEF_AVX2_TERN)
DEF_ALL(DEF_VNNI_I8)
const tern_fn bitlab_tern_avx2[4][4] = TABLE(tern_avx2);
const i8_fn bitlab_i8_vnni[4][4] = TABLE(i8_vnni);
#else
extern const tern_fn bitlab_tern_avx2[4][4];
extern const i8_fn bitlab_i8_vnni[4][4];
#endif
#if BITLAB_PART != 1
DEF_ALL(DEF_AVX2_I8)
DEF_ALL(DEF_VNNI_TERN)
const i8_fn bitlab_i8_avx2[4][4] = TABLE(i8_avx2);
const tern_fn bitlab_tern_vnni[4][4] = TABLE(tern_vnni);
#else
extern const i8_fn bitlab_i8_avx2[4][4];
extern const tern_fn bitlab_tern_vnni[4][4];
#endif
#define TERN_AVX2 bitlab_tern_avx2
#define I8_AVX2 bitlab_i8_avx2
#define TERN_VNNI bitlab_tern_vnni
#define I8_VNNI bitlab_i8_vnni

/* ------------------------------------------------------------------------------------------ */
/* Batched GEMM (M >= a threshold): tokens in vector lanes.                                    */
/* Activations are transposed once per call into tiles of PMT tokens, as unsigned bytes        */
/* xq + 128: xt[tile][q][PMT][4] with q = k / 4. A block of PNC weight rows is unpacked once   */
/* per call into signed bytes (code - 1 for ternary) in the blocked layout of PANEL_W. Each dword (4 */
/* consecutive k of one row) is broadcast to all lanes and multiplied with the 4 activations   */
/* of PMT tokens at once, so a micro-kernel holds a PNC x PMT block of int32 sums in registers: */
/*   tile[c][m] = sum_k (xq[m,k] + 128) * w[c,k]   and   sum_k xq*w = tile - 128 * sum_k w.     */
/* ------------------------------------------------------------------------------------------ */
#define PANEL_AVX2_NC 4
#define PANEL_AVX2_MT 16
#define PANEL_V512_NC 12
#define PANEL_V512_MT 32

/* Decode epilogue shared by the AVX2 and VNNI decode loops: four rows' int32 vectors -> their
 * four sums (one hadd tree), then y = (float)(acc - sum xq) * ws / s (+ bias) on 4 lanes, which
 * rounds exactly like the scalar expression (separate IEEE mul, div, add; no FMA). */
static inline __attribute__((always_inline)) TGT_AVX2 __m128i sum4_rows(__m256i t0, __m256i t1, __m256i t2,
                                                                        __m256i t3) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(t0, t1), _mm256_hadd_epi32(t2, t3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* acc = sum(code * xq) with unsigned codes = w + off (off 1 for ternary, 8 for int4): subtract off * sum(xq) */
static inline __attribute__((always_inline)) TGT_AVX2 void store4_rows(const job_t *j, int64_t n, __m128i acc,
                                                                       int32_t off) {
    __m128 ws = j->ws_kind ? _mm_loadu_ps(j->ws + n) : _mm_set1_ps(j->ws[0]);
    __m128i exact = _mm_sub_epi32(acc, _mm_set1_epi32((int32_t)((uint32_t)off * (uint32_t)j->gsum[0])));
    __m128 y = _mm_div_ps(_mm_mul_ps(_mm_cvtepi32_ps(exact), ws), _mm_set1_ps(j->s[0]));
    if (j->bias) y = _mm_add_ps(y, _mm_loadu_ps(j->bias + n));
    _mm_storeu_ps(j->out + n, y);
}

static inline __attribute__((always_inline)) void store1_row(const job_t *j, int64_t n, int32_t acc, int32_t off) {
    int32_t exact = (int32_t)((uint32_t)acc - (uint32_t)off * (uint32_t)j->gsum[0]);
    float y = (float)exact * j->ws[j->ws_kind ? n : 0] / j->s[0];
    if (j->bias) y = y + j->bias[n];
    j->out[n] = y;
}

/* A decode driver: output rows [n0, n1) in 4-row tiles (prefetching the next tile's rows), then the ragged
 * end one row at a time. ROWS(w, stride, NR, xq, count, pf) returns the NR rows' sums of code * xq;
 * STRIDE: bytes per stored row; COUNT: the blocks/chunks ROWS walks; OFF: codes are w + OFF. */
#define DEFINE_DECODE(NAME, TGT, ROWS, STRIDE, COUNT, OFF)                                                      \
    static TGT void NAME(const job_t *j, int64_t n0, int64_t n1) {                                             \
        const int64_t stride = (STRIDE), count = (COUNT);                                                      \
        const uint8_t *w = (const uint8_t *)j->w;                                                              \
        int64_t n = n0;                                                                                        \
        for (; n + 4 <= n1; n += 4)                                                                            \
            store4_rows(j, n, ROWS(w + n * stride, stride, 4, j->xq, count, n + 8 <= n1 ? 4 * stride : 0), OFF); \
        for (; n < n1; n++)                                                                                    \
            store1_row(j, n, _mm_cvtsi128_si32(ROWS(w + n * stride, stride, 1, j->xq, count, 0)), OFF);        \
    }

/* int4 weights (two per byte, low nibble = even k, two's complement): a 64-k chunk is 32 bytes.
 * Unsigned codes u = w + 8 in [0, 15] are (nibble ^ 8). The kernels work on a per-chunk permutation
 * of k, even k first, then odd k (so a chunk's low nibbles pair with xq[64c + 2i] and its high
 * nibbles with xq[64c + 2i + 1]); quant_rows stores xq in that order for W_INT4. */
static inline __attribute__((always_inline)) TGT_AVX2 void i4_codes(__m256i v, __m256i *lo, __m256i *hi) {
    const __m256i m15 = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    *lo = _mm256_xor_si256(_mm256_and_si256(v, m15), eight);
    *hi = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m15), eight);
}

/* 32 packed bytes of chunk c of a row of rb bytes; the ragged last chunk through a zeroed copy */
static inline __attribute__((always_inline)) TGT_AVX2 __m256i i4_load(const uint8_t *row, int64_t rb, int64_t c) {
    if ((c + 1) * 32 <= rb) return _mm256_loadu_si256((const __m256i *)(row + c * 32));
    uint8_t t[32] = {0};
    if (c * 32 < rb) memcpy(t, row + c * 32, (size_t)(rb - c * 32));
    return _mm256_loadu_si256((const __m256i *)t);
}

static inline __attribute__((always_inline)) int32_t load_i32(const int8_t *p) {
    int32_t d;
    memcpy(&d, p, 4);
    return d;
}

/* AVX2: maddubs(u8 act, s8 w) -> int16 pairs (|pair| <= 2*255 = 510), summed in int16 for up to
 * 64 steps (<= 32640), then madd with ones into int32. */
#if BITLAB_PART != 2
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
#endif

/* AVX-512 VNNI: vpdpbusd(acc, u8 act, s8 w) accumulates straight into int32; 12 rows x 2 zmm of
 * 16 tokens = 24 accumulators of the 32 zmm registers. */
#if BITLAB_PART != 1
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
decode_rows(const uint8_t *w, int64_t stride, const int NR, const int8_t *x, int64_t blocks, int64_t pf) {
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
        if (nr == 4) {
            __m128i exact = _mm_loadu_si128((const __m128i *)t);
            __m128 wsc = j->ws_kind ? _mm_loadu_ps(j->ws + n) : _mm_set1_ps(j->ws[0]);
            __m128 y = _mm_div_ps(_mm_mul_ps(_mm_cvtepi32_ps(exact), wsc), _mm_set1_ps(j->s[0]));
            if (j->bias) y = _mm_add_ps(y, _mm_loadu_ps(j->bias + n));
            _mm_storeu_ps(j->out + n, y);
        } else {
            for (int r = 0; r < nr; r++) {
                float y = (float)t[r] * j->ws[j->ws_kind ? n + r : 0] / j->s[0];
                if (j->bias) y = y + j->bias[n + r];
                j->out[n + r] = y;
            }
        }
    }
    free(xu);
    return 0;
}
int bitlab_decode_i8_vnni(const job_t *j, int64_t n0, int64_t n1) { return decode_i8_vnni(j, n0, n1); }

/* Decode with int4 weights (VNNI): vpdpbusd(u = w + 8, xq) per half-chunk, one chain per row and parity. */
static inline __attribute__((always_inline)) TGT_VNNI __m128i
decode_rows_i4(const uint8_t *w, int64_t rb, const int NR, const int8_t *x, int64_t chunks, int64_t pf) {
    __m256i a[4][2];
    for (int n = 0; n < 4; n++) a[n][0] = a[n][1] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; c++) {
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

/* (the AVX2 decode loops live in this unit too, to balance the two compile jobs) */
/* Decode (M == 1) with int4 weights on AVX2: maddubs(u, xq) pairs <= 2 * 15 * 128 = 3840, two per chunk
 * into one int16 accumulator per row, widened every 4 chunks (<= 30720). */
static inline __attribute__((always_inline)) TGT_AVX2 __m128i
decode_rows_i4_avx2(const uint8_t *w, int64_t rb, const int NR, const int8_t *x, int64_t chunks, int64_t pf) {
    (void)pf; /* no software prefetch in this loop (the DEFINE_DECODE signature passes one) */
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i a32[4];
    for (int n = 0; n < 4; n++) a32[n] = _mm256_setzero_si256();
    int64_t c = 0;
    while (c < chunks) {
        int64_t lim = c + 4 < chunks ? c + 4 : chunks;
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
decode_rows_avx2(const uint8_t *w, int64_t stride, const int NR, const int8_t *x, int64_t blocks, int64_t pf) {
    const __m256i m3 = _mm256_set1_epi8(3), one16 = _mm256_set1_epi16(1);
    __m256i a32[4];
    for (int n = 0; n < 4; n++) a32[n] = _mm256_setzero_si256();
    int64_t b = 0;
    while (b < blocks) {
        int64_t lim = b + 8 < blocks ? b + 8 : blocks;
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
decode_rows_i8_avx2(const int8_t *w, int64_t K, const int NR, const int8_t *x, int64_t chunks, int64_t pf) {
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i a[4];
    for (int n = 0; n < 4; n++) a[n] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; c++) {
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
            _mm_storeu_si128((__m128i *)t, decode_rows_i8_avx2(w + n * K, K, 4, j->xq, chunks, pf));
        } else {
            for (int r = 0; r < nr; r++)
                t[r] = _mm_cvtsi128_si32(decode_rows_i8_avx2(w + (n + r) * K, K, 1, j->xq, chunks, 0));
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

void bitlab_decode_avx2(const job_t *j, int64_t n0, int64_t n1) { decode_avx2(j, n0, n1); }
void bitlab_decode_i8_avx2(const job_t *j, int64_t n0, int64_t n1) { decode_i8_avx2(j, n0, n1); }
void bitlab_decode_i4_avx2(const job_t *j, int64_t n0, int64_t n1) { decode_i4_avx2(j, n0, n1); }
const panel_fn bitlab_panel_v512 = panel_v512;
#else
extern const panel_fn bitlab_panel_v512;
extern const panel_fn bitlab_panel_v512_16;
void bitlab_decode_vnni(const job_t *j, int64_t n0, int64_t n1);
int bitlab_decode_i8_vnni(const job_t *j, int64_t n0, int64_t n1);
void bitlab_decode_i4_vnni(const job_t *j, int64_t n0, int64_t n1);
void bitlab_decode_avx2(const job_t *j, int64_t n0, int64_t n1);
void bitlab_decode_i4_avx2(const job_t *j, int64_t n0, int64_t n1);
void bitlab_decode_i8_avx2(const job_t *j, int64_t n0, int64_t n1);
#endif
#endif /* BITLAB_X86 */

#if BITLAB_PART != 2 /* everything below: the core (part 1) */

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

/* ------------------------------------------------------------------------------------------ */
/* Phases                                                                                      */
/* ------------------------------------------------------------------------------------------ */
static void split(int64_t total, int64_t unit, int tid, int nt, int64_t *b, int64_t *e) {
    int64_t units = (total + unit - 1) / unit;
    int64_t per = units / nt, rem = units % nt;
    int64_t u0 = tid * per + (tid < rem ? tid : rem);
    int64_t u1 = u0 + per + (tid < rem ? 1 : 0);
    *b = u0 * unit < total ? u0 * unit : total;
    *e = u1 * unit < total ? u1 * unit : total;
}

/* whether any of the n int8 values is -128, 8 bytes at a time (a byte of v ^ 0x80.. is zero exactly there) */
static int has_m128(const int8_t *q, int64_t n) {
    uint64_t found = 0;
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        uint64_t v;
        memcpy(&v, q + k, 8);
        v ^= 0x8080808080808080ull;
        found |= (v - 0x0101010101010101ull) & ~v & 0x8080808080808080ull;
    }
    for (; k < n; k++) found |= (q[k] == -128);
    return found != 0;
}

static void quant_rows(job_t *j, int64_t m0, int64_t m1, int *m128) {
    for (int64_t m = m0; m < m1; m++) {
        int8_t *q = j->xq + m * j->Kp;
        if (j->xq_in) {
            memcpy(q, j->xq_in + m * j->K, (size_t)j->K);
            *m128 |= has_m128(q, j->K);
        } else {
            *m128 |= row_quant(j, j->x + m * j->K, j->K, j->s[m], q);
        }
        memset(q + j->K, 0, (size_t)(j->Kp - j->K));
        if (j->wfmt == W_INT4) { /* each 64-k chunk: even k first, then odd k (see i4_codes) */
            int8_t t[64];
            for (int64_t c = 0; c < j->Kp / 64; c++) {
                int8_t *p = q + c * 64;
                for (int i = 0; i < 32; i++) {
                    t[i] = p[2 * i];
                    t[32 + i] = p[2 * i + 1];
                }
                memcpy(p, t, 64);
            }
        }
        if (j->xt) { /* this row's 4-byte groups, offset to unsigned, into its lane of its tile */
            const int64_t Q = j->Kp / 4, mt = j->pmt;
            uint8_t *dst = j->xt + (m / mt) * Q * mt * 4 + (m % mt) * 4;
            for (int64_t qi = 0; qi < Q; qi++) {
                uint32_t d;
                memcpy(&d, q + qi * 4, 4);
                d ^= 0x80808080u;
                memcpy(dst + qi * mt * 4, &d, 4);
            }
        } else {
            for (int64_t g = 0; g < j->G; g++) j->gsum[m * j->G + g] = row_sum(j, q + g * j->gs, j->gs);
        }
    }
}

/* y[m, n] from the exact integer dot products of each group: a(g) = sum_k xq * w over group g */
#define RESCALE_BODY(A)                                                                                 \
    float y;                                                                                          \
    if (j->ws_kind == 2) {                                                                            \
        const float *ws = j->ws + n * j->G;                                                           \
        y = 0.f;                                                                                      \
        for (int64_t g = 0; g < j->G; g++) {                                                          \
            float p = (float)(A) * ws[g];                                                             \
            y = g ? y + p : p;                                                                        \
        }                                                                                             \
        y = y / j->s[m];                                                                              \
    } else {                                                                                          \
        const int64_t g = 0;                                                                          \
        y = (float)(A) * j->ws[j->ws_kind ? n : 0] / j->s[m];                                        \
    }                                                                                                 \
    if (j->bias) y = y + j->bias[n];                                                                  \
    return y;

static inline float rescale(const job_t *j, const int32_t *accg, int64_t n, int64_t m) {
    /* accg: G partial sums of xq * code (ternary: minus sum xq) or xq * w (int8) */
    const int32_t *gsum = j->gsum + m * j->G;
    RESCALE_BODY(accg[g] - (j->wfmt == W_TERNARY ? gsum[g] : 0))
}

/* the same from a panel tile: tile[g][c][mm] - 128 * sum of the group's weights */
static inline float rescale_panel(const job_t *j, const int32_t *tile, int64_t gstride, const int32_t *wsum,
                                  int64_t n, int64_t m) {
    RESCALE_BODY((int32_t)((uint32_t)tile[g * gstride] - 128u * (uint32_t)wsum[g])) /* exact mod 2^32 */
}

static int gemm_cols(job_t *j, int64_t n0, int64_t n1) {
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

/* batched path: blocks of pnc output channels in [n0, n1) against every tile of pmt tokens */
static int panel_cols(job_t *j, int64_t n0, int64_t n1) {
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
                memcpy(row, (const int8_t *)j->w + (n + c) * j->K, (size_t)j->K);
                memset(row + j->K, 0, (size_t)(Kp - j->K));
                for (int64_t g = 0; g < G; g++) {
                    int64_t k0 = g * j->gs, k1 = g == G - 1 ? Kp : k0 + j->gs;
                    wsum[c * G + g] = row_sum(j, row + k0, k1 - k0);
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

static void run_thread(job_t *j, int tid, int nt) {
    int64_t m0, m1;
    split(j->M, 1, tid, nt, &m0, &m1);
    /* phase 1: multipliers */
    if (!j->xq_in && (j->act == ACT_TOKEN || j->act == ACT_TENSOR))
        for (int64_t m = m0; m < m1; m++) j->amax[m] = row_absmax(j, j->x + m * j->K, j->K);
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp barrier
    }
#endif
    if (!j->xq_in) {
        float tmax = 0.f;
        if (j->act == ACT_TENSOR)
            for (int64_t m = 0; m < j->M; m++) tmax = j->amax[m] > tmax ? j->amax[m] : tmax;
        for (int64_t m = m0; m < m1; m++) {
            float s;
            if (j->act == ACT_STATIC) s = j->static_s;
            else {
                float a = j->act == ACT_TENSOR ? tmax : j->amax[m];
                a = a < EPS ? EPS : a; /* clamp(min=EPS); NaN stays NaN like torch */
                s = (1.0f / a) * 127.0f; /* torch: 127.0 / t == t.reciprocal() * 127 */
            }
            j->s[m] = s;
        }
    } else {
        for (int64_t m = m0; m < m1; m++) j->s[m] = j->s_in[m];
    }
    /* phase 2: quantize my rows */
    int m128 = 0;
    quant_rows(j, m0, m1, &m128);
    if (m128) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
        j->has_m128 = 1;
    }
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp barrier
    }
#endif
    /* phase 3: my output columns */
    int64_t n0, n1;
    if (j->xt) {
        split(j->N, j->pnc, tid, nt, &n0, &n1);
        if (panel_cols(j, n0, n1) != 0) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            j->failed = 1;
        }
    } else {
        split(j->N, j->nr, tid, nt, &n0, &n1);
#ifdef BITLAB_X86
        if (j->M == 1 && j->wfmt == W_TERNARY && j->ws_kind != 2 && j->isa >= ISA_AVX2) {
            if (j->isa == ISA_VNNI) bitlab_decode_vnni(j, n0, n1);
            else bitlab_decode_avx2(j, n0, n1);
            return;
        }
        if (j->M == 1 && j->wfmt == W_INT4) { /* one scale group (else use_panel took it) */
            if (j->isa == ISA_VNNI) bitlab_decode_i4_vnni(j, n0, n1);
            else bitlab_decode_i4_avx2(j, n0, n1);
            return;
        }
        if (j->M == 1 && j->wfmt == W_INT8 && j->ws_kind != 2 && j->isa == ISA_AVX2 && !j->has_m128) {
            bitlab_decode_i8_avx2(j, n0, n1);
            return;
        }
        if (j->M == 1 && j->wfmt == W_INT8 && j->ws_kind != 2 && j->isa == ISA_VNNI) {
            if (bitlab_decode_i8_vnni(j, n0, n1) != 0) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
                j->failed = 1;
            }
            return;
        }
#endif
        if (gemm_cols(j, n0, n1) != 0) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            j->failed = 1;
        }
    }
}

/* Smallest M that takes the batched path (<= 0: the built-in choice); tests move it. */
static int g_panel_min_m = 0;

int bitlab_set_panel_min_m(int m) {
    g_panel_min_m = m;
    return m;
}

static int use_panel(job_t *j) {
#ifdef BITLAB_X86
    int min_m = g_panel_min_m > 0 ? g_panel_min_m : (j->isa == ISA_VNNI ? 12 : 64);
    if (j->wfmt == W_INT4) /* int4 runs the decode loop (M == 1, one scale group) or the batched GEMM */
        min_m = j->M == 1 && j->ws_kind != 2 ? 2 : 1;
    if (j->isa < ISA_AVX2 || j->M < min_m) return 0;
    if (j->wfmt == W_INT8 && (j->isa != ISA_VNNI || j->gs % 4)) return 0; /* maddubs would saturate */
    if (j->isa == ISA_VNNI && j->M <= 16) { j->pnc = 24; j->pmt = 16; }
    else if (j->isa == ISA_VNNI) { j->pnc = PANEL_V512_NC; j->pmt = PANEL_V512_MT; }
    else { j->pnc = PANEL_AVX2_NC; j->pmt = PANEL_AVX2_MT; }
    return 1;
#else
    (void)j;
    return 0;
#endif
}

/* weight k of row n in any stored format (scalar code: fallbacks and ragged ends) */
static inline int weight_at(const void *w, int wfmt, int64_t n, int64_t K, int64_t k) {
    if (wfmt == W_TERNARY) {
        const uint8_t *row = (const uint8_t *)w + n * ((K + 127) / 128 * 32);
        return ((row[(k / 128) * 32 + k % 32] >> (2 * ((k / 32) % 4))) & 3) - 1;
    }
    if (wfmt == W_INT4) {
        const uint8_t *row = (const uint8_t *)w + n * ((K + 1) / 2);
        int v = (k & 1) ? row[k / 2] >> 4 : row[k / 2] & 15;
        return (v ^ 8) - 8;
    }
    return ((const int8_t *)w)[n * K + k];
}

/* int4 rows ((K + 1) / 2 bytes) -> int8 [N, K] (the fallback where the int4 loops do not apply) */
static void unpack_i4_scalar(const uint8_t *src, int64_t N, int64_t K, int8_t *dst) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) dst[n * K + k] = (int8_t)weight_at(src, W_INT4, n, K, k);
}

static int run_job(job_t *j, int nthreads) {
    j->isa = isa();
    if (j->wfmt == W_INT4 && (j->isa < ISA_AVX2 || (j->ws_kind == 2 && j->gs % 64))) {
        int8_t *w8 = (int8_t *)malloc((size_t)(j->N * j->K) + 1);
        if (!w8) return -1;
        unpack_i4_scalar((const uint8_t *)j->w, j->N, j->K, w8);
        j->w = w8;
        j->wfmt = W_INT8;
        int rc = run_job(j, nthreads);
        free(w8);
        return rc;
    }
    j->Kp = j->wfmt == W_INT8 ? (j->K + 31) / 32 * 32 : (j->K + 127) / 128 * 128;
    if (j->ws_kind != 2) { j->G = 1; j->gs = j->Kp; }
    if (j->M <= 0 || j->N <= 0) return 0;
    if (j->M == 1) { j->nr = 4; j->mr = 1; }
    else if (j->M < 4) { j->nr = 2; j->mr = (int)j->M; }
    else { j->nr = 2; j->mr = 4; }
    size_t xq_bytes = (size_t)(j->M * j->Kp + 64);
    j->xq = (int8_t *)aligned_alloc(64, (xq_bytes + 63) / 64 * 64);
    if (use_panel(j)) {
        int64_t tiles = (j->M + j->pmt - 1) / j->pmt;
        size_t xt_bytes = (size_t)(tiles * j->pmt * j->Kp);
        j->xt = (uint8_t *)aligned_alloc(64, (xt_bytes + 63) / 64 * 64);
        if (!j->xt) { free(j->xq); return -1; }
        if (j->M % j->pmt) /* unused lanes of the last tile: activation 0 */
            memset(j->xt + (tiles - 1) * j->pmt * j->Kp, 0x80, (size_t)(j->pmt * j->Kp));
    }
    j->s = (float *)malloc(sizeof(float) * (size_t)j->M);
    j->amax = (float *)malloc(sizeof(float) * (size_t)j->M);
    j->gsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(j->M * j->G));
    if (!j->xq || !j->s || !j->amax || !j->gsum) {
        free(j->xq); free(j->xt); free(j->s); free(j->amax); free(j->gsum);
        return -1;
    }
    j->has_m128 = 0;
    /* below ~1M multiply-adds a second thread costs more than it saves */
    double work = (double)j->M * (double)j->N * (double)j->K;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (work < 1e6) nt = 1;
    int64_t unit = j->xt ? j->pnc : j->nr;
    if (nt > j->N / unit && j->N / unit >= 1) nt = (int)(j->N / unit);
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        run_thread(j, omp_get_thread_num(), omp_get_num_threads());
    } else
#endif
        run_thread(j, 0, 1);
    free(j->xq); free(j->xt); free(j->s); free(j->amax); free(j->gsum);
    return j->failed ? -1 : 0;
}

/* y[M,N] = linear(x[M,K]) with activation quantization; returns 0 on success. */
int bitlab_linear(const float *x, int64_t M, int64_t K, const void *w, int wfmt, int64_t N, const float *ws,
                  int ws_kind, int64_t G, const float *bias, int act, float static_s, float *out, int nthreads) {
    job_t j;
    memset(&j, 0, sizeof j);
    j.x = x; j.M = M; j.K = K; j.N = N; j.wfmt = wfmt; j.w = w; j.ws = ws; j.ws_kind = ws_kind;
    j.G = G; j.gs = G > 0 ? K / G : K; j.bias = bias; j.act = act; j.static_s = static_s; j.out = out;
    return run_job(&j, nthreads);
}

/* Same with pre-quantized activations xq[M,K] and their multipliers s[M] (conv via im2col). */
int bitlab_linear_q(const int8_t *xq, const float *s, int64_t M, int64_t K, const void *w, int wfmt, int64_t N,
                    const float *ws, int ws_kind, int64_t G, const float *bias, float *out, int nthreads) {
    job_t j;
    memset(&j, 0, sizeof j);
    j.xq_in = xq; j.s_in = s; j.M = M; j.K = K; j.N = N; j.wfmt = wfmt; j.w = w; j.ws = ws; j.ws_kind = ws_kind;
    j.G = G; j.gs = G > 0 ? K / G : K; j.bias = bias; j.act = ACT_GIVEN; j.out = out;
    return run_job(&j, nthreads);
}

/* ------------------------------------------------------------------------------------------ */
/* Weight-only (act = "none"): float activations x integer weights, float accumulation.        */
/*   y[m, n] = sum_g ws[n, g] * sum_{k in g} x[m, k] * w[n, k]  (+ bias[n])                    */
/* bitlab_linear_wo: with AVX2 and M <= 2, each row is dotted straight from its packed form     */
/* (wo_direct_avx2); otherwise blocks of 4 rows are expanded to fp32 in a per-thread buffer     */
/* (4 x K floats, never the whole matrix) and every token is dotted with them. Float sums in   */
/* another order than reference.py's x @ (w * ws).T (equal up to fp32 rounding). For M > 2 the */
/* Python wrapper uses bitlab_expand_wo + torch's matmul instead, which is the reference bitwise. */
/* ------------------------------------------------------------------------------------------ */
/* weights k0 .. K-1 of row n as floats into dst[k0 ..] */
static void wo_expand_scalar(const void *w, int wfmt, int64_t n, int64_t K, int64_t k0, float *dst) {
    for (int64_t k = k0; k < K; k++) dst[k] = (float)weight_at(w, wfmt, n, K, k);
}

#ifdef BITLAB_X86
/* 32 weights k .. k+31 (k a multiple of 32, all < K) of row n as signed bytes in k order */
static inline __attribute__((always_inline)) TGT_AVX2 __m256i wo_w32(const void *w, int wfmt, int64_t n, int64_t K,
                                                                     int64_t k) {
    if (wfmt == W_TERNARY) {
        const uint8_t *row = (const uint8_t *)w + n * ((K + 127) / 128 * 32);
        __m256i v = _mm256_loadu_si256((const __m256i *)(row + (k / 128) * 32));
        __m128i sh = _mm_cvtsi32_si128((int)(2 * ((k / 32) % 4)));
        return _mm256_sub_epi8(_mm256_and_si256(_mm256_srl_epi16(v, sh), _mm256_set1_epi8(3)), _mm256_set1_epi8(1));
    }
    if (wfmt == W_INT4) {
        const uint8_t *row = (const uint8_t *)w + n * ((K + 1) / 2);
        const __m128i m15 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
        __m128i v = _mm_loadu_si128((const __m128i *)(row + k / 2));
        __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(v, m15), eight), eight);
        __m128i hi = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(_mm_srli_epi16(v, 4), m15), eight), eight);
        return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
    }
    return _mm256_loadu_si256((const __m256i *)((const int8_t *)w + n * K + k));
}

static TGT_AVX2 void wo_expand_avx2(const void *w, int wfmt, int64_t n, int64_t K, float *dst) {
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i b = wo_w32(w, wfmt, n, K, k);
        __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
        _mm256_storeu_ps(dst + k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
        _mm256_storeu_ps(dst + k + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
        _mm256_storeu_ps(dst + k + 16, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
        _mm256_storeu_ps(dst + k + 24, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
    }
    wo_expand_scalar(w, wfmt, n, K, k, dst); /* the tail */
}

/* small M: dot x[m] with weight rows straight from their packed form (no expanded copy), 4 FMA chains */
static TGT_AVX2 void wo_direct_avx2(const float *x, const void *w, int wfmt, int64_t n, int64_t K, int64_t k0,
                                    int64_t k1, float *d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = k0;
    float s = 0.f;
    for (; k < k1 && (k & 31); k++) s += x[k] * (float)weight_at(w, wfmt, n, K, k);
    for (; k + 32 <= k1; k += 32) {
        __m256i b = wo_w32(w, wfmt, n, K, k);
        __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), a3);
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    s += ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    for (; k < k1; k++) s += x[k] * (float)weight_at(w, wfmt, n, K, k);
    *d = s;
}

/* dots of one activation row with up to 4 expanded weight rows over [k0, k1) */
static TGT_AVX2 void wo_dot4_avx2(const float *x, const float *wf, int64_t K, int nr, int64_t k0, int64_t k1,
                                  float *d) {
    __m256 a[4][2];
    for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        for (int r = 0; r < nr; r++) {
            a[r][0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wf + r * K + k), a[r][0]);
            a[r][1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(wf + r * K + k + 8), a[r][1]);
        }
    }
    for (int r = 0; r < nr; r++) {
        float t[8];
        _mm256_storeu_ps(t, _mm256_add_ps(a[r][0], a[r][1]));
        float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
        for (int64_t kk = k; kk < k1; kk++) s += x[kk] * wf[r * K + kk];
        d[r] = s;
    }
}

/* 4 expanded rows x 3 tokens over [k0, k1): 12 accumulators, each row's vector loaded once for 3 tokens */
static TGT_AVX2 void wo_dot4x3_avx2(const float *x0, const float *x1, const float *x2, const float *wf, int64_t K,
                                    int64_t k0, int64_t k1, float d[4][3]) {
#define W43_ROWS(X) X(0) X(1) X(2) X(3)
#define DECL(r) __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = _mm256_setzero_ps(), a##r##2 = _mm256_setzero_ps();
    W43_ROWS(DECL)
#undef DECL
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
        __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k), v2 = _mm256_loadu_ps(x2 + k);
#define STEP(r)                                                                                                \
    {                                                                                                          \
        __m256 w = _mm256_loadu_ps(wf + r * K + k);                                                            \
        a##r##0 = _mm256_fmadd_ps(v0, w, a##r##0);                                                             \
        a##r##1 = _mm256_fmadd_ps(v1, w, a##r##1);                                                             \
        a##r##2 = _mm256_fmadd_ps(v2, w, a##r##2);                                                             \
    }
        W43_ROWS(STEP)
#undef STEP
    }
    const float *xs[3] = {x0, x1, x2};
#define STORE(r)                                                                                               \
    {                                                                                                          \
        __m256 acc[3] = {a##r##0, a##r##1, a##r##2};                                                           \
        for (int t = 0; t < 3; t++) {                                                                          \
            float h[8];                                                                                        \
            _mm256_storeu_ps(h, acc[t]);                                                                       \
            float s = ((h[0] + h[1]) + (h[2] + h[3])) + ((h[4] + h[5]) + (h[6] + h[7]));                       \
            for (int64_t kk = k; kk < k1; kk++) s += xs[t][kk] * wf[r * K + kk];                               \
            d[r][t] = s;                                                                                       \
        }                                                                                                      \
    }
    W43_ROWS(STORE)
#undef STORE
#undef W43_ROWS
}
#endif

static void wo_dot4_scalar(const float *x, const float *wf, int64_t K, int nr, int64_t k0, int64_t k1, float *d) {
    for (int r = 0; r < nr; r++) {
        float s = 0.f;
        for (int64_t k = k0; k < k1; k++) s += x[k] * wf[r * K + k];
        d[r] = s;
    }
}

typedef struct {
    const float *x; int64_t M, K, N; int wfmt; const void *w; const float *ws; int ws_kind; int64_t G;
    const float *bias; float *out; int isa; int failed;
} wo_job_t;

static void wo_thread(wo_job_t *j, int tid, int nt) {
    int64_t n0, n1;
    split(j->N, 4, tid, nt, &n0, &n1);
    float *wf = (float *)malloc(sizeof(float) * (size_t)(4 * j->K + 1));
    if (!wf) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
        j->failed = 1;
        return;
    }
    const int64_t G = j->ws_kind == 2 ? j->G : 1, gs = j->K / G;
#ifdef BITLAB_X86
    if (j->isa >= ISA_AVX2 && j->M <= 2) { /* each weight used once or twice: no expanded copy */
        for (int64_t n = n0; n < n1; n++)
            for (int64_t m = 0; m < j->M; m++) {
                float y = 0.f, d;
                for (int64_t g = 0; g < G; g++) {
                    wo_direct_avx2(j->x + m * j->K, j->w, j->wfmt, n, j->K, g * gs, (g + 1) * gs, &d);
                    y += d * (j->ws_kind == 2 ? j->ws[n * G + g] : j->ws[j->ws_kind ? n : 0]);
                }
                j->out[m * j->N + n] = j->bias ? y + j->bias[n] : y;
            }
        free(wf);
        return;
    }
#endif
    for (int64_t n = n0; n < n1; n += 4) {
        int nr = n1 - n < 4 ? (int)(n1 - n) : 4;
        for (int r = 0; r < nr; r++) {
#ifdef BITLAB_X86
            if (j->isa >= ISA_AVX2) wo_expand_avx2(j->w, j->wfmt, n + r, j->K, wf + r * j->K);
            else
#endif
                wo_expand_scalar(j->w, j->wfmt, n + r, j->K, 0, wf + r * j->K);
        }
        int64_t m = 0;
#ifdef BITLAB_X86
        if (j->isa >= ISA_AVX2 && nr == 4) /* 3 tokens at a time: each expanded row is read once per 3 */
            for (; m + 3 <= j->M; m += 3) {
                float y[4][3] = {{0.f}}, d[4][3];
                const float *xm = j->x + m * j->K;
                for (int64_t g = 0; g < G; g++) {
                    wo_dot4x3_avx2(xm, xm + j->K, xm + 2 * j->K, wf, j->K, g * gs, (g + 1) * gs, d);
                    for (int r = 0; r < 4; r++) {
                        float sc = j->ws_kind == 2 ? j->ws[(n + r) * G + g] : j->ws[j->ws_kind ? n + r : 0];
                        for (int t = 0; t < 3; t++) y[r][t] += d[r][t] * sc;
                    }
                }
                for (int t = 0; t < 3; t++)
                    for (int r = 0; r < 4; r++)
                        j->out[(m + t) * j->N + n + r] = j->bias ? y[r][t] + j->bias[n + r] : y[r][t];
            }
#endif
        for (; m < j->M; m++) {
            float y[4] = {0.f, 0.f, 0.f, 0.f}, d[4];
            for (int64_t g = 0; g < G; g++) {
#ifdef BITLAB_X86
                if (j->isa >= ISA_AVX2) wo_dot4_avx2(j->x + m * j->K, wf, j->K, nr, g * gs, (g + 1) * gs, d);
                else
#endif
                    wo_dot4_scalar(j->x + m * j->K, wf, j->K, nr, g * gs, (g + 1) * gs, d);
                for (int r = 0; r < nr; r++) {
                    float sc = j->ws_kind == 2 ? j->ws[(n + r) * G + g] : j->ws[j->ws_kind ? n + r : 0];
                    y[r] += d[r] * sc;
                }
            }
            for (int r = 0; r < nr; r++) j->out[m * j->N + n + r] = j->bias ? y[r] + j->bias[n + r] : y[r];
        }
    }
    free(wf);
}

/* dst[N, K] = (float)w * ws, the same products reference.py forms for act="none" (for M > 2 the wrapper
 * multiplies with torch's matmul, so the result is the reference's, bitwise). Returns 0 on success. */
int bitlab_expand_wo(const void *w, int wfmt, int64_t N, int64_t K, const float *ws, int ws_kind, int64_t G,
                     float *dst, int nthreads) {
    const int64_t groups = ws_kind == 2 ? G : 1, gs = K / groups;
    int cpu_isa = isa();
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((double)N * (double)K < 1e6) nt = 1;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t n = 0; n < N; n++) {
        float *row = dst + n * K;
#ifdef BITLAB_X86
        if (cpu_isa >= ISA_AVX2) wo_expand_avx2(w, wfmt, n, K, row);
        else
#endif
            wo_expand_scalar(w, wfmt, n, K, 0, row);
        for (int64_t g = 0; g < groups; g++) {
            float sc = ws_kind == 2 ? ws[n * groups + g] : ws[ws_kind ? n : 0];
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) row[k] = row[k] * sc;
        }
    }
    (void)cpu_isa;
    return 0;
}

/* y[M,N] = x[M,K] @ (w * ws).T (+ bias) with float activations; returns 0 on success. */
int bitlab_linear_wo(const float *x, int64_t M, int64_t K, const void *w, int wfmt, int64_t N, const float *ws,
                     int ws_kind, int64_t G, const float *bias, float *out, int nthreads) {
    wo_job_t j;
    memset(&j, 0, sizeof j);
    j.x = x; j.M = M; j.K = K; j.N = N; j.wfmt = wfmt; j.w = w; j.ws = ws; j.ws_kind = ws_kind; j.G = G;
    j.bias = bias; j.out = out; j.isa = isa();
    if (M <= 0 || N <= 0) return 0;
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((double)M * (double)N * (double)K < 1e6) nt = 1;
    if (nt > N / 4 && N / 4 >= 1) nt = (int)(N / 4);
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        wo_thread(&j, omp_get_thread_num(), omp_get_num_threads());
    } else
#endif
        wo_thread(&j, 0, 1);
    return j.failed ? -1 : 0;
}

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
#endif /* BITLAB_PART != 2 */
