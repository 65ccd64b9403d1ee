/* C-level tests of the kernels, without Python: fast versions against their
 * scalar references on odd sizes, known-answer vectors, thread invariance.
 * Prints "N passed, N failed" and exits non-zero on any failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diffq_c.h"
#include "noise_gen.h" /* dq_madd_double, gaussian_of, gaussian_point */

#define TEST_SEED 12345
#include "test_common.h"

/* named tolerances */
#define TOL_GAUSSIAN_ABS 1e-6f /* fast vs reference noise: the same bits; a margin */
#define TOL_QUANTILE_ABS 1.1e-4 /* the gaussian table (degree 3) vs the exact quantile, N(0, 1)/2 units */
#define TOL_MADD_REL 1e-5 /* steps with and without FMA instructions: a few roundings, 1 - t amplifying them */
#define TOL_NOISE_FWD_ABS 1e-6f
#define TOL_FAST_EXP_REL 2e-6f /* polynomial exp2 vs libm in the fast bits/step */

static const int64_t SIZES[] = {1, 2, 3, 5, 7, 8, 31, 33, 63, 127, 255, 511, 1023, 2047, 2048, 2049, 4099};
#define NSIZES ((int)(sizeof SIZES / sizeof SIZES[0]))

static void test_philox_kat(void) {
    /* Known-answer vectors of Random123 (kat_vectors, philox4x32_10). */
    struct { uint32_t ctr[4], key[2], expect[4]; } kat[] = {
        {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
         {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (size_t t = 0; t < sizeof kat / sizeof kat[0]; ++t) {
        uint32_t out[4];
        dq_philox4x32_10(kat[t].ctr, kat[t].key, out);
        CHECK(memcmp(out, kat[t].expect, sizeof out) == 0,
              "philox KAT %zu: got %08x %08x %08x %08x", t, out[0], out[1], out[2], out[3]);
    }
}

/* The fast generator gives the reference's bits: every size and start
 * offset around the tiles of 64 and batches of 256, and counters whose low
 * word wraps inside a batch; with the AVX-512 tiles (where the CPU has
 * them) and with the portable loops. */
static void test_noise_fill_one(void) {
    const uint64_t seeds[] = {0, 0x123456789abcdefull, ~0ull};
    const int64_t starts[] = {0, 1, 3, 5, 31, 33, 63, 65, 255, 257, 1000, ((int64_t)1 << 34) - 64 * 5 - 2,
                              ((int64_t)1 << 34) + 5, ((int64_t)1 << 62) + 7};
    for (int kind = 0; kind < 2; ++kind)
        for (int s = 0; s < 3; ++s)
            for (int t = 0; t < (int)(sizeof starts / sizeof starts[0]); ++t)
                for (int z = 0; z < NSIZES; ++z) {
                    int64_t n = SIZES[z];
                    float *a = xmalloc(n * sizeof(float)), *b = xmalloc(n * sizeof(float));
                    dq_noise_fill_ref(kind, seeds[s], starts[t], n, a);
                    dq_noise_fill_fast(kind, seeds[s], starts[t], n, b);
                    CHECK(memcmp(a, b, (size_t)n * sizeof(float)) == 0,
                          "noise fill kind %d seed %d start %lld n %lld", kind, s,
                          (long long)starts[t], (long long)n);
                    free(a);
                    free(b);
                }
    /* 64-bit counters: elements far beyond 2^32 */
    int64_t start = ((int64_t)1 << 34) + 3;
    float b[37], c[37];
    dq_noise_fill_fast(DQ_NOISE_GAUSSIAN, 1, start, 37, b);
    dq_noise_fill_fast(DQ_NOISE_GAUSSIAN, 1, start - ((int64_t)1 << 32), 37, c);
    CHECK(memcmp(b, c, sizeof b) != 0, "counter high word ignored");
}

static void test_noise_fill(void) {
    int best = dq_noise_simd(-1);
    for (int level = best; level >= 0; --level) {
        CHECK(dq_noise_simd(level) == level, "noise level %d", level);
        test_noise_fill_one();
    }
    dq_noise_simd(-1);
    printf("noise fill checked at levels %d (%s) down to 0\n", best,
           best == 2 ? "AVX-512" : best == 1 ? "AVX2" : "plain C");
}

/* The lower tail's quantile Phi^-1(p) in double: Newton on erfc from the
 * table's own value (already within 1e-4), three steps. */
static double normal_quantile_near(double p, double x) {
    for (int k = 0; k < 3; ++k) {
        double cdf = 0.5 * erfc(-x / sqrt(2.0));
        double pdf = exp(-0.5 * x * x) / 2.5066282746310002;
        x -= (cdf - p) / pdf;
    }
    return x;
}

/* The specification's float formulas against the exact law they stand for:
 * the gaussian as the normal quantile of its word's tail probability, over
 * every 2^23 probabilities (and both signs on a sample), and the uniform as
 * an exact fraction. */
static void test_noise_spec_accuracy(void) {
    double worst = 0;
    int sign_ok = 1;
    for (uint32_t v = 0; v < (1u << 23); ++v) {
        uint32_t word = v << 8 | (v & 0xff); /* low byte: ignored */
        float g;
        g = dq_noise_of_word(DQ_NOISE_GAUSSIAN, word);
        double p = (2.0 * v + 1.0) / 33554432.0;
        double want = -0.5 * normal_quantile_near(p, -2.0 * (double)g);
        worst = fmax(worst, fabs(want - (double)g));
        if ((v & 1023) == 0) {
            float neg;
            neg = dq_noise_of_word(DQ_NOISE_GAUSSIAN, word | 0x80000000u);
            sign_ok &= neg == -g;
        }
    }
    CHECK(worst <= TOL_QUANTILE_ABS, "gaussian spec vs the normal quantile: %g", worst);
    CHECK(sign_ok, "bit 31 is not the gaussian's sign");
    int uniform_ok = 1;
    for (uint32_t k = 0; k < (1u << 16); ++k) {
        uint32_t word = k * 0x10001u * 2654435761u;
        float u;
        u = dq_noise_of_word(DQ_NOISE_UNIFORM, word);
        uniform_ok &= (double)u == (double)(word >> 8) / 16777216.0 - 0.5;
    }
    CHECK(uniform_ok, "uniform spec is not the top 24 bits as a fraction");
    printf("gaussian table: worst %.3g from the normal quantile\n", worst);
}

/* pcg4d's published definition with the seed through splitmix64, written
 * out again here: a second implementation of the hash. */
static void test_noise_hash_definition(void) {
    const uint64_t seeds[] = {0, 5, 0xfedcba9876543210ull};
    const uint64_t counters[] = {0, 1, 7, 0xffffffffull, 0x100000000ull, ~0ull >> 3};
    for (int s = 0; s < 3; ++s)
        for (int c = 0; c < 6; ++c) {
            uint64_t z = seeds[s] + 0x9E3779B97F4A7C15ull;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            uint32_t v[4] = {(uint32_t)counters[c], (uint32_t)(counters[c] >> 32), (uint32_t)z,
                             (uint32_t)(z >> 32)};
            for (int k = 0; k < 4; ++k)
                v[k] = v[k] * 1664525u + 1013904223u;
            for (int round = 0; round < 2; ++round) {
                v[0] += v[1] * v[3];
                v[1] += v[2] * v[0];
                v[2] += v[0] * v[1];
                v[3] += v[1] * v[2];
                if (round == 0)
                    for (int k = 0; k < 4; ++k)
                        v[k] ^= v[k] >> 16;
            }
            uint32_t got[4];
            dq_noise_hash4(seeds[s], counters[c], got);
            CHECK(memcmp(got, v, sizeof v) == 0, "hash seed %d counter %d", s, c);
        }
}

static void test_noise_law_and_threads(void) {
    const int64_t n = 3 * DQ_CHUNK + 777;
    float *one = xmalloc(n * sizeof(float)), *two = xmalloc(n * sizeof(float));
    for (int kind = 0; kind < 2; ++kind) {
        dq_noise_fill(kind, 42, n, one, 1);
        dq_noise_fill(kind, 42, n, two, 2);
        CHECK(memcmp(one, two, n * sizeof(float)) == 0, "noise differs across thread counts");
        double sum = 0, sq = 0;
        float lo = 1e9f, hi = -1e9f;
        for (int64_t i = 0; i < n; ++i) {
            sum += one[i];
            sq += (double)one[i] * one[i];
            lo = fminf(lo, one[i]);
            hi = fmaxf(hi, one[i]);
        }
        double mean = sum / n, var = sq / n - mean * mean;
        double want_var = kind == DQ_NOISE_UNIFORM ? 1.0 / 12.0 : 0.25;
        CHECK(fabs(mean) < 5e-3, "noise mean %g", mean);
        CHECK(fabs(var - want_var) < 0.01 * want_var, "noise kind %d var %g", kind, var);
        if (kind == DQ_NOISE_UNIFORM)
            CHECK(lo >= -0.5f && hi < 0.5f, "uniform range [%g, %g]", lo, hi);
    }
    free(one);
    free(two);
}

static void test_range(void) {
    for (int s = 0; s < NSIZES; ++s) {
        int64_t n = SIZES[s];
        float *x = xmalloc(n * sizeof(float));
        /* all finite, the largest value last and the smallest next to it
         * (lanes of the vector body or of the tail), then one NaN alone,
         * one -inf alone, both and an inf, then the extrema in the stretch
         * of sixteen lanes between the body and the tail */
        for (int variant = 0; variant < 5; ++variant) {
            for (int64_t i = 0; i < n; ++i)
                x[i] = frand();
            if (variant == 0) {
                x[n - 1] = 3.0f;
                if (n > 1)
                    x[n - 2] = -3.0f;
            }
            if (n > 4 && variant == 1)
                x[n / 2] = NAN;
            if (n > 4 && variant == 2)
                x[n - 2] = -INFINITY;
            if (n > 4 && variant == 3) {
                x[n / 2] = NAN;
                x[n / 3] = INFINITY;
            }
            if (variant == 4 && n % 64 >= 18) {
                /* past the 64-lane body, in the sixteen-lane stretch */
                x[n / 64 * 64 + 1] = 3.0f;
                x[n / 64 * 64 + 17] = -3.0f;
            }
            dq_range a, b, c;
            dq_range_ref(x, 0, n, &a);
            dq_range_fast(x, 0, n, &b);
            dq_range_all(x, n, &c, 2);
            CHECK(a.min == b.min && a.max == b.max && a.nonfinite == b.nonfinite,
                  "range fast n %lld variant %d", (long long)n, variant);
            CHECK(a.min == c.min && a.max == c.max && a.nonfinite == c.nonfinite,
                  "range all n %lld variant %d", (long long)n, variant);
        }
        free(x);
    }
}

static int64_t naive_first_index(const float *p, int64_t from, int64_t to, float value) {
    for (int64_t i = from; i < to; ++i)
        if (p[i] == value)
            return i;
    return -1;
}

/* dq__first_index (a compare mask sixteen values at a time with AVX-512)
 * and dq__first_index_blocks (blocks compared as vectors) against a plain
 * scan, with the value nowhere, at vector and block borders, twice, as
 * -0.0 for 0.0 and NaN; and the first extrema a noise forward reports,
 * which it finds that way. */
static void test_first_index(void) {
    const int64_t sizes[] = {1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 255, 256, 257, 1000, DQ_CHUNK + 300};
    for (int s = 0; s < (int)(sizeof sizes / sizeof sizes[0]); ++s) {
        const int64_t n = sizes[s];
        const int64_t spots[] = {-1, 0, 15, 16, 17, 255, 256, n / 2, n - 2, n - 1};
        for (int k = 0; k < (int)(sizeof spots / sizeof spots[0]); ++k) {
            float *p = xmalloc((size_t)n * sizeof(float));
            for (int64_t i = 0; i < n; ++i)
                p[i] = 0.25f + 0.5f * (frand() + 1.0f) / 2.0f; /* in [0.25, 0.75] */
            const int64_t at = spots[k] < n ? spots[k] : -1;
            if (at >= 0) {
                p[at] = -0.0f;
                if (at + 300 < n)
                    p[at + 300] = 0.0f; /* a later tie */
                p[n - 1] = at == n - 1 ? p[n - 1] : 2.0f;
            }
            for (int64_t from = 0; from < n; from += n / 3 + 1) {
                CHECK(dq__first_index(p, from, n, 0.0f) == naive_first_index(p, from, n, 0.0f),
                      "first index of 0 from %lld (n %lld, at %lld)", (long long)from, (long long)n, (long long)at);
                CHECK(dq__first_index_blocks(p, from, n, 0.0f) == naive_first_index(p, from, n, 0.0f),
                      "blocks: first index of 0 from %lld (n %lld, at %lld)", (long long)from, (long long)n,
                      (long long)at);
                CHECK(dq__first_index(p, from, n, NAN) == -1 && dq__first_index_blocks(p, from, n, NAN) == -1,
                      "NaN is never found");
                /* an end short of the array: lanes past `to` are never read as hits */
                const int64_t to = n - (n - from) / 2;
                CHECK(dq__first_index(p, from, to, 0.0f) == naive_first_index(p, from, to, 0.0f) &&
                          dq__first_index_blocks(p, from, to, 0.0f) == naive_first_index(p, from, to, 0.0f),
                      "first index of 0 in [%lld, %lld) (n %lld, at %lld)", (long long)from, (long long)to,
                      (long long)n, (long long)at);
            }
            if (at >= 0) {
                /* starting on the value, and just past it (the later tie) */
                CHECK(dq__first_index(p, at, n, 0.0f) == at, "first index from the value itself (n %lld, at %lld)",
                      (long long)n, (long long)at);
                CHECK(dq__first_index(p, at + 1, n, 0.0f) == naive_first_index(p, at + 1, n, 0.0f),
                      "first index past the value (n %lld, at %lld)", (long long)n, (long long)at);
            }
            if (at >= 0 && at < n - 1 && n > 1) {
                dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0.0f, 0.0f};
                float *logit = xmalloc((size_t)n * sizeof(float)), *noisy = xmalloc((size_t)n * sizeof(float));
                for (int64_t i = 0; i < n; ++i)
                    logit[i] = 0.5f;
                dq_range r;
                dq_noise_forward(&prm, p, n, logit, 1, DQ_NOISE_GAUSSIAN, 3, noisy, &r, 2);
                CHECK(r.first_min == at && r.first_max == naive_first_index(p, 0, n, 2.0f),
                      "forward's first extrema %lld %lld, expected %lld (n %lld)", (long long)r.first_min,
                      (long long)r.first_max, (long long)at, (long long)n);
                free(logit);
                free(noisy);
            }
            free(p);
        }
    }
}

static void test_quantize(void) {
    /* 2, 4, 8, 16: the widths of groups of 2^k values take a vector path */
    const int64_t group_sizes[] = {1, 3, 8, 0, 2, 4, 16};
    for (int s = 0; s < NSIZES; ++s)
        for (int gi = 0; gi < 7; ++gi) {
            int64_t n = SIZES[s] * (group_sizes[gi] ? group_sizes[gi] : 1);
            int64_t gs = group_sizes[gi] ? group_sizes[gi] : n;
            int64_t ngroups = n / gs;
            float *p = xmalloc(n * sizeof(float)), *d1 = xmalloc(n * sizeof(float)),
                  *d2 = xmalloc(n * sizeof(float));
            uint8_t *bits = xmalloc(ngroups);
            int16_t *l1 = xmalloc(n * 2), *l2 = xmalloc(n * 2);
            for (int64_t i = 0; i < n; ++i)
                p[i] = frand() * 3.0f;
            for (int64_t g = 0; g < ngroups; ++g)
                bits[g] = (uint8_t)(1 + lcg() % 15);
            dq_range r;
            dq_range_all(p, n, &r, 1);
            float range = (float)((double)r.max - (double)r.min);
            dq_quantize_ref(p, gs, bits, r.min, range, 0, n, l1, 2);
            dq_quantize(p, n, gs, bits, r.min, range, l2, 2, 2);
            CHECK(memcmp(l1, l2, n * 2) == 0, "quantize fast n %lld gs %lld", (long long)n,
                  (long long)gs);
            CHECK(dq_check_levels(l1, 2, n, gs, bits) == -1, "levels out of width");
            dq_dequantize_ref(l1, 2, gs, bits, r.min, range, 0, n, d1);
            dq_dequantize(l1, 2, n, gs, bits, r.min, range, d2, 2);
            CHECK(memcmp(d1, d2, n * sizeof(float)) == 0, "dequantize fast n %lld",
                  (long long)n);
            /* dequantized values lie within half a step of the originals */
            int ok = 1;
            for (int64_t i = 0; i < n && ok; ++i) {
                float step = range / (float)((1 << bits[i / gs]) - 1);
                ok = fabsf(d1[i] - p[i]) <= 0.5f * step * 1.0001f + 1e-6f;
            }
            CHECK(ok, "dequantize error above half a step, n %lld", (long long)n);
            /* uint8 levels agree with int16 ones where bits <= 8 */
            for (int64_t g = 0; g < ngroups; ++g)
                bits[g] = (uint8_t)(1 + g % 8);
            uint8_t *u1 = xmalloc(n), *u2 = xmalloc(n);
            dq_quantize_ref(p, gs, bits, r.min, range, 0, n, u1, 1);
            dq_quantize(p, n, gs, bits, r.min, range, u2, 1, 2);
            dq_quantize_ref(p, gs, bits, r.min, range, 0, n, l1, 2);
            ok = memcmp(u1, u2, n) == 0;
            for (int64_t i = 0; i < n && ok; ++i)
                ok = u1[i] == l1[i];
            CHECK(ok, "uint8 levels n %lld", (long long)n);
            free(u1);
            free(u2);
            free(p);
            free(d1);
            free(d2);
            free(bits);
            free(l1);
            free(l2);
        }
    /* a constant tensor quantizes to level 0 and restores exactly */
    float c[5] = {0.25f, 0.25f, 0.25f, 0.25f, 0.25f}, back[5];
    int16_t lv[5];
    uint8_t b8 = 8;
    dq_quantize(c, 5, 0, &b8, 0.25f, 0.0f, lv, 2, 1);
    dq_dequantize(lv, 2, 5, 0, &b8, 0.25f, 0.0f, back, 1);
    CHECK(memcmp(c, back, sizeof c) == 0 && lv[0] == 0, "constant tensor");
}

static void test_bitpack(void) {
    for (int s = 0; s < NSIZES; ++s)
        for (int nbits = 0; nbits <= 16; ++nbits) {
            int64_t n = SIZES[s] + (nbits % 3) * 2048;
            int64_t lines = dq_pack_lines(n);
            int64_t words = lines * nbits * DQ_PACK_BLOCK;
            int16_t *x = xmalloc(n * 2), *y1 = xmalloc(n * 2), *y2 = xmalloc(n * 2);
            uint64_t *w1 = xmalloc(words * 8 + 8), *w2 = xmalloc(words * 8 + 8);
            for (int64_t i = 0; i < n; ++i)
                x[i] = (int16_t)(nbits ? (lcg() & ((1u << nbits) - 1)) : 0);
            dq_pack_bits_ref(x, n, nbits, 0, lines, w1);
            dq_pack_bits(x, n, nbits, w2, 2);
            CHECK(memcmp(w1, w2, words * 8) == 0, "pack fast n %lld nbits %d", (long long)n,
                  nbits);
            dq_unpack_bits_ref(w1, lines, nbits, 0, lines, n, y1);
            dq_unpack_bits(w1, lines, nbits, n, y2, 2);
            CHECK(memcmp(x, y1, n * 2) == 0, "unpack ref roundtrip n %lld nbits %d",
                  (long long)n, nbits);
            CHECK(memcmp(x, y2, n * 2) == 0, "unpack fast roundtrip n %lld nbits %d",
                  (long long)n, nbits);
            free(x);
            free(y1);
            free(y2);
            free(w1);
            free(w2);
        }
    /* layout: value 2048*0 + 32*k + j, bit b -> word b*32 + j, bit k */
    int16_t x[2048] = {0};
    x[32 * 5 + 7] = 0x5; /* bits 0 and 2 */
    uint64_t w[3 * 32];
    dq_pack_bits_ref(x, 2048, 3, 0, 1, w);
    CHECK(w[0 * 32 + 7] == (1ull << 5) && w[1 * 32 + 7] == 0 && w[2 * 32 + 7] == (1ull << 5),
          "pack layout");
}

static void test_noise_forward_backward(void) {
    dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0};
    const int64_t group_sizes[] = {1, 8, 0, 5};
    for (int s = 0; s < NSIZES; ++s)
        for (int gi = 0; gi < 4; ++gi)
            for (int kind = 0; kind < 2; ++kind) {
                int64_t n = SIZES[s] * (group_sizes[gi] > 1 ? group_sizes[gi] : 1);
                int64_t gs = group_sizes[gi] ? group_sizes[gi] : n;
                int64_t ng = n / gs;
                float *p = xmalloc(n * 4), *a = xmalloc(n * 4), *b = xmalloc(n * 4),
                      *ss = xmalloc(ng * 4), *logit = xmalloc(ng * 4);
                double *d1 = calloc(ng, 8), *d2 = calloc(ng, 8);
                for (int64_t i = 0; i < n; ++i)
                    p[i] = frand();
                for (int64_t g = 0; g < ng; ++g)
                    logit[g] = frand() * 2;
                /* the fused kernel against the reference fed the same steps */
                dq_logit_to_step_fast(&prm, logit, 0, ng, ss, NULL);
                for (int64_t g = 0; g < ng; ++g)
                    ss[g] = 0.25f * ss[g];
                int64_t c1, c2, c3, c4;
                dq_noise_forward_ref(p, ss, gs, kind, 7, 0, n, a, -0.5f, 0.5f, &c1, &c2);
                dq_noise_forward_fused(&prm, p, logit, 0.25f, gs, kind, 7, 0, n, b, -0.5f, 0.5f, &c3, &c4, NULL);
                float worst = 0;
                for (int64_t i = 0; i < n; ++i)
                    worst = fmaxf(worst, fabsf(a[i] - b[i]));
                CHECK(worst <= TOL_NOISE_FWD_ABS && c1 == c3 && c2 == c4,
                      "noise forward n %lld gs %lld kind %d: %g", (long long)n, (long long)gs,
                      kind, worst);
                dq_noise_grad_dot_ref(p, gs, kind, 7, 0, n, d1);
                dq_noise_grad_dot_fast(p, gs, kind, 7, 0, n, d2);
                /* each product may differ by the noise tolerance times |grad| */
                double wd = 0;
                for (int64_t g = 0; g < ng; ++g) {
                    double bound = 1e-12;
                    for (int64_t i = g * gs; i < (g + 1) * gs; ++i)
                        bound += TOL_GAUSSIAN_ABS * fabs(p[i]);
                    wd = fmax(wd, fabs(d1[g] - d2[g]) / bound);
                }
                CHECK(wd <= 1.0, "grad dot n %lld gs %lld: %g of bound", (long long)n,
                      (long long)gs, wd);
                /* the driver: same result for 1 and 2 threads */
                dq_range r1, r2;
                float *gp1 = xmalloc(n * 4), *gp2 = xmalloc(n * 4), *gl1 = xmalloc(ng * 4),
                      *gl2 = xmalloc(ng * 4);
                dq_noise_forward(&prm, p, n, logit, group_sizes[gi], kind, 99, a, &r1, 1);
                dq_noise_forward(&prm, p, n, logit, group_sizes[gi], kind, 99, b, &r2, 2);
                CHECK(memcmp(a, b, n * 4) == 0 && r1.count_max == r2.count_max &&
                          r1.count_max >= 1,
                      "noise forward threads n %lld", (long long)n);
                dq_noise_backward(&prm, p, p, n, logit, group_sizes[gi], kind, 99, &r1, gp1,
                                  gl1, 1);
                dq_noise_backward(&prm, p, p, n, logit, group_sizes[gi], kind, 99, &r1, gp2,
                                  gl2, 2);
                CHECK(memcmp(gp1, gp2, n * 4) == 0 && memcmp(gl1, gl2, ng * 4) == 0,
                      "noise backward threads n %lld gs %lld", (long long)n, (long long)gs);
                free(gp1);
                free(gp2);
                free(gl1);
                free(gl2);
                free(p);
                free(a);
                free(b);
                free(ss);
                free(logit);
                free(d1);
                free(d2);
            }
    /* non-finite weights are refused and the output left untouched */
    float p[4] = {0, 1, NAN, 2}, out[4] = {7, 7, 7, 7}, logit = 0;
    dq_range r;
    int err = dq_noise_forward(&prm, p, 4, &logit, 0, DQ_NOISE_GAUSSIAN, 1, out, &r, 1);
    CHECK(err == DQ_ERR_NONFINITE && out[0] == 7 && r.nonfinite == 1, "nonfinite forward");
}

/* The fused forward and backward give the same bits with the AVX-512 tiles
 * and with the portable loops: group sizes with a vector path (1, 8, 2, 16,
 * a whole span) and without (3, 24), odd lengths, chunks starting off a
 * tile. Skipped (one note) on a CPU without AVX-512. */
static void test_fused_simd_matches_portable(void) {
    if (dq_noise_simd(-1) < 2) {
        printf("fused kernels: no AVX-512 here, one path only\n");
        return;
    }
    dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0};
    /* 320: spans inside one group (vector path) after spans across two
     * (portable), so the vector path's hash-ahead stream restarts */
    const int64_t group_sizes[] = {1, 8, 2, 4, 16, 3, 24, 4096, 320};
    const int64_t lengths[] = {8, 24, 64, 72, 256, 264, 1000, 4096, 4104, 3 * 4096 + 8 * 13, 7 * 320};
    const int64_t starts[] = {0, 64, 4096, 24, 8};
    int checked = 0;
    for (int gi = 0; gi < 9; ++gi)
        for (int li = 0; li < 11; ++li)
            for (int si = 0; si < 5; ++si)
                for (int kind = 0; kind < 2; ++kind) {
                    int64_t gs = group_sizes[gi], len = lengths[li], start = starts[si];
                    if (len % gs || start % gs)
                        continue;
                    int64_t n = start + len, ng = n / gs;
                    float *p = xmalloc(n * 4), *logit = xmalloc(ng * 4), *grad = xmalloc(n * 4);
                    float *o1 = xmalloc(n * 4), *o2 = xmalloc(n * 4);
                    float *l1 = xmalloc(ng * 4), *l2 = xmalloc(ng * 4);
                    for (int64_t i = 0; i < n; ++i) {
                        p[i] = frand();
                        grad[i] = frand();
                    }
                    for (int64_t g = 0; g < ng; ++g)
                        logit[g] = 4.0f * frand();
                    p[start] = -2.0f;
                    int64_t a1, b1, a2, b2;
                    dq_noise_simd(2);
                    dq_noise_forward_fused(&prm, p, logit, 1.5f, gs, kind, 11, start, len, o1, -2.0f,
                                           p[n - 1], &a1, &b1, NULL);
                    double t1 = dq_noise_backward_fused(&prm, grad, logit, 1.5f, gs, kind, 11, start,
                                                        len, l1, NULL);
                    dq_noise_simd(0);
                    dq_noise_forward_fused(&prm, p, logit, 1.5f, gs, kind, 11, start, len, o2, -2.0f,
                                           p[n - 1], &a2, &b2, NULL);
                    double t2 = dq_noise_backward_fused(&prm, grad, logit, 1.5f, gs, kind, 11, start,
                                                        len, l2, NULL);
                    CHECK(memcmp(o1 + start, o2 + start, len * 4) == 0 && a1 == a2 && b1 == b2 &&
                              a1 >= 1 && b1 >= 1,
                          "fused forward simd vs portable gs %lld len %lld start %lld kind %d",
                          (long long)gs, (long long)len, (long long)start, kind);
                    /* without counts, or with one of them: the same noisy
                     * values, the asked count, on both levels */
                    for (int level = 0; level <= 2; level += 2) {
                        dq_noise_simd(level);
                        int64_t only_max = -1;
                        memset(o2, 0, n * 4);
                        dq_noise_forward_fused(&prm, p, logit, 1.5f, gs, kind, 11, start, len, o2, -2.0f,
                                               p[n - 1], NULL, NULL, NULL);
                        int same = memcmp(o1 + start, o2 + start, len * 4) == 0;
                        memset(o2, 0, n * 4);
                        dq_noise_forward_fused(&prm, p, logit, 1.5f, gs, kind, 11, start, len, o2, -2.0f,
                                               p[n - 1], NULL, &only_max, NULL);
                        CHECK(same && memcmp(o1 + start, o2 + start, len * 4) == 0 && only_max == b1,
                              "fused forward without counts, level %d gs %lld len %lld start %lld kind %d",
                              level, (long long)gs, (long long)len, (long long)start, kind);
                    }
                    CHECK(memcmp(l1 + start / gs, l2 + start / gs, len / gs * 4) == 0 && t1 == t2,
                          "fused backward simd vs portable gs %lld len %lld start %lld kind %d: %.17g %.17g",
                          (long long)gs, (long long)len, (long long)start, kind, t1, t2);
                    ++checked;
                    free(p), free(logit), free(grad), free(o1), free(o2), free(l1), free(l2);
                }
    dq_noise_simd(-1);
    printf("fused kernels: AVX-512 and portable agree in %d cases\n", checked);
}

