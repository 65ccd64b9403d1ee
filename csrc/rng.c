/* Counter-based noise: a 4x32-bit multiplicative hash of (counter, key),
 * then float transforms that the reference and the fast path share, so the
 * two give the same bits. README "Noise" says why this generator. */
#include "dq_internal.h"

/* ---- Philox4x32-10: no longer the noise; the binding still exposes it
 * with its known-answer check. */

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

/* ---- the hash */

#define PCG_MUL 1664525u
#define PCG_INC 1013904223u

/* The key words: the seed through splitmix64's finalizer, so that seeds
 * differing in a few bits (0, 1, 2, ...) still give unrelated keys. */
DQ_INLINE void key_of_seed(uint64_t seed, uint32_t *k0, uint32_t *k1) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    *k0 = (uint32_t)z;
    *k1 = (uint32_t)(z >> 32);
}

/* pcg4d (Jarzynski and Olano, JCGT 2020) of (counter low, counter high,
 * key 0, key 1), the key words already through the LCG step (kz, kw): 32-bit
 * multiplies, adds, one shift, nothing sequential. */
DQ_INLINE void pcg4d(uint32_t lo, uint32_t hi, uint32_t kz, uint32_t kw, uint32_t *o0,
                     uint32_t *o1, uint32_t *o2, uint32_t *o3) {
    uint32_t x = lo * PCG_MUL + PCG_INC, y = hi * PCG_MUL + PCG_INC, z = kz, w = kw;
    x += y * w;
    y += z * x;
    z += x * y;
    w += y * z;
    x ^= x >> 16;
    y ^= y >> 16;
    z ^= z >> 16;
    w ^= w >> 16;
    x += y * w;
    y += z * x;
    z += x * y;
    w += y * z;
    *o0 = x, *o1 = y, *o2 = z, *o3 = w;
}

void dq_noise_hash4(uint64_t seed, uint64_t counter, uint32_t out[4]) {
    uint32_t k0, k1;
    key_of_seed(seed, &k0, &k1);
    pcg4d((uint32_t)counter, (uint32_t)(counter >> 32), k0 * PCG_MUL + PCG_INC,
          k1 * PCG_MUL + PCG_INC, &out[0], &out[1], &out[2], &out[3]);
}

/* ---- words to noise: float operations in one fixed order, no
 * contraction, so every compilation of them gives the same bits */

/* The top 24 bits as a float in [-0.5, 0.5), exactly. */
DQ_INLINE float uniform_of(uint32_t u) { return (float)(u >> 8) * 0x1p-24f - 0.5f; }

/* log1p(f) = f - f^2/2 + f^3 P(f) on [-1/3, 1/3]: P fitted for the least
 * maximum error, 2.4e-7 on log1p evaluated in float32 (Cephes' logf takes
 * three more terms for its last 1e-7, which noise has no use for). */
static const float LOG1P_POLY[6] = {-0.15057827532291412f, 0.1635604053735733f,
                                    -0.1649000644683838f,  0.19910533726215363f,
                                    -0.2500317096710205f,  0.3333389461040497f};
/* sin x = x + x^3 S(x^2), cos x = 1 + x^2 C(x^2) on [-pi/4, pi/4], least
 * maximum error: 1e-8 and 1.1e-7 */
static const float SIN_POLY[3] = {-0.00019588009f, 0.008332749f, -0.16666664f};
static const float COS_POLY[3] = {-0.0013661296f, 0.04166142f, -0.49999982f};

DQ_INLINE float horner(float x, const float *c, int n) {
    float y = c[0];
    for (int k = 1; k < n; ++k)
        y = y * x + c[k];
    return y;
}

/* The Box-Muller radius of N(0, 1) / 2, sqrt(-log(v) / 2), for
 * v = ((u >> 8) + 1) / 2^24 in (0, 1]: never 0, so the log is finite and
 * the largest radius 2.88 (5.77 sigma). v's integer k = v * 2^24 is split
 * as m * 2^e with m in [2/3, 4/3) by integer arithmetic on its bits (no
 * compare), so f = m - 1 is exact and log(v) = (e - 24) ln 2 + log1p(f). */
