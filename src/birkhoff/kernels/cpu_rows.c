/* RMSNorm (op rms_norm) forward and backward, one pass over each row each way: the reference's
 * autograd Function (kernels/row_functions.py: _RMSNorm) still makes a pass over the rows for
 * the norm, the scaling, the weight, and about five more backward. V4's clamped SwiGLU (op
 * swiglu), one pass each way. V4's interleaved RoPE on the trailing channels (op rope_trailing),
 * one pass (its gradient is the same pass turning back). float32, contiguous.
 * Built by kernels/cpu_build.py, bound by kernels/cpu_rows.py.
 */
#include <omp.h>
#include <stdlib.h>

#include "cpu_blocks.h"

/* out[r] = x[r] inv[r] w with inv[r] = (mean(x[r]^2) + eps)^(-1/2), for rows of `width` */
void rms_norm_forward(const float *x, const float *w, float *out, float *inv, int64_t rows,
                      int64_t width, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width, s = inverse_rms(xr, width, eps);
        inv[r] = s;
        float *o = out + r * width;
#pragma omp simd
        for (int64_t c = 0; c < width; c++) o[c] = xr[c] * s * w[c];
    }
}

/* With u = g w: dx[r] = inv u - x inv^3 <u, x> / width;  dw = sum over rows of g x inv (each
 * thread's rows summed apart in double, a float32 running sum over thousands of rows drifting
 * 50x further from the exact one than the reference's blocked sum; then the threads in order:
 * deterministic for a thread count). dx or dw may be NULL. Returns 0, or -1 where a thread's
 * sum could not be allocated. */
int rms_norm_backward(const float *g, const float *x, const float *w, const float *inv,
                      float *dx, float *dw, int64_t rows, int64_t width, int threads) {
    double **partials = calloc((size_t)threads, sizeof(double *));
    if (!partials) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        double *sum = dw ? calloc((size_t)width, sizeof(double)) : NULL;
        partials[omp_get_thread_num()] = sum;
        if (dw && !sum) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *gr = g + r * width, *xr = x + r * width, s = inv[r];
            if (dx) {
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t c = 0; c < width; c++) dot += gr[c] * w[c] * xr[c];
                const float k = dot * s * s * s / (float)width;
                float *d = dx + r * width;
#pragma omp simd
                for (int64_t c = 0; c < width; c++) d[c] = s * gr[c] * w[c] - k * xr[c];
            }
            if (sum) {
#pragma omp simd
                for (int64_t c = 0; c < width; c++) sum[c] += (double)(gr[c] * xr[c] * s);
            }
        }
    }
    if (dw) {
        add_thread_sums(partials, threads, 0, width, dw);
        for (int i = 0; i < threads; i++) free(partials[i]);
    }
    free(partials);
    return failed ? -1 : 0;
}

/* V4's clamped SwiGLU (op swiglu), elementwise over n values: with limit L (clamped != 0),
 * out = silu(min(g, L)) clamp(u, -L, L); the reference clamps, then silu, then multiplies,
 * and its backward passes over the values once per product, mask and sum. The masks follow
 * torch's clamp: the gradient passes where g <= L and -L <= u <= L (NaN: not). */
void swiglu_forward(const float *g, const float *u, float *out, int64_t n, float limit,
                    int clamped, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float gc = clamped ? (g[i] > limit ? limit : g[i]) : g[i];
        const float uc = clamped ? (u[i] < -limit ? -limit : (u[i] > limit ? limit : u[i])) : u[i];
        out[i] = gc * sigmoid_lane(gc) * uc;
    }
}

void swiglu_backward(const float *grad, const float *g, const float *u, float *dg, float *du,
                     int64_t n, float limit, int clamped, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float gc = clamped ? (g[i] > limit ? limit : g[i]) : g[i];
        const float uc = clamped ? (u[i] < -limit ? -limit : (u[i] > limit ? limit : u[i])) : u[i];
        const float s = sigmoid_lane(gc), silu = gc * s;
        const int pass_g = !clamped || g[i] <= limit;
        const int pass_u = !clamped || (u[i] >= -limit && u[i] <= limit);
        dg[i] = pass_g ? grad[i] * uc * s * (1.0f + gc * (1.0f - s)) : 0.0f;
        du[i] = pass_u ? grad[i] * silu : 0.0f;
    }
}

