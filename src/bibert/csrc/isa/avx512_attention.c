/* The AVX-512 family's attention kernels (its table is in isa/avx512.c): the 64 x 64 bit
 * transpose of the values, Bi-Attention on bits, Bi-Attention and softmax attention on k-bit
 * levels; and the k-bit quantizer's kernels (its sums, its levels and bit-planes).
 */
#include <stdint.h>

#include <string.h>

#include "avx512.h"

#if BB_X86

/* ------------------------------------------------------------------------------------ */
/* Bi-Attention entirely in bits (the portable kernels' operations, isa/portable.c)      */

/* transpose64 in eight 512-bit registers (row 8R + i in lane i of register R): the same six
 * butterfly stages, each a bit-select between a row and its partner shifted. Partners 32, 16
 * and 8 rows apart lie in other registers, those 4, 2 and 1 apart in other lanes of the same
 * register (a lane permutation brings them). In place. */
#define BB_SEL(m, x, y) _mm512_ternarylogic_epi64(m, x, y, 0xCA) /* m ? x : y, bit by bit */
#define BB_XSTAGE(lo, hi, j, m)                                                                               \
    do {                                                                                                      \
        __m512i l_ = lo;                                                                                      \
        lo = BB_SEL(_mm512_set1_epi64((long long)((m) << (j))), _mm512_slli_epi64(hi, j), lo);                \
        hi = BB_SEL(_mm512_set1_epi64((long long)(m)), _mm512_srli_epi64(l_, j), hi);                         \
    } while (0)
/* lanes i and i + j of z (upper: the lanes with bit j of i set), p: z with those lanes swapped */
#define BB_LSTAGE(z, p, j, m, upper)                                                                          \
    do {                                                                                                      \
        __m512i sh_ = _mm512_mask_mov_epi64(_mm512_slli_epi64(p, j), upper, _mm512_srli_epi64(p, j));         \
        __m512i mk_ = _mm512_mask_mov_epi64(_mm512_set1_epi64((long long)((m) << (j))), upper,                \
                                            _mm512_set1_epi64((long long)(m)));                               \
        z = BB_SEL(mk_, sh_, z);                                                                              \
    } while (0)
BB_AVX512 void transpose64_avx512(uint64_t a[64]) {
    __m512i z[8];
    for (int r = 0; r < 8; r++) z[r] = _mm512_loadu_si512(a + 8 * r);
    for (int r = 0; r < 4; r++) BB_XSTAGE(z[r], z[r + 4], 32, 0x00000000FFFFFFFFULL);
    for (int r = 0; r < 8; r += 4)
        for (int q = 0; q < 2; q++) BB_XSTAGE(z[r + q], z[r + q + 2], 16, 0x0000FFFF0000FFFFULL);
    for (int r = 0; r < 8; r += 2) BB_XSTAGE(z[r], z[r + 1], 8, 0x00FF00FF00FF00FFULL);
    for (int r = 0; r < 8; r++) {
        BB_LSTAGE(z[r], _mm512_shuffle_i64x2(z[r], z[r], 0x4E), 4, 0x0F0F0F0F0F0F0F0FULL, 0xF0);
        BB_LSTAGE(z[r], _mm512_shuffle_i64x2(z[r], z[r], 0xB1), 2, 0x3333333333333333ULL, 0xCC);
        BB_LSTAGE(z[r], _mm512_permutex_epi64(z[r], 0xB1), 1, 0x5555555555555555ULL, 0xAA);
        _mm512_storeu_si512(a + 8 * r, z[r]);
    }
}
#undef BB_XSTAGE
#undef BB_LSTAGE

/* popcount(q XOR k_j) of the 64 keys of word w of a row, in 8 vectors of 8 keys */
BB_INLINE BB_AVX512 void attn_popcounts_avx512(const attn_args *attn, const uint64_t *q,
                                                                                  const uint64_t *kt, int64_t w,
                                                                                  __m512i acc[8]) {
    for (int v = 0; v < 8; v++) acc[v] = _mm512_setzero_si512();
    for (int64_t x = 0; x < attn->dw; x++) {
        __m512i qv = _mm512_set1_epi64((long long)q[x]);
        const uint64_t *kx = kt + x * attn->lp + 64 * w;
        for (int v = 0; v < 8; v++)
            acc[v] = _mm512_add_epi64(acc[v], _mm512_popcnt_epi64(_mm512_xor_si512(qv, _mm512_loadu_si512(kx + 8 * v))));
    }
}

/* the smallest of 8 vectors */
BB_INLINE BB_AVX512 __m512i attn_min8_avx512(const __m512i m[8]) {
    __m512i m01 = _mm512_min_epi64(m[0], m[1]), m23 = _mm512_min_epi64(m[2], m[3]);
    __m512i m45 = _mm512_min_epi64(m[4], m[5]), m67 = _mm512_min_epi64(m[6], m[7]);
    return _mm512_min_epi64(_mm512_min_epi64(m01, m23), _mm512_min_epi64(m45, m67));
}

/* the smallest lane of 8 popcounts, each at most d + 1 (in 16 bits below 2^16, one instruction) */
BB_INLINE BB_AVX512 int64_t attn_lane_min_avx512(const attn_args *attn, __m512i m) {
    if (attn->d < 0xffff) return _mm_cvtsi128_si32(_mm_minpos_epu16(_mm512_cvtepi64_epi16(m))) & 0xffff;
    return _mm512_reduce_min_epi64(m);
}

/* eight 8-bit masks joined into 64 bits (k0 the lowest byte), in mask registers */
BB_INLINE BB_AVX512 uint64_t join8_avx512(__mmask8 k0, __mmask8 k1, __mmask8 k2,
                                                                             __mmask8 k3, __mmask8 k4, __mmask8 k5,
                                                                             __mmask8 k6, __mmask8 k7) {
    __mmask32 lo = _mm512_kunpackw(_mm512_kunpackb(k3, k2), _mm512_kunpackb(k1, k0));
    __mmask32 hi = _mm512_kunpackw(_mm512_kunpackb(k7, k6), _mm512_kunpackb(k5, k4));
    return _cvtmask64_u64(_mm512_kunpackd(hi, lo));
}
/* the BA bits of 64 keys: popcount < lim */
BB_INLINE BB_AVX512 uint64_t attn_below_avx512(const __m512i acc[8], __m512i limv) {
#define BB_LT(v) _mm512_cmp_epi64_mask(acc[v], limv, _MM_CMPINT_LT)
    return join8_avx512(BB_LT(0), BB_LT(1), BB_LT(2), BB_LT(3), BB_LT(4), BB_LT(5), BB_LT(6), BB_LT(7));
#undef BB_LT
}

