/* The mappings and the stream read of one hyper-connection in one op (mhc_read): from the
 * streams x (tokens, n, C) and the projection's weight W (K = 2n + n^2, n C), the sublayer's
 * input y = sum_i H_pre[i] x_i with H_post and H_res. Per block of LANES tokens, while the
 * block's streams are in cache: the projection P = vec(x) W^T, 1/rms of vec(x), q = P / rms,
 * the tail (cpu_sinkhorn.c) and the read. The backward likewise: per block the tail's
 * gradient, then the streams' gradient dx = g W + (the norm's, the read's and the merge's
 * terms) and the block's share of d_W = g^T vec(x). The streams are read from memory once
 * each way, where a GEMM of the projection (or of either gradient) would read them again,
 * and the reference passes over them for the norm, the read and each of their gradients.
 * The products run on register tiles (cpu_blocks.h: ROWS x SPAN vectors), so each vector
 * loaded feeds several of them. mhc_merge_read (at the end) puts a merge before the read.
 * float32, contiguous. Semantics: kernels/mhc_reference.py (mhc_mapping, then mhc_pre).
 * Built by kernels/cpu_build.py, bound by kernels/cpu_mhc_read.py and cpu_mhc_merge_read.py.
 */
#include <omp.h>
#include <stdlib.h>

#include "cpu_blocks.h"

/* The merge before a read (mhc_merge_read): its inputs, the streams it writes (the read's x),
 * and backward its gradients and each thread's scratch for a block's dx (allocated by the
 * thread on its first block; the caller frees them). */
typedef struct {
    const float *x, *y, *r, *p;
    float *merged, *dx, *dy, *dr, *dp;
    float **dx_blocks;
} MergeArgs;

/* The read's own arguments (BlockArgs.extra); the tail's are in BlockArgs. */
typedef struct {
    const float *x, *dy, *rinv, *w, *d_merge; /* d_merge: added into dx (may be NULL) */
    float *rinv_out, *y, *d_pre, *g, *c, *dx; /* rinv_out: the forward's 1/rms */
    int64_t dx_first; /* the token of dx's first row: 0, or a block's first (merge scratch) */
    const MergeArgs *merge; /* NULL: the read alone (mhc_read) */
    /* each thread's double sum of d_W (K, n C) over its blocks, allocated by the thread on its
     * first block (dw_sums: one pointer per thread; NULL: no d_W); a failed one sets *failed */
    double **dw_sums;
    int *failed;
    int64_t width;
    float norm_eps;
} ReadArgs;

/* P[t, j] = vec(x_t) . W[j] for tokens t0 .. t0 + rows (rows <= ROWS) and values j0 .. j0 +
 * values (values <= SPAN), the products of ROWS tokens and SPAN rows of W at once, summed
 * lane-wise over the vectors of vec(x) and then across the lanes. Missing tokens and values
 * repeat the last one and are not stored. */
static void projection_tile(const float *x, const float *w, float *p, int64_t t0, int64_t rows,
                            int64_t j0, int64_t values, int64_t d, int64_t k) {
    const float *xr[ROWS], *wr[SPAN];
    vfloat acc[ROWS][SPAN];
#pragma GCC unroll 16
    for (int u = 0; u < ROWS; u++) xr[u] = x + (t0 + (u < rows ? u : rows - 1)) * d;
#pragma GCC unroll 16
    for (int v = 0; v < SPAN; v++) wr[v] = w + (j0 + (v < values ? v : values - 1)) * d;
#pragma GCC unroll 16
    for (int u = 0; u < ROWS; u++)
#pragma GCC unroll 16
        for (int v = 0; v < SPAN; v++) acc[u][v] = (vfloat){0};
    const int64_t whole = d - d % VW;
    for (int64_t e = 0; e < whole; e += VW) {
        vfloat xv[ROWS];
#pragma GCC unroll 16
        for (int u = 0; u < ROWS; u++) xv[u] = vload(xr[u] + e);
#pragma GCC unroll 16
        for (int v = 0; v < SPAN; v++) {
            const vfloat wv = vload(wr[v] + e);
#pragma GCC unroll 16
            for (int u = 0; u < ROWS; u++) acc[u][v] += xv[u] * wv;
        }
    }
    for (int u = 0; u < rows; u++)
        for (int v = 0; v < values; v++) {
            float total = lane_sum(acc[u][v]);
            for (int64_t e = whole; e < d; e++) total += xr[u][e] * wr[v][e];
            p[(t0 + u) * k + j0 + v] = total;
        }
}

