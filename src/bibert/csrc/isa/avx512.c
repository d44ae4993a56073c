/* The AVX-512 kernel family (F, BW, DQ, VL and VPOPCNTDQ): a kernel of its own for every op;
 * this file has the dense ones, GELU and the table, isa/avx512_attention.c the attention kernels
 * and the k-bit quantizer's.
 * Per-function target attributes: the file compiles with the library's plain flags, runtime.c
 * checks the CPU.
 */
#include <math.h>
#include <stdint.h>

#include "avx512.h"

#if BB_X86

/* ------------------------------------------------------------------------------------ */
/* sign packing: bits[m, j] = x[m, j] < 0                                                */

#define BB_AVX512_PACK __attribute__((target("avx512f,avx512bw,avx512dq")))

BB_INLINE BB_AVX512_PACK void sign_pack_row_plain_avx512(const float *x, int64_t K, uint64_t *out) {
    int64_t kw = words_of(K);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t w = 0; w < kw; w++) {
        uint64_t v = 0;
        for (int q = 0; q < 4; q++) {
            int64_t j = 64 * w + 16 * q;
            int64_t n = K - j;
            if (n <= 0) break;
            __mmask16 lm = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
            __m512 xv = _mm512_maskz_loadu_ps(lm, x + j);
            __mmask16 neg = _mm512_mask_cmp_ps_mask(lm, xv, zero, _CMP_LT_OQ);
            v |= (uint64_t)neg << (16 * q);
        }
        out[w] = v;
    }
}

/* with thresholds t: !(x - t >= 0) */
BB_INLINE BB_AVX512_PACK void sign_pack_row_thr_avx512(const float *x, const float *t, int64_t K, uint64_t *out) {
    int64_t kw = words_of(K);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t w = 0; w < kw; w++) {
        uint64_t v = 0;
        for (int q = 0; q < 4; q++) {
            int64_t j = 64 * w + 16 * q;
            int64_t n = K - j;
            if (n <= 0) break;
            __mmask16 lm = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
            __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(lm, x + j), _mm512_maskz_loadu_ps(lm, t + j));
            __mmask16 neg = _mm512_mask_cmp_ps_mask(lm, d, zero, _CMP_NGE_UQ); /* !(d >= 0) */
            v |= (uint64_t)neg << (16 * q);
        }
        out[w] = v;
    }
}

BB_AVX512_PACK static void sign_pack_row_avx512(const float *x, const float *t, int64_t K, uint64_t *out) {
    if (t)
        sign_pack_row_thr_avx512(x, t, K, out);
    else
        sign_pack_row_plain_avx512(x, K, out);
}

/* ------------------------------------------------------------------------------------ */
/* binary Linear                                                                         */

/* float epilogue on 16 channels from two vectors of 64-bit counts: c0 + c1 * p [+ residual].
 * Counts are below 2^24, so narrowing them to int32 and converting is exact; the float
 * operations (a multiply, then adds, no contraction) are the portable path's, in its order.
 * c0 / c1 arrive in registers, loaded once per panel (stores to `out` could alias them, so
 * the compiler would otherwise reload them for every row). */
/* the low 32 bits of the 8 lanes of lo, then of hi: 16 int32 in one instruction */
BB_INLINE BB_AVX512 __m512i low_dwords(__m512i lo, __m512i hi) {
    return _mm512_permutex2var_epi32(lo, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                                     hi);
}

BB_INLINE BB_AVX512 void epilogue16(__m512i lo, __m512i hi, __m512 c0, __m512 c1,
                                                                       const float *res, float *out, __mmask16 lm) {
    __m512i p32 = low_dwords(lo, hi);
    __m512 y = _mm512_add_ps(c0, _mm512_mul_ps(c1, _mm512_cvtepi32_ps(p32)));
    if (res) y = _mm512_add_ps(y, load16(lm, res));
    store16(lm, out, y);
}

/* gelu_one on 16 lanes: the same float operations in the same order, in fewer instructions where
 * the result is the same: fused multiply-adds where it calls fmaf; -(a b) as one fnmadd (a rounding
 * is symmetric; d = +0 or -0 gives e = 1 alike); u 2^q (q = rint(d log2 e) in [-150, 0] for d >= -104)
 * as one vscalefps, a single rounding of u 2^q like gelu_one's two products (the first, by
 * 2^(q >> 1), is exact); fma(-(e t), r, 1) as fnmadd(e t, r, 1); the sign of erf from x's sign bit
 * (x = -0 gives -0 alike); NaN lanes keep x. */
