/* The ARM64 test driver (tests/ops/test_cpu_arm.py): compiled after the kernel's amalgamated source (one
 * translation unit, so it sees BITLAB_ABI and the ISA names), cross-compiled for aarch64 and run under
 * qemu-aarch64. It reads cases that bitlab_fx/ops/reference.py computed (inputs and expected outputs, written by
 * the test), runs each through bitlab_linear_b on every ISA named on the command line, with the built-in path
 * choice and with the batched GEMM forced for every M, and compares the outputs bit for bit.
 *
 * usage: driver CASES_FILE ISA... (ISA numbers as in bitlab_cpu.h). Prints "best_isa N", one "isa R got G" line
 * per requested ISA (G: what bitlab_set_isa selected), "FAIL ..." per mismatch, and "checked N" at the end;
 * exits 1 on any mismatch, 2 on a bad file. */
#include <stdio.h>

typedef struct {
    int32_t wfmt, ws_kind, act, has_bias, has_bias_q, bias_bits, nthreads;
    int64_t M, K, N, G, wbytes, nws;
    float static_s;
    float *x, *ws, *bias, *expected, *out;
    uint8_t *w;
    int32_t *bias_q;
    char name[64];
} arm_case;

static int read_all(FILE *f, void *dst, size_t bytes) { return bytes == 0 || fread(dst, 1, bytes, f) == bytes; }

static void *read_array(FILE *f, size_t bytes, int *ok) {
    void *p = malloc(bytes + 16);
    if (!p || !read_all(f, p, bytes)) *ok = 0;
    return p;
}

static int read_case(FILE *f, arm_case *c) {
    int ok = 1;
    memset(c, 0, sizeof *c);
    ok &= read_all(f, &c->wfmt, 7 * sizeof(int32_t));
    ok &= read_all(f, &c->M, 6 * sizeof(int64_t));
    ok &= read_all(f, &c->static_s, sizeof(float));
    ok &= read_all(f, c->name, sizeof c->name);
    if (!ok) return 0;
    c->x = (float *)read_array(f, sizeof(float) * (size_t)(c->M * c->K), &ok);
    c->w = (uint8_t *)read_array(f, (size_t)c->wbytes, &ok);
    c->ws = (float *)read_array(f, sizeof(float) * (size_t)c->nws, &ok);
    if (c->has_bias) c->bias = (float *)read_array(f, sizeof(float) * (size_t)c->N, &ok);
    if (c->has_bias_q) c->bias_q = (int32_t *)read_array(f, sizeof(int32_t) * (size_t)c->N, &ok);
    c->expected = (float *)read_array(f, sizeof(float) * (size_t)(c->M * c->N), &ok);
    c->out = (float *)malloc(sizeof(float) * (size_t)(c->M * c->N) + 16);
    return ok && c->out;
}

static int run_case(const arm_case *c) {
    return bitlab_linear_b(c->x, c->M, c->K, c->w, c->wfmt, c->N, c->ws, c->ws_kind, c->G, c->bias, c->bias_q,
                           c->bias_bits, c->act, c->static_s, c->out, c->nthreads);
}

/* 1 when the outputs equal the expected ones bit for bit; else prints the first difference */
static int check(const arm_case *c, int isa, int batched) {
    for (int64_t dst = 0; dst < c->M * c->N; dst++) {
        uint32_t got, want;
        memcpy(&got, c->out + dst, 4);
        memcpy(&want, c->expected + dst, 4);
        if (got != want) {
            printf("FAIL %s isa %d batched %d: y[%lld, %lld] = %.9g, expected %.9g\n", c->name, isa, batched,
                   (long long)(dst / c->N), (long long)(dst % c->N), c->out[dst], c->expected[dst]);
            return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s CASES_FILE ISA...\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    int32_t count = 0;
    if (!f || !read_all(f, &count, sizeof count) || count <= 0) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    arm_case *cases = (arm_case *)calloc((size_t)count, sizeof(arm_case));
    for (int32_t i = 0; i < count; i++)
        if (!read_case(f, &cases[i])) {
            fprintf(stderr, "case %d of %s unreadable\n", i, argv[1]);
            return 2;
        }
    fclose(f);
    printf("best_isa %d\n", bitlab_best_isa());
    int failed = 0, checked = 0;
    for (int a = 2; a < argc; a++) {
        int isa = atoi(argv[a]), got = bitlab_set_isa(isa);
        printf("isa %d got %d\n", isa, got);
        if (got != isa) continue;
        for (int batched = 0; batched < 2; batched++) {
            bitlab_set_panel_min_m(batched); /* 0: the built-in choice; 1: the batched GEMM for every M */
            for (int32_t i = 0; i < count; i++) {
                if (run_case(&cases[i]) != 0) {
                    printf("FAIL %s isa %d batched %d: the kernel returned an error\n", cases[i].name, isa, batched);
                    failed++;
                    continue;
                }
                failed += !check(&cases[i], isa, batched);
                checked++;
            }
        }
    }
    printf("checked %d failed %d\n", checked, failed);
    return failed ? 1 : 0;
}
