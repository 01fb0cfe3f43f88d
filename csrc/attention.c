/*
 * attention.c - dense and Top-k attention, fused per query row (docs/design.md §3).
 *
 * A query row is scored against its keys into one float64 buffer of n scores (the only
 * per-row buffer; no (L, n) matrix ever exists), validated and reduced to its maximum
 * like a row of logits, then:
 *   dense:  weights e^{s - max} over all keys, output = sum w v / sum w;
 *   Top-k:  the kept set (fixed k, or k_eps from the same selection machinery as
 *           tka_k_eps), weights over the kept keys only, so only k rows of V are read.
 * Scores of float64 and float16 problems are accumulated in float64 (dot, dot4; float16
 * converted exactly); those of float32 problems in float32 vector lanes summed in float64
 * (sdot, sdot4), each score by one fixed sequence of operations whatever rows it is
 * computed with. Weights, sums and everything the selection computes from the scores are
 * float64.
 * Rows are spread over threads; each row is computed by one thread with the same code,
 * so results do not depend on the thread count.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct {
    const tka_attn *a;
    const tka_kernels *K;
    tka_attn_mode mode;
    const int64_t *k;     /* per row, or NULL for eps */
    const double *eps;
    void *out;
    int64_t *k_out;
    double *tau_out;
    int64_t **idx_out;
    double *err_sq;
    /* lowest failing query row: the parallel runner counts groups, not query rows, so the
     * row an error names is kept here (a group's rows are numbered in group order, so the
     * lowest failing group holds the lowest failing row) */
    _Atomic int64_t *bad_query;
} attn_ctx;

void tka_free(void *p) { free(p); }

static int64_t elem_size(tka_dtype dt) { return dt == TKA_F32 ? 4 : dt == TKA_F16 ? 2 : 8; }

/* Query rows are processed in groups of up to four of the same problem (fixed by the
 * row numbering, never by the thread split), scored together with the dot4 kernel. */
#define GROUP 4

/* Padded query length: a multiple of 16 values (every vector width of either type). */
static int64_t qpad(int64_t d) { return (d + 15) / 16 * 16; }

/* Top-k attention with eps sums V for the rows of a group that keep most keys in one pass
 * up to this many keys (the shared weights take 32 bytes per key) */
#define SHARE_V_MAX_N 65536

/* Score rows r0 .. r0+m-1 (one problem) into sc (m rows of n) and check each like a row
 * of logits; stops at the first bad row (*bad = its offset in the group). q has room for
 * GROUP zero-padded queries of dpad = qpad(d) values, float64 or (float32 problems) float. */
static tka_status score_group(const attn_ctx *c, int64_t r0, int m, tka_arena *s, void *q,
                              double *sc, tka_row *w, int *bad)
{
    const tka_attn *a = c->a;
    const int64_t b = r0 / a->L, l0 = r0 % a->L, n = a->n, d = a->d, dpad = qpad(d);
    const char *kb = a->k + a->k_off[b];
    const int64_t ld = a->k_ld / elem_size(a->dtype);
    if (a->dtype == TKA_F32) {
        float *qf = q;
        for (int i = 0; i < m; i++) {
            const char *qp = a->q + a->q_off[b] + (l0 + i) * a->q_ld;
            memcpy(qf + i * dpad, qp, (size_t)d * sizeof(float));
            for (int64_t j = d; j < dpad; j++) qf[i * dpad + j] = 0.0f;
        }
        if (m == GROUP)
            c->K->sdot4((const float *)kb, n, ld, qf, dpad, d, a->scale, sc, n);
        else
            for (int i = 0; i < m; i++)
                c->K->sdot((const float *)kb, n, ld, qf + i * dpad, d, a->scale, sc + i * n);
    } else {
        /* float64 problems, and float16 ones (converted exactly, scored in float64) */
        double *qd = q;
        for (int i = 0; i < m; i++) {
            const char *qp = a->q + a->q_off[b] + (l0 + i) * a->q_ld;
            double *qi = qd + i * dpad;
            if (a->dtype == TKA_F16)
                for (int64_t j = 0; j < d; j++) qi[j] = tka_half_to_float(((const uint16_t *)qp)[j]);
            else
                memcpy(qi, qp, (size_t)d * sizeof(double));
            for (int64_t j = d; j < dpad; j++) qi[j] = 0.0;
        }
        if (m == GROUP)
            c->K->dot4[a->dtype](kb, n, ld, qd, dpad, d, a->scale, sc, n);
        else
            for (int i = 0; i < m; i++)
                c->K->dot[a->dtype](kb, n, ld, qd + i * dpad, d, a->scale, sc + i * n);
    }
    for (int i = 0; i < m; i++) {
        double *si = sc + i * n;
        if (a->mask) {
            const char *mp = a->mask + a->m_off[b] + (l0 + i) * a->m_sl;
            for (int64_t j = 0; j < n; j++) si[j] += *(const double *)(mp + j * a->m_sn);
        }
        w[i].p = si;
        w[i].n = n;
        w[i].dt = TKA_F64;
        w[i].K = c->K;
        tka_status st = tka_row_check(&w[i], s);
        if (st != TKA_OK) {
            *bad = i;
            return st;
        }
    }
    return TKA_OK;
}

