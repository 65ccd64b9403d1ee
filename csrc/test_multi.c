/* Multi-tensor drivers (multi.c) against the single-tensor drivers they
 * must equal bit for bit, tensor by tensor, at any thread count: sizes
 * across chunk borders, group sizes 1, 8 and the whole tensor, a NaN that
 * must stop the noise forward before it writes anything. */
#include <math.h>
#include <string.h>

#include "diffq_c.h"

#define TEST_SEED 0x5EED0F3A17ull
#include "test_common.h"

/* sizes (multiples of 8) from one group to past three chunks */
static const int64_t SIZES[] = {8, 16, 24, 1024, 4096 + 8, DQ_CHUNK, DQ_CHUNK + 24, 3 * DQ_CHUNK + 8};
enum { NT = sizeof SIZES / sizeof SIZES[0] };
static const int64_t GROUPS[] = {1, 8, 0};
static const int THREADS[] = {1, 3};

static dq_bits_param bits_mode(void) {
    dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, logf(1.0f / 32767.0f), logf(1.0f / 3.0f)};
    return prm;
}

static float *random_floats(int64_t n, float scale) {
    float *x = xmalloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; ++i)
        x[i] = frand() * scale;
    return x;
}

static int64_t groups_of(int64_t n, int64_t gs) { return gs ? n / gs : 1; }

static int same_range(const dq_range *a, const dq_range *b) {
    return a->min == b->min && a->max == b->max && a->count_min == b->count_min &&
           a->count_max == b->count_max && a->nonfinite == b->nonfinite && a->first_min == b->first_min &&
           a->first_max == b->first_max;
}

static void test_derive_seed(void) {
    /* splitmix64's first output from state 0 */
    CHECK(dq_derive_seed(0, 0) == 0xE220A8397B1DCDAFull, "derive_seed(0, 0) = %llx",
          (unsigned long long)dq_derive_seed(0, 0));
    CHECK(dq_derive_seed(1, 0) != dq_derive_seed(0, 1) && dq_derive_seed(7, 3) != dq_derive_seed(7, 4),
          "seeds of neighbours differ");
}

