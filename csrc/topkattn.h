/*
 * topkattn.h - the C core of topkattn: exact tail masses, k_eps, Top-k selection,
 * certified bounds, the Gaussian score model, and dense and Top-k attention (docs/design.md
 * sections 2, 3, 5, 6).
 *
 * Plain C11. No Python here: every function takes pointers, byte strides and int64_t
 * sizes, and returns a tka_status. Batches are described by a tka_rows view: `rows`
 * independent rows of `n` logits each, float32, float64 or float16, any strides. Logits equal to
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

#include "tka_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Element type of logits and attention operands. float16 (IEEE binary16, stored as
 *  uint16_t) is converted exactly to float32/float64 inside the core. */
typedef enum { TKA_F32 = 0, TKA_F64 = 1, TKA_F16 = 2 } tka_dtype;

/** Where and why a batched call failed: the lowest failing row, whatever the thread count. */
typedef struct {
    int64_t row;       /**< flat row index, or -1 */
    const char *what;  /**< static text for TKA_ERR_ARG, else NULL */
} tka_error;

/** What tka_topk_attention and tka_attention_row_error compute (tka_attention is
 *  TKA_ATTN_DENSE); the Python layer selects one by these numbers. */
typedef enum { TKA_ATTN_DENSE = 0, TKA_ATTN_TOPK = 1, TKA_ATTN_ROW_ERROR = 2 } tka_attn_mode;

/** Forms of tka_gap_bound. */
enum { TKA_GAP_MASS = 0, TKA_GAP_GAP = 1 };
/** Spacings of the tail segments of tka_multigap_bound. */
enum { TKA_SPACING_GEOMETRIC = 0, TKA_SPACING_LINEAR = 1 };
/** Or'ed into the spacing of tka_multigap_bound: run the segment loop over every j instead
 *  of the shortcut for many segments (the same result; a test hook). */
enum { TKA_MULTIGAP_EXHAUSTIVE = 16 };

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

/** Names of the kernel sets: "scalar", "avx2", "avx512" (x86-64), "neon" (aarch64). */
typedef enum {
    TKA_SIMD_SCALAR = 0,
    TKA_SIMD_AVX2 = 1,
    TKA_SIMD_AVX512 = 2,
    TKA_SIMD_NEON = 3,
    TKA_SIMD_COUNT
} tka_simd;
/** Whether this build has the kernel set and this CPU (and OS) can run it. */
int tka_simd_supported(tka_simd which);
/** Whether this build contains the kernel set (whatever the CPU). */
int tka_simd_compiled(tka_simd which);
/** Use one kernel set from now on; returns TKA_ERR_ARG if it is not supported. */
tka_status tka_simd_select(tka_simd which);
/** The kernel set in use. */
tka_simd tka_simd_active(void);
/** e^x[i] for i < n by the active kernel set's vector exp, the one every sum of
 *  exponentials uses (error bound in csrc/cpu/kernels.inc); for the accuracy tests. */
void tka_vexp(const double *x, int64_t n, double *out);
/** The 32 values 2^(j/32), rounded to nearest, that the vector exp scales by. */
const double *tka_exp2_table(void);
/** Name of a kernel set ("scalar", "avx2", "avx512", "neon"; "unknown" out of range). */
const char *tka_simd_name(tka_simd which);
/** Comma-separated CPU features: on x86-64 as CPUID/XGETBV report them, e.g.
 *  "sse2,avx,avx2,fma,f16c"; on aarch64 "neon,fp16-convert" (both are baseline there). */
const char *tka_cpu_features(void);

/* ------------------------------------------------------- distribution level (§2) */

/**
 * Tail mass of the top-k set, per row: tau = P(T) = TV(P, P_hat_k) (docs/design.md §2).
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
 * k_eps per row: the smallest k with tau(k) <= eps[r] (docs/design.md §2), eps in (0, 1).
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
 * Blockwise bound (docs/design.md §2): tau <= 1 - A / (Z_s + sum_b size_b e^{u_b}).
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


/* ------------------------------------------------------------------- attention */

/**
 * A batch of attention problems (docs/design.md §1, §3): `batch` independent (Q, K, V) triples,
 * Q (L, d), K (n, d), V (n, dv), all of one dtype. Row l of problem b's Q starts at byte
 * `q + q_off[b] + l * q_ld` and its d elements are adjacent (likewise K with k_off/k_ld,
 * V with v_off/v_ld), so broadcast operands simply repeat offsets. Scores are
 * s_j = scale * q.k_j (+ mask), accumulated in float64; mask is NULL or float64 with
 * element (l, j) of problem b at byte `mask + m_off[b] + l * m_sl + j * m_sn`
 * (-inf = masked key). Query rows are numbered r = b * L + l.
 */
typedef struct {
    tka_dtype dtype;
    int64_t batch, L, n, d, dv;
    const char *q, *k, *v;
    const int64_t *q_off, *k_off, *v_off;
    int64_t q_ld, k_ld, v_ld;
    const char *mask;
    const int64_t *m_off;
    int64_t m_sl, m_sn;
    double scale;
} tka_attn;

/** Dense softmax attention: out (batch*L, dv) contiguous, of the problem's dtype. */
tka_status tka_attention(const tka_attn *a, void *out, tka_error *err);

/**
 * Top-k attention: per query row the kept set is the top k[r] keys (k != NULL; clipped to
 * the unmasked keys) or the smallest top set with discarded mass <= eps[r] (k == NULL).
 * Writes out (batch*L, dv), and if not NULL: k_out[r], tau_out[r] (discarded mass), and
 * idx_out[r] = a malloc'd array of the k_out[r] kept positions by decreasing score, ties
 * by lower position (release with tka_free; on error every idx_out[r] is NULL).
 */
tka_status tka_topk_attention(const tka_attn *a, const int64_t *k, const double *eps, void *out,
                              int64_t *k_out, double *tau_out, int64_t **idx_out,
                              tka_error *err);

/**
 * Per query row, the squared l2 norm of the difference between the top-k[r] row of the
 * attention matrix renormalised over the kept set and the dense row (docs/design.md §6):
 * (tau/(1-tau))^2 * sum_S P_i^2 + sum_T P_i^2, into err_sq[r]; tau into tau_out[r] if not
 * NULL. V and dv are not used.
 */
tka_status tka_attention_row_error(const tka_attn *a, const int64_t *k, double *err_sq,
                                   double *tau_out, tka_error *err);

/** free() for arrays the core allocated for the caller. */
void tka_free(void *p);

#ifdef __cplusplus
}
#endif
#endif /* TOPKATTN_H */
