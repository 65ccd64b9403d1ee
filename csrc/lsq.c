/* Learnt step size quantization (LSQ, Esser et al. 2019) of weights: the
 * forward (quantized values and integer indexes) and the backward of the
 * straight-through estimator, for the weights and for the scale. */
#include "dq_internal.h"

float dq_lsq_effective_scale(float scale, float grad_scale) {
    /* The gradient-scaling trick evaluates (s - s*g) + s*g in float32; its
     * value can be one ulp away from s, and diffq quantizes with that value. */
    float scaled = scale * grad_scale;
    float rest = scale - scaled;
    return rest + scaled;
}

DQ_INLINE float lsq_low(int bits) { return -(float)(1 << (bits - 1)); }
DQ_INLINE float lsq_high(int bits) { return (float)((1 << (bits - 1)) - 1); }

/* clamp that lets NaN through, as torch.clamp does */
DQ_INLINE float lsq_clamp(float c, float low, float high) {
    return c < low ? low : (c > high ? high : c);
}

int64_t dq_lsq_forward_ref(const float *restrict x, float scale, int bits, int64_t start,
                           int64_t count, float *restrict q, int16_t *restrict index) {
    assert(bits >= 1 && bits <= 15);
    const float low = lsq_low(bits), high = lsq_high(bits);
    int64_t nan_count = 0;
    for (int64_t i = start; i < start + count; ++i) {
        float level = rintf(lsq_clamp(x[i] / scale, low, high));
        if (q)
            q[i] = level * scale;
        if (level != level) {
            ++nan_count;
            level = 0.0f;
        }
        if (index)
            index[i] = (int16_t)(int32_t)level;
    }
    return nan_count;
}

DQ_FAST
int64_t dq_lsq_forward_fast(const float *restrict x, float scale, int bits, int64_t start,
                            int64_t count, float *restrict q, int16_t *restrict index) {
    assert(bits >= 1 && bits <= 15);
    const float low = lsq_low(bits), high = lsq_high(bits);
    int64_t nan_count = 0;
    const int64_t end = start + count;
    /* one branch-free loop per output combination, so each vectorizes */
    if (q && index) {
        for (int64_t i = start; i < end; ++i) {
            float level = rintf(lsq_clamp(x[i] / scale, low, high));
            q[i] = level * scale;
            int nan = level != level;
            nan_count += nan;
            index[i] = (int16_t)(int32_t)(nan ? 0.0f : level);
        }
    } else if (q) {
        for (int64_t i = start; i < end; ++i) {
            float level = rintf(lsq_clamp(x[i] / scale, low, high));
            nan_count += level != level;
            q[i] = level * scale;
        }
    } else if (index) {
        for (int64_t i = start; i < end; ++i) {
            float level = rintf(lsq_clamp(x[i] / scale, low, high));
            int nan = level != level;
            nan_count += nan;
            index[i] = (int16_t)(int32_t)(nan ? 0.0f : level);
        }
    }
    return nan_count;
}

int64_t dq_lsq_forward(const float *restrict x, int64_t n, float scale, int bits,
                       float *restrict q, int16_t *restrict index, int nthreads) {
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    int64_t nan_count = 0;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1) \
    reduction(+ : nan_count)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK;
        nan_count += dq_lsq_forward_fast(x, scale, bits, start, DQ_MIN(DQ_CHUNK, n - start), q, index);
    }
    return nan_count;
}

/* Whether c counts as inside [low, high] for the gradient: strictly inside
 * always; on a bound where `bounds` says so (DQ_LSQ_LOW_INSIDE,
 * DQ_LSQ_HIGH_INSIDE). NaN is outside. */
DQ_INLINE int lsq_inside(float c, float low, float high, const int bounds) {
    return (c > low || ((bounds & DQ_LSQ_LOW_INSIDE) && c == low)) &&
           (c < high || ((bounds & DQ_LSQ_HIGH_INSIDE) && c == high));
}

