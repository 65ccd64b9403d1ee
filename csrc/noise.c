/* Pseudo quantization noise: bits and step from logits, noisy weights and
 * their gradients. */
#include <stdlib.h>

#include "noise_gen.h"

#define LN2 0.69314718055994530942f

#if DQ_X86_AVX512
#define DQ_AVX512_KERNEL __attribute__((target("avx512f,avx512dq,avx512vl,popcnt")))
#endif

float dq_logit_to_bits(const dq_bits_param *prm, float logit, float *dbits) {
    float t = 1.0f / (1.0f + expf(-logit));
    float one_minus_t = 1.0f - t;
    float bits, slope;
    if (prm->mode == DQ_PARAM_NOISE) {
        float noise_scale = expf(t * prm->log_min_noise + one_minus_t * prm->log_max_noise);
        bits = log2f(1.0f + 1.0f / noise_scale);
        slope = -(prm->log_min_noise - prm->log_max_noise) / (LN2 * (1.0f + noise_scale));
    } else {
        bits = prm->max_bits * t + one_minus_t * prm->min_bits;
        slope = prm->max_bits - prm->min_bits;
    }
    if (dbits)
        *dbits = slope * (t * one_minus_t);
    return bits;
}

void dq_logit_to_step_ref(const dq_bits_param *prm, const float *restrict logit, int64_t n,
                          float *restrict bits, float *restrict step, float *restrict dstep) {
    for (int64_t i = 0; i < n; ++i) {
        float dbits;
        float b = dq_logit_to_bits(prm, logit[i], &dbits);
        /* the step as 1 / (2^bits - 1), also in the noise mode, as diffq does */
        float s = 1.0f / (exp2f(b) - 1.0f);
        if (bits)
            bits[i] = b;
        if (step)
            step[i] = s;
        if (dstep)
            dstep[i] = -LN2 * s * (1.0f + s) * dbits;
    }
}

/* ---- fast bits and step: branch-free exp2 so the loops vectorize; each
 * loop twice, with FMA instructions and without (dq_madd) */

/* 2^bits of bits = hi * t + (1 - t) * lo, t in [0, 1]: without the clamp
 * when lo and hi leave no way out of the exponent's range (`bounded`) */
DQ_INLINE float exp2_of_bits(float bits, const int bounded, const int fused) {
    return bounded ? dq__exp2_in_range(bits, fused) : dq_fast_exp2f(bits, fused);
}

/* t = sigmoid(logit) into *t_out, and the step 1 / (2^bits - 1) of
 * bits = lo + (hi - lo) t: one multiply-add where the bits are bounded (hi - lo
 * is then exact and finite), hi t + (1 - t) lo elsewhere. The multiply-add
 * is three operations fewer a vector (with the sigmoid's single multiply,
 * 10% off the steps, tenth session); it moved the bits by up to one unit
 * of their last place, the step by up to 6.6e-7 relative, which nothing
 * specifies. */
DQ_INLINE float step_of_logit(float logit, float lo, float hi, float *t_out, const int bounded,
                              const int fused) {
    const float t = dq_fast_sigmoid(logit, fused);
    *t_out = t;
    const float bits = bounded ? dq_madd(hi - lo, t, lo, fused) : hi * t + (1.0f - t) * lo;
    return 1.0f / (exp2_of_bits(bits, bounded, fused) - 1.0f);
}

/* d(step)/d(logit) from the step and t: -ln2 span s (1 + s) t (1 - t),
 * s (1 + s) as s s + s and t (1 - t) by dq__sigmoid_slope (one
 * multiply-add each with FMA: four vector operations a step instead of
 * seven) */
DQ_INLINE float dstep_of(float s, float t, float span, const int fused) {
    return ((-LN2 * span) * dq_madd(s, s, s, fused)) * dq__sigmoid_slope(t, fused);
}

/* One loop per set of outputs (a store under a condition would keep the
 * compiler from vectorizing): steps, d(step) and the sigmoids t, any of
 * them NULL. */
DQ_INLINE void steps_loops(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                           int64_t count, float *restrict step, float *restrict dstep,
                           float *restrict sig, const int bounded, const int fused) {
    const float lo = prm->min_bits, hi = prm->max_bits, span = hi - lo;
    const int64_t end = start + count;
    float t;
    if (step && dstep && sig) {
        for (int64_t i = start; i < end; ++i) {
            float s = step_of_logit(logit[i], lo, hi, &t, bounded, fused);
            step[i] = s;
            dstep[i] = dstep_of(s, t, span, fused);
            sig[i] = t;
        }
    } else if (step && dstep) {
        for (int64_t i = start; i < end; ++i) {
            float s = step_of_logit(logit[i], lo, hi, &t, bounded, fused);
            step[i] = s;
            dstep[i] = dstep_of(s, t, span, fused);
        }
    } else if (step && sig) {
        for (int64_t i = start; i < end; ++i) {
            step[i] = step_of_logit(logit[i], lo, hi, &t, bounded, fused);
            sig[i] = t;
        }
    } else if (step) {
        for (int64_t i = start; i < end; ++i)
            step[i] = step_of_logit(logit[i], lo, hi, &t, bounded, fused);
    } else if (dstep) {
        for (int64_t i = start; i < end; ++i) {
            float s = step_of_logit(logit[i], lo, hi, &t, bounded, fused);
            dstep[i] = dstep_of(s, t, span, fused);
        }
    }
}

/* |bits| <= 100 (rounding cannot take a blend of the two past either)
 * keeps 2^bits in the unclamped exp2's range: 5% off the steps */
DQ_INLINE int bits_bounded(const dq_bits_param *prm) {
    return fabsf(prm->min_bits) <= 100.0f && fabsf(prm->max_bits) <= 100.0f;
}

#if DQ_X86_AVX512
/* ---- steps_loops (bounded, fused) with AVX-512 intrinsics
 *
 * The same operations in the same order, so the same bits (test_kernels
 * holds them equal, NaN, infinite and clamped logits included), on four
 * vectors at a time. A step is a chain of two exp2 and two divisions,
 * ~130 cycles long: vector by vector, as the compiler writes the C loop,
 * the scheduler fills with uops that wait on it; four chains side by side
 * keep the divider and the FMA ports busy: 15% off the steps alone (0.60 ->
 * 0.51 ns a value on one thread, in L1). Four vectors are a tile, so at
 * group_size 1 the AVX-512 tile loops compute each tile's steps in
 * registers (steps4), with no span buffer to fill, scale and read back:
 * with that, 5-8% off the forward and backward there. Two differences in
 * form only:
 * - the exponent goes in by a scalef of the rounded integer, equal to the
 *   C's integer add wherever the result is normal: always, after the
 *   sigmoid's clamp to [-125, 126] and with bits within +-100;
 * - the clamp is max(-125, a) then min(126, .), which pass a NaN a through
 *   (an x86 max or min returns its second operand when either is NaN), so
 *   the C's select that puts it back is not needed.
 * Replacing the divisions by a reciprocal estimate and a Newton step was
 * measured too: no faster, and other bits. */
enum { STEPS_WAY = 4 };
_Static_assert(STEPS_WAY * 16 == TILE, "steps4 computes one tile's steps");

