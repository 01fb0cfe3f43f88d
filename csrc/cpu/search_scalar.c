/*
 * search_scalar.c - dot-product kernels of the certified search for any CPU.
 * Four partial sums per dot product; the error bounds in search.c hold for any order.
 */
#include <math.h>
#include <string.h>

#include "../internal.h"
#include "../search.h"

static void dot_f32(const double *q, const float *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        int64_t j = 0;
        for (; j + 4 <= d; j += 4) {
            a0 += q[j] * (double)k[j];
            a1 += q[j + 1] * (double)k[j + 1];
            a2 += q[j + 2] * (double)k[j + 2];
            a3 += q[j + 3] * (double)k[j + 3];
        }
        for (; j < d; j++) a0 += q[j] * (double)k[j];
        out[i] = (a0 + a1) + (a2 + a3);
    }
}

/* dot_f32 for float16 keys: the same operations on the same (exactly converted) values */
static void dot_f16(const double *q, const uint16_t *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        int64_t j = 0;
        for (; j + 4 <= d; j += 4) {
            a0 += q[j] * (double)tka_half_to_float(k[j]);
            a1 += q[j + 1] * (double)tka_half_to_float(k[j + 1]);
            a2 += q[j + 2] * (double)tka_half_to_float(k[j + 2]);
            a3 += q[j + 3] * (double)tka_half_to_float(k[j + 3]);
        }
        for (; j < d; j++) a0 += q[j] * (double)tka_half_to_float(k[j]);
        out[i] = (a0 + a1) + (a2 + a3);
    }
}

static void dot_f64(const double *q, const double *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        int64_t j = 0;
        for (; j + 4 <= d; j += 4) {
            a0 += q[j] * k[j];
            a1 += q[j + 1] * k[j + 1];
            a2 += q[j + 2] * k[j + 2];
            a3 += q[j + 3] * k[j + 3];
        }
        for (; j < d; j++) a0 += q[j] * k[j];
        out[i] = (a0 + a1) + (a2 + a3);
    }
}

static void dot_i8(const int16_t *y, const int8_t *z, int64_t d, int64_t m, int32_t *out)
{
    for (int64_t i = 0; i < m; i++, z += d) {
        int32_t a = 0;
        for (int64_t j = 0; j < d; j++) a += (int32_t)y[j] * (int32_t)z[j];
        out[i] = a;
    }
}

static void proxy_levels(int32_t *dl, const float *sc, const float *perr, int64_t m,
                         const tka_proxy_consts *c)
{
    for (int64_t i = 0; i < m; i++) {
        const double s = (double)sc[i];
        double p = s * (c->bq * (double)dl[i]) + s * c->slack_code + c->qn2 * (double)perr[i];
        p += 0x1p-50 * fabs(p) + 0x1p-1060 + c->eta;
        if (!(p < c->ubb)) p = c->ubb;
        double gap = ((c->ref - p) - c->margin - 1e-9 * fabs(p)) * (1.0 / TKA_LEVEL_W);
        int32_t b = 0;
        if (gap > 0.0) b = gap >= (double)(TKA_NLEVELS - 1) ? TKA_NLEVELS - 1 : (int32_t)gap;
        dl[i] = b;
    }
}

/* four queries: one dot_i8 pass each */
static void dot4_i8(const int16_t *const *y, const int8_t *z, int64_t d, int64_t m,
                    int32_t *const *out)
{
    for (int r = 0; r < 4; r++) dot_i8(y[r], z, d, m, out[r]);
}

static void dot_u4(const int8_t *y, const uint8_t *z, int64_t hb, int64_t m, int32_t bias,
                   int32_t *out)
{
    for (int64_t i = 0; i < m; i++, z += hb) {
        int32_t a = 0;
        for (int64_t t = 0; t < hb; t++)
            a += (int32_t)y[t] * (int32_t)(z[t] & 15) + (int32_t)y[hb + t] * (int32_t)(z[t] >> 4);
        out[i] = a - bias;
    }
}

