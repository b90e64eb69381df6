/* DeepSeek-V4's attention core (op v4_attention; semantics: kernels/v4_attention.py's
 * reference) forward and backward, one query at a time with all its heads: the queries of a
 * token share one key-value entry per key (multi-query), so each key is read once for every
 * head. Query t of sequence b with position p (in its document) sees
 *   the window: tokens s with t - window < s <= t and t - s <= p;
 *   its entries: index[b, t, i] >= 0 (compressed entries, rows of `entries`; -1: none);
 *   a sink logit per head.
 * One softmax covers the three. Nothing larger than a query's logits (heads x keys) is formed;
 * the reference's blocks compute every query against two blocks of keys, half of them masked.
 *
 * Logits come from keys laid out transposed (channel d of key j at [d * ld + j]): LANES keys
 * at a time, four heads' sums in registers, no sum across a vector's lanes. Weighted sums of
 * rows (the output, the gradients) keep four vectors of channels in registers over the keys.
 *
 * float32, contiguous: q, out, grad, dq (B, T, H, D); kv, dkv (B, T, D); entries, dentries
 * (B, E, D); index (B, T, K) int64; positions (B, T) int64; sinks, dsinks (H); lse (B, T, H),
 * the log of each softmax's normaliser. Built by kernels/cpu_build.py, bound by
 * kernels/cpu_v4_attention.py.
 */
#include <omp.h>
#include <stdlib.h>

#include "cpu_blocks.h"

typedef struct {
    const float *q, *kv, *entries, *sinks;
    const int64_t *index, *positions;
    int64_t batch, seq, heads, dim, count, picks, window, ld, span;
    float scale;
    float *keys_t; /* (B, D, ld): kv transposed, ld = T + LANES, zero past T */
} Attention;

/* What a thread holds for one query: its logits (then probabilities) and a second array of as
 * many (the backward's dP, then dS) per head, its entries' rows gathered and transposed, their
 * indices. */
typedef struct {
    float *logits, *second, *rows, *rows_t;
    int64_t *chosen;
} Query;

static int64_t round_up(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* out[h * stride + j] = scale <x_h, key j> for keys j < n (transposed, ld apart), h < heads.
 * Writes up to round_up(n) columns: later calls may overwrite the ones past n. */
static void dots(const float *x, int64_t heads, int64_t dim, const float *kt, int64_t ld,
                 int64_t n, float scale, float *out, int64_t stride) {
    for (int64_t c = 0; c < n; c += LANES) {
        int64_t h = 0;
        for (; h + 4 <= heads; h += 4) {
            const float *x0 = x + h * dim;
            lanes a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t d = 0; d < dim; d++) {
                const lanes k = lanes_load(kt + d * ld + c);
                a0 += x0[d] * k;
                a1 += x0[dim + d] * k;
                a2 += x0[2 * dim + d] * k;
                a3 += x0[3 * dim + d] * k;
            }
            lanes_store(out + h * stride + c, a0 * scale);
            lanes_store(out + (h + 1) * stride + c, a1 * scale);
            lanes_store(out + (h + 2) * stride + c, a2 * scale);
            lanes_store(out + (h + 3) * stride + c, a3 * scale);
        }
        for (; h < heads; h++) { /* the last heads: four sums over every fourth channel */
            const float *x0 = x + h * dim;
            lanes a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            int64_t d = 0;
            for (; d + 4 <= dim; d += 4) {
                a0 += x0[d] * lanes_load(kt + d * ld + c);
                a1 += x0[d + 1] * lanes_load(kt + (d + 1) * ld + c);
                a2 += x0[d + 2] * lanes_load(kt + (d + 2) * ld + c);
                a3 += x0[d + 3] * lanes_load(kt + (d + 3) * ld + c);
            }
            for (; d < dim; d++) a0 += x0[d] * lanes_load(kt + d * ld + c);
            lanes_store(out + h * stride + c, ((a0 + a1) + (a2 + a3)) * scale);
        }
    }
}

typedef double lanes_double __attribute__((vector_size(LANES * sizeof(double))));

/* sum[0 .. LANES) += v, in double */
static inline void add_lanes(double *sum, lanes v) {
    lanes_double total;
    memcpy(&total, sum, sizeof total);
    total += __builtin_convertvector(v, lanes_double);
    memcpy(sum, &total, sizeof total);
}

/* row[d] += sum_h a[h] x[h * dim + d] + b[h] y[h * dim + d], d < dim: a key's gradient from
 * one query's heads (as key and as value), summed in float32 and added to the key's sum in
 * double (a float32 running sum over a 128-token window's queries lost 2x the reference's
 * precision) */
