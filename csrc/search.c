/*
 * search.c - certified search (docs/design.md §4): building the key index, and Δk-Search /
 * MC-Search over it.
 *
 * Rounding. "The logit" of key i is the real number scale * (q . k_i) for the stored
 * float values. The search computes it as fl(sum_j q'_j k_ij) with q' = fl(scale * q);
 * both that value and the one any other float64 evaluation gives lie within
 * eta = (d + 8) 2^-52 |q'|_1 max|k| of the real logit (Higham's gamma_d bound, plus the
 * rounding of q'). Every upper bound (block summaries, proxies) is an upper bound on the
 * real q' . k padded by its own rounding, plus eta, so it is never below a computed logit.
 * The certificate is finally multiplied by e^{4 eta} and padded relatively, so it also
 * bounds the TV computed from any float64 evaluation of the logits.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"
#include "search.h"

/* Wall clock in seconds, for the optional per-stage timers (tka_search_args.stages). */
static inline double stage_now(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline size_t esize(tka_dtype dt) { return dt == TKA_F32 ? 4 : dt == TKA_F16 ? 2 : 8; }

static inline double key_at(const void *keys, tka_dtype dt, int64_t i)
{
    if (dt == TKA_F16) return (double)tka_half_to_float(((const uint16_t *)keys)[i]);
    return dt == TKA_F32 ? (double)((const float *)keys)[i] : ((const double *)keys)[i];
}

/* a float32 not below x / not above x */
static inline float f32_up(double x)
{
    float f = (float)x;
    if ((double)f < x) f = nextafterf(f, INFINITY);
    return f;
}
static inline float f32_down(double x)
{
    float f = (float)x;
    if ((double)f > x) f = nextafterf(f, -INFINITY);
    return f;
}

/* ================================================================== ordering */

/*
 * The tree is built on the keys themselves: every node is a contiguous range of rows, split
 * by moving rows in place (a two-sided partition, not a sort), so that each projection pass
 * streams its range through the dot kernel of the active instruction set. The top nodes are
 * split on the calling thread; once there are enough of them, their subtrees go to the
 * thread pool. Each node is split by the same code whichever thread runs it, so the order
 * does not depend on the thread count.
 */
typedef struct {
    char *keys;             /* n x d rows, reordered in place */
    int64_t *perm;          /* perm[s]: original position of row s */
    tka_dtype dt;
    int64_t d, bs;
    const tka_kernels *K;
    const int64_t *ranges;  /* the subtrees handed to the pool: [a, b) pairs */
} order_ctx;

/* One thread's scratch for nodes of up to m rows. */
typedef struct {
    double *proj, *val, *mu, *v, *w, *sample;
    unsigned char *left;
    char *row;
} order_scratch;

static tka_status order_scratch_alloc(tka_arena *s, int64_t m, int64_t d, size_t es,
                                      order_scratch *o)
{
    const int64_t dp = (d + 15) / 16 * 16;  /* the dot kernel reads its query padded */
    o->proj = tka_arena_alloc(s, (size_t)m * sizeof(double));
    o->val = tka_arena_alloc(s, (size_t)(m > 256 ? m : 256) * sizeof(double));
    o->left = tka_arena_alloc(s, (size_t)m);
    o->mu = tka_arena_alloc(s, (size_t)dp * sizeof(double));
    o->v = tka_arena_alloc(s, (size_t)dp * sizeof(double));
    o->w = tka_arena_alloc(s, (size_t)dp * sizeof(double));
    o->row = tka_arena_alloc(s, (size_t)d * es);
    o->sample = tka_arena_alloc(s, (size_t)(256 * dp) * sizeof(double));
    if (!o->proj || !o->val || !o->left || !o->mu || !o->v || !o->w || !o->row || !o->sample)
        return TKA_ERR_NOMEM;
    memset(o->v, 0, (size_t)dp * sizeof(double));
    return TKA_OK;
}

/* Split the node [a, b) of more than bs rows: its first (ceil(m/bs)/2)*bs rows become the
 * keys of largest projection on the node's leading principal direction (estimated by power
 * iteration on an evenly spaced sample of at most 256 of its keys). Returns the split. */
static int64_t split_node(const order_ctx *c, order_scratch *o, int64_t a, int64_t b)
{
    const int64_t m = b - a, d = c->d, bs = c->bs;
    const size_t rb = (size_t)d * esize(c->dt);
    char *x = c->keys + (size_t)a * rb;
    int64_t *perm = c->perm + a;
    double *mu = o->mu, *v = o->v, *w = o->w, *proj = o->proj, *S = o->sample, *u = o->val;
    const int64_t ns = m < 256 ? m : 256, dp = (d + 15) / 16 * 16;
    /* the sample, centred, as float64 rows of dp values (zero-padded) */
    memset(S, 0, (size_t)(ns * dp) * sizeof(double));
    memset(mu, 0, (size_t)d * sizeof(double));
    for (int64_t t = 0; t < ns; t++) {
        c->K->axpy[c->dt](x + (size_t)(t * m / ns) * rb, d, 1.0, S + t * dp);
        c->K->axpy[TKA_F64](S + t * dp, d, 1.0, mu);
    }
    for (int64_t j = 0; j < d; j++) mu[j] /= (double)ns;
    for (int64_t t = 0; t < ns; t++)
        for (int64_t j = 0; j < d; j++) S[t * dp + j] -= mu[j];
    for (int64_t j = 0; j < d; j++) v[j] = 1.0 / sqrt((double)d) * (j % 2 ? -1.0 : 1.0) + 0.01 * j;
    /* power iteration: v <- S^T S v / |S^T S v| */
    for (int it = 0; it < 3; it++) {
        c->K->dot[TKA_F64](S, ns, dp, v, d, 1.0, u);
        memset(w, 0, (size_t)d * sizeof(double));
        for (int64_t t = 0; t < ns; t++) c->K->axpy[TKA_F64](S + t * dp, d, u[t], w);
        double nn = 0.0;
        for (int64_t j = 0; j < d; j++) nn += w[j] * w[j];
        if (!(nn > 0.0) || !isfinite(nn)) break;
        nn = 1.0 / sqrt(nn);
        for (int64_t j = 0; j < d; j++) v[j] = w[j] * nn;
    }
    /* projections k . v (the mean's term is the same for every key of the node) */
    c->K->dot[c->dt](x, m, d, v, d, 1.0, proj);
    for (int64_t i = 0; i < m; i++)
        if (!isfinite(proj[i])) proj[i] = 0.0;
    /* the split value is the left-th largest projection; keys equal to it go left in
     * position order until the left side is full */
    const int64_t nblk = (m + bs - 1) / bs, left = (nblk / 2) * bs;
    memcpy(o->val, proj, (size_t)m * sizeof(double));
    tka_values_nth_desc(o->val, m, left - 1);
    const double t = o->val[left - 1];
    int64_t above = 0;
    for (int64_t i = 0; i < m; i++) above += proj[i] > t;
    int64_t ties = left - above;
    for (int64_t i = 0; i < m; i++) {
        o->left[i] = proj[i] > t || (proj[i] == t && ties > 0);
        if (proj[i] == t && ties > 0) ties--;
    }
    /* two-sided partition: swap a right-going row from the front with a left-going row
     * from the back until they meet */
    int64_t i = 0, j = m - 1;
    for (;;) {
        while (i < m && o->left[i]) i++;
        while (j >= 0 && !o->left[j]) j--;
        if (i >= j) break;
        memcpy(o->row, x + (size_t)i * rb, rb);
        memcpy(x + (size_t)i * rb, x + (size_t)j * rb, rb);
        memcpy(x + (size_t)j * rb, o->row, rb);
        const int64_t p = perm[i];
        perm[i] = perm[j];
        perm[j] = p;
        i++;
        j--;
    }
    return a + left;
}

/* Split [a, b) and every node below it, depth first, on this thread. */
static void order_subtree(const order_ctx *c, order_scratch *o, int64_t a, int64_t b)
{
    int64_t stack[2 * 128];  /* pending right sides: at most log2(n / bs) + 1 */
    int top = 0;
    for (;;) {
        if (b - a > c->bs && top < 2 * 128) {
            const int64_t mid = split_node(c, o, a, b);
            stack[top++] = mid;
            stack[top++] = b;
            b = mid;
            continue;
        }
        if (top == 0) return;
        b = stack[--top];
        a = stack[--top];
    }
}

static tka_status order_ranges(void *ctx, int64_t r0, int64_t r1, tka_arena *s, int64_t *err_row)
{
    const order_ctx *c = ctx;
    int64_t m = 0;
    for (int64_t r = r0; r < r1; r++)
        if (c->ranges[2 * r + 1] - c->ranges[2 * r] > m) m = c->ranges[2 * r + 1] - c->ranges[2 * r];
    const size_t mark = tka_arena_mark(s);
    order_scratch o;
    if (order_scratch_alloc(s, m, c->d, esize(c->dt), &o) != TKA_OK) {
        tka_arena_release(s, mark);
        *err_row = r0;
        return TKA_ERR_NOMEM;
    }
    for (int64_t r = r0; r < r1; r++) order_subtree(c, &o, c->ranges[2 * r], c->ranges[2 * r + 1]);
    tka_arena_release(s, mark);
    return TKA_OK;
}

/* The tree over the n rows at keys (their positions in perm move with them). */
static tka_status order_tree(void *keys, tka_dtype dt, int64_t n, int64_t d, int64_t bs,
                             int64_t *perm)
{
    if (n <= bs) return TKA_OK;
    order_ctx c = {.keys = keys, .perm = perm, .dt = dt, .d = d, .bs = bs,
                   .K = tka_kernels_active()};
    /* the top LEVELS levels breadth first on this thread (a fixed number: the same nodes
     * whatever the thread count), then up to 2^LEVELS subtrees on the pool */
    enum { LEVELS = 5 };
    int64_t *ranges = malloc(sizeof(int64_t) * 2 * (1 << LEVELS));
    tka_arena s;
    tka_arena_init(&s);
    order_scratch o;
    tka_status st = ranges ? order_scratch_alloc(&s, n, d, esize(dt), &o) : TKA_ERR_NOMEM;
    if (st != TKA_OK) {
        free(ranges);
        tka_arena_free(&s);
        return TKA_ERR_NOMEM;
    }
    int64_t nr = 1;
    ranges[0] = 0;
    ranges[1] = n;
    for (int lev = 0; lev < LEVELS; lev++) {
        int64_t out = 0;
        int64_t tmp[2 * (1 << LEVELS)];
        for (int64_t r = 0; r < nr; r++) {
            const int64_t a = ranges[2 * r], b = ranges[2 * r + 1];
            if (b - a <= bs) {
                tmp[out++] = a;
                tmp[out++] = b;
                continue;
            }
            const int64_t mid = split_node(&c, &o, a, b);
            tmp[out++] = a;
            tmp[out++] = mid;
            tmp[out++] = mid;
            tmp[out++] = b;
        }
        memcpy(ranges, tmp, (size_t)out * sizeof(int64_t));
        nr = out / 2;
    }
    tka_arena_free(&s);
    c.ranges = ranges;
    int64_t bad = -1;
    st = tka_rows_run_parallel(nr, (double)n * (double)d * 16.0, order_ranges, &c, &bad);
    free(ranges);
    return st;
}

/*
 * Repair passes. The median splits cut through groups of similar keys (clusters) at every
 * level of the tree, and each cut leaves the pieces on either side in blocks shared with
 * other groups: on clustered keys (segments of 32-256 keys near 512 centres, n = 262144,
 * d = 128) a third of the blocks had radii about three times the typical one, and these
 * blocks, whose bounds no summary can make tight, were most of what a row's search read.
 * So the blocks whose radius exceeds REPAIR_LOOSE times the median are gathered at the end
 * (whole blocks swapped) and ordered again by the tree among themselves: pieces of one
 * group that the first tree left in different branches meet again. Up to REPAIR_PASSES
 * passes, while each pass leaves at most REPAIR_GAIN of the previous pass's loose blocks
 * (that data: 34% -> 19% -> 13% -> 10% of the blocks). Keys without such groups have
 * few loose blocks: little to redo. Only the full blocks take part (the last one, partial,
 * stays last); the result depends only on the keys (not on the thread count).
 */
#define REPAIR_PASSES 3
#define REPAIR_LOOSE 1.5
#define REPAIR_GAIN 0.8
enum { REPAIR_UNIT = 64 };  /* blocks per unit of the radius pass */

typedef struct {
    const char *keys;
    tka_dtype dt;
    int64_t d, bs, nb;
    double *rad2;  /* per block: the largest squared distance of a key to the block's mean */
} radius_ctx;

/* a row of keys (any dtype) as float64, by the axpy kernel (1 * x + 0: exact) */
static inline void row_f64(const tka_kernels *K, const char *keys, tka_dtype dt, int64_t i,
                           int64_t d, double *out)
{
    memset(out, 0, (size_t)d * sizeof(double));
    K->axpy[dt](keys + (size_t)(i * d) * esize(dt), d, 1.0, out);
}

/* sum_j (a_j - b_j)^2 in four chains */
static inline double sqdist(const double *a, const double *b, int64_t d)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t j = 0;
    for (; j + 4 <= d; j += 4) {
        const double e0 = a[j] - b[j], e1 = a[j + 1] - b[j + 1];
        const double e2 = a[j + 2] - b[j + 2], e3 = a[j + 3] - b[j + 3];
        s0 += e0 * e0;
        s1 += e1 * e1;
        s2 += e2 * e2;
        s3 += e3 * e3;
    }
    for (; j < d; j++) s0 += (a[j] - b[j]) * (a[j] - b[j]);
    return (s0 + s1) + (s2 + s3);
}

/* The largest |x_j| of d float64 values, four chains (a NaN is skipped, as by a > m). */
static inline double absmax(const double *x, int64_t d)
{
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    int64_t j = 0;
    for (; j + 4 <= d; j += 4) {
        const double v0 = fabs(x[j]), v1 = fabs(x[j + 1]), v2 = fabs(x[j + 2]), v3 = fabs(x[j + 3]);
        a0 = v0 > a0 ? v0 : a0;
        a1 = v1 > a1 ? v1 : a1;
        a2 = v2 > a2 ? v2 : a2;
        a3 = v3 > a3 ? v3 : a3;
    }
    for (; j < d; j++) a0 = fabs(x[j]) > a0 ? fabs(x[j]) : a0;
    a0 = a1 > a0 ? a1 : a0;
    a2 = a3 > a2 ? a3 : a2;
    return a2 > a0 ? a2 : a0;
}

static tka_status block_radii(void *ctx, int64_t u0, int64_t u1, tka_arena *s, int64_t *err_row)
{
    const radius_ctx *c = ctx;
    const int64_t d = c->d, bs = c->bs;
    const tka_kernels *K = tka_kernels_active();
    const size_t mark = tka_arena_mark(s);
    double *mu = tka_arena_alloc(s, (size_t)(d + 8) * sizeof(double));
    double *row = tka_arena_alloc(s, (size_t)(d + 8) * sizeof(double));
    if (!mu || !row) {
        tka_arena_release(s, mark);
        *err_row = u0;
        return TKA_ERR_NOMEM;
    }
    for (int64_t b = u0 * REPAIR_UNIT; b < u1 * REPAIR_UNIT && b < c->nb; b++) {
        const int64_t i0 = b * bs;
        memset(mu, 0, (size_t)d * sizeof(double));
        for (int64_t i = i0; i < i0 + bs; i++)
            K->axpy[c->dt](c->keys + (size_t)(i * d) * esize(c->dt), d, 1.0, mu);
        for (int64_t j = 0; j < d; j++) mu[j] /= (double)bs;
        double r = 0.0;
        for (int64_t i = i0; i < i0 + bs; i++) {
            row_f64(K, c->keys, c->dt, i, d, row);
            const double q = sqdist(row, mu, d);
            r = q > r ? q : r;
        }
        c->rad2[b] = isfinite(r) ? r : 0.0;
    }
    tka_arena_release(s, mark);
    return TKA_OK;
}

/* Swap blocks a and b (bs rows each, and their positions); tmp: bs rows. */
static void swap_blocks(char *keys, int64_t *perm, size_t rb, int64_t bs, int64_t a, int64_t b,
                        char *tmp, int64_t *ptmp)
{
    const size_t len = (size_t)bs * rb;
    memcpy(tmp, keys + (size_t)a * len, len);
    memcpy(keys + (size_t)a * len, keys + (size_t)b * len, len);
    memcpy(keys + (size_t)b * len, tmp, len);
    memcpy(ptmp, perm + a * bs, (size_t)bs * sizeof(int64_t));
    memcpy(perm + a * bs, perm + b * bs, (size_t)bs * sizeof(int64_t));
    memcpy(perm + b * bs, ptmp, (size_t)bs * sizeof(int64_t));
}

static tka_status order_repair(void *keys, tka_dtype dt, int64_t n, int64_t d, int64_t bs,
                               int64_t *perm)
{
    const int64_t nb = n / bs;
    if (nb < 8) return TKA_OK;
    const size_t rb = (size_t)d * esize(dt);
    double *rad2 = malloc((size_t)nb * 2 * sizeof(double));
    char *tmp = malloc((size_t)bs * rb);
    int64_t *ptmp = malloc((size_t)bs * sizeof(int64_t));
    tka_status st = rad2 && tmp && ptmp ? TKA_OK : TKA_ERR_NOMEM;
    int64_t prev = nb;
    for (int pass = 0; pass < REPAIR_PASSES && st == TKA_OK; pass++) {
        radius_ctx rc = {keys, dt, d, bs, nb, rad2};
        int64_t bad = -1;
        st = tka_rows_run_parallel((nb + REPAIR_UNIT - 1) / REPAIR_UNIT, (double)n * (double)d * 3.0,
                                   block_radii, &rc, &bad);
        if (st != TKA_OK) break;
        double *srt = rad2 + nb;
        memcpy(srt, rad2, (size_t)nb * sizeof(double));
        tka_values_nth_desc(srt, nb, nb / 2);
        const double lim = REPAIR_LOOSE * REPAIR_LOOSE * srt[nb / 2];  /* squared radii */
        if (!(lim > 0.0)) break;
        /* the loose blocks to the end, in one sweep from both sides */
        int64_t lo = 0, hi = nb - 1, loose = 0;
        for (int64_t b = 0; b < nb; b++) loose += rad2[b] > lim;
        if (loose < 2 || (double)loose > REPAIR_GAIN * (double)prev) break;
        for (;;) {
            while (lo < nb && !(rad2[lo] > lim)) lo++;
            while (hi >= 0 && rad2[hi] > lim) hi--;
            if (lo >= hi) break;
            swap_blocks(keys, perm, rb, bs, lo, hi, tmp, ptmp);
            const double t = rad2[lo];
            rad2[lo] = rad2[hi];
            rad2[hi] = t;
        }
        const int64_t first = nb - loose;
        st = order_tree((char *)keys + (size_t)(first * bs) * rb, dt, loose * bs, d, bs,
                        perm + first * bs);
        prev = loose;
    }
    free(rad2);
    free(tmp);
    free(ptmp);
    return st;
}

tka_status tka_index_order(void *keys, tka_dtype dt, int64_t n, int64_t d, int64_t bs,
                           int64_t *perm)
{
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    tka_status st = order_tree(keys, dt, n, d, bs, perm);
    if (st == TKA_OK) st = order_repair(keys, dt, n, d, bs, perm);
    return st;
}

/* ================================================================== filling */

/* The work is cut into units of up to FILL_BLOCKS blocks of one head, so that one large head
 * spreads over the threads too; each unit also records the largest |key| of its keys. */
enum { FILL_BLOCKS = 64 };

typedef struct {
    const tka_key_index *ix;
    const tka_key_index_out *o;
    int64_t k0;
    int64_t b_first, units_per_head;  /* first block to recompute; units of each head */
    double *unit_max;                 /* per unit: the largest |key| of its new keys */
    const tka_kernels *K;             /* for the blocks' second moments */
} fill_ctx;

/*
 * 4-bit proxies of the keys [i0, i1) of one block, against the block's stored centroid
 * ctr: a step s_i per key, 2.5 / 7.4 of the root mean square of k_ij - ctr_j over its d
 * dimensions, rounded up to float32 (steps from the largest deviation over 7.4 were so
 * coarse that on clustered keys, d = 128, rows scored up to 2.6x the keys the int8 proxies
 * let them score; one step per block, from its deviations' root mean square, up to 1.4x;
 * these steps, the same keys within 3%), codes z_ij = round((k_ij - ctr_j) / s_i) clamped
 * to [-8, 7] (a clamped deviation only enlarges e_i), stored as z + 8 (two per byte, the
 * layout of tka_search_kernels.dot_u4), and e_i >= ||k_i - ctr - s_i z_i||. The residual
 * is computed as (k - ctr) - s z (s z exact), each subtraction rounded: the computed vector
 * is within 2^-52 (||k - ctr|| + ||r||) of the real one, so e_i adds 2^-50 ||k - ctr|| and
 * the padding of the sum of squares, rounded up. A key on its centroid (or with deviations
 * out of float32's range) gets the step 0: every code 0, e_i its whole deviation.
 */
static void fill_codes4(const tka_key_index *ix, const tka_key_index_out *o, const char *kb,
                        int64_t h, int64_t i0, int64_t i1, const float *ctr, double pad)
{
    const int64_t d = ix->d, hb = (d + 1) / 2;
    for (int64_t i = i0; i < i1; i++) {
        double mdev = 0.0, msq = 0.0;
        for (int64_t j = 0; j < d; j++) {
            const double e = fabs(key_at(kb, ix->dtype, i * d + j) - (double)ctr[j]);
            if (e > mdev) mdev = e;
            msq += e * e;
        }
        float st = f32_up(2.5 * sqrt(msq / (double)d) / 7.4);
        if (!(mdev > 1e-30 && mdev < 1e37 && st > 1e-30f)) st = 0.0f;
        const size_t ko = (size_t)(h * ix->cap + i);
        uint8_t *z = o->pz4 + ko * (size_t)hb;
        memset(z, 0, (size_t)hb);
        double ss = 0.0, sd = 0.0;
        for (int64_t j = 0; j < d; j++) {
            const double x = key_at(kb, ix->dtype, i * d + j) - (double)ctr[j];
            double t = st > 0.0f ? nearbyint(x / (double)st) : 0.0;
            if (t > 7.0) t = 7.0;
            if (t < -8.0) t = -8.0;
            const uint8_t u = (uint8_t)(t + 8.0);
            z[j < hb ? j : j - hb] |= (uint8_t)(j < hb ? u : u << 4);
            const double e = x - (double)st * t;
            ss += e * e;
            sd += x * x;
        }
        o->pscale[ko] = st;
        o->perr[ko] = f32_up(nextafter((sqrt(ss) + 0x1p-50 * sqrt(sd)) * pad, INFINITY));
    }
}

