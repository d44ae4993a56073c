/* k-bit activations, bit-serially (docs/packed_format.md, "Multi-bit activations"): the
 * student's quantizer into bit-planes (the Linear on them is linear.c's, with the k-bit
 * epilogue), the GELU before the FFN-out input, Bi-Attention and softmax attention on k-bit
 * levels, and the whole forward of a 2- or 4-bit model in one call.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bb_internal.h"


/* ------------------------------------------------------------------------------------ */
/* the quantizer                                                                         */

/* The student's k-bit quantizer of one tensor (quantize_activation / quantize_symmetric in
 * bibert/quantizers.py), on the M x C values at x (row stride ldx):
 *   clip  c = max(min(max |x|, fl(clip_std * std(x))), 1e-8)   (NaN if std is)
 *   step  = fl(c / Q),  Q = 2^(bits-1) - 1
 *   level = rint(clamp(x, -c, c) / step)   (half to even) in [-Q, Q]   (kbit_level)
 * std is the unbiased standard deviation: the mean of the double sum rounded to float32, the
 * squared deviations summed in double, the square root rounded to float32, as torch computes it
 * for a float32 tensor. The sums run row by row (each row's in 32 partial sums, column c in sum
 * c % 32, added as a tree: isa/portable.h, row_sum_tree), then the rows' sums in row order: the
 * same order on every kernel family and thread count (a sum in double of float32 values differs
 * from any other order's by far less than a float32 rounding, so the float32 std is torch's). A
 * NaN value (the sum is NaN, so is the clip), or a non-finite step, gives level 0.
 *
 * The squared deviations' sum needs the mean, so a second pass over x; the first pass also sums
 * x^2, from which std_from_squares gets the same float32 std without it nearly always (below). */

/* the float32 std from the sum of squared deviations ss of n values, as torch rounds it: monotone in ss */
static float std_of(double ss, double n) { return (float)sqrt(ss / (n - 1.0)); }

/* The clip from the absolute maximum and the std (a NaN std, as from a NaN or infinite value, gives NaN). */
static float clip_of(float amax, float sd, float clip_std) {
    float scaled = clip_std * sd;
    float clip = scaled != scaled ? NAN : amax < scaled ? amax : scaled;
    if (clip < 1e-8f) clip = 1e-8f;
    return clip;
}

/* The std from the first pass's sums alone, where it is certainly the two-pass value. With S1 and
 * S2 the sums of x and of x^2 (in double; each x^2 is exact) and m the float32 mean, the squared
 * deviations sum to ss = S2 - 2 m S1 + n m^2 exactly; evaluated in double that differs from the
 * two-pass sum by at most e: the two sums' rounding errors, each below gamma = 1.01 (n + 16) u
 * (u = 2^-53) times the magnitudes summed (S2, |m| sum |x| <= |m| sqrt(n S2), ss), and the
 * formula's own roundings, with half again as margin. std_of is monotone, so where it gives one
 * float at ss - e and at ss + e, the two-pass sum gives that float too (*sd, returns 1);
 * otherwise (a sum within e, about 1e-10 of it, of a float32 rounding boundary; a mean large
 * against the std; a NaN or infinite sum) returns 0 and the caller sums the deviations. */
static int std_from_squares(double s1, double s2, double n, double m, float *sd) {
    const double u = 0x1p-53;
    if (!(n >= 2.0 && n <= 0x1p40)) return 0;
    double t2 = 2.0 * m * s1, t3 = n * m * m, ss = (s2 - t2) + t3;
    double gamma = 1.01 * (n + 16.0) * u;
    double e1 = gamma * (s2 + 2.0 * fabs(m) * sqrt(n * s2)) + 4.0 * u * (s2 + fabs(t2) + t3 + fabs(ss));
    double e = 1.5 * (e1 + gamma * (fabs(ss) + e1)) + 4.0 * u * fabs(ss);
    if (!(ss - e >= 0.0 && ss + e < INFINITY)) return 0;
    float lo = std_of(ss - e, n), hi = std_of(ss + e, n);
    if (lo != hi) return 0;
    *sd = lo;
    return 1;
}

