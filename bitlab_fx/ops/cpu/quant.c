/* quant.c: the activation side on x86 and in portable C: max |x| of a row, its int8 codes (round half to even,
 * clamped, NaN -> 0 in scalar code), and code sums. bitlab_cpu.c's quant_rows calls row_absmax / row_quant; the
 * tiles and the batched GEMM call bitlab_row_sum. The ARM64 NEON versions are in quant_neon.c. */
#include "bitlab_cpu.h"

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
        store_i32x32_as_i8(v, q + i);
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
#ifdef BITLAB_ARM
    if (j->isa >= ISA_NEON) return bitlab_absmax_neon(x, n);
#endif
    return absmax_scalar(x, n);
}

static int row_quant(const job_t *j, const float *x, int64_t n, float s, int8_t *q) {
#ifdef BITLAB_X86
    if (j->isa >= ISA_AVX2) return quant_avx2(x, n, s, q);
#endif
#ifdef BITLAB_ARM
    if (j->isa >= ISA_NEON) {
        const int64_t done = n / 16 * 16;
        return bitlab_quant_neon(x, n, s, q) | quant_scalar(x + done, n - done, s, q + done);
    }
#endif
    return quant_scalar(x, n, s, q);
}

BITLAB_INTERNAL int32_t bitlab_row_sum(const job_t *j, const int8_t *q, int64_t n) {
#ifdef BITLAB_X86
    if (j->isa >= ISA_AVX2) return sum_i8_avx2(q, n);
#endif
#ifdef BITLAB_ARM
    if (j->isa >= ISA_NEON) return bitlab_sum_i8_neon(q, n);
#endif
    return sum_i8_scalar(q, n);
}

