/*
 * search_scalar.c - dot-product kernels of the certified search for any CPU.
 * Four partial sums per dot product; the error bounds in search.c hold for any order.
 */
#include <math.h>

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

const tka_search_kernels tka_search_kernels_scalar = {dot_f32, dot_f64, dot_f16, dot_i8,
                                                      dot4_i8, dot_u4, proxy_levels};
