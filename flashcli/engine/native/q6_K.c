/* Plain Q6_K rows times several q8_K columns, each column with the bits of
 * ggml_vec_dot_q6_K_q8_K (ggml-cpu/arch/x86/quants.c, its AVX2 version), a row's unpacked
 * weights shared by every column and two columns to a 512-bit vector.
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

#define QK_K 256

#if defined(__x86_64__) && !defined(FC_NO_FUSED)
#include <immintrin.h>

#define CHUNK 32 /* column pairs whose accumulators live on the stack at a time */

typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} q6_K;

typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} q8_K;

int fc_q6_K_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#define TARGET __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

static const uint8_t SPREAD[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},         {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},         {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},         {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13}, {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

TARGET static __m512i both_halves(__m256i v) { return _mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1); }

TARGET static __m512i two_columns(const void *a, const void *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

/* ggml's hsum_float_8: ((l4 + l0) + (l6 + l2)) + ((l5 + l1) + (l7 + l3)) */
TARGET static float hsum_float_8(__m256 x) {
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

/* One row (nb super-blocks) times column pairs (a[p], b[p]), p < pairs <= CHUNK; the row's
 * results go to ya[p], yb[p]. */
TARGET static void row_pairs(int64_t nb, const q6_K *x, const q8_K *const *a, const q8_K *const *b, int pairs,
                             float *const *ya, float *const *yb) {
    __m512 acc[CHUNK];
    for (int p = 0; p < pairs; p++) {
        acc[p] = _mm512_setzero_ps();
    }
    const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15);
    for (int64_t i = 0; i < nb; i++) {
        const q6_K *blk = x + i;
        __m512i q[8], s[8];
        for (int j = 0; j < 2; j++) { /* values j*128 + 32t .. +31 in q[4j + t], as 6-bit unsigned */
            const __m256i lo1 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * j));
            const __m256i lo2 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * j + 32));
            const __m256i hi = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * j));
            const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(hi, m3), 4);
            const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(12)), 2);
            const __m256i h2 = _mm256_and_si256(hi, _mm256_set1_epi8(48));
            const __m256i h3 = _mm256_srli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(-64)), 2);
            q[4 * j + 0] = both_halves(_mm256_or_si256(_mm256_and_si256(lo1, m15), h0));
            q[4 * j + 1] = both_halves(_mm256_or_si256(_mm256_and_si256(lo2, m15), h1));
            q[4 * j + 2] = both_halves(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo1, 4), m15), h2));
            q[4 * j + 3] = both_halves(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo2, 4), m15), h3));
        }
        const __m128i scales = _mm_loadu_si128((const __m128i *)blk->scales);
        for (int t = 0; t < 8; t++) { /* 16-bit lanes 0-7: scales[2t], 8-15: scales[2t + 1] */
            const __m128i spread = _mm_loadu_si128((const __m128i *)SPREAD[t]);
            s[t] = both_halves(_mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, spread)));
        }
        const __m512i scales16 = both_halves(_mm256_cvtepi8_epi16(scales));
        const float d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(blk->d)));
        for (int p = 0; p < pairs; p++) {
            const q8_K *ca = a[p] + i, *cb = b[p] + i;
            __m512i sumi = _mm512_setzero_si512();
            for (int t = 0; t < 8; t++) {
                const __m512i p16 = _mm512_maddubs_epi16(q[t], two_columns(ca->qs + 32 * t, cb->qs + 32 * t));
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(s[t], p16));
            }
            const __m512i bsums = two_columns(ca->bsums, cb->bsums);
            sumi = _mm512_sub_epi32(sumi, _mm512_slli_epi32(_mm512_madd_epi16(bsums, scales16), 5));
            const __m512 dd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(ca->d * d), _mm512_set1_ps(cb->d * d));
            acc[p] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi), acc[p]);
        }
    }
    for (int p = 0; p < pairs; p++) {
        *ya[p] = hsum_float_8(_mm512_castps512_ps256(acc[p]));
        *yb[p] = hsum_float_8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[p]), 1)));
    }
}

/* Rows [first, last) of plain Q6_K rows (row_bytes apart, nb super-blocks each) times n columns
 * of q8_K rows (column j at xq + j * x_stride), into y (column j at y + j * y_stride floats). */
void fc_q6_K_rows(int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                  size_t x_stride, int64_t n, float *y, size_t y_stride) {
    const q8_K *a[CHUNK], *b[CHUNK];
    float *ya[CHUNK], *yb[CHUNK];
    float spare; /* where an odd column count's last pair writes its twin */
    for (int64_t j0 = 0; j0 < n; j0 += 2 * CHUNK) {
        const int64_t m = n - j0 < 2 * CHUNK ? n - j0 : 2 * CHUNK;
        const int pairs = (int)((m + 1) / 2);
        for (int64_t r = first; r < last; r++) {
            for (int p = 0; p < pairs; p++) {
                const int64_t ja = j0 + 2 * p, jb = ja + 1 < j0 + m ? ja + 1 : ja;
                a[p] = (const q8_K *)((const char *)xq + ja * x_stride);
                b[p] = (const q8_K *)((const char *)xq + jb * x_stride);
                ya[p] = y + ja * y_stride + r;
                yb[p] = jb == ja ? &spare : y + jb * y_stride + r;
            }
            row_pairs(nb, (const q6_K *)((const char *)w + r * row_bytes), a, b, pairs, ya, yb);
        }
    }
}

#else /* other CPUs, or a compiler without these targets: never available */

int fc_q6_K_available(void) { return 0; }

void fc_q6_K_rows(int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                  size_t x_stride, int64_t n, float *y, size_t y_stride) {
    (void)nb, (void)w, (void)row_bytes, (void)first, (void)last, (void)xq, (void)x_stride, (void)n, (void)y,
        (void)y_stride;
}

#endif
