/* bitlab_fx CPU kernels: int8 activations x ternary (2-bit packed), int4 or int8 weights.
 *
 * This file: the ABI version and ISA selection, the job (scratch, threads, which path each call takes) and the
 * entry points bitlab_linear / bitlab_linear_q. Activation quantization (scalar, AVX2) is in quant.c; the paths
 * live in
 *   tiles.c        small M: dot-product register tiles (scalar, AVX2, VNNI) and their tables
 *   decode.c       M == 1 (ternary, int8, int4): the decode loops (AVX2, VNNI)
 *   gemm.c         M >= a threshold: the batched GEMM (tokens in vector lanes)
 *   weight_only.c  act = "none": float activations x integer weights (bitlab_linear_wo, bitlab_expand_wo)
 *   conv.c         bitlab_im2col_s8, the int8 im2col of the conv ops
 *   isa_arm.c, quant_neon.c, decode_neon.c, gemm_neon.c   ARM64: detection, activation quantization, the
 *                  decode loops (M == 1) and the batched GEMM's micro-kernels (NEON, sdot)
 * and bitlab_cpu.h holds what they share. _build.py compiles them into one shared library.
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
 *   y     = (float)(acc + bias_q[n]) * ws[n] / s[m]   with integer bias codes (IntBias: step ws[n] / s)
 *   y     = (float)(acc + bq[m,n]) * ws[n] / s[m]    an IntBias on a dynamic multiplier: the float bias quantized
 *           per token, bq[m,n] = clamp(round(bias[n] / (ws[n] / s[m])), -2^(bits-1), 2^(bits-1) - 1)
 *   (the epilogue: epilogue1 / int_bias_at in bitlab_cpu.h, shared by every path)
 *   y     = (sum_g (float)acc_g * ws[n,g]) / s[m]  per group
 *
 * Ternary weights are packed as codes c = w + 1 in {0,1,2} (see quant/packing.py): in each
 * 128-wide block, byte j holds k = j, j+32, j+64, j+96 in bits 0-1, 2-3, 4-5, 6-7. A "run" below
 * is 32 consecutive k (run r of block b covers k = 128b + 32r .. +31). The small-M kernels compute
 * sum(xq * c) with unsigned codes and subtract sum(xq) once per row (and group); the batched GEMM
 * computes sum((xq + 128) * w) with signed w and subtracts 128 * sum(w) (same integers).
 *
 * Paths, per call (run_thread): M == 1 (ternary, per-tensor/per-channel scales): decode_avx2/decode_vnni, one
 * loop over a thread's rows in 4-row tiles with a vector epilogue (decode.c); M == 1 with per-group scales: the
 * loop bitlab_group_decoder picks (decode.c: groups of whole 128-blocks for ternary, 32-k halves for int4, 32-k
 * chunks for int8; other groups the paths below). Small M: dot-product tiles of
 * up to 4 rows x 4 tokens through function tables (tiles.c). M >= the batched threshold: panel_cols, tokens
 * in vector lanes (see "Batched GEMM" in gemm.c).
 *
 * ISA: scalar (portable), AVX2 (maddubs, int16 partial sums flushed to int32 before they can
 * overflow), AVX-512 VNNI (vpdpbusd, int32 accumulation; 256-bit vectors except in the batched
 * GEMM, which uses all 32 zmm registers). Chosen at run time with __builtin_cpu_supports.
 * ARM64: NEON (smull + sadalp: exact int32 for any int8) and DOTPROD (sdot, ARMv8.2 FEAT_DotProd), chosen at run
 * time by isa_arm.c (getauxval / sysctlbyname); M == 1 runs the decode loops (per-group scales too, where the
 * groups are whole units of their loops), every other M the batched GEMM (whose activation tiles then hold signed
 * xq: XT_OFFSET 0).
 */
#include "bitlab_cpu.h"

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
#ifdef BITLAB_ARM
    return bitlab_arm_best_isa();
#endif
    return ISA_SCALAR;
}

