/* Row-wise top-k selection for the CPU training path.
 *
 * For each row of a (rows, n) matrix, the k largest entries and their column indices, in no
 * particular order (torch.topk(..., sorted=False) semantics; NaN counts as the largest value).
 *
 * Two reads of the row instead of a sort. First the maximum of every group of `depth` entries
 * (with AVX-512, the elementwise maximum of `depth` consecutive vectors gives 16 group maxima at
 * once), then the k-th largest of those maxima, `thr`: a lower bound on the row's k-th largest
 * entry, since the k groups with the largest maxima hold k distinct entries >= thr. Only entries
 * >= thr can be in the answer and there are few of them (k plus about 2-5 on SAE pre-activations,
 * with about four groups per selected entry): the second read gathers them and the surplus is
 * dropped. With AVX-512 the k-th largest maximum comes from a quickselect whose partitions are
 * vector compares and in-register compresses, and the gathering is branch-free, so the work is
 * close to one streaming read of the row; without it, heaps of size k do both selections.
 * torch.topk instead copies every row into (value, index) pairs and partially sorts them.
 * Requires k <= n_groups(n, depth). Rows are split over `threads` POSIX threads.
 *
 * Built on first use by flashsae.kernels.cpu_topk with the system C compiler; no Python or
 * PyTorch headers.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 16 /* floats per AVX-512 vector */

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Order key: NaN above everything, as torch.topk ranks it. */
static inline float key_of(float v) { return isnan(v) ? INFINITY : v; }

static inline void sift_down(float *hv, int64_t *hi, int64_t k, int64_t pos) {
    float v = hv[pos];
    int64_t id = hi[pos];
    for (;;) {
        int64_t c = 2 * pos + 1;
        if (c >= k) break;
        if (c + 1 < k && hv[c + 1] < hv[c]) c++;
        if (!(hv[c] < v)) break;
        hv[pos] = hv[c];
        hi[pos] = hi[c];
        pos = c;
    }
    hv[pos] = v;
    hi[pos] = id;
}

static inline void sift_up(float *hv, int64_t *hi, int64_t pos) {
    float v = hv[pos];
    int64_t id = hi[pos];
    while (pos > 0) {
        int64_t p = (pos - 1) / 2;
        if (!(v < hv[p])) break;
        hv[pos] = hv[p];
        hi[pos] = hi[p];
        pos = p;
    }
    hv[pos] = v;
    hi[pos] = id;
}

/* Min-heap of the best k keys seen: `*count` fills up to k, then the root is the k-th best. */
static inline void offer(float *hv, int64_t *hi, int64_t k, int64_t *count, float key, int64_t i) {
    if (*count < k) {
        hv[*count] = key;
        hi[*count] = i;
        sift_up(hv, hi, (*count)++);
    } else if (key > hv[0]) {
        hv[0] = key;
        hi[0] = i;
        sift_down(hv, hi, k, 0);
    }
}

/* Groups: the row is cut into chunks of LANES * depth entries; in a chunk, group l (0 <= l < LANES)
 * is the entries at offsets l, l + LANES, l + 2 LANES, ... (one lane of `depth` consecutive
 * vectors). Past the last full chunk, contiguous runs of `depth` entries (the last may be short). */
static inline int64_t n_groups(int64_t n, int64_t depth) {
    int64_t chunk = LANES * depth;
    return (n / chunk) * LANES + (n % chunk + depth - 1) / depth;
}

#ifndef __AVX512F__
/* The k-th largest of v[0..n) (k <= n), using the heap arrays as scratch. */
static float kth_largest(const float *v, int64_t n, int64_t k, float *hv, int64_t *hi) {
    int64_t count = 0, i = 0;
    for (; i < k; i++) offer(hv, hi, k, &count, v[i], i);
#ifdef __AVX512F__
    for (; i < n && i % LANES; i++) offer(hv, hi, k, &count, v[i], i);
    for (; i + LANES <= n; i += LANES) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + i), _mm512_set1_ps(hv[0]), _CMP_GT_OQ);
        for (; m; m &= m - 1) offer(hv, hi, k, &count, v[i + __builtin_ctz(m)], i + __builtin_ctz(m));
    }
#endif
    for (; i < n; i++) offer(hv, hi, k, &count, v[i], i);
    return hv[0];
}
#endif

#ifdef __AVX512F__
#define VLOAD_F32(p) _mm512_loadu_ps(p)
#define VLOAD_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#endif
#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)

