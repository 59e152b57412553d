/* Several activation columns through one matrix, each column with the bits that ggml's
 * one-column product gives it, the weights brought into cache once for all of them.
 *
 * ggml multiplies a batch of columns on kernels whose order of accumulation depends on the
 * batch (repacked weights: a gemm for each group of 4 columns; plain K-quants: a tiled kernel
 * from 8), so a token's logits would depend on what shares its pass. Here every column goes
 * through the very function ggml runs for a lone column (the repacked layout's gemv, or the
 * type's vec_dot for plain rows), whose addresses flashcli/engine/columns.py looks up in ggml
 * and hands over: this file only orders the calls, a tile of rows at a time for every column
 * while the tile is in cache. Nothing here is CPU-specific, so it builds with the system
 * compiler and no flags; what the kernels do is ggml's build's business. One exception, for
 * speed: Q4_K in ggml's 8x8 layout has a kernel of our own (q4_K_8x8.c) that shares a group's
 * unpacked weights between columns, with the gemv's order of rounding; columns.py uses it only
 * where its bits equal ggml's.
 *
 * Both entry points are ggml custom ops (ggml_custom_4d), run by ggml's threads inside a graph:
 *   fc_quantize_columns: x [d, n] float32 -> the activation type's rows, as ggml quantizes a
 *                        lone column (the type's from_float over the whole row); for our own
 *                        kernels, whose activations are q8_K (quantized a super-block at a time,
 *                        each block on its own values alone), the n columns' blocks b side by
 *                        side: a kernel then reads a block of every column from one run of
 *                        memory (the 8B's Q6_K ffn_down at 64 columns: 22.6 ms a product
 *                        against 27.4 with columns a row apart, scripts/bench/columns.py);
 *   fc_product_columns:  (w [d, rows], quantized x [d, n]) -> y [rows, n] float32, each
 *                        thread a contiguous share of the rows (whole interleaved groups).
 */
#include <stddef.h>
#include <stdint.h>

#include "blocks.h"

#define FC_COLUMNS_ABI 4

/* ggml_tensor's fields up to `extra`, as flashcli/engine/ggml_bindings.py mirrors them;
 * columns.py compares fc_tensor_offsets() with that mirror before using this library. */
struct fc_tensor {
    int type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
    int op;
    int32_t op_params[16];
    int32_t flags;
    struct fc_tensor *src[10];
    struct fc_tensor *view_src;
    size_t view_offs;
    void *data;
    char name[64];
    void *extra;
    char padding[8];
};

typedef void (*fc_from_float)(const float *x, void *y, int64_t k);
typedef void (*fc_gemv)(int n, float *s, size_t bs, const void *vx, const void *vy, int nr, int nc);
typedef void (*fc_vec_dot)(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by,
                           int nrc);

struct fc_columns {
    fc_from_float quantize; /* the activation type's from_float */
    fc_gemv gemv;           /* repacked rows: ggml's gemv for the layout (NULL for plain rows) */
    fc_vec_dot vec_dot;     /* plain rows: the weight type's vec_dot */
    int64_t group;          /* rows a gemv call must start on a multiple of (the interleave; 1 plain) */
    int64_t tile_bytes;     /* bytes of weight rows run through every column before the next tile */
    int64_t fused;          /* our own kernel instead: Q4_K in ggml's 8x8 layout (q4_K_8x8.c) 1 on AVX2, 3 on
                               AVX-512 VNNI; plain Q6_K (q6_K.c) 2 on AVX2, 4 on AVX-512, 5 on AVX-512
                               VNNI */
};

void fc_q4_K_8x8_rows(int vnni, int64_t nb, const void *w, int64_t first, int64_t last, const void *xq, size_t x_stride,
                      int64_t stride, int64_t n, float *y, size_t y_stride);
