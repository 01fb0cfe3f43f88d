/*
 * kernels_avx512.c - the kernel set for AVX-512F: eight float64 lanes, mask registers.
 * Compiled with -mavx512f -mavx2 -mfma -mf16c; only reached through the dispatch table
 * (which also requires AVX2, FMA and F16C).
 */
#include <immintrin.h>
#include <math.h>

#include "../internal.h"

typedef __m512d VD;
typedef __mmask8 VM;
#define VW 8
#define VM_ALL ((__mmask8)0xFF)

static inline VD vd_set1(double a) { return _mm512_set1_pd(a); }
static inline VD vd_add(VD a, VD b) { return _mm512_add_pd(a, b); }
static inline VD vd_sub(VD a, VD b) { return _mm512_sub_pd(a, b); }
static inline VD vd_mul(VD a, VD b) { return _mm512_mul_pd(a, b); }
static inline VD vd_fma(VD a, VD b, VD c) { return _mm512_fmadd_pd(a, b, c); }
static inline VD vd_max(VD a, VD b) { return _mm512_max_pd(a, b); }
static inline VD vd_min(VD a, VD b) { return _mm512_min_pd(a, b); }
static inline VM vd_gt(VD a, VD b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
static inline VM vd_lt(VD a, VD b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
static inline VM vd_ge(VD a, VD b) { return _mm512_cmp_pd_mask(a, b, _CMP_GE_OQ); }
static inline VM vd_le(VD a, VD b) { return _mm512_cmp_pd_mask(a, b, _CMP_LE_OQ); }
static inline VM vd_eq(VD a, VD b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
static inline VM vd_unord(VD a, VD b) { return _mm512_cmp_pd_mask(a, b, _CMP_UNORD_Q); }
static inline VM vm_and(VM a, VM b) { return (VM)(a & b); }
static inline VM vm_or(VM a, VM b) { return (VM)(a | b); }
static inline unsigned vm_bits(VM a) { return (unsigned)a; }
static inline VM vm_firstn(int k) { return (VM)((1u << k) - 1u); }
static inline VD vd_maskz(VM m, VD v) { return _mm512_maskz_mov_pd(m, v); }
#define TKA_HAVE_VD_ADD_MASKED 1
static inline VD vd_add_masked(VD a, VM m, VD b) { return _mm512_mask_add_pd(a, m, a, b); }
static inline VD vd_blend(VM m, VD a, VD b) { return _mm512_mask_blend_pd(m, b, a); }
static inline void vd_store(double *p, VD v) { _mm512_storeu_pd(p, v); }
/* out[i] = scale * (sum of the lanes of a_i), i < 4 */
static inline void vd_hsum4(VD a0, VD a1, VD a2, VD a3, double scale, double *out)
{
    out[0] = scale * _mm512_reduce_add_pd(a0);
    out[1] = scale * _mm512_reduce_add_pd(a1);
    out[2] = scale * _mm512_reduce_add_pd(a2);
    out[3] = scale * _mm512_reduce_add_pd(a3);
}
/* 2^(m >> 5) * tka_exp2_32[m & 31] for t = y + TKA_MAGIC, m = round(y) (see vd_exp). The 32
 * entries are four registers: two two-register permutes (index bits 0-3) and a blend on
 * bit 4, instead of a gather (slow on some cores). */
static inline VD vd_exp2_tab(VD t)
{
    const __m512i magic = _mm512_castpd_si512(_mm512_set1_pd(6755399441055744.0));
    __m512i m = _mm512_sub_epi64(_mm512_castpd_si512(t), magic);
    __m512i e = _mm512_slli_epi64(_mm512_andnot_si512(_mm512_set1_epi64(31), m), 47);
    const __m512d t0 = _mm512_loadu_pd(tka_exp2_32), t1 = _mm512_loadu_pd(tka_exp2_32 + 8);
    const __m512d t2 = _mm512_loadu_pd(tka_exp2_32 + 16), t3 = _mm512_loadu_pd(tka_exp2_32 + 24);
    const __mmask8 b4 = _mm512_test_epi64_mask(m, _mm512_set1_epi64(16));
    __m512d v = _mm512_mask_blend_pd(b4, _mm512_permutex2var_pd(t0, m, t1),
                                     _mm512_permutex2var_pd(t2, m, t3));
    return _mm512_castsi512_pd(_mm512_add_epi64(_mm512_castpd_si512(v), e));
}
static inline int vd_compress(double *dst, int64_t *idst, VM m, VD v, int64_t base)
{
    /* compress in a register, then a full store (VW slots, as the AVX2 set writes): a
     * compressing store to memory is microcoded and slow on some cores (AMD Zen 4) */
    _mm512_storeu_pd(dst, _mm512_maskz_compress_pd(m, v));
    if (idst) {
        __m512i pos = _mm512_add_epi64(_mm512_set1_epi64(base), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
        _mm512_storeu_si512(idst, _mm512_maskz_compress_epi64(m, pos));
    }
    return __builtin_popcount((unsigned)m);
}

/* float32 vectors for the float32-accumulating scores (kernels.inc) */
typedef __m512 VS;
#define VSW 16
static inline VS vs_zero(void) { return _mm512_setzero_ps(); }
static inline VS vs_load(const float *p) { return _mm512_loadu_ps(p); }
static inline VS vs_fma(VS a, VS b, VS c) { return _mm512_fmadd_ps(a, b, c); }
static inline VS vs_set1(float a) { return _mm512_set1_ps(a); }
/* c + a x where a != 0, else c unchanged (no branch) */
static inline VS vs_fma_nz(float a, VS x, VS c)
{
    return _mm512_mask3_fmadd_ps(_mm512_set1_ps(a), x, c, (__mmask16)-(int)(a != 0.0f));
}
/* lanes j + (j+8) of a 16-lane vector */
static inline __m256 vs_fold(VS a)
{
    return _mm256_add_ps(_mm512_castps512_ps256(a),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
/* scale * (sum of the lanes of a_i) for the eight slots, into s0 (slots 0-3) and s1 (4-7):
 * for every slot, lane j + lane j+8, then as the AVX2 set sums its eight lanes (the last
 * addition in float64) */
static inline void vs_hsum8_pd(VS a0, VS a1, VS a2, VS a3, VS a4, VS a5, VS a6, VS a7,
                               double scale, __m256d *s0, __m256d *s1)
{
    const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(vs_fold(a0), vs_fold(a1)),
                                     _mm256_hadd_ps(vs_fold(a2), vs_fold(a3)));
    const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(vs_fold(a4), vs_fold(a5)),
                                     _mm256_hadd_ps(vs_fold(a6), vs_fold(a7)));
    const __m256d sc = _mm256_set1_pd(scale);
    *s0 = _mm256_mul_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(g0)),
                                      _mm256_cvtps_pd(_mm256_extractf128_ps(g0, 1))), sc);
    *s1 = _mm256_mul_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(g1)),
                                      _mm256_cvtps_pd(_mm256_extractf128_ps(g1, 1))), sc);
}
#include "x86_hsum.h"
/* o[l] += (double)c[l] for the sixteen lanes, converted in registers */
static inline void vs_flush(double *o, VS c)
{
    _mm512_storeu_pd(o, _mm512_add_pd(_mm512_loadu_pd(o), _mm512_cvtps_pd(_mm512_castps512_ps256(c))));
    _mm512_storeu_pd(o + 8, _mm512_add_pd(_mm512_loadu_pd(o + 8),
                                          _mm512_cvtps_pd(_mm256_castpd_ps(
                                              _mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)))));
}
#define VS_HAVE_FLUSH

