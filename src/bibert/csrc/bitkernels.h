/* The C interface of the packed BiBERT engine's bitwise kernels (src/bibert/csrc), loaded with
 * ctypes by bibert/packed/kernels.py, whose table of argument and result types must match
 * these declarations (tests/test_kernels.py parses this file and checks it).
 *
 * Bits: bit 1 <=> -1, bit 0 <=> +1; element j of a row in uint64 word j / 64, bit j % 64;
 * padding bits 0. Every entry point that takes sizes checks them (and its pointers) before it
 * touches memory and returns BB_OK, BB_ENOMEM or BB_EINVAL; zero rows is a no-op. That each
 * buffer is as long as its sizes say is the caller's part. The driver of each op family (pack.c,
 * linear.c, ...; runtime.c for the settings) has the details of each contract beside its definition.
 */
#ifndef BIBERT_BITKERNELS_H
#define BIBERT_BITKERNELS_H

#include <stdint.h>

#define BB_ABI_VERSION 19 /* changes with any declaration below */

enum { BB_OK = 0, BB_ENOMEM = -1, BB_EINVAL = -2 }; /* the entry points' return codes */
enum { BB_KERNEL_AUTO = 0, BB_KERNEL_PORTABLE = 1, BB_KERNEL_AVX512 = 2, BB_KERNEL_AVX2 = 3 };
enum { BB_ATTENTION_BI = 0, BB_ATTENTION_SOFTMAX = 1 }; /* the attention of bb_forward_kbit */

/* One encoder layer's parameters for bb_encoder. Linears: weight panels (bit rows re-laid in
 * panels of 32 output channels); a bit-output Linear's integer thresholds and flips
 * (bb_bit_thresholds), a float-output one's epilogue c0, c1 (bb_float_epilogue). Elastic
 * binarization (may be NULL): ctx_t [H] thresholds of the context bits, ln1_t [H] of the bits
 * the first LayerNorm packs, ln2_t [H] of those the second packs (the next layer's Q/K/V
 * input); score_lim [heads] or score_rel [heads, d + 1]: bb_biattention's lim or rel. */
typedef struct {
    const uint64_t *qkv_w; const int64_t *qkv_thr; const uint32_t *qkv_flip;
    const uint64_t *ao_w; const float *ao_c0, *ao_c1;
    const float *ln1_g, *ln1_b;
    const uint64_t *fi_w; const int64_t *fi_thr; const uint32_t *fi_flip;
    const uint64_t *fo_w; const float *fo_c0, *fo_c1;
    const float *ln2_g, *ln2_b;
    const float *ctx_t, *ln1_t, *ln2_t;
    const int64_t *score_lim, *score_rel;
} bb_layer;

/* The parts of a model around its encoder, for bb_forward: the embeddings (word bits [vocab,
 * words(H)] with their alphas [vocab], positions [positions, H], token types [types, H]) and
 * their LayerNorm (ln_t [H]: thresholds of the bits it packs, the first layer's Q/K/V input; may
 * be NULL), and the pooler (H x H panels, float epilogue c0, c1; pool_t [H]: thresholds of its
 * input bits, may be NULL). */
typedef struct {
    const uint64_t *word_bits; const float *word_alpha; int64_t vocab;
    const float *pos; int64_t positions;
    const float *type; int64_t types;
    const float *ln_g, *ln_b, *ln_t;
    const uint64_t *pool_w; const float *pool_c0, *pool_c1, *pool_t;
} bb_model;

/* One binary Linear of a 2- or 4-bit model for bb_forward_kbit: weight panels, alpha [N], bias
 * [N] and the count offsets [N] (popcount(w_n) + Q K) of bb_linear_kbit. */
typedef struct {
    const uint64_t *w; const float *alpha, *bias; const int64_t *count_offset;
} bb_kbit_linear;

/* One encoder layer of a 2- or 4-bit model for bb_forward_kbit: its Linears (Q/K/V fused into
 * 3H outputs, attention output, FFN in, FFN out) and its two LayerNorms. */
typedef struct {
    bb_kbit_linear qkv, ao, fi, fo;
    const float *ln1_g, *ln1_b, *ln2_g, *ln2_b;
} bb_kbit_layer;

