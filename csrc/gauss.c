/*
 * gauss.c - Gaussian score model (docs/design.md §5).
 *
 * Scores i.i.d. N(mu, sigma^2); top fraction rho has threshold z = Phi_c^{-1}(rho) and
 * discarded softmax mass tau(rho) = Phi(Phi_c^{-1}(rho) - sigma), because tilting the
 * standard normal density by e^{sigma z} gives e^{sigma^2/2} phi(z - sigma). Hence the
 * asymptotic design rule k_eps/n = Phi_c(sigma + Phi^{-1}(eps)) (finite_n = 0).
 *
 * Accuracy (against 50-digit references over the ranges below, double inputs taken as exact):
 *   Phi, Phi_c          x in [-37, 37]                    max rel. error 4.6e-16
 *   Phi^{-1}, Phi_c^{-1} p in [1e-300, 1 - 1e-16]         max rel. error 3.9e-16
 *   tail mass           rho in (0, 1), sigma in [0, 10]   max rel. error 3.3e-15
 *   rule fraction       eps in [1e-12, 1), sigma in [0,10] max rel. error 2.6e-15
 * The tail-mass and rule figures are at the conditioning limit of Phi at the final
 * argument w (relative sensitivity ~|w|), given a Phi_c that is itself good to a few ulps.
 *
 * ------------------------------------------------------------------ finite-n k_eps
 * Why the rule drifts. The rule integrates the tilted density e^{sigma^2/2} phi(z - sigma)
 * over all z, i.e. it assumes the sample reaches well past z = sigma. A row of n scores
 * stops near its maximum b ~ Phi_c^{-1}(1/n) ~ sqrt(2 ln n) (4.3 at n = 1e5). Once sigma
 * is comparable to b, the part of the tilted mass above b is simply absent: the softmax
 * normaliser is smaller and is carried by a handful of top order statistics, so more
 * keys are needed for the same eps than the rule says (at n = 1e5, sigma = 4, eps = 0.1
 * the median k_eps/n is 0.0053 against the rule's 0.0033). For sigma <= 2 the missing
 * mass Phi_c(b - sigma) is negligible and both agree.
 *
 * Method: the "typical row". Replace the random order statistics by deterministic
 * quantiles, z_i = Phi_c^{-1}((i - a)/(n + 1 - 2a)), i = 1..n, evaluate the discarded mass
 * tau(k) = sum_{i>k} e^{sigma z_i} / sum_i e^{sigma z_i} exactly on that row and return
 * the smallest integer k with tau(k) <= eps. k_eps of a row is a monotone functional of
 * its order statistics, so evaluating it at central (quantile-type) positions of those
 * statistics targets the median of k_eps rather than a mean. It keeps the discreteness of
 * the top ranks, which is exactly what drives the drift, and reduces to the rule as
 * n -> infinity (the sum becomes the integral of the rule). The plotting-position
 * constant is Gringorten's a = 0.44, the position derived for the extremes of samples in
 * the Gumbel domain of attraction, to which the normal belongs; the top ranks are the
 * ones that matter here.
 *
 * Alternatives measured on the same simulation (medians over 4001/2001/1001/401 rows at
 * n = 1e3/1e4/1e5/1e6, sigma in {0.5,1,2,3,4,5}, eps in {1e-1,1e-2,1e-3}; mean / max of
 * |predicted - median| / median over the 72 cells):
 *   asymptotic rule                                     18.4% / 98.6%
 *   typical row, Blom a = 3/8                            1.7% / 14.3% (mean bias +2.6%, sigma >= 3)
 *   typical row, Hazen a = 1/2                           1.9% / 28.6% (mean bias -3.7%, sigma >= 3)
 *   typical row, Gringorten a = 0.44 (chosen)            0.8% / 14.3% (mean bias -0.3%, sigma >= 3)
 *   truncated Gaussian, Phi(z - sigma)/Phi(b - sigma)
 *     with b = Phi_c^{-1}(c/n), c = ln 2 (median max)   10.2% / 61.6%
 *     with c = 1/8 (continuum limit of Blom)             3.0% / 41.9%
 * The truncated closed form treats the top ranks as a continuum and underestimates
 * k_eps badly at small n and large sigma, where a few discrete top scores carry the mass.
 * The largest remaining error of the chosen method is at n = 1e3, sigma = 5, eps = 0.1,
 * where the median k_eps is 7 and the prediction 6: integer granularity, with the
 * interquartile range of k_eps spanning 3..12. Benchmark (benchmarks/bench_gaussian.py,
 * 4001/2001/601/301 rows): finite-n |rel. error| median 0.14%, mean 0.77%, max 14.3%
 * (apart from that cell, max 5.3% at n = 1e4, sigma = 5, eps = 0.1, where the median is
 * 19 keys); rule median 0.80%, mean 18.3%, max 98.6%. For sigma <= 3 the finite-n
 * predictor is within 1.7% of the median at every n (at sigma = 3 it sits 0.1..1.6% above
 * it, the rule 0.25..30% below); for sigma <= 1 it is within 0.01%.
 *
 * Evaluation in O(log n): the TOP_EXACT highest and lowest ranks are summed term by
 * term; the middle ranks j+1..M (M = n - TOP_EXACT) by the midpoint rule with its first
 * Euler-Maclaurin correction,
 *   sum_{i=j+1}^{M} f(i) = int_{j+1/2}^{M+1/2} f(t) dt - [f'(M+1/2) - f'(j+1/2)]/24,
 * where in u = (t - a)/D the integral is closed form:
 *   int e^{sigma z(t)} dt = D e^{sigma^2/2} [Phi(z(j+1/2) - sigma) - Phi(z(M+1/2) - sigma)],
 * computed in logs so large sigma cannot overflow. The smallest k is found by bisection
 * over integers (~log2 n steps). On 1464 test cases (n = 1..1e6, sigma up to 50, eps down
 * to 1e-12) and 210 more with eps down to 1e-300 the result equals the O(n) term-by-term
 * evaluation exactly. Cost ~10-15 us per call at n = 1e6, <= ~60 us for any n.
 *
 * Conventions of tka_gaussian_k_eps (finite_n = 1): n is truncated to an integer; the
 * result is an integer in [1, n]; sigma = 0 gives n - floor(eps n) exactly (tau(k) =
 * (n - k)/n); n = 1, sigma > SIGMA_CAP or sigma = +inf give 1 (the maximum holds all the
 * mass). finite_n = 0: real n Phi_c(sigma + Phi^{-1}(eps)) clipped to [0, n]; sigma = 0
 * gives n (1 - eps), sigma = +inf gives 0. Both return NaN for n < 1, n = inf or NaN,
 * sigma < 0 or NaN, eps outside (0, 1) or NaN.
 */

