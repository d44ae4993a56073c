/* What the files of the bitwise engine share and the outside does not see: the argument
 * checks, the thread pool's interface, bit helpers, the per-op argument structs and the ops
 * table (one per kernel family) through which every driver reaches its kernels.
 *
 * Layout (docs/packed_format.md, "Source layout"):
 *   bitkernels.h      the public C interface (ctypes: bibert/packed/kernels.py)
 *   bb_internal.h     this file
 *   runtime.c         ABI version, CPU features, the kernel family (which ops table runs),
 *                     threads and the thread pool
 *   pack.c linear.c layernorm.c embed.c attention.c kbit.c encoder.c
 *                     one driver per op family: checks, blocking, threads; never names an ISA,
 *                     calls its kernels through bb_ops()
 *   isa/portable.h    the plain C bodies (inlined into every ISA file that reuses them)
 *   isa/portable.c    the portable family's table (and its POPCNT clone)
 *   isa/avx2.c        the AVX2 family's table: its own kernels, portable ones elsewhere
 *   isa/avx512.c      the AVX-512 family's table (with isa/avx512_attention.c)
 * The ISA files use per-function target attributes, not per-file compiler flags, so that the
 * library builds with a plain compiler command and picks a family at run time.
 *
 * Every symbol declared here is hidden: the library exports exactly bitkernels.h.
 */
#ifndef BIBERT_BB_INTERNAL_H
#define BIBERT_BB_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "bitkernels.h"

#if defined(__x86_64__) || defined(__i386__)
#define BB_X86 1
#else
#define BB_X86 0
#endif

#pragma GCC visibility push(hidden)

#define BB_PANEL 32 /* output channels per weight panel */
#define BB_MR 6     /* most rows per micro-tile of the binary Linear */

#define BB_INLINE static inline __attribute__((always_inline))

BB_INLINE int64_t words_of(int64_t bits) { return (bits + 63) >> 6; }

/* ------------------------------------------------------------------------------------ */
/* argument checks                                                                       */

/* Every exported kernel checks its sizes and pointers before it touches memory and returns
 * BB_OK, BB_ENOMEM (an allocation failed) or BB_EINVAL: a size below 1 where one is needed,
 * sizes that disagree (a leading dimension shorter than a row, a bit offset past the row),
 * a size product that could overflow, or a missing buffer. An input of zero rows is a
 * no-op. The checks are O(1) per call (the embedding also checks each token id as it
 * reads it); that the buffers are as long as the sizes say is the caller's part (the
 * Python wrappers check the arrays' shapes). The return codes are bitkernels.h's. */

/* Largest value of any one size or leading dimension: far above any model, small enough
 * that a product of two cannot overflow int64. */
#define BB_MAX_DIM ((int64_t)1 << 31)
/* Largest element count of one buffer: its byte count and every offset into it fit int64. */
#define BB_MAX_ELEMS ((int64_t)1 << 56)

BB_INLINE int dim_ok(int64_t v) { return v >= 1 && v <= BB_MAX_DIM; }   /* a size, at least 1 */
BB_INLINE int count_ok(int64_t v) { return v >= 0 && v <= BB_MAX_DIM; } /* a row count, 0 allowed */

/* a * b * c (each >= 0) is at most BB_MAX_ELEMS, computed without overflow */
static inline int elems_ok(int64_t a, int64_t b, int64_t c) {
    int64_t ab, abc;
    if (a < 0 || b < 0 || c < 0) return 0;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) return 0;
    return abc <= BB_MAX_ELEMS;
}

/* ------------------------------------------------------------------------------------ */
/* thread pool (runtime.c)                                                               */

/* body(ctx, lo, hi, tid): items [lo, hi) of a parallel loop, on thread tid (0 = caller). */
typedef void (*bb_body)(void *ctx, int64_t lo, int64_t hi, int tid);

/* Runs body over [0, n) in chunks of `grain` items on the pool (serially when the team is
 * one thread, when nested, or when there is a single chunk). Not reentrant from several
 * outside threads at once: the engine is driven by one caller at a time. */