/* out row r = acc / z, in the problem's dtype. */
static void store_out(const attn_ctx *c, int64_t r, const double *acc, double z)
{
    const int64_t dv = c->a->dv;
    if (c->a->dtype == TKA_F32) {
        float *o = (float *)c->out + r * dv;
        for (int64_t j = 0; j < dv; j++) o[j] = (float)(acc[j] / z);
    } else if (c->a->dtype == TKA_F16) { /* rounded once, from the float64 value */
        uint16_t *o = (uint16_t *)c->out + r * dv;
        for (int64_t j = 0; j < dv; j++) o[j] = tka_double_to_half(acc[j] / z);
    } else {
        double *o = (double *)c->out + r * dv;
        for (int64_t j = 0; j < dv; j++) o[j] = acc[j] / z;
    }
}

static const char *v_row(const tka_attn *a, int64_t b, int64_t i)
{
    return a->v + a->v_off[b] + i * a->v_ld;
}

/* The float64 sum of n weights x[j], in four interleaved chains (j mod 4) joined as
 * (0 + 1) + (2 + 3): one fixed order, not one addition's latency per key. */
static double sum4(const double *x, int64_t n)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        s0 += x[j];
        s1 += x[j + 1];
        s2 += x[j + 2];
        s3 += x[j + 3];
    }
    if (j < n) s0 += x[j];
    if (j + 1 < n) s1 += x[j + 1];
    if (j + 2 < n) s2 += x[j + 2];
    return (s0 + s1) + (s2 + s3);
}

/* w[j] = (float)e[j] for n values, and the float64 sum of the w[j] in four interleaved
 * chains (j mod 4) joined as (0 + 1) + (2 + 3), as sum4 adds them. */
static double round_sum(const double *e, int64_t n, float *w)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float f0 = (float)e[j], f1 = (float)e[j + 1], f2 = (float)e[j + 2],
                    f3 = (float)e[j + 3];
        w[j] = f0;
        w[j + 1] = f1;
        w[j + 2] = f2;
        w[j + 3] = f3;
        s0 += f0;
        s1 += f1;
        s2 += f2;
        s3 += f3;
    }
    for (int64_t i = j; i < n; i++) w[i] = (float)e[i];
    if (j < n) s0 += w[j];
    if (j + 1 < n) s1 += w[j + 1];
    if (j + 2 < n) s2 += w[j + 2];
    return (s0 + s1) + (s2 + s3);
}

/* Dense attention for the m checked rows r0 .. r0+m-1 of one group: each row's scores
 * become its weights e^{s - max} in place, interleaved into wt (wt[4*i + r]; float32
 * problems: rounded to float32, one row after the other), and the pv
 * kernel sums the value rows for all of them in one pass over V (keys of weight 0, masked or
 * below e^-708 of the maximum, are skipped). acc holds GROUP rows of dv. */
