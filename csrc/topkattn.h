/*
 * topkattn.h - the C core of topkattn: exact tail masses, k_eps, Top-k selection,
 * certified bounds and the Gaussian score model (DESIGN.md sections 2, 5, 6).
 *
 * Plain C11. No Python here: every function takes pointers, byte strides and int64_t
 * sizes, and returns a tka_status. Batches are described by a tka_rows view: `rows`
 * independent rows of `n` logits each, float32 or float64, any strides. Logits equal to
 * -inf are masked keys (probability exactly 0). NaN and +inf are rejected per row.
 *
 * Threading: row-parallel functions split rows over tka_num_threads() threads; every
 * row is computed by one thread with the same code, so results do not depend on the
 * thread count.
 */
#ifndef TOPKATTN_H
#define TOPKATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    TKA_OK = 0,
    TKA_ERR_NAN,         /**< a logit is NaN (row in tka_error.row) */
    TKA_ERR_POSINF,      /**< a logit is +inf */
    TKA_ERR_ALL_MASKED,  /**< every logit of a row is -inf */
    TKA_ERR_NOMEM,       /**< an allocation failed */
    TKA_ERR_ARG          /**< an argument is out of range (message in tka_error.what) */
} tka_status;

typedef enum { TKA_F32 = 0, TKA_F64 = 1 } tka_dtype;

/** Where and why a batched call failed: the lowest failing row, whatever the thread count. */
typedef struct {
    int64_t row;       /**< flat row index, or -1 */
    const char *what;  /**< static text for TKA_ERR_ARG, else NULL */
} tka_error;

/**
 * A batch of rows. Element j of row r lives at
 * `data + row_offset[r] + j * elem_stride` (bytes; strides may be negative).
 * If row_offset is NULL, rows are `row_stride` bytes apart.
 */
typedef struct {
    const char *data;
    const int64_t *row_offset;
    int64_t row_stride;
    int64_t elem_stride;
    int64_t rows;
    int64_t n;
    tka_dtype dtype;
} tka_rows;

/* ---------------------------------------------------------------- threads, SIMD */

/** Number of worker threads used by batched calls (>= 1). */
int tka_num_threads(void);
/** Set the number of worker threads; n <= 0 restores the default (online CPUs). */
void tka_set_num_threads(int n);

/** Names of the kernel sets: "scalar", "avx2", "avx512". */
typedef enum { TKA_SIMD_SCALAR = 0, TKA_SIMD_AVX2 = 1, TKA_SIMD_AVX512 = 2, TKA_SIMD_COUNT } tka_simd;
/** Whether this build has the kernel set and this CPU (and OS) can run it. */
int tka_simd_supported(tka_simd which);
/** Whether this build contains the kernel set (whatever the CPU). */
int tka_simd_compiled(tka_simd which);
/** Use one kernel set from now on; returns TKA_ERR_ARG if it is not supported. */
tka_status tka_simd_select(tka_simd which);
/** The kernel set in use. */
tka_simd tka_simd_active(void);
const char *tka_simd_name(tka_simd which);
/** Comma-separated CPU features seen by CPUID/XGETBV, e.g. "sse2,avx,avx2,fma". */
const char *tka_cpu_features(void);

/* ------------------------------------------------------- distribution level (§2) */

/**
 * Tail mass of the top-k set, per row: tau = P(T) = TV(P, P_hat_k) (DESIGN §2).
 * k:        rows values in [0, n] (ties at the threshold: lower index kept).
 * log_tau:  rows outputs, log(tau) (-inf when tau = 0); accurate for any tau > 0.
 * kl:       rows outputs or NULL, KL(P_hat_k || P) = -log(1 - tau) (+inf when k = 0).
 */
tka_status tka_tail_mass(const tka_rows *x, const int64_t *k, double *log_tau, double *kl,
                         tka_error *err);

/**
 * tau(k) for k = 0..n, per row: out is rows x (n + 1), row-major, float64.
 * O(n log n) per row (one sort).
 */
tka_status tka_tv_curve(const tka_rows *x, double *out, tka_error *err);

