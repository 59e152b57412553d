/* Plain Q6_K rows times several q8_K columns, each column with the bits of
 * ggml_vec_dot_q6_K_q8_K (ggml-cpu/arch/x86/quants.c, its AVX2 version): a super-block of 4 rows
 * unpacked once for every column, two rows to a 512-bit vector, and each column's block read once
 * for the 4 rows (broadcast to both halves). One row a pass re-read every column for every row:
 * at 64 columns those reads, not the weights, set the pace (0.40-0.54x ggml's batched kernel).
 *
 * Why the bits can be the same: that dot product keeps, per super-block, 8 integer lanes, lane m
 * holding exactly (nothing overflows) the sum over the block's 8 chunks of 32 values of
 *     scale(chunk, m) * (products of values 4m..4m+3 of the chunk)
 * minus 32 * (bsums[2m] * scales[2m] + bsums[2m + 1] * scales[2m + 1]), and then rounds, with one
 * fused multiply-add per lane, acc[m] = fma(a.d * fp16(d), (float) lane, acc[m]); the result is
 * acc's 8 lanes added in the order of ggml's hsum_float_8. The same integers, however summed,
 * and the same float steps give the same bits; columns.py checks them against ggml before use.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"

#if defined(__x86_64__) && !defined(FC_NO_FUSED)
#include <immintrin.h>

/* rows a pass over the columns: 2 * ROW_PAIRS; on the Xeon here 4 rows were 5-10% faster than 2
 * at 16 and 64 columns and 6 no faster (within the noise of a shared machine) */
#ifndef ROW_PAIRS
#define ROW_PAIRS 2
#endif
#ifndef COLUMN_CHUNK
#define COLUMN_CHUNK 64 /* columns whose accumulators (ROW_PAIRS vectors each) live on the stack at a time */
#endif

typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} q6_K;

/* Which of the two kernels below this CPU runs: bit 0 the AVX2 one, bit 1 the AVX-512 one. */
int fc_q6_K_kernels(void) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const int wide = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    return avx2 | wide << 1;
}

#define TARGET __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define INLINE TARGET static inline __attribute__((always_inline))
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE_AVX2 TARGET_AVX2 static inline __attribute__((always_inline))

static const uint8_t SPREAD[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},         {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},         {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},         {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13}, {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

/* 32 bytes of row a in the low half, the same 32 bytes of row b in the high half */
INLINE __m512i two_rows(const void *a, const void *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

INLINE __m512i two_rows_16(__m128i a, __m128i b) {
    return _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
}

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

/* One super-block of two rows, unpacked: row a in each vector's low 256 bits, row b in the high */
typedef struct {
    __m512i q[8]; /* values 32t .. 32t + 31 as 6-bit unsigned */
    __m512i s[8]; /* 16-bit lanes 0-7 of each half: scales[2t], 8-15: scales[2t + 1] */
    __m512i scales32; /* 32 * scales[] in 16 bits (|32 * scale| <= 4096): see row_pairs */
    __m512 d; /* fp16(d), 8 lanes each */
} pair_block;

INLINE void unpack(const q6_K *a, const q6_K *b, pair_block *u) {
    const __m512i m3 = _mm512_set1_epi8(3), m15 = _mm512_set1_epi8(15);
    for (int j = 0; j < 2; j++) { /* values j*128 + 32t .. +31 in q[4j + t] */
        const __m512i lo1 = two_rows(a->ql + 64 * j, b->ql + 64 * j);
        const __m512i lo2 = two_rows(a->ql + 64 * j + 32, b->ql + 64 * j + 32);
        const __m512i hi = two_rows(a->qh + 32 * j, b->qh + 32 * j);
        const __m512i h0 = _mm512_slli_epi16(_mm512_and_si512(hi, m3), 4);
        const __m512i h1 = _mm512_slli_epi16(_mm512_and_si512(hi, _mm512_set1_epi8(12)), 2);
        const __m512i h2 = _mm512_and_si512(hi, _mm512_set1_epi8(48));
        const __m512i h3 = _mm512_srli_epi16(_mm512_and_si512(hi, _mm512_set1_epi8(-64)), 2);
        u->q[4 * j + 0] = _mm512_or_si512(_mm512_and_si512(lo1, m15), h0);
        u->q[4 * j + 1] = _mm512_or_si512(_mm512_and_si512(lo2, m15), h1);
        u->q[4 * j + 2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lo1, 4), m15), h2);
        u->q[4 * j + 3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lo2, 4), m15), h3);
    }
    const __m128i sa = _mm_loadu_si128((const __m128i *)a->scales), sb = _mm_loadu_si128((const __m128i *)b->scales);
    for (int t = 0; t < 8; t++) {
        const __m128i spread = _mm_loadu_si128((const __m128i *)SPREAD[t]);
        u->s[t] = two_rows_16(_mm_shuffle_epi8(sa, spread), _mm_shuffle_epi8(sb, spread));
    }
    u->scales32 = _mm512_slli_epi16(two_rows_16(sa, sb), 5);
    u->d = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(fp16(a->d)), _mm512_set1_ps(fp16(b->d)));
}

