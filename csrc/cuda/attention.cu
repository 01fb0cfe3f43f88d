/*
 * attention.cu - Top-k attention on the GPU (DESIGN §3), decode (L = 1) and prefill alike.
 *
 * Per chunk of query rows:
 *   1. scores_kernel: s_j = scale * q . k_j (+ mask), one warp per key, the lanes splitting
 *      d; many blocks per query row, so that reading K can use the whole GPU. Scores go to
 *      a scratch buffer of n values per row in the accumulation type (float32, or float64
 *      for float64 operands).
 *   2. attn_row_kernel, one block per query row: validate the scores, choose k (given, or
 *      k_eps by the radix walk), select the k-th largest by rank, gather the kept positions
 *      in index order (ties: lower position), optionally sort them by decreasing score for
 *      the caller, then out = sum_kept e^{s - max} v / sum_kept e^{s - max}, reading only
 *      the kept rows of V.
 */
#include "host.cuh"

#define SCORE_NT 256
#define SCORE_KEYS 1024  /* keys scored by one block */
#define DV_TILE 64       /* output features per pass of the weighted sum (2 per lane) */
#define EPS_LINEAR_MIN 1e-280

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

template <class T>
static void launch_attention(Call &c, const tkc_attn *a, const i64 *k, const double *eps,
                             void *out, i64 *k_out, double *tau_out, i64 *idx_out, i64 idx_width)
{
    typedef typename real_of<T>::type A;
    typedef typename key_of<A>::type KT;
    const i64 rows = a->batch * a->L;
    const bool info = idx_out != nullptr;
    const i64 W = info ? idx_width : a->n;
    const i64 per_row = a->n * (i64)sizeof(A)
                        + (info ? W * (i64)(2 * sizeof(KT) + sizeof(i64)) : W * (i64)sizeof(i64));
    const i64 chunk = rows_per_launch(rows, per_row);
    A *scores = (A *)c.alloc((size_t)(chunk * a->n) * sizeof(A));
    i64 *kept = info ? nullptr : (i64 *)c.alloc((size_t)(chunk * W) * sizeof(i64));
    KT *ka = info ? (KT *)c.alloc((size_t)(chunk * W) * sizeof(KT)) : nullptr;
    KT *kb = info ? (KT *)c.alloc((size_t)(chunk * W) * sizeof(KT)) : nullptr;
    i64 *ib = info ? (i64 *)c.alloc((size_t)(chunk * W) * sizeof(i64)) : nullptr;
    const size_t smem = (size_t)a->d * sizeof(A);
    for (i64 r0 = 0; r0 < rows && c.good(); r0 += chunk) {
        const i64 m = rows - r0 < chunk ? rows - r0 : chunk;
        dim3 grid((unsigned)((a->n + SCORE_KEYS - 1) / SCORE_KEYS), (unsigned)m);
        scores_kernel<T><<<grid, SCORE_NT, smem, c.stream>>>(*a, r0, scores);
        if (!c.launched("scores_kernel")) break;
        attn_row_kernel<T><<<(unsigned)m, TKC_NT, 0, c.stream>>>(
            *a, r0, scores, k, eps, info ? idx_out + r0 * W : kept, W, ka, kb, ib, (T *)out,
            k_out, tau_out, c.status);
        c.launched("attn_row_kernel");
    }
}

extern "C" int tkc_topk_attention(const tkc_attn *a, const int64_t *k, const double *eps,
                                  void *out, int64_t *k_out, double *tau_out, int64_t *idx_out,
                                  int64_t idx_width, uintptr_t stream, int device, tkc_error *err)
{
    if (a->batch < 0 || a->L < 1 || a->n < 1 || a->d < 1 || a->dv < 0)
        return tkc_arg_error(err, "attention: empty L, n or d");
    if (a->n >= ((i64)1 << 31))
        return tkc_arg_error(err, "attention: more than 2^31 - 1 keys are not supported on the GPU");
    if (a->d > 4096) return tkc_arg_error(err, "attention: d > 4096 is not supported on the GPU");
    if ((k == nullptr) == (eps == nullptr)) return tkc_arg_error(err, "attention: give k or eps");
    if (idx_out && idx_width < 1) return tkc_arg_error(err, "attention: idx_width must be >= 1");
    if (a->dtype < TKC_F32 || a->dtype > TKC_BF16) return tkc_arg_error(err, "unsupported dtype");
    Call c(stream, device, err);
    if (a->batch > 0) {
        switch (a->dtype) {
        case TKC_F32: launch_attention<float>(c, a, k, eps, out, k_out, tau_out, idx_out, idx_width); break;
        case TKC_F64: launch_attention<double>(c, a, k, eps, out, k_out, tau_out, idx_out, idx_width); break;
        case TKC_F16: launch_attention<__half>(c, a, k, eps, out, k_out, tau_out, idx_out, idx_width); break;
        default: launch_attention<__nv_bfloat16>(c, a, k, eps, out, k_out, tau_out, idx_out, idx_width); break;
        }
    }
    return c.finish();
}
