/* decode_neon.c: M == 1 on ARM64 (the decode step of a language model): output rows [n0, n1) of a thread, 4 rows
 * per tile, for ternary, int8 and int4 weights, each with the ARMv8.2 dot product (sdot: 16 int8 products into 4
 * int32 lanes per instruction) and in plain NEON (dot16_neon: smull + sadalp). The rows functions sum over a range
 * of units (ternary: 128-blocks, int8: k, int4: 32-k halves of a chunk), so per-group scales run here too when
 * every group is whole units (ternary groups of 32 or 64 k take the batched GEMM, gemm_neon.c). The sums are exact
 * int32; the rescale is the portable epilogue (RESCALE_BODY), per group its order (sum_g left to right, then / s,
 * + bias), so every path rounds like reference.py. run_thread (bitlab_cpu.c) calls bitlab_decode_arm. ARM64 only;
 * the x86 decode loops are in decode.c. */
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

ALWAYS_INLINE TGT_DOTPROD void tern_rows_dot(const job_t *j, int64_t n, const int NR, int64_t b0, int64_t b1,
                                             int32_t *acc) {
    const int64_t stride = j->Kp / 4, part = DECODE_MAX_RUNS / 4;
    const uint8_t *w = (const uint8_t *)j->w + n * stride;
    for (int r = 0; r < NR; r++) acc[r] = 0;
    for (int64_t b = b0; b < b1; b += part) {
        int32_t p[4];
        tern_part_dot(w + b * 32, stride, NR, j->xq + b * 128, b1 - b < part ? b1 - b : part, p);
        for (int r = 0; r < NR; r++) acc[r] = (int32_t)((uint32_t)acc[r] + (uint32_t)p[r]);
    }
}