void bb_parallel_for(int64_t n, int64_t grain, bb_body body, void *ctx);

/* Threads a kernel may use right now (its per-thread scratch): 1 inside another parallel loop. */
int bb_team(void);

/* grain for row loops: at least `min_work` units of work per chunk, one chunk when small */
static inline int64_t rows_grain(int64_t rows, int64_t work_per_row, int64_t min_work) {
    if (rows * work_per_row <= 2 * min_work) return rows > 0 ? rows : 1;
    int64_t grain = (min_work + work_per_row - 1) / work_per_row;
    return grain < 1 ? 1 : grain;
}

/* ------------------------------------------------------------------------------------ */
/* bit helpers                                                                           */

/* nbits (<= 64) bits of `row` starting at bit `start`, in the low bits of the result. */
static inline uint64_t get_bits64(const uint64_t *row, int64_t start, int nbits) {
    int64_t w = start >> 6;
    int s = (int)(start & 63);
    uint64_t v = row[w] >> s;
    if (s && s + nbits > 64) v |= row[w + 1] << (64 - s);
    return nbits == 64 ? v : v & ((1ULL << nbits) - 1);
}

/* OR nbits (<= 64) low bits of `v` into `row` at bit `start` (target bits must be 0). */
static inline void or_bits64(uint64_t *row, int64_t start, int nbits, uint64_t v) {
    int64_t w = start >> 6;
    int s = (int)(start & 63);
    if (nbits < 64) v &= (1ULL << nbits) - 1;
    row[w] |= v << s;
    if (s && s + nbits > 64) row[w + 1] |= v >> (64 - s);
}

/* ------------------------------------------------------------------------------------ */
/* what each op's kernels take                                                           */

/* One binary Linear (bb_linear, bb_linear_kbit). */
typedef struct {
    const uint64_t *a;         /* [M, lda] activation bits */
    int64_t M, lda, K;         /* K = true input width in bits */
    const uint64_t *w;         /* panels [ceil(N/32), Kw, 32] */
    int64_t N;
    const float *c0, *c1;      /* float output: y = c0 + c1 * popcount, [N] (bb_float_epilogue) */
    const float *residual;     /* [M, N] or NULL */
    float *out;                /* [M, N] floats, or NULL */
    uint64_t *out_bits;        /* [M, ldo] bits (y < 0), or NULL */
    int64_t ldo;
    const int64_t *thr;        /* bit output: [ceil(N/32)*32] thresholds (bb_bit_thresholds) */
    const uint32_t *flip;      /* bit output: [ceil(N/32)] flip bits, one word per panel */
    int kbits;                 /* k-bit input (bb_linear_kbit): k bit-planes per row, else 0 */
    const int64_t *count_offset; /* k-bit: [N] popcount(w_n) + Q K: the count is sum_b 2^b pc_b - this */
    float kstep;               /* k-bit: the input's step; c0 = alpha, c1 = bias */
    int gelu;                  /* k-bit: GELU on each output (isa/portable.h, gelu_one), no residual */
    const int64_t *row_mag;    /* k-bit, sign-magnitude planes (kbit.c): [M / k] sum_j |level_j| of each input
                                * row (the count is row_mag - 2 sum_b 2^b popcount(m_b AND (s XOR w))), or
                                * NULL: planes of level + Q */
} linear_args;

/* What a binary Linear's tile writes: bits (y < 0), floats, or the floats of k-bit input rows
 * (BB_OUT_KBIT: planes of level + Q; BB_OUT_KBIT_SM: sign-magnitude planes, NULL in a family
 * without that kernel).
 * Each ISA compiles its one tile body once per kind (the kind a constant inside). */
enum { BB_OUT_BITS, BB_OUT_FLOAT, BB_OUT_KBIT, BB_OUT_KBIT_SM, BB_OUT_KINDS };

/* One row block (rows r0 .. r0 + mr - 1, mr <= BB_MR) x panel p of a binary Linear, with its
 * epilogue; prefetch: a panel to prefetch while this one runs, or NULL. */