/*
 * The block mass bound (docs/design.md §4 "Block masses"): a block of m keys k_i = c + e_i
 * whose real logits are q'.c + x_i, x_i = q'.e_i, with
 *   x_i <= R = |q'| rad,  sum_i x_i = q'.sum_i e_i <= |q'| mom[1],
 *   sum_i x_i^2 = q'^T (sum_i e_i e_i^T) q' <= mom[0] |q'|^2 = V.
 * Since phi(x) = (e^x - 1 - x) / x^2 increases on the whole line, e^x <= 1 + x + phi(R) x^2
 * for every x <= R, and so sum_i e^{x_i} <= m + |q'| mom[1] + phi(R) V: for the computed
 * logits (within eta of the real ones, which `base` includes with q'.c and its rounding),
 * sum_i e^{s_i} <= m e^{um}, um = base + log(1 + (|q'| mom[1] + phi(R) V) / m). This is a
 * bound on the block's total mass, not on each key (one key may lie above um): the levels
 * count it as m keys on um's level, which the certificate needs (sums only), and its keys
 * are read as soon as that level is. No larger than ub, the per-key bound (also a bound on
 * the mass per key). R, V, |q'| are upper bounds; e^R and the logarithm are taken from
 * above (exp_up, log_up), the other roundings padded by factors 1 + 2^-40.
 *
 * Upper bounds on e^R (R >= 1) and log(S) (S >= 1) without libm (a call per block and
 * row): e^R = 2^t, t = R log2(e) taken a little up, 2^t <= 2^k 2^{(j+1)/32} (k = floor(t),
 * j = floor(32 (t - k)); the table's values are within half an ulp, hence the factor
 * 1 + 2^-50): at most 2.2% above. log(S), S = M 2^e (M in [0.5, 1)): log is concave, so
 * log M <= log(3/4) + (M - 3/4) / (3/4) (its tangent at 3/4): at most 0.07 above.
 * The vector kernels (search_avx2.c) repeat these operations in this order.
 */
static inline double exp_up(double R)
{
    const double t = R * 1.4426950408889634 * (1.0 + 0x1p-50);
    const double k = floor(t);  /* 0 <= k < 1010 (R < 700) */
    const int j = (int)((t - k) * 32.0);
    const double p = j + 1 < 32 ? tka_exp2_32[j + 1] : 2.0;
    const uint64_t e2 = (uint64_t)(1023 + (int64_t)k) << 52;  /* 2^k */
    double s2;
    memcpy(&s2, &e2, sizeof s2);
    return p * (1.0 + 0x1p-50) * s2;
}

/* (S >= 1 and finite) */
static inline double log_up(double S)
{
    uint64_t b;
    memcpy(&b, &S, sizeof b);
    const int64_t e = (int64_t)((b >> 52) & 0x7ff) - 1022;  /* S = M 2^e, M in [0.5, 1) */
    const uint64_t mb = (b & 0x000fffffffffffffull) | 0x3fe0000000000000ull;
    double M;
    memcpy(&M, &mb, sizeof M);
    const double l = (double)e * 0.69314718055994531 - 0.28768207245178090
                   + (M - 0.75) * 1.3333333333333333;
    return l + 0x1p-40 * (1.0 + fabs(l));
}

static void mass_bounds(double *ub, const double *rad, const double *mom, int64_t m,
                        const tka_mass_consts *c, double *um)
{
    for (int64_t b = 0; b < m; b++) {
        const double rr = c->qn2 * rad[b], dot = ub[b];
        const double base = dot + c->cab + c->c1060 + c->eta;
        const double u = dot + (rr + c->g * rr + c->cab + c->c1060 + c->eta);
        const double R = rr * (1.0 + c->g);
        const double *mo = mom + 2 * b;
        ub[b] = u;
        um[b] = u;
        if (!(mo[0] < INFINITY) || !(mo[1] < INFINITY) || !(R < 700.0)) continue;
        /* phi(R) <= phi(1) = e - 2 below R = 1 (phi increases) */
        const double phi = R >= 1.0 ? (exp_up(R) - 1.0 - R) / (R * R) * (1.0 + 0x1p-40)
                                    : 0.71828182845904524 * (1.0 + 0x1p-40);
        const double extra = (c->qn2 * mo[1] + phi * (mo[0] * c->q2)) * (1.0 + 0x1p-40);
        const double S = (1.0 + extra * c->inv_m) * (1.0 + 0x1p-50);
        if (!(S < 0x1p1000)) continue;
        const double l = log_up(S);
        const double v = (base + l) + 0x1p-40 * (fabs(base) + fabs(l));
        um[b] = v < u ? v : u;
    }
}

const tka_search_kernels tka_search_kernels_scalar = {dot_f32, dot_f64, dot_f16, dot_i8,
                                                      dot4_i8, dot_u4, proxy_levels,
                                                      mass_bounds};
