/* What the two AVX-512 files share: the target attribute of the family, the loads and stores of 16
 * floats (load16, store16), and the attention and k-bit quantizer kernels (isa/avx512_attention.c)
 * that the table in isa/avx512.c lists.
 */
#ifndef BIBERT_ISA_AVX512_H
#define BIBERT_ISA_AVX512_H

#include "portable.h"

#if BB_X86
#include <immintrin.h>

#define BB_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq")))
/* the AVX-512 family on a CPU with VNNI (its table bb_ops_avx512_vnni) */
#define BB_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512vnni")))

/* 16 floats at p: a plain load or store where lm is full (the common case), else a masked one (on
 * AMD Zen 4 the masked store of every vector cost the attention-output Linear 12% of its time) */
BB_INLINE BB_AVX512 __m512 load16(__mmask16 lm, const float *p) {
    return lm == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lm, p);
}

BB_INLINE BB_AVX512 void store16(__mmask16 lm, float *p, __m512 y) {
    if (lm == 0xFFFF)
        _mm512_storeu_ps(p, y);
    else
        _mm512_mask_storeu_ps(p, lm, y);
}

#pragma GCC visibility push(hidden)

void transpose64_avx512(uint64_t a[64]);
void attn_scores_avx512(const attn_args *attn, int64_t bh, int64_t i, uint64_t *ba, int64_t *popcounts);
void attn_context_avx512(const attn_args *attn, int64_t bh, const uint64_t *ba, uint64_t *ctx_bits, int32_t *counts,
                         const float *t);
void attn_row_d64_avx512(const attn_args *attn, int64_t r, uint64_t *ba);
void kattn_head_avx512(const kattn_args *attn, int64_t h, int32_t *scratch);
void ksoftmax_head_avx512(const kattn_args *attn, int64_t h, int32_t *scratch);
void kattn_head_vnni(const kattn_args *attn, int64_t h, int32_t *scratch);
void ksoftmax_head_vnni(const kattn_args *attn, int64_t h, int32_t *scratch);
double kbit_row_sum_avx512(const float *x, int64_t C, float *amax, double *sumsq);
double kbit_row_deviation_avx512(const float *x, int64_t C, double mean);
void kbit_pack_row_avx512(const quantize_args *q, int64_t m);

#pragma GCC visibility pop

#endif

#endif
