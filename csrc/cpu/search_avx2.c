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

static inline float hsum_ps(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1)));
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

static void dot_i8(const float *qf, const int8_t *z, int64_t d, int64_t m, float *out)
{
    for (int64_t i = 0; i < m; i++, z += d) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= d; j += 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)(z + j));
            __m256 z0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            __m256 z1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + j), z0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + j + 8), z1, a1);
        }
        float s = hsum_ps(_mm256_add_ps(a0, a1));
        for (; j < d; j++) s += qf[j] * (float)z[j];
        out[i] = s;
    }
}

const tka_search_kernels tka_search_kernels_avx2 = {dot_f32, dot_f64, dot_i8};
