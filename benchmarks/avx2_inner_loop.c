/*
 * The one-token AVX2 inner loop of the CPU sparse kernels (issue 16), in variants, on one thread: where do
 * its cycles go on this CPU? A study run by hand, not the product kernel (src/llmprune/csrc/sparse_cpu.c).
 *
 *   gcc -O3 -std=gnu11 -o /tmp/inner_loop benchmarks/avx2_inner_loop.c
 *   /tmp/inner_loop ROWS COLS DENSITY REPEATS      e.g. 128 1024 0.5 3 (L2-resident), 4096 4096 0.3 1
 *
 * Prints ns per 8 inputs ("chunk") for each variant, the minimum over 300 alternated rounds (short rounds,
 * so that the minimum is a round no other process interrupted), and checks the correct variants against
 * the reference one. Variants, each on the kernels' layout (kept values row by row + one bit per weight):
 *   permute     the product loop: vpermps by a 256-entry index table, vblendvps zeroes the clear lanes
 *   in-lane     a bound, wrong results: one vpshufb within 128-bit lanes (no lane crossing)
 *   no-expand   a bound, wrong results: the packed values multiplied as they are
 *   broadcast2  correct without lane crossing: two 128-bit broadcasts, two vpshufb, one or
 *   four-chains the row in 4 segments, each advancing its pointer by popcount (no prefix sums)
 *   count-only  permute with the running count below, nothing else changed
 *   running     the product loop since 2026-12-02: permute as above with a byte-wide table, each mask byte
 *               read from memory and the value pointer advanced by its popcount (no prefix sums), blend
 *               as one vblendvps
 *   running, no blend / no expansion   bounds, wrong results: the product loop without its zeroing, and
 *               without its expansion (what the running count, the loads and the FMA cost alone)
 *   compress    the other way round: the kept inputs packed into a row buffer (a permute and a store per
 *               mask byte, no blend, no FMA), then one dense dot of the row's values with the buffer
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define AVX2 __attribute__((target("avx2,fma,popcnt")))
#define MAX_COLS 65536

static int32_t PERMUTE[256][8];   /* lane -> index of its value, INT32_MIN where the bit is clear */
static int8_t PERMUTE8[256][8];   /* the same as bytes, INT8_MIN where the bit is clear */
static int8_t COMPRESS8[256][8];  /* k -> lane of the k-th set bit of m (0 beyond the count) */
static int8_t IN_LANE[256][32];   /* vpshufb bytes within each 128-bit lane (-1: zero) */
static int8_t BROADCAST2[256][64];/* two vpshufb tables: lanes from values 0..3, and from values 4..7 */

static void build_tables(void) {
    for (int m = 0; m < 256; m++) {
        int k = 0, lo = 0, hi = 0;
        for (int lane = 0; lane < 8; lane++) {
            const int set = (m >> lane) & 1;
            int *half = lane < 4 ? &lo : &hi;
            PERMUTE[m][lane] = set ? k : INT32_MIN;
            PERMUTE8[m][lane] = set ? (int8_t)k : INT8_MIN;
            if (set) COMPRESS8[m][k] = (int8_t)lane;
            for (int b = 0; b < 4; b++) {
                IN_LANE[m][4 * lane + b] = set ? (int8_t)(4 * *half + b) : -1;
                BROADCAST2[m][4 * lane + b] = set && k < 4 ? (int8_t)(4 * k + b) : -1;
                BROADCAST2[m][32 + 4 * lane + b] = set && k >= 4 ? (int8_t)(4 * (k - 4) + b) : -1;
            }
            *half += set;
            k += set;
        }
    }
}

static inline uint64_t byte_prefix_counts(uint64_t w) {
    uint64_t c = w - ((w >> 1) & 0x5555555555555555ULL);
    c = (c & 0x3333333333333333ULL) + ((c >> 2) & 0x3333333333333333ULL);
    c = (c + (c >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (c * 0x0101010101010101ULL) << 8;
}

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

enum { PERMUTE_V, IN_LANE_V, NO_EXPAND_V, BROADCAST2_V, PERMUTE8_V, NO_BLEND_V };

AVX2 static inline __m256 expand(const float *p, unsigned m, int variant) {
    if (variant == PERMUTE8_V || variant == NO_BLEND_V) { /* the product's: byte table, one vblendvps */
        const __m256i index = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)PERMUTE8[m]));
        const __m256 placed = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), index);
        if (variant == NO_BLEND_V) return placed; /* without its zeroing: a bound, wrong results */
        __m256 weights;
        __asm__("vblendvps %3, %2, %1, %0" : "=x"(weights) : "x"(placed), "x"(_mm256_setzero_ps()),
                "x"(_mm256_castsi256_ps(index)));
        return weights;
    }
    if (variant == PERMUTE_V) {
        const __m256i index = _mm256_loadu_si256((const __m256i *)PERMUTE[m]);
        return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(p), index), _mm256_setzero_ps(),
                                _mm256_castsi256_ps(index));
    }
    if (variant == IN_LANE_V)
        return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_castps_si256(_mm256_loadu_ps(p)),
                                                       _mm256_loadu_si256((const __m256i *)IN_LANE[m])));
    if (variant == NO_EXPAND_V) return _mm256_loadu_ps(p);
    const __m256i low = _mm256_castps_si256(_mm256_broadcast_ps((const __m128 *)p));
    const __m256i high = _mm256_castps_si256(_mm256_broadcast_ps((const __m128 *)(p + 4)));
    return _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_shuffle_epi8(low, _mm256_loadu_si256((const __m256i *)BROADCAST2[m])),
                        _mm256_shuffle_epi8(high, _mm256_loadu_si256((const __m256i *)(BROADCAST2[m] + 32)))));
}

