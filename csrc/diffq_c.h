/*
 * diffq_c kernels: plain C11 over raw buffers, no torch or Python.
 *
 * Every concept has a scalar `_ref` function that is the specification and a
 * fast version beside it; tests hold the two equal. Kernels work on a chunk
 * (start, count) of a flat buffer; the `dq_*` drivers without a suffix split
 * the work in fixed-size chunks and run them with OpenMP. Chunk sizes never
 * depend on the thread count, so results are bit-identical for any number of
 * threads.
 *
 * Sizes and indices are int64_t everywhere: tensors above 2^31 elements are
 * common in large models.
 */
#ifndef DIFFQ_C_H
#define DIFFQ_C_H

#include <stdint.h>

#ifdef __cplusplus
/* C++ has no `restrict`; the binding only needs the declarations. */
#define restrict __restrict__
extern "C" {
#endif

/* Elements per work chunk of the drivers. A multiple of 2048 (one bitpack
 * line) and of 32 (one tile of the noise), so chunk borders never split
 * either. */
#define DQ_CHUNK ((int64_t)1 << 16)

/* ------------------------------------------------------------------ rng.c */

enum dq_noise_kind { DQ_NOISE_UNIFORM = 0, DQ_NOISE_GAUSSIAN = 1 };

/* Philox4x32 with 10 rounds (Salmon et al., SC'11): the noise until issue
 * 12, kept for the binding's known-answer check. */
void dq_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

/* Noise of element i is a pure function of (seed, i, kind): one 32-bit
 * word of pcg4d (Jarzynski and Olano, JCGT 2020) of (counter low word,
 * counter high word, key low, key high), the key being splitmix64's
 * finalizer of the seed. Element i takes word (i / 16) % 4 of counter
 * (i / 64) * 16 + i % 16. Uniform noise is the word's top 24 bits as a
 * fraction, minus 1/2: [-0.5, 0.5). Gaussian noise is N(0, 1) / 2 by the
 * inverse normal CDF of the tail probability (2 * bits 8..30 + 1) / 2^25, a
 * polynomial per octave of it, signed by bit 31 (rng.c has the float
 * formulas and the table, which are the specification bit for bit).
 * `out[j]` receives the noise of element `start + j`. */
void dq_noise_hash4(uint64_t seed, uint64_t counter, uint32_t out[4]);
float dq_noise_of_word(int kind, uint32_t word);
void dq_noise_fill_ref(int kind, uint64_t seed, int64_t start, int64_t count,
                       float *restrict out);
void dq_noise_fill_fast(int kind, uint64_t seed, int64_t start, int64_t count,
                        float *restrict out);
void dq_noise_fill(int kind, uint64_t seed, int64_t n, float *restrict out, int nthreads);

/* The widest instruction set the noise kernels may take, all giving the
 * same bits: 2 AVX-512 (noise in registers, fused forward and backward), 1
 * AVX2 (the gaussian's table lookups), 0 plain C; -1 as the CPU allows.
 * Returns the level in effect (never above what the CPU has). */
int dq_noise_simd(int level);

/* Whether the fast kernels' multiply-adds (the exp2 of the steps and of
 * the size penalty) run as FMA instructions (1) or as a multiply and an add
 * (0, which may round the last bit otherwise); -1 as the CPU allows.
 * Returns the setting in effect. The noise itself has the same bits
 * either way. */
int dq_fused_madd(int on);

/* ---------------------------------------------------------------- noise.c */

enum dq_bits_mode { DQ_PARAM_BITS = 0, DQ_PARAM_NOISE = 1 };

/* How logits become bits. For DQ_PARAM_BITS,
 *   bits = max_bits * t + (1 - t) * min_bits,  t = sigmoid(logit);
 * for DQ_PARAM_NOISE,
 *   bits = log2(1 + 1 / exp(t * log_min_noise + (1 - t) * log_max_noise)).
 * The quantization step is 1 / (2^bits - 1). */
typedef struct {
    int mode;
    float min_bits, max_bits;
    float log_min_noise, log_max_noise;
} dq_bits_param;

/* The size penalty's terms of some logits: their sum of bits and largest
 * bits value (size.c). */
typedef struct {
    double sum_bits;
    float max_bits;
} dq_size_stats;

/* For each logit: bits, step and d(step)/d(logit). Any output may be NULL. */
void dq_logit_to_step_ref(const dq_bits_param *prm, const float *restrict logit, int64_t n,
                          float *restrict bits, float *restrict step,
                          float *restrict dstep);

/* The same for logits [start, start + count), written at the same indices,
 * with a polynomial exp2 (bits mode; the noise mode uses the reference). */
void dq_logit_to_step_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                           int64_t count, float *restrict step, float *restrict dstep);
/* bits and d(bits)/d(logit) of logits [start, start + count); either output may be NULL. */
void dq_logit_to_bits_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                           int64_t count, float *restrict bits, float *restrict dbits);

