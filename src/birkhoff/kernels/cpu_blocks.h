/* What the cpu backend's C files share: the block layout, the per-thread scratch, the
 * arguments and the driver over blocks (cpu_sinkhorn.c, cpu_mhc_read.c), two row helpers (the
 * stream read, 1/rms; cpu_streams.c, cpu_rows.c, cpu_mhc_read.c, cpu_engram.c), exp and
 * sigmoid written to vectorise (cpu_sinkhorn.c, cpu_engram.c, cpu_v4_attention.c), the
 * ordered sum of the threads' weight gradients (cpu_rows.c, cpu_engram.c, cpu_mhc_read.c),
 * the vectors of register tiles (cpu_mhc_read.c, cpu_streams.c), the lane vectors with their
 * exp (Sinkhorn, cpu_sinkhorn.c; V4 attention's logits, cpu_v4_attention.c) and one token's
 * merge (cpu_streams.c, cpu_mhc_read.c). */
#ifndef BIRKHOFF_CPU_BLOCKS_H
#define BIRKHOFF_CPU_BLOCKS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Sinkhorn-Knopp runs on blocks of LANES tokens, each value of the n x n matrices laid out
 * across the block's tokens (value e of token l at [e * LANES + l]): every loop then runs
 * over the lanes and vectorises, where per-token loops would stay scalar over n = 4 values. */
#define LANES 16
/* a loop over the lanes, vectorised whatever aliasing the compiler cannot rule out */
#define FOR_LANES _Pragma("omp simd") for (int l = 0; l < LANES; l++)

/* Register tiles (cpu_mhc_read.c, cpu_streams.c): vectors of VW floats, the widest the target has
 * (GCC/clang vector extensions, split into narrower registers where the target has none so
 * wide), loaded and stored unaligned; a tile holds ROWS rows (tokens, or rows of a weight's
 * gradient) x SPAN vectors of sums in registers (16 of AVX-512's 32). */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
#define ROWS 4
#define SPAN 4
typedef float vfloat __attribute__((vector_size(VW * sizeof(float))));
static inline vfloat vload(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(float *p, vfloat v) { memcpy(p, &v, sizeof v); }
/* the sum of a vector's lanes (a dot product's lane-wise partial sums, at the end) */
static inline float lane_sum(vfloat v) {
    float total = 0.0f;
    for (int l = 0; l < VW; l++) total += v[l];
    return total;
}

/* Per-thread scratch of a block: states and divisors, the logits, the result, a gradient. */
typedef struct {
    float *states, *divisors, *logits, *result, *grad;
} Scratch;

/* What the block kernels take; each uses the fields it needs, `extra` a kernel's own. */
typedef struct {
    const float *logits, *grad, *q, *a, *b, *d_pre, *d_post, *d_res;
    float *out, *h_pre, *h_post, *h_res, *dz;
    int64_t n;
    int iters;
    float pre_eps, form_eps;
    const void *extra;
} BlockArgs;

typedef void (*BlockWork)(Scratch *scratch, const BlockArgs *args, int64_t t0, int64_t count);

/* `work` on every block of LANES tokens, in parallel, each thread with its scratch. Returns 0,
 * or -1 where a thread could not allocate its scratch (the caller raises MemoryError). */
int for_each_block(int64_t tokens, const BlockArgs *args, int threads, BlockWork work);

/* The mappings' tail on tokens t0 .. t0 + count (cpu_sinkhorn.c: mhc_tail_forward and
 * mhc_tail_backward say what they compute). */
void tail_forward_block(Scratch *s, const BlockArgs *x, int64_t t0, int64_t count);
void tail_backward_block(Scratch *s, const BlockArgs *x, int64_t t0, int64_t count);

/* One token's merge out_i = sum_j r[i, j] x_j + p[i] y over its n streams, and its gradients
 * from g (the next streams'): dx_j = sum_i r[i, j] g_i, dy = sum_i p[i] g_i,
 * dr[i, j] = g_i . x_j, dp[i] = g_i . y (cpu_streams.c) */
void merge_one(const float *x, const float *y, const float *r, const float *p, float *out,
               int64_t n, int64_t width);
void merge_backward_one(const float *g, const float *x, const float *y, const float *r,
                        const float *p, float *dx, float *dy, float *dr, float *dp, int64_t n,
                        int64_t width);

/* out = sum_i h[i] x_i over one token's n streams of `width` values */
static inline void read_streams(const float *x, const float *h, float *out, int64_t n,
                                int64_t width) {
#pragma omp simd
    for (int64_t c = 0; c < width; c++) out[c] = h[0] * x[c];
    for (int64_t i = 1; i < n; i++) {
        const float hi = h[i], *xi = x + i * width;
#pragma omp simd
        for (int64_t c = 0; c < width; c++) out[c] += hi * xi[c];
    }
}

/* (mean(x^2) + eps)^(-1/2) over `len` values */
static inline float inverse_rms(const float *x, int64_t len, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < len; c++) sum += x[c] * x[c];
    return 1.0f / sqrtf(sum / (float)len + eps);
}