DQ_AVX512_KERNEL static inline __attribute__((always_inline)) void exp2_core16(__m512 x[STEPS_WAY]) {
    const __m512 magic = _mm512_set1_ps(DQ__ROUND_MAGIC);
    __m512 whole[STEPS_WAY], f[STEPS_WAY], p[STEPS_WAY];
    for (int k = 0; k < STEPS_WAY; ++k)
        whole[k] = _mm512_sub_ps(_mm512_add_ps(x[k], magic), magic);
    for (int k = 0; k < STEPS_WAY; ++k)
        f[k] = _mm512_sub_ps(x[k], whole[k]);
    for (int k = 0; k < STEPS_WAY; ++k)
        p[k] = _mm512_fmadd_ps(_mm512_set1_ps(DQ__EXP2_C5), f[k], _mm512_set1_ps(DQ__EXP2_C4));
    const float coef[] = {DQ__EXP2_C3, DQ__EXP2_C2, DQ__EXP2_C1, DQ__EXP2_C0};
    for (int c = 0; c < 4; ++c)
        for (int k = 0; k < STEPS_WAY; ++k)
            p[k] = _mm512_fmadd_ps(p[k], f[k], _mm512_set1_ps(coef[c]));
    for (int k = 0; k < STEPS_WAY; ++k)
        x[k] = _mm512_scalef_ps(p[k], whole[k]);
}

/* Lanes [0, n) of a 16-lane mask. */
DQ_INLINE __mmask16 lanes_upto(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* The masks of four vectors of sixteen from `left` values on. */
DQ_AVX512_KERNEL static inline __attribute__((always_inline)) void masks4(int64_t left, __mmask16 m[STEPS_WAY]) {
    for (int k = 0; k < STEPS_WAY; ++k)
        m[k] = lanes_upto(left - 16 * k);
}

/* The steps s and sigmoids t of the logits at x under masks m (zeros past
 * them, no address formed there). */
DQ_AVX512_KERNEL static inline __attribute__((always_inline)) void steps4(
    const float *x, const __mmask16 m[STEPS_WAY], __m512 lo, __m512 hi, __m512 t[STEPS_WAY],
    __m512 s[STEPS_WAY]) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 a[STEPS_WAY];
    for (int k = 0; k < STEPS_WAY; ++k) {
        const __m512 v = m[k] ? _mm512_maskz_loadu_ps(m[k], x + 16 * k) : _mm512_setzero_ps();
        a[k] = _mm512_mul_ps(v, _mm512_set1_ps(-DQ__LOG2E));
        a[k] = _mm512_min_ps(_mm512_set1_ps(126.0f), _mm512_max_ps(_mm512_set1_ps(-125.0f), a[k]));
    }
    exp2_core16(a);
    for (int k = 0; k < STEPS_WAY; ++k)
        t[k] = _mm512_div_ps(one, _mm512_add_ps(one, a[k]));
    const __m512 span = _mm512_sub_ps(hi, lo);
    for (int k = 0; k < STEPS_WAY; ++k)
        a[k] = _mm512_fmadd_ps(span, t[k], lo);
    exp2_core16(a);
    for (int k = 0; k < STEPS_WAY; ++k)
        s[k] = _mm512_div_ps(one, _mm512_sub_ps(a[k], one));
}

/* dq__sigmoid_slope (fused) of sixteen sigmoids: t - t t */
DQ_AVX512_KERNEL static inline __attribute__((always_inline)) __m512 slope16(__m512 t) {
    return _mm512_fnmadd_ps(t, t, t);
}

/* dstep_of (fused) of steps s and their sigmoids' slope16 tt, in its
 * order; ln2_span is -ln2 (hi - lo) */
DQ_AVX512_KERNEL static inline __attribute__((always_inline)) __m512 dstep16(__m512 s, __m512 tt,
                                                                             __m512 ln2_span) {
    return _mm512_mul_ps(_mm512_mul_ps(ln2_span, _mm512_fmadd_ps(s, s, s)), tt);
}

/* steps_loops(bounded, fused) over [start, start + count) */
DQ_AVX512_KERNEL static void steps_avx512(const dq_bits_param *prm, const float *restrict logit,
                                          int64_t start, int64_t count, float *restrict step,
                                          float *restrict dstep, float *restrict sig) {
    const __m512 lo = _mm512_set1_ps(prm->min_bits), hi = _mm512_set1_ps(prm->max_bits),
                 ln2_span = _mm512_set1_ps(-LN2 * (prm->max_bits - prm->min_bits));
    for (int64_t i = start; i < start + count; i += STEPS_WAY * 16) {
        __mmask16 m[STEPS_WAY];
        __m512 t[STEPS_WAY], s[STEPS_WAY];
        masks4(start + count - i, m);
        steps4(logit + i, m, lo, hi, t, s);
        for (int k = 0; k < STEPS_WAY && m[k]; ++k) {
            if (step)
                _mm512_mask_storeu_ps(step + i + 16 * k, m[k], s[k]);
            if (sig)
                _mm512_mask_storeu_ps(sig + i + 16 * k, m[k], t[k]);
            if (dstep)
                _mm512_mask_storeu_ps(dstep + i + 16 * k, m[k], dstep16(s[k], slope16(t[k]), ln2_span));
        }
    }
}

/* Where steps_bits_mode takes steps_avx512, given the noise's AVX-512 path:
 * the tile loops then compute a tile's steps themselves (steps4). */
static int steps_avx512_apply(const dq_bits_param *prm) {
    return prm->mode == DQ_PARAM_BITS && bits_bounded(prm) && dq__fused();
}
#endif

DQ_INLINE void steps_bits_mode(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                               int64_t count, float *restrict step, float *restrict dstep,
                               float *restrict sig, const int fused) {
#if DQ_X86_AVX512
    /* with the noise's AVX-512 paths: dq_noise_simd caps both, so tests
     * compare the two steps through the fused kernels */
    if (fused && dq__noise_avx512() && steps_avx512_apply(prm)) {
        steps_avx512(prm, logit, start, count, step, dstep, sig);
        return;
    }
#endif
    if (bits_bounded(prm))
        steps_loops(prm, logit, start, count, step, dstep, sig, 1, fused);
    else
        steps_loops(prm, logit, start, count, step, dstep, sig, 0, fused);
}

DQ_FAST
void dq_logit_to_step_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                           int64_t count, float *restrict step, float *restrict dstep) {
    if (prm->mode != DQ_PARAM_BITS) {
        /* the noise mode needs log2 and exp of a blend: the scalar path */
        dq_logit_to_step_ref(prm, logit + start, count, NULL, step ? step + start : NULL,
                             dstep ? dstep + start : NULL);
        return;
    }
    DQ_CALL_FUSED(steps_bits_mode, prm, logit, start, count, step, dstep, NULL);
}

/* dq_logit_to_step_fast that also writes each logit's sigmoid t into sig,
 * bit for bit the t of dq_size_forward_fast and dq_size_backward_fast: in
 * the bits mode only (dq__size_affine, where the size penalty works on t). */
DQ_FAST
static void logit_to_step_sig(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                              int64_t count, float *restrict step, float *restrict dstep,
                              float *restrict sig) {
    assert(prm->mode == DQ_PARAM_BITS);
    DQ_CALL_FUSED(steps_bits_mode, prm, logit, start, count, step, dstep, sig);
}

