/* A whole encoder, and a whole forward (embeddings, encoder, pooler), in one call: the
 * sequences of a batch in groups, each layer's Q/K/V Linear on a group's rows at once, its
 * Bi-Attention per sequence, and the rest of the layer (attention output, LayerNorm, FFN,
 * LayerNorm) in blocks of rows whose float intermediates stay in L2. Built from the other
 * drivers' entry points, so each step gives what that entry point gives on its own. When only
 * the pooler reads the last layer (a forward without hidden states), that layer computes its
 * keys and values for every row and the rest for each sequence's first row only.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bb_internal.h"

/* ------------------------------------------------------------------------------------ */
/* a whole encoder in one call                                                            */

/* Rows of the tail (attention output, LayerNorm, FFN, LayerNorm) handled together: their
 * float intermediates stay in L2 while the layer's weights pass (per-host tuning). */
static int64_t g_tail_rows = 16;
/* Rows of one group: sequences run through all layers together (the Q/K/V Linear sees their
 * rows as one taller matrix); with more groups than threads, groups run in parallel. */
static int64_t g_group_rows = 512;

/* Sets the encoder's row blocking: tail_rows in [1, 4096], group_rows in [1, 2^20]. Any setting
 * gives the same results. Not while a kernel runs. */
int bb_set_encoder_tuning(int64_t tail_rows, int64_t group_rows) {
    if (tail_rows < 1 || tail_rows > 4096 || group_rows < 1 || group_rows > ((int64_t)1 << 20)) return BB_EINVAL;
    g_tail_rows = tail_rows;
    g_group_rows = group_rows;
    return BB_OK;
}

int bb_get_encoder_tuning(int64_t *out) {
    if (!out) return BB_EINVAL;
    out[0] = g_tail_rows;
    out[1] = g_group_rows;
    return BB_OK;
}

/* One group of sequences: rows start[0] .. start[n_seq] of x / xb (sequence s owns rows
 * start[s] .. start[s+1]); row_valid (one byte per row) says which rows are keys. */
typedef struct {
    const bb_layer *layers;
    int64_t n_layers, H, heads, I;
    float eps;
    const int64_t *start;
    const uint8_t *row_valid;
    float *x;
    uint64_t *xb;
    float *hidden;         /* [n_layers, hidden_stride] or NULL */
    int64_t hidden_stride; /* rows x H of the whole batch */
    int first_rows_last;   /* the last layer past its keys and values: each sequence's first row only */
    _Atomic int rc;
} encoder_job;

/* the tail of one layer for the rows of chunks [lo, hi) (tail_rows each) of a group */
typedef struct {
    const bb_layer *p;
    int64_t r0, M, H, I, tail_rows;
    float eps;
    const uint64_t *ctx;
    float *x;
    uint64_t *xb;
    char *scratch;         /* per thread: y, a [tail_rows, H], ab [tail_rows, hw], fb [tail_rows, iw] */
    int64_t scratch_bytes;
    _Atomic int rc;
} tail_job;

