/*
 * test_simd_sets.c - every kernel set of this build against the scalar set and against
 * references, at the level of the C core (no Python).
 *
 * Built from the core's C sources by scripts/check_simd_sets.sh: natively (x86-64: AVX2
 * and AVX-512 where the CPU has them) and for aarch64 under qemu (NEON). For adversarial
 * rows (ties, -inf masks, NaN and +inf, huge and tiny ranges, subnormals, terms at the
 * exp flush limit, long rows, every length modulo the vector widths), each in float64,
 * float32 and float16, and for every set:
 *   - k_eps, its tail and top-k indices are identical to the scalar set's; top-k equals a
 *     stable sort, k_eps the smallest k whose reference tail is <= eps;
 *   - the tail mass agrees with a long double reference to 1e-12 (relative, in log);
 *   - every certificate (gap bound in both forms, multigap with geometric, linear and all
 *     cuts, the search's tv_bound) is >= the exact tail mass, computed in long double;
 *   - float16 rows give the results of the same values as float32, bit for bit;
 *   - the kernels themselves: scan/max_below/band identical to scalar, exp within 4 ulp
 *     of libm, every float16 value converted exactly (all 65536 bit patterns);
 *   - dense and Top-k attention match a long double reference; the Top-k kept sets
 *     are identical to the scalar set's.
 * Prints one summary line per set; exits 1 on any failure.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "search.h"

static long g_checks, g_fail;
static const char *g_set = "scalar";

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        g_checks++;                                                               \
        if (!(cond)) {                                                            \
            if (g_fail++ < 40) {                                                  \
                fprintf(stderr, "FAIL [%s] %s:%d: ", g_set, __FILE__, __LINE__);  \
                fprintf(stderr, __VA_ARGS__);                                     \
                fputc('\n', stderr);                                              \
            }                                                                     \
        }                                                                         \
    } while (0)

/* ------------------------------------------------------------------ random numbers */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd_u64(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rnd_unif(void) { return (double)(rnd_u64() >> 11) * 0x1p-53; }
static double rnd_norm(void)
{
    double u = rnd_unif(), v = rnd_unif();
    return sqrt(-2.0 * log(u + 0x1p-60)) * cos(6.283185307179586 * v);
}

/* ------------------------------------------------------------------ rows */

enum {
    K_GAUSS, K_MASKED, K_TIES, K_EQUAL, K_HUGE_RANGE, K_TINY, K_SUBNORMAL, K_SPIKE,
    K_FLUSH, K_BIG, K_ONE_LIVE, K_F32_RANGE, K_BAD_NAN, K_BAD_INF, K_ALL_MASKED, K_FAR_MAX,
    K_HEAD, K_SUB_SPREAD, K_KINDS
};
static const char *kind_name[K_KINDS] = {
    "gauss", "masked", "ties", "equal", "huge-range", "tiny", "subnormal", "spike",
    "flush", "big", "one-live", "f32-range", "nan", "+inf", "all-masked", "far-max", "head",
    "subnormal-spread"};

static void make_row(int kind, int64_t n, double *x)
{
    for (int64_t i = 0; i < n; i++) {
        double v;
        switch (kind) {
        case K_GAUSS: v = 3.0 * rnd_norm(); break;
        case K_MASKED: v = rnd_unif() < 0.3 ? -INFINITY : 2.0 * rnd_norm(); break;
        case K_TIES: v = 0.5 * (double)(rnd_u64() % 4); break;
        case K_EQUAL: v = 1.25; break;
        case K_HUGE_RANGE: v = -1e4 * rnd_unif(); break;
        case K_TINY: v = 1e-30 * rnd_norm(); break;
        case K_SUBNORMAL: {
            static const double sub[] = {4.9406564584124654e-324, -4.9406564584124654e-324,
                                         0.0, -0.0, 2.2250738585072009e-308, 1e-310,
                                         1.401298464324817e-45, 5.960464477539063e-08};
            v = sub[rnd_u64() % 8];
            break;
        }
        case K_SPIKE: v = i == n / 2 ? 800.0 : (rnd_unif() < 0.5 ? 0.0 : -1.0); break;
        case K_FLUSH: v = i == 0 ? 0.0 : -700.0 - 50.0 * rnd_unif(); break;
        case K_BIG: v = rnd_unif() < 0.1 ? -INFINITY : 1e300 * (2.0 * rnd_unif() - 1.0); break;
        case K_ONE_LIVE: v = i == (n - 1) / 3 ? -5.0 : -INFINITY; break;
        case K_F32_RANGE: v = 88.0 * (2.0 * rnd_unif() - 1.0); break;
        case K_BAD_NAN: v = i == n - 1 ? NAN : rnd_norm(); break;
        case K_BAD_INF: v = i == n / 2 ? INFINITY : rnd_norm(); break;
        /* the maximum (650 above the rest) at a position k_eps's sample of a long row skips */
        case K_FAR_MAX: v = i == 1 ? 650.0 : rnd_norm(); break;
        /* a few keys far above the bulk carry most of the mass: the sample's estimate of
         * the total misses them */
        case K_HEAD: v = rnd_u64() % 512 == 0 ? 12.0 + rnd_unif() : 2.0 * rnd_norm(); break;
        /* subnormal differences: every weight rounds to 1, the order is still strict */
        case K_SUB_SPREAD: v = (double)(int64_t)(rnd_u64() % 2001 - 1000) * 4.9406564584124654e-324; break;
        default: v = -INFINITY; break;
        }
        x[i] = v;
    }
    if (kind == K_MASKED && n > 0) x[rnd_u64() % (uint64_t)n] = 1.0; /* never all masked */
}

/* A row in one dtype: the values are those of the float64 row rounded to it; `val`
 * gets the (exact) float64 values of the stored ones. */
typedef struct {
    tka_dtype dt;
    int64_t n, stride; /* stride in elements */
    void *p;
    double *val;
} row_t;

static void row_make(row_t *r, const double *x, int64_t n, tka_dtype dt, int64_t stride)
{
    const size_t es = dt == TKA_F64 ? 8 : dt == TKA_F32 ? 4 : 2;
    r->dt = dt;
    r->n = n;
    r->stride = stride;
    r->p = calloc((size_t)(n * stride + 1), es);
    r->val = malloc((size_t)(n + 1) * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        double v = x[i];
        if (dt == TKA_F64) {
            ((double *)r->p)[i * stride] = v;
        } else if (dt == TKA_F32) {
            float f = (float)v;
            ((float *)r->p)[i * stride] = f;
            v = f;
        } else {
            uint16_t h = tka_double_to_half(v);
            ((uint16_t *)r->p)[i * stride] = h;
            v = tka_half_to_float(h);
        }
        r->val[i] = v;
    }
}
static void row_free(row_t *r)
{
    free(r->p);
    free(r->val);
}
static tka_rows row_view(const row_t *r)
{
    const int64_t es = r->dt == TKA_F64 ? 8 : r->dt == TKA_F32 ? 4 : 2;
    tka_rows v = {(const char *)r->p, NULL, r->n * r->stride * es, r->stride * es, 1, r->n,
                  r->dt};
    return v;
}

/* ------------------------------------------------------------------ references */

typedef struct {
    int64_t n, live;
    int bad;              /* NaN or +inf present */
    double *sorted;       /* decreasing */
    int64_t *order;       /* positions, stable */
    long double *suffix;  /* suffix[k] = sum_{i >= k} e^{s_i - max} (k = 0..n) */
} ref_t;

static const double *g_cmp_vals;
static int cmp_desc(const void *a, const void *b)
{
    int64_t i = *(const int64_t *)a, j = *(const int64_t *)b;
    double x = g_cmp_vals[i], y = g_cmp_vals[j];
    if (x > y) return -1;
    if (x < y) return 1;
    return i < j ? -1 : (i > j);
}

static void ref_make(ref_t *R, const double *v, int64_t n)
{
    R->n = n;
    R->bad = 0;
    R->live = 0;
    R->sorted = malloc((size_t)(n + 1) * sizeof(double));
    R->order = malloc((size_t)(n + 1) * sizeof(int64_t));
    R->suffix = malloc((size_t)(n + 1) * sizeof(long double));
    for (int64_t i = 0; i < n; i++) {
        R->order[i] = i;
        if (v[i] != v[i] || v[i] == INFINITY) R->bad = 1;
        if (v[i] > -INFINITY) R->live++;
    }
    if (R->bad) return;
    g_cmp_vals = v;
    qsort(R->order, (size_t)n, sizeof(int64_t), cmp_desc);
    for (int64_t i = 0; i < n; i++) R->sorted[i] = v[R->order[i]];
    R->suffix[n] = 0.0L;
    for (int64_t i = n - 1; i >= 0; i--)
        R->suffix[i] = R->suffix[i + 1] +
                       (R->sorted[i] > -INFINITY
                            ? expl((long double)R->sorted[i] - (long double)R->sorted[0])
                            : 0.0L);
}
static void ref_free(ref_t *R)
{
    free(R->sorted);
    free(R->order);
    free(R->suffix);
}

/* log of the exact tail mass of the top-k set, in long double, relative to s_(k+1) so
 * that tails far below the head keep their accuracy; -inf for an empty tail. */
static long double ref_log_tau(const ref_t *R, int64_t k)
{
    if (k >= R->live) return -INFINITY;
    const long double t = R->sorted[k], m = R->sorted[0];
    long double tail = 0.0L;
    for (int64_t i = R->live - 1; i >= k; i--) tail += expl((long double)R->sorted[i] - t);
    return logl(tail) + (t - m) - logl(R->suffix[0]);
}

/* Where long double is only double (macOS on arm64, MSVC) the references are no more
 * precise than what they check: their own rounding, up to (n + 16) units, is allowed for. */
static long double ref_slack(int64_t n)
{
    return LDBL_MANT_DIG >= 64 ? 0.0L : 4.0L * (long double)(n + 16) * DBL_EPSILON;
}

/* ------------------------------------------------------------------ helpers */

static int same_bits(double a, double b) { return memcmp(&a, &b, sizeof a) == 0; }

static int select_set(tka_simd s)
{
    if (tka_simd_select(s) != TKA_OK) return 0;
    g_set = tka_simd_name(s);
    return 1;
}

/* Everything the row functions give for one row, to compare between sets and dtypes. */
#define NEPS 7
#define NK 6
typedef struct {
    tka_status st;
    int64_t keps[NEPS];
    double keps_tau[NEPS];
    int64_t ks[NK];
    double log_tau[NK], kl[NK], gap0[NK], gap1[NK], mg_geo[NK], mg_lin[NK], mg_all[NK];
    int64_t *topk; /* NK lists of ks[j] indices, concatenated */
    int64_t topk_len;
    double entropy;
} row_res;

static const double EPS_LIST[NEPS] = {1e-300, 1e-100, 1e-12, 1e-6, 0.01, 0.3, 0.9};

static void ks_for(int64_t n, int64_t *ks)
{
    const int64_t c[NK] = {0, 1, n / 3, n / 2, n - 1, n};
    for (int j = 0; j < NK; j++) ks[j] = c[j] < 0 ? 0 : (c[j] > n ? n : c[j]);
}

static void row_run(const row_t *r, row_res *o)
{
    tka_rows x = row_view(r);
    tka_error err;
    memset(o, 0, sizeof *o);
    const int64_t n = r->n;
    ks_for(n, o->ks);
    o->st = tka_k_eps(&x, &EPS_LIST[0], &o->keps[0], &o->keps_tau[0], &err);
    if (o->st != TKA_OK) return;
    for (int e = 1; e < NEPS; e++) tka_k_eps(&x, &EPS_LIST[e], &o->keps[e], &o->keps_tau[e], &err);
    int64_t cuts[4096];
    const int64_t ncut = n < 4096 ? n : 4096;
    for (int64_t i = 0; i < ncut; i++) cuts[i] = i + 1;
    o->topk_len = 0;
    for (int j = 0; j < NK; j++) o->topk_len += o->ks[j];
    o->topk = malloc((size_t)(o->topk_len + 1) * sizeof(int64_t));
    int64_t at = 0;
    for (int j = 0; j < NK; j++) {
        const int64_t k = o->ks[j];
        tka_tail_mass(&x, &k, &o->log_tau[j], &o->kl[j], &err);
        tka_gap_bound(&x, &k, TKA_GAP_MASS, &o->gap0[j], &err);
        tka_gap_bound(&x, &k, TKA_GAP_GAP, &o->gap1[j], &err);
        tka_multigap_bound(&x, &k, NULL, 0, 5, TKA_SPACING_GEOMETRIC, &o->mg_geo[j], &err);
        tka_multigap_bound(&x, &k, NULL, 0, 5, TKA_SPACING_LINEAR, &o->mg_lin[j], &err);
        tka_multigap_bound(&x, &k, cuts, ncut, 0, 0, &o->mg_all[j], &err);
        tka_topk(&x, k, o->topk + at, &err);
        at += k;
    }
    tka_entropy(&x, &o->entropy, &err);
}

static void res_free(row_res *o) { free(o->topk); }

/* float64 results that must agree to rounding between sets (and exactly between dtypes) */
static int close_rel(double a, double b, double rtol)
{
    if (a == b) return 1;
    if (isinf(a) || isinf(b) || a != a || b != b) return 0;
    return fabs(a - b) <= rtol * fmax(fabs(a), fabs(b)) + 1e-300;
}

static void compare_sets(const row_res *a, const row_res *s, const char *what)
{
    CHECK(a->st == s->st, "%s: status %d vs scalar %d", what, a->st, s->st);
    if (a->st != TKA_OK || s->st != TKA_OK) return;
    for (int e = 0; e < NEPS; e++) {
        CHECK(a->keps[e] == s->keps[e], "%s: k_eps(%g) %lld vs scalar %lld", what, EPS_LIST[e],
              (long long)a->keps[e], (long long)s->keps[e]);
        CHECK(close_rel(a->keps_tau[e], s->keps_tau[e], 1e-12), "%s: k_eps tau(%g) %.17g vs %.17g",
              what, EPS_LIST[e], a->keps_tau[e], s->keps_tau[e]);
    }
    CHECK(a->topk_len == s->topk_len && !memcmp(a->topk, s->topk, (size_t)a->topk_len * 8),
          "%s: top-k indices differ from scalar", what);
    for (int j = 0; j < NK; j++) {
        CHECK(close_rel(a->log_tau[j], s->log_tau[j], 1e-12), "%s: log_tau(k=%lld) %.17g vs %.17g",
              what, (long long)a->ks[j], a->log_tau[j], s->log_tau[j]);
        CHECK(close_rel(a->gap0[j], s->gap0[j], 1e-12), "%s: gap bound differs", what);
        CHECK(close_rel(a->gap1[j], s->gap1[j], 1e-12), "%s: gap bound (gap) differs", what);
        CHECK(close_rel(a->mg_geo[j], s->mg_geo[j], 1e-12), "%s: multigap differs", what);
        CHECK(close_rel(a->mg_lin[j], s->mg_lin[j], 1e-12), "%s: multigap (linear) differs", what);
        CHECK(close_rel(a->mg_all[j], s->mg_all[j], 1e-12), "%s: multigap (all) differs", what);
    }
    CHECK(close_rel(a->entropy, s->entropy, 1e-11), "%s: entropy %.17g vs %.17g", what, a->entropy,
          s->entropy);
}

/* identical, bit for bit (float16 row against the same values as float32) */
static void compare_exact(const row_res *a, const row_res *b, const char *what)
{
    int ok = a->st == b->st;
    if (ok && a->st == TKA_OK) {
        for (int e = 0; e < NEPS; e++)
            ok &= a->keps[e] == b->keps[e] && same_bits(a->keps_tau[e], b->keps_tau[e]);
        ok &= a->topk_len == b->topk_len && !memcmp(a->topk, b->topk, (size_t)a->topk_len * 8);
        for (int j = 0; j < NK; j++)
            ok &= same_bits(a->log_tau[j], b->log_tau[j]) && same_bits(a->kl[j], b->kl[j]) &&
                  same_bits(a->gap0[j], b->gap0[j]) && same_bits(a->gap1[j], b->gap1[j]) &&
                  same_bits(a->mg_geo[j], b->mg_geo[j]) && same_bits(a->mg_lin[j], b->mg_lin[j]) &&
                  same_bits(a->mg_all[j], b->mg_all[j]);
        ok &= same_bits(a->entropy, b->entropy);
    }
    CHECK(ok, "%s: float16 results differ from float32 on the same values", what);
}

/* against the long double reference */
static void compare_ref(const row_res *o, const ref_t *R, const char *what)
{
    if (R->bad) {
        CHECK(o->st == TKA_ERR_NAN || o->st == TKA_ERR_POSINF, "%s: bad row gave status %d", what,
              o->st);
        return;
    }
    if (R->live == 0) {
        CHECK(o->st == TKA_ERR_ALL_MASKED, "%s: all-masked row gave status %d", what, o->st);
        return;
    }
    CHECK(o->st == TKA_OK, "%s: status %d", what, o->st);
    if (o->st != TKA_OK) return;
    /* top-k: a stable sort by decreasing value */
    int64_t at = 0;
    int ok = 1;
    for (int j = 0; j < NK; j++) {
        for (int64_t i = 0; i < o->ks[j]; i++) ok &= o->topk[at + i] == R->order[i];
        at += o->ks[j];
    }
    CHECK(ok, "%s: top-k is not the stable order", what);
    for (int j = 0; j < NK; j++) {
        const int64_t k = o->ks[j];
        const long double lt = ref_log_tau(R, k);
        if (isinf(lt)) {
            CHECK(o->log_tau[j] == -INFINITY, "%s: log_tau(k=%lld) %.17g, exact -inf", what,
                  (long long)k, o->log_tau[j]);
        } else {
            CHECK(fabsl((long double)o->log_tau[j] - lt) <= 1e-12L * (1.0L + fabsl(lt)),
                  "%s: log_tau(k=%lld) %.17g, reference %.17Lg", what, (long long)k, o->log_tau[j], lt);
        }
        /* certificates: never below the exact tail mass (compared in log: tails far below
         * the smallest double are still compared). The reference is accurate to ~1e-18. */
        const double bounds[5] = {o->gap0[j], o->gap1[j], o->mg_geo[j], o->mg_lin[j], o->mg_all[j]};
        static const char *bn[5] = {"gap(mass)", "gap(gap)", "multigap(geo)", "multigap(lin)",
                                    "multigap(all)"};
        for (int b = 0; b < 5; b++) {
            const long double lb = bounds[b] > 0 ? logl((long double)bounds[b]) : -INFINITY;
            CHECK(bounds[b] <= 1.0 &&
                      (isinf(lt) ? 1 : lb >= lt - 1e-17L * (1.0L + fabsl(lt)) - ref_slack(R->n)),
                  "%s: %s(k=%lld) = %.17g below the exact tail e^%.17Lg", what, bn[b], (long long)k,
                  bounds[b], lt);
        }
    }
    /* k_eps: the smallest k with tau(k) <= eps, where that is not within rounding of eps */
    for (int e = 0; e < NEPS; e++) {
        const int64_t k = o->keps[e];
        CHECK(o->keps_tau[e] <= EPS_LIST[e], "%s: k_eps tau %.17g above eps %g", what,
              o->keps_tau[e], EPS_LIST[e]);
        CHECK(k >= 0 && k <= R->live, "%s: k_eps %lld outside [0, n']", what, (long long)k);
        if (k < 0 || k > R->live) continue;
        const long double le = logl((long double)EPS_LIST[e]);
        const long double at_k = ref_log_tau(R, k), below = k > 0 ? ref_log_tau(R, k - 1) : 0.0L;
        const long double slack = 1e-11L * (1.0L + fabsl(le));
        if (!isinf(at_k) && fabsl(at_k - le) < slack) continue; /* within rounding of eps */
        if (fabsl(below - le) < slack) continue;
        CHECK(at_k <= le, "%s: k_eps(%g) = %lld has tail e^%.17Lg > eps", what, EPS_LIST[e],
              (long long)k, at_k);
        CHECK(k == 0 || below > le, "%s: k_eps(%g) = %lld is not the smallest", what, EPS_LIST[e],
              (long long)k);
    }
}

/* ------------------------------------------------------------------ kernel level */

/* The int8 code products of the search: exact int32 sums, so every set (and the AVX-512 set
 * with and without VNNI) must give the scalar kernel's result exactly. */
static void check_dot_i8(const tka_kernels *K)
{
    const int64_t ds[] = {8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256};
    enum { MMAX = 37 };
    for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
        const int64_t d = ds[di];
        int16_t *y = malloc((size_t)d * sizeof *y);
        int8_t *z = malloc((size_t)(MMAX * d));
        for (int trial = 0; trial < 3; trial++) {
        if (trial == 0) {  /* random */
            for (int64_t j = 0; j < d; j++) y[j] = (int16_t)((int64_t)(rnd_u64() % 65535) - 32767);
            for (int64_t j = 0; j < MMAX * d; j++) z[j] = (int8_t)((int64_t)(rnd_u64() % 255) - 127);
        } else {  /* the extremes: |y| = 32767 (and byte halves 0x7f/0x80, 0xff/0x01), |z| = 127 */
            const int16_t ys[] = {32767, -32767, 255, -256, 256, -1, 1, 0};
            for (int64_t j = 0; j < d; j++)
                y[j] = trial == 1 ? (int16_t)(j & 1 ? -32767 : 32767) : ys[rnd_u64() % 8];
            for (int64_t j = 0; j < MMAX * d; j++)
                z[j] = trial == 1 ? (int8_t)((j / d) & 1 ? -127 : 127)
                                  : (int8_t)(rnd_u64() & 1 ? 127 : -127);
        }
        for (int64_t m = 1; m <= MMAX; m += (m < 13 ? 1 : 12)) {
            int32_t got[MMAX], want[MMAX];
            tka_kernels_scalar.search->dot_i8(y, z, d, m, want);
            K->search->dot_i8(y, z, d, m, got);
            for (int64_t i = 0; i < m; i++)
                CHECK(got[i] == want[i], "dot_i8 d %lld m %lld key %lld trial %d: %d vs scalar %d",
                      (long long)d, (long long)m, (long long)i, trial, got[i], want[i]);
        }
        }
        free(y);
        free(z);
    }
}

