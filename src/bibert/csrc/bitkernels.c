/* Bitwise kernels of the packed BiBERT engine.
 *
 * Bit convention (docs/packed_format.md): bit 1 <=> value -1, bit 0 <=> value +1;
 * element j of a row lives in 64-bit word j/64, bit j%64; padding bits are 0.
 * sign(x) = +1 iff x >= 0 (IEEE compare, -0.0 -> +1), so a bit is (x < 0).
 *
 *   binary dot product   dot(a, w) = K - 2 * popcount(a XOR w)       (true K)
 *   binary Linear        y_n = alpha_n * dot + bias_n [+ residual]   (float epilogue)
 *                        or the bit (y_n < 0) when the consumer binarizes again
 *   Bi-Attention         A_ij = d - 2 * popcount(q_i XOR k_j),  BA_ij = A_ij > 0 && valid_j
 *                        (elastic: popcount(q_i XOR k_j) < lim_h, or relative to the row's
 *                        best real key, < lim_h[min_j popcount(q_i XOR k_j)])
 *                        c_ic = popcount(BA_i) - 2 * popcount(BA_i AND vneg_c),  bit = c < 0
 *   elastic binarization (docs/method.md §7): a bit is !(x - t >= 0) for a per-channel
 *                        threshold t; {0, 1} levels z = (1 + s') / 2 of the bits s' change
 *                        the float epilogue only: z . w = (K + rowsum(w)) / 2 - popcount
 *
 * Weights are pre-packed in panels of 32 output channels: panel p, word k holds 32
 * consecutive uint64 (word k of channels 32p .. 32p+31), so one 512-bit vector carries
 * the same K-word of 8 channels and the inner loop never reduces horizontally.
 *
 * Kernel families, chosen at run time (bb_set_kernel):
 *   BB_KERNEL_AVX512    AVX-512 F/BW/DQ + VPOPCNTDQ (target attributes, cpu check)
 *   BB_KERNEL_AVX2      AVX2 binary Linear (nibble-table popcount, VPSHUFB + VPSADBW) for
 *                       CPUs without AVX-512; the other kernels take the portable code
 *   BB_KERNEL_PORTABLE  plain C with __builtin_popcountll (a POPCNT clone where the CPU
 *                       has the instruction)
 * All perform the same float operations in the same order (the build turns FMA
 * contraction off), so their outputs are bit-identical.
 *
 * Threads: a small pool of our own (bb_parallel_for below), not OpenMP. Work is handed out
 * in chunks from a shared counter and the calling thread takes part, so a worker that the
 * OS has descheduled (another process on the core) delays a kernel by at most the one chunk
 * it holds, never by a barrier; idle workers spin briefly, then sleep on a condition
 * variable. Every output element is computed by exactly one chunk with the same code, so
 * results do not depend on the thread count.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getcpu, pthread_setaffinity_np */
#endif
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bitkernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BB_X86 1
#else
#define BB_X86 0
#endif

#define BB_PANEL 32
#define BB_MR 6

static int g_kernel = -1; /* resolved lazily */
static int g_threads = 1;

int bb_abi_version(void) { return BB_ABI_VERSION; }

int bb_cpu_has_avx512(void) {
#if BB_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vpopcntdq");
#else
    return 0;
#endif
}

int bb_cpu_has_avx2(void) {
#if BB_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#else
    return 0;
#endif
}

static int cpu_has_popcnt(void) {
#if BB_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("popcnt");
#else
    return 0;
#endif
}

/* Select the kernel family; returns the active one, or -1 if `kernel` is not usable here. */
int bb_set_kernel(int kernel) {
    if (kernel == BB_KERNEL_AUTO)
        kernel = bb_cpu_has_avx512() ? BB_KERNEL_AVX512 : bb_cpu_has_avx2() ? BB_KERNEL_AVX2 : BB_KERNEL_PORTABLE;
    if (kernel == BB_KERNEL_AVX512 && !bb_cpu_has_avx512()) return -1;
    if (kernel == BB_KERNEL_AVX2 && !bb_cpu_has_avx2()) return -1;
    if (kernel != BB_KERNEL_AVX512 && kernel != BB_KERNEL_AVX2 && kernel != BB_KERNEL_PORTABLE) return -1;
    g_kernel = kernel;
    return g_kernel;
}

int bb_get_kernel(void) {
    if (g_kernel < 0) bb_set_kernel(BB_KERNEL_AUTO);
    return g_kernel;
}

#define BB_MAX_THREADS 1024

void bb_set_threads(int n) { g_threads = n < 1 ? 1 : n > BB_MAX_THREADS ? BB_MAX_THREADS : n; }
int bb_get_threads(void) { return g_threads; }

/* How long an idle worker polls for the next job before it sleeps: long enough to bridge the
 * gaps between the kernels of one forward, short enough that idle workers do not take the
 * cores that the caller's own work needs between forwards (a server's HTTP and tokenizer
 * threads, say). A time rather than a count of pause instructions, whose cost differs
 * tenfold between CPUs (~25 ns here on an AMD EPYC, where 20000 of them took 0.5 ms). */
static _Atomic int64_t g_spin_ns = 50000;

int bb_set_spin_us(int64_t us) {
    if (us < 0 || us > 1000000) return BB_EINVAL;
    atomic_store_explicit(&g_spin_ns, us * 1000, memory_order_relaxed);
    return BB_OK;
}

int64_t bb_get_spin_us(void) { return atomic_load_explicit(&g_spin_ns, memory_order_relaxed) / 1000; }

static inline int64_t words_of(int64_t bits) { return (bits + 63) >> 6; }

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

static inline int dim_ok(int64_t v) { return v >= 1 && v <= BB_MAX_DIM; }   /* a size, at least 1 */
static inline int count_ok(int64_t v) { return v >= 0 && v <= BB_MAX_DIM; } /* a row count, 0 allowed */

/* a * b * c (each >= 0) is at most BB_MAX_ELEMS, computed without overflow */
static int elems_ok(int64_t a, int64_t b, int64_t c) {
    int64_t ab, abc;
    if (a < 0 || b < 0 || c < 0) return 0;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) return 0;
    return abc <= BB_MAX_ELEMS;
}

/* ------------------------------------------------------------------------------------ */
/* thread pool                                                                           */

/* body(ctx, lo, hi, tid): items [lo, hi) of a parallel loop, on thread tid (0 = caller). */
typedef void (*bb_body)(void *ctx, int64_t lo, int64_t hi, int tid);

#define BB_CHUNK_BITS 20       /* the job word: generation | chunk count | next chunk */
#define BB_MAX_CHUNKS ((1 << BB_CHUNK_BITS) - 1)

static inline int64_t mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t *threads;
    int nworkers;              /* started workers (the team is nworkers + the caller) */
    int stop;
    _Atomic int sleepers;
    _Atomic uint64_t job;      /* gen << 40 | nchunks << 20 | next */
    _Atomic int64_t done;      /* chunks finished in the current job */
    /* the current job; stable while any of its chunks is unclaimed or running */
    bb_body body;
    void *ctx;
    int64_t n, grain;
    _Atomic int caller_cpu;    /* where the caller ran when it woke sleepers (-1: unknown) */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0, 0, 0, NULL, NULL, 0, 0, -1};

static _Thread_local int tl_in_job; /* nested parallel loops run serially */
static uint64_t g_gen;             /* last generation published (caller side) */

static inline void cpu_relax(void) {
#if BB_X86
    __builtin_ia32_pause();
#endif
}

static inline uint32_t job_gen(uint64_t j) { return (uint32_t)(j >> 40); }

/* Claims and runs chunks of generation `gen` until none is left. */
static void run_chunks(uint32_t gen, int tid) {
    uint64_t j = atomic_load_explicit(&P.job, memory_order_acquire);
    for (;;) {
        if (job_gen(j) != gen) return;
        uint64_t next = j & BB_MAX_CHUNKS, total = (j >> BB_CHUNK_BITS) & BB_MAX_CHUNKS;
        if (next >= total) return;
        if (!atomic_compare_exchange_weak_explicit(&P.job, &j, j + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        /* a claimed chunk keeps the job alive (the caller waits for it): its fields are stable */
        int64_t lo = (int64_t)next * P.grain, hi = lo + P.grain < P.n ? lo + P.grain : P.n;
        P.body(P.ctx, lo, hi, tid);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
        j = atomic_load_explicit(&P.job, memory_order_acquire);
    }
}

/* A worker woken from sleep is often placed on the waker's CPU (the scheduler's wake-affine
 * choice); then it and the caller share one core until the load balancer separates them,
 * milliseconds later, and the forward runs at one-thread speed. A woken worker that finds
 * itself on the caller's CPU moves off it at once: its affinity is narrowed to the other
 * allowed CPUs, then restored (the thread stays where it went). Linux only. */
static void leave_caller_cpu(void) {
#if defined(__linux__) && defined(CPU_ISSET)
    int caller = atomic_load_explicit(&P.caller_cpu, memory_order_relaxed);
    if (caller < 0 || sched_getcpu() != caller) return;
    cpu_set_t mask, others;
    if (pthread_getaffinity_np(pthread_self(), sizeof mask, &mask)) return;
    others = mask;
    CPU_CLR(caller, &others);
    if (CPU_COUNT(&others) == 0) return;
    if (pthread_setaffinity_np(pthread_self(), sizeof others, &others) == 0)
        pthread_setaffinity_np(pthread_self(), sizeof mask, &mask);
#endif
}

static void *worker_main(void *arg) {
    int tid = (int)(intptr_t)arg;
    uint32_t seen = job_gen(atomic_load(&P.job));
    tl_in_job = 1;
    for (;;) {
        int spins = 0;
        int64_t until = -1;
        uint64_t j;
        while (job_gen(j = atomic_load_explicit(&P.job, memory_order_acquire)) == seen) {
            if (++spins & 31) { /* the clock is read every 32 polls */
                cpu_relax();
                continue;
            }
            int64_t now = mono_ns();
            if (until < 0) until = now + atomic_load_explicit(&g_spin_ns, memory_order_relaxed);
            if (now < until) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&P.mu);
            atomic_fetch_add(&P.sleepers, 1);
            while (job_gen(atomic_load(&P.job)) == seen && !P.stop) pthread_cond_wait(&P.cv, &P.mu);
            atomic_fetch_sub(&P.sleepers, 1);
            int stop = P.stop;
            pthread_mutex_unlock(&P.mu);
            if (stop) return NULL;
            leave_caller_cpu();
            spins = 0;
            until = -1;
        }
        seen = job_gen(j);
        run_chunks(seen, tid);
    }
}

static void pool_stop(void) {
    if (!P.nworkers) return;
    pthread_mutex_lock(&P.mu);
    P.stop = 1;
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 0; i < P.nworkers; i++) pthread_join(P.threads[i], NULL);
    free(P.threads);
    P.threads = NULL;
    P.nworkers = 0;
    P.stop = 0;
}

/* after fork() only the calling thread exists: forget the parent's workers */
static void pool_after_fork(void) {
    P.threads = NULL;
    P.nworkers = 0;
    P.stop = 0;
    atomic_store(&P.sleepers, 0);
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
}

/* g_threads - 1 workers; returns the team size actually available */
static int pool_ensure(void) {
    static int fork_hook;
    if (!fork_hook) {
        pthread_atfork(NULL, NULL, pool_after_fork);
        fork_hook = 1;
    }
    if (P.nworkers == g_threads - 1) return g_threads;
    pool_stop();
    int want = g_threads - 1;
    P.threads = (pthread_t *)calloc((size_t)want, sizeof(pthread_t));
    if (!P.threads) return 1;
    for (int i = 0; i < want; i++) {
        if (pthread_create(&P.threads[i], NULL, worker_main, (void *)(intptr_t)(i + 1))) break;
        P.nworkers++;
    }
    return P.nworkers + 1;
}

/* Threads a kernel may use right now: 1 inside another parallel loop. */
static inline int team(void) { return tl_in_job ? 1 : g_threads; }

/* Runs body over [0, n) in chunks of `grain` items on the pool (serially when the team is
 * one thread, when nested, or when there is a single chunk). Not reentrant from several
 * outside threads at once: the engine is driven by one caller at a time. */
