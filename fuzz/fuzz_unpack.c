/* libFuzzer target: unpack + dequantize of arbitrary bytes, through the same
 * validation the binding applies (dq_validate_packed, dq_validate_levels),
 * and dequantizing straight from per-width packs (dq_dequantize_packed).
 *
 * Input layout (little endian):
 *   byte 0      nbits: bit planes claimed by the packed shape (any byte)
 *   byte 1      lines, low bits; byte 2 % 56: a left shift of it, so huge
 *               claims (up to 255 << 55) reach the overflow checks
 *   bytes 3-4   n: values to unpack
 *   byte 5      group_size (0: one group)
 *   bytes 6-7   ngroups: bit widths that follow
 *   byte 8      bit 0: levels as uint8 (else int16); bits 1-2: (min, range)
 *   ngroups bytes   bit width of each group (any byte)
 *   the rest    packed 64-bit words, as many whole words as there are
 *
 * The packed words are copied into a buffer of exactly that many words, so
 * AddressSanitizer reports any read past what the shape's checks allowed.
 * After a successful validation the target checks properties and aborts
 * when one fails: the fast kernels equal the references, unpacked values
 * fit their planes, pack(unpack(w)) unpacks to the same values, and
 * quantize(dequantize(levels)) gives the levels back.
 *
 * Built with clang -fsanitize=fuzzer,address,undefined (see fuzz/run.sh);
 * with -DDQ_FUZZ_REPLAY it gets a main() that runs the files named on the
 * command line, for compilers without libFuzzer. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diffq_c.h"

#define HEADER 9

/* finite (min, range) pairs; the binding refuses non-finite ones itself */
static const float SCALES[4][2] = {{-1.0f, 2.0f}, {0.0f, 1.0f}, {-0.125f, 0.0f}, {3.5f, 7.25f}};

static void fail(const char *what) {
    fprintf(stderr, "fuzz_unpack: property failed: %s\n", what);
    abort();
}

static uint16_t u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static void *alloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p)
        abort();
    return p;
}

static void check_dequantize(const int16_t *values, int64_t n, int64_t group_size,
                             const uint8_t *bits, int64_t ngroups, int level_bytes,
                             const float scale[2]) {
    /* the levels as the binding receives them: uint8 or int16 */
    void *levels = alloc((size_t)n * (size_t)level_bytes);
    for (int64_t i = 0; i < n; ++i) {
        if (level_bytes == 1)
            ((uint8_t *)levels)[i] = (uint8_t)values[i];
        else
            ((int16_t *)levels)[i] = values[i];
    }
    int64_t where;
    int err = dq_validate_levels(levels, level_bytes, n, group_size, bits, ngroups, &where);
    if (err == DQ_OK) {
        const float mn = scale[0], range = scale[1];
        float *out = alloc((size_t)n * sizeof(float)), *ref = alloc((size_t)n * sizeof(float));
        dq_dequantize(levels, level_bytes, n, group_size, bits, mn, range, out, 1);
        dq_dequantize_ref(levels, level_bytes, group_size ? group_size : (n ? n : 1), bits, mn,
                          range, 0, n, ref);
        if (n && memcmp(out, ref, (size_t)n * sizeof(float)))
            fail("dequantize fast != reference");
        for (int64_t i = 0; i < n; ++i)
            if (!(out[i] >= mn && out[i] <= mn + range * 1.0001f))
                fail("dequantized value outside [min, min + range]");
        void *back = alloc((size_t)n * (size_t)level_bytes);
        dq_quantize(out, n, group_size, bits, mn, range, back, level_bytes, 1);
        /* a zero range stores level 0 for everything */
        if (range != 0.0f && n && memcmp(back, levels, (size_t)n * (size_t)level_bytes))
            fail("quantize(dequantize(levels)) != levels");
        free(out);
        free(ref);
        free(back);
    } else if (err == DQ_ERR_LEVEL) {
        if (where < 0 || where >= n)
            fail("level error without a valid index");
    } else if (err == DQ_ERR_BITS || err == DQ_ERR_LEVEL_BYTES) {
        if (where < 0 || where >= ngroups)
            fail("bits error without a valid group");
    }
    free(levels);
}

/* The packed words as every width's pack at once (as many whole lines of w
 * planes as the words hold): dq_dequantize_packed reads only what the
 * groups' widths ask for, refuses a short pack, and writes values within
 * [min, min + range]. */
