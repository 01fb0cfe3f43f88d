/*
 * search_neon.c - dot-product kernels of the certified search for aarch64 NEON (baseline
 * there: no flags, no run-time check); empty on other targets. The float64 sums may be
 * in any order (the error bounds in search.c hold for any order); the int8 sums are
 * exact; the proxy levels are those of the scalar set.
 */
#include "../internal.h"
#include "../search.h"

#ifdef TKA_HAVE_NEON
#include <arm_neon.h>

static void dot_f32(const double *q, const float *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        float64x2_t a0 = vdupq_n_f64(0.0), a1 = a0, a2 = a0, a3 = a0;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            float32x4_t k0 = vld1q_f32(k + j), k1 = vld1q_f32(k + j + 4);
            a0 = vfmaq_f64(a0, vld1q_f64(q + j), vcvt_f64_f32(vget_low_f32(k0)));
            a1 = vfmaq_f64(a1, vld1q_f64(q + j + 2), vcvt_high_f64_f32(k0));
            a2 = vfmaq_f64(a2, vld1q_f64(q + j + 4), vcvt_f64_f32(vget_low_f32(k1)));
            a3 = vfmaq_f64(a3, vld1q_f64(q + j + 6), vcvt_high_f64_f32(k1));
        }
        double s = vaddvq_f64(vaddq_f64(vaddq_f64(a0, a1), vaddq_f64(a2, a3)));
        for (; j < d; j++) s += q[j] * (double)k[j];
        out[i] = s;
    }
}

/* dot_f32 for float16 keys: the same operations on the same (exactly converted) values */
static void dot_f16(const double *q, const uint16_t *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        float64x2_t a0 = vdupq_n_f64(0.0), a1 = a0, a2 = a0, a3 = a0;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(k + j));
            float32x4_t k0 = vcvt_f32_f16(vget_low_f16(h)), k1 = vcvt_high_f32_f16(h);
            a0 = vfmaq_f64(a0, vld1q_f64(q + j), vcvt_f64_f32(vget_low_f32(k0)));
            a1 = vfmaq_f64(a1, vld1q_f64(q + j + 2), vcvt_high_f64_f32(k0));
            a2 = vfmaq_f64(a2, vld1q_f64(q + j + 4), vcvt_f64_f32(vget_low_f32(k1)));
            a3 = vfmaq_f64(a3, vld1q_f64(q + j + 6), vcvt_high_f64_f32(k1));
        }
        double s = vaddvq_f64(vaddq_f64(vaddq_f64(a0, a1), vaddq_f64(a2, a3)));
        for (; j < d; j++) s += q[j] * (double)tka_half_to_float(k[j]);
        out[i] = s;
    }
}

static void dot_f64(const double *q, const double *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        float64x2_t a0 = vdupq_n_f64(0.0), a1 = a0, a2 = a0, a3 = a0;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            a0 = vfmaq_f64(a0, vld1q_f64(q + j), vld1q_f64(k + j));
            a1 = vfmaq_f64(a1, vld1q_f64(q + j + 2), vld1q_f64(k + j + 2));
            a2 = vfmaq_f64(a2, vld1q_f64(q + j + 4), vld1q_f64(k + j + 4));
            a3 = vfmaq_f64(a3, vld1q_f64(q + j + 6), vld1q_f64(k + j + 6));
        }
        double s = vaddvq_f64(vaddq_f64(vaddq_f64(a0, a1), vaddq_f64(a2, a3)));
        for (; j < d; j++) s += q[j] * k[j];
        out[i] = s;
    }
}

/* Exact: products of int16 and int8 widened to int32, the caller keeps sums below 2^31. */
static void dot_i8(const int16_t *y, const int8_t *z, int64_t d, int64_t m, int32_t *out)
{
    for (int64_t i = 0; i < m; i++, z += d) {
        int32x4_t a0 = vdupq_n_s32(0), a1 = a0;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            int16x8_t zv = vmovl_s8(vld1_s8(z + j)), yv = vld1q_s16(y + j);
            a0 = vmlal_s16(a0, vget_low_s16(yv), vget_low_s16(zv));
            a1 = vmlal_high_s16(a1, yv, zv);
        }
        int32_t s = vaddvq_s32(vaddq_s32(a0, a1));
        for (; j < d; j++) s += (int32_t)y[j] * (int32_t)z[j];
        out[i] = s;
    }
}

/* The proxy levels are cheap next to the dot products: the scalar version serves. */
static void proxy_levels(int32_t *dl, const float *sc, const float *perr, int64_t m,
                         const tka_proxy_consts *c)
{
    tka_search_kernels_scalar.proxy_levels(dl, sc, perr, m, c);
}

/* four queries: one dot_i8 pass each */
static void dot4_i8(const int16_t *const *y, const int8_t *z, int64_t d, int64_t m,
                    int32_t *const *out)
{
    for (int r = 0; r < 4; r++) dot_i8(y[r], z, d, m, out[r]);
}

/* 4-bit codes: the scalar version (no NEON version yet) */
static void dot_u4(const int8_t *y, const uint8_t *z, int64_t hb, int64_t m, int32_t bias,
                   int32_t *out)
{
    tka_search_kernels_scalar.dot_u4(y, z, hb, m, bias, out);
}

/* the block bounds: the scalar set's */
static void mass_bounds(double *ub, const double *rad, const double *mom, int64_t m,
                        const tka_mass_consts *c, double *um)
{
    tka_search_kernels_scalar.mass_bounds(ub, rad, mom, m, c, um);
}

const tka_search_kernels tka_search_kernels_neon = {dot_f32, dot_f64, dot_f16, dot_i8,
                                                    dot4_i8, dot_u4, proxy_levels, mass_bounds};

#else
typedef int tka_search_neon_not_built; /* ISO C wants a declaration in every file */
#endif /* TKA_HAVE_NEON */