static void bb_parallel_for(int64_t n, int64_t grain, bb_body body, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (n / grain > BB_MAX_CHUNKS) grain = (n + BB_MAX_CHUNKS - 1) / BB_MAX_CHUNKS;
    int64_t nchunks = (n + grain - 1) / grain;
    if (team() == 1 || nchunks == 1 || pool_ensure() == 1) {
        int nested = tl_in_job;
        tl_in_job = 1;
        body(ctx, 0, n, 0);
        tl_in_job = nested;
        return;
    }
    P.body = body;
    P.ctx = ctx;
    P.n = n;
    P.grain = grain;
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    g_gen = (g_gen + 1) & 0xFFFFFF;
    atomic_store(&P.job, (uint64_t)g_gen << 40 | (uint64_t)nchunks << BB_CHUNK_BITS); /* seq_cst: pairs with sleepers */
    if (atomic_load(&P.sleepers) > 0) {
#if defined(__linux__)
        atomic_store_explicit(&P.caller_cpu, sched_getcpu(), memory_order_relaxed);
#endif
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    tl_in_job = 1;
    run_chunks((uint32_t)g_gen, 0);
    tl_in_job = 0;
    /* wait for the chunks other threads hold; yield so a descheduled holder can finish */
    for (int spins = 0; atomic_load_explicit(&P.done, memory_order_acquire) < nchunks; spins++) {
        if (spins < 1000)
            cpu_relax();
        else
            sched_yield();
    }
}

/* grain for row loops: at least `min_work` units of work per chunk, one chunk when small */
static inline int64_t rows_grain(int64_t rows, int64_t work_per_row, int64_t min_work) {
    if (rows * work_per_row <= 2 * min_work) return rows > 0 ? rows : 1;
    int64_t g = (min_work + work_per_row - 1) / work_per_row;
    return g < 1 ? 1 : g;
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

/* In-place transpose of a 64x64 bit matrix: bit c of a[r] <-> bit r of a[c]. */
static void transpose64(uint64_t a[64]) {
    uint64_t m = 0x00000000FFFFFFFFULL;
    for (int j = 32; j; j >>= 1, m ^= m << j) {
        for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
            uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
            a[k] ^= t << j;
            a[k | j] ^= t;
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* sign packing: bits[m, j] = x[m, j] < 0                                                */

static inline __attribute__((always_inline)) void sign_pack_row_portable(const float *x, int64_t K,
                                                                         uint64_t *out) {
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
static inline __attribute__((always_inline)) void sign_pack_row_thr_portable(const float *x, const float *t,
                                                                             int64_t K, uint64_t *out) {
    int64_t kw = words_of(K);
    for (int64_t w = 0; w < kw; w++) {
        uint64_t v = 0;
        int64_t n = K - 64 * w < 64 ? K - 64 * w : 64;
        for (int64_t b = 0; b < n; b++) v |= (uint64_t)!(x[64 * w + b] - t[64 * w + b] >= 0.0f) << b;
        out[w] = v;
    }
}

#if BB_X86
__attribute__((target("avx512f,avx512bw,avx512dq")))
static void sign_pack_row_avx512(const float *x, int64_t K, uint64_t *out) {
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

__attribute__((target("avx512f,avx512bw,avx512dq")))
static void sign_pack_row_thr_avx512(const float *x, const float *t, int64_t K, uint64_t *out) {
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
#endif

/* sign bits of one row, against thresholds t when given (else against 0) */
static inline __attribute__((always_inline)) void sign_pack_row(const float *x, const float *t, int64_t K,
                                                                uint64_t *out, int avx512) {
#if BB_X86
    if (avx512) {
        if (t)
            sign_pack_row_thr_avx512(x, t, K, out);
        else
            sign_pack_row_avx512(x, K, out);
        return;
    }
#endif
    (void)avx512;
    if (t)
        sign_pack_row_thr_portable(x, t, K, out);
    else
        sign_pack_row_portable(x, K, out);
}

typedef struct {
    const float *x, *t;
    int64_t K, ldx, ldo;
    uint64_t *out;
    int avx512;
} sign_pack_args;

static void sign_pack_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const sign_pack_args *g = (const sign_pack_args *)ctx;
    for (int64_t m = lo; m < hi; m++) {
        sign_pack_row(g->x + m * g->ldx, g->t, g->K, g->out + m * g->ldo, g->avx512);
        for (int64_t w = words_of(g->K); w < g->ldo; w++) g->out[m * g->ldo + w] = 0;
    }
    (void)tid;
}

/* bits[m, j] = x[m, j] < 0, or with thresholds t [K] (may be NULL) !(x[m, j] - t[j] >= 0).
 * Checks: K >= 1, ldx >= K, ldo >= words(K), x and out given (for M > 0). */
int bb_sign_pack(const float *x, int64_t M, int64_t K, int64_t ldx, uint64_t *out, int64_t ldo, const float *t) {
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(K) || !dim_ok(ldx) || ldx < K || !dim_ok(ldo) || ldo < words_of(K) || !elems_ok(M, ldx, 1) ||
        !elems_ok(M, ldo, 1) || !x || !out)
        return BB_EINVAL;
    sign_pack_args g = {x, t, K, ldx, ldo, out, bb_get_kernel() == BB_KERNEL_AVX512};
    bb_parallel_for(M, rows_grain(M, K, 16384), sign_pack_rows, &g);
    return BB_OK;
}

/* ------------------------------------------------------------------------------------ */
/* binary Linear (GEMM over XOR/popcount with a fused epilogue)                          */

typedef struct {
    const uint64_t *a;     /* [M, lda] activation bits */
    int64_t M, lda, K;     /* K = true input width in bits */
    const uint64_t *w;     /* panels [ceil(N/32), Kw, 32] */
    int64_t N;
    const float *c0, *c1;      /* float output: y = c0 + c1 * popcount, [N] (bb_float_epilogue) */
    const float *residual;     /* [M, N] or NULL */
    float *out;                /* [M, N] floats, or NULL */
    uint64_t *out_bits;        /* [M, ldo] bits (y < 0), or NULL */
    int64_t ldo;
    const int64_t *thr;        /* bit output: [ceil(N/32)*32] thresholds (bb_bit_thresholds) */
    const uint32_t *flip;      /* bit output: [ceil(N/32)] flip bits, one word per panel */
    int kbits;                 /* k-bit input (bb_linear_kbit): k bit-planes per row, else 0 */
    const int64_t *koff;       /* k-bit: [N] pw_n + Q K, the count is P - koff (P = sum 2^b p_b) */
    float kstep;               /* k-bit: the input's step; c0 = alpha, c1 = bias */
} linear_args;

/* k-bit input (docs/packed_format.md, "Multi-bit activations"): rows r0 .. r0+mr-1 of a tile
 * are bit-planes 0 .. k-1 of consecutive input rows (u = level + Q, plane b = bit b of u),
 * pc their popcounts against the panel's channels. Each input row's integer count is
 * C = sum_b 2^b pc_b - koff_n (= sum_j level_j w_j, exactly) and its output
 * y = ((C * step) * alpha_n + bias_n) [+ residual], the student's rounding order. */
static void kbit_epilogue(const linear_args *g, int64_t r0, int mr, int64_t p, int nc, const int64_t (*pc)[BB_PANEL]) {
    int k = g->kbits;
    int64_t n0 = p * BB_PANEL;
    for (int r = 0; r + k <= mr; r += k) {
        int64_t m = (r0 + r) / k;
        float *o = g->out + m * g->N + n0;
        const float *res = g->residual ? g->residual + m * g->N + n0 : NULL;
        for (int c = 0; c < nc; c++) {
            int64_t P = 0;
            for (int b = 0; b < k; b++) P += pc[r + b][c] << b;
            float y = (float)(P - g->koff[n0 + c]) * g->kstep * g->c0[n0 + c] + g->c1[n0 + c];
            o[c] = res ? y + res[c] : y;
        }
    }
}

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

/* portable epilogue of one row m: counts pc[0..nc) of panel p */
static inline __attribute__((always_inline)) void linear_row_epilogue_portable(const linear_args *g, int64_t m,
                                                                               int64_t p, int nc,
                                                                               const int64_t *pc) {
    int64_t n0 = p * BB_PANEL;
    if (g->out_bits) {
        uint32_t bits = 0;
        for (int c = 0; c < nc; c++) bits |= (uint32_t)(pc[c] > g->thr[n0 + c]) << c;
        bits ^= g->flip[p];
        if (nc < 32) bits &= (1u << nc) - 1;
        ((uint32_t *)(g->out_bits + m * g->ldo))[n0 / 32] = bits;
    } else {
        float *o = g->out + m * g->N + n0;
        for (int c = 0; c < nc; c++) {
            float y = g->c0[n0 + c] + g->c1[n0 + c] * (float)pc[c];
            if (g->residual) y = y + g->residual[m * g->N + n0 + c];
            o[c] = y;
        }
    }
}

/* portable: one row block (mr rows) x one panel. Rows in pairs, channels in groups of 4:
 * eight independent popcount chains stay in registers (scalar POPCNT issues on several
 * ports), six loads feed eight popcounts. */
static inline __attribute__((always_inline)) void linear_block_portable(const linear_args *g, int64_t r0,
                                                                        int mr, int64_t p) {
    int64_t kw = words_of(g->K);
    const uint64_t *wp = g->w + p * kw * BB_PANEL;
    int64_t n0 = p * BB_PANEL;
    int nc = g->N - n0 < BB_PANEL ? (int)(g->N - n0) : BB_PANEL;
    int64_t tile[BB_MR][BB_PANEL];
    for (int r = 0; r < mr; r += 2) {
        int64_t m = r0 + r;
        const uint64_t *a0 = g->a + m * g->lda;
        const uint64_t *a1 = r + 1 < mr ? a0 + g->lda : a0;
        int64_t pc0[BB_PANEL], pc1[BB_PANEL];
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
        if (g->kbits) {
            for (int c = 0; c < BB_PANEL; c++) {
                tile[r][c] = pc0[c];
                if (r + 1 < mr) tile[r + 1][c] = pc1[c];
            }
            continue;
        }
        linear_row_epilogue_portable(g, m, p, nc, pc0);
        if (r + 1 < mr) linear_row_epilogue_portable(g, m + 1, p, nc, pc1);
    }
    if (g->kbits) kbit_epilogue(g, r0, mr, p, nc, (const int64_t (*)[BB_PANEL])tile);
}

static void linear_portable_generic(const linear_args *g, int64_t r0, int mr, int64_t p, const uint64_t *pf) {
    (void)pf;
    linear_block_portable(g, r0, mr, p);
}

#if BB_X86
__attribute__((target("popcnt")))
static void linear_portable_popcnt(const linear_args *g, int64_t r0, int mr, int64_t p, const uint64_t *pf) {
    (void)pf;
    linear_block_portable(g, r0, mr, p);
}

#define BB_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq")))

/* float epilogue on 16 channels from two vectors of 64-bit counts: c0 + c1 * p [+ residual].
 * Counts are below 2^24, so narrowing them to int32 and converting is exact; the float
 * operations (a multiply, then adds, no contraction) are the portable path's, in its order.
 * c0 / c1 arrive in registers, loaded once per panel (stores to `out` could alias them, so
 * the compiler would otherwise reload them for every row). */
/* the low 32 bits of the 8 lanes of lo, then of hi: 16 int32 in one instruction */
static inline __attribute__((always_inline)) BB_AVX512 __m512i low_dwords(__m512i lo, __m512i hi) {
    return _mm512_permutex2var_epi32(lo, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                                     hi);
}

static inline __attribute__((always_inline)) BB_AVX512 void epilogue16(__m512i lo, __m512i hi, __m512 c0, __m512 c1,
                                                                       const float *res, float *out, __mmask16 lm) {
    __m512i p32 = low_dwords(lo, hi);
    __m512 y = _mm512_add_ps(c0, _mm512_mul_ps(c1, _mm512_cvtepi32_ps(p32)));
    if (res) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(lm, res));
    _mm512_mask_storeu_ps(out, lm, y);
}

/* kbit_epilogue on the counts of one tile, 8 channels at a time: the same integer and float
 * operations */
static BB_AVX512 void kbit_epilogue_avx512(const linear_args *g, int64_t r0, int mr, int64_t p, int nc,
                                           const int64_t (*pc)[BB_PANEL]) {
    int k = g->kbits;
    int64_t n0 = p * BB_PANEL;
    const __m512 stv = _mm512_set1_ps(g->kstep);
    for (int r = 0; r + k <= mr; r += k) {
        int64_t m = (r0 + r) / k;
        for (int c = 0; c < 4; c++) {
            int n = nc - 8 * c;
            if (n <= 0) break;
            __mmask8 lm = n >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << n) - 1);
            __m512i P = _mm512_load_si512((const __m512i *)(pc[r] + 8 * c));
            for (int b = 1; b < k; b++)
                P = _mm512_add_epi64(P, _mm512_slli_epi64(_mm512_load_si512((const __m512i *)(pc[r + b] + 8 * c)),
                                                          (unsigned)b));
            P = _mm512_sub_epi64(P, _mm512_maskz_loadu_epi64(lm, g->koff + n0 + 8 * c));
            __m256 y = _mm256_mul_ps(_mm512_cvtepi64_ps(P), _mm512_castps512_ps256(stv));
            y = _mm256_add_ps(_mm256_mul_ps(y, _mm256_maskz_loadu_ps(lm, g->c0 + n0 + 8 * c)),
                              _mm256_maskz_loadu_ps(lm, g->c1 + n0 + 8 * c));
            if (g->residual) y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(lm, g->residual + m * g->N + n0 + 8 * c));
            _mm256_mask_storeu_ps(g->out + m * g->N + n0 + 8 * c, lm, y);
        }
    }
}

enum { BB_OUT_BITS, BB_OUT_FLOAT, BB_OUT_KBIT };

/* the bit epilogue of one row: 32 compares with the thresholds, flipped, masked to the panel.
 * Counts and thresholds (in [-1, K]) narrowed to int32 (K below 2^31 - 1, see linear_block_avx512),
 * 16 channels per compare; the compares' masks joined in a mask register. */
static inline __attribute__((always_inline)) BB_AVX512 void bits_row32(const linear_args *g, int64_t m, int64_t p,
                                                                     __m512i s0, __m512i s1, __m512i s2, __m512i s3,
                                                                     const __m512i t[2], uint32_t fl, uint32_t valid) {
    __mmask16 lo = _mm512_cmpgt_epi32_mask(low_dwords(s0, s1), t[0]), hi = _mm512_cmpgt_epi32_mask(low_dwords(s2, s3), t[1]);
    uint32_t bits = _cvtmask32_u32(_mm512_kunpackw(hi, lo));
    ((uint32_t *)(g->out_bits + m * g->ldo))[p] = (bits ^ fl) & valid;
}

/* bits_row32 on 64-bit counts and thresholds, for K of 2^31 - 1 or more */
static inline __attribute__((always_inline)) BB_AVX512 void bits_row32_wide(const linear_args *g, int64_t m, int64_t p,
                                                                          __m512i s0, __m512i s1, __m512i s2,
                                                                          __m512i s3, const __m512i t[4], uint32_t fl,
                                                                          uint32_t valid) {
    uint32_t bits = (uint32_t)_mm512_cmpgt_epi64_mask(s0, t[0]) | (uint32_t)_mm512_cmpgt_epi64_mask(s1, t[1]) << 8 |
                    (uint32_t)_mm512_cmpgt_epi64_mask(s2, t[2]) << 16 | (uint32_t)_mm512_cmpgt_epi64_mask(s3, t[3]) << 24;
    ((uint32_t *)(g->out_bits + m * g->ldo))[p] = (bits ^ fl) & valid;
}

/* the float epilogue of one row's 32 channels */
static inline __attribute__((always_inline)) BB_AVX512 void float_row32(const linear_args *g, int64_t m, int64_t n0,
                                                                      __m512i s0, __m512i s1, __m512i s2, __m512i s3,
                                                                      const __m512 c[4], __mmask16 lm0, __mmask16 lm1) {
    float *o = g->out + m * g->N + n0;
    const float *res = g->residual ? g->residual + m * g->N + n0 : NULL;
    epilogue16(s0, s1, c[0], c[2], res, o, lm0);
    if (lm1) epilogue16(s2, s3, c[1], c[3], res ? res + 16 : NULL, o + 16, lm1);
}

/* the counts of one row into a tile row (k-bit epilogue) */
static inline __attribute__((always_inline)) BB_AVX512 void store_row32(int64_t *t, __m512i s0, __m512i s1,
                                                                      __m512i s2, __m512i s3) {
    _mm512_store_si512((__m512i *)t, s0);
    _mm512_store_si512((__m512i *)(t + 8), s1);
    _mm512_store_si512((__m512i *)(t + 16), s2);
    _mm512_store_si512((__m512i *)(t + 24), s3);
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
#define BB_ROW_BITS(r) \
    if (MR > r) bits_row32(g, r0 + r, p, s##r##0, s##r##1, s##r##2, s##r##3, t32, fl, valid);
#define BB_ROW_BITS_WIDE(r) \
    if (MR > r) bits_row32_wide(g, r0 + r, p, s##r##0, s##r##1, s##r##2, s##r##3, t, fl, valid);
#define BB_ROW_FLOAT(r) \
    if (MR > r) float_row32(g, r0 + r, n0, s##r##0, s##r##1, s##r##2, s##r##3, c, lm0, lm1);
#define BB_ROW_STORE(r) \
    if (MR > r) store_row32(tile[r], s##r##0, s##r##1, s##r##2, s##r##3);
#define BB_ROW_DECL(r) __m512i s##r##0, s##r##1, s##r##2, s##r##3;

/* One row block (MR rows) x one panel; OUT (a constant) selects the epilogue; pf (may be NULL):
 * the panel to prefetch while this one runs, K-word by K-word (prefetch_panel). The 4 * MR
 * accumulators are separate variables (not an array, which the compiler would keep in memory
 * and copy to registers around the K loop of every block); the first K-word initialises them
 * (K >= 1, so there always is one). */
static inline __attribute__((always_inline)) BB_AVX512 void linear_block_avx512(const linear_args *g,
                                                                               int64_t r0, const int MR,
                                                                               int64_t p, const uint64_t *pf,
                                                                               const int OUT) {
    int64_t kw = words_of(g->K);
    const uint64_t *wp = g->w + p * kw * BB_PANEL;
    int64_t n0 = p * BB_PANEL;
    int nc = g->N - n0 < BB_PANEL ? (int)(g->N - n0) : BB_PANEL;
    const uint64_t *a = g->a + r0 * g->lda;
    int64_t lda = g->lda;
    BB_ROWS(BB_ROW_DECL)
    {
        __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 8);
        __m512i w2 = _mm512_loadu_si512(wp + 16), w3 = _mm512_loadu_si512(wp + 24);
        if (pf) BB_PREFETCH_WORD(pf);
        BB_ROWS(BB_ROW_FIRST)
    }
    for (int64_t k = 1; k < kw; k++) {
        const uint64_t *wk = wp + k * BB_PANEL;
        if (pf) BB_PREFETCH_WORD((uintptr_t)pf + (uintptr_t)(k * BB_PANEL * 8));
        __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 8);
        __m512i w2 = _mm512_loadu_si512(wk + 16), w3 = _mm512_loadu_si512(wk + 24);
        BB_ROWS(BB_ROW_NEXT)
    }
    uint32_t valid = nc >= 32 ? 0xFFFFFFFFu : (1u << nc) - 1;
    if (OUT == BB_OUT_KBIT) { /* through memory: the k-bit epilogue combines the counts of several rows */
        int64_t tile[BB_MR][BB_PANEL] __attribute__((aligned(64)));
        BB_ROWS(BB_ROW_STORE)
        kbit_epilogue_avx512(g, r0, MR, p, nc, (const int64_t (*)[BB_PANEL])tile);
    } else if (OUT == BB_OUT_BITS) {
        const int64_t *tp = g->thr + n0;
        const __m512i t[4] = {_mm512_loadu_si512(tp), _mm512_loadu_si512(tp + 8), _mm512_loadu_si512(tp + 16),
                              _mm512_loadu_si512(tp + 24)};
        uint32_t fl = g->flip[p];
        if (g->K < INT32_MAX) { /* counts and thresholds fit int32 */
            const __m512i t32[2] = {low_dwords(t[0], t[1]), low_dwords(t[2], t[3])};
            BB_ROWS(BB_ROW_BITS)
        } else {
            BB_ROWS(BB_ROW_BITS_WIDE)
        }
    } else {
        /* c0 / c1 in registers, loaded once per panel (stores to `out` could alias them, so the
         * compiler would otherwise reload them for every row) */
        __mmask16 lm0 = (__mmask16)valid, lm1 = (__mmask16)(valid >> 16);
        const __m512 c[4] = {_mm512_maskz_loadu_ps(lm0, g->c0 + n0), _mm512_maskz_loadu_ps(lm1, g->c0 + n0 + 16),
                             _mm512_maskz_loadu_ps(lm0, g->c1 + n0), _mm512_maskz_loadu_ps(lm1, g->c1 + n0 + 16)};
        BB_ROWS(BB_ROW_FLOAT)
    }
}

#define BB_LINEAR_AVX512(OUT)                                                                                 \
    switch (mr) {                                                                                             \
    case 6: linear_block_avx512(g, r0, 6, p, pf, OUT); break;                                                 \
    case 5: linear_block_avx512(g, r0, 5, p, pf, OUT); break;                                                 \
    case 4: linear_block_avx512(g, r0, 4, p, pf, OUT); break;                                                 \
    case 3: linear_block_avx512(g, r0, 3, p, pf, OUT); break;                                                 \
    case 2: linear_block_avx512(g, r0, 2, p, pf, OUT); break;                                                 \
    default: linear_block_avx512(g, r0, 1, p, pf, OUT); break;                                                \
    }

BB_AVX512 static void linear_avx512_bits(const linear_args *g, int64_t r0, int mr, int64_t p,
                                      const uint64_t *pf) {
    BB_LINEAR_AVX512(BB_OUT_BITS)
}
BB_AVX512 static void linear_avx512_float(const linear_args *g, int64_t r0, int mr, int64_t p,
                                      const uint64_t *pf) {
    BB_LINEAR_AVX512(BB_OUT_FLOAT)
}
BB_AVX512 static void linear_avx512_kbit(const linear_args *g, int64_t r0, int mr, int64_t p,
                                      const uint64_t *pf) {
    BB_LINEAR_AVX512(BB_OUT_KBIT)
}
#endif

#if BB_X86
#define BB_AVX2 __attribute__((target("avx2,popcnt")))

/* popcount of each 64-bit lane: nibble lookups (VPSHUFB) give byte counts, VPSADBW sums
 * the eight bytes of each lane */
static inline __attribute__((always_inline)) BB_AVX2 __m256i popcnt256_epi64(__m256i v) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
    __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

/* the portable epilogue, with the float output of whole panels 8 channels at a time (the
 * same multiply and adds in the same order: identical results) */
static inline __attribute__((always_inline)) BB_AVX2 void linear_row_epilogue_avx2(const linear_args *g, int64_t m,
                                                                                 int64_t p, int nc,
                                                                                 const int64_t *pc) {
    if (g->out_bits || nc < BB_PANEL) {
        linear_row_epilogue_portable(g, m, p, nc, pc);
        return;
    }
    int64_t n0 = p * BB_PANEL;
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    float *o = g->out + m * g->N + n0;
    const float *res = g->residual ? g->residual + m * g->N + n0 : NULL;
    for (int c = 0; c < BB_PANEL; c += 8) {
        /* counts < 2^24: their low 32 bits convert exactly */
        __m256i lo = _mm256_permutevar8x32_epi32(_mm256_load_si256((const __m256i *)(pc + c)), even);
        __m256i hi = _mm256_permutevar8x32_epi32(_mm256_load_si256((const __m256i *)(pc + c + 4)), even);
        __m256 pf = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x20));
        __m256 y = _mm256_add_ps(_mm256_loadu_ps(g->c0 + n0 + c), _mm256_mul_ps(_mm256_loadu_ps(g->c1 + n0 + c), pf));
        if (res) y = _mm256_add_ps(y, _mm256_loadu_ps(res + c));
        _mm256_storeu_ps(o + c, y);
    }
}

/* AVX2: rows in pairs x the panel's 32 channels in two halves of 16 (4 vectors of 4);
 * 8 accumulators, 4 weight loads for 8 vector popcounts. Counts go through the portable
 * epilogue, so the outputs are the portable path's bit for bit. */
BB_AVX2 static void linear_avx2(const linear_args *g, int64_t r0, int mr, int64_t p, const uint64_t *pf) {
    (void)pf;
    int64_t kw = words_of(g->K);
    const uint64_t *wp = g->w + p * kw * BB_PANEL;
    int nc = g->N - p * BB_PANEL < BB_PANEL ? (int)(g->N - p * BB_PANEL) : BB_PANEL;
    int64_t tile[BB_MR][BB_PANEL];
    for (int r = 0; r < mr; r += 2) {
        int64_t m = r0 + r;
        const uint64_t *a0 = g->a + m * g->lda;
        const uint64_t *a1 = r + 1 < mr ? a0 + g->lda : a0;
        int64_t pc0[BB_PANEL] __attribute__((aligned(32))), pc1[BB_PANEL] __attribute__((aligned(32)));
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
                _mm256_store_si256((__m256i *)(pc0 + 16 * half + 4 * v), s0[v]);
                _mm256_store_si256((__m256i *)(pc1 + 16 * half + 4 * v), s1[v]);
            }
        }
        if (g->kbits) {
            for (int c = 0; c < BB_PANEL; c++) {
                tile[r][c] = pc0[c];
                if (r + 1 < mr) tile[r + 1][c] = pc1[c];
            }
            continue;
        }
        linear_row_epilogue_avx2(g, m, p, nc, pc0);
        if (r + 1 < mr) linear_row_epilogue_avx2(g, m + 1, p, nc, pc1);
    }
    if (g->kbits) kbit_epilogue(g, r0, mr, p, nc, (const int64_t (*)[BB_PANEL])tile);
}
#endif