double dq_lsq_backward_ref(const float *restrict x, const float *restrict grad, float scale,
                           int bits, int bounds, int64_t start, int64_t count,
                           float *restrict grad_x) {
    assert(bits >= 1 && bits <= 15);
    assert((bounds & ~(DQ_LSQ_LOW_INSIDE | DQ_LSQ_HIGH_INSIDE)) == 0);
    const float low = lsq_low(bits), high = lsq_high(bits);
    double acc = 0.0;
    for (int64_t i = start; i < start + count; ++i) {
        float c = x[i] / scale;
        float clamped = lsq_clamp(c, low, high);
        int inside = lsq_inside(c, low, high, bounds);
        /* d(index * s)/ds through c = x / s: round(c) - c inside (exact in
         * float32), the bound itself outside, NaN for NaN c */
        float term = inside ? rintf(clamped) - c : rintf(clamped);
        acc += (double)grad[i] * (double)term;
        if (grad_x)
            grad_x[i] = inside ? grad[i] : 0.0f;
    }
    return acc;
}

/* dq_lsq_backward_fast's body for one value of `bounds`, so that each
 * instance's loops vectorize without a test on it per element. */
DQ_INLINE double lsq_backward_loops(const float *restrict x, const float *restrict grad,
                                    float scale, int bits, const int bounds, int64_t start,
                                    int64_t count, float *restrict grad_x) {
    const float low = lsq_low(bits), high = lsq_high(bits);
    /* Eight lanes of double partial sums in a fixed order: the result does
     * not depend on the ISA clone, only on (start, count). */
    double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float *restrict xs = x + start;
    const float *restrict gs = grad + start;
    float *restrict gx = grad_x ? grad_x + start : NULL;
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        for (int k = 0; k < 8; ++k) {
            float c = xs[i + k] / scale;
            float clamped = lsq_clamp(c, low, high);
            int inside = lsq_inside(c, low, high, bounds);
            float term = rintf(clamped) - (inside ? c : 0.0f);
            lanes[k] += (double)gs[i + k] * (double)term;
        }
    }
    double acc = dq_lsq_backward_ref(x, grad, scale, bits, bounds, start + i, count - i, NULL);
    for (int k = 0; k < 8; ++k)
        acc += lanes[k];
    if (gx) {
        for (int64_t j = 0; j < count; ++j) {
            float c = xs[j] / scale;
            gx[j] = lsq_inside(c, low, high, bounds) ? gs[j] : 0.0f;
        }
    }
    return acc;
}

DQ_FAST
double dq_lsq_backward_fast(const float *restrict x, const float *restrict grad, float scale,
                            int bits, int bounds, int64_t start, int64_t count,
                            float *restrict grad_x) {
    assert(bits >= 1 && bits <= 15);
    switch (bounds) {
    case DQ_LSQ_LOW_INSIDE | DQ_LSQ_HIGH_INSIDE:
        return lsq_backward_loops(x, grad, scale, bits, DQ_LSQ_LOW_INSIDE | DQ_LSQ_HIGH_INSIDE,
                                  start, count, grad_x);
    case 0:
        return lsq_backward_loops(x, grad, scale, bits, 0, start, count, grad_x);
    default: /* one bound inside: no torch has it, so no instance of its own */
        return lsq_backward_loops(x, grad, scale, bits, bounds, start, count, grad_x);
    }
}

float dq_lsq_backward(const float *restrict x, const float *restrict grad, int64_t n, float scale,
                      int bits, int bounds, float grad_scale, float *restrict grad_x, int nthreads) {
    enum { BATCH = 64 };
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    double parts[BATCH];
    double total = 0.0;
    (void)nthreads;
    /* partial sums combined in chunk order: the same bits for any thread count */
    for (int64_t base = 0; base < chunks; base += BATCH) {
        int64_t m = DQ_MIN((int64_t)BATCH, chunks - base);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (m > 1)
        for (int64_t c = 0; c < m; ++c) {
            int64_t start = (base + c) * DQ_CHUNK;
            parts[c] = dq_lsq_backward_fast(x, grad, scale, bits, bounds, start,
                                            DQ_MIN(DQ_CHUNK, n - start), grad_x);
        }
        for (int64_t c = 0; c < m; ++c)
            total += parts[c];
    }
    return (float)((double)grad_scale * total);
}