BB_INLINE BB_AVX512 __m512 gelu16_avx512(__m512 x) {
#define BB_C(v) _mm512_set1_ps(v)
    __m512 xs = _mm512_mul_ps(x, BB_C((float)M_SQRT1_2));
    __m512 d = _mm512_fnmadd_ps(xs, xs, _mm512_setzero_ps());
    __m512 qf = _mm512_roundscale_ps(_mm512_mul_ps(d, BB_C(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 s = _mm512_fmadd_ps(qf, BB_C(-0.693145751953125f), d);
    s = _mm512_fmadd_ps(qf, BB_C(-1.428606765330187045e-06f), s);
    __m512 u = BB_C(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, BB_C(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, BB_C(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, BB_C(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, BB_C(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, BB_C(0.5f));
    u = _mm512_add_ps(BB_C(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    __mmask16 kept = _mm512_cmp_ps_mask(d, BB_C(-104.0f), _CMP_NLT_UQ); /* !(d < -104): exp not flushed */
    __m512 e = _mm512_maskz_scalef_ps(kept, u, qf);
    __m512 t = _mm512_div_ps(BB_C(1.0f), _mm512_fmadd_ps(BB_C(0.3275911f), _mm512_abs_ps(xs), BB_C(1.0f)));
    __m512 r = _mm512_fmadd_ps(BB_C(1.061405429f), t, BB_C(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, BB_C(1.421413741f));
    r = _mm512_fmadd_ps(r, t, BB_C(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, BB_C(0.254829592f));
    __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(e, t), r, BB_C(1.0f));
    __m512i erf = _mm512_ternarylogic_epi32(_mm512_castps_si512(erf_abs), _mm512_castps_si512(x),
                                            _mm512_set1_epi32((int)0x80000000u), 0x78); /* a ^ (x & sign) */
    return _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), _mm512_mul_ps(x, BB_C(0.5f)),
                              _mm512_add_ps(BB_C(1.0f), _mm512_castsi512_ps(erf)));
#undef BB_C
}

/* The k-bit epilogue of one input row from its weighted counts in registers (w0 .. w3: sum_b 2^b pc_b
 * of the panel's 32 channels, 8 per vector), with the panel's count offsets, alpha and bias loaded
 * once: the same integer and float operations as kbit_epilogue (for K below 2^26 the counts, below
 * 2^31, narrowed to int32 and converted: the int64 conversion's result, in fewer instructions). */
typedef struct {
    __m512i off[4];  /* count_offset, 8 channels a vector */
    __m512 c[4];     /* alpha (c0) lo, hi, bias (c1) lo, hi */
    __m512 step;
    __mmask16 lm0, lm1;
} kbit_panel_consts;

/* y = (C step) alpha + bias from the float counts c, GELU'd where the Linear says */
BB_INLINE BB_AVX512 __m512 kbit_y16(const linear_args *lin, __m512 c, __m512 step, __m512 alpha, __m512 bias) {
    __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(c, step), alpha), bias);
    return lin->gelu ? gelu16_avx512(y) : y;
}

/* the counts of 16 channels from the weighted popcounts lo, hi (8 channels each): C = lo/hi - off */
BB_INLINE BB_AVX512 __m512 kbit_c16(const linear_args *lin, __m512i lo, __m512i hi, __m512i off_lo, __m512i off_hi) {
    lo = _mm512_sub_epi64(lo, off_lo), hi = _mm512_sub_epi64(hi, off_hi);
    return lin->K < ((int64_t)1 << 26) ? _mm512_cvtepi32_ps(low_dwords(lo, hi))
                                       : _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(lo)),
                                                            _mm512_cvtepi64_ps(hi), 1);
}

/* the output row m of 32 channels from its float counts c0 (channels 0-15) and c1 (16-31) */
BB_INLINE BB_AVX512 void kbit_store32(const linear_args *lin, int64_t m, int64_t n0, __m512 c0, __m512 c1,
                                      const kbit_panel_consts *kc) {
    float *o = lin->out + m * lin->N + n0;
    const float *res = lin->residual ? lin->residual + m * lin->N + n0 : NULL;
    __m512 y = kbit_y16(lin, c0, kc->step, kc->c[0], kc->c[2]);
    if (res) y = _mm512_add_ps(y, load16(kc->lm0, res));
    store16(kc->lm0, o, y);
    if (kc->lm1) {
        y = kbit_y16(lin, c1, kc->step, kc->c[1], kc->c[3]);
        if (res) y = _mm512_add_ps(y, load16(kc->lm1, res + 16));
        store16(kc->lm1, o + 16, y);
    }
}

BB_INLINE BB_AVX512 void kbit_row32(const linear_args *lin, int64_t m, int64_t n0, __m512i w0, __m512i w1,
                                    __m512i w2, __m512i w3, const kbit_panel_consts *kc) {
    kbit_store32(lin, m, n0, kbit_c16(lin, w0, w1, kc->off[0], kc->off[1]), kbit_c16(lin, w2, w3, kc->off[2], kc->off[3]),
                 kc);
}

/* the bit epilogue of one row: 32 compares with the thresholds, flipped, masked to the panel.
 * Counts and thresholds (in [-1, K]) narrowed to int32 (K below 2^31 - 1, see linear_block_avx512),
 * 16 channels per compare; the compares' masks joined in a mask register. */
BB_INLINE BB_AVX512 void bits_row32(const linear_args *lin, int64_t m, int64_t p,
                                                                     __m512i s0, __m512i s1, __m512i s2, __m512i s3,
                                                                     const __m512i t[2], uint32_t fl, uint32_t valid) {
    __mmask16 lo = _mm512_cmpgt_epi32_mask(low_dwords(s0, s1), t[0]), hi = _mm512_cmpgt_epi32_mask(low_dwords(s2, s3), t[1]);
    uint32_t bits = _cvtmask32_u32(_mm512_kunpackw(hi, lo));
    ((uint32_t *)(lin->out_bits + m * lin->ldo))[p] = (bits ^ fl) & valid;
}

/* bits_row32 on 64-bit counts and thresholds, for K of 2^31 - 1 or more */
BB_INLINE BB_AVX512 void bits_row32_wide(const linear_args *lin, int64_t m, int64_t p,
                                                                          __m512i s0, __m512i s1, __m512i s2,
                                                                          __m512i s3, const __m512i t[4], uint32_t fl,
                                                                          uint32_t valid) {
    uint32_t bits = (uint32_t)_mm512_cmpgt_epi64_mask(s0, t[0]) | (uint32_t)_mm512_cmpgt_epi64_mask(s1, t[1]) << 8 |
                    (uint32_t)_mm512_cmpgt_epi64_mask(s2, t[2]) << 16 | (uint32_t)_mm512_cmpgt_epi64_mask(s3, t[3]) << 24;
    ((uint32_t *)(lin->out_bits + m * lin->ldo))[p] = (bits ^ fl) & valid;
}

/* the float epilogue of one row's 32 channels */
BB_INLINE BB_AVX512 void float_row32(const linear_args *lin, int64_t m, int64_t n0,
                                                                      __m512i s0, __m512i s1, __m512i s2, __m512i s3,
                                                                      const __m512 c[4], __mmask16 lm0, __mmask16 lm1) {
    float *o = lin->out + m * lin->N + n0;
    const float *res = lin->residual ? lin->residual + m * lin->N + n0 : NULL;
    epilogue16(s0, s1, c[0], c[2], res, o, lm0);
    if (lm1) epilogue16(s2, s3, c[1], c[3], res ? res + 16 : NULL, o + 16, lm1);
}

#define BB_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
/* prefetch into L1 the 4 cache lines of one K-word of a panel (32 channels) at address q */
#define BB_PREFETCH_WORD(q)                                                                                   \
    do {                                                                                                      \
        const char *q_ = (const char *)(q);                                                                   \
        _mm_prefetch(q_, _MM_HINT_T0); _mm_prefetch(q_ + 64, _MM_HINT_T0);                                    \
        _mm_prefetch(q_ + 128, _MM_HINT_T0); _mm_prefetch(q_ + 192, _MM_HINT_T0);                             \
    } while (0)
#define BB_POP(av, w) _mm512_popcnt_epi64(_mm512_xor_si512(av, w))
#define BB_ROW_FIRST(r)                                                                                       \
    if (MR > r) {                                                                                             \
        __m512i av = _mm512_set1_epi64((long long)a[r * lda]);                                                \
        s##r##0 = BB_POP(av, w0), s##r##1 = BB_POP(av, w1), s##r##2 = BB_POP(av, w2), s##r##3 = BB_POP(av, w3); \
    }
#define BB_ROW_NEXT(r)                                                                                        \
    if (MR > r) {                                                                                             \
        __m512i av = _mm512_set1_epi64((long long)a[r * lda + k]);                                            \
        s##r##0 = _mm512_add_epi64(s##r##0, BB_POP(av, w0));                                                  \
        s##r##1 = _mm512_add_epi64(s##r##1, BB_POP(av, w1));                                                  \
        s##r##2 = _mm512_add_epi64(s##r##2, BB_POP(av, w2));                                                  \
        s##r##3 = _mm512_add_epi64(s##r##3, BB_POP(av, w3));                                                  \
    }
#define BB_ROW_BITS(r)                                                                                        \
    if (MR > r) bits_row32(lin, r0 + r, p, s##r##0, s##r##1, s##r##2, s##r##3, t32, fl, valid);
#define BB_ROW_BITS_WIDE(r)                                                                                   \
    if (MR > r) bits_row32_wide(lin, r0 + r, p, s##r##0, s##r##1, s##r##2, s##r##3, t, fl, valid);
#define BB_ROW_FLOAT(r)                                                                                       \
    if (MR > r) float_row32(lin, r0 + r, n0, s##r##0, s##r##1, s##r##2, s##r##3, c, lm0, lm1);
#define BB_ROW_DECL(r) __m512i s##r##0, s##r##1, s##r##2, s##r##3;
/* k = 2: input row i from tile rows 2i and 2i + 1 */
#define BB_KBIT2_ROW(i)                                                                                       \
    if (MR > 2 * i + 1)                                                                                       \
        kbit_row32(lin, (r0 + 2 * i) / 2, n0, BB_W2(i, 0), BB_W2(i, 1), BB_W2(i, 2), BB_W2(i, 3), &kc);
#define BB_W2_(a, b, j) _mm512_add_epi64(s##a##j, _mm512_slli_epi64(s##b##j, 1))
#define BB_W2(i, j) (i == 0 ? BB_W2_(0, 1, j) : i == 1 ? BB_W2_(2, 3, j) : BB_W2_(4, 5, j))
/* k = 4: the input row of tile rows 0 .. 3 */
#define BB_W4(j)                                                                                              \
    _mm512_add_epi64(_mm512_add_epi64(s0##j, _mm512_slli_epi64(s1##j, 1)),                                    \
                     _mm512_add_epi64(_mm512_slli_epi64(s2##j, 2), _mm512_slli_epi64(s3##j, 3)))

/* One row block (MR rows) x one panel; OUT (a constant) selects the epilogue; prefetch (may be NULL):
 * the panel to prefetch while this one runs, K-word by K-word (prefetch_panel). The 4 * MR
 * accumulators are separate variables (not an array, which the compiler would keep in memory
 * and copy to registers around the K loop of every block); the first K-word initialises them
 * (K >= 1, so there always is one). */
BB_INLINE BB_AVX512 void linear_block_avx512(const linear_args *lin,
                                                                               int64_t r0, const int MR,
                                                                               int64_t p, const uint64_t *prefetch,
                                                                               const int OUT) {
    int64_t kw = words_of(lin->K);
    const uint64_t *wp = lin->w + p * kw * BB_PANEL;
    int64_t n0 = p * BB_PANEL;
    int nc = lin->N - n0 < BB_PANEL ? (int)(lin->N - n0) : BB_PANEL;
    const uint64_t *a = lin->a + r0 * lin->lda;
    int64_t lda = lin->lda;
    BB_ROWS(BB_ROW_DECL)
    {
        __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 8);
        __m512i w2 = _mm512_loadu_si512(wp + 16), w3 = _mm512_loadu_si512(wp + 24);
        if (prefetch) BB_PREFETCH_WORD(prefetch);
        BB_ROWS(BB_ROW_FIRST)
    }
    for (int64_t k = 1; k < kw; k++) {
        const uint64_t *wk = wp + k * BB_PANEL;
        if (prefetch) BB_PREFETCH_WORD((uintptr_t)prefetch + (uintptr_t)(k * BB_PANEL * 8));
        __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 8);
        __m512i w2 = _mm512_loadu_si512(wk + 16), w3 = _mm512_loadu_si512(wk + 24);
        BB_ROWS(BB_ROW_NEXT)
    }
    uint32_t valid = nc >= 32 ? 0xFFFFFFFFu : (1u << nc) - 1;
    if (OUT == BB_OUT_KBIT) { /* the planes' counts combined in registers (linear.c: MR a multiple of k, 4 for k = 4) */
        kbit_panel_consts kc;
        kc.lm0 = (__mmask16)valid, kc.lm1 = (__mmask16)(valid >> 16);
        const int64_t *off = lin->count_offset + n0;
        kc.off[0] = _mm512_maskz_loadu_epi64((__mmask8)kc.lm0, off);
        kc.off[1] = _mm512_maskz_loadu_epi64((__mmask8)(kc.lm0 >> 8), off + 8);
        kc.off[2] = _mm512_maskz_loadu_epi64((__mmask8)kc.lm1, off + 16);
        kc.off[3] = _mm512_maskz_loadu_epi64((__mmask8)(kc.lm1 >> 8), off + 24);
        kc.c[0] = _mm512_maskz_loadu_ps(kc.lm0, lin->c0 + n0), kc.c[1] = _mm512_maskz_loadu_ps(kc.lm1, lin->c0 + n0 + 16);
        kc.c[2] = _mm512_maskz_loadu_ps(kc.lm0, lin->c1 + n0), kc.c[3] = _mm512_maskz_loadu_ps(kc.lm1, lin->c1 + n0 + 16);
        kc.step = _mm512_set1_ps(lin->kstep);
        if (lin->kbits == 2) {
            BB_KBIT2_ROW(0) BB_KBIT2_ROW(1) BB_KBIT2_ROW(2)
        } else if (MR == 4) {
            kbit_row32(lin, r0 / 4, n0, BB_W4(0), BB_W4(1), BB_W4(2), BB_W4(3), &kc);
        }
    } else if (OUT == BB_OUT_BITS) {
        const int64_t *tp = lin->thr + n0;
        const __m512i t[4] = {_mm512_loadu_si512(tp), _mm512_loadu_si512(tp + 8), _mm512_loadu_si512(tp + 16),
                              _mm512_loadu_si512(tp + 24)};
        uint32_t fl = lin->flip[p];
        if (lin->K < INT32_MAX) { /* counts and thresholds fit int32 */
            const __m512i t32[2] = {low_dwords(t[0], t[1]), low_dwords(t[2], t[3])};
            BB_ROWS(BB_ROW_BITS)
        } else {
            BB_ROWS(BB_ROW_BITS_WIDE)
        }
    } else {
        /* c0 / c1 in registers, loaded once per panel (stores to `out` could alias them, so the
         * compiler would otherwise reload them for every row) */
        __mmask16 lm0 = (__mmask16)valid, lm1 = (__mmask16)(valid >> 16);
        const __m512 c[4] = {_mm512_maskz_loadu_ps(lm0, lin->c0 + n0), _mm512_maskz_loadu_ps(lm1, lin->c0 + n0 + 16),
                             _mm512_maskz_loadu_ps(lm0, lin->c1 + n0), _mm512_maskz_loadu_ps(lm1, lin->c1 + n0 + 16)};
        BB_ROWS(BB_ROW_FLOAT)
    }
}

#define BB_LINEAR_AVX512(OUT)                                                                                 \
    switch (mr) {                                                                                             \
    case 6: linear_block_avx512(lin, r0, 6, p, prefetch, OUT); break;                                         \
    case 5: linear_block_avx512(lin, r0, 5, p, prefetch, OUT); break;                                         \
    case 4: linear_block_avx512(lin, r0, 4, p, prefetch, OUT); break;                                         \
    case 3: linear_block_avx512(lin, r0, 3, p, prefetch, OUT); break;                                         \
    case 2: linear_block_avx512(lin, r0, 2, p, prefetch, OUT); break;                                         \
    default: linear_block_avx512(lin, r0, 1, p, prefetch, OUT); break;                                        \
    }

/* k-bit input in sign-magnitude planes (kbit.c, the forward's own layout; KB = k): input row i's
 * planes at rows k i .. k i + k - 1 of the block, bits 0 .. k-2 of |level| (m_b), then the sign
 * (s: level < 0). With w the weight bits (of -1), level_j w_j = |level_j| (-1)^(s_j XOR w_j), so
 *   C = sum_j |level_j| - 2 sum_b 2^b popcount(m_b AND (s XOR w))
 * s XOR w once per input row and weight vector, then one AND and one popcount per magnitude plane:
 * k - 1 popcounts a word, not k. Accumulator rows t = (k - 1) i + b (T = R (k - 1) <= 6 of them, R
 * input rows); then the epilogue of kbit_row32 on the exact C, computed in int32 for K below 2^26
 * (|C| and 2 sum_b 2^b popcount below 2^31). */
#define BB_SMPOP(m, s, w) _mm512_popcnt_epi64(_mm512_and_si512(m, _mm512_xor_si512(s, w))) /* m AND (s XOR w) */
#define BB_SM_MAG(t) ((int64_t)((t) / (KB - 1)) * KB + (t) % (KB - 1))
#define BB_SM_SIGN(t) ((int64_t)((t) / (KB - 1)) * KB + KB - 1)
#define BB_SM_FIRST(t)                                                                                        \
    if (T > t) {                                                                                              \
        __m512i m_ = _mm512_set1_epi64((long long)a[BB_SM_MAG(t) * lda]);                                     \
        __m512i g_ = _mm512_set1_epi64((long long)a[BB_SM_SIGN(t) * lda]);                                    \
        s##t##0 = BB_SMPOP(m_, g_, w0), s##t##1 = BB_SMPOP(m_, g_, w1);                                       \
        s##t##2 = BB_SMPOP(m_, g_, w2), s##t##3 = BB_SMPOP(m_, g_, w3);                                       \
    }
#define BB_SM_NEXT(t)                                                                                         \
    if (T > t) {                                                                                              \
        __m512i m_ = _mm512_set1_epi64((long long)a[BB_SM_MAG(t) * lda + k]);                                 \
        __m512i g_ = _mm512_set1_epi64((long long)a[BB_SM_SIGN(t) * lda + k]);                                \
        s##t##0 = _mm512_add_epi64(s##t##0, BB_SMPOP(m_, g_, w0));                                            \
        s##t##1 = _mm512_add_epi64(s##t##1, BB_SMPOP(m_, g_, w1));                                            \
        s##t##2 = _mm512_add_epi64(s##t##2, BB_SMPOP(m_, g_, w2));                                            \
        s##t##3 = _mm512_add_epi64(s##t##3, BB_SMPOP(m_, g_, w3));                                            \
    }

/* C of 16 channels of input row m: P - 2 sum_b 2^b acc_b, acc_b in the 64-bit lanes of lo[b], hi[b] */
BB_INLINE BB_AVX512 __m512 kbit_sm_c16(const linear_args *lin, int64_t m, const __m512i *lo, const __m512i *hi,
                                       const int KB) {
    if (lin->K < ((int64_t)1 << 26)) {
        __m512i c = _mm512_set1_epi32((int)lin->row_mag[m]);
        for (int b = 0; b < KB - 1; b++) c = _mm512_sub_epi32(c, _mm512_slli_epi32(low_dwords(lo[b], hi[b]), b + 1));
        return _mm512_cvtepi32_ps(c);
    }
    __m512i cl = _mm512_set1_epi64(lin->row_mag[m]), ch = cl;
    for (int b = 0; b < KB - 1; b++)
        cl = _mm512_sub_epi64(cl, _mm512_slli_epi64(lo[b], b + 1)), ch = _mm512_sub_epi64(ch, _mm512_slli_epi64(hi[b], b + 1));
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(cl)), _mm512_cvtepi64_ps(ch), 1);
}
/* input row i of the block: its accumulator rows (planes) a, b, c (b, c unused for k = 2) */
#define BB_SM_OUT(i, a, b, c)                                                                                 \
    if (R > i) {                                                                                              \
        const __m512i l0_[3] = {s##a##0, s##b##0, s##c##0}, h0_[3] = {s##a##1, s##b##1, s##c##1};             \
        const __m512i l1_[3] = {s##a##2, s##b##2, s##c##2}, h1_[3] = {s##a##3, s##b##3, s##c##3};             \
        int64_t m_ = r0 / KB + i;                                                                             \
        kbit_store32(lin, m_, n0, kbit_sm_c16(lin, m_, l0_, h0_, KB), kbit_sm_c16(lin, m_, l1_, h1_, KB), &kc); \
    }

BB_INLINE BB_AVX512 void linear_sm_block_avx512(const linear_args *lin, int64_t r0, const int R, int64_t p,
                                                const uint64_t *prefetch, const int KB) {
    const int T = R * (KB - 1);
    int64_t kw = words_of(lin->K);
    const uint64_t *wp = lin->w + p * kw * BB_PANEL;
    int64_t n0 = p * BB_PANEL;
    int nc = lin->N - n0 < BB_PANEL ? (int)(lin->N - n0) : BB_PANEL;
    const uint64_t *a = lin->a + r0 * lin->lda;
    int64_t lda = lin->lda;
    BB_ROWS(BB_ROW_DECL)
    {
        __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 8);
        __m512i w2 = _mm512_loadu_si512(wp + 16), w3 = _mm512_loadu_si512(wp + 24);
        if (prefetch) BB_PREFETCH_WORD(prefetch);
        BB_ROWS(BB_SM_FIRST)
    }
    for (int64_t k = 1; k < kw; k++) {
        const uint64_t *wk = wp + k * BB_PANEL;
        if (prefetch) BB_PREFETCH_WORD((uintptr_t)prefetch + (uintptr_t)(k * BB_PANEL * 8));
        __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 8);
        __m512i w2 = _mm512_loadu_si512(wk + 16), w3 = _mm512_loadu_si512(wk + 24);
        BB_ROWS(BB_SM_NEXT)
    }
    uint32_t valid = nc >= 32 ? 0xFFFFFFFFu : (1u << nc) - 1;
    kbit_panel_consts kc;
    kc.lm0 = (__mmask16)valid, kc.lm1 = (__mmask16)(valid >> 16);
    kc.c[0] = _mm512_maskz_loadu_ps(kc.lm0, lin->c0 + n0), kc.c[1] = _mm512_maskz_loadu_ps(kc.lm1, lin->c0 + n0 + 16);
    kc.c[2] = _mm512_maskz_loadu_ps(kc.lm0, lin->c1 + n0), kc.c[3] = _mm512_maskz_loadu_ps(kc.lm1, lin->c1 + n0 + 16);
    kc.step = _mm512_set1_ps(lin->kstep);
    if (KB == 2) {
        BB_SM_OUT(0, 0, 0, 0) BB_SM_OUT(1, 1, 1, 1) BB_SM_OUT(2, 2, 2, 2)
        BB_SM_OUT(3, 3, 3, 3) BB_SM_OUT(4, 4, 4, 4) BB_SM_OUT(5, 5, 5, 5)
    } else {
        BB_SM_OUT(0, 0, 1, 2) BB_SM_OUT(1, 3, 4, 5)
    }
}

/* mr: the block's planes (k per input row) */
BB_AVX512 static void linear_kbit_sm_avx512(const linear_args *lin, int64_t r0, int mr, int64_t p,
                                            const uint64_t *prefetch) {
    if (lin->kbits == 2) {
        switch (mr / 2) {
        case 6: linear_sm_block_avx512(lin, r0, 6, p, prefetch, 2); break;
        case 5: linear_sm_block_avx512(lin, r0, 5, p, prefetch, 2); break;
        case 4: linear_sm_block_avx512(lin, r0, 4, p, prefetch, 2); break;
        case 3: linear_sm_block_avx512(lin, r0, 3, p, prefetch, 2); break;
        case 2: linear_sm_block_avx512(lin, r0, 2, p, prefetch, 2); break;
        default: linear_sm_block_avx512(lin, r0, 1, p, prefetch, 2); break;
        }
    } else if (mr / 4 >= 2) {
        linear_sm_block_avx512(lin, r0, 2, p, prefetch, 4);
    } else {
        linear_sm_block_avx512(lin, r0, 1, p, prefetch, 4);
    }
}

BB_AVX512 static void linear_bits_avx512(const linear_args *lin, int64_t r0, int mr, int64_t p,
                                         const uint64_t *prefetch) {
    BB_LINEAR_AVX512(BB_OUT_BITS)
}
BB_AVX512 static void linear_float_avx512(const linear_args *lin, int64_t r0, int mr, int64_t p,
                                          const uint64_t *prefetch) {
    BB_LINEAR_AVX512(BB_OUT_FLOAT)
}
BB_AVX512 static void linear_kbit_avx512(const linear_args *lin, int64_t r0, int mr, int64_t p,
                                         const uint64_t *prefetch) {
    BB_LINEAR_AVX512(BB_OUT_KBIT)
}

/* ------------------------------------------------------------------------------------ */
/* LayerNorm (the portable kernel's operations, isa/portable.c)                          */

/* R rows; each row's bits (if bits) packed from its output values as they are stored */
/* One full vector of a LayerNorm's output: y = (x - mean) * rstd * gamma + beta over the 16 elements at
 * x, gamma, beta, stored at out; returns the mask of its sign bits (y < 0, or with thresholds t: y - t
 * not >= 0, the compare of sign_pack_row_*_avx512). */
BB_INLINE BB_AVX512 __mmask16 layernorm_out16_avx512(
    const float *x, __m512 mv, __m512 rv, const float *gamma, const float *beta, const float *t, float *out) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x), mv);
    __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d, rv), _mm512_loadu_ps(gamma)), _mm512_loadu_ps(beta));
    _mm512_storeu_ps(out, y);
    return t ? _mm512_cmp_ps_mask(_mm512_sub_ps(y, _mm512_loadu_ps(t)), zero, _CMP_NGE_UQ)
             : _mm512_cmp_ps_mask(y, zero, _CMP_LT_OQ);
}

BB_INLINE BB_AVX512 void layernorm_block_avx512(
    const float *x, int64_t H, const float *gamma, const float *beta, float eps, float *out, const float *t,
    uint64_t *bits,
    int64_t ldb, const int R) {
    float lanes[16];
    __m512 acc[4], mv[4], rv[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) {
        __mmask16 lm = H - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - i)) - 1);
        for (int r = 0; r < R; r++) acc[r] = _mm512_add_ps(acc[r], load16(lm, x + r * H + i));
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(lanes, acc[r]);
        float s = 0.0f;
        for (int l = 0; l < 16; l++) s += lanes[l];
        mv[r] = _mm512_set1_ps(s / (float)H);
        acc[r] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < H; i += 16) {
        __mmask16 lm = H - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - i)) - 1);
        for (int r = 0; r < R; r++) {
            __m512 d = _mm512_maskz_sub_ps(lm, load16(lm, x + r * H + i), mv[r]);
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(d, d));
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(lanes, acc[r]);
        float v = 0.0f;
        for (int l = 0; l < 16; l++) v += lanes[l];
        rv[r] = _mm512_set1_ps(1.0f / sqrtf(v / (float)H + eps));
    }
    const __m512 zero = _mm512_setzero_ps();
    if (bits && H % 64 == 0) { /* whole words: four vectors of 16 per word, no masks */
        for (int r = 0; r < R; r++)
            for (int64_t i = 0; i < H; i += 64) {
                uint64_t word = 0;
                for (int v = 0; v < 4; v++) {
                    int64_t e = i + 16 * v;
                    __mmask16 neg = layernorm_out16_avx512(x + r * H + e, mv[r], rv[r], gamma + e, beta + e,
                                                           t ? t + e : NULL, out + r * H + e);
                    word |= (uint64_t)neg << (16 * v);
                }
                bits[r * ldb + (i >> 6)] = word;
            }
        return;
    }
    for (int r = 0; r < R; r++) {
        uint64_t word = 0;
        for (int64_t i = 0; i < H; i += 16) {
            __mmask16 lm = H - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - i)) - 1);
            __m512 d = _mm512_sub_ps(load16(lm, x + r * H + i), mv[r]);
            __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d, rv[r]), load16(lm, gamma + i)),
                                     load16(lm, beta + i));
            store16(lm, out + r * H + i, y);
            if (bits) { /* the compare of sign_pack_row_*_avx512 on the stored value */
                __mmask16 neg = t ? _mm512_mask_cmp_ps_mask(lm, _mm512_sub_ps(y, load16(lm, t + i)),
                                                            zero, _CMP_NGE_UQ)
                                  : _mm512_mask_cmp_ps_mask(lm, y, zero, _CMP_LT_OQ);
                word |= (uint64_t)neg << (i & 63);
                if ((i & 63) == 48 || i + 16 >= H) {
                    bits[r * ldb + (i >> 6)] = word;
                    word = 0;
                }
            }
        }
    }
}

