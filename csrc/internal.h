/*
 * internal.h - what the core's files share and users never see: the per-ISA kernel
 * table, the thread pool, scratch memory and the selection helpers.
 */
#ifndef TOPKATTN_INTERNAL_H
#define TOPKATTN_INTERNAL_H

#include <math.h>
#include <string.h>

#include "topkattn.h"

/* ------------------------------------------------------------------ platform */

/*
 * Kernel sets by target. The x86 sets (AVX2, AVX-512) need files compiled with their own
 * flags, so the build defines TKA_HAVE_X86 when it compiles them. NEON is baseline on
 * aarch64 (no flags, no run-time check), so its set is there whenever the compiler
 * targets aarch64; kernels_neon.c and search_neon.c are empty elsewhere.
 */
#if defined(TKA_HAVE_X86) && !(defined(__x86_64__) || defined(__i386__))
#error "TKA_HAVE_X86 is defined but the compiler does not target x86"
#endif
#if (defined(__aarch64__) || defined(_M_ARM64)) && defined(__ARM_NEON) && !defined(TKA_NO_NEON)
#define TKA_HAVE_NEON 1
#endif

/* ------------------------------------------------------------------ float16 */

/*
 * IEEE binary16 values travel as their bit patterns (uint16_t). Every one of them is
 * exactly a float32 (and a float64), so converting is exact; the kernel sets convert with
 * F16C (x86) or NEON instructions, these scalar functions give the same values anywhere.
 */
