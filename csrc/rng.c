/* Counter-based noise: a 4x32-bit multiplicative hash of (counter, key),
 * then float transforms that the reference and the fast path share, so the
 * two give the same bits. README "Noise" says why this generator. */
#include "noise_gen.h"

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

void dq_noise_hash4(uint64_t seed, uint64_t counter, uint32_t out[4]) {
    uint32_t kz, kw;
    key_of_seed(seed, &kz, &kw);
    pcg4d((uint32_t)counter, (uint32_t)(counter >> 32), kz, kw, &out[0], &out[1], &out[2], &out[3]);
}

float dq_noise_of_word(int kind, uint32_t word) { return noise_of(kind, word); }

void dq_noise_fill_ref(int kind, uint64_t seed, int64_t start, int64_t count,
                       float *restrict out) {
    assert(start >= 0 && count >= 0);
    for (int64_t j = 0; j < count; ++j) {
        uint64_t i = (uint64_t)(start + j);
        uint64_t lane = i % LANES, word = (i / LANES) % 4;
        uint32_t w[4];
        dq_noise_hash4(seed, i / TILE * LANES + lane, w);
        out[j] = noise_of(kind, w[word]);
    }
}

/* A setting that is -1 until first asked, then what the CPU has
 * (`available`); dq_noise_simd and dq_fused_madd cap it for tests and
 * measurements. */
static int setting_now(int *setting, int (*available)(void)) {
    int now = __atomic_load_n(setting, __ATOMIC_RELAXED);
    if (now < 0) {
        now = available();
        __atomic_store_n(setting, now, __ATOMIC_RELAXED);
    }
    return now;
}

/* `wanted`, at most what the CPU has; -1 for that. Returns what is set. */
static int setting_cap(int *setting, int (*available)(void), int wanted) {
    const int most = available();
    const int now = wanted < 0 || wanted > most ? most : wanted;
    __atomic_store_n(setting, now, __ATOMIC_RELAXED);
    return now;
}

/* The instruction set the noise paths take: 2 AVX-512, 1 AVX2 and FMA, 0 plain C. */
static int noise_level = -1;

static int noise_level_available(void) {
#if DQ_X86_AVX512
    if (dq__avx512_level() >= 1)
        return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
    return 0;
#endif
}

static int noise_level_now(void) { return setting_now(&noise_level, noise_level_available); }

#if DQ_X86_AVX512
/* The gaussian transform with AVX2 (no AVX-512). A permute looks up eight
 * table entries: rows 16..23 (the octaves p >= 2^-9, |z| < 2.9 sigma,
 * 99.6% of values) are one register a coefficient; a vector holding a
 * deeper value (3% of vectors) takes all 24 rows in three registers,
 * chosen by blends on the row's bits 3 and 4. The same operations as
 * gaussian_of, so the same bits. n is a multiple of 8. */
__attribute__((target("avx2,fma"))) static void gaussian_words_avx2(const uint32_t *restrict src, int n,
                                                                float *restrict o) {
    const __m256i low_mask = _mm256_set1_epi32((int)GAUSS_Q_MASK), two = _mm256_set1_epi32((int)GAUSS_Q_LOW);
    const __m256i mant_mask = _mm256_set1_epi32(0x7fffff), one_f = _mm256_set1_epi32(0x3f800000);
    const __m256i sign_mask = _mm256_set1_epi32((int)0x80000000u), body = _mm256_set1_epi32(16);
    __m256 top[GAUSS_DEGREE + 1];
    for (int k = 0; k <= GAUSS_DEGREE; ++k)
        top[k] = _mm256_loadu_ps(GAUSS_POLY[k] + 16);
    for (int j = 0; j < n; j += 8) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(src + j));
        const __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, GAUSS_Q_SHIFT), low_mask), two);
        const __m256i bits = _mm256_castps_si256(_mm256_cvtepi32_ps(q));
        const __m256i row = _mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(31));
        const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, mant_mask), one_f));
        __m256 v;
        if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(body, row))) == 0) {
            v = _mm256_permutevar8x32_ps(top[0], row);
            for (int k = 1; k <= GAUSS_DEGREE; ++k)
                v = _mm256_fmadd_ps(v, m, _mm256_permutevar8x32_ps(top[k], row));
        } else {
            const __m256 upper8 = _mm256_castsi256_ps(_mm256_slli_epi32(row, 28));
            const __m256 upper16 = _mm256_castsi256_ps(_mm256_slli_epi32(row, 27));
            for (int k = 0; k <= GAUSS_DEGREE; ++k) {
                __m256 c = _mm256_blendv_ps(
                    _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(GAUSS_POLY[k]), row),
                                     _mm256_permutevar8x32_ps(_mm256_loadu_ps(GAUSS_POLY[k] + 8), row),
                                     upper8),
                    _mm256_permutevar8x32_ps(top[k], row), upper16);
                v = k == 0 ? c : _mm256_fmadd_ps(v, m, c);
            }
        }
        v = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(v), _mm256_and_si256(u, sign_mask)));
        _mm256_storeu_ps(o + j, v);
    }
}
#endif

/* gaussian_of over n words (a multiple of 8) with the widest table lookup
 * this CPU has outside the AVX-512 tiles. */
