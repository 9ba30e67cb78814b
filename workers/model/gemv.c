/* Few-row GEMMs y = scale · (x · Wᵀ) + b for a decode step (x: [n, in] fp32, W: [out, in] in fp32, fp16 or
 * int8; or x, W and y all bf16, summed in fp32), AVX2 + FMA + F16C, threads splitting W's rows. Built at run
 * time by workers.model.native_gemv and raced there against torch's kernels like every other candidate; its oracle
 * is F.linear.
 *
 * A decode step streams every weight once: the work is reading W, so each block of ROWS weight rows is read
 * once for all n token rows, each 8 loaded tokens serving ROWS rows. `prefetch` > 0 asks for the rows `prefetch`
 * blocks ahead while a block is summed (int8 and fp16 rows are too short for the hardware prefetcher to ramp
 * up on; whether it helps is measured, not assumed: the caller races both). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef __m256 (*load8_fn)(const void *w, int64_t k); /* weights k..k+8 of a row, widened to fp32 */
typedef float (*load1_fn)(const void *w, int64_t k);

static inline __m256 load8_f32(const void *w, int64_t k) { return _mm256_loadu_ps((const float *)w + k); }
static inline __m256 load8_f16(const void *w, int64_t k) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k)));
}
static inline __m256 load8_i8(const void *w, int64_t k) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + k))));
}
static inline __m256 load8_bf16(const void *w, int64_t k) { /* bf16 is fp32's upper half: widening is a shift */
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t f32_to_bf16(float f) { /* rounded to nearest even, as torch rounds; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
static inline float load1_f32(const void *w, int64_t k) { return ((const float *)w)[k]; }
static inline float load1_bf16(const void *w, int64_t k) { return bf16_to_f32(((const uint16_t *)w)[k]); }
static inline float load1_f16(const void *w, int64_t k) { return _cvtsh_ss(((const uint16_t *)w)[k]); }
static inline float load1_i8(const void *w, int64_t k) { return (float)((const int8_t *)w)[k]; }

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#define ROWS 4 /* weight rows per block */

/* y[i] = v, y fp32, or bf16 (rounded) where y_bf16 (a constant in each caller) */
static inline __attribute__((always_inline)) void store_y(void *y, int64_t i, float v, int y_bf16) {
    if (y_bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

/* x bf16 [count] widened into a new fp32 buffer (the caller frees it); NULL if out of memory */
static float *widen_bf16(const uint16_t *x, int64_t count) {
    float *wide = malloc((size_t)count * sizeof(float));
    if (wide)
        for (int64_t i = 0; i < count; i++) wide[i] = bf16_to_f32(x[i]);
    return wide;
}

/* y[r, o:o+m] for every token row r from the block's ROWS weight rows already in fp32 (wf[j]: row j's `in` weights);
 * token rows two at a time, each loaded weight serving both (rows past n repeat the last, not stored) */
static inline __attribute__((always_inline)) void gemv_rows_fp32(
        const float *const *wf, const float *x, const float *scale, const float *b, void *y, int y_bf16, int64_t n,
        int64_t out, int64_t in, int64_t o, int64_t m) {
    int64_t vec_end = in - in % 8;
    for (int64_t r = 0; r < n; r += 2) {
        const float *x0 = x + r * in, *x1 = x + (r + 1 < n ? r + 1 : r) * in;
        __m256 a[ROWS], c[ROWS];
        for (int j = 0; j < ROWS; j++) a[j] = c[j] = _mm256_setzero_ps();
        for (int64_t k = 0; k < vec_end; k += 8) {
            __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k);
            for (int j = 0; j < ROWS; j++) {
                __m256 wv = _mm256_loadu_ps(wf[j] + k);
                a[j] = _mm256_fmadd_ps(wv, u, a[j]);
                c[j] = _mm256_fmadd_ps(wv, v, c[j]);
            }
        }
        for (int64_t j = 0; j < m; j++) {
            float s0 = sum8(a[j]), s1 = sum8(c[j]);
            for (int64_t k = vec_end; k < in; k++) {
                s0 += wf[j][k] * x0[k];
                s1 += wf[j][k] * x1[k];
            }
            float sc = scale ? scale[o + j] : 1.0f, bias = b ? b[o + j] : 0.0f;
            store_y(y, r * out + o + j, s0 * sc + bias, y_bf16);
            if (r + 1 < n) store_y(y, (r + 1) * out + o + j, s1 * sc + bias, y_bf16);
        }
    }
}

/* y[r, o:o+ROWS] for every token row r; inlined into each public function with its loads as constants.
 * One token row: each block row streamed once, widened as it is read. More: the block's rows widened once into
 * an fp32 buffer (read in place when already fp32), then gemv_rows_fp32 (widening per token row would repeat
 * the conversion n times). */
static inline __attribute__((always_inline)) void gemv_block(
        load8_fn load8, load1_fn load1, int64_t wsize, const float *x, const void *w, const float *scale,
        const float *b, void *y, int y_bf16, int64_t n, int64_t out, int64_t in, int64_t o, int64_t prefetch) {
    int64_t m = out - o < ROWS ? out - o : ROWS, vec_end = in - in % 8, ahead = prefetch * ROWS * in * wsize;
    const char *wr[ROWS]; /* the block's rows; past the end of W, repeats of its first row (not stored) */
    for (int j = 0; j < ROWS; j++) wr[j] = (const char *)w + (o + (j < m ? j : 0)) * in * wsize;
    if (n > 1) {
        float buf[wsize == 4 ? 1 : ROWS * in];
        const float *wf[ROWS];
        for (int j = 0; j < ROWS; j++) {
            if (wsize == 4) {
                wf[j] = (const float *)wr[j];
                continue;
            }
            float *row = buf + j * in;
            for (int64_t k = 0; k < vec_end; k += 8) {
                if (prefetch && ((k * wsize) & 63) == 0) _mm_prefetch(wr[j] + k * wsize + ahead, _MM_HINT_T0);
                _mm256_storeu_ps(row + k, load8(wr[j], k));
            }
            for (int64_t k = vec_end; k < in; k++) row[k] = load1(wr[j], k);
            wf[j] = row;
        }
        gemv_rows_fp32(wf, x, scale, b, y, y_bf16, n, out, in, o, m);
        return;
    }
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < vec_end; k += 8) {
        if (prefetch && ((k * wsize) & 63) == 0) /* once per cache line */
            for (int j = 0; j < ROWS; j++) _mm_prefetch(wr[j] + k * wsize + ahead, _MM_HINT_T0);
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(load8(wr[0], k), xv, a0);
        a1 = _mm256_fmadd_ps(load8(wr[1], k), xv, a1);
        a2 = _mm256_fmadd_ps(load8(wr[2], k), xv, a2);
        a3 = _mm256_fmadd_ps(load8(wr[3], k), xv, a3);
    }
    float acc[ROWS] = {sum8(a0), sum8(a1), sum8(a2), sum8(a3)};
    for (int64_t k = vec_end; k < in; k++)
        for (int j = 0; j < ROWS; j++) acc[j] += load1(wr[j], k) * x[k];
    for (int64_t j = 0; j < m; j++)
        store_y(y, o + j, acc[j] * (scale ? scale[o + j] : 1.0f) + (b ? b[o + j] : 0.0f), y_bf16);
}

/* W fp32 [out, in]; b [out] or NULL */
void gemv_f32(const float *x, const float *w, const float *b, float *y, int64_t n, int64_t out, int64_t in,
              int64_t prefetch, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o += ROWS)
        gemv_block(load8_f32, load1_f32, 4, x, w, 0, b, y, 0, n, out, in, o, prefetch);
}

/* W IEEE fp16 [out, in] (as raw 16-bit words) */
void gemv_f16(const float *x, const uint16_t *w, const float *b, float *y, int64_t n, int64_t out, int64_t in,
              int64_t prefetch, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o += ROWS)
        gemv_block(load8_f16, load1_f16, 2, x, w, 0, b, y, 0, n, out, in, o, prefetch);
}