#include "topkattn.h"

#include <math.h>

/* ------------------------------------------------------------------ constants */

/* 1/sqrt(2) split as hi + lo (hi = nearest double, lo = remainder). */
#define INV_SQRT2_HI 0.70710678118654757274  /* 0x1.6a09e667f3bcdp-1 */
#define INV_SQRT2_LO (-4.8336466567264567e-17)
/* 2/sqrt(pi), 1/sqrt(2 pi) */
#define TWO_OVER_SQRTPI 1.1283791670955125739
#define INV_SQRT_2PI 0.39894228040143267794

/* ------------------------------------------------------- Phi and Phi_c (§5)
 *
 * Phi_c(x) = erfc(x/sqrt2)/2. libm's erfc is accurate to a few ulps, but rounding the
 * argument x/sqrt2 to double perturbs it by up to |t|*2^-53, and d log erfc(t)/dt ~ -2t,
 * so deep in the tail (t ~ 26 at x = -37) the rounding alone costs ~2t^2*2^-53 ~ 1.5e-13
 * relative. We therefore carry the exact argument as t_hi + t_lo (fma gives the product
 * error exactly; fma is used rather than a Veltkamp split so that compilers contracting
 * a*b+c cannot break it) and apply the first-order correction
 *     erfc(t_hi + t_lo) = erfc(t_hi) - (2/sqrt(pi)) exp(-t_hi^2) t_lo + O(t_lo^2).
 * The correction is ~1e-13 relative at most, so its own rounding (exp(-t^2) is only good
 * to ~t^2 ulps) is irrelevant. An optional extra low part x_lo of the input (from
 * double-double intermediate results) enters the same correction.
 */