static void gaussian_words(const uint32_t *restrict src, int n, float *restrict o) {
#if DQ_X86_AVX512
    if (noise_level_now() >= 1) {
        gaussian_words_avx2(src, n, o);
        return;
    }
#endif
    for (int j = 0; j < n; ++j)
        o[j] = gaussian_of(src[j]);
}

/* ---- fast path: the same functions over whole tiles */

#define FAST_TILES 4 /* tiles per batch: 256 values */

/* Noise of whole tiles [first_tile, first_tile + ntiles) into out; the
 * counters' high word is `hi` throughout (the caller splits batches where
 * it changes). The hash in a loop the compiler vectorizes (32-bit lanes,
 * 32-bit multiplies); the gaussian through gaussian_words. */
DQ_INLINE void noise_tiles_portable(int kind, uint32_t kz, uint32_t kw, uint64_t first_tile,
                                    int ntiles, float *restrict out) {
    uint32_t w[4][LANES * FAST_TILES];
    const int n = LANES * ntiles;
    const uint64_t first = first_tile * LANES;
    const uint32_t lo0 = (uint32_t)first, hi = (uint32_t)(first >> 32);
    assert(ntiles <= FAST_TILES && (uint64_t)lo0 + (uint64_t)n <= ((uint64_t)1 << 32));
    for (int k = 0; k < n; ++k)
        pcg4d(lo0 + (uint32_t)k, hi, kz, kw, &w[0][k], &w[1][k], &w[2][k], &w[3][k]);
    for (int t = 0; t < ntiles; ++t)
        for (int l = 0; l < 4; ++l) {
            float *restrict o = out + TILE * t + LANES * l;
            const uint32_t *restrict src = w[l] + LANES * t;
            if (kind == DQ_NOISE_UNIFORM)
                for (int j = 0; j < LANES; ++j)
                    o[j] = uniform_of(src[j]);
            else
                gaussian_words(src, LANES, o);
        }
}

#if DQ_X86_AVX512
__attribute__((target("avx512f"))) static void noise_tiles_avx512(int kind, uint32_t kz,
                                                                  uint32_t kw,
                                                                  uint64_t first_tile,
                                                                  int ntiles,
                                                                  float *restrict out) {
    const uint64_t first = first_tile * LANES;
    tile_gen g;
    tile_gen_init(&g, kz, kw, (uint32_t)(first >> 32));
    tile_ahead ahead;
    tile_ahead_init(&g, &ahead, (uint32_t)first);
    for (int t = 0; t < ntiles; ++t) {
        __m512 z[4];
        tile_ahead_noise(&g, &ahead, kind, (uint32_t)first + (uint32_t)(LANES * t), z);
        for (int l = 0; l < 4; ++l)
            _mm512_storeu_ps(out + TILE * t + LANES * l, z[l]);
    }
}
#endif

int dq__noise_avx512(void) { return noise_level_now() == 2; }

/* 1 where the fast kernels' clones have FMA instructions: x86-64-v3 is
 * what target_clones picks the FMA clones by. */
static int fused_madd = -1;

static int fused_madd_available(void) {
#if defined(__x86_64__) && defined(__GNUC__)
#if defined(__FMA__)
    return 1;
#elif defined(DQ_NO_CLONES) || defined(__clang__) || !defined(__linux__)
    return 0;
#else
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v3") != 0;
#endif
#else
    return 1;
#endif
}

int dq__fused(void) { return setting_now(&fused_madd, fused_madd_available); }

int dq_fused_madd(int on) { return setting_cap(&fused_madd, fused_madd_available, on); }

int dq_noise_simd(int level) { return setting_cap(&noise_level, noise_level_available, level); }

DQ_INLINE void noise_tiles(int kind, uint32_t kz, uint32_t kw, uint64_t first_tile, int ntiles,
                           float *restrict out) {
#if DQ_X86_AVX512
    if (dq__noise_avx512()) {
        noise_tiles_avx512(kind, kz, kw, first_tile, ntiles, out);
        return;
    }
#endif
    noise_tiles_portable(kind, kz, kw, first_tile, ntiles, out);
}

/* A batch of whole tiles, split where the counters' high word changes
 * (once every 2^36 elements). */
DQ_INLINE void noise_tiles_any(int kind, uint32_t kz, uint32_t kw, uint64_t first_tile,
                               int ntiles, float *restrict out) {
    const uint64_t first = first_tile * LANES;
    uint64_t to_wrap = ((first | 0xffffffffull) + 1 - first) / LANES;
    if (to_wrap < (uint64_t)ntiles) {
        noise_tiles(kind, kz, kw, first_tile, (int)to_wrap, out);
        first_tile += to_wrap;
        out += TILE * to_wrap;
        ntiles -= (int)to_wrap;
    }
    noise_tiles(kind, kz, kw, first_tile, ntiles, out);
}

DQ_FAST
void dq_noise_fill_fast(int kind, uint64_t seed, int64_t start, int64_t count,
                        float *restrict out) {
    assert(start >= 0 && count >= 0);
    uint32_t kz, kw;
    key_of_seed(seed, &kz, &kw);
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
