/*
 * search_avx2.c - dot-product kernels of the certified search for AVX2 + FMA.
 * Compiled with -mavx2 -mfma -mf16c; reached only through tka_search_kernels_avx2 after
 * the dispatcher has seen AVX2, FMA and F16C.
 */
#include <immintrin.h>

#include "../internal.h"
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

/* dot_f32 for float16 keys (F16C): the same operations on the same values */
static void dot_f16(const double *q, const uint16_t *k, int64_t d, int64_t m, double *out)
{
    for (int64_t i = 0; i < m; i++, k += d) {
        __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + j)));
            a0 = _mm256_fmadd_pd(_mm256_loadu_pd(q + j),
                                 _mm256_cvtps_pd(_mm256_castps256_ps128(kv)), a0);
            a1 = _mm256_fmadd_pd(_mm256_loadu_pd(q + j + 4),
                                 _mm256_cvtps_pd(_mm256_extractf128_ps(kv, 1)), a1);
        }
        double s = hsum_pd(_mm256_add_pd(a0, a1));
        for (; j < d; j++) s += q[j] * (double)tka_half_to_float(k[j]);
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
    /* four keys at a time, reduced together (three horizontal adds for four sums) */
    if ((d & 15) == 0) {
        for (; i + 4 <= m; i += 4, z += 4 * d) {
            __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
            __m256i a2 = _mm256_setzero_si256(), a3 = _mm256_setzero_si256();
            for (int64_t j = 0; j < d; j += 16) {
                __m256i yv = _mm256_loadu_si256((const __m256i *)(y + j));
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(yv, _mm256_cvtepi8_epi16(
                         _mm_loadu_si128((const __m128i *)(z + j)))));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(yv, _mm256_cvtepi8_epi16(
                         _mm_loadu_si128((const __m128i *)(z + d + j)))));
                a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(yv, _mm256_cvtepi8_epi16(
                         _mm_loadu_si128((const __m128i *)(z + 2 * d + j)))));
                a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(yv, _mm256_cvtepi8_epi16(
                         _mm_loadu_si128((const __m128i *)(z + 3 * d + j)))));
            }
            __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            _mm_storeu_si128((__m128i *)(out + i), t);
        }
    }
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

static void proxy_levels(int32_t *dl, const float *sc, const float *perr, int64_t m,
                         const tka_proxy_consts *c)
{
    const __m256d bq = _mm256_set1_pd(c->bq), sl = _mm256_set1_pd(c->slack_code),
                  qn2 = _mm256_set1_pd(c->qn2), ubb = _mm256_set1_pd(c->ubb),
                  ref = _mm256_set1_pd(c->ref), pad = _mm256_set1_pd(0x1p-1060 + c->eta),
                  rel = _mm256_set1_pd(0x1p-50), mg = _mm256_set1_pd(c->margin),
                  r9 = _mm256_set1_pd(1e-9), inv = _mm256_set1_pd(1.0 / TKA_LEVEL_W),
                  zero = _mm256_setzero_pd(), top = _mm256_set1_pd((double)(TKA_NLEVELS - 1)),
                  absm = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll));
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        __m256d s = _mm256_cvtps_pd(_mm_loadu_ps(sc + i));
        __m256d dt = _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(dl + i)));
        __m256d e = _mm256_cvtps_pd(_mm_loadu_ps(perr + i));
        __m256d p = _mm256_mul_pd(s, _mm256_mul_pd(bq, dt));
        p = _mm256_add_pd(p, _mm256_mul_pd(s, sl));
        p = _mm256_add_pd(p, _mm256_mul_pd(qn2, e));
        __m256d ap = _mm256_and_pd(p, absm);
        p = _mm256_add_pd(p, _mm256_add_pd(_mm256_mul_pd(rel, ap), pad));
        p = _mm256_min_pd(p, ubb); /* NaN -> ubb */
        ap = _mm256_and_pd(p, absm);
        __m256d gap = _mm256_sub_pd(_mm256_sub_pd(ref, p), mg);
        gap = _mm256_mul_pd(_mm256_sub_pd(gap, _mm256_mul_pd(r9, ap)), inv);
        gap = _mm256_min_pd(_mm256_max_pd(gap, zero), top);
        _mm_storeu_si128((__m128i *)(dl + i), _mm256_cvttpd_epi32(gap));
    }
    if (i < m) tka_search_kernels_scalar.proxy_levels(dl + i, sc + i, perr + i, m - i, c);
}