/* Select the ISA: scalar, or one of this architecture's up to the best the CPU has (x86: AVX2 < VNNI; ARM64:
 * NEON < DOTPROD < I8MM); anything else selects the best. Returns the one in use. */
int bitlab_set_isa(int isa) {
    int best = bitlab_best_isa();
    int ok = isa == ISA_SCALAR || (isa > 0 && isa <= best && (isa >= ISA_NEON) == (best >= ISA_NEON));
    g_isa = ok ? isa : best;
    return g_isa;
}

BITLAB_INTERNAL int bitlab_isa(void) {
    if (g_isa < 0) bitlab_set_isa(-1);
    return g_isa;
}

/* ------------------------------------------------------------------------------------------ */
/* Phases                                                                                      */
/* ------------------------------------------------------------------------------------------ */
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
        if (!j->xt) /* each group's sum of xq, before int4's reorder (a group of 32 k is half a chunk) */
            for (int64_t g = 0; g < j->G; g++) j->gsum[m * j->G + g] = bitlab_row_sum(j, q + g * j->gs, j->gs);
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
        if (j->xt) { /* this row's groups of kg bytes, offset to unsigned, into its lane of its tile */
            const int64_t kg = j->xt_k ? j->xt_k : 4, Q = j->Kp / kg, mt = j->pmt;
            uint8_t *dst = j->xt + (m / mt) * Q * mt * kg + (m % mt) * kg;
            for (int64_t qi = 0; qi < Q; qi++)
                for (int64_t b = 0; b < kg; b += 4) {
                    uint32_t d;
                    memcpy(&d, q + qi * kg + b, 4);
                    d ^= XT_OFFSET * 0x01010101u;
                    memcpy(dst + qi * mt * kg + b, &d, 4);
                }
        }
    }
}

/* a thread's path failed (out of memory): the call returns an error */
static void mark_failed(job_t *j) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
    j->failed = 1;
}

#ifdef BITLAB_X86
/* M == 1 on x86: runs this thread's output rows n0..n1 on the decode loop that takes the job and returns 1, or
 * returns 0 (the job takes the tiles). */
static int decode_x86(job_t *j, int64_t n0, int64_t n1) {
    const decode_fn group_decode = bitlab_group_decoder(j); /* M == 1, per-group scales */
    if (group_decode) {
        group_decode(j, n0, n1);
        return 1;
    }
    if (j->M != 1 || j->ws_kind == 2 || j->isa < ISA_AVX2) return 0;  /* (int4 per-group: use_panel took it) */
    if (j->wfmt == W_TERNARY) {
        if (j->isa == ISA_VNNI) bitlab_decode_vnni(j, n0, n1);
        else bitlab_decode_avx2(j, n0, n1);
    } else if (j->wfmt == W_INT4) {
        if (j->isa == ISA_VNNI) bitlab_decode_i4_vnni(j, n0, n1);
        else bitlab_decode_i4_avx2(j, n0, n1);
    } else if (j->isa == ISA_AVX2 && !j->has_m128) {
        bitlab_decode_i8_avx2(j, n0, n1);
    } else if (j->isa == ISA_VNNI) {
        if (bitlab_decode_i8_vnni(j, n0, n1) != 0) mark_failed(j);
    } else {
        return 0;
    }
    return 1;
}
#endif

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
        if (bitlab_panel_cols(j, n0, n1) != 0) mark_failed(j);
    } else {
        split(j->N, j->nr, tid, nt, &n0, &n1);
#ifdef BITLAB_X86
        if (decode_x86(j, n0, n1)) return;
#endif
#ifdef BITLAB_ARM
        if (j->M == 1 && bitlab_decode_arm(j, n0, n1)) return;
#endif
        if (bitlab_gemm_cols(j, n0, n1) != 0) mark_failed(j);
    }
}

/* Smallest M that takes the batched path (<= 0: the built-in choice); tests move it. */
static int g_panel_min_m = 0;

int bitlab_set_panel_min_m(int m) {
    g_panel_min_m = m;
    return m;
}

