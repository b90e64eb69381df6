/* The mappings and the stream read of one hyper-connection in one op (mhc_read): from the
 * streams x (tokens, n, C) and the projection P = vec(x) W^T (tokens, K = 2n + n^2, a GEMM the
 * caller runs), the sublayer's input y = sum_i H_pre[i] x_i with H_post and H_res. Per block of
 * LANES tokens, while the block's streams are in cache: 1/rms of vec(x), q = P / rms, the tail
 * (cpu_sinkhorn.c) and the read. The backward likewise, around the caller's GEMMs
 * d_x = g W and d_W = g^T vec(x): the reference passes over the streams once for the norm, once
 * for the read and once for each of their gradients, and sums the three.
 * float32, contiguous. Semantics: kernels/mhc_reference.py (mhc_mapping, then mhc_pre).
 * Built by kernels/cpu_build.py, bound by kernels/cpu_mhc_read.py.
 */
#include "cpu_blocks.h"

/* The read's own arguments (BlockArgs.extra); the tail's are in BlockArgs. */
typedef struct {
    const float *x, *dy, *rinv;
    float *rinv_out, *y, *d_pre, *g, *c; /* rinv_out: the forward's 1/rms */
    int64_t width;
    float norm_eps;
} ReadArgs;

static void read_forward_block(Scratch *s, const BlockArgs *a, int64_t t0, int64_t count) {
    const ReadArgs *r = a->extra;
    const int64_t n = a->n, k = 2 * n + n * n, width = r->width, d = n * width;
    for (int64_t t = t0; t < t0 + count; t++) {
        const float rinv = inverse_rms(r->x + t * d, d, r->norm_eps);
        r->rinv_out[t] = rinv;
        for (int64_t j = 0; j < k; j++) a->out[t * k + j] *= rinv; /* P becomes q (a->q) */
    }
    tail_forward_block(s, a, t0, count);
    for (int64_t t = t0; t < t0 + count; t++)
        read_streams(r->x + t * d, a->h_pre + t * n, r->y + t * width, n, width);
}

/* y, H_post, H_res and (for the backward) q and 1/rms; `projection` holds P on entry and q on
 * return, h_pre is the caller's scratch (tokens, n). Returns 0, or -1 (no scratch). */
int mhc_read_forward(const float *x, float *projection, const float *a, const float *b,
                     float *rinv, float *y, float *h_pre, float *h_post, float *h_res,
                     int64_t tokens, int64_t n, int64_t width, float norm_eps, int iters,
                     float pre_eps, float form_eps, int threads) {
    const ReadArgs read = {.x = x, .rinv_out = rinv, .y = y, .width = width, .norm_eps = norm_eps};
    const BlockArgs args = {.q = projection, .out = projection, .a = a, .b = b, .h_pre = h_pre,
                            .h_post = h_post, .h_res = h_res, .n = n, .iters = iters,
                            .pre_eps = pre_eps, .form_eps = form_eps, .extra = &read};
    return for_each_block(tokens, &args, threads, read_forward_block);
}

/* Per token: d_pre = (dy . x_i) over i and H_pre; the tail's dz; with dq = a dz, the
 * projection's gradient g = dq / rms and the norm's coefficient c = -(dq . q) / (rms^2 n C),
 * since d(1/rms)/dx = -x / (rms^3 n C). */
static void read_backward_block(Scratch *s, const BlockArgs *a, int64_t t0, int64_t count) {
    const ReadArgs *r = a->extra;
    const int64_t n = a->n, k = 2 * n + n * n, width = r->width, d = n * width;
    for (int64_t t = t0; t < t0 + count; t++) {
        const float *xt = r->x + t * d, *dyt = r->dy + t * width;
        for (int64_t i = 0; i < n; i++) {
            const float *xi = xt + i * width;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < width; c++) dot += dyt[c] * xi[c];
            r->d_pre[t * n + i] = dot; /* a->d_pre: the tail reads it */
            a->h_pre[t * n + i] = gate(a, t, i) + a->pre_eps;
        }
    }
    tail_backward_block(s, a, t0, count);
    for (int64_t t = t0; t < t0 + count; t++) {
        const float rinv = r->rinv[t];
        float dot = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const float dq = a->a[j] * a->dz[t * k + j];
            r->g[t * k + j] = dq * rinv;
            dot += dq * a->q[t * k + j];
        }
        r->c[t] = -dot * rinv * rinv / (float)d;
    }
}

/* The first half of the backward: dz (tokens, K; the caller reduces it to a's and b's
 * gradients), g (tokens, K) for the GEMMs, c (tokens) and h_pre (tokens, n) for
 * mhc_read_backward_streams; d_pre is scratch (tokens, n). d_post and d_res may be NULL. */
int mhc_read_backward(const float *x, const float *q, const float *rinv, const float *a,
                      const float *b, const float *dy, const float *d_post, const float *d_res,
                      float *d_pre, float *dz, float *g, float *c, float *h_pre, int64_t tokens,
                      int64_t n, int64_t width, int iters, float pre_eps, float form_eps,
                      int threads) {
    const ReadArgs read = {.x = x, .dy = dy, .rinv = rinv, .d_pre = d_pre, .g = g,
                           .c = c, .width = width};
    const BlockArgs args = {.q = q, .a = a, .b = b, .d_pre = d_pre, .d_post = d_post,
                            .d_res = d_res, .dz = dz, .h_pre = h_pre, .n = n, .iters = iters,
                            .pre_eps = pre_eps, .form_eps = form_eps, .extra = &read};
    return for_each_block(tokens, &args, threads, read_backward_block);
}

/* The second half: dx (tokens, n, C), holding g W on entry, += c x + h_pre (x) dy. */
void mhc_read_backward_streams(const float *x, const float *c, const float *h_pre,
                               const float *dy, float *dx, int64_t tokens, int64_t n,
                               int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float ct = c[t], *dyt = dy + t * width;
        for (int64_t i = 0; i < n; i++) {
            const float hi = h_pre[t * n + i], *xi = x + (t * n + i) * width;
            float *di = dx + (t * n + i) * width;
#pragma omp simd
            for (int64_t q = 0; q < width; q++) di[q] += ct * xi[q] + hi * dyt[q];
        }
    }
}