/* The 4-bit code products: exact int32 sums, so every set must give the scalar kernel's
 * result exactly, with the scalar one checked against a direct sum over dimensions. */
static void check_dot_u4(const tka_kernels *K)
{
    const int64_t hbs[] = {1, 3, 8, 16, 24, 31, 32, 33, 48, 64, 65, 96, 128};
    enum { MMAX = 37 };
    for (size_t hi = 0; hi < sizeof hbs / sizeof hbs[0]; hi++) {
        const int64_t hb = hbs[hi];
        int8_t *y = malloc((size_t)(2 * hb));
        uint8_t *z = malloc((size_t)(MMAX * hb));
        for (int trial = 0; trial < 3; trial++) {
            for (int64_t j = 0; j < 2 * hb; j++)
                y[j] = trial == 0 ? (int8_t)((int64_t)(rnd_u64() % 255) - 127)
                                  : (int8_t)(trial == 1 ? (j & 1 ? -127 : 127)
                                                        : (rnd_u64() & 1 ? 127 : -127));
            for (int64_t j = 0; j < MMAX * hb; j++)
                z[j] = trial == 0 ? (uint8_t)(rnd_u64() & 255)
                                  : (uint8_t)(trial == 1 ? 0xff : 0xf0);
            const int32_t bias = (int32_t)(rnd_u64() % 2001) - 1000;
            for (int64_t m = 1; m <= MMAX; m += (m < 13 ? 1 : 12)) {
                int32_t got[MMAX], want[MMAX];
                tka_kernels_scalar.search->dot_u4(y, z, hb, m, bias, want);
                K->search->dot_u4(y, z, hb, m, bias, got);
                for (int64_t i = 0; i < m; i++) {
                    int64_t direct = -bias;
                    for (int64_t t = 0; t < hb; t++)
                        direct += (int64_t)y[t] * (z[i * hb + t] & 15)
                                + (int64_t)y[hb + t] * (z[i * hb + t] >> 4);
                    CHECK(want[i] == direct, "scalar dot_u4 hb %lld key %lld: %d vs %lld",
                          (long long)hb, (long long)i, want[i], (long long)direct);
                    CHECK(got[i] == want[i],
                          "dot_u4 hb %lld m %lld key %lld trial %d: %d vs scalar %d", (long long)hb, (long long)m, (long long)i, trial, got[i], want[i]);
                }
            }
        }
        free(y);
        free(z);
    }
}

