/* What the two plain Q6_K kernels share (q6_K.c on AVX-512, q6_K_avx2.c on AVX2): the block
 * layout, ggml's horizontal sum and fp16 conversion, and the prefetch of rows ahead. */
#ifndef FC_Q6_K_H
#define FC_Q6_K_H

#include <stddef.h>
#include <stdint.h>

#include "blocks.h"

#if defined(__x86_64__) && !defined(FC_NO_FUSED)
#include <immintrin.h>

#ifndef COLUMN_CHUNK
#define COLUMN_CHUNK 64 /* columns whose accumulators (a vector a row) live on the stack at a time */
#endif

typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} q6_K;

#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE_AVX2 TARGET_AVX2 static inline __attribute__((always_inline))

static const uint8_t SPREAD[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},         {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},         {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},         {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13}, {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

/* ggml's hsum_float_8: ((l4 + l0) + (l6 + l2)) + ((l5 + l1) + (l7 + l3)) */
INLINE_AVX2 float hsum_float_8(__m256 x) {
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

INLINE_AVX2 float fp16(uint16_t h) { return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h))); }

/* Rows a pass ahead of the one a kernel computes, prefetched a slice at each of its nb
 * super-blocks (slice i: bytes [i * slice, (i + 1) * slice) of `bytes` at `ahead`, `slice` from
 * slice_bytes, worked out once a pass): a pass reads 4 rows side by side,
 * and where rows are short (the 1.5B's head: 6 super-blocks, 1260 bytes) those streams end
 * before the hardware's prefetcher follows them; its loads then waited on DRAM (60% of the head's
 * samples at 2 columns, on its first loads of each block) */
#ifndef PASSES_AHEAD
#define PASSES_AHEAD 2
#endif
static inline int64_t slice_bytes(int64_t bytes, int64_t nb) { return (bytes + 64 * nb - 1) / (64 * nb) * 64; }

static inline __attribute__((always_inline)) void prefetch_slice(const char *ahead, int64_t bytes, int64_t slice,
                                                                 int64_t i) {
    const int64_t end = (i + 1) * slice < bytes ? (i + 1) * slice : bytes;
    for (int64_t at = i * slice; at < end; at += 64) {
        _mm_prefetch(ahead + at, _MM_HINT_T0);
    }
}

/* For a pass of `count` rows whose successor starts at row `next`: the rows PASSES_AHEAD passes
 * on (clipped to `last`), their address in *ahead and their bytes (0: none) */
static inline int64_t rows_ahead(const void *w, size_t row_bytes, int64_t next, int64_t count, int64_t last,
                                 const char **ahead) {
    const int64_t from = next + (PASSES_AHEAD - 1) * count, to = from + count < last ? from + count : last;
    *ahead = to > from ? (const char *)w + from * row_bytes : NULL;
    return to > from ? (to - from) * (int64_t)row_bytes : 0;
}

void fc_q6_K_rows_avx2(int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                       size_t x_stride, int64_t stride, int64_t n, float *y, size_t y_stride);

#endif
#endif
