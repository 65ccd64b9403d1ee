/* The differentiable size penalty over the bit logits. */
#include "dq_internal.h"

void dq_size_forward_ref(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                         int64_t count, dq_size_stats *out) {
    double sum = 0;
    float top = -INFINITY;
    for (int64_t i = start; i < start + count; ++i) {
        float b = dq_logit_to_bits(prm, logit[i], NULL);
        sum += b;
        top = b > top ? b : top;
    }
    out->sum_bits = sum;
    out->max_bits = top;
}

DQ_INLINE void sigmoids(const float *restrict x, int64_t len, float *restrict out, const int fused) {
    for (int64_t j = 0; j < len; ++j)
        out[j] = dq_fast_sigmoid(x[j], fused);
}

/* Sum and max of the bits of a chunk, span by span through a buffer. In
 * the bits mode, bits = lo + (hi - lo) * t is non-decreasing in
 * t = sigmoid(logit): the buffer holds t and the bits follow from its sum
 * and max (0.71 -> 0.52 ns a logit on one thread). The noise forward at
 * group_size 1 fills the same spans with the sigmoids of its steps
 * (dq__size_acc), for the same bits. */
DQ_FAST
void dq_size_forward_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                              int64_t count, dq_size_stats *out) {
    dq__size_acc acc;
    dq__size_acc_init(&acc);
    const int affine = dq__size_affine(prm);
    for (int64_t off = 0; off < count; off += DQ_SIZE_SPAN) {
        int64_t len = DQ_MIN((int64_t)DQ_SIZE_SPAN, count - off);
        const float *restrict x = logit + start + off;
        if (affine)
            DQ_CALL_FUSED(sigmoids, x, len, dq__size_acc_next(&acc));
        else
            dq_logit_to_bits_fast(prm, x, 0, len, dq__size_acc_next(&acc), NULL);
        dq__size_acc_commit(&acc, len);
    }
    dq__size_acc_finish(&acc, prm, count, out);
}

void dq_size_backward_ref(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                          int64_t count, float scale, float *restrict grad) {
    for (int64_t i = start; i < start + count; ++i) {
        float dbits;
        dq_logit_to_bits(prm, logit[i], &dbits);
        grad[i] = scale * dbits;
    }
}

/* grad = scale * dbits/dlogit, or grad += that with `add` (a constant at
 * each call, so each caller gets its own loop): in one pass in the bits
 * mode (the same arithmetic as dq_logit_to_bits_fast's derivative, then
 * the scale), through a span of derivatives on the stack in the others */
DQ_INLINE void size_grad_bits_mode(const dq_bits_param *prm, const float *restrict logit,
                                   int64_t start, int64_t count, float scale,
                                   float *restrict grad, const int add, const int fused) {
    const float span = prm->max_bits - prm->min_bits;
    for (int64_t i = start; i < start + count; ++i) {
        float t = dq_fast_sigmoid(logit[i], fused);
        float term = (span * dq__sigmoid_slope(t, fused)) * scale;
        grad[i] = add ? grad[i] + term : term;
    }
}

DQ_INLINE void size_grad(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                         int64_t count, float scale, float *restrict grad, const int add) {
    if (prm->mode == DQ_PARAM_BITS) {
        DQ_CALL_FUSED(size_grad_bits_mode, prm, logit, start, count, scale, grad, add);
        return;
    }
    enum { SPAN = 1024 };
    float dbits[SPAN];
    for (int64_t off = 0; off < count; off += SPAN) {
        int64_t len = DQ_MIN((int64_t)SPAN, count - off);
        float *restrict out = grad + start + off;
        dq_logit_to_bits_fast(prm, logit + start + off, 0, len, NULL, dbits);
        for (int64_t j = 0; j < len; ++j) {
            float term = dbits[j] * scale;
            out[j] = add ? out[j] + term : term;
        }
    }
}

DQ_FAST
void dq_size_backward_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                               int64_t count, float scale, float *restrict grad) {
    size_grad(prm, logit, start, count, scale, grad, 0);
}

void dq_size_backward_add_ref(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                              int64_t count, float scale, float *restrict grad) {
    for (int64_t i = start; i < start + count; ++i) {
        float dbits;
        dq_logit_to_bits(prm, logit[i], &dbits);
        grad[i] += scale * dbits;
    }
}

DQ_FAST
void dq_size_backward_add_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                                   int64_t count, float scale, float *restrict grad) {
    size_grad(prm, logit, start, count, scale, grad, 1);
}

/* Chunk partial sums are combined in chunk order, so the total does not
 * depend on the thread count. */
void dq_size_forward(const dq_bits_param *prm, const float *restrict logit, int64_t n,
                     dq_size_stats *out, int nthreads) {
    enum { BATCH = 64 };
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    dq_size_stats parts[BATCH];
    double sum = 0;
    float top = -INFINITY;
    (void)nthreads;
    for (int64_t base = 0; base < chunks; base += BATCH) {
        int64_t m = DQ_MIN((int64_t)BATCH, chunks - base);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (m > 1)
        for (int64_t c = 0; c < m; ++c) {
            int64_t start = (base + c) * DQ_CHUNK;
            dq_size_forward_fast(prm, logit, start, DQ_MIN(DQ_CHUNK, n - start), &parts[c]);
        }
        for (int64_t c = 0; c < m; ++c) {
            sum += parts[c].sum_bits;
            top = parts[c].max_bits > top ? parts[c].max_bits : top;
        }
    }
    out->sum_bits = sum;
    out->max_bits = top;
}

void dq_size_backward(const dq_bits_param *prm, const float *restrict logit, int64_t n,
                      float scale, float *restrict grad, int nthreads) {
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK;
        int64_t len = DQ_MIN(DQ_CHUNK, n - start);
        dq_size_backward_fast(prm, logit, start, len, scale, grad);
    }
}
