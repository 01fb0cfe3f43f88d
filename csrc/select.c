/*
 * select.c - sorting and selection on small float64 arrays (candidate sets, sorted rows).
 * Introsort-style: median-of-three quicksort, insertion sort below 24 elements, heapsort
 * when recursion gets deep, so the worst case stays O(n log n).
 */
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

/* ---- LSD radix sort of float64 values, decreasing */

static inline uint64_t desc_key(double x)
{
    uint64_t b;
    memcpy(&b, &x, 8);
    /* order-preserving map to unsigned, then inverted so ascending keys = decreasing x */
    b = (b >> 63) ? ~b : (b | 0x8000000000000000ull);
    return ~b;
}

static inline double from_desc_key(uint64_t k)
{
    k = ~k;
    k = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
    double x;
    memcpy(&x, &k, 8);
    return x;
}

#define RADIX_BITS 11
#define RADIX_SIZE (1 << RADIX_BITS)
#define RADIX_PASSES 6 /* 6 * 11 >= 64 */

int tka_radix_sort_desc(double *a, int64_t n, uint64_t *tmp)
{
    if (n < 512) {
        tka_sort_desc(a, n);
        return 0;
    }
    uint64_t *src = tmp, *dst = tmp + n;
    int64_t (*hist)[RADIX_SIZE] = calloc(RADIX_PASSES, sizeof *hist);
    if (!hist) return -1;
    for (int64_t i = 0; i < n; i++) {
        uint64_t k = desc_key(a[i]);
        src[i] = k;
        for (int p = 0; p < RADIX_PASSES; p++) hist[p][(k >> (p * RADIX_BITS)) & (RADIX_SIZE - 1)]++;
    }
    for (int p = 0; p < RADIX_PASSES; p++) {
        int64_t *h = hist[p];
        int shift = p * RADIX_BITS;
        /* a digit shared by every key does not reorder anything */
        if (h[(src[0] >> shift) & (RADIX_SIZE - 1)] == n) continue;
        int64_t sum = 0;
        for (int d = 0; d < RADIX_SIZE; d++) { int64_t c = h[d]; h[d] = sum; sum += c; }
        for (int64_t i = 0; i < n; i++) {
            uint64_t k = src[i];
            dst[h[(k >> shift) & (RADIX_SIZE - 1)]++] = k;
        }
        uint64_t *t = src; src = dst; dst = t;
    }
    free(hist);
    for (int64_t i = 0; i < n; i++) a[i] = from_desc_key(src[i]);
    return 0;
}