/* layernorm_block_avx512 on 8 rows of H, a multiple of 16: each row's 16 partial sums in its
 * own register (an array of vectors would live in memory), the 8 rows' sums of lanes added
 * together, lane l of every row in one vector (transposed), so the rows' in-order chains of 16
 * adds run side by side; the bits of a row joined in mask registers. Each row's operations are
 * layernorm_block_avx512's, in its order (the IEEE division and square root are the same in a
 * vector). */
#define BB_LN8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

/* 8 x 8 floats transposed: lane r of c_l = lane l of r_r */
#define BB_T8X8(r0, r1, r2, r3, r4, r5, r6, r7, c)                                                            \
    do {                                                                                                      \
        __m256 t0_ = _mm256_unpacklo_ps(r0, r1), t1_ = _mm256_unpackhi_ps(r0, r1);                            \
        __m256 t2_ = _mm256_unpacklo_ps(r2, r3), t3_ = _mm256_unpackhi_ps(r2, r3);                            \
        __m256 t4_ = _mm256_unpacklo_ps(r4, r5), t5_ = _mm256_unpackhi_ps(r4, r5);                            \
        __m256 t6_ = _mm256_unpacklo_ps(r6, r7), t7_ = _mm256_unpackhi_ps(r6, r7);                            \
        __m256 u0_ = _mm256_shuffle_ps(t0_, t2_, 0x44), u1_ = _mm256_shuffle_ps(t0_, t2_, 0xEE);              \
        __m256 u2_ = _mm256_shuffle_ps(t1_, t3_, 0x44), u3_ = _mm256_shuffle_ps(t1_, t3_, 0xEE);              \
        __m256 u4_ = _mm256_shuffle_ps(t4_, t6_, 0x44), u5_ = _mm256_shuffle_ps(t4_, t6_, 0xEE);              \
        __m256 u6_ = _mm256_shuffle_ps(t5_, t7_, 0x44), u7_ = _mm256_shuffle_ps(t5_, t7_, 0xEE);              \
        c[0] = _mm256_permute2f128_ps(u0_, u4_, 0x20); c[1] = _mm256_permute2f128_ps(u1_, u5_, 0x20);         \
        c[2] = _mm256_permute2f128_ps(u2_, u6_, 0x20); c[3] = _mm256_permute2f128_ps(u3_, u7_, 0x20);         \
        c[4] = _mm256_permute2f128_ps(u0_, u4_, 0x31); c[5] = _mm256_permute2f128_ps(u1_, u5_, 0x31);         \
        c[6] = _mm256_permute2f128_ps(u2_, u6_, 0x31); c[7] = _mm256_permute2f128_ps(u3_, u7_, 0x31);         \
    } while (0)

