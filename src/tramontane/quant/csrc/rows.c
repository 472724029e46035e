/*
 * rows.c: reductions over each row of a step's logits: the argmax that greedy decoding takes, the rows
 * split over the threads (the instruction set's argmax_fn per row). Written here, not left to numpy:
 * numpy's argmax reads a 16-row step's 3 MB of logits on one thread, from memory (the head's weights
 * have streamed through the caches since they were written).
 */
#include "kernels.h"

void tram_argmax_rows(const isa_ops *ops, const float *x, long M, long N, int64_t *out, int n_threads) {
    const int nth = M > 1 && n_threads > 1 ? (M < n_threads ? (int)M : n_threads) : 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(static)
#endif
    for (long m = 0; m < M; m++) out[m] = ops->argmax(x + (size_t)m * (size_t)N, N);
}
