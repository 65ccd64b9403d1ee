/* What the C test programs share: pass/fail counting, a seeded generator
 * for test data, an allocation that never returns NULL. Each program
 * defines TEST_SEED before including it. */
#ifndef DQ_TEST_COMMON_H
#define DQ_TEST_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static int passed, failed;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (cond) {                                              \
            ++passed;                                            \
        } else {                                                 \
            ++failed;                                            \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
        }                                                        \
    } while (0)

static uint64_t lcg_state = TEST_SEED;
static uint32_t lcg(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(lcg_state >> 33);
}
static float frand(void) { return (float)lcg() / 2147483648.0f * 2.0f - 1.0f; }

/* zeroed, so a test never reads uninitialized memory by accident */
static void *xmalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

#endif