static void test_noise_forward_backward_multi(void) {
    const dq_bits_param prm = bits_mode();
    for (int gi = 0; gi < 3; ++gi) {
        const int64_t gs = GROUPS[gi];
        float *p[NT], *logit[NT], *grad[NT];
        for (int t = 0; t < NT; ++t) {
            p[t] = random_floats(SIZES[t], 1.0f);
            logit[t] = random_floats(groups_of(SIZES[t], gs), 3.0f);
            grad[t] = random_floats(SIZES[t], 1.0f);
            grad[t][1] = -0.0f; /* stays -0.0, in place or not */
            if (t % 3 == 0) /* ties at the minimum: the backward scans p for them */
                p[t][2] = p[t][SIZES[t] - 1] = -2.0f;
        }
        const uint64_t seed = 0xABCDEF0123ull + (uint64_t)gi;
        for (int kind = 0; kind < 2; ++kind)
            for (int th = 0; th < 2; ++th)
            for (int fuse = 0; fuse < 3; ++fuse) {
                /* fuse 1: the size term added to the noise's gradient; 2:
                 * the size term alone on every other tensor (grad NULL) */
                const float size_scale = 0.37f;
                dq_noise_job jobs[NT];
                dq_noise_grad_job gjobs[NT];
                float *noisy[NT], *grad_p[NT], *grad_logit[NT], *g_of[NT];
                for (int t = 0; t < NT; ++t) {
                    noisy[t] = xmalloc((size_t)SIZES[t] * sizeof(float));
                    jobs[t] = (dq_noise_job){.p = p[t], .n = SIZES[t], .logit = logit[t], .group_size = gs,
                                             .seed = dq_derive_seed(seed, t), .noisy = noisy[t]};
                }
                CHECK(dq_noise_forward_multi(&prm, kind, jobs, NT, THREADS[th]) == DQ_OK, "forward runs");
                for (int t = 0; t < NT; ++t) {
                    const int64_t n = SIZES[t], ng = groups_of(n, gs);
                    float *single = xmalloc((size_t)n * sizeof(float));
                    dq_range r;
                    dq_noise_forward(&prm, p[t], n, logit[t], gs, kind, dq_derive_seed(seed, t), single, &r, 1);
                    CHECK(memcmp(single, noisy[t], (size_t)n * sizeof(float)) == 0,
                          "noisy of tensor %d (n %lld, gs %lld, kind %d, %d threads)", t, (long long)n,
                          (long long)gs, kind, THREADS[th]);
                    CHECK(same_range(&r, &jobs[t].range), "range of tensor %d", t);
                    /* backward: half the tensors update the gradient in place */
                    float *g = xmalloc((size_t)n * sizeof(float));
                    memcpy(g, grad[t], (size_t)n * sizeof(float));
                    g_of[t] = g;
                    grad_p[t] = t % 2 ? g : xmalloc((size_t)n * sizeof(float));
                    grad_logit[t] = xmalloc((size_t)ng * sizeof(float));
                    gjobs[t] = (dq_noise_grad_job){g, p[t], n, logit[t], gs, dq_derive_seed(seed, t),
                                                   jobs[t].range, grad_p[t], grad_logit[t], fuse > 0,
                                                   size_scale, ng};
                    if (fuse == 2 && t % 2 == 0)
                        gjobs[t].grad = NULL;
                    free(single);
                }
                CHECK(dq_noise_backward_multi(&prm, kind, gjobs, NT, THREADS[th]) == DQ_OK, "backward runs");
                for (int t = 0; t < NT; ++t) {
                    const int64_t n = SIZES[t], ng = groups_of(n, gs);
                    float *ref_p = xmalloc((size_t)n * sizeof(float)), *ref_l = xmalloc((size_t)ng * sizeof(float));
                    const int noise_too = gjobs[t].grad != NULL;
                    if (noise_too) {
                        dq_noise_backward(&prm, grad[t], p[t], n, logit[t], gs, kind, dq_derive_seed(seed, t),
                                          &jobs[t].range, ref_p, ref_l, 1);
                        CHECK(memcmp(ref_p, grad_p[t], (size_t)n * sizeof(float)) == 0, "grad_p of tensor %d", t);
                    }
                    if (fuse) {
                        /* what autograd gives adding the size penalty's own gradient */
                        float *size_l = xmalloc((size_t)ng * sizeof(float));
                        dq_size_backward(&prm, logit[t], ng, size_scale, size_l, 1);
                        for (int64_t i = 0; i < ng; ++i)
                            ref_l[i] = noise_too ? ref_l[i] + size_l[i] : size_l[i];
                        free(size_l);
                    }
                    CHECK(memcmp(ref_l, grad_logit[t], (size_t)ng * sizeof(float)) == 0,
                          "grad_logit of tensor %d (gs %lld, %d threads, fuse %d)", t, (long long)gs,
                          THREADS[th], fuse);
                    free(ref_p);
                    free(ref_l);
                    if (grad_p[t] != g_of[t])
                        free(grad_p[t]);
                    free(g_of[t]);
                    free(grad_logit[t]);
                    free(noisy[t]);
                }
            }
        for (int t = 0; t < NT; ++t) {
            free(p[t]);
            free(logit[t]);
            free(grad[t]);
        }
    }
}

static void test_noise_forward_multi_refuses_nan_whole(void) {
    const dq_bits_param prm = bits_mode();
    float *p[3], *logit[3], *noisy[3];
    dq_noise_job jobs[3];
    for (int t = 0; t < 3; ++t) {
        p[t] = random_floats(SIZES[t + 4], 1.0f);
        logit[t] = random_floats(SIZES[t + 4] / 8, 1.0f);
        noisy[t] = xmalloc((size_t)SIZES[t + 4] * sizeof(float));
        for (int64_t i = 0; i < SIZES[t + 4]; ++i)
            noisy[t][i] = 77.0f;
        jobs[t] = (dq_noise_job){.p = p[t], .n = SIZES[t + 4], .logit = logit[t], .group_size = 8, .seed = 1,
                                 .noisy = noisy[t]};
    }
    p[1][SIZES[5] - 3] = NAN;
    p[1][5] = INFINITY;
    CHECK(dq_noise_forward_multi(&prm, DQ_NOISE_GAUSSIAN, jobs, 3, 2) == DQ_ERR_NONFINITE, "NaN refused");
    CHECK(jobs[0].range.nonfinite == 0 && jobs[1].range.nonfinite == 2 && jobs[2].range.nonfinite == 0,
          "non-finite counts %lld %lld %lld", (long long)jobs[0].range.nonfinite,
          (long long)jobs[1].range.nonfinite, (long long)jobs[2].range.nonfinite);
    int untouched = 1;
    for (int t = 0; t < 3; ++t)
        for (int64_t i = 0; i < SIZES[t + 4]; ++i)
            untouched &= noisy[t][i] == 77.0f;
    CHECK(untouched, "no noisy weight written when one tensor is refused");
    for (int t = 0; t < 3; ++t) {
        free(p[t]);
        free(logit[t]);
        free(noisy[t]);
    }
}