/* W int8 [out, in] with one fp32 scale per output row: y = scale · (x · Wᵀ) + b */
void gemv_i8(const float *x, const int8_t *w, const float *scale, const float *b, float *y, int64_t n, int64_t out,
             int64_t in, int64_t prefetch, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o += ROWS)
        gemv_block(load8_i8, load1_i8, 1, x, w, scale, b, y, 0, n, out, in, o, prefetch);
}

/* W, x and y bf16 (x widened once, sums in fp32, y rounded once, as torch's bf16 GEMMs do); returns nonzero, having
 * written nothing, if the widened x did not fit in memory */
int gemv_bf16(const uint16_t *x16, const uint16_t *w, const float *b, uint16_t *y, int64_t n, int64_t out, int64_t in,
              int64_t prefetch, int threads) {
    float *x = widen_bf16(x16, n * in);
    if (!x) return 1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o += ROWS)
        gemv_block(load8_bf16, load1_bf16, 2, x, w, 0, b, y, 1, n, out, in, o, prefetch);
    free(x);
    return 0;
}

/* acc[j] = row j of one packed block (wb: [ceil(in/8)][ROWS][8], zero padded) · x [in], for the ROWS rows;
 * ahead > 0: prefetch that many bytes ahead, once per cache line */
static inline __attribute__((always_inline)) void packed_dot4(load8_fn load8, load1_fn load1, int64_t wsize,
                                                              const float *x, const char *wb, int64_t in,
                                                              int64_t ahead, float *acc) {
    int64_t full = in / 8, chunk_bytes = ROWS * 8 * wsize;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < full; c++) {
        const char *wc = wb + c * chunk_bytes;
        if (ahead && ((c * chunk_bytes) & 63) == 0) _mm_prefetch(wc + ahead, _MM_HINT_T0);
        __m256 xv = _mm256_loadu_ps(x + c * 8);
        a0 = _mm256_fmadd_ps(load8(wc, 0), xv, a0);
        a1 = _mm256_fmadd_ps(load8(wc, 8), xv, a1);
        a2 = _mm256_fmadd_ps(load8(wc, 16), xv, a2);
        a3 = _mm256_fmadd_ps(load8(wc, 24), xv, a3);
    }
    acc[0] = sum8(a0), acc[1] = sum8(a1), acc[2] = sum8(a2), acc[3] = sum8(a3);
    const char *tail = wb + full * chunk_bytes; /* the last, zero-padded chunk: x has no padding */
    for (int64_t k = full * 8; k < in; k++)
        for (int j = 0; j < ROWS; j++) acc[j] += load1(tail, j * 8 + k - full * 8) * x[k];
}

