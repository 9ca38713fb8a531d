/* gemm_neon.c: the batched GEMM's ARM64 micro-kernels (tokens in vector lanes, see "Batched GEMM" in gemm.c,
 * which walks the columns, unpacks the rows and rescales) and the row unpacking they read: any weight format
 * -> signed bytes in the order of xq. On ARM64 the activation tiles hold xq itself (XT_OFFSET 0: sdot and smull
 * multiply signed bytes), xt[tile][q][8 tokens][4 k], so a tile's sums need no correction.
 *   sdot:       8 weight rows x 8 tokens, 16 accumulators; a 16-byte load holds 4 steps of one row, and
 *               sdot's by-element form multiplies each token's 4 activations with one step's 4 weights.
 *   plain NEON: 4 weight rows x 8 tokens; each step's weights broadcast (ld1r), smull + sadalp into pairs of
 *               k per token, added pairwise at the end.
 *   i8mm:       8 weight rows x 8 tokens in 2x2 blocks, smmla (8 k of 2 rows times 8 k of 2 tokens); its tiles hold
 *               8 k per token (xt_k = 8: xt[tile][k / 8][8 tokens][8 k]).
 * Both exact int32 for every int8 value. ARM64 only. */
#include "bitlab_cpu.h"

#ifdef BITLAB_ARM
#define ROWS8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define ROWS4(X) X(0) X(1) X(2) X(3)

/* 8 rows x 8 tokens with sdot; steps [q0, q1) (a group's), 4 at a time where aligned (4 steps never cross a
 * 128-k block, so a row's next 16 weight bytes are contiguous) */