/* On AVX-512 the steps come from steps_avx512 (noise.c), with the noise
 * capped below it from the C's steps_loops: the same bits, through the
 * fused forward and backward at group_size 1, with and without the size's
 * sum and gradient, on logits that reach every branch of the C (NaN,
 * infinities, the sigmoid's clamp, subnormal sigmoids) and on bit ranges
 * that give infinite steps (min_bits 0) or leave the steps to the C
 * (unbounded bits, the noise mode, no FMA). NaN compared by its bits too,
 * but for the backward's sum. */
static void test_steps_avx512_match_c(void) {
    if (dq_noise_simd(-1) < 2) {
        printf("steps: no AVX-512 here\n");
        return;
    }
    const float special[] = {NAN, -NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 87.0f, -87.0f, 90.5f,
                             -90.5f, 200.0f, -200.0f, 1e30f, -1e30f, 1e-40f, 17.25f, -33.0f};
    const dq_bits_param prms[] = {
        {DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0},    {DQ_PARAM_BITS, 0.0f, 8.0f, 0, 0},
        {DQ_PARAM_BITS, 1.0f, 100.0f, 0, 0},   {DQ_PARAM_BITS, -100.0f, 3.0f, 0, 0},
        {DQ_PARAM_BITS, 2.0f, 140.0f, 0, 0},   {DQ_PARAM_NOISE, 2.0f, 15.0f, -10.0f, -1.0f},
    };
    const int64_t lengths[] = {1, 7, 16, 17, 64, 255, 256, 257, 1000, 4103};
    int checked = 0;
    for (int pi = 0; pi < 6; ++pi)
        for (int li = 0; li < 10; ++li)
            for (int fma = 0; fma <= 1; ++fma)
                for (int with_size = 0; with_size <= 1; ++with_size) {
                    const dq_bits_param *prm = &prms[pi];
                    const int64_t len = lengths[li], start = 64, n = start + len;
                    float *p = xmalloc(n * 4), *logit = xmalloc(n * 4), *grad = xmalloc(n * 4);
                    float *o[2], *gl[2];
                    dq_size_stats st[2];
                    double through[2];
                    int64_t cmin[2], cmax[2];
                    for (int64_t i = 0; i < n; ++i) {
                        p[i] = frand();
                        grad[i] = frand();
                        logit[i] = i % 3 ? 12.0f * frand() : special[i % 17];
                    }
                    const float size_scale = 0.125f;
                    dq_fused_madd(fma);
                    for (int k = 0; k < 2; ++k) {
                        o[k] = xmalloc(n * 4), gl[k] = xmalloc(n * 4);
                        memset(&st[k], 0, sizeof st[k]);
                        dq_noise_simd(k ? 0 : 2);
                        dq_noise_forward_fused(prm, p, logit, 1.5f, 1, DQ_NOISE_GAUSSIAN, 5, start, len,
                                               o[k], -1.0f, 1.0f, &cmin[k], &cmax[k],
                                               with_size && prm->mode == DQ_PARAM_BITS ? &st[k] : NULL);
                        through[k] = dq_noise_backward_fused(prm, grad, logit, 1.5f, 1, DQ_NOISE_GAUSSIAN,
                                                             5, start, len, gl[k],
                                                             with_size ? &size_scale : NULL);
                    }
                    CHECK(memcmp(o[0] + start, o[1] + start, len * 4) == 0 && cmin[0] == cmin[1] &&
                              cmax[0] == cmax[1] && memcmp(&st[0], &st[1], sizeof st[0]) == 0,
                          "AVX-512 steps, forward: prm %d len %lld fma %d size %d", pi,
                          (long long)len, fma, with_size);
                    /* the sum over NaN terms: NaN in both, its sign from the order of the
                     * adds, which differs between the two paths' last partial rows */
                    CHECK(memcmp(gl[0] + start, gl[1] + start, len * 4) == 0 &&
                              (memcmp(&through[0], &through[1], sizeof through[0]) == 0 ||
                               (isnan(through[0]) && isnan(through[1]))),
                          "AVX-512 steps, backward: prm %d len %lld fma %d size %d: %.17g %.17g", pi,
                          (long long)len, fma, with_size, through[0], through[1]);
                    ++checked;
                    for (int k = 0; k < 2; ++k)
                        free(o[k]), free(gl[k]);
                    free(p), free(logit), free(grad);
                }
    dq_noise_simd(-1);
    dq_fused_madd(-1);
    printf("steps: AVX-512 and C agree in %d cases\n", checked);
}