/* The four-query code products: each query's sums exactly the scalar dot_i8's, in every
 * set, for widths on and off the vector blocks and key counts around the four-key steps
 * (the four queries differ, so a mixed-up query or output row shows). */
static void check_dot4_i8(const tka_kernels *K)
{
    const int64_t ds[] = {8, 24, 32, 64, 96, 128, 160, 256};
    enum { MMAX = 23 };
    for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
        const int64_t d = ds[di];
        int16_t *y = malloc((size_t)(4 * d) * sizeof *y);
        int8_t *z = malloc((size_t)(MMAX * d));
        for (int trial = 0; trial < 2; trial++) {
            for (int64_t j = 0; j < 4 * d; j++)
                y[j] = trial == 0 ? (int16_t)((int64_t)(rnd_u64() % 65535) - 32767)
                                  : (int16_t)(rnd_u64() & 1 ? 32767 : -32767);
            for (int64_t j = 0; j < MMAX * d; j++)
                z[j] = trial == 0 ? (int8_t)((int64_t)(rnd_u64() % 255) - 127)
                                  : (int8_t)(rnd_u64() & 1 ? 127 : -127);
            const int16_t *yr[4] = {y, y + d, y + 2 * d, y + 3 * d};
            for (int64_t m = 1; m <= MMAX; m++) {
                int32_t got[4][MMAX], want[MMAX];
                int32_t *o[4] = {got[0], got[1], got[2], got[3]};
                K->search->dot4_i8(yr, z, d, m, o);
                for (int r = 0; r < 4; r++) {
                    tka_kernels_scalar.search->dot_i8(yr[r], z, d, m, want);
                    for (int64_t i = 0; i < m; i++)
                        CHECK(got[r][i] == want[i],
                              "dot4_i8 d %lld m %lld query %d key %lld trial %d: %d vs scalar %d",
                              (long long)d, (long long)m, r, (long long)i, trial, got[r][i],
                              want[i]);
                }
            }
        }
        free(y);
        free(z);
    }
}

