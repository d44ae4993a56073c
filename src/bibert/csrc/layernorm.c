/* LayerNorm of rows, with the sign bits of its output for the next binary Linear: rows split
 * across the pool, each block of rows normalised by the active family's kernel.
 */
#include <stdint.h>

#include "bb_internal.h"

/* out = LayerNorm(x) per row (out may alias x); out_bits (if not NULL) = sign bits of out,
 * against the thresholds t when given. */
typedef struct {
    const bb_ops *ops;
    const float *x, *gamma, *beta, *t;
    int64_t H, ldo;
    float eps;
    float *out;
    uint64_t *out_bits;
} layernorm_args;

static void layernorm_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const layernorm_args *args = (const layernorm_args *)ctx;
    int64_t H = args->H, ldo = args->ldo;
    uint64_t *out_bits = args->out_bits;
    (void)tid;
    for (int64_t m = lo; m < hi;) {
        int rows = args->ops->layernorm.rows(args->x + m * H, hi - m, H, args->gamma, args->beta, args->eps,
                                             args->out + m * H, args->t, out_bits ? out_bits + m * ldo : NULL, ldo);
        for (int r = 0; out_bits && r < rows; r++)
            for (int64_t w = words_of(H); w < ldo; w++) out_bits[(m + r) * ldo + w] = 0;
        m += rows;
    }
}

/* t: thresholds [H] of the bits (elastic binarization), or NULL for the signs.
 * Checks: H >= 1, x, g, b, out given; with out_bits, ldo >= words(H). */
int bb_layernorm(const float *x, int64_t M, int64_t H, const float *g, const float *b, float eps, float *out,
                 uint64_t *out_bits, int64_t ldo, const float *t) {
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(H) || !elems_ok(M, H, 1) || !x || !g || !b || !out) return BB_EINVAL;
    if (out_bits && (!dim_ok(ldo) || ldo < words_of(H) || !elems_ok(M, ldo, 1))) return BB_EINVAL;
    layernorm_args args = {bb_ops_active(), x, g, b, t, H, ldo, eps, out, out_bits};
    bb_parallel_for(M, rows_grain(M, H, 8192), layernorm_rows, &args);
    return BB_OK;
}
