/* Sinkhorn-Knopp in both forms and the mappings' tail after the projection (scales, biases,
 * sigmoids, Sinkhorn), forward and backward, on blocks of LANES tokens (cpu_blocks.h).
 * float32, contiguous. Semantics: kernels/mhc_reference.py. Built by kernels/cpu_build.py,
 * bound by kernels/cpu_mhc.py.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_blocks.h"

/* log as a polynomial on every lane (Cephes' single-precision one, within ~2 ulp of libm here),
 * written on lane vectors as lanes_exp_nonpositive (cpu_blocks.h) is; it takes the normal
 * positive sums of exps, and a NaN stays NaN. */
static inline lanes lanes_log(lanes x) {
    lanes_int bits = (lanes_int)x;
    lanes e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, lanes);
    bits = (bits & (int32_t)0x807fffff) | 0x3f000000; /* the mantissa in [0.5, 1) */
    const lanes mantissa = (lanes)bits, below = lanes_ones(mantissa < 0.707106781186547524f);
    e -= below;
    const lanes m = mantissa + below * mantissa - 1.0f, z = m * m;
    lanes y = m * 7.0376836292e-2f - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z - e * 2.12194440e-4f - z * 0.5f;
    return lanes_with_nan_of(x, m + y + e * 0.693359375f);
}

/* Line a along `dim` of an n x n block: its b-th value is lanes (first + b step) of the block.
 * dim 0 runs down column a (a sum over rows i), dim 1 along row a. */
static inline int64_t line_first(int dim, int64_t n, int64_t a) { return dim == 0 ? a : a * n; }
static inline int64_t line_step(int dim, int64_t n) { return dim == 0 ? n : 1; }

/* Floats of scratch per block: 2 iters + 1 matrices and as many n-vectors of divisors. */
static int64_t block_floats(int64_t n, int iters) {
    return (2 * (int64_t)iters + 1) * (n * n + n) * LANES;
}

/* Runs the iterations on a block: logits (n n x LANES) -> states (and divisors); returns the
 * result (inside states). form_eps < 0: the paper's log-space form (kernels/mhc_reference.py:
 * _sinkhorn_log): iters times log_softmax over dim 0 then dim 1, result exp of the last, states
 * the logits and every iterate. Else V4's form (_sinkhorn_eps): p = softmax over dim 0, m = p +
 * eps, then 2 iters - 1 normalisations m / (sum + eps) over dims 1, 0, ..., 1; states p and each
 * normalised m, divisors each sum + eps. */
static const float *block_forward(const float *logits, float *states, float *divisors,
                                  float *result, int64_t n, int iters, float form_eps) {
    const int64_t nn = n * n;
    if (form_eps < 0) {
        memcpy(states, logits, nn * LANES * sizeof(float));
        for (int k = 0; k < 2 * iters; k++) {
            const int dim = k % 2;
            const int64_t step = line_step(dim, n) * LANES;
            for (int64_t a = 0; a < n; a++) {
                const int64_t first = line_first(dim, n, a) * LANES;
                const float *in = states + k * nn * LANES + first;
                float *out = states + (k + 1) * nn * LANES + first;
                lanes top = lanes_load(in), total = {0};
                for (int64_t b = 1; b < n; b++) top = lanes_max(top, lanes_load(in + b * step));
                for (int64_t b = 0; b < n; b++)
                    total += lanes_exp_nonpositive(lanes_load(in + b * step) - top);
                total = top + lanes_log(total);
                for (int64_t b = 0; b < n; b++)
                    lanes_store(out + b * step, lanes_load(in + b * step) - total);
            }
        }
        const float *last = states + 2 * (int64_t)iters * nn * LANES;
        for (int64_t e = 0; e < nn * LANES; e += LANES)
            lanes_store(result + e, lanes_exp_nonpositive(lanes_load(last + e)));
        return result;
    }
    for (int64_t j = 0; j < n; j++) { /* softmax down each column */
        lanes top = lanes_load(logits + j * LANES), total = {0};
        for (int64_t i = 1; i < n; i++)
            top = lanes_max(top, lanes_load(logits + (i * n + j) * LANES));
        for (int64_t i = 0; i < n; i++) {
            const int64_t e = (i * n + j) * LANES;
            const lanes p = lanes_exp_nonpositive(lanes_load(logits + e) - top);
            lanes_store(states + e, p);
            total += p;
        }
        for (int64_t i = 0; i < n; i++) {
            const int64_t e = (i * n + j) * LANES;
            lanes_store(states + e, lanes_load(states + e) / total);
        }
    }
    for (int k = 0; k < 2 * iters - 1; k++) {
        const int dim = (k + 1) % 2;
        const int64_t step = line_step(dim, n) * LANES;
        const float shift = k == 0 ? form_eps : 0.0f; /* m = p + eps before the first */
        for (int64_t a = 0; a < n; a++) {
            const int64_t first = line_first(dim, n, a) * LANES;
            const float *in = states + k * nn * LANES + first;
            float *out = states + (k + 1) * nn * LANES + first;
            lanes total = (lanes){0} + form_eps;
            for (int64_t b = 0; b < n; b++) total += lanes_load(in + b * step) + shift;
            lanes_store(divisors + (k * n + a) * LANES, total);
            for (int64_t b = 0; b < n; b++)
                lanes_store(out + b * step, (lanes_load(in + b * step) + shift) / total);
        }
    }
    return states + (2 * (int64_t)iters - 1) * nn * LANES;
}

