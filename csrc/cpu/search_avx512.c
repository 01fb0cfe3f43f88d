/*
 * search_avx512.c - the certified search's kernels for the AVX-512 set: the int8 code dot
 * products in 512-bit registers (AVX-512BW vpmaddwd), the rest from the AVX2 set.
 * Compiled with -mavx512f -mavx512bw -mavx2 -mfma -mf16c; reached only through the AVX-512
 * kernel table after the dispatcher has seen AVX-512F and AVX-512BW.
 */
#include <immintrin.h>

#include "../internal.h"
#include "../search.h"

static void dot_f32(const double *q, const float *k, int64_t d, int64_t m, double *out)
{
    tka_search_kernels_avx2.dot_f32(q, k, d, m, out);
}

static void dot_f64(const double *q, const double *k, int64_t d, int64_t m, double *out)
{
    tka_search_kernels_avx2.dot_f64(q, k, d, m, out);
}

static void dot_f16(const double *q, const uint16_t *k, int64_t d, int64_t m, double *out)
{
    tka_search_kernels_avx2.dot_f16(q, k, d, m, out);
}

/*
 * sum_j y[j] z[j] for m keys: vpmaddwd multiplies 32 int16 pairs and adds neighbours into
 * 16 int32 lanes. Every product is below 2^15 * 127 and the caller keeps d max|y| 127 below
 * 2^31, so each lane's partial sums and the final sum are exact in int32, and the result is
 * the AVX2 kernel's (integer addition in any order). With AVX512-VNNI, vpdpwssd multiplies
 * the same int16 pairs and adds both products into the int32 lane in one instruction (the
 * non-saturating form: the same exact sums, so the same result). Four keys per step.
 */
#define DOT_I8_STEPS(MADD)                                                                     \
    for (; i + 4 <= m; i += 4, z += 4 * d) {                                                   \
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;                        \
        for (int64_t j = 0; j < d; j += 32) {                                                  \
            const __m512i yv = _mm512_loadu_si512((const void *)(y + j));                      \
            a0 = MADD(a0, yv, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(z + j)))); \
            a1 = MADD(a1, yv, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(z + d + j)))); \
            a2 = MADD(a2, yv, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(z + 2 * d + j)))); \
            a3 = MADD(a3, yv, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(z + 3 * d + j)))); \
        }                                                                                      \
        /* the four sums reduced together: halves, then two rounds of pairwise adds */        \
        const __m256i y0 = _mm256_add_epi32(_mm512_castsi512_si256(a0), _mm512_extracti64x4_epi64(a0, 1)); \
        const __m256i y1 = _mm256_add_epi32(_mm512_castsi512_si256(a1), _mm512_extracti64x4_epi64(a1, 1)); \
        const __m256i y2 = _mm256_add_epi32(_mm512_castsi512_si256(a2), _mm512_extracti64x4_epi64(a2, 1)); \
        const __m256i y3 = _mm256_add_epi32(_mm512_castsi512_si256(a3), _mm512_extracti64x4_epi64(a3, 1)); \
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(y0, y1), _mm256_hadd_epi32(y2, y3)); \
        _mm_storeu_si128((__m128i *)(out + i),                                                 \
                         _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))); \
    }

#define MADD_BW(acc, a, b) _mm512_add_epi32((acc), _mm512_madd_epi16((a), (b)))
#define MADD_VNNI(acc, a, b) _mm512_dpwssd_epi32((acc), (a), (b))

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int64_t dot_i8_vnni(const int16_t *y, const int8_t *z, int64_t d, int64_t m, int32_t *out)
{
    int64_t i = 0;
    DOT_I8_STEPS(MADD_VNNI)
    return i;
}

static int64_t dot_i8_bw(const int16_t *y, const int8_t *z, int64_t d, int64_t m, int32_t *out)
{
    int64_t i = 0;
    DOT_I8_STEPS(MADD_BW)
    return i;
}

/*
 * Four queries and four keys per step: each key's 32 codes are widened once and multiplied
 * with the four queries' (sixteen sums in registers), then each query's four sums reduced
 * as in DOT_I8_STEPS: the same exact int32 sums as dot_i8 for each query.
 */
#define DOT4_LOADZ(u) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(z + (u) * d + j)))
#define DOT4_ROW(MADD, r, a0, a1, a2, a3)                                                      \
    do {                                                                                       \
        const __m512i yv = _mm512_loadu_si512((const void *)(y[r] + j));                      \
        a0 = MADD(a0, yv, z0);                                                                 \
        a1 = MADD(a1, yv, z1);                                                                 \
        a2 = MADD(a2, yv, z2);                                                                 \
        a3 = MADD(a3, yv, z3);                                                                 \
    } while (0)
#define DOT4_HALF(a) _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1))
#define DOT4_STORE(r, a0, a1, a2, a3)                                                          \
    do {                                                                                       \
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(DOT4_HALF(a0), DOT4_HALF(a1)),  \
                                            _mm256_hadd_epi32(DOT4_HALF(a2), DOT4_HALF(a3))); \
        _mm_storeu_si128((__m128i *)(out[r] + i),                                              \
                         _mm_add_epi32(_mm256_castsi256_si128(h),                              \
                                       _mm256_extracti128_si256(h, 1)));                       \
    } while (0)
