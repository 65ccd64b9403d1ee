/* Helpers shared by the kernel files; not part of the public header. */
#ifndef DQ_INTERNAL_H
#define DQ_INTERNAL_H

#include <assert.h>
#include <math.h>
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
#define DQ_FAST __attribute__((target_clones("avx2", "default")))
#else
#define DQ_FAST
#endif

#define DQ_MIN(a, b) ((a) < (b) ? (a) : (b))

static inline uint32_t dq_float_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float dq_bits_float(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Number of fixed-size chunks covering n elements. */
static inline int64_t dq_num_chunks(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

#endif