/* noisy[i] = p[i] + step_scale[g] * noise(seed, i), g = i / group_size,
 * where step_scale[g] = (max(p) - min(p)) * step[g] was precomputed. While
 * reading p it also counts the elements equal to mn and to mx (the ties that
 * share the gradient through the noise scale). The fast version is
 * dq_noise_forward_fused below, which computes the steps itself. */
void dq_noise_forward_ref(const float *restrict p, const float *restrict step_scale,
                          int64_t group_size, int kind, uint64_t seed,
                          int64_t start, int64_t count, float *restrict noisy,
                          float mn, float mx, int64_t *count_min, int64_t *count_max);

/* acc[g - start / group_size] += sum over i in the chunk and group g of
 * grad[i] * noise(seed, i). The chunk must start on a group border or lie
 * inside one group. */
void dq_noise_grad_dot_ref(const float *restrict grad, int64_t group_size, int kind,
                           uint64_t seed, int64_t start, int64_t count,
                           double *restrict acc);
void dq_noise_grad_dot_fast(const float *restrict grad, int64_t group_size, int kind,
                            uint64_t seed, int64_t start, int64_t count,
                            double *restrict acc);

/* Extrema of p and the count of non-finite values. */
typedef struct {
    float min, max;
    int64_t count_min, count_max; /* ties at min / max (filled by the noise forward) */
    int64_t first_min, first_max; /* first index holding min / max (noise forward), -1 unknown */
    int64_t nonfinite;            /* NaN and infinities */
} dq_range;

/* Drivers (group_size 0 means one group for the whole buffer).
 *
 * dq_noise_forward: noisy = p + (max - min) * step(logit[g]) * noise. Fills
 * `range`. Returns 0, or DQ_ERR_NONFINITE (noisy untouched) when p holds NaN
 * or infinities, or DQ_ERR_NOMEM.
 *
 * dq_noise_backward: gradients of sum(grad * noisy) for p and the logits,
 * the noise regenerated from seed. `range` is the one the forward filled.
 * grad_p may be grad itself (the gradient is then updated in place: only
 * the extrema change), so neither is restrict. */
#define DQ_ERR_NONFINITE (-1)
#define DQ_ERR_NOMEM (-2)
int dq_noise_forward(const dq_bits_param *prm, const float *restrict p, int64_t n,
                     const float *restrict logit, int64_t group_size, int kind,
                     uint64_t seed, float *restrict noisy, dq_range *range, int nthreads);
int dq_noise_backward(const dq_bits_param *prm, const float *grad, const float *restrict p,
                      int64_t n, const float *restrict logit, int64_t group_size, int kind,
                      uint64_t seed, const dq_range *range, float *grad_p,
                      float *restrict grad_logit, int nthreads);
/* dq_noise_backward that with size_scale (else NULL) then adds the size
 * penalty's gradient, *size_scale * d(bits)/d(logit), to grad_logit: the
 * bits of dq_size_backward_add_fast after it, in the same pass where it can. */
int dq_noise_backward_sized(const dq_bits_param *prm, const float *grad, const float *restrict p,
                            int64_t n, const float *restrict logit, int64_t group_size, int kind,
                            uint64_t seed, const dq_range *range, float *grad_p,
                            float *restrict grad_logit, const float *size_scale, int nthreads);

