/* The portable kernel family: plain C with __builtin_popcountll, for any CPU, and the
 * reference the other families match bit for bit. On x86 a second table holds the popcount-
 * bound kernels (binary Linear, Bi-Attention) compiled for POPCNT; runtime.c picks it where the
 * CPU has the instruction.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "portable.h"

/* ------------------------------------------------------------------------------------ */
/* sign packing: bits[m, j] = x[m, j] < 0                                                */

BB_INLINE void sign_pack_row_plain(const float *x, int64_t K, uint64_t *out) {
    int64_t kw = words_of(K);
    for (int64_t w = 0; w < kw; w++) {
        uint64_t v = 0;
        int64_t n = K - 64 * w < 64 ? K - 64 * w : 64;
        for (int64_t b = 0; b < n; b++) v |= (uint64_t)(x[64 * w + b] < 0.0f) << b;
        out[w] = v;
    }
}

/* With per-channel thresholds t (elastic binarization, docs/method.md §7): the level is
 * sign(x - t), so bit = !(x - t >= 0), the float32 difference and compare the student makes. */
BB_INLINE void sign_pack_row_thr(const float *x, const float *t, int64_t K, uint64_t *out) {
    int64_t kw = words_of(K);
    for (int64_t w = 0; w < kw; w++) {
        uint64_t v = 0;
        int64_t n = K - 64 * w < 64 ? K - 64 * w : 64;
        for (int64_t b = 0; b < n; b++) v |= (uint64_t)!(x[64 * w + b] - t[64 * w + b] >= 0.0f) << b;
        out[w] = v;
    }
}

void sign_pack_row_portable(const float *x, const float *t, int64_t K, uint64_t *out) {
    if (t)
        sign_pack_row_thr(x, t, K, out);
    else
        sign_pack_row_plain(x, K, out);
}

/* ------------------------------------------------------------------------------------ */
/* binary Linear                                                                         */

/* The popcounts of one row block (mr rows) x one panel into tile[r][c]. Rows in pairs, channels
 * in groups of 4: eight independent popcount chains stay in registers (scalar POPCNT issues on
 * several ports), six loads feed eight popcounts. With mr odd, the last pair counts its row
 * twice into tile[mr] (r + 1 <= 5 < BB_MR: inside the tile, and never read). */
BB_INLINE void linear_counts_portable(const linear_args *lin, int64_t r0, int mr, int64_t p,
                                      int64_t (*tile)[BB_PANEL]) {
    int64_t kw = words_of(lin->K);
    const uint64_t *wp = lin->w + p * kw * BB_PANEL;
    for (int r = 0; r < mr; r += 2) {
        const uint64_t *a0 = lin->a + (r0 + r) * lin->lda;
        const uint64_t *a1 = r + 1 < mr ? a0 + lin->lda : a0;
        int64_t *pc0 = tile[r], *pc1 = tile[r + 1];
        for (int c = 0; c < BB_PANEL; c += 4) {
            uint64_t s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
            const uint64_t *w = wp + c;
            for (int64_t k = 0; k < kw; k++, w += BB_PANEL) {
                uint64_t x0 = a0[k], x1 = a1[k];
                uint64_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
                s00 += (uint64_t)__builtin_popcountll(x0 ^ w0);
                s01 += (uint64_t)__builtin_popcountll(x0 ^ w1);
                s02 += (uint64_t)__builtin_popcountll(x0 ^ w2);
                s03 += (uint64_t)__builtin_popcountll(x0 ^ w3);
                s10 += (uint64_t)__builtin_popcountll(x1 ^ w0);
                s11 += (uint64_t)__builtin_popcountll(x1 ^ w1);
                s12 += (uint64_t)__builtin_popcountll(x1 ^ w2);
                s13 += (uint64_t)__builtin_popcountll(x1 ^ w3);
            }
            pc0[c] = (int64_t)s00; pc0[c + 1] = (int64_t)s01; pc0[c + 2] = (int64_t)s02; pc0[c + 3] = (int64_t)s03;
            pc1[c] = (int64_t)s10; pc1[c + 1] = (int64_t)s11; pc1[c + 2] = (int64_t)s12; pc1[c + 3] = (int64_t)s13;
        }
    }
}

/* one row block x one panel: the counts, then the epilogue of kind OUT */
BB_INLINE void linear_block_portable(const linear_args *lin, int64_t r0, int mr, int64_t p, const int OUT) {
    int64_t tile[BB_MR][BB_PANEL];
    linear_counts_portable(lin, r0, mr, p, tile);
    linear_tile_epilogue(lin, r0, mr, p, (const int64_t (*)[BB_PANEL])tile, OUT);
}

