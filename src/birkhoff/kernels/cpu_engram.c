/* Engram's gate and merge after the projections (op engram_merge; semantics: the reference's
 * composition in kernels/reference.py), forward and backward. Per token t and stream m, with
 * h = x[t, m], k = keys[t, m], v = value[t], C = width:
 *   alpha = sigmoid(signed_sqrt(<h', k'> / sqrt(C))),  h' = h r_h, k' = k r_k (r = 1/rms),
 *   g = alpha v,  n = g r_g gamma (RMSNorm),  z_t = sum_i w_i n_{t - i d} (causal, lag i),
 *   out = x + g + silu(z).
 * g and n are a scalar times v per token and stream (n = beta gamma v, beta = alpha r_g), so
 * neither is ever formed: the forward reads x and the keys once for the gate's sums, x again
 * to write out; the backward writes dz = dout silu'(z), then reads it at the later tokens the
 * convolution fed and writes dx, dkeys and dvalue in one more pass. `stats` keeps five floats
 * per token and stream (alpha, r_g, r_h, r_k, <h', k'>) for the backward.
 * float32, contiguous; x, keys, out (seqs, len, n, width); value (seqs, len, width); gamma
 * (width); w (lags, width). Built by kernels/cpu_build.py, bound by kernels/cpu_engram.py.
 */
#include <omp.h>
#include <stdlib.h>

#include "cpu_blocks.h"

#define STATS 5
#define CHUNK 64       /* channels of a token's convolution held in registers at a time */
#define SQRT_FLOOR 1e-6f /* the reference's signed sqrt clamps |s| here (clamp_min: its
                          * gradient passes at the floor itself) */

typedef struct {
    int64_t seqs, len, n, width, lags, dilation;
} Shape;

/* Lags feeding position p (i < lags, p - i d >= 0) and fed by it (p + i d < len). */
static int64_t lags_before(const Shape *s, int64_t p) {
    const int64_t reach = p / s->dilation + 1;
    return reach < s->lags ? reach : s->lags;
}

static int64_t lags_after(const Shape *s, int64_t p) {
    const int64_t reach = (s->len - 1 - p) / s->dilation + 1;
    return reach < s->lags ? reach : s->lags;
}

/* channels c0 .. c0 + chunk_width of a row of `width` */
static int64_t chunk_width(int64_t width, int64_t c0) {
    return width - c0 < CHUNK ? width - c0 : CHUNK;
}

/* The gate's statistics of token t (forward pass A). */
static void gate_stats(const float *x, const float *k, const float *v, float *stats, int64_t t,
                       const Shape *s, float eps) {
    const int64_t n = s->n, width = s->width;
    const float *vt = v + t * width;
    float vv = 0.0f;
#pragma omp simd reduction(+ : vv)
    for (int64_t c = 0; c < width; c++) vv += vt[c] * vt[c];
    for (int64_t m = 0; m < n; m++) {
        const float *h = x + (t * n + m) * width, *kk = k + (t * n + m) * width;
        float hh = 0.0f, kq = 0.0f, hk = 0.0f;
#pragma omp simd reduction(+ : hh, kq, hk)
        for (int64_t c = 0; c < width; c++) {
            hh += h[c] * h[c];
            kq += kk[c] * kk[c];
            hk += h[c] * kk[c];
        }
        const float r_h = 1.0f / sqrtf(hh / width + eps), r_k = 1.0f / sqrtf(kq / width + eps);
        const float dot = hk * r_h * r_k, sim = dot / sqrtf((float)width);
        const float root = sqrtf(fmaxf(fabsf(sim), SQRT_FLOOR));
        const float alpha = sigmoidf(sim > 0.0f ? root : (sim < 0.0f ? -root : 0.0f));
        float *st = stats + (t * n + m) * STATS;
        st[0] = alpha;
        st[1] = 1.0f / sqrtf(alpha * alpha * vv / width + eps);
        st[2] = r_h;
        st[3] = r_k;
        st[4] = dot;
    }
}