/*
 * The second moments of one block (keys [i0, i1), m of them, centroid ctr as stored) for
 * the streaming search's block mass bound (docs/design.md §4): with e_i = k_i - ctr (real
 * numbers), out[0] >= lambda_max(G), G = (e_i . e_j) the m x m Gram matrix (whose nonzero
 * eigenvalues are those of sum_i e_i e_i^T), and out[1] >= ||sum_i e_i||. Both are +inf
 * when not computed (blocks of more than MOM_MAX_BS keys, non-finite or huge deviations).
 *
 * How lambda_max is bounded, and why every term is an upper bound:
 * - e'_i = 2^p e_i, p chosen so that max |e'_ij| lies in [1, 2) (exact scaling), rounded
 *   to float32 rows x_i: ||x_i - e'_i|| <= u ||e'_i|| + 2^-149 sqrt(d), u = 2^-23 (the
 *   rounding of k - ctr in float64 included).
 * - Ghat_ij: x_i . x_j by the sdot kernels (float32 fused multiply-adds in lanes, lanes
 *   summed): within gamma |x_i| |x_j| (+ d 2^-149 for underflowed products),
 *   gamma = (d + 8) 2^-23, about twice the accumulation's gamma_d. Only the upper triangle
 *   is used (Ghat symmetric), so Ghat = G' + D, ||D||_F <= (gamma + 3u) sum_i |x_i|^2 (1 + 3u)
 *   + m d 2^-140 (G' the Gram matrix of e').
 * - Weyl: lambda_max(G') <= lambda_max(Ghat) + ||D||_2, and for a real symmetric matrix
 *   lambda_max(Ghat)^4 <= sum_k lambda_k^4 = ||Ghat^2||_F^2.
 * - Hhat = Ghat Ghat in float64 (the dot kernels): ||Hhat - Ghat^2||_F <= gm ||Ghat||_F^2,
 *   gm = (m + 8) 2^-52; the Frobenius norms are sums of squares in float64 (relative error
 *   below (m^2 + 8) 2^-52, padded by a factor 1 + 2^-30 each).
 * - Also lambda_max(G') <= tr G' = sum_i |e'_i|^2 <= sum_i |x_i|^2 (1 + 3u) (+ the underflow
 *   term): the smaller of the two bounds is kept, and scaled back by 2^-2p.
 * ||sum_i e_i||: the float64 sum of the m deviations per dimension is within
 * (m + 2) 2^-52 sum_i |e_ij| of the real one; summed over j in norm, that is at most
 * (m + 2) 2^-52 sum_i |e_i| <= (m + 2) 2^-52 sqrt(m sum_i |e_i|^2).
 * sc: scratch of mom_scratch_bytes(d).
 */
#define MOM_MAX_BS 256
static size_t mom_scratch_bytes(int64_t d)
{
    const size_t dp = (size_t)(d + 15) / 16 * 16, mp = MOM_MAX_BS + 8;
    const size_t g = MOM_MAX_BS * (mp > dp ? mp : dp);  /* G, or the deviations before it */
    return MOM_MAX_BS * dp * sizeof(float) + (g + 4 * MOM_MAX_BS + 2 * dp) * sizeof(double) + 128;
}

static void block_moments(const tka_kernels *K, const tka_key_index *ix, const char *kb,
                          int64_t i0, int64_t i1, const float *ctr, void *sc, double *out)
{
    const int64_t d = ix->d, m = i1 - i0;
    out[0] = out[1] = INFINITY;
    if (m < 1 || m > MOM_MAX_BS) return;
    const int64_t dp = (d + 15) / 16 * 16, mp = (m + 7) / 8 * 8;
    float *x = sc;
    double *G = (double *)((char *)sc + (size_t)(MOM_MAX_BS * dp) * sizeof(float));
    const int64_t gmax = MOM_MAX_BS * (MOM_MAX_BS + 8 > dp ? MOM_MAX_BS + 8 : dp);
    double *H4 = G + gmax, *ssum = H4 + 4 * MOM_MAX_BS;
    memset(ssum + dp, 0, (size_t)d * sizeof(double));
    /* the deviations (float64, rows of dp in G's room until G is computed), their largest
     * magnitude, their sum per dimension, their squared norms */
    double *ev = G;
    double emax = 0.0, tr = 0.0, en1 = 0.0;
    memset(ssum, 0, (size_t)d * sizeof(double));
    for (int64_t i = 0; i < m; i++) {
        double *e = ev + i * dp;
        row_f64(K, kb, ix->dtype, i0 + i, d, e);
        for (int64_t j = 0; j < d; j++) {
            e[j] -= (double)ctr[j];
            ssum[j] += e[j];
        }
        const double a = absmax(e, d);  /* (a NaN makes tr NaN below) */
        emax = a > emax ? a : emax;
        const double q = sqdist(e, ssum + dp, d);  /* (ssum + dp: d zeros) */
        tr += q;
        en1 += sqrt(q);
    }
    if (!(emax < 1e300) || !(tr < INFINITY)) return;
    const double g52 = 0x1p-52;
    double sn = 0.0;
    for (int64_t j = 0; j < d; j++) sn += ssum[j] * ssum[j];
    out[1] = nextafter((sqrt(sn) * (1.0 + (double)(d + 4) * g52)
                        + (double)(m + 2) * g52 * en1 * (1.0 + (double)(d + 4) * g52))
                       * (1.0 + 0x1p-40), INFINITY);
    if (emax == 0.0) {  /* every key on its centroid */
        out[0] = 0.0;
        return;
    }
    int p2;
    frexp(emax, &p2);  /* emax = f 2^p2, f in [0.5, 1): 2^(1 - p2) emax in [1, 2) */
    const int p = 1 - p2;
    memset(x, 0, (size_t)(m * dp) * sizeof(float));
    const double sc2 = ldexp(1.0, p);  /* (products below 2^-1022 underflow: far below the
                                          2^-149 allowed per element) */
    double tx = 0.0;  /* sum_i |x_i|^2 */
    for (int64_t i = 0; i < m; i++) {
        double t0 = 0.0, t1 = 0.0;
        int64_t j = 0;
        for (; j < d; j++) x[i * dp + j] = (float)(ev[i * dp + j] * sc2);
        for (j = 0; j + 2 <= d; j += 2) {
            t0 += (double)x[i * dp + j] * (double)x[i * dp + j];
            t1 += (double)x[i * dp + j + 1] * (double)x[i * dp + j + 1];
        }
        if (j < d) t0 += (double)x[i * dp + j] * (double)x[i * dp + j];
        tx += t0 + t1;
    }
    tx *= 1.0 + (double)(m * d + 8) * g52;
    /* Ghat, row by row (four rows per call), only i <= j kept and mirrored */
    memset(G, 0, (size_t)(m * mp) * sizeof(double));
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) K->sdot4(x, m, dp, x + i * dp, dp, d, 1.0, G + i * mp, mp);
    for (; i < m; i++) K->sdot(x, m, dp, x + i * dp, d, 1.0, G + i * mp);
    double gf = 0.0;  /* ||Ghat||_F^2 */
    for (int64_t a = 0; a < m; a++)
        for (int64_t b = a; b < m; b++) {
            const double v = G[a * mp + b];
            G[b * mp + a] = v;
            gf += (a == b ? 1.0 : 2.0) * v * v;
        }
    gf *= 1.0 + 0x1p-30;
    /* ||Ghat^2||_F^2 from Hhat = Ghat Ghat, four rows at a time */
    double hf = 0.0;
    for (i = 0; i < m; i += 4) {
        const int64_t r = m - i < 4 ? m - i : 4;
        if (r == 4) {
            K->dot4[TKA_F64](G, m, mp, G + i * mp, mp, m, 1.0, H4, MOM_MAX_BS);
        } else {
            for (int64_t t = 0; t < r; t++)
                K->dot[TKA_F64](G, m, mp, G + (i + t) * mp, m, 1.0, H4 + t * MOM_MAX_BS);
        }
        for (int64_t t = 0; t < r; t++)
            for (int64_t b = 0; b < m; b++) hf += H4[t * MOM_MAX_BS + b] * H4[t * MOM_MAX_BS + b];
    }
    hf *= 1.0 + 0x1p-30;
    const double u = 0x1p-23, gam = (double)(d + 8) * 0x1p-23;
    const double under = (double)m * (double)d * 0x1p-140;
    const double dnorm = (gam + 3.0 * u) * tx * (1.0 + 3.0 * u) + under;
    const double g2 = sqrt(sqrt(hf) * (1.0 + 0x1p-30) + (double)(m + 8) * g52 * gf)
                      * (1.0 + 0x1p-30);
    double lam = g2 + dnorm;
    const double trb = tx * (1.0 + 3.0 * u) + under;
    if (trb < lam) lam = trb;
    out[0] = nextafter(ldexp(lam * (1.0 + 0x1p-30), -2 * p), INFINITY);
}

/* x rounded to an integer, ties to even (as nearbyint in the default rounding mode), for
 * |x| < 2^51 */
static inline double round_ne(double x)
{
    const double big = copysign(0x1.8p52, x);
    return (x + big) - big;
}

static tka_status fill_units(void *c, int64_t u0, int64_t u1, tka_arena *s, int64_t *err_row)
{
    fill_ctx *cx = c;
    const tka_key_index *ix = cx->ix;
    const tka_key_index_out *o = cx->o;
    const tka_kernels *K = cx->K;
    const int64_t d = ix->d, bs = ix->block_size, n = ix->n;
    const size_t mark = tka_arena_mark(s);
    double *acc = tka_arena_alloc(s, (size_t)(d + 8) * sizeof(double));
    double *row = tka_arena_alloc(s, (size_t)(d + 8) * sizeof(double));
    double *lo = tka_arena_alloc(s, (size_t)(d + 8) * sizeof(double));
    double *hi = tka_arena_alloc(s, (size_t)(d + 8) * sizeof(double));
    double *ct = tka_arena_alloc(s, (size_t)(d + 8) * sizeof(double));
    void *msc = o->mom ? tka_arena_alloc(s, mom_scratch_bytes(d)) : NULL;
    if (!acc || !row || !lo || !hi || !ct || (o->mom && !msc)) {
        tka_arena_release(s, mark);
        *err_row = u0;
        return TKA_ERR_NOMEM;
    }
    const double pad = 1.0 + (double)(d + 8) * 0x1p-52;
    for (int64_t un = u0; un < u1; un++) {
        const int64_t h = un / cx->units_per_head;
        const int64_t bu = cx->b_first + (un % cx->units_per_head) * FILL_BLOCKS;
        const int64_t bu_end = bu + FILL_BLOCKS;
        const int64_t k_lo = bu * bs > cx->k0 ? bu * bs : cx->k0;
        const int64_t k_hi = bu_end * bs < n ? bu_end * bs : n;
        const char *kb = (const char *)ix->keys + (size_t)(h * ix->cap * d) * esize(ix->dtype);
        double mx = 0.0;
        for (int64_t i = k_lo; i < k_hi; i++) {
            row_f64(K, kb, ix->dtype, i, d, row);
            const double a = absmax(row, d);
            if (a > mx) mx = a;
        }
        cx->unit_max[un] = mx;
        for (int64_t b = bu; b < bu_end && b * bs < n; b++) {
            const int64_t i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
            const size_t bo = (size_t)(h * ix->cap_blocks + b) * (size_t)d;
            /* one pass: the block's per-dimension extremes and sums */
            for (int64_t j = 0; j < d; j++) {
                lo[j] = INFINITY;
                hi[j] = -INFINITY;
            }
            memset(acc, 0, (size_t)d * sizeof(double));
            for (int64_t i = i0; i < i1; i++) {
                row_f64(K, kb, ix->dtype, i, d, row);
                for (int64_t j = 0; j < d; j++) {
                    lo[j] = row[j] < lo[j] ? row[j] : lo[j];
                    hi[j] = row[j] > hi[j] ? row[j] : hi[j];
                }
                K->axpy[TKA_F64](row, d, 1.0, acc);  /* acc += row (1 * x exact) */
            }
            if (ix->summary & TKA_SUM_MINMAX) {
                float *lo32 = o->lo + bo, *hi32 = o->hi + bo;
                for (int64_t j = 0; j < d; j++) {
                    lo32[j] = f32_down(lo[j]);
                    hi32[j] = f32_up(hi[j]);
                }
            }
            if (ix->summary & TKA_SUM_BALL) {
                float *ctr = o->ctr + bo;
                for (int64_t j = 0; j < d; j++) {
                    ctr[j] = (float)(acc[j] / (double)(i1 - i0));
                    ct[j] = (double)ctr[j];
                }
                double r = 0.0;
                for (int64_t i = i0; i < i1; i++) {
                    row_f64(K, kb, ix->dtype, i, d, row);
                    const double ss = sqdist(row, ct, d);
                    if (ss > r) r = ss;
                    else if (ss != ss) r = INFINITY;
                }
                /* radius of the stored (rounded) centroid, rounded up (the padding covers
                 * the rounding of the sum of squares in any order) */
                o->rad[h * ix->cap_blocks + b] = nextafter(sqrt(r) * pad, INFINITY);
                if (o->mom)
                    block_moments(K, ix, kb, i0, i1, ctr, msc,
                                  o->mom + 2 * (h * ix->cap_blocks + b));
                if (o->pz4) fill_codes4(ix, o, kb, h, i0, i1, ctr, pad);
            }
        }
        if (o->pz) {
            for (int64_t i = k_lo; i < k_hi; i++) {
                const size_t ko = (size_t)(h * ix->cap + i);
                int8_t *z = o->pz + ko * (size_t)d;
                row_f64(K, kb, ix->dtype, i, d, row);
                const double m = absmax(row, d);
                /* the scale must be a normal float32 with k / scale within [-127, 127] */
                float sc = f32_up(m / 127.0);
                if (!(m > 1e-30 && m < 1e37)) sc = 0.0f;
                const double scd = (double)sc;
                /* the codes (in acc), then the residual k - sc t (sc t exact in float64) */
                if (sc > 0.0f) {
                    for (int64_t j = 0; j < d; j++) {
                        double t = round_ne(row[j] / scd);
                        t = t > 127.0 ? 127.0 : t;
                        acc[j] = t < -127.0 ? -127.0 : t;
                    }
                } else {
                    memset(acc, 0, (size_t)d * sizeof(double));
                }
                double s0 = 0.0, s1 = 0.0;
                int64_t j = 0;
                for (; j + 2 <= d; j += 2) {
                    z[j] = (int8_t)acc[j];
                    z[j + 1] = (int8_t)acc[j + 1];
                    const double e0 = row[j] - scd * acc[j], e1 = row[j + 1] - scd * acc[j + 1];
                    s0 += e0 * e0;
                    s1 += e1 * e1;
                }
                if (j < d) {
                    z[j] = (int8_t)acc[j];
                    const double e0 = row[j] - scd * acc[j];
                    s0 += e0 * e0;
                }
                o->pscale[ko] = sc;
                o->perr[ko] = f32_up(nextafter(sqrt(s0 + s1) * pad, INFINITY));
            }
        }
    }
    tka_arena_release(s, mark);
    return TKA_OK;
}

tka_status tka_index_fill(const tka_key_index *ix, const tka_key_index_out *out, int64_t k0,
                          tka_error *err)
{
    err->row = -1;
    err->what = NULL;
    const int64_t bs = ix->block_size, b_first = k0 / bs, b_end = (ix->n + bs - 1) / bs;
    const int64_t per = b_end > b_first ? (b_end - b_first + FILL_BLOCKS - 1) / FILL_BLOCKS : 0;
    if (per == 0 || ix->heads == 0) return TKA_OK;
    const int64_t units = ix->heads * per;
    double *unit_max = malloc((size_t)units * sizeof(double));
    if (!unit_max) return TKA_ERR_NOMEM;
    fill_ctx cx = {ix, out, k0, b_first, per, unit_max, tka_kernels_active()};
    double work = (double)ix->heads * (double)(ix->n - k0) * (double)ix->d * 4.0;
    int64_t bad = -1;
    tka_status st = tka_rows_run_parallel(units, work, fill_units, &cx, &bad);
    if (st == TKA_OK) {
        /* maxabs covers the new keys: raised, never lowered */
        for (int64_t h = 0; h < ix->heads; h++) {
            double mx = k0 > 0 ? out->maxabs[h] : 0.0;
            for (int64_t u = h * per; u < (h + 1) * per; u++)
                if (unit_max[u] > mx) mx = unit_max[u];
            out->maxabs[h] = mx;
        }
    }
    free(unit_max);
    return st;
}

/* ================================================================== search */

/* Random stream: splitmix64 over (seed, row). */
static inline uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline double uniform01(uint64_t *x) { return (double)(splitmix(x) >> 11) * 0x1p-53; }

typedef struct {
    const tka_key_index *ix;
    const tka_search_args *a;
    const tka_kernels *K;          /* the kernel set of this call */
    const tka_search_kernels *kern; /* its search kernels */
    tka_search_row *rows;
    double *out_v;
    const double *lw;      /* lw[b] >= e^{-b LEVEL_W}: mass bound of a key on level b */
    struct group_slot *slots; /* per group of the streaming search, when threads share its
                                 rows (see group_slot), else NULL */
    int64_t ngroups;
    _Atomic int64_t started;  /* groups begun */
} search_ctx;

/*
 * Proxy levels: unscored keys of expanded blocks are kept in lists by level
 * b = floor((ref - p) / LEVEL_W) of their proxy bound p (clamped to the last level), so
 * that a key on level b has mass <= e^{ref - b LEVEL_W}. Levels are scored exactly one
 * after the other: no per-key priority queue and no exp() per proxy.
 */
#define LEVEL_W TKA_LEVEL_W
#define NLEVELS TKA_NLEVELS
/* keys ahead whose rows are prefetched while scoring a level */
#define PREFETCH 6

static tka_status full_output(const search_ctx *cx, int64_t r, int64_t h, int64_t n, int64_t k,
                              const int64_t *oi, int dense_out, const double *kv,
                              const double *wk_in, double mx, int fw, tka_arena *s);
/* levels linked ahead of the level being scored; keys further down are only counted */
#define LINK_W 128

/* Per-row working state. */
typedef struct {
    int64_t n, d, bs, nb;
    const char *keys;
    size_t es;
    const double *qs;      /* scaled query */
    double eta;            /* rounding allowance on every logit */
    double ref;            /* reference of the levels (stream_ref): unit of the bound masses */
    double sprobe;         /* the exact logit stream_ref chose it by (-inf if none) */
    double umax;           /* the largest block bound */
    /* blocks by decreasing bound */
    double *ub;
    double *um;            /* streaming, with the blocks' moments: per block a bound whose e^um
                              times the block's size bounds its keys' mass (else NULL) */
    double *um_buf;        /* storage for um */
    double zbudget;        /* with um: the unscored mass the sample's cut leaves (units e^ref) */
    const double *cdot;    /* q'.c of every block's centroid (block_dots), or NULL */
    int64_t cshare;        /* rows that shared the pass of cdot (its bytes are split) */
    int64_t *bord;
    double *bsuf;          /* bsuf[j] >= sum_{t >= j} |B_t| e^{ub_t - ref} */
    int64_t j;             /* next unexpanded block */
    /* proxy levels: entry e (in insertion order) is key ekey[e]; lists through lnext[e] */
    int64_t *lhead, *lnext, *lcnt, *ekey;
    int64_t lmax;
    int64_t lmin_new;      /* lowest level a key went to since it was last reset */
    /* scored keys */
    double *sv;
    int64_t *si, ns;
    double m, zs;          /* largest scored logit, sum e^{s - m} */
    double fm;             /* e^{ref - m}, rounded up (+inf past e^700) */
    uint8_t *mark;         /* MC: keys whose logit was computed */
    int64_t distinct;
    int64_t unscored;      /* keys not scored by the deterministic search */
    int64_t npool;         /* keys on proxy levels (for the rounding pads) */
    int64_t nent;          /* entries linked into the level lists */
    double pool;           /* running sum of lw[level] over unscored keys on levels */
    double pool_max;       /* largest value the running sum has taken */
    int64_t pool_ops;      /* updates of the running sum */
    double bytes;
    int64_t proxies, blocks;
    int timing;                  /* per-stage timers on (tka_search_args.stages) */
    double st[TKA_STAGES], sb[TKA_STAGES]; /* seconds and bytes per stage */
    double wall;                 /* with timers: seconds spent on the row */
} srow;

static inline void add_scored(srow *w, double s, int64_t i)
{
    w->sv[w->ns] = s;
    w->si[w->ns++] = i;
    if (s > w->m) {
        w->zs = w->zs * exp(w->m - s) + 1.0;
        w->m = s;
        w->fm = w->ref - s > 700.0 ? INFINITY : exp(w->ref - s) * (1.0 + 0x1p-48);
    } else {
        w->zs += exp(s - w->m);
    }
}

static inline void note_computed(srow *w, int64_t i)
{
    if (w->mark) {
        if (!w->mark[i]) {
            w->mark[i] = 1;
            w->distinct++;
        }
    } else {
        w->distinct++;
    }
}

/* exact logits of keys [i0, i0 + m) (stored positions) into out */
static inline void score(const search_ctx *cx, srow *w, int64_t i0, int64_t m, double *out)
{
    if (cx->ix->dtype == TKA_F32)
        cx->kern->dot_f32(w->qs, (const float *)w->keys + i0 * w->d, w->d, m, out);
    else if (cx->ix->dtype == TKA_F16)
        cx->kern->dot_f16(w->qs, (const uint16_t *)w->keys + i0 * w->d, w->d, m, out);
    else
        cx->kern->dot_f64(w->qs, (const double *)w->keys + i0 * w->d, w->d, m, out);
    w->bytes += (double)m * (double)w->d * (double)w->es;
    if (w->timing) w->sb[TKA_STAGE_RERANK] += (double)m * (double)w->d * (double)w->es;
}

/* Bound on the mass of everything unscored, units e^{ref}, rounded up: unexpanded blocks
 * plus `pool` (the level masses, already rounded up by the caller). */
static inline double unscored_mass(const srow *w, double pool)
{
    if (w->unscored == 0) return 0.0;
    return w->bsuf[w->j] * (1.0 + (double)(w->nb + 4) * 0x1p-52) + pool;
}

/* sum over levels b > t of lcnt[b] lw[b], rounded up */
static double levels_above(const search_ctx *cx, const srow *w, int64_t t)
{
    double p = 0.0;
    for (int64_t b = t + 1; b <= w->lmax; b++) p += (double)w->lcnt[b] * cx->lw[b];
    return p * (1.0 + (double)(w->lmax + 4) * 0x1p-52);
}

/* u (in units of e^{ref}) in units of e^{m}, rounded up; +inf when too large. */
static inline double to_m_units(const srow *w, double u)
{
    if (u <= 0.0) return 0.0;
    double v = u * w->fm;
    return v * (1.0 + 0x1p-50);
}

/* Account a row's kept set: the positions it reports (bytes), and with the stage timers
 * the certificate's time since t0 and the value rows the output will read. Returns the
 * time the certificate stage ended (0 without timers). */
/* Storage for a row's k kept positions: the row's own (cx->rows[r].idx, freed by the
 * caller) when the kept set is reported, else scratch in s, which lives while the row is
 * finished (no allocation the size of every kept set per call). NULL when out of memory. */
static int64_t *kept_positions(const search_ctx *cx, tka_search_row *out, int64_t k,
                               tka_arena *s)
{
    const size_t bytes = (size_t)(k > 0 ? k : 1) * sizeof(int64_t);
    if (cx->a->unordered) return tka_arena_alloc(s, bytes);
    return out->idx = malloc(bytes);
}

static double note_kept(const search_ctx *cx, srow *w, int64_t k, double t0)
{
    w->bytes += 8.0 * (double)k;
    if (!w->timing) return 0.0;
    const double t1 = stage_now();
    w->st[TKA_STAGE_CERT] += t1 - t0;
    w->sb[TKA_STAGE_CERT] += 8.0 * (double)k;
    if (cx->out_v)
        w->sb[TKA_STAGE_OUTPUT] += (double)k * (double)cx->a->dv * (double)esize(cx->a->vdtype);
    return t1;
}

