/*
 * search_avx2.c - dot-product kernels of the certified search for AVX2 + FMA.
 * Compiled with -mavx2 -mfma; reached only through tka_search_kernels_avx2 after the
 * dispatcher has seen AVX2 and FMA.
 */
#include <immintrin.h>

#include "../search.h"

static inline double hsum_pd(__m256d v)
{
    __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
    lo = _mm_add_pd(lo, hi);
    return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
}

static void dot_f32(const double *q, const float *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            __m256 kv = _mm256_loadu_ps(k + j);
            a0 = _mm256_fmadd_pd(_mm256_loadu_pd(q + j),
                                 _mm256_cvtps_pd(_mm256_castps256_ps128(kv)), a0);
            a1 = _mm256_fmadd_pd(_mm256_loadu_pd(q + j + 4),
                                 _mm256_cvtps_pd(_mm256_extractf128_ps(kv, 1)), a1);
        }
        double s = hsum_pd(_mm256_add_pd(a0, a1));
        for (; j < d; j++) s += q[j] * (double)k[j];
        out[i] = s;
    }
}

static void dot_f64(const double *q, const double *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            a0 = _mm256_fmadd_pd(_mm256_loadu_pd(q + j), _mm256_loadu_pd(k + j), a0);
            a1 = _mm256_fmadd_pd(_mm256_loadu_pd(q + j + 4), _mm256_loadu_pd(k + j + 4), a1);
        }
        double s = hsum_pd(_mm256_add_pd(a0, a1));
        for (; j < d; j++) s += q[j] * k[j];
        out[i] = s;
    }
}

static inline int32_t hsum_epi32(__m256i v)
{
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4E));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xB1));
    return _mm_cvtsi128_si32(a);
}

static void dot_i8(const int16_t *y, const int8_t *z, int64_t d, int64_t m, int32_t *out)
{
    int64_t i = 0;
    /* two keys at a time: independent accumulators */
    for (; i + 2 <= m; i += 2, z += 2 * d) {
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
        int64_t j = 0;
        for (; j + 16 <= d; j += 16) {
            __m256i yv = _mm256_loadu_si256((const __m256i *)(y + j));
            __m256i z0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(z + j)));
            __m256i z1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(z + d + j)));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(yv, z0));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(yv, z1));
        }
        int32_t s0 = hsum_epi32(a0), s1 = hsum_epi32(a1);
        for (; j < d; j++) {
            s0 += (int32_t)y[j] * (int32_t)z[j];
            s1 += (int32_t)y[j] * (int32_t)z[d + j];
        }
        out[i] = s0;
        out[i + 1] = s1;
    }
    for (; i < m; i++, z += d) {
        __m256i a0 = _mm256_setzero_si256();
        int64_t j = 0;
        for (; j + 16 <= d; j += 16)
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(
                _mm256_loadu_si256((const __m256i *)(y + j)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(z + j)))));
        int32_t s0 = hsum_epi32(a0);
        for (; j < d; j++) s0 += (int32_t)y[j] * (int32_t)z[j];
        out[i] = s0;
    }
}

const tka_search_kernels tka_search_kernels_avx2 = {dot_f32, dot_f64, dot_i8};
