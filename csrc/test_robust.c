/* Robustness tests of the kernels, without Python:
 *
 * - 64-bit index arithmetic: every chunk kernel is run on a small window of
 *   elements placed beyond 2^32 (and group indices beyond 2^31, packed word
 *   offsets beyond 2^31) of a virtual array, and compared with the same
 *   computation on the window at offset 0. Any index held in 32 bits would
 *   read or write the wrong element (or fault).
 * - the validation functions shared by the binding and the fuzz target.
 * - NaN inputs to the quantizer never reach a float-to-int conversion.
 *
 * Far arrays are anonymous MAP_NORESERVE mappings: only the touched pages
 * take memory. Where such a mapping is refused (strict overcommit), the
 * window is a heap buffer and the array base a pointer offset below it that
 * is never dereferenced outside the window.
 *
 * Prints "N passed, N failed" and exits non-zero on any failure. */
#define _DEFAULT_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "diffq_c.h"

#define TEST_SEED 777
#include "test_common.h"

#define TWO_31 ((int64_t)1 << 31)
#define TWO_32 ((int64_t)1 << 32)
#define TWO_33 ((int64_t)1 << 33)

/* ------------------------------------------------------------ far arrays */

typedef struct {
    void *map;
    size_t map_len;
    void *heap;
    char *base; /* element 0 of the virtual array */
} far_array;

static int far_mode_reported;

/* Elements [first, first + count) of a virtual array of `elem`-byte
 * elements are valid (zeroed) memory at fa->base + first * elem. */
static char *far_alloc(far_array *fa, size_t elem, int64_t first, int64_t count) {
    memset(fa, 0, sizeof *fa);
    size_t len = (size_t)(first + count) * elem;
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m != MAP_FAILED) {
        fa->map = m;
        fa->map_len = len;
        fa->base = m;
    } else {
        fa->heap = xmalloc((size_t)count * elem);
        fa->base = (char *)fa->heap - (size_t)first * elem;
    }
    if (!far_mode_reported) {
        far_mode_reported = 1;
        printf("far arrays: %s\n", fa->map ? "sparse mappings" : "pointer offsets (mmap refused)");
    }
    return fa->base;
}

static void far_free(far_array *fa) {
    if (fa->map)
        munmap(fa->map, fa->map_len);
    free(fa->heap);
}

/* ----------------------------------------------------------------- noise */

/* Uniform noise of element i straight from the definition: word
 * (i / 16) % 4 of the hash of counter (i / 64) * 16 + i % 16, its top 24
 * bits as a fraction. */
static float uniform_noise_at(uint64_t seed, int64_t i) {
    uint32_t r[4];
    dq_noise_hash4(seed, (uint64_t)i / 64 * 16 + (uint64_t)i % 16, r);
    return (float)(r[(i / 16) % 4] >> 8) * 0x1p-24f - 0.5f;
}

static void test_noise_fill_far(void) {
    const uint64_t seed = 0xfeedface12345ull;
    const int64_t starts[] = {TWO_32 - 3, TWO_32 + 1, TWO_33 + 2, ((int64_t)1 << 40) + 3,
                              ((int64_t)1 << 62) + 1};
    for (size_t s = 0; s < sizeof starts / sizeof starts[0]; ++s) {
        enum { COUNT = 600 };
        float a[COUNT], b[COUNT];
        dq_noise_fill_ref(DQ_NOISE_UNIFORM, seed, starts[s], COUNT, a);
        dq_noise_fill_fast(DQ_NOISE_UNIFORM, seed, starts[s], COUNT, b);
        int ok = 1;
        for (int j = 0; j < COUNT && ok; ++j)
            ok = a[j] == b[j] && a[j] == uniform_noise_at(seed, starts[s] + j);
        CHECK(ok, "uniform noise at start %lld", (long long)starts[s]);
    }
}