/* (((0 + l0) + l1) + ...) + l15 over the 16 lanes of each of 8 rows: row r's sum in lane r */
BB_INLINE BB_AVX512 __m256 lanes_sum8(__m512 a0, __m512 a1, __m512 a2, __m512 a3,
                                                                        __m512 a4, __m512 a5, __m512 a6, __m512 a7) {
    __m256 c[16];
#define BB_LO(a) _mm512_castps512_ps256(a)
#define BB_HI(a) _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))
    BB_T8X8(BB_LO(a0), BB_LO(a1), BB_LO(a2), BB_LO(a3), BB_LO(a4), BB_LO(a5), BB_LO(a6), BB_LO(a7), c);
    BB_T8X8(BB_HI(a0), BB_HI(a1), BB_HI(a2), BB_HI(a3), BB_HI(a4), BB_HI(a5), BB_HI(a6), BB_HI(a7), (c + 8));
#undef BB_LO
#undef BB_HI
    __m256 s = _mm256_setzero_ps();
    for (int l = 0; l < 16; l++) s = _mm256_add_ps(s, c[l]);
    return s;
}

/* lane r of v in every lane */
#define BB_LANE(v, r) _mm512_permutexvar_ps(_mm512_set1_epi32(r), _mm512_castps256_ps512(v))

