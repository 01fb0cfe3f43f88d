/*
 * select.c - sorting and selection on small float64 arrays (candidate sets, sorted rows).
 * Introsort-style: median-of-three quicksort, insertion sort below 24 elements, heapsort
 * when recursion gets deep, so the worst case stays O(n log n).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define SMALL 24

/* ---- values, decreasing */

static void insertion_desc(double *a, int64_t n)
{
    for (int64_t i = 1; i < n; i++) {
        double v = a[i];
        int64_t j = i;
        while (j > 0 && a[j - 1] < v) { a[j] = a[j - 1]; j--; }
        a[j] = v;
    }
}

static void sift_down_asc_min(double *a, int64_t root, int64_t n)
{
    /* min-heap, so that popping to the back leaves the array in decreasing order */
    for (;;) {
        int64_t c = 2 * root + 1;
        if (c >= n) return;
        if (c + 1 < n && a[c + 1] < a[c]) c++;
        if (a[root] <= a[c]) return;
        double t = a[root]; a[root] = a[c]; a[c] = t;
        root = c;
    }
}

static void heapsort_desc(double *a, int64_t n)
{
    for (int64_t i = n / 2 - 1; i >= 0; i--) sift_down_asc_min(a, i, n);
    for (int64_t end = n - 1; end > 0; end--) {
        double t = a[0]; a[0] = a[end]; a[end] = t;
        sift_down_asc_min(a, 0, end);
    }
}

static double median3(double a, double b, double c)
{
    if (a < b) { double t = a; a = b; b = t; }
    if (b < c) { b = c; }
    return a < b ? a : b;
}

/* Hoare partition around pivot p: returns j with a[0..j] >= p >= a[j+1..n). */
static int64_t partition_desc(double *a, int64_t n, double p)
{
    int64_t i = -1, j = n;
    for (;;) {
        do i++; while (a[i] > p);
        do j--; while (a[j] < p);
        if (i >= j) return j;
        double t = a[i]; a[i] = a[j]; a[j] = t;
    }
}

static void introsort_desc(double *a, int64_t n, int depth)
{
    while (n > SMALL) {
        if (depth-- == 0) { heapsort_desc(a, n); return; }
        double p = median3(a[0], a[n / 2], a[n - 1]);
        int64_t j = partition_desc(a, n, p);
        /* recurse into the smaller side, loop on the larger */
        if (j + 1 < n - j - 1) { introsort_desc(a, j + 1, depth); a += j + 1; n -= j + 1; }
        else { introsort_desc(a + j + 1, n - j - 1, depth); n = j + 1; }
    }
    insertion_desc(a, n);
}

static int log2_floor(int64_t n)
{
    int d = 0;
    while (n > 1) { n >>= 1; d++; }
    return d;
}

void tka_sort_desc(double *a, int64_t n)
{
    if (n > 1) introsort_desc(a, n, 2 * log2_floor(n) + 4);
}

void tka_nth_desc(double *a, int64_t n, int64_t k)
{
    int depth = 2 * log2_floor(n) + 4;
    while (n > SMALL) {
        if (depth-- == 0) { heapsort_desc(a, n); return; }
        double p = median3(a[0], a[n / 2], a[n - 1]);
        int64_t j = partition_desc(a, n, p);
        if (k <= j) n = j + 1;
        else { a += j + 1; k -= j + 1; n -= j + 1; }
    }
    insertion_desc(a, n);
}

/* ---- (value, index) pairs: decreasing value, then increasing index */

static inline int before(double va, int64_t ia, double vb, int64_t ib)
{
    return va > vb || (va == vb && ia < ib);
}

static inline void swap2(double *v, int64_t *x, int64_t i, int64_t j)
{
    double t = v[i]; v[i] = v[j]; v[j] = t;
    int64_t u = x[i]; x[i] = x[j]; x[j] = u;
}