typedef void (*linear_block_fn)(const linear_args *lin, int64_t r0, int mr, int64_t p, const uint64_t *prefetch);

/* Bi-Attention of a batch, laid out per head (attention.c gathers it). */
typedef struct attn_args {
    int64_t B, L, H, d, dw, lw, lp, dp;
    const uint64_t *q;   /* [B, H, L, dw]  query bits per head */
    const uint64_t *kt;  /* [B, H, dw, lp] key bits, word-major (8 keys per vector) */
    const uint64_t *vt;  /* [B, H, lw, dp] value bits transposed: bit t of vt[w][c] = key 64w+t, col c */
    const uint64_t *valid; /* [B, lw] key-valid bits */
    uint64_t *out;       /* [B*L, ldo] context sign bits */
    int64_t ldo;
    int32_t *counts;     /* [B*L, H*d] or NULL */
    const float *thr;    /* [H*d] thresholds of the context bits (elastic), or NULL: bit = count < 0 */
    const int64_t *lim;  /* [H] BA_ij = popcount(q_i XOR k_j) < lim_h (elastic), or NULL: (d + 1) / 2 */
    const int64_t *rel;  /* [H, d + 1] BA_ij = popcount(q_i XOR k_j) < rel[h][p_i], p_i the row's smallest
                          * popcount over its real keys (elastic, relative), or NULL */
    const int64_t *pad;  /* [B, lp] with rel: 0 for a real key, d + 1 for any other */
} attn_args;

/* The limit of a relative row (attn_args.rel) from its smallest popcount over the real keys;
 * a row without a real key attends to nothing. */
static inline int64_t relative_limit(const attn_args *attn, int64_t h, int64_t pmin) {
    return pmin <= attn->d ? attn->rel[h * (attn->d + 1) + pmin] : 0;
}

/* The k-bit quantizer's level of one value (kbit.c has the formula): clamp to [-clip, clip],
 * divide by the step, round half to even, clamp to [-Q, Q]; 0 for NaN or a step that is not
 * a positive finite float. Odd (level(-x) = -level(x)) and monotone in x. */
static inline int kbit_level(float v, float clip, float step, int Q) {
    if (!(step > 0.0f && step <= 3.0e38f) || v != v) return 0;
    if (v < -clip) v = -clip;
    if (v > clip) v = clip;
    float r = __builtin_rintf(v / step);
    return r < (float)-Q ? -Q : r > (float)Q ? Q : (int)r;
}

/* The k-bit quantizer's last pass (bb_quantize_planes): rows of x into bit-planes. */
typedef struct {
    const float *x;
    int64_t C, ldx, ldo;
    int bits;
    float clip, step;
    uint64_t *out;
    int8_t *levels;
    int64_t *row_mag; /* NULL: planes of u = level + Q; else sign-magnitude planes (kbit.c) and
                       * each row's sum_j |level_j| here */
    float thr[8];     /* |level(x)| >= j exactly when |x| >= thr[j - 1] (j = 1 .. Q; NaN: never), so
                       * a kernel may compare instead of dividing (kbit.c, level_thresholds) */
    float inv;        /* fl(1 / step): fl(|x| * inv) rounds to |level(x)| or a neighbour of it */
} quantize_args;

/* Attention on k-bit levels of one sequence: Bi-Attention (bb_biattention_kbit, grid 0) or
 * softmax attention (bb_softmax_attention_kbit, grid 2^k - 1). */
typedef struct {
    const int8_t *q, *k, *v;
    const uint64_t *valid;
    int64_t L, H, d, ldo;
    float step_v;              /* the context's step: out = fl(count * step_v) */
    int grid;                  /* softmax: the probabilities' grid 2^k - 1; 0: Bi-Attention */
    float score_scale, score_div; /* softmax: score = fl(fl(S * score_scale) / score_div) */
    float *out;
    int32_t *counts;
    int64_t scratch_ints;
    int32_t *scratch;
} kattn_args;

/* ------------------------------------------------------------------------------------ */
/* the ops table                                                                         */

