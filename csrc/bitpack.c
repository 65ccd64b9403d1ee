/* Bit-plane packing in diffq's on-disk layout (see diffq_c.h). */
#include <stdlib.h>

#include "dq_internal.h"

_Static_assert(DQ_PACK_LINE == 2048, "a packed line is 64 words of 32 values");
_Static_assert(sizeof(uint64_t) * 8 == DQ_PACK_STORAGE, "one storage word is 64 bits");

DQ_INLINE uint16_t value_at(const int16_t *restrict x, int64_t n, int64_t i) {
    return i < n ? (uint16_t)x[i] : 0;
}

void dq_pack_bits_ref(const int16_t *restrict x, int64_t n, int nbits, int64_t line_start,
                      int64_t line_count, uint64_t *restrict out) {
    assert(nbits >= 0 && nbits <= 16);
    for (int64_t line = line_start; line < line_start + line_count; ++line) {
        uint64_t *restrict words = out + line * nbits * DQ_PACK_BLOCK;
        memset(words, 0, (size_t)nbits * DQ_PACK_BLOCK * sizeof(uint64_t));
        for (int k = 0; k < DQ_PACK_STORAGE; ++k)
            for (int b = 0; b < nbits; ++b)
                for (int j = 0; j < DQ_PACK_BLOCK; ++j) {
                    uint16_t v = value_at(x, n, line * DQ_PACK_LINE + k * DQ_PACK_BLOCK + j);
                    words[b * DQ_PACK_BLOCK + j] |= (uint64_t)((v >> b) & 1u) << k;
                }
    }
}

/* One full line: value k*32 + j goes to bit k of word b*32 + j for each of
 * its bits b. The inner loop runs over the 32 words of a bit plane, which
 * the compiler turns into wide shifts and ors. */
DQ_INLINE void pack_line(const uint16_t *restrict v, int nbits, uint64_t *restrict words) {
    /* bits 0..31 and 32..63 of each word gathered apart, on 32-bit lanes
     * (twice as many per vector as 64-bit ones), joined at the end */
    uint32_t lo[16][DQ_PACK_BLOCK], hi[16][DQ_PACK_BLOCK];
    for (int b = 0; b < nbits; ++b)
        for (int j = 0; j < DQ_PACK_BLOCK; ++j)
            lo[b][j] = hi[b][j] = 0;
    for (int k = 0; k < DQ_PACK_STORAGE; ++k) {
        const uint16_t *restrict row = v + k * DQ_PACK_BLOCK;
        const int shift = k & 31;
        uint32_t (*half)[DQ_PACK_BLOCK] = k < 32 ? lo : hi;
        for (int b = 0; b < nbits; ++b)
            for (int j = 0; j < DQ_PACK_BLOCK; ++j)
                half[b][j] |= (((uint32_t)row[j] >> b) & 1u) << shift;
    }
    for (int b = 0; b < nbits; ++b)
        for (int j = 0; j < DQ_PACK_BLOCK; ++j)
            words[b * DQ_PACK_BLOCK + j] = (uint64_t)lo[b][j] | ((uint64_t)hi[b][j] << 32);
}

DQ_FAST
void dq_pack_bits_fast(const int16_t *restrict x, int64_t n, int nbits, int64_t line_start,
                       int64_t line_count, uint64_t *restrict out) {
    assert(nbits >= 0 && nbits <= 16);
    uint16_t pad[DQ_PACK_LINE];
    for (int64_t line = line_start; line < line_start + line_count; ++line) {
        int64_t first = line * DQ_PACK_LINE;
        const uint16_t *src = (const uint16_t *)x + first;
        if (first + DQ_PACK_LINE > n) {
            /* the last line is padded with zeros, as diffq does */
            int64_t have = n - first;
            memset(pad, 0, sizeof pad);
            if (have > 0)
                memcpy(pad, src, (size_t)have * sizeof(uint16_t));
            src = pad;
        }
        pack_line(src, nbits, out + line * nbits * DQ_PACK_BLOCK);
    }
}