/* whether M == 1 with per-group scales runs a decode loop (decode.c, decode_neon.c) */
static int decodes_groups(const job_t *j) {
#ifdef BITLAB_X86
    return bitlab_group_decoder(j) != NULL;
#elif defined(BITLAB_ARM) /* (unless the batched GEMM is forced for this M: use_panel) */
    return j->ws_kind == 2 && bitlab_decode_arm_takes(j) && !(g_panel_min_m > 0 && j->M >= g_panel_min_m);
#else
    (void)j;
    return 0;
#endif
}

static int use_panel(job_t *j) {
#ifdef BITLAB_X86
    int min_m = g_panel_min_m > 0 ? g_panel_min_m : (j->isa == ISA_VNNI ? 12 : 64);
    if (j->wfmt == W_INT4) /* int4 runs a decode loop (M == 1: one scale group, or groups it takes) or the GEMM */
        min_m = j->M == 1 && (j->ws_kind != 2 || decodes_groups(j)) ? 2 : 1;
    if (j->isa < ISA_AVX2 || j->M < min_m) return 0;
    if (j->wfmt == W_INT8 && (j->isa != ISA_VNNI || j->gs % 4)) return 0; /* maddubs would saturate */
    if (j->isa == ISA_VNNI && j->M <= 16) { j->pnc = 24; j->pmt = 16; }
    else if (j->isa == ISA_VNNI) { j->pnc = PANEL_V512_NC; j->pmt = PANEL_V512_MT; }
    else { j->pnc = PANEL_AVX2_NC; j->pmt = PANEL_AVX2_MT; }
    return 1;
#elif defined(BITLAB_ARM)
    /* M == 1 takes the decode loops (decode_neon.c) with one scale group or groups of their units; everything else
     * the batched GEMM (int8 groups must cover whole 4-k steps, else the scalar tiles; smmla's whole 8-k steps,
     * else sdot) */
    int decode = j->M == 1 && (j->ws_kind != 2 || decodes_groups(j));
    if (j->isa < ISA_NEON || (g_panel_min_m > 0 ? j->M < g_panel_min_m : decode)) return 0;
    if (j->wfmt == W_INT8 && j->gs % 4) return 0;
    j->pmt = PANEL_ARM_MT;
    if (j->isa == ISA_I8MM && (j->wfmt != W_INT8 || j->gs % 8 == 0)) {
        j->pnc = PANEL_MMLA_NC;
        j->xt_k = 8;
    } else {
        j->pnc = j->isa >= ISA_DOTPROD ? PANEL_DOT_NC : PANEL_NEON_NC;
    }
    return 1;
#else
    (void)j;
    return 0;
#endif
}

/* int4 rows ((K + 1) / 2 bytes: code k in the low nibble of byte k / 2 when k is even, the high one when odd; two's
 * complement, as weight_at reads them) -> int8 [N, K], the fallback where the int4 loops do not apply. It runs on
 * every such call: two codes a byte with no index arithmetic (weight_at's per-code division and shifts were the
 * cost), rows split over the threads. */
static void unpack_i4(const uint8_t *src, int64_t N, int64_t K, int8_t *dst, int nthreads) {
    const int64_t row_bytes = (K + 1) / 2, pairs = K / 2;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= (1 << 16))
#endif
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = src + n * row_bytes;
        int8_t *out = dst + n * K;
        for (int64_t i = 0; i < pairs; i++) {
            out[2 * i] = (int8_t)(((row[i] & 15) ^ 8) - 8);
            out[2 * i + 1] = (int8_t)(((row[i] >> 4) ^ 8) - 8);
        }
        if (K & 1) out[K - 1] = (int8_t)(((row[pairs] & 15) ^ 8) - 8);
    }
    (void)nthreads;
}