/* One kernel family's kernels, an entry per op (isa/<family>.c fills one; runtime.c picks
 * it). A driver reads the active table once per call and calls nothing else that depends on
 * the CPU, so selecting a family (bb_set_kernel, BIBERT_KERNEL) selects every op. All tables
 * perform the same integer and float operations in the same order (the build turns FMA
 * contraction off): their outputs are bit-identical. */
typedef struct {
    int family;       /* BB_KERNEL_PORTABLE, _AVX2 or _AVX512 */
    const char *name; /* "portable", "portable-popcnt", "avx2", "avx512" */
    struct {
        /* sign bits of one row of K floats into words(K) words: x < 0, or with thresholds t
         * (may be NULL) !(x - t >= 0) */
        void (*row)(const float *x, const float *t, int64_t K, uint64_t *out);
    } pack;
    struct {
        linear_block_fn block[BB_OUT_KINDS]; /* a tile, by output kind (BB_OUT_*) */
    } linear;
    struct {
        /* LayerNorm of the first rows of x [rows, H] (rows >= 1) into out, with their sign bits
         * into bits [., ldb] (may be NULL; against thresholds t, may be NULL); returns how many
         * rows it did (1, 4 or 8: rows overlap their dependent sums) */
        int (*rows)(const float *x, int64_t rows, int64_t H, const float *gamma, const float *beta, float eps,
                    float *out, const float *t, uint64_t *bits, int64_t ldb);
    } layernorm;
    struct {
        /* one embedding row: (alpha * word bits + type row) + position row into out [H] */
        void (*row)(const uint64_t *word_bits, float alpha, const float *type, const float *pos, int64_t H,
                    float *out);
    } embed;
    struct {
        /* 64 x 64 bit matrix transposed in place: bit c of a[r] <-> bit r of a[c] */
        void (*transpose64)(uint64_t a[64]);
        /* BA bits of query row i of head bh into ba [lw]; popcounts: scratch [lp] (relative rows) */
        void (*scores)(const attn_args *attn, int64_t bh, int64_t i, uint64_t *ba, int64_t *popcounts);
        /* the context of one row of head bh from its BA bits: bits into ctx_bits [dw], counts
         * (may be NULL); t: the head's thresholds, or NULL */
        void (*context)(const attn_args *attn, int64_t bh, const uint64_t *ba, uint64_t *ctx_bits, int32_t *counts,
                        const float *t);
        /* every head of query row r when d = 64 and the limits are fixed (not relative), or
         * NULL: the family has no such kernel; ba: scratch [H, lw] */
        void (*row_d64)(const attn_args *attn, int64_t r, uint64_t *ba);
    } attention;
    struct {
        /* the k-bit quantizer's sum of one row of C floats in double (kbit.c has the order),
         * its sum of squares into *sumsq (in double, the same order) and its largest |x| into
         * *amax (any value if the row holds a NaN: the sum is NaN then) */
        double (*row_sum)(const float *x, int64_t C, float *amax, double *sumsq);
        /* the sum of (x - mean)^2 over one row, in double, in row_sum's order */
        double (*row_deviation)(const float *x, int64_t C, double mean);
        /* row m of the quantizer's input into its levels and bit-planes (either may be NULL) */
        void (*pack_row)(const quantize_args *q, int64_t m);
        /* y = GELU(x) for n floats (y may alias x) */
        void (*gelu)(const float *x, float *y, int64_t n);
        /* Bi-Attention on k-bit levels, head h; scratch: kattn_args.scratch_ints int32 */
        void (*attention_head)(const kattn_args *attn, int64_t h, int32_t *scratch);
        /* softmax attention on k-bit levels, head h; scratch as attention_head's */
        void (*softmax_head)(const kattn_args *attn, int64_t h, int32_t *scratch);
    } kbit;
} bb_ops;

/* The families' BB_KERNEL_* values run from 1 to BB_FAMILIES - 1 (0 is AUTO). */
#define BB_FAMILIES 4
BB_INLINE int family_ok(int kernel) { return kernel > BB_KERNEL_AUTO && kernel < BB_FAMILIES; }