/* BB_ABI_VERSION of the library. */
int bb_abi_version(void);
/* 1 if this CPU runs the AVX-512 (F, BW, DQ, VL, VPOPCNTDQ) kernels, else 0. */
int bb_cpu_has_avx512(void);
/* 1 if this CPU runs the AVX2 (with FMA and POPCNT) kernels, else 0. */
int bb_cpu_has_avx2(void);
/* Selects a kernel family (BB_KERNEL_*; AUTO: the fastest here); returns the active one, or -1 if this CPU lacks it. */
int bb_set_kernel(int kernel);
/* The active kernel family (BB_KERNEL_PORTABLE, _AVX512 or _AVX2). */
int bb_get_kernel(void);
/* Threads of the engine's pool, clamped to [1, 1024]; process-wide. */
void bb_set_threads(int n);
/* Threads of the engine's pool. */
int bb_get_threads(void);
/* How long (microseconds, 0 to 1000000) an idle worker of the pool polls for work before it
 * sleeps; process-wide. Returns BB_OK, or BB_EINVAL out of range. */
int bb_set_spin_us(int64_t us);
/* That time, in microseconds. */
int64_t bb_get_spin_us(void);

/* Sign bits [M, ldo] of floats [M, ldx]: x < 0, or !(x - t >= 0) with per-column thresholds t [K] (may be NULL). */
int bb_sign_pack(const float *x, int64_t M, int64_t K, int64_t ldx, uint64_t *out, int64_t ldo, const float *t);
/* Binary Linear of bits a [M, lda] and panels: float out [M, N] = c0 + c1 * popcount [+ residual], or bits out_bits [M, ldo] decided by thr / flip. */
int bb_linear(const uint64_t *a, int64_t M, int64_t lda, int64_t K, const uint64_t *w_panels, int64_t N,
              const float *c0, const float *c1, const float *residual, float *out, uint64_t *out_bits,
              int64_t ldo, const int64_t *thr, const uint32_t *flip);
/* Integer thresholds thr [N] and flips [N] that decide the bit of alpha * (K - 2p) + bias (against compare values t [N], may be NULL) exactly. */
int bb_bit_thresholds(const float *alpha, const float *bias, const float *t, int64_t K, int64_t N, int64_t *thr,
                      uint8_t *flip);
/* The float epilogue c0, c1 [N] of a binary Linear; with offset [N] (may be NULL) for an input of {0, 1} levels. */
int bb_float_epilogue(const float *alpha, const float *bias, int64_t K, int64_t N, const int64_t *offset,
                      float *c0, float *c1);
/* Sets one kernel family's tile walk of the binary Linear (mr 1 to 6, chunk_bytes 64 to 2^30, float_order 0 or 1). */
int bb_set_tuning(int kernel, int64_t mr, int64_t chunk_bytes, int64_t float_order);
/* One kernel family's tile walk into out[3]: mr, chunk_bytes, float_order. */
int bb_get_tuning(int kernel, int64_t *out);
/* Binary Linear on k-bit input planes a [M * bits, lda]: out [M, N] = ((C * step) * alpha + bias) [+ residual], C exact. */
int bb_linear_kbit(const uint64_t *a, int64_t M, int64_t lda, int64_t K, const uint64_t *w_panels, int64_t N,
                   int bits, float step, const float *alpha, const float *bias, const int64_t *koff,
                   const float *residual, float *out);
/* Row LayerNorm of x [M, H] into out, and with out_bits [M, ldo] its sign bits (against thresholds t [H], may be NULL). */
int bb_layernorm(const float *x, int64_t M, int64_t H, const float *g, const float *b, float eps, float *out,
                 uint64_t *out_bits, int64_t ldo, const float *t);
/* Embedding sum (alpha * word bits + token type) + position of M ids into out [M, H]; each id, type and position checked. */
int bb_embed(const int64_t *ids, const int64_t *type_ids, int64_t M, int64_t L, const uint64_t *word_bits,
             const float *word_alpha, int64_t V, const float *pos, int64_t P, const float *type, int64_t T,
             int64_t H, float *out, const int64_t *positions);