/* pv_idx against zeroing the accumulator and one axpy per key, in the same set: the same
 * float64 sums bit for bit, for every value dtype and widths around each vector block. */
static void check_pv_idx(const tka_kernels *K)
{
    const int64_t dvs[] = {1, 3, 4, 7, 8, 15, 16, 31, 33, 64, 65, 100, 128, 130};
    enum { NR = 40, KMAX = 71, LD = 131 };  /* k past two chunks of keys */
    double *x = malloc((size_t)(NR * LD) * sizeof(double));
    float *xf = malloc((size_t)(NR * LD) * sizeof(float));
    uint16_t *xh = malloc((size_t)(NR * LD) * sizeof(uint16_t));
    for (int64_t i = 0; i < NR * LD; i++) {
        x[i] = rnd_norm();
        xf[i] = (float)x[i];
        xh[i] = tka_double_to_half(x[i]);
    }
    const void *src[3] = {xf, x, xh};  /* indexed by tka_dtype */
    int64_t idx[KMAX];
    double w[KMAX], got[LD], want[LD];
    for (size_t di = 0; di < sizeof dvs / sizeof dvs[0]; di++) {
        const int64_t dv = dvs[di];
        for (int64_t k = 0; k <= KMAX; k += (k < 3 ? 1 : k < 30 ? 10 : 4)) {
            for (int64_t t = 0; t < k; t++) {
                idx[t] = (int64_t)(rnd_u64() % NR);
                w[t] = rnd_unif();
            }
            for (int dt = 0; dt < 3; dt++) {
                const size_t es = dt == TKA_F32 ? 4 : dt == TKA_F64 ? 8 : 2;
                memset(want, 0, sizeof want);
                for (int64_t t = 0; t < k; t++)
                    K->axpy[dt]((const char *)src[dt] + (size_t)(idx[t] * LD) * es, dv, w[t], want);
                K->pv_idx[dt](src[dt], LD, idx, w, k, dv, got);
                for (int64_t j = 0; j < dv; j++)
                    CHECK(same_bits(got[j], want[j]), "pv_idx dtype %d dv %lld k %lld col %lld: %.17g vs axpy %.17g",
                          dt, (long long)dv, (long long)k, (long long)j, got[j], want[j]);
            }
        }
    }
    free(x);
    free(xf);
    free(xh);
}

/* exp_keep with the weights given (m from exp_shift) against exp_keep computing them, in
 * the same set: the same outputs bit for bit and the same counts, ties at t included, for
 * float32 and float64 rows and every length around the vector widths. */
static void check_exp_keep(const tka_kernels *K)
{
    enum { NMAX = 140 };
    double x[NMAX], m[NMAX], a[NMAX], b[NMAX];
    float xf[NMAX];
    for (int64_t n = 1; n <= NMAX; n += (n < 40 ? 1 : 17)) {
        for (int64_t i = 0; i < n; i++) {
            x[i] = (double)(rnd_u64() % 9) * 0.5 - 2.0;  /* many ties */
            xf[i] = (float)x[i];
        }
        const double ref = 2.0, t = x[n / 2];
        const void *src[2] = {xf, x};  /* indexed by tka_dtype */
        for (int dt = 0; dt < 2; dt++) {
            int64_t ge1, gt1, ge2, gt2, ge = 0, gt = 0;
            K->exp_shift[dt](src[dt], n, ref, m);
            K->exp_keep[dt](src[dt], n, ref, t, a, &ge1, &gt1, NULL);
            K->exp_keep[dt](src[dt], n, ref, t, b, &ge2, &gt2, m);
            for (int64_t i = 0; i < n; i++) {
                ge += x[i] >= t;
                gt += x[i] > t;
                CHECK(same_bits(a[i], b[i]) && same_bits(a[i], x[i] >= t ? m[i] : 0.0),
                      "exp_keep dtype %d n %lld i %lld: %.17g / %.17g (weight %.17g)", dt,
                      (long long)n, (long long)i, a[i], b[i], m[i]);
            }
            CHECK(ge1 == ge && ge2 == ge && gt1 == gt && gt2 == gt,
                  "exp_keep dtype %d n %lld counts %lld/%lld %lld/%lld, want %lld/%lld", dt,
                  (long long)n, (long long)ge1, (long long)gt1, (long long)ge2, (long long)gt2,
                  (long long)ge, (long long)gt);
        }
    }
}

/* spv_idx against spv over the kept rows gathered into a contiguous block, in the same set:
 * the same blocks of 64 keys and the same float32 sums, bit for bit (k across two blocks). */
static void check_spv_idx(const tka_kernels *K)
{
    const int64_t dvs[] = {1, 3, 8, 15, 16, 17, 31, 32, 33, 64, 65, 100, 128, 130};
    enum { NR = 40, KMAX = 140, LD = 131 };
    float *x = malloc((size_t)(NR * LD) * sizeof(float));
    float *g = malloc((size_t)(KMAX * LD) * sizeof(float));
    for (int64_t i = 0; i < NR * LD; i++) x[i] = (float)rnd_norm();
    int64_t idx[KMAX];
    float w[KMAX];
    double got[LD], want[LD];
    for (size_t di = 0; di < sizeof dvs / sizeof dvs[0]; di++) {
        const int64_t dv = dvs[di];
        for (int64_t k = 0; k <= KMAX; k += (k < 3 ? 1 : k < 60 ? 13 : 7)) {
            for (int64_t t = 0; t < k; t++) {
                idx[t] = (int64_t)(rnd_u64() % NR);
                w[t] = (float)(rnd_unif() + 0x1p-20);
                memcpy(g + t * LD, x + idx[t] * LD, (size_t)dv * sizeof(float));
            }
            K->spv(g, k, LD, w, k, 1, dv, want, dv);
            K->spv_idx(x, LD, idx, w, k, dv, got);
            for (int64_t j = 0; j < dv; j++)
                CHECK(same_bits(got[j], want[j]), "spv_idx dv %lld k %lld col %lld: %.17g vs spv %.17g",
                      (long long)dv, (long long)k, (long long)j, got[j], want[j]);
        }
    }
    free(x);
    free(g);
}