/* The active family's table (the fastest this CPU has until bb_set_kernel chooses). */
const bb_ops *bb_ops_active(void);

extern const bb_ops bb_ops_portable;
#if BB_X86
extern const bb_ops bb_ops_portable_popcnt, bb_ops_avx2, bb_ops_avx512, bb_ops_avx512_vnni;
#endif

/* ------------------------------------------------------------------------------------ */
/* shared between drivers                                                                */

/* bb_biattention, checking the limits' values only with check_limits (bb_encoder checks them
 * once per call), on the first q_rows query rows of each sequence (1 to L; the other rows of out
 * are not written) */
int biattention(const uint64_t *qkv, int64_t ldq, int64_t q_off, int64_t k_off, int64_t v_off, int64_t B, int64_t L,
                int64_t H, int64_t d, const uint64_t *valid, uint64_t *out, int64_t ldo, int32_t *counts,
                const float *t, const int64_t *lim, const int64_t *rel, int check_limits, int64_t q_rows);

/* bb_linear_kbit after its checks; gelu: GELU on every output (then residual must be NULL); row_mag:
 * NULL, or a holds sign-magnitude planes (kbit.c) with these row sums (the active family has a
 * BB_OUT_KBIT_SM kernel) */
void linear_kbit_run(const uint64_t *a, int64_t M, int64_t lda, int64_t K, const uint64_t *w_panels, int64_t N,
                     int bits, float step, const float *alpha, const float *bias, const int64_t *count_offset,
                     const float *residual, float *out, int gelu, const int64_t *row_mag);

/* the score limits of Bi-Attention (H, d >= 1, H * d in range): each of lim [H] and rel [H, d + 1]
 * in [0, d + 1], not both given */
int limits_ok(int64_t H, int64_t d, const int64_t *lim, const int64_t *rel);

/* ------------------------------------------------------------------------------------ */
/* step times of the forward (a profiling build only)                                    */

/* The steps of bb_forward whose time a profiling build records (benchmarks/roofline.py --steps
 * compiles the library with -DBB_STEP_TIMES; it exports bb_step_times, runtime.c). In the
 * library's own build the marks compile to nothing. */
enum {
    BB_STEP_EMBED,     /* embeddings and their LayerNorm */
    BB_STEP_QKV,       /* the Q/K/V Linear (bits out) */
    BB_STEP_MASK,      /* each sequence's key-valid bits */
    BB_STEP_GATHER,    /* Bi-Attention: each head's bits into the kernels' layouts */
    BB_STEP_ATTENTION, /* Bi-Attention: scores and context of every query row */
    BB_STEP_ATTN_OUT,  /* the attention-output Linear (float out, residual) */
    BB_STEP_LN1,       /* LayerNorm after attention, with its bits */
    BB_STEP_FFN_IN,    /* the FFN-in Linear (bits out) */
    BB_STEP_FFN_OUT,   /* the FFN-out Linear (float out, residual) */
    BB_STEP_LN2,       /* LayerNorm after the FFN, with its bits */
    BB_STEP_POOLER,    /* the pooler's sign bits and Linear */
    BB_STEP_OTHER,     /* the rest of the native call: checks, allocations, the hidden states */
    BB_STEPS
};
#ifdef BB_STEP_TIMES
int64_t bb_step_clock(void);                   /* nanoseconds, monotonic */
void bb_step_add(int step, int64_t *since);    /* adds now - *since to the step, *since = now */
#define BB_STEP_CLOCK(clock) int64_t clock = bb_step_clock()
#define BB_STEP_MARK(clock, step) bb_step_add(step, &(clock))
#define BB_STEP_RESTART(clock) ((clock) = bb_step_clock()) /* the time since was counted elsewhere */
#else
#define BB_STEP_CLOCK(clock)
#define BB_STEP_MARK(clock, step) ((void)0)
#define BB_STEP_RESTART(clock) ((void)0)
#endif

#pragma GCC visibility pop

#endif
