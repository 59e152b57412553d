/* Two builds of the columns library (flashcli/engine/native) timed against each other on one
 * thread, alternated product by product, so that a machine whose speed drifts (these do, by 30%
 * within minutes) moves both alike: the figure to read is the ratio B/A of their medians.
 *
 *   cc -O2 -fPIC -shared -o /tmp/A.so flashcli/engine/native/[a-z]*.c   (one tree, e.g. a worktree)
 *   cc -O2 -fPIC -shared -o /tmp/B.so flashcli/engine/native/[a-z]*.c   (the other)
 *   cc -O2 -o /tmp/columns_ab studies/columns_ab.c -ldl
 *   /tmp/columns_ab /tmp/A.so /tmp/B.so q4|q6 D ROWS COLUMNS KERNEL REPS
 *
 * q4: fc_q4_K_8x8_rows (KERNEL 1: AVX-512 VNNI, 0: AVX2); q6: fc_q6_K_rows (2: AVX-512 VNNI,
 * 1: AVX-512, 0: AVX2). Weights are random bytes with every fp16 scale 2^-4 (no NaN or subnormal
 * to slow the float steps), in copies together past 256 MiB so that each product reads them from
 * DRAM, as a model's pass does; columns are random q8_K blocks laid side by side as the quantize
 * op lays them (columns.c). Speed only: the bits are tests/test_columns.py's business.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef void (*q4_rows)(int, int64_t, const void *, int64_t, int64_t, const void *, size_t, int64_t, int64_t, float *,
                        size_t);
typedef void (*q6_rows)(int, int64_t, const void *, size_t, int64_t, int64_t, const void *, size_t, int64_t, int64_t,
                        float *, size_t);

enum { Q8_K_BYTES = 292, Q4_K_BYTES = 144, Q6_K_BYTES = 210, MAX_REPS = 1000 };

static uint64_t state = 1;
static uint8_t next_byte(void) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint8_t)(state >> 56);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s A.so B.so q4|q6 D ROWS COLUMNS KERNEL REPS\n", argv[0]);
        return 2;
    }
    const int q4 = strcmp(argv[3], "q4") == 0, kernel = atoi(argv[7]), reps = atoi(argv[8]);
    const int64_t d = atol(argv[4]), rows = atol(argv[5]), n = atol(argv[6]), nb = d / 256;
    void *lib[2] = {dlopen(argv[1], RTLD_NOW | RTLD_LOCAL), dlopen(argv[2], RTLD_NOW | RTLD_LOCAL)};
    if (!lib[0] || !lib[1] || reps < 1 || reps > MAX_REPS || d % 256 || (q4 && rows % 8)) {
        fprintf(stderr, "%s\n", !lib[0] || !lib[1] ? dlerror() : "bad D, ROWS or REPS");
        return 2;
    }
    const size_t row_bytes = (size_t)nb * (q4 ? Q4_K_BYTES : Q6_K_BYTES), matrix = row_bytes * (size_t)rows;
    const int copies = (int)((256u << 20) / matrix) + 1;
    uint8_t *w = malloc(matrix * copies), *x = malloc((size_t)(Q8_K_BYTES * nb * n));
    float *y = malloc(sizeof(float) * (size_t)(rows * n));
    for (size_t i = 0; i < matrix * copies; i++) {
        w[i] = next_byte();
    }
    const uint16_t scale = 0x2c00; /* 2^-4 in fp16 */
    if (q4) { /* block_q4_Kx8: d[8], dmin[8] first */
        for (size_t g = 0; g < matrix * copies / (8 * Q4_K_BYTES); g++) {
            for (int r = 0; r < 16; r++) {
                memcpy(w + g * 8 * Q4_K_BYTES + 2 * r, &scale, 2);
            }
        }
    } else { /* block_q6_K: d last */
        for (size_t b = 0; b < matrix * copies / Q6_K_BYTES; b++) {
            memcpy(w + b * Q6_K_BYTES + Q6_K_BYTES - 2, &scale, 2);
        }
    }
    for (int64_t b = 0; b < nb * n; b++) { /* block_q8_K: d, qs[256], bsums[16] */
        uint8_t *blk = x + b * Q8_K_BYTES;
        const float dx = 0.01f;
        memcpy(blk, &dx, 4);
        for (int i = 0; i < 256; i++) {
            blk[4 + i] = next_byte();
        }
        for (int i = 0; i < 16; i++) {
            const int16_t sum = (int16_t)(next_byte() * 8 - 1024);
            memcpy(blk + 4 + 256 + 2 * i, &sum, 2);
        }
    }
    static double t[2][MAX_REPS];
    int used = 0;
    for (int r = 0; r < reps; r++) {
        for (int v = 0; v < 2; v++) {
            const uint8_t *wm = w + matrix * (size_t)(used++ % copies);
            const double t0 = now();
            if (q4) {
                ((q4_rows)dlsym(lib[v], "fc_q4_K_8x8_rows"))(kernel, nb, wm, 0, rows / 8, x, Q8_K_BYTES,
                                                            Q8_K_BYTES * n, n, y, (size_t)rows);
            } else {
                ((q6_rows)dlsym(lib[v], "fc_q6_K_rows"))(kernel, nb, wm, row_bytes, 0, rows, x, Q8_K_BYTES,
                                                        Q8_K_BYTES * n, n, y, (size_t)rows);
            }
            t[v][r] = now() - t0;
        }
    }
    qsort(t[0], reps, sizeof(double), by_value);
    qsort(t[1], reps, sizeof(double), by_value);
    printf("%s d=%ld rows=%ld columns=%ld kernel=%d: A %.3f ms, B %.3f ms, B/A %.3f (medians of %d)\n", argv[3],
           (long)d, (long)rows, (long)n, kernel, t[0][reps / 2] * 1e3, t[1][reps / 2] * 1e3,
           t[1][reps / 2] / t[0][reps / 2], reps);
    return 0;
}
