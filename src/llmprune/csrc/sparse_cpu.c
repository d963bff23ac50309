/*
 * llmprune._sparse_cpu: sparse linear kernels for CPUs, on raw pointers (no PyTorch headers).
 *
 * A [rows, cols] weight is its kept values row by row (float32 or bfloat16, followed by zero padding),
 * a bitmask (row r at mask + r * row_bytes, bit j of a row at byte j / 8, bit j % 8; row_bytes a multiple
 * of 8, bits past cols zero) and int64 offsets[rows + 1] (where each row's values start). See
 * src/llmprune/inference/cpu_kernels.py for the Python side.
 *
 *   matmul:   y[t, r] = sum_j W[r, j] x[t, j]   (float32 accumulation, y float32 [tokens, rows])
 *   to_dense: the dense [rows, cols] matrix in the values' dtype
 *   matmul_many: matmul for many tokens (prefill), from inputs packed in blocks of tokens
 *   matmul_panels: matmul of bfloat16 weights and inputs on AMX tiles, or with AVX-512 BF16's vdpbf16ps,
 *                  where the CPU and OS allow them
 *
 * One code path per instruction set (AVX-512 F + BW expand, AVX2 + FMA permute, portable C), chosen at run
 * time; threads over output rows, on the OpenMP team PyTorch already runs (found among the loaded
 * libraries, not linked) or else a small pthread pool of our own.
 * The caller pads each input row to row_bytes * 8 readable floats, so vector loads never leave x.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LLMPRUNE_X86 1
#include <immintrin.h>
#endif

/* The bfloat16 panel kernels (AMX tiles, AVX-512 BF16) need GCC 11 / Clang 13 intrinsics; AMX tiles also
 * the kernel's permission (arch_prctl, Linux). */
#if defined(LLMPRUNE_X86) && defined(__x86_64__) && !defined(LLMPRUNE_EMULATE_AVX512) && \
    ((defined(__clang__) && __clang_major__ >= 13) || (!defined(__clang__) && __GNUC__ >= 11))
#define LLMPRUNE_BF16_PANELS 1
#include <stdlib.h>
#if defined(__linux__)
#define LLMPRUNE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#if !defined(_WIN32)
#define LLMPRUNE_THREADS 1
#include <dlfcn.h>
#include <pthread.h>
#endif

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };
enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char *ISA_NAMES[] = {"portable", "avx2", "avx512"};

typedef struct {
    const void *values;
    const uint8_t *mask;
    const int64_t *offsets;
    const float *x;
    int64_t x_stride;
    float *y;
    void *dense;
    int64_t rows, cols, tokens, row_bytes;
    int dtype;
    uint8_t *mask_out;  /* compress: the mask and per-row counts written from `dense`, then the values */
    int64_t *counts_out;
    void *values_out;
    int64_t block;  /* matmul_many: tokens per packed block of inputs */
    int64_t tail;   /* matmul_many: tokens of the narrower last block, 0 if none (the caller's choice) */
    const uint16_t *tiles_x; /* matmul_panels: the bfloat16 inputs packed in pairs (see pack_pairs) */
    int *failed;             /* matmul_panels: set by a thread that could not allocate its panel */
} Job;

typedef void (*RowsFn)(const Job *job, int64_t begin, int64_t end);

/* ---------------------------------------------------------------- portable ---------------------------- */

/* Bits 64 * i .. 64 * i + 63 of a mask row as one little-endian word. */
static inline uint64_t load_word(const uint8_t *p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t w;
    memcpy(&w, p, sizeof w);
    return w;
#else
    uint64_t w = 0;
    for (int i = 7; i >= 0; i--) w = (w << 8) | p[i];
    return w;
#endif
}

static inline int ctz64(uint64_t w) {
#if defined(__GNUC__)
    return __builtin_ctzll(w);
#else
    int n = 0;
    while (!(w & 1)) { w >>= 1; n++; }
    return n;
#endif
}

static inline int popcount64(uint64_t w) {
#if defined(__GNUC__)
    return __builtin_popcountll(w);
#else
    int n = 0;
    while (w) { w &= w - 1; n++; }
    return n;
#endif
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Value k as float32 (a constant dtype folds the branch away). */
static inline float scalar_at(const void *values, int64_t k, int dtype) {
    if (dtype == DTYPE_F32) return ((const float *)values)[k];
    return bf16_to_float(((const uint16_t *)values)[k]);
}

static inline float value_at(const Job *job, int64_t k) { return scalar_at(job->values, k, job->dtype); }

#define TOKEN_BLOCK 8

/* Software prefetch, once per mask word. Streaming a weight from memory, the row loops left the memory
 * bus idle part of the time with the hardware prefetcher alone; asking for the values PREFETCH_BYTES ahead
 * of where a word reads (PREFETCH_LINES cache lines: one word's values up to 75 % float32 density) and for
 * the mask as far ahead in weights keeps it busier (docs/benchmarks.md, where the distance was chosen
 * among 1-4 KiB). A prefetch never faults, also past the end of an array. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 3072
#endif
#ifndef PREFETCH_LINES
#define PREFETCH_LINES 3
#endif
#define VALUE_BYTES(DT) ((DT) == DTYPE_F32 ? 4 : 2)

static inline void prefetch_lines_ahead(const void *values_at, const uint8_t *mask_at, int lines) {
#if defined(__GNUC__)
    /* Addresses as integers: they may lie past the arrays, where pointer arithmetic is undefined. */
    const uintptr_t ahead = (uintptr_t)values_at + PREFETCH_BYTES;
    for (int line = 0; line < lines; line++) __builtin_prefetch((const void *)(ahead + 64 * line));
    __builtin_prefetch((const void *)((uintptr_t)mask_at + PREFETCH_BYTES / 8));
#else
    (void)values_at;
    (void)mask_at;
#endif
}

static inline void prefetch_ahead(const void *values_at, const uint8_t *mask_at) {
    prefetch_lines_ahead(values_at, mask_at, PREFETCH_LINES);
}

/* The one-token AVX-512 kernel, bound by memory, asks for its values once more, PREFETCH_FAR_BYTES ahead
 * and into L2 only (prefetcht2; Intel cores treat it as prefetcht1): on the Xeon it was measured on, the
 * L1 prefetch alone left the bus idle part of the time (docs/benchmarks.md). The kernels for more tokens,
 * bound by instructions, did not gain from it. */
#ifndef PREFETCH_FAR_BYTES
#define PREFETCH_FAR_BYTES 8192
#endif

static inline void prefetch_far(const void *values_at, int lines) {
#if defined(__GNUC__)
    const uintptr_t ahead = (uintptr_t)values_at + PREFETCH_FAR_BYTES;
    for (int line = 0; line < lines; line++) __builtin_prefetch((const void *)(ahead + 64 * line), 0, 1);
#else
    (void)values_at;
    (void)lines;
#endif
}

static void matmul_portable(const Job *job, int64_t begin, int64_t end) {
    const int64_t words = job->row_bytes / 8;
    for (int64_t r = begin; r < end; r++) {
        const uint8_t *mask = job->mask + r * job->row_bytes;
        for (int64_t t0 = 0; t0 < job->tokens; t0 += TOKEN_BLOCK) {
            const int64_t tb = job->tokens - t0 < TOKEN_BLOCK ? job->tokens - t0 : TOKEN_BLOCK;
            float acc[TOKEN_BLOCK] = {0};
            int64_t k = job->offsets[r];
            for (int64_t word = 0; word < words; word++) {
                uint64_t w = load_word(mask + 8 * word);
                prefetch_ahead((const char *)job->values + k * VALUE_BYTES(job->dtype), mask + 8 * word);
                while (w) {
                    const int64_t j = 64 * word + ctz64(w);
                    const float v = value_at(job, k++);
                    for (int64_t t = 0; t < tb; t++) acc[t] += v * job->x[(t0 + t) * job->x_stride + j];
                    w &= w - 1;
                }
            }
            for (int64_t t = 0; t < tb; t++) job->y[(t0 + t) * job->rows + r] = acc[t];
        }
    }
}

static void dense_portable(const Job *job, int64_t begin, int64_t end) {
    const int64_t words = job->row_bytes / 8;
    const size_t item = job->dtype == DTYPE_F32 ? 4 : 2;
    for (int64_t r = begin; r < end; r++) {
        const uint8_t *mask = job->mask + r * job->row_bytes;
        char *row = (char *)job->dense + (size_t)(r * job->cols) * item;
        const char *values = (const char *)job->values + (size_t)job->offsets[r] * item;
        memset(row, 0, (size_t)job->cols * item);
        for (int64_t word = 0; word < words; word++) {
            uint64_t w = load_word(mask + 8 * word);
            prefetch_ahead(values, mask + 8 * word);
            while (w) {
                memcpy(row + (size_t)(64 * word + ctz64(w)) * item, values, item);
                values += item;
                w &= w - 1;
            }
        }
    }
}

/* Many tokens (matmul_many): the caller packs the inputs in blocks of MANY_TOKENS tokens, the last one
 * job->tail wide if it says so (MANY_SHORT_TAIL or MANY_LONG_TAIL, holding all the tokens left: a prompt's
 * tail then costs a narrower block, not a wide one's padding), float32 [blocks][row_bytes * 8][block
 * tokens] (column j of a block holds input j of its tokens side by side; tokens past the last and inputs
 * past cols are zero), so that each kept weight W[r, j] multiplies one contiguous column into row r's sums
 * for the block: an outer product per kept weight, whose work is the kept weights' alone where a dense
 * matmul's is every weight's. The rows go in panels of MANY_PANEL_ROWS, whose sums stay in L1 while every
 * row of the panel reads the block's inputs for one mask word (16 KiB at 64 tokens). */
#define MANY_TOKENS 64
#define MANY_SHORT_TAIL 32
#define MANY_LONG_TAIL 48
#define MANY_PANEL_ROWS 32