/* The output pass of layernorm_rows8_avx512 (the operations of layernorm_out16_avx512): 16 columns of
 * the 8 rows at a time, so that each vector of gamma, beta and the thresholds is loaded once for the 8
 * rows; each row's sign bits gathered in a 64-bit word. Lane r of mean and rstd: row r's mean and
 * 1 / std; THR (a constant): compare with the thresholds t. */
BB_INLINE BB_AVX512 void layernorm_out8_avx512(const float *x, int64_t H, const float *gamma, const float *beta,
                                               const float *t, const int THR, float *out, uint64_t *bits,
                                               int64_t ldb, __m256 mean, __m256 rstd) {
#define BB_LN_ROW(r) const __m512 m##r = BB_LANE(mean, r), v##r = BB_LANE(rstd, r);
    BB_LN8(BB_LN_ROW)
#undef BB_LN_ROW
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 64) {
#define BB_LN_WORD(r) uint64_t w##r = 0;
#define BB_LN_OUT(r)                                                                                          \
    {                                                                                                         \
        __m512 d_ = _mm512_sub_ps(_mm512_loadu_ps(x + r * H + e), m##r);                                      \
        __m512 y_ = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d_, v##r), g), b);                              \
        _mm512_storeu_ps(out + r * H + e, y_);                                                                \
        __mmask16 n_ = THR ? _mm512_cmp_ps_mask(_mm512_sub_ps(y_, tv), zero, _CMP_NGE_UQ)                      \
                           : _mm512_cmp_ps_mask(y_, zero, _CMP_LT_OQ);                                        \
        w##r |= (uint64_t)_cvtmask16_u32(n_) << (16 * v);                                                    \
    }
#define BB_LN_STORE(r) bits[r * ldb + (i >> 6)] = w##r;
        BB_LN8(BB_LN_WORD)
        for (int v = 0; v < 4 && i + 16 * v < H; v++) {
            int64_t e = i + 16 * v;
            const __m512 g = _mm512_loadu_ps(gamma + e), b = _mm512_loadu_ps(beta + e);
            const __m512 tv = THR ? _mm512_loadu_ps(t + e) : zero;
            BB_LN8(BB_LN_OUT)
        }
        if (bits) { BB_LN8(BB_LN_STORE) }
#undef BB_LN_WORD
#undef BB_LN_OUT
#undef BB_LN_STORE
    }
}