static void test_noise_forward_far(void) {
    const uint64_t seed = 99;
    /* (start, group_size): group indices beyond 2^31, and groups larger
     * than 2^31 elements with the window across a group border */
    const int64_t big_group = 3 * ((int64_t)1 << 30);
    const int64_t cases[][2] = {{TWO_32 + TWO_31 + 6, 2}, {TWO_33 + 4, 4}, {TWO_33 + 1, 1},
                                {2 * big_group - 1000, big_group}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        const int64_t start = cases[c][0], gs = cases[c][1], count = 3000;
        const int64_t g_first = start / gs, g_last = (start + count - 1) / gs;
        far_array fp, fn, fs, fl;
        float *p = (float *)far_alloc(&fp, sizeof(float), start, count);
        float *noisy = (float *)far_alloc(&fn, sizeof(float), start, count);
        float *ss = (float *)far_alloc(&fs, sizeof(float), g_first, g_last - g_first + 1);
        float *lg = (float *)far_alloc(&fl, sizeof(float), g_first, g_last - g_first + 1);
        for (int64_t i = start; i < start + count; ++i)
            p[i] = frand();
        p[start + 5] = -1.0f; /* the minimum, twice */
        p[start + 17] = -1.0f;
        p[start + 2999] = 1.0f; /* the maximum */
        const dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0.0f, 0.0f};
        for (int64_t g = g_first; g <= g_last; ++g) {
            lg[g] = 0.5f * (float)(g % 5) - 1.0f;
            dq_logit_to_step_fast(&prm, lg + g, 0, 1, ss + g, NULL);
            ss[g] = 2.0f * ss[g]; /* the range: max - min */
        }
        int64_t nmin, nmax, rmin, rmax;
        dq_noise_forward_fused(&prm, p, lg, 2.0f, gs, DQ_NOISE_UNIFORM, seed, start, count, noisy,
                               -1.0f, 1.0f, &nmin, &nmax, NULL);
        int ok = 1;
        for (int64_t i = start; i < start + count && ok; ++i)
            ok = noisy[i] == p[i] + ss[i / gs] * uniform_noise_at(seed, i);
        CHECK(ok && nmin == 2 && nmax == 1, "noise forward fast start %lld gs %lld", (long long)start,
              (long long)gs);
        for (int64_t i = start; i < start + count; ++i)
            noisy[i] = 0;
        dq_noise_forward_ref(p, ss, gs, DQ_NOISE_UNIFORM, seed, start, count, noisy, -1.0f, 1.0f,
                             &rmin, &rmax);
        ok = 1;
        for (int64_t i = start; i < start + count && ok; ++i)
            ok = noisy[i] == p[i] + ss[i / gs] * uniform_noise_at(seed, i);
        CHECK(ok && rmin == 2 && rmax == 1, "noise forward ref start %lld", (long long)start);

        /* grad dot: a chunk starts on a group border or lies inside one group */
        int64_t dstart = start, dcount = 500;
        if (gs <= 4) {
            dstart = (start + gs - 1) / gs * gs;
            dcount = (start + count - dstart) / gs * gs;
        }
        int64_t ng = (dstart + dcount - 1) / gs - dstart / gs + 1;
        double *fast = xmalloc((size_t)ng * sizeof(double)), *ref = xmalloc((size_t)ng * sizeof(double)),
               *want = xmalloc((size_t)ng * sizeof(double));
        dq_noise_grad_dot_fast(p, gs, DQ_NOISE_UNIFORM, seed, dstart, dcount, fast);
        dq_noise_grad_dot_ref(p, gs, DQ_NOISE_UNIFORM, seed, dstart, dcount, ref);
        for (int64_t i = dstart; i < dstart + dcount; ++i)
            want[i / gs - dstart / gs] += (double)p[i] * (double)uniform_noise_at(seed, i);
        ok = 1;
        for (int64_t g = 0; g < ng && ok; ++g)
            ok = ref[g] == want[g] && fabs(fast[g] - want[g]) <= 1e-12 * (1 + fabs(want[g]));
        CHECK(ok, "grad dot start %lld gs %lld", (long long)dstart, (long long)gs);
        free(fast);
        free(ref);
        free(want);
        far_free(&fp);
        far_free(&fn);
        far_free(&fs);
        far_free(&fl);
    }
}

/* -------------------------------------------------------------- quantize */

static void test_range_far(void) {
    const int64_t start = TWO_33 + 3, count = 5000;
    far_array fx;
    float *x = (float *)far_alloc(&fx, sizeof(float), start, count);
    float *local = xmalloc((size_t)count * sizeof(float));
    for (int64_t j = 0; j < count; ++j)
        local[j] = x[start + j] = frand();
    x[start + 100] = local[100] = NAN;
    x[start + 4999] = local[4999] = INFINITY;
    dq_range far_fast, far_ref, want;
    dq_range_fast(x, start, count, &far_fast);
    dq_range_ref(x, start, count, &far_ref);
    dq_range_ref(local, 0, count, &want);
    CHECK(far_fast.min == want.min && far_fast.max == want.max && far_fast.nonfinite == 2 &&
              far_ref.min == want.min && far_ref.max == want.max && far_ref.nonfinite == 2,
          "range at 2^33");
    free(local);
    far_free(&fx);
}

