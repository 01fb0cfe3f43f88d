/*
 * search.c - certified search (DESIGN.md §4): building the key index, and Δk-Search /
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
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "search.h"

static const tka_search_kernels *search_kernels(void)
{
#ifdef TKA_HAVE_X86
    if (tka_simd_active() != TKA_SIMD_SCALAR) return &tka_search_kernels_avx2;
#endif
    return &tka_search_kernels_scalar;
}

static inline size_t esize(tka_dtype dt) { return dt == TKA_F32 ? 4 : 8; }

static inline double key_at(const void *keys, tka_dtype dt, int64_t i)
{
    return dt == TKA_F32 ? (double)((const float *)keys)[i] : ((const double *)keys)[i];
}

/* e^x rounded up past underflow: below -700 the result is e^-700 (an upper bound). */
static inline double exp_up(double x)
{
    return x < -700.0 ? 9.8596765437597708e-305 : exp(x) * (1.0 + 0x1p-50);
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

/* quickselect on (value, position) pairs: afterwards v[k] is the k-th largest (ties by
 * position), larger ones before it */
static void pairs_select(double *v, int64_t *p, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        int64_t mid = lo + (hi - lo) / 2;
        double pv = v[mid];
        int64_t pp = p[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pv || (v[i] == pv && p[i] < pp)) i++;
            while (v[j] < pv || (v[j] == pv && p[j] > pp)) j--;
            if (i <= j) {
                double tv = v[i]; v[i] = v[j]; v[j] = tv;
                int64_t tp = p[i]; p[i] = p[j]; p[j] = tp;
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return;
    }
}

tka_status tka_index_order(const void *keys, tka_dtype dt, int64_t n, int64_t d,
                           int64_t bs, int64_t *perm)
{
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    if (n <= bs) return TKA_OK;
    double *proj = malloc((size_t)n * sizeof(double));
    double *mu = malloc((size_t)d * sizeof(double));
    double *v = malloc((size_t)d * sizeof(double));
    double *w = malloc((size_t)d * sizeof(double));
    /* explicit stack of ranges: at most log2(n / bs) + 1 deep per pending side */
    int64_t *stack = malloc(sizeof(int64_t) * 2 * 128);
    if (!proj || !mu || !v || !w || !stack) {
        free(proj); free(mu); free(v); free(w); free(stack);
        return TKA_ERR_NOMEM;
    }
    int64_t top = 0;
    stack[top++] = 0;
    stack[top++] = n;
    while (top > 0) {
        int64_t b = stack[--top], a = stack[--top], m = b - a;
        if (m <= bs) continue;
        /* mean and leading direction from an evenly spaced sample of the node */
        int64_t ns = m < 512 ? m : 512;
        memset(mu, 0, (size_t)d * sizeof(double));
        for (int64_t s = 0; s < ns; s++) {
            int64_t i = perm[a + s * m / ns];
            for (int64_t j = 0; j < d; j++) mu[j] += key_at(keys, dt, i * d + j);
        }
        for (int64_t j = 0; j < d; j++) mu[j] /= (double)ns;
        for (int64_t j = 0; j < d; j++) v[j] = 1.0 / sqrt((double)d) * (j % 2 ? -1.0 : 1.0) + 0.01 * j;
        for (int it = 0; it < 4; it++) {
            memset(w, 0, (size_t)d * sizeof(double));
            for (int64_t s = 0; s < ns; s++) {
                int64_t i = perm[a + s * m / ns];
                double t = 0.0;
                for (int64_t j = 0; j < d; j++) t += (key_at(keys, dt, i * d + j) - mu[j]) * v[j];
                for (int64_t j = 0; j < d; j++) w[j] += t * (key_at(keys, dt, i * d + j) - mu[j]);
            }
            double nn = 0.0;
            for (int64_t j = 0; j < d; j++) nn += w[j] * w[j];
            if (!(nn > 0.0) || !isfinite(nn)) break;
            nn = 1.0 / sqrt(nn);
            for (int64_t j = 0; j < d; j++) v[j] = w[j] * nn;
        }
        for (int64_t s = 0; s < m; s++) {
            int64_t i = perm[a + s];
            double t = 0.0;
            for (int64_t j = 0; j < d; j++) t += (key_at(keys, dt, i * d + j) - mu[j]) * v[j];
            proj[a + s] = isfinite(t) ? t : 0.0;
        }
        /* split at a block boundary near the middle */
        int64_t nblk = (m + bs - 1) / bs, left = (nblk / 2) * bs;
        pairs_select(proj + a, perm + a, m, left);
        if (top + 4 > 2 * 128) continue; /* cannot happen for n < 2^63 */
        stack[top++] = a;
        stack[top++] = a + left;
        stack[top++] = a + left;
        stack[top++] = b;
    }
    free(proj); free(mu); free(v); free(w); free(stack);
    return TKA_OK;
}

/* ================================================================== filling */

typedef struct {
    const tka_key_index *ix;
    const tka_key_index_out *o;
    int64_t k0;
} fill_ctx;

static tka_status fill_head(void *c, int64_t h0, int64_t h1, tka_scratch *s, int64_t *err_row)
{
    fill_ctx *cx = c;
    const tka_key_index *ix = cx->ix;
    const tka_key_index_out *o = cx->o;
    const int64_t d = ix->d, bs = ix->block_size, n = ix->n;
    double *acc = tka_scratch_get(s, TKA_SLOT_TMP, (size_t)d * sizeof(double));
    if (!acc) return TKA_ERR_NOMEM;
    const double pad = 1.0 + (double)(d + 8) * 0x1p-52;
    for (int64_t h = h0; h < h1; h++) {
        const char *kb = (const char *)ix->keys + (size_t)(h * ix->cap * d) * esize(ix->dtype);
        double mx = cx->k0 > 0 ? o->maxabs[h] : 0.0;
        for (int64_t i = cx->k0 * d; i < n * d; i++) {
            double a = fabs(key_at(kb, ix->dtype, i));
            if (a > mx) mx = a;
        }
        o->maxabs[h] = mx;
        for (int64_t b = cx->k0 / bs; b * bs < n; b++) {
            const int64_t i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
            const size_t bo = (size_t)(h * ix->cap_blocks + b) * (size_t)d;
            if (ix->summary & TKA_SUM_MINMAX) {
                float *lo = o->lo + bo, *hi = o->hi + bo;
                for (int64_t j = 0; j < d; j++) {
                    double l = INFINITY, u = -INFINITY;
                    for (int64_t i = i0; i < i1; i++) {
                        double x = key_at(kb, ix->dtype, i * d + j);
                        if (x < l) l = x;
                        if (x > u) u = x;
                    }
                    lo[j] = f32_down(l);
                    hi[j] = f32_up(u);
                }
            }
            if (ix->summary & TKA_SUM_BALL) {
                float *ctr = o->ctr + bo;
                memset(acc, 0, (size_t)d * sizeof(double));
                for (int64_t i = i0; i < i1; i++)
                    for (int64_t j = 0; j < d; j++) acc[j] += key_at(kb, ix->dtype, i * d + j);
                for (int64_t j = 0; j < d; j++) ctr[j] = (float)(acc[j] / (double)(i1 - i0));
                double r = 0.0;
                for (int64_t i = i0; i < i1; i++) {
                    double ss = 0.0;
                    for (int64_t j = 0; j < d; j++) {
                        double e = key_at(kb, ix->dtype, i * d + j) - (double)ctr[j];
                        ss += e * e;
                    }
                    if (ss > r) r = ss;
                }
                /* radius of the stored (rounded) centroid, rounded up */
                o->rad[h * ix->cap_blocks + b] = nextafter(sqrt(r) * pad, INFINITY);
            }
        }
        if (o->pz) {
            for (int64_t i = cx->k0; i < n; i++) {
                const size_t ko = (size_t)(h * ix->cap + i);
                int8_t *z = o->pz + ko * (size_t)d;
                double m = 0.0;
                for (int64_t j = 0; j < d; j++) {
                    double a = fabs(key_at(kb, ix->dtype, i * d + j));
                    if (a > m) m = a;
                }
                /* the scale must be a normal float32 with k / scale within [-127, 127] */
                float sc = f32_up(m / 127.0);
                if (!(m > 1e-30 && m < 1e37)) sc = 0.0f;
                double ss = 0.0;
                for (int64_t j = 0; j < d; j++) {
                    double x = key_at(kb, ix->dtype, i * d + j);
                    double t = sc > 0.0f ? nearbyint(x / (double)sc) : 0.0;
                    if (t > 127.0) t = 127.0;
                    if (t < -127.0) t = -127.0;
                    z[j] = (int8_t)t;
                    double e = x - (double)sc * t; /* sc * t is exact in float64 */
                    ss += e * e;
                }
                o->pscale[ko] = sc;
                o->perr[ko] = f32_up(nextafter(sqrt(ss) * pad, INFINITY));
            }
        }
    }
    return TKA_OK;
}

tka_status tka_index_fill(const tka_key_index *ix, const tka_key_index_out *out, int64_t k0,
                          tka_error *err)
{
    fill_ctx cx = {ix, out, k0};
    err->row = -1;
    err->what = NULL;
    double work = (double)ix->heads * (double)(ix->n - k0) * (double)ix->d * 4.0;
    return tka_parallel_rows(ix->heads, work, fill_head, &cx, &err->row);
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
    double p;   /* upper bound on the logit */
    int64_t i;  /* stored position */
} pitem;

static inline int pitem_before(pitem a, pitem b) { return a.p > b.p || (a.p == b.p && a.i < b.i); }

static void heap_push(pitem *h, int64_t *n, pitem x)
{
    int64_t c = (*n)++;
    while (c > 0) {
        int64_t p = (c - 1) / 2;
        if (!pitem_before(x, h[p])) break;
        h[c] = h[p];
        c = p;
    }
    h[c] = x;
}

static pitem heap_pop(pitem *h, int64_t *n)
{
    pitem top = h[0], x = h[--(*n)];
    int64_t c = 0;
    for (;;) {
        int64_t l = 2 * c + 1;
        if (l >= *n) break;
        if (l + 1 < *n && pitem_before(h[l + 1], h[l])) l++;
        if (!pitem_before(h[l], x)) break;
        h[c] = h[l];
        c = l;
    }
    if (*n > 0) h[c] = x;
    return top;
}

typedef struct {
    const tka_key_index *ix;
    const tka_search_args *a;
    const tka_search_kernels *kern;
    tka_search_row *rows;
    double *out_v;
} search_ctx;

/* Per-row working state. */
typedef struct {
    int64_t n, d, bs, nb;
    const char *keys;
    size_t es;
    const double *qs;      /* scaled query */
    double eta;            /* rounding allowance on every logit */
    double ref;            /* largest block bound: unit of the bound masses */
    /* blocks by decreasing bound */
    double *ub;
    int64_t *bord;
    double *bsuf;          /* bsuf[j] = sum_{t >= j} |B_t| e^{ub_t - ref} */
    int64_t j;             /* next unexpanded block */
    /* proxy pool (max-heap) of unscored keys of expanded blocks */
    pitem *heap;
    int64_t nheap;
    double pool;           /* running sum of e^{p - ref} over the heap */
    double pool_max;       /* largest value the running sum has taken */
    int64_t pool_ops;
    /* scored keys */
    double *sv;
    int64_t *si, ns;
    double m, zs;          /* largest scored logit, sum e^{s - m} */
    uint8_t *mark;         /* MC: keys whose logit was computed */
    int64_t distinct;
    int64_t unscored;      /* keys neither scored (deterministically) nor in the sample */
    double bytes;
    int64_t proxies, blocks;
} srow;

static inline void add_scored(srow *w, double s, int64_t i)
{
    w->sv[w->ns] = s;
    w->si[w->ns++] = i;
    if (s > w->m) {
        w->zs = w->zs * exp(w->m - s) + 1.0;
        w->m = s;
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
    else
        cx->kern->dot_f64(w->qs, (const double *)w->keys + i0 * w->d, w->d, m, out);
    w->bytes += (double)m * (double)w->d * (double)w->es;
}

/* Mass of everything unscored in units of e^{ref}, rounded up (0 when nothing is left). */
static double unscored_mass(const srow *w, int exact_pool)
{
    if (w->unscored == 0) return 0.0;
    double u = w->bsuf[w->j] * (1.0 + (double)(w->nb + 4) * 0x1p-52);
    if (exact_pool) {
        double p = 0.0;
        for (int64_t t = 0; t < w->nheap; t++) p += exp_up(w->heap[t].p - w->ref);
        u += p * (1.0 + (double)(w->nheap + 4) * 0x1p-52);
    } else {
        /* the running sum drifts by at most one rounding per update */
        u += w->pool + (double)(w->pool_ops + 4) * 0x1p-52 * w->pool_max;
    }
    return u;
}

/* u (in units of e^{ref}) in units of e^{m}, rounded up; +inf when too large. */
static inline double to_m_units(const srow *w, double u)
{
    if (u <= 0.0) return 0.0;
    double l = log(u) + (w->ref - w->m);
    return l > 700.0 ? INFINITY : exp(l) * (1.0 + 0x1p-48);
}

/*
 * Try to certify with unscored mass bound u_ref (units e^{ref}): sort the scored keys, find
 * the smallest top set whose certificate is <= eps. Returns 1 and fills the row on success.
 */
static int finalize(const search_ctx *cx, srow *w, int64_t r, double u_ref, double eps,
                    tka_scratch *s, tka_status *st)
{
    const tka_key_index *ix = cx->ix;
    const tka_search_args *a = cx->a;
    tka_sort_pairs_desc(w->sv, w->si, w->ns);
    const double m = w->sv[0];
    w->m = m;
    double *suf = tka_scratch_get(s, TKA_SLOT_TMP2, (size_t)(w->ns + 1) * sizeof(double));
    if (!suf) {
        *st = TKA_ERR_NOMEM;
        return 1;
    }
    /* D_k: mass of scored keys ranked below k, rounded up */
    suf[w->ns] = 0.0;
    for (int64_t t = w->ns - 1; t >= 0; t--) suf[t] = suf[t + 1] + exp_up(w->sv[t] - m);
    const double u = to_m_units(w, u_ref);
    const double rel = 1.0 + (double)(w->ns + w->nb + w->nheap + 64) * 0x1p-50;
    const double grow = exp(4.0 * w->eta) * (1.0 + 0x1p-50);
    double head = 0.0, bound = 1.0;
    int64_t k = 0;
    while (k < w->ns) {
        head += exp(w->sv[k] - m);
        k++;
        double tail = suf[k] * rel + u;
        if (tail == 0.0) {
            bound = 0.0;
            break;
        }
        /* bound = tail / (head + tail), head rounded down, tail up */
        double hd = head / rel;
        bound = tail / (hd + tail);
        bound = nextafter(bound * rel * grow, INFINITY);
        if (bound <= eps) break;
    }
    if (!(bound <= eps)) return 0;
    tka_search_row *out = &cx->rows[r];
    out->idx = malloc((size_t)(k > 0 ? k : 1) * sizeof(int64_t));
    if (!out->idx) {
        *st = TKA_ERR_NOMEM;
        return 1;
    }
    const int64_t *perm = ix->perm + (size_t)((r / a->L) * ix->cap);
    for (int64_t t = 0; t < k; t++) out->idx[t] = perm[w->si[t]];
    out->k = k;
    out->tv_bound = bound > 1.0 ? 1.0 : bound;
    w->bytes += 8.0 * (double)k;
    if (cx->out_v) {
        const int64_t h = r / a->L, dv = a->dv;
        double *o = cx->out_v + (size_t)(r * dv);
        memset(o, 0, (size_t)dv * sizeof(double));
        double z = 0.0;
        for (int64_t t = 0; t < k; t++) {
            double p = exp(w->sv[t] - m);
            z += p;
            const int64_t row = h * a->v_head_stride + out->idx[t] * a->v_row_stride;
            if (a->vdtype == TKA_F32) {
                const float *v = (const float *)a->v + row;
                for (int64_t j = 0; j < dv; j++) o[j] += p * (double)v[j];
            } else {
                const double *v = (const double *)a->v + row;
                for (int64_t j = 0; j < dv; j++) o[j] += p * v[j];
            }
        }
        for (int64_t j = 0; j < dv; j++) o[j] /= z;
    }
    return 1;
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

/* Proxy bounds (with eta, capped by the block bound ubb) of keys [i0, i1), pushed. */
static void expand_proxies(const search_ctx *cx, srow *w, int64_t h, int64_t i0, int64_t i1,
                           double ubb, const float *qf, double qscale_inv, double slack_code,
                           double qn2, float *tmp)
{
    const tka_key_index *ix = cx->ix;
    const size_t ko = (size_t)(h * ix->cap);
    cx->kern->dot_i8(qf, ix->pz + (ko + (size_t)i0) * (size_t)w->d, w->d, i1 - i0, tmp);
    for (int64_t i = i0; i < i1; i++) {
        const double sc = (double)ix->pscale[ko + (size_t)i];
        const double base = sc * (double)tmp[i - i0] * qscale_inv;
        double p = base + sc * slack_code * qscale_inv + qn2 * (double)ix->perr[ko + (size_t)i];
        p += 0x1p-50 * fabs(p) + 0x1p-1060 + w->eta;
        if (!(p < ubb)) p = ubb;
        heap_push(w->heap, &w->nheap, (pitem){p, i});
        w->pool += exp_up(p - w->ref);
        w->pool_ops++;
        if (w->pool > w->pool_max) w->pool_max = w->pool;
    }
    w->proxies += i1 - i0;
    w->bytes += (double)(i1 - i0) * ((double)w->d + 8.0);
}

/*
 * One MC check (DESIGN §4): sample mc keys from the unscored population with probability
 * proportional to their caps e^{bound}, bound the population mass with the empirical
 * Bernstein inequality (Maurer & Pontil 2009, Thm 4) at confidence 1 - dlt. Returns the
 * upper bound in units of e^{ref}, or -1 when it cannot be formed.
 */
static double mc_bound(const search_ctx *cx, srow *w, int64_t h, double dlt, uint64_t *rng,
                       tka_scratch *s)
{
    const int64_t nblk = w->nb - w->j, nit = nblk + w->nheap, mc = cx->a->mc_samples;
    double *cum = tka_scratch_get(s, TKA_SLOT_CHUNK_V, (size_t)(nit + 1) * sizeof(double));
    double *val = tka_scratch_get(s, TKA_SLOT_CHUNK, (size_t)(mc + 1) * sizeof(double));
    if (!cum || !val) return -1.0;
    /* caps in units of e^{ref}: blocks first (sizes times e^{ub - ref}), then pool keys */
    double c = 0.0;
    for (int64_t t = 0; t < nit; t++) {
        double cap;
        if (t < nblk) {
            int64_t b = w->bord[w->j + t], i0 = b * w->bs;
            int64_t sz = (i0 + w->bs < w->n ? w->bs : w->n - i0);
            cap = (double)sz * exp_up(w->ub[w->j + t] - w->ref);
        } else {
            cap = exp_up(w->heap[t - nblk].p - w->ref);
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
            key = w->heap[lo - nblk].i;
            lcap = w->heap[lo - nblk].p;
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

static tka_status search_rows(void *c, int64_t r0, int64_t r1, tka_scratch *s, int64_t *err_row)
{
    search_ctx *cx = c;
    const tka_key_index *ix = cx->ix;
    const tka_search_args *a = cx->a;
    const int64_t n = ix->n, d = ix->d, bs = ix->block_size, nb = (n + bs - 1) / bs;
    const int proxy = a->use_proxy && ix->pz != NULL;
    const int mc = a->method == TKA_SEARCH_MC;

    /* scratch: one buffer carved into the per-row arrays */
    size_t bytes = (size_t)d * 2 * sizeof(double) + (size_t)d * sizeof(float)
                 + (size_t)nb * (2 * sizeof(double) + sizeof(int64_t)) + sizeof(double)
                 + (size_t)n * (sizeof(double) + sizeof(int64_t))
                 + (proxy ? (size_t)n * sizeof(pitem) : 0) + (size_t)bs * (sizeof(float) + sizeof(double))
                 + (mc ? (size_t)n : 0) + 64;
    char *buf = tka_scratch_get(s, TKA_SLOT_ROW, bytes);
    if (!buf) return TKA_ERR_NOMEM;

    for (int64_t r = r0; r < r1; r++) {
        const int64_t h = r / a->L;
        char *p = buf;
        srow w;
        memset(&w, 0, sizeof w);
        double *qs = (double *)p; p += (size_t)d * sizeof(double);
        w.ub = (double *)p; p += (size_t)nb * sizeof(double);
        w.bsuf = (double *)p; p += (size_t)(nb + 1) * sizeof(double);
        w.sv = (double *)p; p += (size_t)n * sizeof(double);
        w.bord = (int64_t *)p; p += (size_t)nb * sizeof(int64_t);
        w.si = (int64_t *)p; p += (size_t)n * sizeof(int64_t);
        if (proxy) { w.heap = (pitem *)p; p += (size_t)n * sizeof(pitem); }
        float *qf = (float *)p; p += (size_t)d * sizeof(float);
        float *tmp = (float *)p; p += (size_t)bs * sizeof(float);
        double *tmpd = (double *)((((uintptr_t)p) + 7) & ~(uintptr_t)7);
        p = (char *)(tmpd + bs);
        (void)tmpd;
        if (mc) { w.mark = (uint8_t *)p; memset(w.mark, 0, (size_t)n); }

        w.n = n; w.d = d; w.bs = bs; w.nb = nb;
        w.es = esize(ix->dtype);
        w.keys = (const char *)ix->keys + (size_t)(h * ix->cap * d) * w.es;
        w.qs = qs;
        const double *q = a->q + (size_t)(r * d);
        double qn1 = 0.0, qq = 0.0, qmax = 0.0;
        for (int64_t j = 0; j < d; j++) {
            qs[j] = a->scale * q[j];
            qn1 += fabs(qs[j]);
            qq += qs[j] * qs[j];
            if (fabs(qs[j]) > qmax) qmax = fabs(qs[j]);
        }
        const double qn2 = sqrt(qq) * (1.0 + (double)(d + 4) * 0x1p-52) + 0x1p-1000;
        qn1 *= 1.0 + (double)(d + 4) * 0x1p-52;
        w.eta = (double)(d + 8) * 0x1p-52 * qn1 * ix->maxabs[h] + 0x1p-1060 * (double)d;
        const double eps = a->eps[r];
        double eps_in = eps * exp(-4.0 * w.eta) * (1.0 - 1e-6);

        /* proxy query: q' scaled by a power of two so that its largest entry is in [1, 2) */
        int qe = 0;
        if (proxy && qmax > 0.0) frexp(qmax, &qe);
        const double qscale = ldexp(1.0, 1 - qe), qscale_inv = ldexp(1.0, qe - 1);
        double qf1 = 0.0;
        for (int64_t j = 0; j < d; j++) {
            qf[j] = (float)(qs[j] * qscale);
            qf1 += fabs(qs[j] * qscale);
        }
        const double slack_code = (double)(d + 4) * 0x1p-24 * 127.0 * qf1 * 1.0001
                                + (double)d * 127.0 * 0x1p-148;

        block_bounds(cx, &w, h, qn1, qn2);
        w.bytes += (double)nb * (double)(((ix->summary & TKA_SUM_MINMAX) ? 8 * d : 0)
                                         + ((ix->summary & TKA_SUM_BALL) ? 4 * d + 8 : 0));
        for (int64_t b = 0; b < nb; b++) w.bord[b] = b;
        memcpy(w.bsuf, w.ub, (size_t)nb * sizeof(double));
        tka_sort_pairs_desc(w.bsuf, w.bord, nb);
        memcpy(w.ub, w.bsuf, (size_t)nb * sizeof(double)); /* ub now in visiting order */
        w.ref = w.ub[0];
        w.bsuf[nb] = 0.0;
        for (int64_t t = nb - 1; t >= 0; t--) {
            int64_t i0 = w.bord[t] * bs, sz = i0 + bs < n ? bs : n - i0;
            w.bsuf[t] = w.bsuf[t + 1] + (double)sz * exp_up(w.ub[t] - w.ref);
        }
        w.m = -INFINITY;
        w.unscored = n;

        uint64_t rng = a->seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(r + 1));
        splitmix(&rng);
        int64_t next_cp = 2 * a->mc_samples, checks = 0;
        tka_status st = TKA_OK;
        int done = 0;

        while (!done) {
            /* deterministic certificate: eps Z_s >= (1 - eps) U */
            if (w.unscored == 0) {
                if (finalize(cx, &w, r, 0.0, eps, s, &st)) break;
                st = TKA_ERR_ARG; /* unreachable: with every key kept the bound is 0 */
                break;
            }
            if (w.ns > 0) {
                double u = to_m_units(&w, unscored_mass(&w, 0));
                if (eps_in * w.zs >= (1.0 - eps_in) * u) {
                    double ue = unscored_mass(&w, 1);
                    if (finalize(cx, &w, r, ue, eps, s, &st)) break;
                    eps_in *= 0.5; /* rounding corner: ask for more margin */
                    continue;
                }
            }
            /* MC certificate at checkpoints (doubling scored counts), delta / 2^t each */
            if (mc && w.ns > 0 && w.distinct >= next_cp && w.unscored >= 4 * a->mc_samples) {
                checks++;
                double dlt = ldexp(a->delta, (int)(checks < 1000 ? -checks : -1000));
                double ub = mc_bound(cx, &w, h, dlt, &rng, s);
                if (ub < 0.0) { st = TKA_ERR_NOMEM; break; }
                if (eps_in * w.zs >= (1.0 - eps_in) * to_m_units(&w, ub)) {
                    if (finalize(cx, &w, r, ub, eps, s, &st)) {
                        cx->rows[r].certified_mc = 1;
                        break;
                    }
                }
                next_cp = 2 * w.distinct;
            }
            /* next action: expand the best block, or score the best pool key */
            if (w.j < nb && (!proxy || w.nheap == 0 || w.ub[w.j] >= w.heap[0].p)) {
                const int64_t b = w.bord[w.j], i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
                if (proxy) {
                    expand_proxies(cx, &w, h, i0, i1, w.ub[w.j], qf, qscale_inv, slack_code,
                                   qn2, tmp);
                } else {
                    score(cx, &w, i0, i1 - i0, tmpd);
                    for (int64_t i = i0; i < i1; i++) {
                        add_scored(&w, tmpd[i - i0], i);
                        note_computed(&w, i);
                    }
                    w.unscored -= i1 - i0;
                }
                w.blocks++;
                w.j++;
            } else {
                pitem it = heap_pop(w.heap, &w.nheap);
                w.pool -= exp_up(it.p - w.ref);
                w.pool_ops++;
                if (w.nheap == 0) { w.pool = 0.0; w.pool_ops = 0; w.pool_max = 0.0; }
                double sv;
                score(cx, &w, it.i, 1, &sv);
                add_scored(&w, sv, it.i);
                note_computed(&w, it.i);
                w.unscored--;
            }
        }
        if (st != TKA_OK) {
            *err_row = r;
            return st;
        }
        tka_search_row *o = &cx->rows[r];
        o->keys_scored = w.distinct > n ? n : w.distinct;
        o->blocks_scored = w.blocks;
        o->proxies_read = w.proxies;
        o->bytes_read = w.bytes;
    }
    return TKA_OK;
}

tka_status tka_search(const tka_key_index *ix, const tka_search_args *args,
                      tka_search_row *out_rows, double *out_v, tka_error *err)
{
    err->row = -1;
    err->what = NULL;
    search_ctx cx = {ix, args, search_kernels(), out_rows, out_v};
    const int64_t rows = ix->heads * args->L;
    for (int64_t r = 0; r < rows; r++) memset(&out_rows[r], 0, sizeof out_rows[r]);
    double work = (double)rows * (double)ix->n * (double)ix->d * 0.25;
    tka_status st = tka_parallel_rows(rows, work, search_rows, &cx, &err->row);
    if (st != TKA_OK) {
        for (int64_t r = 0; r < rows; r++) {
            free(out_rows[r].idx);
            out_rows[r].idx = NULL;
        }
    }
    return st;
}