/* 64 keys' popcounts in 8 named vectors (a0 .. a7), which the compiler keeps in registers */
#define BB_LOAD8(a, p)                                                                                        \
    __m512i a##0 = _mm512_loadu_si512((p)), a##1 = _mm512_loadu_si512((p) + 8),                               \
            a##2 = _mm512_loadu_si512((p) + 16), a##3 = _mm512_loadu_si512((p) + 24),                         \
            a##4 = _mm512_loadu_si512((p) + 32), a##5 = _mm512_loadu_si512((p) + 40),                         \
            a##6 = _mm512_loadu_si512((p) + 48), a##7 = _mm512_loadu_si512((p) + 56)
/* a_v += popcount(op(x, the 8 words at p + 8v)) for v = 0 .. 7; op is _mm512_xor_si512 (query
 * against keys) or _mm512_and_si512 (BA against value bits) */
#define BB_ACC1(a, v, op, x, p)                                                                               \
    a##v = _mm512_add_epi64(a##v, _mm512_popcnt_epi64(op(x, _mm512_loadu_si512((p) + 8 * v))))
#define BB_ACC8(a, op, x, p)                                                                                  \
    do {                                                                                                      \
        BB_ACC1(a, 0, op, x, p); BB_ACC1(a, 1, op, x, p); BB_ACC1(a, 2, op, x, p); BB_ACC1(a, 3, op, x, p);   \
        BB_ACC1(a, 4, op, x, p); BB_ACC1(a, 5, op, x, p); BB_ACC1(a, 6, op, x, p); BB_ACC1(a, 7, op, x, p);   \
    } while (0)
