/* bitlab_cpu.h: what the kernel's C files share: includes and the ISA switch, constants and enums, the
 * per-call work description (job_t), target attributes, small inline helpers used by more than one file,
 * and the functions one file calls in another. The library overview (math, weight layouts, which path
 * runs when) is at the top of bitlab_cpu.c; _build.py lists the files and compiles them. */
#ifndef BITLAB_CPU_H
#define BITLAB_CPU_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#if defined(__has_include)
#if __has_include(<omp.h>)
#define BITLAB_OMP_H 1
#endif
#else
#define BITLAB_OMP_H 1
#endif
#ifdef BITLAB_OMP_H
#include <omp.h>
#else /* Apple clang linked to torch's libomp (_build.openmp_variants) without OpenMP headers */
int omp_get_thread_num(void);
int omp_get_num_threads(void);
#endif
#endif

#if defined(__x86_64__) || defined(__i386__)
#define BITLAB_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#define BITLAB_ARM 1
#include <arm_neon.h>
#endif

#define BITLAB_ABI 9
#ifndef BITLAB_PART
#define BITLAB_PART 0 /* the compile job (_build.py); 0: every file (one job, or a file compiled on its own) */
#endif
#define EPS 1e-5f
#define MAXT 4 /* max register tile in n and in m */
/* The VNNI decode loops accumulate run r of each 128-block as 4^r * sum(code * xq): a lane gains
 * <= 4 * 128 * 128 per block in the last chain, so they fold into exact int32 sums every
 * DECODE_MAX_RUNS / 4 blocks (2^31 / 65536 = 32768 blocks would wrap). */
#define DECODE_MAX_RUNS (4 * 16384)

/* functions one file calls in another: not exported from the library */
#define BITLAB_INTERNAL __attribute__((visibility("hidden")))

/* x86: scalar, AVX2, VNNI; ARM64: scalar, NEON, DOTPROD, I8MM */
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2, ISA_NEON = 3, ISA_DOTPROD = 4, ISA_I8MM = 5 };
enum { W_TERNARY = 0, W_INT8 = 1, W_INT4 = 2 };
enum { ACT_TOKEN = 0, ACT_TENSOR = 1, ACT_STATIC = 2, ACT_GIVEN = 3 };

typedef void (*panel_fn)(const int8_t *w8, const uint8_t *xt, int64_t q0, int64_t q1, int32_t *tile);
/* batched GEMM tile shapes (gemm.c): weight rows per block, tokens per tile */
#define PANEL_AVX2_NC 4
#define PANEL_AVX2_MT 16
#define PANEL_V512_NC 12
#define PANEL_V512_MT 32
/* ARM64 (gemm_neon.c): 8 tokens per tile; 8 weight rows per block with sdot, 4 with plain NEON */
#define PANEL_ARM_MT 8
#define PANEL_DOT_NC 8
#define PANEL_NEON_NC 4
#define PANEL_MMLA_NC 8 /* i8mm: 8 rows x 8 tokens in 2x2 smmla blocks, 8 k per token in the tiles (xt_k) */
/* The batched GEMM's activation tiles hold the bytes xq + XT_OFFSET: x86 multiplies unsigned activations
 * (vpdpbusd, maddubs: u8 x s8) and takes XT_OFFSET * sum(w) back out; ARM64's sdot/smull take signed xq. */
#ifdef __aarch64__
#define XT_OFFSET 0
#else
#define XT_OFFSET 128
#endif

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
    const int32_t *bias_q; /* [N] integer bias codes added to the exact int32 sums before the rescale, or NULL */
    const float *bias_tok; /* [N] a float bias quantized per token on the step ws[n] / s[m] (bias_bits bits), or NULL */
    int bias_bits;
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
    int xt_k;              /* k per token in a tile row: 4, or 8 for smmla (0: 4) */
    int failed;            /* a thread could not allocate its scratch */
} job_t;

#ifdef BITLAB_X86
/* Keep an accumulator in a register at this point: stops gcc from re-associating the add chains
 * into trees that need more registers than AVX2 has (which made it spill every accumulator). */
#define PIN(v) __asm__("" : "+x"(v))
#define PINV(v) __asm__("" : "+v"(v)) /* any of the 32 AVX-512 registers */
#define TGT_AVX2 __attribute__((target("avx2,fma")))
#define TGT_VNNI __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

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

/* The small-M register tiles (tiles.c: scalar, AVX2; tiles_vnni.c: VNNI): a tile of nr weight rows x mr
 * tokens (table entry [nr - 1][mr - 1]) computes acc[n * mr + m], exact int32 dot products over runs
 * [r0, r1) (ternary) or k in [k0, k1) (int8; the last argument: "wide", some xq == -128). The tables are
 * exported, as they were when the library was one file compiled as two jobs, so its symbols stay the same. */