/*
 * Try to certify with unscored mass bound u_ref (units e^{ref}): find the smallest top set
 * of the scored keys whose certificate is <= eps. Returns 1 and fills the row on success
 * (or on an allocation failure, with *st set); 0 if no top set meets eps.
 */
static int finalize_in(const search_ctx *cx, srow *w, int64_t r, double u_ref, double eps,
                       tka_arena *s, tka_status *st)
{
    const tka_key_index *ix = cx->ix;
    const tka_search_args *a = cx->a;
    const int64_t ns = w->ns;
    const double m = w->m; /* the largest scored logit */
    const double t0 = w->timing ? stage_now() : 0.0;
    double *wm = tka_arena_alloc(s, (size_t)(ns + 1) * sizeof(double));
    if (!wm) {
        *st = TKA_ERR_NOMEM;
        return 1;
    }
    const tka_kernels *K = cx->K;
    K->exp_shift[TKA_F64](w->sv, ns, m, wm);
    double z = 0.0;
    for (int64_t t = 0; t < ns; t++) z += wm[t];
    const double u = to_m_units(w, u_ref);
    const double rel = 1.0 + (double)(ns + w->nb + w->npool + 64) * 0x1p-50;
    const double grow = exp(4.0 * w->eta) * (1.0 + 0x1p-50);
    /* kept mass needed: A >= (1 - eps') (Z + U), eps' a little inside eps */
    const double target = (1.0 - eps * (1.0 - 1e-7) / grow) * (z * rel + u) * rel;
    int64_t k = tka_pairs_weighted_top(w->sv, w->si, wm, ns, target);
    if (k < 1) k = 1;
    double bound = 1.0;
    for (;;) {
        /* bound = tail / (head + tail): head rounded down, tail rounded up (an underflowed
         * term counts as e^-700 > 1e-304) */
        double head = 0.0, tail = 0.0;
        for (int64_t t = 0; t < k; t++) head += wm[t];
        for (int64_t t = k; t < ns; t++) tail += wm[t] + 1e-304;
        tail = tail * rel + u;
        if (tail == 0.0) {
            bound = 0.0;
        } else {
            bound = tail / (head / rel + tail);
            bound = nextafter(bound * rel * grow, INFINITY);
        }
        if (bound <= eps || k >= ns) break;
        /* rounding corner: add the best remaining key */
        const int64_t best = tka_pairs_first(w->sv, w->si, k, ns);
        const double bv = w->sv[best], bw = wm[best];
        const int64_t bi = w->si[best];
        w->sv[best] = w->sv[k]; w->si[best] = w->si[k]; wm[best] = wm[k];
        w->sv[k] = bv; w->si[k] = bi; wm[k] = bw;
        k++;
    }
    if (!(bound <= eps)) return 0;
    /* the dense output below does not depend on the order of the kept set */
    const int dense_out = cx->out_v && k > w->n / 8;
    if (!(a->unordered && dense_out)) {
        double *tv = tka_arena_alloc(s, (size_t)k * sizeof(double));
        int64_t *tx = tka_arena_alloc(s, (size_t)k * sizeof(int64_t));
        tka_pairs_sort_desc_radix(w->sv, w->si, k, tv, tx);
    }
    tka_search_row *out = &cx->rows[r];
    int64_t *oi = kept_positions(cx, out, k, s);
    if (!oi) {
        *st = TKA_ERR_NOMEM;
        return 1;
    }
    const int64_t *perm = ix->perm + (size_t)((r / a->L) * ix->cap);
    for (int64_t t = 0; t < k; t++) oi[t] = perm[w->si[t]];
    out->k = k;
    out->tv_bound = bound > 1.0 ? 1.0 : bound;
    const double t1 = note_kept(cx, w, k, t0);
    if (cx->out_v) {
        tka_status so = full_output(cx, r, r / a->L, w->n, k, oi, dense_out, w->sv, NULL, m, 0, s);
        if (so != TKA_OK) {  /* the caller frees out->idx */
            *st = so;
            return 1;
        }
    }
    if (w->timing) w->st[TKA_STAGE_OUTPUT] += stage_now() - t1;
    return 1;
}

static int finalize(const search_ctx *cx, srow *w, int64_t r, double u_ref, double eps,
                    tka_arena *s, tka_status *st)
{
    const size_t mark = tka_arena_mark(s);
    const int done = finalize_in(cx, w, r, u_ref, eps, s, st);
    tka_arena_release(s, mark);
    return done;
}

/* Bounds of every block (with eta) into w->ub, in block order. */
static void block_bounds(const search_ctx *cx, srow *w, int64_t h, double qn1, double qn2)
{
    const tka_key_index *ix = cx->ix;
    const int64_t d = w->d;
    const double g = (double)(d + 4) * 0x1p-52;
    for (int64_t b = 0; b < w->nb; b++) {
        const size_t bo = (size_t)(h * ix->cap_blocks + b) * (size_t)d;
        double best = INFINITY;
        if (ix->summary & TKA_SUM_MINMAX) {
            const float *lo = ix->lo + bo, *hi = ix->hi + bo;
            double u = 0.0, ua = 0.0;
            for (int64_t j = 0; j < d; j++) {
                double x = w->qs[j], t = x >= 0.0 ? x * (double)hi[j] : x * (double)lo[j];
                u += t;
                ua += fabs(t);
            }
            u += g * ua + 0x1p-1060 * (double)d;
            if (u < best) best = u;
        }
        if (ix->summary & TKA_SUM_BALL) {
            const float *c = ix->ctr + bo;
            double u = 0.0, ua = 0.0;
            for (int64_t j = 0; j < d; j++) {
                double t = w->qs[j] * (double)c[j];
                u += t;
                ua += fabs(t);
            }
            double rr = qn2 * ix->rad[h * ix->cap_blocks + b];
            u += rr + g * (ua + rr) + 0x1p-1060 * (double)d;
            if (u < best) best = u;
        }
        (void)qn1;
        w->ub[b] = best + w->eta;
    }
}

/*
 * Proxy bounds (with eta, capped by the block bound ubb) of keys [i0, i1). When `first`,
 * every key is counted on its level (count and mass). Keys on levels in (lo, hi] are
 * linked into the level lists; returns 1 when some key lies above hi (the block is then
 * deferred: its far keys are linked only if the search ever gets to their levels).
 */
static int expand_proxies(const search_ctx *cx, srow *w, int64_t h, int64_t i0, int64_t i1,
                          double ubb, const int16_t *yq, double bq, double slack_code,
                          double qn2, int32_t *tmp, int first, int64_t lo, int64_t *hi)
{
    const tka_key_index *ix = cx->ix;
    const size_t ko = (size_t)(h * ix->cap);
    cx->kern->dot_i8(yq, ix->pz + (ko + (size_t)i0) * (size_t)w->d, w->d, i1 - i0, tmp);
    const tka_proxy_consts pc = {bq, slack_code, qn2, w->eta, ubb, w->ref,
                                 1e-9 * (1.0 + fabs(w->ref))};
    cx->kern->proxy_levels(tmp, ix->pscale + ko + (size_t)i0, ix->perr + ko + (size_t)i0,
                           i1 - i0, &pc);
    double acc0 = 0.0, acc1 = 0.0;
    int32_t bmin = NLEVELS;
    for (int64_t i = 0; i < i1 - i0; i++) {
        const int32_t b = tmp[i];
        if (b < bmin) bmin = b;
        if (first) {
            w->lcnt[b]++;
            if (i & 1) acc1 += cx->lw[b];
            else acc0 += cx->lw[b];
        }
    }
    /* the first window of linked levels starts at the first key's level */
    if (*hi < 0) *hi = bmin + LINK_W < NLEVELS - 1 ? bmin + LINK_W : NLEVELS - 1;
    int deferred = 0;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t b = tmp[i - i0];
        if (first && b > w->lmax) w->lmax = b;
        if (b > lo && b <= *hi) {
            const int64_t e = w->nent++;
            w->ekey[e] = i;
            w->lnext[e] = w->lhead[b];
            w->lhead[b] = e;
            if (b < w->lmin_new) w->lmin_new = b;
        } else if (b > *hi) {
            deferred = 1;
        }
    }
    if (first) {
        w->pool += acc0 + acc1;
        w->npool += i1 - i0;
        w->pool_ops += i1 - i0;
        if (w->pool > w->pool_max) w->pool_max = w->pool;
    }
    w->proxies += i1 - i0;
    w->bytes += (double)(i1 - i0) * ((double)w->d + 8.0);
    return deferred;
}

/*
 * One MC check (docs/design.md §4): sample mc keys from the unscored population with probability
 * proportional to their caps (block keys: e^{ub}; keys on level b: lw[b] e^{ref}), bound
 * the population mass with the empirical Bernstein inequality (Maurer & Pontil 2009,
 * Thm 4) at confidence 1 - dlt. Pool keys are the `np` keys pk[] with levels pb[].
 * Returns the upper bound in units of e^{ref}, or -1 when out of memory.
 */
static double mc_bound_in(const search_ctx *cx, srow *w, const int64_t *pk, const int64_t *pb,
                          int64_t np, double dlt, uint64_t *rng, tka_arena *s)
{
    const int64_t nblk = w->nb - w->j, nit = nblk + np, mc = cx->a->mc_samples;
    double *cum = tka_arena_alloc(s, (size_t)(nit + 1) * sizeof(double));
    double *val = tka_arena_alloc(s, (size_t)(mc + 1) * sizeof(double));
    if (!cum || !val) return -1.0;
    double c = 0.0;
    for (int64_t t = 0; t < nit; t++) {
        double cap;
        if (t < nblk) {
            int64_t b = w->bord[w->j + t], i0 = b * w->bs;
            int64_t sz = (i0 + w->bs < w->n ? w->bs : w->n - i0);
            cap = (double)sz * tka_exp_up(w->ub[w->j + t] - w->ref);
        } else {
            cap = cx->lw[pb[t - nblk]];
        }
        cum[t] = c;
        c += cap;
    }
    cum[nit] = c;
    const double total = c * (1.0 + (double)(nit + 4) * 0x1p-52);
    double sum = 0.0;
    for (int64_t t = 0; t < mc; t++) {
        double x = uniform01(rng) * c;
        int64_t lo = 0, hi = nit - 1; /* last item with cum <= x */
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (cum[mid] <= x) lo = mid;
            else hi = mid - 1;
        }
        int64_t key;
        double lcap;
        if (lo < nblk) {
            int64_t b = w->bord[w->j + lo], i0 = b * w->bs;
            int64_t sz = (i0 + w->bs < w->n ? w->bs : w->n - i0);
            int64_t off = (int64_t)(uniform01(rng) * (double)sz);
            key = i0 + (off < sz ? off : sz - 1);
            lcap = w->ub[w->j + lo];
        } else {
            key = pk[lo - nblk];
            lcap = w->ref - (double)pb[lo - nblk] * LEVEL_W;
        }
        double sv;
        score(cx, w, key, 1, &sv);
        note_computed(w, key);
        /* Z = e^{s - cap} in [0, 1] (s <= cap by construction; clamp anyway) */
        double zz = exp(sv - lcap);
        val[t] = zz > 1.0 ? 1.0 : zz;
        sum += val[t];
    }
    const double mean = sum / (double)mc;
    double var = 0.0;
    for (int64_t t = 0; t < mc; t++) var += (val[t] - mean) * (val[t] - mean);
    var /= (double)(mc - 1);
    const double lg = log(2.0 / dlt);
    double up = mean + sqrt(2.0 * var * lg / (double)mc) + 7.0 * lg / (3.0 * (double)(mc - 1));
    up = up * (1.0 + 0x1p-40) + 0x1p-60;
    if (up > 1.0) up = 1.0;
    return total * up;
}

static double mc_bound(const search_ctx *cx, srow *w, const int64_t *pk, const int64_t *pb,
                       int64_t np, double dlt, uint64_t *rng, tka_arena *s)
{
    const size_t mark = tka_arena_mark(s);
    const double ub = mc_bound_in(cx, w, pk, pb, np, dlt, rng, s);
    tka_arena_release(s, mark);
    return ub;
}

/* State shared by the certificate checks of one row. */
typedef struct {
    double eps, eps_in;
    int64_t next_cp, checks;
    uint64_t rng;
    int64_t *pk, *pb;      /* MC pool gathering buffers (proxy mode) */
} chk_t;

/*
 * Certificate checks before the next unit of work. pool: level mass (units e^{ref},
 * rounded up); cur[0..ncur): the unscored remainder of the level cur_level being
 * scored, for MC gathering. Returns 1 when the row is finished (or failed: *st).
 */
static int try_certify(const search_ctx *cx, srow *w, int64_t r, chk_t *c, double pool,
                       const int64_t *cur, int64_t ncur, int64_t cur_level, tka_arena *s,
                       tka_status *st)
{
    if (w->unscored == 0) {
        if (finalize(cx, w, r, 0.0, c->eps, s, st)) return 1;
        *st = TKA_INTERNAL_ERROR(); /* with every key kept the bound is 0 */
        return 1;
    }
    if (w->ns == 0) return 0;
    const double u = unscored_mass(w, pool);
    /* deterministic certificate: eps Z_s >= (1 - eps) U */
    if (c->eps_in * w->zs >= (1.0 - c->eps_in) * to_m_units(w, u)) {
        double ue = u;
        if (w->lhead) /* the level masses summed afresh, without the running sum's drift */
            ue = unscored_mass(w, levels_above(cx, w, cur_level)
                                      + (double)ncur * cx->lw[cur_level] * (1.0 + 0x1p-50));
        if (finalize(cx, w, r, ue, c->eps, s, st)) return 1;
        c->eps_in *= 0.5; /* rounding corner: ask for more margin */
        return 0;
    }
    /* MC certificate at checkpoints (doubling scored counts), delta / 2^t each */
    if (cx->a->method == TKA_SEARCH_MC && w->distinct >= c->next_cp
        && w->unscored >= 4 * cx->a->mc_samples) {
        c->checks++;
        c->next_cp = 2 * w->distinct;
        int64_t np = 0;
        if (w->lhead) {
            for (int64_t t = 0; t < ncur; t++) { c->pk[np] = cur[t]; c->pb[np++] = cur_level; }
            for (int64_t b = cur_level + 1; b <= w->lmax; b++)
                for (int64_t e = w->lhead[b]; e >= 0; e = w->lnext[e]) { c->pk[np] = w->ekey[e]; c->pb[np++] = b; }
        }
        double dlt = ldexp(cx->a->delta, (int)(c->checks < 1000 ? -c->checks : -1000));
        double ub = mc_bound(cx, w, c->pk, c->pb, np, dlt, &c->rng, s);
        if (ub < 0.0) {
            *st = TKA_ERR_NOMEM;
            return 1;
        }
        if (c->eps_in * w->zs >= (1.0 - c->eps_in) * to_m_units(w, ub)) {
            if (finalize(cx, w, r, ub, c->eps, s, st)) {
                cx->rows[r].certified_mc = 1;
                return 1;
            }
        }
    }
    return 0;
}

/* The per-row arrays of the search (reset for every row), and the per-query constants. */
typedef struct {
    double *qs, *tmpd;                 /* scaled query (d); exact scores of a block (bs) */
    int64_t *defer, *lv;               /* deferred blocks (nb); keys of a level (n) */
    int32_t *tmp;                      /* proxy levels of a block (bs) */
    int16_t *yq;                       /* proxy query codes (d); with 4-bit proxies, the
                                          int8 codes of dot_u4 (2 ceil(d / 2) bytes) */
    int32_t *lev;                      /* streaming: level of every key, -1 once scored (n) */
    int32_t *bmin;                     /* streaming: lowest level of a block's unscored keys,
                                          for the blocks whose levels are known (nb) */
    uint8_t *done;                     /* streaming: blocks whose levels are known (nb) */
    int pre;                           /* streaming: every key's level computed already (by
                                          levels_group), blocks only counted when read */
    double bq, slack_code, qn1, qn2;   /* proxy code scale and slack; |q'|_1, |q'|_2 bounds */
    int32_t bias4;                     /* 4-bit proxies: 8 sum_j y_j (dot_u4's bias) */
} row_bufs;

/* Shape of one search: what the per-row arrays are sized by. */
typedef struct {
    int64_t n, d, bs, nb;
    int proxy, mc;
} search_dims;

/* Bytes of the per-row arrays (8-byte items first, then int32, int16, bytes). */
static size_t row_bytes(const search_dims *sd)
{
    const size_t n = (size_t)sd->n, nb = (size_t)sd->nb, d = (size_t)sd->d, bs = (size_t)sd->bs;
    size_t n8 = d + nb * 4 + 1 + n * 2 + bs + (sd->proxy ? 3 * n + nb + 2 * NLEVELS : 0)
              + (sd->mc && sd->proxy ? 2 * n : 0);
    return n8 * 8 + (bs + (sd->proxy ? n + nb : 0)) * sizeof(int32_t) + d * sizeof(int16_t)
         + (sd->mc ? n : 0) + (sd->proxy ? nb : 0) + 64;
}

/* Carve buf (row_bytes) into the row's arrays and reset w, ck and the level lists. */
static void carve_row(char *buf, const search_dims *sd, srow *w, chk_t *ck, row_bufs *rb,
                      int levels)
{
    const int64_t n = sd->n, d = sd->d, bs = sd->bs, nb = sd->nb;
    memset(w, 0, sizeof *w);
    memset(ck, 0, sizeof *ck);
    double *p8 = (double *)buf;
    rb->qs = p8; p8 += d;
    w->ub = p8; p8 += nb;
    double *um = p8; p8 += nb;
    w->bsuf = p8; p8 += nb + 1;
    w->sv = p8; p8 += n;
    rb->tmpd = p8; p8 += bs;
    int64_t *q8 = (int64_t *)p8;
    w->bord = q8; q8 += nb;
    w->si = q8; q8 += n;
    rb->defer = rb->lv = NULL;
    if (sd->proxy) {
        w->lnext = q8; q8 += n;
        w->ekey = q8; q8 += n;
        rb->defer = q8; q8 += nb;
        w->lhead = q8; q8 += NLEVELS;
        w->lcnt = q8; q8 += NLEVELS;
        if (levels)  /* (a row scored in full never uses them) */
            for (int64_t b = 0; b < NLEVELS; b++) { w->lhead[b] = -1; w->lcnt[b] = 0; }
        rb->lv = q8; q8 += n;
        if (sd->mc) { ck->pk = q8; q8 += n; ck->pb = q8; q8 += n; }
    }
    rb->tmp = (int32_t *)q8;
    rb->lev = rb->tmp + bs;
    rb->bmin = rb->lev + (sd->proxy ? n : 0);
    rb->yq = (int16_t *)(rb->bmin + (sd->proxy ? nb : 0));
    uint8_t *p1 = (uint8_t *)(rb->yq + d);
    if (sd->mc) { w->mark = p1; memset(w->mark, 0, (size_t)n); p1 += n; }
    rb->done = p1;
    rb->pre = 0;
    w->n = n; w->d = d; w->bs = bs; w->nb = nb;
    w->um_buf = um;
}

/*
 * The query codes of 4-bit proxies: y = round(q' / b) in int8, b a power of two with
 * max|q'| / b <= 127, laid out for dot_u4 (dimension j < ceil(d / 2) pairs with the low
 * nibble of byte j, the others with the high nibble of byte j - ceil(d / 2); a padding
 * dimension has code 0). r = q' - b y is exact, and the codes z = nibble - 8 lie in [-8, 7],
 * so r.z <= sum_j max(7 r_j, -8 r_j) (the slack, rounded up), and y.z = dot_u4's sum less
 * 8 sum_j y_j (the bias), exactly.
 */
static void query_codes4(const double *qs, int64_t d, double qmax, row_bufs *rb)
{
    const int64_t hb = (d + 1) / 2;
    int8_t *y = (int8_t *)rb->yq;
    double bq = 1.0, sl = 0.0;
    if (qmax > 0.0) {
        int e2;
        frexp(qmax / 127.0, &e2);
        bq = ldexp(1.0, e2);
    }
    int32_t ysum = 0;
    for (int64_t j = 0; j < d; j++) {
        double t = nearbyint(qs[j] / bq);
        if (t > 127.0) t = 127.0;
        if (t < -127.0) t = -127.0;
        y[j] = (int8_t)t;
        ysum += (int32_t)t;
        const double rj = qs[j] - bq * t;
        sl += rj > 0.0 ? 7.0 * rj : -8.0 * rj;
    }
    if (d < 2 * hb) y[d] = 0;
    rb->bq = bq;
    rb->bias4 = 8 * ysum;
    rb->slack_code = sl * (1.0 + (double)(d + 4) * 0x1p-52) + 0x1p-1060;
}

/*
 * The scaled query q' = scale * q of row r, its norms, the rounding allowance eta and the
 * targets; with proxies, the int16 query codes y = round(q' / b), b a power of two with
 * max|q'| / b <= ymax (so that d ymax 127 < 2^31: the int32 dot products are exact).
 * r = q' - b y is exact (Sterbenz), and |r.z| <= |r| |z| <= |r| 127 sqrt(d) for any key's
 * codes: the slack of the code bound.
 */
static void prepare_query(const search_ctx *cx, int64_t r, const search_dims *sd, srow *w,
                          chk_t *ck, row_bufs *rb)
{
    const tka_key_index *ix = cx->ix;
    const tka_search_args *a = cx->a;
    const int64_t d = sd->d, h = r / a->L;
    double *qs = rb->qs;
    /* the norms in two chains each (the loop is bound by the additions' latency); the
     * padding (d + 4) 2^-52 covers the rounding of a sum of d nonnegative terms in any
     * order */
    double qn1a = 0.0, qn1b = 0.0, qqa = 0.0, qqb = 0.0, qmax = 0.0;
    if (a->q32) {
        const float *x = a->q32 + (size_t)(r * d);
        for (int64_t j = 0; j < d; j++) qs[j] = a->scale * (double)x[j];
    } else {
        const double *x = a->q + (size_t)(r * d);
        for (int64_t j = 0; j < d; j++) qs[j] = a->scale * x[j];
    }
    int64_t j = 0;
    for (; j + 2 <= d; j += 2) {
        const double u = fabs(qs[j]), v = fabs(qs[j + 1]);
        qn1a += u;
        qn1b += v;
        qqa += u * u;
        qqb += v * v;
        qmax = u > qmax ? u : qmax;
        qmax = v > qmax ? v : qmax;
    }
    if (j < d) {
        const double u = fabs(qs[j]);
        qn1a += u;
        qqa += u * u;
        qmax = u > qmax ? u : qmax;
    }
    rb->qn2 = sqrt(qqa + qqb) * (1.0 + (double)(d + 4) * 0x1p-52) + 0x1p-1000;
    rb->qn1 = (qn1a + qn1b) * (1.0 + (double)(d + 4) * 0x1p-52);
    w->es = esize(ix->dtype);
    w->keys = (const char *)ix->keys + (size_t)(h * ix->cap * d) * w->es;
    w->qs = qs;
    w->eta = (double)(d + 8) * 0x1p-52 * rb->qn1 * ix->maxabs[h] + 0x1p-1060 * (double)d;
    ck->eps = a->eps[r];
    ck->eps_in = ck->eps * exp(-4.0 * w->eta) * (1.0 - 1e-6);
    double bq = 1.0, rr = 0.0;
    rb->bias4 = 0;
    if (sd->proxy && ix->pz4) {
        query_codes4(qs, d, qmax, rb);
        return;
    }
    if (sd->proxy) {
        double ymax = floor(2147483647.0 / (127.0 * (double)d)) - 1.0;
        if (ymax > 32767.0) ymax = 32767.0;
        if (qmax > 0.0) {
            int e2;
            frexp(qmax / ymax, &e2);
            bq = ldexp(1.0, e2);
        }
        for (int64_t j = 0; j < d; j++) {
            double t = nearbyint(qs[j] / bq);
            if (t > ymax) t = ymax;
            if (t < -ymax) t = -ymax;
            rb->yq[j] = (int16_t)t;
            double rj = qs[j] - bq * t;
            rr += rj * rj;
        }
    }
    rb->bq = bq;
    rb->slack_code = (sqrt(rr) * (1.0 + (double)(d + 4) * 0x1p-52) + 0x1p-1060)
                   * 127.0 * sqrt((double)d) * (1.0 + 0x1p-40);
}

