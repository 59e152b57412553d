/* Block layouts shared by the kernels: ggml's super-block size and its Q8_K activations
 * (block_q8_K in ggml-common.h), which both q4_K_8x8.c and q6_K.c multiply by. */
#ifndef FC_BLOCKS_H
#define FC_BLOCKS_H

#include <stdint.h>

#define QK_K 256

typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} q8_K;

/* A column's super-block b: columns come as the quantize op lays them out (columns.c), block b of
 * a column `stride` bytes after its block b - 1 */
static inline const q8_K *block_of(const q8_K *column, int64_t b, int64_t stride) {
    return (const q8_K *)((const char *)column + b * stride);
}

#endif