/* The same GEMMs over W packed by rows (workers.model.native_gemv.pack_rows): [ceil(out/ROWS)][ceil(in/8)][ROWS][8],
 * zero padded, so that each block's ROWS rows are one sequential stream instead of ROWS short ones (rows of
 * 576 int8 weights are 9 cache lines: too short for the hardware prefetcher, which a single stream keeps busy). */
static inline __attribute__((always_inline)) void gemv_packed_block(
        load8_fn load8, load1_fn load1, int64_t wsize, const float *x, const void *w, const float *scale,
        const float *b, void *y, int y_bf16, int64_t n, int64_t out, int64_t in, int64_t blk, int64_t prefetch) {
    int64_t chunks = (in + 7) / 8, chunk_bytes = ROWS * 8 * wsize, o = blk * ROWS;
    int64_t m = out - o < ROWS ? out - o : ROWS, ahead = prefetch * chunks * chunk_bytes;
    const char *wb = (const char *)w + blk * chunks * chunk_bytes;
    if (n > 1) { /* as gemv_block: the block widened once (here also unpacked into rows), then two token rows at once */
        float buf[ROWS * chunks * 8];
        const float *wf[ROWS];
        for (int64_t c = 0; c < chunks; c++) {
            const char *wc = wb + c * chunk_bytes;
            if (prefetch && ((c * chunk_bytes) & 63) == 0) _mm_prefetch(wc + ahead, _MM_HINT_T0);
            for (int j = 0; j < ROWS; j++) _mm256_storeu_ps(buf + j * chunks * 8 + c * 8, load8(wc, j * 8));
        }
        for (int j = 0; j < ROWS; j++) wf[j] = buf + j * chunks * 8;
        gemv_rows_fp32(wf, x, scale, b, y, y_bf16, n, out, in, o, m);
        return;
    }
    float acc[ROWS];
    packed_dot4(load8, load1, wsize, x, wb, in, prefetch ? ahead : 0, acc);
    for (int64_t j = 0; j < m; j++)
        store_y(y, o + j, acc[j] * (scale ? scale[o + j] : 1.0f) + (b ? b[o + j] : 0.0f), y_bf16);
}

#define PACKED(name, type, load8, load1, wsize)                                                                   \
    void name(const float *x, const type *w, const float *scale, const float *b, float *y, int64_t n, int64_t out, \
              int64_t in, int64_t prefetch, int threads) {                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                         \
        for (int64_t blk = 0; blk < (out + ROWS - 1) / ROWS; blk++)                                               \
            gemv_packed_block(load8, load1, wsize, x, w, scale, b, y, 0, n, out, in, blk, prefetch);              \
    }
