/*
 * rows.c - the per-row algorithms of docs/design.md §2 and §6 and their batch drivers.
 *
 * Selection without sorting. To find the k-th largest logit, or the point where the
 * discarded mass crosses eps, we draw an evenly spaced sample of the row, read a bracket
 * [lo, hi] around the answer off the sample, and make one band pass over the row that
 * counts what lies above hi (and, for k_eps, sums its mass and the mass below lo) and
 * gathers the few logits inside the bracket. If the counts show the answer inside the
 * bracket, it is found among the gathered logits; otherwise (rare: adversarial rows,
 * heavy ties) the row is solved exactly by sorting a copy. Either way the answer is exact;
 * the sample only decides how much work it takes.
 *
 * Masses are always relative to a reference logit (the row maximum, or for the tail the
 * largest discarded logit), so nothing overflows and tails far below the head keep their
 * full relative accuracy.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Rows up to this length are solved by the exact (sorting) path directly. */
#define SMALL_ROW 128
/* Rows up to this length find tail masses from all their weights at once (one vector exp
 * pass, then the bracket's pass over the stored weights: rank_select_weights). */
#define WHOLE_TAIL_MAX 4096
/* Rows up to this length find k_eps from all their weights at once (one vector exp pass,
 * then the weighted selection by rounds) instead of through the sampled bracket and the
 * band pass; the k is the same either way. Which is faster depends on the kernel set, as
 * measured: with AVX2 the band pass (exp, sums and band gathered in one loop) costs more per
 * logit than the exp pass and the first round's sums on their own, so there only rows long
 * enough to be split into chunks across threads take it (float32 k_eps on an AVX2 host:
 * 16 x 65536 1.61 -> 1.36 ms, 128 x 8192 1.81 -> 1.39 ms with the limit raised from 4096;
 * Top-k prefill rows of 8192 keys, which also reuse the weights for their output,
 * 0.85-0.88x -> 1.04-1.05x the speed of dense attention). The scalar set is 1.5-1.7x slower
 * that way (its rounds' four-threshold sums cost more than its band pass), and AVX-512 and
 * NEON were not measured: they keep 4096. */
static int64_t keps_direct_max(const tka_kernels *K)
{
    return K->id == TKA_SIMD_AVX2 ? TKA_CHUNK : 4096;
}
#define NS_FACTOR 2.0


/* Below this eps, k_eps works in log space (linear masses relative to the maximum could
 * underflow to the order of eps itself). */
#define EPS_LINEAR_MIN 1e-280

/* log(1 + e^z) without overflow or cancellation */
static double softplus(double z)
{
    return z > 0 ? z + log1p(exp(-z)) : log1p(exp(z));
}

/* ------------------------------------------------------------------ row access */

const void *tka_row_contig(const tka_rows *x, int64_t r, tka_arena *s)
{
    const int64_t es = x->dtype == TKA_F32 ? 4 : x->dtype == TKA_F16 ? 2 : 8;
    const char *p = x->data + (x->row_offset ? x->row_offset[r] : r * x->row_stride);
    if (x->elem_stride == es || x->n <= 1) return p;
    char *buf = tka_arena_alloc(s, (size_t)(x->n * es));
    if (!buf) return NULL;
    if (es == 2) {
        uint16_t *o = (uint16_t *)buf;
        for (int64_t j = 0; j < x->n; j++) memcpy(o + j, p + j * x->elem_stride, 2);
    } else if (es == 4) {
        float *o = (float *)buf;
        for (int64_t j = 0; j < x->n; j++) memcpy(o + j, p + j * x->elem_stride, 4);
    } else {
        double *o = (double *)buf;
        for (int64_t j = 0; j < x->n; j++) memcpy(o + j, p + j * x->elem_stride, 8);
    }
    return buf;
}

static double elem(const tka_row *w, int64_t j)
{
    return w->dt == TKA_F32 ? (double)((const float *)w->p)[j] : ((const double *)w->p)[j];
}

tka_status tka_row_check(tka_row *w, tka_arena *s)
{
    tka_scan_out sc;
    tka_status st = tka_row_scan(w, s, &sc);
    if (st != TKA_OK) return st;
    if (sc.bad) {
        for (int64_t j = 0; j < w->n; j++) {
            double v = elem(w, j);
            if (v != v) return TKA_ERR_NAN;
            if (v == INFINITY) return TKA_ERR_POSINF;
        }
    }
    w->max = sc.max;
    w->n_live = w->n - sc.n_masked;
    return w->n_live > 0 ? TKA_OK : TKA_ERR_ALL_MASKED;
}

/* Load, and with check validate (NaN, +inf, all masked) and find the maximum of row r
 * (without, max and n_live are left NaN and -1 for the caller's own check). */
static tka_status row_prep(const tka_rows *x, const tka_kernels *K, int64_t r, tka_arena *s,
                           tka_row *w, int check)
{
    w->p = tka_row_contig(x, r, s);
    if (!w->p) return TKA_ERR_NOMEM;
    w->n = x->n;
    w->dt = x->dtype;
    w->K = K;
    if (w->dt == TKA_F16) {
        /* float16 rows become float32 (exactly): from here on they are float32 rows, and
         * every result is the one of the same values given as float32 */
        float *f = tka_arena_alloc(s, (size_t)w->n * sizeof(float));
        if (!f) return TKA_ERR_NOMEM;
        K->f16_to_f32((const uint16_t *)w->p, w->n, f);
        w->p = f;
        w->dt = TKA_F32;
    }
    if (check) return tka_row_check(w, s);
    w->max = NAN;
    w->n_live = -1;
    return TKA_OK;
}

/* Every logit of the row as float64 in `out` (capacity n). */
static tka_status row_to_double(const tka_row *w, tka_arena *s, double *out)
{
    tka_band_out b;
    return tka_row_band(w, s, -INFINITY, INFINITY, 0.0, 0, out, NULL, w->n, &b);
}

/* The row sorted in decreasing order, as float64, into out (capacity n). */
static tka_status row_sorted(const tka_row *w, tka_arena *s, double *out)
{
    const size_t mark = tka_arena_mark(s);
    void *tmp = tka_arena_alloc(s, tka_array_sort_scratch_bytes(w->n));
    if (tmp) tka_array_sort_desc(w->p, w->dt == TKA_F32, w->n, out, tmp);
    tka_arena_release(s, mark);
    return tmp ? TKA_OK : TKA_ERR_NOMEM;
}

/* ns logits at evenly spaced positions, as float64. */
static void row_sample(const tka_row *w, int64_t ns, double *out)
{
    for (int64_t j = 0; j < ns; j++) {
        int64_t pos = (int64_t)(((double)j + 0.5) * (double)w->n / (double)ns);
        out[j] = elem(w, pos < w->n ? pos : w->n - 1);
    }
}

/* Sample size that balances sampling cost against the size of the gathered band, for a
 * target about `k` from one end of the row. */
static int64_t sample_size(int64_t n, int64_t k)
{
    int64_t kk = (k < n - k ? k : n - k) + 1;
    double ns = 2.0 * cbrt((double)kk * (double)n);
    if (ns < 64) ns = 64;
    if (ns > 8192) ns = 8192;
    if (ns > n / 4) ns = (double)(n / 4);
    return ns < 1 ? 1 : (int64_t)ns;
}

/* -------------------------------------------------------------- rank selection */

typedef struct {
    double t;        /* the k-th largest logit */
    double next;     /* the (k+1)-th largest logit (-inf when k = n) */
    int64_t n_gt;    /* logits > t */
    int64_t n_eq;    /* logits == t */
} rank_info;

/* The bracket [lo, hi] around the k-th largest of n logits from an evenly spaced sample of
 * ns of them (reordered): about three standard errors of the sample's rank either side.
 * Returns how many logits the bracket is expected to hold. */
static int64_t rank_bracket(double *smp, int64_t ns, int64_t n, int64_t k, double *lo,
                            double *hi)
{
    double r_exp = (double)k * (double)ns / (double)n;
    double delta = 3.0 * sqrt(r_exp * (1.0 - r_exp / (double)ns) + 1.0) + 2.0;
    int64_t ra = (int64_t)floor(r_exp - delta) - 1, rb = (int64_t)ceil(r_exp + delta);
    *hi = INFINITY;
    *lo = -INFINITY;
    if (rb < ns) { tka_values_nth_desc(smp, ns, rb); *lo = smp[rb]; }
    if (ra >= 0) { tka_values_nth_desc(smp, rb < ns ? rb : ns, ra); *hi = smp[ra]; }
    return (int64_t)((double)(rb - ra + 1) * (double)n / (double)ns);
}

/* Finish from a gathered set holding the k-th largest at position j (0-based). */
static tka_status rank_from_band(const tka_row *w, tka_arena *s, double *vals, int64_t nb,
                                 int64_t j, int64_t n_above, int64_t k, rank_info *ri)
{
    tka_values_nth_desc(vals, nb, j);
    double t = vals[j], below = -INFINITY;
    int64_t gt = 0, eq = 0;
    for (int64_t i = 0; i < nb; i++) {
        double v = vals[i];
        gt += v > t;
        eq += v == t;
        if (v < t && v > below) below = v;
    }
    ri->t = t;
    ri->n_gt = n_above + gt;
    ri->n_eq = eq;
    if (ri->n_gt + ri->n_eq > k) ri->next = t;
    else if (k >= w->n) ri->next = -INFINITY;
    else if (below > -INFINITY || n_above + nb == w->n) ri->next = below;
    else return tka_row_max_below(w, s, t, &ri->next);
    return TKA_OK;
}

/* The k-th largest logit of the row (1 <= k <= n) with tie counts and its successor
 * (rank_select_in allocates in the caller's scope; rank_select releases on return). */
/* The masses a band pass with with_mass = 1 measured relative to the row maximum, when the
 * bracket path found the rank (have = 0 otherwise): the logits above the bracket, below it,
 * and those inside it on each side of the k-th largest (ties at t not included). */
typedef struct {
    int have;
    double above, below;
} band_mass;

static tka_status band_split_mass(const tka_row *w, tka_arena *s, const double *vals,
                                  int64_t nb, double t, const tka_band_out *b, band_mass *bm)
{
    double above = b->mass_above, below = b->mass_below;
    double *e = tka_arena_alloc(s, (size_t)(nb > 0 ? nb : 1) * sizeof(double));  /* caller's scope */
    if (!e) return TKA_ERR_NOMEM;
    if (nb > 0) w->K->exp_shift[TKA_F64](vals, nb, w->max, e);
    for (int64_t i = 0; i < nb; i++) {
        if (vals[i] > t) above += e[i];
        else if (vals[i] < t) below += e[i];
    }
    bm->have = 1;
    bm->above = above;
    bm->below = below;
    return TKA_OK;
}

static tka_status rank_select_in(const tka_row *w, int64_t k, tka_arena *s, rank_info *ri,
                                 band_mass *bm);

