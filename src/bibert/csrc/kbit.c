/* k-bit activations, bit-serially (docs/packed_format.md, "Multi-bit activations"): the
 * student's quantizer into bit-planes (the Linear on them is linear.c's, with the k-bit
 * epilogue), the GELU before the FFN-out input, and Bi-Attention on k-bit levels.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bb_internal.h"

/* ------------------------------------------------------------------------------------ */
/* the quantizer                                                                         */

/* The student's k-bit quantizer of one tensor (quantize_activation / quantize_symmetric in
 * bibert/quantizers.py), on the M x C values at x (row stride ldx):
 *   clip  c = max(min(max |x|, fl(clip_std * std(x))), 1e-8)   (NaN if std is)
 *   step  = fl(c / Q),  Q = 2^(bits-1) - 1
 *   level = rint(clamp(x, -c, c) / step)   (half to even) in [-Q, Q]
 * std is the unbiased standard deviation: the mean of the double sum rounded to float32, the
 * squared deviations summed in double (8 partial sums by column % 8, rows in order), the
 * square root rounded to float32, which is what torch computes for a float32 tensor. A NaN
 * value, or a non-finite step, gives level 0. */

typedef struct {
    const bb_ops *ops;
    quantize_args q;
} quantize_job;

static void quantize_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const quantize_job *job = (const quantize_job *)ctx;
    for (int64_t m = lo; m < hi; m++) job->ops->kbit.pack_row(&job->q, m);
    (void)tid;
}

/* Quantizes the M x C floats at x (row stride ldx) to bits-bit levels as the student does
 * (one clip for the whole tensor) and writes their bit-planes for bb_linear_kbit and
 * bb_biattention_kbit: plane b of row m at out + (m * bits + b) * ldo holds bit b of
 * u = level + Q (padding bits 0). *step_out receives the step; levels (optional, int8 [M, C])
 * the levels. Checks: bits 2 or 4, C >= 1, ldx >= C, ldo >= words(C), x, out, step_out given. */
int bb_quantize_planes(const float *x, int64_t M, int64_t C, int64_t ldx, int bits, float clip_std, uint64_t *out,
                       int64_t ldo, float *step_out, int8_t *levels) {
    if (!count_ok(M) || (bits != 2 && bits != 4)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(C) || !dim_ok(ldx) || ldx < C || !dim_ok(ldo) || ldo < words_of(C) || !elems_ok(M, ldx, 1) ||
        !elems_ok(M * bits, ldo, 1) || !x || !out || !step_out)
        return BB_EINVAL;
    const bb_ops *ops = bb_ops_active();
    float clip = ops->kbit.clip(x, M, C, ldx, clip_std);
    float step = clip / (float)((1 << (bits - 1)) - 1);
    quantize_job job = {ops, {x, C, ldx, ldo, bits, clip, step, out, levels}};
    bb_parallel_for(M, rows_grain(M, C, 16384), quantize_rows, &job);
    *step_out = step;
    return BB_OK;
}

/* ------------------------------------------------------------------------------------ */
/* GELU                                                                                  */

typedef struct {
    const bb_ops *ops;
    const float *x;
    float *y;
    int64_t C;
} gelu_job;

static void gelu_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const gelu_job *job = (const gelu_job *)ctx;
    job->ops->kbit.gelu(job->x + lo * job->C, job->y + lo * job->C, (hi - lo) * job->C);
    (void)tid;
}

/* y = GELU(x) for M x C floats (y may alias x): x * 0.5 * (1 + erf(x / sqrt 2)) in float32
 * (isa/portable.h, gelu_one: the same result on every family). Checks: C >= 1, x and y given. */
int bb_gelu(const float *x, int64_t M, int64_t C, float *y) {
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(C) || !elems_ok(M, C, 1) || !x || !y) return BB_EINVAL;
    gelu_job job = {bb_ops_active(), x, y, C};
    bb_parallel_for(M, rows_grain(M, C, 16384), gelu_rows, &job);
    return BB_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Bi-Attention on k-bit levels                                                          */

typedef struct {
    const bb_ops *ops;
    kattn_args attn;
} kattn_job;

static void kattn_heads(void *ctx, int64_t lo, int64_t hi, int tid) {
    const kattn_job *job = (const kattn_job *)ctx;
    int32_t *scratch = job->attn.scratch + tid * job->attn.scratch_ints;
    for (int64_t h = lo; h < hi; h++) job->ops->kbit.attention_head(&job->attn, h, scratch);
}

/* Bi-Attention on k-bit Q, K and V of one sequence (L rows; H heads of d), from their levels
 * (int8 [L, H*d] each, as bb_quantize_planes gives them); valid [words(L)] key bits:
 *   S_ij      = sum_c nq_ic nk_jc                  (the score's sign: its scale is positive)
 *   BA_ij     = S_ij > 0 and key j valid           (S = 0 gives 0, docs/method.md §3)
 *   count_ic  = sum_j BA_ij nv_jc,   out_ic = fl(count_ic * step_v)
 * all in integers but the last rounding. counts (optional, int32 [L, H*d]) receives the
 * counts. Checks: L, H, d >= 1, ldo >= H*d, every buffer but counts given. */
int bb_biattention_kbit(const int8_t *q, const int8_t *k, const int8_t *v, int64_t L, int64_t H, int64_t d,
                        float step_v, const uint64_t *valid, float *out, int64_t ldo, int32_t *counts) {
    if (!dim_ok(L) || !dim_ok(H) || !dim_ok(d) || !dim_ok(ldo)) return BB_EINVAL;
    int64_t hd = H * d;
    if (hd > BB_MAX_DIM || ldo < hd || !elems_ok(L, ldo, 1) || !elems_ok(L, hd, 1) || !q || !k || !v || !valid ||
        !out)
        return BB_EINVAL;
    int64_t lp = (L + 127) / 128 * 128; /* room for both layouts (int32 [d + 16 + d*lp], or int16 and the list) */
    if (!elems_ok(d + 16, lp, 1)) return BB_EINVAL;
    int64_t scratch_ints = ((d + 15) / 16 * 16 + lp + d * lp + L + 15) / 16 * 16;
    int nthreads = bb_team();
    kattn_job job = {bb_ops_active(), {q, k, v, valid, L, H, d, ldo, step_v, out, counts, scratch_ints, NULL}};
    job.attn.scratch = (int32_t *)aligned_alloc(64, (size_t)(nthreads * scratch_ints) * 4);
    if (!job.attn.scratch) return BB_ENOMEM;
    bb_parallel_for(H, 1, kattn_heads, &job);
    free(job.attn.scratch);
    return BB_OK;
}
