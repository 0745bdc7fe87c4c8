/* int4 weights times int8 activations for the CPU: the products of edgevl's int4 precision
   (edgevl/engine/int4_kernel.py builds this file and calls it).

   A decode step multiplies one row by every weight of the language model, so its time is the time to read
   them: four bits a weight read half of int8's bytes.  torch's own int4 kernel computes in floating point and
   was bound by its unpacking, not by reading; this one multiplies whole integers with the CPU's int8 dot
   products (AVX-512 VNNI, else AVX2, else plain C).

   The weights: n outputs of k inputs.  Each output has a float scale, as an int8 row has; each group of 128
   inputs of an output has a whole step m (-16..16, never 0) and levels q in -8..7, so that every weight is the
   int8 value q * m times its output's scale.  The activations are quantized per row here, symmetric in int8
   (-127..127), so a row's outputs never depend on the other rows of a call.

   Layout, for the dot-product instructions: 16 outputs side by side, one in each 32-bit lane, each lane
   multiplying four consecutive inputs.  A block of 16 outputs holds, group after group, 16 chunks of 64 bytes;
   byte 4 * o + t of chunk c holds q + 8 of output o at input 4 * c + t of the group in its low four bits, and at
   input 64 + 4 * c + t in its high four.  The steps: per block, group after group, 16 bytes (one an output).

   Every instruction set computes the same integer, sum(q * m * x) over the row, exactly: within a group the
   products of q + 8 with x, less 8 * sum(x), then times m.  The output is that integer as a float, times the
   activations' step, times the output's scale, in that order: the same bits on every CPU. */

#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>

#define GROUP 128
#define LANES 16      /* outputs of a block: n is a multiple of it (the Python side checks) */
#define BLOCKS 2      /* blocks of one tile (AVX-512) */
/* How far ahead of a tile's reading its weights are asked for: a one-row step reads each byte once, and the
   hardware's own prefetching left it at 15 GB/s of a memory that reads at 21; two kilobytes ahead (the next
   group's chunks of each block) took a step of the 2B model's decoder layers from 49-55 ms to 41-46 (2-core
   Xeon, alternating in one process; four kilobytes and prefetching into L2 only were no better).  Many rows read
   a tile's weights from the cache again for every four rows: there it cost 256 rows a fifth of their rate.
   AVX-512's one-block tiles read on into the next block, which the same thread reads next: eight kilobytes ahead
   took the 2B decoder layers' one-row step from 13.1-13.4 ms to 11.2-12.6 (2-core AMD EPYC with AVX-512,
   alternating in one process; 16 and 32 kilobytes no better; into L2 only, 13.1; torch's sum of the same bytes,
   10.6). */
#define PREFETCH 2048
#define PREFETCH_512 8192

typedef struct {
    int64_t m, n, k, groups;
    const uint8_t *w;      /* n/16 blocks of k * 8 bytes */
    const int8_t *steps;   /* n/16 blocks of groups * 16 */
    const float *scales;   /* n */
    const int8_t *xq;      /* m x k */
    const float *xs;       /* m: each row's step */
    const int32_t *gsum;   /* m x groups: 8 * each group's sum of the row's x */
    float *out;            /* m x n */
} job;

static float output(int32_t total, float step, float scale) { return (float)total * step * scale; }

/* ---- the activations, quantized per row: the same bytes in every instruction set ---- */

static void quantize_row(const float *x, int64_t k, int8_t *q, float *step) {
    float high = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        float a = fabsf(x[i]);
        if (a > high) high = a; /* a NaN compares false and is left out of the range */
    }
    float s = high / 127.0f;
    if (!(s > 1e-12f) || isinf(s)) s = high > 0.0f && !isinf(high) ? 1e-12f : 1.0f;
    float inverse = 1.0f / s;
    for (int64_t i = 0; i < k; i++) {
        float v = nearbyintf(x[i] * inverse);
        q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : (v == v ? v : 0.0f)));
    }
    *step = s;
}

/* 16 values at a time: the same products with the inverse step, rounded half to even, a NaN as zero.  The scalar
   one calls nearbyintf for every value, which cost a prefill of 256 rows of 2,048 a tenth of its time. */
