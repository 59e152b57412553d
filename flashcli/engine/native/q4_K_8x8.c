/* Q4_K rows in ggml's 8x8 repacked layout (block_q4_Kx8) times several q8_K columns, each column
 * with the bits of ggml_gemv_q4_K_8x8_q8_K (ggml-cpu/arch/x86/repack.cpp, its AVX2 version),
 * the unpacked weights of a group of 8 rows shared by every column.
 *
 * Why the bits can be the same with other instructions: that gemv computes, per row r and
 * super-block b, two integers exactly (no intermediate can overflow: a 16-bit lane holds at most
 * 16 products of a 4-bit weight by an 8-bit activation, 16 * 15 * 128 < 32768):
 *     isum = sum over sub-blocks s of scale_s[r] * (sum of its 32 weight * activation products)
 *     imin = sum over sub-blocks s of min_s[r] * (bsums[2s] + bsums[2s + 1])
 * and only then rounds, in this order, with one fused multiply-add each:
 *     acc  = fma((float) isum, fp16(d[r]) * a.d, acc)
 *     accm = fma((float) imin, fp16(dmin[r]) * a.d, accm)
 * the row's result being acc - accm after the last super-block. Integers are the same whatever
 * instructions sum them, so only those float steps must be kept, and are, here. Whether ggml's
 * gemv on this machine is that one is not assumed: columns.py checks the bits before use.
 *
 * Two kernels, the same integers and float steps: one on AVX-512 VNNI (8 rows to a vector: a
 * sub-block's products summed by vpdpbusd, 16 to a lane, two sub-blocks' sums packed to 16 bits
 * and multiplied by their scales with one vpdpwssd), one on AVX2 alone (4 rows to a vector,
 * vpmaddubsw then vpmaddwd); each is built for its instructions whatever the compiler's default
 * target, and fc_q4_K_8x8_kernels() asks the CPU before either is called. Their loops over a
 * sub-block's four vectors are unrolled: rolled, the unpacked weights went through the stack
 * and took a third of the time at 16 columns and more.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"

#if defined(__x86_64__) && !defined(FC_NO_FUSED)
#include <immintrin.h>

#define CHUNK 32 /* columns whose accumulators live on the stack at a time */

typedef struct {
    uint16_t d[8];
    uint16_t dmin[8];
    uint8_t scales[96];
    uint8_t qs[1024];
} q4_Kx8;

/* Which of the two kernels below this CPU runs: bit 0 the AVX2 one, bit 1 the AVX-512 VNNI one. */
int fc_q4_K_8x8_kernels(void) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const int vnni = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return avx2 | vnni << 1;
}

/* The 6-bit scales and mins of sub-block s of the 8 rows: sc[r], mn[r] (ggml's decoding). */
static void scales_of(const uint8_t *packed, uint8_t sc[8], uint8_t mn[8]) {
    const uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
    uint32_t u[4];
    memcpy(u, packed, 12);
    u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
    const uint32_t aux = u[1] & kmask1;
    u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
    u[2] = aux;
    u[0] &= kmask1;
    memcpy(sc, u, 8);
    memcpy(mn, (const uint8_t *)u + 8, 8);
}

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

/* A super-block's scales sc[s][r] (sub-block s, row r) and its mins, those of sub-blocks 2p and
 * 2p + 1 side by side in row r's two 16-bit lanes of mins[p] (both kernels use them as they are). */
TARGET_AVX2 static void block_scales(const q4_Kx8 *blk, uint8_t sc[8][8], __m256i mins[4]) {
    uint8_t mn[8][8];
    for (int s = 0; s < 8; s++) {
        scales_of(blk->scales + 12 * s, sc[s], mn[s]);
    }
    for (int p = 0; p < 4; p++) {
        int64_t lo, hi;
        memcpy(&lo, mn[2 * p], 8);
        memcpy(&hi, mn[2 * p + 1], 8);
        const __m128i a = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(lo)), c = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(hi));
        mins[p] = _mm256_set_m128i(_mm_unpackhi_epi16(a, c), _mm_unpacklo_epi16(a, c));
    }
}

/* Column a's float steps for a super-block of the group, as ggml's gemv takes them: `rows` (the 8
 * rows' integer sums of scale x products) and the mins' integers (from a's block sums), each
 * rounded with one fused multiply-add into acc and accm. */