static void insertion_pairs(double *v, int64_t *x, int64_t n)
{
    for (int64_t i = 1; i < n; i++) {
        double vv = v[i];
        int64_t xx = x[i];
        int64_t j = i;
        while (j > 0 && before(vv, xx, v[j - 1], x[j - 1])) { v[j] = v[j - 1]; x[j] = x[j - 1]; j--; }
        v[j] = vv;
        x[j] = xx;
    }
}

static void sift_pairs(double *v, int64_t *x, int64_t root, int64_t n)
{
    for (;;) {
        int64_t c = 2 * root + 1;
        if (c >= n) return;
        if (c + 1 < n && before(v[c], x[c], v[c + 1], x[c + 1])) c++;
        if (!before(v[root], x[root], v[c], x[c])) return;
        swap2(v, x, root, c);
        root = c;
    }
}

static void heapsort_pairs(double *v, int64_t *x, int64_t n)
{
    /* a heap whose root comes last in the order, popped to the back */
    for (int64_t i = n / 2 - 1; i >= 0; i--) sift_pairs(v, x, i, n);
    for (int64_t end = n - 1; end > 0; end--) {
        swap2(v, x, 0, end);
        sift_pairs(v, x, 0, end);
    }
}

static void introsort_pairs(double *v, int64_t *x, int64_t n, int depth)
{
    while (n > SMALL) {
        if (depth-- == 0) { heapsort_pairs(v, x, n); return; }
        /* pivot: median of three positions, compared in the full order */
        int64_t a = 0, b = n / 2, c = n - 1, m;
        if (before(v[a], x[a], v[b], x[b])) {
            m = before(v[b], x[b], v[c], x[c]) ? b : (before(v[a], x[a], v[c], x[c]) ? c : a);
        } else {
            m = before(v[a], x[a], v[c], x[c]) ? a : (before(v[b], x[b], v[c], x[c]) ? c : b);
        }
        double pv = v[m];
        int64_t px = x[m];
        int64_t i = -1, j = n;
        for (;;) {
            do i++; while (before(v[i], x[i], pv, px));
            do j--; while (before(pv, px, v[j], x[j]));
            if (i >= j) break;
            swap2(v, x, i, j);
        }
        if (j + 1 < n - j - 1) { introsort_pairs(v, x, j + 1, depth); v += j + 1; x += j + 1; n -= j + 1; }
        else { introsort_pairs(v + j + 1, x + j + 1, n - j - 1, depth); n = j + 1; }
    }
    insertion_pairs(v, x, n);
}

void tka_sort_pairs_desc(double *v, int64_t *idx, int64_t n)
{
    if (n > 1) introsort_pairs(v, idx, n, 2 * log2_floor(n) + 4);
}

/* ---- weighted selection from the bottom */

int64_t tka_drop_bottom(double *v, double *w, int64_t c, double budget, double *dropped_mass)
{
    /* Invariant: everything left of [lo, hi) is dropped (mass acc), everything right of it
     * is kept; the answer's boundary lies inside [lo, hi). */
    int64_t lo = 0, hi = c, ndrop = 0;
    double acc = 0.0;
    while (hi - lo > SMALL) {
        double p = median3(v[lo], v[lo + (hi - lo) / 2], v[hi - 1]);
        /* three-way partition of [lo, hi): < p | == p | > p */
        int64_t lt = lo, i = lo, gt = hi;
        double s_lt = 0.0, s_eq = 0.0;
        while (i < gt) {
            if (v[i] < p) {
                double tv = v[lt], tw = w[lt];
                v[lt] = v[i]; w[lt] = w[i]; v[i] = tv; w[i] = tw;
                s_lt += w[lt];
                lt++; i++;
            } else if (v[i] > p) {
                gt--;
                double tv = v[gt], tw = w[gt];
                v[gt] = v[i]; w[gt] = w[i]; v[i] = tv; w[i] = tw;
            } else {
                s_eq += w[i];
                i++;
            }
        }
        if (acc + s_lt > budget) { hi = lt; continue; }
        acc += s_lt;
        ndrop += lt - lo;
        if (acc + s_eq > budget) {
            /* equal logits have equal masses: drop as many of them as fit */
            double wp = w[lt];
            while (lt < gt && acc + wp <= budget) { acc += wp; ndrop++; lt++; }
            *dropped_mass = acc;
            return ndrop;
        }
        acc += s_eq;
        ndrop += gt - lt;
        lo = gt;
    }
    /* small remainder: sort ascending by value (insertion) and walk up */
    for (int64_t a = lo + 1; a < hi; a++) {
        double tv = v[a], tw = w[a];
        int64_t b = a;
        while (b > lo && v[b - 1] > tv) { v[b] = v[b - 1]; w[b] = w[b - 1]; b--; }
        v[b] = tv;
        w[b] = tw;
    }
    for (int64_t a = lo; a < hi && acc + w[a] <= budget; a++) { acc += w[a]; ndrop++; }
    *dropped_mass = acc;
    return ndrop;
}