__attribute__((target("avx512f,avx512bw")))
static void quantize_row_512(const float *x, int64_t k, int8_t *q, float *step) {
    __m512 high = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)  /* max returns its second operand where the first is a NaN: left out */
        high = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), high);
    float top = _mm512_reduce_max_ps(high);
    for (; i < k; i++) if (fabsf(x[i]) > top) top = fabsf(x[i]);
    float s = top / 127.0f;
    if (!(s > 1e-12f) || isinf(s)) s = top > 0.0f && !isinf(top) ? 1e-12f : 1.0f;
    const float inverse = 1.0f / s;
    const __m512 scale = _mm512_set1_ps(inverse), lowest = _mm512_set1_ps(-127.0f), highest = _mm512_set1_ps(127.0f);
    for (i = 0; i + 16 <= k; i += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), scale),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);
        _mm_storeu_si128((__m128i *)(q + i),
                         _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lowest), highest))));
    }
    for (; i < k; i++) {
        float v = nearbyintf(x[i] * inverse);
        q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : (v == v ? v : 0.0f)));
    }
    *step = s;
}

/* The same with AVX2, 32 values at a time (four registers packed down to bytes; the packs interleave the
   registers' 128-bit lanes, which the last permutation puts back in order). */
__attribute__((target("avx2")))
static void quantize_row_256(const float *x, int64_t k, int8_t *q, float *step) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 high = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)  /* max returns its second operand where the first is a NaN: left out */
        high = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), magnitude), high);
    float lanes[8], top = 0.0f;
    _mm256_storeu_ps(lanes, high);
    for (int l = 0; l < 8; l++) if (lanes[l] > top) top = lanes[l];
    for (; i < k; i++) if (fabsf(x[i]) > top) top = fabsf(x[i]);
    float s = top / 127.0f;
    if (!(s > 1e-12f) || isinf(s)) s = top > 0.0f && !isinf(top) ? 1e-12f : 1.0f;
    const float inverse = 1.0f / s;
    const __m256 scale = _mm256_set1_ps(inverse), lowest = _mm256_set1_ps(-127.0f), highest = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (i = 0; i + 32 <= k; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; j++) {
            __m256 f = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), scale),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            f = _mm256_and_ps(f, _mm256_cmp_ps(f, f, _CMP_ORD_Q));  /* a NaN as zero */
            v[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(f, lowest), highest));
        }
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (; i < k; i++) {
        float v = nearbyintf(x[i] * inverse);
        q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : (v == v ? v : 0.0f)));
    }
    *step = s;
}

/* ---- AVX-512 VNNI: a tile of up to 4 rows by BLOCKS blocks of 16 outputs ---- */

#define T512 __attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline

T512 void tile_512(const job *J, int64_t r0, int rows, int64_t b0, int nb) {
    __m512i total[4][BLOCKS], acc[4][BLOCKS];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < nb; t++) total[r][t] = _mm512_setzero_si512();
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int64_t block_bytes = J->k * 8, block_steps = J->groups * LANES;
    for (int64_t g = 0; g < J->groups; g++) {
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < nb; t++) acc[r][t] = _mm512_setzero_si512();
        for (int c = 0; c < 16; c++) {
            __m512i lo[BLOCKS], hi[BLOCKS];
            for (int t = 0; t < nb; t++) {
                const uint8_t *chunk = J->w + (b0 + t) * block_bytes + (g * 16 + c) * 64;
                if (rows < 4)  /* a decode step's few rows; many rows read each tile's weights again from cache */
                    _mm_prefetch((const char *)(chunk + PREFETCH_512), _MM_HINT_T0);  /* past the end: harmless */
                __m512i packed = _mm512_loadu_si512(chunk);
                lo[t] = _mm512_and_si512(packed, low);
                hi[t] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
            }
            for (int r = 0; r < rows; r++) {
                const int8_t *x = J->xq + (r0 + r) * J->k + g * GROUP + 4 * c;
                __m512i x0 = _mm512_set1_epi32(*(const int32_t *)x), x1 = _mm512_set1_epi32(*(const int32_t *)(x + 64));
                for (int t = 0; t < nb; t++)
                    acc[r][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][t], lo[t], x0), hi[t], x1);
            }
        }
        for (int t = 0; t < nb; t++) {
            __m512i step = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(J->steps + (b0 + t) * block_steps
                                                                                    + g * LANES)));
            for (int r = 0; r < rows; r++) {
                __m512i s = _mm512_sub_epi32(acc[r][t], _mm512_set1_epi32(J->gsum[(r0 + r) * J->groups + g]));
                total[r][t] = _mm512_add_epi32(total[r][t], _mm512_mullo_epi32(s, step));
            }
        }
    }
    for (int t = 0; t < nb; t++) {
        const __m512 scale = _mm512_loadu_ps(J->scales + (b0 + t) * LANES);
        for (int r = 0; r < rows; r++) {
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(total[r][t]), _mm512_set1_ps(J->xs[r0 + r])),
                                     scale);
            _mm512_storeu_ps(J->out + (r0 + r) * J->n + (b0 + t) * LANES, v);
        }
    }
}