DQ_INLINE void bits_bits_mode(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                              int64_t count, float *restrict bits, float *restrict dbits,
                              const int fused) {
    const float lo = prm->min_bits, hi = prm->max_bits, span = hi - lo;
    if (bits)
        for (int64_t i = start; i < start + count; ++i) {
            float t = dq_fast_sigmoid(logit[i], fused);
            bits[i] = hi * t + (1.0f - t) * lo;
        }
    if (dbits)
        for (int64_t i = start; i < start + count; ++i) {
            float t = dq_fast_sigmoid(logit[i], fused);
            dbits[i] = span * (t * (1.0f - t));
        }
}

DQ_FAST
void dq_logit_to_bits_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                           int64_t count, float *restrict bits, float *restrict dbits) {
    if (prm->mode != DQ_PARAM_BITS) {
        for (int64_t i = start; i < start + count; ++i) {
            float d;
            float b = dq_logit_to_bits(prm, logit[i], &d);
            if (bits)
                bits[i] = b;
            if (dbits)
                dbits[i] = d;
        }
        return;
    }
    DQ_CALL_FUSED(bits_bits_mode, prm, logit, start, count, bits, dbits);
}

void dq_noise_forward_ref(const float *restrict p, const float *restrict step_scale,
                          int64_t group_size, int kind, uint64_t seed, int64_t start,
                          int64_t count, float *restrict noisy, float mn, float mx,
                          int64_t *count_min, int64_t *count_max) {
    assert(group_size > 0);
    int64_t nmin = 0, nmax = 0;
    for (int64_t j = 0; j < count; ++j) {
        int64_t i = start + j;
        float z;
        dq_noise_fill_ref(kind, seed, i, 1, &z);
        noisy[i] = p[i] + step_scale[i / group_size] * z;
        nmin += p[i] == mn;
        nmax += p[i] == mx;
    }
    *count_min = nmin;
    *count_max = nmax;
}

/* Noise generated per inner step of the fast kernels. Drawing it is
 * compute-bound, the loads and stores that use it are memory-bound: short
 * spans let the core overlap one span's memory traffic with the next span's
 * drawing (256 against 1024: noise forward and backward 10% faster). */
#define SPAN 256

/* Groups up to this size take the backward's vector path. */
#define SMALL_GROUP 64

typedef double dq_v4d __attribute__((vector_size(32)));

/* Eight partial sums added in the one order every path uses. */
DQ_INLINE double sum8(const double a[8]) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* sum over k in [j, end) of grad[k] * z[k], in double, on four independent
 * sums (no add latency chain) combined in a fixed order, so the result does
 * not depend on threads. */
DQ_INLINE double segment_dot(const float *restrict grad, const float *restrict z, int64_t j,
                             int64_t end) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t k = j;
    for (; k + 4 <= end; k += 4) {
        s0 += (double)grad[k] * (double)z[k];
        s1 += (double)grad[k + 1] * (double)z[k + 1];
        s2 += (double)grad[k + 2] * (double)z[k + 2];
        s3 += (double)grad[k + 3] * (double)z[k + 3];
    }
    for (; k < end; ++k)
        s0 += (double)grad[k] * (double)z[k];
    return (s0 + s1) + (s2 + s3);
}

void dq_noise_grad_dot_ref(const float *restrict grad, int64_t group_size, int kind,
                           uint64_t seed, int64_t start, int64_t count,
                           double *restrict acc) {
    assert(group_size > 0);
    int64_t g0 = start / group_size;
    for (int64_t j = 0; j < count; ++j) {
        int64_t i = start + j;
        float z;
        dq_noise_fill_ref(kind, seed, i, 1, &z);
        acc[i / group_size - g0] += (double)grad[i] * (double)z;
    }
}

DQ_FAST
void dq_noise_grad_dot_fast(const float *restrict grad, int64_t group_size, int kind,
                            uint64_t seed, int64_t start, int64_t count,
                            double *restrict acc) {
    assert(group_size > 0);
    float z[SPAN];
    int64_t g0 = start / group_size;
    for (int64_t off = 0; off < count; off += SPAN) {
        int64_t i0 = start + off;
        int64_t len = DQ_MIN((int64_t)SPAN, count - off);
        dq_noise_fill_fast(kind, seed, i0, len, z);
        const float *restrict gs = grad + i0;
        if (group_size == 1) {
            double *restrict a = acc + (i0 - g0);
            for (int64_t j = 0; j < len; ++j)
                a[j] += (double)gs[j] * (double)z[j];
            continue;
        }
        int64_t j = 0;
        while (j < len) {
            int64_t g = (i0 + j) / group_size;
            int64_t seg_end = DQ_MIN(len, (g + 1) * group_size - i0);
            acc[g - g0] += segment_dot(gs, z, j, seg_end);
            j = seg_end;
        }
    }
}

/* ------------------------------------------------- fused chunk kernels */

/* Steps of groups [g0, g0 + ng) times `scale` into ss[0..ng), their
 * derivatives into ds and their logits' sigmoids into sig (the bits mode)
 * when not NULL. */
DQ_INLINE void span_steps(const dq_bits_param *prm, const float *restrict logit, int64_t g0,
                          int64_t ng, float scale, float *restrict ss, float *restrict ds,
                          float *restrict sig) {
    if (sig)
        logit_to_step_sig(prm, logit + g0, 0, ng, ss, ds, sig);
    else
        dq_logit_to_step_fast(prm, logit + g0, 0, ng, ss, ds);
    for (int64_t k = 0; k < ng; ++k)
        ss[k] = scale * ss[k];
}

/* The groups [first, first + count) of a chunk whose steps a kernel holds,
 * up to SPAN of them, and where the chunk's groups end. Group by group at
 * group_size 8 a span of values holds 32 groups, and computing their steps
 * 32 at a time cost more in calls and loop ends than in arithmetic (the
 * steps took 1.5 ns a group in a training step, against 0.45 in long runs). */
typedef struct {
    int64_t first, count, end;
} step_window;

/* Whether groups [g0, g1) are not all in the window, which then moves to
 * start at g0 and the caller refills it. */
DQ_INLINE int step_window_moves(step_window *w, int64_t g0, int64_t g1) {
    if (g0 >= w->first && g1 <= w->first + w->count)
        return 0;
    w->first = g0;
    w->count = DQ_MIN((int64_t)SPAN, w->end - g0);
    return 1;
}

/* The forwards' steps times `scale` of a span of `len` values holding
 * groups [g0, g1], from the window over ss (refilled when it misses them):
 * the span's first group's. With `acc` (group_size 1: a group a value) a
 * refill also puts the logits' sigmoids in the size's spans. */
DQ_INLINE const float *forward_span_steps(const dq_bits_param *prm, const float *restrict logit,
                                          float scale, step_window *win, int64_t g0, int64_t g1,
                                          int64_t len, float *restrict ss, dq__size_acc *acc) {
    if (step_window_moves(win, g0, g1 + 1)) {
        assert(!acc || win->count == len);
        span_steps(prm, logit, win->first, win->count, scale, ss, NULL, acc ? dq__size_acc_next(acc) : NULL);
        if (acc)
            dq__size_acc_commit(acc, len);
    }
    return ss + (g0 - win->first);
}

