/* decode_neon.c: M == 1 on ARM64 (the decode step of a language model) with one scale group: output rows
 * [n0, n1) of a thread, 4 rows per tile, for ternary, int8 and int4 weights, each with the ARMv8.2 dot product
 * (sdot: 16 int8 products into 4 int32 lanes per instruction) and in plain NEON (dot16_neon: smull + sadalp).
 * The sums are exact int32; the rescale is the portable epilogue (RESCALE_BODY), so every path rounds like
 * reference.py. run_thread (bitlab_cpu.c) calls bitlab_decode_arm; per-group scales take the batched GEMM
 * (gemm_neon.c). ARM64 only; the x86 decode loops are in decode.c. */
#include "bitlab_cpu.h"

#ifdef BITLAB_ARM
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* y of output row n of the one token from its exact sum acc: the same epilogue as the tiles and the GEMM */
static inline float decode_out(const job_t *j, int64_t n, int32_t acc) {
    const int64_t m = 0;
    RESCALE_BODY(acc)
}

static inline int32_t hsum_s32(int32x4_t v) { return vaddvq_s32(v); }

/* ------------------------------------------------------------------------------------------ */
/* Ternary: acc = sum(code * xq) over the packed row (codes c = w + 1; the driver subtracts sum(xq)). Byte j  */
/* of a 128-block holds k = j, j+32, j+64, j+96 in bits 0-1, 2-3, 4-5, 6-7.                                   */
/* ------------------------------------------------------------------------------------------ */
/* sdot: the masks 3 << 2r (r < 3) leave code * 4^r <= 32, a valid int8, so run r accumulates 4^r * sum(code * x)
 * in its own chain and shifts back exactly at the end; run 3 is byte >> 6. A lane gains <= 2 * 4 * 32 * 128 per
 * block in chain 2, so rows are summed in parts of DECODE_MAX_RUNS / 4 blocks (exact int32 partial sums). */
ALWAYS_INLINE TGT_DOTPROD void tern_part_dot(const uint8_t *w, int64_t stride, const int NR, const int8_t *x,
                                             int64_t blocks, int32_t *acc) {
    const uint8x16_t mk0 = vdupq_n_u8(3), mk1 = vdupq_n_u8(3 << 2), mk2 = vdupq_n_u8(3 << 4);
    int32x4_t a[4][4];
    for (int n = 0; n < NR; n++)
        for (int r = 0; r < 4; r++) a[n][r] = vdupq_n_s32(0);
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *xb = x + b * 128;
        for (int n = 0; n < NR; n++) {
            const uint8_t *wb = w + n * stride + b * 32;
            for (int h = 0; h < 2; h++) {
                const uint8x16_t v = vld1q_u8(wb + 16 * h);
                a[n][0] = SDOT(a[n][0], vreinterpretq_s8_u8(vandq_u8(v, mk0)), vld1q_s8(xb + 16 * h));
                a[n][1] = SDOT(a[n][1], vreinterpretq_s8_u8(vandq_u8(v, mk1)), vld1q_s8(xb + 32 + 16 * h));
                a[n][2] = SDOT(a[n][2], vreinterpretq_s8_u8(vandq_u8(v, mk2)), vld1q_s8(xb + 64 + 16 * h));
                a[n][3] = SDOT(a[n][3], vreinterpretq_s8_u8(vshrq_n_u8(v, 6)), vld1q_s8(xb + 96 + 16 * h));
            }
        }
    }
    for (int n = 0; n < NR; n++) {
        int32x4_t t = vaddq_s32(vaddq_s32(a[n][0], vshrq_n_s32(a[n][1], 2)),
                                vaddq_s32(vshrq_n_s32(a[n][2], 4), a[n][3]));
        acc[n] = hsum_s32(t);
    }
}

ALWAYS_INLINE TGT_DOTPROD void tern_rows_dot(const job_t *j, int64_t n, const int NR, int32_t *acc) {
    const int64_t stride = j->Kp / 4, blocks = j->Kp / 128, part = DECODE_MAX_RUNS / 4;
    const uint8_t *w = (const uint8_t *)j->w + n * stride;
    for (int r = 0; r < NR; r++) acc[r] = 0;
    for (int64_t b = 0; b < blocks; b += part) {
        int32_t p[4];
        tern_part_dot(w + b * 32, stride, NR, j->xq + b * 128, blocks - b < part ? blocks - b : part, p);
        for (int r = 0; r < NR; r++) acc[r] = (int32_t)((uint32_t)acc[r] + (uint32_t)p[r]);
    }
}