/* The tiles of every row of the nb blocks at b: each count of rows and blocks its own copy of the tile (the callers
   pass nb as a constant), so that its sums stay in registers. */
T512 void rows_512(const job *J, int64_t b, int nb) {
    int64_t r = 0;
    for (; r + 4 <= J->m; r += 4) tile_512(J, r, 4, b, nb);
    switch (J->m - r) {
        case 3: tile_512(J, r, 3, b, nb); break;
        case 2: tile_512(J, r, 2, b, nb); break;
        case 1: tile_512(J, r, 1, b, nb); break;
        default: break;
    }
}

/* A tile of BLOCKS blocks shares each row's broadcast inputs between them, which many rows need; a decode step's
   one to three rows read one block at a time instead, as one stream: two blocks read side by side took a one-row
   step of the 2B model's decoder layers 18.1-18.7 ms against 15.9-16.2 (2-core AMD EPYC with AVX-512, alternating
   in one process; torch's sum over the same bytes 15.1-15.6). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void blocks_512(const job *J, int64_t b0, int64_t b1) {
    const int nb = J->m < 4 ? 1 : BLOCKS;
    for (int64_t b = b0; b < b1; b += nb) {
        if (nb == BLOCKS && b + BLOCKS <= b1) rows_512(J, b, BLOCKS);
        else rows_512(J, b, 1);  /* a decode step's block, or the last of an odd count */
    }
}

/* ---- AVX2: a tile of up to 2 rows by one block of 16 outputs (two registers of 8 lanes) ----
   vpmaddubsw multiplies byte pairs of q + 8 (0..15) with x (-127..127) into 16 bits: at most 2 * 15 * 127 = 3810
   a lane, so eight of them (four chunks' low and high halves) sum in 16 bits exactly (30480) before vpmaddwd widens
   them to 32: one widening for four chunks instead of one a chunk.  The block is read whole, each 64-byte chunk
   once, and a one-row step prefetches as AVX-512's does.  Tiles of half a block, widened every chunk, read each
   line twice and took longer: 71 GFLOP/s against 105 at one row, 238 against 286 at 1,024 rows (2048x6144, a
   2-core AMD EPYC with AVX2, alternating in one process; a W4 frame 9.4 s against 8.4). */

#define T256 __attribute__((target("avx2"), always_inline)) static inline

T256 void tile_256(const job *J, int64_t r0, int rows, int64_t b) {
    __m256i total[2][2], acc[2][2], sum16[2][2];
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < 2; h++) total[r][h] = _mm256_setzero_si256();
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t block_bytes = J->k * 8, block_steps = J->groups * LANES;
    const uint8_t *block = J->w + b * block_bytes;
    for (int64_t g = 0; g < J->groups; g++) {
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < 2; h++) acc[r][h] = _mm256_setzero_si256();
        for (int c0 = 0; c0 < 16; c0 += 4) {
            for (int r = 0; r < rows; r++)
                for (int h = 0; h < 2; h++) sum16[r][h] = _mm256_setzero_si256();
            for (int c = c0; c < c0 + 4; c++) {
                const uint8_t *chunk = block + (g * 16 + c) * 64;
                if (rows < 2)  /* a decode step's row: each byte read once, from memory (see PREFETCH) */
                    _mm_prefetch((const char *)(chunk + PREFETCH), _MM_HINT_T0);
                __m256i lo[2], hi[2];
                for (int h = 0; h < 2; h++) {
                    __m256i packed = _mm256_loadu_si256((const __m256i *)(chunk + h * 32));
                    lo[h] = _mm256_and_si256(packed, low);
                    hi[h] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                }
                for (int r = 0; r < rows; r++) {
                    const int8_t *x = J->xq + (r0 + r) * J->k + g * GROUP + 4 * c;
                    __m256i x0 = _mm256_set1_epi32(*(const int32_t *)x), x1 = _mm256_set1_epi32(*(const int32_t *)(x + 64));
                    for (int h = 0; h < 2; h++)
                        sum16[r][h] = _mm256_add_epi16(sum16[r][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], x0),
                                                                                      _mm256_maddubs_epi16(hi[h], x1)));
                }
            }
            for (int r = 0; r < rows; r++)
                for (int h = 0; h < 2; h++) acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(sum16[r][h], ones));
        }
        for (int h = 0; h < 2; h++) {
            __m256i step = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(J->steps + b * block_steps
                                                                                   + g * LANES + h * 8)));
            for (int r = 0; r < rows; r++) {
                __m256i s = _mm256_sub_epi32(acc[r][h], _mm256_set1_epi32(J->gsum[(r0 + r) * J->groups + g]));
                total[r][h] = _mm256_add_epi32(total[r][h], _mm256_mullo_epi32(s, step));
            }
        }
    }
    for (int h = 0; h < 2; h++) {
        const __m256 scale = _mm256_loadu_ps(J->scales + b * LANES + h * 8);
        for (int r = 0; r < rows; r++) {
            __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(total[r][h]), _mm256_set1_ps(J->xs[r0 + r])),
                                     scale);
            _mm256_storeu_ps(J->out + (r0 + r) * J->n + b * LANES + h * 8, v);
        }
    }
}