static TGT_DOTPROD void panel_dot(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile) {
    enum { NC = PANEL_DOT_NC, MT = PANEL_ARM_MT };
#define DECL(c) int32x4_t a##c##_0 = vdupq_n_s32(0), a##c##_1 = vdupq_n_s32(0);
    ROWS8(DECL)
#undef DECL
    const int8_t *x = (const int8_t *)xt;
#define STEP(c, w, lane)                                                                                        \
    a##c##_0 = SDOT_LANE(a##c##_0, x0, w, lane);                                                         \
    a##c##_1 = SDOT_LANE(a##c##_1, x1, w, lane);
    int64_t q = q0;
    for (; q < q1 && ((q & 3) || q + 4 > q1); q++) { /* a head (group starts off a multiple of 4), or a tail */
        const int8_t *wq = PANEL_W(w8, NC, q), *xp = x + q * MT * 4;
        const int8x16_t x0 = vld1q_s8(xp), x1 = vld1q_s8(xp + 16);
#define ONE(c) STEP(c, vreinterpretq_s8_s32(vld1q_dup_s32((const int32_t *)(wq + c * 128))), 0)
        ROWS8(ONE)
#undef ONE
    }
    for (; q + 4 <= q1; q += 4) {
        const int8_t *wq = PANEL_W(w8, NC, q), *xp = x + q * MT * 4;
#define LOADW(c) const int8x16_t w##c = vld1q_s8(wq + c * 128);
        ROWS8(LOADW)
#undef LOADW
#define LANE(c, lane) STEP(c, w##c, lane)
#define FOUR(lane)                                                                                              \
    {                                                                                                           \
        const int8x16_t x0 = vld1q_s8(xp + lane * MT * 4), x1 = vld1q_s8(xp + lane * MT * 4 + 16);             \
        LANE(0, lane) LANE(1, lane) LANE(2, lane) LANE(3, lane) LANE(4, lane) LANE(5, lane) LANE(6, lane)       \
        LANE(7, lane)                                                                                           \
    }
        FOUR(0) FOUR(1) FOUR(2) FOUR(3)
#undef FOUR
#undef LANE
    }
    for (; q < q1; q++) { /* tail */
        const int8_t *wq = PANEL_W(w8, NC, q), *xp = x + q * MT * 4;
        const int8x16_t x0 = vld1q_s8(xp), x1 = vld1q_s8(xp + 16);
#define ONE(c) STEP(c, vreinterpretq_s8_s32(vld1q_dup_s32((const int32_t *)(wq + c * 128))), 0)
        ROWS8(ONE)
#undef ONE
    }
#undef STEP
#define STORE(c)                                                                                                \
    vst1q_s32(tile + c * MT, a##c##_0);                                                                         \
    vst1q_s32(tile + c * MT + 4, a##c##_1);
    ROWS8(STORE)
#undef STORE
}

/* 4 rows x 8 tokens in plain NEON: p##c##_t holds tokens 2t, 2t + 1 as (k0 + k1, k2 + k3) pairs */
static void panel_neon(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile) {
    enum { NC = PANEL_NEON_NC, MT = PANEL_ARM_MT };
#define DECL(c) int32x4_t p##c##_0 = vdupq_n_s32(0), p##c##_1 = p##c##_0, p##c##_2 = p##c##_0, p##c##_3 = p##c##_0;
    ROWS4(DECL)
#undef DECL
    const int8_t *x = (const int8_t *)xt;
    for (int64_t q = q0; q < q1; q++) {
        const int8_t *wq = PANEL_W(w8, NC, q), *xp = x + q * MT * 4;
        const int8x16_t x0 = vld1q_s8(xp), x1 = vld1q_s8(xp + 16);
#define STEP(c)                                                                                                 \
    {                                                                                                           \
        const int8x16_t b = vreinterpretq_s8_s32(vld1q_dup_s32((const int32_t *)(wq + c * 128)));             \
        p##c##_0 = vpadalq_s16(p##c##_0, vmull_s8(vget_low_s8(x0), vget_low_s8(b)));                          \
        p##c##_1 = vpadalq_s16(p##c##_1, vmull_high_s8(x0, b));                                                \
        p##c##_2 = vpadalq_s16(p##c##_2, vmull_s8(vget_low_s8(x1), vget_low_s8(b)));                          \
        p##c##_3 = vpadalq_s16(p##c##_3, vmull_high_s8(x1, b));                                                \
    }
        ROWS4(STEP)
#undef STEP
    }
#define STORE(c)                                                                                                \
    vst1q_s32(tile + c * MT, vpaddq_s32(p##c##_0, p##c##_1));                                                   \
    vst1q_s32(tile + c * MT + 4, vpaddq_s32(p##c##_2, p##c##_3));
    ROWS4(STORE)
#undef STORE
}

/* 8 rows x 8 tokens with smmla (i8mm): tiles of 8 k per token (xt_k = 8), steps [q0, q1) even (in 4-k steps, so
 * the byte offsets match the 4-k layout). Register a##r##t holds rows 2r, 2r + 1 x tokens 2t, 2t + 1 as
 * (r0 t0, r0 t1, r1 t0, r1 t1): one smmla multiplies 8 k of two weight rows with 8 k of two tokens. */
static TGT_I8MM void panel_mmla(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile) {
    enum { NC = PANEL_MMLA_NC, MT = PANEL_ARM_MT };
#define PAIRS(X, r) X(r, 0) X(r, 1) X(r, 2) X(r, 3)
#define ALL(X) PAIRS(X, 0) PAIRS(X, 1) PAIRS(X, 2) PAIRS(X, 3)
#define DECL(r, t) int32x4_t a##r##t = vdupq_n_s32(0);
    ALL(DECL)
#undef DECL
    const int8_t *x = (const int8_t *)xt;
    for (int64_t q = q0; q < q1; q += 2) {
        const int8_t *wq = PANEL_W(w8, NC, q), *xp = x + q * MT * 4;
        const int8x16_t x0 = vld1q_s8(xp), x1 = vld1q_s8(xp + 16), x2 = vld1q_s8(xp + 32), x3 = vld1q_s8(xp + 48);
#define ROWPAIR(r)                                                                                              \
    {                                                                                                           \
        const int8x16_t w = vcombine_s8(vld1_s8(wq + 2 * r * 128), vld1_s8(wq + (2 * r + 1) * 128));          \
        a##r##0 = SMMLA(a##r##0, w, x0);                                                                        \
        a##r##1 = SMMLA(a##r##1, w, x1);                                                                        \
        a##r##2 = SMMLA(a##r##2, w, x2);                                                                        \
        a##r##3 = SMMLA(a##r##3, w, x3);                                                                        \
    }
        ROWPAIR(0) ROWPAIR(1) ROWPAIR(2) ROWPAIR(3)
#undef ROWPAIR
    }
#define STORE(r, t)                                                                                             \
    vst1_s32(tile + 2 * r * MT + 2 * t, vget_low_s32(a##r##t));                                                 \
    vst1_s32(tile + (2 * r + 1) * MT + 2 * t, vget_high_s32(a##r##t));
    ALL(STORE)
#undef STORE
#undef ALL
#undef PAIRS
}

BITLAB_INTERNAL panel_fn bitlab_panel_arm(const job_t *j) {
    if (j->xt_k == 8) return panel_mmla;
    return j->isa >= ISA_DOTPROD ? panel_dot : panel_neon;
}

/* Row n of the weight as Kp signed bytes in the order of xq (ternary: k; int4: each 64-k chunk even k first,
 * then odd k; int8: k), zero past the stored weights. */
BITLAB_INTERNAL void bitlab_unpack_row_arm(const job_t *j, int64_t n, int8_t *row) {
    const int64_t Kp = j->Kp;
    if (j->wfmt == W_TERNARY) { /* byte i of block b: k = 128b + i + 32r in bits 2r, 2r + 1 */
        const uint8_t *src = (const uint8_t *)j->w + n * (Kp / 4);
        const uint8x16_t m3 = vdupq_n_u8(3);
        const int8x16_t one = vdupq_n_s8(1);
        for (int64_t b = 0; b < Kp / 128; b++)
            for (int h = 0; h < 2; h++) {
                const uint8x16_t v = vld1q_u8(src + b * 32 + 16 * h);
                int8_t *d = row + b * 128 + 16 * h;
                vst1q_s8(d, vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, m3)), one));
                vst1q_s8(d + 32, vsubq_s8(vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m3)), one));
                vst1q_s8(d + 64, vsubq_s8(vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m3)), one));
                vst1q_s8(d + 96, vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 6)), one));
            }
        if (j->K < Kp) memset(row + j->K, 0, (size_t)(Kp - j->K)); /* padding codes: weight 0 */
    } else if (j->wfmt == W_INT4) {
        const int64_t rb = (j->K + 1) / 2;
        const uint8_t *src = (const uint8_t *)j->w + n * rb;
        for (int64_t c = 0; c < Kp / 64; c++) {
            uint8_t t[32] = {0};
            const uint8_t *s = src + c * 32;
            if ((c + 1) * 32 > rb) { /* the ragged last chunk, and chunks past the row: zeros */
                if (c * 32 < rb) memcpy(t, s, (size_t)(rb - c * 32));
                s = t;
            }
            for (int h = 0; h < 2; h++) {
                const int8x16_t v = vreinterpretq_s8_u8(vld1q_u8(s + 16 * h));
                vst1q_s8(row + c * 64 + 16 * h, vshrq_n_s8(vshlq_n_s8(v, 4), 4));
                vst1q_s8(row + c * 64 + 32 + 16 * h, vshrq_n_s8(v, 4));
            }
        }
    } else {
        memcpy(row, (const int8_t *)j->w + n * j->K, (size_t)j->K);
        memset(row + j->K, 0, (size_t)(Kp - j->K));
    }
}
#endif /* BITLAB_ARM */