/* one row block (r0, mr rows) x panel p; the last argument: a panel to prefetch, or NULL */
typedef void (*linear_fn)(const linear_args *, int64_t, int, int64_t, const uint64_t *);

static linear_fn pick_linear(const linear_args *g) {
#if BB_X86
    if (bb_get_kernel() == BB_KERNEL_AVX512)
        return g->kbits ? linear_avx512_kbit : g->out_bits ? linear_avx512_bits : linear_avx512_float;
    if (bb_get_kernel() == BB_KERNEL_AVX2) return linear_avx2;
    if (cpu_has_popcnt()) return linear_portable_popcnt;
#endif
    return linear_portable_generic;
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
static bb_tuning g_tuning[4] = {BB_TUNING_DEFAULT, BB_TUNING_DEFAULT, BB_TUNING_DEFAULT, BB_TUNING_DEFAULT};

/* Sets the tuning of one kernel family (BB_KERNEL_PORTABLE, _AVX2, _AVX512): mr in [1, BB_MR],
 * chunk_bytes in [64, 2^30], float_order 0 or 1. Not while a kernel runs. */
int bb_set_tuning(int kernel, int64_t mr, int64_t chunk_bytes, int64_t float_order) {
    if (kernel < BB_KERNEL_PORTABLE || kernel > BB_KERNEL_AVX2 || mr < 1 || mr > BB_MR || chunk_bytes < 64 ||
        chunk_bytes > ((int64_t)1 << 30) || (float_order != 0 && float_order != 1))
        return BB_EINVAL;
    g_tuning[kernel] = (bb_tuning){mr, chunk_bytes, float_order};
    return BB_OK;
}

/* The tuning of one kernel family into out[3] (mr, chunk_bytes, float_order). */
int bb_get_tuning(int kernel, int64_t *out) {
    if (kernel < BB_KERNEL_PORTABLE || kernel > BB_KERNEL_AVX2 || !out) return BB_EINVAL;
    out[0] = g_tuning[kernel].mr;
    out[1] = g_tuning[kernel].chunk_bytes;
    out[2] = g_tuning[kernel].float_order;
    return BB_OK;
}

typedef struct {
    const linear_args *g;
    linear_fn fn;
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
 * computed as an integer, never dereferenced). Only the AVX-512 kernel uses it: the other
 * families are far from memory-bound. */
#define BB_PREFETCH_PANELS 2
static inline const uint64_t *prefetch_panel(const linear_job *j, int64_t p) {
    uintptr_t at = (uintptr_t)j->g->w + (uintptr_t)((p + BB_PREFETCH_PANELS) * words_of(j->g->K) * BB_PANEL * 8);
    return (const uint64_t *)at;
}

/* row blocks [lo, hi), every panel of each */
static void linear_float_blocks(void *ctx, int64_t lo, int64_t hi, int tid) {
    const linear_job *j = (const linear_job *)ctx;
    int64_t M = j->g->M, mr = j->mr;
    for (int64_t b = lo; b < hi; b++)
        for (int64_t p = 0; p < j->np; p++) j->fn(j->g, b * mr, block_rows(M, b * mr, mr), p, prefetch_panel(j, p));
    (void)tid;
}

/* tiles t = (row chunk, panel), the chunk's row blocks against one panel */
static void linear_bit_tiles(void *ctx, int64_t lo, int64_t hi, int tid) {
    const linear_job *j = (const linear_job *)ctx;
    int64_t M = j->g->M, mr = j->mr;
    for (int64_t t = lo; t < hi; t++) {
        int64_t c = t / j->np, p = t % j->np;
        int64_t b_end = (c + 1) * j->chunk_blocks < j->nb ? (c + 1) * j->chunk_blocks : j->nb;
        for (int64_t b = c * j->chunk_blocks; b < b_end; b++)
            j->fn(j->g, b * mr, block_rows(M, b * mr, mr), p, b == c * j->chunk_blocks ? prefetch_panel(j, p) : NULL);
    }
    (void)tid;
}

/* y = alpha * (K - 2 popcount(a XOR w)) + bias [+ residual] into `out` [M, N], evaluated as
 * c0 + c1 * popcount (bb_float_epilogue); or, with out_bits, the bits (y < 0) into out_bits
 * [M, ldo] (whole words of each row rewritten), decided exactly by the integer thresholds
 * thr / flip of bb_bit_thresholds (flip: one uint32 of bits per panel; thr padded to whole
 * panels). c0/c1 may be NULL for bit output, thr/flip for float output. */
static void linear_run(const linear_args *g);

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
    linear_args g = {a, M, lda, K, w_panels, N, c0, c1, residual, out, out_bits, ldo, thr, flip, 0, NULL, 0.0f};
    if (out_bits) /* words past the written half-words stay padding zeros */
        for (int64_t m = 0; m < M; m++)
            for (int64_t w = words_of(N) - 1; w < ldo; w++)
                if (w >= 0) out_bits[m * ldo + w] = 0;
    linear_run(&g);
    return BB_OK;
}

/* The tiles of one Linear, walked as the kernel family's tuning says. */
static void linear_run(const linear_args *gp) {
    const linear_args g = *gp;
    int64_t M = g.M, K = g.K, N = g.N;
    linear_fn fn = pick_linear(&g);
    const bb_tuning *tu = &g_tuning[bb_get_kernel()];
    int64_t mr = tu->mr;
    if (g.kbits) /* a tile holds whole input rows: all k planes of each */
        mr = mr / g.kbits * g.kbits > 0 ? mr / g.kbits * g.kbits : g.kbits;
    int64_t np = (N + BB_PANEL - 1) / BB_PANEL;
    int64_t nb = (M + mr - 1) / mr;
    if (g.out && !tu->float_order) {
        /* row blocks outer: each block's output rows are written contiguously while the weight
         * panels stream from L2 */
        linear_job job = {&g, fn, np, nb, 0, mr};
        bb_parallel_for(nb, 1, linear_float_blocks, &job);
        return;
    }
    /* chunked: rows in chunks whose activation bits stay in L1 (chunk_bytes); within a chunk,
     * every panel (read from L2) runs over the chunk's row blocks */
    int64_t chunk_blocks = (tu->chunk_bytes / (words_of(K) * 8)) / mr;
    if (chunk_blocks < 1) chunk_blocks = 1;
    if (chunk_blocks > nb) chunk_blocks = nb;
    int64_t nc = (nb + chunk_blocks - 1) / chunk_blocks;
    linear_job job = {&g, fn, np, nb, chunk_blocks, mr};
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
    linear_args g = {a, M * bits, lda, K, w_panels, N, alpha, bias, residual, out, NULL, 0, NULL, NULL, bits, koff,
                     step};
    linear_run(&g);
    return BB_OK;
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

/* ------------------------------------------------------------------------------------ */
/* LayerNorm (+ sign bits of its output)                                                 */

/* Every kernel family computes each row the same way: 16 partial sums (lane = i % 16, each
 * summed in the order of i), then the lanes added in order; the same for the squared
 * deviations; then out = ((x - mean) * rstd) * g + b. Rows are processed R at a time so that
 * their independent sums overlap (a single row's sum is one chain of dependent adds); each
 * row's own operations, and so its result, do not change with R. */
static inline __attribute__((always_inline)) void layernorm_block_portable(const float *x, int64_t H, const float *g,
                                                                           const float *b, float eps, float *out,
                                                                           const int R) {
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
        for (i = 0; i < H; i++) out[r * H + i] = (x[r * H + i] - mean[r]) * rstd[r] * g[i] + b[i];
}

static void layernorm_block_generic(const float *x, int64_t H, const float *g, const float *b, float eps, float *out,
                                    int R) {
    if (R == 4) layernorm_block_portable(x, H, g, b, eps, out, 4);
    else layernorm_block_portable(x, H, g, b, eps, out, 1);
}

#if BB_X86
/* AVX2: lanes 0-7 and 8-15 of the 16 partial sums in two registers per row; the elements
 * past the last whole 16 are added one by one (as the portable loop does), then the bits */
static inline __attribute__((always_inline)) __attribute__((target("avx2"))) void layernorm_block_avx2_r(
    const float *x, int64_t H, const float *g, const float *b, float eps, float *out, const float *t,
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
            __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(d, rv), _mm256_loadu_ps(g + i)),
                                     _mm256_loadu_ps(b + i));
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
            float y = (x[r * H + i] - mean[r]) * rstd[r] * g[i] + b[i];
            out[r * H + i] = y;
            if (bits) {
                int bit = t ? !(y - t[i] >= 0.0f) : y < 0.0f;
                if ((i & 63) == 0) bits[r * ldb + (i >> 6)] = 0;
                bits[r * ldb + (i >> 6)] |= (uint64_t)bit << (i & 63);
            }
        }
    }
}