/* plain NEON: codes (byte >> 2r) & 3 times xq through dot16_neon (exact int32, no parts needed) */
ALWAYS_INLINE void tern_rows_neon(const job_t *j, int64_t n, const int NR, int64_t b0, int64_t b1, int32_t *acc) {
    const int64_t stride = j->Kp / 4;
    const uint8_t *w = (const uint8_t *)j->w + n * stride;
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t a[4][2];
    for (int r = 0; r < NR; r++) a[r][0] = a[r][1] = vdupq_n_s32(0);
    for (int64_t b = b0; b < b1; b++) {
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
/* int8: rows of K bytes (not padded), k in [k0, k1): 32 k per step in two chains, then 16, then the tail in   */
/* scalar code. int8 x int8 products are exact in both (xq == -128 included).                                  */
/* ------------------------------------------------------------------------------------------ */
ALWAYS_INLINE int32_t i8_tail(const int8_t *row, const int8_t *x, int64_t k, int64_t K) {
    int32_t s = 0;
    for (; k < K; k++) s += (int32_t)row[k] * x[k];
    return s;
}

#define DEFINE_I8_ROWS(NAME, TGT, DOT)                                                                      \
    ALWAYS_INLINE TGT void NAME(const job_t *j, int64_t n, const int NR, int64_t k0, int64_t k1, int32_t *acc) { \
        const int64_t K = j->K;                                                                           \
        const int8_t *w = (const int8_t *)j->w + n * K, *x = j->xq;                                       \
        int32x4_t a[4][2];                                                                                \
        for (int r = 0; r < NR; r++) a[r][0] = a[r][1] = vdupq_n_s32(0);                                  \
        int64_t k = k0;                                                                                   \
        for (; k + 32 <= k1; k += 32) {                                                                   \
            const int8x16_t x0 = vld1q_s8(x + k), x1 = vld1q_s8(x + k + 16);                              \
            for (int r = 0; r < NR; r++) {                                                                \
                a[r][0] = DOT(a[r][0], vld1q_s8(w + r * K + k), x0);                                      \
                a[r][1] = DOT(a[r][1], vld1q_s8(w + r * K + k + 16), x1);                                 \
            }                                                                                             \
        }                                                                                                 \
        if (k + 16 <= k1) {                                                                               \
            const int8x16_t x0 = vld1q_s8(x + k);                                                         \
            for (int r = 0; r < NR; r++) a[r][0] = DOT(a[r][0], vld1q_s8(w + r * K + k), x0);             \
            k += 16;                                                                                      \
        }                                                                                                 \
        for (int r = 0; r < NR; r++)                                                                      \
            acc[r] = (int32_t)((uint32_t)hsum_s32(vaddq_s32(a[r][0], a[r][1])) +                          \
                               (uint32_t)i8_tail(w + r * K, x, k, k1));                                    \
    }
DEFINE_I8_ROWS(i8_rows_dot, TGT_DOTPROD, SDOT)
DEFINE_I8_ROWS(i8_rows_neon, , dot16_neon)

/* ------------------------------------------------------------------------------------------ */
/* int4: rows of (K + 1) / 2 bytes, two weights per byte (low nibble = even k, two's complement); a 64-k chunk */
/* is 32 bytes, and quant_rows stores each chunk's xq even k first, then odd k (see i4_codes in bitlab_cpu.h), */
/* so the 16 bytes of half h of a chunk (k 32h .. 32h + 31 of it) pair with the xq bytes 16h .. 16h + 15 of each */
/* parity. The rows functions walk halves [h0, h1). Signed nibbles: (v << 4) >> 4 and v >> 4 (arithmetic). A  */
/* ragged last half goes through a zeroed copy; halves wholly past the row's bytes hold no weights.          */
#define DEFINE_I4_ROWS(NAME, TGT, DOT)                                                                      \
    ALWAYS_INLINE TGT void NAME##_half(int32x4_t *lo, int32x4_t *hi, const uint8_t *src, const int8_t *xh) { \
        const int8x16_t v = vreinterpretq_s8_u8(vld1q_u8(src));                                           \
        *lo = DOT(*lo, vshrq_n_s8(vshlq_n_s8(v, 4), 4), vld1q_s8(xh));                                    \
        *hi = DOT(*hi, vshrq_n_s8(v, 4), vld1q_s8(xh + 32));                                              \
    }                                                                                                     \
    ALWAYS_INLINE TGT void NAME(const job_t *j, int64_t n, const int NR, int64_t h0, int64_t h1, int32_t *acc) { \
        const int64_t rb = (j->K + 1) / 2, full = rb / 16;                                                \
        const uint8_t *w = (const uint8_t *)j->w + n * rb;                                                \
        int32x4_t lo[4], hi[4];                                                                           \
        for (int r = 0; r < NR; r++) lo[r] = hi[r] = vdupq_n_s32(0);                                      \
        int64_t h = h0;                                                                                   \
        for (; h < h1 && h < full; h++)                                                                   \
            for (int r = 0; r < NR; r++)                                                                  \
                NAME##_half(&lo[r], &hi[r], w + r * rb + h * 16, j->xq + (h >> 1) * 64 + (h & 1) * 16);  \
        if (h < h1 && h == full && rb % 16)                                                               \
            for (int r = 0; r < NR; r++) {                                                                \
                uint8_t t[16] = {0};                                                                      \
                memcpy(t, w + r * rb + full * 16, (size_t)(rb % 16));                                     \
                NAME##_half(&lo[r], &hi[r], t, j->xq + (h >> 1) * 64 + (h & 1) * 16);                     \
            }                                                                                             \
        for (int r = 0; r < NR; r++) acc[r] = hsum_s32(vaddq_s32(lo[r], hi[r]));                          \
    }
DEFINE_I4_ROWS(i4_rows_dot, TGT_DOTPROD, SDOT)
DEFINE_I4_ROWS(i4_rows_neon, , dot16_neon)

/* ------------------------------------------------------------------------------------------ */
/* The driver: 4-row tiles, then the ragged end one row at a time; each rows function in both shapes.          */
/* ------------------------------------------------------------------------------------------ */
typedef void (*rows_fn)(const job_t *j, int64_t n, int64_t u0, int64_t u1, int32_t *acc);

#define ROWS_4_AND_1(BODY, TGT)                                                                              \
    static TGT void BODY##_4(const job_t *j, int64_t n, int64_t u0, int64_t u1, int32_t *acc) {             \
        BODY(j, n, 4, u0, u1, acc);                                                                          \
    }                                                                                                        \
    static TGT void BODY##_1(const job_t *j, int64_t n, int64_t u0, int64_t u1, int32_t *acc) {             \
        BODY(j, n, 1, u0, u1, acc);                                                                          \
    }
