/* Counter-based noise: Philox4x32-10 indexed by element. */
#include "dq_internal.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

void dq_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
        uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        uint32_t n3 = (uint32_t)p0;
        c0 = n0, c1 = n1, c2 = n2, c3 = n3;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

/* 24 random bits as a float in [0, 1), exactly representable. */
DQ_INLINE float unit_from_u32(uint32_t u) { return (float)(u >> 8) * 0x1p-24f; }

/* 24 random bits as a float in (0, 1]: never 0, so its log is finite. */
DQ_INLINE float open_unit_from_u32(uint32_t u) { return (float)((u >> 8) + 1) * 0x1p-24f; }

static void philox_block(uint64_t seed, int64_t block, uint32_t out[4]) {
    const uint32_t ctr[4] = {(uint32_t)(uint64_t)block, (uint32_t)((uint64_t)block >> 32), 0, 0};
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    dq_philox4x32_10(ctr, key, out);
}

/* The specification: libm in double precision, rounded once to float. */
static void gaussian_pair_ref(uint32_t a, uint32_t b, float *z0, float *z1) {
    const double two_pi = 6.283185307179586476925286766559;
    double radius = sqrt(-0.5 * log((double)open_unit_from_u32(a)));
    double angle = two_pi * (double)unit_from_u32(b);
    *z0 = (float)(radius * cos(angle));
    *z1 = (float)(radius * sin(angle));
}

void dq_noise_fill_ref(int kind, uint64_t seed, int64_t start, int64_t count,
                       float *restrict out) {
    assert(start >= 0 && count >= 0);
    for (int64_t j = 0; j < count; ++j) {
        int64_t i = start + j;
        uint32_t r[4];
        philox_block(seed, i >> 2, r);
        int lane = (int)(i & 3);
        if (kind == DQ_NOISE_UNIFORM) {
            out[j] = unit_from_u32(r[lane]) - 0.5f;
        } else {
            float z[4];
            gaussian_pair_ref(r[0], r[1], &z[0], &z[1]);
            gaussian_pair_ref(r[2], r[3], &z[2], &z[3]);
            out[j] = z[lane];
        }
    }
}

/* ---- fast path: blocks of Philox counters in structure-of-arrays form so
 * the compiler vectorizes the rounds, then branch-free log and sincos. */

#define FAST_BLOCKS 64 /* Philox blocks per batch: 256 values */

/* log(x) for x in (0, 1]: exponent split and a degree-9 polynomial on
 * [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes' logf coefficients). */
DQ_INLINE float fast_logf(float x) {
    uint32_t u = dq_float_bits(x);
    int32_t e = (int32_t)((u >> 23) & 0xff) - 126;
    float m = dq_bits_float((u & 0x007fffffu) | 0x3f000000u); /* [0.5, 1) */
    int32_t small = m < 0.70710678118654752440f;
    e -= small;
    m = m + (float)small * m;
    float f = m - 1.0f;
    float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f + -1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f + -1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f + -1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f + -2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return f + y + 0.693359375f * fe;
}

/* sin and cos of 2*pi*v for v in [0, 1): v is reduced to a quarter turn
 * r in [-1/8, 1/8] exactly (v has 24 fraction bits), then Taylor
 * polynomials on [-pi/4, pi/4] and a quadrant rotation. */
DQ_INLINE void fast_sincos_turns(float v, float *s, float *c) {
    float q = (float)(int32_t)(v * 4.0f + 0.5f); /* nearest quarter, 0..4 */
    float r = v - q * 0.25f;
    float x = r * 6.28318530717958647692f;
    float x2 = x * x;
    float sp = 2.7557319e-6f;
    sp = sp * x2 + -1.98412698e-4f;
    sp = sp * x2 + 8.33333333e-3f;
    sp = sp * x2 + -1.66666667e-1f;
    float sx = x + x * x2 * sp;
    float cp = 2.48015873e-5f;
    cp = cp * x2 + -1.38888889e-3f;
    cp = cp * x2 + 4.16666667e-2f;
    cp = cp * x2 + -0.5f;
    float cx = 1.0f + x2 * cp;
    /* quadrant rotation with arithmetic blends instead of branches, so the
     * loop around this stays vectorizable */
    int32_t quadrant = (int32_t)q & 3;
    float odd = (float)(quadrant & 1);
    float sv = odd * cx + (1.0f - odd) * sx;
    float cv = odd * sx + (1.0f - odd) * cx;
    float s_sign = 1.0f - (float)(quadrant & 2);              /* q 2, 3: negative sin */
    float c_sign = 1.0f - (float)((quadrant + 1) & 2);        /* q 1, 2: negative cos */
    *s = s_sign * sv;
    *c = c_sign * cv;
}