/* dq_madd_double against fmaf (libm's, correctly rounded) over all 2^23
 * magnitudes of the gaussian's polynomial: the plain-C gaussian's bits are
 * the FMA paths'. Then, to show the check can fail, a multiply-add whose
 * double sum lands on a float midpoint. */
static void test_madd_double_is_fma_for_the_gaussian(void) {
    int64_t bad = 0;
    for (uint32_t v = 0; v < (1u << 23); ++v) {
        const uint32_t u = v << 8;
        uint32_t octave;
        float m;
        gaussian_point(u, &octave, &m);
        float z = GAUSS_POLY[0][octave];
        for (int k = 1; k <= GAUSS_DEGREE; ++k)
            z = fmaf(z, m, GAUSS_POLY[k][octave]);
        bad += dq_float_bits(gaussian_of(u)) != dq_float_bits(z);
    }
    CHECK(bad == 0, "gaussian: double multiply-adds differ from fmaf at %lld magnitudes", (long long)bad);
    const float ta = ldexpf(1.0f + 0x1p-23f, -12), tb = ldexpf(1.0f - 0x1p-23f, -12), tc = 1.0f + 0x1p-23f;
    CHECK(fmaf(ta, tb, tc) == tc && dq_madd_double(ta, tb, tc) != tc,
          "a double sum on a float midpoint rounds twice");
}

