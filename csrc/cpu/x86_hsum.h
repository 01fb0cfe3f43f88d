/*
 * x86_hsum.h - the stores of the float32 score sums shared by the AVX2 and AVX-512 kernel
 * sets. The including file defines
 *   vs_hsum8_pd(a0, ..., a7, scale, __m256d *s0, __m256d *s1)  scale * (sum of the lanes
 *       of a_i) for slots 0-3 into s0 and 4-7 into s1
 * and gets vs_hsum8 and vs_hsum8_pairs (kernels.inc). Both write from the registers: a
 * buffer stored whole and read back value by value makes each read wait on the wide store.
 */
#ifndef TKA_X86_HSUM_H
#define TKA_X86_HSUM_H

/* out[m*os] = s0[m], out[m*os + 1] = s1[m] for m < 4 */
static inline void tka_store_pairs_pd(__m256d s0, __m256d s1, double *out, int64_t os)
{
    const __m256d lo = _mm256_unpacklo_pd(s0, s1), hi = _mm256_unpackhi_pd(s0, s1);
    _mm_storeu_pd(out, _mm256_castpd256_pd128(lo));
    _mm_storeu_pd(out + os, _mm256_castpd256_pd128(hi));
    _mm_storeu_pd(out + 2 * os, _mm256_extractf128_pd(lo, 1));
    _mm_storeu_pd(out + 3 * os, _mm256_extractf128_pd(hi, 1));
}

/* out[i] = scale * (sum of the lanes of a_i) */
static inline void vs_hsum8(VS a0, VS a1, VS a2, VS a3, VS a4, VS a5, VS a6, VS a7,
                            double scale, double *out)
{
    __m256d s0, s1;
    vs_hsum8_pd(a0, a1, a2, a3, a4, a5, a6, a7, scale, &s0, &s1);
    _mm256_storeu_pd(out, s0);
    _mm256_storeu_pd(out + 4, s1);
}

/* The same sums stored as pairs: out[m*os] = slot m, out[m*os + 1] = slot 4 + m (m < 4) */
static inline void vs_hsum8_pairs(VS a0, VS a1, VS a2, VS a3, VS a4, VS a5, VS a6, VS a7,
                                  double scale, double *out, int64_t os)
{
    __m256d s0, s1;
    vs_hsum8_pd(a0, a1, a2, a3, a4, a5, a6, a7, scale, &s0, &s1);
    tka_store_pairs_pd(s0, s1, out, os);
}
#define VS_HAVE_HSUM8_PAIRS

#endif
