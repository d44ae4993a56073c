/* Sign packing: the bits of a float matrix, bits[m, j] = x[m, j] < 0 (or, against per-column
 * thresholds, !(x[m, j] - t[j] >= 0)), row by row on the pool.
 */
#include <stdint.h>

#include "bb_internal.h"

typedef struct {
    const bb_ops *ops;
    const float *x, *t;
    int64_t K, ldx, ldo;
    uint64_t *out;
} sign_pack_args;

static void sign_pack_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const sign_pack_args *args = (const sign_pack_args *)ctx;
    for (int64_t m = lo; m < hi; m++) {
        args->ops->pack.row(args->x + m * args->ldx, args->t, args->K, args->out + m * args->ldo);
        for (int64_t w = words_of(args->K); w < args->ldo; w++) args->out[m * args->ldo + w] = 0;
    }
    (void)tid;
}

/* bits[m, j] = x[m, j] < 0, or with thresholds t [K] (may be NULL) !(x[m, j] - t[j] >= 0).
 * Checks: K >= 1, ldx >= K, ldo >= words(K), x and out given (for M > 0). */
int bb_sign_pack(const float *x, int64_t M, int64_t K, int64_t ldx, uint64_t *out, int64_t ldo, const float *t) {
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(K) || !dim_ok(ldx) || ldx < K || !dim_ok(ldo) || ldo < words_of(K) || !elems_ok(M, ldx, 1) ||
        !elems_ok(M, ldo, 1) || !x || !out)
        return BB_EINVAL;
    sign_pack_args args = {bb_ops_active(), x, t, K, ldx, ldo, out};
    bb_parallel_for(M, rows_grain(M, K, 16384), sign_pack_rows, &args);
    return BB_OK;
}