DQ_FAST
static void dq_noise_forward_fused_portable(const dq_bits_param *prm, const float *restrict p,
                            const float *restrict logit, float scale, int64_t group_size,
                            int kind, uint64_t seed, int64_t start, int64_t count,
                            float *restrict noisy, float mn, float mx, int64_t *count_min,
                            int64_t *count_max, dq_size_stats *size) {
    assert(group_size > 0 && (!size || group_size == 1));
    float z[SPAN], ss_win[SPAN + 1];
    step_window win = {0, 0, (start + count - 1) / group_size + 1};
    int64_t nmin = 0, nmax = 0;
    dq__size_acc acc;
    dq__size_acc_init(&acc);
    for (int64_t off = 0; off < count; off += SPAN) {
        int64_t i0 = start + off;
        int64_t len = DQ_MIN((int64_t)SPAN, count - off);
        dq__prefetch(p, i0, len, start + count);
        dq__prefetch_w(noisy, i0, len, start + count);
        if (group_size == 1)
            dq__prefetch(logit, i0, len, start + count);
        dq_noise_fill_fast(kind, seed, i0, len, z);
        int64_t g0 = i0 / group_size, g1 = (i0 + len - 1) / group_size;
        const float *restrict ss =
            forward_span_steps(prm, logit, scale, &win, g0, g1, len, ss_win, size ? &acc : NULL);
        const float *restrict ps = p + i0;
        float *restrict out = noisy + i0;
        if (group_size > 1) {
            /* group after group without a division, straight into the
             * output: scaling z in place first made group-wide stores that
             * the span-wide loads after them waited on */
            int64_t k = 0, end = DQ_MIN(len, (g0 + 1) * group_size - i0);
            for (int64_t g = 0; k < len; ++g, end = DQ_MIN(len, end + group_size))
                for (const float s = ss[g]; k < end; ++k)
                    out[k] = ps[k] + z[k] * s;
        } else {
            for (int64_t j = 0; j < len; ++j)
                out[j] = ps[j] + ss[j] * z[j];
        }
        if (count_min || count_max) {
            int32_t cmin = 0, cmax = 0;
            for (int64_t j = 0; j < len; ++j) {
                cmin += ps[j] == mn;
                cmax += ps[j] == mx;
            }
            nmin += cmin;
            nmax += cmax;
        }
    }
    if (count_min)
        *count_min = nmin;
    if (count_max)
        *count_max = nmax;
    if (size)
        dq__size_acc_finish(&acc, prm, count, size);
}

#if DQ_X86_AVX512
/* log2 of a group size of 1, 2, 4, 8 or 16 (whole groups in every vector
 * of a tile), else -1 */
static int small_group_shift(int64_t group_size) {
    for (int shift = 0; shift <= 4; ++shift)
        if (group_size == ((int64_t)1 << shift))
            return shift;
    return -1;
}

/* The tile generator of a chunk of the noise of `seed` and its stream
 * from the chunk's first tile, or 0 where the AVX-512 kernels leave the
 * chunk to the portable loops: not starting on a tile, empty, or the
 * counters' high word changing inside it. */
DQ_AVX512_KERNEL static inline __attribute__((always_inline)) int chunk_tile_gen(
    tile_gen *gen, tile_ahead *ahead, uint64_t seed, int64_t start, int64_t count) {
    const uint64_t first = (uint64_t)start / TILE * LANES;
    const uint64_t last = ((uint64_t)(start + count) + TILE - 1) / TILE * LANES;
    if (start % TILE || count == 0 || (first >> 32) != ((last - 1) >> 32))
        return 0;
    uint32_t kz, kw;
    key_of_seed(seed, &kz, &kw);
    tile_gen_init(gen, kz, kw, (uint32_t)(first >> 32));
    tile_ahead_init(gen, ahead, (uint32_t)first);
    return 1;
}

/* The low word of the first counter of the tile holding element i. */
DQ_INLINE uint32_t tile_counter_lo(int64_t i) { return (uint32_t)((uint64_t)i / TILE * LANES); }

/* The forward of a chunk starting on a tile, tile by tile with the noise in
 * registers: out = p + z * s with each element's step s taken from the
 * span's group steps by a permute (groups of 2^shift, shift <= 4) or
 * broadcast (a span inside one group), or at group_size 1 computed from
 * the tile's logits (steps4, where steps_bits_mode would take
 * steps_avx512). The same operations as the portable loop, so the same
 * bits. With `ties` it counts the elements equal to mn
 * and to mx; without, it leaves the counts alone: four of a vector's dozen
 * operations besides the noise, and most chunks hold neither extremum. */
DQ_AVX512_KERNEL static inline __attribute__((always_inline)) void forward_avx512_ties(
    const dq_bits_param *prm, const float *restrict p, const float *restrict logit, float scale,
    int64_t group_size, int kind, uint64_t seed, tile_gen gen, tile_ahead ahead, int64_t start,
    int64_t count, float *restrict noisy, float mn, float mx, int64_t *count_min, int64_t *count_max,
    dq_size_stats *size, const int ties) {
    const int shift = small_group_shift(group_size);
    dq__size_acc acc;
    dq__size_acc_init(&acc);
    const __m512 vmn = _mm512_set1_ps(mn), vmx = _mm512_set1_ps(mx);
    const __m512i group_lane = _mm512_srli_epi32(gen.lane, shift < 0 ? 0 : shift);
    float ss[SPAN + 1];
    step_window win = {0, 0, (start + count - 1) / group_size + 1};
    int64_t nmin = 0, nmax = 0;
    __m512i lane_min = _mm512_setzero_si512(), lane_max = _mm512_setzero_si512();
    const __m512i minus_one = _mm512_set1_epi32(-1);
    /* group_size 1: each tile's steps in registers, no span buffer */
    const int tile_steps_here = shift == 0 && steps_avx512_apply(prm);
    const __m512 vlo = _mm512_set1_ps(prm->min_bits), vhi = _mm512_set1_ps(prm->max_bits);
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t off = 0; off < count; off += SPAN) {
        const int64_t i0 = start + off, len = DQ_MIN((int64_t)SPAN, count - off);
        const int64_t g0 = i0 / group_size, g1 = (i0 + len - 1) / group_size;
        if (shift < 0 && g1 != g0) {
            /* groups that straddle vectors: the portable span */
            int64_t cmin = 0, cmax = 0;
            dq_noise_forward_fused_portable(prm, p, logit, scale, group_size, kind, seed, i0, len,
                                            noisy, mn, mx, ties ? &cmin : NULL,
                                            ties ? &cmax : NULL, NULL);
            nmin += cmin;
            nmax += cmax;
            continue;
        }
        const float *restrict sw = ss;
        float *restrict sig = NULL;
        if (!tile_steps_here)
            sw = forward_span_steps(prm, logit, scale, &win, g0, g1, len, ss, size ? &acc : NULL);
        else if (size)
            sig = dq__size_acc_next(&acc);
        const __m512 one_step = tile_steps_here ? _mm512_setzero_ps() : _mm512_set1_ps(sw[0]);
        const float *restrict ps = p + i0;
        float *restrict out = noisy + i0;
        for (int64_t t = 0; t * TILE < len; ++t) {
            __m512 z[4];
            dq__prefetch(p, i0 + t * TILE, TILE, start + count);
            dq__prefetch_w(noisy, i0 + t * TILE, TILE, start + count);
            if (shift == 0)
                dq__prefetch(logit, i0 + t * TILE, TILE, start + count);
            __m512 own_steps[STEPS_WAY];
            if (tile_steps_here) {
                __mmask16 m4[STEPS_WAY];
                __m512 tt[STEPS_WAY];
                masks4(len - t * TILE, m4);
                steps4(logit + i0 + t * TILE, m4, vlo, vhi, tt, own_steps);
                for (int k = 0; k < STEPS_WAY; ++k)
                    own_steps[k] = _mm512_mul_ps(vscale, own_steps[k]);
                for (int k = 0; k < STEPS_WAY && sig && m4[k]; ++k)
                    _mm512_mask_storeu_ps(sig + t * TILE + 16 * k, m4[k], tt[k]);
            }
            tile_ahead_noise(&gen, &ahead, kind, tile_counter_lo(i0 + t * TILE), z);
            /* groups of 4 to 16: the tile's steps in one register */
            __m512 tile_steps = one_step;
            if (shift >= 2)
                tile_steps = _mm512_maskz_loadu_ps(
                    lanes_upto(((DQ_MIN(len - t * TILE, TILE) - 1) >> shift) + 1), sw + ((t * TILE) >> shift));
            for (int l = 0; l < 4; ++l) {
                const int64_t j = t * TILE + l * LANES;
                if (j >= len)
                    break;
                const __mmask16 m = lanes_upto(len - j);
                const __m512 pv = _mm512_maskz_loadu_ps(m, ps + j);
                __m512 sv;
                if (shift < 0)
                    sv = one_step;
                else if (shift == 0)
                    sv = tile_steps_here ? own_steps[l] : _mm512_maskz_loadu_ps(m, sw + j);
                else if (shift >= 2)
                    sv = _mm512_permutexvar_ps(
                        _mm512_add_epi32(group_lane, _mm512_set1_epi32(l * (LANES >> shift))), tile_steps);
                else
                    sv = _mm512_permutexvar_ps(
                        group_lane,
                        _mm512_maskz_loadu_ps(lanes_upto(((DQ_MIN(len - j, 16) - 1) >> shift) + 1),
                                              sw + (j >> shift)));
                _mm512_mask_storeu_ps(out + j, m, _mm512_add_ps(pv, _mm512_mul_ps(z[l], sv)));
                if (!ties)
                    continue;
                /* ties counted lane by lane: a masked subtract of -1 each */
                lane_min = _mm512_mask_sub_epi32(lane_min, _mm512_mask_cmp_ps_mask(m, pv, vmn, _CMP_EQ_OQ),
                                                 lane_min, minus_one);
                lane_max = _mm512_mask_sub_epi32(lane_max, _mm512_mask_cmp_ps_mask(m, pv, vmx, _CMP_EQ_OQ),
                                                 lane_max, minus_one);
            }
        }
        if (tile_steps_here && size)
            dq__size_acc_commit(&acc, len);
    }
    if (ties) {
        *count_min = nmin + _mm512_reduce_add_epi32(lane_min);
        *count_max = nmax + _mm512_reduce_add_epi32(lane_max);
    }
    if (size)
        dq__size_acc_finish(&acc, prm, count, size);
}

