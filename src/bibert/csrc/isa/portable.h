/* The plain C bodies that more than one ISA file compiles: always inlined, so each file
 * compiles them for its own target (the results do not change: the same operations in the
 * same order, FMA contraction off, fmaf where the formula fuses). And the portable kernels
 * that the other families' tables reuse as they are (isa/portable.c defines them).
 */
#ifndef BIBERT_ISA_PORTABLE_H
#define BIBERT_ISA_PORTABLE_H

#include <math.h>

#include "../bb_internal.h"

#pragma GCC visibility push(hidden)

/* ------------------------------------------------------------------------------------ */
/* GELU                                                                                  */

/* GELU of the FFN-in output for the k-bit FFN-out input: x * 0.5 * (1 + erf(x / sqrt 2)) with
 * erf from the Abramowitz-Stegun 7.1.26 form (error below 1.5e-7) and a polynomial exp, in
 * float32 with fused multiply-adds (fmaf: the same result on every kernel family). It is
 * close to torch's float32 GELU but not bit-identical to it. */
BB_INLINE float gelu_one(float x) {
    float d = -((x * (float)M_SQRT1_2) * (x * (float)M_SQRT1_2));
    float qf = rintf(d * 1.44269504088896341f);
    float s = fmaf(qf, -0.693145751953125f, d);
    s = fmaf(qf, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    int q = d < -104.0f ? 0 : (int)qf;
    int q1 = q >> 1, q2 = q - q1;
    union { uint32_t i; float f; } p1 = {(uint32_t)(q1 + 127) << 23}, p2 = {(uint32_t)(q2 + 127) << 23};
    float e = d < -104.0f ? 0.0f : u * p1.f * p2.f; /* exp(-(x/sqrt 2)^2) */
    float z = fabsf(x * (float)M_SQRT1_2);
    float t = 1.0f / fmaf(0.3275911f, z, 1.0f);
    float r = fmaf(fmaf(fmaf(fmaf(1.061405429f, t, -1.453152027f), t, 1.421413741f), t, -0.284496736f), t,
                   0.254829592f);
    float erf_abs = fmaf(-e * t, r, 1.0f);
    float erf = x < 0.0f ? -erf_abs : erf_abs;
    return x != x ? x : x * 0.5f * (1.0f + erf);
}

/* ------------------------------------------------------------------------------------ */
/* binary Linear: the epilogues of a tile of counts                                      */

/* channels of panel p that exist (32, fewer in the last panel) */
BB_INLINE int panel_channels(const linear_args *lin, int64_t p) {
    return lin->N - p * BB_PANEL < BB_PANEL ? (int)(lin->N - p * BB_PANEL) : BB_PANEL;
}

/* The epilogue of row m: counts pc[0..nc) of panel p into bits (OUT == BB_OUT_BITS: p > thr,
 * flipped) or floats (c0 + c1 * p [+ residual]). */
BB_INLINE void linear_row_epilogue(const linear_args *lin, int64_t m, int64_t p, int nc, const int64_t *pc,
                                   const int OUT) {
    int64_t n0 = p * BB_PANEL;
    if (OUT == BB_OUT_BITS) {
        uint32_t bits = 0;
        for (int c = 0; c < nc; c++) bits |= (uint32_t)(pc[c] > lin->thr[n0 + c]) << c;
        bits ^= lin->flip[p];
        if (nc < 32) bits &= (1u << nc) - 1;
        ((uint32_t *)(lin->out_bits + m * lin->ldo))[n0 / 32] = bits;
    } else {
        float *o = lin->out + m * lin->N + n0;
        for (int c = 0; c < nc; c++) {
            float y = lin->c0[n0 + c] + lin->c1[n0 + c] * (float)pc[c];
            if (lin->residual) y = y + lin->residual[m * lin->N + n0 + c];
            o[c] = y;
        }
    }
}

/* k-bit input (docs/packed_format.md, "Multi-bit activations"): rows r0 .. r0+mr-1 of a tile
 * are bit-planes 0 .. k-1 of consecutive input rows (u = level + Q, plane b = bit b of u),
 * pc their popcounts against the panel's channels. Each input row's integer count is
 * C = sum_b 2^b pc_b - count_offset_n (= sum_j level_j w_j, exactly) and its output
 * y = ((C * step) * alpha_n + bias_n) [+ residual], the student's rounding order; with lin->gelu,
 * GELU(y) (the FFN-in output, which the FFN-out input quantizes). */
BB_INLINE void kbit_epilogue(const linear_args *lin, int64_t r0, int mr, int64_t p, int nc,
                             const int64_t (*pc)[BB_PANEL]) {
    int k = lin->kbits;
    int64_t n0 = p * BB_PANEL;
    for (int r = 0; r + k <= mr; r += k) {
        int64_t m = (r0 + r) / k;
        float *o = lin->out + m * lin->N + n0;
        const float *res = lin->residual ? lin->residual + m * lin->N + n0 : NULL;
        for (int c = 0; c < nc; c++) {
            int64_t weighted = 0; /* sum_b 2^b pc_b */
            for (int b = 0; b < k; b++) weighted += pc[r + b][c] << b;
            float y = (float)(weighted - lin->count_offset[n0 + c]) * lin->kstep * lin->c0[n0 + c] + lin->c1[n0 + c];
            if (lin->gelu) y = gelu_one(y);
            o[c] = res ? y + res[c] : y;
        }
    }
}

/* The epilogue of a whole tile of counts (rows r0 .. r0+mr-1 x panel p) as OUT says: each row's
 * bits or floats, or the outputs of the tile's k-bit input rows (all planes of each). */
BB_INLINE void linear_tile_epilogue(const linear_args *lin, int64_t r0, int mr, int64_t p,
                                    const int64_t (*tile)[BB_PANEL], const int OUT) {
    int nc = panel_channels(lin, p);
    if (OUT == BB_OUT_KBIT) {
        kbit_epilogue(lin, r0, mr, p, nc, tile);
        return;
    }
    for (int r = 0; r < mr; r++) linear_row_epilogue(lin, r0 + r, p, nc, tile[r], OUT);
}

/* ------------------------------------------------------------------------------------ */
/* k-bit activations                                                                     */

/* The k-bit quantizer's sums over one row (kbit.c): 32 partial sums in double, column c in sum
 * c % 32 in column order, then added as a tree: t_l = (s_l + s_l+8) + (s_l+16 + s_l+24) for
 * l < 8, u_l = t_l + t_l+4, w_l = u_l + u_l+2, sum = w_0 + w_1. */
BB_INLINE double row_sum_tree(const double s[32]) {
    double t[8], u[4], w[2];
    for (int l = 0; l < 8; l++) t[l] = (s[l] + s[l + 8]) + (s[l + 16] + s[l + 24]);
    for (int l = 0; l < 4; l++) u[l] = t[l] + t[l + 4];
    for (int l = 0; l < 2; l++) w[l] = u[l] + u[l + 2];
    return w[0] + w[1];
}

/* Bi-Attention on k-bit levels, head h (kbit.c has the formulas), in int32 */
BB_INLINE void kattn_head_body(const kattn_args *attn, int64_t h, int32_t *scratch) {
    int64_t L = attn->L, d = attn->d, hd = attn->H * attn->d, lp = (L + 15) / 16 * 16;
    int32_t *cnt = scratch;                /* [d] */
    int32_t *S = cnt + (d + 15) / 16 * 16; /* [lp] the scores of one query */
    int32_t *kt = S + lp;                  /* [d][lp] the head's key levels, transposed */
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = 0; j < lp; j++) kt[c * lp + j] = j < L ? attn->k[j * hd + h * d + c] : 0;
    for (int64_t i = 0; i < L; i++) {
        const int8_t *qi = attn->q + i * hd + h * d;
        for (int64_t j = 0; j < lp; j++) S[j] = 0;
        for (int64_t c = 0; c < d; c++) {
            int32_t qc = qi[c];
            if (!qc) continue;
            const int32_t *kc = kt + c * lp;
            for (int64_t j = 0; j < lp; j++) S[j] += qc * kc[j];
        }
        for (int64_t c = 0; c < d; c++) cnt[c] = 0;
        for (int64_t j = 0; j < L; j++) {
            if (S[j] <= 0 || !((attn->valid[j >> 6] >> (j & 63)) & 1)) continue;
            const int8_t *nv = attn->v + j * hd + h * d;
            for (int64_t c = 0; c < d; c++) cnt[c] += nv[c];
        }
        for (int64_t c = 0; c < d; c++) attn->out[i * attn->ldo + h * d + c] = (float)cnt[c] * attn->step_v;
        if (attn->counts)
            for (int64_t c = 0; c < d; c++) attn->counts[i * hd + h * d + c] = cnt[c];
    }
}

