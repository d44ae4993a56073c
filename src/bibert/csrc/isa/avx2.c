/* The AVX2 kernel family (AVX2 + FMA + POPCNT, for CPUs without AVX-512): its own binary Linear
 * (popcounts by nibble-table lookups, VPSHUFB + VPSADBW), LayerNorm, GELU and k-bit attention;
 * the portable kernels for the other ops (see the table at the end). Per-function target
 * attributes: the file compiles with the library's plain flags, runtime.c checks the CPU.
 */
#include <math.h>
#include <stdint.h>

#include "portable.h"

#if BB_X86
#include <immintrin.h>

#define BB_AVX2 __attribute__((target("avx2,popcnt")))

/* ------------------------------------------------------------------------------------ */
/* binary Linear                                                                         */

/* popcount of each 64-bit lane: nibble lookups (VPSHUFB) give byte counts, VPSADBW sums
 * the eight bytes of each lane */
BB_INLINE BB_AVX2 __m256i popcnt256_epi64(__m256i v) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
    __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

/* the float epilogue of row m over a whole panel, 8 channels at a time: linear_row_epilogue's
 * multiply and adds in its order (identical results) */
BB_INLINE BB_AVX2 void linear_float_row_avx2(const linear_args *lin, int64_t m, int64_t p, const int64_t *pc) {
    int64_t n0 = p * BB_PANEL;
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    float *o = lin->out + m * lin->N + n0;
    const float *res = lin->residual ? lin->residual + m * lin->N + n0 : NULL;
    for (int c = 0; c < BB_PANEL; c += 8) {
        /* counts < 2^24: their low 32 bits convert exactly */
        __m256i lo = _mm256_permutevar8x32_epi32(_mm256_load_si256((const __m256i *)(pc + c)), even);
        __m256i hi = _mm256_permutevar8x32_epi32(_mm256_load_si256((const __m256i *)(pc + c + 4)), even);
        __m256 pf = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x20));
        __m256 y = _mm256_add_ps(_mm256_loadu_ps(lin->c0 + n0 + c),
                                 _mm256_mul_ps(_mm256_loadu_ps(lin->c1 + n0 + c), pf));
        if (res) y = _mm256_add_ps(y, _mm256_loadu_ps(res + c));
        _mm256_storeu_ps(o + c, y);
    }
}

/* One row block x one panel: rows in pairs x the panel's 32 channels in two halves of 16 (4
 * vectors of 4); 8 accumulators, 4 weight loads for 8 vector popcounts. The counts go to a tile
 * and through the portable epilogue of kind OUT (the float one of whole panels vectorised), so
 * the outputs are the portable path's bit for bit. With mr odd, the last pair counts its row
 * twice into tile[mr] (inside the tile, never read). */
BB_INLINE BB_AVX2 void linear_block_avx2(const linear_args *lin, int64_t r0, int mr, int64_t p, const int OUT) {
    int64_t kw = words_of(lin->K);
    const uint64_t *wp = lin->w + p * kw * BB_PANEL;
    int64_t tile[BB_MR][BB_PANEL] __attribute__((aligned(32)));
    for (int r = 0; r < mr; r += 2) {
        const uint64_t *a0 = lin->a + (r0 + r) * lin->lda;
        const uint64_t *a1 = r + 1 < mr ? a0 + lin->lda : a0;
        for (int half = 0; half < 2; half++) {
            __m256i s0[4], s1[4];
            for (int v = 0; v < 4; v++) s0[v] = s1[v] = _mm256_setzero_si256();
            const uint64_t *w = wp + 16 * half;
            for (int64_t k = 0; k < kw; k++, w += BB_PANEL) {
                __m256i x0 = _mm256_set1_epi64x((long long)a0[k]), x1 = _mm256_set1_epi64x((long long)a1[k]);
                for (int v = 0; v < 4; v++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 4 * v));
                    s0[v] = _mm256_add_epi64(s0[v], popcnt256_epi64(_mm256_xor_si256(x0, wv)));
                    s1[v] = _mm256_add_epi64(s1[v], popcnt256_epi64(_mm256_xor_si256(x1, wv)));
                }
            }
            for (int v = 0; v < 4; v++) {
                _mm256_store_si256((__m256i *)(tile[r] + 16 * half + 4 * v), s0[v]);
                _mm256_store_si256((__m256i *)(tile[r + 1] + 16 * half + 4 * v), s1[v]);
            }
        }
    }
    if (OUT == BB_OUT_FLOAT && panel_channels(lin, p) == BB_PANEL) {
        for (int r = 0; r < mr; r++) linear_float_row_avx2(lin, r0 + r, p, tile[r]);
        return;
    }
    linear_tile_epilogue(lin, r0, mr, p, (const int64_t (*)[BB_PANEL])tile, OUT);
}

#define BB_LINEAR_AVX2(name, OUT)                                                                             \
    BB_AVX2 static void name(const linear_args *lin, int64_t r0, int mr, int64_t p, const uint64_t *prefetch) { \
        (void)prefetch; /* far from memory-bound */                                                           \
        linear_block_avx2(lin, r0, mr, p, OUT);                                                               \
    }
BB_LINEAR_AVX2(linear_bits_avx2, BB_OUT_BITS)
BB_LINEAR_AVX2(linear_float_avx2, BB_OUT_FLOAT)
BB_LINEAR_AVX2(linear_kbit_avx2, BB_OUT_KBIT)

/* ------------------------------------------------------------------------------------ */
/* LayerNorm (the portable kernel's operations, isa/portable.c)                          */

