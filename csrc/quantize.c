/* Grouped uniform quantization: per-tensor range, per-group bit widths. */
#include "dq_internal.h"

DQ_INLINE int is_nonfinite(float x) {
    return (dq_float_bits(x) & 0x7f800000u) == 0x7f800000u;
}

void dq_range_ref(const float *restrict x, int64_t start, int64_t count, dq_range *out) {
    float mn = INFINITY, mx = -INFINITY;
    int64_t bad = 0;
    for (int64_t i = start; i < start + count; ++i) {
        if (is_nonfinite(x[i])) {
            ++bad;
            continue;
        }
        if (x[i] < mn)
            mn = x[i];
        if (x[i] > mx)
            mx = x[i];
    }
    out->min = mn;
    out->max = mx;
    out->count_min = out->count_max = 0;
    out->first_min = out->first_max = -1;
    out->nonfinite = bad;
}

/* v[0, lanes) into the first `lanes` lanes of running minima, maxima and
 * NaN flags (see dq_range_fast) */
DQ_INLINE void range_lanes(const float *restrict v, int lanes, float *restrict mn, float *restrict mx,
                           float *restrict nan) {
    for (int k = 0; k < lanes; ++k) {
        const float x = v[k];
        mn[k] = x < mn[k] ? x : mn[k];
        mx[k] = x > mx[k] ? x : mx[k];
        nan[k] = x != x ? 1.0f : nan[k];
    }
}

DQ_FAST
void dq_range_fast(const float *restrict x, int64_t start, int64_t count, dq_range *out) {
    /* Sixty-four lanes of running extrema and a NaN flag, selects only, so
     * the loop vectorizes: four registers a quantity, four independent
     * chains of min, max and select (with one register each, the chains'
     * latency bound the loop: a third slower from L2). NaN never wins a
     * comparison; infinities do, and show up as infinite extrema. Either
     * case is rare: it is then recounted by the reference, which leaves
     * non-finite values out. */
    enum { L = 64, S = 16 };
    float mn[L], mx[L], nan[L]; /* nan as float: an int lane would stop the vectorizer */
    for (int k = 0; k < L; ++k) {
        mn[k] = INFINITY;
        mx[k] = -INFINITY;
        nan[k] = 0.0f;
    }
    const float *restrict xs = x + start;
    int64_t i = 0;
    for (; i + L <= count; i += L) {
        dq__prefetch(x, start + i, L, start + count);
        range_lanes(xs + i, L, mn, mx, nan);
    }
    /* what is left a vector at a time into the first lanes, then the lanes
     * folded in halves: a tensor of a few hundred values (a model's small
     * biases and norms, hundreds of them) spent most of its range pass in
     * a scalar tail and a 64-step scalar reduction */
    for (; i + S <= count; i += S)
        range_lanes(xs + i, S, mn, mx, nan);
    for (int w = L / 2; w >= S; w /= 2)
        for (int k = 0; k < w; ++k) {
            mn[k] = mn[k + w] < mn[k] ? mn[k + w] : mn[k];
            mx[k] = mx[k + w] > mx[k] ? mx[k + w] : mx[k];
            nan[k] = nan[k + w] != 0.0f ? 1.0f : nan[k];
        }
    float rmn = INFINITY, rmx = -INFINITY;
    int32_t any_nan = 0;
    for (; i < count; ++i) {
        float v = xs[i];
        rmn = v < rmn ? v : rmn;
        rmx = v > rmx ? v : rmx;
        any_nan |= v != v;
    }
    for (int k = 0; k < S; ++k) {
        rmn = mn[k] < rmn ? mn[k] : rmn;
        rmx = mx[k] > rmx ? mx[k] : rmx;
        any_nan |= nan[k] != 0.0f;
    }
    if (any_nan || is_nonfinite(rmn) || is_nonfinite(rmx)) {
        dq_range_ref(x, start, count, out);
        return;
    }
    out->min = rmn;
    out->max = rmx;
    out->count_min = out->count_max = 0;
    out->first_min = out->first_max = -1;
    out->nonfinite = 0;
}

#if DQ_X86_AVX512
#include <immintrin.h>

/* Sixteen values a compare, the first match read off the compare's mask:
 * no element-by-element pass over the block that holds it. A model's
 * small tensors (hundreds of biases and norms of a few hundred values)
 * spent more in the two searches a forward makes per tensor than in
 * their noise. */