/* t = (x + xlo)/sqrt2 as hi + lo */
static void scale_inv_sqrt2(double x, double xlo, double *hi, double *lo)
{
    double h = x * INV_SQRT2_HI;
    double e = fma(x, INV_SQRT2_HI, -h);
    *hi = h;
    *lo = e + x * INV_SQRT2_LO + xlo * INV_SQRT2_HI;
}

/* erfc(th + tl), |tl| << |th| */
static double erfc2(double th, double tl)
{
    double r = erfc(th);
    if (tl != 0.0 && isfinite(th))
        r -= TWO_OVER_SQRTPI * exp(-th * th) * tl;
    return r;
}

/* Phi_c(x + xlo) */
static double norm_sf2(double x, double xlo)
{
    if (isnan(x)) return x;
    if (isinf(x)) return x > 0 ? 0.0 : 1.0;
    double th, tl;
    scale_inv_sqrt2(x, xlo, &th, &tl);
    return 0.5 * erfc2(th, tl);
}

/* Phi(x + xlo) = Phi_c(-(x + xlo)) */
static double norm_cdf2(double x, double xlo) { return norm_sf2(-x, -xlo); }

double tka_norm_cdf(double x) { return norm_sf2(-x, 0.0); }
double tka_norm_sf(double x) { return norm_sf2(x, 0.0); }

/* ------------------------------------------------------- Phi^{-1} and Phi_c^{-1} (§5)
 *
 * Initial value from the rational approximations of Wichura, "Algorithm AS 241: The
 * percentage points of the normal distribution", Appl. Statist. 37 (1988) 477-484
 * (coefficients of PPND16, ~1e-16 relative), then one Halley step on
 * g(x) = Phi_c(x) - p with the compensated Phi_c above. The step uses the side of the
 * distribution where the argument is small (p <= 1/2 always, by symmetry; 1 - p is exact
 * for p >= 1/2), so tiny tail probabilities keep full relative accuracy. Near the centre
 * the residual is formed as q - erf(x/sqrt2)/2 with q = 1/2 - p (exact for p in
 * [1/4, 1/2]) so that x ~ 2.5 q keeps relative accuracy even when q is 1e-300.
 * The Halley correction u/(1 - x u/2) is returned separately as a low part so callers
 * that feed x into Phi again (tail mass, the k_eps rule) do not pay the rounding of x,
 * which deep in the tail is amplified by ~|x|^2.
 */

static const double AS241_A[8] = {
    3.3871328727963666080e0, 1.3314166789178437745e+2, 1.9715909503065514427e+3,
    1.3731693765509461125e+4, 4.5921953931549871457e+4, 6.7265770927008700853e+4,
    3.3430575583588128105e+4, 2.5090809287301226727e+3};
static const double AS241_B[8] = {
    1.0, 4.2313330701600911252e+1, 6.8718700749205790830e+2, 5.3941960214247511077e+3,
    2.1213794301586595867e+4, 3.9307895800092710610e+4, 2.8729085735721942674e+4,
    5.2264952788528545610e+3};
static const double AS241_C[8] = {
    1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0,
    3.64784832476320460504e0, 1.27045825245236838258e0, 2.41780725177450611770e-1,
    2.27238449892691845833e-2, 7.74545014278341407640e-4};