void dq_pack_bits(const int16_t *restrict x, int64_t n, int nbits, uint64_t *restrict out,
                  int nthreads) {
    int64_t lines = dq_pack_lines(n);
    const int64_t per_chunk = DQ_CHUNK / DQ_PACK_LINE;
    int64_t chunks = dq_num_chunks(lines, per_chunk);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t first = c * per_chunk;
        dq_pack_bits_fast(x, n, nbits, first, DQ_MIN(per_chunk, lines - first), out);
    }
}

void dq_unpack_bits_ref(const uint64_t *restrict packed, int64_t lines, int nbits,
                        int64_t line_start, int64_t line_count, int64_t n,
                        int16_t *restrict out) {
    assert(nbits >= 0 && nbits <= 16);
    assert(line_start + line_count <= lines);
    (void)lines;
    for (int64_t line = line_start; line < line_start + line_count; ++line) {
        const uint64_t *restrict words = packed + line * nbits * DQ_PACK_BLOCK;
        for (int k = 0; k < DQ_PACK_STORAGE; ++k)
            for (int j = 0; j < DQ_PACK_BLOCK; ++j) {
                int64_t i = line * DQ_PACK_LINE + k * DQ_PACK_BLOCK + j;
                if (i >= n)
                    continue;
                uint16_t v = 0;
                for (int b = 0; b < nbits; ++b)
                    v |= (uint16_t)(((words[b * DQ_PACK_BLOCK + j] >> k) & 1u) << b);
                out[i] = (int16_t)v;
            }
    }
}

/* One full line back into 2048 values. The words are first split into
 * 32-bit halves (bits 0..31 and 32..63 of each plane) so that the inner
 * loops run on 32-bit lanes, twice as many per vector as 64-bit ones. */
DQ_INLINE void unpack_line(const uint64_t *restrict words, int nbits, uint16_t *restrict v) {
    uint32_t lo[16][DQ_PACK_BLOCK], hi[16][DQ_PACK_BLOCK];
    for (int b = 0; b < nbits; ++b)
        for (int j = 0; j < DQ_PACK_BLOCK; ++j) {
            lo[b][j] = (uint32_t)words[b * DQ_PACK_BLOCK + j];
            hi[b][j] = (uint32_t)(words[b * DQ_PACK_BLOCK + j] >> 32);
        }
    for (int k = 0; k < DQ_PACK_STORAGE; ++k) {
        const int shift = k & 31;
        uint32_t (*half)[DQ_PACK_BLOCK] = k < 32 ? lo : hi;
        uint32_t acc[DQ_PACK_BLOCK];
        for (int j = 0; j < DQ_PACK_BLOCK; ++j)
            acc[j] = 0;
        for (int b = 0; b < nbits; ++b)
            for (int j = 0; j < DQ_PACK_BLOCK; ++j)
                acc[j] |= ((half[b][j] >> shift) & 1u) << b;
        uint16_t *restrict row = v + k * DQ_PACK_BLOCK;
        for (int j = 0; j < DQ_PACK_BLOCK; ++j)
            row[j] = (uint16_t)acc[j];
    }
}

DQ_FAST
void dq_unpack_bits_fast(const uint64_t *restrict packed, int64_t lines, int nbits,
                         int64_t line_start, int64_t line_count, int64_t n,
                         int16_t *restrict out) {
    assert(nbits >= 0 && nbits <= 16);
    assert(line_start + line_count <= lines);
    (void)lines;
    uint16_t pad[DQ_PACK_LINE];
    for (int64_t line = line_start; line < line_start + line_count; ++line) {
        int64_t first = line * DQ_PACK_LINE;
        if (first >= n)
            break;
        const uint64_t *restrict words = packed + line * nbits * DQ_PACK_BLOCK;
        if (first + DQ_PACK_LINE <= n) {
            unpack_line(words, nbits, (uint16_t *)out + first);
        } else {
            unpack_line(words, nbits, pad);
            memcpy(out + first, pad, (size_t)(n - first) * sizeof(uint16_t));
        }
    }
}