static void check_f16_conversion(const tka_kernels *K)
{
    static uint16_t all[65536 + 7];
    static float got[65536 + 7];
    for (int i = 0; i < 65536 + 7; i++) all[i] = (uint16_t)(i * 40503u); /* odd: a permutation */
    K->f16_to_f32(all, 65536 + 7, got);
    long bad = 0;
    for (int i = 0; i < 65536 + 7; i++) {
        const float want = tka_half_to_float(all[i]);
        const int same = (want != want) ? (got[i] != got[i]) : memcmp(&want, &got[i], 4) == 0;
        bad += !same;
    }
    CHECK(bad == 0, "f16_to_f32: %ld of 65543 values differ from the exact conversion", bad);
}

/* libm-free check of the scalar float16 conversions themselves (set independent) */
static void check_half_functions(void)
{
    long bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const uint32_t e = (h >> 10) & 31, m = h & 1023;
        const double sgn = (h & 0x8000) ? -1.0 : 1.0;
        double want = e == 31 ? (m ? NAN : sgn * INFINITY)
                      : e == 0 ? sgn * ldexp((double)m, -24)
                               : sgn * ldexp((double)(m + 1024), (int)e - 25);
        const float got = tka_half_to_float((uint16_t)h);
        if (want != want ? got == got : (double)got != want || !signbit(got) != !signbit(want)) bad++;
        /* round trip, and rounding of the midpoints to even */
        if (e < 31 && tka_double_to_half(want) != h) bad++;
        if (e < 30 || (e == 30 && m < 1023)) {
            const double next = (h & 0x8000) ? -1.0 : 1.0;
            const double up = (double)tka_half_to_float((uint16_t)(h + 1));
            if (e < 31 && !(h & 0x8000)) {
                const double mid = 0.5 * (want + up);
                const uint16_t r = tka_double_to_half(mid);
                if (r != ((h & 1) ? h + 1 : h)) bad++;
                if (tka_double_to_half(nextafter(mid, 0.0)) != h) bad++;
                if (tka_double_to_half(nextafter(mid, INFINITY)) != h + 1) bad++;
            }
            (void)next;
        }
    }
    CHECK(bad == 0, "float16 scalar conversions: %ld wrong", bad);
    CHECK(tka_double_to_half(65519.99) == 0x7bff && tka_double_to_half(65520.0) == 0x7c00,
          "float16 overflow threshold");
}

/* How many of the n values (float32 if t == 0) lie in [lo, hi]. */
static int64_t ob_band_count(const void *src, int t, int64_t n, double lo, double hi)
{
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) {
        const double v = t ? ((const double *)src)[i] : (double)((const float *)src)[i];
        c += v >= lo && v <= hi;
    }
    return c;
}