/* The chunk kernels the drivers run: the forward with the steps computed
 * from the logits on the fly, and the backward over whole groups (returns
 * sum_g step_g * dot_g and writes grad_logit of those groups).
 *
 * With `size` (else NULL; group_size 1 only) the forward also gives
 * dq_size_forward_fast of the chunk's logits, from the sigmoids its steps
 * computed where the size works on them (the bits mode). With size_scale
 * (else NULL) the backward adds *size_scale * d(bits)/d(logit) to its
 * groups' grad_logit, as dq_size_backward_add_fast would after it. Same
 * bits either way, one pass fewer over the logits.
 *
 * The forward counts the chunk's elements equal to mn into *count_min and
 * those equal to mx into *count_max; with both NULL it counts neither (the
 * drivers pass NULL for an end where the chunk's own extremum is not the
 * tensor's: such a chunk holds none of its ties). */
void dq_noise_forward_fused(const dq_bits_param *prm, const float *restrict p,
                            const float *restrict logit, float scale, int64_t group_size,
                            int kind, uint64_t seed, int64_t start, int64_t count,
                            float *restrict noisy, float mn, float mx, int64_t *count_min,
                            int64_t *count_max, dq_size_stats *size);
double dq_noise_backward_fused(const dq_bits_param *prm, const float *restrict grad,
                               const float *restrict logit, float scale, int64_t group_size,
                               int kind, uint64_t seed, int64_t start, int64_t count,
                               float *restrict grad_logit, const float *size_scale);

/* ------------------------------------------------------------- quantize.c */

/* min, max and non-finite count of x[start, start + count); counts of ties
 * are left at 0. */
void dq_range_ref(const float *restrict x, int64_t start, int64_t count, dq_range *out);
void dq_range_fast(const float *restrict x, int64_t start, int64_t count, dq_range *out);
void dq_range_all(const float *restrict x, int64_t n, dq_range *out, int nthreads);

/* level = round_half_even(((p - mn) / (mx - mn)) / (1 / (2^bits[g] - 1))),
 * in float32 with exactly that operation order, so levels match a torch
 * evaluation of the same formula bit for bit. `range` is (mx - mn) computed
 * in double and rounded once to float. A zero range gives level 0.
 * Levels are written as uint8 (level_bytes 1) or int16 (level_bytes 2).
 * group_size 0 means one group. */
void dq_quantize_ref(const float *restrict p, int64_t group_size,
                     const uint8_t *restrict bits, float mn, float range,
                     int64_t start, int64_t count, void *restrict levels, int level_bytes);
void dq_quantize_fast(const float *restrict p, int64_t group_size,
                      const uint8_t *restrict bits, float mn, float range,
                      int64_t start, int64_t count, void *restrict levels, int level_bytes);
void dq_quantize(const float *restrict p, int64_t n, int64_t group_size,
                 const uint8_t *restrict bits, float mn, float range,
                 void *restrict levels, int level_bytes, int nthreads);

/* out = (level * (1 / (2^bits[g] - 1))) * range + mn, float32, same order
 * as the torch formula. Levels are uint8 or int16 as above. */
void dq_dequantize_ref(const void *restrict levels, int level_bytes, int64_t group_size,
                       const uint8_t *restrict bits, float mn, float range,
                       int64_t start, int64_t count, float *restrict out);
void dq_dequantize_fast(const void *restrict levels, int level_bytes, int64_t group_size,
                        const uint8_t *restrict bits, float mn, float range,
                        int64_t start, int64_t count, float *restrict out);
void dq_dequantize(const void *restrict levels, int level_bytes, int64_t n,
                   int64_t group_size, const uint8_t *restrict bits, float mn, float range,
                   float *restrict out, int nthreads);

/* Largest level found in levels[0..n) for each group's bit width check:
 * returns the index of the first level >= 2^bits[g], or -1. */
int64_t dq_check_levels(const void *restrict levels, int level_bytes, int64_t n,
                        int64_t group_size, const uint8_t *restrict bits);

/* The bits stored for quantization from sigmoid outputs t (bits mode):
 * clamp(round_half_even(extra + (max_bits * t + (1 - t) * min_bits)), 1, 15)
 * in float32 in that order, as torch evaluates it; NaN gives 0. */
void dq_stored_bits_ref(const float *restrict t, int64_t n, float min_bits, float max_bits,
                        float extra_bits, uint8_t *restrict out);