BB_AVX512 static void layernorm_rows8_avx512(const float *x, int64_t H, const float *gamma, const float *beta,
                                             float eps, float *out, const float *t, uint64_t *bits, int64_t ldb) {
#define BB_LN_ZERO(r) __m512 s##r = _mm512_setzero_ps();
#define BB_LN_SUM(r) s##r = _mm512_add_ps(s##r, _mm512_loadu_ps(x + r * H + i));
#define BB_LN_MEAN(r) const __m512 m##r = BB_LANE(mean, r); s##r = _mm512_setzero_ps();
#define BB_LN_VAR(r)                                                                                          \
    {                                                                                                         \
        __m512 d_ = _mm512_sub_ps(_mm512_loadu_ps(x + r * H + i), m##r);                                      \
        s##r = _mm512_add_ps(s##r, _mm512_mul_ps(d_, d_));                                                    \
    }
    BB_LN8(BB_LN_ZERO)
    for (int64_t i = 0; i < H; i += 16) { BB_LN8(BB_LN_SUM) }
    const __m256 mean = _mm256_div_ps(lanes_sum8(s0, s1, s2, s3, s4, s5, s6, s7), _mm256_set1_ps((float)H));
    BB_LN8(BB_LN_MEAN)
    for (int64_t i = 0; i < H; i += 16) { BB_LN8(BB_LN_VAR) }
    const __m256 var = lanes_sum8(s0, s1, s2, s3, s4, s5, s6, s7);
    const __m256 rstd = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_sqrt_ps(_mm256_add_ps(
                                          _mm256_div_ps(var, _mm256_set1_ps((float)H)), _mm256_set1_ps(eps))));
    if (t)
        layernorm_out8_avx512(x, H, gamma, beta, t, 1, out, bits, ldb, mean, rstd);
    else
        layernorm_out8_avx512(x, H, gamma, beta, t, 0, out, bits, ldb, mean, rstd);
#undef BB_LN_ZERO
#undef BB_LN_SUM
#undef BB_LN_MEAN
#undef BB_LN_VAR
}
#undef BB_LANE