#define BB_POP8(a, qv, kx) BB_ACC8(a, _mm512_xor_si512, qv, kx)
#define BB_MIN8(a)                                                                                            \
    _mm512_min_epi64(_mm512_min_epi64(_mm512_min_epi64(a##0, a##1), _mm512_min_epi64(a##2, a##3)),            \
                     _mm512_min_epi64(_mm512_min_epi64(a##4, a##5), _mm512_min_epi64(a##6, a##7)))
/* the 64 bits of cmp(a_v, x) for v = 0 .. 7 (cmp: an _MM_CMPINT_ predicate) */
#define BB_CMP1(a, v, x, cmp) _mm512_cmp_epi64_mask(a##v, x, cmp)
#define BB_CMP8(a, x, cmp)                                                                                    \
    join8_avx512(BB_CMP1(a, 0, x, cmp), BB_CMP1(a, 1, x, cmp), BB_CMP1(a, 2, x, cmp), BB_CMP1(a, 3, x, cmp),  \
                 BB_CMP1(a, 4, x, cmp), BB_CMP1(a, 5, x, cmp), BB_CMP1(a, 6, x, cmp), BB_CMP1(a, 7, x, cmp))
#define BB_BELOW8(a, limv) BB_CMP8(a, limv, _MM_CMPINT_LT)

BB_AVX512 void attn_scores_avx512(const attn_args *attn, int64_t bh, int64_t i, uint64_t *ba, int64_t *popcounts) {
    int64_t b = bh / attn->H;
    const uint64_t *q = attn->q + (bh * attn->L + i) * attn->dw;
    const uint64_t *kt = attn->kt + bh * attn->dw * attn->lp;
    const uint64_t *valid = attn->valid + b * attn->lw;
    if (!attn->rel) {
        const __m512i limv = _mm512_set1_epi64(attn->lim ? attn->lim[bh % attn->H] : (attn->d + 1) / 2);
        for (int64_t w = 0; w < attn->lw; w++) {
            const __m512i zero = _mm512_setzero_si512();
            __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
            for (int64_t x = 0; x < attn->dw; x++) {
                const __m512i qv = _mm512_set1_epi64((long long)q[x]);
                const uint64_t *kx = kt + x * attn->lp + 64 * w;
                BB_POP8(a, qv, kx);
            }
            ba[w] = BB_BELOW8(a, limv) & valid[w];
        }
    } else if (attn->lw <= 2) { /* relative, up to 128 keys: as below, the popcounts kept in registers */
        const int64_t *pad = attn->pad + b * attn->lp;
        const int two = attn->lw == 2;
        BB_LOAD8(a, pad);
        BB_LOAD8(c, pad + (two ? 64 : 0));
        for (int64_t x = 0; x < attn->dw; x++) {
            const __m512i qv = _mm512_set1_epi64((long long)q[x]);
            const uint64_t *kx = kt + x * attn->lp;
            BB_POP8(a, qv, kx);
            if (two) BB_POP8(c, qv, kx + 64);
        }
        __m512i m = BB_MIN8(a);
        if (two) m = _mm512_min_epi64(m, BB_MIN8(c));
        const __m512i limv = _mm512_set1_epi64(relative_limit(attn, bh % attn->H, attn_lane_min_avx512(attn, m)));
        ba[0] = BB_BELOW8(a, limv);
        if (two) ba[1] = BB_BELOW8(c, limv);
    } else { /* relative: the popcounts (d + 1 more for a key that is not real) wait in popcounts for the limit */
        const int64_t *pad = attn->pad + b * attn->lp;
        __m512i minv = _mm512_set1_epi64(attn->d + 1);
        for (int64_t w = 0; w < attn->lw; w++) {
            __m512i acc[8];
            attn_popcounts_avx512(attn, q, kt, w, acc);
            for (int v = 0; v < 8; v++) {
                acc[v] = _mm512_add_epi64(acc[v], _mm512_loadu_si512(pad + 64 * w + 8 * v));
                _mm512_storeu_si512(popcounts + 64 * w + 8 * v, acc[v]);
            }
            minv = _mm512_min_epi64(minv, attn_min8_avx512(acc));
        }
        /* a key that is not real has at least d + 1 >= every limit: never attended */
        const __m512i limv = _mm512_set1_epi64(relative_limit(attn, bh % attn->H, attn_lane_min_avx512(attn, minv)));
        for (int64_t w = 0; w < attn->lw; w++) {
            __m512i acc[8];
            for (int v = 0; v < 8; v++) acc[v] = _mm512_loadu_si512(popcounts + 64 * w + 8 * v);
            ba[w] = attn_below_avx512(acc, limv);
        }
    }
}

/* the context counts of 64 columns in 8 named vectors: a_v += popcount(BA AND v-bits) */
#define BB_AND8(a, bv, vw) BB_ACC8(a, _mm512_and_si512, bv, vw)
/* columns 8v .. 8v+7 of a one-word context (attn_context_avx512, dp = 64): their count
 * npos - 2 * popcount, its sign bits (or, with thresholds, !(count - t >= 0) in float32) into
 * neg, the counts into counts when asked; the general path's operations */
#define BB_CTX1(a, v, d)                                                                                      \
    do {                                                                                                      \
        int n_ = (int)(d) - 8 * v >= 8 ? 8 : (int)(d) - 8 * v;                                                \
        if (n_ <= 0) break;                                                                                   \
        __mmask8 m_ = (__mmask8)((1u << n_) - 1);                                                             \
        __m512i count_ = _mm512_sub_epi64(nv, _mm512_slli_epi64(a##v, 1));                                    \
        uint64_t neg_;                                                                                        \
        if (t) {                                                                                              \
            __m256 dv8_ = _mm256_sub_ps(_mm512_cvtepi64_ps(count_), _mm256_maskz_loadu_ps(m_, t + 8 * v));    \
            neg_ = _mm256_cmp_ps_mask(dv8_, _mm256_setzero_ps(), _CMP_NGE_UQ);                                \
        } else {                                                                                              \
            neg_ = _mm512_cmp_epi64_mask(count_, _mm512_setzero_si512(), _MM_CMPINT_LT);                      \
        }                                                                                                     \
        neg |= (neg_ & m_) << (8 * v);                                                                        \
        if (counts) _mm256_mask_storeu_epi32(counts + 8 * v, m_, _mm512_cvtepi64_epi32(count_));              \
    } while (0)

BB_AVX512 void attn_context_avx512(const attn_args *attn, int64_t bh, const uint64_t *ba, uint64_t *ctx_bits,
                                   int32_t *counts, const float *t) {
    const uint64_t *vt = attn->vt + bh * attn->lw * attn->dp;
    int64_t npos = 0;
    for (int64_t w = 0; w < attn->lw; w++) npos += __builtin_popcountll(ba[w]);
    const __m512i nv = _mm512_set1_epi64(npos);
    if (attn->dp == 64) { /* one word of context bits (57 to 64 columns): 8 vectors of counts in registers */
        const __m512i zero = _mm512_setzero_si512();
        __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
        for (int64_t w = 0; w < attn->lw; w++) {
            const __m512i bv = _mm512_set1_epi64((long long)ba[w]);
            const uint64_t *vw = vt + w * 64;
            BB_AND8(a, bv, vw);
        }
        uint64_t neg = 0;
        BB_CTX1(a, 0, attn->d); BB_CTX1(a, 1, attn->d); BB_CTX1(a, 2, attn->d); BB_CTX1(a, 3, attn->d);
        BB_CTX1(a, 4, attn->d); BB_CTX1(a, 5, attn->d); BB_CTX1(a, 6, attn->d); BB_CTX1(a, 7, attn->d);
        ctx_bits[0] = neg;
        return;
    }
    for (int64_t x = 0; x < attn->dw; x++) ctx_bits[x] = 0;
    for (int64_t c0 = 0; c0 < attn->dp; c0 += 32) {
        int nblk = attn->dp - c0 >= 32 ? 4 : (int)((attn->dp - c0) / 8);
        __m512i acc[4];
        for (int v = 0; v < 4; v++) acc[v] = _mm512_setzero_si512();
        for (int64_t w = 0; w < attn->lw; w++) {
            __m512i bv = _mm512_set1_epi64((long long)ba[w]);
            const uint64_t *vw = vt + w * attn->dp + c0;
            for (int v = 0; v < nblk; v++)
                acc[v] = _mm512_add_epi64(acc[v], _mm512_popcnt_epi64(_mm512_and_si512(bv, _mm512_loadu_si512(vw + 8 * v))));
        }
        for (int v = 0; v < nblk; v++) {
            int64_t c = c0 + 8 * v;
            __m512i count = _mm512_sub_epi64(nv, _mm512_slli_epi64(acc[v], 1));
            int nc = attn->d - c >= 8 ? 8 : (int)(attn->d - c);
            if (nc <= 0) break;
            uint64_t neg;
            if (t) { /* counts are below 2^24 in size: exact in float32 */
                __m256 dv8 = _mm256_sub_ps(_mm512_cvtepi64_ps(count),
                                           _mm256_maskz_loadu_ps((__mmask8)((1u << nc) - 1), t + c));
                neg = _mm256_cmp_ps_mask(dv8, _mm256_setzero_ps(), _CMP_NGE_UQ);
            } else {
                neg = _mm512_cmp_epi64_mask(count, _mm512_setzero_si512(), _MM_CMPINT_LT);
            }
            neg &= (1u << nc) - 1;
            ctx_bits[c >> 6] |= neg << (c & 63);
            if (counts) _mm256_mask_storeu_epi32(counts + c, (__mmask8)((1u << nc) - 1), _mm512_cvtepi64_epi32(count));
        }
    }
}
/* Query row r of every head for d = 64 with fixed limits (not relative): one word of query,
 * key and context bits per head, each head's context one word of the output row. The BA bits
 * of all heads, then their contexts: attn_scores_avx512 and attn_context_avx512's operations, inline.
 * ba: scratch [H, lw]. */
BB_AVX512 void attn_row_d64_avx512(const attn_args *attn, int64_t r, uint64_t *ba) {
    int64_t H = attn->H, L = attn->L, lw = attn->lw, b = r / L, i = r % L;
    const uint64_t *valid = attn->valid + b * lw;
    uint64_t *orow = attn->out + r * attn->ldo;
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t h = 0; h < H; h++) {
        int64_t bh = b * H + h;
        const __m512i qv = _mm512_set1_epi64((long long)attn->q[bh * L + i]);
        const __m512i limv = _mm512_set1_epi64(attn->lim ? attn->lim[h] : (attn->d + 1) / 2);
        const uint64_t *kt = attn->kt + bh * attn->lp;
        for (int64_t w = 0; w < lw; w++) {
            __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
            BB_POP8(a, qv, kt + 64 * w);
            ba[h * lw + w] = BB_BELOW8(a, limv) & valid[w];
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const uint64_t *vt = attn->vt + (b * H + h) * lw * 64, *bah = ba + h * lw;
        const float *t = attn->thr ? attn->thr + h * 64 : NULL;
        int32_t *counts = attn->counts ? attn->counts + (r * H + h) * 64 : NULL;
        int64_t npos = 0;
        for (int64_t w = 0; w < lw; w++) npos += __builtin_popcountll(bah[w]);
        const __m512i nv = _mm512_set1_epi64(npos);
        __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
        for (int64_t w = 0; w < lw; w++) {
            const __m512i bv = _mm512_set1_epi64((long long)bah[w]);
            BB_AND8(a, bv, vt + w * 64);
        }
        uint64_t neg = 0;
        if (!t && !counts) { /* count = npos - 2 a < 0  <=>  a > floor(npos / 2) */
            neg = BB_CMP8(a, _mm512_set1_epi64(npos >> 1), _MM_CMPINT_NLE);
        } else {
            BB_CTX1(a, 0, 64); BB_CTX1(a, 1, 64); BB_CTX1(a, 2, 64); BB_CTX1(a, 3, 64);
            BB_CTX1(a, 4, 64); BB_CTX1(a, 5, 64); BB_CTX1(a, 6, 64); BB_CTX1(a, 7, 64);
        }
        orow[h] = neg;
    }
    for (int64_t x = H; x < attn->ldo; x++) orow[x] = 0;
}

/* ------------------------------------------------------------------------------------ */
/* Bi-Attention on k-bit levels                                                          */

/* kattn_head_body with the scores of 128 keys in eight registers of 16-bit lanes (|S| <= d Q^2
 * fits 16 bits for d <= 668) and the counts of 64 channels summed in 16-bit lanes over up to 256
 * attended keys at a time, then in 32-bit ones: the same integers. */
BB_AVX512 void kattn_head_avx512(const kattn_args *attn, int64_t h, int32_t *scratch) {
    int64_t L = attn->L, d = attn->d, hd = attn->H * attn->d, lp = (L + 127) / 128 * 128;
    if (d > 600) {
        kattn_head_body(attn, h, scratch);
        return;
    }
    int16_t *kt = (int16_t *)scratch;             /* [d][lp] the head's key levels, transposed */
    uint64_t *ba = (uint64_t *)(kt + d * lp); /* [lp / 64] the attended keys of one query */
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = 0; j < lp; j++) kt[c * lp + j] = j < L ? attn->k[j * hd + h * d + c] : 0;
    const __m512 sv = _mm512_set1_ps(attn->step_v);
    for (int64_t i = 0; i < L; i++) {
        const int8_t *qi = attn->q + i * hd + h * d;
        for (int64_t j0 = 0; j0 < lp; j0 += 128) {
            __m512i acc[4];
            for (int v = 0; v < 4; v++) acc[v] = _mm512_setzero_si512();
            for (int64_t c = 0; c < d; c++) {
                if (!qi[c]) continue;
                __m512i qv = _mm512_set1_epi16(qi[c]);
                const int16_t *kc = kt + c * lp + j0;
                for (int v = 0; v < 4; v++)
                    acc[v] = _mm512_add_epi16(acc[v], _mm512_mullo_epi16(qv, _mm512_loadu_si512(kc + 32 * v)));
            }
            for (int w = 0; w < 2; w++) { /* S > 0 and key valid, as bits (keys past L: no valid bit) */
                uint64_t pos = (uint64_t)_mm512_cmpgt_epi16_mask(acc[2 * w], _mm512_setzero_si512()) |
                               (uint64_t)_mm512_cmpgt_epi16_mask(acc[2 * w + 1], _mm512_setzero_si512()) << 32;
                int64_t word = (j0 >> 6) + w;
                ba[word] = word < (L + 63) / 64 ? pos & attn->valid[word] : 0;
            }
        }
        for (int64_t c0 = 0; c0 < d; c0 += 64) { /* the counts of 64 channels over the attended keys */
            int64_t n = d - c0 < 64 ? d - c0 : 64;
            __mmask32 lm0 = n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1);
            __mmask32 lm1 = n >= 64 ? (__mmask32)0xFFFFFFFFu : n > 32 ? (__mmask32)((1u << (n - 32)) - 1) : 0;
            __m512i cn[4];
            for (int v = 0; v < 4; v++) cn[v] = _mm512_setzero_si512();
            for (int64_t w0 = 0; w0 < lp / 64; w0 += 4) { /* 256 keys in 16 bits (|sum| <= 256 * 128), then 32 */
                __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
                for (int64_t w = w0; w < w0 + 4 && w < lp / 64; w++)
                    for (uint64_t bits = ba[w]; bits; bits &= bits - 1) {
                        const int8_t *nv = attn->v + (64 * w + __builtin_ctzll(bits)) * hd + h * d + c0;
                        lo = _mm512_add_epi16(lo, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(lm0, nv)));
                        if (lm1) hi = _mm512_add_epi16(hi, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(lm1, nv + 32)));
                    }
                cn[0] = _mm512_add_epi32(cn[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(lo)));
                cn[1] = _mm512_add_epi32(cn[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(lo, 1)));
                cn[2] = _mm512_add_epi32(cn[2], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(hi)));
                cn[3] = _mm512_add_epi32(cn[3], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(hi, 1)));
            }
            for (int v = 0; v < 4 && 16 * v < n; v++) {
                __mmask16 lm = n - 16 * v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - 16 * v)) - 1);
                store16(lm, attn->out + i * attn->ldo + h * d + c0 + 16 * v,
                        _mm512_mul_ps(_mm512_cvtepi32_ps(cn[v]), sv));
                if (attn->counts) _mm512_mask_storeu_epi32(attn->counts + i * hd + h * d + c0 + 16 * v, lm, cn[v]);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* softmax attention on k-bit levels                                                     */

/* softmax_exp on 16 lanes (the same float operations in the same order) */
BB_INLINE BB_AVX512 __m512 softmax_exp16_avx512(__m512 t) {
#define BB_C(v) _mm512_set1_ps(v)
    __m512 qf = _mm512_roundscale_ps(_mm512_mul_ps(t, BB_C(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 s = _mm512_fmadd_ps(qf, BB_C(-0.693145751953125f), t);
    s = _mm512_fmadd_ps(qf, BB_C(-1.428606765330187045e-06f), s);
    __m512 u = BB_C(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, BB_C(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, BB_C(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, BB_C(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, BB_C(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, BB_C(0.5f));
    u = _mm512_add_ps(BB_C(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    return _mm512_scalef_ps(u, qf); /* u 2^q rounded once, as u 2^(q >> 1) 2^(q - (q >> 1)) (gelu16_avx512) */
#undef BB_C
}

/* softmax_sum_tree of 16 lanes */
BB_INLINE BB_AVX512 float softmax_sum16_avx512(__m512 s) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

/* the valid-key bits of keys j .. j + 15 (j a multiple of 16; none from L on) */
BB_INLINE uint16_t valid16(const kattn_args *attn, int64_t j) {
    if (j >= attn->L) return 0;
    uint16_t bits = (uint16_t)(attn->valid[j >> 6] >> (j & 63));
    return attn->L - j < 16 ? bits & (uint16_t)((1u << (attn->L - j)) - 1) : bits;
}

/* The softmax steps of query row i of head h from its integer scores S [lp] (ksoftmax_head_body's
 * float operations in its order, 16 keys at a time; the keys with a grid level >= 1 compressed
 * into a list) and the counts of 64 channels in 16-bit lanes (|count| < 2 grid Q, far inside 16
 * bits). e: [lp] floats, keys and grid: [L] ints. */
BB_INLINE BB_AVX512 void ksoftmax_row_avx512(const kattn_args *attn, int64_t h, int64_t i, const int32_t *S,
                                             int64_t lp, float *e, int32_t *keys, int32_t *grid) {
    int64_t L = attn->L, d = attn->d, hd = attn->H * attn->d;
    const __m512 scale = _mm512_set1_ps(attn->score_scale), div = _mm512_set1_ps(attn->score_div);
    const __m512 levels = _mm512_set1_ps((float)attn->grid), sv = _mm512_set1_ps(attn->step_v);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    /* a divisor 2^k (sqrt d for d = 4^k): the product by 2^-k, the same real number rounded once */
    const int pow2 = attn->score_div == (float)(1 << ilogbf(attn->score_div)) && ilogbf(attn->score_div) < 30;
    const __m512 inv_div = _mm512_set1_ps(pow2 ? 1.0f / attn->score_div : 0.0f);
    for (int64_t j = 0; j < lp; j += 16) { /* the float scores, the largest of the valid ones */
        __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(S + j)), scale);
        __m512 score = pow2 ? _mm512_mul_ps(y, inv_div) : _mm512_div_ps(y, div);
        _mm512_storeu_ps(e + j, score);
        mx = _mm512_mask_max_ps(mx, valid16(attn, j), score, mx);
    }
    float m = _mm512_reduce_max_ps(mx);
    int64_t n = 0;
    if (m != -INFINITY) {
        const __m512 mv = _mm512_set1_ps(m), floor = _mm512_set1_ps(-104.0f);
        __m512 partial = _mm512_setzero_ps();
        for (int64_t j = 0; j < lp; j += 16) {
            __m512 t = _mm512_sub_ps(_mm512_loadu_ps(e + j), mv);
            __mmask16 kept = valid16(attn, j) & _mm512_cmp_ps_mask(t, floor, _CMP_GE_OQ);
            __m512 x = _mm512_maskz_mov_ps(kept, softmax_exp16_avx512(_mm512_maskz_mov_ps(kept, t)));
            _mm512_storeu_ps(e + j, x);
            partial = _mm512_add_ps(partial, x);
        }
        const __m512 sum = _mm512_set1_ps(softmax_sum16_avx512(partial)), one = _mm512_set1_ps(1.0f);
        /* fl(e inv) G within a relative 2^-21 of fl(fl(e / sum) G): below 0.5 (1 - 2^-16), every
         * level of the 16 keys is 0 (0.5 itself rounds to 0), and the divisions are skipped */
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_cvtss_f32(sum)), cut = _mm512_set1_ps(0.5f * (1.0f - 0x1p-16f));
        for (int64_t j = 0; j < L; j += 16) {
            if (!(_mm512_cmp_ps_mask(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(e + j), inv), levels), cut, _CMP_GE_OQ) &
                  valid16(attn, j)))
                continue;
            __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_div_ps(_mm512_loadu_ps(e + j), sum), levels),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __mmask16 some = _mm512_cmp_ps_mask(r, one, _CMP_GE_OQ) & valid16(attn, j);
            if (!some) continue;
            _mm512_mask_compressstoreu_epi32(keys + n, some, _mm512_add_epi32(lane, _mm512_set1_epi32((int)j)));
            _mm512_mask_compressstoreu_epi32(grid + n, some, _mm512_cvttps_epi32(r));
            n += __builtin_popcount(some);
        }
    }
    for (int64_t c0 = 0; c0 < d; c0 += 64) { /* the counts of 64 channels over the listed keys */
        int64_t nc = d - c0 < 64 ? d - c0 : 64;
        __mmask32 lm0 = nc >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << nc) - 1);
        __mmask32 lm1 = nc >= 64 ? (__mmask32)0xFFFFFFFFu : nc > 32 ? (__mmask32)((1u << (nc - 32)) - 1) : 0;
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
        for (int64_t x = 0; x < n; x++) {
            const int8_t *nv = attn->v + (int64_t)keys[x] * hd + h * d + c0;
            __m512i r = _mm512_set1_epi16((short)grid[x]);
            lo = _mm512_add_epi16(lo, _mm512_mullo_epi16(r, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(lm0, nv))));
            if (lm1)
                hi = _mm512_add_epi16(hi, _mm512_mullo_epi16(r, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(lm1, nv + 32))));
        }
        __m512i cn[4] = {_mm512_cvtepi16_epi32(_mm512_castsi512_si256(lo)),
                         _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(lo, 1)),
                         _mm512_cvtepi16_epi32(_mm512_castsi512_si256(hi)),
                         _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(hi, 1))};
        for (int v = 0; v < 4 && 16 * v < nc; v++) {
            __mmask16 lm = nc - 16 * v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nc - 16 * v)) - 1);
            store16(lm, attn->out + i * attn->ldo + h * d + c0 + 16 * v,
                    _mm512_mul_ps(_mm512_cvtepi32_ps(cn[v]), sv));
            if (attn->counts) _mm512_mask_storeu_epi32(attn->counts + i * hd + h * d + c0 + 16 * v, lm, cn[v]);
        }
    }
}