static void check_dequantize_packed(const uint64_t *packed, int64_t words, int64_t n,
                                    int64_t group_size, const uint8_t *bits, int64_t ngroups,
                                    const float scale[2]) {
    int64_t gs = group_size ? group_size : n;
    if (n == 0 || gs == 0 || n % gs || n / gs != ngroups)
        return;
    int64_t where;
    if (dq_validate_levels(NULL, 2, n, gs, bits, ngroups, &where) != DQ_OK)
        return; /* widths outside 1..15: the binding refuses them first */
    const uint64_t *packs[16] = {NULL};
    int64_t lines[16] = {0};
    for (int w = 1; w < 16; ++w) {
        packs[w] = packed;
        lines[w] = words / (w * DQ_PACK_BLOCK);
    }
    float *out = alloc((size_t)n * sizeof(float));
    int err = dq_dequantize_packed(packs, lines, gs, bits, ngroups, scale[0], scale[1], out, 2);
    if (err == DQ_OK) {
        for (int64_t i = 0; i < n; ++i)
            if (!(out[i] >= scale[0] && out[i] <= scale[0] + scale[1] * 1.0001f))
                fail("dequantized packed value outside [min, min + range]");
    } else if (err != DQ_ERR_PACK_SHORT) {
        fail("dequantize packed: unexpected error");
    }
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < HEADER)
        return 0;
    const int64_t nbits = data[0];
    const int64_t lines = (int64_t)((uint64_t)data[1] << (data[2] % 56));
    const int64_t n = u16(data + 3);
    const int64_t group_size = data[5];
    const int64_t ngroups = u16(data + 6);
    const int level_bytes = (data[8] & 1) ? 1 : 2;
    const float *scale = SCALES[(data[8] >> 1) & 3];
    size_t off = HEADER;
    if (size - off < (size_t)ngroups)
        return 0;
    uint8_t *bits = alloc((size_t)ngroups);
    memcpy(bits, data + off, (size_t)ngroups);
    off += (size_t)ngroups;
    const int64_t words = (int64_t)((size - off) / sizeof(uint64_t));
    uint64_t *packed = alloc((size_t)words * sizeof(uint64_t));
    memcpy(packed, data + off, (size_t)words * sizeof(uint64_t));

    check_dequantize_packed(packed, words, n, group_size, bits, ngroups, scale);
    if (dq_validate_packed(lines, nbits, DQ_PACK_BLOCK, words, n) == DQ_OK) {
        int16_t *values = alloc((size_t)n * sizeof(int16_t));
        int16_t *ref = alloc((size_t)n * sizeof(int16_t));
        dq_unpack_bits(packed, lines, (int)nbits, n, values, 1);
        int64_t used = dq_pack_lines(n) < lines ? dq_pack_lines(n) : lines;
        dq_unpack_bits_ref(packed, lines, (int)nbits, 0, used, n, ref);
        if (n && memcmp(values, ref, (size_t)n * sizeof(int16_t)))
            fail("unpack fast != reference");
        for (int64_t i = 0; i < n; ++i)
            if (nbits < 16 && ((uint16_t)values[i] >> nbits))
                fail("unpacked value wider than its planes");
        /* repacking gives words that unpack to the same values */
        int64_t relines = dq_pack_lines(n);
        uint64_t *repacked = alloc((size_t)(relines * nbits * DQ_PACK_BLOCK) * sizeof(uint64_t));
        int16_t *again = alloc((size_t)n * sizeof(int16_t));
        dq_pack_bits(values, n, (int)nbits, repacked, 1);
        dq_unpack_bits(repacked, relines, (int)nbits, n, again, 1);
        if (n && memcmp(values, again, (size_t)n * sizeof(int16_t)))
            fail("unpack(pack(values)) != values");
        check_dequantize(values, n, group_size, bits, ngroups, level_bytes, scale);
        free(values);
        free(ref);
        free(repacked);
        free(again);
    }
    free(bits);
    free(packed);
    return 0;
}

#ifdef DQ_FUZZ_REPLAY
int main(int argc, char **argv) {
    for (int a = 1; a < argc; ++a) {
        FILE *f = fopen(argv[a], "rb");
        if (!f) {
            perror(argv[a]);
            return 2;
        }
        fseek(f, 0, SEEK_END);
        long len = ftell(f);
        fseek(f, 0, SEEK_SET);
        uint8_t *buf = alloc((size_t)len);
        if (fread(buf, 1, (size_t)len, f) != (size_t)len) {
            perror(argv[a]);
            return 2;
        }
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)len);
        free(buf);
    }
    printf("replayed %d inputs\n", argc - 1);
    return 0;
}
#endif