/* the ops table's entries: one per output kind, for the target ATTR (plain, or POPCNT) */
#define BB_LINEAR_PORTABLE(name, ATTR, OUT)                                                                   \
    ATTR static void name(const linear_args *lin, int64_t r0, int mr, int64_t p, const uint64_t *prefetch) {  \
        (void)prefetch; /* far from memory-bound */                                                           \
        linear_block_portable(lin, r0, mr, p, OUT);                                                           \
    }
BB_LINEAR_PORTABLE(linear_bits_portable, , BB_OUT_BITS)
BB_LINEAR_PORTABLE(linear_float_portable, , BB_OUT_FLOAT)
BB_LINEAR_PORTABLE(linear_kbit_portable, , BB_OUT_KBIT)
#if BB_X86
#define BB_POPCNT __attribute__((target("popcnt")))
BB_LINEAR_PORTABLE(linear_bits_popcnt, BB_POPCNT, BB_OUT_BITS)
BB_LINEAR_PORTABLE(linear_float_popcnt, BB_POPCNT, BB_OUT_FLOAT)
BB_LINEAR_PORTABLE(linear_kbit_popcnt, BB_POPCNT, BB_OUT_KBIT)
#endif

/* ------------------------------------------------------------------------------------ */
/* LayerNorm (+ sign bits of its output)                                                 */

/* Every kernel family computes each row the same way: 16 partial sums (lane = i % 16, each
 * summed in the order of i), then the lanes added in order; the same for the squared
 * deviations; then out = ((x - mean) * rstd) * gamma + beta. Rows are processed R at a time so
 * that their independent sums overlap (a single row's sum is one chain of dependent adds); each
 * row's own operations, and so its result, do not change with R. */
BB_INLINE void layernorm_block_portable(const float *x, int64_t H, const float *gamma, const float *beta, float eps,
                                        float *out, const int R) {
    float acc[4][16], mean[4], rstd[4];
    for (int r = 0; r < R; r++)
        for (int l = 0; l < 16; l++) acc[r][l] = 0.0f;
    int64_t i = 0;
    for (; i + 16 <= H; i += 16)
        for (int r = 0; r < R; r++)
            for (int l = 0; l < 16; l++) acc[r][l] += x[r * H + i + l];
    for (; i < H; i++)
        for (int r = 0; r < R; r++) acc[r][i & 15] += x[r * H + i];
    for (int r = 0; r < R; r++) {
        float s = 0.0f;
        for (int l = 0; l < 16; l++) s += acc[r][l];
        mean[r] = s / (float)H;
        for (int l = 0; l < 16; l++) acc[r][l] = 0.0f;
    }
    for (i = 0; i + 16 <= H; i += 16)
        for (int r = 0; r < R; r++)
            for (int l = 0; l < 16; l++) {
                float d = x[r * H + i + l] - mean[r];
                acc[r][l] += d * d;
            }
    for (; i < H; i++)
        for (int r = 0; r < R; r++) {
            float d = x[r * H + i] - mean[r];
            acc[r][i & 15] += d * d;
        }
    for (int r = 0; r < R; r++) {
        float v = 0.0f;
        for (int l = 0; l < 16; l++) v += acc[r][l];
        rstd[r] = 1.0f / sqrtf(v / (float)H + eps);
    }
    for (int r = 0; r < R; r++)
        for (i = 0; i < H; i++) out[r * H + i] = (x[r * H + i] - mean[r]) * rstd[r] * gamma[i] + beta[i];
}

/* 4 rows at a time (1 at the end), then the bits of the stored outputs */
static int layernorm_rows_portable(const float *x, int64_t rows, int64_t H, const float *gamma, const float *beta,
                                   float eps, float *out, const float *t, uint64_t *bits, int64_t ldb) {
    int R = rows >= 4 ? 4 : 1;
    if (R == 4)
        layernorm_block_portable(x, H, gamma, beta, eps, out, 4);
    else
        layernorm_block_portable(x, H, gamma, beta, eps, out, 1);
    for (int r = 0; bits && r < R; r++) sign_pack_row_portable(out + r * H, t, H, bits + r * ldb);
    return R;
}

/* ------------------------------------------------------------------------------------ */
/* embeddings: word (alpha_r * sign bits) + token type + position                        */

void embed_row_portable(const uint64_t *word_bits, float alpha, const float *type, const float *pos, int64_t H,
                        float *out) {
    float neg_alpha = -alpha;
    for (int64_t i = 0; i < H; i++) {
        float wv = (word_bits[i >> 6] >> (i & 63)) & 1 ? neg_alpha : alpha;
        out[i] = (wv + type[i]) + pos[i];
    }
}