/* exp as a polynomial (Cephes' single-precision one, within ~2 ulp of libm here) so that lane
 * loops vectorise: libm's expf is a call the compiler cannot widen, and a select on a float
 * (x < c ? ...) stops gcc's vectoriser too, so the edge cases go through the bits.
 * exp_nonpositive takes x <= 0 (a value minus its line's maximum, a log-probability, -|z|) and
 * gives 0 below the float range and for -inf; a NaN stays NaN. */
static inline float with_nan_of(float x, float value) {
    int32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits |= -(int32_t)(x != x) & 0x7fc00000; /* all ones where x is NaN: a quiet NaN */
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline float exp_nonpositive(float x) {
    const float keep = (float)(x >= -87.3f); /* 0 below the float range, -inf and NaN */
    /* x clamped at -87.3 through its bits: for x <= 0 a larger magnitude is a larger unsigned
     * pattern, -inf (0xff800000) the largest; an unsigned min vectorises */
    uint32_t pattern;
    memcpy(&pattern, &x, sizeof pattern);
    pattern = pattern < 0xc2ae999aU ? pattern : 0xc2ae999aU; /* -87.3f */
    float clamped;
    memcpy(&clamped, &pattern, sizeof clamped);
    const float k = (float)(int32_t)(clamped * 1.44269504088896341f - 0.5f); /* rounded */
    const float r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return with_nan_of(x, keep * (p * scale));
}

/* sigmoid(z) for lane loops: e = exp(-|z|), then 1 / (1 + e) for z >= 0 and e / (1 + e) below,
 * chosen by arithmetic (no select) */
static inline float sigmoid_lane(float z) {
    const float e = exp_nonpositive(-fabsf(z)), positive = (float)(z >= 0.0f);
    return (positive + (1.0f - positive) * e) / (1.0f + e);
}

/* out[e] = the threads' double sums partials[i][offset + e], added in thread order (a thread
 * that did not run has none): the same float for the same thread count */
static inline void add_thread_sums(double *const *partials, int threads, int64_t offset,
                                   int64_t count, float *out) {
    for (int64_t e = 0; e < count; e++) {
        double total = 0.0;
        for (int i = 0; i < threads; i++) total += partials[i] ? partials[i][offset + e] : 0.0;
        out[e] = (float)total;
    }
}

/* LANES floats as one GCC vector, split into the target's registers (one with AVX-512, two with
 * AVX2). The Sinkhorn blocks are written on these rather than as loops over the lanes: gcc 12
 * with -march=native on an Emerald Rapids Xeon interchanged those loops and ran their exp and
 * log one float at a time (the log-space iterations 3x slower than vectorised). Comparisons
 * give lanes_int masks of all ones or zeros. */
typedef float lanes __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t lanes_int __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint32_t lanes_uint __attribute__((vector_size(LANES * sizeof(uint32_t))));
static inline lanes lanes_load(const float *p) {
    lanes v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void lanes_store(float *p, lanes v) { memcpy(p, &v, sizeof v); }
/* a where the mask is set, else b */
static inline lanes lanes_select(lanes_int mask, lanes a, lanes b) {
    return (lanes)(((lanes_int)a & mask) | ((lanes_int)b & ~mask));
}
/* a > b ? a : b per lane (a NaN on either side gives b) */
static inline lanes lanes_max(lanes a, lanes b) { return lanes_select(a > b, a, b); }
/* 1.0 where the mask is set, else 0.0 */
static inline lanes lanes_ones(lanes_int mask) { return __builtin_convertvector(-mask, lanes); }
static inline lanes lanes_with_nan_of(lanes x, lanes value) {
    return (lanes)((lanes_int)value | ((x != x) & 0x7fc00000));
}

/* exp_nonpositive on every lane, step for step */
static inline lanes lanes_exp_nonpositive(lanes x) {
    const lanes keep = lanes_ones(x >= -87.3f);
    const lanes_uint pattern = (lanes_uint)x, low = pattern < 0xc2ae999aU;
    const lanes clamped = (lanes)((pattern & low) | (0xc2ae999aU & ~low));
    const lanes k = __builtin_convertvector(
        __builtin_convertvector(clamped * 1.44269504088896341f - 0.5f, lanes_int), lanes);
    const lanes r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
    lanes p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const lanes scale = (lanes)((__builtin_convertvector(k, lanes_int) + 127) << 23);
    return lanes_with_nan_of(x, keep * (p * scale));
}

static inline float sigmoidf(float z) { return 1.0f / (1.0f + expf(-z)); }

/* sigmoid(z) of token t's H_pre (i < n) or H_post (n <= i < 2n) value */
static inline float gate(const BlockArgs *x, int64_t t, int64_t i) {
    const int64_t k = 2 * x->n + x->n * x->n;
    return sigmoidf(x->a[i] * x->q[t * k + i] + x->b[i]);
}

#endif
