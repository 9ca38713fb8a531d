/* weight_only.c: act = "none", float activations x ternary, int4 or int8 weights with float accumulation:
 * bitlab_linear_wo (dots straight from the packed rows, or from 4 rows at a time expanded to fp32) and
 * bitlab_expand_wo (the whole weight times its scales as fp32, for the wrapper's torch matmul), each in
 * scalar code and AVX2. */
#include "bitlab_cpu.h"

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
    int cpu_isa = bitlab_isa();
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
    j.bias = bias; j.out = out; j.isa = bitlab_isa();
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