static const double AS241_D[8] = {
    1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
    1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4,
    1.05075007164441684324e-9};
static const double AS241_E[8] = {
    6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0,
    2.96560571828504891230e-1, 2.65321895265761230930e-2, 1.24266094738807843860e-3,
    2.71155556874348757815e-5, 2.01033439929228813265e-7};
static const double AS241_F[8] = {
    1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
    7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7,
    2.04426310338993978564e-15};

static double poly7(const double c[8], double x)
{
    double r = c[7];
    for (int i = 6; i >= 0; --i) r = r * x + c[i];
    return r;
}

/* x >= 0 with Phi_c(x) = p for 0 < p <= 1/2; result x + *lo. */
static double isf_half(double p, double *lo)
{
    double q = 0.5 - p;
    double x, g;
    if (q <= 0.425) {
        double r = 0.180625 - q * q;
        x = q * poly7(AS241_A, r) / poly7(AS241_B, r);
        double th, tl;
        scale_inv_sqrt2(x, 0.0, &th, &tl);
        /* erf(th + tl) to first order */
        double e = erf(th) + TWO_OVER_SQRTPI * exp(-th * th) * tl;
        g = q - 0.5 * e;
    } else {
        double r = sqrt(-log(p));
        if (r <= 5.0) {
            r -= 1.6;
            x = poly7(AS241_C, r) / poly7(AS241_D, r);
        } else {
            r -= 5.0;
            x = poly7(AS241_E, r) / poly7(AS241_F, r);
        }
        g = norm_sf2(x, 0.0) - p;
    }
    double phi = INV_SQRT_2PI * exp(-0.5 * x * x);
    double u = (phi > 0.0) ? g / phi : 0.0;
    *lo = u / (1.0 - 0.5 * x * u);
    return x;
}

/* Phi_c^{-1}(p) as hi + lo; p must be in [0, 1] (not NaN). */
static double norm_isf2(double p, double *lo)
{
    *lo = 0.0;
    if (p <= 0.0) return INFINITY;
    if (p >= 1.0) return -INFINITY;
    if (p <= 0.5) return isf_half(p, lo);
    double x = isf_half(1.0 - p, lo);
    *lo = -*lo;
    return -x;
}

double tka_norm_isf(double p)
{
    if (!(p >= 0.0 && p <= 1.0)) return NAN;
    double lo, hi = norm_isf2(p, &lo);
    return hi + lo;
}

double tka_norm_ppf(double p)
{
    if (!(p >= 0.0 && p <= 1.0)) return NAN;
    double lo, hi = norm_isf2(p, &lo);
    return -(hi + lo);
}

/* s + *lo = a + b exactly (TwoSum) */
static double two_sum(double a, double b, double *lo)
{
    double s = a + b;
    double bb = s - a;
    *lo = (a - (s - bb)) + (b - bb);
    return s;
}

/* ------------------------------------------------------- tail mass (§5)
 * tau(rho) = Phi(Phi_c^{-1}(rho) - sigma). z and z - sigma are kept as double-double
 * because the condition number of Phi at w is ~|w|, so the rounding of z alone would
 * cost ~|w| |z| 2^-53 relative deep in either tail.
 */
double tka_gaussian_tail_mass(double rho, double sigma)
{
    if (!(rho >= 0.0 && rho <= 1.0) || !(sigma >= 0.0)) return NAN;
    if (rho == 0.0) return 1.0;  /* nothing kept: everything is tail */
    if (rho == 1.0) return 0.0;  /* everything kept */
    if (isinf(sigma)) return 0.0;
    double zl, zh = norm_isf2(rho, &zl);
    double wl, wh = two_sum(zh, -sigma, &wl);
    return norm_cdf2(wh, wl + zl);
}