__attribute__((target("avx2"))) static void layernorm_block_avx2(const float *x, int64_t H, const float *g,
                                                                 const float *b, float eps, float *out,
                                                                 const float *t, uint64_t *bits, int64_t ldb, int R) {
    if (R == 4) layernorm_block_avx2_r(x, H, g, b, eps, out, t, bits, ldb, 4);
    else layernorm_block_avx2_r(x, H, g, b, eps, out, t, bits, ldb, 1);
}

/* 16 floats at p: a plain load when lm is full (the common case), else a masked one */
static inline __attribute__((always_inline)) BB_AVX512 __m512 load16(__mmask16 lm, const float *p) {
    return lm == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lm, p);
}

/* R rows; each row's bits (if bits) packed from its output values as they are stored */
/* One full vector of a LayerNorm's output: y = (x - mean) * rstd * g + b over the 16 elements at
 * x, g, b, stored at out; returns the mask of its sign bits (y < 0, or with thresholds t: y - t
 * not >= 0, the compare of sign_pack_row_*_avx512). */
static inline __attribute__((always_inline)) BB_AVX512 __mmask16 layernorm_out16_avx512(
    const float *x, __m512 mv, __m512 rv, const float *g, const float *b, const float *t, float *out) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x), mv);
    __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d, rv), _mm512_loadu_ps(g)), _mm512_loadu_ps(b));
    _mm512_storeu_ps(out, y);
    return t ? _mm512_cmp_ps_mask(_mm512_sub_ps(y, _mm512_loadu_ps(t)), zero, _CMP_NGE_UQ)
             : _mm512_cmp_ps_mask(y, zero, _CMP_LT_OQ);
}

static inline __attribute__((always_inline)) BB_AVX512 void layernorm_block_avx512(
    const float *x, int64_t H, const float *g, const float *b, float eps, float *out, const float *t, uint64_t *bits,
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
                    __mmask16 neg = layernorm_out16_avx512(x + r * H + e, mv[r], rv[r], g + e, b + e, t ? t + e : NULL,
                                                           out + r * H + e);
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
            __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d, rv[r]), load16(lm, g + i)),
                                     load16(lm, b + i));
            if (lm == 0xFFFF)
                _mm512_storeu_ps(out + r * H + i, y);
            else
                _mm512_mask_storeu_ps(out + r * H + i, lm, y);
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
        __m256 t0_ = _mm256_unpacklo_ps(r0, r1), t1_ = _mm256_unpackhi_ps(r0, r1);                           \
        __m256 t2_ = _mm256_unpacklo_ps(r2, r3), t3_ = _mm256_unpackhi_ps(r2, r3);                           \
        __m256 t4_ = _mm256_unpacklo_ps(r4, r5), t5_ = _mm256_unpackhi_ps(r4, r5);                           \
        __m256 t6_ = _mm256_unpacklo_ps(r6, r7), t7_ = _mm256_unpackhi_ps(r6, r7);                           \
        __m256 u0_ = _mm256_shuffle_ps(t0_, t2_, 0x44), u1_ = _mm256_shuffle_ps(t0_, t2_, 0xEE);            \
        __m256 u2_ = _mm256_shuffle_ps(t1_, t3_, 0x44), u3_ = _mm256_shuffle_ps(t1_, t3_, 0xEE);            \
        __m256 u4_ = _mm256_shuffle_ps(t4_, t6_, 0x44), u5_ = _mm256_shuffle_ps(t4_, t6_, 0xEE);            \
        __m256 u6_ = _mm256_shuffle_ps(t5_, t7_, 0x44), u7_ = _mm256_shuffle_ps(t5_, t7_, 0xEE);            \
        c[0] = _mm256_permute2f128_ps(u0_, u4_, 0x20); c[1] = _mm256_permute2f128_ps(u1_, u5_, 0x20);         \
        c[2] = _mm256_permute2f128_ps(u2_, u6_, 0x20); c[3] = _mm256_permute2f128_ps(u3_, u7_, 0x20);         \
        c[4] = _mm256_permute2f128_ps(u0_, u4_, 0x31); c[5] = _mm256_permute2f128_ps(u1_, u5_, 0x31);         \
        c[6] = _mm256_permute2f128_ps(u2_, u6_, 0x31); c[7] = _mm256_permute2f128_ps(u3_, u7_, 0x31);         \
    } while (0)

/* (((0 + l0) + l1) + ...) + l15 over the 16 lanes of each of 8 rows: row r's sum in lane r */
static inline __attribute__((always_inline)) BB_AVX512 __m256 lanes_sum8(__m512 a0, __m512 a1, __m512 a2, __m512 a3,
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

BB_AVX512 static void layernorm_rows8_avx512(const float *x, int64_t H, const float *g, const float *b, float eps,
                                             float *out, const float *t, uint64_t *bits, int64_t ldb) {
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
    for (int r = 0; r < 8; r++) {
        const __m512 mv = BB_LANE(mean, r), rv = BB_LANE(rstd, r);
        const float *xr = x + r * H;
        float *o = out + r * H;
        for (int64_t i = 0; i < H; i += 64) {
            __mmask16 neg[4] = {0, 0, 0, 0};
            for (int v = 0; v < 4 && i + 16 * v < H; v++) {
                int64_t e = i + 16 * v;
                __mmask16 m = layernorm_out16_avx512(xr + e, mv, rv, g + e, b + e, t ? t + e : NULL, o + e);
                if (bits) neg[v] = m;
            }
            if (bits)
                bits[r * ldb + (i >> 6)] = _cvtmask64_u64(_mm512_kunpackd(_mm512_kunpackw(neg[3], neg[2]),
                                                                          _mm512_kunpackw(neg[1], neg[0])));
        }
    }
#undef BB_LN_ZERO
#undef BB_LN_SUM
#undef BB_LN_MEAN
#undef BB_LN_VAR
}
#undef BB_LANE

BB_AVX512 static void layernorm_rows_avx512(const float *x, int64_t H, const float *g, const float *b, float eps,
                                            float *out, const float *t, uint64_t *bits, int64_t ldb, int R) {
    if (R == 4) layernorm_block_avx512(x, H, g, b, eps, out, t, bits, ldb, 4);
    else layernorm_block_avx512(x, H, g, b, eps, out, t, bits, ldb, 1);
}
#endif

/* out = LayerNorm(x) per row (out may alias x); out_bits (if not NULL) = sign bits of out,
 * against the thresholds t when given. */
typedef struct {
    const float *x, *g, *b, *t;
    int64_t H, ldo;
    float eps;
    float *out;
    uint64_t *out_bits;
    int kernel;
} layernorm_args;

static void layernorm_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const layernorm_args *a = (const layernorm_args *)ctx;
    const float *x = a->x, *g = a->g, *b = a->b;
    int64_t H = a->H, ldo = a->ldo;
    float eps = a->eps, *out = a->out;
    uint64_t *out_bits = a->out_bits;
    int kernel = a->kernel;
    (void)tid;
    for (int64_t m = lo; m < hi;) {
        int R = hi - m >= 4 ? 4 : 1;
#if BB_X86
        if (kernel == BB_KERNEL_AVX512 && H % 16 == 0 && hi - m >= 8) {
            R = 8;
            layernorm_rows8_avx512(x + m * H, H, g, b, eps, out + m * H, a->t, out_bits ? out_bits + m * ldo : NULL,
                                   ldo);
        } else
        if (kernel == BB_KERNEL_AVX512) {
            layernorm_rows_avx512(x + m * H, H, g, b, eps, out + m * H, a->t, out_bits ? out_bits + m * ldo : NULL,
                                  ldo, R);
        } else
        if (kernel == BB_KERNEL_AVX2) {
            layernorm_block_avx2(x + m * H, H, g, b, eps, out + m * H, a->t, out_bits ? out_bits + m * ldo : NULL,
                                 ldo, R);
        } else
#endif
        {
            layernorm_block_generic(x + m * H, H, g, b, eps, out + m * H, R);
            for (int r = 0; out_bits && r < R; r++)
                sign_pack_row(out + (m + r) * H, a->t, H, out_bits + (m + r) * ldo, 0);
        }
        for (int r = 0; out_bits && r < R; r++)
            for (int64_t w = words_of(H); w < ldo; w++) out_bits[(m + r) * ldo + w] = 0;
        m += R;
    }
}

/* t: thresholds [H] of the bits (elastic binarization), or NULL for the signs.
 * Checks: H >= 1, x, g, b, out given; with out_bits, ldo >= words(H). */
int bb_layernorm(const float *x, int64_t M, int64_t H, const float *g, const float *b, float eps, float *out,
                 uint64_t *out_bits, int64_t ldo, const float *t) {
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(H) || !elems_ok(M, H, 1) || !x || !g || !b || !out) return BB_EINVAL;
    if (out_bits && (!dim_ok(ldo) || ldo < words_of(H) || !elems_ok(M, ldo, 1))) return BB_EINVAL;
    layernorm_args a = {x, g, b, t, H, ldo, eps, out, out_bits, bb_get_kernel()};
    bb_parallel_for(M, rows_grain(M, H, 8192), layernorm_rows, &a);
    return BB_OK;
}

/* ------------------------------------------------------------------------------------ */
/* embeddings: word (alpha_r * sign bits) + token type + position                        */

static inline __attribute__((always_inline)) void embed_row_portable(const uint64_t *wb, float al, const float *t,
                                                                    const float *p, int64_t H, float *o) {
    float nal = -al;
    for (int64_t i = 0; i < H; i++) {
        float wv = (wb[i >> 6] >> (i & 63)) & 1 ? nal : al;
        o[i] = (wv + t[i]) + p[i];
    }
}

#if BB_X86
BB_AVX512 static void embed_row_avx512(const uint64_t *wb, float al, const float *t, const float *p, int64_t H,
                                       float *o) {
    __m512 pos = _mm512_set1_ps(al), neg = _mm512_set1_ps(-al);
    for (int64_t i = 0; i < H; i += 16) {
        __mmask16 lm = H - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - i)) - 1);
        __mmask16 bits = (__mmask16)(wb[i >> 6] >> (i & 63));
        __m512 wv = _mm512_mask_blend_ps(bits, pos, neg);
        __m512 y = _mm512_add_ps(_mm512_add_ps(wv, _mm512_maskz_loadu_ps(lm, t + i)), _mm512_maskz_loadu_ps(lm, p + i));
        _mm512_mask_storeu_ps(o + i, lm, y);
    }
}
#endif

/* out[m] = (word[ids[m]] + type[type_ids[m]]) + pos[m % L]. A row whose id is outside
 * [0, V) or whose type is outside [0, T) is written as zeros and flags the call as invalid. */
typedef struct {
    const int64_t *ids, *type_ids;
    int64_t L, H, V, T;
    const uint64_t *word_bits;
    const float *word_alpha, *pos, *type;
    float *out;
    int avx512;
    _Atomic int *bad;
    const int64_t *positions; /* [M] or NULL: row m is at position m % L */
    int64_t P;
} embed_args;

/* Prefetches the word bits, alpha and position row of row n (a forward starts with the tables
 * in L3 or memory; word rows are scattered, so the hardware prefetcher does not fetch them).
 * Ids out of range are left alone (embed_rows refuses them). */
#define BB_EMBED_AHEAD 4 /* rows ahead */
static inline void embed_prefetch(const embed_args *a, int64_t n) {
    int64_t id = a->ids[n], at = a->positions ? a->positions[n] : n % a->L, hw = words_of(a->H);
    if ((uint64_t)id < (uint64_t)a->V) {
        __builtin_prefetch(a->word_bits + id * hw);
        __builtin_prefetch(a->word_bits + id * hw + hw - 1);
        __builtin_prefetch(a->word_alpha + id);
    }
    if ((uint64_t)at < (uint64_t)a->P)
        for (int64_t i = 0; i < a->H; i += 16) __builtin_prefetch(a->pos + at * a->H + i);
}

static void embed_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const embed_args *a = (const embed_args *)ctx;
    const int64_t *ids = a->ids, *type_ids = a->type_ids;
    int64_t L = a->L, H = a->H, hw = words_of(a->H);
    const uint64_t *word_bits = a->word_bits;
    const float *word_alpha = a->word_alpha, *pos = a->pos, *type = a->type;
    float *out = a->out;
    int avx512 = a->avx512;
    (void)tid;
    for (int64_t m = lo; m < hi; m++) {
        if (m + BB_EMBED_AHEAD < hi) embed_prefetch(a, m + BB_EMBED_AHEAD);
        int64_t at = a->positions ? a->positions[m] : m % L;
        if ((uint64_t)ids[m] >= (uint64_t)a->V || (uint64_t)type_ids[m] >= (uint64_t)a->T ||
            (uint64_t)at >= (uint64_t)a->P) {
            memset(out + m * H, 0, (size_t)H * sizeof(float));
            atomic_store_explicit(a->bad, 1, memory_order_relaxed);
            continue;
        }
        const uint64_t *wb = word_bits + ids[m] * hw;
        const float *t = type + type_ids[m] * H, *p = pos + at * H;
#if BB_X86
        if (avx512) {
            embed_row_avx512(wb, word_alpha[ids[m]], t, p, H, out + m * H);
            continue;
        }
#endif
        embed_row_portable(wb, word_alpha[ids[m]], t, p, H, out + m * H);
    }
    (void)avx512;
}

/* ids, type_ids [M] (M = B*L); word_bits [V, words(H)], word_alpha [V], pos [P, H], type [T, H];
 * positions [M] (optional; rows of several sequences packed without their padding): each row's
 * position, else row m is at position m % L. Checks: L, V, P, T, H >= 1, L <= P, M a multiple of
 * L, every array given; every id, type id and position in range (else BB_EINVAL, the rows
 * concerned zero). */
int bb_embed(const int64_t *ids, const int64_t *type_ids, int64_t M, int64_t L, const uint64_t *word_bits,
             const float *word_alpha, int64_t V, const float *pos, int64_t P, const float *type, int64_t T,
             int64_t H, float *out, const int64_t *positions) {
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(L) || !dim_ok(V) || !dim_ok(P) || !dim_ok(T) || !dim_ok(H) || L > P || M % L ||
        !elems_ok(V, words_of(H), 1) || !elems_ok(P, H, 1) || !elems_ok(T, H, 1) || !elems_ok(M, H, 1) || !ids ||
        !type_ids || !word_bits || !word_alpha || !pos || !type || !out)
        return BB_EINVAL;
    _Atomic int bad = 0;
    embed_args a = {ids, type_ids, L, H, V, T, word_bits, word_alpha, pos, type, out,
                    bb_get_kernel() == BB_KERNEL_AVX512, &bad, positions, P};
    bb_parallel_for(M, rows_grain(M, H, 16384), embed_rows, &a);
    return atomic_load(&bad) ? BB_EINVAL : BB_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Bi-Attention entirely in bits                                                         */

