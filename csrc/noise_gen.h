/* The noise generator's pieces that the fill (rng.c) and the fused noise
 * kernels (noise.c) share: the hash, the word-to-noise transforms, which
 * word makes which element, and the same over a tile of 64 in AVX-512
 * registers. Internal; diffq_c.h says what the noise is. */
#ifndef DQ_NOISE_GEN_H
#define DQ_NOISE_GEN_H

#include "dq_internal.h"

/* ---- the hash */

#define PCG_MUL 1664525u
#define PCG_INC 1013904223u

/* The key words pcg4d takes: the seed through splitmix64's finalizer (so
 * that seeds differing in a few bits, 0, 1, 2, ..., still give unrelated
 * keys), each half then through the LCG step pcg4d gives its inputs. */
DQ_INLINE void key_of_seed(uint64_t seed, uint32_t *kz, uint32_t *kw) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    *kz = (uint32_t)z * PCG_MUL + PCG_INC;
    *kw = (uint32_t)(z >> 32) * PCG_MUL + PCG_INC;
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

/* ---- words to noise: float operations in one fixed order, no
 * contraction, the polynomial's steps multiply-adds rounded once (an FMA
 * instruction in the vector paths, fmaf on a GPU; in double here, the
 * same bits for every magnitude: dq_madd_double), so every compilation of
 * them gives the same bits */

/* The top 24 bits as a float in [-0.5, 0.5), exactly. */
DQ_INLINE float uniform_of(uint32_t u) { return (float)(u >> 8) * 0x1p-24f - 0.5f; }

/* A word's bit 31 and bits 8..30 as N(0, 1) / 2 by the inverse normal CDF.
 * Bits 8..30 are v in the tail probability p = (2v + 1) / 2^25 in [2^-25,
 * 1/2) (largest magnitude 5.42 sigma); bit 31 is the sign. The magnitude
 * -Phi^-1(p) / 2 is a degree-3 polynomial in p's mantissa m in [1, 2), one
 * per octave [2^e, 2^(e+1)), e = -25..-2. 4v + 2 = p * 2^26 < 2^25 is a
 * float exactly, with p's mantissa, and the low five bits of its biased
 * exponent are the octave's row, 0..23: no log and no square root. A vector
 * looks the rows up with register permutes (two registers a row with
 * AVX-512, three with AVX2) or gathers. tools/gaussian_table.py fits the
 * table: worst error 1.0e-4 against the exact quantile (degree 3, not 5 at
 * 2.0e-6: the gaussian 17% faster, the fused kernels 0-7%; an error far
 * below what the statistics tests can see; the script says why). Next to p =
 * 1/2 the fit may dip below zero by less than its error; the sign bit flips
 * such a value as any other, so the law stays symmetric. */