/* The sums of a panel of rows (job->block floats each) for one block of tokens, into y (tokens past
 * job->tokens dropped). */
static void store_many(const Job *job, const float *sums, int64_t r0, int64_t n, int64_t t0) {
    const int64_t block = job->block, tokens = job->tokens - t0 < block ? job->tokens - t0 : block;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t i = 0; i < n; i++) job->y[(t0 + t) * job->rows + r0 + i] = sums[i * block + t];
}

/* Rows begin .. end of matmul_many: the wide blocks through `wide`, the narrower last one (job->tail)
 * through `short_tail` or `long_tail`, each given a job of its own tokens (job->block set). */
static void many_parts(const Job *job, int64_t begin, int64_t end, RowsFn wide, RowsFn short_tail,
                       RowsFn long_tail) {
    const int64_t tail = job->tail, rest = job->tokens % MANY_TOKENS;
    const int64_t wide_tokens = tail ? job->tokens - rest : job->tokens;
    Job part = *job;
    part.tokens = wide_tokens;
    part.block = MANY_TOKENS;
    if (wide_tokens) wide(&part, begin, end);
    if (!tail) return;
    part.x = job->x + wide_tokens * 8 * job->row_bytes;
    part.y = job->y + wide_tokens * job->rows;
    part.tokens = rest;
    part.block = tail;
    (tail == MANY_SHORT_TAIL ? short_tail : long_tail)(&part, begin, end);
}

static void many_portable_blocks(const Job *job, int64_t begin, int64_t end) {
    const int64_t words = job->row_bytes / 8, block = job->block, stride = 8 * job->row_bytes * block;
    float sums[MANY_PANEL_ROWS * MANY_TOKENS];
    for (int64_t t0 = 0; t0 < job->tokens; t0 += block) {
        const float *x = job->x + t0 / block * stride;
        for (int64_t r0 = begin; r0 < end; r0 += MANY_PANEL_ROWS) {
            const int64_t n = end - r0 < MANY_PANEL_ROWS ? end - r0 : MANY_PANEL_ROWS;
            for (int64_t i = 0; i < n; i++) {
                int64_t k = job->offsets[r0 + i];
                float *row = sums + i * block;
                memset(row, 0, (size_t)block * sizeof *row);
                for (int64_t word = 0; word < words; word++) {
                    uint64_t w = load_word(job->mask + (r0 + i) * job->row_bytes + 8 * word);
                    while (w) {
                        const float v = value_at(job, k++), *column = x + (64 * word + ctz64(w)) * block;
                        for (int64_t t = 0; t < block; t++) row[t] += v * column[t];
                        w &= w - 1;
                    }
                }
            }
            store_many(job, sums, r0, n, t0);
        }
    }
}

static void many_portable(const Job *job, int64_t begin, int64_t end) {
    many_parts(job, begin, end, many_portable_blocks, many_portable_blocks, many_portable_blocks);
}

/* The bitmask and the per-row non-zero counts of a dense matrix (zero: +0.0 or -0.0). */
static void mask_rows(const Job *job, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
        uint8_t *mask = job->mask_out + r * job->row_bytes;
        int64_t count = 0;
        memset(mask, 0, (size_t)job->row_bytes);
        if (job->dtype == DTYPE_F32) {
            const float *row = (const float *)job->dense + r * job->cols;
            for (int64_t j = 0; j < job->cols; j++) {
                const int set = row[j] != 0.0f;
                mask[j >> 3] |= (uint8_t)(set << (j & 7));
                count += set;
            }
        } else {
            const uint16_t *row = (const uint16_t *)job->dense + r * job->cols;
            for (int64_t j = 0; j < job->cols; j++) {
                const int set = (row[j] & 0x7fff) != 0;
                mask[j >> 3] |= (uint8_t)(set << (j & 7));
                count += set;
            }
        }
        job->counts_out[r] = count;
    }
}

/* The kept values of a dense matrix, row by row, where `mask_rows` marked them. */
static void gather_rows(const Job *job, int64_t begin, int64_t end) {
    const size_t item = job->dtype == DTYPE_F32 ? 4 : 2;
    for (int64_t r = begin; r < end; r++) {
        const char *row = (const char *)job->dense + (size_t)(r * job->cols) * item;
        char *out = (char *)job->values_out + (size_t)job->offsets[r] * item;
        const uint8_t *mask = job->mask + r * job->row_bytes;
        for (int64_t word = 0; word < job->row_bytes / 8; word++) {
            uint64_t w = load_word(mask + 8 * word);
            while (w) {
                memcpy(out, row + (size_t)(64 * word + ctz64(w)) * item, item);
                out += item;
                w &= w - 1;
            }
        }
    }
}

/* The end of a row past its last whole mask word (the vector paths store whole words only): zeros, then
 * the remaining kept values, from value k on. */
static void dense_row_tail(const Job *job, void *row, const uint8_t *mask, int64_t full, int64_t k) {
    const size_t item = VALUE_BYTES(job->dtype);
    char *end = (char *)row + (size_t)(64 * full) * item;
    memset(end, 0, (size_t)(job->cols - 64 * full) * item);
    uint64_t rest = full < job->row_bytes / 8 ? load_word(mask + 8 * full) : 0;
    while (rest) {
        memcpy(end + (size_t)ctz64(rest) * item, (const char *)job->values + (size_t)k++ * item, item);
        rest &= rest - 1;
    }
}

/* Many tokens (see many_portable), in vectors of LANES floats (ISA: the function attribute of an
 * instruction set, NAME its name in the functions'): one kept weight, broadcast, against its column of the
 * block in V = BLOCK / LANES vectors. The next word's block of inputs is prefetched into L1 meanwhile, an
 * equal share by each row of the panel. Groups of MANY_GROUP_ROWS rows (two panels, whose sums fill 16 KiB
 * of L1 at 64 tokens) walk the words in chunks of MANY_CHUNK_WORDS, both panels through one chunk before
 * the next, so that the second reads the chunk's inputs (MANY_CHUNK_WORDS x 16 KiB) from L2: each panel
 * through all the words on its own read the whole block of inputs from L3 again, and the widest weights
 * lost to dense (docs/benchmarks.md, where the group and chunk sizes were chosen). */
#define MANY_CHUNK_WORDS 32
#define MANY_GROUP_ROWS (2 * MANY_PANEL_ROWS)

