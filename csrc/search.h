/*
 * search.h - certified search (docs/design.md §4): a key index with per-block summaries and
 * per-key int8 proxies, and the Δk-Search / MC-Search algorithms that certify
 * TV(P, P_hat) <= eps after scoring only part of the keys.
 *
 * The index arrays are owned by the caller (the Python KeyIndex object); this header
 * only describes them. Every bound the search uses is an upper bound on the exact real
 * number scale * q.k for the stored float values, padded for the rounding of the float64
 * arithmetic that computes it, so certificates hold whatever the rounding.
 */
#ifndef TOPKATTN_SEARCH_H
#define TOPKATTN_SEARCH_H

#include "topkattn.h"

/** Summary kinds (bit flags): per-dimension min/max, centroid + radius. */
enum { TKA_SUM_MINMAX = 1, TKA_SUM_BALL = 2 };

/**
 * A key index over `heads` independent key sets, each holding `n` keys of dimension d,
 * stored in index order (key j of head h is original key perm[h * cap + j]).
 * Per-head arrays are `cap` keys (or `cap_blocks` blocks) apart; all C-contiguous.
 */
typedef struct {
    int64_t heads, n, cap, d, block_size, cap_blocks;
    tka_dtype dtype;
    const void *keys;        /**< heads x cap x d, float32 or float64 */
    const int64_t *perm;     /**< heads x cap original positions */
    int summary;             /**< TKA_SUM_* flags present */
    const float *lo, *hi;    /**< heads x cap_blocks x d, rounded outward (MINMAX) */
    const float *ctr;        /**< heads x cap_blocks x d centroids (BALL) */
    const double *rad;       /**< heads x cap_blocks, >= max ||k - ctr|| (BALL) */
    const double *mom;       /**< heads x cap_blocks x 2, or NULL: with e_i = k_i - ctr over
                                  a block's keys, mom[0] >= the largest eigenvalue of
                                  sum_i e_i e_i^T and mom[1] >= ||sum_i e_i|| (BALL; +inf
                                  where not computed) */
    const int8_t *pz;        /**< heads x cap x d int8 codes, or NULL (no int8 proxies) */
    const uint8_t *pz4;      /**< heads x cap x ceil(d/2) 4-bit codes (two per byte, see
                                  tka_search_kernels.dot_u4), or NULL (no 4-bit proxies):
                                  k ~ ctr + pscale * (code - 8), ctr the key's block's */
    const float *pscale;     /**< heads x cap: k ~ pscale * pz (int8), the key's step (4-bit) */
    const float *perr;       /**< heads x cap: >= the norm of k minus its proxy */
    const double *maxabs;    /**< heads: >= max |k_ij| over the head's keys */
} tka_key_index;

/** Writable view of the same arrays, for building. */
typedef struct {
    float *lo, *hi, *ctr;
    double *rad, *mom;
    int8_t *pz;
    uint8_t *pz4;
    float *pscale, *perr;
    double *maxabs;
} tka_key_index_out;

/**
 * Order of the keys of one head that makes blocks tight: recursive bisection at the
 * median of the projection on each node's leading principal direction (estimated by
 * power iteration on at most 256 keys of the node), down to nodes of block_size keys.
 * keys: n x d contiguous rows, reordered in place; perm_out: n positions (perm_out[s] is
 * the original position of row s, a permutation of 0..n-1). Deterministic (the same order
 * for any thread count); the subtrees below the top levels run on the thread pool.
 */
tka_status tka_index_order(void *keys, tka_dtype dt, int64_t n, int64_t d,
                           int64_t block_size, int64_t *perm_out);

/**
 * Fill summaries and proxies for keys [k0, n) of every head (keys already stored).
 * Blocks from floor(k0 / block_size) on are recomputed (a partial last block grows);
 * maxabs is raised to cover the new keys. Parallel over heads.
 */
tka_status tka_index_fill(const tka_key_index *ix, const tka_key_index_out *out, int64_t k0,
                          tka_error *err);