static void read_forward_block(Scratch *s, const BlockArgs *a, int64_t t0, int64_t count) {
    const ReadArgs *r = a->extra;
    const int64_t n = a->n, k = 2 * n + n * n, width = r->width, d = n * width;
    for (int64_t u = 0; u < count; u += ROWS)
        for (int64_t j = 0; j < k; j += SPAN)
            projection_tile(r->x, r->w, a->out, t0 + u, count - u < ROWS ? count - u : ROWS, j,
                            k - j < SPAN ? k - j : SPAN, d, k);
    for (int64_t t = t0; t < t0 + count; t++) {
        const float rinv = inverse_rms(r->x + t * d, d, r->norm_eps);
        r->rinv_out[t] = rinv;
        for (int64_t j = 0; j < k; j++) a->out[t * k + j] *= rinv; /* P becomes q (a->q) */
    }
    tail_forward_block(s, a, t0, count);
    for (int64_t t = t0; t < t0 + count; t++)
        read_streams(r->x + t * d, a->h_pre + t * n, r->y + t * width, n, width);
}

/* y, H_post, H_res and (for the backward) q (tokens, K) and 1/rms; h_pre is the caller's
 * scratch (tokens, n). Returns 0, or -1 (no scratch). */
int mhc_read_forward(const float *x, const float *w, const float *a, const float *b, float *q,
                     float *rinv, float *y, float *h_pre, float *h_post, float *h_res,
                     int64_t tokens, int64_t n, int64_t width, float norm_eps, int iters,
                     float pre_eps, float form_eps, int threads) {
    const ReadArgs read = {.x = x, .w = w, .rinv_out = rinv, .y = y, .width = width,
                           .norm_eps = norm_eps};
    const BlockArgs args = {.q = q, .out = q, .a = a, .b = b, .h_pre = h_pre, .h_post = h_post,
                            .h_res = h_res, .n = n, .iters = iters, .pre_eps = pre_eps,
                            .form_eps = form_eps, .extra = &read};
    return for_each_block(tokens, &args, threads, read_forward_block);
}

/* The rank-1 update both gradient tiles make: acc[u] += s[u] times SPAN vectors from `row` */
static inline __attribute__((always_inline)) void tile_update(vfloat acc[ROWS][SPAN],
                                                              const float s[ROWS],
                                                              const float *row) {
    vfloat vec[SPAN];
#pragma GCC unroll 16
    for (int v = 0; v < SPAN; v++) vec[v] = vload(row + v * VW);
#pragma GCC unroll 16
    for (int u = 0; u < ROWS; u++)
#pragma GCC unroll 16
        for (int v = 0; v < SPAN; v++) acc[u][v] += s[u] * vec[v];
}

/* dx of tokens t0 .. t0 + rows (rows <= ROWS) at columns c0 .. c0 + SPAN VW of stream i:
 * d_merge + c_t x + h_pre[t, i] dy + sum_j g[t, j] W[j, .], ROWS tokens at once so that each
 * vector of W loaded feeds ROWS products (a token at a time, W's K rows would stream from cache per
 * token). Missing rows repeat the last one and are not stored. */
static void streams_gradient_tile(const ReadArgs *r, const float *h_pre, int64_t t0,
                                  int64_t rows, int64_t n, int64_t k, int64_t i, int64_t c0) {
    const int64_t width = r->width, d = n * width, col = i * width + c0;
    vfloat acc[ROWS][SPAN];
    const float *g[ROWS];
#pragma GCC unroll 16
    for (int u = 0; u < ROWS; u++) {
        const int64_t t = t0 + (u < rows ? u : rows - 1);
        const float ct = r->c[t], ht = h_pre[t * n + i];
        g[u] = r->g + t * k;
#pragma GCC unroll 16
        for (int v = 0; v < SPAN; v++) {
            acc[u][v] = ct * vload(r->x + t * d + col + v * VW) +
                        ht * vload(r->dy + t * width + c0 + v * VW);
            if (r->d_merge) acc[u][v] += vload(r->d_merge + t * d + col + v * VW);
        }
    }
    for (int64_t j = 0; j < k; j++) {
        float gj[ROWS];
#pragma GCC unroll 16
        for (int u = 0; u < ROWS; u++) gj[u] = g[u][j];
        tile_update(acc, gj, r->w + j * d + col);
    }
    for (int u = 0; u < rows; u++)
        for (int v = 0; v < SPAN; v++)
            vstore(r->dx + (t0 + u - r->dx_first) * d + col + v * VW, acc[u][v]);
}