static inline float tka_half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13) | (m ? 0x00400000u : 0u); /* inf; NaN made quiet */
    } else if (e) {
        bits = sign | ((e + 112u) << 23) | (m << 13);                   /* normal */
    } else {
        float f = (float)m * 0x1p-24f;  /* zero or subnormal: m 2^-24, exact */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/** The float16 nearest to x (ties to even), as bits: how float16 outputs are stored. */
static inline uint16_t tka_double_to_half(double x)
{
    const uint16_t sign = signbit(x) ? 0x8000u : 0u;
    const double a = fabs(x);
    if (a != a) return (uint16_t)(sign | 0x7e00u);
    if (a >= 65520.0) return (uint16_t)(sign | 0x7c00u);  /* 65504 + half a step: to inf */
    if (a < 0x1p-14) /* subnormal range, steps of 2^-24 (1024 steps round up to 2^-14) */
        return (uint16_t)(sign | (uint16_t)nearbyint(a * 0x1p24));
    int e;
    (void)frexp(a, &e);                                  /* a in [2^(e-1), 2^e) */
    uint32_t m = (uint32_t)nearbyint(ldexp(a, 11 - e));  /* 11 significant bits */
    int he = e - 1 + 15;
    if (m == 2048u) {
        m = 1024u;
        he++;
    }
    if (he >= 31) return (uint16_t)(sign | 0x7c00u);
    return (uint16_t)(sign | ((uint32_t)he << 10) | (m - 1024u));
}

/* ------------------------------------------------------------------ kernels */

/** Result of one validation/max pass over a row. */
typedef struct {
    double max;         /**< largest logit (-inf if all are masked) */
    int64_t n_masked;   /**< number of -inf logits */
    int bad;            /**< nonzero if any logit is NaN or +inf */
} tka_scan_out;

/** Result of one band pass (see tka_kernels.band). */
typedef struct {
    int64_t n_above;    /**< x > hi */
    int64_t n_band;     /**< lo <= x <= hi, counted even past the gather capacity */
    double mass_above;  /**< sum of e^{x - ref} over x > hi (when masses were asked for) */
    double mass_below;  /**< sum of e^{x - ref} over x < lo */
} tka_band_out;

/** Result of k_eps's pass (see tka_kernels.keps_pass). */
typedef struct {
    int64_t n_above;    /**< x > hi */
    int64_t n_band;     /**< lo <= x <= hi, counted even past the gather capacity */
    double mass_above;  /**< sum of e^{x - ref} over x > hi */
    double mass_below;  /**< sum of e^{x - ref} over x < lo */
    double mass_total;  /**< sum of e^{x - ref} over the row */
    double max;         /**< largest x */
    int bad;            /**< nonzero if some x is NaN or +inf */
} tka_keps_pass_out;

/** Thresholds of one lt_sums call (see tka_kernels.lt_sums). */
#define TKA_LT_N 4

/** The certified search's kernels of one instruction set (defined in search.h). */
typedef struct tka_search_kernels tka_search_kernels;

/*
 * One instruction set's kernels, each for float32 [0] and float64 [1] rows (contiguous).
 * All arithmetic is float64. exp() of an argument below -708 is flushed to 0, i.e. an
 * absolute error under 3e-308 per term (callers pick references so that this is far below
 * the precision of the quantity they compute).
 */
typedef struct {
    tka_simd id;
    /** max, masked count and NaN/+inf detection. */
    void (*scan[2])(const void *x, int64_t n, tka_scan_out *out);
    /** sum over x > t of e^{x - ref_hi} into *hi and over x < t of e^{x - ref_lo} into *lo. */
    void (*sumexp_split[2])(const void *x, int64_t n, double t, double ref_hi, double ref_lo,
                            double *hi, double *lo);
    /** zb = sum of e^{x - ref} over x < ref; m1 = sum of e^{x - ref} (x - ref) over
     *  unmasked x; c = number of x equal to ref. */
    void (*sumexp_moment[2])(const void *x, int64_t n, double ref, double *zb, double *m1,
                             double *c);
    /**
     * Band pass: counts x > hi; when with_mass, sums e^{x - ref} above hi and below lo;
     * gathers x in [lo, hi] (as float64) into vals[] and their positions into idx[]
     * (if idx != NULL), at most cap of them; out->n_band counts them all.
     */
    void (*band[2])(const void *x, int64_t n, double lo, double hi, double ref, int with_mass,
                    double *vals, int64_t *idx, int64_t cap, tka_band_out *out);
    /** Largest x with x < t (-inf if none). */
    double (*max_below[2])(const void *x, int64_t n, double t);
    /** out[i] = e^{x[i] - ref}. */
    void (*exp_shift[2])(const void *x, int64_t n, double ref, double *out);
    /** out[i] = e^{x[i] - ref} where x[i] >= t, else 0 (t > -inf); *n_ge, *n_gt count the
     *  x >= t and the x > t. With m, the weights are m[i] (= e^{x[i] - ref} by the same
     *  vector exp, computed before), not computed again. */
    void (*exp_keep[2])(const void *x, int64_t n, double ref, double t, double *out,
                        int64_t *n_ge, int64_t *n_gt, const double *m);
    /** The x[i] >= t as float64 with their positions, in order, into vals, idx (room for
     *  n + 16); returns how many. */
    int64_t (*gather_ge[2])(const void *x, int64_t n, double t, double *vals, int64_t *idx);
    /** The positions of the x[i] >= t in order into idx and their m[i] into w (room for
     *  n + 16 each). Returns how many. */
    int64_t (*gather_ge_w[2])(const void *x, const double *m, int64_t n, double t, int64_t *idx,
                              double *w);
    /**
     * k_eps's pass: every e^{x - ref} once; sums over the row, above hi (and counts) and
     * below lo; checks the row (max, bad: NaN or +inf); gathers x in [lo, hi] as float64 into vals[] and e^{x - ref} into ms[], at
     * most cap; out->n_band counts them all.
     */
    void (*keps_pass[2])(const void *x, int64_t n, double lo, double hi, double ref,
                         double *vals, double *ms, int64_t cap, tka_keps_pass_out *out);
    /** For the TKA_LT_N thresholds t[j]: the sum of the masses m[i] of v[i] < t[j] (a
     *  higher threshold never gets a smaller sum); *total = sum of all masses. */
    void (*lt_sums[2])(const void *v, const double *m, int64_t n, const double *t,
                       double *mass, double *total);
    /** Gather lo <= v[i] < hi (as float64) with m[i] into ov[], om[] in order (capacity n;
     *  in place allowed for float64 v); returns the count, and in *below the count of
     *  v[i] < lo. */
    int64_t (*range_gather[2])(const void *v, const double *m, int64_t n, double lo,
                               double hi, double *ov, double *om, int64_t *below);
    /** out[i] = e^{x[i] - ref}; returns their sum (the same value as lt_sums' total). */
    double (*exp_total[2])(const void *x, int64_t n, double ref, double *out);
    /** One pass over a bracket [lo, up): sums m[i] over x[i] < lo (*mass_below, counted in
     *  *n_below), over the bracket (*mass_in) and over x[i] >= up (*mass_above); gathers
     *  lo <= x[i] < up in order into bv[] (as float64) and m[i] into bm[] (room for n + 16
     *  each). Returns the count gathered. */
    int64_t (*bracket[2])(const void *x, const double *m, int64_t n, double lo, double up,
                          double *bv, double *bm, int64_t *n_below, double *mass_below,
                          double *mass_in, double *mass_above);
    /* The attention kernels below also take float16 operands ([TKA_F16]); the row
     * kernels above never see float16 (rows are converted to float32 first). */
    /** out[i] = scale * q . x_i for n rows x_i = x + i*ld elements (d used); q is float64,
     *  zero-padded to a multiple of 8 values; accumulated in float64. */
    void (*dot[3])(const void *x, int64_t n, int64_t ld, const double *q, int64_t d,
                   double scale, double *out);
    /** dot for four queries q + m*qs at once, into out + m*os (m < 4). */
    void (*dot4[3])(const void *x, int64_t n, int64_t ld, const double *q, int64_t qs,
                    int64_t d, double scale, double *out, int64_t os);
    /** acc[j] += w * v[j], j < d, in float64. */
    void (*axpy[3])(const void *v, int64_t d, double w, double *acc);
    /** acc[j] = sum over t < k of w[t] v_{idx[t]}[j], j < dv (row i at v + i*ld elements):
     *  the same float64 sums as zeroing acc and calling axpy for t = 0, 1, ..., k-1. */
    void (*pv_idx[3])(const void *v, int64_t ld, const int64_t *idx, const double *w, int64_t k,
                      int64_t dv, double *acc);
    /** Weighted sums of n value rows (row i at v + i*ld elements, dv used) for m <= 4 rows
     *  of weights w[4*i + r] (interleaved, weights >= 0): acc[r*as + j] = sum over keys i
     *  with w[4*i + r] != 0 of w[4*i + r] v_i[j], in key order, float64, each term exactly
     *  as axpy adds it. */
    void (*pv[3])(const void *v, int64_t n, int64_t ld, const double *w, int m, int64_t dv,
                  double *acc, int64_t as);
    /** Scores of float32 keys against a float32 query (zero-padded to a multiple of 16
     *  values): out[i] = scale * q . x_i, the products accumulated in float32 within the
     *  vector lanes and the lanes summed by vs_hsum8 (kernels.inc); eight keys per step. */
    void (*sdot)(const float *x, int64_t n, int64_t ld, const float *q, int64_t d,
                 double scale, double *out);
    /** sdot for four queries q + m*qs at once into out + m*os: the same score, bit for bit,
     *  as sdot gives each pair. */
    void (*sdot4)(const float *x, int64_t n, int64_t ld, const float *q, int64_t qs, int64_t d,
                  double scale, double *out, int64_t os);
    /** pv for float32 values and float32 weights w[r*ws + i] (row r's weights contiguous):
     *  float32 fused multiply-adds within blocks of 64 keys, each block's sum added to the
     *  float64 acc (kernels.inc). */
    void (*spv)(const float *v, int64_t n, int64_t ld, const float *w, int64_t ws, int m,
                int64_t dv, double *acc, int64_t as);
    /** spv for the kept rows idx[0..k) of one Top-k row, float32 weights w[0..k) > 0 in
     *  the same order: float32 fused multiply-adds within blocks of 64 kept keys, each block's
     *  sum added to the float64 acc[0..dv) (zeroed first) (kernels.inc). */
    void (*spv_idx)(const float *v, int64_t ld, const int64_t *idx, const float *w, int64_t k,
                    int64_t dv, double *acc);
    /** dst[i] = src[i] for n float16 values (bits) into float32: exact. */
    void (*f16_to_f32)(const uint16_t *src, int64_t n, float *dst);
    /** The search's dot-product and proxy kernels for this instruction set. */
    const tka_search_kernels *search;
} tka_kernels;

/** The kernel sets (csrc/cpu/kernels_*.c) and the search kernels they point to
 *  (csrc/cpu/search_*.c); only dispatch.c chooses among them. */
extern const tka_kernels tka_kernels_scalar;
extern const tka_search_kernels tka_search_kernels_scalar;
#ifdef TKA_HAVE_X86
extern const tka_kernels tka_kernels_avx2;
extern const tka_kernels tka_kernels_avx512;
extern const tka_search_kernels tka_search_kernels_avx2;
extern const tka_search_kernels tka_search_kernels_avx512;
/** Whether the AVX-512 set's int8 code products use AVX512-VNNI (vpdpwssd): the CPU has it
 *  and it was not switched off by tka_avx512vnni_disable (tests). */
int tka_avx512vnni(void);
void tka_avx512vnni_disable(int off);
#endif
#ifdef TKA_HAVE_NEON
extern const tka_kernels tka_kernels_neon;
extern const tka_search_kernels tka_search_kernels_neon;
#endif

/** The kernel table in use (chosen at import, changeable with tka_simd_select). */
const tka_kernels *tka_kernels_active(void);

/* ------------------------------------------------------------ rounding up */

/** Above e^-700 (= 9.8596765437597708567e-305), so an upper bound on e^x for x <= -700. */
#define TKA_EXP_M700_UP 9.85967654375978e-305

/**
 * An upper bound on e^x for the certificates (docs/design.md §2): never below the true
 * value, never 0. exp() is within one ulp (2^-52 relative) of e^x, so exp(x) (1 + 2^-50)
 * is above it; arguments below -700 give TKA_EXP_M700_UP, which also covers the range where
 * exp() would lose precision to subnormals or underflow to 0. Callers only add such terms
 * to masses of order 1 or more, where e^-700 is negligible.
 */
static inline double tka_exp_up(double x)
{
    return x < -700.0 ? TKA_EXP_M700_UP : exp(x) * (1.0 + 0x1p-50);
}

/** 2^(j/32), j = 0..31, rounded to nearest (csrc/cpu/exp_table.c): the vector exp's table. */
extern const double tka_exp2_32[32];

/* ------------------------------------------------------------------ threads */

/**
 * Scratch memory with visible lifetimes: a per-thread stack of allocations (arena.c).
 * A function that needs scratch takes a mark, allocates, and releases to its mark before it
 * returns; memory its caller holds sits below that mark and is never moved or reused. A
 * function that hands scratch to its caller says so, and the caller releases it.
 * Every thread of a parallel job owns one arena, so concurrent calls never share one.
 */
/** Most blocks an arena chains (sizes double: far beyond any memory). */
#define TKA_ARENA_BLOCKS 40
/** A per-thread scratch arena (see above). */
typedef struct tka_arena {
    char *block[TKA_ARENA_BLOCKS];  /**< blocks, each at least twice the one before */
    size_t cap[TKA_ARENA_BLOCKS];   /**< their sizes in bytes */
    size_t base[TKA_ARENA_BLOCKS];  /**< offset of each block in the arena's range */
    int nblocks, cur;               /**< blocks allocated; the block holding the top */
    size_t top;                     /**< offset of the first free byte */
} tka_arena;

/** An empty arena (no memory yet). */
void tka_arena_init(tka_arena *a);
/** Free all of an arena's memory. */
void tka_arena_free(tka_arena *a);
/** The current top, to release back to. */
static inline size_t tka_arena_mark(const tka_arena *a) { return a->top; }
/** `bytes` bytes, 64-byte aligned, valid until a release to a mark taken before this call;
 *  NULL when out of memory. */
void *tka_arena_alloc(tka_arena *a, size_t bytes);
/** Free everything allocated since `mark` (kept for reuse). */
void tka_arena_release(tka_arena *a, size_t mark);

/**
 * Run fn(ctx, r0, r1, arena) over row ranges [r0, r1) of [0, rows), on up to
 * tka_num_threads() threads. `work` is the total number of elements touched: small jobs
 * stay on the calling thread. Each thread brings its own arena.
 * fn returns TKA_OK or an error for its lowest failing row, stored in *err_row; the call
 * returns the error of the lowest failing row overall, independent of the thread count.
 */
typedef tka_status (*tka_row_fn)(void *ctx, int64_t r0, int64_t r1, tka_arena *s,
                                 int64_t *err_row);
/** See above. A TKA_RETRY that escapes fn is reported as TKA_ERR_INTERNAL. */
tka_status tka_rows_run_parallel(int64_t rows, double work, tka_row_fn fn, void *ctx,
                                 int64_t *err_row);

/** Run fn over all rows on the calling thread (kernels inside may still use threads). */
tka_status tka_rows_run_serial(int64_t rows, tka_row_fn fn, void *ctx, int64_t *err_row);

/** Whether the calling thread is a worker of tka_rows_run_parallel (no nested threads). */
int tka_threads_in_worker(void);
/** A spin-wait's pause (x86 pause, arm64 yield). */
static inline void tka_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ------------------------------------------------------------ rows, selection */

/** One prepared row: contiguous, validated, with its maximum (see rows.c). */
typedef struct {
    const void *p;          /**< contiguous row */
    int64_t n;
    tka_dtype dt;
    const tka_kernels *K;
    double max;             /**< largest logit */
    int64_t n_live;         /**< unmasked logits */
} tka_row;

/** Scan a row set up in w (p, n, dt, K): NaN/+inf/all-masked check, max and n_live. */
tka_status tka_row_check(tka_row *w, tka_arena *s);
/** log tau (and KL if kl) of the top-k set of a checked row, 0 <= k <= n. */
tka_status tka_row_log_tau(const tka_row *w, int64_t k, tka_arena *s, double *log_tau,
                           double *kl);
/** k_eps of a checked row and the discarded mass tau <= eps of its top set; with t, also
 *  the k-th largest logit (the threshold of the kept set). */
tka_status tka_row_keps(const tka_row *w, double eps, tka_arena *s, int64_t *k, double *tau,
                        double *t);
/** tka_row_keps, and, on rows short enough for the whole-row selection (up to 4096
 *  logits, or TKA_CHUNK with the AVX2 kernels: rows.c, keps_direct_max), every weight
 *  e^{x_i - max} it computed in *e (n values, in the caller's scope of s; NULL on longer
 *  rows and where the selection did not compute them). */
tka_status tka_row_keps_e(const tka_row *w, double eps, tka_arena *s, int64_t *k, double *tau,
                          double *t, const double **e);
/** Positions of the k largest logits of a checked row, by decreasing value, ties by lower
 *  position, into out[0..k). */
tka_status tka_row_topk(const tka_row *w, int64_t k, tka_arena *s, int64_t *out);
/** The same set as tka_row_topk, in increasing position order (no sort: one rank
 *  selection and one gathering pass); with log_tau, also what tka_row_log_tau gives. */
tka_status tka_row_topk_set(const tka_row *w, int64_t k, tka_arena *s, int64_t *out,
                            double *log_tau);
/** tka_row_topk_set when the k-th largest logit t is known (one gathering pass). */
tka_status tka_row_topk_above(const tka_row *w, int64_t k, double t, tka_arena *s, int64_t *out);
/** tka_row_topk_above, and the kept logits (float64) into kv[0..k), in the order of out. */
tka_status tka_row_topk_above_v(const tka_row *w, int64_t k, double t, tka_arena *s, int64_t *out,
                                double *kv);
/** Every weight e^{x[i] - max} of a float64 row into e[0..n): 0 below t (the k-th largest,
 *  > -inf) and for the ties at t beyond k, the highest positions of those dropped (the set
 *  tka_row_topk_above keeps); ew: every weight from the selection's exp pass, or NULL.
 *  TKA_RETRY when t is not the k-th largest value. */
tka_status tka_row_keep_weights(const tka_row *w, int64_t k, double t, const double *ew,
                                double *e);

/* Whole-row kernel calls; rows longer than TKA_CHUNK run as chunks, possibly in parallel,
 * combined in chunk order so results never depend on the thread count (chunks.c). Each
 * releases the scratch it takes from s. */
/** Chunk length of long rows (elements); fixed, so results do not depend on threads. */
#define TKA_CHUNK 65536
/** The scan kernel over the whole row (max, masked count, NaN/+inf). */
tka_status tka_row_scan(tka_row *w, tka_arena *s, tka_scan_out *out);
/** The sumexp_split kernel over the whole row. */
tka_status tka_row_sumexp_split(const tka_row *w, tka_arena *s, double t, double ref_hi,
                                double ref_lo, double *hi, double *lo);
/** The sumexp_moment kernel over the whole row. */
tka_status tka_row_sumexp_moment(const tka_row *w, tka_arena *s, double ref, double *zb,
                                 double *m1, double *c);
/** The max_below kernel over the whole row: largest logit < t into *out. */
tka_status tka_row_max_below(const tka_row *w, tka_arena *s, double t, double *out);
/** The band kernel over the whole row; gathered values (and positions) in row order. */
tka_status tka_row_band(const tka_row *w, tka_arena *s, double lo, double hi, double ref,
                        int with_mass, double *vals, int64_t *idx, int64_t cap,
                        tka_band_out *out);

/**
 * Pointer to row r as a contiguous array of its dtype: the row itself when its elements
 * are adjacent, else a copy allocated in s, which the caller releases (NULL if out of
 * memory).
 */
const void *tka_row_contig(const tka_rows *x, int64_t r, tka_arena *s);

/** Sort a[0..n) in decreasing order (NaN-free input). */
void tka_values_sort_desc(double *a, int64_t n);
/** Sort pairs by decreasing value, ties by increasing index. */
void tka_pairs_sort_desc(double *v, int64_t *idx, int64_t n);
/** Partially order a[0..n) so that a[k] is the k-th largest (0-based), larger before. */
void tka_values_nth_desc(double *a, int64_t n, int64_t k);

/* (value, index) pairs are ordered by decreasing value, then increasing index. */

/** Sort pairs in that order with scratch tv, tx of n entries each (LSD radix sort from 512
 *  pairs on, introsort below or when tv or tx is NULL). */
void tka_pairs_sort_desc_radix(double *v, int64_t *idx, int64_t n, double *tv, int64_t *tx);
/** Rearrange the pairs so that the first k are the k highest (by value, then lower index),
 *  the highest of them first, the rest of those k in no particular order (for k much
 *  smaller than n: the sample's blocks with the highest bounds). */
void tka_pairs_top_desc(double *v, int64_t *idx, int64_t n, int64_t k);
/**
 * Smallest k such that the first k pairs in that order have mass sum(w) >= target; those
 * k pairs (with their masses w) are moved to [0, k), in no particular order. Expected O(n);
 * returns n if the total mass falls short.
 */
int64_t tka_pairs_weighted_top(double *v, int64_t *idx, double *w, int64_t n, double target);
/** Position of the first pair in that order among pairs [from, n), from < n. */
int64_t tka_pairs_first(const double *v, const int64_t *idx, int64_t from, int64_t n);

/**
 * Weighted selection from the bottom: v[0..c) values with masses w[0..c) (permuted in
 * place). Drops the smallest values one by one, in increasing order, while the dropped
 * mass stays <= budget; returns how many were dropped (d) and their mass. On return the
 * dropped pairs are v[0..d) and the kept ones v[d..c). Expected O(c).
 */
int64_t tka_weights_drop_bottom(double *v, double *w, int64_t c, double budget,
                                double *dropped_mass);
/**
 * A contiguous row (float32 if is_f32, else float64) sorted in decreasing order into
 * out[0..n) as float64: LSD radix sort on 32- or 64-bit keys from TKA_RADIX_MIN elements
 * on, introsort below. scratch holds tka_array_sort_scratch_bytes(n) bytes.
 */
#define TKA_RADIX_MIN 4096
/** Bytes of scratch tka_array_sort_desc needs for n elements. */
size_t tka_array_sort_scratch_bytes(int64_t n);
/** See above: the sorted row into out, using scratch. */
void tka_array_sort_desc(const void *x, int is_f32, int64_t n, double *out, void *scratch);

#endif /* TOPKATTN_INTERNAL_H */