static void check_row_kernels(const tka_kernels *K, const tka_kernels *S, const double *x, int64_t n,
                              const char *what)
{
    float *f = malloc((size_t)(n + 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) f[i] = (float)x[i];
    /* sums of n positive terms in another order: within (n - 1) units of rounding */
    const double rsum = fmax(1e-13, 2.0 * (double)(n + 16) * DBL_EPSILON);
    const void *src[2] = {f, x};
    for (int t = 0; t < 2; t++) {
        tka_scan_out a, b;
        K->scan[t](src[t], n, &a);
        S->scan[t](src[t], n, &b);
        CHECK(a.bad == b.bad && a.n_masked == b.n_masked && (a.bad || a.max == b.max), /* +0 == -0 */
              "%s: scan differs (max %.17g/%.17g masked %lld/%lld bad %d/%d)", what, a.max, b.max,
              (long long)a.n_masked, (long long)b.n_masked, a.bad, b.bad);
        if (b.bad) continue;
        const double ts[3] = {b.max, 0.0, -1.0};
        for (int q = 0; q < 3; q++) {
            double ma = K->max_below[t](src[t], n, ts[q]), mb = S->max_below[t](src[t], n, ts[q]);
            CHECK(same_bits(ma, mb), "%s: max_below(%g) %.17g vs %.17g", what, ts[q], ma, mb);
        }
        if (b.max == -INFINITY) continue;
        double *va = malloc((size_t)(n + 8) * 8), *vb = malloc((size_t)(n + 8) * 8);
        int64_t *ia = malloc((size_t)(n + 8) * 8), *ib = malloc((size_t)(n + 8) * 8);
        const double lo = b.max - 3.0, hi = b.max - 0.5;
        for (int cap_case = 0; cap_case < 2; cap_case++) {
            const int64_t cap = cap_case ? n : n / 3;
            tka_band_out oa, ob;
            K->band[t](src[t], n, lo, hi, b.max, 1, va, ia, cap, &oa);
            S->band[t](src[t], n, lo, hi, b.max, 1, vb, ib, cap, &ob);
            const int64_t g = ob.n_band < cap ? ob.n_band : cap;
            CHECK(oa.n_above == ob.n_above && oa.n_band == ob.n_band &&
                      !memcmp(va, vb, (size_t)g * 8) && !memcmp(ia, ib, (size_t)g * 8),
                  "%s: band differs", what);
            CHECK(close_rel(oa.mass_above, ob.mass_above, rsum) &&
                      close_rel(oa.mass_below, ob.mass_below, rsum),
                  "%s: band masses %.17g/%.17g vs %.17g/%.17g", what, oa.mass_above, oa.mass_below,
                  ob.mass_above, ob.mass_below);
        }
        /* k_eps's kernels: the band pass (counts, gathered values, checks) identical, its
         * sums close; lt_sums close and never decreasing with the threshold; range_gather
         * identical */
        {
            double *ma = malloc((size_t)(n + 8) * 8), *mb2 = malloc((size_t)(n + 8) * 8);
            for (int cap_case = 0; cap_case < 2; cap_case++) {
                const int64_t cap = cap_case ? n : n / 3;
                tka_keps_pass_out pa, pb;
                K->keps_pass[t](src[t], n, lo, hi, b.max, va, ma, cap, &pa);
                S->keps_pass[t](src[t], n, lo, hi, b.max, vb, mb2, cap, &pb);
                const int64_t g = pb.n_band < cap ? pb.n_band : cap;
                CHECK(pa.n_above == pb.n_above && pa.n_band == pb.n_band && pa.bad == pb.bad &&
                          same_bits(pa.max, pb.max) && !memcmp(va, vb, (size_t)g * 8),
                      "%s: keps_pass differs", what);
                CHECK(pb.max == b.max && !pb.bad && pb.n_band == ob_band_count(src[t], t, n, lo, hi),
                      "%s: keps_pass max/bad/band count wrong", what);
                int okm = close_rel(pa.mass_above, pb.mass_above, rsum) &&
                          close_rel(pa.mass_below, pb.mass_below, rsum) &&
                          close_rel(pa.mass_total, pb.mass_total, rsum);
                for (int64_t i = 0; i < g; i++) okm &= close_rel(ma[i], mb2[i], 4.0 * DBL_EPSILON);
                CHECK(okm, "%s: keps_pass masses differ", what);
            }
            K->exp_shift[t](src[t], n, b.max, ma);
            double th[TKA_LT_N], sa[TKA_LT_N], sb[TKA_LT_N], ta, tb;
            for (int j = 0; j < TKA_LT_N; j++) th[j] = b.max - 4.0 + 0.5 * j;
            th[TKA_LT_N - 1] = INFINITY;
            K->lt_sums[t](src[t], ma, n, th, sa, &ta);
            S->lt_sums[t](src[t], ma, n, th, sb, &tb);
            int okl = close_rel(ta, tb, rsum);
            for (int j = 0; j < TKA_LT_N; j++)
                okl &= close_rel(sa[j], sb[j], rsum) && (j == 0 || sa[j] >= sa[j - 1]);
            CHECK(okl, "%s: lt_sums differ or decrease", what);
            int64_t bla, blb, want_in = 0, want_below = 0;
            double *mc = malloc((size_t)(n + 8) * 8);
            const int64_t ga = K->range_gather[t](src[t], ma, n, lo, hi, va, mb2, &bla);
            const int64_t gb = S->range_gather[t](src[t], ma, n, lo, hi, vb, mc, &blb);
            for (int64_t i = 0; i < n; i++) {
                const double v = t ? x[i] : (double)f[i];
                want_in += v >= lo && v < hi;
                want_below += v < lo;
            }
            CHECK(ga == gb && bla == blb && ga == want_in && bla == want_below &&
                      !memcmp(va, vb, (size_t)ga * 8) && !memcmp(mb2, mc, (size_t)ga * 8),
                  "%s: range_gather differs", what);
            free(ma);
            free(mb2);
            free(mc);
        }
        /* exp: within 4 ulp of libm's (itself within 1 ulp), flushed below -708 */
        K->exp_shift[t](src[t], n, b.max, va);
        long bad = 0;
        for (int64_t i = 0; i < n; i++) {
            const double d = (t ? x[i] : (double)f[i]) - b.max, want = d < -708.0 ? 0.0 : exp(d);
            if (!(fabs(va[i] - want) <= 4.0 * DBL_EPSILON * want)) bad++;
        }
        CHECK(bad == 0, "%s: exp_shift off by > 4 ulp at %ld of %lld", what, bad, (long long)n);
        double ha, la, hb, lb;
        K->sumexp_split[t](src[t], n, b.max - 1.0, b.max, b.max - 1.0, &ha, &la);
        S->sumexp_split[t](src[t], n, b.max - 1.0, b.max, b.max - 1.0, &hb, &lb);
        CHECK(close_rel(ha, hb, rsum) && close_rel(la, lb, rsum), "%s: sumexp_split differs", what);
        double za, ma, ca, zb, mb, cb;
        K->sumexp_moment[t](src[t], n, b.max, &za, &ma, &ca);
        S->sumexp_moment[t](src[t], n, b.max, &zb, &mb, &cb);
        CHECK(close_rel(za, zb, rsum) && ca == cb && fabs(ma - mb) <= 10 * rsum * (fabs(mb) + za + 1.0),
              "%s: sumexp_moment differs", what);
        free(va);
        free(vb);
        free(ia);
        free(ib);
    }
    free(f);
}

/* dot, dot4 and axpy of every dtype against long double sums of the exact values */
static void check_dot_kernels(const tka_kernels *K, int64_t n, int64_t d)
{
    const int64_t dpad = (d + 7) / 8 * 8, ld = d + 3;
    double *kd = malloc((size_t)(n * ld) * 8), *q = calloc((size_t)(4 * dpad), 8);
    float *kf = malloc((size_t)(n * ld) * 4);
    uint16_t *kh = malloc((size_t)(n * ld) * 2);
    double *out = malloc((size_t)(4 * n + 4) * 8), *acc = malloc((size_t)d * 8 + 8);
    for (int64_t i = 0; i < n * ld; i++) {
        const double v = rnd_norm() * (rnd_unif() < 0.05 ? 1e3 : 1.0);
        kh[i] = tka_double_to_half(v);
        kf[i] = tka_half_to_float(kh[i]); /* the same values in all three dtypes */
        kd[i] = kf[i];
    }
    for (int m = 0; m < 4; m++)
        for (int64_t j = 0; j < d; j++) q[m * dpad + j] = rnd_norm();
    const void *src[3] = {kf, kd, kh};
    long bad = 0, differ = 0;
    double first[3][8];
    for (int t = 0; t < 3; t++) {
        K->dot4[t](src[t], n, ld, q, dpad, d, 0.5, out, n);
        for (int m = 0; m < 4; m++)
            for (int64_t i = 0; i < n; i++) {
                long double s = 0.0L, mag = 0.0L;
                for (int64_t j = 0; j < d; j++) {
                    s += (long double)q[m * dpad + j] * kd[i * ld + j];
                    mag += fabsl((long double)q[m * dpad + j] * kd[i * ld + j]);
                }
                const double got = out[m * n + i];
                if (!(fabsl((long double)got - 0.5L * s) <= (d + 2) * DBL_EPSILON * 0.5L * mag + 1e-300L)) bad++;
                if (m == 0 && i < 8) first[t][i] = got;
            }
        K->dot[t](src[t], n, ld, q, d, 0.5, out);
        for (int64_t j = 0; j < d; j++) acc[j] = 1.0;
        K->axpy[t](src[t], d, 0.25, acc);
        for (int64_t j = 0; j < d; j++)
            if (!same_bits(acc[j], 1.0 + 0.25 * kd[j]) &&
                !(fabs(acc[j] - (1.0 + 0.25 * kd[j])) <= 2 * DBL_EPSILON * (1.0 + fabs(0.25 * kd[j]))))
                bad++;
    }
    /* the three dtypes hold the same values: identical results */
    for (int64_t i = 0; i < n && i < 8; i++)
        differ += !same_bits(first[0][i], first[1][i]) || !same_bits(first[0][i], first[2][i]);
    CHECK(bad == 0, "dot/dot4/axpy (n %lld, d %lld): %ld results outside the error bound",
          (long long)n, (long long)d, bad);
    CHECK(differ == 0, "dot4 (d %lld): float16/float32/float64 of the same values differ",
          (long long)d);
    free(kd);
    free(q);
    free(kf);
    free(kh);
    free(out);
    free(acc);
}

/* ------------------------------------------------------------------ attention */

typedef struct {
    int64_t L, n, d, dv;
    double *q, *k, *v; /* float64 values (exact in every dtype) */
} attn_data;

static void attn_make(attn_data *A, int64_t L, int64_t n, int64_t d, int64_t dv, double spread)
{
    A->L = L, A->n = n, A->d = d, A->dv = dv;
    A->q = malloc((size_t)(L * d) * 8);
    A->k = malloc((size_t)(n * d) * 8);
    A->v = malloc((size_t)(n * dv) * 8);
    double *all[3] = {A->q, A->k, A->v};
    const int64_t cnt[3] = {L * d, n * d, n * dv};
    for (int a = 0; a < 3; a++)
        for (int64_t i = 0; i < cnt[a]; i++)
            all[a][i] = tka_half_to_float(tka_double_to_half((a == 0 ? spread : 1.0) * rnd_norm()));
    if (n > 3) /* ties between keys */
        for (int64_t j = 0; j < d; j++) A->k[3 * d + j] = A->k[1 * d + j];
}

static void *attn_cast(const double *x, int64_t cnt, tka_dtype dt)
{
    const size_t es = dt == TKA_F64 ? 8 : dt == TKA_F32 ? 4 : 2;
    char *p = malloc((size_t)cnt * es + 8);
    for (int64_t i = 0; i < cnt; i++) {
        if (dt == TKA_F64) ((double *)p)[i] = x[i];
        else if (dt == TKA_F32) ((float *)p)[i] = (float)x[i];
        else ((uint16_t *)p)[i] = tka_double_to_half(x[i]);
    }
    return p;
}

typedef struct {
    double *out64;   /* outputs as float64 */
    int64_t *k;
    double *tau;
    int64_t **idx;
    tka_status st;
} attn_res;

static void attn_run(const attn_data *A, tka_dtype dt, int topk, double eps, attn_res *r)
{
    const size_t es = dt == TKA_F64 ? 8 : dt == TKA_F32 ? 4 : 2;
    void *q = attn_cast(A->q, A->L * A->d, dt), *k = attn_cast(A->k, A->n * A->d, dt),
         *v = attn_cast(A->v, A->n * A->dv, dt);
    const int64_t off = 0;
    tka_attn a = {dt, 1, A->L, A->n, A->d, A->dv, q, k, v, &off, &off, &off,
                  (int64_t)(A->d * es), (int64_t)(A->d * es), (int64_t)(A->dv * es),
                  NULL, NULL, 0, 0, 1.0 / sqrt((double)A->d)};
    void *out = malloc((size_t)(A->L * A->dv) * es + 8);
    tka_error err;
    r->k = calloc((size_t)A->L, 8);
    r->tau = calloc((size_t)A->L, 8);
    r->idx = calloc((size_t)A->L, sizeof(int64_t *));
    r->out64 = malloc((size_t)(A->L * A->dv) * 8);
    if (topk) {
        double *e = malloc((size_t)A->L * 8);
        for (int64_t i = 0; i < A->L; i++) e[i] = eps;
        r->st = tka_topk_attention(&a, NULL, e, out, r->k, r->tau, r->idx, &err);
        free(e);
    } else {
        r->st = tka_attention(&a, out, &err);
    }
    for (int64_t i = 0; i < A->L * A->dv; i++)
        r->out64[i] = dt == TKA_F64 ? ((double *)out)[i]
                      : dt == TKA_F32 ? (double)((float *)out)[i]
                                      : (double)tka_half_to_float(((uint16_t *)out)[i]);
    free(q);
    free(k);
    free(v);
    free(out);
}

static void attn_free(attn_res *r, int64_t L)
{
    for (int64_t i = 0; i < L; i++) tka_free(r->idx[i]);
    free(r->idx);
    free(r->k);
    free(r->tau);
    free(r->out64);
}

static long g_attn_rows;

static void check_attention(const attn_data *A, tka_simd set)
{
    const tka_dtype dts[3] = {TKA_F64, TKA_F32, TKA_F16};
    /* dense against a long double reference (float64 output: 1e-12 relative to |v|max) */
    for (int t = 0; t < 3; t++) {
        attn_res r;
        attn_run(A, dts[t], 0, 0.0, &r);
        CHECK(r.st == TKA_OK, "attention status %d", r.st);
        long bad = 0;
        for (int64_t l = 0; l < A->L; l++) {
            long double *s = malloc((size_t)A->n * sizeof(long double)), mx = -INFINITY, z = 0;
            for (int64_t i = 0; i < A->n; i++) {
                long double dot = 0;
                for (int64_t j = 0; j < A->d; j++) dot += (long double)A->q[l * A->d + j] * A->k[i * A->d + j];
                s[i] = dot / sqrtl((long double)A->d);
                if (s[i] > mx) mx = s[i];
            }
            for (int64_t i = 0; i < A->n; i++) z += s[i] = expl(s[i] - mx);
            for (int64_t c = 0; c < A->dv; c++) {
                long double o = 0;
                for (int64_t i = 0; i < A->n; i++) o += s[i] * A->v[i * A->dv + c];
                o /= z;
                const double got = r.out64[l * A->dv + c];
                const double tol = (dts[t] == TKA_F64 ? 1e-12 : dts[t] == TKA_F32 ? 1.2e-7 : 1e-3) +
                                   (double)ref_slack(A->n);
                if (!(fabsl((long double)got - o) <= tol * (fabsl(o) + 4.0L))) bad++;
            }
            free(s);
        }
        CHECK(bad == 0, "attention (L %lld n %lld d %lld dtype %d): %ld outputs off the reference",
              (long long)A->L, (long long)A->n, (long long)A->d, dts[t], bad);
        attn_free(&r, A->L);
    }
    /* Top-k by eps: the kept sets of each set equal the scalar set's; float16 operands are
     * scored in float64 and give the float64 results (k, tau, indices bit for bit; the output
     * is the same float64 value rounded once to float16); float32 problems accumulate their
     * scores in float32 lanes, so their outputs are only close to the float64 ones */
    const double epss[3] = {1e-9, 1e-3, 0.2};
    for (int e = 0; e < 3; e++) {
        attn_res r[3], s;
        for (int t = 0; t < 3; t++) attn_run(A, dts[t], 1, epss[e], &r[t]);
        tka_simd_select(TKA_SIMD_SCALAR);
        attn_run(A, TKA_F64, 1, epss[e], &s);
        tka_simd_select(set);
        long diff_set = 0, diff_f16 = 0, diff_f32 = 0;
        for (int64_t l = 0; l < A->L; l++) {
            diff_set += r[0].k[l] != s.k[l] ||
                        memcmp(r[0].idx[l], s.idx[l], (size_t)s.k[l] * 8) != 0 ||
                        !close_rel(r[0].tau[l], s.tau[l], 1e-12);
            diff_f16 += r[2].k[l] != r[0].k[l] || !same_bits(r[2].tau[l], r[0].tau[l]) ||
                        memcmp(r[2].idx[l], r[0].idx[l], (size_t)r[0].k[l] * 8) != 0;
            for (int64_t c = 0; c < A->dv; c++) {
                const double o64 = r[0].out64[l * A->dv + c];
                diff_f16 += !same_bits(r[2].out64[l * A->dv + c],
                                       (double)tka_half_to_float(tka_double_to_half(o64)));
                /* the same kept set: the float32 output within float32 rounding of it */
                if (r[1].k[l] == r[0].k[l] &&
                    memcmp(r[1].idx[l], r[0].idx[l], (size_t)r[0].k[l] * 8) == 0)
                    diff_f32 += !(fabs(r[1].out64[l * A->dv + c] - o64) <= 1e-5 * (fabs(o64) + 4.0));
            }
        }
        g_attn_rows += A->L;
        CHECK(diff_set == 0, "topk attention eps %g: %ld rows differ from scalar", epss[e], diff_set);
        CHECK(diff_f16 == 0, "topk attention eps %g: %ld float16/float64 differences", epss[e],
              diff_f16);
        CHECK(diff_f32 == 0, "topk attention eps %g: %ld float32 outputs off the float64 ones",
              epss[e], diff_f32);
        for (int t = 0; t < 3; t++) attn_free(&r[t], A->L);
        attn_free(&s, A->L);
    }
}

/* ------------------------------------------------------------------ certified search */

static long g_search_rows, g_search_k_differ;

static void check_search(tka_simd set, int64_t n, int64_t d, tka_dtype dt, int64_t bs, int four)
{
    const int64_t H = 1, cb = (n + bs - 1) / bs, L = 6;
    const size_t es = dt == TKA_F64 ? 8 : dt == TKA_F32 ? 4 : 2;
    double *kv = malloc((size_t)(n * d) * 8);
    for (int64_t i = 0; i < n * d; i++)
        kv[i] = tka_half_to_float(tka_double_to_half(rnd_norm() + (i / d % 7 == 0 ? 2.0 : 0.0)));
    void *keys = attn_cast(kv, n * d, dt);
    int64_t *perm = malloc((size_t)n * 8);
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    float *lo = malloc((size_t)(cb * d) * 4), *hi = malloc((size_t)(cb * d) * 4),
          *ctr = malloc((size_t)(cb * d) * 4), *pscale = malloc((size_t)n * 4),
          *perr = malloc((size_t)n * 4);
    double *rad = malloc((size_t)cb * 8), maxabs = 0.0;
    /* int8 proxies, or 4-bit ones (four) */
    int8_t *pz = four ? NULL : malloc((size_t)(n * d));
    uint8_t *pz4 = four ? malloc((size_t)(n * ((d + 1) / 2))) : NULL;
    tka_key_index ix = {.heads = H, .n = n, .cap = n, .d = d, .block_size = bs,
                        .cap_blocks = cb, .dtype = dt, .keys = keys, .perm = perm,
                        .summary = TKA_SUM_MINMAX | TKA_SUM_BALL, .lo = lo, .hi = hi,
                        .ctr = ctr, .rad = rad, .pz = pz, .pz4 = pz4, .pscale = pscale,
                        .perr = perr, .maxabs = &maxabs};
    tka_key_index_out o = {.lo = lo, .hi = hi, .ctr = ctr, .rad = rad, .pz = pz, .pz4 = pz4,
                           .pscale = pscale, .perr = perr, .maxabs = &maxabs};
    tka_error err;
    CHECK(tka_index_fill(&ix, &o, 0, &err) == TKA_OK, "index_fill");
    double *q = malloc((size_t)(L * d) * 8), eps[6] = {1e-9, 1e-6, 1e-3, 0.05, 0.3, 0.01};
    for (int64_t i = 0; i < L * d; i++) q[i] = 1.5 * rnd_norm();
    const double scale = 1.0 / sqrt((double)d);
    tka_search_args sa;
    memset(&sa, 0, sizeof sa);
    sa.q = q, sa.L = L, sa.scale = scale, sa.eps = eps, sa.method = TKA_SEARCH_DELTA;
    sa.use_proxy = 1;
    tka_search_row mine[6], ref[6];
    memset(mine, 0, sizeof mine);
    memset(ref, 0, sizeof ref);
    CHECK(tka_search(&ix, &sa, mine, NULL, &err) == TKA_OK, "search status");
    tka_simd_select(TKA_SIMD_SCALAR);
    CHECK(tka_search(&ix, &sa, ref, NULL, &err) == TKA_OK, "search status (scalar)");
    tka_simd_select(set);
    for (int64_t l = 0; l < L; l++) {
        /* exact logits (long double; the certificate covers the real q'.k) and the exact
         * tail of the returned set */
        long double *s = malloc((size_t)n * sizeof(long double)), mx = -INFINITY, z = 0, zk = 0;
        char *kept = calloc((size_t)n, 1);
        for (int64_t i = 0; i < n; i++) {
            long double t = 0;
            for (int64_t j = 0; j < d; j++) t += (long double)(scale * q[l * d + j]) * kv[i * d + j];
            s[i] = t;
            if (t > mx) mx = t;
        }
        for (int64_t t = 0; t < mine[l].k; t++) kept[mine[l].idx[t]] = 1;
        for (int64_t i = 0; i < n; i++) {
            long double e = expl(s[i] - mx);
            z += e;
            if (kept[i]) zk += e;
        }
        const long double tau = (z - zk) / z;
        CHECK((long double)mine[l].tv_bound >= tau * (1.0L - 1e-15L - ref_slack(n)) &&
                  mine[l].tv_bound <= eps[l],
              "search (n %lld d %lld dtype %d) row %lld: tv_bound %.17g below the exact tail %.17Lg "
              "or above eps %g", (long long)n, (long long)d, dt, (long long)l, mine[l].tv_bound, tau,
              eps[l]);
        g_search_k_differ += mine[l].k != ref[l].k ||
                             memcmp(mine[l].idx, ref[l].idx, (size_t)ref[l].k * 8) != 0;
        g_search_rows++;
        free(s);
        free(kept);
        free(mine[l].idx);
        free(ref[l].idx);
    }
    (void)es;
    free(kv);
    free(keys);
    free(perm);
    free(lo);
    free(hi);
    free(ctr);
    free(pscale);
    free(perr);
    free(rad);
    free(pz);
    free(pz4);
    free(q);
}

/* ------------------------------------------------------------------ driver */

int main(int argc, char **argv)
{
    const int quick = argc > 1 && !strcmp(argv[1], "--quick");
    check_half_functions();
    tka_set_num_threads(2);
    const int64_t lengths[] = {1,  2,  3,  4,  5,  6,  7,  8,   9,   10,   11,   12,   13,    14,
                               15, 16, 17, 18, 19, 23, 31, 33,  63,  127,  128,  129,  257,   1023,
                               1025, 2048, 4097, 16385, 65536, 70001};
    const int nlen = sizeof lengths / sizeof lengths[0];
    const tka_kernels *S = &tka_kernels_scalar;
    int sets_run = 0;
    for (int set = 0; set < TKA_SIMD_COUNT; set++) {
        if (!tka_simd_supported((tka_simd)set)) continue;
        if (!select_set((tka_simd)set)) continue;
        const tka_kernels *K = tka_kernels_active();
        const long c0 = g_checks, f0 = g_fail;
        long rows = 0, kernel_rows = 0;
        g_attn_rows = g_search_rows = g_search_k_differ = 0;
        check_f16_conversion(K);
        check_dot_i8(K);
        check_dot4_i8(K);
        check_dot_u4(K);
        check_pv_idx(K);
        check_spv_idx(K);
        check_exp_keep(K);
#ifdef TKA_HAVE_X86
        if (set == TKA_SIMD_AVX512) {  /* also without VNNI, where the CPU has it */
            tka_avx512vnni_disable(1);
            check_dot_i8(K);
            check_dot4_i8(K);
            tka_avx512vnni_disable(0);
        }
#endif
        for (int kind = 0; kind < K_KINDS; kind++) {
            for (int li = 0; li < nlen; li++) {
                const int64_t n = lengths[li];
                if (quick && n > 5000) continue;
                if (n > 5000 && (kind == K_SUBNORMAL || kind == K_EQUAL || kind == K_ONE_LIVE)) continue;
                double *x = malloc((size_t)(n + 1) * sizeof(double));
                g_rng = 0x1234567ull * (uint64_t)(kind + 1) + (uint64_t)n; /* same rows per set */
                make_row(kind, n, x);
                char what[96];
                row_t r[3];
                const tka_dtype dts[3] = {TKA_F64, TKA_F32, TKA_F16};
                row_res res[3];
                for (int t = 0; t < 3; t++) {
                    /* every other length is stored with a stride (a gathered copy) */
                    row_make(&r[t], x, n, dts[t], (n % 2) ? 2 : 1);
                    snprintf(what, sizeof what, "%s n=%lld %s", kind_name[kind], (long long)n,
                             t == 0 ? "f64" : t == 1 ? "f32" : "f16");
                    row_run(&r[t], &res[t]);
                    /* the set against scalar */
                    tka_simd_select(TKA_SIMD_SCALAR);
                    row_res sres;
                    row_run(&r[t], &sres);
                    select_set((tka_simd)set);
                    compare_sets(&res[t], &sres, what);
                    res_free(&sres);
                    /* against the reference of the stored values */
                    ref_t R;
                    ref_make(&R, r[t].val, n);
                    if (n <= 5000 || kind == K_GAUSS || kind == K_MASKED || kind == K_HUGE_RANGE)
                        compare_ref(&res[t], &R, what);
                    ref_free(&R);
                    rows++;
                }
                /* float16 rows: the float32 results on the same values, bit for bit */
                row_t r32;
                row_make(&r32, r[2].val, n, TKA_F32, 1);
                row_res res32;
                row_run(&r32, &res32);
                snprintf(what, sizeof what, "%s n=%lld f16 vs f32", kind_name[kind], (long long)n);
                compare_exact(&res[2], &res32, what);
                res_free(&res32);
                row_free(&r32);
                if (set != TKA_SIMD_SCALAR) {
                    snprintf(what, sizeof what, "%s n=%lld kernels", kind_name[kind], (long long)n);
                    check_row_kernels(K, S, x, n, what);
                    kernel_rows++;
                }
                for (int t = 0; t < 3; t++) {
                    res_free(&res[t]);
                    row_free(&r[t]);
                }
                free(x);
            }
        }
        for (int64_t d = 1; d <= 19; d++) check_dot_kernels(K, 13, d);
        check_dot_kernels(K, 5, 64);
        check_dot_kernels(K, 9, 129);
        g_rng = 77;
        const int64_t shapes[][4] = {{5, 7, 3, 2}, {9, 33, 8, 5}, {4, 300, 64, 16}, {7, 1500, 17, 3}};
        for (int i = 0; i < 4; i++) {
            attn_data A;
            attn_make(&A, shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3], i == 3 ? 6.0 : 2.0);
            check_attention(&A, (tka_simd)set);
            free(A.q);
            free(A.k);
            free(A.v);
        }
        g_rng = 99;
        const tka_dtype sdts[3] = {TKA_F64, TKA_F32, TKA_F16};
        for (int t = 0; t < 3; t++) {
            /* groups of queries over at most 1024 keys are scored in full at once; over
             * more, each group streams or switches on its sample */
            check_search((tka_simd)set, 700, 16, sdts[t], 32, 0);
            check_search((tka_simd)set, quick ? 900 : 5000, 37, sdts[t], 64, 0);
            check_search((tka_simd)set, 2100, 24, sdts[t], 32, 0);
            check_search((tka_simd)set, quick ? 900 : 5000, 37, sdts[t], 64, 1);
            check_search((tka_simd)set, 2100, 128, sdts[t], 32, 1);
        }
        printf("set %-7s rows %ld (x %d eps, %d k: k_eps/top-k/tail/5 certificates)"
               ", kernel rows %ld, attention rows %ld, search rows %ld (kept sets differing "
               "from scalar: %ld): %ld checks, %ld failed\n",
               g_set, rows, NEPS, NK, kernel_rows, g_attn_rows, g_search_rows, g_search_k_differ,
               g_checks - c0, g_fail - f0);
        sets_run++;
    }
    printf("%s: %d kernel sets, %ld checks, %ld failed\n", g_fail ? "FAILED" : "ok", sets_run,
           g_checks, g_fail);
    return g_fail ? 1 : 0;
}