/* ksoftmax_head_body with kattn_head_avx512's integer scores (128 keys in 16-bit lanes) and
 * ksoftmax_row_avx512: the same integers and float operations, in the same order. */
BB_AVX512 void ksoftmax_head_avx512(const kattn_args *attn, int64_t h, int32_t *scratch) {
    int64_t L = attn->L, d = attn->d, hd = attn->H * attn->d, lp = (L + 127) / 128 * 128;
    if (d > 600) {
        ksoftmax_head_body(attn, h, scratch);
        return;
    }
    int16_t *kt = (int16_t *)scratch;       /* [d][lp] the head's key levels, transposed */
    int32_t *S = (int32_t *)(kt + d * lp);  /* [lp] one query's integer scores */
    float *e = (float *)(S + lp);           /* [lp] its float scores, then exponentials */
    int32_t *keys = (int32_t *)(e + lp);    /* [L] the keys with a grid level >= 1 */
    int32_t *grid = keys + L;               /* [L] their levels */
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = 0; j < lp; j++) kt[c * lp + j] = j < L ? attn->k[j * hd + h * d + c] : 0;
    for (int64_t i = 0; i < L; i++) {
        const int8_t *qi = attn->q + i * hd + h * d;
        for (int64_t j0 = 0; j0 < lp; j0 += 128) {
            __m512i acc[4];
            for (int v = 0; v < 4; v++) acc[v] = _mm512_setzero_si512();
            for (int64_t c = 0; c < d; c++) {
                if (!qi[c]) continue;
                __m512i qv = _mm512_set1_epi16(qi[c]);
                const int16_t *kc = kt + c * lp + j0;
                for (int v = 0; v < 4; v++)
                    acc[v] = _mm512_add_epi16(acc[v], _mm512_mullo_epi16(qv, _mm512_loadu_si512(kc + 32 * v)));
            }
            for (int v = 0; v < 8; v++) {
                __m256i half = v & 1 ? _mm512_extracti64x4_epi64(acc[v >> 1], 1) : _mm512_castsi512_si256(acc[v >> 1]);
                _mm512_storeu_si512(S + j0 + 16 * v, _mm512_cvtepi16_epi32(half));
            }
        }
        ksoftmax_row_avx512(attn, h, i, S, lp, e, keys, grid);
    }
}