static int run_job(job_t *j, int nthreads) {
    j->isa = bitlab_isa();
    if (j->wfmt == W_INT4 && (j->isa < ISA_AVX2 || (j->ws_kind == 2 && j->gs % 64 && !decodes_groups(j)))) {
        int8_t *w8 = (int8_t *)malloc((size_t)(j->N * j->K) + 1);
        if (!w8) return -1;
        unpack_i4((const uint8_t *)j->w, j->N, j->K, w8, nthreads);
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
            memset(j->xt + (tiles - 1) * j->pmt * j->Kp, XT_OFFSET, (size_t)(j->pmt * j->Kp));
    }
    j->s = (float *)malloc(sizeof(float) * (size_t)j->M);
    j->amax = (float *)malloc(sizeof(float) * (size_t)j->M);
    j->gsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(j->M * j->G));
    if (!j->xq || !j->s || !j->amax || !j->gsum) {
        free(j->xq); free(j->xt); free(j->s); free(j->amax); free(j->gsum);
        return -1;
    }
    j->has_m128 = 0;
    /* below ~200k multiply-adds a second thread costs more than it saves (576x576 at M = 1: 8.7 -> 7.6 us on 2
       threads, 1536x576: 17.5 -> 12.0 us; 192x576: no gain) */
    double work = (double)j->M * (double)j->N * (double)j->K;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (work < 2e5) nt = 1;
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

/* The biases of a job: a float bias added after the rescale, stored integer codes bias_q, or (bias_bits > 0)
 * the float bias quantized per token on each token's step and added to the integer sums (int_bias_at). */
static void set_biases(job_t *j, const float *bias, const int32_t *bias_q, int bias_bits) {
    j->bias_q = bias_q;
    if (bias_bits > 0 && bias) {
        j->bias_tok = bias;
        j->bias_bits = bias_bits;
    } else {
        j->bias = bias;
    }
}

/* y[M,N] = linear(x[M,K]) with activation quantization, plus integer bias codes bias_q[N] (or NULL) added to
 * the exact int32 sums before the rescale, or with bias_bits > 0 the float bias quantized per token and added
 * there; returns 0 on success. */
int bitlab_linear_b(const float *x, int64_t M, int64_t K, const void *w, int wfmt, int64_t N, const float *ws,
                    int ws_kind, int64_t G, const float *bias, const int32_t *bias_q, int bias_bits, int act,
                    float static_s, float *out, int nthreads) {
    job_t j;
    memset(&j, 0, sizeof j);
    j.x = x; j.M = M; j.K = K; j.N = N; j.wfmt = wfmt; j.w = w; j.ws = ws; j.ws_kind = ws_kind;
    j.G = G; j.gs = G > 0 ? K / G : K; j.act = act; j.static_s = static_s;
    j.out = out;
    set_biases(&j, bias, bias_q, bias_bits);
    return run_job(&j, nthreads);
}

/* bitlab_linear_b without integer biases (the C++ dispatcher kernels and older callers call this one) */
int bitlab_linear(const float *x, int64_t M, int64_t K, const void *w, int wfmt, int64_t N, const float *ws,
                  int ws_kind, int64_t G, const float *bias, int act, float static_s, float *out, int nthreads) {
    return bitlab_linear_b(x, M, K, w, wfmt, N, ws, ws_kind, G, bias, NULL, 0, act, static_s, out, nthreads);
}

/* Same with pre-quantized activations xq[M,K] and their multipliers s[M] (conv via im2col; activation codes of
 * fewer than 8 bits). */
int bitlab_linear_q(const int8_t *xq, const float *s, int64_t M, int64_t K, const void *w, int wfmt, int64_t N,
                    const float *ws, int ws_kind, int64_t G, const float *bias, const int32_t *bias_q, int bias_bits,
                    float *out, int nthreads) {
    job_t j;
    memset(&j, 0, sizeof j);
    j.xq_in = xq; j.s_in = s; j.M = M; j.K = K; j.N = N; j.wfmt = wfmt; j.w = w; j.ws = ws; j.ws_kind = ws_kind;
    j.G = G; j.gs = G > 0 ? K / G : K; j.act = ACT_GIVEN; j.out = out;
    set_biases(&j, bias, bias_q, bias_bits);
    return run_job(&j, nthreads);
}
