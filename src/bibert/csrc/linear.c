/* The binary Linear (GEMM over XOR/popcount with a fused epilogue): its checks, the integer
 * thresholds and float constants of its epilogues, and the walk over its tiles (row blocks x
 * weight panels), tuned per host and kernel family; the tiles themselves are the active
 * family's (bb_ops.linear).
 *
 * Weights are pre-packed in panels of 32 output channels: panel p, word k holds 32
 * consecutive uint64 (word k of channels 32p .. 32p+31), so one 512-bit vector carries
 * the same K-word of 8 channels and the inner loop never reduces horizontally.
 */
#include <stdint.h>

#include "bb_internal.h"

/* The binary Linear's output, alpha * (K - 2p) + bias, as the model defines it. The bit
 * epilogue decides exactly this expression (through bb_bit_thresholds); the float epilogue
 * evaluates it as c0 + c1 * p with c0 = alpha * K + bias, c1 = -2 alpha (equal to rounding). */
static inline float epilogue(int64_t K, int64_t pc, float alpha, float bias) {
    return alpha * (float)(K - 2 * pc) + bias;
}

/* c0 = alpha * K + bias, c1 = -2 alpha, each [N]. With `offset` [N] (may be NULL): the
 * input holds {0, 1} levels z = (1 + s') / 2 of the +-1 bits s' (elastic binarization,
 * docs/method.md §7), z . w = offset - popcount(s' XOR w) with offset = (K + rowsum(w)) / 2,
 * so c0 = alpha * offset + bias, c1 = -alpha. Checks: K >= 1, the four arrays given, each
 * offset in [0, K]. */
int bb_float_epilogue(const float *alpha, const float *bias, int64_t K, int64_t N, const int64_t *offset,
                      float *c0, float *c1) {
    if (!count_ok(N) || !dim_ok(K)) return BB_EINVAL;
    if (N && (!alpha || !bias || !c0 || !c1)) return BB_EINVAL;
    for (int64_t n = 0; offset && n < N; n++)
        if (offset[n] < 0 || offset[n] > K) return BB_EINVAL;
    for (int64_t n = 0; n < N; n++) {
        if (offset) {
            c0[n] = alpha[n] * (float)offset[n] + bias[n];
            c1[n] = -alpha[n];
        } else {
            c0[n] = alpha[n] * (float)K + bias[n];
            c1[n] = -2.0f * alpha[n];
        }
    }
    return BB_OK;
}

/* Per-host tuning (bb_set_tuning): how the binary Linear walks its tiles, one entry per
 * kernel family. Every setting computes each output in one tile with the same code, so the
 * results never depend on it; only the speed does, differently from CPU to CPU. */
typedef struct {
    int64_t mr;          /* rows per micro-tile, 1 to BB_MR */
    int64_t chunk_bytes; /* activation bits of one row chunk (kept in L1 while the panels pass) */
    int64_t float_order; /* float output: 0 = row blocks outer, every panel per block; 1 = chunked */
} bb_tuning;

#define BB_TUNING_DEFAULT {BB_MR, 16384, 0}
static bb_tuning g_tuning[BB_FAMILIES] = {[0 ... BB_FAMILIES - 1] = BB_TUNING_DEFAULT};

/* Sets the tuning of one kernel family (BB_KERNEL_PORTABLE, _AVX2, _AVX512): mr in [1, BB_MR],
 * chunk_bytes in [64, 2^30], float_order 0 or 1. Not while a kernel runs. */
int bb_set_tuning(int kernel, int64_t mr, int64_t chunk_bytes, int64_t float_order) {
    if (!family_ok(kernel) || mr < 1 || mr > BB_MR || chunk_bytes < 64 ||
        chunk_bytes > ((int64_t)1 << 30) || (float_order != 0 && float_order != 1))
        return BB_EINVAL;
    g_tuning[kernel] = (bb_tuning){mr, chunk_bytes, float_order};
    return BB_OK;
}

