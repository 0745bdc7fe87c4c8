/* One query row of every head attending over a bfloat16 cache: the attention of a decode step of precision int4
   (edgevl/engine/row_attention.py calls it; it is built into int4.c's library).

   A decode step's attention reads every slot of every layer's keys and values once, so its time should be that
   read.  torch's SDPA took 350 us a layer for one row over 1,100 slots of bfloat16 (the 2B model's 8 key/value
   heads of 128; 2-core AMD EPYC with AVX-512 BF16, torch profiler over a W-doc answer): 4.5 MB in that time is
   13 GB/s of a memory that reads at 70, a quarter of each decode step of a page's long answer.  Here each thread
   takes whole key/value heads and reads each slot's key and value once for all the query heads that share them:
   146 us a layer in the same microbenchmark where SDPA took 377 (AVX2: 203 us; plain C: 714), and a W-doc
   page's decode step fell from 40 to 34 ms (with int4.c's one-block tiles, to 28).

   The arithmetic is attention's, in float32 throughout: each score the query's dot product with the key times
   ``scale``; the weights the scores' softmax over the slots the mask lets the row see (the largest score taken
   out first, so that no exponential overflows); the output their sum of the values.  A slot the mask hides is
   never read, so that a NaN left in one (a slot no token has written) cannot reach the row.  A row that sees no
   slot at all gets zeros.  The instruction sets sum in different orders: their outputs agree to float32's
   rounding, not bit for bit. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define MAX_GROUP 16  /* query heads per key/value head at most (the Python side checks) */

typedef struct {
    const float *q;           /* heads x dim */
    const uint16_t *k, *v;    /* bfloat16: head h, slot j at h * head_stride + j * slot_stride */
    int64_t k_head, k_slot, v_head, v_slot;
    const uint8_t *mask;      /* slots: nonzero where the row sees the slot */
    float *out;               /* heads x dim */
    int64_t heads, kv_heads, slots, dim;
    float scale;
} rows_job;

static float from_bf16(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ---- the scores of one key/value head's query heads: (group x slots), -INFINITY where hidden ---- */

static void scores_plain(const rows_job *J, int64_t h, int group, float *s) {
    for (int64_t j = 0; j < J->slots; j++) {
        if (!J->mask[j]) { for (int g = 0; g < group; g++) s[g * J->slots + j] = -INFINITY; continue; }
        const uint16_t *key = J->k + h * J->k_head + j * J->k_slot;
        for (int g = 0; g < group; g++) {
            const float *q = J->q + (h * group + g) * J->dim;
            float total = 0.0f;
            for (int64_t d = 0; d < J->dim; d++) total += q[d] * from_bf16(key[d]);
            s[g * J->slots + j] = total * J->scale;
        }
    }
}

__attribute__((target("avx2,fma")))
static void scores_256(const rows_job *J, int64_t h, int group, float *s) {
    const int64_t whole = J->dim / 8 * 8;
    for (int64_t j = 0; j < J->slots; j++) {
        if (!J->mask[j]) { for (int g = 0; g < group; g++) s[g * J->slots + j] = -INFINITY; continue; }
        const uint16_t *key = J->k + h * J->k_head + j * J->k_slot;
        for (int g = 0; g < group; g++) {
            const float *q = J->q + (h * group + g) * J->dim;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t d = 0; d < whole; d += 8) {
                __m256 kf = _mm256_castsi256_ps(
                    _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(key + d))), 16));
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kf, acc);
            }
            float lanes[8], total = 0.0f;
            _mm256_storeu_ps(lanes, acc);
            for (int l = 0; l < 8; l++) total += lanes[l];
            for (int64_t d = whole; d < J->dim; d++) total += q[d] * from_bf16(key[d]);
            s[g * J->slots + j] = total * J->scale;
        }
    }
}

__attribute__((target("avx512f")))
static void scores_512(const rows_job *J, int64_t h, int group, float *s) {
    const int64_t whole = J->dim / 16 * 16;
    for (int64_t j = 0; j < J->slots; j++) {
        if (!J->mask[j]) { for (int g = 0; g < group; g++) s[g * J->slots + j] = -INFINITY; continue; }
        const uint16_t *key = J->k + h * J->k_head + j * J->k_slot;
        for (int g = 0; g < group; g++) {
            const float *q = J->q + (h * group + g) * J->dim;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < whole; d += 16) {
                __m512 kf = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(key + d))), 16));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), kf, acc);
            }
            float total = _mm512_reduce_add_ps(acc);
            for (int64_t d = whole; d < J->dim; d++) total += q[d] * from_bf16(key[d]);
            s[g * J->slots + j] = total * J->scale;
        }
    }
}