void dq_unpack_bits(const uint64_t *restrict packed, int64_t lines, int nbits, int64_t n,
                    int16_t *restrict out, int nthreads) {
    assert(n <= lines * DQ_PACK_LINE);
    /* only the lines holding the n values: with nbits 0 a buffer of no
     * words may claim any number of lines, and walking them all would take
     * as long as the claim is large */
    int64_t used = DQ_MIN(lines, dq_pack_lines(n));
    const int64_t per_chunk = DQ_CHUNK / DQ_PACK_LINE;
    int64_t chunks = dq_num_chunks(used, per_chunk);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t first = c * per_chunk;
        dq_unpack_bits_fast(packed, lines, nbits, first, DQ_MIN(per_chunk, used - first), n,
                            out);
    }
}

/* ------------------------------------------ splitting levels by bit width */

/* Groups per work chunk of the split and merge: chunk c covers groups
 * [c * G, (c + 1) * G) with G * group_size about DQ_CHUNK values. */
#define groups_per_chunk dq__groups_per_chunk

/* count[w] = groups of width w (bits taken mod 16) among bits[0..m). A
 * chunk of one width (the common case: widths move slowly, and all start
 * equal) is found by one vectorized pass; otherwise one increment a group. */
DQ_FAST
static void count_widths(const uint8_t *restrict bits, int64_t m, int64_t count[16]) {
    for (int w = 0; w < 16; ++w)
        count[w] = 0;
    if (m == 0)
        return;
    const uint8_t first = bits[0] & 15;
    uint8_t differs = 0;
    for (int64_t g = 0; g < m; ++g)
        differs |= (uint8_t)((bits[g] & 15) ^ first);
    if (!differs) {
        count[first] = m;
        return;
    }
    for (int64_t g = 0; g < m; ++g)
        ++count[bits[g] & 15];
}

/* counts[c * 16 + w]: values of width w in chunk c; then turned in place
 * into each chunk's write (or read) position of width w in the streams,
 * streams laid out by increasing width. */
int64_t *dq__width_positions(const uint8_t *restrict bits, int64_t ngroups, int64_t group_size,
                                int64_t totals[16], int nthreads) {
    const int64_t per = groups_per_chunk(group_size);
    const int64_t chunks = dq_num_chunks(ngroups, per);
    int64_t *pos = calloc((size_t)(chunks > 0 ? chunks : 1) * 16, sizeof(int64_t));
    if (!pos)
        return NULL;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t count[16];
        count_widths(bits + c * per, DQ_MIN(ngroups, (c + 1) * per) - c * per, count);
        for (int w = 0; w < 16; ++w)
            pos[c * 16 + w] = count[w] * group_size;
    }
    int64_t offset = 0;
    for (int w = 0; w < 16; ++w) {
        int64_t total = 0;
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t here = pos[c * 16 + w];
            pos[c * 16 + w] = offset + total;
            total += here;
        }
        totals[w] = total;
        offset += total;
    }
    return pos;
}

/* Where a chunk's values of one width land: [begin, end) of that width's
 * own stream (the lines at either end may be shared with the next chunk;
 * see line_shared). */
typedef struct {
    int64_t begin, end;
} stream_range;

/* Each chunk's range in every width's stream. Groups of up to DQ_CHUNK
 * values: chunks of whole groups, counted in parallel. Larger groups (one
 * group per tensor, say): chunks of DQ_CHUNK values, so that a single group
 * is still split among the threads; the groups are few, counted serially. */