/* 8 rows where H is a multiple of 16 and 8 are left, else 4 or 1 */
BB_AVX512 static int layernorm_rows_avx512(const float *x, int64_t rows, int64_t H, const float *gamma,
                                           const float *beta, float eps, float *out, const float *t, uint64_t *bits,
                                           int64_t ldb) {
    if (H % 16 == 0 && rows >= 8) {
        layernorm_rows8_avx512(x, H, gamma, beta, eps, out, t, bits, ldb);
        return 8;
    }
    if (rows >= 4) {
        layernorm_block_avx512(x, H, gamma, beta, eps, out, t, bits, ldb, 4);
        return 4;
    }
    layernorm_block_avx512(x, H, gamma, beta, eps, out, t, bits, ldb, 1);
    return 1;
}

/* ------------------------------------------------------------------------------------ */
/* embeddings                                                                            */

BB_AVX512 static void embed_row_avx512(const uint64_t *word_bits, float alpha, const float *type, const float *pos,
                                       int64_t H, float *out) {
    __m512 plus = _mm512_set1_ps(alpha), minus = _mm512_set1_ps(-alpha);
    for (int64_t i = 0; i < H; i += 16) {
        __mmask16 lm = H - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - i)) - 1);
        __mmask16 bits = (__mmask16)(word_bits[i >> 6] >> (i & 63));
        __m512 wv = _mm512_mask_blend_ps(bits, plus, minus);
        __m512 y = _mm512_add_ps(_mm512_add_ps(wv, load16(lm, type + i)), load16(lm, pos + i));
        store16(lm, out + i, y);
    }
}