typedef void (*tern_fn)(const uint8_t *const *, const int8_t *const *, int64_t, int64_t, int32_t *);
typedef void (*i8_fn)(const int8_t *const *, const int8_t *const *, int64_t, int64_t, int32_t *, int);
#define DEF_ALL(D) D(1, 1) D(2, 1) D(3, 1) D(4, 1) D(1, 2) D(2, 2) D(1, 3) D(2, 3) D(1, 4) D(2, 4)
/* tiles in use: M == 1 -> 4x1 (and n remainders 1..3 x 1); M >= 2 -> 2xMR (and 1xMR) */
#define TABLE(P)                                                                                              \
    {{P##_1_1, P##_1_2, P##_1_3, P##_1_4}, {P##_2_1, P##_2_2, P##_2_3, P##_2_4}, {P##_3_1, 0, 0, 0},          \
     {P##_4_1, 0, 0, 0}}
extern const tern_fn bitlab_tern_avx2[4][4];
extern const i8_fn bitlab_i8_avx2[4][4];
extern const tern_fn bitlab_tern_vnni[4][4];
extern const i8_fn bitlab_i8_vnni[4][4];

/* 32 int32 values (four vectors, each in [-128, 127]) as 32 int8 in their order, stored at q (quant.c, train_quant.c) */
static inline __attribute__((always_inline)) TGT_AVX2 void store_i32x32_as_i8(const __m256i v[4], int8_t *q) {
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b, perm));
}

static inline __attribute__((always_inline)) TGT_AVX2 int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* The decode loops with per-group scales (ws_kind 2; decode.c, decode_groups.c): group g's sums of rows n .. n + NR - 1
 * (NR 4 or 1, in the lanes), acc - off * sum(xq over g), rescaled and added up left to right like RESCALE_BODY below
 * (separate IEEE mul and add: the same roundings) into y; group_store: y / s (+ bias) into out[n .. n + NR - 1] */
static inline __attribute__((always_inline)) TGT_AVX2 __m128 group_add(const job_t *j, int64_t n, const int NR,
                                                                       int64_t g, __m128i acc, int32_t off,
                                                                       __m128 y) {
    const __m128i exact = _mm_sub_epi32(acc, _mm_set1_epi32((int32_t)((uint32_t)off * (uint32_t)j->gsum[g])));
    const float *ws = j->ws + n * j->G + g;
    const __m128 step = NR == 4 ? _mm_setr_ps(ws[0], ws[j->G], ws[2 * j->G], ws[3 * j->G]) : _mm_set_ss(ws[0]);
    const __m128 p = _mm_mul_ps(_mm_cvtepi32_ps(exact), step);
    return g ? _mm_add_ps(y, p) : p;
}

static inline __attribute__((always_inline)) TGT_AVX2 void group_store(const job_t *j, int64_t n, const int NR,
                                                                       __m128 y) {
    y = _mm_div_ps(y, _mm_set1_ps(j->s[0]));
    if (NR == 4) {
        if (j->bias) y = _mm_add_ps(y, _mm_loadu_ps(j->bias + n));
        _mm_storeu_ps(j->out + n, y);
    } else {
        j->out[n] = j->bias ? _mm_cvtss_f32(y) + j->bias[n] : _mm_cvtss_f32(y);
    }
}

/* The row walk of a per-group decode loop NAME built on its tile NAME##_tile(j, n, NR, pf): output rows [n0, n1) in
 * 4-row tiles (prefetching the next tile's rows, STRIDE bytes a row), then the ragged end one row at a time. */
#define DEFINE_ROW_WALK(NAME, TGT, STRIDE)                                                                      \
    static TGT void NAME(const job_t *j, int64_t n0, int64_t n1) {                                             \
        int64_t n = n0;                                                                                        \
        for (; n + 4 <= n1; n += 4) NAME##_tile(j, n, 4, n + 8 <= n1 ? 4 * (STRIDE) : 0);                      \
        for (; n < n1; n++) NAME##_tile(j, n, 1, 0);                                                           \
    }
#endif

/* [b, e): thread tid's share of nt of [0, total), in whole units */
static inline void split(int64_t total, int64_t unit, int tid, int nt, int64_t *b, int64_t *e) {
    int64_t units = (total + unit - 1) / unit;
    int64_t per = units / nt, rem = units % nt;
    int64_t u0 = tid * per + (tid < rem ? tid : rem);
    int64_t u1 = u0 + per + (tid < rem ? 1 : 0);
    *b = u0 * unit < total ? u0 * unit : total;
    *e = u1 * unit < total ? u1 * unit : total;
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

/* The epilogue: what every path (decode loops, small-M tiles, batched GEMM; any ISA or architecture) does with
 * the exact int32 sum acc of output (m, n) when the row has one weight scale. Only these two functions touch the
 * biases (decode.c's 4-lane store calls int_bias_at per lane and rounds like epilogue1).
 *
 * int_bias_at: the integer bias that joins the exact sum: the stored codes bias_q[n] (an IntBias on a static
 * multiplier), or the float bias quantized on token m's own step ws[n] / s[m] (an IntBias on a dynamic
 * multiplier: clamp(round(bias_tok[n] / (ws[n] / s[m])), -2^(bits-1), 2^(bits-1) - 1), both divisions in fp32,
 * as quant/arithmetic.py's token_bias_codes), or 0. Clamp bounds are converted to fp32 as torch converts them;
 * a code at or above 2^31 (bits = 32 only) saturates. */
static inline int32_t int_bias_at(const job_t *j, int64_t m, int64_t n) {
    if (j->bias_q) return j->bias_q[n];
    if (!j->bias_tok) return 0;
    const float step = j->ws[j->ws_kind ? n : 0] / j->s[m];
    const int64_t half = (int64_t)1 << (j->bias_bits - 1);
    const float lo = (float)(-half), hi = (float)(half - 1);
    float q = nearbyintf(j->bias_tok[n] / step);
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    if (q != q) return 0;
    return q >= 2147483648.0f ? INT32_MAX : (int32_t)q;
}

/* y[m, n] = (float)(acc + int bias) * ws[n] / s[m] (+ float bias[n]): separate IEEE mul, div and add (the
 * library is compiled without FMA contraction), so it rounds exactly like reference.py. acc + int bias is
 * computed mod 2^32 like the sums themselves: exact while it fits int32. */
static inline float epilogue1(const job_t *j, int64_t m, int64_t n, int32_t acc) {
    const int32_t exact = (int32_t)((uint32_t)acc + (uint32_t)int_bias_at(j, m, n));
    const float y = (float)exact * j->ws[j->ws_kind ? n : 0] / j->s[m];
    return j->bias ? y + j->bias[n] : y;
}

/* The body of a function returning y[m, n] from the exact integer dot products of each group,
 * a(g) = sum_k xq * w over group g (A: that expression in g); used by tiles.c and gemm.c. One scale group:
 * epilogue1; integer biases only come with one scale group. */
#define RESCALE_BODY(A)                                                                                 \
    if (j->ws_kind != 2) {                                                                            \
        const int64_t g = 0;                                                                          \
        return epilogue1(j, m, n, (A));                                                               \
    }                                                                                                 \
    const float *ws = j->ws + n * j->G;                                                               \
    float y = 0.f;                                                                                    \
    for (int64_t g = 0; g < j->G; g++) {                                                              \
        float p = (float)(A) * ws[g];                                                                 \
        y = g ? y + p : p;                                                                            \
    }                                                                                                 \
    y = y / j->s[m];                                                                                  \
    if (j->bias) y = y + j->bias[n];                                                                  \
    return y;

/* ------------------------------------------------------------------------------------------ */
/* Across files                                                                                */
/* ------------------------------------------------------------------------------------------ */
/* bitlab_cpu.c */
BITLAB_INTERNAL int bitlab_isa(void); /* the ISA in use (bitlab_set_isa; the best one by default) */
BITLAB_INTERNAL int32_t bitlab_row_sum(const job_t *j, const int8_t *q, int64_t n);
/* tiles.c: small M, output columns [n0, n1) through the register tiles; 0 on success */
BITLAB_INTERNAL int bitlab_gemm_cols(job_t *j, int64_t n0, int64_t n1);
/* gemm.c: the batched path, output columns [n0, n1); 0 on success */
BITLAB_INTERNAL int bitlab_panel_cols(job_t *j, int64_t n0, int64_t n1);
#ifdef BITLAB_X86
/* decode.c: M == 1, output rows [n0, n1) (exported, like the tile tables and gemm.c's bitlab_panel_v512
 * and bitlab_panel_v512_16, for the same reason) */
void bitlab_decode_vnni(const job_t *j, int64_t n0, int64_t n1);
int bitlab_decode_i8_vnni(const job_t *j, int64_t n0, int64_t n1); /* -1: out of memory */
void bitlab_decode_i4_vnni(const job_t *j, int64_t n0, int64_t n1);
void bitlab_decode_avx2(const job_t *j, int64_t n0, int64_t n1);
void bitlab_decode_i4_avx2(const job_t *j, int64_t n0, int64_t n1);
void bitlab_decode_i8_avx2(const job_t *j, int64_t n0, int64_t n1);
/* decode.c: per-group scales, ternary groups of whole 128-blocks and int8 groups of whole 32-k chunks */
BITLAB_INTERNAL void bitlab_decode_groups_vnni(const job_t *j, int64_t n0, int64_t n1);
BITLAB_INTERNAL void bitlab_decode_groups_avx2(const job_t *j, int64_t n0, int64_t n1);
BITLAB_INTERNAL void bitlab_decode_groups_i8_vnni(const job_t *j, int64_t n0, int64_t n1);
BITLAB_INTERNAL void bitlab_decode_groups_i8_avx2(const job_t *j, int64_t n0, int64_t n1);
/* decode_groups.c: M == 1 with per-group scales: the decode loop for this job, or NULL where none applies (groups
 * that are not whole units of a loop; int8 on AVX2 with some xq == -128) */
typedef void (*decode_fn)(const job_t *j, int64_t n0, int64_t n1);
BITLAB_INTERNAL decode_fn bitlab_group_decoder(const job_t *j);
#endif

#ifdef BITLAB_ARM
/* ARM64 (isa_arm.c, quant_neon.c, decode_neon.c, gemm_neon.c): the best ISA this CPU has; a row's max |x|, its
 * codes (whole 16s; returns whether one is -128) and their sum; the decode loops (M == 1; 0: not one they handle) and
 * whether they take a job; the
 * batched GEMM's micro-kernel and its row unpacking (signed w in the order of xq) */
BITLAB_INTERNAL int bitlab_arm_best_isa(void);
BITLAB_INTERNAL float bitlab_absmax_neon(const float *x, int64_t n);
BITLAB_INTERNAL int bitlab_quant_neon(const float *x, int64_t n, float s, int8_t *q);
BITLAB_INTERNAL int32_t bitlab_sum_i8_neon(const int8_t *q, int64_t n);
BITLAB_INTERNAL int bitlab_decode_arm(const job_t *j, int64_t n0, int64_t n1);
BITLAB_INTERNAL int bitlab_decode_arm_takes(const job_t *j); /* whether bitlab_decode_arm runs this job */
BITLAB_INTERNAL panel_fn bitlab_panel_arm(const job_t *j);
BITLAB_INTERNAL void bitlab_unpack_row_arm(const job_t *j, int64_t n, int8_t *row);
/* Functions with sdot carry TGT_DOTPROD (the library is built for baseline ARMv8-A) and use SDOT (16 int8
 * products into 4 int32 lanes) and SDOT_LANE (each 4-byte group of a times group `lane` of b). gcc's arm_neon.h
 * has the intrinsics for such functions; clang's (before 16) only with -march=...+dotprod, so clang gets the
 * instruction as inline assembly. */
#if defined(__clang__)
#define TGT_DOTPROD __attribute__((target("dotprod")))
#define SDOT(acc, a, b) __extension__({                                                                       \
    int32x4_t sdot_acc_ = (acc);                                                                              \
    __asm__("sdot %0.4s, %1.16b, %2.16b" : "+w"(sdot_acc_) : "w"(a), "w"(b));                                 \
    sdot_acc_; })