PACKED(gemv_f32_packed, float, load8_f32, load1_f32, 4)
PACKED(gemv_f16_packed, uint16_t, load8_f16, load1_f16, 2)
PACKED(gemv_i8_packed, int8_t, load8_i8, load1_i8, 1) /* scale [out]: one per row; NULL for the float formats */

/* gemv_bf16 over packed W (scale unused: NULL, as for every float format) */
int gemv_bf16_packed(const uint16_t *x16, const uint16_t *w, const float *scale, const float *b, uint16_t *y, int64_t n,
                     int64_t out, int64_t in, int64_t prefetch, int threads) {
    float *x = widen_bf16(x16, n * in);
    if (!x) return 1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < (out + ROWS - 1) / ROWS; blk++)
        gemv_packed_block(load8_bf16, load1_bf16, 2, x, w, scale, b, y, 1, n, out, in, blk, prefetch);
    free(x);
    return 0;
}

#define LORA_ROWS 64 /* bank rows a decode row's expand sums in one pass over y */

static inline __attribute__((always_inline)) __m256 load8_as(const void *w, int64_t k, int bf16) {
    return bf16 ? load8_bf16(w, k) : load8_f32(w, k);
}
static inline __attribute__((always_inline)) float load1_as(const void *w, int64_t k, int bf16) {
    return bf16 ? load1_bf16(w, k) : load1_f32(w, k);
}

/* h[j] *= a_rows[j] · x for j < m: four bank rows at a time (independent sums, each loaded x serving four) */
static inline __attribute__((always_inline)) void lora_shrink(const void *const *a_rows, const float *x, float *h,
                                                              int m, int64_t in, int bf16) {
    int64_t vec_end = in - in % 8;
    for (int j = 0; j < m; j += 4) {
        const void *r[4];
        for (int q = 0; q < 4; q++) r[q] = a_rows[j + q < m ? j + q : j]; /* past m: repeats, not stored */
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t k = 0; k < vec_end; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            s0 = _mm256_fmadd_ps(load8_as(r[0], k, bf16), xv, s0);
            s1 = _mm256_fmadd_ps(load8_as(r[1], k, bf16), xv, s1);
            s2 = _mm256_fmadd_ps(load8_as(r[2], k, bf16), xv, s2);
            s3 = _mm256_fmadd_ps(load8_as(r[3], k, bf16), xv, s3);
        }
        float d[4] = {sum8(s0), sum8(s1), sum8(s2), sum8(s3)};
        for (int64_t k = vec_end; k < in; k++)
            for (int q = 0; q < 4; q++) d[q] += load1_as(r[q], k, bf16) * x[k];
        for (int q = 0; q < 4 && j + q < m; q++) h[j + q] *= d[q];
    }
}

/* y[o] += Σ_j h[j] · b_rows[j][o] in fp32 (y fp32, or bf16 read widened and stored rounded): 32 outputs at a time
 * (four independent sums, each row read 128 bytes at a time), then 8, then one */
static inline __attribute__((always_inline)) void lora_expand(const void *const *b_rows, const float *h, int m,
                                                              void *y, int64_t out, int bf16) {
    int64_t o = 0;
    for (; o + 32 <= out; o += 32) {
        __m256 c[4];
        for (int t = 0; t < 4; t++) c[t] = load8_as(y, o + 8 * t, bf16);
        for (int j = 0; j < m; j++) {
            __m256 hj = _mm256_set1_ps(h[j]);
            for (int t = 0; t < 4; t++) c[t] = _mm256_fmadd_ps(hj, load8_as(b_rows[j], o + 8 * t, bf16), c[t]);
        }
        for (int t = 0; t < 4; t++) {
            if (!bf16) {
                _mm256_storeu_ps((float *)y + o + 8 * t, c[t]);
                continue;
            }
            float lanes[8];
            _mm256_storeu_ps(lanes, c[t]);
            for (int l = 0; l < 8; l++) store_y(y, o + 8 * t + l, lanes[l], 1);
        }
    }
    for (; o < out; o++) {
        float acc = load1_as(y, o, bf16);
        for (int j = 0; j < m; j++) acc += h[j] * load1_as(b_rows[j], o, bf16);
        store_y(y, o, acc, bf16);
    }
}

/* LoRA for decode rows, BGMV: y[i] += Σ_j mask[i, j] · (a[rows[i, j]] · x[i]) · bt[rows[i, j]] for each decode row i
 * (x [bd, in], y [bd, out], a [bank, in], bt [bank, out], rows and mask [bd, width]; mask 0 on padding). Each row
 * reads its own adapter's rows once, straight from the bank (no gathered copies); threads split the rows.
 * bf16 (a constant in each caller): x, y, a, bt and mask bf16, sums in fp32, y rounded once.
 * Returns the number of bank rows out of [0, bank): nonzero means nothing was written. */