__attribute__((target("avx512f"))) static int64_t first_index_avx512(const float *restrict p, int64_t from,
                                                                     int64_t to, float value) {
    const __m512 v = _mm512_set1_ps(value);
    int64_t i = from;
    for (; i + 16 <= to; i += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + i), v, _CMP_EQ_OQ);
        if (hit)
            return i + __builtin_ctz(hit);
    }
    if (i < to) {
        /* masked-off lanes are neither loaded nor compared */
        const __mmask16 tail = (__mmask16)((1u << (to - i)) - 1u);
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, p + i), v, _CMP_EQ_OQ);
        if (hit)
            return i + __builtin_ctz(hit);
    }
    return -1;
}
#endif

/* Blocks of 256 compared as vectors, then the block holding the value
 * element by element: a loop that returns at the first match does not
 * vectorize, and at one compare a cycle a chunk took ~25 us, twice a
 * tensor, after every noise forward. */
DQ_FAST
int64_t dq__first_index_blocks(const float *restrict p, int64_t from, int64_t to, float value) {
    enum { BLOCK = 256 };
    for (int64_t base = from; base < to; base += BLOCK) {
        const int64_t end = DQ_MIN(to, base + BLOCK);
        int hit = 0;
        for (int64_t i = base; i < end; ++i)
            hit |= p[i] == value;
        if (!hit)
            continue;
        for (int64_t i = base; i < end; ++i)
            if (p[i] == value)
                return i;
    }
    return -1;
}

int64_t dq__first_index(const float *restrict p, int64_t from, int64_t to, float value) {
#if DQ_X86_AVX512
    if (dq__avx512_level() >= 1)
        return first_index_avx512(p, from, to, value);
#endif
    return dq__first_index_blocks(p, from, to, value);
}

void dq_range_all(const float *restrict x, int64_t n, dq_range *out, int nthreads) {
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    float mn = INFINITY, mx = -INFINITY;
    int64_t bad = 0;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1) \
    reduction(min : mn) reduction(max : mx) reduction(+ : bad)
    for (int64_t c = 0; c < chunks; ++c) {
        dq_range part;
        int64_t start = c * DQ_CHUNK;
        dq_range_fast(x, start, DQ_MIN(DQ_CHUNK, n - start), &part);
        mn = part.min < mn ? part.min : mn;
        mx = part.max > mx ? part.max : mx;
        bad += part.nonfinite;
    }
    out->min = mn;
    out->max = mx;
    out->count_min = out->count_max = 0;
    out->first_min = out->first_max = -1;
    out->nonfinite = bad;
}

#define step_of_bits dq_step_of_bits

/* ---- widths a value */

static void widths_each_scalar(const uint8_t *restrict bits, int64_t len, float *restrict step,
                               float *restrict top) {
    for (int64_t k = 0; k < len; ++k) {
        step[k] = dq__step_of[bits[k] & 15];
        top[k] = dq__top_of[bits[k] & 15];
    }
}

/* values [k, len) of groups of 2^shift values; bits[g] is group g's width */
static void widths_grouped_scalar(const uint8_t *restrict bits, int shift, int64_t k,
                                  int64_t len, float *restrict step, float *restrict top) {
    for (; k < len; ++k) {
        step[k] = dq__step_of[bits[k >> shift] & 15];
        top[k] = dq__top_of[bits[k >> shift] & 15];
    }
}

#if DQ_X86_AVX512
#include <immintrin.h>

/* vpermps looks up 16 values in a 16-entry table held in a register; it
 * reads the low four bits of each index, the `& 15` of the scalar loop. The
 * plain loop makes two scalar loads a value, and a table gather compiled
 * for AVX2 or SSE2 is slower still. */
__attribute__((target("avx512f"))) static void widths_each_avx512(const uint8_t *restrict bits,
                                                                  int64_t len,
                                                                  float *restrict step,
                                                                  float *restrict top) {
    const __m512 step_tab = _mm512_loadu_ps(dq__step_of), top_tab = _mm512_loadu_ps(dq__top_of);
    int64_t k = 0;
    for (; k + 16 <= len; k += 16) {
        __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bits + k)));
        _mm512_storeu_ps(step + k, _mm512_permutexvar_ps(idx, step_tab));
        _mm512_storeu_ps(top + k, _mm512_permutexvar_ps(idx, top_tab));
    }
    widths_each_scalar(bits + k, len - k, step + k, top + k);
}

