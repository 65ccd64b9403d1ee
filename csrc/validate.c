/* Validation of untrusted sizes and contents, shared by the binding and the
 * fuzz target. Nothing here reads outside the sizes it is given, and every
 * size product is checked for overflow before use. */
#include "dq_internal.h"

const char *dq_error_message(int err) {
    switch (err) {
    case DQ_OK: return "ok";
    case DQ_ERR_NONFINITE: return "non-finite values";
    case DQ_ERR_NOMEM: return "out of memory";
    case DQ_ERR_NBITS: return "bit planes outside 0..16";
    case DQ_ERR_PACK_SHAPE: return "packed buffer is not [lines, nbits, 32]";
    case DQ_ERR_PACK_SHORT: return "packed buffer holds fewer values than asked for";
    case DQ_ERR_OVERFLOW: return "size does not fit in 64 bits";
    case DQ_ERR_GROUPS: return "group count does not match the size and group_size";
    case DQ_ERR_BITS: return "bit width outside 1..15";
    case DQ_ERR_LEVEL: return "level does not fit in its bit width";
    case DQ_ERR_LEVEL_BYTES: return "levels must be uint8 (bits <= 8) or int16";
    case DQ_ERR_SIZE: return "negative size";
    }
    return "unknown error";
}

int dq_mul_size(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0)
        return 0;
    if (a != 0 && b > INT64_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

int dq_validate_packed(int64_t lines, int64_t nbits, int64_t block, int64_t words, int64_t n) {
    if (lines < 0 || words < 0 || n < 0)
        return DQ_ERR_SIZE;
    if (block != DQ_PACK_BLOCK)
        return DQ_ERR_PACK_SHAPE;
    if (nbits < 0 || nbits > 16)
        return DQ_ERR_NBITS;
    int64_t planes, expect, capacity;
    if (!dq_mul_size(lines, nbits, &planes) || !dq_mul_size(planes, DQ_PACK_BLOCK, &expect) ||
        !dq_mul_size(lines, DQ_PACK_LINE, &capacity))
        return DQ_ERR_OVERFLOW;
    if (expect != words)
        return DQ_ERR_PACK_SHAPE;
    if (n > capacity)
        return DQ_ERR_PACK_SHORT;
    return DQ_OK;
}

int dq_validate_levels(const void *levels, int level_bytes, int64_t n, int64_t group_size,
                       const uint8_t *bits, int64_t ngroups, int64_t *where) {
    if (where)
        *where = -1;
    if (n < 0 || group_size < 0 || ngroups < 0)
        return DQ_ERR_SIZE;
    if (level_bytes != 1 && level_bytes != 2)
        return DQ_ERR_LEVEL_BYTES;
    if (group_size == 0) {
        if (ngroups != 1)
            return DQ_ERR_GROUPS;
    } else {
        int64_t total;
        if (!dq_mul_size(ngroups, group_size, &total))
            return DQ_ERR_OVERFLOW;
        if (total != n)
            return DQ_ERR_GROUPS;
    }
    /* the widths in blocks with a branch-free test (bits as large as the
     * weight at group_size=1 must not cost a branch a byte); a block that
     * fails is searched for its first offender */
    const unsigned widest = level_bytes == 1 ? 8u : 15u;
    for (int64_t g0 = 0; g0 < ngroups; g0 += 4096) {
        int64_t g1 = DQ_MIN(ngroups, g0 + 4096);
        unsigned out_of_range = 0;
        for (int64_t g = g0; g < g1; ++g)
            out_of_range |= (unsigned)(uint8_t)(bits[g] - 1u) >= widest;
        if (!out_of_range)
            continue;
        for (int64_t g = g0; g < g1; ++g) {
            if (bits[g] < 1 || bits[g] > 15) {
                if (where)
                    *where = g;
                return DQ_ERR_BITS;
            }
            if (level_bytes == 1 && bits[g] > 8) {
                if (where)
                    *where = g;
                return DQ_ERR_LEVEL_BYTES;
            }
        }
    }
    if (levels) {
        int64_t bad = dq_check_levels(levels, level_bytes, n, group_size, bits);
        if (bad >= 0) {
            if (where)
                *where = bad;
            return DQ_ERR_LEVEL;
        }
    }
    return DQ_OK;
}