static inline __attribute__((always_inline)) int64_t lora_bgmv(
        const void *x, const void *a, const void *bt, const int64_t *rows, const void *mask, void *y, int64_t bd,
        int64_t width, int64_t in, int64_t out, int64_t bank, int threads, int bf16) {
    int64_t outside = 0, esize = bf16 ? 2 : 4;
    for (int64_t k = 0; k < bd * width; k++) outside += rows[k] < 0 || rows[k] >= bank;
    if (outside) return outside;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < bd; i++) {
        float xi[in];
        for (int64_t k = 0; k < in; k++) xi[k] = load1_as(x, i * in + k, bf16);
        for (int64_t j0 = 0; j0 < width; j0 += LORA_ROWS) {
            float h[LORA_ROWS];
            const void *ar[LORA_ROWS], *br[LORA_ROWS];
            int m = 0;
            for (int64_t j = j0; j < width && j < j0 + LORA_ROWS; j++) {
                float w = load1_as(mask, i * width + j, bf16);
                if (w == 0.0f) continue; /* padding */
                h[m] = w;
                ar[m] = (const char *)a + rows[i * width + j] * in * esize;
                br[m++] = (const char *)bt + rows[i * width + j] * out * esize;
            }
            lora_shrink(ar, xi, h, m, in, bf16);
            lora_expand(br, h, m, (char *)y + i * out * esize, out, bf16);
        }
    }
    return 0;
}

int64_t lora_bgmv_f32(const float *x, const float *a, const float *bt, const int64_t *rows, const float *mask,
                      float *y, int64_t bd, int64_t width, int64_t in, int64_t out, int64_t bank, int threads) {
    return lora_bgmv(x, a, bt, rows, mask, y, bd, width, in, out, bank, threads, 0);
}

int64_t lora_bgmv_bf16(const uint16_t *x, const uint16_t *a, const uint16_t *bt, const int64_t *rows,
                       const uint16_t *mask, uint16_t *y, int64_t bd, int64_t width, int64_t in, int64_t out,
                       int64_t bank, int threads) {
    return lora_bgmv(x, a, bt, rows, mask, y, bd, width, in, out, bank, threads, 1);
}

/* lora_bgmv over banks packed by rows (workers.model.native_gemv.pack_rows: a [ceil(bank/4)][ceil(in/8)][4][8], bt
 * [ceil(bank/4)][ceil(out/8)][4][8], zero padded): each decode row's bank rows grouped by their block of four, so
 * that the shrink and the expand read each block once as one sequential stream (an adapter of rank 16: four
 * streams where the row-major banks need sixteen). y is summed in fp32 and stored once. */