static void dense_group(const attn_ctx *c, int64_t r0, int m, const tka_row *w, double *sc,
                        double *wt, double *acc)
{
    const tka_attn *a = c->a;
    const int64_t n = a->n, b = r0 / a->L;
    const int64_t ld = a->v_ld / elem_size(a->dtype);
    double z[GROUP];
    if (a->dtype == TKA_F32) {
        /* float32 problems: the weights rounded to float32 (row i's n weights at wf + i*n),
         * and z their float64 sum, so that the output stays an exact weighted mean of the
         * values with those weights */
        float *wf = (float *)wt;
        for (int i = 0; i < m; i++) {
            double *e = sc + i * n;
            c->K->exp_shift[TKA_F64](e, n, w[i].max, e);
            z[i] = round_sum(e, n, wf + i * n);
        }
        c->K->spv((const float *)v_row(a, b, 0), n, ld, wf, n, m, a->dv, acc, a->dv);
    } else {
        for (int i = 0; i < m; i++) {
            double *e = sc + i * n;
            c->K->exp_shift[TKA_F64](e, n, w[i].max, e);
            for (int64_t j = 0; j < n; j++) wt[4 * j + i] = e[j];
            z[i] = sum4(e, n);
        }
        c->K->pv[a->dtype](v_row(a, b, 0), n, ld, wt, m, a->dv, acc, a->dv);
    }
    for (int i = 0; i < m; i++) store_out(c, r0 + i, acc + i * a->dv, z[i]);
}

/*
 * A fixed k of a row's keys, small against n: one band pass (the kernel dense attention's
 * weights come from) above a lower bound L of the (k+1)-th largest score gathers the
 * candidates x >= L with their positions and sums the weights e^{x - max} of the keys
 * below L; the kept keys are the k largest candidates (ties by position), and tau = (sum of
 * the dropped weights) / (sum of all). L is, for k < 32, the smallest of the maxima of k + 1
 * consecutive slices of the row, else the r-th largest of 64 evenly spaced scores, r chosen
 * so that about 2(k+1) scores are expected above it. TKA_RETRY, and the general
 * path, when fewer than k + 1 candidates come out (L was too high), too many (too low), or
 * the largest dropped score is more than 600 below the maximum (its weight could underflow
 * there; the general path keeps the tail's relative accuracy at any depth). With tau NULL
 * (not wanted) no weight is computed: the band pass only compares and gathers.
 */