/* forward_avx512_ties, counting the ties where either count is asked for.
 * Returns 0 (nothing done) where the chunk does not suit: not on a tile,
 * the counters' high word changing inside it. */
DQ_AVX512_KERNEL static int forward_avx512(const dq_bits_param *prm, const float *restrict p,
                                           const float *restrict logit, float scale,
                                           int64_t group_size, int kind, uint64_t seed,
                                           int64_t start, int64_t count, float *restrict noisy,
                                           float mn, float mx, int64_t *count_min,
                                           int64_t *count_max, dq_size_stats *size) {
    tile_gen gen;
    tile_ahead ahead;
    if (!chunk_tile_gen(&gen, &ahead, seed, start, count))
        return 0;
    if (count_min || count_max) {
        int64_t cmin, cmax;
        forward_avx512_ties(prm, p, logit, scale, group_size, kind, seed, gen, ahead, start, count,
                            noisy, mn, mx, &cmin, &cmax, size, 1);
        if (count_min)
            *count_min = cmin;
        if (count_max)
            *count_max = cmax;
    } else {
        forward_avx512_ties(prm, p, logit, scale, group_size, kind, seed, gen, ahead, start, count,
                            noisy, mn, mx, NULL, NULL, size, 0);
    }
    return 1;
}
#endif

void dq_noise_forward_fused(const dq_bits_param *prm, const float *restrict p,
                            const float *restrict logit, float scale, int64_t group_size,
                            int kind, uint64_t seed, int64_t start, int64_t count,
                            float *restrict noisy, float mn, float mx, int64_t *count_min,
                            int64_t *count_max, dq_size_stats *size) {
    assert(!size || group_size == 1);
    /* the size's sigmoids from the steps' where the size works on them;
     * otherwise its own pass over the chunk's logits, read just now */
    dq_size_stats *fused_size = size && dq__size_affine(prm) ? size : NULL;
    if (size && !fused_size)
        dq_size_forward_fast(prm, logit, start, count, size);
#if DQ_X86_AVX512
    if (dq__noise_avx512() && forward_avx512(prm, p, logit, scale, group_size, kind, seed, start,
                                             count, noisy, mn, mx, count_min, count_max, fused_size))
        return;
#endif
    dq_noise_forward_fused_portable(prm, p, logit, scale, group_size, kind, seed, start, count,
                                    noisy, mn, mx, count_min, count_max, fused_size);
}

/* For whole groups in [start, start + count): dot_g = sum grad * noise,
 * grad_logit[g] = scale * dot_g * dstep_g, and the return value
 * sum_g step_g * dot_g (the gradient through the noise scale). */