TARGET_AVX2 static inline __attribute__((always_inline)) void column_steps(__m256i rows, const __m256i mins[4],
                                                                         const q8_K *a, __m256 d, __m256 dmin,
                                                                         __m256 *acc, __m256 *accm) {
    const __m128i pairs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)a->bsums),
                                         _mm_loadu_si128((const __m128i *)(a->bsums + 8)));
    const __m256i bp = _mm256_broadcastsi128_si256(pairs);
    __m256i imin = _mm256_madd_epi16(mins[0], _mm256_shuffle_epi32(bp, 0x00));
    imin = _mm256_add_epi32(imin, _mm256_madd_epi16(mins[1], _mm256_shuffle_epi32(bp, 0x55)));
    imin = _mm256_add_epi32(imin, _mm256_madd_epi16(mins[2], _mm256_shuffle_epi32(bp, 0xAA)));
    imin = _mm256_add_epi32(imin, _mm256_madd_epi16(mins[3], _mm256_shuffle_epi32(bp, 0xFF)));
    const __m256 ad = _mm256_set1_ps(a->d);
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows), _mm256_mul_ps(d, ad), *acc);
    *accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin), _mm256_mul_ps(dmin, ad), *accm);
}

/* The scales of sub-blocks lo and hi (8 rows each) as packs(lo sums, hi sums) lays the sums out:
 * 128-bit lane L holds rows 2L and 2L + 1, each row's sum in two 16-bit lanes, lo's then hi's. */
TARGET static __m512i pair_scales(const uint8_t lo[8], const uint8_t hi[8]) {
    int64_t l, h;
    memcpy(&l, lo, 8);
    memcpy(&h, hi, 8);
    const __m256i spread = _mm256_setr_epi8(0, 0, 1, 1, 8, 8, 9, 9, 2, 2, 3, 3, 10, 10, 11, 11, /* rows 0-3 */
                                            4, 4, 5, 5, 12, 12, 13, 13, 6, 6, 7, 7, 14, 14, 15, 15 /* rows 4-7 */);
    const __m128i both = _mm_set_epi64x(h, l);
    return _mm512_cvtepu8_epi16(_mm256_shuffle_epi8(_mm256_set_m128i(both, both), spread));
}

/* Rows [8] of one group (nb super-blocks) times columns cols[0..n) (blocks `stride` bytes apart),
 * n <= CHUNK; row r of column j goes to out[j][r]. */
TARGET static void group_chunk_vnni(int64_t nb, const q4_Kx8 *blocks, const q8_K *const *cols, int64_t stride, int n,
                                    float *const *out) {
    __m256 acc[CHUNK], accm[CHUNK];
    __m512i isum[CHUNK];
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < n; j++) {
        acc[j] = _mm256_setzero_ps();
        accm[j] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const q4_Kx8 *blk = blocks + b;
        uint8_t sc[8][8];
        __m256i mins[4];
        block_scales(blk, sc, mins);
        for (int j = 0; j < n; j++) {
            isum[j] = _mm512_setzero_si512();
        }
        for (int sb = 0; sb < 4; sb++) {
            const __m512i s = pair_scales(sc[2 * sb], sc[2 * sb + 1]);
            __m512i wl[4], wh[4];
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) { /* 8 rows x 8 bytes: values 8k..8k+7 of sub-blocks 2sb (low), 2sb+1 */
                const __m512i raw = _mm512_loadu_si512((const void *)(blk->qs + (sb * 4 + k) * 64));
                wl[k] = _mm512_and_si512(raw, m4);
                wh[k] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            }
            for (int j = 0; j < n; j++) {
                const int8_t *a = block_of(cols[j], b, stride)->qs + sb * 64;
                __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int k = 0; k < 4; k++) {
                    int64_t al, ah;
                    memcpy(&al, a + 8 * k, 8);
                    memcpy(&ah, a + 32 + 8 * k, 8);
                    lo = _mm512_dpbusd_epi32(lo, wl[k], _mm512_set1_epi64(al));
                    hi = _mm512_dpbusd_epi32(hi, wh[k], _mm512_set1_epi64(ah));
                }
                /* a lane of lo or hi: 16 products, |sum| <= 16 * 15 * 128 < 2^15: 16 bits hold it */
                isum[j] = _mm512_dpwssd_epi32(isum[j], _mm512_packs_epi32(lo, hi), s);
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk->d));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk->dmin));
        for (int j = 0; j < n; j++) {
            const q8_K *a = block_of(cols[j], b, stride);
            /* rows 2L, 2L + 1 in lanes 0, 1 of 128-bit lane L (lo's and hi's added), put in order */
            const __m512i t = _mm512_add_epi32(isum[j], _mm512_bsrli_epi128(isum[j], 8));
            const __m512i order = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13);
            column_steps(_mm512_castsi512_si256(_mm512_permutexvar_epi32(order, t)), mins, a, d, dmin, &acc[j],
                         &accm[j]);
        }
    }
    for (int j = 0; j < n; j++) {
        _mm256_storeu_ps(out[j], _mm256_sub_ps(acc[j], accm[j]));
    }
}