typedef struct {
    const float *values, *x;
    const uint64_t *mask;
    const int64_t *offsets;
    float *y;
    int64_t rows, words;
} Case;

/* The product's structure: per 64-bit mask word, byte prefix counts give each chunk's first value. */
#define DEFINE_PREFIX_LOOP(NAME, VARIANT)                                                                  \
    AVX2 static void NAME(const Case *c) {                                                                 \
        for (int64_t r = 0; r < c->rows; r++) {                                                            \
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
            int64_t k = c->offsets[r];                                                                     \
            const uint64_t *mask = c->mask + r * c->words;                                                 \
            for (int64_t word = 0; word < c->words; word++) {                                              \
                const uint64_t w = mask[word], before = byte_prefix_counts(w);                             \
                _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++) {                                      \
                    const __m256 weights = expand(c->values + k + ((before >> (8 * b)) & 0xff),            \
                                                  (unsigned)(w >> (8 * b)) & 0xff, VARIANT);               \
                    acc[b % 4] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(c->x + 64 * word + 8 * b), acc[b % 4]); \
                }                                                                                          \
                k += __builtin_popcountll(w);                                                              \
            }                                                                                              \
            c->y[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));    \
        }                                                                                                  \
    }

DEFINE_PREFIX_LOOP(loop_permute, PERMUTE_V)
DEFINE_PREFIX_LOOP(loop_in_lane, IN_LANE_V)
DEFINE_PREFIX_LOOP(loop_no_expand, NO_EXPAND_V)
DEFINE_PREFIX_LOOP(loop_broadcast2, BROADCAST2_V)

/* Four segments of a row, each pointer advanced by popcount of its mask byte. */
AVX2 static void loop_four_chains(const Case *c) {
    const int64_t seg = c->words / 4, bytes = 8 * seg;
    for (int64_t r = 0; r < c->rows; r++) {
        const uint64_t *mask = c->mask + r * c->words;
        const uint8_t *m = (const uint8_t *)mask;
        int64_t count[3] = {0, 0, 0};
        for (int64_t i = 0; i < seg; i++)
            for (int s = 0; s < 3; s++) count[s] += __builtin_popcountll(mask[s * seg + i]);
        const float *p[4];
        p[0] = c->values + c->offsets[r];
        for (int s = 1; s < 4; s++) p[s] = p[s - 1] + count[s - 1];
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t i = 0; i < bytes; i++) {
            _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++) {
                const unsigned b = m[s * bytes + i];
                acc[s] = _mm256_fmadd_ps(expand(p[s], b, PERMUTE_V), _mm256_loadu_ps(c->x + 8 * (s * bytes + i)), acc[s]);
                p[s] += __builtin_popcount(b);
            }
        }
        for (int64_t i = 4 * bytes; i < 8 * c->words; i++) { /* words beyond 4 whole segments */
            acc[3] = _mm256_fmadd_ps(expand(p[3], m[i], PERMUTE_V), _mm256_loadu_ps(c->x + 8 * i), acc[3]);
            p[3] += __builtin_popcount(m[i]);
        }
        c->y[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    }
}

/* A running count through the row instead of prefix sums: one popcount per mask byte. */
#define DEFINE_RUNNING_LOOP(NAME, VARIANT)                                                                 \
    AVX2 static void NAME(const Case *c) {                                                                 \
        for (int64_t r = 0; r < c->rows; r++) {                                                            \
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
            const float *p = c->values + c->offsets[r];                                                    \
            const uint8_t *m = (const uint8_t *)(c->mask + r * c->words);                                  \
            for (int64_t word = 0; word < c->words; word++) {                                              \
                _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++) {                                      \
                    const unsigned byte = m[8 * word + b];                                                 \
                    acc[b % 4] = _mm256_fmadd_ps(expand(p, byte, VARIANT), _mm256_loadu_ps(c->x + 64 * word + 8 * b), \
                                                 acc[b % 4]);                                              \
                    p += __builtin_popcount(byte);                                                         \
                }                                                                                          \
            }                                                                                              \
            c->y[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));    \
        }                                                                                                  \
    }

DEFINE_RUNNING_LOOP(loop_count_only, PERMUTE_V)  /* permute with the running count, nothing else changed */
DEFINE_RUNNING_LOOP(loop_running, PERMUTE8_V)    /* the product's loop */
DEFINE_RUNNING_LOOP(loop_running_no_blend, NO_BLEND_V)
DEFINE_RUNNING_LOOP(loop_running_no_expand, NO_EXPAND_V)