#define TKA_KFIX_SAMPLE 64
static tka_status keep_fixed_k(const attn_ctx *c, const tka_row *w, int64_t k, tka_arena *s,
                               double *tau, int64_t *keep)
{
    const int64_t n = w->n, S = TKA_KFIX_SAMPLE;
    const double *sc = w->p;
    if (n < 4 * S) return TKA_RETRY;
    const int64_t r = (2 * (k + 1) * S + n - 1) / n + 1;
    if (r > S / 4) return TKA_RETRY;
    double lo = -INFINITY;
    if (k < 32) {
        /* the smallest of the maxima of k + 1 consecutive slices: k + 1 scores (one per
         * slice) are not below it, so the band holds at least k + 1 candidates (a slice of
         * masked keys only has no maximum: then the sample decides) */
        lo = INFINITY;
        for (int64_t j = 0; j <= k && lo > -INFINITY; j++) {
            /* slice boundaries on multiples of 8 (no partial vector but the row's last; every
             * slice keeps >= 1 score since n / (k + 1) >= 4S / 32 = 8) */
            const int64_t a0 = j * n / (k + 1) / 8 * 8, a1 = j == k ? n : (j + 1) * n / (k + 1) / 8 * 8;
            const double mx = c->K->max_below[TKA_F64](sc + a0, a1 - a0, INFINITY);
            lo = mx < lo ? mx : lo;
        }
    }
    if (!(lo > -INFINITY)) {
        double top[TKA_KFIX_SAMPLE / 4];  /* the r largest sampled scores, decreasing */
        int64_t m = 0;
        for (int64_t j = 0; j < S; j++) {
            const double v = sc[j * n / S];
            if (m == r && !(v > top[r - 1])) continue;
            int64_t i = m < r ? m++ : r - 1;
            while (i > 0 && top[i - 1] < v) { top[i] = top[i - 1]; i--; }
            top[i] = v;
        }
        lo = top[r - 1];
    }
    if (!(lo > -INFINITY)) return TKA_RETRY;
    int64_t cap = 8 * r * n / S + 64;
    cap = cap < n ? cap : n;
    double *vals = tka_arena_alloc(s, (size_t)cap * sizeof(double));
    double *tmp = tka_arena_alloc(s, (size_t)cap * sizeof(double));
    int64_t *idx = tka_arena_alloc(s, (size_t)cap * sizeof(int64_t));
    if (!vals || !tmp || !idx) return TKA_ERR_NOMEM;
    /* the masses (the exp of every score) only where tau is wanted */
    const int mass = tau != NULL;
    tka_band_out bo;
    c->K->band[TKA_F64](sc, n, lo, INFINITY, w->max, mass, vals, idx, cap, &bo);
    const int64_t nc = bo.n_band;
    if (nc > cap || nc < k + 1) return TKA_RETRY;
    /* the k-th and (k+1)-th largest candidates */
    memcpy(tmp, vals, (size_t)nc * sizeof(double));
    tka_values_nth_desc(tmp, nc, k);
    const double next = tmp[k];
    double t = tmp[0];
    for (int64_t i = 1; i < k; i++) t = tmp[i] < t ? tmp[i] : t;
    if (mass && !(next >= w->max - 600.0)) return TKA_RETRY;
    if (mass) c->K->exp_shift[TKA_F64](vals, nc, w->max, tmp);
    else memset(tmp, 0, (size_t)nc * sizeof(double));
    int64_t above = 0;
    for (int64_t i = 0; i < nc; i++) above += vals[i] > t;
    int64_t ties = k - above, q = 0;
    double dropped = bo.mass_below, kept = 0.0;
    for (int64_t i = 0; i < nc; i++) {
        if (vals[i] > t || (vals[i] == t && ties > 0)) {
            ties -= vals[i] == t;
            keep[q++] = idx[i];
            kept += tmp[i];
        } else {
            dropped += tmp[i];
        }
    }
    if (tau) *tau = dropped / (kept + dropped);
    return q == k ? TKA_OK : TKA_ERR_INTERNAL;
}

/* The kept set of a scored row: its size, discarded mass (tau may be NULL: not wanted) and
 * positions; *keep is allocated in s, in the row's scope. */
static tka_status keep_set(const attn_ctx *c, const tka_row *w, int64_t r, tka_arena *s,
                           int64_t *k_out, double *tau, int64_t **keep)
{
    int64_t k;
    double t = 0.0, lt = 0.0, tl;
    tka_status st;
    if (c->k) {
        k = c->k[r] < w->n_live ? c->k[r] : w->n_live;
    } else if ((st = tka_row_keps(w, c->eps[r], s, &k, tau ? tau : &tl, &t)) != TKA_OK) {
        return st;
    }
    *keep = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(int64_t));
    if (!*keep) return TKA_ERR_NOMEM;
    *k_out = k;
    if (!c->k) return tka_row_topk_above(w, k, t, s, *keep);
    if (k > 0 && k < w->n_live) {
        const size_t mark = tka_arena_mark(s);
        st = keep_fixed_k(c, w, k, s, tau, *keep);
        tka_arena_release(s, mark);
        if (st != TKA_RETRY) return st;
    }
    st = tka_row_topk_set(w, k, s, *keep, tau ? &lt : NULL);
    if (tau) *tau = exp(lt);
    return st;
}

/* Where a row of a group that shares the V pass puts its weights: slot `slot` of the
 * group's buffer (float32 problems: row slot of n floats; others: interleaved, w[4*j + slot]). */
typedef struct {
    void *w;
    int slot;
} share_slot;

