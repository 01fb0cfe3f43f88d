/*
 * row_kernels.cuh - the row kernels of rows.cu (tail mass, k_eps, Top-k), one block per row.
 * Kept apart from the host code so that tests can also run them in a host emulation of one
 * block (csrc/cuda/emu).
 */
#ifndef TKA_CUDA_ROW_KERNELS_CUH
#define TKA_CUDA_ROW_KERNELS_CUH

#include "common.cuh"

template <class T>
__global__ void __launch_bounds__(TKC_NT)
tail_kernel(tkc_rows x, i64 r0, const i64 *k, double *log_tau, double *kl, u64 *status)
{
    const i64 r = r0 + blockIdx.x;
    const Row<T> row = {(const char *)x.data + r * x.row_stride, x.n, x.elem_stride};
    const auto sc = row_scan(row);
    if (sc.bad) {
        if (threadIdx.x == 0) report(status, r, sc.bad);
        return;
    }
    const i64 kk = k[r];
    double lt, kv;
    if (kk <= 0) {
        lt = 0.0;
        kv = INFINITY;
    } else if (kk >= sc.n_live) {
        lt = -INFINITY;
        kv = 0.0;
    } else {
        const auto rk = rank_select(row, x.n - kk);
        const double lr = head_tail_ratio(row, kk, sc.max, rk);
        lt = -softplus(lr);
        kv = softplus(-lr);
    }
    if (threadIdx.x == 0) {
        log_tau[r] = lt;
        if (kl) kl[r] = kv;
    }
}

template <class T>
__global__ void __launch_bounds__(TKC_NT)
keps_kernel(tkc_rows x, i64 r0, const double *eps, i64 *k_out, double *tau_out, u64 *status)
{
    const i64 r = r0 + blockIdx.x;
    const Row<T> row = {(const char *)x.data + r * x.row_stride, x.n, x.elem_stride};
    const auto sc = row_scan(row);
    if (sc.bad) {
        if (threadIdx.x == 0) report(status, r, sc.bad);
        return;
    }
    const double e = eps[r];
    const double ref = (double)sc.max + (e < EPS_LINEAR_MIN ? 0.5 * log(e) : 0.0);
    double dropped_mass, z;
    const i64 dropped = keps_walk(row, ref, e, &dropped_mass, &z);
    if (threadIdx.x == 0) {
        k_out[r] = x.n - dropped;
        /* the decision was tail <= eps z; its quotient may round up past eps */
        if (tau_out) tau_out[r] = fmin(dropped_mass / z, e);
    }
}

template <class T>
__global__ void __launch_bounds__(TKC_NT)
topk_kernel(tkc_rows x, i64 r0, i64 k, i64 *idx,
            typename key_of<typename real_of<T>::type>::type *ka,
            typename key_of<typename real_of<T>::type>::type *kb, i64 *ib, u64 *status)
{
    typedef typename key_of<typename real_of<T>::type>::type KT;
    const i64 r = r0 + blockIdx.x;
    const Row<T> row = {(const char *)x.data + r * x.row_stride, x.n, x.elem_stride};
    const auto sc = row_scan(row);
    if (sc.bad) {
        if (threadIdx.x == 0) report(status, r, sc.bad);
        return;
    }
    const auto rk = rank_select(row, x.n - k);
    const i64 n_gt = x.n - rk.less - rk.eq;
    KT *a = ka + (i64)blockIdx.x * k;
    i64 *ia = idx + r * k;
    /* sort keys are inverted so that ascending order is decreasing value */
    gather_kept(row, rk.t, k - n_gt, [&](i64 pos, i64 j, KT key) {
        a[pos] = ~key;
        ia[pos] = j;
    });
    __syncthreads();
    block_sort_pairs(a, ia, kb + (i64)blockIdx.x * k, ib + (i64)blockIdx.x * k, k);
}

#endif /* TKA_CUDA_ROW_KERNELS_CUH */