/* Groups of 2^shift values (shift 1..4): the widths of the groups a
 * register of 16 values covers, loaded without reading past the last group,
 * spread to their values with one permute, then looked up as above. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void widths_grouped_avx512(
    const uint8_t *restrict bits, int shift, int64_t len, float *restrict step,
    float *restrict top) {
    const __m512 step_tab = _mm512_loadu_ps(dq__step_of), top_tab = _mm512_loadu_ps(dq__top_of);
    const __m512i spread = _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), (unsigned)shift);
    const int per = 16 >> shift; /* groups in 16 values */
    const __mmask16 first = (__mmask16)((1u << per) - 1u);
    int64_t k = 0;
    for (; k + 16 <= len; k += 16) {
        __m128i w = _mm_maskz_loadu_epi8(first, bits + (k >> shift));
        __m512i idx = _mm512_permutexvar_epi32(spread, _mm512_cvtepu8_epi32(w));
        _mm512_storeu_ps(step + k, _mm512_permutexvar_ps(idx, step_tab));
        _mm512_storeu_ps(top + k, _mm512_permutexvar_ps(idx, top_tab));
    }
    widths_grouped_scalar(bits, shift, k, len, step, top);
}

void dq__widths_each(const uint8_t *restrict bits, int64_t len, float *restrict step,
                     float *restrict top) {
    if (dq__avx512_level() >= 1)
        widths_each_avx512(bits, len, step, top);
    else
        widths_each_scalar(bits, len, step, top);
}

void dq__widths_grouped(const uint8_t *restrict bits, int shift, int64_t len,
                        float *restrict step, float *restrict top) {
    assert(shift >= 1 && shift <= 4);
    if (dq__avx512_level() == 2)
        widths_grouped_avx512(bits, shift, len, step, top);
    else
        widths_grouped_scalar(bits, shift, 0, len, step, top);
}
#else
void dq__widths_each(const uint8_t *restrict bits, int64_t len, float *restrict step,
                     float *restrict top) {
    widths_each_scalar(bits, len, step, top);
}

void dq__widths_grouped(const uint8_t *restrict bits, int shift, int64_t len,
                        float *restrict step, float *restrict top) {
    widths_grouped_scalar(bits, shift, 0, len, step, top);
}
#endif

DQ_INLINE void store_level(void *restrict levels, int level_bytes, int64_t i, float level) {
    if (level_bytes == 1)
        ((uint8_t *)levels)[i] = (uint8_t)level;
    else
        ((int16_t *)levels)[i] = (int16_t)level;
}

DQ_INLINE float load_level(const void *restrict levels, int level_bytes, int64_t i) {
    return level_bytes == 1 ? (float)((const uint8_t *)levels)[i]
                            : (float)((const int16_t *)levels)[i];
}

void dq_quantize_ref(const float *restrict p, int64_t group_size, const uint8_t *restrict bits,
                     float mn, float range, int64_t start, int64_t count,
                     void *restrict levels, int level_bytes) {
    assert(group_size > 0 && (level_bytes == 1 || level_bytes == 2));
    for (int64_t i = start; i < start + count; ++i) {
        int b = bits[i / group_size];
        assert(b >= 1 && b <= 15);
        float top = (float)((1 << b) - 1);
        float level = 0.0f;
        if (range != 0.0f) {
            level = rintf(((p[i] - mn) / range) / step_of_bits(b));
            /* only reachable by rounding at the ends; keeps levels in their width.
             * Written so that NaN (a NaN weight or range) becomes 0: casting
             * NaN to an integer would be undefined behaviour. */
            level = level > 0.0f ? (level < top ? level : top) : 0.0f;
        }
        store_level(levels, level_bytes, i, level);
    }
}

DQ_FAST
void dq_quantize_fast(const float *restrict p, int64_t group_size, const uint8_t *restrict bits,
                      float mn, float range, int64_t start, int64_t count,
                      void *restrict levels, int level_bytes) {
    assert(group_size > 0 && (level_bytes == 1 || level_bytes == 2));
    if (range == 0.0f) {
        memset((char *)levels + start * level_bytes, 0, (size_t)(count * level_bytes));
        return;
    }
    enum { SPAN = 512 };
    float step[SPAN], top[SPAN];
    int32_t level[SPAN];
    for (int64_t i0 = start; i0 < start + count; i0 += SPAN) {
        int64_t len = DQ_MIN((int64_t)SPAN, start + count - i0);
        const float *restrict ps = p + i0;
        dq__span_widths(group_size, bits, i0, len, step, top);
        for (int64_t k = 0; k < len; ++k) {
            level[k] = (int32_t)dq_level(ps[k], mn, range, step[k], top[k]);
        }
        if (level_bytes == 1) {
            uint8_t *restrict out = (uint8_t *)levels + i0;
            for (int64_t k = 0; k < len; ++k)
                out[k] = (uint8_t)level[k];
        } else {
            int16_t *restrict out = (int16_t *)levels + i0;
            for (int64_t k = 0; k < len; ++k)
                out[k] = (int16_t)level[k];
        }
    }
}

