/*
 * Plain-C models of the AVX-512F intrinsics that the AVX-512 path of sparse_cpu.c uses, lane by lane as
 * Intel's Intrinsics Guide defines them. Only a test build includes this (-DLLMPRUNE_EMULATE_AVX512,
 * tests/test_cpu_kernels.py): it runs that path's own code (its mask arithmetic, token blocks and row tails)
 * on CPUs without AVX-512, so CI proves the path's logic everywhere. It says nothing about its speed.
 */
#ifndef LLMPRUNE_AVX512_EMULATED_H
#define LLMPRUNE_AVX512_EMULATED_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct { float lane[16]; } emulated_m512;
typedef struct { uint32_t lane[16]; } emulated_m512i;
typedef struct { uint16_t lane[16]; } emulated_m256i; /* read only as 16 words of 16 bits here */

#define __m512 emulated_m512
#define __m512i emulated_m512i
#define __m256i emulated_m256i
#define __mmask16 uint16_t
#define _mm512_loadu_ps emulated_loadu_ps
#define _mm512_storeu_ps emulated_storeu_ps
#define _mm256_loadu_si256 emulated_loadu_si256
#define _mm512_cvtepu16_epi32 emulated_cvtepu16_epi32
#define _mm512_slli_epi32 emulated_slli_epi32
#define _mm512_castsi512_ps emulated_castsi512_ps
#define _mm512_castps_si512 emulated_castps_si512
#define _mm512_srli_epi32 emulated_srli_epi32
#define _mm512_cvtepi32_epi16 emulated_cvtepi32_epi16
#define _mm256_storeu_si256 emulated_storeu_si256
#define _mm512_setzero_ps emulated_setzero_ps
#define _mm512_set1_ps emulated_set1_ps
#define _mm512_maskz_expand_ps emulated_maskz_expand_ps
#define _mm512_fmadd_ps emulated_fmadd_ps
#define _mm512_add_ps emulated_add_ps
#define _mm512_reduce_add_ps emulated_reduce_add_ps

static inline emulated_m512 emulated_loadu_ps(const float *p) {
    emulated_m512 v;
    memcpy(v.lane, p, sizeof v.lane);
    return v;
}

static inline void emulated_storeu_ps(float *p, emulated_m512 v) { memcpy(p, v.lane, sizeof v.lane); }

static inline emulated_m256i emulated_loadu_si256(const emulated_m256i *p) {
    emulated_m256i v;
    memcpy(&v, (const void *)p, sizeof v);
    return v;
}

static inline emulated_m512i emulated_cvtepu16_epi32(emulated_m256i a) {
    emulated_m512i r;
    for (int i = 0; i < 16; i++) r.lane[i] = a.lane[i];
    return r;
}

static inline emulated_m512i emulated_slli_epi32(emulated_m512i a, unsigned count) {
    for (int i = 0; i < 16; i++) a.lane[i] = count > 31 ? 0 : a.lane[i] << count;
    return a;
}

static inline emulated_m512 emulated_castsi512_ps(emulated_m512i a) {
    emulated_m512 r;
    memcpy(r.lane, a.lane, sizeof r.lane);
    return r;
}

static inline emulated_m512i emulated_castps_si512(emulated_m512 a) {
    emulated_m512i r;
    memcpy(r.lane, a.lane, sizeof r.lane);
    return r;
}

static inline emulated_m512i emulated_srli_epi32(emulated_m512i a, unsigned count) {
    for (int i = 0; i < 16; i++) a.lane[i] = count > 31 ? 0 : a.lane[i] >> count;
    return a;
}

/* vpmovdw: the low 16 bits of each lane. */
static inline emulated_m256i emulated_cvtepi32_epi16(emulated_m512i a) {
    emulated_m256i r;
    for (int i = 0; i < 16; i++) r.lane[i] = (uint16_t)a.lane[i];
    return r;
}

static inline void emulated_storeu_si256(emulated_m256i *p, emulated_m256i v) { memcpy((void *)p, &v, sizeof v); }

static inline emulated_m512 emulated_setzero_ps(void) {
    emulated_m512 r;
    for (int i = 0; i < 16; i++) r.lane[i] = 0.0f;
    return r;
}

static inline emulated_m512 emulated_set1_ps(float a) {
    emulated_m512 r;
    for (int i = 0; i < 16; i++) r.lane[i] = a;
    return r;
}

/* vexpandps: lane i takes the next unused element of a (from element 0 up) where bit i of k is set. */
static inline emulated_m512 emulated_maskz_expand_ps(uint16_t k, emulated_m512 a) {
    emulated_m512 r;
    int next = 0;
    for (int i = 0; i < 16; i++) r.lane[i] = (k >> i) & 1 ? a.lane[next++] : 0.0f;
    return r;
}

static inline emulated_m512 emulated_fmadd_ps(emulated_m512 a, emulated_m512 b, emulated_m512 c) {
    for (int i = 0; i < 16; i++) c.lane[i] = fmaf(a.lane[i], b.lane[i], c.lane[i]);
    return c;
}

static inline emulated_m512 emulated_add_ps(emulated_m512 a, emulated_m512 b) {
    for (int i = 0; i < 16; i++) a.lane[i] += b.lane[i];
    return a;
}

/* Halves added pairwise, 16 -> 8 -> 4 -> 2 -> 1 lanes, as the compilers' sequence does. */
static inline float emulated_reduce_add_ps(emulated_m512 a) {
    for (int width = 8; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) a.lane[i] += a.lane[i + width];
    return a.lane[0];
}

#endif