#if BB_X86
/* transpose64 in eight 512-bit registers (row 8R + i in lane i of register R): the same six
 * butterfly stages, each a bit-select between a row and its partner shifted. Partners 32, 16
 * and 8 rows apart lie in other registers, those 4, 2 and 1 apart in other lanes of the same
 * register (a lane permutation brings them). out may alias a. */
#define BB_SEL(m, x, y) _mm512_ternarylogic_epi64(m, x, y, 0xCA) /* m ? x : y, bit by bit */
#define BB_XSTAGE(lo, hi, j, m)                                                                               \
    do {                                                                                                      \
        __m512i l_ = lo;                                                                                      \
        lo = BB_SEL(_mm512_set1_epi64((long long)((m) << (j))), _mm512_slli_epi64(hi, j), lo);                \
        hi = BB_SEL(_mm512_set1_epi64((long long)(m)), _mm512_srli_epi64(l_, j), hi);                          \
    } while (0)
/* lanes i and i + j of z (upper: the lanes with bit j of i set), p: z with those lanes swapped */
#define BB_LSTAGE(z, p, j, m, upper)                                                                          \
    do {                                                                                                      \
        __m512i sh_ = _mm512_mask_mov_epi64(_mm512_slli_epi64(p, j), upper, _mm512_srli_epi64(p, j));        \
        __m512i mk_ = _mm512_mask_mov_epi64(_mm512_set1_epi64((long long)((m) << (j))), upper,                \
                                            _mm512_set1_epi64((long long)(m)));                               \
        z = BB_SEL(mk_, sh_, z);                                                                              \
    } while (0)
BB_AVX512 static void transpose64_avx512(const uint64_t a[64], uint64_t out[64]) {
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
        _mm512_storeu_si512(out + 8 * r, z[r]);
    }
}
#undef BB_XSTAGE
#undef BB_LSTAGE
#endif