/* Asymptotic rule k/n = Phi_c(sigma + Phi^{-1}(eps)) */
static double rule_fraction(double sigma, double eps)
{
    if (sigma == 0.0) return 1.0 - eps;
    if (isinf(sigma)) return 0.0;
    double zl, zh = norm_isf2(eps, &zl);  /* Phi^{-1}(eps) = -(zh + zl) */
    double vl, vh = two_sum(sigma, -zh, &vl);
    return norm_sf2(vh, vl - zl);
}

/* ------------------------------------------------------- finite-n k_eps (§5)
 * See the block comment at the top of this file for the method and its justification.
 */

#define GRINGORTEN_A 0.44 /* plotting position (i - a)/(n + 1 - 2a) */
#define TOP_EXACT 32      /* ranks at either end summed term by term */
#define SMALL_N 64        /* n up to this: every rank summed term by term */
#define SIGMA_CAP 1e6     /* beyond this only the maximum carries mass for any n */

/* log(Phi_c(y)/phi(y)) for y >= 30: the Mills ratio by Laplace's continued fraction,
 * which this far out converges to double precision well within 40 terms. */
static double log_mills(double y)
{
    double t = y;
    for (int k = 40; k >= 1; --k) t = y + k / t;
    return -log(t);
}

#define HALF_LOG_2PI 0.91893853320467274178

/* log Phi(x), also far below the underflow of Phi. */
static double log_norm_cdf(double x)
{
    if (x > -30.0) return log(norm_cdf2(x, 0.0));
    return -0.5 * x * x - HALF_LOG_2PI + log_mills(-x);
}

typedef struct {
    double n;     /* number of scores (integer valued) */
    double sigma;
    double D;     /* n + 1 - 2a */
    double z1;    /* plotting position of the maximum */
} typical_row;

/* z(t) = Phi_c^{-1}((t - a)/D) at rank t = j + off (j integer valued, off in {0, 1/2}),
 * taking the smaller side so both ends keep full accuracy; the distance to the bottom
 * (n - j) + (1 - a - off) is formed so that it stays exact even when n exceeds 2^53. */
static double rank_z(const typical_row *r, double j, double off)
{
    double upper = j + (off - GRINGORTEN_A);
    double lower = (r->n - j) + (1.0 - GRINGORTEN_A - off);
    double lo;
    if (upper <= lower) {
        double h = norm_isf2(upper / r->D, &lo);
        return h + lo;
    }
    double h = norm_isf2(lower / r->D, &lo);
    return -(h + lo);
}

/* weight of rank t relative to the maximum: exp(sigma (z(t) - z1)) */
static double rank_w(const typical_row *r, double z) { return exp(r->sigma * (z - r->z1)); }

/* log of e^{sigma^2/2 - sigma z1} Phi(x - sigma), without overflow for large sigma */
static double log_int_upper(const typical_row *r, double x)
{
    double s = r->sigma, y = s - x;
    if (y > 30.0) /* sigma^2/2 - (x - sigma)^2/2 = sigma x - x^2/2, folded analytically */
        return s * (x - r->z1) - 0.5 * x * x - HALF_LOG_2PI + log_mills(y);
    return s * (0.5 * s - r->z1) + log_norm_cdf(x - s);
}

/* derivative of the weight in t: -sigma exp(sigma (z - z1)) / (D phi(z)) */
static double rank_dw(const typical_row *r, double z)
{
    return -r->sigma * 2.5066282746310005024 / r->D *
           exp(r->sigma * (z - r->z1) + 0.5 * z * z);
}

/* Sum of weights of ranks j+1..n-b (b = TOP_EXACT), j >= TOP_EXACT:
 * midpoint rule with the first Euler-Maclaurin correction. In u = (t - a)/D the
 * integral of exp(sigma z(t)) dt is D e^{sigma^2/2} [Phi(z_lo - sigma) - Phi(z_hi - sigma)]. */
