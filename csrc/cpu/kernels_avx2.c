/*
 * kernels_avx2.c - the kernel set for AVX2 + FMA: four float64 lanes.
 * Compiled with -mavx2 -mfma -mf16c; only reached through the dispatch table, which
 * selects it when the CPU has AVX2, FMA and F16C (for the float16 loads).
 */
#include <immintrin.h>
#include <math.h>

#include "../internal.h"

typedef __m256d VD;
typedef __m256d VM;
#define VW 4
#define VM_ALL _mm256_castsi256_pd(_mm256_set1_epi64x(-1))

static inline VD vd_set1(double a) { return _mm256_set1_pd(a); }
static inline VD vd_add(VD a, VD b) { return _mm256_add_pd(a, b); }
static inline VD vd_sub(VD a, VD b) { return _mm256_sub_pd(a, b); }
static inline VD vd_mul(VD a, VD b) { return _mm256_mul_pd(a, b); }
static inline VD vd_fma(VD a, VD b, VD c) { return _mm256_fmadd_pd(a, b, c); }
/* max/min return the second operand when one is NaN: callers put the accumulator second */
static inline VD vd_max(VD a, VD b) { return _mm256_max_pd(a, b); }
static inline VD vd_min(VD a, VD b) { return _mm256_min_pd(a, b); }
static inline VM vd_gt(VD a, VD b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
static inline VM vd_lt(VD a, VD b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
static inline VM vd_ge(VD a, VD b) { return _mm256_cmp_pd(a, b, _CMP_GE_OQ); }
static inline VM vd_le(VD a, VD b) { return _mm256_cmp_pd(a, b, _CMP_LE_OQ); }
static inline VM vd_eq(VD a, VD b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
static inline VM vd_unord(VD a, VD b) { return _mm256_cmp_pd(a, b, _CMP_UNORD_Q); }
static inline VM vm_and(VM a, VM b) { return _mm256_and_pd(a, b); }
static inline VM vm_or(VM a, VM b) { return _mm256_or_pd(a, b); }
static inline unsigned vm_bits(VM a) { return (unsigned)_mm256_movemask_pd(a); }
static inline VM vm_firstn(int k)
{
    return _mm256_castsi256_pd(
        _mm256_cmpgt_epi64(_mm256_set1_epi64x(k), _mm256_set_epi64x(3, 2, 1, 0)));
}
static inline VD vd_maskz(VM m, VD v) { return _mm256_and_pd(m, v); }
static inline VD vd_blend(VM m, VD a, VD b) { return _mm256_blendv_pd(b, a, m); }
static inline void vd_store(double *p, VD v) { _mm256_storeu_pd(p, v); }
/* out[i] = scale * (sum of the lanes of a_i), i < 4 */
static inline VD vd_hsum4_pd(VD a0, VD a1, VD a2, VD a3, double scale)
{
    VD s01 = _mm256_hadd_pd(a0, a1), s23 = _mm256_hadd_pd(a2, a3);
    VD lo = _mm256_permute2f128_pd(s01, s23, 0x20), hi = _mm256_permute2f128_pd(s01, s23, 0x31);
    return _mm256_mul_pd(_mm256_add_pd(lo, hi), _mm256_set1_pd(scale));
}
static inline void vd_hsum4(VD a0, VD a1, VD a2, VD a3, double scale, double *out)
{
    _mm256_storeu_pd(out, vd_hsum4_pd(a0, a1, a2, a3, scale));
}
/* 2^(m >> 5) * tka_exp2_32[m & 31] for t = y + TKA_MAGIC, m = round(y) (see vd_exp) */
static inline VD vd_exp2_tab(VD t)
{
    const __m256i magic = _mm256_castpd_si256(_mm256_set1_pd(6755399441055744.0));
    __m256i m = _mm256_sub_epi64(_mm256_castpd_si256(t), magic);
    __m256i j = _mm256_and_si256(m, _mm256_set1_epi64x(31));
    __m256i e = _mm256_slli_epi64(_mm256_andnot_si256(_mm256_set1_epi64x(31), m), 47);
    __m256i v = _mm256_castpd_si256(_mm256_i64gather_pd(tka_exp2_32, j, 8));
    return _mm256_castsi256_pd(_mm256_add_epi64(v, e));
}
/* Lane permutations that move the selected doubles (pairs of 32-bit words) to the front:
 * row m lists the words of the lanes set in the 4-bit mask m, in order. */
static const int32_t compress_lut[16][8] = {
    {0, 0, 0, 0, 0, 0, 0, 0}, {0, 1, 0, 0, 0, 0, 0, 0}, {2, 3, 0, 0, 0, 0, 0, 0},
    {0, 1, 2, 3, 0, 0, 0, 0}, {4, 5, 0, 0, 0, 0, 0, 0}, {0, 1, 4, 5, 0, 0, 0, 0},
    {2, 3, 4, 5, 0, 0, 0, 0}, {0, 1, 2, 3, 4, 5, 0, 0}, {6, 7, 0, 0, 0, 0, 0, 0},
    {0, 1, 6, 7, 0, 0, 0, 0}, {2, 3, 6, 7, 0, 0, 0, 0}, {0, 1, 2, 3, 6, 7, 0, 0},
    {4, 5, 6, 7, 0, 0, 0, 0}, {0, 1, 4, 5, 6, 7, 0, 0}, {2, 3, 4, 5, 6, 7, 0, 0},
    {0, 1, 2, 3, 4, 5, 6, 7},
};

/* Store the lanes of v selected by m contiguously at dst (writing VW slots), and their
 * positions base + lane at idst if given; returns how many were selected. */
static inline int vd_compress(double *dst, int64_t *idst, VM m, VD v, int64_t base)
{
    unsigned bits = vm_bits(m);
    __m256i perm = _mm256_loadu_si256((const __m256i *)compress_lut[bits]);
    _mm256_storeu_pd(dst, _mm256_castsi256_pd(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(v), perm)));
    if (idst) {
        __m256i pos = _mm256_add_epi64(_mm256_set1_epi64x(base), _mm256_set_epi64x(3, 2, 1, 0));
        _mm256_storeu_si256((__m256i *)idst, _mm256_permutevar8x32_epi32(pos, perm));
    }
    return __builtin_popcount(bits);
}

/* float32 vectors for the float32-accumulating scores (kernels.inc) */
typedef __m256 VS;
#define VSW 8
static inline VS vs_zero(void) { return _mm256_setzero_ps(); }
static inline VS vs_load(const float *p) { return _mm256_loadu_ps(p); }
static inline VS vs_fma(VS a, VS b, VS c) { return _mm256_fmadd_ps(a, b, c); }
static inline VS vs_set1(float a) { return _mm256_set1_ps(a); }
/* c + a x where a != 0, else c unchanged (no branch) */
static inline VS vs_fma_nz(float a, VS x, VS c)
{
    const VS va = _mm256_set1_ps(a);
    return _mm256_blendv_ps(c, _mm256_fmadd_ps(va, x, c), _mm256_cmp_ps(va, _mm256_setzero_ps(), _CMP_NEQ_OQ));
}
/* scale * (sum of the lanes of a_i) for the eight slots, into s0 (slots 0-3) and s1 (4-7):
 * for every slot, lanes (0+1)+(2+3) and (4+5)+(6+7) in float32, then those two in float64 */
static inline void vs_hsum8_pd(VS a0, VS a1, VS a2, VS a3, VS a4, VS a5, VS a6, VS a7,
                               double scale, VD *s0, VD *s1)
{
    const VS g0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const VS g1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    const VD sc = _mm256_set1_pd(scale);
    *s0 = _mm256_mul_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(g0)),
                                      _mm256_cvtps_pd(_mm256_extractf128_ps(g0, 1))), sc);
    *s1 = _mm256_mul_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(g1)),
                                      _mm256_cvtps_pd(_mm256_extractf128_ps(g1, 1))), sc);
}
#include "x86_hsum.h"
/* vd_hsum4 of two keys' accumulators (a_m: key 0, b_m: key 1, query m) stored as pairs:
 * out[m*os] = key 0's, out[m*os + 1] = key 1's, straight from the registers */