/* d (n n x LANES) from the result's gradient to the logits', with block_forward's states:
 * log form: y = log_softmax(x) gives dx = dy - e^y sum dy; V4's: m' = m / D gives
 * dm = (dm' - sum dm' m') / D, and p = softmax(x) gives dx = p (dp - sum dp p). */
static void block_backward(const float *states, const float *divisors, const float *result,
                           float *d, int64_t n, int iters, float form_eps) {
    const int64_t nn = n * n;
    if (form_eps < 0) {
        for (int64_t e = 0; e < nn * LANES; e += LANES) /* through exp */
            lanes_store(d + e, lanes_load(d + e) * lanes_load(result + e));
        for (int k = 2 * iters - 1; k >= 0; k--) {
            const int dim = k % 2;
            const int64_t step = line_step(dim, n) * LANES;
            for (int64_t a = 0; a < n; a++) {
                const int64_t first = line_first(dim, n, a) * LANES;
                const float *y = states + (k + 1) * nn * LANES + first;
                float *dl = d + first;
                lanes total = {0};
                for (int64_t b = 0; b < n; b++) total += lanes_load(dl + b * step);
                for (int64_t b = 0; b < n; b++) {
                    const lanes through = lanes_exp_nonpositive(lanes_load(y + b * step));
                    lanes_store(dl + b * step, lanes_load(dl + b * step) - through * total);
                }
            }
        }
        return;
    }
    for (int k = 2 * iters - 2; k >= 0; k--) {
        const int dim = (k + 1) % 2;
        const int64_t step = line_step(dim, n) * LANES;
        for (int64_t a = 0; a < n; a++) {
            const int64_t first = line_first(dim, n, a) * LANES;
            const float *m = states + (k + 1) * nn * LANES + first;
            const lanes divisor = lanes_load(divisors + (k * n + a) * LANES);
            float *dl = d + first;
            lanes total = {0};
            for (int64_t b = 0; b < n; b++)
                total += lanes_load(dl + b * step) * lanes_load(m + b * step);
            for (int64_t b = 0; b < n; b++)
                lanes_store(dl + b * step, (lanes_load(dl + b * step) - total) / divisor);
        }
    }
    for (int64_t j = 0; j < n; j++) {
        lanes total = {0};
        for (int64_t i = 0; i < n; i++) {
            const int64_t e = (i * n + j) * LANES;
            total += lanes_load(d + e) * lanes_load(states + e);
        }
        for (int64_t i = 0; i < n; i++) {
            const int64_t e = (i * n + j) * LANES;
            const lanes p = lanes_load(states + e);
            lanes_store(d + e, p * (lanes_load(d + e) - total));
        }
    }
}