static stream_range *chunk_ranges(const uint8_t *restrict bits, int64_t ngroups, int64_t group_size,
                                  int64_t chunk_len, int64_t chunks, int64_t totals[16],
                                  int nthreads) {
    stream_range *ranges = malloc((size_t)(chunks > 0 ? chunks : 1) * 16 * sizeof(stream_range));
    if (!ranges)
        return NULL;
    int64_t begin_of[16];
    if (group_size <= DQ_CHUNK) {
        int64_t *pos = dq__width_positions(bits, ngroups, group_size, totals, nthreads);
        if (!pos) {
            free(ranges);
            return NULL;
        }
        int64_t offset = 0;
        for (int w = 0; w < 16; ++w) {
            begin_of[w] = offset; /* pos runs through the widths one after another */
            offset += totals[w];
        }
        for (int64_t c = 0; c < chunks; ++c)
            for (int w = 0; w < 16; ++w)
                ranges[c * 16 + w].begin = pos[c * 16 + w] - begin_of[w];
        free(pos);
    } else {
        int64_t count[16] = {0};
        int64_t g = 0; /* the group holding the chunk's first value */
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t first = c * chunk_len;
            for (; (g + 1) * group_size <= first; ++g)
                count[bits[g] & 15] += group_size;
            for (int w = 0; w < 16; ++w)
                ranges[c * 16 + w].begin = count[w] + ((bits[g] & 15) == w ? first - g * group_size : 0);
        }
        int64_t groups[16];
        count_widths(bits, ngroups, groups);
        for (int w = 0; w < 16; ++w)
            totals[w] = groups[w] * group_size;
    }
    for (int64_t c = 0; c < chunks; ++c)
        for (int w = 0; w < 16; ++w)
            ranges[c * 16 + w].end = c + 1 < chunks ? ranges[(c + 1) * 16 + w].begin : totals[w];
    return ranges;
}

/* Values per work chunk for chunk_ranges: whole groups up to DQ_CHUNK
 * values, DQ_CHUNK values of one group beyond. */
static int64_t chunk_len_of(int64_t group_size) {
    return group_size <= DQ_CHUNK ? dq__groups_per_chunk(group_size) * group_size : DQ_CHUNK;
}

/* How a parameter's values are cut into work chunks, and each chunk's
 * range in every width's stream (ranges: chunks * 16, the caller frees). */
typedef struct {
    int64_t n, chunk_len, chunks;
    int64_t totals[16];
    stream_range *ranges;
} chunk_plan;

static int plan_chunks(const uint8_t *restrict bits, int64_t ngroups, int64_t group_size, int nthreads,
                       chunk_plan *plan) {
    plan->n = ngroups * group_size;
    plan->chunk_len = chunk_len_of(group_size);
    plan->chunks = dq_num_chunks(plan->n, plan->chunk_len);
    plan->ranges =
        chunk_ranges(bits, ngroups, group_size, plan->chunk_len, plan->chunks, plan->totals, nthreads);
    return plan->ranges ? DQ_OK : DQ_ERR_NOMEM;
}

int dq_split_by_width(const void *restrict levels, int level_bytes, int64_t group_size,
                      const uint8_t *restrict bits, int64_t ngroups, int16_t *restrict streams,
                      int64_t totals[16], int nthreads) {
    assert(group_size > 0 && (level_bytes == 1 || level_bytes == 2));
    int64_t *pos = dq__width_positions(bits, ngroups, group_size, totals, nthreads);
    if (!pos)
        return DQ_ERR_NOMEM;
    const int64_t per = groups_per_chunk(group_size);
    const int64_t chunks = dq_num_chunks(ngroups, per);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t *at = pos + c * 16;
        if (group_size == 1) {
            const int64_t end = DQ_MIN(ngroups, (c + 1) * per);
            if (level_bytes == 1)
                for (int64_t g = c * per; g < end; ++g)
                    streams[at[bits[g] & 15]++] = ((const uint8_t *)levels)[g];
            else
                for (int64_t g = c * per; g < end; ++g)
                    streams[at[bits[g] & 15]++] = ((const int16_t *)levels)[g];
            continue;
        }
        for (int64_t g = c * per; g < DQ_MIN(ngroups, (c + 1) * per); ++g) {
            int16_t *restrict dst = streams + at[bits[g] & 15];
            at[bits[g] & 15] += group_size;
            if (level_bytes == 1) {
                const uint8_t *restrict src = (const uint8_t *)levels + g * group_size;
                for (int64_t j = 0; j < group_size; ++j)
                    dst[j] = src[j];
            } else {
                const int16_t *restrict src = (const int16_t *)levels + g * group_size;
                for (int64_t j = 0; j < group_size; ++j)
                    dst[j] = src[j];
            }
        }
    }
    free(pos);
    return DQ_OK;
}