static void test_quantize_far(void) {
    /* group_size 2 at element 2^33 + 2^31: group indices near 5 * 2^30 */
    const int64_t gs = 2, start = TWO_33 + TWO_31, count = 4096;
    const int64_t g0 = start / gs, ng = count / gs;
    far_array fp, fb, fl, fo;
    float *p = (float *)far_alloc(&fp, sizeof(float), start, count);
    uint8_t *bits = (uint8_t *)far_alloc(&fb, 1, g0, ng);
    int16_t *levels = (int16_t *)far_alloc(&fl, sizeof(int16_t), start, count);
    float *out = (float *)far_alloc(&fo, sizeof(float), start, count);
    float *lp = xmalloc((size_t)count * sizeof(float)), *lout = xmalloc((size_t)count * sizeof(float));
    uint8_t *lbits = xmalloc((size_t)ng);
    int16_t *llev = xmalloc((size_t)count * sizeof(int16_t));
    for (int64_t j = 0; j < count; ++j)
        lp[j] = p[start + j] = frand();
    for (int64_t g = 0; g < ng; ++g)
        lbits[g] = bits[g0 + g] = (uint8_t)(1 + lcg() % 15);
    const float mn = -1.0f, range = 2.0f;
    dq_quantize_ref(lp, gs, lbits, mn, range, 0, count, llev, 2);
    dq_dequantize_ref(llev, 2, gs, lbits, mn, range, 0, count, lout);
    for (int pass = 0; pass < 2; ++pass) {
        if (pass == 0)
            dq_quantize_fast(p, gs, bits, mn, range, start, count, levels, 2);
        else
            dq_quantize_ref(p, gs, bits, mn, range, start, count, levels, 2);
        int ok = memcmp(levels + start, llev, (size_t)count * sizeof(int16_t)) == 0;
        CHECK(ok, "quantize %s at 2^33 + 2^31", pass ? "ref" : "fast");
        if (pass == 0)
            dq_dequantize_fast(levels, 2, gs, bits, mn, range, start, count, out);
        else
            dq_dequantize_ref(levels, 2, gs, bits, mn, range, start, count, out);
        CHECK(memcmp(out + start, lout, (size_t)count * sizeof(float)) == 0,
              "dequantize %s at 2^33 + 2^31", pass ? "ref" : "fast");
    }
    /* uint8 levels beyond 2^32 bytes */
    far_array fu;
    uint8_t *u8 = (uint8_t *)far_alloc(&fu, 1, start, count);
    for (int64_t g = 0; g < ng; ++g)
        lbits[g] = bits[g0 + g] = (uint8_t)(1 + g % 8);
    dq_quantize_ref(lp, gs, lbits, mn, range, 0, count, llev, 2);
    dq_quantize_fast(p, gs, bits, mn, range, start, count, u8, 1);
    int ok = 1;
    for (int64_t j = 0; j < count && ok; ++j)
        ok = u8[start + j] == llev[j];
    CHECK(ok, "uint8 quantize at 2^33 + 2^31");
    free(lp);
    free(lout);
    free(lbits);
    free(llev);
    far_free(&fu);
    far_free(&fp);
    far_free(&fb);
    far_free(&fl);
    far_free(&fo);
}

/* --------------------------------------------------------------- bitpack */