/* Two keys' sums of one query (accumulators a0, a1) reduced and stored at out[r] + i. */
#define DOT4_STORE2(r, a0, a1)                                                                 \
    do {                                                                                       \
        __m256i h_ = _mm256_hadd_epi32(a0, a1);                                                \
        h_ = _mm256_hadd_epi32(h_, h_);                                                        \
        const __m128i t_ = _mm_add_epi32(_mm256_castsi256_si128(h_),                           \
                                         _mm256_extracti128_si256(h_, 1));                     \
        _mm_storel_epi64((__m128i *)(out[r] + i), t_);                                         \
    } while (0)
#define DOT4_MADD(acc, r, zv)                                                                  \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(                                             \
              _mm256_loadu_si256((const __m256i *)(y[r] + j)), zv))

/* Four queries, two keys per step when d is a multiple of 16 (each key's codes widened once
 * for the four; eight sums in registers), the rest by dot_i8 for each query: the same
 * exact int32 sums. */
static void dot4_i8(const int16_t *const *y, const int8_t *z, int64_t d, int64_t m,
                    int32_t *const *out)
{
    int64_t i = 0;
    if ((d & 15) == 0) {
        for (; i + 2 <= m; i += 2, z += 2 * d) {
            __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00;
            __m256i a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            for (int64_t j = 0; j < d; j += 16) {
                const __m256i z0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(z + j)));
                const __m256i z1 = _mm256_cvtepi8_epi16(
                    _mm_loadu_si128((const __m128i *)(z + d + j)));
                DOT4_MADD(a00, 0, z0);
                DOT4_MADD(a01, 0, z1);
                DOT4_MADD(a10, 1, z0);
                DOT4_MADD(a11, 1, z1);
                DOT4_MADD(a20, 2, z0);
                DOT4_MADD(a21, 2, z1);
                DOT4_MADD(a30, 3, z0);
                DOT4_MADD(a31, 3, z1);
            }
            DOT4_STORE2(0, a00, a01);
            DOT4_STORE2(1, a10, a11);
            DOT4_STORE2(2, a20, a21);
            DOT4_STORE2(3, a30, a31);
        }
    }
    for (int r = 0; r < 4 && i < m; r++) dot_i8(y[r], z, d, m - i, out[r] + i);
}

/* The 4-bit codes of 32 bytes (64 dimensions) against their query codes: vpmaddubsw
 * multiplies the unsigned codes (0..15) by the signed query codes (|y| <= 127) and adds
 * neighbours (at most 2 15 127 = 3810: no saturation), the two nibbles' sums are added in
 * int16 (at most 7620) and vpmaddwd widens neighbours to int32: exact. */
static inline __m256i u4_step(__m256i acc, __m256i x, __m256i yl, __m256i yh)
{
    const __m256i mask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256i lo = _mm256_and_si256(x, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), mask);
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, yl), _mm256_maddubs_epi16(hi, yh));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
}

static void dot_u4(const int8_t *y, const uint8_t *z, int64_t hb, int64_t m, int32_t bias,
                   int32_t *out)
{
    int64_t i = 0;
    const int64_t h32 = hb & ~(int64_t)31;
    if (h32 == hb) {  /* four keys at a time, reduced together */
        for (; i + 4 <= m; i += 4, z += 4 * hb) {
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t t = 0; t < hb; t += 32) {
                const __m256i yl = _mm256_loadu_si256((const __m256i *)(y + t));
                const __m256i yh = _mm256_loadu_si256((const __m256i *)(y + hb + t));
                a0 = u4_step(a0, _mm256_loadu_si256((const __m256i *)(z + t)), yl, yh);
                a1 = u4_step(a1, _mm256_loadu_si256((const __m256i *)(z + hb + t)), yl, yh);
                a2 = u4_step(a2, _mm256_loadu_si256((const __m256i *)(z + 2 * hb + t)), yl, yh);
                a3 = u4_step(a3, _mm256_loadu_si256((const __m256i *)(z + 3 * hb + t)), yl, yh);
            }
            __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            _mm_storeu_si128((__m128i *)(out + i), _mm_sub_epi32(s, _mm_set1_epi32(bias)));
        }
    }
    for (; i < m; i++, z += hb) {
        __m256i a0 = _mm256_setzero_si256();
        for (int64_t t = 0; t < h32; t += 32)
            a0 = u4_step(a0, _mm256_loadu_si256((const __m256i *)(z + t)),
                         _mm256_loadu_si256((const __m256i *)(y + t)),
                         _mm256_loadu_si256((const __m256i *)(y + hb + t)));
        int32_t s = hsum_epi32(a0);
        for (int64_t t = h32; t < hb; t++)
            s += (int32_t)y[t] * (int32_t)(z[t] & 15) + (int32_t)y[hb + t] * (int32_t)(z[t] >> 4);
        out[i] = s - bias;
    }
}