/* ------------------------------------------------------------------------------------ */
/* Bi-Attention entirely in bits                                                         */

/* In-place transpose of a 64x64 bit matrix: bit c of a[r] <-> bit r of a[c]. */
void transpose64_portable(uint64_t a[64]) {
    uint64_t m = 0x00000000FFFFFFFFULL;
    for (int j = 32; j; j >>= 1, m ^= m << j) {
        for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
            uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
            a[k] ^= t << j;
            a[k | j] ^= t;
        }
    }
}

/* Each query row of each (b, h) in two steps (attention.c): its BA bits, then its context from
 * them. */

/* BA bits of query row i of one (b, h) into ba[lw]; popcounts [lp]: scratch for the row's
 * popcounts (relative rows). */
BB_INLINE void attn_scores_body(const attn_args *attn, int64_t bh, int64_t i, uint64_t *ba, int64_t *popcounts) {
    int64_t b = bh / attn->H;
    const uint64_t *q = attn->q + (bh * attn->L + i) * attn->dw;
    const uint64_t *kt = attn->kt + bh * attn->dw * attn->lp;
    const uint64_t *valid = attn->valid + b * attn->lw;
    if (attn->rel) { /* relative: every popcount first, then the limit of the row's best real key */
        int64_t pmin = attn->d + 1;
        for (int64_t w = 0; w < attn->lw; w++)
            for (int t = 0; t < 64; t++) {
                int64_t j = 64 * w + t, pc = 0;
                for (int64_t x = 0; x < attn->dw; x++) pc += __builtin_popcountll(q[x] ^ kt[x * attn->lp + j]);
                popcounts[j] = pc;
                if (((valid[w] >> t) & 1) && pc < pmin) pmin = pc;
            }
        int64_t lim = relative_limit(attn, bh % attn->H, pmin);
        for (int64_t w = 0; w < attn->lw; w++) {
            uint64_t bits = 0;
            for (int t = 0; t < 64; t++) bits |= (uint64_t)(popcounts[64 * w + t] < lim) << t;
            ba[w] = bits & valid[w];
        }
    } else {
        int64_t lim = attn->lim ? attn->lim[bh % attn->H] : (attn->d + 1) / 2; /* A > 0 <=> 2 pc < d <=> pc < lim */
        for (int64_t w = 0; w < attn->lw; w++) {
            uint64_t bits = 0;
            for (int t = 0; t < 64; t++) {
                int64_t j = 64 * w + t, pc = 0;
                for (int64_t x = 0; x < attn->dw; x++) pc += __builtin_popcountll(q[x] ^ kt[x * attn->lp + j]);
                bits |= (uint64_t)(pc < lim) << t;
            }
            ba[w] = bits & valid[w];
        }
    }
}

/* The context of one row of one (b, h) from its BA bits: bits into ctx_bits[dw], counts (or
 * NULL); t: the head's thresholds (bit = !(count - t >= 0) in float32, as the student compares)
 * or NULL. */
BB_INLINE void attn_context_body(const attn_args *attn, int64_t bh, const uint64_t *ba, uint64_t *ctx_bits,
                                 int32_t *counts, const float *t) {
    const uint64_t *vt = attn->vt + bh * attn->lw * attn->dp;
    int64_t npos = 0;
    for (int64_t w = 0; w < attn->lw; w++) npos += __builtin_popcountll(ba[w]);
    for (int64_t x = 0; x < attn->dw; x++) ctx_bits[x] = 0;
    for (int64_t c = 0; c < attn->d; c++) {
        int64_t neg = 0;
        for (int64_t w = 0; w < attn->lw; w++) neg += __builtin_popcountll(ba[w] & vt[w * attn->dp + c]);
        int64_t count = npos - 2 * neg;
        int bit = t ? !((float)count - t[c] >= 0.0f) : count < 0;
        ctx_bits[c >> 6] |= (uint64_t)bit << (c & 63);
        if (counts) counts[c] = (int32_t)count;
    }
}

static void attn_scores_portable(const attn_args *attn, int64_t bh, int64_t i, uint64_t *ba, int64_t *popcounts) {
    attn_scores_body(attn, bh, i, ba, popcounts);
}

static void attn_context_portable(const attn_args *attn, int64_t bh, const uint64_t *ba, uint64_t *ctx_bits,
                                  int32_t *counts, const float *t) {
    attn_context_body(attn, bh, ba, ctx_bits, counts, t);
}