#define DEFINE_MANY_BLOCKS(NAME, ISA, VEC, LANES, SET1, LOADU, FMADD, STOREU, DT, BLOCK_TOKENS, PART)       \
    ISA static void many_group_##NAME##_##DT##_##PART(const Job *job, int64_t begin, int64_t end,          \
                                                      float *sums, int64_t *k) {                            \
        enum { BLOCK = BLOCK_TOKENS, V = BLOCK / (LANES), SHARE = 64 * BLOCK * 4 / MANY_PANEL_ROWS };       \
        const int64_t words = job->row_bytes / 8, stride = 8 * job->row_bytes * BLOCK;                      \
        const int64_t rows = end - begin;                                                                   \
        for (int64_t t0 = 0; t0 < job->tokens; t0 += BLOCK) {                                               \
            const float *x = job->x + t0 / BLOCK * stride;                                                  \
            memset(sums, 0, (size_t)(rows * BLOCK) * sizeof *sums);                                         \
            for (int64_t i = 0; i < rows; i++) k[i] = job->offsets[begin + i];                              \
            for (int64_t w0 = 0; w0 < words; w0 += MANY_CHUNK_WORDS) {                                      \
                const int64_t w1 = words - w0 < MANY_CHUNK_WORDS ? words : w0 + MANY_CHUNK_WORDS;           \
                for (int64_t r0 = 0; r0 < rows; r0 += MANY_PANEL_ROWS) {                                    \
                    const int64_t r1 = rows - r0 < MANY_PANEL_ROWS ? rows : r0 + MANY_PANEL_ROWS;           \
                    for (int64_t word = w0; word < w1; word++) {                                            \
                        const float *inputs = x + 64 * word * BLOCK;                                        \
                        for (int64_t i = r0; i < r1; i++) {                                                 \
                            if (word + 1 < w1) {                                                            \
                                const char *next = (const char *)(inputs + 64 * BLOCK) + (i - r0) * SHARE;  \
                                for (int line = 0; line < SHARE; line += 64)                                \
                                    __builtin_prefetch(next + line);                                        \
                            }                                                                               \
                            uint64_t w = load_word(job->mask + (begin + i) * job->row_bytes + 8 * word);    \
                            if (!w) continue;                                                               \
                            int64_t kk = k[i];                                                              \
                            k[i] += popcount64(w);                                                          \
                            float *row = sums + i * BLOCK;                                                  \
                            VEC acc[V];                                                                     \
                            for (int c = 0; c < (V); c++) acc[c] = LOADU(row + (LANES) * c);                \
                            do {                                                                            \
                                const float *column = inputs + ctz64(w) * BLOCK;                            \
                                const VEC v = SET1(scalar_at(job->values, kk++, DT));                       \
                                for (int c = 0; c < (V); c++)                                               \
                                    acc[c] = FMADD(v, LOADU(column + (LANES) * c), acc[c]);                 \
                                w &= w - 1;                                                                 \
                            } while (w);                                                                    \
                            for (int c = 0; c < (V); c++) STOREU(row + (LANES) * c, acc[c]);                \
                        }                                                                                   \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            store_many(job, sums, begin, rows, t0);                                                         \
        }                                                                                                   \
    }                                                                                                       \
    ISA static void many_##NAME##_##DT##_##PART(const Job *job, int64_t begin, int64_t end) {               \
        float sums[MANY_GROUP_ROWS * (BLOCK_TOKENS)];                                                       \
        int64_t k[MANY_GROUP_ROWS];                                                                         \
        for (int64_t g0 = begin; g0 < end; g0 += MANY_GROUP_ROWS) {                                         \
            const int64_t g1 = end - g0 < MANY_GROUP_ROWS ? end : g0 + MANY_GROUP_ROWS;                     \
            many_group_##NAME##_##DT##_##PART(job, g0, g1, sums, k);                                        \
        }                                                                                                   \
    }

/* many_NAME: matmul_many's wide blocks and narrower last ones, float32 and bfloat16 values. */
#define DEFINE_MANY_DTYPE(NAME, ISA, VEC, LANES, SET1, LOADU, FMADD, STOREU, DT)                             \
    DEFINE_MANY_BLOCKS(NAME, ISA, VEC, LANES, SET1, LOADU, FMADD, STOREU, DT, MANY_TOKENS, wide)            \
    DEFINE_MANY_BLOCKS(NAME, ISA, VEC, LANES, SET1, LOADU, FMADD, STOREU, DT, MANY_SHORT_TAIL, short)       \
    DEFINE_MANY_BLOCKS(NAME, ISA, VEC, LANES, SET1, LOADU, FMADD, STOREU, DT, MANY_LONG_TAIL, long)
#define DEFINE_MANY(NAME, ISA, VEC, LANES, SET1, LOADU, FMADD, STOREU)                                      \
    DEFINE_MANY_DTYPE(NAME, ISA, VEC, LANES, SET1, LOADU, FMADD, STOREU, DTYPE_F32)                         \
    DEFINE_MANY_DTYPE(NAME, ISA, VEC, LANES, SET1, LOADU, FMADD, STOREU, DTYPE_BF16)                        \
    ISA static void many_##NAME(const Job *job, int64_t begin, int64_t end) {                               \
        if (job->dtype == DTYPE_F32)                                                                        \
            many_parts(job, begin, end, many_##NAME##_DTYPE_F32_wide, many_##NAME##_DTYPE_F32_short,        \
                       many_##NAME##_DTYPE_F32_long);                                                       \
        else                                                                                                \
            many_parts(job, begin, end, many_##NAME##_DTYPE_BF16_wide, many_##NAME##_DTYPE_BF16_short,      \
                       many_##NAME##_DTYPE_BF16_long);                                                      \
    }

/* ---------------------------------------------------------------- AVX2 + FMA -------------------------- */
#ifdef LLMPRUNE_X86

/* PERMUTE[m]: for the 8 inputs of one mask byte m, which of the next popcount(m) values each lane takes;
 * negative for lanes whose bit is clear (vpermps reads only the low 3 bits, vblendvps the sign). Bytes,
 * sign-extended on load: a quarter of the L1 cache lines of int32 entries, next to the row's inputs. */
static int8_t PERMUTE[256][8];
/* SHUFFLE16[m]: the same for bfloat16 values, as vpshufb byte indices into 8 values (16 bytes, in both
 * 128-bit halves): lane j gets its value's two bytes as the high half of a float32 (bfloat16 is the top
 * 16 bits of a float32), the low half and clear lanes zero (index -1). One shuffle expands and widens. */
static int8_t SHUFFLE16[256][32];

static void build_tables(void) {
    for (int m = 0; m < 256; m++) {
        int k = 0;
        for (int lane = 0; lane < 8; lane++) {
            const int set = (m >> lane) & 1;
            PERMUTE[m][lane] = set ? (int8_t)k : INT8_MIN;
            SHUFFLE16[m][4 * lane] = SHUFFLE16[m][4 * lane + 1] = -1;
            SHUFFLE16[m][4 * lane + 2] = set ? (int8_t)(2 * k) : -1;
            SHUFFLE16[m][4 * lane + 3] = set ? (int8_t)(2 * k + 1) : -1;
            k += set;
        }
    }
}


#define AVX2 __attribute__((target("avx2,fma,popcnt")))

/* The 8 weights of mask byte m as a dense vector (zeros where the bit is clear). */
AVX2 static inline __m256 expand8_avx2(const void *values, int64_t k, unsigned m, int dtype) {
    if (dtype == DTYPE_BF16) {
        const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)values + k));
        const __m256i shuffle = _mm256_loadu_si256((const __m256i *)SHUFFLE16[m]);
        return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(half), shuffle));
    }
    const __m256i index = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)PERMUTE[m]));
    const __m256 placed = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)values + k), index);
    /* Clear lanes to zero by the index's sign: one vblendvps. Written out because GCC turns the intrinsic
     * with a zero operand into a compare and an and-not, one more instruction in the hottest loop. */
    __m256 weights;
    __asm__("vblendvps %3, %2, %1, %0" : "=x"(weights) : "x"(placed), "x"(_mm256_setzero_ps()),
            "x"(_mm256_castsi256_ps(index)));
    return weights;
}

AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row against TB tokens; A accumulators per token so that the FMA chains overlap. */
#define DEFINE_ROW_AVX2(TB, A, DT)                                                                          \
    AVX2 static void row_avx2_##TB##_##DT(const Job *job, int64_t r, int64_t t0) {                          \
        __m256 acc[TB][A];                                                                                  \
        for (int t = 0; t < TB; t++)                                                                        \
            for (int a = 0; a < A; a++) acc[t][a] = _mm256_setzero_ps();                                    \
        const uint8_t *mask = job->mask + r * job->row_bytes;                                               \
        const float *x = job->x + t0 * job->x_stride;                                                       \
        const void *values = job->values;                                                                   \
        int64_t k = job->offsets[r];                                                                        \
        const int64_t words = job->row_bytes / 8;                                                           \
        for (int64_t word = 0; word < words; word++) {                                                      \
            const uint64_t w = load_word(mask + 8 * word);                                                  \
            prefetch_ahead((const char *)values + k * VALUE_BYTES(DT), mask + 8 * word);                    \
            if (!w) continue;                                                                               \
            /* Where each byte's values start: a running count, a popcount per byte read from memory.     \
             * Fewer instructions than unpacking prefix counts from the word, and the loop is bound by      \
             * instructions; the one-add chain through k is not what limits it. */                          \
            _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++) {                                           \
                const unsigned m = mask[8 * word + b];                                                      \
                const __m256 weights = expand8_avx2(values, k, m, DT);                                      \
                k += popcount64(m);                                                                         \
                const int64_t j = 64 * word + 8 * b;                                                        \
                for (int t = 0; t < TB; t++)                                                                \
                    acc[t][b % A] =                                                                         \
                        _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + t * job->x_stride + j), acc[t][b % A]);\
            }                                                                                               \
        }                                                                                                   \
        for (int t = 0; t < TB; t++) {                                                                      \
            __m256 total = acc[t][0];                                                                       \
            for (int a = 1; a < A; a++) total = _mm256_add_ps(total, acc[t][a]);                            \
            job->y[(t0 + t) * job->rows + r] = hsum_avx2(total);                                            \
        }                                                                                                   \
    }

DEFINE_ROW_AVX2(1, 4, DTYPE_F32)
DEFINE_ROW_AVX2(2, 2, DTYPE_F32)
DEFINE_ROW_AVX2(4, 1, DTYPE_F32)
DEFINE_ROW_AVX2(8, 1, DTYPE_F32)
DEFINE_ROW_AVX2(1, 4, DTYPE_BF16)
DEFINE_ROW_AVX2(2, 2, DTYPE_BF16)
DEFINE_ROW_AVX2(4, 1, DTYPE_BF16)
DEFINE_ROW_AVX2(8, 1, DTYPE_BF16)