static void tail_chunks(void *ctx, int64_t lo, int64_t hi, int tid) {
    tail_job *j = (tail_job *)ctx;
    const bb_layer *p = j->p;
    int64_t H = j->H, I = j->I, hw = words_of(H), iw = words_of(I);
    float *y = (float *)(j->scratch + tid * j->scratch_bytes), *a = y + j->tail_rows * H;
    uint64_t *ab = (uint64_t *)(a + j->tail_rows * H), *fb = ab + j->tail_rows * hw;
    for (int64_t c = lo; c < hi; c++) {
        int64_t r = j->r0 + c * j->tail_rows;
        int64_t n = j->r0 + j->M - r < j->tail_rows ? j->r0 + j->M - r : j->tail_rows;
        float *x = j->x + r * H;
        BB_STEP_CLOCK(clock);
        int rc = bb_linear(j->ctx + r * hw, n, hw, H, p->ao_w, H, p->ao_c0, p->ao_c1, x, y, NULL, 0, NULL, NULL);
        BB_STEP_MARK(clock, BB_STEP_ATTN_OUT);
        if (!rc) rc = bb_layernorm(y, n, H, p->ln1_g, p->ln1_b, j->eps, a, ab, hw, p->ln1_t);
        BB_STEP_MARK(clock, BB_STEP_LN1);
        if (!rc) rc = bb_linear(ab, n, hw, H, p->fi_w, I, NULL, NULL, NULL, NULL, fb, iw, p->fi_thr, p->fi_flip);
        BB_STEP_MARK(clock, BB_STEP_FFN_IN);
        if (!rc) rc = bb_linear(fb, n, iw, I, p->fo_w, H, p->fo_c0, p->fo_c1, a, y, NULL, 0, NULL, NULL);
        BB_STEP_MARK(clock, BB_STEP_FFN_OUT);
        if (!rc) rc = bb_layernorm(y, n, H, p->ln2_g, p->ln2_b, j->eps, x, j->xb + r * hw, hw, p->ln2_t);
        BB_STEP_MARK(clock, BB_STEP_LN2);
        if (rc) atomic_store(&j->rc, rc);
    }
}

/* sequences [s0, s1) of the job as one group, through every layer */
static int encoder_group(encoder_job *j, int64_t s0, int64_t s1) {
    BB_STEP_CLOCK(clock);
    int64_t H = j->H, I = j->I, hw = words_of(H), qw = words_of(3 * H);
    int64_t r0 = j->start[s0], M = j->start[s1] - r0, maxlen = 0;
    for (int64_t s = s0; s < s1; s++)
        if (j->start[s + 1] - j->start[s] > maxlen) maxlen = j->start[s + 1] - j->start[s];
    int64_t tail_rows = g_tail_rows < M ? g_tail_rows : M;
    int nthreads = bb_team();
    int64_t scratch_bytes = ((tail_rows * H * 4 * 2 + tail_rows * (hw + words_of(I)) * 8) + 63) / 64 * 64;
    int64_t n_seq = s1 - s0; /* the first rows, gathered (first_rows_last): x [n_seq, H], their bits, contexts */
    size_t n = (size_t)M * (qw + hw) * 8 + (size_t)words_of(maxlen) * 8 + (size_t)nthreads * scratch_bytes +
               (size_t)n_seq * (H * 4 + 2 * hw * 8) + 64;
    char *buf = (char *)aligned_alloc(64, (n + 63) / 64 * 64);
    if (!buf) return BB_ENOMEM;
    char *scratch = buf;
    float *first_x = (float *)(scratch + nthreads * scratch_bytes);
    uint64_t *first_xb = (uint64_t *)(first_x + n_seq * H), *first_ctx = first_xb + n_seq * hw;
    uint64_t *qkv = first_ctx + n_seq * hw, *ctx = qkv + M * qw, *valid = ctx + M * hw;
    float *x = j->x + r0 * H;
    uint64_t *xb = j->xb + r0 * hw;
    int rc = BB_OK;
    BB_STEP_MARK(clock, BB_STEP_OTHER);
    for (int64_t l = 0; l < j->n_layers && rc == BB_OK; l++) {
        const bb_layer *p = j->layers + l;
        int first_rows = j->first_rows_last && l == j->n_layers - 1;
        rc = bb_linear(xb, M, hw, H, p->qkv_w, 3 * H, NULL, NULL, NULL, NULL, qkv, qw, p->qkv_thr, p->qkv_flip);
        BB_STEP_MARK(clock, BB_STEP_QKV);
        for (int64_t s = s0; s < s1 && !rc; s++) { /* Bi-Attention within each sequence */
            int64_t a0 = j->start[s] - r0, L = j->start[s + 1] - j->start[s];
            for (int64_t w = 0; w < words_of(L); w++) valid[w] = 0;
            for (int64_t i = 0; i < L; i++) valid[i >> 6] |= (uint64_t)(j->row_valid[r0 + a0 + i] != 0) << (i & 63);
            BB_STEP_MARK(clock, BB_STEP_MASK);
            rc = biattention(qkv + a0 * qw, qw, 0, H, 2 * H, 1, L, j->heads, H / j->heads, valid, ctx + a0 * hw, hw,
                             NULL, p->ctx_t, p->score_lim, p->score_rel, 0, first_rows ? 1 : L);
            BB_STEP_RESTART(clock); /* biattention marks its own steps */
        }
        if (rc) break;
        if (first_rows) { /* the tail of each sequence's first row: gathered, computed, put back */
            for (int64_t s = s0; s < s1; s++) {
                int64_t a0 = j->start[s] - r0;
                memcpy(first_ctx + (s - s0) * hw, ctx + a0 * hw, (size_t)hw * 8);
                memcpy(first_x + (s - s0) * H, x + a0 * H, (size_t)H * 4);
            }
            tail_job t = {p, 0, n_seq, H, I, tail_rows < n_seq ? tail_rows : n_seq, j->eps, first_ctx, first_x,
                          first_xb, scratch, scratch_bytes, BB_OK};
            bb_parallel_for((n_seq + t.tail_rows - 1) / t.tail_rows, 1, tail_chunks, &t);
            rc = atomic_load(&t.rc);
            BB_STEP_RESTART(clock); /* tail_chunks marks its steps */
            for (int64_t s = s0; s < s1; s++) {
                int64_t a0 = j->start[s] - r0;
                memcpy(x + a0 * H, first_x + (s - s0) * H, (size_t)H * 4);
                memcpy(xb + a0 * hw, first_xb + (s - s0) * hw, (size_t)hw * 8);
            }
            BB_STEP_MARK(clock, BB_STEP_OTHER);
            continue;
        }
        tail_job t = {p, 0, M, H, I, tail_rows, j->eps, ctx, x, xb, scratch, scratch_bytes, BB_OK};
        bb_parallel_for((M + tail_rows - 1) / tail_rows, 1, tail_chunks, &t);
        rc = atomic_load(&t.rc);
        BB_STEP_RESTART(clock); /* tail_chunks marks its steps */
        if (!rc && j->hidden) memcpy(j->hidden + l * j->hidden_stride + r0 * H, x, (size_t)(M * H) * 4);
        BB_STEP_MARK(clock, BB_STEP_OTHER);
    }
    free(buf);
    BB_STEP_MARK(clock, BB_STEP_OTHER);
    return rc;
}