/* z[c] / gamma[c0 + c] for channels c0 .. c0 + cw of token t, stream m (p: t's position) */
static void conv_chunk(const float *v, const float *w, const float *stats, int64_t t,
                       int64_t p, int64_t m, int64_t c0, int64_t cw, const Shape *s, float *z) {
    const int64_t width = s->width, reach = lags_before(s, p);
#pragma omp simd
    for (int64_t c = 0; c < cw; c++) z[c] = 0.0f;
    for (int64_t i = 0; i < reach; i++) {
        const int64_t u = t - i * s->dilation;
        const float *st = stats + (u * s->n + m) * STATS, beta = st[0] * st[1];
        const float *vu = v + u * width + c0, *wi = w + i * width + c0;
#pragma omp simd
        for (int64_t c = 0; c < cw; c++) z[c] += wi[c] * beta * vu[c];
    }
}

void engram_merge_forward(const float *x, const float *k, const float *v, const float *gamma,
                          const float *w, float *out, float *stats, int64_t seqs, int64_t len,
                          int64_t n, int64_t width, int64_t lags, int64_t dilation, float eps,
                          int threads) {
    const Shape s = {seqs, len, n, width, lags, dilation};
    const int64_t tokens = seqs * len;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; t++) gate_stats(x, k, v, stats, t, &s, eps);
        /* implicit barrier: the convolution reads the statistics of earlier tokens */
        float z[CHUNK];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; t++) {
            const float *vt = v + t * width;
            for (int64_t m = 0; m < n; m++) {
                const float alpha = stats[(t * n + m) * STATS];
                const float *xr = x + (t * n + m) * width;
                float *o = out + (t * n + m) * width;
                for (int64_t c0 = 0; c0 < width; c0 += CHUNK) {
                    const int64_t cw = chunk_width(width, c0);
                    conv_chunk(v, w, stats, t, t % len, m, c0, cw, &s, z);
#pragma omp simd
                    for (int64_t c = 0; c < cw; c++) {
                        const float zc = z[c] * gamma[c0 + c];
                        o[c0 + c] = xr[c0 + c] + alpha * vt[c0 + c] + zc * sigmoid_lane(zc);
                    }
                }
            }
        }
    }
}

/* dz = dout silu'(z) of token t, and its products with the normalised values each lag read
 * added to the weight's gradient (sum_w: lags x width, this thread's) */
static void conv_backward(const float *g, const float *v, const float *gamma, const float *w,
                          const float *stats, float *dz, double *sum_w, int64_t t,
                          const Shape *s) {
    const int64_t n = s->n, width = s->width, p = t % s->len, reach = lags_before(s, p);
    float z[CHUNK];
    for (int64_t m = 0; m < n; m++) {
        const float *gr = g + (t * n + m) * width;
        float *d = dz + (t * n + m) * width;
        for (int64_t c0 = 0; c0 < width; c0 += CHUNK) {
            const int64_t cw = chunk_width(width, c0);
            conv_chunk(v, w, stats, t, p, m, c0, cw, s, z);
#pragma omp simd
            for (int64_t c = 0; c < cw; c++) {
                const float zc = z[c] * gamma[c0 + c], sig = sigmoid_lane(zc);
                d[c0 + c] = gr[c0 + c] * sig * (1.0f + zc * (1.0f - sig));
            }
            for (int64_t i = 0; i < reach; i++) {
                const int64_t u = t - i * s->dilation;
                const float *st = stats + (u * n + m) * STATS, beta = st[0] * st[1];
                const float *vu = v + u * width + c0;
                double *sw = sum_w + i * width + c0;
#pragma omp simd
                for (int64_t c = 0; c < cw; c++)
                    sw[c] += (double)(d[c0 + c] * beta * gamma[c0 + c] * vu[c]);
            }
        }
    }
}

/* Token t's gradients of x, the keys and the value from dz at the tokens its normalised value
 * fed (dn: this thread's row of width floats; sum_gamma: its gamma gradient). */
