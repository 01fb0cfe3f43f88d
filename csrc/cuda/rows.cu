/*
 * rows.cu - batched tail mass, k_eps and Top-k on the GPU (DESIGN §2), one block per row.
 *
 * tail mass: scan (max, validity) -> radix selection of the k-th largest -> one pass for
 *            the largest discarded value (only when no tie spills over) -> one pass for the
 *            head and tail sums.
 * k_eps:     scan -> mass-weighted radix walk from the bottom (no sort).
 * Top-k:     scan -> radix selection -> kept set gathered in index order -> stable radix
 *            sort of the k kept (key, index) pairs by decreasing value.
 */
#include "host.cuh"

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

/* Below this eps the masses are taken relative to max + log(eps)/2 instead of the maximum,
 * so that a tail of order eps * Z stays far above the float64 underflow (as the CPU core
 * switches to log space there). */
#define EPS_LINEAR_MIN 1e-280

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

/* ------------------------------------------------------------------ host entry points */

static const char *check_rows(const tkc_rows *x)
{
    if (x->rows < 0 || x->n < 1) return "rows must be >= 0 and n >= 1";
    if (x->n >= ((i64)1 << 31)) return "rows longer than 2^31 - 1 logits are not supported on the GPU";
    if (x->dtype < TKC_F32 || x->dtype > TKC_BF16) return "unsupported dtype";
    return nullptr;
}

template <class T>
static void launch_tail(Call &c, const tkc_rows *x, const i64 *k, double *lt, double *kl)
{
    for (i64 r0 = 0; r0 < x->rows && c.good(); r0 += TKC_MAX_ROWS_PER_LAUNCH) {
        const i64 m = x->rows - r0 < TKC_MAX_ROWS_PER_LAUNCH ? x->rows - r0 : TKC_MAX_ROWS_PER_LAUNCH;
        tail_kernel<T><<<(unsigned)m, TKC_NT, 0, c.stream>>>(*x, r0, k, lt, kl, c.status);
        c.launched("tail_kernel");
    }
}

template <class T>
static void launch_keps(Call &c, const tkc_rows *x, const double *eps, i64 *k, double *tau)
{
    for (i64 r0 = 0; r0 < x->rows && c.good(); r0 += TKC_MAX_ROWS_PER_LAUNCH) {
        const i64 m = x->rows - r0 < TKC_MAX_ROWS_PER_LAUNCH ? x->rows - r0 : TKC_MAX_ROWS_PER_LAUNCH;
        keps_kernel<T><<<(unsigned)m, TKC_NT, 0, c.stream>>>(*x, r0, eps, k, tau, c.status);
        c.launched("keps_kernel");
    }
}

template <class T>
static void launch_topk(Call &c, const tkc_rows *x, i64 k, i64 *idx)
{
    typedef typename key_of<typename real_of<T>::type>::type KT;
    const i64 per_row = k * (i64)(2 * sizeof(KT) + sizeof(i64));
    const i64 chunk = rows_per_launch(x->rows, per_row);
    KT *ka = (KT *)c.alloc((size_t)(chunk * k) * sizeof(KT));
    KT *kb = (KT *)c.alloc((size_t)(chunk * k) * sizeof(KT));
    i64 *ib = (i64 *)c.alloc((size_t)(chunk * k) * sizeof(i64));
    for (i64 r0 = 0; r0 < x->rows && c.good(); r0 += chunk) {
        const i64 m = x->rows - r0 < chunk ? x->rows - r0 : chunk;
        topk_kernel<T><<<(unsigned)m, TKC_NT, 0, c.stream>>>(*x, r0, k, idx, ka, kb, ib, c.status);
        c.launched("topk_kernel");
    }
}

#define DISPATCH(dtype, FN, ...)                                                \
    switch (dtype) {                                                            \
    case TKC_F32: FN<float>(__VA_ARGS__); break;                                \
    case TKC_F64: FN<double>(__VA_ARGS__); break;                               \
    case TKC_F16: FN<__half>(__VA_ARGS__); break;                               \
    default: FN<__nv_bfloat16>(__VA_ARGS__); break;                             \
    }

extern "C" int tkc_tail_mass(const tkc_rows *x, const int64_t *k, double *log_tau, double *kl,
                             uintptr_t stream, int device, tkc_error *err)
{
    const char *bad = check_rows(x);
    if (bad) return tkc_arg_error(err, bad);
    Call c(stream, device, err);
    if (x->rows > 0) DISPATCH(x->dtype, launch_tail, c, x, k, log_tau, kl)
    return c.finish();
}

extern "C" int tkc_k_eps(const tkc_rows *x, const double *eps, int64_t *k_out, double *tau_out,
                         uintptr_t stream, int device, tkc_error *err)
{
    const char *bad = check_rows(x);
    if (bad) return tkc_arg_error(err, bad);
    Call c(stream, device, err);
    if (x->rows > 0) DISPATCH(x->dtype, launch_keps, c, x, eps, k_out, tau_out)
    return c.finish();
}

extern "C" int tkc_topk(const tkc_rows *x, int64_t k, int64_t *idx_out, uintptr_t stream,
                        int device, tkc_error *err)
{
    const char *bad = check_rows(x);
    if (bad) return tkc_arg_error(err, bad);
    if (k < 0 || k > x->n) return tkc_arg_error(err, "k must be in [0, n]");
    Call c(stream, device, err);
    if (x->rows > 0 && k > 0) DISPATCH(x->dtype, launch_topk, c, x, k, idx_out)
    return c.finish();
}

extern "C" int tkc_device_info(int device, int *count, char *name, size_t name_len, int *major,
                               int *minor, tkc_error *err)
{
    err->row = -1;
    err->msg[0] = 0;
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) {
        *count = 0;
        snprintf(err->msg, sizeof err->msg, "%s", cudaGetErrorString(e));
        cudaGetLastError();
        return TKC_ERR_CUDA;
    }
    if (device < 0 || device >= *count) {
        snprintf(err->msg, sizeof err->msg, "no CUDA device %d (%d visible)", device, *count);
        return TKC_ERR_CUDA;
    }
    cudaDeviceProp p;
    e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) {
        snprintf(err->msg, sizeof err->msg, "%s", cudaGetErrorString(e));
        cudaGetLastError();
        return TKC_ERR_CUDA;
    }
    snprintf(name, name_len, "%s", p.name);
    *major = p.major;
    *minor = p.minor;
    return TKC_OK;
}

extern "C" int tkc_runtime_version(void)
{
    return CUDART_VERSION;
}