/* Softmax attention on k-bit levels (kbit.c has the formulas). exp(t) for t in [-104, 0]: gelu_one's
 * exp (the same operations); the softmax's sum over a query's keys in 16 partial sums (key j in
 * sum j % 16, in key order, an absent key adding 0) added as a tree: a_l = s_l + s_l+8 (l < 8),
 * b_l = a_l + a_l+4, c_l = b_l + b_l+2, sum = c_0 + c_1 (one AVX-512 register's halves). */
BB_INLINE float softmax_exp(float t) {
    float qf = rintf(t * 1.44269504088896341f);
    float s = fmaf(qf, -0.693145751953125f, t);
    s = fmaf(qf, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    int q = (int)qf, q1 = q >> 1, q2 = q - q1;
    union { uint32_t i; float f; } p1 = {(uint32_t)(q1 + 127) << 23}, p2 = {(uint32_t)(q2 + 127) << 23};
    return u * p1.f * p2.f;
}

BB_INLINE float softmax_sum_tree(const float s[16]) {
    float a[8], b[4], c[2];
    for (int l = 0; l < 8; l++) a[l] = s[l] + s[l + 8];
    for (int l = 0; l < 4; l++) b[l] = a[l] + a[l + 4];
    for (int l = 0; l < 2; l++) c[l] = b[l] + b[l + 2];
    return c[0] + c[1];
}

/* Softmax attention on k-bit levels, head h, with the scores in int32. Per query: the scores of
 * the valid keys, their largest m (no valid key, or m = -inf: the context is 0), e_j =
 * exp(score_j - m) (0 for an invalid key, or where score_j - m is not >= -104), their sum in
 * softmax_sum_tree's order, r_j = rint(fl(e_j / sum) * grid), and the context's integer counts
 * sum_j r_j v_jc over the keys with r_j >= 1. */
BB_INLINE void ksoftmax_head_body(const kattn_args *attn, int64_t h, int32_t *scratch) {
    int64_t L = attn->L, d = attn->d, hd = attn->H * attn->d, lp = (L + 15) / 16 * 16;
    int32_t *cnt = scratch;                 /* [d] */
    int32_t *S = cnt + (d + 15) / 16 * 16;  /* [lp] the integer scores of one query */
    float *e = (float *)(S + lp);           /* [lp] its scores, then their exponentials */
    int32_t *keys = (int32_t *)(e + lp);    /* [L] the keys with a grid level >= 1 */
    int32_t *grid = keys + L;               /* [L] their levels */
    int32_t *kt = grid + L;                 /* [d][lp] the head's key levels, transposed */
    const float scale = attn->score_scale, div = attn->score_div, levels = (float)attn->grid;
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = 0; j < lp; j++) kt[c * lp + j] = j < L ? attn->k[j * hd + h * d + c] : 0;
    for (int64_t i = 0; i < L; i++) {
        const int8_t *qi = attn->q + i * hd + h * d;
        for (int64_t j = 0; j < lp; j++) S[j] = 0;
        for (int64_t c = 0; c < d; c++) {
            int32_t qc = qi[c];
            if (!qc) continue;
            const int32_t *kc = kt + c * lp;
            for (int64_t j = 0; j < lp; j++) S[j] += qc * kc[j];
        }
        float m = -INFINITY;
        for (int64_t j = 0; j < lp; j++) {
            int valid = j < L && ((attn->valid[j >> 6] >> (j & 63)) & 1);
            float score = (float)S[j] * scale / div;
            e[j] = score;
            if (valid && score > m) m = score;
        }
        int64_t n = 0;
        if (m != -INFINITY) {
            float partial[16] = {0};
            for (int64_t j = 0; j < lp; j++) {
                int valid = j < L && ((attn->valid[j >> 6] >> (j & 63)) & 1);
                float t = e[j] - m;
                e[j] = valid && t >= -104.0f ? softmax_exp(t) : 0.0f;
                partial[j & 15] += e[j];
            }
            float sum = softmax_sum_tree(partial);
            for (int64_t j = 0; j < L; j++) {
                float r = rintf(e[j] / sum * levels);
                if (r >= 1.0f) {
                    keys[n] = (int32_t)j;
                    grid[n++] = (int32_t)r;
                }
            }
        }
        for (int64_t c = 0; c < d; c++) cnt[c] = 0;
        for (int64_t x = 0; x < n; x++) {
            const int8_t *nv = attn->v + (int64_t)keys[x] * hd + h * d;
            int32_t r = grid[x];
            for (int64_t c = 0; c < d; c++) cnt[c] += r * nv[c];
        }
        for (int64_t c = 0; c < d; c++) attn->out[i * attn->ldo + h * d + c] = (float)cnt[c] * attn->step_v;
        if (attn->counts)
            for (int64_t c = 0; c < d; c++) attn->counts[i * hd + h * d + c] = cnt[c];
    }
}

/* ------------------------------------------------------------------------------------ */
/* portable kernels that other families' tables list (isa/portable.c)                    */

void sign_pack_row_portable(const float *x, const float *t, int64_t K, uint64_t *out);
void embed_row_portable(const uint64_t *word_bits, float alpha, const float *type, const float *pos, int64_t H,
                        float *out);
void transpose64_portable(uint64_t a[64]);
double kbit_row_sum_portable(const float *x, int64_t C, float *amax, double *sumsq);
double kbit_row_deviation_portable(const float *x, int64_t C, double mean);
void kbit_pack_row_portable(const quantize_args *q, int64_t m);
#if BB_X86
void attn_scores_popcnt(const attn_args *attn, int64_t bh, int64_t i, uint64_t *ba, int64_t *popcounts);
void attn_context_popcnt(const attn_args *attn, int64_t bh, const uint64_t *ba, uint64_t *ctx_bits, int32_t *counts,
                         const float *t);
#endif

#pragma GCC visibility pop

#endif