/* Rows 4h..4h+3's scales, each over its four 16-bit lanes. */
TARGET_AVX2 static __m256i half_scales(const uint8_t sc[8], int h) {
    int32_t v;
    memcpy(&v, sc + 4 * h, 4);
    const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_cvtsi32_si128(v), spread));
}

/* group_chunk_vnni on AVX2: each 64 bytes of weights as two vectors (rows 0-3, rows 4-7), a
 * column's integers in two vectors of 8 lanes (row 4h + l/2 in lane l of half h). */
TARGET_AVX2 static void group_chunk_avx2(int64_t nb, const q4_Kx8 *blocks, const q8_K *const *cols, int64_t stride,
                                         int n, float *const *out) {
    __m256 acc[CHUNK], accm[CHUNK];
    __m256i isum[CHUNK][2];
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < n; j++) {
        acc[j] = _mm256_setzero_ps();
        accm[j] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const q4_Kx8 *blk = blocks + b;
        uint8_t sc[8][8];
        __m256i mins[4];
        block_scales(blk, sc, mins);
        for (int j = 0; j < n; j++) {
            isum[j][0] = isum[j][1] = _mm256_setzero_si256();
        }
        for (int sb = 0; sb < 4; sb++) {
            for (int h = 0; h < 2; h++) {
                const __m256i s_lo = half_scales(sc[2 * sb], h), s_hi = half_scales(sc[2 * sb + 1], h);
                __m256i wl[4], wh[4];
#pragma GCC unroll 4
                for (int k = 0; k < 4; k++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk->qs + (sb * 4 + k) * 64 + 32 * h));
                    wl[k] = _mm256_and_si256(raw, m4);
                    wh[k] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                }
                for (int j = 0; j < n; j++) {
                    const int8_t *a = block_of(cols[j], b, stride)->qs + sb * 64;
                    __m256i t = isum[j][h];
#pragma GCC unroll 4
                    for (int k = 0; k < 4; k++) {
                        int64_t al, ah;
                        memcpy(&al, a + 8 * k, 8);
                        memcpy(&ah, a + 32 + 8 * k, 8);
                        t = _mm256_add_epi32(t, _mm256_madd_epi16(_mm256_maddubs_epi16(wl[k], _mm256_set1_epi64x(al)), s_lo));
                        t = _mm256_add_epi32(t, _mm256_madd_epi16(_mm256_maddubs_epi16(wh[k], _mm256_set1_epi64x(ah)), s_hi));
                    }
                    isum[j][h] = t;
                }
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk->d));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk->dmin));
        for (int j = 0; j < n; j++) {
            const q8_K *a = block_of(cols[j], b, stride);
            /* lane pairs added: rows 0 1 4 5 | 2 3 6 7, then the 64-bit elements put in row order */
            column_steps(_mm256_permute4x64_epi64(_mm256_hadd_epi32(isum[j][0], isum[j][1]), 0xD8), mins, a, d, dmin,
                         &acc[j], &accm[j]);
        }
    }
    for (int j = 0; j < n; j++) {
        _mm256_storeu_ps(out[j], _mm256_sub_ps(acc[j], accm[j]));
    }
}

/* Row groups [first, last) (of 8 rows, nb super-blocks each) times n columns of q8_K blocks
 * (column j's first at xq + j * x_stride, the next `stride` bytes on), into y (column j at
 * y + j * y_stride floats, row 8g + r), on the AVX-512 VNNI kernel (vnni) or the AVX2 one. */
void fc_q4_K_8x8_rows(int vnni, int64_t nb, const void *w, int64_t first, int64_t last, const void *xq, size_t x_stride,
                      int64_t stride, int64_t n, float *y, size_t y_stride) {
    const q8_K *cols[CHUNK];
    float *out[CHUNK];
    for (int64_t g = first; g < last; g++) {
        const q4_Kx8 *blocks = (const q4_Kx8 *)w + g * nb;
        for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
            const int m = (int)(n - j0 < CHUNK ? n - j0 : CHUNK);
            for (int j = 0; j < m; j++) {
                cols[j] = (const q8_K *)((const char *)xq + (j0 + j) * x_stride);
                out[j] = y + (j0 + j) * y_stride + g * 8;
            }
            (vnni ? group_chunk_vnni : group_chunk_avx2)(nb, blocks, cols, stride, m, out);
        }
    }
}

#else /* other CPUs, or a compiler without these targets: never available */

int fc_q4_K_8x8_kernels(void) { return 0; }

void fc_q4_K_8x8_rows(int vnni, int64_t nb, const void *w, int64_t first, int64_t last, const void *xq, size_t x_stride,
                      int64_t stride, int64_t n, float *y, size_t y_stride) {
    (void)vnni, (void)nb, (void)w, (void)first, (void)last, (void)xq, (void)x_stride, (void)stride, (void)n, (void)y,
        (void)y_stride;
}

#endif