int dq_merge_by_width(const int16_t *restrict streams, int64_t group_size,
                      const uint8_t *restrict bits, int64_t ngroups, int16_t *restrict levels,
                      int nthreads) {
    assert(group_size > 0);
    int64_t totals[16];
    int64_t *pos = dq__width_positions(bits, ngroups, group_size, totals, nthreads);
    if (!pos)
        return DQ_ERR_NOMEM;
    const int64_t per = groups_per_chunk(group_size);
    const int64_t chunks = dq_num_chunks(ngroups, per);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t *at = pos + c * 16;
        if (group_size == 1) {
            const int64_t end = DQ_MIN(ngroups, (c + 1) * per);
            for (int64_t g = c * per; g < end; ++g)
                levels[g] = streams[at[bits[g] & 15]++];
            continue;
        }
        for (int64_t g = c * per; g < DQ_MIN(ngroups, (c + 1) * per); ++g) {
            const int16_t *restrict src = streams + at[bits[g] & 15];
            at[bits[g] & 15] += group_size;
            int16_t *restrict dst = levels + g * group_size;
            for (int64_t j = 0; j < group_size; ++j)
                dst[j] = src[j];
        }
    }
    free(pos);
    return DQ_OK;
}

int64_t dq_widths_from_stored(const int16_t *restrict stored, int64_t n, int offset,
                              uint8_t *restrict widths, int64_t counts[16], int nthreads) {
    for (int w = 0; w < 16; ++w)
        counts[w] = 0;
    int64_t first_bad = INT64_MAX;
    const int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    (void)nthreads;
    /* counted and checked first: nothing is written for a bad input */
#pragma omp parallel num_threads(nthreads) if (chunks > 1)
    {
        int64_t local[16] = {0};
        int64_t bad = INT64_MAX;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t end = DQ_MIN(n, (c + 1) * DQ_CHUNK);
            uint32_t out_of_range = 0;
            for (int64_t i = c * DQ_CHUNK; i < end; ++i)
                out_of_range |= (uint32_t)((int32_t)stored[i] + offset - 1) > 14u;
            if (out_of_range) {
                for (int64_t i = c * DQ_CHUNK; i < end && bad == INT64_MAX; ++i)
                    if ((uint32_t)((int32_t)stored[i] + offset - 1) > 14u)
                        bad = i;
                continue;
            }
            for (int64_t i = c * DQ_CHUNK; i < end; ++i)
                ++local[(stored[i] + offset) & 15];
        }
#pragma omp critical
        {
            for (int w = 0; w < 16; ++w)
                counts[w] += local[w];
            first_bad = bad < first_bad ? bad : first_bad;
        }
    }
    if (first_bad != INT64_MAX)
        return first_bad;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t end = DQ_MIN(n, (c + 1) * DQ_CHUNK);
        for (int64_t i = c * DQ_CHUNK; i < end; ++i)
            widths[i] = (uint8_t)(stored[i] + offset);
    }
    return -1;
}

DQ_FAST
static void pack_widths_lines(const uint8_t *restrict w, int64_t n, int offset, int nbits,
                              int64_t line_start, int64_t line_count, uint64_t *restrict out) {
    uint16_t v[DQ_PACK_LINE];
    for (int64_t line = line_start; line < line_start + line_count; ++line) {
        const int64_t first = line * DQ_PACK_LINE;
        const int64_t have = DQ_MIN((int64_t)DQ_PACK_LINE, n - first);
        for (int64_t k = 0; k < have; ++k)
            v[k] = (uint16_t)(w[first + k] - offset);
        for (int64_t k = have; k < DQ_PACK_LINE; ++k)
            v[k] = 0;
        pack_line(v, nbits, out + line * nbits * DQ_PACK_BLOCK);
    }
}

void dq_pack_widths(const uint8_t *restrict widths, int64_t n, int offset, int nbits,
                    uint64_t *restrict out, int nthreads) {
    assert(nbits >= 0 && nbits <= 16);
    int64_t lines = dq_pack_lines(n);
    const int64_t per_chunk = DQ_CHUNK / DQ_PACK_LINE;
    int64_t chunks = dq_num_chunks(lines, per_chunk);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t first = c * per_chunk;
        pack_widths_lines(widths, n, offset, nbits, first, DQ_MIN(per_chunk, lines - first), out);
    }
}