static void test_bitpack_far(void) {
    /* line 2^22 + 1 starts at element 2^33 + 2048; with 16 bit planes its
     * words start at (2^22 + 1) * 512 > 2^31 */
    const int64_t line0 = ((int64_t)1 << 22) + 1, nlines = 3;
    const int nbits_list[] = {16, 5};
    for (int t = 0; t < 2; ++t) {
        const int nbits = nbits_list[t];
        const int64_t first = line0 * DQ_PACK_LINE;
        const int64_t n = first + nlines * DQ_PACK_LINE - 77; /* last line padded */
        const int64_t have = n - first;
        const int64_t wpl = (int64_t)nbits * DQ_PACK_BLOCK; /* words per line */
        far_array fx, fw, fy;
        int16_t *x = (int16_t *)far_alloc(&fx, sizeof(int16_t), first, have);
        uint64_t *w = (uint64_t *)far_alloc(&fw, sizeof(uint64_t), line0 * wpl, nlines * wpl);
        int16_t *y = (int16_t *)far_alloc(&fy, sizeof(int16_t), first, have);
        int16_t *lx = xmalloc((size_t)have * sizeof(int16_t)), *ly = xmalloc((size_t)have * sizeof(int16_t));
        uint64_t *lw = xmalloc((size_t)(nlines * wpl) * sizeof(uint64_t));
        for (int64_t j = 0; j < have; ++j)
            lx[j] = x[first + j] = (int16_t)(lcg() & ((1u << nbits) - 1));
        dq_pack_bits_ref(lx, have, nbits, 0, nlines, lw);
        for (int pass = 0; pass < 2; ++pass) {
            memset(w + line0 * wpl, 0xAB, (size_t)(nlines * wpl) * sizeof(uint64_t));
            if (pass == 0)
                dq_pack_bits_fast(x, n, nbits, line0, nlines, w);
            else
                dq_pack_bits_ref(x, n, nbits, line0, nlines, w);
            CHECK(memcmp(w + line0 * wpl, lw, (size_t)(nlines * wpl) * sizeof(uint64_t)) == 0,
                  "pack %s nbits %d at line 2^22 + 1", pass ? "ref" : "fast", nbits);
            memset(y + first, 0, (size_t)have * sizeof(int16_t));
            if (pass == 0)
                dq_unpack_bits_fast(w, line0 + nlines, nbits, line0, nlines, n, y);
            else
                dq_unpack_bits_ref(w, line0 + nlines, nbits, line0, nlines, n, y);
            CHECK(memcmp(y + first, lx, (size_t)have * sizeof(int16_t)) == 0,
                  "unpack %s nbits %d at line 2^22 + 1", pass ? "ref" : "fast", nbits);
        }
        (void)ly;
        free(lx);
        free(ly);
        free(lw);
        far_free(&fx);
        far_free(&fw);
        far_free(&fy);
    }
}

/* With 0 bit planes a packed buffer of no words may claim any number of
 * lines; unpacking walks only the lines that hold the values asked for
 * (before, 2^50 claimed lines took days). */
static void test_unpack_huge_line_claim(void) {
    uint64_t no_words = 0;
    int16_t out[5] = {9, 9, 9, 9, 9};
    const int64_t lines = (int64_t)1 << 50;
    CHECK(dq_validate_packed(lines, 0, 32, 0, 5) == DQ_OK, "zero-plane claim is valid");
    dq_unpack_bits(&no_words, lines, 0, 5, out, 2);
    int zero = 1;
    for (int i = 0; i < 5; ++i)
        zero &= out[i] == 0;
    CHECK(zero, "zero planes unpack to zeros");
}

/* ------------------------------------------------------------------ size */

static void test_size_far(void) {
    const int64_t start = TWO_33 + 5, count = 3000;
    dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0};
    far_array fl, fg;
    float *logit = (float *)far_alloc(&fl, sizeof(float), start, count);
    float *grad = (float *)far_alloc(&fg, sizeof(float), start, count);
    float *ll = xmalloc((size_t)count * sizeof(float)), *lg = xmalloc((size_t)count * sizeof(float));
    for (int64_t j = 0; j < count; ++j)
        ll[j] = logit[start + j] = frand() * 4;
    dq_size_stats far, want;
    dq_size_forward_ref(&prm, logit, start, count, &far);
    dq_size_forward_ref(&prm, ll, 0, count, &want);
    CHECK(far.sum_bits == want.sum_bits && far.max_bits == want.max_bits, "size forward at 2^33");
    dq_size_backward_ref(&prm, logit, start, count, 0.5f, grad);
    dq_size_backward_ref(&prm, ll, 0, count, 0.5f, lg);
    CHECK(memcmp(grad + start, lg, (size_t)count * sizeof(float)) == 0, "size backward at 2^33");
    free(ll);
    free(lg);
    far_free(&fl);
    far_free(&fg);
}

/* ------------------------------------------------------------ validation */