/* The tuning of one kernel family into out[3] (mr, chunk_bytes, float_order). */
int bb_get_tuning(int kernel, int64_t *out) {
    if (!family_ok(kernel) || !out) return BB_EINVAL;
    out[0] = g_tuning[kernel].mr;
    out[1] = g_tuning[kernel].chunk_bytes;
    out[2] = g_tuning[kernel].float_order;
    return BB_OK;
}

typedef struct {
    const linear_args *lin;
    linear_block_fn block;
    int64_t np, nb, chunk_blocks, mr;
} linear_job;

/* rows in the row block starting at r0 (mr, fewer in the last block) */
static inline int block_rows(int64_t M, int64_t r0, int64_t mr) { return M - r0 < mr ? (int)(M - r0) : (int)mr; }

/* Weight prefetch. The engine lays the forward's weights out in one buffer, in the order they
 * are read (engine._arena), so the words after a Linear's last panel are the next Linear's
 * first; between layers they stream from L3 or memory, faster than the hardware prefetcher
 * fetches them. A row block over a panel (in the chunked walk, the first of the chunk's blocks)
 * therefore prefetches the panel BB_PREFETCH_PANELS ahead, past the Linear's end too: a prefetch
 * never faults, and where nothing useful lies there it is wasted, not wrong (the address is
 * computed as an integer, never dereferenced). Families whose kernels are far from
 * memory-bound ignore it. */
#define BB_PREFETCH_PANELS 2
static inline const uint64_t *prefetch_panel(const linear_job *j, int64_t p) {
    uintptr_t at = (uintptr_t)j->lin->w + (uintptr_t)((p + BB_PREFETCH_PANELS) * words_of(j->lin->K) * BB_PANEL * 8);
    return (const uint64_t *)at;
}

/* row blocks [lo, hi), every panel of each */
static void linear_float_blocks(void *ctx, int64_t lo, int64_t hi, int tid) {
    const linear_job *j = (const linear_job *)ctx;
    int64_t M = j->lin->M, mr = j->mr;
    for (int64_t b = lo; b < hi; b++)
        for (int64_t p = 0; p < j->np; p++)
            j->block(j->lin, b * mr, block_rows(M, b * mr, mr), p, prefetch_panel(j, p));
    (void)tid;
}

/* tiles t = (row chunk, panel), the chunk's row blocks against one panel */
static void linear_bit_tiles(void *ctx, int64_t lo, int64_t hi, int tid) {
    const linear_job *j = (const linear_job *)ctx;
    int64_t M = j->lin->M, mr = j->mr;
    for (int64_t t = lo; t < hi; t++) {
        int64_t c = t / j->np, p = t % j->np;
        int64_t b_end = (c + 1) * j->chunk_blocks < j->nb ? (c + 1) * j->chunk_blocks : j->nb;
        for (int64_t b = c * j->chunk_blocks; b < b_end; b++)
            j->block(j->lin, b * mr, block_rows(M, b * mr, mr), p,
                     b == c * j->chunk_blocks ? prefetch_panel(j, p) : NULL);
    }
    (void)tid;
}

/* y = alpha * (K - 2 popcount(a XOR w)) + bias [+ residual] into `out` [M, N], evaluated as
 * c0 + c1 * popcount (bb_float_epilogue); or, with out_bits, the bits (y < 0) into out_bits
 * [M, ldo] (whole words of each row rewritten), decided exactly by the integer thresholds
 * thr / flip of bb_bit_thresholds (flip: one uint32 of bits per panel; thr padded to whole
 * panels). c0/c1 may be NULL for bit output, thr/flip for float output. */
static void linear_run(const linear_args *args);