/* groups [lo, hi), each a whole forward on one thread; group k = sequences gs[k] .. gs[k+1] */
typedef struct {
    encoder_job *job;
    const int64_t *gs;
} groups_job;

static void encoder_groups(void *ctx, int64_t lo, int64_t hi, int tid) {
    groups_job *groups = (groups_job *)ctx;
    (void)tid;
    for (int64_t k = lo; k < hi; k++) {
        int rc = encoder_group(groups->job, groups->gs[k], groups->gs[k + 1]);
        if (rc) atomic_store(&groups->job->rc, rc);
    }
}

/* The checks of bb_encoder (and bb_forward) on its sizes, sequences and layer parameters. */
static int encoder_ok(const bb_layer *layers, int64_t n_layers, int64_t n_seq, const int64_t *start, int64_t H,
                      int64_t heads, int64_t I, const uint8_t *row_valid, const float *x, const uint64_t *xb,
                      int64_t hidden_slots, const float *hidden) {
    if (!start || start[0] != 0 || !dim_ok(H) || !dim_ok(heads) || !dim_ok(I) || H % heads ||
        (!layers && n_layers) || !row_valid || !x || !xb)
        return 0;
    for (int64_t s = 0; s < n_seq; s++)
        if (start[s + 1] <= start[s] || start[s + 1] - start[s] > BB_MAX_DIM) return 0;
    int64_t rows = start[n_seq];
    if (!elems_ok(rows, 3 * H, 1) || !elems_ok(rows, I, 1) || (hidden && !elems_ok(hidden_slots, rows, H)))
        return 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const bb_layer *p = layers + l;
        const void *ptrs[] = {p->qkv_w, p->qkv_thr, p->qkv_flip, p->ao_w, p->ao_c0, p->ao_c1, p->ln1_g, p->ln1_b,
                              p->fi_w, p->fi_thr, p->fi_flip, p->fo_w, p->fo_c0, p->fo_c1, p->ln2_g, p->ln2_b};
        for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
            if (!ptrs[i]) return 0;
        if (!limits_ok(heads, H / heads, p->score_lim, p->score_rel)) return 0;
    }
    return 1;
}

