/* decode_groups.c: M == 1 with per-group weight scales (ws_kind 2) on x86: which decode loop a job takes
 * (bitlab_group_decoder, a table; run_thread, use_panel and run_job in bitlab_cpu.c ask it), and the loops that
 * sum parts of a stored unit apart: int4, each 64-k chunk's two 32-k halves (every int4 group of whole halves:
 * 32, 64, 96, 128, ...); ternary groups smaller than a 128-block (32, 64, ...), each block's four 32-k runs.
 * Each part's exact int32 sums join its group's, and each group's sum is rescaled and added up left to right
 * (group_add, bitlab_cpu.h) as reference.py and the batched path do. Ternary groups of whole blocks and int8
 * groups of whole 32-k chunks run decode.c's rows functions over each group. Groups of other sizes take the
 * small-M tiles (tiles.c). ARM64: decode_neon.c. */
#include "bitlab_cpu.h"

#ifdef BITLAB_X86
/* int4 chunk c of NR rows, its two 32-k halves apart: a chunk's bytes 0..15 hold k 0..31 of it (both nibbles),
 * which pair with the xq bytes 0..15 of each parity (quant_rows' order), so every 128-bit lane of the products
 * belongs to one half. Returns the rows' sums of the first half in the low 128 bits, of the second in the high. */
static inline __attribute__((always_inline)) TGT_VNNI __m256i
decode_halves_i4_vnni(const uint8_t *w, int64_t rb, const int NR, const int8_t *x, int64_t c, int64_t pf) {
    const __m256i xe = _mm256_loadu_si256((const __m256i *)(x + c * 64));
    const __m256i xo = _mm256_loadu_si256((const __m256i *)(x + c * 64 + 32));
    if (pf && !(c & 1))
        for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * rb + pf + c * 32), _MM_HINT_T0);
    __m256i t[4];
    for (int n = 0; n < 4; n++) {
        t[n] = _mm256_setzero_si256();
        if (n >= NR) continue;
        __m256i lo, hi;
        i4_codes(i4_load(w + n * rb, rb, c), &lo, &hi);
        t[n] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(t[n], lo, xe), hi, xo);
    }
    return _mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]));
}

/* the same on AVX2: maddubs pairs |p| <= 2 * 15 * 128 = 3840, two per int16 lane; the 4 rows' lanes are added up in
 * int16 (two hadd levels: 4 lanes of 7680 <= 30720) and widened by one madd */
static inline __attribute__((always_inline)) TGT_AVX2 __m256i
decode_halves_i4_avx2(const uint8_t *w, int64_t rb, const int NR, const int8_t *x, int64_t c, int64_t pf) {
    const __m256i one16 = _mm256_set1_epi16(1);
    const __m256i xe = _mm256_loadu_si256((const __m256i *)(x + c * 64));
    const __m256i xo = _mm256_loadu_si256((const __m256i *)(x + c * 64 + 32));
    if (pf && !(c & 1))
        for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * rb + pf + c * 32), _MM_HINT_T0);
    __m256i t[4];
    for (int n = 0; n < 4; n++) {
        t[n] = _mm256_setzero_si256();
        if (n >= NR) continue;
        __m256i lo, hi;
        i4_codes(i4_load(w + n * rb, rb, c), &lo, &hi);
        t[n] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
    }
    return _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(t[0], t[1]), _mm256_hadd_epi16(t[2], t[3])), one16);
}

/* A per-group driver over parts of PART_K k (NPARTS per stored unit): PARTS(w, stride, NR, x, u, pf, p) puts the NR
 * rows' sums of each part of unit u in p[0 .. NPARTS - 1]; each part joins the current group's sum, which is
 * rescaled (group_add) when its last part is in. Parts past K (the end of a ragged last unit) are skipped. */