/*
 * rank_select_in with the masses, for rows of SMALL_ROW to WHOLE_TAIL_MAX logits: every
 * weight in one vector pass (cheaper there than the band pass computing them as it goes),
 * then the sampled bracket's one pass over the stored weights (the sums below, inside and
 * above it, and the bracket gathered with its weights), and the selection within. A rank
 * outside the bracket goes to rank_select_in.
 */
static tka_status rank_select_weights(const tka_row *w, int64_t k, tka_arena *s, rank_info *ri,
                                      band_mass *bm)
{
    const int64_t n = w->n, ns = sample_size(n, k);
    double *m = tka_arena_alloc(s, (size_t)(n + 16) * sizeof(double));
    double *bv = tka_arena_alloc(s, (size_t)(n + 16) * sizeof(double));
    double *bw = tka_arena_alloc(s, (size_t)(n + 16) * sizeof(double));
    double *smp = tka_arena_alloc(s, (size_t)(n + 16) * sizeof(double));  /* then the copy */
    if (!m || !bv || !bw || !smp) return TKA_ERR_NOMEM;
    row_sample(w, ns, smp);
    double lo, hi;
    rank_bracket(smp, ns, n, k, &lo, &hi);
    const double up = hi < INFINITY ? nextafter(hi, INFINITY) : INFINITY;
    w->K->exp_total[w->dt](w->p, n, w->max, m);
    int64_t nlo;
    double below, in, above;
    const int64_t nb =
        w->K->bracket[w->dt](w->p, m, n, lo, up, bv, bw, &nlo, &below, &in, &above);
    const int64_t n_above = n - nb - nlo;
    if (!(n_above < k && k <= n_above + nb)) return rank_select_in(w, k, s, ri, bm);
    memcpy(smp, bv, (size_t)nb * sizeof(double));  /* the selection reorders its copy */
    tka_status st = rank_from_band(w, s, smp, nb, k - n_above - 1, n_above, k, ri);
    if (st != TKA_OK) return st;
    /* the bracket's split at t: no branch (the sides are random), two chains per side */
    const double t = ri->t;
    double a1 = 0.0, b1 = 0.0;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        above += (double)(bv[i] > t) * bw[i];
        below += (double)(bv[i] < t) * bw[i];
        a1 += (double)(bv[i + 1] > t) * bw[i + 1];
        b1 += (double)(bv[i + 1] < t) * bw[i + 1];
    }
    if (i < nb) {
        above += (double)(bv[i] > t) * bw[i];
        below += (double)(bv[i] < t) * bw[i];
    }
    above += a1;
    below += b1;
    bm->have = 1;
    bm->above = above;
    bm->below = below;
    return TKA_OK;
}

static tka_status rank_select_in(const tka_row *w, int64_t k, tka_arena *s, rank_info *ri,
                                 band_mass *bm)
{
    if (bm) bm->have = 0;
    const int64_t n = w->n;
    if (n > SMALL_ROW) {
        int64_t ns = sample_size(n, k);
        double *smp = tka_arena_alloc(s, (size_t)ns * sizeof(double));
        if (!smp) return TKA_ERR_NOMEM;
        row_sample(w, ns, smp);
        double lo, hi;
        const int64_t expect = rank_bracket(smp, ns, n, k, &lo, &hi);
        int64_t cap = lo == hi ? 0 : (4 * expect + 256 < n ? 4 * expect + 256 : n);
        double *vals = tka_arena_alloc(s, (size_t)(cap + 1) * sizeof(double));
        if (!vals) return TKA_ERR_NOMEM;
        tka_band_out b;
        tka_status st = tka_row_band(w, s, lo, hi, w->max, bm != NULL, vals, NULL, cap, &b);
        if (st != TKA_OK) return st;
        if (b.n_above < k && k <= b.n_above + b.n_band) {
            if (lo == hi) {  /* the whole bracket is one value */
                ri->t = lo;
                ri->n_gt = b.n_above;
                ri->n_eq = b.n_band;
                if (bm && (st = band_split_mass(w, s, vals, 0, lo, &b, bm)) != TKA_OK) return st;
                if (ri->n_gt + ri->n_eq > k) ri->next = lo;
                else if (k >= n) ri->next = -INFINITY;
                else return tka_row_max_below(w, s, lo, &ri->next);
                return TKA_OK;
            }
            if (b.n_band <= cap) {
                st = rank_from_band(w, s, vals, b.n_band, k - b.n_above - 1, b.n_above, k, ri);
                if (st == TKA_OK && bm) st = band_split_mass(w, s, vals, b.n_band, ri->t, &b, bm);
                return st;
            }
        }
    }
    double *vals = tka_arena_alloc(s, (size_t)n * sizeof(double));
    if (!vals) return TKA_ERR_NOMEM;
    tka_status st = row_to_double(w, s, vals);
    if (st != TKA_OK) return st;
    return rank_from_band(w, s, vals, n, k - 1, 0, k, ri);
}

static tka_status rank_select(const tka_row *w, int64_t k, tka_arena *s, rank_info *ri)
{
    const size_t mark = tka_arena_mark(s);
    tka_status st = rank_select_in(w, k, s, ri, NULL);
    tka_arena_release(s, mark);
    return st;
}

/* ------------------------------------------------------------------ tail mass */

/*
 * For the top-k set with 1 <= k < n_live: lr = log(head mass / tail mass), from which
 * tau = 1 / (1 + e^lr) and 1 - tau = 1 / (1 + e^-lr). The head is summed relative to the
 * maximum and the tail relative to its own largest logit (docs/design.md §2: log space).
 * Also returns the head mass relative to the maximum, for the bounds.
 */
static tka_status ratio_from_rank(const tka_row *w, int64_t k, tka_arena *s,
                                  const rank_info *ri, double *lr, double *head)
{
    double hi, lo;
    tka_status st = tka_row_sumexp_split(w, s, ri->t, w->max, ri->next, &hi, &lo);
    if (st != TKA_OK) return st;
    /* logits equal to t: the first k - n_gt are kept, the rest discarded */
    if (k > ri->n_gt) hi += (double)(k - ri->n_gt) * exp(ri->t - w->max);
    if (ri->n_gt + ri->n_eq > k) lo += (double)(ri->n_gt + ri->n_eq - k); /* next == t */
    *head = hi;
    *lr = log(hi) - log(lo) + (w->max - ri->next);
    return TKA_OK;
}

/*
 * The same, in one pass over a long row where it can: the band pass that finds the rank also
 * sums e^{x - max} above and below the bracket, and the gathered band is split at t after
 * the selection, so no separate sum pass is needed. Both sums are then relative to the
 * maximum instead of the tail's own largest logit: that loses nothing while the tail's
 * largest logit (next) is within 600 of the maximum (its terms are then normal numbers, and
 * the terms flushed below max - 708 are each under 3e-308 e^max, below 10^-47 of the tail);
 * further down, the separate pass with its own reference is used.
 */
static tka_status head_tail_ratio(const tka_row *w, int64_t k, tka_arena *s, rank_info *ri,
                                  double *lr, double *head)
{
    const size_t mark = tka_arena_mark(s);
    band_mass bm;
    tka_status st = w->n > SMALL_ROW && w->n <= WHOLE_TAIL_MAX
                        ? rank_select_weights(w, k, s, ri, &bm)
                        : rank_select_in(w, k, s, ri, &bm);
    tka_arena_release(s, mark);
    if (st != TKA_OK) return st;
    if (!bm.have || !(ri->next >= w->max - 600.0)) return ratio_from_rank(w, k, s, ri, lr, head);
    double hi = bm.above, lo = bm.below, et = exp(ri->t - w->max);
    /* logits equal to t: the first k - n_gt are kept, the rest discarded */
    if (k > ri->n_gt) hi += (double)(k - ri->n_gt) * et;
    if (ri->n_gt + ri->n_eq > k) lo += (double)(ri->n_gt + ri->n_eq - k) * et;
    *head = hi;
    *lr = log(hi) - log(lo);
    return TKA_OK;
}

typedef struct {
    const int64_t *k;
    double *log_tau, *kl;
} tail_ctx;

tka_status tka_row_log_tau(const tka_row *w, int64_t k, tka_arena *s, double *log_tau,
                           double *kl)
{
    double lt, kk;
    if (k == 0) { lt = 0.0; kk = INFINITY; }
    else if (k >= w->n_live) { lt = -INFINITY; kk = 0.0; }
    else {
        rank_info ri;
        double lr, head;
        tka_status st = head_tail_ratio(w, k, s, &ri, &lr, &head);
        if (st != TKA_OK) return st;
        lt = -softplus(lr);
        kk = softplus(-lr);
    }
    *log_tau = lt;
    if (kl) *kl = kk;
    return TKA_OK;
}

static tka_status keps_pass_row(const tka_row *w, tka_arena *s, double lo, double hi, double ref,
                                double *vals, double *ms, int64_t cap, tka_keps_pass_out *b);

/*
 * tka_row_log_tau of a row not checked yet, in one pass over it where it can: the reference
 * of the masses is the largest sampled logit instead of the row maximum, and k_eps's pass
 * (which validates the row and finds its maximum as it goes) counts above the bracket, sums
 * the masses above and below it and gathers the band with its masses. Returns with *done = 0
 * (nothing written) when the row needs the checked path: NaN or +inf anywhere, a maximum more
 * than 600 above the reference (the sums of e^(x - ref) then stay finite whenever this path is
 * used), the rank outside the bracket, heavy ties, or a tail whose largest logit is -inf or
 * more than 600 below the maximum (its terms relative to ref are then normal numbers, and
 * the terms flushed below ref - 708 are each under e^-708 of the maximum's, as in
 * head_tail_ratio). The ratio head/tail does not depend on the reference.
 */