typedef struct {
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
static inline int64_t relative_limit(const attn_args *g, int64_t h, int64_t pmin) {
    return pmin <= g->d ? g->rel[h * (g->d + 1) + pmin] : 0;
}

/* Each query row of each (b, h) in two steps: its BA bits (attn_ba_fn), then its context from
 * them (attn_ctx_fn). A row's BA bits of all heads come first, so that the heads' dependency
 * chains (a relative row's limit waits for its smallest popcount) overlap. */

/* BA bits of query row i of one (b, h) into ba[lw]; pcs [lp]: scratch for the row's popcounts
 * (relative rows). */
static inline __attribute__((always_inline)) void attn_ba_portable(const attn_args *g, int64_t bh, int64_t i,
                                                                   uint64_t *ba, int64_t *pcs) {
    int64_t b = bh / g->H;
    const uint64_t *q = g->q + (bh * g->L + i) * g->dw;
    const uint64_t *kt = g->kt + bh * g->dw * g->lp;
    const uint64_t *valid = g->valid + b * g->lw;
    if (g->rel) { /* relative: every popcount first, then the limit of the row's best real key */
        int64_t pmin = g->d + 1;
        for (int64_t w = 0; w < g->lw; w++)
            for (int t = 0; t < 64; t++) {
                int64_t j = 64 * w + t, pc = 0;
                for (int64_t x = 0; x < g->dw; x++) pc += __builtin_popcountll(q[x] ^ kt[x * g->lp + j]);
                pcs[j] = pc;
                if (((valid[w] >> t) & 1) && pc < pmin) pmin = pc;
            }
        int64_t lim = relative_limit(g, bh % g->H, pmin);
        for (int64_t w = 0; w < g->lw; w++) {
            uint64_t bits = 0;
            for (int t = 0; t < 64; t++) bits |= (uint64_t)(pcs[64 * w + t] < lim) << t;
            ba[w] = bits & valid[w];
        }
    } else {
        int64_t lim = g->lim ? g->lim[bh % g->H] : (g->d + 1) / 2; /* A > 0 <=> 2 pc < d <=> pc < lim */
        for (int64_t w = 0; w < g->lw; w++) {
            uint64_t bits = 0;
            for (int t = 0; t < 64; t++) {
                int64_t j = 64 * w + t, pc = 0;
                for (int64_t x = 0; x < g->dw; x++) pc += __builtin_popcountll(q[x] ^ kt[x * g->lp + j]);
                bits |= (uint64_t)(pc < lim) << t;
            }
            ba[w] = bits & valid[w];
        }
    }
}

/* The context of one row of one (b, h) from its BA bits: bits into cb[dw], counts into cnt (or
 * NULL); t: the head's thresholds (bit = !(count - t >= 0) in float32, as the student compares)
 * or NULL. */
static inline __attribute__((always_inline)) void attn_ctx_portable(const attn_args *g, int64_t bh,
                                                                    const uint64_t *ba, uint64_t *cb, int32_t *cnt,
                                                                    const float *t) {
    const uint64_t *vt = g->vt + bh * g->lw * g->dp;
    int64_t npos = 0;
    for (int64_t w = 0; w < g->lw; w++) npos += __builtin_popcountll(ba[w]);
    for (int64_t x = 0; x < g->dw; x++) cb[x] = 0;
    for (int64_t c = 0; c < g->d; c++) {
        int64_t neg = 0;
        for (int64_t w = 0; w < g->lw; w++) neg += __builtin_popcountll(ba[w] & vt[w * g->dp + c]);
        int64_t count = npos - 2 * neg;
        int bit = t ? !((float)count - t[c] >= 0.0f) : count < 0;
        cb[c >> 6] |= (uint64_t)bit << (c & 63);
        if (cnt) cnt[c] = (int32_t)count;
    }
}

static void attn_ba_portable_generic(const attn_args *g, int64_t bh, int64_t i, uint64_t *ba, int64_t *pcs) {
    attn_ba_portable(g, bh, i, ba, pcs);
}

static void attn_ctx_portable_generic(const attn_args *g, int64_t bh, const uint64_t *ba, uint64_t *cb, int32_t *cnt,
                                      const float *t) {
    attn_ctx_portable(g, bh, ba, cb, cnt, t);
}

#if BB_X86
__attribute__((target("popcnt"))) static void attn_ba_portable_popcnt(const attn_args *g, int64_t bh, int64_t i,
                                                                       uint64_t *ba, int64_t *pcs) {
    attn_ba_portable(g, bh, i, ba, pcs);
}

__attribute__((target("popcnt"))) static void attn_ctx_portable_popcnt(const attn_args *g, int64_t bh,
                                                                        const uint64_t *ba, uint64_t *cb,
                                                                        int32_t *cnt, const float *t) {
    attn_ctx_portable(g, bh, ba, cb, cnt, t);
}

/* popcount(q XOR k_j) of the 64 keys of word w of a row, in 8 vectors of 8 keys */
static inline __attribute__((always_inline)) BB_AVX512 void attn_popcounts_avx512(const attn_args *g, const uint64_t *q,
                                                                                  const uint64_t *kt, int64_t w,
                                                                                  __m512i acc[8]) {
    for (int v = 0; v < 8; v++) acc[v] = _mm512_setzero_si512();
    for (int64_t x = 0; x < g->dw; x++) {
        __m512i qv = _mm512_set1_epi64((long long)q[x]);
        const uint64_t *kx = kt + x * g->lp + 64 * w;
        for (int v = 0; v < 8; v++)
            acc[v] = _mm512_add_epi64(acc[v], _mm512_popcnt_epi64(_mm512_xor_si512(qv, _mm512_loadu_si512(kx + 8 * v))));
    }
}

/* the smallest of 8 vectors */
static inline __attribute__((always_inline)) BB_AVX512 __m512i attn_min8_avx512(const __m512i m[8]) {
    __m512i m01 = _mm512_min_epi64(m[0], m[1]), m23 = _mm512_min_epi64(m[2], m[3]);
    __m512i m45 = _mm512_min_epi64(m[4], m[5]), m67 = _mm512_min_epi64(m[6], m[7]);
    return _mm512_min_epi64(_mm512_min_epi64(m01, m23), _mm512_min_epi64(m45, m67));
}

/* the smallest lane of 8 popcounts, each at most d + 1 (in 16 bits below 2^16, one instruction) */
static inline __attribute__((always_inline)) BB_AVX512 int64_t attn_lane_min_avx512(const attn_args *g, __m512i m) {
    if (g->d < 0xffff) return _mm_cvtsi128_si32(_mm_minpos_epu16(_mm512_cvtepi64_epi16(m))) & 0xffff;
    return _mm512_reduce_min_epi64(m);
}

/* eight 8-bit masks joined into 64 bits (k0 the lowest byte), in mask registers */
static inline __attribute__((always_inline)) BB_AVX512 uint64_t join8_avx512(__mmask8 k0, __mmask8 k1, __mmask8 k2,
                                                                             __mmask8 k3, __mmask8 k4, __mmask8 k5,
                                                                             __mmask8 k6, __mmask8 k7) {
    __mmask32 lo = _mm512_kunpackw(_mm512_kunpackb(k3, k2), _mm512_kunpackb(k1, k0));
    __mmask32 hi = _mm512_kunpackw(_mm512_kunpackb(k7, k6), _mm512_kunpackb(k5, k4));
    return _cvtmask64_u64(_mm512_kunpackd(hi, lo));
}
/* the BA bits of 64 keys: popcount < lim */
static inline __attribute__((always_inline)) BB_AVX512 uint64_t attn_below_avx512(const __m512i acc[8], __m512i limv) {
#define BB_LT(v) _mm512_cmp_epi64_mask(acc[v], limv, _MM_CMPINT_LT)
    return join8_avx512(BB_LT(0), BB_LT(1), BB_LT(2), BB_LT(3), BB_LT(4), BB_LT(5), BB_LT(6), BB_LT(7));
#undef BB_LT
}

/* 64 keys' popcounts in 8 named vectors (a0 .. a7), which the compiler keeps in registers */
#define BB_LOAD8(a, p)                                                                                     \
    __m512i a##0 = _mm512_loadu_si512((p)), a##1 = _mm512_loadu_si512((p) + 8),                            \
            a##2 = _mm512_loadu_si512((p) + 16), a##3 = _mm512_loadu_si512((p) + 24),                      \
            a##4 = _mm512_loadu_si512((p) + 32), a##5 = _mm512_loadu_si512((p) + 40),                      \
            a##6 = _mm512_loadu_si512((p) + 48), a##7 = _mm512_loadu_si512((p) + 56)
/* a_v += popcount(op(x, the 8 words at p + 8v)) for v = 0 .. 7; op is _mm512_xor_si512 (query
 * against keys) or _mm512_and_si512 (BA against value bits) */
#define BB_ACC1(a, v, op, x, p)                                                                            \
    a##v = _mm512_add_epi64(a##v, _mm512_popcnt_epi64(op(x, _mm512_loadu_si512((p) + 8 * v))))
#define BB_ACC8(a, op, x, p)                                                                               \
    do {                                                                                                   \
        BB_ACC1(a, 0, op, x, p); BB_ACC1(a, 1, op, x, p); BB_ACC1(a, 2, op, x, p); BB_ACC1(a, 3, op, x, p);\
        BB_ACC1(a, 4, op, x, p); BB_ACC1(a, 5, op, x, p); BB_ACC1(a, 6, op, x, p); BB_ACC1(a, 7, op, x, p);\
    } while (0)
#define BB_POP8(a, qv, kx) BB_ACC8(a, _mm512_xor_si512, qv, kx)
#define BB_MIN8(a)                                                                                         \
    _mm512_min_epi64(_mm512_min_epi64(_mm512_min_epi64(a##0, a##1), _mm512_min_epi64(a##2, a##3)),        \
                     _mm512_min_epi64(_mm512_min_epi64(a##4, a##5), _mm512_min_epi64(a##6, a##7)))
/* the 64 bits of cmp(a_v, x) for v = 0 .. 7 (cmp: an _MM_CMPINT_ predicate) */
#define BB_CMP1(a, v, x, cmp) _mm512_cmp_epi64_mask(a##v, x, cmp)
#define BB_CMP8(a, x, cmp)                                                                                 \
    join8_avx512(BB_CMP1(a, 0, x, cmp), BB_CMP1(a, 1, x, cmp), BB_CMP1(a, 2, x, cmp), BB_CMP1(a, 3, x, cmp),  \
                 BB_CMP1(a, 4, x, cmp), BB_CMP1(a, 5, x, cmp), BB_CMP1(a, 6, x, cmp), BB_CMP1(a, 7, x, cmp))
#define BB_BELOW8(a, limv) BB_CMP8(a, limv, _MM_CMPINT_LT)

BB_AVX512 static void attn_ba_avx512(const attn_args *g, int64_t bh, int64_t i, uint64_t *ba, int64_t *pcs) {
    int64_t b = bh / g->H;
    const uint64_t *q = g->q + (bh * g->L + i) * g->dw;
    const uint64_t *kt = g->kt + bh * g->dw * g->lp;
    const uint64_t *valid = g->valid + b * g->lw;
    if (!g->rel) {
        const __m512i limv = _mm512_set1_epi64(g->lim ? g->lim[bh % g->H] : (g->d + 1) / 2);
        for (int64_t w = 0; w < g->lw; w++) {
            const __m512i zero = _mm512_setzero_si512();
            __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
            for (int64_t x = 0; x < g->dw; x++) {
                const __m512i qv = _mm512_set1_epi64((long long)q[x]);
                const uint64_t *kx = kt + x * g->lp + 64 * w;
                BB_POP8(a, qv, kx);
            }
            ba[w] = BB_BELOW8(a, limv) & valid[w];
        }
    } else if (g->lw <= 2) { /* relative, up to 128 keys: as below, the popcounts kept in registers */
        const int64_t *pad = g->pad + b * g->lp;
        const int two = g->lw == 2;
        BB_LOAD8(a, pad);
        BB_LOAD8(c, pad + (two ? 64 : 0));
        for (int64_t x = 0; x < g->dw; x++) {
            const __m512i qv = _mm512_set1_epi64((long long)q[x]);
            const uint64_t *kx = kt + x * g->lp;
            BB_POP8(a, qv, kx);
            if (two) BB_POP8(c, qv, kx + 64);
        }
        __m512i m = BB_MIN8(a);
        if (two) m = _mm512_min_epi64(m, BB_MIN8(c));
        const __m512i limv = _mm512_set1_epi64(relative_limit(g, bh % g->H, attn_lane_min_avx512(g, m)));
        ba[0] = BB_BELOW8(a, limv);
        if (two) ba[1] = BB_BELOW8(c, limv);
    } else { /* relative: the popcounts (d + 1 more for a key that is not real) wait in pcs for the limit */
        const int64_t *pad = g->pad + b * g->lp;
        __m512i minv = _mm512_set1_epi64(g->d + 1);
        for (int64_t w = 0; w < g->lw; w++) {
            __m512i acc[8];
            attn_popcounts_avx512(g, q, kt, w, acc);
            for (int v = 0; v < 8; v++) {
                acc[v] = _mm512_add_epi64(acc[v], _mm512_loadu_si512(pad + 64 * w + 8 * v));
                _mm512_storeu_si512(pcs + 64 * w + 8 * v, acc[v]);
            }
            minv = _mm512_min_epi64(minv, attn_min8_avx512(acc));
        }
        /* a key that is not real has at least d + 1 >= every limit: never attended */
        const __m512i limv = _mm512_set1_epi64(relative_limit(g, bh % g->H, attn_lane_min_avx512(g, minv)));
        for (int64_t w = 0; w < g->lw; w++) {
            __m512i acc[8];
            for (int v = 0; v < 8; v++) acc[v] = _mm512_loadu_si512(pcs + 64 * w + 8 * v);
            ba[w] = attn_below_avx512(acc, limv);
        }
    }
}

/* the context counts of 64 columns in 8 named vectors: a_v += popcount(BA AND v-bits) */
#define BB_AND8(a, bv, vw) BB_ACC8(a, _mm512_and_si512, bv, vw)
/* columns 8v .. 8v+7 of a one-word context (attn_ctx_avx512, dp = 64): their count
 * npos - 2 * popcount, its sign bits (or, with thresholds, !(count - t >= 0) in float32) into
 * neg, the counts into cnt when asked; the general path's operations */
#define BB_CTX1(a, v, d)                                                                                   \
    do {                                                                                                   \
        int n_ = (int)(d) - 8 * v >= 8 ? 8 : (int)(d) - 8 * v;                                             \
        if (n_ <= 0) break;                                                                                \
        __mmask8 m_ = (__mmask8)((1u << n_) - 1);                                                          \
        __m512i count_ = _mm512_sub_epi64(nv, _mm512_slli_epi64(a##v, 1));                                 \
        uint64_t neg_;                                                                                     \
        if (t) {                                                                                           \
            __m256 dv8_ = _mm256_sub_ps(_mm512_cvtepi64_ps(count_), _mm256_maskz_loadu_ps(m_, t + 8 * v));  \
            neg_ = _mm256_cmp_ps_mask(dv8_, _mm256_setzero_ps(), _CMP_NGE_UQ);                             \
        } else {                                                                                           \
            neg_ = _mm512_cmp_epi64_mask(count_, _mm512_setzero_si512(), _MM_CMPINT_LT);                   \
        }                                                                                                  \
        neg |= (neg_ & m_) << (8 * v);                                                                     \
        if (cnt) _mm256_mask_storeu_epi32(cnt + 8 * v, m_, _mm512_cvtepi64_epi32(count_));                \
    } while (0)

BB_AVX512 static void attn_ctx_avx512(const attn_args *g, int64_t bh, const uint64_t *ba, uint64_t *cb, int32_t *cnt,
                                      const float *t) {
    const uint64_t *vt = g->vt + bh * g->lw * g->dp;
    int64_t npos = 0;
    for (int64_t w = 0; w < g->lw; w++) npos += __builtin_popcountll(ba[w]);
    const __m512i nv = _mm512_set1_epi64(npos);
    if (g->dp == 64) { /* one word of context bits (57 to 64 columns): 8 vectors of counts in registers */
        const __m512i zero = _mm512_setzero_si512();
        __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
        for (int64_t w = 0; w < g->lw; w++) {
            const __m512i bv = _mm512_set1_epi64((long long)ba[w]);
            const uint64_t *vw = vt + w * 64;
            BB_AND8(a, bv, vw);
        }
        uint64_t neg = 0;
        BB_CTX1(a, 0, g->d); BB_CTX1(a, 1, g->d); BB_CTX1(a, 2, g->d); BB_CTX1(a, 3, g->d);
        BB_CTX1(a, 4, g->d); BB_CTX1(a, 5, g->d); BB_CTX1(a, 6, g->d); BB_CTX1(a, 7, g->d);
        cb[0] = neg;
        return;
    }
    for (int64_t x = 0; x < g->dw; x++) cb[x] = 0;
    for (int64_t c0 = 0; c0 < g->dp; c0 += 32) {
        int nblk = g->dp - c0 >= 32 ? 4 : (int)((g->dp - c0) / 8);
        __m512i acc[4];
        for (int v = 0; v < 4; v++) acc[v] = _mm512_setzero_si512();
        for (int64_t w = 0; w < g->lw; w++) {
            __m512i bv = _mm512_set1_epi64((long long)ba[w]);
            const uint64_t *vw = vt + w * g->dp + c0;
            for (int v = 0; v < nblk; v++)
                acc[v] = _mm512_add_epi64(acc[v], _mm512_popcnt_epi64(_mm512_and_si512(bv, _mm512_loadu_si512(vw + 8 * v))));
        }
        for (int v = 0; v < nblk; v++) {
            int64_t c = c0 + 8 * v;
            __m512i count = _mm512_sub_epi64(nv, _mm512_slli_epi64(acc[v], 1));
            int nc = g->d - c >= 8 ? 8 : (int)(g->d - c);
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
            cb[c >> 6] |= neg << (c & 63);
            if (cnt) _mm256_mask_storeu_epi32(cnt + c, (__mmask8)((1u << nc) - 1), _mm512_cvtepi64_epi32(count));
        }
    }
}
/* Query row r of every head for d = 64 with fixed limits (not relative): one word of query,
 * key and context bits per head, each head's context one word of the output row. The BA bits
 * of all heads, then their contexts: attn_ba_avx512 and attn_ctx_avx512's operations, inline.
 * ba: scratch [H, lw]. */
BB_AVX512 static void attn_row_avx512_d64(const attn_args *g, int64_t r, uint64_t *ba) {
    int64_t H = g->H, L = g->L, lw = g->lw, b = r / L, i = r % L;
    const uint64_t *valid = g->valid + b * lw;
    uint64_t *orow = g->out + r * g->ldo;
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t h = 0; h < H; h++) {
        int64_t bh = b * H + h;
        const __m512i qv = _mm512_set1_epi64((long long)g->q[bh * L + i]);
        const __m512i limv = _mm512_set1_epi64(g->lim ? g->lim[h] : (g->d + 1) / 2);
        const uint64_t *kt = g->kt + bh * g->lp;
        for (int64_t w = 0; w < lw; w++) {
            __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
            BB_POP8(a, qv, kt + 64 * w);
            ba[h * lw + w] = BB_BELOW8(a, limv) & valid[w];
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const uint64_t *vt = g->vt + (b * H + h) * lw * 64, *bah = ba + h * lw;
        const float *t = g->thr ? g->thr + h * 64 : NULL;
        int32_t *cnt = g->counts ? g->counts + (r * H + h) * 64 : NULL;
        int64_t npos = 0;
        for (int64_t w = 0; w < lw; w++) npos += __builtin_popcountll(bah[w]);
        const __m512i nv = _mm512_set1_epi64(npos);
        __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
        for (int64_t w = 0; w < lw; w++) {
            const __m512i bv = _mm512_set1_epi64((long long)bah[w]);
            BB_AND8(a, bv, vt + w * 64);
        }
        uint64_t neg = 0;
        if (!t && !cnt) { /* count = npos - 2 a < 0  <=>  a > floor(npos / 2) */
            neg = BB_CMP8(a, _mm512_set1_epi64(npos >> 1), _MM_CMPINT_NLE);
        } else {
            BB_CTX1(a, 0, 64); BB_CTX1(a, 1, 64); BB_CTX1(a, 2, 64); BB_CTX1(a, 3, 64);
            BB_CTX1(a, 4, 64); BB_CTX1(a, 5, 64); BB_CTX1(a, 6, 64); BB_CTX1(a, 7, 64);
        }
        orow[h] = neg;
    }
    for (int64_t x = H; x < g->ldo; x++) orow[x] = 0;
}
#endif

typedef void (*attn_ba_fn)(const attn_args *, int64_t, int64_t, uint64_t *, int64_t *);
typedef void (*attn_ctx_fn)(const attn_args *, int64_t, const uint64_t *, uint64_t *, int32_t *, const float *);

static void pick_attn(attn_ba_fn *ba, attn_ctx_fn *ctx) {
#if BB_X86
    if (bb_get_kernel() == BB_KERNEL_AVX512) {
        *ba = attn_ba_avx512;
        *ctx = attn_ctx_avx512;
        return;
    }
    if (cpu_has_popcnt()) {
        *ba = attn_ba_portable_popcnt;
        *ctx = attn_ctx_portable_popcnt;
        return;
    }
#endif
    *ba = attn_ba_portable_generic;
    *ctx = attn_ctx_portable_generic;
}

typedef struct {
    attn_args *g;
    const uint64_t *qkv;
    int64_t ldq, q_off, k_off, v_off;
    attn_ba_fn ba_fn;
    attn_ctx_fn ctx_fn;
    int row_d64;            /* rows through attn_row_avx512_d64 */
    int avx512;             /* the AVX-512 family: its bit transpose */
    uint64_t *scratch;      /* [threads, scratch_words]: ba [H, lw], cb [dw], popcounts [lp] of a relative row */
    int64_t scratch_words;
} attn_job;

static void attn_gather_heads(void *ctx, int64_t lo, int64_t hi, int tid) {
    const attn_job *j = (const attn_job *)ctx;
    const attn_args *g = j->g;
    int64_t H = g->H, L = g->L, d = g->d, dw = g->dw, lp = g->lp;
    /* heads of whole words (offsets and d multiples of 64): plain word copies */
    int whole = ((j->q_off | j->k_off | j->v_off | d) & 63) == 0;
    (void)tid;
    for (int64_t bh = lo; bh < hi; bh++) {
        int64_t b = bh / H, h = bh % H;
        uint64_t *qh = (uint64_t *)g->q + bh * L * dw, *kh = (uint64_t *)g->kt + bh * dw * lp;
        uint64_t *vh = (uint64_t *)g->vt + bh * g->lw * g->dp;
        const uint64_t *rows = j->qkv + b * L * j->ldq;
        for (int64_t x = 0; x < dw; x++) /* keys past L */
            for (int64_t i = L; i < lp; i++) kh[x * lp + i] = 0;
        memset(vh, 0, (size_t)(g->lw * g->dp) * 8);
        if (whole) {
            int64_t qw = j->q_off / 64 + h * dw, kw = j->k_off / 64 + h * dw;
            for (int64_t i = 0; i < L; i++) {
                const uint64_t *row = rows + i * j->ldq;
                for (int64_t x = 0; x < dw; x++) {
                    qh[i * dw + x] = row[qw + x];
                    kh[x * lp + i] = row[kw + x];
                }
            }
        } else {
            for (int64_t i = 0; i < L; i++) {
                const uint64_t *row = rows + i * j->ldq;
                for (int64_t x = 0; x < dw; x++) {
                    int nb = d - 64 * x >= 64 ? 64 : (int)(d - 64 * x);
                    qh[i * dw + x] = get_bits64(row, j->q_off + h * d + 64 * x, nb);
                    kh[x * lp + i] = get_bits64(row, j->k_off + h * d + 64 * x, nb);
                }
            }
        }
        uint64_t blk[64] __attribute__((aligned(64)));
        for (int64_t w = 0; w < g->lw; w++)
            for (int64_t x = 0; x < dw; x++) {
                int nb = d - 64 * x >= 64 ? 64 : (int)(d - 64 * x);
                int n = L - 64 * w < 64 ? (int)(L - 64 * w) : 64;
                const uint64_t *row = rows + 64 * w * j->ldq;
                for (int t = 0; t < n; t++, row += j->ldq)
                    blk[t] = whole ? row[j->v_off / 64 + h * dw + x] : get_bits64(row, j->v_off + h * d + 64 * x, nb);
                for (int t = n; t < 64; t++) blk[t] = 0;
#if BB_X86
                if (j->avx512)
                    transpose64_avx512(blk, blk);
                else
#endif
                    transpose64(blk);
                for (int c = 0; c < nb; c++) vh[w * g->dp + 64 * x + c] = blk[c];
            }
    }
}

static void attn_query_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const attn_job *j = (const attn_job *)ctx;
    const attn_args *g = j->g;
    int64_t H = g->H, L = g->L, d = g->d, ldo = g->ldo;
    uint64_t *ba = j->scratch + tid * j->scratch_words, *cb = ba + H * g->lw;
    int64_t *pcs = g->rel ? (int64_t *)(cb + g->dw) : NULL;
#if BB_X86
    if (j->row_d64) {
        for (int64_t r = lo; r < hi; r++) attn_row_avx512_d64(g, r, ba);
        return;
    }
#endif
    for (int64_t r = lo; r < hi; r++) {
        int64_t b = r / L, i = r % L;
        uint64_t *orow = g->out + r * ldo;
        for (int64_t x = 0; x < ldo; x++) orow[x] = 0;
        for (int64_t h = 0; h < H; h++) j->ba_fn(g, b * H + h, i, ba + h * g->lw, pcs);
        for (int64_t h = 0; h < H; h++) {
            j->ctx_fn(g, b * H + h, ba + h * g->lw, cb, g->counts ? g->counts + r * H * d + h * d : NULL,
                      g->thr ? g->thr + h * d : NULL);
            for (int64_t x = 0; x < g->dw; x++) {
                int nb = d - 64 * x >= 64 ? 64 : (int)(d - 64 * x);
                or_bits64(orow, h * d + 64 * x, nb, cb[x]);
            }
        }
    }
}

/* Bi-Attention of B sequences of L rows. qkv: bit rows [B*L, ldq] holding Q, K and V
 * (hidden = H*d bits each) at bit offsets q_off, k_off, v_off. valid: [B, ceil(L/64)] key
 * bits (1 = real token). BA_ij = A_ij > 0, or with lim [H] (elastic Bi-Attention: a per-head
 * threshold on the scores, turned into an integer) popcount(q_i XOR k_j) < lim_h, or with rel
 * [H, d + 1] (elastic Bi-Attention relative to each query's best key: a per-head margin below
 * the row maximum, turned into integers) popcount(q_i XOR k_j) < rel[h][p_i], p_i the smallest
 * popcount of row i over its real keys (a row without one attends to nothing); every limit in
 * [0, d + 1], lim and rel not both given. out: context sign bits [B*L, ldo], bit h*d+c of row =
 * (count < 0), or with thresholds t [H*d] (elastic binarization) !(count - t[h*d+c] >= 0) in
 * float32. counts (optional): the integer context [B*L, H*d]. Checks: L, H, d >= 1, each of Q,
 * K, V (H*d bits from its offset) inside a row of ldq words, ldo >= words(H*d), qkv, valid and
 * out given. Returns BB_OK, BB_EINVAL or BB_ENOMEM. */
static int biattention(const uint64_t *qkv, int64_t ldq, int64_t q_off, int64_t k_off, int64_t v_off, int64_t B,
                       int64_t L, int64_t H, int64_t d, const uint64_t *valid, uint64_t *out, int64_t ldo,
                       int32_t *counts, const float *t, const int64_t *lim, const int64_t *rel, int check_limits);

/* the score limits of Bi-Attention (H, d >= 1, H * d in range): each of lim [H] and rel [H, d + 1]
 * in [0, d + 1], not both given */
static int limits_ok(int64_t H, int64_t d, const int64_t *lim, const int64_t *rel) {
    if (lim && rel) return 0;
    for (int64_t h = 0; lim && h < H; h++)
        if (lim[h] < 0 || lim[h] > d + 1) return 0;
    for (int64_t n = 0; rel && n < H * (d + 1); n++)
        if (rel[n] < 0 || rel[n] > d + 1) return 0;
    return 1;
}

int bb_biattention(const uint64_t *qkv, int64_t ldq, int64_t q_off, int64_t k_off, int64_t v_off, int64_t B,
                   int64_t L, int64_t H, int64_t d, const uint64_t *valid, uint64_t *out, int64_t ldo,
                   int32_t *counts, const float *t, const int64_t *lim, const int64_t *rel) {
    return biattention(qkv, ldq, q_off, k_off, v_off, B, L, H, d, valid, out, ldo, counts, t, lim, rel, 1);
}

/* bb_biattention, checking the limits' values only with check_limits (bb_encoder checks them once) */
static int biattention(const uint64_t *qkv, int64_t ldq, int64_t q_off, int64_t k_off, int64_t v_off, int64_t B,
                       int64_t L, int64_t H, int64_t d, const uint64_t *valid, uint64_t *out, int64_t ldo,
                       int32_t *counts, const float *t, const int64_t *lim, const int64_t *rel, int check_limits) {
    if (!count_ok(B)) return BB_EINVAL;
    if (B == 0) return BB_OK;
    if (!dim_ok(L) || !dim_ok(H) || !dim_ok(d) || !dim_ok(ldq) || !dim_ok(ldo) || !qkv || !valid || !out)
        return BB_EINVAL;
    int64_t hd = H * d, row_bits = ldq * 64;
    if (hd > BB_MAX_DIM || ldo < words_of(hd) || !elems_ok(B, L, ldq) || !elems_ok(B, L, ldo) ||
        (counts && !elems_ok(B, L, hd)))
        return BB_EINVAL;
    if (q_off < 0 || k_off < 0 || v_off < 0 || q_off > row_bits - hd || k_off > row_bits - hd ||
        v_off > row_bits - hd)
        return BB_EINVAL;
    int64_t dw_ = words_of(d), lw_ = words_of(L);
    if (!elems_ok(B * H, L, dw_) || !elems_ok(B * H, dw_, lw_ * 64) || !elems_ok(B * H, lw_, (d + 7) / 8 * 8))
        return BB_EINVAL;
    if (lim && rel) return BB_EINVAL;
    if (check_limits && !limits_ok(H, d, lim, rel)) return BB_EINVAL;
    attn_args g;
    g.B = B; g.L = L; g.H = H; g.d = d;
    g.dw = words_of(d);
    g.lw = words_of(L);
    g.lp = g.lw * 64;
    g.dp = (d + 7) / 8 * 8;
    int64_t nq = B * H * L * g.dw, nk = B * H * g.dw * g.lp, nv = B * H * g.lw * g.dp, np = rel ? B * g.lp : 0;
    uint64_t *buf = (uint64_t *)aligned_alloc(64, (size_t)((nq + nk + nv + np) * 8 + 63) / 64 * 64);
    if (!buf) return BB_ENOMEM;
    uint64_t *qb = buf, *kb = buf + nq, *vb = buf + nq + nk;
    int64_t *pad = rel ? (int64_t *)(vb + nv) : NULL;
    for (int64_t b = 0; rel && b < B; b++)
        for (int64_t w = 0; w < g.lw; w++)
            for (int j = 0; j < 64; j++) pad[(b * g.lw + w) * 64 + j] = (valid[b * g.lw + w] >> j) & 1 ? 0 : d + 1;
    g.pad = pad;
    g.q = qb; g.kt = kb; g.vt = vb; g.valid = valid; g.out = out; g.ldo = ldo; g.counts = counts; g.thr = t;
    g.lim = lim;
    g.rel = rel;

    attn_job job = {&g, qkv, ldq, q_off, k_off, v_off, NULL, NULL, 0, 0, NULL,
                    (H * g.lw + g.dw + (rel ? g.lp : 0) + 7) / 8 * 8};
    pick_attn(&job.ba_fn, &job.ctx_fn);
    job.avx512 = BB_X86 && bb_get_kernel() == BB_KERNEL_AVX512;
    job.row_d64 = job.avx512 && d == 64 && !rel;
    /* phase 1: per (b, h), gather the head's bits into the layouts above */
    bb_parallel_for(B * H, 1, attn_gather_heads, &job);
    /* phase 2: per query row, every head; each row of `out` is written by one chunk. Scratch
     * per thread, each on its own cache lines. */
    int nthreads = team();
    job.scratch = (uint64_t *)aligned_alloc(64, (size_t)(nthreads * job.scratch_words) * 8);
    if (!job.scratch) {
        free(buf);
        return BB_ENOMEM;
    }
    bb_parallel_for(B * L, 4, attn_query_rows, &job);
    free(job.scratch);
    free(buf);
    return BB_OK;
}

/* ------------------------------------------------------------------------------------ */
/* k-bit activations, bit-serially (docs/packed_format.md, "Multi-bit activations")       */

/* The student's k-bit quantizer of one tensor (quantize_activation / quantize_symmetric in
 * bibert/quantizers.py), on the M x C values at x (row stride ldx):
 *   clip  c = max(min(max |x|, fl(clip_std * std(x))), 1e-8)   (NaN if std is)
 *   step  = fl(c / Q),  Q = 2^(bits-1) - 1
 *   level = rint(clamp(x, -c, c) / step)   (half to even) in [-Q, Q]
 * std is the unbiased standard deviation: the mean of the double sum rounded to float32, the
 * squared deviations summed in double (8 partial sums by column % 8, rows in order), the
 * square root rounded to float32, which is what torch computes for a float32 tensor. */
static float clip_of(double sum, double ss_unused, float amax, int nan, double n, float clip_std, double ss);

#if BB_X86
/* the two passes of kbit_clip, 8 doubles at a time: lane l holds the columns c = l mod 8, as
 * in the portable loops (a masked tail adds +0.0) */
BB_AVX512 static float kbit_clip_avx512(const float *x, int64_t M, int64_t C, int64_t ldx, float clip_std) {
    __m512d s = _mm512_setzero_pd();
    __m256 amax = _mm256_setzero_ps();
    __mmask8 nan = 0;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < C; c += 8) {
            __mmask8 lm = C - c >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (C - c)) - 1);
            __m256 v = _mm256_maskz_loadu_ps(lm, x + m * ldx + c);
            s = _mm512_add_pd(s, _mm512_cvtps_pd(v));
            amax = _mm256_max_ps(amax, _mm256_and_ps(v, absmask));
            nan |= _mm256_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
    double lanes[8];
    _mm512_storeu_pd(lanes, s);
    double sum = 0;
    for (int l = 0; l < 8; l++) sum += lanes[l];
    float am[8];
    _mm256_storeu_ps(am, amax);
    float a = 0.0f;
    for (int l = 0; l < 8; l++)
        if (am[l] > a) a = am[l];
    double n = (double)M * (double)C;
    __m512d mean = _mm512_set1_pd((double)(float)(sum / n));
    s = _mm512_setzero_pd();
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < C; c += 8) {
            __mmask8 lm = C - c >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (C - c)) - 1);
            __m512d d = _mm512_maskz_sub_pd(lm, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(lm, x + m * ldx + c)), mean);
            s = _mm512_add_pd(s, _mm512_mul_pd(d, d));
        }
    _mm512_storeu_pd(lanes, s);
    double ss = 0;
    for (int l = 0; l < 8; l++) ss += lanes[l];
    return clip_of(sum, 0, a, nan != 0, n, clip_std, ss);
}
#endif

/* the clip from the sums (see kbit_clip) */
static float clip_of(double sum, double ss_unused, float amax, int nan, double n, float clip_std, double ss) {
    (void)sum;
    (void)ss_unused;
    float sd = (float)sqrt(ss / (n - 1.0));
    float scaled = clip_std * sd;
    float clip = nan || scaled != scaled ? NAN : amax < scaled ? amax : scaled;
    if (clip < 1e-8f) clip = 1e-8f;
    return clip;
}

static float kbit_clip(const float *x, int64_t M, int64_t C, int64_t ldx, float clip_std) {
#if BB_X86
    if (bb_get_kernel() == BB_KERNEL_AVX512) return kbit_clip_avx512(x, M, C, ldx, clip_std);
#endif
    double s8[8] = {0};
    float amax = 0.0f;
    int nan = 0;
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < C; c++) {
            float v = x[m * ldx + c];
            s8[c & 7] += v;
            float a = fabsf(v);
            if (a > amax) amax = a;
            if (v != v) nan = 1;
        }
    double sum = 0;
    for (int l = 0; l < 8; l++) sum += s8[l];
    double n = (double)M * (double)C;
    double mean = (double)(float)(sum / n);
    for (int l = 0; l < 8; l++) s8[l] = 0;
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < C; c++) {
            double d = (double)x[m * ldx + c] - mean;
            s8[c & 7] += d * d;
        }
    double ss = 0;
    for (int l = 0; l < 8; l++) ss += s8[l];
    return clip_of(sum, 0, amax, nan, n, clip_std, ss);
}