#ifdef __AVX512F__
/* The k-th largest of v[0..n) (1 <= k <= n; no NaN), leaving v as is: quickselect whose partitions
 * are vector compares and in-register compresses, so the branches are per pass, not per value.
 * a and b hold n + LANES floats each. */
static float kth_select(const float *v, int64_t n, int64_t k, float *a, float *b) {
    float *cur = a, *other = b;
    memcpy(cur, v, sizeof(float) * (size_t)n);
    for (;;) {
        if (n <= LANES) { /* insertion sort, largest first */
            for (int64_t i = 1; i < n; i++) {
                float x = cur[i];
                int64_t j = i;
                for (; j > 0 && cur[j - 1] < x; j--) cur[j] = cur[j - 1];
                cur[j] = x;
            }
            return cur[k - 1];
        }
        float p0 = cur[0], p1 = cur[n / 2], p2 = cur[n - 1];
        float pivot = p0 < p1 ? (p1 < p2 ? p1 : (p0 < p2 ? p2 : p0)) : (p0 < p2 ? p0 : (p1 < p2 ? p2 : p1));
        const __m512 pv = _mm512_set1_ps(pivot);
        int64_t h = 0, l = 0; /* greater ones go to `other`, smaller ones stay at the front of `cur` */
        for (int64_t j = 0; j < n; j += LANES) {
            __mmask16 live = n - j >= LANES ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            __m512 x = _mm512_maskz_loadu_ps(live, cur + j);
            __mmask16 gt = _mm512_mask_cmp_ps_mask(live, x, pv, _CMP_GT_OQ);
            __mmask16 lt = _mm512_mask_cmp_ps_mask(live, x, pv, _CMP_LT_OQ);
            _mm512_storeu_ps(other + h, _mm512_maskz_compress_ps(gt, x));
            _mm512_storeu_ps(cur + l, _mm512_maskz_compress_ps(lt, x)); /* l <= j: x is already loaded */
            h += __builtin_popcount(gt);
            l += __builtin_popcount(lt);
        }
        if (k <= h) {
            float *t = cur;
            cur = other;
            other = t;
            n = h;
        } else if (k <= n - l) {
            return pivot;
        } else {
            k -= n - l;
            n = l;
        }
    }
}

/* Index of the smallest of v[0..m) (m >= 1). */
static inline int64_t argmin(const float *v, int64_t m) {
    const __m512 inf = _mm512_set1_ps(INFINITY);
    __m512 best = inf;
    for (int64_t j = 0; j < m; j += LANES) {
        __mmask16 live = m - j >= LANES ? 0xFFFF : (__mmask16)((1u << (m - j)) - 1);
        best = _mm512_min_ps(best, _mm512_mask_loadu_ps(inf, live, v + j));
    }
    const __m512 low = _mm512_set1_ps(_mm512_reduce_min_ps(best));
    for (int64_t j = 0; j < m; j += LANES) {
        __mmask16 live = m - j >= LANES ? 0xFFFF : (__mmask16)((1u << (m - j)) - 1);
        __mmask16 hit = _mm512_mask_cmp_ps_mask(live, _mm512_mask_loadu_ps(inf, live, v + j), low, _CMP_EQ_OQ);
        if (hit) return j + __builtin_ctz(hit);
    }
    return m - 1; /* every candidate is +inf */
}

/* The k largest of the m >= k candidates (keys cv, indices ci) into hi. A few surplus candidates
 * are dropped one minimum at a time (vector scans, no data-dependent branches per element); many
 * go through the heap. */
static void select_candidates(float *cv, int32_t *ci, int64_t m, int64_t k, float *hv, int64_t *hi) {
    if (m - k <= 32) {
        for (; m > k; m--) {
            int64_t p = argmin(cv, m);
            cv[p] = cv[m - 1];
            ci[p] = ci[m - 1];
        }
        for (int64_t j = 0; j < k; j++) hi[j] = ci[j];
        return;
    }
    int64_t count = 0;
    for (int64_t j = 0; j < m; j++) offer(hv, hi, k, &count, cv[j], ci[j]);
}
#endif

/* Maxima of the contiguous groups of `depth` entries from entry `start` (group `g`) to the end of
 * the row, the last one possibly short: the groups past the last full chunk, in both builds. */
#define TAIL_MAX(NAME, T, LOAD)                                                                 \
    static void NAME(const T *x, int64_t n, int64_t depth, int64_t start, int64_t g, float *gmax) { \
        for (int64_t i = start; i < n; i += depth, g++) {                                      \
            float m = -INFINITY;                                                               \
            for (int64_t j = i; j < i + depth && j < n; j++) {                                 \
                float a = key_of(LOAD(x[j]));                                                  \
                m = a > m ? a : m;                                                             \
            }                                                                                  \
            gmax[g] = m;                                                                       \
        }                                                                                      \
    }
