/*
 * select.c - sorting and selection on small float64 arrays (candidate sets, sorted rows).
 * Introsort-style: median-of-three quicksort, insertion sort below 24 elements (the nth
 * selection: 8), heapsort when recursion gets deep, so the worst case stays O(n log n).
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

void tka_values_sort_desc(double *a, int64_t n)
{
    if (n > 1) introsort_desc(a, n, 2 * log2_floor(n) + 4);
}

/* Branch-free partitions (a mispredicted branch per element costs more than the element):
 * move the elements > p (resp. >= p) to the front, keeping the invariant a[0..j) > p,
 * a[j..i) <= p by an unconditional swap; returns j. */
static int64_t part_gt(double *a, int64_t n, double p)
{
    int64_t j = 0;
    for (int64_t i = 0; i < n; i++) {
        const double t = a[i];
        a[i] = a[j];
        a[j] = t;
        j += t > p;
    }
    return j;
}

static int64_t part_ge(double *a, int64_t n, double p)
{
    int64_t j = 0;
    for (int64_t i = 0; i < n; i++) {
        const double t = a[i];
        a[i] = a[j];
        a[j] = t;
        j += t >= p;
    }
    return j;
}

/* nth's sets this small are finished by the insertion sort: its branches mispredict, so
 * nth's branch-free partitions (part_gt, part_ge) go further down than the sort's */
#define NTH_SMALL 8

