/* V4's compressed KV entries (op kv_compress; semantics: kernels/v4_attention.py's reference)
 * forward and backward. Entry e of row b gathers the `ratio` tokens of its block, starting at
 * start[b, e]: channel c of the entry is the softmax over the block's slots of gate + bias
 * (per channel), times the slots' kv, summed. With overlap (width = 2 dim: CSA) the block's
 * tokens give their channels dim .. 2 dim and, where the entry has a previous block in its
 * document (kind 2), that block's tokens give their channels 0 .. dim as `ratio` more slots
 * (bias rows 0 .. ratio again, channels 0 .. dim). kind 0: no entry (its row of out is 0).
 * The reference gathers the blocks into (B, E, 2 ratio, dim) copies of kv and gate and runs a
 * softmax, a product and a sum over them, each with its backward; here one pass each way over
 * the block's rows, with the softmax's log-normaliser kept per entry and channel.
 * The entries of a row are disjoint blocks, so no two entries write the same gradient element.
 * float32, contiguous: kv, gate (B, T, width), bias (ratio, width), out, lse (B, E, dim).
 * Built by kernels/cpu_build.py, bound by kernels/cpu_kv_compress.py.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "cpu_blocks.h"

#define CHUNK 64 /* channels of an entry held on the stack at a time */

typedef struct {
    int64_t batch, seq, entries, width, dim, ratio;
} Shape;

/* Slot i of an entry (i < ratio: the previous block; then the block itself): the row of its
 * token in kv and gate, and the column of channel 0 in them and in bias' row i % ratio. */
typedef struct {
    int64_t row, column, bias_row;
} Slot;

static int64_t slots_of(const Shape *s, int kind, Slot *slots, int64_t b, int64_t start) {
    const int64_t lead = s->width - s->dim; /* dim where the blocks overlap, else 0 */
    int64_t count = 0;
    if (lead && kind == 2)
        for (int64_t i = 0; i < s->ratio; i++)
            slots[count++] = (Slot){b * s->seq + start - s->ratio + i, 0, i};
    for (int64_t i = 0; i < s->ratio; i++)
        slots[count++] = (Slot){b * s->seq + start + i, lead, i};
    return count;
}

static int64_t chunk_width(int64_t dim, int64_t c0) { return dim - c0 < CHUNK ? dim - c0 : CHUNK; }

/* The gate of slot `sl` at channels c0 .. c0 + cw (its logit: gate + bias) */
static void slot_logits(const float *gate, const float *bias, const Shape *s, const Slot *sl,
                        int64_t c0, int64_t cw, float *z) {
    const float *g = gate + sl->row * s->width + sl->column + c0;
    const float *p = bias + sl->bias_row * s->width + sl->column + c0;
#pragma omp simd
    for (int64_t c = 0; c < cw; c++) z[c] = g[c] + p[c];
}

int kv_compress_forward(const float *kv, const float *gate, const float *bias,
                        const int64_t *start, const uint8_t *kind, float *out, float *lse,
                        int64_t batch, int64_t seq, int64_t entries, int64_t width, int64_t dim,
                        int64_t ratio, int threads) {
    const Shape s = {batch, seq, entries, width, dim, ratio};
    Slot *all = malloc(sizeof(Slot) * (size_t)(2 * ratio * threads));
    if (!all) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t be = 0; be < batch * entries; be++) {
        float *o = out + be * dim, *l = lse + be * dim;
        if (!kind[be]) {
#pragma omp simd
            for (int64_t c = 0; c < dim; c++) o[c] = l[c] = 0.0f;
            continue;
        }
        Slot *slots = all + 2 * ratio * omp_get_thread_num();
        const int64_t count = slots_of(&s, kind[be], slots, be / entries, start[be]);
        float top[CHUNK], sum[CHUNK], acc[CHUNK], z[CHUNK];
        for (int64_t c0 = 0; c0 < dim; c0 += CHUNK) {
            const int64_t cw = chunk_width(dim, c0);
            for (int64_t c = 0; c < cw; c++) top[c] = -INFINITY, sum[c] = acc[c] = 0.0f;
            for (int64_t i = 0; i < count; i++) {
                slot_logits(gate, bias, &s, slots + i, c0, cw, z);
#pragma omp simd
                for (int64_t c = 0; c < cw; c++) top[c] = z[c] > top[c] ? z[c] : top[c];
            }
            for (int64_t i = 0; i < count; i++) {
                slot_logits(gate, bias, &s, slots + i, c0, cw, z);
                const float *v = kv + slots[i].row * width + slots[i].column + c0;
#pragma omp simd
                for (int64_t c = 0; c < cw; c++) {
                    const float w = exp_nonpositive(z[c] - top[c]);
                    sum[c] += w;
                    acc[c] += w * v[c];
                }
            }
            for (int64_t c = 0; c < cw; c++) {
                o[c0 + c] = acc[c] / sum[c];
                l[c0 + c] = top[c] + logf(sum[c]);
            }
        }
    }
    free(all);
    return 0;
}

