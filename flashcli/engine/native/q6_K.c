/* Plain Q6_K rows times several q8_K columns, each column with the bits of
 * ggml_vec_dot_q6_K_q8_K (ggml-cpu/arch/x86/quants.c, its AVX2 version): a super-block of 4 rows
 * unpacked once for every column, two rows to a 512-bit vector, and each column's block read once
 * for the 4 rows (broadcast to both halves). One row a pass re-read every column for every row:
 * at 64 columns those reads, not the weights, set the pace (0.40-0.54x ggml's batched kernel).
 * The columns' blocks come side by side (columns.c); with VNNI a vpdpwssd does each madd and add.
 * The same steps on AVX2 alone, a row to a vector: q6_K_avx2.c.
 *
 * Why the bits can be the same: that dot product keeps, per super-block, 8 integer lanes, lane m
 * holding exactly (nothing overflows) the sum over the block's 8 chunks of 32 values of
 *     scale(chunk, m) * (products of values 4m..4m+3 of the chunk)
 * minus 32 * (bsums[2m] * scales[2m] + bsums[2m + 1] * scales[2m + 1]), and then rounds, with one
 * fused multiply-add per lane, acc[m] = fma(a.d * fp16(d), (float) lane, acc[m]); the result is
 * acc's 8 lanes added in the order of ggml's hsum_float_8. The same integers, however summed,
 * and the same float steps give the same bits; columns.py checks them against ggml before use.
 */
#include "q6_K.h"

#if defined(__x86_64__) && !defined(FC_NO_FUSED)

/* rows a pass over the columns: 2 * ROW_PAIRS; on the Xeon here 4 rows were 5-10% faster than 2
 * at 16 and 64 columns and 6 no faster (within the noise of a shared machine) */
#ifndef ROW_PAIRS
#define ROW_PAIRS 2
#endif

/* Which of the kernels below this CPU runs: bit 0 the AVX2 one, bit 1 the AVX-512 one, bit 2 the
 * AVX-512 one with VNNI's vpdpwssd. */
int fc_q6_K_kernels(void) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const int wide = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    const int vnni = wide && __builtin_cpu_supports("avx512vnni");
    return avx2 | wide << 1 | vnni << 2;
}

#define TARGET __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define INLINE TARGET static inline __attribute__((always_inline))

/* 32 bytes of row a in the low half, the same 32 bytes of row b in the high half */
INLINE __m512i two_rows(const void *a, const void *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

INLINE __m512i two_rows_16(__m128i a, __m128i b) {
    return _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
}

/* acc + a and b's 16-bit lanes multiplied and summed in pairs: the integers madd then add give, in
 * one vpdpwssd (asm: the kernel that uses it is built for AVX-512 alone and runs only where
 * fc_q6_K_kernels() found VNNI) */
INLINE __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* One super-block of two rows, unpacked: row a in each vector's low 256 bits, row b in the high */
typedef struct {
    __m512i q[8]; /* values 32t .. 32t + 31 as 6-bit unsigned */
    __m512i s[8]; /* 16-bit lanes 0-7 of each half: scales[2t], 8-15: scales[2t + 1] */
    __m512i minus_scales32; /* -32 * scales[] in 16 bits (|32 * scale| <= 4096): see row_pairs */
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
    u->minus_scales32 = _mm512_sub_epi16(_mm512_setzero_si512(), _mm512_slli_epi16(two_rows_16(sa, sb), 5));
    u->d = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(fp16(a->d)), _mm512_set1_ps(fp16(b->d)));
}

/* `pairs` row pairs (a[k], b[k]) times columns c[0 .. n) (blocks `stride` bytes apart), n <=
 * COLUMN_CHUNK, column j's results at ya[k] + j * y_stride and yb[k] + j * y_stride (yb[k] NULL:
 * row b is row a again, unwritten): each column's q8_K block read once for all the rows, each
 * row's 8 integer lanes and float steps as ggml's one-column kernel has them. Inlined with `vnni`
 * and `pairs` constants, the loops over pairs and chunks unrolled (the sums stay in registers:
 * measured 10-15% faster at 16 and 64 columns); with vnni, a vpdpwssd for each madd and add. */