DQ_FAST
static double dq_noise_backward_fused_portable(const dq_bits_param *prm, const float *restrict grad,
                               const float *restrict logit, float scale, int64_t group_size,
                               int kind, uint64_t seed, int64_t start, int64_t count,
                               float *restrict grad_logit) {
    assert(group_size > 0 && start % group_size == 0 && count % group_size == 0);
    float z[SPAN], st_win[SPAN + 1], ds_win[SPAN + 1];
    step_window win = {0, 0, (start + count) / group_size};
    double through_scale = 0, pending = 0; /* pending: dot of a group cut by a span end */
    double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t first_group = start / group_size;
    for (int64_t off = 0; off < count; off += SPAN) {
        int64_t i0 = start + off;
        int64_t len = DQ_MIN((int64_t)SPAN, count - off);
        dq__prefetch(grad, i0, len, start + count);
        if (group_size == 1) {
            dq__prefetch(logit, i0, len, start + count);
            dq__prefetch_w(grad_logit, i0, len, start + count);
        }
        dq_noise_fill_fast(kind, seed, i0, len, z);
        const float *restrict gs = grad + i0;
        int64_t g0 = i0 / group_size, g1 = (i0 + len - 1) / group_size;
        if (step_window_moves(&win, g0, g1 + 1))
            dq_logit_to_step_fast(prm, logit + win.first, 0, win.count, st_win, ds_win);
        /* the span's groups */
        const float *restrict st = st_win + (g0 - win.first), *restrict ds = ds_win + (g0 - win.first);
        if (group_size == 1) {
            float through[SPAN];
            for (int64_t j = 0; j < len; ++j) {
                float dot = gs[j] * z[j];
                grad_logit[i0 + j] = (scale * dot) * ds[j];
                through[j] = st[j] * dot;
            }
            /* eight independent sums: no add latency chain, a fixed order */
            double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t j = 0;
            for (; j + 8 <= len; j += 8)
                for (int k = 0; k < 8; ++k)
                    acc[k] += (double)through[j + k];
            for (; j < len; ++j)
                acc[0] += (double)through[j];
            through_scale += sum8(acc);
            continue;
        }
        if (group_size % 4 == 0 && group_size <= SMALL_GROUP && SPAN % group_size == 0) {
            /* small groups, whole in the span: the products in one
             * vectorized pass, then each group's rows of four added as
             * vectors. The same sums in the same order as segment_dot
             * (lane l adds elements l, l + 4, ... from 0), so the same bits,
             * without its per-group scalar conversions. */
            double prod[SPAN];
            for (int64_t k = 0; k < len; ++k)
                prod[k] = (double)gs[k] * (double)z[k];
            for (int64_t q = 0; q < len / group_size; ++q) {
                dq_v4d acc = {0.0, 0.0, 0.0, 0.0};
                for (int64_t m = q * group_size; m < (q + 1) * group_size; m += 4) {
                    dq_v4d row;
                    memcpy(&row, prod + m, sizeof row);
                    acc += row;
                }
                double dot = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                grad_logit[g0 + q] = (float)((double)scale * dot * (double)ds[q]);
                /* eight sums by the group's place in the chunk: no add
                 * latency chain, and the order a vector of eight groups
                 * keeps (the AVX-512 path) */
                lanes[(g0 + q - first_group) & 7] += (double)st[q] * dot;
            }
            continue;
        }
        /* group after group without a division (one a group measured as
         * much as the rest of the loop at group_size=8) */
        int64_t j = 0, g = g0, group_end = (g0 + 1) * group_size - i0;
        while (j < len) {
            int64_t seg_end = DQ_MIN(len, group_end);
            pending += segment_dot(gs, z, j, seg_end);
            if (seg_end == group_end) {
                grad_logit[g] = (float)((double)scale * pending * (double)ds[g - g0]);
                through_scale += (double)st[g - g0] * pending;
                pending = 0;
                ++g;
                group_end += group_size;
            }
            j = seg_end;
        }
    }
    return through_scale + sum8(lanes);
}

#if DQ_X86_AVX512
/* The eight sums of the eight groups of eight a tile holds, as the portable
 * loop adds them (rows of four, then pairs): d[k] holds group k's products
 * in double. Lane k of the result is group k's sum. */
DQ_AVX512_KERNEL static inline __m512d tile_group_sums8(const __m512d d[8]) {
    __m512d a[4];
    for (int k = 0; k < 4; ++k) /* lane l of a group: element l + element l + 4 */
        a[k] = _mm512_add_pd(_mm512_shuffle_f64x2(d[2 * k], d[2 * k + 1], 0x44),
                             _mm512_shuffle_f64x2(d[2 * k], d[2 * k + 1], 0xEE));
    /* (lane 0 + lane 1) and (lane 2 + lane 3) of groups 0, 2, 1, 3 and 4, 6, 5, 7 */
    __m512d b0 = _mm512_add_pd(_mm512_unpacklo_pd(a[0], a[1]), _mm512_unpackhi_pd(a[0], a[1]));
    __m512d b1 = _mm512_add_pd(_mm512_unpacklo_pd(a[2], a[3]), _mm512_unpackhi_pd(a[2], a[3]));
    const __m512i first = _mm512_setr_epi64(0, 4, 1, 5, 8, 12, 9, 13);
    const __m512i second = _mm512_setr_epi64(2, 6, 3, 7, 10, 14, 11, 15);
    return _mm512_add_pd(_mm512_permutex2var_pd(b0, first, b1), _mm512_permutex2var_pd(b0, second, b1));
}

/* The backward of a chunk at group_size 1 or 8 with the noise in registers
 * (at group_size 1 the steps too, as in the forward): the portable loop's
 * sums in its order, so the same bits. Returns 0
 * (nothing done) where the chunk does not suit. */