#define DOT4_I8_STEPS(MADD)                                                                    \
    for (; i + 4 <= m; i += 4, z += 4 * d) {                                                   \
        __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;                 \
        __m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00;                                    \
        __m512i a20 = a00, a21 = a00, a22 = a00, a23 = a00;                                    \
        __m512i a30 = a00, a31 = a00, a32 = a00, a33 = a00;                                    \
        for (int64_t j = 0; j < d; j += 32) {                                                  \
            const __m512i z0 = DOT4_LOADZ(0), z1 = DOT4_LOADZ(1), z2 = DOT4_LOADZ(2),          \
                          z3 = DOT4_LOADZ(3);                                                  \
            DOT4_ROW(MADD, 0, a00, a01, a02, a03);                                             \
            DOT4_ROW(MADD, 1, a10, a11, a12, a13);                                             \
            DOT4_ROW(MADD, 2, a20, a21, a22, a23);                                             \
            DOT4_ROW(MADD, 3, a30, a31, a32, a33);                                             \
        }                                                                                      \
        DOT4_STORE(0, a00, a01, a02, a03);                                                     \
        DOT4_STORE(1, a10, a11, a12, a13);                                                     \
        DOT4_STORE(2, a20, a21, a22, a23);                                                     \
        DOT4_STORE(3, a30, a31, a32, a33);                                                     \
    }

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int64_t dot4_i8_vnni(const int16_t *const *y, const int8_t *z, int64_t d, int64_t m,
                            int32_t *const *out)
{
    int64_t i = 0;
    DOT4_I8_STEPS(MADD_VNNI)
    return i;
}

static int64_t dot4_i8_bw(const int16_t *const *y, const int8_t *z, int64_t d, int64_t m,
                          int32_t *const *out)
{
    int64_t i = 0;
    DOT4_I8_STEPS(MADD_BW)
    return i;
}

/* Four keys per step when d is a multiple of 32 (returns how many keys were done), the
 * rest by the AVX2 kernel. */
static void dot_i8(const int16_t *y, const int8_t *z, int64_t d, int64_t m, int32_t *out)
{
    int64_t i = 0;
    if ((d & 31) == 0) i = tka_avx512vnni() ? dot_i8_vnni(y, z, d, m, out) : dot_i8_bw(y, z, d, m, out);
    if (i < m) tka_search_kernels_avx2.dot_i8(y, z + i * d, d, m - i, out + i);
}

/* Four keys per step when d is a multiple of 32, the rest by dot_i8 for each query. */
static void dot4_i8(const int16_t *const *y, const int8_t *z, int64_t d, int64_t m,
                    int32_t *const *out)
{
    int64_t i = 0;
    if ((d & 31) == 0)
        i = tka_avx512vnni() ? dot4_i8_vnni(y, z, d, m, out) : dot4_i8_bw(y, z, d, m, out);
    for (int r = 0; r < 4 && i < m; r++) dot_i8(y[r], z + i * d, d, m - i, out[r] + i);
}

/* The AVX2 kernel's operations, eight keys per step: the same bounds and levels, bit for
 * bit (each lane's arithmetic is the scalar formula's, in its order). */
static void proxy_levels(int32_t *dl, const float *sc, const float *perr, int64_t m,
                         const tka_proxy_consts *c)
{
    const __m512d bq = _mm512_set1_pd(c->bq), sl = _mm512_set1_pd(c->slack_code),
                  qn2 = _mm512_set1_pd(c->qn2), ubb = _mm512_set1_pd(c->ubb),
                  ref = _mm512_set1_pd(c->ref), pad = _mm512_set1_pd(0x1p-1060 + c->eta),
                  rel = _mm512_set1_pd(0x1p-50), mg = _mm512_set1_pd(c->margin),
                  r9 = _mm512_set1_pd(1e-9), inv = _mm512_set1_pd(1.0 / TKA_LEVEL_W),
                  zero = _mm512_setzero_pd(), top = _mm512_set1_pd((double)(TKA_NLEVELS - 1));
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
        __m512d s = _mm512_cvtps_pd(_mm256_loadu_ps(sc + i));
        __m512d dt = _mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i *)(dl + i)));
        __m512d e = _mm512_cvtps_pd(_mm256_loadu_ps(perr + i));
        __m512d p = _mm512_mul_pd(s, _mm512_mul_pd(bq, dt));
        p = _mm512_add_pd(p, _mm512_mul_pd(s, sl));
        p = _mm512_add_pd(p, _mm512_mul_pd(qn2, e));
        __m512d ap = _mm512_abs_pd(p);
        p = _mm512_add_pd(p, _mm512_add_pd(_mm512_mul_pd(rel, ap), pad));
        p = _mm512_min_pd(p, ubb); /* NaN -> ubb (vminpd returns its second operand) */
        ap = _mm512_abs_pd(p);
        __m512d gap = _mm512_sub_pd(_mm512_sub_pd(ref, p), mg);
        gap = _mm512_mul_pd(_mm512_sub_pd(gap, _mm512_mul_pd(r9, ap)), inv);
        gap = _mm512_min_pd(_mm512_max_pd(gap, zero), top);
        _mm256_storeu_si256((__m256i *)(dl + i), _mm512_cvttpd_epi32(gap));
    }
    if (i < m) tka_search_kernels_avx2.proxy_levels(dl + i, sc + i, perr + i, m - i, c);
}

/* 4-bit codes: the AVX2 version */
static void dot_u4(const int8_t *y, const uint8_t *z, int64_t hb, int64_t m, int32_t bias,
                   int32_t *out)
{
    tka_search_kernels_avx2.dot_u4(y, z, hb, m, bias, out);
}

/* the block bounds: the AVX2 set's */
static void mass_bounds(double *ub, const double *rad, const double *mom, int64_t m,
                        const tka_mass_consts *c, double *um)
{
    tka_search_kernels_avx2.mass_bounds(ub, rad, mom, m, c, um);
}

const tka_search_kernels tka_search_kernels_avx512 = {dot_f32, dot_f64, dot_f16, dot_i8,
                                                      dot4_i8, dot_u4, proxy_levels, mass_bounds};