/* ------------------------------------------- quantize straight into packs */

/* How many groups from bits[g] on have width w, at most `most`: eight
 * widths compared at once while they match. */
DQ_INLINE int64_t same_width_run(const uint8_t *restrict bits, int64_t g, int w, int64_t most) {
    const uint64_t want = 0x0101010101010101ull * (uint64_t)w;
    int64_t k = 0;
    for (; k + 8 <= most; k += 8) {
        uint64_t eight;
        memcpy(&eight, bits + g + k, sizeof eight);
        if ((eight & 0x0f0f0f0f0f0f0f0full) != want)
            break;
    }
    while (k < most && (bits[g + k] & 15) == w)
        ++k;
    return k;
}

int dq_width_totals(const uint8_t *restrict bits, int64_t ngroups, int64_t group_size,
                    int64_t totals[16], int nthreads) {
    int64_t *pos = dq__width_positions(bits, ngroups, group_size, totals, nthreads);
    if (!pos)
        return DQ_ERR_NOMEM;
    free(pos);
    return DQ_OK;
}

DQ_INLINE int line_shared(stream_range r, int64_t line, int64_t total) {
    int64_t line_begin = line * DQ_PACK_LINE, line_end = DQ_MIN(total, line_begin + DQ_PACK_LINE);
    return !(r.begin <= line_begin && line_end <= r.end);
}

/* One line of a width into its place: stored when this chunk holds the
 * whole line, ORed word by word (atomically) when another chunk writes part
 * of it too. */
DQ_INLINE void put_line(const uint16_t *restrict v, int nbits, int shared,
                        uint64_t *restrict words) {
    if (!shared) {
        pack_line(v, nbits, words);
        return;
    }
    uint64_t tmp[16 * DQ_PACK_BLOCK];
    pack_line(v, nbits, tmp);
    for (int k = 0; k < nbits * DQ_PACK_BLOCK; ++k)
        if (tmp[k])
            __atomic_fetch_or(&words[k], tmp[k], __ATOMIC_RELAXED);
}

/* Levels of elements [first, end) computed span by span, each group's
 * levels appended to its width's line buffer, full lines packed as they
 * fill. `stage` holds 16 lines of DQ_PACK_LINE values. */
DQ_FAST
static void quantize_pack_chunk(const float *restrict p, int64_t group_size,
                                const uint8_t *restrict bits, int64_t first, int64_t end,
                                float mn, float range, const stream_range ranges[16],
                                const int64_t totals[16], uint64_t *const out[16],
                                uint16_t (*restrict stage)[DQ_PACK_LINE]) {
    enum { SPAN = 512 };
    float step[SPAN], top[SPAN];
    uint16_t level[SPAN];
    int64_t at[16]; /* next stream position of each width */
    for (int w = 0; w < 16; ++w) {
        at[w] = ranges[w].begin;
        int64_t fill = at[w] % DQ_PACK_LINE;
        if (ranges[w].end > ranges[w].begin && fill)
            memset(stage[w], 0, (size_t)fill * sizeof(uint16_t)); /* another chunk's values */
    }
    int64_t g = first / group_size, within = first % group_size;
    for (int64_t i0 = first; i0 < end; i0 += SPAN) {
        int64_t len = DQ_MIN((int64_t)SPAN, end - i0);
        if (range == 0.0f) {
            memset(level, 0, sizeof level);
        } else {
            dq__span_widths(group_size, bits, i0, len, step, top);
            for (int64_t k = 0; k < len; ++k)
                level[k] = (uint16_t)(int32_t)dq_level(p[i0 + k], mn, range, step[k], top[k]);
        }
        int64_t k = 0;
        while (k < len) {
            const int w = bits[g] & 15;
            int64_t fill = at[w] % DQ_PACK_LINE;
            int64_t limit = DQ_MIN(len - k, DQ_PACK_LINE - fill);
            int64_t take = DQ_MIN(group_size - within, limit);
            if (take == group_size - within) {
                /* the whole groups after it that have the same width go in
                 * the same copy (all of them while widths are uniform) */
                take += group_size * same_width_run(bits, g + 1, w, (limit - take) / group_size);
            }
            if (take == 1)
                stage[w][fill] = level[k];
            else
                memcpy(stage[w] + fill, level + k, (size_t)take * sizeof(uint16_t));
            at[w] += take;
            k += take;
            within += take;
            if (within >= group_size) {
                g += within / group_size;
                within %= group_size;
            }
            if (fill + take == DQ_PACK_LINE) {
                int64_t line = (at[w] - 1) / DQ_PACK_LINE;
                put_line(stage[w], w, line_shared(ranges[w], line, totals[w]),
                         out[w] + line * w * DQ_PACK_BLOCK);
            }
        }
    }
    /* the last, partial line of each width, padded with zeros */
    for (int w = 0; w < 16; ++w) {
        int64_t fill = at[w] % DQ_PACK_LINE;
        if (ranges[w].end == ranges[w].begin || fill == 0)
            continue;
        memset(stage[w] + fill, 0, (size_t)(DQ_PACK_LINE - fill) * sizeof(uint16_t));
        int64_t line = at[w] / DQ_PACK_LINE;
        put_line(stage[w], w, line_shared(ranges[w], line, totals[w]),
                 out[w] + line * w * DQ_PACK_BLOCK);
    }
}