/* Inputs compressed to the kept positions, then a dense dot: no blend and no FMA per mask byte, but a
 * store, and the values read once more densely. */
AVX2 static void loop_compress(const Case *c) {
    static float packed[MAX_COLS + 16] __attribute__((aligned(32)));
    for (int64_t r = 0; r < c->rows; r++) {
        const float *values = c->values + c->offsets[r];
        const uint8_t *m = (const uint8_t *)(c->mask + r * c->words);
        int64_t count = 0;
        for (int64_t word = 0; word < c->words; word++) {
            _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++) {
                const unsigned byte = m[8 * word + b];
                const __m256i index = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)COMPRESS8[byte]));
                _mm256_storeu_ps(packed + count,
                                 _mm256_permutevar8x32_ps(_mm256_loadu_ps(c->x + 64 * word + 8 * b), index));
                count += __builtin_popcount(byte);
            }
        }
        _mm256_storeu_ps(packed + count, _mm256_setzero_ps()); /* the last partial vector's tail */
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t k = 0;
        for (; k + 32 <= count; k += 32)
            for (int u = 0; u < 4; u++)
                acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(values + k + 8 * u), _mm256_load_ps(packed + k + 8 * u), acc[u]);
        for (; k < count; k += 8) /* values past the row's are the next row's (or padding), times zero */
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(values + k), _mm256_load_ps(packed + k), acc[0]);
        c->y[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s ROWS COLS DENSITY REPEATS (COLS a multiple of 64, at most 65536)\n", argv[0]);
        return 2;
    }
    const int64_t rows = atoll(argv[1]), cols = atoll(argv[2]), repeats = atoll(argv[4]);
    const double density = atof(argv[3]);
    if (rows < 1 || cols < 64 || cols % 64 || cols > MAX_COLS || repeats < 1 || !(density > 0 && density <= 1)) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        fprintf(stderr, "this CPU has no AVX2 + FMA\n");
        return 1;
    }
    build_tables();
    const int64_t words = cols / 64;
    uint64_t *mask = calloc(rows * words, 8);
    int64_t *offsets = calloc(rows + 1, 8), nnz = 0;
    srand(1);
    for (int64_t r = 0; r < rows; r++) {
        offsets[r] = nnz;
        for (int64_t j = 0; j < cols; j++)
            if (rand() < density * RAND_MAX) { mask[r * words + j / 64] |= 1ULL << (j % 64); nnz++; }
    }
    offsets[rows] = nnz;
    float *values = calloc(nnz + 64, 4), *x = calloc(cols + 64, 4), *y = calloc(rows, 4), *want = calloc(rows, 4);
    for (int64_t i = 0; i < nnz; i++) values[i] = (float)rand() / RAND_MAX - 0.5f;
    for (int64_t j = 0; j < cols; j++) x[j] = (float)rand() / RAND_MAX - 0.5f;
    const Case c = {values, x, mask, offsets, y, rows, words};
    const struct {
        void (*loop)(const Case *);
        const char *name;
        int checked; /* 0 for bounds, whose results are wrong on purpose */
    } variants[] = {
        {loop_permute, "permute", 1},
        {loop_in_lane, "in-lane (bound)", 0},
        {loop_no_expand, "no-expand (bound)", 0},
        {loop_broadcast2, "broadcast2", 1},
        {loop_four_chains, "four-chains", 1},
        {loop_count_only, "count-only", 1},
        {loop_running, "running", 1},
        {loop_running_no_blend, "running, no blend (bound)", 0},
        {loop_running_no_expand, "running, no expand (bound)", 0},
        {loop_compress, "compress", 1},
    };
    enum { n = sizeof variants / sizeof *variants };
    double best[n];
    loop_permute(&c);
    for (int64_t r = 0; r < rows; r++) want[r] = y[r];
    for (int i = 0; i < n; i++) best[i] = 1e30;
    for (int round = 0; round < 300; round++)
        for (int i = 0; i < n; i++) {
            const double start = now();
            for (int64_t rep = 0; rep < repeats; rep++) variants[i].loop(&c);
            const double t = (now() - start) / repeats;
            if (t < best[i]) best[i] = t;
        }
    const double chunks = rows * cols / 8.0;
    for (int i = 0; i < n; i++) {
        variants[i].loop(&c);
        double worst = 0, scale = 0; /* largest difference, relative to the largest output */
        for (int64_t r = 0; r < rows; r++) {
            const double d = y[r] > want[r] ? y[r] - want[r] : want[r] - y[r];
            const double a = want[r] < 0 ? -want[r] : want[r];
            if (d > worst) worst = d;
            if (a > scale) scale = a;
        }
        worst /= scale > 0 ? scale : 1;
        printf("%-28s %.3f ns/chunk  %.2fx permute%s\n", variants[i].name, best[i] / chunks * 1e9, best[0] / best[i],
               variants[i].checked ? (worst < 1e-5 ? "  (matches)" : "  (MISMATCH)") : "");
    }
    return 0;
}