static void add_key_gradient(double *row, const float *a, const float *x, const float *b,
                             const float *y, int64_t heads, int64_t dim) {
    int64_t d = 0;
    for (; d + 2 * LANES <= dim; d += 2 * LANES) {
        lanes a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + h * dim + d, *yh = y + h * dim + d;
            a0 += a[h] * lanes_load(xh);
            a1 += a[h] * lanes_load(xh + LANES);
            b0 += b[h] * lanes_load(yh);
            b1 += b[h] * lanes_load(yh + LANES);
        }
        add_lanes(row + d, a0 + b0);
        add_lanes(row + d + LANES, a1 + b1);
    }
    for (; d < dim; d++) {
        float total = 0.0f;
        for (int64_t h = 0; h < heads; h++) total += a[h] * x[h * dim + d] + b[h] * y[h * dim + d];
        row[d] += (double)total;
    }
}

/* out[d] (add: +=) scale sum_j w[j] rows[j * stride + d], d < dim */
static void weighted_rows(float *out, const float *w, const float *rows, int64_t stride,
                          int64_t n, int64_t dim, float scale, int add) {
    if (add && n == 0) return; /* a query with no entries: nothing to add */
    int64_t d = 0;
    for (; d + 4 * LANES <= dim; d += 4 * LANES) {
        lanes a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t j = 0; j < n; j++) {
            const float *r = rows + j * stride + d, x = w[j];
            a0 += x * lanes_load(r);
            a1 += x * lanes_load(r + LANES);
            a2 += x * lanes_load(r + 2 * LANES);
            a3 += x * lanes_load(r + 3 * LANES);
        }
        const lanes *parts[4] = {&a0, &a1, &a2, &a3};
        for (int i = 0; i < 4; i++) {
            float *o = out + d + i * LANES;
            lanes_store(o, (add ? lanes_load(o) : (lanes){0}) + *parts[i] * scale);
        }
    }
    for (; d + LANES <= dim; d += LANES) {
        lanes a0 = {0};
        for (int64_t j = 0; j < n; j++) a0 += w[j] * lanes_load(rows + j * stride + d);
        lanes_store(out + d, (add ? lanes_load(out + d) : (lanes){0}) + a0 * scale);
    }
    for (; d < dim; d++) {
        float a = 0.0f;
        for (int64_t j = 0; j < n; j++) a += w[j] * rows[j * stride + d];
        out[d] = (add ? out[d] : 0.0f) + a * scale;
    }
}

static float lanes_sum(lanes v) {
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += v[l];
    return total;
}

static lanes_int lanes_below(int64_t c, int64_t n) {
    const lanes_int iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return iota < (int32_t)(n - c);
}

/* Logits l[0 .. n) with the sink logit: l becomes the probabilities; returns the log of the
 * normaliser (the sink's exp included). */
static float softmax_with_sink(float *l, int64_t n, float sink) {
    lanes top = {0};
    top -= INFINITY;
    for (int64_t c = 0; c < n; c += LANES)
        top = lanes_max(top, lanes_select(lanes_below(c, n), lanes_load(l + c), top));
    float m = sink;
    for (int i = 0; i < LANES; i++) m = top[i] > m ? top[i] : m;
    lanes sum = {0};
    for (int64_t c = 0; c < n; c += LANES) {
        const lanes e = lanes_exp_nonpositive(lanes_load(l + c) - m);
        const lanes kept = lanes_select(lanes_below(c, n), e, (lanes){0});
        lanes_store(l + c, kept);
        sum += kept;
    }
    const float total = lanes_sum(sum) + exp_nonpositive(sink - m), inverse = 1.0f / total;
    for (int64_t c = 0; c < n; c += LANES) lanes_store(l + c, lanes_load(l + c) * inverse);
    return m + logf(total);
}

/* The first key of query t's window (t + 1: none, for a negative position, as the reference
 * allows none), and its entries gathered (rows and transposed). */
static int64_t window_start(const Attention *a, int64_t b, int64_t t) {
    int64_t s0 = t - a->window + 1;
    const int64_t doc = t - a->positions[b * a->seq + t];
    s0 = doc > s0 ? doc : s0;
    s0 = s0 < t + 1 ? s0 : t + 1;
    return s0 > 0 ? s0 : 0;
}

static int64_t gather_entries(const Attention *a, int64_t b, int64_t t, Query *w) {
    const int64_t *index = a->index + (b * a->seq + t) * a->picks, dim = a->dim;
    const int64_t kp = round_up(a->picks);
    int64_t n = 0;
    for (int64_t i = 0; i < a->picks; i++)
        if (index[i] >= 0 && index[i] < a->count) w->chosen[n++] = index[i];
    for (int64_t e = 0; e < n; e++) {
        const float *src = a->entries + (b * a->count + w->chosen[e]) * dim;
        memcpy(w->rows + e * dim, src, (size_t)dim * sizeof(float));
        for (int64_t d = 0; d < dim; d++) w->rows_t[d * kp + e] = src[d];
    }
    return n;
}

