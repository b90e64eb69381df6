/* The head's cross-entropy over rows of float32 logits (the `cpu` backend's step inside op
 * linear_cross_entropy; semantics: kernels/linear_cross_entropy.py's
 * softmax_cross_entropy_rows). Per row r with target y and V logits l:
 *   loss_r = m + log(sum_v exp(l_v - m)) - l_y,  m = max_v l_v,
 * and, when the gradient is wanted, l is overwritten by (softmax(l) - onehot(y)) / count.
 * A row is taken whole: its max, then its exps (kept in place) and their sum, then the
 * scaling, so a row that fits the core's cache (16 KB at a 4,096-token vocabulary; V4's
 * 129K is 512 KB, in L2 at best) is read from memory once; the reference passes over the
 * whole chunk of logits once per step (max, subtraction, exp, sum, two divisions).
 * float32, contiguous: logits (rows, vocab); targets (rows,) int64 within [0, vocab); losses
 * (rows,). Built by kernels/cpu_build.py, bound by kernels/cpu_cross_entropy.py.
 */
#include <math.h>
#include <omp.h>

#include "cpu_blocks.h"

static float row_max(const float *l, int64_t vocab) {
    lanes top = {0};
    top -= INFINITY;
    int64_t v = 0;
    for (; v + LANES <= vocab; v += LANES) top = lanes_max(top, lanes_load(l + v));
    float m = -INFINITY;
    for (int i = 0; i < LANES; i++) m = top[i] > m ? top[i] : m;
    for (; v < vocab; v++) m = l[v] > m ? l[v] : m;
    return m;
}

/* sum_v exp(l_v - m); the exps written over l where `keep` */
static float row_exp_sum(float *l, int64_t vocab, float m, int keep) {
    lanes sum = {0};
    int64_t v = 0;
    for (; v + LANES <= vocab; v += LANES) {
        const lanes e = lanes_exp_nonpositive(lanes_load(l + v) - m);
        if (keep) lanes_store(l + v, e);
        sum += e;
    }
    float total = 0.0f;
    for (int i = 0; i < LANES; i++) total += sum[i];
    for (; v < vocab; v++) {
        const float e = exp_nonpositive(l[v] - m);
        if (keep) l[v] = e;
        total += e;
    }
    return total;
}

void cross_entropy_rows(float *logits, const int64_t *targets, float *losses, int64_t rows,
                        int64_t vocab, int64_t count, int want_grad, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *l = logits + r * vocab;
        const int64_t y = targets[r];
        const float picked = l[y], m = row_max(l, vocab);
        const float total = row_exp_sum(l, vocab, m, want_grad);
        losses[r] = m + logf(total) - picked;
        if (!want_grad) continue;
        const float k = 1.0f / (total * (float)count);
        int64_t v = 0;
        for (; v + LANES <= vocab; v += LANES) lanes_store(l + v, lanes_load(l + v) * k);
        for (; v < vocab; v++) l[v] *= k;
        l[y] -= 1.0f / (float)count;
    }
}