/* AVX2: lanes 0-7 and 8-15 of the 16 partial sums in two registers per row; the elements
 * past the last whole 16 are added one by one (as the portable loop does), then the bits */
BB_INLINE __attribute__((target("avx2"))) void layernorm_block_avx2(
    const float *x, int64_t H, const float *gamma, const float *beta, float eps, float *out, const float *t,
    uint64_t *bits, int64_t ldb, const int R) {
    float lanes[16] __attribute__((aligned(32))), mean[4], rstd[4];
    __m256 lo[4], hi[4];
    int64_t H16 = H & ~(int64_t)15;
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < H16; i += 16)
        for (int r = 0; r < R; r++) {
            lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(x + r * H + i));
            hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(x + r * H + i + 8));
        }
    for (int r = 0; r < R; r++) {
        _mm256_store_ps(lanes, lo[r]);
        _mm256_store_ps(lanes + 8, hi[r]);
        for (int64_t i = H16; i < H; i++) lanes[i & 15] += x[r * H + i];
        float sum = 0.0f;
        for (int l = 0; l < 16; l++) sum += lanes[l];
        mean[r] = sum / (float)H;
        lo[r] = hi[r] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < H16; i += 16)
        for (int r = 0; r < R; r++) {
            __m256 mv = _mm256_set1_ps(mean[r]);
            __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + r * H + i), mv);
            __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + r * H + i + 8), mv);
            lo[r] = _mm256_add_ps(lo[r], _mm256_mul_ps(d0, d0));
            hi[r] = _mm256_add_ps(hi[r], _mm256_mul_ps(d1, d1));
        }
    for (int r = 0; r < R; r++) {
        _mm256_store_ps(lanes, lo[r]);
        _mm256_store_ps(lanes + 8, hi[r]);
        for (int64_t i = H16; i < H; i++) {
            float d = x[r * H + i] - mean[r];
            lanes[i & 15] += d * d;
        }
        float v = 0.0f;
        for (int l = 0; l < 16; l++) v += lanes[l];
        rstd[r] = 1.0f / sqrtf(v / (float)H + eps);
    }
    for (int r = 0; r < R; r++) {
        __m256 mv = _mm256_set1_ps(mean[r]), rv = _mm256_set1_ps(rstd[r]), zero = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= H; i += 8) {
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + r * H + i), mv);
            __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(d, rv), _mm256_loadu_ps(gamma + i)),
                                     _mm256_loadu_ps(beta + i));
            _mm256_storeu_ps(out + r * H + i, y);
            if (bits) {
                __m256 c = t ? _mm256_cmp_ps(_mm256_sub_ps(y, _mm256_loadu_ps(t + i)), zero, _CMP_NGE_UQ)
                             : _mm256_cmp_ps(y, zero, _CMP_LT_OQ);
                uint64_t m8 = (uint64_t)(unsigned)_mm256_movemask_ps(c);
                if ((i & 63) == 0) bits[r * ldb + (i >> 6)] = 0;
                bits[r * ldb + (i >> 6)] |= m8 << (i & 63);
            }
        }
        for (; i < H; i++) {
            float y = (x[r * H + i] - mean[r]) * rstd[r] * gamma[i] + beta[i];
            out[r * H + i] = y;
            if (bits) {
                int bit = t ? !(y - t[i] >= 0.0f) : y < 0.0f;
                if ((i & 63) == 0) bits[r * ldb + (i >> 6)] = 0;
                bits[r * ldb + (i >> 6)] |= (uint64_t)bit << (i & 63);
            }
        }
    }
}

__attribute__((target("avx2"))) static int layernorm_rows_avx2(const float *x, int64_t rows, int64_t H,
                                                               const float *gamma, const float *beta, float eps,
                                                               float *out, const float *t, uint64_t *bits,
                                                               int64_t ldb) {
    if (rows >= 4) {
        layernorm_block_avx2(x, H, gamma, beta, eps, out, t, bits, ldb, 4);
        return 4;
    }
    layernorm_block_avx2(x, H, gamma, beta, eps, out, t, bits, ldb, 1);
    return 1;
}

/* ------------------------------------------------------------------------------------ */
/* k-bit activations: the portable bodies compiled for AVX2 and FMA                      */

__attribute__((target("avx2,fma"))) static void gelu_avx2(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = gelu_one(x[i]);
}

__attribute__((target("avx2"))) static void kattn_head_avx2(const kattn_args *attn, int64_t h, int32_t *scratch) {
    kattn_head_body(attn, h, scratch);
}

__attribute__((target("avx2,fma"))) static void ksoftmax_head_avx2(const kattn_args *attn, int64_t h,
                                                                   int32_t *scratch) {
    ksoftmax_head_body(attn, h, scratch);
}

/* ------------------------------------------------------------------------------------ */
/* the table                                                                             */

const bb_ops bb_ops_avx2 = {
    .family = BB_KERNEL_AVX2,
    .name = "avx2",
    .pack = {sign_pack_row_portable},
    .linear = {{linear_bits_avx2, linear_float_avx2, linear_kbit_avx2}},
    .layernorm = {layernorm_rows_avx2},
    .embed = {embed_row_portable},
    .attention = {transpose64_portable, attn_scores_popcnt, attn_context_popcnt, NULL},
    .kbit = {kbit_row_sum_portable, kbit_row_deviation_portable, kbit_pack_row_portable, gelu_avx2, kattn_head_avx2,
             ksoftmax_head_avx2},
};

#endif