static tka_status tail_row_raw(const tka_row *w, int64_t k, tka_arena *s, double *lr, int *done)
{
    const int64_t n = w->n;
    *done = 0;
    const int64_t ns = sample_size(n, k);
    double *smp = tka_arena_alloc(s, (size_t)ns * sizeof(double));
    if (!smp) return TKA_ERR_NOMEM;
    row_sample(w, ns, smp);
    double ref = -INFINITY;
    for (int64_t j = 0; j < ns; j++) {
        if (!(smp[j] < INFINITY)) return TKA_OK;  /* NaN or +inf: the checked path says which */
        ref = smp[j] > ref ? smp[j] : ref;
    }
    if (ref == -INFINITY) return TKA_OK;
    double lo, hi;  /* the bracket of rank_select_in */
    const int64_t expect = rank_bracket(smp, ns, n, k, &lo, &hi);
    if (!(lo < hi)) return TKA_OK;  /* ties across the bracket */
    int64_t cap = 4 * expect + 256 < n ? 4 * expect + 256 : n;
    double *vals = tka_arena_alloc(s, (size_t)(cap + 1) * sizeof(double));
    double *ms = tka_arena_alloc(s, (size_t)(cap + 1) * sizeof(double));
    double *sel = tka_arena_alloc(s, (size_t)(cap + 1) * sizeof(double));
    if (!vals || !ms || !sel) return TKA_ERR_NOMEM;
    tka_keps_pass_out b;
    tka_status st = keps_pass_row(w, s, lo, hi, ref, vals, ms, cap, &b);
    if (st != TKA_OK) return st;
    if (b.bad || !(b.max - ref <= 600.0)) return TKA_OK;
    if (!(b.n_above < k && k <= b.n_above + b.n_band && b.n_band <= cap)) return TKA_OK;
    memcpy(sel, vals, (size_t)b.n_band * sizeof(double));  /* the selection reorders its copy */
    rank_info ri;
    st = rank_from_band(w, s, sel, b.n_band, k - b.n_above - 1, b.n_above, k, &ri);
    if (st != TKA_OK) return st;
    if (ri.t == -INFINITY || !(ri.next >= b.max - 600.0)) return TKA_OK;
    double head = b.mass_above, tail = b.mass_below;
    for (int64_t i = 0; i < b.n_band; i++) {
        if (vals[i] > ri.t) head += ms[i];
        else if (vals[i] < ri.t) tail += ms[i];
    }
    /* logits equal to t: the first k - n_gt are kept, the rest discarded */
    const double et = exp(ri.t - ref);
    if (k > ri.n_gt) head += (double)(k - ri.n_gt) * et;
    if (ri.n_gt + ri.n_eq > k) tail += (double)(ri.n_gt + ri.n_eq - k) * et;
    *lr = log(head) - log(tail);
    *done = 1;
    return TKA_OK;
}

/* A row of tka_tail_mass, not yet checked (the driver skips the scan, as for k_eps): long
 * rows with 0 < k < n try the one-pass path; every other row is checked here first. */
static tka_status tail_row(void *c, const tka_row *wr, int64_t r, tka_arena *s)
{
    tail_ctx *cx = c;
    const int64_t k = cx->k[r];
    double *kl = cx->kl ? cx->kl + r : NULL;
    const size_t mark = tka_arena_mark(s);
    tka_status st;
    if (wr->n > TKA_CHUNK && k > 0 && k < wr->n) {
        double lr;
        int done;
        st = tail_row_raw(wr, k, s, &lr, &done);
        tka_arena_release(s, mark);
        if (st != TKA_OK) return st;
        if (done) {
            cx->log_tau[r] = -softplus(lr);
            if (kl) *kl = softplus(-lr);
            return TKA_OK;
        }
    }
    tka_row w = *wr;
    if ((st = tka_row_check(&w, s)) == TKA_OK) st = tka_row_log_tau(&w, k, s, cx->log_tau + r, kl);
    tka_arena_release(s, mark);
    return st;
}

/* ---------------------------------------------------------------------- k_eps */

/*
 * Sort a sample a[0..n) (no NaN) in decreasing order: a counting sort on 2n equal-width
 * buckets between the smallest and the largest finite value (-inf in the last) leaves it
 * nearly sorted, and an insertion sort finishes within the buckets. O(n) for spread-out
 * values and never worse than the insertion sort alone. tmp holds n values, cnt 3n + 2
 * counts.
 */
static void sample_sort_desc(double *a, int64_t n, double *tmp, int64_t *cnt)
{
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        if (a[i] > -INFINITY) {
            lo = a[i] < lo ? a[i] : lo;
            hi = a[i] > hi ? a[i] : hi;
        }
    }
    const int64_t nb = 2 * n;
    const double span = hi - lo, scale = (double)(nb - 1) / span;
    if (hi > lo && span < INFINITY && scale < INFINITY) {
        /* bucket (hi - x) * scale, clamped to [0, nb - 1], grows as x falls */
        int64_t *bk = cnt + nb + 2;
        memset(cnt, 0, (size_t)(nb + 2) * sizeof(int64_t));
        for (int64_t i = 0; i < n; i++) {
            const double d = hi - a[i];
            int64_t b = (int64_t)((d < span ? d : span) * scale);
            b = b < nb - 1 ? b : nb - 1;
            bk[i] = b;
            cnt[b + 1]++;
        }
        for (int64_t b = 1; b <= nb; b++) cnt[b] += cnt[b - 1];
        for (int64_t i = 0; i < n; i++) tmp[cnt[bk[i]]++] = a[i];
        memcpy(a, tmp, (size_t)n * sizeof(double));
    }
    for (int64_t i = 1; i < n; i++) {
        double v = a[i];
        int64_t j = i;
        while (j > 0 && a[j - 1] < v) { a[j] = a[j - 1]; j--; }
        a[j] = v;
    }
}

/* Sets this small go straight to tka_weights_drop_bottom. */
#define LEVELS_FINAL 8

/* TKA_LT_N pivots taken from v[0..c) (float32 or float64) at evenly spaced positions, in
 * increasing order: a five-comparator sorting network on integer keys that order as the
 * values do (the sign bit flips the others; the values are never NaN here), so the
 * compiler's conditional moves replace branches that would mispredict on random data. */
static inline int64_t order_key(double x)
{
    int64_t b;
    memcpy(&b, &x, sizeof b);
    return b ^ (int64_t)((uint64_t)(b >> 63) >> 1);
}
static inline double key_value(int64_t k)
{
    const int64_t b = k ^ (int64_t)((uint64_t)(k >> 63) >> 1);
    double x;
    memcpy(&x, &b, sizeof x);
    return x;
}
#define TKA_SORT2(x, y)                         \
    do {                                        \
        const int64_t lo_ = x < y ? x : y;      \
        const int64_t hi_ = x < y ? y : x;      \
        x = lo_;                                \
        y = hi_;                                \
    } while (0)
static void levels_pivots(tka_dtype dt, const void *v, int64_t c, double *p)
{
    int64_t q[TKA_LT_N];
    const double step = (double)c / (double)TKA_LT_N;
    for (int j = 0; j < TKA_LT_N; j++) {
        int64_t pos = (int64_t)(((double)j + 0.5) * step);
        pos = pos < c ? pos : c - 1;
        q[j] = order_key(dt == TKA_F32 ? (double)((const float *)v)[pos] : ((const double *)v)[pos]);
    }
    int64_t a = q[0], b = q[1], x = q[2], y = q[3];
    TKA_SORT2(a, b);
    TKA_SORT2(x, y);
    TKA_SORT2(a, x);
    TKA_SORT2(b, y);
    TKA_SORT2(b, x);
    p[0] = key_value(a);
    p[1] = key_value(b);
    p[2] = key_value(x);
    p[3] = key_value(y);
}
#undef TKA_SORT2

/*
 * tka_weights_drop_bottom by rounds of vector passes: drop the smallest values, in
 * increasing order, while the dropped mass stays <= budget. The set is src[0..c) (dtype dt)
 * with masses m[0..c); in each round TKA_LT_N pivots drawn from it split it, one pass sums
 * the mass below every pivot, everything below the highest pivot that still fits is
 * dropped, and only the values between that pivot and the next one are gathered (into
 * v[] as float64, their masses into mo[]; src may be v, mo may be m, and m[] is left as it
 * was when it is not) for the next round. About 1/(TKA_LT_N + 1) of the set
 * remains after each round; a set of at most LEVELS_FINAL values, or one a round cannot shrink
 * (its values tie), is finished by tka_weights_drop_bottom. mass0, when given, holds the first
 * round's lt_sums for the pivots p (the caller needed the total first).
 *
 * acc is the mass dropped before (below the set): every round compares acc plus its sums
 * with budget.
 *
 * Returns how many are dropped and, in *dm, acc plus their mass. With t, also the smallest value not
 * dropped (+inf if all were): tka_weights_drop_bottom leaves the dropped values in front of
 * the kept ones, so it is the smallest of the rest.
 */
static int64_t drop_levels(const tka_kernels *K, tka_dtype dt, const void *src, int64_t c,
                           double *v, double *m, double *mo, double acc, double budget, double *p,
                           const double *mass0, double *dm, double *t)
{
    double hi = INFINITY;
    int64_t nd = 0;
    double mass[TKA_LT_N], total;
    while (c > LEVELS_FINAL) {
        if (mass0) {
            memcpy(mass, mass0, sizeof mass);
            mass0 = NULL;
        } else {
            levels_pivots(dt, src, c, p);
            K->lt_sums[dt](src, m, c, p, mass, &total);
        }
        int j = -1;  /* the highest pivot whose mass below, added, still fits */
        while (j + 1 < TKA_LT_N && acc + mass[j + 1] <= budget) j++;
        const double lo = j >= 0 ? p[j] : -INFINITY;
        const double up = j + 1 < TKA_LT_N ? p[j + 1] : INFINITY;
        int64_t below;
        const int64_t c2 = K->range_gather[dt](src, m, c, lo, up, v, mo, &below);
        m = mo;
        if (j >= 0) {
            acc += mass[j];
            nd += below;
        }
        hi = up;
        src = v;
        dt = TKA_F64;
        if (c2 == c) break;  /* the pivots could not split the set (ties) */
        c = c2;
    }
    if (src != v) {
        int64_t below;
        c = K->range_gather[dt](src, m, c, -INFINITY, INFINITY, v, mo, &below);
        m = mo;
    }
    double dlast;
    const int64_t d = tka_weights_drop_bottom(v, m, c, budget - acc, &dlast);
    if (t) {
        double lo_kept = hi;
        for (int64_t i = d; i < c; i++) lo_kept = v[i] < lo_kept ? v[i] : lo_kept;
        *t = lo_kept;
    }
    *dm = acc + dlast;
    return nd + d;
}

/*
 * Exact k_eps from the sorted row: walk up from the smallest logit keeping the discarded
 * mass as S * e^R (R = the current logit), so it never under- or overflows.
 * log_tail[i] = log of the mass of sorted[i..n), relative to e^sorted[0] (the maximum).
 */
static void keps_exact(const double *sorted, int64_t n, double log_eps, double *log_tail,
                       int64_t *k_out, double *tau_out)
{
    /* log masses relative to the row maximum: absolute ones can be so large (|logits| near
     * 1e38) that log_eps + log_z rounds to log_z and the walk would stop at k = 0 */
    const double top = sorted[0];
    double S = 0.0, R = -INFINITY;
    log_tail[n] = -INFINITY;
    for (int64_t i = n - 1; i >= 0; i--) {
        double v = sorted[i];
        if (v > -INFINITY) {
            if (S == 0.0) { S = 1.0; R = v; }
            else { S = S * exp(R - v) + 1.0; R = v; }
        }
        log_tail[i] = S > 0.0 ? log(S) + (R - top) : -INFINITY;
    }
    double log_z = log_tail[0], bar = log_eps + log_z;
    int64_t k = 0;
    while (log_tail[k] > bar) k++;  /* terminates: log_tail[n] = -inf */
    *k_out = k;
    if (tau_out) *tau_out = exp(log_tail[k] - log_z);
}

typedef struct {
    const double *eps;
    int64_t *k;
    double *tau;
} keps_ctx;

/* Index of the first sampled logit (sorted decreasing) whose suffix mass, scaled to the
 * row, is <= bar: the sample's estimate of how many logits k_eps keeps. */