static double stream_ref(const search_ctx *cx, srow *w, int64_t h, const row_bufs *rb,
                         double eps, int probe);

/* Block bounds of row r's head in visiting order (decreasing), their suffix masses in units
 * of e^{ref} (ref = the largest, or with proxies stream_ref's), and the starting state of
 * the search. */
static void order_blocks(const search_ctx *cx, int64_t r, const search_dims *sd, srow *w,
                         chk_t *ck, const row_bufs *rb)
{
    const tka_key_index *ix = cx->ix;
    const int64_t n = sd->n, bs = sd->bs, nb = sd->nb, d = sd->d;
    block_bounds(cx, w, r / cx->a->L, rb->qn1, rb->qn2);
    w->bytes += (double)nb * (double)(((ix->summary & TKA_SUM_MINMAX) ? 8 * d : 0)
                                      + ((ix->summary & TKA_SUM_BALL) ? 4 * d + 8 : 0));
    /* with proxies, the levels' reference as the streaming search chooses it (its probe,
     * without the samples that move it: score_level then scores level 0 whole first) */
    const double ref = stream_ref(cx, w, r / cx->a->L, rb, ck->eps, sd->proxy);
    for (int64_t b = 0; b < nb; b++) w->bord[b] = b;
    memcpy(w->bsuf, w->ub, (size_t)nb * sizeof(double));
    tka_pairs_sort_desc(w->bsuf, w->bord, nb);
    memcpy(w->ub, w->bsuf, (size_t)nb * sizeof(double)); /* ub now in visiting order */
    w->ref = ref;
    w->bsuf[nb] = 0.0;
    for (int64_t t = nb - 1; t >= 0; t--) {
        int64_t i0 = w->bord[t] * bs, sz = i0 + bs < n ? bs : n - i0;
        w->bsuf[t] = w->bsuf[t + 1] + (double)sz * tka_exp_up(w->ub[t] - w->ref);
    }
    w->m = -INFINITY;
    w->unscored = n;
    ck->rng = cx->a->seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(r + 1));
    splitmix(&ck->rng);
    ck->next_cp = 2 * cx->a->mc_samples;
}

/* Without proxies: blocks by decreasing bound, each scored exactly, until certified. */
static tka_status search_blocks(const search_ctx *cx, int64_t r, const search_dims *sd,
                                srow *w, chk_t *ck, const row_bufs *rb, tka_arena *s)
{
    const int64_t n = sd->n, bs = sd->bs;
    tka_status st = TKA_OK;
    while (!try_certify(cx, w, r, ck, 0.0, NULL, 0, 0, s, &st)) {
        const int64_t b = w->bord[w->j], i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
        score(cx, w, i0, i1 - i0, rb->tmpd);
        for (int64_t i = i0; i < i1; i++) {
            add_scored(w, rb->tmpd[i - i0], i);
            note_computed(w, i);
        }
        w->unscored -= i1 - i0;
        w->blocks++;
        w->j++;
    }
    return st;
}

/* Link the deferred blocks' keys of the levels in (horizon, nh]; keeps in rb->defer the
 * blocks that still have keys further down. Returns the number of deferred blocks left. */
static int64_t link_deferred(const search_ctx *cx, int64_t h, const search_dims *sd, srow *w,
                             row_bufs *rb, int64_t ndefer, int64_t horizon, int64_t nh)
{
    int64_t keep = 0;
    for (int64_t u = 0; u < ndefer; u++) {
        const int64_t jv = rb->defer[u], b = w->bord[jv], i0 = b * sd->bs;
        const int64_t i1 = i0 + sd->bs < sd->n ? i0 + sd->bs : sd->n;
        int64_t hh = nh;
        if (expand_proxies(cx, w, h, i0, i1, w->ub[jv], rb->yq, rb->bq, rb->slack_code, rb->qn2,
                           rb->tmp, 0, horizon, &hh))
            rb->defer[keep++] = jv;
    }
    return keep;
}

/* Score the keys of level t one by one (in an array, with prefetching: they are scattered
 * over many blocks), checking the certificate before each. Returns 1 when the row is done. */
static int score_level(const search_ctx *cx, int64_t r, int64_t t, srow *w, chk_t *ck,
                       row_bufs *rb, tka_arena *s, tka_status *st)
{
    const int64_t d = w->d;
    int64_t *lv = rb->lv, nl = 0;
    for (int64_t e = w->lhead[t]; e >= 0; e = w->lnext[e]) lv[nl++] = w->ekey[e];
    w->lhead[t] = -1;
    /* below a reference lowered by stream_ref, level 0 also holds keys whose bounds exceed
     * its mass e^{ref}: no certificate (nor MC checkpoint) until every one is scored */
    const int whole = t == 0 && w->ref < w->umax;
    for (int64_t u = 0;; u++) {
        /* the running sum drifts by at most one rounding of pool_max per update */
        double pool = w->pool + (double)(w->pool_ops + 4) * 0x1p-52 * w->pool_max;
        if ((!whole || u >= nl) && try_certify(cx, w, r, ck, pool, lv + u, nl - u, t, s, st))
            return 1;
        if (u >= nl) break;
        if (u + PREFETCH < nl) {
            const char *pk = w->keys + (size_t)(lv[u + PREFETCH] * d) * w->es;
            for (size_t off = 0; off < (size_t)d * w->es; off += 64) __builtin_prefetch(pk + off);
        }
        double sv;
        score(cx, w, lv[u], 1, &sv);
        add_scored(w, sv, lv[u]);
        note_computed(w, lv[u]);
        w->unscored--;
        w->pool -= cx->lw[t];
        w->pool_ops++;
    }
    w->lcnt[t] = 0;
    return 0;
}

/* With proxies: level by level, expand the blocks whose bound reaches the level, then score
 * the level's keys exactly, until certified. */
static tka_status search_levels(const search_ctx *cx, int64_t r, const search_dims *sd,
                                srow *w, chk_t *ck, row_bufs *rb, tka_arena *s)
{
    const int64_t h = r / cx->a->L, n = sd->n, bs = sd->bs, nb = sd->nb;
    tka_status st = TKA_OK;
    int64_t horizon = sd->mc ? NLEVELS - 1 : -1, ndefer = 0;
    for (int64_t t = 0; t < NLEVELS; t++) {
        const double theta = w->ref - (double)(t + 1) * LEVEL_W;
        int64_t expanded = 0;
        w->lmin_new = NLEVELS;
        if (horizon >= 0 && t > horizon) {  /* the next window of levels */
            const int64_t nh = t + LINK_W < NLEVELS - 1 ? t + LINK_W : NLEVELS - 1;
            ndefer = link_deferred(cx, h, sd, w, rb, ndefer, horizon, nh);
            horizon = nh;
        }
        while (w->j < nb && (w->ub[w->j] > theta || t == NLEVELS - 1)) {
            const int64_t b = w->bord[w->j], i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
            if (expand_proxies(cx, w, h, i0, i1, w->ub[w->j], rb->yq, rb->bq, rb->slack_code,
                               rb->qn2, rb->tmp, 1, -1, &horizon))
                rb->defer[ndefer++] = w->j;
            w->blocks++;
            w->j++;
            expanded++;
        }
        /* a block's keys may land one level above the block's own (rounding margin): go
         * back to the lowest level that got keys */
        if (w->lmin_new < t) t = w->lmin_new;
        if (w->lhead[t] < 0 && !expanded && t < NLEVELS - 1) continue;
        if (score_level(cx, r, t, w, ck, rb, s, &st)) return st;
    }
    return TKA_INTERNAL_ERROR(); /* the last level takes every key */
}

/* ------------------------------------------------------------------ streaming search */

/*
 * Streaming Δk-Search (proxies, deterministic method). One pass over the per-key int8
 * codes of every block, in storage order, gives each key a level (an upper bound on its
 * logit, capped by its block's bound); the levels' counts bound the mass of any set of
 * unscored keys. The keys of the top levels are then scored exactly, in storage order
 * (runs of neighbours thanks to the build-time ordering), and the certificate
 * 1 - A / (Z_s + U) <= eps is checked with U the level mass of every unscored key. The
 * level cut t is chosen so that U takes about STREAM_U_SHARE of the eps budget, leaving the
 * rest to the keys the kept set drops. A block whose bound lies more than STREAM_AHEAD
 * levels below the cut is not read: its keys count on its bound's level until the cut gets
 * there. If a sample of the blocks shows that most keys would have to be scored, every key
 * is scored in one pass instead (what full scoring costs, plus the sampled proxies). The
 * cut, the sample and the switch only decide the cost: the certificate is checked on the
 * rounded-up level sums either way.
 */
#define STREAM_U_SHARE 0.75
/* the sample that decides between the two strategies: the 1/stride blocks with the
 * highest bounds and every stride-th block, stride = sample_stride(nb) */
#define STREAM_SAMPLE 8
/* the first look of a group's first row: the 1/STREAM_SAMPLE_QUICK blocks with the highest
 * bounds and every STREAM_SAMPLE_QUICK-th block; it switches the group only when more than
 * half of the keys would be candidates (a small sample: the cost estimate waits for the
 * whole one) */
#define STREAM_SAMPLE_QUICK 32
/* The sample's stride: STREAM_SAMPLE, or over more blocks the largest of 16, 32 and 64
 * that leaves at least 64 strided blocks; the quick look's is STREAM_SAMPLE_QUICK, or 64
 * over 4096 blocks (the sample's stride divides it, so that the quick look's blocks are
 * among the sample's). With the block mass bounds the sample was most of what a row read
 * (23-24% of the proxies of clustered keys, d = 128, at n = 65536 and 262144); a stride of
 * 32 there took 8.6-8.7 against 10.4-10.6 ms for eight queries (one thread, 262144), while
 * over 41 blocks a stride of 32 left one strided block, and rows that stream with 8 were
 * scored in full. A stride of 64 over 4096 blocks: 4% fewer proxies read over the eight
 * rows at 262144 (31 against 35 thousand on five of them, 2-10% more on the other three),
 * and the looks of rows that then switch to full scoring read half as many. */
static inline int64_t quick_stride(int64_t nb)
{
    return nb >= 64 * 2 * STREAM_SAMPLE_QUICK ? 2 * STREAM_SAMPLE_QUICK : STREAM_SAMPLE_QUICK;
}

static inline int64_t sample_stride(int64_t nb)
{
    return nb >= 64 * STREAM_SAMPLE_QUICK ? quick_stride(nb)
           : nb >= 64 * 16                ? 16
                                          : STREAM_SAMPLE;
}

/* blocks whose bound's level is within this many levels of the first cut are read at once */
#define STREAM_AHEAD 16
/* With block mass bounds (srow.um), the pending blocks whose mass level lies within
 * STREAM_MASS_AHEAD levels of the cut are read before the cut's keys are scored, in bands
 * of STREAM_MASS_BAND levels from the highest, the cut taken again after each band. A
 * block's mass level is that of the mean of its 64 keys' masses, and reading it (about the
 * cost of scoring 10 keys) usually removes most of that mass; taken like a key's level
 * instead, a row whose distant blocks held much of the bound kept its cut below them, and
 * scored every key above it (clustered keys, n = 2^20, d = 128: 48493 keys scored against
 * k_eps = 684; with the bands 692). Bands of half a logit (4 levels) move the cut up
 * sooner than bands of one (8): the rows of clustered keys (d = 128) that read the most
 * proxies read 19-24% fewer (n = 262144: 110 to 89 thousand, 72 to 56; n = 2^20: 822 to 721
 * thousand) for the same keys scored; bands of 2 levels scored more keys (d = 64). */
#define STREAM_MASS_AHEAD 16
#define STREAM_MASS_BAND 4
/* candidate keys whose rows are prefetched ahead of the run being scored */
#define SCORE_AHEAD 8
/* more candidates than this share of the keys: score them all */
#define STREAM_FULL 0.5
/* a group whose every row is predicted to read the proxies of more than this share of the
 * keys computes them all in one shared pass (levels_group) */
#define STREAM_DENSE 0.5
/* queries of one head searched together (see search_groups) */
#define GROUP 4
/* keys of float16 converted at a time for the float32 kernels of a full pass */
#define F16_CHUNK 1024
/* a group of two or more queries over at most this many keys is scored in full at once:
 * a pass costs about what the sample and the bookkeeping of the levels would */
#define GROUP_SMALL_N 1024
/* full scoring sums V for the rows of a group in one pass up to this many keys */
#define GROUP_PV_MAX_N 65536

/* The levels of keys i0 .. i1-1 (block b) of row w from their code dot products, in place
 * in rb->lev (ko: the head's first key). */
static void row_levels(const search_ctx *cx, const srow *w, const row_bufs *rb, size_t ko,
                       int64_t b, int64_t i0, int64_t i1)
{
    const tka_key_index *ix = cx->ix;
    if (ix->pz4) {
        /* the 4-bit bound is q'.ctr + s (b y.z + slack) + |q'| e: the levels kernel computes
         * the part after q'.ctr against a reference and cap shifted by a >= q'.ctr (the
         * block's ball bound less its radius term, padded as that bound is); the margin
         * covers the rounding of the two shifts */
        const double a = w->ub[b] - rb->qn2 * ix->rad[(int64_t)ko / ix->cap * ix->cap_blocks + b];
        const tka_proxy_consts p4 = {rb->bq, rb->slack_code, rb->qn2, w->eta, w->ub[b] - a,
                                     w->ref - a, 1e-9 * (1.0 + fabs(w->ref) + fabs(a))};
        cx->kern->proxy_levels(rb->lev + i0, ix->pscale + ko + (size_t)i0,
                               ix->perr + ko + (size_t)i0, i1 - i0, &p4);
        return;
    }
    const tka_proxy_consts pc = {rb->bq, rb->slack_code, rb->qn2, w->eta, w->ub[b],
                                 w->ref, 1e-9 * (1.0 + fabs(w->ref))};
    cx->kern->proxy_levels(rb->lev + i0, ix->pscale + ko + (size_t)i0,
                           ix->perr + ko + (size_t)i0, i1 - i0, &pc);
}

/* The bytes of m keys' proxies (codes, scale, error bound), read by row w. */
static void code_bytes(const search_ctx *cx, srow *w, int64_t m)
{
    const double by = (double)m * ((double)(cx->ix->pz4 ? (w->d + 1) / 2 : w->d) + 8.0);
    w->bytes += by;
    if (w->timing) w->sb[TKA_STAGE_CODES] += by;
}

/* keys per dot_i8 call of block_levels when it prefetches the next block's codes */
#define CODES_CHUNK 8

/* The same with the int8 code dot products first: the whole of a block's proxies. When the
 * row reads block `next` (>= 0) after this one, its codes are prefetched, a share with each
 * chunk of this block's keys: the blocks a row reads are scattered (a gap resets the
 * hardware prefetcher, and a block's 4-8 KiB start cold), and a burst of one prefetch per
 * line at the start of the block stalled as much as it saved (random 8 KiB blocks of codes,
 * d = 128, AVX2: 16-17 ns per key without prefetching or with a burst, 9-11 ns spread). */
static void block_levels(const search_ctx *cx, const srow *w, const row_bufs *rb, size_t ko,
                         int64_t b, int64_t i0, int64_t i1, int64_t next)
{
    const int64_t m = i1 - i0;
    if (cx->ix->pz4) {
        const size_t hb = (size_t)(w->d + 1) / 2;
        const uint8_t *z = cx->ix->pz4 + (ko + (size_t)i0) * hb;
        if (next >= 0) {  /* the next block's codes: a block of 4-bit codes is 1-4 KiB */
            const int64_t j0 = next * w->bs, mj = j0 + w->bs < w->n ? w->bs : w->n - j0;
            const char *pn = (const char *)(cx->ix->pz4 + (ko + (size_t)j0) * hb);
            for (size_t off = 0; off < (size_t)mj * hb; off += 64) __builtin_prefetch(pn + off);
        }
        cx->kern->dot_u4((const int8_t *)rb->yq, z, (int64_t)hb, m, rb->bias4, rb->lev + i0);
        row_levels(cx, w, rb, ko, b, i0, i1);
        return;
    }
    const size_t d = (size_t)w->d;
    const int8_t *z = cx->ix->pz + (ko + (size_t)i0) * d;
    if (next < 0) {
        cx->kern->dot_i8(rb->yq, z, w->d, m, rb->lev + i0);
    } else {
        const int64_t j0 = next * w->bs, mj = j0 + w->bs < w->n ? w->bs : w->n - j0;
        const char *pn = (const char *)(cx->ix->pz + (ko + (size_t)j0) * d);
        const size_t len = (size_t)mj * d;
        size_t off = 0;
        for (int64_t c = 0; c < m; c += CODES_CHUNK) {
            const int64_t e = c + CODES_CHUNK < m ? c + CODES_CHUNK : m;
            const size_t upto = len * (size_t)e / (size_t)m;
            for (; off < upto; off += 64) __builtin_prefetch(pn + off);
            cx->kern->dot_i8(rb->yq, z + (size_t)c * d, w->d, e - c, rb->lev + i0 + c);
        }
    }
    row_levels(cx, w, rb, ko, b, i0, i1);
}

/* Levels (in lev) and counts (cnt, and cnt2 when not NULL) of the keys of block b, unless
 * it is done already (done[b]); marks it done. next: the block read after it (its codes
 * prefetched), or -1. Returns the number of keys read. */
static int64_t stream_block(const search_ctx *cx, srow *w, int64_t h, const row_bufs *rb,
                            int64_t b, int64_t *cnt, int64_t *cnt2, int64_t next)
{
    if (rb->done[b]) return 0;
    rb->done[b] = 1;
    const tka_key_index *ix = cx->ix;
    const size_t ko = (size_t)(h * ix->cap);
    const int64_t i0 = b * w->bs, i1 = i0 + w->bs < w->n ? i0 + w->bs : w->n;
    int32_t *lev = rb->lev;
    if (!rb->pre) {
        block_levels(cx, w, rb, ko, b, i0, i1, next);
        code_bytes(cx, w, i1 - i0);
    }
    int32_t lo = NLEVELS;
    int64_t i = i0;
    for (; i + 2 <= i1; i += 2) {  /* neighbours on one level: one increment (no chain) */
        const int32_t a = lev[i], c = lev[i + 1];
        if (a == c) {
            cnt[a] += 2;
        } else {
            cnt[a]++;
            cnt[c]++;
        }
        lo = a < lo ? a : lo;
        lo = c < lo ? c : lo;
    }
    for (; i < i1; i++) {
        cnt[lev[i]]++;
        if (lev[i] < lo) lo = lev[i];
    }
    rb->bmin[b] = lo;
    if (cnt2)
        for (int64_t i = i0; i < i1; i++) cnt2[lev[i]]++;
    w->proxies += i1 - i0;
    w->blocks++;
    return i1 - i0;
}

/*
 * Every key's level for the k rows of a group, in one pass over the blocks (each block's
 * codes read from memory once, in cache for the other rows), for groups whose every row
 * is predicted to read most proxies anyway (stream_look: blocks in key order at decode
 * have bounds too loose to skip any). The levels are those stream_block computes (they
 * depend only on the row's query, block bounds and reference), so the search then goes
 * on exactly as it would, each block only counted when it reads it: the same results as
 * a row alone. The bytes read count here.
 */
static void levels_group(const search_ctx *cx, int64_t h, int64_t k, srow *const *w,
                         row_bufs *const *rb)
{
    const double t0 = w[0]->timing ? stage_now() : 0.0;
    const size_t ko = (size_t)(h * cx->ix->cap);
    const int64_t nb = w[0]->nb, bs = w[0]->bs, n = w[0]->n;
    const tka_key_index *ix = cx->ix;
    const int16_t *y4[GROUP];
    for (int64_t g = 0; g < k; g++) y4[g] = rb[g]->yq;
    for (int64_t b = 0; b < nb; b++) {
        const int64_t i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
        int all4 = k == 4 && ix->pz;  /* four rows need the block: one dot4_i8 pass */
        for (int64_t g = 0; g < k && all4; g++) all4 = !rb[g]->done[b];
        if (all4) {
            int32_t *o4[4] = {rb[0]->lev + i0, rb[1]->lev + i0, rb[2]->lev + i0,
                              rb[3]->lev + i0};
            cx->kern->dot4_i8(y4, ix->pz + (ko + (size_t)i0) * (size_t)w[0]->d, w[0]->d,
                              i1 - i0, o4);
        }
        for (int64_t g = 0; g < k; g++) {
            if (rb[g]->done[b]) continue;
            if (all4)
                row_levels(cx, w[g], rb[g], ko, b, i0, i1);
            else
                block_levels(cx, w[g], rb[g], ko, b, i0, i1, -1);
            code_bytes(cx, w[g], i1 - i0);
        }
    }
    for (int64_t g = 0; g < k; g++) rb[g]->pre = 1;
    if (w[0]->timing) {
        const double share = (stage_now() - t0) / (double)k;
        for (int64_t g = 0; g < k; g++) {
            w[g]->st[TKA_STAGE_CODES] += share;
            w[g]->wall += share;
        }
    }
}

/* sum over levels b > t of cnt[b] lw[b] (units e^{ref}), rounded up */
static double stream_mass_above(const search_ctx *cx, const int64_t *cnt, int64_t t)
{
    double p = 0.0;
    for (int64_t b = NLEVELS - 1; b > t; b--) p += (double)cnt[b] * cx->lw[b];
    return p * (1.0 + (double)(NLEVELS + 4) * 0x1p-52);
}

/*
 * The level cut: the smallest t > t0 with mass above t <= share * eps * Z, Z estimated as
 * zk (the known scored mass, units e^{ref}) plus the candidates' level masses shrunk by
 * e^{-gap} (the typical distance between a bound and the logit). A heuristic only: the
 * certificate is checked on the exact sums afterwards.
 */
static int64_t stream_cut_z(const search_ctx *cx, const int64_t *cnt, const int64_t *cnt2,
                            double x2, int64_t t0, double zk, double gap, double eps,
                            double *z_out)
{
    double above[NLEVELS + 1], c[NLEVELS];
    above[NLEVELS] = 0.0;
    for (int64_t b = NLEVELS - 1; b >= 0; b--) {
        c[b] = (double)cnt[b] + (cnt2 ? x2 * (double)cnt2[b] : 0.0);
        above[b] = above[b + 1] + c[b] * cx->lw[b];
    }
    const double shrink = exp(-gap);
    double z = zk;
    int64_t t = t0 + 1;
    for (; t < NLEVELS; t++) {
        z += c[t] * cx->lw[t] * shrink;
        if (above[t + 1] <= STREAM_U_SHARE * eps * z) break;
    }
    if (z_out) *z_out = z;
    return t < NLEVELS ? t : NLEVELS - 1;
}