DQ_AVX512_KERNEL static int backward_avx512(const dq_bits_param *prm, const float *restrict grad,
                                            const float *restrict logit, float scale,
                                            int64_t group_size, int kind, uint64_t seed,
                                            int64_t start, int64_t count,
                                            float *restrict grad_logit, double *through,
                                            const float *size_scale) {
    assert(!size_scale || (group_size == 1 && prm->mode == DQ_PARAM_BITS));
    tile_gen gen;
    tile_ahead ahead;
    if ((group_size != 1 && group_size != 8) || !chunk_tile_gen(&gen, &ahead, seed, start, count))
        return 0;
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512d dscale = _mm512_set1_pd((double)scale);
    const __m512 vspan = _mm512_set1_ps(prm->max_bits - prm->min_bits);
    const __m512 vsize = _mm512_set1_ps(size_scale ? *size_scale : 0.0f);
    float st_win[SPAN + 1], ds_win[SPAN + 1], sig_win[SPAN + 1];
    step_window win = {0, 0, (start + count) / group_size};
    /* group_size 1: each tile's steps in registers, no span buffers */
    const int tile_steps_here = group_size == 1 && steps_avx512_apply(prm);
    const __m512 vlo = _mm512_set1_ps(prm->min_bits), vhi = _mm512_set1_ps(prm->max_bits);
    const __m512 ln2_span = _mm512_set1_ps(-LN2 * (prm->max_bits - prm->min_bits));
    /* the size term's t (1 - t) as dq_size_backward_add_fast computes it */
    const int fused = dq__fused();
    double through_scale = 0;
    __m512d lanes = _mm512_setzero_pd();
    for (int64_t off = 0; off < count; off += SPAN) {
        const int64_t i0 = start + off, len = DQ_MIN((int64_t)SPAN, count - off);
        const int64_t g0 = i0 / group_size, ng = len / group_size;
        if (!tile_steps_here && step_window_moves(&win, g0, g0 + ng)) {
            if (size_scale)
                logit_to_step_sig(prm, logit + win.first, 0, win.count, st_win, ds_win, sig_win);
            else
                dq_logit_to_step_fast(prm, logit + win.first, 0, win.count, st_win, ds_win);
        }
        /* the span's groups */
        const float *restrict st = st_win + (g0 - win.first), *restrict ds = ds_win + (g0 - win.first),
                              *restrict sig = sig_win + (g0 - win.first);
        const float *restrict gs = grad + i0;
        if (group_size == 1) {
            __m512d acc = _mm512_setzero_pd();
            float *restrict gl = grad_logit + i0;
            int64_t j = 0;
            for (int64_t t = 0; t * TILE < len; ++t) {
                __m512 z[4];
                dq__prefetch(grad, i0 + t * TILE, TILE, start + count);
                dq__prefetch(logit, i0 + t * TILE, TILE, start + count);
                dq__prefetch_w(grad_logit, i0 + t * TILE, TILE, start + count);
                __m512 own_t[STEPS_WAY], own_s[STEPS_WAY];
                if (tile_steps_here) {
                    __mmask16 m4[STEPS_WAY];
                    masks4(len - t * TILE, m4);
                    steps4(logit + i0 + t * TILE, m4, vlo, vhi, own_t, own_s);
                }
                tile_ahead_noise(&gen, &ahead, kind, tile_counter_lo(i0 + t * TILE), z);
                for (int l = 0; l < 4 && j < len; ++l, j += LANES) {
                    const __mmask16 m = lanes_upto(len - j);
                    const __m512 dot = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gs + j), z[l]);
                    /* the step, d(step) and, for the size term, t (1 - t) */
                    __m512 step, dstep, tt = _mm512_setzero_ps();
                    if (tile_steps_here) {
                        step = own_s[l];
                        tt = slope16(own_t[l]);
                        dstep = dstep16(step, tt, ln2_span);
                    } else {
                        step = _mm512_maskz_loadu_ps(m, st + j);
                        dstep = _mm512_maskz_loadu_ps(m, ds + j);
                        if (size_scale) {
                            const __m512 t = _mm512_maskz_loadu_ps(m, sig + j);
                            tt = fused ? slope16(t) : _mm512_mul_ps(t, _mm512_sub_ps(_mm512_set1_ps(1.0f), t));
                        }
                    }
                    __m512 g = _mm512_mul_ps(_mm512_mul_ps(vscale, dot), dstep);
                    /* + dq_size_backward_add_fast's term, in its order */
                    if (size_scale)
                        g = _mm512_add_ps(g, _mm512_mul_ps(_mm512_mul_ps(vspan, tt), vsize));
                    _mm512_mask_storeu_ps(gl + j, m, g);
                    const __m512 th = _mm512_mul_ps(step, dot);
                    if (len - j >= LANES) {
                        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(th)));
                        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_extractf32x8_ps(th, 1)));
                        continue;
                    }
                    /* the span's last values: rows of eight, then one by one
                     * into the first sum, as the portable loop adds them */
                    float rest[LANES];
                    double a[8];
                    _mm512_storeu_ps(rest, th);
                    _mm512_storeu_pd(a, acc);
                    int64_t r = 0, nrest = len - j;
                    for (; r + 8 <= nrest; r += 8)
                        for (int k = 0; k < 8; ++k)
                            a[k] += (double)rest[r + k];
                    for (; r < nrest; ++r)
                        a[0] += (double)rest[r];
                    acc = _mm512_loadu_pd(a);
                }
            }
            double a[8];
            _mm512_storeu_pd(a, acc);
            through_scale += sum8(a);
            continue;
        }
        for (int64_t t = 0; t * TILE < len; ++t) {
            __m512 z[4];
            dq__prefetch(grad, i0 + t * TILE, TILE, start + count);
            tile_ahead_noise(&gen, &ahead, kind, tile_counter_lo(i0 + t * TILE), z);
            const int64_t j0 = t * TILE, groups = DQ_MIN((int64_t)8, (len - j0) / 8);
            __m512d d[8];
            for (int l = 0; l < 4; ++l) {
                const __m512 g = _mm512_maskz_loadu_ps(lanes_upto(len - j0 - l * LANES), gs + j0 + l * LANES);
                d[2 * l] = _mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(g)),
                                         _mm512_cvtps_pd(_mm512_castps512_ps256(z[l])));
                d[2 * l + 1] = _mm512_mul_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(g, 1)),
                                             _mm512_cvtps_pd(_mm512_extractf32x8_ps(z[l], 1)));
            }
            const __m512d dot = tile_group_sums8(d);
            const __mmask8 m = (__mmask8)((1u << groups) - 1u);
            const __m512d dsv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, ds + t * 8));
            const __m512d stv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, st + t * 8));
            _mm256_mask_storeu_ps(grad_logit + g0 + t * 8, m,
                                  _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(dscale, dot), dsv)));
            lanes = _mm512_mask_add_pd(lanes, m, lanes, _mm512_mul_pd(stv, dot));
        }
    }
    double a[8];
    _mm512_storeu_pd(a, lanes);
    *through = through_scale + sum8(a);
    return 1;
}
#endif

double dq_noise_backward_fused(const dq_bits_param *prm, const float *restrict grad,
                               const float *restrict logit, float scale, int64_t group_size,
                               int kind, uint64_t seed, int64_t start, int64_t count,
                               float *restrict grad_logit, const float *size_scale) {
    assert(group_size > 0 && start % group_size == 0 && count % group_size == 0);
    double through;
    int done = 0, size_done = 0;
#if DQ_X86_AVX512
    /* the size term in the noise's loop where the steps give its sigmoids */
    const int size_inside = size_scale && group_size == 1 && prm->mode == DQ_PARAM_BITS;
    done = dq__noise_avx512() &&
           backward_avx512(prm, grad, logit, scale, group_size, kind, seed, start, count, grad_logit,
                           &through, size_inside ? size_scale : NULL);
    size_done = done && size_inside;
#endif
    if (!done)
        through = dq_noise_backward_fused_portable(prm, grad, logit, scale, group_size, kind, seed,
                                                   start, count, grad_logit);
    /* elsewhere a pass of its own over the chunk's logits, in cache now */
    if (size_scale && !size_done)
        dq_size_backward_add_fast(prm, logit, start / group_size, count / group_size, *size_scale,
                                  grad_logit);
    return through;
}

/* ------------------------------------------------------------- drivers */

/* The first index of chunk c holding `value`, or -1 (c == INT64_MAX: none). */
static int64_t first_index_in_chunk(const float *restrict p, int64_t n, int64_t c, float value) {
    if (c == INT64_MAX)
        return -1;
    return dq__first_index(p, c * DQ_CHUNK, DQ_MIN(n, (c + 1) * DQ_CHUNK), value);
}

int dq_noise_forward(const dq_bits_param *prm, const float *restrict p, int64_t n,
                     const float *restrict logit, int64_t group_size, int kind,
                     uint64_t seed, float *restrict noisy, dq_range *range, int nthreads) {
    if (group_size <= 0)
        group_size = n > 0 ? n : 1;
    assert((n / group_size) * group_size == n);
    const int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    /* each chunk's extrema: only a chunk whose own extremum is the tensor's
     * can hold its ties, so the others skip counting them */
    dq_range *part = malloc((size_t)(chunks ? chunks : 1) * sizeof *part);
    if (!part)
        return DQ_ERR_NOMEM;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c)
        dq_range_fast(p, c * DQ_CHUNK, DQ_MIN(DQ_CHUNK, n - c * DQ_CHUNK), &part[c]);
    dq__range_clear(range);
    for (int64_t c = 0; c < chunks; ++c)
        dq__range_add(range, &part[c]);
    if (range->nonfinite || n == 0) {
        free(part);
        return range->nonfinite ? DQ_ERR_NONFINITE : 0;
    }
    const float scale = range->max - range->min;
    const float mn = range->min, mx = range->max;
    int64_t nmin = 0, nmax = 0, chunk_min = INT64_MAX, chunk_max = INT64_MAX;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1) \
    reduction(+ : nmin, nmax) reduction(min : chunk_min, chunk_max)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK, cmin = 0, cmax = 0;
        dq_noise_forward_fused(prm, p, logit, scale, group_size, kind, seed, start,
                               DQ_MIN(DQ_CHUNK, n - start), noisy, mn, mx,
                               part[c].min == mn ? &cmin : NULL, part[c].max == mx ? &cmax : NULL,
                               NULL);
        nmin += cmin;
        nmax += cmax;
        if (cmin && c < chunk_min)
            chunk_min = c;
        if (cmax && c < chunk_max)
            chunk_max = c;
    }
    free(part);
    range->count_min = nmin;
    range->count_max = nmax;
    /* where the extrema are: one chunk searched for each, so the backward
     * can update them without a pass over p */
    range->first_min = first_index_in_chunk(p, n, chunk_min, mn);
    range->first_max = first_index_in_chunk(p, n, chunk_max, mx);
    return 0;
}