/* The fast steps, bits and size penalty with FMA instructions and with a
 * multiply and an add (where the CPU has FMA), over a grid of logits in
 * [-12, 12] and saturated ones: the steps, bits and size within
 * TOL_MADD_REL; d(step) and the size's gradient carry t (1 - t), where a
 * last-bit difference in t = sigmoid(logit) near 0 or 1 is a relative one
 * of up to 2^-24 / min(t, 1 - t) (8.6e-5 at logit 6.57), so they get that
 * margin on top (four such bits). */
static void test_fused_madd_agrees(void) {
    if (!dq_fused_madd(-1)) {
        printf("multiply-adds: no FMA clone here, one path only\n");
        return;
    }
    const int64_t n = ((int64_t)1 << 18) + 7;
    dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0};
    float *logit = xmalloc(n * 4), *out[2][4];
    dq_size_stats st[2];
    for (int64_t i = 0; i < n; ++i)
        logit[i] = -12.0f + 24.0f * (float)i / (float)(n - 1);
    logit[0] = 0.0f, logit[1] = 200.0f, logit[2] = -200.0f;
    for (int f = 0; f < 2; ++f) {
        CHECK(dq_fused_madd(f) == f, "dq_fused_madd(%d)", f);
        for (int k = 0; k < 4; ++k)
            out[f][k] = xmalloc(n * 4);
        dq_logit_to_step_fast(&prm, logit, 0, n, out[f][0], out[f][1]);
        dq_logit_to_bits_fast(&prm, logit, 0, n, out[f][2], NULL);
        dq_size_backward(&prm, logit, n, 0.5f, out[f][3], 1);
        dq_size_forward(&prm, logit, n, &st[f], 1);
    }
    dq_fused_madd(-1);
    int differ = 0;
    double worst = 0; /* relative difference over its tolerance */
    for (int k = 0; k < 4; ++k)
        for (int64_t i = 0; i < n; ++i) {
            double a = out[0][k][i], b = out[1][k][i];
            differ += a != b;
            double t = 1.0 / (1.0 + exp(-(double)logit[i]));
            double tol = TOL_MADD_REL + (k == 1 || k == 3 ? 4 * 0x1p-24 / fmax(fmin(t, 1.0 - t), 1e-30) : 0);
            double rel = fabs(a - b) / fmax(fabs(a), 1e-30) / tol;
            worst = rel > worst ? rel : worst;
        }
    CHECK(worst <= 1.0 && differ > 0,
          "FMA vs multiply and add: worst difference %g of its tolerance, %d values differ", worst, differ);
    CHECK(fabs(st[0].sum_bits - st[1].sum_bits) <= TOL_MADD_REL * st[0].sum_bits,
          "FMA vs multiply and add, size");
    for (int f = 0; f < 2; ++f)
        for (int k = 0; k < 4; ++k)
            free(out[f][k]);
    free(logit);
}