static double tail_integral(const typical_row *r, double j, double mhi, double dwhi)
{
    double zlo = rank_z(r, j, 0.5);
    double mlo = log_int_upper(r, zlo);
    double d = mhi - mlo;
    double I = (d < 0.0) ? exp(log(r->D) + mlo + log1p(-exp(d))) : 0.0;
    double S = I + (rank_dw(r, zlo) - dwhi) / 24.0;
    return S > 0.0 ? S : 0.0;
}

/* exact floor(a * b) for a, b >= 0 finite */
static double floor_mul(double a, double b)
{
    double p = a * b, f = floor(p);
    if (fma(a, b, -f) < 0.0) f -= 1.0;
    return f;
}

static double finite_n_k(double n, double sigma, double eps)
{
    n = floor(n);
    if (sigma == 0.0) /* tau(k) = (n - k)/n exactly: smallest k is n - floor(eps n) */
        return n - floor_mul(eps, n);
    if (n == 1.0 || sigma > SIGMA_CAP) return 1.0;

    typical_row r;
    r.n = n;
    r.sigma = sigma;
    r.D = n + 1.0 - 2.0 * GRINGORTEN_A;
    r.z1 = rank_z(&r, 1.0, 0.0);

    /* Both ends of the row are summed term by term: near either end the positions z(t)
     * move too fast in t for the midpoint rule (the bottom matters for tiny eps).
     * top[k] = weight of ranks k+1..m; bot[c] = weight of the c lowest ranks. Both are
     * accumulated from the small end so that remainders under a dominant maximum keep
     * their relative accuracy. */
    double top[SMALL_N + 1], bot[TOP_EXACT + 1];
    int m = (n <= SMALL_N) ? (int)n : TOP_EXACT;
    int b = (n <= SMALL_N) ? 0 : TOP_EXACT;
    top[m] = 0.0;
    for (int i = m; i >= 1; --i) top[i - 1] = top[i] + rank_w(&r, rank_z(&r, (double)i, 0.0));
    bot[0] = 0.0;
    for (int c = 1; c <= b; ++c) /* rank n + 1 - c sits at 1 - (c - a)/D */
        bot[c] = bot[c - 1] + rank_w(&r, -rank_z(&r, (double)c, 0.0));

    /* middle ranks m+1 .. n-b by the integral; its upper end is fixed */
    double mhi = 0.0, dwhi = 0.0, Smid = 0.0;
    if (b > 0) {
        double zhi = rank_z(&r, n - b, 0.5);
        mhi = log_int_upper(&r, zhi);
        dwhi = rank_dw(&r, zhi);
        Smid = tail_integral(&r, (double)m, mhi, dwhi);
    }
    double total = top[0] + Smid + bot[b];
    double target = eps * total;

    /* smallest integer k in [1, n] with S(k) <= eps * S(0), S(k) = weight of ranks > k;
     * S(n) = 0 <= target always, S(0) > target since eps < 1 */
    double lo = 0.0, hi = n;
    for (int it = 0; it < 2200 && hi - lo > 1.0; ++it) {
        double mid = lo + floor(0.5 * (hi - lo));
        if (!(mid > lo && mid < hi)) break;
        double S;
        if (mid < m) S = top[(int)mid] + Smid + bot[b];
        else if (n - mid <= b) S = bot[(int)(n - mid)];
        else S = tail_integral(&r, mid, mhi, dwhi) + bot[b];
        if (S <= target) hi = mid;
        else lo = mid;
    }
    return hi;
}

double tka_gaussian_k_eps(double n, double sigma, double eps, int finite_n)
{
    if (!(n >= 1.0) || !(sigma >= 0.0) || !(eps > 0.0 && eps < 1.0)) return NAN;
    if (isinf(n)) return NAN;
    double k = finite_n ? finite_n_k(n, sigma, eps) : n * rule_fraction(sigma, eps);
    if (k < 0.0) k = 0.0;
    if (k > n) k = n;
    return k;
}