/* The same for one token at columns c0 .. width of stream i (a width that is not a multiple
 * of SPAN VW). */
static void streams_gradient_rest(const ReadArgs *r, const float *h_pre, int64_t t, int64_t n,
                                  int64_t k, int64_t i, int64_t c0) {
    const int64_t width = r->width, d = n * width, col = i * width;
    const float ct = r->c[t], ht = h_pre[t * n + i], *g = r->g + t * k;
    const float *xt = r->x + t * d + col, *dyt = r->dy + t * width;
    const float *dm = r->d_merge ? r->d_merge + t * d + col : NULL;
    float *dxt = r->dx + (t - r->dx_first) * d + col;
#pragma omp simd
    for (int64_t q = c0; q < width; q++) {
        float acc = ct * xt[q] + ht * dyt[q] + (dm ? dm[q] : 0.0f);
        for (int64_t j = 0; j < k; j++) acc += g[j] * r->w[j * d + col + q];
        dxt[q] = acc;
    }
}

/* dx of the block's tokens (their g, c and h_pre computed), while their streams are in cache */
static void streams_gradient_block(const ReadArgs *r, const float *h_pre, int64_t t0,
                                   int64_t count, int64_t n, int64_t k) {
    const int64_t whole = r->width - r->width % (SPAN * VW);
    for (int64_t u = 0; u < count; u += ROWS) {
        const int64_t rows = count - u < ROWS ? count - u : ROWS;
        for (int64_t i = 0; i < n; i++) {
            for (int64_t c0 = 0; c0 < whole; c0 += SPAN * VW)
                streams_gradient_tile(r, h_pre, t0 + u, rows, n, k, i, c0);
            if (whole < r->width)
                for (int64_t t = t0 + u; t < t0 + u + rows; t++)
                    streams_gradient_rest(r, h_pre, t, n, k, i, whole);
        }
    }
}

/* This thread's d_W[j0 .. j0 + values, e0 .. e0 + SPAN VW) += sum_t g[t, j] vec(x_t) over the
 * block's tokens: SPAN vectors of ROWS rows of d_W at once (missing rows repeat the last one
 * and are not stored), summed over the block in float and added to the thread's double sum
 * (a float running sum over all of a thread's tokens drifts: 14x the float32 GEMM's error at
 * 65,536 tokens). */
static void weight_gradient_tile(const ReadArgs *r, double *dw, int64_t t0, int64_t count,
                                 int64_t j0, int64_t values, int64_t e0, int64_t d, int64_t k) {
    vfloat acc[ROWS][SPAN];
    int64_t j[ROWS];
#pragma GCC unroll 16
    for (int u = 0; u < ROWS; u++) {
        j[u] = j0 + (u < values ? u : values - 1);
#pragma GCC unroll 16
        for (int v = 0; v < SPAN; v++) acc[u][v] = (vfloat){0};
    }
    for (int64_t t = t0; t < t0 + count; t++) {
        float gt[ROWS];
#pragma GCC unroll 16
        for (int u = 0; u < ROWS; u++) gt[u] = r->g[t * k + j[u]];
        tile_update(acc, gt, r->x + t * d + e0);
    }
    for (int u = 0; u < values; u++)
        for (int v = 0; v < SPAN; v++) {
            double *sum = dw + j[u] * d + e0 + v * VW;
#pragma omp simd
            for (int l = 0; l < VW; l++) sum[l] += acc[u][v][l];
        }
}

/* The block's share of d_W in this thread's sum (columns past the last whole tile one by one) */
static void weight_gradient_block(const ReadArgs *r, int64_t t0, int64_t count, int64_t n,
                                  int64_t k) {
    const int64_t d = n * r->width, whole = d - d % (SPAN * VW);
    double **mine = r->dw_sums + omp_get_thread_num();
    if (!*mine && !(*mine = calloc((size_t)(k * d), sizeof(double)))) {
#pragma omp atomic write
        *r->failed = 1;
        return;
    }
    double *dw = *mine;
    for (int64_t j = 0; j < k; j += ROWS)
        for (int64_t e = 0; e < whole; e += SPAN * VW)
            weight_gradient_tile(r, dw, t0, count, j, k - j < ROWS ? k - j : ROWS, e, d, k);
    for (int64_t j = 0; j < k; j++)
        for (int64_t t = t0; t < t0 + count; t++) {
            const float gt = r->g[t * k + j], *xt = r->x + t * d;
#pragma omp simd
            for (int64_t e = whole; e < d; e++) dw[j * d + e] += (double)(gt * xt[e]);
        }
}