/* a float and its bit pattern (ordered as unsigned integers for floats >= 0) */
static float float_of(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static uint32_t bits_of(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

/* q->thr[j - 1] = the least a >= 0 with kbit_level(a) >= j (j = 1 .. Q; NaN where no float reaches
 * j), so that |level(x)| >= j exactly when |x| >= thr[j - 1] (the level is odd and monotone in x).
 * Bisection over the bit patterns, from a bracket of 32 floats around fl((j - 1/2) step) where that
 * holds the threshold (always, for a finite step). And q->inv = fl(fl(1 / step) (1 - 2^-20)): for
 * |x| <= clip, fl(|x| inv) lies below |x| / step by a relative 2^-21 to 2^-19, so below fl(|x| / step)
 * and within (Q + 1) 2^-19 < 1/2 of it; its rounding is |level| or one less (beyond the clip, Q or
 * more). */
static void level_thresholds(quantize_args *q) {
    int Q = (1 << (q->bits - 1)) - 1;
    for (int j = 0; j < 8; j++) q->thr[j] = NAN;
    q->inv = (1.0f / q->step) * (1.0f - 0x1p-20f);
    for (int j = 1; j <= Q && kbit_level(INFINITY, q->clip, q->step, Q) >= j; j++) {
        uint32_t lo = 0, hi = 0x7f800000u; /* kbit_level(lo) < j <= kbit_level(hi) */
        float guess = ((float)j - 0.5f) * q->step;
        if (guess > 0.0f && guess < 1e38f) {
            uint32_t a = bits_of(guess) - 16, b = bits_of(guess) + 16;
            if (kbit_level(float_of(a), q->clip, q->step, Q) < j && kbit_level(float_of(b), q->clip, q->step, Q) >= j)
                lo = a, hi = b;
        }
        while (hi - lo > 1) {
            uint32_t mid = lo + (hi - lo) / 2;
            if (kbit_level(float_of(mid), q->clip, q->step, Q) >= j) hi = mid; else lo = mid;
        }
        q->thr[j - 1] = float_of(hi);
    }
}

/* The quantizer's scratch: two doubles and a float per row. */
typedef struct {
    double *sums; /* [2 M]: row m's sum at 2m, its sum of squares (or of squared deviations) at 2m + 1 */
    float *amax;
} quantize_scratch;

typedef struct {
    const bb_ops *ops;
    const float *x;
    int64_t C, ldx;
    double mean;
    quantize_scratch scratch;
} stats_job;

static void row_sums(void *ctx, int64_t lo, int64_t hi, int tid) {
    const stats_job *job = (const stats_job *)ctx;
    double *s = job->scratch.sums;
    for (int64_t m = lo; m < hi; m++)
        s[2 * m] = job->ops->kbit.row_sum(job->x + m * job->ldx, job->C, job->scratch.amax + m, s + 2 * m + 1);
    (void)tid;
}

static void row_deviations(void *ctx, int64_t lo, int64_t hi, int tid) {
    const stats_job *job = (const stats_job *)ctx;
    for (int64_t m = lo; m < hi; m++)
        job->scratch.sums[2 * m + 1] = job->ops->kbit.row_deviation(job->x + m * job->ldx, job->C, job->mean);
    (void)tid;
}

typedef struct {
    const bb_ops *ops;
    quantize_args q;
} quantize_job;

static void quantize_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const quantize_job *job = (const quantize_job *)ctx;
    for (int64_t m = lo; m < hi; m++) job->ops->kbit.pack_row(&job->q, m);
    (void)tid;
}

/* bb_quantize_planes after its checks (M >= 1): planes (may be NULL) and levels (may be NULL);
 * returns the step. row_mag (may be NULL): the planes in sign-magnitude (bits 0 .. k-2 of |level|,
 * then the sign: the forward's own layout, for the family's BB_OUT_KBIT_SM Linear; the sign bit of
 * a level 0 is x's and counts for nothing), and each row's sum_j |level_j| there. */
static float quantize(const bb_ops *ops, const float *x, int64_t M, int64_t C, int64_t ldx, int bits, float clip_std,
                      uint64_t *planes, int64_t ldo, int8_t *levels, quantize_scratch scratch, int64_t *row_mag) {
    int64_t grain = rows_grain(M, C, 16384);
    stats_job stats = {ops, x, C, ldx, 0.0, scratch};
    bb_parallel_for(M, grain, row_sums, &stats);
    double sum = 0.0, squares = 0.0;
    float amax = 0.0f;
    for (int64_t m = 0; m < M; m++) {
        sum += scratch.sums[2 * m];
        squares += scratch.sums[2 * m + 1];
        if (scratch.amax[m] > amax) amax = scratch.amax[m];
    }
    double n = (double)M * (double)C;
    stats.mean = (double)(float)(sum / n);
    float sd;
    if (!std_from_squares(sum, squares, n, stats.mean, &sd)) {
        bb_parallel_for(M, grain, row_deviations, &stats);
        double ss = 0.0;
        for (int64_t m = 0; m < M; m++) ss += scratch.sums[2 * m + 1];
        sd = std_of(ss, n);
    }
    float clip = clip_of(amax, sd, clip_std);
    quantize_job job = {ops, {x, C, ldx, ldo, bits, clip, clip / (float)((1 << (bits - 1)) - 1), planes, levels,
                              row_mag, {0}, 0.0f}};
    level_thresholds(&job.q);
    bb_parallel_for(M, grain, quantize_rows, &job);
    return job.q.step;
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
    quantize_scratch scratch = {(double *)malloc((size_t)M * 2 * sizeof(double)),
                                (float *)malloc((size_t)M * sizeof(float))};
    if (!scratch.sums || !scratch.amax) {
        free(scratch.sums);
        free(scratch.amax);
        return BB_ENOMEM;
    }
    *step_out = quantize(bb_ops_active(), x, M, C, ldx, bits, clip_std, out, ldo, levels, scratch, NULL);
    free(scratch.sums);
    free(scratch.amax);
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
    void (*head)(const kattn_args *, int64_t, int32_t *) =
        job->attn.grid ? job->ops->kbit.softmax_head : job->ops->kbit.attention_head;
    for (int64_t h = lo; h < hi; h++) head(&job->attn, h, scratch);
}

/* int32 scratch of one thread of the k-bit attention on L keys of H heads of d (room for every
 * layout: int32 [d + 16 + 2 lp + 2 L + d*lp], or int16 or byte keys, the scores and the lists) */
static int64_t kattn_scratch_ints(int64_t L, int64_t d) {
    int64_t lp = (L + 127) / 128 * 128;
    return ((d + 15) / 16 * 16 + 3 * lp + d * lp + 2 * L + 15) / 16 * 16;
}

/* The attention of a k-bit model (bits): Bi-Attention, or softmax attention with the steps of Q,
 * K and V (steps[3]). */
typedef struct {
    int softmax, bits;
    float steps[3];
} kattn_kind;

/* bb_biattention_kbit or bb_softmax_attention_kbit after its checks, on the caller's scratch
 * (bb_team() threads of kattn_scratch_ints): the softmax's score scale fl(s_q s_k), its divisor
 * fl(sqrt d) and the context's step fl(s_v / (2^k - 1)) */
static void kattention(const bb_ops *ops, const int8_t *q, const int8_t *k, const int8_t *v, int64_t L, int64_t H,
                       int64_t d, kattn_kind kind, const uint64_t *valid, float *out, int64_t ldo, int32_t *counts,
                       int32_t *scratch) {
    int grid = kind.softmax ? (1 << kind.bits) - 1 : 0;
    float step = kind.softmax ? kind.steps[2] / (float)grid : kind.steps[2];
    kattn_job job = {ops, {q, k, v, valid, L, H, d, ldo, step, grid, kind.steps[0] * kind.steps[1],
                           (float)sqrt((double)d), out, counts, kattn_scratch_ints(L, d), scratch}};
    bb_parallel_for(H, 1, kattn_heads, &job);
}

/* the checks and scratch of both k-bit attentions' entry points */
static int kattention_checked(const int8_t *q, const int8_t *k, const int8_t *v, int64_t L, int64_t H, int64_t d,
                              kattn_kind kind, const uint64_t *valid, float *out, int64_t ldo, int32_t *counts) {
    if (!dim_ok(L) || !dim_ok(H) || !dim_ok(d) || !dim_ok(ldo)) return BB_EINVAL;
    int64_t hd = H * d;
    if (hd > BB_MAX_DIM || ldo < hd || !elems_ok(L, ldo, 1) || !elems_ok(L, hd, 1) || !q || !k || !v || !valid ||
        !out)
        return BB_EINVAL;
    if (!elems_ok(d + 16, (L + 127) / 128 * 128, 1)) return BB_EINVAL;
    int32_t *scratch = (int32_t *)aligned_alloc(64, (size_t)(bb_team() * kattn_scratch_ints(L, d)) * 4);
    if (!scratch) return BB_ENOMEM;
    kattention(bb_ops_active(), q, k, v, L, H, d, kind, valid, out, ldo, counts, scratch);
    free(scratch);
    return BB_OK;
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
    kattn_kind kind = {0, 0, {0.0f, 0.0f, step_v}};
    return kattention_checked(q, k, v, L, H, d, kind, valid, out, ldo, counts);
}

/* Softmax attention on k-bit Q, K and V of one sequence (docs/packed_format.md, "Softmax
 * attention"; levels and valid as bb_biattention_kbit's, steps of Q, K and V, bits 2 or 4), per
 * head over the valid keys:
 *   S_ij      = sum_c nq_ic nk_jc                               exact
 *   score_ij  = fl(fl(S_ij * fl(step_q * step_k)) / fl(sqrt d))
 *   e_ij      = exp(score_ij - max_j score_ij)                  float32 (isa/portable.h, softmax_exp)
 *   r_ij      = rint(fl(e_ij / sum_j e_ij) * (2^bits - 1))       the sum in a fixed order (softmax_sum_tree)
 *   count_ic  = sum_j r_ij nv_jc,   out_ic = fl(count_ic * fl(step_v / (2^bits - 1)))
 * A query row with no valid key gets 0. Every kernel family computes the same floats in the same
 * order (bit-identical results). counts (optional, int32 [L, H*d]) receives the counts. Checks:
 * bb_biattention_kbit's, bits 2 or 4. */
int bb_softmax_attention_kbit(const int8_t *q, const int8_t *k, const int8_t *v, int64_t L, int64_t H, int64_t d,
                              int bits, float step_q, float step_k, float step_v, const uint64_t *valid, float *out,
                              int64_t ldo, int32_t *counts) {
    if (bits != 2 && bits != 4) return BB_EINVAL;
    kattn_kind kind = {1, bits, {step_q, step_k, step_v}};
    return kattention_checked(q, k, v, L, H, d, kind, valid, out, ldo, counts);
}

/* ------------------------------------------------------------------------------------ */
/* the forward of a 2- or 4-bit model                                                    */

typedef struct {
    const bb_ops *ops;
    const bb_kbit_linear *pooler;
    const bb_kbit_layer *layers;
    int64_t n_layers, H, heads, I, rows;
    float eps;
    int bits, softmax;
    float clip_std;
    const int64_t *start;
    const uint8_t *row_valid;
    float *x, *hidden, *pooled;
    int64_t max_len;  /* the longest sequence: the workspaces are laid out for it */
    char *ws;         /* a workspace (kbit_workspace_at) per thread tid at ws + tid * ws_bytes */
    size_t ws_bytes;
    _Atomic int rc;
} kforward_job;

/* one k-bit Linear of the forward: M rows of planes (their step; row_mag: sign-magnitude planes'
 * row sums, or NULL) into out [M, N] */
static void klinear(const kforward_job *j, const bb_kbit_linear *lin, const uint64_t *planes, const int64_t *row_mag,
                    int64_t M, int64_t K, int64_t N, float step, const float *residual, float *out, int gelu) {
    linear_kbit_run(planes, M, words_of(K), K, lin->w, N, j->bits, step, lin->alpha, lin->bias, lin->count_offset,
                    residual, out, gelu, row_mag);
}

/* The buffers of one sequence of L rows. */
typedef struct {
    uint64_t *planes;     /* [L * bits, words(max(H, I))] the next Linear's input */
    int32_t *kattn;       /* the attention's scratch */
    float *qkv, *ctx, *y, *a, *g; /* [L, 3H], [L, H] x 3, [L, I] */
    int8_t *levels;       /* [3, L, H] the levels of Q, K and V */
    int64_t *row_mag;     /* [L] sign-magnitude planes: each row's sum_j |level_j| */
    uint64_t *valid;      /* [words(L)] key bits */
    quantize_scratch scratch;
} kbit_workspace;

/* the next `count` items of `size` bytes at offset *used of base (64-byte aligned); NULL while
 * base is (the sizes are being added up) */
static void *carve(char *base, size_t *used, int64_t count, size_t size) {
    size_t at = *used;
    *used += ((size_t)count * size + 63) / 64 * 64;
    return base ? base + at : NULL;
}

/* lays the workspace out at base (NULL: only its size); returns its size in bytes */
static size_t kbit_workspace_at(kbit_workspace *w, char *base, int64_t L, int64_t H, int64_t I, int64_t bits,
                                int64_t kattn_ints) {
    size_t used = 0;
    int64_t pw = words_of(H) > words_of(I) ? words_of(H) : words_of(I);
    w->planes = (uint64_t *)carve(base, &used, L * bits * pw, 8);
    w->kattn = (int32_t *)carve(base, &used, kattn_ints, 4);
    w->qkv = (float *)carve(base, &used, L * 3 * H, 4);
    w->ctx = (float *)carve(base, &used, L * H, 4);
    w->y = (float *)carve(base, &used, L * H, 4);
    w->a = (float *)carve(base, &used, L * H, 4);
    w->g = (float *)carve(base, &used, L * I, 4);
    w->levels = (int8_t *)carve(base, &used, 3 * L * H, 1);
    w->row_mag = (int64_t *)carve(base, &used, L, 8);
    w->valid = (uint64_t *)carve(base, &used, words_of(L), 8);
    w->scratch.sums = (double *)carve(base, &used, 2 * L, 8);
    w->scratch.amax = (float *)carve(base, &used, L, 4);
    return used;
}

/* Sequence s through every layer and the pooler: each quantizer's clip is over the sequence's
 * own rows (what the student computes for a batch of one). */
static void kbit_sequence(const kforward_job *j, int64_t s, int tid) {
    const bb_ops *ops = j->ops;
    int64_t H = j->H, I = j->I, r0 = j->start[s], L = j->start[s + 1] - r0, d = H / j->heads;
    int64_t hw = words_of(H), iw = words_of(I);
    kbit_workspace w;
    kbit_workspace_at(&w, j->ws + (size_t)tid * j->ws_bytes, j->max_len, H, I, j->bits,
                      (int64_t)bb_team() * kattn_scratch_ints(j->max_len, d));
    uint64_t *planes = w.planes, *valid = w.valid;
    float *qkv = w.qkv, *ctx = w.ctx, *y = w.y, *a = w.a, *g = w.g;
    int8_t *levels = w.levels;
    quantize_scratch scratch = w.scratch;
    /* the planes in sign-magnitude where the family has that Linear: k - 1 popcounts a word, not k */
    int64_t *mag = ops->linear.block[BB_OUT_KBIT_SM] ? w.row_mag : NULL;
    float *x = j->x + r0 * H;
    memset(valid, 0, (size_t)words_of(L) * 8);
    for (int64_t i = 0; i < L; i++) valid[i >> 6] |= (uint64_t)(j->row_valid[r0 + i] != 0) << (i & 63);
    float step = quantize(ops, x, L, H, H, j->bits, j->clip_std, planes, hw, NULL, scratch, mag);
    int rc = BB_OK;
    for (int64_t l = 0; l < j->n_layers && !rc; l++) {
        const bb_kbit_layer *p = j->layers + l;
        klinear(j, &p->qkv, planes, mag, L, H, 3 * H, step, NULL, qkv, 0);
        kattn_kind kind = {j->softmax, j->bits, {0.0f, 0.0f, 0.0f}};
        for (int64_t t = 0; t < 3; t++) /* Q, K and V, each its own tensor */
            kind.steps[t] = quantize(ops, qkv + t * H, L, H, 3 * H, j->bits, j->clip_std, NULL, hw,
                                     levels + t * L * H, scratch, NULL);
        kattention(ops, levels, levels + L * H, levels + 2 * L * H, L, j->heads, d, kind, valid, ctx, H, NULL,
                   w.kattn);
        step = quantize(ops, ctx, L, H, H, j->bits, j->clip_std, planes, hw, NULL, scratch, mag);
        klinear(j, &p->ao, planes, mag, L, H, H, step, x, y, 0);
        rc = bb_layernorm(y, L, H, p->ln1_g, p->ln1_b, j->eps, a, NULL, 0, NULL);
        if (rc) break;
        step = quantize(ops, a, L, H, H, j->bits, j->clip_std, planes, hw, NULL, scratch, mag);
        klinear(j, &p->fi, planes, mag, L, H, I, step, NULL, g, 1); /* GELU(FFN in) */
        step = quantize(ops, g, L, I, I, j->bits, j->clip_std, planes, iw, NULL, scratch, mag);
        klinear(j, &p->fo, planes, mag, L, I, H, step, a, y, 0);
        rc = bb_layernorm(y, L, H, p->ln2_g, p->ln2_b, j->eps, x, NULL, 0, NULL);
        if (j->hidden) memcpy(j->hidden + (l + 1) * j->rows * H + r0 * H, x, (size_t)(L * H) * sizeof(float));
        if (l + 1 < j->n_layers) step = quantize(ops, x, L, H, H, j->bits, j->clip_std, planes, hw, NULL, scratch, mag);
    }
    if (!rc) { /* the pooler on the first row, quantized alone */
        step = quantize(ops, x, 1, H, H, j->bits, j->clip_std, planes, hw, NULL, scratch, mag);
        klinear(j, j->pooler, planes, mag, 1, H, H, step, NULL, j->pooled + s * H, 0);
    }
    if (rc) atomic_store((_Atomic int *)&j->rc, rc);
}

static void kbit_sequences(void *ctx, int64_t lo, int64_t hi, int tid) {
    for (int64_t s = lo; s < hi; s++) kbit_sequence((const kforward_job *)ctx, s, tid);
}

/* The forward of a 2- or 4-bit model (bits) short of the classifier: the embeddings of each row
 * and their LayerNorm into x [rows, H] (as bb_forward: row m of sequence s at position
 * positions[m], or m - start[s] when positions is NULL; m's pooler and thresholds are not read),
 * then each sequence alone (what the student computes for a batch of one) through the n_layers
 * layers: every Linear's input quantized (one clip per tensor: the sequence's rows), Q, K and V
 * quantized each on its own for the k-bit attention (attention: BB_ATTENTION_BI, Bi-Attention,
 * or BB_ATTENTION_SOFTMAX, softmax attention), GELU on FFN-in's output; then the
 * pooler on its first row, quantized alone, into pooled [n_seq, H] before the tanh. row_valid
 * [rows] marks the rows that are keys. hidden (optional): [n_layers + 1, rows, H], the
 * embeddings' output, then each layer's. Each step computes what the entry point of that step
 * (bb_quantize_planes, bb_linear_kbit, bb_biattention_kbit or bb_softmax_attention_kbit, bb_gelu,
 * bb_layernorm) computes on its own. With at least as many sequences as threads, each thread runs
 * whole sequences; otherwise each step splits across the threads. Checks: bb_forward's (but the
 * pooler's and the layers' pointers are those of the k-bit structs), bits 2 or 4, attention one
 * of the two. */
int bb_forward_kbit(const bb_model *m, const bb_kbit_linear *pooler, const bb_kbit_layer *layers, int64_t n_layers,
                    int64_t n_seq, const int64_t *start, int64_t H, int64_t heads, int64_t I, float eps, int bits,
                    int attention, float clip_std, const int64_t *ids, const int64_t *type_ids, const int64_t *positions,
                    const uint8_t *row_valid, float *x, float *hidden, float *pooled) {
    if (!count_ok(n_layers) || !count_ok(n_seq) || (bits != 2 && bits != 4) ||
        (attention != BB_ATTENTION_BI && attention != BB_ATTENTION_SOFTMAX))
        return BB_EINVAL;
    if (n_seq == 0) return BB_OK;
    if (!m || !pooler || !ids || !type_ids || !pooled || !row_valid || !x || !start || start[0] != 0 ||
        (!layers && n_layers) || !m->word_bits || !m->word_alpha || !m->pos || !m->type || !m->ln_g || !m->ln_b ||
        !pooler->w || !pooler->alpha || !pooler->bias || !pooler->count_offset || !dim_ok(H) || !dim_ok(heads) ||
        !dim_ok(I) || H % heads)
        return BB_EINVAL;
    for (int64_t s = 0; s < n_seq; s++)
        if (start[s + 1] <= start[s] || start[s + 1] - start[s] > BB_MAX_DIM) return BB_EINVAL;
    int64_t rows = start[n_seq];
    if (!elems_ok(rows, 3 * H, 1) || !elems_ok(rows, I, 1) || !elems_ok(n_seq, H, 1) ||
        (hidden && !elems_ok(n_layers + 1, rows, H)) || !elems_ok(H / heads + 16, (rows + 127) / 128 * 128, 1))
        return BB_EINVAL;
    for (int64_t l = 0; l < n_layers; l++) {
        const bb_kbit_layer *p = layers + l;
        const bb_kbit_linear *lins[] = {&p->qkv, &p->ao, &p->fi, &p->fo};
        for (int i = 0; i < 4; i++)
            if (!lins[i]->w || !lins[i]->alpha || !lins[i]->bias || !lins[i]->count_offset) return BB_EINVAL;
        if (!p->ln1_g || !p->ln1_b || !p->ln2_g || !p->ln2_b) return BB_EINVAL;
    }
    int64_t *at = NULL;
    if (!positions) { /* each row's position in its sequence */
        at = (int64_t *)malloc((size_t)rows * sizeof(int64_t));
        if (!at) return BB_ENOMEM;
        for (int64_t s = 0; s < n_seq; s++)
            for (int64_t r = start[s]; r < start[s + 1]; r++) at[r] = r - start[s];
        positions = at;
    }
    int rc = bb_embed(ids, type_ids, rows, 1, m->word_bits, m->word_alpha, m->vocab, m->pos, m->positions, m->type,
                      m->types, H, x, positions);
    free(at);
    if (!rc) rc = bb_layernorm(x, rows, H, m->ln_g, m->ln_b, eps, x, NULL, 0, NULL);
    if (rc) return rc;
    if (hidden) memcpy(hidden, x, (size_t)(rows * H) * sizeof(float));
    /* whole sequences per thread, or one at a time with each step split across the threads (their
     * attention scratch in the one workspace); the workspaces allocated once per call */
    int threads = bb_get_threads(), whole = threads > 1 && n_seq >= threads;
    int64_t max_len = 0;
    for (int64_t s = 0; s < n_seq; s++)
        if (start[s + 1] - start[s] > max_len) max_len = start[s + 1] - start[s];
    kbit_workspace w;
    size_t ws_bytes = kbit_workspace_at(&w, NULL, max_len, H, I, bits,
                                        (whole ? 1 : bb_team()) * kattn_scratch_ints(max_len, H / heads));
    char *ws = (char *)aligned_alloc(64, ws_bytes * (size_t)(whole ? threads : 1));
    if (!ws) return BB_ENOMEM;
    kforward_job job = {bb_ops_active(), pooler, layers, n_layers, H, heads, I, rows, eps, bits,
                        attention == BB_ATTENTION_SOFTMAX, clip_std, start,
                        row_valid, x, hidden, pooled, max_len, ws, ws_bytes, BB_OK};
    if (whole)
        bb_parallel_for(n_seq, 1, kbit_sequences, &job);
    else
        kbit_sequences(&job, 0, n_seq, 0);
    free(ws);
    return atomic_load(&job.rc);
}