/* bb_encoder after its checks */
static int encoder_run(const bb_layer *layers, int64_t n_layers, int64_t n_seq, const int64_t *start, int64_t H,
                       int64_t heads, int64_t I, float eps, const uint8_t *row_valid, float *x, uint64_t *xb,
                       float *hidden, int first_rows_last) {
    bb_ops_active(); /* the kernel family is chosen here, before the groups' threads ask for it */
    int64_t rows = start[n_seq];
    /* groups of consecutive sequences of about g_group_rows rows, at least as many as threads
     * when there are enough sequences */
    int threads = bb_get_threads();
    int64_t target = g_group_rows;
    if (threads > 1 && n_seq >= threads && (rows + threads - 1) / threads < target)
        target = (rows + threads - 1) / threads;
    int64_t *gs = (int64_t *)malloc((size_t)(n_seq + 1) * sizeof(int64_t));
    if (!gs) return BB_ENOMEM;
    int64_t ng = 0;
    gs[0] = 0;
    for (int64_t s = 0; s < n_seq; s++)
        if (s + 1 == n_seq || start[s + 1] - start[gs[ng]] + (start[s + 2] - start[s + 1]) > target) gs[++ng] = s + 1;
    encoder_job job = {layers, n_layers, H, heads, I, eps, start, row_valid, x, xb, hidden, rows * H, first_rows_last,
                       BB_OK};
    groups_job groups = {&job, gs};
    if (threads > 1 && ng >= threads)
        bb_parallel_for(ng, 1, encoder_groups, &groups);
    else
        encoder_groups(&groups, 0, ng, 0);
    free(gs);
    return atomic_load(&job.rc);
}

/* Runs n_layers encoder layers on n_seq sequences packed row after row: sequence s owns rows
 * start[s] .. start[s+1] of x [rows, H] (float, updated in place) and of its bits xb [rows,
 * words(H)] (updated too); rows = start[n_seq]. A sequence holds only the rows to compute (a
 * padded position need not be a row); row_valid [rows] marks the rows that are keys of their
 * sequence's attention (the others are queries only). hidden (optional): [n_layers, rows, H]
 * receives every layer's output. Sequences run in groups of about g_group_rows rows; with at
 * least as many groups as threads, each thread runs whole groups (no synchronisation inside a
 * forward); otherwise the kernels of each group split their work across the threads. Checks:
 * H, heads, I >= 1, heads divides H, start non-decreasing from 0 with every sequence at least
 * one row, the sizes' products in range, every buffer and every parameter pointer of the
 * n_layers layers given (ctx_t, ln1_t, ln2_t, score_lim and score_rel may be NULL). Returns BB_OK,
 * BB_EINVAL or BB_ENOMEM. */
int bb_encoder(const bb_layer *layers, int64_t n_layers, int64_t n_seq, const int64_t *start, int64_t H,
               int64_t heads, int64_t I, float eps, const uint8_t *row_valid, float *x, uint64_t *xb, float *hidden) {
    if (!count_ok(n_layers) || !count_ok(n_seq)) return BB_EINVAL;
    if (n_seq == 0 || n_layers == 0) return BB_OK;
    if (!encoder_ok(layers, n_layers, n_seq, start, H, heads, I, row_valid, x, xb, n_layers, hidden))
        return BB_EINVAL;
    return encoder_run(layers, n_layers, n_seq, start, H, heads, I, eps, row_valid, x, xb, hidden, 0);
}