/* Rows first .. end - 1, each in blocks of 8, 4, 2 and 1 tokens (the kernels of ISA for values DT). */
#define TOKEN_BLOCKS(ISA, DT, FIRST)                                                                        \
    for (int64_t r = FIRST; r < end; r++) {                                                                 \
        int64_t t = 0;                                                                                      \
        for (; t + 8 <= job->tokens; t += 8) row_##ISA##_8_##DT(job, r, t);                                 \
        if (t + 4 <= job->tokens) { row_##ISA##_4_##DT(job, r, t); t += 4; }                                \
        if (t + 2 <= job->tokens) { row_##ISA##_2_##DT(job, r, t); t += 2; }                                \
        if (t < job->tokens) row_##ISA##_1_##DT(job, r, t);                                                 \
    }

AVX2 static void matmul_avx2(const Job *job, int64_t begin, int64_t end) {
    if (job->dtype == DTYPE_F32) {
        TOKEN_BLOCKS(avx2, DTYPE_F32, begin)
    } else {
        TOKEN_BLOCKS(avx2, DTYPE_BF16, begin)
    }
}

AVX2 static void dense_avx2(const Job *job, int64_t begin, int64_t end) {
    if (job->dtype != DTYPE_F32) { dense_portable(job, begin, end); return; }
    const int64_t full = job->cols / 64;  /* whole words inside the row: vector stores */
    for (int64_t r = begin; r < end; r++) {
        const uint8_t *mask = job->mask + r * job->row_bytes;
        float *row = (float *)job->dense + r * job->cols;
        int64_t k = job->offsets[r];
        for (int64_t word = 0; word < full; word++) {
            prefetch_ahead((const float *)job->values + k, mask + 8 * word);
            for (int b = 0; b < 8; b++) {
                const unsigned m = mask[8 * word + b];
                _mm256_storeu_ps(row + 64 * word + 8 * b, expand8_avx2(job->values, k, m, DTYPE_F32));
                k += popcount64(m);
            }
        }
        dense_row_tail(job, row, mask, full, k);
    }
}

DEFINE_MANY(avx2, AVX2, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_storeu_ps)

/* ---------------------------------------------------------------- AVX-512 F + BW ----------------------- */

#ifdef LLMPRUNE_EMULATE_AVX512
/* A test build only: the intrinsics below as plain C, so that this path's logic runs on any x86 CPU. */
#include "avx512_emulated.h"
#define AVX512
#else
/* BW for its 64-bit mask registers: the compiler then shifts each mask word's 16-bit chunks within them
 * (kshiftrq) instead of in general registers with a kmovw each, which ran the one-token loop 4-10 % faster
 * on AMD Zen 4 (docs/benchmarks.md). Every AVX-512 CPU but the Xeon Phi has BW. */
#define AVX512 __attribute__((target("avx512f,avx512bw,popcnt")))
#endif

AVX512 static inline __m512 load16_avx512(const void *values, int64_t k, int dtype) {
    if (dtype == DTYPE_F32) return _mm512_loadu_ps((const float *)values + k);
    const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)values + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* The 16 weights of mask bits m. For float32 GCC folds the load into vexpandps's memory form, which ran
 * as fast as the register form on the AMD Zen 4 where the two were compared (docs/benchmarks.md). */
AVX512 static inline __m512 expand16_avx512(const void *values, int64_t k, unsigned m, int dtype) {
    return _mm512_maskz_expand_ps((__mmask16)m, load16_avx512(values, k, dtype));
}

/* The 16 weights of bits 16 c .. 16 c + 15 of mask word w, whose values start at value k. */
AVX512 static inline __m512 chunk16_avx512(const void *values, int64_t k, uint64_t w, int c, int dtype) {
    const uint64_t below = c ? (w & ((1ULL << (16 * c)) - 1)) : 0;
    return expand16_avx512(values, k + popcount64(below), (unsigned)(w >> (16 * c)) & 0xffff, dtype);
}

#define DEFINE_ROW_AVX512(TB, A, DT)                                                                        \
    AVX512 static void row_avx512_##TB##_##DT(const Job *job, int64_t r, int64_t t0) {                      \
        __m512 acc[TB][A];                                                                                  \
        for (int t = 0; t < TB; t++)                                                                        \
            for (int a = 0; a < A; a++) acc[t][a] = _mm512_setzero_ps();                                    \
        const uint8_t *mask = job->mask + r * job->row_bytes;                                               \
        const float *x = job->x + t0 * job->x_stride;                                                       \
        const void *values = job->values;                                                                   \
        int64_t k = job->offsets[r];                                                                        \
        const int64_t words = job->row_bytes / 8;                                                           \
        for (int64_t word = 0; word < words; word++) {                                                      \
            const uint64_t w = load_word(mask + 8 * word);                                                  \
            prefetch_ahead((const char *)values + k * VALUE_BYTES(DT), mask + 8 * word);                    \
            if (!w) continue;                                                                               \
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {                                           \
                const __m512 weights = chunk16_avx512(values, k, w, c, DT);                                 \
                const int64_t j = 64 * word + 16 * c;                                                       \
                for (int t = 0; t < TB; t++)                                                                \
                    acc[t][c % A] =                                                                         \
                        _mm512_fmadd_ps(weights, _mm512_loadu_ps(x + t * job->x_stride + j), acc[t][c % A]);\
            }                                                                                               \
            k += popcount64(w);                                                                             \
        }                                                                                                   \
        for (int t = 0; t < TB; t++) {                                                                      \
            __m512 total = acc[t][0];                                                                       \
            for (int a = 1; a < A; a++) total = _mm512_add_ps(total, acc[t][a]);                            \
            job->y[(t0 + t) * job->rows + r] = _mm512_reduce_add_ps(total);                                 \
        }                                                                                                   \
    }

DEFINE_ROW_AVX512(1, 4, DTYPE_F32)
DEFINE_ROW_AVX512(2, 2, DTYPE_F32)
DEFINE_ROW_AVX512(4, 1, DTYPE_F32)
DEFINE_ROW_AVX512(8, 1, DTYPE_F32)
DEFINE_ROW_AVX512(1, 4, DTYPE_BF16)
DEFINE_ROW_AVX512(2, 2, DTYPE_BF16)
DEFINE_ROW_AVX512(4, 1, DTYPE_BF16)
DEFINE_ROW_AVX512(8, 1, DTYPE_BF16)

/* One token against ROW_STREAMS rows at once, rows r, r + stride, r + 2 * stride, ...: that many value
 * streams from distant parts of the weight keep more of memory's bandwidth busy than one row after the
 * other, and each input vector is loaded once for all of them. Per mask word and stream the loop asks
 * for NEAR lines into L1 and FAR lines far ahead into L2: 2 and 3 where a word's values fill about two
 * cache lines or more, 1 and 2 for sparser rows (below LEAN_PREFETCH_BYTES of values per word), where
 * the loop is bound by its instructions and the prefetches of lines already asked for only cost
 * (measured on AMD Zen 4: 70 % float32 4-7 % faster, 50 % slower with the lean ones; docs/benchmarks.md). */
#define ROW_STREAMS 6
#define LEAN_PREFETCH_BYTES 96.0

#define DEFINE_STREAMS_AVX512(DT, NEAR, FAR, SUFFIX)                                                      \
    AVX512 static void streams_avx512_##DT##SUFFIX(const Job *job, int64_t r, int64_t stride) {            \
        __m512 acc[ROW_STREAMS][2];                                                                         \
        const uint8_t *mask[ROW_STREAMS];                                                                   \
        int64_t k[ROW_STREAMS];                                                                             \
        const void *values = job->values;                                                                   \
        _Pragma("GCC unroll 8") for (int s = 0; s < ROW_STREAMS; s++) {                                     \
            acc[s][0] = acc[s][1] = _mm512_setzero_ps();                                                    \
            mask[s] = job->mask + (r + s * stride) * job->row_bytes;                                        \
            k[s] = job->offsets[r + s * stride];                                                            \
        }                                                                                                   \
        const int64_t words = job->row_bytes / 8;                                                           \
        for (int64_t word = 0; word < words; word++) {                                                      \
            uint64_t w[ROW_STREAMS];                                                                        \
            _Pragma("GCC unroll 8") for (int s = 0; s < ROW_STREAMS; s++) {                                 \
                w[s] = load_word(mask[s] + 8 * word);                                                       \
                prefetch_lines_ahead((const char *)values + k[s] * VALUE_BYTES(DT), mask[s] + 8 * word,     \
                                     NEAR);                                                                 \
                prefetch_far((const char *)values + k[s] * VALUE_BYTES(DT), FAR);                           \
            }                                                                                               \
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {                                           \
                const __m512 x = _mm512_loadu_ps(job->x + 64 * word + 16 * c);                              \
                _Pragma("GCC unroll 8") for (int s = 0; s < ROW_STREAMS; s++) {                             \
                    const __m512 weights = chunk16_avx512(values, k[s], w[s], c, DT);                       \
                    acc[s][c % 2] = _mm512_fmadd_ps(weights, x, acc[s][c % 2]);                             \
                }                                                                                           \
            }                                                                                               \
            _Pragma("GCC unroll 8") for (int s = 0; s < ROW_STREAMS; s++) k[s] += popcount64(w[s]);         \
        }                                                                                                   \
        _Pragma("GCC unroll 8") for (int s = 0; s < ROW_STREAMS; s++)                                       \
            job->y[r + s * stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[s][0], acc[s][1]));             \
    }

DEFINE_STREAMS_AVX512(DTYPE_F32, 2, 3, _full)
DEFINE_STREAMS_AVX512(DTYPE_BF16, 2, 3, _full)
DEFINE_STREAMS_AVX512(DTYPE_F32, 1, 2, _lean)
DEFINE_STREAMS_AVX512(DTYPE_BF16, 1, 2, _lean)

/* More than one token: TILE_ROWS neighbouring rows against TB tokens at once, a register tile of
 * TILE_ROWS x TB accumulators. Each input vector loaded serves TILE_ROWS rows and each expanded weight
 * vector TB tokens: one row against 16 tokens loaded an input vector, from L2 once the inputs outgrow L1,
 * for every multiply-add and ran far below the FMA units' rate (docs/benchmarks.md). */
#define TILE_ROWS 4

#define DEFINE_TILE_AVX512(TB, DT)                                                                          \
    AVX512 static void tile_avx512_##TB##_##DT(const Job *job, int64_t r, int64_t t0) {                     \
        __m512 acc[TILE_ROWS][TB];                                                                          \
        const uint8_t *mask[TILE_ROWS];                                                                     \
        int64_t k[TILE_ROWS];                                                                               \
        _Pragma("GCC unroll 4") for (int s = 0; s < TILE_ROWS; s++) {                                       \
            for (int t = 0; t < TB; t++) acc[s][t] = _mm512_setzero_ps();                                   \
            mask[s] = job->mask + (r + s) * job->row_bytes;                                                 \
            k[s] = job->offsets[r + s];                                                                     \
        }                                                                                                   \
        const float *x = job->x + t0 * job->x_stride;                                                       \
        const void *values = job->values;                                                                   \
        const int64_t words = job->row_bytes / 8;                                                           \
        for (int64_t word = 0; word < words; word++) {                                                      \
            uint64_t w[TILE_ROWS];                                                                          \
            _Pragma("GCC unroll 4") for (int s = 0; s < TILE_ROWS; s++) {                                   \
                w[s] = load_word(mask[s] + 8 * word);                                                       \
                prefetch_ahead((const char *)values + k[s] * VALUE_BYTES(DT), mask[s] + 8 * word);          \
            }                                                                                               \
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {                                           \
                __m512 weights[TILE_ROWS];                                                                  \
                _Pragma("GCC unroll 4") for (int s = 0; s < TILE_ROWS; s++)                                 \
                    weights[s] = chunk16_avx512(values, k[s], w[s], c, DT);                                 \
                const int64_t j = 64 * word + 16 * c;                                                       \
                _Pragma("GCC unroll 4") for (int t = 0; t < TB; t++) {                                      \
                    const __m512 input = _mm512_loadu_ps(x + t * job->x_stride + j);                        \
                    _Pragma("GCC unroll 4") for (int s = 0; s < TILE_ROWS; s++)                             \
                        acc[s][t] = _mm512_fmadd_ps(weights[s], input, acc[s][t]);                          \
                }                                                                                           \
            }                                                                                               \
            _Pragma("GCC unroll 4") for (int s = 0; s < TILE_ROWS; s++) k[s] += popcount64(w[s]);           \
        }                                                                                                   \
        _Pragma("GCC unroll 4") for (int s = 0; s < TILE_ROWS; s++)                                         \
            for (int t = 0; t < TB; t++) job->y[(t0 + t) * job->rows + r + s] = _mm512_reduce_add_ps(acc[s][t]); \
    }