/* dot[g] = sum_{i in g} grad[i] * noise(i), in chunks that never straddle
 * two groups, reduced in a fixed order. */
static int noise_grad_dot(const float *restrict grad, int64_t n, int64_t group_size, int kind,
                          uint64_t seed, double *restrict dot, int nthreads) {
    int64_t ngroups = n / group_size;
    memset(dot, 0, (size_t)ngroups * sizeof(double));
    (void)nthreads;
    if (group_size <= DQ_CHUNK) {
        int64_t chunk = dq__grad_chunk(group_size);
        int64_t chunks = dq_num_chunks(n, chunk);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t start = c * chunk;
            dq_noise_grad_dot_fast(grad, group_size, kind, seed, start,
                                   DQ_MIN(chunk, n - start), dot + start / group_size);
        }
        return 0;
    }
    int64_t pieces = dq_num_chunks(group_size, DQ_CHUNK);
    double *partial = calloc((size_t)(ngroups * pieces), sizeof(double));
    if (!partial)
        return DQ_ERR_NOMEM;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < ngroups * pieces; ++c) {
        int64_t g = c / pieces, k = c % pieces;
        int64_t start = g * group_size + k * DQ_CHUNK;
        int64_t len = DQ_MIN(DQ_CHUNK, group_size - k * DQ_CHUNK);
        dq_noise_grad_dot_fast(grad, group_size, kind, seed, start, len, partial + c);
    }
    for (int64_t g = 0; g < ngroups; ++g)
        for (int64_t k = 0; k < pieces; ++k)
            dot[g] += partial[g * pieces + k];
    free(partial);
    return 0;
}

/* What the gradient through the extrema adds at a value v of p. */
DQ_INLINE float extrema_extra(float v, float mn, float mx, float g_min, float g_max) {
    return (v == mx ? g_max : 0.0f) - (v == mn ? g_min : 0.0f);
}

/* Adds the gradient through max(p) and min(p): grad_p[i] = grad[i] + extra
 * at the extrema, extra shared evenly among ties, grad_p[i] = grad[i]
 * elsewhere. With only_extrema (grad_p is grad itself, or already holds a
 * copy of it: see dq_noise_backward_multi) only the extrema are written;
 * otherwise every element is. */
void dq__add_extrema_grad(const float *grad, const float *restrict p, int64_t n,
                          const dq_range *range, double through_scale, float *grad_p,
                          int only_extrema, int nthreads) {
    const float mn = range->min, mx = range->max;
    const float g_max = range->count_max ? (float)(through_scale / (double)range->count_max) : 0;
    const float g_min = range->count_min ? (float)(through_scale / (double)range->count_min) : 0;
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    (void)nthreads;
    if (only_extrema && range->count_min == 1 && range->count_max == 1 && range->first_min >= 0 &&
        range->first_min < n && range->first_max >= 0 && range->first_max < n &&
        p[range->first_min] == mn && p[range->first_max] == mx) {
        /* one element at each end and the forward said where: the same
         * update as the scan below, without reading p */
        int64_t at[2] = {range->first_min, range->first_max};
        for (int e = 0; e < 2; ++e) {
            int64_t i = at[e];
            if (e == 1 && i == at[0])
                break;
            grad_p[i] = grad[i] + extrema_extra(p[i], mn, mx, g_min, g_max);
        }
        return;
    }
    if (only_extrema) {
        /* read p, touch only the extrema */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t end = DQ_MIN(n, (c + 1) * DQ_CHUNK);
            for (int64_t base = c * DQ_CHUNK; base < end; base += 1024) {
                int64_t stop = DQ_MIN(end, base + 1024);
                int hit = 0;
                for (int64_t i = base; i < stop; ++i)
                    hit |= (p[i] == mx) | (p[i] == mn);
                if (!hit)
                    continue;
                for (int64_t i = base; i < stop; ++i)
                    if (p[i] == mx || p[i] == mn)
                        grad_p[i] = grad[i] + extrema_extra(p[i], mn, mx, g_min, g_max);
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK, end = DQ_MIN(n, start + DQ_CHUNK);
        for (int64_t i = start; i < end; ++i) {
            /* grad itself off the extrema (a -0.0 stays -0.0, as in place) */
            grad_p[i] = p[i] == mx || p[i] == mn ? grad[i] + extrema_extra(p[i], mn, mx, g_min, g_max) : grad[i];
        }
    }
}

int dq_noise_backward(const dq_bits_param *prm, const float *grad, const float *restrict p,
                      int64_t n, const float *restrict logit, int64_t group_size, int kind,
                      uint64_t seed, const dq_range *range, float *grad_p,
                      float *restrict grad_logit, int nthreads) {
    return dq_noise_backward_sized(prm, grad, p, n, logit, group_size, kind, seed, range, grad_p,
                                   grad_logit, NULL, nthreads);
}

int dq_noise_backward_sized(const dq_bits_param *prm, const float *grad, const float *restrict p,
                            int64_t n, const float *restrict logit, int64_t group_size, int kind,
                            uint64_t seed, const dq_range *range, float *grad_p,
                            float *restrict grad_logit, const float *size_scale, int nthreads) {
    if (group_size <= 0)
        group_size = n > 0 ? n : 1;
    int64_t ngroups = n / group_size;
    assert(ngroups * group_size == n);
    if (n == 0)
        return 0;
    const float scale = range->max - range->min;
    double through_scale = 0;
    (void)nthreads;
    if (group_size <= DQ_CHUNK) {
        /* chunks of whole groups; their sums are added in chunk order */
        int64_t chunk = dq__grad_chunk(group_size);
        int64_t chunks = dq_num_chunks(n, chunk);
        double parts[64];
        for (int64_t base = 0; base < chunks; base += 64) {
            int64_t m = DQ_MIN((int64_t)64, chunks - base);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (m > 1)
            for (int64_t c = 0; c < m; ++c) {
                int64_t start = (base + c) * chunk;
                parts[c] = dq_noise_backward_fused(prm, grad, logit, scale, group_size, kind, seed,
                                                   start, DQ_MIN(chunk, n - start), grad_logit,
                                                   size_scale);
            }
            for (int64_t c = 0; c < m; ++c)
                through_scale += parts[c];
        }
    } else {
        double *dot = malloc((size_t)ngroups * sizeof(double));
        float *step = malloc((size_t)ngroups * 2 * sizeof(float));
        if (!dot || !step || noise_grad_dot(grad, n, group_size, kind, seed, dot, nthreads)) {
            free(dot);
            free(step);
            return DQ_ERR_NOMEM;
        }
        float *dstep = step + ngroups;
        dq_logit_to_step_fast(prm, logit, 0, ngroups, step, dstep);
        for (int64_t g = 0; g < ngroups; ++g) {
            through_scale += (double)step[g] * dot[g];
            grad_logit[g] = (float)((double)scale * dot[g] * (double)dstep[g]);
        }
        if (size_scale)
            dq_size_backward_add_fast(prm, logit, 0, ngroups, *size_scale, grad_logit);
        free(dot);
        free(step);
    }
    dq__add_extrema_grad(grad, p, n, range, through_scale, grad_p, grad_p == grad, nthreads);
    return 0;
}