/* The drivers count ties only in the chunks whose own extremum is the
 * tensor's: the counts and first indices against a naive count, with ties
 * spread over chunks that are not the first, at chunk edges, on both signs
 * of zero, and in a constant tensor (every chunk holds both extrema); the
 * single-tensor and multi-tensor drivers, one and two threads. */
static void test_tie_counts_across_chunks(void) {
    dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0};
    const int64_t n = 4 * DQ_CHUNK + 40; /* whole groups of 8 */
    float *p = xmalloc(n * 4), *logit = xmalloc(n * 4), *noisy = xmalloc(n * 4),
          *noisy2 = xmalloc(n * 4);
    for (int layout = 0; layout < 4; ++layout) {
        for (int64_t i = 0; i < n; ++i) {
            p[i] = layout == 3 ? 0.5f : frand();
            logit[i] = frand();
        }
        if (layout == 0) {
            /* minima in chunks 1, 3 and 4, none in 0 or 2; maxima at the
             * very first element and the last element of chunk 2 */
            p[DQ_CHUNK + 5] = p[4 * DQ_CHUNK - 1] = p[n - 1] = -2.0f;
            p[0] = p[3 * DQ_CHUNK - 1] = 2.0f;
        } else if (layout == 1) {
            /* one minimum, in the last chunk; maxima on both sides of the
             * edge between chunks 1 and 2 */
            p[n - 2] = -3.0f;
            p[2 * DQ_CHUNK - 1] = p[2 * DQ_CHUNK] = 3.0f;
        } else if (layout == 2) {
            /* the minimum is zero, as +0.0 in chunk 2 and -0.0 in chunk 0 */
            for (int64_t i = 0; i < n; ++i)
                p[i] = fabsf(p[i]) + 0.25f;
            p[7] = -0.0f;
            p[2 * DQ_CHUNK + 9] = 0.0f;
        }
        int64_t want_min = 0, want_max = 0;
        float mn = p[0], mx = p[0];
        for (int64_t i = 0; i < n; ++i) {
            mn = p[i] < mn ? p[i] : mn;
            mx = p[i] > mx ? p[i] : mx;
        }
        for (int64_t i = 0; i < n; ++i) {
            want_min += p[i] == mn;
            want_max += p[i] == mx;
        }
        for (int threads = 1; threads <= 2; ++threads) {
            dq_range r;
            CHECK(dq_noise_forward(&prm, p, n, logit, 8, DQ_NOISE_GAUSSIAN, 3, noisy, &r, threads) == DQ_OK,
                  "forward");
            CHECK(r.count_min == want_min && r.count_max == want_max &&
                      r.first_min == naive_first_index(p, 0, n, mn) &&
                      r.first_max == naive_first_index(p, 0, n, mx),
                  "ties layout %d threads %d: counts %lld %lld (want %lld %lld), first %lld %lld", layout,
                  threads, (long long)r.count_min, (long long)r.count_max, (long long)want_min,
                  (long long)want_max, (long long)r.first_min, (long long)r.first_max);
            dq_noise_job job = {.p = p, .n = n, .logit = logit, .group_size = 8, .seed = 3, .noisy = noisy2};
            CHECK(dq_noise_forward_multi(&prm, DQ_NOISE_GAUSSIAN, &job, 1, threads) == DQ_OK &&
                      job.range.count_min == want_min && job.range.count_max == want_max &&
                      job.range.first_min == r.first_min && job.range.first_max == r.first_max &&
                      memcmp(noisy, noisy2, n * 4) == 0,
                  "multi ties layout %d threads %d: counts %lld %lld", layout, threads,
                  (long long)job.range.count_min, (long long)job.range.count_max);
        }
    }
    free(p), free(logit), free(noisy), free(noisy2);
}

/* The noise forward says where the first min and max are; the in-place
 * backward uses that to update them without a pass over p: the same
 * gradient as the scan (indices unknown) and as the copying backward, with
 * single extrema, ties, and a one-element tensor. */
static void test_extrema_shortcut(void) {
    dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0};
    const int64_t sizes[] = {1, 7, 3 * DQ_CHUNK + 11};
    for (int si = 0; si < 3; ++si)
        for (int ties = 0; ties < 2; ++ties) {
            int64_t n = sizes[si];
            float *p = xmalloc(n * 4), *noisy = xmalloc(n * 4), *logit = xmalloc(n * 4);
            float *g1 = xmalloc(n * 4), *g2 = xmalloc(n * 4), *g3 = xmalloc(n * 4);
            float *gl = xmalloc(n * 4);
            for (int64_t i = 0; i < n; ++i) {
                p[i] = frand();
                logit[i] = frand();
                g1[i] = g2[i] = frand();
            }
            if (ties && n > 2) {
                p[n - 1] = p[n / 2] = 2.0f; /* two maxima */
                p[1] = -2.0f;               /* one minimum, early */
            }
            dq_range r;
            CHECK(dq_noise_forward(&prm, p, n, logit, 1, DQ_NOISE_GAUSSIAN, 5, noisy, &r, 2) == DQ_OK,
                  "forward");
            int first_ok = r.first_min >= 0 && r.first_max >= 0 && p[r.first_min] == r.min &&
                           p[r.first_max] == r.max;
            for (int64_t i = 0; first_ok && i < r.first_min; ++i)
                first_ok = p[i] != r.min;
            for (int64_t i = 0; first_ok && i < r.first_max; ++i)
                first_ok = p[i] != r.max;
            CHECK(first_ok, "first extrema n %lld ties %d: %lld %lld", (long long)n, ties,
                  (long long)r.first_min, (long long)r.first_max);
            dq_range scan = r;
            scan.first_min = scan.first_max = -1;
            dq_noise_backward(&prm, g1, p, n, logit, 1, DQ_NOISE_GAUSSIAN, 5, &r, g1, gl, 2);
            dq_noise_backward(&prm, g2, p, n, logit, 1, DQ_NOISE_GAUSSIAN, 5, &scan, g2, gl, 2);
            CHECK(memcmp(g1, g2, n * 4) == 0, "extrema shortcut vs scan n %lld ties %d", (long long)n, ties);
            for (int64_t i = 0; i < n; ++i)
                g3[i] = frand();
            memcpy(g2, g3, n * 4);
            float *copied = xmalloc(n * 4);
            dq_noise_backward(&prm, g3, p, n, logit, 1, DQ_NOISE_GAUSSIAN, 5, &r, copied, gl, 2);
            dq_noise_backward(&prm, g2, p, n, logit, 1, DQ_NOISE_GAUSSIAN, 5, &r, g2, gl, 2);
            CHECK(memcmp(copied, g2, n * 4) == 0, "in place vs copy n %lld ties %d", (long long)n, ties);
            free(p), free(noisy), free(logit), free(g1), free(g2), free(g3), free(gl), free(copied);
        }
}

/* The size forward on odd sizes, with a NaN logit: the sum is NaN, the max
 * skips it (all NaN: -inf), as the reference does; 1 and 2 threads give
 * the same bits. */
static void test_size_odd_sizes_and_nan(void) {
    dq_bits_param modes[2] = {{DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0},
                              {DQ_PARAM_NOISE, 2.0f, 15.0f, logf(1.0f / 32767.0f), logf(1.0f / 3.0f)}};
    for (int m = 0; m < 2; ++m)
        for (int s = 0; s < NSIZES; ++s) {
            int64_t n = SIZES[s];
            float *logit = xmalloc(n * 4);
            for (int64_t i = 0; i < n; ++i)
                logit[i] = frand() * 6;
            dq_size_stats a, b, c;
            dq_size_forward_ref(&modes[m], logit, 0, n, &a);
            dq_size_forward(&modes[m], logit, n, &b, 1);
            dq_size_forward(&modes[m], logit, n, &c, 2);
            CHECK(fabs(a.sum_bits - b.sum_bits) <= TOL_FAST_EXP_REL * fabs(a.sum_bits) &&
                      fabsf(a.max_bits - b.max_bits) <= TOL_FAST_EXP_REL * a.max_bits,
                  "size forward mode %d n %lld: %.9g vs %.9g", m, (long long)n, a.sum_bits, b.sum_bits);
            CHECK(b.sum_bits == c.sum_bits && b.max_bits == c.max_bits, "size forward threads n %lld",
                  (long long)n);
            logit[n / 2] = NAN;
            dq_size_forward_ref(&modes[m], logit, 0, n, &a);
            dq_size_forward(&modes[m], logit, n, &b, 2);
            int all_nan = n == 1;
            CHECK(isnan(b.sum_bits) && (all_nan ? b.max_bits == -INFINITY
                                                : fabsf(a.max_bits - b.max_bits) <= TOL_FAST_EXP_REL * a.max_bits),
                  "size forward with NaN mode %d n %lld: sum %g max %g (ref %g)", m, (long long)n, b.sum_bits,
                  b.max_bits, a.max_bits);
            free(logit);
        }
}