DEFINE_TILE_AVX512(4, DTYPE_F32)
DEFINE_TILE_AVX512(2, DTYPE_F32)
DEFINE_TILE_AVX512(1, DTYPE_F32)
DEFINE_TILE_AVX512(4, DTYPE_BF16)
DEFINE_TILE_AVX512(2, DTYPE_BF16)
DEFINE_TILE_AVX512(1, DTYPE_BF16)

/* Rows begin .. end - 1 against two or more tokens: groups of TILE_ROWS rows in tiles of 4, 2 and 1
 * tokens, then the rows left over one by one. */
#define TILES(DT)                                                                                           \
    {                                                                                                       \
        int64_t tiled = begin;                                                                              \
        for (; tiled + TILE_ROWS <= end; tiled += TILE_ROWS) {                                              \
            int64_t t = 0;                                                                                  \
            for (; t + 4 <= job->tokens; t += 4) tile_avx512_4_##DT(job, tiled, t);                         \
            if (t + 2 <= job->tokens) { tile_avx512_2_##DT(job, tiled, t); t += 2; }                        \
            if (t < job->tokens) tile_avx512_1_##DT(job, tiled, t);                                         \
        }                                                                                                   \
        TOKEN_BLOCKS(avx512, DT, tiled)                                                                     \
    }

/* Rows begin .. end - 1 against one token: ROW_STREAMS equal blocks walked side by side (with the lean
 * prefetches where these rows' values average under LEAN_PREFETCH_BYTES per mask word), then the rows
 * left over one by one. */
#define ONE_TOKEN_STREAMS(DT)                                                                               \
    {                                                                                                       \
        const int64_t stride = (end - begin) / ROW_STREAMS;                                                 \
        const double kept = (double)(job->offsets[end] - job->offsets[begin]);                              \
        const double word_bytes = kept * VALUE_BYTES(DT) * 64 / ((double)(end - begin) * job->cols);        \
        if (word_bytes < LEAN_PREFETCH_BYTES)                                                               \
            for (int64_t r = begin; r < begin + stride; r++) streams_avx512_##DT##_lean(job, r, stride);    \
        else                                                                                                \
            for (int64_t r = begin; r < begin + stride; r++) streams_avx512_##DT##_full(job, r, stride);    \
        for (int64_t r = begin + ROW_STREAMS * stride; r < end; r++) row_avx512_1_##DT(job, r, 0);          \
    }

AVX512 static void matmul_avx512(const Job *job, int64_t begin, int64_t end) {
    if (job->tokens == 1) {
        if (job->dtype == DTYPE_F32) ONE_TOKEN_STREAMS(DTYPE_F32) else ONE_TOKEN_STREAMS(DTYPE_BF16)
        return;
    }
    if (job->dtype == DTYPE_F32) TILES(DTYPE_F32) else TILES(DTYPE_BF16)
}

DEFINE_MANY(avx512, AVX512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_storeu_ps)

/* 16 expanded weights into a dense row: float32 as they are, bfloat16 (the top half of each float32)
 * narrowed back with vpmovdw. */
AVX512 static inline void store16_avx512(void *row, int64_t j, __m512 weights, int dtype) {
    if (dtype == DTYPE_F32) {
        _mm512_storeu_ps((float *)row + j, weights);
        return;
    }
    const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(weights), 16);
    _mm256_storeu_si256((__m256i *)((uint16_t *)row + j), _mm512_cvtepi32_epi16(bits));
}

AVX512 static void dense_avx512(const Job *job, int64_t begin, int64_t end) {
    const int64_t full = job->cols / 64;
    const size_t item = VALUE_BYTES(job->dtype);
    for (int64_t r = begin; r < end; r++) {
        const uint8_t *mask = job->mask + r * job->row_bytes;
        char *row = (char *)job->dense + (size_t)(r * job->cols) * item;
        int64_t k = job->offsets[r];
        for (int64_t word = 0; word < full; word++) {
            const uint64_t w = load_word(mask + 8 * word);
            prefetch_ahead((const char *)job->values + (size_t)k * item, mask + 8 * word);
            for (int c = 0; c < 4; c++) {
                const __m512 weights = chunk16_avx512(job->values, k, w, c, job->dtype);
                store16_avx512(row, 64 * word + 16 * c, weights, job->dtype);
            }
            k += popcount64(w);
        }
        dense_row_tail(job, row, mask, full, k);
    }
}
#endif /* LLMPRUNE_X86 */

/* ---------------------------------------------------------------- bfloat16 panels -------------------- */

#ifdef LLMPRUNE_BF16_PANELS
/* bfloat16 weights against bfloat16 inputs for 5 to a few hundred tokens, on the CPU's bfloat16 dot products:
 * Intel's AMX tiles or AVX-512 BF16's vdpbf16ps. The dense matmul on them is bound by their arithmetic
 * from a few tokens on, which reads every weight; here each panel of BF16_PANEL_ROWS rows (32 for wide
 * weights) is expanded once from its kept values (vpexpandw, 32 weights a mask word half) into tile order
 * in a per-thread buffer that stays in L2, then multiplied against every token, so memory carries the
 * compressed weight only. Inputs: pack_pairs. */
#define PANELS __attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt")))
#define BF16_PANEL_ROWS 64
#define BF16_PANEL_BYTES (512 << 10) /* wide weights expand 32 rows at a time: the panel and inputs share L2 */

static void cpuid(unsigned leaf, unsigned sub, unsigned regs[4]) {
    __asm__ volatile("cpuid" : "=a"(regs[0]), "=b"(regs[1]), "=c"(regs[2]), "=d"(regs[3]) : "a"(leaf), "c"(sub));
}

/* AVX-512 F, BW and VBMI2 (the expansion) in CPUID and their register state enabled by the OS; regs7 gets
 * leaf 7 (subleaf 0) for the caller's own checks. */
static int panels_cpu(unsigned regs7[4]) {
    unsigned r[4];
    cpuid(0, 0, r);
    if (r[0] < 7) return 0;
    cpuid(1, 0, r);
    if (!(r[2] >> 27 & 1)) return 0; /* OSXSAVE: xgetbv may run */
    cpuid(7, 0, regs7);
    if (!((regs7[1] >> 16 & 1) && (regs7[1] >> 30 & 1) && (regs7[2] >> 6 & 1))) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 0xe6) == 0xe6;
}

/* Tile order of inputs (what TDPBF16PS and vdpbf16ps read): for token tile i (16 tokens) and chunk c (32 inputs), 1 KiB at (i * chunks + c) *
 * 512: pair p (inputs 32 c + 2 p, + 1) of token t at [p][t][2] (the VNNI layout TDPBF16PS reads). Tokens
 * past `tokens` and inputs past `cols` are zero. */
static void pack_pairs(const uint16_t *x, int64_t stride, int64_t tokens, int64_t cols, uint16_t *out) {
    const int64_t chunks = (cols + 31) / 32, tiles = (tokens + 15) / 16;
    for (int64_t i = 0; i < tiles; i++)
        for (int64_t c = 0; c < chunks; c++) {
            uint32_t *tile = (uint32_t *)(out + (i * chunks + c) * 512);
            const int full = 32 * c + 32 <= cols;
            for (int64_t t = 0; t < 16; t++) {
                const int64_t token = 16 * i + t;
                const uint16_t *row = x + token * stride + 32 * c;
                for (int64_t p = 0; p < 16; p++) {
                    uint32_t pair = 0;
                    if (token < tokens && full) {
                        memcpy(&pair, row + 2 * p, 4);
                    } else if (token < tokens) {
                        const int64_t j = 32 * c + 2 * p;
                        pair = (j < cols ? row[2 * p] : 0) | (uint32_t)(j + 1 < cols ? row[2 * p + 1] : 0) << 16;
                    }
                    tile[p * 16 + t] = pair;
                }
            }
        }
}

/* A growing per-thread buffer for one expanded panel (threads of the pool or of torch's team live on). */
static _Thread_local uint16_t *bf16_panel;
static _Thread_local size_t bf16_panel_bytes;

/* Rows expanded at a time for a weight of this many 32-input chunks: BF16_PANEL_ROWS, or 32 for wide ones. */
static int64_t bf16_panel_rows(int64_t chunks) {
    return chunks * 64 * BF16_PANEL_ROWS > BF16_PANEL_BYTES ? 32 : BF16_PANEL_ROWS;
}

/* This thread's panel buffer for a weight of this many chunks, or NULL with the job's failed flag set (the
 * call then raises MemoryError rather than leave rows unwritten). */
static uint16_t *bf16_panel_for(const Job *job, int64_t chunks) {
    const size_t bytes = (size_t)bf16_panel_rows(chunks) * chunks * 64;
    if (bytes > bf16_panel_bytes) {
        free(bf16_panel);
        bf16_panel = aligned_alloc(64, bytes);
        bf16_panel_bytes = bf16_panel ? bytes : 0;
    }
    if (!bf16_panel) *job->failed = 1;
    return bf16_panel;
}

