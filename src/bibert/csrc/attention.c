/* Bi-Attention entirely in bits, per head (docs/packed_format.md):
 *   A_ij = d - 2 popcount(q_i XOR k_j),  BA_ij = A_ij > 0 and key j valid (or an elastic limit)
 *   c_ic = popcount(BA_i) - 2 popcount(BA_i AND vneg_c),  bit = c < 0
 * Two phases on the pool: each head's bits gathered into the kernels' layouts (keys word-major,
 * values transposed), then each query row through the active family's kernels.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bb_internal.h"

typedef struct {
    attn_args *attn;
    const bb_ops *ops;
    const uint64_t *qkv;
    int64_t ldq, q_off, k_off, v_off;
    int by_row;             /* every head of a row at once (the family's row_d64 kernel) */
    int64_t q_rows;         /* query rows of each sequence computed: its first q_rows */
    uint64_t *scratch;      /* [threads, scratch_words]: ba [H, lw], ctx_bits [dw], popcounts [lp] of a relative row */
    int64_t scratch_words;
} attn_job;

static void attn_gather_heads(void *ctx, int64_t lo, int64_t hi, int tid) {
    const attn_job *j = (const attn_job *)ctx;
    const attn_args *attn = j->attn;
    int64_t H = attn->H, L = attn->L, d = attn->d, dw = attn->dw, lp = attn->lp;
    /* heads of whole words (offsets and d multiples of 64): plain word copies */
    int whole = ((j->q_off | j->k_off | j->v_off | d) & 63) == 0;
    (void)tid;
    for (int64_t bh = lo; bh < hi; bh++) {
        int64_t b = bh / H, h = bh % H;
        uint64_t *qh = (uint64_t *)attn->q + bh * L * dw, *kh = (uint64_t *)attn->kt + bh * dw * lp;
        uint64_t *vh = (uint64_t *)attn->vt + bh * attn->lw * attn->dp;
        const uint64_t *rows = j->qkv + b * L * j->ldq;
        for (int64_t x = 0; x < dw; x++) /* keys past L */
            for (int64_t i = L; i < lp; i++) kh[x * lp + i] = 0;
        memset(vh, 0, (size_t)(attn->lw * attn->dp) * 8);
        if (whole) {
            int64_t qw = j->q_off / 64 + h * dw, kw = j->k_off / 64 + h * dw;
            for (int64_t i = 0; i < L; i++) {
                const uint64_t *row = rows + i * j->ldq;
                for (int64_t x = 0; x < dw; x++) {
                    qh[i * dw + x] = row[qw + x];
                    kh[x * lp + i] = row[kw + x];
                }
            }
        } else {
            for (int64_t i = 0; i < L; i++) {
                const uint64_t *row = rows + i * j->ldq;
                for (int64_t x = 0; x < dw; x++) {
                    int nb = d - 64 * x >= 64 ? 64 : (int)(d - 64 * x);
                    qh[i * dw + x] = get_bits64(row, j->q_off + h * d + 64 * x, nb);
                    kh[x * lp + i] = get_bits64(row, j->k_off + h * d + 64 * x, nb);
                }
            }
        }
        uint64_t blk[64] __attribute__((aligned(64)));
        for (int64_t w = 0; w < attn->lw; w++)
            for (int64_t x = 0; x < dw; x++) {
                int nb = d - 64 * x >= 64 ? 64 : (int)(d - 64 * x);
                int n = L - 64 * w < 64 ? (int)(L - 64 * w) : 64;
                const uint64_t *row = rows + 64 * w * j->ldq;
                for (int t = 0; t < n; t++, row += j->ldq)
                    blk[t] = whole ? row[j->v_off / 64 + h * dw + x] : get_bits64(row, j->v_off + h * d + 64 * x, nb);
                for (int t = n; t < 64; t++) blk[t] = 0;
                j->ops->attention.transpose64(blk);
                for (int c = 0; c < nb; c++) vh[w * attn->dp + 64 * x + c] = blk[c];
            }
    }
}

