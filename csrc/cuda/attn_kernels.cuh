/*
 * attn_kernels.cuh - the kernels of attention.cu: scoring (many blocks per query row) and the
 * per-row selection and weighted sum (one block per query row). Kept apart from the host
 * code so that tests can also run them in a host emulation of one block (csrc/cuda/emu).
 */
#ifndef TKA_CUDA_ATTN_KERNELS_CUH
#define TKA_CUDA_ATTN_KERNELS_CUH

#include "common.cuh"

#define SCORE_NT 256
#define SCORE_KEYS 1024  /* keys scored by one block */
#define DV_TILE 64       /* output features per pass of the weighted sum (2 per lane) */

#ifndef TKC_HOST_EMULATION  /* dynamic shared memory has no host twin */
template <class T>
__global__ void __launch_bounds__(SCORE_NT)
scores_kernel(tkc_attn a, i64 r0, typename real_of<T>::type *scores)
{
    typedef typename real_of<T>::type A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A *q = (A *)smem_raw;
    const i64 r = r0 + blockIdx.y, b = r / a.L, l = r % a.L;
    const T *qp = (const T *)a.q + a.q_off[b] + l * a.q_ld;
    for (i64 i = threadIdx.x; i < a.d; i += SCORE_NT) q[i] = to_real(qp[i]);
    __syncthreads();
    const T *kb = (const T *)a.k + a.k_off[b];
    const A *mrow = a.mask ? (const A *)a.mask + a.m_off[b] + l * a.m_sl : nullptr;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 j0 = (i64)blockIdx.x * SCORE_KEYS;
    const i64 j1 = j0 + SCORE_KEYS < a.n ? j0 + SCORE_KEYS : a.n;
    A *out = scores + (i64)blockIdx.y * a.n;
    for (i64 j = j0 + warp; j < j1; j += SCORE_NT / 32) {  /* the same j in every lane */
        const T *kj = kb + j * a.k_ld;
        A s = 0;
        for (i64 i = lane; i < a.d; i += 32) s += q[i] * to_real(kj[i]);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(TKC_FULL, s, o);
        if (lane == 0) {
            A v = s * (A)a.scale;
            if (mrow) v += mrow[j * a.m_sn];
            out[j] = v;
        }
    }
}
#endif

template <class T>
__global__ void __launch_bounds__(TKC_NT)
attn_row_kernel(tkc_attn a, i64 r0, const typename real_of<T>::type *scores, const i64 *kreq,
                const double *eps, i64 *kept, i64 W,
                typename key_of<typename real_of<T>::type>::type *ka,
                typename key_of<typename real_of<T>::type>::type *kb, i64 *ib, T *out,
                i64 *k_out, double *tau_out, u64 *status)
{
    typedef typename real_of<T>::type A;
    typedef typename key_of<A>::type KT;
    const i64 rl = blockIdx.x, r = r0 + rl, b = r / a.L;
    const Row<A> x = {(const char *)(scores + rl * a.n), a.n, (i64)sizeof(A)};
    const auto sc = row_scan(x);
    if (sc.bad) {
        if (threadIdx.x == 0) report(status, r, sc.bad);
        return;
    }
    i64 k;
    double tau = 0.0;
    if (kreq) {
        k = kreq[r] < sc.n_live ? kreq[r] : sc.n_live;
    } else {
        const double e = eps[r];
        const double ref = (double)sc.max + (e < EPS_LINEAR_MIN ? 0.5 * log(e) : 0.0);
        double dropped_mass, z;
        k = a.n - keps_walk(x, ref, e, &dropped_mass, &z);
        tau = fmin(dropped_mass / z, e);
    }
    const auto rk = rank_select(x, a.n - k);
    if (kreq && k < sc.n_live) tau = exp(-softplus(head_tail_ratio(x, k, sc.max, rk)));
    const i64 n_gt = a.n - rk.less - rk.eq;
    i64 *kp = kept + rl * W;
    KT *kar = ka ? ka + rl * W : nullptr;
    gather_kept(x, rk.t, k - n_gt, [&](i64 pos, i64 j, KT key) {
        kp[pos] = j;
        if (kar) kar[pos] = ~key;  /* ascending inverted keys = decreasing score */
    });
    __syncthreads();
    if (kar) {
        block_sort_pairs(kar, kp, kb + rl * W, ib + rl * W, k);
        for (i64 i = k + threadIdx.x; i < W; i += TKC_NT) kp[i] = -1;
        __syncthreads();
    }

    /* weighted sum of the kept rows of V, in the accumulation type */
    const A mx = sc.max;
    A zp = 0;
    for (i64 i = threadIdx.x; i < k; i += TKC_NT) zp += aexp(x[kp[i]] - mx);
    const A z = block_reduce(zp, OpSum());
    const T *vb = (const T *)a.v + a.v_off[b];
    __shared__ A part[TKC_NW][DV_TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (i64 d0 = 0; d0 < a.dv; d0 += DV_TILE) {
        A acc0 = 0, acc1 = 0;
        const bool has0 = d0 + lane < a.dv, has1 = d0 + lane + 32 < a.dv;
        for (i64 i = warp; i < k; i += TKC_NW) {
            const i64 j = kp[i];
            const A w = aexp(x[j] - mx);
            const T *vj = vb + j * a.v_ld + d0;
            if (has0) acc0 += w * to_real(vj[lane]);
            if (has1) acc1 += w * to_real(vj[lane + 32]);
        }
        __syncthreads();  /* the previous tile's readers are done with part[] */
        part[warp][lane] = acc0;
        part[warp][lane + 32] = acc1;
        __syncthreads();
        if (threadIdx.x < DV_TILE && d0 + threadIdx.x < a.dv) {
            A s = 0;
            for (int w = 0; w < TKC_NW; w++) s += part[w][threadIdx.x];
            put(out + r * a.dv + d0 + threadIdx.x, s / z);
        }
    }
    if (threadIdx.x == 0) {
        if (k_out) k_out[r] = k;
        if (tau_out) tau_out[r] = tau;
    }
}

#endif /* TKA_CUDA_ATTN_KERNELS_CUH */