void dq_quantize(const float *restrict p, int64_t n, int64_t group_size,
                 const uint8_t *restrict bits, float mn, float range, void *restrict levels,
                 int level_bytes, int nthreads) {
    if (group_size <= 0)
        group_size = n > 0 ? n : 1;
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK;
        dq_quantize_fast(p, group_size, bits, mn, range, start, DQ_MIN(DQ_CHUNK, n - start),
                         levels, level_bytes);
    }
}

void dq_dequantize_ref(const void *restrict levels, int level_bytes, int64_t group_size,
                       const uint8_t *restrict bits, float mn, float range, int64_t start,
                       int64_t count, float *restrict out) {
    assert(group_size > 0 && (level_bytes == 1 || level_bytes == 2));
    for (int64_t i = start; i < start + count; ++i) {
        float unit = step_of_bits(bits[i / group_size]);
        out[i] = (load_level(levels, level_bytes, i) * unit) * range + mn;
    }
}

DQ_FAST
void dq_dequantize_fast(const void *restrict levels, int level_bytes, int64_t group_size,
                        const uint8_t *restrict bits, float mn, float range, int64_t start,
                        int64_t count, float *restrict out) {
    assert(group_size > 0 && (level_bytes == 1 || level_bytes == 2));
    enum { SPAN = 512 };
    float step[SPAN], top[SPAN], level[SPAN];
    for (int64_t i0 = start; i0 < start + count; i0 += SPAN) {
        int64_t len = DQ_MIN((int64_t)SPAN, start + count - i0);
        dq__span_widths(group_size, bits, i0, len, step, top);
        if (level_bytes == 1)
            for (int64_t k = 0; k < len; ++k)
                level[k] = (float)((const uint8_t *)levels)[i0 + k];
        else
            for (int64_t k = 0; k < len; ++k)
                level[k] = (float)((const int16_t *)levels)[i0 + k];
        float *restrict o = out + i0;
        for (int64_t k = 0; k < len; ++k)
            o[k] = (level[k] * step[k]) * range + mn;
    }
}

void dq_dequantize(const void *restrict levels, int level_bytes, int64_t n,
                   int64_t group_size, const uint8_t *restrict bits, float mn, float range,
                   float *restrict out, int nthreads) {
    if (group_size <= 0)
        group_size = n > 0 ? n : 1;
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK;
        dq_dequantize_fast(levels, level_bytes, group_size, bits, mn, range, start,
                           DQ_MIN(DQ_CHUNK, n - start), out);
    }
}

/* Whether levels [start, start + count) fit their groups' widths: an OR of
 * the bits above each width over group segments (vectorizable), the exact
 * index found only when something is wrong. */
DQ_FAST
static int64_t check_levels_chunk(const void *restrict levels, int level_bytes, int64_t group_size,
                                  const uint8_t *restrict bits, int64_t start, int64_t count) {
    int64_t i = start, end = start + count;
    if (group_size == 1) {
        /* widths outside 1..15 or levels above their width, in one OR */
        uint32_t above = 0;
        for (int64_t k = i; k < end; ++k) {
            uint32_t b = bits[k];
            uint32_t v = level_bytes == 1 ? ((const uint8_t *)levels)[k] : ((const uint16_t *)levels)[k];
            above |= (b - 1u > 14u) | (v >> (b & 15u));
        }
        if (!above)
            return -1;
        for (int64_t k = i; k < end; ++k) {
            int b = bits[k];
            int v = level_bytes == 1 ? ((const uint8_t *)levels)[k] : ((const int16_t *)levels)[k];
            if (b < 1 || b > 15 || v < 0 || v >= (1 << b))
                return k;
        }
        return -1;
    }
    /* group after group from one division */
    for (int64_t g = i / group_size; i < end; ++g) {
        int64_t seg_end = DQ_MIN(end, (g + 1) * group_size);
        int b = bits[g];
        if (b < 1 || b > 15)
            return i;
        uint32_t above = 0;
        if (level_bytes == 1) {
            const uint8_t *restrict lv = (const uint8_t *)levels;
            for (int64_t k = i; k < seg_end; ++k)
                above |= (uint32_t)lv[k] >> b;
        } else {
            const uint16_t *restrict lv = (const uint16_t *)levels; /* negatives: bit 15 set */
            for (int64_t k = i; k < seg_end; ++k)
                above |= (uint32_t)lv[k] >> b;
        }
        if (above) {
            for (int64_t k = i; k < seg_end; ++k) {
                int v = level_bytes == 1 ? ((const uint8_t *)levels)[k] : ((const int16_t *)levels)[k];
                if (v < 0 || v >= (1 << b))
                    return k;
            }
        }
        i = seg_end;
    }
    return -1;
}