/* `pairs` row pairs (a[k], b[k]) times columns c[0 .. n), n <= COLUMN_CHUNK, column j's results
 * at ya[k] + j * y_stride and yb[k] + j * y_stride (yb[k] NULL: row b is row a again, unwritten):
 * each column's q8_K block read once for all the rows, each row's 8 integer lanes and float steps
 * as ggml's one-column kernel has them. Inlined with `pairs` a constant, the loops over pairs and
 * chunks unrolled (the sums stay in registers: measured 10-15% faster at 16 and 64 columns). */
INLINE void row_pairs(const int pairs, int64_t nb, const q6_K *const *a, const q6_K *const *b,
                      const q8_K *const *c, int n, float *const *ya, float *const *yb, size_t y_stride,
                      const char *ahead, int64_t ahead_bytes) {
    __m512 acc[ROW_PAIRS][COLUMN_CHUNK];
    for (int k = 0; k < pairs; k++) {
        for (int j = 0; j < n; j++) {
            acc[k][j] = _mm512_setzero_ps();
        }
    }
    const int64_t slice = slice_bytes(ahead_bytes, nb);
    for (int64_t i = 0; i < nb; i++) {
        prefetch_slice(ahead, ahead_bytes, slice, i);
        pair_block u[ROW_PAIRS];
        for (int k = 0; k < pairs; k++) {
            unpack(a[k] + i, b[k] + i, &u[k]);
        }
        for (int j = 0; j < n; j++) {
            const q8_K *col = c[j] + i;
            __m512i sumi[ROW_PAIRS];
#pragma GCC unroll 4
            for (int k = 0; k < pairs; k++) {
                sumi[k] = _mm512_setzero_si512();
            }
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)col->qs + t));
#pragma GCC unroll 4
                for (int k = 0; k < pairs; k++) {
                    const __m512i p16 = _mm512_maddubs_epi16(u[k].q[t], x);
                    sumi[k] = _mm512_add_epi32(sumi[k], _mm512_madd_epi16(u[k].s[t], p16));
                }
            }
            const __m512i bsums = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)col->bsums));
            const __m512 dc = _mm512_set1_ps(col->d);
#pragma GCC unroll 4
            for (int k = 0; k < pairs; k++) {
                /* the values' -32 offset: lane m less 32 * (bsums[2m] * scales[2m] + bsums[2m + 1] *
                 * scales[2m + 1]), exactly (|bsums| <= 2048: no product or pair sum overflows) */
                sumi[k] = _mm512_sub_epi32(sumi[k], _mm512_madd_epi16(bsums, u[k].scales32));
                /* col->d * fp16(d), then one fused multiply-add a lane, as ggml */
                acc[k][j] = _mm512_fmadd_ps(_mm512_mul_ps(dc, u[k].d), _mm512_cvtepi32_ps(sumi[k]), acc[k][j]);
            }
        }
    }
    for (int k = 0; k < pairs; k++) {
        for (int j = 0; j < n; j++) {
            ya[k][j * y_stride] = hsum_float_8(_mm512_castps512_ps256(acc[k][j]));
            if (yb[k]) {
                const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[k][j]), 1));
                yb[k][j * y_stride] = hsum_float_8(high);
            }
        }
    }
}

TARGET static void row_pairs_full(int64_t nb, const q6_K *const *a, const q6_K *const *b, const q8_K *const *c, int n,
                                  float *const *ya, float *const *yb, size_t y_stride, const char *ahead,
                                  int64_t ahead_bytes) {
    row_pairs(ROW_PAIRS, nb, a, b, c, n, ya, yb, y_stride, ahead, ahead_bytes);
}

TARGET static void row_pairs_one(int64_t nb, const q6_K *const *a, const q6_K *const *b, const q8_K *const *c, int n,
                                 float *const *ya, float *const *yb, size_t y_stride) {
    row_pairs(1, nb, a, b, c, n, ya, yb, y_stride, NULL, 0);
}

