/* Bit-plane packing in diffq's on-disk layout (see diffq_c.h). */
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
    uint64_t acc[16][DQ_PACK_BLOCK];
    for (int b = 0; b < nbits; ++b)
        for (int j = 0; j < DQ_PACK_BLOCK; ++j)
            acc[b][j] = 0;
    for (int k = 0; k < DQ_PACK_STORAGE; ++k) {
        const uint16_t *restrict row = v + k * DQ_PACK_BLOCK;
        for (int b = 0; b < nbits; ++b)
            for (int j = 0; j < DQ_PACK_BLOCK; ++j)
                acc[b][j] |= (uint64_t)((row[j] >> b) & 1u) << k;
    }
    memcpy(words, acc, (size_t)nbits * DQ_PACK_BLOCK * sizeof(uint64_t));
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

DQ_INLINE void unpack_line(const uint64_t *restrict words, int nbits, uint16_t *restrict v) {
    for (int k = 0; k < DQ_PACK_STORAGE; ++k) {
        uint16_t *restrict row = v + k * DQ_PACK_BLOCK;
        for (int j = 0; j < DQ_PACK_BLOCK; ++j)
            row[j] = 0;
        for (int b = 0; b < nbits; ++b)
            for (int j = 0; j < DQ_PACK_BLOCK; ++j)
                row[j] |= (uint16_t)(((words[b * DQ_PACK_BLOCK + j] >> k) & 1u) << b);
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
