/* Helpers shared by the kernel files; not part of the public header. */
#ifndef DQ_INTERNAL_H
#define DQ_INTERNAL_H

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "diffq_c.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* The fast kernels are compiled twice on x86-64 Linux with GCC: once for the
 * baseline ISA and once for AVX2, picked at load time. The arithmetic is
 * written without contractions (-ffp-contract=off), so both clones compute
 * the same bits. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(DQ_NO_CLONES)
#define DQ_FAST __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DQ_FAST
#endif

/* Kernels with an AVX-512 version written with intrinsics (the noise
 * generator, the width lookups) pick it at run time from what the CPU has:
 * 0 no AVX-512, 1 AVX-512F only, 2 AVX-512F with DQ, BW and VL. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(DQ_NO_AVX512)
#define DQ_X86_AVX512 1
static inline int dq__avx512_level(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f"))
        return 0;
    return __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl")
               ? 2
               : 1;
}
#else
#define DQ_X86_AVX512 0
#endif

/* Helpers called from the fast kernels are forced inline, so each clone
 * compiles them for its own instruction set. */
#define DQ_INLINE static inline __attribute__((always_inline))

#define DQ_MIN(a, b) ((a) < (b) ? (a) : (b))

/* The streaming loops (the noise forward and backward, the range pass, the
 * eval path's requantize) ask for the cache lines of the values
 * DQ_PREFETCH_AHEAD after the tile or span they compute (8 KiB of float32).
 * With the hardware prefetcher alone, one thread's noise forward out of
 * cache took twice its time in L2: its loads are few and far apart among
 * a tile's hundred vector operations. 1024 to 4096 values measured alike
 * (RESULTS.md, ninth session). */
#define DQ_PREFETCH_AHEAD 2048

/* A hint for the lines of x[i .. i + len) shifted DQ_PREFETCH_AHEAD
 * values on, those before `end` only (no address outside the buffer is
 * formed): called with the tile or span about to be computed. It changes
 * no value. */
DQ_INLINE void dq__prefetch(const float *x, int64_t i, int64_t len, int64_t end) {
    for (int64_t k = i + DQ_PREFETCH_AHEAD; k < i + DQ_PREFETCH_AHEAD + len && k < end; k += 16)
        __builtin_prefetch(x + k, 0, 3);
}

/* The same for lines about to be written. */
DQ_INLINE void dq__prefetch_w(float *x, int64_t i, int64_t len, int64_t end) {
    for (int64_t k = i + DQ_PREFETCH_AHEAD; k < i + DQ_PREFETCH_AHEAD + len && k < end; k += 16)
        __builtin_prefetch(x + k, 1, 3);
}

DQ_INLINE uint32_t dq_float_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