void tka_values_nth_desc(double *a, int64_t n, int64_t k)
{
    int depth = 2 * log2_floor(n) + 4;
    while (n > NTH_SMALL) {
        if (depth-- == 0) { heapsort_desc(a, n); return; }
        /* three-way split around a pivot that is one of the elements: a[0..gt) > p,
         * a[gt..eq) == p (at least one), a[eq..n) < p, so every step makes progress */
        const double p = median3(a[0], a[n / 2], a[n - 1]);
        const int64_t gt = part_gt(a, n, p);
        if (k < gt) { n = gt; continue; }
        const int64_t eq = gt + part_ge(a + gt, n - gt, p);
        if (k < eq) return;
        a += eq; k -= eq; n -= eq;
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

void tka_pairs_sort_desc(double *v, int64_t *idx, int64_t n)
{
    if (n > 1) introsort_pairs(v, idx, n, 2 * log2_floor(n) + 4);
}

/* Quickselect on pairs: afterwards pair k (0-based) is the k-th in the order of `before`,
 * the ones before it come first. */
static void pairs_nth_desc(double *v, int64_t *idx, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        const int64_t mid = lo + (hi - lo) / 2;
        const double pv = v[mid];
        const int64_t px = idx[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (before(v[i], idx[i], pv, px)) i++;
            while (before(pv, px, v[j], idx[j])) j--;
            if (i <= j) swap2(v, idx, i++, j--);
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return;
    }
}

/* sampled values that pick tka_pairs_top_desc's threshold */
#define TOP_SAMPLE 256

void tka_pairs_top_desc(double *v, int64_t *idx, int64_t n, int64_t k)
{
    if (k <= 0 || n <= 0) return;
    if (k > n) k = n;
    int64_t c = n;  /* the pairs that can be among the k highest: [0, c) */
    if (n >= 8 * TOP_SAMPLE && k * 8 <= n) {
        /* A threshold t from every (n / TOP_SAMPLE)-th value: its r-th highest, r about 1.5
         * times the k highest's share of the sample. The pairs of value >= t are moved to
         * the front in one pass (few of them: the branch is mostly not taken) and the
         * quickselect runs on those only; when fewer than k reach t (an unlucky sample),
         * on all. Every one of the k highest is >= t once k pairs are. */
        double smp[TOP_SAMPLE];
        const int64_t step = n / TOP_SAMPLE;
        for (int64_t u = 0; u < TOP_SAMPLE; u++) smp[u] = v[u * step];
        int64_t r = (k * TOP_SAMPLE * 3) / (2 * n) + 2;
        if (r > TOP_SAMPLE - 1) r = TOP_SAMPLE - 1;
        tka_values_nth_desc(smp, TOP_SAMPLE, r);
        const double t = smp[r];
        if (t == t) {  /* (not NaN) */
            int64_t m = 0;
            for (int64_t i = 0; i < n; i++)
                if (v[i] >= t) swap2(v, idx, m++, i);
            if (m >= k) c = m;
        }
    }
    if (k < c) pairs_nth_desc(v, idx, c, k);
    int64_t top = 0;
    for (int64_t i = 1; i < k; i++)
        if (before(v[i], idx[i], v[top], idx[top])) top = i;
    swap2(v, idx, 0, top);
}

static inline void swap3(double *v, int64_t *x, double *w, int64_t i, int64_t j)
{
    swap2(v, x, i, j);
    double t = w[i]; w[i] = w[j]; w[j] = t;
}

static int64_t weighted_top_select(double *v, int64_t *x, double *w, int64_t n, double target)
{
    int64_t lo = 0, hi = n;
    double acc = 0.0;
    while (hi - lo > 16) {
        int64_t a = lo, b = lo + (hi - lo) / 2, c = hi - 1, mi;
        if (before(v[a], x[a], v[b], x[b]))
            mi = before(v[b], x[b], v[c], x[c]) ? b : (before(v[a], x[a], v[c], x[c]) ? c : a);
        else
            mi = before(v[a], x[a], v[c], x[c]) ? a : (before(v[b], x[b], v[c], x[c]) ? c : b);
        swap3(v, x, w, mi, hi - 1);
        const double pv = v[hi - 1];
        const int64_t px = x[hi - 1];
        int64_t st = lo;
        double ml = 0.0;
        for (int64_t i = lo; i < hi - 1; i++) {
            if (before(v[i], x[i], pv, px)) {
                ml += w[i];
                swap3(v, x, w, i, st);
                st++;
            }
        }
        swap3(v, x, w, st, hi - 1);
        if (acc + ml >= target) {
            hi = st;
        } else {
            acc += ml + w[st];
            if (acc >= target) return st + 1;
            lo = st + 1;
        }
    }
    /* insertion sort of the remainder, then walk */
    for (int64_t i = lo + 1; i < hi; i++) {
        double tv = v[i], tw = w[i];
        int64_t tx = x[i], j = i;
        while (j > lo && before(tv, tx, v[j - 1], x[j - 1])) {
            v[j] = v[j - 1]; x[j] = x[j - 1]; w[j] = w[j - 1];
            j--;
        }
        v[j] = tv; x[j] = tx; w[j] = tw;
    }
    int64_t k = lo;
    while (k < hi && acc < target) acc += w[k++];
    return k;
}

/*
 * For large sets, one pass buckets the values (equal width between their min and max) with
 * the mass of each bucket, from the top down to the bucket where the mass reaches the
 * target; one more pass moves the members of the buckets above it to the front, then the
 * members of that bucket, and only those go through the selection. Bucket numbers never
 * decrease with the value and equal values share a bucket, so the buckets above hold keys
 * that come before every key of the crossing bucket and below, in the selection's order.
 */
#define TOP_BUCKETS 1024

int64_t tka_pairs_weighted_top(double *v, int64_t *x, double *w, int64_t n, double target)
{
    if (n < 4 * TOP_BUCKETS) return weighted_top_select(v, x, w, n, target);
    double lo = v[0], hi = v[0];
    for (int64_t i = 1; i < n; i++) {
        lo = v[i] < lo ? v[i] : lo;
        hi = v[i] > hi ? v[i] : hi;
    }
    const double scale = (double)TOP_BUCKETS / (hi - lo);
    if (!(hi > lo) || !(hi - lo < INFINITY) || !(scale < INFINITY))
        return weighted_top_select(v, x, w, n, target);
    int64_t cnt[TOP_BUCKETS];
    double mass[TOP_BUCKETS];
    memset(cnt, 0, sizeof cnt);
    memset(mass, 0, sizeof mass);
#define TOP_BUCKET(val) ((int)((val - lo) * scale) < TOP_BUCKETS ? (int)((val - lo) * scale) \
                                                                   : TOP_BUCKETS - 1)
    for (int64_t i = 0; i < n; i++) {
        const int b = TOP_BUCKET(v[i]);
        cnt[b]++;
        mass[b] += w[i];
    }
    double acc = 0.0;
    int bc = TOP_BUCKETS - 1;
    while (bc > 0 && acc + mass[bc] < target) acc += mass[bc--];
    /* three-way partition: buckets above bc | bucket bc | below */
    int64_t a = 0, i = 0, c = n;
    while (i < c) {
        const int b = TOP_BUCKET(v[i]);
        if (b > bc) {
            swap3(v, x, w, i, a);
            a++;
            i++;
        } else if (b == bc) {
            i++;
        } else {
            swap3(v, x, w, i, --c);
        }
    }
#undef TOP_BUCKET
    return a + weighted_top_select(v + a, x + a, w + a, c - a, target - acc);
}

int64_t tka_pairs_first(const double *v, const int64_t *x, int64_t from, int64_t n)
{
    int64_t best = from;
    for (int64_t t = from + 1; t < n; t++)
        if (before(v[t], x[t], v[best], x[best])) best = t;
    return best;
}

/* ---- weighted selection from the bottom */

int64_t tka_weights_drop_bottom(double *v, double *w, int64_t c, double budget, double *dropped_mass)
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

size_t tka_array_sort_scratch_bytes(int64_t n)
{
    return (size_t)(2 * n) * sizeof(uint64_t) + sizeof(int64_t) * RADIX_SIZE * 6;
}

void tka_array_sort_desc(const void *x, int is_f32, int64_t n, double *out, void *scratch)
{
    if (n < TKA_RADIX_MIN) {
        if (is_f32) for (int64_t i = 0; i < n; i++) out[i] = (double)((const float *)x)[i];
        else memcpy(out, x, (size_t)n * sizeof(double));
        tka_values_sort_desc(out, n);
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

void tka_pairs_sort_desc_radix(double *v, int64_t *x, int64_t n, double *tv, int64_t *tx)
{
    if (n < 512 || !tv || !tx) {
        tka_pairs_sort_desc(v, x, n);
        return;
    }
    uint64_t *ka = (uint64_t *)tv, *kb = (uint64_t *)v;  /* keys first, values rebuilt */
    int64_t *xa = x, *xb = tx;
    for (int64_t i = 0; i < n; i++) ka[i] = key64(v[i]);
    int64_t cnt[RADIX_SIZE];
    for (int shift = 0; shift < 64; shift += RADIX_BITS) {
        memset(cnt, 0, sizeof cnt);
        for (int64_t i = 0; i < n; i++) cnt[(ka[i] >> shift) & RADIX_MASK]++;
        if (cnt[(ka[0] >> shift) & RADIX_MASK] == n) continue;
        int64_t sum = 0;
        for (int b = 0; b < RADIX_SIZE; b++) { int64_t c = cnt[b]; cnt[b] = sum; sum += c; }
        for (int64_t i = 0; i < n; i++) {
            int64_t dst = cnt[(ka[i] >> shift) & RADIX_MASK]++;
            kb[dst] = ka[i];
            xb[dst] = xa[i];
        }
        uint64_t *tk = ka; ka = kb; kb = tk;
        int64_t *tt = xa; xa = xb; xb = tt;
    }
    /* back to values; ka and xa may be either buffer, so go through the scratch pair */
    for (int64_t i = 0; i < n; i++) {
        tv[i] = unkey64(ka[i]);
        tx[i] = xa[i];
    }
    memcpy(v, tv, (size_t)n * sizeof(double));
    memcpy(x, tx, (size_t)n * sizeof(int64_t));
    /* the sort is stable, but the input was in no particular order: equal values by
     * increasing position */
    for (int64_t i = 1; i < n; i++) {
        if (v[i] != v[i - 1] || x[i] > x[i - 1]) continue;
        int64_t t = x[i], j = i;
        while (j > 0 && v[j - 1] == v[i] && x[j - 1] > t) { x[j] = x[j - 1]; j--; }
        x[j] = t;
    }
}