/* Rows r0 .. r0 + n of the weight in tile order, 16 rows a tile, rows past n zero: the 32 weights of
 * chunk c of row 16 a + b at ((a * chunks + c) * 16 + b) * 32. */
PANELS static void expand_panel(const Job *job, int64_t r0, int64_t n, int64_t padded, uint16_t *panel) {
    const int64_t chunks = (job->cols + 31) / 32;
    const uint16_t *values = job->values;
    for (int64_t i = 0; i < padded; i++) {
        uint16_t *out = panel + ((i / 16) * chunks * 16 + i % 16) * 32;
        if (i >= n) {
            for (int64_t c = 0; c < chunks; c++) memset(out + c * 512, 0, 64);
            continue;
        }
        const uint16_t *v = values + job->offsets[r0 + i];
        const uint8_t *mask = job->mask + (r0 + i) * job->row_bytes;
        for (int64_t c = 0; c < chunks; c += 2) {
            const uint64_t w = load_word(mask + 4 * c);
            prefetch_ahead(v, mask + 4 * c); /* the weight streams from memory: as the one-token kernel */
            prefetch_far(v, PREFETCH_LINES);
            _mm512_storeu_si512(out + c * 512, _mm512_maskz_expandloadu_epi16((uint32_t)w, v));
            v += popcount64(w & 0xffffffffu);
            if (c + 1 < chunks) _mm512_storeu_si512(out + (c + 1) * 512, _mm512_maskz_expandloadu_epi16(w >> 32, v));
            v += popcount64(w >> 32);
        }
    }
}

/* One 16 x 16 tile of sums (rows r, tokens t) into y [tokens, rows], clipped to the real rows and tokens. */
static void store_sums(const Job *job, const float *sums, int64_t r, int64_t end, int64_t t) {
    for (int64_t a = 0; a < 16 && r + a < end; a++)
        for (int64_t b = 0; b < 16 && t + b < job->tokens; b++) job->y[(t + b) * job->rows + r + a] = sums[16 * a + b];
}

#ifdef LLMPRUNE_AMX
/* On AMX tiles (TDPBF16PS: a 16 x 32 tile of weights times a 32 x 16 tile of inputs into a 16 x 16 tile of
 * float32 sums), 2 x 2 tiles of sums (32 rows x 32 tokens) a step. */
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vbmi2,popcnt")))
#define AMX_ARCH_REQ_XCOMP_PERM 0x1023
#define AMX_XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int amx_state = -1; /* -1 not asked yet, 0 unusable, 1 usable */

/* AMX-BF16 and AMX-TILE in CPUID, the tile state enabled by the OS (XCR0 bits 17-18), and this process
 * allowed to use it (Linux asks each process to request the tile data state once). */
static int amx_usable(void) {
    if (amx_state >= 0) return amx_state;
    unsigned r[4];
    int ok = panels_cpu(r) && (r[3] >> 22 & 1) && (r[3] >> 24 & 1); /* AMX-BF16, AMX-TILE */
    if (ok) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        (void)hi;
        ok = (lo & 0x60000) == 0x60000; /* the tile state */
    }
    if (ok) ok = syscall(SYS_arch_prctl, AMX_ARCH_REQ_XCOMP_PERM, AMX_XFEATURE_XTILEDATA) == 0;
    amx_state = ok;
    return ok;
}

AMX static void matmul_amx_rows(const Job *job, int64_t begin, int64_t end) {
    const int64_t chunks = (job->cols + 31) / 32, tiles = (job->tokens + 15) / 16;
    const int64_t panel_rows = bf16_panel_rows(chunks);
    uint16_t *panel = bf16_panel_for(job, chunks);
    if (!panel) return;
    TileConfig saved, config = {1, 0, {0}, {0}, {0}};
    _tile_storeconfig(&saved); /* oneDNN may keep its own configuration on this thread */
    for (int i = 0; i < 8; i++) {
        config.colsb[i] = 64;
        config.rows[i] = 16;
    }
    _tile_loadconfig(&config);
    float sums[4][256];
    for (int64_t r0 = begin; r0 < end; r0 += panel_rows) {
        const int64_t n = end - r0 < panel_rows ? end - r0 : panel_rows, padded = (n + 31) / 32 * 32;
        expand_panel(job, r0, n, padded, panel);
        for (int64_t a = 0; a < padded; a += 32) {
            const uint16_t *w0 = panel + a * chunks * 32, *w1 = w0 + chunks * 512;
            for (int64_t i = 0; i < tiles; i += 2) {
                const int two = i + 1 < tiles;
                const uint16_t *x0 = job->tiles_x + i * chunks * 512, *x1 = x0 + chunks * 512;
                _tile_zero(4);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                for (int64_t c = 0; c < chunks; c++) {
                    _tile_loadd(0, w0 + c * 512, 64);
                    _tile_loadd(2, x0 + c * 512, 64);
                    _tile_loadd(1, w1 + c * 512, 64);
                    _tile_dpbf16ps(4, 0, 2);
                    _tile_dpbf16ps(5, 1, 2);
                    if (two) {
                        _tile_loadd(3, x1 + c * 512, 64);
                        _tile_dpbf16ps(6, 0, 3);
                        _tile_dpbf16ps(7, 1, 3);
                    }
                }
                _tile_stored(4, sums[0], 64);
                _tile_stored(5, sums[1], 64);
                store_sums(job, sums[0], r0 + a, end, 16 * i);
                store_sums(job, sums[1], r0 + a + 16, end, 16 * i);
                if (two) {
                    _tile_stored(6, sums[2], 64);
                    _tile_stored(7, sums[3], 64);
                    store_sums(job, sums[2], r0 + a, end, 16 * i + 16);
                    store_sums(job, sums[3], r0 + a + 16, end, 16 * i + 16);
                }
            }
        }
    }
    if (saved.palette)
        _tile_loadconfig(&saved);
    else
        _tile_release();
}
#endif /* LLMPRUNE_AMX */

/* With AVX-512 BF16 (vdpbf16ps: 16 float32 sums, each plus the products of two bfloat16 pairs): one row's
 * pair of weights broadcast against a pair of inputs for 16 tokens (a tile row of pack_pairs), the 16 rows
 * of a panel tile against one token tile a step (16 accumulators), token tiles in the outer loop so that
 * each is read from memory once per panel. */
#define DPBF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,popcnt")))

static int dpbf16_state = -1; /* -1 not asked yet, 0 unusable, 1 usable */

static int dpbf16_usable(void) {
    if (dpbf16_state >= 0) return dpbf16_state;
    unsigned r7[4], r[4];
    int ok = panels_cpu(r7) && (r7[1] >> 31 & 1); /* and AVX-512 VL (the half tiles) */
    if (ok) {
        cpuid(7, 1, r);
        ok = r[0] >> 5 & 1; /* AVX512_BF16 */
    }
    dpbf16_state = ok;
    return ok;
}

/* Rows of panel tile w (16 rows x chunks x 32 weights) against token tile x: sums[16 * row + token]. VEC,
 * LOADU, DP, STOREU: 512-bit vectors for the tile's 16 tokens, or 256-bit ones for its first 8 (the first
 * half of each tile row of pack_pairs), where no more are left: half the work for a last tile of 1-8. */
DPBF16 static inline __m256i loadu_256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