/* Runs fn on chunks 0..chunks-1 in parallel, each thread with its own 16
 * line buffers (one per width). DQ_OK, or DQ_ERR_NOMEM when a thread got no
 * buffers (its chunks did not run). */
typedef void (*staged_chunk_fn)(const void *args, int64_t c, uint16_t (*stage)[DQ_PACK_LINE]);

static int for_chunks_staged(int64_t chunks, int nthreads, staged_chunk_fn fn, const void *args) {
    int err = DQ_OK;
    (void)nthreads;
#pragma omp parallel num_threads(nthreads) if (chunks > 1)
    {
        uint16_t (*stage)[DQ_PACK_LINE] = malloc(16 * sizeof *stage);
        if (!stage) {
#pragma omp atomic write
            err = DQ_ERR_NOMEM;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c)
            if (stage)
                fn(args, c, stage);
        free(stage);
    }
    return err;
}

typedef struct {
    const float *p;
    int64_t group_size;
    const uint8_t *bits;
    float mn, range;
    const chunk_plan *plan;
    uint64_t *const *out;
} quantize_pack_args;

static void quantize_pack_one(const void *args, int64_t c, uint16_t (*stage)[DQ_PACK_LINE]) {
    const quantize_pack_args *a = args;
    const chunk_plan *plan = a->plan;
    quantize_pack_chunk(a->p, a->group_size, a->bits, c * plan->chunk_len,
                        DQ_MIN(plan->n, (c + 1) * plan->chunk_len), a->mn, a->range, plan->ranges + c * 16,
                        plan->totals, a->out, stage);
}

int dq_quantize_pack(const float *restrict p, int64_t group_size, const uint8_t *restrict bits,
                     int64_t ngroups, float mn, float range, uint64_t *const out[16],
                     int nthreads) {
    assert(group_size > 0);
    chunk_plan plan;
    if (plan_chunks(bits, ngroups, group_size, nthreads, &plan) != DQ_OK)
        return DQ_ERR_NOMEM;
    const int64_t *totals = plan.totals;
    /* lines that more than one chunk writes start at zero */
    for (int64_t c = 0; c < plan.chunks; ++c)
        for (int w = 1; w < 16; ++w) {
            stream_range r = plan.ranges[c * 16 + w];
            assert(r.end == r.begin || out[w]);
            if (r.end == r.begin)
                continue;
            int64_t lines[2] = {r.begin / DQ_PACK_LINE, (r.end - 1) / DQ_PACK_LINE};
            for (int e = 0; e < 2; ++e)
                if (line_shared(r, lines[e], totals[w]))
                    memset(out[w] + lines[e] * w * DQ_PACK_BLOCK, 0,
                           (size_t)w * DQ_PACK_BLOCK * sizeof(uint64_t));
        }
    const quantize_pack_args args = {p, group_size, bits, mn, range, &plan, out};
    int err = for_chunks_staged(plan.chunks, nthreads, quantize_pack_one, &args);
    free(plan.ranges);
    return err;
}