void dq_stored_bits_fast(const float *restrict t, int64_t start, int64_t count, float min_bits,
                         float max_bits, float extra_bits, uint8_t *restrict out);
void dq_stored_bits(const float *restrict t, int64_t n, float min_bits, float max_bits,
                    float extra_bits, uint8_t *restrict out, int nthreads);

/* out = dequantize(quantize(p)) in one pass, bit-identical to the two
 * kernels in a row; out may be p itself (eval swaps weights in place). */
void dq_requantize_fast(const float *p, int64_t group_size, const uint8_t *restrict bits, float mn,
                        float range, int64_t start, int64_t count, float *out);
void dq_requantize(const float *p, int64_t n, int64_t group_size, const uint8_t *restrict bits,
                   float mn, float range, float *out, int nthreads);

/* -------------------------------------------------------------- bitpack.c */

/* diffq's packed layout. Values are padded with zeros to whole lines of
 * DQ_PACK_LINE values. Line l holds nbits * 32 words: bit b of value
 * x[l * 2048 + k * 32 + j] is bit k of word (l * nbits + b) * 32 + j. */
#define DQ_PACK_BLOCK 32
#define DQ_PACK_STORAGE 64
#define DQ_PACK_LINE (DQ_PACK_BLOCK * DQ_PACK_STORAGE)

static inline int64_t dq_pack_lines(int64_t n) { return (n + DQ_PACK_LINE - 1) / DQ_PACK_LINE; }

/* Packs lines [line_start, line_start + line_count) of x (n values, int16,
 * each in [0, 2^nbits)) into out, which holds all lines. */
void dq_pack_bits_ref(const int16_t *restrict x, int64_t n, int nbits,
                      int64_t line_start, int64_t line_count, uint64_t *restrict out);
void dq_pack_bits_fast(const int16_t *restrict x, int64_t n, int nbits,
                       int64_t line_start, int64_t line_count, uint64_t *restrict out);
void dq_pack_bits(const int16_t *restrict x, int64_t n, int nbits, uint64_t *restrict out,
                  int nthreads);

/* Unpacks the first n values of `lines` packed lines into out (int16). */
void dq_unpack_bits_ref(const uint64_t *restrict packed, int64_t lines, int nbits,
                        int64_t line_start, int64_t line_count, int64_t n,
                        int16_t *restrict out);
void dq_unpack_bits_fast(const uint64_t *restrict packed, int64_t lines, int nbits,
                         int64_t line_start, int64_t line_count, int64_t n,
                         int16_t *restrict out);
void dq_unpack_bits(const uint64_t *restrict packed, int64_t lines, int nbits, int64_t n,
                    int16_t *restrict out, int nthreads);

/* Splits levels (uint8 or int16, rows of group_size, one width per group
 * in bits) into one int16 stream per width, laid out in `streams` by
 * increasing width, groups in their order: stream w is diffq's
 * `levels[bits == w]`. totals[w] receives its length (widths taken mod 16).
 * dq_merge_by_width puts streams back into rows. Both return DQ_OK or
 * DQ_ERR_NOMEM. */
int dq_split_by_width(const void *restrict levels, int level_bytes, int64_t group_size,
                      const uint8_t *restrict bits, int64_t ngroups, int16_t *restrict streams,
                      int64_t totals[16], int nthreads);
int dq_merge_by_width(const int16_t *restrict streams, int64_t group_size,
                      const uint8_t *restrict bits, int64_t ngroups, int16_t *restrict levels,
                      int nthreads);
/* totals[w] = number of values of width w (group_size times the groups
 * of that width). DQ_OK or DQ_ERR_NOMEM. */
int dq_width_totals(const uint8_t *restrict bits, int64_t ngroups, int64_t group_size,
                    int64_t totals[16], int nthreads);
/* dq_quantize, dq_split_by_width and dq_pack_bits of each stream, without
 * the levels or streams: levels go straight into out[w], dq_pack_lines(totals[w]) lines
 * of w planes (NULL where no group has width w; totals from
 * dq_width_totals). Bits must be 1..15. The same bytes as packing the
 * streams. DQ_OK or DQ_ERR_NOMEM (then out is partly written). */