/*
 * A k_eps row keeping more than half of its keys, into the group's shared V pass: its
 * weights e^{s - max} for the kept keys (those above t, the k-th largest score, and the
 * lowest positions of those equal to it) and 0 for the others, written for every key in
 * one vector pass, so neither the kept positions nor their scores are gathered (unless
 * keep asks for the positions, to report them); ew, when given, holds every weight from
 * the selection's exp pass (no exp then). Float32 problems round the weights to float32
 * and sum the rounded ones (as dense attention does), so the output is the exact weighted
 * mean of the values with those weights. Returns
 * TKA_RETRY when t is not the k-th largest score (the caller then takes the gathering path).
 */
static tka_status share_row(const attn_ctx *c, const tka_row *w, int64_t k, double t,
                            const double *ew, tka_arena *s, const share_slot *sl, double *z,
                            int64_t *keep)
{
    const int64_t n = w->n;
    double *e = tka_arena_alloc(s, (size_t)n * sizeof(double));
    if (!e) return TKA_ERR_NOMEM;
    tka_status st = tka_row_keep_weights(w, k, t, ew, e);
    if (st != TKA_OK) return st;
    if (c->a->dtype == TKA_F32) {
        *z = round_sum(e, n, (float *)sl->w + (size_t)sl->slot * n);
    } else {
        double *w4 = (double *)sl->w + sl->slot;
        for (int64_t j = 0; j < n; j++) w4[4 * j] = e[j];
        *z = sum4(e, n);
    }
    /* the kept positions, only to report them: the same set by the gathering path */
    return keep ? tka_row_topk_above(w, k, t, s, keep) : TKA_OK;
}

/* The reported indices of a kept set (positions keep[0..k)): by decreasing score, ties by
 * lower position. */
static tka_status report_indices(const attn_ctx *c, int64_t r, const double *sc, const int64_t *keep,
                                 int64_t k, tka_arena *s)
{
    double *v = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(double));
    int64_t *idx = malloc((size_t)(k > 0 ? k : 1) * sizeof(int64_t));
    if (!v || !idx) {
        free(idx);
        return TKA_ERR_NOMEM;
    }
    for (int64_t i = 0; i < k; i++) {
        idx[i] = keep[i];
        v[i] = sc[keep[i]];
    }
    tka_pairs_sort_desc(v, idx, k);
    c->idx_out[r] = idx;
    return TKA_OK;
}

/* One Top-k attention row: its kept set, the weighted sum of its V rows, its info. With sl
 * (the group shares V passes), a k_eps row keeping more than half of the keys only places
 * its weights in its slot and its normaliser in *z (share_row; *shared set to 1): the group
 * sums V for such rows in one pass instead of one float64 axpy per kept key. */