#define DEFINE_DPBF16_TILE(NAME, VEC, HALF, SETZERO, LOADU, SET1, DP, STOREU)                                 \
    DPBF16 static void NAME(const uint16_t *w, const uint16_t *x, int64_t chunks, float *sums) {            \
        VEC acc[16];                                                                                        \
        _Pragma("GCC unroll 16") for (int r = 0; r < 16; r++) acc[r] = SETZERO();                          \
        for (int64_t c = 0; c < chunks; c++) {                                                              \
            const uint16_t *wc = w + c * 512, *xc = x + c * 512;                                            \
            _Pragma("GCC unroll 16") for (int p = 0; p < 16; p++) {                                         \
                const HALF inputs = (HALF)LOADU((const void *)(xc + p * 32));                               \
                _Pragma("GCC unroll 16") for (int r = 0; r < 16; r++) {                                     \
                    uint32_t pair;                                                                          \
                    memcpy(&pair, wc + r * 32 + 2 * p, 4);                                                  \
                    acc[r] = DP(acc[r], (HALF)SET1((int)pair), inputs);                                     \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        _Pragma("GCC unroll 16") for (int r = 0; r < 16; r++) STOREU(sums + 16 * r, acc[r]);               \
    }

DEFINE_DPBF16_TILE(dpbf16_tile, __m512, __m512bh, _mm512_setzero_ps, _mm512_loadu_si512, _mm512_set1_epi32,
                   _mm512_dpbf16_ps, _mm512_storeu_ps)
DEFINE_DPBF16_TILE(dpbf16_half_tile, __m256, __m256bh, _mm256_setzero_ps, loadu_256,
                   _mm256_set1_epi32, _mm256_dpbf16_ps, _mm256_storeu_ps)

DPBF16 static void matmul_dpbf16_rows(const Job *job, int64_t begin, int64_t end) {
    const int64_t chunks = (job->cols + 31) / 32, tiles = (job->tokens + 15) / 16;
    const int64_t panel_rows = bf16_panel_rows(chunks);
    uint16_t *panel = bf16_panel_for(job, chunks);
    if (!panel) return;
    float sums[256];
    for (int64_t r0 = begin; r0 < end; r0 += panel_rows) {
        const int64_t n = end - r0 < panel_rows ? end - r0 : panel_rows, padded = (n + 15) / 16 * 16;
        expand_panel(job, r0, n, padded, panel);
        for (int64_t i = 0; i < tiles; i++)
            for (int64_t a = 0; a < padded; a += 16) {
                const uint16_t *w = panel + a * chunks * 32, *x = job->tiles_x + i * chunks * 512;
                if (16 * i + 8 >= job->tokens)
                    dpbf16_half_tile(w, x, chunks, sums);
                else
                    dpbf16_tile(w, x, chunks, sums);
                store_sums(job, sums, r0 + a, end, 16 * i);
            }
    }
}
#endif /* LLMPRUNE_BF16_PANELS */

/* ---------------------------------------------------------------- dispatch ---------------------------- */

static int selected = ISA_PORTABLE;

static int isa_supported(int isa) {
    if (isa == ISA_PORTABLE) return 1;
#ifdef LLMPRUNE_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
#ifdef LLMPRUNE_EMULATE_AVX512
    if (isa == ISA_AVX512) return 1;
#endif
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("popcnt");
#endif
    return 0;
}

static RowsFn matmul_fn(void) {
#ifdef LLMPRUNE_X86
    if (selected == ISA_AVX512) return matmul_avx512;
    if (selected == ISA_AVX2) return matmul_avx2;
#endif
    return matmul_portable;
}

/* The portable kernel for many tokens serves the Python side's checks, not speed. */
static RowsFn many_fn(void) {
#ifdef LLMPRUNE_X86
    if (selected == ISA_AVX512) return many_avx512;
    if (selected == ISA_AVX2) return many_avx2;
#endif
    return many_portable;
}

static RowsFn dense_fn(void) {
#ifdef LLMPRUNE_X86
    if (selected == ISA_AVX512) return dense_avx512;
    if (selected == ISA_AVX2) return dense_avx2;
#endif
    return dense_portable;
}

/* ---------------------------------------------------------------- threads ----------------------------- */

#define MAX_THREADS 256

enum { THREADS_POOL = 0, THREADS_OPENMP = 1 };
static const char *THREADS_NAMES[] = {"pool", "openmp"};
static int threads_selected = THREADS_POOL; /* where run_rows sends the rows (see below) */

#ifdef LLMPRUNE_THREADS
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one parallel call at a time */
static int pool_size = 0;          /* worker threads started (the caller is one more) */
static uint64_t generation = 0;    /* bumped for each parallel call */
static int remaining = 0;          /* parts of the current call not finished */
static RowsFn task_fn;
static const Job *task_job;
static int task_parts;

static void run_part(RowsFn fn, const Job *job, int part, int parts) {
    const int64_t begin = job->rows * part / parts, end = job->rows * (part + 1) / parts;
    if (begin < end) fn(job, begin, end);
}

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg; /* 1.. : part 0 is the caller's */
    uint64_t seen = 0;
    pthread_mutex_lock(&pool_lock);
    for (;;) {
        while (generation == seen) pthread_cond_wait(&pool_wake, &pool_lock);
        seen = generation;
        if (index >= task_parts) continue;
        RowsFn fn = task_fn;
        const Job *job = task_job;
        const int parts = task_parts;
        pthread_mutex_unlock(&pool_lock);
        run_part(fn, job, index, parts);
        pthread_mutex_lock(&pool_lock);
        if (--remaining == 0) pthread_cond_signal(&pool_done);
    }
    return NULL;
}

static int grow_pool(int workers) {
    while (pool_size < workers) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, worker, (void *)(intptr_t)(pool_size + 1));
        pthread_attr_destroy(&attr);
        if (failed) return pool_size;
        pool_size++;
    }
    return workers;
}

/* A forked child has none of the parent's workers (and maybe a lock held by a thread that is gone). */
static void reset_pool_in_child(void) {
    pthread_mutex_t fresh_mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    pool_lock = fresh_mutex;
    call_lock = fresh_mutex;
    pool_wake = fresh_cond;
    pool_done = fresh_cond;
    pool_size = 0;
    generation = 0;
    remaining = 0;
    threads_selected = THREADS_POOL; /* an OpenMP team does not survive fork (libgomp's never did) */
}
#endif

/* ---------------------------------------------------------------- the process's OpenMP team ----------
 * PyTorch's CPU build runs its operators on an OpenMP thread team, whose threads keep spinning for a while
 * after each operator (OMP_WAIT_POLICY). Threads of our own would then compete with them for the same
 * cores; handing the rows to that same team instead makes the spinning threads pick the work up at once.
 * The runtime is found among the libraries already loaded (never loaded, never linked: no second runtime,
 * no coupling to a torch build) through the GOMP entry points that libgomp, LLVM's libomp and Intel's
 * libiomp5 all export. Without one, the pthread pool above does the work. */
#ifdef LLMPRUNE_THREADS
typedef void (*GompParallel)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*OmpQuery)(void);
static GompParallel gomp_parallel;
static OmpQuery omp_thread_num, omp_num_threads;
static const char *OPENMP_LIBRARIES[] = {"libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so",
                                         "libomp.dylib", "libiomp5.dylib"};

static int find_openmp(void) {
    if (gomp_parallel) return 1;
    for (size_t i = 0; i < sizeof OPENMP_LIBRARIES / sizeof *OPENMP_LIBRARIES; i++) {
        void *library = dlopen(OPENMP_LIBRARIES[i], RTLD_LAZY | RTLD_NOLOAD);
        if (!library) continue;
        GompParallel parallel = (GompParallel)dlsym(library, "GOMP_parallel");
        OmpQuery number = (OmpQuery)dlsym(library, "omp_get_thread_num");
        OmpQuery count = (OmpQuery)dlsym(library, "omp_get_num_threads");
        if (parallel && number && count) {
            omp_thread_num = number;
            omp_num_threads = count;
            gomp_parallel = parallel;
            return 1;
        }
        dlclose(library);
    }
    return 0;
}

typedef struct {
    RowsFn fn;
    const Job *job;
} TeamTask;

/* Each member of the team takes its share of the rows (the team may be smaller than asked). */
static void team_part(void *data) {
    const TeamTask *task = (const TeamTask *)data;
    run_part(task->fn, task->job, omp_thread_num(), omp_num_threads());
}
#else
static int find_openmp(void) { return 0; }
#endif

/* Work below this many multiply-adds runs on the calling thread: waking workers costs more. */
#define PARALLEL_WORK 65536

static void run_rows(RowsFn fn, const Job *job, int threads, int64_t work) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > job->rows) threads = (int)job->rows;
    if (threads <= 1 || work < PARALLEL_WORK) {
        fn(job, 0, job->rows);
        return;
    }
#ifdef LLMPRUNE_THREADS
    if (threads_selected == THREADS_OPENMP) {
        TeamTask task = {fn, job};
        gomp_parallel(team_part, &task, (unsigned)threads, 0);
        return;
    }
    pthread_mutex_lock(&call_lock);
    pthread_mutex_lock(&pool_lock);
    threads = grow_pool(threads - 1) + 1;
    task_fn = fn;
    task_job = job;
    task_parts = threads;
    remaining = threads - 1;
    generation++;
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    run_part(fn, job, 0, threads);
    pthread_mutex_lock(&pool_lock);
    while (remaining > 0) pthread_cond_wait(&pool_done, &pool_lock);
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&call_lock);
#else
    fn(job, 0, job->rows);
#endif
}

/* ---------------------------------------------------------------- Python ------------------------------ */

static int parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, long long *out) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "expected %zd integer arguments, got %zd", expected, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

static int check_dtype(long long dtype) {
    if (dtype != DTYPE_F32 && dtype != DTYPE_BF16) {
        PyErr_Format(PyExc_ValueError, "unknown value dtype code %lld", dtype);
        return -1;
    }
    return 0;
}

/* matmul(values, mask, offsets, x, x_stride, y, rows, cols, tokens, dtype, threads) */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[11];
    if (parse(args, nargs, 11, a) || check_dtype(a[9])) return NULL;
    Job job = {(const void *)(intptr_t)a[0], (const uint8_t *)(intptr_t)a[1], (const int64_t *)(intptr_t)a[2],
               (const float *)(intptr_t)a[3], a[4], (float *)(intptr_t)a[5], NULL, a[6], a[7], a[8],
               8 * ((a[7] + 63) / 64), (int)a[9]};
    const int64_t nnz = job.rows ? job.offsets[job.rows] : 0;
    Py_BEGIN_ALLOW_THREADS
    run_rows(matmul_fn(), &job, (int)a[10], nnz * job.tokens);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* matmul_many(values, mask, offsets, packed_x, y, rows, cols, tokens, tail, dtype, threads) */
static PyObject *py_matmul_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[11];
    if (parse(args, nargs, 11, a) || check_dtype(a[9])) return NULL;
    const long long rest = a[7] % MANY_TOKENS, tail = a[8];
    if (tail && ((tail != MANY_SHORT_TAIL && tail != MANY_LONG_TAIL) || !rest || rest > tail)) {
        PyErr_Format(PyExc_ValueError, "no last block of %lld tokens for %lld tokens", tail, a[7]);
        return NULL;
    }
    Job job = {(const void *)(intptr_t)a[0], (const uint8_t *)(intptr_t)a[1], (const int64_t *)(intptr_t)a[2],
               (const float *)(intptr_t)a[3], 0, (float *)(intptr_t)a[4], NULL, a[5], a[6], a[7],
               8 * ((a[6] + 63) / 64), (int)a[9]};
    job.tail = tail;
    const int64_t nnz = job.rows ? job.offsets[job.rows] : 0;
    Py_BEGIN_ALLOW_THREADS
    run_rows(many_fn(), &job, (int)a[10], nnz * job.tokens);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#ifdef LLMPRUNE_BF16_PANELS
