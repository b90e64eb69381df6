/* mHC's stream read (op mhc_pre) and residual merge (mhc_post), forward and backward, fused:
 * one OpenMP loop over tokens each, a token's n x C streams read once into cache and every
 * product over them taken there, where the reference's batched products and broadcasts each
 * pass over all tokens' streams again. The merge holds a vector of columns of every stream in
 * registers at once (up to NMAX streams). float32, contiguous. Semantics:
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

/* The merge of one token over N <= NMAX streams, N a constant where it is inlined: each vector
 * of columns of the N streams (and of y) is loaded once into registers and every product over
 * it taken there (the loops over the streams unrolled), where a loop per pair of streams would
 * load and store the output row again for each. */
#define NMAX 4

static inline __attribute__((always_inline)) void merge_token(const float *x, const float *y,
                                                              const float *r, const float *p,
                                                              float *out, int64_t width,
                                                              const int N) {
    const int64_t whole = width - width % VW;
    for (int64_t c = 0; c < whole; c += VW) {
        vfloat xv[NMAX];
        const vfloat yv = vload(y + c);
        for (int j = 0; j < N; j++) xv[j] = vload(x + j * width + c);
        for (int i = 0; i < N; i++) {
            vfloat o = p[i] * yv;
            for (int j = 0; j < N; j++) o += r[i * N + j] * xv[j];
            vstore(out + i * width + c, o);
        }
    }
    for (int i = 0; i < N; i++)
        for (int64_t c = whole; c < width; c++) {
            float o = p[i] * y[c];
            for (int j = 0; j < N; j++) o += r[i * N + j] * x[j * width + c];
            out[i * width + c] = o;
        }
}

/* out[t, i, c] = sum_j r[t, i, j] x[t, j, c] + p[t, i] y[t, c]  (r: H_res, p: H_post);
 * more than NMAX streams: a loop per pair */
static void merge_token_any(const float *x, const float *y, const float *r, const float *p,
                            float *out, int64_t n, int64_t width) {
    for (int64_t i = 0; i < n; i++) {
        float *oi = out + i * width;
        const float pi = p[i];
#pragma omp simd
        for (int64_t c = 0; c < width; c++) oi[c] = pi * y[c];
        for (int64_t j = 0; j < n; j++) {
            const float rij = r[i * n + j], *xj = x + j * width;
#pragma omp simd
            for (int64_t c = 0; c < width; c++) oi[c] += rij * xj[c];
        }
    }
}

/* One token's merge, N a constant for up to NMAX streams (the loops over streams unroll) */
void merge_one(const float *x, const float *y, const float *r, const float *p, float *out,
               int64_t n, int64_t width) {
    switch (n) {
    case 1: merge_token(x, y, r, p, out, width, 1); break;
    case 2: merge_token(x, y, r, p, out, width, 2); break;
    case 3: merge_token(x, y, r, p, out, width, 3); break;
    case 4: merge_token(x, y, r, p, out, width, 4); break;
    default: merge_token_any(x, y, r, p, out, n, width);
    }
}

void stream_merge_forward(const float *x, const float *y, const float *r, const float *p,
                          float *out, int64_t tokens, int64_t n, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        merge_one(x + t * n * width, y + t * width, r + t * n * n, p + t * n,
                  out + t * n * width, n, width);
}

/* The merge's gradients of one token over N <= NMAX streams (N a constant where inlined): per
 * vector of columns, g's and x's N vectors and y's loaded once; dx and dy stored, the dot
 * products dr and dp summed lane-wise in registers and across the lanes at the end. */