static void test_size_multi(void) {
    const dq_bits_param prm = bits_mode();
    const float *logits[NT];
    float *grads[NT];
    float scales[NT];
    dq_size_stats stats[NT];
    for (int t = 0; t < NT; ++t) {
        logits[t] = random_floats(SIZES[t], 4.0f);
        grads[t] = xmalloc((size_t)SIZES[t] * sizeof(float));
        scales[t] = 0.25f * (float)(t + 1);
    }
    for (int th = 0; th < 2; ++th) {
        CHECK(dq_size_forward_multi(&prm, logits, SIZES, NT, stats, THREADS[th]) == DQ_OK, "size forward runs");
        CHECK(dq_size_backward_multi(&prm, logits, SIZES, scales, grads, NT, THREADS[th]) == DQ_OK,
              "size backward runs");
        for (int t = 0; t < NT; ++t) {
            dq_size_stats ref;
            dq_size_forward(&prm, logits[t], SIZES[t], &ref, 1);
            CHECK(ref.sum_bits == stats[t].sum_bits && ref.max_bits == stats[t].max_bits, "size stats of %d", t);
            float *g = xmalloc((size_t)SIZES[t] * sizeof(float));
            dq_size_backward(&prm, logits[t], SIZES[t], scales[t], g, 1);
            CHECK(memcmp(g, grads[t], (size_t)SIZES[t] * sizeof(float)) == 0, "size gradient of %d", t);
            free(g);
        }
    }
    for (int t = 0; t < NT; ++t) {
        free((void *)logits[t]);
        free(grads[t]);
    }
}

static void test_quantize_multi(void) {
    for (int gi = 0; gi < 3; ++gi) {
        const int64_t gs = GROUPS[gi];
        dq_quant_job jobs[NT];
        float *p[NT], *t_[NT];
        for (int t = 0; t < NT; ++t) {
            const int64_t ng = groups_of(SIZES[t], gs);
            p[t] = random_floats(SIZES[t], 2.0f);
            t_[t] = xmalloc((size_t)ng * sizeof(float));
            for (int64_t g = 0; g < ng; ++g)
                t_[t][g] = (frand() + 1.0f) / 2.0f;
            jobs[t] = (dq_quant_job){p[t], SIZES[t], gs, t_[t], xmalloc((size_t)ng), xmalloc((size_t)SIZES[t] * 4),
                                     0, 0, 0, 0};
        }
        t_[2][0] = NAN; /* its group gets bits 0, counted */
        for (int th = 0; th < 2; ++th) {
            CHECK(dq_quantize_prepare_multi(2.0f, 15.0f, 0.5f, jobs, NT, THREADS[th]) == DQ_OK, "prepare runs");
            float *out2 = jobs[2].out;
            jobs[2].out = NULL; /* skipped by requantize */
            CHECK(dq_requantize_multi(jobs, NT, THREADS[th]) == DQ_OK, "requantize runs");
            for (int t = 0; t < NT; ++t) {
                const int64_t n = SIZES[t], ng = groups_of(n, gs);
                uint8_t *bits = xmalloc((size_t)ng);
                dq_stored_bits(t_[t], ng, 2.0f, 15.0f, 0.5f, bits, 1);
                CHECK(memcmp(bits, jobs[t].bits, (size_t)ng) == 0, "stored bits of %d (gs %lld)", t, (long long)gs);
                dq_range r;
                dq_range_all(p[t], n, &r, 1);
                CHECK(r.min == jobs[t].min && r.max == jobs[t].max && jobs[t].nonfinite == 0, "range of %d", t);
                CHECK(jobs[t].nan_bits == (t == 2), "NaN bits of %d: %lld", t, (long long)jobs[t].nan_bits);
                if (t != 2) {
                    float *ref = xmalloc((size_t)n * sizeof(float));
                    dq_requantize(p[t], n, gs, bits, r.min, (float)((double)r.max - (double)r.min), ref, 1);
                    CHECK(memcmp(ref, jobs[t].out, (size_t)n * sizeof(float)) == 0, "requantized %d (gs %lld)", t,
                          (long long)gs);
                    free(ref);
                }
                free(bits);
            }
            jobs[2].out = out2;
        }
        for (int t = 0; t < NT; ++t) {
            free(p[t]);
            free(t_[t]);
            free(jobs[t].bits);
            free(jobs[t].out);
        }
    }
}