/* x's (heads x D) logits against query t's keys: window first, then its entries */
static void key_logits(const Attention *a, const float *x, int64_t b, int64_t s0, int64_t nw,
                       int64_t ne, float scale, Query *w, float *out) {
    const float *kt = a->keys_t + b * a->dim * a->ld + s0;
    dots(x, a->heads, a->dim, kt, a->ld, nw, scale, out, a->span);
    if (ne > 0)
        dots(x, a->heads, a->dim, w->rows_t, round_up(a->picks), ne, scale, out + nw, a->span);
}

static void transpose_keys(const Attention *a, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < a->batch; b++) {
        float *dst = a->keys_t + b * a->dim * a->ld;
        const float *src = a->kv + b * a->seq * a->dim;
        for (int64_t d = 0; d < a->dim; d++) {
            for (int64_t s = 0; s < a->seq; s++) dst[d * a->ld + s] = src[s * a->dim + d];
            for (int64_t s = a->seq; s < a->ld; s++) dst[d * a->ld + s] = 0.0f;
        }
    }
}

static int query_scratch(const Attention *a, Query *w) {
    const int64_t kp = round_up(a->picks), per_head = a->heads * a->span;
    w->logits = malloc((size_t)(2 * per_head + a->dim * (a->picks + kp)) * sizeof(float));
    w->chosen = malloc((size_t)(a->picks + 1) * sizeof(int64_t));
    if (!w->logits || !w->chosen) {
        free(w->logits);
        free(w->chosen);
        return -1;
    }
    w->second = w->logits + per_head;
    w->rows = w->second + per_head;
    w->rows_t = w->rows + a->dim * a->picks;
    memset(w->rows_t, 0, (size_t)(a->dim * kp) * sizeof(float));
    return 0;
}

/* The sizes, and kv transposed (a->keys_t, to be freed); -1 where it could not be allocated */
static int setup(Attention *a, const float *q, const float *kv, const float *entries,
                 const int64_t *index, const int64_t *positions, const float *sinks,
                 int64_t batch, int64_t seq, int64_t heads, int64_t dim, int64_t count,
                 int64_t picks, int64_t window, int threads) {
    *a = (Attention){q, kv, entries, sinks, index, positions, batch, seq, heads, dim, count,
                     picks, window, seq + LANES, 0, 1.0f / sqrtf((float)dim), NULL};
    /* a query's keys: the window (at most `window`, rounded up to whole vectors) and its
     * entries from there */
    a->span = round_up(window < seq ? window : seq) + round_up(picks) + LANES;
    a->keys_t = malloc((size_t)(batch * dim * a->ld) * sizeof(float));
    if (!a->keys_t) return -1;
    transpose_keys(a, threads);
    return 0;
}

/* A thread's scratch for its queries; 0 (and `failed` set) where it could not be had. */
static int begin_queries(const Attention *a, Query *w, int *failed) {
    if (query_scratch(a, w) == 0) return 1;
#pragma omp atomic write
    *failed = 1;
    return 0;
}

static void end_queries(Query *w) {
    free(w->logits);
    free(w->chosen);
}

int v4_attention_forward(const float *q, const float *kv, const float *entries,
                         const int64_t *index, const int64_t *positions, const float *sinks,
                         float *out, float *lse, int64_t batch, int64_t seq, int64_t heads,
                         int64_t dim, int64_t count, int64_t picks, int64_t window, int threads) {
    Attention a;
    if (setup(&a, q, kv, entries, index, positions, sinks, batch, seq, heads, dim, count, picks,
              window, threads))
        return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        Query w;
        const int ok = begin_queries(&a, &w, &failed);
#pragma omp for schedule(static)
        for (int64_t bt = 0; bt < batch * seq; bt++) {
            if (!ok) continue;
            const int64_t b = bt / seq, t = bt % seq, s0 = window_start(&a, b, t);
            const int64_t nw = t - s0 + 1, ne = gather_entries(&a, b, t, &w);
            const float *qt = q + bt * heads * dim;
            key_logits(&a, qt, b, s0, nw, ne, a.scale, &w, w.logits);
            for (int64_t h = 0; h < heads; h++) {
                float *p = w.logits + h * a.span, *o = out + (bt * heads + h) * dim;
                lse[bt * heads + h] = softmax_with_sink(p, nw + ne, sinks[h]);
                weighted_rows(o, p, kv + (b * seq + s0) * dim, dim, nw, dim, 1.0f, 0);
                weighted_rows(o, p + nw, w.rows, dim, ne, dim, 1.0f, 1);
            }
        }
        if (ok) end_queries(&w);
    }
    free(a.keys_t);
    return failed ? -1 : 0;
}