static inline __attribute__((always_inline)) void merge_backward_token(
    const float *g, const float *x, const float *y, const float *r, const float *p, float *dx,
    float *dy, float *dr, float *dp, int64_t width, const int N) {
    const int64_t whole = width - width % VW;
    vfloat acc_r[NMAX][NMAX], acc_p[NMAX];
    for (int i = 0; i < N; i++) {
        acc_p[i] = (vfloat){0};
        for (int j = 0; j < N; j++) acc_r[i][j] = (vfloat){0};
    }
    for (int64_t c = 0; c < whole; c += VW) {
        vfloat gv[NMAX], xv[NMAX];
        const vfloat yv = vload(y + c);
        for (int i = 0; i < N; i++) gv[i] = vload(g + i * width + c);
        for (int j = 0; j < N; j++) xv[j] = vload(x + j * width + c);
        for (int j = 0; j < N; j++) {
            vfloat d = r[j] * gv[0];
            for (int i = 1; i < N; i++) d += r[i * N + j] * gv[i];
            vstore(dx + j * width + c, d);
        }
        vfloat d = p[0] * gv[0];
        for (int i = 1; i < N; i++) d += p[i] * gv[i];
        vstore(dy + c, d);
        for (int i = 0; i < N; i++) {
            acc_p[i] += gv[i] * yv;
            for (int j = 0; j < N; j++) acc_r[i][j] += gv[i] * xv[j];
        }
    }
    for (int i = 0; i < N; i++) {
        float sum_p = lane_sum(acc_p[i]), sum_r[NMAX];
        for (int j = 0; j < N; j++) sum_r[j] = lane_sum(acc_r[i][j]);
        for (int64_t c = whole; c < width; c++) {
            sum_p += g[i * width + c] * y[c];
            for (int j = 0; j < N; j++) sum_r[j] += g[i * width + c] * x[j * width + c];
        }
        dp[i] = sum_p;
        for (int j = 0; j < N; j++) dr[i * N + j] = sum_r[j];
    }
    for (int64_t c = whole; c < width; c++) {
        float d = 0.0f;
        for (int i = 0; i < N; i++) d += p[i] * g[i * width + c];
        dy[c] = d;
        for (int j = 0; j < N; j++) {
            float e = 0.0f;
            for (int i = 0; i < N; i++) e += r[i * N + j] * g[i * width + c];
            dx[j * width + c] = e;
        }
    }
}

/* The same over more than NMAX streams: a loop per pair */
static void merge_backward_token_any(const float *g, const float *x, const float *y,
                                     const float *r, const float *p, float *dx, float *dy,
                                     float *dr, float *dp, int64_t n, int64_t width) {
    for (int64_t j = 0; j < n; j++) {
        float *dj = dx + j * width;
        for (int64_t c = 0; c < width; c++) dj[c] = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float rij = r[i * n + j], *gi = g + i * width;
#pragma omp simd
            for (int64_t c = 0; c < width; c++) dj[c] += rij * gi[c];
        }
    }
    read_streams(g, p, dy, n, width); /* dy = sum_i p_i g_i */
    for (int64_t i = 0; i < n; i++) {
        const float *gi = g + i * width;
        for (int64_t j = 0; j < n; j++) {
            const float *xj = x + j * width;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < width; c++) acc += gi[c] * xj[c];
            dr[i * n + j] = acc;
        }
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < width; c++) acc += gi[c] * y[c];
        dp[i] = acc;
    }
}

/* One token's merge gradients, N a constant for up to NMAX streams */
void merge_backward_one(const float *g, const float *x, const float *y, const float *r,
                        const float *p, float *dx, float *dy, float *dr, float *dp, int64_t n,
                        int64_t width) {
    switch (n) {
    case 1: merge_backward_token(g, x, y, r, p, dx, dy, dr, dp, width, 1); break;
    case 2: merge_backward_token(g, x, y, r, p, dx, dy, dr, dp, width, 2); break;
    case 3: merge_backward_token(g, x, y, r, p, dx, dy, dr, dp, width, 3); break;
    case 4: merge_backward_token(g, x, y, r, p, dx, dy, dr, dp, width, 4); break;
    default: merge_backward_token_any(g, x, y, r, p, dx, dy, dr, dp, n, width);
    }
}

/* dx[t, j, c] = sum_i r[t, i, j] g[t, i, c];  dy[t, c] = sum_i p[t, i] g[t, i, c];
 * dr[t, i, j] = sum_c g[t, i, c] x[t, j, c];  dp[t, i] = sum_c g[t, i, c] y[t, c] */
void stream_merge_backward(const float *g, const float *x, const float *y, const float *r,
                           const float *p, float *dx, float *dy, float *dr, float *dp,
                           int64_t tokens, int64_t n, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t s = t * n * width;
        merge_backward_one(g + s, x + s, y + t * width, r + t * n * n, p + t * n, dx + s,
                           dy + t * width, dr + t * n * n, dp + t * n, n, width);
    }
}