/* ------------------------------------------------------------------------------------ */
/* with VNNI (vpdpbusd): the integer scores 64 products per instruction                   */

/* The scores S_ij = sum_c q_ic k_jc of head h as vpdpbusd computes them: the query's levels
 * offset to unsigned bytes u = q + 128, four channels per 32-bit lane, against the keys' levels
 * (signed bytes, 4 channels of one key per lane, 16 keys per vector), then S = acc - 128 sum_c
 * k_jc. Exact integers (no saturation: vpdpbusd adds into int32). kq: [d4][lp][4] the head's key
 * levels (0 past d and L), koff [lp]: 128 sum_c k_jc; qu: [d4] the query's four bytes per int. */
static BB_AVX512_VNNI void vnni_keys(const kattn_args *attn, int64_t h, int64_t lp, int8_t *kq, int32_t *koff) {
    int64_t L = attn->L, d = attn->d, hd = attn->H * attn->d, d4 = (d + 3) / 4;
    int32_t *kq32 = (int32_t *)kq; /* [d4][lp]: four channels of one key per int */
    for (int64_t j = 0; j < lp; j++) {
        if (j >= L) {
            for (int64_t g = 0; g < d4; g++) kq32[g * lp + j] = 0;
            koff[j] = 0;
            continue;
        }
        const int8_t *row = attn->k + j * hd + h * d;
        int32_t sum = 0;
        for (int64_t c = 0; c < d; c++) sum += row[c];
        for (int64_t g = 0; g < d / 4; g++) {
            int32_t word;
            memcpy(&word, row + 4 * g, 4);
            kq32[g * lp + j] = word;
        }
        if (d % 4) { /* the last group, padded with 0 */
            uint32_t word = 0;
            for (int64_t c = d / 4 * 4; c < d; c++) word |= (uint32_t)(uint8_t)row[c] << (8 * (c & 3));
            kq32[(d4 - 1) * lp + j] = (int32_t)word;
        }
        koff[j] = 128 * sum;
    }
}