DQ_INLINE float dq_bits_float(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The quantization level of x, in float32 in exactly this order (what the
 * torch formula computes): round_half_even(((x - mn) / range) / step),
 * clamped to [0, top]; NaN gives 0. Every kernel that quantizes uses it. */
DQ_INLINE float dq_level(float x, float mn, float range, float step, float top) {
    float level = rintf(((x - mn) / range) / step);
    return level > 0.0f ? (level < top ? level : top) : 0.0f;
}

/* Whether the fast kernels' multiply-adds run as FMA instructions (1: the
 * CPU has x86-64-v3, whose clone the kernels then run, or it is not x86)
 * or as a multiply and an add (0); rng.c, dq_fused_madd switches it. */
int dq__fused(void);

/* a * b + c: one FMA instruction (`fused` 1) or a multiply and an add (0;
 * a baseline clone's fmaf would be a libm call a value). The two may
 * differ in the last bit: the steps and size penalty that use this are
 * approximations of torch's formulas (relative error ~2.4e-7) whose bits
 * are not specified. Callers pass `fused` as a constant (DQ_CALL_FUSED). */
DQ_INLINE float dq_madd(float a, float b, float c, const int fused) {
    return fused ? fmaf(a, b, c) : a * b + c;
}

/* fn(args..., 1) where dq__fused(), fn(args..., 0) elsewhere: one branch
 * outside fn's loops, which each call compiles with `fused` a constant. */
#define DQ_CALL_FUSED(fn, ...) (dq__fused() ? fn(__VA_ARGS__, 1) : fn(__VA_ARGS__, 0))

/* a * b + c computed in double, rounded to float: the product of two
 * floats is exact in double, so only the sum rounds twice, which differs
 * from fmaf's single rounding only where the double sum falls exactly on a
 * midpoint between two floats. Over all 2^23 magnitudes of the gaussian
 * noise's polynomial it never does (test_kernels checks every one), so
 * the plain-C gaussian gives the FMA paths' bits on any CPU, vectorized,
 * without a libm call. Needs -ffp-contract=off. */
DQ_INLINE float dq_madd_double(float a, float b, float c) {
    return (float)((double)a * (double)b + (double)c);
}

/* Branch-free exp2 and sigmoid, so the loops around them vectorize; the
 * fast bits, steps and size penalty use them. */
/* 2^x for x in [-125, 126] or NaN, unclamped: the nearest integer i goes
 * into the exponent, a degree-5 polynomial takes the rest in [-1/2, 1/2]
 * (fitted for the least maximum relative error: 2.4e-7 evaluated in
 * float32, as close as the degree-6 Taylor polynomial it replaced, one
 * multiply-add fewer). Horner by dq_madd: on FMA CPUs one instruction a
 * step, and the steps from the logits cost 25% less than with a multiply
 * and an add.
 *
 * i without a conversion to integer: x + 1.5 * 2^23 rounds x to the
 * nearest integer (ties to even) into the low bits of the sum, which
 * shifted by 23 add i to the polynomial's exponent (126 or 127: the result
 * stays normal for i in [-125, 126]). Against a float-to-int conversion and
 * a multiply by 2^i: 20% off the steps at group_size 1 on AVX-512. */
#define DQ__ROUND_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define DQ__LOG2E 1.44269504088896341f
/* the polynomial's coefficients, highest degree first */
#define DQ__EXP2_C5 1.3276471291e-3f
#define DQ__EXP2_C4 9.6755409613e-3f
#define DQ__EXP2_C3 5.5507130921e-2f
#define DQ__EXP2_C2 2.4022120237e-1f
#define DQ__EXP2_C1 6.9314694405e-1f
#define DQ__EXP2_C0 1.0000001192e+0f
DQ_INLINE float dq__exp2_core(float x, const int fused) {
    const float shifted = x + DQ__ROUND_MAGIC;
    const float f = x - (shifted - DQ__ROUND_MAGIC);
    float p = DQ__EXP2_C5;
    p = dq_madd(p, f, DQ__EXP2_C4, fused);
    p = dq_madd(p, f, DQ__EXP2_C3, fused);
    p = dq_madd(p, f, DQ__EXP2_C2, fused);
    p = dq_madd(p, f, DQ__EXP2_C1, fused);
    p = dq_madd(p, f, DQ__EXP2_C0, fused);
    return dq_bits_float(dq_float_bits(p) + (dq_float_bits(shifted) << 23));
}

/* NaN in, NaN out: the integer add would mangle it. */
DQ_INLINE float dq__exp2_in_range(float x, const int fused) {
    const float y = dq__exp2_core(x, fused);
    return x == x ? y : x;
}

/* 2^x for any x, clamped to [-125, 126]: 2^126 for +inf, 2^-125 for -inf. */
DQ_INLINE float dq_fast_exp2f(float x, const int fused) {
    /* selects that also send NaN to -125, a max and a min instruction */
    const float in = x;
    x = x > -125.0f ? x : -125.0f;
    x = x < 126.0f ? x : 126.0f;
    const float y = dq__exp2_core(x, fused);
    return in == in ? y : in;
}

/* t (1 - t), the sigmoid's derivative over its value: t - t t as one
 * multiply-add (the product exact, one rounding) with FMA, one operation
 * fewer than the product of t and 1 - t, which it keeps without. The size
 * penalty's gradient and d(step) use it, on every path alike. */
DQ_INLINE float dq__sigmoid_slope(float t, const int fused) {
    return fused ? fmaf(-t, t, t) : t * (1.0f - t);
}

/* x * -log2(e): one multiply, the value of -x * log2(e) but for a NaN's
 * sign (the AVX-512 steps, noise.c, do the same) */
DQ_INLINE float dq_fast_sigmoid(float x, const int fused) {
    return 1.0f / (1.0f + dq_fast_exp2f(x * -DQ__LOG2E, fused));
}

/* ---- the size penalty's sum and max, shared by dq_size_forward_fast and
 * the noise forward at group_size 1 so both give the same bits */

/* Adds the sum of v[0..len) to *sum and raises *top to its max: the sum on
 * sixteen float lanes (64 values each for a full span, exact to ~1e-7)
 * then in double; the max as a SIMD reduction, exact in any order so every
 * instruction set gives the same value, NaN skipped. */
DQ_INLINE void dq__span_sum_max(const float *restrict v, int64_t len, double *sum, float *top) {
    enum { L = 16 };
    float lane_sum[L];
    for (int k = 0; k < L; ++k)
        lane_sum[k] = 0.0f;
    int64_t whole = len - len % L;
    for (int64_t j = 0; j < whole; j += L)
        for (int k = 0; k < L; ++k)
            lane_sum[k] += v[j + k];
    double span_sum = 0;
    for (int64_t j = whole; j < len; ++j)
        span_sum += v[j];
    for (int k = 0; k < L; ++k)
        span_sum += lane_sum[k];
    *sum += span_sum;
    float span_top = -INFINITY;
#pragma omp simd reduction(max : span_top)
    for (int64_t j = 0; j < len; ++j) {
        float b = v[j] == v[j] ? v[j] : -INFINITY;
        span_top = b > span_top ? b : span_top;
    }
    *top = span_top > *top ? span_top : *top;
}

/* Whether the bits are lo + (hi - lo) * sigmoid(logit), non-decreasing:
 * then the spans hold sigmoids, not bits. */
DQ_INLINE int dq__size_affine(const dq_bits_param *prm) {
    return prm->mode == DQ_PARAM_BITS && prm->max_bits >= prm->min_bits;
}

/* The spans of a chunk's values: DQ_SIZE_SPAN of them from the chunk's
 * first, the last one shorter. A writer puts the next len values at
 * dq__size_acc_next (len at most what is left of the span) and commits
 * them; finish gives the chunk's statistics. */
enum { DQ_SIZE_SPAN = 1024 };
typedef struct {
    float t[DQ_SIZE_SPAN];
    int64_t filled;
    double sum;
    float top;
} dq__size_acc;

DQ_INLINE void dq__size_acc_init(dq__size_acc *acc) {
    acc->filled = 0;
    acc->sum = 0;
    acc->top = -INFINITY;
}

DQ_INLINE float *dq__size_acc_next(dq__size_acc *acc) { return acc->t + acc->filled; }

DQ_INLINE void dq__size_acc_commit(dq__size_acc *acc, int64_t len) {
    assert(len >= 0 && acc->filled + len <= DQ_SIZE_SPAN);
    acc->filled += len;
    if (acc->filled == DQ_SIZE_SPAN) {
        dq__span_sum_max(acc->t, acc->filled, &acc->sum, &acc->top);
        acc->filled = 0;
    }
}

DQ_INLINE void dq__size_acc_finish(dq__size_acc *acc, const dq_bits_param *prm, int64_t count,
                                   dq_size_stats *out) {
    if (acc->filled)
        dq__span_sum_max(acc->t, acc->filled, &acc->sum, &acc->top);
    acc->filled = 0;
    double sum = acc->sum;
    float top = acc->top;
    if (dq__size_affine(prm)) {
        const float lo = prm->min_bits, hi = prm->max_bits;
        sum = (double)count * lo + (double)(hi - lo) * sum;
        top = top == -INFINITY ? -INFINITY : hi * top + (1.0f - top) * lo;
    }
    out->sum_bits = sum;
    out->max_bits = top;
}

/* 1 / (2^bits - 1) rounded to float, as torch evaluates it. */
DQ_INLINE float dq_step_of_bits(int bits) { return 1.0f / (float)((1 << bits) - 1); }

/* Step and top level of each width, indexed by width (checked to be
 * 1..15; entry 0 is never used for a level): folded by the compiler to the
 * same correctly rounded quotients dq_step_of_bits computes. */
static const float dq__step_of[16] = {
    1.0f,           1.0f / 1.0f,     1.0f / 3.0f,     1.0f / 7.0f,
    1.0f / 15.0f,   1.0f / 31.0f,    1.0f / 63.0f,    1.0f / 127.0f,
    1.0f / 255.0f,  1.0f / 511.0f,   1.0f / 1023.0f,  1.0f / 2047.0f,
    1.0f / 4095.0f, 1.0f / 8191.0f,  1.0f / 16383.0f, 1.0f / 32767.0f};
static const float dq__top_of[16] = {0.0f,    1.0f,    3.0f,    7.0f,    15.0f,   31.0f,
                                     63.0f,   127.0f,  255.0f,  511.0f,  1023.0f, 2047.0f,
                                     4095.0f, 8191.0f, 16383.0f, 32767.0f};

/* step[k] and top[k] of the width bits[k] for k < len (a width a value:
 * group_size=1); table lookups as AVX-512 permutes where the CPU has them. */
void dq__widths_each(const uint8_t *restrict bits, int64_t len, float *restrict step,
                     float *restrict top);

/* The same for values [0, len) of groups of 2^shift values (shift 1..4),
 * the first value starting a group: bits[g] is the width of group g. */
void dq__widths_grouped(const uint8_t *restrict bits, int shift, int64_t len,
                        float *restrict step, float *restrict top);

/* Per-element step and top level of a span, so that the level loop runs
 * over whole spans whatever the group size (groups of 8 are too short to
 * vectorize one by one). */
DQ_INLINE void dq__span_widths(int64_t group_size, const uint8_t *restrict bits, int64_t i0,
                                int64_t len, float *restrict step, float *restrict top) {
    const float *step_of = dq__step_of, *top_of = dq__top_of;
    if (group_size == 1) {
        dq__widths_each(bits + i0, len, step, top);
        return;
    }
    if (group_size <= 16 && (group_size & (group_size - 1)) == 0 && i0 % group_size == 0) {
        int shift = group_size == 2 ? 1 : group_size == 4 ? 2 : group_size == 8 ? 3 : 4;
        dq__widths_grouped(bits + i0 / group_size, shift, len, step, top);
        return;
    }
    /* one division for the first group, then group by group */
    int64_t g = i0 / group_size;
    int64_t j = 0, seg_end = DQ_MIN(len, (g + 1) * group_size - i0);
    while (j < len) {
        int b = bits[g] & 15;
        assert(b >= 1);
        const float s = step_of[b], t = top_of[b];
        for (int64_t k = j; k < seg_end; ++k) {
            step[k] = s;
            top[k] = t;
        }
        j = seg_end;
        seg_end = DQ_MIN(len, j + group_size);
        ++g;
    }
}

/* Groups per work chunk of the per-width split and merge: chunk c covers
 * groups [c * G, (c + 1) * G) with G * group_size about DQ_CHUNK values. */
DQ_INLINE int64_t dq__groups_per_chunk(int64_t group_size) {
    return group_size >= DQ_CHUNK ? 1 : DQ_CHUNK / group_size;
}

/* Each chunk's starting position in the per-width streams (laid out by
 * increasing width): pos[c * 16 + w]; totals[w] receives each stream's
 * length. Returns NULL when out of memory; the caller frees. */
int64_t *dq__width_positions(const uint8_t *restrict bits, int64_t ngroups, int64_t group_size,
                             int64_t totals[16], int nthreads);

/* The first index of p[from, to) holding value, or -1 (quantize.c): with
 * AVX-512 a compare mask sixteen values at a time, else
 * dq__first_index_blocks, the portable version tests also run. */
int64_t dq__first_index(const float *restrict p, int64_t from, int64_t to, float value);
int64_t dq__first_index_blocks(const float *restrict p, int64_t from, int64_t to, float value);

/* A range over no values yet (no ties counted, first indices unknown),
 * and a chunk's extrema and non-finite count added to one: drivers add
 * their chunks' ranges in chunk order, so an extremum held as -0.0 in one
 * chunk and +0.0 in another is the first chunk's whichever thread ran it. */
DQ_INLINE void dq__range_clear(dq_range *r) {
    r->min = INFINITY;
    r->max = -INFINITY;
    r->count_min = r->count_max = 0;
    r->first_min = r->first_max = -1;
    r->nonfinite = 0;
}

DQ_INLINE void dq__range_add(dq_range *r, const dq_range *part) {
    r->min = part->min < r->min ? part->min : r->min;
    r->max = part->max > r->max ? part->max : r->max;
    r->nonfinite += part->nonfinite;
}

/* The noise backward's gradient through the extrema (noise.c). */
void dq__add_extrema_grad(const float *grad, const float *restrict p, int64_t n, const dq_range *range,
                          double through_scale, float *grad_p, int only_extrema, int nthreads);

/* The group size a job's group_size means: 0 is one group of all n. */
DQ_INLINE int64_t dq__group_size_of(int64_t group_size, int64_t n) { return group_size > 0 ? group_size : n; }

/* Values in a chunk of the noise backward (group sizes up to DQ_CHUNK):
 * whole groups, about DQ_CHUNK values, so no group is cut. */
DQ_INLINE int64_t dq__grad_chunk(int64_t group_size) { return (DQ_CHUNK / group_size) * group_size; }

/* Number of fixed-size chunks covering n elements. */
static inline int64_t dq_num_chunks(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

#endif