/* With w_i = exp(z_i - lse): d_kv_i = w_i dout, d_z_i = w_i dout (kv_i - out) (the softmax's
 * gradient, out being the weighted sum), which is gate's gradient and, summed over the
 * entries, the bias'. d_kv and d_gate are zero where no entry reads; d_bias is each thread's
 * double sum, then the threads' in order. Returns 0, or -1 where scratch could not be
 * allocated. */
int kv_compress_backward(const float *dout, const float *kv, const float *gate,
                         const float *bias, const int64_t *start, const uint8_t *kind,
                         const float *out, const float *lse, float *d_kv, float *d_gate,
                         float *d_bias, int64_t batch, int64_t seq, int64_t entries,
                         int64_t width, int64_t dim, int64_t ratio, int threads) {
    const Shape s = {batch, seq, entries, width, dim, ratio};
    const int64_t bias_size = ratio * width;
    double **partials = calloc((size_t)threads, sizeof(double *));
    Slot *all = malloc(sizeof(Slot) * (size_t)(2 * ratio * threads));
    int failed = !partials || !all;
    if (!failed) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < batch * seq; r++) {
            float *a = d_kv + r * width, *g = d_gate + r * width;
#pragma omp simd
            for (int64_t c = 0; c < width; c++) a[c] = g[c] = 0.0f;
        }
#pragma omp parallel num_threads(threads)
        {
            double *sums = calloc((size_t)bias_size, sizeof(double));
            partials[omp_get_thread_num()] = sums;
            if (!sums) {
#pragma omp atomic write
                failed = 1;
            }
            Slot *slots = all + 2 * ratio * omp_get_thread_num();
            float z[CHUNK];
#pragma omp for schedule(static)
            for (int64_t be = 0; be < batch * entries; be++) {
                if (!kind[be] || !sums) continue;
                const int64_t count = slots_of(&s, kind[be], slots, be / entries, start[be]);
                const float *d = dout + be * dim, *o = out + be * dim, *l = lse + be * dim;
                for (int64_t i = 0; i < count; i++) {
                    const Slot *sl = slots + i;
                    const int64_t at = sl->row * width + sl->column;
                    double *db = sums + sl->bias_row * width + sl->column;
                    for (int64_t c0 = 0; c0 < dim; c0 += CHUNK) {
                        const int64_t cw = chunk_width(dim, c0);
                        slot_logits(gate, bias, &s, sl, c0, cw, z);
                        const float *v = kv + at + c0;
                        float *dv = d_kv + at + c0, *dg = d_gate + at + c0;
#pragma omp simd
                        for (int64_t c = 0; c < cw; c++) {
                            const float w = exp_nonpositive(z[c] - l[c0 + c]);
                            const float dz = w * d[c0 + c] * (v[c] - o[c0 + c]);
                            dv[c] = w * d[c0 + c];
                            dg[c] = dz;
                            db[c0 + c] += (double)dz;
                        }
                    }
                }
            }
        }
    }
    if (!failed) add_thread_sums(partials, threads, 0, bias_size, d_bias);
    if (partials)
        for (int i = 0; i < threads; i++) free(partials[i]);
    free(partials);
    free(all);
    return failed ? -1 : 0;
}