#define DEFINE_DECODE_PARTS(NAME, TGT, PARTS, STRIDE, PART_K, NPARTS, OFF)                                      \
    static inline __attribute__((always_inline)) TGT void NAME##_tile(const job_t *j, int64_t n, const int NR,  \
                                                                      int64_t pf) {                           \
        const int64_t stride = (STRIDE), parts = j->K / (PART_K), per = j->gs / (PART_K);                      \
        const uint8_t *w = (const uint8_t *)j->w + n * stride;                                                 \
        __m128 y = _mm_setzero_ps();                                                                           \
        __m128i acc = _mm_setzero_si128();                                                                     \
        int64_t g = 0, left = per;                                                                             \
        for (int64_t u = 0; u * (NPARTS) < parts; u++) {                                                       \
            __m128i p[NPARTS];                                                                                 \
            PARTS(w, stride, NR, j->xq, u, pf, p);                                                             \
            for (int h = 0; h < (NPARTS) && u * (NPARTS) + h < parts; h++) {                                   \
                acc = _mm_add_epi32(acc, p[h]);                                                                \
                if (--left == 0) {                                                                             \
                    y = group_add(j, n, NR, g++, acc, OFF, y);                                                 \
                    acc = _mm_setzero_si128();                                                                 \
                    left = per;                                                                                \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        group_store(j, n, NR, y);                                                                              \
    }                                                                                                          \
    DEFINE_ROW_WALK(NAME, TGT, STRIDE)

/* int4 chunk c in the parts driver's form: its two halves */
#define I4_HALVES(SUFFIX, TGT)                                                                                  \
    static inline __attribute__((always_inline)) TGT void i4_halves_##SUFFIX(                                  \
        const uint8_t *w, int64_t rb, const int NR, const int8_t *x, int64_t c, int64_t pf, __m128i *p) {      \
        const __m256i both = decode_halves_i4_##SUFFIX(w, rb, NR, x, c, pf);                                   \
        p[0] = _mm256_castsi256_si128(both);                                                                   \
        p[1] = _mm256_extracti128_si256(both, 1);                                                              \
    }
I4_HALVES(vnni, TGT_VNNI)
I4_HALVES(avx2, TGT_AVX2)

/* Ternary block b of NR rows, each 32-k run's sums apart (groups of 32 or 64 k, or odd multiples): run r's codes
 * (byte >> 2r) & 3 (maddubs pairs <= 2 * 2 * 128), the rows' lanes added up in int16 (4 lanes <= 2048) and
 * widened by one madd; the two 128-bit halves (k 0..15, 16..31 of the run) added. AVX2 code on either ISA. */
static inline __attribute__((always_inline)) TGT_AVX2 void
tern_runs_avx2(const uint8_t *w, int64_t stride, const int NR, const int8_t *x, int64_t b, int64_t pf, __m128i *p) {
    const __m256i m3 = _mm256_set1_epi8(3), one16 = _mm256_set1_epi16(1);
    __m256i wv[4];
    for (int n = 0; n < NR; n++) wv[n] = _mm256_loadu_si256((const __m256i *)(w + n * stride + b * 32));
    if (pf && (b & 1))
        for (int n = 0; n < NR; n++) _mm_prefetch((const char *)(w + n * stride + pf + b * 32), _MM_HINT_T0);
    for (int r = 0; r < 4; r++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + b * 128 + 32 * r));
        __m256i t[4];
        for (int n = 0; n < 4; n++)
            t[n] = n < NR ? _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(wv[n], 2 * r), m3), xv)
                          : _mm256_setzero_si256();
        const __m256i h = _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(t[0], t[1]),
                                                              _mm256_hadd_epi16(t[2], t[3])), one16);
        p[r] = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    }
}

DEFINE_DECODE_PARTS(decode_halves_vnni, TGT_VNNI, i4_halves_vnni, (j->K + 1) / 2, 32, 2, 8)
DEFINE_DECODE_PARTS(decode_halves_avx2, TGT_AVX2, i4_halves_avx2, (j->K + 1) / 2, 32, 2, 8)
DEFINE_DECODE_PARTS(decode_runs_avx2, TGT_AVX2, tern_runs_avx2, j->Kp / 4, 32, 4, 1)

/* The per-group loops, the first that fits taken: weight format, the k a group must be a multiple of, the loop
 * [AVX2, VNNI]. int4 runs the parts loop for every group size (per chunk, its halves apart): faster than a chunk
 * loop per group, which also reduces once per group but restarts its accumulators and loop per group. */
static const struct {
    int wfmt;
    int64_t unit_k;
    decode_fn loop[2];
} GROUP_DECODE[] = {
    {W_TERNARY, 128, {bitlab_decode_groups_avx2, bitlab_decode_groups_vnni}}, /* whole 128-blocks (decode.c) */
    {W_TERNARY, 32, {decode_runs_avx2, decode_runs_avx2}},                    /* 32-k runs */
    {W_INT8, 32, {bitlab_decode_groups_i8_avx2, bitlab_decode_groups_i8_vnni}}, /* whole 32-k chunks (decode.c) */
    {W_INT4, 32, {decode_halves_avx2, decode_halves_vnni}},
};

decode_fn bitlab_group_decoder(const job_t *j) {
    if (j->M != 1 || j->ws_kind != 2 || j->isa < ISA_AVX2 || j->gs <= 0) return NULL;
    const int vnni = j->isa == ISA_VNNI;
    if (j->wfmt == W_INT8 && !vnni && j->has_m128) return NULL; /* maddubs(|w|, sign(xq, w)) needs xq != -128 */
    for (size_t e = 0; e < sizeof GROUP_DECODE / sizeof GROUP_DECODE[0]; e++)
        if (GROUP_DECODE[e].wfmt == j->wfmt && j->gs % GROUP_DECODE[e].unit_k == 0) return GROUP_DECODE[e].loop[vnni];
    return NULL;
}
#endif /* BITLAB_X86 */