/* The same, without the estimate of Z. */
static int64_t stream_cut(const search_ctx *cx, const int64_t *cnt, const int64_t *cnt2,
                          double x2, int64_t t0, double zk, double gap, double eps)
{
    return stream_cut_z(cx, cnt, cnt2, x2, t0, zk, gap, eps, NULL);
}

/* Score the unscored keys on levels <= t of the blocks whose levels are known (in storage
 * order, runs of neighbours together); a scored key's level becomes -1 and leaves the
 * counts. */
static void stream_score(const search_ctx *cx, srow *w, const row_bufs *rb, int64_t *cnt,
                         int64_t t)
{
    int32_t *lev = rb->lev;
    double *tmpd = rb->tmpd;
    int64_t *cand = w->ekey;  /* (the level lists' array: unused by the streaming search) */
    const double t0 = w->timing ? stage_now() : 0.0;
    /* the candidates, in storage order; blocks with no unscored key on levels <= t are
     * skipped by their lowest level */
    int64_t nc = 0;
    for (int64_t b = 0; b < w->nb; b++) {
        if (!rb->done[b] || rb->bmin[b] > t) continue;
        const int64_t i1 = (b + 1) * w->bs < w->n ? (b + 1) * w->bs : w->n;
        int32_t lo = NLEVELS;  /* the block's lowest level left */
        for (int64_t i = b * w->bs; i < i1; i++) {
            const int32_t l = lev[i];
            if (l < 0) continue;
            if (l <= t) {
                cand[nc++] = i;
                cnt[l]--;
                lev[i] = -1;
            } else if (l < lo) {
                lo = l;
            }
        }
        rb->bmin[b] = lo;
    }
    /* scored in runs of neighbours, the rows of the candidates ahead prefetched (they are
     * scattered: a miss per run otherwise) */
    const size_t row = (size_t)w->d * w->es;
    int64_t pf = 0;
    for (int64_t c = 0; c < nc;) {
        int64_t e = c + 1;
        while (e < nc && e - c < w->bs && cand[e] == cand[e - 1] + 1) e++;
        const int64_t want = e + SCORE_AHEAD < nc ? e + SCORE_AHEAD : nc;
        for (pf = pf > e ? pf : e; pf < want; pf++) {
            const char *pk = w->keys + (size_t)cand[pf] * row;
            for (size_t off = 0; off < row; off += 64) __builtin_prefetch(pk + off);
        }
        const int64_t i = cand[c], len = e - c;
        score(cx, w, i, len, tmpd);
        /* the scores join the scored set; their mass by the vector exp, in one go */
        double mx = w->m;
        for (int64_t u = 0; u < len; u++) {
            w->sv[w->ns + u] = tmpd[u];
            w->si[w->ns + u] = i + u;
            if (tmpd[u] > mx) mx = tmpd[u];
            note_computed(w, i + u);
        }
        w->ns += len;
        if (mx > w->m) {
            w->zs = w->m == -INFINITY ? 0.0 : w->zs * exp(w->m - mx);
            w->m = mx;
            w->fm = w->ref - mx > 700.0 ? INFINITY : exp(w->ref - mx) * (1.0 + 0x1p-48);
        }
        cx->K->exp_shift[TKA_F64](tmpd, len, w->m, tmpd);
        double zr = 0.0;
        for (int64_t u = 0; u < len; u++) zr += tmpd[u];
        w->zs += zr;
        w->unscored -= len;
        c = e;
    }
    if (w->timing) w->st[TKA_STAGE_RERANK] += stage_now() - t0;
}


/*
 * Block bounds for the streaming search, into w->ub (block order); returns the summary bytes
 * read. With centroid + radius summaries only those are used (one dot product per block,
 * through the dot_f32 kernel): q'.k <= q'.c + |q'| rad. The kernel's sum is within
 * gamma_d sum_j |q'_j c_j| <= g |q'|_1 max|c_j| of q'.c, and |c_j| <= maxabs (a centroid is
 * a mean of keys, rounded to float32: the factor 1 + 2^-20 covers that rounding).
 */
static double stream_block_bounds(const search_ctx *cx, srow *w, int64_t h, const row_bufs *rb)
{
    const tka_key_index *ix = cx->ix;
    const int64_t d = w->d, nb = w->nb;
    if (!(ix->summary & TKA_SUM_BALL)) {
        block_bounds(cx, w, h, rb->qn1, rb->qn2);
        return (double)nb * 8.0 * (double)d;
    }
    const double g = (double)(d + 4) * 0x1p-52;
    const double cab = g * rb->qn1 * ix->maxabs[h] * (1.0 + 0x1p-20);
    const int64_t share = w->cdot ? w->cshare : 1;
    if (w->cdot) memcpy(w->ub, w->cdot, (size_t)nb * sizeof(double));
    else cx->kern->dot_f32(w->qs, ix->ctr + (size_t)(h * ix->cap_blocks) * (size_t)d, d, nb, w->ub);
    const double *rad = ix->rad + h * ix->cap_blocks;
    w->um = ix->mom ? w->um_buf : NULL;
    if (w->um) {
        /* the block mass bounds (csrc/cpu/search_scalar.c), the last block (maybe partial)
         * with its own size */
        const double *mom = ix->mom + 2 * h * ix->cap_blocks;
        tka_mass_consts mc = {rb->qn2, rb->qn2 * rb->qn2 * (1.0 + 0x1p-50), g, cab,
                              0x1p-1060 * (double)d, w->eta, 1.0 / (double)w->bs};
        cx->kern->mass_bounds(w->ub, rad, mom, nb - 1, &mc, w->um);
        mc.inv_m = 1.0 / (double)(w->n - (nb - 1) * w->bs);
        cx->kern->mass_bounds(w->ub + nb - 1, rad + nb - 1, mom + 2 * (nb - 1), 1, &mc,
                              w->um + nb - 1);
    } else {
        for (int64_t b = 0; b < nb; b++) {
            const double rr = rb->qn2 * rad[b];
            w->ub[b] += rr + g * rr + cab + 0x1p-1060 * (double)d + w->eta;
        }
    }
    return (double)nb * (4.0 * (double)d / (double)share + 8.0 + (ix->mom ? 16.0 : 0.0));
}

/*
 * The centroid products q'.c of every block for the m <= GROUP rows w (prepared queries)
 * in one pass over the centroids (the dot4 kernel: four queries per key vector, float64
 * sums), into cd (GROUP * nb doubles; q4: GROUP * dpad, dpad = d rounded up to 16), and
 * w[g]->cdot set. A query's products are the same in any slot and whatever the others
 * are (each has its own sums; unused slots are zeros), so a row gets the same bounds alone
 * and in a group. The centroids of a long key set come from memory or L3 (2 MB at
 * 262144 keys, d = 128): one centroid product per block and row took 12-13% of a
 * clustered search's time there; the pass is shared by the group's rows. Any order of
 * the float64 sums is within stream_block_bounds' allowance.
 */
static void block_dots(const search_ctx *cx, int64_t h, int64_t m, srow *const *w,
                       const row_bufs *const *rb, double *q4, double *cd)
{
    const tka_key_index *ix = cx->ix;
    const int64_t d = ix->d, nb = w[0]->nb, dpad = (d + 15) / 16 * 16;
    if (!(ix->summary & TKA_SUM_BALL)) return;
    const double t0 = w[0]->timing ? stage_now() : 0.0;
    memset(q4, 0, (size_t)(GROUP * dpad) * sizeof(double));
    for (int64_t g = 0; g < m; g++) memcpy(q4 + g * dpad, rb[g]->qs, (size_t)d * sizeof(double));
    cx->K->dot4[TKA_F32](ix->ctr + (size_t)(h * ix->cap_blocks) * (size_t)d, nb, d, q4, dpad, d,
                         1.0, cd, nb);
    for (int64_t g = 0; g < m; g++) {
        w[g]->cdot = cd + g * nb;
        w[g]->cshare = m;
    }
    if (w[0]->timing) {  /* (the selection stage: the row's time less the others) */
        const double share = (stage_now() - t0) / (double)m;
        for (int64_t g = 0; g < m; g++) w[g]->wall += share;
    }
}

/* The level of bound p below ref (margin: 1e-9 (1 + |ref|)), without branches (NaN: level 0) */
static inline int32_t level_nb(double ref, double margin, double p)
{
    double gap = ((ref - p) - margin - 1e-9 * fabs(p)) * (1.0 / LEVEL_W);
    gap = gap > 0.0 ? gap : 0.0;  /* (NaN: 0) */
    gap = gap < (double)(NLEVELS - 1) ? gap : (double)(NLEVELS - 1);
    return (int32_t)gap;
}

/* The level of bound p (the proxy_levels kernels' rounding, for a whole block's keys). */
static int64_t stream_level_of(const srow *w, double p)
{
    return level_nb(w->ref, 1e-9 * (1.0 + fabs(w->ref)), p);
}

/*
 * The switch to full scoring, from the sample. A row alone switches when more than half of
 * the keys are predicted to be candidates. For a row whose pass would be shared by `share`
 * >= 2 queries: `below` keys predicted to be candidates
 * (scored exactly, one query at a time, scattered), the proxies the search would read (the
 * sample's, and those of every pending block whose bound reaches level t_read), against one
 * pass over every key shared by `share` queries plus the k_eps selection over all of them.
 * Costs in nanoseconds per key at d = 64, measured per stage (tka_search_args.stages) on a
 * 2-core AVX-512 machine with the keys out of cache, and their growth with d measured at
 * d = 128 (a heuristic about cost only: the certificate does not depend on it). The
 * streaming search is kept when it is predicted to cost no more than the shared pass: at
 * decode (one query per head of a group over a long cache) a margin of 0.7 switched groups
 * whose streaming rows scored 0.5% of the keys and ran 1.4x faster than the pass.
 */
#define COST_CODE 6.5     /* a proxy read: int8 dot product, level, count */
#define COST_SCORE 45.0   /* a candidate scored exactly (scattered rows, bookkeeping) */
#define COST_ROW 1.0      /* per key, the streaming row's cuts and bookkeeping */
#define COST_PASS4 6.4    /* a key of the full pass, per query, when four queries share it
                             (the pass reads every key: its cost is shared out) */
#define COST_SELECT 4.0   /* a key of the k_eps selection and output of a fully scored row */
#define STREAM_MARGIN 1.0 /* stream only when it is predicted to cost this share or less */
/* A group (of two rows or more) switches as a whole, before the rest of any sample is
 * read, when its rows' first looks predict their streaming to cost more than this share of
 * one pass plus every row's selection together. Measured (clustered keys, d = 64 and 128,
 * n = 65536 and 262144, 38 groups of four, one thread, each group timed streaming and in a
 * full pass): the time of streaming over that of the pass came out at about 1.45 times
 * the predicted ratio (0.56 at a predicted 0.43, 1.09 at 0.64, 1.39-1.56 at 0.96), even
 * near 0.69; the groups at d = 128 predict 0.16-0.28 (they stream in a fifth to a third
 * of the pass's time). Each row's own tests could not see it: at d = 64 the groups
 * predicted at 0.7-1.0 streamed at 1.1-1.6 times a full pass's time (0.77-0.97x
 * topk_attention). Not for a group whose rows all read most proxies (see levels_group). */
#define STREAM_GROUP 0.7
/* the quick look (a quarter of the sample) switches a group when streaming is predicted
 * to cost more than this share of the pass: its estimate is rougher, so the margin is
 * wider, and a group it switches skips three quarters of the sample (gauss keys, d = 64:
 * the sample took 8-10% of a switching group's time) */
#define STREAM_MARGIN_QUICK 1.5

/* The predicted cost in nanoseconds of streaming row w on from its sample (`below` keys
 * predicted to be candidates, the proxies of the pending blocks up to level t_read), and
 * in *pass the cost of one full pass over the keys (whatever the number of queries sharing
 * it, up to GROUP) and in *select a fully scored row's own part (selection, certificate,
 * output). */
static void full_costs(int64_t d, int64_t n, double *pass, double *select)
{
    *pass = COST_PASS4 * ((double)d + 100.0) / 164.0 * (double)GROUP * (double)n;
    *select = COST_SELECT * (double)n;
}

/* The proxies row w is predicted to read: those read so far and those of every pending
 * block whose bound reaches level t_read. With block mass bounds, also the blocks whose
 * masses the cut cannot leave unread: from the highest mass level down, every pending block
 * until the masses of the blocks below fit in w->zbudget (the sample's estimate of the
 * share of eps Z left to the unscored keys); a row whose bulk of distant blocks has more
 * mass bound than that reads them all (clustered keys, n = 2^20, d = 128: predicted
 * 275200 proxies from the levels, 981376 read). */

static double stream_reads(const search_ctx *cx, const srow *w, const row_bufs *rb, int64_t n,
                           int64_t t_read)
{
    const int64_t nb = w->nb, bs = w->bs, last = n - (nb - 1) * bs;  /* (the last block's keys) */
    const double ref = w->ref, margin = 1e-9 * (1.0 + fabs(ref));
    int64_t keys = 0;
    int32_t need = -1;  /* blocks on mass levels <= need are read */
    if (w->um) {
        int64_t lv[NLEVELS];  /* pending block keys per mass level */
        memset(lv, 0, sizeof lv);
        for (int64_t b = 0; b < nb; b++)
            lv[level_nb(ref, margin, w->um[b])] += rb->done[b] ? 0 : b + 1 < nb ? bs : last;
        double below = 0.0;
        for (need = NLEVELS - 1; need >= 0; need--) {
            below += (double)lv[need] * cx->lw[need];
            if (below > w->zbudget) break;
        }
        for (int64_t b = 0; b < nb; b++) {
            const int rd = (int)(level_nb(ref, margin, w->ub[b]) <= t_read)
                           | (int)(level_nb(ref, margin, w->um[b]) <= need);
            keys += !rb->done[b] && rd ? (b + 1 < nb ? bs : last) : 0;
        }
    } else {
        for (int64_t b = 0; b < nb; b++)
            keys += !rb->done[b] && level_nb(ref, margin, w->ub[b]) <= t_read
                        ? (b + 1 < nb ? bs : last) : 0;
    }
    return (double)w->proxies + (double)keys;
}

static double stream_cost(const search_ctx *cx, const srow *w, const row_bufs *rb, int64_t n,
                          double below,
                          int64_t t_read, double *pass, double *select, double *reads_out)
{
    const double reads = stream_reads(cx, w, rb, n, t_read);
    if (reads_out) *reads_out = reads;
    const double dd = (double)w->d;
    full_costs(w->d, n, pass, select);
    return COST_CODE * (dd + 200.0) / 264.0 * reads + COST_SCORE * below
           + COST_ROW * (double)n;
}

/* Whether row w switches to full scoring (see above); *cost its predicted streaming cost,
 * and *reads (when not NULL) the proxies it would read. */
static int stream_switch(const search_ctx *cx, const srow *w, const row_bufs *rb, int64_t n,
                         double below,
                         int64_t t_read, int64_t share, double margin, double *cost,
                         double *reads)
{
    double pass, select;
    *cost = stream_cost(cx, w, rb, n, below, t_read, &pass, &select, reads);
    if (below > STREAM_FULL * (double)n) return 1;  /* most keys would be scored anyway */
    if (share < 2) return 0;  /* a pass for one query: the streaming search's own ground */
    return *cost > margin * (pass / (double)share + select);
}

/* Pending blocks (not done) whose block level is <= t get their proxies read: their keys
 * leave the block level's count for their own levels. w->bord[b]: block b's level. */
static void stream_expand(const search_ctx *cx, srow *w, int64_t h, const row_bufs *rb,
                          int64_t *cnt, int64_t t)
{
    const double t0 = w->timing ? stage_now() : 0.0;
    int64_t b = 0;
    while (b < w->nb && (rb->done[b] || w->bord[b] > t)) b++;
    while (b < w->nb) {
        int64_t nx = b + 1;
        while (nx < w->nb && (rb->done[nx] || w->bord[nx] > t)) nx++;
        const int64_t i0 = b * w->bs, sz = i0 + w->bs < w->n ? w->bs : w->n - i0;
        cnt[w->bord[b]] -= sz;
        stream_block(cx, w, h, rb, b, cnt, NULL, nx < w->nb ? nx : -1);
        b = nx;
    }
    if (w->timing) w->st[TKA_STAGE_CODES] += stage_now() - t0;
}

/*
 * The sample that decides between the strategies, its levels counted in cnt: the blocks
 * with the highest bounds (where the mass is, if anywhere) and every stride-th block
 * (the bulk, counted also in cnt2, to be scaled up). Returns the sampled key with the
 * lowest level.
 */
/* The sample's blocks with the highest bounds: the first of w->bord (returns how many).
 * With 4-bit proxies they are ranked by the bound less half its radius term: a first look
 * over the blocks of the highest bounds (wide blocks, far from the query, whose radius term
 * lifts them) scored one key of a looser 4-bit bound, predicted thousands of candidates
 * where the search scored hundreds, and switched the group to full scoring (clustered
 * keys, d = 128, n = 65536, eight queries on two threads: 3.5 ms a call with one group
 * switched, 2.1 ms with both streaming). The int8 proxies keep the bound: it is what
 * their costs were measured with. */
#define SAMPLE_RAD_SHARE 0.5
static int64_t sample_pick(const search_ctx *cx, srow *w, const row_bufs *rb, int64_t h,
                           int64_t stride)
{
    const int64_t nb = w->nb, ntop = (nb + stride - 1) / stride;
    /* with 4-bit proxies (whose index has the radii), by the bound less SAMPLE_RAD_SHARE
     * of its radius term; the radii are not addressed otherwise (an index of min/max
     * summaries has none) */
    const double *rad = cx->ix->pz4 ? cx->ix->rad + h * cx->ix->cap_blocks : NULL;
    const double lam = SAMPLE_RAD_SHARE * rb->qn2;
    for (int64_t b = 0; b < nb; b++) {
        w->bsuf[b] = rad ? w->ub[b] - lam * rad[b] : w->ub[b];
        w->bord[b] = b;
    }
    tka_pairs_top_desc(w->bsuf, w->bord, nb, ntop);
    return ntop;
}

/* After the sample's blocks are read: the first key (by position) of the lowest level
 * read, if below that of the first key of the highest-bound block: found from the blocks'
 * lowest levels, then in the first block holding it. */
static int64_t sample_lowest(const srow *w, const row_bufs *rb, int64_t top)
{
    int32_t mn = rb->lev[top];
    int64_t bm = -1;
    for (int64_t b = 0; b < w->nb; b++)
        if (rb->done[b] && rb->bmin[b] < mn) {
            mn = rb->bmin[b];
            bm = b;
        }
    if (bm >= 0) {
        const int64_t i0 = bm * w->bs, i1 = i0 + w->bs < w->n ? i0 + w->bs : w->n;
        for (top = i0; top < i1 && rb->lev[top] != mn; top++) {}
    }
    return top;
}

static int64_t stream_sample(const search_ctx *cx, srow *w, int64_t h, const row_bufs *rb,
                             int64_t *cnt, int64_t *cnt2, int64_t stride)
{
    const int64_t nb = w->nb, ntop = sample_pick(cx, w, rb, h, stride);
    const int64_t top = w->bord[0] * w->bs;
    const double t0 = w->timing ? stage_now() : 0.0;
    for (int64_t u = 0; u < ntop; u++)
        stream_block(cx, w, h, rb, w->bord[u], cnt, NULL, u + 1 < ntop ? w->bord[u + 1] : 0);
    for (int64_t b = 0; b < nb; b += stride)
        stream_block(cx, w, h, rb, b, cnt, cnt2, b + stride < nb ? b + stride : -1);
    if (w->timing) w->st[TKA_STAGE_CODES] += stage_now() - t0;
    return sample_lowest(w, rb, top);
}

/* The samples (sample_stride) of k rows of a group in one pass over the blocks, each
 * block's codes in cache for every row that reads it: the same blocks and counts as
 * stream_sample for each row (a block both among a row's highest and a strided one
 * counts as one of the highest, as there). mark: k nb bytes of scratch. Returns each
 * row's key of the lowest level in top[]. */
static void sample_group(const search_ctx *cx, int64_t h, int64_t k, srow *const *w,
                         row_bufs *const *rb, unsigned char *mark, int64_t *top)
{
    const double t0 = w[0]->timing ? stage_now() : 0.0;
    const int64_t nb = w[0]->nb, stride = sample_stride(nb);
    memset(mark, 0, (size_t)(k * nb));
    for (int64_t g = 0; g < k; g++) {
        const int64_t ntop = sample_pick(cx, w[g], rb[g], h, stride);
        for (int64_t u = 0; u < ntop; u++) mark[g * nb + w[g]->bord[u]] = 1;
        top[g] = w[g]->bord[0] * w[g]->bs;
    }
    /* a block the group reads: strided, or among some row's highest; the first row that
     * reads it prefetches the next such block */
    int64_t nx = 0;
    for (int64_t b = 0; b < nb; b = nx) {
        for (nx = b + 1; nx < nb && nx % stride != 0; nx++) {
            int64_t any = 0;
            for (int64_t g = 0; g < k && !any; g++) any = mark[g * nb + nx];
            if (any) break;
        }
        int64_t pf = nx < nb ? nx : -1;
        for (int64_t g = 0; g < k; g++) {
            int64_t got = 0;
            if (mark[g * nb + b])
                got = stream_block(cx, w[g], h, rb[g], b, w[g]->lcnt, NULL, pf);
            else if (b % stride == 0)
                got = stream_block(cx, w[g], h, rb[g], b, w[g]->lcnt, w[g]->lhead, pf);
            if (got) pf = -1;
        }
    }
    for (int64_t g = 0; g < k; g++) top[g] = sample_lowest(w[g], rb[g], top[g]);
    if (w[0]->timing) {
        const double share = (stage_now() - t0) / (double)k;
        for (int64_t g = 0; g < k; g++) {
            w[g]->st[TKA_STAGE_CODES] += share;
            w[g]->wall += share;
        }
    }
}

/* What the first part of the streaming search hands to the rest: the first exact score,
 * the bound-to-logit gap, and the level up to which the pending blocks are expanded. */
typedef struct {
    double s0, gap;
    int64_t t_expand;
    double cost; /* the predicted cost of streaming on (ns, see stream_cost) */
    double reads; /* the proxies the first look predicts the row to read (-1: no look) */
    int64_t t_first; /* the first cut of stream_finish when already known (else -1) */
} stream_mid;

/*
 * The reference of the levels, normally the largest block bound u_max: levels cover the
 * (NLEVELS - 1) LEVEL_W = 127.9 logits below it, and the keys below that range count on
 * its last level. When the block bounds are loose by more than that (a query of large
 * norm: the radius term |q'| r of keys in arrival order reached 210 logits with logits of
 * standard deviation 15), every key landed on the last level, whose mass then stood for
 * all of them: every key became a candidate and the row was scored in full. Then the
 * reference is lowered to s + H, s the largest exact logit of the block with the highest
 * lower bound q'.c - |q'| r (a probe: its keys are not counted as scored unless the search
 * scores them; every key of that block is at least that lower bound, so s is too),
 * H = 127.9 - log(8 n / eps) - 8 (at least 32): the level range reaches e^-8 eps / (8 n) of
 * e^s <= Z below s (the first cuts' estimates of Z take e^s into account), so keys on the
 * last level carry a negligible share of the budget.
 * Bounds above the reference are on level 0, and level 0 is never left unscored: every
 * cut is >= 0 and blocks and keys on levels <= the cut are read and scored before a
 * certificate is tested, so the certificate still counts only true bounds (docs/design.md
 * §4). Without centroid + radius summaries (or without probe) the reference stays u_max;
 * w->umax is set either way.
 */