/*
 * The block bounds of search_scalar.c's mass_bounds, four blocks at a time: the same
 * operations in the same order (no fused multiply-adds: -ffp-contract=off), e^R's table
 * value gathered, floor by roundpd, the exponents moved through the bits as there, so the
 * same bounds bit for bit. Lanes whose moments are not finite, or R >= 700, or whose S
 * reaches 2^1000, keep ub (their other values are computed from R = 1 and dropped).
 */
static void mass_bounds(double *ub, const double *rad, const double *mom, int64_t m,
                        const tka_mass_consts *c, double *um)
{
    const __m256d qn2 = _mm256_set1_pd(c->qn2), q2 = _mm256_set1_pd(c->q2),
                  g = _mm256_set1_pd(c->g), cab = _mm256_set1_pd(c->cab),
                  c1060 = _mm256_set1_pd(c->c1060), eta = _mm256_set1_pd(c->eta),
                  inv_m = _mm256_set1_pd(c->inv_m), g1 = _mm256_set1_pd(1.0 + c->g),
                  one = _mm256_set1_pd(1.0), inf = _mm256_set1_pd(INFINITY),
                  r700 = _mm256_set1_pd(700.0),
                  log2e = _mm256_set1_pd(1.4426950408889634), up50 = _mm256_set1_pd(1.0 + 0x1p-50),
                  up40 = _mm256_set1_pd(1.0 + 0x1p-40), p40 = _mm256_set1_pd(0x1p-40),
                  two = _mm256_set1_pd(2.0), x32 = _mm256_set1_pd(32.0),
                  phi1 = _mm256_set1_pd(0.71828182845904524 * (1.0 + 0x1p-40)),
                  s1000 = _mm256_set1_pd(0x1p1000), ln2 = _mm256_set1_pd(0.69314718055994531),
                  l34 = _mm256_set1_pd(0.28768207245178090), c75 = _mm256_set1_pd(0.75),
                  c43 = _mm256_set1_pd(1.3333333333333333), e1022 = _mm256_set1_pd(1022.0),
                  m52 = _mm256_set1_pd(0x1p52),
                  absm = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll));
    const __m256i mant = _mm256_set1_epi64x(0x000fffffffffffffll),
                  half = _mm256_set1_epi64x(0x3fe0000000000000ll),
                  e7ff = _mm256_set1_epi64x(0x7ff), magic = _mm256_set1_epi64x(0x4330000000000000ll),
                  b1023 = _mm256_set1_epi64x(1023);
    const __m128i i31 = _mm_set1_epi32(31);
    int64_t b = 0;
    for (; b + 4 <= m; b += 4) {
        const __m256d dot = _mm256_loadu_pd(ub + b);
        const __m256d rr = _mm256_mul_pd(qn2, _mm256_loadu_pd(rad + b));
        const __m256d base = _mm256_add_pd(_mm256_add_pd(_mm256_add_pd(dot, cab), c1060), eta);
        __m256d t = _mm256_add_pd(rr, _mm256_mul_pd(g, rr));
        const __m256d u = _mm256_add_pd(dot, _mm256_add_pd(_mm256_add_pd(_mm256_add_pd(t, cab), c1060), eta));
        const __m256d R = _mm256_mul_pd(rr, g1);
        /* the moments of blocks b..b+3: (mom0, mom1) pairs */
        const __m256d ma = _mm256_loadu_pd(mom + 2 * b), mb = _mm256_loadu_pd(mom + 2 * b + 4);
        const __m256d mo0 = _mm256_permute4x64_pd(_mm256_unpacklo_pd(ma, mb), 0xD8);
        const __m256d mo1 = _mm256_permute4x64_pd(_mm256_unpackhi_pd(ma, mb), 0xD8);
        __m256d ok = _mm256_and_pd(_mm256_and_pd(_mm256_cmp_pd(mo0, inf, _CMP_LT_OQ),
                                                 _mm256_cmp_pd(mo1, inf, _CMP_LT_OQ)),
                                   _mm256_cmp_pd(R, r700, _CMP_LT_OQ));
        /* exp_up(R), on R = 1 in the lanes that keep ub */
        const __m256d Rc = _mm256_blendv_pd(one, R, ok);
        t = _mm256_mul_pd(_mm256_mul_pd(Rc, log2e), up50);
        const __m256d k = _mm256_floor_pd(t);
        const __m128i j = _mm256_cvttpd_epi32(_mm256_mul_pd(_mm256_sub_pd(t, k), x32));
        const __m128i jn = _mm_min_epi32(_mm_add_epi32(j, _mm_set1_epi32(1)), i31);
        __m256d p = _mm256_i32gather_pd(tka_exp2_32, jn, 8);
        const __m256d last = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm_cmpeq_epi32(j, i31)));
        p = _mm256_blendv_pd(p, two, last);
        const __m256i kb = _mm256_slli_epi64(
            _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvttpd_epi32(k)), b1023), 52);
        const __m256d ex = _mm256_mul_pd(_mm256_mul_pd(p, up50), _mm256_castsi256_pd(kb));
        __m256d phi = _mm256_mul_pd(
            _mm256_div_pd(_mm256_sub_pd(_mm256_sub_pd(ex, one), Rc), _mm256_mul_pd(Rc, Rc)), up40);
        phi = _mm256_blendv_pd(phi1, phi, _mm256_cmp_pd(R, one, _CMP_GE_OQ));
        const __m256d extra = _mm256_mul_pd(
            _mm256_add_pd(_mm256_mul_pd(qn2, mo1), _mm256_mul_pd(phi, _mm256_mul_pd(mo0, q2))), up40);
        const __m256d S = _mm256_mul_pd(_mm256_add_pd(one, _mm256_mul_pd(extra, inv_m)), up50);
        ok = _mm256_and_pd(ok, _mm256_cmp_pd(S, s1000, _CMP_LT_OQ));
        /* log_up(S) */
        const __m256i sb = _mm256_castpd_si256(S);
        const __m256d eb = _mm256_sub_pd(
            _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi64(sb, 52), e7ff), magic)),
            m52);
        const __m256d M = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(sb, mant), half));
        const __m256d e = _mm256_sub_pd(eb, e1022);
        __m256d l = _mm256_add_pd(_mm256_sub_pd(_mm256_mul_pd(e, ln2), l34),
                                  _mm256_mul_pd(_mm256_sub_pd(M, c75), c43));
        l = _mm256_add_pd(l, _mm256_mul_pd(p40, _mm256_add_pd(one, _mm256_and_pd(l, absm))));
        const __m256d v = _mm256_add_pd(
            _mm256_add_pd(base, l),
            _mm256_mul_pd(p40, _mm256_add_pd(_mm256_and_pd(base, absm), _mm256_and_pd(l, absm))));
        const __m256d w = _mm256_blendv_pd(u, v, _mm256_cmp_pd(v, u, _CMP_LT_OQ));
        _mm256_storeu_pd(ub + b, u);
        _mm256_storeu_pd(um + b, _mm256_blendv_pd(u, w, ok));
    }
    if (b < m) tka_search_kernels_scalar.mass_bounds(ub + b, rad + b, mom + 2 * b, m - b, c, um + b);
}

const tka_search_kernels tka_search_kernels_avx2 = {dot_f32, dot_f64, dot_f16, dot_i8,
                                                    dot4_i8, dot_u4, proxy_levels, mass_bounds};