typedef struct {
    const float *x;
    int64_t C, ldx, ldo;
    int bits;
    float clip, step;
    uint64_t *out;
    int8_t *levels;
} kq_args;

#if BB_X86
/* 16 values at a time: the portable loop's clamp, division and rint (half to even), NaN and
 * a non-finite step giving level 0 */
BB_AVX512 static void kbit_pack_row_avx512(const kq_args *a, int64_t m) {
    int Q = (1 << (a->bits - 1)) - 1, k = a->bits;
    const float *xr = a->x + m * a->ldx;
    int finite = a->step > 0.0f && a->step <= 3.0e38f;
    const __m512 lo = _mm512_set1_ps(-a->clip), hi = _mm512_set1_ps(a->clip), st = _mm512_set1_ps(a->step);
    const __m512i qv = _mm512_set1_epi32(Q), nq = _mm512_set1_epi32(-Q);
    for (int b = 0; b < k; b++)
        for (int64_t w = 0; w < a->ldo; w++) a->out[(m * k + b) * a->ldo + w] = 0;
    for (int64_t c = 0; c < a->C; c += 16) {
        __mmask16 lm = a->C - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (a->C - c)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(lm, xr + c);
        __mmask16 ok = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q) & lm;
        if (!finite) ok = 0;
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi); /* clamp: v < -c -> -c, v > c -> c */
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v, st), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i n = _mm512_maskz_cvtps_epi32(ok, q);
        n = _mm512_min_epi32(_mm512_max_epi32(n, nq), qv);
        __m512i u = _mm512_add_epi32(n, qv);
        for (int b = 0; b < k; b++) {
            __mmask16 bitm = _mm512_mask_test_epi32_mask(lm, u, _mm512_set1_epi32(1 << b));
            a->out[(m * k + b) * a->ldo + (c >> 6)] |= (uint64_t)bitm << (c & 63);
        }
        if (a->levels) _mm_mask_storeu_epi8(a->levels + m * a->C + c, lm, _mm512_cvtepi32_epi8(n));
    }
}
#endif

static void kbit_pack_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const kq_args *a = (const kq_args *)ctx;
#if BB_X86
    if (bb_get_kernel() == BB_KERNEL_AVX512) {
        for (int64_t m = lo; m < hi; m++) kbit_pack_row_avx512(a, m);
        return;
    }
#endif
    int Q = (1 << (a->bits - 1)) - 1, k = a->bits;
    float step = a->step, clip = a->clip;
    int finite = step > 0.0f && step <= 3.0e38f; /* a NaN clip (std of a single value) gives level 0 */
    (void)tid;
    for (int64_t m = lo; m < hi; m++) {
        const float *xr = a->x + m * a->ldx;
        for (int b = 0; b < k; b++)
            for (int64_t w = 0; w < a->ldo; w++) a->out[(m * k + b) * a->ldo + w] = 0;
        for (int64_t c = 0; c < a->C; c++) {
            float v = xr[c];
            int level = 0;
            if (finite && v == v) {
                if (v < -clip) v = -clip;
                if (v > clip) v = clip;
                float q = rintf(v / step);
                level = q < (float)-Q ? -Q : q > (float)Q ? Q : (int)q;
            }
            unsigned u = (unsigned)(level + Q);
            for (int b = 0; b < k; b++)
                a->out[(m * k + b) * a->ldo + (c >> 6)] |= (uint64_t)((u >> b) & 1) << (c & 63);
            if (a->levels) a->levels[m * a->C + c] = (int8_t)level;
        }
    }
}

/* Quantizes the M x C floats at x (row stride ldx) to bits-bit levels as the student does
 * (kbit_clip; one clip for the whole tensor) and writes their bit-planes for bb_linear_kbit and
 * bb_biattention_kbit: plane b of row m at out + (m * bits + b) * ldo holds bit b of
 * u = level + Q (padding bits 0). *step_out receives the step; levels (optional, int8 [M, C])
 * the levels. Checks: bits 2 or 4, C >= 1, ldx >= C, ldo >= words(C), x, out, step_out given. */
int bb_quantize_planes(const float *x, int64_t M, int64_t C, int64_t ldx, int bits, float clip_std, uint64_t *out,
                       int64_t ldo, float *step_out, int8_t *levels) {
    if (!count_ok(M) || (bits != 2 && bits != 4)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(C) || !dim_ok(ldx) || ldx < C || !dim_ok(ldo) || ldo < words_of(C) || !elems_ok(M, ldx, 1) ||
        !elems_ok(M * bits, ldo, 1) || !x || !out || !step_out)
        return BB_EINVAL;
    float clip = kbit_clip(x, M, C, ldx, clip_std);
    float step = clip / (float)((1 << (bits - 1)) - 1);
    kq_args a = {x, C, ldx, ldo, bits, clip, step, out, levels};
    bb_parallel_for(M, rows_grain(M, C, 16384), kbit_pack_rows, &a);
    *step_out = step;
    return BB_OK;
}

/* GELU of the FFN-in output for the k-bit FFN-out input: x * 0.5 * (1 + erf(x / sqrt 2)) with
 * erf from the Abramowitz-Stegun 7.1.26 form (error below 1.5e-7) and a polynomial exp, in
 * float32 with fused multiply-adds (fmaf: the same result on every kernel family). It is
 * close to torch's float32 GELU but not bit-identical to it. */