static tka_status topk_row(const attn_ctx *c, int64_t r, const tka_row *wp, double *acc,
                           tka_arena *s, const share_slot *sl, double *z_sh, int *shared)
{
    const tka_attn *a = c->a;
    const tka_row w = *wp;
    tka_status st;
    int64_t k, *keep;
    double tau, *wk = NULL;
    const double *e = NULL;  /* every weight e^{s - max}, where the selection computed them */
    *shared = 0;
    if (sl && !c->k) {
        double t = 0.0;
        if ((st = tka_row_keps_e(&w, c->eps[r], s, &k, &tau, &t, &e)) != TKA_OK) return st;
        if (k > w.n / 2) {
            keep = c->idx_out ? tka_arena_alloc(s, (size_t)k * sizeof(int64_t)) : NULL;
            if (c->idx_out && !keep) return TKA_ERR_NOMEM;
            st = share_row(c, &w, k, t, e, s, sl, z_sh, keep);
            if (st == TKA_OK) {
                *shared = 1;
                if (c->k_out) c->k_out[r] = k;
                if (c->tau_out) c->tau_out[r] = tau;
                return keep ? report_indices(c, r, w.p, keep, k, s) : TKA_OK;
            }
            if (st != TKA_RETRY) return st;
        }
        if (e && k > 0 && t > -INFINITY) {
            /* the kept positions with their weights in one pass, when no tie at t is to be
             * broken (else as tka_row_topk_above) */
            keep = tka_arena_alloc(s, (size_t)(w.n + 16) * sizeof(int64_t));
            wk = tka_arena_alloc(s, (size_t)(w.n + 16) * sizeof(double));
            if (!keep || !wk) return TKA_ERR_NOMEM;
            if (c->K->gather_ge_w[w.dt](w.p, e, w.n, t, keep, wk) != k) wk = NULL;
        }
        if (!wk) {
            keep = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(int64_t));
            if (!keep) return TKA_ERR_NOMEM;
            if ((st = tka_row_topk_above(&w, k, t, s, keep)) != TKA_OK) return st;
        }
    } else if ((st = keep_set(c, &w, r, s, &k, c->tau_out ? &tau : NULL, &keep)) != TKA_OK) {
        return st;
    }
    const double *sc = w.p;
    const int64_t b = r / a->L;
    /* the kept weights e^{s - max}: the selection's, or the kept scores' by the same vector
     * exp (the one dense attention uses) */
    if (wk) {
        /* gathered with the positions */
    } else if (!(wk = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(double)))) {
        return TKA_ERR_NOMEM;
    } else if (e) {
        for (int64_t i = 0; i < k; i++) wk[i] = e[keep[i]];
    } else {
        for (int64_t i = 0; i < k; i++) wk[i] = sc[keep[i]];
        c->K->exp_shift[TKA_F64](wk, k, w.max, wk);
    }
    /* the kept keys of weight > 0, in the kept order: those below e^-708 of the maximum add
     * nothing, and a float32 problem's weights are rounded to float32 (as dense attention's
     * are) with those that round to 0 dropped, so a non-finite value row behind them is never
     * multiplied. No branch per key; z, the sum of the (rounded) weights, in four chains. */
    const int f32 = a->dtype == TKA_F32;
    int64_t *ip = tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(int64_t));
    float *wf = f32 ? tka_arena_alloc(s, (size_t)(k > 0 ? k : 1) * sizeof(float)) : NULL;
    if (!ip || (f32 && !wf)) return TKA_ERR_NOMEM;
    double z0 = 0.0, z1 = 0.0, z2 = 0.0, z3 = 0.0;
    int64_t q = 0, i = 0;
#define TKA_KEEP_TERM(j, zs)                                      \
    do {                                                          \
        const double x_ = wk[j];                                  \
        const float f_ = (float)x_;                               \
        const double y_ = f32 ? (double)f_ : x_;                  \
        ip[q] = keep[j];                                          \
        wk[q] = x_;                                               \
        if (f32) wf[q] = f_;                                      \
        zs += y_;                                                 \
        q += y_ != 0.0;                                           \
    } while (0)
    for (; i + 4 <= k; i += 4) {
        TKA_KEEP_TERM(i, z0);
        TKA_KEEP_TERM(i + 1, z1);
        TKA_KEEP_TERM(i + 2, z2);
        TKA_KEEP_TERM(i + 3, z3);
    }
    for (; i < k; i++) TKA_KEEP_TERM(i, z0);
#undef TKA_KEEP_TERM
    const double z = (z0 + z1) + (z2 + z3);
    const int64_t ld = a->v_ld / elem_size(a->dtype);
    if (f32) c->K->spv_idx((const float *)v_row(a, b, 0), ld, ip, wf, q, a->dv, acc);
    else c->K->pv_idx[a->dtype](v_row(a, b, 0), ld, ip, wk, q, a->dv, acc);
    store_out(c, r, acc, z);
    if (c->k_out) c->k_out[r] = k;
    if (c->tau_out) c->tau_out[r] = tau;
    return c->idx_out ? report_indices(c, r, sc, keep, k, s) : TKA_OK;
}