#define SDOT_LANE(acc, a, b, lane) __extension__({                                                            \
    int32x4_t sdot_acc_ = (acc);                                                                              \
    __asm__("sdot %0.4s, %1.16b, %2.4b[" #lane "]" : "+w"(sdot_acc_) : "w"(a), "w"(b));                       \
    sdot_acc_; })
#else
#define TGT_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define SDOT(acc, a, b) vdotq_s32(acc, a, b)
#define SDOT_LANE(acc, a, b, lane) vdotq_laneq_s32(acc, a, b, lane)
#endif
/* smmla (FEAT_I8MM, ARMv8.6): acc[2i + j] += sum_k a[8i + k] * b[8j + k], a 2x8 by 8x2 int8 product */
#if defined(__clang__)
#define TGT_I8MM __attribute__((target("dotprod,i8mm")))
#define SMMLA(acc, a, b) __extension__({                                                                      \
    int32x4_t smmla_acc_ = (acc);                                                                             \
    __asm__("smmla %0.4s, %1.16b, %2.16b" : "+w"(smmla_acc_) : "w"(a), "w"(b));                               \
    smmla_acc_; })
#else
#define TGT_I8MM __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#define SMMLA(acc, a, b) vmmlaq_s32(acc, a, b)
#endif

/* acc += the 16 products a[i] * b[i] (int8 x int8, exact for any values, -128 included), added in pairs: plain
 * NEON's stand-in for sdot (lane i gets products 2i, 2i + 1, 2i + 8, 2i + 9; only the lanes' total is used) */
static inline __attribute__((always_inline)) int32x4_t dot16_neon(int32x4_t acc, int8x16_t a, int8x16_t b) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
}
#endif

#endif /* BITLAB_CPU_H */