static void test_validate_packed(void) {
    CHECK(dq_validate_packed(2, 3, 32, 2 * 3 * 32, 4096) == DQ_OK, "valid packed");
    CHECK(dq_validate_packed(2, 3, 32, 2 * 3 * 32, 4000) == DQ_OK, "valid packed, padded");
    CHECK(dq_validate_packed(0, 0, 32, 0, 0) == DQ_OK, "empty packed");
    CHECK(dq_validate_packed(2, 3, 32, 2 * 3 * 32, 4097) == DQ_ERR_PACK_SHORT, "too short");
    CHECK(dq_validate_packed(2, 3, 31, 2 * 3 * 31, 10) == DQ_ERR_PACK_SHAPE, "block 31");
    CHECK(dq_validate_packed(2, 3, 32, 2 * 3 * 32 - 1, 10) == DQ_ERR_PACK_SHAPE, "words short");
    CHECK(dq_validate_packed(2, 17, 32, 2 * 17 * 32, 10) == DQ_ERR_NBITS, "17 planes");
    CHECK(dq_validate_packed(2, -1, 32, 0, 10) == DQ_ERR_NBITS, "negative planes");
    CHECK(dq_validate_packed(-1, 3, 32, 0, 0) == DQ_ERR_SIZE, "negative lines");
    CHECK(dq_validate_packed(1, 3, 32, 96, -1) == DQ_ERR_SIZE, "negative n");
    /* lines * nbits * 32 and lines * 2048 past INT64_MAX */
    CHECK(dq_validate_packed((int64_t)1 << 58, 16, 32, 0, 1) == DQ_ERR_OVERFLOW, "words overflow");
    CHECK(dq_validate_packed((int64_t)1 << 54, 0, 32, 0, 1) == DQ_ERR_OVERFLOW, "capacity overflow");
    int64_t out = 7;
    CHECK(!dq_mul_size(INT64_MAX / 2 + 1, 2, &out) && out == 7, "mul overflow");
    CHECK(dq_mul_size(INT64_MAX / 2, 2, &out) && out == INT64_MAX - 1, "mul at the edge");
    CHECK(dq_mul_size(0, INT64_MAX, &out) && out == 0, "mul by zero");
    CHECK(!dq_mul_size(-1, 2, &out), "mul negative");
}