static double stream_headroom(int64_t n, double eps)
{
    return fmax(32.0, (double)(NLEVELS - 1) * LEVEL_W - log(8.0 * (double)n / eps) - 8.0);
}

static double stream_ref(const search_ctx *cx, srow *w, int64_t h, const row_bufs *rb,
                         double eps, int probe)
{
    const tka_key_index *ix = cx->ix;
    double umax = -INFINITY;  /* w->ub in block order */
    for (int64_t b = 0; b < w->nb; b++) umax = w->ub[b] > umax ? w->ub[b] : umax;
    w->umax = umax;
    w->sprobe = -INFINITY;
    if (!probe || !(ix->summary & TKA_SUM_BALL) || !(umax < INFINITY)) return umax;
    const double H = stream_headroom(w->n, eps);
    const double *rad = ix->rad + h * ix->cap_blocks;
    int64_t bl = -1;
    double lo = -INFINITY;
    for (int64_t b = 0; b < w->nb; b++) {
        const double v = w->ub[b] - 2.0 * rb->qn2 * rad[b];
        if (v > lo) {
            lo = v;
            bl = b;
        }
    }
    if (bl < 0 || !(umax - lo > H)) return umax;  /* the range covers every key's logit */
    const int64_t i0 = bl * w->bs, m = i0 + w->bs < w->n ? w->bs : w->n - i0;
    score(cx, w, i0, m, rb->tmpd);
    double s = -INFINITY;
    for (int64_t i = 0; i < m; i++) s = rb->tmpd[i] > s ? rb->tmpd[i] : s;
    if (!(s > -INFINITY)) return umax;
    w->sprobe = s;  /* Z >= e^s: the first cuts estimate Z with it too */
    return umax > s + H ? s + H : umax;
}

/* After a sample whose best key's exact logit s lies more than 8 above the probe of
 * stream_ref (the probe's block held no key near the top: keys in arrival order, logits of
 * standard deviation 40 put 3142 keys above the probe's reference on level 0, every one of
 * them scored for a row whose k_eps was 1): the reference moves up to s + H and the row
 * forgets what it read (returns 1; the caller reads its sample again, at most REREF_MAX
 * times). The sample's best key is one of those on its lowest level; when that is level 0,
 * any key above the reference, so each move raises the reference by more than H. */
#define REREF_MAX 6
static int stream_reref(srow *w, const row_bufs *rb, double s, double eps)
{
    /* (not once levels_group computed every level against the reference) */
    if (rb->pre || !(w->sprobe > -INFINITY) || !(s > w->sprobe + 8.0)) return 0;
    const double ref = fmin(w->umax, s + stream_headroom(w->n, eps));
    if (!(ref > w->ref)) return 0;
    w->ref = ref;
    w->sprobe = s;
    for (int64_t b = 0; b < NLEVELS; b++) w->lcnt[b] = w->lhead[b] = 0;
    for (int64_t b = 0; b < w->nb; b++) rb->done[b] = 0;
    return 1;
}

/* The exact logit *s of the sample's key `top` (stream_sample's); while stream_reref moves
 * the reference from it, the sample (every stride-th block and the highest ones) is read
 * again. Returns the key. */
static int64_t sample_scored(const search_ctx *cx, srow *w, int64_t h, const row_bufs *rb,
                             int64_t stride, int64_t top, double eps, double *s)
{
    score(cx, w, top, 1, s);
    for (int u = 0; u < REREF_MAX && stream_reref(w, rb, *s, eps); u++) {
        top = stream_sample(cx, w, h, rb, w->lcnt, w->lhead, stride);
        score(cx, w, top, 1, s);
    }
    return top;
}

/* Streaming search of row r (see above), its first look: block bounds and, for a row whose
 * pass would be shared (share >= 2) over enough blocks, a quarter of the sample. Returns 1
 * when that look predicts that full scoring costs less (md->cost: the look's estimate of
 * streaming on; -1 when there was no look). */
static int stream_look(const search_ctx *cx, int64_t r, const search_dims *sd, srow *w,
                       const chk_t *ck, row_bufs *rb, int64_t share, stream_mid *md)
{
    const int64_t h = r / cx->a->L, n = sd->n, nb = sd->nb;
    md->cost = -1.0;
    md->reads = -1.0;
    md->t_first = -1;
    {
        const double by = stream_block_bounds(cx, w, h, rb);  /* selection stage */
        w->bytes += by;
        if (w->timing) w->sb[TKA_STAGE_SELECT] += by;
    }
    w->ref = stream_ref(cx, w, h, rb, ck->eps, 1);
    w->m = -INFINITY;
    w->unscored = n;
    w->j = nb;
    w->npool = n;
    int32_t *lev = rb->lev;
    int64_t *cnt = w->lcnt, *cnt2 = w->lhead;
    for (int64_t b = 0; b < NLEVELS; b++) cnt2[b] = 0;
    for (int64_t b = 0; b < nb; b++) rb->done[b] = 0;
    if (share >= 2 && nb >= 16 * STREAM_SAMPLE_QUICK) {
        /* a first look at a quarter of the sample: a group where most keys would be
         * candidates switches without reading the rest (the every STREAM_SAMPLE_QUICK-th
         * blocks are among the every stride-th ones: nothing is read twice) */
        double s1;
        int64_t top1 = stream_sample(cx, w, h, rb, cnt, cnt2, quick_stride(nb));
        top1 = sample_scored(cx, w, h, rb, quick_stride(nb), top1, ck->eps, &s1);
        const double ref = w->ref;  /* (which sample_scored may have moved) */
        int64_t n2 = 0, ns = 0;
        for (int64_t b = 0; b < NLEVELS; b++) n2 += cnt2[b], ns += cnt[b];
        const double gap1 = fmax(0.0, (ref - (double)lev[top1] * LEVEL_W) - s1);
        const double x2 = n2 > 0 ? (double)(n - ns) / (double)n2 : 0.0;
        const double z1 = exp(fmax(s1, w->sprobe) - ref);
        const int64_t t1 = stream_cut_z(cx, cnt, cnt2, x2, -1, z1, gap1, ck->eps, &w->zbudget);
        w->zbudget *= STREAM_U_SHARE * ck->eps;
        double below = 0.0;
        for (int64_t b = 0; b <= t1; b++) below += (double)cnt[b] + x2 * (double)cnt2[b];
        if (stream_switch(cx, w, rb, n, below, t1 + STREAM_AHEAD, share, STREAM_MARGIN_QUICK,
                          &md->cost, &md->reads))
            return 1;
    }
    return 0;
}

/* The rest of row r's sample after stream_look and the decision, up to the first expansion.
 * When the sample shows that full scoring costs less, *fallback = 1 (nothing certified: the
 * caller scores the row in full). */
static void stream_begin(const search_ctx *cx, int64_t r, const search_dims *sd, srow *w,
                         const chk_t *ck, row_bufs *rb, int64_t share, int *fallback,
                         stream_mid *md, int64_t sampled_top)
{
    const int64_t stride = sample_stride(sd->nb);
    const int64_t h = r / cx->a->L, n = sd->n, nb = sd->nb;
    int32_t *lev = rb->lev;
    int64_t *cnt = w->lcnt, *cnt2 = w->lhead;
    /* sampled_top >= 0: the sample was read by sample_group */
    int64_t top = sampled_top >= 0 ? sampled_top
                                   : stream_sample(cx, w, h, rb, cnt, cnt2, stride);
    double s0;
    {
        const double t0 = w->timing ? stage_now() : 0.0;
        top = sample_scored(cx, w, h, rb, stride, top, ck->eps, &s0);
        if (w->timing) w->st[TKA_STAGE_RERANK] += stage_now() - t0;
    }
    const double ref = w->ref;
    int64_t n2 = 0, ns = 0;
    for (int64_t b = 0; b < NLEVELS; b++) n2 += cnt2[b], ns += cnt[b];
    const double gap = fmax(0.0, (ref - (double)lev[top] * LEVEL_W) - s0);
    cnt[lev[top]]--;
    cnt2[lev[top]] -= cnt2[lev[top]] > 0; /* only an estimate */
    lev[top] = -1;
    add_scored(w, s0, top);
    note_computed(w, top);
    w->unscored--;
    /* the bulk sample stands for the unsampled keys too */
    const double x2 = n2 > 0 ? (double)(n - ns) / (double)n2 : 0.0;
    const double z0 = exp(fmax(s0, w->sprobe) - ref);
    int64_t t = stream_cut_z(cx, cnt, cnt2, x2, -1, z0, gap, ck->eps, &w->zbudget);
    w->zbudget *= STREAM_U_SHARE * ck->eps;
    double below = 0.0;
    for (int64_t b = 0; b <= t; b++) below += (double)cnt[b] + x2 * (double)cnt2[b];
    *fallback = 0;
    md->s0 = s0;
    md->gap = gap;
    md->t_expand = t + STREAM_AHEAD;
    if (stream_switch(cx, w, rb, n, below, t + STREAM_AHEAD, share, STREAM_MARGIN, &md->cost,
                      NULL)) {
        *fallback = 1;
        return;
    }
    /* blocks whose bound is well below the cut keep their block level: no proxies read */
    for (int64_t b = 0; b < nb; b++) {
        if (rb->done[b]) continue;
        const int64_t i0 = b * sd->bs, sz = i0 + sd->bs < n ? sd->bs : n - i0;
        w->bord[b] = stream_level_of(w, w->um ? w->um[b] : w->ub[b]);
        cnt[w->bord[b]] += sz;
    }
}

/* The first cut of stream_finish, from the level counts after the first expansion. */
static int64_t stream_first_cut(const search_ctx *cx, const srow *w, const chk_t *ck,
                                const stream_mid *md)
{
    return stream_cut(cx, w->lcnt, NULL, 0.0, -1, exp(fmax(md->s0, w->sprobe) - w->ref),
                      md->gap, ck->eps);
}

/* The rest of the streaming search of row r, once the pending blocks up to md->t_expand
 * have been expanded: cut, expand, score, certify, until certified. */
static tka_status stream_finish(const search_ctx *cx, int64_t r, srow *w, chk_t *ck,
                                row_bufs *rb, tka_arena *s, const stream_mid *md)
{
    const int64_t h = r / cx->a->L;
    int64_t *cnt = w->lcnt;
    tka_status st = TKA_OK;
    int64_t t = md->t_first;
    if (t < 0) {  /* a row alone: the blocks up to its first cut, as expand_group reads them */
        t = stream_first_cut(cx, w, ck, md);
        stream_expand(cx, w, h, rb, cnt, t);
    }
    int64_t t_done = -1;  /* the last cut scored */
    const double gap = md->gap;
    for (;;) {
        if (w->um) {
            /* blocks counted by their mass bound: those within STREAM_MASS_AHEAD levels of
             * the cut are read first, band by band from the highest, and the cut is taken
             * again from the refined counts each time (the reads usually move it up) */
            for (int it = 0; it < 64; it++) {
                int64_t lo = NLEVELS;
                for (int64_t b = 0; b < w->nb; b++)
                    if (!rb->done[b] && w->bord[b] < lo) lo = w->bord[b];
                if (lo > t + STREAM_MASS_AHEAD) break;
                stream_expand(cx, w, h, rb, cnt, lo + STREAM_MASS_BAND);
                double zk = w->fm > 0.0 && isfinite(w->fm) ? w->zs / w->fm : 0.0;
                if (t_done < 0) zk = fmax(zk, exp(fmax(md->s0, w->sprobe) - w->ref));
                t = stream_cut(cx, cnt, NULL, 0.0, t_done, zk, gap, ck->eps);
            }
        }
        stream_expand(cx, w, h, rb, cnt, t);
        stream_score(cx, w, rb, cnt, t);
        t_done = t;
        const double u = w->unscored ? stream_mass_above(cx, cnt, -1) : 0.0;
        if (w->unscored == 0 || ck->eps_in * w->zs >= (1.0 - ck->eps_in) * to_m_units(w, u)) {
            if (finalize(cx, w, r, u, ck->eps, s, &st)) return st;
            if (w->unscored == 0) return TKA_INTERNAL_ERROR();
        }
        const double zk = w->fm > 0.0 && isfinite(w->fm) ? w->zs / w->fm : 0.0;
        t = stream_cut(cx, cnt, NULL, 0.0, t, zk, gap, ck->eps);
    }
}

/* The results of row r from its working state; with timers, the selection stage is the
 * row's time (w->wall) less the other stages. */
static void row_stats(const search_ctx *cx, int64_t r, const srow *w)
{
    tka_search_row *o = &cx->rows[r];
    o->keys_scored = w->distinct > w->n ? w->n : w->distinct;
    o->blocks_scored = w->blocks;
    o->proxies_read = w->proxies;
    o->bytes_read = w->bytes;
    if (w->timing) {
        double other = 0.0;
        for (int k = 0; k < TKA_STAGES; k++) {
            o->stage_s[k] = w->st[k];
            o->stage_bytes[k] = w->sb[k];
            if (k != TKA_STAGE_SELECT) other += w->st[k];
        }
        const double rest = w->wall - other;
        o->stage_s[TKA_STAGE_SELECT] = rest > 0.0 ? rest : 0.0;
    }
}

/*
 * Queries of one head are searched in groups of up to GROUP rows (fixed by the row
 * numbering, never by the thread split, like the groups of the attention kernels). Each
 * row starts the streaming search with its sample; when the first row's sample predicts
 * that full scoring is cheaper (stream_switch), the whole group switches: one pass over
 * the keys scores all its queries together (the dot4 kernel of the attention path) and
 * each row keeps the k_eps set of topk_attention's selection, certified by its exact tail
 * (padded for rounding like every other certificate). Otherwise each later row decides on
 * its own sample; the rows that switch share one full pass, and the streaming rows read
 * the int8 codes of their first expansion in one pass over the blocks (each block's codes
 * in cache for every row that needs them). Then each streaming row goes on alone.
 */

/*
 * Row r from the logits of every key (sc, n values in storage order), by the selection of
 * topk_attention(eps): the k_eps set of a target eps' a little inside eps, whose exact
 * discarded mass tau is the certificate once padded for rounding: relatively for the sums
 * (the factor rel, as in finalize), e^{4 eta} for the logits (as in finalize), and
 * 2^-1000 per dropped key for tail terms that underflow. The output reads the kept rows
 * of V in position order when they are many (a stream), else in kept order.
 */
static tka_status full_output(const search_ctx *cx, int64_t r, int64_t h, int64_t n, int64_t k,
                              const int64_t *oi, int dense_out, const double *kv,
                              const double *wk_in, double mx, int fw, tka_arena *s);
static tka_status kept_f32(const tka_kernels *K, const float *v, int64_t ld, const int64_t *pos,
                           const int64_t *perm, const double *wk, int64_t k, int64_t dv,
                           int64_t *ip, double *o, double *z, tka_arena *s);
static tka_status placed_f32(const tka_kernels *K, const float *v, int64_t ld, const float *wd,
                             int64_t n, int64_t k, int64_t dv, double *o, double *z,
                             tka_arena *s);

/* With w4 (this row's slot of a group's weights: float64 interleaved with stride 4, or
 * with fw a float32 row of n), a row keeping more than half of the keys only writes every
 * key's weight there (0 for the dropped ones) and its normaliser to *z4: the group's
 * caller sums V for all its rows in one pass, in position order. Sparser rows walk their
 * kept keys alone: the pass tests every weight, and with many zeros those tests cost more
 * than the reads they save. */
static tka_status full_row_in(const search_ctx *cx, int64_t r, srow *w, const chk_t *ck,
                              double *sc, tka_arena *s, double *w4, double *z4, int fw)
{
    const tka_key_index *ix = cx->ix;
    const tka_search_args *a = cx->a;
    const tka_kernels *K = cx->K;
    const int64_t n = w->n, h = r / a->L;
    const double t0 = w->timing ? stage_now() : 0.0;
    tka_row tw = {.p = sc, .n = n, .dt = TKA_F64, .K = K};
    tka_status st = tka_row_check(&tw, s);
    if (st != TKA_OK) return st;
    const double rel = 1.0 + (double)(n + 64) * 0x1p-50;
    const double grow = exp(4.0 * w->eta) * (1.0 + 0x1p-50);
    const double eps_k = ck->eps * (1.0 - 1e-7) / (rel * grow);
    int64_t k;
    double tau, thr;
    const double *e = NULL;  /* every weight e^{s - max}, where the selection computed them */
    if ((st = tka_row_keps_e(&tw, eps_k, s, &k, &tau, &thr, &e)) != TKA_OK) return st;
    /* a tail term below e^-708 of the largest is flushed to 0: 2^-1021 covers it */
    double bound = k >= n ? 0.0 : nextafter(tau * rel * grow + (double)(n - k) * 0x1p-1021,
                                            INFINITY);
    if (!(bound <= ck->eps)) return TKA_RETRY; /* eps near the underflow range: the caller
                                                  certifies by the search's own finalize */
    const int report = !a->unordered;
    /* A row keeping more than half of the keys writes every key's weight (0 for the
     * dropped ones, tka_row_keep_weights) in storage order, as topk_attention's such rows
     * do in position order: no gathering of the kept keys unless they are reported. */
    int deferred = cx->out_v && w4 && k > n / 2 && thr > -INFINITY;
    int64_t *keep = NULL;
    double *kv = NULL, *wk = NULL;
    const int dense_out = fw && n > GROUP_PV_MAX_N && k > n / 8;  /* (see below) */
    const int64_t *perm = ix->perm + (size_t)(h * ix->cap);
    /* Such a row (dense_out) whose kept set is not reported: every key's weight too, each
     * then put at its key's position, so that no kept set is gathered and no position
     * looked up a kept key at a time. (n <= GROUP_PV_MAX_N for deferred rows: never both.) */
    const int place = dense_out && !report && cx->out_v && k > 0 && thr > -INFINITY;
    double *ew = NULL;
    if (deferred || place) {
        if (!(ew = tka_arena_alloc(s, (size_t)n * sizeof(double)))) return TKA_ERR_NOMEM;
        st = tka_row_keep_weights(&tw, k, thr, e, ew);
        if (st != TKA_OK && st != TKA_RETRY) return st;
        if (st == TKA_RETRY) ew = NULL;  /* then the kept keys are gathered */
        deferred = deferred && ew;
        st = TKA_OK;
    }
    float *placed = NULL;
    if (place && ew) {
        if (!(placed = tka_arena_alloc(s, (size_t)n * sizeof(float)))) return TKA_ERR_NOMEM;
        for (int64_t j = 0; j < n; j++) placed[perm[j]] = (float)ew[j];
    }
    /* A float32 row whose output is its own (not deferred, not by dense_out): the kept
     * keys (storage order) with their weights from the selection in one vector pass, as
     * topk_attention gathers them, when no tie at thr is to be broken; their scores only
     * for the report. (Gaussian keys, n = 65536, d = 64, one thread: 0.81-0.82x -> 0.88x
     * of topk_attention for rows scored in full, from the passes this saves.) */
    int gathered = 0;
    if (!deferred && fw && !dense_out && cx->out_v && e && k > 0 && thr > -INFINITY) {
        keep = tka_arena_alloc(s, (size_t)(n + 16) * sizeof(int64_t));
        wk = tka_arena_alloc(s, (size_t)(n + 16) * sizeof(double));
        if (!keep || !wk) return TKA_ERR_NOMEM;
        gathered = K->gather_ge_w[TKA_F64](sc, e, n, thr, keep, wk) == k;
        if (gathered && report) {
            if (!(kv = tka_arena_alloc(s, (size_t)k * sizeof(double)))) return TKA_ERR_NOMEM;
            for (int64_t t = 0; t < k; t++) kv[t] = sc[keep[t]];
        }
    }
    if (!gathered && !placed && (!deferred || report)) {
        keep = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(int64_t));
        kv = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(double));
        wk = cx->out_v && !deferred ? tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(double))
                                    : NULL;
        if (!keep || !kv || (cx->out_v && !deferred && !wk)) return TKA_ERR_NOMEM;
        if ((st = tka_row_topk_above_v(&tw, k, thr, s, keep, kv)) != TKA_OK) return st;
        /* the kept weights, for the output only: the selection's (the same vector exp of
         * the same scores), or computed now */
        if (wk && e) for (int64_t t = 0; t < k; t++) wk[t] = e[keep[t]];
        else if (wk) K->exp_shift[TKA_F64](kv, k, tw.max, wk);
    }
    /* the kept rows of V are read in storage order, which is the same whether the kept set
     * is reported or not (the sort for the report comes after): pv_idx prefetches the
     * scattered rows ahead, which measured as fast as putting them back in position order
     * first (n = 65536) or faster (n = 1M: 0.82x -> 0.92x of topk_attention, d = 64, float64
     * weights). Float32 rows over more keys than the group's V pass takes, keeping more than
     * n/8 of them, read V in position order (full_output: its kernel then took
     * topk_attention's time, n = 262144, d = 64; at n = 512 placing the weights cost more
     * than it saved). */
    tka_search_row *out = &cx->rows[r];
    int64_t *oi = NULL;
    if (keep && (!gathered || report)) {  /* (out->idx for the report) */
        if (!(oi = kept_positions(cx, out, k, s))) return TKA_ERR_NOMEM;
        if (!gathered) for (int64_t t = 0; t < k; t++) oi[t] = perm[keep[t]];
    }
    out->k = k;
    out->tv_bound = bound;
    const double t1 = note_kept(cx, w, k, t0);
    /* the output sums the kept rows in storage order (or, deferred, V in position order),
     * so it does not depend on whether the kept set is reported */
    if (deferred) {
        /* every weight to its key's position (perm maps the n storage slots one to one onto
         * the positions, so every position is written); z in storage order, four chains */
        double z0 = 0.0, z1 = 0.0, z2 = 0.0, z3 = 0.0;
        int64_t i = 0;
        if (fw) {  /* float32 weights, a row of n (see fallback_rows) */
            float *wf = (float *)w4;
#define TKA_DEFER_TERM(j, zs)              \
    do {                                   \
        const float f_ = (float)ew[j];     \
        wf[perm[j]] = f_;                  \
        zs += (double)f_;                  \
    } while (0)
            for (; i + 4 <= n; i += 4) {
                TKA_DEFER_TERM(i, z0);
                TKA_DEFER_TERM(i + 1, z1);
                TKA_DEFER_TERM(i + 2, z2);
                TKA_DEFER_TERM(i + 3, z3);
            }
            for (; i < n; i++) TKA_DEFER_TERM(i, z0);
#undef TKA_DEFER_TERM
        } else {
            for (; i + 4 <= n; i += 4) {
                w4[4 * perm[i]] = ew[i], z0 += ew[i];
                w4[4 * perm[i + 1]] = ew[i + 1], z1 += ew[i + 1];
                w4[4 * perm[i + 2]] = ew[i + 2], z2 += ew[i + 2];
                w4[4 * perm[i + 3]] = ew[i + 3], z3 += ew[i + 3];
            }
            for (; i < n; i++) w4[4 * perm[i]] = ew[i], z0 += ew[i];
        }
        *z4 = (z0 + z1) + (z2 + z3);
    } else if (gathered) {
        /* as full_output sums a float32 row (the same sums, so the same output), the
         * positions looked up on the way (in place in keep unless it is reported) */
        double *o = cx->out_v + (size_t)(r * a->dv);
        const char *vh = (const char *)a->v + (size_t)(h * a->v_head_stride) * esize(a->vdtype);
        int64_t *ip = report ? tka_arena_alloc(s, (size_t)k * sizeof(int64_t)) : keep;
        double z;
        if (!ip) return TKA_ERR_NOMEM;  /* the caller frees out->idx */
        if ((st = kept_f32(K, (const float *)vh, a->v_row_stride, keep, perm, wk, k, a->dv, ip, o,
                           &z, s)) != TKA_OK)
            return st;  /* the caller frees out->idx */
        for (int64_t j = 0; j < a->dv; j++) o[j] /= z;
    } else if (placed) {
        double *o = cx->out_v + (size_t)(r * a->dv);
        const char *vh = (const char *)a->v + (size_t)(h * a->v_head_stride) * esize(a->vdtype);
        double z;
        if ((st = placed_f32(K, (const float *)vh, a->v_row_stride, placed, n, k, a->dv, o, &z,
                             s)) != TKA_OK)
            return st;
        for (int64_t j = 0; j < a->dv; j++) o[j] /= z;
    } else if (cx->out_v && (st = full_output(cx, r, h, n, k, oi, dense_out, kv, wk, tw.max, fw, s)) != TKA_OK) {
        return st;  /* the caller frees out->idx */
    }
    if (w->timing) w->st[TKA_STAGE_OUTPUT] += stage_now() - t1;
    if (!a->unordered) {  /* reported by decreasing score */
        tka_pairs_sort_desc(kv, keep, k);
        for (int64_t t = 0; t < k; t++) out->idx[t] = perm[keep[t]];
    }
    return TKA_OK;
}