BB_INLINE BB_AVX512_VNNI void vnni_scores(const kattn_args *attn, int64_t h, int64_t i, int64_t lp, const int8_t *kq,
                                          const int32_t *koff, int32_t *S) {
    int64_t d = attn->d, hd = attn->H * attn->d, d4 = (d + 3) / 4;
    const int8_t *qi = attn->q + i * hd + h * d;
    uint32_t qu[160]; /* 64 bytes at a time: q + 128 (q XOR 0x80), 0 past d */
    for (int64_t c = 0; c < 4 * d4; c += 64) {
        __mmask64 lm = d - c >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (d - c)) - 1;
        __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(lm, qi + c), _mm512_set1_epi8((char)0x80));
        _mm512_storeu_si512((char *)qu + c, _mm512_maskz_mov_epi8(lm, u));
    }
    for (int64_t j0 = 0; j0 < lp; j0 += 128) {
        __m512i acc[8];
        for (int v = 0; v < 8; v++) acc[v] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(koff + j0 + 16 * v));
        for (int64_t g = 0; g < d4; g++) {
            __m512i qv = _mm512_set1_epi32((int)qu[g]);
            const int8_t *kg = kq + (g * lp + j0) * 4;
            for (int v = 0; v < 8; v++) acc[v] = _mm512_dpbusd_epi32(acc[v], qv, _mm512_loadu_si512(kg + 64 * v));
        }
        for (int v = 0; v < 8; v++) _mm512_storeu_si512(S + j0 + 16 * v, acc[v]);
    }
}

/* kattn_head_avx512 with vpdpbusd for both products (d a multiple of 16, else kattn_head_avx512):
 * the scores as vnni_scores computes them, then the counts of 16 channels per vector over 4 keys
 * per 32-bit lane, the attended keys as unsigned bytes 0 / 1 against the values' levels (signed
 * bytes; 64 channels: every group of 4 keys, even and odd groups in two sets of sums, added at the
 * end; fewer: a group none of whose keys is attended skipped). The same integers. */
