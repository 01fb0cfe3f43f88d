/*
 * kernels_scalar.c - the portable kernel set: one lane, plain C, no FMA instruction.
 * Also the reference the SIMD sets are tested against.
 */
#include <math.h>
#include <string.h>

#include "../internal.h"

typedef double VD;
typedef unsigned VM;
#define VW 1
#define VM_ALL 1u

static inline VD vd_set1(double a) { return a; }
static inline VD vd_add(VD a, VD b) { return a + b; }
static inline VD vd_sub(VD a, VD b) { return a - b; }
static inline VD vd_mul(VD a, VD b) { return a * b; }
/* No fused multiply-add here: a software fma() would be slow, and the two-part split of
 * ln(2)/32 keeps the range reduction exact without it (see vd_exp). */
static inline VD vd_fma(VD a, VD b, VD c) { return a * b + c; }
static inline VD vd_max(VD a, VD b) { return a > b ? a : b; }
static inline VD vd_min(VD a, VD b) { return a < b ? a : b; }
static inline VM vd_gt(VD a, VD b) { return a > b; }
static inline VM vd_lt(VD a, VD b) { return a < b; }
static inline VM vd_ge(VD a, VD b) { return a >= b; }
static inline VM vd_le(VD a, VD b) { return a <= b; }
static inline VM vd_eq(VD a, VD b) { return a == b; }
static inline VM vd_unord(VD a, VD b) { return a != a || b != b; }
static inline VM vm_and(VM a, VM b) { return a & b; }
static inline VM vm_or(VM a, VM b) { return a | b; }
static inline unsigned vm_bits(VM a) { return a; }
static inline VM vm_firstn(int k) { return k > 0; }
static inline VD vd_maskz(VM m, VD v) { return m ? v : 0.0; }
static inline VD vd_blend(VM m, VD a, VD b) { return m ? a : b; }
static inline void vd_store(double *p, VD v) { *p = v; }
static inline void vd_hsum4(VD a0, VD a1, VD a2, VD a3, double scale, double *out)
{
    out[0] = scale * a0;
    out[1] = scale * a1;
    out[2] = scale * a2;
    out[3] = scale * a3;
}
/* 2^(m >> 5) * tka_exp2_32[m & 31] for t = y + TKA_MAGIC, m = round(y) (see vd_exp): the
 * table value's exponent field is raised by m >> 5 (an arithmetic shift, as the integer
 * arithmetic on the bits below). */
static inline VD vd_exp2_tab(VD t)
{
    uint64_t bits, magic, tb;
    double mg = 6755399441055744.0; /* TKA_MAGIC */
    memcpy(&bits, &t, 8);
    memcpy(&magic, &mg, 8);
    uint64_t m = bits - magic;
    double v = tka_exp2_32[m & 31];
    memcpy(&tb, &v, 8);
    tb += (m & ~(uint64_t)31) << 47;  /* (m >> 5) << 52, modulo 2^64 */
    memcpy(&v, &tb, 8);
    return v;
}

static inline int vd_compress(double *dst, int64_t *idst, VM m, VD v, int64_t base)
{
    if (m) {
        *dst = v;
        if (idst) *idst = base;
    }
    return (int)m;
}

static inline VD vload_f32_scalar(const float *p) { return (double)*p; }
static inline VD vload_f64_scalar(const double *p) { return *p; }

static inline VD vload_f16_scalar(const uint16_t *p) { return (double)tka_half_to_float(*p); }
static void f16_to_f32_scalar(const uint16_t *src, int64_t n, float *dst)
{
    for (int64_t i = 0; i < n; i++) dst[i] = tka_half_to_float(src[i]);
}
#define vload_f64_isa vload_f64_scalar
#define TO_F64(e) ((double)(e))
#define ELT float
#define FN(name) name##_f32_scalar
#include "kernels.inc"
#undef ELT
#undef FN
#define ELT double
#define FN(name) name##_f64_scalar
#include "kernels.inc"
#undef ELT
#undef FN
#undef TO_F64
#define TO_F64(e) ((double)tka_half_to_float(e))
#define TKA_KERNELS_DOT_ONLY
#define ELT uint16_t
#define FN(name) name##_f16_scalar
#include "kernels.inc"
#undef ELT
#undef FN
#undef TO_F64
#undef TKA_KERNELS_DOT_ONLY

const tka_kernels tka_kernels_scalar = TKA_TABLE(scalar, TKA_SIMD_SCALAR, &tka_search_kernels_scalar);
