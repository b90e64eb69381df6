/* Rows gathered by index, and their gradient added back (kernels/cpu_gather.py: Engram's table
 * rows; kernels/cpu_moe.py: the MoE permute's copies, with divisor k). float32, contiguous;
 * indices int64 within range (the callers check). Built by kernels/cpu_build.py. */
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* out[i] = src[index[i] / divisor], i < count, rows of `width` */
void gather_rows(const float *src, const int64_t *index, float *out, int64_t count,
                 int64_t divisor, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < count; i++)
        memcpy(out + i * width, src + index[i] / divisor * width, (size_t)width * sizeof(float));
}

/* d_src = 0, then d_src[index[i]] += grad[i] for i in order: each thread owns a range of
 * d_src's rows, zeroes it and scans every index for the rows in it, so each row's sum runs
 * in the order of i (index_add's) whatever the thread count, and no two threads write a row. */
void scatter_add_rows(const float *grad, const int64_t *index, float *d_src, int64_t count,
                      int64_t rows, int64_t width, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t first = rows * me / parts, last = rows * (me + 1) / parts;
        memset(d_src + first * width, 0, (size_t)((last - first) * width) * sizeof(float));
        for (int64_t i = 0; i < count; i++) {
            const int64_t r = index[i];
            if (r < first || r >= last) continue;
            float *d = d_src + r * width;
            const float *g = grad + i * width;
#pragma omp simd
            for (int64_t c = 0; c < width; c++) d[c] += g[c];
        }
    }
}