/* ------------------------------------------------------------------------------------ */
/* k-bit activations (kbit.c has the quantizer's formulas)                               */

BB_AVX512 static void gelu_avx512(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lm = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        store16(lm, y + i, gelu16_avx512(load16(lm, x + i)));
    }
}

/* ------------------------------------------------------------------------------------ */
/* the table                                                                             */

const bb_ops bb_ops_avx512 = {
    .family = BB_KERNEL_AVX512,
    .name = "avx512",
    .pack = {sign_pack_row_avx512},
    .linear = {{linear_bits_avx512, linear_float_avx512, linear_kbit_avx512, linear_kbit_sm_avx512}},
    .layernorm = {layernorm_rows_avx512},
    .embed = {embed_row_avx512},
    .attention = {transpose64_avx512, attn_scores_avx512, attn_context_avx512, attn_row_d64_avx512},
    .kbit = {kbit_row_sum_avx512, kbit_row_deviation_avx512, kbit_pack_row_avx512, gelu_avx512,
             kattn_head_avx512, ksoftmax_head_avx512},
};

/* the same on a CPU with VNNI: the k-bit attentions' integer products with vpdpbusd */
const bb_ops bb_ops_avx512_vnni = {
    .family = BB_KERNEL_AVX512,
    .name = "avx512-vnni",
    .pack = {sign_pack_row_avx512},
    .linear = {{linear_bits_avx512, linear_float_avx512, linear_kbit_avx512, linear_kbit_sm_avx512}},
    .layernorm = {layernorm_rows_avx512},
    .embed = {embed_row_avx512},
    .attention = {transpose64_avx512, attn_scores_avx512, attn_context_avx512, attn_row_d64_avx512},
    .kbit = {kbit_row_sum_avx512, kbit_row_deviation_avx512, kbit_pack_row_avx512, gelu_avx512,
             kattn_head_vnni, ksoftmax_head_vnni},
};

#endif
