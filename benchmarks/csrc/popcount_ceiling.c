/* The popcount ceiling of one core, for the benchmarks (benchmarks/roofline.py builds and loads
 * it): a register-only loop of XOR + popcount + add per kernel family of the packed engine, the
 * operation the binary Linear's inner loop repeats, with no memory traffic. Its binary MACs per
 * second are the most a kernel family can reach on this core.
 *
 *   avx512    XOR + VPOPCNTQ + ADD on 24 independent 512-bit accumulators
 *   avx2      XOR + nibble-table popcount (VPSHUFB, VPSADBW) + ADD on 8 256-bit accumulators,
 *             the AVX2 Linear's popcount
 *   portable  XOR + POPCNT + ADD on 8 independent 64-bit accumulators
 */
#include <stdint.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CEILING_X86 1
#else
#define CEILING_X86 0
#endif

enum { FAMILY_PORTABLE = 1, FAMILY_AVX512 = 2, FAMILY_AVX2 = 3 }; /* the engine's BB_KERNEL_* numbers */

#if CEILING_X86
__attribute__((target("avx512f,avx512vpopcntdq"))) static int64_t ceiling_avx512(int64_t iters) {
    __m512i acc[24], w[4];
    for (int i = 0; i < 24; i++) acc[i] = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++) w[i] = _mm512_set1_epi64(0x0123456789ABCDEFLL * (i + 1));
    for (int64_t it = 0; it < iters; it++) {
        __m512i av = _mm512_set1_epi64(it);
        for (int r = 0; r < 6; r++) {
            __m512i ar = _mm512_xor_si512(av, _mm512_set1_epi64(r));
            for (int c = 0; c < 4; c++)
                acc[4 * r + c] = _mm512_add_epi64(acc[4 * r + c], _mm512_popcnt_epi64(_mm512_xor_si512(ar, w[c])));
        }
    }
    __m512i s = _mm512_setzero_si512();
    for (int i = 0; i < 24; i++) s = _mm512_add_epi64(s, acc[i]);
    return _mm512_reduce_add_epi64(s);
}

static inline __attribute__((always_inline, target("avx2"))) __m256i popcnt256_epi64(__m256i v) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
    __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

__attribute__((target("avx2"))) static int64_t ceiling_avx2(int64_t iters) {
    __m256i acc[8], x = _mm256_setr_epi64x(1, 2, 3, 4);
    const __m256i step = _mm256_set1_epi64x((long long)0x9E3779B97F4A7C15ULL);
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t it = 0; it < iters; it++) {
        x = _mm256_add_epi64(x, step);
        for (int i = 0; i < 8; i++)
            acc[i] = _mm256_add_epi64(acc[i], popcnt256_epi64(_mm256_xor_si256(x, _mm256_set1_epi64x(i * 0x1234567LL))));
    }
    int64_t lanes[4], s = 0;
    for (int i = 0; i < 8; i++) {
        _mm256_storeu_si256((__m256i *)lanes, acc[i]);
        s += lanes[0] + lanes[1] + lanes[2] + lanes[3];
    }
    return s;
}
#endif

/* the operands vary with the iteration, so that nothing is hoisted out of the loop */
static inline __attribute__((always_inline)) int64_t ceiling_portable(int64_t iters) {
    uint64_t acc[8] = {0};
    for (int64_t it = 0; it < iters; it++) {
        uint64_t x = (uint64_t)it * 0x9E3779B97F4A7C15ULL;
        for (int i = 0; i < 8; i++) acc[i] += (uint64_t)__builtin_popcountll(x ^ (0xD6E8FEB86659FD93ULL * (i + 1)));
    }
    int64_t s = 0;
    for (int i = 0; i < 8; i++) s += (int64_t)acc[i];
    return s;
}

#if CEILING_X86
__attribute__((target("popcnt"))) static int64_t ceiling_portable_popcnt(int64_t iters) {
    return ceiling_portable(iters);
}
#endif

static int64_t ceiling_portable_generic(int64_t iters) { return ceiling_portable(iters); }

/* Runs `iters` iterations of one family's loop (FAMILY_*; the caller makes sure this CPU has it)
 * on the calling thread, the sum of its accumulators into *checksum (so that the loop is not
 * removed); returns the binary MACs done (the caller times the call), or -1 for a negative or
 * huge count, an unknown family or no checksum. */
int64_t popcount_ceiling(int family, int64_t iters, int64_t *checksum);

int64_t popcount_ceiling(int family, int64_t iters, int64_t *checksum) {
    if (iters < 0 || iters > ((int64_t)1 << 31) || !checksum) return -1;
#if CEILING_X86
    if (family == FAMILY_AVX512) {
        *checksum = ceiling_avx512(iters);
        return iters * 24 * 512;
    }
    if (family == FAMILY_AVX2) {
        *checksum = ceiling_avx2(iters);
        return iters * 8 * 256;
    }
    if (family == FAMILY_PORTABLE) {
        __builtin_cpu_init();
        *checksum = __builtin_cpu_supports("popcnt") ? ceiling_portable_popcnt(iters) : ceiling_portable_generic(iters);
        return iters * 8 * 64;
    }
#else
    if (family == FAMILY_PORTABLE) {
        *checksum = ceiling_portable_generic(iters);
        return iters * 8 * 64;
    }
#endif
    return -1;
}