/* Kept sets of more than SPV_CHUNK keys (float32 weights) are summed by chunks of that
 * many kept keys (a multiple of the 64-key blocks of spv_idx), each chunk into its own
 * float64 sums, which are then added in chunk order: the same association on any thread
 * count; the chunks run on every thread when the caller is not a worker itself (a group
 * alone on a long row, see tka_search). */
#define SPV_CHUNK 16384
typedef struct {
    const tka_kernels *K;
    const float *v;
    int64_t ld, k, dv;
    const int64_t *idx;
    const float *w;
    double *part;  /* chunk u's sums at part + u * dv */
} kept_job;

static tka_status kept_chunks(void *c, int64_t u0, int64_t u1, tka_arena *s, int64_t *err_row)
{
    const kept_job *j = c;
    (void)s;
    (void)err_row;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t t0 = u * SPV_CHUNK, t1 = t0 + SPV_CHUNK < j->k ? t0 + SPV_CHUNK : j->k;
        j->K->spv_idx(j->v, j->ld, j->idx + t0, j->w + t0, t1 - t0, j->dv, j->part + u * j->dv);
    }
    return TKA_OK;
}

static tka_status kept_sums_chunked(const tka_kernels *K, const float *v, int64_t ld,
                                    const int64_t *idx, const float *w, int64_t k, int64_t dv,
                                    double *o, tka_arena *s)
{
    const int64_t nch = (k + SPV_CHUNK - 1) / SPV_CHUNK;
    double *part = tka_arena_alloc(s, (size_t)(nch * (dv > 0 ? dv : 1)) * sizeof(double));
    if (!part) return TKA_ERR_NOMEM;
    kept_job j = {K, v, ld, k, dv, idx, w, part};
    int64_t bad;
    tka_status st = tka_threads_in_worker()
                        ? kept_chunks(&j, 0, nch, s, &bad)
                        : tka_rows_run_parallel(nch, (double)k * (double)dv, kept_chunks, &j, &bad);
    if (st != TKA_OK) return st;
    for (int64_t t = 0; t < dv; t++) o[t] = part[t];
    for (int64_t u = 1; u < nch; u++)
        for (int64_t t = 0; t < dv; t++) o[t] += part[u * dv + t];
    return TKA_OK;
}

/* The float32 kept rows' sums: one spv_idx call, or by chunks when there are many */
static tka_status kept_sums_f32(const tka_kernels *K, const float *v, int64_t ld,
                                const int64_t *idx, const float *w, int64_t k, int64_t dv,
                                double *o, tka_arena *s)
{
    if (k > SPV_CHUNK) return kept_sums_chunked(K, v, ld, idx, w, k, dv, o, s);
    K->spv_idx(v, ld, idx, w, k, dv, o);
    return TKA_OK;
}

/* The float32 sums of a row's kept V rows as topk_attention sums a float32 problem's
 * (docs/design.md §3): the weights wk rounded to float32, those that round to 0 dropped with
 * their value row, float32 blocks of 64 kept keys in the order given; the kept key t's row
 * is pos[t], or perm[pos[t]] with perm. o = the sums, *z = the rounded weights' sum (two
 * chains). ip: room for k positions (may be pos itself when perm is given: written behind
 * its reads). */
static tka_status kept_f32(const tka_kernels *K, const float *v, int64_t ld, const int64_t *pos,
                           const int64_t *perm, const double *wk, int64_t k, int64_t dv,
                           int64_t *ip, double *o, double *z, tka_arena *s)
{
    float *wf = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(float));
    if (!wf) return TKA_ERR_NOMEM;
    double z0 = 0.0, z1 = 0.0;
    int64_t c = 0;
    for (int64_t t = 0; t < k; t++) {
        const float f = (float)wk[t];
        ip[c] = perm ? perm[pos[t]] : pos[t];
        wf[c] = f;
        if (t & 1) z1 += (double)f; else z0 += (double)f;
        c += f != 0.0f;
    }
    *z = z0 + z1;
    return kept_sums_f32(K, v, ld, ip, wf, c, dv, o, s);
}

/* The float32 sums of a row whose weights (rounded to float32) sit at their keys'
 * positions in wd (n floats, 0 for the keys not kept, at most k others): the weights that
 * are not 0 read back in position order with their positions by the vector kernel
 * (>= the smallest positive float), V read in that order (a stream with gaps), z in four
 * chains by position over those only (the zeros would add nothing). */
static tka_status placed_f32(const tka_kernels *K, const float *v, int64_t ld, const float *wd,
                             int64_t n, int64_t k, int64_t dv, double *o, double *z,
                             tka_arena *s)
{
    /* gather_ge writes whole vectors: room for k + 8 */
    int64_t *pos = tka_arena_alloc(s, (size_t)(k + 8) * sizeof(int64_t));
    double *wv = tka_arena_alloc(s, (size_t)(k + 8) * sizeof(double));
    float *wf = tka_arena_alloc(s, (size_t)(k + 1) * sizeof(float));
    if (!pos || !wv || !wf) return TKA_ERR_NOMEM;
    const int64_t c = K->gather_ge[TKA_F32](wd, n, 0x1p-149, wv, pos);
    double zc[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t t = 0; t < c; t++) {
        wf[t] = (float)wv[t];
        zc[pos[t] & 3] += wv[t];
    }
    *z = (zc[0] + zc[1]) + (zc[2] + zc[3]);
    return kept_sums_f32(K, v, ld, pos, wf, c, dv, o, s);
}

/* The output of row r from its kept keys (original positions in oi, scores in kv, the
 * row's largest score mx; their weights e^{kv - mx} in wk_in when the caller has them). */
static tka_status full_output(const search_ctx *cx, int64_t r, int64_t h, int64_t n, int64_t k,
                              const int64_t *oi, int dense_out, const double *kv,
                              const double *wk_in, double mx, int fw, tka_arena *s)
{
    const tka_search_args *a = cx->a;
    const tka_kernels *K = cx->K;
    const int64_t dv = a->dv;
    double *o = cx->out_v + (size_t)(r * dv);
    const char *vh = (const char *)a->v + (size_t)(h * a->v_head_stride) * esize(a->vdtype);
    const double *wk = wk_in;
    if (!wk) {
        double *ws = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(double));
        if (!ws) return TKA_ERR_NOMEM;
        K->exp_shift[TKA_F64](kv, k, mx, ws);
        wk = ws;
    }
    /* V's rows summed by pv_idx: partial sums in registers, the rows ahead prefetched */
    double z = 0.0;
    if (dense_out) {  /* kept positions already increasing (keys stored in position order) */
        int64_t t = 1;
        while (t < k && oi[t] > oi[t - 1]) t++;
        dense_out = t < k;
    }
    if (dense_out && fw) {
        /* every weight rounded to float32 at its key's position (0 elsewhere, an array of
         * n floats), then summed by placed_f32 */
        float *wd = tka_arena_alloc(s, (size_t)n * sizeof(float));
        if (!wd) return TKA_ERR_NOMEM;  /* the caller frees out->idx */
        memset(wd, 0, (size_t)n * sizeof(float));
        for (int64_t t = 0; t < k; t++) wd[oi[t]] = (float)wk[t];
        tka_status st = placed_f32(K, (const float *)vh, a->v_row_stride, wd, n, k, dv, o, &z, s);
        if (st != TKA_OK) return st;  /* the caller frees out->idx */
    } else if (dense_out) {
        /* weights placed at the keys' positions (read back only where marked), the kept
         * positions marked in a bitmap and read back in increasing order, V read in that
         * order (a stream with gaps); z in the same order */
        const int64_t nw = (n + 63) / 64;
        uint64_t *bits = tka_arena_alloc(s, (size_t)nw * sizeof(uint64_t));
        double *wd = tka_arena_alloc(s, (size_t)n * sizeof(double));
        int64_t *pos = tka_arena_alloc(s, (size_t)(k + 1) * sizeof(int64_t));
        double *wt = tka_arena_alloc(s, (size_t)(k + 1) * sizeof(double));
        if (!bits || !wd || !pos || !wt) return TKA_ERR_NOMEM;  /* the caller frees out->idx */
        memset(bits, 0, (size_t)nw * sizeof(uint64_t));
        for (int64_t t = 0; t < k; t++) {
            wd[oi[t]] = wk[t];
            bits[oi[t] >> 6] |= (uint64_t)1 << (oi[t] & 63);
        }
        int64_t c = 0;
        for (int64_t u = 0; u < nw; u++)
            for (uint64_t b = bits[u]; b; b &= b - 1) {
                const int64_t i = u * 64 + __builtin_ctzll(b);
                pos[c] = i;
                wt[c] = wd[i];
                z += wt[c++];
            }
        K->pv_idx[a->vdtype](vh, a->v_row_stride, pos, wt, c, dv, o);
    } else if (fw) {  /* (kept keys in the storage order given) */
        int64_t *ip = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(int64_t));
        if (!ip) return TKA_ERR_NOMEM;  /* the caller frees out->idx */
        tka_status st = kept_f32(K, (const float *)vh, a->v_row_stride, oi, NULL, wk, k, dv, ip,
                                 o, &z, s);
        if (st != TKA_OK) return st;  /* the caller frees out->idx */
    } else {
        for (int64_t t = 0; t < k; t++) z += wk[t];
        K->pv_idx[a->vdtype](vh, a->v_row_stride, oi, wk, k, dv, o);
    }
    for (int64_t j = 0; j < dv; j++) o[j] /= z;
    return TKA_OK;
}

/*
 * How far a score of the float32 kernels (sdot, sdot4) may lie from the real logit
 * c q.k of the stored values (docs/design.md §3): the query rounded to float32 (u = 2^-24
 * relative, 2^-149 absolute), at most ceil(d/8) float32 fused multiply-adds per lane and
 * two float32 additions joining the lanes (u each on partial sums bounded by
 * sum_j |q_j k_j|), a float64 addition and the float64 scale; 1% covers the second-order
 * terms, and 2^-149 per operation any float32 underflow. Added to eta, so the certificate
 * (e^{4 eta}) allows for it.
 */
static double f32_eta(const srow *w, const row_bufs *rb, double maxabs, double scale)
{
    const double d = (double)w->d;
    return (ceil(d / 8.0) + 6.0) * 0x1p-24 * 1.01 * rb->qn1 * maxabs
           + (2.0 * d + 8.0) * 0x1p-149 * scale * (maxabs + 1.0);
}

static tka_status full_row(const search_ctx *cx, int64_t r, srow *w, const chk_t *ck,
                           double *sc, tka_arena *s, double *w4, double *z4, int fw)
{
    const size_t mark = tka_arena_mark(s);
    tka_status st = full_row_in(cx, r, w, ck, sc, s, w4, z4, fw);
    tka_arena_release(s, mark);
    if (st != TKA_RETRY) return st;
    /* the certificate of every scored key by finalize, which adds keys past k_eps' until
     * the padded bound meets eps */
    double mx = -INFINITY;
    for (int64_t t = 0; t < w->n; t++) {
        w->si[t] = t;
        if (sc[t] > mx) mx = sc[t];
    }
    w->sv = sc;
    w->ns = w->n;
    w->unscored = 0;
    w->m = mx;
    w->ref = mx;
    w->fm = 1.0;
    double zs = 0.0;
    for (int64_t t = 0; t < w->n; t++) zs += exp(sc[t] - mx);
    w->zs = zs;
    st = TKA_OK;
    if (!finalize(cx, w, r, 0.0, ck->eps, s, &st) && st == TKA_OK)
        st = TKA_INTERNAL_ERROR(); /* with every key kept the bound is 0 */
    return st;
}

/* The full pass's scores of m <= GROUP queries over the keys [c0, c1) of one head, into
 * sc + i n + c0 (see fallback_rows). A key's score does not depend on the range it is
 * computed in when ranges start at multiples of F16_CHUNK (the kernels score each key
 * alone; float16 keys are converted by chunks of F16_CHUNK from the range's start). */
typedef struct {
    const tka_kernels *K;
    const char *keys;
    tka_dtype dt;
    int64_t n, d, m, dpad;
    int f32;
    double scale;
    const double *q;
    const float *qf;
    double *sc;
} score_job;

/* keys per chunk of a parallel full pass (a multiple of F16_CHUNK) */
#define SCORE_CHUNK 65536

static tka_status score_range(const score_job *j, int64_t c0, int64_t c1, float *kc)
{
    const tka_kernels *K = j->K;
    const int64_t d = j->d, n = j->n;
    if (!j->f32) {
        const char *x = j->keys + (size_t)(c0 * d) * esize(j->dt);
        if (j->m == 1) K->dot[j->dt](x, c1 - c0, d, j->q, d, 1.0, j->sc + c0);
        else K->dot4[j->dt](x, c1 - c0, d, j->q, j->dpad, d, 1.0, j->sc + c0, n);
        return TKA_OK;
    }
    const int64_t step = j->dt == TKA_F16 ? F16_CHUNK : c1 - c0;
    for (int64_t u0 = c0; u0 < c1; u0 += step) {
        const int64_t u1 = u0 + step < c1 ? u0 + step : c1;
        const float *x = (const float *)j->keys + u0 * d;
        if (j->dt == TKA_F16) {
            K->f16_to_f32((const uint16_t *)j->keys + u0 * d, (u1 - u0) * d, kc);
            x = kc;
        }
        if (j->m == 1) K->sdot(x, u1 - u0, d, j->qf, d, j->scale, j->sc + u0);
        else K->sdot4(x, u1 - u0, d, j->qf, j->dpad, d, j->scale, j->sc + u0, n);
    }
    return TKA_OK;
}

static tka_status score_chunks(void *c, int64_t u0, int64_t u1, tka_arena *s, int64_t *err_row)
{
    const score_job *j = c;
    float *kc = NULL;
    if (j->f32 && j->dt == TKA_F16
        && !(kc = tka_arena_alloc(s, (size_t)(F16_CHUNK * j->d) * sizeof(float)))) {
        *err_row = u0;
        return TKA_ERR_NOMEM;
    }
    for (int64_t u = u0; u < u1; u++) {
        const int64_t c0 = u * SCORE_CHUNK, c1 = c0 + SCORE_CHUNK < j->n ? c0 + SCORE_CHUNK : j->n;
        score_range(j, c0, c1, kc);
    }
    return TKA_OK;
}

/* Full scoring of the m rows rows[0..m) (one head) in one pass over the keys. first[i]:
 * the working state of row rows[i] when it decided to switch (its sample's reads and time
 * count for it), or NULL when it did not sample. buf: a row buffer free for use. */
static tka_status fallback_rows(const search_ctx *cx, const int64_t *rows, int64_t m,
                                const search_dims *sd, char *buf, const srow *const *first,
                                tka_arena *s)
{
    const tka_key_index *ix = cx->ix;
    const tka_search_args *a = cx->a;
    const tka_kernels *K = cx->K;
    const int64_t n = sd->n, d = sd->d, h = rows[0] / a->L, dpad = (d + 15) / 16 * 16;
    const int timing = a->stages;
    const size_t mark = tka_arena_mark(s);
    double *q = tka_arena_alloc(s, (size_t)(GROUP * dpad) * sizeof(double));
    float *qf = tka_arena_alloc(s, (size_t)(GROUP * dpad) * sizeof(float));
    double *sc = tka_arena_alloc(s, (size_t)((m > 1 ? GROUP : 1) * n) * sizeof(double));
    /* the rows keeping many keys sum V together in one pass (see full_row_in), for a V of
     * moderate length (the weights take 32 bytes per key) */
    double *w4 = NULL, *acc4 = NULL, z4[GROUP] = {0.0};
    int64_t drow[GROUP], nd = 0;  /* the rows whose output the group's pass sums */
    if (cx->out_v && n <= GROUP_PV_MAX_N) {
        w4 = tka_arena_alloc(s, (size_t)(GROUP * n) * sizeof(double));
        acc4 = tka_arena_alloc(s, (size_t)(GROUP * (a->dv > 0 ? a->dv : 1)) * sizeof(double));
    }
    if (!q || !qf || !sc || (cx->out_v && n <= GROUP_PV_MAX_N && (!w4 || !acc4))) {
        tka_arena_release(s, mark);
        return TKA_ERR_NOMEM;
    }
    /* float32 keys (and float16 ones, converted exactly, by chunks) are scored as
     * topk_attention scores a float32 problem: float32 queries, products accumulated in
     * float32 lanes, the scale applied in float64 (when nothing can overflow float32); the
     * certificate then allows for that accumulation (f32_eta), and the kept keys come by
     * decreasing score as computed. float64 keys: the float64 scores of the search (dot4). */
    /* the queries: scaled in float64 (exactly as prepare_query scales them), as float32,
     * and their largest magnitude (a compare, not fmax: a call per value) */
    double qmax = 0.0;
    memset(q, 0, (size_t)(GROUP * dpad) * sizeof(double));
    memset(qf, 0, (size_t)(GROUP * dpad) * sizeof(float));
    for (int64_t i = 0; i < m; i++) {
        double *qi = q + i * dpad;
        float *fi = qf + i * dpad;
        if (a->q32) {
            const float *x = a->q32 + (size_t)(rows[i] * d);
            for (int64_t j = 0; j < d; j++) {
                const double v = (double)x[j];
                qi[j] = a->scale * v;
                fi[j] = x[j];
                qmax = fabs(v) > qmax ? fabs(v) : qmax;
            }
        } else {
            const double *x = a->q + (size_t)(rows[i] * d);
            for (int64_t j = 0; j < d; j++) {
                qi[j] = a->scale * x[j];
                fi[j] = (float)x[j];
                qmax = fabs(x[j]) > qmax ? fabs(x[j]) : qmax;
            }
        }
    }
    const int f32 = ix->dtype != TKA_F64
                    && qmax * ix->maxabs[h] * (double)(d + 16) < 1e36 && qmax < 1e36;
    float *kc = NULL;  /* float16 keys: a chunk converted to float32 */
    if (f32 && ix->dtype == TKA_F16
        && !(kc = tka_arena_alloc(s, (size_t)(F16_CHUNK * d) * sizeof(float)))) {
        tka_arena_release(s, mark);
        return TKA_ERR_NOMEM;
    }
    const size_t es = esize(ix->dtype);
    const double t0 = timing ? stage_now() : 0.0;
    score_job sj = {K, (const char *)ix->keys + (size_t)(h * ix->cap * d) * es, ix->dtype,
                    n, d, m, dpad, f32, a->scale, q, qf, sc};
    tka_status st = TKA_OK;
    if (n >= 2 * SCORE_CHUNK && !tka_threads_in_worker()) {
        /* a group alone on a long row (the search runs on the calling thread, see
         * tka_search): its pass over the keys by chunks on every thread */
        int64_t bad;
        st = tka_rows_run_parallel((n + SCORE_CHUNK - 1) / SCORE_CHUNK,
                                   (double)n * (double)d * (double)m * 0.25, score_chunks, &sj,
                                   &bad);
    } else {
        st = score_range(&sj, 0, n, kc);
    }
    if (st != TKA_OK) {
        tka_arena_release(s, mark);
        return st;
    }
    const double t_pass = timing ? (stage_now() - t0) / (double)m : 0.0;
    /* float32 keys scored as topk_attention scores them and a float32 V: the rows' output
     * as topk_attention sums it too (float32 weights, float32 blocks of 64 keys), the
     * deferred rows' in the group's pass over V, the others' over their kept rows */
    const int fw = f32 && a->vdtype == TKA_F32;
    /* float64 weights interleaved by four: zeroed for the pv kernel's lanes of unused slots;
     * float32 rows need nothing (a row that takes a slot writes every key's weight) */
    if (w4 && !fw) memset(w4, 0, (size_t)(GROUP * n) * sizeof(double));
    const double pass_bytes = (double)n * (double)d * (double)es / (double)m;
    search_dims sd_q = *sd;
    sd_q.proxy = 0;  /* the query's scaling, norms and eta; no proxy codes */
    for (int64_t i = 0; i < m && st == TKA_OK; i++) {
        const int64_t r = rows[i];
        const double tr = timing ? stage_now() : 0.0;
        srow w;
        chk_t ck;
        row_bufs rb;
        carve_row(buf, sd, &w, &ck, &rb, 0);
        w.timing = timing;
        prepare_query(cx, r, &sd_q, &w, &ck, &rb);
        if (first[i]) { /* the sample the decision was made on */
            w.bytes = first[i]->bytes;
            w.proxies = first[i]->proxies;
            memcpy(w.st, first[i]->st, sizeof w.st);
            memcpy(w.sb, first[i]->sb, sizeof w.sb);
            w.wall = first[i]->wall;
        }
        if (f32) w.eta += f32_eta(&w, &rb, cx->ix->maxabs[h], a->scale);
        w.bytes += pass_bytes;
        w.st[TKA_STAGE_RERANK] += t_pass;
        w.sb[TKA_STAGE_RERANK] += pass_bytes;
        w.blocks = sd->nb;
        w.distinct = n;
        /* a row that defers its output takes the next free slot of w4 (the pass then
         * sums only those rows) */
        double *slot = !w4 ? NULL : fw ? (double *)((float *)w4 + (size_t)nd * n) : w4 + nd;
        st = full_row(cx, r, &w, &ck, sc + (size_t)(i * n), s, slot, &z4[nd], fw);
        if (st != TKA_OK) break;
        if (z4[nd] > 0.0) drow[nd++] = rows[i];  /* a kept maximum weighs 1 */
        if (timing) w.wall += t_pass + (stage_now() - tr);
        row_stats(cx, r, &w);
        cx->rows[r].full_scoring = 1;
    }
    const int64_t deferred = nd;
    if (st == TKA_OK && deferred > 0) {
        const double t1 = timing ? stage_now() : 0.0;
        const int64_t dv = a->dv;
        const char *vh = (const char *)a->v + (size_t)(h * a->v_head_stride) * esize(a->vdtype);
        if (fw)
            K->spv((const float *)vh, n, a->v_row_stride, (const float *)w4, n, (int)deferred, dv,
                   acc4, dv);
        else
            K->pv[a->vdtype](vh, n, a->v_row_stride, w4, (int)deferred, dv, acc4, dv);
        for (int64_t i = 0; i < deferred; i++) {
            double *o = cx->out_v + (size_t)(drow[i] * dv);
            for (int64_t j = 0; j < dv; j++) o[j] = acc4[i * dv + j] / z4[i];
        }
        if (timing) {
            const double share = (stage_now() - t1) / (double)deferred;
            for (int64_t i = 0; i < deferred; i++) {  /* every row of V, read once for them */
                cx->rows[drow[i]].stage_s[TKA_STAGE_OUTPUT] += share;
                cx->rows[drow[i]].stage_bytes[TKA_STAGE_OUTPUT] =
                    (double)n * (double)dv * (double)esize(a->vdtype) / (double)deferred;
            }
        }
    }
    tka_arena_release(s, mark);
    return st;
}