/** Stages of a search row, for the optional timers: the int8 codes pass (proxy dot
 *  products and levels), the selection (block bounds, sample, cuts, bookkeeping), the exact
 *  scoring (rerank, or the full pass of a group that switched to full scoring), the
 *  certificate (kept set and bound) and the output (V rows). */
enum { TKA_STAGE_CODES, TKA_STAGE_SELECT, TKA_STAGE_RERANK, TKA_STAGE_CERT, TKA_STAGE_OUTPUT,
       TKA_STAGES };

/** Methods. */
enum { TKA_SEARCH_DELTA = 0, TKA_SEARCH_MC = 1 };

/** Search parameters; queries are rows of a (heads x L) x d float64 (or float32) contiguous
 *  array. */
typedef struct {
    const double *q;         /**< heads * L rows of d values, unscaled */
    const float *q32;        /**< or, when not NULL, the same rows as float32 (q unused) */
    int64_t L;               /**< queries per head */
    double scale;            /**< logits are scale * q.k */
    const double *eps;       /**< heads * L targets in (0, 1) */
    int method;              /**< TKA_SEARCH_DELTA or TKA_SEARCH_MC */
    double delta;            /**< MC failure probability in (0, 1) */
    uint64_t seed;           /**< MC random stream (row r uses stream seed, r) */
    int64_t mc_samples;      /**< MC sample size per check */
    int use_proxy;           /**< use the index's per-key proxies (if present) */
    int unordered;           /**< the kept set may come in any order (only V's output is
                                  wanted): saves sorting a large kept set */
    int stages;              /**< fill the per-stage times and bytes of every row (timers
                                  run only then) */
    /* values: optional, heads x n_v x dv rows (original key order), for the output */
    const void *v;
    tka_dtype vdtype;
    int64_t dv;
    int64_t v_head_stride, v_row_stride;  /**< in elements */
} tka_search_args;

/** Per-row results. Index lists are malloc'ed by the search, freed by the caller. */
typedef struct {
    int64_t *idx;            /**< kept keys, original positions, by decreasing logit */
    int64_t k;
    double tv_bound;
    int64_t keys_scored;     /**< distinct keys whose exact logit was computed */
    int64_t blocks_scored;   /**< blocks whose keys were read (proxies or exact) */
    int64_t proxies_read;    /**< per-key proxies evaluated */
    double bytes_read;       /**< summaries + proxies + exact keys (+ perm entries) */
    int certified_mc;        /**< 1 when the certificate rests on the MC estimate */
    int full_scoring;        /**< 1 when the row's group switched to full scoring (every key
                                  scored in one pass shared by the group's queries) */
    double stage_s[TKA_STAGES];     /**< with args->stages: seconds per stage */
    double stage_bytes[TKA_STAGES]; /**< with args->stages: bytes read per stage */
} tka_search_row;

/**
 * Certified search for every (head, query) row, parallel over rows with results that do
 * not depend on the thread count. out_rows: heads * L entries; out_v: heads * L * dv
 * float64 (or NULL when args->v is NULL).
 */
tka_status tka_search(const tka_key_index *ix, const tka_search_args *args,
                      tka_search_row *out_rows, double *out_v, tka_error *err);

/** Per-query constants of the proxy bound (see csrc/search.c, expand_proxies). */
typedef struct {
    double bq;          /**< query code scale (a power of two) */
    double slack_code;  /**< bound on |r.z| for any key's codes */
    double qn2;         /**< bound on |q'| */
    double eta;         /**< rounding allowance of a logit */
    double ubb;         /**< the block's bound (caps every key's) */
    double ref;         /**< unit of the level masses */
    double margin;      /**< rounding margin of the level computation */
} tka_proxy_consts;

/** Per-row constants of the block bounds (mass_bounds): q'.k <= dot + rr (1 + g) + cab +
 *  c1060 + eta for a key of a block with centroid product dot, rr = qn2 rad. */