static inline void vd_hsum4_pairs(VD a0, VD a1, VD a2, VD a3, VD b0, VD b1, VD b2, VD b3,
                                  double scale, double *out, int64_t os)
{
    tka_store_pairs_pd(vd_hsum4_pd(a0, a1, a2, a3, scale), vd_hsum4_pd(b0, b1, b2, b3, scale), out,
                       os);
}
#define VD_HAVE_HSUM4_PAIRS
/* o[l] += (double)c[l] for the eight lanes, converted in registers (a buffer read back
 * lane by lane waits on its wide store) */
static inline void vs_flush(double *o, VS c)
{
    _mm256_storeu_pd(o, _mm256_add_pd(_mm256_loadu_pd(o), _mm256_cvtps_pd(_mm256_castps256_ps128(c))));
    _mm256_storeu_pd(o + 4, _mm256_add_pd(_mm256_loadu_pd(o + 4),
                                          _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1))));
}
#define VS_HAVE_FLUSH

static inline VD vload_f32_avx2(const float *p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline VD vload_f64_avx2(const double *p) { return _mm256_loadu_pd(p); }

/* float16 (F16C): four values to float32, then to float64; both steps are exact */
static inline VD vload_f16_avx2(const uint16_t *p)
{
    return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)));
}
static void f16_to_f32_avx2(const uint16_t *src, int64_t n, float *dst)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = tka_half_to_float(src[i]);
}
#define vload_f64_isa vload_f64_avx2
#define TO_F64(e) ((double)(e))
#define ELT float
#define FN(name) name##_f32_avx2
#include "kernels.inc"
#undef ELT
#undef FN
#define ELT double
#define FN(name) name##_f64_avx2
#include "kernels.inc"
#undef ELT
#undef FN
#undef TO_F64
#define TO_F64(e) ((double)tka_half_to_float(e))
#define TKA_KERNELS_DOT_ONLY
#define ELT uint16_t
#define FN(name) name##_f16_avx2
#include "kernels.inc"
#undef ELT
#undef FN
#undef TO_F64
#undef TKA_KERNELS_DOT_ONLY

const tka_kernels tka_kernels_avx2 = TKA_TABLE(avx2, TKA_SIMD_AVX2, &tka_search_kernels_avx2);
