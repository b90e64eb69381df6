/* mHC's stream read (op mhc_pre) and residual merge (mhc_post), forward and backward, fused:
 * one OpenMP loop over tokens each, a token's n x C streams read once into cache and every
 * product over them taken there, where the reference's batched products and broadcasts each
 * pass over all tokens' streams again. float32, contiguous. Semantics:
 * kernels/mhc_reference.py. Built by kernels/cpu_build.py, bound by kernels/cpu_mhc.py.
 */
#include "cpu_blocks.h"

/* out[t, c] = sum_i h[t, i] x[t, i, c] */
void stream_read_forward(const float *x, const float *h, float *out, int64_t tokens, int64_t n,
                     int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        read_streams(x + t * n * width, h + t * n, out + t * width, n, width);
    }
}

/* dx[t, i, c] = h[t, i] g[t, c];  dh[t, i] = sum_c g[t, c] x[t, i, c]  (either may be NULL) */
void stream_read_backward(const float *g, const float *x, const float *h, float *dx, float *dh,
                      int64_t tokens, int64_t n, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *gt = g + t * width, *xt = x + t * n * width, *ht = h + t * n;
        for (int64_t i = 0; i < n; i++) {
            if (dx) {
                const float hi = ht[i];
                float *di = dx + (t * n + i) * width;
#pragma omp simd
                for (int64_t c = 0; c < width; c++) di[c] = hi * gt[c];
            }
            if (dh) {
                const float *xi = xt + i * width;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t c = 0; c < width; c++) acc += gt[c] * xi[c];
                dh[t * n + i] = acc;
            }
        }
    }
}

/* out[t, i, c] = sum_j r[t, i, j] x[t, j, c] + p[t, i] y[t, c]  (r: H_res, p: H_post) */
void stream_merge_forward(const float *x, const float *y, const float *r, const float *p, float *out,
                      int64_t tokens, int64_t n, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *xt = x + t * n * width, *yt = y + t * width, *rt = r + t * n * n;
        for (int64_t i = 0; i < n; i++) {
            float *oi = out + (t * n + i) * width;
            const float pi = p[t * n + i];
#pragma omp simd
            for (int64_t c = 0; c < width; c++) oi[c] = pi * yt[c];
            for (int64_t j = 0; j < n; j++) {
                const float rij = rt[i * n + j], *xj = xt + j * width;
#pragma omp simd
                for (int64_t c = 0; c < width; c++) oi[c] += rij * xj[c];
            }
        }
    }
}

/* dx[t, j, c] = sum_i r[t, i, j] g[t, i, c];  dy[t, c] = sum_i p[t, i] g[t, i, c];
 * dr[t, i, j] = sum_c g[t, i, c] x[t, j, c];  dp[t, i] = sum_c g[t, i, c] y[t, c]
 * (any output may be NULL) */
void stream_merge_backward(const float *g, const float *x, const float *y, const float *r,
                       const float *p, float *dx, float *dy, float *dr, float *dp, int64_t tokens,
                       int64_t n, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *gt = g + t * n * width, *xt = x + t * n * width, *yt = y + t * width;
        const float *rt = r + t * n * n, *pt = p + t * n;
        if (dx) {
            for (int64_t j = 0; j < n; j++) {
                float *dj = dx + (t * n + j) * width;
                for (int64_t c = 0; c < width; c++) dj[c] = 0.0f;
                for (int64_t i = 0; i < n; i++) {
                    const float rij = rt[i * n + j], *gi = gt + i * width;
#pragma omp simd
                    for (int64_t c = 0; c < width; c++) dj[c] += rij * gi[c];
                }
            }
        }
        if (dy) {
            float *dyt = dy + t * width;
            for (int64_t c = 0; c < width; c++) dyt[c] = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                const float pi = pt[i], *gi = gt + i * width;
#pragma omp simd
                for (int64_t c = 0; c < width; c++) dyt[c] += pi * gi[c];
            }
        }
        for (int64_t i = 0; i < n; i++) {
            const float *gi = gt + i * width;
            if (dr) {
                for (int64_t j = 0; j < n; j++) {
                    const float *xj = xt + j * width;
                    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                    for (int64_t c = 0; c < width; c++) acc += gi[c] * xj[c];
                    dr[(t * n + i) * n + j] = acc;
                }
            }
            if (dp) {
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t c = 0; c < width; c++) acc += gi[c] * yt[c];
                dp[t * n + i] = acc;
            }
        }
    }
}