static inline VD vload_f32_avx512(const float *p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
static inline VD vload_f64_avx512(const double *p) { return _mm512_loadu_pd(p); }

/* float16 (F16C): eight values to float32, then to float64; both steps are exact */
static inline VD vload_f16_avx512(const uint16_t *p)
{
    return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
}
static void f16_to_f32_avx512(const uint16_t *src, int64_t n, float *dst)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++) dst[i] = tka_half_to_float(src[i]);
}
#define vload_f64_isa vload_f64_avx512
#define TO_F64(e) ((double)(e))
#define ELT float
#define FN(name) name##_f32_avx512
#include "kernels.inc"
#undef ELT
#undef FN
#define ELT double
#define FN(name) name##_f64_avx512
#include "kernels.inc"
#undef ELT
#undef FN
#undef TO_F64
#define TO_F64(e) ((double)tka_half_to_float(e))
#define TKA_KERNELS_DOT_ONLY
#define ELT uint16_t
#define FN(name) name##_f16_avx512
#include "kernels.inc"
#undef ELT
#undef FN
#undef TO_F64
#undef TKA_KERNELS_DOT_ONLY

/* No AVX-512 search kernels: the AVX2 ones run on every CPU that has AVX-512F, AVX2 and
 * FMA, which selecting this set requires (dispatch.c). */
const tka_kernels tka_kernels_avx512 = TKA_TABLE(avx512, TKA_SIMD_AVX512, &tka_search_kernels_avx512);