static void test_size(void) {
    dq_bits_param modes[2] = {{DQ_PARAM_BITS, 2.0f, 15.0f, 0, 0},
                              {DQ_PARAM_NOISE, 2.0f, 15.0f, logf(1.0f / 32767.0f), logf(1.0f / 3.0f)}};
    for (int m = 0; m < 2; ++m) {
        int64_t n = 2 * DQ_CHUNK + 5;
        float *logit = xmalloc(n * 4), *g1 = xmalloc(n * 4), *g2 = xmalloc(n * 4);
        for (int64_t i = 0; i < n; ++i)
            logit[i] = frand() * 4;
        dq_size_stats a, b;
        dq_size_forward_ref(&modes[m], logit, 0, n, &a);
        dq_size_forward(&modes[m], logit, n, &b, 2);
        CHECK(fabs(a.sum_bits - b.sum_bits) <= TOL_FAST_EXP_REL * fabs(a.sum_bits) &&
                  fabsf(a.max_bits - b.max_bits) <= TOL_FAST_EXP_REL * a.max_bits,
              "size forward mode %d: %.9g vs %.9g", m, a.sum_bits, b.sum_bits);
        dq_size_backward_ref(&modes[m], logit, 0, n, 0.5f, g1);
        dq_size_backward(&modes[m], logit, n, 0.5f, g2, 2);
        float worst = 0;
        for (int64_t i = 0; i < n; ++i)
            worst = fmaxf(worst, fabsf(g1[i] - g2[i]) / (fabsf(g1[i]) + 1e-6f));
        CHECK(worst <= 20 * TOL_FAST_EXP_REL, "size backward mode %d: %g", m, worst);
        /* the adding kernels: ref against fast at odd sizes and offsets,
         * and fast add == fast write + the value already there (bit for
         * bit: the fused gradient equals autograd's sum of the two) */
        static const int64_t ODD[] = {1, 2, 3, 5, 7, 31, 1023, 1025, 2049};
        for (size_t k = 0; k < sizeof ODD / sizeof ODD[0]; ++k) {
            const int64_t start = 3, count = ODD[k];
            float *base = xmalloc((start + count) * 4), *a1 = xmalloc((start + count) * 4),
                  *a2 = xmalloc((start + count) * 4), *w = xmalloc((start + count) * 4);
            for (int64_t i = 0; i < start + count; ++i)
                base[i] = a1[i] = a2[i] = frand();
            dq_size_backward_add_ref(&modes[m], logit, start, count, 0.75f, a1);
            dq_size_backward_add_fast(&modes[m], logit, start, count, 0.75f, a2);
            dq_size_backward_fast(&modes[m], logit, start, count, 0.75f, w);
            float worst_add = 0;
            int exact = 1;
            for (int64_t i = 0; i < start; ++i)
                exact &= a1[i] == base[i] && a2[i] == base[i];
            for (int64_t i = start; i < start + count; ++i) {
                worst_add = fmaxf(worst_add, fabsf(a1[i] - a2[i]) / (fabsf(a1[i] - base[i]) + 1e-6f));
                exact &= a2[i] == base[i] + w[i];
            }
            CHECK(worst_add <= 20 * TOL_FAST_EXP_REL, "size backward add mode %d count %lld: %g", m,
                  (long long)count, worst_add);
            CHECK(exact, "size backward add mode %d count %lld: not base + term, or wrote outside", m,
                  (long long)count);
            free(base);
            free(a1);
            free(a2);
            free(w);
        }
        /* the fast step and its derivative against the reference */
        float *s1 = xmalloc(n * 4), *s2 = xmalloc(n * 4), *d1 = xmalloc(n * 4), *d2 = xmalloc(n * 4);
        dq_logit_to_step_ref(&modes[m], logit, n, NULL, s1, d1);
        dq_logit_to_step_fast(&modes[m], logit, 0, n, s2, d2);
        float ws = 0, wd = 0;
        for (int64_t i = 0; i < n; ++i) {
            ws = fmaxf(ws, fabsf(s1[i] - s2[i]) / s1[i]);
            wd = fmaxf(wd, fabsf(d1[i] - d2[i]) / (fabsf(d1[i]) + 1e-9f));
        }
        CHECK(ws <= 10 * TOL_FAST_EXP_REL && wd <= 20 * TOL_FAST_EXP_REL,
              "fast step mode %d: step %g dstep %g", m, ws, wd);
        free(s1);
        free(s2);
        free(d1);
        free(d2);
        /* derivative against central differences in float64 of the bits */
        int ok = 1;
        for (int64_t i = 0; i < 50 && ok; ++i) {
            float x = logit[i], d;
            dq_logit_to_bits(&modes[m], x, &d);
            float h = 1e-2f;
            float up = dq_logit_to_bits(&modes[m], x + h, NULL);
            float dn = dq_logit_to_bits(&modes[m], x - h, NULL);
            float fd = (up - dn) / (2 * h);
            ok = fabsf(fd - d) <= 2e-3f * (fabsf(d) + 1e-2f);
            if (!ok)
                fprintf(stderr, "mode %d x %g: analytic %g fd %g\n", m, x, d, fd);
        }
        CHECK(ok, "dbits/dlogit mode %d", m);
        free(logit);
        free(g1);
        free(g2);
    }
}

/* ---------------------------------------------------------------- lsq.c */

/* torch <= 2.13's clamp: the gradient passes on both bounds */
#define BOTH_INSIDE (DQ_LSQ_LOW_INSIDE | DQ_LSQ_HIGH_INSIDE)

static void test_lsq_known_answer(void) {
    /* s = 0.5, bits = 2: levels -2..1. c = x / s is exact for these values;
     * the halves round to even and out-of-range values clamp first. */
    const float x[] = {-3.0f, -0.75f, -0.25f, 0.25f, 0.3f, 0.75f, 0.5f, 5.0f, NAN};
    const float want_q[] = {-1.0f, -1.0f, -0.0f, 0.0f, 0.5f, 0.5f, 0.5f, 0.5f};
    const int16_t want_index[] = {-2, -2, 0, 0, 1, 1, 1, 1, 0};
    const float want_gx[] = {0, 1, 1, 1, 1, 0, 1, 0};
    float q[9], gx[8], ones[9];
    int16_t index[9];
    for (int i = 0; i < 9; ++i)
        ones[i] = 1.0f;
    for (int fast = 0; fast < 2; ++fast) {
        int64_t nans = fast ? dq_lsq_forward_fast(x, 0.5f, 2, 0, 9, q, index)
                            : dq_lsq_forward_ref(x, 0.5f, 2, 0, 9, q, index);
        CHECK(nans == 1 && isnan(q[8]), "lsq forward NaN count %lld (fast %d)", (long long)nans, fast);
        CHECK(memcmp(q, want_q, sizeof want_q) == 0 && memcmp(index, want_index, sizeof want_index) == 0,
              "lsq forward known answer (fast %d)", fast);
        /* c = 1 sits on the upper bound: inside (torch <= 2.13's clamp),
         * gradient passes, term 0 */
        double acc = fast ? dq_lsq_backward_fast(x, ones, 0.5f, 2, BOTH_INSIDE, 0, 8, gx)
                          : dq_lsq_backward_ref(x, ones, 0.5f, 2, BOTH_INSIDE, 0, 8, gx);
        /* terms: -2, -0.5, 0.5, -0.5, 1 - 0.6f, 1, 0, 1 */
        double want = -2 - 0.5 + 0.5 - 0.5 + (1.0 - (double)(0.3f / 0.5f)) + 1 + 0 + 1;
        CHECK(fabs(acc - want) < 1e-12, "lsq backward sum %.17g, want %.17g (fast %d)", acc, want, fast);
        CHECK(memcmp(gx, want_gx, sizeof want_gx) == 0, "lsq backward grad_x (fast %d)", fast);
    }
    /* a NaN level makes the scale gradient NaN, as torch's autograd does */
    CHECK(isnan(dq_lsq_backward_ref(x, ones, 0.5f, 2, BOTH_INSIDE, 0, 9, NULL)), "lsq backward NaN");
    CHECK(isnan(dq_lsq_backward_ref(x, ones, 0.5f, 2, 0, 0, 9, NULL)), "lsq backward NaN, bounds outside");
}

/* Each choice of bounds, on c = -2 (the low bound), 1 (the high bound),
 * -2.5 (clamped) and 0.5 (inside): s = 0.5, bits = 2. On a bound taken in,
 * the gradient passes and the scale's term is round(c) - c = 0; on one left
 * out, no gradient and the term is the bound. */
static void test_lsq_bounds(void) {
    const float x[] = {-1.0f, 0.5f, -1.25f, 0.25f}, ones[] = {1, 1, 1, 1};
    const struct {
        int bounds;
        float gx[4];
        double sum;
    } want[] = {
        {BOTH_INSIDE, {1, 1, 0, 1}, 0 + 0 - 2 - 0.5},
        {0, {0, 0, 0, 1}, -2 + 1 - 2 - 0.5},
        {DQ_LSQ_LOW_INSIDE, {1, 0, 0, 1}, 0 + 1 - 2 - 0.5},
        {DQ_LSQ_HIGH_INSIDE, {0, 1, 0, 1}, -2 + 0 - 2 - 0.5},
    };
    for (int w = 0; w < 4; ++w)
        for (int fast = 0; fast < 2; ++fast) {
            float gx[4];
            double acc = fast ? dq_lsq_backward_fast(x, ones, 0.5f, 2, want[w].bounds, 0, 4, gx)
                              : dq_lsq_backward_ref(x, ones, 0.5f, 2, want[w].bounds, 0, 4, gx);
            CHECK(acc == want[w].sum && memcmp(gx, want[w].gx, sizeof gx) == 0,
                  "lsq bounds %d (fast %d): sum %g, want %g", want[w].bounds, fast, acc, want[w].sum);
        }
    /* the driver too, any thread count */
    float gx[4];
    float total = dq_lsq_backward(x, ones, 4, 0.5f, 2, 0, 0.25f, gx, 2);
    CHECK(total == (float)(0.25 * want[1].sum) && memcmp(gx, want[1].gx, sizeof gx) == 0,
          "lsq bounds driver: %g", total);
}