DQ_INLINE void philox_batch(uint64_t seed, int64_t first_block, int nblocks,
                                uint32_t *restrict r0, uint32_t *restrict r1,
                                uint32_t *restrict r2, uint32_t *restrict r3) {
    const uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
    for (int k = 0; k < nblocks; ++k) {
        uint64_t block = (uint64_t)(first_block + k);
        r0[k] = (uint32_t)block;
        r1[k] = (uint32_t)(block >> 32);
        r2[k] = 0;
        r3[k] = 0;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
        for (int k = 0; k < nblocks; ++k) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * r0[k];
            uint64_t p1 = (uint64_t)PHILOX_M1 * r2[k];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ r1[k] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ r3[k] ^ k1;
            r1[k] = (uint32_t)p1;
            r3[k] = (uint32_t)p0;
            r0[k] = n0;
            r2[k] = n2;
        }
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
}

/* Noise of whole blocks [first_block, first_block + nblocks) into
 * out[4 * k + lane]. */
DQ_INLINE void noise_blocks(int kind, uint64_t seed, int64_t first_block, int nblocks,
                                float *restrict out) {
    uint32_t r0[FAST_BLOCKS], r1[FAST_BLOCKS], r2[FAST_BLOCKS], r3[FAST_BLOCKS];
    assert(nblocks <= FAST_BLOCKS);
    philox_batch(seed, first_block, nblocks, r0, r1, r2, r3);
    if (kind == DQ_NOISE_UNIFORM) {
        for (int k = 0; k < nblocks; ++k) {
            out[4 * k + 0] = unit_from_u32(r0[k]) - 0.5f;
            out[4 * k + 1] = unit_from_u32(r1[k]) - 0.5f;
            out[4 * k + 2] = unit_from_u32(r2[k]) - 0.5f;
            out[4 * k + 3] = unit_from_u32(r3[k]) - 0.5f;
        }
        return;
    }
    for (int k = 0; k < nblocks; ++k) {
        float rad_a = sqrtf(-0.5f * fast_logf(open_unit_from_u32(r0[k])));
        float rad_b = sqrtf(-0.5f * fast_logf(open_unit_from_u32(r2[k])));
        float sa, ca, sb, cb;
        fast_sincos_turns(unit_from_u32(r1[k]), &sa, &ca);
        fast_sincos_turns(unit_from_u32(r3[k]), &sb, &cb);
        out[4 * k + 0] = rad_a * ca;
        out[4 * k + 1] = rad_a * sa;
        out[4 * k + 2] = rad_b * cb;
        out[4 * k + 3] = rad_b * sb;
    }
}

DQ_FAST
void dq_noise_fill_fast(int kind, uint64_t seed, int64_t start, int64_t count,
                        float *restrict out) {
    assert(start >= 0 && count >= 0);
    float buf[4 * FAST_BLOCKS];
    int64_t i = start, end = start + count;
    /* unaligned head and tail go through a block-sized staging buffer */
    while (i < end) {
        int64_t block = i >> 2;
        int64_t lane = i & 3;
        int64_t blocks_left = ((end - i) + lane + 3) >> 2;
        int nblocks = (int)DQ_MIN(blocks_left, (int64_t)FAST_BLOCKS);
        int64_t take = DQ_MIN((int64_t)nblocks * 4 - lane, end - i);
        if (lane == 0 && take == (int64_t)nblocks * 4) {
            noise_blocks(kind, seed, block, nblocks, out + (i - start));
        } else {
            noise_blocks(kind, seed, block, nblocks, buf);
            memcpy(out + (i - start), buf + lane, (size_t)take * sizeof(float));
        }
        i += take;
    }
}

void dq_noise_fill(int kind, uint64_t seed, int64_t n, float *restrict out, int nthreads) {
    int64_t chunks = dq_num_chunks(n, DQ_CHUNK);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK;
        dq_noise_fill_fast(kind, seed, start, DQ_MIN(DQ_CHUNK, n - start), out + start);
    }
}