static void test_validate_levels(void) {
    uint8_t bits[3] = {4, 8, 2};
    int16_t lv[6] = {15, 0, 255, 3, 3, 0};
    uint8_t u8[6] = {15, 0, 255, 3, 3, 0};
    int64_t where = 0;
    CHECK(dq_validate_levels(lv, 2, 6, 2, bits, 3, &where) == DQ_OK && where == -1, "valid levels");
    CHECK(dq_validate_levels(u8, 1, 6, 2, bits, 3, &where) == DQ_OK, "valid uint8 levels");
    CHECK(dq_validate_levels(NULL, 2, 6, 2, bits, 3, &where) == DQ_OK, "valid without levels");
    lv[4] = 4; /* bits 2 */
    CHECK(dq_validate_levels(lv, 2, 6, 2, bits, 3, &where) == DQ_ERR_LEVEL && where == 4,
          "level 4 in 2 bits at %lld", (long long)where);
    lv[4] = 3;
    lv[1] = -1;
    CHECK(dq_validate_levels(lv, 2, 6, 2, bits, 3, &where) == DQ_ERR_LEVEL && where == 1,
          "negative level");
    lv[1] = 0;
    bits[1] = 0;
    CHECK(dq_validate_levels(lv, 2, 6, 2, bits, 3, &where) == DQ_ERR_BITS && where == 1, "0 bits");
    bits[1] = 16;
    CHECK(dq_validate_levels(lv, 2, 6, 2, bits, 3, &where) == DQ_ERR_BITS && where == 1, "16 bits");
    bits[1] = 9;
    CHECK(dq_validate_levels(u8, 1, 6, 2, bits, 3, &where) == DQ_ERR_LEVEL_BYTES && where == 1,
          "uint8 levels with 9 bits");
    CHECK(dq_validate_levels(lv, 2, 6, 2, bits, 3, &where) == DQ_OK, "int16 levels with 9 bits");
    CHECK(dq_validate_levels(lv, 4, 6, 2, bits, 3, &where) == DQ_ERR_LEVEL_BYTES, "4-byte levels");
    CHECK(dq_validate_levels(lv, 2, 6, 4, bits, 3, &where) == DQ_ERR_GROUPS, "groups mismatch");
    CHECK(dq_validate_levels(lv, 2, 6, 0, bits, 3, &where) == DQ_ERR_GROUPS, "one group, 3 bits");
    uint8_t one_group = 8;
    CHECK(dq_validate_levels(lv, 2, 6, 0, &one_group, 1, &where) == DQ_OK, "one group");
    CHECK(dq_validate_levels(lv, 2, 6, INT64_MAX / 2, bits, 3, &where) == DQ_ERR_OVERFLOW,
          "groups overflow");
    CHECK(dq_validate_levels(lv, 2, -6, 2, bits, 3, &where) == DQ_ERR_SIZE, "negative n");
    /* the widths are tested a block at a time: offenders at the edges of
     * blocks and in the last, partial block are found, the first one wins */
    enum { NG = 3 * 4096 + 5 };
    uint8_t *many = malloc(NG);
    CHECK(many != NULL, "alloc");
    if (many) {
        const int64_t at[] = {0, 4095, 4096, 8191, 2 * 4096 + 17, NG - 1};
        const uint8_t bad[] = {0, 16, 255};
        for (size_t a = 0; a < sizeof at / sizeof at[0]; ++a) {
            for (size_t b = 0; b < sizeof bad / sizeof bad[0]; ++b) {
                memset(many, 8, NG);
                many[at[a]] = bad[b];
                if (at[a] + 1 < NG)
                    many[NG - 1] = 0; /* a later offender does not hide the first */
                CHECK(dq_validate_levels(NULL, 2, NG, 1, many, NG, &where) == DQ_ERR_BITS &&
                          where == at[a],
                      "width %d at %lld: found at %lld", bad[b], (long long)at[a], (long long)where);
            }
            memset(many, 8, NG);
            many[at[a]] = 9;
            CHECK(dq_validate_levels(NULL, 1, NG, 1, many, NG, &where) == DQ_ERR_LEVEL_BYTES &&
                      where == at[a],
                  "9 bits in uint8 levels at %lld", (long long)at[a]);
            CHECK(dq_validate_levels(NULL, 2, NG, 1, many, NG, &where) == DQ_OK, "9 bits in int16");
        }
        for (int w = 1; w <= 15; ++w)
            many[w * 97] = (uint8_t)w;
        CHECK(dq_validate_levels(NULL, 2, NG, 1, many, NG, &where) == DQ_OK && where == -1,
              "every width 1..15 is valid");
        free(many);
    }
    /* every code has its own message */
    const int codes[] = {DQ_OK, DQ_ERR_NONFINITE, DQ_ERR_NOMEM, DQ_ERR_NBITS, DQ_ERR_PACK_SHAPE,
                         DQ_ERR_PACK_SHORT, DQ_ERR_OVERFLOW, DQ_ERR_GROUPS, DQ_ERR_BITS,
                         DQ_ERR_LEVEL, DQ_ERR_LEVEL_BYTES, DQ_ERR_SIZE};
    int distinct = 1;
    for (size_t a = 0; a < sizeof codes / sizeof codes[0]; ++a)
        for (size_t b = a + 1; b < sizeof codes / sizeof codes[0]; ++b)
            distinct &= strcmp(dq_error_message(codes[a]), dq_error_message(codes[b])) != 0;
    CHECK(distinct && strcmp(dq_error_message(12345), "unknown error") == 0, "error messages");
}

/* NaN weights or a NaN range quantize to level 0 instead of converting NaN
 * to an integer (undefined behaviour, caught by -fsanitize=float-cast-overflow). */
static void test_quantize_nan(void) {
    float p[9] = {0, NAN, 1, 0.5f, NAN, 0.25f, 1, 0, NAN};
    uint8_t b8 = 8;
    int16_t l1[9], l2[9];
    dq_quantize_ref(p, 9, &b8, 0.0f, 1.0f, 0, 9, l1, 2);
    dq_quantize_fast(p, 9, &b8, 0.0f, 1.0f, 0, 9, l2, 2);
    CHECK(l1[1] == 0 && l1[4] == 0 && l1[8] == 0 && l1[2] == 255 && l1[7] == 0 &&
              memcmp(l1, l2, sizeof l1) == 0,
          "NaN weights");
    dq_quantize_fast(p, 9, &b8, 0.0f, NAN, 0, 9, l2, 2);
    int zero = 1;
    for (int i = 0; i < 9; ++i)
        zero &= l2[i] == 0;
    CHECK(zero, "NaN range");
}

int main(void) {
    test_noise_fill_far();
    test_noise_forward_far();
    test_range_far();
    test_quantize_far();
    test_bitpack_far();
    test_unpack_huge_line_claim();
    test_size_far();
    test_validate_packed();
    test_validate_levels();
    test_quantize_nan();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