static inline __attribute__((always_inline)) int64_t lora_bgmv_packed(
        const void *x, const void *a, const void *bt, const int64_t *rows, const void *mask, void *y, int64_t bd,
        int64_t width, int64_t in, int64_t out, int64_t bank, int threads, int bf16) {
    int64_t outside = 0, esize = bf16 ? 2 : 4, in_block = (in + 7) / 8 * ROWS * 8 * esize;
    int64_t out_chunks = (out + 7) / 8, out_full = out / 8, out_block = out_chunks * ROWS * 8 * esize;
    for (int64_t k = 0; k < bd * width; k++) outside += rows[k] < 0 || rows[k] >= bank;
    if (outside) return outside;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < bd; i++) {
        float xi[in], yf[out], h[width > 0 ? width : 1][ROWS];
        int64_t blk[width > 0 ? width : 1];
        int nb = 0;
        for (int64_t j = 0; j < width; j++) { /* the row's blocks, and each block's lanes' mask weights */
            float w = load1_as(mask, i * width + j, bf16);
            if (w == 0.0f) continue; /* padding */
            int64_t b = rows[i * width + j] / ROWS, k = nb - 1;
            while (k >= 0 && blk[k] != b) k--; /* an adapter's rows are consecutive: found at the end first */
            if (k < 0) {
                k = nb++;
                blk[k] = b;
                for (int l = 0; l < ROWS; l++) h[k][l] = 0.0f;
            }
            h[k][rows[i * width + j] % ROWS] += w;
        }
        if (nb == 0) continue;
        for (int64_t k = 0; k < in; k++) xi[k] = load1_as(x, i * in + k, bf16);
        for (int k = 0; k < nb; k++) { /* shrink: h = mask weight · (A row · x), four rows per block */
            float d[ROWS];
            if (bf16) packed_dot4(load8_bf16, load1_bf16, 2, xi, (const char *)a + blk[k] * in_block, in, 0, d);
            else packed_dot4(load8_f32, load1_f32, 4, xi, (const char *)a + blk[k] * in_block, in, 0, d);
            for (int l = 0; l < ROWS; l++) h[k][l] *= d[l];
        }
        for (int64_t o = 0; o < out; o++) yf[o] = load1_as(y, i * out + o, bf16);
        for (int k = 0; k < nb; k++) { /* expand: y += Σ_l h[l] · Bᵀ row l, the block read in order */
            const char *bb = (const char *)bt + blk[k] * out_block;
            __m256 h0 = _mm256_set1_ps(h[k][0]), h1 = _mm256_set1_ps(h[k][1]);
            __m256 h2 = _mm256_set1_ps(h[k][2]), h3 = _mm256_set1_ps(h[k][3]);
            for (int64_t c = 0; c < out_full; c++) {
                const char *bc = bb + c * ROWS * 8 * esize;
                __m256 acc = _mm256_fmadd_ps(h0, load8_as(bc, 0, bf16), _mm256_loadu_ps(yf + c * 8));
                acc = _mm256_fmadd_ps(h1, load8_as(bc, 8, bf16), acc);
                acc = _mm256_fmadd_ps(h2, load8_as(bc, 16, bf16), acc);
                _mm256_storeu_ps(yf + c * 8, _mm256_fmadd_ps(h3, load8_as(bc, 24, bf16), acc));
            }
            const char *tail = bb + out_full * ROWS * 8 * esize; /* the last, zero-padded chunk */
            for (int64_t o = out_full * 8; o < out; o++)
                for (int l = 0; l < ROWS; l++) yf[o] += h[k][l] * load1_as(tail, l * 8 + o - out_full * 8, bf16);
        }
        for (int64_t o = 0; o < out; o++) store_y(y, i * out + o, yf[o], bf16);
    }
    return 0;
}

int64_t lora_bgmv_packed_f32(const float *x, const float *a, const float *bt, const int64_t *rows, const float *mask,
                             float *y, int64_t bd, int64_t width, int64_t in, int64_t out, int64_t bank, int threads) {
    return lora_bgmv_packed(x, a, bt, rows, mask, y, bd, width, in, out, bank, threads, 0);
}

int64_t lora_bgmv_packed_bf16(const uint16_t *x, const uint16_t *a, const uint16_t *bt, const int64_t *rows,
                              const uint16_t *mask, uint16_t *y, int64_t bd, int64_t width, int64_t in, int64_t out,
                              int64_t bank, int threads) {
    return lora_bgmv_packed(x, a, bt, rows, mask, y, bd, width, in, out, bank, threads, 1);
}

/* The small ops of a decoder layer, each one call instead of a handful of torch ops (workers.model.layer_kernels,
 * raced there against torch's; oracles: RMSNorm.reference, apply_rope_reference and KVCache.write_reference). */

/* sum = x + d (d NULL: sum = x, not written), h = sum · rsqrt(mean(sum²) + eps) · w; rows of `dim` fp32 */
void add_rms_norm_f32(const float *x, const float *d, const float *w, float *sum, float *h, int64_t n, int64_t dim,
                      float eps, int threads) {
    #pragma omp parallel for schedule(static) if (n > 1) num_threads(threads)
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * dim, *dr = d ? d + r * dim : 0;
        float *sr = d ? sum + r * dim : (float *)xr, *hr = h + r * dim;
        __m256 sq = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= dim; k += 8) {
            __m256 v = _mm256_loadu_ps(xr + k);
            if (dr) _mm256_storeu_ps(sr + k, v = _mm256_add_ps(v, _mm256_loadu_ps(dr + k)));
            sq = _mm256_fmadd_ps(v, v, sq);
        }
        float ss = sum8(sq);
        for (; k < dim; k++) {
            float v = xr[k] + (dr ? dr[k] : 0.0f);
            if (dr) sr[k] = v;
            ss += v * v;
        }
        float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        __m256 s8 = _mm256_set1_ps(scale);
        for (k = 0; k + 8 <= dim; k += 8)
            _mm256_storeu_ps(hr + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(sr + k), s8), _mm256_loadu_ps(w + k)));
        for (; k < dim; k++) hr[k] = sr[k] * scale * w[k];
    }
}