int dq_quantize_pack(const float *restrict p, int64_t group_size, const uint8_t *restrict bits,
                     int64_t ngroups, float mn, float range, uint64_t *const out[16],
                     int nthreads);
/* The reverse of dq_quantize_pack: out = dequantized levels read straight
 * from the per-width packs (packed[w] holds lines[w] lines of w planes;
 * only widths that groups have are read, each needs dq_pack_lines of its
 * values). The same floats as dq_dequantize of the levels. DQ_OK,
 * DQ_ERR_PACK_SHORT (a width's pack missing or short; out untouched) or
 * DQ_ERR_NOMEM. Bits must be 1..15. */
int dq_dequantize_packed(const uint64_t *const packed[16], const int64_t lines[16],
                         int64_t group_size, const uint8_t *restrict bits, int64_t ngroups,
                         float mn, float range, float *restrict out, int nthreads);
/* Packs widths[i] - offset (uint8 in, each in [0, 2^nbits)) like
 * dq_pack_bits: diffq's packed bits of a state, without an int16 copy. */
void dq_pack_widths(const uint8_t *restrict widths, int64_t n, int offset, int nbits,
                    uint64_t *restrict out, int nthreads);
/* Stored bit widths as packed by diffq (width - offset, int16) back to
 * uint8 widths, with the count of each. Returns the index of the first
 * width outside 1..15, or -1. */
int64_t dq_widths_from_stored(const int16_t *restrict stored, int64_t n, int offset,
                              uint8_t *restrict widths, int64_t counts[16], int nthreads);

/* ----------------------------------------------------------------- size.c */

/* Differentiable size terms over the logits: sum of bits, the largest bits
 * value (for the bit-width of the stored bits; dq_size_stats, declared with
 * the noise), and d(bits)/d(logit). */

void dq_size_forward_ref(const dq_bits_param *prm, const float *restrict logit,
                         int64_t start, int64_t count, dq_size_stats *out);
void dq_size_forward(const dq_bits_param *prm, const float *restrict logit, int64_t n,
                     dq_size_stats *out, int nthreads);
/* grad[i] = scale * d(bits)/d(logit[i]) */
void dq_size_backward_ref(const dq_bits_param *prm, const float *restrict logit,
                          int64_t start, int64_t count, float scale, float *restrict grad);
void dq_size_backward(const dq_bits_param *prm, const float *restrict logit, int64_t n,
                      float scale, float *restrict grad, int nthreads);

/* The chunk kernels of the two drivers above: logits [start, start + count). */
void dq_size_forward_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                          int64_t count, dq_size_stats *out);
void dq_size_backward_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                           int64_t count, float scale, float *restrict grad);
/* grad[i] += scale * d(bits)/d(logit[i]), the term the size penalty adds
 * to a gradient that already holds the noise's (the same product as
 * dq_size_backward's, so the sum equals adding the two gradients). */
void dq_size_backward_add_ref(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                              int64_t count, float scale, float *restrict grad);
void dq_size_backward_add_fast(const dq_bits_param *prm, const float *restrict logit, int64_t start,
                               int64_t count, float scale, float *restrict grad);

/* bits value and d(bits)/d(logit) of one logit. */
float dq_logit_to_bits(const dq_bits_param *prm, float logit, float *dbits);

/* ------------------------------------------------------------------ lsq.c */

/* Learnt step size quantization (Esser et al. 2019) of weights. With s the
 * effective scale (below), low = -2^(bits-1) and high = 2^(bits-1) - 1:
 *   c = x / s,  index = round_half_even(clamp(c, low, high)),  q = index * s,
 * in float32 with exactly that operation order, so q and index match a torch
 * evaluation bit for bit. clamp lets NaN through, as torch's does. */

/* (s - s*g) + s*g in float32: the value the gradient-scaling trick gives the
 * scale in the forward, g being the gradient scale 1 / sqrt(numel * high). */
float dq_lsq_effective_scale(float scale, float grad_scale);

/* q and/or index (either may be NULL) of x[start, start + count). Returns
 * the count of NaN levels (NaN x, or 0 / 0); their index is written as 0. */
int64_t dq_lsq_forward_ref(const float *restrict x, float scale, int bits, int64_t start,
                           int64_t count, float *restrict q, int16_t *restrict index);