/* The exact output error of row r's kept set (docs/design.md §6). */
static tka_status row_error(const attn_ctx *c, int64_t r, const tka_row *wp, double *acc,
                            tka_arena *s)
{
    const tka_attn *a = c->a;
    const int64_t n = a->n;
    const tka_row w = *wp;
    tka_status st;
    (void)acc;
    int64_t k, *keep;
    double tau;
    if ((st = keep_set(c, &w, r, s, &k, &tau, &keep)) != TKA_OK) return st;
    double *wt = tka_arena_alloc(s, (size_t)n * sizeof(double));
    unsigned char *kept = tka_arena_alloc(s, (size_t)n);
    if (!wt || !kept) return TKA_ERR_NOMEM;
    c->K->exp_shift[TKA_F64](w.p, n, w.max, wt);
    memset(kept, 0, (size_t)n);
    for (int64_t i = 0; i < k; i++) kept[keep[i]] = 1;
    double z = 0.0, sq_head = 0.0, sq_tail = 0.0;
    for (int64_t i = 0; i < n; i++) {
        z += wt[i];
        if (kept[i]) sq_head += wt[i] * wt[i];
        else sq_tail += wt[i] * wt[i];
    }
    /* head rows grow by the factor 1/(1-tau), tail rows drop to 0 (docs/design.md §6) */
    const double g = tau / (1.0 - tau);
    c->err_sq[r] = (g * g * sq_head + sq_tail) / (z * z);
    if (c->tau_out) c->tau_out[r] = tau;
    return TKA_OK;
}

static void note_bad_query(const attn_ctx *c, int64_t row)
{
    int64_t cur = atomic_load(c->bad_query);
    while (row < cur && !atomic_compare_exchange_weak(c->bad_query, &cur, row)) {}
}

/* Runs groups g0 .. g1-1; on failure *bad is the failing group (the unit the parallel
 * runner orders errors by) and the failing query row goes to c->bad_query. */
static tka_status attn_groups(void *ctx, int64_t g0, int64_t g1, tka_arena *s, int64_t *bad)
{
    const attn_ctx *c = ctx;
    const tka_attn *a = c->a;
    const int64_t L = a->L, per = (L + GROUP - 1) / GROUP;
    /* for the whole range of groups: GROUP padded queries, the output accumulators and the
     * scores of GROUP rows */
    const size_t mark = tka_arena_mark(s);
    double *q = tka_arena_alloc(s, (size_t)(GROUP * qpad(a->d)) * sizeof(double));
    double *sc = tka_arena_alloc(s, (size_t)(GROUP * a->n) * sizeof(double));
    double *acc = tka_arena_alloc(s, (size_t)(GROUP * (a->dv > 0 ? a->dv : 1)) * sizeof(double));
    double *wt = c->mode == TKA_ATTN_DENSE ? tka_arena_alloc(s, (size_t)(GROUP * a->n) * sizeof(double)) : sc;
    /* Top-k rows keeping most keys share a V pass (see topk_row), for moderate n: their
     * weights (GROUP rows of n, float32 or interleaved float64) and sums */
    const int share_v = c->mode == TKA_ATTN_TOPK && !c->k && a->n <= SHARE_V_MAX_N;
    double *w4 = share_v ? tka_arena_alloc(s, (size_t)(GROUP * a->n) * sizeof(double)) : NULL;
    double *acc4 = share_v ? tka_arena_alloc(s, (size_t)(GROUP * (a->dv > 0 ? a->dv : 1)) * sizeof(double)) : NULL;
    if (!q || !sc || !acc || !wt || (share_v && (!w4 || !acc4))) {
        tka_arena_release(s, mark);
        *bad = g0;
        note_bad_query(c, (g0 / per) * L + (g0 % per) * GROUP);
        return TKA_ERR_NOMEM;
    }
    if (w4) memset(w4, 0, (size_t)(GROUP * a->n) * sizeof(double));  /* slots never written */
    for (int64_t g = g0; g < g1; g++) {
        const int64_t r0 = (g / per) * L + (g % per) * GROUP;
        const int m = (int)(L - (g % per) * GROUP < GROUP ? L - (g % per) * GROUP : GROUP);
        tka_row w[GROUP];
        int off = 0;
        tka_status st = score_group(c, r0, m, s, q, sc, w, &off);
        if (st == TKA_OK && c->mode == TKA_ATTN_DENSE) dense_group(c, r0, m, w, sc, wt, acc);
        double z4[GROUP];
        int64_t row4[GROUP];
        int ns = 0;  /* rows in the shared pass, in row order */
        for (int i = 0; st == TKA_OK && c->mode != TKA_ATTN_DENSE && i < m; i++) {
            /* the row's scope: what the row function allocates lives until it returns */
            const size_t row_mark = tka_arena_mark(s);
            off = i;
            if (c->mode == TKA_ATTN_TOPK) {
                const share_slot sl = {w4, ns};
                int shared;
                st = topk_row(c, r0 + i, &w[i], acc, s, w4 ? &sl : NULL, &z4[ns], &shared);
                if (shared) row4[ns++] = r0 + i;
            } else {
                st = row_error(c, r0 + i, &w[i], acc, s);
            }
            tka_arena_release(s, row_mark);
        }
        if (st == TKA_OK && ns > 0) {
            const int64_t b = r0 / L, ld = a->v_ld / elem_size(a->dtype);
            if (a->dtype == TKA_F32)
                c->K->spv((const float *)v_row(a, b, 0), a->n, ld, (const float *)w4, a->n, ns, a->dv,
                          acc4, a->dv);
            else
                c->K->pv[a->dtype](v_row(a, b, 0), a->n, ld, w4, ns, a->dv, acc4, a->dv);
            for (int i = 0; i < ns; i++) store_out(c, row4[i], acc4 + (size_t)i * a->dv, z4[i]);
        }
        if (st != TKA_OK) {
            tka_arena_release(s, mark);
            *bad = g;
            note_bad_query(c, r0 + off);
            return st;
        }
    }
    tka_arena_release(s, mark);
    return TKA_OK;
}

