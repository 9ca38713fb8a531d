/* quant_neon.c: the activation side on ARM64 NEON (bitlab_cpu.c's row_absmax, row_quant and bitlab_row_sum call
 * these when the ISA is NEON or DOTPROD): max |x| of a row, xq = clamp(round_half_even(x * s), -128, 127) and the
 * sum of a row's codes. Each gives exactly the scalar functions' results (NaN inputs included: maxnm skips NaN as
 * the scalar max does; a NaN product converts to 0 as the scalar code sets it). ARM64 only. */
#include "bitlab_cpu.h"

#ifdef BITLAB_ARM
BITLAB_INTERNAL float bitlab_absmax_neon(const float *x, int64_t n) {
    float32x4_t m0 = vdupq_n_f32(0.f), m1 = m0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        m0 = vmaxnmq_f32(m0, vabsq_f32(vld1q_f32(x + i)));
        m1 = vmaxnmq_f32(m1, vabsq_f32(vld1q_f32(x + i + 4)));
    }
    float m = vmaxnmvq_f32(vmaxnmq_f32(m0, m1));
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        m = a > m ? a : m;
    }
    return m;
}

/* the first n / 16 * 16 codes (row_quant does the rest in scalar code); returns whether one is -128 */
BITLAB_INTERNAL int bitlab_quant_neon(const float *x, int64_t n, float s, int8_t *q) {
    const float32x4_t vs = vdupq_n_f32(s), lo = vdupq_n_f32(-128.f), hi = vdupq_n_f32(127.f);
    int16x8_t vmin = vdupq_n_s16(0);
    for (int64_t i = 0; i + 16 <= n; i += 16) {
        int32x4_t r[4];
        for (int t = 0; t < 4; t++) /* the clamp keeps NaN, which vcvtn turns into 0 */
            r[t] = vcvtnq_s32_f32(vminq_f32(vmaxq_f32(vmulq_f32(vld1q_f32(x + i + 4 * t), vs), lo), hi));
        const int16x8_t a = vcombine_s16(vmovn_s32(r[0]), vmovn_s32(r[1]));
        const int16x8_t b = vcombine_s16(vmovn_s32(r[2]), vmovn_s32(r[3]));
        vmin = vminq_s16(vmin, vminq_s16(a, b));
        vst1q_s8(q + i, vcombine_s8(vmovn_s16(a), vmovn_s16(b)));
    }
    return vminvq_s16(vmin) == -128;
}

BITLAB_INTERNAL int32_t bitlab_sum_i8_neon(const int8_t *q, int64_t n) {
    int32x4_t acc = vdupq_n_s32(0);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = vpadalq_s16(acc, vpaddlq_s8(vld1q_s8(q + i)));
    int32_t s = vaddvq_s32(acc);
    for (; i < n; i++) s += q[i];
    return s;
}
#endif /* BITLAB_ARM */