/* Per token: d_pre = (dy . x_i) over i and H_pre; the tail's dz; with dq = a dz, the
 * projection's gradient g = dq / rms and the norm's coefficient c = -(dq . q) / (rms^2 n C),
 * since d(1/rms)/dx = -x / (rms^3 n C); then (dx given) the streams' gradient
 * dx = d_merge + g W + c x + H_pre (x) dy. */
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
    if (r->dx) streams_gradient_block(r, a->h_pre, t0, count, n, k);
    if (r->dw_sums) weight_gradient_block(r, t0, count, n, k);
}

/* d_W (k, d) from the threads' double sums: each element's in thread order, the elements
 * split over the threads */
static void sum_weight_gradient(double **sums, int threads, int64_t k, int64_t d, float *dw) {
    const int64_t size = k * d, chunk = 4096;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t e = 0; e < size; e += chunk)
        add_thread_sums(sums, threads, e, size - e < chunk ? size - e : chunk, dw + e);
}

/* dz (tokens, K; the caller reduces it to a's and b's gradients); where dx is not NULL, the
 * streams' gradient dx (tokens, n, C) from the projection's weight w (K, n C), with d_merge
 * (the streams' gradient from elsewhere: the merge's) added where not NULL; where dw is not
 * NULL, d_W (K, n C): each thread's double sum over its tokens, then the threads' in order
 * (the same float for the same thread count). d_pre, c (tokens), g (tokens, K) and h_pre
 * (tokens, n) are scratch. d_post and d_res may be NULL. Returns 0, or -1 where a thread's
 * scratch or sum could not be allocated. */
int mhc_read_backward(const float *x, const float *q, const float *rinv, const float *a,
                      const float *b, const float *dy, const float *d_post, const float *d_res,
                      const float *w, const float *d_merge, float *d_pre, float *dz, float *g,
                      float *c, float *h_pre, float *dx, float *dw, int64_t tokens, int64_t n,
                      int64_t width, int iters, float pre_eps, float form_eps, int threads) {
    double **sums = dw ? calloc((size_t)threads, sizeof(double *)) : NULL;
    if (dw && !sums) return -1;
    int failed = 0;
    const ReadArgs read = {.x = x, .dy = dy, .rinv = rinv, .w = w, .d_merge = d_merge,
                           .d_pre = d_pre, .g = g, .c = c, .dx = dx, .dw_sums = sums,
                           .failed = &failed, .width = width};
    const BlockArgs args = {.q = q, .a = a, .b = b, .d_pre = d_pre, .d_post = d_post,
                            .d_res = d_res, .dz = dz, .h_pre = h_pre, .n = n, .iters = iters,
                            .pre_eps = pre_eps, .form_eps = form_eps, .extra = &read};
    if (for_each_block(tokens, &args, threads, read_backward_block) == -1) failed = 1;
    if (sums) {
        if (!failed) sum_weight_gradient(sums, threads, 2 * n + n * n, n * width, dw);
        for (int i = 0; i < threads; i++) free(sums[i]);
        free(sums);
    }
    return failed ? -1 : 0;
}

/* mhc_merge_read: the previous sublayer's merge (cpu_streams.c's) written block by block, and
 * the read taken on the merged streams while they are in cache, where the merge and the read
 * as two ops write the streams and read them back from memory. */
static void merge_read_forward_block(Scratch *s, const BlockArgs *a, int64_t t0, int64_t count) {
    const MergeArgs *m = ((const ReadArgs *)a->extra)->merge;
    const int64_t n = a->n, width = ((const ReadArgs *)a->extra)->width, d = n * width;
    for (int64_t t = t0; t < t0 + count; t++)
        merge_one(m->x + t * d, m->y + t * width, m->r + t * n * n, m->p + t * n,
                  m->merged + t * d, n, width);
    read_forward_block(s, a, t0, count);
}

/* The merge's inputs x, y, r (its H_res), p (its H_post); then mhc_read_forward's arguments
 * from the projection's weight on, the merged streams written to `merged`. */