static inline __attribute__((always_inline)) float gelu_one(float x) {
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

static void gelu_rows_generic(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = gelu_one(x[i]);
}
#if BB_X86
__attribute__((target("avx512f,avx512dq,avx512vl,fma"))) static void gelu_rows_avx512(const float *x, float *y,
                                                                                       int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = gelu_one(x[i]);
}
__attribute__((target("avx2,fma"))) static void gelu_rows_avx2(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = gelu_one(x[i]);
}
#endif

typedef struct {
    const float *x;
    float *y;
    int64_t C;
    int kind;
} gelu_args;

static void gelu_rows(void *ctx, int64_t lo, int64_t hi, int tid) {
    const gelu_args *a = (const gelu_args *)ctx;
    (void)tid;
#if BB_X86
    if (a->kind == 2) {
        gelu_rows_avx512(a->x + lo * a->C, a->y + lo * a->C, (hi - lo) * a->C);
        return;
    }
    if (a->kind == 1) {
        gelu_rows_avx2(a->x + lo * a->C, a->y + lo * a->C, (hi - lo) * a->C);
        return;
    }
#endif
    gelu_rows_generic(a->x + lo * a->C, a->y + lo * a->C, (hi - lo) * a->C);
}

/* y = GELU(x) for M x C floats (y may alias x). Checks: C >= 1, x and y given. */
int bb_gelu(const float *x, int64_t M, int64_t C, float *y) {
    if (!count_ok(M)) return BB_EINVAL;
    if (M == 0) return BB_OK;
    if (!dim_ok(C) || !elems_ok(M, C, 1) || !x || !y) return BB_EINVAL;
    int kind = 0;
#if BB_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("fma")) kind = bb_get_kernel() == BB_KERNEL_AVX512 ? 2 : __builtin_cpu_supports("avx2");
#endif
    gelu_args a = {x, y, C, kind};
    bb_parallel_for(M, rows_grain(M, C, 16384), gelu_rows, &a);
    return BB_OK;
}

/* Bi-Attention on k-bit Q, K and V of one sequence (L rows; H heads of d), from their levels
 * (int8 [L, H*d] each, as bb_quantize_planes gives them); valid [words(L)] key bits:
 *   S_ij      = sum_c nq_ic nk_jc                  (the score's sign: its scale is positive)
 *   BA_ij     = S_ij > 0 and key j valid           (S = 0 gives 0, docs/method.md §3)
 *   count_ic  = sum_j BA_ij nv_jc,   out_ic = fl(count_ic * step_v)
 * all in integers but the last rounding. counts (optional, int32 [L, H*d]) receives the
 * counts. Checks: L, H, d >= 1, ldo >= H*d, every buffer but counts given. */
typedef struct {
    const int8_t *q, *k, *v;
    const uint64_t *valid;
    int64_t L, H, d, ldo;
    float sv;
    float *out;
    int32_t *counts;
    int64_t scratch_ints;
    int32_t *scratch;
} kattn_args;

static inline __attribute__((always_inline)) void kattn_head_body(const kattn_args *g, int64_t h, int32_t *buf) {
    int64_t L = g->L, d = g->d, hd = g->H * g->d, lp = (L + 15) / 16 * 16;
    int32_t *cnt = buf;       /* [d] */
    int32_t *S = cnt + (d + 15) / 16 * 16; /* [lp] the scores of one query */
    int32_t *kt = S + lp;     /* [d][lp] the head's key levels, transposed */
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = 0; j < lp; j++) kt[c * lp + j] = j < L ? g->k[j * hd + h * d + c] : 0;
    for (int64_t i = 0; i < L; i++) {
        const int8_t *qi = g->q + i * hd + h * d;
        for (int64_t j = 0; j < lp; j++) S[j] = 0;
        for (int64_t c = 0; c < d; c++) {
            int32_t qc = qi[c];
            if (!qc) continue;
            const int32_t *kc = kt + c * lp;
            for (int64_t j = 0; j < lp; j++) S[j] += qc * kc[j];
        }
        for (int64_t c = 0; c < d; c++) cnt[c] = 0;
        for (int64_t j = 0; j < L; j++) {
            if (S[j] <= 0 || !((g->valid[j >> 6] >> (j & 63)) & 1)) continue;
            const int8_t *nv = g->v + j * hd + h * d;
            for (int64_t c = 0; c < d; c++) cnt[c] += nv[c];
        }
        for (int64_t c = 0; c < d; c++) g->out[i * g->ldo + h * d + c] = (float)cnt[c] * g->sv;
        if (g->counts)
            for (int64_t c = 0; c < d; c++) g->counts[i * hd + h * d + c] = cnt[c];
    }
}

static void kattn_head_generic(const kattn_args *g, int64_t h, int32_t *buf) { kattn_head_body(g, h, buf); }
#if BB_X86
/* kattn_head_body with the scores of 128 keys in eight registers of 16-bit lanes (|S| <= d Q^2
 * fits 16 bits for d <= 668) and the counts of 64 channels in four registers over the
 * attended keys: the same integers. */
BB_AVX512 static void kattn_head_avx512(const kattn_args *g, int64_t h, int32_t *buf) {
    int64_t L = g->L, d = g->d, hd = g->H * g->d, lp = (L + 127) / 128 * 128;
    if (d > 600) {
        kattn_head_generic(g, h, buf);
        return;
    }
    int16_t *kt = (int16_t *)buf;             /* [d][lp] the head's key levels, transposed */
    uint64_t *ba = (uint64_t *)(kt + d * lp); /* [lp / 64] the attended keys of one query */
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = 0; j < lp; j++) kt[c * lp + j] = j < L ? g->k[j * hd + h * d + c] : 0;
    const __m512 sv = _mm512_set1_ps(g->sv);
    for (int64_t i = 0; i < L; i++) {
        const int8_t *qi = g->q + i * hd + h * d;
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
                ba[word] = word < (L + 63) / 64 ? pos & g->valid[word] : 0;
            }
        }
        for (int64_t c0 = 0; c0 < d; c0 += 64) {
            __m512i cn[4];
            for (int v = 0; v < 4; v++) cn[v] = _mm512_setzero_si512();
            int64_t n = d - c0 < 64 ? d - c0 : 64;
            for (int64_t w = 0; w < lp / 64; w++)
                for (uint64_t bits = ba[w]; bits; bits &= bits - 1) {
                    int64_t j = 64 * w + __builtin_ctzll(bits);
                    const int8_t *nv = g->v + j * hd + h * d + c0;
                    for (int v = 0; v < 4 && 16 * v < n; v++) {
                        __mmask16 lm = n - 16 * v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - 16 * v)) - 1);
                        cn[v] = _mm512_add_epi32(cn[v], _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lm, nv + 16 * v)));
                    }
                }
            for (int v = 0; v < 4 && 16 * v < n; v++) {
                __mmask16 lm = n - 16 * v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - 16 * v)) - 1);
                _mm512_mask_storeu_ps(g->out + i * g->ldo + h * d + c0 + 16 * v, lm,
                                      _mm512_mul_ps(_mm512_cvtepi32_ps(cn[v]), sv));
                if (g->counts) _mm512_mask_storeu_epi32(g->counts + i * hd + h * d + c0 + 16 * v, lm, cn[v]);
            }
        }
    }
}

__attribute__((target("avx2"))) static void kattn_head_avx2(const kattn_args *g, int64_t h, int32_t *buf) {
    kattn_head_body(g, h, buf);
}
#endif

static void kattn_heads(void *ctx, int64_t lo, int64_t hi, int tid) {
    const kattn_args *g = (const kattn_args *)ctx;
    int32_t *buf = g->scratch + tid * g->scratch_ints;
    int kernel = bb_get_kernel();
    for (int64_t h = lo; h < hi; h++) {
#if BB_X86
        if (kernel == BB_KERNEL_AVX512) {
            kattn_head_avx512(g, h, buf);
            continue;
        }
        if (kernel == BB_KERNEL_AVX2) {
            kattn_head_avx2(g, h, buf);
            continue;
        }
#endif
        (void)kernel;
        kattn_head_generic(g, h, buf);
    }
}

int bb_biattention_kbit(const int8_t *q, const int8_t *k, const int8_t *v, int64_t L, int64_t H, int64_t d,
                        float step_v, const uint64_t *valid, float *out, int64_t ldo, int32_t *counts) {
    if (!dim_ok(L) || !dim_ok(H) || !dim_ok(d) || !dim_ok(ldo)) return BB_EINVAL;
    int64_t hd = H * d;
    if (hd > BB_MAX_DIM || ldo < hd || !elems_ok(L, ldo, 1) || !elems_ok(L, hd, 1) || !q || !k || !v || !valid ||
        !out)
        return BB_EINVAL;
    int64_t lp = (L + 127) / 128 * 128; /* room for both layouts (int32 [d + 16 + d*lp], or int16 and the list) */
    if (!elems_ok(d + 16, lp, 1)) return BB_EINVAL;
    int64_t si = ((d + 15) / 16 * 16 + lp + d * lp + L + 15) / 16 * 16;
    int nthreads = team();
    kattn_args g = {q, k, v, valid, L, H, d, ldo, step_v, out, counts, si, NULL};
    g.scratch = (int32_t *)aligned_alloc(64, (size_t)(nthreads * si) * 4);
    if (!g.scratch) return BB_ENOMEM;
    bb_parallel_for(H, 1, kattn_heads, &g);
    free(g.scratch);
    return BB_OK;
}

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
        int rc = bb_linear(j->ctx + r * hw, n, hw, H, p->ao_w, H, p->ao_c0, p->ao_c1, x, y, NULL, 0, NULL, NULL);
        if (!rc) rc = bb_layernorm(y, n, H, p->ln1_g, p->ln1_b, j->eps, a, ab, hw, p->ln1_t);
        if (!rc) rc = bb_linear(ab, n, hw, H, p->fi_w, I, NULL, NULL, NULL, NULL, fb, iw, p->fi_thr, p->fi_flip);
        if (!rc) rc = bb_linear(fb, n, iw, I, p->fo_w, H, p->fo_c0, p->fo_c1, a, y, NULL, 0, NULL, NULL);
        if (!rc) rc = bb_layernorm(y, n, H, p->ln2_g, p->ln2_b, j->eps, x, j->xb + r * hw, hw, p->ln2_t);
        if (rc) atomic_store(&j->rc, rc);
    }
}

/* sequences [s0, s1) of the job as one group, through every layer */
static int encoder_group(encoder_job *j, int64_t s0, int64_t s1) {
    int64_t H = j->H, I = j->I, hw = words_of(H), qw = words_of(3 * H);
    int64_t r0 = j->start[s0], M = j->start[s1] - r0, maxlen = 0;
    for (int64_t s = s0; s < s1; s++)
        if (j->start[s + 1] - j->start[s] > maxlen) maxlen = j->start[s + 1] - j->start[s];
    int64_t tail_rows = g_tail_rows < M ? g_tail_rows : M;
    int nthreads = team();
    int64_t scratch_bytes = ((tail_rows * H * 4 * 2 + tail_rows * (hw + words_of(I)) * 8) + 63) / 64 * 64;
    size_t n = (size_t)M * (qw + hw) * 8 + (size_t)words_of(maxlen) * 8 + (size_t)nthreads * scratch_bytes + 64;
    char *buf = (char *)aligned_alloc(64, (n + 63) / 64 * 64);
    if (!buf) return BB_ENOMEM;
    char *scratch = buf;
    uint64_t *qkv = (uint64_t *)(scratch + nthreads * scratch_bytes), *ctx = qkv + M * qw, *valid = ctx + M * hw;
    float *x = j->x + r0 * H;
    uint64_t *xb = j->xb + r0 * hw;
    int rc = BB_OK;
    for (int64_t l = 0; l < j->n_layers && rc == BB_OK; l++) {
        const bb_layer *p = j->layers + l;
        rc = bb_linear(xb, M, hw, H, p->qkv_w, 3 * H, NULL, NULL, NULL, NULL, qkv, qw, p->qkv_thr, p->qkv_flip);
        for (int64_t s = s0; s < s1 && !rc; s++) { /* Bi-Attention within each sequence */
            int64_t a0 = j->start[s] - r0, L = j->start[s + 1] - j->start[s];
            for (int64_t w = 0; w < words_of(L); w++) valid[w] = 0;
            for (int64_t i = 0; i < L; i++) valid[i >> 6] |= (uint64_t)(j->row_valid[r0 + a0 + i] != 0) << (i & 63);
            rc = biattention(qkv + a0 * qw, qw, 0, H, 2 * H, 1, L, j->heads, H / j->heads, valid, ctx + a0 * hw, hw,
                             NULL, p->ctx_t, p->score_lim, p->score_rel, 0);
        }
        if (rc) break;
        tail_job t = {p, 0, M, H, I, tail_rows, j->eps, ctx, x, xb, scratch, scratch_bytes, BB_OK};
        bb_parallel_for((M + tail_rows - 1) / tail_rows, 1, tail_chunks, &t);
        rc = atomic_load(&t.rc);
        if (!rc && j->hidden) memcpy(j->hidden + l * j->hidden_stride + r0 * H, x, (size_t)(M * H) * 4);
    }
    free(buf);
    return rc;
}

/* groups [lo, hi), each a whole forward on one thread; group g = sequences gs[g] .. gs[g+1] */
typedef struct {
    encoder_job *job;
    const int64_t *gs;
} groups_job;

static void encoder_groups(void *ctx, int64_t lo, int64_t hi, int tid) {
    groups_job *g = (groups_job *)ctx;
    (void)tid;
    for (int64_t k = lo; k < hi; k++) {
        int rc = encoder_group(g->job, g->gs[k], g->gs[k + 1]);
        if (rc) atomic_store(&g->job->rc, rc);
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
                       float *hidden) {
    int64_t rows = start[n_seq];
    /* groups of consecutive sequences of about g_group_rows rows, at least as many as threads
     * when there are enough sequences */
    int64_t target = g_group_rows;
    if (g_threads > 1 && n_seq >= g_threads && (rows + g_threads - 1) / g_threads < target)
        target = (rows + g_threads - 1) / g_threads;
    int64_t *gs = (int64_t *)malloc((size_t)(n_seq + 1) * sizeof(int64_t));
    if (!gs) return BB_ENOMEM;
    int64_t ng = 0;
    gs[0] = 0;
    for (int64_t s = 0; s < n_seq; s++)
        if (s + 1 == n_seq || start[s + 1] - start[gs[ng]] + (start[s + 2] - start[s + 1]) > target) gs[++ng] = s + 1;
    encoder_job job = {layers, n_layers, H, heads, I, eps, start, row_valid, x, xb, hidden, rows * H, BB_OK};
    groups_job g = {&job, gs};
    if (g_threads > 1 && ng >= g_threads)
        bb_parallel_for(ng, 1, encoder_groups, &g);
    else
        encoder_groups(&g, 0, ng, 0);
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
    return encoder_run(layers, n_layers, n_seq, start, H, heads, I, eps, row_valid, x, xb, hidden);
}

/* ------------------------------------------------------------------------------------ */
/* a whole forward in one call: embeddings, encoder, pooler                              */

/* The whole forward short of the classifier: the embeddings of each row (word, token type,
 * position; row m of sequence s at position positions[m], or m - start[s] when positions is
 * NULL) and their LayerNorm into x and its bits xb (against m->ln_t when given), the n_layers
 * encoder layers (bb_encoder), then the pooler on each sequence's first row: its sign bits
 * (against m->pool_t when given) through the float Linear m->pool_w, c0, c1 (H outputs) into
 * pooled [n_seq, H], before the tanh. hidden (optional): [n_layers + 1, rows, H], the
 * embeddings' output, then each layer's. Each step the same kernel as bb_embed, bb_layernorm,
 * bb_encoder, bb_sign_pack and bb_linear run on their own (so the same results). Checks:
 * bb_encoder's, bb_embed's (each id, type and position in range, else BB_EINVAL before any layer
 * runs), and every pointer of m given but the thresholds. Returns BB_OK, BB_EINVAL or BB_ENOMEM. */
int bb_forward(const bb_model *m, const bb_layer *layers, int64_t n_layers, int64_t n_seq, const int64_t *start,
               int64_t H, int64_t heads, int64_t I, float eps, const int64_t *ids, const int64_t *type_ids,
               const int64_t *positions, const uint8_t *row_valid, float *x, uint64_t *xb, float *hidden,
               float *pooled) {
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
    if (rc) return rc;
    if (hidden) memcpy(hidden, x, (size_t)(rows * H) * sizeof(float));
    if (n_layers) rc = encoder_run(layers, n_layers, n_seq, start, H, heads, I, eps, row_valid, x, xb,
                                   hidden ? hidden + rows * H : NULL);
    if (rc) return rc;
    uint64_t *cls = (uint64_t *)malloc((size_t)(n_seq * hw) * sizeof(uint64_t));
    if (!cls) return BB_ENOMEM;
    for (int64_t s = 0; s < n_seq && !rc; s++) rc = bb_sign_pack(x + start[s] * H, 1, H, H, cls + s * hw, hw, m->pool_t);
    if (!rc) rc = bb_linear(cls, n_seq, hw, H, m->pool_w, H, m->pool_c0, m->pool_c1, NULL, pooled, NULL, 0, NULL, NULL);
    free(cls);
    return rc;
}