ROWS_4_AND_1(tern_rows_dot, TGT_DOTPROD)
ROWS_4_AND_1(i8_rows_dot, TGT_DOTPROD)
ROWS_4_AND_1(i4_rows_dot, TGT_DOTPROD)
ROWS_4_AND_1(tern_rows_neon, )
ROWS_4_AND_1(i8_rows_neon, )
ROWS_4_AND_1(i4_rows_neon, )

/* [with sdot][weight format]: the rows functions, the code offset (ternary codes are w + 1) and the k of the unit
 * the rows functions walk (a scale group must be whole units) */
static const struct {
    rows_fn four, one;
    int32_t off;
    int64_t unit_k;
} DECODE_ARM[2][3] = {
    {[W_TERNARY] = {tern_rows_neon_4, tern_rows_neon_1, 1, 128}, [W_INT8] = {i8_rows_neon_4, i8_rows_neon_1, 0, 1},
     [W_INT4] = {i4_rows_neon_4, i4_rows_neon_1, 0, 32}},
    {[W_TERNARY] = {tern_rows_dot_4, tern_rows_dot_1, 1, 128}, [W_INT8] = {i8_rows_dot_4, i8_rows_dot_1, 0, 1},
     [W_INT4] = {i4_rows_dot_4, i4_rows_dot_1, 0, 32}},
};

BITLAB_INTERNAL int bitlab_decode_arm_takes(const job_t *j) {
    return j->M == 1 && j->isa >= ISA_NEON && (j->ws_kind != 2 || j->gs % DECODE_ARM[0][j->wfmt].unit_k == 0);
}

/* rows n .. n + nr - 1 with per-group scales: each group's exact sums, rescaled and added up left to right, then
 * / s (+ bias): RESCALE_BODY's arithmetic, group by group */
static void decode_groups_arm(const job_t *j, int64_t n, int nr, rows_fn rows, int32_t off, int64_t per) {
    float y[4] = {0.f, 0.f, 0.f, 0.f};
    int32_t acc[4];
    for (int64_t g = 0; g < j->G; g++) {
        rows(j, n, g * per, (g + 1) * per, acc);
        for (int r = 0; r < nr; r++) {
            const float p = (float)(int32_t)((uint32_t)acc[r] - (uint32_t)off * (uint32_t)j->gsum[g]) *
                            j->ws[(n + r) * j->G + g];
            y[r] = g ? y[r] + p : p;
        }
    }
    for (int r = 0; r < nr; r++) {
        const float v = y[r] / j->s[0];
        j->out[n + r] = j->bias ? v + j->bias[n + r] : v;
    }
}

BITLAB_INTERNAL int bitlab_decode_arm(const job_t *j, int64_t n0, int64_t n1) {
    if (!bitlab_decode_arm_takes(j)) return 0;
    const int dot = j->isa >= ISA_DOTPROD; /* i8mm CPUs decode with sdot (smmla would waste half its products) */
    const rows_fn four = DECODE_ARM[dot][j->wfmt].four, one = DECODE_ARM[dot][j->wfmt].one;
    const int32_t off = DECODE_ARM[dot][j->wfmt].off;
    const int64_t unit = DECODE_ARM[dot][j->wfmt].unit_k, units = (j->K + unit - 1) / unit;
    const uint32_t sub = (uint32_t)off * (uint32_t)j->gsum[0]; /* off * sum(xq) */
    int32_t acc[4];
    for (int64_t n = n0; n < n1;) {
        const int nr = n + 4 <= n1 ? 4 : 1;
        if (j->ws_kind == 2) {
            decode_groups_arm(j, n, nr, nr == 4 ? four : one, off, j->gs / unit);
        } else {
            (nr == 4 ? four : one)(j, n, 0, units, acc);
            for (int r = 0; r < nr; r++) j->out[n + r] = decode_out(j, n + r, (int32_t)((uint32_t)acc[r] - sub));
        }
        n += nr;
    }
    return 1;
}
#endif /* BITLAB_ARM */