int bb_linear(const uint64_t *a, int64_t M, int64_t lda, int64_t K, const uint64_t *w_panels, int64_t N,
              const float *c0, const float *c1, const float *residual, float *out, uint64_t *out_bits,
              int64_t ldo, const int64_t *thr, const uint32_t *flip) {
    /* checks: K, N >= 1, lda >= words(K); exactly one of out / out_bits, with its epilogue
     * (c0, c1 or thr, flip) and, for bits, ldo >= words(N) */
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(K) || !dim_ok(N) || !dim_ok(lda) || lda < words_of(K) || !elems_ok(M, lda, 1) ||
        !elems_ok((N + BB_PANEL - 1) / BB_PANEL * BB_PANEL, words_of(K), 1) || !a || !w_panels ||
        (out == NULL) == (out_bits == NULL))
        return BB_EINVAL;
    if (out_bits ? !thr || !flip || !dim_ok(ldo) || ldo < words_of(N) || !elems_ok(M, ldo, 1)
                 : !c0 || !c1 || !elems_ok(M, N, 1))
        return BB_EINVAL;
    linear_args lin = {a, M, lda, K, w_panels, N, c0, c1, residual, out, out_bits, ldo, thr, flip, 0, NULL, 0.0f, 0,
                       NULL};
    if (out_bits) /* words past the written half-words stay padding zeros */
        for (int64_t m = 0; m < M; m++)
            for (int64_t w = words_of(N) - 1; w < ldo; w++)
                if (w >= 0) out_bits[m * ldo + w] = 0;
    linear_run(&lin);
    return BB_OK;
}

/* The tiles of one Linear, walked as the kernel family's tuning says. */
static void linear_run(const linear_args *args) {
    const linear_args lin = *args;
    int64_t M = lin.M, K = lin.K, N = lin.N;
    const bb_ops *ops = bb_ops_active();
    linear_block_fn block = ops->linear.block[lin.row_mag ? BB_OUT_KBIT_SM : lin.kbits ? BB_OUT_KBIT
                                              : lin.out_bits ? BB_OUT_BITS : BB_OUT_FLOAT];
    const bb_tuning *tu = &g_tuning[ops->family];
    int64_t mr = tu->mr;
    if (lin.row_mag) /* sign-magnitude planes: 6 input rows of 2 planes, or 2 of 4, a tile (24 accumulators) */
        mr = lin.kbits == 2 ? 12 : 8;
    else if (lin.kbits) /* a tile holds whole input rows: all k planes of each */
        mr = mr / lin.kbits * lin.kbits > 0 ? mr / lin.kbits * lin.kbits : lin.kbits;
    int64_t np = (N + BB_PANEL - 1) / BB_PANEL;
    int64_t nb = (M + mr - 1) / mr;
    if (lin.out && !tu->float_order) {
        /* row blocks outer: each block's output rows are written contiguously while the weight
         * panels stream from L2 */
        linear_job job = {&lin, block, np, nb, 0, mr};
        bb_parallel_for(nb, 1, linear_float_blocks, &job);
        return;
    }
    /* chunked: rows in chunks whose activation bits stay in L1 (chunk_bytes); within a chunk,
     * every panel (read from L2) runs over the chunk's row blocks */
    int64_t chunk_blocks = (tu->chunk_bytes / (words_of(K) * 8)) / mr;
    if (chunk_blocks < 1) chunk_blocks = 1;
    if (chunk_blocks > nb) chunk_blocks = nb;
    int64_t nc = (nb + chunk_blocks - 1) / chunk_blocks;
    linear_job job = {&lin, block, np, nb, chunk_blocks, mr};
    bb_parallel_for(nc * np, 1, linear_bit_tiles, &job);
}

/* A binary Linear on k-bit input, bit-serially (docs/packed_format.md, "Multi-bit
 * activations"): a [M * bits, lda] holds bits (2 or 4) bit-planes per input row (plane b of
 * row m at row m * bits + b: bit b of u = level + Q, Q = 2^(bits-1) - 1, padding bits 0), as
 * bb_quantize_planes writes them. out [M, N] = ((C * step) * alpha + bias) [+ residual] with the
 * exact integer C = sum_j level_j w_j = sum_b 2^b popcount(plane_b XOR w) - koff_n, koff_n =
 * popcount(w_n) + Q K. Checks: bits 2 or 4, K, N >= 1, lda >= words(K), every array but
 * residual given. */