static void token_backward(const float *g, const float *x, const float *k, const float *v,
                           const float *gamma, const float *w, const float *stats,
                           const float *dz, float *dx, float *dk, float *dv, float *dn,
                           double *sum_gamma, int64_t t, const Shape *s) {
    const int64_t n = s->n, width = s->width, reach = lags_after(s, t % s->len);
    const float *vt = v + t * width, root_c = sqrtf((float)width);
    float *dvt = dv + t * width;
#pragma omp simd
    for (int64_t c = 0; c < width; c++) dvt[c] = 0.0f;
    for (int64_t m = 0; m < n; m++) {
        const int64_t row = (t * n + m) * width;
        const float *st = stats + (t * n + m) * STATS;
        const float alpha = st[0], r = st[1], r_h = st[2], r_k = st[3], dot = st[4];
        const float beta = alpha * r;
        /* dn: the normalised value's gradient, sum over the lags of w_i dz_{t + i d} */
        for (int64_t i = 0; i < reach; i++) {
            const float *di = dz + row + i * s->dilation * n * width, *wi = w + i * width;
            if (i == 0) {
#pragma omp simd
                for (int64_t c = 0; c < width; c++) dn[c] = wi[c] * di[c];
            } else {
#pragma omp simd
                for (int64_t c = 0; c < width; c++) dn[c] += wi[c] * di[c];
            }
        }
        float uv = 0.0f; /* <dn gamma, v> */
#pragma omp simd reduction(+ : uv)
        for (int64_t c = 0; c < width; c++) {
            uv += dn[c] * gamma[c] * vt[c];
            sum_gamma[c] += (double)(dn[c] * beta * vt[c]);
        }
        /* the gated value's gradient: dout + RMSNorm's backward (g = alpha v), then alpha's
         * and the value's */
        const float coef = alpha * alpha * r * r * r * uv / width;
        const float *gr = g + row;
        float d_alpha = 0.0f;
#pragma omp simd reduction(+ : d_alpha)
        for (int64_t c = 0; c < width; c++) {
            const float d_gated = gr[c] + r * dn[c] * gamma[c] - vt[c] * coef;
            d_alpha += d_gated * vt[c];
            dvt[c] += alpha * d_gated;
        }
        /* the gate: through the sigmoid, the signed sqrt (0 where clamped) and <h', k'> */
        const float sim = dot / root_c, mag = fabsf(sim);
        const float d_sim = d_alpha * alpha * (1.0f - alpha) *
                            (mag >= SQRT_FLOOR ? 0.5f / sqrtf(mag) : 0.0f);
        const float d_dot = d_sim / root_c, share = dot / width;
        const float a_h = d_dot * r_h, a_k = d_dot * r_k;
        const float *h = x + row, *kr = k + row;
        float *dxr = dx + row, *dkr = dk + row;
#pragma omp simd
        for (int64_t c = 0; c < width; c++) {
            const float hn = h[c] * r_h, kn = kr[c] * r_k;
            dxr[c] = gr[c] + a_h * (kn - hn * share);
            dkr[c] = a_k * (hn - kn * share);
        }
    }
}

/* The gradients of x, the keys, the value, gamma and w from dout (g). dz: scratch of x's
 * size. The two weights' gradients are summed per thread in double, then over the threads in
 * order (deterministic for a thread count). Returns 0, or -1 where a thread's sums could not
 * be allocated. */
int engram_merge_backward(const float *g, const float *x, const float *k, const float *v,
                          const float *gamma, const float *w, const float *stats, float *dz,
                          float *dx, float *dk, float *dv, float *d_gamma, float *d_w,
                          int64_t seqs, int64_t len, int64_t n, int64_t width, int64_t lags,
                          int64_t dilation, int threads) {
    const Shape s = {seqs, len, n, width, lags, dilation};
    const int64_t tokens = seqs * len, row_sums = (lags + 1) * width;
    double **partials = calloc((size_t)threads, sizeof(double *));
    if (!partials) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* this thread's sums: w's gradient (lags x width), then gamma's (width); dn */
        double *sums = calloc((size_t)row_sums, sizeof(double));
        float *dn = malloc((size_t)width * sizeof(float));
        partials[omp_get_thread_num()] = sums;
        if (!sums || !dn) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tokens; t++)
                conv_backward(g, v, gamma, w, stats, dz, sums, t, &s);
            /* implicit barrier: each token reads dz of later ones */
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tokens; t++)
                token_backward(g, x, k, v, gamma, w, stats, dz, dx, dk, dv, dn,
                               sums + lags * width, t, &s);
        }
        free(dn);
    }
    if (!failed) {
        add_thread_sums(partials, threads, 0, lags * width, d_w);
        add_thread_sums(partials, threads, lags * width, width, d_gamma);
    }
    for (int i = 0; i < threads; i++) free(partials[i]);
    free(partials);
    return failed ? -1 : 0;
}