BB_AVX512_VNNI void kattn_head_vnni(const kattn_args *attn, int64_t h, int32_t *scratch) {
    int64_t L = attn->L, d = attn->d, hd = attn->H * attn->d, lp = (L + 127) / 128 * 128;
    if (d > 600 || d % 16) {
        kattn_head_avx512(attn, h, scratch);
        return;
    }
    int8_t *kq = (int8_t *)scratch;    /* [d / 4][lp][4] */
    int32_t *koff = (int32_t *)(kq + d * lp); /* [lp] */
    int32_t *S = koff + lp;            /* [lp] */
    int8_t *vq = (int8_t *)(S + lp);   /* [lp / 4][d][4] the head's value levels, 4 keys per 32-bit lane */
    uint8_t *ba = (uint8_t *)(vq + lp * d); /* [lp] the attended keys of one query, 0 or 1 */
    vnni_keys(attn, h, lp, kq, koff);
    for (int64_t g = 0; g < lp / 4; g++) /* keys 4g .. 4g + 3 interleaved byte by byte, 16 channels at a time */
        for (int64_t c = 0; c < d; c += 16) {
            __m128i r[4];
            for (int t = 0; t < 4; t++)
                r[t] = 4 * g + t < L ? _mm_loadu_si128((const __m128i *)(attn->v + (4 * g + t) * hd + h * d + c))
                                     : _mm_setzero_si128();
            __m128i lo01 = _mm_unpacklo_epi8(r[0], r[1]), hi01 = _mm_unpackhi_epi8(r[0], r[1]);
            __m128i lo23 = _mm_unpacklo_epi8(r[2], r[3]), hi23 = _mm_unpackhi_epi8(r[2], r[3]);
            __m128i *o = (__m128i *)(vq + (g * d + c) * 4);
            _mm_storeu_si128(o, _mm_unpacklo_epi16(lo01, lo23));
            _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(lo01, lo23));
            _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(hi01, hi23));
            _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(hi01, hi23));
        }
    const __m512 sv = _mm512_set1_ps(attn->step_v);
    const __m128i one = _mm_set1_epi8(1);
    for (int64_t i = 0; i < L; i++) {
        vnni_scores(attn, h, i, lp, kq, koff, S);
        for (int64_t j = 0; j < lp; j += 16) { /* S > 0 and key valid (keys past L: no valid bit) */
            __mmask16 pos = _mm512_mask_cmpgt_epi32_mask((__mmask16)valid16(attn, j), _mm512_loadu_si512(S + j),
                                                         _mm512_setzero_si512());
            _mm_storeu_si128((__m128i *)(ba + j), _mm_maskz_mov_epi8(pos, one));
        }
        const int32_t *groups = (const int32_t *)ba;
        for (int64_t c0 = 0; c0 < d; c0 += 64) { /* the counts of 64 channels over the attended keys */
            int64_t n = d - c0 < 64 ? d - c0 : 64, nv = n / 16;
            __m512i cn[4];
            for (int v = 0; v < 4; v++) cn[v] = _mm512_setzero_si512();
            if (n == 64) { /* lp / 4 is even */
                __m512i odd[4] = {cn[0], cn[0], cn[0], cn[0]};
                for (int64_t g = 0; g < lp / 4; g += 2) {
                    __m512i b0 = _mm512_set1_epi32(groups[g]), b1 = _mm512_set1_epi32(groups[g + 1]);
                    const int8_t *vg = vq + (g * d + c0) * 4;
                    for (int v = 0; v < 4; v++) {
                        cn[v] = _mm512_dpbusd_epi32(cn[v], b0, _mm512_loadu_si512(vg + 64 * v));
                        odd[v] = _mm512_dpbusd_epi32(odd[v], b1, _mm512_loadu_si512(vg + 4 * d + 64 * v));
                    }
                }
                for (int v = 0; v < 4; v++) cn[v] = _mm512_add_epi32(cn[v], odd[v]);
            }
            for (int64_t g = 0; g < lp / 4 && n < 64; g++) {
                if (!groups[g]) continue;
                __m512i bv = _mm512_set1_epi32(groups[g]);
                const int8_t *vg = vq + (g * d + c0) * 4;
                for (int v = 0; v < nv; v++) cn[v] = _mm512_dpbusd_epi32(cn[v], bv, _mm512_loadu_si512(vg + 64 * v));
            }
            for (int v = 0; v < nv; v++) {
                _mm512_storeu_ps(attn->out + i * attn->ldo + h * d + c0 + 16 * v, _mm512_mul_ps(_mm512_cvtepi32_ps(cn[v]), sv));
                if (attn->counts) _mm512_storeu_si512(attn->counts + i * hd + h * d + c0 + 16 * v, cn[v]);
            }
        }
    }
}

/* ksoftmax_head_avx512 with vnni_scores: the same integers, the same float operations */
BB_AVX512_VNNI void ksoftmax_head_vnni(const kattn_args *attn, int64_t h, int32_t *scratch) {
    int64_t L = attn->L, d = attn->d, lp = (L + 127) / 128 * 128;
    if (d > 600) {
        ksoftmax_head_body(attn, h, scratch);
        return;
    }
    int8_t *kq = (int8_t *)scratch;                   /* [d4][lp][4] */
    int32_t *koff = (int32_t *)(kq + (d + 3) / 4 * 4 * lp); /* [lp] */
    int32_t *S = koff + lp;                           /* [lp] */
    float *e = (float *)(S + lp);                     /* [lp] */
    int32_t *keys = (int32_t *)(e + lp), *grid = keys + L; /* [L] each */
    vnni_keys(attn, h, lp, kq, koff);
    for (int64_t i = 0; i < L; i++) {
        vnni_scores(attn, h, i, lp, kq, koff, S);
        ksoftmax_row_avx512(attn, h, i, S, lp, e, keys, grid);
    }
}

/* ------------------------------------------------------------------------------------ */
/* the k-bit quantizer (kbit.c has its formulas)                                         */

/* The quantizer's row sums (kbit_row_sum_portable): 32 columns per step, partial sums 0-7, 8-15,
 * 16-23 and 24-31 in four vectors of doubles (a masked tail adds +0.0), added as row_sum_tree
 * does: the vectors' sums, then halves. */
BB_INLINE BB_AVX512 double sum_tree_avx512(__m512d s0, __m512d s1, __m512d s2, __m512d s3) {
    __m512d t = _mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3));
    __m256d u = _mm256_add_pd(_mm512_castpd512_pd256(t), _mm512_extractf64x4_pd(t, 1));
    __m128d w = _mm_add_pd(_mm256_castpd256_pd128(u), _mm256_extractf128_pd(u, 1));
    return _mm_cvtsd_f64(w) + _mm_cvtsd_f64(_mm_unpackhi_pd(w, w));
}

/* 8 floats at p (the first n of them, the rest +0.0) in doubles */
BB_INLINE BB_AVX512 __m512d load8_pd(const float *p, int64_t n) {
    return _mm512_cvtps_pd(n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskz_loadu_ps((__mmask8)((1u << (n > 0 ? n : 0)) - 1), p));
}

/* the squares summed with fused multiply-adds: x^2 is exact in double, so each is x^2 + s rounded once */
BB_AVX512 double kbit_row_sum_avx512(const float *x, int64_t C, float *amax, double *sumsq) {
    __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0;
    __m512 largest = _mm512_setzero_ps();
    const __m512d one = _mm512_set1_pd(1.0);
    for (int64_t c = 0; c < C; c += 32) {
        __mmask32 lm = C - c >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (C - c)) - 1);
        __m512d d0 = load8_pd(x + c, C - c), d1 = load8_pd(x + c + 8, C - c - 8);
        __m512d d2 = load8_pd(x + c + 16, C - c - 16), d3 = load8_pd(x + c + 24, C - c - 24);
        s0 = _mm512_fmadd_pd(d0, one, s0), s1 = _mm512_fmadd_pd(d1, one, s1); /* d * 1 + s: the sum, rounded once */
        s2 = _mm512_fmadd_pd(d2, one, s2), s3 = _mm512_fmadd_pd(d3, one, s3);
        q0 = _mm512_fmadd_pd(d0, d0, q0), q1 = _mm512_fmadd_pd(d1, d1, q1);
        q2 = _mm512_fmadd_pd(d2, d2, q2), q3 = _mm512_fmadd_pd(d3, d3, q3);
        __m512 v0 = _mm512_maskz_loadu_ps((__mmask16)lm, x + c), v1 = _mm512_maskz_loadu_ps((__mmask16)(lm >> 16), x + c + 16);
        largest = _mm512_range_ps(largest, _mm512_range_ps(v0, v1, 0x0B), 0x0B); /* max |.|, sign cleared */
    }
    *amax = _mm512_reduce_max_ps(largest);
    *sumsq = sum_tree_avx512(q0, q1, q2, q3);
    return sum_tree_avx512(s0, s1, s2, s3);
}