static int64_t sample_cut(const double *suffix, int64_t ns, double scale, double bar)
{
    int64_t lo = 0, hi = ns;  /* suffix[ns] = 0 <= bar always */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (suffix[mid] * scale <= bar) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* The keps_pass kernel over a row longer than TKA_CHUNK: chunks of TKA_CHUNK, possibly on
 * several threads, combined in chunk order (so the result does not depend on the thread
 * count), as chunks.c does for the other kernels. */
typedef struct {
    const tka_row *w;
    double lo, hi, ref;
    int64_t ccap;
    double *cvals, *cms;
    tka_keps_pass_out *out;
} keps_chunks;

static tka_status keps_chunk_fn(void *ctx, int64_t c0, int64_t c1, tka_arena *s, int64_t *bad)
{
    const keps_chunks *j = ctx;
    const int64_t es = j->w->dt == TKA_F32 ? 4 : 8;
    for (int64_t c = c0; c < c1; c++) {
        const int64_t off = c * TKA_CHUNK, len = j->w->n - off < TKA_CHUNK ? j->w->n - off : TKA_CHUNK;
        j->w->K->keps_pass[j->w->dt]((const char *)j->w->p + off * es, len, j->lo, j->hi, j->ref,
                                     j->cvals + c * j->ccap, j->cms + c * j->ccap, j->ccap,
                                     &j->out[c]);
    }
    return TKA_OK;
}

/* keps_pass over the whole row into vals, ms (at most cap); scratch in s (caller's scope). */
static tka_status keps_pass_row(const tka_row *w, tka_arena *s, double lo, double hi, double ref,
                                double *vals, double *ms, int64_t cap, tka_keps_pass_out *b)
{
    const int64_t n = w->n;
    if (n <= TKA_CHUNK) {
        w->K->keps_pass[w->dt](w->p, n, lo, hi, ref, vals, ms, cap, b);
        return TKA_OK;
    }
    const int64_t nch = (n + TKA_CHUNK - 1) / TKA_CHUNK, ccap = cap < TKA_CHUNK ? cap : TKA_CHUNK;
    keps_chunks j = {w, lo, hi, ref, ccap, tka_arena_alloc(s, (size_t)(nch * ccap + 1) * sizeof(double)),
                     tka_arena_alloc(s, (size_t)(nch * ccap + 1) * sizeof(double)),
                     tka_arena_alloc(s, (size_t)nch * sizeof(tka_keps_pass_out))};
    if (!j.cvals || !j.cms || !j.out) return TKA_ERR_NOMEM;
    int64_t bad = -1;
    tka_status st = tka_rows_run_parallel(nch, 4.0 * (double)n, keps_chunk_fn, &j, &bad);
    if (st != TKA_OK) return st;
    b->n_above = b->n_band = 0;
    b->mass_above = b->mass_below = b->mass_total = 0.0;
    b->max = -INFINITY;
    b->bad = 0;
    for (int64_t c = 0; c < nch; c++) {
        const tka_keps_pass_out *o = &j.out[c];
        const int64_t take = o->n_band < ccap ? o->n_band : ccap;
        if (b->n_band + take <= cap) {
            memcpy(vals + b->n_band, j.cvals + c * ccap, (size_t)take * sizeof(double));
            memcpy(ms + b->n_band, j.cms + c * ccap, (size_t)take * sizeof(double));
        }
        b->n_above += o->n_above;
        b->n_band += o->n_band;  /* past cap (or past a chunk's ccap <= cap): counted only */
        b->mass_above += o->mass_above;
        b->mass_below += o->mass_below;
        b->mass_total += o->mass_total;
        b->max = o->max > b->max ? o->max : b->max;
        b->bad |= o->bad;
    }
    return TKA_OK;
}

/* The sample of keps_band_ref: ns logits at evenly spaced positions, as float64, sorted
 * decreasing into smp, with the sums of their masses e^(x - ref) from the bottom in
 * suf[0..ns] and of the squared masses in suf2[0..ns] (suf[ns] = suf2[ns] = 0). On a row
 * not scanned yet (raw) *ref becomes the sample's maximum, and 0 is returned when the
 * sample holds NaN or +inf, or only -inf (the caller's checked path takes such a row). */
static int band_sample(const tka_row *w, int64_t ns, int raw, double *smp, double *suf,
                       double *suf2, int64_t *scnt, double *ref)
{
    const int64_t n = w->n;
    const double step = (double)n / (double)ns;
    for (int64_t j = 0; j < ns; j++) {
        const int64_t i = (int64_t)(((double)j + 0.5) * step);
        smp[j] = w->dt == TKA_F32 ? (double)((const float *)w->p)[i] : ((const double *)w->p)[i];
    }
    if (raw) {
        double r = -INFINITY;
        for (int64_t j = 0; j < ns; j++) {
            if (!(smp[j] < INFINITY)) return 0;  /* NaN or +inf */
            r = smp[j] > r ? smp[j] : r;
        }
        if (r == -INFINITY) return 0;
        *ref = r;
    }
    sample_sort_desc(smp, ns, suf, scnt);
    w->K->exp_shift[TKA_F64](smp, ns, *ref, suf);
    suf[ns] = suf2[ns] = 0.0;
    double run = 0.0, run2 = 0.0;  /* in registers: no store-to-load chain */
    for (int64_t j = ns - 1; j >= 0; j--) {
        const double m = suf[j];
        run += m;
        run2 += m * m;
        suf[j] = run;
        suf2[j] = run2;
    }
    return 1;
}

/* Three standard errors of the sample's estimate of the mass below its rank j */
static double band_se(const double *suf2, int64_t ns, double scale, int64_t j)
{
    return 3.0 * scale * sqrt(suf2[j < ns ? j : ns]);
}

/* The bracket of sample ranks [*ra, *rb] around the sample's crossing of bar: the rank
 * error of the crossing, narrowed (tight) to three standard errors of the estimated tail
 * mass plus the allowance zse for the estimate of Z itself. */
static void band_bracket(const double *suf, const double *suf2, int64_t ns, double scale,
                         double bar, int tight, double zse, int64_t *ra, int64_t *rb)
{
    const int64_t jstar = sample_cut(suf, ns, scale, bar);
    const double delta = 3.0 * sqrt((double)jstar + 1.0) + 2.0;
    *ra = (int64_t)floor((double)jstar - delta) - 1;
    *rb = (int64_t)ceil((double)jstar + delta);
    if (tight) {
        const double se = band_se(suf2, ns, scale, jstar);
        const double up = bar + se + zse, down = bar - se - zse;
        const int64_t a = sample_cut(suf, ns, scale, up) - 2;
        const int64_t b = down > 0.0 ? sample_cut(suf, ns, scale, down) + 1 : *rb;
        if (a > *ra) *ra = a;
        if (b < *rb) *rb = b;
    }
}

/* The exact mass sum e^(x - ref) of the logits above smax, the sample's largest, into *h,
 * from one pass that only compares (the exponentials are taken of those logits alone);
 * 0 when more than cap of them are found, or their mass is not finite (a raw row with
 * +inf: the band pass sends it back). */
static int head_mass(const tka_row *w, tka_arena *s, double smax, double ref, int64_t cap,
                     double *h)
{
    const size_t mark = tka_arena_mark(s);
    double *hv = tka_arena_alloc(s, (size_t)(cap + 1) * sizeof(double));
    double *hm = tka_arena_alloc(s, (size_t)(cap + 1) * sizeof(double));
    int ok = 0;
    if (hv && hm) {
        tka_band_out bo;
        w->K->band[w->dt](w->p, w->n, nextafter(smax, INFINITY), INFINITY, ref, 0, hv, NULL,
                          cap, &bo);
        if (bo.n_band <= cap) {
            w->K->exp_shift[TKA_F64](hv, bo.n_band, ref, hm);
            double t = 0.0;
            for (int64_t i = 0; i < bo.n_band; i++) t += hm[i];
            *h = t;
            ok = t < INFINITY;
        }
    }
    tka_arena_release(s, mark);
    return ok;
}

/* A sample whose estimate of Z has a standard error above HEAD_SE times the estimate, where
 * that error widens the bracket more than the tail's own (peaked rows: the few logits
 * above the sample's largest can hold most of the mass, and a bracket placed without them
 * misses, costing a second pass over the row), takes the exact mass of those logits from a
 * pass that only compares. One thread, float32 N(0, sd^2) rows, eps 1e-3 (docs/design.md
 * §2): sd 5 and 10 at n = 10^6 3.4-3.5 -> 2.4-2.5 and 2.9 -> 1.9 ns a logit (the larger
 * sample below included), sd 8 at n = 131072 3.3 -> 2.2. */
#define HEAD_SE 0.5

/* A first bracket expected to hold more than BAND_PAYS logits per extra sampled logit is
 * drawn again from a sample BAND_GROW times larger (at most BAND_NS_MAX): the bracket
 * narrows as the square root of the sample, and each logit of the band costs the pass a
 * compressing store and the rounds after it a visit (about 8 ns a logit removed from the
 * band, against about 10 ns a sampled logit: scattered reads, the sort, the exp). Measured
 * on one thread, rows of 1.3e5-4e6 float32 N(0, sd^2) logits (docs/design.md §2). */
#define BAND_PAYS 3.0
#define BAND_GROW 4
#define BAND_NS_MAX 16384

/*
 * k_eps by one band pass: the sample gives the row's mass curve (sorted once, with
 * cumulative masses and squared masses from the bottom for the standard error), hence a
 * bracket [lo, hi] around the crossing; the band pass then sums the exact mass above hi
 * and below lo and gathers the logits between, so Z itself comes out of the same pass.
 * Before it, a sample that leaves the bracket wide is drawn again larger (BAND_PAYS), and
 * one that leaves Z uncertain gets the exact mass above its largest logit (HEAD_SE).
 * If the crossing is not inside the bracket (the estimate of Z missed a heavy head, say),
 * a second pass uses the now exact Z and the wide bracket; after that, the exact path.
 */
static tka_status keps_band_ref(const tka_row *w, double eps, tka_arena *s, int64_t *k_out,
                                double *tau_out, double *t_out, int *done, int raw)
{
    const int64_t n = w->n;
    int64_t ns = (int64_t)(NS_FACTOR * sqrt((double)n));
    if (ns > 4096) ns = 4096;
    if (ns > n / 4) ns = n / 4;
    if (ns < 16) ns = 16;
    int64_t ns_big = BAND_GROW * ns;
    if (ns_big > BAND_NS_MAX) ns_big = BAND_NS_MAX;
    if (ns_big > n / 4) ns_big = n / 4;
    if (ns_big < ns) ns_big = ns;
    double *smp = tka_arena_alloc(s, (size_t)(3 * ns_big + 2) * sizeof(double));
    int64_t *scnt = tka_arena_alloc(s, (size_t)(3 * ns_big + 2) * sizeof(int64_t));
    if (!smp || !scnt) return TKA_ERR_NOMEM;
    /* the reference of every mass: the row maximum, or on a row not scanned yet (raw) the
     * sample's; the pass then checks the row and finds its maximum, and a row with NaN, +inf
     * or a maximum far above the sample's goes back to the caller's checked path */
    double ref = w->max;
    double *suf = smp + ns, *suf2 = suf + ns + 1;
    if (!band_sample(w, ns, raw, smp, suf, suf2, scnt, &ref)) return TKA_OK;
    double scale = (double)n / (double)ns;
    /* the maximum has mass 1 and is rarely sampled: count it on top of the estimate */
    double z = 1.0 + scale * suf[0];
    /* standard error of the estimate of Z (the head is what the sample may miss) */
    double se_z = 3.0 * scale * sqrt(suf2[0]);
    if (ns_big > ns) {
        int64_t ra, rb;
        band_bracket(suf, suf2, ns, scale, eps * z, 1, eps * se_z, &ra, &rb);
        /* the logits the band would hold: the sample's ranks inside the bracket, scaled */
        const double inside = (double)((rb < ns ? rb : ns) - (ra > 0 ? ra : 0)) * scale;
        if (inside > BAND_PAYS * (double)(ns_big - ns)) {
            ns = ns_big;
            suf = smp + ns;
            suf2 = suf + ns + 1;
            if (!band_sample(w, ns, raw, smp, suf, suf2, scnt, &ref)) return TKA_OK;
            scale = (double)n / (double)ns;
            z = 1.0 + scale * suf[0];
            se_z = 3.0 * scale * sqrt(suf2[0]);
        }
    }
    if (se_z > HEAD_SE * z
        && eps * se_z > band_se(suf2, ns, scale, sample_cut(suf, ns, scale, eps * z))) {
        double h;
        /* with the head exact, the sample's largest logit stands for itself only (scaled
         * like the others, it counts its stratum's head a second time: on simulated peaked
         * rows that estimate was above the row's Z in most rows, up to 3.6 times; this
         * way its median is the row's Z) */
        if (head_mass(w, s, smp[0], ref, 4 * (int64_t)scale + 256, &h))
            z = h + (suf[0] - suf[1]) + scale * suf[1];
    }
    const size_t attempt_mark = tka_arena_mark(s);
    for (int attempt = 0; attempt < 3; attempt++) {
        tka_arena_release(s, attempt_mark);  /* an attempt's buffers last until the next */
        const double bar = eps * z;
        /* tight on the first two attempts (on the first with Z's own error); the last
         * attempt is the wide bracket */
        int64_t ra, rb;
        band_bracket(suf, suf2, ns, scale, bar, attempt < 2, attempt == 0 ? eps * se_z : 0.0,
                     &ra, &rb);
        double hi = ra >= 0 ? smp[ra] : INFINITY, lo = rb < ns ? smp[rb] : -INFINITY;
        /* the band's expected count: the sample's ranks inside the bracket, scaled */
        int64_t expect = (int64_t)((double)((rb < ns ? rb : ns) - (ra > 0 ? ra : 0) + 1) * scale);
        int64_t cap = 4 * expect + 256 < n ? 4 * expect + 256 : n;
        if (lo == hi) cap = 0;
        double *vals = tka_arena_alloc(s, (size_t)(cap + 1) * sizeof(double));
        double *m = tka_arena_alloc(s, (size_t)(cap + 1) * sizeof(double));
        if (!vals || !m) return TKA_ERR_NOMEM;
        tka_keps_pass_out b;
        /* one pass: the masses of the band come with it */
        tka_status st = keps_pass_row(w, s, lo, hi, ref, vals, m, cap, &b);
        if (st != TKA_OK) return st;
        /* e^(x - ref) of the largest x and the sum of n such terms stay finite */
        if (raw && (b.bad || !(b.max - ref <= 600.0))) return TKA_OK;
        if (b.n_band > cap && lo != hi) {
            /* too many to gather: take the exact Z from a plain sum and retry */
            double unused;
            st = tka_row_sumexp_split(w, s, -INFINITY, ref, ref, &z, &unused);
            if (st != TKA_OK) return st;
            continue;
        }
        const double mv = lo == hi ? exp(lo - ref) : 0.0;  /* one value: one mass each */
        z = b.mass_total;  /* exact from here on */
        const double bar_exact = eps * z;
        /* the crossing is in the band unless what lies below it, or everything up to hi,
         * fits (then the band selection would drop it all, caught below as well) */
        if (b.mass_below > bar_exact || z - b.mass_above <= bar_exact) continue;
        int64_t drop;
        double dm, t = lo;
        if (lo == hi) {
            drop = (int64_t)floor((bar_exact - b.mass_below) / mv);
            if (drop > b.n_band) drop = b.n_band;
            while (drop > 0 && b.mass_below + (double)drop * mv > bar_exact) drop--;
            dm = (double)drop * mv;
        } else {
            double p[TKA_LT_N];
            drop = drop_levels(w->K, TKA_F64, vals, b.n_band, vals, m, m, 0.0, bar_exact - b.mass_below,
                               p, NULL, &dm, t_out ? &t : NULL);
        }
        if (drop >= b.n_band) continue;
        *k_out = b.n_above + b.n_band - drop;
        if (t_out) *t_out = t;  /* the k-th largest: the smallest kept value of the band */
        /* the decision was tail <= eps z; its quotient may round up past eps */
        *tau_out = fmin((b.mass_below + dm) / z, eps);
        *done = 1;
        return TKA_OK;
    }
    *done = -1;  /* every bracket missed (a row the caller must check returns with 0) */
    return TKA_OK;
}

static tka_status keps_band(const tka_row *w, double eps, tka_arena *s, int64_t *k_out,
                            double *tau_out, double *t_out, int *done)
{
    return keps_band_ref(w, eps, s, k_out, tau_out, t_out, done, 0);
}

/*
 * The bracket path of the whole-row selection (keps_in): on rows of BR_MIN_N to BR_MAX_N
 * logits, one pass over a bracket [lo, up) guessed from a sample replaces the first round of
 * drop_levels (its sums below the pivots, then its gathering). The guess is checked by the
 * pass itself; a row whose crossing it missed goes on by the rounds as before.
 */
#define BR_MIN_N 256
#define BR_MAX_N 65536 /* rows this long reach the whole-row path only with the AVX2 kernels
                          (keps_direct_max); docs/design.md §2 has what it measured */
#define BR_SAMPLE 32
#define BR_BINS 64
#define BR_STEP 0.5 /* logits per bin */

/* The bracket's guess: the weights m[] of BR_SAMPLE logits at evenly spaced positions,
 * binned by how far below the maximum they are (the last bin takes everything further
 * down). Each sampled logit stands for n / BR_SAMPLE of the row, so scale times the sampled
 * mass below a bin edge estimates the row's; for lo, that estimate plus scale times the
 * edge's own weight (room for a block of logits the sample missed just below it) must stay
 * under budget / 2: lo is the highest such edge. up is the lowest edge whose estimate
 * reaches 2 budget (+inf if none). */
static void bracket_guess(const tka_row *w, const double *m, double budget, double *lo,
                          double *up)
{
    const int64_t n = w->n;
    double bin[BR_BINS];
    int64_t pos[BR_SAMPLE];
    int at[BR_SAMPLE], top = 0;
    const double mx = w->max;
    for (int j = 0; j < BR_SAMPLE; j++) pos[j] = ((2 * j + 1) * n) / (2 * BR_SAMPLE);
    if (w->dt == TKA_F32) {
        const float *x = (const float *)w->p;
        for (int j = 0; j < BR_SAMPLE; j++) {
            const double d = (mx - (double)x[pos[j]]) * (1.0 / BR_STEP);  /* >= 0, or +inf */
            at[j] = d < BR_BINS - 1 ? (int)d : BR_BINS - 1;
        }
    } else {
        const double *x = (const double *)w->p;
        for (int j = 0; j < BR_SAMPLE; j++) {
            const double d = (mx - x[pos[j]]) * (1.0 / BR_STEP);
            at[j] = d < BR_BINS - 1 ? (int)d : BR_BINS - 1;
        }
    }
    for (int j = 0; j < BR_SAMPLE; j++) top = at[j] > top ? at[j] : top;
    memset(bin, 0, (size_t)(top + 1) * sizeof(double));
    for (int j = 0; j < BR_SAMPLE; j++) bin[at[j]] += m[pos[j]];
    /* the walk up from the lowest bin: b_lo, b_up are bin edges (0: none found) */
    const double scale = (double)n / BR_SAMPLE, half = 0.5 * budget, twice = 2.0 * budget;
    const double grow = 1.6487212707001282; /* e^BR_STEP (only a guess depends on it) */
    double cum = 0.0, room = scale * exp(-BR_STEP * top);  /* scale * the edge's weight */
    int b = top, b_lo = 0, b_up = 0;
    for (; b >= 1; b--, room *= grow) {
        cum += bin[b] * scale;
        if (cum + room <= half) b_lo = b;
        else if (cum >= twice) {
            b_up = b;
            break;
        }
    }
    *lo = b_lo ? mx - b_lo * BR_STEP : -INFINITY;
    *up = b_up ? mx - b_up * BR_STEP : INFINITY;
}

/*
 * keps_in's bracket path on a checked row with its weights m[] (= e^{x - max}) and budget
 * (eps times their total): everything below lo is dropped when its mass fits the budget,
 * the bracket is finished by drop_levels, and everything from up on is kept. *done = 0
 * (nothing else written) when the bracket does not hold the crossing.
 */
static tka_status keps_bracket(const tka_row *w, const double *m, double budget, tka_arena *s,
                               double *v, int64_t *k_out, double *dm_out, double *t_out,
                               int *done)
{
    const int64_t n = w->n;
    *done = 0;
    double lo, up;
    bracket_guess(w, m, budget, &lo, &up);
    if (!(lo < up)) return TKA_OK;
    const size_t cap = (size_t)(n + 16);
    double *bv = tka_arena_alloc(s, cap * sizeof(double));
    double *bm = tka_arena_alloc(s, cap * sizeof(double));
    double *mo = tka_arena_alloc(s, cap * sizeof(double));  /* the rounds' masses */
    if (!bv || !bm || !mo) return TKA_ERR_NOMEM;
    int64_t nlo;
    double mb, in, ma;
    const int64_t nb = w->K->bracket[w->dt](w->p, m, n, lo, up, bv, bm, &nlo, &mb, &in, &ma);
    /* the crossing is below lo, at or above up, or there is no bracket */
    if (!(mb <= budget && mb + in > budget) || nb == 0) return TKA_OK;
    double p[TKA_LT_N], dm, t;
    const int64_t d = drop_levels(w->K, TKA_F64, bv, nb, v, bm, mo, mb, budget, p, NULL, &dm, &t);
    if (d >= nb) return TKA_OK;  /* its sums let the whole bracket go: decided by the rounds */
    *done = 1;
    *k_out = n - nlo - d;
    *dm_out = dm;
    *t_out = t;
    return TKA_OK;
}

/* tka_row_keps, allocating in the caller's scope. With e (n + 1 slots), the whole-row path
 * leaves every weight e^{x_i - max} in e[0..n) and sets *have_e. */
static tka_status keps_in(const tka_row *w, double eps, tka_arena *s, int64_t *k_out,
                         double *tau_out, double *t_out, int band, double *e, int *have_e)
{
    const int64_t n = w->n;
    int64_t k;
    double tau = 0.0;

    if (band && n > keps_direct_max(w->K) && eps >= EPS_LINEAR_MIN) {
        int done = 0;
        tka_status st = keps_band(w, eps, s, &k, &tau, t_out, &done);
        if (st != TKA_OK) return st;
        if (done == 1) {
            *k_out = k;
            *tau_out = tau;
            return TKA_OK;
        }
    }

    /* exact path over the whole row */
    double *vals = tka_arena_alloc(s, (size_t)n * sizeof(double));
    double *m = e ? e : tka_arena_alloc(s, (size_t)(n + 1) * sizeof(double));
    double *mo = e ? tka_arena_alloc(s, (size_t)n * sizeof(double)) : m;  /* the rounds' masses */
    if (!vals || !m || !mo) return TKA_ERR_NOMEM;
    tka_status st = TKA_OK;
    if (eps >= EPS_LINEAR_MIN) {
        /* every weight (one vector exp pass; on rows of BR_MIN_N to BR_MAX_N it also sums
         * their total and the bracket path tries first), then the total with the first
         * round's sums below pivots drawn from the row (a second pass, over the stored
         * weights), then the selection from the bottom by rounds */
        double p[TKA_LT_N], z, mass0[TKA_LT_N], t = 0.0;
        int done = 0;
        if (n >= BR_MIN_N && n <= BR_MAX_N) {
            z = w->K->exp_total[w->dt](w->p, n, w->max, m);
            st = keps_bracket(w, m, eps * z, s, vals, &k, &tau, &t, &done);
            if (st != TKA_OK) return st;
        } else {
            w->K->exp_shift[w->dt](w->p, n, w->max, m);
        }
        if (!done) {
            if (n > LEVELS_FINAL) levels_pivots(w->dt, w->p, n, p);
            else for (int j = 0; j < TKA_LT_N; j++) p[j] = INFINITY;
            w->K->lt_sums[w->dt](w->p, m, n, p, mass0, &z);
            k = n - drop_levels(w->K, w->dt, w->p, n, vals, m, mo, 0.0, eps * z, p, mass0, &tau,
                                t_out ? &t : NULL);
        }
        if (have_e) *have_e = e != NULL;
        tau = fmin(tau / z, eps);  /* the decision was tail <= eps z; its quotient may round up */
        if (t_out) *t_out = t;
    } else {
        st = row_sorted(w, s, vals);
        if (st != TKA_OK) return st;
        keps_exact(vals, n, log(eps), m, &k, &tau);
        if (t_out) *t_out = vals[k - 1];
    }
    *k_out = k;
    *tau_out = tau;
    return TKA_OK;
}

tka_status tka_row_keps(const tka_row *w, double eps, tka_arena *s, int64_t *k_out,
                        double *tau_out, double *t_out)
{
    const size_t mark = tka_arena_mark(s);
    tka_status st = keps_in(w, eps, s, k_out, tau_out, t_out, 1, NULL, NULL);
    tka_arena_release(s, mark);
    return st;
}

tka_status tka_row_keps_e(const tka_row *w, double eps, tka_arena *s, int64_t *k_out,
                          double *tau_out, double *t_out, const double **e_out)
{
    *e_out = NULL;
    if (w->n > keps_direct_max(w->K)) return tka_row_keps(w, eps, s, k_out, tau_out, t_out);
    double *e = tka_arena_alloc(s, (size_t)(w->n + 1) * sizeof(double));
    if (!e) return TKA_ERR_NOMEM;
    int have = 0;
    const size_t mark = tka_arena_mark(s);
    tka_status st = keps_in(w, eps, s, k_out, tau_out, t_out, 1, e, &have);
    tka_arena_release(s, mark);
    *e_out = have ? e : NULL;
    return st;
}

/* A row of tka_k_eps, not yet checked (the driver skips the scan: see drive_chunk). The rows
 * that take the band path are checked by its pass; the others, and any the pass refers
 * back, are checked here first. */
static tka_status keps_row(void *c, const tka_row *wr, int64_t r, tka_arena *s)
{
    keps_ctx *cx = c;
    const double eps = cx->eps[r];
    double tau;
    tka_status st;
    int done = 0;
    const size_t mark = tka_arena_mark(s);
    if (wr->n > keps_direct_max(wr->K) && eps >= EPS_LINEAR_MIN) {
        st = keps_band_ref(wr, eps, s, cx->k + r, &tau, NULL, &done, 1);
        tka_arena_release(s, mark);
        if (st != TKA_OK) return st;
        if (done == 1) {
            if (cx->tau) cx->tau[r] = tau;
            return TKA_OK;
        }
    }
    tka_row w = *wr;
    if ((st = tka_row_check(&w, s)) != TKA_OK) return st;
    /* a row whose brackets all missed goes to the whole-row selection directly */
    st = keps_in(&w, eps, s, cx->k + r, &tau, NULL, done == 0, NULL, NULL);
    tka_arena_release(s, mark);
    if (st == TKA_OK && cx->tau) cx->tau[r] = tau;
    return st;
}

/* ------------------------------------------------------------------------ topk */

typedef struct {
    int64_t k;
    int64_t *idx;
} topk_ctx;

/* tka_row_topk, allocating in the caller's scope. */
static tka_status topk_in(const tka_row *w, int64_t k, tka_arena *s, int64_t *out)
{
    const int64_t n = w->n;
    if (k == 0) return TKA_OK;
    double lo = -INFINITY;
    if (n > SMALL_ROW && k < n) {
        int64_t ns = sample_size(n, k);
        double *smp = tka_arena_alloc(s, (size_t)ns * sizeof(double));
        if (!smp) return TKA_ERR_NOMEM;
        row_sample(w, ns, smp);
        double r_exp = (double)k * (double)ns / (double)n;
        int64_t rb = (int64_t)ceil(r_exp + 3.0 * sqrt(r_exp + 1.0) + 2.0);
        if (rb < ns) { tka_values_nth_desc(smp, ns, rb); lo = smp[rb]; }
    }
    const size_t attempt_mark = tka_arena_mark(s);
    for (int attempt = 0; attempt < 2; attempt++) {
        tka_arena_release(s, attempt_mark);
        int64_t cap = lo == -INFINITY ? n : (4 * k + 1024 < n ? 4 * k + 1024 : n);
        double *vals = tka_arena_alloc(s, (size_t)cap * sizeof(double));
        int64_t *idx = tka_arena_alloc(s, (size_t)cap * sizeof(int64_t));
        if (!vals || !idx) return TKA_ERR_NOMEM;
        tka_band_out b;
        tka_status st = tka_row_band(w, s, lo, INFINITY, 0.0, 0, vals, idx, cap, &b);
        if (st != TKA_OK) return st;
        if (b.n_band >= k && b.n_band <= cap) {
            tka_pairs_sort_desc(vals, idx, b.n_band);
            memcpy(out, idx, (size_t)k * sizeof(int64_t));
            return TKA_OK;
        }
        lo = -INFINITY;  /* the bracket missed: take every logit */
    }
    return TKA_INTERNAL_ERROR();  /* the second attempt gathers the whole row */
}

tka_status tka_row_topk(const tka_row *w, int64_t k, tka_arena *s, int64_t *out)
{
    const size_t mark = tka_arena_mark(s);
    tka_status st = topk_in(w, k, s, out);
    tka_arena_release(s, mark);
    return st;
}

/* Gather x >= t (t = the k-th largest) and keep all above t and the lowest positions of
 * those equal to it. */
static tka_status gather_top_in(const tka_row *w, int64_t k, double t, int64_t cap, tka_arena *s,
                                int64_t *out)
{
    double *vals = tka_arena_alloc(s, (size_t)cap * sizeof(double));
    int64_t *idx = tka_arena_alloc(s, (size_t)cap * sizeof(int64_t));
    if (!vals || !idx) return TKA_ERR_NOMEM;
    tka_band_out b;
    tka_status st = tka_row_band(w, s, t, INFINITY, 0.0, 0, vals, idx, cap, &b);
    if (st != TKA_OK) return st;
    int64_t ties = k;
    for (int64_t i = 0; i < b.n_band; i++) ties -= vals[i] > t;
    int64_t m = 0;
    for (int64_t i = 0; i < b.n_band && m < k; i++)
        if (vals[i] > t || (ties > 0 && ties--)) out[m++] = idx[i];
    return m == k ? TKA_OK : TKA_RETRY;  /* t was not the k-th largest */
}

static tka_status gather_top(const tka_row *w, int64_t k, double t, int64_t cap, tka_arena *s,
                             int64_t *out)
{
    const size_t mark = tka_arena_mark(s);
    tka_status st = gather_top_in(w, k, t, cap, s, out);
    tka_arena_release(s, mark);
    return st;
}

/* gather_top for a row of at most TKA_CHUNK logits: one branch-free gather of x >= t; with
 * kv, also the kept logits (float64), in the same order. */
static tka_status gather_ge_in(const tka_row *w, int64_t k, double t, tka_arena *s, int64_t *out,
                               double *kv)
{
    const int64_t n = w->n;
    double *vals = tka_arena_alloc(s, (size_t)(n + 16) * sizeof(double));
    int64_t *idx = tka_arena_alloc(s, (size_t)(n + 16) * sizeof(int64_t));
    if (!vals || !idx) return TKA_ERR_NOMEM;
    const int64_t ge = w->K->gather_ge[w->dt](w->p, n, t, vals, idx);
    int64_t gt = 0;
    for (int64_t i = 0; i < ge; i++) gt += vals[i] > t;
    if (gt > k || ge < k) return TKA_RETRY;  /* t is not the k-th largest */
    if (ge == k) {  /* no tie at t to break: every gathered logit is kept */
        memcpy(out, idx, (size_t)k * sizeof(int64_t));
        if (kv) memcpy(kv, vals, (size_t)k * sizeof(double));
        return TKA_OK;
    }
    int64_t q = 0, x = k - gt;  /* x: ties at t still to keep, the lowest positions first */
    for (int64_t i = 0; i < ge; i++) {
        const int64_t above = vals[i] > t, take = above | (x > 0);
        out[q] = idx[i];
        if (kv) kv[q] = vals[i];
        q += take;
        x -= take & !above;
    }
    return TKA_OK;
}

tka_status tka_row_topk_above(const tka_row *w, int64_t k, double t, tka_arena *s, int64_t *out)
{
    return tka_row_topk_above_v(w, k, t, s, out, NULL);
}

tka_status tka_row_topk_above_v(const tka_row *w, int64_t k, double t, tka_arena *s, int64_t *out,
                                double *kv)
{
    if (k <= 0) return TKA_OK;
    tka_status st;
    if (w->n <= TKA_CHUNK && t > -INFINITY) {
        const size_t mark = tka_arena_mark(s);
        st = gather_ge_in(w, k, t, s, out, kv);
        tka_arena_release(s, mark);
        if (st != TKA_RETRY) return st;
    } else {
        st = gather_top(w, k, t, w->n, s, out);
    }
    if (st == TKA_RETRY) st = tka_row_topk_set(w, k, s, out, NULL);
    if (st == TKA_OK && kv)
        for (int64_t i = 0; i < k; i++) kv[i] = elem(w, out[i]);
    return st;
}

tka_status tka_row_keep_weights(const tka_row *w, int64_t k, double t, const double *ew,
                                double *e)
{
    const int64_t n = w->n;
    const double *x = w->p;
    int64_t ge, gt;
    if (!(t > -INFINITY)) return TKA_RETRY;
    w->K->exp_keep[TKA_F64](x, n, w->max, t, e, &ge, &gt, ew);
    if (gt > k || ge < k) return TKA_RETRY;
    for (int64_t j = n - 1, q = ge - k; q > 0; j--)
        if (x[j] == t) {
            e[j] = 0.0;
            q--;
        }
    return TKA_OK;
}

tka_status tka_row_topk_set(const tka_row *w, int64_t k, tka_arena *s, int64_t *out,
                            double *log_tau)
{
    if (k <= 0 || k >= w->n_live) {
        if (log_tau) *log_tau = k <= 0 ? 0.0 : -INFINITY;
        if (k >= w->n) {
            for (int64_t i = 0; i < w->n; i++) out[i] = i;
            return TKA_OK;
        }
        if (k <= 0) return TKA_OK;
        log_tau = NULL;
    }
    rank_info ri;
    tka_status st = rank_select(w, k, s, &ri);
    if (st != TKA_OK) return st;
    if (log_tau) {
        double lr, head;
        if ((st = ratio_from_rank(w, k, s, &ri, &lr, &head)) != TKA_OK) return st;
        *log_tau = -softplus(lr);
    }
    return gather_top(w, k, ri.t, ri.n_gt + ri.n_eq, s, out);
}

static tka_status topk_row(void *c, const tka_row *w, int64_t r, tka_arena *s)
{
    topk_ctx *cx = c;
    return tka_row_topk(w, cx->k, s, cx->idx + r * cx->k);
}

/* -------------------------------------------------------------------- tv_curve */

typedef struct {
    double *out;
} curve_ctx;

static tka_status curve_row(void *c, const tka_row *w, int64_t r, tka_arena *s)
{
    curve_ctx *cx = c;
    const int64_t n = w->n;
    double *out = cx->out + r * (n + 1);
    double *vals = tka_arena_alloc(s, (size_t)n * sizeof(double));  /* row scope */
    if (!vals) return TKA_ERR_NOMEM;
    tka_status st = row_sorted(w, s, vals);
    if (st != TKA_OK) return st;
    w->K->exp_shift[TKA_F64](vals, n, w->max, out);
    /* suffix sums from the smallest term up: each partial sum is accurate */
    double acc = 0.0;
    out[n] = 0.0;
    for (int64_t i = n - 1; i >= 0; i--) { acc += out[i]; out[i] = acc; }
    const double inv_z = 1.0 / out[0];
    for (int64_t i = 1; i < n; i++) out[i] *= inv_z;
    out[0] = 1.0;
    return TKA_OK;
}

/* ---------------------------------------------------------------------- bounds */

typedef struct {
    const int64_t *k;
    int form;
    double *out;
} gap_ctx;

/*
 * Round a bound up past every rounding error made on the way (docs/design.md §2: certificates).
 * Bounds are computed as exp(-softplus(arg)): sums of up to n positive terms and a few
 * exp/log calls cost a relative error of at most (n + c) u, and the rounding of the terms
 * that make up arg (each off by at most u times its magnitude) shifts the result by a
 * relative mag * u, where the caller passes mag = the sum of those magnitudes (3 |arg| for
 * softplus and exp included). Both are covered with a factor of 8 to spare (2^-50 = 8u),
 * and the result is moved one ulp up so that a subnormal or underflowed value still
 * bounds the exact tau: a bound on a non-empty tail is never 0.
 */
static double certify(double bound, int64_t n, double mag)
{
    double b = bound * (1.0 + ((double)n + 64.0 + mag) * 0x1p-50);
    b = nextafter(b, INFINITY);
    return b > 1.0 ? 1.0 : b;
}

static tka_status gap_row(void *c, const tka_row *w, int64_t r, tka_arena *s)
{
    gap_ctx *cx = c;
    const int64_t k = cx->k[r], nl = w->n_live;
    double bound;
    if (k == 0) bound = 1.0;
    else if (k >= nl) bound = 0.0;
    else {
        rank_info ri;
        double lr;
        if (cx->form == TKA_GAP_MASS) {
            double head;
            tka_status st = head_tail_ratio(w, k, s, &ri, &lr, &head);
            if (st != TKA_OK) return st;
            /* tail <= (n' - k) e^{s_(k+1)}; bound = U / (A + U) */
            double lu = log((double)(nl - k)) + (ri.next - w->max), arg = log(head) - lu;
            bound = certify(exp(-softplus(arg)), w->n,
                            fabs(log(head)) + fabs(lu) + fabs(ri.next - w->max) + 3.0 * fabs(arg));
        } else {
            tka_status st = rank_select(w, k, s, &ri);
            if (st != TKA_OK) return st;
            double arg = log((double)k) - log((double)(nl - k)) + (ri.t - ri.next);
            bound = certify(exp(-softplus(arg)), w->n,
                            (ri.t - ri.next) + 2.0 * log((double)w->n + 1.0) + 3.0 * fabs(arg));
        }
    }
    cx->out[r] = bound;
    return TKA_OK;
}

typedef struct {
    const int64_t *k;
    const int64_t *cuts;
    int64_t ncut, nseg;
    int spacing, exhaustive;
    double *out;
} multigap_ctx;

/* The j-th of nseg segment ends after k, as an offset from k before rounding up
 * (span = n' - k): span^(j/nseg) (geometric) or span j / nseg (linear). */
static inline double seg_offset(int spacing, double span, int64_t j, int64_t nseg)
{
    return spacing == TKA_SPACING_GEOMETRIC ? pow(span, (double)j / (double)nseg)
                                            : span * (double)j / (double)nseg;
}

/* One step of the segment loop: a cut that advances closes the segment (prev, cut]
 * (clipped at n'), bounded by its length times e^{s_(prev+1)} (relative to ref). */
static inline void seg_add(double *u, int64_t *prev, int64_t cut, const double *v, double ref,
                           int64_t nl)
{
    if (cut <= *prev) return;
    if (cut > nl) cut = nl;
    *u += (double)(cut - *prev) * tka_exp_up(v[*prev] - ref);
    *prev = cut;
}

/*
 * The segment loop for nseg segments (j = 1..nseg, the last end at n') runs nseg times
 * whatever the row's length: with nseg = 2^62 it would not return. Only the ends that
 * advance past the previous one ("records") change u, so for many segments the records are
 * worked out directly, with u bit-for-bit what the loop gives (the same seg_add calls with
 * the same cuts, in the same order):
 *
 * Let S(j) be the exact offset (span^(j/J) or span j/J, J = nseg) and C(j) the computed one
 * (seg_offset), off(j) = ceil(C(j)). Below, span <= 2^40 and J >= 8 span (log2 span + 1):
 *  - |C(j) - S(j)| <= E = 1/32: the linear offset is four correctly rounded operations
 *    (relative error <= 4.01 u, u = 2^-53); the geometric one has j/J to 3.01 u relative,
 *    which moves span^(j/J) by a relative <= 3.01 u ln span <= 84 u, plus pow's own error
 *    (glibc: <= 1 ulp), so <= 90 u relative; times span <= 2^40, E <= 2^-5.
 *  - S(j+1) - S(j) <= 1/4: linear span/J; geometric span^(j/J) (span^(1/J) - 1)
 *    <= span e x with x = ln(span)/J <= 1, i.e. <= 2.72 span ln(span) / J; for such J
 *    the first is <= 1/8 and the second <= 2.72 ln(2) / 8 < 1/4.
 * Then the records are off(1) (j = 1), every integer m with off(1) < m < span, and last an
 * end at or past n', which seg_add clips to n': the same calls as seg_add(k + m) for
 * m = off(1) + 1, ..., span and the final seg_add(n'). Proof for m < span: let j0 be the
 * first j with S(j) > m - 1/2; it exists and is below J, as S(J - 1) >= S(J) - 1/4 =
 * span - 1/4, and j0 > 1 as C(1) <= off(1) <= m - 1. Every j < j0 has
 * C(j) <= m - 1/2 + E < m, so off(j) <= m, and S(j0) <= m - 1/4 (the step), so C(j0) lies
 * in (m - 1/2 - E, m - 1/4 + E] and off(j0) = m: the first j with off(j) >= m gives m
 * exactly, a record. No monotonicity of C is needed. After m = span - 1 (or off(1)) the
 * next record is an end >= k + span = n', clipped to n' whichever j gives it. The shortcut
 * costs O(span); TKA_MULTIGAP_EXHAUSTIVE (a test hook) runs the loop instead, to check the
 * two against each other.
 */
static double multigap_u(const multigap_ctx *cx, const double *v, double ref, int64_t k,
                         int64_t nl)
{
    double u = 0.0;
    int64_t prev = k;
    if (cx->cuts) {
        for (int64_t j = 0; j < cx->ncut; j++) {
            int64_t cut = cx->cuts[j];
            if (cut >= nl) continue;
            seg_add(&u, &prev, cut, v, ref, nl);
        }
        seg_add(&u, &prev, nl, v, ref, nl);
        return u;
    }
    const int64_t J = cx->nseg, span_i = nl - k;
    const double span = (double)span_i;
    if (!cx->exhaustive && span_i <= ((int64_t)1 << 40) &&
        (double)J >= 8.0 * span * (log2(span) + 1.0)) {
        const int64_t o1 = (int64_t)ceil(seg_offset(cx->spacing, span, 1, J));
        seg_add(&u, &prev, k + o1, v, ref, nl);
        for (int64_t m = o1 + 1; m <= span_i; m++) seg_add(&u, &prev, k + m, v, ref, nl);
        seg_add(&u, &prev, nl, v, ref, nl);
        return u;
    }
    for (int64_t j = 1; j <= J && prev < nl; j++)
        seg_add(&u, &prev, j == J ? nl : k + (int64_t)ceil(seg_offset(cx->spacing, span, j, J)),
                v, ref, nl);
    seg_add(&u, &prev, nl, v, ref, nl);
    return u;
}

static tka_status multigap_row(void *c, const tka_row *w, int64_t r, tka_arena *s)
{
    multigap_ctx *cx = c;
    const int64_t k = cx->k[r], nl = w->n_live, n = w->n;
    if (k == 0 || k >= nl) {
        cx->out[r] = k == 0 ? 1.0 : 0.0;
        return TKA_OK;
    }
    double *v = tka_arena_alloc(s, (size_t)n * sizeof(double));  /* row scope */
    double *m = tka_arena_alloc(s, (size_t)(k + 1) * sizeof(double));
    if (!v || !m) return TKA_ERR_NOMEM;
    tka_status st = row_sorted(w, s, v);
    if (st != TKA_OK) return st;
    /* head relative to the maximum (an underflowed term only loosens the bound); tail
     * segments relative to s_(k+1), each exp rounded up past underflow */
    w->K->exp_shift[TKA_F64](v, k, w->max, m);
    double head = 0.0;
    for (int64_t i = k - 1; i >= 0; i--) head += m[i];
    const double ref = v[k];

    /* U = sum over segments (m_{j-1}, m_j] of their length times e^{s_(m_{j-1}+1)} */
    const double u = multigap_u(cx, v, ref, k, nl);
    /* bound = U e^ref / (A e^max + U e^ref) = 1 / (1 + e^lr) */
    const double lr = log(head) - log(u) + (w->max - ref);
    /* the count of rounded terms, n + ncut + nseg, saturated (nseg may be near 2^63) */
    const int64_t nterms = cx->nseg > INT64_MAX - n - cx->ncut ? INT64_MAX
                                                               : n + cx->ncut + cx->nseg;
    cx->out[r] = certify(exp(-softplus(lr)), nterms,
                         fabs(log(head)) + fabs(log(u)) + fabs(w->max - ref) + 3.0 * fabs(lr));
    return TKA_OK;
}

/* ------------------------------------------------------------- row statistics */

typedef struct {
    double *out;
} entropy_ctx;

static tka_status entropy_row(void *c, const tka_row *w, int64_t r, tka_arena *s)
{
    entropy_ctx *cx = c;
    double zb, m1, cmax;
    tka_status st = tka_row_sumexp_moment(w, s, w->max, &zb, &m1, &cmax);
    if (st != TKA_OK) return st;
    /* Z = c + zb (c logits at the maximum); H = log Z - E[s - max], both terms >= 0, and
     * log Z = log c + log1p(zb / c) keeps H's relative accuracy when one key dominates */
    const double z = cmax + zb;
    double h = log(cmax) + log1p(zb / cmax) - m1 / z;
    cx->out[r] = h > 0.0 ? h : 0.0;
    return TKA_OK;
}

typedef struct {
    const double *thr;
    int64_t *out;
} support_ctx;

static tka_status support_row(void *c, const tka_row *w, int64_t r, tka_arena *s)
{
    support_ctx *cx = c;
    double z, unused;
    tka_status st = tka_row_sumexp_split(w, s, -INFINITY, w->max, w->max, &z, &unused);
    if (st != TKA_OK) return st;
    /* P_i >= thr  <=>  s_i >= max + log Z + log thr */
    double cut = w->max + log(z) + log(cx->thr[r]);
    tka_band_out b;
    st = tka_row_band(w, s, cut, INFINITY, 0.0, 0, NULL, NULL, 0, &b);
    if (st != TKA_OK) return st;
    cx->out[r] = b.n_band;
    return TKA_OK;
}

typedef struct {
    double *mu, *sigma;
} fit_ctx;

static tka_status fit_row(void *c, const tka_row *w, int64_t r, tka_arena *s)
{
    fit_ctx *cx = c;
    double sum = 0.0, ss = 0.0;
    for (int64_t j = 0; j < w->n; j++) {
        double v = elem(w, j);
        if (v > -INFINITY) sum += v;
    }
    const double mean = sum / (double)w->n_live;
    for (int64_t j = 0; j < w->n; j++) {
        double v = elem(w, j);
        if (v > -INFINITY) ss += (v - mean) * (v - mean);
    }
    cx->mu[r] = mean;
    cx->sigma[r] = w->n_live > 1 ? sqrt(ss / (double)(w->n_live - 1)) : 0.0;
    return TKA_OK;
}

/* --------------------------------------------------------------- batch driver */

/* A per-row function: what it allocates in s lives until the driver moves to the next row. */
typedef tka_status (*per_row_fn)(void *ctx, const tka_row *w, int64_t r, tka_arena *s);

typedef struct {
    const tka_rows *x;
    const tka_kernels *K;
    per_row_fn fn;
    void *ctx;
    int unchecked;  /* fn checks its rows itself (no scan here) */
} drive_ctx;

static tka_status drive_chunk(void *c, int64_t r0, int64_t r1, tka_arena *s, int64_t *bad)
{
    drive_ctx *d = c;
    const size_t mark = tka_arena_mark(s);
    for (int64_t r = r0; r < r1; r++) {
        /* the row's scope: its copy and whatever the per-row function leaves in s */
        tka_arena_release(s, mark);
        tka_row w;
        tka_status st = row_prep(d->x, d->K, r, s, &w, !d->unchecked);
        if (st == TKA_OK) st = d->fn(d->ctx, &w, r, s);
        if (st != TKA_OK) {
            *bad = r;
            return st;
        }
    }
    tka_arena_release(s, mark);
    return TKA_OK;
}

/* Jobs smaller than this run on the calling thread (tka_rows_run_parallel would keep them
 * there too); deciding it here skips asking for the thread count, which by default reads
 * the number of online CPUs from the system on every call (microseconds, the cost of a
 * whole short row). Where a job runs never changes its results. */
#define SERIAL_WORK 65536.0

/* `cost` is the rough number of passes over each row, for the threading decision. */
static tka_status drive_rows(const tka_rows *x, per_row_fn fn, void *ctx, double cost,
                             int unchecked, tka_error *err)
{
    drive_ctx d = {x, tka_kernels_active(), fn, ctx, unchecked};
    int64_t bad = -1;
    if (err) { err->row = -1; err->what = NULL; }
    tka_status st;
    const double work = cost * (double)x->rows * (double)x->n;
    if (x->n > TKA_CHUNK && !tka_threads_in_worker() && x->rows < tka_num_threads())
        st = tka_rows_run_serial(x->rows, drive_chunk, &d, &bad);  /* threads inside each row */
    else if (work < SERIAL_WORK)
        st = tka_rows_run_serial(x->rows, drive_chunk, &d, &bad);  /* no thread count needed */
    else
        st = tka_rows_run_parallel(x->rows, work, drive_chunk, &d, &bad);
    if (err) err->row = bad;
    return st;
}

static tka_status drive(const tka_rows *x, per_row_fn fn, void *ctx, double cost, tka_error *err)
{
    return drive_rows(x, fn, ctx, cost, 0, err);
}

tka_status tka_tail_mass(const tka_rows *x, const int64_t *k, double *log_tau, double *kl,
                         tka_error *err)
{
    tail_ctx c = {k, log_tau, kl};
    return drive_rows(x, tail_row, &c, 3.0, 1, err);
}

tka_status tka_k_eps(const tka_rows *x, const double *eps, int64_t *k_out, double *tau_out,
                     tka_error *err)
{
    keps_ctx c = {eps, k_out, tau_out};
    return drive_rows(x, keps_row, &c, 4.0, 1, err);
}

tka_status tka_topk(const tka_rows *x, int64_t k, int64_t *idx_out, tka_error *err)
{
    topk_ctx c = {k, idx_out};
    return drive(x, topk_row, &c, 3.0, err);
}

tka_status tka_tv_curve(const tka_rows *x, double *out, tka_error *err)
{
    curve_ctx c = {out};
    return drive(x, curve_row, &c, 20.0, err);
}

tka_status tka_gap_bound(const tka_rows *x, const int64_t *k, int form, double *out,
                         tka_error *err)
{
    gap_ctx c = {k, form, out};
    return drive(x, gap_row, &c, 3.0, err);
}

tka_status tka_multigap_bound(const tka_rows *x, const int64_t *k, const int64_t *cut_ranks,
                              int64_t ncut, int64_t nseg, int spacing, double *out,
                              tka_error *err)
{
    multigap_ctx c = {k, cut_ranks, cut_ranks ? ncut : 0, cut_ranks ? 0 : nseg,
                      spacing & ~TKA_MULTIGAP_EXHAUSTIVE,
                      (spacing & TKA_MULTIGAP_EXHAUSTIVE) != 0, out};
    return drive(x, multigap_row, &c, 20.0, err);
}

tka_status tka_entropy(const tka_rows *x, double *out, tka_error *err)
{
    entropy_ctx c = {out};
    return drive(x, entropy_row, &c, 2.0, err);
}

tka_status tka_effective_support(const tka_rows *x, const double *threshold, int64_t *out,
                                 tka_error *err)
{
    support_ctx c = {threshold, out};
    return drive(x, support_row, &c, 3.0, err);
}

tka_status tka_fit_gaussian(const tka_rows *x, double *mu, double *sigma, tka_error *err)
{
    fit_ctx c = {mu, sigma};
    return drive(x, fit_row, &c, 2.0, err);
}

/* Blockwise bound (docs/design.md §2): rows are short (one entry per block), so no threads. */
tka_status tka_block_bound(const double *u, const int64_t *sizes, int sizes_per_row,
                           const double *log_a, const double *log_zs, int64_t rows, int64_t nb,
                           double *out, tka_error *err)
{
    if (err) { err->row = -1; err->what = NULL; }
    for (int64_t r = 0; r < rows; r++) {
        const double *ur = u + r * nb;
        const int64_t *sr = sizes + (sizes_per_row ? r * nb : 0);
        double mx = -INFINITY;
        for (int64_t b = 0; b < nb; b++)
            if (sr[b] > 0 && ur[b] > mx) mx = ur[b];
        double su = 0.0;
        if (mx > -INFINITY)
            for (int64_t b = 0; b < nb; b++)
                if (sr[b] > 0) su += (double)sr[b] * exp(ur[b] - mx);
        double log_u = su > 0.0 ? mx + log(su) : -INFINITY;
        double lzs = log_zs[r], la = log_a[r];
        double lz = log_u > lzs ? log_u + log1p(exp(lzs - log_u))
                                : (lzs > -INFINITY ? lzs + log1p(exp(log_u - lzs)) : -INFINITY);
        if (lz == -INFINITY) {
            if (err) { err->row = r; err->what = "scored_mass and the unscored blocks are all zero"; }
            return TKA_ERR_ARG;
        }
        if (la == -INFINITY) { out[r] = 1.0; continue; }
        /* d = log((Z_s + U) / A) >= 0, pushed up by its absolute rounding error, which
         * grows with the magnitude of the logs involved */
        double d = lz - la;
        if (d < 0.0) d = 0.0;
        double mag = fabs(lz) + fabs(la) + fabs(mx == -INFINITY ? 0.0 : mx) + (double)nb + 16.0;
        d += mag * 0x1p-50;
        double bound = -expm1(-d) * (1.0 + 0x1p-50);
        out[r] = bound > 1.0 ? 1.0 : bound;
    }
    return TKA_OK;
}
