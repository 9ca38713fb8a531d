/* train_quant.c: the quantizers of a QAT step in one pass per tensor, exported for train_quant.py. A weight's
 * int8 codes from its steps, clamp(round(w / step), -qmax, qmax), and a dynamic signed activation's per-row
 * multipliers qmax / max(max|x|, EPS) with its int8 codes clamp(round(x * mult), -128, 127): bitwise the numbers of
 * quant/arithmetic.py's torch expressions (IEEE division and product, round half to even, the multiplier as
 * torch evaluates it), which the tests check on every ISA. NaN: 0 in scalar code, a bound in vector code (the
 * kernel's convention, quant.c). Rows are shared out over OpenMP threads. Compiled in the job of quant.c, whose
 * row_absmax / row_quant the activation codes use. */
#include "bitlab_cpu.h"

/* One row of a per-row pass: n values in, n out, the row's scale and an int argument (the codes' qmax, or whether
 * to divide). Every pass of this file has a scalar and an AVX2 version of this type, run by each_row. */
typedef void (*row_pass_fn)(const void *in, int64_t n, float scale, int arg, void *out);

/* Threads for a pass over rows x n values: one below 64K values (the team would cost more than it saves). */
static int row_threads(int64_t rows, int64_t n, int nthreads) {
    return (nthreads < 1 || rows * n < (1 << 16)) ? 1 : nthreads;
}

/* Runs a per-row pass over rows x n values (in_bytes / out_bytes per value), the rows shared out over OpenMP
 * threads, with the AVX2 version where the CPU has it (and the ISA is not capped below it). */
static void each_row(row_pass_fn avx2, row_pass_fn scalar, const void *in, int in_bytes, int64_t rows, int64_t n,
                     const float *scale, int arg, void *out, int out_bytes, int nthreads) {
    const int nt = row_threads(rows, n, nthreads);
    row_pass_fn fn = bitlab_isa() >= ISA_AVX2 && avx2 ? avx2 : scalar;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t r = 0; r < rows; r++)
        fn((const char *)in + r * n * in_bytes, n, scale[r], arg, (char *)out + r * n * out_bytes);
}

static void wcodes_scalar(const void *in, int64_t n, float step, int arg, void *out) {
    const float *w = (const float *)in, qmax = (float)arg;
    int8_t *q = (int8_t *)out;
    for (int64_t i = 0; i < n; i++) {
        float v = w[i] / step;
        if (v != v) v = 0.f;
        v = v > qmax ? qmax : v;
        v = v < -qmax ? -qmax : v;
        q[i] = (int8_t)(int)nearbyintf(v);
    }
}

#ifdef BITLAB_X86
static TGT_AVX2 void wcodes_avx2(const void *in, int64_t n, float step, int arg, void *out) {
    const float *w = (const float *)in, qmax = (float)arg;
    int8_t *q = (int8_t *)out;
    const __m256 vs = _mm256_set1_ps(step), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; j++) {
            __m256 f = _mm256_div_ps(_mm256_loadu_ps(w + i + 8 * j), vs);
            v[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(f, lo), hi)); /* MXCSR: round half to even */
        }
        store_i32x32_as_i8(v, q + i);
    }
    wcodes_scalar(w + i, n - i, step, arg, q + i);
}
#define WCODES_AVX2 wcodes_avx2
#else
#define WCODES_AVX2 NULL
#endif

/* w: rows x n floats (a weight's groups: one row per step), step[rows], codes q: rows x n int8 */
void bitlab_weight_codes_s8(const float *w, int64_t rows, int64_t n, const float *step, int qmax, int8_t *q,
                            int nthreads) {
    each_row(WCODES_AVX2, wcodes_scalar, w, sizeof(float), rows, n, step, qmax, q, sizeof(int8_t), nthreads);
}

/* x: rows x n floats (one row per token, or the whole tensor as one row); mult[rows]; codes q: rows x n int8 */
void bitlab_act_codes_s8(const float *x, int64_t rows, int64_t n, int qmax, float *mult, int8_t *q, int nthreads) {
    job_t j;
    memset(&j, 0, sizeof j);
    j.isa = bitlab_isa();
    const int nt = row_threads(rows, n, nthreads);
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t r = 0; r < rows; r++) {
        float a = row_absmax(&j, x + r * n, n);
        a = a < EPS ? EPS : a;                /* clamp(min=EPS); NaN stays NaN like torch */
        const float s = (1.0f / a) * (float)qmax; /* torch: qmax / t == t.reciprocal() * qmax */
        mult[r] = s;
        row_quant(&j, x + r * n, n, s, q + r * n);
    }
}

/* The backward's float values of int8 codes: out = (float)q * scale or (float)q / scale, one scale per row, bitwise
 * torch's q.to(float32).mul_(s) / .div_(s) (an exact int8 -> float conversion, then one IEEE product or quotient)
 * in one pass instead of a copy and an in-place pass. */
static void dequant_scalar(const void *in, int64_t n, float scale, int divide, void *out_) {
    const int8_t *q = (const int8_t *)in;
    float *out = (float *)out_;
    if (divide)
        for (int64_t i = 0; i < n; i++) out[i] = (float)q[i] / scale;
    else
        for (int64_t i = 0; i < n; i++) out[i] = (float)q[i] * scale;
}

#ifdef BITLAB_X86
static TGT_AVX2 void dequant_avx2(const void *in, int64_t n, float scale, int divide, void *out_) {
    const int8_t *q = (const int8_t *)in;
    float *out = (float *)out_;
    const __m256 vs = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i b = _mm_loadl_epi64((const __m128i *)(q + i));
        __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        _mm256_storeu_ps(out + i, divide ? _mm256_div_ps(f, vs) : _mm256_mul_ps(f, vs));
    }
    dequant_scalar(q + i, n - i, scale, divide, out + i);
}
#define DEQUANT_AVX2 dequant_avx2
#else
#define DEQUANT_AVX2 NULL
#endif

/* q: rows x n int8 codes, scale[rows], out: rows x n floats */
void bitlab_dequant_s8(const int8_t *q, int64_t rows, int64_t n, const float *scale, int divide, float *out,
                       int nthreads) {
    each_row(DEQUANT_AVX2, dequant_scalar, q, sizeof(int8_t), rows, n, scale, divide, out, sizeof(float), nthreads);
}
