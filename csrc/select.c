/*
 * select.c - sorting and selection on small float64 arrays (candidate sets, sorted rows).
 * Introsort-style: median-of-three quicksort, insertion sort below 24 elements, heapsort
 * when recursion gets deep, so the worst case stays O(n log n).
 */
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
