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

/* Polynomial coefficients, highest degree first, shared by the portable and
 * the AVX-512 generators so the two cannot drift apart. */
static const float LOG_POLY[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                                  -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                                  2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
static const float SIN_POLY[4] = {2.7557319e-6f, -1.98412698e-4f, 8.33333333e-3f, -1.66666667e-1f};
static const float COS_POLY[4] = {2.48015873e-5f, -1.38888889e-3f, 4.16666667e-2f, -0.5f};

/* c[0] x^(n-1) + ... + c[n-1] by Horner's rule, a multiply then an add */
DQ_INLINE float horner(float x, const float *c, int n) {
    float y = c[0];
    for (int k = 1; k < n; ++k)
        y = y * x + c[k];
    return y;
}

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
    float y = horner(f, LOG_POLY, 9);
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
    float sx = x + x * x2 * horner(x2, SIN_POLY, 4);
    float cx = 1.0f + x2 * horner(x2, COS_POLY, 4);
    /* quadrant rotation: selects and sign flips, which the compiler turns
     * into blends and xors (a flip of the sign bit is what multiplying by
     * -1 gives, -0 included) */
    int32_t quadrant = (int32_t)q & 3;
    float sv = (quadrant & 1) ? cx : sx;
    float cv = (quadrant & 1) ? sx : cx;
    uint32_t s_flip = (uint32_t)(quadrant & 2) << 30;       /* q 2, 3: negative sin */
    uint32_t c_flip = (uint32_t)((quadrant + 1) & 2) << 30; /* q 1, 2: negative cos */
    *s = dq_bits_float(dq_float_bits(sv) ^ s_flip);
    *c = dq_bits_float(dq_float_bits(cv) ^ c_flip);
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

/* ---- AVX-512 path: the same arithmetic as noise_blocks, written with
 * intrinsics. GCC vectorizes Philox's 32x32->64 products with 64-bit
 * multiplies on half-width lanes; vpmuludq on 64-bit lanes does the work in
 * a fraction of the instructions. Every float operation is the one
 * noise_blocks performs, in the same order and without contraction, so the
 * two agree bit for bit (test_kernels checks it). */
#if DQ_X86_AVX512
#include <immintrin.h>
#define DQ_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

DQ_AVX512 static inline __m512 unit16(__m512i u) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 8)), _mm512_set1_ps(0x1p-24f));
}

DQ_AVX512 static inline __m512 open_unit16(__m512i u) {
    __m512i v = _mm512_add_epi32(_mm512_srli_epi32(u, 8), _mm512_set1_epi32(1));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(0x1p-24f));
}

#define MUL _mm512_mul_ps
#define ADD _mm512_add_ps
#define SUB _mm512_sub_ps
#define SET _mm512_set1_ps

DQ_AVX512 static inline __m512 horner16(__m512 x, const float *c, int n) {
    __m512 y = SET(c[0]);
    for (int k = 1; k < n; ++k)
        y = ADD(MUL(y, x), SET(c[k]));
    return y;
}

DQ_AVX512 static inline __m512 logf16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 23), _mm512_set1_epi32(0xff)),
                                 _mm512_set1_epi32(126));
    __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32(0x007fffff)),
                                                   _mm512_set1_epi32(0x3f000000)));
    __mmask16 small = _mm512_cmp_ps_mask(m, SET(0.70710678118654752440f), _CMP_LT_OQ);
    __m512 fsmall = _mm512_maskz_mov_ps(small, SET(1.0f));
    e = _mm512_mask_sub_epi32(e, small, e, _mm512_set1_epi32(1));
    m = ADD(m, MUL(fsmall, m));
    __m512 f = SUB(m, SET(1.0f));
    __m512 z = MUL(f, f);
    __m512 y = MUL(MUL(horner16(f, LOG_POLY, 9), f), z);
    __m512 fe = _mm512_cvtepi32_ps(e);
    y = ADD(y, MUL(SET(-2.12194440e-4f), fe));
    y = ADD(y, MUL(SET(-0.5f), z));
    return ADD(ADD(f, y), MUL(SET(0.693359375f), fe));
}