DQ_INLINE float radius_of(uint32_t u) {
    uint32_t bits = dq_float_bits((float)((u >> 8) + 1));
    uint32_t e = (bits - 0x3f2aaaabu) >> 23; /* k >= 1: never negative */
    float f = dq_bits_float(bits - (e << 23)) - 1.0f;
    float z = f * f;
    float y = horner(f, LOG1P_POLY, 6) * f * z;
    float log_v = (f + (y - 0.5f * z)) + (float)((int32_t)e - 24) * 0.69314718055994530942f;
    return sqrtf(-0.5f * log_v);
}

/* sin and cos of 2 pi v, v = (u >> 8) / 2^24 in [0, 1): v is reduced to a
 * quarter turn r in [-1/8, 1/8] exactly (v has 24 fraction bits), then the
 * polynomials on [-pi/4, pi/4] and a quadrant rotation. */
DQ_INLINE void sincos_of(uint32_t u, float *s, float *c) {
    float v = (float)(u >> 8) * 0x1p-24f;
    float q = (float)(int32_t)(v * 4.0f + 0.5f); /* nearest quarter, 0..4 */
    float r = v - q * 0.25f;
    float x = r * 6.28318530717958647692f;
    float x2 = x * x;
    float sx = x + x * x2 * horner(x2, SIN_POLY, 3);
    float cx = 1.0f + x2 * horner(x2, COS_POLY, 3);
    /* quadrant rotation: selects and sign flips, which the compiler turns
     * into blends and xors */
    int32_t quadrant = (int32_t)q & 3;
    float sv = (quadrant & 1) ? cx : sx;
    float cv = (quadrant & 1) ? sx : cx;
    uint32_t s_flip = (uint32_t)(quadrant & 2) << 30;       /* q 2, 3: negative sin */
    uint32_t c_flip = (uint32_t)((quadrant + 1) & 2) << 30; /* q 1, 2: negative cos */
    *s = dq_bits_float(dq_float_bits(sv) ^ s_flip);
    *c = dq_bits_float(dq_float_bits(cv) ^ c_flip);
}

/* ---- which word makes which element
 *
 * Elements come in tiles of 32: tile t = i / 32 hashes the eight counters
 * 8t .. 8t + 7, and element 32t + 8l + j takes word l of counter 8t + j.
 * Eight consecutive elements thus take the same word of eight consecutive
 * counters: a vector of hash outputs is a vector of noise, stored as is
 * (with element i taking counter i / 4 a vector had to be interleaved).
 * Gaussian noise pairs words 0 and 1 (radius, angle: the cos and sin
 * elements 32t + j and 32t + 8 + j) and words 2 and 3 (32t + 16 + j and
 * 32t + 24 + j). */
#define TILE 32

void dq_noise_fill_ref(int kind, uint64_t seed, int64_t start, int64_t count,
                       float *restrict out) {
    assert(start >= 0 && count >= 0);
    for (int64_t j = 0; j < count; ++j) {
        uint64_t i = (uint64_t)(start + j);
        int lane = (int)(i & 7), word = (int)((i >> 3) & 3);
        uint32_t w[4];
        dq_noise_hash4(seed, (i >> 5 << 3) + (uint64_t)lane, w);
        if (kind == DQ_NOISE_UNIFORM) {
            out[j] = uniform_of(w[word]);
        } else {
            int pair = word & 2;
            float s, c;
            sincos_of(w[pair + 1], &s, &c);
            out[j] = radius_of(w[pair]) * ((word & 1) ? s : c);
        }
    }
}

/* ---- fast path: the same functions over whole tiles, in loops the
 * compiler vectorizes (32-bit lanes: the hash is 32-bit multiplies) */

#define FAST_TILES 8 /* tiles per batch: 256 values */

/* Noise of whole tiles [first_tile, first_tile + ntiles) into out; the
 * counters' high word is `hi` throughout (the caller splits batches where
 * it changes). */