/**
 * k_eps per row: the smallest k with tau(k) <= eps[r] (DESIGN §2), eps in (0, 1).
 * k_out: rows outputs. tau_out: rows outputs or NULL (tau at k_eps).
 * Expected O(n) per row.
 */
tka_status tka_k_eps(const tka_rows *x, const double *eps, int64_t *k_out, double *tau_out,
                     tka_error *err);

/** Indices of the k largest logits per row, by decreasing logit, ties to the lower index.
 *  idx_out is rows x k, row-major. */
tka_status tka_topk(const tka_rows *x, int64_t k, int64_t *idx_out, tka_error *err);

/* ------------------------------------------------------------ certified bounds (§2) */

/**
 * Single-gap bound on tau for the top-k set, per row. form 0 uses the head mass A:
 * (n'-k) e^{s_(k+1)} / (A + (n'-k) e^{s_(k+1)}); form 1 uses only the gap
 * Delta = s_(k) - s_(k+1): (n'-k) e^{-Delta} / (k + (n'-k) e^{-Delta}).
 * n' counts unmasked keys. Rounded outward: never below the exact tau.
 */
tka_status tka_gap_bound(const tka_rows *x, const int64_t *k, int form, double *out,
                         tka_error *err);

/**
 * Multi-gap bound on tau, per row. Cut ranks: either `cut_ranks` (ncut increasing ranks
 * in [1, n]; those <= k are ignored and n' is appended) or, when cut_ranks is NULL,
 * `nseg` tail segments between k and n' (spacing 0 = geometric lengths, 1 = equal).
 */
tka_status tka_multigap_bound(const tka_rows *x, const int64_t *k, const int64_t *cut_ranks,
                              int64_t ncut, int64_t nseg, int spacing, double *out,
                              tka_error *err);

/**
 * Blockwise bound (DESIGN §2): tau <= 1 - A / (Z_s + sum_b size_b e^{u_b}).
 * u: rows x nb upper bounds (float64, contiguous); sizes: nb or rows x nb block sizes
 * (sizes_per_row selects); log_a, log_zs: per row, log of the kept and scored masses
 * in the same units as e^{u}.
 */
tka_status tka_block_bound(const double *u, const int64_t *sizes, int sizes_per_row,
                           const double *log_a, const double *log_zs, int64_t rows, int64_t nb,
                           double *out, tka_error *err);

/* ------------------------------------------------------------ row statistics (§5, §6) */

/** Attention entropy H(P) = -sum P log P in nats, per row. */
tka_status tka_entropy(const tka_rows *x, double *out, tka_error *err);

/** |S_eps| = #{i : P_i >= threshold[r]} per row. */
tka_status tka_effective_support(const tka_rows *x, const double *threshold, int64_t *out,
                                 tka_error *err);

/** Mean and sample standard deviation (ddof = 1; 0 for one key) of the unmasked logits. */
tka_status tka_fit_gaussian(const tka_rows *x, double *mu, double *sigma, tka_error *err);

/* ----------------------------------------------------------- Gaussian model (§5) */

/** Standard normal CDF Phi(x), relative accuracy ~1e-15 also deep in the lower tail. */
double tka_norm_cdf(double x);
/** Upper tail Phi_c(x) = 1 - Phi(x), computed without cancellation. */
double tka_norm_sf(double x);
/** Inverse CDF Phi^{-1}(p), p in (0, 1); -inf/+inf at 0/1, NaN outside. */
double tka_norm_ppf(double p);
/** Inverse upper tail Phi_c^{-1}(p) = -Phi^{-1}(p), accurate for tiny p. */
double tka_norm_isf(double p);

/** Gaussian-model tail mass of the top fraction rho: tau(rho) = Phi(Phi_c^{-1}(rho) - sigma). */
double tka_gaussian_tail_mass(double rho, double sigma);

/**
 * Predicted k_eps for n i.i.d. N(mu, sigma^2) scores (real-valued, in [0, n]).
 * finite_n = 0: the asymptotic rule n * Phi_c(sigma + Phi^{-1}(eps)).
 * finite_n = 1: the finite-n correction (see csrc/gauss.c for the method).
 */
double tka_gaussian_k_eps(double n, double sigma, double eps, int finite_n);

#ifdef __cplusplus
}
#endif
#endif /* TOPKATTN_H */
