/* The engine's runtime: ABI version, CPU features, the active kernel family (the ops table
 * every driver calls through) and the thread pool.
 *
 * Kernel families, chosen at run time (bb_set_kernel; auto: the fastest this CPU has):
 *   BB_KERNEL_AVX512    AVX-512 F/BW/DQ/VL + VPOPCNTDQ: every op (isa/avx512.c,
 *                       isa/avx512_attention.c)
 *   BB_KERNEL_AVX2      AVX2 + FMA + POPCNT: the binary Linear (nibble-table popcount, VPSHUFB +
 *                       VPSADBW), LayerNorm, GELU and k-bit attention (isa/avx2.c); the other
 *                       ops take the portable kernels
 *   BB_KERNEL_PORTABLE  plain C with __builtin_popcountll (isa/portable.c), in a POPCNT clone
 *                       where the CPU has the instruction
 * A family is one table (bb_internal.h, bb_ops): selecting it selects every op, and nothing
 * else in the library asks which CPU it runs on. All perform the same float operations in the
 * same order (the build turns FMA contraction off), so their outputs are bit-identical.
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
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "bb_internal.h"

int bb_abi_version(void) { return BB_ABI_VERSION; }

/* ------------------------------------------------------------------------------------ */
/* CPU features and the kernel family                                                    */

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

/* AVX2 with POPCNT, and FMA for the family's GELU (every AVX2 CPU but a few has it) */
int bb_cpu_has_avx2(void) {
#if BB_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
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

_Static_assert(BB_KERNEL_PORTABLE < BB_FAMILIES && BB_KERNEL_AVX512 < BB_FAMILIES && BB_KERNEL_AVX2 < BB_FAMILIES,
               "bb_internal.h: BB_FAMILIES counts every family");

/* The active table; NULL until a family is chosen (the first kernel call chooses auto). */
static _Atomic(const bb_ops *) g_ops;

/* The table of a family (not AUTO), or NULL if this CPU cannot run it. */
static const bb_ops *family_ops(int kernel) {
    switch (kernel) {
    case BB_KERNEL_PORTABLE:
#if BB_X86
        if (cpu_has_popcnt()) return &bb_ops_portable_popcnt;
#endif
        return &bb_ops_portable;
#if BB_X86
    case BB_KERNEL_AVX2: return bb_cpu_has_avx2() ? &bb_ops_avx2 : NULL;
    case BB_KERNEL_AVX512: /* with VNNI: the table whose softmax attention uses vpdpbusd */
        if (!bb_cpu_has_avx512()) return NULL;
        return __builtin_cpu_supports("avx512vnni") ? &bb_ops_avx512_vnni : &bb_ops_avx512;
#endif
    default: return NULL;
    }
}

/* Select the kernel family; returns the active one, or -1 if `kernel` is not usable here. */
int bb_set_kernel(int kernel) {
    if (kernel == BB_KERNEL_AUTO)
        kernel = bb_cpu_has_avx512() ? BB_KERNEL_AVX512 : bb_cpu_has_avx2() ? BB_KERNEL_AVX2 : BB_KERNEL_PORTABLE;
    const bb_ops *ops = family_ops(kernel);
    if (!ops) return -1;
    atomic_store_explicit(&g_ops, ops, memory_order_relaxed);
    return ops->family;
}

const bb_ops *bb_ops_active(void) {
    const bb_ops *ops = atomic_load_explicit(&g_ops, memory_order_relaxed);
    if (ops) return ops;
    bb_set_kernel(BB_KERNEL_AUTO);
    return atomic_load_explicit(&g_ops, memory_order_relaxed);
}

int bb_get_kernel(void) { return bb_ops_active()->family; }

/* ------------------------------------------------------------------------------------ */
/* threads                                                                               */

#define BB_MAX_THREADS 1024

static int g_threads = 1;

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

/* ------------------------------------------------------------------------------------ */
/* thread pool                                                                           */

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
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0, 0, 0, NULL, NULL, 0, 0, -1};

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
    uint64_t j = atomic_load_explicit(&pool.job, memory_order_acquire);
    for (;;) {
        if (job_gen(j) != gen) return;
        uint64_t next = j & BB_MAX_CHUNKS, total = (j >> BB_CHUNK_BITS) & BB_MAX_CHUNKS;
        if (next >= total) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.job, &j, j + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        /* a claimed chunk keeps the job alive (the caller waits for it): its fields are stable */
        int64_t lo = (int64_t)next * pool.grain, hi = lo + pool.grain < pool.n ? lo + pool.grain : pool.n;
        pool.body(pool.ctx, lo, hi, tid);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        j = atomic_load_explicit(&pool.job, memory_order_acquire);
    }
}