#define GAUSS_DEGREE 3
/* 4v + 2 from the word u: ((u >> GAUSS_Q_SHIFT) & GAUSS_Q_MASK) | GAUSS_Q_LOW */
#define GAUSS_Q_SHIFT 6
#define GAUSS_Q_MASK 0x1fffffcu
#define GAUSS_Q_LOW 2u
/* worst error against -Phi^-1(p) / 2: 1.01e-04 */
static const float GAUSS_POLY[GAUSS_DEGREE + 1][32] = {
    {
     -0x1.3069cap-7f, -0x1.36aec6p-7f, -0x1.3d58b6p-7f, -0x1.447276p-7f,
     -0x1.4c088cp-7f, -0x1.542988p-7f, -0x1.5ce66cp-7f, -0x1.66533cp-7f,
     -0x1.7087acp-7f, -0x1.7ba012p-7f, -0x1.87be8ap-7f, -0x1.950c8cp-7f,
     -0x1.a3bcfcp-7f, -0x1.b40ef8p-7f, -0x1.c651a8p-7f, -0x1.dae966p-7f,
     -0x1.f256dcp-7f, -0x1.06a04cp-6f, -0x1.163fep-6f, -0x1.289864p-6f,
     -0x1.3e6868p-6f, -0x1.58e8cap-6f, -0x1.7d1a52p-6f, -0x1.f8fc9ap-6f,
     0.0f, 0.0f, 0.0f, 0.0f,
     0.0f, 0.0f, 0.0f, 0.0f},
    {
     0x1.ff528p-5f, 0x1.04fb14p-4f, 0x1.0aa382p-4f, 0x1.10abf8p-4f,
     0x1.171f58p-4f, 0x1.1e0a52p-4f, 0x1.257bcp-4f, 0x1.2d852p-4f,
     0x1.363b4p-4f, 0x1.3fb708p-4f, 0x1.4a168ap-4f, 0x1.557e74p-4f,
     0x1.621beep-4f, 0x1.70272ep-4f, 0x1.7fe6e8p-4f, 0x1.91b508p-4f,
     0x1.a604ecp-4f, 0x1.bd6b5ap-4f, 0x1.d8a6eep-4f, 0x1.f8a32ep-4f,
     0x1.0f2f98p-3f, 0x1.25355ep-3f, 0x1.3ddc9ep-3f, 0x1.683c3ep-3f,
     0.0f, 0.0f, 0.0f, 0.0f,
     0.0f, 0.0f, 0.0f, 0.0f},
    {
     -0x1.7a935ap-3f, -0x1.82ba1ap-3f, -0x1.8b6ad4p-3f, -0x1.94b53cp-3f,
     -0x1.9eabap-3f, -0x1.a96378p-3f, -0x1.b4f624p-3f, -0x1.c181ep-3f,
     -0x1.cf2b08p-3f, -0x1.de1dbep-3f, -0x1.ee902ep-3f, -0x1.0062d4p-2f,
     -0x1.0a897cp-2f, -0x1.15f24ap-2f, -0x1.22e3d6p-2f, -0x1.31bbe8p-2f,
     -0x1.42f9f6p-2f, -0x1.574feep-2f, -0x1.6fbe1ep-2f, -0x1.8dc356p-2f,
     -0x1.b3b41p-2f, -0x1.e56212p-2f, -0x1.14d68p-1f, -0x1.4c5d9ap-1f,
     0.0f, 0.0f, 0.0f, 0.0f,
     0.0f, 0.0f, 0.0f, 0.0f},
    {
     0x1.6bbbeep+1f, 0x1.641578p+1f, 0x1.5c46aap+1f, 0x1.544dp+1f,
     0x1.4c25a6p+1f, 0x1.43cd8p+1f, 0x1.3b411p+1f, 0x1.327c6ap+1f,
     0x1.297b26p+1f, 0x1.20383ep+1f, 0x1.16adfcp+1f, 0x1.0cd5cap+1f,
     0x1.02a80ap+1f, 0x1.f037bp+0f, 0x1.da4d74p+0f, 0x1.c3787ap+0f,
     0x1.ab9ad2p+0f, 0x1.92901cp+0f, 0x1.782ba4p+0f, 0x1.5c35d8p+0f,
     0x1.3e68fep+0f, 0x1.1e6d68p+0f, 0x1.f7b82ap-1f, 0x1.aeb4b6p-1f,
     0.0f, 0.0f, 0.0f, 0.0f,
     0.0f, 0.0f, 0.0f, 0.0f},
};

/* The table row and the point m (p's mantissa, in [1, 2)) of a word's
 * magnitude. */
DQ_INLINE void gaussian_point(uint32_t u, uint32_t *octave, float *m) {
    uint32_t bits = dq_float_bits((float)(int32_t)(((u >> GAUSS_Q_SHIFT) & GAUSS_Q_MASK) | GAUSS_Q_LOW));
    *octave = (bits >> 23) & 31u;
    *m = dq_bits_float((bits & 0x7fffffu) | 0x3f800000u);
}