DQ_AVX512 static inline void sincos_turns16(__m512 v, __m512 *s, __m512 *c) {
    __m512i qi = _mm512_cvttps_epi32(ADD(MUL(v, SET(4.0f)), SET(0.5f)));
    __m512 q = _mm512_cvtepi32_ps(qi);
    __m512 r = SUB(v, MUL(q, SET(0.25f)));
    __m512 x = MUL(r, SET(6.28318530717958647692f));
    __m512 x2 = MUL(x, x);
    __m512 sx = ADD(x, MUL(MUL(x, x2), horner16(x2, SIN_POLY, 4)));
    __m512 cx = ADD(SET(1.0f), MUL(x2, horner16(x2, COS_POLY, 4)));
    __m512i quadrant = _mm512_and_si512(qi, _mm512_set1_epi32(3));
    __mmask16 odd = _mm512_test_epi32_mask(quadrant, _mm512_set1_epi32(1));
    __m512 sv = _mm512_mask_blend_ps(odd, sx, cx);
    __m512 cv = _mm512_mask_blend_ps(odd, cx, sx);
    __m512i two = _mm512_set1_epi32(2);
    __m512i s_flip = _mm512_slli_epi32(_mm512_and_si512(quadrant, two), 30);
    __m512i c_flip = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(quadrant, _mm512_set1_epi32(1)), two), 30);
    *s = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sv), s_flip));
    *c = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(cv), c_flip));
}

/* out[4 k + l] = v_l[k] for k < 16 */
DQ_AVX512 static inline void store_interleaved4(float *out, __m512 v0, __m512 v1, __m512 v2,
                                                __m512 v3) {
    const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i pair_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i quad_lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
    const __m512i quad_hi = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
    __m512 a_lo = _mm512_permutex2var_ps(v0, pair_lo, v1), a_hi = _mm512_permutex2var_ps(v0, pair_hi, v1);
    __m512 b_lo = _mm512_permutex2var_ps(v2, pair_lo, v3), b_hi = _mm512_permutex2var_ps(v2, pair_hi, v3);
    _mm512_storeu_ps(out + 0, _mm512_permutex2var_ps(a_lo, quad_lo, b_lo));
    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(a_lo, quad_hi, b_lo));
    _mm512_storeu_ps(out + 32, _mm512_permutex2var_ps(a_hi, quad_lo, b_hi));
    _mm512_storeu_ps(out + 48, _mm512_permutex2var_ps(a_hi, quad_hi, b_hi));
}