__attribute__((target("avx2")))
static void blocks_256(const job *J, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t r = 0;
        for (; r + 2 <= J->m; r += 2) tile_256(J, r, 2, b);
        if (r < J->m) tile_256(J, r, 1, b);
    }
}

/* ---- any CPU: the same sums, one input at a time ---- */

static void blocks_plain(const job *J, int64_t b0, int64_t b1) {
    const int64_t block_bytes = J->k * 8, block_steps = J->groups * LANES;
    for (int64_t r = 0; r < J->m; r++)
        for (int64_t b = b0; b < b1; b++)
            for (int o = 0; o < LANES; o++) {
                int32_t total = 0;
                for (int64_t g = 0; g < J->groups; g++) {
                    const int8_t *x = J->xq + r * J->k + g * GROUP;
                    int32_t s = 0;
                    for (int c = 0; c < 16; c++)
                        for (int t = 0; t < 4; t++) {
                            uint8_t byte = J->w[b * block_bytes + (g * 16 + c) * 64 + 4 * o + t];
                            s += ((int32_t)(byte & 0x0F) - 8) * x[4 * c + t];
                            s += ((int32_t)(byte >> 4) - 8) * x[64 + 4 * c + t];
                        }
                    total += s * J->steps[b * block_steps + g * LANES + o];
                }
                J->out[r * J->n + b * LANES + o] = output(total, J->xs[r], J->scales[b * LANES + o]);
            }
}

/* The instruction set used: 2 AVX-512 VNNI, 1 AVX2, 0 plain C.  ``limit`` caps it (for tests). */
static int level(int limit) {
    static int best = -1;
    if (best < 0) {
        int found = 0;
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2")) found = 1;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vnni")) found = 2;
        best = found;
    }
    return best < limit ? best : limit;
}

int edgevl_int4_level(int limit) { return level(limit); }

/* out (m x n) = x (m x k, float) times the int4 weight's transpose.  0 on success, -1 if out of memory.
   The blocks of outputs are shared among ``threads`` threads (OpenMP: the runtime torch's own threads run on). */
int edgevl_int4_linear(const uint8_t *w, const int8_t *steps, const float *scales, const float *x, float *out,
                       int64_t m, int64_t n, int64_t k, int threads, int limit) {
    const int64_t groups = k / GROUP;
    const int isa = level(limit);
    int8_t *xq = malloc((size_t)(m * k));
    float *xs = malloc((size_t)m * sizeof(float));
    int32_t *gsum = malloc((size_t)(m * groups) * sizeof(int32_t));
    if (xq == NULL || xs == NULL || gsum == NULL) {
        free(xq); free(xs); free(gsum);
        return -1;
    }
    for (int64_t r = 0; r < m; r++) {
        if (isa == 2) quantize_row_512(x + r * k, k, xq + r * k, xs + r);
        else if (isa == 1) quantize_row_256(x + r * k, k, xq + r * k, xs + r);
        else quantize_row(x + r * k, k, xq + r * k, xs + r);
        for (int64_t g = 0; g < groups; g++) {
            int32_t s = 0;
            for (int i = 0; i < GROUP; i++) s += xq[r * k + g * GROUP + i];
            gsum[r * groups + g] = 8 * s;
        }
    }
    job J = {m, n, k, groups, w, steps, scales, xq, xs, gsum, out};
    const int64_t blocks = n / LANES;
    /* Tiles of BLOCKS blocks, shared evenly: a narrow matrix's few tiles still go to both threads. */
    const int64_t per = isa == 2 && m >= 4 ? BLOCKS : 1;
    const int64_t tiles = (blocks + per - 1) / per;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < tiles; i++) {
        int64_t b0 = i * per, b1 = b0 + per < blocks ? b0 + per : blocks;
        if (isa == 2) blocks_512(&J, b0, b1);
        else if (isa >= 1) blocks_256(&J, b0, b1);
        else blocks_plain(&J, b0, b1);
    }
    free(xq); free(xs); free(gsum);
    return 0;
}