/* ---- the weighted sum of the values: out (group x dim) += p[g][j] * value j ---- */

static void values_plain(const rows_job *J, int64_t h, int group, const float *p, float *out) {
    for (int64_t j = 0; j < J->slots; j++) {
        if (!J->mask[j]) continue;
        const uint16_t *value = J->v + h * J->v_head + j * J->v_slot;
        for (int g = 0; g < group; g++) {
            const float w = p[g * J->slots + j];
            for (int64_t d = 0; d < J->dim; d++) out[g * J->dim + d] += w * from_bf16(value[d]);
        }
    }
}

__attribute__((target("avx2,fma")))
static void values_256(const rows_job *J, int64_t h, int group, const float *p, float *out) {
    const int64_t whole = J->dim / 8 * 8;
    for (int64_t j = 0; j < J->slots; j++) {
        if (!J->mask[j]) continue;
        const uint16_t *value = J->v + h * J->v_head + j * J->v_slot;
        for (int64_t d = 0; d < whole; d += 8) {
            __m256 vf = _mm256_castsi256_ps(
                _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(value + d))), 16));
            for (int g = 0; g < group; g++) {
                float *o = out + g * J->dim + d;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(p[g * J->slots + j]), vf, _mm256_loadu_ps(o)));
            }
        }
        for (int g = 0; g < group; g++)
            for (int64_t d = whole; d < J->dim; d++) out[g * J->dim + d] += p[g * J->slots + j] * from_bf16(value[d]);
    }
}

/* Two query heads and 128 of the dimensions at a time, their sums in registers over every slot: each value's
   bfloat16 is widened once for both heads, and no sum goes through memory (storing them at every slot cost the
   pass as much as its reading). */
__attribute__((target("avx512f")))
static void values_512(const rows_job *J, int64_t h, int group, const float *p, float *out) {
    const int64_t whole = J->dim / 16 * 16;
    for (int g0 = 0; g0 < group; g0 += 2) {
        const int heads = group - g0 < 2 ? group - g0 : 2;
        for (int64_t d0 = 0; d0 < whole; d0 += 128) {
            const int count = whole - d0 < 128 ? (int)((whole - d0) / 16) : 8;
            __m512 acc[2][8];
            for (int g = 0; g < 2; g++)
                for (int u = 0; u < 8; u++) acc[g][u] = _mm512_setzero_ps();
            for (int64_t j = 0; j < J->slots; j++) {
                if (!J->mask[j]) continue;
                const uint16_t *value = J->v + h * J->v_head + j * J->v_slot + d0;
                const __m512 w0 = _mm512_set1_ps(p[g0 * J->slots + j]);
                const __m512 w1 = _mm512_set1_ps(heads > 1 ? p[(g0 + 1) * J->slots + j] : 0.0f);
                for (int u = 0; u < count; u++) {
                    __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(value + 16 * u))), 16));
                    acc[0][u] = _mm512_fmadd_ps(w0, vf, acc[0][u]);
                    acc[1][u] = _mm512_fmadd_ps(w1, vf, acc[1][u]);
                }
            }
            for (int g = 0; g < heads; g++)
                for (int u = 0; u < count; u++) _mm512_storeu_ps(out + (g0 + g) * J->dim + d0 + 16 * u, acc[g][u]);
        }
        for (int64_t j = 0; j < J->slots; j++) {  /* the dimensions beyond whole vectors */
            if (!J->mask[j] || whole == J->dim) continue;
            const uint16_t *value = J->v + h * J->v_head + j * J->v_slot;
            for (int g = g0; g < g0 + heads; g++)
                for (int64_t d = whole; d < J->dim; d++) out[g * J->dim + d] += p[g * J->slots + j] * from_bf16(value[d]);
        }
    }
}

/* ---- the softmax's exponentials, in place: exp(s - top) where the slot is seen, else 0; their sum ---- */