/* Query bt's gradients: dq directly, its keys' and entries' into the thread's sums (dkv_t,
 * dent_t) and the sinks' into dsink_t. */
static void query_backward(const Attention *a, const float *grad, const float *out,
                           const float *lse, int64_t bt, Query *w, float *dq, double *dkv_t,
                           double *dent_t, double *dsink_t) {
    const int64_t seq = a->seq, heads = a->heads, dim = a->dim, span = a->span;
    const int64_t b = bt / seq, t = bt % seq, s0 = window_start(a, b, t);
    const int64_t nw = t - s0 + 1, ne = gather_entries(a, b, t, w), n = nw + ne;
    const float *qt = a->q + bt * heads * dim, *gt = grad + bt * heads * dim;
    key_logits(a, qt, b, s0, nw, ne, a->scale, w, w->logits);
    key_logits(a, gt, b, s0, nw, ne, 1.0f, w, w->second);
    for (int64_t h = 0; h < heads; h++) {
        const float *g = gt + h * dim, *o = out + (bt * heads + h) * dim;
        float *p = w->logits + h * span, *ds = w->second + h * span, delta = 0.0f;
#pragma omp simd reduction(+ : delta)
        for (int64_t d = 0; d < dim; d++) delta += g[d] * o[d];
        const float top = lse[bt * heads + h];
        for (int64_t c = 0; c < n; c += LANES) {
            const lanes pc = lanes_exp_nonpositive(lanes_load(p + c) - top);
            lanes_store(p + c, pc);
            lanes_store(ds + c, pc * (lanes_load(ds + c) - delta));
        }
        dsink_t[h] -= (double)(exp_nonpositive(a->sinks[h] - top) * delta);
        float *dqh = dq + (bt * heads + h) * dim;
        weighted_rows(dqh, ds, a->kv + (b * seq + s0) * dim, dim, nw, dim, a->scale, 0);
        weighted_rows(dqh, ds + nw, w->rows, dim, ne, dim, a->scale, 1);
    }
    /* key j's gradient: sum over heads of scale dS_hj q_h + P_hj grad_h */
    float coef[2][heads];
    for (int64_t j = 0; j < n; j++) {
        for (int64_t h = 0; h < heads; h++) {
            coef[0][h] = a->scale * w->second[h * span + j];
            coef[1][h] = w->logits[h * span + j];
        }
        double *row = j < nw ? dkv_t + (b * seq + s0 + j) * dim
                            : dent_t + (b * a->count + w->chosen[j - nw]) * dim;
        add_key_gradient(row, coef[0], qt, coef[1], gt, heads, dim);
    }
}

/* dq, dkv, dentries and dsinks (each overwritten) from the gradient of out. Returns 0, or -1
 * where a thread's scratch could not be allocated. The keys', entries' and sinks' gradients
 * are summed per thread in double and then in thread order: deterministic for a thread
 * count. */
int v4_attention_backward(const float *grad, const float *q, const float *kv,
                          const float *entries, const int64_t *index, const int64_t *positions,
                          const float *sinks, const float *out, const float *lse, float *dq,
                          float *dkv, float *dentries, float *dsinks, int64_t batch, int64_t seq,
                          int64_t heads, int64_t dim, int64_t count, int64_t picks,
                          int64_t window, int threads) {
    Attention a;
    if (setup(&a, q, kv, entries, index, positions, sinks, batch, seq, heads, dim, count, picks,
              window, threads))
        return -1;
    const int64_t kv_size = batch * seq * dim, entry_size = batch * count * dim;
    const int64_t per_thread = kv_size + entry_size;
    double *sums = calloc((size_t)(threads * per_thread), sizeof(double));
    double *sink_sums = calloc((size_t)(threads * heads), sizeof(double));
    if (!sums || !sink_sums) {
        free(a.keys_t);
        free(sums);
        free(sink_sums);
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        Query w;
        const int ok = begin_queries(&a, &w, &failed);
        double *mine = sums + omp_get_thread_num() * per_thread;
        double *dsink_t = sink_sums + omp_get_thread_num() * heads;
#pragma omp for schedule(static)
        for (int64_t bt = 0; bt < batch * seq; bt++)
            if (ok)
                query_backward(&a, grad, out, lse, bt, &w, dq, mine, mine + kv_size, dsink_t);
        if (ok) end_queries(&w);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = 0; i < kv_size + entry_size; i++) {
            double total = 0.0;
            for (int k = 0; k < threads; k++) total += sums[k * per_thread + i];
            if (i < kv_size)
                dkv[i] = (float)total;
            else
                dentries[i - kv_size] = (float)total;
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        double total = 0.0;
        for (int k = 0; k < threads; k++) total += sink_sums[k * heads + h];
        dsinks[h] = (float)total;
    }
    free(sink_sums);
    free(sums);
    free(a.keys_t);
    return failed ? -1 : 0;
}