/* plain NEON: codes (byte >> 2r) & 3 times xq through dot16_neon (exact int32, no parts needed) */
ALWAYS_INLINE void tern_rows_neon(const job_t *j, int64_t n, const int NR, int32_t *acc) {
    const int64_t stride = j->Kp / 4, blocks = j->Kp / 128;
    const uint8_t *w = (const uint8_t *)j->w + n * stride;
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t a[4][2];
    for (int r = 0; r < NR; r++) a[r][0] = a[r][1] = vdupq_n_s32(0);
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *xb = j->xq + b * 128;
        for (int r = 0; r < NR; r++) {
            const uint8_t *wb = w + r * stride + b * 32;
            for (int h = 0; h < 2; h++) {
                const uint8x16_t v = vld1q_u8(wb + 16 * h);
                a[r][0] = dot16_neon(a[r][0], vreinterpretq_s8_u8(vandq_u8(v, m3)), vld1q_s8(xb + 16 * h));
                a[r][1] = dot16_neon(a[r][1], vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m3)),
                                     vld1q_s8(xb + 32 + 16 * h));
                a[r][0] = dot16_neon(a[r][0], vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m3)),
                                     vld1q_s8(xb + 64 + 16 * h));
                a[r][1] = dot16_neon(a[r][1], vreinterpretq_s8_u8(vshrq_n_u8(v, 6)), vld1q_s8(xb + 96 + 16 * h));
            }
        }
    }
    for (int r = 0; r < NR; r++) acc[r] = hsum_s32(vaddq_s32(a[r][0], a[r][1]));
}

/* ------------------------------------------------------------------------------------------ */
/* int8: rows of K bytes (not padded): 32 k per step in two chains, then 16, then the tail in scalar code.    */
/* int8 x int8 products are exact in both (xq == -128 included).                                              */
/* ------------------------------------------------------------------------------------------ */
ALWAYS_INLINE int32_t i8_tail(const int8_t *row, const int8_t *x, int64_t k, int64_t K) {
    int32_t s = 0;
    for (; k < K; k++) s += (int32_t)row[k] * x[k];
    return s;
}

#define DEFINE_I8_ROWS(NAME, TGT, DOT)                                                                      \
    ALWAYS_INLINE TGT void NAME(const job_t *j, int64_t n, const int NR, int32_t *acc) {                  \
        const int64_t K = j->K;                                                                           \
        const int8_t *w = (const int8_t *)j->w + n * K, *x = j->xq;                                       \
        int32x4_t a[4][2];                                                                                \
        for (int r = 0; r < NR; r++) a[r][0] = a[r][1] = vdupq_n_s32(0);                                  \
        int64_t k = 0;                                                                                    \
        for (; k + 32 <= K; k += 32) {                                                                    \
            const int8x16_t x0 = vld1q_s8(x + k), x1 = vld1q_s8(x + k + 16);                              \
            for (int r = 0; r < NR; r++) {                                                                \
                a[r][0] = DOT(a[r][0], vld1q_s8(w + r * K + k), x0);                                      \
                a[r][1] = DOT(a[r][1], vld1q_s8(w + r * K + k + 16), x1);                                 \
            }                                                                                             \
        }                                                                                                 \
        if (k + 16 <= K) {                                                                                \
            const int8x16_t x0 = vld1q_s8(x + k);                                                         \
            for (int r = 0; r < NR; r++) a[r][0] = DOT(a[r][0], vld1q_s8(w + r * K + k), x0);             \
            k += 16;                                                                                      \
        }                                                                                                 \
        for (int r = 0; r < NR; r++)                                                                      \
            acc[r] = (int32_t)((uint32_t)hsum_s32(vaddq_s32(a[r][0], a[r][1])) +                          \
                               (uint32_t)i8_tail(w + r * K, x, k, K));                                     \
    }
DEFINE_I8_ROWS(i8_rows_dot, TGT_DOTPROD, SDOT)
DEFINE_I8_ROWS(i8_rows_neon, , dot16_neon)