static float weights_plain(const rows_job *J, float *row, float top) {
    float total = 0.0f;
    for (int64_t j = 0; j < J->slots; j++) {
        row[j] = J->mask[j] ? expf(row[j] - top) : 0.0f;
        total += row[j];
    }
    return total;
}

/* 16 exponentials at a time: scalar expf for each of a thousand slots, sixteen heads and 28 layers cost a
   long answer's step more than the scores did.  exp(x) = 2^n * exp(r) with n = round(x / ln 2) and |r| <= ln 2 / 2,
   exp(r) by its Taylor polynomial to r^7 (within float32's rounding there); below -87 it is zero to float32 anyway,
   and the arguments are never above 0 (the largest score is taken out first). */
__attribute__((target("avx512f")))
static float weights_512(const rows_job *J, float *row, float top) {
    const __m512 lowest = _mm512_set1_ps(-87.0f), log2e = _mm512_set1_ps(1.44269504f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    const __m512 shift = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= J->slots; j += 16) {
        __mmask16 seen = _mm512_test_epi32_mask(
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(J->mask + j))), _mm512_set1_epi32(0xFF));
        __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift), lowest);
        __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(n, ln2_lo, _mm512_fnmadd_ps(n, ln2_hi, x));
        __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        __m512 e = _mm512_maskz_mov_ps(seen, _mm512_scalef_ps(p, n));
        _mm512_storeu_ps(row + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    float total = _mm512_reduce_add_ps(sum);
    for (; j < J->slots; j++) {
        row[j] = J->mask[j] ? expf(row[j] - top) : 0.0f;
        total += row[j];
    }
    return total;
}

/* One key/value head: its query heads' scores, their softmax in place, the weighted values. */
static void head(const rows_job *J, int64_t h, int isa, float *s) {
    const int group = (int)(J->heads / J->kv_heads);
    float *out = J->out + h * group * J->dim;
    memset(out, 0, (size_t)(group * J->dim) * sizeof(float));
    if (isa == 2) scores_512(J, h, group, s);
    else if (isa == 1) scores_256(J, h, group, s);
    else scores_plain(J, h, group, s);
    for (int g = 0; g < group; g++) {
        float *row = s + g * J->slots, top = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < J->slots; j++) if (row[j] > top) top = row[j];
        if (top == -INFINITY) {  /* nothing seen (or only NaN scores): zeros for this head */
            for (int64_t j = 0; j < J->slots; j++) row[j] = 0.0f;
            continue;
        }
        total = isa == 2 ? weights_512(J, row, top) : weights_plain(J, row, top);
        const float inverse = 1.0f / total;
        for (int64_t j = 0; j < J->slots; j++) row[j] *= inverse;
    }
    if (isa == 2) values_512(J, h, group, s, out);
    else if (isa == 1) values_256(J, h, group, s, out);
    else values_plain(J, h, group, s, out);
}

/* out (heads x dim) = each head's row attending over the cache's ``slots``.  ``isa``: 2 AVX-512, 1 AVX2 with FMA,
   0 plain C (int4.c's level; lowered to what the CPU has).  0 on success, -1 if out of memory, -2 for heads that
   do not share key/value heads evenly.  The key/value heads are shared among
   ``threads`` threads (torch's OpenMP runtime, as int4.c's). */
int edgevl_attend_rows(const float *q, const uint16_t *k, const uint16_t *v, int64_t k_head, int64_t k_slot,
                       int64_t v_head, int64_t v_slot, const uint8_t *mask, float *out, int64_t heads,
                       int64_t kv_heads, int64_t slots, int64_t dim, float scale, int threads, int isa) {
    if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP) return -2;
    __builtin_cpu_init();  /* never above what this CPU has, whatever the caller asks */
    if (isa >= 2 && !__builtin_cpu_supports("avx512f")) isa = 1;
    if (isa >= 1 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) isa = 0;
    const int64_t group = heads / kv_heads;
    float *scores = malloc((size_t)(kv_heads * group * (slots > 0 ? slots : 1)) * sizeof(float));
    if (scores == NULL) return -1;
    rows_job J = {q, k, v, k_head, k_slot, v_head, v_slot, mask, out, heads, kv_heads, slots, dim, scale};
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < kv_heads; h++) head(&J, h, isa, scores + h * group * slots);
    free(scores);
    return 0;
}
