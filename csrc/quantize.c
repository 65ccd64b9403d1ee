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
    out->nonfinite = bad;
}

DQ_FAST
void dq_range_fast(const float *restrict x, int64_t start, int64_t count, dq_range *out) {
    /* Eight lanes of running extrema; a non-finite value is replaced by a
     * neutral one so the select stays branch free and vectorizes. */
    float mn[8], mx[8];
    int32_t bad[8];
    for (int k = 0; k < 8; ++k) {
        mn[k] = INFINITY;
        mx[k] = -INFINITY;
        bad[k] = 0;
    }
    const float *restrict xs = x + start;
    int64_t i = 0;
    int64_t bad_total = 0;
    while (i + 8 <= count) {
        /* flush the int32 counters well before they could overflow */
        int64_t stop = DQ_MIN(count, i + ((int64_t)1 << 30)) - 8;
        for (; i <= stop; i += 8) {
            for (int k = 0; k < 8; ++k) {
                float v = xs[i + k];
                int nf = is_nonfinite(v);
                bad[k] += nf;
                float lo = nf ? INFINITY : v;
                float hi = nf ? -INFINITY : v;
                mn[k] = lo < mn[k] ? lo : mn[k];
                mx[k] = hi > mx[k] ? hi : mx[k];
            }
        }
        for (int k = 0; k < 8; ++k) {
            bad_total += bad[k];
            bad[k] = 0;
        }
    }
    dq_range tail;
    dq_range_ref(xs, i, count - i, &tail);
    float rmn = tail.min, rmx = tail.max;
    for (int k = 0; k < 8; ++k) {
        rmn = mn[k] < rmn ? mn[k] : rmn;
        rmx = mx[k] > rmx ? mx[k] : rmx;
    }
    out->min = rmn;
    out->max = rmx;
    out->count_min = out->count_max = 0;
    out->nonfinite = bad_total + tail.nonfinite;
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
    out->nonfinite = bad;
}

/* 1 / (2^bits - 1) rounded to float, as torch evaluates it. */
DQ_INLINE float step_of_bits(int bits) { return 1.0f / (float)((1 << bits) - 1); }

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
    int64_t i = start, end = start + count;
    while (i < end) {
        int64_t g = i / group_size;
        int64_t seg_end = DQ_MIN(end, (g + 1) * group_size);
        int b = bits[g];
        assert(b >= 1 && b <= 15);
        const float step = step_of_bits(b), top = (float)((1 << b) - 1);
        if (level_bytes == 1) {
            uint8_t *restrict out = (uint8_t *)levels;
            for (int64_t k = i; k < seg_end; ++k) {
                float level = rintf(((p[k] - mn) / range) / step);
                level = level > 0.0f ? (level < top ? level : top) : 0.0f; /* NaN -> 0 */
                out[k] = (uint8_t)(int32_t)level;
            }
        } else {
            int16_t *restrict out = (int16_t *)levels;
            for (int64_t k = i; k < seg_end; ++k) {
                float level = rintf(((p[k] - mn) / range) / step);
                level = level > 0.0f ? (level < top ? level : top) : 0.0f; /* NaN -> 0 */
                out[k] = (int16_t)(int32_t)level;
            }
        }
        i = seg_end;
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
    int64_t i = start, end = start + count;
    while (i < end) {
        int64_t g = i / group_size;
        int64_t seg_end = DQ_MIN(end, (g + 1) * group_size);
        const float unit = step_of_bits(bits[g]);
        if (level_bytes == 1) {
            const uint8_t *restrict lv = (const uint8_t *)levels;
            for (int64_t k = i; k < seg_end; ++k)
                out[k] = ((float)lv[k] * unit) * range + mn;
        } else {
            const int16_t *restrict lv = (const int16_t *)levels;
            for (int64_t k = i; k < seg_end; ++k)
                out[k] = ((float)lv[k] * unit) * range + mn;
        }
        i = seg_end;
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

int64_t dq_check_levels(const void *restrict levels, int level_bytes, int64_t n,
                        int64_t group_size, const uint8_t *restrict bits) {
    if (group_size <= 0)
        group_size = n > 0 ? n : 1;
    for (int64_t i = 0; i < n; ++i) {
        int b = bits[i / group_size];
        int v = level_bytes == 1 ? ((const uint8_t *)levels)[i] : ((const int16_t *)levels)[i];
        if (b < 1 || b > 15 || v < 0 || v >= (1 << b))
            return i;
    }
    return -1;
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

/* out = dequantize(quantize(p)) in one pass; out may be p itself. */
DQ_FAST
void dq_requantize_fast(const float *p, int64_t group_size, const uint8_t *restrict bits, float mn,
                        float range, int64_t start, int64_t count, float *out) {
    assert(group_size > 0);
    int64_t i = start, end = start + count;
    while (i < end) {
        int64_t g = i / group_size;
        int64_t seg_end = DQ_MIN(end, (g + 1) * group_size);
        int b = bits[g];
        assert(b >= 1 && b <= 15);
        const float step = step_of_bits(b), top = (float)((1 << b) - 1);
        if (range == 0.0f) {
            for (int64_t k = i; k < seg_end; ++k)
                out[k] = (0.0f * step) * range + mn;
        } else {
            for (int64_t k = i; k < seg_end; ++k) {
                float level = rintf(((p[k] - mn) / range) / step);
                level = level > 0.0f ? (level < top ? level : top) : 0.0f; /* NaN -> 0 */
                out[k] = (level * step) * range + mn;
            }
        }
        i = seg_end;
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