int mhc_merge_read_forward(const float *x, const float *y, const float *r, const float *p,
                           const float *w, const float *a, const float *b, float *merged,
                           float *q, float *rinv, float *layer_in, float *h_pre, float *h_post,
                           float *h_res, int64_t tokens, int64_t n, int64_t width,
                           float norm_eps, int iters, float pre_eps, float form_eps,
                           int threads) {
    const MergeArgs merge = {.x = x, .y = y, .r = r, .p = p, .merged = merged};
    const ReadArgs read = {.x = merged, .w = w, .rinv_out = rinv, .y = layer_in, .width = width,
                           .norm_eps = norm_eps, .merge = &merge};
    const BlockArgs args = {.q = q, .out = q, .a = a, .b = b, .h_pre = h_pre, .h_post = h_post,
                            .h_res = h_res, .n = n, .iters = iters, .pre_eps = pre_eps,
                            .form_eps = form_eps, .extra = &read};
    return for_each_block(tokens, &args, threads, merge_read_forward_block);
}

/* The read's backward on a block, its dx (the merged streams' whole gradient) into this
 * thread's scratch, then the merge's backward from it: dx never goes to memory. */
static void merge_read_backward_block(Scratch *s, const BlockArgs *a, int64_t t0, int64_t count) {
    const ReadArgs *r = a->extra;
    const MergeArgs *m = r->merge;
    const int64_t n = a->n, width = r->width, d = n * width;
    float **mine = m->dx_blocks + omp_get_thread_num();
    if (!*mine && !(*mine = malloc((size_t)(LANES * d) * sizeof(float)))) {
#pragma omp atomic write
        *r->failed = 1;
        return;
    }
    ReadArgs block_read = *r;
    block_read.dx = *mine;
    block_read.dx_first = t0;
    BlockArgs block = *a;
    block.extra = &block_read;
    read_backward_block(s, &block, t0, count);
    for (int64_t t = t0; t < t0 + count; t++)
        merge_backward_one(*mine + (t - t0) * d, m->x + t * d, m->y + t * width,
                           m->r + t * n * n, m->p + t * n, m->dx + t * d, m->dy + t * width,
                           m->dr + t * n * n, m->dp + t * n, n, width);
}

/* The merge's inputs and their gradients (dx, dy, dr, dp), then mhc_read_backward's arguments
 * with the merged streams as its x; d_merge: the merged streams' gradient from elsewhere (the
 * next merge's; may be NULL). Returns 0, or -1 where a thread's scratch or sum could not be
 * allocated. */
int mhc_merge_read_backward(const float *x, const float *y, const float *r, const float *p,
                            float *dx, float *dy, float *dr, float *dp, const float *merged,
                            const float *q, const float *rinv, const float *a, const float *b,
                            const float *d_layer_in, const float *d_post, const float *d_res,
                            const float *w, const float *d_merge, float *d_pre, float *dz,
                            float *g, float *c, float *h_pre, float *dw, int64_t tokens,
                            int64_t n, int64_t width, int iters, float pre_eps, float form_eps,
                            int threads) {
    float **blocks = calloc((size_t)threads, sizeof(float *));
    double **sums = dw ? calloc((size_t)threads, sizeof(double *)) : NULL;
    int failed = !blocks || (dw && !sums);
    if (!failed) {
        const MergeArgs merge = {.x = x, .y = y, .r = r, .p = p, .dx = dx, .dy = dy, .dr = dr,
                                 .dp = dp, .dx_blocks = blocks};
        const ReadArgs read = {.x = merged, .dy = d_layer_in, .rinv = rinv, .w = w,
                               .d_merge = d_merge, .d_pre = d_pre, .g = g, .c = c,
                               .dx = NULL /* each block's scratch */, .dw_sums = sums,
                               .failed = &failed, .width = width, .merge = &merge};
        const BlockArgs args = {.q = q, .a = a, .b = b, .d_pre = d_pre, .d_post = d_post,
                                .d_res = d_res, .dz = dz, .h_pre = h_pre, .n = n,
                                .iters = iters, .pre_eps = pre_eps, .form_eps = form_eps,
                                .extra = &read};
        if (for_each_block(tokens, &args, threads, merge_read_backward_block) == -1) failed = 1;
        if (sums && !failed) sum_weight_gradient(sums, threads, 2 * n + n * n, n * width, dw);
    }
    for (int i = 0; blocks && i < threads; i++) free(blocks[i]);
    for (int i = 0; sums && i < threads; i++) free(sums[i]);
    free(blocks);
    free(sums);
    return failed ? -1 : 0;
}