static void test_lsq_fast_and_threads(void) {
    const int bit_widths[] = {1, 2, 4, 8, 15};
    for (int bi = 0; bi < 5; ++bi)
        for (int s = 0; s < NSIZES; ++s) {
            int bits = bit_widths[bi];
            int64_t n = SIZES[s];
            float scale = 0.37f / (float)(1 << (bits - 1));
            float *x = xmalloc(n * 4), *g = xmalloc(n * 4), *q1 = xmalloc(n * 4), *q2 = xmalloc(n * 4);
            float *gx1 = xmalloc(n * 4), *gx2 = xmalloc(n * 4);
            int16_t *i1 = xmalloc(n * 2), *i2 = xmalloc(n * 2), *i3 = xmalloc(n * 2);
            for (int64_t i = 0; i < n; ++i) {
                x[i] = frand() * 0.5f;
                g[i] = frand();
                /* exact halves of the step hit the round-half-even rule */
                if (i % 7 == 3)
                    x[i] = ((float)(int)(frand() * 8) + 0.5f) * scale;
            }
            if (n > 4)
                x[4] = INFINITY;
            int64_t a = dq_lsq_forward_ref(x, scale, bits, 0, n, q1, i1);
            int64_t b = dq_lsq_forward_fast(x, scale, bits, 0, n, q2, i2);
            int64_t c = dq_lsq_forward_fast(x, scale, bits, 0, n, NULL, i3);
            int64_t d = dq_lsq_forward_fast(x, scale, bits, 0, n, q2, NULL);
            CHECK(a == 0 && b == 0 && c == 0 && d == 0, "lsq nan counts");
            CHECK(memcmp(q1, q2, n * 4) == 0 && memcmp(i1, i2, n * 2) == 0 && memcmp(i1, i3, n * 2) == 0,
                  "lsq forward fast bits %d n %lld", bits, (long long)n);
            int ok = 1;
            for (int64_t i = 0; i < n && ok; ++i)
                ok = i1[i] >= -(1 << (bits - 1)) && i1[i] < (1 << (bits - 1)) && q1[i] == (float)i1[i] * scale;
            CHECK(ok, "lsq index range / q = index * s, bits %d", bits);
            /* exact bounds in the backward: c = low and c = high */
            if (n > 6) {
                x[5] = -(float)(1 << (bits - 1)) * scale;
                x[6] = (float)((1 << (bits - 1)) - 1) * scale;
            }
            const int bound_choices[] = {BOTH_INSIDE, 0, DQ_LSQ_HIGH_INSIDE};
            for (int bc = 0; bc < 3; ++bc) {
                int bounds = bound_choices[bc];
                double r1 = dq_lsq_backward_ref(x, g, scale, bits, bounds, 0, n, gx1);
                double r2 = dq_lsq_backward_fast(x, g, scale, bits, bounds, 0, n, gx2);
                double mag = 0;
                for (int64_t i = 0; i < n; ++i)
                    mag += fabs((double)g[i]) * (1 << (bits - 1));
                CHECK(fabs(r1 - r2) <= 1e-12 * (mag + 1), "lsq backward fast sum bits %d n %lld bounds %d: %g vs %g",
                      bits, (long long)n, bounds, r1, r2);
                CHECK(memcmp(gx1, gx2, n * 4) == 0, "lsq backward fast grad_x bits %d n %lld bounds %d", bits,
                      (long long)n, bounds);
            }
            free(x), free(g), free(q1), free(q2), free(gx1), free(gx2), free(i1), free(i2), free(i3);
        }
    /* the drivers give the same bits for any thread count */
    int64_t n = 2 * DQ_CHUNK + 5;
    float *x = xmalloc(n * 4), *g = xmalloc(n * 4), *q1 = xmalloc(n * 4), *q2 = xmalloc(n * 4);
    float *gx1 = xmalloc(n * 4), *gx2 = xmalloc(n * 4);
    int16_t *i1 = xmalloc(n * 2), *i2 = xmalloc(n * 2);
    for (int64_t i = 0; i < n; ++i) {
        x[i] = frand();
        g[i] = frand();
    }
    float scale = 0.01f, gscale = 1.0f / sqrtf((float)n * 127.0f);
    int64_t a = dq_lsq_forward(x, n, scale, 8, q1, i1, 1);
    int64_t b = dq_lsq_forward(x, n, scale, 8, q2, i2, 2);
    CHECK(a == 0 && b == 0 && memcmp(q1, q2, n * 4) == 0 && memcmp(i1, i2, n * 2) == 0, "lsq forward threads");
    x[3] = 127.0f * scale; /* on the high bound */
    float s1 = dq_lsq_backward(x, g, n, scale, 8, 0, gscale, gx1, 1);
    float s2 = dq_lsq_backward(x, g, n, scale, 8, 0, gscale, gx2, 2);
    CHECK(s1 == s2 && memcmp(gx1, gx2, n * 4) == 0, "lsq backward threads");
    double ref = dq_lsq_backward_ref(x, g, scale, 8, 0, 0, n, NULL) * gscale;
    CHECK(fabs(s1 - ref) <= 1e-6 * fabs(ref) + 1e-9, "lsq backward driver %g vs ref %g", s1, ref);
    free(x), free(g), free(q1), free(q2), free(gx1), free(gx2), free(i1), free(i2);
    /* the effective scale stays within one ulp of the scale */
    int ok = 1, differs = 0;
    for (int t = 0; t < 10000 && ok; ++t) {
        float sc = fabsf(frand()) + 1e-3f, gs = fabsf(frand()) * 0.1f + 1e-4f;
        float e = dq_lsq_effective_scale(sc, gs);
        ok = fabsf(e - sc) <= nextafterf(sc, INFINITY) - sc;
        differs += e != sc;
    }
    CHECK(ok, "lsq effective scale more than one ulp away");
    printf("lsq: effective scale differed from the scale in %d of 10000 draws\n", differs);
}

static void test_grouped_packing_and_requantize(void) {
    const int64_t group_sizes[] = {1, 3, 8, 5000};
    for (int gi = 0; gi < 4; ++gi)
        for (int s = 0; s < NSIZES; s += 3) {
            int64_t gs = group_sizes[gi], ng = SIZES[s], n = ng * gs;
            uint8_t *bits = xmalloc(ng);
            int16_t *levels = xmalloc(n * 2), *back = xmalloc(n * 2), *stream = xmalloc(n * 2);
            int64_t totals[16];
            for (int64_t g = 0; g < ng; ++g)
                bits[g] = (uint8_t)(1 + lcg() % 15);
            for (int64_t i = 0; i < n; ++i)
                levels[i] = (int16_t)(lcg() & ((1u << bits[i / gs]) - 1));
            CHECK(dq_split_by_width(levels, 2, gs, bits, ng, stream, totals, 2) == DQ_OK, "split");
            /* the reference: for each width, its groups' rows in group order */
            int same = 1;
            int64_t off = 0;
            for (int w = 0; w < 16; ++w) {
                int64_t at = off;
                for (int64_t g = 0; g < ng; ++g)
                    if (bits[g] == w) {
                        same &= memcmp(stream + at, levels + g * gs, gs * 2) == 0;
                        at += gs;
                    }
                same &= at - off == totals[w];
                off += totals[w];
            }
            CHECK(same && off == n, "split by width gs %lld n %lld", (long long)gs, (long long)ng);
            memset(back, 0xff, n * 2);
            CHECK(dq_merge_by_width(stream, gs, bits, ng, back, 2) == DQ_OK, "merge");
            CHECK(memcmp(back, levels, n * 2) == 0, "merge by width gs %lld n %lld", (long long)gs,
                  (long long)ng);
            /* uint8 levels split to the same streams */
            uint8_t *small = xmalloc(n);
            for (int64_t i = 0; i < n; ++i)
                small[i] = (uint8_t)(levels[i] & 0xff);
            int16_t *stream8 = xmalloc(n * 2);
            for (int64_t g = 0; g < ng; ++g)
                bits[g] = (uint8_t)(1 + (bits[g] - 1) % 8);
            for (int64_t i = 0; i < n; ++i)
                levels[i] = small[i] & ((1 << bits[i / gs]) - 1), small[i] = (uint8_t)levels[i];
            dq_split_by_width(levels, 2, gs, bits, ng, stream, totals, 1);
            dq_split_by_width(small, 1, gs, bits, ng, stream8, totals, 2);
            CHECK(memcmp(stream, stream8, n * 2) == 0, "split uint8 gs %lld", (long long)gs);
            free(small);
            free(stream8);
            /* requantize equals dequantize(quantize(.)), also in place */
            float *p = xmalloc(n * 4), *d = xmalloc(n * 4), *r = xmalloc(n * 4);
            for (int64_t i = 0; i < n; ++i)
                p[i] = frand();
            dq_range rg;
            dq_range_all(p, n, &rg, 1);
            float range = (float)((double)rg.max - (double)rg.min);
            dq_quantize(p, n, gs, bits, rg.min, range, levels, 2, 2);
            dq_dequantize(levels, 2, n, gs, bits, rg.min, range, d, 2);
            dq_requantize(p, n, gs, bits, rg.min, range, r, 2);
            CHECK(memcmp(d, r, n * 4) == 0, "requantize gs %lld", (long long)gs);
            dq_requantize(p, n, gs, bits, rg.min, range, p, 2);
            CHECK(memcmp(d, p, n * 4) == 0, "requantize in place gs %lld", (long long)gs);
            free(p);
            free(d);
            free(r);
            free(bits);
            free(levels);
            free(back);
            free(stream);
        }
    /* stored bits: fast equals reference, NaN gives 0 */
    float t[7] = {0.0f, 1.0f, 0.5f, 0.4615385f, 0.999f, NAN, 0.0001f};
    uint8_t a[7], b[7];
    dq_stored_bits_ref(t, 7, 2.0f, 15.0f, 0.0f, a);
    dq_stored_bits(t, 7, 2.0f, 15.0f, 0.0f, b, 1);
    CHECK(memcmp(a, b, 7) == 0 && a[0] == 2 && a[1] == 15 && a[2] == 8 && a[5] == 0,
          "stored bits %d %d %d %d", a[0], a[1], a[2], a[5]);
    dq_stored_bits_ref(t, 7, 2.0f, 15.0f, -3.0f, a);
    CHECK(a[0] == 1, "stored bits clamp below: %d", a[0]);
}