int64_t dq_lsq_forward_fast(const float *restrict x, float scale, int bits, int64_t start,
                            int64_t count, float *restrict q, int16_t *restrict index);
int64_t dq_lsq_forward(const float *restrict x, int64_t n, float scale, int bits,
                       float *restrict q, int16_t *restrict index, int nthreads);

/* Which bounds of the clamp count as inside for the gradient (a bitmask).
 * torch changed this: its clamp's backward passes the gradient on both
 * bounds up to 2.13 (both bits) and on neither from 2.14 (0; pytorch issue
 * 184574). The Python layer asks the installed torch (diffq_c/lsq.py), so
 * that the gradients are those of torch's autograd of diffq's formula. */
#define DQ_LSQ_LOW_INSIDE 1
#define DQ_LSQ_HIGH_INSIDE 2

/* Backward of q for an upstream gradient `grad`. grad_x[i] = grad[i] where c
 * is inside [low, high] (strictly, or on a bound that `bounds` takes in),
 * else 0 (grad_x may be NULL). Returns, summed in double, grad[i] * (round(c)
 * - c) inside and grad[i] * bound outside: the gradient of sum(grad * q) with
 * respect to s. */
double dq_lsq_backward_ref(const float *restrict x, const float *restrict grad, float scale,
                           int bits, int bounds, int64_t start, int64_t count,
                           float *restrict grad_x);
double dq_lsq_backward_fast(const float *restrict x, const float *restrict grad, float scale,
                            int bits, int bounds, int64_t start, int64_t count,
                            float *restrict grad_x);
/* The driver returns the gradient for the raw scale: grad_scale times the
 * sum over all n elements (chunk sums added in chunk order). */
float dq_lsq_backward(const float *restrict x, const float *restrict grad, int64_t n, float scale,
                      int bits, int bounds, float grad_scale, float *restrict grad_x, int nthreads);

/* ------------------------------------------------------------- validate.c */

/* Checks of untrusted sizes and contents (a quantized state read from disk,
 * buffers from Python). The binding and the fuzz target both call these, so
 * what the fuzzer proves safe is what the binding accepts. Each returns
 * DQ_OK or a negative DQ_ERR_* code; dq_error_message describes it. */
#define DQ_OK 0
#define DQ_ERR_NBITS (-3)       /* bit planes outside 0..16 */
#define DQ_ERR_PACK_SHAPE (-4)  /* not [lines, nbits, 32], or the word count disagrees */
#define DQ_ERR_PACK_SHORT (-5)  /* fewer packed values than asked for */
#define DQ_ERR_OVERFLOW (-6)    /* a size product does not fit in int64 */
#define DQ_ERR_GROUPS (-7)      /* group_size does not divide n, or wrong group count */
#define DQ_ERR_BITS (-8)        /* a bit width outside 1..15 */
#define DQ_ERR_LEVEL (-9)       /* a level >= 2^bits of its group, or negative */
#define DQ_ERR_LEVEL_BYTES (-10) /* levels neither uint8 nor int16, or uint8 with > 8 bits */
#define DQ_ERR_SIZE (-11)       /* a negative size */

const char *dq_error_message(int err);

/* a * b into *out; 0 (and *out untouched) when it overflows or a, b < 0. */
int dq_mul_size(int64_t a, int64_t b, int64_t *out);

/* A packed buffer of `words` uint64 with shape [lines, nbits, block], from
 * which n values are to be unpacked: block is 32, 0 <= nbits <= 16,
 * words == lines * nbits * 32 and n <= lines * 2048, without overflow. */
int dq_validate_packed(int64_t lines, int64_t nbits, int64_t block, int64_t words, int64_t n);

/* Grouped levels for dq_quantize / dq_dequantize: n >= 0, group_size >= 0
 * (0: one group), n == ngroups * group_size, every bits[g] in 1..15,
 * level_bytes 1 (only with bits <= 8) or 2. When `levels` is not NULL their
 * values are checked too: 0 <= level < 2^bits[g]. On failure *where (if not
 * NULL) is the offending group (DQ_ERR_BITS, DQ_ERR_LEVEL_BYTES) or element
 * (DQ_ERR_LEVEL), else -1. */