static void attn_query_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const attn_job *j = (const attn_job *)ctx;
    const attn_args *attn = j->attn;
    int64_t H = attn->H, L = attn->L, d = attn->d, ldo = attn->ldo;
    uint64_t *ba = j->scratch + tid * j->scratch_words, *ctx_bits = ba + H * attn->lw;
    int64_t *popcounts = attn->rel ? (int64_t *)(ctx_bits + attn->dw) : NULL;
    for (int64_t k = lo; k < hi; k++) { /* item k: query row i of sequence b, row r of the batch */
        int64_t b = k / j->q_rows, i = k % j->q_rows, r = b * L + i;
        if (j->by_row) {
            j->ops->attention.row_d64(attn, r, ba);
            continue;
        }
        uint64_t *orow = attn->out + r * ldo;
        for (int64_t x = 0; x < ldo; x++) orow[x] = 0;
        for (int64_t h = 0; h < H; h++) j->ops->attention.scores(attn, b * H + h, i, ba + h * attn->lw, popcounts);
        for (int64_t h = 0; h < H; h++) {
            j->ops->attention.context(attn, b * H + h, ba + h * attn->lw, ctx_bits,
                                      attn->counts ? attn->counts + r * H * d + h * d : NULL,
                                      attn->thr ? attn->thr + h * d : NULL);
            for (int64_t x = 0; x < attn->dw; x++) {
                int nb = d - 64 * x >= 64 ? 64 : (int)(d - 64 * x);
                or_bits64(orow, h * d + 64 * x, nb, ctx_bits[x]);
            }
        }
    }
}

/* Bi-Attention of B sequences of L rows. qkv: bit rows [B*L, ldq] holding Q, K and V
 * (hidden = H*d bits each) at bit offsets q_off, k_off, v_off. valid: [B, ceil(L/64)] key
 * bits (1 = real token). BA_ij = A_ij > 0, or with lim [H] (elastic Bi-Attention: a per-head
 * threshold on the scores, turned into an integer) popcount(q_i XOR k_j) < lim_h, or with rel
 * [H, d + 1] (elastic Bi-Attention relative to each query's best key: a per-head margin below
 * the row maximum, turned into integers) popcount(q_i XOR k_j) < rel[h][p_i], p_i the smallest
 * popcount of row i over its real keys (a row without one attends to nothing); every limit in
 * [0, d + 1], lim and rel not both given. out: context sign bits [B*L, ldo], bit h*d+c of row =
 * (count < 0), or with thresholds t [H*d] (elastic binarization) !(count - t[h*d+c] >= 0) in
 * float32. counts (optional): the integer context [B*L, H*d]. Checks: L, H, d >= 1, each of Q,
 * K, V (H*d bits from its offset) inside a row of ldq words, ldo >= words(H*d), qkv, valid and
 * out given. Returns BB_OK, BB_EINVAL or BB_ENOMEM. */

/* the score limits of Bi-Attention (H, d >= 1, H * d in range): each of lim [H] and rel [H, d + 1]
 * in [0, d + 1], not both given */
int limits_ok(int64_t H, int64_t d, const int64_t *lim, const int64_t *rel) {
    if (lim && rel) return 0;
    for (int64_t h = 0; lim && h < H; h++)
        if (lim[h] < 0 || lim[h] > d + 1) return 0;
    for (int64_t n = 0; rel && n < H * (d + 1); n++)
        if (rel[n] < 0 || rel[n] > d + 1) return 0;
    return 1;
}

int bb_biattention(const uint64_t *qkv, int64_t ldq, int64_t q_off, int64_t k_off, int64_t v_off, int64_t B,
                   int64_t L, int64_t H, int64_t d, const uint64_t *valid, uint64_t *out, int64_t ldo,
                   int32_t *counts, const float *t, const int64_t *lim, const int64_t *rel) {
    return biattention(qkv, ldq, q_off, k_off, v_off, B, L, H, d, valid, out, ldo, counts, t, lim, rel, 1, L);
}

/* bb_biattention, checking the limits' values only with check_limits (bb_encoder checks them once),
 * on the first q_rows query rows of each sequence (1 to L; the other rows of out are not written) */