/* the deviations' squares (the fallback of kbit.c's std_from_squares), lanes past C adding +0.0 */
BB_AVX512 double kbit_row_deviation_avx512(const float *x, int64_t C, double mean) {
    __m512d s[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    const __m512d mv = _mm512_set1_pd(mean);
    for (int64_t c = 0; c < C; c += 32)
        for (int v = 0; v < 4; v++) {
            int64_t n = C - c - 8 * v;
            __mmask8 lm = n >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (n > 0 ? n : 0)) - 1);
            __m512d d = _mm512_maskz_sub_pd(lm, load8_pd(x + c + 8 * v, n), mv);
            s[v] = _mm512_add_pd(s[v], _mm512_mul_pd(d, d));
        }
    return sum_tree_avx512(s[0], s[1], s[2], s[3]);
}

/* |level| (kbit_level) of 16 values, from the thresholds: the guess n = rint(fl(|x| inv)) (inv a
 * little below 1 / step, kbit.c: |level| or one below it), at most Q, then one up where
 * |x| >= thr of n + 1 (above[n]) */
BB_INLINE BB_AVX512 __m512i kbit_mag16_avx512(__m512 a, __m512 inv, __m512 above, __m512i qv) {
    __m512i n = _mm512_min_epu32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qv); /* too large: 2^31 */
    __mmask16 up = _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(n, above), _CMP_GE_OQ);
    return _mm512_mask_add_epi32(n, up, n, _mm512_set1_epi32(1));
}

/* 4 vectors of 16 int32 (-128 .. 127, or saturated to it) as 64 bytes in order (a's first) */
BB_INLINE BB_AVX512 __m512i bytes64(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i p = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d)); /* lane-wise */
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), p);
}

/* kbit_pack_row_portable's levels without a division: |level| >= j exactly when |x| >= thr[j - 1]
 * (kbit.c, level_thresholds), so for K = 2 one compare gives the magnitude plane, for K = 4
 * kbit_mag16_avx512; the sign (of a level != 0) is x's sign bit. 64 columns at a time: K = 2 joins
 * the masks of its 4 vectors in general registers, K = 4 packs their magnitudes and signs into
 * bytes and tests those.
 * Each plane's word is stored once. A step that is not a positive finite float (every level 0)
 * takes the portable kernel. */
BB_INLINE BB_AVX512 void kbit_pack_body_avx512(const quantize_args *q, int64_t m, const int K) {
    const int Q = (1 << (K - 1)) - 1;
    const float *xr = q->x + m * q->ldx;
    const int64_t C = q->C, ldo = q->ldo;
    uint64_t *out = q->out ? q->out + m * K * ldo : NULL;
    int8_t *levels = q->levels ? q->levels + m * C : NULL;
    const int sm = q->row_mag != NULL;
    float above_t[16];
    for (int j = 0; j < 16; j++) above_t[j] = j < Q ? q->thr[j] : NAN;
    const __m512 inv = _mm512_set1_ps(q->inv), t1 = _mm512_set1_ps(q->thr[0]), above = _mm512_loadu_ps(above_t);
    const __m512i qv = _mm512_set1_epi32(Q), zero = _mm512_setzero_si512();
    __m512i mag_acc = zero; /* K = 4: the magnitudes' byte sums, 8 a lane */
    int64_t mag_sum = 0;    /* K = 2: popcounts of the magnitude plane */
    for (int64_t w = 0; w < ldo; w++) {
        uint64_t vd = 0, sg = 0, mg = 0; /* K = 2: the 16-bit masks assembled in general registers */
        __m512i v[4], n[4];
        for (int s = 0; s < 4; s++) {
            int64_t c = 64 * w + 16 * s;
            __mmask16 lm = c >= C ? 0 : C - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (C - c)) - 1);
            v[s] = _mm512_castps_si512(lm == 0xFFFF ? _mm512_loadu_ps(xr + c) : _mm512_maskz_loadu_ps(lm, xr + c));
            __m512 a = _mm512_abs_ps(_mm512_castsi512_ps(v[s]));
            vd |= (uint64_t)lm << (16 * s);
            if (K == 2) {
                sg |= (uint64_t)_cvtmask16_u32(_mm512_movepi32_mask(v[s])) << (16 * s);
                mg |= (uint64_t)_cvtmask16_u32(_mm512_cmp_ps_mask(a, t1, _CMP_GE_OQ)) << (16 * s); /* |level| = 1 */
            } else {
                n[s] = kbit_mag16_avx512(a, inv, above, qv);
            }
        }
        if (K == 2) {
            mag_sum += __builtin_popcountll(mg);
            if (levels) {
                __m512i pm = _mm512_mask_blend_epi8(sg, _mm512_set1_epi8(1), _mm512_set1_epi8(-1));
                _mm512_mask_storeu_epi8(levels + 64 * w, vd, _mm512_maskz_mov_epi8(mg, pm));
            }
            if (out && sm) { /* |level|, then the sign */
                out[w] = mg, out[ldo + w] = sg & vd;
            } else if (out) { /* u = level + 1: bit 0 where level = 0, bit 1 where level = 1 */
                out[w] = vd & ~mg, out[ldo + w] = mg & ~sg;
            }
            continue;
        }
        __m512i n8 = bytes64(n[0], n[1], n[2], n[3]); /* |level| */
        sg = _cvtmask64_u64(_mm512_movepi8_mask(bytes64(v[0], v[1], v[2], v[3]))); /* x < 0 (saturated) */
        __m512i level8 = _mm512_mask_sub_epi8(n8, sg, zero, n8);
        if (levels) _mm512_mask_storeu_epi8(levels + 64 * w, vd, level8);
        if (sm) mag_acc = _mm512_add_epi64(mag_acc, _mm512_sad_epu8(n8, zero));
        if (out && sm) {
            for (int b = 0; b < K - 1; b++) out[b * ldo + w] = _cvtmask64_u64(_mm512_test_epi8_mask(n8, _mm512_set1_epi8((char)(1 << b))));
            out[(K - 1) * ldo + w] = sg & vd;
        } else if (out) { /* u = level + Q */
            __m512i u8 = _mm512_add_epi8(level8, _mm512_set1_epi8((char)Q));
            for (int b = 0; b < K; b++)
                out[b * ldo + w] = _cvtmask64_u64(_mm512_mask_test_epi8_mask(vd, u8, _mm512_set1_epi8((char)(1 << b))));
        }
    }
    if (sm) q->row_mag[m] = K == 2 ? mag_sum : _mm512_reduce_add_epi64(mag_acc);
}

BB_AVX512 void kbit_pack_row_avx512(const quantize_args *q, int64_t m) {
    if (!(q->step > 0.0f && q->step <= 3.0e38f))
        kbit_pack_row_portable(q, m);
    else if (q->bits == 2)
        kbit_pack_body_avx512(q, m, 2);
    else
        kbit_pack_body_avx512(q, m, 4);
}

#endif