/* ------------------------------------------------------------------------------------ */
/* a whole forward in one call: embeddings, encoder, pooler                              */

/* The whole forward short of the classifier: the embeddings of each row (word, token type,
 * position; row m of sequence s at position positions[m], or m - start[s] when positions is
 * NULL) and their LayerNorm into x and its bits xb (against m->ln_t when given), the n_layers
 * encoder layers (bb_encoder), then the pooler on each sequence's first row: its sign bits
 * (against m->pool_t when given) through the float Linear m->pool_w, c0, c1 (H outputs) into
 * pooled [n_seq, H], before the tanh. hidden (optional): [n_layers + 1, rows, H], the
 * embeddings' output, then each layer's. Without hidden only the pooler reads the last layer:
 * past its keys and values, that layer computes each sequence's first row alone (x and xb hold
 * its output there, the layer before's in the other rows). Each step the same kernel as bb_embed, bb_layernorm,
 * bb_encoder, bb_sign_pack and bb_linear run on their own (so the same results). Checks:
 * bb_encoder's, bb_embed's (each id, type and position in range, else BB_EINVAL before any layer
 * runs), and every pointer of m given but the thresholds. Returns BB_OK, BB_EINVAL or BB_ENOMEM. */
int bb_forward(const bb_model *m, const bb_layer *layers, int64_t n_layers, int64_t n_seq, const int64_t *start,
               int64_t H, int64_t heads, int64_t I, float eps, const int64_t *ids, const int64_t *type_ids,
               const int64_t *positions, const uint8_t *row_valid, float *x, uint64_t *xb, float *hidden,
               float *pooled) {
    BB_STEP_CLOCK(clock);
    if (!count_ok(n_layers) || !count_ok(n_seq)) return BB_EINVAL;
    if (n_seq == 0) return BB_OK;
    if (!m || !ids || !type_ids || !pooled || !m->word_bits || !m->word_alpha || !m->pos || !m->type || !m->ln_g ||
        !m->ln_b || !m->pool_w || !m->pool_c0 || !m->pool_c1 ||
        !encoder_ok(layers, n_layers, n_seq, start, H, heads, I, row_valid, x, xb, n_layers + 1, hidden) ||
        !elems_ok(n_seq, H, 1))
        return BB_EINVAL;
    int64_t rows = start[n_seq], hw = words_of(H);
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
    if (!rc) rc = bb_layernorm(x, rows, H, m->ln_g, m->ln_b, eps, x, xb, hw, m->ln_t);
    BB_STEP_MARK(clock, BB_STEP_EMBED);
    if (rc) return rc;
    if (hidden) memcpy(hidden, x, (size_t)(rows * H) * sizeof(float));
    BB_STEP_MARK(clock, BB_STEP_OTHER);
    if (n_layers) rc = encoder_run(layers, n_layers, n_seq, start, H, heads, I, eps, row_valid, x, xb,
                                   hidden ? hidden + rows * H : NULL, !hidden);
    BB_STEP_RESTART(clock); /* the encoder marks its steps */
    if (rc) return rc;
    uint64_t *cls = (uint64_t *)malloc((size_t)(n_seq * hw) * sizeof(uint64_t));
    if (!cls) return BB_ENOMEM;
    for (int64_t s = 0; s < n_seq && !rc; s++) rc = bb_sign_pack(x + start[s] * H, 1, H, H, cls + s * hw, hw, m->pool_t);
    if (!rc) rc = bb_linear(cls, n_seq, hw, H, m->pool_w, H, m->pool_c0, m->pool_c1, NULL, pooled, NULL, 0, NULL, NULL);
    free(cls);
    BB_STEP_MARK(clock, BB_STEP_POOLER);
    return rc;
}