static tka_status run(attn_ctx *c, tka_error *err)
{
    const tka_attn *a = c->a;
    int64_t bad = -1;
    if (err) { err->row = -1; err->what = NULL; }
    if (a->L <= 0 || a->n <= 0 || a->d <= 0 || a->batch < 0 || a->dv < 0) {
        if (err) err->what = "attention: empty L, n or d";
        return TKA_ERR_ARG;
    }
    c->K = tka_kernels_active();
    const int64_t groups = a->batch * ((a->L + GROUP - 1) / GROUP);
    const double work = (double)a->batch * (double)a->L * (double)a->n * (double)(a->d + 8);
    _Atomic int64_t bad_query = INT64_MAX;
    c->bad_query = &bad_query;
    tka_status st = tka_rows_run_parallel(groups, work, attn_groups, c, &bad);
    if (err) err->row = st == TKA_OK ? -1 : atomic_load(&bad_query);
    return st;
}

tka_status tka_attention(const tka_attn *a, void *out, tka_error *err)
{
    attn_ctx c = {.a = a, .mode = TKA_ATTN_DENSE, .out = out};
    return run(&c, err);
}

tka_status tka_topk_attention(const tka_attn *a, const int64_t *k, const double *eps, void *out,
                              int64_t *k_out, double *tau_out, int64_t **idx_out,
                              tka_error *err)
{
    const int64_t rows = a->batch * a->L;
    if (idx_out) memset(idx_out, 0, (size_t)rows * sizeof(int64_t *));
    attn_ctx c = {.a = a, .mode = TKA_ATTN_TOPK, .k = k, .eps = eps, .out = out, .k_out = k_out,
                  .tau_out = tau_out, .idx_out = idx_out};
    tka_status st = run(&c, err);
    if (st != TKA_OK && idx_out) {
        for (int64_t r = 0; r < rows; r++) {
            free(idx_out[r]);
            idx_out[r] = NULL;
        }
    }
    return st;
}

tka_status tka_attention_row_error(const tka_attn *a, const int64_t *k, double *err_sq,
                                   double *tau_out, tka_error *err)
{
    attn_ctx c = {.a = a, .mode = TKA_ATTN_ROW_ERROR, .k = k, .err_sq = err_sq, .tau_out = tau_out};
    return run(&c, err);
}