/* The first expansion of the streaming rows of a group, in one pass over the blocks: each
 * block's int8 codes are read by every row that needs them while they are in cache. */
static void expand_group(const search_ctx *cx, int64_t h, int64_t k, srow *const *w,
                         row_bufs *const *rb, const stream_mid *const *md)
{
    const double t0 = w[0]->timing ? stage_now() : 0.0;
    const int64_t nb = w[0]->nb, bs = w[0]->bs, n = w[0]->n;
    /* the first row that reads a block prefetches the next block some row reads */
    int64_t nx = 0;
    for (int64_t b = 0; b < nb; b = nx) {
        for (nx = b + 1; nx < nb; nx++) {
            int64_t any = 0;
            for (int64_t g = 0; g < k && !any; g++)
                any = !rb[g]->done[nx] && w[g]->bord[nx] <= md[g]->t_expand;
            if (any) break;
        }
        const int64_t sz = b * bs + bs < n ? bs : n - b * bs;
        int64_t pf = nx < nb ? nx : -1;
        for (int64_t g = 0; g < k; g++) {
            if (rb[g]->done[b] || w[g]->bord[b] > md[g]->t_expand) continue;
            w[g]->lcnt[w[g]->bord[b]] -= sz;
            stream_block(cx, w[g], h, rb[g], b, w[g]->lcnt, NULL, pf);
            pf = -1;
        }
    }
    if (w[0]->timing) {
        const double share = (stage_now() - t0) / (double)k;
        for (int64_t g = 0; g < k; g++) {
            w[g]->st[TKA_STAGE_CODES] += share;
            w[g]->wall += share;
        }
    }
}

/*
 * The streaming rows of a group, once its shared part is done (looks, samples, the
 * switch, the first expansions), are independent: each row's stream_finish reads the
 * index and writes only its own buffers and results. A group publishes them in its slot,
 * and any thread whose own groups are done takes rows from it while the group's thread
 * takes them too, one at a time; the group's thread keeps the rows' buffers until every
 * row it published is done. A row's results do not depend on the thread that finishes it.
 * Two groups of four rows on two threads (clustered keys, n = 262144, d = 128): the group
 * holding the rows that read the most proxies finished last, the other thread idle.
 */
enum { SLOT_IDLE = 0, SLOT_BUSY, SLOT_OPEN, SLOT_DONE };
typedef struct group_slot {
    _Atomic int state;
    _Atomic int64_t next, done;
    _Atomic int err;              /* the first failing row's status (TKA_OK: none) */
    int64_t ks;
    int64_t row[GROUP];
    srow *w[GROUP];
    chk_t *ck[GROUP];
    row_bufs *rb[GROUP];
    const stream_mid *md[GROUP];
} group_slot;

/* Finish the rows of slot sl not yet taken, one at a time (arena s: this thread's). */
static void slot_run(const search_ctx *cx, group_slot *sl, tka_arena *s)
{
    int64_t u;
    while ((u = atomic_fetch_add(&sl->next, 1)) < sl->ks) {
        const size_t mk = tka_arena_mark(s);
        srow *w = sl->w[u];
        const double t1 = w->timing ? stage_now() : 0.0;
        tka_status st = stream_finish(cx, sl->row[u], w, sl->ck[u], sl->rb[u], s, sl->md[u]);
        if (w->timing) w->wall += stage_now() - t1;
        if (st == TKA_OK) {
            row_stats(cx, sl->row[u], w);
        } else {
            int ok = TKA_OK;
            atomic_compare_exchange_strong(&sl->err, &ok, (int)st);
        }
        tka_arena_release(s, mk);
        atomic_fetch_add_explicit(&sl->done, 1, memory_order_release);
    }
}

/* A thread whose groups are done: while every group has begun, take rows from the groups
 * that published some, waiting (spinning, up to SLOT_WAIT seconds) for those still in
 * their shared part. While groups remain unbegun the thread returns instead (to begin
 * one). */
#define SLOT_WAIT 0.05
static void slot_help(search_ctx *cx, tka_arena *s)
{
    double t0 = -1.0;
    for (;;) {
        if (atomic_load(&cx->started) < cx->ngroups) return;
        int waiting = 0;
        for (int64_t g = 0; g < cx->ngroups; g++) {
            group_slot *sl = &cx->slots[g];
            const int state = atomic_load_explicit(&sl->state, memory_order_acquire);
            if (state == SLOT_BUSY) waiting = 1;
            if (state == SLOT_OPEN && atomic_load(&sl->next) < sl->ks) {
                slot_run(cx, sl, s);
                t0 = -1.0;
            }
        }
        if (!waiting) return;
        const double t = stage_now();
        if (t0 < 0.0) t0 = t;
        else if (t - t0 > SLOT_WAIT) return;
        for (int i = 0; i < 64; i++) tka_cpu_relax();
    }
}

/* Group buffers above this many bytes: the rows of a group run one after the other (no
 * shared expansion), each in the same buffer. */
#define GROUP_BUF_MAX ((size_t)128 << 20)

static tka_status search_groups(void *c, int64_t g0, int64_t g1, tka_arena *s, int64_t *err_row)
{
    search_ctx *cx = c;
    const tka_key_index *ix = cx->ix;
    const tka_search_args *a = cx->a;
    const int64_t n = ix->n, bs = ix->block_size, L = a->L, per = (L + GROUP - 1) / GROUP;
    const search_dims sd = {n, ix->d, bs, (n + bs - 1) / bs, 1, 0};
    const int timing = a->stages;
    const size_t mark = tka_arena_mark(s);
    const size_t rbytes = (row_bytes(&sd) + 63) / 64 * 64;
    const int64_t nbuf = L > 1 && (size_t)GROUP * rbytes <= GROUP_BUF_MAX ? GROUP : 1;
    char *bufs = tka_arena_alloc(s, (size_t)nbuf * rbytes);  /* for every group of the range */
    unsigned char *smark = tka_arena_alloc(s, (size_t)(GROUP * sd.nb));  /* sample_group's */
    /* block_dots' queries and products */
    double *q4 = tka_arena_alloc(s, (size_t)(GROUP * ((ix->d + 15) / 16 * 16)) * sizeof(double));
    double *cd = tka_arena_alloc(s, (size_t)(GROUP * sd.nb) * sizeof(double));
    if (!bufs || !smark || !q4 || !cd) {
        tka_arena_release(s, mark);
        return TKA_ERR_NOMEM;
    }
    tka_status st = TKA_OK;
    group_slot *slot = NULL;  /* the group in progress, when rows are shared */
#define SLOT_CLOSE()                                                               \
    do {                                                                           \
        if (slot) atomic_store_explicit(&slot->state, SLOT_DONE, memory_order_release); \
        slot = NULL;                                                               \
    } while (0)
    for (int64_t g = g0; g < g1 && st == TKA_OK; g++) {
        SLOT_CLOSE();
        if (cx->slots) {
            slot = &cx->slots[g];
            atomic_store(&slot->state, SLOT_BUSY);
            atomic_fetch_add(&cx->started, 1);
        }
        const int64_t r0 = (g / per) * L + (g % per) * GROUP, h = r0 / L;
        const int64_t m = L - (g % per) * GROUP < GROUP ? L - (g % per) * GROUP : GROUP;
        srow w[GROUP];
        chk_t ck[GROUP];
        row_bufs rb[GROUP];
        stream_mid md[GROUP];
        int64_t fbr[GROUP], nfb = 0;
        const srow *fbs[GROUP];
        if (nbuf == 1) {  /* one row at a time */
            /* every row's first look before any row streams: when one of them asks for full
             * scoring the group switches as a whole, as it does with a buffer per row (a
             * row that streamed on its own look before a flat row switched the others cost
             * more than joining their pass: clustered keys, n = 2^20, d = 128, one thread,
             * 144 against 117-125 ms for four queries). The rows then look again in turn. */
            int64_t sw = -1;
            srow lk[GROUP];  /* the looks' counts (bytes, proxies, timers) */
            srow *const ws0[1] = {&w[0]};
            const row_bufs *const rbs0[1] = {&rb[0]};
            for (int64_t i = 0; i < m && m >= 2 && sw < 0; i++) {
                const double t_row0 = timing ? stage_now() : 0.0;
                carve_row(bufs, &sd, &w[0], &ck[0], &rb[0], 1);
                w[0].timing = timing;
                prepare_query(cx, r0 + i, &sd, &w[0], &ck[0], &rb[0]);
                block_dots(cx, h, 1, ws0, rbs0, q4, cd);
                if (stream_look(cx, r0 + i, &sd, &w[0], &ck[0], &rb[0], m, &md[0])) sw = i;
                if (timing) w[0].wall = stage_now() - t_row0;
                lk[i] = w[0];
            }
            if (sw >= 0) {
                for (int64_t u = 0; u < m; u++) {
                    fbr[u] = r0 + u;
                    fbs[u] = u <= sw ? &lk[u] : NULL;
                }
                st = fallback_rows(cx, fbr, m, &sd, bufs, fbs, s);
                if (st != TKA_OK) *err_row = g;
                continue;
            }
            for (int64_t i = 0; i < m && st == TKA_OK; i++) {
                const int64_t r = r0 + i;
                const double t_row0 = timing ? stage_now() : 0.0;
                carve_row(bufs, &sd, &w[0], &ck[0], &rb[0], 1);
                w[0].timing = timing;
                prepare_query(cx, r, &sd, &w[0], &ck[0], &rb[0]);
                block_dots(cx, h, 1, ws0, rbs0, q4, cd);
                int fb = stream_look(cx, r, &sd, &w[0], &ck[0], &rb[0], m - i, &md[0]);
                if (!fb) stream_begin(cx, r, &sd, &w[0], &ck[0], &rb[0], m - i, &fb, &md[0], -1);
                if (fb) {  /* this row and the rest of the group: one full pass */
                    if (timing) w[0].wall = stage_now() - t_row0;
                    for (int64_t u = i; u < m; u++) {
                        fbr[u - i] = r0 + u;
                        fbs[u - i] = u == i ? &w[0] : NULL;
                    }
                    st = fallback_rows(cx, fbr, m - i, &sd, bufs, fbs, s);
                    break;
                }
                stream_expand(cx, &w[0], h, &rb[0], w[0].lcnt, md[0].t_expand);
                st = stream_finish(cx, r, &w[0], &ck[0], &rb[0], s, &md[0]);
                if (timing) w[0].wall = stage_now() - t_row0;
                if (st == TKA_OK) row_stats(cx, r, &w[0]);
            }
            if (st != TKA_OK) *err_row = g;
            continue;
        }
        /* every row of the group in its own buffer: each row's first look (a quarter of
         * its sample) first, and the group switches as a whole when one of them asks for
         * full scoring; otherwise each row reads the rest of its sample and decides on its
         * own, and then the group's choice below may switch more of them. The rows that
         * switch share one full pass and the streaming rows one first expansion. */
        srow *ws[GROUP];
        row_bufs *rbs[GROUP];
        const stream_mid *mds[GROUP];
        int64_t ks = 0, sr[GROUP], looked = 0;
        int all = m >= 2 && n <= GROUP_SMALL_N;
        if (!all) {  /* every row's query, then the group's centroid products */
            srow *wq[GROUP];
            const row_bufs *rq[GROUP];
            for (int64_t i = 0; i < m; i++) {
                const double t_row0 = timing ? stage_now() : 0.0;
                carve_row(bufs + (size_t)i * rbytes, &sd, &w[i], &ck[i], &rb[i], 1);
                w[i].timing = timing;
                prepare_query(cx, r0 + i, &sd, &w[i], &ck[i], &rb[i]);
                if (timing) w[i].wall = stage_now() - t_row0;
                wq[i] = &w[i];
                rq[i] = &rb[i];
            }
            block_dots(cx, h, m, wq, rq, q4, cd);
        }
        for (int64_t i = 0; i < m && !all; i++, looked++) {
            const double t_row0 = timing ? stage_now() : 0.0;
            all = stream_look(cx, r0 + i, &sd, &w[i], &ck[i], &rb[i], m, &md[i]);
            if (timing) w[i].wall += stage_now() - t_row0;
        }
        /* every row's look predicts it to read most proxies (blocks too loose to skip
         * many, as at decode where they are in key order): the group computes every
         * key's level in one pass over the codes first (levels_group: same results) */
        int dense = !all && m >= 2;
        for (int64_t i = 0; i < m && dense; i++) dense = md[i].reads >= STREAM_DENSE * (double)n;
        if (!all && !dense && m >= 2) {
            /* the looks together (each row's own test is in stream_look); not for a dense
             * group, whose rows' predictions each count the pass over the codes that
             * levels_group shares */
            double pass, select, total = 0.0;
            full_costs(ix->d, n, &pass, &select);
            for (int64_t i = 0; i < m && total >= 0.0; i++)
                total = md[i].cost >= 0.0 ? total + md[i].cost : -1.0;
            all = total > STREAM_GROUP * (pass + (double)m * select);
        }
        if (dense) {
            srow *wg[GROUP];
            row_bufs *rg[GROUP];
            for (int64_t g = 0; g < m; g++) {
                wg[g] = &w[g];
                rg[g] = &rb[g];
            }
            levels_group(cx, h, m, wg, rg);
        }
        int64_t stop[GROUP];
        for (int64_t i = 0; i < m && !all; i++) {
            if (i == 1) {  /* the first row streams: the other rows' samples in one pass */
                srow *wg[GROUP];
                row_bufs *rg[GROUP];
                for (int64_t g = 1; g < m; g++) {
                    wg[g - 1] = &w[g];
                    rg[g - 1] = &rb[g];
                }
                sample_group(cx, h, m - 1, wg, rg, smark, stop + 1);
            }
            const double t_row0 = timing ? stage_now() : 0.0;
            int fb = 0;
            stream_begin(cx, r0 + i, &sd, &w[i], &ck[i], &rb[i], i == 0 ? m : 1, &fb, &md[i],
                         i == 0 ? -1 : stop[i]);
            if (timing) w[i].wall += stage_now() - t_row0;
            if (fb && i == 0) {  /* the first row's sample decides for the group */
                all = 1;
                break;
            }
            if (fb) {
                fbr[nfb] = r0 + i;
                fbs[nfb++] = &w[i];
            } else {
                ws[ks] = &w[i];
                rbs[ks] = &rb[i];
                mds[ks] = &md[i];
                sr[ks++] = i;
            }
        }
        if (all) {
            for (int64_t u = 0; u < m; u++) {  /* the rows that looked: their sample's cost */
                fbr[u] = r0 + u;
                fbs[u] = u < looked ? &w[u] : NULL;
            }
            st = fallback_rows(cx, fbr, m, &sd, bufs, fbs, s);
            if (st != TKA_OK) *err_row = g;
            continue;
        }
        /* The group's choice, once every row has its sample: a row joins a full pass when
         * streaming it is predicted to cost more than its share of a pass of four queries
         * plus its own selection (the first row's own test); such rows switch when some
         * row switched anyway, or when together they would save more than a whole pass
         * (clustered keys, d = 64: one row of a group predicted to score 47% of its keys
         * one by one streamed at 4x a shared pass's share). */
        if (ks > 0 && m >= 2) {
            double pass, select, gain = 0.0;
            full_costs(ix->d, n, &pass, &select);
            const double join = select + pass / (double)GROUP;
            for (int64_t u = 0; u < ks; u++)
                if (mds[u]->cost > join) gain += mds[u]->cost - select;
            if (gain > 0.0 && (nfb > 0 || gain > STREAM_MARGIN * pass)) {
                int64_t kk = 0;
                nfb = 0;
                for (int64_t i = 0, u = 0; i < m; i++) {
                    const int streams = u < ks && sr[u] == i;
                    const int stays = streams && mds[u]->cost <= join;
                    u += streams;
                    if (stays) {
                        ws[kk] = &w[i];
                        rbs[kk] = &rb[i];
                        mds[kk] = &md[i];
                        sr[kk++] = i;
                    } else {
                        fbr[nfb] = r0 + i;
                        fbs[nfb++] = &w[i];
                    }
                }
                ks = kk;
            }
        }
        if (ks > 0) {
            expand_group(cx, h, ks, ws, rbs, mds);
            /* each row's first cut in stream_finish usually lies below the sample's estimate
             * (the blocks not yet read count on their block bound's level): those blocks
             * too are read in one pass for every row that needs them, and stream_finish
             * starts from that cut (as a row alone, which reads them there, does) */
            int more = 0;
            for (int64_t u = 0; u < ks; u++) {
                const int64_t i = sr[u];
                md[i].t_first = stream_first_cut(cx, &w[i], &ck[i], &md[i]);
                more |= md[i].t_first > md[i].t_expand;
            }
            if (more) {
                stream_mid md2[GROUP];
                const stream_mid *mds2[GROUP];
                for (int64_t u = 0; u < ks; u++) {
                    md2[u] = md[sr[u]];
                    md2[u].t_expand = md2[u].t_first;
                    mds2[u] = &md2[u];
                }
                expand_group(cx, h, ks, ws, rbs, mds2);
            }
        }
        if (ks > 0) {  /* the streaming rows: published (see group_slot) */
            group_slot local;
            group_slot *sl = slot ? slot : &local;
            sl->ks = ks;
            for (int64_t u = 0; u < ks; u++) {
                const int64_t i = sr[u];
                sl->row[u] = r0 + i;
                sl->w[u] = &w[i];
                sl->ck[u] = &ck[i];
                sl->rb[u] = &rb[i];
                sl->md[u] = &md[i];
            }
            atomic_init(&sl->next, 0);
            atomic_init(&sl->done, 0);
            atomic_init(&sl->err, TKA_OK);
            if (slot) atomic_store_explicit(&sl->state, SLOT_OPEN, memory_order_release);
            slot_run(cx, sl, s);
            while (atomic_load_explicit(&sl->done, memory_order_acquire) < ks) tka_cpu_relax();
            st = (tka_status)atomic_load(&sl->err);
        }
        /* the switching rows' buffers are no longer needed: the pass uses the first one's */
        if (st == TKA_OK && nfb)
            st = fallback_rows(cx, fbr, nfb, &sd, bufs + (size_t)(fbr[0] - r0) * rbytes, fbs, s);
        if (st != TKA_OK) *err_row = g;
    }
    SLOT_CLOSE();
#undef SLOT_CLOSE
    if (st == TKA_OK && cx->slots) slot_help(cx, s);
    tka_arena_release(s, mark);
    return st;
}

static tka_status search_rows(void *c, int64_t r0, int64_t r1, tka_arena *s, int64_t *err_row)
{
    search_ctx *cx = c;
    const tka_key_index *ix = cx->ix;
    const tka_search_args *a = cx->a;
    const int64_t n = ix->n, bs = ix->block_size;
    const search_dims sd = {n, ix->d, bs, (n + bs - 1) / bs, a->use_proxy && ix->pz != NULL,
                            a->method == TKA_SEARCH_MC};
    const size_t mark = tka_arena_mark(s);
    char *buf = tka_arena_alloc(s, row_bytes(&sd));  /* for every row of the range */
    if (!buf) return TKA_ERR_NOMEM;
    tka_status st = TKA_OK;
    for (int64_t r = r0; r < r1 && st == TKA_OK; r++) {
        srow w;
        chk_t ck;
        row_bufs rb;
        carve_row(buf, &sd, &w, &ck, &rb, 1);
        const double t_row0 = a->stages ? stage_now() : 0.0;
        w.timing = a->stages;
        prepare_query(cx, r, &sd, &w, &ck, &rb);
        order_blocks(cx, r, &sd, &w, &ck, &rb);
        st = sd.proxy ? search_levels(cx, r, &sd, &w, &ck, &rb, s)
                      : search_blocks(cx, r, &sd, &w, &ck, &rb, s);
        if (st != TKA_OK) {
            *err_row = r;
            break;
        }
        if (w.timing) w.wall = stage_now() - t_row0;
        row_stats(cx, r, &w);
    }
    tka_arena_release(s, mark);
    return st;
}

tka_status tka_search(const tka_key_index *ix, const tka_search_args *args,
                      tka_search_row *out_rows, double *out_v, tka_error *err)
{
    err->row = -1;
    err->what = NULL;
    double lw[NLEVELS];
    for (int b = 0; b < NLEVELS; b++) lw[b] = tka_exp_up(-(double)b * LEVEL_W);
    const tka_kernels *K = tka_kernels_active();
    search_ctx cx = {ix, args, K, K->search, out_rows, out_v, lw, NULL, 0, 0};
    const int64_t rows = ix->heads * args->L;
    for (int64_t r = 0; r < rows; r++) memset(&out_rows[r], 0, sizeof out_rows[r]);
    double work = (double)rows * (double)ix->n * (double)ix->d * 0.25;
    tka_status st;
    if (args->use_proxy && (ix->pz || ix->pz4) && args->method == TKA_SEARCH_DELTA) {
        /* the streaming search, by groups of queries of one head */
        const int64_t per = (args->L + GROUP - 1) / GROUP, groups = ix->heads * per;
        /* fewer groups than threads over long rows: the groups run on the calling thread,
         * so that a full pass (score_chunks) and the k_eps selection of its rows (the
         * chunked row kernels) use every thread; the results are the same either way */
        if (groups < tka_num_threads() && ix->n >= 2 * SCORE_CHUNK && !tka_threads_in_worker())
            st = tka_rows_run_serial(groups, search_groups, &cx, &err->row);
        else if (tka_num_threads() > 1 && groups > 1 && !tka_threads_in_worker()) {
            /* rows of a group may be finished by another thread (group_slot) */
            cx.slots = calloc((size_t)groups, sizeof(group_slot));
            cx.ngroups = groups;
            if (!cx.slots) {
                st = TKA_ERR_NOMEM;
            } else {
                st = tka_rows_run_parallel(groups, work, search_groups, &cx, &err->row);
                free(cx.slots);
            }
        } else {
            st = tka_rows_run_parallel(groups, work, search_groups, &cx, &err->row);
        }
        if (st != TKA_OK && err->row >= 0) /* the failing group's first row */
            err->row = (err->row / per) * args->L + (err->row % per) * GROUP;
    } else {
        st = tka_rows_run_parallel(rows, work, search_rows, &cx, &err->row);
    }
    if (st != TKA_OK) {
        for (int64_t r = 0; r < rows; r++) {
            free(out_rows[r].idx);
            out_rows[r].idx = NULL;
        }
    }
    return st;
}