/* A worker woken from sleep is often placed on the waker's CPU (the scheduler's wake-affine
 * choice); then it and the caller share one core until the load balancer separates them,
 * milliseconds later, and the forward runs at one-thread speed. A woken worker that finds
 * itself on the caller's CPU moves off it at once: its affinity is narrowed to the other
 * allowed CPUs, then restored (the thread stays where it went). Linux only. */
static void leave_caller_cpu(void) {
#if defined(__linux__) && defined(CPU_ISSET)
    int caller = atomic_load_explicit(&pool.caller_cpu, memory_order_relaxed);
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
    uint32_t seen = job_gen(atomic_load(&pool.job));
    tl_in_job = 1;
    for (;;) {
        int spins = 0;
        int64_t until = -1;
        uint64_t j;
        while (job_gen(j = atomic_load_explicit(&pool.job, memory_order_acquire)) == seen) {
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
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleepers, 1);
            while (job_gen(atomic_load(&pool.job)) == seen && !pool.stop) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleepers, 1);
            int stop = pool.stop;
            pthread_mutex_unlock(&pool.mu);
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
    if (!pool.nworkers) return;
    pthread_mutex_lock(&pool.mu);
    pool.stop = 1;
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 0; i < pool.nworkers; i++) pthread_join(pool.threads[i], NULL);
    free(pool.threads);
    pool.threads = NULL;
    pool.nworkers = 0;
    pool.stop = 0;
}

/* after fork() only the calling thread exists: forget the parent's workers */
static void pool_after_fork(void) {
    pool.threads = NULL;
    pool.nworkers = 0;
    pool.stop = 0;
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
}

/* g_threads - 1 workers; returns the team size actually available */
static int pool_ensure(void) {
    static int fork_hook;
    if (!fork_hook) {
        pthread_atfork(NULL, NULL, pool_after_fork);
        fork_hook = 1;
    }
    if (pool.nworkers == g_threads - 1) return g_threads;
    pool_stop();
    int want = g_threads - 1;
    pool.threads = (pthread_t *)calloc((size_t)want, sizeof(pthread_t));
    if (!pool.threads) return 1;
    for (int i = 0; i < want; i++) {
        if (pthread_create(&pool.threads[i], NULL, worker_main, (void *)(intptr_t)(i + 1))) break;
        pool.nworkers++;
    }
    return pool.nworkers + 1;
}

int bb_team(void) { return tl_in_job ? 1 : g_threads; }

void bb_parallel_for(int64_t n, int64_t grain, bb_body body, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (n / grain > BB_MAX_CHUNKS) grain = (n + BB_MAX_CHUNKS - 1) / BB_MAX_CHUNKS;
    int64_t nchunks = (n + grain - 1) / grain;
    if (bb_team() == 1 || nchunks == 1 || pool_ensure() == 1) {
        int nested = tl_in_job;
        tl_in_job = 1;
        body(ctx, 0, n, 0);
        tl_in_job = nested;
        return;
    }
    pool.body = body;
    pool.ctx = ctx;
    pool.n = n;
    pool.grain = grain;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    g_gen = (g_gen + 1) & 0xFFFFFF;
    /* seq_cst: pairs with sleepers */
    atomic_store(&pool.job, (uint64_t)g_gen << 40 | (uint64_t)nchunks << BB_CHUNK_BITS);
    if (atomic_load(&pool.sleepers) > 0) {
#if defined(__linux__)
        atomic_store_explicit(&pool.caller_cpu, sched_getcpu(), memory_order_relaxed);
#endif
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    tl_in_job = 1;
    run_chunks((uint32_t)g_gen, 0);
    tl_in_job = 0;
    /* wait for the chunks other threads hold; yield so a descheduled holder can finish */
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks; spins++) {
        if (spins < 1000)
            cpu_relax();
        else
            sched_yield();
    }
}

/* ------------------------------------------------------------------------------------ */
/* step times (a profiling build only: bb_internal.h, BB_STEP_TIMES)                      */

#ifdef BB_STEP_TIMES
static _Atomic int64_t g_step_ns[BB_STEPS];

int64_t bb_step_clock(void) { return mono_ns(); }

void bb_step_add(int step, int64_t *since) {
    int64_t now = mono_ns();
    atomic_fetch_add_explicit(&g_step_ns[step], now - *since, memory_order_relaxed);
    *since = now;
}

/* The nanoseconds spent in each step since the last call (BB_STEP_* order) into out[n] (n up to
 * BB_STEPS), then zero; returns BB_STEPS. Exported by the profiling build only. */
__attribute__((visibility("default"))) int bb_step_times(int64_t *out, int n) {
    for (int s = 0; s < BB_STEPS; s++) {
        int64_t v = atomic_exchange_explicit(&g_step_ns[s], 0, memory_order_relaxed);
        if (out && s < n) out[s] = v;
    }
    return BB_STEPS;
}
#endif
