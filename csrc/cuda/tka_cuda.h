/*
 * tka_cuda.h - the optional CUDA core of topkattn: batched tail mass, k_eps, Top-k and
 * Top-k attention on device arrays (docs/design.md §2, §3).
 *
 * Plain C, no CUDA types: every pointer is a device pointer owned by the caller (except the
 * structs themselves and tkc_error, which live on the host), strides are in bytes (rows) or
 * elements (attention operands), and the stream is a cudaStream_t passed as an integer. Work
 * is queued on that stream; each call then waits for it (it reads back one status word to
 * report bad input), so outputs are ready when it returns. Scratch memory is taken from the
 * stream-ordered allocator (cudaMallocAsync) and released before returning.
 *
 * The selection rules are those of the CPU core: the k-th largest logit by rank with ties
 * broken by the lower index, k_eps the smallest k with tau(k) <= eps, masses relative to the
 * row maximum (the tail relative to its own largest logit), so results agree with it to
 * rounding.
 *
 * Every function returns a tka_status (the CPU core's codes, csrc/tka_status.h): bad data in
 * the lowest bad row tkc_error.row, TKA_ERR_ARG or TKA_ERR_CUDA with the text in
 * tkc_error.msg.
 */
#ifndef TKA_CUDA_H
#define TKA_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "../tka_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Element types of device arrays. */
enum { TKC_F32 = 0, TKC_F64 = 1, TKC_F16 = 2, TKC_BF16 = 3 };

/** Where and why a call failed: the lowest bad row, or a message (TKA_ERR_ARG, TKA_ERR_CUDA). */
typedef struct {
    int64_t row;
    char msg[256];
} tkc_error;

/** `rows` rows of `n` values: element j of row r at data + r*row_stride + j*elem_stride (bytes). */
typedef struct {
    const void *data;
    int64_t rows, n, row_stride, elem_stride;
    int dtype;
} tkc_rows;

/**
 * Operands of Top-k attention, all of one dtype. Q (batch, L, d), K (batch, n, d),
 * V (batch, n, dv): the last axis is contiguous; batch element b of Q starts at element
 * q_off[b] (device array of `batch` int64) and its rows are q_ld elements apart; the same
 * for K and V. mask: NULL, or an additive mask of the accumulation type (float32, or
 * float64 for float64 operands) with element (b, l, j) at m_off[b] + l*m_sl + j*m_sn.
 */
typedef struct {
    const void *q, *k, *v;
    const int64_t *q_off, *k_off, *v_off;
    int64_t q_ld, k_ld, v_ld;
    int64_t batch, L, n, d, dv;
    double scale;
    const void *mask;
    const int64_t *m_off;
    int64_t m_sl, m_sn;
    int dtype;
} tkc_attn;

/** log tau and (if kl != NULL) KL(P_k || P) per row for the top-k set; k: rows int64. */
int tkc_tail_mass(const tkc_rows *x, const int64_t *k, double *log_tau, double *kl,
                  uintptr_t stream, int device, tkc_error *err);

/** k_eps per row (eps: rows float64 in (0, 1)); tau_out may be NULL. */
int tkc_k_eps(const tkc_rows *x, const double *eps, int64_t *k_out, double *tau_out,
              uintptr_t stream, int device, tkc_error *err);

/** Indices of the k largest per row by decreasing value, ties to the lower index;
 *  idx_out: rows x k int64, row-major. */
int tkc_topk(const tkc_rows *x, int64_t k, int64_t *idx_out, uintptr_t stream, int device,
             tkc_error *err);

/**
 * Top-k attention per query row (rows = batch * L). Exactly one of k (rows int64 in
 * [1, n], clipped to the unmasked keys) and eps (rows float64) is non-NULL. out: rows x dv
 * in the operands' dtype, accumulated in float32 (float64 for float64 operands).
 * k_out/tau_out: rows, or NULL. idx_out: NULL, or rows x idx_width int64 receiving the kept
 * positions by decreasing score (ties: lower position), padded with -1.
 */
int tkc_topk_attention(const tkc_attn *a, const int64_t *k, const double *eps, void *out,
                       int64_t *k_out, double *tau_out, int64_t *idx_out, int64_t idx_width,
                       uintptr_t stream, int device, tkc_error *err);

/** Number of visible devices (0 when none or no driver) and the name and compute
 *  capability of `device`; returns TKA_ERR_CUDA with a message when there is none. */
int tkc_device_info(int device, int *count, char *name, size_t name_len, int *major,
                    int *minor, tkc_error *err);

/** CUDA runtime version this module was built with (e.g. 13000). */
int tkc_runtime_version(void);

#ifdef __cplusplus
}
#endif

#endif /* TKA_CUDA_H */