static Scratch scratch_alloc(int64_t n, int iters) {
    const int64_t nn = n * n;
    Scratch s;
    s.states = malloc((block_floats(n, iters) + 3 * nn * LANES) * sizeof(float));
    s.divisors = s.states + (2 * (int64_t)iters + 1) * nn * LANES;
    s.logits = s.states + block_floats(n, iters);
    s.result = s.logits + nn * LANES;
    s.grad = s.result + nn * LANES;
    return s;
}

/* Token t0 + l's n x n values (rows of `stride` floats from `offset`) into lane l of `block`;
 * lanes past the last token get zeros. */
static void gather(float *block, const float *src, int64_t t0, int64_t count, int64_t stride,
                   int64_t offset, int64_t nn) {
    for (int l = 0; l < LANES; l++)
        for (int64_t e = 0; e < nn; e++)
            block[e * LANES + l] = l < count ? src[(t0 + l) * stride + offset + e] : 0.0f;
}

static void scatter(const float *block, float *dst, int64_t t0, int64_t count, int64_t stride,
                    int64_t offset, int64_t nn) {
    for (int l = 0; l < count; l++)
        for (int64_t e = 0; e < nn; e++) dst[(t0 + l) * stride + offset + e] = block[e * LANES + l];
}

int for_each_block(int64_t tokens, const BlockArgs *args, int threads, BlockWork work) {
    const int64_t blocks = (tokens + LANES - 1) / LANES;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        Scratch scratch = scratch_alloc(args->n, args->iters);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            if (!scratch.states) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const int64_t t0 = blk * LANES;
            work(&scratch, args, t0, tokens - t0 < LANES ? tokens - t0 : LANES);
        }
        free(scratch.states);
    }
    return failed ? -1 : 0;
}

static void sinkhorn_forward_block(Scratch *s, const BlockArgs *x, int64_t t0, int64_t count) {
    const int64_t nn = x->n * x->n;
    gather(s->logits, x->logits, t0, count, nn, 0, nn);
    const float *res =
        block_forward(s->logits, s->states, s->divisors, s->result, x->n, x->iters, x->form_eps);
    scatter(res, x->out, t0, count, nn, 0, nn);
}

static void sinkhorn_backward_block(Scratch *s, const BlockArgs *x, int64_t t0, int64_t count) {
    const int64_t nn = x->n * x->n;
    gather(s->logits, x->logits, t0, count, nn, 0, nn);
    gather(s->grad, x->grad, t0, count, nn, 0, nn);
    const float *res =
        block_forward(s->logits, s->states, s->divisors, s->result, x->n, x->iters, x->form_eps);
    block_backward(s->states, s->divisors, res, s->grad, x->n, x->iters, x->form_eps);
    scatter(s->grad, x->out, t0, count, nn, 0, nn);
}

/* Sinkhorn of each token's n x n logits (form_eps < 0: the log-space form); iters >= 1. */
int sinkhorn_forward(const float *logits, float *out, int64_t tokens, int64_t n, int iters,
                     float form_eps, int threads) {
    const BlockArgs args = {.logits = logits, .out = out, .n = n, .iters = iters,
                            .form_eps = form_eps};
    return for_each_block(tokens, &args, threads, sinkhorn_forward_block);
}

/* d logits from d out, the iterations recomputed per block from the logits */
int sinkhorn_backward(const float *logits, const float *grad, float *dlogits, int64_t tokens,
                      int64_t n, int iters, float form_eps, int threads) {
    const BlockArgs args = {.logits = logits, .grad = grad, .out = dlogits, .n = n,
                            .iters = iters, .form_eps = form_eps};
    return for_each_block(tokens, &args, threads, sinkhorn_backward_block);
}