/*
 * The same selection for large sets: one pass buckets the values (equal width between
 * their min and max) with the mass of each bucket; buckets are dropped whole from the
 * bottom while they fit, and only the bucket where the budget runs out goes through
 * tka_drop_bottom. Equal values share a bucket, so the order of dropping is unchanged.
 */
#define DROP_BUCKETS 256

int64_t tka_drop_bottom_fast(double *v, double *w, int64_t c, double budget, double *dropped_mass)
{
    if (c <= 64) return tka_drop_bottom(v, w, c, budget, dropped_mass);
    const int nbk = c / 4 < DROP_BUCKETS ? (int)(c / 4) : DROP_BUCKETS;  /* ~4 per bucket or more */
    double lo = v[0], hi = v[0];
    for (int64_t i = 1; i < c; i++) {
        lo = v[i] < lo ? v[i] : lo;
        hi = v[i] > hi ? v[i] : hi;
    }
    if (!(hi > lo) || !(hi - lo < INFINITY)) return tka_drop_bottom(v, w, c, budget, dropped_mass);
    const double scale = (double)nbk / (hi - lo);
    int64_t cnt[DROP_BUCKETS] = {0};
    double mass[DROP_BUCKETS] = {0};
    for (int64_t i = 0; i < c; i++) {
        int b = (int)((v[i] - lo) * scale);
        b = b < nbk ? b : nbk - 1;
        cnt[b]++;
        mass[b] += w[i];
    }
    double acc = 0.0;
    int64_t ndrop = 0;
    int bc = 0;
    while (bc < nbk && acc + mass[bc] <= budget) { acc += mass[bc]; ndrop += cnt[bc]; bc++; }
    if (bc == nbk) { *dropped_mass = acc; return ndrop; }
    if (cnt[bc] > c / 2) return tka_drop_bottom(v, w, c, budget, dropped_mass);
    /* compact the crossing bucket to the front (in place: the write index never passes the
     * read index) and finish there */
    int64_t j = 0;
    for (int64_t i = 0; i < c; i++) {
        int b = (int)((v[i] - lo) * scale);
        b = b < nbk ? b : nbk - 1;
        if (b == bc) { v[j] = v[i]; w[j] = w[i]; j++; }
    }
    double dm;
    ndrop += tka_drop_bottom(v, w, j, budget - acc, &dm);
    *dropped_mass = acc + dm;
    return ndrop;
}

/* ---- LSD radix sorts, decreasing */

/* Order-preserving maps to unsigned keys, inverted so that ascending keys are decreasing
 * values. */
static inline uint64_t key64(double x)
{
    uint64_t b;
    memcpy(&b, &x, 8);
    b = (b >> 63) ? ~b : (b | 0x8000000000000000ull);
    return ~b;
}