TAIL_MAX(tail_max_f32, float, LOAD_F32)
TAIL_MAX(tail_max_bf16, uint16_t, LOAD_BF16)

/* One row: x (n entries) -> hi (k indices). gmax holds n_groups(n, depth) floats. */
#ifdef __AVX512F__
#define ROW_TOPK(NAME, T, LOAD, VLOAD, TAIL)                                                    \
    static void NAME(const T *x, int64_t n, int64_t k, int64_t depth, float *gmax, float *hv,  \
                     int64_t *hi, int64_t *scratch, float *cv, int32_t *ci) {                  \
        const int64_t chunk = LANES * depth, nc = n / chunk, ng = n_groups(n, depth);          \
        const __m512 inf = _mm512_set1_ps(INFINITY);                                           \
        for (int64_t c = 0; c < nc; c++) {                                                     \
            __m512 m = _mm512_set1_ps(-INFINITY);                                              \
            for (int64_t v = 0; v < depth; v++) {                                              \
                __m512 a = VLOAD(x + c * chunk + v * LANES);                                   \
                a = _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), inf);        \
                m = _mm512_max_ps(a, m);                                                       \
            }                                                                                  \
            _mm512_storeu_ps(gmax + c * LANES, m);                                             \
        }                                                                                      \
        TAIL(x, n, depth, nc * chunk, nc * LANES, gmax);                                       \
        const float thr = kth_select(gmax, ng, k, cv, (float *)ci);                            \
        const __m512 t = _mm512_set1_ps(thr);                                                  \
        (void)scratch;                                                                         \
        /* Gather every entry >= thr (no branch per vector: an empty mask adds nothing), then   \
         * drop the smallest until k are left, or heap-select when many.                        \
         * NaN entries pass the not-less-than (unordered) test and rank as +inf. */              \
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); \
        int64_t m = 0;                                                                         \
        for (int64_t c = 0; c < nc; c++) {                                                     \
            if (!_mm512_cmp_ps_mask(_mm512_loadu_ps(gmax + c * LANES), t, _CMP_GE_OQ)) continue; \
            for (int64_t i = c * chunk; i < (c + 1) * chunk; i += LANES) {                     \
                __m512 a = VLOAD(x + i);                                                       \
                __mmask16 pass = _mm512_cmp_ps_mask(a, t, _CMP_NLT_UQ);                        \
                a = _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), inf);        \
                /* compress in registers, then a full store (the buffers have a vector of slack): \
                 * a compress straight to memory is microcoded and slow on AMD Zen 4 */          \
                _mm512_storeu_ps(cv + m, _mm512_maskz_compress_ps(pass, a));                   \
                _mm512_storeu_si512(ci + m, _mm512_maskz_compress_epi32(                       \
                                                pass, _mm512_add_epi32(lane, _mm512_set1_epi32((int)i)))); \
                m += __builtin_popcount(pass);                                                 \
            }                                                                                  \
        }                                                                                      \
        for (int64_t i = nc * chunk; i < n; i++) {                                             \
            float key = key_of(LOAD(x[i]));                                                    \
            if (key >= thr) {                                                                  \
                cv[m] = key;                                                                   \
                ci[m++] = (int32_t)i;                                                          \
            }                                                                                  \
        }                                                                                      \
        select_candidates(cv, ci, m, k, hv, hi);                                               \
    }
#else
#define ROW_TOPK(NAME, T, LOAD, VLOAD, TAIL)                                                    \
    static void NAME(const T *x, int64_t n, int64_t k, int64_t depth, float *gmax, float *hv,  \
                     int64_t *hi, int64_t *scratch, float *cv, int32_t *ci) {                  \
        const int64_t chunk = LANES * depth, nc = n / chunk, ng = n_groups(n, depth);          \
        for (int64_t c = 0; c < nc; c++) {                                                     \
            float m[LANES];                                                                    \
            for (int l = 0; l < LANES; l++) m[l] = -INFINITY;                                  \
            for (int64_t v = 0; v < depth; v++)                                                \
                for (int l = 0; l < LANES; l++) {                                              \
                    float a = key_of(LOAD(x[c * chunk + v * LANES + l]));                      \
                    m[l] = a > m[l] ? a : m[l];                                                \
                }                                                                              \
            memcpy(gmax + c * LANES, m, sizeof m);                                             \
        }                                                                                      \
        TAIL(x, n, depth, nc * chunk, nc * LANES, gmax);                                       \
        const float thr = kth_largest(gmax, ng, k, hv, scratch);                               \
        int64_t count = 0;                                                                     \
        (void)cv;                                                                              \
        (void)ci;                                                                              \
        for (int64_t g = 0; g < ng; g++) {                                                     \
            if (gmax[g] < thr) continue;                                                       \
            int64_t start, step, end;                                                          \
            if (g < nc * LANES) {                                                              \
                start = (g / LANES) * chunk + g % LANES;                                       \
                step = LANES;                                                                  \
                end = start + chunk;                                                           \
            } else {                                                                           \
                start = nc * chunk + (g - nc * LANES) * depth;                                 \
                step = 1;                                                                      \
                end = start + depth < n ? start + depth : n;                                   \
            }                                                                                  \
            for (int64_t i = start; i < end; i += step) {                                      \
                float key = key_of(LOAD(x[i]));                                                \
                if (key >= thr) offer(hv, hi, k, &count, key, i);                              \
            }                                                                                  \
        }                                                                                      \
    }