int dq_validate_levels(const void *levels, int level_bytes, int64_t n, int64_t group_size,
                       const uint8_t *bits, int64_t ngroups, int64_t *where);


/* ----------------------------------------------------------------- multi.c */

/* Multi-tensor drivers: the chunks of many tensors in one table, each pass
 * one OpenMP region over it. Every tensor is cut in the single-tensor
 * drivers' DQ_CHUNK chunks and reduced in chunk order: outputs are
 * bit-identical to those drivers', tensor by tensor. Each returns DQ_OK,
 * DQ_ERR_NOMEM, or as said. */

/* The seed of tensor `index` of a forward whose seed is `base` (splitmix64). */
uint64_t dq_derive_seed(uint64_t base, int64_t index);

/* One tensor of dq_noise_forward_multi: the arguments of dq_noise_forward. */
typedef struct {
    const float *p;
    int64_t n;
    const float *logit;
    int64_t group_size; /* 0: one group */
    uint64_t seed;
    float *noisy;
    dq_range range; /* filled as dq_noise_forward fills it */
    int with_size;      /* also fill `size` */
    dq_size_stats size; /* dq_size_forward_multi of logit (on DQ_OK) */
} dq_noise_job;

/* dq_noise_forward of every job. DQ_ERR_NONFINITE when a p holds NaN or
 * infinities (each job's range.nonfinite says which; no noisy is written). */
int dq_noise_forward_multi(const dq_bits_param *prm, int kind, dq_noise_job *jobs, int64_t njobs,
                           int nthreads);

/* One tensor of dq_noise_backward_multi: the arguments of dq_noise_backward
 * (grad_p may be grad itself). */
typedef struct {
    const float *grad;
    const float *p;
    int64_t n;
    const float *logit;
    int64_t group_size;
    uint64_t seed;
    dq_range range;
    float *grad_p;
    float *grad_logit;
    /* with add_size, grad_logit also gets the size penalty's gradient,
     * size_scale * d(bits)/d(logit); grad may then be NULL (no gradient
     * reached the noisy weight: grad_p is not written and grad_logit is
     * the size term alone) */
    int add_size;
    float size_scale;
    int64_t nlogits; /* values of logit and grad_logit */
} dq_noise_grad_job;

/* dq_noise_backward of every job: tensors of up to DQ_CHUNK values share
 * the threads (one a thread), larger ones then use them all. */
int dq_noise_backward_multi(const dq_bits_param *prm, int kind, const dq_noise_grad_job *jobs,
                            int64_t njobs, int nthreads);

/* dq_size_forward of logits[j] (ns[j] values) into out[j], and
 * dq_size_backward of each with its own scale. */
int dq_size_forward_multi(const dq_bits_param *prm, const float *const *logits, const int64_t *ns,
                          int64_t njobs, dq_size_stats *out, int nthreads);
int dq_size_backward_multi(const dq_bits_param *prm, const float *const *logits, const int64_t *ns,
                           const float *scales, float *const *grads, int64_t njobs, int nthreads);

/* One tensor to quantize (eval, quantized states). */
typedef struct {
    const float *p;
    int64_t n;
    int64_t group_size; /* 0: one group */
    const float *t;     /* sigmoid of each group's logit */
    uint8_t *bits;      /* out: stored bits of each group (dq_stored_bits) */
    float *out;         /* dq_requantize_multi: the quantized values; NULL skips the job */
    float min, max;     /* out: extrema of p */
    int64_t nonfinite;  /* out: NaN and infinities in p */
    int64_t nan_bits;   /* out: groups whose bits are NaN (stored as 0) */
} dq_quant_job;

/* Extrema and stored bits of every job (the first pass of quantizing). */
int dq_quantize_prepare_multi(float min_bits, float max_bits, float extra_bits, dq_quant_job *jobs,
                              int64_t njobs, int nthreads);
/* dq_requantize of every job with an `out`, from what the first pass filled
 * (the caller checks nonfinite and nan_bits are 0 first). */
int dq_requantize_multi(const dq_quant_job *jobs, int64_t njobs, int nthreads);

#ifdef __cplusplus
}
#undef restrict
#endif

#endif /* DIFFQ_C_H */