/* fc_q6_K_rows on AVX-512: 2 * ROW_PAIRS rows at a time over every column, then the rest a pair
 * at a time (an odd last row paired with itself). */
static void rows_wide(int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                  size_t x_stride, int64_t n, float *y, size_t y_stride) {
    const q8_K *c[COLUMN_CHUNK];
    const q6_K *a[ROW_PAIRS], *b[ROW_PAIRS];
    float *ya[ROW_PAIRS], *yb[ROW_PAIRS];
    for (int64_t j0 = 0; j0 < n; j0 += COLUMN_CHUNK) {
        const int m = (int)(n - j0 < COLUMN_CHUNK ? n - j0 : COLUMN_CHUNK);
        for (int j = 0; j < m; j++) {
            c[j] = (const q8_K *)((const char *)xq + (j0 + j) * x_stride);
        }
        for (int64_t r = first; r < last;) {
            int k = 0;
            for (; k < ROW_PAIRS && r < last; k++, r += 2) {
                const int64_t rb = r + 1 < last ? r + 1 : r;
                a[k] = (const q6_K *)((const char *)w + r * row_bytes);
                b[k] = (const q6_K *)((const char *)w + rb * row_bytes);
                ya[k] = y + j0 * y_stride + r;
                yb[k] = rb == r ? NULL : y + j0 * y_stride + rb;
            }
            if (k == ROW_PAIRS) {
                const char *ahead;
                const int64_t bytes = rows_ahead(w, row_bytes, r, 2 * ROW_PAIRS, last, &ahead);
                row_pairs_full(nb, a, b, c, m, ya, yb, y_stride, ahead, bytes);
            } else {
                for (int p = 0; p < k; p++) {
                    row_pairs_one(nb, a + p, b + p, c, m, ya + p, yb + p, y_stride);
                }
            }
        }
    }
}

/* The AVX2 kernel: the same steps with one row to a vector, ROWS_AVX2 rows a pass over the columns
 * (on the EPYC here 4 rows took 7.4-9.6 ns a row, super-block and column against 9.0-13.1 for 2:
 * fc_q6_K_rows alone on 512 rows of 14336 and 64 columns, one thread, the two alternated 3 times) */
#ifndef ROWS_AVX2
#define ROWS_AVX2 4
#endif

typedef struct {
    __m256i q[8], s[8], scales32; /* as pair_block's halves */
    __m256 d;
} row_block;

INLINE_AVX2 void unpack_row(const q6_K *a, row_block *u) {
    const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15);
    for (int j = 0; j < 2; j++) {
        const __m256i lo1 = _mm256_loadu_si256((const __m256i *)(a->ql + 64 * j));
        const __m256i lo2 = _mm256_loadu_si256((const __m256i *)(a->ql + 64 * j + 32));
        const __m256i hi = _mm256_loadu_si256((const __m256i *)(a->qh + 32 * j));
        const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(hi, m3), 4);
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(12)), 2);
        const __m256i h2 = _mm256_and_si256(hi, _mm256_set1_epi8(48));
        const __m256i h3 = _mm256_srli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(-64)), 2);
        u->q[4 * j + 0] = _mm256_or_si256(_mm256_and_si256(lo1, m15), h0);
        u->q[4 * j + 1] = _mm256_or_si256(_mm256_and_si256(lo2, m15), h1);
        u->q[4 * j + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo1, 4), m15), h2);
        u->q[4 * j + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo2, 4), m15), h3);
    }
    const __m128i sa = _mm_loadu_si128((const __m128i *)a->scales);
    for (int t = 0; t < 8; t++) {
        u->s[t] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sa, _mm_loadu_si128((const __m128i *)SPREAD[t])));
    }
    u->scales32 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(sa), 5);
    u->d = _mm256_set1_ps(fp16(a->d));
}

/* `rows` rows a[k] times columns c[0 .. n), n <= COLUMN_CHUNK, column j's result for row k at
 * y[k] + j * y_stride (row_pairs' steps, a row a vector) */