/* ------------------------------------- dequantize straight from packs */

/* Values of elements [first, end): each group's segment read from its
 * width's stream, one unpacked line at a time (the line in `stage[w]` is
 * `held[w]`), and dequantized as dq_dequantize does. */
DQ_FAST
static void dequantize_packed_chunk(const uint64_t *const packed[16], int64_t group_size,
                                    const uint8_t *restrict bits, int64_t first, int64_t end,
                                    float mn, float range, const stream_range ranges[16],
                                    float *restrict out, uint16_t (*restrict stage)[DQ_PACK_LINE]) {
    const float *unit = dq__step_of;
    int64_t at[16], held[16];
    for (int w = 0; w < 16; ++w) {
        at[w] = ranges[w].begin;
        held[w] = -1;
    }
    int64_t g = first / group_size, within = first % group_size;
    for (int64_t i = first; i < end;) {
        const int w = bits[g] & 15;
        const int64_t line = at[w] / DQ_PACK_LINE, from = at[w] % DQ_PACK_LINE;
        if (held[w] != line) {
            unpack_line(packed[w] + line * w * DQ_PACK_BLOCK, w, stage[w]);
            held[w] = line;
        }
        const int64_t limit = DQ_MIN(end - i, DQ_PACK_LINE - from);
        int64_t take = DQ_MIN(group_size - within, limit);
        if (take == group_size - within) {
            /* the whole groups after it that have the same width come from
             * the same line: one loop for all of them */
            take += group_size * same_width_run(bits, g + 1, w, (limit - take) / group_size);
        }
        const float u = unit[w];
        const uint16_t *restrict src = stage[w] + from;
        float *restrict dst = out + i;
        /* the same operations, in the same order, as dq_dequantize */
        for (int64_t j = 0; j < take; ++j)
            dst[j] = ((float)src[j] * u) * range + mn;
        at[w] += take;
        i += take;
        within += take;
        if (within >= group_size) {
            g += within / group_size;
            within %= group_size;
        }
    }
}

typedef struct {
    const uint64_t *const *packed;
    int64_t group_size;
    const uint8_t *bits;
    float mn, range;
    const chunk_plan *plan;
    float *out;
} dequantize_packed_args;

static void dequantize_packed_one(const void *args, int64_t c, uint16_t (*stage)[DQ_PACK_LINE]) {
    const dequantize_packed_args *a = args;
    const chunk_plan *plan = a->plan;
    dequantize_packed_chunk(a->packed, a->group_size, a->bits, c * plan->chunk_len,
                            DQ_MIN(plan->n, (c + 1) * plan->chunk_len), a->mn, a->range, plan->ranges + c * 16,
                            a->out, stage);
}

int dq_dequantize_packed(const uint64_t *const packed[16], const int64_t lines[16],
                         int64_t group_size, const uint8_t *restrict bits, int64_t ngroups,
                         float mn, float range, float *restrict out, int nthreads) {
    assert(group_size > 0);
    chunk_plan plan;
    if (plan_chunks(bits, ngroups, group_size, nthreads, &plan) != DQ_OK)
        return DQ_ERR_NOMEM;
    for (int w = 0; w < 16; ++w)
        if (plan.totals[w] && (w == 0 || !packed[w] || lines[w] < dq_pack_lines(plan.totals[w]))) {
            free(plan.ranges);
            return DQ_ERR_PACK_SHORT;
        }
    const dequantize_packed_args args = {packed, group_size, bits, mn, range, &plan, out};
    int err = for_chunks_staged(plan.chunks, nthreads, dequantize_packed_one, &args);
    free(plan.ranges);
    return err;
}
