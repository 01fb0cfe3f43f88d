/*
 * rows.cu - batched tail mass, k_eps and Top-k on the GPU (docs/design.md §2), one block per row.
 *
 * tail mass: scan (max, validity) -> radix selection of the k-th largest -> one pass for
 *            the largest discarded value (only when no tie spills over) -> one pass for the
 *            head and tail sums.
 * k_eps:     scan -> mass-weighted radix walk from the bottom (no sort).
 * Top-k:     scan -> radix selection -> kept set gathered in index order -> stable radix
 *            sort of the k kept (key, index) pairs by decreasing value.
 */
#include "host.cuh"
#include "row_kernels.cuh"

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
        return TKA_ERR_CUDA;
    }
    if (device < 0 || device >= *count) {
        snprintf(err->msg, sizeof err->msg, "no CUDA device %d (%d visible)", device, *count);
        return TKA_ERR_CUDA;
    }
    cudaDeviceProp p;
    e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) {
        snprintf(err->msg, sizeof err->msg, "%s", cudaGetErrorString(e));
        cudaGetLastError();
        return TKA_ERR_CUDA;
    }
    snprintf(name, name_len, "%s", p.name);
    *major = p.major;
    *minor = p.minor;
    return TKA_OK;
}

extern "C" int tkc_runtime_version(void)
{
    return CUDART_VERSION;
}