/* z_res = a q_res + b of tokens t0 .. t0 + count into a block (q's rows: 2n + n^2 values) */
static void res_logits(float *block, const BlockArgs *x, int64_t t0, int64_t count) {
    const int64_t n = x->n, nn = n * n;
    gather(block, x->q, t0, count, 2 * n + nn, 2 * n, nn);
    for (int64_t e = 0; e < nn; e++)
        FOR_LANES block[e * LANES + l] = x->a[2 * n + e] * block[e * LANES + l] + x->b[2 * n + e];
}

void tail_forward_block(Scratch *s, const BlockArgs *x, int64_t t0, int64_t count) {
    const int64_t n = x->n, nn = n * n;
    for (int64_t t = t0; t < t0 + count; t++)
        for (int64_t i = 0; i < n; i++) {
            x->h_pre[t * n + i] = gate(x, t, i) + x->pre_eps;
            x->h_post[t * n + i] = 2.0f * gate(x, t, n + i);
        }
    res_logits(s->logits, x, t0, count);
    const float *res =
        block_forward(s->logits, s->states, s->divisors, s->result, n, x->iters, x->form_eps);
    scatter(res, x->h_res, t0, count, nn, 0, nn);
}

void tail_backward_block(Scratch *s, const BlockArgs *x, int64_t t0, int64_t count) {
    const int64_t n = x->n, nn = n * n, k = 2 * n + nn;
    for (int64_t t = t0; t < t0 + count; t++)
        for (int64_t i = 0; i < n; i++) {
            const float s_pre = gate(x, t, i), s_post = gate(x, t, n + i);
            x->dz[t * k + i] = x->d_pre ? x->d_pre[t * n + i] * s_pre * (1.0f - s_pre) : 0.0f;
            x->dz[t * k + n + i] =
                x->d_post ? x->d_post[t * n + i] * 2.0f * s_post * (1.0f - s_post) : 0.0f;
        }
    if (!x->d_res) {
        for (int64_t t = t0; t < t0 + count; t++)
            for (int64_t e = 0; e < nn; e++) x->dz[t * k + 2 * n + e] = 0.0f;
        return;
    }
    res_logits(s->logits, x, t0, count);
    gather(s->grad, x->d_res, t0, count, nn, 0, nn);
    const float *res =
        block_forward(s->logits, s->states, s->divisors, s->result, n, x->iters, x->form_eps);
    block_backward(s->states, s->divisors, res, s->grad, n, x->iters, x->form_eps);
    scatter(s->grad, x->dz, t0, count, k, 2 * n, nn);
}

/* The mappings from the projection q (tokens, K = 2n + n^2: pre | post | res) with the
 * per-value scale and bias (a, b: K values each, laid out as q):
 *   z = a q + b;  H_pre = sigmoid(z_pre) + pre_eps;  H_post = 2 sigmoid(z_post);
 *   H_res = Sinkhorn(z_res)  (form_eps < 0: log space, else V4's form with that eps). */
int mhc_tail_forward(const float *q, const float *a, const float *b, float *h_pre, float *h_post,
                     float *h_res, int64_t tokens, int64_t n, int iters, float pre_eps,
                     float form_eps, int threads) {
    const BlockArgs args = {.q = q, .a = a, .b = b, .h_pre = h_pre, .h_post = h_post,
                            .h_res = h_res, .n = n, .iters = iters, .pre_eps = pre_eps,
                            .form_eps = form_eps};
    return for_each_block(tokens, &args, threads, tail_forward_block);
}

/* dz (tokens, K): the gradient at z = a q + b from those of H_pre, H_post, H_res (any NULL:
 * zero); the caller reduces it to the gradients of q (a dz), a (sum dz q) and b (sum dz). */
int mhc_tail_backward(const float *q, const float *a, const float *b, const float *d_pre,
                      const float *d_post, const float *d_res, float *dz, int64_t tokens,
                      int64_t n, int iters, float form_eps, int threads) {
    const BlockArgs args = {.q = q, .a = a, .b = b, .d_pre = d_pre, .d_post = d_post,
                            .d_res = d_res, .dz = dz, .n = n, .iters = iters,
                            .form_eps = form_eps};
    return for_each_block(tokens, &args, threads, tail_backward_block);
}