/* V4's interleaved RoPE (op rope_trailing): in each row of `width` channels, the last 2 pairs
 * are turned pair by pair, (x_2i, x_2i+1) by the angle whose cosine and sine are cos[i] and
 * sin[i] (-sin[i] where `inverse`: the turn undone, which is also the gradient); the leading
 * channels are copied. Each of the `rows` rows of the tables serves `groups` consecutive rows
 * of x (the heads of a token). One pass where the reference's complex product, its copies and
 * the clone of x made four. */
void rope_trailing(const float *x, const float *cos, const float *sin, float *out, int64_t rows,
                   int64_t groups, int64_t width, int64_t pairs, int inverse, int threads) {
    const int64_t lead = width - 2 * pairs;
    const float sign = inverse ? -1.0f : 1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * pairs, *s = sin + r * pairs;
        for (int64_t g = 0; g < groups; g++) {
            const float *xr = x + (r * groups + g) * width;
            float *o = out + (r * groups + g) * width;
#pragma omp simd
            for (int64_t e = 0; e < lead; e++) o[e] = xr[e];
            const float *pair = xr + lead;
            float *turned = o + lead;
#pragma omp simd
            for (int64_t i = 0; i < pairs; i++) {
                const float even = pair[2 * i], odd = pair[2 * i + 1], si = sign * s[i];
                turned[2 * i] = even * c[i] - odd * si;
                turned[2 * i + 1] = even * si + odd * c[i];
            }
        }
    }
}

/* One row's pairs turned (sign -1: back) into out, scaled by `scale` on the way. */
static inline void turn_row(const float *xr, const float *c, const float *s, float *o,
                            int64_t width, int64_t pairs, float sign, float scale) {
    const int64_t lead = width - 2 * pairs;
#pragma omp simd
    for (int64_t e = 0; e < lead; e++) o[e] = xr[e] * scale;
    const float *pair = xr + lead;
    float *turned = o + lead;
#pragma omp simd
    for (int64_t i = 0; i < pairs; i++) {
        const float even = pair[2 * i] * scale, odd = pair[2 * i + 1] * scale,
                    si = sign * s[i];
        turned[2 * i] = even * c[i] - odd * si;
        turned[2 * i + 1] = even * si + odd * c[i];
    }
}

/* rope_trailing of each row normalised first (V4's per-head query norm, no weight): out[r] =
 * turn(x[r] inv[r]) with inv[r] = (mean(x[r]^2) + eps)^(-1/2), kept for the backward. A turn
 * keeps a row's length, so one pass reads x for its sum and a second (in cache) writes out,
 * where the norm and the turn each passed over the rows forward and the norm's backward
 * about five times. */
void rope_trailing_normed_forward(const float *x, const float *cos, const float *sin,
                                  float *out, float *inv, int64_t rows, int64_t groups,
                                  int64_t width, int64_t pairs, int inverse, float eps,
                                  int threads) {
    const float sign = inverse ? -1.0f : 1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * pairs, *s = sin + r * pairs;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t row = r * groups + g;
            const float *xr = x + row * width, scale = inverse_rms(xr, width, eps);
            inv[row] = scale;
            turn_row(xr, c, s, out + row * width, width, pairs, sign, scale);
        }
    }
}

/* Its backward from out's gradient g: u = g turned back, then the norm's dx = inv u -
 * x inv^3 <u, x> / width (as rms_norm_backward with w = 1). */
void rope_trailing_normed_backward(const float *g, const float *x, const float *cos,
                                   const float *sin, const float *inv, float *dx, int64_t rows,
                                   int64_t groups, int64_t width, int64_t pairs, int inverse,
                                   int threads) {
    const float sign = inverse ? 1.0f : -1.0f; /* the turn undone */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * pairs, *s = sin + r * pairs;
        for (int64_t gr = 0; gr < groups; gr++) {
            const int64_t row = r * groups + gr;
            const float *xr = x + row * width, scale = inv[row];
            float *d = dx + row * width, dot = 0.0f;
            turn_row(g + row * width, c, s, d, width, pairs, sign, 1.0f);
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < width; e++) dot += d[e] * xr[e];
            const float k = scale * scale * scale * dot / (float)width;
#pragma omp simd
            for (int64_t e = 0; e < width; e++) d[e] = scale * d[e] - xr[e] * k;
        }
    }
}