DQ_INLINE float gaussian_of(uint32_t u) {
    uint32_t octave;
    float m;
    gaussian_point(u, &octave, &m);
    float y = GAUSS_POLY[0][octave];
    for (int k = 1; k <= GAUSS_DEGREE; ++k)
        y = dq_madd_double(y, m, GAUSS_POLY[k][octave]);
    return dq_bits_float(dq_float_bits(y) ^ (u & 0x80000000u));
}

/* ---- which word makes which element
 *
 * Elements come in tiles of 64: tile t = i / 64 hashes the sixteen counters
 * 16t .. 16t + 15, and element 64t + 16l + j takes word l of counter
 * 16t + j. Sixteen consecutive elements thus take the same word of sixteen
 * consecutive counters: a vector of hash outputs (one AVX-512 register, two
 * AVX2 ones) is a vector of noise, stored as is. Each element is one word,
 * uniform and gaussian alike. */
#define LANES 16
#define TILE (4 * LANES)

DQ_INLINE float noise_of(int kind, uint32_t u) {
    return kind == DQ_NOISE_UNIFORM ? uniform_of(u) : gaussian_of(u);
}

#if DQ_X86_AVX512
#include <immintrin.h>

/* The same bits with AVX-512 intrinsics: a tile's sixteen counters are one
 * register, each 32-entry table row two registers that a two-source permute
 * indexes by the octave's five bits (gathers cost more than the
 * polynomial). The polynomial's steps are fused multiply-adds, as in the
 * C. */
#define DQ_AVX512_INLINE static inline __attribute__((always_inline, target("avx512f")))

typedef struct {
    __m512i lane, lane_step, y0, z0, w0;
    __m512 lo[GAUSS_DEGREE + 1], up[GAUSS_DEGREE + 1];
    uint32_t y0w0; /* y0 * w0: the first round's first product, the same for every counter */
} tile_gen;

/* The generator of one key, for counters whose high word is `hi`. */
DQ_AVX512_INLINE void tile_gen_init(tile_gen *g, uint32_t kz, uint32_t kw, uint32_t hi) {
    g->lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    g->lane_step = _mm512_add_epi32(_mm512_mullo_epi32(g->lane, _mm512_set1_epi32((int)PCG_MUL)),
                                    _mm512_set1_epi32((int)PCG_INC));
    const uint32_t y0 = hi * PCG_MUL + PCG_INC;
    g->y0w0 = y0 * kw;
    g->y0 = _mm512_set1_epi32((int)y0);
    g->z0 = _mm512_set1_epi32((int)kz);
    g->w0 = _mm512_set1_epi32((int)kw);
    for (int k = 0; k <= GAUSS_DEGREE; ++k) {
        g->lo[k] = _mm512_loadu_ps(GAUSS_POLY[k]);
        g->up[k] = _mm512_loadu_ps(GAUSS_POLY[k] + 16);
    }
}

/* The four hash words of the tile whose first counter's low word is `lo`.
 * The counters' LCG step and the first round's x += y * w, whose y and w
 * are the same for every counter, are one scalar multiply-add and a vector
 * add: (lo + lane) * MUL + INC + y0 * w0, modulo 2^32. Seven vector
 * multiplies a tile instead of nine, the same words. */
DQ_AVX512_INLINE void tile_gen_words(const tile_gen *g, uint32_t lo, __m512i words[4]) {
    __m512i x = _mm512_add_epi32(_mm512_set1_epi32((int)(lo * PCG_MUL + g->y0w0)), g->lane_step);
    __m512i y = g->y0, zz = g->z0, w = g->w0;
    for (int round = 0; round < 2; ++round) {
        if (round == 1)
            x = _mm512_add_epi32(x, _mm512_mullo_epi32(y, w));
        y = _mm512_add_epi32(y, _mm512_mullo_epi32(zz, x));
        zz = _mm512_add_epi32(zz, _mm512_mullo_epi32(x, y));
        w = _mm512_add_epi32(w, _mm512_mullo_epi32(y, zz));
        if (round == 0) {
            x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
            y = _mm512_xor_si512(y, _mm512_srli_epi32(y, 16));
            zz = _mm512_xor_si512(zz, _mm512_srli_epi32(zz, 16));
            w = _mm512_xor_si512(w, _mm512_srli_epi32(w, 16));
        }
    }
    words[0] = x, words[1] = y, words[2] = zz, words[3] = w;
}