int64_t dq_check_levels(const void *restrict levels, int level_bytes, int64_t n,
                        int64_t group_size, const uint8_t *restrict bits) {
    if (group_size <= 0)
        group_size = n > 0 ? n : 1;
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    int64_t first = INT64_MAX;
    /* the first bad index over all chunks, whatever order they finish in */
#pragma omp parallel for schedule(static) if (chunks > 1) reduction(min : first)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK;
        int64_t bad = check_levels_chunk(levels, level_bytes, group_size, bits, start,
                                         DQ_MIN(DQ_CHUNK, n - start));
        if (bad >= 0 && bad < first)
            first = bad;
    }
    return first == INT64_MAX ? -1 : first;
}

/* ------------------------------------------- stored bits, requantization */

void dq_stored_bits_ref(const float *restrict t, int64_t n, float min_bits, float max_bits,
                        float extra_bits, uint8_t *restrict out) {
    for (int64_t i = 0; i < n; ++i) {
        float b = extra_bits + (max_bits * t[i] + (1.0f - t[i]) * min_bits);
        b = rintf(b);
        b = b < 1.0f ? 1.0f : (b > 15.0f ? 15.0f : b);
        /* NaN (a NaN logit) stays NaN through the clamp: store 0, which no
         * valid width has, so the caller can refuse it */
        out[i] = b == b ? (uint8_t)(int32_t)b : 0;
    }
}

DQ_FAST
void dq_stored_bits_fast(const float *restrict t, int64_t start, int64_t count, float min_bits,
                         float max_bits, float extra_bits, uint8_t *restrict out) {
    for (int64_t i = start; i < start + count; ++i) {
        float b = extra_bits + (max_bits * t[i] + (1.0f - t[i]) * min_bits);
        b = rintf(b);
        b = b < 1.0f ? 1.0f : (b > 15.0f ? 15.0f : b);
        b = b == b ? b : 0.0f;
        out[i] = (uint8_t)(int32_t)b;
    }
}

void dq_stored_bits(const float *restrict t, int64_t n, float min_bits, float max_bits,
                    float extra_bits, uint8_t *restrict out, int nthreads) {
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK;
        dq_stored_bits_fast(t, start, DQ_MIN(DQ_CHUNK, n - start), min_bits, max_bits, extra_bits,
                            out);
    }
}

/* out = dequantize(quantize(p)) in one pass; out may be p itself (each
 * element is read before it is written, at the same index). */
DQ_FAST
void dq_requantize_fast(const float *p, int64_t group_size, const uint8_t *restrict bits, float mn,
                        float range, int64_t start, int64_t count, float *out) {
    assert(group_size > 0);
    enum { SPAN = 512 };
    float step[SPAN], top[SPAN], value[SPAN];
    for (int64_t i0 = start; i0 < start + count; i0 += SPAN) {
        int64_t len = DQ_MIN((int64_t)SPAN, start + count - i0);
        dq__prefetch(p, i0, len, start + count);
        dq__prefetch_w(out, i0, len, start + count);
        dq__span_widths(group_size, bits, i0, len, step, top);
        if (range == 0.0f) {
            for (int64_t k = 0; k < len; ++k)
                value[k] = (0.0f * step[k]) * range + mn;
        } else {
            for (int64_t k = 0; k < len; ++k) {
                value[k] = (dq_level(p[i0 + k], mn, range, step[k], top[k]) * step[k]) * range + mn;
            }
        }
        memcpy(out + i0, value, (size_t)len * sizeof(float));
    }
}

void dq_requantize(const float *p, int64_t n, int64_t group_size, const uint8_t *restrict bits,
                   float mn, float range, float *out, int nthreads) {
    if (group_size <= 0)
        group_size = n > 0 ? n : 1;
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK;
        dq_requantize_fast(p, group_size, bits, mn, range, start, DQ_MIN(DQ_CHUNK, n - start), out);
    }
}