/* A bfloat16 panel kernel on parsed arguments (see py_matmul_panels): inputs packed, then rows over threads. */
static PyObject *run_panels(const long long *a, RowsFn rows_fn) {
    Job job = {(const void *)(intptr_t)a[0], (const uint8_t *)(intptr_t)a[1], (const int64_t *)(intptr_t)a[2],
               NULL, 0, (float *)(intptr_t)a[6], NULL, a[7], a[8], a[9], 8 * ((a[8] + 63) / 64), DTYPE_BF16};
    int failed = 0;
    job.tiles_x = (const uint16_t *)(intptr_t)a[5];
    job.failed = &failed;
    const int64_t nnz = job.rows ? job.offsets[job.rows] : 0;
    Py_BEGIN_ALLOW_THREADS
    pack_pairs((const uint16_t *)(intptr_t)a[3], a[4], job.tokens, job.cols, (uint16_t *)job.tiles_x);
    run_rows(rows_fn, &job, (int)a[10], nnz * job.tokens);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
#endif

enum { PANELS_AMX = 0, PANELS_DPBF16 = 1 };

/* matmul_panels(engine, values, mask, offsets, x, x_stride, packed, y, rows, cols, tokens, threads): bfloat16
 * values and bfloat16 x (row stride x_stride) on engine PANELS_AMX or PANELS_DPBF16, packed a scratch of
 * bf16_packed_size(tokens, cols) uint16. */
static PyObject *py_matmul_panels(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[12];
    if (parse(args, nargs, 12, a)) return NULL;
#ifdef LLMPRUNE_BF16_PANELS
    if (a[0] == PANELS_DPBF16 && dpbf16_usable()) return run_panels(a + 1, matmul_dpbf16_rows);
#ifdef LLMPRUNE_AMX
    if (a[0] == PANELS_AMX && amx_usable()) return run_panels(a + 1, matmul_amx_rows);
#endif
#endif
    PyErr_Format(PyExc_RuntimeError, "the bfloat16 panel kernel on %s does not run in this build, on this CPU or system",
                 a[0] == PANELS_AMX ? "AMX tiles" : a[0] == PANELS_DPBF16 ? "AVX-512 BF16" : "an unknown engine");
    return NULL;
}

/* Appends a new string to list (PyList_Append takes a reference of its own); -1 with an exception set. */
static int append_name(PyObject *list, const char *name) {
    PyObject *item = PyUnicode_FromString(name);
    if (!item) return -1;
    const int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

/* The engines of matmul_panels this process can run, by name. */
static PyObject *py_panel_engines(PyObject *self, PyObject *unused) {
    PyObject *names = PyList_New(0);
    if (!names) return NULL;
#ifdef LLMPRUNE_BF16_PANELS
#ifdef LLMPRUNE_AMX
    if (amx_usable() && append_name(names, "amx")) goto failed;
#endif
    if (dpbf16_usable() && append_name(names, "avx512_bf16")) goto failed;
    return names;
failed:
    Py_DECREF(names);
    return NULL;
#else
    return names;
#endif
}

static PyObject *py_bf16_packed_size(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[2];
    if (parse(args, nargs, 2, a)) return NULL;
    return PyLong_FromLongLong((a[0] + 15) / 16 * 16 * ((a[1] + 31) / 32 * 32));
}

/* to_dense(values, mask, offsets, out, rows, cols, dtype, threads) */
static PyObject *py_to_dense(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[8];
    if (parse(args, nargs, 8, a) || check_dtype(a[6])) return NULL;
    Job job = {(const void *)(intptr_t)a[0], (const uint8_t *)(intptr_t)a[1], (const int64_t *)(intptr_t)a[2],
               NULL, 0, NULL, (void *)(intptr_t)a[3], a[4], a[5], 0, 8 * ((a[5] + 63) / 64), (int)a[6]};
    Py_BEGIN_ALLOW_THREADS
    run_rows(dense_fn(), &job, (int)a[7], job.rows * job.cols);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* mask_of(dense, rows, cols, dtype, mask_out, counts_out, threads) */
static PyObject *py_mask_of(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[7];
    if (parse(args, nargs, 7, a) || check_dtype(a[3])) return NULL;
    Job job = {0};
    job.dense = (void *)(intptr_t)a[0];
    job.rows = a[1];
    job.cols = a[2];
    job.row_bytes = 8 * ((a[2] + 63) / 64);
    job.dtype = (int)a[3];
    job.mask_out = (uint8_t *)(intptr_t)a[4];
    job.counts_out = (int64_t *)(intptr_t)a[5];
    Py_BEGIN_ALLOW_THREADS
    run_rows(mask_rows, &job, (int)a[6], job.rows * job.cols);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gather(dense, mask, offsets, values_out, rows, cols, dtype, threads) */
static PyObject *py_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[8];
    if (parse(args, nargs, 8, a) || check_dtype(a[6])) return NULL;
    Job job = {0};
    job.dense = (void *)(intptr_t)a[0];
    job.mask = (const uint8_t *)(intptr_t)a[1];
    job.offsets = (const int64_t *)(intptr_t)a[2];
    job.values_out = (void *)(intptr_t)a[3];
    job.rows = a[4];
    job.cols = a[5];
    job.row_bytes = 8 * ((a[5] + 63) / 64);
    job.dtype = (int)a[6];
    Py_BEGIN_ALLOW_THREADS
    run_rows(gather_rows, &job, (int)a[7], job.rows * job.cols);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_many_blocks(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(iii)", MANY_TOKENS, MANY_SHORT_TAIL, MANY_LONG_TAIL);
}

static PyObject *py_supported(PyObject *self, PyObject *unused) {
    PyObject *names = PyList_New(0);
    for (int isa = ISA_AVX512; isa >= ISA_PORTABLE && names; isa--) {
        if (!isa_supported(isa)) continue;
        PyObject *name = PyUnicode_FromString(ISA_NAMES[isa]);
        if (!name || PyList_Append(names, name)) { Py_XDECREF(name); Py_CLEAR(names); break; }
        Py_DECREF(name);
    }
    return names;
}

static PyObject *py_select(PyObject *self, PyObject *name) {
    const char *text = PyUnicode_AsUTF8(name);
    if (!text) return NULL;
    for (int isa = ISA_PORTABLE; isa <= ISA_AVX512; isa++) {
        if (strcmp(text, ISA_NAMES[isa]) != 0) continue;
        if (!isa_supported(isa)) {
            PyErr_Format(PyExc_ValueError, "this CPU does not support the %s kernels", text);
            return NULL;
        }
        selected = isa;
        Py_RETURN_NONE;
    }
    PyErr_Format(PyExc_ValueError, "unknown instruction set %s", text);
    return NULL;
}

static PyObject *py_selected(PyObject *self, PyObject *unused) { return PyUnicode_FromString(ISA_NAMES[selected]); }

static PyObject *py_thread_backends(PyObject *self, PyObject *unused) {
    return find_openmp() ? Py_BuildValue("[ss]", THREADS_NAMES[THREADS_OPENMP], THREADS_NAMES[THREADS_POOL])
                         : Py_BuildValue("[s]", THREADS_NAMES[THREADS_POOL]);
}

static PyObject *py_select_threads(PyObject *self, PyObject *name) {
    const char *text = PyUnicode_AsUTF8(name);
    if (!text) return NULL;
    for (int backend = THREADS_POOL; backend <= THREADS_OPENMP; backend++) {
        if (strcmp(text, THREADS_NAMES[backend]) != 0) continue;
        if (backend == THREADS_OPENMP && !find_openmp()) {
            PyErr_SetString(PyExc_ValueError, "no OpenMP runtime is loaded in this process");
            return NULL;
        }
        threads_selected = backend;
        Py_RETURN_NONE;
    }
    PyErr_Format(PyExc_ValueError, "unknown thread backend %s", text);
    return NULL;
}

static PyObject *py_selected_threads(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(THREADS_NAMES[threads_selected]);
}

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "y = x @ W.T for a bitmask weight"},
    {"matmul_many", (PyCFunction)(void (*)(void))py_matmul_many, METH_FASTCALL,
     "y = x @ W.T for many tokens, x packed in blocks (see many_blocks)"},
    {"matmul_panels", (PyCFunction)(void (*)(void))py_matmul_panels, METH_FASTCALL,
     "y = x @ W.T for bfloat16 weights and inputs on AMX tiles (engine 0) or AVX-512 BF16 (1)"},
    {"panel_engines", py_panel_engines, METH_NOARGS, "the engines of matmul_panels this process can run"},
    {"bf16_packed_size", (PyCFunction)(void (*)(void))py_bf16_packed_size, METH_FASTCALL,
     "uint16 entries of matmul_panels' packed inputs for (tokens, cols)"},
    {"many_blocks", py_many_blocks, METH_NOARGS,
     "tokens per packed block of matmul_many: (wide, then the last one's widths)"},
    {"to_dense", (PyCFunction)(void (*)(void))py_to_dense, METH_FASTCALL, "expand a bitmask weight"},
    {"mask_of", (PyCFunction)(void (*)(void))py_mask_of, METH_FASTCALL, "bitmask and row counts of a matrix"},
    {"gather", (PyCFunction)(void (*)(void))py_gather, METH_FASTCALL, "kept values of a matrix, row by row"},
    {"supported", py_supported, METH_NOARGS, "instruction sets this CPU runs, best first"},
    {"select", py_select, METH_O, "use the kernels of one instruction set"},
    {"selected", py_selected, METH_NOARGS, "the instruction set in use"},
    {"thread_backends", py_thread_backends, METH_NOARGS, "thread backends available here, best first"},
    {"select_threads", py_select_threads, METH_O, "run the rows on 'openmp' (the process's team) or 'pool'"},
    {"selected_threads", py_selected_threads, METH_NOARGS, "the thread backend in use"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sparse_cpu", "llmprune's sparse CPU kernels", -1,
                                    methods};

PyMODINIT_FUNC PyInit__sparse_cpu(void) {
#ifdef LLMPRUNE_X86
    build_tables();
#endif
#ifdef LLMPRUNE_THREADS
    pthread_atfork(NULL, NULL, reset_pool_in_child);
#endif
    return PyModule_Create(&module);
}