/* The noise of one word vector. */
DQ_AVX512_INLINE __m512 tile_gen_word_noise(const tile_gen *g, int kind, __m512i u) {
    if (kind == DQ_NOISE_UNIFORM)
        return _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 8)),
                                           _mm512_set1_ps(0x1p-24f)),
                             _mm512_set1_ps(0.5f));
    /* (A & B) | C and A ^ (B & C): one ternary-logic op each */
    __m512i q = _mm512_ternarylogic_epi32(_mm512_srli_epi32(u, GAUSS_Q_SHIFT),
                                          _mm512_set1_epi32((int)GAUSS_Q_MASK),
                                          _mm512_set1_epi32((int)GAUSS_Q_LOW), 0xEA);
    __m512i bits = _mm512_castps_si512(_mm512_cvtepi32_ps(q));
    __m512i octave = _mm512_srli_epi32(bits, 23);
    __m512 m = _mm512_castsi512_ps(
        _mm512_ternarylogic_epi32(bits, _mm512_set1_epi32(0x7fffff), _mm512_set1_epi32(0x3f800000), 0xEA));
    __m512 v = _mm512_permutex2var_ps(g->lo[0], octave, g->up[0]);
    for (int k = 1; k <= GAUSS_DEGREE; ++k)
        v = _mm512_fmadd_ps(v, m, _mm512_permutex2var_ps(g->lo[k], octave, g->up[k]));
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(v), u,
                                                         _mm512_set1_epi32((int)0x80000000u), 0x78));
}

/* Tiles taken in counter order with the next tile's hash issued before
 * this tile's polynomials. The hash is a chain of dependent multiplies
 * (nine when this was measured, seven since tile_gen_words folds the first
 * two), about 100 cycles: issued right before its own polynomials,
 * their uops fill the scheduler waiting on it and stall the front end;
 * issued a tile ahead, it runs under the tile before (one thread, in L2:
 * gaussian fill 16% faster, noise forward at group_size 8 18%; two
 * threads over 2^24 values: forward and backward 9%). */
typedef struct {
    __m512i next[4]; /* the hash words of the tile at counter `lo` */
    uint32_t lo;
} tile_ahead;

DQ_AVX512_INLINE void tile_ahead_init(const tile_gen *g, tile_ahead *a, uint32_t lo) {
    a->lo = lo;
    tile_gen_words(g, lo, a->next);
}

/* The noise of the tile whose first counter's low word is `lo`: z[l] holds
 * elements 16l .. 16l + 15 of the tile. A tile out of order costs its hash
 * at once. */
DQ_AVX512_INLINE void tile_ahead_noise(const tile_gen *g, tile_ahead *a, int kind, uint32_t lo,
                                       __m512 z[4]) {
    __m512i cur[4];
    if (a->lo == lo)
        for (int l = 0; l < 4; ++l)
            cur[l] = a->next[l];
    else
        tile_gen_words(g, lo, cur);
    a->lo = lo + LANES;
    tile_gen_words(g, a->lo, a->next);
    for (int l = 0; l < 4; ++l)
        z[l] = tile_gen_word_noise(g, kind, cur[l]);
}
#endif

/* Whether the fast kernels take their AVX-512 paths (rng.c; dq_noise_simd
 * switches them). */
int dq__noise_avx512(void);

#endif