/* Quantizing straight into packed lines gives the bytes of quantize, split
 * followed by pack_bits of each width's stream: group sizes that split
 * lines between chunks, groups split among chunks, widths that are rare
 * (lines shared by many chunks), all one width, a zero range, 1 to 3
 * threads. */
static void test_quantize_pack(void) {
    /* groups above DQ_CHUNK values are split among chunks */
    const int64_t group_sizes[] = {1, 3, 8, 64, 1000, DQ_CHUNK + 5, 2 * DQ_CHUNK - 3};
    const int64_t group_counts[] = {1, 3, 7, 300, 5000, 30000, 70000};
    for (int a = 0; a < 7; ++a)
        for (int b = 0; b < 7; ++b)
            for (int mix = 0; mix < 3; ++mix) {
                int64_t gs = group_sizes[a], ng = group_counts[b];
                if (gs * ng > 4 * DQ_CHUNK + 4099 && !(gs > DQ_CHUNK && ng <= 3))
                    continue;
                int64_t n = gs * ng;
                float *p = xmalloc(n * 4);
                uint8_t *bits = xmalloc(ng);
                for (int64_t i = 0; i < n; ++i)
                    p[i] = frand();
                for (int64_t g = 0; g < ng; ++g)
                    bits[g] = mix == 0 ? 8 : mix == 1 ? (uint8_t)(1 + lcg() % 15)
                                                      : (uint8_t)(lcg() % 97 == 0 ? 15 : 3);
                float range = mix == 2 && b == 1 ? 0.0f : 2.0f;
                /* the reference: quantize, split by width, pack each stream */
                int64_t totals[16], t2[16];
                int16_t *streams = xmalloc(n * 2), *levels = xmalloc(n * 2);
                dq_quantize(p, n, gs, bits, -1.0f, range, levels, 2, 2);
                CHECK(dq_split_by_width(levels, 2, gs, bits, ng, streams, totals, 2) == DQ_OK, "split");
                CHECK(dq_width_totals(bits, ng, gs, t2, 2) == DQ_OK &&
                          memcmp(totals, t2, sizeof t2) == 0, "width totals gs %lld", (long long)gs);
                uint64_t *want[16] = {0}, *got[16] = {0};
                int64_t offset = 0;
                for (int w = 0; w < 16; ++w) {
                    if (totals[w]) {
                        size_t words = (size_t)dq_pack_lines(totals[w]) * w * DQ_PACK_BLOCK;
                        want[w] = xmalloc(words * 8);
                        dq_pack_bits(streams + offset, totals[w], w, want[w], 2);
                    }
                    offset += totals[w];
                }
                for (int threads = 1; threads <= 3; ++threads) {
                    for (int w = 0; w < 16; ++w)
                        if (totals[w]) {
                            size_t words = (size_t)dq_pack_lines(totals[w]) * w * DQ_PACK_BLOCK;
                            got[w] = xmalloc(words * 8);
                            memset(got[w], 0xA5, words * 8); /* the kernel owns every byte */
                        }
                    CHECK(dq_quantize_pack(p, gs, bits, ng, -1.0f, range, got, threads) == DQ_OK,
                          "quantize pack");
                    int same = 1;
                    for (int w = 0; w < 16; ++w)
                        if (totals[w]) {
                            size_t words = (size_t)dq_pack_lines(totals[w]) * w * DQ_PACK_BLOCK;
                            same &= memcmp(got[w], want[w], words * 8) == 0;
                            free(got[w]);
                            got[w] = NULL;
                        }
                    CHECK(same, "quantize pack gs %lld groups %lld mix %d threads %d", (long long)gs,
                          (long long)ng, mix, threads);
                }
                /* and back: dequantizing from the packs equals dq_dequantize of
                 * the levels */
                {
                    int64_t lines[16];
                    const uint64_t *packs[16];
                    for (int w = 0; w < 16; ++w) {
                        lines[w] = totals[w] ? dq_pack_lines(totals[w]) : 0;
                        packs[w] = want[w];
                    }
                    float *d1 = xmalloc(n * 4), *d2 = xmalloc(n * 4);
                    dq_dequantize(levels, 2, n, gs, bits, -1.0f, range, d1, 2);
                    for (int threads = 1; threads <= 3; threads += 2) {
                        memset(d2, 0xff, n * 4);
                        CHECK(dq_dequantize_packed(packs, lines, gs, bits, ng, -1.0f, range, d2, threads) ==
                                      DQ_OK &&
                                  memcmp(d1, d2, n * 4) == 0,
                              "dequantize packed gs %lld groups %lld mix %d threads %d", (long long)gs,
                              (long long)ng, mix, threads);
                    }
                    /* a width's pack one line short is refused, out untouched */
                    int w = bits[ng - 1];
                    lines[w] -= 1;
                    memset(d2, 0xff, n * 4);
                    CHECK(dq_dequantize_packed(packs, lines, gs, bits, ng, -1.0f, range, d2, 2) ==
                                  DQ_ERR_PACK_SHORT &&
                              ((unsigned char *)d2)[0] == 0xff,
                          "short pack refused");
                    free(d1), free(d2);
                }
                for (int w = 0; w < 16; ++w)
                    free(want[w]);
                free(streams);
                free(levels);
                free(bits);
                free(p);
            }
}

static void test_pack_widths(void) {
    int64_t n = DQ_PACK_LINE * 3 + 77;
    uint8_t *w = xmalloc(n);
    int16_t *shifted = xmalloc(n * 2);
    for (int64_t i = 0; i < n; ++i) {
        w[i] = (uint8_t)(2 + lcg() % 14);
        shifted[i] = (int16_t)(w[i] - 2);
    }
    int64_t words = dq_pack_lines(n) * 4 * DQ_PACK_BLOCK;
    uint64_t *a = xmalloc(words * 8), *b = xmalloc(words * 8);
    dq_pack_bits_ref(shifted, n, 4, 0, dq_pack_lines(n), a);
    dq_pack_widths(w, n, 2, 4, b, 2);
    CHECK(memcmp(a, b, words * 8) == 0, "pack widths");
    free(w);
    free(shifted);
    free(a);
    free(b);
}

static void test_widths_from_stored(void) {
    int64_t n = 2 * DQ_CHUNK + 3, counts[16], total = 0;
    int16_t *stored = xmalloc(n * 2);
    uint8_t *w = xmalloc(n);
    for (int64_t i = 0; i < n; ++i)
        stored[i] = (int16_t)(i % 14); /* widths 2..15 with offset 2 */
    CHECK(dq_widths_from_stored(stored, n, 2, w, counts, 2) == -1, "valid widths");
    int ok = 1;
    for (int64_t i = 0; i < n; ++i)
        ok &= w[i] == i % 14 + 2;
    for (int k = 0; k < 16; ++k)
        total += counts[k];
    CHECK(ok && total == n && counts[0] == 0 && counts[1] == 0 && counts[2] > 0, "widths and counts");
    stored[DQ_CHUNK + 7] = 14; /* width 16 */
    stored[2 * DQ_CHUNK + 1] = -2; /* width 0 */
    CHECK(dq_widths_from_stored(stored, n, 2, w, counts, 2) == DQ_CHUNK + 7, "first bad width");
    free(stored);
    free(w);
}

static void test_validation_of_levels(void) {
    /* the first bad level over several parallel chunks */
    int64_t n = 3 * DQ_CHUNK + 17, gs = 8;
    uint8_t *lv = calloc(n, 1), *bits = xmalloc(n / gs + 1);
    for (int64_t g = 0; g < n / gs + 1; ++g)
        bits[g] = 3;
    CHECK(dq_check_levels(lv, 1, n - n % gs, gs, bits) == -1, "clean levels");
    lv[2 * DQ_CHUNK + 5] = 8;
    lv[DQ_CHUNK + 9] = 9;
    CHECK(dq_check_levels(lv, 1, n - n % gs, gs, bits) == DQ_CHUNK + 9, "first bad level");
    free(lv);
    free(bits);
}

int main(void) {
    test_philox_kat();
    test_noise_fill();
    test_noise_spec_accuracy();
    test_fused_simd_matches_portable();
    test_steps_avx512_match_c();
    test_madd_double_is_fma_for_the_gaussian();
    test_fused_madd_agrees();
    test_noise_hash_definition();
    test_noise_law_and_threads();
    test_range();
    test_first_index();
    test_quantize();
    test_bitpack();
    test_noise_forward_backward();
    test_extrema_shortcut();
    test_tie_counts_across_chunks();
    test_size();
    test_size_odd_sizes_and_nan();
    test_grouped_packing_and_requantize();
    test_validation_of_levels();
    test_widths_from_stored();
    test_pack_widths();
    test_quantize_pack();
    test_lsq_known_answer();
    test_lsq_bounds();
    test_lsq_fast_and_threads();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