int bb_linear_kbit(const uint64_t *a, int64_t M, int64_t lda, int64_t K, const uint64_t *w_panels, int64_t N,
                   int bits, float step, const float *alpha, const float *bias, const int64_t *koff,
                   const float *residual, float *out) {
    if (!count_ok(M) || (bits != 2 && bits != 4)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(K) || !dim_ok(N) || !dim_ok(lda) || lda < words_of(K) || !elems_ok(M * bits, lda, 1) ||
        !elems_ok((N + BB_PANEL - 1) / BB_PANEL * BB_PANEL, words_of(K), 1) || !elems_ok(M, N, 1) || !a ||
        !w_panels || !alpha || !bias || !koff || !out)
        return BB_EINVAL;
    linear_kbit_run(a, M, lda, K, w_panels, N, bits, step, alpha, bias, koff, residual, out, 0, NULL);
    return BB_OK;
}

void linear_kbit_run(const uint64_t *a, int64_t M, int64_t lda, int64_t K, const uint64_t *w_panels, int64_t N,
                     int bits, float step, const float *alpha, const float *bias, const int64_t *count_offset,
                     const float *residual, float *out, int gelu, const int64_t *row_mag) {
    linear_args lin = {a, M * bits, lda, K, w_panels, N, alpha, bias, residual, out, NULL, 0, NULL, NULL, bits,
                       count_offset, step, gelu, row_mag};
    linear_run(&lin);
}

/* ------------------------------------------------------------------------------------ */
/* integer thresholds of the bit epilogue                                                */

/* The bit of output n for popcount p: y < 0 for y = alpha_n * (K - 2p) + bias_n, or with a
 * compare value t_n (the next quantizer's threshold, elastic binarization) !(y - t_n >= 0),
 * the float32 difference and compare the student makes. */
static inline int epilogue_bit(int64_t K, int64_t pc, float alpha, float bias, const float *t) {
    float y = epilogue(K, pc, alpha, bias);
    return t ? !(y - *t >= 0.0f) : y < 0.0f;
}

/* For each channel n, epilogue_bit(p) == ((p > thr_n) XOR flip_n) for every p in [0, K]:
 * the float expression is monotone in p (IEEE rounding is monotone), so a binary search over
 * p on the same expression gives the exact integer threshold. t: compare values [N] or NULL
 * (compare with 0: y < 0). thr: int64 [N], flip: uint8 [N]. Checks: K >= 1, the four arrays
 * given. */
int bb_bit_thresholds(const float *alpha, const float *bias, const float *t, int64_t K, int64_t N, int64_t *thr,
                      uint8_t *flip) {
    if (!count_ok(N) || !dim_ok(K)) return BB_EINVAL;
    if (N && (!alpha || !bias || !thr || !flip)) return BB_EINVAL;
    for (int64_t n = 0; n < N; n++) {
        const float *tn = t ? t + n : NULL;
        int neg0 = epilogue_bit(K, 0, alpha[n], bias[n], tn); /* p = 0 */
        int negK = epilogue_bit(K, K, alpha[n], bias[n], tn); /* p = K */
        if (neg0 == negK) { /* constant: p > -1 always holds */
            thr[n] = -1;
            flip[n] = (uint8_t)!neg0;
            continue;
        }
        /* predicate changes once between p = 0 and p = K: find the last p equal to neg0 */
        int64_t lo = 0, hi = K; /* pred(lo) == neg0, pred(hi) != neg0 */
        while (hi - lo > 1) {
            int64_t mid = lo + (hi - lo) / 2;
            if (epilogue_bit(K, mid, alpha[n], bias[n], tn) == neg0) lo = mid; else hi = mid;
        }
        thr[n] = lo;           /* p > lo  <=>  p >= hi  <=>  predicate == !neg0 */
        flip[n] = (uint8_t)neg0; /* neg = (p > lo) XOR neg0 */
    }
    return BB_OK;
}