/* The size statistics the noise forward gives with_size: at group_size 1
 * from the sigmoids of its steps, else from a pass of their own; either way
 * bit for bit dq_size_forward's, at every noise level, FMA setting and
 * thread count, for odd sizes across span and chunk borders, NaN and
 * saturating logits, and the modes where the size is not affine in t. The
 * noisy weights do not change with it. */
static void test_size_with_noise_forward(void) {
    static const int64_t sizes[] = {1, 3, 17, 255, 257, 1023, 1025, 4099, DQ_CHUNK + 5, 2 * DQ_CHUNK + 1027};
    enum { NS = sizeof sizes / sizeof sizes[0] };
    const dq_bits_param modes[3] = {bits_mode(),
                                    {DQ_PARAM_BITS, 15.0f, 2.0f, 0.0f, 0.0f},
                                    {DQ_PARAM_NOISE, 2.0f, 15.0f, logf(1.0f / 32767.0f), logf(1.0f / 3.0f)}};
    const int best = dq_noise_simd(-1), fma_best = dq_fused_madd(-1);
    for (int gi = 0; gi < 3; ++gi) {
        const int64_t gs = GROUPS[gi];
        float *p[NS], *logit[NS], *noisy[NS], *plain[NS];
        for (int t = 0; t < NS; ++t) {
            const int64_t n = gs > 1 ? sizes[t] * gs : sizes[t], ng = groups_of(n, gs);
            p[t] = random_floats(n, 1.0f);
            logit[t] = random_floats(ng, 6.0f);
            noisy[t] = xmalloc((size_t)n * sizeof(float));
            plain[t] = xmalloc((size_t)n * sizeof(float));
        }
        if (gs) {
            logit[4][100] = NAN;
            logit[7][3] = 200.0f;
            logit[7][4] = -200.0f;
            logit[8][DQ_CHUNK] = INFINITY;
        }
        for (int m = 0; m < 3; ++m)
            for (int level = best; level >= 0; --level)
                for (int fma = fma_best; fma >= 0; --fma)
                    for (int th = 0; th < 2; ++th) {
                        dq_noise_simd(level);
                        dq_fused_madd(fma);
                        dq_noise_job jobs[NS], without[NS];
                        for (int t = 0; t < NS; ++t) {
                            const int64_t n = gs > 1 ? sizes[t] * gs : sizes[t];
                            jobs[t] = (dq_noise_job){.p = p[t], .n = n, .logit = logit[t], .group_size = gs,
                                                     .seed = 99 + (uint64_t)t, .noisy = noisy[t],
                                                     .with_size = t % 3 != 1};
                            without[t] = jobs[t];
                            without[t].noisy = plain[t];
                            without[t].with_size = 0;
                        }
                        CHECK(dq_noise_forward_multi(&modes[m], DQ_NOISE_GAUSSIAN, jobs, NS, THREADS[th]) == DQ_OK &&
                                  dq_noise_forward_multi(&modes[m], DQ_NOISE_GAUSSIAN, without, NS, THREADS[th]) ==
                                      DQ_OK,
                              "forwards run");
                        for (int t = 0; t < NS; ++t) {
                            const int64_t n = jobs[t].n, ng = groups_of(n, gs);
                            CHECK(memcmp(noisy[t], plain[t], (size_t)n * sizeof(float)) == 0,
                                  "noisy the same with the size (tensor %d, gs %lld)", t, (long long)gs);
                            if (!jobs[t].with_size)
                                continue;
                            dq_size_stats ref;
                            dq_size_forward(&modes[m], logit[t], ng, &ref, 1);
                            const dq_size_stats got = jobs[t].size;
                            int same = (got.sum_bits == ref.sum_bits || (isnan(got.sum_bits) && isnan(ref.sum_bits))) &&
                                       got.max_bits == ref.max_bits;
                            CHECK(same && (t != 4 || gs != 1 || isnan(got.sum_bits)),
                                  "size of tensor %d: %.17g / %g, dq_size_forward %.17g / %g (gs %lld, mode %d, "
                                  "level %d, fma %d, %d threads)",
                                  t, got.sum_bits, (double)got.max_bits, ref.sum_bits, (double)ref.max_bits,
                                  (long long)gs, m, level, fma, THREADS[th]);
                        }
                    }
        dq_noise_simd(-1);
        dq_fused_madd(-1);
        for (int t = 0; t < NS; ++t) {
            free(p[t]);
            free(logit[t]);
            free(noisy[t]);
            free(plain[t]);
        }
    }
}

int main(void) {
    test_derive_seed();
    test_noise_forward_backward_multi();
    test_noise_forward_multi_refuses_nan_whole();
    test_size_with_noise_forward();
    test_size_multi();
    test_quantize_multi();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
