/* Plain Q6_K rows times several q8_K columns on AVX2 alone: q6_K.c's kernel (its comment says why
 * the bits are ggml's one-column kernel's) with one row to a 256-bit vector. */
#include "q6_K.h"

#if defined(__x86_64__) && !defined(FC_NO_FUSED)

/* The AVX2 kernel: the same steps with one row to a vector, ROWS_AVX2 rows a pass over the columns
 * (on the EPYC here 4 rows took 7.4-9.6 ns a row, super-block and column against 9.0-13.1 for 2:
 * fc_q6_K_rows alone on 512 rows of 14336 and 64 columns, one thread, the two alternated 3 times) */
#ifndef ROWS_AVX2
#define ROWS_AVX2 4
#endif

typedef struct {
    __m256i q[8], s[8], minus_scales32; /* as pair_block's halves */
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
    u->minus_scales32 = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(_mm256_cvtepi8_epi16(sa), 5));
    u->d = _mm256_set1_ps(fp16(a->d));
}

/* `rows` rows a[k] times columns c[0 .. n), n <= COLUMN_CHUNK, column j's result for row k at
 * y[k] + j * y_stride (row_pairs' steps, a row a vector) */
INLINE_AVX2 void rows_avx2(const int rows, int64_t nb, const q6_K *const *a, const q8_K *const *c, int64_t stride, int n,
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
            const q8_K *col = block_of(c[j], i, stride);
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
                sumi[k] = _mm256_add_epi32(sumi[k], _mm256_madd_epi16(bsums, u[k].minus_scales32));
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

TARGET_AVX2 static void rows_avx2_full(int64_t nb, const q6_K *const *a, const q8_K *const *c, int64_t stride, int n,
                                       float *const *y, size_t y_stride, const char *ahead, int64_t ahead_bytes) {
    rows_avx2(ROWS_AVX2, nb, a, c, stride, n, y, y_stride, ahead, ahead_bytes);
}

TARGET_AVX2 static void rows_avx2_one(int64_t nb, const q6_K *const *a, const q8_K *const *c, int64_t stride, int n,
                                      float *const *y, size_t y_stride) {
    rows_avx2(1, nb, a, c, stride, n, y, y_stride, NULL, 0);
}

/* fc_q6_K_rows on AVX2 (q6_K.h) */
void fc_q6_K_rows_avx2(int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                       size_t x_stride, int64_t stride, int64_t n, float *y, size_t y_stride) {
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
                rows_avx2_full(nb, a, c, stride, m, ya, y_stride, ahead, bytes);
            } else {
                for (int p = 0; p < k; p++) {
                    rows_avx2_one(nb, a + p, c, stride, m, ya + p, y_stride);
                }
            }
        }
    }
}

#endif
