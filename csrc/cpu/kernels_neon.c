/*
 * kernels_neon.c - the kernel set for aarch64 Advanced SIMD (NEON): two float64 lanes.
 * NEON, FMA and the float16 conversions are baseline on aarch64, so this file needs no
 * flags and the dispatcher no run-time check; on other targets it is empty.
 *
 * Every operation keeps the meaning it has in the scalar set: max/min are a > b ? a : b
 * and a < b ? a : b (NEON's fmax would return NaN, and +0 for (-0, +0)), compares are
 * ordered (false on NaN), masks are all-ones lanes.
 */
#include "../internal.h"

#ifdef TKA_HAVE_NEON
#include <arm_neon.h>

typedef float64x2_t VD;
typedef uint64x2_t VM;
#define VW 2
#define VM_ALL vdupq_n_u64(~(uint64_t)0)

static inline VD vd_set1(double a) { return vdupq_n_f64(a); }
static inline VD vd_add(VD a, VD b) { return vaddq_f64(a, b); }
static inline VD vd_sub(VD a, VD b) { return vsubq_f64(a, b); }
static inline VD vd_mul(VD a, VD b) { return vmulq_f64(a, b); }
static inline VD vd_fma(VD a, VD b, VD c) { return vfmaq_f64(c, a, b); }
/* second operand when a is NaN (callers put the accumulator second), as on x86 */
static inline VD vd_max(VD a, VD b) { return vbslq_f64(vcgtq_f64(a, b), a, b); }
static inline VD vd_min(VD a, VD b) { return vbslq_f64(vcltq_f64(a, b), a, b); }
static inline VM vd_gt(VD a, VD b) { return vcgtq_f64(a, b); }
static inline VM vd_lt(VD a, VD b) { return vcltq_f64(a, b); }
static inline VM vd_ge(VD a, VD b) { return vcgeq_f64(a, b); }
static inline VM vd_le(VD a, VD b) { return vcleq_f64(a, b); }
static inline VM vd_eq(VD a, VD b) { return vceqq_f64(a, b); }
static inline VM vd_unord(VD a, VD b)
{
    uint64x2_t ordered = vandq_u64(vceqq_f64(a, a), vceqq_f64(b, b));
    return vreinterpretq_u64_u32(vmvnq_u32(vreinterpretq_u32_u64(ordered)));
}
static inline VM vm_and(VM a, VM b) { return vandq_u64(a, b); }
static inline VM vm_or(VM a, VM b) { return vorrq_u64(a, b); }
static inline unsigned vm_bits(VM a)
{
    return (unsigned)(vgetq_lane_u64(a, 0) & 1u) | (unsigned)((vgetq_lane_u64(a, 1) & 1u) << 1);
}
static inline VM vm_firstn(int k)
{
    const int64x2_t lane = {0, 1};
    return vcgtq_s64(vdupq_n_s64(k), lane);
}
static inline VD vd_maskz(VM m, VD v)
{
    return vreinterpretq_f64_u64(vandq_u64(m, vreinterpretq_u64_f64(v)));
}
static inline VD vd_blend(VM m, VD a, VD b) { return vbslq_f64(m, a, b); }
static inline void vd_store(double *p, VD v) { vst1q_f64(p, v); }
/* out[i] = scale * (sum of the lanes of a_i), i < 4 */
static inline void vd_hsum4(VD a0, VD a1, VD a2, VD a3, double scale, double *out)
{
    const VD s = vdupq_n_f64(scale);
    vst1q_f64(out, vmulq_f64(vpaddq_f64(a0, a1), s));
    vst1q_f64(out + 2, vmulq_f64(vpaddq_f64(a2, a3), s));
}
/* 2^(m >> 5) * tka_exp2_32[m & 31] for t = y + TKA_MAGIC, m = round(y) (see vd_exp): two
 * table loads (NEON has no gather), then (m >> 5) added to the exponent field */
static inline VD vd_exp2_tab(VD t)
{
    const int64x2_t magic = vreinterpretq_s64_f64(vdupq_n_f64(6755399441055744.0));
    const uint64x2_t m = vreinterpretq_u64_s64(vsubq_s64(vreinterpretq_s64_f64(t), magic));
    float64x2_t v = vdupq_n_f64(tka_exp2_32[vgetq_lane_u64(m, 0) & 31]);
    v = vsetq_lane_f64(tka_exp2_32[vgetq_lane_u64(m, 1) & 31], v, 1);
    const uint64x2_t e = vshlq_n_u64(vbicq_u64(m, vdupq_n_u64(31)), 47);
    return vreinterpretq_f64_u64(vaddq_u64(vreinterpretq_u64_f64(v), e));
}
/* Store the lanes of v selected by m contiguously at dst (writing VW slots), and their
 * positions base + lane at idst if given; returns how many were selected. */
static inline int vd_compress(double *dst, int64_t *idst, VM m, VD v, int64_t base)
{
    const unsigned bits = vm_bits(m);
    const int first = bits == 2u; /* only lane 1 selected: it goes to slot 0 */
    double a[2];
    vst1q_f64(a, v);
    dst[0] = a[first];
    dst[1] = a[1];
    if (idst) {
        idst[0] = base + first;
        idst[1] = base + 1;
    }
    return (int)(bits & 1u) + (int)(bits >> 1);
}

static inline VD vload_f32_neon(const float *p) { return vcvt_f64_f32(vld1_f32(p)); }
static inline VD vload_f64_neon(const double *p) { return vld1q_f64(p); }
/* float16: two values to float32, then to float64; both steps are exact */
static inline VD vload_f16_neon(const uint16_t *p)
{
    uint32_t two;
    memcpy(&two, p, 4);
    float16x4_t h = vreinterpret_f16_u32(vdup_n_u32(two));
    return vcvt_f64_f32(vget_low_f32(vcvt_f32_f16(h)));
}
static void f16_to_f32_neon(const uint16_t *src, int64_t n, float *dst)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(src + i));
        vst1q_f32(dst + i, vcvt_f32_f16(vget_low_f16(h)));
        vst1q_f32(dst + i + 4, vcvt_high_f32_f16(h));
    }
    for (; i < n; i++) dst[i] = tka_half_to_float(src[i]);
}

#define vload_f64_isa vload_f64_neon
#define TO_F64(e) ((double)(e))
#define ELT float
#define FN(name) name##_f32_neon
#include "kernels.inc"
#undef ELT
#undef FN
#define ELT double
#define FN(name) name##_f64_neon
#include "kernels.inc"
#undef ELT
#undef FN
#undef TO_F64
#define TO_F64(e) ((double)tka_half_to_float(e))
#define TKA_KERNELS_DOT_ONLY
#define ELT uint16_t
#define FN(name) name##_f16_neon
#include "kernels.inc"
#undef ELT
#undef FN
#undef TO_F64
#undef TKA_KERNELS_DOT_ONLY

const tka_kernels tka_kernels_neon = TKA_TABLE(neon, TKA_SIMD_NEON, &tka_search_kernels_neon);

#else
typedef int tka_kernels_neon_not_built; /* ISO C wants a declaration in every file */
#endif /* TKA_HAVE_NEON */