INLINE void row_pairs(const int vnni, const int pairs, int64_t nb, const q6_K *const *a, const q6_K *const *b,
                      const q8_K *const *c, int64_t stride, int n, float *const *ya, float *const *yb, size_t y_stride,
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
            const q8_K *col = block_of(c[j], i, stride);
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
                    sumi[k] = vnni ? dpwssd(sumi[k], u[k].s[t], p16)
                                   : _mm512_add_epi32(sumi[k], _mm512_madd_epi16(u[k].s[t], p16));
                }
            }
            const __m512i bsums = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)col->bsums));
            const __m512 dc = _mm512_set1_ps(col->d);
#pragma GCC unroll 4
            for (int k = 0; k < pairs; k++) {
                /* the values' -32 offset: lane m less 32 * (bsums[2m] * scales[2m] + bsums[2m + 1] *
                 * scales[2m + 1]), exactly (|bsums| <= 2048: no product or pair sum overflows) */
                sumi[k] = vnni ? dpwssd(sumi[k], bsums, u[k].minus_scales32)
                               : _mm512_add_epi32(sumi[k], _mm512_madd_epi16(bsums, u[k].minus_scales32));
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

/* row_pairs with its constants: ROW_PAIRS pairs or one, with or without VNNI */
#define ROW_PAIRS_OF(name, vnni, pairs)                                                                                \
    TARGET static void name(int64_t nb, const q6_K *const *a, const q6_K *const *b, const q8_K *const *c,             \
                            int64_t stride, int n, float *const *ya, float *const *yb, size_t y_stride,               \
                            const char *ahead, int64_t ahead_bytes) {                                                  \
        row_pairs(vnni, pairs, nb, a, b, c, stride, n, ya, yb, y_stride, ahead, ahead_bytes);                          \
    }
ROW_PAIRS_OF(row_pairs_full, 0, ROW_PAIRS)
ROW_PAIRS_OF(row_pairs_one, 0, 1)
ROW_PAIRS_OF(row_pairs_full_vnni, 1, ROW_PAIRS)
ROW_PAIRS_OF(row_pairs_one_vnni, 1, 1)

/* fc_q6_K_rows on AVX-512: 2 * ROW_PAIRS rows at a time over every column, then the rest a pair
 * at a time (an odd last row paired with itself). */
static void rows_wide(int vnni, int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last,
                      const void *xq, size_t x_stride, int64_t stride, int64_t n, float *y, size_t y_stride) {
    __typeof__(row_pairs_full) *full = vnni ? row_pairs_full_vnni : row_pairs_full;
    __typeof__(row_pairs_one) *one = vnni ? row_pairs_one_vnni : row_pairs_one;
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
                full(nb, a, b, c, stride, m, ya, yb, y_stride, ahead, bytes);
            } else {
                for (int p = 0; p < k; p++) {
                    one(nb, a + p, b + p, c, stride, m, ya + p, yb + p, y_stride, NULL, 0);
                }
            }
        }
    }
}
/* Rows [first, last) of plain Q6_K rows (row_bytes apart, nb super-blocks each) times n columns
 * of q8_K blocks (column j's first at xq + j * x_stride, the next `stride` bytes on), into y
 * (column j at y + j * y_stride floats), on the AVX2 kernel (kernel 0), the AVX-512 one (1) or the
 * AVX-512 one with VNNI (2). */
void fc_q6_K_rows(int kernel, int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                  size_t x_stride, int64_t stride, int64_t n, float *y, size_t y_stride) {
    if (kernel) {
        rows_wide(kernel == 2, nb, w, row_bytes, first, last, xq, x_stride, stride, n, y, y_stride);
    } else {
        fc_q6_K_rows_avx2(nb, w, row_bytes, first, last, xq, x_stride, stride, n, y, y_stride);
    }
}

#else /* other CPUs, or a compiler without these targets: never available */

int fc_q6_K_kernels(void) { return 0; }

void fc_q6_K_rows(int kernel, int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                  size_t x_stride, int64_t stride, int64_t n, float *y, size_t y_stride) {
    (void)kernel, (void)nb, (void)w, (void)row_bytes, (void)first, (void)last, (void)xq, (void)x_stride, (void)stride,
        (void)n, (void)y, (void)y_stride;
}

#endif