DQ_INLINE void noise_tiles(int kind, uint32_t kz, uint32_t kw, uint64_t first_tile, int ntiles,
                           float *restrict out) {
    uint32_t w0[8 * FAST_TILES], w1[8 * FAST_TILES], w2[8 * FAST_TILES], w3[8 * FAST_TILES];
    const int n = 8 * ntiles;
    const uint64_t first = first_tile << 3;
    const uint32_t lo0 = (uint32_t)first, hi = (uint32_t)(first >> 32);
    assert(ntiles <= FAST_TILES && (uint64_t)lo0 + (uint64_t)n <= ((uint64_t)1 << 32));
    for (int k = 0; k < n; ++k)
        pcg4d(lo0 + (uint32_t)k, hi, kz, kw, &w0[k], &w1[k], &w2[k], &w3[k]);
    if (kind == DQ_NOISE_UNIFORM) {
        for (int t = 0; t < ntiles; ++t)
            for (int j = 0; j < 8; ++j) {
                float *o = out + TILE * t + j;
                const int k = 8 * t + j;
                o[0] = uniform_of(w0[k]);
                o[8] = uniform_of(w1[k]);
                o[16] = uniform_of(w2[k]);
                o[24] = uniform_of(w3[k]);
            }
        return;
    }
    for (int t = 0; t < ntiles; ++t)
        for (int j = 0; j < 8; ++j) {
            float *o = out + TILE * t + j;
            const int k = 8 * t + j;
            float ra = radius_of(w0[k]), rb = radius_of(w2[k]);
            float sa, ca, sb, cb;
            sincos_of(w1[k], &sa, &ca);
            sincos_of(w3[k], &sb, &cb);
            o[0] = ra * ca;
            o[8] = ra * sa;
            o[16] = rb * cb;
            o[24] = rb * sb;
        }
}

/* A batch of whole tiles, split where the counters' high word changes
 * (once every 2^34 elements). */
DQ_INLINE void noise_tiles_any(int kind, uint32_t kz, uint32_t kw, uint64_t first_tile,
                               int ntiles, float *restrict out) {
    uint64_t to_wrap = (((first_tile << 3) | 0xffffffffull) + 1 - (first_tile << 3)) >> 3;
    if (to_wrap < (uint64_t)ntiles) {
        noise_tiles(kind, kz, kw, first_tile, (int)to_wrap, out);
        first_tile += to_wrap;
        out += TILE * to_wrap;
        ntiles -= (int)to_wrap;
    }
    noise_tiles(kind, kz, kw, first_tile, ntiles, out);
}

/* There is one generator now: its loops are compiled for each instruction
 * set by the DQ_FAST clones (the AVX-512 one included), which give the same
 * bits. The switch stays for its callers and always answers portable. */
int dq_noise_simd(int enable) {
    (void)enable;
    return 0;
}

DQ_FAST
void dq_noise_fill_fast(int kind, uint64_t seed, int64_t start, int64_t count,
                        float *restrict out) {
    assert(start >= 0 && count >= 0);
    uint32_t k0, k1;
    key_of_seed(seed, &k0, &k1);
    const uint32_t kz = k0 * PCG_MUL + PCG_INC, kw = k1 * PCG_MUL + PCG_INC;
    float buf[TILE * FAST_TILES];
    int64_t i = start, end = start + count;
    /* unaligned head and tail go through a batch-sized staging buffer */
    while (i < end) {
        int64_t tile = i / TILE, offset = i % TILE;
        int64_t tiles_left = ((end - i) + offset + TILE - 1) / TILE;
        int ntiles = (int)DQ_MIN(tiles_left, (int64_t)FAST_TILES);
        int64_t take = DQ_MIN((int64_t)ntiles * TILE - offset, end - i);
        if (offset == 0 && take == (int64_t)ntiles * TILE) {
            noise_tiles_any(kind, kz, kw, (uint64_t)tile, ntiles, out + (i - start));
        } else {
            noise_tiles_any(kind, kz, kw, (uint64_t)tile, ntiles, buf);
            memcpy(out + (i - start), buf + offset, (size_t)take * sizeof(float));
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