/* add_rms_norm_f32 in bf16, rounding where RMSNorm.reference does in bf16: sum = bf16(x + d); the norm in fp32,
 * rounded to bf16, then h = bf16(w · it) */
void add_rms_norm_bf16(const uint16_t *x, const uint16_t *d, const uint16_t *w, uint16_t *sum, uint16_t *h, int64_t n,
                       int64_t dim, float eps, int threads) {
    #pragma omp parallel for schedule(static) if (n > 1) num_threads(threads)
    for (int64_t r = 0; r < n; r++) {
        const uint16_t *xr = x + r * dim, *dr = d ? d + r * dim : 0;
        uint16_t *sr = d ? sum + r * dim : (uint16_t *)xr, *hr = h + r * dim;
        float ss = 0.0f;
        for (int64_t k = 0; k < dim; k++) {
            float v = bf16_to_f32(xr[k]);
            if (dr) v = bf16_to_f32(sr[k] = f32_to_bf16(v + bf16_to_f32(dr[k])));
            ss += v * v;
        }
        float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t k = 0; k < dim; k++)
            hr[k] = f32_to_bf16(bf16_to_f32(w[k]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(sr[k]) * scale)));
    }
}

/* x [n, heads, dim] rotated in place, token t by row t of cos and signed_sin [n, dim]:
 * x·cos + roll(x, dim/2)·signed_sin; bf16 (a constant in each caller): every tensor bf16, rounded where apply_rope
 * rounds in bf16, bf16(bf16(x·cos) + roll(x)·signed_sin) */
static inline __attribute__((always_inline)) void rope_rows(void *x, const void *cos, const void *sin, int64_t n,
                                                            int64_t heads, int64_t dim, int bf16) {
    int64_t half = dim / 2;
    float wide[dim];
    for (int64_t t = 0; t < n; t++)
        for (int64_t h = 0; h < heads; h++) {
            int64_t row = (t * heads + h) * dim;
            for (int64_t k = 0; k < dim; k++) wide[k] = load1_as(x, row + k, bf16);
            for (int64_t k = 0; k < dim; k++) {
                float c = load1_as(cos, t * dim + k, bf16);
                float s = load1_as(sin, t * dim + k, bf16);
                float scaled = bf16 ? bf16_to_f32(f32_to_bf16(wide[k] * c)) : wide[k] * c;
                store_y(x, row + k, scaled + wide[(k + half) % dim] * s, bf16);
            }
        }
}

/* Rows of `rows` [count] outside [0, cache_rows) */
static int64_t rows_outside(const int64_t *rows, int64_t count, int64_t cache_rows) {
    int64_t outside = 0;
    for (int64_t i = 0; i < count; i++) outside += rows[i] < 0 || rows[i] >= cache_rows;
    return outside;
}

/* k and v [count, dim] (elements of `esize` bytes) copied into rows `rows` of kc and vc */
static void write_rows(const void *k, const void *v, void *kc, void *vc, const int64_t *rows, int64_t count,
                       int64_t dim, int64_t esize) {
    int64_t bytes = dim * esize;
    for (int64_t i = 0; i < count; i++) {
        memcpy((char *)kc + rows[i] * bytes, (const char *)k + i * bytes, bytes);
        memcpy((char *)vc + rows[i] * bytes, (const char *)v + i * bytes, bytes);
    }
}

/* q [n, hq, dim] and k [n, hk, dim] rotated in place; then k and v [n, hk, dim] copied into the cache rows
 * `rows` [n · hk] of kc and vc (a layer's cache viewed as [cache_rows, dim]). Returns the number of rows outside
 * [0, cache_rows): nonzero means nothing was written. */
int64_t rope_write_f32(float *q, float *k, const float *v, const float *cos, const float *sin, float *kc, float *vc,
                       const int64_t *rows, int64_t n, int64_t hq, int64_t hk, int64_t dim, int64_t cache_rows) {
    int64_t outside = rows_outside(rows, n * hk, cache_rows);
    if (outside) return outside;
    rope_rows(q, cos, sin, n, hq, dim, 0);
    rope_rows(k, cos, sin, n, hk, dim, 0);
    write_rows(k, v, kc, vc, rows, n * hk, dim, sizeof(float));
    return 0;
}