INLINE_AVX2 void rows_avx2(const int rows, int64_t nb, const q6_K *const *a, const q8_K *const *c, int n,
                           float *const *y, size_t y_stride, const char *ahead, int64_t ahead_bytes) {
    __m256 acc[ROWS_AVX2][COLUMN_CHUNK];
    for (int k = 0; k < rows; k++) {
        for (int j = 0; j < n; j++) {
            acc[k][j] = _mm256_setzero_ps();
        }
    }
    const int64_t slice = slice_bytes(ahead_bytes, nb);
    for (int64_t i = 0; i < nb; i++) {
        prefetch_slice(ahead, ahead_bytes, slice, i);
        row_block u[ROWS_AVX2];
        for (int k = 0; k < rows; k++) {
            unpack_row(a[k] + i, &u[k]);
        }
        for (int j = 0; j < n; j++) {
            const q8_K *col = c[j] + i;
            __m256i sumi[ROWS_AVX2];
#pragma GCC unroll 4
            for (int k = 0; k < rows; k++) {
                sumi[k] = _mm256_setzero_si256();
            }
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)col->qs + t);
#pragma GCC unroll 4
                for (int k = 0; k < rows; k++) {
                    const __m256i p16 = _mm256_maddubs_epi16(u[k].q[t], x);
                    sumi[k] = _mm256_add_epi32(sumi[k], _mm256_madd_epi16(u[k].s[t], p16));
                }
            }
            const __m256i bsums = _mm256_loadu_si256((const __m256i *)col->bsums);
            const __m256 dc = _mm256_set1_ps(col->d);
#pragma GCC unroll 4
            for (int k = 0; k < rows; k++) {
                sumi[k] = _mm256_sub_epi32(sumi[k], _mm256_madd_epi16(bsums, u[k].scales32));
                acc[k][j] = _mm256_fmadd_ps(_mm256_mul_ps(dc, u[k].d), _mm256_cvtepi32_ps(sumi[k]), acc[k][j]);
            }
        }
    }
    for (int k = 0; k < rows; k++) {
        for (int j = 0; j < n; j++) {
            y[k][j * y_stride] = hsum_float_8(acc[k][j]);
        }
    }
}

TARGET_AVX2 static void rows_avx2_full(int64_t nb, const q6_K *const *a, const q8_K *const *c, int n, float *const *y,
                                       size_t y_stride, const char *ahead, int64_t ahead_bytes) {
    rows_avx2(ROWS_AVX2, nb, a, c, n, y, y_stride, ahead, ahead_bytes);
}

TARGET_AVX2 static void rows_avx2_one(int64_t nb, const q6_K *const *a, const q8_K *const *c, int n, float *const *y,
                                      size_t y_stride) {
    rows_avx2(1, nb, a, c, n, y, y_stride, NULL, 0);
}

static void rows_narrow(int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                        size_t x_stride, int64_t n, float *y, size_t y_stride) {
    const q8_K *c[COLUMN_CHUNK];
    const q6_K *a[ROWS_AVX2];
    float *ya[ROWS_AVX2];
    for (int64_t j0 = 0; j0 < n; j0 += COLUMN_CHUNK) {
        const int m = (int)(n - j0 < COLUMN_CHUNK ? n - j0 : COLUMN_CHUNK);
        for (int j = 0; j < m; j++) {
            c[j] = (const q8_K *)((const char *)xq + (j0 + j) * x_stride);
        }
        for (int64_t r = first; r < last; r += ROWS_AVX2) {
            const int k = (int)(last - r < ROWS_AVX2 ? last - r : ROWS_AVX2);
            for (int p = 0; p < k; p++) {
                a[p] = (const q6_K *)((const char *)w + (r + p) * row_bytes);
                ya[p] = y + j0 * y_stride + r + p;
            }
            if (k == ROWS_AVX2) {
                const char *ahead;
                const int64_t bytes = rows_ahead(w, row_bytes, r + ROWS_AVX2, ROWS_AVX2, last, &ahead);
                rows_avx2_full(nb, a, c, m, ya, y_stride, ahead, bytes);
            } else {
                for (int p = 0; p < k; p++) {
                    rows_avx2_one(nb, a + p, c, m, ya + p, y_stride);
                }
            }
        }
    }
}

/* Rows [first, last) of plain Q6_K rows (row_bytes apart, nb super-blocks each) times n columns
 * of q8_K rows (column j at xq + j * x_stride), into y (column j at y + j * y_stride floats), on
 * the AVX-512 kernel (wide) or the AVX2 one. */
void fc_q6_K_rows(int wide, int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                  size_t x_stride, int64_t n, float *y, size_t y_stride) {
    (wide ? rows_wide : rows_narrow)(nb, w, row_bytes, first, last, xq, x_stride, n, y, y_stride);
}

#else /* other CPUs, or a compiler without these targets: never available */

int fc_q6_K_kernels(void) { return 0; }

void fc_q6_K_rows(int wide, int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                  size_t x_stride, int64_t n, float *y, size_t y_stride) {
    (void)wide, (void)nb, (void)w, (void)row_bytes, (void)first, (void)last, (void)xq, (void)x_stride, (void)n, (void)y,
        (void)y_stride;
}

#endif