int biattention(const uint64_t *qkv, int64_t ldq, int64_t q_off, int64_t k_off, int64_t v_off, int64_t B, int64_t L,
                int64_t H, int64_t d, const uint64_t *valid, uint64_t *out, int64_t ldo, int32_t *counts,
                const float *t, const int64_t *lim, const int64_t *rel, int check_limits, int64_t q_rows) {
    BB_STEP_CLOCK(clock);
    if (!count_ok(B)) return BB_EINVAL;
    if (B == 0) return BB_OK;
    if (!dim_ok(L) || !dim_ok(H) || !dim_ok(d) || !dim_ok(ldq) || !dim_ok(ldo) || !qkv || !valid || !out)
        return BB_EINVAL;
    int64_t hd = H * d, row_bits = ldq * 64;
    if (hd > BB_MAX_DIM || ldo < words_of(hd) || !elems_ok(B, L, ldq) || !elems_ok(B, L, ldo) ||
        (counts && !elems_ok(B, L, hd)))
        return BB_EINVAL;
    if (q_off < 0 || k_off < 0 || v_off < 0 || q_off > row_bits - hd || k_off > row_bits - hd ||
        v_off > row_bits - hd)
        return BB_EINVAL;
    int64_t dw_ = words_of(d), lw_ = words_of(L);
    if (!elems_ok(B * H, L, dw_) || !elems_ok(B * H, dw_, lw_ * 64) || !elems_ok(B * H, lw_, (d + 7) / 8 * 8))
        return BB_EINVAL;
    if (lim && rel) return BB_EINVAL;
    if (q_rows < 1 || q_rows > L) return BB_EINVAL;
    if (check_limits && !limits_ok(H, d, lim, rel)) return BB_EINVAL;
    attn_args attn;
    attn.B = B; attn.L = L; attn.H = H; attn.d = d;
    attn.dw = words_of(d);
    attn.lw = words_of(L);
    attn.lp = attn.lw * 64;
    attn.dp = (d + 7) / 8 * 8;
    int64_t nq = B * H * L * attn.dw, nk = B * H * attn.dw * attn.lp, nv = B * H * attn.lw * attn.dp;
    int64_t np = rel ? B * attn.lp : 0;
    uint64_t *buf = (uint64_t *)aligned_alloc(64, (size_t)((nq + nk + nv + np) * 8 + 63) / 64 * 64);
    if (!buf) return BB_ENOMEM;
    uint64_t *qb = buf, *kb = buf + nq, *vb = buf + nq + nk;
    int64_t *pad = rel ? (int64_t *)(vb + nv) : NULL;
    for (int64_t b = 0; rel && b < B; b++)
        for (int64_t w = 0; w < attn.lw; w++)
            for (int j = 0; j < 64; j++)
                pad[(b * attn.lw + w) * 64 + j] = (valid[b * attn.lw + w] >> j) & 1 ? 0 : d + 1;
    attn.pad = pad;
    attn.q = qb; attn.kt = kb; attn.vt = vb; attn.valid = valid;
    attn.out = out; attn.ldo = ldo; attn.counts = counts; attn.thr = t;
    attn.lim = lim;
    attn.rel = rel;

    const bb_ops *ops = bb_ops_active();
    attn_job job = {&attn, ops, qkv, ldq, q_off, k_off, v_off, ops->attention.row_d64 && d == 64 && !rel, q_rows, NULL,
                    (H * attn.lw + attn.dw + (rel ? attn.lp : 0) + 7) / 8 * 8};
    /* phase 1: per (b, h), gather the head's bits into the layouts above */
    bb_parallel_for(B * H, 1, attn_gather_heads, &job);
    BB_STEP_MARK(clock, BB_STEP_GATHER);
    /* phase 2: per query row, every head; each row of `out` is written by one chunk. Scratch
     * per thread, each on its own cache lines. */
    int nthreads = bb_team();
    job.scratch = (uint64_t *)aligned_alloc(64, (size_t)(nthreads * job.scratch_words) * 8);
    if (!job.scratch) {
        free(buf);
        return BB_ENOMEM;
    }
    bb_parallel_for(B * q_rows, 4, attn_query_rows, &job);
    free(job.scratch);
    free(buf);
    BB_STEP_MARK(clock, BB_STEP_ATTENTION);
    return BB_OK;
}