/* rope_write_f32 in bf16 (every tensor bf16) */
int64_t rope_write_bf16(uint16_t *q, uint16_t *k, const uint16_t *v, const uint16_t *cos, const uint16_t *sin,
                        uint16_t *kc, uint16_t *vc, const int64_t *rows, int64_t n, int64_t hq, int64_t hk, int64_t dim,
                        int64_t cache_rows) {
    int64_t outside = rows_outside(rows, n * hk, cache_rows);
    if (outside) return outside;
    rope_rows(q, cos, sin, n, hq, dim, 1);
    rope_rows(k, cos, sin, n, hk, dim, 1);
    write_rows(k, v, kc, vc, rows, n * hk, dim, sizeof(uint16_t));
    return 0;
}

/* Decode attention, one query token per row (workers.model.attention_kernels; oracle: SDPA): out [bd, hq, dim] =
 * softmax(q · Kᵀ / √dim, masked) · V, query head h reading kv head h / (hq / hk). Keys and values [bd, hk, len, dim]
 * with positions contiguous (rows `row_stride`, heads `head_stride` elements apart: views of the cache); mask [bd,
 * len] bytes (0: not attended) or NULL. `threads` split the (row, kv head) pairs (1: no parallel region).
 * bf16 (a constant in each caller): q, keys, values and out bf16, every sum in fp32, out rounded once. */
static inline __attribute__((always_inline)) void decode_attention(
        const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int64_t bd, int64_t hq,
        int64_t hk, int64_t len, int64_t dim, int64_t row_stride, int64_t head_stride, int threads, int bf16) {
    int64_t group = hq / hk, esize = bf16 ? 2 : 4;
    float scale = 1.0f / sqrtf((float)dim);
    #pragma omp parallel for schedule(static) if (threads > 1) num_threads(threads)
    for (int64_t pair = 0; pair < bd * hk; pair++) {
        int64_t i = pair / hk, g = pair % hk, vec_end = dim - dim % 8;
        const char *kg = (const char *)k + (i * row_stride + g * head_stride) * esize;
        const char *vg = (const char *)v + (i * row_stride + g * head_stride) * esize;
        const uint8_t *m = mask ? mask + i * len : 0;
        float p[len], qh[dim], o[dim];
        for (int64_t h = g * group; h < (g + 1) * group; h++) {
            for (int64_t c = 0; c < dim; c++) qh[c] = load1_as(q, (i * hq + h) * dim + c, bf16);
            float top = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < len; s++) {
                if (m && !m[s]) {
                    p[s] = -INFINITY;
                    continue;
                }
                const void *ks = kg + s * dim * esize;
                __m256 acc = _mm256_setzero_ps();
                for (int64_t c = 0; c < vec_end; c += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c), load8_as(ks, c, bf16), acc);
                float d = sum8(acc);
                for (int64_t c = vec_end; c < dim; c++) d += qh[c] * load1_as(ks, c, bf16);
                p[s] = d * scale;
                top = p[s] > top ? p[s] : top;
            }
            for (int64_t s = 0; s < len; s++) total += p[s] = p[s] == -INFINITY ? 0.0f : expf(p[s] - top);
            float inv = 1.0f / total;
            for (int64_t c = 0; c < dim; c++) o[c] = 0.0f;
            for (int64_t s = 0; s < len; s++) {
                if (p[s] == 0.0f) continue;
                __m256 w8 = _mm256_set1_ps(p[s] * inv);
                const void *vs = vg + s * dim * esize;
                for (int64_t c = 0; c < vec_end; c += 8)
                    _mm256_storeu_ps(o + c, _mm256_fmadd_ps(w8, load8_as(vs, c, bf16), _mm256_loadu_ps(o + c)));
                for (int64_t c = vec_end; c < dim; c++) o[c] += p[s] * inv * load1_as(vs, c, bf16);
            }
            for (int64_t c = 0; c < dim; c++) store_y(out, (i * hq + h) * dim + c, o[c], bf16);
        }
    }
}

void decode_attention_f32(const float *q, const float *k, const float *v, const uint8_t *mask, float *out, int64_t bd,
                          int64_t hq, int64_t hk, int64_t len, int64_t dim, int64_t row_stride, int64_t head_stride,
                          int threads) {
    decode_attention(q, k, v, mask, out, bd, hq, hk, len, dim, row_stride, head_stride, threads, 0);
}

void decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                           int64_t bd, int64_t hq, int64_t hk, int64_t len, int64_t dim, int64_t row_stride,
                           int64_t head_stride, int threads) {
    decode_attention(q, k, v, mask, out, bd, hq, hk, len, dim, row_stride, head_stride, threads, 1);
}