#endif

ROW_TOPK(row_topk_f32, float, LOAD_F32, VLOAD_F32, tail_max_f32)
ROW_TOPK(row_topk_bf16, uint16_t, LOAD_BF16, VLOAD_BF16, tail_max_bf16)

typedef struct {
    const void *x;
    int64_t n, ld, k, depth, r0, r1;
    int bf16;
    void *vals;
    int64_t *idx;
    int status;
} job_t;

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    int64_t ng = n_groups(j->n, j->depth);
    float *hv = (float *)malloc(sizeof(float) * (size_t)(j->k + ng));
    int64_t *scratch = (int64_t *)malloc(sizeof(int64_t) * (size_t)j->k);
    if (!hv || !scratch) {
        free(hv);
        free(scratch);
        j->status = 1;
        return NULL;
    }
    float *gmax = hv + j->k;
    float *cv = (float *)malloc(sizeof(float) * (size_t)(j->n + LANES));
    int32_t *ci = (int32_t *)malloc(sizeof(int32_t) * (size_t)(j->n + LANES));
    if (!cv || !ci) {
        free(hv);
        free(scratch);
        free(cv);
        free(ci);
        j->status = 1;
        return NULL;
    }
    for (int64_t r = j->r0; r < j->r1; r++) {
        int64_t *hi = j->idx + r * j->k;
        if (j->bf16) {
            const uint16_t *row = (const uint16_t *)j->x + r * j->ld;
            row_topk_bf16(row, j->n, j->k, j->depth, gmax, hv, hi, scratch, cv, ci);
            uint16_t *out = (uint16_t *)j->vals + r * j->k;
            for (int64_t t = 0; t < j->k; t++) out[t] = row[hi[t]];
        } else {
            const float *row = (const float *)j->x + r * j->ld;
            row_topk_f32(row, j->n, j->k, j->depth, gmax, hv, hi, scratch, cv, ci);
            float *out = (float *)j->vals + r * j->k;
            for (int64_t t = 0; t < j->k; t++) out[t] = row[hi[t]];
        }
    }
    free(hv);
    free(scratch);
    free(cv);
    free(ci);
    j->status = 0;
    return NULL;
}

/* Entries per group: about 4 groups per selected entry, between 2 and 16 entries. */
static int64_t choose_depth(int64_t n, int64_t k) {
    int64_t depth = 16;
    while (depth > 2 && n / depth < 4 * k) depth /= 2;
    return depth;
}

/* x: (rows, n) with row stride ld elements; dtype 0 = float32, 1 = bfloat16. vals: (rows, k) of
 * x's dtype, idx: (rows, k) int64, both contiguous. Returns 0 on success. */
int flashsae_topk(const void *x, int64_t rows, int64_t n, int64_t ld, int64_t k, int dtype, void *vals,
                  int64_t *idx, int threads) {
    if (rows < 0 || n < 1 || k < 1 || (dtype != 0 && dtype != 1)) return 2;
    int64_t depth = choose_depth(n, k);
    if (k > n_groups(n, depth)) return 2;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    job_t jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){x, n, ld, k, depth, rows * t / threads, rows * (t + 1) / threads, dtype, vals, idx, 1};
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) {
            pthread_join(tids[t], NULL);
        } else {
            run_job(&jobs[t]); /* no thread: do its rows here */
        }
        status |= jobs[t].status;
    }
    return status;
}

/* 1 when this build has the AVX-512 paths, 0 for the portable one (reported by cpu_topk.build()). */
int flashsae_topk_avx512(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}