void fc_q6_K_rows(int kernel, int64_t nb, const void *w, size_t row_bytes, int64_t first, int64_t last, const void *xq,
                  size_t x_stride, int64_t stride, int64_t n, float *y, size_t y_stride);

int fc_columns_abi(void) { return FC_COLUMNS_ABI; }

void fc_tensor_offsets(int64_t out[5]) {
    out[0] = (int64_t)offsetof(struct fc_tensor, ne);
    out[1] = (int64_t)offsetof(struct fc_tensor, nb);
    out[2] = (int64_t)offsetof(struct fc_tensor, src);
    out[3] = (int64_t)offsetof(struct fc_tensor, data);
    out[4] = (int64_t)sizeof(struct fc_tensor);
}

void fc_quantize_columns(struct fc_tensor *dst, int ith, int nth, void *userdata) {
    const struct fc_columns *k = (const struct fc_columns *)userdata;
    const struct fc_tensor *x = dst->src[0];
    const int64_t n = x->ne[1], nb = x->ne[0] / QK_K;
    for (int64_t j = ith; j < n; j += nth) {
        const float *column = (const float *)((const char *)x->data + j * x->nb[1]);
        if (!k->fused) {
            k->quantize(column, (char *)dst->data + j * dst->nb[1], x->ne[0]);
            continue;
        }
        for (int64_t b = 0; b < nb; b++) { /* block b of column j after block b of columns 0 .. j - 1 */
            k->quantize(column + b * QK_K, (q8_K *)dst->data + b * n + j, QK_K);
        }
    }
}

void fc_product_columns(struct fc_tensor *dst, int ith, int nth, void *userdata) {
    const struct fc_columns *k = (const struct fc_columns *)userdata;
    const struct fc_tensor *w = dst->src[0];
    const struct fc_tensor *xq = dst->src[1];
    const int64_t d = w->ne[0], rows = w->ne[1], n = xq->ne[1];
    const size_t row_bytes = w->nb[1];
    /* this thread's rows: a contiguous share of whole groups */
    const int64_t groups = rows / k->group;
    const int64_t first = (groups * ith / nth) * k->group;
    const int64_t last = (groups * (ith + 1) / nth) * k->group;
    /* our kernels' columns: fc_quantize_columns' blocks side by side */
    const size_t column_step = sizeof(q8_K), block_step = (size_t)n * sizeof(q8_K);
    if (k->fused == 1 || k->fused == 3) {
        fc_q4_K_8x8_rows(k->fused == 3, d / QK_K, w->data, first / 8, last / 8, xq->data, column_step, block_step, n,
                         (float *)dst->data, dst->nb[1] / sizeof(float));
        return;
    }
    if (k->fused == 2 || k->fused == 4 || k->fused == 5) {
        fc_q6_K_rows(k->fused == 5 ? 2 : k->fused == 4, d / QK_K, w->data, row_bytes, first, last, xq->data,
                     column_step, block_step, n, (float *)dst->data, dst->nb[1] / sizeof(float));
        return;
    }
    int64_t tile = (k->tile_bytes / (int64_t)row_bytes) / k->group * k->group;
    if (tile < k->group) {
        tile = k->group;
    }
    for (int64_t r0 = first; r0 < last; r0 += tile) {
        const int64_t r1 = r0 + tile < last ? r0 + tile : last;
        const char *rows_at = (const char *)w->data + r0 * row_bytes;
        for (int64_t j = 0; j < n; j++) {
            const char *column = (const char *)xq->data + j * xq->nb[1];
            float *out = (float *)((char *)dst->data + j * dst->nb[1]) + r0;
            if (k->gemv) {
                k->gemv((int)d, out, (size_t)rows, rows_at, column, 1, (int)(r1 - r0));
            } else {
                for (int64_t r = 0; r < r1 - r0; r++) {
                    k->vec_dot((int)d, out + r, 0, rows_at + r * row_bytes, 0, column, 0, 1);
                }
            }
        }
    }
}