static inline double unkey64(uint64_t k)
{
    k = ~k;
    k = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
    double x;
    memcpy(&x, &k, 8);
    return x;
}

static inline uint32_t key32(float x)
{
    uint32_t b;
    memcpy(&b, &x, 4);
    b = (b >> 31) ? ~b : (b | 0x80000000u);
    return ~b;
}

static inline float unkey32(uint32_t k)
{
    k = ~k;
    k = (k >> 31) ? (k & 0x7fffffffu) : ~k;
    float x;
    memcpy(&x, &k, 4);
    return x;
}

#define RADIX_BITS 11
#define RADIX_SIZE (1 << RADIX_BITS)
#define RADIX_MASK (RADIX_SIZE - 1)

/*
 * Sort n keys (from src, by `passes` digits of 11 bits) into ascending order; ping-pongs
 * between src and dst and returns the buffer holding the result. A digit shared by every
 * key is skipped: it would not reorder anything (the low mantissa digits of values that
 * came from float32, the high exponent digits of logits of similar size).
 */
#define DEFINE_RADIX(NAME, KT)                                                              \
    static KT *NAME(KT *src, KT *dst, int64_t n, int passes, int64_t *hist)                \
    {                                                                                      \
        memset(hist, 0, sizeof(int64_t) * RADIX_SIZE * (size_t)passes);                    \
        for (int64_t i = 0; i < n; i++)                                                    \
            for (int p = 0; p < passes; p++)                                               \
                hist[p * RADIX_SIZE + ((src[i] >> (p * RADIX_BITS)) & RADIX_MASK)]++;      \
        for (int p = 0; p < passes; p++) {                                                 \
            int64_t *h = hist + p * RADIX_SIZE;                                            \
            int shift = p * RADIX_BITS;                                                    \
            if (h[(src[0] >> shift) & RADIX_MASK] == n) continue;                          \
            int64_t sum = 0;                                                               \
            for (int d = 0; d < RADIX_SIZE; d++) { int64_t c = h[d]; h[d] = sum; sum += c; } \
            for (int64_t i = 0; i < n; i++) {                                              \
                KT k = src[i];                                                             \
                dst[h[(k >> shift) & RADIX_MASK]++] = k;                                   \
            }                                                                              \
            KT *t = src; src = dst; dst = t;                                               \
        }                                                                                  \
        return src;                                                                        \
    }

DEFINE_RADIX(radix_u64, uint64_t)
DEFINE_RADIX(radix_u32, uint32_t)

size_t tka_sort_scratch_bytes(int64_t n)
{
    return (size_t)(2 * n) * sizeof(uint64_t) + sizeof(int64_t) * RADIX_SIZE * 6;
}

void tka_sort_row_desc(const void *x, int is_f32, int64_t n, double *out, void *scratch)
{
    if (n < TKA_RADIX_MIN) {
        if (is_f32) for (int64_t i = 0; i < n; i++) out[i] = (double)((const float *)x)[i];
        else memcpy(out, x, (size_t)n * sizeof(double));
        tka_sort_desc(out, n);
        return;
    }
    int64_t *hist = (int64_t *)scratch;
    if (is_f32) {
        const float *xf = x;
        uint32_t *a = (uint32_t *)(hist + RADIX_SIZE * 6), *b = a + n;
        for (int64_t i = 0; i < n; i++) a[i] = key32(xf[i]);
        uint32_t *r = radix_u32(a, b, n, 3, hist);
        for (int64_t i = 0; i < n; i++) out[i] = (double)unkey32(r[i]);
    } else {
        const double *xd = x;
        uint64_t *a = (uint64_t *)(hist + RADIX_SIZE * 6), *b = a + n;
        for (int64_t i = 0; i < n; i++) a[i] = key64(xd[i]);
        uint64_t *r = radix_u64(a, b, n, 6, hist);
        for (int64_t i = 0; i < n; i++) out[i] = unkey64(r[i]);
    }
}