typedef struct {
    double qn2;    /**< bound on |q'|_2 */
    double q2;     /**< bound on |q'|_2^2 */
    double g;      /**< relative rounding of the centroid product and of rr */
    double cab;    /**< absolute rounding allowance of the centroid product */
    double c1060;  /**< 2^-1060 d: underflow allowance */
    double eta;    /**< the row's rounding allowance on every logit */
    double inv_m;  /**< 1 / (keys of a block), rounded */
} tka_mass_consts;

/** Most dimensions of keys with 4-bit proxies: their sums stay exact in int32. */
#define TKA_INT4_MAX_D (1 << 19)

/** Number of proxy levels. */
#define TKA_NLEVELS 1024
/** Width of a proxy level, in logits. */
#define TKA_LEVEL_W 0.125

/** Dot-product kernels of one instruction set (csrc/cpu/search_*.c), reached through the
 *  `search` member of the active tka_kernels table (dispatch.c). */
typedef struct tka_search_kernels tka_search_kernels;
struct tka_search_kernels {
    /** sum_j q[j] * k[j] in float64 over d float32 keys (rows of stride d), for m keys. */
    void (*dot_f32)(const double *q, const float *k, int64_t d, int64_t m, double *out);
    void (*dot_f64)(const double *q, const double *k, int64_t d, int64_t m, double *out);
    /** dot_f32 for float16 keys (bits): the same sums, in the same order, as dot_f32 on
     *  the same values as float32. */
    void (*dot_f16)(const double *q, const uint16_t *k, int64_t d, int64_t m, double *out);
    /** sum_j y[j] * z[j] exactly in int32 (int16 query codes, int8 key codes; the caller
     *  keeps d * max|y| * 127 below 2^31), for m keys (rows of stride d). */
    void (*dot_i8)(const int16_t *y, const int8_t *z, int64_t d, int64_t m, int32_t *out);
    /** dot_i8 for four queries at once (y[r] into out[r], r < 4), each key's codes read
     *  once for the four: the same exact sums. */
    void (*dot4_i8)(const int16_t *const *y, const int8_t *z, int64_t d, int64_t m,
                    int32_t *const *out);
    /** 4-bit codes: m keys of hb bytes each (rows of stride hb), byte t holding the code of
     *  dimension t in its low nibble and that of dimension hb + t in its high one; y holds
     *  2 hb int8 query codes in that order (|y| <= 127). out[i] = sum_t y[t] lo(z_it) +
     *  y[hb + t] hi(z_it) - bias, exact in int32 (|sum| <= 2 hb 15 127). */
    void (*dot_u4)(const int8_t *y, const uint8_t *z, int64_t hb, int64_t m, int32_t bias,
                   int32_t *out);
    /**
     * Levels of m keys from their code dot products (in place in dl): bound
     * p = sc (bq dot + slack_code) + qn2 perr, padded (2^-50 |p| + eta), capped by ubb;
     * level floor(((ref - p) - margin - 1e-9 |p|) / TKA_LEVEL_W) in [0, TKA_NLEVELS - 1].
     */
    void (*proxy_levels)(int32_t *dl, const float *sc, const float *perr, int64_t m,
                         const tka_proxy_consts *c);
    /**
     * Bounds of m blocks of 1/inv_m keys each (search.c, "block mass bound"): in place,
     * ub[b] = the per-key bound from the centroid product ub[b] (as given) and radius rad[b];
     * um[b] = the block's mass bound from its moments mom[2b], mom[2b + 1] (ub[b] where they
     * are not finite). Every kernel set computes the scalar set's operations in its order,
     * without fused multiply-adds: the same bounds, bit for bit.
     */
    void (*mass_bounds)(double *ub, const double *rad, const double *mom, int64_t m,
                        const tka_mass_consts *c, double *um);
};

/** The active kernel set's mass_bounds (for the tests, through _core.mass_bounds). */
void tka_mass_bounds(double *ub, const double *rad, const double *mom, int64_t m,
                     const tka_mass_consts *c, double *um);

#endif /* TOPKATTN_SEARCH_H */
