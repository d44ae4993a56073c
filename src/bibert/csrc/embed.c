/* The embeddings: word (alpha_r * sign bits) + token type + position of each row, every id,
 * type and position checked as it is read.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "bb_internal.h"

/* out[m] = (word[ids[m]] + type[type_ids[m]]) + pos[m % L]. A row whose id is outside
 * [0, V) or whose type is outside [0, T) is written as zeros and flags the call as invalid. */
typedef struct {
    const bb_ops *ops;
    const int64_t *ids, *type_ids;
    int64_t L, H, V, T;
    const uint64_t *word_bits;
    const float *word_alpha, *pos, *type;
    float *out;
    _Atomic int *bad;
    const int64_t *positions; /* [M] or NULL: row m is at position m % L */
    int64_t n_positions;   /* rows of pos */
} embed_args;

/* Prefetches the word bits, alpha and position row of row n (a forward starts with the tables
 * in L3 or memory; word rows are scattered, so the hardware prefetcher does not fetch them).
 * Ids out of range are left alone (embed_rows refuses them). */
#define BB_EMBED_AHEAD 4 /* rows ahead */
static inline void embed_prefetch(const embed_args *args, int64_t n) {
    int64_t id = args->ids[n], at = args->positions ? args->positions[n] : n % args->L, hw = words_of(args->H);
    if ((uint64_t)id < (uint64_t)args->V) {
        __builtin_prefetch(args->word_bits + id * hw);
        __builtin_prefetch(args->word_bits + id * hw + hw - 1);
        __builtin_prefetch(args->word_alpha + id);
    }
    if ((uint64_t)at < (uint64_t)args->n_positions)
        for (int64_t i = 0; i < args->H; i += 16) __builtin_prefetch(args->pos + at * args->H + i);
}

static void embed_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const embed_args *args = (const embed_args *)ctx;
    const int64_t *ids = args->ids, *type_ids = args->type_ids;
    int64_t L = args->L, H = args->H, hw = words_of(args->H);
    const uint64_t *word_bits = args->word_bits;
    const float *word_alpha = args->word_alpha, *pos = args->pos, *type = args->type;
    float *out = args->out;
    (void)tid;
    for (int64_t m = lo; m < hi; m++) {
        if (m + BB_EMBED_AHEAD < hi) embed_prefetch(args, m + BB_EMBED_AHEAD);
        int64_t at = args->positions ? args->positions[m] : m % L;
        if ((uint64_t)ids[m] >= (uint64_t)args->V || (uint64_t)type_ids[m] >= (uint64_t)args->T ||
            (uint64_t)at >= (uint64_t)args->n_positions) {
            memset(out + m * H, 0, (size_t)H * sizeof(float));
            atomic_store_explicit(args->bad, 1, memory_order_relaxed);
            continue;
        }
        const uint64_t *wb = word_bits + ids[m] * hw;
        args->ops->embed.row(wb, word_alpha[ids[m]], type + type_ids[m] * H, pos + at * H, H, out + m * H);
    }
}

/* ids, type_ids [M] (M = B*L); word_bits [V, words(H)], word_alpha [V], pos [P, H], type [T, H];
 * positions [M] (optional; rows of several sequences packed without their padding): each row's
 * position, else row m is at position m % L. Checks: L, V, P, T, H >= 1, L <= P, M a multiple of
 * L, every array given; every id, type id and position in range (else BB_EINVAL, the rows
 * concerned zero). */
int bb_embed(const int64_t *ids, const int64_t *type_ids, int64_t M, int64_t L, const uint64_t *word_bits,
             const float *word_alpha, int64_t V, const float *pos, int64_t P, const float *type, int64_t T,
             int64_t H, float *out, const int64_t *positions) {
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(L) || !dim_ok(V) || !dim_ok(P) || !dim_ok(T) || !dim_ok(H) || L > P || M % L ||
        !elems_ok(V, words_of(H), 1) || !elems_ok(P, H, 1) || !elems_ok(T, H, 1) || !elems_ok(M, H, 1) || !ids ||
        !type_ids || !word_bits || !word_alpha || !pos || !type || !out)
        return BB_EINVAL;
    _Atomic int bad = 0;
    embed_args args = {bb_ops_active(), ids, type_ids, L, H, V, T, word_bits, word_alpha, pos, type, out, &bad,
                       positions, P};
    bb_parallel_for(M, rows_grain(M, H, 16384), embed_rows, &args);
    return atomic_load(&bad) ? BB_EINVAL : BB_OK;
}
