/* MoE token permutation (ops moe_permute, moe_unpermute; semantics: kernels/reference.py's),
 * as the triton backend has it (kernels/triton_moe.py): every pass reads rows through the
 * permutation `order` (permuted row -> flat slot t k + j) or its inverse (slot -> permuted
 * row), so no thread adds into a row another writes and a token's k rows are summed in slot
 * order. The reference writes a weighted copy of all N k rows and adds it into zeros
 * (index_add), and its backward scatters again.
 *
 * float32, contiguous: tokens, d_tokens (N, C); rows, d_rows (N k, C); weights, d_weights
 * (N, k); order, inverse (N k) int64, each a permutation of 0 .. N k - 1 (the caller checks
 * their range). The permute's forward is cpu_gather.c's gather_rows (divisor k). Built by
 * kernels/cpu_build.py, bound by kernels/cpu_moe.py. */
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* out[t] = sum_j w[t k + j] rows[inverse[t k + j]] in slot order (weights NULL: 1), t < N: the
 * unpermute's forward and the permute's backward */
void moe_weighted_sum(const float *rows, const int64_t *inverse, const float *weights,
                      float *out, int64_t tokens, int64_t k, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        float *o = out + t * width;
        for (int64_t j = 0; j < k; j++) {
            const float *x = rows + inverse[t * k + j] * width;
            const float a = weights ? weights[t * k + j] : 1.0f;
            if (j == 0) {
#pragma omp simd
                for (int64_t c = 0; c < width; c++) o[c] = a * x[c];
            } else {
#pragma omp simd
                for (int64_t c = 0; c < width; c++) o[c] += a * x[c];
            }
        }
        if (k == 0) memset(o, 0, (size_t)width * sizeof(float));
    }
}

/* The unpermute's backward from its output's gradient g (N, C):
 * d_rows[inverse[t k + j]] = w[t k + j] g[t], d_weights[t k + j] = <g[t], rows[inverse[..]]> */
void moe_unpermute_backward(const float *rows, const int64_t *inverse, const float *weights,
                            const float *grad, float *d_rows, float *d_weights, int64_t tokens,
                            int64_t k, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *g = grad + t * width;
        for (int64_t j = 0; j < k; j++) {
            const int64_t r = inverse[t * k + j];
            const float *x = rows + r * width, a = weights[t * k + j];
            float *dx = d_rows + r * width, dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < width; c++) {
                dx[c] = a * g[c];
                dot += x[c] * g[c];
            }
            d_weights[t * k + j] = dot;
        }
    }
}