/* ------------------------------------------------------------------------------------------ */
/* int4: rows of (K + 1) / 2 bytes, two weights per byte (low nibble = even k, two's complement); a 64-k chunk */
/* is 32 bytes, and quant_rows stores each chunk's xq even k first, then odd k (see i4_codes in bitlab_cpu.h). */
/* Signed nibbles: (v << 4) >> 4 and v >> 4 (arithmetic). The ragged last chunk goes through a zeroed copy.  */
/* ------------------------------------------------------------------------------------------ */
#define DEFINE_I4_ROWS(NAME, TGT, DOT)                                                                      \
    ALWAYS_INLINE TGT void NAME##_chunk(int32x4_t *lo, int32x4_t *hi, const uint8_t *src, const int8_t *xc) { \
        const int8x16_t v0 = vreinterpretq_s8_u8(vld1q_u8(src)), v1 = vreinterpretq_s8_u8(vld1q_u8(src + 16)); \
        *lo = DOT(*lo, vshrq_n_s8(vshlq_n_s8(v0, 4), 4), vld1q_s8(xc));                                   \
        *lo = DOT(*lo, vshrq_n_s8(vshlq_n_s8(v1, 4), 4), vld1q_s8(xc + 16));                              \
        *hi = DOT(*hi, vshrq_n_s8(v0, 4), vld1q_s8(xc + 32));                                             \
        *hi = DOT(*hi, vshrq_n_s8(v1, 4), vld1q_s8(xc + 48));                                             \
    }                                                                                                     \
    ALWAYS_INLINE TGT void NAME(const job_t *j, int64_t n, const int NR, int32_t *acc) {                  \
        const int64_t rb = (j->K + 1) / 2, full = rb / 32;                                                \
        const uint8_t *w = (const uint8_t *)j->w + n * rb;                                                \
        int32x4_t lo[4], hi[4];                                                                           \
        for (int r = 0; r < NR; r++) lo[r] = hi[r] = vdupq_n_s32(0);                                      \
        for (int64_t c = 0; c < full; c++)                                                                \
            for (int r = 0; r < NR; r++) NAME##_chunk(&lo[r], &hi[r], w + r * rb + c * 32, j->xq + c * 64); \
        if (rb % 32)                                                                                      \
            for (int r = 0; r < NR; r++) {                                                                \
                uint8_t t[32] = {0};                                                                      \
                memcpy(t, w + r * rb + full * 32, (size_t)(rb % 32));                                     \
                NAME##_chunk(&lo[r], &hi[r], t, j->xq + full * 64);                                       \
            }                                                                                             \
        for (int r = 0; r < NR; r++) acc[r] = hsum_s32(vaddq_s32(lo[r], hi[r]));                          \
    }
DEFINE_I4_ROWS(i4_rows_dot, TGT_DOTPROD, SDOT)
DEFINE_I4_ROWS(i4_rows_neon, , dot16_neon)

/* ------------------------------------------------------------------------------------------ */
/* The driver: 4-row tiles, then the ragged end one row at a time; each rows function in both shapes.          */
/* ------------------------------------------------------------------------------------------ */
typedef void (*rows_fn)(const job_t *j, int64_t n, int32_t *acc);

#define ROWS_4_AND_1(BODY, TGT)                                                                              \
    static TGT void BODY##_4(const job_t *j, int64_t n, int32_t *acc) { BODY(j, n, 4, acc); }             \
    static TGT void BODY##_1(const job_t *j, int64_t n, int32_t *acc) { BODY(j, n, 1, acc); }
ROWS_4_AND_1(tern_rows_dot, TGT_DOTPROD)
ROWS_4_AND_1(i8_rows_dot, TGT_DOTPROD)
ROWS_4_AND_1(i4_rows_dot, TGT_DOTPROD)
ROWS_4_AND_1(tern_rows_neon, )
ROWS_4_AND_1(i8_rows_neon, )
ROWS_4_AND_1(i4_rows_neon, )

/* [with sdot][weight format]: the rows functions and the code offset (ternary codes are w + 1) */
static const struct {
    rows_fn four, one;
    int32_t off;
} DECODE_ARM[2][3] = {
    {[W_TERNARY] = {tern_rows_neon_4, tern_rows_neon_1, 1}, [W_INT8] = {i8_rows_neon_4, i8_rows_neon_1, 0},
     [W_INT4] = {i4_rows_neon_4, i4_rows_neon_1, 0}},
    {[W_TERNARY] = {tern_rows_dot_4, tern_rows_dot_1, 1}, [W_INT8] = {i8_rows_dot_4, i8_rows_dot_1, 0},
     [W_INT4] = {i4_rows_dot_4, i4_rows_dot_1, 0}},
};

BITLAB_INTERNAL int bitlab_decode_arm(const job_t *j, int64_t n0, int64_t n1) {
    if (j->isa < ISA_NEON || j->ws_kind == 2) return 0;
    const int dot = j->isa >= ISA_DOTPROD; /* i8mm CPUs decode with sdot (smmla would waste half its products) */
    const rows_fn four = DECODE_ARM[dot][j->wfmt].four, one = DECODE_ARM[dot][j->wfmt].one;
    const uint32_t sub = (uint32_t)DECODE_ARM[dot][j->wfmt].off * (uint32_t)j->gsum[0]; /* off * sum(xq) */
    int32_t acc[4];
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        four(j, n, acc);
        for (int r = 0; r < 4; r++) j->out[n + r] = decode_out(j, n + r, (int32_t)((uint32_t)acc[r] - sub));
    }
    for (; n < n1; n++) {
        one(j, n, acc);
        j->out[n] = decode_out(j, n, (int32_t)((uint32_t)acc[0] - sub));
    }
    return 1;
}
#endif /* BITLAB_ARM */