#if BB_X86
BB_POPCNT void attn_scores_popcnt(const attn_args *attn, int64_t bh, int64_t i, uint64_t *ba, int64_t *popcounts) {
    attn_scores_body(attn, bh, i, ba, popcounts);
}

BB_POPCNT void attn_context_popcnt(const attn_args *attn, int64_t bh, const uint64_t *ba, uint64_t *ctx_bits,
                                   int32_t *counts, const float *t) {
    attn_context_body(attn, bh, ba, ctx_bits, counts, t);
}
#endif

/* ------------------------------------------------------------------------------------ */
/* k-bit activations (kbit.c has the quantizer's formulas)                               */

/* the quantizer's row sums, in row_sum_tree's order (the squares are exact in double) */
double kbit_row_sum_portable(const float *x, int64_t C, float *amax, double *sumsq) {
    double partial[32] = {0}, squares[32] = {0};
    float largest = 0.0f;
    for (int64_t c = 0; c < C; c++) {
        float v = x[c];
        partial[c & 31] += v;
        squares[c & 31] += (double)v * v;
        float a = fabsf(v);
        if (a > largest) largest = a;
    }
    *amax = largest;
    *sumsq = row_sum_tree(squares);
    return row_sum_tree(partial);
}

double kbit_row_deviation_portable(const float *x, int64_t C, double mean) {
    double partial[32] = {0};
    for (int64_t c = 0; c < C; c++) {
        double d = (double)x[c] - mean;
        partial[c & 31] += d * d;
    }
    return row_sum_tree(partial);
}

void kbit_pack_row_portable(const quantize_args *q, int64_t m) {
    int Q = (1 << (q->bits - 1)) - 1, k = q->bits;
    const float *xr = q->x + m * q->ldx;
    int64_t mag_sum = 0;
    for (int b = 0; q->out && b < k; b++)
        for (int64_t w = 0; w < q->ldo; w++) q->out[(m * k + b) * q->ldo + w] = 0;
    for (int64_t c = 0; c < q->C; c++) {
        int level = kbit_level(xr[c], q->clip, q->step, Q); /* a NaN clip (std of one value) gives 0 */
        /* planes of u = level + Q, or sign-magnitude: bits 0 .. k-2 of |level|, then the sign */
        unsigned mag = (unsigned)(level < 0 ? -level : level);
        unsigned u = q->row_mag ? mag | (unsigned)(level < 0) << (k - 1) : (unsigned)(level + Q);
        mag_sum += mag;
        for (int b = 0; q->out && b < k; b++)
            q->out[(m * k + b) * q->ldo + (c >> 6)] |= (uint64_t)((u >> b) & 1) << (c & 63);
        if (q->levels) q->levels[m * q->C + c] = (int8_t)level;
    }
    if (q->row_mag) q->row_mag[m] = mag_sum;
}

static void gelu_portable(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = gelu_one(x[i]);
}

static void kattn_head_portable(const kattn_args *attn, int64_t h, int32_t *scratch) {
    kattn_head_body(attn, h, scratch);
}

static void ksoftmax_head_portable(const kattn_args *attn, int64_t h, int32_t *scratch) {
    ksoftmax_head_body(attn, h, scratch);
}

/* ------------------------------------------------------------------------------------ */
/* the tables                                                                            */

const bb_ops bb_ops_portable = {
    .family = BB_KERNEL_PORTABLE,
    .name = "portable",
    .pack = {sign_pack_row_portable},
    .linear = {{linear_bits_portable, linear_float_portable, linear_kbit_portable}},
    .layernorm = {layernorm_rows_portable},
    .embed = {embed_row_portable},
    .attention = {transpose64_portable, attn_scores_portable, attn_context_portable, NULL},
    .kbit = {kbit_row_sum_portable, kbit_row_deviation_portable, kbit_pack_row_portable, gelu_portable,
             kattn_head_portable, ksoftmax_head_portable},
};

#if BB_X86
const bb_ops bb_ops_portable_popcnt = {
    .family = BB_KERNEL_PORTABLE,
    .name = "portable-popcnt",
    .pack = {sign_pack_row_portable},
    .linear = {{linear_bits_popcnt, linear_float_popcnt, linear_kbit_popcnt}},
    .layernorm = {layernorm_rows_portable},
    .embed = {embed_row_portable},
    .attention = {transpose64_portable, attn_scores_popcnt, attn_context_popcnt, NULL},
    .kbit = {kbit_row_sum_portable, kbit_row_deviation_portable, kbit_pack_row_portable, gelu_portable,
             kattn_head_portable, ksoftmax_head_portable},
};
#endif