/* Bi-Attention of B sequences of L bit rows of Q, K, V: context bits out [B*L, ldo] and counts (may be NULL); BA by the sign, lim or rel. */
int bb_biattention(const uint64_t *qkv, int64_t ldq, int64_t q_off, int64_t k_off, int64_t v_off, int64_t B,
                   int64_t L, int64_t H, int64_t d, const uint64_t *valid, uint64_t *out, int64_t ldo,
                   int32_t *counts, const float *t, const int64_t *lim, const int64_t *rel);
/* The student's k-bit quantizer of x [M, C] (one clip for the whole tensor) as bit-planes out, its step, and levels (may be NULL). */
int bb_quantize_planes(const float *x, int64_t M, int64_t C, int64_t ldx, int bits, float clip_std, uint64_t *out,
                       int64_t ldo, float *step_out, int8_t *levels);
/* GELU (erf form, float32) of x [M, C] into y (may alias x). */
int bb_gelu(const float *x, int64_t M, int64_t C, float *y);
/* Bi-Attention of one sequence on k-bit levels q, k, v [L, H*d]: context out [L, ldo] = fl(step_v * integer sums), counts (may be NULL). */
int bb_biattention_kbit(const int8_t *q, const int8_t *k, const int8_t *v, int64_t L, int64_t H, int64_t d,
                        float step_v, const uint64_t *valid, float *out, int64_t ldo, int32_t *counts);
/* Softmax attention of one sequence on k-bit levels q, k, v [L, H*d] (steps of each): probabilities on the grid of 2^bits - 1, context out [L, ldo] = fl(integer sums * fl(step_v / (2^bits - 1))), counts (may be NULL). */
int bb_softmax_attention_kbit(const int8_t *q, const int8_t *k, const int8_t *v, int64_t L, int64_t H, int64_t d,
                              int bits, float step_q, float step_k, float step_v, const uint64_t *valid, float *out,
                              int64_t ldo, int32_t *counts);
/* Sets the encoder's row blocking: tail_rows 1 to 4096, group_rows 1 to 2^20. */
int bb_set_encoder_tuning(int64_t tail_rows, int64_t group_rows);
/* The encoder's row blocking into out[2]: tail_rows, group_rows. */
int bb_get_encoder_tuning(int64_t *out);
/* n_layers encoder layers on n_seq sequences packed row after row (rows start[s] to start[s+1]): x [rows, H] and its bits xb updated in place, each layer's output into hidden (may be NULL). */
int bb_encoder(const bb_layer *layers, int64_t n_layers, int64_t n_seq, const int64_t *start, int64_t H,
               int64_t heads, int64_t I, float eps, const uint8_t *row_valid, float *x, uint64_t *xb, float *hidden);
/* Embeddings, their LayerNorm, n_layers encoder layers (as bb_encoder) and the pooler: x, xb as bb_encoder's (without hidden, the last layer's output only in each sequence's first row), hidden (may be NULL) [n_layers + 1, rows, H], pooled [n_seq, H] before the tanh. */
int bb_forward(const bb_model *m, const bb_layer *layers, int64_t n_layers, int64_t n_seq, const int64_t *start,
               int64_t H, int64_t heads, int64_t I, float eps, const int64_t *ids, const int64_t *type_ids,
               const int64_t *positions, const uint8_t *row_valid, float *x, uint64_t *xb, float *hidden,
               float *pooled);
/* The forward of a 2- or 4-bit model (bits; attention BB_ATTENTION_*): embeddings (m's), their LayerNorm, n_layers k-bit layers and the pooler, each sequence on its own: x [rows, H], hidden (may be NULL) [n_layers + 1, rows, H], pooled [n_seq, H] before the tanh. */
int bb_forward_kbit(const bb_model *m, const bb_kbit_linear *pooler, const bb_kbit_layer *layers, int64_t n_layers,
                    int64_t n_seq, const int64_t *start, int64_t H, int64_t heads, int64_t I, float eps, int bits,
                    int attention, float clip_std, const int64_t *ids, const int64_t *type_ids, const int64_t *positions,
                    const uint8_t *row_valid, float *x, float *hidden, float *pooled);

#endif
