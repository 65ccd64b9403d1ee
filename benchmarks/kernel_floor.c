/* The floors the Python-level numbers sit on: per-value time of the noise
 * generator, the fused noise forward/backward, the steps from the logits and
 * the size penalty, next to
 * a memcpy of the same buffer, on 1 and 2 threads. Not a comparison with
 * diffq (benchmarks/compare.py is); it shows what a step cannot go below.
 *
 *   make -C csrc floor
 *   csrc/kernel_floor 1      (the noise paths capped at AVX2: dq_noise_simd)
 *   csrc/kernel_floor 2 l2   (2^16 values, in L2, one thread: the arithmetic alone)
 *
 * Each figure is the best of 7 runs over 2^24 values (of 300 over 2^16 in
 * the l2 mode, where one run is tens of microseconds and a shared
 * machine's noise is short), in ns per value. The l2 mode resolves a
 * change of a few percent in the kernels' arithmetic that the memory runs,
 * which move by 10% from run to run here, do not. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "diffq_c.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int runs = 7;

#define BEST(label, expr)                                                        \
    do {                                                                         \
        double best = 1e9;                                                       \
        for (int r = 0; r < runs; ++r) {                                         \
            double t0 = now();                                                   \
            expr;                                                                \
            double t = now() - t0;                                               \
            best = t < best ? t : best;                                          \
        }                                                                        \
        printf("%-36s %d thread%s %6.3f ns/value\n", label, threads, threads > 1 ? "s" : " ", \
               best * 1e9 / (double)n);                                          \
    } while (0)

static void copy_slices(float *dst, const float *src, int64_t n, int threads) {
    (void)threads;
#pragma omp parallel for num_threads(threads)
    for (int k = 0; k < 16; ++k)
        memcpy(dst + k * (n / 16), src + k * (n / 16), (size_t)(n / 16) * sizeof(float));
}

/* The steps from the logits alone, chunk by chunk as the noise kernels
 * compute them. */
static void steps_chunks(const dq_bits_param *prm, const float *logit, int64_t n, float *step,
                         float *dstep, int threads) {
    (void)threads;
#pragma omp parallel for num_threads(threads)
    for (int64_t c = 0; c < n / DQ_CHUNK; ++c)
        dq_logit_to_step_fast(prm, logit, c * DQ_CHUNK, DQ_CHUNK, step, dstep);
}

int main(int argc, char **argv) {
    if (argc > 1)
        printf("noise level %d (dq_noise_simd)\n", dq_noise_simd(atoi(argv[1])));
    const int in_l2 = argc > 2 && strcmp(argv[2], "l2") == 0;
    const int64_t n = (int64_t)1 << (in_l2 ? 16 : 24);
    if (in_l2) {
        runs = 300;
        printf("2^16 values (in L2), best of %d\n", runs);
    }
    float *p = malloc((size_t)n * 4), *logit = malloc((size_t)n * 4), *out = malloc((size_t)n * 4);
    float *grad_logit = malloc((size_t)n * 4), *grad = malloc((size_t)n * 4);
    if (!p || !logit || !out || !grad_logit || !grad)
        return 1;
    for (int64_t i = 0; i < n; ++i) {
        p[i] = (float)((i * 7919) % 1000) * 1e-3f;
        logit[i] = (float)(i % 1000) * 0.01f - 5.0f;
    }
    /* one smallest and one largest value, as in trained weights: the
     * backward then updates the incoming gradient at those two only */
    p[0] = -1.0f;
    p[n - 1] = 2.0f;
    /* faulted in once: the figures are compute and bandwidth */
    memset(out, 0, (size_t)n * 4);
    memset(grad_logit, 0, (size_t)n * 4);
    for (int64_t i = 0; i < n; ++i)
        grad[i] = (float)(i % 7) - 3.0f; /* the incoming gradient, updated in place */
    dq_bits_param prm = {DQ_PARAM_BITS, 2.0f, 15.0f, 0.0f, 0.0f};
    dq_range range;
    dq_size_stats stats;
    /* 2^16 values are one chunk: one thread's work */
    for (int threads = 1; threads <= (in_l2 ? 1 : 2); ++threads) {
        BEST("copy (memcpy in 16 slices)", copy_slices(out, p, n, threads));
        /* what a noise forward moves with no arithmetic: p read for its
         * range, then read again and the noisy weights written */
        BEST("range + copy (forward's traffic)",
             (dq_range_all(p, n, &range, threads), copy_slices(out, p, n, threads)));
        BEST("uniform noise", dq_noise_fill(DQ_NOISE_UNIFORM, 42, n, out, threads));
        BEST("gaussian noise", dq_noise_fill(DQ_NOISE_GAUSSIAN, 42, n, out, threads));
        BEST("noise forward, group_size 1", dq_noise_forward(&prm, p, n, logit, 1, 1, 42, out, &range, threads));
        /* with the size penalty's sum from the same sigmoids (what a
         * training forward followed by model_size() runs) */
        dq_noise_job job = {.p = p, .n = n, .logit = logit, .group_size = 1, .seed = 42, .noisy = out,
                            .with_size = 1};
        BEST("noise forward + size, group_size 1", dq_noise_forward_multi(&prm, 1, &job, 1, threads));
        BEST("noise forward, group_size 8", dq_noise_forward(&prm, p, n, logit, 8, 1, 42, out, &range, threads));
        BEST("noise backward, group_size 1",
             dq_noise_backward(&prm, grad, p, n, logit, 1, 1, 42, &range, grad, grad_logit, threads));
        const float size_scale = 1e-3f;
        BEST("noise backward + size, group_size 1",
             dq_noise_backward_sized(&prm, grad, p, n, logit, 1, 1, 42, &range, grad, grad_logit, &size_scale,
                                     threads));
        dq_noise_forward(&prm, p, n, logit, 8, 1, 42, out, &range, threads);
        BEST("noise backward, group_size 8",
             dq_noise_backward(&prm, grad, p, n, logit, 8, 1, 42, &range, grad, grad_logit, threads));
        /* at group_size 1 the steps cost more than the noise */
        BEST("steps, group_size 1", steps_chunks(&prm, logit, n, out, NULL, threads));
        BEST("steps and d(step), group_size 1", steps_chunks(&prm, logit, n, out, grad_logit, threads));
        BEST("size forward", dq_size_forward(&prm, logit, n, &stats, threads));
        BEST("size backward", dq_size_backward(&prm, logit, n, 1.0f, out, threads));
    }
    free(p);
    free(logit);
    free(out);
    free(grad_logit);
    free(grad);
    return 0;
}