/* noise_blocks for nblocks a multiple of 16 */
DQ_AVX512 static void noise_blocks_avx512(int kind, uint64_t seed, int64_t first_block, int nblocks,
                                          float *restrict out) {
    assert(nblocks % 16 == 0);
    const __m512i m0 = _mm512_set1_epi64(PHILOX_M0), m1 = _mm512_set1_epi64(PHILOX_M1);
    const __m512i iota64 = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    long long key0[10], key1[10];
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; ++round, k0 += PHILOX_W0, k1 += PHILOX_W1)
        key0[round] = k0, key1[round] = k1;
    for (int b = 0; b < nblocks; b += 16) {
        uint64_t block = (uint64_t)(first_block + b);
        /* The rounds run on 64-bit lanes, eight blocks a register (h = 0:
         * blocks b..b+7, h = 1: b+8..b+15), each word in a lane's low half.
         * vpmuludq multiplies those low halves into the full 64-bit
         * product: its high word is a shift away and its low word is
         * already in place, so no lanes are blended. The high halves
         * collect garbage that no multiply reads; the packing at the end
         * drops it. */
        __m512i w0[2], w1[2], w2[2], w3[2];
        for (int h = 0; h < 2; ++h) {
            __m512i first = _mm512_add_epi64(_mm512_set1_epi64((long long)(block + 8 * (uint64_t)h)), iota64);
            w0[h] = first; /* low half: the counter's low word */
            w1[h] = _mm512_srli_epi64(first, 32);
            w2[h] = _mm512_setzero_si512();
            w3[h] = _mm512_setzero_si512();
        }
        for (int round = 0; round < 10; ++round) {
            const __m512i k0 = _mm512_set1_epi64(key0[round]), k1 = _mm512_set1_epi64(key1[round]);
            for (int h = 0; h < 2; ++h) {
                __m512i p0 = _mm512_mul_epu32(w0[h], m0);
                __m512i p1 = _mm512_mul_epu32(w2[h], m1);
                w0[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), w1[h], k0, 0x96);
                w2[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), w3[h], k1, 0x96);
                w1[h] = p1;
                w3[h] = p0;
            }
        }
        __m512i c0 = _mm512_permutex2var_epi32(w0[0], low_halves, w0[1]);
        __m512i c1 = _mm512_permutex2var_epi32(w1[0], low_halves, w1[1]);
        __m512i c2 = _mm512_permutex2var_epi32(w2[0], low_halves, w2[1]);
        __m512i c3 = _mm512_permutex2var_epi32(w3[0], low_halves, w3[1]);
        float *o = out + 4 * b;
        if (kind == DQ_NOISE_UNIFORM) {
            store_interleaved4(o, SUB(unit16(c0), SET(0.5f)), SUB(unit16(c1), SET(0.5f)),
                               SUB(unit16(c2), SET(0.5f)), SUB(unit16(c3), SET(0.5f)));
            continue;
        }
        __m512 rad_a = _mm512_sqrt_ps(MUL(SET(-0.5f), logf16(open_unit16(c0))));
        __m512 rad_b = _mm512_sqrt_ps(MUL(SET(-0.5f), logf16(open_unit16(c2))));
        __m512 sa, ca, sb, cb;
        sincos_turns16(unit16(c1), &sa, &ca);
        sincos_turns16(unit16(c3), &sb, &cb);
        store_interleaved4(o, MUL(rad_a, ca), MUL(rad_a, sa), MUL(rad_b, cb), MUL(rad_b, sb));
    }
}
#undef MUL
#undef ADD
#undef SUB
#undef SET

#endif

/* -1: not decided yet; 0: portable; 1: AVX-512. Racing first calls store the
 * same value. */
static int noise_simd = -1;

int dq_noise_simd(int enable) {
    int previous = noise_simd;
#if DQ_X86_AVX512
    noise_simd = enable < 0 ? -1 : (enable && dq__avx512_level() == 2);
#else
    (void)enable;
    noise_simd = 0;
#endif
    return previous;
}

/* Whole blocks, on the AVX-512 path for the multiples of 16 when it runs. */
DQ_INLINE void noise_blocks_any(int kind, uint64_t seed, int64_t first_block, int nblocks,
                                float *restrict out) {
#if DQ_X86_AVX512
    int simd = __atomic_load_n(&noise_simd, __ATOMIC_RELAXED);
    if (simd < 0) {
        simd = dq__avx512_level() == 2;
        __atomic_store_n(&noise_simd, simd, __ATOMIC_RELAXED);
    }
    if (simd) {
        int wide = nblocks & ~15;
        if (wide)
            noise_blocks_avx512(kind, seed, first_block, wide, out);
        if (wide == nblocks)
            return;
        first_block += wide;
        out += 4 * wide;
        nblocks -= wide;
    }
#endif
    noise_blocks(kind, seed, first_block, nblocks, out);
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
            noise_blocks_any(kind, seed, block, nblocks, out + (i - start));
        } else {
            noise_blocks_any(kind, seed, block, nblocks, buf);
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
